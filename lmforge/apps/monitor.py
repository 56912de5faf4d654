"""Sentiment monitoring: a stream of texts in, sentiment per watched entity over time, alerts
when negative sentiment surges.

    source (file replayed / tailed, HTTP ingest)
      -> Store.ingest            records + rejects + cursor, one transaction
      -> Monitor.process         entities by alias, sentiment by a classifier (in batches),
                                 windowed aggregates, rules per record, alerts:
                                 one transaction per batch
      -> AlertSender             log + webhook (POST JSON, retries), from the alerts table

A record is ``{"text": ..., "timestamp": ISO 8601 or epoch seconds, "meta": {...}}``.
Windows are tumbling, in event time (the records' timestamps), of one size per database.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from lmforge.apps.monitor_store import AGGREGATES, ALERTS, CANDIDATES, MENTIONS, PREDICTIONS, RECORDS, Store
from lmforge.errors import ConfigError, DataError

log = logging.getLogger("lmforge.monitor")

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def seconds(value: Any, where: str) -> float:
    """``"90s"``, ``"30m"``, ``"1h"``, ``"7d"``, ``"2w"`` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = DURATION.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError([f"{where}: {value!r} is not a duration (e.g. 30m, 1h, 7d)"])
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_time(value: Any) -> float:
    """Epoch seconds from an ISO 8601 string (naive = UTC) or a number; ValueError otherwise."""
    if isinstance(value, bool) or value is None or value == "":
        raise ValueError(f"no timestamp ({value!r})")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    if not math.isfinite(number):
        raise ValueError(f"timestamp {value!r} is not finite")
    return number / 1000.0 if number > 1e11 else number  # milliseconds since the epoch


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_settings_file(path: str | Path, what: str) -> Any:
    """A YAML (or JSON) file's content; a missing or broken file is an error naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{what} {path}: no such file"])
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None


def _check_keys(item: dict[str, Any], allowed: set[str], where: str, problems: list[str]) -> None:
    for key in sorted(set(item) - allowed):
        problems.append(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


# ---------------------------------------------------------------------------- entities

@dataclass(frozen=True)
class Entity:
    name: str
    aliases: tuple[str, ...]
    case_sensitive: bool = False


def _bounded(alias: str) -> str:
    """The alias as a whole word where its ends are Latin letters or digits; Chinese (or any
    script written without spaces) is matched inside the text."""
    latin = "0-9A-Za-z\u00c0-\u024f"  # a Latin-script word goes on through these
    start = f"(?<![{latin}])" if alias[0].isascii() and alias[0].isalnum() else ""
    end = f"(?![{latin}])" if alias[-1].isascii() and alias[-1].isalnum() else ""
    return start + re.escape(alias) + end


class EntityMatcher:
    """Watched entities found in a text by their aliases (whole words; case-insensitive unless
    the entity says ``case_sensitive: true``, for names that are also common words)."""

    def __init__(self, entities: Sequence[Entity]) -> None:
        self.entities = list(entities)
        self._owner: dict[str, str] = {}
        patterns: dict[bool, list[tuple[int, str]]] = {False: [], True: []}
        for entity in self.entities:
            for alias in entity.aliases:
                key = alias if entity.case_sensitive else alias.lower()
                self._owner[key] = entity.name
                patterns[entity.case_sensitive].append((len(alias), _bounded(alias)))
        self._patterns = [(re.compile("(" + "|".join(p for _, p in sorted(items, reverse=True)) + ")",
                                      0 if sensitive else re.IGNORECASE), sensitive)
                          for sensitive, items in patterns.items() if items]

    @classmethod
    def from_file(cls, path: str | Path) -> EntityMatcher:
        data = read_settings_file(path, "--entities")
        items = data.get("entities") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise ConfigError([f"{path}: expected a list of entities (- name: ..., aliases: [...])"])
        problems: list[str] = []
        entities, seen = [], set()
        for number, item in enumerate(items, 1):
            where = f"{path}: entity {number}"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not str(item.get("name") or "").strip():
                problems.append(f"{where}: needs a name")
                continue
            _check_keys(item, {"name", "aliases", "case_sensitive"}, where, problems)
            name = str(item["name"]).strip()
            aliases = item.get("aliases") or []
            if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
                problems.append(f"{where} ({name}): aliases must be a list of non-empty strings")
                continue
            if name in seen:
                problems.append(f"{where}: {name!r} is listed twice")
            seen.add(name)
            entities.append(Entity(name, tuple(dict.fromkeys([name, *[a.strip() for a in aliases]])),
                                   bool(item.get("case_sensitive", False))))
        if problems:
            raise ConfigError(problems)
        return cls(entities)

    def find(self, text: str) -> list[str]:
        """The entities ``text`` names, each once, in order of first mention."""
        found: dict[str, None] = {}
        for pattern, sensitive in self._patterns:
            for match in pattern.finditer(text):
                alias = match.group(1)
                found.setdefault(self._owner[alias if sensitive else alias.lower()], None)
        return list(found)

    def known(self, name: str) -> bool:
        return bool(self.find(name))


# ---------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    """``share``: the negative share of an entity's mentions in the current window, fired at
    ``threshold`` once the window holds ``min_volume`` mentions. ``zscore``: the window's
    negative mentions against the same-size windows of the ``baseline`` before it (windows in
    which the stream had records), z = (x - mean) / max(std, sigma_floor), fired at
    ``threshold`` with at least ``min_volume`` negatives and ``min_baseline`` baseline windows.
    Either waits ``cooldown`` (event time) before firing again for the same entity."""

    name: str
    kind: str
    threshold: float
    min_volume: int
    cooldown: float
    baseline: float = 7 * 86400.0
    min_baseline: int = 24
    sigma_floor: float = 1.0
    entities: tuple[str, ...] = ()

    def applies(self, entity: str) -> bool:
        return not self.entities or entity in self.entities


@dataclass
class Webhook:
    url: str
    retries: int = 3
    timeout: float = 5.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Rules:
    window: float
    rules: list[Rule]
    webhook: Webhook | None = None
    negative_label: str | None = None
    positive_label: str | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Rules:
        data = read_settings_file(path, "--rules")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "rules") -> Rules:
        if not isinstance(data, dict):
            raise ConfigError([f"{where}: expected a mapping with window and rules"])
        problems: list[str] = []
        _check_keys(data, {"window", "rules", "webhook", "negative_label", "positive_label"}, where, problems)
        window = 3600.0
        try:
            window = seconds(data.get("window", "1h"), f"{where}: window")
        except ConfigError as error:
            problems += error.problems
        rules: list[Rule] = []
        items = data.get("rules")
        if not isinstance(items, list) or not items:
            problems.append(f"{where}: rules must be a non-empty list")
            items = []
        allowed = {"name", "kind", "threshold", "min_volume", "cooldown", "baseline", "min_baseline", "sigma_floor",
                   "entities"}
        for number, item in enumerate(items, 1):
            here = f"{where}: rule {number}"
            if not isinstance(item, dict):
                problems.append(f"{here}: expected a mapping")
                continue
            _check_keys(item, allowed, here, problems)
            kind = item.get("kind")
            if kind not in ("share", "zscore"):
                problems.append(f"{here}: kind must be 'share' or 'zscore', not {kind!r}")
                continue
            try:
                threshold = float(item["threshold"])
                min_volume = int(item.get("min_volume", 1))
                cooldown = seconds(item.get("cooldown", "6h"), f"{here}: cooldown")
                baseline = seconds(item.get("baseline", "7d"), f"{here}: baseline")
                rule = Rule(str(item.get("name") or f"{kind}-{number}"), kind, threshold, min_volume, cooldown,
                            baseline, int(item.get("min_baseline", 24)), float(item.get("sigma_floor", 1.0)),
                            tuple(str(e) for e in item.get("entities") or ()))
            except KeyError:
                problems.append(f"{here}: needs a threshold")
                continue
            except (TypeError, ValueError) as error:
                problems.append(f"{here}: {error}")
                continue
            except ConfigError as error:
                problems += error.problems
                continue
            if kind == "share" and not 0 < threshold <= 1:
                problems.append(f"{here}: a share threshold is in (0, 1], not {threshold}")
            if rule.cooldown < window:
                problems.append(f"{here}: cooldown {item.get('cooldown')} is shorter than the window")
            rules.append(rule)
        if len({r.name for r in rules}) != len(rules):
            problems.append(f"{where}: rule names must differ")
        webhook = None
        if data.get("webhook") is not None:
            hook = data["webhook"]
            if isinstance(hook, str):
                hook = {"url": hook}
            if not isinstance(hook, dict) or not str(hook.get("url", "")).startswith(("http://", "https://")):
                problems.append(f"{where}: webhook needs an http(s) url")
            else:
                _check_keys(hook, {"url", "retries", "timeout", "headers"}, f"{where}: webhook", problems)
                webhook = Webhook(hook["url"], int(hook.get("retries", 3)), float(hook.get("timeout", 5.0)),
                                  dict(hook.get("headers") or {}))
        if problems:
            raise ConfigError(problems)
        return cls(window, rules, webhook, data.get("negative_label"), data.get("positive_label"))


DEFAULT_RULES = {
    "window": "1h",
    "rules": [
        {"name": "negative-share", "kind": "share", "threshold": 0.6, "min_volume": 10, "cooldown": "12h"},
        # one entity's negatives per hour are sparse (mostly 0, a std of 0.1-0.5): the floor of two
        # messages keeps one chatty conversation from alerting, and firing at half of a 3-sigma
        # surge absorbs the classifier's misses (docs/apps/monitor.md: chosen on April-May 2018)
        {"name": "negative-surge", "kind": "zscore", "threshold": 1.5, "baseline": "7d", "min_volume": 3,
         "min_baseline": 24, "sigma_floor": 2.0, "cooldown": "12h"},
    ],
}


# ---------------------------------------------------------------------------- classifiers

@dataclass
class Sentiment:
    label: str
    negative: bool
    score: float  # P(positive) - P(negative), in [-1, 1]
    probabilities: dict[str, float]


class Classifier(Protocol):
    name: str

    def classify(self, texts: list[str]) -> list[Sentiment]: ...


def polarity_labels(labels: Sequence[str], negative: str | None, positive: str | None) -> tuple[str, str | None]:
    """Which label is negative and which positive: given, else named so ("neg..."/"pos..."), else
    the first and last of the sorted labels (0 = negative in every sentiment corpus here)."""
    labels = list(labels)

    def named(prefix: str) -> str | None:
        return next((label for label in labels if label.lower().startswith(prefix)), None)

    neg = negative or named("neg") or labels[0]
    pos = positive or named("pos") or (labels[-1] if len(labels) > 1 else None)
    for value, what in ((neg, "negative_label"), (pos, "positive_label")):
        if value is not None and value not in labels:
            raise ConfigError([f"{what} {value!r} is not a label of the classifier ({', '.join(labels)})"])
    return neg, pos


class RunClassifier:
    """A fine-tuned classification run or model folder (any lmforge task folder: fp32, int8,
    ONNX, pruned, distilled)."""

    def __init__(self, path: str | Path, negative: str | None = None, positive: str | None = None,
                 batch_size: int = 64) -> None:
        from lmforge.serve.models import load_served

        self.served = load_served(str(path))
        if self.served.kind != "task" or self.served.task.name != "classify":
            raise ConfigError([f"--classifier {path}: not a classification model ({self.served.kind})"])
        self.name = str(path)
        self.labels = [str(label) for label in self.served.task.spec.labels]
        self.negative, self.positive = polarity_labels(self.labels, negative, positive)
        self.batch_size = batch_size

    def classify(self, texts: list[str]) -> list[Sentiment]:
        """Sentiments in the order of ``texts``; the model sees them in batches of similar length
        (less padding), each batch padded to its longest."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Sentiment | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, prediction in zip(chunk, self.served.run_task([{"text": texts[i]} for i in chunk]), strict=True):
                probs = {str(k): float(v) for k, v in prediction["probabilities"].items()}
                label = str(prediction["label"])
                score = probs.get(self.positive, 0.0) if self.positive else 0.0
                out[index] = Sentiment(label, label == self.negative, score - probs.get(self.negative, 0.0), probs)
        return [s for s in out if s is not None]


