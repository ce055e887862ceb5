"""Engine-agnostic KV gather/scatter kernels (Triton) and their torch reference.

This package imports nothing from the rest of lmc-transfer, so other engines can
reuse it on its own (see README, "Using the kernels in another engine").
"""

from .copy_kernel import (
    DEFAULT_MAX_PROGRAMS,
    Backend,
    CopyPlan,
    Direction,
    SlotErrorFlag,
    SlotRangeError,
    gather,
    layer_signal_count,
    plan_copy,
    run_copy,
    scatter,
    word_offsets,
)
from .layout import ACCESS_BYTES, KVBuffers, KVGeometry, LayoutKind
from .reference import reference_copy

__all__ = [
    "ACCESS_BYTES",
    "DEFAULT_MAX_PROGRAMS",
    "Backend",
    "CopyPlan",
    "Direction",
    "KVBuffers",
    "KVGeometry",
    "LayoutKind",
    "SlotErrorFlag",
    "SlotRangeError",
    "gather",
    "layer_signal_count",
    "plan_copy",
    "reference_copy",
    "run_copy",
    "scatter",
    "word_offsets",
]
