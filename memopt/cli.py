"""``memopt plan`` and ``memopt inspect``: dry-run planning from a model config, and reading plans.

    memopt plan --hf-config llama-2-7b --batch 4 --seq 2048 --budget 24 --method lora --device rtx4090
    memopt plan --hf-config llama-2-70b --batch 1 --seq 512 --budget 48 --method lora --quantize nf4 --device a100-80gb
    memopt plan --hf-config path/to/config.json ... --json plan.json
    memopt plan --hf-config path/to/model_dir ... --json -
    memopt inspect plan.json

``plan`` builds the model on the ``meta`` device (no memory is allocated, nothing is downloaded:
the presets are the published configs, written out here), applies the method, traces one training
step and plans it; progress goes to stderr, the plan summary to stdout. Exit status: 0 a plan fits,
3 the budget is infeasible (the smallest feasible budget is printed), 2 bad input (with what was
expected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "HF_PRESETS"]

EXIT_INFEASIBLE = 3
EXIT_BAD_INPUT = 2
_DRY_RUN = ("keep", "drop")  # what the model of a dry run does with a plan: autograd's own keep and free

_LLAMA = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# The published configs (Hugging Face hub config.json of each model), trimmed to what shapes the step.
HF_PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3-8b": {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-8b": {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rope_scaling": dict(_LLAMA3_ROPE), "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.3-70b": {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                      "rope_scaling": dict(_LLAMA3_ROPE), "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    # v0.3 (no sliding window; v0.1's 4096-token window does not change shorter sequences)
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128},
}


class BadInput(Exception):
    """Input the user can fix; the message says what was expected."""


_EXAMPLES = """examples:
  memopt plan --hf-config llama-2-7b --batch 1 --seq 4096 --budget 24 --device rtx4090
  memopt plan --hf-config llama-2-70b --batch 1 --seq 512 --budget 48 --quantize nf4 --device a100-80gb
  memopt plan --hf-config path/to/model_dir --batch 2 --seq 1024 --budget 16 --method paca --json plan.json
  memopt plan --hf-config llama-3-8b --batch 1 --seq 2048 --budget 24 --json - | jq .predicted_peak_bytes
  memopt inspect plan.json