NEGATORS = {"not", "no", "never", "cannot", "can't", "don't", "doesn't", "didn't", "isn't", "wasn't", "aren't",
            "won't", "wouldn't", "shouldn't", "couldn't", "hardly", "nothing", "nobody", "dont", "cant", "isnt",
            "wasnt", "didnt", "doesnt", "wont"}


class LexiconClassifier:
    """The baseline: AFINN-165 word scores (from the npm ``sentiment`` package) summed over the
    text, a score's sign flipped after a negator; negative below zero, positive above."""

    name = "lexicon (AFINN-165)"

    def __init__(self) -> None:
        from lmforge.data.corpora import sentiment_package

        path = sentiment_package() / "languages" / "en" / "labels.json"
        self.scores: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
        self._words = re.compile(r"[a-z][a-z'\-]*")

    def value(self, text: str) -> float:
        total, flip = 0.0, False
        for word in self._words.findall(text.lower()):
            score = self.scores.get(word)
            if score is not None:
                total += -score if flip else score
            flip = word in NEGATORS
        return total

    def classify(self, texts: list[str]) -> list[Sentiment]:
        out = []
        for text in texts:
            value = self.value(text)
            label = "negative" if value < 0 else "positive" if value > 0 else "neutral"
            score = max(-1.0, min(1.0, value / 5.0))
            out.append(Sentiment(label, label == "negative", score, {label: 1.0}))
        return out


