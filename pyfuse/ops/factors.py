"""`LoraFactors`: n task vectors over a flat layout, kept as the low-rank factors they are made of.

Segment s (one parameter tensor, flat elements `offsets[s] .. offsets[s+1]`, viewed as `[rows_s, cols_s]`)
gets from task i the delta `scale * L @ R`, `L [rows_s, r]`, `R [r, cols_s]` (a LoRA adapter's `B` and `A`,
or `A^T` and `B^T` for weights stored transposed), or nothing. Every rank-one term is a *component*; the
components of a segment, over all tasks, are numbered `comp_offsets[s] .. comp_offsets[s+1]` (K_s of them),
and stored as two matrices per segment, packed one after the other into two flat buffers:

- `left`:  per segment `L_s [rows_s, K_s]` (row-major), the tasks' `L` side by side;
- `right`: per segment `R_s [K_s, cols_s]` (row-major), the tasks' `R` stacked;
- `comp_task [K]`, `comp_scale [K]`: each component's task and LoRA scale.

So `tau_i[s] = sum over the components k of task i in s of comp_scale[k] * L_s[:, k] R_s[k, :]`, and the merge
combination is `a_s = (L_s * c) @ R_s` with `c_k = w[task_k, s] * comp_scale[k]`: the fused op forms it tile by
tile and never holds a dense task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LoraFactors:
    """Low-rank task vectors: see the module docstring for the meaning of every field."""

    n: int
    offsets: torch.Tensor  # int64 [S+1], the layout's segment boundaries
    rows: torch.Tensor  # int64 [S]
    comp_offsets: torch.Tensor  # int64 [S+1]
    left: torch.Tensor  # [sum_s rows_s * K_s]
    right: torch.Tensor  # [sum_s K_s * cols_s]
    comp_task: torch.Tensor  # int64 [K]
    comp_scale: torch.Tensor  # fp32 [K]

    @classmethod
    def from_segments(
        cls,
        offsets: torch.Tensor,
        rows: Sequence[int],
        terms: Sequence[Sequence[tuple[int, torch.Tensor, torch.Tensor, float]]],
        n: int,
        dtype: torch.dtype = torch.float32,
    ) -> LoraFactors:
        """Pack per segment s the terms `(task, L [rows_s, r], R [r, cols_s], scale)` (an empty list: no delta)."""
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"factors are stored as one of {_STORAGE_DTYPES}, got {dtype}")
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
        num_segments = offsets.numel() - 1
        if len(rows) != num_segments or len(terms) != num_segments:
            raise ValueError(f"need rows and terms for each of the {num_segments} segments, got {len(rows)} and "
                             f"{len(terms)}")
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        lefts, rights, tasks, scales, ranks = [], [], [], [], []
        for s, (length, num_rows, seg_terms) in enumerate(zip(lengths, rows, terms)):
            if num_rows <= 0 or length % num_rows:
                raise ValueError(f"segment {s}: {length} elements do not form {num_rows} rows")
            cols = length // num_rows
            for task, left, right, _ in seg_terms:
                if not 0 <= task < n:
                    raise ValueError(f"segment {s}: task index {task} is not in [0, {n})")
                if left.dim() != 2 or right.dim() != 2 or left.shape[0] != num_rows or right.shape[1] != cols or \
                        left.shape[1] != right.shape[0]:
                    raise ValueError(f"segment {s}, task {task}: factors {list(left.shape)} @ {list(right.shape)} "
                                     f"do not give the segment's [{num_rows}, {cols}]")
            if seg_terms:
                lefts.append(torch.cat([left for _, left, _, _ in seg_terms], 1).to(dtype).reshape(-1))
                rights.append(torch.cat([right for _, _, right, _ in seg_terms], 0).to(dtype).reshape(-1))
            for task, left, _, scale in seg_terms:
                tasks += [task] * left.shape[1]
                scales += [float(scale)] * left.shape[1]
            ranks.append(sum(left.shape[1] for _, left, _, _ in seg_terms))
        comp_offsets = torch.zeros(num_segments + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(ranks, dtype=torch.int64), 0, out=comp_offsets[1:])
        empty = torch.empty(0, dtype=dtype)
        return cls(
            n=n,
            offsets=offsets,
            rows=torch.tensor(list(rows), dtype=torch.int64),
            comp_offsets=comp_offsets,
            left=torch.cat(lefts) if lefts else empty,
            right=torch.cat(rights) if rights else empty,
            comp_task=torch.tensor(tasks, dtype=torch.int64),
            comp_scale=torch.tensor(scales, dtype=torch.float32),
        )

    @property
    def numel(self) -> int:
        """D, the length of the flat buffer the factors span."""
        return int(self.offsets[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def shape(self) -> torch.Size:
        """`[n, D]`, the shape of the dense task vectors these factors stand for."""
        return torch.Size((self.n, self.numel))

    @property
    def nbytes(self) -> int:
        """Bytes the factors and their tables occupy."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.comp_offsets, self.left, self.right,
                                                          self.comp_task, self.comp_scale))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraFactors:
        """The same factors on `device`, the factor buffers in `dtype` (tables keep theirs)."""
        def move(t: torch.Tensor, floating: bool) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if floating and dtype is not None else t.dtype)

        return LoraFactors(self.n, move(self.offsets, False), move(self.rows, False),
                           move(self.comp_offsets, False), move(self.left, True), move(self.right, True),
                           move(self.comp_task, False), move(self.comp_scale, False))

    def segment_factors(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `L_s [rows_s, K_s]` and `R_s [K_s, cols_s]` of segment s."""
        rows = self.rows.tolist()
        lengths = (self.offsets[1:] - self.offsets[:-1]).tolist()
        ranks = (self.comp_offsets[1:] - self.comp_offsets[:-1]).tolist()
        left_start = sum(r * k for r, k in zip(rows[:s], ranks[:s]))
        right_start = sum(length // r * k for length, r, k in zip(lengths[:s], rows[:s], ranks[:s]))
        cols = lengths[s] // rows[s]
        left = self.left[left_start: left_start + rows[s] * ranks[s]].view(rows[s], ranks[s])
        right = self.right[right_start: right_start + ranks[s] * cols].view(ranks[s], cols)
        return left, right

    def segment(self, s: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense task vectors of segment s, `[n, len_s]` (accumulated in fp32, or fp64 for fp64 factors)."""
        left, right = self.segment_factors(s)
        compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        lo, hi = self.comp_offsets[s].item(), self.comp_offsets[s + 1].item()
        out = torch.zeros(self.n, left.shape[0] * right.shape[1], dtype=compute, device=self.device)
        for task in self.comp_task[lo:hi].unique().tolist():
            ks = (self.comp_task[lo:hi] == task).nonzero().squeeze(1)
            scaled = left[:, ks].to(compute) * self.comp_scale[lo:hi][ks].to(compute)
            out[task] = (scaled @ right[ks].to(compute)).reshape(-1)
        return out.to(dtype)

    def densify(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense task vectors `[n, D]` (for tests and for methods that need every entry's magnitude)."""
        out = torch.empty(self.n, self.numel, dtype=dtype, device=self.device)
        bounds = self.offsets.tolist()
        for s in range(len(bounds) - 1):
            out[:, bounds[s]: bounds[s + 1]] = self.segment(s, dtype)
        return out
