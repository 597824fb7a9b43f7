"""The Triton backend of the fused Concrete merge: the phase functions of `pyfuse.ops.reference`.

Same meaning and signatures as the reference phases (see that module's docstring); only the execution
differs. Work is cut into TILES that each lie inside one segment: segment s = [offsets[s], offsets[s+1])
is split into ceil(len_s / TILE) tiles starting at offsets[s]. A host-built tile table (tile_seg,
tile_start, tile_end; cached per offsets tensor) lets ONE launch per phase cover every segment of the
model, one program per tile. A program walks its tile in sub-blocks of BLOCK contiguous elements
(BLOCK autotuned with num_warps on GPU, fixed under the interpreter), accumulating in fp32.

Reductions are deterministic and atomic-free: each tile writes its partial sums, and a second small
kernel adds each segment's tile partials in tile order. (Within a process the chosen BLOCK/num_warps
is fixed, so results are bitwise reproducible; across processes the autotuner may pick a different
config, which can change the last bits of the sums. Set PYFUSE_TRITON_AUTOTUNE=0 to pin the config.)

Kernels (grid = one program per tile unless noted):
- mask_sums: regenerate u (Philox) and m, store m, store the tile's fp32 partial sum of m; then
  `_segment_reduce_kernel` (grid = segment groups x rows) sums the partials of each segment in order.
- merge_apply: a = sum_i w[i,s] tv[i] over a runtime loop on the n tasks (each tv element read once,
  fp32/bf16/fp16 loaded and widened), m_inout <- base + m * scale[s] * a.
- backward_accumulate: loads the n task-vector rows of a sub-block at once as an [NPAD, BLOCK] tile
  (NPAD = next power of two >= n, padded rows masked off), regenerates m, keeps [NPAD, BLOCK] and
  [BLOCK] fp32 accumulators of g*tv*m and g*a*m reduced once per tile into partial [n+1, P], writes
  g*a; the segment reduction then gives grad_weights (times seg_scale) and seg_gam. No mask stored.
- backward_logits: regenerate the relaxed m, ga <- (ga * scale[s] - corr[s]) * m (1 - m) / T in place.

All indices are int64 so models above 2^31 parameters work. When every offset is a multiple of 16 (or
8, 4, 2) the tile bounds are hinted as such (ALIGN) so that the compiler can vectorise loads. TILE is
passed as a constexpr only so the autotuner can key and prune on it. Tests may lower `TILE` and
`FIXED_BLOCK` (module attributes read at call time) to exercise tile and block edges; under the
interpreter a BLOCK-sized sub-block of a noisy mode costs a few milliseconds (Philox is ~100 ops),
so keep TILE/BLOCK small only at small D.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from .philox import RELAXED, concrete_uniform, regenerate_mask, seed_args

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Autotune BLOCK/num_warps on GPU; never under the interpreter (it would multiply test time).
AUTOTUNE = not INTERPRET and os.environ.get("PYFUSE_TRITON_AUTOTUNE", "1") != "0"

# Elements per tile, the unit of work of one program. Must be a multiple of every BLOCK in use.
# Under the interpreter it is small enough that tests cross tile and block edges at modest D.
TILE = 1024 if INTERPRET else 16384
# BLOCK and num_warps when not autotuning.
FIXED_BLOCK = 256 if INTERPRET else 1024
FIXED_NUM_WARPS = 4
# Autotuning space; configs whose BLOCK does not divide TILE are pruned.
TUNE_BLOCKS = (256, 512, 1024, 2048)
TUNE_WARPS = (2, 4, 8)
# The backward kernel holds an [NPAD, BLOCK] fp32 accumulator: at most this many per thread.
MAX_ACC_PER_THREAD = 16
# Largest index alignment hinted to the compiler (vectorised loads when all offsets allow it).
MAX_ALIGN = 16
# Segment reduction: a program sums an [SEGS, TILES] block of tile partials per step, SEGS * TILES =
# REDUCE_BLOCK. On GPU TILES covers the segment with the most tiles (capped at REDUCE_MAX_TILES) so the
# loop is short; under the interpreter it covers the mean, to launch few programs. The shape depends
# only on the offsets and TILE, so the summation order is fixed (deterministic).
REDUCE_BLOCK = 2048
REDUCE_MAX_TILES = 1024

_MODE_IDS = (0, 1, 2, 3)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _this_tile(tile_start_ptr, tile_end_ptr, ALIGN: tl.constexpr):
    """This program's tile (64-bit index) and its element range [start, end), inside one segment."""
    tile = tl.program_id(0).to(tl.int64)
    start = tl.multiple_of(tl.load(tile_start_ptr + tile), ALIGN)
    end = tl.multiple_of(tl.load(tile_end_ptr + tile), ALIGN)
    return tile, start, end


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "noise_start"])
def _mask_sums_kernel(
    logits_ptr, m_ptr, partial_ptr, tile_start_ptr, tile_end_ptr,
    seed_lo, seed_hi, step, temperature, noise_start,
    MODE: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    tile, start, end = _this_tile(tile_start_ptr, tile_end_ptr, ALIGN)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, end - start, BLOCK):
        idx = start + k + lanes
        valid = idx < end
        m = regenerate_mask(logits_ptr, idx, valid, seed_lo, seed_hi, step, temperature, noise_start, MODE)
        tl.store(m_ptr + idx, m, mask=valid)
        acc += tl.where(valid, m, 0.0)
    tl.store(partial_ptr + tile, tl.sum(acc, axis=0))


