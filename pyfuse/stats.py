"""Per-task statistics for data-aware merges (Fisher, RegMean, MaTS, ESM), collected once and saved to a file.

A `Statistics` holds, for one fine-tuned model on its task's data, tensors keyed by (kind, parameter name):

- "gram_in": the input Gram `X^T X / rows` of every Linear layer, `[in, in]`, keyed by the layer's weight name
  (the inputs only, also for a Linear with a bias);
- "gram_out": the Gram of the gradients of `log p(y|x)` at the layer's outputs, `G^T G / rows`, `[out, out]`;
- "fisher": the diagonal Fisher, the mean over examples of the squared per-example gradient of `log p(y|x)`,
  keyed by every trainable parameter name, shaped like the parameter;
- "acts": up to `max_rows` input rows of every Linear layer, sampled uniformly without replacement, `[k, in]`.

`rows` counts the tokens (rows of the layer's input) that enter a layer after token masking; it is kept per
layer in `counts`, since a layer applied to pooled inputs sees one row per example, not one per token.
Linear layers are `nn.Linear` and Hugging Face's `Conv1D` (GPT-2), whose weight is stored transposed as
`[in, out]`; the names of such weights are kept in `transposed`, so the Gram shapes stay `[in, in]`/`[out, out]`.

`collect_statistics` runs the model over a task's batches with forward hooks (and, for the gradient kinds,
one backward per batch), on the CPU or on a `device` (the model and the batches go there, the running sums stay
there, the finished statistics come back to the CPU); `Statistics.save`/`Statistics.load` keep them in one
safetensors file whose header carries the metadata, and tensors are read from it one at a time, when a merge
asks for them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .device import OnDevice, resolve_device
from .io.atomic import atomic_path
from .io.sources import TensorSource, open_source
from .ops.profiling import nvtx_range
from .progress import progress_bar
from .task import ModelCall, Task

__all__ = ["KINDS", "Statistics", "collect_statistics", "join_statistics", "model_fingerprint", "seeded_kinds"]

KINDS = ("gram_in", "gram_out", "fisher", "acts")
GRADIENT_KINDS = ("gram_out", "fisher")
LABEL_MODES = ("sampled", "gold")
METADATA_KEY = "pyfuse_statistics"
FINGERPRINT_PREFIX = "params-sha256:"  # fingerprints without it (older files) cover other tensors: not compared
FORMAT = "pyfuse-statistics/1"
FISHER_CHUNK_BYTES = 256 << 20  # per-example gradients held at once: bounds the Fisher's memory, not its result


class Statistics:
    """One task's statistics: tensors keyed by (kind, parameter name) plus what they were collected from.

    Attributes:
        task: the task's name.
        examples: examples seen (rows of the logits).
        tokens: token rows that passed the token mask (the most any Linear layer saw, without a mask).
        labels: "sampled" or "gold": which `y` the gradient kinds used (None without gradient kinds).
        fingerprint: `model_fingerprint` of the model the statistics were collected on.
        counts: rows each Gram was normalised by, keyed by "kind/name" (examples for "fisher").
        transposed: weight names stored `[in, out]` (Conv1D), whose Grams are still `[in, in]` and `[out, out]`.
        path: the file the statistics were loaded from (None for collected ones).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | TensorSource, *, task: str, examples: int, tokens: int,
                 labels: str | None = None, fingerprint: str | None = None, counts: Mapping[str, int] | None = None,
                 transposed: Iterable[str] = (), path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._source = open_source(tensors, f"statistics {path}" if path is not None else
                                   f"statistics of task {task!r}")
        for key in self._source.keys():
            _split_key(key, self._source.label)
        self.task, self.examples, self.tokens, self.labels = task, int(examples), int(tokens), labels
        self.fingerprint = fingerprint
        self.counts = dict(counts or {})
        self.transposed = frozenset(transposed)
        self.device: torch.device | None = None  # where `get` hands tensors out (None: where they are stored)

    def to(self, device: str | torch.device) -> Statistics:
        """The same statistics, handing every tensor out on `device` as it is read (nothing is read now)."""
        view = copy.copy(self)
        view.device = torch.device(device)
        return view

    @property
    def label(self) -> str:
        """Where the statistics come from (the file, for loaded ones), for error messages."""
        return self._source.label

    @property
    def origin(self) -> str:
        """"task 'name'" and, for loaded statistics, the file: how error messages point at them."""
        return f"task {self.task!r}" + (f", {self.path}" if self.path is not None else "")

    def get(self, kind: str, name: str) -> torch.Tensor | None:
        """The `kind` statistic of parameter `name` (read from the file now, for loaded ones), on `device` for a
        view made by `to`; None if absent."""
        key = f"{_check_kind(kind)}/{name}"
        if key not in self._source.specs:
            return None
        value = self._source.get(key)
        return value if self.device is None else value.to(self.device)

    def shape(self, kind: str, name: str) -> torch.Size | None:
        """The shape of a statistic, from the header alone; None if absent."""
        key = f"{_check_kind(kind)}/{name}"
        return self._source.shape(key) if key in self._source.specs else None

    def names(self, kind: str) -> list[str]:
        """The parameter names that have a `kind` statistic, sorted."""
        prefix = f"{_check_kind(kind)}/"
        return sorted(key[len(prefix):] for key in self._source.keys() if key.startswith(prefix))

    def parameters(self) -> list[str]:
        """The parameter names any statistic covers, sorted: what the fingerprint was taken over."""
        return sorted({_split_key(key, self.label)[1] for key in self._source.keys()})

    def check_model(self, model: Mapping[str, torch.Tensor], label: str) -> None:
        """Raise unless these statistics were collected on `model` (its covered parameters match the fingerprint)."""
        if not (self.fingerprint or "").startswith(FINGERPRINT_PREFIX):
            return
        if model_fingerprint(model, self.parameters()) != self.fingerprint:
            raise ValueError(f"statistics of {self.origin} were not collected on {label}: its parameters differ "
                             "from the ones the statistics' fingerprint records (statistics given for the wrong "
                             "model?)")

    def kinds(self) -> list[str]:
        """The kinds present, in `KINDS` order."""
        present = {key.split("/", 1)[0] for key in self._source.keys()}
        return [kind for kind in KINDS if kind in present]

    @property
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as saved in the file's header."""
        return {"format": FORMAT, "task": self.task, "examples": self.examples, "tokens": self.tokens,
                "labels": self.labels, "fingerprint": self.fingerprint, "counts": self.counts,
                "transposed": sorted(self.transposed)}

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for reports: where from, the task, the kinds and how much data they saw."""
        return {"path": str(self.path.resolve()) if self.path else None, "task": self.task, "kinds": self.kinds(),
                "examples": self.examples, "tokens": self.tokens, "labels": self.labels,
                "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> Path:
        """Write every tensor and the metadata into one safetensors file, atomically; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {key: self._source.get(key).contiguous() for key in self._source.keys()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(self.metadata)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Statistics saved by `save`; tensors are read lazily. Errors name the file and the offending key."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such statistics file")
        source = open_source(path, f"statistics {path}")  # checks the header: names the file if malformed
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: not a pyfuse statistics file (no {METADATA_KEY!r} entry in its header)")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: header entry {METADATA_KEY!r} is not valid JSON ({err})") from None
        found = meta.get("format") if isinstance(meta, dict) else meta
        if found != FORMAT:
            raise ValueError(f"{path}: unsupported statistics format {found!r}; expected {FORMAT!r}")
        for field, types in (("task", str), ("examples", int), ("tokens", int), ("counts", dict),
                             ("transposed", list)):
            if not isinstance(meta.get(field), types):
                raise ValueError(f"{path}: metadata field {field!r} must be a {types.__name__}, "
                                 f"got {meta.get(field)!r}")
        for key in source.keys():
            if not source.dtype(key).is_floating_point:
                raise ValueError(f"{path}: tensor {key!r} is {source.dtype(key)}, expected a floating dtype")
        return cls(source, task=meta["task"], examples=meta["examples"], tokens=meta["tokens"],
                   labels=meta.get("labels"), fingerprint=meta.get("fingerprint"), counts=meta["counts"],
                   transposed=meta["transposed"], path=path)

    def __repr__(self) -> str:
        return (f"Statistics(task={self.task!r}, kinds={self.kinds()}, examples={self.examples}, "
                f"tokens={self.tokens}, from={self.label!r})")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown statistics kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _split_key(key: str, label: str) -> tuple[str, str]:
    kind, sep, name = key.partition("/")
    if not sep or kind not in KINDS or not name:
        raise ValueError(f"{label}: key {key!r} is not '<kind>/<parameter name>' with kind one of {', '.join(KINDS)}")
    return kind, name


