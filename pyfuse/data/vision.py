"""The paper's eight image classification tasks: where their data and fine-tuned CLIP towers are, and batches.

Each task is a `VisionTaskSpec`: its Hugging Face dataset (the copies the paper's authors published under
`tanganke/`, or the canonical ids for SVHN and MNIST), the columns and test split to read, the fine-tuned
CLIP ViT-B/32 vision tower `tanganke/clip-vit-base-patch32_<task>`, and short prompt templates for the
zero-shot head. Class names are read from the dataset itself (its `ClassLabel` names, or torchvision's
`.classes`), with underscores turned into spaces.

Data are loaded through `datasets`: by hub id from the local cache (never downloaded when `HF_HUB_OFFLINE` is
set), or from a local directory (`save_to_disk` output, or data files `load_dataset` can read). Batches are
preprocessed lazily, one batch at a time, with the model's own preprocessing (any
`images -> [B, 3, H, W]` callable, such as `pyfuse.models.clip.ClipClassifier.preprocess`).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Preprocess = Callable[[Sequence[Any]], torch.Tensor]
"""`preprocess(images) -> [B, 3, H, W]` pixel values of a list of PIL images."""


class DatasetUnavailableError(FileNotFoundError):
    """A task's dataset is neither at the given path nor in the local Hugging Face cache."""


@dataclass(frozen=True)
class VisionTaskSpec:
    """Where one task's data and fine-tuned model are, and how its zero-shot head is prompted.

    Attributes:
        name: the task's name (also the name of its task vector).
        dataset: Hugging Face dataset id.
        checkpoint: hub id of the fine-tuned CLIP vision tower.
        templates: prompt templates, each with one `{}` for the class name.
        config: the dataset's configuration name, if it has several.
        image_column, label_column: the columns holding the image and the class index.
        test_split: the split the paper evaluates (and adapts) on.
    """

    name: str
    dataset: str
    checkpoint: str
    templates: tuple[str, ...]
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    test_split: str = "test"


def _spec(name: str, dataset: str, checkpoint_suffix: str, templates: tuple[str, ...], **kwargs: Any) -> VisionTaskSpec:
    return VisionTaskSpec(name, dataset, f"tanganke/clip-vit-base-patch32_{checkpoint_suffix}", templates, **kwargs)


TASKS: dict[str, VisionTaskSpec] = {spec.name: spec for spec in (
    _spec("sun397", "tanganke/sun397", "sun397",
          ("a photo of a {}.", "a photo of the {}, a kind of place.", "a view of a {}.")),
    _spec("stanford_cars", "tanganke/stanford_cars", "stanford-cars",
          ("a photo of a {}.", "a photo of a {}, a type of car.", "a {} parked outside.")),
    _spec("resisc45", "tanganke/resisc45", "resisc45",
          ("satellite imagery of {}.", "an aerial photo of {}.", "a remote sensing image of a {}.")),
    _spec("eurosat", "tanganke/eurosat", "eurosat",
          ("a satellite photo of {}.", "a centered satellite image of {}.", "land cover: {}.")),
    _spec("svhn", "ufldl-stanford/svhn", "svhn",
          ('a photo of the number "{}".', "a house number sign showing the digit {}."), config="cropped_digits"),
    _spec("gtsrb", "tanganke/gtsrb", "gtsrb",
          ('a photo of a "{}" traffic sign.', "a road sign meaning {}.", "a close-up of the {} sign.")),
    _spec("mnist", "ylecun/mnist", "mnist",
          ('a photo of the handwritten digit "{}".', "the number {}, written by hand.")),
    _spec("dtd", "tanganke/dtd", "dtd",
          ("a photo of a {} texture.", "a {} surface.", "a close-up of something {}.")),
)}
"""The paper's eight tasks, in its order."""


def get_spec(name: str | VisionTaskSpec) -> VisionTaskSpec:
    """The spec of a task by name (a spec is returned as is)."""
    if isinstance(name, VisionTaskSpec):
        return name
    if name not in TASKS:
        raise KeyError(f"unknown vision task {name!r}; the paper's tasks are {list(TASKS)}")
    return TASKS[name]


