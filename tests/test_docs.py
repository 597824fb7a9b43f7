"""README.md and docs/*.md: every example runs, every generated part is what docs/render.py renders.

Fenced blocks, by their info string (docs/development.md, "Examples in the docs"):

- ```python: run, in order, in one namespace per document, in a fresh directory that holds the example
  checkpoints (`llama-base`, `llama-math`, `llama-code`, made by the README's `make_checkpoints.py` block, and
  the random tiny CLIP `clip-tiny` with two random stand-ins for fine-tunes, `clip-tiny-a`, `clip-tiny-b`);
- ```bash: run there with bash (`set -euo pipefail`), the test's Python first on PATH;
- ```bash parse-only: commands too long for the suite (the demo, benchmarks, installs): each is parsed by its
  real argument parser (`pyfuse ...`, `torchrun ... -m pyfuse ...`, `python benchmarks/NAME.py ...`) or, for
  `make TARGET`, dry-run by make; any other command in such a block fails the test;
- ```LANG file=PATH: written to PATH in that directory (a config the next command reads), not run;
- anything else (text, json, bibtex, yaml without file=): shown, not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .clip_helpers import save_hf_clip

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
CHECKPOINTS = ("llama-base", "llama-math", "llama-code", "clip-tiny", "clip-tiny-a", "clip-tiny-b")


def _render_module():
    spec = importlib.util.spec_from_file_location("pyfuse_docs_render", ROOT / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def blocks(path: Path) -> list[tuple[int, str, dict[str, str], str]]:
    """(line, language, attributes, body) of every fenced block of `path`."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, *words = match["info"].split() or [""]
        attributes = dict(word.partition("=")[::2] for word in words)
        found.append((text.count("\n", 0, match.start()) + 1, language, attributes, match["body"]))
    return found


def runnable(path: Path) -> bool:
    return any(lang in ("python", "bash") or "file" in attrs for _, lang, attrs, _ in blocks(path))


DOCUMENTS = [p for p in render.documents() if runnable(p)]


def commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_command(command: str) -> None:
    """Parse `command` with its real parser (or dry-run a make target); fail on anything unknown."""
    from pyfuse.cli import build_parser

    words = shlex.split(command, comments=True)
    env_free = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value prefixes
    if env_free[:1] == ["pyfuse"]:
        args = env_free[1:]
    elif env_free[:3] == ["python", "-m", "pyfuse"]:
        args = env_free[3:]
    elif env_free[:1] == ["torchrun"] and "pyfuse" in env_free:
        args = env_free[env_free.index("pyfuse") + 1:]
    elif env_free[:1] == ["python"] and len(env_free) > 1 and env_free[1].startswith("benchmarks/"):
        script = ROOT / env_free[1]
        spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(script.parent))
        sys.modules[spec.name] = module  # a dataclass in the script looks its module up by name
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(script.parent))
            del sys.modules[spec.name]
        module.build_parser().parse_args(env_free[2:])
        return
    elif env_free[:1] in (["nsys"], ["ncu"]):  # a profiler around a command: that command is parsed
        inner = next((i for i, w in enumerate(env_free) if w in ("pyfuse", "python")), None)
        if inner is not None:
            parse_command(shlex.join(env_free[inner:]))
        else:  # the profiler's own report commands (nsys stats, ncu --import) name no command to check
            assert env_free[1] in ("stats", "--import"), f"{command!r}: no profiled command"
        return
    elif env_free[:1] == ["make"]:
        result = subprocess.run(["make", "-n", "-C", str(ROOT), *env_free[1:]], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"
        return
    else:
        raise AssertionError(f"parse-only block: no parser known for {command!r}")
    build_parser().parse_args(args)


@pytest.fixture(scope="session")
def example_checkpoints(tmp_path_factory) -> Path:
    """The three checkpoints the examples use, made by the README's own `make_checkpoints.py` block."""
    where = tmp_path_factory.mktemp("checkpoints")
    script = next(body for _, _, attrs, body in blocks(ROOT / "README.md")
                  if attrs.get("file") == "make_checkpoints.py")
    (where / "make_checkpoints.py").write_text(script)
    subprocess.run([sys.executable, "make_checkpoints.py"], cwd=where, check=True)
    for seed, name in enumerate(CHECKPOINTS[3:]):  # a random tiny CLIP and two random stand-ins for fine-tunes
        save_hf_clip(where / name, seed=seed)
    return where


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_every_example_runs(path, example_checkpoints, tmp_path, monkeypatch):
    for name in CHECKPOINTS:
        shutil.copytree(example_checkpoints / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYFUSE_CACHE", str(tmp_path / "cache"))  # the demo's example fine-tunes into it
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    from pyfuse.methods import base as registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # a method an example registers goes with it
    namespace: dict = {"__name__": "__docs__"}
    for line, language, attributes, body in blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if "file" in attributes:
            target = tmp_path / attributes["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        elif language == "python":
            exec(compile(body, where, "exec"), namespace)  # noqa: S102  (the docs' own examples)
        elif language == "bash" and "parse-only" in attributes:
            for command in commands(body):
                parse_command(command)
        elif language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                                    capture_output=True, text=True)
            assert result.returncode == 0, f"{where}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("path", render.documents(), ids=[str(p.relative_to(ROOT)) for p in render.documents()])
def test_generated_parts_are_what_the_renderer_writes(path):
    text = path.read_text()
    assert render.render_text(text, str(path)) == text, f"{path.relative_to(ROOT)}: out of date, run `make docs`"


def test_every_registered_method_has_its_section_in_its_family_page():
    from pyfuse.methods import available_methods, get_method

    missing = []
    for name in available_methods():
        page = ROOT / "docs" / render.FAMILY_PAGES[get_method(name).kind]
        if f'<a id="method-{name}"></a>' not in page.read_text():
            missing.append(f"{name} ({page.name})")
    assert not missing, f"methods without a section: {missing}"


def test_parse_only_refuses_an_unknown_command_and_a_bad_option():
    with pytest.raises(AssertionError, match="no parser known"):
        parse_command("rm -rf /")
    with pytest.raises(SystemExit):
        parse_command("pyfuse merge merge.yaml out --no-such-option")
    with pytest.raises(AssertionError):
        parse_command("make no-such-target")


def test_parse_only_parses_benchmark_commands_with_their_own_parser():
    parse_command("python benchmarks/bench_data_merges.py --quick --json out.json")
    with pytest.raises(SystemExit):
        parse_command("python benchmarks/bench_static_merge.py --no-such-option")
