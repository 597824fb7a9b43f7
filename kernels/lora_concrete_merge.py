"""The Triton kernels of the factored merge: `lora_merge_apply` and `lora_backward_accumulate`.

Same meaning and signatures as those phases of `pyfuse.ops.reference` (see the end of that module); the mask
phases are the dense op's (`kernels/concrete_merge.py`), so the mask at a flat position is the same Philox
draw whichever op runs. Segment s is viewed as its `[rows_s, cols_s]` matrix and cut into 2-D tiles of
BLOCK_ROWS x BLOCK_COLS elements; one program per tile, one launch per phase over every segment. A program
forms its tile of `a_s = (L_s * c) @ R_s` from BLOCK_COMPS components at a time (`tl.dot` in full fp32
precision), so no dense task vector exists, not even per segment, and uses it at once:

- lora_merge_apply: m_inout <- base + m * seg_scale[s] * a over the tile.
- lora_backward_accumulate: regenerates m (Philox) for the tile, gm = g * m; per component chunk the tile's
  share of the component weight gradients, sum over rows of L * (gm @ R^T), and the tile's a; writes g * a and
  the tile's sum of gm * a. `NEED_DOTS` / `NEED_GA` (constexprs) skip what the caller does not want.

Partial sums go to a `[rows, tiles]` buffer (row k: the segment's k-th component, last row: gm * a) and are
added per segment in tile order by the dense backend's `_segment_reduce_kernel`: deterministic, atomic-free.
All indices are int64. Tests may lower BLOCK_ROWS / BLOCK_COLS (module attributes read at call time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .concrete_merge import INTERPRET, _check_logits, _check_mode, _flat, _fp32, _Output, _segment_reduce, cached_table
from .philox import regenerate_mask, seed_args

# Tile shape (both >= 16 for tl.dot). Under the interpreter small, so tests cross tile edges at small sizes.
BLOCK_ROWS = 16 if INTERPRET else 64
BLOCK_COLS = 32 if INTERPRET else 64
# Components per tl.dot step.
BLOCK_COMPS = 16
NUM_WARPS = 4


@triton.jit
def _tile_geometry(tiles_ptr, segs_ptr, BR: tl.constexpr, BC: tl.constexpr):
    """This program's tile: its segment's fields, its rows and columns (int64) and flat indices [BR, BC]."""
    tile = tl.program_id(0).to(tl.int64)
    seg = tl.load(tiles_ptr + tile * 3)
    row0 = tl.load(tiles_ptr + tile * 3 + 1)
    col0 = tl.load(tiles_ptr + tile * 3 + 2)
    info = segs_ptr + seg * 7
    start = tl.load(info + 0)
    num_rows = tl.load(info + 1)
    num_cols = tl.load(info + 2)
    k0 = tl.load(info + 3)
    num_comps = tl.load(info + 4)
    left_at = tl.load(info + 5)
    right_at = tl.load(info + 6)
    rows = row0 + tl.arange(0, BR).to(tl.int64)
    cols = col0 + tl.arange(0, BC).to(tl.int64)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    idx = start + rows[:, None] * num_cols + cols[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    return tile, seg, rows, cols, row_ok, col_ok, idx, valid, num_cols, k0, num_comps, left_at, right_at


@triton.jit
def _factor_chunk(left_ptr, right_ptr, rows, cols, row_ok, col_ok, num_cols, num_comps, left_at, right_at, kb,
                  BK: tl.constexpr):
    """Components [kb, kb + BK) of the segment: L [BR, BK], R [BK, BC] in fp32 (zero past the ends)."""
    comps = kb + tl.arange(0, BK).to(tl.int64)
    comp_ok = comps < num_comps
    left = tl.load(left_ptr + left_at + rows[:, None] * num_comps + comps[None, :],
                   mask=row_ok[:, None] & comp_ok[None, :], other=0.0).to(tl.float32)
    right = tl.load(right_ptr + right_at + comps[:, None] * num_cols + cols[None, :],
                    mask=comp_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return comps, comp_ok, left, right


@triton.jit
def _lora_merge_apply_kernel(
    base_ptr, left_ptr, right_ptr, coef_ptr, scale_ptr, m_ptr, tiles_ptr, segs_ptr,
    BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    tile, seg, rows, cols, row_ok, col_ok, idx, valid, num_cols, k0, num_comps, left_at, right_at = \
        _tile_geometry(tiles_ptr, segs_ptr, BR, BC)
    a = tl.zeros([BR, BC], dtype=tl.float32)
    for kb in range(0, num_comps, BK):
        comps, comp_ok, left, right = _factor_chunk(left_ptr, right_ptr, rows, cols, row_ok, col_ok, num_cols,
                                                    num_comps, left_at, right_at, kb, BK)
        c = tl.load(coef_ptr + k0 + comps, mask=comp_ok, other=0.0)
        a = tl.dot(left * c[None, :], right, a, input_precision="ieee")
    scale = tl.load(scale_ptr + seg)
    m = tl.load(m_ptr + idx, mask=valid, other=0.0)
    base = tl.load(base_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    tl.store(m_ptr + idx, base + m * scale * a, mask=valid)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "noise_start"])
def _lora_backward_kernel(
    g_ptr, left_ptr, right_ptr, coef_ptr, logits_ptr, ga_ptr, partial_ptr, tiles_ptr, segs_ptr,
    num_tiles, gam_row, seed_lo, seed_hi, step, temperature, noise_start,
    MODE: tl.constexpr, NEED_GA: tl.constexpr, NEED_DOTS: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    # partial is [rows, num_tiles]: row k < K_s the tile's share of component k0 + k's dot, row gam_row sum gm*a.
    tile, seg, rows, cols, row_ok, col_ok, idx, valid, num_cols, k0, num_comps, left_at, right_at = \
        _tile_geometry(tiles_ptr, segs_ptr, BR, BC)
    tiles = tl.cast(num_tiles, tl.int64)
    g = tl.load(g_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    m = regenerate_mask(logits_ptr, idx, valid, seed_lo, seed_hi, step, temperature, noise_start, MODE)
    gm = tl.where(valid, g * m, 0.0)
    a = tl.zeros([BR, BC], dtype=tl.float32)
    for kb in range(0, num_comps, BK):
        comps, comp_ok, left, right = _factor_chunk(left_ptr, right_ptr, rows, cols, row_ok, col_ok, num_cols,
                                                    num_comps, left_at, right_at, kb, BK)
        if NEED_DOTS:
            per_row = tl.dot(gm, tl.trans(right), input_precision="ieee")  # [BR, BK] = gm @ R^T
            tl.store(partial_ptr + comps * tiles + tile, tl.sum(left * per_row, axis=0), mask=comp_ok)
        if NEED_GA:
            c = tl.load(coef_ptr + k0 + comps, mask=comp_ok, other=0.0)
            a = tl.dot(left * c[None, :], right, a, input_precision="ieee")
    if NEED_GA:
        tl.store(ga_ptr + idx, g * a, mask=valid)
        tl.store(partial_ptr + tl.cast(gam_row, tl.int64) * tiles + tile, tl.sum(tl.sum(gm * a, axis=1), axis=0))


class LoraTileTable:
    """The 2-D tiles of every segment's matrix and the per-segment fields the kernels read (int64, on device).

    segs [S, 7]: start, rows, cols, first component, components K_s, where L_s and R_s start in `left` and
    `right`. tiles [P, 3]: segment, first row, first column, in segment order; seg_tiles [S+1]: the tiles of
    segment s are [seg_tiles[s], seg_tiles[s+1]) (what `_segment_reduce` needs, with num_tiles, num_segments
    and max_tiles). comp_seg / comp_local [K]: each component's segment and index within it; max_comps: max K_s.
    """

    def __init__(self, offsets, rows, comp_offsets, block_rows: int, block_cols: int, device):
        offsets, num_rows, comp_offsets = (t.to("cpu", torch.int64) for t in (offsets, rows, comp_offsets))
        lengths = offsets[1:] - offsets[:-1]
        num_cols = lengths // num_rows
        ranks = comp_offsets[1:] - comp_offsets[:-1]
        left_at = torch.cumsum(num_rows * ranks, 0) - num_rows * ranks
        right_at = torch.cumsum(ranks * num_cols, 0) - ranks * num_cols
        row_tiles = (num_rows + block_rows - 1) // block_rows
        col_tiles = (num_cols + block_cols - 1) // block_cols
        counts = row_tiles * col_tiles
        self.num_segments = lengths.numel()
        self.seg_tiles = torch.zeros(self.num_segments + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=self.seg_tiles[1:])
        self.num_tiles = int(self.seg_tiles[-1])
        self.max_tiles = int(counts.max())
        seg = torch.repeat_interleave(torch.arange(self.num_segments), counts)
        local = torch.arange(self.num_tiles) - self.seg_tiles[seg]
        tiles = torch.stack([seg, local // col_tiles[seg] * block_rows, local % col_tiles[seg] * block_cols], 1)
        segs = torch.stack([offsets[:-1], num_rows, num_cols, comp_offsets[:-1], ranks, left_at, right_at], 1)
        self.comp_seg = torch.repeat_interleave(torch.arange(self.num_segments), ranks)
        self.comp_local = torch.arange(int(comp_offsets[-1])) - comp_offsets[self.comp_seg]
        self.max_comps = int(ranks.max())
        self.tiles, self.segs, self.seg_tiles, self.comp_seg, self.comp_local = (
            t.contiguous().to(device) for t in (tiles, segs, self.seg_tiles, self.comp_seg, self.comp_local)
        )


def lora_tile_table(offsets, rows, comp_offsets, device) -> LoraTileTable:
    """The tile table of these factors' geometry, cached per (table tensors and versions, tile shape, device)."""
    return cached_table(
        (offsets, rows, comp_offsets), ("lora", str(device), BLOCK_ROWS, BLOCK_COLS),
        lambda: LoraTileTable(offsets, rows, comp_offsets, BLOCK_ROWS, BLOCK_COLS, device),
    )


