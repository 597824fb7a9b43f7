"""Running an adaptive merge from a parsed YAML config (what `pyfuse merge` hands over)."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..io.atomic import check_output_dir
from ..task import Task
from ..taskvectors import TaskVectors
from .loop import METHODS, MergeResult, RunOptions, Settings, _granularity

_VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SECTIONS = {"method", "base", "models", "tasks", "architecture", "vector_dtype", "params", "run"}


def run_from_config(config: Mapping[str, Any], out_dir: str | os.PathLike, *, resume: bool = False,
                    force: bool = False, trust_code: bool = False, allow_nonfinite: bool = False) -> MergeResult:
    """Run the adaptive method a config names; outputs go to `out_dir`.

    A config names Python callables (`tasks`, `architecture`) that are imported and called: that runs
    code, so it is refused unless `trust_code=True` (`--trust-code`). Everything else (sections, method,
    parameters, the output directory) is checked before any model is loaded. `out_dir` must not exist
    unless `force` or `resume`, and may never hold an input model. NaN or inf in the inputs or the merged
    model raise unless `allow_nonfinite`.

    Config shape (a parsed YAML mapping)::

        method: concrete_adamerging    # adamerging | adamerging++ | concrete_task_arithmetic | concrete_adamerging
        base: path/to/pretrained       # HF model directory, or a .safetensors file / directory holding one
        models:                        # the fine-tuned checkpoints, by task name
          mnist: path/to/mnist
          svhn: path/to/svhn           # (or a list of {name: ..., path: ...})
        tasks:                         # one per model, same names: a callable returning a pyfuse.Task
          mnist: mypkg.tasks:mnist
          svhn: {factory: mypkg.tasks:svhn, kwargs: {batch_size: 16}}
        architecture: mypkg.models:build   # optional: called with the base path, returns the nn.Module;
                                           # default transformers.AutoModel.from_pretrained(base)
        vector_dtype: bfloat16         # optional: float32 (default), bfloat16 or float16 task-vector storage
        params: {granularity: layer, meta_steps: 2000, adamerging_steps: 1000}   # the method's keyword
                                       # arguments (see pyfuse.concrete_adamerging and the others)
        run: {checkpoint_every: 100, eval_every: 100, progress: true, backend: auto}   # pyfuse.RunOptions

    `out_dir` receives checkpoint.pt, report.json, mask.safetensors (Concrete methods) and merged/
    (a `from_pretrained`-loadable directory for Hugging Face models, else merged/model.safetensors).
    `resume=True` continues from out_dir/checkpoint.pt (written by an earlier run of the same config).
    """
    unknown = sorted(set(config) - _SECTIONS)
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; expected some of {sorted(_SECTIONS)}")
    for key in ("method", "base", "models", "tasks"):
        if key not in config:
            raise ValueError(f"config: missing {key!r}")
    method = config["method"]
    if method not in METHODS:
        raise ValueError(f"config: method {method!r} is not adaptive; choose one of {sorted(METHODS)}")
    models = _models(config["models"])
    task_specs = config["tasks"]
    if not isinstance(task_specs, Mapping) or sorted(task_specs) != sorted(models):
        raise ValueError(
            f"config: tasks must map the model names {sorted(models)} to task factories, got "
            f"{sorted(task_specs) if isinstance(task_specs, Mapping) else task_specs!r}"
        )
    dtype_name = config.get("vector_dtype", "float32")
    if dtype_name not in _VECTOR_DTYPES:
        raise ValueError(f"config: vector_dtype must be one of {sorted(_VECTOR_DTYPES)}, got {dtype_name!r}")
    run = dict(config.get("run") or {})
    allowed = set(RunOptions.__dataclass_fields__) - {"out_dir", "resume"}  # those two come as arguments
    unknown = sorted(set(run) - allowed)
    if unknown:
        raise ValueError(f"config: run has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    options = RunOptions(out_dir=out_dir, resume=resume, allow_nonfinite=allow_nonfinite, **run)
    params = dict(config.get("params") or {})
    _check_params(method, params)
    code = [f"tasks.{name}" for name in task_specs] + (["architecture"] if config.get("architecture") else [])
    if not trust_code:
        raise PermissionError(f"config: {', '.join(code)} name Python callables that would be imported and run; "
                              "pass --trust-code (trust_code=True) only for a config whose code you trust")
    base = config["base"]
    inputs = [path for path in (base, *models.values()) if isinstance(path, (str, os.PathLike))]
    check_output_dir(out_dir, force or resume, inputs)

    architecture = config.get("architecture")
    model = _load_callable(architecture, "architecture")(base) if architecture else _auto_model(base)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"config: architecture {architecture!r} returned a {type(model).__name__}, not an nn.Module")
    task_vectors = TaskVectors.from_models(base, list(models.values()), names=list(models),
                                           dtype=_VECTOR_DTYPES[dtype_name], progress=options.progress,
                                           allow_nonfinite=allow_nonfinite)
    tasks = [_make_task(name, task_specs[name]) for name in models]
    return METHODS[method](model, task_vectors, tasks, **params, options=options)


def _check_params(method: str, params: dict[str, Any]) -> None:
    """The method's keyword arguments checked without a model: names against its signature, values by the
    checks its `Settings` make (a typo or a bad value fails here, not after the models load)."""
    function = METHODS[method]
    if "options" in params:
        raise ValueError(f"config: params for {method}: 'options' is not a parameter; use the 'run' section")
    try:
        bound = inspect.signature(function).bind(None, None, (), **params)
    except TypeError as err:
        raise ValueError(f"config: params for {method}: {err}") from None
    bound.apply_defaults()
    given = bound.arguments
    try:
        if "granularity" in given:
            _granularity(given["granularity"])
        fields = set(Settings.__dataclass_fields__) - {"method", "coefficients"}
        Settings(method=method, coefficients="fixed", **{key: given[key] for key in fields if key in given})
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: params for {method}: {err}") from None


def _models(models: Any) -> dict[str, Any]:
    if isinstance(models, Mapping):
        return dict(models)
    if isinstance(models, list) and all(isinstance(m, Mapping) and set(m) == {"name", "path"} for m in models):
        named = {m["name"]: m["path"] for m in models}
        if len(named) == len(models):
            return named
    raise ValueError("config: models must map task names to checkpoints, or list {name: ..., path: ...} entries "
                     "with distinct names")


def _make_task(name: str, spec: Any) -> Task:
    if isinstance(spec, Mapping):
        if set(spec) - {"factory", "kwargs"} or "factory" not in spec:
            raise ValueError(f"config: task {name!r} must be 'module:function' or {{factory: ..., kwargs: {{...}}}}")
        factory, kwargs = spec["factory"], dict(spec.get("kwargs") or {})
    else:
        factory, kwargs = spec, {}
    task = _load_callable(factory, f"task {name!r}")(**kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"config: task {name!r}: {factory} returned a {type(task).__name__}, not a pyfuse.Task")
    if task.name != name:
        raise ValueError(f"config: task {name!r}: {factory} returned a task named {task.name!r}")
    return task


def _load_callable(spec: Any, what: str):
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"config: {what} must be a 'module:function' string, got {spec!r}")
    module_name, attribute = spec.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"config: {what}: cannot import {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"config: {what}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"config: {what}: {spec!r} is not callable")
    return target


def _auto_model(base: Any) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"config: cannot build the model from base {base!r} with transformers.AutoModel ({err}); "
            "name an 'architecture' callable"
        ) from None
