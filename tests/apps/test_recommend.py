"""The recommender: build, eval, user and similar end to end on a small made-up catalogue;
metric known answers; cold-start items kept out of training; users without history; bad
files and unknown ids as clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.apps.recommend import (
    Interaction,
    RecConfig,
    Recommender,
    build_rec,
    fitted_histories,
    read_interactions,
    read_items,
    split_interactions,
    training_pairs,
)
from lmforge.cli import main
from lmforge.data.corpora import split_of
from lmforge.errors import DataError
from lmforge.eval.metrics import coverage, retrieval_metrics

GENRES = ["space opera", "murder mystery", "romantic comedy", "cowboy western", "cartoon animation", "war drama"]


def write_catalogue(folder: Path) -> tuple[Path, Path]:
    """48 items in 6 genres; 40 users who each like one or two genres (made up for the tests)."""
    rng = np.random.default_rng(0)
    items = folder / "items.csv"
    with open(items, "w") as handle:
        handle.write("item,title,genres\n")
        for i in range(48):
            handle.write(f"m{i},Film number {i},{GENRES[i % 6]}\n")
    inter = folder / "ratings.csv"
    with open(inter, "w") as handle:
        handle.write("user,item,rating,time\n")
        for u in range(40):
            liked = [u % 6, (u + 1) % 6] if u % 3 == 0 else [u % 6]
            pool = [i for i in range(48) if i % 6 in liked]
            for t, i in enumerate(rng.choice(pool, size=min(8, len(pool)), replace=False)):
                handle.write(f"u{u},m{i},{1 + (t % 5)},{1000 + 10 * u + t}\n")
        cold = next(f"m{i}" for i in range(48) if split_of(f"cold:0:m{i}", 0.0, 0.15) == "test")
        handle.write(f"newbie,{cold},4,5000\n")  # one interaction, on an item the build holds out whole
    return inter, items


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_catalogue(tmp_path_factory.mktemp("catalogue"))


@pytest.fixture(scope="module")
def rec_dir(catalogue: tuple[Path, Path], tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inter, items = catalogue
    out = tmp_path_factory.mktemp("rec") / "rec"
    build_rec(str(inter), out, str(items), tiny_encoder_dir, time_field="time", text_fields=["title", "genres"],
              config=RecConfig(steps=4, batch_size=8, cold_share=0.15, history=4), progress=False)
    return out


def test_build_eval_user_and_similar_end_to_end(rec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recommender.load(rec_dir)
    settings = json.loads((rec_dir / "rec.json").read_text())
    assert settings["data"]["item_count"] == 48 and settings["encoder"]["trained"]["steps"] == 4
    assert main(["app", "recommend", "eval", "--rec", str(rec_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"hybrid", "two-tower", "ItemKNN", "MostPopular", "BM25 (item text)", "random"} <= set(summary["rankers"])
    # co-occurrence finds the genre neighbours: far above random on warm items
    assert summary["rankers"]["ItemKNN"]["ndcg@10"] > 3 * summary["rankers"]["random"]["ndcg@10"]
    assert summary["rankers"]["hybrid"]["ndcg@10"] > 3 * summary["rankers"]["random"]["ndcg@10"]
    scores = rec.settings["validation"]["alpha_ndcg@10"]
    assert scores[str(rec.alpha)] == max(scores.values())  # the weight is the validation's best
    assert summary["rankers"]["MostPopular"]["cold_recall@10"] == 0.0  # unseen items have no popularity
    assert summary["latency_ms_p99"] >= summary["latency_ms_p50"] > 0
    assert main(["app", "recommend", "user", "--rec", str(rec_dir), "--user", "u3", "-n", "5"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["items"]) == 5 and answer["how"] == "hybrid"
    seen = set(rec.catalogue.histories["u3"])
    assert not seen & {item["item"] for item in answer["items"]}
    assert main(["app", "recommend", "similar", "--rec", str(rec_dir), "--item", "m0", "-n", "3"]) == 0
    similar = json.loads(capsys.readouterr().out)
    assert [i["item"] for i in similar["items"]] and "m0" not in [i["item"] for i in similar["items"]]
    assert sum(GENRES[0] in i["text"] for i in similar["items"]) >= 2  # same genre by text and co-occurrence


def test_cold_start_items_never_reach_training(catalogue: tuple[Path, Path], rec_dir: Path) -> None:
    inter, items = catalogue
    texts = read_items(items, "item", ["title", "genres"])
    rows = read_interactions(inter, texts)
    cold = split_interactions(rows, list(texts), cold_share=0.15)
    assert cold and all(r.split == "cold" for r in rows if r.item in cold)
    assert not any(r.item in cold for r in rows if r.split in ("train", "validation"))
    histories = fitted_histories(rows)
    pairs = training_pairs(histories, texts, 4, 1000, 0)
    cold_texts = {texts[i] for i in cold}
    assert not any(p.doc_key in cold or p.document in cold_texts or any(t in p.query for t in cold_texts)
                   for p in pairs)
    rec = Recommender.load(rec_dir)
    cold_positions = [rec.catalogue.position[i] for i in cold]
    assert rec.catalogue.popularity[cold_positions].sum() == 0
    assert rec.catalogue.similarity[cold_positions].sum() == 0 and rec.catalogue.similarity[:, cold_positions].sum() == 0
    assert set(rec.settings["split"]["counts"]) == {"train", "validation", "test", "cold"}


def test_a_user_without_history_gets_popular_items(rec_dir: Path) -> None:
    rec = Recommender.load(rec_dir)
    assert rec.catalogue.histories["newbie"] == []  # their one item is a cold-start item
    answer = rec.for_user("newbie", 4)
    assert answer["how"].startswith("popular")
    popularity = [item["popularity"] for item in answer["items"]]
    assert popularity == sorted(popularity, reverse=True) and popularity[0] == rec.catalogue.popularity.max()


def test_unknown_users_and_items_are_clear_errors(rec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recommender.load(rec_dir)
    with pytest.raises(DataError, match="user 'nobody' is not in the interactions"):
        rec.for_user("nobody")
    with pytest.raises(DataError, match="item 'm999' is not in the catalogue"):
        rec.similar("m999")
    assert main(["app", "recommend", "user", "--rec", str(rec_dir), "--user", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


@pytest.mark.parametrize("rows, message", [
    (["u1,m0,4,1", "u1,m1,,2"], "field 'rating' is empty"),
    (["u1,m0,4,1", "u1,m1,good,2"], "rating 'good' .* is not a number"),
    (["u1,m0,4,1", "u1,m0,5,2"], "user 'u1' and item 'm0' are also at"),
    (["u1,m0,4,1", "u1,m77,5,2"], "item 'm77' is not in the items file"),
])
def test_bad_interaction_files_name_file_and_line(tmp_path: Path, rows: list[str], message: str) -> None:
    inter = tmp_path / "ratings.csv"
    inter.write_text("user,item,rating,time\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_interactions(inter, {"m0": "a", "m1": "b"})
    assert f"{inter}:3" in str(error.value)


def test_bad_item_files_name_file_and_line(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item,title\nm0,Alpha\nm0,Beta\n")
    with pytest.raises(DataError, match=f"{items}:3: item 'm0' is also at {items}:2"):
        read_items(items)
    items.write_text("item,title\nm0,Alpha\nm1,\n")
    with pytest.raises(DataError, match=f"{items}:3: item 'm1' has no text"):
        read_items(items)
    items.write_text("id,title\nm0,Alpha\n")
    with pytest.raises(DataError, match=f"{items}:2: field 'item' is missing"):
        read_items(items)


def test_ranking_metrics_known_answers() -> None:
    # one user, relevant {a, c}; ranking a, b, c: DCG = 1 + 1/log2(4), IDCG = 1 + 1/log2(3)
    metrics = retrieval_metrics([["a", "b", "c"]], [{"a", "c"}], ks=(3,))
    assert metrics["ndcg@3"] == pytest.approx((1 + 0.5) / (1 + 1 / np.log2(3)))
    assert metrics["recall@3"] == 1.0 and metrics["hit@3"] == 1.0
    assert retrieval_metrics([["b", "d"]], [{"a", "c"}], ks=(2,))["ndcg@2"] == 0.0
    assert coverage([["a", "b"], ["b", "c"]], 10) == pytest.approx(0.3)


def test_time_split_holds_out_each_users_latest() -> None:
    rows = [Interaction("u", f"i{t}", None, float(t), f"f:{t}") for t in range(10)]
    split_interactions(rows, [f"i{t}" for t in range(10)], how="time", test_share=0.2, cold_share=0.0,
                       validation_share=0.0)
    assert [r.split for r in rows] == ["train"] * 8 + ["test"] * 2


def test_a_pair_score_reranker_trains_on_exported_pairs_and_reorders(rec_dir: Path, tiny_encoder_dir: Path,
                                                                     tmp_path: Path) -> None:
    import lmforge
    from lmforge.apps.recommend import Reranker, evaluate_rec, reranker_pairs

    rec = Recommender.load(rec_dir)
    pairs = reranker_pairs(rec, count=30, negatives=2)
    by_group: dict[str, list[dict]] = {}
    for pair in pairs:
        by_group.setdefault(pair["group"], []).append(pair)
    assert all(sorted(p["label"] for p in group) == [0] * (len(group) - 1) + [1] for group in by_group.values())
    for group in by_group.values():  # negatives are items the user never had (in training)
        user = group[0]["group"].split("@")[0]
        known = {rec.texts[i] for i in rec.catalogue.histories[user]}
        assert not any(p["item"] in known for p in group if p["label"] == 0)
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    lmforge.finetune("pair-score", str(tiny_encoder_dir), str(train), str(tmp_path / "reranker"),
                     validation=str(train), overrides=["--epochs", "1", "--train.batch_size", "8"])
    summary = evaluate_rec(rec, reranker=Reranker(tmp_path / "reranker", depth=8), rerank_users=5)
    assert summary["reranked_users"] == 5
    reranked = summary["on_reranked_users"]
    assert {"hybrid + re-ranker", "two-tower + re-ranker", "hybrid", "ItemKNN"} <= set(reranked)
    assert "hybrid + re-ranker" not in summary["rankers"]  # scored on the sampled users only
