"""SGLang 0.5.20's own ``LMCRadixCache`` running on lmc-transfer through the LMCache shim.

``install_lmcache_shim()`` makes SGLang's ``from lmcache.integration.sglang...``
imports resolve to ``lmc_transfer.integrations.sglang.lmcache_compat``. Requests are
SGLang ``Req`` objects over SGLang's pools, matched by ``init_next_round_input``,
loaded by ``init_load_back`` (MP) and released by SGLang's ``release_kv_cache``
(which calls ``cache_finished_req``). SGLang's CUDA-only stream helpers are
replaced by CPU no-ops, the one patch this CPU run needs.

SGLang 0.5.20 picks IP mode only on XPU; the IP tests switch a constructed cache
to IP the way its constructor's IP branch would (``_to_ip_mode``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmc_transfer.integrations.sglang.importer import SGLangUnavailable, load_sglang

try:
    load_sglang(("0.5.20",), "the SGLang 0.5.20 test tier")
except SGLangUnavailable as exc:
    pytest.skip(f"needs SGLang 0.5.20 (ci/run_sglang_tier.sh puts it first on PYTHONPATH): {exc}", allow_module_level=True)

from lmc_transfer.integrations.sglang import lmcache_compat
from lmc_transfer.integrations.sglang.lmcache_shim import install_lmcache_shim

install_lmcache_shim()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.mem_cache.storage.lmcache import lmc_radix_cache as lmc
    from sglang.srt.sampling.sampling_params import SamplingParams

from tests.conftest_mp import Daemon, write_config
from tests.kv_model import LAYERS, expected_kv, pool_kv, prompt
from tests.sglang import sgl_env
from tests.sglang.sgl_env import make_pools, publish_runtime

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(120)]

MODEL = SimpleNamespace(model_path="test-model", num_hidden_layers=LAYERS)


class _CpuStream:
    """Stands in for ``create_device_stream(cpu)``, which SGLang builds only for GPU devices."""

    device = torch.device("cpu")

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass


@pytest.fixture(scope="module")
def config_dir():
    path = Path(tempfile.mkdtemp(prefix="lmct-"))  # short: ipc socket paths are length-limited
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def config_path(config_dir, tmp_path_factory):
    """One config for the module: SGLang reads it from its published --lmcache-config-file."""
    path = write_config(config_dir)
    publish_runtime(tmp_path_factory.mktemp("tiny-model"), lmcache_config_file=str(path))
    return path


@pytest.fixture(autouse=True)
def cpu_streams(monkeypatch):
    monkeypatch.setattr(lmc, "create_device_stream", lambda device: _CpuStream())
    monkeypatch.setattr(lmc, "device_stream_context", lambda stream: contextlib.nullcontext())


@pytest.fixture
def daemon(config_path):
    d = Daemon(config_path)
    try:
        yield d
    finally:
        if d.alive():
            d.stop()
        d.cleanup_leftovers()


class Engine(sgl_env.Engine):
    """SGLang 0.5.20's pools and its LMCRadixCache, driven like its scheduler drives them."""

    def __init__(self, seed: int, config_path: Path, ip: bool = False) -> None:
        self.pools = make_pools(seed)
        params = CacheInitParams(
            disable=False, req_to_token_pool=self.pools.req_pool,
            token_to_kv_pool_allocator=self.pools.allocator, page_size=1,
        )
        self.cache = lmc.LMCRadixCache(params, model_config=MODEL, tp_size=1, rank=0)
        assert isinstance(self.cache.lmcache_connector, lmcache_compat.LMCacheMPConnector)
        if ip:
            self._to_ip_mode(config_path)

    def _to_ip_mode(self, config_path: Path) -> None:
        """What LMCRadixCache.__init__ does for IP (it takes that branch only on XPU)."""
        cache, kvcache = self.cache, self.pools.pool
        cache.lmcache_connector.close()
        cache._mode = lmc.LMCacheMode.IP
        cache.lmcache_connector = lmc.LMCacheLayerwiseConnector(
            sgl_config=MODEL, tp_size=1, rank=0, config_file=str(config_path),
            k_pool=kvcache.k_buffer, v_pool=kvcache.v_buffer, tp_group=None,
        )
        cache.layer_done_executor = lmc.LayerTransferCounter(
            num_layers=LAYERS, load_stream=cache.load_stream, lmc_connector=cache.lmcache_connector
        )
        kvcache.register_layer_transfer_counter(cache.layer_done_executor)

    def run(self, rid: str, prompt_ids: list[int], output_ids: list[int], **namespace: str) -> tuple[int, int, int]:
        """One request (``namespace``: SGLang's ``extra_key`` and/or ``cache_salt``); returns
        (device prefix at match, host_hit_length, prefix it started from)."""
        req = Req(rid, "", array("q", prompt_ids), SamplingParams(max_new_tokens=len(output_ids)), **namespace)
        req.init_next_round_input(self.cache)
        device_len, host_hit = len(req.prefix_indices), req.host_hit_length
        if req.host_hit_length > 0:
            new_indices, req.last_node = self.cache.init_load_back(
                InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
            )
            # As SGLang 0.5.20's PrefillAdder does after a load-back.
            req.prefix_indices = torch.cat([req.prefix_indices, new_indices])
            req.kv.cache_protected_len = len(req.prefix_indices)
        self.cache.inc_lock_ref(req.last_node)
        prefix = req.prefix_indices
        tokens = list(prompt_ids) + list(output_ids)
        assert torch.equal(pool_kv(self.pools.buffers, prefix), expected_kv(tokens[: prefix.numel()]))

        self.pools.compute_rest(self.cache, req, prefix, tokens, list(output_ids))
        release_kv_cache(req, self.cache, is_insert=True)
        return device_len, host_hit, int(prefix.numel())

    def close(self) -> None:
        self.cache.lmcache_connector.close()


