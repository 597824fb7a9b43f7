"""Small models and batches for the statistics and data-aware merge tests: an MLP over tokens and a tiny BERT."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TokenMLP(torch.nn.Module):
    """Two Linear layers applied per token, then a masked sum over the tokens: class logits `[B, 3]`."""

    def __init__(self, d_in: int = 5, d_hidden: int = 7, classes: int = 3):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.fc2(torch.relu(self.fc1(x))) * mask[..., None]).sum(1)


def mlp_batches(count: int = 3, batch: int = 4, length: int = 6, d_in: int = 5, seed: int = 0) -> list[dict]:
    """Batches `{"x": [B, L, d], "mask": [B, L] bool, "y": [B]}` with ragged masks (every row keeps a token)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        out.append({"x": torch.randn(batch, length, d_in, generator=g), "mask": mask,
                    "y": torch.randint(0, 3, (batch,), generator=g)})
    return out


def mlp_logits(call, batch: dict) -> torch.Tensor:
    return call(batch["x"], batch["mask"])


def tiny_bert(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def bert_batches(count: int = 2, batch: int = 3, length: int = 7, seed: int = 0) -> list[dict]:
    """`{"input_ids", "attention_mask"}` batches with padding; labels under "labels" are left out of the call."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = torch.randint(2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 40, (batch, length), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def bert_logits(call, batch: dict) -> torch.Tensor:
    return call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """`model`'s state dict with Gaussian noise of std `scale` added to every floating tensor."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}
