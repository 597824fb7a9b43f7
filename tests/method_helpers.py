"""Small random models for the per-method tests, and a norm-wise relative comparison with float64 references."""

from __future__ import annotations

import torch

# a Linear weight and bias, an embedding, a LayerNorm, a conv kernel and a scalar: every kind of tensor the
# references treat differently
SHAPES = {"attn.weight": (6, 9), "attn.bias": (6,), "emb.weight": (10, 4), "norm.weight": (9,),
          "conv.weight": (3, 2, 2, 2), "scale": ()}


def random_models(n: int, seed: int = 0, scale: float = 0.1, shapes: dict = SHAPES, base_scale: float = 1.0):
    """A base and n fine-tuned state dicts (base + scale * noise), float32, plus an integer buffer.

    With `base_scale=0` the base is zero and a merge's output is its merged task vector, which a comparison
    then checks to full relative precision (a base much larger than the task vectors would round them away)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: base_scale * torch.randn(s, generator=g) for k, s in shapes.items()}
    base["ids"] = torch.arange(4)
    fts = []
    for _ in range(n):
        ft = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "ids"}
        ft["ids"] = base["ids"].clone()
        fts.append(ft)
    return base, fts


def task_vectors(base: dict, fts: list[dict], key: str) -> list[torch.Tensor]:
    """float64 task vectors of tensor `key`."""
    return [ft[key].double() - base[key].double() for ft in fts]


def assert_relative(merged: dict, expected: dict, tol: float = 1e-6, inputs: list[dict] = ()) -> None:
    """Every expected tensor matched to `tol` relative, in norm. Where the result cancels (e.g. to 0), the
    error is relative to the largest norm of that tensor in `inputs`, the scale of its rounding."""
    for key, want in expected.items():
        got = merged[key].double()
        assert got.shape == want.shape, key
        err = float((got - want.double()).norm())
        scale = max([float(want.double().norm())] + [float(sd[key].double().norm()) for sd in inputs])
        assert err <= tol * scale + 1e-12, f"{key}: relative error {err / max(scale, 1e-300):.3g}"
