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

from memopt import pipeline
from memopt.config import GIB, OptimizeConfig, QuantizeConfig, with_peft_default_targets
from memopt.errors import InfeasibleBudgetError
from memopt.memory import hf_masks
from memopt.memory.autocast import planned_autocast
from memopt.memory.inputs import input_dtypes, input_shapes, normalize_inputs, tensor_inputs, training_kwargs
from memopt.optim import OPTIMIZERS, OptimizerConfig
from memopt.passes import REWRITTEN, RewriteLog, cut_ce, get_pass, rewrite, seq_chunk
from memopt.passes.quantize import QuantLinear
from memopt.pipeline import Job
from memopt.plan import Plan
from memopt.plan.report import format_bytes
from memopt.planner.solve import PlannerConfig, step_plan
from memopt.runtime.fingerprint import structural_fingerprint
from memopt.runtime.optimized import LARGER_INPUTS, OptimizedModel, wrap

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
    optimizer_options: dict[str, Any] | None = None,
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
        host_budget_gb (in ``**options``): GiB of host memory offloaded activations may hold
            (default: this machine's RAM; ``plan.host_budget_bytes``).
        loss_fn: ``loss_fn(output, (args, kwargs)) -> scalar`` for the simulated training step;
            not needed when the model returns its own ``.loss`` (HF models given labels).
        optimizer: the optimizer the plan counts (its states and step transients, measured), a name in
            ``memopt.optim.OPTIMIZERS`` — ``"adamw"`` (default), ``"adam"``, ``"sgd"``, ``"adamw8bit"``,
            ``"galore-adamw"``, ``"galore-adamw8bit"``, ``"apollo"``, ``"apollo-mini"``, ... — or a
            ``memopt.OptimizerConfig``; ``optimizer_options`` are its constructor's options (``rank``,
            ``update_proj_gap``, ...), checked before anything runs. The returned model's
            ``make_optimizer(lr=...)`` builds that optimizer over the trainable parameters.
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
    cfg = _job_config(model, method, budget_gb, optimizer=optimizer, optimizer_options=optimizer_options,
                      device=device or _parameter_device(model), reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)  # the step as the returned model runs it
    _check_example(model, bound)
    job = Job(model, (args, kwargs), bound, cfg, planner or PlannerConfig(), loss_fn, lower=compile)
    with _train_mode(model):  # a training step's mode, whatever mode the model came in
        rewrites = RewriteLog(model)
        try:
            plan = _plan(job, rewrites)
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
    permutations; they are checked against the saved ones; a full-parameter model's frozen
    parameters are frozen again), the trained tensors and the model's own buffers are loaded, and
    the saved plan is carried out after checking it was made for this model. Given ``budget_gb``
    and ``example_inputs``, the model is planned for them instead. A LoRA adapter directory
    written by PEFT loads too (``budget_gb`` and ``example_inputs`` needed: it holds no plan).

    Raises ``MemoptError`` naming what is wrong: missing files, a directory saved for another base
    model (the first tensor whose shape, index or base-weight checksum differs), a PEFT adapter
    type memopt does not support.
    """
    from memopt.checkpoint import freeze_as_saved, load_trained, read_checkpoint

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
        if plan is not None and plan.sequence_chunks is not None:
            options.setdefault("chunk_sequence", plan.sequence_chunks)
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            freeze_as_saved(model, checkpoint)
            optimized = optimize(model, budget_gb, example_inputs, checkpoint.method, loss_fn=loss_fn,
                                 optimizer=plan.optimizer if plan is not None else "adamw",
                                 optimizer_options=dict(plan.optimizer_options) if plan is not None else None,
                                 device=device, planner=planner, compile=compile, larger_inputs=larger_inputs, **options)
        except BaseException:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            raise
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
                                      optimizer_options=dict(plan.optimizer_options),
                                      device=plan.device if device is None else device,
                                      reserve_gb=plan.reserve_bytes / GIB,
                                      host_budget_gb=None if plan.host_budget_bytes is None else
                                      plan.host_budget_bytes / GIB, **options)
    kwargs = _inputs_of(plan, _parameter_device(model))
    bound = _bind_inputs(model, (), kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)
    with _train_mode(model):
        rewrites = RewriteLog(model)
        try:
            freeze_as_saved(model, checkpoint)  # (the log puts the flags back if this fails)
            job = Job(model, ((), kwargs), bound, cfg, planner or PlannerConfig(), loss_fn)
            captured = pipeline.capture(job, rewrites)
            rewrite(model, captured.graph, cfg.method_config,
                    cfg.quantize if isinstance(cfg.quantize, QuantizeConfig) else None, rewrites)
            if plan.sequence_chunks is not None:
                seq_chunk.install(model, plan.sequence_chunks, rewrites)
            if plan.cut_cross_entropy is not None:  # the plan's step is the fused one: no logits made
                _refuse_unfusable(model, plan, loss_fn is not None)
                cut_ce.install(model, 0, rewrites, chunks=plan.cut_cross_entropy)
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


def _refuse_unfusable(model: nn.Module, plan: Plan, loss_fn: bool) -> None:
    reason = cut_ce.why_not(model, True, loss_fn)
    if reason is not None:
        raise ValueError(f"the saved plan fuses the LM head and the loss (cut cross-entropy), which cannot apply to "
                         f"this {type(model).__name__}: {reason}; give budget_gb and example_inputs to plan it again")


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
    optimizer_options: dict[str, Any] | None = None,
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
    cfg = _job_config(model, method, budget_gb, optimizer=optimizer, optimizer_options=optimizer_options, device=device,
                      reserve_gb=reserve_gb, **options)
    args, kwargs = normalize_inputs(example_inputs)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)  # the step as the returned model runs it
    job = Job(model, (args, kwargs), bound, cfg, planner or PlannerConfig(), loss_fn, simulate=simulate,
              progress=progress)
    return _plan(job, RewriteLog(model))


def _plan(job: Job, rewrites: RewriteLog) -> Plan:
    """Capture once, then the pipeline's plan; ``quantize="auto"`` plans unquantized, then int8, then
    nf4 (least lossy first), undoing the rewrites between tries, and keeps the first that fits."""
    # An attention_mask of all ones (no padding) is read here, on the real batch: the step is planned
    # without a mask tensor, as HF runs it (memory.hf_masks).
    with hf_masks.assume_unpadded(hf_masks.unpadded(job.model, *job.inputs)):
        captured = pipeline.capture(job, rewrites)
        attempt = functools.partial(pipeline.plan, job, captured, rewrites)
        if job.config.quantize == "auto":
            return _plan_auto(attempt, job, rewrites)
        return attempt(job.config.quantize)


_AUTO_FORMATS = (None, "int8", "nf4")  # least lossy first: int8 keeps ~0.5 % of a weight's error, nf4 ~9 %


def _plan_auto(attempt: Callable[..., Plan], job: Job, rewrites: RewriteLog) -> Plan:
    """``quantize="auto"``: the least lossy of unquantized, int8, nf4 whose plan fits."""
    cfg = job.config
    usable = f"{format_bytes(cfg.usable_bytes)} usable"
    tried: list[str] = []
    composes = get_pass(cfg.method_config).quantize
    if composes == "trainable":  # int8 weights, if memopt's own optimizer can write them
        formats = (None, "int8") if OPTIMIZERS[cfg.optimizer].in_backward(cfg.optimizer_options) else (None,)
    else:
        formats = (None,) if composes == "never" else _AUTO_FORMATS
    for fmt in formats:
        label, last = fmt or "unquantized", fmt == formats[-1]
        try:
            plan = attempt(None if fmt is None else QuantizeConfig(format=fmt), weights_must_fit=not last)
        except pipeline.WeightsExceed as exc:
            tried.append(f"{label}: the weights alone take {format_bytes(exc.nbytes)} > {usable}")
        except InfeasibleBudgetError as exc:
            if last:
                what = "nf4, the most compressed" if fmt == "nf4" else (
                    f"unquantized, the only option ({get_pass(cfg.method_config).label} trains the weights themselves)")
                raise InfeasibleBudgetError(
                    f"quantize='auto': no option fits ({'; '.join(tried) or 'nothing else to try'}); {what}: "
                    f"{str(exc).splitlines()[0]}", predicted_bytes=exc.predicted_bytes, budget_bytes=exc.budget_bytes,
                    min_budget_bytes=exc.min_budget_bytes, breakdown=exc.breakdown) from exc
            tried.append(f"{label} needs a budget of {format_bytes(exc.min_budget_bytes)} > "
                         f"{format_bytes(cfg.budget_bytes)}")
        else:
            fits = f"{label} fits at a predicted peak of {format_bytes(plan.predicted_peak_bytes)} of {usable}"
            note = f"quantize='auto' chose {fmt or 'no quantization'}: " + "; ".join([*tried, fits])
            return dataclasses.replace(plan, notes=plan.notes + (note,))
        job.say(f"quantize='auto': {tried[-1]}; undoing it, trying the next option")
        rewrites.undo()
    raise AssertionError("unreachable: the last option returns or raises")


def _job_config(model: nn.Module, method: Any, budget_gb: Any, **options: Any) -> OptimizeConfig:
    """The call's options as a validated config, before the model is captured or changed: a
    ``peft.LoraConfig`` without targets gets PEFT's for this model, and the optimizer must be one the
    plan can count."""
    optimizer, given = options.pop("optimizer", "adamw"), options.pop("optimizer_options", None)
    if isinstance(optimizer, OptimizerConfig):
        optimizer, given = optimizer.name, {**optimizer.options, **(given or {})}
    checked = OptimizerConfig(optimizer, given or {})  # an unknown name or option fails here, before capture
    cfg = OptimizeConfig.from_options(with_peft_default_targets(method, model), budget_gb, optimizer=checked.name,
                                      optimizer_options=dict(checked.options), **options)
    composes = get_pass(cfg.method_config).quantize
    if cfg.quantize not in (None, "auto") and composes == "never":
        raise ValueError(get_pass(cfg.method_config).bitsandbytes)
    fmt = cfg.quantize.format if isinstance(cfg.quantize, QuantizeConfig) else cfg.quantize
    int8_trained = composes == "trainable" and fmt == "int8"
    if int8_trained and OPTIMIZERS[cfg.optimizer].in_backward(cfg.optimizer_options) is None:
        lean = ", ".join(sorted(n for n, s in OPTIMIZERS.items() if s.per_parameter is not None))
        given = f" with {dict(cfg.optimizer_options)}" if cfg.optimizer_options else ""
        raise ValueError(f"trainable int8 weights are written back by memopt's own optimizers ({lean}), not "
                         f"optimizer={cfg.optimizer!r}{given}: choose one of those")
    if composes == "trainable" and fmt not in (None, "auto", "int8"):
        raise ValueError(f"method={cfg.method!r} trains the weights themselves: they can be stored int8 "
                         f"(quantize='int8', trained by stochastic rounding), not {fmt}, whose codes cannot take an "
                         f"update; train adapters over {fmt} weights with method='lora' (QLoRA)")
    return cfg


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


def _merge_fn(cfg: OptimizeConfig) -> Callable[[nn.Module], nn.Module]:
    """What ``OptimizedModel.merge`` runs: the method's merge."""
    return get_pass(cfg.method_config).merge