def load_classifier(spec: str, negative: str | None = None, positive: str | None = None) -> Classifier:
    """``lexicon`` (the AFINN baseline) or a classification run / model folder."""
    if spec == "lexicon":
        return LexiconClassifier()
    return RunClassifier(spec, negative, positive)


class NerFinder:
    """Organisation names from an NER run, for the candidates table."""

    def __init__(self, path: str | Path, label: str = "ORG") -> None:
        from lmforge.serve.models import load_served

        self.served = load_served(str(path))
        if self.served.kind != "task" or self.served.task.name != "ner":
            raise ConfigError([f"--ner {path}: not an NER model"])
        self.label = label

    def organisations(self, texts: list[str]) -> list[list[str]]:
        out = []
        for start in range(0, len(texts), 32):
            for prediction in self.served.run_task([{"text": t} for t in texts[start:start + 32]]):
                out.append([e["text"] for e in prediction.get("entities", [])
                            if e.get("label") == self.label and len(e.get("text", "").strip()) > 1])
        return out


# ---------------------------------------------------------------------------- sources

@dataclass
class Parsed:
    position: int  # 1-based line number (JSONL) or data row number + 1 (CSV: the header is line 1)
    end: int  # byte offset after the line
    record: dict[str, Any] | None = None
    reason: str | None = None
    raw: str = ""


