"""Factored LoRA task vectors (`TaskVectors.from_lora`) against the dense ones built from the same peft adapters:
the builder, the merger's forward and gradients on every backend, the static methods (fused, and streamed for
TIES / DARE against `pyfuse.merge` on the adapters' fine-tuned models), refusals, and a tiny Flan-T5-shaped
model end to end through the adaptive methods."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import pyfuse  # noqa: E402
from pyfuse.adaptive import ConcreteMerger  # noqa: E402
from pyfuse.models.lora import lora_task_models, lora_task_vectors  # noqa: E402
from pyfuse.ops import LoraFactors  # noqa: E402

from .test_lora import make_adapter, saved, tiny_t5  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")]
BACKENDS = ["reference", "cpp", "triton"]


def adapters(base, tmp_path, rslora: bool = False) -> list[str]:
    """Three saved adapters with mixed ranks and scalings, targeting different (overlapping) tensors."""
    specs = [dict(seed=1, r=4, alpha=8, targets=("q", "v")),
             dict(seed=2, r=2, alpha=6, targets=("q", "o")),
             dict(seed=3, r=8, alpha=4, targets=("k", "wi_0"))]
    return [saved(make_adapter(base, use_rslora=rslora, **spec), tmp_path / f"adapter{i}")
            for i, spec in enumerate(specs)]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A tiny T5 saved as a model directory, three adapters on it, and both forms of their task vectors."""
    tmp_path = tmp_path_factory.mktemp("lora_factored")
    base = tiny_t5()
    base.save_pretrained(tmp_path / "base")
    paths = adapters(base, tmp_path)
    factored = pyfuse.TaskVectors.from_lora(tmp_path / "base", paths, names=["a", "b", "c"])
    dense = lora_task_vectors(tmp_path / "base", paths, names=["a", "b", "c"])
    return base, paths, factored, dense


@pytest.mark.parametrize("rslora", [False, True])
def test_from_lora_keeps_the_factors_of_the_dense_task_vectors(tmp_path, rslora):
    base = tiny_t5()
    paths = adapters(base, tmp_path, rslora)
    factored = pyfuse.TaskVectors.from_lora(base, paths)
    dense = lora_task_vectors(base, paths)
    assert factored.factored and isinstance(factored.vectors, LoraFactors) and not dense.factored
    assert factored.layout.names == dense.layout.names
    assert torch.equal(factored.base, dense.base)
    assert set(factored.carried) == set(dense.carried)
    # ranks 4 + 2 on the q projections, 4 on v, 2 on o, 8 on k and wi_0: per segment, the sum of the ranks there
    ranks = (factored.vectors.comp_offsets[1:] - factored.vectors.comp_offsets[:-1]).tolist()
    expected = {"q": 6, "v": 4, "o": 2, "k": 8, "wi_0": 8}
    assert ranks == [expected[name.split(".")[-2]] for name in factored.layout.names]
    torch.testing.assert_close(factored.densified().vectors, dense.vectors, rtol=1e-6, atol=1e-7)
    assert factored.nbytes < dense.nbytes / 2
    for index in range(3):
        expected = dense.task_state_dict(index)
        for key, value in factored.task_state_dict(index).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6)


