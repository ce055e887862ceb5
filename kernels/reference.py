"""Torch reference of the gather/scatter contract: the kernels must match it byte for byte.

Token ``i`` of a transfer lives in slab ``(token_offset + i) // chunk_size`` at row
``(token_offset + i) % chunk_size``; inside a slab, layer ``l`` starts at
``(l - slab_first_layer) * layer_bytes`` and holds plane 0's rows, then plane 1's.
Negative slots are skipped; slots past the buffer are skipped and reported.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import KVBuffers


def _chunk_runs(num_tokens: int, token_offset: int, chunk_size: int) -> list[tuple[int, int, int, int]]:
    """(slab index, first row in slab, first token, token count) for each slab touched."""
    runs = []
    token = 0
    while token < num_tokens:
        pos = token_offset + token
        chunk, row = divmod(pos, chunk_size)
        count = min(chunk_size - row, num_tokens - token)
        runs.append((chunk, row, token, count))
        token += count
    return runs


def reference_copy(
    buffers: KVBuffers,
    slots: torch.Tensor,
    slabs: Sequence[torch.Tensor],
    *,
    chunk_size: int,
    token_offset: int,
    layers: range,
    slab_first_layer: int,
    gather: bool,
) -> int:
    """Copy like the kernels do; returns the number of out-of-range slots skipped."""
    geometry = buffers.geometry
    slots_cpu = slots.to("cpu", torch.int64)
    in_range = (slots_cpu >= 0) & (slots_cpu < buffers.num_slots)
    bad = int(((slots_cpu >= buffers.num_slots)).sum())
    layer_bytes = geometry.layer_bytes(chunk_size)
    for chunk, row, token, count in _chunk_runs(slots_cpu.numel(), token_offset, chunk_size):
        keep = in_range[token : token + count]
        if not bool(keep.any()):
            continue
        rows = torch.arange(row, row + count)[keep]
        src_slots = slots_cpu[token : token + count][keep]
        slab = slabs[chunk]
        for layer in layers:
            layer_base = (layer - slab_first_layer) * layer_bytes
            for plane, row_bytes in enumerate(geometry.plane_row_bytes):
                base = layer_base + geometry.plane_offset(plane, chunk_size)
                slab_rows = slab[base : base + chunk_size * row_bytes].view(chunk_size, row_bytes)
                kv_rows = buffers.plane_rows(layer, plane)
                dev_slots = src_slots.to(kv_rows.device)
                if gather:
                    slab_rows[rows.to(slab_rows.device)] = kv_rows[dev_slots].to(slab_rows.device)
                else:
                    kv_rows[dev_slots] = slab_rows[rows.to(slab_rows.device)].to(kv_rows.device)
    return bad
