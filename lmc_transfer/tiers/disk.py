"""L2 tier of the daemon: committed chunks written behind to local disk.

One file per chunk key under ``<root>/<geometry digest>/``, so daemons serving
different geometries never read each other's chunks. A file is a fixed header
(magic, format version, payload length, geometry digest, key, blake2b of the
payload) followed by the slab bytes. Files are written to a temporary name and
renamed, so a name always refers to a complete write; what can still go wrong
(a truncated file after a power loss, bit rot, a stray file) is caught by the
length check when the index is rebuilt and by the checksum on every load. A
file that fails either is deleted and never served.

Writes are behind: ``submit`` only queues (key, slab, generation) in a bounded
queue; the writer thread copies the slab, re-checks its generation (the pool
bumps it before a slab can be rewritten, so an unchanged generation means the
copy is intact) and writes the file. A full queue drops the write and counts it.
The writer fsyncs what it wrote (files, then the directory) at most
``sync_interval_s`` after the first unsynced write, and on close: a power loss
takes at most that much of the tier (what it does take is caught as above).
The budget ``max_bytes`` is kept by deleting least recently used files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmc_transfer.kernels.geometry import KVGeometry

log = logging.getLogger(__name__)

_MAGIC = b"LMCTKV01"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s32s32s")  # magic, version, reserved, payload_len, geometry, key, checksum
_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"


def geometry_digest(geometry: KVGeometry, chunk_size: int) -> bytes:
    """Identity of the slab format: the same geometry and chunk size give the same bytes."""
    blob = json.dumps({"geometry": geometry.to_dict(), "chunk_size": chunk_size}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=32).digest()


def _checksum(payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=32).digest()


@dataclass(frozen=True)
class DiskStats:
    files: int
    bytes: int
    max_bytes: int
    written: int
    dropped: int  # writes lost to a full queue or a slab reused before the write
    corrupt: int  # files deleted because they failed verification
    loads: int
    synced: int  # files fsynced


class DiskTier:
    """Write-behind chunk files for one slab format; thread-safe."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        digest: bytes,
        data: torch.Tensor,
        generations: np.ndarray,
        slab_bytes: int,
        *,
        queue_size: int = 256,
        sync_interval_s: float = 1.0,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not sync_interval_s > 0:
            raise ValueError(f"sync_interval_s must be > 0, got {sync_interval_s!r}")
        self._sync_interval_s = sync_interval_s
        self.directory = Path(root) / digest.hex()[:32]
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self._digest = digest
        self._data = data
        self._gens = generations
        self._slab_bytes = slab_bytes
        self._file_bytes = _HEADER.size + slab_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self._written = self._dropped = self._corrupt = self._loads = self._synced = 0
        self._queue: queue.Queue[tuple[bytes, int, int] | None] = queue.Queue(maxsize=queue_size)
        self._rebuild()
        self._thread = threading.Thread(target=self._writer, name="lmct-disk-writer", daemon=True)
        self._thread.start()

    # -- index ----------------------------------------------------------------

    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + _SUFFIX)

    def _rebuild(self) -> None:
        entries = []
        for path in self.directory.iterdir():
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)  # an interrupted write
                continue
            key = self._check_file(path)
            if key is None:
                self._corrupt += 1
                log.warning("disk tier: dropping invalid chunk file %s", path.name)
                path.unlink(missing_ok=True)
                continue
            entries.append((path.stat().st_mtime_ns, key))
        for _, key in sorted(entries):
            self._index[key] = None
        self._evict_to_fit(0)
        log.info("disk tier: %d chunks in %s", len(self._index), self.directory)

    def _check_file(self, path: Path) -> bytes | None:
        """The key of a well-formed file (header, name and length); the payload is checked on load."""
        if not path.name.endswith(_SUFFIX):
            return None
        try:
            key = bytes.fromhex(path.name[: -len(_SUFFIX)])
            with open(path, "rb") as f:
                header = f.read(_HEADER.size)
            size = path.stat().st_size
        except (ValueError, OSError):
            return None
        if len(key) != 32 or len(header) != _HEADER.size or size != self._file_bytes:
            return None
        magic, version, _, length, digest, file_key, _ = _HEADER.unpack(header)
        if (magic, version, length, digest, file_key) != (_MAGIC, FORMAT_VERSION, self._slab_bytes, self._digest, key):
            return None
        return key

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def _evict_to_fit(self, incoming: int) -> None:
        """Delete LRU files until ``incoming`` more bytes fit; lock held or single-threaded."""
        while self._index and (len(self._index) * self._file_bytes + incoming > self.max_bytes):
            key, _ = self._index.popitem(last=False)
            self._path(key).unlink(missing_ok=True)

    # -- reads ----------------------------------------------------------------

    def load_into(self, key: bytes, dest: torch.Tensor) -> bool:
        """Copy a chunk's payload into ``dest`` (a slab view); False if absent or corrupt."""
        with self._lock:
            if key not in self._index:
                return False
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            blob = b""
        ok = len(blob) == self._file_bytes
        if ok:
            magic, version, _, length, digest, file_key, checksum = _HEADER.unpack_from(blob)
            payload = memoryview(blob)[_HEADER.size :]
            ok = (magic, version, length, digest, file_key) == (_MAGIC, FORMAT_VERSION, self._slab_bytes, self._digest, key) and _checksum(payload) == checksum
        if not ok:
            log.warning("disk tier: chunk file %s failed verification; deleted", path.name)
            with self._lock:
                self._index.pop(key, None)
                self._corrupt += 1
            path.unlink(missing_ok=True)
            return False
        dest[: self._slab_bytes].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        with self._lock:
            self._loads += 1
        return True

    # -- writes ---------------------------------------------------------------

    def submit(self, key: bytes, slab_id: int) -> None:
        """Queue a committed slab for writing; never blocks (a full queue drops the write).

        Suitable as the pool's ``on_commit`` callback.
        """
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return
        try:
            self._queue.put_nowait((key, slab_id, int(self._gens[slab_id])))
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _writer(self) -> None:
        unsynced: list[Path] = []
        sync_at = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, sync_at - time.monotonic()) if unsynced else None)
            except queue.Empty:
                self._sync(unsynced)
                continue
            try:
                if item is None:
                    self._sync(unsynced)
                    return
                path = self._write(*item)
                if path is not None:
                    if not unsynced:
                        sync_at = time.monotonic() + self._sync_interval_s
                    unsynced.append(path)
                if unsynced and time.monotonic() >= sync_at:  # a steady stream of writes never times out
                    self._sync(unsynced)
            except Exception:  # a full disk must not kill the writer thread
                log.exception("disk tier: write failed")
                with self._lock:
                    self._dropped += 1
            finally:
                self._queue.task_done()

    def _sync(self, paths: list[Path]) -> None:
        """fsync ``paths`` (those still there: eviction may have deleted some) and the directory."""
        if not paths:
            return
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames
        finally:
            os.close(fd)
        with self._lock:
            self._synced += len(paths)
        paths.clear()

    def _write(self, key: bytes, slab_id: int, generation: int) -> Path | None:
        """Write one chunk file; returns its path, or None when nothing was written."""
        with self._lock:
            if key in self._index or self._file_bytes > self.max_bytes:
                return None
        start = slab_id * self._slab_bytes
        payload = self._data[start : start + self._slab_bytes].numpy().tobytes()
        if int(self._gens[slab_id]) != generation:
            with self._lock:
                self._dropped += 1  # the slab was handed out again before we copied it
            return None
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, 0, len(payload), self._digest, key, _checksum(payload))
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
        with self._lock:
            self._evict_to_fit(self._file_bytes)
            self._index[key] = None
            self._written += 1
        return path

    def flush(self) -> None:
        """Wait until every queued write has landed."""
        self._queue.join()

    def close(self) -> None:
        """Flush, fsync and stop the writer thread; idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                files=len(self._index),
                bytes=len(self._index) * self._file_bytes,
                max_bytes=self.max_bytes,
                written=self._written,
                dropped=self._dropped,
                corrupt=self._corrupt,
                loads=self._loads,
                synced=self._synced,
            )
