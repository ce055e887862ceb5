"""Connects one slab pool to a RemoteTier: write-behind of commits, prefix fill on misses.

Used by the MP daemon (one per pool, namespace = the pool's geometry digest) and,
when configured, by IPStore. Keys already carry the salt (model, tenant, TP
rank), so the namespace only has to separate slab formats.

- ``on_commit(key, slab_id)`` is the pool's commit hook: it runs under the pool
  lock, so it only queues (key, slab, generation). A writer thread copies the
  slab, drops the copy if the generation moved meanwhile (the slab was reused),
  and hands the bytes to ``RemoteTier.put_async`` (bounded; full means dropped
  and counted). Chunks that ``fill`` just brought in from the remote are not
  written back.
- ``fill(pool, keys, ttl_s)`` asks the remote for the longest prefix of ``keys``
  (one pipelined round trip), fetches the hits in batches and copies each into a
  freshly reserved slab, which it commits. It stops at the first miss, invalid
  value, full pool or remote failure, and once ``timeout_s`` has passed; a
  failure is a shorter fill, never an error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.store.pool import SlabPool

log = logging.getLogger(__name__)

#: Bytes fetched per pipelined GET batch: bounds the memory a fill holds at once.
FETCH_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class RemoteSyncStats:
    filled: int  # chunks copied from the remote tier into slabs
    rejected: int  # fetched values of the wrong size (never served)
    queued: int  # commits handed to the write-behind
    skipped_refill: int  # commits not written back because they came from the remote
    stale: int  # write-behind copies dropped because the slab was reused meanwhile
    queue_full: int  # commits dropped because the write-behind queue was full


def build_remote_tier(config: LMCTransferConfig, namespace: bytes):  # -> RemoteTier
    """A RemoteTier from the config's remote_* fields (redis is imported only here)."""
    from lmc_transfer.tiers.remote import RemoteTier, TLSOptions

    if config.remote_url is None:
        raise ValueError("config.remote_url: expected a Redis URL to build a remote tier, got None")
    tls = None
    if config.remote_url.startswith(("rediss://", "rediss+cluster://")):
        tls = TLSOptions(ca_certs=config.remote_tls_ca, certfile=config.remote_tls_cert, keyfile=config.remote_tls_key)
    return RemoteTier(
        config.remote_url,
        namespace=namespace,
        timeout_s=config.remote_timeout_ms / 1000,
        ttl_s=config.remote_ttl_s,
        max_queue=config.remote_queue,
        max_namespace_bytes=config.max_remote_bytes,
        username=config.remote_username,
        password=config.remote_password,
        tls=tls,
    )


class RemoteSync:
    """Write-behind and prefix fill between ``slab``/``generations`` and ``tier`` (module docstring)."""

    def __init__(
        self,
        tier,  # RemoteTier (or anything with put_async/longest_prefix/fetch/flush/close)
        digest: bytes,
        slab: Callable[[int], torch.Tensor],
        generations: np.ndarray,
        slab_bytes: int,
        *,
        timeout_s: float,
        max_queue: int = 64,
    ) -> None:
        if not isinstance(digest, bytes) or not digest:
            raise TypeError(f"digest: expected non-empty bytes, got {digest!r:.80}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        self.tier = tier
        self._digest = digest
        self._slab = slab
        self._gens = generations
        self._slab_bytes = slab_bytes
        self._timeout_s = timeout_s
        self._from_remote: set[bytes] = set()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("filled", "rejected", "queued", "skipped_refill", "stale", "queue_full"), 0)
        self._queue: queue.Queue[tuple[bytes, int, int] | None] = queue.Queue(maxsize=max_queue)
        self._writer = threading.Thread(target=self._write_loop, name="lmc-remote-sync", daemon=True)
        self._writer.start()

    # -- write-behind ----------------------------------------------------------

    def on_commit(self, key: bytes, slab_id: int) -> None:
        """The pool's commit hook: quick, never blocks (see module docstring)."""
        with self._lock:
            if key in self._from_remote:
                self._from_remote.discard(key)
                self._counts["skipped_refill"] += 1
                return
            try:
                self._queue.put_nowait((key, slab_id, int(self._gens[slab_id])))
            except queue.Full:
                self._counts["queue_full"] += 1
                return
            self._counts["queued"] += 1

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, slab_id, generation = item
                data = self._slab(slab_id).numpy().tobytes()
                if int(self._gens[slab_id]) != generation:
                    self._count("stale")
                    continue
                self.tier.put_async(key, data, self._digest)
            except Exception:  # a bad slab id or a closed tier must not kill the writer
                log.exception("remote write-behind failed for one chunk")
            finally:
                self._queue.task_done()

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
            payloads = self.tier.fetch(part, self._digest)
            for key, payload in zip(part, payloads):
                if pool.contains(key):
                    continue
                if len(payload) != self._slab_bytes:
                    self._count("rejected")
                    return self._done(filled)
                res = pool.reserve([key], ttl_s)
                if res.num_chunks == 0:
                    return self._done(filled)  # full of pinned slabs, or another client is writing it
                try:
                    self._slab(res.slab_ids[0]).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
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
        """Wait (bounded) until queued commits reached the tier and the tier wrote them."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return self.tier.flush(max(0.0, deadline - time.monotonic()))

    def stats(self) -> RemoteSyncStats:
        with self._lock:
            return RemoteSyncStats(**self._counts)

    def close(self) -> None:
        """Stop the writer (queued commits are dropped) and close the tier; idempotent."""
        if self._writer.is_alive():
            while True:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._writer.join()
        self.tier.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
