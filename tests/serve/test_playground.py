"""The playground page in headless Chromium: it lists the models with a typed key, streams a
chat reply and shows a classifier's probabilities."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import KEY, Running


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Debian's chromium is not installed; `make setup` installs it as root (apt-get install chromium)")
    pytest.skip("no chromium here (apt-get install chromium); CI installs it and runs this test")


@contextlib.contextmanager
def browser_page(url: str, width: int = 1280, height: int = 760) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page at ``url`` with the API key typed in, and the page's script
    errors (a test asserts there are none)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        yield page, errors
        browser.close()


def test_playground_chats_and_classifies_in_chromium(server: Running, tmp_path: Path) -> None:
    with browser_page(server.url) as (page, errors):
        page.wait_for_function("document.querySelectorAll('#chat-model option').length > 0")
        assert page.locator("#chat-model option").all_inner_texts() == ["chat"]
        page.fill("#prompt", "reverse: anna boris")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('#log .turn').length == 2 && !document.querySelector('#send').disabled")
        reply = page.locator("#log .turn span").nth(1)
        assert "error" not in (reply.get_attribute("class") or "")
        assert page.locator("#chat-meta").inner_text().endswith("ms")
        page.fill("#text", "the film was lovely")
        page.click("#run")
        page.wait_for_function("document.querySelectorAll('#result tr').length == 2")
        cells = page.locator("#result tr td:first-child").all_inner_texts()
        assert sorted(c.split()[0] for c in cells) == ["neg", "pos"] and any("\u2714" in c for c in cells)
        shot = Path(os.environ.get("LMFORGE_PLAYGROUND_SHOT", tmp_path / "playground.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert errors == []
