"""The slot contract of ``CacheStore.load``/``save`` (see ``store.base``), enforced here for
both stores and the layerwise scheduler. Imports torch; ``store.base`` stays torch-free."""

from __future__ import annotations

import torch

from lmc_transfer.kernels import SlotRangeError
from lmc_transfer.store.base import Lease, Reservation

#: Index dtypes the kernels take as they are (SGLang's req_to_token is int32, its allocator int64).
SLOT_DTYPES = (torch.int32, torch.int64)


def check_slot_tensor(slots: torch.Tensor, needed: int, what: str, device: torch.device) -> None:
    """Raise unless ``slots`` is a 1-D int32/int64 tensor on ``device`` with at least ``needed``
    entries (``what`` says where ``needed`` comes from, for the message)."""
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots: expected a torch.Tensor of slot indices, got {type(slots).__name__}")
    if slots.dtype not in SLOT_DTYPES:
        raise TypeError(f"slots: expected dtype torch.int32 or torch.int64, got {slots.dtype}")
    if slots.dim() != 1 or slots.numel() < needed:
        raise ValueError(f"slots: expected a 1-D tensor of at least {needed} slot indices ({what}), got shape {tuple(slots.shape)}")
    if slots.device != device:
        raise ValueError(f"slots: expected device {device} like the KV buffers, got {slots.device}")


def lease_slots(lease: Lease, slots: torch.Tensor, chunk_size: int, device: torch.device) -> torch.Tensor:
    """The slots a load of ``lease`` fills: the first ``lease.num_chunks * chunk_size``."""
    needed = lease.num_chunks * chunk_size
    check_slot_tensor(slots, needed, f"{lease.num_chunks} chunks of {chunk_size}", device)
    return slots[:needed]


def chunk_slots(reservation: Reservation, slots: torch.Tensor, chunk_size: int, device: torch.device) -> torch.Tensor:
    """The rows of ``slots`` (one per token of every key passed to reserve) that belong to
    the reserved chunks, in reservation order: one transfer fills all reserved slabs."""
    check_slot_tensor(slots, len(reservation.keys) * chunk_size, f"{len(reservation.keys)} keys of {chunk_size}", device)
    idx = reservation.chunk_indices
    if not idx:
        return slots[:0]
    if idx[-1] - idx[0] + 1 == len(idx):  # one contiguous run: a view, no copy
        return slots[idx[0] * chunk_size : (idx[-1] + 1) * chunk_size]
    rows = torch.tensor(idx, dtype=torch.int64).unsqueeze(1) * chunk_size + torch.arange(chunk_size)
    return slots[rows.reshape(-1).to(slots.device)]


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
