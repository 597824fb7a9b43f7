"""Tiny CLIP models for the CLIP and vision-data tests, built from configs and saved locally (no network).

- a transformers `CLIPModel` directory with a character-level CLIP tokenizer and an image processor;
- an open_clip model from a registered custom config, saved as a safetensors file.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE_SIZE = 32
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8)
OPEN_CLIP_ARCH = "pyfuse-tiny-clip"
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test touches the network: the hub libraries read these flags at import, so patch them too."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def char_tokenizer():
    """A CLIP BPE tokenizer whose tokens are single characters (no merges): enough to embed prompts."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,'\"-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [c + suffix for suffix in ("", "</w>") for c in chars]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)


def save_hf_clip(directory: Path, seed: int = 0) -> Path:
    """A random tiny `CLIPModel` with tokenizer and image processor, as save_pretrained writes them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = char_tokenizer()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # a scale far from 1, so that a forgotten exp() shows
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def register_open_clip(directory: Path) -> None:
    import open_clip

    path = directory / f"{OPEN_CLIP_ARCH}.json"
    path.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)


def save_open_clip(directory: Path, seed: int = 0) -> Path:
    """A random tiny open_clip model's weights in a safetensors file (its config registered first)."""
    import open_clip
    from safetensors.torch import save_file

    register_open_clip(directory)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None)
    path = directory / "tiny_open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def random_images(count: int, seed: int = 0, modes: tuple[str, ...] = ("RGB",)) -> list[Image.Image]:
    """PIL images of varied sizes (and modes, cycled), so resizing and cropping matter."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(image.convert(modes[i % len(modes)]))
    return images
