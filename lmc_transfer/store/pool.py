"""A pool of fixed-size chunk slabs carved out of one host buffer.

The pool owns the index (key -> slab), the free list, LRU order over unpinned
committed slabs, leases (pins with deadlines) and reservations (slabs being
written). It never touches slab bytes itself: the buffer (a numpy uint8 array, so
the daemon needs no torch) may view pinned memory (IP mode) or a shared-memory
mapping (MP mode), and the generation array may live in shared memory so clients
can verify loads without asking.

Slab states: free -> (reserve) writing -> (commit) committed -> (evict/clear) free.
A slab's generation is bumped whenever ``reserve`` hands it out, i.e. before any
new bytes can land in it, so a reader that saw generation ``g`` at lookup and
still sees ``g`` after its copy read bytes nobody overwrote.

A reservation that expires may still have a writer: one that stalled mid-copy and
resumes later. Its slabs therefore get a new generation and sit in quarantine for
``quarantine_s`` before anyone can reserve them again, so such a late copy lands in
a slab nobody else has committed (a writer stalled for longer than the reservation's
TTL plus the quarantine could still tear one: the bound is stated, not infinite). A
commit after the deadline is refused. ``abort`` frees slabs at once: the writer
itself says it is done with them.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lmc_transfer.keys import check_keys
from lmc_transfer.store.base import Lease, Reservation

#: How long the slabs of an expired reservation stay out of use (see the module docstring).
QUARANTINE_S = 60.0

#: ``callback(key, slab_id)``; called with the pool lock held while the slab's bytes
#: are intact, so it must be quick and must not call back into the pool.
SlabCallback = Callable[[bytes, int], None]


class _SlabState(enum.Enum):
    FREE = 0
    WRITING = 1
    COMMITTED = 2


class _Kind(enum.Enum):
    LEASE = 0
    RESERVATION = 1


@dataclass(frozen=True)
class PoolStats:
    num_slabs: int
    used_slabs: int
    pinned_slabs: int
    committed_chunks: int
    evictions: int
    leases: int
    reservations: int
    quarantined_slabs: int = 0  # of expired reservations, not handed out yet (module docstring)


@dataclass
class _LeaseEntry:
    slab_ids: tuple[int, ...]
    deadline: float


@dataclass
class _ReservationEntry:
    keys: tuple[bytes, ...]  # the reserved keys only, parallel to slab_ids
    slab_ids: tuple[int, ...]
    deadline: float


def _check_ttl(ttl_s: float) -> float:
    if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not ttl_s > 0:
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
    return float(ttl_s)


class SlabPool:
    """Thread-safe slab allocator and chunk index over ``data`` (see module docstring)."""

    def __init__(
        self,
        data: np.ndarray,
        generations: np.ndarray,
        slab_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_evict: SlabCallback | None = None,
        on_commit: SlabCallback | None = None,
        quarantine_s: float = QUARANTINE_S,
    ) -> None:
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
            got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise TypeError(f"data must be a 1-D uint8 numpy array, got {got}")
        if not isinstance(generations, np.ndarray) or generations.dtype != np.uint64 or generations.ndim != 1:
            got = f"{generations.dtype} array of shape {generations.shape}" if isinstance(generations, np.ndarray) else type(generations).__name__
            raise TypeError(f"generations must be a 1-D uint64 numpy array, got {got}")
        if not isinstance(slab_bytes, int) or slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be a positive int, got {slab_bytes!r}")
        num_slabs = int(generations.shape[0])
        if num_slabs <= 0:
            raise ValueError("generations must have one entry per slab and at least one slab, got 0 entries")
        if data.size < num_slabs * slab_bytes:
            raise ValueError(
                f"data must hold num_slabs * slab_bytes = {num_slabs} * {slab_bytes} = {num_slabs * slab_bytes} bytes, got {data.size}"
            )
        if isinstance(quarantine_s, bool) or not isinstance(quarantine_s, (int, float)) or not quarantine_s >= 0:
            raise ValueError(f"quarantine_s must be a number of seconds >= 0, got {quarantine_s!r}")
        self._data = data
        self._gens = generations
        self._slab_bytes = slab_bytes
        self._num_slabs = num_slabs
        self._clock = clock
        self._on_evict = on_evict
        self._on_commit = on_commit
        self._quarantine_s = float(quarantine_s)
        # Re-entrant so that a misbehaving callback cannot deadlock the pool.
        self._lock = threading.RLock()
        self._state = [_SlabState.FREE] * num_slabs
        self._slab_key: list[bytes | None] = [None] * num_slabs
        self._pins = [0] * num_slabs
        # Popped from the end: slab 0 is handed out first.
        self._free = list(range(num_slabs - 1, -1, -1))
        # (time it may be handed out again, slab) of expired reservations; in time order.
        self._quarantine: deque[tuple[float, int]] = deque()
        self._index: dict[bytes, int] = {}  # committed key -> slab
        self._writing: set[bytes] = set()  # keys of reserved, uncommitted slabs
        self._lru: OrderedDict[int, None] = OrderedDict()  # committed, unpinned; oldest first
        self._leases: dict[int, _LeaseEntry] = {}
        self._reservations: dict[int, _ReservationEntry] = {}
        self._deadlines: list[tuple[float, int, _Kind]] = []  # heap; stale entries skipped
        self._ids = itertools.count(1)  # 0 is the id of every empty lease
        self._evictions = 0

    @property
    def num_slabs(self) -> int:
        return self._num_slabs

    @property
    def slab_bytes(self) -> int:
        return self._slab_bytes

    def slab(self, slab_id: int) -> np.ndarray:
        """uint8 view of one slab's bytes."""
        if not isinstance(slab_id, int) or not 0 <= slab_id < self._num_slabs:
            raise ValueError(f"slab_id must be an int in [0, {self._num_slabs}), got {slab_id!r}")
        start = slab_id * self._slab_bytes
        return self._data[start : start + self._slab_bytes]

    # -- loads ---------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], ttl_s: float) -> Lease:
        """Pin the longest prefix of ``keys`` that is committed; LRU-touch it on release."""
        keys = check_keys(keys)
        ttl_s = _check_ttl(ttl_s)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            slab_ids = []
            for key in keys:
                slab_id = self._index.get(key)
                if slab_id is None:
                    break
                slab_ids.append(slab_id)
            if not slab_ids:
                return Lease(lease_id=0, keys=keys, slab_ids=(), generations=(), deadline=now + ttl_s)
            self._pin_all(slab_ids)
            lease_id = next(self._ids)
            deadline = now + ttl_s
            self._leases[lease_id] = _LeaseEntry(tuple(slab_ids), deadline)
            heapq.heappush(self._deadlines, (deadline, lease_id, _Kind.LEASE))
            return Lease(
                lease_id=lease_id,
                keys=keys,
                slab_ids=tuple(slab_ids),
                generations=tuple(self._gens[slab_ids].tolist()),
                deadline=deadline,
            )

    def release(self, lease_id: int) -> None:
        """Unpin a lease's slabs; unknown, expired or already released ids are ignored."""
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._leases.pop(lease_id, None)
            if entry is not None:
                self._unpin_all(entry.slab_ids)

    def verify(self, slab_ids: Sequence[int], generations: Sequence[int]) -> int:
        """Leading count of slabs whose generation still equals the given one."""
        if len(slab_ids) != len(generations):
            raise ValueError(
                f"slab_ids and generations must have the same length, got {len(slab_ids)} and {len(generations)}"
            )
        for n, (slab_id, gen) in enumerate(zip(slab_ids, generations)):
            if int(self._gens[slab_id]) != int(gen):
                return n
        return len(slab_ids)

    # -- stores --------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes], ttl_s: float) -> Reservation:
        """Slabs for the keys not committed and not being written, in key order.

        Stops at the first key it cannot get a slab for (the pool is full of pinned
        or reserved slabs): a gap would make later chunks unreachable by prefix
        lookup; the distinct keys from there on that are neither committed nor being
        written are the reservation's ``no_room``. Committed keys of this same call are
        never evicted to make room.
        """
        keys = check_keys(keys)
        ttl_s = _check_ttl(ttl_s)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            protected = {self._index[k] for k in keys if k in self._index}
            chunk_indices: list[int] = []
            slab_ids: list[int] = []
            taken: set[bytes] = set()
            no_room = 0
            for i, key in enumerate(keys):
                if key in self._index or key in self._writing or key in taken:
                    continue
                slab_id = self._take_slab(protected)
                if slab_id is None:
                    no_room = len({k for k in keys[i:] if k not in self._index and k not in self._writing and k not in taken})
                    break
                taken.add(key)
                chunk_indices.append(i)
                slab_ids.append(slab_id)
            deadline = now + ttl_s
            if not slab_ids:
                return Reservation(0, keys, (), (), (), deadline, no_room)
            res_keys = tuple(keys[i] for i in chunk_indices)
            for key, slab_id in zip(res_keys, slab_ids):
                self._state[slab_id] = _SlabState.WRITING
                self._slab_key[slab_id] = key
                self._gens[slab_id] += np.uint64(1)
            self._writing.update(res_keys)
            res_id = next(self._ids)
            self._reservations[res_id] = _ReservationEntry(res_keys, tuple(slab_ids), deadline)
            heapq.heappush(self._deadlines, (deadline, res_id, _Kind.RESERVATION))
            return Reservation(
                reservation_id=res_id,
                keys=keys,
                chunk_indices=tuple(chunk_indices),
                slab_ids=tuple(slab_ids),
                generations=tuple(int(self._gens[s]) for s in slab_ids),
                deadline=deadline,
                no_room=no_room,
            )

    def commit(self, reservation_id: int) -> int:
        """Publish a reservation's slabs; 0 when it is unknown, expired or already done."""
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._reservations.pop(reservation_id, None)
            if entry is None:
                return 0
            for key, slab_id in zip(entry.keys, entry.slab_ids):
                self._writing.discard(key)
                self._state[slab_id] = _SlabState.COMMITTED
                self._index[key] = slab_id
                self._lru[slab_id] = None
                if self._on_commit is not None:
                    self._on_commit(key, slab_id)
            return len(entry.slab_ids)

    def abort(self, reservation_id: int) -> None:
        """Free a reservation's slabs without publishing them; idempotent."""
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._reservations.pop(reservation_id, None)
            if entry is not None:
                self._drop_reservation(entry)

    # -- maintenance ---------------------------------------------------------

    def expire(self) -> int:
        """Drop leases and reservations past their deadline; returns how many."""
        with self._lock:
            return self._expire_locked(self._clock())

    def clear(self) -> int:
        """Free every committed, unpinned slab; returns how many chunks were dropped."""
        with self._lock:
            self._expire_locked(self._clock())
            dropped = list(self._lru)
            for slab_id in dropped:
                self._free_committed(slab_id)
            return len(dropped)

    def contains(self, key: bytes) -> bool:
        """Whether ``key`` is committed (not merely being written)."""
        with self._lock:
            return key in self._index

    def committed_keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def stats(self) -> PoolStats:
        with self._lock:
            self._expire_locked(self._clock())
            return PoolStats(
                num_slabs=self._num_slabs,
                used_slabs=self._num_slabs - len(self._free),
                pinned_slabs=sum(1 for p in self._pins if p),
                committed_chunks=len(self._index),
                evictions=self._evictions,
                leases=len(self._leases),
                reservations=len(self._reservations),
                quarantined_slabs=len(self._quarantine),
            )

    # -- internals (lock held) -----------------------------------------------

    def _pin_all(self, slab_ids: Sequence[int]) -> None:
        pins, lru = self._pins, self._lru  # local names: this runs once per chunk of every lookup
        for slab_id in slab_ids:
            if pins[slab_id] == 0:
                lru.pop(slab_id, None)
            pins[slab_id] += 1

    def _unpin_all(self, slab_ids: Sequence[int]) -> None:
        for slab_id in slab_ids:
            self._pins[slab_id] -= 1
            if self._pins[slab_id] == 0 and self._state[slab_id] is _SlabState.COMMITTED:
                self._lru[slab_id] = None  # most recently used

    def _take_slab(self, protected: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next((s for s in self._lru if s not in protected), None)
        if victim is None:
            return None
        key = self._slab_key[victim]
        self._evictions += 1
        if self._on_evict is not None and key is not None:
            self._on_evict(key, victim)
        self._free_committed(victim)
        return self._free.pop()

    def _free_committed(self, slab_id: int) -> None:
        key = self._slab_key[slab_id]
        del self._index[key]
        del self._lru[slab_id]
        self._slab_key[slab_id] = None
        self._state[slab_id] = _SlabState.FREE
        self._free.append(slab_id)

    def _drop_reservation(self, entry: _ReservationEntry, quarantine_until: float | None = None) -> None:
        """Free the slabs, or with ``quarantine_until`` bump their generations and hold them until then."""
        for key, slab_id in zip(entry.keys, entry.slab_ids):
            self._writing.discard(key)
            self._slab_key[slab_id] = None
            self._state[slab_id] = _SlabState.FREE
            if quarantine_until is None:
                self._free.append(slab_id)
            else:
                self._gens[slab_id] += np.uint64(1)
                self._quarantine.append((quarantine_until, slab_id))

    def _expire_locked(self, now: float) -> int:
        quarantine = self._quarantine
        while quarantine and quarantine[0][0] <= now:
            self._free.append(quarantine.popleft()[1])
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, item_id, kind = heapq.heappop(self._deadlines)
            if kind is _Kind.LEASE:
                lease = self._leases.pop(item_id, None)
                if lease is not None:
                    self._unpin_all(lease.slab_ids)
                    expired += 1
            else:
                res = self._reservations.pop(item_id, None)
                if res is not None:
                    self._drop_reservation(res, quarantine_until=now + self._quarantine_s)
                    expired += 1
        return expired
