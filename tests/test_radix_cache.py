from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.radix_cache import RadixCache, TreeNode
from lmc_transfer.radix.request import Req


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def make_cache(size: int = 64, page_size: int = 1) -> tuple[TokenSlotAllocator, RadixCache]:
    alloc = TokenSlotAllocator(size, page_size=page_size)
    return alloc, RadixCache(alloc, page_size=page_size)


def insert_fresh(alloc: TokenSlotAllocator, cache: RadixCache, key: list[int]) -> torch.Tensor:
    """Insert ``key`` with fresh slots, freeing the duplicates as callers must."""
    value = alloc.alloc(len(key))
    prefix_len = cache.insert(key, value)
    alloc.free(value[:prefix_len])
    return value


def contents(cache: RadixCache) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Every cached page as {token prefix up to the page's end: the page's slots},
    read without touching LRU state or splitting nodes."""
    out = {}
    stack = [(cache.root_node, ())]
    while stack:
        node, path = stack.pop()
        for start in range(0, len(node.key), cache.page_size):
            end = start + cache.page_size
            out[path + tuple(node.key[:end])] = tuple(node.value[start:end].tolist())
        path = path + tuple(node.key)
        stack.extend((child, path) for child in node.children.values())
    return out


def present(cache: RadixCache, key: list[int]) -> int:
    """Cached length of ``key``'s prefix, without touching the tree."""
    stored = contents(cache)
    n = 0
    while n + cache.page_size <= len(key) and tuple(key[: n + cache.page_size]) in stored:
        n += cache.page_size
    return n


# ----- structure: insert, match, split -----


def test_insert_returns_present_prefix_and_match_returns_slots():
    alloc, cache = make_cache()
    assert cache.insert([1, 2, 3, 4, 5], slots(10, 11, 12, 13, 14)) == 0
    assert cache.insert([1, 2, 3, 9], slots(20, 21, 22, 23)) == 3
    res = cache.match_prefix([1, 2, 3, 4, 7])
    assert res.device_indices.tolist() == [10, 11, 12, 13]
    assert res.device_indices.dtype == torch.int64
    assert res.last_host_node is res.last_device_node
    assert res.host_hit_length == 0
    assert cache.match_prefix([1, 2, 3, 9, 9]).device_indices.tolist() == [10, 11, 12, 23]
    assert cache.total_size() == 6
    assert cache.evictable_size() == 6
    assert cache.protected_size() == 0


def test_match_inside_a_node_splits_it_at_the_match_end():
    alloc, cache = make_cache()
    cache.insert([1, 2, 3, 4, 5], slots(10, 11, 12, 13, 14))
    res = cache.match_prefix([1, 2, 3])
    node = res.last_device_node
    assert node.key == [1, 2, 3] and node.value.tolist() == [10, 11, 12]
    assert node.parent is cache.root_node
    (child,) = node.children.values()
    assert child.key == [4, 5] and child.value.tolist() == [13, 14]
    assert child.parent is node
    assert cache.total_size() == 5 and cache.evictable_size() == 5
    assert cache._format_tree() == "0 [] r=1\n  3 [1, 2, 3] r=0\n    2 [4, 5] r=0\n#tokens: 5"


def test_split_of_a_locked_node_keeps_both_halves_locked():
    alloc, cache = make_cache()
    cache.insert([1, 2, 3, 4], slots(0, 1, 2, 3))
    leaf = cache.match_prefix([1, 2, 3, 4]).last_device_node
    cache.inc_lock_ref(leaf)
    upper = cache.match_prefix([1, 2]).last_device_node
    assert upper.lock_ref == 1 and leaf.lock_ref == 1 and leaf.parent is upper
    assert cache.protected_size() == 4 and cache.evictable_size() == 0
    cache.dec_lock_ref(leaf)
    assert upper.lock_ref == 0
    assert cache.protected_size() == 0 and cache.evictable_size() == 4


def test_empty_and_missing_keys_match_the_root():
    alloc, cache = make_cache()
    cache.insert([1, 2], slots(0, 1))
    for key in ([], [5, 1, 2]):
        res = cache.match_prefix(key)
        assert res.device_indices.tolist() == []
        assert res.last_device_node is cache.root_node


