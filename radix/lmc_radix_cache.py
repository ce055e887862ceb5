"""``LMCRadixCache``: the radix prefix cache backed by an lmc-transfer chunk store.

Names and call order follow SGLang's LMCache radix cache:

- MP (``mode: mp`` in the YAML config; pool in the cache daemon). Two phases:
  ``match_prefix(key, req)`` matches the device tree, then LOOKUPs the rest and
  returns ``host_hit_length``; the lease is kept in a ``_LoadBackMarker`` per
  request id. The scheduler then calls ``init_load_back(last_node,
  host_hit_length, req)``, which allocates slots, loads, and attaches a node.
- IP (``mode: ip``; pool in this process). One phase: ``match_prefix`` loads
  directly through a ``LayerTransferCounter`` (exposed as
  ``layer_transfer_counter``; the engine's attention calls ``wait_until(layer)``).
  On CUDA the copy overlaps the forward pass and is finished at the next cache
  operation (or ``finish_loads()``); on CPU it is synchronous.
- ``cache_finished_req`` / ``cache_unfinished_req`` store the full chunks of the
  request (the store's reserve deduplicates), holding a lock ref on the node
  until the store has committed.
- A request that ends without ``init_load_back`` releases its lease through
  ``release_request`` (``cache_finished_req`` does it too); ``reset`` and
  ``release_host_resources`` settle everything in flight.

The load/store rules themselves live in ``lmc_policy`` so an SGLang plugin can
reuse them; this class only adapts our ``RadixCache`` to ``LoadBackTree``.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmc_transfer.config import LMCTransferConfig, Mode, load_config
from lmc_transfer.store.ip import IPStore
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.keys import KeySalt
from lmc_transfer.transfer.layerwise import LayerTransferCounter, LayerwiseStore
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.policy import HostHit, KeyNamespace, LMCPolicy, LoadBack, LoadOutcome, TpMinReduce
from lmc_transfer.radix.radix_cache import MatchResult, RadixCache, TreeNode
from lmc_transfer.radix.request import Req
from lmc_transfer.store.base import CacheStore, Lease
from lmc_transfer.transfer.paths import Transfer, TransferPath

log = logging.getLogger(__name__)


class LMCacheMode(enum.Enum):
    MP = "mp"  # pool in the cache daemon (two-phase load)
    IP = "ip"  # pool in this process (one-phase layerwise load)

    @classmethod
    def from_config(cls, config: LMCTransferConfig) -> "LMCacheMode":
        return cls.MP if config.mode is Mode.MP else cls.IP


@dataclass(frozen=True)
class _LoadBackMarker:
    """What ``init_load_back`` needs from the MP ``match_prefix`` of one request."""

    key: tuple[int, ...]  # the page-aligned key matched (a snapshot, not the request's list)
    value_numel: int  # tokens on the device at match time
    hit: HostHit  # holds the lease
    last_node: TreeNode  # where the device prefix ended


@dataclass
class LoadBackStats:
    """Loads from the host cache into the tree, counted where they are attached."""

    loads: int = 0
    loaded_tokens: int = 0
    seconds: float = 0.0  # wall time of the load-backs (issue time only for async CUDA loads)


class LMCRadixCache(RadixCache):
    def __init__(
        self,
        allocator: TokenSlotAllocator,
        page_size: int = 1,
        disable: bool = False,
        *,
        config: LMCTransferConfig | str | os.PathLike[str],
        model_id: str,
        kv_buffers: KVBuffers | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        cache_salt: str | None = None,
        tp_min_reduce: TpMinReduce | None = None,
        store: CacheStore | None = None,
    ) -> None:
        """``config``: the YAML file (or a loaded config) whose ``mode`` picks MP or IP.
        ``kv_buffers`` default to ``allocator.get_kvcache()``. ``store`` lets an engine
        keep an existing store (e.g. the IP pool across a tree rebuild); by default
        the mode's store is created here and closed by ``release_host_resources``."""
        super().__init__(allocator, page_size=page_size, disable=disable)
        buffers = kv_buffers if kv_buffers is not None else allocator.get_kvcache()
        if not isinstance(buffers, KVBuffers):
            raise TypeError(
                f"kv_buffers must be a KVBuffers (or the allocator's kvcache one), got {type(buffers).__name__}"
            )
        if buffers.num_slots < allocator.size:
            raise ValueError(f"kv_buffers must hold the allocator's {allocator.size} slots, got {buffers.num_slots}")
        self._init_host_cache(config, buffers, allocator, model_id=model_id, tp_rank=tp_rank, tp_size=tp_size,
                              cache_salt=cache_salt, tp_min_reduce=tp_min_reduce, store=store)

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
        """Everything the host cache adds to a radix tree; the SGLang plugin's cache (a
        subclass of SGLang's own RadixCache) runs this same method."""
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        if not isinstance(config, LMCTransferConfig):
            raise TypeError(f"config must be a path or an LMCTransferConfig, got {type(config).__name__}")
        self.config = config
        self.kv_buffers = buffers
        self._mode = LMCacheMode.from_config(config)
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
        self._in_flight_stores: list[tuple[TreeNode, LayerwiseStore]] = []
        self._mp_load_back_markers: dict[str, _LoadBackMarker] = {}
        self._torn_nodes: list[TreeNode] = []  # torn IP loads, dropped once unlocked
        self.load_back_stats = LoadBackStats()

    @property
    def mode(self) -> LMCacheMode:
        return self._mode

    # ----- matching and loading -----

    def match_prefix(self, key: Sequence[int], req: Req | None = None) -> MatchResult:  # type: ignore[override]
        """Device prefix first; then MP: LOOKUP (``host_hit_length``), IP: load directly.

        MP needs ``req`` (its rid keys the lease until ``init_load_back``); without
        one the result is the device match only, as in SGLang.
        """
        base = super().match_prefix(key)
        if self.disable:
            return base
        key = self._page_aligned(list(key))
        if self._mode is LMCacheMode.MP:
            if req is None:
                return base
            return self._mp_match_prefix(key, base, req)
        return self._ip_match_prefix(key, base)

    def _mp_match_prefix(self, key: list[int], base: MatchResult, req: Req) -> MatchResult:
        self.release_request(req.rid)  # a re-match (the request waited a round) replaces the old lease
        value_numel = int(base.device_indices.numel())
        hit = self.policy.lookup(key, value_numel)
        if hit is None:
            return base
        self._mp_load_back_markers[req.rid] = _LoadBackMarker(tuple(key[: hit.end]), value_numel, hit, base.last_device_node)
        node = base.last_device_node
        return MatchResult(
            device_indices=base.device_indices, last_device_node=node, last_host_node=node, host_hit_length=hit.host_hit_length
        )

    def init_load_back(
        self, last_node: TreeNode, host_hit_length: int, req: Req
    ) -> tuple[torch.Tensor, TreeNode]:
        """Load the host hit found by ``match_prefix`` for ``req`` (MP).

        Returns the tree slots of the newly loaded tokens (to append to the
        request's prefix indices) and the node the prefix now ends at. Loads at
        most ``host_hit_length`` tokens; on any failure, fewer (possibly none:
        the request recomputes them). ``last_node`` must be the node
        ``match_prefix`` returned; the lease is released either way.
        """
        marker = self._mp_load_back_markers.pop(req.rid, None)
        if marker is None:
            return self._empty_indices(), last_node
        if marker.last_node is not last_node:
            self.store.release(marker.hit.lease)
            raise ValueError(
                f"request {req.rid}: last_node must be the node match_prefix returned ({marker.last_node!r}), got {last_node!r}"
            )
        result = self._timed_load_back(marker.hit, last_node, marker.key, max_tokens=host_hit_length)
        return result.indices, result.last_node

    def _ip_match_prefix(self, key: list[int], base: MatchResult) -> MatchResult:
        result = self._ip_load_back(key, int(base.device_indices.numel()), base.last_device_node)
        if result is None:
            return base
        node = result.last_node
        indices = torch.cat([base.device_indices, result.indices])
        return MatchResult(device_indices=indices, last_device_node=node, last_host_node=node)

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

    def _timed_load_back(self, hit: HostHit, last_node: TreeNode, key: Sequence[int], **kwargs) -> LoadBack:
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

    def cache_finished_req(self, req: Req, is_insert: bool = True) -> None:
        self.release_request(req.rid)
        self.finish_loads()
        super().cache_finished_req(req, is_insert=is_insert)
        self._drop_torn_nodes()  # the request's lock is gone now
        if is_insert and not self.disable:
            self._store_prefix(req.fill_ids)

    def cache_unfinished_req(self, req: Req) -> None:
        self.finish_loads()
        super().cache_unfinished_req(req)
        if not self.disable:
            self._store_prefix(req.fill_ids)

    def _store_prefix(self, token_ids: list[int]) -> None:
        """Queue a store of the full chunks of ``token_ids`` from the tree's slots."""
        n = len(self._page_aligned(token_ids)) // self.store.chunk_size * self.store.chunk_size
        if n == 0:
            return
        # The device tree only: the tokens were just inserted.
        values, node = self._match_prefix_helper(self.root_node, token_ids[:n])
        slots = torch.cat(values) if values else self._empty_indices()
        if slots.numel() != n:
            return  # part of it was never inserted (disable, or a racing eviction): nothing safe to store
        self.inc_lock_ref(node)
        try:
            writer = self.policy.start_store(token_ids[:n], slots, self._store_transfer, self._store_stream)
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

    def evict(self, num_tokens: int) -> int:
        self._settle_before_evict()
        return super().evict(num_tokens)

    def _settle_before_evict(self) -> None:
        if not self.disable:
            # Loads still landing write into slots that eviction would hand out again.
            self.finish_loads()
            self._reap_stores(block=True)

    def evictable_size(self) -> int:
        self._reap_stores(block=False)
        return super().evictable_size()

    def release_request(self, rid: str) -> None:
        """Drop ``rid``'s pending load-back (its lease); for requests that end or
        are aborted without ``init_load_back``. Idempotent."""
        marker = self._mp_load_back_markers.pop(rid, None)
        if marker is not None:
            self.store.release(marker.hit.lease)

    def reset(self) -> None:
        self._settle_all()
        super().reset()

    def release_host_resources(self) -> None:
        """Settle loads and stores in flight, release every lease, close the store if owned.
        The device tree stays; the cache is unusable for host I/O afterwards."""
        try:
            self._settle_all()
        finally:
            if self._owns_store:
                self.store.close()

    def _settle_all(self) -> None:
        if not hasattr(self, "_mp_load_back_markers"):
            return  # RadixCache.__init__ has not finished building us
        try:
            self.finish_loads()
            self._reap_stores(block=True)
        finally:
            for rid in list(self._mp_load_back_markers):
                self.release_request(rid)

    # ----- LoadBackTree -----

    def node_in_tree(self, node: TreeNode) -> bool:
        try:
            self._check_in_tree(node)
        except ValueError:
            return False
        return True

    def attach_loaded(self, node: TreeNode, key: list[int], slots: torch.Tensor,
                      namespace: KeyNamespace | None = None) -> tuple[torch.Tensor, TreeNode]:
        # This tree's one namespace is its constructor's cache_salt: lookups never pass another.
        if namespace is not None:
            raise ValueError(f"namespace: LMCRadixCache has no per-request namespaces, got {namespace!r}")
        present = self._insert_helper(node, key, slots)
        if present:
            # Inserted meanwhile by another request: the tree's slots win, ours are duplicates.
            self.token_to_kv_pool_allocator.free(slots[:present])
        values, last = self._match_prefix_helper(node, key)
        return torch.cat(values), last

    # ----- internals -----

    def _new_transfer(self) -> Transfer:
        return Transfer(
            self.kv_buffers,
            self.config.chunk_size,
            path=TransferPath(self.config.transfer_path),
            staging_bytes=self.config.staging_bytes,
            max_programs=self.config.max_programs,
        )

    def _open_store(self, config: LMCTransferConfig, buffers: KVBuffers) -> CacheStore:
        if self._mode is LMCacheMode.MP:
            from lmc_transfer.store.mp_client import MPStore  # zmq only where MP is used

            return MPStore(config, buffers)
        return IPStore(config, buffers)
