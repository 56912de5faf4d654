"""What the monitor's database says, for people: a markdown report with PNG charts, and the
surge-injection evaluation (recall, delay, false alarms per week) that docs/apps/monitor.md
reports.

Surge injection: a surge for entity E at time t is n negative texts that name E, spread over
``spread`` seconds from t; n is ``sigma`` times the baseline's standard deviation of E's
negative mentions per window at t (the rule's sigma floor when the baseline is flatter), so
"a 3-sigma surge" lifts the window's count three standard deviations above its mean.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.apps.monitor import Rule, iso, parse_time
from lmforge.apps.monitor_store import Store
from lmforge.fileio import save_figure, write_text

WEEK = 7 * 86400.0


def write_report(store: Store, output: str | Path, since: float | None = None, until: float | None = None,
                 top: int = 8) -> Path:
    """``output`` (markdown) and one PNG per entity beside it: volume bars, negative share,
    alert marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    counts = store.counts()
    window = store.setting("window_s") or 3600.0
    entities = store.entities()[:top]
    lines = ["# Sentiment monitor report", "",
             f"Database `{store.url}`: {counts['records']} records from {iso(counts['first_ts'])} to "
             f"{iso(counts['last_ts'])}, {counts['rejects']} rejected, {counts['alerts']} alerts; windows of "
             f"{window / 3600:g} h." + (f" Period: {iso(since) or 'start'} to {iso(until) or 'end'}." if since or until
                                        else ""), "",
             "| entity | mentions | negative | negative share | mean score | alerts |", "|---|---|---|---|---|---|"]
    rows, charts = [], []
    for entity in entities:
        series = store.series(entity["entity"], since, until)
        alerts = [a for a in store.alerts(entity["entity"], since, limit=1000, with_texts=False)
                  if until is None or a["ts"] < until]
        volume = sum(p["volume"] for p in series)
        negative = sum(p["negative"] for p in series)
        score = sum(p["mean_score"] * p["volume"] for p in series)
        rows.append(f"| {entity['entity']} | {volume} | {negative} | {negative / volume if volume else 0:.3f} | "
                    f"{score / volume if volume else 0:+.3f} | {len(alerts)} |")
        if series:
            name = f"{output.stem}-{_slug(entity['entity'])}.png"
            figure, (top_axis, bottom_axis) = plt.subplots(2, 1, figsize=(9, 4.2), sharex=True)
            starts = [p["start"] for p in series]
            days = [(s - starts[0]) / 86400 for s in starts]
            top_axis.bar(days, [p["volume"] for p in series], width=window / 86400, color="#2f6fed")
            top_axis.set_ylabel("mentions")
            bottom_axis.plot(days, [p["negative_share"] for p in series], color="#b3261e", linewidth=0.9)
            bottom_axis.set_ylabel("negative share")
            bottom_axis.set_xlabel(f"days since {iso(starts[0])}")
            for alert in alerts:
                for axis in (top_axis, bottom_axis):
                    axis.axvline((alert["ts"] - starts[0]) / 86400, color="black", linestyle="--", linewidth=0.8)
            top_axis.set_title(f"{entity['entity']}: {volume} mentions, {len(alerts)} alerts (dashed)")
            figure.tight_layout()
            save_figure(figure, output.parent / name)
            charts.append(f"![{entity['entity']}]({name})")
    lines += rows + ["", *charts, ""]
    alerts = store.alerts(None, since, limit=50)
    if alerts:
        lines += ["## Alerts (latest 50)", "", "| time (UTC) | entity | rule | value | texts |", "|---|---|---|---|---|"]
        for alert in alerts:
            texts = " / ".join(t.replace("|", "\\|")[:80] for t in alert.get("texts", [])[:3])
            lines.append(f"| {iso(alert['ts'])} | {alert['entity']} | {alert['rule']} | {alert['value']:.2f} | {texts} |")
    rejects = store.rejects(20)
    if rejects:
        lines += ["", "## Rejected records (first 20)", ""] + [f"- {r['reason']}" for r in rejects]
    write_text(output, "\n".join(lines) + "\n")
    return output


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "entity"


# ---------------------------------------------------------------------------- surge injection

