"""The device option for the merges that need data: statistics collection, the data-aware merges (Fisher, RegMean,
MaTS, ESM, ESM++) and regmean++ compute on the requested device; with `device="cpu"` given explicitly they equal
the default exactly. The meta device stands in for a GPU: `MetaStandIn` lets a whole collection or merge run
there (values read back to the host come back as zeros) and records every floating-point computation that ran
on the CPU instead, which a tensor created without `device=` or never moved would show."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import pyfuse
from pyfuse import stats as stats_module
from pyfuse.engine import plan as plan_module
from pyfuse.methods import regmean_plusplus as regmean_plusplus_module
from pyfuse.methods.regmean import least_norm_solve
from pyfuse.stats import Statistics, collect_statistics

from .test_method_regmean_plusplus import batches as image_batches
from .test_method_regmean_plusplus import family, pooled

META = torch.device("meta")
# data movement and views: reading inputs on the host and sending them over, not computing
MOVES = {"detach", "view", "slice", "lift_fresh", "empty", "copy_", "_to_copy", "alias", "_unsafe_view", "clone",
         "t", "transpose", "permute", "expand", "select", "unsqueeze", "squeeze", "_reshape_alias"}


class MetaStandIn(TorchDispatchMode):
    """Runs code on the meta device as if it were a GPU. `.item()` of a meta tensor gives False, 0 (integers:
    a solver's status, success) or 1.0 (floating: a norm, positive) and a copy of one to
    the CPU gives zeros (counted in `fetched`), so the code runs through; `computed_on_cpu` names every op that
    produced a floating CPU tensor of `min_numel` or more entries without being a move or a view."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.computed_on_cpu: collections.Counter[str] = collections.Counter()
        self.on_meta: collections.Counter[str] = collections.Counter()
        self.fetched = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves((args, kwargs))):
            self.on_meta[name] += 1
            if name == "_local_scalar_dense":
                return False if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 0
            if name == "_to_copy" and kwargs.get("device") == torch.device("cpu"):
                self.fetched += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        if name not in MOVES and any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point()
                                     and t.numel() >= self.min_numel for t in pytree.tree_leaves(out)):
            self.computed_on_cpu[name] += 1
        return out


# ---------------------------------------------------------------------------------------------
# Statistics collection
# ---------------------------------------------------------------------------------------------
def _classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, generator=g) for _ in range(3)]


def _labels(batch: torch.Tensor) -> torch.Tensor:
    return (batch.sum(1) > 0).long()


KINDS = ("gram_in", "gram_out", "fisher", "acts")


@pytest.mark.parametrize("labels", ["sampled", "gold"])
def test_statistics_on_the_explicit_cpu_device_equal_the_default(labels):
    default = collect_statistics(_classifier(), _batches(), kinds=KINDS, labels=labels, label_fn=_labels,
                                 max_rows=5, progress=False)
    model = _classifier()
    explicit = collect_statistics(model, _batches(), kinds=KINDS, labels=labels, label_fn=_labels, max_rows=5,
                                  progress=False, device="cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert explicit.metadata == default.metadata
    for kind in KINDS:
        assert explicit.names(kind) == default.names(kind) and explicit.names(kind)
        for name in default.names(kind):
            assert torch.equal(explicit.get(kind, name), default.get(kind, name)), (kind, name)


def test_statistics_are_collected_on_the_requested_device(monkeypatch):
    """The model and every batch go to the device, the sums accumulate there, and each finished statistic comes
    back to the CPU once (zeros here: the meta device holds no values)."""
    monkeypatch.setattr(stats_module, "resolve_device", torch.device)  # meta is refused to users
    seen = []

    def logits(call, batch):
        seen.append(batch.device)
        return call(batch)

    model, batches = _classifier(), _batches()
    with MetaStandIn(min_numel=4) as mode:
        result = collect_statistics(model, batches, logits, kinds=KINDS, labels="gold", label_fn=_labels,
                                    max_rows=5, progress=False, device="meta")
    assert {p.device for p in model.parameters()} == {META}
    assert seen == [META] * 3
    # the keys that pick the kept rows of "acts" are drawn on the CPU, so every device keeps the same rows
    assert set(mode.computed_on_cpu) <= {"rand"}, dict(mode.computed_on_cpu)
    assert {"mm", "addmm"} & set(mode.on_meta) and "pow" in mode.on_meta or "mul" in mode.on_meta
    count = sum(len(result.names(kind)) for kind in KINDS)
    assert count == 2 * 3 + 4  # gram_in, gram_out, acts per Linear; a Fisher per parameter
    assert {result.get(kind, name).device for kind in KINDS for name in result.names(kind)} == {torch.device("cpu")}
    assert mode.fetched >= count


def test_a_statistics_view_hands_its_tensors_out_on_its_device():
    st = Statistics({"gram_in/w": torch.eye(2)}, task="t", examples=1, tokens=1)
    view = st.to("meta")
    assert view.get("gram_in", "w").is_meta and view.device == META
    assert st.get("gram_in", "w").device.type == "cpu" and st.device is None  # the original is unchanged
    assert view.names("gram_in") == ["w"] and view.shape("gram_in", "w") == (2, 2)


# ---------------------------------------------------------------------------------------------
# Data-aware merges
# ---------------------------------------------------------------------------------------------
def _problem():
    g = torch.Generator().manual_seed(0)
    base = {"l.weight": torch.randn(4, 3, generator=g), "l.bias": torch.randn(4, generator=g),
            "steps": torch.tensor([3])}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(2)]

    def gram(rows, cols):
        x = torch.randn(rows, cols, generator=g)
        return x.T @ x / rows

    statistics = [Statistics({"fisher/l.weight": torch.rand(4, 3, generator=g),
                              "fisher/l.bias": torch.rand(4, generator=g),
                              "gram_in/l.weight": gram(5, 3), "gram_out/l.weight": gram(5, 4),
                              "acts/l.weight": torch.randn(6, 3, generator=g)}, task=f"t{i}", examples=5, tokens=5)
                  for i in range(2)]
    return base, models, statistics