def test_pretty_print_shows_the_tree(capsys):
    alloc, cache = make_cache()
    cache.insert(list(range(14)), torch.arange(14))
    cache.insert([0, 1, 99], slots(40, 41, 42))
    cache.inc_lock_ref(cache.match_prefix([0, 1, 99]).last_device_node)
    cache.pretty_print()
    assert capsys.readouterr().out == (
        "0 [] r=1\n"
        "  2 [0, 1] r=1\n"
        "    12 [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]... r=0\n"
        "    1 [99] r=1\n"
        "#tokens: 15\n"
    )


def test_insert_validates_its_arguments():
    alloc, cache = make_cache(page_size=1)
    with pytest.raises(ValueError, match="len\\(key\\)=3, got 2 slots"):
        cache.insert([1, 2, 3], slots(0, 1))
    with pytest.raises(TypeError, match="int64"):
        cache.insert([1], torch.tensor([0], dtype=torch.int32))
    _, paged = make_cache(page_size=4)
    with pytest.raises(ValueError, match="multiple of page_size=4, got 6"):
        paged.insert([1, 2, 3, 4, 5, 6], torch.arange(6))
    assert cache.total_size() == 0 and paged.total_size() == 0


def test_cache_page_size_must_match_the_allocator():
    with pytest.raises(ValueError, match="page_size=4, got 1"):
        RadixCache(TokenSlotAllocator(8, page_size=4), page_size=1)


# ----- page_size > 1 -----


def test_paged_match_truncates_to_whole_pages():
    alloc, cache = make_cache(page_size=4)
    cache.insert(list(range(8)), torch.arange(8))
    # 7 tokens: only one whole page can match.
    assert cache.match_prefix(list(range(7))).device_indices.tolist() == [0, 1, 2, 3]
    # Diverging inside page 2: the match stops at the page boundary.
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 0, 0]).device_indices.tolist() == [0, 1, 2, 3]
    assert cache.match_prefix(list(range(8)) + [1, 2]).device_indices.tolist() == list(range(8))


def test_paged_insert_splits_only_at_page_boundaries():
    alloc, cache = make_cache(page_size=4)
    cache.insert(list(range(12)), torch.arange(12))
    # Shares 6 tokens, but only the first page counts as present.
    assert cache.insert([0, 1, 2, 3, 4, 5, 77, 78], torch.arange(20, 28)) == 4
    assert cache._format_tree() == (
        "0 [] r=1\n"
        "  4 [0, 1, 2, 3] r=0\n"
        "    8 [4, 5, 6, 7, 8, 9, 10, 11] r=0\n"
        "    4 [4, 5, 77, 78] r=0\n"
        "#tokens: 16"
    )
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 77, 78]).device_indices.tolist() == [0, 1, 2, 3, 24, 25, 26, 27]


# ----- eviction and locks -----


def test_evict_takes_least_recently_used_leaves_first():
    alloc, cache = make_cache()
    a = [1, 1, 1]
    b = [2, 2, 2]
    c = [3, 3, 3]
    for key in (a, b, c):
        insert_fresh(alloc, cache, key)
    cache.match_prefix(a)  # a becomes the most recently used
    assert cache.evict(3) == 3
    assert (present(cache, a), present(cache, b), present(cache, c)) == (3, 0, 3)
    assert cache.evict(1) == 3  # a whole leaf goes, even when fewer tokens are asked for
    assert (present(cache, a), present(cache, c)) == (3, 0)
    assert alloc.available_size() == 64 - 3


def test_evict_reaches_a_parent_once_its_children_are_gone():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2, 3])
    insert_fresh(alloc, cache, [1, 2, 4, 4])
    insert_fresh(alloc, cache, [9])
    cache.match_prefix([9])
    # Leaves [3] and [4, 4] are older than [9]; their parent [1, 2] goes next.
    assert cache.evict(5) == 5
    assert present(cache, [1, 2]) == 0 and present(cache, [9]) == 1
    assert cache.total_size() == 1 and cache.evictable_size() == 1
    assert alloc.available_size() == 63


