"""A thread that runs the daemon's slow tier I/O (disk reads, remote fetches) off its request loop.

The request loop hands over a ``Deferred`` (the slow ``work`` and a ``finish`` that turns its
result into the reply body) and keeps serving other clients; it collects finished jobs with
``drain()`` and replies to them. ZMQ sockets stay on the loop's thread: this thread never
touches them. One thread serialises promotions, so two lookups never fetch the same chunk.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Deferred:
    """A reply that needs slow I/O first: ``finish(work())`` is its body (a messages.Body)."""

    work: Callable[[], Any]
    finish: Callable[[Any], Any]


@dataclass
class FinishedJob:
    """A deferred job back from the thread: its ``result``, or the ``error`` ``work`` raised."""

    ticket: Any  # whatever the submitter needs to reply (routing identity, request)
    deferred: Deferred
    result: Any = None
    error: BaseException | None = None


class Promoter:
    """One worker thread with a job queue in and a finished queue out."""

    def __init__(self, name: str = "lmct-promoter") -> None:
        self._jobs: queue.Queue[tuple[Any, Deferred] | None] = queue.Queue()
        self._finished: queue.Queue[FinishedJob] = queue.Queue()
        self._pending = 0  # submitted, not yet drained (touched by the submitting thread only)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def stopping(self) -> threading.Event:
        """Set once ``close`` began: long jobs check it between steps and stop early."""
        return self._stopping

    def submit(self, ticket: Any, deferred: Deferred) -> None:
        if self._stopping.is_set():
            raise RuntimeError("submit: the promoter is closed")
        self._pending += 1
        self._jobs.put((ticket, deferred))

    def drain(self) -> list[FinishedJob]:
        """Every job finished since the last call (never blocks)."""
        if not self._pending:  # the request loop calls this after every request: no queue lock then
            return []
        done = []
        while True:
            try:
                done.append(self._finished.get_nowait())
            except queue.Empty:
                break
        self._pending -= len(done)
        return done

    def close(self, timeout_s: float) -> bool:
        """Stop after the job in progress (queued ones are dropped); False if it outlived ``timeout_s``."""
        self._stopping.set()
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            ticket, deferred = item
            job = FinishedJob(ticket, deferred)
            try:
                job.result = deferred.work()
            except BaseException as exc:  # handed back: the loop turns it into an error reply
                job.error = exc
            self._finished.put(job)
