"""LMCache's SGLang connector surface, backed by lmc-transfer.

SGLang 0.5.20 is the last release with ``sglang/srt/mem_cache/storage/lmcache/
lmc_radix_cache.py`` (``LMCRadixCache``); it imports

- ``LMCacheMPConnector`` from ``lmcache.integration.sglang.multi_process_adapter``,
- ``LMCacheLayerwiseConnector``, ``LoadMetadata``, ``StoreMetadata`` from
  ``lmcache.integration.sglang.sglang_adapter``,
- ``lmcache_get_config`` from ``lmcache.integration.sglang.utils``.

The classes here keep those constructors and methods, but keys, leases and copies
are ours: ``LMCacheMPConnector`` talks to an lmc-transfer daemon (``MPStore``),
``LMCacheLayerwiseConnector`` owns an in-process pool (``IPStore``), and both use
the lookup/store rules of ``lmc_transfer.radix.policy``. ``lmc_transfer.
integrations.lmcache_shim`` makes SGLang import them under LMCache's module names.

Verified against SGLang 0.5.20 (``SUPPORTED_SGLANG_VERSIONS``): a connector built under
another release raises ``SGLangUnavailable`` naming it. The config file is
our YAML (``mode`` is ignored here: SGLang 0.5.20 picks the connector itself).

SGLang 0.5.20 hands the connectors token ids only, never a request's LoRA
``extra_key`` or ``cache_salt``, so chunk keys could not tell those namespaces
apart: the first connector built patches SGLang's ``LMCRadixCache`` so that such
requests skip the host cache (its plain ``RadixCache`` behaviour), and KV is never
shared across adapters or salts.

Differences a caller can see: loads and stores finish before the call returns
(an IP layerwise load on CUDA keeps its per-layer copies in flight until
``load_kv_layerwise`` reaches the last layer; a second ``start_load_kv`` first
finishes the previous one); ``StoreMetadata.offset`` must be 0, as SGLang passes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lmc_transfer.config import LMCTransferConfig, Mode, load_config
from lmc_transfer.integrations.sglang.importer import load_sglang
from lmc_transfer.store.ip import IPStore
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.keys import KeySalt
from lmc_transfer.transfer.layerwise import LayerTransferCounter
from lmc_transfer.radix.policy import HostHit, LMCPolicy, TpMinReduce
from lmc_transfer.store.base import CacheStore
from lmc_transfer.transfer.paths import Transfer

log = logging.getLogger(__name__)

SUPPORTED_SGLANG_VERSIONS = ("0.5.20",)
#: LMCache's variable for the config file, read when ``lmcache_get_config`` gets no path.
CONFIG_ENV = "LMCACHE_CONFIG_FILE"

# lmcache_get_config() results by (mp_host, mp_port): SGLang hands the MP connector
# only those two fields, the rest of the file (socket, timeouts) is found here.
_loaded_configs: dict[tuple[str, int], LMCTransferConfig] = {}
_loaded_lock = threading.Lock()


@dataclass
class StoreMetadata:
    last_node: object
    token_ids: list[int]
    kv_indices: torch.Tensor
    offset: int
    request_id: str = ""


@dataclass
class LoadMetadata:
    token_ids: list[int]
    slot_mapping: torch.Tensor
    offset: int
    prefix_pad: int = 0
    request_id: str = ""


def lmcache_get_config(config_file: str | os.PathLike[str] | None = None) -> LMCTransferConfig:
    """Our YAML config (``$LMCACHE_CONFIG_FILE`` when no path is given); ``mp_host`` /
    ``mp_port`` name the daemon as in LMCache's files."""
    path = config_file or os.environ.get(CONFIG_ENV)
    if not path:
        raise ValueError(f"config_file: expected a YAML path (or ${CONFIG_ENV}), got {config_file!r}")
    config = load_config(path)
    with _loaded_lock:
        _loaded_configs[(config.mp_host, config.mp_port)] = config
    return config


