"""SGLang 0.5.23's own classes with the ``lmc_transfer`` radix-cache backend.

The cache is built by SGLang's registry; requests are SGLang ``Req`` objects over
SGLang's ``MHATokenToKVPool``, ``TokenToKVPoolAllocator`` and ``ReqToTokenPool``
and go through SGLang's ``match_kv_cache`` (``init_next_round_input``),
``init_load_back`` and ``release_kv_cache`` (which calls ``checkpoint``), the
calls SGLang's scheduler makes. Only the forward pass is ours (``kv_model``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from array import array
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lmc_transfer.integrations.sglang.importer import SGLangUnavailable, load_sglang

try:
    load_sglang(("0.5.23",), "the SGLang 0.5.23 test tier")
except SGLangUnavailable as exc:
    pytest.skip(f"needs SGLang 0.5.23 (ci/run_sglang_tier.sh builds it): {exc}", allow_module_level=True)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, get_radix_cache_factory
    from sglang.srt.sampling.sampling_params import SamplingParams

    from lmc_transfer.integrations.sglang import plugin as sglang_plugin

from tests.conftest_mp import REPO, start_daemon, write_config
from tests.kv_model import expected_kv, pool_kv, prompt
from tests.sglang import sgl_env
from tests.sglang.sgl_env import make_pools, publish_runtime

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Turn:
    device_len: int  # prefix matched in the device tree
    host_hit: int  # host_hit_length match_prefix reported
    loaded: int  # tokens init_load_back reported
    prefix_len: int  # what the request started from


class Engine(sgl_env.Engine):
    """SGLang's pools and the registry-built cache, driven like SGLang's scheduler drives them."""

    def __init__(self, config_path, seed: int, *, tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None) -> None:
        self.pools = make_pools(seed)
        params = CacheInitParams(
            disable=False, req_to_token_pool=self.pools.req_pool, token_to_kv_pool_allocator=self.pools.allocator,
            page_size=1,
        )
        ctx = TreeCacheBuildContext(
            server_args=SimpleNamespace(lmcache_config_file=str(config_path)),
            params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
            disable_radix_cache=False, tp_worker=None, model_config=SimpleNamespace(model_path="test-model"),
            tp_size=tp_size, tp_rank=tp_rank, tp_group=tp_group,
        )
        self.cache = get_radix_cache_factory(sglang_plugin.BACKEND_NAME)(ctx)

    def match(self, rid: str, prompt_ids: list[int], outputs: int, **namespace: str) -> Req:
        """``namespace``: SGLang's ``extra_key`` (a LoRA adapter) and/or ``cache_salt``."""
        req = Req(rid, "", array("q", prompt_ids), SamplingParams(max_new_tokens=outputs), **namespace)
        req.init_next_round_input(self.cache)
        return req

    def admit(self, req: Req) -> Turn:
        """Load back what match_prefix promised, lock the prefix and check its KV bytes."""
        device_len, host_hit, loaded = req.prefix_len, req.host_hit_length, 0
        if req.host_hit_length > 0:
            loaded, req.last_node = self.cache.init_load_back(
                InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
            )
            # As SGLang's PrefillAdder does after a load-back.
            req.prefix_len += loaded
            if self.cache.load_back_is_cache_owned():
                req.kv.cache_protected_len = req.prefix_len
        req.lock = self.cache.lock(req.last_node)
        prefix = self.cache.prefix_device_indices(req)
        tokens = list(req.origin_input_ids)
        assert torch.equal(pool_kv(self.pools.buffers, prefix), expected_kv(tokens[: req.prefix_len]))
        return Turn(device_len, host_hit, loaded, req.prefix_len)

    def finish(self, req: Req, output_ids: list[int]) -> None:
        """Compute the rest (prompt tail and all outputs but the last), then release like SGLang does."""
        prefix = self.cache.prefix_device_indices(req)
        self.pools.compute_rest(self.cache, req, prefix, list(req.origin_input_ids) + output_ids, output_ids)
        req.finished_reason = FINISH_LENGTH(length=len(output_ids))
        release_kv_cache(req, self.cache, checkpoint=True)

    def run(self, rid: str, prompt_ids: list[int], output_ids: list[int], **namespace: str) -> Turn:
        req = self.match(rid, prompt_ids, len(output_ids), **namespace)
        turn = self.admit(req)
        self.finish(req, output_ids)
        return turn

    def close(self) -> None:
        self.cache.release_host_resources()


