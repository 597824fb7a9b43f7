"""The `pyfuse` command line. Subcommands register in `COMMANDS`: `demo`, `finetune`, `merge`, `plot`.

Only this module prints: the library returns values and reports, and the commands turn them into text.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MergeConfig
    from .demo import DemoSettings
    from .engine import MergePlan
    from .methods.learned import MergeResult

_MAIN_EPILOG = """\
examples:
  pyfuse demo                                      the embedded real benchmark end to end (offline)
  pyfuse demo --quick                              the same, shorter schedules (a few minutes)
  pyfuse merge merge.yaml ./merged                 merge the models a config names into ./merged
  pyfuse merge merge.yaml ./merged --dry-run       check everything, predict memory and size, read no weights
  pyfuse merge --help                              the config format and every option

Python: pyfuse.merge("ties", base, [model_a, model_b], density=0.5) returns the merged state dict.
"""

_MERGE_EPILOG = """\
config (YAML):                  one format for every method
  method: ties                  # any method listed below
  base: ./llama-base            # the pre-trained model: HF model directory, sharded
                                #   safetensors directory with its index, or a .safetensors file
  models:                       # the fine-tuned models
    - path: ./llama-math
      weight: 1.0               # optional per-model weight (default 1; static methods)
      statistics: ./stats/math.safetensors   # data-aware methods: per model, saved by
                                #   pyfuse.stats.collect_statistics(...).save(path)
    - ./llama-code              # a bare path when nothing else is needed
                                # or a mapping of task names to paths: {{math: ./math, code: ./code}}
                                #   (adaptive methods need the names; so does a list entry's 'name')
  parameters:                   # the method's parameters; anything left out takes its default
    density: 0.5
    scaling: 0.3
  dtype: bfloat16               # static/data-aware: optional output dtype (default: the base's)
  shard_size: 5GB               # static/data-aware: optional maximum shard size (default 5GB)
  tasks: {{math: mypkg.tasks:math}}        # adaptive, regmean++: per model name, a callable returning a pyfuse.Task
  architecture: mypkg.models:build       # adaptive, regmean++, optional: called with the base, returns the nn.Module
  vector_dtype: bfloat16                 # adaptive, optional: task-vector storage (default float32)
  run: {{checkpoint_every: 100, eval_every: 100}}   # adaptive, optional: pyfuse.RunOptions

Relative paths are resolved from the config file's directory. Every key is checked before any work.

methods: parameters (default)
{methods}
examples:
  pyfuse merge ties.yaml ./merged
  pyfuse merge ties.yaml ./merged --dry-run
  pyfuse merge ties.yaml ./merged --force --dtype bfloat16 --threads 4

The output directory receives model-0000k-of-0000n.safetensors shards with their index, the base's
config.json, tokenizer and other small files, and merge_report.json (method, parameters, inputs with
sha256 hashes, timings, peak memory). It is written under a temporary name and renamed when complete;
an existing directory is replaced only with --force, and never when it holds a file the merge reads.
NaN or inf in an input or the result stops the merge unless --allow-nonfinite.

