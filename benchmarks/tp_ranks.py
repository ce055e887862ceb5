"""Tensor-parallel ranks sharing one daemon: one engine process per GPU.

Each rank holds its shard of the KV heads on its own GPU, stores a shared prompt through one
MP daemon, then a fresh engine process per rank loads it back; loads of all ranks start
together, and the aggregate bandwidth is reported next to one rank alone.

    python -m benchmarks.tp_ranks --ranks 2 --tokens 8192      (needs that many GPUs)

Prints one JSON line per measurement and exits non-zero on any wrong byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHUNK = 256
LAYERS, HEADS, DIM = 32, 8, 128


def _rank_buffers(rank: int, tp_size: int, num_slots: int, seed: int):
    from lmc_transfer.kernels import KVBuffers

    gen = torch.Generator(device=f"cuda:{rank}").manual_seed(seed)
    heads = HEADS // tp_size

    def plane() -> torch.Tensor:
        return torch.randint(0, 256, (num_slots, heads, DIM * 2), dtype=torch.uint8, device=f"cuda:{rank}",
                             generator=gen).view(torch.bfloat16)

    return KVBuffers.token_slot([plane() for _ in range(LAYERS)], [plane() for _ in range(LAYERS)])


def _run_rank(args: argparse.Namespace) -> None:
    """One engine process: store (phase 'store') or load-and-verify (phase 'load')."""
    from lmc_transfer.config import load_config
    from lmc_transfer.keys import KeySalt, chunk_keys
    from lmc_transfer.store.mp_client import MPStore

    torch.cuda.set_device(args.rank)
    num_slots = 2 * args.tokens
    source = _rank_buffers(args.rank, args.tp_size, num_slots, seed=100 + args.rank)
    salt = KeySalt("tp-bench", source.geometry, tp_rank=args.rank, tp_size=args.tp_size)
    keys = chunk_keys(list(range(args.tokens)), CHUNK, salt)
    src_slots = torch.arange(args.tokens, device="cuda")
    config = load_config(args.config)
    if args.phase == "store":
        store = MPStore(config, source)
        committed = store.save(store.reserve(keys), src_slots)
        print(json.dumps({"rank": args.rank, "phase": "store", "chunks": committed, "first_key": keys[0].hex()}))
        store.close()
        return
    target = _rank_buffers(args.rank, args.tp_size, num_slots, seed=900 + args.rank)
    store = MPStore(config, target)
    dst_slots = torch.arange(args.tokens, 2 * args.tokens, device="cuda")
    lease = store.lookup(keys)
    store.load(lease, dst_slots)  # warm-up: the first launch in a process compiles the kernel
    torch.cuda.synchronize()
    while time.time() < args.start_at:
        time.sleep(0.0005)
    t0 = time.perf_counter()
    result = store.load(lease, dst_slots)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    store.release(lease)
    exact = all(
        torch.equal(source.plane_rows(layer, plane)[src_slots], target.plane_rows(layer, plane)[dst_slots])
        for layer in range(LAYERS) for plane in range(2)
    )
    nbytes = args.tokens * target.geometry.token_bytes
    print(json.dumps({"rank": args.rank, "phase": "load", "chunks": result.chunks_loaded, "exact": exact,
                      "seconds": seconds, "bytes": nbytes, "GBps": nbytes / seconds / 1e9}))
    store.close()


def _launch(phase: str, ranks: list[int], tp_size: int, config: Path, tokens: int) -> list[dict]:
    start_at = time.time() + 5.0
    procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.tp_ranks", "--rank", str(r), "--tp-size", str(tp_size),
                          "--phase", phase, "--config", str(config), "--tokens", str(tokens),
                          "--start-at", str(start_at)], stdout=subprocess.PIPE, text=True)
        for r in ranks
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        if p.returncode:
            raise SystemExit(f"rank process failed with {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--tp-size", type=int)
    parser.add_argument("--phase")
    parser.add_argument("--config")
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    if args.rank is not None:
        _run_rank(args)
        return
    from tests.conftest_mp import Daemon, write_config

    with tempfile.TemporaryDirectory(prefix="lmct-tp-") as tmp:
        config = write_config(Path(tmp), chunk_size=CHUNK, max_local_cpu_size=1.5 * args.tokens / 8192 + 0.25,
                              lookup_timeout_ms=5000, request_timeout_ms=20000, lease_ttl_s=120.0)
        daemon = Daemon(config)
        try:
            ranks = list(range(args.ranks))
            stored = _launch("store", ranks, args.ranks, config, args.tokens)
            keys_disjoint = len({s["first_key"] for s in stored}) == len(stored)
            single = _launch("load", [0], args.ranks, config, args.tokens)
            together = _launch("load", ranks, args.ranks, config, args.tokens)
        finally:
            daemon.stop()
        total = sum(r["bytes"] for r in together)
        wall = max(r["seconds"] for r in together)
        ok = keys_disjoint and all(r["exact"] and r["chunks"] == args.tokens // CHUNK for r in single + together)
        print(json.dumps({"gpus": [torch.cuda.get_device_name(r) for r in ranks], "tokens": args.tokens,
                          "keys_disjoint": keys_disjoint, "all_exact": ok,
                          "one_rank_GBps": single[0]["GBps"], "aggregate_GBps": total / wall / 1e9,
                          "per_rank": together}))
        if not ok:
            raise SystemExit("TP ranks: wrong bytes, missing chunks or colliding keys")


if __name__ == "__main__":
    main()
