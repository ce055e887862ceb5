"""CPU-side cost of one single-layer launch, profiled (run on a CUDA machine).

Usage: python -m benchmarks.profile_launch  (prints the top functions by own time)
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from lmc_transfer.kernels import Direction
from lmc_transfer.transfer.paths import Transfer, TransferPath

from .bench_transfer_gpu import CHUNK, LLAMA, _host_slabs, _slots


def main() -> None:
    buffers = LLAMA.buffers(4096)
    slots = _slots(256, 1)
    slabs = _host_slabs(buffers, 256)
    transfer = Transfer(buffers, CHUNK, path=TransferPath.ZERO_COPY)
    prepared = transfer.prepare(slots, slabs)
    stream = torch.cuda.Stream()

    def layers(n: int) -> None:
        for _ in range(n):
            for layer in range(buffers.num_layers):
                transfer.run(prepared, Direction.SCATTER, layers=range(layer, layer + 1), stream=stream)

    layers(3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    layers(20)
    per_launch_us = (time.perf_counter() - t0) / (20 * buffers.num_layers) * 1e6
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    layers(10)
    profiler.disable()
    torch.cuda.synchronize()
    print(f"CPU time per single-layer launch: {per_launch_us:.1f} us")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
