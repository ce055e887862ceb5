"""LMCRadixCache in MP mode (a real daemon) and IP mode (a real IPStore): multi-turn
byte-exact reloads through the test KV model (tests.kv_model), partial hits, failures in
init_load_back, lock discipline of stores, mode by config file, TP key separation and the TP hook."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from lmc_transfer.config import ConfigError, Mode, load_config
from lmc_transfer.store.ip import IPStore
from lmc_transfer.transfer.layerwise import LayerwiseStore
from lmc_transfer.store.mp_client import MPStore
from lmc_transfer.keys import chunk_keys
from lmc_transfer.radix import LMCacheMode, LMCRadixCache, Req, TokenSlotAllocator
from lmc_transfer.radix.policy import KeyNamespace
from tests.conftest_mp import (  # noqa: F401  (fixtures)
    CHUNK,
    NUM_SLOTS,
    daemons,
    make_buffers,
    start_daemon,
    workdir,
    write_config,
)
from tests.kv_model import expected_kv, pool_kv, write_kv

pytestmark = pytest.mark.timeout(90)

MODEL = "toy-model"


def new_cache(cfg, seed: int, **kwargs) -> LMCRadixCache:
    buffers = make_buffers(seed)
    allocator = TokenSlotAllocator(NUM_SLOTS, kvcache=buffers)
    return LMCRadixCache(allocator, config=cfg, model_id=MODEL, **kwargs)


def compute_and_finish(cache: LMCRadixCache, tokens: list[int], rid: str = "w") -> None:
    """A request that computes all of ``tokens`` from scratch and finishes (stores them)."""
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    write_kv(cache.kv_buffers, tokens, 0, slots)
    req = Req(rid, tokens, req_to_token=slots, last_node=cache.root_node)
    cache.cache_finished_req(req)


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 32000, (n,), generator=g).tolist()


def holds_kv_of(cache: LMCRadixCache, tokens: list[int], slots: torch.Tensor) -> bool:
    """Whether ``slots`` hold exactly the KV of the first ``len(slots)`` of ``tokens``."""
    return torch.equal(pool_kv(cache.kv_buffers, slots), expected_kv(tokens[: slots.numel()]))


@dataclass
class Served:
    """What the cache gave a request back: from the device tree or the host cache, and of that from the host."""

    reused: int
    loaded: int


def serve(cache: LMCRadixCache, rid: str, prompt: list[int], output: list[int]) -> Served:
    """One request the way SGLang's scheduler drives the cache (match, MP load-back, compute
    the rest, cache the finished request); the prefix it got back must be byte-exact."""
    req = Req(rid, list(prompt))
    loaded_before = cache.load_back_stats.loaded_tokens
    # The last prompt token is always computed: it yields the first output's logits.
    match = cache.match_prefix(prompt[:-1], req=req)
    prefix, node = match.device_indices, match.last_device_node
    if match.host_hit_length > 0:
        loaded, node = cache.init_load_back(node, match.host_hit_length, req)
        prefix = torch.cat([prefix, loaded])
    cache.finish_loads()
    assert holds_kv_of(cache, prompt, prefix)
    cache.inc_lock_ref(node)
    req.last_node, req.prefix_indices, req.cache_protected_len = node, prefix, prefix.numel()
    history = list(prompt) + list(output)  # KV for all but the last output (not fed back yet)
    need = len(history) - 1 - prefix.numel()
    allocator = cache.token_to_kv_pool_allocator
    if need > allocator.available_size():
        cache.evict(need - allocator.available_size())
    slots = allocator.alloc(need)
    write_kv(cache.kv_buffers, history[:-1], prefix.numel(), slots)
    req.output_ids, req.req_to_token = list(output), torch.cat([prefix, slots])
    cache.cache_finished_req(req)
    return Served(prefix.numel(), cache.load_back_stats.loaded_tokens - loaded_before)


class Chats:
    """Conversations that share a system prompt; each turn adds a user prompt and an output."""

    def __init__(self, conversations: int, system_tokens: int, user_tokens: int, output_tokens: int, seed: int) -> None:
        self._seeds = itertools.count(1000 * seed)
        system = tokens(next(self._seeds), system_tokens)
        self.histories = [list(system) for _ in range(conversations)]
        self.user_tokens, self.output_tokens = user_tokens, output_tokens

    def turns(self) -> Iterator[tuple[int, list[int], list[int]]]:
        """One turn of every conversation: (conversation, prompt, output); histories grow."""
        for c, history in enumerate(self.histories):
            prompt = history + tokens(next(self._seeds), self.user_tokens)
            output = tokens(next(self._seeds), self.output_tokens)
            self.histories[c] = prompt + output
            yield c, prompt, output


def serve_turn(cache: LMCRadixCache, chats: Chats, name: str) -> tuple[Served, list[int], list[int]]:
    """Serve one turn of every conversation: (what came back in all, history and prompt lengths before)."""
    total = Served(0, 0)
    before = [len(h) for h in chats.histories]
    prompts = []
    for c, prompt, output in chats.turns():
        prompts.append(len(prompt))
        served = serve(cache, f"{name}-{c}", prompt, output)
        total.reused += served.reused
        total.loaded += served.loaded
    return total, before, prompts


def pool_counts(cache: LMCRadixCache, daemon=None) -> tuple[int, int]:
    """(leases, reservations) held in the cache's pool."""
    if daemon is not None:
        pool = daemon.stats()["pool"]
        return pool["leases"], pool["reservations"]
    stats = cache.store.pool.stats()
    return stats.leases, stats.reservations


