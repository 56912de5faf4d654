"""Support-assistant results (docs/apps/support.md): the packaged construction FAQ
(zaragoza-construction-faq, 503 English pairs, 39 categories), split by question into
train / validation / test (70/10/20); every answer stays in the index.

Rows, on the same held-out test questions:
    BM25 alone; MiniLM-L6 untuned (dense); MiniLM-L6 fine-tuned (dense); hybrid (the
    fine-tuned encoder + BM25, weight chosen on validation) -- plus the untuned hybrid.
Columns: hit@1, hit@5, hit@10, MRR@10; category accuracy; latency per question p50/p99.

    python benchmarks/support.py [--work runs/support] [--epochs 5]

Writes docs/results/support.json, docs/results/support.md (table) and docs/results/support.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from lmforge.apps.support import BuildConfig, KnowledgeBase, build_kb, evaluate_kb, evaluation_entries  # noqa: E402
from lmforge.hardware import describe_machine  # noqa: E402

# Follow-ups written for this FAQ (a topic question, then a question that refers back to it;
# gold: the entry id that answers the follow-up). Constructed by hand; the FAQ has none.
FOLLOW_UPS = [
    ("What does a kitchen renovation cost?", "and how long does that take?", "kok-002"),
    ("What does a bathroom renovation cost?", "and how long does it take?", "badrum-002"),
    ("What does a roof replacement cost?", "how long does that take?", "tak-012"),
    ("What does a facade renovation cost?", "how long will it take?", "fasad-006"),
    ("What does an extension cost?", "how long does that take?", "tillbyggnad-003"),
    ("What does a building permit cost?", "how long does it take to get one?", "bygglov-002"),
    ("How long does a kitchen renovation take?", "and what does it cost?", "kok-001"),
    ("How long does a bathroom renovation take?", "what will that cost me?", "badrum-001"),
    ("How long does a roof replacement take?", "and the cost?", "tak-001"),
    ("How long does a facade renovation take?", "how much does it cost?", "fasad-002"),
    ("How long does an extension take?", "what does that cost?", "tillbyggnad-002"),
    ("How long does it take to get a building permit?", "what does it cost?", "bygglov-003"),
    ("What does an energy declaration cost?", "how long is it valid?", "energi-004"),
    ("Do I need a permit to build an extension on my house?", "and how long does that take?", "tillbyggnad-003"),
    ("Do I need a permit to build an extension on my house?", "how much will that cost?", "tillbyggnad-002"),
]


def follow_up_hits(kb: KnowledgeBase) -> dict[str, float]:
    """hit@1 on FOLLOW_UPS: the follow-up alone, topic + follow-up embedded as one text, and
    the default (``ask`` with the history)."""
    alone = joined = default = 0
    for topic, question, gold in FOLLOW_UPS:
        alone += kb.ask(question)["entry"]["id"] == gold
        joined += kb.ask(f"{topic} {question}")["entry"]["id"] == gold
        default += kb.ask(question, history=[topic])["entry"]["id"] == gold
    n = len(FOLLOW_UPS)
    return {"questions": n, "alone": round(alone / n, 3), "joined_text": round(joined / n, 3),
            "default": round(default / n, 3)}


def grounded_writing(kb: KnowledgeBase, count: int = 20) -> dict[str, float]:
    """SmolLM2-135M-Instruct writing answers from the top 3 passages for the first ``count``
    test questions: the share kept (supported by the passages), mean support, seconds each."""
    from models import smollm2_path

    from lmforge.apps.support import GroundedWriter

    writer = GroundedWriter.load(smollm2_path())
    kept, supports, seconds, examples = 0, [], [], []
    for entry, _ in evaluation_entries(kb)[:count]:
        result = kb.ask(entry.question)
        passages = [kb.entries[kb.position[c["id"]]].answer for c in result["candidates"][:3]]
        started = time.perf_counter()
        written = writer.write(entry.question, passages)
        seconds.append(time.perf_counter() - started)
        kept += written["generated"]
        supports.append(written["support"])
        if len(examples) < 2:
            examples.append({"question": entry.question, "text": written.get("draft", written["answer"]),
                             "kept": written["generated"], "support": written["support"]})
    return {"questions": count, "kept": round(kept / count, 3), "mean_support": round(sum(supports) / count, 3),
            "seconds_each": round(sum(seconds) / count, 2), "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/support")
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--generator", action="store_true", help="also measure SmolLM2 grounded writing")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    results: dict[str, dict] = {}
    for name, epochs in (("untuned", 0.0), ("tuned", args.epochs)):
        folder = work / f"kb-{name}"
        started = time.perf_counter()
        if not (folder / "kb.json").exists():
            build_kb("corpus:construction_faq", folder, duplicates="merge", config=BuildConfig(epochs=epochs))
        seconds = time.perf_counter() - started
        kb = KnowledgeBase.load(folder)
        summary = evaluate_kb(kb, evaluation_entries(kb))
        summary["build_s"] = round(seconds, 1) if seconds > 5 else kb.settings["encoder"]["trained"]["seconds"]
        summary["settings"] = {k: kb.settings[k] for k in ("alpha", "threshold", "split", "validation")}
        summary["follow_ups"] = follow_up_hits(kb)
        results[name] = summary
        print(name, json.dumps({k: summary[k] for k in ("hit@1", "hit@5", "mrr@10", "latency_ms_p99")}))
    rows = [
        ("BM25", results["tuned"]["rankers"]["bm25"]),
        ("MiniLM untuned (dense)", results["untuned"]["rankers"]["dense"]),
        ("MiniLM untuned + BM25 (hybrid)", results["untuned"]["rankers"]["hybrid"]),
        ("MiniLM fine-tuned (dense)", results["tuned"]["rankers"]["dense"]),
        ("MiniLM fine-tuned + BM25 (hybrid, default)", results["tuned"]["rankers"]["hybrid"]),
    ]
    tuned = results["tuned"]
    if args.generator:
        tuned["grounded_writing"] = grounded_writing(KnowledgeBase.load(work / "kb-tuned"))
    lines = [f"Test questions: {tuned['questions']} (held out by question; all "
             f"{sum(tuned['settings']['split']['counts'].values())} answers indexed). Machine: "
             f"{describe_machine()['cpu']}, {describe_machine()['cores']} cores, flags: {describe_machine()['cpu_flags']}.", "",
             "| ranker | hit@1 | hit@5 | hit@10 | MRR@10 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['hit@1']:.3f} | {r['hit@5']:.3f} | {r['hit@10']:.3f} | {r['mrr@10']:.3f} |"
              for name, r in rows]
    lines += ["", f"Category accuracy (classifier on the fine-tuned embeddings): {tuned['category_accuracy']:.3f}; "
              f"category of the retrieved entry: {tuned['category_of_entry_accuracy']:.3f}.",
              f"Latency per question (encoder + both indexes, index in memory): p50 {tuned['latency_ms_p50']} ms, "
              f"p99 {tuned['latency_ms_p99']} ms. Handed off at the validation-chosen threshold "
              f"{tuned['settings']['threshold']}: {tuned['handoff_share']:.1%} of test questions.",
              f"Follow-ups ({tuned['follow_ups']['questions']} written for this FAQ, hit@1): the follow-up alone "
              f"{tuned['follow_ups']['alone']:.3f}, topic and follow-up embedded as one text "
              f"{tuned['follow_ups']['joined_text']:.3f}, the default (vectors summed, the topic's entry left out) "
              f"{tuned['follow_ups']['default']:.3f}.",
              *([f"Grounded writing with SmolLM2-135M-Instruct ({tuned['grounded_writing']['questions']} test "
                 f"questions, top 3 passages): {tuned['grounded_writing']['kept']:.0%} of the written answers had "
                 f">= 80% of their words in the passages and were kept, the rest fell back to the retrieved text; "
                 f"mean support {tuned['grounded_writing']['mean_support']:.2f}; "
                 f"{tuned['grounded_writing']['seconds_each']} s per answer."] if "grounded_writing" in tuned else []),
              f"Dense weight chosen on validation: {tuned['settings']['alpha']} (MRR@10 per weight: "
              f"{tuned['settings']['validation']['alpha_mrr']})."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "support.json").write_text(json.dumps({"machine": describe_machine(), **results}, indent=1))
    (out / "support.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.6))
    names = [n.replace(" (", "\n(") for n, _ in rows]
    for offset, metric in enumerate(("hit@1", "hit@5", "mrr@10")):
        axis.bar([i + offset * 0.27 for i in range(len(rows))], [r[metric] for _, r in rows], 0.27, label=metric)
    axis.set_xticks([i + 0.27 for i in range(len(rows))], names, fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_title("Construction FAQ: held-out questions")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "support.png", dpi=110)
    print("\n".join(lines))
    screenshot(work / "kb-tuned", out / "support-page.png")


def screenshot(kb: Path, path: Path) -> None:
    """The chat page on the fine-tuned KB in headless Chromium (docs/results/support-page.png)."""
    from pages import page_of

    from lmforge.apps.support_http import SupportApp

    with page_of(SupportApp(kb, log_dir=kb.parent / "logs"), "/apps/support", 1000, 760) as page:
        page.wait_for_function("document.querySelector('#kb-meta').textContent.includes('FAQ entries')")
        for number, question in enumerate(["Do I need a permit to build an extension on my house?",
                                           "and how long does that take?", "how much will that cost?",
                                           "Can you recommend a good pizza place nearby?"], start=1):
            page.fill("#message", question)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('#log .turn.bot').length == {number} "
                                   "&& !document.querySelector('#send').disabled")
        page.screenshot(path=str(path), full_page=True)


if __name__ == "__main__":
    sys.exit(main())