def _factor_buffers(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if left.dtype != right.dtype:
        raise TypeError(f"left and right must have one dtype, got {left.dtype} and {right.dtype}")
    # an empty buffer (no segment has components) still needs a valid pointer
    return (_flat(t) if t.numel() else t.new_zeros(1) for t in (left, right))


def lora_merge_apply(base, left, right, rows, comp_offsets, coef, offsets, seg_scale, m_inout):
    device = m_inout.device
    table = lora_tile_table(offsets, rows, comp_offsets, device)
    left, right = _factor_buffers(left, right)
    out = _Output(m_inout, copy_in=True)
    if table.num_tiles:
        _lora_merge_apply_kernel[(table.num_tiles,)](
            _flat(base), left, right, _fp32(coef, device), _fp32(seg_scale, device), out.buf, table.tiles,
            table.segs, BR=BLOCK_ROWS, BC=BLOCK_COLS, BK=BLOCK_COMPS, num_warps=NUM_WARPS,
        )
    out.done()


def lora_backward_accumulate(
    grad_out, left, right, rows, comp_offsets, coef, logits, offsets, seed, step, temperature, mode, ga_out,
    need_ga=True, need_dots=True, start=0,
):
    mode = _check_mode(mode)
    seed_lo, seed_hi, step_ = seed_args(seed, step)
    device = grad_out.device
    table = lora_tile_table(offsets, rows, comp_offsets, device)
    left, right = _factor_buffers(left, right)
    logits = _check_logits(logits)
    dot_rows = table.max_comps if need_dots else 0
    # zeros: a tile of a segment with fewer than max K_s components leaves the rows past its K_s unwritten
    partial = torch.zeros((dot_rows + 1, table.num_tiles), dtype=torch.float32, device=device)
    out = _Output(ga_out, copy_in=True)
    if table.num_tiles and (need_ga or need_dots):
        _lora_backward_kernel[(table.num_tiles,)](
            _flat(grad_out), left, right, _fp32(coef, device), logits, out.buf, partial, table.tiles, table.segs,
            table.num_tiles, dot_rows, seed_lo, seed_hi, step_, float(temperature), int(start),
            MODE=mode, NEED_GA=bool(need_ga), NEED_DOTS=bool(need_dots), BR=BLOCK_ROWS, BC=BLOCK_COLS,
            BK=BLOCK_COMPS, num_warps=NUM_WARPS,
        )
    out.done()
    sums = _segment_reduce(partial, table, None, 0)
    if need_dots:
        comp_dot = sums[table.comp_local, table.comp_seg]
    else:
        comp_dot = torch.zeros(coef.numel(), dtype=torch.float32, device=device)
    return comp_dot, sums[dot_rows]
