"""Engine-agnostic KV gather/scatter kernels (Triton) and their torch reference."""

from .layout import ACCESS_BYTES, KVBuffers, KVGeometry, LayoutKind

__all__ = ["ACCESS_BYTES", "KVBuffers", "KVGeometry", "LayoutKind"]
