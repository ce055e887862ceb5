"""The Triton copy kernel between engine KV slots and contiguous chunk slabs, and its launcher.

One kernel serves both directions (``GATHER`` constexpr), every layout and any number of
planes: the engine side is a table of plane base addresses per layer, the slab side a table of
slab base addresses per chunk (host slabs, or staging pieces in HBM: the same contract). All
addresses are int32-word offsets from one anchor tensor, so the kernel does plain pointer
arithmetic from an argument whose 16-byte alignment Triton knows, and the 16-byte vector
accesses survive (host memory is reached through its unified virtual address).

Plans, checks and tiling live in kernels/plan.py; the cached launch path in kernels/launch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

#: Integer arguments are not specialised (divisibility hints are given in the kernel instead), so
#: one compiled kernel serves every transfer size and the cached launch path stays valid.
_INT_ARGS = ("num_tokens", "token_offset", "chunk_size", "slab_first_layer", "num_slots", "token_words",
             "layer_start", "num_layers")


@triton.jit(do_not_specialize=_INT_ARGS)
def _kv_copy_kernel(
    anchor_ptr,  # *int32: every address below is a word offset from this pointer
    plane_off_ptr,  # *int64 [num_layers_total * NUM_PLANES]: plane base offsets
    plane_words_ptr,  # *int64 [NUM_PLANES]: pack_plane_words(row words, words of the planes before)
    slots_ptr,  # *int64 [num_tokens]
    slab_off_ptr,  # *int64 [num_slabs]
    error_ptr,  # *int32 [1]: set to 1 when a slot is past the buffer
    num_tokens,
    token_offset,
    chunk_size,
    slab_first_layer,
    num_slots,
    token_words,  # words of one token in one layer, all planes
    layer_done_ptr,  # *int32 [num_layers]: with SIGNAL_LAYERS, +1 per program once its share of a layer landed
    layer_start,
    num_layers,
    NUM_PLANES: tl.constexpr,
    GATHER: tl.constexpr,
    SIGNAL_LAYERS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    i_prog = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    n_tblocks = tl.cdiv(num_tokens, BLOCK_T)
    n_tiles = num_layers * NUM_PLANES * n_tblocks
    layer_words = chunk_size.to(tl.int64) * token_words
    o_t = tl.arange(0, BLOCK_T).to(tl.int64)
    o_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_W), BLOCK_W), BLOCK_W).to(tl.int64)
    # Tiles run layer-major, so a program that reaches a new layer is done with the previous one.
    i_prev_layer = layer_start - 1 + i_prog * 0
    for i_tile in range(i_prog, n_tiles, n_prog):
        i_tblock = i_tile % n_tblocks
        i_lp = i_tile // n_tblocks
        i_plane = i_lp % NUM_PLANES
        i_layer = layer_start + i_lp // NUM_PLANES
        if SIGNAL_LAYERS:
            if (i_layer != i_prev_layer) & (i_prev_layer >= layer_start):
                _signal_layer(layer_done_ptr + (i_prev_layer - layer_start), GATHER)
            i_prev_layer = i_layer
        b_plane_words = tl.load(plane_words_ptr + i_plane)
        row_words = b_plane_words & 0xFFFFFFFF
        plane_in_layer = chunk_size * (b_plane_words >> 32)

        i_tok = i_tblock * BLOCK_T + o_t
        m_tok = i_tok < num_tokens
        b_slot = tl.load(slots_ptr + i_tok, mask=m_tok, other=-1)
        m_bad = m_tok & (b_slot >= num_slots)
        if tl.max(m_bad.to(tl.int32), axis=0) > 0:
            tl.store(error_ptr, 1)
        m_row = m_tok & (b_slot >= 0) & (b_slot < num_slots)

        i_pos = token_offset + i_tok
        i_slab = i_pos // chunk_size
        b_slab = tl.load(slab_off_ptr + i_slab, mask=m_row, other=0)
        b_plane_base = tl.load(plane_off_ptr + i_layer * NUM_PLANES + i_plane)
        o_kv_row = tl.multiple_of(b_plane_base + b_slot * row_words, 4)
        o_slab_row = tl.multiple_of(
            b_slab + (i_layer - slab_first_layer) * layer_words + plane_in_layer + (i_pos % chunk_size) * row_words, 4
        )
        for w0 in range(0, row_words, BLOCK_W):
            # BLOCK_W divides every row, so the mask is constant along a row and the
            # accesses stay 16-byte vectors (a per-word mask would split them into 4-byte
            # PCIe transactions, a quarter of the bandwidth for writes to host memory).
            o_word = w0 + o_w
            m = m_row[:, None]
            p_kv = anchor_ptr + (o_kv_row[:, None] + o_word[None, :])
            p_slab = anchor_ptr + (o_slab_row[:, None] + o_word[None, :])
            if GATHER:
                tl.store(p_slab, tl.load(p_kv, mask=m), mask=m)
            else:
                tl.store(p_kv, tl.load(p_slab, mask=m), mask=m)
    if SIGNAL_LAYERS:
        if i_prev_layer >= layer_start:
            _signal_layer(layer_done_ptr + (i_prev_layer - layer_start), GATHER)


@triton.jit
def _signal_layer(p_done, GATHER: tl.constexpr):
    """Count this program's share of a layer as landed, after every thread's stores.

    The barrier orders the whole program's stores before the release; a gather's stores go
    to host memory, so its release is system-wide, a scatter's (into HBM) device-wide.
    """
    tl.debug_barrier()
    if GATHER:
        tl.atomic_add(p_done, 1, sem="release", scope="sys")
    else:
        tl.atomic_add(p_done, 1, sem="release", scope="gpu")


def pack_plane_words(row_words: int, words_before: int) -> int:
    """A plane's entry of ``plane_words_ptr``: its row words in the low 32 bits, the words of the
    planes before it (inside one token of one layer) in the high 32 bits. One scalar load per
    tile, not two adjacent ones the compiler would merge into a vector load."""
    if not (0 < row_words < 2**32 and 0 <= words_before < 2**31):
        raise ValueError(f"plane words: expected row words in (0, 2**32) and words before in [0, 2**31), "
                         f"got {row_words} and {words_before}")
    return words_before << 32 | row_words


class _Positional:
    def positional(self) -> tuple:
        """The fields' values in declaration order (the kernel's signature order)."""
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class KernelArgs(_Positional):
    """The kernel's arguments that stay fixed from launch to launch of one plan, in signature
    order (``layer_done``, ``layer_start`` and ``num_layers`` follow them)."""

    anchor: torch.Tensor
    plane_offsets: torch.Tensor
    plane_words: torch.Tensor
    slots: torch.Tensor
    slab_offsets: torch.Tensor
    error_flag: torch.Tensor
    num_tokens: int
    token_offset: int
    chunk_size: int
    slab_first_layer: int
    num_slots: int
    token_words: int


@dataclass(frozen=True)
class KernelConstants(_Positional):
    """The kernel's constexprs: what one compiled variant is specialised on."""

    NUM_PLANES: int
    GATHER: bool
    SIGNAL_LAYERS: bool
    BLOCK_T: int
    BLOCK_W: int


def launch_kv_copy(grid: int, args: KernelArgs, layer_done: torch.Tensor, layer_start: int, num_layers: int,
                   constants: KernelConstants, *, num_warps: int):
    """Launch through Triton on the current stream; returns Triton's compiled kernel."""
    return _kv_copy_kernel[(grid,)](*args.positional(), layer_done, layer_start, num_layers,
                                    **{f.name: getattr(constants, f.name) for f in fields(constants)},
                                    num_warps=num_warps)
