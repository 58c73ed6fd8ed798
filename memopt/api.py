"""`optimize`: the pipeline of DESIGN.md §1 as one short list of stages."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from memopt.config import GIB, OptimizeConfig, QuantizeConfig, with_peft_default_targets
from memopt.errors import InfeasibleBudgetError, UnsupportedModelError
from memopt.ir.joint import JointGraph, JointTrace, trace_joint_graph
from memopt.ir.structure import ModelGraph, build_model_graph
from memopt.kernels.dequant import simulating
from memopt.memory.autocast import autocast_state, on_target
from memopt.memory.inputs import input_dtypes, input_shapes, normalize_inputs, tensor_inputs, training_kwargs
from memopt.memory.report import MemoryReport
from memopt.memory.simulate import simulate_step
from memopt.passes import QUANTIZE, REWRITTEN, ModuleDecision, PassResult, RewriteLog, get_pass
from memopt.passes.quantize import QuantLinear
from memopt.plan import Plan
from memopt.plan.report import format_bytes
from memopt.planner.problem import Choice, PlanningProblem, build_problem, step_peak, with_optimizer_peak
from memopt.planner.solve import ActivationPlan, PlannerConfig, decisions_for, plan_activations, plan_fields
from memopt.runtime.fingerprint import structural_fingerprint
from memopt.runtime.optimized import LARGER_INPUTS, OptimizedModel, wrap
from memopt.runtime.partition import plan_partition

__all__ = ["optimize", "plan_only"]

log = logging.getLogger("memopt")


def optimize(
    model: nn.Module,
    budget_gb: float,
    example_inputs: Any,
    method: str = "lora",
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: str = "adamw",
    device: Any = None,
    reserve_gb: float | None = None,
    planner: PlannerConfig | None = None,
    compile: bool = False,
    larger_inputs: str = "replan",
    **options: Any,
) -> OptimizedModel:
    """Rewrite ``model`` to train inside ``budget_gb`` GiB and return it with its Plan.

    Args:
        model: any ``nn.Module``.
        budget_gb: device capacity in GiB (2**30 bytes); the device's reserve (context and
            allocator slack, ``plan.reserve_bytes``) is subtracted, or ``reserve_gb`` if given.
        example_inputs: one batch, as a tuple of positional arguments, a dict of keyword
            arguments (the usual HF batch), or an ``(args, kwargs)`` pair. Its shapes are the
            shapes the plan is made for.
        method: the parameterization, ``"lora"``, ``"paca"`` or ``"s2ft"``; ``**options`` are
            the fields of its config (``LoraConfig``, ``PacaConfig``, ``S2ftConfig``) — unknown
            options are an error. Or the config itself (``method=memopt.PacaConfig(rank=16)``;
            options beside it override its fields), or a ``peft.LoraConfig``.
        loss_fn: ``loss_fn(output, (args, kwargs)) -> scalar`` for the simulated training step;
            not needed when the model returns its own ``.loss`` (HF models given labels).
        optimizer: the optimizer whose states are counted, ``"adamw"`` by default.
        device: the target device, a preset name (``"rtx4090"``, ``"a100-80gb"``, ``"cuda"``,
            ``"cpu"``) or a ``DeviceSpec``; default: where the parameters live. A plan for a GPU
            can be made on a machine without one.
        planner: a ``PlannerConfig`` (what the activation planner may do, its time limit), or
            None for the defaults. ``PlannerConfig(enabled=False)`` keeps every activation.
        quantize (in ``**options``): store the frozen Linear-like weights quantized — ``"nf4"``
            (QLoRA's 4-bit NormalFloat with double quantization) or ``"int8"`` (per-row absmax),
            or a ``QuantizeConfig`` (block sizes, targets); ``"auto"`` quantizes only if the
            unquantized step does not fit, int8 before nf4 (the least lossy that fits), and the
            plan's notes say which and why. Composes with every method: LoRA wraps the quantized
            layer (QLoRA), PaCA overlays P on the dequantized weight (QPaCA), S²FT keeps the
            weights it trains blocks of in full precision. The LM head stays unquantized.

        compile: run the training step through Inductor (``memopt.runtime.compiled``) instead of
            op by op (``memopt.runtime.eager``); both carry out the same plan.
        larger_inputs: what a training step with inputs larger than ``example_inputs`` does —
            ``"replan"`` (the default: plan again for the larger shapes, keeping the rewrite, and
            log what it did and how long it took) or ``"error"`` (``PlanMismatchError``: the
            plan's peak holds only up to its shapes). Smaller inputs run with the same decisions
            and the same traced step (sizes are symbolic), without planning again.

    The plan (``model.plan``): each activation saved for backward is kept, recomputed or
    offloaded so that the predicted peak fits the budget at the least predicted time
    (``memopt.planner``), and the returned model carries it out (``memopt.runtime``): if it
    recomputes or offloads anything, or ``compile`` is set, every training step runs as the
    step the planner traced, partitioned by the plan's decisions (torch's selective-checkpoint
    tags; recomputed random ops replay their RNG state); otherwise the model runs as it is.
    Every output keeps its gradient, so a loss computed from the logits in your loop is exact;
    the plan counts the loss it was given (the model's own ``loss`` when ``example_inputs`` has
    labels, else ``loss_fn``; a re-plan for a call that has neither counts a loss reading every
    output). The step is planned in train
    mode (a training step's mode; the model's own mode is restored) and under the autocast state
    of the call (``torch.autocast`` around ``optimize`` plans an autocast step); a training step
    in another mode or autocast state, or one whose program no longer matches the plan (an
    adapter disabled, dropout changed), is planned again (logged), never run stale.

    What happens to ``model``: it is rewritten **in place** and wrapped, not copied (copying a
    large model would double its memory). Targeted Linear-like submodules are replaced by
    modules that hold the original layer as ``base_layer``, and every original parameter gets
    ``requires_grad=False``. LoRA changes no weight value; PaCA writes ``scaling·P`` into the
    selected columns of W on every forward (the trainable P starts equal to them, so the
    function is unchanged); S²FT permutes the rows / columns of coupled weights in place
    (function-preserving) and trains dense blocks of them. With ``quantize``, each quantized
    layer is replaced by a ``QuantLinear`` holding only the quantized bytes (the full-precision
    weight is no longer referenced by the model; the original layer object is kept by the undo
    log only while ``optimize`` runs). The returned ``OptimizedModel`` wraps
    that same object (``.model``). ``merge()`` folds the trained parameters back into plain
    layers (S²FT: in the original order; quantized layers become plain layers holding the
    dequantized weight, so the quantization error stays) and restores the original
    ``requires_grad`` flags. If ``optimize`` raises, the module is restored exactly as it was
    (weights included, quantized ones too).

    Raises:
        TypeError / ValueError: bad arguments, with what to change.
        UnsupportedModelError: the model could not be captured.
        InfeasibleBudgetError: no plan fits: even recomputing / offloading every activation that
            may be leaves a peak above the budget; carries the smallest feasible budget.
    """
    # Validate everything before touching the model, so a bad call changes nothing.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModel):
        raise TypeError("model was already optimized by memopt; call merge() first or pass the original")
    if planner is not None and not isinstance(planner, PlannerConfig):
        raise TypeError(f"planner must be a memopt.PlannerConfig or None, got {type(planner).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if larger_inputs not in LARGER_INPUTS:
        raise ValueError(f"larger_inputs must be one of {LARGER_INPUTS}, got {larger_inputs!r}")
    _refuse_rewritten(model)
    cfg = _job_config(model, method, budget_gb, optimizer=optimizer, device=device or _parameter_device(model),
                      reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)  # the step as the returned model runs it
    _check_example(model, bound)
    with _train_mode(model):  # a training step's mode, whatever mode the model came in
        rewrites = RewriteLog(model)
        try:
            # Capture once, before rewriting: the structure (roles, heads, couplings) comes from dataflow.
            graph, notes = _capture(model, args, kwargs, cfg, rewrites)
            plan = _plan(model, cfg, planner or PlannerConfig(), graph, bound, (args, kwargs), loss_fn, rewrites,
                         simulate=True, lower=compile)
            plan = dataclasses.replace(plan, notes=notes + plan.notes) if notes else plan
        except BaseException:
            rewrites.undo()
            raise
    log.info("memopt: %s on %s, predicted peak %.3f GiB of %.3f GiB usable", cfg.method,
             type(model).__name__, plan.predicted_peak_bytes / GIB, plan.usable_bytes / GIB)
    optimized = wrap(model, plan, _merge_fn(cfg), rewrites.original_requires_grad(),
                     config=(cfg, _applied_quantize(cfg, model)))
    replan = functools.partial(_replan, model, cfg, planner or PlannerConfig(), loss_fn, compile)
    return optimized.use_plan(plan, compile=compile, larger_inputs=larger_inputs, replan=replan)


def from_pretrained(
    model: nn.Module,
    directory: Any,
    budget_gb: float | None = None,
    example_inputs: Any = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    device: Any = None,
    planner: PlannerConfig | None = None,
    compile: bool = False,
    larger_inputs: str = "replan",
) -> OptimizedModel:
    """``model`` (a fresh base model, as the trained one was before ``optimize``) rebuilt with the
    trained tensors saved in ``directory`` by ``OptimizedModel.save_pretrained``; its outputs equal
    the saved model's.

    The saved method and options rewrite ``model`` in place (the seeds draw the same indices and
    permutations; they are checked against the saved ones), the trained tensors are loaded, and
    the saved plan is carried out after checking it was made for this model. Given ``budget_gb``
    and ``example_inputs``, the model is planned for them instead. A LoRA adapter directory
    written by PEFT loads too (``budget_gb`` and ``example_inputs`` needed: it holds no plan).

    Raises ``MemoptError`` naming what is wrong: missing files, a directory saved for another base
    model (the first tensor whose shape, index or base-weight checksum differs), a PEFT adapter
    type memopt does not support.
    """
    from memopt.checkpoint import load_trained, read_checkpoint

    if isinstance(model, OptimizedModel):
        raise TypeError("from_pretrained takes the base model (as it was before optimize), not an OptimizedModel")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (budget_gb is None) != (example_inputs is None):
        raise TypeError("give both budget_gb and example_inputs (to plan again), or neither (to use the saved plan)")
    checkpoint = read_checkpoint(directory)
    options = dict(checkpoint.options)
    quantize = checkpoint.quantize
    if quantize is not None:
        options["quantize"] = QuantizeConfig(**quantize)
    if budget_gb is not None:
        plan = checkpoint.plan
        if device is None and plan is not None:
            device = plan.device
        optimized = optimize(model, budget_gb, example_inputs, checkpoint.method, loss_fn=loss_fn,
                             optimizer=plan.optimizer if plan is not None else "adamw", device=device,
                             planner=planner, compile=compile, larger_inputs=larger_inputs, **options)
        try:
            load_trained(optimized.model, checkpoint)
        except BaseException:
            optimized.merge()
            raise
        return optimized
    plan = checkpoint.plan
    if plan is None:
        raise TypeError(f"{directory} holds no memopt plan (a PEFT adapter): give budget_gb and example_inputs")
    _refuse_rewritten(model)
    cfg = OptimizeConfig.from_options(checkpoint.method, plan.budget_bytes / GIB, optimizer=plan.optimizer,
                                      device=plan.device if device is None else device,
                                      reserve_gb=plan.reserve_bytes / GIB, **options)
    kwargs = _inputs_of(plan, _parameter_device(model))
    bound = _bind_inputs(model, (), kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)
    with _train_mode(model):
        rewrites = RewriteLog(model)
        try:
            graph, _ = _capture(model, (), kwargs, cfg, rewrites)
            _rewrite(model, graph, cfg, cfg.quantize if isinstance(cfg.quantize, QuantizeConfig) else None, rewrites)
            load_trained(model, checkpoint)
            optimized = wrap(model, plan, _merge_fn(cfg), rewrites.original_requires_grad(),
                             config=(cfg, _applied_quantize(cfg, model)))
            replan = functools.partial(_replan, model, cfg, planner or PlannerConfig(), loss_fn, compile)
            if plan.fingerprint is not None and plan.fingerprint != structural_fingerprint(model):
                # The same model in other dtypes (a base loaded in bf16 for adapters trained on fp32): the
                # saved decisions are for other bytes, so plan again at the saved budget and shapes.
                log.info("memopt: the base model's dtypes differ from the saved plan's; planning again")
                plan = replan(plan, (), kwargs, "the base model's dtypes differ from the saved plan's")
            return optimized.use_plan(plan, compile=compile, larger_inputs=larger_inputs, replan=replan)
        except BaseException:
            rewrites.undo()
            raise


def _capture(model: nn.Module, args: tuple, kwargs: dict, cfg: OptimizeConfig,
             rewrites: RewriteLog) -> tuple[ModelGraph, tuple[str, ...]]:
    """The model's structure, captured before rewriting. Layers loaded quantized by bitsandbytes
    are shadowed by memory-free Linears for the capture, then become ``QuantLinear`` layers over
    their own bytes (``memopt.passes.bitsandbytes``); the notes say so."""
    from memopt.passes.bitsandbytes import adopt_shadowed, bitsandbytes_layers, describe, shadow_for_capture

    if not bitsandbytes_layers(model):
        return build_model_graph(model, args, kwargs), ()
    if cfg.quantize is not None:
        raise ValueError("this model was loaded quantized by bitsandbytes; its layers are taken as they are, so "
                         "leave quantize= unset")
    if cfg.method == "s2ft":
        raise UnsupportedModelError("S²FT permutes and trains blocks of the weights themselves, which a model loaded "
                                    "quantized by bitsandbytes cannot give; use method='lora' or 'paca' (QLoRA / "
                                    "QPaCA), or load the model in full precision")
    adopted = shadow_for_capture(model, rewrites)
    graph = build_model_graph(model, args, kwargs)
    adopt_shadowed(adopted, rewrites)
    return graph, (f"layers loaded by bitsandbytes taken as they are: {describe(adopted)}; memopt reads their "
                   "bytes in place, nothing dequantized or copied",)


def _inputs_of(plan: Plan, device: str) -> dict[str, torch.Tensor]:
    """Inputs of the plan's shapes and dtypes (zeros; masks all ones) to capture the model's structure."""
    dtypes = plan.input_dtypes or {}
    out = {}
    for name, shape in plan.input_shapes.items():
        dtype = getattr(torch, dtypes.get(name, "int64"))
        make = torch.ones if "mask" in name else torch.zeros
        out[name] = make(tuple(shape), dtype=dtype, device=device)
    return out


def _applied_quantize(cfg: OptimizeConfig, model: nn.Module) -> QuantizeConfig | None:
    """The quantization the rewrite applied (``"auto"`` resolved to the format it chose)."""
    if cfg.quantize is None or isinstance(cfg.quantize, QuantizeConfig):
        return cfg.quantize  # None also for layers that came quantized (bitsandbytes): the base brings them
    formats = {m.fmt for m in model.modules() if isinstance(m, QuantLinear)}
    return QuantizeConfig(format=formats.pop()) if formats else None


def plan_only(
    model: nn.Module,
    budget_gb: float,
    example_inputs: Any,
    method: str = "lora",
    *,
    device: Any,
    optimizer: str = "adamw",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    reserve_gb: float | None = None,
    planner: PlannerConfig | None = None,
    simulate: bool = False,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Plan:
    """The Plan ``optimize`` would make, for a model built only to be planned (e.g. on ``meta``).

    ``quantize`` is as in ``optimize``; on a ``meta`` model only shapes are quantized, so the
    plan counts the quantized bytes exactly. ``model`` is rewritten in place and not restored
    (build a fresh one per call). Without
    ``simulate`` the eager step is not simulated: the prediction is the joint trace's alone
    (not measured: ``plan.memory`` is None), which is what makes 70B-sized plans quick.
    """
    cfg = _job_config(model, method, budget_gb, optimizer=optimizer, device=device, reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)  # the step as the returned model runs it
    _say(progress, f"capturing {type(model).__name__}")
    graph = build_model_graph(model, args, kwargs)
    return _plan(model, cfg, planner or PlannerConfig(), graph, bound, (args, kwargs), loss_fn, RewriteLog(model),
                 simulate=simulate, progress=progress)


def _plan(model: nn.Module, cfg: OptimizeConfig, planner: PlannerConfig, graph: ModelGraph,
          bound: inspect.BoundArguments, inputs: tuple[tuple, dict], loss_fn: Any, rewrites: RewriteLog, *,
          simulate: bool, progress: Callable[[str], None] | None = None, lower: bool = False) -> Plan:
    """The stages after capture: rewrite, (simulate), trace, plan. Requires ``graph`` of ``model``.

    ``quantize="auto"`` plans unquantized, then int8, then nf4 (least lossy first), undoing the
    rewrites between tries, and keeps the first that fits; the Plan's notes say why.
    """
    attempt = functools.partial(_plan_with, model, cfg, planner=planner, graph=graph, bound=bound, inputs=inputs,
                                loss_fn=loss_fn, rewrites=rewrites, simulate=simulate, progress=progress, lower=lower)
    if cfg.quantize == "auto":
        return _plan_auto(attempt, cfg, rewrites, progress)
    return attempt(cfg.quantize)


def _plan_with(model: nn.Module, cfg: OptimizeConfig, quant: QuantizeConfig | None, *, planner: PlannerConfig,
               graph: ModelGraph, bound: inspect.BoundArguments, inputs: tuple[tuple, dict], loss_fn: Any,
               rewrites: RewriteLog, simulate: bool, progress: Callable[[str], None] | None, lower: bool = False,
               weights_must_fit: bool = False) -> Plan:
    """One plan of ``cfg.method`` on weights quantized by ``quant`` (None: as they are)."""
    # Rewrite in place through the undo log; everything after measures the rewritten model.
    _say(progress, f"applying {cfg.method}" + ("" if quant is None else f" on {quant.format} weights"))
    result = _rewrite(model, graph, cfg, quant, rewrites)
    if weights_must_fit and (weights := _weight_bytes(model)) > cfg.usable_bytes:  # a lower bound: skip the trace
        raise _WeightsExceed(weights)
    memory, trace, activations = _plan_step(model, cfg, planner, inputs, loss_fn, simulate=simulate,
                                            progress=progress, lower=lower)
    return _make_plan(model, cfg, bound, graph, result, memory, trace, activations)


def _plan_step(model: nn.Module, cfg: OptimizeConfig, planner: PlannerConfig, inputs: tuple[tuple, dict],
               loss_fn: Any, *, simulate: bool, progress: Callable[[str], None] | None,
               lower: bool = False) -> tuple[MemoryReport | None, JointTrace, ActivationPlan]:
    """(Simulate,) trace and plan the training step of the rewritten ``model`` on ``inputs``.

    The plan's peak is measured, not modelled: each candidate plan is lowered onto the traced
    joint graph as the runtime lowers it and its liveness swept (``_measure``); the model as it is
    is measured by the simulated eager step. ``lower``: the step is lowered whatever the plan."""
    memory = None
    # Quantized GEMMs as the target device runs them (CUDA: fused, no W), under its autocast.
    with simulating(cfg.device.kind), on_target(cfg.device.kind):
        if simulate:
            # The eager step the user will run, with every activation kept: exact bytes (ground truth).
            _say(progress, "simulating the eager step")
            memory = simulate_step(model, inputs, loss_fn=loss_fn, optimizer=cfg.optimizer,
                                   device=cfg.device.kind, round_to=cfg.device.alloc_granularity)
        # The same step as one joint graph: what backward needs, when, and what recomputing it costs.
        _say(progress, "tracing the joint forward + backward step")
        trace, joint = trace_joint_graph(model, inputs, loss_fn=loss_fn, optimizer=cfg.optimizer,
                                         device=cfg.device.kind, granularity=cfg.device.alloc_granularity)
    problem = _problem(trace, cfg, planner)
    if memory is not None:  # the optimizer step runs as it is: its simulated peak
        problem = with_optimizer_peak(problem, memory.phase_peaks.get("optimizer"))
    # Keep / recompute / offload each saved activation: the fastest plan inside the budget.
    _say(progress, f"planning {len(problem.candidates)} saved tensors ({problem.num_classes} decision classes) "
                   f"for {cfg.usable_bytes / GIB:.2f} GiB usable (traced in {trace.trace_seconds:.1f} s)")
    activations = plan_activations(problem, cfg.usable_bytes, planner, reserve_bytes=cfg.reserve_bytes,
                                   what=f"{cfg.method} on {type(model).__name__}", progress=progress,
                                   as_is_bytes=None if memory is None else _step_peak(memory),
                                   measure=_measure(joint, problem), lower=lower)
    return memory, trace, activations


def _measure(joint: JointGraph, problem: PlanningProblem) -> Callable[[tuple[Choice, ...]], int]:
    """The exact forward + backward peak of an assignment's lowered step: the traced joint graph
    partitioned by it as the runtime partitions it (recomputation placed by torch's partitioner,
    RNG state saved for replayed random ops, offload copies), its liveness swept."""
    cache: dict[tuple[Choice, ...], int] = {}

    def measure(choices: tuple[Choice, ...]) -> int:
        if choices not in cache:
            partition = plan_partition(decisions_for(problem, choices), offload_mode="simulated", check_layout=True,
                                       allow_constants=True)
            cache[choices] = step_peak(joint.partitioned(partition))[0]
        return cache[choices]

    return measure


def _rewrite(model: nn.Module, graph: ModelGraph, cfg: OptimizeConfig, quant: QuantizeConfig | None,
             rewrites: RewriteLog) -> PassResult:
    """The method's pass, composed with the quantize pass when ``quant`` is given."""
    method = get_pass(cfg.method)
    if quant is None:
        return method.apply(model, graph, cfg.method_config, rewrites)
    if cfg.method == "s2ft":
        # S²FT permutes weights in place and trains dense blocks of some: it runs first, and the
        # weights it trains stay in full precision ("all-linear"), or are refused if named.
        result = method.apply(model, graph, cfg.method_config, rewrites)
        keep = {d.name: "S²FT trains a dense block of each (a quantized weight cannot be trained)"
                for d in result.decisions if d.trainable_params} if quant.target_modules == "all-linear" else {}
        return _combined(result, QUANTIZE.apply(model, graph, quant, rewrites, keep=keep))
    # QLoRA / QPaCA: quantize the frozen base weights (the method freezes every parameter anyway),
    # then the adapter wraps each QuantLinear.
    rewrites.freeze(model.parameters())
    quantized = QUANTIZE.apply(model, graph, quant, rewrites)
    return _combined(method.apply(model, graph, cfg.method_config, rewrites), quantized)


def _combined(result: PassResult, quantized: PassResult) -> PassResult:
    """The method's decisions, each quantized layer's marked ``method+format`` with its bytes."""
    by_name = {d.name: d for d in quantized.decisions}
    decisions = [_with_format(d, by_name.pop(d.name, None)) for d in result.decisions]
    return PassResult(result.module, tuple(decisions) + tuple(by_name.values()), result.notes + quantized.notes)


def _with_format(decision: ModuleDecision, quantized: ModuleDecision | None) -> ModuleDecision:
    if quantized is None:
        return decision
    q = quantized.details
    extra = {"quantized_bytes": q["bytes"], "dense_bytes": q["dense_bytes"]}
    if "last_block" in q:
        extra["last_block"] = q["last_block"]
    return dataclasses.replace(decision, method=f"{decision.method}+{q['format']}",
                               details={**decision.details, **extra})


class _WeightsExceed(Exception):
    """The rewritten model's weights alone exceed the usable budget (``quantize="auto"``'s early out)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and of the quantized weights' buffers: a lower bound of any step's peak."""
    quantized = (b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *quantized))