@triton.jit
def _merge_apply_kernel(
    base_ptr, tv_ptr, w_ptr, scale_ptr, m_ptr, tile_seg_ptr, tile_start_ptr, tile_end_ptr,
    n, num_segments, tv_stride,
    ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    tile, start, end = _this_tile(tile_start_ptr, tile_end_ptr, ALIGN)
    seg = tl.load(tile_seg_ptr + tile).to(tl.int64)
    scale = tl.load(scale_ptr + seg)
    stride = tl.cast(tv_stride, tl.int64)
    segments = tl.cast(num_segments, tl.int64)
    lanes = tl.arange(0, BLOCK)
    for k in range(0, end - start, BLOCK):
        idx = start + k + lanes
        valid = idx < end
        a = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n):
            row = tl.cast(i, tl.int64)
            w = tl.load(w_ptr + row * segments + seg)
            tv = tl.load(tv_ptr + row * stride + idx, mask=valid, other=0.0).to(tl.float32)
            a += w * tv
        m = tl.load(m_ptr + idx, mask=valid, other=0.0)
        base = tl.load(base_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        tl.store(m_ptr + idx, base + m * scale * a, mask=valid)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "noise_start"])
def _backward_accumulate_kernel(
    g_ptr, tv_ptr, logits_ptr, w_ptr, ga_ptr, partial_ptr, tile_seg_ptr, tile_start_ptr, tile_end_ptr,
    n, num_segments, num_tiles, tv_stride, seed_lo, seed_hi, step, temperature, noise_start,
    MODE: tl.constexpr, NPAD: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    # partial is [n + 1, num_tiles]: rows i < n hold sum g*tv[i]*m over the tile, row n sum g*a*m.
    tile, start, end = _this_tile(tile_start_ptr, tile_end_ptr, ALIGN)
    seg = tl.load(tile_seg_ptr + tile).to(tl.int64)
    rows = tl.arange(0, NPAD)
    row_valid = rows < n
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows64 * tl.cast(num_segments, tl.int64) + seg, mask=row_valid, other=0.0)
    tv_rows = tv_ptr + rows64[:, None] * tl.cast(tv_stride, tl.int64)
    lanes = tl.arange(0, BLOCK)
    acc_w = tl.zeros([NPAD, BLOCK], dtype=tl.float32)
    acc_gam = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, end - start, BLOCK):
        idx = start + k + lanes
        valid = idx < end
        g = tl.load(g_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        tv = tl.load(tv_rows + idx[None, :], mask=row_valid[:, None] & valid[None, :], other=0.0)
        tv = tv.to(tl.float32)
        a = tl.sum(w[:, None] * tv, axis=0)
        m = regenerate_mask(logits_ptr, idx, valid, seed_lo, seed_hi, step, temperature, noise_start, MODE)
        gm = tl.where(valid, g * m, 0.0)
        acc_w += gm[None, :] * tv
        acc_gam += gm * a
        tl.store(ga_ptr + idx, g * a, mask=valid)
    tiles = tl.cast(num_tiles, tl.int64)
    tl.store(partial_ptr + rows64 * tiles + tile, tl.sum(acc_w, axis=1), mask=row_valid)
    tl.store(partial_ptr + tl.cast(n, tl.int64) * tiles + tile, tl.sum(acc_gam, axis=0))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "noise_start"])