def model_fingerprint(model: torch.nn.Module | Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """A digest of the parameters `names` (default: all of a module's): names, shapes and fp32 values, in name order.

    The same from a module as from a checkpoint's tensors, so a merge can check statistics against the model
    given with them (`Statistics.check_model`).
    """
    tensors = dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, torch.nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(tensors if names is None else names):
        value = tensors[name].detach()
        digest.update(f"{name}:{list(value.shape)}\n".encode())
        digest.update(memoryview(value.cpu().to(torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy()))
    return FINGERPRINT_PREFIX + digest.hexdigest()


def seeded_kinds(kinds: Iterable[str], labels: str) -> tuple[str, ...]:
    """The kinds among `kinds` whose values depend on `collect_statistics`' `seed`: "acts" (its rows are
    sampled) and, with `labels="sampled"`, the gradient kinds (their `y` is drawn). The others come out the same
    for every seed, so a run over several seeds can collect them once."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    return tuple(kind for kind in kinds if kind == "acts" or (labels == "sampled" and kind in GRADIENT_KINDS))


def join_statistics(parts: Sequence[Statistics], model: torch.nn.Module | Mapping[str, torch.Tensor]) -> Statistics:
    """One task's statistics from `parts` of different kinds, each collected on the same examples of `model` (e.g.
    the kinds no seed changes, collected once, and the seeded ones, collected per seed): what one
    `collect_statistics` call with all their kinds gives. Parts of other tasks, examples or models are refused."""
    if not parts:
        raise ValueError("join_statistics needs at least one Statistics")
    first = parts[0]
    seen: dict[str, str] = {}
    for part in parts:
        if (part.task, part.examples) != (first.task, first.examples):
            raise ValueError(f"cannot join statistics of {part.origin} ({part.examples} examples) with those of "
                             f"{first.origin} ({first.examples} examples): not one task's examples")
        for kind in part.kinds():
            if kind in seen:
                raise ValueError(f"statistics kind {kind!r} is in both {seen[kind]} and {part.origin}")
            seen[kind] = part.origin
        part.check_model(model, "the model given to join_statistics")
    labels = {part.labels for part in parts} - {None}
    if len(labels) > 1:
        raise ValueError(f"cannot join statistics of task {first.task!r} with labels {sorted(labels)}")
    tensors = {key: part._source.get(key) for part in parts for key in part._source.keys()}
    return Statistics(tensors, task=first.task, examples=first.examples, tokens=max(p.tokens for p in parts),
                      labels=next(iter(labels), None),
                      fingerprint=model_fingerprint(model, {key.split("/", 1)[1] for key in tensors}),
                      counts={key: n for part in parts for key, n in part.counts.items()},
                      transposed=set().union(*(part.transposed for part in parts)))


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------
class _Layer:
    """One Linear-like module being observed: its weight's name and running sums."""

    def __init__(self, key: str, module: torch.nn.Module, transposed: bool):
        self.key, self.module, self.transposed = key, module, transposed
        weight = module.weight
        self.in_features = weight.shape[0] if transposed else weight.shape[1]
        self.gram_in: torch.Tensor | None = None
        self.gram_out: torch.Tensor | None = None
        self.rows = 0
        self.acts: torch.Tensor | None = None  # kept rows, and their random keys (the smallest keys are kept)
        self.act_keys: torch.Tensor | None = None
        self.outputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # this batch: (output, row mask)


def _linear_layers(model: torch.nn.Module) -> list[_Layer]:
    """`nn.Linear` modules and Conv1D-style ones (a 2-D `weight` of shape `[nx, nf]`, `nf` outputs)."""
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            continue
        if isinstance(module, torch.nn.Linear):
            transposed = False
        elif type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == weight.shape[1]:
            transposed = True
        else:
            continue
        layers.append(_Layer(f"{name}.weight" if name else "weight", module, transposed))
    return layers


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` as `[rows, features]`, keeping the rows the token mask allows when its size matches x's leading dims.

    A layer applied to every token gets the mask; one applied to pooled inputs (one row per example) does not.
    """
    flat = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == flat.shape[0]:
        row_mask = mask.reshape(-1).to(flat.device)
        return flat[row_mask], row_mask
    return flat, None


def _default_logits(call: ModelCall, batch: Any) -> torch.Tensor:
    """The model's output on `batch` (a dict of keyword arguments, a tuple of arguments, or one input)."""
    if isinstance(batch, Mapping):
        out = call(**batch)
    elif isinstance(batch, (tuple, list)):
        out = call(*batch)
    else:
        out = call(batch)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def collect_statistics(
    model: torch.nn.Module,
    task_or_batches: Task | Iterable,
    logits_fn: Callable[[ModelCall, Any], torch.Tensor] | None = None,
    *,
    kinds: Sequence[str] = ("gram_in",),
    labels: str = "sampled",
    label_fn: Callable[[Any], torch.Tensor] | None = None,
    token_mask_fn: Callable[[Any], torch.Tensor] | None = None,
    max_rows: int = 512,
    max_batches: int | None = None,
    name: str | None = None,
    progress: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    parameters: Iterable[str] | None = None,
) -> Statistics:
    """Statistics of `model` on one task's batches (one pass over them, or the first `max_batches`).

    Args:
        model: the fine-tuned model; it is run in eval mode (restored after) and not modified.
        task_or_batches: a `pyfuse.Task` (its `batches` and `logits` are used) or an iterable of batches.
        logits_fn: `logits_fn(model, batch) -> [B, C]`, as `Task.logits`; default: the model's output (its
            `.logits` for Hugging Face models) on the batch as keyword arguments / arguments / one input.
        kinds: which statistics, among "gram_in", "gram_out", "fisher", "acts".
        labels: for "gram_out" and "fisher", the `y` of `log p(y|x)`: "sampled" from the model's predictive
            distribution (the true Fisher; seeded) or "gold" from `label_fn(batch) -> [B]` class indices.
        token_mask_fn: `token_mask_fn(batch) -> bool` mask over the tokens (e.g. the attention mask `[B, L]`);
            rows where it is False are left out of the Grams and of "acts".
        max_rows: rows of each Linear's input kept for "acts".
        name: the task's name (default: the Task's, else "task").
        parameters: the parameter names to collect for (e.g. the ones a merge combines: a LoRA fine-tune's
            targets): Grams and "acts" of the Linear weights among them, the Fisher of the trainable ones among
            them. Default: every Linear weight and every trainable parameter. A name the model lacks is an error.
        device: where the model runs and the sums accumulate ("cpu", "cuda", "cuda:1"); the model is moved
            there (in place, as `nn.Module.to`, and left there), each batch as it is drawn; the statistics
            come back to the CPU. Default: where the model is, batches as given. A task's own tensors (a
            classifier head inside its `logits`) must already be there.

    Per-example gradients for the Fisher come from one backward per batch, vectorised over the examples by
    autograd (`is_grads_batched`), a few examples at a time so that at most `FISHER_CHUNK_BYTES` of them are
    held: exact per-example gradients, as a loop over examples would give, without a forward per example.
    """
    kinds = tuple(kinds)
    if not kinds or any(kind not in KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names among {', '.join(KINDS)}, got {list(kinds)}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    gradients = any(kind in GRADIENT_KINDS for kind in kinds)
    if gradients and labels == "gold" and label_fn is None:
        raise ValueError("labels='gold' needs label_fn(batch) -> [B] class indices")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    if isinstance(task_or_batches, Task):
        if logits_fn is not None:
            raise ValueError(f"task {task_or_batches.name!r}: give logits_fn through the Task, not both")
        batches, logits_fn, name = task_or_batches.batches, task_or_batches.logits, name or task_or_batches.name
    else:
        if not isinstance(task_or_batches, Iterable):
            raise TypeError(f"expected a pyfuse.Task or an iterable of batches, got {type(task_or_batches).__name__}")
        batches, logits_fn, name = task_or_batches, logits_fn or _default_logits, name or "task"
    wanted = None if parameters is None else set(parameters)
    if wanted is not None:
        missing = sorted(wanted - {key for key, _ in model.named_parameters(remove_duplicate=False)})
        if missing:
            raise ValueError(f"parameters not in {type(model).__name__}: {', '.join(map(repr, missing[:5]))}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    def trainable() -> list[tuple[str, torch.nn.Parameter]]:
        return [(key, p) for key, p in model.named_parameters()
                if p.requires_grad and (wanted is None or key in wanted)]

    layers = [layer for layer in _linear_layers(model) if wanted is None or layer.key in wanted] \
        if any(kind != "fisher" for kind in kinds) else []
    among = "" if wanted is None else " among the parameters given"
    if any(kind != "fisher" for kind in kinds) and not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer{among} to collect {list(kinds)} on")
    params = trainable() if "fisher" in kinds else []
    if "fisher" in kinds and not params:
        raise ValueError(f"the Fisher needs trainable parameters (requires_grad=True); the model has none{among}")
    if "gram_out" in kinds and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("gram_out needs gradients at the layers' outputs, but no parameter requires grad")

    count = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    if device is not None:
        device = resolve_device(device)
        model.to(device)  # may give the model new Parameter objects (a move to another kind of tensor)
        params = trainable() if "fisher" in kinds else []
        batches = OnDevice(batches, device)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    fisher = {key: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for key, p in params}
    state = {"mask": None}
    examples = tokens = 0

    def hook(layer: _Layer):
        def observe(module, inputs, output):
            x, row_mask = _rows(inputs[0].detach(), state["mask"])
            layer.rows += x.shape[0]
            if "gram_in" in kinds:
                gram = x.float().T @ x.float()
                layer.gram_in = gram if layer.gram_in is None else layer.gram_in + gram
            if "acts" in kinds and x.shape[0]:
                keys = torch.rand(x.shape[0], generator=generator).to(x.device)
                kept = x.float() if layer.acts is None else torch.cat([layer.acts, x.float()])
                kept_keys = keys if layer.act_keys is None else torch.cat([layer.act_keys, keys])
                order = kept_keys.argsort()[:max_rows]
                layer.acts, layer.act_keys = kept[order], kept_keys[order]
            if "gram_out" in kinds and output.requires_grad:
                layer.outputs.append((output, row_mask))
        return observe

    was_training = model.training
    model.eval()
    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    try:
        for i, batch in enumerate(progress_bar(batches, desc=f"statistics: {name}", total=count, unit="batch",
                                              disable=not progress)):
            if max_batches is not None and i >= max_batches:
                break
            mask = token_mask_fn(batch).bool() if token_mask_fn is not None else None
            state["mask"] = mask
            with nvtx_range(f"stats.forward:{name}"), torch.set_grad_enabled(gradients):
                logits = logits_fn(model, batch)  # gram_in and acts accumulate in the forward hooks
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError(f"task {name!r}: the logits must be a [B, C] tensor, got "
                                 f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            examples += logits.shape[0]
            tokens += int(mask.sum()) if mask is not None else 0
            if gradients:
                log_p = _label_log_probs(logits, labels, label_fn, batch, generator, name)
                if "fisher" in kinds:
                    with nvtx_range(f"stats.fisher:{name}"):
                        _accumulate_fisher(log_p, params, fisher)
                if "gram_out" in kinds:
                    with nvtx_range(f"stats.gram_out:{name}"):
                        _accumulate_gram_out(log_p, layers)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for layer in layers:
            layer.outputs.clear()
    if examples == 0:
        raise ValueError(f"task {name!r}: no batches to collect statistics on")
    if token_mask_fn is None:
        tokens = max((layer.rows for layer in layers), default=0)
    return _assemble(kinds, layers, fisher, examples, tokens, name, labels if gradients else None, model)


def _label_log_probs(logits: torch.Tensor, labels: str, label_fn, batch, generator: torch.Generator,
                     name: str) -> torch.Tensor:
    """`log p(y_b | x_b)` per example `[B]`, y gold or sampled from the model's softmax."""
    log_probs = logits.float().log_softmax(dim=-1)
    if labels == "gold":
        y = torch.as_tensor(label_fn(batch)).to(device=logits.device, dtype=torch.long).reshape(-1)
        if y.shape[0] != logits.shape[0] or (y.numel() and (y.min() < 0 or y.max() >= logits.shape[1])):
            raise ValueError(f"task {name!r}: label_fn gave labels {y.tolist()[:8]} for logits of shape "
                             f"{list(logits.shape)}")
    else:
        y = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).squeeze(1).to(logits.device)
    return log_probs.gather(1, y[:, None]).squeeze(1)


def _accumulate_fisher(log_p: torch.Tensor, params: list[tuple[str, torch.nn.Parameter]],
                       fisher: dict[str, torch.Tensor]) -> None:
    """Add the squared per-example gradients of `log_p[b]` to `fisher`, a bounded number of examples at a time."""
    tensors = [p for _, p in params]
    per_example = 4 * sum(p.numel() for p in tensors)
    step = max(1, FISHER_CHUNK_BYTES // per_example)
    eye = torch.eye(log_p.shape[0], dtype=log_p.dtype, device=log_p.device)
    for lo in range(0, log_p.shape[0], step):
        grads = torch.autograd.grad(log_p, tensors, grad_outputs=eye[lo: lo + step], is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        for (key, _), grad in zip(params, grads):
            if grad is not None:  # a parameter the logits do not depend on has zero Fisher
                fisher[key] += grad.float().square().sum(0)


def _accumulate_gram_out(log_p: torch.Tensor, layers: list[_Layer]) -> None:
    """Add `G^T G` of the gradients of `sum_b log_p[b]` at every observed layer output (token-masked rows)."""
    observed = [(layer, output, row_mask) for layer in layers for output, row_mask in layer.outputs]
    for layer in layers:
        layer.outputs.clear()
    if not observed:
        return
    grads = torch.autograd.grad(log_p.sum(), [output for _, output, _ in observed], allow_unused=True)
    for (layer, output, row_mask), grad in zip(observed, grads):
        g = torch.zeros_like(output) if grad is None else grad
        g = g.detach().reshape(-1, g.shape[-1]).float()
        if row_mask is not None:
            g = g[row_mask]
        gram = g.T @ g
        layer.gram_out = gram if layer.gram_out is None else layer.gram_out + gram


def _assemble(kinds, layers, fisher, examples, tokens, name, labels, model) -> Statistics:
    tensors, counts = {}, {}
    for layer in layers:
        if not layer.rows:
            continue  # a layer the forward never reached has no statistics; merges average it
        for kind, value in (("gram_in", layer.gram_in), ("gram_out", layer.gram_out)):
            if kind in kinds and value is not None:
                tensors[f"{kind}/{layer.key}"] = (value / layer.rows).cpu()
                counts[f"{kind}/{layer.key}"] = layer.rows
        if "acts" in kinds:
            tensors[f"acts/{layer.key}"] = layer.acts.cpu()
            counts[f"acts/{layer.key}"] = layer.acts.shape[0]
    for key, value in fisher.items():
        tensors[f"fisher/{key}"] = (value / examples).cpu()
        counts[f"fisher/{key}"] = examples
    return Statistics(tensors, task=name, examples=examples, tokens=tokens, labels=labels,
                      fingerprint=model_fingerprint(model, {key.split("/", 1)[1] for key in tensors}), counts=counts,
                      transposed=[layer.key for layer in layers if layer.transposed])