Adaptive methods learn from the unlabeled data of the tasks their config names: they import and call
those module:function entries, which runs code from the config, so they need --trust-code. Their output
directory receives checkpoint.pt, report.json, mask.safetensors (Concrete methods) and merged/.
regmean++ runs the model on its tasks' batches the same way (tasks, --trust-code) and writes like the
static methods (no --dry-run: it must load the model).
"""

@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


# ---------------------------------------------------------------------------------------------
# pyfuse merge
# ---------------------------------------------------------------------------------------------
def _method_table() -> str:
    from .methods import available_methods, get_method

    lines = []
    for name in available_methods():
        cls = get_method(name)
        note = cls.inputs_note()
        lines.append(f"  {name}: {cls.summary}{' ' + note if note else ''}")
        if cls.reference:
            lines.append(f"      follows: {cls.reference}")
        for key, spec in cls.params.items():
            default = "none" if spec.default is None else spec.default
            lines.append(f"      {key} ({default}): {spec.help}")
    return "\n".join(lines) + "\n"


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML file describing the merge (format below)")
    parser.add_argument("out_dir", type=Path, help="directory to create with the merged model")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate everything and print the plan, predicted peak memory and output size; "
                             "read no tensor data and write nothing")
    parser.add_argument("--device", type=_device_name,
                        help="where the merge computes: cpu (default), cuda or cuda:N; every method kind takes it "
                             "(data-aware methods read each tensor and statistic onto it and solve there; regmean++ "
                             "runs the model there block by block; the merged tensors are written from the CPU)")
    parser.add_argument("--autocast", choices=("bf16", "fp16"),
                        help="adaptive methods: the model's forward passes under autocast in this precision (the "
                             "fused merge op keeps its fp32 accumulation)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR if it exists (never when it holds a file the merge reads)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="let NaN/inf in the inputs or the result (e.g. float16 overflow) into the output "
                             "instead of stopping with an error")
    parser.add_argument("--trust-code", action="store_true",
                        help="adaptive methods and regmean++: allow the config to import and run the Python callables "
                             "it names "
                             "(tasks, architecture); never use it with a config you have not read")
    parser.add_argument("--dtype", help="output dtype (float32, bfloat16, float16); overrides the config")
    parser.add_argument("--threads", type=int, help="chunks merged at once (default: torch's CPU threads); "
                                                     "adaptive methods: torch's CPU threads for the run")
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 of the inputs in the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="adaptive methods: continue from OUT_DIR/checkpoint.pt to the result an uninterrupted "
                             "run gives")


def _device_name(value: str) -> str:
    """cpu, cuda or cuda:N, checked when parsed (whether the device exists is checked before the run)."""
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def _size(nbytes: int | None) -> str:
    """Bytes in binary units, the one unit pyfuse prints sizes in (memory is counted in KiB by the kernel)."""
    if nbytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in rows)


def _plan_rows(summary: dict[str, Any], out_dir: Path, shards: int) -> list[tuple[str, str]]:
    params = " ".join(f"{k}={v}" for k, v in summary["parameters"].items() if v is not None)
    rows = [("method", f"{summary['method']}  {params}")]
    for i, entry in enumerate(summary["inputs"]):
        name = "base" if i == 0 else f"model {i}"
        size = sum(f["bytes"] for f in entry["files"])
        rows.append((name, f"{entry['path'] or entry['label']}  ({entry['tensors']} tensors, "
                           f"{_count(entry['parameters'])} parameters, {len(entry['files'])} files, {_size(size)})"))
    rows.append(("merged", f"{summary['merged_tensors']} tensors, {_count(summary['merged_parameters'])} parameters"
                           f" ({summary['carried_tensors']} non-float tensors copied from the base)"))
    rows += [("upcast", note) for note in summary["dtype_upcasts"]]
    if summary["global_passes"]:
        rows.append(("passes", f"{summary['global_passes']} over the whole model before merging, then one to merge"))
    if summary.get("tensor_passes"):
        rows.append(("passes", f"at most {summary['tensor_passes']} over each tensor before merging it (the whole "
                               f"tensor is needed first), then one to merge"))
    rows.append(("output", f"{out_dir}  ({summary['output_dtype']}, {_size(summary['output_bytes'])} "
                           f"in {shards} shard{'s' if shards > 1 else ''})"))
    rows.append(("device", f"{summary['device']}, {summary['threads']} thread(s), chunks of "
                           f"{_count(summary['chunk_elements'])} elements"))
    return rows


def _print_adaptive(args: argparse.Namespace, config: MergeConfig, result: MergeResult) -> None:
    """An adaptive run's summary: its final accuracies."""
    print(f"merged with {config.method.name} -> {args.out_dir}")
    rows = [(f"accuracy {task}", f"{acc:.4f}") for task, acc in result.report["final_accuracy"].items()]
    if result.report["final_average"] is not None:
        rows.append(("average", f"{result.report['final_average']:.4f}"))
    print(_table([*rows, ("report", str(args.out_dir / "report.json"))]))


