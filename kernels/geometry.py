"""The chunk-slab geometry of a KV layout: plain numbers, no tensors, no torch.

A layout is a list of *planes* per layer: token_slot and paged_blocks have two
(K and V, whose row widths may differ), mla has one. Every plane stores one
token's row contiguously, and the row of slot ``s`` starts ``s * row_bytes``
bytes after the plane's base (paged_blocks: ``s = block * block_size + offset``).

A chunk slab is layer-major: for each layer, the chunk's rows of plane 0, then
its rows of plane 1. One layer of one chunk is therefore one contiguous piece,
and the whole slab is one piece.

The daemon sizes its pool from this module alone, so it must never import torch.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

#: Bytes per element of the torch dtypes a KV buffer may have, by torch's name without "torch.".
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}

#: Width of one access in the copy kernels; rows and addresses must be multiples of it.
ACCESS_BYTES = 16


class LayoutKind(str, enum.Enum):
    TOKEN_SLOT = "token_slot"
    MLA = "mla"
    PAGED_BLOCKS = "paged_blocks"


@dataclass(frozen=True)
class KVGeometry:
    """What a slab needs to know about a layout: no tensors, JSON-serialisable."""

    kind: LayoutKind
    num_layers: int
    plane_shapes: tuple[tuple[int, ...], ...]  # per plane, one token's shape, e.g. (H, D)
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")
        if not self.plane_shapes:
            raise ValueError("plane_shapes must name at least one plane")
        for shape in self.plane_shapes:
            if not shape or any(int(d) <= 0 for d in shape):
                raise ValueError(f"plane shape must have positive dims, got {shape}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @functools.cached_property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @functools.cached_property
    def plane_row_bytes(self) -> tuple[int, ...]:
        out = []
        for shape in self.plane_shapes:
            n = 1
            for d in shape:
                n *= int(d)
            out.append(n * self.element_bytes)
        return tuple(out)

    @functools.cached_property
    def token_bytes_per_layer(self) -> int:
        return sum(self.plane_row_bytes)

    @functools.cached_property
    def token_bytes(self) -> int:
        """Bytes of one token over all layers and planes."""
        return self.num_layers * self.token_bytes_per_layer

    def layer_bytes(self, chunk_size: int) -> int:
        """Bytes of one layer of one chunk inside a slab."""
        return chunk_size * self.token_bytes_per_layer

    def slab_bytes(self, chunk_size: int) -> int:
        return self.num_layers * self.layer_bytes(chunk_size)

    def plane_offset(self, plane: int, chunk_size: int) -> int:
        """Offset of a plane's rows inside one layer of a slab."""
        return chunk_size * sum(self.plane_row_bytes[:plane])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "num_layers": self.num_layers,
            "plane_shapes": [list(s) for s in self.plane_shapes],
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVGeometry":
        try:
            return cls(
                kind=LayoutKind(data["kind"]),
                num_layers=int(data["num_layers"]),
                plane_shapes=tuple(tuple(int(d) for d in s) for s in data["plane_shapes"]),
                dtype=str(data["dtype"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid KV geometry {data!r}: {exc}") from exc