_AUTO_FORMATS = (None, "int8", "nf4")  # least lossy first: int8 keeps ~0.5 % of a weight's error, nf4 ~9 %


def _plan_auto(attempt: Callable[..., Plan], cfg: OptimizeConfig, rewrites: RewriteLog,
               progress: Callable[[str], None] | None) -> Plan:
    """``quantize="auto"``: the least lossy of unquantized, int8, nf4 whose plan fits."""
    usable = f"{format_bytes(cfg.usable_bytes)} usable"
    tried: list[str] = []
    for fmt in _AUTO_FORMATS:
        label, last = fmt or "unquantized", fmt == _AUTO_FORMATS[-1]
        try:
            plan = attempt(None if fmt is None else QuantizeConfig(format=fmt), weights_must_fit=not last)
        except _WeightsExceed as exc:
            tried.append(f"{label}: the weights alone take {format_bytes(exc.nbytes)} > {usable}")
        except InfeasibleBudgetError as exc:
            if last:
                raise InfeasibleBudgetError(
                    f"quantize='auto': no option fits ({'; '.join(tried)}); nf4, the most compressed: "
                    f"{str(exc).splitlines()[0]}", predicted_bytes=exc.predicted_bytes, budget_bytes=exc.budget_bytes,
                    min_budget_bytes=exc.min_budget_bytes, breakdown=exc.breakdown) from exc
            tried.append(f"{label} needs a budget of {format_bytes(exc.min_budget_bytes)} > "
                         f"{format_bytes(cfg.budget_bytes)}")
        else:
            fits = f"{label} fits at a predicted peak of {format_bytes(plan.predicted_peak_bytes)} of {usable}"
            note = f"quantize='auto' chose {fmt or 'no quantization'}: " + "; ".join([*tried, fits])
            return dataclasses.replace(plan, notes=plan.notes + (note,))
        _say(progress, f"quantize='auto': {tried[-1]}; undoing it, trying the next option")
        rewrites.undo()
    raise AssertionError("unreachable: the last option returns or raises")


