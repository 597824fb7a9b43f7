"""The engine of test-time adaptive merging; the methods that run it (AdaMerging, AdaMerging++, Concrete Task
Arithmetic, Concrete AdaMerging) are registered in `pyfuse.methods.learned` (docs/adaptive-methods.md).

A run has up to two phases over one global step count:
- "meta" (Algorithm 1): per outer step t, the relaxed mask is sampled with t as the Philox counter; if the
  coefficients are learned, they are reset to their initial value and take `inner_steps` first-order steps
  with the mask held fixed (logits detached); then the model is re-merged with the mask attached and the
  updated coefficients held fixed, and the logits take one step.
- "adapt" (AdaMerging; phase 2 of Concrete AdaMerging): the mask is fixed (the evaluation mask, or none),
  the coefficients are reset once and trained.

Memory: each pass merges once through the fused op; the merged parameters, detached, feed the tasks'
forward and backward one after the other (so their activations never coexist), which accumulate
dL/d(merged) into one `[D]` buffer; then the fused backward runs once. Only the op's backward reads the
task vectors.

Under torch.distributed (torchrun, or a group the caller initialised; `pyfuse.distributed`), the tasks are
split across the ranks (rank r runs tasks r, r + N, ...) and so is the flat buffer, FSDP-style: rank r holds
the base, task vectors and mask logits (and the logits' Adam moments) of its shard only, a contiguous run of
whole segments balanced by bytes (`ConcreteMerger`), so that memory falls as 1/N; the coefficients (`[n]` or
`[n, S]`) are replicated. Each pass, every rank merges its shard with the fused op, the shards are
all-gathered into the whole merged `[D]` the model needs, the rank's tasks accumulate their gradients into a
`[D]` buffer, one all-reduce sums the buffers (and the entropies, in one more entry), the fused backward runs
on the rank's slice of it, and the coefficients' gradients (each rank's covers its segments) are
all-reduced; every rank then takes the same coefficient step and its own logits' step. Sums are added in
another order than in one process (float32 reassociation). Every collective follows a `Ranks.sync`, and an
error on one rank is raised on every rank (`RankFailed` with its message) instead of a hang. Checkpoints have
the one-process format (rank 0 writes the gathered logits and moments; a resumed rank takes its slice) and
resume with the same world size. Rank 0 alone writes checkpoints and outputs; evaluation runs every task on
every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import distributed
from ..device import autocast, autocast_dtype, place_run, resolve_device
from ..finite import check_finite
from ..io.atomic import atomic_dir, atomic_path, remove_stale_temporaries
from ..io.identity import InputIdentity, new_digest, update_digest
from ..io.lock import output_lock
from ..ops import DEFAULT_TEMPERATURE, MODES
from ..ops.backends import BACKENDS, resolve
from ..ops.profiling import nvtx_range
from ..progress import progress_bar
from ..task import BatchStream, Task, entropy_loss, evaluate_tasks, evaluate_with_class_shares
from ..taskvectors import TaskVectors
from .checkpoint import load_checkpoint, save_checkpoint
from .merger import EVAL_STEP, ConcreteMerger
from .report import write_report

CHECKPOINT_NAME = "checkpoint.pt"
REPORT_NAME = "report.json"
MASK_NAME = "mask.safetensors"
MERGED_NAME = "merged"
EVAL_MASKS = ("relaxed", "hard", "threshold")
INNER_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class Settings:
    """Everything that decides a run's result; a checkpoint resumes only a run with the same settings."""

    method: str
    coefficients: str
    meta_steps: int = 0
    inner_steps: int = 0
    adapt_steps: int = 0
    init: float = 0.3
    clamp: bool = False
    inner_lr: float = 1.0
    inner_optimizer: str = "adam"
    mask_lr: float = 1e-3
    lr: float = 1e-3
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0
    eval_mask: str = "none"
    rescale: bool = True
    density: float | None = None
    vectors: str = "raw"  # the per-task vectors merged (`pyfuse.methods.vector_sources`)
    exclude_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("meta_steps", "inner_steps", "adapt_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.meta_steps >= EVAL_STEP:
            raise ValueError(f"meta_steps must be < {EVAL_STEP} (the Philox counter of the evaluation mask)")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {tuple(INNER_OPTIMIZERS)}, got {self.inner_optimizer!r}")
        if self.eval_mask not in MODES:
            raise ValueError(f"eval_mask must be one of {MODES}, got {self.eval_mask!r}")
        if self.meta_steps and self.eval_mask == "none":
            raise ValueError(f"a learned mask is evaluated with one of {EVAL_MASKS}, not 'none'")
        for name in ("inner_lr", "mask_lr", "lr"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


@dataclass
class RunOptions:
    """How a run is carried out; none of these changes the learned result.

    Attributes:
        out_dir: where the checkpoint, report, mask and merged model go (nothing is written without it).
        resume: continue from `out_dir/checkpoint.pt` (an error if there is none).
        checkpoint_every: write the checkpoint every this many steps (0: only at the end).
        eval_every: measure test accuracy every this many steps (None: before and after only).
        eval_start: measure it before the first step too (skip it when the caller already knows it).
        progress: show a progress bar (`pyfuse.progress`) with the summed entropy.
        backend: the fused op's backend ("auto", "cpp", "triton", "reference"; auto is Triton on CUDA).
        allow_nonfinite: write a merged model holding NaN or inf instead of raising.
        inputs: the identity of the input files (`InputIdentity`): recorded in the checkpoint and report, a
            resume of other inputs refused, and the files checked again before the outputs are written.
        device: where the run computes ("cpu", "cuda", "cuda:N"; None: where the task vectors are). The base,
            task vectors, model and every batch are moved there (`pyfuse.device.place_run`); the mask logits,
            coefficients and optimiser state are created there.
        autocast: run the model's forward passes (adaptation and evaluation) under autocast in "bf16" or
            "fp16" (None: in the model's dtype). The fused merge op stays outside it (fp32 accumulation).
        base_on_disk: hold the base in a disk-backed buffer beside `out_dir` (`pyfuse.memory.disk_buffer`: file
            pages, which the kernel may drop and re-read under memory pressure, not anonymous memory); CPU runs.
            `pyfuse merge` builds it there directly; a loop given an in-memory base copies it there.
        vectors_on_disk: the same for the dense task vectors (`[n, D]`, the largest buffer a run only reads).
    """

    out_dir: str | os.PathLike | None = None
    resume: bool = False
    checkpoint_every: int = 100
    eval_every: int | None = None
    eval_start: bool = True
    progress: bool = True
    backend: str = "auto"
    allow_nonfinite: bool = False
    inputs: InputIdentity | None = None
    device: str | torch.device | None = None
    autocast: str | None = None
    base_on_disk: bool = False
    vectors_on_disk: bool = False

    def __post_init__(self) -> None:
        for name, least in (("checkpoint_every", 0), ("eval_every", 1)):
            value = getattr(self, name)
            if not (value is None and name == "eval_every") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("eval_start", "progress", "resume", "allow_nonfinite", "base_on_disk",
                     "vectors_on_disk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        backends = ("auto", *BACKENDS)
        if self.backend not in backends:
            raise ValueError(f"backend must be one of {backends}, got {self.backend!r}")


@dataclass
class MergeResult:
    """The merged model's flat parameters and state dict (views of `flat`), what was learned, and the report."""

    flat: torch.Tensor
    state_dict: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    coefficients: torch.Tensor
    report: dict[str, Any]


class AdaptiveLoop:
    """The bi-level loop over one merger and its tasks; `run()` carries out the whole schedule."""

    def __init__(self, model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task],
                 settings: Settings, options: RunOptions | None = None):
        self.settings = settings
        self.options = options or RunOptions()
        self.ranks = distributed.current()
        autocast_dtype(self.options.autocast)  # a bad name fails before any work
        if self.options.device is not None:
            task_vectors, tasks = place_run(model, task_vectors, tasks, resolve_device(self.options.device))
        self.device = task_vectors.base.device
        if self.options.base_on_disk or self.options.vectors_on_disk:
            if self.options.out_dir is None:
                raise ValueError("base_on_disk and vectors_on_disk put their buffers beside out_dir: give out_dir")
            task_vectors = task_vectors.on_disk(self.options.out_dir, base=self.options.base_on_disk,
                                                vectors=self.options.vectors_on_disk)
        self.merger = ConcreteMerger(
            model, task_vectors, coefficients=settings.coefficients, init=settings.init, clamp=settings.clamp,
            temperature=settings.temperature, seed=settings.seed, rescale=settings.rescale,
            backend=self.options.backend, ranks=self.ranks,
        )
        self.merger.check_tasks(tasks)
        self.tasks = list(tasks)
        rank, world = (self.ranks.rank, self.ranks.world_size) if self.ranks is not None else (0, 1)
        self.streams = [BatchStream(task) for task in self.tasks[rank::world]]  # this rank's tasks
        self.backend = resolve(self.options.backend, task_vectors.base.device)
        self.phases = [(name, steps) for name, steps in (("meta", settings.meta_steps),
                                                         ("adapt", settings.adapt_steps)) if steps]
        learns_coefficients = settings.coefficients != "fixed"
        if settings.meta_steps and learns_coefficients and not settings.inner_steps:
            raise ValueError("learned coefficients need inner_steps >= 1 in the meta phase")
        if settings.adapt_steps and not learns_coefficients:
            raise ValueError("an adapt phase needs learned ('task' or 'layer') coefficients")
        m = self.merger
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if settings.meta_steps:
            # fused: one pass over the [D] logits and states; the default update allocates two [D] temporaries
            self.optimizers["mask"] = torch.optim.Adam([m.logits], lr=settings.mask_lr, fused=True)
            if learns_coefficients:
                # Persists across outer steps (only the coefficients are reset), as the authors' code does.
                self.optimizers["inner"] = INNER_OPTIMIZERS[settings.inner_optimizer]([m.coefficients],
                                                                                     lr=settings.inner_lr)
        if settings.adapt_steps:
            self.optimizers["adapt"] = torch.optim.Adam([m.coefficients], lr=settings.lr)
        self.step = 0
        self.history: dict[str, Any] = {
            "entropy": {"step": [], "phase": [], "value": []},
            "accuracy": {"step": [], "phase": [], "tasks": {t.name: [] for t in self.tasks}, "average": []},
        }

    # ------------------------------------------------------------------------------------------
    # One pass and one step of each phase
    # ------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.phases)

    def _phase_at(self, step: int) -> tuple[str, int]:
        for name, steps in self.phases:
            if step < steps:
                return name, step
            step -= steps
        raise IndexError(f"step {step} is past the schedule")

    def _pass(self, *, step: int, mask: str, train_logits: bool, train_coefficients: bool) -> float:
        """Merge, accumulate every task's entropy gradient into one `[D]` buffer, run the fused backward once;
        returns the summed entropy."""
        with nvtx_range("adaptive.merge"):
            shard = self.merger.merged_shard(step=step, mask=mask, train_logits=train_logits,
                                             train_coefficients=train_coefficients)
            merged = self.merger.gather(shard.detach())
        # with ranks, one entry more carries the entropy through the same all-reduce
        buffer = merged.new_zeros(merged.numel() + (self.ranks is not None))
        grad = buffer[:merged.numel()]
        call = self.merger.bind(merged, grad)
        total = 0.0
        for stream in self.streams:
            name = stream.task.name
            with nvtx_range(f"adaptive.forward:{name}"), self._autocast():
                loss = entropy_loss(stream.task.logits(call, stream.next()))
            if not loss.requires_grad:
                raise RuntimeError(f"task {name!r}: its logits do not depend on the merged parameters")
            with nvtx_range(f"adaptive.backward:{name}"):
                loss.backward()  # this task's graph (and activations) are freed here, before the next task runs
                total += loss.item()
        if self.ranks is not None:
            buffer[-1] = total
            with nvtx_range("adaptive.all_reduce"):
                self.ranks.all_reduce(buffer)
            total = float(buffer[-1])
        lo, hi = self.merger.span
        # Every task has run: the merged values are dead, and their memory goes back before the fused backward
        # allocates the logits' gradient (autograd needs the op's saved inputs, never its output).
        merged.untyped_storage().resize_(0)
        with nvtx_range("adaptive.fused_backward"):
            torch.autograd.backward(shard, grad[lo:hi])
            if self.ranks is not None and train_coefficients:
                # each rank's backward covered its own segments (the optimizer zeroed the gradient before the pass)
                self.ranks.all_reduce(self.merger.coefficients.grad)
        return total

    def _autocast(self):
        """The model's forward in the precision `RunOptions.autocast` asks for (nothing when None)."""
        return autocast(self.device, self.options.autocast)

    def _optimizer_step(self, name: str) -> None:
        with nvtx_range(f"adaptive.optimizer:{name}"):
            self.optimizers[name].step()

    def meta_step(self, t: int) -> float:
        """Outer step t of Algorithm 1; returns the summed entropy of the pass that trains the logits."""
        with nvtx_range("adaptive.outer_step"):
            if "inner" in self.optimizers:
                self.merger.reset_coefficients()
                inner = self.optimizers["inner"]
                for _ in range(self.settings.inner_steps):
                    with nvtx_range("adaptive.inner_step"):
                        inner.zero_grad()
                        self._pass(step=t, mask="relaxed", train_logits=False, train_coefficients=True)
                        self._optimizer_step("inner")
            self.optimizers["mask"].zero_grad()
            entropy = self._pass(step=t, mask="relaxed", train_logits=True, train_coefficients=False)
            self._optimizer_step("mask")
            # the logits' [D] gradient is spent: not held through the next step's inner passes
            self.optimizers["mask"].zero_grad()
        return entropy

    def adapt_step(self) -> float:
        """One AdaMerging step on the coefficients under the fixed evaluation mask."""
        with nvtx_range("adaptive.adapt_step"):
            self.optimizers["adapt"].zero_grad()
            entropy = self._pass(step=EVAL_STEP, mask=self.settings.eval_mask, train_logits=False,
                                 train_coefficients=True)
            self._optimizer_step("adapt")
        return entropy

    # ------------------------------------------------------------------------------------------
    # Evaluation and the merged result
    # ------------------------------------------------------------------------------------------
    def merged_flat(self) -> torch.Tensor:
        """The current merged model: the evaluation mask (seeded, at `EVAL_STEP`) and current coefficients."""
        with torch.no_grad():
            return self.merger.merged_flat(step=EVAL_STEP, mask=self.settings.eval_mask)

    def evaluate(self, flat: torch.Tensor) -> dict[str, float]:
        """Test accuracy of every task that has labelled test data."""
        with nvtx_range("adaptive.evaluate"), self._autocast():
            return evaluate_tasks(self.merger.bind(flat), self.tasks)

    def _record_accuracy(self, step: int, phase: str, accuracy: dict[str, float] | None = None) -> None:
        if accuracy is None:
            accuracy = self.evaluate(self.merged_flat())
        if not accuracy:
            return
        record = self.history["accuracy"]
        record["step"].append(step)
        record["phase"].append(phase)
        for name, value in accuracy.items():
            record["tasks"][name].append(value)
        record["average"].append(sum(accuracy.values()) / len(accuracy))

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        tv = self.merger.task_vectors
        found = {
            "settings": dataclasses.asdict(self.settings), "backend": self.backend, "tasks": tv.names,
            "numel": tv.layout.numel, "segments": len(tv.layout), "vector_dtype": str(tv.vectors.dtype),
        }
        if self.options.inputs is not None:  # what the models' files held, by role: they fix the task vectors
            found["inputs"] = {role: [entry["sha256"] for entry in files]
                               for role, files in self.options.inputs.files.items()}
        else:  # given in memory: what was merged is the identity (hashed once, never twice with the files)
            found["task_vectors"] = self._vectors_digest()
        found["world_size"] = self.ranks.world_size if self.ranks is not None else 1  # who draws which batches
        return found

    def _vectors_digest(self) -> list[str]:
        """The sha256 of the base and task vectors every rank holds (computed once: the buffers never change)."""
        if not hasattr(self, "_vectors_sha256"):
            digest = new_digest()
            tv = self.merger.task_vectors
            for tensor in (tv.base, tv.vectors):
                update_digest(digest, tensor)
            mine = digest.hexdigest()
            self._vectors_sha256 = self.ranks.sync(mine) if self.ranks is not None else [mine]
        return self._vectors_sha256

    def state(self) -> dict[str, Any]:
        """The checkpoint: the logits and the mask optimizer's moments whole, gathered from the ranks' shards."""
        m = self.merger
        return {
            "fingerprint": self._fingerprint(),
            "step": self.step,
            "seed": self.settings.seed,
            "logits": m.gather(m.logits.detach()).clone(),
            "coefficients": m.coefficients.detach().clone(),
            "optimizers": {name: _map_moments(opt.state_dict(), m.logits.shape, m.gather) if name == "mask"
                           else opt.state_dict() for name, opt in self.optimizers.items()},
            "drawn": self._drawn(),
            "data": self._data(),
            "history": self.history,
        }

    def _drawn(self) -> dict[str, int]:
        """Batches drawn so far per task, over every rank's tasks."""
        return self._per_task({s.task.name: s.drawn for s in self.streams})

    def _data(self) -> dict[str, str]:
        """The sha256 of the batches drawn so far per task, over every rank's tasks."""
        return self._per_task({s.task.name: s.data.hexdigest() for s in self.streams})

    def _per_task(self, mine: dict[str, Any]) -> dict[str, Any]:
        if self.ranks is None:
            return mine
        return {name: value for part in self.ranks.sync(mine) for name, value in part.items()}

    @property
    def _writes(self) -> bool:
        """Whether this process writes checkpoints and outputs (rank 0 of a group)."""
        return self.ranks is None or self.ranks.rank == 0

    def _save(self, checkpoint: Path) -> None:
        with nvtx_range("adaptive.checkpoint"):
            state = self.state()  # every rank: the batch counts are gathered
            if self._writes:
                save_checkpoint(checkpoint, state)

    def load_state(self, state: dict[str, Any]) -> None:
        expected, found = self._fingerprint(), state["fingerprint"]
        if found != expected:
            differ = _differences(expected, found)
            raise ValueError(f"the checkpoint belongs to a different run; differing: {', '.join(differ)}")
        lo, hi = self.merger.span
        with torch.no_grad():
            self.merger.logits.copy_(state["logits"][lo:hi])
            self.merger.coefficients.copy_(state["coefficients"])
        for name, opt in self.optimizers.items():
            saved = state["optimizers"][name]
            if name == "mask":  # this rank's slice of the whole moments
                saved = _map_moments(saved, state["logits"].shape, lambda moment: moment[lo:hi].clone())
            opt.load_state_dict(saved)
        for stream in self.streams:
            stream.skip_to(state["drawn"][stream.task.name])
            if stream.data.hexdigest() != state["data"][stream.task.name]:
                raise ValueError(f"the checkpoint belongs to a different run; differing: the data of task "
                                 f"{stream.task.name!r} (its first {stream.drawn} batches are not the ones the "
                                 "checkpointed run drew)")
        self.history = state["history"]
        self.step = state["step"]

    # ------------------------------------------------------------------------------------------
    # The whole run
    # ------------------------------------------------------------------------------------------
    def run(self) -> MergeResult:
        """Carry out the whole schedule. Across ranks, an error on any rank is raised on every rank (the others
        raise `RankFailed` with its message). The writer holds `out_dir`'s lock (`pyfuse.io.lock`) throughout."""
        out_dir = self.options.out_dir
        with (output_lock(out_dir) if out_dir is not None and self._writes else contextlib.nullcontext(),
              nvtx_range("adaptive.run")):
            if out_dir is not None and self._writes:
                remove_stale_temporaries(out_dir)
            if self.ranks is None:
                return self._run()
            with self.ranks.failing_together():
                result = self._run()
                self.ranks.sync()  # after rank 0 wrote the outputs: a failure there fails every rank
            return result

    def _run(self) -> MergeResult:
        opts, out_dir = self.options, _maybe_path(self.options.out_dir)
        checkpoint = out_dir / CHECKPOINT_NAME if out_dir is not None else None
        resumed_from = None
        if opts.resume:
            if checkpoint is None:
                raise ValueError("resume needs out_dir (the checkpoint is read from out_dir/checkpoint.pt)")
            self.load_state(load_checkpoint(checkpoint))
            resumed_from = self.step
        elif opts.eval_start:
            self._record_accuracy(0, self.phases[0][0] if self.phases else "none")
        started = time.perf_counter()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.settings.method,
                           disable=not opts.progress)
        try:
            while self.step < self.total_steps:
                phase, t = self._phase_at(self.step)
                if phase == "adapt" and t == 0:
                    self.merger.reset_coefficients()
                entropy = self.meta_step(t) if phase == "meta" else self.adapt_step()
                self.step += 1
                record = self.history["entropy"]
                record["step"].append(self.step)
                record["phase"].append(phase)
                record["value"].append(entropy)
                if opts.eval_every and self.step % opts.eval_every == 0 and self.step < self.total_steps:
                    self._record_accuracy(self.step, phase)
                if checkpoint is not None and opts.checkpoint_every and self.step % opts.checkpoint_every == 0:
                    self._save(checkpoint)
                bar.update(1)
                bar.set_postfix(entropy=f"{entropy:.4f}")
        finally:
            bar.close()
        flat = self.merged_flat()
        logits = self.merger.gather(self.merger.logits.detach()).clone()
        with nvtx_range("adaptive.evaluate"), self._autocast():
            final, shares = evaluate_with_class_shares(self.merger.bind(flat), self.tasks)
        if self.history["accuracy"]["step"][-1:] != [self.step]:
            self._record_accuracy(self.step, self.phases[-1][0] if self.phases else "none", final)
        report = self._report(final, shares, resumed_from, time.perf_counter() - started, logits)
        if out_dir is not None:
            if opts.inputs is not None:  # the result is of the files as they still are
                opts.inputs.check_unchanged()
            self._save(checkpoint)
            if self._writes:
                with nvtx_range("adaptive.write"):
                    self._write_outputs(out_dir, flat, logits, report)
        m = self.merger
        return MergeResult(
            flat=flat,
            state_dict=m.task_vectors.state_dict(flat),
            logits=logits if self.settings.meta_steps else None,
            coefficients=m.weights().detach().clone(),
            report=report,
        )

    def _report(self, final: dict[str, float], shares: dict[str, float], resumed_from: int | None,
                seconds: float, logits: torch.Tensor) -> dict[str, Any]:
        s, m = self.settings, self.merger
        masked = s.eval_mask != "none"
        report: dict[str, Any] = {
            "method": s.method,
            "tasks": [t.name for t in self.tasks],
            "settings": dataclasses.asdict(s),
            "backend": self.backend,
            "device": str(self.device),
            "autocast": self.options.autocast,
            "vector_dtype": str(m.task_vectors.vectors.dtype),
            "phases": [{"name": name, "steps": steps} for name, steps in self.phases],
            "eval_mask": (
                {"mode": s.eval_mask, "seed": s.seed, "step": EVAL_STEP, "temperature": s.temperature,
                 "rescale": s.rescale}
                if masked else None
            ),
            "final_accuracy": final,
            "final_average": sum(final.values()) / len(final) if final else None,
            "final_class_share": shares,
            "coefficients": m.weights().detach().tolist(),
            "entropy": self.history["entropy"],
            "accuracy": self.history["accuracy"],
            "steps": self.step,
            "resumed_from": resumed_from,
            "seconds": seconds,
            "identity": {  # what a resume must match (`_fingerprint`), with the inputs' files in full
                "inputs": self.options.inputs.files if self.options.inputs is not None else None,
                "data": {name: {"batches": count, "sha256": digest}
                         for (name, count), digest in zip(self._drawn().items(), self._data().values())},
                "world_size": self.ranks.world_size if self.ranks is not None else 1,
            },
        }
        if self.ranks is not None:
            lo, hi = m.span
            shard = {"rank": self.ranks.rank, "segments": list(m.task_vectors.segments), "elements": hi - lo,
                     "task_vector_bytes": m.task_vectors.nbytes}
            report["distributed"] = {"world_size": self.ranks.world_size, "backend": self.ranks.backend,
                                     "shards": self.ranks.sync(shard)}
        if masked:
            report["mask"] = {"mean_eval_mask": float(m.mask(step=EVAL_STEP, mask=s.eval_mask).mean()),
                              **mask_movement(logits)}
        return report

    def _write_outputs(self, out_dir: Path, flat: torch.Tensor, logits: torch.Tensor, report: dict[str, Any]) -> None:
        m = self.merger
        check_finite(flat, f"{self.settings.method}: merged model", self.options.allow_nonfinite)
        if self.settings.meta_steps:
            named = {name: view.to("cpu", copy=True) for name, view in m.task_vectors.layout.unflatten(logits).items()}
            metadata = {"seed": str(m.seed), "temperature": str(m.temperature), "eval_mask": self.settings.eval_mask,
                        "eval_step": str(EVAL_STEP), "rescale": str(m.rescale)}
            with atomic_path(out_dir / MASK_NAME) as tmp:
                save_file(named, str(tmp), metadata=metadata)
        tensors = m.export_state_dict(flat)
        with atomic_dir(out_dir / MERGED_NAME) as tmp:
            if hasattr(m.model, "save_pretrained"):
                m.model.save_pretrained(tmp, state_dict=tensors)
            else:
                save_file(tensors, str(tmp / "model.safetensors"))
        write_report(out_dir / REPORT_NAME, report)


def _map_moments(state: dict[str, Any], shape: torch.Size,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """An optimizer's state dict with `fn` applied to its per-element tensors (shaped like the parameter, `shape`)."""
    return {**state, "state": {key: {name: fn(value) if isinstance(value, torch.Tensor) and value.shape == shape
                                      else value for name, value in per_param.items()}
                               for key, per_param in state["state"].items()}}


def _maybe_path(path: str | os.PathLike | None) -> Path | None:
    return None if path is None else Path(path)


def _differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (this run {a!r}, checkpoint {b!r})")
    return out


def mask_movement(logits: torch.Tensor, chunk: int = 1 << 22) -> dict[str, float]:
    """How far the learned mask moved from its uniform start (logits 0, keep-probability 0.5): the mean keep-
    probability, the mean |p - 0.5|, the fractions of parameters with p < 0.1 and p > 0.9, and the largest |logit|
    (sums in float64, `chunk` elements at a time: no [D] temporary). A mask whose |p - 0.5| stays near 0 was not
    learned, whatever the accuracy."""
    flat = logits.detach().reshape(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=flat.device)
    largest = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo:lo + chunk]
        p = torch.sigmoid(part.double())
        sums += torch.stack([p.sum(), (p - 0.5).abs().sum(), (p < 0.1).sum(), (p > 0.9).sum()]).double()
        largest = torch.maximum(largest, part.abs().max())
    mean_p, mean_move, below, above = (sums / max(flat.numel(), 1)).tolist()
    return {"mean_probability": mean_p, "mean_abs_p_minus_half": mean_move, "fraction_below_0.1": below,
            "fraction_above_0.9": above, "max_abs_logit": float(largest)}
