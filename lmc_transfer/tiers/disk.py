"""L2 tier of the daemon: committed chunks written behind to local disk.

One file per chunk key under ``<root>/<geometry digest>/`` (``tier_directory``), so daemons
serving different geometries never read each other's chunks. A file is one slab value of
lmc_transfer.tiers.format (header bound to the key and geometry, XXH3-128 checksum, payload),
the same bytes a Redis value holds.

Trust: the root and the digest directory are created 0700, and an existing one is used only
when this uid owns it and nobody else can write it (lmc_transfer.private_paths), so nobody else
can plant, swap or link a file there; chunk files are created 0600 whatever the umask. A file is
served only if it is a regular file owned by this uid, in such a directory, and passes the
format for the key it is looked up under.

Files are written to a temporary name and renamed, so a name always refers to a complete
write; what can still go wrong (a truncated file after a power loss, bit rot, a file of an
older format) is caught by the header check when the index is rebuilt and by the checksum on
every load. A file that fails either is deleted, counted and never served. Entries that are
not regular files (directories, FIFOs, symlinks, sockets) and files of other owners are
skipped and counted, never opened in a way that could block: every open is
``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat`` before a byte is read.

Writes are behind (lmc_transfer.tiers.writeback): ``submit`` only queues (key, slab,
generation); the writer thread writes the file straight from the slab, re-checks the slab's
generation (the pool bumps it before a slab can be rewritten, so an unchanged generation
means the bytes written are intact) and renames it into place. A full queue drops the write
and counts it. The writer fsyncs what it wrote (files, then the directory) at most
``sync_interval_s`` after the first unsynced write, and on close: a power loss takes at most
that much of the tier (what it does take is caught as above). The budget ``max_bytes`` is kept
by deleting least recently used files.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmc_transfer.keys import KEY_BYTES
from lmc_transfer.private_paths import create_private_file, ensure_private_dir
from lmc_transfer.tiers.format import HEADER_BYTES, SlabFormat, Verdict
from lmc_transfer.tiers.writeback import WriteBehind

log = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
#: On close, how long the writer may take to write what is still queued.
_CLOSE_JOIN_S = 30.0
_WHAT = "disk tier directory"


def tier_directory(root: str | os.PathLike[str], geometry: bytes) -> Path:
    """Where the files of one slab format (``geometry``: its geometry digest) live under ``root``."""
    return Path(root) / geometry.hex()[:32]


def check_root(root: str | os.PathLike[str]) -> Path:
    """Create the tier's root directory 0700, or check an existing one (PermissionError otherwise)."""
    return ensure_private_dir(root, _WHAT)


@dataclass(frozen=True)
class DiskStats:
    files: int
    bytes: int
    max_bytes: int
    written: int
    dropped: int  # writes lost: a full queue, a slab reused before the write, or a failed write
    corrupt: int  # files deleted because they failed verification (also files of an older format)
    loads: int
    synced: int  # files fsynced
    skipped: int  # entries that are not regular files of this uid: left alone, never read


