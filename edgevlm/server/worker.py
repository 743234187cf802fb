"""The model worker: one thread that owns every model, fed by a bounded queue.

Requests are *serialised*, not batched.  Batch-1 decode on an edge CPU is memory-bandwidth
bound (every token streams all packed weights once) and our kernels already spread one
request's GEMV/GEMM over every core, so a second concurrent request would halve the speed of
both; batching decode steps would help throughput only with a paged, per-request KV cache,
which the runtime deliberately does not have (one preallocated cache = a fixed memory budget).
Serialising also makes the runtimes' single KV cache and the Q-TTA stream states race-free
without locks.

Contract, from the event loop's side: :meth:`Worker.submit` either enqueues at once or raises
an :class:`APIError` 503 with ``Retry-After`` (queue full or shutting down): there is never an
unbounded backlog.  The job's ``fn(job)`` runs later in the worker thread; what it returns or
raises, and anything it emits on the way (streamed text), arrives on the job's asyncio queue as
``("text", str)``, ``("done", result)`` or ``("error", exception)``.  Setting ``job.cancel``
makes a queued job be skipped and a running generation stop at its next token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError

__all__ = ["Cancelled", "Job", "ShuttingDown", "Worker"]

log = logging.getLogger("edgevlm.server")


class Cancelled(Exception):
    """The client went away before or during the job."""


class ShuttingDown(APIError):
    def __init__(self, what: str = "the server is shutting down") -> None:
        super().__init__(503, f"{what}; retry against another instance or after the restart",
                         code="shutting_down", headers={"Retry-After": "5"})


@dataclass(eq=False)
class Job:
    fn: Callable[[Job], Any]
    emit: Callable[[tuple[str, Any]], None]           # thread-safe: hands an event to the request
    route: str
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    stopped_by_shutdown: bool = False                  # cancel came from SIGTERM, not the client


class Worker:
    def __init__(self, capacity: int, on_wait: Callable[[float], None] | None = None,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.capacity = int(capacity)
        self._q: queue.Queue[Job] = queue.Queue(maxsize=self.capacity)
        self._lock = threading.Lock()          # makes "accepting? then enqueue" atomic against shutdown
        self._accepting = True
        self._stop = threading.Event()
        self._running: Job | None = None
        self._avg_s = 1.0                      # moving average of job time, for Retry-After
        self._on_wait = on_wait
        self._on_reject = on_reject
        self._thread = threading.Thread(target=self._loop, name="edgevlm-model-worker", daemon=True)

    # -- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def state(self) -> tuple[int, int, int]:
        """(waiting, capacity, running)."""
        return self._q.qsize(), self.capacity, int(self._running is not None)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the average job time times the jobs ahead."""
        waiting, _, running = self.state()
        return max(1, min(120, math.ceil(self._avg_s * max(1, waiting + running) / max(1, self.capacity))))

    def submit(self, fn: Callable[[Job], Any], route: str) -> tuple[Job, asyncio.Queue]:
        """Enqueue ``fn`` (call from the event loop).  Raises APIError 503 when full or stopping."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        job = Job(fn, emit, route)
        with self._lock:
            if not self._accepting:
                if self._on_reject:
                    self._on_reject("shutting_down")
                raise ShuttingDown()
            try:
                self._q.put_nowait(job)
            except queue.Full:
                if self._on_reject:
                    self._on_reject("queue_full")
                wait = self.retry_after()
                raise APIError(503, f"the model is busy: {self.capacity} request(s) already wait for it "
                                    f"(--max-queue {self.capacity}); retry after {wait} s",
                               code="queue_full", headers={"Retry-After": str(wait)}) from None
        return job, events

    # -- worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancel.is_set():  # the client left while the job waited
                job.emit(("error", ShuttingDown() if job.stopped_by_shutdown else Cancelled()))
                continue
            job.started = time.perf_counter()
            if self._on_wait:
                self._on_wait(job.started - job.enqueued)
            self._running = job
            try:
                job.emit(("done", job.fn(job)))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to its request
                job.emit(("error", e))
            finally:
                self._running = None
                self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - job.started)

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop accepting; fail every queued job with 503; let the running one finish for
        ``grace_s`` seconds, then cancel it (a generation stops at its next token).  Safe to
        call from any thread, more than once."""
        with self._lock:
            first = self._accepting
            self._accepting = False
        dropped = 0
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            job.stopped_by_shutdown = True
            job.cancel.set()
            job.emit(("error", ShuttingDown()))
            dropped += 1
        if first:
            log.info("shutdown: refusing new requests, %d queued request(s) answered 503, in-flight work has "
                     "%.0f s to finish", dropped, grace_s)
        running = self._running
        if running is None:
            return

        def cancel_late() -> None:
            if self._running is running and not running.cancel.is_set():
                log.info("shutdown: cancelling the in-flight %s request after %.0f s", running.route, grace_s)
                running.stopped_by_shutdown = True
                running.cancel.set()

        t = threading.Timer(grace_s, cancel_late)
        t.daemon = True
        t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """begin_shutdown(0) and join the thread (the running job stops at its next token)."""
        self.begin_shutdown(0.0)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
