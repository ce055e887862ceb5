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
