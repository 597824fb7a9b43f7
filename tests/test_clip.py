"""CLIP zero-shot classifiers (pyfuse.models.clip) on tiny transformers and open_clip models built locally."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import pyfuse
from pyfuse.adaptive import ConcreteMerger, entropy_loss
from pyfuse.models.clip import HFClip, OpenClip, map_checkpoint_keys
from pyfuse.models.hub import ModelNotFoundError

from .clip_helpers import OPEN_CLIP_ARCH, offline, random_images, save_hf_clip, save_open_clip  # noqa: F401

CLASSES = ["cat", "sea lake", "dog", "red car"]
TEMPLATES = ["a photo of a {}.", "{}", "a blurry {}, up close."]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    return save_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def hf_clip(hf_dir):
    return HFClip(hf_dir)


@pytest.fixture(scope="module")
def open_clip_model(open_clip_file):
    return OpenClip(OPEN_CLIP_ARCH, open_clip_file)


@pytest.fixture(params=["hf_clip", "open_clip_model"])
def clip(request):
    return request.getfixturevalue(request.param)


def _pixels(clip, count=3, seed=0):
    return clip.preprocess(random_images(count, seed))


def _perturbed(state_dict, seed=1, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state_dict.items()}


def _text_features_float64(clip, text: str) -> torch.Tensor:
    """One prompt through a float64 copy of the pre-trained model, the library's own way of embedding text."""
    if isinstance(clip, HFClip):
        model = copy.deepcopy(clip.model).double()
        tokens = clip.tokenizer([text], return_tensors="pt")
        return model.text_projection(model.text_model(**tokens).pooler_output)[0]
    model = copy.deepcopy(clip.model).double()
    return model.encode_text(clip.tokenizer([text]))[0]


def test_zero_shot_head_equals_float64_rederivation(clip):
    head = clip.zero_shot_head(CLASSES, TEMPLATES, batch_size=5)  # chunks that cut across classes
    assert head.shape == (len(CLASSES), clip.projection.shape[1]) and head.dtype == torch.float32
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            embeddings = [_text_features_float64(clip, t.format(name)) for t in TEMPLATES]
            mean = torch.stack([e / e.norm() for e in embeddings]).mean(0)
            torch.testing.assert_close(head[c].double(), mean / mean.norm(), atol=2e-6, rtol=0)


def test_logits_equal_the_plain_model(clip, hf_dir, open_clip_file):
    """With one template the head rows are the normalised text embeddings, so the plain model's own
    image-text logits are the reference."""
    images = random_images(3, seed=5)
    pixels = clip.preprocess(images)
    prompts = [f"a photo of a {name}." for name in CLASSES]
    with torch.no_grad():
        ours = clip.logits(clip.vision, pixels, clip.zero_shot_head(CLASSES, ["a photo of a {}."]))
        if isinstance(clip, HFClip):
            from transformers import CLIPModel, CLIPProcessor

            plain = CLIPModel.from_pretrained(hf_dir).eval()
            inputs = CLIPProcessor.from_pretrained(hf_dir)(text=prompts, images=images, padding=True,
                                                           return_tensors="pt")
            expected = plain(**inputs).logits_per_image
        else:
            import open_clip

            plain, _, transform = open_clip.create_model_and_transforms(OPEN_CLIP_ARCH, pretrained=str(open_clip_file))
            image_features, text_features, scale = plain.eval()(
                torch.stack([transform(im) for im in images]), open_clip.get_tokenizer(OPEN_CLIP_ARCH)(prompts))
            expected = scale * image_features @ text_features.T
    assert torch.exp(clip.logit_scale) != 1.0
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_task_through_concrete_merger(clip):
    """Zero task vectors give the pre-trained logits under any mask; a full-weight unmasked merge of one task
    vector gives that fine-tuned tower's logits; gradients reach the merge buffer."""
    pixels = _pixels(clip)
    base = clip.vision_state_dict()
    finetuned = _perturbed(base)
    task = clip.task("a", CLASSES, TEMPLATES, [pixels])
    head = clip.zero_shot_head(CLASSES, TEMPLATES)
    with torch.no_grad():
        pretrained_logits = clip.logits(clip.vision, pixels, head)

    zero = pyfuse.TaskVectors.from_models(base, [base, base], names=["a", "b"])
    merger = ConcreteMerger(clip.vision, zero, coefficients="layer")
    with torch.no_grad():
        merged = task.logits(merger.bind(merger.merged_flat(step=3, mask="relaxed")), pixels)
    torch.testing.assert_close(merged, pretrained_logits, atol=1e-5, rtol=1e-5)

    tv = pyfuse.TaskVectors.from_models(base, [finetuned], names=["a"])
    merger = ConcreteMerger(clip.vision, tv, coefficients="task", init=1.0)
    tower = copy.deepcopy(clip.vision)
    tower.load_state_dict(finetuned)
    with torch.no_grad():
        merged = task.logits(merger.bind(merger.merged_flat(step=0, mask="none")), pixels)
        expected = clip.logits(tower, pixels, head)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert (merged - pretrained_logits).abs().max() > 1e-3

    grad = torch.zeros(tv.layout.numel)
    entropy_loss(task.logits(merger.bind(merger.merged_flat(step=0, mask="none"), grad), pixels)).backward()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_hf_finetuned_checkpoints_map_onto_the_tower(hf_clip, hf_dir, tmp_path):
    """transformers 5 CLIPVisionModel files (no prefix), transformers 4 ones and CLIPModel files (`vision_model.`)."""
    clip = hf_clip
    from transformers import CLIPModel, CLIPVisionModel

    names = sorted(clip.vision_state_dict())
    assert names[0] == "embeddings.class_embedding" and not any(n.startswith("vision_model.") for n in names)
    tuned = _perturbed(clip.vision_state_dict())
    tower = copy.deepcopy(clip.vision)
    tower.load_state_dict(tuned)
    tower.save_pretrained(tmp_path / "v5")
    legacy = tmp_path / "v4"  # as the paper's tanganke/clip-vit-base-patch32_<task> checkpoints are stored
    legacy.mkdir()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in tuned.items()}, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    full = CLIPModel.from_pretrained(hf_dir)
    full.vision_model.load_state_dict(tuned)
    full.save_pretrained(tmp_path / "full")

    reference = CLIPVisionModel.from_pretrained(legacy).state_dict()  # transformers' own renaming of old files
    for directory in ("v5", "v4", "full"):
        source = clip.finetuned(tmp_path / directory)
        assert sorted(source.keys()) == names
        for name in names:
            torch.testing.assert_close(source.get(name), tuned[name], atol=0, rtol=0)
            torch.testing.assert_close(source.get(name), reference[name], atol=0, rtol=0)
    tv = pyfuse.TaskVectors.from_models(clip.vision_state_dict(), [clip.finetuned(legacy)], names=["a"])
    for name, value in tv.task_state_dict(0).items():
        torch.testing.assert_close(value, tuned[name], atol=1e-6, rtol=0)


