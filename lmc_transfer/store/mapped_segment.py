"""The daemon's shared-memory segment as an engine maps it: slabs as torch tensors, CUDA-registered.

The segment itself (lmc_transfer.daemon.shm) is torch-free so the daemon never imports torch;
this wrapper adds what the engine's kernels need. When CUDA is available the slab region is
registered once with ``cudaHostRegister``, so GPU kernels address the slabs directly
(zero-copy), and unregistered before the mapping goes.
"""

from __future__ import annotations

import numpy as np
import torch

from lmc_transfer.daemon.shm import SharedSegment

_CUDA_HOST_REGISTER_PORTABLE = 1


class MappedSegment:
    """A client mapping of a daemon segment; build with ``open``."""

    def __init__(self, segment: SharedSegment) -> None:
        self._segment = segment
        self.data: torch.Tensor = torch.from_numpy(segment.data)
        self._registered_ptr: int | None = None

    @classmethod
    def open(cls, name: str, num_slabs: int, slab_bytes: int) -> "MappedSegment":
        """Map segment ``name`` (sizes from the daemon's HELLO reply) and register it with CUDA."""
        mapped = cls(SharedSegment.open(name, num_slabs, slab_bytes))
        try:
            mapped._register_cuda()
        except BaseException:
            mapped.close()
            raise
        return mapped

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def num_slabs(self) -> int:
        return self._segment.num_slabs

    @property
    def slab_bytes(self) -> int:
        return self._segment.slab_bytes

    @property
    def generations(self) -> np.ndarray:
        """The daemon's slab generations (shared memory: read them to verify a finished load)."""
        return self._segment.generations

    def slab(self, slab_id: int) -> torch.Tensor:
        """uint8 tensor view of one slab's bytes."""
        start = slab_id * self.slab_bytes
        return self.data[start : start + self.slab_bytes]

    def _register_cuda(self) -> None:
        if not torch.cuda.is_available() or self.data.numel() == 0:
            return
        ptr = self.data.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.data.numel(), _CUDA_HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of segment {self.name} ({self.data.numel()} bytes) failed with error {err}")
        self._registered_ptr = ptr

    def close(self) -> None:
        """Unregister and unmap (the daemon's segment stays); idempotent."""
        if self._registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        self.data = torch.empty(0, dtype=torch.uint8)
        self._segment.close()