def _replan(model: nn.Module, cfg: OptimizeConfig, planner: PlannerConfig, loss_fn: Any, lower: bool, old: Plan,
            args: tuple, kwargs: dict, why: str, widen: bool = True) -> Plan:
    """A new Plan for the already rewritten ``model`` as it is now (train/eval mode, autocast, flags),
    for the widest of ``old``'s shapes and these inputs' (``widen=False``: these inputs' own): the
    rewrite stays (``old``'s module decisions); the step is simulated, traced and planned again."""
    if not old.update_in_backward:  # the user's loop steps an optimizer after backward: a re-plan keeps it so
        planner = dataclasses.replace(planner, allow_update_in_backward=False)
    bound = _bind_inputs(model, args, kwargs)
    unpadded = bool(hf_masks.unpadded(model, args, kwargs))  # read on the call's real mask, before widening
    if widen:
        args, kwargs = _widest(bound, old.input_shapes)
    bound = _bind_inputs(model, args, kwargs)
    kwargs = training_kwargs(bound.signature, kwargs)
    labels = bound.arguments.get("labels")
    if isinstance(labels, torch.Tensor):  # a fused head and loss cuts the widest batch into pieces as optimize did
        cut_ce.resize(model, labels.numel())
    job = Job(model, (args, kwargs), bound, cfg, planner, loss_fn or _own_loss_or_every_output, lower=lower)
    with hf_masks.assume_unpadded(unpadded):
        every = pipeline.plan_every_set(job) if old.traced_trainable is not None else "not planned so"
        memory, trace, activations = every if isinstance(every, tuple) else pipeline.plan_step(job)
    autocast = planned_autocast(cfg.device.kind, _parameter_device(model))
    notes = tuple(n for n in old.notes if not n.startswith("re-planned")) + (
        f"re-planned for inputs {input_shapes(bound)} in {'train' if model.training else 'eval'} mode"
        f"{'' if autocast is None else ' under autocast ' + autocast} ({why})",)
    step = step_plan(activations, trace_seconds=trace.trace_seconds, op_flops=[op.flops for op in trace.ops])
    return old.with_step(step, input_shapes=input_shapes(bound), input_dtypes=input_dtypes(bound), memory=memory,
                         notes=notes, fingerprint=structural_fingerprint(model), training=model.training,
                         autocast=autocast,
                         traced_trainable=pipeline.traced_trainable(model) if trace.dropped else None,
                         cut_cross_entropy=cut_ce.pieces(model), unpadded_mask=unpadded)


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
    dimensions of size 1, which a trace specializes: the call's program is planned, at its widest.
    A tensor without a planned shape has the sizes the others widened widened alike."""
    tensors = tensor_inputs(bound)
    wide, sizes = {}, {}
    for name, t in tensors.items():
        want = planned.get(name)
        if want is None or len(want) != t.dim():
            continue
        shape = [s if s == 1 else max(p, s) for p, s in zip(want, t.shape)]
        for s, w in zip(t.shape, shape):
            if s != w:
                sizes.setdefault(s, set()).add(w)
        if shape != list(t.shape):
            wide[name] = torch.empty(shape, dtype=t.dtype, device="meta")
    # A tensor the plan had no shape for (an attention mask the example lacked) is widened with the
    # others, each dimension of a size they widened, alike (where they widened it one way), so the
    # step stays one that runs: the mask of a shorter padded batch is as long as the widened ids.
    same = {s: next(iter(w)) for s, w in sizes.items() if len(w) == 1}
    for name, t in tensors.items():
        if name not in planned and any(s in same for s in t.shape):
            wide[name] = torch.empty([same.get(s, s) for s in t.shape], dtype=t.dtype, device="meta")
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
