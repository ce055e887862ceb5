"""Builders for engine KV buffers and slabs filled with random bytes."""

from __future__ import annotations

import torch

from lmc_transfer.kernels import KVBuffers, LayoutKind

LAYOUTS = [LayoutKind.TOKEN_SLOT, LayoutKind.MLA, LayoutKind.PAGED_BLOCKS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8]


def random_like_bytes(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """A tensor whose bytes are uniformly random (NaN patterns included: tests compare bytes)."""
    elem = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * elem,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def make_buffers(
    kind: LayoutKind,
    dtype: torch.dtype,
    *,
    num_layers: int,
    num_slots: int,
    device: str,
    gen: torch.Generator,
    heads: int = 2,
    head_dim_k: int = 16,
    head_dim_v: int = 8,
    block_size: int = 4,
) -> KVBuffers:
    """Small buffers whose rows are multiples of 16 bytes for every dtype in DTYPES."""
    scale = 4 // torch.empty((), dtype=dtype).element_size()  # keep row bytes >= 16 for 1-byte types
    hk, hv = head_dim_k * scale, head_dim_v * scale
    if kind is LayoutKind.TOKEN_SLOT:
        k = [random_like_bytes((num_slots, heads, hk), dtype, device, gen) for _ in range(num_layers)]
        v = [random_like_bytes((num_slots, heads, hv), dtype, device, gen) for _ in range(num_layers)]
        return KVBuffers.token_slot(k, v)
    if kind is LayoutKind.MLA:
        return KVBuffers.mla([random_like_bytes((num_slots, 1, 36 * scale), dtype, device, gen) for _ in range(num_layers)])
    assert num_slots % block_size == 0
    nb = num_slots // block_size
    k = [random_like_bytes((nb, block_size, heads, hk), dtype, device, gen) for _ in range(num_layers)]
    v = [random_like_bytes((nb, block_size, heads, hk), dtype, device, gen) for _ in range(num_layers)]
    return KVBuffers.paged_blocks(k, v)


def clone_buffers(buffers: KVBuffers) -> KVBuffers:
    """The same layout over copies of every plane (any number of planes)."""
    planes = tuple(tuple(t.clone() for t in layer) for layer in buffers.planes)
    return KVBuffers(geometry=buffers.geometry, planes=planes, num_slots=buffers.num_slots)


def random_slabs(count: int, nbytes: int, gen: torch.Generator, *, pin: bool = False) -> list[torch.Tensor]:
    slabs = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen) for _ in range(count)]
    return [s.pin_memory() for s in slabs] if pin else slabs


def buffer_bytes(buffers: KVBuffers) -> list[torch.Tensor]:
    return [t.view(torch.uint8).reshape(-1).cpu().clone() for layer in buffers.planes for t in layer]
