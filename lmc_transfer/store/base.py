"""The CacheStore contract shared by the in-process (IP) and daemon-backed (MP) stores.

Everything above this module (the layerwise scheduler, the radix adapter) talks
to a ``CacheStore`` and does not care where the pool lives. Both stores behave
the same in everything but where the pool lives:

- Life of a load: ``lookup(keys) -> Lease`` pins the longest cached prefix;
  ``load(lease, slots)`` copies those chunks into GPU slots and re-checks every
  slab's generation once the copy has finished; ``release(lease)`` unpins.
- Life of a store: ``reserve(keys) -> Reservation`` hands out slabs for the keys
  not cached yet (deduplicated); ``save(reservation, slots)`` gathers the KV of the
  reserved chunks into them and commits them once the copy has finished.
  ``abort(reservation)`` gives unused slabs back.
- Slots (``store.slots`` enforces it for both stores and the layerwise scheduler):
  a 1-D ``torch.int32`` or ``torch.int64`` tensor on the KV buffers' device with at
  least ``lease.num_chunks * chunk_size`` entries for a load (the first ones are
  filled, negative ones are padding the copy skips) or ``len(keys) * chunk_size``
  for a save (one per token of every key passed to ``reserve``, all inside the KV
  buffers); entries past those are ignored. A wrong type, shape or device raises
  before any copy; a save slot outside the buffers aborts the reservation uncommitted.
- Expiry: a copy into or out of leased or reserved slabs starts only while
  ``has_time_for_copy(deadline)`` holds (``COPY_MARGIN_S`` left, capped at a quarter
  of the lease TTL); otherwise a load loads nothing and a save drops its chunks.
- Stats (``StoreStats``): a key ``reserve`` skips counts as ``dedup_chunks`` when it
  is cached or being written already, as ``dropped_chunks`` when the pool had no
  slab for it; reserved chunks that a ``save`` or ``commit`` does not commit (expired,
  daemon gone) count as dropped too.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # the torch-free daemon imports Lease and Reservation from here
    import torch

#: Lease time a copy into or out of leased or reserved slabs must have left to start
#: (capped at a quarter of the TTL, so a short TTL still lets copies run).
COPY_MARGIN_S = 1.0


@dataclass(frozen=True)
class Lease:
    """A pinned prefix of cached chunks, valid until ``deadline`` (time.monotonic seconds).

    ``slab_ids[i]`` and ``generations[i]`` describe ``keys[i]``; only the first
    ``num_chunks`` keys of the lookup hit. An empty lease (``num_chunks == 0``)
    needs no release but accepts one.
    """

    lease_id: int
    keys: tuple[bytes, ...]
    slab_ids: tuple[int, ...]
    generations: tuple[int, ...]
    deadline: float

    @property
    def num_chunks(self) -> int:
        return len(self.slab_ids)


@dataclass(frozen=True)
class Reservation:
    """Slabs handed out for the keys of a store that were not cached yet.

    ``chunk_indices[i]`` is the position (in the ``keys`` passed to ``reserve``)
    of the chunk that goes into ``slab_ids[i]``. Keys already cached or being
    written by someone else are skipped; when the pool is full of pinned slabs
    fewer slabs than asked for come back (a partial store), never an error, and
    ``no_room`` counts the keys skipped for that reason alone.
    """

    reservation_id: int
    keys: tuple[bytes, ...]
    chunk_indices: tuple[int, ...]
    slab_ids: tuple[int, ...]
    generations: tuple[int, ...]
    deadline: float
    no_room: int = 0

    @property
    def num_chunks(self) -> int:
        return len(self.slab_ids)


@dataclass(frozen=True)
class LoadResult:
    """How many chunks of a lease really arrived intact (a prefix of the lease)."""

    chunks_loaded: int
    tokens_loaded: int


@dataclass
class StoreStats:
    lookups: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    loaded_bytes: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    dedup_chunks: int = 0
    dropped_chunks: int = 0
    evictions: int = 0
    generation_misses: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hit_chunks + self.miss_chunks
        return self.hit_chunks / total if total else 0.0

    # The counting rules of the contract (module docstring), one place for both stores.

    def count_lookup(self, lease: Lease) -> None:
        self.lookups += 1
        self.hit_chunks += lease.num_chunks
        self.miss_chunks += len(lease.keys) - lease.num_chunks

    def count_load(self, lease: Lease, chunks_loaded: int, bytes_per_chunk: int) -> None:
        self.generation_misses += lease.num_chunks - chunks_loaded
        self.loaded_bytes += chunks_loaded * bytes_per_chunk

    def count_reserve(self, reservation: Reservation) -> None:
        skipped = len(reservation.keys) - reservation.num_chunks
        self.dropped_chunks += reservation.no_room
        self.dedup_chunks += skipped - reservation.no_room

    def count_commit(self, reservation: Reservation, committed: int, slab_bytes: int) -> None:
        self.stored_chunks += committed
        self.stored_bytes += committed * slab_bytes
        self.dropped_chunks += reservation.num_chunks - committed


class CacheStore(abc.ABC):
    """One engine's view of a chunk cache; bound to that engine's KV buffers."""

    chunk_size: int

    @abc.abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> Lease:
        """Longest prefix of ``keys`` that is cached, pinned until the lease ends."""

    @abc.abstractmethod
    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        """Scatter the lease's chunks into the first ``num_chunks * chunk_size`` of ``slots``
        (the slot contract in the module docstring; a violation raises before any copy).

        Returns the prefix of chunks whose slab generations were unchanged after the
        copy; the caller must treat slots past ``tokens_loaded`` as garbage. Nothing
        is copied when ``has_time_for_copy(lease.deadline)`` does not hold.
        """

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Unpin a lease's slabs; idempotent."""

    @abc.abstractmethod
    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        """Slabs for the keys that are not cached yet."""

    @abc.abstractmethod
    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        """Gather ``slots`` (at least ``len(keys) * chunk_size`` slot indices, one row per
        token of all keys passed to ``reserve``, each inside the KV buffers: the slot
        contract in the module docstring) into the reserved slabs and commit them.
        Returns the number of chunks committed; a violation aborts the reservation and
        raises, and a reservation without ``has_time_for_copy`` left is dropped uncopied."""

    @abc.abstractmethod
    def abort(self, reservation: Reservation) -> None:
        """Give a reservation's slabs back without committing; idempotent."""

    @contextlib.contextmanager
    def _aborting_on_error(self, reservation: Reservation) -> Iterator[None]:
        """Abort ``reservation`` if the block raises: its keys must not stay "being written"
        until the TTL."""
        try:
            yield
        except BaseException:
            self.abort(reservation)
            raise

    # Primitives for callers that drive the copies themselves (the layerwise scheduler).

    @abc.abstractmethod
    def slab_views(self, slab_ids: Sequence[int]) -> list[torch.Tensor]:
        """Host uint8 views of whole slabs, addressable by the GPU kernels."""

    @abc.abstractmethod
    def verify(self, lease: Lease) -> int:
        """Number of leading lease chunks whose slab generations are unchanged; call it
        after the copy out of them has finished."""

    @abc.abstractmethod
    def commit(self, reservation: Reservation) -> int:
        """Publish reserved slabs whose copy has finished; returns chunks committed."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        ...

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop every unpinned chunk."""

    def clock(self) -> float:
        """The time base of lease and reservation deadlines (``time.monotonic`` unless a
        store is built with another one, e.g. a test's fake clock)."""
        return time.monotonic()

    @property
    @abc.abstractmethod
    def lease_ttl_s(self) -> float:
        """How long the leases and reservations this store hands out last."""

    def has_time_for_copy(self, deadline: float) -> bool:
        """Whether a copy into or out of slabs held until ``deadline`` may start now: past
        it their slabs may go to another writer while the copy still lands."""
        return deadline - self.clock() >= min(COPY_MARGIN_S, self.lease_ttl_s / 4)

    def close(self) -> None:
        """Release resources (sockets, mappings); the store is unusable afterwards."""
