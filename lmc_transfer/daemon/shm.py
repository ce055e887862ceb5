"""The daemon's POSIX shared-memory segment: slab generations + slab bytes.

Layout (all offsets from the segment start):

- ``[0, 64)``: fixed header: magic, layout version, num_slabs, slab_bytes,
  slab region offset (little-endian, see ``_HEADER``).
- ``[64, 64 + 8 * num_slabs)``: the uint64 generation of every slab. The daemon's
  pool bumps them; clients read them directly to verify a finished load.
- ``[slab_offset, slab_offset + num_slabs * slab_bytes)``: the slabs;
  ``slab_offset`` is aligned to 4096 bytes so the region can be registered with
  ``cudaHostRegister`` and every slab keeps the kernels' access alignment.

The daemon creates the segment with mode 0600 (only its user can map it) and
unlinks it on shutdown. Clients open it by name and, when CUDA is available,
register the slab region once so GPU kernels can address it (zero-copy).

We call ``_posixshmem`` directly instead of ``multiprocessing.shared_memory``:
before Python 3.13 the latter registers every *opened* segment with the resource
tracker, which unlinks the daemon's segment when a client process exits.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct

import _posixshmem
import numpy as np
import torch

_MAGIC = b"LMCTSHM1"
_LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, num_slabs, slab_bytes, slab_offset
_GENERATIONS_OFFSET = 64
SLAB_ALIGN = 4096
_CUDA_HOST_REGISTER_PORTABLE = 1


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def segment_bytes(num_slabs: int, slab_bytes: int) -> int:
    """Total size of a segment holding ``num_slabs`` slabs of ``slab_bytes``."""
    return _slab_offset(num_slabs) + num_slabs * slab_bytes


def _slab_offset(num_slabs: int) -> int:
    return _align_up(_GENERATIONS_OFFSET + 8 * num_slabs, SLAB_ALIGN)


def new_segment_name(prefix: str = "lmct") -> str:
    """A fresh, unguessable name; a restarted daemon gets a different one."""
    return f"/{prefix}-{os.getpid()}-{secrets.token_hex(6)}"


class SharedSegment:
    """A mapped segment; build with ``create`` (daemon) or ``open`` (client)."""

    def __init__(self, name: str, mm: mmap.mmap, num_slabs: int, slab_bytes: int, slab_offset: int, owner: bool) -> None:
        self.name = name
        self.num_slabs = num_slabs
        self.slab_bytes = slab_bytes
        self._mm = mm
        self._owner = owner
        self._registered_ptr: int | None = None
        self.generations: np.ndarray = np.ndarray(
            (num_slabs,), dtype=np.uint64, buffer=mm, offset=_GENERATIONS_OFFSET
        )
        self.data: torch.Tensor = (
            torch.frombuffer(mm, dtype=torch.uint8, offset=slab_offset, count=num_slabs * slab_bytes)
            if num_slabs * slab_bytes
            else torch.empty(0, dtype=torch.uint8)
        )
        self._closed = False

    @classmethod
    def create(cls, num_slabs: int, slab_bytes: int, name: str | None = None) -> "SharedSegment":
        if not isinstance(num_slabs, int) or num_slabs <= 0:
            raise ValueError(f"num_slabs must be a positive int, got {num_slabs!r}")
        if not isinstance(slab_bytes, int) or slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be a positive int, got {slab_bytes!r}")
        name = name or new_segment_name()
        size = segment_bytes(num_slabs, slab_bytes)
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            # shm_open's mode is filtered by the umask; enforce 0600 regardless.
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            _posixshmem.shm_unlink(name)
            raise
        finally:
            os.close(fd)
        slab_offset = _slab_offset(num_slabs)
        _HEADER.pack_into(mm, 0, _MAGIC, _LAYOUT_VERSION, 0, num_slabs, slab_bytes, slab_offset)
        return cls(name, mm, num_slabs, slab_bytes, slab_offset, owner=True)

    @classmethod
    def open(cls, name: str, num_slabs: int, slab_bytes: int) -> "SharedSegment":
        """Map an existing segment; the expected sizes come from the daemon's HELLO reply."""
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise ValueError(f"segment {name} is {size} bytes, too small for its header")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, version, _, seg_slabs, seg_slab_bytes, slab_offset = _HEADER.unpack_from(mm, 0)
        expected = (_MAGIC, _LAYOUT_VERSION, num_slabs, slab_bytes, _slab_offset(num_slabs))
        if (magic, version, seg_slabs, seg_slab_bytes, slab_offset) != expected or size < segment_bytes(num_slabs, slab_bytes):
            mm.close()
            raise ValueError(
                f"segment {name} does not match: expected (magic, version, num_slabs, slab_bytes, slab_offset) = "
                f"{expected} in >= {segment_bytes(num_slabs, slab_bytes)} bytes, got "
                f"{(magic, version, seg_slabs, seg_slab_bytes, slab_offset)} in {size} bytes"
            )
        seg = cls(name, mm, num_slabs, slab_bytes, slab_offset, owner=False)
        seg._register_cuda()
        return seg

    def slab(self, slab_id: int) -> torch.Tensor:
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
        """Unregister and unmap; the daemon (owner) also unlinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        if self._owner:
            unlink_segment(self.name)
        self.generations = np.empty(0, dtype=np.uint64)
        self.data = torch.empty(0, dtype=torch.uint8)
        try:
            self._mm.close()
        except BufferError:
            # A caller still holds a slab view: the mapping goes away with the last view.
            pass


def unlink_segment(name: str) -> bool:
    """Remove a segment name; False when it was already gone."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        return False
    return True


def segment_exists(name: str) -> bool:
    try:
        fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return False
    os.close(fd)
    return True
