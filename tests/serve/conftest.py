"""A real uvicorn server on 127.0.0.1 (a free port) around tiny models, per test module."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from lmforge.serve import wait_until_ready
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.auth import ApiKeys
from tests.deploy.conftest import task_runs  # noqa: F401  (shared fixture)
from tests.tasks.conftest import tiny_decoder_dir, tiny_encoder_dir  # noqa: F401  (shared fixtures)

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, models: list[str], settings: ServeSettings, keys: ApiKeys | None,
                 adapters: dict[str, str] | None = None, extensions: list | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(models, keys, settings, adapters, extensions)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until_ready(self.url, 120, alive=self.thread.is_alive)

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(models: list[str], settings: ServeSettings | None = None, keys: bool = True,
          adapters: dict[str, str] | None = None, extensions: list | None = None) -> Running:
    api_keys = ApiKeys({"alice": KEY, "bob": OTHER_KEY}) if keys else None
    return Running(models, settings or ServeSettings(), api_keys, adapters, extensions)


@pytest.fixture(scope="module")
def server(task_runs: dict, tiny_encoder_dir: Path, tiny_decoder_dir: Path) -> Iterator[Running]:  # noqa: F811
    running = start([f"sentiment={task_runs['classify'][0]}", f"tags={task_runs['ner'][0]}",
                     f"reader={task_runs['qa'][0]}", f"embedder={tiny_encoder_dir}", f"chat={tiny_decoder_dir}"])
    yield running
    running.stop()
