"""Shared helpers for the MP tests: a real daemon subprocess, configs, KV buffers.

Also runnable as a tiny "engine" process (``python -m tests.conftest_mp store|load``)
so cross-process tests use fresh interpreters instead of forking torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import pytest
import torch
import yaml
import zmq

from lmc_transfer.config import LMCTransferConfig, load_config
from lmc_transfer.daemon.instance import DaemonInstance, runtime_stem
from lmc_transfer.kernels import KVBuffers
from lmc_transfer.keys import KeySalt, chunk_keys
from lmc_transfer.store.mp_client import DaemonConnection, DaemonError, DaemonUnavailable
from lmc_transfer.daemon.protocol import MsgType
from lmc_transfer.daemon.shm import segment_exists, unlink_segment

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
NUM_SLOTS = 512
HEADS, DIM = 2, 8  # float16 rows of 32 bytes
LAYERS = 2
SLAB_BYTES = LAYERS * CHUNK * 2 * HEADS * DIM * 2
START_TIMEOUT_S = 20.0


FILL_SEED_OFFSET = 500  # a loading engine's buffers start as other random bytes
LOAD_SHIFT = 7  # a loading engine puts token i at slot i + LOAD_SHIFT


def make_buffers(seed: int, *, heads: int = HEADS) -> KVBuffers:
    """token_slot KV filled with random bytes from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def plane() -> torch.Tensor:
        return torch.randint(0, 256, (NUM_SLOTS, heads, DIM * 2), dtype=torch.uint8, generator=g).view(torch.float16)

    ks = [plane() for _ in range(LAYERS)]
    vs = [plane() for _ in range(LAYERS)]
    return KVBuffers.token_slot(ks, vs)


def kv_bytes(buffers: KVBuffers, slots: torch.Tensor) -> torch.Tensor:
    """All layers' and planes' rows of ``slots``, as one uint8 tensor."""
    return torch.cat(
        [buffers.plane_rows(layer, plane)[slots].reshape(-1) for layer in range(LAYERS) for plane in range(2)]
    )


def expected_after_load(seed: int, loaded_chunks: int) -> bytes:
    """What a load engine's whole KV must look like after loading ``loaded_chunks`` of
    the prompt stored from ``make_buffers(seed)``: untouched fill bytes elsewhere."""
    src = make_buffers(seed)
    dst = make_buffers(seed + FILL_SEED_OFFSET)
    n = loaded_chunks * CHUNK
    for layer in range(LAYERS):
        for plane in range(2):
            dst.plane_rows(layer, plane)[LOAD_SHIFT : LOAD_SHIFT + n] = src.plane_rows(layer, plane)[:n]
    return kv_bytes(dst, torch.arange(NUM_SLOTS)).numpy().tobytes()


def prompt_keys(buffers: KVBuffers, tokens: list[int], tp_rank: int = 0, tp_size: int = 1) -> list[bytes]:
    return chunk_keys(tokens, CHUNK, KeySalt("test-model", buffers.geometry, tp_rank=tp_rank, tp_size=tp_size))


def tokens_for(seed: int, n_chunks: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 32000, (n_chunks * CHUNK,), generator=g).tolist()


def write_config(directory: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "mode": "mp",
        "chunk_size": CHUNK,
        "max_local_cpu_size": 64 * SLAB_BYTES / 1024**3,
        "mp_socket": str(directory / "d.sock"),
        "lookup_timeout_ms": 300,
        "request_timeout_ms": 500,
        "lease_ttl_s": 10.0,
    }
    data.update(overrides)
    path = directory / f"config-{len(list(directory.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def daemon_env(workdir: Path) -> dict[str, str]:
    """The daemon's environment: its default runtime dir (tcp lock files) inside ``workdir``."""
    return {**os.environ, "XDG_RUNTIME_DIR": str(workdir)}


