"""The new methods through `pyfuse merge` configs on a small Hugging Face checkpoint: dry runs say their
per-tensor passes and read nothing; streamed merges equal the in-memory ones."""

import pytest
import torch
import yaml

import pyfuse
from pyfuse.cli import main
from pyfuse.io.sources import TensorSource

from .merge_helpers import load_dir, save_family, tiny_llama

METHODS = [("slerp", {"t": 0.3}, 1), ("nuslerp", {"nuslerp_flatten": False}, 1),
           ("model_stock", {"variant": "mergekit"}, 1), ("tsv", {"scaling": 0.5}, 1), ("iso_c", {}, 1),
           ("iso_cts", {"common_space_fraction": 0.5}, 1),
           ("wudi", {"iter_num": 5, "exclude_keys": ["model.embed_tokens.weight", "lm_head.weight"]}, 1),
           # breadcrumbs: the band's two-pass select, plus one for the norms when rescaling; DELLA: the norms
           ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, 2), ("breadcrumbs", {"density": 0.5, "rescale": True}, 3),
           ("della", {"density": 0.5, "epsilon": 0.1}, 1), ("della", {"density": 0.5, "rescale": False}, 0),
           ("breadcrumbs", {}, 0)]  # density 1 keeps everything: no pass before merging


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family(tiny_llama, tmp_path_factory.mktemp("llama"), n=2)


@pytest.mark.parametrize("method,params,passes", METHODS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
def test_config_dry_run_and_merge(llama, tmp_path, capsys, monkeypatch, method, params, passes):
    base_dir, dirs, _, _ = llama
    config = tmp_path / f"{method}.yaml"
    config.write_text(yaml.safe_dump({"method": method, "base": str(base_dir), "models": [str(d) for d in dirs],
                                      "parameters": params}))
    with monkeypatch.context() as patch:
        patch.setattr(TensorSource, "get", lambda self, key: pytest.fail(f"dry run read {key}"))
        assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "peak memory" in out
    if passes:
        assert f"at most {passes} over each tensor before merging it" in out
    else:
        assert "over each tensor" not in out
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress", "--threads", "2"]) == 0
    merged = load_dir(tmp_path / "out")
    expected = pyfuse.merge(method, base_dir, dirs, **params)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