def parse_record(item: Any, text_field: str = "text", time_field: str = "timestamp") -> dict[str, Any]:
    """A stored record from one input record; ValueError naming the field otherwise."""
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object")
    text = item.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field {text_field!r}: missing or empty text")
    try:
        ts = parse_time(item.get(time_field))
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(f"field {time_field!r}: bad timestamp {item.get(time_field)!r} ({error})") from None
    meta = item.get("meta")
    if meta is None:
        meta = {k: v for k, v in item.items() if k not in (text_field, time_field)} or None
    return {"ts": ts, "text": text.strip(), "meta": meta}


class FileSource:
    """A JSONL or CSV file read from a byte offset: replayed as fast as it can be read
    (``speed=0``), or at ``speed`` times the pace of its timestamps, and with ``follow`` tailed
    as it grows. Malformed lines become rejects with their line number; the stream goes on."""

    def __init__(self, path: str | Path, speed: float = 0.0, follow: bool = False, text_field: str = "text",
                 time_field: str = "timestamp", poll_s: float = 0.5) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"--source {path}: no such file")
        self.kind = "csv" if self.path.suffix.lower() == ".csv" else "jsonl"
        self.name = str(self.path.resolve())
        self.speed, self.follow, self.poll_s = speed, follow, poll_s
        self.text_field, self.time_field = text_field, time_field
        self._header: list[str] | None = None
        self._pace: tuple[float, float] | None = None  # (first event ts, wall clock then)

    def _csv_header(self) -> list[str]:
        if self._header is None:
            with open(self.path, encoding="utf-8", newline="") as handle:
                self._header = next(csv.reader([handle.readline()]), [])
            if self.text_field not in self._header or self.time_field not in self._header:
                raise DataError(f"{self.path}:1: the CSV header {self._header} lacks {self.text_field!r} "
                                f"or {self.time_field!r} (--text-field / --time-field)")
        return self._header

    def read(self, position: int, offset: int, limit: int) -> list[Parsed]:
        """Up to ``limit`` lines after byte ``offset`` (``position`` lines read before it)."""
        header = self._csv_header() if self.kind == "csv" else None
        out: list[Parsed] = []
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            if header is not None and offset == 0:
                offset += len(handle.readline())
                position += 1
            while len(out) < limit:
                line = handle.readline()
                if not line or not line.endswith(b"\n") and self.follow:
                    break  # a line still being written is read once it is whole
                offset += len(line)
                position += 1
                text = line.decode("utf-8", errors="replace").strip()
                if not text:
                    continue
                out.append(self._parse(text, position, offset, header))
        self._wait_for_pace([p for p in out if p.record])
        return out

    def _parse(self, text: str, position: int, end: int, header: list[str] | None) -> Parsed:
        try:
            if header is not None:
                values = next(csv.reader(io.StringIO(text)))
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} fields where the header has {len(header)}")
                item: Any = dict(zip(header, values, strict=True))
            else:
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
            return Parsed(position, end, parse_record(item, self.text_field, self.time_field))
        except ValueError as error:
            return Parsed(position, end, reason=f"{self.path}:{position}: {error}", raw=text[:500])

    def _wait_for_pace(self, parsed: list[Parsed]) -> None:
        if self.speed <= 0 or not parsed:
            return
        last = max(p.record["ts"] for p in parsed if p.record)
        if self._pace is None:
            self._pace = (min(p.record["ts"] for p in parsed if p.record), time.monotonic())
        due = self._pace[1] + (last - self._pace[0]) / self.speed
        time.sleep(max(0.0, min(due - time.monotonic(), 60.0)))


