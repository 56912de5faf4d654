"""The sentiment monitor inside the server (`lmforge app monitor run --dashboard`, or
`lmforge serve --app monitor DB` to look at a database): routes behind the server's keys,
body limits and metrics, and a dashboard page.

    GET  /apps/monitor                       the dashboard (static; reads the API with a typed key)
    GET  /v1/apps/monitor/summary            counts, entities (volume, negative share, alerts), window
    GET  /v1/apps/monitor/series?entity=E    windows of E: volume, negatives, negative share, mean score
    GET  /v1/apps/monitor/alerts             latest alerts with the texts that raised them (?entity=, ?limit=)
    GET  /v1/apps/monitor/rejects            malformed records with their line
    GET  /v1/apps/monitor/candidates         organisations an NER model found that no alias covers
    POST /v1/apps/monitor/ingest             {"records": [{"text", "timestamp", "meta"?}]} (live monitor only)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from lmforge.apps.http import add_page, loaded
from lmforge.apps.monitor import iso, parse_record
from lmforge.apps.monitor_store import Store

MAX_RECORDS = 1000


class IngestBody(BaseModel):
    records: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_RECORDS)


class MonitorApp:
    """A monitor database as a server extension; with ``live`` (the running monitor's wake-up
    event) it also takes records over HTTP."""

    name = "monitor"
    pages = ("/apps/monitor",)
    source = "http"

    def __init__(self, db: str, live: Any = None) -> None:
        self.db, self.live = db, live
        self.store: Store | None = None
        self._appending = threading.Lock()  # HTTP records are numbered after the last stored: one batch at a time

    def load(self) -> None:
        self.store = Store(self.db)

    def mount(self, app: FastAPI, server: Any) -> None:
        from lmforge.serve.app import ApiError

        def store() -> Store:
            return loaded(self.store, "monitor database")

        add_page(app, "/apps/monitor", PAGE)

        @app.get("/v1/apps/monitor/summary")
        async def summary() -> dict[str, Any]:
            def read() -> dict[str, Any]:
                counts = store().counts()
                return {**counts, "first": iso(counts["first_ts"]), "last": iso(counts["last_ts"]),
                        "window_s": store().setting("window_s"), "entities": store().entities(),
                        "ingest": self.live is not None}

            return await server.offload(read)  # type: ignore[no-any-return]

        @app.get("/v1/apps/monitor/series")
        async def series(entity: str, since: float | None = None, until: float | None = None) -> dict[str, Any]:
            data = await server.offload(store().series, entity, since, until)
            return {"entity": entity, "window_s": store().setting("window_s"), "data": data}

        @app.get("/v1/apps/monitor/alerts")
        async def alerts(entity: str | None = None, limit: int = 50) -> dict[str, Any]:
            return {"data": await server.offload(store().alerts, entity, None, max(1, min(limit, 500)))}

        @app.get("/v1/apps/monitor/rejects")
        async def rejects(limit: int = 100) -> dict[str, Any]:
            return {"data": await server.offload(store().rejects, max(1, min(limit, 1000)))}

        @app.get("/v1/apps/monitor/candidates")
        async def candidates(limit: int = 50) -> dict[str, Any]:
            return {"data": await server.offload(store().candidates, max(1, min(limit, 500)))}

        @app.post("/v1/apps/monitor/ingest")
        async def ingest(body: IngestBody) -> dict[str, Any]:
            if self.live is None:
                raise ApiError(400, "this server shows a monitor database; ingest needs `lmforge app monitor run "
                                    "--source http`")
            records, rejected = [], []
            for index, item in enumerate(body.records):
                try:
                    records.append({"index": index, **parse_record(item)})
                except ValueError as error:
                    rejected.append({"index": index, "reason": f"records[{index}]: {error}", "raw": str(item)[:500]})
            def append() -> int:
                with self._appending:
                    return store().append(self.source, records, rejected)

            stored = await server.offload(append)
            self.live.set()  # wake the monitor
            return {"accepted": stored, "rejected": [{"index": r["index"], "reason": r["reason"]} for r in rejected]}


PAGE = (Path(__file__).parent / "monitor.html").read_text(encoding="utf-8")
