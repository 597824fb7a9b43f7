"""The Concrete methods over other methods' per-task vectors (`vectors: raw | ties | tsv`, `concrete_tsvm`),
against float64 re-derivations: TSV-M's per-task vectors as fusion_bench's Concrete TSV-M builds them, TIES'
trimmed vectors from the TIES oracle, and the loop's merge under the mask through the same fused op."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pyfuse
from pyfuse.adaptive import EVAL_STEP, RunOptions
from pyfuse.methods import create_method
from pyfuse.methods.vector_sources import tsv_vectors

from .adaptive_helpers import digits_problem, digits_task
from .method_helpers import SHAPES, random_models
from .oracle import ties_select
from .test_adaptive_loop import SEED, _mask64, _merge64
from .test_adaptive_resume import Interrupting

QUIET = RunOptions(progress=False, backend="reference")
MATRICES = {**SHAPES, "tall.weight": (12, 5), "wide.weight": (4, 15), "big.weight": (16, 24)}


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gram)
    return (vectors / values.sqrt()) @ vectors.T


def ref_task_parts(tau: torch.Tensor) -> torch.Tensor:
    """TSV-M's per-task parts of one matrix's task vectors `tau` [T, m, p], float64, by another route than pyfuse's:
    task i keeps its r = floor(k / T) leading singular triplets; the T r kept left vectors A [m, T r] and right
    vectors B [T r, p] are replaced by their nearest orthonormal factors A (A^T A)^-1/2 and (B B^T)^-1/2 B (the
    polar factors, by eigendecomposition; the zero columns beyond T r that fusion_bench stacks do not reach the
    parts), and task i's part is its block of those factors around its own singular values."""
    tasks, m, p = tau.shape
    k = min(m, p)
    r = int(k * (1 / tasks))  # fusion_bench: int(s.shape[0] * (1 / num_tasks)), the float product
    if r == 0:
        return torch.zeros_like(tau)
    lefts, values, rights = [], [], []
    for t in tau:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        lefts.append(u[:, :r])
        values.append(s[:r])
        rights.append(vh[:r])
    a, b = torch.cat(lefts, 1), torch.cat(rights, 0)
    a_orth, b_orth = a @ _inverse_sqrt(a.T @ a), _inverse_sqrt(b @ b.T) @ b
    blocks = [slice(i * r, (i + 1) * r) for i in range(tasks)]
    return torch.stack([a_orth[:, blk] @ torch.diag(values[i]) @ b_orth[blk] for i, blk in enumerate(blocks)])


def ref_tsv_vectors(tv: pyfuse.TaskVectors, exclude_keys=()) -> torch.Tensor:
    """The per-task vectors fusion_bench's Concrete TSV-M merges ([n, D], float64): `TaskSingularVectorMerging` with
    `return_single_task_models` gives each task base + its part on every matrix and base + the mean task vector
    on every other tensor (and on `exclude_keys`); `TaskWiseMergedModel` subtracts the base again."""
    out = torch.empty(tv.n, tv.layout.numel, dtype=torch.float64)
    for index, (name, shape) in enumerate(zip(tv.layout.names, tv.layout.shapes)):
        start, end = tv.layout.span(index)
        tau = tv.vectors[:, start:end].double()
        if len(shape) == 2 and name not in exclude_keys:
            out[:, start:end] = ref_task_parts(tau.view(tv.n, *shape)).reshape(tv.n, -1)
        else:
            out[:, start:end] = tau.mean(0)
    return out


def _relative(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    err, scale = float((got.double() - want).norm()), float(want.norm())
    assert err <= tol * scale + 1e-12, f"relative error {err / max(scale, 1e-300):.3g}"


@pytest.mark.parametrize("n", [2, 3, 8])  # 8 tasks: r = 0 but on the 16-row matrix (r = 2); T r < k on some
def test_tsv_vectors_are_fusion_bench_single_task_vectors(n):
    base, fts = random_models(n, shapes=MATRICES, base_scale=0)
    tv = pyfuse.TaskVectors.from_models(base, fts)
    original = tv.vectors.clone()
    for exclude in ((), ("emb.weight",)):
        got = tsv_vectors(tv, exclude)
        assert got.dtype == torch.float32 and torch.equal(tv.vectors, original)
        want = ref_tsv_vectors(tv, exclude)
        for index in range(len(tv.layout)):  # tensor by tensor, each to its own scale
            start, end = tv.layout.span(index)
            _relative(got[:, start:end], want[:, start:end])
    # per matrix the parts sum to the TSV-M merge (the static `tsv` at scaling 1)
    merged = pyfuse.merge("tsv", base, fts, dtype="float32")
    parts = tsv_vectors(tv).sum(0)
    for index, (name, shape) in enumerate(zip(tv.layout.names, tv.layout.shapes)):
        if len(shape) == 2:
            start, end = tv.layout.span(index)
            torch.testing.assert_close(parts[start:end].view(shape), merged[name] - base[name], rtol=1e-5, atol=1e-6)


def _with(tv: pyfuse.TaskVectors, vectors: torch.Tensor) -> pyfuse.TaskVectors:
    return dataclasses.replace(tv, vectors=vectors)


@pytest.mark.parametrize("method, params, scale", [
    ("concrete_tsvm", {}, 1.0),
    ("concrete_task_arithmetic", {"vectors": "tsv", "scale": 0.5}, 0.5),
    ("concrete_task_arithmetic", {"vectors": "ties", "density": 0.3}, 0.3),
    ("concrete_task_arithmetic", {"vectors": "ties"}, 0.3),  # density: AdaMerging++'s 0.2
])
def test_concrete_ta_at_zero_lr_merges_the_source_vectors_under_the_mask(method, params, scale):
    model, tv, tasks = digits_problem()
    result = getattr(pyfuse, method)(model, tv, tasks, steps=2, mask_lr=0.0, seed=SEED, options=QUIET, **params)
    source = params.get("vectors", "tsv")
    density = params.get("density", 0.2)
    reference = ref_tsv_vectors(tv) if source == "tsv" else ties_select(tv.vectors.double(), density)[0]
    mask = _mask64(torch.zeros(tv.layout.numel, dtype=torch.float64), EVAL_STEP, "relaxed")
    expected = _merge64(_with(tv, reference), mask, torch.full((tv.n,), scale, dtype=torch.float64))
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)
    raw = _merge64(tv, mask, torch.full((tv.n,), scale, dtype=torch.float64))
    assert (result.flat.double() - raw).abs().max() > 1e-3  # not the raw vectors' merge
    settings = result.report["settings"]
    assert settings["vectors"] == source and settings["density"] == (density if source == "ties" else None)


