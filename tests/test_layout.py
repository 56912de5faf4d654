"""The package's shape: the library never imports a recipe, and the public API is whole."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lmforge

PACKAGE = Path(lmforge.__file__).parent
ENTRY_POINTS = {PACKAGE / "__init__.py", PACKAGE / "cli.py"}  # they expose the recipes, lazily


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_a_recipe() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ENTRY_POINTS or (PACKAGE / "recipes") in path.parents:
            continue
        bad = sorted(name for name in _imports(path) if name.startswith("lmforge.recipes"))
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {', '.join(bad)}")
    assert not offenders, offenders


def test_every_public_name_resolves() -> None:
    for name in lmforge.__all__:
        assert getattr(lmforge, name) is not None, name
    assert callable(lmforge.finetune) and callable(lmforge.pretrain)
    assert callable(lmforge.evaluate) and callable(lmforge.predict)


def test_the_readme_imports_from_lmforge_alone() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    deep = [line for block in blocks for line in block.splitlines() if re.match(r"\s*from lmforge\.", line)]
    assert not deep, deep


def test_encoders_and_decoders_are_backbones() -> None:
    import torch

    from lmforge.models import Backbone, Decoder, Encoder, MaskedLM, backbone_of, preset

    for model in (Encoder(preset("bert-tiny", vocab_size=50)), MaskedLM(preset("bert-tiny", vocab_size=50)),
                  Decoder(preset("llama-tiny", vocab_size=50))):
        body = backbone_of(model)
        assert isinstance(body, Backbone)
        batch = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
        assert body.hidden_states(batch).shape == (2, 5, body.config.hidden_size)
        assert body.attention(0) is not None and body.input_embeddings().num_embeddings == 50
        assert body.causal == isinstance(model, Decoder)


@pytest.mark.parametrize("argv", [
    ["--help"], ["generate", "--help"], ["evaluate", "--help"], ["predict", "--help"], ["tokenizer", "train", "--help"],
    ["prepare", "--help"], ["corpora", "--help"], ["report", "--help"], ["pipeline", "run", "--help"],
    ["pretrain", "--help"], ["finetune", "--help"], ["transfer", "curve", "--help"],
    ["app", "support", "build", "--help"], ["app", "support", "ask", "--help"], ["serve", "--help"],
    ["app", "recommend", "build", "--help"], ["app", "recommend", "eval", "--help"], ["fewshot", "curve", "--help"],
    ["app", "monitor", "run", "--help"], ["quantize", "--help"], ["app", "--help"],
])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's --help
        code = int(exit_.code or 0)
    assert code == 0 and len(capsys.readouterr().out) > 80


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "p", "--max_new_tokens", "abc"],
    ["tokenizer", "train", "--output", "o", "--kind", "nope"],
    ["corpora", "--bogus", "1"],
    ["evaluate", "--model", "/nope", "--data", "x.jsonl"],
    ["predict", "--model", "/nope", "--data", "x", "--output", "y"],
    ["prepare", "--tokenizer", "/nope", "--output", "o"],
    ["report", "/nope"],
    ["pipeline", "run", "/nope.yaml"],
    ["transfer", "curve", "--budgets", "5"],
    ["fewshot", "curve", "--methods", "bogus", "--shots", "8", "--output", "o"],
    ["finetune", "--output", "o", "--task", "classify", "--model", "m", "--train", "t", "--shots", "many"],
    ["serve", "--port", "eighty"],
    ["nosuch"],
])
def test_a_bad_value_is_a_one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("lmforge: error:"), error
