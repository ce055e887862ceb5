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
unlinks it on shutdown. Clients open it by name; the engine side
(lmc_transfer.store.mapped_segment) registers the slab region with CUDA and wraps
slabs as tensors. This module imports no torch: slabs are numpy uint8 views.

Its memory is reserved when the segment is created (``posix_fallocate``): a segment
larger than what /dev/shm can hold (Docker gives containers 64 MiB by default) fails
then, with ``SegmentSpaceError`` naming the size, the free space and the fix, instead
of killing whoever touches an unbacked page later with SIGBUS.

We call ``_posixshmem`` directly instead of ``multiprocessing.shared_memory``:
before Python 3.13 the latter registers every *opened* segment with the resource
tracker, which unlinks the daemon's segment when a client process exits.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import struct

import _posixshmem
import numpy as np

from lmc_transfer.private_paths import check_private_file

_MAGIC = b"LMCTSHM1"
_LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, num_slabs, slab_bytes, slab_offset
_GENERATIONS_OFFSET = 64
SLAB_ALIGN = 4096
#: Where Linux keeps POSIX shared memory.
SHM_DIR = "/dev/shm"


class SegmentSpaceError(OSError):
    """The shared-memory filesystem cannot hold a segment of the asked size."""


def shm_free_bytes() -> int:
    """Bytes an unprivileged process can still allocate in ``SHM_DIR``."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_shm_space(nbytes: int) -> None:
    """Raise ``SegmentSpaceError`` (one line: size, free space, fix) unless ``nbytes`` fit in SHM_DIR now."""
    free = shm_free_bytes()
    if nbytes > free:
        raise _space_error(nbytes, free)


def _space_error(nbytes: int, free: int) -> SegmentSpaceError:
    return SegmentSpaceError(
        f"the shared-memory pool needs {nbytes} bytes ({nbytes / 1024**3:.2f} GiB) but {SHM_DIR} has only "
        f"{free} bytes ({free / 1024**3:.2f} GiB) free: lower max_local_cpu_size, or give {SHM_DIR} more room "
        f"(docker run --shm-size=..., or a larger tmpfs)"
    )


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
        self.generations: np.ndarray = np.ndarray(
            (num_slabs,), dtype=np.uint64, buffer=mm, offset=_GENERATIONS_OFFSET
        )
        #: Every slab's bytes, back to back (1-D uint8).
        self.data: np.ndarray = np.ndarray((num_slabs * slab_bytes,), dtype=np.uint8, buffer=mm, offset=slab_offset)
        self._closed = False

    @classmethod
    def create(cls, num_slabs: int, slab_bytes: int, name: str | None = None) -> "SharedSegment":
        if not isinstance(num_slabs, int) or num_slabs <= 0:
            raise ValueError(f"num_slabs must be a positive int, got {num_slabs!r}")
        if not isinstance(slab_bytes, int) or slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be a positive int, got {slab_bytes!r}")
        name = name or new_segment_name()
        size = segment_bytes(num_slabs, slab_bytes)
        check_shm_space(size)  # before allocating: a doomed fallocate would fill the filesystem first
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            # shm_open's mode is filtered by the umask; enforce 0600 regardless.
            os.fchmod(fd, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                raise _space_error(size, shm_free_bytes()) from None
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
        """Map an existing segment; the expected sizes come from the daemon's HELLO reply.

        PermissionError unless the segment is this uid's with mode 0600: KV goes only into
        memory nobody else can read or write."""
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            st = os.fstat(fd)
            check_private_file(st, f"segment {name}")
            size = st.st_size
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
        return cls(name, mm, num_slabs, slab_bytes, slab_offset, owner=False)

    def slab(self, slab_id: int) -> np.ndarray:
        """uint8 view of one slab's bytes."""
        start = slab_id * self.slab_bytes
        return self.data[start : start + self.slab_bytes]

    def close(self) -> None:
        """Unmap; the daemon (owner) also unlinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owner:
            unlink_segment(self.name)
        self.generations = np.empty(0, dtype=np.uint64)
        self.data = np.empty(0, dtype=np.uint8)
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
