"""Recommender results (docs/apps/recommend.md): MovieLens-100k read from the installed recbole
wheel, one split for every ranker (random 80/20 by default; 10% of the movies held out whole as
cold-start items, seen only as text; 10% of the training interactions for the hybrid's weight).

Rows: random, MostPopular, ItemKNN, BM25 on item text, two-tower untuned, two-tower trained,
hybrid (trained two-tower + ItemKNN). Columns: NDCG@10, recall@10, hit@10, coverage, cold-start
recall@10; build time and query latency.

    python benchmarks/recommend.py [--work runs/recommend] [--steps 300] [--split random]

Writes docs/results/recommend.json, recommend.md (table), recommend.png and recommend-page.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from lmforge.apps.recommend import RecConfig, Recommender, Reranker, build_rec, evaluate_rec  # noqa: E402
from lmforge.hardware import describe_machine  # noqa: E402


def query_latency(rec: Recommender, users: list[str], repeats: int = 200) -> dict[str, float]:
    """ms per recommendation: with the stored user vector (the served path), and embedding the
    user's history on the spot (a user whose history just changed)."""
    import numpy as np

    stored, fresh = [], []
    for index in range(repeats):
        user = users[index % len(users)]
        started = time.perf_counter()
        rec.for_user(user, 10)
        stored.append((time.perf_counter() - started) * 1000)
    for user in users[:50]:
        started = time.perf_counter()
        rec.embed_users([user])
        rec.for_user(user, 10)
        fresh.append((time.perf_counter() - started) * 1000)
    return {"stored_p50": round(float(np.percentile(stored, 50)), 2), "stored_p99": round(float(np.percentile(stored, 99)), 2),
            "fresh_p50": round(float(np.percentile(fresh, 50)), 2), "fresh_p99": round(float(np.percentile(fresh, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/recommend")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--split", default="random", choices=["random", "time"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--reranker", help="a pair-score model fine-tuned on `lmforge app recommend pairs` "
                                           "(see docs/apps/recommend.md); adds the re-ranked rows")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    results = {}
    for name, steps in (("untuned", 0), ("trained", args.steps)):
        folder = work / f"rec-{args.split}-{name}"
        if not (folder / "rec.json").exists():
            build_rec("corpus:ml-100k", folder, config=RecConfig(steps=steps, split=args.split))
        rec = Recommender.load(folder)
        started = time.perf_counter()
        reranker = Reranker(args.reranker) if args.reranker and name == "trained" else None
        summary = evaluate_rec(rec, reranker=reranker)
        summary["eval_s"] = round(time.perf_counter() - started, 1)
        summary["build"] = {"training_s": rec.settings["encoder"]["trained"]["seconds"],
                            "logq": rec.settings["encoder"]["trained"].get("logq"),
                            "steps": rec.settings["encoder"]["trained"]["steps"]}
        summary["settings"] = {k: rec.settings[k] for k in ("alpha", "split", "validation")}
        summary["latency"] = query_latency(rec, [u for u, h in rec.catalogue.histories.items() if h])
        results[name] = summary
        print(name, json.dumps(summary["rankers"]))
    trained, untuned = results["trained"], results["untuned"]
    rows = [("random", trained["rankers"]["random"]), ("MostPopular", trained["rankers"]["MostPopular"]),
            ("ItemKNN (100 neighbours, cosine)", trained["rankers"]["ItemKNN"]),
            ("BM25 on item text", trained["rankers"]["BM25 (item text)"]),
            ("two-tower, untuned MiniLM", untuned["rankers"]["two-tower"]),
            (f"two-tower, trained ({trained['build']['steps']} steps)", trained["rankers"]["two-tower"]),
            ("hybrid: trained two-tower + ItemKNN (default)", trained["rankers"]["hybrid"]),
            ("hybrid + cold items lent co-occurrence (--lend-cold)", trained["rankers"]["hybrid + cold lending"])]
    machine = describe_machine()
    lines = [f"MovieLens-100k, split {args.split}: {trained['warm_users']} users with held-out items; "
             f"{trained['cold_items']} cold-start movies ({trained['cold_users']} users have one in the test side). "
             f"Machine: {machine['cpu']}, {machine['cores']} cores, flags: {machine['cpu_flags']}.", "",
             "| ranker | NDCG@10 | recall@10 | hit@10 | coverage | cold-start recall@10 |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {r['hit@10']:.4f} | {r['coverage']:.4f} | "
              f"{r['cold_recall@10']:.4f} |" for name, r in rows]
    latency = trained["latency"]
    lines += ["", f"Build: training the towers {trained['build']['training_s']} s; hybrid weight "
              f"{trained['settings']['alpha']} (validation NDCG@10 per weight: "
              f"{trained['settings']['validation']['alpha_ndcg@10']}).",
              f"Query latency (top 10 for one user, 2 cores): p50 {latency['stored_p50']} ms, p99 "
              f"{latency['stored_p99']} ms with the user vector stored at build; p50 {latency['fresh_p50']} ms, "
              f"p99 {latency['fresh_p99']} ms embedding the history on the spot."]
    if "on_reranked_users" in trained:
        lines += ["", f"Re-ranking the top 20 with the cross-encoder, on {trained['reranked_users']} sampled users "
                  "(the same users for every row):", "", "| ranker | NDCG@10 | recall@10 |", "|---|---|---|"]
        lines += [f"| {name} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} |"
                  for name, r in trained["on_reranked_users"].items() if name != "random"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "recommend.json").write_text(json.dumps({"machine": machine, **results}, indent=1))
    (out / "recommend.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [n.split(" (")[0].replace(", ", "\n") for n, _ in rows]
    for axis, metric, title in ((axes[0], "ndcg@10", "NDCG@10 (warm items)"),
                                (axes[1], "cold_recall@10", "recall@10 on cold-start items")):
        axis.barh(names[::-1], [r[metric] for _, r in rows][::-1], color="#2f6fed")
        axis.set_title(title, fontsize=10)
        axis.tick_params(labelsize=8)
    figure.tight_layout()
    figure.savefig(out / "recommend.png", dpi=110)
    screenshot(work / f"rec-{args.split}-trained", out / "recommend-page.png")
    print("\n".join(lines))


def screenshot(folder: Path, path: Path) -> None:
    """The page for one user, in headless Chromium."""
    from pages import page_of

    from lmforge.apps.recommend_http import RecommendApp

    with page_of(RecommendApp(folder), "/apps/recommend", 1100, 560) as page:
        page.wait_for_function("document.querySelector('#meta').textContent.includes('items')")
        page.fill("#user", "1")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('#items li').length == 10")
        page.screenshot(path=str(path), full_page=True)


if __name__ == "__main__":
    sys.exit(main())