@pytest.mark.parametrize("source", ["tsv", "ties"])
def test_concrete_adamerging_learns_its_coefficients_over_the_source_vectors(source):
    model, tv, tasks = digits_problem()
    result = pyfuse.concrete_adamerging(model, tv, tasks, vectors=source, granularity="layer", meta_steps=1,
                                        adamerging_steps=2, mask_lr=0.0, lr=0.05, seed=SEED, options=QUIET)
    reference = ref_tsv_vectors(tv) if source == "tsv" else ties_select(tv.vectors.double(), 0.2)[0]
    mask = _mask64(torch.zeros(tv.layout.numel, dtype=torch.float64), EVAL_STEP, "relaxed")
    coefficients = result.coefficients.double()
    assert coefficients.shape == (tv.n, len(tv.layout)) and (coefficients - 0.3).abs().max() > 1e-2
    torch.testing.assert_close(result.flat.double(), _merge64(_with(tv, reference), mask, coefficients),
                               rtol=1e-5, atol=1e-6)


def test_vector_source_parameters_are_checked_before_any_work():
    for method in ("concrete_task_arithmetic", "concrete_adamerging"):
        assert create_method(method).loads_shard and create_method(method).settings().vectors == "raw"
        assert not create_method(method, vectors="tsv").loads_shard
        with pytest.raises(ValueError, match=f"{method}: vectors must be one of 'raw', 'ties', 'tsv', got 'dare'"):
            create_method(method, vectors="dare")
        with pytest.raises(ValueError, match=f"{method}: density applies to vectors='ties' only, not 'raw'"):
            create_method(method, density=0.5)
        with pytest.raises(ValueError, match=f"{method}: exclude_keys applies to vectors='tsv' only, not 'ties'"):
            create_method(method, vectors="ties", exclude_keys=["0.weight"])
    assert not create_method("adamerging++").loads_shard and create_method("concrete_tsvm").settings().init == 1.0
    assert create_method("concrete_tsvm").settings().vectors == "tsv"
    with pytest.raises(ValueError, match="concrete_tsvm: unknown parameter 'vectors'"):
        create_method("concrete_tsvm", vectors="raw")
    model, tv, tasks = digits_problem()
    with pytest.raises(ValueError, match="concrete_tsvm: exclude_keys names 'head', which is not a floating tensor"):
        pyfuse.concrete_tsvm(model, tv, tasks, steps=1, exclude_keys=["head"], options=QUIET)
    with pytest.raises(ValueError, match=r"concrete_adamerging \(its ties vectors are computed over the whole model\) "
                                         r"needs the whole task vectors"):
        pyfuse.concrete_adamerging(model, tv.sharded(0, 2), tasks, vectors="ties", options=QUIET)


def test_exclude_keys_give_the_mean_task_vector_in_the_loop():
    model, tv, tasks = digits_problem()
    result = pyfuse.concrete_tsvm(model, tv, tasks, steps=1, mask_lr=0.0, seed=SEED, exclude_keys=["2.weight"],
                                  options=QUIET)
    mask = _mask64(torch.zeros(tv.layout.numel, dtype=torch.float64), EVAL_STEP, "relaxed")
    expected = _merge64(_with(tv, ref_tsv_vectors(tv, ("2.weight",))), mask, torch.ones(tv.n, dtype=torch.float64))
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)
    assert list(result.report["settings"]["exclude_keys"]) == ["2.weight"]


def _checkpointed(out_dir, *, resume=False, interrupt=False, **params):
    """A 3-step Concrete TA run checkpointed every step; `interrupt`: stopped while drawing step 3's batches."""
    model, tv, tasks = digits_problem()
    if interrupt:  # one batch per task and step: the third draw interrupts step 3
        tasks[0] = digits_task(tasks[0].name, batches=Interrupting(list(tasks[0].batches), 3))
    options = RunOptions(out_dir=out_dir, resume=resume, checkpoint_every=1, progress=False, backend="reference")
    return pyfuse.concrete_task_arithmetic(model, tv, tasks, steps=3, mask_lr=0.05, seed=SEED, options=options,
                                           **params)


def test_a_checkpoint_resumes_only_over_the_same_vectors(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _checkpointed(tmp_path / "tsv", interrupt=True, vectors="tsv")
    with pytest.raises(ValueError, match=r"settings\.vectors \(this run 'ties', checkpoint 'tsv'\)"):
        _checkpointed(tmp_path / "tsv", resume=True, vectors="ties")
    resumed = _checkpointed(tmp_path / "tsv", resume=True, vectors="tsv")
    assert resumed.report["resumed_from"] == 2
    assert torch.equal(resumed.flat, _checkpointed(tmp_path / "full", vectors="tsv").flat)
