"""CLIP image classifiers with zero-shot heads, for Hugging Face `transformers` and `open_clip` models.

As in the paper's CLIP experiments, only the vision tower is merged. A task's classifier is the zero-shot
head of the pre-trained model: every class name is put into every prompt template, embedded by the text
tower and projected; each embedding is L2-normalised, the class's embeddings are averaged over the templates
and the mean is normalised again, giving a frozen head `[C, d]`. The logits of images are
`logit_scale.exp() * normalize(pooled @ projection) @ head.T`, where `pooled` is the (merged) vision tower's
pooled output and the projection and logit scale are frozen from the pre-trained model.

The module to merge is `ClipClassifier.vision` and its base tensors `ClipClassifier.vision_state_dict()`:

- `HFClip`: `CLIPModel.vision_model`, a `CLIPVisionModel` whose tensor names (transformers 5) have no prefix,
  e.g. `embeddings.patch_embedding.weight`. Fine-tuned vision towers saved by transformers 4 (such as the
  paper's `tanganke/clip-vit-base-patch32_<task>`) and full `CLIPModel` checkpoints name the same tensors
  `vision_model.embeddings.patch_embedding.weight`; `finetuned` maps either onto the module's names.
- `OpenClip`: `model.visual` with its projection `proj` taken out (kept frozen by the classifier instead), so
  its names are e.g. `conv1.weight`; full open_clip checkpoints name them `visual.conv1.weight`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..data.vision import ImageBatches, VisionTaskSpec, class_names, get_spec, load_split
from ..io.sources import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TensorSource, open_source
from ..progress import progress_bar
from ..task import ModelCall, Task
from .hub import WEIGHT_FILES, ModelNotFoundError, resolve_model_dir

DEFAULT_HF_MODEL = "openai/clip-vit-base-patch32"
HF_PREFIXES = ("", "vision_model.")
"""Where a checkpoint may keep the vision tower's tensors: a CLIPVisionModel of transformers 5 (no prefix),
or one of transformers 4 and any `CLIPModel` (`vision_model.`)."""
OPEN_CLIP_PREFIXES = ("", "visual.", "module.visual.", "model.visual.")
"""The same for open_clip: `model.visual` itself, a full CLIP model, one saved from DistributedDataParallel,
or the task-vectors papers' `ImageEncoder` (`model.visual.`)."""
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class ClipClassifier:
    """A pre-trained CLIP model as a zero-shot image classifier whose vision tower is merged.

    Subclasses set `vision` (the module to merge), `projection` `[width, d]` (applied as `pooled @ projection`),
    `logit_scale` (the log of the scale, as CLIP stores it) and `prefixes`, and implement `text_features`,
    `pooled` and `preprocess`.
    """

    vision: torch.nn.Module
    projection: torch.Tensor
    logit_scale: torch.Tensor
    prefixes: tuple[str, ...]

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected (not normalised) text embeddings `[N, d]` of the pre-trained text tower."""
        raise NotImplementedError

    def pooled(self, output) -> torch.Tensor:
        """The pooled image representation `[B, width]` from the vision tower's output."""
        raise NotImplementedError

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Pixel values `[B, 3, H, W]` of PIL images, preprocessed as the pre-trained model expects."""
        raise NotImplementedError

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """The pre-trained vision tower's tensors by name (detached): the base of a merge."""
        return {name: t.detach() for name, t in self.vision.state_dict().items()}

    def zero_shot_head(self, classnames: Sequence[str], templates: Sequence[str], *, batch_size: int = 256,
                       progress: bool = False) -> torch.Tensor:
        """The frozen zero-shot head `[C, d]` for `classnames` (fp32; rows have unit norm).

        Each template holds one `{}`, replaced by the class name.
        """
        classnames, templates = list(classnames), list(templates)
        if len(classnames) < 2:
            raise ValueError(f"a classifier needs at least 2 class names, got {classnames}")
        if not templates:
            raise ValueError("need at least one prompt template")
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
        texts = [template.format(name) for name in classnames for template in templates]
        chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
        with torch.no_grad():
            embedded = [torch.nn.functional.normalize(self.text_features(chunk).float(), dim=-1)
                        for chunk in progress_bar(chunks, desc="zero-shot head", disable=not progress)]
        per_class = torch.cat(embedded).reshape(len(classnames), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(per_class, dim=-1)

    def image_features(self, call: ModelCall, pixels: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image embeddings `[B, d]` of `call` (the tower, or merged weights on it)."""
        pooled = self.pooled(call(pixels))
        return pooled @ self.projection.to(pooled)

    def logits(self, call: ModelCall, pixels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """`logit_scale.exp() * normalize(image features) @ head.T` `[B, C]`."""
        features = torch.nn.functional.normalize(self.image_features(call, pixels), dim=-1)
        return self.logit_scale.exp().to(features) * features @ head.to(features).T

    def task(self, name: str, classnames: Sequence[str], templates: Sequence[str], batches: Iterable, *,
             test_data: Iterable | None = None, progress: bool = False) -> Task:
        """A `pyfuse.Task` classifying `batches` (pixel tensors `[B, 3, H, W]`) with the zero-shot head.

        `test_data` (optional) holds `(pixels, labels)` pairs for accuracy curves.
        """
        head = self.zero_shot_head(classnames, templates, progress=progress)
        return Task(name, batches, functools.partial(self.logits, head=head), test_data)

    def finetuned(self, name_or_path: str | os.PathLike) -> TensorSource:
        """A fine-tuned vision tower's tensors, lazily read and renamed to `vision`'s names.

        `name_or_path`: a checkpoint directory or hub id (safetensors, or `pytorch_model.bin`), or one weights
        file. Any of `prefixes` may precede the names; the one under which every tensor of `vision` is found
        is used. Ready for `pyfuse.TaskVectors.from_models(clip.vision_state_dict(), [clip.finetuned(...)])`.
        """
        source = _checkpoint_source(name_or_path)
        mapping = map_checkpoint_keys(source, list(self.vision_state_dict()), self.prefixes)
        specs = {key: source.specs[stored] for key, stored in mapping.items()}
        return TensorSource(source.label, specs, lambda key: source.get(mapping[key]))


class HFClip(ClipClassifier):
    """A Hugging Face `CLIPModel` (hub id or local directory, with its tokenizer and image processor)."""

    prefixes = HF_PREFIXES

    def __init__(self, name_or_path: str | os.PathLike = DEFAULT_HF_MODEL):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = resolve_model_dir(name_or_path, required=("config.json", "preprocessor_config.json",
                                                          "tokenizer_config.json"), what="CLIP model")
        self.path = path
        self.model = CLIPModel.from_pretrained(path).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.vision = self.model.vision_model
        self.projection = self.model.visual_projection.weight.detach().T
        self.logit_scale = self.model.logit_scale.detach()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.model.text_projection(text.pooler_output)

    def pooled(self, output) -> torch.Tensor:
        return output.pooler_output

    def image_features(self, call: ModelCall, pixels: torch.Tensor) -> torch.Tensor:
        # transformers' vision tower takes its input by keyword
        return super().image_features(lambda x: call(pixel_values=x), pixels)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]


class OpenClip(ClipClassifier):
    """An `open_clip` model: an architecture name and `pretrained`, a local weights file or an open_clip tag.

    The visual projection is moved out of `model.visual` (whose `proj` becomes None) so the merged module
    holds only what is merged; `model.encode_image` then returns unprojected features.
    """

    prefixes = OPEN_CLIP_PREFIXES

    def __init__(self, arch: str = "ViT-B-32", pretrained: str | os.PathLike = "openai"):
        import open_clip

        if ":" not in arch and arch not in open_clip.list_models():
            raise ValueError(f"open_clip has no architecture {arch!r}; register its config with "
                             f"open_clip.add_model_config, or choose one of open_clip.list_models()")
        if _is_path(pretrained):
            if not Path(pretrained).is_file():
                raise ModelNotFoundError(f"open_clip weights {str(pretrained)!r}: no such file")
        elif ":" not in arch:
            _fetch_open_clip_tag(arch, str(pretrained))
        model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=str(pretrained))
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        visual = self.model.visual
        if getattr(visual, "proj", None) is None:
            raise TypeError(f"open_clip {arch!r}: its visual tower has no `proj` projection to keep frozen")
        self.projection = visual.proj.detach().clone()
        visual.proj = None
        self.vision = visual
        self.logit_scale = self.model.logit_scale.detach()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)))

    def pooled(self, output) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output  # (pooled, tokens) with output_tokens

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


def map_checkpoint_keys(source: TensorSource, module_keys: Sequence[str], prefixes: Sequence[str]) -> dict[str, str]:
    """`{module name: checkpoint name}` for the first prefix under which the checkpoint has every module tensor.

    Raises KeyError naming the checkpoint, the closest prefix and the tensors it lacks.
    """
    stored = set(source.keys())
    found = {prefix: [key for key in module_keys if prefix + key in stored] for prefix in prefixes}
    for prefix in prefixes:
        if len(found[prefix]) == len(module_keys):
            return {key: prefix + key for key in module_keys}
    best = max(prefixes, key=lambda prefix: len(found[prefix]))
    missing = [best + key for key in module_keys if best + key not in stored]
    raise KeyError(
        f"{source.label}: not a checkpoint of this vision tower: with the closest name prefix {best!r} it lacks "
        f"{len(missing)} of {len(module_keys)} tensors, e.g. {missing[:3]} (prefixes tried: {list(prefixes)})"
    )


def _is_path(pretrained: str | os.PathLike) -> bool:
    """Whether open_clip's `pretrained` names a file (rather than a tag such as 'openai')."""
    text = str(pretrained)
    return (isinstance(pretrained, os.PathLike) or os.sep in text or Path(text).exists()
            or text.endswith((*_TORCH_SUFFIXES, ".safetensors")))


def _fetch_open_clip_tag(arch: str, tag: str) -> None:
    """Make sure an open_clip tag's weights are in the local cache (fetched unless offline), or raise clearly."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    config = get_pretrained_cfg(arch, tag)
    if not config:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; its tags: "
                         f"{list_pretrained_tags_by_model(arch)} (or pass the path of a weights file)")
    try:
        download_pretrained(config)
    except Exception as err:  # open_clip and huggingface_hub raise various types for "not cached and offline"
        raise ModelNotFoundError(
            f"open_clip weights {arch!r} / {tag!r} are not in the local cache and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); pass the path of a local weights file"
        ) from err


def _checkpoint_source(name_or_path: str | os.PathLike) -> TensorSource:
    """A lazy source over a weights file, or a checkpoint directory / hub id (safetensors or one .bin)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _file_source(path, str(name_or_path))
    directory = resolve_model_dir(name_or_path, required=(), any_of=WEIGHT_FILES, what="fine-tuned checkpoint")
    if (directory / SAFETENSORS_INDEX).exists() or (directory / SAFETENSORS_SINGLE).exists():
        return open_source(directory, str(name_or_path))
    if not (directory / "pytorch_model.bin").exists():
        raise ModelNotFoundError(f"fine-tuned checkpoint {str(name_or_path)!r}: {directory} holds only a sharded "
                                 f"pytorch_model.bin; convert it to safetensors (save_pretrained does)")
    return _file_source(directory / "pytorch_model.bin", str(name_or_path))


def _file_source(path: Path, label: str) -> TensorSource:
    if path.suffix == ".safetensors":
        return open_source(path, label)
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{label}: expected a .safetensors, {', '.join(_TORCH_SUFFIXES)} weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"{label}: not a loadable state dict ({type(err).__name__}: {str(err)[:200]}); a pickled "
                         f"module must first be saved as its state_dict()") from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{label}: holds a {type(loaded).__name__}, not a state dict")
    return open_source(loaded, label)


def clip_task(clip: ClipClassifier, task: str | VisionTaskSpec, source: str | os.PathLike | None = None, *,
              batch_size: int = 16, test_batch_size: int = 64, test_limit: int | None = None, seed: int = 0,
              progress: bool = False) -> Task:
    """A `pyfuse.Task` of one of the paper's tasks (`pyfuse.data.vision`) for a CLIP classifier.

    Its batches are the test split's images, unlabeled and shuffled once with `seed` (test-time adaptation, as
    the paper does); its test data the same split in order, labelled (the first `test_limit` images if given).
    """
    spec = get_spec(task)
    dataset = load_split(spec, source)
    columns = {"image_column": spec.image_column, "label_column": spec.label_column}
    batches = ImageBatches(dataset, clip.preprocess, batch_size=batch_size, labelled=False, shuffle=True,
                           seed=seed, **columns)
    test = ImageBatches(dataset, clip.preprocess, batch_size=test_batch_size, limit=test_limit, **columns)
    return clip.task(spec.name, class_names(dataset, spec.label_column), spec.templates, batches,
                     test_data=test, progress=progress)
