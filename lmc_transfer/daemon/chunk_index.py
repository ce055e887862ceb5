"""The shared-memory chunk index: the daemon's key -> (slab id, generation) map that engines
probe without a message.

One writer (the daemon) creates a POSIX shared-memory segment, mode 0600, and keeps every
L1-resident chunk key in it; engine processes map it read-only and compute the longest cached
prefix of a prompt with a handful of numpy operations, no system call and no daemon involvement.
A key the index does not hold (window full, or being rewritten right now) is a miss here and is
asked of the daemon with a LOOKUP message, as before.

Layout (little-endian, offsets from the segment start)
------------------------------------------------------
- ``[0, 64)``: header ``_HEADER``: magic, format version, ``valid`` (1 while the writer lives;
  cleared on a clean shutdown), ``capacity`` (home buckets, a power of two), ``window`` (probe
  window W), the daemon's epoch (ASCII, NUL-padded).
- ``rows = capacity + W - 1`` buckets, each eight uint64 words (64 bytes, one cache line):
  ``seq`` (the bucket's sequence counter), the 32-byte key as four words, ``slab`` id,
  ``generation``, ``state`` (1 occupied, 0 empty: a fresh zero-filled segment is an empty table).
- ``rows`` uint64 tags: word 0 of the key of each bucket (0 when empty), contiguous so that a
  reader scans a window in one or two cache lines. A tag is only a hint for where to look; every
  hit is confirmed against the bucket's full key under its sequence counter.

Key ``k`` has home bucket ``h = word0(k) & (capacity - 1)`` and lives in one of the buckets
``[h, h + W)``; the W - 1 extra rows past ``capacity`` mean a window never wraps. Keys are
blake2b digests, so their low bits are uniform. An insert takes the first empty bucket of its
window or gives up (counted in ``IndexWriterStats.not_indexed``); a delete empties its bucket;
readers scan the whole window, so there are no tombstones and no displacement.

Per-bucket seqlock
------------------
The writer changes a bucket in three steps: ``seq`` becomes odd, the entry is written, ``seq``
becomes even (one greater than the odd value), each step separated by ``memory_fence()``. A
reader loads ``seq`` (s1), fences, copies the entries, fences, loads ``seq`` again (s2), and
accepts an entry only when ``s1 == s2`` and ``s1`` is even. A bucket that fails this is probed
again, at most ``PROBE_ATTEMPTS`` times in all, and then reads as a miss: a writer killed inside
an update leaves an odd counter forever, which reads as a miss, never as garbage or a hang. The
writer never waits for readers, so a stopped reader (SIGSTOP) delays nobody.

Why a reported (key, slab, generation) triple was true at some instant
----------------------------------------------------------------------
1. Counters are aligned 8-byte words. The writer stores each with one numpy scalar store, and a
   reader gathers them with numpy fancy indexing, whose aligned 8-byte case copies with one
   ``npy_uint64`` load and store per item; aligned 8-byte loads and stores are single-copy
   atomic on x86-64 and aarch64, so a reader sees every counter value whole. (Entries are
   copied with ``take``, in any order and width: the counters make that safe.)
2. ``memory_fence()`` is a full fence. It acquires and releases a private ``threading.Lock``
   twice; the first release and the second acquire are the fence. A release is a release
   operation (no earlier load or store moves after it), an acquire is an acquire operation (no
   later one moves before it), and a release followed by an acquire in one thread stays ordered
   (x86-64: locked instructions are full barriers; aarch64: STLR then LDAR/LDAXR are ordered,
   RCsc). CPython builds ``threading.Lock`` on POSIX semaphores up to 3.12 (sem_trywait /
   sem_post: acquire / release atomics) and on seq_cst atomics from 3.13, so this holds for
   every supported version; uncontended, neither makes a system call. Acquiring first makes
   the fence safe to call from any thread at any time. On x86-64 (TSO: loads are not
   reordered with loads, nor stores with stores) program order would be enough, since separate
   numpy calls are opaque function calls the C compiler cannot move memory accesses across; on
   aarch64, whose loads and stores may otherwise reorder, the fences are what order them.
3. Hence the usual seqlock argument. Writer: ``W1: seq = 2j+1; F; W2: entry stores; F;
   W3: seq = 2j+2``. Reader: ``R1: s1 = seq; F; R2: entry loads; F; R3: s2 = seq``. Say the
   reader accepts with ``s1 == s2 == 2j``. (a) R2 saw no store of a later update j+1, j+2, ...:
   if it had, the writer's fence orders that update's odd store W1 before it, the reader's fence
   orders R3 after R2, so R3 would have read at least 2j+1. (b) R2 saw every store of update j
   and earlier: R1 read W3 of update j (value 2j), the writer's fence orders that update's entry
   stores before it and the reader's fence orders R2 after R1. So the copied entry is exactly the
   bucket's contents between updates j and j+1, and the writer only ever stores a whole entry
   (key, slab, generation, state) that was true when it stored it.

Why no wrong chunk is served
----------------------------
The daemon puts (k, s, g) only after slab s holds k's committed bytes under generation g, and
the pool bumps a slab's generation before it lets anyone overwrite the slab (reuse, eviction,
expiry). A client that copies slab s after reading (k, s, g) here and then finds the pool
segment's generation of s still equal to g (the existing post-copy check, read after the copy's
event) knows no bump happened between the instant the triple was true and the end of its copy,
so the slab held k's bytes throughout: a stale index entry can only cost a recompute. The
generation is a property of the slab, so a triple whose key was removed or reassigned in the
meantime fails the same check.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

import _posixshmem
import numpy as np

from lmc_transfer.daemon.protocol import KEY_BYTES
from lmc_transfer.daemon.shm import new_segment_name, unlink_segment

_MAGIC = b"LMCTIDX1"
FORMAT_VERSION = 1
_EPOCH_BYTES = 32
_HEADER = struct.Struct(f"<8sIIQII{_EPOCH_BYTES}s")  # magic, version, valid, capacity, window, reserved, epoch
_HEADER_BYTES = 64
_VALID_OFFSET = 12
# The words of a bucket row.
_SEQ, _KEY, _SLAB, _GENERATION, _STATE = 0, slice(1, 5), 5, 6, 7
_BUCKET_WORDS = 8
_OCCUPIED = 1
_EVEN = np.uint64(2**64 - 2)
#: Four equal words compare to four True bytes, which read as this one uint32.
_ALL_FOUR_EQUAL = int.from_bytes(b"\x01" * 4, "little")
_KEY_WORDS = struct.Struct("<4Q")
DEFAULT_WINDOW = 16
MAX_WINDOW = 64
#: Reads of one probe before a bucket that is being rewritten counts as a miss.
PROBE_ATTEMPTS = 4
_MAX_U64 = 2**64 - 1
_LOAD_FACTOR_INVERSE = 2

assert _HEADER.size == _HEADER_BYTES

_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory fence between the shared-memory accesses before and after it (module docstring, point 2)."""
    # ``with`` releases the lock even when a signal handler raises between acquire and release
    # (a bare acquire()/release() pair would leave it held and deadlock the next fence).
    with _fence_lock:
        pass
    with _fence_lock:
        pass


