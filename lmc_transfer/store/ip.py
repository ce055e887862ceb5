"""The in-process (IP) store: slab pool and index in the engine process.

Host memory is one pinned buffer when the KV buffers are on CUDA (so the kernels
can address it), plain CPU memory otherwise. Copies run through a ``Transfer`` on
a private stream (lmc_transfer/transfer/store_copies.py): ``load`` returns once its
copy has landed, ``save`` returns once its copy is queued and commits when it has
finished (``flush_stores`` waits for that); for copies that must overlap the forward
pass use ``lmc_transfer.transfer.layerwise``.

With ``remote_url`` set, commits are written behind to the Redis remote tier and
a lookup that misses fills the rest of its prefix from there (lmc_transfer.tiers.remote_sync).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch

from lmc_transfer.tiers.format import SlabFormat, geometry_digest
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.transfer.layerwise import chunk_slots, lease_slots
from lmc_transfer.store.pool import SlabPool
from lmc_transfer.tiers.remote_sync import RemoteSync, build_remote_tier
from lmc_transfer.store.base import (
    CacheStore,
    Lease,
    LoadResult,
    Reservation,
    StoreStats,
)
from lmc_transfer.transfer.paths import Transfer, TransferPath
from lmc_transfer.transfer.store_copies import StoreCopies

from lmc_transfer.config import LMCTransferConfig

#: How long ``close`` waits for queued saves to commit.
_CLOSE_TIMEOUT_S = 10.0


class IPStore(CacheStore):
    """``CacheStore`` over an in-process ``SlabPool``; safe to share between threads."""

    def __init__(
        self,
        config: LMCTransferConfig,
        buffers: KVBuffers,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, LMCTransferConfig):
            raise TypeError(f"config: expected LMCTransferConfig, got {type(config).__name__}")
        if not isinstance(buffers, KVBuffers):
            raise TypeError(f"buffers: expected KVBuffers, got {type(buffers).__name__}")
        self.chunk_size = config.chunk_size
        self.buffers = buffers
        self._ttl_s = config.lease_ttl_s
        self._clock = clock
        slab_bytes = buffers.geometry.slab_bytes(self.chunk_size)
        num_slabs = config.max_local_cpu_bytes // slab_bytes
        if num_slabs < 1:
            raise ValueError(
                f"max_local_cpu_size: {config.max_local_cpu_size} GB does not hold one slab of {slab_bytes} bytes "
                f"(chunk_size {self.chunk_size})"
            )
        on_cuda = buffers.device.type == "cuda"
        # The pool and the tiers see the buffer as numpy; the kernels get tensor views of it.
        data = torch.empty(num_slabs * slab_bytes, dtype=torch.uint8, pin_memory=on_cuda).numpy()
        generations = np.zeros(num_slabs, dtype=np.uint64)
        self._remote: RemoteSync | None = None
        if config.remote_url is not None:
            slab_format = SlabFormat(geometry_digest(buffers.geometry, self.chunk_size), slab_bytes)
            self._remote = RemoteSync(
                build_remote_tier(config, slab_format),
                data,
                generations,
                timeout_s=config.remote_timeout_ms / 1000,
                max_queue=config.remote_queue,
            )
        self._pool: SlabPool | None = SlabPool(
            data, generations, slab_bytes, clock=clock, on_commit=self._remote.on_commit if self._remote is not None else None
        )
        self.transfer = Transfer(
            buffers,
            self.chunk_size,
            path=TransferPath(config.transfer_path),
            staging_bytes=config.staging_bytes,
            max_programs=config.max_programs,
        )
        self._copies = StoreCopies(self.transfer, "ip-store")
        self._stats_lock = threading.Lock()
        self._stats = StoreStats()

    @property
    def pool(self) -> SlabPool:
        if self._pool is None:
            raise RuntimeError("IPStore is closed")
        return self._pool

    # -- loads ---------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> Lease:
        pool = self.pool
        lease = pool.lookup(keys, self._ttl_s)
        n = lease.num_chunks
        if self._remote is not None and n < len(lease.keys):
            first = lease
            try:
                if self._remote.fill(pool, first.keys[n:], self._ttl_s):
                    lease = pool.lookup(keys, self._ttl_s)
            except BaseException:
                pool.release(first.lease_id)
                raise
            if lease is not first:
                pool.release(first.lease_id)
        with self._stats_lock:
            self._stats.lookups += 1
            self._stats.hit_chunks += lease.num_chunks
            self._stats.miss_chunks += len(lease.keys) - lease.num_chunks
        return lease

    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        if lease.num_chunks == 0:
            return LoadResult(0, 0)
        slots = lease_slots(lease, slots, self.chunk_size)
        pool = self.pool
        # An expired lease may already have lost its slabs: not worth a copy.
        intact = pool.verify(lease.slab_ids, lease.generations) if self._clock() < lease.deadline else 0
        if intact:
            self._copies.load(slots[: intact * self.chunk_size], self.slab_views(lease.slab_ids[:intact]), layers)
            intact = pool.verify(lease.slab_ids[:intact], lease.generations[:intact])
        num_layers = self.buffers.num_layers if layers is None else len(layers)
        with self._stats_lock:
            self._stats.generation_misses += lease.num_chunks - intact
            self._stats.loaded_bytes += intact * num_layers * self.buffers.geometry.layer_bytes(self.chunk_size)
        return LoadResult(chunks_loaded=intact, tokens_loaded=intact * self.chunk_size)

    def release(self, lease: Lease) -> None:
        if lease.num_chunks:
            self.pool.release(lease.lease_id)

    def verify(self, lease: Lease) -> int:
        return self.pool.verify(lease.slab_ids, lease.generations)

    # -- stores --------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        pool = self.pool
        res = pool.reserve(keys, self._ttl_s)
        reserved = set(res.chunk_indices)
        skipped = [key for i, key in enumerate(res.keys) if i not in reserved]
        dedup = sum(1 for key in skipped if pool.contains(key))
        with self._stats_lock:
            self._stats.dedup_chunks += dedup
            self._stats.dropped_chunks += len(skipped) - dedup
        return res

    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        if reservation.num_chunks == 0:
            return 0
        if self._clock() >= reservation.deadline:
            # Its slabs may already belong to another writer: never copy into them.
            self.abort(reservation)
            return 0
        try:
            return self._copies.save(chunk_slots(reservation, slots, self.chunk_size),
                                     self.slab_views(reservation.slab_ids), commit=lambda: self.commit(reservation),
                                     abort=lambda: self.abort(reservation), queued=reservation.num_chunks)
        except BaseException:
            self.abort(reservation)
            raise

    def abort(self, reservation: Reservation) -> None:
        if reservation.num_chunks:
            self.pool.abort(reservation.reservation_id)

    def commit(self, reservation: Reservation) -> int:
        if reservation.num_chunks == 0:
            return 0
        committed = self.pool.commit(reservation.reservation_id)
        with self._stats_lock:
            self._stats.stored_chunks += committed
            self._stats.stored_bytes += committed * self.pool.slab_bytes
        return committed

    def clock(self) -> float:
        return self._clock()

    def slab_views(self, slab_ids: Sequence[int]) -> list[torch.Tensor]:
        pool = self.pool
        return [torch.from_numpy(pool.slab(s)) for s in slab_ids]

    # -- maintenance ---------------------------------------------------------

    def stats(self) -> StoreStats:
        pool_stats = self.pool.stats()
        with self._stats_lock:
            out = dataclasses.replace(self._stats, extra=dict(self._stats.extra))
        out.evictions = pool_stats.evictions
        out.extra.update(
            num_slabs=pool_stats.num_slabs,
            used_slabs=pool_stats.used_slabs,
            pinned_slabs=pool_stats.pinned_slabs,
            committed_chunks=pool_stats.committed_chunks,
        )
        return out

    def clear(self) -> None:
        self.pool.clear()

    def flush_stores(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued ``save`` has committed; True when none is left."""
        return self._copies.drain(timeout_s)

    def flush_remote(self, timeout_s: float) -> bool:
        """Wait (bounded) for the remote write-behind; True when nothing is left (or no remote)."""
        return self._remote.flush(timeout_s) if self._remote is not None else True

    def close(self) -> None:
        self._copies.close(_CLOSE_TIMEOUT_S)
        if self._remote is not None:
            self._remote.close()
        self._pool = None
