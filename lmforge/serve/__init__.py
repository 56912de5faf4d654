"""`lmforge serve`: the HTTP service (app.py), its batching and generation engine, keys and metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


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


@contextlib.contextmanager
def serving(app: Any, timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields its URL once
    ``/ready`` says 200, and stops it on exit (benchmarks and screenshots)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout_s, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