exit status: 0 a plan fits; 3 the budget is infeasible (the smallest feasible budget is printed, and
which other choices fit); 2 bad input (with what was expected)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BadInput as exc:
        print(f"memopt {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `memopt inspect plan.json | head`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0


def _parser() -> argparse.ArgumentParser:
    from memopt.config import METHOD_CONFIGS
    from memopt.optim import OPTIMIZERS

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="memopt", description="Plan PyTorch training steps inside a memory budget.",
                                     epilog=_EXAMPLES, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"memopt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="plan one training step of a Hugging Face causal LM (dry run, on meta)",
                          description="Build the model on the meta device (nothing allocated or downloaded), apply "
                          "the method and plan one training step inside --budget.", epilog=_EXAMPLES,
                          formatter_class=raw)
    plan.add_argument("--hf-config", required=True,
                      help=f"a preset ({', '.join(HF_PRESETS)}), a config.json, or a local model directory "
                      "holding one")
    plan.add_argument("--batch", type=int, required=True)
    plan.add_argument("--seq", type=int, required=True)
    search = plan.add_mutually_exclusive_group()
    search.add_argument("--max-seq", action="store_true",
                        help="find the longest sequence that fits (from --seq up, by doubling then bisection) and "
                             "print its plan")
    search.add_argument("--max-batch", action="store_true",
                        help="find the largest batch that fits (from --batch up) and print its plan")
    plan.add_argument("--budget", type=float, required=True, help="device memory in GiB")
    plan.add_argument("--method", default="lora", choices=sorted(METHOD_CONFIGS))
    plan.add_argument("--device", default="rtx4090", help="a device preset (rtx4090, l4, a100-40gb, a100-80gb, h100, ...)")
    plan.add_argument("--rank", type=int, help="adapter rank (lora, paca, randlora; rso: the subspace rank)")
    plan.add_argument("--resample-every", type=int, help="rso: optimizer steps per subproblem")
    plan.add_argument("--active-layers", type=int, help="lisa, owlore: blocks that train at a time (γ)")
    plan.add_argument("--switch-every", type=int, help="lisa, owlore: optimizer steps between switches (K)")
    plan.add_argument("--quantize", choices=("nf4", "int8", "auto"),
                      help="store the frozen Linear weights quantized (QLoRA / QPaCA); auto: only if needed to fit")
    plan.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                      help="the dtype the model's weights are built in (default bfloat16, whatever the config's "
                           "torch_dtype says)")
    plan.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS),
                      help="the optimizer the plan counts (full training: galore-adamw8bit, apollo-mini, ...)")
    plan.add_argument("--optimizer-rank", type=int, help="the projection rank of galore-* and apollo*")
    plan.add_argument("--optimizer-gap", type=int, help="steps between projection refreshes (update_proj_gap)")
    plan.add_argument("--host-budget", type=float,
                      help="GiB of host memory offloaded activations may hold (default: this machine's RAM)")
    plan.add_argument("--cut-ce", action=argparse.BooleanOptionalAction, default=None,
                      help="fuse the LM head and the loss (cut cross-entropy; no [tokens, vocab] logits): --cut-ce "
                           "always, --no-cut-ce never (default: when the step does not fit as it is and the fused "
                           "step is faster)")
    plan.add_argument("--chunk-seq", type=_pieces, metavar="N|auto",
                      help="run each position-wise MLP N pieces of tokens at a time in training (sequence chunking: "
                           "no whole-sequence MLP intermediate; one more MLP forward per step); auto: in pieces of about "
                           "4096 tokens (2 to 16) when the step does not fit with whole MLPs, or when it must recompute "
                           "or offload with them and is faster in pieces (planned both ways)")
    plan.add_argument("--reserve", type=float, help="GiB kept free for the CUDA context (default: the device's)")
    plan.add_argument("--time-limit", type=float,
                      help="CP-SAT seconds per phase (default: by the model's size, 0.1 s per saved tensor from 10 "
                           "to 60 s: Llama-3.1-8B plans with 60)")
    plan.add_argument("--workers", type=int, default=1,
                      help="CP-SAT search workers (1: the same plan every run; more, or 0: one per CPU core, share "
                           "the interleaved search: sooner, not always the same plan)")
    plan.add_argument("--no-offload", action="store_true", help="never offload activations to host")
    plan.add_argument("--no-recompute", action="store_true", help="never recompute activations")
    plan.add_argument("--report", help="also draw the plan to this .png or .svg (needs matplotlib: "
                      "pip install 'memopt[plot]')")
    plan.add_argument("--json", help="also write the plan here as JSON; '-': the JSON to stdout (the summary "
                      "then goes to stderr)")
    plan.set_defaults(run=_plan)
    inspect = sub.add_parser("inspect", help="print a saved plan", epilog="example: memopt inspect plan.json | less")
    inspect.add_argument("plan", type=Path)
    inspect.add_argument("--report", help="draw the plan to this .png or .svg")
    inspect.set_defaults(run=_inspect)
    return parser


