"""Tiny Hugging Face checkpoints for the merge tests: a base and fine-tuned copies, saved sharded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_clip():
    import transformers

    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": 50, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 24, "patch_size": 8},
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def save_family(make, root: Path, n: int = 2, seed: int = 0) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and n fine-tuned models (base + noise), each saved with `save_pretrained` in 50KB shards.

    Returns the directories and the state dicts that were saved.
    """
    torch.manual_seed(seed)
    model = make()
    base_dir = root / "base"
    model.save_pretrained(base_dir, max_shard_size="50KB")
    (base_dir / "tokenizer.json").write_text('{"version": "1.0"}\n')  # a small file the merge should copy
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs, states = [], []
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        with torch.no_grad():
            for key, param in model.named_parameters():
                param.copy_(base[key] + 0.02 * torch.randn(param.shape, generator=g))
        path = root / f"finetuned{i}"
        model.save_pretrained(path, max_shard_size="50KB")
        dirs.append(path)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return base_dir, dirs, base, states


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
