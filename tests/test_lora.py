"""LoRA adapters as dense task vectors, against peft's own merge (`merge_and_unload`) and forward."""

from __future__ import annotations

import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import pyfuse  # noqa: E402
from pyfuse.models.hub import ModelNotFoundError  # noqa: E402
from pyfuse.models.lora import (  # noqa: E402
    LoraAdapterError,
    load_lora_adapter,
    lora_deltas,
    lora_task_models,
    lora_task_vectors,
)

# peft calls a transformers method that warns about its own deprecation; peft warns about tied embeddings.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")]

T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_t5(vocab_size: int = 48, seed: int = 0, **overrides) -> transformers.T5ForConditionalGeneration:
    """A randomly initialised two-layer T5 (d_model 32), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=vocab_size, **{**T5_CONFIG, **overrides})
    return transformers.T5ForConditionalGeneration(config).eval()


def make_adapter(base: torch.nn.Module, seed: int, *, r: int = 4, alpha: float = 8,
                 targets: tuple[str, ...] = ("q", "v"), **config) -> peft.PeftModel:
    """A peft LoRA model on a copy of `base`, with random A and B (peft initialises B to zero: no delta)."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def saved(model: peft.PeftModel, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


def merged_reference(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """peft's own dense merge of the adapter into the weights."""
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_delta_equals_merge_and_unload(tmp_path, use_rslora):
    base = tiny_t5()
    peft_model = make_adapter(base, seed=1, r=4, alpha=8, targets=("q", "v", "wi_0"), use_rslora=use_rslora)
    adapter = load_lora_adapter(saved(peft_model, tmp_path / "adapter"))
    assert adapter.scale == (8 / math.sqrt(4) if use_rslora else 8 / 4)
    deltas = lora_deltas(adapter, base)
    reference = merged_reference(peft_model)
    base_sd = base.state_dict()
    # 2 encoder blocks x (q, v, wi_0) + 2 decoder blocks x (self q, v; cross q, v; wi_0)
    assert len(deltas) == 2 * 3 + 2 * 5
    for key, value in base_sd.items():
        expected = reference[key] - value
        if key in deltas:
            assert key.endswith((".q.weight", ".v.weight", ".wi_0.weight"))
            assert expected.abs().max() > 1e-3  # the adapter really changes this weight
            torch.testing.assert_close(deltas[key], expected, rtol=0, atol=2e-6)
        else:
            assert torch.equal(reference[key], value), key
    # the loaded peft model itself gives the same factors as its saved files
    from_model = lora_deltas(peft_model)
    assert from_model.keys() == deltas.keys()
    assert all(torch.equal(from_model[k], deltas[k]) for k in deltas)


def test_fan_in_fan_out_conv1d(tmp_path):
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=32)).eval()
    peft_model = make_adapter(base, seed=2, targets=("c_attn",), fan_in_fan_out=True)
    deltas = lora_deltas(saved(peft_model, tmp_path / "gpt2"), base)
    reference = merged_reference(peft_model)
    assert list(deltas) == ["transformer.h.0.attn.c_attn.weight"]
    key = "transformer.h.0.attn.c_attn.weight"
    assert deltas[key].shape == (16, 48)  # Conv1D stores [in, out]
    torch.testing.assert_close(deltas[key], reference[key] - base.state_dict()[key], rtol=0, atol=2e-6)


def test_task_vectors_reproduce_the_peft_models(tmp_path):
    base = tiny_t5()
    peft_a = make_adapter(base, seed=1, targets=("q", "v"))
    peft_b = make_adapter(base, seed=2, targets=("q", "o"), r=2, alpha=6)
    paths = [saved(peft_a, tmp_path / "a"), saved(peft_b, tmp_path / "b")]
    tv = lora_task_vectors(base, paths, names=["a", "b"])
    targeted = {k for k in base.state_dict() if k.endswith((".q.weight", ".v.weight", ".o.weight"))}
    assert set(tv.layout.names) == targeted
    assert set(tv.carried) == set(base.state_dict()) - targeted
    assert torch.equal(tv.base, tv.layout.flatten(base.state_dict()))
    # adapter a does not touch the o projections: its row is exactly zero there
    views = tv.layout.unflatten(tv.vectors[0])
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in views.items() if k.endswith(".o.weight"))

    input_ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]])
    attention_mask = (input_ids != 0).long()
    attention_mask[0, -1] = 1
    decoder_input_ids = torch.tensor([[0, 3, 4], [0, 12, 13]])
    # both forwards in float64, so what is compared is the densified weights, not float32 reassociation
    for index, peft_model in enumerate((peft_a, peft_b)):
        with torch.no_grad():
            expected = peft_model.double()(input_ids=input_ids, attention_mask=attention_mask,
                                           decoder_input_ids=decoder_input_ids).logits
            model = tiny_t5(seed=5).double()
            model.load_state_dict(tv.task_state_dict(index))
            got = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # the same bookkeeping for TaskVectors.from_models: base restricted to the targeted tensors + dense models
    restricted, finetuned = lora_task_models(base, paths)
    assert set(restricted) == targeted and all(set(m) == targeted for m in finetuned)
    rebuilt = pyfuse.TaskVectors.from_models(restricted, finetuned, names=["a", "b"])
    assert rebuilt.layout.names == tv.layout.names
    torch.testing.assert_close(rebuilt.vectors, tv.vectors, rtol=0, atol=1e-6)


def test_missing_adapter_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_lora_adapter(tmp_path / "nowhere")
    directory = tmp_path / "half"
    saved(make_adapter(tiny_t5(), seed=1), directory)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="adapter_model.safetensors"):
        load_lora_adapter(directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        load_lora_adapter(directory)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        load_lora_adapter("nobody/no-such-adapter")


def test_mismatches_name_the_key_and_shapes(tmp_path):
    path = saved(make_adapter(tiny_t5(), seed=1), tmp_path / "adapter")
    wider = tiny_t5(d_model=48)
    with pytest.raises(LoraAdapterError, match=r"'decoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight'.*"
                                               r"gives \[32, 32\], but the base weight is \[32, 48\]"):
        lora_task_vectors(wider, [path])
    shallower = tiny_t5(num_layers=1, num_decoder_layers=1)
    with pytest.raises(LoraAdapterError, match=r"targets 'decoder\.block\.1\..*which the base model"):
        lora_deltas(path, shallower)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(LoraAdapterError, match=r"'decoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight'.*"
                                               r"lora_A \[4, 32\].*rank r=8"):
        load_lora_adapter(path)


@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(targets=("shared",)), "embedding LoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(rank_pattern={"q": 2}), "rank_pattern"),
])
def test_unsupported_features_are_refused(tmp_path, config, message):
    path = saved(make_adapter(tiny_t5(), seed=1, **config), tmp_path / "adapter")
    with pytest.raises(LoraAdapterError, match=message):
        load_lora_adapter(path)


def test_base_rewriting_inits_and_other_peft_types_are_refused(tmp_path):
    path = saved(make_adapter(tiny_t5(), seed=1), tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(LoraAdapterError, match="rewrites the base weights"):
        load_lora_adapter(path)
    config_file.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(LoraAdapterError, match="only LoRA"):
        load_lora_adapter(path)
