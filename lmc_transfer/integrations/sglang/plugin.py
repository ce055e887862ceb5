"""SGLang radix-cache backend ``lmc_transfer`` (SGLang's ``--radix-cache-backend`` registry).

Importing this module registers the backend with the installed SGLang; SGLang
0.5.23 is the supported release (``SUPPORTED_SGLANG_VERSIONS``), any other raises
``SGLangUnavailable`` naming the installed version. Launch::

    LMC_TRANSFER_CONFIG=lmc.yaml python -m sglang.launch_server --model-path M \\
        --radix-cache-backend lmc_transfer

(``--lmcache-config-file lmc.yaml`` works instead of the variable.) SGLang imports
this module in each of its processes through the ``sglang.srt.plugins`` entry point
``lmc_transfer = "lmc_transfer.integrations.sglang.plugin:register"``.

``LMCSGLangRadixCache`` subclasses SGLang's own ``RadixCache`` and adds the host
cache of ``lmc_transfer.radix.host_cache`` with the rules of ``lmc_transfer.radix.policy``
(the same ones our ``LMCRadixCache`` uses):

- MP (``mode: mp``): ``match_prefix`` LOOKUPs past the device prefix and reports
  ``host_hit_length``; ``init_load_back`` loads and attaches the node. SGLang
  0.5.23's scheduler takes all promised tokens or none, so a load that comes
  back shorter (daemon gone, slabs evicted) reports 0: the request recomputes,
  and the part that did arrive intact stays in the tree for later requests.
- IP (``mode: ip``): ``match_prefix`` loads directly through the layerwise
  counter, which the factory registers with SGLang's KV pool.
- ``checkpoint`` stores the new full chunks of the request (SGLang calls it at
  every chunked-prefill checkpoint and when the request finishes);
  ``on_release`` drops a lease the request never used.

A request's ``extra_key`` (LoRA adapter, caller-defined class) and ``cache_salt``
make its ``KeyNamespace``: its chunks get keys of their own and load back under a
``RadixKey`` of that namespace, so KV is shared only where SGLang's own tree would
share it.
EAGLE bigram keys and pipeline parallelism are not supported (ValueError).
"""

from __future__ import annotations

import importlib
import logging
import os
from array import array
from typing import Any, Callable, Optional

import torch

from lmc_transfer.config import LMCTransferConfig
from lmc_transfer.integrations.sglang.importer import import_mem_cache
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.host_cache import HostCache, LMCacheMode
from lmc_transfer.radix.policy import KeyNamespace, TpMinReduce
from lmc_transfer.store.base import CacheStore

log = logging.getLogger(__name__)

SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)
BACKEND_NAME = "lmc_transfer"
#: Environment variable naming the YAML config (wins over ``--lmcache-config-file``).
CONFIG_ENV = "LMC_TRANSFER_CONFIG"

_FEATURE = "lmc_transfer.integrations.sglang.plugin"
_radix = import_mem_cache("radix_cache", SUPPORTED_SGLANG_VERSIONS, _FEATURE)
_base = importlib.import_module("sglang.srt.mem_cache.base_prefix_cache")
_registry = importlib.import_module("sglang.srt.mem_cache.registry")

RadixKey = _radix.RadixKey
TreeNode = _radix.TreeNode
EvictParams = _base.EvictParams
MatchResult = _base.MatchResult


def kv_buffers_from_pool(kvcache: Any) -> KVBuffers:
    """Our view of an SGLang KV pool: ``k_buffer``/``v_buffer`` (MHA) or ``kv_buffer`` (MLA)."""
    k, v = getattr(kvcache, "k_buffer", None), getattr(kvcache, "v_buffer", None)
    if k is not None and v is not None:
        return KVBuffers.token_slot(list(k), list(v))
    kv = getattr(kvcache, "kv_buffer", None)
    if kv is not None:
        return KVBuffers.mla(list(kv))
    raise TypeError(
        f"kvcache: expected an SGLang KV pool with k_buffer/v_buffer (MHA) or kv_buffer (MLA), got {type(kvcache).__name__}"
    )