def test_from_lora_takes_peft_models_and_transposed_weights():
    # GPT-2's Conv1D stores weights [in, out]: peft marks its adapters fan_in_fan_out, and the factors swap.
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    models = []
    for seed, r in ((1, 2), (2, 3)):
        model = peft.get_peft_model(base.__class__(config), peft.LoraConfig(
            r=r, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        models.append(model)
    factored = pyfuse.TaskVectors.from_lora(base, models)
    dense = lora_task_vectors(base, models)
    assert all(name.endswith("attn.c_attn.weight") for name in factored.layout.names)
    torch.testing.assert_close(factored.densified().vectors, dense.vectors, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merger_forward_and_gradients_equal_the_densified(problem, backend):
    base, _, factored, dense = problem
    g = torch.randn(factored.layout.numel, generator=torch.Generator().manual_seed(4))
    results = []
    # the dense side on the reference backend: the oracle, and no second interpreted Triton run
    for tv, on in ((factored, backend), (dense, "reference")):
        merger = ConcreteMerger(base, tv, coefficients="layer", seed=7, backend=on)
        with torch.no_grad():
            merger.logits.copy_(torch.randn(tv.layout.numel, generator=torch.Generator().manual_seed(5)))
        flat = merger.merged_flat(step=3, mask="relaxed", train_logits=True, train_coefficients=True)
        flat.backward(g)
        results.append((flat.detach(), merger.logits.grad, merger.coefficients.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert results[0][2].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"scaling": 0.4}),
    ("average", {"weights": [1.0, 2.0, 3.0]}),
    ("concrete", {"mask": "hard", "seed": 3, "step": 2, "scaling": 0.5}),
])
def test_fused_static_methods_on_factored_vectors_equal_merging_the_models(problem, backend, method, params):
    base, paths, factored, _ = problem
    if method == "concrete":  # a mask learned elsewhere: one flat logits tensor over the layout
        params = {**params, "logits": torch.randn(factored.layout.numel, generator=torch.Generator().manual_seed(8))}
    merged = pyfuse.merge_task_vectors(factored, method, backend=backend, **params)
    # independent path: the streaming engine over peft's fine-tuned models (base + delta, dense)
    restricted, finetuned = lora_task_models(base, paths)
    expected = pyfuse.merge(method, restricted, finetuned, **params)
    assert set(merged) == set(factored.layout.names) | set(factored.carried)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    for key, value in factored.carried.items():
        assert merged[key] is value


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.4, "scaling": 1.0}),
                                            ("dare", {"p": 0.5, "seed": 4})])
def test_ties_and_dare_densify_one_tensor_at_a_time(problem, method, params):
    base, paths, factored, dense = problem
    merged = pyfuse.merge_task_vectors(factored, method, **params)
    restricted, finetuned = lora_task_models(base, paths)
    expected = pyfuse.merge(method, restricted, finetuned, **params)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(expected[key], restricted[key]) for key in expected)
    dense_merged = pyfuse.merge_task_vectors(dense, method, **params)
    for key, value in dense_merged.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_adamerging_pp_refuses_factored_vectors_naming_the_method(problem):
    base, _, factored, _ = problem
    with pytest.raises(ValueError, match=r"adamerging_pp cannot take factored LoRA task vectors: it trims the task "
                                         r"vectors TIES-style .* Use TaskVectors.densified\(\)"):
        pyfuse.adamerging_pp(base, factored, [], density=0.5)


def tiny_tasks(names) -> list[pyfuse.Task]:
    """Per task, two batches of random prompts; class logits: the first 5 vocabulary entries at the last step."""
    tasks = []
    for index, name in enumerate(names):
        generator = torch.Generator().manual_seed(30 + index)
        batches = [{"input_ids": torch.randint(2, 48, (3, 6), generator=generator),
                    "decoder_input_ids": torch.randint(2, 48, (3, 2), generator=generator)} for _ in range(2)]
        tasks.append(pyfuse.Task(name, batches, lambda call, batch: call(**batch).logits[:, -1, :5]))
    return tasks


# Learning rates of the authors' Flan-T5 setting's order. The two paths agree to fp32 rounding in every product;
# Adam divides each logit's gradient by its own magnitude, so where a gradient is ~0 that rounding can flip the
# sign of a step of size mask_lr: the tolerances allow a small fraction of one such step.
@pytest.mark.parametrize("method, kwargs", [
    ("concrete_adamerging", {"meta_steps": 2, "adamerging_steps": 2, "inner_steps": 1, "mask_lr": 1e-3,
                             "inner_lr": 0.1, "lr": 1e-3}),
    ("concrete_task_arithmetic", {"steps": 2, "mask_lr": 1e-3}),
    ("adamerging", {"steps": 2, "lr": 1e-3}),
])
def test_adaptive_methods_on_factored_t5_equal_the_densified_path(problem, method, kwargs):
    base, _, factored, dense = problem
    options = pyfuse.RunOptions(progress=False, eval_start=False)
    run = getattr(pyfuse, method)
    got = run(base, factored, tiny_tasks(factored.names), options=options, **kwargs)
    expected = run(base, dense, tiny_tasks(dense.names), options=options, **kwargs)
    torch.testing.assert_close(got.flat, expected.flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.coefficients, expected.coefficients, rtol=1e-5, atol=2e-6)
    if expected.logits is not None:
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=5e-5)
        assert expected.logits.abs().max() > 1e-3  # the mask was trained (two Adam steps of 1e-3)
    assert (expected.flat - dense.base).abs().max() > 1e-3
