"""Screenshots of the applications' pages for the docs: an app served on a free 127.0.0.1
port, opened in Debian's headless Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def page_of(extension: Any, path: str, width: int = 1100, height: int = 700) -> Iterator[Any]:
    """A Chromium page at ``path`` of a server holding ``extension`` (no keys)."""
    from playwright.sync_api import sync_playwright

    from lmforge.serve import serving
    from lmforge.serve.app import ServeSettings, create_app

    app = create_app([], None, ServeSettings(), None, [extension])
    with serving(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"{url}{path}")
        try:
            yield page
        finally:
            browser.close()
