"""The CacheStore contract shared by the in-process (IP) and daemon-backed (MP) stores.

Everything above this module (the layerwise scheduler, the radix adapter) talks
to a ``CacheStore`` and does not care where the pool lives.

Life of a load:  ``lookup(keys) -> Lease`` pins the longest cached prefix;
``load(lease, slots)`` copies those chunks into GPU slots and re-checks every
slab's generation once the copy has finished; ``release(lease)`` unpins.

Life of a store: ``reserve(keys) -> Reservation`` hands out slabs for the keys
not cached yet (deduplicated); ``save(reservation, slots)`` gathers the KV of the
reserved chunks into them and commits them once the copy has finished.
``abort(reservation)`` gives unused slabs back.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the torch-free daemon imports Lease and Reservation from here
    import torch


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
    fewer slabs than asked for come back (a partial store), never an error.
    """

    reservation_id: int
    keys: tuple[bytes, ...]
    chunk_indices: tuple[int, ...]
    slab_ids: tuple[int, ...]
    generations: tuple[int, ...]
    deadline: float

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


class CacheStore(abc.ABC):
    """One engine's view of a chunk cache; bound to that engine's KV buffers."""

    chunk_size: int

    @abc.abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> Lease:
        """Longest prefix of ``keys`` that is cached, pinned until the lease ends."""

    @abc.abstractmethod
    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        """Scatter the lease's chunks into ``slots`` (``num_chunks * chunk_size`` slot indices).

        Returns the prefix of chunks whose slab generations were unchanged after the
        copy; the caller must treat slots past ``tokens_loaded`` as garbage.
        """

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Unpin a lease's slabs; idempotent."""

    @abc.abstractmethod
    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        """Slabs for the keys that are not cached yet."""

    @abc.abstractmethod
    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        """Gather ``slots`` (``len(keys) * chunk_size`` slot indices, one row per token of
        all keys passed to ``reserve``) into the reserved slabs and commit them.
        Returns the number of chunks committed."""

    @abc.abstractmethod
    def abort(self, reservation: Reservation) -> None:
        """Give a reservation's slabs back without committing; idempotent."""

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

    def close(self) -> None:
        """Release resources (sockets, mappings); the store is unusable afterwards."""
