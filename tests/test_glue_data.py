"""The GLUE task registry, prompts, metrics, loading from local `datasets` directories and tokenised batches."""

from __future__ import annotations

import math
import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from pyfuse.data.glue import (  # noqa: E402
    GLUE_TASKS,
    GlueDataNotFoundError,
    glue_batches,
    glue_spec,
    glue_test_data,
    load_glue,
)

SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = ["yes", "no", "acceptable", "unacceptable", "entailment", "neutral", "contradiction", "negative",
         "positive", ".", *"0123456789", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "good", "bad", "movie",
         "is", "'", "?", ",", ":"]


def tiny_tokenizer(directory) -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer (T5's special ids: pad 0, </s> 1 appended to every text, unk 2), saved and reloaded.

    Numbers split into digits and "." ("2.5" -> 2 . 5 </s>), so STS-B's label words are several tokens long."""
    vocab = {word: index for index, word in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


SENTENCES = ["the cat sat on the mat .", "a dog ran", "the movie is good", "bad movie", "a cat is on a dog",
             "the dog sat", "good", "the mat is bad ?"]


def glue_rows(task: str, count: int, seed: int = 0) -> dict[str, list]:
    """`count` made-up rows with the columns GLUE's `datasets` config has (text fields, label, idx)."""
    spec = glue_spec(task)
    generator = torch.Generator().manual_seed(seed)
    rows = {field: [SENTENCES[int(i)] for i in torch.randint(len(SENTENCES), (count,), generator=generator)]
            for field in spec.fields}
    if spec.metric == "spearman":
        rows["label"] = [round(float(x), 3) for x in 5 * torch.rand(count, generator=generator)]
    else:
        rows["label"] = torch.randint(spec.num_classes, (count,), generator=generator).tolist()
    rows["idx"] = list(range(count))
    return rows


def test_registry_covers_the_eight_tasks():
    expected = {"cola": 2, "mnli": 3, "mrpc": 2, "qnli": 2, "qqp": 2, "rte": 2, "sst2": 2, "stsb": 51}
    assert {name: spec.num_classes for name, spec in GLUE_TASKS.items()} == expected
    for name, spec in GLUE_TASKS.items():
        assert spec.dataset_id == "nyu-mll/glue" and spec.config == name
        assert spec.split == ("validation_matched" if name == "mnli" else "validation")
        assert spec.metric == ("spearman" if name == "stsb" else "accuracy")
        placeholders = {field for _, field, _, _ in string.Formatter().parse(spec.template) if field}
        assert placeholders == set(spec.fields)
    assert glue_spec("SST-2") is glue_spec("sst2") is GLUE_TASKS["sst2"]
    assert glue_spec("STS-B").name == glue_spec("stsb").name == "stsb"
    assert glue_spec("CoLA").name == "cola"
    with pytest.raises(KeyError, match="unknown GLUE task 'wnli'"):
        glue_spec("wnli")


def test_label_words_and_prompts_follow_the_paper():
    # Appendix D.1: label c's target text
    assert GLUE_TASKS["cola"].label_words == ("unacceptable", "acceptable")
    assert GLUE_TASKS["mnli"].label_words == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["mrpc"].label_words == GLUE_TASKS["qqp"].label_words == ("no", "yes")
    assert GLUE_TASKS["qnli"].label_words == GLUE_TASKS["rte"].label_words == ("yes", "no")
    assert GLUE_TASKS["sst2"].label_words == ("negative", "positive")
    assert GLUE_TASKS["stsb"].label_words[:3] == ("0.0", "0.1", "0.2") and GLUE_TASKS["stsb"].label_words[-1] == "5.0"
    # the paper's RTE and SST-2 examples, word for word
    rte = {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
           "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1}
    assert GLUE_TASKS["rte"].prompt(rte) == (
        "Does the text: 'No Weapons of Mass Destruction Found in Iraq Yet.' entail that 'Weapons of Mass "
        "Destruction Found in Iraq.' is true? Provide 'yes' or 'no'.")
    assert GLUE_TASKS["sst2"].prompt({"sentence": "hide new secretions from the parental units"}) == (
        "Given the sentence 'hide new secretions from the parental units', determine the sentiment. "
        "Is it positive or negative?")
    assert GLUE_TASKS["mnli"].prompt({"premise": "P.", "hypothesis": "H."}).startswith(
        "Does the premise: 'P.' logically imply, contradict, or is neutral to the hypothesis: 'H.'?")


def test_label_index():
    stsb, cola = GLUE_TASKS["stsb"], GLUE_TASKS["cola"]
    # the class of a score is the class of "{:.1f}".format(score), as the paper formats its targets
    for score in (0, 0.0, 5, 3.8, 4.75, 2.6667, 1.04999, 0.05):
        assert stsb.label_words[stsb.label_index(score)] == f"{score:.1f}"
    assert stsb.label_index(5) == 50 and stsb.label_index(3.8) == 38
    with pytest.raises(ValueError, match="outside"):
        stsb.label_index(5.2)
    assert cola.label_index(1) == 1
    with pytest.raises(ValueError, match="unlabelled"):
        cola.label_index(-1)
    with pytest.raises(ValueError, match="not a class index"):
        cola.label_index(0.5)


def test_metrics_against_closed_forms_and_scipy():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 2, generator=generator)
    labels = torch.randint(2, (40,), generator=generator)
    expected = sum(int(scores[i].argmax() == labels[i]) for i in range(40)) / 40
    assert GLUE_TASKS["sst2"].evaluate(scores, labels) == pytest.approx(expected, abs=1e-12)

    stsb = GLUE_TASKS["stsb"]
    scores = torch.randn(60, 51, generator=generator)
    gold = [round(float(x), 2) for x in 5 * torch.rand(60, generator=generator)]
    labels = torch.tensor([stsb.label_index(g) for g in gold])
    # scipy on the predicted scores (class / 10) and the one-decimal gold scores, ties included
    predicted = [float(stsb.label_words[int(c)]) for c in scores.argmax(-1)]
    reference = spearmanr(predicted, [float(f"{g:.1f}") for g in gold]).statistic
    assert stsb.evaluate(scores, labels) == pytest.approx(reference, abs=1e-12)
    assert math.isnan(stsb.evaluate(torch.zeros(5, 51), torch.arange(5)))  # constant predictions
    with pytest.raises(ValueError, match=r"\[N, 51\]"):
        stsb.evaluate(torch.zeros(5, 2), torch.arange(5))


def test_load_from_local_directories(tmp_path):
    cola = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(glue_rows("cola", 6, seed=1)),
        "validation": datasets.Dataset.from_dict(glue_rows("cola", 5, seed=2)),
    })
    cola.save_to_disk(str(tmp_path / "root" / "cola"))
    datasets.Dataset.from_dict(glue_rows("mnli", 4)).save_to_disk(str(tmp_path / "mnli_only"))

    validation = load_glue("cola", path=tmp_path / "root")  # a root holding one directory per task
    assert validation["sentence"] == cola["validation"]["sentence"]
    assert load_glue("cola", "train", path=tmp_path / "root" / "cola")["label"] == cola["train"]["label"]
    assert len(load_glue("mnli", path=tmp_path / "mnli_only")) == 4  # a bare Dataset is the split itself
    with pytest.raises(GlueDataNotFoundError, match=r"splits \['train', 'validation'\], not 'test'"):
        load_glue("cola", "test", path=tmp_path / "root")
    with pytest.raises(GlueDataNotFoundError, match="no such directory"):
        load_glue("cola", path=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"missing \['premise', 'hypothesis'\]"):
        load_glue("mnli", "validation", path=tmp_path / "root" / "cola")


