"""One merge config for every method, static, data-aware or adaptive, checked as a whole before any work.

A config is a mapping (a parsed YAML file, or a dict in Python)::

    method: ties                     # any registered method (`pyfuse merge --help` lists them)
    base: ./base                     # the pre-trained model: HF directory, sharded safetensors, or a file
    models:                          # the fine-tuned models: a list of paths or entries ...
      - ./math
      - {path: ./code, weight: 2.0, statistics: ./stats/code.safetensors, name: code}
                                     # ... or a mapping of names to paths: {math: ./math, code: ./code}
    parameters: {density: 0.5}       # the method's parameters (its Param table); the rest take defaults
    # static and data-aware methods (regmean++ included) only
    dtype: bfloat16                  # output dtype (default: the base's)
    shard_size: 5GB                  # maximum shard size
    # methods that run the model on the tasks' data: adaptive ones and regmean++
    tasks: {math: mypkg.tasks:math}  # per model name, a callable returning a pyfuse.Task (or {factory, kwargs})
    architecture: mypkg.models:build # optional: called with the base, returns the nn.Module
    # adaptive methods only
    vector_dtype: bfloat16           # optional task-vector storage: float32 (default), bfloat16, float16
    run: {checkpoint_every: 100}     # pyfuse.RunOptions

`check_config` validates every key (sections, method, models, the method's parameters, the adaptive
sections) and resolves relative paths against the config file's directory; errors name the file (or
"config") and the key. A config with `tasks` names Python callables, which run only with `trust_code`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import Method, available_methods, get_method
from .methods.learned import MergeResult, RunOptions
from .runner import VECTOR_DTYPES, check_trusted, model_and_tasks, run_adaptive

__all__ = ["ConfigError", "MergeConfig", "check_config", "load_config", "read_yaml", "run_from_config"]
__all__ += ["check_trusted", "model_and_tasks", "run_adaptive"]  # kept importable from here; they run configs

COMMON_KEYS = ("method", "base", "models", "parameters")
STATIC_KEYS = ("dtype", "shard_size")
TASK_KEYS = ("tasks", "architecture")  # the model and its tasks: adaptive methods and task-data ones (regmean++)
ADAPTIVE_KEYS = (*TASK_KEYS, "vector_dtype", "run")
_MODEL_KEYS = ("path", "name", "weight", "statistics")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file (or "config") and the entry."""


@dataclass
class MergeConfig:
    """A checked config: the method instance (validated parameters) and its inputs, paths resolved."""

    method: Method
    base: Any
    models: list[Any]
    names: list[str | None]
    parameters: dict[str, Any]
    statistics: list[Any] | None = None
    dtype: str | None = None
    shard_size: str | int | None = None
    tasks: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    vector_dtype: str = "float32"
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def adaptive(self) -> bool:
        return self.method.learns


def read_yaml(path: Path) -> Any:
    import yaml

    from .strict_yaml import DuplicateKeyError, load_strict_yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return load_strict_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err.problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text (UTF-8) file: byte {err.start} cannot be decoded") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def load_config(path: Path) -> MergeConfig:
    """The checked config of a YAML file, relative paths resolved from its directory."""
    return check_config(read_yaml(path), str(path), path.parent)


