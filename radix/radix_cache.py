"""Token-prefix (radix) tree over KV slots, with SGLang's RadixCache semantics.

Each node holds a run of token ids (``key``) and the KV slot of each
(``value``, int64). A path from the root spells a cached token prefix. Nodes
carry a lock ref: a request locks the node its cached prefix ends at, which
locks the whole path, and locked nodes are never evicted. Unlocked leaves are
evicted in LRU order and their slots go back to the allocator.

With ``page_size > 1`` the tree stores whole pages only: keys are truncated to
a page multiple before matching, children are indexed by their first page,
and nodes are split only at page boundaries.

Slot ownership (as in SGLang): slots stored in the tree belong to the tree.
``insert`` returns how many leading tokens were already present; the caller's
slots for that part are duplicates and are the caller's to free.

Subclasses (the LMCache adapter) build on the hooks ``_match_prefix_helper``,
``_split_node``, ``_insert_helper`` (which also inserts below any existing
node), ``_delete_leaf`` and ``evict``.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Sequence

import torch

from lmc_transfer.radix.allocator import TokenSlotAllocator

if TYPE_CHECKING:
    from lmc_transfer.radix.request import Req

_node_ids = itertools.count()


class TreeNode:
    """One run of tokens and their KV slots."""

    def __init__(self) -> None:
        self.children: dict[Hashable, TreeNode] = {}
        self.parent: TreeNode | None = None
        self.key: list[int] = []
        self.value: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        # A logical clock tick, not wall time: ties between nodes touched by one
        # operation are broken by id, so eviction order is deterministic.
        self.last_access_time = 0
        self.id = next(_node_ids)

    def __lt__(self, other: TreeNode) -> bool:
        return (self.last_access_time, self.id) < (other.last_access_time, other.id)

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass(frozen=True)
class MatchResult:
    """What ``match_prefix`` found.

    ``device_indices``: KV slots of the matched prefix (int64, on the allocator's
    device). ``last_device_node``: the node the device prefix ends at (the root
    when nothing matched). ``last_host_node`` / ``host_hit_length``: the same node
    and 0 here; a host-cache subclass reports the extra tokens it can load back.
    """

    device_indices: torch.Tensor
    last_device_node: TreeNode
    last_host_node: TreeNode
    host_hit_length: int = 0


class RadixCache:
    def __init__(
        self, allocator: TokenSlotAllocator, page_size: int = 1, disable: bool = False
    ) -> None:
        if not isinstance(allocator, TokenSlotAllocator):
            raise TypeError(
                f"allocator must be a TokenSlotAllocator, got {type(allocator).__name__}"
            )
        if page_size != allocator.page_size:
            raise ValueError(
                f"page_size must equal the allocator's page_size={allocator.page_size}, got {page_size}"
            )
        self.token_to_kv_pool_allocator = allocator
        self.page_size = page_size
        self.disable = disable
        self.device = allocator.device
        self._clock = itertools.count(1)
        # Not reset(): a subclass's reset may rely on state its __init__ has not built yet.
        self._init_tree()

    # ----- public API -----

    def reset(self) -> None:
        """Drop every node and give its slots back to the allocator.

        Refuses while any node is locked: a running request still reads those
        slots, and freeing them would let them be handed out again.
        """
        if self.protected_size_ > 0:
            raise RuntimeError(
                f"cannot reset: {self.protected_size_} tokens are locked by running requests"
            )
        values = self.all_values_flatten()
        if values.numel():
            self.token_to_kv_pool_allocator.free(values)
        self._init_tree()

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``key`` (truncated to whole pages).

        Touches the matched path for LRU and splits a node when the match ends
        inside it, so ``last_device_node`` ends exactly at the match.
        """
        key = self._page_aligned(list(key))
        if self.disable or not key:
            return self._result(self._empty_indices(), self.root_node)
        values, node = self._match_prefix_helper(self.root_node, key)
        indices = torch.cat(values) if values else self._empty_indices()
        return self._result(indices, node)

    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Store ``key`` with slots ``value``; returns how many leading tokens were present.

        ``value[:returned]`` duplicates slots the tree already owns; the caller
        frees them. ``len(key)`` must be a multiple of ``page_size``.
        """
        key = list(key)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != torch.int64:
            raise TypeError(
                f"value must be a 1-D torch.int64 tensor, got "
                f"{getattr(value, 'dtype', type(value).__name__)}"
            )
        if value.numel() != len(key):
            raise ValueError(
                f"value must hold one slot per token: len(key)={len(key)}, got {value.numel()} slots"
            )
        if len(key) % self.page_size != 0:
            raise ValueError(
                f"len(key) must be a multiple of page_size={self.page_size}, got {len(key)}"
            )
        if self.disable:
            return 0
        return self._insert_helper(self.root_node, key, value.to(self.device))

    def cache_finished_req(self, req: Req, is_insert: bool = True) -> None:
        """Hand a finished request's KV to the tree and drop its lock.

        The page-aligned part of its tokens is inserted (unless ``is_insert`` is
        False); the request's slots that duplicate tree content, and its
        unaligned tail, go back to the allocator.
        """
        token_ids = req.fill_ids
        kv_indices = req.req_to_token
        allocator = self.token_to_kv_pool_allocator
        if self.disable:
            allocator.free(kv_indices)
            return
        self._check_locked_node(req)
        keys = self._page_aligned(token_ids)
        if is_insert:
            new_prefix_len = self.insert(keys, kv_indices[: len(keys)].clone())
            allocator.free(kv_indices[req.cache_protected_len : new_prefix_len])
        else:
            allocator.free(kv_indices[req.cache_protected_len : len(keys)])
        allocator.free(kv_indices[len(keys) :])
        self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req: Req) -> None:
        """Insert an unfinished request's computed KV (chunked prefill) and re-anchor it.

        Afterwards the request's aligned prefix is served from tree slots
        (``req.req_to_token`` is rewritten where it held duplicates), its lock
        moves to the new last node, and ``prefix_indices`` covers all its KV
        (tree slots, then its own unaligned tail).
        """
        if self.disable:
            return
        self._check_locked_node(req)
        token_ids = req.fill_ids
        kv_indices = req.req_to_token
        keys = self._page_aligned(token_ids)
        new_prefix_len = self.insert(keys, kv_indices[: len(keys)].clone())
        self.token_to_kv_pool_allocator.free(kv_indices[req.cache_protected_len : new_prefix_len])

        # The device tree only: a subclass's match_prefix may also consult a
        # host cache, which must not run for tokens this request just computed.
        values, new_last_node = self._match_prefix_helper(self.root_node, keys)
        new_indices = torch.cat(values) if values else self._empty_indices()
        if new_indices.numel() != len(keys):
            raise RuntimeError(
                f"request {req.rid}: re-match after insert found {new_indices.numel()} "
                f"of {len(keys)} tokens"
            )
        kv_indices[req.cache_protected_len : len(keys)] = new_indices[req.cache_protected_len :]
        req.cache_protected_len = len(keys)
        # Lock the new node before unlocking the old one, so the shared path
        # never passes through lock_ref 0 in between.
        self.inc_lock_ref(new_last_node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = kv_indices.clone()
        req.last_node = new_last_node

    def evict(self, num_tokens: int) -> int:
        """Evict unlocked leaves, least recently used first, until ``num_tokens``
        tokens are freed or nothing evictable is left; returns tokens freed."""
        if self.disable:
            return 0
        heap = list(self._evictable_leaves)
        heapq.heapify(heap)
        num_evicted = 0
        while num_evicted < num_tokens and heap:
            node = heapq.heappop(heap)
            self.token_to_kv_pool_allocator.free(node.value)
            num_evicted += len(node.key)
            self._delete_leaf(node)
            # A parent left childless and unlocked becomes the next candidate.
            if node.parent in self._evictable_leaves:
                heapq.heappush(heap, node.parent)
        return num_evicted

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Lock ``node`` and its ancestors; returns the change in evictable size."""
        if self.disable:
            return 0
        self._check_in_tree(node)
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 0:
                self.evictable_size_ -= len(node.key)
                self.protected_size_ += len(node.key)
                delta -= len(node.key)
            node.lock_ref += 1
            self._update_leaf_status(node)
            node = node.parent
        return delta

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Undo one ``inc_lock_ref(node)``; returns the change in evictable size."""
        if self.disable:
            return 0
        self._check_in_tree(node)
        if node is not self.root_node and node.lock_ref == 0:
            raise ValueError(f"dec_lock_ref on {node!r}, which is not locked")
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 1:
                self.evictable_size_ += len(node.key)
                self.protected_size_ -= len(node.key)
                delta += len(node.key)
            node.lock_ref -= 1
            self._update_leaf_status(node)
            node = node.parent
        return delta

    def evictable_size(self) -> int:
        return self.evictable_size_

    def protected_size(self) -> int:
        return self.protected_size_

    def total_size(self) -> int:
        total = 0
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    def all_values_flatten(self) -> torch.Tensor:
        """Every slot the tree owns (order unspecified)."""
        values = []
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            values.append(node.value)
            stack.extend(node.children.values())
        return torch.cat(values) if values else self._empty_indices()

    def pretty_print(self) -> None:
        print(self._format_tree())

    # ----- hooks for subclasses -----

    def _match_prefix_helper(
        self, node: TreeNode, key: list[int]
    ) -> tuple[list[torch.Tensor], TreeNode]:
        """Walk down from ``node`` along ``key``; returns the matched slot runs and
        the node the match ends at (splitting a node the match ends inside)."""
        tick = next(self._clock)
        node.last_access_time = tick
        values: list[torch.Tensor] = []
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = tick
            prefix_len = self._key_match(child.key, key)
            if prefix_len < len(child.key):
                node = self._split_node(child.key, child, prefix_len)
                values.append(node.value)
                break
            values.append(child.value)
            node = child
            key = key[prefix_len:]
        return values, node

    def _split_node(self, key: list[int], child: TreeNode, split_len: int) -> TreeNode:
        """Cut ``child`` (whose key is ``key``) after ``split_len`` tokens; the new
        upper node takes the first part and returns. Lock refs are copied, since
        every lock on ``child`` also covers its new parent."""
        new_node = TreeNode()
        new_node.parent = child.parent
        new_node.key = key[:split_len]
        new_node.value = child.value[:split_len].clone()
        new_node.lock_ref = child.lock_ref
        new_node.last_access_time = child.last_access_time
        child.key = key[split_len:]
        child.value = child.value[split_len:].clone()
        child.parent = new_node
        new_node.children[self._child_key(child.key)] = child
        new_node.parent.children[self._child_key(new_node.key)] = new_node
        return new_node

    def _insert_helper(self, node: TreeNode, key: list[int], value: torch.Tensor) -> int:
        """Insert ``key``/``value`` below ``node``; returns the length already present.

        Only the missing suffix becomes a new (unlocked) leaf; its slots are
        cloned into the tree.
        """
        tick = next(self._clock)
        node.last_access_time = tick
        total_prefix_len = 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = tick
            prefix_len = self._key_match(child.key, key)
            total_prefix_len += prefix_len
            key = key[prefix_len:]
            value = value[prefix_len:]
            node = self._split_node(child.key, child, prefix_len) if prefix_len < len(child.key) else child
        if key:
            new_node = TreeNode()
            new_node.parent = node
            new_node.key = key
            new_node.value = value.clone()
            new_node.last_access_time = tick
            node.children[self._child_key(key)] = new_node
            self.evictable_size_ += len(key)
            self._update_leaf_status(node)
            self._update_leaf_status(new_node)
        return total_prefix_len

    def _delete_leaf(self, node: TreeNode) -> None:
        """Unlink an unlocked leaf (its slots must already be freed or handed on)."""
        removed = node.parent.children.pop(self._child_key(node.key), None)
        if removed is not node:
            raise RuntimeError(f"{node!r} is not a child of its parent")
        self.evictable_size_ -= len(node.key)
        self._evictable_leaves.discard(node)
        self._update_leaf_status(node.parent)

    def _update_leaf_status(self, node: TreeNode) -> None:
        if node is not self.root_node and node.lock_ref == 0 and not node.children:
            self._evictable_leaves.add(node)
        else:
            self._evictable_leaves.discard(node)

    # ----- internals -----

    def _init_tree(self) -> None:
        self.root_node = TreeNode()
        # The root is permanently locked so lock walks and eviction stop there.
        self.root_node.lock_ref = 1
        self.evictable_size_ = 0
        self.protected_size_ = 0
        self._evictable_leaves: set[TreeNode] = set()

    def _key_match(self, key0: list[int], key1: list[int]) -> int:
        """Length of the common prefix, in whole pages when page_size > 1."""
        n = min(len(key0), len(key1))
        i = 0
        while i < n and key0[i] == key1[i]:
            i += 1
        return i - i % self.page_size

    def _child_key(self, key: list[int]) -> Hashable:
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _page_aligned(self, key: list[int]) -> list[int]:
        return key[: len(key) - len(key) % self.page_size]

    def _empty_indices(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _result(self, indices: torch.Tensor, node: TreeNode) -> MatchResult:
        return MatchResult(device_indices=indices, last_device_node=node, last_host_node=node)

    def _check_in_tree(self, node: TreeNode) -> None:
        if not isinstance(node, TreeNode):
            raise TypeError(f"node must be a TreeNode, got {type(node).__name__}")
        # Evicted nodes keep their parent pointer, so check each link both ways.
        walk = node
        while walk.parent is not None and walk.parent.children.get(self._child_key(walk.key)) is walk:
            walk = walk.parent
        if walk is not self.root_node:
            raise ValueError(f"{node!r} does not belong to this tree (evicted, or from before reset)")

    def _check_locked_node(self, req: Req) -> None:
        if req.last_node is None:
            raise ValueError(
                f"request {req.rid}: last_node is None; match_prefix and inc_lock_ref must run first"
            )

    def _format_tree(self) -> str:
        lines = []
        stack = [(self.root_node, 0)]
        while stack:
            node, depth = stack.pop()
            preview = node.key[:10]
            more = "..." if len(node.key) > 10 else ""
            lines.append(f"{'  ' * depth}{len(node.key)} {preview}{more} r={node.lock_ref}")
            stack.extend((child, depth + 1) for child in reversed(list(node.children.values())))
        lines.append(f"#tokens: {self.total_size()}")
        return "\n".join(lines)