def _print_dry_run(args: argparse.Namespace, plan: MergePlan, shard_size: str | int) -> None:
    """What a merge would read and write, and its predicted peak memory."""
    from .io.atomic import check_output_dir
    from .io.writer import ShardedWriter, parse_size

    # the output location is checked before any tensor data is read, in dry runs too
    target = check_output_dir(args.out_dir, args.force, [args.config, *plan.input_paths()])
    shards = len(ShardedWriter(target, plan.outputs, parse_size(shard_size)).shard_names)
    summary = plan.summary()
    print(f"pyfuse merge --dry-run {args.config}: everything checks out; no tensor data was read")
    rows = _plan_rows(summary, args.out_dir, shards)
    rows.append(("peak memory", f"{_size(summary['predicted_peak_rss_anon_bytes'])} anonymous (predicted)"))
    if args.out_dir.exists():
        rows.append(("note", f"{args.out_dir} exists and will be replaced (--force)"))
    print(_table(rows))


def _print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """A merge's summary from its report: files, time by phase, memory."""
    for path in report["removed_stale_partials"]:
        print(f"removed {path}, left by an earlier run of this merge that did not finish")
    timings = report["timings"]
    print(f"merged {report['merged_tensors']} tensors ({_count(report['merged_parameters'])} parameters) "
          f"with {report['method']} in {timings['total_s']:.1f} s -> {args.out_dir}")
    steps = ", ".join(f"{key.removesuffix('_s')} {value:.1f} s" for key, value in timings.items() if key != "total_s")
    print(_table([
        ("files", f"{len(report['output']['shards'])} shard(s), {_size(report['output']['tensor_bytes'])}"),
        ("time", steps),
        ("peak memory", f"{_size(report['peak_rss_anon_bytes'])} anonymous "
                        f"(predicted {_size(report['predicted_peak_rss_anon_bytes'])})"),
        *(("upcast", note) for note in report["dtype_upcasts"]),
        ("report", str(args.out_dir / "merge_report.json")),
    ]))


def _run_merge(args: argparse.Namespace) -> int:
    """One path for every method: the config hands its method to the runner (`pyfuse.runner`)."""
    from .config import ConfigError, load_config
    from .merge import DEFAULT_SHARD_SIZE
    from .method_kinds import refuse_inapplicable
    from .runner import plan_config, run_config

    config = load_config(args.config)
    name, source = config.method.name, str(args.config)
    given = {"dtype": args.dtype is not None, "no_hash": args.no_hash, "resume": args.resume,
             "autocast": args.autocast is not None, "trust_code": args.trust_code}
    refuse_inapplicable(given, name, config.method.kind, lambda option: "--" + option.replace("_", "-"))
    if args.dry_run:
        if config.method.learns:
            raise ConfigError(f"{args.config}: --dry-run is for the static methods; {name} needs data")
        if config.method.runs_tasks:
            raise ConfigError(f"{args.config}: --dry-run reads no tensor data; {name} runs the model on its tasks")
        plan = plan_config(config, args.out_dir, force=args.force, dtype=args.dtype, device=args.device or "cpu",
                           threads=args.threads, allow_nonfinite=args.allow_nonfinite, source=source,
                           other_inputs=[args.config])
        _print_dry_run(args, plan, config.shard_size or DEFAULT_SHARD_SIZE)
        return 0
    result = run_config(config, args.out_dir, force=args.force, resume=args.resume, trust_code=args.trust_code,
                        allow_nonfinite=args.allow_nonfinite, dtype=args.dtype, device=args.device,
                        autocast=args.autocast, threads=args.threads, hash_inputs=not args.no_hash,
                        progress=not args.no_progress, source=source, other_inputs=[args.config])
    if int(os.environ.get("RANK", "0")):  # every rank returns the result; rank 0 prints it
        return 0
    if config.method.learns:
        _print_adaptive(args, config, result)
    else:
        _print_report(args, result)
    return 0


def _add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", type=Path, help="report.json written by an adaptive merge")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: beside the report, .png)")


def _run_plot(args: argparse.Namespace) -> int:
    from .adaptive import plot_report

    print(plot_report(args.report, args.output))
    return 0