def _buffers(k_pool: Optional[Sequence[torch.Tensor]], v_pool: Optional[Sequence[torch.Tensor]],
             kv_caches: Optional[Sequence[torch.Tensor]] = None) -> KVBuffers:
    if kv_caches is not None:
        return KVBuffers.mla(list(kv_caches))
    if not k_pool or not v_pool:
        raise ValueError(f"k_pool/v_pool: expected per-layer K and V buffers (or kv_caches for MLA), got {k_pool!r}, {v_pool!r}")
    return KVBuffers.token_slot(list(k_pool), list(v_pool))


def _tp_min_reduce(tp_size: int, tp_group: Any, device: torch.device) -> TpMinReduce | None:
    if tp_size == 1:
        return None

    def reduce(num_tokens: int) -> int:
        t = torch.tensor([num_tokens], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=tp_group)
        return int(t.item())

    return reduce


def _device_len(slot_mapping: torch.Tensor) -> int:
    """Tokens SGLang already holds: the leading ``-1`` entries of a slot mapping."""
    fresh = torch.nonzero(slot_mapping >= 0)
    return int(fresh[0, 0]) if fresh.numel() else int(slot_mapping.numel())


_SGLANG_LMC_MODULE = "sglang.srt.mem_cache.storage.lmcache.lmc_radix_cache"


def _check_sglang_release() -> None:
    """SGLangUnavailable, naming the installed release, unless it is one these connectors were verified on."""
    load_sglang(SUPPORTED_SGLANG_VERSIONS, "lmc_transfer.integrations.sglang.lmcache_compat")


def _namespaced(holder: Any) -> bool:
    """Whether a RadixKey or Req belongs to a namespace the connectors cannot see."""
    return getattr(holder, "extra_key", None) is not None or bool(getattr(holder, "cache_salt", None))


