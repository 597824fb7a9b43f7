"""regmean++ against a float64 transliteration of fusion_bench's RegMean++ for CLIP vision models."""

import copy
from collections import defaultdict

import pytest
import torch

from pyfuse import Task
from pyfuse.methods import create_method

PREFIX = ""  # transformers 5 flattens CLIPVisionModel (fusion_bench's VISION_MODEL_PREFIX)


def tiny_clip_vision(seed):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                           num_hidden_layers=3, image_size=16, patch_size=8)
    return transformers.CLIPVisionModel(config).double().eval()


def family(n, scale=0.05):
    base = tiny_clip_vision(0)
    fts = []
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ft = copy.deepcopy(base)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        fts.append(ft)
    return base, fts


def batches(seed, count=3, size=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(count)]


def pooled(call, images):
    return call(pixel_values=images).pooler_output


def reduce_non_diagonal_elements(w, r):
    diag_weights = torch.diag(torch.ones(w.shape[0], dtype=w.dtype) - r)
    non_diag_weights = torch.zeros_like(diag_weights).fill_(r)
    return w * (diag_weights + non_diag_weights)


def ref_regmean_pp(base, fts, data, ratio, num_examples, exclude=()):
    """RegMeanAlgorithmPlusPlus.run with the CLIP methods, in float64, on modules."""
    import re

    merged = copy.deepcopy(base)
    # 1. embeddings and pre-LayerNorm: the mean of the fine-tuned models
    params = defaultdict(list)
    for ft in fts:
        for name, p in ft.state_dict().items():
            if name.startswith(f"{PREFIX}embeddings") or name.startswith(f"{PREFIX}pre_layrnorm"):
                params[name].append(p)
    merged.load_state_dict({k: torch.stack(v).mean(0) for k, v in params.items()}, strict=False)
    inputs = {}
    with torch.no_grad():
        for i, task_batches in enumerate(data):
            done, kept = 0, []
            for images in task_batches:
                if done >= num_examples:
                    break
                kept.append(merged.pre_layrnorm(merged.embeddings(images)))
                done += images.shape[0]
            inputs[i] = kept
        layers = merged.encoder.layers
        for index, layer in enumerate(layers):
            param_lists, regmean_list = defaultdict(list), []
            for i, ft in enumerate(fts):
                ft_layer = ft.encoder.layers[index]
                state = ft_layer.state_dict()
                for name in state:
                    if not any(re.match(p, name) for p in exclude):
                        param_lists[name].append(state[name])
                grams, counts, handles = {}, {}, []
                for module_name, module in ft_layer.named_modules():
                    if isinstance(module, torch.nn.Linear):
                        def hook(m, inp, out, module_name=module_name, grams=grams, counts=counts):
                            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                            xtx = x.T @ x
                            if module_name not in grams:
                                grams[module_name], counts[module_name] = xtx / x.shape[0], x.shape[0]
                            else:
                                grams[module_name] = (grams[module_name] * counts[module_name] + xtx) / (
                                    counts[module_name] + x.shape[0])
                                counts[module_name] += x.shape[0]
                        handles.append(module.register_forward_hook(hook))
                for b in inputs[i]:
                    ft_layer(b, attention_mask=None, causal_attention_mask=None)
                for h in handles:
                    h.remove()
                regmean_list.append(grams)
            merged_params = {}
            for name, values in param_lists.items():
                module_name = name[: -len(".weight")]
                if name.endswith(".weight") and module_name in regmean_list[0]:
                    gs = [reduce_non_diagonal_elements(g[module_name], ratio) for g in regmean_list]
                    products = [g @ w.T for g, w in zip(gs, values)]
                    merged_params[name] = (torch.inverse(sum(gs)) @ sum(products)).T
                else:
                    merged_params[name] = torch.stack(values).mean(0)
            layer.load_state_dict(merged_params, strict=False)
            if index < len(layers) - 1:
                outs = {}
                for i, task_inputs in inputs.items():
                    outs[i] = []
                    for b in task_inputs:
                        out = layer(b, attention_mask=None, causal_attention_mask=None)
                        outs[i].append(out[0] if isinstance(out, tuple) else out)
                inputs = outs
    return merged.state_dict()


@pytest.mark.parametrize("n,examples,alpha", [(2, 256, 0.95), (3, 5, 0.5), (2, 1, 1.0)])
def test_regmean_plusplus_matches_fusion_bench_on_clip(n, examples, alpha):
    base, fts = family(n)
    data = [batches(10 + i) for i in range(n)]
    tasks = [Task(f"t{i}", data[i], pooled) for i in range(n)]
    method = create_method("regmean++", alpha=alpha, num_regmean_examples=examples)
    merged = method.merge(base, fts, tasks)
    expected = ref_regmean_pp(base, fts, data, alpha, examples)
    assert merged.keys() == expected.keys()
    for key, want in expected.items():
        got = merged[key]
        if not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        err = float((got - want).norm())
        assert err <= 1e-6 * float(want.norm()) + 1e-12, f"{key}: relative error {err / float(want.norm()):.3g}"
    # what the reference merges, and what it keeps: the final LayerNorm stays the pre-trained one
    state = base.state_dict()
    assert torch.equal(merged[f"{PREFIX}post_layernorm.weight"], state[f"{PREFIX}post_layernorm.weight"])
    mean = torch.stack([ft.state_dict()[f"{PREFIX}pre_layrnorm.weight"] for ft in fts]).mean(0)
    torch.testing.assert_close(merged[f"{PREFIX}pre_layrnorm.weight"], mean)
    assert not torch.allclose(merged[f"{PREFIX}encoder.layers.1.mlp.fc1.weight"],
                              torch.stack([ft.state_dict()[f"{PREFIX}encoder.layers.1.mlp.fc1.weight"]
                                           for ft in fts]).mean(0))


def test_regmean_plusplus_excludes_and_errors():
    base, fts = family(2)
    data = [batches(10 + i) for i in range(2)]
    tasks = [Task(f"t{i}", data[i], pooled) for i in range(2)]
    method = create_method("regmean++", exclude_param_names_regex=["mlp\\.fc2"])
    merged = method.merge(base, fts, tasks)
    expected = ref_regmean_pp(base, fts, data, 0.95, 256, exclude=("mlp\\.fc2",))
    key = f"{PREFIX}encoder.layers.2.mlp.fc2.weight"
    assert torch.equal(merged[key], base.state_dict()[key])
    key = f"{PREFIX}encoder.layers.2.mlp.fc1.weight"
    torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-9)
    assert torch.equal(base.state_dict()[key], family(2)[0].state_dict()[key])  # the base module is untouched
    with pytest.raises(ValueError, match="regmean\\+\\+: needs one Task per fine-tuned model \\(2\\), got 1"):
        method.merge(base, fts, tasks[:1])
    with pytest.raises(ValueError, match="regmean\\+\\+: blocks 'encoder' is not an nn.ModuleList"):
        create_method("regmean++", blocks="encoder").merge(base, fts, tasks)
    with pytest.raises(ValueError, match="regmean\\+\\+: exclude_param_names_regex has an invalid regular"):
        create_method("regmean++", exclude_param_names_regex=["("])
    broken = fts[1].state_dict()
    del broken[f"{PREFIX}pre_layrnorm.bias"]
    with pytest.raises(KeyError, match="fine-tuned model 2: missing tensor 'pre_layrnorm.bias'"):
        method.merge(base, [fts[0], broken], tasks)
    with pytest.raises(ValueError, match="is not a static merge"):
        import pyfuse

        pyfuse.merge("regmean++", base.state_dict(), [ft.state_dict() for ft in fts])
