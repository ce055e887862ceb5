"""End-to-end demo: an engine serving multi-turn chats through ``LMCRadixCache``.

    lmc-transfer demo [--config FILE] [--turns N] [--device auto|cpu|cuda] [--engine auto|toy|hf]
    python -m lmc_transfer.demo ...

MP (the default: the example MP config on a temporary ipc socket) starts a cache
daemon subprocess, which is always stopped at the end; IP keeps the pool in this
process. The toy "model" writes deterministic bytes per (position, token id,
layer, plane) into the KV buffers, so every byte that comes back from the cache
can be checked: a wrong slot or a stale chunk shows up as a mismatch, and any
mismatch makes the exit status 1.

The real-model engine (``--engine hf``; the default on a GPU when transformers is installed)
serves the same chats with transformers' Llama (random weights; the Llama-3-8B shape where the
GPU has room, a tiny one elsewhere) and reports time to first token as served next to a full
recompute of the same prompts. Its byte check: every full chunk of reused KV must equal, byte
for byte, what this process computed for that token prefix.

Phases: (1) conversations take turns; the GPU tree is evicted between turns, so
each turn's history comes back from the cache. (2) The engine side restarts
(new KV buffers, allocator, store and cache objects; the MP daemon keeps
running; the IP pool is process memory, so its store object is kept) and every
conversation takes one more turn.
"""

from __future__ import annotations

import argparse
import enum
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
import yaml

from lmc_transfer.config import GB, ConfigError, LMCTransferConfig, Mode
from lmc_transfer.demo import hf_engine
from lmc_transfer.demo.toy_engine import CPU_SHAPE, GPU_SHAPE, PhaseStats, ToyEngine, ToyModel, ToyShape, Workload
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.store.base import CacheStore

DEFAULT_CONFIG = files("lmc_transfer.configs") / "example_config_mp.yaml"
MODEL_ID = "lmc-transfer-demo"


