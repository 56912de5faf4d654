"""`lmforge serve`: the HTTP service (app.py), its batching and generation engine, keys and metrics."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until_ready(url: str, timeout_s: float = 120.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll ``URL/ready`` until it answers 200 (a deployment's start-up check); raises
    TimeoutError after ``timeout_s``, or RuntimeError as soon as ``alive()`` says the server died."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server at {url} exited before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/ready did not answer 200 within {timeout_s:g} s")