def _seeds(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_finetune_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `demo` and `finetune`: which tasks, how to fine-tune, where the cache is."""
    from .finetune import FinetuneConfig
    from .models.text_classifier import DEFAULT_ENCODER

    defaults = FinetuneConfig()
    parser.add_argument("--tasks", type=_csv, help="comma-separated embedded tasks (default: all)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="sentence encoder: hub id or local directory (default: all-MiniLM-L6-v2, packaged)")
    parser.add_argument("--finetune", dest="mode", choices=("full", "lora"), default=defaults.mode,
                        help="full fine-tuning (the paper's vision setting) or LoRA r=16 (its language setting)")
    parser.add_argument("--finetune-steps", type=int,
                        help=f"fine-tuning steps per task (default {defaults.steps}; demo --quick: 50)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="fine-tuning under bfloat16 autocast (mixed precision) or in float32; auto (default): "
                             "bf16 where the device has native bfloat16, else fp32")
    parser.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default 5e-5 full, 5e-4 LoRA)")
    parser.add_argument("--finetune-seed", type=int, default=defaults.seed)
    parser.add_argument("--cache", type=Path, help="where fine-tuned models are kept (default $PYFUSE_CACHE, else "
                                                   "$XDG_CACHE_HOME/pyfuse, else ~/.cache/pyfuse)")
    parser.add_argument("--device", type=_device_name, default="cpu",
                        help="where fine-tuning (and the demo's merges and evaluation) compute: cpu (default), cuda "
                             "or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _finetune_config(args: argparse.Namespace, quick: bool = False):
    from .demo import QUICK_FINETUNE_STEPS
    from .finetune import FinetuneConfig, native_bf16

    steps = args.finetune_steps if args.finetune_steps is not None else (QUICK_FINETUNE_STEPS if quick else None)
    precision = args.precision
    if precision == "auto":  # native bfloat16 is a property of the device that trains
        precision = "bf16" if native_bf16(args.device) else "fp32"
    return FinetuneConfig(mode=args.mode, lr=args.finetune_lr, seed=args.finetune_seed, precision=precision,
                          **({"steps": steps} if steps is not None else {}))


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import ALL_METHODS, LR_MOVEMENT, MASK_MOVEMENT, METHODS, STOCHASTIC, DemoSettings
    from .ops.backends import BACKENDS

    defaults = DemoSettings()
    parser.add_argument("--out", type=Path, default=Path("pyfuse-demo"),
                        help="where report.json and demo.png go (default ./pyfuse-demo; earlier ones are kept)")
    parser.add_argument("--quick", action="store_true",
                        help="10-step schedules, 100 test examples per task, one seed, 50-step fine-tuning")
    parser.add_argument("--steps", type=int, help=f"steps of every adaptive schedule (default {defaults.steps})")
    parser.add_argument("--methods", type=_csv, default=defaults.methods,
                        help=f"comma-separated rows (default: {', '.join(METHODS)}; run only when named: "
                             f"{', '.join(name for name in ALL_METHODS if name not in METHODS)})")
    parser.add_argument("--seeds", type=_seeds,
                        help=f"comma-separated seeds; every stochastic method ({', '.join(STOCHASTIC)}) runs once per "
                             "seed and the table shows mean and standard deviation (default "
                             f"{','.join(map(str, defaults.seeds))}; --quick: 0)")
    parser.add_argument("--test-limit", type=int,
                        help="evaluate (and adapt) on the first N test examples of each task (default: all)")
    parser.add_argument("--lr", type=float, help=f"Adam lr of the coefficients (default {LR_MOVEMENT:g}/steps)")
    parser.add_argument("--mask-lr", type=float, help=f"Adam lr of the mask logits (default {MASK_MOVEMENT:g}/steps)")
    parser.add_argument("--inner-lr", type=float, help=f"Concrete AM's inner Adam lr (default {defaults.inner_lr})")
    parser.add_argument("--no-clamp", dest="clamp", action="store_false", default=None,
                        help="do not clamp the coefficients to [0, 1] (fusion_bench's choice)")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                        help="the fused op's backend (default auto: cpp on a CPU, triton on CUDA, the reference "
                             "where neither loads)")
    _add_finetune_options(parser)


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings from its command line: `--quick`'s values, then every option given explicitly."""
    from .demo import QUICK, DemoSettings

    overrides = dict(QUICK) if args.quick else {}
    for name in ("steps", "test_limit", "seeds", "lr", "mask_lr", "inner_lr", "clamp"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return DemoSettings(tasks=args.tasks, methods=args.methods, finetune=_finetune_config(args, quick=args.quick),
                        encoder=args.encoder, device=args.device, **overrides)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import FIGURE_NAME, REPORT_NAME, run_demo
    from .device import resolve_device

    settings = demo_settings(args)
    resolve_device(args.device)  # a device torch cannot see fails before the encoder is loaded
    report = run_demo(settings, args.out, cache_dir=args.cache, progress=not args.no_progress, backend=args.backend,
                      log=lambda message: print(message, flush=True))
    print()
    print(demo_table(report))
    print(f"\nseeds: fine-tuning {report['finetune_seed']}, adaptation {','.join(map(str, report['seeds']))} "
          + ("(stochastic methods: mean ± sample std over seeds)" if len(report["seeds"]) > 1 else
             "(one seed: --seeds 0,1,2 gives the spread over seeds)")
          + f"; * = at chance (below chance + 2 standard errors); {report['seconds'] / 60:.1f} min in all")
    print(f"report: {(args.out / REPORT_NAME).resolve()}")
    print(f"figure: {(args.out / FIGURE_NAME).resolve()}")
    return 0


def demo_table(report: dict[str, Any]) -> str:
    """Rows = Individual, Pre-trained, each method; columns = tasks and average (accuracy, % as mean ± std over
    seeds, * at chance), time per seed, extra memory."""
    tasks = [t["name"] for t in report["tasks"]]
    header = ["Method", *tasks, "Avg.", "time", "extra mem"]

    def cell(value: float, std: float | None, flag: bool = False) -> str:
        return f"{100 * value:.1f}" + ("" if std is None else f" ± {100 * std:.1f}") + ("*" if flag else "")

    lines = []
    for row in report["rows"]:
        stds = row.get("accuracy_std") or {}
        cells = [row["label"], *(cell(row["accuracy"][t], stds.get(t), t in row.get("at_chance", ())) for t in tasks),
                 cell(row["average"], row.get("average_std")),
                 "" if row["seconds"] is None else f"{row['seconds']:.1f} s",
                 "" if row.get("extra_rss_anon_bytes") is None else _size(row["extra_rss_anon_bytes"])]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *(fmt(cells) for cells in lines[:2]), rule, *(fmt(c) for c in lines[2:])])


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    _add_finetune_options(parser)


