"""NER: first-sub-token alignment, seqeval strict entity F1 (known answers), readers,
windows for long sentences, and learning above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.loader import IGNORE_INDEX
from lmforge.errors import DataError
from lmforge.eval.metrics import entity_metrics
from lmforge.tasks import TaskSpec, make_task
from lmforge.tasks.ner import read_conll, repair_bio, spans_to_tags
from lmforge.tokenizer import Tokenizer
from tests.tasks.conftest import ner, write_jsonl
from tests.tasks.helpers import finetune

FIELDS = {"tokens": "tokens", "tags": "tags", "text": "text", "spans": "spans"}


def test_entity_f1_is_entity_level_and_strict() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["B-PER", "O", "O", "B-LOC"]]  # 3 of 4 tokens right, but only 1 of 2 entities
    metrics = entity_metrics(gold, predicted)
    assert metrics["entity_precision"] == 0.5 and metrics["entity_recall"] == 0.5 and metrics["entity_f1"] == 0.5
    assert metrics["PER_f1"] == 0.0 and metrics["LOC_f1"] == 1.0
    # strict mode: an entity that starts with I- is not an entity
    assert entity_metrics([["B-PER", "I-PER"]], [["I-PER", "I-PER"]])["entity_f1"] == 0.0
    # BIOES
    assert entity_metrics([["S-LOC", "B-PER", "E-PER"]], [["S-LOC", "B-PER", "I-PER"]], "BIOES")["entity_f1"] == \
        pytest.approx(2 / 3)


def test_labels_sit_on_the_first_sub_token(tiny_encoder_dir: Path) -> None:
    tokenizer = Tokenizer.load(tiny_encoder_dir)
    task = make_task(TaskSpec("ner", FIELDS, []), tokenizer)
    task.fit([{"tokens": ["x"], "tags": ["O", "B-PER", "I-PER", "B-LOC"]}])
    assert task.spec.labels == ["O", "B-LOC", "B-PER", "I-PER"]
    words = ["mr", "annagrace", "smith", "in", "paris"]  # annagrace splits into several pieces
    example = {"tokens": words, "tags": ["O", "B-PER", "I-PER", "O", "B-LOC"], "_source": "t:1"}
    (feature,) = task.encode(example)
    encoded = tokenizer.encode_full(words)
    assert encoded.word_ids.count(1) > 1
    expected = []
    for position, word in enumerate(encoded.word_ids):
        first = word is not None and encoded.word_ids.index(word) == position
        expected.append(task.spec.labels.index(example["tags"][word]) if first else IGNORE_INDEX)
    assert feature["labels"] == expected
    assert [feature["labels"][p] for p in feature["_first"]] == [0, 2, 3, 0, 1]


def test_readers_and_tag_checks(tmp_path: Path) -> None:
    conll = tmp_path / "a.conll"
    conll.write_text("-DOCSTART- O\n\nJohn NNP B-PER\nlives VBZ O\n\nin IN O\nParis NNP B-LOC\n", encoding="utf-8")
    sentences = list(read_conll(conll))
    assert [s["tokens"] for s in sentences] == [["John", "lives"], ["in", "Paris"]]
    assert sentences[1]["tags"] == ["O", "B-LOC"] and sentences[1]["_source"] == f"{conll}:6"
    words, tags = spans_to_tags("张三在北京 works", [{"start": 0, "end": 2, "label": "PER"},
                                                    {"start": 3, "end": 5, "label": "LOC"}], "x:1", "BIO")
    assert words == ["张", "三", "在", "北", "京", "works"]
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    assert spans_to_tags("new york", [{"start": 0, "end": 8, "label": "LOC"}], "x", "BIOES")[1] == ["B-LOC", "E-LOC"]
    with pytest.raises(DataError, match="x:1: span 1-3 .* does not fall on word boundaries"):
        spans_to_tags("new york", [{"start": 1, "end": 3, "label": "LOC"}], "x:1", "BIO")
    assert repair_bio(["O", "I-PER", "I-PER", "I-LOC"]) == ["O", "B-PER", "I-PER", "B-LOC"]


def test_bad_tags_and_lengths_are_named(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tiny_encoder_dir)
    task = make_task(TaskSpec("ner", FIELDS, []), tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "PER"]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: tag 'PER' is not a BIO tag"):
        task.read([str(bad)], "train")
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"bad2.jsonl:1: 2 tokens but 1 tags"):
        task.read([str(bad)], "train")


def test_long_sentences_split_into_windows_and_join_back(tiny_encoder_dir: Path) -> None:
    tokenizer = Tokenizer.load(tiny_encoder_dir)
    task = make_task(TaskSpec("ner", FIELDS, [], {"max_length": 12, "truncate": True}), tokenizer)
    rows = ner(3, 9)
    example = {"tokens": sum((r["tokens"] for r in rows), []), "tags": sum((r["tags"] for r in rows), []),
               "_source": "long:1"}
    task.fit([example])
    features = task.encode(example)
    assert len(features) > 1 and all(len(f["input_ids"]) <= 12 for f in features)
    assert sum(len(f["_first"]) for f in features) == len(example["tokens"])
    # decoding each window with its gold labels gives back the gold tags of the whole sentence
    merged = None
    for feature in features:
        tags = [task.spec.labels[feature["labels"][p]] for p in feature["_first"]]
        merged = task.merge(merged, {"offset": feature["_offset"], "tags": tags}, example)
    assert task.finish(merged, example)["tags"] == example["tags"]
    default = make_task(TaskSpec("ner", FIELDS, task.spec.labels, {"max_length": 12}), tokenizer)
    assert len(default.encode(example)) == len(features) and default.truncated == 1  # windows by default
    strict = make_task(TaskSpec("ner", FIELDS, task.spec.labels, {"max_length": 12, "truncate": False}), tokenizer)
    with pytest.raises(DataError, match="long:1: .* tokens exceed max_length=12"):
        strict.encode(example)


def test_ner_learns_entities(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ner(300, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", ner(80, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "ner", "--train", str(train), "--validation",
                       str(validation), epochs=5)
    assert results["validation"]["entity_f1"] > 0.6, results  # chance is near 0
    import json

    first = json.loads((tmp_path / "run" / "predictions-validation.jsonl").read_text().splitlines()[0])
    assert {"tokens", "tags", "predicted_tags", "entities"} <= set(first)  # gold tags kept beside the prediction
    assert len(first["predicted_tags"]) == len(first["tokens"])


def test_token_task_defaults_and_explicit_values_winning(tiny_encoder_dir: Path) -> None:
    from lmforge.recipes.finetune import _fitted_train_config, load_config

    base = ["--task", "ner", "--model", str(tiny_encoder_dir), "--train", "x.jsonl"]
    config = load_config(None, base)
    section, train = config["finetune"], config["train"]
    assert section.epochs == 5.0 and section.warmup_ratio == 0.1 and train.head_lr == 5e-3 and train.lr == 4e-4  # narrow
    spec = section.spec(512)
    assert spec.options["max_length"] == 128 and "crf" not in spec.options  # the task's default: a CRF
    assert make_task(spec, Tokenizer.load(tiny_encoder_dir)).options["crf"] is True
    given = load_config(None, [*base, "--epochs", "2", "--train.head_lr", "1e-3", "--ner.crf", "false",
                               "--train.warmup_steps", "7"])
    assert given["finetune"].epochs == 2.0 and given["train"].head_lr == 1e-3 and given["finetune"].crf is False
    assert load_config(None, [*base, "--ner.crf"])["finetune"].crf is True
    assert load_config(None, [*base, "--train.steps", "40"])["finetune"].epochs is None
    classify = load_config(None, ["--task", "classify", "--model", str(tiny_encoder_dir), "--train", "x.jsonl"])
    assert classify["finetune"].epochs == 3.0 and classify["train"].head_lr is None
    assert classify["finetune"].warmup_ratio is None

    class Sized:  # what _fitted_train_config reads of the data: the training set's size
        features = {"train": list(range(320))}
        examples: dict[str, list[int]] = {}

    fitted = _fitted_train_config(section, train, None, None, Sized())  # type: ignore[arg-type]
    assert fitted.steps == 50 and fitted.warmup_steps == 5  # 5 epochs of 10 steps, 10% warm-up
    kept = _fitted_train_config(given["finetune"], given["train"], None, None, Sized())  # type: ignore[arg-type]
    assert kept.warmup_steps == 7


def test_token_tasks_on_narrow_models_default_to_a_higher_rate(tiny_encoder_dir: Path, minilm_dir: Path) -> None:
    from lmforge.peft.core import DEFAULT_LR
    from lmforge.recipes.finetune import NARROW_LR, load_config, model_width

    assert model_width(str(tiny_encoder_dir)) == 64 and model_width(str(minilm_dir)) == 384  # lmforge's and HF's config
    assert model_width("no/such/folder") is None

    def lr(task: str, model: Path | str, *more: str) -> float:
        return load_config(None, ["--task", task, "--model", str(model), "--train", "x.jsonl", *more])["train"].lr

    assert lr("ner", tiny_encoder_dir) == NARROW_LR["ner"] == 4e-4 and lr("ner", f"random:{tiny_encoder_dir}") == 4e-4
    assert lr("ner", minilm_dir) == 5e-5  # MiniLM-L6 and wider keep full fine-tuning's usual rate
    assert lr("classify", tiny_encoder_dir) == 5e-5  # classification keeps it on narrow models too
    assert lr("ner", tiny_encoder_dir, "--train.lr", "1e-5") == 1e-5  # an explicit value wins
    assert lr("ner", tiny_encoder_dir, "--peft", "lora") == DEFAULT_LR["lora"]  # a PEFT method keeps its own rate
