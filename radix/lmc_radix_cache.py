"""``LMCRadixCache``: the radix prefix cache backed by an lmc-transfer chunk store.

Names and call order follow SGLang's LMCache radix cache:

- MP (``mode: mp`` in the YAML config; pool in the cache daemon). Two phases:
  ``match_prefix(key, req)`` matches the device tree, then LOOKUPs the rest and
  returns ``host_hit_length``; the lease is kept in a ``LoadBackMarker`` per
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

The load/store rules live in ``lmc_transfer.radix.policy`` and the host-cache glue in
``lmc_transfer.radix.host_cache`` (both shared with the SGLang plugin); this class only
adapts our ``RadixCache``'s API to them.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.host_cache import HostCache, LMCacheMode
from lmc_transfer.radix.policy import KeyNamespace, TpMinReduce
from lmc_transfer.radix.radix_cache import MatchResult, RadixCache, TreeNode
from lmc_transfer.radix.request import Req
from lmc_transfer.store.base import CacheStore

__all__ = ["LMCRadixCache", "LMCacheMode"]


class LMCRadixCache(HostCache, RadixCache):
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
        hit = self._mark_host_hit(req.rid, key, int(base.device_indices.numel()), base.last_device_node)
        if hit is None:
            return base
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
        result = self._load_marked_hit(req.rid, last_node, host_hit_length, "last_node")
        if result is None:
            return self._empty_indices(), last_node
        return result.indices, result.last_node

    def _ip_match_prefix(self, key: list[int], base: MatchResult) -> MatchResult:
        result = self._ip_load_back(key, int(base.device_indices.numel()), base.last_device_node)
        if result is None:
            return base
        node = result.last_node
        indices = torch.cat([base.device_indices, result.indices])
        return MatchResult(device_indices=indices, last_device_node=node, last_host_node=node)

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
        self._store_path(token_ids[:n], slots, node)

    # ----- eviction, cleanup -----

    def evict(self, num_tokens: int) -> int:
        self._settle_before_evict()
        return super().evict(num_tokens)

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