def check_config(config: Any, source: str = "config", here: Path | None = None) -> MergeConfig:
    """Every key of `config` checked (errors start with `source`); paths joined to `here` when given."""
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    if not isinstance(config, Mapping):
        raise fail(f"expected a mapping with keys {', '.join(COMMON_KEYS)}, ...")
    if "params" in config:
        raise fail("'params' is now 'parameters' (the same key for every method); rename it")
    known = COMMON_KEYS + STATIC_KEYS + ADAPTIVE_KEYS
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; expected {', '.join(known)}")
    for key in ("method", "base", "models"):
        if key not in config:
            raise fail(f"missing {key!r}")
    if not isinstance(config["method"], str):
        raise fail(f"'method' must be a method name such as ties, got {config['method']!r}")
    try:
        cls = get_method(config["method"])
    except ValueError as err:
        raise fail(str(err)) from None
    adaptive, runs_tasks = cls.learns, cls.runs_tasks
    allowed = ADAPTIVE_KEYS if adaptive else STATIC_KEYS + (TASK_KEYS if runs_tasks else ())
    wrong = sorted(set(config) - set(COMMON_KEYS) - set(allowed))
    if wrong:
        kind = ("static and data-aware methods" if wrong[0] in STATIC_KEYS else
                "methods that run the model on tasks (adaptive ones, regmean++)" if wrong[0] in TASK_KEYS else
                "adaptive methods")
        raise fail(f"{wrong[0]!r} is for {kind}, not {config['method']}")

    def resolve(value: Any, where: str) -> Any:
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
            return value if here is None else here / Path(value).expanduser()
        raise fail(f"{where} must be a path, got {value!r}")

    models, names, weights, statistics = _models(config["models"], resolve, fail)
    params = config.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise fail("'parameters' must be a mapping of parameter names to values")
    params = {key: (resolve(value, f"parameters.{key}") if key in cls.params and cls.params[key].path else value)
              for key, value in params.items()}
    if any(w is not None for w in weights):
        if adaptive:
            raise fail(f"models: {config['method']} learns its coefficients; give no 'weight'")
        if "weights" in params:
            raise fail("give weights either per model or in parameters.weights, not both")
        params["weights"] = [1.0 if w is None else w for w in weights]
    if any(st is not None for st in statistics):
        if None in statistics:
            raise fail(f"models[{statistics.index(None)}] has no 'statistics'; a data-aware merge needs them for "
                       "every model")
    try:
        method = cls(**params)
    except (TypeError, ValueError) as err:
        raise fail(str(err)) from None
    checked = MergeConfig(method=method, base=resolve(config["base"], "base"), models=models, names=names,
                          parameters=params, statistics=statistics if statistics[0] is not None else None)
    if runs_tasks:
        if None in names or len(set(names)) != len(names):
            raise fail(f"models of {config['method']} need distinct task names: map names to paths, or give each "
                       "entry a 'name'")
        tasks = config.get("tasks")
        if not isinstance(tasks, Mapping) or sorted(tasks) != sorted(names):
            raise fail(f"tasks must map the model names {sorted(names)} to task factories, got "
                       f"{sorted(tasks) if isinstance(tasks, Mapping) else tasks!r}")
        checked.tasks, checked.architecture = dict(tasks), config.get("architecture")
    if not adaptive:
        checked.dtype, checked.shard_size = config.get("dtype"), config.get("shard_size")
        return checked

    dtype_name = config.get("vector_dtype", "float32")
    if dtype_name not in VECTOR_DTYPES:
        raise fail(f"vector_dtype must be one of {sorted(VECTOR_DTYPES)}, got {dtype_name!r}")
    run = dict(config.get("run") or {})
    allowed = set(RunOptions.__dataclass_fields__) - {"out_dir", "resume", "allow_nonfinite"}  # given as arguments
    unknown = sorted(set(run) - allowed)
    if unknown:
        raise fail(f"run has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        RunOptions(**run)  # every value checked before any model loads
    except ValueError as err:
        raise fail(f"run: {err}") from None
    checked.vector_dtype, checked.run = dtype_name, run
    return checked


def _models(entries: Any, resolve, fail) -> tuple[list, list, list, list]:
    """Paths, names, weights and statistics of the `models` section (a list of entries, or names to paths)."""
    if isinstance(entries, Mapping):
        entries = [{"name": name, "path": path} for name, path in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise fail("'models' must be a non-empty list of fine-tuned models (or a mapping of names to paths)")
    models, names, weights, statistics = [], [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, Mapping):
            extra = sorted(set(entry) - set(_MODEL_KEYS))
            if extra or "path" not in entry:
                raise fail(f"models[{i}] needs 'path' and optionally 'name', 'weight' and 'statistics', got keys "
                           f"{sorted(entry)}")
            stats = entry.get("statistics")
            models.append(resolve(entry["path"], f"models[{i}].path"))
            names.append(entry.get("name"))
            weights.append(entry.get("weight"))
            statistics.append(None if stats is None else resolve(stats, f"models[{i}].statistics"))
        else:
            models.append(resolve(entry, f"models[{i}]"))
            names.append(None)
            weights.append(None)
            statistics.append(None)
    return models, names, weights, statistics


def run_from_config(config: Mapping[str, Any], out_dir: str | os.PathLike, *, resume: bool = False,
                    force: bool = False, trust_code: bool = False, allow_nonfinite: bool = False,
                    device: str | None = None) -> MergeResult:
    """Run the adaptive method a config mapping names (paths as given); outputs go to `out_dir`.

    A config names Python callables (`tasks`, `architecture`) that are imported and called: that runs
    code, so it is refused unless `trust_code=True` (`--trust-code`). Everything else is checked before
    any model is loaded. `out_dir` must not exist unless `force` or `resume`, and may never hold an input
    model. NaN or inf in the inputs or the merged model raise unless `allow_nonfinite`.

    `out_dir` receives checkpoint.pt, report.json, mask.safetensors (Concrete methods) and merged/
    (a `from_pretrained`-loadable directory for Hugging Face models, else merged/model.safetensors).
    `resume=True` continues from out_dir/checkpoint.pt (written by an earlier run of the same config).
    `device` ("cpu", "cuda", "cuda:N") overrides the config's `run.device`: where the run computes.
    """
    name = config.get("method") if isinstance(config, Mapping) else None
    if isinstance(name, str) and name in available_methods() and not get_method(name).learns:
        raise ConfigError(f"config: method {name!r} is not adaptive; run it with pyfuse.merge or `pyfuse merge`")
    checked = check_config(config)
    overrides = {"device": device} if device is not None else {}
    return run_adaptive(checked, out_dir, resume=resume, force=force, trust_code=trust_code,
                        allow_nonfinite=allow_nonfinite, **overrides)
