"""The copies behind ``CacheStore.load`` and ``CacheStore.save`` (IP and MP stores alike).

Both run on a private stream ordered after the caller's current stream, and are waited for by
their own events, never by a device-wide synchronize (which would also wait for the engine's
next forward pass):

- ``load``: queues the scatter, waits (on the CPU) for that copy's event only, then checks its
  slots; the caller re-checks the slab generations after it returns.
- ``save``: queues the gather and returns at once. Later work on the caller's stream is ordered
  after the copy (a GPU-side wait: the engine may reuse the slots as soon as ``save`` returned).
  The store's ``commit`` (or, for a slot outside the buffers, its ``abort`` and a warning) runs
  once the copy's event completed, on a completion thread; on CPU tensors at once, before
  ``save`` returns, and a bad slot raises there.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch

from lmc_transfer.kernels import Direction, SlotRangeError
from lmc_transfer.transfer.completion import CompletionThread, SlotCheck, blocking_event
from lmc_transfer.transfer.paths import Transfer

log = logging.getLogger(__name__)


class StoreCopies:
    """One store's loads and saves through ``transfer``; safe to share between threads."""

    def __init__(self, transfer: Transfer, name: str) -> None:
        self.transfer = transfer
        self._device = transfer.buffers.device
        on_cuda = self._device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self._device) if on_cuda else None
        self._commits = CompletionThread(f"{name}-commits") if on_cuda else None
        # The transfer's staging area and the private stream are not safe for concurrent use.
        self._lock = threading.Lock()

    def load(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], layers: range | None) -> None:
        """Scatter ``slabs`` into ``slots`` and return once that copy has landed; raises
        ``SlotRangeError`` for a slot past the buffers (negative slots are skipped padding)."""
        with self._lock:
            prepared = self.transfer.prepare(slots, slabs)
            stream = self._ordered_stream()
            self.transfer.run(prepared, Direction.SCATTER, layers=layers, stream=stream)
            check = SlotCheck(prepared.plan.slots, self.transfer.buffers.num_slots, padding_ok=True, stream=stream)
            done = blocking_event(stream) if stream is not None else None
        if done is not None:
            done.synchronize()
        check.raise_if_bad()

    def save(self, slots: torch.Tensor, slabs: Sequence[torch.Tensor], *, commit: Callable[[], int],
             abort: Callable[[], None], queued: int) -> int:
        """Gather ``slots`` into ``slabs``, then ``commit()``. On CPU returns what ``commit`` returned
        (a bad slot: ``abort()``, then ``SlotRangeError``); on CUDA returns ``queued`` at once."""
        with self._lock:
            prepared = self.transfer.prepare(slots, slabs)
            stream = self._ordered_stream()
            self.transfer.run(prepared, Direction.GATHER, stream=stream)
            check = SlotCheck(prepared.plan.slots, self.transfer.buffers.num_slots, padding_ok=False, stream=stream)
            if stream is None or self._commits is None:
                error = _slot_error(check)
                if error is not None:
                    abort()
                    raise error
                return commit()
            done = blocking_event(stream)
            torch.cuda.current_stream(self._device).wait_event(done)

        def settle() -> None:
            error = _slot_error(check)
            if error is None:
                commit()
                return
            abort()
            log.warning("store of %d chunks dropped: %s", queued, error)

        self._commits.put(done, settle)
        return queued

    def pending_saves(self) -> int:
        return self._commits.pending() if self._commits is not None else 0

    def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued save has settled; True when none is left."""
        return self._commits.drain(timeout_s) if self._commits is not None else True

    def close(self, timeout_s: float) -> bool:
        """Settle what is queued (bounded) and stop the completion thread."""
        return self._commits.close(timeout_s) if self._commits is not None else True

    def _ordered_stream(self) -> torch.cuda.Stream | None:
        """The private stream, after the caller's: the slots' earlier readers and writers, and a
        slot conversion queued by ``prepare``, come first."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        return self._stream


def _slot_error(check: SlotCheck) -> SlotRangeError | None:
    try:
        check.raise_if_bad()
    except SlotRangeError as exc:
        return exc
    return None