def test_missing_data_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    # read when the libraries are imported, possibly before this module set the environment
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(GlueDataNotFoundError, match=r"'nyu-mll/glue' config 'rte' split 'validation'.*save_to_disk"):
        load_glue("rte", cache_dir=tmp_path / "empty-cache")


def test_batches_are_the_tokenised_prompts(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    spec = GLUE_TASKS["stsb"]
    data = datasets.Dataset.from_dict(glue_rows("stsb", 7))
    pairs = glue_test_data(spec, data, tokenizer, batch_size=3)
    assert [len(labels) for _, labels in pairs] == [3, 3, 1]
    labels = torch.cat([labels for _, labels in pairs])
    assert labels.tolist() == [spec.label_index(x) for x in data["label"]]
    rows = [data[i] for i in range(7)]
    for index, (batch, _) in enumerate(pairs):
        for row, ids, mask in zip(rows[3 * index:3 * index + 3], batch["input_ids"], batch["attention_mask"]):
            expected = tokenizer(spec.prompt(row))["input_ids"]
            assert ids[:len(expected)].tolist() == expected and expected[-1] == tokenizer.eos_token_id
            assert mask.tolist() == [1] * len(expected) + [0] * (len(ids) - len(expected))
            assert set(ids[len(expected):].tolist()) <= {tokenizer.pad_token_id}
        assert batch["attention_mask"][:, -1].any()  # padded to the batch's longest, no further

    shuffled = glue_batches(spec, data, tokenizer, batch_size=2, shuffle_seed=3)
    assert [b["input_ids"].shape[0] for b in shuffled] == [2, 2, 2, 1]
    again = glue_batches(spec, data, tokenizer, batch_size=2, shuffle_seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(shuffled, again))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()
    first = tokenizer(spec.prompt(rows[order[0]]))["input_ids"]
    assert shuffled[0]["input_ids"][0, :len(first)].tolist() == first
    assert len(glue_batches(spec, data, tokenizer, batch_size=2, limit=3)) == 2