def test_locked_nodes_are_never_evicted():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2, 3, 4])
    insert_fresh(alloc, cache, [1, 2, 5])
    insert_fresh(alloc, cache, [7, 7])
    node = cache.match_prefix([1, 2, 3, 4]).last_device_node
    assert cache.inc_lock_ref(node) == -4
    assert cache.protected_size() == 4 and cache.evictable_size() == 3
    assert cache.evict(1000) == 3
    assert present(cache, [1, 2, 3, 4]) == 4 and present(cache, [1, 2, 5]) == 2
    assert cache.evictable_size() == 0 and cache.total_size() == 4
    assert cache.dec_lock_ref(node) == 4
    assert cache.evict(1000) == 4
    assert alloc.available_size() == 64


def test_nested_locks_count():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2, 3, 4])
    inner = cache.match_prefix([1, 2]).last_device_node
    outer = cache.match_prefix([1, 2, 3, 4]).last_device_node
    assert cache.inc_lock_ref(inner) == -2
    assert cache.inc_lock_ref(outer) == -2
    assert inner.lock_ref == 2 and outer.lock_ref == 1
    assert cache.dec_lock_ref(inner) == 0
    assert cache.protected_size() == 4
    assert cache.dec_lock_ref(outer) == 4
    assert cache.protected_size() == 0 and cache.evictable_size() == 4


def test_dec_lock_ref_of_an_unlocked_node_raises():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2])
    node = cache.match_prefix([1, 2]).last_device_node
    with pytest.raises(ValueError, match="not locked"):
        cache.dec_lock_ref(node)
    assert node.lock_ref == 0 and cache.evictable_size() == 2


def test_locking_an_evicted_node_raises():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2])
    node = cache.match_prefix([1, 2]).last_device_node
    cache.evict(2)
    with pytest.raises(ValueError, match="does not belong to this tree"):
        cache.inc_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 0


def test_reset_frees_every_slot_but_refuses_while_locked():
    alloc, cache = make_cache()
    insert_fresh(alloc, cache, [1, 2, 3])
    insert_fresh(alloc, cache, [1, 5])
    node = cache.match_prefix([1, 5]).last_device_node
    cache.inc_lock_ref(node)
    with pytest.raises(RuntimeError, match="2 tokens are locked"):
        cache.reset()
    cache.dec_lock_ref(node)
    cache.reset()
    assert alloc.available_size() == 64
    assert cache.total_size() == 0 and cache.evictable_size() == 0
    assert present(cache, [1, 2, 3]) == 0
    with pytest.raises(ValueError, match="does not belong to this tree"):
        cache.inc_lock_ref(node)


def test_disabled_cache_stores_nothing_and_frees_finished_requests():
    alloc = TokenSlotAllocator(16)
    cache = RadixCache(alloc, disable=True)
    value = alloc.alloc(3)
    assert cache.insert([1, 2, 3], value) == 0
    assert present(cache, [1, 2, 3]) == 0
    assert cache.evict(10) == 0
    req = Req("r", [1, 2, 3, 4], req_to_token=alloc.alloc(4))
    cache.cache_finished_req(req)
    assert alloc.allocated_pages() == set(value.tolist())


# ----- request paths -----


def start_request(alloc: TokenSlotAllocator, cache: RadixCache, rid: str, tokens: list[int], kv_len: int) -> Req:
    """What a scheduler does: match, lock, then give the rest fresh slots."""
    req = Req(rid, tokens)
    res = cache.match_prefix(tokens)
    req.prefix_indices = res.device_indices
    req.last_node = res.last_device_node
    req.cache_protected_len = res.device_indices.numel()
    cache.inc_lock_ref(req.last_node)
    new = alloc.alloc(kv_len - req.cache_protected_len)
    req.req_to_token = torch.cat([req.prefix_indices, new])
    return req


