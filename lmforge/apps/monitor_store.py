"""The sentiment monitor's database: SQLite (WAL) by default, any SQLAlchemy URL otherwise.

Every table the monitor keeps, and its migrations. One batch of work is one transaction, so
a monitor killed at any point restarts from its last commit: records accepted are never
lost, and nothing is counted twice.

    records      id, source, position (line / sequence), ts (epoch s), text, meta, processed
    predictions  record_id -> label, negative, score, probabilities, model
    mentions     (record_id, entity), ts, negative      which watched entity a record names
    aggregates   (entity, window_start) -> volume, negative, score_sum   ("*" = the whole stream)
    alerts       entity, rule, window, value, detail, examples, delivery state (an outbox)
    cursors      source -> position, byte offset         where a file source resumes
    rejects      (source, position) -> reason, raw       malformed records, with their line
    candidates   name -> count, first/last ts, example   organisations an NER model found   (v2)
    meta         key -> value: schema_version, settings
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lmforge.errors import ConfigError, CorruptFileError

METADATA = sa.MetaData()

META = sa.Table("meta", METADATA, sa.Column("key", sa.String(64), primary_key=True),
                sa.Column("value", sa.Text, nullable=False))
RECORDS = sa.Table(
    "records", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(512), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("meta", sa.Text),
    sa.Column("processed", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("source", "position", name="uq_records_source_position"),
    sa.Index("ix_records_processed", "processed", "id"),
)
PREDICTIONS = sa.Table(
    "predictions", METADATA,
    sa.Column("record_id", sa.Integer, sa.ForeignKey("records.id"), primary_key=True),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("negative", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
)
MENTIONS = sa.Table(
    "mentions", METADATA,
    sa.Column("record_id", sa.Integer, sa.ForeignKey("records.id"), primary_key=True),
    sa.Column("entity", sa.String(256), primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("negative", sa.Boolean, nullable=False),
)
AGGREGATES = sa.Table(
    "aggregates", METADATA,
    sa.Column("entity", sa.String(256), primary_key=True),
    sa.Column("window_start", sa.Float, primary_key=True),
    sa.Column("volume", sa.Integer, nullable=False),
    sa.Column("negative", sa.Integer, nullable=False),
    sa.Column("score_sum", sa.Float, nullable=False),
)
ALERTS = sa.Table(
    "alerts", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("entity", sa.String(256), nullable=False),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("window_start", sa.Float, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # event time of the record that raised it
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("examples", sa.Text, nullable=False),  # record ids, JSON
    sa.Column("created_at", sa.Float, nullable=False),  # wall clock
    sa.Column("delivered", sa.Boolean, nullable=False, default=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_alerts_entity_rule", "entity", "rule", "ts"),
)
CURSORS = sa.Table(
    "cursors", METADATA,
    sa.Column("source", sa.String(512), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("byte_offset", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
REJECTS = sa.Table(
    "rejects", METADATA,
    sa.Column("source", sa.String(512), primary_key=True),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
)
CANDIDATES = sa.Table(
    "candidates", METADATA,
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("first_ts", sa.Float, nullable=False),
    sa.Column("last_ts", sa.Float, nullable=False),
    sa.Column("example", sa.Integer, nullable=False),
)
MENTIONS_INDEX = sa.Index("ix_mentions_entity_ts", MENTIONS.c.entity, MENTIONS.c.ts)


def _v1(connection: Connection) -> None:
    for table in (META, RECORDS, PREDICTIONS, MENTIONS, AGGREGATES, ALERTS, CURSORS, REJECTS):
        table.create(connection, checkfirst=True)


def _v2(connection: Connection) -> None:
    CANDIDATES.create(connection, checkfirst=True)
    MENTIONS_INDEX.create(connection, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]  # index + 1 = the version it makes
SCHEMA_VERSION = len(MIGRATIONS)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the dashboard) never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # a killed process loses no committed batch
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def database_url(value: str) -> str:
    """A SQLAlchemy URL; a bare path is a SQLite file."""
    return value if "://" in value else f"sqlite:///{value}"


class Store:
    """The monitor's database: migrated on open, one transaction per batch."""

    def __init__(self, url: str, migrate_to: int = SCHEMA_VERSION) -> None:
        self.url = database_url(url)
        try:
            self.engine: Engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, ImportError) as error:
            raise ConfigError([f"--db {url}: {error}"]) from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.version = self._migrate(migrate_to)

    def _migrate(self, target: int) -> int:
        with self.engine.begin() as connection:
            META.create(connection, checkfirst=True)
            row = connection.execute(sa.select(META.c.value).where(META.c.key == "schema_version")).first()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise CorruptFileError(f"{self.url}: schema version {version}; this lmforge knows up to "
                                       f"{SCHEMA_VERSION} (a newer lmforge wrote it)")
            for number in range(version + 1, target + 1):
                MIGRATIONS[number - 1](connection)
                self._set(connection, "schema_version", str(number))
            return max(version, target)

    @staticmethod
    def _set(connection: Connection, key: str, value: str) -> None:
        if connection.execute(sa.select(META.c.key).where(META.c.key == key)).first():
            connection.execute(META.update().where(META.c.key == key).values(value=value))
        else:
            connection.execute(META.insert().values(key=key, value=value))

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ settings
    def setting(self, key: str) -> Any:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(META.c.value).where(META.c.key == key)).first()
        return json.loads(row[0]) if row else None

    def keep_setting(self, key: str, value: Any, what: str) -> None:
        """Store ``value`` the first time; refuse a different one later (``what`` names it)."""
        stored = self.setting(key)
        if stored is None:
            with self.begin() as connection:
                self._set(connection, key, json.dumps(value))
        elif stored != value:
            raise ConfigError([f"{self.url}: {what} was {stored!r} when the database was made, now {value!r}; "
                               "aggregates of different settings do not mix: use a new --db"])

    # ------------------------------------------------------------------ ingest
    def cursor(self, source: str) -> tuple[int, int]:
        """(records read, byte offset) of a file source; (0, 0) when new."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(CURSORS.c.position, CURSORS.c.byte_offset)
                                     .where(CURSORS.c.source == source)).first()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def ingest(self, source: str, records: list[dict[str, Any]], rejects: list[dict[str, Any]],
               cursor: tuple[int, int] | None = None) -> list[int]:
        """Insert records ({position, ts, text, meta}) and rejects ({position, reason, raw}), and
        move the source's cursor, in one transaction; returns the new records' positions (those
        already stored, from a replay after a crash, are skipped)."""
        with self.begin() as connection:
            return self._ingest(connection, source, records, rejects, cursor)

    def _ingest(self, connection: Connection, source: str, records: list[dict[str, Any]],
                rejects: list[dict[str, Any]], cursor: tuple[int, int] | None) -> list[int]:
        positions = [r["position"] for r in records] + [r["position"] for r in rejects]
        known: set[int] = set()
        if positions:
            low, high = min(positions), max(positions)
            for table in (RECORDS, REJECTS):
                known |= {int(p) for (p,) in connection.execute(
                    sa.select(table.c.position).where(table.c.source == source, table.c.position.between(low, high)))}
        fresh = [r for r in records if r["position"] not in known]
        if fresh:
            connection.execute(RECORDS.insert(), [
                {"source": source, "position": r["position"], "ts": r["ts"], "text": r["text"],
                 "meta": json.dumps(r["meta"], ensure_ascii=False) if r.get("meta") else None, "processed": False}
                for r in fresh])
        bad = [r for r in rejects if r["position"] not in known]
        if bad:
            connection.execute(REJECTS.insert(), [{"source": source, **r} for r in bad])
        if cursor is not None:
            values = {"position": cursor[0], "byte_offset": cursor[1], "updated_at": time.time()}
            if connection.execute(CURSORS.update().where(CURSORS.c.source == source).values(**values)).rowcount == 0:
                connection.execute(CURSORS.insert().values(source=source, **values))
        return [r["position"] for r in fresh]

    def append(self, source: str, records: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> int:
        """Records from a source without positions of its own (HTTP ingest): numbered after the
        last one stored, in the same transaction. Returns how many were stored."""
        with self.begin() as connection:
            last = connection.execute(sa.select(sa.func.max(RECORDS.c.position))
                                      .where(RECORDS.c.source == source)).scalar()
            last_reject = connection.execute(sa.select(sa.func.max(REJECTS.c.position))
                                             .where(REJECTS.c.source == source)).scalar()
            start = max(last or 0, last_reject or 0) + 1
            items = sorted([(r["index"], "record", r) for r in records] + [(r["index"], "reject", r) for r in rejects],
                           key=lambda item: item[0])
            numbered: dict[str, list[dict[str, Any]]] = {"record": [], "reject": []}
            for offset, (_, kind, item) in enumerate(items):
                numbered[kind].append({**{k: v for k, v in item.items() if k != "index"}, "position": start + offset})
            return len(self._ingest(connection, source, numbered["record"], numbered["reject"], None))

    # ------------------------------------------------------------------ reading
    def pending(self, limit: int) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(RECORDS.c.id, RECORDS.c.ts, RECORDS.c.text)
                                      .where(RECORDS.c.processed == sa.false()).order_by(RECORDS.c.id).limit(limit))
            return [dict(row._mapping) for row in rows]

    def counts(self) -> dict[str, Any]:
        with self.engine.connect() as connection:
            def scalar(query: Any) -> Any:
                return connection.execute(query).scalar()

            return {"records": scalar(sa.select(sa.func.count()).select_from(RECORDS)),
                    "pending": scalar(sa.select(sa.func.count()).select_from(RECORDS)
                                      .where(RECORDS.c.processed == sa.false())),
                    "classified": scalar(sa.select(sa.func.count()).select_from(PREDICTIONS)),
                    "mentions": scalar(sa.select(sa.func.count()).select_from(MENTIONS)),
                    "rejects": scalar(sa.select(sa.func.count()).select_from(REJECTS)),
                    "alerts": scalar(sa.select(sa.func.count()).select_from(ALERTS)),
                    "first_ts": scalar(sa.select(sa.func.min(RECORDS.c.ts))),
                    "last_ts": scalar(sa.select(sa.func.max(RECORDS.c.ts)))}

    def entities(self) -> list[dict[str, Any]]:
        """Every entity with mentions: volume, negatives, mean score, alerts, last window."""
        with self.engine.connect() as connection:
            totals = connection.execute(
                sa.select(AGGREGATES.c.entity, sa.func.sum(AGGREGATES.c.volume), sa.func.sum(AGGREGATES.c.negative),
                          sa.func.sum(AGGREGATES.c.score_sum), sa.func.max(AGGREGATES.c.window_start))
                .where(AGGREGATES.c.entity != "*").group_by(AGGREGATES.c.entity)).all()
            alerts = dict(connection.execute(sa.select(ALERTS.c.entity, sa.func.count()).group_by(ALERTS.c.entity)).all())
        return [{"entity": e, "volume": int(v), "negative": int(n), "negative_share": n / v if v else 0.0,
                 "mean_score": s / v if v else 0.0, "last_window": w, "alerts": int(alerts.get(e, 0))}
                for e, v, n, s, w in sorted(totals, key=lambda row: -row[1])]

    def series(self, entity: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        query = sa.select(AGGREGATES).where(AGGREGATES.c.entity == entity)
        if since is not None:
            query = query.where(AGGREGATES.c.window_start >= since)
        if until is not None:
            query = query.where(AGGREGATES.c.window_start < until)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(AGGREGATES.c.window_start)).all()
        return [{"start": r.window_start, "volume": r.volume, "negative": r.negative,
                 "negative_share": r.negative / r.volume if r.volume else 0.0,
                 "mean_score": r.score_sum / r.volume if r.volume else 0.0} for r in rows]

    def alerts(self, entity: str | None = None, since: float | None = None, limit: int = 100,
               with_texts: bool = True) -> list[dict[str, Any]]:
        query = sa.select(ALERTS)
        if entity:
            query = query.where(ALERTS.c.entity == entity)
        if since is not None:
            query = query.where(ALERTS.c.ts >= since)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(ALERTS.c.ts.desc(), ALERTS.c.id.desc()).limit(limit)).all()
            out = []
            for row in rows:
                alert = dict(row._mapping)
                alert["detail"] = json.loads(alert["detail"])
                ids = json.loads(alert.pop("examples"))
                alert["examples"] = ids
                out.append(alert)
        if with_texts:
            for alert in out:
                alert["texts"] = self.texts(alert["examples"])
        return out

    def texts(self, ids: list[int]) -> list[str]:
        """The texts of records ``ids``, in that order."""
        if not ids:
            return []
        with self.engine.connect() as connection:
            found = dict(connection.execute(sa.select(RECORDS.c.id, RECORDS.c.text).where(RECORDS.c.id.in_(ids))).all())
        return [found[i] for i in ids if i in found]

    def rejects(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(REJECTS).order_by(REJECTS.c.source, REJECTS.c.position).limit(limit))
            return [dict(row._mapping) for row in rows]

    def candidates(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(CANDIDATES).order_by(CANDIDATES.c.count.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]