# ---------------------------------------------------------------------------- the monitor

@dataclass
class Window:
    volume: int = 0
    negative: int = 0
    score_sum: float = 0.0
    stored: bool = False


class Monitor:
    """Entities, classifier, rules and store, put together; every batch is one transaction."""

    def __init__(self, store: Store, classifier: Classifier, matcher: EntityMatcher, rules: Rules,
                 ner: NerFinder | None = None, classify_all: bool = False, batch_size: int = 64,
                 on_alert: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store, self.classifier, self.matcher, self.rules = store, classifier, matcher, rules
        self.ner, self.classify_all, self.batch_size = ner, classify_all, batch_size
        self.on_alert = on_alert
        store.keep_setting("window_s", rules.window, "the window")
        self.stats = {"ingested": 0, "rejected": 0, "processed": 0, "classified": 0, "alerts": 0}

    def window_of(self, ts: float) -> float:
        return math.floor(ts / self.rules.window) * self.rules.window

    # ------------------------------------------------------------------ ingest
    def ingest_from(self, source: FileSource, limit: int | None = None) -> int:
        """One chunk of the file after the stored cursor; returns the lines read (0 at its end)."""
        position, offset = self.store.cursor(source.name)
        parsed = source.read(position, offset, limit or self.batch_size * 4)
        if not parsed:
            return 0
        records = [{"position": p.position, **p.record} for p in parsed if p.record]
        rejects = [{"position": p.position, "reason": p.reason, "raw": p.raw} for p in parsed if p.reason]
        for reject in rejects:
            log.warning("rejected %s", reject["reason"])
        self.store.ingest(source.name, records, rejects, (parsed[-1].position, parsed[-1].end))
        self.stats["ingested"] += len(records)
        self.stats["rejected"] += len(rejects)
        return len(parsed)

    # ------------------------------------------------------------------ processing
    def process(self, limit: int | None = None) -> int:
        """Classify and count one batch of pending records; returns how many."""
        rows = self.store.pending(limit or self.batch_size)
        if not rows:
            return 0
        found = [self.matcher.find(r["text"]) for r in rows]
        chosen = [i for i, names in enumerate(found) if names or self.classify_all]
        sentiments = dict(zip(chosen, self.classifier.classify([rows[i]["text"] for i in chosen]), strict=True))
        organisations = self.ner.organisations([rows[i]["text"] for i in chosen]) if self.ner and chosen else []
        raised: list[dict[str, Any]] = []
        with self.store.begin() as connection:
            batch = _Batch(self, connection)
            for index, row in enumerate(rows):
                raised += batch.add(row, found[index], sentiments.get(index))
            batch.flush()
            if organisations:
                self._candidates(connection, [rows[i] for i in chosen], organisations)
        self.stats["processed"] += len(rows)
        self.stats["classified"] += len(chosen)
        self.stats["alerts"] += len(raised)
        for alert in raised:
            log.warning(json.dumps({"event": "alert", **{k: alert[k] for k in ("entity", "rule", "value")},
                                    "time": iso(alert["ts"])}))
            if self.on_alert:
                self.on_alert(alert)
        return len(rows)

    def _candidates(self, connection: sa.Connection, rows: list[dict[str, Any]], found: list[list[str]]) -> None:
        for row, names in zip(rows, found, strict=True):
            for name in dict.fromkeys(n.strip() for n in names):
                if self.matcher.known(name):
                    continue
                updated = connection.execute(
                    CANDIDATES.update().where(CANDIDATES.c.name == name).values(
                        count=CANDIDATES.c.count + 1, last_ts=sa.func.max(CANDIDATES.c.last_ts, row["ts"])
                        if connection.dialect.name == "sqlite" else sa.func.greatest(CANDIDATES.c.last_ts, row["ts"])))
                if updated.rowcount == 0:
                    connection.execute(CANDIDATES.insert().values(name=name, count=1, first_ts=row["ts"],
                                                                  last_ts=row["ts"], example=row["id"]))

    def run(self, source: FileSource | None = None, stop: threading.Event | None = None,
            progress: Callable[[dict[str, int]], None] | None = None, idle_exit_s: float | None = None) -> dict[str, int]:
        """Ingest and process until the source ends (or, tailing / HTTP only, until ``stop``)."""
        stop = stop or threading.Event()
        idle_since = time.monotonic()
        while not stop.is_set():
            read = self.ingest_from(source) if source is not None else 0
            done = 0
            while True:
                count = self.process()
                done += count
                if count < self.batch_size or stop.is_set():
                    break
            if progress and (read or done):
                progress(self.stats)
            if read or done:
                idle_since = time.monotonic()
                continue
            if source is not None and not source.follow:
                break
            if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                break
            stop.wait(source.poll_s if source is not None else 0.2)
        return dict(self.stats)


class _Batch:
    """One batch's transaction: aggregates cached, rules checked record by record (in order, so
    the alerts do not depend on where batches begin), everything written once at the end."""

    def __init__(self, monitor: Monitor, connection: sa.Connection) -> None:
        self.m, self.c = monitor, connection
        self.windows: dict[tuple[str, float], Window] = {}
        self.baselines: dict[tuple[str, float], tuple[float, float, int]] = {}
        self.last_alert: dict[tuple[str, str], tuple[float, float] | None] = {}
        self.negatives: dict[tuple[str, float], list[int]] = defaultdict(list)
        self.predictions: list[dict[str, Any]] = []
        self.mentions: list[dict[str, Any]] = []
        self.done: list[int] = []

    def window(self, entity: str, start: float) -> Window:
        key = (entity, start)
        if key not in self.windows:
            row = self.c.execute(sa.select(AGGREGATES.c.volume, AGGREGATES.c.negative, AGGREGATES.c.score_sum)
                                 .where(AGGREGATES.c.entity == entity, AGGREGATES.c.window_start == start)).first()
            self.windows[key] = Window(row[0], row[1], row[2], True) if row else Window()
        return self.windows[key]

    def add(self, row: dict[str, Any], entities: list[str], sentiment: Sentiment | None) -> list[dict[str, Any]]:
        start = self.m.window_of(row["ts"])
        stream = self.window("*", start)
        if stream.volume == 0:
            self.baselines.clear()  # a window became active: the baselines' window sets change
        stream.volume += 1
        self.done.append(row["id"])
        if sentiment is None:
            return []
        negative = sentiment.negative
        stream.negative += int(negative)
        stream.score_sum += sentiment.score
        self.predictions.append({"record_id": row["id"], "label": sentiment.label, "negative": negative,
                                 "score": sentiment.score, "model": self.m.classifier.name,
                                 "probabilities": json.dumps(sentiment.probabilities)})
        raised = []
        for entity in entities:
            self.mentions.append({"record_id": row["id"], "entity": entity, "ts": row["ts"], "negative": negative})
            window = self.window(entity, start)
            window.volume += 1
            window.negative += int(negative)
            window.score_sum += sentiment.score
            if negative:
                self.negatives[(entity, start)].append(row["id"])
                for key in [k for k in self.baselines if k[0] == entity and k[1] > start]:
                    del self.baselines[key]  # a late record changed a later window's baseline
            for rule in self.m.rules.rules:
                if rule.applies(entity):
                    alert = self.check(rule, entity, start, row["ts"], window)
                    if alert:
                        raised.append(alert)
        return raised

    def _active_windows(self, start: float, span: float) -> list[float]:
        """The windows of ``span`` before ``start`` in which the stream had records."""
        rows = self.c.execute(sa.select(AGGREGATES.c.window_start).where(
            AGGREGATES.c.entity == "*", AGGREGATES.c.window_start >= start - span, AGGREGATES.c.window_start < start,
            AGGREGATES.c.volume > 0)).all()
        cached = {w for (e, w), v in self.windows.items() if e == "*" and v.volume > 0 and start - span <= w < start}
        return sorted({r[0] for r in rows} | cached)

    def baseline(self, rule: Rule, entity: str, start: float) -> tuple[float, float, int]:
        key = (entity, start)
        if key not in self.baselines:
            windows = self._active_windows(start, rule.baseline)
            counts = dict(self.c.execute(sa.select(AGGREGATES.c.window_start, AGGREGATES.c.negative).where(
                AGGREGATES.c.entity == entity, AGGREGATES.c.window_start >= start - rule.baseline,
                AGGREGATES.c.window_start < start)).all())
            for (e, w), value in self.windows.items():
                if e == entity and start - rule.baseline <= w < start:
                    counts[w] = value.negative
            values = [counts.get(w, 0) for w in windows]
            n = len(values)
            mean = sum(values) / n if n else 0.0
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else 0.0
            self.baselines[key] = (mean, std, n)
        return self.baselines[key]

    def check(self, rule: Rule, entity: str, start: float, ts: float, window: Window) -> dict[str, Any] | None:
        detail: dict[str, Any] = {"volume": window.volume, "negative": window.negative, "window_s": self.m.rules.window}
        if rule.kind == "share":
            if window.volume < rule.min_volume:
                return None
            value = window.negative / window.volume
        else:
            if window.negative < rule.min_volume:
                return None
            mean, std, n = self.baseline(rule, entity, start)
            if n < rule.min_baseline:
                return None
            value = (window.negative - mean) / max(std, rule.sigma_floor)
            detail.update({"baseline_mean": round(mean, 4), "baseline_std": round(std, 4), "baseline_windows": n})
        if value < rule.threshold or not self._cooled(rule, entity, ts):
            return None
        examples = self.negatives[(entity, start)][-10:]
        if len(examples) < 10:
            earlier = self.c.execute(sa.select(MENTIONS.c.record_id).where(
                MENTIONS.c.entity == entity, MENTIONS.c.negative == sa.true(), MENTIONS.c.ts >= start,
                MENTIONS.c.ts < start + self.m.rules.window).order_by(MENTIONS.c.ts.desc()).limit(10 - len(examples)))
            examples = [r[0] for r in earlier][::-1] + examples
        alert = {"entity": entity, "rule": rule.name, "kind": rule.kind, "window_start": start, "ts": ts,
                 "value": round(value, 4), "threshold": rule.threshold, "detail": json.dumps(detail),
                 "examples": json.dumps(examples), "created_at": time.time(), "delivered": False, "attempts": 0}
        alert["id"] = self.c.execute(ALERTS.insert().values(**alert)).inserted_primary_key[0]
        self.last_alert[(entity, rule.name)] = (ts, start)
        return {**alert, "detail": detail, "examples": examples}

    def _cooled(self, rule: Rule, entity: str, ts: float) -> bool:
        key = (entity, rule.name)
        if key not in self.last_alert:
            row = self.c.execute(sa.select(ALERTS.c.ts, ALERTS.c.window_start).where(
                ALERTS.c.entity == entity, ALERTS.c.rule == rule.name).order_by(ALERTS.c.ts.desc()).limit(1)).first()
            self.last_alert[key] = (row[0], row[1]) if row else None
        last = self.last_alert[key]
        return last is None or ts - last[0] >= rule.cooldown

    def flush(self) -> None:
        if self.predictions:
            self.c.execute(PREDICTIONS.insert(), self.predictions)
        if self.mentions:
            self.c.execute(MENTIONS.insert(), self.mentions)
        for (entity, start), window in self.windows.items():
            values = {"volume": window.volume, "negative": window.negative, "score_sum": window.score_sum}
            if window.stored:
                self.c.execute(AGGREGATES.update().where(AGGREGATES.c.entity == entity,
                                                         AGGREGATES.c.window_start == start).values(**values))
            elif window.volume:
                self.c.execute(AGGREGATES.insert().values(entity=entity, window_start=start, **values))
        for first in range(0, len(self.done), 500):
            self.c.execute(RECORDS.update().where(RECORDS.c.id.in_(self.done[first:first + 500])).values(processed=True))


# ---------------------------------------------------------------------------- alert delivery

class AlertSender:
    """Delivers stored alerts to the webhook (POST JSON, retried with back-off); an alert is
    marked delivered only after a 2xx, so a restart resends what was not."""

    def __init__(self, store: Store, webhook: Webhook | None, poll_s: float = 0.5) -> None:
        self.store, self.webhook, self.poll_s = store, webhook, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_pending(self) -> int:
        with self.store.engine.connect() as connection:
            rows = connection.execute(sa.select(ALERTS).where(ALERTS.c.delivered == sa.false())
                                      .order_by(ALERTS.c.id).limit(100)).all()
        sent = 0
        for row in rows:
            alert = dict(row._mapping)
            error = self._post(alert) if self.webhook else None
            with self.store.begin() as connection:
                connection.execute(ALERTS.update().where(ALERTS.c.id == alert["id"]).values(
                    delivered=error is None, attempts=ALERTS.c.attempts + 1, last_error=error))
            if error is None:
                sent += 1
            else:
                log.error("alert %s not delivered: %s", alert["id"], error)
                break  # keep the order; try again next round
        return sent

    def _post(self, alert: dict[str, Any]) -> str | None:
        import httpx

        assert self.webhook is not None
        payload = {"id": alert["id"], "entity": alert["entity"], "rule": alert["rule"], "kind": alert["kind"],
                   "value": alert["value"], "threshold": alert["threshold"], "time": iso(alert["ts"]),
                   "window_start": iso(alert["window_start"]), "detail": json.loads(alert["detail"]),
                   "examples": self.store.texts(json.loads(alert["examples"]))}
        error = "not tried"
        for attempt in range(self.webhook.retries + 1):
            try:
                response = httpx.post(self.webhook.url, json=payload, timeout=self.webhook.timeout,
                                      headers=self.webhook.headers)
                if 200 <= response.status_code < 300:
                    return None
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as failure:
                error = f"{type(failure).__name__}: {failure}"
            if attempt == self.webhook.retries or self._stop.wait(min(0.25 * 2 ** attempt, 5.0)):
                break  # out of tries, or stopping: the alert stays undelivered for the next run
        return error

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.deliver_pending()
                except sa.exc.SQLAlchemyError as error:  # the database is busy or gone: try later
                    log.error("alert delivery: %s", error)
                self._stop.wait(self.poll_s)

        self._thread = threading.Thread(target=loop, name="alert-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.deliver_pending()  # one last round (a failing webhook is tried once per alert now)


def parse_since(value: str | None) -> float | None:
    """``--since``: an ISO time, epoch seconds, or a duration back from now (``7d``)."""
    if value is None:
        return None
    if DURATION.match(value):
        return time.time() - seconds(value, "--since")
    try:
        return parse_time(value)
    except ValueError:
        raise ConfigError([f"--since {value!r}: expected an ISO time, epoch seconds or a duration like 7d"]) from None


def records_from_chitchat() -> Iterator[dict[str, Any]]:
    """Every utterance of the chitchat corpus (BYU's CCC, 2018) as a timestamped record."""
    from lmforge.data.corpora import package_dir

    path = package_dir("chitchat_dataset", "pip install chitchat-dataset==0.9.0") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for conversation_id, conversation in data.items():
        for turn in conversation["messages"]:
            for message in turn:
                text = str(message.get("text") or "").strip()
                if text:
                    items.append({"timestamp": message["timestamp"], "text": text,
                                  "meta": {"conversation": conversation_id}})
    items.sort(key=lambda item: (item["timestamp"], item["meta"]["conversation"]))
    yield from items
