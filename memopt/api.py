"""`optimize`: the pipeline of DESIGN.md §1 as one short list of stages."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn as nn

from memopt.config import GIB, OptimizeConfig
from memopt.ir.capture import CapturedGraph
from memopt.ir.joint import JointTrace, trace_joint
from memopt.ir.structure import ModelGraph, build_model_graph
from memopt.memory.inputs import normalize_inputs
from memopt.memory.report import MemoryReport
from memopt.memory.simulate import simulate_step
from memopt.passes import PassResult, RewriteLog, get_pass
from memopt.planner.plan import Plan
from memopt.planner.problem import PlanningProblem, build_problem, calibrated
from memopt.planner.solve import ActivationPlan, PlannerConfig, plan_activations, plan_fields
from memopt.runtime.optimized import OptimizedModel, wrap

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
            options are an error.
        loss_fn: ``loss_fn(output, (args, kwargs)) -> scalar`` for the simulated training step;
            not needed when the model returns its own ``.loss`` (HF models given labels).
        optimizer: the optimizer whose states are counted, ``"adamw"`` by default.
        device: the target device, a preset name (``"rtx4090"``, ``"a100-80gb"``, ``"cuda"``,
            ``"cpu"``) or a ``DeviceSpec``; default: where the parameters live. A plan for a GPU
            can be made on a machine without one.
        planner: a ``PlannerConfig`` (what the activation planner may do, its time limit), or
            None for the defaults. ``PlannerConfig(enabled=False)`` keeps every activation.

    The plan (``model.plan``): each activation saved for backward is kept, recomputed or
    offloaded so that the predicted peak fits the budget at the least predicted time
    (``memopt.planner``). The returned model carries out only what ``plan.runtime_applies``
    lists — for now "keep": if keeping everything fits, the plan is exactly what runs; otherwise
    the plan's recompute / offload decisions are a prediction (``plan.fully_applied`` is False,
    a warning is logged, ``plan.applied_peak_bytes`` is what the returned model peaks at).

    What happens to ``model``: it is rewritten **in place** and wrapped, not copied (copying a
    large model would double its memory). Targeted Linear-like submodules are replaced by
    modules that hold the original layer as ``base_layer``, and every original parameter gets
    ``requires_grad=False``. LoRA changes no weight value; PaCA writes ``scaling·P`` into the
    selected columns of W on every forward (the trainable P starts equal to them, so the
    function is unchanged); S²FT permutes the rows / columns of coupled weights in place
    (function-preserving) and trains dense blocks of them. The returned ``OptimizedModel`` wraps
    that same object (``.model``). ``merge()`` folds the trained parameters back into plain
    layers (S²FT: in the original order) and restores the original ``requires_grad`` flags. If
    ``optimize`` raises, the module is restored exactly as it was (weights included).

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
    cfg = OptimizeConfig.from_options(method, budget_gb, optimizer=optimizer,
                                      device=device or _parameter_device(model), reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    # Capture once, before rewriting: the structure (roles, heads, couplings) comes from dataflow.
    graph = build_model_graph(model, args, kwargs)
    rewrites = RewriteLog(model)
    try:
        plan = _plan(model, cfg, planner or PlannerConfig(), graph, bound, (args, kwargs), loss_fn, rewrites,
                     simulate=True)
    except BaseException:
        rewrites.undo()
        raise
    log.info("memopt: %s on %s, predicted peak %.3f GiB of %.3f GiB usable", cfg.method,
             type(model).__name__, plan.predicted_peak_bytes / GIB, plan.usable_bytes / GIB)
    if not plan.fully_applied:
        log.warning("memopt: the plan recomputes or offloads activations, which the returned model does not do "
                    "yet (runtime lowering pending): as returned it peaks at %.3f GiB", plan.applied_peak_bytes / GIB)
    return wrap(model, plan, get_pass(cfg.method).merge, rewrites.original_requires_grad())


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

    ``model`` is rewritten in place and not restored (build a fresh one per call). Without
    ``simulate`` the eager step is not simulated: the prediction is the joint trace's alone
    (uncalibrated, ``plan.memory`` is None), which is what makes 70B-sized plans quick.
    """
    cfg = OptimizeConfig.from_options(method, budget_gb, optimizer=optimizer, device=device,
                                      reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    _say(progress, f"capturing {type(model).__name__}")
    graph = build_model_graph(model, args, kwargs)
    return _plan(model, cfg, planner or PlannerConfig(), graph, bound, (args, kwargs), loss_fn, RewriteLog(model),
                 simulate=simulate, progress=progress)


def _plan(model: nn.Module, cfg: OptimizeConfig, planner: PlannerConfig, graph: ModelGraph,
          bound: inspect.BoundArguments, inputs: tuple[tuple, dict], loss_fn: Any, rewrites: RewriteLog, *,
          simulate: bool, progress: Callable[[str], None] | None = None) -> Plan:
    """The stages after capture: rewrite, (simulate), trace, plan. Requires ``graph`` of ``model``."""
    # Rewrite in place through the undo log; everything after measures the rewritten model.
    _say(progress, f"applying {cfg.method}")
    result = get_pass(cfg.method).apply(model, graph, cfg.method_config, rewrites)
    # The eager step the user will run, with every activation kept: exact bytes (ground truth).
    memory = None
    if simulate:
        _say(progress, "simulating the eager step")
        memory = simulate_step(model, inputs, loss_fn=loss_fn, optimizer=cfg.optimizer,
                               device=cfg.device.kind, round_to=cfg.device.alloc_granularity)
    # The same step as one joint graph: what backward needs, when, and what recomputing it costs.
    _say(progress, "tracing the joint forward + backward step")
    trace = trace_joint(model, inputs, loss_fn=loss_fn, optimizer=cfg.optimizer,
                        device=cfg.device.kind, granularity=cfg.device.alloc_granularity)
    problem = _problem(trace, cfg, planner)
    if memory is not None:  # calibrate: keep-all predicts the simulated step exactly
        problem = calibrated(problem, _step_peak(memory), memory.phase_peaks.get("optimizer"))
    # Keep / recompute / offload each saved activation: the fastest plan inside the budget.
    _say(progress, f"planning {len(problem.candidates)} saved tensors ({problem.num_classes} decision classes) "
                   f"for {cfg.usable_bytes / GIB:.2f} GiB usable (traced in {trace.trace_seconds:.1f} s)")
    activations = plan_activations(problem, cfg.usable_bytes, planner, reserve_bytes=cfg.reserve_bytes,
                                   what=f"{cfg.method} on {type(model).__name__}", progress=progress)
    return _make_plan(model, cfg, bound, graph.captured, result, memory, trace, activations)


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


def _input_shapes(bound: inspect.BoundArguments) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            shapes[name] = tuple(value.shape)
        elif isinstance(value, (tuple, list)):
            shapes.update({f"{name}[{i}]": tuple(v.shape) for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        elif isinstance(value, dict):
            shapes.update({f"{name}.{k}": tuple(v.shape) for k, v in value.items() if isinstance(v, torch.Tensor)})
    return shapes


def _problem(trace: JointTrace, cfg: OptimizeConfig, planner: PlannerConfig) -> PlanningProblem:
    return build_problem(trace, cfg.device, allow_recompute=planner.allow_recompute,
                         allow_offload=planner.allow_offload, allow_rng_recompute=planner.allow_rng_recompute)


def _step_peak(memory: MemoryReport) -> int:
    """The simulated eager step's peak over forward and backward (what the activations decide)."""
    return max(memory.phase_peaks.get(phase, 0) for phase in ("forward", "backward"))


def _make_plan(model: nn.Module, cfg: OptimizeConfig, bound: inspect.BoundArguments, captured: CapturedGraph,
               result: PassResult, memory: MemoryReport | None, trace: JointTrace, activations: ActivationPlan) -> Plan:
    params = list(model.parameters())
    notes = list(captured.notes) + list(result.notes)
    if cfg.device.kind == "cuda":
        notes.append(f"device reserve {cfg.reserve_bytes / GIB:.3f} GiB for the CUDA context and allocator slack; "
                     f"every block rounded up to {cfg.device.alloc_granularity} bytes")
    notes.append("offload timing: each copy is on device for its own transfer time; queueing behind other copies "
                 "adds exposed time, not residency")
    if memory is None:
        notes.append("not calibrated to a simulated eager step (planned from the joint trace alone)")
    return Plan(
        model=type(model).__name__,
        method=cfg.method,
        method_config=dataclasses.asdict(cfg.method_config),
        optimizer=cfg.optimizer,
        device=cfg.device,
        budget_bytes=cfg.budget_bytes,
        reserve_bytes=cfg.reserve_bytes,
        input_shapes=_input_shapes(bound),
        capture=captured.method,
        modules=result.decisions,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        memory=memory,
        notes=tuple(notes),
        **plan_fields(activations, trace_seconds=trace.trace_seconds,
                      applied_peak_bytes=None if memory is None else memory.peak_bytes),
    )
