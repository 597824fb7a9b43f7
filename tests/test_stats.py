"""pyfuse.stats: Grams, output-gradient Grams, diagonal Fisher and sampled activations against direct computations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pyfuse import Task
from pyfuse.stats import Statistics, collect_statistics, join_statistics, seeded_kinds

from .stats_helpers import TokenMLP, bert_batches, bert_logits, mlp_batches, mlp_logits, tiny_bert


def _mask(batch):
    return batch["mask"]


def test_mlp_grams_equal_masked_xtx_over_tokens():
    torch.manual_seed(0)
    model = TokenMLP()
    batches = mlp_batches()
    stats = collect_statistics(model, batches, mlp_logits, kinds=["gram_in", "acts"], token_mask_fn=_mask,
                               max_rows=5, progress=False)
    x = torch.cat([b["x"][b["mask"]] for b in batches]).double()  # [tokens, 5]
    h = torch.relu(x @ model.fc1.weight.double().T + model.fc1.bias.double())
    tokens = x.shape[0]
    assert stats.tokens == tokens and stats.examples == 12 and stats.labels is None
    torch.testing.assert_close(stats.get("gram_in", "fc1.weight").double(), x.T @ x / tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.get("gram_in", "fc2.weight").double(), h.T @ h / tokens, rtol=1e-5, atol=1e-6)
    assert stats.counts["gram_in/fc1.weight"] == tokens
    assert stats.names("gram_in") == ["fc1.weight", "fc2.weight"] and stats.get("gram_in", "fc1.bias") is None
    acts = stats.get("acts", "fc1.weight")
    assert acts.shape == (5, 5)
    # every sampled row is a distinct unmasked input row
    distances = torch.cdist(acts.double(), x)
    assert (distances.min(dim=1).values < 1e-5).all()
    assert len({int(i) for i in distances.argmin(dim=1)}) == 5


def test_gram_out_equals_gradient_gram_at_the_outputs():
    torch.manual_seed(1)
    model = TokenMLP()
    batches = mlp_batches(count=2)
    stats = collect_statistics(model, batches, mlp_logits, kinds=["gram_out"], labels="gold",
                               label_fn=lambda b: b["y"], token_mask_fn=_mask, progress=False)
    expected = {"fc1.weight": 0, "fc2.weight": 0}
    tokens = 0
    for b in batches:  # an independent forward that keeps the layer outputs
        a1 = model.fc1(b["x"])
        a2 = model.fc2(torch.relu(a1))
        logits = (a2 * b["mask"][..., None]).sum(1)
        total = logits.log_softmax(-1).gather(1, b["y"][:, None]).sum()
        g1, g2 = torch.autograd.grad(total, [a1, a2])
        m = b["mask"]
        expected["fc1.weight"] += g1[m].double().T @ g1[m].double()
        expected["fc2.weight"] += g2[m].double().T @ g2[m].double()
        tokens += int(m.sum())
    for key, value in expected.items():
        torch.testing.assert_close(stats.get("gram_out", key).double(), value / tokens, rtol=1e-5, atol=1e-7)
    assert stats.labels == "gold"


def _brute_force_fisher(model, batches, logits_fn, labels_of):
    """Mean over examples of squared gradients, one forward and backward per single example."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    count = 0
    for batch in batches:
        y = labels_of(batch)
        for b in range(len(y)):
            single = {k: v[b: b + 1] for k, v in batch.items()}
            log_p = logits_fn(model, single).log_softmax(-1)[0, y[b]]
            grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    total[k] += g.double() ** 2
            count += 1
    return {k: v / count for k, v in total.items()}


def test_fisher_equals_per_example_loop_mlp():
    torch.manual_seed(2)
    model = TokenMLP()
    batches = mlp_batches()
    stats = collect_statistics(model, batches, mlp_logits, kinds=["fisher"], labels="gold",
                               label_fn=lambda b: b["y"], progress=False)
    reference = _brute_force_fisher(model, batches, mlp_logits, lambda b: b["y"])
    assert stats.names("fisher") == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(stats.get("fisher", key).double(), value, rtol=1e-4, atol=1e-9)


