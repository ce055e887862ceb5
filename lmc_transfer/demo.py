"""End-to-end demo: a toy engine serving multi-turn chats through ``LMCRadixCache``.

    lmc-transfer demo [--config FILE] [--turns N] [--device auto|cpu|cuda]
    python -m lmc_transfer.demo ...

MP (the default: the example MP config on a temporary ipc socket) starts a cache
daemon subprocess, which is always stopped at the end; IP keeps the pool in this
process. The toy "model" writes deterministic bytes per (position, token id,
layer, plane) into the KV buffers, so every byte that comes back from the cache
can be checked: a wrong slot or a stale chunk shows up as a mismatch, and any
mismatch makes the exit status 1.

Phases: (1) conversations take turns; the GPU tree is evicted between turns, so
each turn's history comes back from the cache. (2) The engine side restarts
(new KV buffers, allocator, store and cache objects; the MP daemon keeps
running; the IP pool is process memory, so its store object is kept) and every
conversation takes one more turn.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import yaml

from lmc_transfer.config import GB, ConfigError, LMCTransferConfig, Mode
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.radix.allocator import TokenSlotAllocator
from lmc_transfer.radix.lmc_radix_cache import LMCRadixCache
from lmc_transfer.radix.request import Req
from lmc_transfer.store import CacheStore

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "example_config_mp.yaml"
MODEL_ID = "lmc-transfer-demo"

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_SEED_MULTS = tuple(_signed(m) for m in (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on wrapping int64 arithmetic."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


class ToyModel:
    """Writes and checks deterministic KV bytes per (position, token id, layer, plane)."""

    def __init__(self, buffers: KVBuffers) -> None:
        for plane, row in enumerate(buffers.geometry.plane_row_bytes):
            if row % 8:
                raise ValueError(f"buffers: plane {plane} rows must be a multiple of 8 bytes, got {row}")
        self.buffers = buffers

    def rows(self, layer: int, plane: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The ``[n, row_bytes]`` uint8 rows token ``tokens[i]`` at ``positions[i]`` has."""
        words = self.buffers.geometry.plane_row_bytes[plane] // 8
        a, b, c, d = _SEED_MULTS
        seed = positions.to(torch.int64) * a + tokens.to(torch.int64) * b + _signed(layer * c + plane * d)
        lanes = torch.arange(1, words + 1, dtype=torch.int64, device=seed.device) * _GOLDEN
        return _mix(seed.unsqueeze(1) + lanes).view(torch.uint8)

    def forward(self, token_ids: Sequence[int], start: int, slots: torch.Tensor) -> None:
        """"Compute" the KV of tokens ``start .. start + len(slots)`` into ``slots``."""
        positions, tokens = self._inputs(token_ids, start, slots.numel())
        for layer in range(self.buffers.num_layers):
            for plane in range(len(self.buffers.geometry.plane_shapes)):
                self.buffers.plane_rows(layer, plane)[slots] = self.rows(layer, plane, positions, tokens)

    def mismatched_tokens(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """How many of tokens ``0 .. len(slots)`` do not hold exactly their KV at ``slots``."""
        positions, tokens = self._inputs(token_ids, 0, slots.numel())
        bad = torch.zeros(slots.numel(), dtype=torch.bool, device=slots.device)
        for layer in range(self.buffers.num_layers):
            for plane in range(len(self.buffers.geometry.plane_shapes)):
                have = self.buffers.plane_rows(layer, plane)[slots]
                bad |= (have != self.rows(layer, plane, positions, tokens)).any(dim=1)
        return int(bad.sum())

    def _inputs(self, token_ids: Sequence[int], start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.buffers.device
        positions = torch.arange(start, start + n, dtype=torch.int64, device=device)
        tokens = torch.tensor(list(token_ids[start : start + n]), dtype=torch.int64, device=device)
        return positions, tokens


@dataclass(frozen=True)
class ToyShape:
    """A token_slot KV pool: per layer K and V ``[num_slots, heads, head_dim]``."""

    name: str
    layers: int
    heads: int
    head_dim: int
    num_slots: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def token_bytes(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def buffers(self, device: torch.device, seed: int) -> KVBuffers:
        """Fresh buffers full of random bytes (a new engine's uninitialised memory)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        row = self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

        def plane() -> torch.Tensor:
            raw = torch.randint(0, 256, (self.num_slots, row), dtype=torch.uint8, generator=g)
            return raw.to(device).view(self.dtype).reshape(self.num_slots, self.heads, self.head_dim)

        return KVBuffers.token_slot([plane() for _ in range(self.layers)], [plane() for _ in range(self.layers)])


CPU_SHAPE = ToyShape("toy Llama-like (4 layers, 2 KV heads x 64, bf16)", 4, 2, 64, num_slots=4096)
GPU_SHAPE = ToyShape("Llama-3-8B (32 layers, 8 KV heads x 128, bf16)", 32, 8, 128, num_slots=16384)


@dataclass
class PhaseStats:
    requests: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # served from the device tree or the host cache
    loaded_tokens: int = 0  # came back from the host cache
    load_seconds: float = 0.0
    mismatched_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class ToyEngine:
    """Serves requests the way SGLang's scheduler drives a radix cache."""

    def __init__(self, cache: LMCRadixCache, model: ToyModel) -> None:
        self.cache = cache
        self.model = model
        self.allocator = cache.token_to_kv_pool_allocator
        self._sync = torch.cuda.synchronize if model.buffers.device.type == "cuda" else (lambda: None)

    def serve(self, rid: str, prompt: list[int], output: list[int], stats: PhaseStats) -> None:
        cache = self.cache
        req = Req(rid, list(prompt))
        loads = cache.load_back_stats
        tokens_before, seconds_before = loads.loaded_tokens, loads.seconds
        # The last prompt token is always computed: it yields the first output's logits.
        res = cache.match_prefix(prompt[:-1], req=req)
        prefix, node = res.device_indices, res.last_device_node
        if res.host_hit_length > 0:
            loaded, node = cache.init_load_back(node, res.host_hit_length, req)
            prefix = torch.cat([prefix, loaded])
        # Asynchronous (CUDA) loads are only issued above; their landing counts too.
        start = time.perf_counter()
        cache.finish_loads()
        self._sync()
        load_seconds = loads.seconds - seconds_before + time.perf_counter() - start
        cache.inc_lock_ref(node)
        req.last_node, req.prefix_indices, req.cache_protected_len = node, prefix, prefix.numel()

        stats.requests += 1
        stats.prompt_tokens += len(prompt)
        stats.reused_tokens += prefix.numel()
        newly_loaded = loads.loaded_tokens - tokens_before
        stats.loaded_tokens += newly_loaded
        if newly_loaded:
            stats.load_seconds += load_seconds
        stats.mismatched_tokens += self.model.mismatched_tokens(prompt, prefix)

        # KV exists for every token but the last output (it has not been fed back yet).
        tokens = list(prompt) + list(output)
        need = len(tokens) - 1 - prefix.numel()
        slots = self._alloc(need)
        self.model.forward(tokens, prefix.numel(), slots)
        req.output_ids = list(output)
        req.req_to_token = torch.cat([prefix, slots])
        cache.cache_finished_req(req)

    def _alloc(self, need: int) -> torch.Tensor:
        short = need - self.allocator.available_size()
        if short > 0:
            self.cache.evict(short)
        slots = self.allocator.alloc(need)
        if slots is None:
            raise RuntimeError(f"KV pool too small: {need} slots needed, {self.allocator.available_size()} free")
        return slots

    def flush_device_tree(self) -> None:
        """Evict everything unlocked (what memory pressure between turns would do)."""
        self.cache.evict(self.allocator.size)


@dataclass
class Conversation:
    """A chat: a shared system prompt, then alternating user and assistant turns."""

    cid: int
    history: list[int] = field(default_factory=list)


class Workload:
    def __init__(self, conversations: int, system_tokens: int, user_tokens: int, output_tokens: int, seed: int = 0):
        self._g = torch.Generator().manual_seed(seed)
        system = self._tokens(system_tokens)
        self.conversations = [Conversation(c, list(system)) for c in range(conversations)]
        self.user_tokens, self.output_tokens = user_tokens, output_tokens

    def _tokens(self, n: int) -> list[int]:
        return torch.randint(1, 32000, (n,), generator=self._g).tolist()

    def turns(self) -> Iterator[tuple[Conversation, list[int], list[int]]]:
        """One turn of every conversation: (conversation, prompt, output); history grows."""
        for conv in self.conversations:
            prompt = conv.history + self._tokens(self.user_tokens)
            output = self._tokens(self.output_tokens)
            conv.history = prompt + output
            yield conv, prompt, output


# ---------------------------------------------------------------------------
# configuration and the daemon


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
    """``python -m lmc_transfer.server`` as a child process; ``stop`` always reaps it."""

    def __init__(self, config_path: Path, config: LMCTransferConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmc_transfer.server", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        from lmc_transfer.mp_store import DaemonConnection, DaemonUnavailable
        from lmc_transfer.protocol import MsgType

        start = time.monotonic()
        conn = DaemonConnection(self.config.mp_url, self.config.mp_auth_token)
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


def pick_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA GPU")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_shape(device: torch.device) -> ToyShape:
    if device.type != "cuda":
        return CPU_SHAPE
    free, _ = torch.cuda.mem_get_info(device)
    return GPU_SHAPE if GPU_SHAPE.num_slots * GPU_SHAPE.token_bytes * 2 < free else CPU_SHAPE


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


def run_demo(settings: DemoSettings) -> int:
    if settings.turns < 1:
        raise ValueError(f"turns must be >= 1, got {settings.turns}")
    device = pick_device(settings.device)
    shape = pick_shape(device)
    workdir = Path(tempfile.mkdtemp(prefix="lmct-demo-"))
    daemon: DaemonProcess | None = None
    try:
        workload = Workload(settings.conversations, settings.system_tokens, settings.user_tokens, settings.output_tokens)
        max_context = settings.system_tokens + (settings.turns + 1) * (settings.user_tokens + settings.output_tokens)
        if max_context >= shape.num_slots:
            raise ValueError(f"turns: {settings.turns} turns need {max_context} KV slots, the pool has {shape.num_slots}")
        chunk_guess = 256
        pool_bytes = 2 * settings.conversations * (max_context // chunk_guess + 2) * chunk_guess * shape.token_bytes
        config_path, config, notes = demo_config(settings.config, workdir, pool_bytes)
        _say(f"lmc-transfer demo: mode {config.mode.value}, device {device}, KV {shape.name}, "
             f"{shape.num_slots} slots, chunk {config.chunk_size} tokens ({_fmt_bytes(shape.token_bytes * config.chunk_size)} per chunk)")
        for note in notes:
            _say(f"  config: {note}")
        if config.mode is Mode.MP:
            _say(f"[daemon] starting lmc_transfer.server on {config.mp_url} ...")
            daemon = DaemonProcess(config_path, config, workdir / "daemon.log")
            _say(f"[daemon] ready after {daemon.wait_ready():.1f} s (pid {daemon.proc.pid})")

        def engine(seed: int, store: CacheStore | None) -> ToyEngine:
            buffers = shape.buffers(device, seed)
            allocator = TokenSlotAllocator(shape.num_slots, device=device, kvcache=buffers)
            cache = LMCRadixCache(allocator, config=config_path, model_id=MODEL_ID, store=store)
            return ToyEngine(cache, ToyModel(buffers))

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


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(config=args.config, turns=args.turns, conversations=args.conversations, device=args.device)


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


if __name__ == "__main__":
    raise SystemExit(main())