def test_cache_finished_req_inserts_frees_duplicates_and_unlocks():
    alloc, cache = make_cache(size=32)
    first = start_request(alloc, cache, "a", [1, 2, 3, 4], kv_len=4)
    # Another request computed [1, 2] on its own slots before "a" finished.
    second = start_request(alloc, cache, "b", [1, 2, 7], kv_len=3)
    cache.cache_finished_req(first)
    assert cache.match_prefix([1, 2, 3, 4]).device_indices.tolist() == [0, 1, 2, 3]
    cache.cache_finished_req(second)
    # b's slots for [1, 2] (4, 5) duplicated a's and went back; slot 6 joined the tree.
    assert cache.match_prefix([1, 2, 7]).device_indices.tolist() == [0, 1, 6]
    assert alloc.allocated_pages() == {0, 1, 2, 3, 6}
    assert cache.protected_size() == 0 and cache.evictable_size() == 5


def test_cache_finished_req_uses_only_tokens_with_kv():
    alloc, cache = make_cache(size=32)
    req = start_request(alloc, cache, "a", [5, 6, 7], kv_len=3)
    req.output_ids = [8]  # sampled, but its KV is not computed yet
    cache.cache_finished_req(req)
    assert present(cache, [5, 6, 7, 8]) == 3
    assert cache.total_size() == 3


def test_cache_finished_req_paged_frees_the_unaligned_tail():
    alloc, cache = make_cache(size=32, page_size=4)
    req = start_request(alloc, cache, "a", list(range(10)), kv_len=10)
    assert req.req_to_token.tolist() == list(range(10))
    cache.cache_finished_req(req)
    assert cache.match_prefix(list(range(10))).device_indices.tolist() == list(range(8))
    assert alloc.allocated_pages() == {0, 1}
    assert cache.evictable_size() == 8 and cache.protected_size() == 0


def test_cache_finished_req_without_insert_frees_its_own_slots():
    alloc, cache = make_cache(size=32)
    insert_fresh(alloc, cache, [1, 2])
    req = start_request(alloc, cache, "a", [1, 2, 3, 4], kv_len=4)
    cache.cache_finished_req(req, is_insert=False)
    assert present(cache, [1, 2, 3, 4]) == 2
    assert alloc.allocated_pages() == {0, 1}


def test_cache_unfinished_req_moves_lock_and_rewrites_duplicates():
    alloc, cache = make_cache(size=32, page_size=2)
    other = start_request(alloc, cache, "o", [1, 2, 3, 4], kv_len=4)
    cache.cache_finished_req(other)  # tree: [1 2 3 4] on slots 0..3
    req = Req("r", [1, 2, 3, 4, 5, 6, 7])
    req.last_node = cache.root_node  # it matched nothing: say it raced the insert
    cache.inc_lock_ref(req.last_node)
    req.req_to_token = alloc.alloc(5)  # first chunk: 5 tokens on slots 4..8
    assert req.req_to_token.tolist() == [4, 5, 6, 7, 8]
    cache.cache_unfinished_req(req)
    # [1..4] duplicated the tree: slots 4..7 went back and the request now uses 0..3.
    assert req.req_to_token.tolist() == [0, 1, 2, 3, 8]
    assert req.prefix_indices.tolist() == [0, 1, 2, 3, 8]
    assert req.cache_protected_len == 4
    assert req.last_node.key == [1, 2, 3, 4] and req.last_node.lock_ref == 1
    assert cache.protected_size() == 4 and cache.evictable_size() == 0
    assert alloc.allocated_pages() == {0, 1, 4}
    # Second chunk continues the partly used page of slot 8.
    more = alloc.alloc_extend(int(req.req_to_token[-1]), 2)
    assert more.tolist() == [9, 10]
    req.req_to_token = torch.cat([req.req_to_token, more])
    cache.cache_unfinished_req(req)
    assert req.req_to_token.tolist() == [0, 1, 2, 3, 8, 9, 10]
    assert req.cache_protected_len == 6
    assert cache.protected_size() == 6
    cache.cache_finished_req(req)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    assert alloc.allocated_pages() == {0, 1, 4}
    assert cache.evict(100) == 6
    assert alloc.available_size() == 32