def test_fisher_and_grams_on_tiny_bert_with_padding():
    model = tiny_bert()
    batches = bert_batches()
    gold = {id(b): torch.tensor([0, 2, 1]) for b in batches}
    task = Task("bert", batches, bert_logits)
    stats = collect_statistics(model, task, kinds=["gram_in", "fisher"], labels="gold",
                               label_fn=lambda b: gold[id(b)], token_mask_fn=lambda b: b["attention_mask"],
                               progress=False)
    assert stats.task == "bert"
    linears = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert stats.names("gram_in") == sorted(linears) and len(linears) == 14
    with torch.no_grad():  # the first query layer reads the embeddings; the classifier reads the pooled output
        emb = torch.cat([model.bert.embeddings(input_ids=b["input_ids"])[b["attention_mask"].bool()] for b in batches])
        pooled = torch.cat([model.bert(**b).pooler_output for b in batches])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.tokens == tokens == emb.shape[0]
    emb, pooled = emb.double(), pooled.double()
    torch.testing.assert_close(stats.get("gram_in", "bert.encoder.layer.0.attention.self.query.weight").double(),
                               emb.T @ emb / tokens, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.get("gram_in", "classifier.weight").double(), pooled.T @ pooled / 6,
                               rtol=1e-4, atol=1e-6)
    assert stats.counts["gram_in/classifier.weight"] == 6
    reference = _brute_force_fisher(model, batches, bert_logits, lambda b: gold[id(b)])
    assert set(stats.names("fisher")) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(stats.get("fisher", key).double(), value, rtol=1e-3, atol=1e-10)


def test_sampled_labels_are_seeded_and_follow_the_model():
    torch.manual_seed(3)
    model = TokenMLP()
    with torch.no_grad():  # the model predicts class 1 with probability ~1: sampled y is always 1
        model.fc2.bias.copy_(torch.tensor([-60.0, 60.0, -60.0]))
    batches = mlp_batches()
    sampled = collect_statistics(model, batches, mlp_logits, kinds=["fisher"], progress=False, seed=5)
    again = collect_statistics(model, batches, mlp_logits, kinds=["fisher"], progress=False, seed=5)
    gold = collect_statistics(model, batches, mlp_logits, kinds=["fisher"], labels="gold",
                              label_fn=lambda b: torch.ones(len(b["y"]), dtype=torch.long), progress=False)
    for key in sampled.names("fisher"):
        assert torch.equal(sampled.get("fisher", key), again.get("fisher", key))
        torch.testing.assert_close(sampled.get("fisher", key), gold.get("fisher", key))
    assert sampled.labels == "sampled"


def test_seeded_kinds_are_the_sampled_ones():
    assert seeded_kinds(["gram_in", "gram_out", "fisher", "acts"], "gold") == ("acts",)
    assert seeded_kinds(["gram_in", "gram_out", "fisher", "acts"], "sampled") == ("gram_out", "fisher", "acts")
    assert seeded_kinds(["gram_in"], "sampled") == ()
    with pytest.raises(ValueError, match="labels must be one of"):
        seeded_kinds(["acts"], "drawn")


def test_seedless_kinds_collected_once_join_the_seeded_ones_as_one_pass_gives_them():
    """What a run over seeds does (pyfuse.demo): the kinds no seed changes once, "acts" per seed, joined. The
    result equals one collection of every kind with that seed, tensor for tensor; each seed's own sample differs."""
    torch.manual_seed(6)
    model = TokenMLP()
    batches = mlp_batches()
    gold = {"labels": "gold", "label_fn": lambda b: b["y"], "token_mask_fn": _mask, "progress": False, "max_rows": 5}
    stable = collect_statistics(model, batches, mlp_logits, kinds=["gram_in", "gram_out", "fisher"], seed=0, **gold)
    samples = []
    for seed in (1, 2):
        seeded = collect_statistics(model, batches, mlp_logits, kinds=["acts"], seed=seed, **gold)
        joined = join_statistics([stable, seeded], model)
        whole = collect_statistics(model, batches, mlp_logits, kinds=["gram_in", "gram_out", "fisher", "acts"],
                                   seed=seed, **gold)
        assert joined.metadata == whole.metadata and joined.kinds() == whole.kinds()
        for kind in whole.kinds():
            assert joined.names(kind) == whole.names(kind)
            for key in whole.names(kind):
                assert torch.equal(joined.get(kind, key), whole.get(kind, key)), (kind, key)
        samples.append(joined.get("acts", "fc1.weight"))
    assert not torch.equal(*samples)
    joined.check_model(model, "the model")


def test_parameters_restrict_the_statistics_to_the_merged_ones():
    """A LoRA fine-tune merges only its targets: statistics of `parameters` are those entries of the whole
    model's, the same values, and nothing else (a merge refuses statistics of parameters it does not merge)."""
    torch.manual_seed(8)
    model = TokenMLP()
    batches = mlp_batches()
    gold = {"labels": "gold", "label_fn": lambda b: b["y"], "token_mask_fn": _mask, "progress": False, "seed": 1}
    kinds = ["gram_in", "gram_out", "fisher", "acts"]
    whole = collect_statistics(model, batches, mlp_logits, kinds=kinds, **gold)
    part = collect_statistics(model, batches, mlp_logits, kinds=kinds, parameters=["fc2.weight", "fc1.bias"], **gold)
    assert {kind: part.names(kind) for kind in kinds} == {"gram_in": ["fc2.weight"], "gram_out": ["fc2.weight"],
                                                           "fisher": ["fc1.bias", "fc2.weight"], "acts": ["fc2.weight"]}
    assert whole.names("fisher") == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for kind in ("gram_in", "gram_out", "fisher"):
        for key in part.names(kind):
            torch.testing.assert_close(part.get(kind, key), whole.get(kind, key), rtol=1e-6, atol=1e-9)
    part.check_model(model, "the model")
    with pytest.raises(ValueError, match="parameters not in TokenMLP: 'fc3.weight'"):
        collect_statistics(model, batches, mlp_logits, kinds=kinds, parameters=["fc3.weight"], **gold)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer among the parameters given"):
        collect_statistics(model, batches, mlp_logits, kinds=["gram_in"], parameters=["fc1.bias"], **gold)


