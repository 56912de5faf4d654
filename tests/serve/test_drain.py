"""SIGTERM during load: the server stops accepting, finishes every accepted request, exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from lmforge.serve import wait_until_ready
from tests.serve.conftest import KEY, free_port


def test_sigterm_during_load_loses_no_accepted_request(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# test keys\nalice {KEY}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", f"chat={tiny_decoder_dir}", "--port", str(port),
         "--api-keys", str(keys), "--drain-timeout", "30", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "LMFORGE_TCMALLOC": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 120, alive=lambda: process.poll() is None)
        results: list[int | str] = []
        finished: list[float] = []
        generating = [threading.Event() for _ in range(6)]
        body = {"messages": [{"role": "user", "content": "reverse: anna boris chen"}], "max_tokens": 200,
                "temperature": 0, "stream": True}

        def ask(index: int) -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {KEY}"}) as response:
                    done = False
                    for line in response.iter_lines():
                        generating[index].set()  # accepted: its first event has come
                        done = done or line == "data: [DONE]"
                    results.append(response.status_code if done else "unfinished")
                    finished.append(time.monotonic())
            except httpx.HTTPError as error:
                results.append(type(error).__name__)
            finally:
                generating[index].set()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for event in generating:  # every request accepted and streaming (not a fixed sleep: CI speeds vary)
            assert event.wait(timeout=60)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread in threads:
            thread.join(timeout=90)
        assert results == [200] * 6, results
        assert max(finished) > signalled  # some were still generating when the signal came: drained
        # uvicorn re-raises the signal once drained, so the exit status is that of SIGTERM
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        output = process.stdout.read().decode() if process.stdout else ""
        assert "Traceback" not in output, output
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError("still accepting after the drain")
        except httpx.HTTPError:
            pass
    finally:
        if process.poll() is None:
            process.kill()
