"""One path from a checked config (`pyfuse.config.check_config`) to its result, for every kind of method.

`run_config` takes the config's method instance as it is: a method that learns at test time (`Method.learns`)
runs the bi-level loop on task vectors (`run_adaptive`); any other is planned by the engine (`plan_config`, the
model and tasks loaded first for a method that runs them) and written into `out_dir`. Locally or under
torchrun alike: the engine and the loop split the work over the processes of the group.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .architecture import check_architecture
from .device import autocast_dtype, resolve_device, torch_threads
from .engine import DEFAULT_SHARD_SIZE, MergePlan, plan_merge
from .engine.plan import input_paths
from .io.atomic import check_output_dir, remove_replaced
from .io.identity import InputIdentity
from .io.lock import claimed_output_dir
from .io.sources import checkpoint_files
from .memory import check_on_disk
from .methods.learned import MergeResult, RunOptions
from .task import Task
from .taskvectors import TaskVectors

if TYPE_CHECKING:  # annotations only: the config module builds on this one
    from .config import MergeConfig

__all__ = ["VECTOR_DTYPES", "check_trusted", "model_and_tasks", "plan_config", "run_adaptive", "run_config"]

VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_config(config: MergeConfig, out_dir: str | os.PathLike, *, force: bool = False, resume: bool = False,
               trust_code: bool = False, allow_nonfinite: bool = False, dtype: str | None = None,
               device: str | None = None, autocast: str | None = None, threads: int | None = None,
               hash_inputs: bool = True, progress: bool = True, source: str = "config",
               other_inputs: Sequence[str | os.PathLike] = ()) -> dict[str, Any] | MergeResult:
    """Run a checked config into `out_dir`: the merge report of the engine, or an adaptive method's result.

    `other_inputs` (e.g. the config file) may never be inside `out_dir`. `resume` continues an adaptive run;
    `dtype`, `device`, `threads` and `hash_inputs` are the engine's (`pyfuse.merge.plan_merge`). An adaptive
    method takes `device` and `autocast` over its config's `run` section, runs on `threads` torch threads, and
    `progress=False` turns its bars off; under torchrun with CUDA each rank takes LOCAL_RANK's GPU and NCCL.
    """
    if config.method.learns:
        check_output_dir(out_dir, True, other_inputs)  # an input inside it; existence: run_adaptive's, locked
        run = {key: value for key, value in (("device", device), ("autocast", autocast)) if value is not None}
        if not progress:
            run["progress"] = False
        # under torchrun the ranks split the tasks (pyfuse.adaptive.loop)
        with distributed.group(device or config.run.get("device") or "cpu"), torch_threads(threads):
            return run_adaptive(config, out_dir, resume=resume, force=force, trust_code=trust_code,
                                allow_nonfinite=allow_nonfinite, source=source, **run)
    plan = plan_config(config, out_dir, force=force, trust_code=trust_code, dtype=dtype, device=device or "cpu",
                       threads=threads, allow_nonfinite=allow_nonfinite, source=source, other_inputs=other_inputs)
    return plan.write(out_dir, force=force, shard_size=config.shard_size or DEFAULT_SHARD_SIZE,
                      hash_inputs=hash_inputs, progress=progress, other_inputs=other_inputs)


def plan_config(config: MergeConfig, out_dir: str | os.PathLike, *, force: bool = False, trust_code: bool = False,
                dtype: str | None = None, device: str = "cpu", threads: int | None = None,
                allow_nonfinite: bool = False, source: str = "config",
                other_inputs: Sequence[str | os.PathLike] = ()) -> MergePlan:
    """The engine's plan of a config's merge (checked from headers alone). A method that runs the model on its
    tasks gets them loaded first (the config's code, run only with `trust_code`), once `out_dir` is checked."""
    # the output location first: nothing is opened (headers, statistics, the model) for a run that cannot write
    check_output_dir(out_dir, force, [*other_inputs, *input_paths([config.base, *config.models,
                                                                   *(config.statistics or ())], config.method)])
    resolve_device(device)  # before a model is loaded: the device exists
    runs = {}
    if config.method.runs_tasks:
        runs["model"], runs["tasks"] = model_and_tasks(config, trust_code, source)
    return plan_merge(config.method, config.base, config.models, dtype=dtype or config.dtype, device=device,
                      threads=threads, statistics=config.statistics, allow_nonfinite=allow_nonfinite, **runs)


def run_adaptive(config: MergeConfig, out_dir: str | os.PathLike, *, resume: bool = False, force: bool = False,
                 trust_code: bool = False, allow_nonfinite: bool = False, source: str = "config",
                 **run: Any) -> MergeResult:
    """Run a checked adaptive config; outputs go to `out_dir` (see `pyfuse.config.run_from_config`). `run` overrides
    the config's `run` section (`RunOptions` fields, e.g. device="cuda", progress=False)."""
    options = RunOptions(out_dir=out_dir, resume=resume, allow_nonfinite=allow_nonfinite, **{**config.run, **run})
    device = resolve_device(options.device or "cpu")  # a bad device fails before any model is loaded
    autocast_dtype(options.autocast)
    if options.base_on_disk or options.vectors_on_disk:
        if device.type != "cpu":
            raise ValueError(f"base_on_disk and vectors_on_disk hold CPU buffers; this run computes on {device}")
        check_on_disk(out_dir)
    check_trusted(config, trust_code, source)
    inputs = [path for path in (config.base, *config.models) if isinstance(path, (str, os.PathLike))]
    ranks = distributed.current()
    writes = ranks is None or ranks.rank == 0
    with contextlib.ExitStack() as held:
        with ranks.failing_together() if ranks is not None else contextlib.nullcontext():
            # rank 0 writes: it holds out_dir's lock from this check to the end of the run
            target = (held.enter_context(claimed_output_dir(out_dir, force or resume, inputs)) if writes else
                      check_output_dir(out_dir, True, inputs))
        if ranks is not None:  # every rank checked before rank 0 writes into out_dir
            ranks.sync()

        # A rank reads only its shard of the task vectors (so a bad tensor may fail one rank alone: it fails all)
        with ranks.failing_together() if ranks is not None else contextlib.nullcontext():
            options.inputs = InputIdentity.of_files({role: checkpoint_files(raw) for role, raw in
                                                     [("base", config.base), *zip(config.names, config.models)]})
            model, tasks = model_and_tasks(config, trust_code, source)
            check_architecture(model, config.base, f"{source}: the model ({type(model).__name__})")
            shard_of = (ranks.rank, ranks.world_size) if ranks is not None and config.method.loads_shard else None
            task_vectors = TaskVectors.from_models(config.base, config.models, names=config.names,
                                                   dtype=VECTOR_DTYPES[config.vector_dtype],
                                                   progress=options.progress, allow_nonfinite=allow_nonfinite,
                                                   shard_of=shard_of, device=device,
                                                   base_dir=out_dir if options.base_on_disk else None,
                                                   vectors_dir=out_dir if options.vectors_on_disk else None)
            if force and not resume and writes:  # as a static merge replaces it: nothing earlier stays beside
                remove_replaced(target)
        if ranks is not None:
            ranks.sync()
        return config.method.run(model, task_vectors, tasks, options)


def check_trusted(config: MergeConfig, trust_code: bool, source: str = "config") -> None:
    """Raise unless `trust_code`: the config's `tasks` and `architecture` are code that would be run."""
    code = [f"tasks.{name}" for name in config.tasks] + (["architecture"] if config.architecture else [])
    if not trust_code:
        raise PermissionError(f"{source}: {', '.join(code)} name Python callables that would be imported and run; "
                              "pass --trust-code (trust_code=True) only for a config whose code you trust")


def model_and_tasks(config: MergeConfig, trust_code: bool, source: str = "config") -> tuple[torch.nn.Module,
                                                                                           list[Task]]:
    """The model (the `architecture` callable's, or transformers.AutoModel's from the base) and one Task per
    model, in the models' order: the config's code, run only with `trust_code`."""
    check_trusted(config, trust_code, source)
    base, architecture = config.base, config.architecture
    model = _load_callable(architecture, "architecture", source)(base) if architecture else _auto_model(base, source)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{source}: architecture {architecture!r} returned a {type(model).__name__}, not an "
                        "nn.Module")
    return model, [_make_task(name, config.tasks[name], source) for name in config.names]


def _make_task(name: str, spec: Any, source: str) -> Task:
    if isinstance(spec, Mapping):
        if set(spec) - {"factory", "kwargs"} or "factory" not in spec:
            raise ValueError(f"{source}: task {name!r} must be 'module:function' or "
                             "{factory: ..., kwargs: {...}}")
        factory, kwargs = spec["factory"], dict(spec.get("kwargs") or {})
    else:
        factory, kwargs = spec, {}
    task = _load_callable(factory, f"task {name!r}", source)(**kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"{source}: task {name!r}: {factory} returned a {type(task).__name__}, not a pyfuse.Task")
    if task.name != name:
        raise ValueError(f"{source}: task {name!r}: {factory} returned a task named {task.name!r}")
    return task


def _load_callable(spec: Any, what: str, source: str):
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{source}: {what} must be a 'module:function' string, got {spec!r}")
    module_name, attribute = spec.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{source}: {what}: cannot import {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{source}: {what}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{source}: {what}: {spec!r} is not callable")
    return target


def _auto_model(base: Any, source: str) -> torch.nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{source}: cannot build the model from base {base!r} with transformers.AutoModel ({err}); "
            "name an 'architecture' callable"
        ) from None
