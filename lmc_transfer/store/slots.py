"""Checks of the GPU slot indices a ``CacheStore`` load or save is given (imports torch;
``store.base`` stays torch-free for the daemon)."""

from __future__ import annotations

import torch

from lmc_transfer.kernels import SlotRangeError


def check_saved_slots(slots: torch.Tensor, num_slots: int) -> None:
    """Raise ``SlotRangeError`` naming the first slot of a store outside ``[0, num_slots)``.

    A saved chunk must be whole: the kernels skip negative or out-of-range slots, which would
    commit the slab's old bytes for those rows. Reads the slots back (a device sync), so it
    runs where the store waits for its copy anyway.
    """
    bad = torch.nonzero((slots < 0) | (slots >= num_slots))
    if bad.numel():
        pos = int(bad[0, 0])
        raise SlotRangeError(f"slots[{pos}] = {int(slots[pos])} is outside the KV buffers' [0, {num_slots})")


def check_loaded_slots(slots: torch.Tensor, num_slots: int) -> None:
    """Raise ``SlotRangeError`` naming the first slot of a load past the buffers (negative
    slots are the engine's padding and were skipped on purpose)."""
    bad = torch.nonzero(slots >= num_slots)
    if bad.numel():
        pos = int(bad[0, 0])
        raise SlotRangeError(f"slots[{pos}] = {int(slots[pos])} is past the end of the KV buffers ({num_slots} slots)")
