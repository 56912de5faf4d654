"""`lmforge serve --app support KB`: the routes behind the server's keys and metrics, sessions
over HTTP, and the support-chat page in headless Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.apps.support_http import SupportApp
from lmforge.cli import main
from tests.serve.conftest import Running, start
from tests.serve.test_playground import browser_page


@pytest.fixture(scope="module")
def support_server(kb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start([], extensions=[SupportApp(kb_dir, log_dir=tmp_path_factory.mktemp("support-logs"))])
    yield running
    running.stop()


def test_routes_need_a_key_and_keep_sessions(support_server: Running) -> None:
    with support_server.client(key=None) as anonymous:
        assert anonymous.post("/v1/apps/support/chat", json={"message": "hi"}).status_code == 401
        assert anonymous.get("/apps/support").status_code == 200  # the static page is open
    with support_server.client() as client:
        info = client.get("/v1/apps/support/info").json()
        assert info["entries"] == 20 and "permits" in info["categories"]
        first = client.post("/v1/apps/support/chat", json={"message": "How do I apply for a building permit?"}).json()
        follow = client.post("/v1/apps/support/chat", json={"message": "and how long does that take?",
                                                            "session_id": first["session_id"]}).json()
        assert (first["entry"]["id"], follow["entry"]["id"]) == ("permit-apply", "permit-time")
        assert follow["session_id"] == first["session_id"]
        alone = client.post("/v1/apps/support/ask", json={"question": "and how long does that take?",
                                                          "history": ["How much does a new kitchen cost?"]}).json()
        assert alone["entry"]["id"] == "kitchen-time"
        handed = client.post("/v1/apps/support/chat", json={"message": "What is the boiling point of mercury?"}).json()
        assert handed["handoff"]
        assert client.get("/v1/apps/support/handoffs").json()["data"][-1]["session_id"] == handed["session_id"]
        bad = client.post("/v1/apps/support/chat", json={"message": ""})
        assert bad.status_code == 400 and "message" in bad.json()["error"]["message"]
        assert client.post("/v1/apps/support/chat", json={"message": "x", "generate": True}).status_code == 400
        metrics = client.get("/metrics").text
        assert 'route="/v1/apps/support/chat"' in metrics


def test_serve_refuses_an_unknown_app(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--app", "shop", str(tmp_path)]) == 2
    assert "--app shop=" in capsys.readouterr().err


def test_support_page_chats_in_chromium(support_server: Running, tmp_path: Path) -> None:
    with browser_page(f"{support_server.url}/apps/support", 1000, 720) as (page, errors):
        page.wait_for_function("document.querySelector('#kb-meta').textContent.includes('20 FAQ entries')")
        for number, question in enumerate(["How do I apply for a building permit?", "and how long does that take?",
                                           "What is the boiling point of mercury?"], start=1):
            page.fill("#message", question)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('#log .turn.bot').length == {number} "
                                   "&& !document.querySelector('#send').disabled")
        bots = page.locator("#log .turn.bot")
        assert "ten weeks" in bots.nth(1).inner_text()
        assert "handoff" in (bots.nth(2).get_attribute("class") or "")
        assert "permits" in bots.nth(1).locator(".tag").inner_text()
        shot = Path(os.environ.get("LMFORGE_SUPPORT_SHOT", tmp_path / "support.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000 and errors == []