@pytest.fixture
def engines():
    made: list[Engine] = []
    try:
        yield made
    finally:
        for e in made:
            e.close()


def test_shim_serves_compat_classes_under_lmcache_names():
    import lmcache.integration.sglang.multi_process_adapter as mp_adapter
    import lmcache.integration.sglang.sglang_adapter as adapter
    import lmcache.integration.sglang.utils as utils

    assert mp_adapter.LMCacheMPConnector is lmcache_compat.LMCacheMPConnector
    assert adapter.LMCacheLayerwiseConnector is lmcache_compat.LMCacheLayerwiseConnector
    assert (adapter.LoadMetadata, adapter.StoreMetadata) == (lmcache_compat.LoadMetadata, lmcache_compat.StoreMetadata)
    assert utils.lmcache_get_config is lmcache_compat.lmcache_get_config
    assert lmc.LMCacheMPConnector is lmcache_compat.LMCacheMPConnector  # what SGLang's module bound


def test_mp_mode_multi_turn_byte_exact_after_eviction(config_path, daemon, engines):
    e1 = Engine(1, config_path)
    engines.append(e1)
    assert e1.cache._mode is lmc.LMCacheMode.MP
    a, out1 = prompt(1, 45), prompt(11, 6)
    assert e1.run("t1", a, out1) == (0, 0, 0)  # 50 KV tokens -> 3 chunks stored
    e1.evict_all()
    assert e1.slots_accounted()
    b, out2 = a + out1 + prompt(2, 20), prompt(12, 4)
    assert e1.run("t2", b, out2) == (0, 48, 48)
    assert e1.slots_accounted()

    # Another engine holding a partial chunk: the load skips its 20 device tokens (-1 slots).
    e2 = Engine(2, config_path)
    engines.append(e2)
    e2.run("u1", a[:20], prompt(13, 3))
    c = b + out2 + prompt(3, 10)
    assert e2.run("u2", c, prompt(14, 2)) == (20, 44, 64)
    assert e2.slots_accounted()

    e1.evict_all()
    assert e1.run("t3", c, prompt(15, 2)) == (0, 80, 80)
    assert e1.slots_accounted()