def test_join_statistics_refuses_parts_that_are_not_one_tasks_examples():
    torch.manual_seed(7)
    model, other = TokenMLP(), TokenMLP()
    batches = mlp_batches()
    grams = collect_statistics(model, batches, mlp_logits, kinds=["gram_in"], progress=False, name="a")
    acts = collect_statistics(model, batches, mlp_logits, kinds=["acts"], progress=False, name="a")
    with pytest.raises(ValueError, match="'gram_in' is in both task 'a'"):
        join_statistics([grams, grams], model)
    with pytest.raises(ValueError, match="not one task's examples"):
        join_statistics([grams, collect_statistics(model, batches, mlp_logits, kinds=["acts"], progress=False,
                                                   name="b")], model)
    with pytest.raises(ValueError, match="not one task's examples"):
        join_statistics([grams, collect_statistics(model, batches[:2], mlp_logits, kinds=["acts"], progress=False,
                                                   name="a")], model)
    with pytest.raises(ValueError, match="were not collected on the model given to join_statistics"):
        join_statistics([grams, acts], other)
    with pytest.raises(ValueError, match="at least one"):
        join_statistics([], model)


def test_conv1d_weights_are_detected_as_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    layer = Conv1D(3, 5)  # 3 outputs, 5 inputs: weight [5, 3]
    x = torch.randn(4, 5)
    stats = collect_statistics(layer, [x], lambda call, b: call(b), kinds=["gram_in", "gram_out"], labels="gold",
                               label_fn=lambda b: torch.zeros(4, dtype=torch.long), progress=False)
    assert stats.transposed == {"weight"}
    torch.testing.assert_close(stats.get("gram_in", "weight"), x.T @ x / 4)
    assert stats.shape("gram_out", "weight") == (3, 3)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(5)
    model = TokenMLP()
    stats = collect_statistics(model, mlp_batches(), mlp_logits, kinds=["gram_in", "fisher", "acts"],
                               token_mask_fn=_mask, progress=False, max_rows=4)
    path = stats.save(tmp_path / "stats" / "task.safetensors")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = Statistics.load(path)
    assert loaded.metadata == stats.metadata and loaded.kinds() == ["gram_in", "fisher", "acts"]
    for kind in loaded.kinds():
        assert loaded.names(kind) == stats.names(kind)
        for key in loaded.names(kind):
            assert torch.equal(loaded.get(kind, key), stats.get(kind, key))
    assert str(path) in loaded.label


def test_load_errors_name_the_file_and_key(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"gram_in/fc.weight": torch.eye(2)}, str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors: not a pyfuse statistics file"):
        Statistics.load(plain)
    meta = {"format": "pyfuse-statistics/1", "task": "t", "examples": 1, "tokens": 1, "counts": {},
            "transposed": []}
    bad_key = tmp_path / "bad.safetensors"
    save_file({"gramin/fc.weight": torch.eye(2)}, str(bad_key), metadata={"pyfuse_statistics": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*'gramin/fc\.weight'"):
        Statistics.load(bad_key)
    bad_meta = tmp_path / "meta.safetensors"
    save_file({"gram_in/fc.weight": torch.eye(2)}, str(bad_meta),
              metadata={"pyfuse_statistics": json.dumps({**meta, "examples": "many"})})
    with pytest.raises(ValueError, match=r"meta\.safetensors: metadata field 'examples'"):
        Statistics.load(bad_meta)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        Statistics.load(garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Statistics.load(tmp_path / "missing.safetensors")


def test_collect_rejects_bad_arguments():
    model = TokenMLP()
    with pytest.raises(ValueError, match="kinds"):
        collect_statistics(model, mlp_batches(), mlp_logits, kinds=["grams"], progress=False)
    with pytest.raises(ValueError, match="label_fn"):
        collect_statistics(model, mlp_batches(), mlp_logits, kinds=["fisher"], labels="gold", progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        collect_statistics(torch.nn.ReLU(), [torch.zeros(2, 3)], kinds=["gram_in"], progress=False)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        collect_statistics(model, mlp_batches(), lambda call, b: call(b["x"], b["mask"])[0], progress=False)
