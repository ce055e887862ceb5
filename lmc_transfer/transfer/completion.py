"""What runs once a queued copy has finished, without the caller waiting for the GPU.

``SlotCheck``: whether every slot of a transfer is inside the buffers, computed on the GPU beside
the copy and read back through pinned memory once its own event completed (no sync with the
engine's streams, unlike reading the kernel's error flag with ``.item()``).

``CompletionThread``: runs a callback (a commit) after a CUDA event completes, on a thread of its
own that sleeps in ``cudaEventSynchronize`` (blocking-sync events), in the order queued.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import torch

from lmc_transfer.store.slots import check_loaded_slots, check_saved_slots

log = logging.getLogger(__name__)


def blocking_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``stream`` that a waiting thread sleeps on instead of spinning."""
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


class SlotCheck:
    """Whether every slot of a transfer is usable: in ``[0, num_slots)`` for a store (a saved chunk
    must be whole: the kernels skip bad slots, which would commit the slab's old bytes for those
    rows), below ``num_slots`` for a load (``padding_ok``: negative slots are skipped on purpose).

    Queued on ``stream`` (default: the current one) where the slots are on CUDA; computed at once
    on CPU.
    """

    def __init__(self, slots: torch.Tensor, num_slots: int, *, padding_ok: bool,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.slots, self.num_slots, self.padding_ok = slots, num_slots, padding_ok
        self._event: torch.cuda.Event | None = None
        if slots.device.type != "cuda":
            self._bad = self._compute()
            return
        stream = stream if stream is not None else torch.cuda.current_stream(slots.device)
        with torch.cuda.stream(stream):
            bad = self._compute()
            self._bad = torch.empty(1, dtype=torch.bool, pin_memory=True)
            self._bad.copy_(bad, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def _compute(self) -> torch.Tensor:
        bad = self.slots >= self.num_slots
        if not self.padding_ok:
            bad |= self.slots < 0
        return bad.any().view(1)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def raise_if_bad(self) -> None:
        """Raise ``SlotRangeError`` naming the first bad slot; waits for the check itself only (the
        naming reads the slots back, on the error path only)."""
        if self._event is not None:
            self._event.synchronize()
        if bool(self._bad[0]):
            (check_loaded_slots if self.padding_ok else check_saved_slots)(self.slots, self.num_slots)


class CompletionThread:
    """Runs callbacks after their CUDA events completed, in order, off the caller's thread.

    Started on the first ``put``; ``drain`` waits (bounded) until everything queued has run;
    ``close`` drains and stops the thread. A callback that raises is logged, never re-raised.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: collections.deque[tuple[torch.cuda.Event, Callable[[], None]]] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0  # callbacks taken off the queue and not finished
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, event: torch.cuda.Event, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self._name}: closed")
            self._queue.append((event, callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._running

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued callback has run; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float) -> bool:
        """Drain (bounded), then stop the thread; True if nothing was left behind."""
        drained = self.drain(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=max(0.0, timeout_s))
        return drained

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                event, callback = self._queue.popleft()
                self._running += 1
            try:
                event.synchronize()
                callback()
            except Exception:  # noqa: BLE001 - a failed commit is a dropped store, logged
                log.warning("%s: a callback after a copy failed", self._name, exc_info=True)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