def test_mp_daemon_stopped_between_match_and_load_back(config_path, daemon, engines):
    e = Engine(3, config_path)
    engines.append(e)
    a = prompt(4, 70)
    e.run("s1", a, prompt(16, 3))  # 72 KV tokens -> 4 chunks stored
    e.evict_all()
    e.run("s1b", a[:20], prompt(19, 3))
    req = Req("s2", "", array("q", a + prompt(5, 5)), SamplingParams(max_new_tokens=2))
    req.init_next_round_input(e.cache)
    assert (len(req.prefix_indices), req.host_hit_length) == (20, 44)
    assert daemon.stop() == 0
    new_indices, last = e.cache.init_load_back(
        InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
    )
    # The engine still maps the stopped daemon's segment: the promised chunks load intact.
    assert new_indices.numel() == 44
    prefix = torch.cat([req.prefix_indices, new_indices])
    assert torch.equal(pool_kv(e.pools.buffers, prefix), expected_kv(list(req.origin_input_ids)[:64]))
    e.cache.lmcache_connector.end_session("s2")  # the request is not admitted further
    assert e.slots_accounted()

    e.evict_all()
    assert e.run("s3", a, prompt(18, 2)) == (0, 0, 0)  # daemon gone: a miss, no error
    assert e.slots_accounted()


def test_ip_mode_multi_turn_byte_exact_after_eviction(config_path, engines):
    e = Engine(5, config_path, ip=True)
    engines.append(e)
    assert isinstance(e.cache.lmcache_connector, lmcache_compat.LMCacheLayerwiseConnector)
    a, out1 = prompt(6, 45), prompt(21, 6)
    assert e.run("i1", a, out1) == (0, 0, 0)
    e.evict_all()
    assert e.slots_accounted()
    # IP loads inside match_prefix: the device prefix already covers the 3 stored chunks.
    b, out2 = a + out1 + prompt(7, 20), prompt(22, 4)
    assert e.run("i2", b, out2) == (48, 0, 48)
    # Partial device prefix (20 tokens): the load skips them (-1 slots).
    e.evict_all()
    e.run("i3", a[:20], prompt(23, 3))
    c = b + out2 + prompt(8, 10)
    assert e.run("i4", c, prompt(24, 2)) == (64, 0, 64)
    assert e.slots_accounted()


@pytest.mark.parametrize("ip", [False, True], ids=["mp", "ip"])
def test_lora_and_salted_requests_never_share_host_kv(config_path, daemon, engines, ip):
    """The connectors see token ids only: namespaced requests must neither store nor load."""
    assert lmcache_compat.guard_namespaced_requests() and lmc.LMCRadixCache._lmc_transfer_guarded
    e = Engine(7, config_path, ip=ip)
    engines.append(e)
    a, out = prompt(25, 45), prompt(26, 6)
    assert e.run("p1", a, out) == (0, 0, 0)  # plain: 3 chunks stored
    e.evict_all()
    for rid, namespace in [("l1", {"extra_key": "adapter-a"}), ("c1", {"cache_salt": "tenant-1"})]:
        assert e.run(rid, a, prompt(27, 2), **namespace) == (0, 0, 0), namespace  # no plain KV
        e.evict_all()
    b = a + out + prompt(28, 20)
    assert e.run("l2", b, prompt(29, 2), extra_key="adapter-a") == (0, 0, 0)  # stored nothing for the adapter
    e.evict_all()
    hit = (48, 0, 48) if ip else (0, 48, 48)
    assert e.run("p2", b, prompt(30, 2)) == hit  # plain requests still hit their own chunks
    assert e.slots_accounted()


def test_pth_line_installs_shim_in_a_fresh_interpreter():
    """What ``python -m lmc_transfer.integrations.sglang.lmcache_shim install`` puts in site-packages,
    run by a new process (SGLang's scheduler is one)."""
    import subprocess
    import sys

    from lmc_transfer.integrations.sglang import lmcache_shim

    code = lmcache_shim._PTH_LINE + (
        "import lmcache.integration.sglang.utils as u\n"
        "print(u.lmcache_get_config.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "lmc_transfer.integrations.sglang.lmcache_compat"


def test_registry_plugin_refuses_this_release_naming_it():
    import importlib

    with pytest.raises(SGLangUnavailable, match=r"supports SGLang 0\.5\.23; the installed SGLang is 0\.5\.20 "):
        importlib.import_module("lmc_transfer.integrations.sglang.plugin")
