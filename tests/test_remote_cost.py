"""The remote cost rule on its own (no network): moving averages, recompute estimates, plans,
and the config keys that feed them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmc_transfer.config import ConfigError, LMCTransferConfig, load_config
from lmc_transfer.kernels.geometry import KVGeometry, LayoutKind
from lmc_transfer.tiers.remote_cost import (
    FetchPlan,
    FetchPolicy,
    RecomputeModel,
    Throughput,
    ThroughputMeter,
    estimate_params,
)
from tests.test_pool import FakeClock

MIB = 1 << 20
LLAMA3_8B = KVGeometry(LayoutKind.TOKEN_SLOT, 32, ((8, 128), (8, 128)), "bfloat16")
DEEPSEEK_V3 = KVGeometry(LayoutKind.MLA, 61, ((1, 576),), "bfloat16")


def test_meter_first_samples_are_taken_as_they_are_then_averaged() -> None:
    meter = ThroughputMeter(alpha=0.5)
    assert meter.estimate() is None
    meter.observe_round_trip(0.002)
    assert meter.estimate() is None, "no bandwidth before a fetch"
    meter.observe_transfer(8 * MIB, 0.010)  # 8 ms of transfer after 2 ms of latency
    first = meter.estimate()
    assert first.latency_s == 0.002
    assert first.bytes_per_s == pytest.approx(8 * MIB / 0.008, rel=1e-12)
    meter.observe_round_trip(0.004)
    meter.observe_transfer(8 * MIB, 0.020)  # latency now 3 ms: 17 ms of transfer
    estimate = meter.estimate()
    assert estimate.latency_s == pytest.approx(0.003, rel=1e-12)
    assert estimate.bytes_per_s == pytest.approx(0.5 * 8 * MIB / 0.008 + 0.5 * 8 * MIB / 0.017, rel=1e-12)


def test_meter_ignores_empty_fetches_and_never_credits_more_than_twice_the_observed_rate() -> None:
    meter = ThroughputMeter()
    meter.observe_round_trip(0.050)
    meter.observe_transfer(0, 0.1)
    meter.observe_transfer(100, 0.0)
    assert meter.estimate() is None
    meter.observe_transfer(MIB, 0.040)  # shorter than the latency: half its duration counts as transfer
    assert meter.estimate().bytes_per_s == pytest.approx(MIB / 0.020, rel=1e-12)


def test_meter_rejects_a_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha: expected a number in \\(0, 1\\], got 0"):
        ThroughputMeter(alpha=0)


def test_params_estimated_from_geometry() -> None:
    assert estimate_params(LLAMA3_8B) == 12 * 32 * 4096**2
    assert estimate_params(DEEPSEEK_V3) == 12 * 61 * 2304**2


def test_recompute_model_from_flops() -> None:
    model = RecomputeModel.from_flops(8e9, 500e12)
    assert model.seconds_per_token == 2 * 8e9 / 500e12
    # the measurement: 2048 Llama-3-8B tokens in 63 ms on an H200 is ~520 TFLOP/s
    assert 2048 * RecomputeModel.from_flops(8.03e9, 520e12).seconds_per_token == pytest.approx(0.063, rel=0.01)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="seconds_per_token: expected a finite number > 0"):
            RecomputeModel(bad)


def _policy(clock: FakeClock, *, chunk_recompute_s: float = 0.010, value_bytes: int = MIB, probe_chunks: int = 4) -> FetchPolicy:
    return FetchPolicy(
        RecomputeModel(chunk_recompute_s / 256), 256, value_bytes, probe_chunks=probe_chunks, probe_interval_s=10.0, clock=clock
    )


def test_first_fill_probes_one_chunk_per_connection() -> None:
    policy = _policy(FakeClock())
    assert policy.worth_asking(None)
    assert policy.plan(10, None, time_left_s=1.0) == FetchPlan(4, probe=True)
    assert policy.plan(3, None, time_left_s=1.0) == FetchPlan(3, probe=True)
    assert policy.plan(0, None, time_left_s=1.0) == FetchPlan(0)
    assert policy.plan(5, None, time_left_s=0.0) == FetchPlan(0)


def test_fetch_that_beats_recompute_is_planned_whole() -> None:
    policy = _policy(FakeClock())
    fast = Throughput(bytes_per_s=1000 * MIB, latency_s=0.001)  # 1 ms per chunk against 10 ms
    assert policy.worth_asking(fast)
    assert policy.plan(10, fast, time_left_s=1.0) == FetchPlan(10)


def test_fetch_slower_than_recompute_is_skipped_then_probed_again_after_the_interval() -> None:
    clock = FakeClock()
    policy = _policy(clock)
    policy.plan(4, None, time_left_s=1.0)  # the probe
    slow = Throughput(bytes_per_s=50 * MIB, latency_s=0.001)  # 20 ms per chunk against 10 ms
    assert not policy.worth_asking(slow)
    assert policy.plan(10, slow, time_left_s=1.0) == FetchPlan(0)
    clock.now += 9
    assert not policy.worth_asking(slow)
    clock.now += 1
    assert policy.worth_asking(slow)
    assert policy.plan(10, slow, time_left_s=1.0) == FetchPlan(4, probe=True)
    assert policy.plan(10, slow, time_left_s=1.0) == FetchPlan(0), "the probe restarts the interval"


def test_latency_decides_for_short_prefixes_only() -> None:
    policy = _policy(FakeClock())
    # 5 ms per chunk against 10 ms, and 22 ms of latency: 22 + 4 * 5 > 40, 22 + 5 * 5 < 50.
    laggy = Throughput(bytes_per_s=200 * MIB, latency_s=0.022)
    assert policy.worth_asking(laggy)
    policy.plan(1, None, time_left_s=1.0)  # the first probe is behind us
    assert policy.plan(4, laggy, time_left_s=1.0) == FetchPlan(0)
    assert policy.plan(5, laggy, time_left_s=1.0) == FetchPlan(5)


def test_only_what_fits_before_the_deadline_is_planned() -> None:
    policy = _policy(FakeClock())
    policy.plan(1, None, time_left_s=1.0)
    fast = Throughput(bytes_per_s=1000 * MIB, latency_s=0.001)
    assert policy.plan(100, fast, time_left_s=0.0305) == FetchPlan(29)  # (30.5 ms - 1 ms) / 1 ms per chunk
    assert policy.plan(100, fast, time_left_s=0.0015) == FetchPlan(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size: expected an int >= 1, got 0"),
        ({"value_bytes": True}, "value_bytes: expected an int >= 1, got True"),
        ({"probe_chunks": 0}, "probe_chunks: expected an int >= 1, got 0"),
        ({"probe_interval_s": 0}, "probe_interval_s: expected > 0, got 0"),
    ],
)
def test_policy_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"chunk_size": 256, "value_bytes": MIB, "probe_chunks": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        FetchPolicy(RecomputeModel(1e-4), args.pop("chunk_size"), args.pop("value_bytes"), **args)


def test_config_keys_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "remote_url: redis://127.0.0.1:6379/0\nremote_connections: 8\nremote_recompute_tflops: 120.5\nremote_model_params_b: 70\n"
    )
    cfg = load_config(path)
    assert (cfg.remote_connections, cfg.remote_recompute_tflops, cfg.remote_model_params_b) == (8, 120.5, 70.0)
    default = LMCTransferConfig()
    assert (default.remote_connections, default.remote_recompute_tflops, default.remote_model_params_b) == (4, 500.0, None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("remote_connections: 0", "remote_connections: expected an integer >= 1, got 0"),
        ("remote_connections: 65", "remote_connections: expected an integer in [1, 64], got 65"),
        ("remote_recompute_tflops: 0", "remote_recompute_tflops: expected a positive number, got 0"),
        ("remote_recompute_tflops: .inf", "remote_recompute_tflops: expected a finite number <= 100000, got inf"),
        ("remote_recompute_tflops: .nan", "remote_recompute_tflops: expected a finite number <= 100000, got nan"),
        ("remote_recompute_tflops: 100001", "remote_recompute_tflops: expected a finite number <= 100000, got 100001"),
        ("remote_recompute_tflops: true", "remote_recompute_tflops: expected a positive number, got True"),
        ("remote_model_params_b: -8", "remote_model_params_b: expected a positive number, got -8"),
        ("remote_model_params_b: '8'", "remote_model_params_b: expected a positive number, got '8'"),
    ],
)
def test_config_rejects_bad_values_naming_file_key_and_value(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"remote_url: redis://127.0.0.1:6379/0\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_config_cost_keys_need_a_remote_url(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("remote_model_params_b: 8\n")
    with pytest.raises(ConfigError, match="remote_model_params_b: 8.0 needs remote_url to be set, got no remote_url"):
        load_config(path)
