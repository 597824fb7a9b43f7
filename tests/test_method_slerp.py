"""slerp (fusion_bench / mergekit) and nuslerp (mergekit) against float64 transliterations of the references."""

import math

import pytest
import torch

import pyfuse
from pyfuse.merge import plan_merge

from .method_helpers import SHAPES, assert_relative, random_models


def ref_slerp(t, v0, v1, dot_threshold=0.9995, epsilon=1e-8):
    """fusion_bench's slerp_utils.slerp, in float64."""
    v0_copy, v1_copy = v0.clone(), v1.clone()

    def normalize(v):
        norm = torch.linalg.norm(v.reshape(-1))
        return v / norm if norm > epsilon else v

    dot = torch.sum(normalize(v0) * normalize(v1))
    if torch.abs(dot) > dot_threshold:
        return (1 - t) * v0_copy + t * v1_copy
    theta_0 = torch.arccos(dot)
    sin_theta_0 = torch.sin(theta_0)
    theta_t = theta_0 * t
    return torch.sin(theta_0 - theta_t) / sin_theta_0 * v0_copy + torch.sin(theta_t) / sin_theta_0 * v1_copy


def ref_nuslerp(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    """mergekit's nuslerp, in float64."""
    out_shape = v0.shape

    def _normalize(x, eps=1e-7):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True)
    theta = torch.acos(cos_theta.clamp(-1, 1))
    sin_theta = torch.sin(theta)
    colinear = (sin_theta.abs() < eps).squeeze()
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(out_shape)


def _corner_cases(base, fts):
    """Tensors where the references branch: colinear (lerp), antipodal, a zero tensor, identical tensors."""
    fts[1]["attn.weight"] = 2.5 * fts[0]["attn.weight"]  # colinear weights: |dot| = 1 > threshold
    fts[1]["norm.weight"] = -fts[0]["norm.weight"]  # antipodal
    fts[0]["attn.bias"] = torch.zeros(6)  # a zero weight is not normalised
    fts[1]["scale"] = fts[0]["scale"].clone()  # identical
    return base, fts


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4])
@pytest.mark.parametrize("corners", [False, True])
def test_slerp_matches_fusion_bench(t, corners):
    base, fts = random_models(2, scale=0.5)
    if corners:
        base, fts = _corner_cases(base, fts)
    merged = pyfuse.merge("slerp", base, fts, t=t, dtype="float32")
    expected = {k: ref_slerp(t, fts[0][k].double(), fts[1][k].double()) for k in SHAPES}
    assert_relative(merged, expected, inputs=fts)
    assert torch.equal(merged["ids"], base["ids"])
    if t == 0.0:  # t = 0 is the first model (up to base + delta rounding)
        assert_relative(merged, {k: fts[0][k] for k in SHAPES}, 1e-6)


def test_slerp_defaults_threshold_and_chunking():
    base, fts = random_models(2, scale=0.5)
    merged = pyfuse.merge("slerp", base, fts, dtype="float32")  # defaults: t=0.5, the references' constants
    assert_relative(merged, {k: ref_slerp(0.5, fts[0][k].double(), fts[1][k].double()) for k in SHAPES})
    # a low threshold turns every tensor linear
    linear = pyfuse.merge("slerp", base, fts, DOT_THRESHOLD=0.0, t=0.25, dtype="float32")
    assert_relative(linear, {k: 0.75 * fts[0][k].double() + 0.25 * fts[1][k].double() for k in SHAPES})
    # norms are float64 sums over the whole tensor: the chunking changes nothing beyond rounding
    small = plan_merge("slerp", base, fts, dtype="float32", threads=2, chunk_elements=5).state_dict()
    assert_relative(small, merged, 1e-7)


def test_slerp_bad_inputs():
    base, fts = random_models(3)
    with pytest.raises(ValueError, match="slerp: interpolates exactly two fine-tuned models, got 3"):
        pyfuse.merge("slerp", base, fts)
    with pytest.raises(ValueError, match="slerp: interpolates exactly two fine-tuned models, got 1"):
        pyfuse.merge("slerp", base, fts[:1])
    with pytest.raises(ValueError, match=r"slerp: DOT_THRESHOLD must be in \[0, 1\]"):
        pyfuse.merge("slerp", base, fts[:2], DOT_THRESHOLD=1.5)
    with pytest.raises(ValueError, match="slerp: unknown parameter 'dot_threshold'"):
        pyfuse.merge("slerp", base, fts[:2], dot_threshold=0.5)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("task_vectors", [True, False])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0], [2.0, -2.0]])
def test_nuslerp_matches_mergekit(flatten, row_wise, task_vectors, weights):
    # colinear task vectors (linear), a zero one (not normalised), identical ones, zero rows and columns;
    # not opposite ones: there the references' choice between the linear and the spherical limit (which differ
    # unless t = 0.5) hangs on how cos = -1 rounds
    base, fts = random_models(2, scale=0.5)
    fts[1]["attn.weight"] = base["attn.weight"] + 2.5 * (fts[0]["attn.weight"] - base["attn.weight"])
    fts[0]["attn.bias"] = base["attn.bias"].clone()
    fts[1]["scale"] = fts[0]["scale"].clone()
    fts[1]["emb.weight"][3] = base["emb.weight"][3]
    fts[0]["conv.weight"][:, 1] = base["conv.weight"][:, 1]
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise, "task_vectors": task_vectors}
    if weights is not None:
        params["weights"] = weights
    merged = pyfuse.merge("nuslerp", base, fts, dtype="float32", **params)
    w0, w1 = weights or (1.0, 1.0)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    expected = {}
    for k in SHAPES:
        if k == "scale" and not flatten:
            continue  # a 0-d tensor has no rows; compared below as one vector
        b = base[k].double()
        v0, v1 = fts[0][k].double(), fts[1][k].double()
        if task_vectors:
            expected[k] = b + ref_nuslerp(t, v0 - b, v1 - b, dim=0 if row_wise else -1, flatten=flatten)
        else:
            expected[k] = ref_nuslerp(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten)
    assert_relative(merged, expected, inputs=[base, *fts])


def test_nuslerp_scalar_and_errors():
    base, fts = random_models(2, scale=0.5)
    merged = pyfuse.merge("nuslerp", base, fts, nuslerp_flatten=False, dtype="float32")
    b = base["scale"].double()
    want = b + ref_nuslerp(0.5, fts[0]["scale"].double() - b, fts[1]["scale"].double() - b, flatten=True)
    assert_relative({"scale": merged["scale"]}, {"scale": want})
    with pytest.raises(ValueError, match="nuslerp: interpolates exactly two fine-tuned models, got 3"):
        pyfuse.merge("nuslerp", *random_models(3))
    with pytest.raises(ValueError, match="nuslerp: weights has 3 entries"):
        pyfuse.merge("nuslerp", base, fts, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="nuslerp: nuslerp_flatten must be true or false"):
        pyfuse.merge("nuslerp", base, fts, nuslerp_flatten="yes")


def test_slerp_angle_is_the_spherical_one():
    # two orthogonal unit vectors: at t the result is (cos(t pi/2), sin(t pi/2)), a closed form
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    for t in (0.2, 0.5, 0.9):
        merged = pyfuse.merge("slerp", base, fts, t=t)
        torch.testing.assert_close(merged["w"], torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
        merged = pyfuse.merge("nuslerp", base, fts, weights=[1 - t, t])
        torch.testing.assert_close(merged["w"], torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
