"""The engine's per-layer KV tensors (``KVBuffers``), checked against the kernels' needs.

``KVBuffers`` views each layer's buffers as planes of slot rows and derives the
layout's ``KVGeometry`` (kernels/geometry.py) from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .geometry import ACCESS_BYTES, KVGeometry, LayoutKind


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class KVBuffers:
    """The engine's per-layer KV tensors, viewed as planes of slot rows."""

    geometry: KVGeometry
    planes: tuple[tuple[torch.Tensor, ...], ...]  # [layer][plane]
    num_slots: int

    @property
    def device(self) -> torch.device:
        return self.planes[0][0].device

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @classmethod
    def token_slot(cls, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor]) -> "KVBuffers":
        """SGLang MHA: per layer K ``[num_slots, H, Dk]`` and V ``[num_slots, H, Dv]``."""
        if len(k_buffers) != len(v_buffers):
            raise ValueError(
                f"k_buffers and v_buffers must have one tensor per layer: got {len(k_buffers)} K and {len(v_buffers)} V"
            )
        return cls._build(LayoutKind.TOKEN_SLOT, [list(p) for p in zip(k_buffers, v_buffers)], token_dims=1)

    @classmethod
    def mla(cls, buffers: Sequence[torch.Tensor]) -> "KVBuffers":
        """SGLang MLA: per layer one buffer ``[num_slots, 1, kv_dim]``."""
        return cls._build(LayoutKind.MLA, [[b] for b in buffers], token_dims=1)

    @classmethod
    def paged_blocks(cls, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> "KVBuffers":
        """vLLM NHD: per layer K and V ``[num_blocks, block_size, H, D]``; slot = block * block_size + offset."""
        if len(k_caches) != len(v_caches):
            raise ValueError(
                f"k_caches and v_caches must have one tensor per layer: got {len(k_caches)} K and {len(v_caches)} V"
            )
        return cls._build(LayoutKind.PAGED_BLOCKS, [list(p) for p in zip(k_caches, v_caches)], token_dims=2)

    @classmethod
    def _build(cls, kind: LayoutKind, layers: list[list[torch.Tensor]], token_dims: int) -> "KVBuffers":
        if not layers:
            raise ValueError(f"{kind.value} layout needs at least one layer, got none")
        first = layers[0]
        for plane_idx, t in enumerate(first):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"layer 0 plane {plane_idx}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() < token_dims + 1:
                raise ValueError(
                    f"layer 0 plane {plane_idx}: {kind.value} buffers need at least {token_dims + 1} dims, got shape {tuple(t.shape)}"
                )
        dtype = first[0].dtype
        device = first[0].device
        slot_dims = tuple(first[0].shape[:token_dims])
        num_slots = 1
        for d in slot_dims:
            num_slots *= int(d)
        plane_shapes = tuple(tuple(int(d) for d in t.shape[token_dims:]) for t in first)
        for layer_idx, planes in enumerate(layers):
            if len(planes) != len(first):
                raise ValueError(f"layer {layer_idx} has {len(planes)} planes, layer 0 has {len(first)}")
            for plane_idx, t in enumerate(planes):
                where = f"layer {layer_idx} plane {plane_idx}"
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
                if t.dtype != dtype:
                    raise TypeError(f"{where}: dtype {t.dtype} differs from layer 0's {dtype}")
                if t.device != device:
                    raise ValueError(f"{where}: device {t.device} differs from layer 0's {device}")
                if tuple(t.shape[:token_dims]) != slot_dims or tuple(t.shape[token_dims:]) != plane_shapes[plane_idx]:
                    expected = slot_dims + plane_shapes[plane_idx]
                    raise ValueError(f"{where}: shape {tuple(t.shape)} differs from layer 0's {expected}")
                if not t.is_contiguous():
                    raise ValueError(f"{where}: slot rows must be contiguous, got strides {t.stride()}")
                if t.data_ptr() % ACCESS_BYTES:
                    raise ValueError(
                        f"{where}: base address must be {ACCESS_BYTES}-byte aligned, got address % {ACCESS_BYTES} = {t.data_ptr() % ACCESS_BYTES}"
                    )
        geometry = KVGeometry(kind=kind, num_layers=len(layers), plane_shapes=plane_shapes, dtype=_dtype_name(dtype))
        for plane_idx, row in enumerate(geometry.plane_row_bytes):
            if row % ACCESS_BYTES:
                raise ValueError(
                    f"plane {plane_idx}: row bytes must be a multiple of {ACCESS_BYTES} (the access width), "
                    f"got {row} for token shape {plane_shapes[plane_idx]} of {dtype}"
                )
        return cls(geometry=geometry, planes=tuple(tuple(p) for p in layers), num_slots=num_slots)

    def plane_rows(self, layer: int, plane: int) -> torch.Tensor:
        """One plane of one layer as a ``[num_slots, row_bytes]`` uint8 view."""
        t = self.planes[layer][plane]
        return t.view(torch.uint8).reshape(self.num_slots, self.geometry.plane_row_bytes[plane])