class ChunkIndexError(ValueError):
    """A segment that is not a usable chunk index: wrong owner or mode, format, epoch, or shut down."""


def _is_int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def index_capacity(max_entries: int) -> int:
    """Home buckets for ``max_entries`` keys: the power of two at or above twice that (load <= 1/2)."""
    if not _is_int_in(max_entries, 1, 2**40):
        raise ValueError(f"max_entries must be an int in [1, 2**40], got {max_entries!r}")
    return 1 << (_LOAD_FACTOR_INVERSE * max_entries - 1).bit_length()


@dataclass(frozen=True)
class _Layout:
    capacity: int
    window: int

    @property
    def rows(self) -> int:
        return self.capacity + self.window - 1

    @property
    def tags_offset(self) -> int:
        return _HEADER_BYTES + self.rows * _BUCKET_WORDS * 8

    @property
    def size(self) -> int:
        return self.tags_offset + self.rows * 8


def _check_layout(capacity: object, window: object) -> _Layout:
    if not _is_int_in(capacity, 1, 2**41) or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two in [1, 2**41], got {capacity!r}")
    if not _is_int_in(window, 1, MAX_WINDOW):
        raise ValueError(f"window must be an int in [1, {MAX_WINDOW}], got {window!r}")
    return _Layout(capacity, window)