def _backward_logits_kernel(
    ga_ptr, logits_ptr, scale_ptr, corr_ptr, tile_seg_ptr, tile_start_ptr, tile_end_ptr,
    seed_lo, seed_hi, step, temperature, noise_start,
    ALIGN: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    tile, start, end = _this_tile(tile_start_ptr, tile_end_ptr, ALIGN)
    seg = tl.load(tile_seg_ptr + tile).to(tl.int64)
    scale = tl.load(scale_ptr + seg)
    corr = tl.load(corr_ptr + seg)
    lanes = tl.arange(0, BLOCK)
    for k in range(0, end - start, BLOCK):
        idx = start + k + lanes
        valid = idx < end
        m = regenerate_mask(logits_ptr, idx, valid, seed_lo, seed_hi, step, temperature, noise_start, RELAXED)
        ga = tl.load(ga_ptr + idx, mask=valid, other=0.0)
        tl.store(ga_ptr + idx, (ga * scale - corr) * m * (1.0 - m) / temperature, mask=valid)


@triton.jit
def _segment_reduce_kernel(
    partial_ptr, seg_tiles_ptr, scale_ptr, out_ptr, num_segments, num_tiles, scaled_rows,
    SEGS: tl.constexpr, TILES: tl.constexpr,
):
    # out[c, s] = sum of partial[c, t] over the tiles t of segment s, in tile order; rows c <
    # scaled_rows are multiplied by scale[s]. Program (pid0, c) covers segments [pid0*SEGS, +SEGS).
    c = tl.program_id(1).to(tl.int64)
    segs = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS)
    seg_valid = segs < num_segments
    t0 = tl.load(seg_tiles_ptr + segs, mask=seg_valid, other=0)
    t1 = tl.load(seg_tiles_ptr + segs + 1, mask=seg_valid, other=0)
    longest = tl.max(t1 - t0, axis=0)
    row = partial_ptr + c * tl.cast(num_tiles, tl.int64)
    cols = tl.arange(0, TILES)
    acc = tl.zeros([SEGS, TILES], dtype=tl.float32)
    for k in range(0, longest, TILES):
        t = t0[:, None] + k + cols[None, :]
        acc += tl.load(row + t, mask=t < t1[:, None], other=0.0)
    total = tl.sum(acc, axis=1)
    if c < scaled_rows:
        total = total * tl.load(scale_ptr + segs, mask=seg_valid, other=0.0)
    tl.store(out_ptr + c * tl.cast(num_segments, tl.int64) + segs, total, mask=seg_valid)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _uniform_kernel(out_ptr, start, count, seed_lo, seed_hi, step, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < count
    u = concrete_uniform(seed_lo, seed_hi, step, tl.cast(start, tl.int64) + offs)
    tl.store(out_ptr + offs, u, mask=valid)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------


def _check_tile(tile: int, block: int) -> None:
    if tile <= 0 or tile % block:
        raise ValueError(f"TILE ({tile}) must be a positive multiple of BLOCK ({block})")


def _acc_per_thread(npad: int, block: int, num_warps: int) -> float:
    return npad * block / (32 * num_warps)


def _prune(configs, named_args, **kwargs):
    tile = kwargs.get("TILE", named_args.get("TILE"))
    npad = kwargs.get("NPAD", named_args.get("NPAD"))
    fits = [c for c in configs if tile % c.kwargs["BLOCK"] == 0]
    if not fits:
        raise ValueError(f"TILE ({tile}) is not a multiple of any autotuned BLOCK {TUNE_BLOCKS}")
    if npad is None:  # no [NPAD, BLOCK] accumulator
        return fits
    load = {c: _acc_per_thread(npad, c.kwargs["BLOCK"], c.num_warps) for c in fits}
    small = [c for c in fits if load[c] <= MAX_ACC_PER_THREAD]
    return small or [c for c in fits if load[c] == min(load.values())]


_TUNED: dict[str, object] = {}
_KERNELS = {
    "mask_sums": (_mask_sums_kernel, ["MODE", "ALIGN", "TILE"], None),
    "merge_apply": (_merge_apply_kernel, ["ALIGN", "TILE"], ["m_ptr"]),
    "backward_accumulate": (_backward_accumulate_kernel, ["MODE", "NPAD", "ALIGN", "TILE"], None),
    "backward_logits": (_backward_logits_kernel, ["ALIGN", "TILE"], ["ga_ptr"]),
}


def _tuned(name: str):
    # Built lazily: constructing autotuners needs a GPU driver. In-place phases restore their
    # buffer after benchmarking; tensor dtypes are part of the autotuner's cache key.
    if name not in _TUNED:
        kernel, key, restore = _KERNELS[name]
        configs = [
            triton.Config({"BLOCK": block}, num_warps=warps) for block in TUNE_BLOCKS for warps in TUNE_WARPS
        ]
        _TUNED[name] = triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": _prune}, restore_value=restore
        )(kernel)
    return _TUNED[name]


