"""Connects one slab pool to a RemoteTier: write-behind of commits, prefix fill on misses.

Used by the MP daemon (one per pool) and, when configured, by IPStore. Keys already
carry the salt (model, tenant, TP rank), so the tier's namespace (the slab format's
geometry digest) only has to separate slab formats.

- ``on_commit(key, slab_id)`` is the pool's commit hook: it runs under the pool
  lock, so it only queues (key, slab, generation) on the write-behind
  (lmc_transfer.tiers.writeback; bounded, full means dropped and counted). Its
  thread encodes the slab into a value (one copy), drops it if the generation
  moved meanwhile (the slab was reused) and ``put``s it. Chunks that ``fill`` just
  brought in from the remote are not written back.
- ``fill(pool, keys, ttl_s)`` asks the remote for the longest prefix of ``keys``
  (one pipelined round trip) and fetches as much of it as pays for itself
  (lmc_transfer.tiers.remote_cost: never when recomputing those tokens is estimated
  to be faster; skips are counted): it reserves a slab per chunk and the tier reads
  the values straight into them, over several connections at once. Chunks that
  arrived valid are committed, the rest aborted. It stops at the first miss,
  invalid value, full pool or remote failure, and once ``timeout_s`` has passed; a
  failure is a shorter fill, never an error, and never a slab with wrong bytes.

This module imports neither torch nor redis (``build_remote_tier`` imports redis).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.kernels.geometry import KVGeometry
from lmc_transfer.store.base import Reservation
from lmc_transfer.store.pool import SlabPool
from lmc_transfer.tiers.format import SlabFormat
from lmc_transfer.tiers.remote_cost import FetchPolicy, RecomputeModel, estimate_params
from lmc_transfer.tiers.writeback import WriteBehind

if TYPE_CHECKING:
    from lmc_transfer.tiers.remote import RemoteTier

#: On close, how long the write in progress may take (each is bounded by the tier's timeouts).
_CLOSE_JOIN_S = 5.0


@dataclass(frozen=True)
class RemoteSyncStats:
    filled: int  # chunks copied from the remote tier into slabs (invalid values never get here)
    cost_skips: int  # fills that fetched nothing (more) because recomputing was estimated faster
    cost_skipped_chunks: int  # chunks the remote held that those fills left to recompute
    probes: int  # fetches made to measure the tier (no estimate yet, or the last one stale)
    queued: int  # commits handed to the write-behind
    skipped_refill: int  # commits not written back because they came from the remote
    stale: int  # write-behind copies dropped because the slab was reused meanwhile
    queue_full: int  # commits dropped: the write-behind queue was full, or closed
    write_failures: int  # write-behind items that raised (logged once per state change)


def build_remote_tier(config: LMCTransferConfig, slab_format: SlabFormat) -> RemoteTier:
    """A RemoteTier from the config's remote_* fields (redis is imported only here)."""
    from lmc_transfer.tiers.remote import RemoteTier, TLSOptions

    if config.remote_url is None:
        raise ValueError("config.remote_url: expected a Redis URL to build a remote tier, got None")
    tls = None
    if config.remote_url.startswith(("rediss://", "rediss+cluster://")):
        tls = TLSOptions(ca_certs=config.remote_tls_ca, certfile=config.remote_tls_cert, keyfile=config.remote_tls_key)
    return RemoteTier(
        config.remote_url,
        slab_format,
        timeout_s=config.remote_timeout_ms / 1000,
        ttl_s=config.remote_ttl_s,
        max_namespace_bytes=config.max_remote_bytes,
        username=config.remote_username,
        password=config.remote_password,
        tls=tls,
        connections=config.remote_connections,
    )


def build_remote_sync(
    config: LMCTransferConfig, geometry: KVGeometry, slab_format: SlabFormat, data: np.ndarray, generations: np.ndarray
) -> RemoteSync:
    """The RemoteSync of a pool over ``data``/``generations``, with its tier and cost rule from the config."""
    params = estimate_params(geometry) if config.remote_model_params_b is None else config.remote_model_params_b * 1e9
    tier = build_remote_tier(config, slab_format)
    policy = FetchPolicy(
        RecomputeModel.from_flops(params, config.remote_recompute_tflops * 1e12),
        config.chunk_size,
        slab_format.value_bytes,
        probe_chunks=tier.connections,
    )
    return RemoteSync(
        tier, data, generations, policy=policy, timeout_s=config.remote_timeout_ms / 1000, max_queue=config.remote_queue
    )


