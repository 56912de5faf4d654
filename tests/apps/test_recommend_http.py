"""`lmforge serve --app recommend REC`: routes behind the keys, errors for unknown ids, and the
page in headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.apps.recommend_http import RecommendApp
from tests.apps.test_recommend import catalogue, rec_dir  # noqa: F401  (module fixtures)
from tests.serve.conftest import Running, start
from tests.serve.test_playground import browser_page


@pytest.fixture(scope="module")
def rec_server(rec_dir: Path) -> Iterator[Running]:  # noqa: F811
    running = start([], extensions=[RecommendApp(rec_dir)])
    yield running
    running.stop()


def test_routes_need_a_key_and_answer(rec_server: Running) -> None:
    with rec_server.client(key=None) as anonymous:
        assert anonymous.get("/v1/apps/recommend/user/u3").status_code == 401
    with rec_server.client() as client:
        info = client.get("/v1/apps/recommend/info").json()
        assert info["items"] == 48
        answer = client.get("/v1/apps/recommend/user/u3", params={"n": 4}).json()
        assert len(answer["items"]) == 4 and answer["user"] == "u3"
        assert len(client.get("/v1/apps/recommend/similar/m0", params={"n": 3}).json()["items"]) == 3
        missing = client.get("/v1/apps/recommend/user/nobody")
        assert missing.status_code == 400 and "nobody" in missing.json()["error"]["message"]
        assert client.get("/v1/apps/recommend/user/u3", params={"n": 0}).status_code == 400


def test_recommend_page_in_chromium(rec_server: Running, tmp_path: Path) -> None:
    with browser_page(f"{rec_server.url}/apps/recommend", 1100, 700) as (page, errors):
        page.wait_for_function("document.querySelector('#meta').textContent.includes('48 items')")
        page.fill("#user", "u3")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('#items li').length == 10")
        assert page.locator("#history li").count() >= 1
        page.locator("#items li a").first.click()
        page.wait_for_function("document.querySelector('#right-title').textContent == 'Similar items'")
        assert page.locator("#items li").count() == 10 and errors == []
