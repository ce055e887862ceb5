"""The end-to-end demo: as a subprocess in both modes, and its verifier catching corrupt KV."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from lmc_transfer.demo import hf_engine, run as demo
from lmc_transfer.transfer.layerwise import LayerTransferCounter
from tests.conftest_mp import REPO

pytestmark = pytest.mark.timeout(120)

IP_CONFIG = str(REPO / "configs" / "example_config_ip.yaml")


def run(*args: str) -> subprocess.CompletedProcess:
    # The CPU copies then use the torch reference instead of the Triton interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=100
    )


def summary(stdout: str) -> tuple[int, int, float]:
    verified = re.search(r"verified bytes: (\d+) loaded from the cache, (\d+) mismatched tokens", stdout)
    hit = re.search(r"hit rate after restart: ([0-9.]+)", stdout)
    assert verified and hit, stdout
    return int(verified.group(1)), int(verified.group(2)), float(hit.group(1))


@pytest.mark.parametrize(
    "argv",
    [
        ("-m", "lmc_transfer.demo", "--turns", "2", "--conversations", "2", "--device", "cpu"),
        ("-m", "lmc_transfer.cli", "demo", "--config", IP_CONFIG, "--turns", "1", "--conversations", "2"),
        ("-m", "lmc_transfer.demo", "--engine", "hf", "--turns", "1", "--conversations", "2", "--device", "cpu"),
    ],
    ids=["mp-default", "ip-cli", "mp-real-model"],
)
def test_demo_runs_end_to_end(argv):
    out = run(*argv)
    assert out.returncode == 0, out.stdout + out.stderr
    verified, mismatched, hit_rate = summary(out.stdout)
    assert verified > 0 and mismatched == 0 and hit_rate > 0
    assert "OK: every loaded byte matches" in out.stdout
    if "--config" not in argv:  # the default config is MP: a daemon came and went
        assert "[daemon] ready" in out.stdout and "[daemon] stopped" in out.stdout
    real_model = "hf" in argv
    assert ("transformers, random weights" in out.stdout) == real_model
    ttft = re.search(r"after restart, TTFT \(prefill to first token, mean\): ([0-9.]+) ms as served vs ([0-9.]+) ms", out.stdout)
    assert (ttft is not None) == real_model, out.stdout
    if ttft:
        assert float(ttft.group(1)) > 0 and float(ttft.group(2)) > 0


@pytest.mark.parametrize("engine", ["toy", "hf"])
def test_demo_fails_on_corrupted_kv(monkeypatch, capsys, engine):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    real_start = LayerTransferCounter.start_load

    def corrupting_start(self, store, lease, slots):
        real_start(self, store, lease, slots)  # synchronous on CPU
        target = slots[slots >= 0][:1]
        self.transfer.buffers.plane_rows(0, 1)[target, 0] ^= 0x01  # one bit of one loaded V row

    monkeypatch.setattr(LayerTransferCounter, "start_load", corrupting_start)
    rc = demo.main(["--config", IP_CONFIG, "--turns", "1", "--conversations", "1", "--device", "cpu", "--engine", engine])
    out = capsys.readouterr().out
    assert rc == 1
    _, mismatched, _ = summary(out)
    assert mismatched > 0 and "FAILED" in out


def test_auto_engine_is_the_toy_on_cpu_and_the_real_model_on_a_gpu_with_transformers(monkeypatch):
    assert demo.pick_engine("auto", torch.device("cpu")) is demo.EngineKind.TOY
    assert demo.pick_engine("auto", torch.device("cuda")) is demo.EngineKind.HF
    assert demo.pick_engine("hf", torch.device("cpu")) is demo.EngineKind.HF
    monkeypatch.setattr(hf_engine, "transformers_installed", lambda: False)
    assert demo.pick_engine("auto", torch.device("cuda")) is demo.EngineKind.TOY
    with pytest.raises(ValueError, match=r"pip install 'lmc-transfer\[hf\]'"):
        demo.pick_engine("hf", torch.device("cpu"))
    with pytest.raises(ValueError, match="engine must be auto, toy or hf, got 'gpt'"):
        demo.pick_engine("gpt", torch.device("cpu"))


def test_demo_rejects_a_missing_config(capsys):
    assert demo.main(["--config", "no-such-config.yaml"]) == 2
    assert "no-such-config.yaml" in capsys.readouterr().err