def setup(mode: str, workdir, daemons, **overrides):
    cfg = write_config(workdir, mode=mode, **overrides)
    daemon = start_daemon(daemons, cfg) if mode == "mp" else None
    return cfg, daemon


def expected_reuse(history_len: int, prompt_len: int) -> int:
    """Tokens a turn gets back from the cache: the stored full chunks of the previous
    turn (prompt + all but the last output) within the matched key (prompt minus one)."""
    stored = (history_len - 1) // CHUNK * CHUNK
    return min(stored, (prompt_len - 1) // CHUNK * CHUNK)


@pytest.mark.parametrize("mode", ["mp", "ip"])
def test_multi_turn_with_evictions_and_restart_is_byte_exact(mode, workdir, daemons):
    cfg, daemon = setup(mode, workdir, daemons)
    cache = new_cache(cfg, seed=1)
    chats = Chats(conversations=2, system_tokens=40, user_tokens=20, output_tokens=9, seed=3)
    for turn in range(3):
        got, before, prompts = serve_turn(cache, chats, str(turn))
        cache.evict(NUM_SLOTS)  # what memory pressure between turns would do
        if turn == 0:
            # the second conversation shares the 40-token system prompt on the device
            assert (got.reused, got.loaded) == (40, 0)
        else:
            want = sum(expected_reuse(h, p) for h, p in zip(before, prompts, strict=True))
            # the second conversation finds the system prompt on the device, loaded by the first
            assert got.reused == want > 0
            assert got.loaded == want - 40
        assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    keep = cache.store if mode == "ip" else None
    if keep is None:
        cache.release_host_resources()
    else:
        cache.reset()

    # engine restart: new (differently filled) buffers, allocator and cache
    cache = new_cache(cfg, seed=2, store=keep)
    got, before, prompts = serve_turn(cache, chats, "r")
    want = sum(expected_reuse(h, p) for h, p in zip(before, prompts, strict=True))
    assert got.reused == want > 0 and got.loaded == want - 40
    cache.evict(NUM_SLOTS)
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    assert cache.protected_size() == 0 and cache.in_flight_stores() == 0
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


def test_mp_partial_hit_loads_only_past_the_device_prefix(workdir, daemons):
    cfg, daemon = setup("mp", workdir, daemons)
    cache = new_cache(cfg, seed=5)
    alloc = cache.token_to_kv_pool_allocator
    base = tokens(50, 3 * CHUNK + 5)
    compute_and_finish(cache, base)
    cache.evict(NUM_SLOTS)
    # the device keeps 21 tokens (one chunk and 5): the first host chunk overlaps it
    compute_and_finish(cache, base[:21], rid="short")
    device_slots = cache.match_prefix(base[:21]).device_indices
    before = all_rows(cache)

    # a prompt sharing two chunks and 3 tokens with ``base``, then diverging
    prompt = base[: 2 * CHUNK + 3] + tokens(51, 20)
    req = Req("p", prompt)
    res = cache.match_prefix(prompt, req=req)
    assert res.device_indices.numel() == 21
    assert res.host_hit_length == 2 * CHUNK - 21
    free_before = alloc.available_size()
    loaded, node = cache.init_load_back(res.last_device_node, res.host_hit_length, req)
    assert loaded.numel() == 2 * CHUNK - 21
    prefix = torch.cat([res.device_indices, loaded])
    assert holds_kv_of(cache, prompt, prefix)
    # only the new slots were written: the overlapping rows of the first chunk were skipped
    untouched = torch.ones(NUM_SLOTS, dtype=torch.bool)
    untouched[loaded] = False
    assert torch.equal(all_rows(cache)[:, untouched], before[:, untouched])
    assert device_slots.numel() == 21 and not (untouched[device_slots] == False).any()  # noqa: E712
    assert alloc.available_size() == free_before - loaded.numel()
    assert cache.match_prefix(prompt).device_indices.numel() == 2 * CHUNK
    assert node is cache.match_prefix(prompt).last_device_node
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


def all_rows(cache: LMCRadixCache) -> torch.Tensor:
    """Every layer's and plane's rows of every slot: ``[layers * planes, slots, row_bytes]``."""
    b = cache.kv_buffers
    return torch.stack([b.plane_rows(layer, plane).clone() for layer in range(b.num_layers) for plane in range(2)])


def _stored_and_matched(cfg, seed: int, n_chunks: int, **kwargs):
    cache = new_cache(cfg, seed=seed, **kwargs)
    prompt = tokens(seed, n_chunks * CHUNK + 3)
    compute_and_finish(cache, prompt)
    cache.evict(NUM_SLOTS)
    req = Req("r", prompt)
    res = cache.match_prefix(prompt, req=req)
    assert res.host_hit_length == n_chunks * CHUNK
    return cache, prompt, req, res


def test_mp_lease_expired_before_load_back_loads_nothing_and_leaks_nothing(workdir, daemons):
    cfg, daemon = setup("mp", workdir, daemons, lease_ttl_s=0.4)
    cache, prompt, req, res = _stored_and_matched(cfg, 60, 3)
    time.sleep(0.5)
    loaded, node = cache.init_load_back(res.last_device_node, res.host_hit_length, req)
    assert loaded.numel() == 0 and node is cache.root_node
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    assert cache.total_size() == 0
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


def test_mp_daemon_killed_between_match_and_load(workdir, daemons):
    cfg, daemon = setup("mp", workdir, daemons, lookup_timeout_ms=150, request_timeout_ms=250)
    cache, prompt, req, res = _stored_and_matched(cfg, 61, 3)
    daemon.stats()
    daemon.kill()
    loaded, node = cache.init_load_back(res.last_device_node, res.host_hit_length, req)
    # the still-mapped segment gives either whole verified chunks or nothing
    n = loaded.numel()
    assert n % CHUNK == 0 and n <= res.host_hit_length
    assert holds_kv_of(cache, prompt, loaded)
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS - n
    assert cache.total_size() == n

    # a new daemon (new epoch): a lease from the old one loads nothing
    cache.evict(NUM_SLOTS)
    req2 = Req("r2", prompt)
    d2 = start_daemon(daemons, cfg)
    cache2 = new_cache(cfg, seed=62)
    compute_and_finish(cache2, prompt)
    cache2.evict(NUM_SLOTS)
    res2 = cache2.match_prefix(prompt, req=req2)
    assert res2.host_hit_length == 3 * CHUNK
    d2.stats()
    d2.kill()
    d3 = start_daemon(daemons, cfg)
    deadline = time.monotonic() + 10
    while cache2.store.stats().extra["sessions"] < 2 and time.monotonic() < deadline:
        cache2.store.lookup([bytes(32)])  # reconnects to the new daemon (after its backoff)
        time.sleep(0.05)
    loaded2, node2 = cache2.init_load_back(res2.last_device_node, res2.host_hit_length, req2)
    assert loaded2.numel() == 0 and node2 is cache2.root_node
    assert cache2.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    assert pool_counts(cache2, d3) == (0, 0)
    for c in (cache, cache2):
        c.release_host_resources()


def test_request_ending_without_load_back_releases_its_lease(workdir, daemons):
    cfg, daemon = setup("mp", workdir, daemons)
    cache, prompt, req, res = _stored_and_matched(cfg, 63, 2)
    assert pool_counts(cache, daemon) == (1, 0)
    # a re-match of the same request replaces its lease instead of adding one
    res = cache.match_prefix(prompt, req=req)
    assert pool_counts(cache, daemon) == (1, 0)
    # aborted before dispatch: SGLang frees it through cache_finished_req(is_insert=False)
    req.last_node = res.last_device_node
    cache.inc_lock_ref(req.last_node)
    cache.cache_finished_req(req, is_insert=False)
    assert pool_counts(cache, daemon) == (0, 0)
    loaded, _ = cache.init_load_back(res.last_device_node, res.host_hit_length, req)
    assert loaded.numel() == 0
    # reset drops markers of requests still waiting
    cache.match_prefix(prompt, req=Req("w2", prompt))
    assert pool_counts(cache, daemon) == (1, 0)
    cache.reset()
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


@pytest.mark.parametrize("mode", ["mp", "ip"])
def test_store_keeps_its_node_locked_until_commit_and_dedups(mode, workdir, daemons, monkeypatch):
    cfg, daemon = setup(mode, workdir, daemons)
    cache = new_cache(cfg, seed=7)
    prompt = tokens(70, 2 * CHUNK + 4)
    monkeypatch.setattr(LayerwiseStore, "done", lambda self: False)  # a copy still in flight
    compute_and_finish(cache, prompt)
    assert cache.in_flight_stores() == 1
    assert cache.protected_size() == 2 * CHUNK  # the stored chunks are locked, the tail is not
    assert cache.store.lookup(cache.policy.keys(prompt)).num_chunks == 0  # not committed yet
    assert pool_counts(cache, daemon) == (0, 1)
    cache.evict(NUM_SLOTS)  # waits for the store, commits, unlocks, then evicts
    assert cache.in_flight_stores() == 0 and cache.total_size() == 0
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    assert cache.store.stats().stored_chunks == 2
    lease = cache.store.lookup(cache.policy.keys(prompt))
    assert lease.num_chunks == 2
    cache.store.release(lease)
    monkeypatch.undo()
    compute_and_finish(cache, prompt, rid="again")  # nothing new to write: deduplicated
    assert cache.store.stats().stored_chunks == 2 and cache.in_flight_stores() == 0
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


def test_mode_is_chosen_by_the_config_file_only(workdir, daemons):
    cfg_mp, daemon = setup("mp", workdir, daemons)
    cfg_ip = write_config(workdir, mode="ip")
    for cfg, mode, store_type in ((cfg_mp, LMCacheMode.MP, MPStore), (cfg_ip, LMCacheMode.IP, IPStore)):
        cache = new_cache(cfg, seed=8)
        assert cache.mode is mode and type(cache.store) is store_type
        cache.release_host_resources()
    assert LMCacheMode is Mode and load_config(cfg_ip).mode is LMCacheMode.IP  # SGLang's name for the config's enum
    missing = workdir / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        new_cache(missing, seed=8)


def test_tp_ranks_never_share_keys(workdir, daemons):
    cfg, daemon = setup("mp", workdir, daemons)
    prompt = tokens(80, 3 * CHUNK)
    ranks = [new_cache(cfg, seed=90 + r, tp_rank=r, tp_size=2) for r in range(2)]
    keys = [set(c.policy.keys(prompt)) for c in ranks]
    assert len(keys[0]) == len(keys[1]) == 3 and not keys[0] & keys[1]
    for c in ranks:
        compute_and_finish(c, prompt)
    assert daemon.stats()["pool"]["committed_chunks"] == 6
    for c in ranks:
        c.evict(NUM_SLOTS)
        req = Req("r", prompt)
        res = c.match_prefix(prompt, req=req)
        loaded, _ = c.init_load_back(res.last_device_node, res.host_hit_length, req)
        assert loaded.numel() == 3 * CHUNK
        assert holds_kv_of(c, prompt, loaded)
        c.release_host_resources()


def test_request_namespaces_get_disjoint_keys_and_the_default_keeps_the_plain_salt(workdir, daemons):
    cfg, _ = setup("ip", workdir, daemons)
    cache = new_cache(cfg, seed=12)
    prompt = tokens(81, 2 * CHUNK)
    assert KeyNamespace.of(None, None) is None and KeyNamespace.of(None, "") is None
    assert cache.policy.keys(prompt) == chunk_keys(prompt, CHUNK, cache.policy.salt)
    spaces = [None, KeyNamespace("lora-a"), KeyNamespace("lora-b"), KeyNamespace(None, "lora-a"),
              KeyNamespace("lora-a", "tenant")]
    keys = [set(cache.policy.keys(prompt, ns)) for ns in spaces]
    assert all(len(k) == 2 for k in keys)
    assert sum(len(k) for k in keys) == len(set().union(*keys)), "two namespaces share a chunk key"
    assert cache.policy.keys(prompt, KeyNamespace("lora-a")) == cache.policy.keys(prompt, KeyNamespace.of("lora-a", ""))
    # This tree has one namespace (its constructor's cache_salt): attaching another is refused.
    with pytest.raises(ValueError, match="namespace: LMCRadixCache has no per-request namespaces"):
        cache.attach_loaded(cache.root_node, prompt[:CHUNK], torch.arange(CHUNK), KeyNamespace("lora-a"))
    cache.release_host_resources()


@pytest.mark.parametrize("mode", ["mp", "ip"])
def test_tp_min_reduce_hook_limits_the_prefix(mode, workdir, daemons):
    cfg, daemon = setup(mode, workdir, daemons)
    calls: list[int] = []

    def other_rank_has_one_chunk(n: int) -> int:
        calls.append(n)
        return min(n, CHUNK)

    cache = new_cache(cfg, seed=9, tp_min_reduce=other_rank_has_one_chunk)
    prompt = tokens(91, 3 * CHUNK + 1)
    req = Req("miss", prompt)
    assert cache.match_prefix(prompt, req=req).host_hit_length == 0
    assert calls == [0]  # called on a miss too: every rank takes part in each reduce
    compute_and_finish(cache, prompt)
    cache.evict(NUM_SLOTS)
    calls.clear()
    req = Req("hit", prompt)
    res = cache.match_prefix(prompt, req=req)
    if mode == "mp":
        assert res.host_hit_length == CHUNK
        loaded, _ = cache.init_load_back(res.last_device_node, res.host_hit_length, req)
        prefix = loaded
    else:
        prefix = res.device_indices
    assert calls == [3 * CHUNK, CHUNK]  # after the lookup, then after the load
    assert prefix.numel() == CHUNK
    assert holds_kv_of(cache, prompt, prefix)
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS - CHUNK
    assert pool_counts(cache, daemon) == (0, 0)
    cache.release_host_resources()


def device_match(cache: LMCRadixCache, key: list[int]) -> int:
    """Tokens of ``key`` in the device tree (no host lookup, unlike IP match_prefix)."""
    values, _ = cache._match_prefix_helper(cache.root_node, key)
    return sum(v.numel() for v in values)


def test_torn_layerwise_load_is_dropped_from_the_tree_once_unlocked(workdir, daemons):
    """A load whose slabs changed after the forward pass read them (an expired lease on the
    asynchronous CUDA path) must leave nothing in the tree for later requests."""
    cfg, _ = setup("ip", workdir, daemons)
    cache = new_cache(cfg, seed=41)
    allocator = cache.token_to_kv_pool_allocator
    free_at_start = allocator.available_size()
    prompt = tokens(41, 3 * CHUNK)
    compute_and_finish(cache, prompt)
    head = prompt[:CHUNK]
    cache.evict(10**6)
    cache.insert(head + [7], allocator.alloc(CHUNK + 1))  # the device prefix, and a branch that must survive
    loaded = cache.match_prefix(prompt)
    assert loaded.device_indices.numel() == 3 * CHUNK
    extension = cache.insert(prompt + [1, 2], torch.cat([loaded.device_indices, allocator.alloc(2)]))
    assert extension == 3 * CHUNK
    node = loaded.last_device_node
    cache.inc_lock_ref(node)  # a running request
    cache._drop_torn(loaded.device_indices[2 * CHUNK:])
    assert device_match(cache, prompt) == 3 * CHUNK, "dropped while a request holds it"
    cache.dec_lock_ref(node)
    cache.finish_loads()
    # the loaded node (chunks 2-3, one node) holding the torn chunk goes whole, with what grew from it
    assert device_match(cache, prompt + [1, 2]) == CHUNK
    assert device_match(cache, head + [7]) == CHUNK + 1  # the sibling branch stays
    cache.evict(10**6)
    assert allocator.available_size() == free_at_start


def test_a_failing_tp_reduce_after_the_load_leaks_no_slot_or_lease(workdir, daemons):
    cfg, _ = setup("ip", workdir, daemons)
    calls: list[int] = []

    def reduce_fails_after_the_load(n: int) -> int:
        calls.append(n)
        if len(calls) == 2:
            raise RuntimeError("collective failed")
        return n

    cache = new_cache(cfg, seed=12, tp_min_reduce=reduce_fails_after_the_load)
    prompt = tokens(12, 2 * CHUNK + 1)
    compute_and_finish(cache, prompt)
    cache.evict(NUM_SLOTS)
    calls.clear()
    with pytest.raises(RuntimeError, match="collective failed"):
        cache.match_prefix(prompt, req=Req("r", prompt))
    assert len(calls) == 2
    assert cache.token_to_kv_pool_allocator.available_size() == NUM_SLOTS
    assert device_match(cache, prompt) == 0
    assert pool_counts(cache) == (0, 0)
    cache.release_host_resources()
