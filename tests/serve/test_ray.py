"""`lmforge serve --ray`: the app on a local Ray Serve instance scales 1 -> 2 -> 1 replicas
under a bounded load, and no request fails; the spec that replicas build from is checked."""

from __future__ import annotations

import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from lmforge.errors import LmforgeError
from lmforge.serve.app import ServeSettings
from lmforge.serve.auth import ApiKeys
from lmforge.serve.launch import AppSpec
from lmforge.serve.ray_serve import Scaling
from tests.serve.conftest import KEY, free_port
from tests.tasks.conftest import tiny_encoder_dir  # noqa: F401  (shared fixture)


def test_the_spec_fixes_paths_checks_values_and_survives_pickling(tiny_encoder_dir: Path,  # noqa: F811
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_encoder_dir.parent)
    keys = ApiKeys({"alice": KEY})
    spec = AppSpec.from_command([f"emb={tiny_encoder_dir.name}"], None, ["support", "kb"], None, keys,
                                ServeSettings(max_queue=7))
    assert spec.models == [f"emb={tiny_encoder_dir}"]  # absolute: a replica starts elsewhere
    assert spec.apps == ["support=kb"]  # not a path here: left as given
    copy = pickle.loads(pickle.dumps(spec))  # Ray ships the spec to each replica
    assert copy.keys is not None and copy.keys.check(KEY) == "alice" and copy.keys.check("x" * 20) is None
    assert copy.settings.max_queue == 7
    with pytest.raises(LmforgeError, match="--adapters lora: expected NAME=DIR"):
        AppSpec.from_command(["m"], ["lora"], None, None, None, ServeSettings())
    with pytest.raises(LmforgeError, match="--app chat=x"):
        AppSpec.from_command(["m"], None, ["chat=x"], None, None, ServeSettings())
    with pytest.raises(LmforgeError, match="nothing to serve"):
        AppSpec.from_command(None, None, None, None, None, ServeSettings())
    with pytest.raises(LmforgeError, match="--min-replicas 3 and --max-replicas 2"):
        Scaling(min_replicas=3, max_replicas=2).check()


@pytest.mark.slow
def test_replicas_scale_up_under_load_and_back_down_with_no_failed_request(tiny_encoder_dir: Path) -> None:  # noqa: F811
    from lmforge.serve import ray_serve

    spec = AppSpec.from_command([f"emb={tiny_encoder_dir}"], None, None, None, ApiKeys({"alice": KEY}),
                                ServeSettings())
    scaling = Scaling(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                      downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2, drain_timeout_s=10)
    url = ray_serve.start(spec, scaling, "127.0.0.1", free_port(), start_timeout_s=180)
    statuses: Counter[int] = Counter()
    try:
        assert ray_serve.replicas() == 1
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "hi"}).status_code == 401  # keys hold on Ray
        assert httpx.get(f"{url}/ready").status_code == 200

        def load(stop: threading.Event) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                while not stop.is_set():
                    response = client.post("/v1/embeddings", json={"input": ["a short text to embed"] * 8})
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        assert len(response.json()["data"]) == 8

        def watch(wanted: int, clients: int, limit_s: float) -> bool:
            stop = threading.Event()
            threads = [threading.Thread(target=load, args=(stop,)) for _ in range(clients)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + limit_s
            try:
                while time.monotonic() < deadline:
                    if ray_serve.replicas() == wanted:
                        return True
                    time.sleep(0.5)
                return False
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)

        assert watch(2, clients=8, limit_s=90), "8 clients did not bring a second replica within 90 s"
        # One client keeps calling while the autoscaler drains and removes the extra replica.
        assert watch(1, clients=1, limit_s=60), "the second replica was not removed within 60 s of a light load"
    finally:
        ray_serve.stop()
    assert statuses[200] > 50 and set(statuses) == {200}, statuses