class DiskTier:
    """Write-behind chunk files for one slab format; thread-safe.

    ``data`` is every slab's bytes back to back (1-D uint8, ``slab_format.payload_bytes`` each)
    and ``generations`` their generations; ``submit`` is suitable as the pool's ``on_commit``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        slab_format: SlabFormat,
        data: np.ndarray,
        generations: np.ndarray,
        *,
        queue_size: int = 256,
        sync_interval_s: float = 1.0,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not sync_interval_s > 0:
            raise ValueError(f"sync_interval_s must be > 0, got {sync_interval_s!r}")
        check_root(root)
        self.directory = ensure_private_dir(tier_directory(root, slab_format.geometry), _WHAT)
        self.max_bytes = max_bytes
        self._format = slab_format
        self._slab_bytes = slab_format.payload_bytes
        self._file_bytes = slab_format.value_bytes
        self._data = data
        self._gens = generations
        self._sync_interval_s = sync_interval_s
        self._uid = os.getuid()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self._written = self._stale = self._corrupt = self._loads = self._synced = self._skipped = 0
        # The writer thread's alone until close has joined it.
        self._unsynced: list[Path] = []
        self._sync_at = 0.0
        self._rebuild()
        self._writes: WriteBehind[tuple[bytes, int, int]] = WriteBehind(
            "disk-tier", self._write, max_items=queue_size, tick=self._sync_if_due
        )

    # -- index ----------------------------------------------------------------

    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + _SUFFIX)

    def _rebuild(self) -> None:
        entries: list[tuple[int, bytes]] = []
        older = 0
        with os.scandir(self.directory) as it:
            for entry in it:
                if not entry.is_file(follow_symlinks=False):
                    self._skipped += 1
                    continue
                if entry.name.endswith(_TMP_SUFFIX):
                    _unlink(Path(entry.path))  # an interrupted write
                    continue
                key = _key_of(entry.name)
                found = self._check_file(Path(entry.path), key) if key is not None else None
                if found is None:
                    continue  # skipped and counted by _check_file
                verdict, mtime_ns = found
                if verdict is Verdict.OK:
                    entries.append((mtime_ns, key))
                    continue
                older += verdict is Verdict.FOREIGN
                self._corrupt += 1
                _unlink(Path(entry.path))
        for _, key in sorted(entries):
            self._index[key] = None
        self._evict_to_fit(0)
        if self._corrupt or self._skipped:
            log.warning("disk tier: deleted %d invalid chunk files (%d of an older format), skipped %d entries "
                        "that are not regular files of this user, in %s", self._corrupt, older, self._skipped,
                        self.directory)
        log.info("disk tier: %d chunks in %s", len(self._index), self.directory)

    def _check_file(self, path: Path, key: bytes | None) -> tuple[Verdict, int] | None:
        """(header and length verdict, mtime) of a chunk file; None (counted as skipped) for anything
        that is not a regular file of this uid. A file without a chunk key's name is foreign."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            self._skipped += 1  # a symlink (ELOOP) or gone since the scan
            return None
        try:
            st = os.fstat(fd)
            if not self._ours(st):
                self._skipped += 1
                return None
            if key is None:
                return Verdict.FOREIGN, st.st_mtime_ns
            verdict = self._format.check_header(key, os.pread(fd, HEADER_BYTES, 0))
            if verdict is Verdict.OK and st.st_size != self._file_bytes:
                verdict = Verdict.WRONG_LENGTH
            return verdict, st.st_mtime_ns
        finally:
            os.close(fd)

    def _ours(self, st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and st.st_uid == self._uid

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def _evict_to_fit(self, incoming: int) -> None:
        """Delete LRU files until ``incoming`` more bytes fit; lock held or single-threaded."""
        while self._index and (len(self._index) * self._file_bytes + incoming > self.max_bytes):
            key, _ = self._index.popitem(last=False)
            _unlink(self._path(key))

    # -- reads ----------------------------------------------------------------

    def load_into(self, key: bytes, dest: np.ndarray) -> bool:
        """Read a chunk's payload straight into ``dest`` (a writable uint8 slab view) and verify it;
        False if absent or invalid (then ``dest`` holds garbage: the caller must not publish it)."""
        with self._lock:
            if key not in self._index:
                return False
            self._index.move_to_end(key)
        path = self._path(key)
        verdict = self._read_into(path, key, memoryview(dest)[: self._slab_bytes])
        if verdict is None:  # not a regular file of ours any more: forget it, leave it alone
            with self._lock:
                self._index.pop(key, None)
                self._skipped += 1
            return False
        if verdict is not Verdict.OK:
            log.warning("disk tier: chunk file %s failed verification (%s); deleted", path.name, verdict.value)
            with self._lock:
                self._index.pop(key, None)
                self._corrupt += 1
            _unlink(path)
            return False
        with self._lock:
            self._loads += 1
        return True

    def _read_into(self, path: Path, key: bytes, dest: memoryview) -> Verdict | None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return Verdict.WRONG_LENGTH
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not self._ours(st):
                return None
            if st.st_size != self._file_bytes:
                return Verdict.WRONG_LENGTH
            header = os.pread(fd, HEADER_BYTES, 0)
            verdict = self._format.check_header(key, header)
            if verdict is not Verdict.OK:
                return verdict
            done = 0
            while done < len(dest):
                n = os.preadv(fd, [dest[done:]], HEADER_BYTES + done)
                if n == 0:
                    return Verdict.WRONG_LENGTH  # shrank since the fstat
                done += n
            return self._format.check(key, header, dest)
        except OSError:
            return Verdict.WRONG_LENGTH  # an I/O error reading it: as good as corrupt
        finally:
            os.close(fd)

    # -- writes ---------------------------------------------------------------

    def submit(self, key: bytes, slab_id: int) -> None:
        """Queue a committed slab for writing; never blocks (a full queue drops the write)."""
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return
        self._writes.submit((key, slab_id, int(self._gens[slab_id])))

    def _write(self, item: tuple[bytes, int, int]) -> None:
        """(Writer thread.) Write one chunk file straight from its slab, unless the slab moved on."""
        key, slab_id, generation = item
        with self._lock:
            if key in self._index or self._file_bytes > self.max_bytes:
                return
        payload = self._data[slab_id * self._slab_bytes : (slab_id + 1) * self._slab_bytes]
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
        _unlink(tmp)  # left by a writer that died with this pid
        fd = create_private_file(tmp)
        try:
            _write_all(fd, self._format.header(key, payload))
            _write_all(fd, memoryview(payload))
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        if int(self._gens[slab_id]) != generation:  # handed out again while we wrote it
            _unlink(tmp)
            with self._lock:
                self._stale += 1
            return
        os.replace(tmp, path)
        with self._lock:
            self._evict_to_fit(self._file_bytes)
            self._index[key] = None
            self._written += 1
        if not self._unsynced:
            self._sync_at = time.monotonic() + self._sync_interval_s
        self._unsynced.append(path)

    def _sync_if_due(self) -> float | None:
        """(Writer thread, after every write and on its timeout.) fsync once the interval is up;
        returns how long until it is (None: nothing unsynced)."""
        if not self._unsynced:
            return None
        left = self._sync_at - time.monotonic()  # a steady stream of writes still syncs on time
        if left > 0:
            return left
        self._sync()
        return None

    def _sync(self) -> None:
        """fsync the unsynced files (those still there: eviction may have deleted some), then the directory."""
        if not self._unsynced:
            return
        for path in self._unsynced:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the renames
        finally:
            os.close(fd)
        with self._lock:
            self._synced += len(self._unsynced)
        self._unsynced.clear()

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued write has landed."""
        return self._writes.flush(timeout_s)

    def close(self) -> None:
        """Write what is queued, fsync and stop the writer (a bounded wait); idempotent."""
        if self._writes.close(_CLOSE_JOIN_S):
            self._sync()

    def stats(self) -> DiskStats:
        writes = self._writes.stats()
        with self._lock:
            return DiskStats(
                files=len(self._index),
                bytes=len(self._index) * self._file_bytes,
                max_bytes=self.max_bytes,
                written=self._written,
                dropped=writes.dropped + writes.failed + self._stale,
                corrupt=self._corrupt,
                loads=self._loads,
                synced=self._synced,
                skipped=self._skipped,
            )


def _key_of(name: str) -> bytes | None:
    """The chunk key a file name stands for, or None if it is not a chunk file's name."""
    if not name.endswith(_SUFFIX) or len(name) != 2 * KEY_BYTES + len(_SUFFIX):
        return None
    try:
        return bytes.fromhex(name[: -len(_SUFFIX)])
    except ValueError:
        return None


def _unlink(path: Path) -> None:
    """Best-effort removal: gone already, or not a file (a directory put there by hand), is fine."""
    try:
        path.unlink()
    except OSError:
        pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]
