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
  (one pipelined round trip), fetches the hits in batches and copies each into a
  freshly reserved slab, which it commits. It stops at the first miss, invalid
  value, full pool or remote failure, and once ``timeout_s`` has passed; a
  failure is a shorter fill, never an error.

This module imports neither torch nor redis (``build_remote_tier`` imports redis).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.store.pool import SlabPool
from lmc_transfer.tiers.format import SlabFormat
from lmc_transfer.tiers.writeback import WriteBehind

if TYPE_CHECKING:
    from lmc_transfer.tiers.remote import RemoteTier

#: Bytes fetched per pipelined GET batch: bounds the memory a fill holds at once.
FETCH_BATCH_BYTES = 64 << 20
#: On close, how long the write in progress may take (each is bounded by the tier's timeouts).
_CLOSE_JOIN_S = 5.0


@dataclass(frozen=True)
class RemoteSyncStats:
    filled: int  # chunks copied from the remote tier into slabs (invalid values never get here)
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
        self._from_remote: set[bytes] = set()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("filled", "skipped_refill", "stale"), 0)
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
        """Bring the remote's leading run of ``keys`` into ``pool``; returns how many were copied.
        Stops after ``timeout_s``, or at ``deadline`` (``time.monotonic()``) if that comes first."""
        own = time.monotonic() + self._timeout_s
        deadline = own if deadline is None else min(own, deadline)
        present = self.tier.longest_prefix(keys)
        batch = max(1, FETCH_BATCH_BYTES // self._slab_bytes)
        filled = 0
        for start in range(0, present, batch):
            if time.monotonic() >= deadline:
                break
            part = list(keys[start : min(start + batch, present)])
            payloads = self.tier.fetch(part)
            for key, payload in zip(part, payloads):
                if pool.contains(key):
                    continue
                res = pool.reserve([key], ttl_s)
                if res.num_chunks == 0:
                    return self._done(filled)  # full of pinned slabs, or another client is writing it
                try:
                    self._slab(res.slab_ids[0])[:] = np.frombuffer(payload, dtype=np.uint8)
                except BaseException:
                    pool.abort(res.reservation_id)
                    raise
                with self._lock:
                    self._from_remote.add(key)
                if pool.commit(res.reservation_id) == 0:
                    with self._lock:
                        self._from_remote.discard(key)
                    return self._done(filled)
                filled += 1
            if len(payloads) < len(part):
                break
        return self._done(filled)

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