class LMCSGLangRadixCache(HostCache, _radix.RadixCache):
    """SGLang's ``RadixCache`` with an lmc-transfer host cache (see module docstring)."""

    def __init__(
        self,
        params: Any,
        *,
        config: LMCTransferConfig | str | os.PathLike[str],
        model_id: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_min_reduce: TpMinReduce | None = None,
        store: CacheStore | None = None,
    ) -> None:
        """``params``: SGLang's ``CacheInitParams``. ``config``: the YAML file (or a loaded
        config) whose ``mode`` picks MP or IP. ``store``: an existing store to use
        instead of opening the mode's own (closed by ``release_host_resources`` only
        when opened here)."""
        if params.is_eagle:
            raise ValueError("params.is_eagle: EAGLE bigram keys are not supported by the lmc_transfer backend, got True")
        super().__init__(params)
        allocator = self.token_to_kv_pool_allocator
        self._init_host_cache(config, kv_buffers_from_pool(allocator.get_kvcache()), allocator, model_id=model_id,
                              tp_rank=tp_rank, tp_size=tp_size, cache_salt=None, tp_min_reduce=tp_min_reduce,
                              store=store)

    # ----- matching and loading -----

    def match_prefix(self, params: Any) -> Any:
        base = super().match_prefix(params)
        if self.disable:
            return base
        key = params.key
        namespace = KeyNamespace.of(key.extra_key, key.cache_salt)
        tokens = list(key.page_aligned(self.page_size).raw_token_ids())
        if self._mode is LMCacheMode.MP:
            if params.req is None:
                return base
            return self._mp_match_prefix(tokens, base, params.req.rid, namespace)
        return self._ip_match_prefix(tokens, base, namespace)

    def _mp_match_prefix(self, tokens: list[int], base: Any, rid: str, namespace: KeyNamespace | None) -> Any:
        # SGLang re-matches waiting requests every round: the new lease replaces the old one.
        node = base.last_device_node
        hit = self._mark_host_hit(rid, tokens, base.device_prefix_len, node, namespace)
        if hit is None:
            return base
        return base._replace(
            last_host_node=node,
            best_match_node=node,
            host_hit_length=hit.host_hit_length,
            full_kv_hit_length=max(base.full_kv_hit_length, hit.end),
        )

    def init_load_back(self, params: Any) -> Optional[tuple[int, Any]]:
        """Load the host hit ``match_prefix`` found for ``params.req`` (MP); returns
        (tokens loaded, node the prefix ends at): all ``host_hit_length`` tokens or 0."""
        node = params.best_match_node
        if params.req is None:
            return 0, node
        result = self._load_marked_hit(params.req.rid, node, params.host_hit_length, "best_match_node")
        if result is None:
            return 0, node
        if result.num_tokens < params.host_hit_length:
            if result.num_tokens:
                log.info(
                    "request %s: load-back got %d of %d tokens; recomputing (kept in the tree)",
                    params.req.rid, result.num_tokens, params.host_hit_length,
                )
            return 0, node
        return result.num_tokens, result.last_node

    def _ip_match_prefix(self, tokens: list[int], base: Any, namespace: KeyNamespace | None) -> Any:
        device_len = base.device_prefix_len
        result = self._ip_load_back(tokens, device_len, base.last_device_node, namespace)
        if result is None:
            return base
        node = result.last_node
        return base._replace(
            device_prefix_len=device_len + result.num_tokens,
            last_device_node=node,
            last_host_node=node,
            best_match_node=node,
            full_kv_hit_length=max(base.full_kv_hit_length, device_len + result.num_tokens),
        )

    # ----- storing -----

    def checkpoint(self, req: Any, *, up_to: int, **kwargs: Any) -> None:
        self.finish_loads()
        super().checkpoint(req, up_to=up_to, **kwargs)
        if self.disable:
            return
        slots = self.path_device_indices(req.last_node)
        n = slots.numel() // self.store.chunk_size * self.store.chunk_size
        if n == 0:
            return
        tokens = list(req.full_untruncated_fill_ids[:n])
        self._store_path(tokens, slots[:n], req.last_node, KeyNamespace.of(req.extra_key, req.cache_salt))

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self.release_request(req.rid)
        self._drop_torn_nodes()  # the request's lock is gone now

    # ----- eviction, cleanup -----

    def evict(self, params: Any) -> Any:
        """SGLang's ``EvictParams``; a token count is accepted too (the policy's ``LoadBackTree``)."""
        if isinstance(params, int):
            params = EvictParams(num_tokens=params)
        self._settle_before_evict()
        return super().evict(params)

    # ----- LoadBackTree -----

    def node_in_tree(self, node: Any) -> bool:
        # Evicted nodes keep their parent pointer, so check each link both ways.
        while node is not self.root_node:
            parent = node.parent
            if parent is None or parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = parent
        return True

    def attach_loaded(self, node: Any, key: list[int], slots: torch.Tensor,
                      namespace: KeyNamespace | None = None) -> tuple[torch.Tensor, Any]:
        ns = namespace or KeyNamespace()
        radix_key = RadixKey(array("q", key), ns.extra_key, cache_salt=ns.cache_salt)
        present, _ = self._insert_helper(node, radix_key, slots)
        if present:
            # Inserted meanwhile by another request: the tree's slots win, ours are duplicates.
            self.token_to_kv_pool_allocator.free(slots[:present])
        values, last = self._match_prefix_helper(node, radix_key)
        return torch.cat(values), last