def _check_epoch(epoch: object) -> bytes:
    if not isinstance(epoch, str) or not epoch or not epoch.isascii() or len(epoch) > _EPOCH_BYTES or "\0" in epoch:
        raise ValueError(f"epoch must be 1 to {_EPOCH_BYTES} ASCII characters without NUL, got {epoch!r:.80}")
    return epoch.encode("ascii")


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {key!r:.80}")
    return key


def _check_private(st: os.stat_result, name: str) -> None:
    """Refuse a segment another user could have written (or could read)."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or mode != 0o600:
        raise ChunkIndexError(
            f"chunk index segment {name} must be a regular shared-memory object owned by uid {os.getuid()} "
            f"with mode 0o600, got {'a regular object' if stat.S_ISREG(st.st_mode) else 'a non-regular object'} "
            f"owned by uid {st.st_uid} with mode {oct(mode)}"
        )


class _Table:
    """numpy views of a mapped index segment (writable or not, as the mapping is)."""

    def __init__(self, mm: mmap.mmap, layout: _Layout) -> None:
        self.layout = layout
        self.mask = layout.capacity - 1
        self.valid = np.ndarray((1,), dtype="<u4", buffer=mm, offset=_VALID_OFFSET)
        self.buckets = np.ndarray((layout.rows, _BUCKET_WORDS), dtype="<u8", buffer=mm, offset=_HEADER_BYTES)
        self.tags = np.ndarray((layout.rows,), dtype="<u8", buffer=mm, offset=layout.tags_offset)
        self.seq = self.buckets[:, _SEQ]
        #: Row h is the window of home bucket h: tags[h : h + window], without a copy.
        self.tag_windows = np.lib.stride_tricks.sliding_window_view(self.tags, layout.window)[: layout.capacity]


@dataclass
class IndexWriterStats:
    #: puts that found their window full: that key is only found by a LOOKUP message.
    not_indexed: int = 0


class ChunkIndexWriter:
    """The daemon's side: the only process that writes the index. Build with ``create``.

    Not thread-safe: the daemon calls it from one thread at a time (the one that owns the pool).
    """

    def __init__(self, name: str, mm: mmap.mmap, layout: _Layout) -> None:
        self.name = name
        self._mm = mm
        self._table: _Table | None = _Table(mm, layout)
        self._bucket_of: dict[bytes, int] = {}
        self.stats = IndexWriterStats()

    @classmethod
    def create(
        cls, capacity: int, epoch: str, *, window: int = DEFAULT_WINDOW, name: str | None = None
    ) -> "ChunkIndexWriter":
        """A new, empty index segment (mode 0600) with ``capacity`` home buckets; see ``index_capacity``."""
        layout = _check_layout(capacity, window)
        epoch_bytes = _check_epoch(epoch)
        name = name or new_segment_name("lmcti")
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            # shm_open's mode is filtered by the umask; enforce 0600 regardless.
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, layout.size)
            mm = mmap.mmap(fd, layout.size)
        except BaseException:
            unlink_segment(name)
            raise
        finally:
            os.close(fd)
        _HEADER.pack_into(mm, 0, _MAGIC, FORMAT_VERSION, 0, layout.capacity, layout.window, 0, epoch_bytes)
        writer = cls(name, mm, layout)
        memory_fence()
        writer._live_table().valid[0] = 1
        return writer

    @property
    def capacity(self) -> int:
        return self._live_table().layout.capacity

    @property
    def window(self) -> int:
        return self._live_table().layout.window

    def __len__(self) -> int:
        """Keys in the index."""
        return len(self._bucket_of)

    def put(self, key: bytes, slab_id: int, generation: int) -> bool:
        """Map ``key`` to (``slab_id``, ``generation``), replacing its entry if it has one.

        False when the key's window is full: it is then not in the index (counted).
        """
        _check_key(key)
        if not _is_int_in(slab_id, 0, _MAX_U64):
            raise ValueError(f"slab_id must be an int in [0, 2**64), got {slab_id!r}")
        if not _is_int_in(generation, 0, _MAX_U64):
            raise ValueError(f"generation must be an int in [0, 2**64), got {generation!r}")
        table = self._live_table()
        words = _KEY_WORDS.unpack(key)
        bucket = self._bucket_of.get(key)
        if bucket is None:
            home = words[0] & table.mask
            window = table.buckets[home : home + table.layout.window, _STATE]
            free = int(window.argmin())
            if window[free] == _OCCUPIED:
                self.stats.not_indexed += 1
                return False
            bucket = home + free
            self._bucket_of[key] = bucket
        self._write(table, bucket, words, slab_id, generation, _OCCUPIED)
        return True

    def remove(self, key: bytes) -> bool:
        """Empty ``key``'s bucket; False when the index did not hold it."""
        bucket = self._bucket_of.pop(_check_key(key), None)
        if bucket is None:
            return False
        self._write(self._live_table(), bucket, (0, 0, 0, 0), 0, 0, 0)
        return True

    def clear(self) -> None:
        """Empty every bucket (each under its own counter, like a remove)."""
        table = self._live_table()
        table.seq |= 1
        memory_fence()
        table.buckets[:, _SEQ + 1 :] = 0
        table.tags[:] = 0
        memory_fence()
        table.seq += 1
        self._bucket_of.clear()

    def close(self, unlink: bool = True) -> None:
        """Mark the index invalid (readers then see only misses), unmap, and unlink the name
        unless ``unlink`` is False. Idempotent."""
        if self._table is None:
            return
        memory_fence()
        self._table.valid[0] = 0
        self._table = None
        if unlink:
            unlink_segment(self.name)
        _unmap(self._mm)

    def _write(
        self, table: _Table, bucket: int, words: tuple[int, int, int, int], slab_id: int, generation: int, state: int
    ) -> None:
        # |1 rather than +1: a counter left odd by an interrupted earlier write stays odd until this one ends.
        begin = table.seq[bucket] | 1
        table.seq[bucket] = begin
        memory_fence()
        row = table.buckets[bucket]
        row[_KEY] = words
        row[_SLAB] = slab_id
        row[_GENERATION] = generation
        row[_STATE] = state
        table.tags[bucket] = words[0]
        memory_fence()
        table.seq[bucket] = begin + 1

    def _live_table(self) -> _Table:
        if self._table is None:
            raise RuntimeError(f"chunk index {self.name} is closed")
        return self._table