def test_open_clip_checkpoints_map_onto_the_tower(open_clip_model, tmp_path):
    clip = open_clip_model
    names = sorted(clip.vision_state_dict())
    assert "conv1.weight" in names and "proj" not in names  # the projection stays frozen, outside the tower
    tuned = _perturbed(clip.vision_state_dict())
    full = {f"visual.{k}": v for k, v in tuned.items()} | {"visual.proj": torch.zeros(3), "logit_scale": torch.ones(())}
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "training.pt")
    save_file({f"model.{k}": v.contiguous() for k, v in full.items()}, str(tmp_path / "encoder.safetensors"))
    for file in ("training.pt", "encoder.safetensors"):
        source = clip.finetuned(tmp_path / file)
        assert sorted(source.keys()) == names
        for name in names:
            torch.testing.assert_close(source.get(name), tuned[name], atol=0, rtol=0)


def test_key_mapping_names_what_is_missing(clip, tmp_path):
    state = clip.vision_state_dict()
    dropped = sorted(state)[-1]
    save_file({clip.prefixes[1] + k: v.contiguous() for k, v in state.items() if k != dropped},
              str(tmp_path / "partial.safetensors"))
    with pytest.raises(KeyError, match="partial.safetensors") as err:
        clip.finetuned(tmp_path / "partial.safetensors")
    assert dropped in str(err.value)
    source = pyfuse.io.sources.open_source({"x.a": torch.zeros(1), "x.b": torch.zeros(1), "b": torch.zeros(1)})
    assert map_checkpoint_keys(source, ["a", "b"], ("", "x.")) == {"a": "x.a", "b": "x.b"}


def test_missing_models_give_clear_errors(hf_clip, hf_dir, open_clip_file, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        HFClip(tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (incomplete / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match="preprocessor_config.json"):
        HFClip(incomplete)
    with pytest.raises(ModelNotFoundError, match="pyfuse-test/not-cached.*HF_HUB_OFFLINE"):
        HFClip("pyfuse-test/not-cached")
    clip = hf_clip
    with pytest.raises(ModelNotFoundError, match="pyfuse-test/not-cached"):
        clip.finetuned("pyfuse-test/not-cached")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="empty has no model.safetensors"):
        clip.finetuned(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="missing.safetensors"):
        OpenClip(OPEN_CLIP_ARCH, tmp_path / "missing.safetensors")
    with pytest.raises(ModelNotFoundError, match="'ViT-B-32' / 'openai' are not in the local cache"):
        OpenClip("ViT-B-32", "openai")
    with pytest.raises(ValueError, match="no pretrained tag 'no-such-tag'"):
        OpenClip("ViT-B-32", "no-such-tag")
    with pytest.raises(ValueError, match="no architecture 'no-such-arch'"):
        OpenClip("no-such-arch", open_clip_file)
    with pytest.raises(ValueError, match="exactly one"):
        clip.zero_shot_head(CLASSES, ["no placeholder"])
