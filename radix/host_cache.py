"""``HostCache``: what an lmc-transfer host cache adds to a radix tree, written once.

Two trees use it: our ``LMCRadixCache`` (over ``RadixCache``) and the SGLang plugin's cache
(over SGLang's own ``RadixCache``). The mixin holds the store, the policy
(``lmc_transfer.radix.policy``), the layerwise load counter, the stores in flight and the
per-request MP load-back markers; each tree keeps only what differs between the two trees'
APIs: ``match_prefix``/``init_load_back``/the store hook's signatures and the
``LoadBackTree`` operations (``node_in_tree``, ``attach_loaded``).

A tree using it must be a ``LoadBackTree`` with ``root_node``, ``disable``, ``page_size``,
``token_to_kv_pool_allocator``, ``_delete_leaf(node)`` and nodes with ``children``,
``value`` and ``lock_ref``, as both trees have; it calls ``_init_host_cache`` from its
constructor once the tree exists.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmc_transfer.config import LMCTransferConfig, Mode, load_config
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.keys import KeySalt
from lmc_transfer.radix.policy import HostHit, KeyNamespace, LMCPolicy, LoadBack, LoadOutcome, TpMinReduce
from lmc_transfer.store.base import CacheStore, Lease
from lmc_transfer.store.ip import IPStore
from lmc_transfer.transfer.layerwise import LayerTransferCounter, LayerwiseStore
from lmc_transfer.transfer.paths import Transfer

log = logging.getLogger(__name__)

#: SGLang's name for the mode enum (``LMCacheMode.MP``/``.IP``); it is the config's ``Mode``.
LMCacheMode = Mode


@dataclass(frozen=True)
class LoadBackMarker:
    """What ``init_load_back`` needs from the MP ``match_prefix`` of one request."""

    key: tuple[int, ...]  # the page-aligned key matched (a snapshot, not the request's list)
    value_numel: int  # tokens on the device at match time
    hit: HostHit  # holds the lease
    last_node: Any  # where the device prefix ended (the tree's node type)


@dataclass
class LoadBackStats:
    """Loads from the host cache into the tree, counted where they are attached."""

    loads: int = 0
    loaded_tokens: int = 0
    seconds: float = 0.0  # wall time of the load-backs (issue time only for async CUDA loads)


class HostCache:
    """The host-cache half of a radix tree (module docstring)."""

    def _init_host_cache(
        self,
        config: LMCTransferConfig | str | os.PathLike[str],
        buffers: KVBuffers,
        allocator: Any,
        *,
        model_id: str,
        tp_rank: int,
        tp_size: int,
        cache_salt: str | None,
        tp_min_reduce: TpMinReduce | None,
        store: CacheStore | None,
    ) -> None:
        """``config``: the YAML file (or a loaded config) whose ``mode`` picks MP or IP.
        ``store`` lets an engine keep an existing store (e.g. the IP pool across a tree
        rebuild); by default the mode's store is opened here and closed by
        ``release_host_resources``."""
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        if not isinstance(config, LMCTransferConfig):
            raise TypeError(f"config must be a path or an LMCTransferConfig, got {type(config).__name__}")
        self.config = config
        self.kv_buffers = buffers
        self._mode = config.mode
        self._owns_store = store is None
        if store is None:
            store = self._open_store(config, buffers)
        elif store.chunk_size != config.chunk_size:
            raise ValueError(f"store must use chunk_size={config.chunk_size} like the config, got {store.chunk_size}")
        self.store = store
        salt = KeySalt(model_id, buffers.geometry, tp_rank=tp_rank, tp_size=tp_size, cache_salt=cache_salt)
        self.policy = LMCPolicy(store, salt, allocator, page_size=self.page_size, tp_min_reduce=tp_min_reduce)
        self._on_cuda = buffers.device.type == "cuda"
        self._store_transfer = self._new_transfer()
        self._store_stream = torch.cuda.Stream(device=buffers.device) if self._on_cuda else None
        self.layer_transfer_counter = LayerTransferCounter(self._new_transfer(), layer_signals=config.layer_signals)
        self._in_flight_stores: list[tuple[Any, LayerwiseStore]] = []
        self._mp_load_back_markers: dict[str, LoadBackMarker] = {}
        self._torn_nodes: list[Any] = []  # torn IP loads, dropped once unlocked
        self.load_back_stats = LoadBackStats()

    @property
    def mode(self) -> Mode:
        return self._mode

    # ----- MP: lookup in match_prefix, load in init_load_back -----

    def _mark_host_hit(self, rid: str, key: Sequence[int], device_len: int, last_node: Any,
                       namespace: KeyNamespace | None = None) -> HostHit | None:
        """LOOKUP the chunks of ``key`` past the device prefix and keep the lease for ``rid``'s
        ``init_load_back``; None on a miss."""
        self.release_request(rid)  # a re-match (the request waited a round) replaces the old lease
        hit = self.policy.lookup(key, device_len, namespace)
        if hit is not None:
            self._mp_load_back_markers[rid] = LoadBackMarker(tuple(key[: hit.end]), device_len, hit, last_node)
        return hit

    def _load_marked_hit(self, rid: str, node: Any, max_tokens: int, node_name: str) -> LoadBack | None:
        """Load the hit ``_mark_host_hit`` kept for ``rid`` below ``node`` (at most ``max_tokens``);
        None when there is none. ``node`` (the argument called ``node_name``) must be the node
        that match returned; the lease is released either way."""
        marker = self._mp_load_back_markers.pop(rid, None)
        if marker is None:
            return None
        if marker.last_node is not node:
            self.store.release(marker.hit.lease)
            raise ValueError(
                f"request {rid}: {node_name} must be the node match_prefix returned ({marker.last_node!r}), got {node!r}"
            )
        return self._timed_load_back(marker.hit, node, marker.key, max_tokens=max_tokens)

    def release_request(self, rid: str) -> None:
        """Drop ``rid``'s pending load-back (its lease); for requests that end or
        are aborted without ``init_load_back``. Idempotent."""
        marker = self._mp_load_back_markers.pop(rid, None)
        if marker is not None:
            self.store.release(marker.hit.lease)

    # ----- IP: load in match_prefix, layerwise -----

    def _ip_load_back(self, key: Sequence[int], device_len: int, last_node: Any,
                      namespace: KeyNamespace | None = None) -> LoadBack | None:
        """IP mode: look up the chunks past the device prefix (in ``namespace``) and load them
        layerwise below ``last_node``; None when nothing was loaded."""
        self.finish_loads()  # the counter drives one load at a time
        if device_len == len(key):
            return None
        hit = self.policy.lookup(key, device_len, namespace)
        if hit is None:
            return None
        result = self._timed_load_back(hit, last_node, key, loader=self._layerwise_loader)
        return result if result.num_tokens else None

    def _timed_load_back(self, hit: HostHit, last_node: Any, key: Sequence[int], **kwargs: Any) -> LoadBack:
        start = time.perf_counter()
        result = self.policy.load_back(self, hit, last_node, key, **kwargs)
        stats = self.load_back_stats
        stats.seconds += time.perf_counter() - start
        stats.loads += 1
        stats.loaded_tokens += result.num_tokens
        return result

    def _layerwise_loader(self, lease: Lease, slots: torch.Tensor) -> LoadOutcome:
        counter = self.layer_transfer_counter
        if not self._on_cuda:
            counter.start_load(self.store, lease, slots)
            return LoadOutcome(counter.finish().tokens_loaded)
        # The slabs stay pinned by the lease while the copy runs behind the forward
        # pass; verify before, and let finish() re-check once it has landed.
        if not self.store.has_time_for_copy(lease.deadline):
            return LoadOutcome(0)
        expected = self.store.verify(lease) * self.store.chunk_size
        counter.start_load(self.store, lease, slots)

        def finish(unused: torch.Tensor) -> None:
            try:
                landed = counter.finish().tokens_loaded
                if landed < expected:
                    # The tree already holds these tokens (the forward pass read them while they
                    # landed); they must not serve anyone else.
                    log.error("layerwise load: %d of %d tokens changed during the copy; dropping them",
                              expected - landed, expected)
                    self._drop_torn(slots[landed:expected])
            finally:
                self.store.release(lease)
                if unused.numel():
                    self.token_to_kv_pool_allocator.free(unused)

        return LoadOutcome(expected, finish)

    def finish_loads(self) -> None:
        """Barrier for IP layerwise loads still in flight (a no-op on CPU and in MP)."""
        self.policy.finish_loads()
        self._drop_torn_nodes()

    def _drop_torn(self, torn_slots: torch.Tensor) -> None:
        """Mark every node holding one of ``torn_slots`` (and so its subtree, whose KV was
        computed from it) for removal; removed as soon as nothing locks it."""
        bad = set(torn_slots.tolist())
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if bad.intersection(child.value.tolist()):
                    self._torn_nodes.append(child)
                else:
                    stack.append(child)
        self._drop_torn_nodes()

    def _drop_torn_nodes(self) -> None:
        waiting = []
        for top in self._torn_nodes:
            if not self.node_in_tree(top):
                continue  # evicted meanwhile: its slots went back with it
            subtree, stack = [], [top]
            while stack:
                node = stack.pop()
                subtree.append(node)
                stack.extend(node.children.values())
            if any(node.lock_ref for node in subtree):
                waiting.append(top)  # a running request still reads it
                continue
            for node in reversed(subtree):  # children before their parents
                self.token_to_kv_pool_allocator.free(node.value)
                self._delete_leaf(node)
        self._torn_nodes = waiting

    # ----- storing -----

    def _store_path(self, token_ids: Sequence[int], slots: torch.Tensor, node: Any,
                    namespace: KeyNamespace | None = None) -> None:
        """Queue a store of the full chunks of ``token_ids`` (their tree ``slots``, ending at
        ``node``); the lock on ``node`` keeps those slots until the store commits."""
        self.inc_lock_ref(node)
        try:
            writer = self.policy.start_store(token_ids, slots, self._store_transfer, self._store_stream, namespace)
        except BaseException:
            self.dec_lock_ref(node)
            raise
        if writer is None:
            self.dec_lock_ref(node)
            return
        self._in_flight_stores.append((node, writer))
        self._reap_stores(block=False)

    def _reap_stores(self, block: bool) -> None:
        """Commit stores whose copies are done (all of them when ``block``) and unlock their nodes."""
        pending = []
        settle = []
        for node, writer in self._in_flight_stores:
            (settle if block or writer.done() else pending).append((node, writer))
        self._in_flight_stores = pending
        first_error: BaseException | None = None
        for node, writer in settle:
            try:
                writer.finish()
            except Exception as exc:  # a failed store is a dropped store; the node must still unlock
                log.error("store of %d chunks failed: %s", writer.reservation.num_chunks, exc)
                first_error = first_error or exc
            finally:
                self.dec_lock_ref(node)
        if first_error is not None and block:
            raise first_error

    def in_flight_stores(self) -> int:
        return len(self._in_flight_stores)

    # ----- eviction, cleanup -----

    def _settle_before_evict(self) -> None:
        if not self.disable:
            # Loads still landing write into slots that eviction would hand out again.
            self.finish_loads()
            self._reap_stores(block=True)

    def release_host_resources(self) -> None:
        """Settle loads and stores in flight, release every lease, close the store if owned.
        The device tree stays; the cache is unusable for host I/O afterwards."""
        try:
            self._settle_all()
        finally:
            if self._owns_store:
                self.store.close()

    # The tree's own methods, with the host cache settled first (this mixin comes first in the
    # MRO of both LMCRadixCache and the SGLang plugin, so super() is their radix tree).

    def evictable_size(self) -> int:
        self._reap_stores(block=False)
        return super().evictable_size()

    def reset(self) -> None:
        self._settle_all()
        super().reset()

    def _settle_all(self) -> None:
        if not hasattr(self, "_mp_load_back_markers"):
            return  # the tree's constructor runs reset() before _init_host_cache
        try:
            self.finish_loads()
            self._reap_stores(block=True)
        finally:
            for rid in list(self._mp_load_back_markers):
                self.release_request(rid)

    # ----- internals -----

    def _new_transfer(self) -> Transfer:
        return Transfer.for_config(self.kv_buffers, self.config)

    def _open_store(self, config: LMCTransferConfig, buffers: KVBuffers) -> CacheStore:
        if self._mode is Mode.MP:
            from lmc_transfer.store.mp_client import MPStore  # zmq only where MP is used

            return MPStore(config, buffers)
        return IPStore(config, buffers)