@dataclass(frozen=True)
class IndexHits:
    """What ``ChunkIndexReader.probe_prefix`` found: ``slab_ids[i]``, ``generations[i]`` for key ``i``."""

    slab_ids: tuple[int, ...]
    generations: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.slab_ids)


_NO_HITS = IndexHits((), ())


@dataclass
class ProbeStats:
    #: re-reads of a bucket whose counter was odd or changed during a probe.
    retries: int = 0
    #: probes that stopped at a bucket still being rewritten after PROBE_ATTEMPTS reads.
    unstable_misses: int = 0


class ChunkIndexReader:
    """An engine's read-only view of the daemon's index. Build with ``open``."""

    def __init__(self, name: str, mm: mmap.mmap, layout: _Layout) -> None:
        self.name = name
        self.stats = ProbeStats()
        self._mm = mm
        self._table: _Table | None = _Table(mm, layout)

    @classmethod
    def open(cls, name: str, epoch: str) -> "ChunkIndexReader":
        """Map the index ``name`` (from the daemon's HELLO reply) read-only, after checking that it
        is a private segment of this user in this format, written by the daemon of ``epoch``."""
        epoch_bytes = _check_epoch(epoch)
        fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
        try:
            st = os.fstat(fd)
            _check_private(st, name)
            if st.st_size < _HEADER_BYTES:
                raise ChunkIndexError(
                    f"chunk index segment {name} is {st.st_size} bytes, smaller than its {_HEADER_BYTES}-byte header"
                )
            mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            layout = _check_header(mm, name, epoch_bytes, st.st_size)
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, layout)

    @property
    def valid(self) -> bool:
        """False once the writer has shut down (or this reader is closed)."""
        return self._table is not None and bool(self._table.valid[0])

    def probe_prefix(self, keys: Sequence[bytes]) -> IndexHits:
        """Slab ids and generations of the longest prefix of ``keys`` the index holds.

        Parameters
        ----------
        keys
            ``n`` chunk keys of ``KEY_BYTES`` bytes each, in prompt order.

        Returns
        -------
        ``IndexHits`` of ``num_chunks <= n`` entries: ``keys[i]`` was in slab ``slab_ids[i]`` under
        ``generations[i]`` at some instant during the call; the caller's post-copy generation check
        decides whether it still is. Empty when the index is shut down.
        """
        n = len(keys)
        blob = b"".join(keys)
        # One key of another length always changes the total. Lengths that cancel out only
        # re-split the same bytes into n keys of KEY_BYTES, which are then looked up as such.
        if len(blob) != n * KEY_BYTES:
            raise ValueError(f"keys must be {n} keys of {KEY_BYTES} bytes each, got {len(blob)} bytes in all")
        if not n or not self.valid:
            return _NO_HITS
        words = np.frombuffer(blob, dtype="<u8").reshape(n, 4)
        slab_ids: tuple[int, ...] = ()
        generations: tuple[int, ...] = ()
        for attempt in range(PROBE_ATTEMPTS):
            found_slabs, found_generations, unstable = self._probe_once(words[len(slab_ids) :])
            slab_ids += tuple(found_slabs.tolist())
            generations += tuple(found_generations.tolist())
            if len(slab_ids) == n or not unstable:
                break
            if attempt + 1 == PROBE_ATTEMPTS:
                self.stats.unstable_misses += 1
            else:
                self.stats.retries += 1
        return IndexHits(slab_ids, generations)

    def _probe_once(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """One vectorised pass over ``words`` (``(m, 4)`` uint64): the slab ids and generations of
        the longest confirmed prefix, and whether it stopped at a bucket that was being rewritten
        (worth another read). A key whose tag is in no bucket of its window reads bucket ``home``,
        fails the full-key comparison and is a plain miss."""
        table = self._table
        assert table is not None
        m = len(words)
        homes = (words[:, 0] & table.mask).view(np.intp)
        tagged = table.tag_windows[homes] == words[:, :1]
        buckets = homes + tagged.argmax(axis=1)
        seq_before = table.seq[buckets]
        memory_fence()
        entries = table.buckets.take(buckets, axis=0)
        memory_fence()
        seq_after = table.seq[buckets]
        # Equal to the first read with its low bit cleared: unchanged and even (counters never go down).
        stable = seq_after == (seq_before & _EVEN)
        same_key = (entries[:, _KEY] == words).view(np.uint32).ravel() == _ALL_FOUR_EQUAL
        confirmed = stable & same_key & (entries[:, _STATE] == _OCCUPIED)
        length = int(confirmed.argmin())
        if confirmed[length]:
            length = m
        unstable = length < m and not stable[length] and bool(tagged[length].any())
        return entries[:length, _SLAB], entries[:length, _GENERATION], unstable

    def close(self) -> None:
        """Unmap. Idempotent."""
        if self._table is None:
            return
        self._table = None
        _unmap(self._mm)


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        # Something still holds a view of the table: the mapping goes away with the last view.
        pass


def _check_header(mm: mmap.mmap, name: str, epoch: bytes, size: int) -> _Layout:
    magic, version, valid, capacity, window, _, seg_epoch = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC or version != FORMAT_VERSION:
        raise ChunkIndexError(
            f"chunk index segment {name}: expected magic {_MAGIC!r} version {FORMAT_VERSION}, got {magic!r} version {version}"
        )
    try:
        layout = _check_layout(capacity, window)
    except ValueError as exc:
        raise ChunkIndexError(f"chunk index segment {name}: {exc}") from None
    if size != layout.size:
        raise ChunkIndexError(
            f"chunk index segment {name} is {size} bytes, expected {layout.size} for capacity {capacity} and window {window}"
        )
    seg_epoch = seg_epoch.rstrip(b"\0")
    if seg_epoch != epoch:
        raise ChunkIndexError(f"chunk index segment {name} belongs to daemon epoch {seg_epoch!r}, expected {epoch!r}")
    if not valid:
        raise ChunkIndexError(f"chunk index segment {name} is not valid: its daemon shut it down")
    return layout