def _job_config(model: nn.Module, method: Any, budget_gb: Any, **options: Any) -> OptimizeConfig:
    """The call's options as a validated config, before the model is captured or changed: a
    ``peft.LoraConfig`` without targets gets PEFT's for this model, and the optimizer must be one the
    plan can count."""
    from memopt.memory import OPTIMIZERS

    cfg = OptimizeConfig.from_options(with_peft_default_targets(method, model), budget_gb, **options)
    if not isinstance(cfg.optimizer, str) or cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    return cfg


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _parameter_device(model: nn.Module) -> str:
    tensor = next(model.parameters(), None)
    device = "cpu" if tensor is None else tensor.device.type
    if device == "meta":
        raise ValueError("the model's parameters are on the meta device; pass device= (e.g. 'cuda' or 'rtx4090')")
    return device


def _bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    signature = inspect.signature(model.forward)
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"example_inputs do not fit {type(model).__name__}.forward{signature}: {exc}. "
            "Pass a tuple of positional arguments, a dict of keyword arguments, or an (args, kwargs) pair."
        ) from None


def _problem(trace: JointTrace, cfg: OptimizeConfig, planner: PlannerConfig) -> PlanningProblem:
    return build_problem(trace, cfg.device, allow_recompute=planner.allow_recompute,
                         allow_offload=planner.allow_offload, allow_rng_recompute=planner.allow_rng_recompute)


