"""The sentiment monitor: alerts on an injected surge (once, with the cooldown held), exact
counts across a kill and restart, malformed records reported with their line, rules and
entities files checked, migrations, webhook delivery with retries, the report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from lmforge.apps.monitor import AlertSender, EntityMatcher, FileSource, LexiconClassifier, Monitor, Rules, polarity_labels
from lmforge.apps.monitor_report import Surge, score_detection, write_report
from lmforge.apps.monitor_store import AGGREGATES, ALERTS, MENTIONS, PREDICTIONS, RECORDS, Store
from lmforge.errors import ConfigError

HOUR = 3600
START = 1_700_006_400  # a whole hour (2023-11-15T00:00Z)
GOOD = ["I like {e} a lot", "{e} shipped my order fast, great service", "{e} is fine by me", "love the new {e} app",
        "{e} support answered my question", "had lunch near the {e} office"]
BAD = ["{e} is terrible and awful", "I hate {e}, worst support ever", "{e} broke my phone, awful", "{e} lied to me"]
RULES = {"window": "1h", "rules": [{"name": "surge", "kind": "zscore", "threshold": 3, "min_volume": 4,
                                     "cooldown": "12h", "min_baseline": 24, "baseline": "7d"}]}
ENTITIES = {"entities": [{"name": "Acme", "aliases": ["Acme Corp", "ACME"]}, {"name": "Globex"}]}


def surge(at: float, entity: str = "Acme", size: int = 8) -> list[dict[str, Any]]:
    return [{"timestamp": at + k * 60, "text": BAD[k % len(BAD)].format(e=entity)} for k in range(size)]


def fixture_stream(days: int = 10, surges: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """Hourly traffic about two companies, mostly positive (a negative text about once in 15),
    with negative surges about Acme at the given hours since the start."""
    rng = random.Random(7)
    records = []
    for hour in range(24 * days):
        for k in range(rng.randint(3, 6)):
            entity = rng.choice(["Acme", "Globex"])
            text = rng.choice(GOOD if rng.random() < 0.93 else BAD).format(e=entity)
            records.append({"timestamp": START + hour * HOUR + k * 400, "text": text})
    for at in surges:
        records += surge(START + at * HOUR + 900)
    records.sort(key=lambda r: r["timestamp"])
    return records


def write(path: Path, records: list[dict[str, Any]], bad_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in sorted((bad_lines or {}).items()):  # index = the line number - 1 in the end
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files(tmp_path: Path, rules: dict[str, Any] = RULES) -> tuple[Path, Path]:
    (tmp_path / "entities.yaml").write_text(yaml.safe_dump(ENTITIES))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    return tmp_path / "entities.yaml", tmp_path / "rules.yaml"


def monitor(tmp_path: Path, db: str = "monitor.sqlite", **kwargs: Any) -> Monitor:
    entities, rules = files(tmp_path)
    store = Store(str(tmp_path / db))
    return Monitor(store, LexiconClassifier(), EntityMatcher.from_file(entities), Rules.from_file(rules), **kwargs)


def table(store: Store, which: sa.Table, *order: Any) -> list[tuple]:
    with store.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.select(which).order_by(*order))]


def state(store: Store) -> dict[str, list[tuple]]:
    """Everything a monitor counts, without wall-clock columns."""
    alerts = [row[:10] for row in table(store, ALERTS, ALERTS.c.id)]
    return {"aggregates": table(store, AGGREGATES, AGGREGATES.c.entity, AGGREGATES.c.window_start),
            "mentions": table(store, MENTIONS, MENTIONS.c.record_id, MENTIONS.c.entity),
            "predictions": [row[:4] for row in table(store, PREDICTIONS, PREDICTIONS.c.record_id)],
            "records": [row[1:] for row in table(store, RECORDS, RECORDS.c.id)], "alerts": alerts}


def test_an_injected_surge_raises_exactly_one_alert_and_the_cooldown_holds(tmp_path: Path) -> None:
    # surges at day 8 05:00 and 09:00 (inside the 12 h cooldown), then day 9 05:00 (after it)
    hours = (8 * 24 + 5, 8 * 24 + 9, 9 * 24 + 5)
    source = write(tmp_path / "stream.jsonl", fixture_stream(surges=hours))
    watcher = monitor(tmp_path)
    stats = watcher.run(FileSource(source))
    alerts = sorted(watcher.store.alerts(with_texts=True), key=lambda a: a["ts"])
    assert [(a["entity"], a["rule"]) for a in alerts] == [("Acme", "surge"), ("Acme", "surge")]
    assert [a["window_start"] for a in alerts] == [START + hours[0] * HOUR, START + hours[2] * HOUR]
    assert all(a["value"] >= 3 and a["detail"]["baseline_windows"] >= 24 for a in alerts)
    assert all(all("Acme" in text for text in a["texts"]) and len(a["texts"]) >= 4 for a in alerts)
    assert stats["alerts"] == 2 and stats["rejected"] == 0
    # the same stream with no surge raises nothing
    (tmp_path / "quiet").mkdir()
    quiet = monitor(tmp_path / "quiet")
    quiet.run(FileSource(write(tmp_path / "quiet.jsonl", fixture_stream())))
    assert quiet.store.alerts() == []


def test_detection_scoring_counts_recall_delay_and_false_alarms() -> None:
    surges = [Surge("Acme", 1000.0, 5, 1.0), Surge("Acme", 90_000.0, 5, 1.0)]
    alerts = [{"id": 1, "entity": "Acme", "ts": 1600.0}, {"id": 2, "entity": "Globex", "ts": 1700.0},
              {"id": 4, "entity": "Acme", "ts": 1900.0},  # a second rule on the first surge: no false alarm
              {"id": 3, "entity": "Acme", "ts": 99_000.0}]  # too late for the second surge
    scored = score_detection(alerts, surges, window=3600.0, span_s=7 * 86400.0)
    assert (scored["detected"], scored["recall"], scored["median_delay_s"]) == (1, 0.5, 600.0)
    assert scored["false_alarms"] == 2 and scored["false_alarms_per_week"] == pytest.approx(2.0)


def test_a_killed_monitor_restarts_with_counts_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    source = write(tmp_path / "stream.jsonl", fixture_stream(surges=(8 * 24 + 5,)))
    entities, rules = files(tmp_path)
    straight = monitor(tmp_path, "straight.sqlite")
    straight.run(FileSource(source))
    command = [sys.executable, "-m", "lmforge.cli", "app", "monitor", "run", "--source", str(source), "--entities",
               str(entities), "--rules", str(rules), "--db", str(tmp_path / "killed.sqlite"), "--batch-size", "16",
               "--progress", "false"]
    env = {**os.environ, "LMFORGE_TCMALLOC": "0"}
    # a replay at 200,000x the stream's pace takes ~4 s for its 10 days: killed in the middle
    process = subprocess.Popen([*command, "--speed", "200000"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    killed_db = Store(str(tmp_path / "killed.sqlite"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if killed_db.counts()["records"] > 300:
                break
        except sa.exc.OperationalError:
            pass  # the tables are being made
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    partial = killed_db.counts()
    assert 0 < partial["records"] < straight.stats["ingested"]  # killed mid-stream
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert state(killed_db) == state(straight.store)
    assert len(state(straight.store)["alerts"]) == 1


def test_a_crash_inside_a_batch_loses_and_doubles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tmp_path / "stream.jsonl", fixture_stream(days=9, surges=(8 * 24 + 5,)))
    straight = monitor(tmp_path, "straight.sqlite")
    straight.run(FileSource(source))
    crashing = monitor(tmp_path, "crash.sqlite", batch_size=32)
    from lmforge.apps import monitor as module

    calls = {"n": 0}
    flush = module._Batch.flush

    def flaky(batch: Any) -> None:
        calls["n"] += 1
        flush(batch)  # everything written ...
        if calls["n"] == 20:
            raise RuntimeError("power cut")  # ... and the transaction rolled back

    monkeypatch.setattr(module._Batch, "flush", flaky)
    with pytest.raises(RuntimeError):
        crashing.run(FileSource(source))
    monkeypatch.setattr(module._Batch, "flush", flush)
    restarted = monitor(tmp_path, "crash.sqlite", batch_size=32)
    restarted.run(FileSource(source))
    assert state(restarted.store) == state(straight.store)


def test_malformed_records_are_counted_with_their_line_and_the_stream_goes_on(tmp_path: Path) -> None:
    records = fixture_stream(days=2)
    bad = {5: "{not json", 9: json.dumps({"timestamp": "last tuesday", "text": "Acme is awful"}),
           14: json.dumps({"timestamp": START + 10}), 20: json.dumps(["a", "list"])}
    source = write(tmp_path / "stream.jsonl", records, bad)
    watcher = monitor(tmp_path)
    stats = watcher.run(FileSource(source))
    assert stats["rejected"] == 4 and stats["ingested"] == len(records)
    rejects = watcher.store.rejects()
    assert [r["position"] for r in rejects] == [6, 10, 15, 21]  # 1-based line numbers
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith(f"{source}:6: invalid JSON")
    assert "field 'timestamp': bad timestamp 'last tuesday'" in reasons[1]
    assert "field 'text': missing or empty text" in reasons[2] and "expected a JSON object" in reasons[3]
    assert watcher.store.counts()["records"] == len(records)


def test_a_csv_stream_and_a_tailed_file_that_grows(tmp_path: Path) -> None:
    path = tmp_path / "stream.csv"
    path.write_text("timestamp,text\n2023-11-15T00:00:00Z,Acme is great\n2023-11-15T00:10:00,\"Globex, awful\"\n")
    watcher = monitor(tmp_path)
    source = FileSource(path, follow=True, poll_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(source, stop))
    thread.start()
    time.sleep(0.3)
    with open(path, "a") as handle:
        handle.write("2023-11-15T00:20:00Z,ACME is fine")  # half a line: read once it is whole
        handle.flush()
        time.sleep(0.3)
        assert watcher.store.counts()["records"] == 2
        handle.write("\n2023-11-15T00:30:00Z,not a,row with three fields\n")
    deadline = time.monotonic() + 10
    while watcher.store.counts()["records"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    entities = {e["entity"]: e for e in watcher.store.entities()}
    assert entities["Acme"]["volume"] == 2 and entities["Globex"]["negative"] == 1
    assert watcher.store.rejects()[0]["position"] == 5


def test_rules_and_entities_files_list_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        Rules.from_dict({"window": "1 fortnight", "rules": [{"kind": "zscore"}, {"kind": "share", "threshold": 2,
                                                                                 "cooldown": "1m", "colour": 1},
                                                            {"kind": "median"}], "webhook": "ftp://x"})
    text = str(error.value)
    for part in ("'1 fortnight' is not a duration", "rule 1: needs a threshold", "unknown key 'colour'",
                 "a share threshold is in (0, 1]", "kind must be 'share' or 'zscore'", "webhook needs an http(s) url"):
        assert part in text
    (tmp_path / "entities.yaml").write_text("- name: Acme\n- aliases: [x]\n- name: Acme\n  alias: [y]\n")
    with pytest.raises(ConfigError) as error:
        EntityMatcher.from_file(tmp_path / "entities.yaml")
    assert "entity 2: needs a name" in str(error.value) and "unknown key 'alias'" in str(error.value)
    assert "listed twice" in str(error.value)


def test_entities_match_whole_words_by_alias_and_case_only_where_asked() -> None:
    from lmforge.apps.monitor import Entity

    matcher = EntityMatcher([Entity("Acme", ("Acme", "Acme Corp")), Entity("Apple", ("Apple",), case_sensitive=True)])
    assert matcher.find("acme corp and ACME again, Apple too") == ["Acme", "Apple"]
    assert matcher.find("an apple a day at acmeville") == []
    chinese = EntityMatcher([Entity("华为", ("华为", "Huawei")), Entity("小米", ("小米",))])
    assert chinese.find("我觉得华为的手机很差,小米还行") == ["华为", "小米"]
    assert chinese.find("huawei手机") == ["华为"] and chinese.find("huaweiphone") == []


def test_polarity_labels_come_from_names_or_the_sorted_order() -> None:
    assert polarity_labels(["0", "1", "2"], None, None) == ("0", "2")
    assert polarity_labels(["negative", "neutral", "positive"], None, None) == ("negative", "positive")
    with pytest.raises(ConfigError, match="not a label"):
        polarity_labels(["0", "1"], "bad", None)


def test_a_database_of_the_first_schema_is_migrated_and_keeps_its_records(tmp_path: Path) -> None:
    old = Store(str(tmp_path / "old.sqlite"), migrate_to=1)
    old.ingest("s", [{"position": 1, "ts": START, "text": "Acme is fine", "meta": None}], [], (1, 10))
    assert old.version == 1 and "candidates" not in sa.inspect(old.engine).get_table_names()
    old.close()
    new = Store(str(tmp_path / "old.sqlite"))
    assert new.version == 2 and "candidates" in sa.inspect(new.engine).get_table_names()
    assert new.counts()["records"] == 1 and new.setting("schema_version") == 2
    with new.engine.connect() as connection:
        assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    failures = 0

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Receiver.failures > 0:
            _Receiver.failures -= 1
            self.send_response(503)
        else:
            _Receiver.received.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_alerts_reach_a_webhook_through_retries_and_only_once(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received, _Receiver.failures = [], 2  # two 503s, then accepted
    try:
        rules = {**RULES, "webhook": {"url": f"http://127.0.0.1:{server.server_port}/hook", "retries": 3}}
        watcher = monitor(tmp_path)
        watcher.rules = Rules.from_dict(rules)
        watcher.run(FileSource(write(tmp_path / "s.jsonl", fixture_stream(surges=(8 * 24 + 5,)))))
        sender = AlertSender(watcher.store, watcher.rules.webhook)
        assert sender.deliver_pending() == 1 and sender.deliver_pending() == 0
    finally:
        server.shutdown()
    assert len(_Receiver.received) == 1
    hook = _Receiver.received[0]
    assert hook["entity"] == "Acme" and hook["rule"] == "surge" and hook["value"] >= 3
    assert hook["examples"] and all("Acme" in t for t in hook["examples"])
    alert = watcher.store.alerts()[0]
    assert alert["delivered"] and alert["attempts"] == 1


def test_an_unreachable_webhook_keeps_the_alert_for_the_next_run(tmp_path: Path) -> None:
    watcher = monitor(tmp_path)
    watcher.run(FileSource(write(tmp_path / "s.jsonl", fixture_stream(surges=(8 * 24 + 5,)))))
    sender = AlertSender(watcher.store, Rules.from_dict({**RULES, "webhook": {
        "url": "http://127.0.0.1:9/none", "retries": 1, "timeout": 1}}).webhook)
    assert sender.deliver_pending() == 0
    alert = watcher.store.alerts()[0]
    assert not alert["delivered"] and alert["attempts"] == 1 and alert["last_error"]


def test_the_report_has_the_table_the_alerts_and_a_chart_per_entity(tmp_path: Path) -> None:
    watcher = monitor(tmp_path)
    watcher.run(FileSource(write(tmp_path / "s.jsonl", fixture_stream(surges=(8 * 24 + 5,)))))
    path = write_report(watcher.store, tmp_path / "out" / "report.md")
    text = path.read_text()
    assert "| Acme |" in text and "| Globex |" in text and "## Alerts" in text and "| surge |" in text
    for name in ("report-acme.png", "report-globex.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_train_makes_a_classifier_the_monitor_runs_with(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    from lmforge.apps.monitor import RunClassifier
    from lmforge.cli import main

    rng = random.Random(3)
    rows = ["review,sentiment"] + [f"\"{rng.choice(GOOD).format(e=e)}\",positive" for e in "ABCDEFGHIJKLMNOPQRST"] + \
           [f"\"{rng.choice(BAD).format(e=e)}\",negative" for e in "ABCDEFGHIJKLMNOPQRST"]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    assert main(["app", "monitor", "train", "--data", str(tmp_path / "mine.csv"), "--output", str(tmp_path / "run"),
                 "--model", str(tiny_encoder_dir), "--text-field", "review", "--label-field", "sentiment"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train_examples"] < 40 and "macro_f1" in results["validation"]  # 10% held out by hash
    classifier = RunClassifier(tmp_path / "run")
    assert (classifier.negative, classifier.positive) == ("negative", "positive")
    out = classifier.classify(["Acme lied to me", "love the new Acme app"])
    assert all(set(s.probabilities) == {"negative", "positive"} for s in out)
    texts = [t.format(e=e) for t in GOOD + BAD for e in ("Acme", "Globex Intergalactic Holdings")]
    classifier.batch_size = 3  # batches of similar length, answers in the order asked
    alone = [classifier.classify([t])[0].probabilities for t in texts]
    together = [s.probabilities for s in classifier.classify(texts)]
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(alone, together, strict=True))
    assert all(s.negative == (s.label == "negative") and -1 <= s.score <= 1 for s in out)
    entities, rules = files(tmp_path)
    assert main(["app", "monitor", "run", "--source", str(write(tmp_path / "s.jsonl", fixture_stream(days=1))),
                 "--entities", str(entities), "--rules", str(rules), "--classifier", str(tmp_path / "run"),
                 "--db", str(tmp_path / "m.sqlite"), "--progress", "false"]) == 0
    store = Store(str(tmp_path / "m.sqlite"))
    assert store.counts()["classified"] == store.counts()["records"] > 0
    assert {p[5] for p in table(store, PREDICTIONS, PREDICTIONS.c.record_id)} == {str(tmp_path / "run")}


class _Organisations:
    """Stands in for an NER run: names the capitalised words after "at"."""

    def organisations(self, texts: list[str]) -> list[list[str]]:
        return [[w.strip(",.") for a, w in zip(t.split(), t.split()[1:], strict=False) if a == "at" and w[0].isupper()]
                for t in texts]


def test_organisations_no_alias_covers_become_candidates(tmp_path: Path) -> None:
    watcher = monitor(tmp_path, ner=_Organisations())
    texts = ["Acme hired me at Initech, great", "Globex at Initech again", "Acme at ACME today", "Acme at Hooli."]
    watcher.run(FileSource(write(tmp_path / "s.jsonl", [{"timestamp": START + i, "text": t}
                                                       for i, t in enumerate(texts)])))
    found = {c["name"]: (c["count"], c["first_ts"], c["last_ts"]) for c in watcher.store.candidates()}
    assert found == {"Initech": (2, START, START + 1), "Hooli": (1, START + 3, START + 3)}  # ACME is an alias