def guard_namespaced_requests() -> bool:
    """Make SGLang 0.5.20's ``LMCRadixCache`` serve requests with an ``extra_key`` or a
    ``cache_salt`` from its device tree only (module docstring); idempotent. False when
    SGLang's module is not loaded (nothing to guard)."""
    cls = getattr(sys.modules.get(_SGLANG_LMC_MODULE), "LMCRadixCache", None)
    if cls is None:
        return False
    if cls.__dict__.get("_lmc_transfer_guarded"):
        return True
    plain = cls.__mro__[1]  # SGLang's RadixCache
    match_prefix, cache_finished_req = cls.match_prefix, cls.cache_finished_req

    @functools.wraps(match_prefix)
    def guarded_match_prefix(self: Any, params: Any) -> Any:
        if _namespaced(params.key):
            return plain.match_prefix(self, params)
        return match_prefix(self, params)

    @functools.wraps(cache_finished_req)
    def guarded_cache_finished_req(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        if _namespaced(req):
            return plain.cache_finished_req(self, req, *args, **kwargs)
        return cache_finished_req(self, req, *args, **kwargs)

    cls.match_prefix = guarded_match_prefix
    cls.cache_finished_req = guarded_cache_finished_req
    cls._lmc_transfer_guarded = True
    return True


class _Connector:
    """What both connectors share: the store, the policy (keys, lookups, stores)."""

    def __init__(
        self,
        store: CacheStore,
        buffers: KVBuffers,
        config: LMCTransferConfig,
        sgl_config: Any,
        tp_size: int,
        rank: int,
        tp_group: Any,
        page_size: int,
    ) -> None:
        # SGLang's LMCRadixCache is constructing us: its class exists now.
        guard_namespaced_requests()
        self.store = store
        self.config = config
        self.sgl_config = sgl_config
        salt = KeySalt(sgl_config.model_path, buffers.geometry, tp_rank=rank, tp_size=tp_size)
        # LMCRadixCache allocates the slots itself, so the policy's load_back (which
        # needs an allocator) is never used here; only its lookup and store rules.
        self.policy = LMCPolicy(
            store, salt, None, page_size=page_size, tp_min_reduce=_tp_min_reduce(tp_size, tp_group, buffers.device)
        )
        self._transfer = Transfer.for_config(buffers, config)

    def chunk_size(self) -> int:
        return self.store.chunk_size

    def store_kv(self, store_metadata: StoreMetadata) -> None:
        """Store the full chunks of ``token_ids`` from ``kv_indices`` (not cached yet ones); returns once committed."""
        if store_metadata.offset != 0:
            raise ValueError(f"store_metadata.offset: expected 0 (as SGLang passes), got {store_metadata.offset}")
        tokens = list(store_metadata.token_ids)
        if len(tokens) != store_metadata.kv_indices.numel():
            raise ValueError(
                f"store_metadata.kv_indices: expected one slot per token ({len(tokens)}), got {store_metadata.kv_indices.numel()}"
            )
        slots = store_metadata.kv_indices.to(dtype=torch.int64, device=self._transfer.buffers.device)
        writer = self.policy.start_store(tokens, slots, self._transfer)
        if writer is not None:
            writer.finish()

    def reset(self) -> None:
        self.store.clear()

    def close(self) -> None:
        self.store.close()


class LMCacheMPConnector(_Connector):
    """LMCache's MP connector contract over an lmc-transfer daemon: ``lookup_kv``
    leases the hit per request id, ``retrieve_kv`` loads it, ``release_pending`` /
    ``end_session`` drop a lease no load will use."""

    def __init__(
        self,
        sgl_config: Any,
        tp_size: int,
        rank: int,
        page_size: int,
        host: str,
        port: int,
        k_pool: list[torch.Tensor],
        v_pool: list[torch.Tensor],
        tp_group: Optional[Any] = None,
        *,
        config: LMCTransferConfig | None = None,
    ) -> None:
        _check_sglang_release()
        from lmc_transfer.store.mp_client import MPStore  # zmq only where MP is used

        if config is None:
            with _loaded_lock:
                config = _loaded_configs.get((host, port))
        if config is None:
            config = LMCTransferConfig(mode=Mode.MP, mp_host=host, mp_port=port)
        buffers = _buffers(k_pool, v_pool)
        super().__init__(MPStore(config, buffers), buffers, config, sgl_config, tp_size, rank, tp_group, page_size)
        self._pending: dict[str, HostHit] = {}
        self._pending_lock = threading.Lock()

    def lookup_kv(self, token_ids: Sequence[int], request_id: str) -> int:
        """Lease the cached chunk-aligned prefix of ``token_ids``; returns its length in tokens."""
        self.release_pending(request_id)  # a re-match replaces the previous lease
        hit = self.policy.lookup(list(token_ids), 0)
        if hit is None:
            return 0
        with self._pending_lock:
            self._pending[request_id] = hit
        return hit.end

    def retrieve_kv(self, load_metadata: LoadMetadata) -> int:
        """Load the leased chunks from ``offset`` into ``slot_mapping`` (-1 entries are
        skipped); returns the tokens loaded from ``offset``: all of the lookup's hit
        or 0, because SGLang 0.5.20's scheduler rejects a partial load-back (a
        shorter load is discarded and recomputed). The lease is released either way."""
        with self._pending_lock:
            hit = self._pending.pop(load_metadata.request_id, None)
        if hit is None:
            raise RuntimeError(f"retrieve_kv called for {load_metadata.request_id!r} without a pending lookup_kv")
        try:
            cs = self.chunk_size()
            first = load_metadata.offset // cs
            if load_metadata.offset % cs or load_metadata.slot_mapping.numel() < hit.end:
                raise ValueError(
                    f"load_metadata: expected a chunk-aligned offset and a slot_mapping of at least {hit.end} entries, "
                    f"got offset={load_metadata.offset}, {load_metadata.slot_mapping.numel()} entries"
                )
            n = hit.end // cs
            if first >= n:
                return 0
            part = dataclasses.replace(hit.lease, slab_ids=hit.lease.slab_ids[first:n], generations=hit.lease.generations[first:n])
            slots = load_metadata.slot_mapping[first * cs : n * cs].to(torch.int64)
            loaded = self.store.load(part, slots).tokens_loaded
        finally:
            self.store.release(hit.lease)
        promised = (n - first) * cs
        if loaded < promised:
            log.info("retrieve_kv %s: %d of %d tokens intact; recomputing", load_metadata.request_id, loaded, promised)
            return 0
        return loaded

    def release_pending(self, request_id: str) -> None:
        with self._pending_lock:
            hit = self._pending.pop(request_id, None)
        if hit is not None:
            self.store.release(hit.lease)

    def end_session(self, request_id: str) -> None:
        self.release_pending(request_id)

    def close(self) -> None:
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        for hit in pending:
            self.store.release(hit.lease)
        super().close()


class LMCacheLayerwiseConnector(_Connector):
    """LMCache's in-process layerwise connector contract over an ``IPStore``:
    ``start_load_kv`` starts a load, ``load_kv_layerwise(layer)`` (SGLang's per-layer
    hook) makes sure layer ``layer`` has arrived."""

    def __init__(
        self,
        sgl_config: Any,
        tp_size: int,
        rank: int,
        config_file: str,
        k_pool: Optional[list[torch.Tensor]] = None,
        v_pool: Optional[list[torch.Tensor]] = None,
        kv_caches: Optional[list[torch.Tensor]] = None,
        use_mla: bool = False,
        kv_cache_dim: Optional[int] = None,
        page_size: int = 1,
        tp_group: Optional[Any] = None,
    ) -> None:
        _check_sglang_release()
        config = lmcache_get_config(config_file)
        buffers = _buffers(k_pool, v_pool, kv_caches if use_mla or kv_caches is not None else None)
        super().__init__(IPStore(config, buffers), buffers, config, sgl_config, tp_size, rank, tp_group, page_size)
        self._counter = LayerTransferCounter(
            Transfer.for_config(buffers, config),
            layer_signals=config.layer_signals,
        )
        self._on_cuda = buffers.device.type == "cuda"
        self._in_flight: HostHit | None = None
        self._expected = 0  # tokens intact when the load in flight started

    def start_load_kv(self, load_metadata: LoadMetadata) -> int:
        """Look up and load the cached chunks past the tokens SGLang holds (the leading
        ``-1`` entries of ``slot_mapping``); returns the tokens loaded from ``offset``."""
        self._finish()  # one layerwise load at a time
        tokens = list(load_metadata.token_ids)
        device_len = _device_len(load_metadata.slot_mapping)
        hit = self.policy.lookup(tokens, device_len)
        if hit is None:
            return 0
        cs = self.chunk_size()
        slots = load_metadata.slot_mapping[hit.first_chunk * cs : hit.end].to(torch.int64)
        part = dataclasses.replace(hit.lease, slab_ids=hit.lease.slab_ids[: hit.num_chunks],
                                   generations=hit.lease.generations[: hit.num_chunks])
        try:
            expected = self.store.verify(part) * cs
            self._counter.start_load(self.store, part, slots)
        except BaseException:
            self.store.release(hit.lease)
            raise
        self._in_flight, self._expected = hit, expected
        if not self._on_cuda:
            expected = self._finish()
        loaded = hit.first_chunk * cs + expected - load_metadata.offset
        return loaded if loaded > device_len - load_metadata.offset else 0

    def load_kv_layerwise(self, layer_id: int) -> None:
        """Block until layer ``layer_id`` of the load in flight has arrived (SGLang runs
        this hook on its load stream, not the compute stream, so a GPU-side wait
        would not order the forward pass); the last layer settles the load."""
        if self._in_flight is None:
            return
        self._counter.wait_until(layer_id)
        torch.cuda.current_stream(self._transfer.buffers.device).synchronize()
        if layer_id == self._counter.num_layers - 1:
            self._finish()

    def _finish(self) -> int:
        """Settle the load in flight: verify, release the lease; returns tokens intact."""
        hit, self._in_flight = self._in_flight, None
        if hit is None:
            return 0
        try:
            landed = self._counter.finish().tokens_loaded
        finally:
            self.store.release(hit.lease)
        if landed < self._expected:
            # SGLang has already attached these tokens; with the lease pinning the slabs this cannot happen.
            log.error("layerwise load: %d of %d tokens changed during the copy", self._expected - landed, self._expected)
        return landed

    def close(self) -> None:
        self._finish()
        super().close()