class RemoteSync:
    """Write-behind and prefix fill between the slabs in ``data`` and ``tier`` (module docstring).

    ``data`` is every slab's bytes back to back (1-D uint8), ``generations`` their generations.
    """

    def __init__(
        self,
        tier: RemoteTier,
        data: np.ndarray,
        generations: np.ndarray,
        *,
        policy: FetchPolicy,
        timeout_s: float,
        max_queue: int = 64,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        self.tier = tier
        self._format: SlabFormat = tier.format
        self._slab_bytes = self._format.payload_bytes
        self._data = data
        self._gens = generations
        self._timeout_s = timeout_s
        self._policy = policy
        self._from_remote: set[bytes] = set()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("filled", "cost_skips", "cost_skipped_chunks", "probes", "skipped_refill", "stale"), 0)
        self._writes: WriteBehind[tuple[bytes, int, int]] = WriteBehind(
            "remote-tier", self._write, max_items=max_queue
        )

    def _slab(self, slab_id: int) -> np.ndarray:
        return self._data[slab_id * self._slab_bytes : (slab_id + 1) * self._slab_bytes]

    # -- write-behind ----------------------------------------------------------

    def on_commit(self, key: bytes, slab_id: int) -> None:
        """The pool's commit hook: quick, never blocks (see module docstring)."""
        with self._lock:
            if key in self._from_remote:
                self._from_remote.discard(key)
                self._counts["skipped_refill"] += 1
                return
        self._writes.submit((key, slab_id, int(self._gens[slab_id])))

    def _write(self, item: tuple[bytes, int, int]) -> None:
        key, slab_id, generation = item
        value = self._format.encode(key, self._slab(slab_id))
        if int(self._gens[slab_id]) != generation:
            self._count("stale")
            return
        self.tier.put(key, value)

    # -- fill ------------------------------------------------------------------

    def fill(self, pool: SlabPool, keys: Sequence[bytes], ttl_s: float, *, deadline: float | None = None) -> int:
        """Bring the remote's leading run of ``keys`` into ``pool`` where that pays; returns how many
        chunks were copied. Stops after ``timeout_s``, or at ``deadline`` (``time.monotonic()``)
        if that comes first."""
        own = time.monotonic() + self._timeout_s
        deadline = own if deadline is None else min(own, deadline)
        keys = list(keys)
        if not self._policy.worth_asking(self.tier.throughput()):
            self._count("cost_skips")
            return 0
        present = self.tier.longest_prefix(keys)
        filled = start = 0
        while start < present:
            time_left = deadline - time.monotonic()
            if time_left <= 0:
                break
            plan = self._policy.plan(present - start, self.tier.throughput(), time_left)
            if plan.chunks == 0:
                self._count("cost_skips")
                self._count("cost_skipped_chunks", present - start)
                break
            if plan.probe:
                self._count("probes")
            copied, complete = self._fetch(pool, keys[start : start + plan.chunks], ttl_s, deadline)
            filled += copied
            if not complete:
                break
            start += plan.chunks
        return self._done(filled)

    def _fetch(self, pool: SlabPool, keys: list[bytes], ttl_s: float, deadline: float) -> tuple[int, bool]:
        """Reserve a slab for each of ``keys`` that ``pool`` lacks, have the tier read the values
        into them, commit those that arrived valid: (chunks committed, whether all of ``keys`` are
        in the pool now)."""
        wanted: list[tuple[bytes, Reservation]] = []
        complete = True
        try:
            for key in keys:
                if pool.contains(key):
                    continue
                res = pool.reserve([key], ttl_s)
                if res.num_chunks == 0:  # full of pinned slabs, or another client is writing it
                    complete = False
                    break
                wanted.append((key, res))
            arrived = self.tier.fetch_into(
                [key for key, _ in wanted], [self._slab(res.slab_ids[0]) for _, res in wanted], deadline
            ) if wanted else 0
        except BaseException:
            for _, res in wanted:
                pool.abort(res.reservation_id)
            raise
        committed = 0
        for i, (key, res) in enumerate(wanted):
            # Contiguous from the first: after one that did not arrive or commit, the prefix has ended.
            if i == committed < arrived and self._commit(pool, key, res):
                committed += 1
            else:
                pool.abort(res.reservation_id)  # its bytes are never served
        return committed, complete and committed == len(wanted)

    def _commit(self, pool: SlabPool, key: bytes, res: Reservation) -> bool:
        with self._lock:
            self._from_remote.add(key)
        if pool.commit(res.reservation_id):
            return True
        with self._lock:
            self._from_remote.discard(key)
        return False

    def _done(self, filled: int) -> int:
        self._count("filled", filled)
        return filled

    # -- lifecycle -------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until queued commits reached the tier."""
        return self._writes.flush(timeout_s)

    def stats(self) -> RemoteSyncStats:
        writes = self._writes.stats()
        with self._lock:
            return RemoteSyncStats(
                **self._counts, queued=writes.submitted, queue_full=writes.dropped, write_failures=writes.failed
            )

    def close(self) -> None:
        """Stop the write-behind (queued commits are dropped, counted) and close the tier; idempotent."""
        self._writes.close(_CLOSE_JOIN_S, drop_queued=True)
        self.tier.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
