"""The package's shape, read from its source: no code outside `pyfuse/methods/` asks which kind of method it holds,
and no module imports itself back through others."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

import pyfuse
from pyfuse.methods import Method

ROOT = Path(pyfuse.__file__).resolve().parent
REPOSITORY = ROOT.parent


def _method_classes() -> set[str]:
    """The names of every class below `Method` (kinds and registered methods), `Method` itself excepted."""
    found, todo = set(), [Method]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("pyfuse."):
                found.add(sub.__name__)
            todo.append(sub)
    return found


def _names(node: ast.AST) -> list[str]:
    """The last component of every name an expression spells (`a.b.C` -> C; tuples element by element)."""
    if isinstance(node, ast.Tuple):
        return [name for element in node.elts for name in _names(element)]
    if isinstance(node, ast.Attribute):
        return [node.attr, *_names(node.value)]
    if isinstance(node, ast.Name):
        return [node.id]
    return []


def _is_type_call(node: ast.AST) -> bool:
    """`type(x)` or an attribute of it (`type(x).merge_model`)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type"


def kind_tests(source: str, classes: set[str]) -> list[tuple[int, str]]:
    """(line, code) of every isinstance/issubclass against a method class (directly, or through a module-level
    tuple of them) and every comparison of `type(...)` with one."""
    tree = ast.parse(source)
    aliases = {target.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
               and set(_names(node.value)) & classes for target in node.targets if isinstance(target, ast.Name)}
    suspects = classes | aliases
    found = []
    for node in ast.walk(tree):
        is_check = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
        if is_check and set(_names(node.args[1])) & suspects:
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_type_call(side) for side in sides) and any(set(_names(side)) & suspects for side in sides
                                                                    if not _is_type_call(side)):
                found.append((node.lineno, ast.unparse(node)))
    return found


def _checked_files() -> list[Path]:
    files = [path for path in ROOT.rglob("*.py") if "methods" not in path.relative_to(ROOT).parts]
    return files + sorted((REPOSITORY / "benchmarks").glob("*.py"))


def test_the_kind_test_finds_every_spelling():
    """The checker itself: each way of asking a method's class is caught, and asking the method is not."""
    classes = {"DataMethod", "Concrete", "Average"}
    source = (
        "from x import DataMethod, Concrete, Average\n"
        "_FUSED = (Average, Concrete)\n"
        "isinstance(m, DataMethod)\n"
        "issubclass(cls, methods.data.DataMethod)\n"
        "issubclass(cls, _FUSED)\n"
        "isinstance(m, (int, Concrete))\n"
        "type(m).merge_model is not DataMethod.merge_model\n"
        "type(m) == Average\n"
        "m.learns and cls.needs and isinstance(m, Method) and isinstance(x, str)\n"
    )
    assert [line for line, _ in kind_tests(source, classes)] == [3, 4, 5, 6, 7, 8]


def test_no_code_outside_the_methods_asks_a_method_for_its_class():
    classes = _method_classes()
    assert {"StaticMethod", "DataMethod", "TaskDataMethod", "AdaptiveMethod", "Ties", "Concrete"} <= classes
    offences = [f"{path.relative_to(REPOSITORY)}:{line}: {code}" for path in _checked_files()
                for line, code in kind_tests(path.read_text(encoding="utf-8"), classes)]
    assert not offences, "ask the method (kind, needs, learns, ...) instead:\n" + "\n".join(offences)


