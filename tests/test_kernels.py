"""Gather/scatter kernels against an independent per-token oracle and the torch reference.

On a machine without a GPU the Triton kernel runs under the interpreter (conftest);
the ``cuda`` cases run the compiled kernel against pinned host slabs.
"""

from __future__ import annotations

import pytest
import torch

from lmc_transfer.kernels import (
    FULL_WIDTH,
    Backend,
    Direction,
    KVBuffers,
    LayoutKind,
    SlotRangeError,
    gather,
    layer_signal_count,
    plan_copy,
    run_copy,
    scatter,
)
from lmc_transfer.kernels.plan import tiling
from lmc_transfer.transfer.paths import AutoRule, Transfer, TransferPath

from .kv_fixtures import DTYPES, LAYOUTS, buffer_bytes, clone_buffers, make_buffers, random_slabs

CHUNK = 8
NUM_SLOTS = 64
NUM_LAYERS = 3

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seed(kind: LayoutKind, dtype: torch.dtype) -> int:
    """A seed per case that is the same in every process (unlike hash())."""
    return 100 * LAYOUTS.index(kind) + DTYPES.index(dtype)


def _slots(gen: torch.Generator, n: int, *, page_aligned: bool, device: str) -> torch.Tensor:
    if page_aligned:
        first_block = int(torch.randint(0, NUM_SLOTS // 4 - (n + 3) // 4, (1,), generator=gen))
        slots = torch.arange(first_block * 4, first_block * 4 + n)
    else:
        slots = torch.randperm(NUM_SLOTS, generator=gen)[:n]
        slots[n // 3] = -1  # the engine's padding convention: skip this token
    return slots.to(device)


def _mapped_rows(buffers: KVBuffers, slots: torch.Tensor, token_offset: int, layers: range, slab_first_layer: int):
    """(slot, layer, plane, slab index, byte range in the slab) of every row a transfer maps,
    derived token by token from the layout contract (independently of kernels/reference.py)."""
    g = buffers.geometry
    for i, slot in enumerate(slots.tolist()):
        if slot < 0 or slot >= buffers.num_slots:
            continue
        chunk, row = divmod(token_offset + i, CHUNK)
        for layer in layers:
            for plane, rb in enumerate(g.plane_row_bytes):
                start = (layer - slab_first_layer) * g.layer_bytes(CHUNK) + g.plane_offset(plane, CHUNK) + row * rb
                yield slot, layer, plane, chunk, slice(start, start + rb)


def _oracle_gather(buffers: KVBuffers, slots: torch.Tensor, slabs: list[torch.Tensor], token_offset: int,
                   layers: range, slab_first_layer: int = 0) -> list[torch.Tensor]:
    """Expected slabs after a gather."""
    out = [s.clone() for s in slabs]
    for slot, layer, plane, chunk, where in _mapped_rows(buffers, slots, token_offset, layers, slab_first_layer):
        out[chunk][where] = buffers.plane_rows(layer, plane)[slot].cpu()
    return out


def _oracle_scatter(buffers: KVBuffers, slots: torch.Tensor, slabs: list[torch.Tensor], token_offset: int,
                    layers: range, slab_first_layer: int = 0) -> list[torch.Tensor]:
    """Expected plane bytes (buffer_bytes order) after a scatter."""
    expected = clone_buffers(buffers)
    for slot, layer, plane, chunk, where in _mapped_rows(buffers, slots, token_offset, layers, slab_first_layer):
        expected.plane_rows(layer, plane)[slot] = slabs[chunk][where].to(buffers.device)
    return buffer_bytes(expected)


def _case(kind, dtype, device, seed, *, n=19, token_offset=5, page_aligned=False):
    gen = torch.Generator().manual_seed(seed)
    buffers = make_buffers(kind, dtype, num_layers=NUM_LAYERS, num_slots=NUM_SLOTS, device=device, gen=gen)
    slots = _slots(gen, n, page_aligned=page_aligned, device=device)
    num_slabs = (token_offset + n + CHUNK - 1) // CHUNK
    slabs = random_slabs(num_slabs, buffers.geometry.slab_bytes(CHUNK), gen, pin=device == "cuda")
    return buffers, slots, slabs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [None, range(1, 2)], ids=["all_layers", "one_layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", LAYOUTS, ids=lambda k: k.value)
def test_gather_matches_oracle_and_reference(kind, dtype, layers, device):
    buffers, slots, slabs = _case(kind, dtype, device, seed=_seed(kind, dtype))
    before = buffer_bytes(buffers)
    layer_range = layers or range(NUM_LAYERS)
    expected = _oracle_gather(buffers, slots, [s.cpu() for s in slabs], 5, layer_range)
    ref_slabs = [s.clone().pin_memory() if s.is_pinned() else s.clone() for s in slabs]
    gather(buffers, slots, ref_slabs, chunk_size=CHUNK, token_offset=5, layers=layers, backend=Backend.TORCH)
    gather(buffers, slots, slabs, chunk_size=CHUNK, token_offset=5, layers=layers, backend=Backend.TRITON)
    _sync(device)
    for i, (got, ref, exp) in enumerate(zip(slabs, ref_slabs, expected, strict=True)):
        assert torch.equal(ref.cpu(), exp), f"reference differs from the oracle in slab {i}"
        assert torch.equal(got.cpu(), exp), f"kernel differs from the oracle in slab {i}"
    assert all(torch.equal(a, b) for a, b in zip(before, buffer_bytes(buffers), strict=True)), "gather modified its source"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [None, range(2, 3)], ids=["all_layers", "one_layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", LAYOUTS, ids=lambda k: k.value)
def test_scatter_matches_oracle_and_reference(kind, dtype, layers, device):
    buffers, slots, slabs = _case(kind, dtype, device, seed=7 + _seed(kind, dtype))
    slabs_before = [s.clone() for s in slabs]
    layer_range = layers or range(NUM_LAYERS)
    expected = _oracle_scatter(buffers, slots, [s.cpu() for s in slabs], 5, layer_range)
    ref = clone_buffers(buffers)
    scatter(ref, slots, slabs, chunk_size=CHUNK, token_offset=5, layers=layers, backend=Backend.TORCH)
    scatter(buffers, slots, slabs, chunk_size=CHUNK, token_offset=5, layers=layers, backend=Backend.TRITON)
    _sync(device)
    for i, (got, r, exp) in enumerate(zip(buffer_bytes(buffers), buffer_bytes(ref), expected, strict=True)):
        assert torch.equal(r, exp), f"reference differs from the oracle in plane tensor {i}"
        assert torch.equal(got, exp), f"kernel differs from the oracle in plane tensor {i}"
    assert all(torch.equal(a, b) for a, b in zip(slabs_before, slabs, strict=True)), "scatter modified its source slabs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", list(Direction))
def test_page_aligned_slots_round_trip(direction, device):
    buffers, slots, slabs = _case(LayoutKind.PAGED_BLOCKS, torch.bfloat16, device, seed=3, n=24, token_offset=0,
                                  page_aligned=True)
    if direction is Direction.GATHER:
        expected = _oracle_gather(buffers, slots, [s.cpu() for s in slabs], 0, range(NUM_LAYERS))
        gather(buffers, slots, slabs, chunk_size=CHUNK, backend=Backend.TRITON)
        got = [s.cpu() for s in slabs]
    else:
        expected = _oracle_scatter(buffers, slots, [s.cpu() for s in slabs], 0, range(NUM_LAYERS))
        scatter(buffers, slots, slabs, chunk_size=CHUNK, backend=Backend.TRITON)
        got = buffer_bytes(buffers)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_slots_are_skipped_flagged_and_touch_nothing_outside(device):
    gen = torch.Generator().manual_seed(11)
    guard = 256
    storage = [torch.randint(0, 256, ((NUM_SLOTS * 2 + guard) * 64,), dtype=torch.uint8, generator=gen).to(device)
               for _ in range(NUM_LAYERS)]
    k = [s[: NUM_SLOTS * 64].view(torch.float32).view(NUM_SLOTS, 1, 16) for s in storage]
    v_storage = [torch.randint(0, 256, ((NUM_SLOTS + guard) * 64,), dtype=torch.uint8, generator=gen).to(device)
                 for _ in range(NUM_LAYERS)]
    v = [s[: NUM_SLOTS * 64].view(torch.float32).view(NUM_SLOTS, 1, 16) for s in v_storage]
    buffers = KVBuffers.token_slot(k, v)
    before = [s.cpu().clone() for s in storage + v_storage]
    slots = torch.tensor([1, NUM_SLOTS, 3, NUM_SLOTS + 5, 2**40], device=device)
    slabs = random_slabs(1, buffers.geometry.slab_bytes(CHUNK), gen, pin=device == "cuda")
    plan = scatter(buffers, slots, slabs, chunk_size=CHUNK, backend=Backend.TRITON)
    assert plan.error_flag.is_set()
    after = [s.cpu() for s in storage + v_storage]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[NUM_SLOTS * 64:], a[NUM_SLOTS * 64:]), "bytes past the buffer changed"
    expected = _oracle_scatter(buffers, torch.tensor([1, -1, 3, -1, -1]), [s.cpu() for s in slabs], 0,
                               range(NUM_LAYERS))
    # the in-range rows were written as if the bad slots had been skipped
    good = scatter(clone_buffers(KVBuffers.token_slot([t.clone() for t in k], [t.clone() for t in v])),
                   torch.tensor([1, -1, 3, -1, -1], device=device), slabs, chunk_size=CHUNK, backend=Backend.TORCH)
    assert not good.error_flag.is_set()
    assert all(torch.equal(a, b) for a, b in zip(buffer_bytes(buffers), expected, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", LAYOUTS, ids=lambda k: k.value)
def test_full_width_copy_between_slots_and_staging_pieces(kind, dtype, direction, device):
    """The placement (scatter) and the store's gather of the copy-engine path: the ordinary kernel
    over staging pieces in device memory that hold only some layers, one program per tile. 21
    tokens from row 3 cross two chunk boundaries and end inside a token block."""
    buffers, slots, _ = _case(kind, dtype, device, seed=50 + _seed(kind, dtype), n=21, token_offset=3)
    gen = torch.Generator().manual_seed(60 + _seed(kind, dtype))
    piece_layers = range(1, NUM_LAYERS)
    pieces = [p.to(device) for p in random_slabs(3, len(piece_layers) * buffers.geometry.layer_bytes(CHUNK), gen)]
    pieces_before = [p.cpu().clone() for p in pieces]
    before = buffer_bytes(buffers)
    plan = plan_copy(buffers, slots, pieces, chunk_size=CHUNK, token_offset=3, slab_layers=piece_layers)
    layers = range(2, 3) if direction is Direction.SCATTER else piece_layers
    if direction is Direction.GATHER:
        expected = _oracle_gather(buffers, slots, pieces_before, 3, layers, slab_first_layer=1)
    else:
        expected = _oracle_scatter(buffers, slots, pieces_before, 3, layers, slab_first_layer=1)
    # One program per tile: no cap below the tile count.
    assert layer_signal_count(plan, layers, FULL_WIDTH) == tiling(plan, FULL_WIDTH).tiles_per_layer
    run_copy(plan, direction, layers=layers, max_programs=FULL_WIDTH, backend=Backend.TRITON)
    _sync(device)
    if direction is Direction.GATHER:
        assert all(torch.equal(p.cpu(), e) for p, e in zip(pieces, expected, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(before, buffer_bytes(buffers), strict=True)), "gather modified its source"
    else:
        assert all(torch.equal(a, b) for a, b in zip(buffer_bytes(buffers), expected, strict=True))
        assert all(torch.equal(p.cpu(), b) for p, b in zip(pieces, pieces_before, strict=True)), "scatter modified its source"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", list(Direction))
def test_a_third_plane_is_copied_like_the_others(direction, device):
    """Planes are a table, not two hard-coded rows: three planes of different widths per layer."""
    gen = torch.Generator().manual_seed(70)
    widths = (8, 24, 4)  # float32 elements per row: 32, 96 and 16 bytes
    layers = [[torch.randn(NUM_SLOTS, w, generator=gen).to(device) for w in widths] for _ in range(NUM_LAYERS)]
    buffers = KVBuffers._build(LayoutKind.TOKEN_SLOT, layers, token_dims=1)
    assert buffers.geometry.plane_row_bytes == (32, 96, 16)
    slots = _slots(gen, 19, page_aligned=False, device=device)
    slabs = random_slabs(3, buffers.geometry.slab_bytes(CHUNK), gen, pin=device == "cuda")
    host = [s.cpu().clone() for s in slabs]
    if direction is Direction.GATHER:
        expected = _oracle_gather(buffers, slots, host, 5, range(NUM_LAYERS))
        gather(buffers, slots, slabs, chunk_size=CHUNK, token_offset=5, backend=Backend.TRITON)
        _sync(device)
        assert all(torch.equal(s.cpu(), e) for s, e in zip(slabs, expected, strict=True))
    else:
        expected = _oracle_scatter(buffers, slots, host, 5, range(NUM_LAYERS))
        scatter(buffers, slots, slabs, chunk_size=CHUNK, token_offset=5, backend=Backend.TRITON)
        _sync(device)
        assert all(torch.equal(a, b) for a, b in zip(buffer_bytes(buffers), expected, strict=True))


def test_validate_names_first_bad_position():
    gen = torch.Generator().manual_seed(1)
    buffers = make_buffers(LayoutKind.MLA, torch.bfloat16, num_layers=2, num_slots=NUM_SLOTS, device="cpu", gen=gen)
    slabs = random_slabs(1, buffers.geometry.slab_bytes(CHUNK), gen)
    slots = torch.tensor([0, 5, NUM_SLOTS + 1, 7])
    with pytest.raises(SlotRangeError, match=r"slots\[2\] = 65 is past the end of the KV buffers \(64 slots\)"):
        gather(buffers, slots, slabs, chunk_size=CHUNK, validate=True)


def _small(kind=LayoutKind.TOKEN_SLOT, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(2)
    buffers = make_buffers(kind, dtype, num_layers=2, num_slots=NUM_SLOTS, device="cpu", gen=gen)
    return buffers, random_slabs(2, buffers.geometry.slab_bytes(CHUNK), gen)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda b, s, sl: dict(slots=torch.zeros(3, dtype=torch.float32)), TypeError,
         "slots: expected dtype torch.int64 or torch.int32, got torch.float32"),
        (lambda b, s, sl: dict(slots=torch.zeros(2, 2, dtype=torch.int64)), ValueError,
         r"slots: expected a 1-D tensor, got shape \(2, 2\)"),
        (lambda b, s, sl: dict(slots=torch.zeros(3, dtype=torch.int64, device="meta")), ValueError,
         "slots: expected device cpu like the KV buffers, got meta"),
        (lambda b, s, sl: dict(slabs=sl[:1]), ValueError, "touch 2 chunks, got 1 slabs"),
        (lambda b, s, sl: dict(slabs=[sl[0], sl[1][:100]]), ValueError, r"slabs\[1\]: expected at least \d+ bytes, got 100"),
        (lambda b, s, sl: dict(slabs=[sl[0], torch.zeros(sl[1].numel() + 1, dtype=torch.uint8)[1:]]), ValueError, r"slabs\[1\]: base address must be 16-byte aligned"),
        (lambda b, s, sl: dict(slabs=[sl[0], sl[1].view(2, -1)[:, :10]]), ValueError, r"slabs\[1\]: expected a contiguous tensor"),
        (lambda b, s, sl: dict(slabs=[sl[0], sl[1].to("meta")]), ValueError, r"slabs\[1\]: expected device cpu"),
        (lambda b, s, sl: dict(chunk_size=0), ValueError, "chunk_size: expected a positive int, got 0"),
        (lambda b, s, sl: dict(token_offset=CHUNK), ValueError, r"token_offset: expected an int in \[0, 8\), got 8"),
        (lambda b, s, sl: dict(layers=range(1, 3)), ValueError, r"layers: expected a non-empty range within \[0, 2\), got range\(1, 3\)"),
        (lambda b, s, sl: dict(layers=range(0, 2, 2)), TypeError, "layers: expected a range with step 1"),
        (lambda b, s, sl: dict(max_programs=0), ValueError, "max_programs: expected a positive int or None, got 0"),
    ],
    ids=["slots_dtype", "slots_dim", "slots_device", "slab_count", "slab_small", "slab_unaligned",
         "slab_noncontig", "slab_device", "chunk_size", "token_offset", "layers_oob", "layers_step", "programs"],
)
def test_bad_input_raises_documented_error(mutate, error, message):
    buffers, slabs = _small()
    args = dict(slots=torch.arange(10), slabs=slabs, chunk_size=CHUNK, token_offset=0, layers=None, max_programs=None)
    args.update(mutate(buffers, args["slots"], slabs))
    with pytest.raises(error, match=message):
        gather(buffers, args["slots"], args["slabs"], chunk_size=args["chunk_size"], token_offset=args["token_offset"],
               layers=args["layers"], max_programs=args["max_programs"])


def test_layout_validation_errors():
    k = [torch.zeros(8, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    v = [torch.zeros(8, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(TypeError, match="layer 1 plane 1: dtype torch.float16 differs from layer 0's torch.bfloat16"):
        KVBuffers.token_slot(k, [v[0], v[1].half()])
    with pytest.raises(ValueError, match=r"layer 1 plane 0: shape \(9, 2, 16\) differs from layer 0's \(8, 2, 16\)"):
        KVBuffers.token_slot([k[0], torch.zeros(9, 2, 16, dtype=torch.bfloat16)], v)
    with pytest.raises(ValueError, match="layer 0 plane 0: slot rows must be contiguous"):
        KVBuffers.token_slot([k[0].transpose(0, 1).contiguous().transpose(0, 1)] + k[1:], v)
    with pytest.raises(ValueError, match="plane 0: row bytes must be a multiple of 16 .* got 6"):
        KVBuffers.mla([torch.zeros(8, 1, 3, dtype=torch.float16)])
    with pytest.raises(ValueError, match="must have one tensor per layer: got 2 K and 1 V"):
        KVBuffers.token_slot(k, v[:1])
    with pytest.raises(TypeError, match="layer 0 plane 0: expected a torch.Tensor, got list"):
        KVBuffers.mla([[1, 2]])

# Rows of 2 KiB give 512-word tile columns, so 19 tokens already make several tiles per layer.
WIDE_HEADS = dict(head_dim_k=512, head_dim_v=512)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs", [1, 3, 64])
@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", [LayoutKind.TOKEN_SLOT, LayoutKind.PAGED_BLOCKS], ids=lambda k: k.value)
def test_layer_signals_count_each_layer_and_copy_the_same_bytes(kind, direction, programs, device):
    gen = torch.Generator().manual_seed(30 + programs)
    buffers = make_buffers(kind, torch.bfloat16, num_layers=NUM_LAYERS, num_slots=NUM_SLOTS, device=device, gen=gen,
                           **WIDE_HEADS)
    slots = _slots(gen, 19, page_aligned=False, device=device)
    slabs = random_slabs(3, buffers.geometry.slab_bytes(CHUNK), gen, pin=device == "cuda")
    layers = range(1, NUM_LAYERS)
    if direction is Direction.GATHER:
        expected = _oracle_gather(buffers, slots, [s.cpu() for s in slabs], 5, layers)
    else:
        expected = _oracle_scatter(buffers, slots, [s.cpu() for s in slabs], 5, layers)
    plan = plan_copy(buffers, slots, slabs, chunk_size=CHUNK, token_offset=5)
    # One counter more than the layers, all starting at 7: counts add, the spare stays untouched.
    done = torch.full((len(layers) + 1,), 7, dtype=torch.int32, device=device)
    run_copy(plan, direction, layers=layers, max_programs=programs, layer_done=done, backend=Backend.TRITON)
    got = [s.cpu() for s in slabs] if direction is Direction.GATHER else buffer_bytes(buffers)
    count = layer_signal_count(plan, layers, programs)
    # 64 programs get 2048-word tiles: 2 planes x ceil(19 tokens / 4-token blocks) = 10 tiles a layer.
    assert count == {1: 1, 3: 3, 64: 10}[programs]
    assert done.cpu().tolist() == [7 + count] * len(layers) + [7]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(
    "layer_done, error, message",
    [
        ([0, 0], TypeError, "layer_done: expected a torch.Tensor, got list"),
        (torch.zeros(2, dtype=torch.int64), ValueError, "layer_done: expected a contiguous 1-D torch.int32 tensor, got dtype torch.int64"),
        (torch.zeros(1, dtype=torch.int32), ValueError, r"layer_done: expected at least 2 counters \(one per layer of range\(0, 2\)\), got 1"),
        (torch.zeros(2, dtype=torch.int32, device="meta"), ValueError, "layer_done: expected device cpu like the KV buffers, got meta"),
        (torch.zeros(5, dtype=torch.int32)[1:], ValueError, "layer_done: base address must be 16-byte aligned"),
    ],
    ids=["not_tensor", "dtype", "short", "device", "unaligned"],
)
def test_bad_layer_done_raises_documented_error(layer_done, error, message):
    buffers, slabs = _small()
    plan = plan_copy(buffers, torch.arange(10), slabs, chunk_size=CHUNK)
    with pytest.raises(error, match=message):
        run_copy(plan, Direction.SCATTER, layer_done=layer_done)


@pytest.mark.gpu
def test_unpinned_host_slab_is_rejected_on_gpu():
    gen = torch.Generator().manual_seed(4)
    buffers = make_buffers(LayoutKind.MLA, torch.bfloat16, num_layers=2, num_slots=NUM_SLOTS, device="cuda", gen=gen)
    slabs = random_slabs(1, buffers.geometry.slab_bytes(CHUNK), gen, pin=False)
    with pytest.raises(ValueError, match=r"slabs\[0\]: host memory must be pinned or cudaHostRegister-ed"):
        gather(buffers, torch.arange(4, device="cuda"), slabs, chunk_size=CHUNK)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(TransferPath))
@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("token_offset, n", [(0, 32), (5, 30), (3, 4)], ids=["whole", "partial_ends", "inside_one"])
def test_transfer_paths_match_oracle(path, direction, token_offset, n, device):
    gen = torch.Generator().manual_seed(20 + n)
    buffers = make_buffers(LayoutKind.TOKEN_SLOT, torch.bfloat16, num_layers=4, num_slots=NUM_SLOTS, device=device,
                           gen=gen)
    slots = torch.randperm(NUM_SLOTS, generator=gen)[:n].to(device)
    num_slabs = (token_offset + n + CHUNK - 1) // CHUNK
    slabs = random_slabs(num_slabs, buffers.geometry.slab_bytes(CHUNK), gen, pin=device == "cuda")
    layer_bytes = buffers.geometry.layer_bytes(CHUNK)
    # staging that holds one layer of one chunk per buffer forces many pipeline pieces
    transfer = Transfer(buffers, CHUNK, path=path, staging_bytes=4 * layer_bytes, auto_rule=AutoRule(layer_bytes, layer_bytes))
    if direction is Direction.GATHER:
        expected = _oracle_gather(buffers, slots, [s.cpu() for s in slabs], token_offset, range(4))
        transfer.gather(slots, slabs, token_offset=token_offset)
        _sync(device)
        got = [s.cpu() for s in slabs]
    else:
        expected = _oracle_scatter(buffers, slots, [s.cpu() for s in slabs], token_offset, range(4))
        transfer.scatter(slots, slabs, token_offset=token_offset)
        _sync(device)
        got = buffer_bytes(buffers)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.gpu
def test_staged_path_is_taken_and_plan_reusable_per_layer():
    gen = torch.Generator().manual_seed(5)
    buffers = make_buffers(LayoutKind.TOKEN_SLOT, torch.float16, num_layers=4, num_slots=NUM_SLOTS, device="cuda",
                           gen=gen)
    slots = torch.randperm(NUM_SLOTS, generator=gen)[:32].cuda()
    slabs = random_slabs(4, buffers.geometry.slab_bytes(CHUNK), gen, pin=True)
    layer_bytes = buffers.geometry.layer_bytes(CHUNK)
    transfer = Transfer(buffers, CHUNK, path=TransferPath.AUTO, staging_bytes=8 * layer_bytes,
                        auto_rule=AutoRule(layer_bytes, layer_bytes))
    prepared = transfer.prepare(slots, slabs)
    expected = _oracle_gather(buffers, slots, [s.clone() for s in slabs], 0, range(4))
    taken = {transfer.run(prepared, Direction.GATHER, layers=range(layer, layer + 1)) for layer in range(4)}
    torch.cuda.synchronize()
    assert taken == {TransferPath.STAGED}
    assert all(torch.equal(a, b) for a, b in zip(slabs, expected, strict=True))
