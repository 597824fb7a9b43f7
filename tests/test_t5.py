"""Flan-T5 GLUE tasks: label-word scoring against float64 re-derivations, merging through ConcreteMerger, metrics."""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import pyfuse  # noqa: E402
from pyfuse.adaptive import ConcreteMerger  # noqa: E402
from pyfuse.data.glue import GLUE_TASKS, glue_batches  # noqa: E402
from pyfuse.models.hub import ModelNotFoundError  # noqa: E402
from pyfuse.models.lora import lora_task_vectors  # noqa: E402
from pyfuse.models.t5 import (  # noqa: E402
    LabelWordScorer,
    evaluate_glue,
    glue_task,
    glue_task_vectors,
    load_flan_t5,
    paper_adapter_id,
)
from pyfuse.task import evaluate_tasks  # noqa: E402

from .test_glue_data import glue_rows, tiny_tokenizer  # noqa: E402
from .test_lora import make_adapter, tiny_t5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def dataset(task: str, count: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(glue_rows(task, count, seed))


def manual_scores(model, tokenizer, batch, label_words) -> torch.Tensor:
    """float64, one example and one label at a time, unpadded: the log-likelihood from transformers' own loss
    (mean cross-entropy over the target tokens, with its own right shift) times the target length."""
    model64 = copy.deepcopy(model).double()
    scores = torch.empty(batch["input_ids"].shape[0], len(label_words), dtype=torch.float64)
    with torch.no_grad():
        for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            prompt = ids[mask.bool()][None]
            for c, word in enumerate(label_words):
                target = torch.tensor([tokenizer(word)["input_ids"]])
                scores[i, c] = -model64(input_ids=prompt, labels=target).loss * target.shape[1]
    return scores


# STS-B's 51 classes are all scored; the slow reference re-derives a spread of them (ends included).
@pytest.mark.parametrize("words, checked", [
    (GLUE_TASKS["cola"].label_words, [0, 1]),
    (("yes", "0.5", "no"), [0, 1, 2]),  # 2, 4 and 2 tokens: padding of the labels is masked out
    (GLUE_TASKS["stsb"].label_words, [0, 23, 50]),
])
def test_label_word_scores_equal_manual_loglikelihood(tokenizer, words, checked):
    model = tiny_t5(seed=3)
    batch = glue_batches(GLUE_TASKS["mrpc"], dataset("mrpc", 3, seed=1), tokenizer, batch_size=3)[0]
    assert not batch["attention_mask"].all()  # prompts of different lengths: padding is exercised
    scorer = LabelWordScorer.for_model(model, tokenizer, words)
    lengths = [len(tokenizer(word)["input_ids"]) for word in words]
    assert scorer.valid.sum(dim=1).tolist() == lengths
    with torch.no_grad():
        scores = scorer(model, batch)
    assert scores.shape == (3, len(words)) and scores.dtype == torch.float32
    expected = manual_scores(model, tokenizer, batch, [words[c] for c in checked])
    torch.testing.assert_close(scores[:, checked].double(), expected, rtol=0, atol=2e-5)


def test_scorer_rejects_unusable_label_words(tokenizer):
    with pytest.raises(ValueError, match="'maybe' contains tokens the tokenizer does not know"):
        LabelWordScorer(tokenizer, ["yes", "maybe"], decoder_start_token_id=0)
    with pytest.raises(ValueError, match="do not all tokenise differently"):
        LabelWordScorer(tokenizer, ["yes", " yes"], decoder_start_token_id=0)


def test_tasks_merge_through_concrete_merger(tokenizer):
    base = tiny_t5(seed=3)
    peft_cola, peft_mnli = make_adapter(base, seed=1), make_adapter(base, seed=2)
    tasks = [glue_task("CoLA", base, tokenizer, dataset("cola", 4), batch_size=4),
             glue_task("MNLI", base, tokenizer, dataset("mnli", 4), batch_size=4)]
    assert [t.name for t in tasks] == ["cola", "mnli"]
    tv = glue_task_vectors(base, {"CoLA": peft_cola, "MNLI": peft_mnli})
    assert tv.names == ["cola", "mnli"]

    # zero task vectors: the merged model is the base, whatever the mask and coefficients
    zero = dataclasses.replace(tv, vectors=torch.zeros_like(tv.vectors))
    merger = ConcreteMerger(base, zero, coefficients="layer")
    call = merger.bind(merger.merged_flat(step=0, mask="relaxed"))
    with torch.no_grad():
        for task in tasks:
            for batch, _ in task.test_data:
                torch.testing.assert_close(task.logits(call, batch), task.logits(base, batch), rtol=0, atol=1e-6)

    # one task vector at coefficient 1 without a mask: peft's own merge of that adapter
    merger = ConcreteMerger(base, lora_task_vectors(base, [peft_cola]), coefficients="fixed", init=1.0)
    call = merger.bind(merger.merged_flat(step=0, mask="none"))
    reference = copy.deepcopy(peft_cola).merge_and_unload()
    with torch.no_grad():
        for batch, _ in tasks[0].test_data:
            torch.testing.assert_close(tasks[0].logits(call, batch), tasks[0].logits(reference, batch),
                                       rtol=1e-5, atol=1e-5)

    # and the adaptive loop runs on them: entropy gradients reach the layer-wise coefficients
    result = pyfuse.adamerging(base, tv, tasks, granularity="layer", steps=2, lr=1e-2,
                               options=pyfuse.RunOptions(progress=False))
    assert result.coefficients.shape == (2, len(tv.layout))
    assert not torch.allclose(result.coefficients, torch.full_like(result.coefficients, 0.3))
    assert set(result.report["final_accuracy"]) == {"cola", "mnli"}


def test_evaluate_glue_metrics(tokenizer):
    model = tiny_t5(seed=7)
    stsb_data, cola_data = dataset("stsb", 24, seed=4), dataset("cola", 10, seed=5)
    # A random tiny T5 predicts one score for every prompt; a fixed random function of the prompt's tokens
    # gives STS-B scores with a real ranking to correlate.
    def prompt_scores(call, batch):
        total = (batch["input_ids"] * batch["attention_mask"]).sum(dim=1, keepdim=True)
        return torch.sin(0.37 * total * torch.arange(1, 52))

    stsb = dataclasses.replace(glue_task("stsb", model, tokenizer, stsb_data, batch_size=8), logits=prompt_scores)
    scores = torch.cat([stsb.logits(model, batch) for batch, _ in stsb.test_data])
    predicted = [float(GLUE_TASKS["stsb"].label_words[int(c)]) for c in scores.argmax(dim=-1)]
    assert len(set(predicted)) > 2
    gold = [float(f"{label:.1f}") for label in stsb_data["label"]]
    assert evaluate_glue(model, stsb) == pytest.approx(spearmanr(predicted, gold).statistic, abs=1e-12)

    cola = glue_task("cola", model, tokenizer, cola_data, batch_size=4, test_limit=7)
    with torch.no_grad():
        predicted = torch.cat([cola.logits(model, batch) for batch, _ in cola.test_data]).argmax(dim=-1)
    expected = sum(int(p) == label for p, label in zip(predicted, cola_data["label"][:7])) / 7
    assert evaluate_glue(model, cola) == pytest.approx(expected, abs=1e-12)
    assert evaluate_tasks(model, [cola])["cola"] == pytest.approx(expected, abs=1e-12)


def test_load_flan_t5_from_a_directory(tmp_path, tokenizer):
    model = tiny_t5(seed=2)
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    loaded, loaded_tokenizer = load_flan_t5(tmp_path / "t5")
    assert not loaded.training
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    assert loaded_tokenizer("the cat sat")["input_ids"] == tokenizer("the cat sat")["input_ids"]

    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json or spiece.model"):
        load_flan_t5(tmp_path / "no-tokenizer")
    with pytest.raises(ModelNotFoundError, match="'nobody/flan-t5-none' is not a local directory"):
        load_flan_t5("nobody/flan-t5-none")


def test_paper_adapter_ids():
    assert paper_adapter_id("SST-2") == "tanganke/flan-t5-base_glue-sst2_lora-16"
    assert paper_adapter_id("stsb", "large") == "tanganke/flan-t5-large_glue-stsb_lora-16"
    with pytest.raises(ValueError, match="'xl'"):
        paper_adapter_id("cola", "xl")
