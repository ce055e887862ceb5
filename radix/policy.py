"""Load-back and store rules between a radix tree and a chunk ``CacheStore``.

Kept apart from ``LMCRadixCache`` so that any radix tree (ours, or an SGLang
plugin subclassing SGLang's own RadixCache) reuses exactly the same logic: the
tree only has to offer the few operations of ``LoadBackTree``.

Rules:
- Keys are ``chunk_keys`` over the token ids with the engine's ``KeySalt``; only
  full chunks are cached, and the loaded prefix always ends on a chunk boundary.
  A request in a ``KeyNamespace`` (SGLang: a LoRA ``extra_key`` or a ``cache_salt``)
  gets keys of its own, so KV is shared only within one namespace.
- A lookup starts at the chunk holding the first token missing from the device
  tree; tokens of that chunk already on the device are skipped with slot -1
  (the kernels skip negative slots), so device KV is never overwritten.
- With tensor parallelism every rank calls ``tp_min_reduce`` (a collective taking
  this rank's prefix length in tokens, returning the minimum over the ranks) at
  the same points, so all ranks end with the same prefix. Every call path below
  calls it exactly once per lookup and once per load, hit or miss.
- A load never exposes KV it did not verify: slots past what ``CacheStore.load``
  reports intact go back to the allocator, and the lease is always released.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from lmc_transfer.keys import KeySalt, chunk_keys
from lmc_transfer.transfer.layerwise import LayerwiseStore
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.store.base import CacheStore, Lease
from lmc_transfer.transfer.paths import Transfer

log = logging.getLogger(__name__)

TpMinReduce = Callable[[int], int]


class LoadBackTree(Protocol):
    """What the rules need from a radix tree (node type is the tree's own)."""

    def evict(self, num_tokens: int) -> Any: ...

    def inc_lock_ref(self, node: Any) -> int: ...

    def dec_lock_ref(self, node: Any) -> int: ...

    def node_in_tree(self, node: Any) -> bool:
        """False once ``node`` was evicted or the tree was reset."""

    def attach_loaded(
        self, node: Any, key: list[int], slots: torch.Tensor, namespace: KeyNamespace | None
    ) -> tuple[torch.Tensor, Any]:
        """Insert ``key``/``slots`` (of ``namespace``) below ``node``; free the slots of tokens
        already present there. Returns the tree's slots for ``key`` and the node they end at."""


@dataclass(frozen=True)
class KeyNamespace:
    """A request's KV namespace on top of the engine's ``KeySalt``: requests share cached
    chunks only within one namespace (SGLang's ``RadixKey.extra_key`` and ``cache_salt``)."""

    extra_key: str | None = None
    cache_salt: str | None = None

    @classmethod
    def of(cls, extra_key: str | None, cache_salt: str | None) -> KeyNamespace | None:
        """The namespace of a request, None for the default one (no extra key, no salt)."""
        if extra_key is None and not cache_salt:
            return None
        return cls(extra_key, cache_salt or None)

    def tag(self) -> str:
        return json.dumps([self.extra_key, self.cache_salt])


@dataclass(frozen=True)
class HostHit:
    """A leased run of chunks that extends the device prefix.

    ``lease`` covers the chunks from ``first_chunk`` on (release this lease);
    once loaded the prefix reaches ``end`` tokens (a chunk boundary, agreed by
    all TP ranks), of which the first ``device_len`` are already on the device.
    """

    lease: Lease
    first_chunk: int
    device_len: int
    end: int
    chunk_size: int
    namespace: KeyNamespace | None = None

    @property
    def host_hit_length(self) -> int:
        return self.end - self.device_len

    @property
    def num_chunks(self) -> int:
        return self.end // self.chunk_size - self.first_chunk

    @property
    def prefix_pad(self) -> int:
        """Tokens of the first leased chunk that are already on the device."""
        return self.device_len - self.first_chunk * self.chunk_size


@dataclass(frozen=True)
class LoadOutcome:
    """What a loader did: tokens of the leased chunks that arrived intact (from the first
    leased chunk's start). ``finish`` is set when the copy is still in flight: it must be
    called (it waits, then releases the lease and frees ``late_free``) before those slots
    are reused."""

    tokens: int
    finish: Callable[[torch.Tensor], None] | None = None


#: ``(lease limited to the chunks to load, slot per token of those chunks) -> LoadOutcome``.
Loader = Callable[[Lease, torch.Tensor], LoadOutcome]


@dataclass(frozen=True)
class LoadBack:
    """Result of ``LMCPolicy.load_back``: the tree slots of the newly loaded tokens
    (empty when nothing was loaded) and the node the prefix now ends at."""

    indices: torch.Tensor
    last_node: Any

    @property
    def num_tokens(self) -> int:
        return int(self.indices.numel())


class LMCPolicy:
    """The rules above, bound to one engine's store, key salt and slot allocator."""

    def __init__(
        self,
        store: CacheStore,
        salt: KeySalt,
        allocator: TokenSlotAllocator,
        *,
        page_size: int = 1,
        tp_min_reduce: TpMinReduce | None = None,
    ) -> None:
        if not isinstance(store, CacheStore):
            raise TypeError(f"store must be a CacheStore, got {type(store).__name__}")
        if not isinstance(salt, KeySalt):
            raise TypeError(f"salt must be a KeySalt, got {type(salt).__name__}")
        if store.chunk_size % page_size != 0:
            # A loaded prefix ends on a chunk boundary and the tree holds whole pages only.
            raise ValueError(
                f"chunk_size must be a multiple of page_size={page_size}, got chunk_size={store.chunk_size}"
            )
        if tp_min_reduce is not None and not callable(tp_min_reduce):
            raise TypeError(f"tp_min_reduce must be callable or None, got {type(tp_min_reduce).__name__}")
        self.store = store
        self.salt = salt
        self.allocator = allocator
        self.chunk_size = store.chunk_size
        self.page_size = page_size
        self._tp_min_reduce = tp_min_reduce
        self._pending_finish: list[tuple[Callable[[torch.Tensor], None], torch.Tensor]] = []

    def keys(self, token_ids: Sequence[int], namespace: KeyNamespace | None = None) -> list[bytes]:
        return chunk_keys(list(token_ids), self.chunk_size, self._salt_for(namespace))

    def _salt_for(self, namespace: KeyNamespace | None) -> KeySalt:
        if namespace is None:
            return self.salt
        # The engine's own cache_salt stays part of it; the default namespace keeps the plain salt.
        # Not memoised: one namespace per user (cache_salt) would grow a memo without bound.
        return dataclasses.replace(self.salt, cache_salt=json.dumps([self.salt.cache_salt, namespace.tag()]))

    def tp_agree(self, num_tokens: int) -> int:
        """The prefix length every rank can reach (this rank's when not TP-sharded)."""
        if self._tp_min_reduce is None:
            return num_tokens
        agreed = int(self._tp_min_reduce(int(num_tokens)))
        if not 0 <= agreed <= num_tokens:
            raise ValueError(f"tp_min_reduce must return a value in [0, {num_tokens}], got {agreed}")
        return agreed

    # -- loads ---------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], device_len: int, namespace: KeyNamespace | None = None
               ) -> HostHit | None:
        """Lease the cached chunks (of ``namespace``) that extend the first ``device_len`` tokens
        of ``token_ids``.

        None when the cache adds nothing (after the TP agreement); no lease is then held.
        """
        cs = self.chunk_size
        first_chunk = device_len // cs
        total_chunks = len(token_ids) // cs
        lease = None
        reach = device_len
        if first_chunk < total_chunks:
            keys = self.keys(token_ids[: total_chunks * cs], namespace)[first_chunk:]
            lease = self.store.lookup(keys)
            if lease.num_chunks:
                reach = (first_chunk + lease.num_chunks) * cs
        end = self.tp_agree(reach) // cs * cs
        if lease is not None and (end <= device_len or lease.num_chunks == 0):
            self.store.release(lease)
        if lease is None or end <= device_len:
            return None
        return HostHit(lease=lease, first_chunk=first_chunk, device_len=device_len, end=end, chunk_size=cs,
                       namespace=namespace)

    def store_loader(self, lease: Lease, slots: torch.Tensor) -> LoadOutcome:
        """Synchronous load through ``CacheStore.load`` (generation-checked after the copy)."""
        return LoadOutcome(self.store.load(lease, slots).tokens_loaded)

    def load_back(
        self,
        tree: LoadBackTree,
        hit: HostHit,
        last_node: Any,
        token_ids: Sequence[int],
        *,
        loader: Loader | None = None,
        max_tokens: int | None = None,
    ) -> LoadBack:
        """Allocate slots (evicting if needed), load ``hit`` below ``last_node`` and attach it.

        Any failure (slots short, node evicted meanwhile, daemon gone, lease
        expired, generation changed) shortens the result to what really arrived,
        possibly nothing; the lease is released and unused slots are freed.
        """
        loader = loader or self.store_loader
        cs = self.chunk_size
        want = hit.host_hit_length if max_tokens is None else min(hit.host_hit_length, max_tokens)
        end = (hit.device_len + max(want, 0)) // cs * cs
        slots: torch.Tensor | None = None
        loaded = 0
        finish: Callable[[torch.Tensor], None] | None = None
        try:
            if end > hit.device_len and tree.node_in_tree(last_node):
                slots = self._alloc(tree, last_node, end - hit.device_len)
            if slots is not None:
                num_chunks = end // cs - hit.first_chunk
                part = dataclasses.replace(
                    hit.lease, slab_ids=hit.lease.slab_ids[:num_chunks], generations=hit.lease.generations[:num_chunks]
                )
                pad = torch.full((hit.prefix_pad,), -1, dtype=torch.int64, device=slots.device)
                outcome = loader(part, torch.cat([pad, slots]))
                loaded = max(0, min(outcome.tokens, num_chunks * cs) - hit.prefix_pad)
                finish = outcome.finish
        except BaseException:
            self.store.release(hit.lease)
            if slots is not None:
                self.allocator.free(slots)
            raise
        if finish is None:
            self.store.release(hit.lease)
        keep = 0
        try:
            # Every rank reaches this point once per load, whatever happened above.
            keep = min(loaded, max(0, self.tp_agree(hit.device_len + loaded) - hit.device_len))
            if slots is None or not keep:
                return LoadBack(self._empty(), last_node)
            tokens = list(token_ids[hit.device_len : hit.device_len + keep])
            indices, node = tree.attach_loaded(last_node, tokens, slots[:keep], hit.namespace)
        except BaseException:
            keep = 0  # nothing attached: every slot goes back
            raise
        finally:
            if slots is not None:
                unused = slots[keep:]
                if finish is not None:
                    # The copy may still write into the unused slots: free them once it is done.
                    self._pending_finish.append((finish, unused))
                elif unused.numel():
                    self.allocator.free(unused)
        return LoadBack(indices, node)

    def finish_loads(self) -> None:
        """Wait for in-flight (layerwise) loads, release their leases and free their unused slots."""
        pending, self._pending_finish = self._pending_finish, []
        for finish, unused in pending:
            finish(unused)

    def _alloc(self, tree: LoadBackTree, last_node: Any, need: int) -> torch.Tensor | None:
        short = need - self.allocator.available_size()
        if short > 0:
            # The matched node must survive the eviction made for its own extension.
            tree.inc_lock_ref(last_node)
            try:
                tree.evict(short)
            finally:
                tree.dec_lock_ref(last_node)
        return self.allocator.alloc(need)

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.allocator.device)

    # -- stores --------------------------------------------------------------

    def start_store(
        self, token_ids: Sequence[int], slots: torch.Tensor, transfer: Transfer, stream: Any = None,
        namespace: KeyNamespace | None = None,
    ) -> LayerwiseStore | None:
        """Reserve the full chunks of ``token_ids`` (in ``namespace``) not cached yet and queue their gathers.

        ``slots`` are the tree's slots of those tokens; they must stay valid (lock
        the node) until the returned store's ``finish()``. None when nothing is
        new (everything deduplicated, or the store dropped it).
        """
        n = len(token_ids) // self.chunk_size * self.chunk_size
        if n == 0:
            return None
        reservation = self.store.reserve(self.keys(token_ids[:n], namespace))
        if reservation.num_chunks == 0:
            return None
        writer: LayerwiseStore | None = None
        try:
            writer = LayerwiseStore(transfer, self.store, reservation, slots[:n], stream=stream)
            for layer in range(transfer.buffers.num_layers):
                writer.after_layer(layer)
        except BaseException:
            if writer is not None:
                writer.abort()  # waits for the gathers already queued before giving the slabs back
            else:
                self.store.abort(reservation)
            raise
        return writer
