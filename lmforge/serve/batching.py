"""Dynamic batching for encoder requests: requests that arrive within a few milliseconds of
each other share one model call, within a size and token budget.

A bounded queue makes overload an immediate answer (``Overloaded``: HTTP 429 with
Retry-After) instead of a growing wait. The model runs on the process's compute thread (torch
releases the GIL), so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.serve.compute import compute
from lmforge.serve.metrics import ServerMetrics


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


@dataclass
class _Job:
    items: list[Any]
    tokens: int
    future: asyncio.Future[list[Any]]
    arrived: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """``submit(items)`` returns ``run(items)`` for those items, computed in a shared batch."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], name: str, metrics: ServerMetrics,
                 max_batch: int = 32, max_tokens: int = 16384, max_wait_ms: float = 5.0, max_queue: int = 256) -> None:
        self.run, self.name, self.metrics = run, name, metrics
        self.max_batch, self.max_tokens, self.max_wait = max_batch, max_tokens, max_wait_ms / 1000
        self.max_queue = max_queue
        self.waiting = 0  # items queued, not yet running
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit(self, items: list[Any], tokens: int) -> list[Any]:
        assert self._queue is not None, "start() the batcher first"
        if self.waiting + len(items) > self.max_queue:
            raise Overloaded(retry_after=1)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting += len(items)
        self.metrics.queue_depth.labels(self.name).set(self.waiting)
        self._queue.put_nowait(_Job(items, tokens, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        carried: _Job | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            jobs, count, tokens = [first], len(first.items), first.tokens
            deadline = time.perf_counter() + self.max_wait
            while count < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                        self._queue.get(), remaining)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if count + len(job.items) > self.max_batch or tokens + job.tokens > self.max_tokens:
                    carried = job  # starts the next batch
                    break
                jobs.append(job)
                count, tokens = count + len(job.items), tokens + job.tokens
            await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        self.waiting -= len(items)
        self.metrics.queue_depth.labels(self.name).set(self.waiting)
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_seconds.labels(self.name).observe(started - job.arrived)
        self.metrics.batch_size.labels(self.name).observe(len(items))
        try:
            results = await compute().run(self.run, items)
        except Exception as error:  # noqa: BLE001 - handed to each waiting request
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            if not job.future.done():  # a request that timed out has gone
                job.future.set_result(results[start:start + len(job.items)])
            start += len(job.items)