def demo_config(path: str | None, workdir: Path, pool_bytes: int) -> tuple[Path, LMCTransferConfig, list[str]]:
    """The user's config (default: the example MP config) with the demo's overrides,
    written to ``workdir``; returns its path, the config and what was overridden."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    LMCTransferConfig.from_dict(data, source=str(source))  # validate before overriding
    notes = []
    if data.get("max_local_cpu_size", 5.0) * GB > pool_bytes:
        data["max_local_cpu_size"] = pool_bytes / GB
        notes.append(f"max_local_cpu_size -> {pool_bytes / 2**20:.0f} MiB (enough for this workload)")
    if str(data.get("mode", "ip")).lower() == Mode.MP.value:
        data["mp_socket"] = str(workdir / "daemon.sock")
        notes.append(f"mp_socket -> {data['mp_socket']} (a private daemon)")
        if data.get("local_disk"):
            data["local_disk"] = str(workdir / "disk")
            notes.append(f"local_disk -> {data['local_disk']} (removed afterwards)")
    out = workdir / "config.yaml"
    out.write_text(yaml.safe_dump(data))
    return out, LMCTransferConfig.from_dict(data, source=str(out)), notes


class DaemonProcess:
    """``python -m lmc_transfer.daemon`` as a child process; ``stop`` always reaps it."""

    def __init__(self, config_path: Path, config: LMCTransferConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmc_transfer.daemon", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        from lmc_transfer.store.mp_client import DaemonConnection, DaemonUnavailable
        from lmc_transfer.daemon.protocol import MsgType

        start = time.monotonic()
        conn = DaemonConnection.for_config(self.config)
        try:
            while time.monotonic() - start < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_path.read_text(errors='replace')}")
                try:
                    conn.request(MsgType.PING, deadline=time.monotonic() + 0.5)
                    return time.monotonic() - start
                except DaemonUnavailable:
                    time.sleep(0.05)
        finally:
            conn.close()
        raise RuntimeError(f"daemon did not answer within {timeout_s:.0f} s: {self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._log.close()


# ---------------------------------------------------------------------------
# the demo


@dataclass(frozen=True)
class DemoSettings:
    config: str | None = None
    turns: int = 3
    conversations: int = 4
    system_tokens: int = 600
    user_tokens: int = 200
    output_tokens: int = 60
    device: str = "auto"
    engine: str = "auto"


class EngineKind(enum.Enum):
    TOY = "toy"  # checkable byte patterns, no model
    HF = "hf"  # transformers' Llama (lmc_transfer.demo.hf_engine)


def pick_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA GPU")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_engine(choice: str, device: torch.device) -> EngineKind:
    if choice not in ("auto", "toy", "hf"):
        raise ValueError(f"engine must be auto, toy or hf, got {choice!r}")
    if choice == "auto":
        return EngineKind.HF if device.type == "cuda" and hf_engine.transformers_installed() else EngineKind.TOY
    if choice == "hf" and not hf_engine.transformers_installed():
        raise ValueError(f"engine: hf needs Hugging Face transformers: pip install 'lmc-transfer[{hf_engine.EXTRA}]'")
    return EngineKind(choice)


def pick_shape(device: torch.device) -> ToyShape:
    if device.type != "cuda":
        return CPU_SHAPE
    free, _ = torch.cuda.mem_get_info(device)
    return GPU_SHAPE if GPU_SHAPE.num_slots * GPU_SHAPE.token_bytes * 2 < free else CPU_SHAPE


#: GPU memory a model needs beyond its weights and KV pool (activations of a prefill, the
#: DynamicCache rebuilt from slots, the allocator's slack).
_MODEL_HEADROOM_BYTES = 8 * GB


def pick_model(device: torch.device, dtype: torch.dtype) -> tuple[hf_engine.LlamaShape, ToyShape]:
    """The real model and its KV pool: the Llama-3-8B shape where the GPU has room, else the tiny one."""
    tiny = (hf_engine.TINY_LLAMA, hf_engine.TINY_LLAMA.kv_pool(CPU_SHAPE.num_slots, dtype))
    if device.type != "cuda":
        return tiny
    big = hf_engine.LLAMA_3_8B
    pool = big.kv_pool(GPU_SHAPE.num_slots, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    need = big.parameters() * dtype.itemsize + pool.num_slots * pool.token_bytes + _MODEL_HEADROOM_BYTES
    return (big, pool) if need < free else tiny


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _report(name: str, stats: PhaseStats, token_bytes: int) -> None:
    loaded = stats.loaded_tokens * token_bytes
    bw = loaded / stats.load_seconds / 1e9 if stats.load_seconds else 0.0
    _say(
        f"  {name}: {stats.requests} requests, hit rate {stats.hit_rate:.3f} "
        f"({stats.reused_tokens}/{stats.prompt_tokens} prompt tokens reused), "
        f"loaded {stats.loaded_tokens} tokens = {_fmt_bytes(loaded)} in {stats.load_seconds * 1e3:.1f} ms "
        f"({bw:.2f} GB/s), mismatched tokens {stats.mismatched_tokens}"
    )
    if stats.recompute_ttft_seconds:
        _say(f"    {_ttft(stats)}")


def _ttft(stats: PhaseStats) -> str:
    served, recompute = (s / stats.requests * 1e3 for s in (stats.ttft_seconds, stats.recompute_ttft_seconds))
    return (f"TTFT (prefill to first token, mean): {served:.1f} ms as served vs {recompute:.1f} ms "
            f"recomputed ({recompute / served:.1f}x)")


def run_demo(settings: DemoSettings) -> int:
    if settings.turns < 1:
        raise ValueError(f"turns must be >= 1, got {settings.turns}")
    device = pick_device(settings.device)
    kind = pick_engine(settings.engine, device)
    model = None
    if kind is EngineKind.HF:
        model_shape, shape = pick_model(device, torch.bfloat16)
        model = hf_engine.build_model(model_shape, dtype=torch.bfloat16, device=device, seed=0)
        hf_engine.warm_up(model)
        engine_name = f"model {model_shape.name} (transformers, random weights), KV bf16"
        vocab = model_shape.vocab
    else:
        shape = pick_shape(device)
        engine_name = f"toy engine, KV {shape.name}"
        vocab = 32000
    workdir = Path(tempfile.mkdtemp(prefix="lmct-demo-"))
    daemon: DaemonProcess | None = None
    try:
        workload = Workload(settings.conversations, settings.system_tokens, settings.user_tokens, settings.output_tokens,
                            vocab_size=vocab)
        max_context = settings.system_tokens + (settings.turns + 1) * (settings.user_tokens + settings.output_tokens)
        if max_context >= shape.num_slots:
            raise ValueError(f"turns: {settings.turns} turns need {max_context} KV slots, the pool has {shape.num_slots}")
        chunk_guess = 256
        pool_bytes = 2 * settings.conversations * (max_context // chunk_guess + 2) * chunk_guess * shape.token_bytes
        config_path, config, notes = demo_config(settings.config, workdir, pool_bytes)
        _say(f"lmc-transfer demo: mode {config.mode.value}, device {device}, {engine_name}, "
             f"{shape.num_slots} slots, chunk {config.chunk_size} tokens ({_fmt_bytes(shape.token_bytes * config.chunk_size)} per chunk)")
        for note in notes:
            _say(f"  config: {note}")
        if config.mode is Mode.MP:
            _say(f"[daemon] starting lmc_transfer.daemon.server on {config.mp_url} ...")
            daemon = DaemonProcess(config_path, config, workdir / "daemon.log")
            _say(f"[daemon] ready after {daemon.wait_ready():.1f} s (pid {daemon.proc.pid})")

        digests = hf_engine.KVDigests(config.chunk_size)  # what this process computed, across both engines

        def engine(seed: int, store: CacheStore | None) -> ToyEngine | hf_engine.HFChatEngine:
            buffers = shape.buffers(device, seed)
            allocator = TokenSlotAllocator(shape.num_slots, device=device, kvcache=buffers)
            cache = LMCRadixCache(allocator, config=config_path, model_id=MODEL_ID, store=store)
            if model is None:
                return ToyEngine(cache, ToyModel(buffers))
            return hf_engine.HFChatEngine(hf_engine.HFEngine(model, cache), digests)

        eng = engine(seed=1, store=None)
        mismatches = 0
        verified_bytes = 0
        first = PhaseStats()
        for turn in range(settings.turns):
            t0 = time.perf_counter()
            turn_stats = PhaseStats()
            for conv, prompt, output in workload.turns():
                eng.serve(f"t{turn}-c{conv.cid}", prompt, output, turn_stats)
            eng.flush_device_tree()
            _say(f"[engine 1] turn {turn + 1}/{settings.turns} done in {time.perf_counter() - t0:.2f} s; GPU tree evicted")
            _report(f"turn {turn + 1}", turn_stats, shape.token_bytes)
            for name in vars(first):
                setattr(first, name, getattr(first, name) + getattr(turn_stats, name))
        keep_store = eng.cache.store if config.mode is Mode.IP else None
        stored = eng.cache.store.stats()
        eng.cache.release_host_resources() if keep_store is None else eng.cache.reset()
        _say(f"[engine 1] stopped: {stored.stored_chunks} chunks stored ({_fmt_bytes(stored.stored_bytes)}), "
             f"{stored.dedup_chunks} deduplicated")

        _say("[engine 2] restarted: new KV buffers, allocator, cache" + (" and store; the daemon kept running" if keep_store is None else "; the IP pool is process memory and is kept"))
        eng = engine(seed=2, store=keep_store)
        second = PhaseStats()
        t0 = time.perf_counter()
        for conv, prompt, output in workload.turns():
            eng.serve(f"r-c{conv.cid}", prompt, output, second)
        _say(f"[engine 2] one more turn per conversation in {time.perf_counter() - t0:.2f} s")
        _report("after restart", second, shape.token_bytes)
        eng.cache.release_host_resources()
        if keep_store is not None:
            keep_store.close()

        mismatches = first.mismatched_tokens + second.mismatched_tokens
        verified_bytes = (first.loaded_tokens + second.loaded_tokens) * shape.token_bytes
        _say("summary:")
        _report("engine 1", first, shape.token_bytes)
        _report("engine 2", second, shape.token_bytes)
        _say(f"  verified bytes: {verified_bytes} loaded from the cache, {mismatches} mismatched tokens")
        if second.recompute_ttft_seconds:
            _say(f"  after restart, {_ttft(second)}")
        _say(f"  hit rate after restart: {second.hit_rate:.3f}")
        if mismatches:
            _say("FAILED: some loaded KV differs from what was computed")
            return 1
        _say("OK: every loaded byte matches the KV originally computed")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
            _say("[daemon] stopped")
        shutil.rmtree(workdir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--turns", type=int, default=DemoSettings.turns, help="turns per conversation before the restart")
    parser.add_argument("--conversations", type=int, default=DemoSettings.conversations)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--engine", default="auto", choices=["auto", "toy", "hf"],
                        help="hf: transformers' Llama (default on a GPU when transformers is installed); toy: byte patterns")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(config=args.config, turns=args.turns, conversations=args.conversations, device=args.device,
                        engine=args.engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc_transfer.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: configs/example_config_mp.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_demo(settings_from_args(args))
    except ValueError as exc:  # ConfigError included
        print(f"lmc-transfer demo: {exc}", file=sys.stderr)
        return 2