@dataclass
class Surge:
    entity: str
    start: float
    size: int
    sigma: float  # the baseline standard deviation used (floored)


def baseline_sigma(store: Store, entity: str, at: float, window: float, rule: Rule) -> tuple[float, float, int]:
    """(mean, std, windows) of ``entity``'s negatives per window over ``rule.baseline`` before
    ``at``, over the windows in which the stream had records (as the z-score rule sees it)."""
    start = math.floor(at / window) * window
    active = {p["start"] for p in store.series("*", start - rule.baseline, start) if p["volume"] > 0}
    counts = {p["start"]: p["negative"] for p in store.series(entity, start - rule.baseline, start)}
    values = [counts.get(w, 0) for w in sorted(active)]
    if not values:
        return 0.0, 0.0, 0
    return statistics.fmean(values), statistics.pstdev(values), len(values)


def plan_surges(store: Store, entities: Sequence[str], count: int, sigma: float, rule: Rule, window: float,
                spread: float, seed: int = 0, gap: float | None = None) -> list[Surge]:
    """``count`` surges at random active windows (with a full baseline, ``gap`` apart so one
    surge's window is not the next one's baseline peak), sized ``sigma`` baseline deviations."""
    rng = random.Random(seed)
    gap = gap if gap is not None else rule.cooldown + window
    active = [p["start"] for p in store.series("*") if p["volume"] > 0]
    surges: list[Surge] = []
    candidates = active[:]
    rng.shuffle(candidates)
    for start in candidates:
        if len(surges) >= count:
            break
        if any(abs(start - s.start) < gap for s in surges):
            continue
        entity = entities[len(surges) % len(entities)]
        mean, std, n = baseline_sigma(store, entity, start, window, rule)
        if n < rule.min_baseline:
            continue
        scale = max(std, rule.sigma_floor)
        size = max(rule.min_volume, math.ceil(sigma * scale))
        offset = rng.uniform(0, max(0.0, window - spread))
        surges.append(Surge(entity, start + offset, size, scale))
    return sorted(surges, key=lambda s: s.start)


def inject(records: Iterable[dict[str, Any]], surges: Sequence[Surge], negatives: Sequence[str], spread: float,
           seed: int = 0) -> list[dict[str, Any]]:
    """The stream with each surge's texts added: held-out negative texts, each prefixed by the
    entity's name (``"E: text"``), at even steps over ``spread`` seconds; sorted by time."""
    rng = random.Random(seed)
    out = list(records)
    for number, surge in enumerate(surges):
        for k in range(surge.size):
            text = rng.choice(negatives)
            out.append({"timestamp": surge.start + spread * k / max(1, surge.size), "text": f"{surge.entity}: {text}",
                        "meta": {"injected": number}})
    out.sort(key=lambda r: parse_time(r["timestamp"]))
    return out


def score_detection(alerts: Sequence[dict[str, Any]], surges: Sequence[Surge], window: float, span_s: float,
                    tolerance: float | None = None) -> dict[str, Any]:
    """Recall (a surge is found by the first alert for its entity within ``tolerance`` after it
    starts, one window by default), the delays, and the false alarms per simulated week: alerts
    that fall in no surge's span (a second rule firing on the same surge is not one)."""
    tolerance = window if tolerance is None else tolerance
    ordered = sorted(alerts, key=lambda a: a["ts"])
    explained: set[int] = set()
    delays: list[float] = []
    for surge in surges:
        matches = [a for a in ordered if a["entity"] == surge.entity and surge.start <= a["ts"] <= surge.start + tolerance]
        if matches:
            explained |= {a["id"] for a in matches}
            delays.append(matches[0]["ts"] - surge.start)
    false = [a for a in alerts if a["id"] not in explained]
    weeks = span_s / WEEK
    return {"surges": len(surges), "detected": len(delays), "recall": len(delays) / len(surges) if surges else None,
            "median_delay_s": statistics.median(delays) if delays else None,
            "max_delay_s": max(delays) if delays else None,
            "false_alarms": len(false), "weeks": round(weeks, 2),
            "false_alarms_per_week": len(false) / weeks if weeks else None}


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_text(Path(path), "\n".join(lines) + "\n")
    return len(lines)
