"""One thread for every model call of a serving process.

Loading, warm-up, encoder batches, each decode step of every generator and the applications'
blocking calls all run, one at a time, on this thread; the event loop and the request threads
never touch a tensor. On a CPU that is what makes the calls fast, not only orderly: each thread
that runs torch keeps its own OpenMP worker pool, and once the process holds more pool threads
than cores, OpenMP stops spinning between parallel regions, so each of a forward pass's
hundreds of small regions waits for sleeping workers to wake. Measured on a 2-core machine:
a SmolLM2-135M decode step took 47 ms from a second thread against 28 ms from a single one.

Work queues first come, first served, and a generator puts its next decode step at the back of
the queue after each step, so encoder batches and other streams' steps interleave with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._loop, name="lmforge-compute", daemon=True)
        self._thread.start()

    def here(self) -> bool:
        """True on the compute thread itself (a call from there runs at once: no deadlock)."""
        return threading.current_thread() is self._thread

    def submit(self, function: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self.here():
            _settle(future, function, args)
        else:
            self._queue.put((function, args, future))
        return future

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the compute thread, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(function, *args))

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the compute thread, waited for from any thread."""
        return self.submit(function, *args).result()

    def _loop(self) -> None:
        while True:
            function, args, future = self._queue.get()
            if future.set_running_or_notify_cancel():
                _settle(future, function, args)


def _settle(future: concurrent.futures.Future[Any], function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        future.set_result(function(*args))
    except BaseException as error:  # noqa: BLE001 - handed to whoever waits
        future.set_exception(error)


_compute: ComputeThread | None = None
_lock = threading.Lock()


def compute() -> ComputeThread:
    """The process's compute thread (started on first use)."""
    global _compute
    with _lock:
        if _compute is None:
            _compute = ComputeThread()
        return _compute
