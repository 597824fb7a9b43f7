"""model_stock against float64 transliterations of fusion_bench's ModelStock and mergekit's model_stock."""

import math

import numpy as np
import pytest
import torch

import pyfuse

from .method_helpers import SHAPES, assert_relative, random_models

EPS = 1e-8


def ref_fusion_bench(base, fts, ignore_keys=()):
    """fusion_bench's ModelStock.run on state dicts, in float64 (angles via degrees, as it does)."""
    n = len(fts)
    sds = [{k: ft[k].double() for k in SHAPES} for ft in fts]
    w0 = {k: base[k].double() for k in SHAPES}
    angles = {}
    for i in range(n):
        for j in range(i + 1, n):
            for k in SHAPES:
                if k in ignore_keys:
                    continue
                v1, v2 = sds[i][k] - w0[k], sds[j][k] - w0[k]
                cos = torch.sum(v1 * v2) / (math.sqrt(torch.sum(v1**2) * torch.sum(v2**2)) + EPS)
                cos = torch.clamp(cos, -1.0, 1.0)
                angles.setdefault(k, []).append(np.rad2deg(torch.acos(cos).item()))
    out = {}
    for k in SHAPES:
        avg = sum(sd[k] for sd in sds) / n
        if k in angles:
            angle = np.deg2rad(sum(angles[k]) / len(angles[k]))
            r = n * np.cos(angle) / ((n - 1) * np.cos(angle) + 1 + EPS)
            out[k] = avg * r + w0[k] * (1.0 - r)
        else:
            out[k] = avg
    return out


def ref_mergekit(base, fts, filter_wise=False):
    """mergekit's ModelStockMergeTask.execute per tensor, in float64."""
    out = {}
    for k in SHAPES:
        w_0 = base[k].double()
        ws = [ft[k].double() for ft in fts]
        out_shape = w_0.shape
        if filter_wise:
            if w_0.dim() == 1:
                w_0 = w_0.unsqueeze(0)
                ws = [w.unsqueeze(0) for w in ws]
        else:
            w_0 = w_0.view(-1)
            ws = [w.view(-1) for w in ws]
        offsets = [w - w_0 for w in ws]
        cos_thetas = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        N = len(ws)
        t = (N * cos_theta) / (1 + (N - 1) * cos_theta)
        w_avg = sum(ws) / len(ws)
        out[k] = (t * w_avg + (1 - t) * w_0).reshape(out_shape)
    return out


def _models(n, corners):
    base, fts = random_models(n, scale=0.3, base_scale=0)
    # correlated task vectors (a shared component), so that t is well inside (0, 1)
    shared_base, (shared_ft,) = random_models(1, seed=7, scale=0.3)
    for ft in fts:
        for k in SHAPES:
            ft[k] = ft[k] + (shared_ft[k] - shared_base[k])
    if corners:
        for ft in fts:
            ft["attn.bias"] = base["attn.bias"].clone()  # every task vector zero: cos = 0, t = 0, the base
        fts[0]["norm.weight"] = base["norm.weight"].clone()  # one zero task vector
        fts[1]["emb.weight"][2] = base["emb.weight"][2]  # a zero row (filter_wise)
    return base, fts


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("corners", [False, True])
def test_model_stock_matches_fusion_bench(n, corners):
    base, fts = _models(n, corners)
    merged = pyfuse.merge("model_stock", base, fts, dtype="float32")
    assert_relative(merged, ref_fusion_bench(base, fts))
    if corners:
        assert torch.equal(merged["attn.bias"], base["attn.bias"])
    ignored = pyfuse.merge("model_stock", base, fts, ignore_keys=["emb.weight", "scale"], dtype="float32")
    assert_relative(ignored, ref_fusion_bench(base, fts, ignore_keys=("emb.weight", "scale")))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("corners", [False, True])
def test_model_stock_matches_mergekit(n, filter_wise, corners):
    base, fts = _models(n, corners)
    merged = pyfuse.merge("model_stock", base, fts, variant="mergekit", filter_wise=filter_wise, dtype="float32")
    assert_relative(merged, ref_mergekit(base, fts, filter_wise))


def test_model_stock_closed_form_and_errors():
    # two task vectors at 60 degrees: t = 2 cos / (cos + 1) = 2/3, the paper's closed form
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.5, math.sqrt(3) / 2])}]
    for variant in ("fusion_bench", "mergekit"):
        merged = pyfuse.merge("model_stock", base, fts, variant=variant)
        torch.testing.assert_close(merged["w"], 2 / 3 * (fts[0]["w"] + fts[1]["w"]) / 2)
    base, fts = random_models(2)
    with pytest.raises(ValueError, match="model_stock: needs at least two fine-tuned models, got 1"):
        pyfuse.merge("model_stock", base, fts[:1])
    with pytest.raises(ValueError, match="model_stock: ignore_keys names 'head.weight', which is not a floating"):
        pyfuse.merge("model_stock", base, fts, ignore_keys=["head.weight"])
    with pytest.raises(ValueError, match="model_stock: ignore_keys must be a list of tensor names"):
        pyfuse.merge("model_stock", base, fts, ignore_keys="scale")
    with pytest.raises(ValueError, match="model_stock: variant must be one of 'fusion_bench', 'mergekit'"):
        pyfuse.merge("model_stock", base, fts, variant="paper")