def _step_peak(memory: MemoryReport) -> int:
    """The simulated eager step's peak over forward and backward (what the activations decide)."""
    return max(memory.phase_peaks.get(phase, 0) for phase in ("forward", "backward"))


def _make_plan(model: nn.Module, cfg: OptimizeConfig, bound: inspect.BoundArguments, graph: ModelGraph,
               result: PassResult, memory: MemoryReport | None, trace: JointTrace, activations: ActivationPlan) -> Plan:
    params = list(model.parameters())
    captured = graph.captured
    notes = list(captured.notes) + list(graph.notes) + list(result.notes)
    if cfg.device.kind == "cuda":
        notes.append(f"device reserve {cfg.reserve_bytes / GIB:.3f} GiB for the CUDA context and allocator slack; "
                     f"every block rounded up to {cfg.device.alloc_granularity} bytes")
    notes.append("offload timing: each copy is on device for its own transfer time; queueing behind other copies "
                 "adds exposed time, not residency")
    if memory is None:
        notes.append("the model as it is was not simulated (planned from the joint trace alone)")
    return Plan(
        model=type(model).__name__,
        method=cfg.method,
        method_config=dataclasses.asdict(cfg.method_config),
        optimizer=cfg.optimizer,
        device=cfg.device,
        budget_bytes=cfg.budget_bytes,
        reserve_bytes=cfg.reserve_bytes,
        input_shapes=input_shapes(bound),
        input_dtypes=input_dtypes(bound),
        training=model.training,
        autocast=autocast_state(cfg.device.kind),
        capture=captured.method,
        modules=result.decisions,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        memory=memory,
        notes=tuple(notes),
        fingerprint=structural_fingerprint(model),
        **plan_fields(activations, trace_seconds=trace.trace_seconds,
                      applied_peak_bytes=None if memory is None else memory.peak_bytes,
                      op_flops=[op.flops for op in trace.ops]),
    )


