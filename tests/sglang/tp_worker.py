"""One tensor-parallel rank for test_tp_ranks_agree_on_the_loaded_prefix (SGLang 0.5.23 tier).

    python -m tests.sglang.tp_worker --rank R --world 2 --init-file F --config C --model-dir D

Joins a gloo group (file rendezvous: no port), builds the backend through SGLang's registry
with that group as SGLang's TP ``cpu_group``, runs the scenario and prints one JSON line:
the turns it saw. Every rank sees the same requests, as SGLang's TP ranks do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import timedelta
from types import SimpleNamespace

import torch.distributed as dist

from tests.kv_model import prompt


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world"):
        parser.add_argument(name, type=int, required=True)
    for name in ("--init-file", "--config", "--model-dir", "--mode"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=60))
    # Imported after the group exists: the test module loads SGLang and skips without it.
    from lmc_transfer.integrations.sglang import plugin as sglang_plugin
    from tests.sglang.sgl_env import publish_runtime
    from tests.sglang.test_sglang_plugin import Engine

    publish_runtime(args.model_dir, radix_cache_backend=sglang_plugin.BACKEND_NAME)
    engine = Engine(args.config, seed=50 + args.rank, tp_rank=args.rank, tp_size=args.world,
                    tp_group=SimpleNamespace(cpu_group=dist.group.WORLD))
    a = prompt(61, 45)
    turns = {"stored": engine.run("t1", a, prompt(62, 6))}  # 50 KV tokens -> 3 chunks on every rank
    engine.evict_all()
    turns["all_ranks_hold_it"] = engine.run("t2", a, prompt(63, 2))
    engine.evict_all()
    if args.mode == "ip":
        if args.rank == 1:
            engine.cache.store.clear()  # only this rank's in-process store forgets the prompt
        dist.barrier()
        turns["one_rank_lost_it"] = engine.run("t3", a, prompt(64, 2))
    assert engine.slots_accounted()
    engine.close()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({name: dataclasses.asdict(turn) for name, turn in turns.items()}))


if __name__ == "__main__":
    main()
