"""A deterministic stand-in for a model's forward pass over a token_slot KV pool.

The KV written for position ``i`` depends on every token up to ``i`` (as real
attention KV does), so a prefix loaded back from the cache is byte-exact only if
it came from the same token prefix. Geometry matches ``tests.conftest_mp`` (so
its daemon config fits): float16, ``LAYERS`` layers, ``HEADS`` x ``DIM``, seen
through ``KVBuffers`` (our radix tests' buffers, or a view of SGLang's MHA pool).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from lmc_transfer.kernels import KVBuffers
from tests.conftest_mp import CHUNK, DIM, HEADS, LAYERS

__all__ = ["CHUNK", "DIM", "HEADS", "LAYERS", "expected_kv", "pool_kv", "prompt", "write_kv"]


def _position_seeds(tokens: Sequence[int]) -> list[int]:
    seeds, h = [], hashlib.blake2b(b"kv-model", digest_size=8).digest()
    for t in tokens:
        h = hashlib.blake2b(h + int(t).to_bytes(8, "little"), digest_size=8).digest()
        seeds.append(int.from_bytes(h, "little") >> 1)
    return seeds


def expected_kv(tokens: Sequence[int]) -> torch.Tensor:
    """uint8 ``[len(tokens), LAYERS, 2, HEADS * DIM * 2]``: the KV bytes of each position."""
    row = LAYERS * 2 * HEADS * DIM * 2
    out = torch.empty((len(tokens), row), dtype=torch.uint8)
    for i, seed in enumerate(_position_seeds(tokens)):
        out[i] = torch.randint(0, 256, (row,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return out.view(len(tokens), LAYERS, 2, HEADS * DIM * 2)


def write_kv(buffers: KVBuffers, tokens: Sequence[int], start: int, slots: torch.Tensor) -> None:
    """"Forward" positions ``start..len(tokens)`` into ``slots``."""
    kv = expected_kv(tokens)[start:]
    assert kv.shape[0] == slots.numel(), (kv.shape, slots.numel())
    for layer in range(LAYERS):
        for plane in range(2):
            buffers.plane_rows(layer, plane)[slots] = kv[:, layer, plane]


def pool_kv(buffers: KVBuffers, slots: torch.Tensor) -> torch.Tensor:
    """The KV bytes at ``slots``, shaped like ``expected_kv``."""
    planes = [buffers.plane_rows(layer, plane)[slots] for layer in range(LAYERS) for plane in range(2)]
    return torch.stack(planes, dim=1).view(len(slots), LAYERS, 2, HEADS * DIM * 2)


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(7000 + seed)
    return torch.randint(1, 32000, (length,), generator=g).tolist()
