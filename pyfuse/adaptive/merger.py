"""`ConcreteMerger`: mask logits and merge coefficients over a `TaskVectors` buffer.

The merged parameters come from the fused op `pyfuse.ops.concrete_merge` as one flat `[D]` tensor and
reach the user's model through `torch.func.functional_call` on zero-copy views of it, so no per-task or
per-step copy of the model is ever made.

Under torch.distributed (`ranks`), each rank holds the base, task vectors and mask logits of its shard only: a
contiguous run of whole segments (`pyfuse.distributed.segment_shards`), so the per-segment rescale stays
local; the op merges the shard (its noise drawn at the shard's global indices) and the shards are gathered
into the whole `[D]` the model needs. In one process the shard is the whole model and the gather does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed import Ranks, segment_shards
from ..ops import DEFAULT_TEMPERATURE, MODES, concrete_merge, sample_concrete_mask
from ..task import ModelCall, Task
from ..taskvectors import TaskVectors

COEFFICIENTS = ("fixed", "task", "layer")
# The Philox step counter of the evaluation (and final) mask: no training step reaches it, so the
# evaluated sample is never one the logits were trained on, and it is the same for every evaluation.
EVAL_STEP = 2**32 - 1


class ConcreteMerger(torch.nn.Module):
    """Learnable mask logits `[D]` and coefficients over `task_vectors`, merged by the fused op.

    Args:
        model: the architecture; its own parameter values are never read (every call gets the merged
            ones). It is put in eval mode, as test-time adaptation assumes.
        task_vectors: base `[D]` and task vectors `[n, D]` (fp32, bf16 or fp16); with `ranks`, the whole ones
            (this rank's shard is copied out of them) or already this rank's shard (`TaskVectors.from_models`
            with `shard_of`).
        coefficients: "fixed" (one value for every task, not trained: task arithmetic), "task" (`[n]`)
            or "layer" (`[n, S]`, one per task and parameter tensor).
        init: the initial (and reset) value of every coefficient.
        clamp: clamp the coefficients to [0, 1] inside the merge, as the original AdaMerging code does.
        temperature, seed, rescale, backend: passed to `concrete_merge`.
        ranks: the process group the shards are spread over (None: one process, one shard).

    `logits` holds this rank's shard `[hi - lo]` (`span`); `gather` makes whole `[D]` tensors of shards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task_vectors: TaskVectors,
        *,
        coefficients: str = "layer",
        init: float = 0.3,
        clamp: bool = False,
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int = 0,
        rescale: bool = True,
        backend: str = "auto",
        ranks: Ranks | None = None,
    ):
        super().__init__()
        if coefficients not in COEFFICIENTS:
            raise ValueError(f"coefficients must be one of {COEFFICIENTS}, got {coefficients!r}")
        layout = task_vectors.layout
        shards = segment_shards(layout.sizes, ranks.world_size) if ranks is not None else [(0, len(layout))]
        task_vectors = task_vectors.sharded(*shards[ranks.rank if ranks is not None else 0])
        self.__dict__["ranks"] = ranks
        # every rank's number of elements, for the gathers
        self.shard_sizes = [int(layout.offsets[last] - layout.offsets[first]) for first, last in shards]
        first, last = task_vectors.segments
        # this shard's segment offsets from 0; one tensor for every pass (backends cache tables per offsets)
        self.offsets = (layout.offsets[first:last + 1] - layout.offsets[first]).to(task_vectors.base.device)
        # Kept out of the module tree: the model's parameters are not the merger's state.
        self.__dict__["model"] = model.eval()
        self.__dict__["task_vectors"] = task_vectors
        self.kind = coefficients
        self.init = float(init)
        self.clamp = bool(clamp)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.rescale = bool(rescale)
        self.backend = backend
        self.logits = torch.nn.Parameter(torch.zeros(task_vectors.base.numel(), device=task_vectors.base.device))
        shape = (task_vectors.n, len(layout)) if coefficients == "layer" else (task_vectors.n,)
        self.coefficients = torch.nn.Parameter(
            torch.full(shape, self.init, device=task_vectors.base.device), requires_grad=coefficients != "fixed"
        )

    @property
    def span(self) -> tuple[int, int]:
        """The flat elements [lo, hi) of this rank's shard."""
        return self.task_vectors.span

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole `[D]` tensor of every rank's `[hi - lo]` shard (the shard itself in one process)."""
        return shard if self.ranks is None else self.ranks.all_gather_flat(shard, self.shard_sizes)

    def reset_coefficients(self) -> None:
        with torch.no_grad():
            self.coefficients.fill_(self.init)

    def weights(self) -> torch.Tensor:
        """The coefficients the merge uses (clamped if asked)."""
        return self.coefficients.clamp(0.0, 1.0) if self.clamp else self.coefficients

    def merged_shard(
        self, *, step: int, mask: str, train_logits: bool = False, train_coefficients: bool = False
    ) -> torch.Tensor:
        """This rank's shard `[hi - lo]` of the merged flat parameters for the mask sample `step`; differentiable
        in what is trained (the coefficients' gradient covers this shard's segments only)."""
        if mask not in MODES:
            raise ValueError(f"mask must be one of {MODES}, got {mask!r}")
        logits = self.logits if train_logits else self.logits.detach()
        weights = self.weights() if train_coefficients else self.weights().detach()
        if weights.dim() == 2:  # layer-wise: this shard's segments
            weights = weights[:, slice(*self.task_vectors.segments)]
        tv = self.task_vectors
        return concrete_merge(
            tv.base, tv.vectors, logits, weights, self.offsets, seed=self.seed, step=step, start=self.span[0],
            temperature=self.temperature, mask=mask, rescale=self.rescale, backend=self.backend,
        )

    def merged_flat(
        self, *, step: int, mask: str, train_logits: bool = False, train_coefficients: bool = False
    ) -> torch.Tensor:
        """The whole merged flat parameters `[D]` for the mask sample `step`: differentiable in what is trained in
        one process; across ranks the gathered values only (differentiate `merged_shard` there)."""
        return self.gather(self.merged_shard(step=step, mask=mask, train_logits=train_logits,
                                             train_coefficients=train_coefficients))

    def mask(self, *, step: int, mask: str) -> torch.Tensor:
        """The whole mask `m` `[D]` (before rescaling) that `merged_flat` applies for the same `step` and `mask`."""
        return self.gather(sample_concrete_mask(
            self.logits.detach(), seed=self.seed, step=step, temperature=self.temperature, mask=mask,
            start=self.span[0], backend=self.backend,
        ))

    def bind(self, flat: torch.Tensor, grad: torch.Tensor | None = None) -> ModelCall:
        """`call(*args, **kwargs)`: the model run on `flat` (views by name) plus the carried buffers.

        With `grad` (a zeroed `[D]` buffer), every tensor is a leaf of its own over its slice of `flat`, whose
        `.grad` is the matching slice of `grad`, so backward accumulates in place into `grad`. (Through
        slices of one flat leaf, autograd would build a `[D]`-sized gradient for every tensor instead.)
        """
        tensors = self.task_vectors.state_dict(flat)
        if grad is not None:
            for name, grad_view in self.task_vectors.layout.unflatten(grad).items():
                leaf = tensors[name].detach().requires_grad_()
                leaf.grad = grad_view
                tensors[name] = leaf

        def call(*args, **kwargs):
            return torch.func.functional_call(self.model, tensors, args, kwargs)

        return call

    def check_tasks(self, tasks: Sequence[Task]) -> None:
        """Raise unless there is exactly one task per task vector, matched by name."""
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {names}")
        if sorted(names) != sorted(self.task_vectors.names):
            raise ValueError(
                f"tasks {sorted(names)} do not match the task vectors {sorted(self.task_vectors.names)}: "
                "each task vector needs the task of the same name"
            )

    def export_state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """An independent copy of the merged model's tensors in their original dtypes, on the CPU, ready to save."""
        layout = self.task_vectors.layout
        out = {
            name: view.detach().to(device="cpu", dtype=dtype, copy=True)
            for (name, view), dtype in zip(layout.unflatten(flat).items(), layout.dtypes)
        }
        out.update({name: t.detach().to("cpu", copy=True) for name, t in self.task_vectors.carried.items()})
        return out