def _launch(name: str, grid, *args, **constexprs) -> None:
    if AUTOTUNE:
        _tuned(name)[grid](*args, **constexprs)
        return
    block = FIXED_BLOCK
    if not INTERPRET:  # keep the backward kernel's [NPAD, BLOCK] accumulator in registers
        npad = constexprs.get("NPAD", 1)
        while _acc_per_thread(npad, block, FIXED_NUM_WARPS) > MAX_ACC_PER_THREAD and block > 32:
            block //= 2
    _check_tile(constexprs["TILE"], block)
    _KERNELS[name][0][grid](*args, **constexprs, BLOCK=block, num_warps=FIXED_NUM_WARPS)


# --------------------------------------------------------------------------------------------------
# Tile table
# --------------------------------------------------------------------------------------------------


class TileTable:
    """Tiles of `tile` elements inside each segment. All int64 on the data's device.

    seg [P], start [P], end [P]: the tiles in segment order; seg_tiles [S+1]: the tiles of segment s
    are [seg_tiles[s], seg_tiles[s+1]). align: the largest power of two <= MAX_ALIGN dividing every
    offset and the tile, so every tile start and end (hinted to the compiler for vector loads).
    """

    def __init__(self, offsets: torch.Tensor, tile: int):
        offsets = offsets.to(torch.int64)
        lengths = offsets[1:] - offsets[:-1]
        counts = (lengths + (tile - 1)) // tile
        self.num_segments = lengths.numel()
        self.seg_tiles = torch.zeros(self.num_segments + 1, dtype=torch.int64, device=offsets.device)
        torch.cumsum(counts, 0, out=self.seg_tiles[1:])
        self.num_tiles = int(self.seg_tiles[-1]) if self.num_segments else 0
        self.seg = torch.repeat_interleave(
            torch.arange(self.num_segments, device=offsets.device), counts, output_size=self.num_tiles
        )
        local = torch.arange(self.num_tiles, device=offsets.device) - self.seg_tiles[self.seg]
        self.start = offsets[self.seg] + local * tile
        self.end = torch.minimum(self.start + tile, offsets[self.seg + 1])
        self.max_tiles = int(counts.max()) if self.num_segments else 0
        self.align = MAX_ALIGN
        while self.align > 1 and (tile % self.align or bool((offsets % self.align).any())):
            self.align //= 2