@pytest.fixture(scope="module", autouse=True)
def sglang_runtime(tmp_path_factory):
    return publish_runtime(tmp_path_factory.mktemp("tiny-model"), radix_cache_backend=sglang_plugin.BACKEND_NAME)


@pytest.fixture
def engines():
    made: list[Engine] = []
    try:
        yield made
    finally:
        for e in made:
            e.close()


def test_registry_builds_backend_subclassing_sglang_radix_cache(workdir, engines):
    engines.append(Engine(write_config(workdir, mode="ip"), seed=1))
    cache = engines[0].cache
    assert type(cache) is sglang_plugin.LMCSGLangRadixCache
    assert isinstance(cache, RadixCache)
    assert cache.mode is sglang_plugin.LMCacheMode.IP
    # IP mode: SGLang's KV pool calls our counter before each layer.
    assert engines[0].pools.pool.layer_transfer_counter is cache.layer_transfer_counter


def test_multi_turn_prefixes_come_back_from_daemon_byte_exact(workdir, daemons, engines):
    config = write_config(workdir)
    start_daemon(daemons, config)
    e1 = Engine(config, seed=1)
    engines.append(e1)
    a = prompt(1, 45)
    out1 = prompt(11, 6)
    assert e1.run("t1", a, out1) == Turn(0, 0, 0, 0)  # 50 KV tokens -> 3 chunks stored
    e1.evict_all()
    assert e1.slots_accounted()

    b = a + out1 + prompt(2, 20)  # turn 2 of the conversation
    out2 = prompt(12, 4)
    assert e1.run("t2", b, out2) == Turn(0, 48, 48, 48)  # 74 KV tokens -> chunk 3 added
    assert e1.slots_accounted()

    # A second engine whose tree holds only a partial chunk of the conversation:
    # the load starts inside chunk 1 and must not overwrite its device KV.
    e2 = Engine(config, seed=2)
    engines.append(e2)
    e2.run("u1", a[:20], prompt(13, 3))
    c = b + out2 + prompt(3, 10)
    assert e2.run("u2", c, prompt(14, 2)) == Turn(20, 44, 44, 64)
    assert e2.slots_accounted()

    # The first engine, evicted again, gets the longer prefix of turn 3 as well.
    e1.evict_all()
    assert e1.run("t3", c, prompt(15, 2)) == Turn(0, 80, 80, 80)
    assert e1.slots_accounted()
    assert e1.cache.load_back_stats.loaded_tokens == 48 + 80


@pytest.mark.parametrize(
    "ttl, lease_expired, expected",
    [
        # The engine still maps the stopped daemon's segment and the lease's slabs are
        # unchanged there: the whole promised prefix loads, byte-exact.
        (10.0, False, Turn(20, 44, 44, 64)),
        # Past the lease (the scheduler waited): nothing loads; SGLang recomputes from
        # the device prefix.
        (1.0, True, Turn(20, 44, 0, 20)),
    ],
)
def test_daemon_stopped_between_match_and_load_back(workdir, daemons, engines, ttl, lease_expired, expected):
    config = write_config(workdir, lease_ttl_s=ttl)
    daemon = start_daemon(daemons, config)
    e = Engine(config, seed=3)
    engines.append(e)
    a = prompt(4, 70)
    e.run("s1", a, prompt(16, 3))  # 72 KV tokens -> 4 chunks stored
    e.evict_all()
    assert e.run("s1b", a[:20], prompt(19, 3)) == Turn(0, 16, 16, 16)  # device tree: 22 tokens, 20 of them a's

    req = e.match("s2", a + prompt(5, 5), 2)
    assert (req.prefix_len, req.host_hit_length) == (20, 44)
    assert daemon.stop() == 0
    if lease_expired:
        time.sleep(ttl)
    assert e.admit(req) == expected  # admit checks the prefix's KV byte for byte
    e.finish(req, prompt(17, 2))
    assert e.slots_accounted()  # whatever the load allocated is in the tree or free again

    # Daemon gone: a later request matches the device tree only, still byte-exact.
    e.evict_all()
    assert e.run("s3", a, prompt(18, 2)) == Turn(0, 0, 0, 0)
    assert e.slots_accounted()