def test_cache_requests_need_a_locked_node():
    alloc, cache = make_cache()
    req = Req("r", [1, 2], req_to_token=alloc.alloc(2))
    with pytest.raises(ValueError, match="request r: last_node is None"):
        cache.cache_finished_req(req)
    with pytest.raises(ValueError, match="request r: last_node is None"):
        cache.cache_unfinished_req(req)
    assert cache.total_size() == 0 and alloc.available_size() == 62


def test_req_checks_its_slot_tensor():
    with pytest.raises(TypeError, match="Req.req_to_token must be a 1-D torch.int64 tensor"):
        Req("r", [1], req_to_token=torch.tensor([0], dtype=torch.int32))
    req = Req("r", [1], req_to_token=slots(0, 1))
    with pytest.raises(ValueError, match="request r: req_to_token has 2 slots but only 1 token ids"):
        req.fill_ids


# ----- random workloads against a brute-force reference -----


class PoisoningAllocator(TokenSlotAllocator):
    """Marks freed slots as holding no KV, so a freed slot served later is caught."""

    def __init__(self, size: int, page_size: int, kv_token: torch.Tensor, kv_pos: torch.Tensor) -> None:
        super().__init__(size, page_size=page_size)
        self.kv_token = kv_token
        self.kv_pos = kv_pos

    def free(self, free_index: torch.Tensor) -> None:
        super().free(free_index)
        if free_index.numel():
            pages = torch.unique(free_index // self.page_size)
            freed = (pages.unsqueeze(1) * self.page_size + torch.arange(self.page_size)).reshape(-1)
            self.kv_token[freed] = -1
            self.kv_pos[freed] = -1


@dataclass
class Running:
    req: Req
    locked_prefix: tuple[int, ...]


class Workload:
    """Drives a RadixCache with random operations and checks it after each one.

    The reference is the set of cached pages, keyed by the token prefix ending
    with each page: a match must return the longest stored prefix, an insert
    must add exactly the missing pages, and an eviction may only remove
    unlocked pages. A fake KV pool records which (token, position) each slot
    holds, so serving a slot that was freed or reused is caught too.
    """

    def __init__(self, seed: int, page_size: int, num_slots: int) -> None:
        self.rng = random.Random(seed)
        self.ps = page_size
        self.kv_token = torch.full((num_slots,), -1, dtype=torch.int64)
        self.kv_pos = torch.full((num_slots,), -1, dtype=torch.int64)
        self.alloc = PoisoningAllocator(num_slots, page_size, self.kv_token, self.kv_pos)
        self.cache = RadixCache(self.alloc, page_size=page_size)
        self.ref: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.running: list[Running] = []
        self.bare_locks: list[tuple[TreeNode, tuple[int, ...]]] = []
        self.stems = [self.random_tokens(self.rng.randint(1, 6 * page_size)) for _ in range(6)]
        self.next_rid = 0
        self.evictions = 0

    # -- generators --

    def random_tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(4) for _ in range(n)]

    def random_sequence(self) -> list[int]:
        stem = self.rng.choice(self.stems)
        head = stem[: self.rng.randint(0, len(stem))]
        return head + self.random_tokens(self.rng.randint(0 if head else 1, 5 * self.ps))

    # -- reference --

    def expected_match(self, key: list[int]) -> tuple[int, list[int]]:
        n, indices = 0, []
        while n + self.ps <= len(key) and tuple(key[: n + self.ps]) in self.ref:
            n += self.ps
            indices.extend(self.ref[tuple(key[:n])])
        return n, indices

    def ref_insert(self, key: list[int], value: torch.Tensor) -> int:
        expected, _ = self.expected_match(key)
        for end in range(expected + self.ps, len(key) + 1, self.ps):
            self.ref[tuple(key[:end])] = tuple(value[end - self.ps : end].tolist())
        return expected

    def write_kv(self, slot_ids: torch.Tensor, tokens: list[int], first_pos: int) -> None:
        self.kv_token[slot_ids] = torch.tensor(tokens, dtype=torch.int64)
        self.kv_pos[slot_ids] = torch.arange(first_pos, first_pos + len(tokens))

    def alloc_or_evict(self, n: int, last_slot: int = -1) -> torch.Tensor | None:
        got = self.alloc.alloc_extend(last_slot, n)
        if got is None:
            self.checked_evict(n + self.ps)
            got = self.alloc.alloc_extend(last_slot, n)
        return got

    # -- operations --

    def op_match(self) -> None:
        key = self.random_sequence()
        res = self.cache.match_prefix(key)
        n, indices = self.expected_match(key)
        assert res.device_indices.tolist() == indices
        assert res.last_device_node is res.last_host_node
        self.check_kv(res.device_indices, key[:n], 0)

    def op_insert(self) -> None:
        key = self.random_sequence()
        key = key[: len(key) - len(key) % self.ps]
        value = self.alloc_or_evict(len(key))
        if value is None:
            return
        self.write_kv(value, key, 0)
        expected = self.ref_insert(key, value)
        assert self.cache.insert(key, value) == expected
        self.alloc.free(value[:expected])

    def op_evict(self) -> None:
        self.checked_evict(self.rng.randint(1, 6 * self.ps))

    def op_lock(self) -> None:
        key = self.random_sequence()
        res = self.cache.match_prefix(key)
        n = res.device_indices.numel()
        self.cache.inc_lock_ref(res.last_device_node)
        self.bare_locks.append((res.last_device_node, tuple(key[:n])))

    def op_unlock(self) -> None:
        if self.bare_locks:
            node, _ = self.bare_locks.pop(self.rng.randrange(len(self.bare_locks)))
            self.cache.dec_lock_ref(node)

    def op_start(self) -> None:
        if self.running and self.rng.random() < 0.3:
            # The same prompt as a running request: when both compute it, one
            # insert finds the other's pages and its slots are duplicates.
            tokens = list(self.rng.choice(self.running).req.origin_input_ids)
        else:
            tokens = self.random_sequence()
        req = Req(f"r{self.next_rid}", tokens)
        self.next_rid += 1
        res = self.cache.match_prefix(tokens)
        n, indices = self.expected_match(tokens)
        assert res.device_indices.tolist() == indices
        req.prefix_indices = res.device_indices
        req.req_to_token = res.device_indices.clone()
        req.cache_protected_len = n
        req.last_node = res.last_device_node
        self.cache.inc_lock_ref(req.last_node)
        self.running.append(Running(req, tuple(tokens[:n])))
        if self.rng.random() < 0.5:
            self.op_prefill(self.running[-1])

    def op_prefill(self, run: Running | None = None) -> None:
        """Compute the next chunk of prompt KV, then cache the request as unfinished."""
        if run is None:
            pending = [r for r in self.running if r.req.kv_len < len(r.req.origin_input_ids)]
            if not pending:
                return
            run = self.rng.choice(pending)
        req = run.req
        todo = len(req.origin_input_ids) - req.kv_len
        if todo and not self.extend(req, self.rng.randint(1, todo)):
            return
        self.ref_insert(req.fill_ids[: req.kv_len - req.kv_len % self.ps], req.req_to_token)
        self.cache.cache_unfinished_req(req)
        run.locked_prefix = tuple(req.fill_ids[: req.cache_protected_len])
        assert req.prefix_indices.tolist() == req.req_to_token.tolist()
        _, indices = self.expected_match(list(run.locked_prefix))
        assert req.req_to_token[: req.cache_protected_len].tolist() == indices

    def op_decode(self) -> None:
        prefilled = [r for r in self.running if r.req.kv_len >= len(r.req.origin_input_ids)]
        if prefilled:
            req = self.rng.choice(prefilled).req
            req.output_ids.append(self.rng.randrange(4))
            self.extend(req, 1)

    def op_finish(self) -> None:
        if not self.running:
            return
        run = self.running.pop(self.rng.randrange(len(self.running)))
        req = run.req
        if self.rng.random() < 0.1:
            self.cache.cache_finished_req(req, is_insert=False)
            return
        self.ref_insert(req.fill_ids[: req.kv_len - req.kv_len % self.ps], req.req_to_token)
        self.cache.cache_finished_req(req)

    def extend(self, req: Req, n: int) -> bool:
        """Give the next ``n`` tokens of ``req`` slots and KV."""
        tokens = req.all_token_ids[req.kv_len : req.kv_len + n]
        last = int(req.req_to_token[-1]) if req.kv_len % self.ps else -1
        got = self.alloc_or_evict(len(tokens), last)
        if got is None:
            return False
        self.write_kv(got, tokens, req.kv_len)
        req.req_to_token = torch.cat([req.req_to_token, got])
        return True

    def checked_evict(self, num_tokens: int) -> None:
        before = dict(self.ref)
        protected = self.protected_pages()
        evictable = (len(before) - len(protected)) * self.ps
        evicted = self.cache.evict(num_tokens)
        after = contents(self.cache)
        removed = set(before) - set(after)
        assert set(after) <= set(before)
        assert all(after[k] == before[k] for k in after)
        assert evicted == len(removed) * self.ps
        assert not removed & protected
        assert min(num_tokens, evictable) <= evicted <= evictable
        self.evictions += evicted
        self.ref = after

    # -- invariants --

    def protected_pages(self) -> set[tuple[int, ...]]:
        locked = [r.locked_prefix for r in self.running] + [p for _, p in self.bare_locks]
        return {p[:end] for p in locked for end in range(self.ps, len(p) + 1, self.ps)}

    def check_kv(self, slot_ids: torch.Tensor, tokens: list[int], first_pos: int) -> None:
        assert self.kv_token[slot_ids].tolist() == tokens
        assert self.kv_pos[slot_ids].tolist() == list(range(first_pos, first_pos + len(tokens)))

    def check(self) -> None:
        cache = self.cache
        assert contents(cache) == self.ref
        protected = self.protected_pages()
        assert cache.protected_size() == len(protected) * self.ps
        assert cache.evictable_size() == (len(self.ref) - len(protected)) * self.ps
        assert cache.total_size() == len(self.ref) * self.ps
        if self.ref:
            tree_slots = torch.tensor([s for page in self.ref.values() for s in page])
            assert self.kv_token[tree_slots].tolist() == [t for p in self.ref for t in p[-self.ps :]]
            assert self.kv_pos[tree_slots].tolist() == [
                pos for p in self.ref for pos in range(len(p) - self.ps, len(p))
            ]
        # Every allocated page is owned by exactly one of: the tree, one running request.
        owners = [{s // self.ps for page in self.ref.values() for s in page}]
        for run in self.running:
            req = run.req
            self.check_kv(req.req_to_token, req.fill_ids, 0)
            owners.append({int(s) // self.ps for s in req.req_to_token[req.cache_protected_len :]})
        assert sum(len(o) for o in owners) == len(set().union(*owners))
        assert set().union(*owners) == self.alloc.allocated_pages()

    def run(self, num_ops: int) -> None:
        ops = [
            (self.op_match, 3),
            (self.op_insert, 2),
            (self.op_evict, 1),
            (self.op_lock, 1),
            (self.op_unlock, 1),
            (self.op_start, 2),
            (self.op_prefill, 2),
            (self.op_decode, 2),
            (self.op_finish, 2),
        ]
        funcs, weights = zip(*ops)
        for _ in range(num_ops):
            if len(self.running) > 6:
                self.op_finish()
            if len(self.bare_locks) > 4:
                self.op_unlock()
            self.rng.choices(funcs, weights)[0]()
            self.check()

    def drain(self) -> None:
        while self.running:
            self.op_finish()
        while self.bare_locks:
            self.op_unlock()
        self.check()
        assert self.cache.protected_size() == 0
        self.checked_evict(10**9)
        assert self.ref == {} and self.cache.total_size() == 0
        assert self.alloc.available_size() == self.alloc.size


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_matches_reference(page_size, seed):
    work = Workload(seed=seed * 100 + page_size, page_size=page_size, num_slots=96 * page_size)
    work.run(2000)
    work.drain()
    # The workload must have exercised what it claims to.
    assert work.evictions > 0
    assert work.next_rid > 150
