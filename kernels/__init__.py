"""Engine-agnostic KV gather/scatter kernels (Triton) and their torch reference.

This package imports nothing from the rest of lmc-transfer, so other engines can
reuse it on its own (see README, "Using the kernels in another engine").

``KVGeometry`` and ``LayoutKind`` (kernels/geometry.py) need no torch: the MP daemon
uses them to size its pool without importing torch or Triton. Everything else here
is imported on first use of its name.
"""

from __future__ import annotations

import importlib
from typing import Any

from .geometry import ACCESS_BYTES, KVGeometry, LayoutKind

# name -> the submodule that defines it; imported when the name is first used.
_LAZY = {
    "DEFAULT_MAX_PROGRAMS": "plan",
    "FULL_WIDTH": "plan",
    "Backend": "plan",
    "CopyPlan": "plan",
    "Direction": "plan",
    "SlotErrorFlag": "plan",
    "SlotRangeError": "plan",
    "address_table": "plan",
    "layer_signal_count": "plan",
    "plan_copy": "plan",
    "gather": "ops",
    "run_copy": "ops",
    "scatter": "ops",
    "KVBuffers": "layout",
    "reference_copy": "reference",
}

__all__ = sorted(["ACCESS_BYTES", "KVGeometry", "LayoutKind", *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
