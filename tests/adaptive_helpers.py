"""Tiny problems for the adaptive-merging tests: a CLIP vision tower with fixed random heads, and an MLP
fine-tuned on class subsets of sklearn's digits. Built once per session (cached), all from fixed seeds."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import pyfuse

CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
CLIP_TASKS = ("cars", "dtd", "svhn")
CLIP_CLASSES = 5


def tiny_clip(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**CLIP_CONFIG)).eval()


def clip_state_dicts() -> tuple[dict, list[dict]]:
    """The pre-trained tower's state dict and one randomly perturbed ('fine-tuned') state dict per task: new
    dicts on every call (transformers' save_pretrained empties the state_dict it is given), shared tensors."""
    base, finetuned = _clip_state_dicts()
    return dict(base), [dict(state) for state in finetuned]


@functools.cache
def _clip_state_dicts() -> tuple[dict, list[dict]]:
    base = tiny_clip().state_dict()
    generator = torch.Generator().manual_seed(1)
    finetuned = [
        {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in CLIP_TASKS
    ]
    return base, finetuned


def clip_head(index: int) -> torch.nn.Linear:
    torch.manual_seed(100 + index)
    head = torch.nn.Linear(CLIP_CONFIG["hidden_size"], CLIP_CLASSES)
    head.requires_grad_(False)
    return head


def clip_images(index: int, batches: int = 4, batch_size: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + index)
    size = CLIP_CONFIG["image_size"]
    return [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]


def clip_logits(head: torch.nn.Module):
    def logits(call, pixel_values):
        return head(call(pixel_values=pixel_values).pooler_output)

    return logits


def clip_task(name: str) -> pyfuse.Task:
    """A task of the tiny CLIP problem (also the factory the config tests name)."""
    index = CLIP_TASKS.index(name)
    images = clip_images(index)
    head = clip_head(index)
    labels = [head(tiny_clip()(pixel_values=x).pooler_output).argmax(-1) for x in images[:1]]
    return pyfuse.Task(name, images, clip_logits(head), test_data=[(images[0], labels[0])])


def save_clip_dirs(root):
    """The tiny CLIP tower and its 'fine-tuned' versions saved as Hugging Face model directories under `root`."""
    base, finetuned = clip_state_dicts()
    model = tiny_clip()
    model.save_pretrained(root / "base", state_dict=base)
    for name, state in zip(CLIP_TASKS, finetuned):
        model.save_pretrained(root / name, state_dict=state)
    return root


def clip_problem(dtype: torch.dtype = torch.float32) -> tuple[CLIPVisionModel, pyfuse.TaskVectors, list[pyfuse.Task]]:
    base, finetuned = clip_state_dicts()
    tv = pyfuse.TaskVectors.from_models(base, finetuned, names=list(CLIP_TASKS), dtype=dtype)
    return tiny_clip(), tv, [clip_task(name) for name in CLIP_TASKS]


# ------------------------------------------------------------------------------------------------
# An MLP on sklearn's digits: a weakly pre-trained base, fine-tuned on three class subsets.
# ------------------------------------------------------------------------------------------------
DIGIT_TASKS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9), "even": (0, 2, 4, 6, 8)}


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    index = torch.tensor(classes)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x)[:, index], y).backward()
        optimizer.step()


@functools.cache
def digits_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, test = order[:1200], order[1200:]
    return x[train], y[train], x[test], y[test]


def _subset(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    relabel = {c: i for i, c in enumerate(classes)}
    return x[keep], torch.tensor([relabel[int(c)] for c in y[keep]])


@functools.cache
def digits_models() -> tuple[dict, list[dict]]:
    x, y, _, _ = digits_data()
    torch.manual_seed(0)
    base = mlp()
    _train(base, x, y, tuple(range(10)), steps=15)
    finetuned = []
    for classes in DIGIT_TASKS.values():
        model = copy.deepcopy(base)
        _train(model, *_subset(x, y, classes), classes, steps=80)
        finetuned.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {k: v.detach().clone() for k, v in base.state_dict().items()}, finetuned


def digits_task(name: str, batches=None, batch_size: int = 16) -> pyfuse.Task:
    classes = DIGIT_TASKS[name]
    _, _, x_test, y_test = digits_data()
    x, y = _subset(x_test, y_test, classes)
    index = torch.tensor(classes)
    if batches is None:
        batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
    return pyfuse.Task(name, batches, lambda call, inputs: call(inputs)[:, index], test_data=[(x, y)])


def digits_problem(dtype: torch.dtype = torch.float32):
    base, finetuned = digits_models()
    tv = pyfuse.TaskVectors.from_models(base, finetuned, names=list(DIGIT_TASKS), dtype=dtype)
    model = mlp()
    model.load_state_dict(base)
    return model, tv, [digits_task(name) for name in DIGIT_TASKS]



def digits_architecture(base) -> torch.nn.Module:
    """The `architecture` callable the config tests name: the MLP, whatever the base path."""
    return mlp()