def _merge_fn(cfg: OptimizeConfig) -> Callable[[nn.Module], nn.Module]:
    """What ``OptimizedModel.merge`` runs: the method's merge."""
    return get_pass(cfg.method).merge


def _replan(model: nn.Module, cfg: OptimizeConfig, planner: PlannerConfig, loss_fn: Any, lower: bool, old: Plan,
            args: tuple, kwargs: dict, why: str) -> Plan:
    """A new Plan for the already rewritten ``model`` as it is now (train/eval mode, autocast, flags),
    for the widest of ``old``'s shapes and these inputs': the rewrite stays (``old``'s module
    decisions); the step is simulated, traced and planned again."""
    bound = _bind_inputs(model, args, kwargs)
    args, kwargs = _widest(bound, old.input_shapes)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)
    memory, trace, activations = _plan_step(model, cfg, planner, (args, kwargs), loss_fn or _own_loss_or_every_output,
                                            simulate=True, progress=None, lower=lower)
    notes = tuple(n for n in old.notes if not n.startswith("re-planned")) + (
        f"re-planned for inputs {input_shapes(bound)} in {'train' if model.training else 'eval'} mode"
        f"{'' if autocast_state(cfg.device.kind) is None else ' under autocast ' + str(autocast_state(cfg.device.kind))}"
        f" ({why})",)
    fields = plan_fields(activations, trace_seconds=trace.trace_seconds, op_flops=[op.flops for op in trace.ops])
    fields.update(runtime_applies=old.runtime_applies, applied_peak_bytes=old.applied_peak_bytes)
    return dataclasses.replace(old, input_shapes=input_shapes(bound), input_dtypes=input_dtypes(bound), memory=memory,
                               notes=notes, fingerprint=structural_fingerprint(model), training=model.training,
                               autocast=autocast_state(cfg.device.kind), **fields)