def _plan(args: argparse.Namespace) -> int:

    from memopt.config import DEVICE_PRESETS
    from memopt.errors import InfeasibleBudgetError
    from memopt.planner.solve import PlannerConfig

    if args.device.lower() not in DEVICE_PRESETS:
        raise BadInput(f"unknown device {args.device!r}; presets: {', '.join(sorted(DEVICE_PRESETS))}")
    if args.batch < 1 or args.seq < 1:
        raise BadInput(f"--batch and --seq must be positive, got {args.batch} and {args.seq}")
    options = _method_options(args)
    _optimizer_options(args)
    _check_report(args.report)  # before the long work
    _check_json(args.json)
    if not args.budget > 0:
        raise BadInput(f"--budget must be a positive number of GiB, got {args.budget:g}")
    config = _hf_config(args.hf_config)
    if args.time_limit is not None and not args.time_limit > 0:
        raise BadInput(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
    if args.workers < 0:
        raise BadInput(f"--workers must be >= 0 (0: one per CPU core), got {args.workers}")
    planner = PlannerConfig(allow_offload=not args.no_offload, allow_recompute=not args.no_recompute,
                            time_limit_s=args.time_limit, workers=args.workers)
    with _Progress() as progress:
        progress(f"building {args.hf_config} on the meta device ({args.dtype})")
        try:
            if args.max_seq or args.max_batch:
                plan, found = _search(args, config, options, planner, progress)
            else:
                plan, found = _plan_model(args, config, options, planner, progress), None
        except InfeasibleBudgetError as exc:
            alternatives = _alternatives(args, config, options, planner, progress)
            progress.close()
            print(f"memopt plan: {exc}", file=sys.stderr)
            print(f"smallest feasible budget: {_gib(exc.min_budget_bytes)} GiB")
            for line in alternatives:
                print(line)
            return EXIT_INFEASIBLE
        except (ValueError, TypeError) as exc:
            raise BadInput(str(exc)) from None
    # progress is closed: from here on it prints plain lines to stderr
    from memopt.plan.report import applied_lines

    out = sys.stderr if args.json == "-" else sys.stdout
    print(plan.summary(), file=out)
    if found is not None:
        print("", found, sep="\n", file=out)
    if any(t.action not in _DRY_RUN for t in plan.tensors):  # no model carries out a dry run's plan: say so
        print("", *applied_lines(plan, _DRY_RUN), sep="\n", file=out)
    if args.json == "-":
        print(plan.to_json())
    elif args.json is not None:
        progress(f"plan written to {plan.save(args.json)}")
    if args.report is not None:
        progress(f"picture of the plan drawn to {plan.draw(args.report)}")
    return 0


def _pieces(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of pieces or 'auto', got {text!r}") from None


def _plan_model(args: argparse.Namespace, config: Any, options: dict[str, Any], planner: Any,
                progress: Callable[[str], None] | None) -> Any:
    """Build the model on meta and plan it with the command line's choices (``options``: the method's)."""
    import torch

    from memopt.api import plan_only

    model, batch = _meta_model(config, args.batch, args.seq, getattr(torch, args.dtype))
    return plan_only(model, args.budget, batch, args.method, device=args.device, optimizer=args.optimizer,
                     optimizer_options=_optimizer_options(args), reserve_gb=args.reserve,
                     host_budget_gb=args.host_budget, planner=planner,
                     cut_cross_entropy="auto" if args.cut_ce is None else args.cut_ce,
                     chunk_sequence=args.chunk_seq, progress=progress, **options)


def _search(args: argparse.Namespace, config: Any, options: dict[str, Any], planner: Any,
            progress: Callable[[str], None]) -> tuple[Any, str]:
    """The largest --seq (``--max-seq``) or --batch (``--max-batch``) whose step fits, from the given
    one up: doubling until a size does not fit (or the model's position table ends), then bisection
    to within 1/16 of the size found (at least 64 tokens, or 1). Returns its plan and a line saying
    what bounds it. The given size not fitting is the budget's ``InfeasibleBudgetError``."""
    from memopt.errors import InfeasibleBudgetError

    dim = "seq" if args.max_seq else "batch"
    limit = _position_limit(config) if dim == "seq" else None

    def attempt(size: int) -> tuple[Any, int | None]:
        tried = argparse.Namespace(**{**vars(args), dim: size})
        progress(f"--max-{dim}: trying {dim} {size}")
        try:
            return _plan_model(tried, config, options, planner, None), None
        except InfeasibleBudgetError as exc:
            return None, exc.min_budget_bytes

    start = getattr(args, dim)
    best, least = attempt(start)
    if best is None:
        raise InfeasibleBudgetError(f"{dim} {start} does not fit in {args.budget:g} GiB (the smallest feasible budget is "
                                    f"{_gib(least)} GiB): give a smaller --{dim} to search from",
                                    predicted_bytes=least, budget_bytes=int(args.budget * 2**30), breakdown={},
                                    min_budget_bytes=least)
    lo, hi, hi_least = start, None, None
    while hi is None:
        size = lo * 2 if limit is None else min(lo * 2, limit)
        if size == lo:
            return best, (f"longest sequence: {lo} tokens at batch {args.batch}, the model's position table's length "
                          f"(a longer sequence has no position embedding); it fits in {args.budget:g} GiB")
        plan, need = attempt(size)
        if plan is None:
            hi, hi_least = size, need
        else:
            lo, best = size, plan
    step = 1 if dim == "batch" else 64
    while hi - lo > max(step, lo // 16):
        size = (lo + hi) // 2 // step * step
        if size <= lo:
            break
        plan, need = attempt(size)
        if plan is None:
            hi, hi_least = size, need
        else:
            lo, best = size, plan
    what = f"longest sequence: {lo} tokens at batch {args.batch}" if dim == "seq" else \
        f"largest batch: {lo} at seq {args.seq}"
    return best, (f"{what} fits in {args.budget:g} GiB (predicted peak {_gib(best.predicted_peak_bytes)} GiB); "
                  f"{dim} {hi} needs {_gib(hi_least)} GiB")


def _position_limit(config: Any) -> int | None:
    """The length of the model's learned position table (GPT-2's ``n_positions``, OPT's), else None:
    rotary models (Llama, Mistral) compute positions for any length."""
    import torch

    AutoModelForCausalLM = _transformers().AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and length is not None
              and m.num_embeddings in (length, length + 2)]  # OPT offsets its positions by 2
    return length if tables and getattr(config, "vocab_size", None) not in (length, length + 2) else None


def _gib(nbytes: int) -> str:
    """A budget in GiB, rounded up: 2 decimals from 1 GiB, 4 below (a tiny model's is not "0.01")."""
    from memopt.errors import gib_up

    return gib_up(nbytes, 2 if nbytes >= 2**30 else 4)


def _check_json(path: str | None) -> None:
    if path is None or path == "-":
        return
    from memopt.plan import check_writable

    try:
        check_writable(path)
    except ValueError as exc:
        raise BadInput(f"--json: {exc} (or give - for stdout)") from None


def _check_report(path: str | None) -> None:
    if path is None:
        return
    from memopt.plan.draw import check_report_path

    try:
        check_report_path(path)
    except (ValueError, ImportError) as exc:
        raise BadInput(f"--report: {exc}") from None


def _alternatives(args: argparse.Namespace, config: Any, options: dict[str, Any], planner: Any,
                  progress: Callable[[str], None]) -> list[str]:
    """When the plan does not fit: the smallest budget with quantized frozen weights, if not asked for
    already; for a method that trains the weights themselves (full), with the leanest optimizers."""
    from memopt.errors import InfeasibleBudgetError
    from memopt.passes import get_pass

    if get_pass(args.method).quantize in ("never", "trainable"):
        lean = {"optimizer_rank": None, "optimizer_gap": None}  # each at its own default rank and gap
        tries = [(f"--optimizer {name} (its default rank)", argparse.Namespace(**{**vars(args), **lean, "optimizer": name}),
                  options) for name in ("galore-adamw8bit", "apollo-mini") if name != args.optimizer]
        if get_pass(args.method).quantize == "trainable" and args.quantize is None:
            tries += [(f"--quantize int8 --optimizer {name}",
                       argparse.Namespace(**{**vars(args), **lean, "optimizer": name, "quantize": "int8"}),
                       {**options, "quantize": "int8"}) for name in ("galore-adamw8bit", "apollo-mini")]
    elif args.quantize is None:
        tries = [(f"--quantize {fmt}", args, {**options, "quantize": fmt}) for fmt in ("int8", "nf4")]
    else:
        return []
    out = []
    for label, tried, tried_options in tries:
        progress(f"trying {label}")
        try:
            plan = _plan_model(tried, config, tried_options, planner, None)
            least = plan.min_budget_bytes
        except InfeasibleBudgetError as exc:
            plan, least = None, exc.min_budget_bytes
        verdict = "fits" if plan is not None else "does not fit either"
        out.append(f"with {label}: smallest feasible budget {_gib(least)} GiB ({verdict} in {args.budget:g} GiB)")
    return out


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    from memopt.config import METHOD_CONFIGS

    options: dict[str, Any] = {} if args.quantize is None else {"quantize": args.quantize}
    for flag, name, methods in (("--resample-every", "resample_every", ("rso",)),
                                ("--active-layers", "active_layers", ("lisa", "owlore")),
                                ("--switch-every", "switch_every", ("lisa", "owlore"))):
        value = getattr(args, name)
        if value is not None:
            if args.method not in methods:
                raise BadInput(f"{flag} is for --method {' or '.join(methods)}")
            options[name] = value
    if args.rank is None:
        return options
    with_rank = sorted(name for name, cls in METHOD_CONFIGS.items() if "rank" in {f.name for f in fields(cls)})
    if args.method not in with_rank:
        raise BadInput(f"--rank is for {', '.join(with_rank)} (the adapter rank); {args.method} has none"
                       + (" (the optimizer's rank is --optimizer-rank)" if args.method == "full" else ""))
    return {**options, "rank": args.rank}


def _optimizer_options(args: argparse.Namespace) -> dict[str, Any]:
    from memopt.optim import OPTIMIZERS

    options = {name: value for name, value in (("rank", args.optimizer_rank), ("update_proj_gap", args.optimizer_gap))
               if value is not None}
    unknown = sorted(set(options) - OPTIMIZERS[args.optimizer].options)
    if unknown:
        flags = {"rank": "--optimizer-rank", "update_proj_gap": "--optimizer-gap"}
        takes = sorted(n for n, spec in OPTIMIZERS.items() if set(unknown) <= spec.options)
        raise BadInput(f"{', '.join(flags[u] for u in unknown)} is not an option of --optimizer {args.optimizer}; "
                       f"optimizers that take it: {', '.join(takes)}")
    return options


def _version() -> str:
    import memopt

    return memopt.__version__


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise BadInput("planning a Hugging Face model needs transformers: pip install 'memopt[hf]'") from None
    return transformers


def _hf_config(spec: str) -> Any:
    """A transformers config from a preset name or a config.json path."""
    AutoConfig = _transformers().AutoConfig

    if spec.lower() in HF_PRESETS:
        data = dict(HF_PRESETS[spec.lower()])
    elif Path(spec).is_file():
        data = _read_config(Path(spec))
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise BadInput(f"{spec} is a directory without a config.json; pass a Hugging Face model directory "
                           "(as save_pretrained writes it) or the config.json itself")
        data = _read_config(Path(spec) / "config.json")
    else:
        raise BadInput(f"{spec!r} is neither a preset nor a file or directory; presets: {', '.join(HF_PRESETS)} "
                       "(or pass a Hugging Face config.json or model directory)")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise BadInput(f"model_type {model_type!r} is not one transformers knows: {exc}") from None


def _read_config(path: Path) -> dict[str, Any]:
    expected = "expected a Hugging Face model config.json: a JSON object with a 'model_type' (e.g. \"llama\")"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not JSON ({exc}); {expected}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise BadInput(f"{path} has no 'model_type'; {expected}")
    return data


def _meta_model(config: Any, batch: int, seq: int, dtype: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    AutoModelForCausalLM = _transformers().AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise BadInput(f"memopt plan builds causal LMs (AutoModelForCausalLM): {str(exc).splitlines()[0]}") from None
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model.to(dtype), {"input_ids": ids, "labels": ids.clone()}


def _inspect(args: argparse.Namespace) -> int:
    from memopt.plan import load_plan

    _check_report(args.report)
    try:
        plan = load_plan(args.plan)
    except (FileNotFoundError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    print(plan.summary())
    if args.report is not None:
        plan.draw(args.report)
    return 0


class _Progress:
    """Phase lines on stderr, ``[  12.3 s] tracing ...``; on a terminal (with rich installed) also a
    live spinner with the current phase's elapsed time, so a long phase is never a silent wait."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.live: Any = None
        self.task: Any = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            except ImportError:
                return
            self.live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self.live.start()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f} s] {message}"
        if self.live is None:
            print(line, file=sys.stderr, flush=True)
            return
        self.live.console.print(line, highlight=False, markup=False)
        if self.task is not None:
            self.live.remove_task(self.task)
        self.task = self.live.add_task(message, total=None)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
