"""The README's kernel example runs as written (on CPU: cuda -> cpu, no pinning)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_kernel_example_round_trips_bytes():
    (block,) = _python_blocks()
    code = block.replace('device="cuda"', 'device="cpu"').replace("pin_memory=True", "pin_memory=False")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    buffers, slots, slabs, k = scope["buffers"], scope["slots"], scope["slabs"], scope["k"]
    # the example gathered zeros; write known rows, gather again and check slab bytes row by row
    for layer_k in k:
        layer_k.view(torch.uint8).copy_(torch.randint(0, 256, layer_k.view(torch.uint8).shape, dtype=torch.uint8))
    from lmc_transfer.kernels import gather

    gather(buffers, slots, slabs, chunk_size=scope["chunk_size"])
    geometry = buffers.geometry
    row = geometry.plane_row_bytes[0]
    for i, slot in enumerate(slots.tolist()):
        chunk, pos = divmod(i, scope["chunk_size"])
        for layer in range(geometry.num_layers):
            start = layer * geometry.layer_bytes(scope["chunk_size"]) + pos * row
            assert torch.equal(slabs[chunk][start:start + row], buffers.plane_rows(layer, 0)[slot])
