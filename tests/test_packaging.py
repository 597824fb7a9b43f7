"""The repository's root shadows no installed package, and pyfuse runs from any working directory.

`python -m pyfuse` and pytest put the working directory first on `sys.path`, so any regular package or
module at the root of a checkout is imported in place of an installed distribution of the same name (this
is how the Triton sources once shadowed Hugging Face's `kernels`, which transformers imports).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyfuse.data.embedded import load_embedded_tasks

from .text_helpers import tiny_encoder_dir

ROOT = Path(__file__).resolve().parent.parent


def _root_importables() -> dict[str, Path]:
    """Names that `import NAME` could resolve to the checkout's root: packages, namespace folders, modules."""
    names = {}
    for entry in ROOT.iterdir():
        name = entry.name.split(".")[0] if entry.is_file() else entry.name
        if entry.name.startswith(".") or not name.isidentifier():
            continue
        if entry.is_dir() or entry.suffix in (".py", ".so", ".pyd"):
            names[name] = entry
    return names


def _run_from_root(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_only_pyfuse_is_a_regular_package_at_the_root():
    """A folder with __init__.py (or a module) at the root beats any installed package of its name."""
    regular = sorted(name for name, entry in _root_importables().items()
                     if (entry.is_dir() and (entry / "__init__.py").exists()) or entry.is_file())
    assert regular == ["pyfuse", "setup", "tests"], regular


def test_no_root_name_resolves_to_the_checkout_where_a_distribution_provides_it():
    installed = importlib.metadata.packages_distributions()
    clashes = sorted(set(_root_importables()) & set(installed) - {"pyfuse"})
    # each clash must resolve, from the root, to the installed distribution and not to the checkout
    out = _run_from_root(textwrap.dedent(f"""
        import importlib.util, json
        found = {{}}
        for name in {clashes!r}:
            spec = importlib.util.find_spec(name)
            found[name] = [spec.origin] + list(spec.submodule_search_locations or [])
        print(json.dumps(found))
    """))
    for name, places in json.loads(out).items():
        inside = [p for p in places if p and Path(p).resolve().is_relative_to(ROOT)]
        assert not inside, f"`import {name}` from the checkout's root finds {inside}, not {installed[name]}"


def test_an_installed_kernels_distribution_wins_at_the_root_and_pyfuse_still_works(tmp_path):
    """A distribution named `kernels` (as Hugging Face's) is what `import kernels` gives at the root."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed one'\n")
    info = site / "kernels-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    out = _run_from_root(textwrap.dedent("""
        import importlib.metadata, kernels, torch
        from kernels import CUDAProperties
        import pyfuse
        from pyfuse.kernels import concrete_merge
        assert importlib.metadata.version("kernels") == "9.9"
        base, vectors = torch.zeros(8), torch.ones(2, 8)
        merged = pyfuse.ops.concrete_merge(base, vectors, torch.zeros(8), torch.tensor([0.5, 0.5]),
                                           torch.tensor([0, 8]), seed=0, step=0, backend="reference")
        print(CUDAProperties, concrete_merge.__name__, float(merged.sum()) > 0)
    """), env={"PYTHONPATH": str(site)})
    assert out.split() == ["the", "installed", "one", "pyfuse.kernels.concrete_merge", "True"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tasks = load_embedded_tasks()[:1]
    texts = [text for task in tasks for text in (*task.train_texts, *task.test_texts, *task.class_descriptions)]
    return tasks[0].name, tiny_encoder_dir(tmp_path_factory.mktemp("encoder"), texts, hidden=32)


@pytest.mark.parametrize("how", ["installed script, another directory", "python -m pyfuse, the root"])
def test_the_demo_runs_from_any_working_directory(how, encoder, tmp_path):
    task, encoder_dir = encoder
    script = Path(sys.executable).parent / "pyfuse"
    command, cwd = ([str(script)], tmp_path) if how.startswith("installed") else ([sys.executable, "-m", "pyfuse"],
                                                                                 ROOT)
    if not script.exists() and how.startswith("installed"):
        pytest.fail(f"the installed script {script} is missing: install with `make install`")
    out = tmp_path / "demo"
    args = ["demo", "--tasks", task, "--encoder", str(encoder_dir), "--finetune-steps", "2", "--steps", "2",
            "--methods", "task_arithmetic", "--test-limit", "20", "--cache", str(tmp_path / "cache"), "--out",
            str(out), "--no-progress"]
    result = subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert task in json.dumps(report)


def test_the_license_fields_name_the_license_file_at_the_root():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