# ---------------------------------------------------------------------------------------------
# Import cycles
# ---------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def _exists(name: str) -> bool:
    """Whether `name` is a module of the package: a source file, a package or a compiled extension (pyfuse._C)."""
    base = ROOT.parent / name.replace(".", "/")
    return (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
            or any(base.parent.glob(f"{base.name}.*.so")) or any(base.parent.glob(f"{base.name}.*.pyd")))


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and \
        _names(test)[0] == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level and inside functions alike; left out: those under
    `if TYPE_CHECKING:` (never executed) and those in a module's `__getattr__` (PEP 562: a deprecated alias,
    loaded only when code still uses the old name)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if node is tree and isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
                continue
            if _type_checking_only(child):
                todo.extend(child.orelse)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            else:
                todo.append(child)
    return found


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the pyfuse modules it imports (`from package import submodule` names the submodule, any
    other `from package import name` the package)."""
    graph: dict[str, set[str]] = {}
    for module, source in files.items():
        package = module if _is_package(module) else module.rpartition(".")[0]
        edges = graph.setdefault(module, set())
        for node in _imports(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    origin = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if _exists(f"{origin}.{alias.name}") else origin
                           for alias in node.names]
            edges.update(target for target in targets if target.split(".")[0] == "pyfuse" and target != module
                         and _exists(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_function_level_imports_and_skips_type_checking():
    graph = import_graph({
        "pyfuse.taskvectors": "def f():\n    from .models.lora import x\n",
        "pyfuse.models.lora": "from ..taskvectors import TaskVectors\n",
        "pyfuse.layout": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .taskvectors import T\n",
    })
    assert graph["pyfuse.taskvectors"] == {"pyfuse.models.lora"}
    assert graph["pyfuse.layout"] == set()
    assert cycles(graph) == [["pyfuse.models.lora", "pyfuse.taskvectors"]]


def test_the_package_has_no_import_cycles():
    files = {_module_name(path): path.read_text(encoding="utf-8") for path in ROOT.rglob("*.py")}
    assert "pyfuse.engine.plan" in files and importlib.util.find_spec("pyfuse.engine") is not None
    found = cycles(import_graph(files))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(component) for component in found)


@pytest.mark.parametrize("module", ["pyfuse.merge", "pyfuse.config", "pyfuse.methods.adaptive", "pyfuse.methods.data"])
def test_old_module_paths_still_import(module):
    assert importlib.import_module(module) is not None


def test_a_new_method_is_one_file(tmp_path, monkeypatch):
    """A module dropped into the methods' folder registers its method when the package is imported: the example of
    docs/development.md's "Adding a method", as the file it shows."""
    import sys

    page = (REPOSITORY / "docs" / "development.md").read_text(encoding="utf-8")
    section = page[page.index("## Adding a method"):]
    start = section.index("```python\n") + len("```python\n")
    source = section[start:section.index("```", start)]
    package = tmp_path / "pyfuse_scratch" / "methods"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    # the package's own __init__ and base, and the example as one more file beside them
    (package / "__init__.py").write_text((ROOT / "methods" / "__init__.py").read_text(encoding="utf-8")
                                         .replace("from .base import", "from pyfuse.methods.base import")
                                         .replace("_DEPRECATED_ALIASES = (", "_DEPRECATED_ALIASES = ('base', "))
    (package / "base.py").write_text("from pyfuse.methods.base import *  # noqa\n")
    (package / "scaled.py").write_text(source.replace("from .base import", "from pyfuse.methods.base import"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from pyfuse.methods import base

    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))  # the example leaves the registry as it was
    importlib.import_module("pyfuse_scratch.methods")
    assert "scaled" in base.available_methods()
    import torch

    import pyfuse

    models = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}]
    merged = pyfuse.merge("scaled", {"w": torch.zeros(2)}, models, scaling=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, 2.0]))  # 0.5 * mean of the task vectors
    for name in [m for m in sys.modules if m.startswith("pyfuse_scratch")]:
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# Each kind answers for itself
# ---------------------------------------------------------------------------------------------
def test_every_registered_method_says_what_it_is():
    from pyfuse.methods import available_methods, get_method
    from pyfuse.methods.base import METHOD_KINDS

    for name in available_methods():
        cls = get_method(name)
        assert cls.kind in METHOD_KINDS and cls.label(), name
        assert cls.learns == (cls.kind == "adaptive") and cls.runs_tasks == (cls.kind in ("adaptive", "task-data"))
        assert bool(cls.needs) == (cls.kind == "data") and cls.streams == (cls.kind == "static"), name
        assert (cls.inputs_note() == "") == (cls.kind == "static"), name


def test_a_configured_method_instance_is_planned_as_it_is():
    import torch

    from pyfuse.merge import merge, plan_merge
    from pyfuse.methods import create_method

    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 2.0, 1.0])}]
    method = create_method("task_arithmetic", scaling=0.5)
    assert plan_merge(method, base, models).method is method
    torch.testing.assert_close(merge(method, base, models)["w"], merge("task_arithmetic", base, models,
                                                                     scaling=0.5)["w"])
    with pytest.raises(ValueError, match="given beside a configured method"):
        plan_merge(method, base, models, scaling=0.3)
    with pytest.raises(ValueError, match="is not a static merge"):
        plan_merge(create_method("adamerging"), base, models)
