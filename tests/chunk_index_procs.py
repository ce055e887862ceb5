"""Child processes for the chunk-index concurrency tests: ``python -m tests.chunk_index_procs``.

- ``churn``: the writer. Creates a tiny index, prints ``{"name": ...}``, then puts, removes and
  reuses buckets as fast as it can until SIGTERM (closes the index, prints its counters) or
  SIGKILL.
- ``probe``: a reader. Probes random key sequences for ``--seconds`` and checks every reported
  triple against the ground truth below; prints its counts.
- ``stall``: a writer that stops forever inside one update (after its ``--fence``-th fence),
  so the test can SIGKILL it with that bucket's counter odd.

Ground truth: the writer only ever maps key ``k`` at generation ``g`` to ``slab_for(k, g)`` (a
keyed digest), so a reader can verify a triple without asking; a torn or mixed read (another
key's slab, another update's generation) fails the check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import sys
import time
from typing import Any, Callable

from lmc_transfer.daemon import chunk_index
from lmc_transfer.daemon.chunk_index import ChunkIndexReader, ChunkIndexWriter

EPOCH = "chunk-index-test"
#: Keys of the stalled writer before the one it stalls on; it stalls on key STALL_KEY.
STALL_KEYS = 6
STALL_KEY = 3
_CLEAR_EVERY = 25_000
_REMOVE_FRACTION = 0.4


def universe(n: int) -> list[bytes]:
    return [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=32, person=b"chunk-idx").digest() for i in range(n)]


def slab_for(key: bytes, generation: int) -> int:
    return int.from_bytes(hashlib.blake2b(key + generation.to_bytes(8, "little"), digest_size=4).digest(), "little")


def after_fence(n: int, action: Callable[[], None]) -> Callable[[], None]:
    """A stand-in for ``chunk_index.memory_fence`` that fences and, on its ``n``-th call, runs ``action``."""
    real_fence = chunk_index.memory_fence
    calls = 0

    def fence() -> None:
        nonlocal calls
        real_fence()
        calls += 1
        if calls == n:
            action()

    return fence


def _say(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


def churn(args: argparse.Namespace) -> None:
    writer = ChunkIndexWriter.create(args.capacity, EPOCH, window=args.window)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    keys = universe(args.keys)
    generations = [0] * len(keys)
    rng = random.Random(args.seed)
    ops = 0
    _say({"name": writer.name})
    try:
        while True:
            i = rng.randrange(len(keys))
            if rng.random() < _REMOVE_FRACTION:
                writer.remove(keys[i])
            else:
                generations[i] += 1
                writer.put(keys[i], slab_for(keys[i], generations[i]), generations[i])
            ops += 1
            if ops % _CLEAR_EVERY == 0:
                writer.clear()
    finally:
        writer.close()
        _say({"ops": ops, "not_indexed": writer.stats.not_indexed})


def probe(args: argparse.Namespace) -> None:
    reader = ChunkIndexReader.open(args.name, EPOCH)
    keys = universe(args.keys)
    rng = random.Random(args.seed)
    probes = triples = 0
    wrong: list[list[int]] = []
    slowest = 0.0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        picked = [rng.randrange(len(keys)) for _ in range(rng.randint(1, 8))]
        start = time.monotonic()
        hits = reader.probe_prefix([keys[i] for i in picked])
        slowest = max(slowest, time.monotonic() - start)
        probes += 1
        for i, slab_id, generation in zip(picked, hits.slab_ids, hits.generations):
            triples += 1
            if generation < 1 or slab_id != slab_for(keys[i], generation):
                wrong.append([i, slab_id, generation])
    reader.close()
    _say({
        "probes": probes,
        "triples": triples,
        "wrong": wrong[:20],
        "num_wrong": len(wrong),
        "retries": reader.stats.retries,
        "unstable_misses": reader.stats.unstable_misses,
        "slowest_s": slowest,
    })


def stall(args: argparse.Namespace) -> None:
    writer = ChunkIndexWriter.create(args.capacity, EPOCH, window=args.window)
    keys = universe(STALL_KEYS)
    for key in keys:
        writer.put(key, slab_for(key, 1), 1)

    def stall_forever() -> None:
        _say({"name": writer.name, "stalled": args.op})
        time.sleep(120)

    chunk_index.memory_fence = after_fence(args.fence, stall_forever)
    if args.op == "put":
        writer.put(keys[STALL_KEY], slab_for(keys[STALL_KEY], 2), 2)
    else:
        writer.remove(keys[STALL_KEY])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chunk_index_procs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("churn", "stall"):
        p = sub.add_parser(name)
        p.add_argument("--capacity", type=int, required=True)
        p.add_argument("--window", type=int, required=True)
    sub.choices["churn"].add_argument("--keys", type=int, required=True)
    sub.choices["churn"].add_argument("--seed", type=int, required=True)
    sub.choices["stall"].add_argument("--op", choices=("put", "remove"), required=True)
    sub.choices["stall"].add_argument("--fence", type=int, choices=(1, 2), required=True)
    p = sub.add_parser("probe")
    p.add_argument("--name", required=True)
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    {"churn": churn, "probe": probe, "stall": stall}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
