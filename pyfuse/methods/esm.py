"""ESM and ESM++: Essential Subspace Merging, static and routed (docs/data-aware-methods.md).

Essential Subspace Decomposition (ESD) of a Linear layer's update `dW_t` (`[out, in]`) for task t: the
activation shift `dO_t = X_t dW_t^T` on sampled layer inputs `X_t` (`[m, in]`); its uncentered PCA by SVD,
`dO_t = U diag(s) V^T`, gives the principal output directions `P_t = V[:, :k]` with eigenvalues `s^2`
(up to the 1/m of a covariance, which no ratio below sees); `A_t = P_t^T dW_t`, so `P_t A_t` is `dW_t`
projected on the output subspace its activation shift lives in, and reproduces `dO_t` exactly at full rank.

ESM merges one Linear layer from its T tasks' decompositions, `k = floor(d_out / T)` components each:
1. component weighting: row j of `A_t` times `(lambda_j / mean_kept lambda)^exponent` (exponent 0.15);
2. task-level norm (our reading of the summary, which names the scalings without defining them):
   each task's weighted `A_t` rescaled to the Frobenius norm of its unweighted `A_t`, so the weighting only
   moves emphasis between a task's components and does not change how much the task weighs;
3. concatenation `P = [P_1 .. P_T]` (`[out, T k]`), `A = [A_1; ..; A_T]` (`[T k, in]`), each orthogonalised
   by polar decomposition, `U S V^T -> U V^T * mean(S)`, and `dW = P A`;
4. dimension-level norm (our reading): each output row of `dW` rescaled to the norm of that row in the
   plain sum `sum_t P_t A_t`, so orthogonalisation decorrelates the tasks without moving energy between
   output dimensions;
5. layer-level norm (our reading): `dW` rescaled to the mean of the tasks' `||dW_t||_F` at this layer, so
   every layer's update is as large as a typical task's and one global alpha fits all layers.
Each scaling can be switched off. Other 2-D weights are merged TSV-style (per task, the top
`floor(min(out, in) / T)` singular triplets; the concatenated left and right singular vectors orthogonalised
by polar decomposition without rescaling; `dW = U_o diag(S) V_o^T`), everything else (biases, norms) by the
mean task vector. The merge is `W = W_0 + alpha * dW` for every tensor, alpha fixed or found by ternary
search on a validation objective given from Python.

ESM++ keeps, per Linear layer with activations and per task, the residual `W_t - W_esm` as a rank-r expert
(truncated SVD; the bias residual in full) and a prototype, the mean of the task's sampled layer inputs.
`RoutedLinear` routes each input (dim 0 is the batch; the other leading dims are pooled by their mean) to
the expert whose prototype is most cosine-similar to its mean-pooled input and adds that expert's output
to the merged layer's. Experts are saved to and loaded from safetensors, and `install_routed_experts`
rebuilds the routed model from the base architecture with the ESM weights loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_path
from ..layout import FlatLayout
from ..progress import progress_bar
from ..stats import Statistics
from .base import Param, boolean, integer, number, numbers, register
from .data_aware import DataMethod

__all__ = [
    "ESM", "ESMPlusPlus", "EssentialSubspace", "LayerExperts", "RoutedLinear", "esm_delta",
    "essential_subspace", "install_routed_experts", "load_experts", "polar", "save_experts", "ternary_search",
    "tsv_delta",
]

logger = logging.getLogger(__name__)

EXPERTS_FORMAT = "pyfuse.esm++.experts"


# ---------------------------------------------------------------------------------------------
# The math, as pure tensor functions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EssentialSubspace:
    """ESD of one task's update of one Linear layer: `delta ~ basis @ components`."""

    basis: torch.Tensor  # P [out, k]: orthonormal principal output directions of the activation shift
    components: torch.Tensor  # A = P^T delta [k, in]
    energies: torch.Tensor  # [k]: squared singular values of the activation shift, descending