def test_ip_mode_loads_inside_match_prefix_byte_exact(workdir, engines):
    e = Engine(write_config(workdir, mode="ip"), seed=6)
    engines.append(e)
    a, out1 = prompt(9, 45), prompt(31, 6)
    assert e.run("i1", a, out1) == Turn(0, 0, 0, 0)
    e.evict_all()
    assert e.slots_accounted()
    b = a + out1 + prompt(10, 20)
    assert e.run("i2", b, prompt(32, 4)) == Turn(48, 0, 0, 48)  # loaded by match_prefix itself
    e.evict_all()
    e.run("i3", a[:20], prompt(33, 3))  # a partial chunk on the device: the load skips those 20 tokens
    assert e.run("i4", b, prompt(34, 2)) == Turn(64, 0, 0, 64)
    assert e.slots_accounted()
    assert e.cache.load_back_stats.loaded_tokens == 48 + 16 + 44


@pytest.mark.parametrize("mode", ["mp", "ip"])
def test_lora_and_cache_salt_requests_share_host_kv_only_within_their_namespace(workdir, daemons, engines, mode):
    config = write_config(workdir, mode=mode)
    if mode == "mp":
        start_daemon(daemons, config)
    e = Engine(config, seed=7)
    engines.append(e)
    a, out = prompt(21, 45), prompt(41, 6)  # 50 KV tokens -> 3 chunks stored per namespace
    lora = {"extra_key": "adapter-a"}
    assert e.run("l1", a, out, **lora) == Turn(0, 0, 0, 0)
    e.evict_all()
    # The 45-token prompt holds 2 full chunks; IP loads inside match_prefix itself.
    hit = Turn(0, 32, 32, 32) if mode == "mp" else Turn(32, 0, 0, 32)
    # Other namespaces miss: no adapter, another adapter, a salt equal to the adapter's name.
    for rid, namespace in [("n0", {}), ("n1", {"extra_key": "adapter-b"}), ("n2", {"cache_salt": "adapter-a"})]:
        assert e.run(rid, a, prompt(42, 2), **namespace) == Turn(0, 0, 0, 0), namespace
        e.evict_all()
    # The adapter's own requests hit; admit() checks the loaded KV byte for byte.
    assert e.run("l2", a, prompt(43, 2), **lora) == hit
    e.evict_all()
    salted = {"extra_key": "adapter-a", "cache_salt": "tenant-1"}
    assert e.run("s1", a, out, **salted) == Turn(0, 0, 0, 0)
    e.evict_all()
    assert e.run("s2", a, prompt(44, 2), **salted) == hit
    assert e.slots_accounted()


@pytest.mark.parametrize("mode", ["mp", "ip"])
def test_tp_ranks_agree_on_the_loaded_prefix(workdir, daemons, mode):
    """Two TP ranks (processes in one gloo group, SGLang's TP cpu_group) load the same prefix;
    when one rank's store lost it, neither loads (the MIN all-reduce), where rank 0 alone would."""
    config = write_config(workdir, mode=mode)
    if mode == "mp":
        start_daemon(daemons, config)
    (workdir / "model").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sglang.tp_worker", "--rank", str(rank), "--world", "2",
             "--init-file", str(workdir / "rendezvous"), "--config", str(config),
             "--model-dir", str(workdir / "model"), "--mode", mode],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, f"rank {procs.index(proc)} failed:\n{err[-3000:]}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert outputs[0] == outputs[1]
    turns = {name: Turn(**turn) for name, turn in outputs[0].items()}
    assert turns["stored"] == Turn(0, 0, 0, 0)
    # The 45-token prompt holds 2 full chunks; IP loads inside match_prefix.
    assert turns["all_ranks_hold_it"] == (Turn(0, 32, 32, 32) if mode == "mp" else Turn(32, 0, 0, 32))
    if mode == "ip":
        assert turns["one_rank_lost_it"] == Turn(0, 0, 0, 0)


def test_lmcache_compat_connectors_refuse_this_release_naming_it():
    from lmc_transfer.integrations.sglang import lmcache_compat

    refused = r"supports SGLang 0\.5\.20; the installed SGLang is 0\.5\.23 "
    with pytest.raises(SGLangUnavailable, match=refused):
        lmcache_compat.LMCacheMPConnector(None, 1, 0, 1, "127.0.0.1", 1, [], [])
    with pytest.raises(SGLangUnavailable, match=refused):
        lmcache_compat.LMCacheLayerwiseConnector(None, 1, 0, "unused.yaml")
