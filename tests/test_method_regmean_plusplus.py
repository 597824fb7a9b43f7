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


def test_regmean_plusplus_leaves_a_computed_buffer_before_the_first_block_alone():
    """A non-persistent buffer that runs before the first block (Llama's rotary `inv_freq`) is in no checkpoint:
    it keeps the model's value, and the merge equals the one without it."""
    base, fts = family(2)
    tasks = [Task(f"t{i}", batches(10 + i), pooled) for i in range(2)]
    expected = create_method("regmean++").merge(base, fts, tasks)
    with_buffer = copy.deepcopy(base)
    computed = torch.arange(4, dtype=torch.float64)
    with_buffer.embeddings.register_buffer("computed", computed.clone(), persistent=False)
    merged = create_method("regmean++").merge(with_buffer, [ft.state_dict() for ft in fts], tasks)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert torch.equal(with_buffer.embeddings.computed, computed)


def test_regmean_plusplus_through_the_merge_engine(tmp_path):
    """pyfuse.merge / merge_to_dir run it like any method: the same tensors as the method's own entry, the
    base given as a module or as files with the architecture apart; every wrong combination refused first."""
    import pyfuse
    from pyfuse.io.sources import open_source

    base, fts = family(2)
    tasks = [Task(f"t{i}", batches(10 + i), pooled) for i in range(2)]
    expected = create_method("regmean++", alpha=0.5).merge(base, fts, tasks)
    merged = pyfuse.merge("regmean++", base, fts, tasks=tasks, alpha=0.5)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)

    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    architecture = tiny_clip_vision(7)  # other values: the base's must replace them
    report = pyfuse.merge_to_dir("regmean++", base_dir, [ft.state_dict() for ft in fts], tmp_path / "out",
                                 tasks=tasks, model=architecture, alpha=0.5)
    written = open_source(tmp_path / "out", "out")
    assert all(torch.equal(written.get(k), expected[k]) for k in expected)
    assert report["method"] == "regmean++" and report["tasks"] == ["t0", "t1"]
    assert torch.equal(architecture.state_dict()["post_layernorm.weight"],
                       tiny_clip_vision(7).state_dict()["post_layernorm.weight"])  # not modified

    states = [ft.state_dict() for ft in fts]
    with pytest.raises(ValueError, match="'regmean\\+\\+' needs tasks=\\[...\\], one pyfuse.Task per fine-tuned"):
        pyfuse.merge("regmean++", base, fts)
    with pytest.raises(ValueError, match="give the base as an nn.Module, or model="):
        pyfuse.merge("regmean++", base.state_dict(), states, tasks=tasks)
    with pytest.raises(ValueError, match="regmean\\+\\+: needs one Task per fine-tuned model \\(2\\), got 1"):
        pyfuse.merge("regmean++", base, fts, tasks=tasks[:1])
    with pytest.raises(ValueError, match="give tasks=\\[...\\], not statistics"):
        pyfuse.merge("regmean++", base, fts, tasks=tasks, statistics=[])
    with pytest.raises(ValueError, match="'ties' takes no tasks or model"):
        pyfuse.merge("ties", base, fts, tasks=tasks)
    bigger = tiny_clip_vision(0)
    bigger.register_buffer("extra", torch.zeros(2))
    with pytest.raises(KeyError, match="the model has a tensor 'extra' that base lacks"):
        pyfuse.merge("regmean++", base.state_dict(), states, tasks=tasks, model=bigger)


def test_regmean_plusplus_from_a_config_with_the_cli(tmp_path, capsys):
    """`pyfuse merge CONFIG OUT --trust-code`: the model from the base directory (transformers.AutoModel), the
    tasks from the config's factories; the written tensors are pyfuse.merge's. Without --trust-code, with
    --dry-run or with an adaptive-only key it stops first, naming why."""
    import yaml
    from transformers import CLIPVisionModel

    import pyfuse
    from pyfuse.cli import main
    from pyfuse.io.sources import open_source

    from .adaptive_helpers import CLIP_TASKS, clip_state_dicts, clip_task, tiny_clip

    base, finetuned = clip_state_dicts()
    names = CLIP_TASKS[:2]
    tiny_clip().save_pretrained(tmp_path / "base", state_dict=base)
    for name, state in zip(names, finetuned):
        tiny_clip().save_pretrained(tmp_path / name, state_dict=state)
    config = {"method": "regmean++", "base": "base", "models": {name: name for name in names},
              "tasks": {name: {"factory": "tests.adaptive_helpers:clip_task", "kwargs": {"name": name}}
                        for name in names},
              "parameters": {"alpha": 0.5, "num_regmean_examples": 4}}
    path = tmp_path / "regmean_pp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "--trust-code" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "--trust-code"]) == 1
    assert "regmean++ runs the model on its tasks" in capsys.readouterr().err
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--trust-code"]) == 0
    written = open_source(tmp_path / "out", "out")
    expected = pyfuse.merge("regmean++", CLIPVisionModel.from_pretrained(tmp_path / "base"),
                            [tmp_path / name for name in names],
                            tasks=[clip_task(name) for name in names], alpha=0.5, num_regmean_examples=4)
    assert set(written.keys()) == set(expected)
    assert all(torch.equal(written.get(k), expected[k]) for k in expected)
    key = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(expected[key], open_source(tmp_path / "base", "base").get(key))
    path.write_text(yaml.safe_dump({**config, "vector_dtype": "bfloat16"}))
    assert main(["merge", str(path), str(tmp_path / "out2"), "--trust-code"]) == 1
    assert "'vector_dtype' is for adaptive methods, not regmean++" in capsys.readouterr().err