_TABLES: dict[tuple, tuple[tuple[weakref.ref, ...], object]] = {}
_MAX_TABLES = 16


def cached_table(sources: tuple[torch.Tensor, ...], params: tuple, build):
    """`build()`, cached per (source tensor objects and versions, params): the tables the kernels index by."""
    key = (*((t.data_ptr(), t._version, t.numel()) for t in sources), *params)
    hit = _TABLES.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], sources)):
        return hit[1]
    table = build()
    if len(_TABLES) >= _MAX_TABLES:
        for stale in [k for k, (refs, _) in _TABLES.items() if any(r() is None for r in refs)] or list(_TABLES)[:1]:
            del _TABLES[stale]
    _TABLES[key] = (tuple(weakref.ref(t) for t in sources), table)
    return table


def tile_table(offsets: torch.Tensor, device: torch.device, tile: int | None = None) -> TileTable:
    """The tile table of `offsets` on `device`, cached per (offsets object, version, tile, device)."""
    tile = TILE if tile is None else tile
    return cached_table((offsets,), ("flat", str(device), tile), lambda: TileTable(offsets.to(device), tile))


def _segment_reduce(partial: torch.Tensor, table: TileTable, scale: torch.Tensor | None, scaled_rows: int):
    rows = partial.shape[0]
    out = torch.empty((rows, table.num_segments), dtype=torch.float32, device=partial.device)
    if table.num_segments == 0:
        return out
    per_segment = triton.cdiv(table.num_tiles, table.num_segments) if INTERPRET else table.max_tiles
    tiles = min(REDUCE_MAX_TILES, triton.next_power_of_2(max(per_segment, 1)))
    segs = max(1, REDUCE_BLOCK // tiles)
    grid = (triton.cdiv(table.num_segments, segs), rows)
    _segment_reduce_kernel[grid](
        partial, table.seg_tiles, partial if scale is None else scale, out,
        table.num_segments, table.num_tiles, scaled_rows if scale is not None else 0,
        SEGS=segs, TILES=tiles, num_warps=4,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------------


def _check_mode(mode) -> int:
    if mode not in _MODE_IDS:
        raise ValueError(f"mode must be one of {_MODE_IDS} (relaxed, hard, threshold, none), got {mode!r}")
    return int(mode)


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    # The reference computes in the logits' dtype; this backend computes in fp32 only.
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32 for the Triton backend, got {logits.dtype}")
    return logits if logits.is_contiguous() else logits.contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _fp32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32).contiguous()


def _task_matrix(task_vectors: torch.Tensor) -> torch.Tensor:
    if task_vectors.dim() != 2:
        raise ValueError(f"task_vectors must be [n, D], got shape {tuple(task_vectors.shape)}")
    return task_vectors if task_vectors.stride(1) == 1 else task_vectors.contiguous()


class _Output:
    """A contiguous buffer standing in for `target`, copied back on `done()` when it is not one."""

    def __init__(self, target: torch.Tensor, copy_in: bool):
        self.target = target
        if target.is_contiguous():
            self.buf = target
        elif copy_in:
            self.buf = target.contiguous()
        else:
            self.buf = torch.empty_like(target, memory_format=torch.contiguous_format)

    def done(self) -> None:
        if self.buf is not self.target:
            self.target.copy_(self.buf)


# --------------------------------------------------------------------------------------------------
# Phase functions (signatures and meaning of pyfuse.ops.reference)
# --------------------------------------------------------------------------------------------------


def mask_sums(logits, offsets, seed, step, temperature, mode, m_out, start=0):
    mode = _check_mode(mode)
    seed_lo, seed_hi, step_ = seed_args(seed, step)
    table = tile_table(offsets, logits.device)
    logits = _check_logits(logits)
    out = _Output(m_out, copy_in=False)
    partial = torch.empty((1, table.num_tiles), dtype=torch.float32, device=logits.device)
    if table.num_tiles:
        _launch(
            "mask_sums", (table.num_tiles,),
            logits, out.buf, partial, table.start, table.end, seed_lo, seed_hi, step_, float(temperature), int(start),
            MODE=mode, ALIGN=table.align, TILE=TILE,
        )
    out.done()
    return _segment_reduce(partial, table, None, 0)[0]


def merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout):
    device = m_inout.device
    table = tile_table(offsets, device)
    tv = _task_matrix(task_vectors)
    n = tv.shape[0]
    weights = _fp32(weights, device)
    seg_scale = _fp32(seg_scale, device)
    base = _flat(base)
    out = _Output(m_inout, copy_in=True)
    if table.num_tiles:
        _launch(
            "merge_apply", (table.num_tiles,),
            base, tv, weights, seg_scale, out.buf, table.seg, table.start, table.end,
            n, table.num_segments, tv.stride(0),
            ALIGN=table.align, TILE=TILE,
        )
    out.done()