class Daemon:
    """A daemon subprocess; ``stop`` checks that it cleaned up after itself."""

    def __init__(self, config_path: Path, log_level: str = "INFO") -> None:
        self.config_path = config_path
        self.config: LMCTransferConfig = load_config(config_path)
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmc_transfer.daemon", "--config", str(config_path), "--log-level", log_level],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=daemon_env(config_path.parent),
        )
        self.segment: str | None = None
        self.wait_ready()

    def request(self, msg_type: MsgType, body: dict | None = None, keys: tuple = (), timeout_s: float = 2.0) -> dict:
        conn = DaemonConnection.for_config(self.config)
        try:
            return conn.request(msg_type, body, keys, deadline=time.monotonic() + timeout_s)
        finally:
            conn.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            try:
                self.request(MsgType.PING, timeout_s=0.3)
                return
            except DaemonUnavailable:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon did not answer PING within {START_TIMEOUT_S}s: {self.log()}")

    def stats(self) -> dict:
        stats = self.request(MsgType.STATS)
        self.segment = stats["segment"] or self.segment
        return stats

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal and wait (bounded); after SIGTERM the segment and socket must be gone."""
        if self.segment is None and self.alive():
            try:
                self.stats()
            except (DaemonUnavailable, DaemonError):
                pass
        if self.alive():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=15)
        self._log.close()
        return rc

    def kill(self) -> None:
        """SIGKILL and remove what a killed daemon leaves behind."""
        self.stop(signal.SIGKILL)
        self.cleanup_leftovers()

    def cleanup_leftovers(self) -> None:
        if self.segment is not None:
            unlink_segment(self.segment)
        if self.config.mp_ipc_path is not None:
            Path(self.config.mp_ipc_path).unlink(missing_ok=True)

    @property
    def state_path(self) -> Path:
        return DaemonInstance(self._stem()).state_path

    def _stem(self) -> Path:
        with mock.patch.dict(os.environ, daemon_env(self.config_path.parent)):
            return runtime_stem(self.config)

    def leftovers(self) -> list[str]:
        out = []
        if self.segment is not None and segment_exists(self.segment):
            out.append(f"segment {self.segment}")
        if self.config.mp_ipc_path is not None and os.path.exists(self.config.mp_ipc_path):
            out.append(f"socket {self.config.mp_ipc_path}")
        if self.state_path.exists():
            out.append(f"state file {self.state_path}")
        return out


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short tmp dir (ipc paths are limited to ~100 bytes); it is also this process's (and so
    every engine's) XDG_RUNTIME_DIR, as it is the daemons' (``daemon_env``): tcp clients find
    the daemon's token file there."""
    path = Path(tempfile.mkdtemp(prefix="lmct-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Collects started daemons; stops every one still running and removes leftovers."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            if d.alive():
                d.stop()
            d.cleanup_leftovers()


def start_daemon(daemons: list[Daemon], config_path: Path, log_level: str = "INFO") -> Daemon:
    d = Daemon(config_path, log_level)
    daemons.append(d)
    return d


@contextlib.contextmanager
def raw_socket(url: str, timeout_ms: int = 5000) -> Iterator[zmq.Socket]:
    """A bare DEALER connected to ``url`` (a hostile or hand-driven client); its own context."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(url)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


#: The uid (and gid) the "other local user" of the security tests runs as.
OTHER_UID = 65534


class OtherUser:
    """``work(ready)`` in a forked child that switched to ``OTHER_UID``: another local user.

    Only root can switch, so without root the test is skipped (with that reason). The child
    calls ``ready()`` once set up and returns something JSON-able (or raises: the error comes
    back as ``{"error": ...}``); ``stop_requested()`` turns true once the parent calls
    ``stop``. The child uses only modules the parent imported already (it cannot read a
    Python installation under root's home) and leaves through ``os._exit``.
    """

    def __init__(self, work: Callable[["OtherUser"], Any]) -> None:
        if os.getuid() != 0:
            pytest.skip("needs root: the other local user is a child that calls os.setuid")
        self._result_r, result_w = os.pipe()
        stop_r, self._stop_w = os.pipe()
        self._stop_fd = stop_r
        self._result_fd = result_w
        self.pid = os.fork()
        if self.pid == 0:  # the other user
            os.close(self._result_r)
            os.close(self._stop_w)
            try:
                os.setgroups([])
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
                result = {"value": work(self)}
            except BaseException as exc:  # reported to the parent
                result = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                os.write(result_w, b"D" + json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(result_w)
        os.close(stop_r)

    # -- in the child --------------------------------------------------------

    def ready(self) -> None:
        os.write(self._result_fd, b"R")

    def stop_requested(self) -> bool:
        return bool(select.select([self._stop_fd], [], [], 0)[0])

    # -- in the parent -------------------------------------------------------

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        head = self._read(1, timeout_s)
        if head != b"R":
            raise RuntimeError(f"the other user's process failed before it was ready: {head + self._read_rest(timeout_s)!r}")

    def stop(self, timeout_s: float = 30.0) -> Any:
        """Ask the child to finish; its result (RuntimeError carrying the child's error)."""
        os.close(self._stop_w)
        data = self._read_rest(timeout_s)
        _, status = os.waitpid(self.pid, 0)
        os.close(self._result_r)
        if not data.startswith(b"D"):
            raise RuntimeError(f"the other user's process ended without a result (status {status}): {data!r}")
        result = json.loads(data[1:])
        if "error" in result:
            raise RuntimeError(f"the other user's process failed: {result['error']}")
        return result["value"]

    def _read(self, n: int, timeout_s: float) -> bytes:
        if not select.select([self._result_r], [], [], timeout_s)[0]:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            raise TimeoutError(f"the other user's process said nothing for {timeout_s}s")
        return os.read(self._result_r, n)

    def _read_rest(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        chunks = []
        while True:
            chunk = self._read(1 << 16, max(0.0, deadline - time.monotonic()))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def run_engine(*args: str, timeout: float = 60.0) -> dict:
    """Run this module as an engine process; returns its JSON result line."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.conftest_mp", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"engine {args} failed ({out.returncode}): {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_store(config: LMCTransferConfig, seed: int, chunks: int) -> dict:
    """One engine's life: store the prompt of ``seed`` from ``make_buffers(seed)``."""
    from lmc_transfer.store.mp_client import MPStore

    buffers = make_buffers(seed)
    store = MPStore(config, buffers)
    try:
        keys = prompt_keys(buffers, tokens_for(seed, chunks))
        return {"committed": store.save(store.reserve(keys), torch.arange(chunks * CHUNK, dtype=torch.int64))}
    finally:
        store.close()


def engine_load(config: LMCTransferConfig, seed: int, chunks: int) -> tuple[dict, bytes]:
    """One engine's life: look up and load the prompt of ``seed`` into fresh random buffers;
    returns the result and the engine's whole KV afterwards (see ``expected_after_load``)."""
    from lmc_transfer.store.mp_client import MPStore

    buffers = make_buffers(seed + FILL_SEED_OFFSET)
    store = MPStore(config, buffers)
    try:
        lease = store.lookup(prompt_keys(buffers, tokens_for(seed, chunks)))
        slots = torch.arange(lease.num_chunks * CHUNK, dtype=torch.int64) + LOAD_SHIFT
        loaded = store.load(lease, slots)
        store.release(lease)
        result = {"hit": lease.num_chunks, "loaded": loaded.chunks_loaded}
        return result, kv_bytes(buffers, torch.arange(NUM_SLOTS)).numpy().tobytes()
    finally:
        store.close()


def _engine_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["store", "load"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, required=True, help="KV content and prompt")
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--out", help="load: file receiving the engine's KV bytes")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.action == "store":
        result = engine_store(config, args.seed, args.chunks)
    else:
        result, kv = engine_load(config, args.seed, args.chunks)
        Path(args.out).write_bytes(kv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_engine_main())