def load_split(spec: str | VisionTaskSpec, source: str | os.PathLike | None = None, *,
               split: str | None = None) -> Any:
    """One split (default: the test split) of a task's dataset, as a `datasets.Dataset`.

    `source` is a local directory (a `save_to_disk` dataset or dataset dict, or data files); without it the
    spec's hub id is loaded from the local cache. Missing data raise `DatasetUnavailableError`, and a dataset
    without the spec's columns a KeyError naming them.
    """
    import datasets

    spec = get_spec(spec)
    split = split or spec.test_split
    if source is None:
        try:
            loaded = datasets.load_dataset(spec.dataset, spec.config, split=split)
        except OSError as err:  # offline and not cached: ConnectionError; unknown id: FileNotFoundError
            raise DatasetUnavailableError(
                f"task {spec.name!r}: dataset {spec.dataset!r} ({split} split) is not in the local Hugging Face "
                f"cache and could not be fetched ({type(err).__name__}: {str(err).splitlines()[0][:200]}). On a "
                f"machine with internet run datasets.load_dataset({spec.dataset!r}"
                f"{', ' + repr(spec.config) if spec.config else ''}) and copy the cache, or pass the directory of "
                f"a copy saved with save_to_disk") from err
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise DatasetUnavailableError(f"task {spec.name!r}: dataset directory {str(source)!r} does not exist")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise KeyError(f"task {spec.name!r}: {path} has splits {list(loaded)}, not {split!r}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(path), split=split)
    missing = [c for c in (spec.image_column, spec.label_column) if c not in loaded.column_names]
    if missing:
        raise KeyError(f"task {spec.name!r}: the dataset has no column(s) {missing}; it has {loaded.column_names}")
    return loaded


def class_names(dataset: Any, label_column: str = "label") -> list[str]:
    """The dataset's class names, underscores turned into spaces: `ClassLabel` names, or torchvision's `.classes`."""
    features = getattr(dataset, "features", None)
    if features is not None and label_column in features and hasattr(features[label_column], "names"):
        names = features[label_column].names
    elif getattr(dataset, "classes", None) is not None:
        names = dataset.classes
    else:
        raise ValueError(f"cannot read class names: column {label_column!r} is not a ClassLabel and the dataset has "
                         f"no .classes")
    return [" ".join(str(name).replace("_", " ").split()) for name in names]


class ImageBatches:
    """Re-iterable batches of a dataset, preprocessed one batch at a time: `(pixels, labels)`, or pixels alone.

    Works on a `datasets.Dataset` (by column) or any sequence of `(image, label)` pairs (torchvision). Images
    are converted to RGB first (MNIST is greyscale). The order is fixed when built (shuffled with `seed` if
    asked), so every iteration, in any process, yields the same batches.
    """

    def __init__(self, dataset: Any, preprocess: Preprocess, *, batch_size: int, image_column: str = "image",
                 label_column: str = "label", labelled: bool = True, shuffle: bool = False, seed: int = 0,
                 limit: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive (or None for all), got {limit}")
        self.dataset = dataset
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.image_column = image_column
        self.label_column = label_column
        self.labelled = labelled
        order = list(range(len(dataset)))
        if shuffle:
            random.Random(seed).shuffle(order)
        self.order = order[:limit]
        if not self.order:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self.order), self.batch_size):
            images, labels = self._rows(self.order[start:start + self.batch_size])
            pixels = self.preprocess([image.convert("RGB") for image in images])
            yield (pixels, torch.tensor(labels, dtype=torch.long)) if self.labelled else pixels

    def _rows(self, indices: list[int]) -> tuple[list[Any], list[int]]:
        if hasattr(self.dataset, "column_names"):  # datasets.Dataset: one read per batch
            rows = self.dataset[indices]
            return rows[self.image_column], [int(y) for y in rows[self.label_column]]
        pairs = [self.dataset[i] for i in indices]
        return [image for image, _ in pairs], [int(label) for _, label in pairs]


def __getattr__(name: str) -> Any:
    """`clip_task`, now `pyfuse.models.clip.clip_task` (tasks are built in `pyfuse.models`, as T5's `glue_task`);
    this deprecated alias goes in the next release."""
    if name == "clip_task":
        warnings.warn("pyfuse.data.vision.clip_task is now pyfuse.models.clip.clip_task", DeprecationWarning,
                      stacklevel=2)
        from ..models.clip import clip_task  # deprecated alias: loaded only when the old name is used

        return clip_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
