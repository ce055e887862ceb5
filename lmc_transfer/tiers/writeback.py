"""The tiers' write-behind: one bounded queue and one thread that writes what was submitted.

``submit`` never blocks: it runs under the pool lock (as a commit hook), so a full queue drops
the item and counts it. The thread calls ``write(item)`` for each item in order; an exception
counts the item as failed and the thread goes on (a full disk or a dead server must not stop
it). Both failure modes are logged at WARNING once per state change (the first drop or failure,
then the first success after them), never once per item. An optional ``tick`` runs after every
item and whenever the queue stayed empty as long as the last tick asked; the disk tier fsyncs
from it. ``close`` stops the thread with a bounded join.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()  # close's last item
_TIMED_OUT = object()


@dataclass(frozen=True)
class WriteBehindStats:
    submitted: int  # items accepted into the queue
    dropped: int  # items refused (queue full or closed) or dropped unwritten by close
    written: int  # items whose write returned
    failed: int  # items whose write raised
    pending: int  # accepted and not finished yet


class WriteBehind(Generic[T]):
    """``write(item)`` on a thread of its own for each submitted item (module docstring).

    ``tick()`` returns how many seconds until it wants to run again, or None to wait for the next
    item; ``name`` appears in the thread name and in every log line.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[T], None],
        *,
        max_items: int,
        tick: Callable[[], float | None] | None = None,
    ) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items: expected an int >= 1, got {max_items!r}")
        self.name = name
        self._write = write
        self._tick = tick
        self._max_items = max_items
        # Unbounded underneath: the bound is checked in submit, so close can always enqueue _STOP.
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._submitted = self._dropped = self._written = self._failed = self._pending = 0
        self._dropping = False  # state changes are logged, not every drop
        self._failing = False
        self._tick_failing = False  # touched by the thread only
        self._drops_in_a_row = self._failures_in_a_row = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"lmct-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Queue ``item``; False (counted) when the queue is full or closed. Never blocks."""
        with self._lock:
            if self._closed:
                self._dropped += 1
                return False
            if self._pending >= self._max_items:
                self._dropped += 1
                self._drops_in_a_row += 1
                if not self._dropping:
                    self._dropping = True
                    log.warning("%s: write-behind queue full (%d items); dropping writes until it drains",
                                self.name, self._max_items)
                return False
            if self._dropping:
                self._dropping = False
                log.warning("%s: write-behind queue accepts writes again (%d dropped while full)",
                            self.name, self._drops_in_a_row)
                self._drops_in_a_row = 0
            self._pending += 1
            self._submitted += 1
            self._queue.put(item)
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until every accepted item finished; False if some had not after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float, *, drop_queued: bool = False) -> bool:
        """Stop accepting, write what is queued (or drop it, counted) and join the thread for at most
        ``timeout_s``; False (logged) if it was still busy then. Idempotent."""
        with self._lock:
            already = self._closed
            self._closed = True
            if drop_queued and not already:
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._dropped += 1
                    self._pending -= 1
                self._idle.notify_all()
        if not already:
            self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s: write-behind still busy after %.1fs at close; abandoning %d pending writes",
                        self.name, timeout_s, self._pending)
            return False
        return True

    def stats(self) -> WriteBehindStats:
        with self._lock:
            return WriteBehindStats(self._submitted, self._dropped, self._written, self._failed, self._pending)

    def _run(self) -> None:
        wait_s: float | None = None
        while True:
            try:
                item = self._queue.get(timeout=wait_s)
            except queue.Empty:
                item = _TIMED_OUT
            if item is _STOP:
                return
            if item is not _TIMED_OUT:
                self._write_one(item)  # type: ignore[arg-type]
            if self._tick is not None:
                wait_s = self._run_tick()

    def _write_one(self, item: T) -> None:
        try:
            self._write(item)
        except Exception as exc:
            with self._idle:
                self._failed += 1
                self._failures_in_a_row += 1
                first = not self._failing
                self._failing = True
                self._finish_locked()
            if first:
                log.warning("%s: write failed (%s: %s); further failures are counted, not logged, until one succeeds",
                            self.name, type(exc).__name__, exc)
            return
        with self._idle:
            self._written += 1
            recovered = self._failures_in_a_row if self._failing else 0
            self._failing = False
            self._failures_in_a_row = 0
            self._finish_locked()
        if recovered:
            log.warning("%s: writes succeed again (%d failed meanwhile)", self.name, recovered)

    def _finish_locked(self) -> None:
        self._pending -= 1
        if not self._pending:
            self._idle.notify_all()

    def _run_tick(self) -> float | None:
        assert self._tick is not None
        try:
            wait_s = self._tick()
        except Exception as exc:
            if not self._tick_failing:
                log.warning("%s: write-behind tick failed (%s: %s); not logged again until one succeeds",
                            self.name, type(exc).__name__, exc)
            self._tick_failing = True
            return None
        self._tick_failing = False
        return None if wait_s is None else max(0.0, wait_s)