def backward_accumulate(
    grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step, temperature, mode, ga_out, start=0
):
    mode = _check_mode(mode)
    seed_lo, seed_hi, step_ = seed_args(seed, step)
    device = grad_out.device
    table = tile_table(offsets, device)
    tv = _task_matrix(task_vectors)
    n = tv.shape[0]
    weights = _fp32(weights, device)
    seg_scale = _fp32(seg_scale, device)
    grad_out = _flat(grad_out)
    logits = _check_logits(logits)
    out = _Output(ga_out, copy_in=False)
    partial = torch.empty((n + 1, table.num_tiles), dtype=torch.float32, device=device)
    if table.num_tiles:
        _launch(
            "backward_accumulate", (table.num_tiles,),
            grad_out, tv, logits, weights, out.buf, partial, table.seg, table.start, table.end,
            n, table.num_segments, table.num_tiles, tv.stride(0), seed_lo, seed_hi, step_, float(temperature),
            int(start), MODE=mode, NPAD=triton.next_power_of_2(max(n, 1)), ALIGN=table.align, TILE=TILE,
        )
    out.done()
    sums = _segment_reduce(partial, table, seg_scale, n)
    return sums[:n], sums[n]


def backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature, start=0):
    seed_lo, seed_hi, step_ = seed_args(seed, step)
    device = ga_inout.device
    table = tile_table(offsets, device)
    seg_scale = _fp32(seg_scale, device)
    seg_corr = _fp32(seg_corr, device)
    logits = _check_logits(logits)
    out = _Output(ga_inout, copy_in=True)
    if table.num_tiles:
        _launch(
            "backward_logits", (table.num_tiles,),
            out.buf, logits, seg_scale, seg_corr, table.seg, table.start, table.end,
            seed_lo, seed_hi, step_, float(temperature), int(start),
            ALIGN=table.align, TILE=TILE,
        )
    out.done()


# --------------------------------------------------------------------------------------------------
# Helpers for tests and benchmarks
# --------------------------------------------------------------------------------------------------


def uniform(seed: int, step: int, start: int, count: int, device=None) -> torch.Tensor:
    """The clamped uniforms u_j, j in [start, start + count), as the kernels generate them."""
    seed_lo, seed_hi, step_ = seed_args(seed, step)
    if start < 0 or count < 0 or start + count > 2**63:
        raise ValueError(f"bad index range [{start}, {start} + {count})")
    if device is None:
        device = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        block = 1024
        _uniform_kernel[(triton.cdiv(count, block),)](
            out, start, count, seed_lo, seed_hi, step_, BLOCK=block, num_warps=4
        )
    return out
