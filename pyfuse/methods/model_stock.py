"""Model Stock (Jang et al., 2024): per tensor, move from the base towards the fine-tuned average by the ratio
the angle between the task vectors sets, `b + t * mean_i(tau_i)`.

With `N >= 2` fine-tuned models and `cos` the pairwise cosine of their task vectors (per tensor, or per row
with `filter_wise`), two references differ in how they pool the pairs and guard divisions:

- `variant="fusion_bench"` (fusion_bench's `ModelStock`): `cos_ij = <tau_i, tau_j> / (sqrt(|tau_i|^2 |tau_j|^2)
  + 1e-8)` clamped to [-1, 1]; the pairwise angles `acos(cos_ij)` are averaged and
  `t = N cos(angle) / ((N - 1) cos(angle) + 1 + 1e-8)`. Tensors in `ignore_keys` get the plain average (`t = 1`).
- `variant="mergekit"` (mergekit's `model_stock`): `cos_ij = <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)`
  clamped, the cosines averaged, and `t = N cos / (1 + (N - 1) cos)`.

Both apply to every floating tensor (biases, norms, embeddings too); a zero task vector gives `cos = 0`, so
`t = 0`: the base. The Grams are float64 sums over the tensor (one pass per tensor, `geometry`), and the merge
runs chunk by chunk.
"""

from __future__ import annotations

import torch

from .base import Chunk, MergeContext, Param, StaticMethod, boolean, check_names, choice, register, tensor_names
from .geometry import CoefficientPlan, segment_grams

_FUSION_BENCH_EPS = 1e-8
_MERGEKIT_NORM_FLOOR = 1e-6


def model_stock_ratio(gram: torch.Tensor, variant: str) -> torch.Tensor:
    """float64 `t` per vector from the task vectors' Grams `[V, N, N]`."""
    n = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()
    pairs = torch.triu_indices(n, n, offset=1)
    i, j = pairs[0], pairs[1]
    dots = gram[:, i, j]
    if variant == "fusion_bench":
        cos = dots / ((gram[:, i, i] * gram[:, j, j]).sqrt() + _FUSION_BENCH_EPS)
        cos = torch.cos(torch.acos(cos.clamp(-1, 1)).mean(1))
        return n * cos / ((n - 1) * cos + 1 + _FUSION_BENCH_EPS)
    cos = (dots / (norms[:, i] * norms[:, j]).clamp(min=_MERGEKIT_NORM_FLOOR)).clamp(-1, 1).mean(1)
    return n * cos / (1 + (n - 1) * cos)


@register
class ModelStock(StaticMethod):
    """Model Stock with fusion_bench's or mergekit's pooling of the pairwise angles (see the module docstring)."""

    name = "model_stock"
    display_name = "Model Stock"
    reference = "Jang et al., 2024, Model Stock"
    summary = "base + t * mean task vector, t from the angle between the task vectors (per tensor or row)"
    params = {
        "variant": Param("fusion_bench", choice("fusion_bench", "mergekit"),
                         "fusion_bench: mean pairwise angle; mergekit: mean pairwise cosine (module docstring)"),
        "filter_wise": Param(False, boolean, "mergekit's option: one ratio per row (last dimension) of each tensor"),
        "ignore_keys": Param((), tensor_names, "fusion_bench's option: tensors merged by the plain average"),
    }
    temporaries = (1, 3)

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        if n < 2:
            raise ValueError(f"{self.name}: needs at least two fine-tuned models, got {n}")
        check_names(self.name, "ignore_keys", self.parameters["ignore_keys"], layout)

    def tensor_passes(self) -> int:
        return 1

    def plan(self, ctx: MergeContext, index: int) -> CoefficientPlan | None:
        if ctx.layout.names[index] in self.parameters["ignore_keys"]:
            return None
        shape = ctx.layout.shapes[index]
        along = "rows" if self.parameters["filter_wise"] else "all"
        gram = segment_grams(ctx, index, along, lambda chunk: chunk.deltas)
        ratio = model_stock_ratio(gram, self.parameters["variant"])
        return CoefficientPlan(shape, along, int(ctx.layout.offsets[index]), ratio.float()[:, None])

    def merge_chunk(self, chunk: Chunk, plan: CoefficientPlan | None) -> torch.Tensor:
        average = chunk.deltas.mean(0)
        if plan is not None:
            average.mul_(plan.for_chunk(chunk)[0])
        return average.add_(chunk.base)
