"""`optimize`: the pipeline of DESIGN.md §1 as one short list of stages."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn as nn

from memopt.config import GIB, OptimizeConfig
from memopt.errors import InfeasibleBudgetError, MemoptError
from memopt.ir.structure import build_model_graph
from memopt.memory.inputs import normalize_inputs
from memopt.memory.simulate import simulate_step
from memopt.passes import PassResult, RewriteLog, get_pass
from memopt.planner.plan import Plan
from memopt.runtime.optimized import OptimizedModel, wrap

__all__ = ["optimize"]

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
        method: the parameterization, ``"lora"``; ``**options`` are that method's config fields
            (for LoRA: ``rank``, ``alpha``, ``dropout``, ``target_modules``, ``exclude_modules``,
            ``seed``) — unknown options are an error.
        loss_fn: ``loss_fn(output, (args, kwargs)) -> scalar`` for the simulated training step;
            not needed when the model returns its own ``.loss`` (HF models given labels).
        optimizer: the optimizer whose states are counted, ``"adamw"`` by default.
        device: the target device, a preset name (``"rtx4090"``, ``"a100-80gb"``, ``"cuda"``,
            ``"cpu"``) or a ``DeviceSpec``; default: where the parameters live. A plan for a GPU
            can be made on a machine without one.

    What happens to ``model``: it is rewritten **in place** and wrapped, not copied (copying a
    large model would double its memory). Targeted Linear-like submodules are replaced by
    adapter modules that hold the original layer as ``base_layer``, and every original parameter
    gets ``requires_grad=False``; no weight value changes. The returned ``OptimizedModel`` wraps
    that same object (``.model``). ``merge()`` folds the adapters back and restores the original
    ``requires_grad`` flags. If ``optimize`` raises, the module is restored exactly as it was.

    Raises:
        TypeError / ValueError: bad arguments, with what to change.
        UnsupportedModelError: the model could not be captured.
        InfeasibleBudgetError: the predicted peak exceeds the budget; carries the bytes.
    """
    # Validate everything before touching the model, so a bad call changes nothing.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModel):
        raise TypeError("model was already optimized by memopt; call merge() first or pass the original")
    cfg = OptimizeConfig.from_options(method, budget_gb, optimizer=optimizer,
                                      device=device or _parameter_device(model), reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    # Capture once, before rewriting: the structure (roles, heads, couplings) comes from dataflow.
    graph = build_model_graph(model, args, kwargs)
    rewrites = RewriteLog(model)
    try:
        # Rewrite in place through the undo log, then measure the step the user will run.
        result = get_pass(cfg.method).apply(model, graph, cfg.method_config, rewrites)
        memory = simulate_step(model, (args, kwargs), loss_fn=loss_fn, optimizer=cfg.optimizer,
                               device=cfg.device.kind, round_to=cfg.device.alloc_granularity)
        plan = _make_plan(model, cfg, bound, graph.captured.method, graph.captured.notes, result, memory)
        _check_fits(plan)
    except BaseException:
        rewrites.undo()
        raise
    log.info("memopt: %s on %s, predicted peak %.3f GiB of %.3f GiB usable", cfg.method,
             type(model).__name__, plan.predicted_peak_bytes / GIB, plan.usable_bytes / GIB)
    return wrap(model, plan, get_pass(cfg.method).merge, rewrites.original_requires_grad())


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


def _make_plan(model: nn.Module, cfg: OptimizeConfig, bound: inspect.BoundArguments, capture: str,
               capture_notes: tuple[str, ...], result: PassResult, memory) -> Plan:
    params = list(model.parameters())
    notes = list(capture_notes) + list(result.notes)
    if cfg.device.kind == "cuda":
        notes.append(f"device reserve {cfg.reserve_bytes / GIB:.3f} GiB for the CUDA context and allocator slack; "
                     f"every block rounded up to {cfg.device.alloc_granularity} bytes")
    notes.append("no activation checkpointing or offload applied: every saved activation is kept")
    return Plan(
        model=type(model).__name__,
        method=cfg.method,
        method_config=dataclasses.asdict(cfg.method_config),
        optimizer=cfg.optimizer,
        device=cfg.device,
        budget_bytes=cfg.budget_bytes,
        reserve_bytes=cfg.reserve_bytes,
        input_shapes=_input_shapes(bound),
        capture=capture,
        modules=result.decisions,
        memory=memory,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        notes=tuple(notes),
    )


def _check_fits(plan: Plan) -> None:
    if plan.fits:
        return
    needed = plan.predicted_peak_bytes + plan.reserve_bytes
    raise InfeasibleBudgetError(
        f"{plan.method} on {plan.model} does not fit {plan.budget_bytes / GIB:.3f} GiB on {plan.device.name}",
        predicted_bytes=plan.predicted_peak_bytes,
        budget_bytes=plan.usable_bytes,
        min_budget_gb=needed / GIB,
        breakdown=plan.memory.peak.to_dict(),
    )
