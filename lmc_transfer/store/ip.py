"""The in-process (IP) store: slab pool and index in the engine process.

Host memory is one pinned buffer when the KV buffers are on CUDA (so the kernels
can address it), plain CPU memory otherwise. Copies run through a ``Transfer`` on
a private stream (lmc_transfer/transfer/store_copies.py): ``load`` returns once its
copy has landed, ``save`` returns once its copy is queued and commits when it has
finished (``flush_stores`` waits for that); for copies that must overlap the forward
pass use ``lmc_transfer.transfer.layerwise``.

With ``remote_url`` set, commits are written behind to the Redis remote tier and
a lookup that misses fills the rest of its prefix from there (lmc_transfer.tiers.remote_sync).
The fill runs on a thread of its own, as the MP daemon runs it on its promotion thread: a
lookup waits for it at most ``remote_timeout_ms`` (a fill makes several round trips, each
bounded by that timeout). A fill still running then goes on behind the lookup until its own
time is up, and what it brings in is there for the next lookup. One fill runs at a time; a
lookup that finds one running does not wait for the remote.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch

from lmc_transfer.tiers.format import SlabFormat, geometry_digest
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.store.pool import SlabPool
from lmc_transfer.tiers.remote_sync import RemoteSync, build_remote_sync
from lmc_transfer.store.base import (
    CacheStore,
    Lease,
    LoadResult,
    Reservation,
    StoreStats,
)
from lmc_transfer.store.slots import chunk_slots, lease_slots
from lmc_transfer.transfer.paths import Transfer
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
        self._filler: concurrent.futures.ThreadPoolExecutor | None = None
        self._fill_job: concurrent.futures.Future[int] | None = None
        self._fill_wait_s = config.remote_timeout_ms / 1000
        self._fill_lock = threading.Lock()
        if config.remote_url is not None:
            slab_format = SlabFormat(geometry_digest(buffers.geometry, self.chunk_size), slab_bytes)
            self._remote = build_remote_sync(config, buffers.geometry, slab_format, data, generations)
            self._filler = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmc-remote-fill")
        self._pool: SlabPool | None = SlabPool(
            data, generations, slab_bytes, clock=clock, on_commit=self._remote.on_commit if self._remote is not None else None
        )
        self.transfer = Transfer.for_config(buffers, config)
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
                if self._fill_from_remote(pool, first.keys[n:]):
                    lease = pool.lookup(keys, self._ttl_s)
            except BaseException:
                pool.release(first.lease_id)
                raise
            if lease is not first:
                pool.release(first.lease_id)
        with self._stats_lock:
            self._stats.count_lookup(lease)
        return lease

    def _fill_from_remote(self, pool: SlabPool, keys: Sequence[bytes]) -> bool:
        """Whether the remote brought chunks of ``keys`` in within ``remote_timeout_ms`` (module docstring)."""
        assert self._remote is not None and self._filler is not None
        with self._fill_lock:
            if self._fill_job is not None and not self._fill_job.done():
                return False
            job = self._filler.submit(self._remote.fill, pool, keys, self._ttl_s)
            self._fill_job = job
        try:
            return job.result(timeout=self._fill_wait_s) > 0
        except concurrent.futures.TimeoutError:
            return False

    def load(self, lease: Lease, slots: torch.Tensor, layers: range | None = None) -> LoadResult:
        slots = lease_slots(lease, slots, self.chunk_size, self.buffers.device)
        if lease.num_chunks == 0:
            return LoadResult(0, 0)
        pool = self.pool
        # A lease about to expire may lose its slabs while the copy runs: not worth a copy.
        intact = pool.verify(lease.slab_ids, lease.generations) if self.has_time_for_copy(lease.deadline) else 0
        if intact:
            self._copies.load(slots[: intact * self.chunk_size], self.slab_views(lease.slab_ids[:intact]), layers)
            intact = pool.verify(lease.slab_ids[:intact], lease.generations[:intact])
        num_layers = self.buffers.num_layers if layers is None else len(layers)
        with self._stats_lock:
            self._stats.count_load(lease, intact, num_layers * self.buffers.geometry.layer_bytes(self.chunk_size))
        return LoadResult(chunks_loaded=intact, tokens_loaded=intact * self.chunk_size)

    def release(self, lease: Lease) -> None:
        if lease.num_chunks:
            self.pool.release(lease.lease_id)

    def verify(self, lease: Lease) -> int:
        return self.pool.verify(lease.slab_ids, lease.generations)

    # -- stores --------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        res = self.pool.reserve(keys, self._ttl_s)
        with self._stats_lock:
            self._stats.count_reserve(res)
        return res

    def save(self, reservation: Reservation, slots: torch.Tensor) -> int:
        with self._aborting_on_error(reservation):
            selected = chunk_slots(reservation, slots, self.chunk_size, self.buffers.device)
        if reservation.num_chunks == 0:
            return 0
        if not self.has_time_for_copy(reservation.deadline):
            # Its slabs may go to another writer while the copy lands: never copy into them.
            self.abort(reservation)
            with self._stats_lock:
                self._stats.count_commit(reservation, 0, self.pool.slab_bytes)
            return 0
        with self._aborting_on_error(reservation):
            return self._copies.save(selected, self.slab_views(reservation.slab_ids), commit=lambda: self.commit(reservation),
                                     abort=lambda: self.abort(reservation), queued=reservation.num_chunks)

    def abort(self, reservation: Reservation) -> None:
        if reservation.num_chunks:
            self.pool.abort(reservation.reservation_id)

    def commit(self, reservation: Reservation) -> int:
        if reservation.num_chunks == 0:
            return 0
        committed = self.pool.commit(reservation.reservation_id)
        with self._stats_lock:
            self._stats.count_commit(reservation, committed, self.pool.slab_bytes)
        return committed

    def clock(self) -> float:
        return self._clock()

    @property
    def lease_ttl_s(self) -> float:
        return self._ttl_s

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
        if self._filler is not None:
            self._filler.shutdown(wait=True)  # a fill in flight ends within its own timeout
        self._copies.close(_CLOSE_TIMEOUT_S)
        if self._remote is not None:
            self._remote.close()
        self._pool = None
