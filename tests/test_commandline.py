"""The one command-line mechanism: a typed signature is the command line, mistakes are
one-line UsageErrors, and a recipe's unknown flags reach its config loader untouched."""

from __future__ import annotations

from typing import Literal

import pytest

from lmforge.commandline import UsageError, command, parse, run, usage

CALLS: list[dict[str, object]] = []


@command(positional=("question",))
def ask(kb: str, question: str, history: list[str] | None = None, top: int = 3, json: bool = False,
        mode: Literal["dense", "hybrid"] = "hybrid", weights: dict[str, float] | None = None) -> None:
    """Ask one question.

    Args:
        kb: the knowledge base folder.
        question: what to ask.
        history: earlier turns.
        top: how many answers.
        json: print JSON.
        mode: dense or hybrid retrieval.
        weights: a JSON mapping.
    """
    CALLS.append({"kb": kb, "question": question, "history": history, "top": top, "json": json, "mode": mode,
                  "weights": weights})


@command(positional=("model",))
def serve(model: list[str] | None = None, port: int = 8000, n: int = 10) -> None:
    """Serve."""
    CALLS.append({"model": model, "port": port, "n": n})


def recipe(output: str, resume: bool = False, overrides: list[str] | None = None) -> None:
    """A recipe: unknown flags are its config overrides."""
    CALLS.append({"output": output, "resume": resume, "overrides": overrides})


COMMANDS = {"app": {"ask": ask}, "serve": serve, "recipe": recipe}


def test_values_are_converted_to_the_signature_types() -> None:
    CALLS.clear()
    run(COMMANDS, ["app", "ask", "--kb", "kb", "Is it covered?", "--top=5", "--json", "--mode", "dense",
                   "--weights", '{"bm25": 0.3}'])
    assert CALLS[-1] == {"kb": "kb", "question": "Is it covered?", "history": None, "top": 5, "json": True,
                         "mode": "dense", "weights": {"bm25": 0.3}}
    run(COMMANDS, ["app", "ask", "--question", "q", "--kb", "kb", "--json", "false"])  # named, explicit false
    assert CALLS[-1]["question"] == "q" and CALLS[-1]["json"] is False


def test_lists_take_several_values_repeats_and_json_and_dashes_match_underscores() -> None:
    CALLS.clear()
    run(COMMANDS, ["serve", "a", "b", "--port", "9000", "-n", "3"])
    assert CALLS[-1] == {"model": ["a", "b"], "port": 9000, "n": 3}
    run(COMMANDS, ["serve", "--model", "a", "b", "--model", "c", "--model", '["d", "e"]'])
    assert CALLS[-1]["model"] == ["a", "b", "c", "d", "e"]
    assert parse(ask, ["ask"], ["--kb", "k", "q", "--history", "h1", "h2"])["history"] == ["h1", "h2"]


def test_a_recipe_gets_the_flags_its_signature_does_not_name() -> None:
    CALLS.clear()
    run(COMMANDS, ["recipe", "--output", "o", "--train.lr", "3e-5", "--zero-shot", "--text-field", "review",
                   "--resume"])
    assert CALLS[-1] == {"output": "o", "resume": True,
                         "overrides": ["--train.lr", "3e-5", "--zero-shot", "--text-field", "review"]}


@pytest.mark.parametrize(("argv", "says"), [
    (["app", "ask", "--kb", "k", "q", "--top", "many"], "--top 'many': expected an integer"),
    (["app", "ask", "--kb", "k", "q", "--mode", "sparse"], "expected one of dense, hybrid"),
    (["app", "ask", "--kb", "k", "q", "--json", "maybe"], "unexpected argument 'maybe'"),
    (["app", "ask", "--kb", "k", "q", "--weights", "[1]"], "expected a JSON object"),
    (["app", "ask", "--kb", "k", "q", "--tops", "2"], "unknown option --tops (did you mean --top?)"),
    (["app", "ask", "q"], "needs --kb"),
    (["app", "ask", "--kb"], "--kb needs a value"),
    (["app", "ask", "--kb", "k", "q", "--top", "1", "--top", "2"], "given more than once"),
    (["app", "nosuch"], "unknown command 'lmforge app nosuch' (known: ask)"),
    (["serve", "--port", "80", "--model"], "--model needs at least one value"),
])
def test_mistakes_are_one_line_usage_errors(argv: list[str], says: str) -> None:
    with pytest.raises(UsageError) as error:
        run(COMMANDS, argv)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_help_lists_every_option_with_its_type_default_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(COMMANDS, ["app", "ask", "--help"]) is None
    text = capsys.readouterr().out
    assert text.startswith("usage: lmforge app ask QUESTION --kb KB [options]")
    assert "--top INT  (default: 3)" in text and "how many answers." in text
    assert "--mode {dense,hybrid}  (default: 'hybrid')" in text and "--history TEXT ...  (default: None)" in text
    assert "[--section.key VALUE ...]" in usage(recipe, ["recipe"])
    run(COMMANDS, ["--help"])
    listing = capsys.readouterr().out
    assert "app ask" in listing and "Ask one question." in listing and "serve" in listing