def _tp_min_reduce(ctx: Any) -> TpMinReduce | None:
    """A MIN all-reduce over SGLang's TP group (its CPU group: no device sync per lookup)."""
    if ctx.tp_size == 1:
        return None
    group = getattr(ctx.tp_group, "cpu_group", None)
    if group is None:
        raise ValueError(f"tp_group: expected SGLang's GroupCoordinator with a cpu_group for tp_size={ctx.tp_size}, got {ctx.tp_group!r}")

    def reduce(num_tokens: int) -> int:
        t = torch.tensor([num_tokens], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
        return int(t.item())

    return reduce


def config_path(server_args: Any) -> str:
    """The YAML config: ``$LMC_TRANSFER_CONFIG``, else ``--lmcache-config-file``."""
    path = os.environ.get(CONFIG_ENV) or getattr(server_args, "lmcache_config_file", None)
    if not path:
        raise ValueError(
            f"the {BACKEND_NAME} radix-cache backend needs a config file: set {CONFIG_ENV} or pass "
            "--lmcache-config-file, got neither"
        )
    return path


def build_cache(ctx: Any) -> LMCSGLangRadixCache:
    """The registered factory: SGLang's ``TreeCacheBuildContext`` -> our cache."""
    if ctx.disable_radix_cache or ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.params.pp_size != 1:
        raise ValueError(
            f"the {BACKEND_NAME} backend supports full-attention models without pipeline parallelism and with the "
            f"radix cache on; got disable_radix_cache={ctx.disable_radix_cache}, hybrid_swa={ctx.is_hybrid_swa}, "
            f"hybrid_ssm={ctx.is_hybrid_ssm}, pp_size={ctx.params.pp_size}"
        )
    cache = LMCSGLangRadixCache(
        ctx.params,
        config=config_path(ctx.server_args),
        model_id=ctx.model_config.model_path,
        tp_rank=ctx.tp_rank,
        tp_size=ctx.tp_size,
        tp_min_reduce=_tp_min_reduce(ctx),
    )
    if cache.mode is LMCacheMode.IP:
        # SGLang's attention layers call wait_until(layer) on the pool's counter before reading a layer.
        counter = cache.layer_transfer_counter
        cache.token_to_kv_pool_allocator.get_kvcache().register_layer_transfer_counter(counter)
        register: Callable[[Any], None] | None = getattr(ctx.tp_worker, "register_hicache_layer_transfer_counter", None)
        if register is not None:
            register(counter)
    return cache


def register() -> None:
    """Register ``build_cache`` as the ``lmc_transfer`` backend; idempotent (the entry-point hook)."""
    if _registry.get_radix_cache_factory(BACKEND_NAME) is None:
        _registry.register_radix_cache_backend(BACKEND_NAME, build_cache)


register()