def essential_subspace(delta: torch.Tensor, acts: torch.Tensor, k: int | None = None) -> EssentialSubspace:
    """The ESD of `delta` (`[out, in]`) on inputs `acts` (`[m, in]`), keeping the top `k` components
    (all `min(m, out)` by default; fewer if the shift has fewer)."""
    shift = acts @ delta.T  # [m, out]
    _, s, vh = torch.linalg.svd(shift, full_matrices=False)
    k = s.numel() if k is None else min(k, s.numel())
    basis = vh[:k].T
    return EssentialSubspace(basis, basis.T @ delta, s[:k] ** 2)


def polar(matrix: torch.Tensor, *, scale: bool = True) -> torch.Tensor:
    """The orthogonal polar factor `U V^T` of `matrix = U S V^T` (reduced SVD), times `mean(S)` if `scale`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    q = u @ vh
    return q * s.mean() if scale else q


def _rescale(x: torch.Tensor, target: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`x * target / current`, leaving x unchanged where `current` is 0 (nothing to rescale)."""
    return x * torch.where(current > 0, target / torch.where(current > 0, current, 1), 1)


def esm_delta(deltas: Sequence[torch.Tensor], acts: Sequence[torch.Tensor], *, exponent: float = 0.15,
              task_norm: bool = True, dimension_norm: bool = True, layer_norm: bool = True) -> torch.Tensor:
    """The ESM update `dW` of one Linear layer from the tasks' updates and sampled inputs (module docstring)."""
    out = deltas[0].shape[0]
    k = max(1, out // len(deltas))
    bases, parts = [], []
    for delta, x in zip(deltas, acts):
        esd = essential_subspace(delta, x, k)
        energy = esd.energies
        weights = (energy / energy.mean()) ** exponent if energy.mean() > 0 else torch.zeros_like(energy)
        weighted = weights[:, None] * esd.components
        if task_norm:
            weighted = _rescale(weighted, esd.components.norm(), weighted.norm())
        bases.append(esd.basis)
        parts.append(weighted)
    merged = polar(torch.cat(bases, dim=1)) @ polar(torch.cat(parts, dim=0))
    if dimension_norm:
        plain = sum(p @ a for p, a in zip(bases, parts))
        merged = _rescale(merged, plain.norm(dim=1, keepdim=True), merged.norm(dim=1, keepdim=True))
    if layer_norm:
        merged = _rescale(merged, torch.stack([d.norm() for d in deltas]).mean(), merged.norm())
    return merged


def tsv_delta(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-style merge of 2-D updates: per-task top singular triplets, concatenated singular vectors
    orthogonalised by polar decomposition (no rescaling), singular values kept."""
    rows, cols = deltas[0].shape
    k = max(1, min(rows, cols) // len(deltas))
    us, ss, vhs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u = polar(torch.cat(us, dim=1), scale=False)
    vh = polar(torch.cat(vhs, dim=0), scale=False)
    return (u * torch.cat(ss)) @ vh


def ternary_search(objective: Callable[[float], float], low: float, high: float,
                   steps: int) -> tuple[float, list[tuple[float, float]]]:
    """The minimiser of a unimodal `objective` on [low, high] by `steps` ternary-search steps, and every
    (point, value) evaluated; the answer is the best evaluated point, the final midpoint included."""
    seen: list[tuple[float, float]] = []

    def f(x: float) -> float:
        value = float(objective(x))
        seen.append((x, value))
        return value

    for _ in range(steps):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if f(a) <= f(b):
            high = b
        else:
            low = a
    f((low + high) / 2)
    return min(seen, key=lambda pv: pv[1])[0], seen


# ---------------------------------------------------------------------------------------------
# ESM++ experts and routing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerExperts:
    """The routed experts of one Linear layer, for T tasks: `delta_t = up[t] @ down[t]` (+ `bias[t]`)."""

    prototypes: torch.Tensor  # [T, in]: mean sampled layer input of each task
    down: torch.Tensor  # [T, r, in]
    up: torch.Tensor  # [T, out, r]
    bias: torch.Tensor | None = None  # [T, out]: the bias residuals, when the layer has a bias

    def __post_init__(self) -> None:
        t, d_in = self.prototypes.shape
        if self.down.dim() != 3 or self.down.shape[0] != t or self.down.shape[2] != d_in:
            raise ValueError(f"down has shape {list(self.down.shape)}, expected [{t}, r, {d_in}]")
        if self.up.dim() != 3 or self.up.shape[0] != t or self.up.shape[2] != self.down.shape[1]:
            raise ValueError(f"up has shape {list(self.up.shape)}, expected [{t}, out, {self.down.shape[1]}]")
        if self.bias is not None and self.bias.shape != (t, self.up.shape[1]):
            raise ValueError(f"bias has shape {list(self.bias.shape)}, expected [{t}, {self.up.shape[1]}]")


class RoutedLinear(nn.Linear):
    """A Linear layer (the merged weights, same parameter names) plus per-task low-rank experts; each input
    is routed to one expert by cosine similarity of its mean-pooled features to the task prototypes.

    The experts are non-persistent buffers, so the module's state dict is the plain Linear's.
    `last_route` holds the expert chosen for each input of the latest forward.
    """

    def __init__(self, linear: nn.Linear, experts: LayerExperts) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        if experts.prototypes.shape[1] != self.in_features or experts.up.shape[1] != self.out_features:
            raise ValueError(f"experts for [{experts.up.shape[1]}, {experts.prototypes.shape[1]}] do not fit a "
                             f"Linear of [{self.out_features}, {self.in_features}]")
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("prototypes", experts.prototypes.to(**like), persistent=False)
        self.register_buffer("down", experts.down.to(**like), persistent=False)
        self.register_buffer("up", experts.up.to(**like), persistent=False)
        self.register_buffer("expert_bias", None if experts.bias is None else experts.bias.to(**like),
                             persistent=False)
        self.last_route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        rows = x.reshape(1 if x.dim() == 1 else x.shape[0], -1, self.in_features)  # [batch, pooled, in]
        similarity = F.cosine_similarity(rows.mean(1)[:, None, :], self.prototypes[None], dim=-1)
        route = similarity.argmax(-1)
        self.last_route = route
        delta = (rows @ self.down[route].transpose(1, 2)) @ self.up[route].transpose(1, 2)
        if self.expert_bias is not None:
            delta = delta + self.expert_bias[route][:, None, :]
        return y + delta.reshape(y.shape)


def install_routed_experts(model: nn.Module, experts: Mapping[str, LayerExperts]) -> list[str]:
    """Replace each named `nn.Linear` of `model` by a `RoutedLinear` with its experts; returns the names.

    Every name, type and shape is checked before any module is replaced.
    """
    targets = {}
    for name, layer in experts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"experts for {name!r}, which the model does not have") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"experts for {name!r}, which is a {type(module).__name__}, not an nn.Linear")
        if layer.prototypes.shape[1] != module.in_features or layer.up.shape[1] != module.out_features:
            raise ValueError(f"experts for {name!r} are [{layer.up.shape[1]}, {layer.prototypes.shape[1]}], "
                             f"the layer is [{module.out_features}, {module.in_features}]")
        targets[name] = module
    for name, module in targets.items():
        parent, _, child = name.rpartition(".")
        # a RoutedLinear is a Linear too: installing again swaps its experts and keeps its weights
        setattr(model.get_submodule(parent) if parent else model, child, RoutedLinear(module, experts[name]))
    return list(targets)


def save_experts(path: str | os.PathLike, experts: Mapping[str, LayerExperts],
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the experts to one safetensors file, atomically; `metadata` (JSON-able) goes in its header."""
    tensors = {}
    for name, layer in experts.items():
        for field in ("prototypes", "down", "up", "bias"):
            value = getattr(layer, field)
            if value is not None:
                tensors[f"{name}.{field}"] = value.detach().cpu().contiguous()
    header = {"format": EXPERTS_FORMAT, "layers": json.dumps(sorted(experts)),
              "metadata": json.dumps(dict(metadata or {}))}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_experts(path: str | os.PathLike) -> dict[str, LayerExperts]:
    """The experts `save_experts` wrote to `path`, by layer name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experts file")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != EXPERTS_FORMAT:
            raise ValueError(f"{path}: not an ESM++ experts file (format {header.get('format')!r})")
        keys = set(f.keys())
        experts = {}
        for name in json.loads(header["layers"]):
            missing = [k for k in ("prototypes", "down", "up") if f"{name}.{k}" not in keys]
            if missing:
                raise ValueError(f"{path}: layer {name!r} lacks {', '.join(missing)}")
            fields = {k: f.get_tensor(f"{name}.{k}") for k in ("prototypes", "down", "up", "bias")
                      if f"{name}.{k}" in keys}
            try:
                experts[name] = LayerExperts(**fields)
            except ValueError as err:
                raise ValueError(f"{path}: layer {name!r}: {err}") from None
    return experts


# ---------------------------------------------------------------------------------------------
# The registered methods
# ---------------------------------------------------------------------------------------------
def _callable(value: Any) -> Callable[[dict[str, torch.Tensor]], float]:
    if not callable(value):
        raise TypeError(f"must be a callable taking the merged state dict and returning a float, got {value!r}")
    return value


def _interval(value: Any) -> tuple[float, float]:
    bounds = numbers(value)
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ValueError(f"must be [low, high] with low < high, got {value!r}")
    return bounds[0], bounds[1]


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"must be a file path, got {value!r}")
    return Path(value)


def _weight_module(name: str) -> str:
    return name.removesuffix(".weight")


@register
class ESM(DataMethod):
    """Static Essential Subspace Merging (module docstring): `W_0 + alpha * dW`, alpha fixed or searched."""

    name = "esm"
    display_name = "ESM"
    reference = "Essential Subspace Merging for Multi-Task Learning (from the paper's summary; no reference code)"
    summary = "essential subspace merging: activation-shift PCA per Linear, orthogonalised fusion"
    needs = ("acts",)
    params = {
        "alpha": Param(1.0, number(), "the scale on the merged update when no objective is given"),
        "objective": Param(None, _callable, "Python only: f(merged state dict) -> float to minimise; alpha is "
                                            "then ternary-searched in alpha_range"),
        "alpha_range": Param((0.0, 2.0), _interval, "[low, high] searched for alpha"),
        "search_steps": Param(8, integer(1, 101), "ternary-search steps (two objective calls each)"),
        "exponent": Param(0.15, number(0.0), "component weighting (lambda / mean lambda)^exponent"),
        "task_norm": Param(True, boolean, "rescale each task's weighted components to their unweighted norm"),
        "dimension_norm": Param(True, boolean, "rescale each output row to its norm in the plain sum"),
        "layer_norm": Param(True, boolean, "rescale each layer's update to the mean task-update norm"),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: dict[str, Any] = {}
        self.transposed: set[str] = set()

    def merge_model(self, base: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]],
                    stats: list[Statistics], *, progress: bool = False) -> dict[str, torch.Tensor]:
        """`W_0 + alpha * dW` (module docstring), on the CPU; `stats[t]` holds task t's sampled layer inputs
        ("acts"). The update and the candidates an objective sees are computed where the base's tensors are."""
        acts = self._check(base, finetuned, stats)
        deltas = self.deltas(base, finetuned, acts, progress)
        cfg = self.parameters
        if cfg["objective"] is None:
            alpha, evaluated = cfg["alpha"], []
        else:
            low, high = cfg["alpha_range"]
            alpha, evaluated = ternary_search(lambda a: cfg["objective"](self._apply(base, deltas, a)),
                                              low, high, cfg["search_steps"])
            logger.info("%s: alpha %.4g chosen by ternary search (%s)", self.name, alpha,
                        ", ".join(f"{a:.3g}: {v:.4g}" for a, v in evaluated))
        tsv = sorted(k for k, d in deltas.items() if d.dim() == 2 and k not in acts)
        self.result = {"alpha": alpha, "searched": evaluated, "esm": sorted(acts), "tsv": tsv}
        return {key: value.cpu() for key, value in self._apply(base, deltas, alpha).items()}

    def deltas(self, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
               acts: Mapping[str, list[torch.Tensor]], progress: bool = False) -> dict[str, torch.Tensor]:
        """The merged update `dW` (fp32) of every floating tensor."""
        cfg = self.parameters
        out = {}
        for name, b in progress_bar(base.items(), desc=self.name, unit="tensor", disable=not progress, leave=False):
            if not b.is_floating_point():
                continue
            task = [ft[name].float() - b.float() for ft in finetuned]
            if name in acts:
                flip = name in self.transposed  # Conv1D-style [in, out] storage: ESD works on [out, in]
                delta = esm_delta([t.T for t in task] if flip else task, [a.float().to(b.device) for a in acts[name]],
                                  exponent=cfg["exponent"], task_norm=cfg["task_norm"],
                                  dimension_norm=cfg["dimension_norm"], layer_norm=cfg["layer_norm"])
                out[name] = delta.T if flip else delta
            elif b.dim() == 2:
                out[name] = tsv_delta(task)
            else:
                out[name] = torch.stack(task).mean(0)
        return out

    def working_bytes(self, layout: FlatLayout, n: int) -> int:
        """`DataMethod`'s estimate plus the fp32 update of the whole model and, while alpha is searched, one
        candidate model more."""
        return super().working_bytes(layout, n) + 8 * layout.numel

    @staticmethod
    def _apply(base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor],
               alpha: float) -> dict[str, torch.Tensor]:
        return {k: (b.float() + alpha * deltas[k]).to(b.dtype) if k in deltas else b.detach().clone()
                for k, b in base.items()}

    def _check(self, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
               stats: Sequence[Statistics]) -> dict[str, list[torch.Tensor]]:
        """`DataMethod.check` (before any arithmetic), then each Linear weight's sampled inputs, per task;
        the weights stored `[in, out]` (Conv1D) go to `self.transposed`."""
        self.check(base, finetuned, stats)
        names = stats[0].names("acts")  # check() made every model cover the same names
        self.transposed = {name for name in names if name in stats[0].transposed}
        return {name: [st.get("acts", name) for st in stats] for name in names}


@register
class ESMPlusPlus(ESM):
    """ESM++: the ESM model plus, per Linear with activations, per-task rank-r residual experts routed by
    prototype similarity (module docstring). `self.experts` holds them after a merge."""

    name = "esm++"
    display_name = "ESM++"
    summary = "ESM plus per-task low-rank residual experts, routed by prototype similarity"
    params = {
        **ESM.params,
        "rank": Param(16, integer(1, 1 << 16), "rank r of each task's residual expert"),
        "experts_path": Param(None, _path, "write the experts here (safetensors), if given", path=True),
    }

    def merge_model(self, base: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]],
                    stats: list[Statistics], *, progress: bool = False) -> dict[str, torch.Tensor]:
        """The ESM state dict; the experts go to `self.experts` (and to `experts_path` if given)."""
        merged = super().merge_model(base, finetuned, stats, progress=progress)
        rank = self.parameters["rank"]
        self.experts = {}
        for name in self.result["esm"]:
            if name in self.transposed:
                logger.warning("%s: %s is stored [in, out] (Conv1D); RoutedLinear needs nn.Linear, so it gets no "
                               "experts", self.name, name)
                continue
            downs, ups, biases = [], [], []
            bias_name = name.removesuffix("weight") + "bias"
            for ft in finetuned:
                residual = ft[name].float() - merged[name].to(ft[name].device).float()
                u, s, vh = torch.linalg.svd(residual, full_matrices=False)
                r = min(rank, s.numel())
                downs.append(F.pad(vh[:r], (0, 0, 0, rank - r)))  # zero rows keep every expert [rank, in]
                ups.append(F.pad(u[:, :r] * s[:r], (0, rank - r)))
                if bias_name in base and base[bias_name].is_floating_point():
                    biases.append(ft[bias_name].float() - merged[bias_name].to(ft[bias_name].device).float())
            prototypes = torch.stack([st.get("acts", name).float().mean(0) for st in stats])
            self.experts[_weight_module(name)] = LayerExperts(  # on the CPU, like the merged model
                prototypes.cpu(), torch.stack(downs).cpu(), torch.stack(ups).cpu(),
                torch.stack(biases).cpu() if biases else None)
        if self.parameters["experts_path"] is not None:
            save_experts(self.parameters["experts_path"], self.experts, {"rank": rank, "tasks": len(finetuned)})
            logger.info("%s: wrote %d layers of experts to %s", self.name, len(self.experts),
                        self.parameters["experts_path"])
        self.result["experts"] = {"layers": len(self.experts), "rank": rank}
        return merged

