"""`lmforge serve --ray`: the same app as a Ray Serve deployment that scales its replicas.

Each replica is a Ray actor that builds the app from the command's ``AppSpec`` (its lifespan
loads and warms every model, so a replica takes traffic only once ready) and answers through
Ray's HTTP proxy on the given host and port. Ray Serve's autoscaler adds a replica when the
requests in flight per replica stay above ``target_ongoing_requests`` for ``upscale_delay_s``,
and removes one when they stay below for ``downscale_delay_s``. A replica that is being
removed stops receiving requests and finishes those it holds (``drain_timeout_s``).

Without ``address`` a local Ray instance is started on this machine (its CPUs are the pool);
with ``address="auto"`` or ``ray://HEAD:10001`` the deployment joins an existing cluster, whose
nodes need lmforge installed and the model folders at the same paths (docs/serving.md).
Each replica keeps its own ``/metrics``; for the deployment as a whole, Ray exports
``ray_serve_*`` request, latency and replica metrics to Prometheus.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from lmforge.serve.launch import AppSpec

APP_NAME = "lmforge"
DEPLOYMENT = "lmforge"


@dataclass
class Scaling:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 64  # per replica; lmforge's own queues answer 429 before this
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 5.0
    cpus_per_replica: float = 1.0
    drain_timeout_s: float = 30.0

    def check(self) -> None:
        from lmforge.errors import LmforgeError

        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise LmforgeError(f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: need "
                               "0 <= min <= max and max >= 1")
        if self.target_ongoing_requests <= 0 or self.cpus_per_replica <= 0:
            raise LmforgeError("--target-ongoing-requests and --cpus-per-replica must be positive")

    def autoscaling_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas, "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.metrics_interval_s, "look_back_period_s": self.look_back_period_s}


class Replica:
    """One replica: Ray Serve calls ``__serve_build_asgi_app__`` on the replica, after this
    constructor, and runs the app's lifespan (model loading) before routing to it."""

    def __init__(self, spec: AppSpec, threads: int = 1) -> None:
        import torch

        self.spec = spec
        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, not the whole node's

    def __serve_build_asgi_app__(self) -> Any:
        import logging

        logging.getLogger("lmforge.access").setLevel(logging.WARNING)  # Ray logs each request itself
        return self.spec.build()


def application(spec: AppSpec, scaling: Scaling) -> Any:
    """The bound Ray Serve application (``serve.run`` takes it)."""
    from ray import serve

    scaling.check()
    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(
        ingress, name=DEPLOYMENT, autoscaling_config=scaling.autoscaling_config(),
        max_ongoing_requests=scaling.max_ongoing_requests, graceful_shutdown_timeout_s=scaling.drain_timeout_s,
        ray_actor_options={"num_cpus": scaling.cpus_per_replica})
    return deployment.bind(spec, max(1, int(scaling.cpus_per_replica)))


def start(spec: AppSpec, scaling: Scaling, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          start_timeout_s: float = 600.0) -> str:
    """Start (or join) Ray, deploy, and wait until the first replicas are ready; the URL."""
    import ray
    from ray import serve

    scaling.check()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 configure_logging=True)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(application(spec, scaling), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + start_timeout_s
    while status() != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray Serve application was not running within {start_timeout_s:g} s")
        time.sleep(0.5)
    return f"http://{host}:{port}"


def status() -> str:
    """The application's state: DEPLOYING, RUNNING, DEPLOY_FAILED, ..."""
    from ray import serve

    application = serve.status().applications.get(APP_NAME)
    if application is None:
        return "NOT_STARTED"
    state = getattr(application.status, "value", application.status)
    if state == "DEPLOY_FAILED":
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"the Ray Serve deployment failed: {application.message}")
    return str(state)


def replicas() -> int:
    """Replicas running now."""
    from ray import serve

    application = serve.status().applications.get(APP_NAME)
    if application is None:
        return 0
    deployment = application.deployments.get(DEPLOYMENT)
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0


def stop() -> None:
    """Drain and remove the deployment, then leave Ray."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run_on_ray(spec: AppSpec, scaling: Scaling, host: str, port: int, address: str | None) -> None:
    """`lmforge serve --ray`: deploy, report replica changes, and on SIGINT/SIGTERM drain and stop."""
    url = start(spec, scaling, host, port, address)
    print(f"lmforge serve: on Ray Serve at {url} ({scaling.min_replicas}-{scaling.max_replicas} replicas, "
          f"target {scaling.target_ongoing_requests:g} requests in flight each)", flush=True)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    seen = -1
    try:
        while not stopping.wait(2.0):
            count = replicas()
            if count != seen:
                print(f"lmforge serve: {count} replica{'s' if count != 1 else ''} running", flush=True)
                seen = count
    finally:
        print("lmforge serve: draining and stopping", flush=True)
        stop()