def _run_finetune(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, finetune_tasks
    from .device import resolve_device

    resolve_device(args.device)  # a device torch cannot see fails before the encoder is loaded
    # the demo's own settings and code path: the cache entries written here are the ones `pyfuse demo` reads
    settings = DemoSettings(tasks=args.tasks, finetune=_finetune_config(args), encoder=args.encoder,
                            device=args.device)
    *_, finetuned = finetune_tasks(settings, cache_dir=args.cache, progress=not args.no_progress)
    print(_table([(name, f"{'reused' if result.reused else 'trained'}  {result.path}")
                  for name, result in finetuned.items()]))
    return 0


COMMANDS: dict[str, Command] = {
    "demo": Command("the embedded real benchmark end to end: fine-tune all-MiniLM-L6-v2 on real text tasks "
                    "(cached), merge with every method, print a table like the paper's Table 1",
                    _add_demo_arguments, _run_demo),
    "finetune": Command("fine-tune the embedded benchmark's task models (full or LoRA), cached by content",
                        _add_finetune_arguments, _run_finetune),
    "merge": Command("merge fine-tuned models with any registered method: static (e.g. ties), data-aware "
                     "(e.g. regmean) or adaptive (e.g. concrete_adamerging); --help lists them all",
                     _add_merge_arguments, _run_merge, _MERGE_EPILOG),
    "plot": Command("draw accuracy and entropy versus step from an adaptive merge's report.json into a PNG",
                    _add_plot_arguments, _run_plot),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfuse", description="Merge fine-tuned models into one multi-task model.",
        epilog=_MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        epilog = command.epilog.format(methods=_method_table()) if "{methods}" in command.epilog else command.epilog
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help, epilog=epilog,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    previous = signal.signal(signal.SIGTERM, _terminated)  # unwinds like Ctrl-C: temporaries removed, lock released
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt as err:
        print(f"pyfuse {args.command}: {err.args[0] if err.args else 'interrupted (Ctrl-C)'}; temporary files "
              "removed, nothing half-written kept", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"pyfuse {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
