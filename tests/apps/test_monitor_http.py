"""The monitor over HTTP: the ingest route refuses requests without a key and stores what a
keyed one sends; the dashboard draws each entity's series and the alerts in headless Chromium."""

from __future__ import annotations

import threading
from pathlib import Path

from lmforge.apps.monitor import FileSource
from lmforge.apps.monitor_http import MonitorApp
from tests.apps.test_monitor import START, fixture_stream, monitor, write
from tests.serve.conftest import start
from tests.serve.test_playground import browser_page


def test_ingest_refuses_unauthenticated_requests_and_stores_keyed_ones(tmp_path: Path) -> None:
    watcher = monitor(tmp_path)
    wake = threading.Event()
    running = start([], extensions=[MonitorApp(str(tmp_path / "monitor.sqlite"), live=wake)])
    try:
        body = {"records": [{"text": "Acme is awful", "timestamp": START}, {"text": "", "timestamp": START},
                            {"text": "Globex is great", "timestamp": "2023-11-15T00:05:00Z", "meta": {"user": 1}},
                            {"text": "Acme ok", "timestamp": "soon"}]}
        with running.client(key=None) as anonymous:
            assert anonymous.post("/v1/apps/monitor/ingest", json=body).status_code == 401
            assert anonymous.post("/v1/apps/monitor/ingest", json=body,
                                  headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
            assert anonymous.get("/v1/apps/monitor/summary").status_code == 401
        assert watcher.store.counts()["records"] == 0 and not wake.is_set()
        with running.client() as client:
            answer = client.post("/v1/apps/monitor/ingest", json=body).json()
            assert answer["accepted"] == 2 and [r["index"] for r in answer["rejected"]] == [1, 3]
            assert "records[3]: field 'timestamp'" in answer["rejected"][1]["reason"]
            assert wake.is_set()
            assert watcher.process() == 2
            summary = client.get("/v1/apps/monitor/summary").json()
            assert summary["records"] == 2 and summary["rejects"] == 2 and summary["ingest"] is True
            assert {e["entity"]: e["negative"] for e in summary["entities"]} == {"Acme": 1, "Globex": 0}
            assert client.post("/v1/apps/monitor/ingest", json={"records": []}).status_code == 400  # empty
        from concurrent.futures import ThreadPoolExecutor

        def post(batch: int) -> int:
            records = [{"text": f"Acme note {batch}-{k}", "timestamp": START + 60 * k} for k in range(5)]
            with running.client() as client:
                return int(client.post("/v1/apps/monitor/ingest", json={"records": records}).json()["accepted"])

        with ThreadPoolExecutor(8) as pool:  # concurrent batches are numbered one after another
            assert sum(pool.map(post, range(8))) == 40
        assert watcher.store.counts()["records"] == 42
    finally:
        running.stop()


def test_the_dashboard_draws_the_series_and_alerts_in_chromium(tmp_path: Path) -> None:
    watcher = monitor(tmp_path)
    watcher.run(FileSource(write(tmp_path / "s.jsonl", fixture_stream(surges=(8 * 24 + 5,)))))
    windows = len(watcher.store.series("Acme"))
    running = start([], extensions=[MonitorApp(str(tmp_path / "monitor.sqlite"))])
    try:
        with running.client() as client:
            assert client.post("/v1/apps/monitor/ingest", json={"records": [{"text": "x", "timestamp": 1}]}
                               ).status_code == 400  # a database being looked at takes no records
        with browser_page(f"{running.url}/apps/monitor") as (page, errors):
            page.wait_for_function("document.querySelectorAll('#entities div').length == 2")
            page.wait_for_function("document.querySelector('#share path.series') !== null")
            assert page.locator("#entities div").first.get_attribute("data-entity") == "Acme"
            assert int(page.locator("#share path.series").get_attribute("data-count")) == windows
            assert page.locator("#volume rect.point").count() == windows
            assert page.locator("#volume line.alert-mark").count() == 1
            row = page.locator("#alerts tr").first.inner_text()
            assert "Acme" in row and "surge" in row and "awful" in row
            page.locator("#entities div").nth(1).click()
            page.wait_for_function("document.querySelector('#title').textContent.startsWith('Globex')")
            assert page.locator("#volume line.alert-mark").count() == 0
            page.screenshot(path=str(tmp_path / "dashboard.png"))
            assert errors == []
    finally:
        running.stop()
