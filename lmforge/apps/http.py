"""What the applications' server extensions share: their page, and a 503 while loading."""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

T = TypeVar("T")


def add_page(app: FastAPI, path: str, html: str) -> None:
    """A static page (it holds no data; the key is typed into it) at ``path``."""

    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    app.add_api_route(path, page, methods=["GET"], include_in_schema=False)


def loaded(value: T | None, what: str) -> T:
    """``value`` once loaded; before that a 503 with Retry-After."""
    from lmforge.serve.app import ApiError

    if value is None:
        raise ApiError(503, f"the {what} is still loading", "unavailable", {"Retry-After": "1"})
    return value


