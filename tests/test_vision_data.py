"""The paper's vision tasks (pyfuse.data.vision) on a tiny local dataset with the same structure."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

import pyfuse
from pyfuse.data.vision import (
    TASKS,
    DatasetUnavailableError,
    ImageBatches,
    VisionTaskSpec,
    class_names,
    clip_task,
    get_spec,
    load_split,
)
from pyfuse.models.clip import HFClip

from .clip_helpers import offline, random_images, save_hf_clip  # noqa: F401

RAW_CLASSES = ["annual_crop", "forest", "sea_lake"]
LABELS = [2, 0, 1, 1, 2, 0, 0]


def _dataset() -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=RAW_CLASSES)})
    images = random_images(len(LABELS), seed=3, modes=("RGB", "L"))  # greyscale ones too, as MNIST has
    return datasets.Dataset.from_dict({"image": images, "label": LABELS}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The dataset saved as a DatasetDict (as a downloaded hub dataset is) and as a single split."""
    root = tmp_path_factory.mktemp("vision_data")
    datasets.DatasetDict({"test": _dataset()}).save_to_disk(str(root / "dict"))
    _dataset().save_to_disk(str(root / "split"))
    return root


def _pixels(images) -> torch.Tensor:
    """An independent stand-in for a model's preprocessing: the images' mean colour, per channel."""
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean((0, 1)).reshape(3, 1, 1)
                        for im in images])


def test_registry_has_the_papers_eight_tasks():
    assert list(TASKS) == ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert len({(s.dataset, s.config) for s in TASKS.values()}) == 8
    assert len({s.checkpoint for s in TASKS.values()}) == 8
    for name, spec in TASKS.items():
        assert spec.name == name and get_spec(name) is spec
        assert spec.checkpoint.startswith("tanganke/clip-vit-base-patch32_")
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)
    assert TASKS["stanford_cars"].checkpoint.endswith("_stanford-cars")
    with pytest.raises(KeyError, match="unknown vision task 'cars'"):
        get_spec("cars")


@pytest.mark.parametrize("layout", ["dict", "split"])
def test_load_split_from_disk_and_class_names(saved, layout):
    split = load_split("eurosat", saved / layout)
    assert len(split) == len(LABELS) and split["label"] == LABELS
    assert class_names(split) == ["annual crop", "forest", "sea lake"]


def test_class_names_from_torchvision_style_datasets():
    class Folder:
        classes = ["stop_sign", "yield"]

    assert class_names(Folder()) == ["stop sign", "yield"]
    with pytest.raises(ValueError, match="not a ClassLabel"):
        class_names(datasets.Dataset.from_dict({"label": [0, 1]}))


def test_image_batches_in_order_shuffled_and_unlabeled(saved):
    split = load_split("eurosat", saved / "dict")
    images = [im.convert("RGB") for im in split["image"]]
    batches = ImageBatches(split, _pixels, batch_size=3)
    assert len(batches) == 3
    pixels, labels = map(torch.cat, zip(*batches))
    assert labels.tolist() == LABELS
    torch.testing.assert_close(pixels, _pixels(images), atol=0, rtol=0)

    shuffled = ImageBatches(split, _pixels, batch_size=2, labelled=False, shuffle=True, seed=7)
    first, again = torch.cat(list(shuffled)), torch.cat(list(shuffled))
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # re-iterable, same order every time
    order = shuffled.order
    assert sorted(order) != order and sorted(order) == list(range(len(LABELS)))
    torch.testing.assert_close(first, _pixels([images[i] for i in order]), atol=0, rtol=0)
    limited = ImageBatches(split, _pixels, batch_size=4, limit=5)
    assert [y.tolist() for _, y in limited] == [LABELS[:4], LABELS[4:5]]

    pairs = list(zip(split["image"], LABELS))  # a torchvision-style dataset of (image, label)
    labels = torch.cat([y for _, y in ImageBatches(pairs, _pixels, batch_size=4)])
    assert labels.tolist() == LABELS


def test_missing_data_give_clear_errors(saved, tmp_path):
    with pytest.raises(DatasetUnavailableError, match="dataset 'tanganke/dtd'.*save_to_disk"):
        load_split("dtd")
    with pytest.raises(DatasetUnavailableError, match="does-not-exist"):
        load_split("dtd", tmp_path / "does-not-exist")
    with pytest.raises(KeyError, match="splits \\['test'\\], not 'train'"):
        load_split("dtd", saved / "dict", split="train")
    odd = VisionTaskSpec("odd", "x/y", "x/z", ("{}",), image_column="img")
    with pytest.raises(KeyError, match="no column\\(s\\) \\['img'\\]"):
        load_split(odd, saved / "dict")


def test_clip_task_end_to_end(saved, tmp_path):
    clip = HFClip(save_hf_clip(tmp_path / "clip"))
    task = clip_task(clip, "eurosat", saved / "dict", batch_size=2, test_batch_size=3, seed=1)
    assert task.name == "eurosat"
    batches = list(task.batches)
    assert [b.shape[0] for b in batches] == [2, 2, 2, 1] and batches[0].shape[1:] == (3, 32, 32)

    split = load_split("eurosat", saved / "dict")
    pixels = clip.preprocess([im.convert("RGB") for im in split["image"]])
    head = clip.zero_shot_head(["annual crop", "forest", "sea lake"], TASKS["eurosat"].templates)
    with torch.no_grad():
        reference = clip.logits(clip.vision, pixels, head)
        test_pixels, test_labels = map(torch.cat, zip(*task.test_data))
        torch.testing.assert_close(task.logits(clip.vision, test_pixels), reference, atol=1e-5, rtol=1e-5)
    assert test_labels.tolist() == LABELS
    predicted = reference.argmax(-1)
    expected = (predicted == torch.tensor(LABELS)).float().mean().item()
    assert pyfuse.adaptive.evaluate_tasks(clip.vision, [task]) == {"eurosat": pytest.approx(expected)}