def _own_loss_or_every_output(output: Any, inputs: Any) -> torch.Tensor:
    """A re-plan's loss without ``loss_fn``: the model's own ``loss`` when this call makes one (it
    had labels), else one that reads every differentiable output (the user's loss is unknown; every
    output's gradient flows back, as in the step the user runs)."""
    from torch.utils._pytree import tree_leaves

    own = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise TypeError("the model's outputs carry no gradient, so there is no training step to plan")
    return sum(t.float().mean() for t in leaves)


def _widest(bound: inspect.BoundArguments, planned: Any) -> tuple[tuple, dict]:
    """The call's inputs, each tensor widened to the elementwise maximum of its shape and the
    planned one (on the meta device: a plan reads only shapes), so a re-plan covers both — except
    dimensions of size 1, which a trace specializes: the call's program is planned, at its widest."""
    tensors = tensor_inputs(bound)
    wide = {}
    for name, t in tensors.items():
        want = planned.get(name)
        if want is None or len(want) != t.dim():
            continue
        shape = [s if s == 1 else max(p, s) for p, s in zip(want, t.shape)]
        if shape != list(t.shape):
            wide[name] = torch.empty(shape, dtype=t.dtype, device="meta")
    if not wide:
        return bound.args, bound.kwargs
    arguments = dict(bound.arguments)
    for name, t in wide.items():
        if name in arguments:  # a top-level tensor argument (nested ones stay as they are)
            arguments[name] = t
    rebound = inspect.BoundArguments(bound.signature, arguments)
    return rebound.args, rebound.kwargs


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in train mode inside, each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _refuse_rewritten(model: nn.Module) -> None:
    name = next((n for n, m in model.named_modules() if isinstance(m, REWRITTEN)), None)
    if name is not None:
        kind = type(model.get_submodule(name)).__name__
        raise TypeError(f"model was already rewritten by memopt (it holds a {kind} at {name!r}): pass the original "
                        "model, or merge() the OptimizedModel first and optimize the plain model it returns")
    name = next((n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if name is not None:
        raise TypeError(
            f"model is wrapped by PEFT ({type(model.get_submodule(name)).__name__} at {name or 'the top'!r}); memopt "
            "applies the adapters itself. Pass the base model with the PEFT config: memopt.optimize("
            "peft_model.unload(), ..., method=peft_config) for new adapters, or memopt.from_pretrained(base_model, "
            "adapter_dir, budget_gb, example_inputs) to go on training a saved PEFT LoRA adapter")


def _check_example(model: nn.Module, bound: inspect.BoundArguments) -> None:
    """Refuse example inputs no step can be planned for: an empty batch, sequences past the positions."""
    tensors = tensor_inputs(bound)
    for name, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(f"example input {name!r} is empty (shape {list(t.shape)}): give a batch of the "
                             "largest size you will train on")
    config = getattr(model, "config", None)
    limit = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, a, None), int)), None)
    ids = tensors.get("input_ids", tensors.get("inputs_embeds"))
    if limit is not None and ids is not None and ids.dim() >= 2 and ids.shape[1] > limit:
        field = "max_position_embeddings" if hasattr(config, "max_position_embeddings") else "n_positions"
        raise ValueError(f"example input sequences are {ids.shape[1]} tokens long, but {type(model).__name__}'s "
                         f"positions end at {limit} (config.{field}): shorten the batch, or build the model with "
                         "more positions")