METHODS = {"fisher": ({"normalize": "l2"}, "add_"), "regmean": ({}, "linalg_cholesky_ex"),
           "mats": ({"objective": "kfac", "iterations": 5}, "mm"), "esm": ({}, "_linalg_svd"),
           "esm++": ({"rank": 2}, "_linalg_svd")}


@pytest.mark.parametrize("method", METHODS)
def test_a_data_aware_merge_on_the_explicit_cpu_device_equals_the_default(method):
    base, models, statistics = _problem()
    params = METHODS[method][0]
    default = pyfuse.merge(method, base, models, statistics=statistics, **params)
    explicit = pyfuse.merge(method, base, models, statistics=statistics, device="cpu", **params)
    assert explicit.keys() == default.keys()
    for key in default:
        assert explicit[key].device.type == "cpu" and torch.equal(explicit[key], default[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_a_data_aware_merge_computes_on_the_requested_device(method, monkeypatch):
    """Inputs and statistics are read onto the device one tensor at a time, the merge's arithmetic (and its solve)
    runs there, and each merged tensor comes back to the CPU."""
    monkeypatch.setattr(plan_module, "resolve_device", torch.device)
    base, models, statistics = _problem()
    params, solve = METHODS[method]
    plan = plan_module.plan_merge(method, base, models, statistics=statistics, device="meta", **params)
    with MetaStandIn(min_numel=3) as mode:  # larger than the table of per-model weights
        merged = plan.state_dict()
    assert not mode.computed_on_cpu, dict(mode.computed_on_cpu)
    assert solve in mode.on_meta
    assert mode.fetched >= 2, "both floating tensors came back from the device"
    assert merged.keys() == base.keys() and {value.device.type for value in merged.values()} == {"cpu"}


def test_the_least_norm_solve_off_the_cpu_agrees_with_lapacks():
    """Off the CPU a singular RegMean system is solved through the pseudo-inverse of its eigendecomposition
    (CUDA's lstsq assumes full rank); it agrees with LAPACK's SVD-based gelsd used on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # a feature no example activates: rank 4 of 6, and Cholesky fails
    lhs = x.T @ x
    rhs = torch.randn(6, 3, generator=g, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(lhs).info) != 0
    solution = least_norm_solve(lhs, rhs)
    torch.testing.assert_close(solution, torch.linalg.pinv(lhs, hermitian=True) @ rhs, rtol=1e-9, atol=1e-12)
    null = torch.linalg.eigh(lhs).eigenvectors[:, :2]  # the two zero eigenvalues come first
    assert float((null.T @ solution).abs().max()) < 1e-9, "the least-norm solution has no null-space component"


# ---------------------------------------------------------------------------------------------
# regmean++: the model, block by block, on the device
# ---------------------------------------------------------------------------------------------
def _clip_tasks(n: int = 2) -> list[pyfuse.Task]:
    return [pyfuse.Task(f"t{i}", image_batches(10 + i, count=2), pooled) for i in range(n)]


def test_regmean_plusplus_on_the_explicit_cpu_device_equals_the_default():
    base, fts = family(2)
    default = pyfuse.merge("regmean++", base, fts, tasks=_clip_tasks(), alpha=0.5)
    explicit = pyfuse.merge("regmean++", base, fts, tasks=_clip_tasks(), alpha=0.5, device="cpu")
    assert explicit.keys() == default.keys()
    assert all(explicit[k].device.type == "cpu" and torch.equal(explicit[k], default[k]) for k in default)


def test_regmean_plusplus_runs_the_model_and_solves_on_the_requested_device(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_device", torch.device)
    monkeypatch.setattr(regmean_plusplus_module, "resolve_device", torch.device)
    base, fts = family(2)
    seen = []

    def recording(call, images):
        seen.append(images.device)
        return pooled(call, images)

    tasks = [pyfuse.Task(t.name, t.batches, recording) for t in _clip_tasks()]
    plan = plan_module.plan_merge("regmean++", base, fts, tasks=tasks, device="meta")
    with MetaStandIn(min_numel=8) as mode:
        merged = plan.state_dict()
    assert not mode.computed_on_cpu, dict(mode.computed_on_cpu)
    assert seen and set(seen) == {META}, "every batch the tasks ran went to the device"
    assert "linalg_cholesky_ex" in mode.on_meta and "mm" in mode.on_meta
    assert mode.fetched >= len(base.state_dict()), "each merged tensor came back from the device"
    assert {value.device.type for value in merged.values()} == {"cpu"}
    assert {p.device.type for p in base.parameters()} == {"cpu"}, "the caller's model stays where it is"
