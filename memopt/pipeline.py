"""The stages of a plan, in order, over one frozen record of the job (docs/architecture.md).

``capture`` reads the model's structure once; ``plan`` is the rest as one straight line — rewrite,
measure, trace, solve, record — and returns the ``Plan``. ``memopt.api`` validates the call, builds
the ``Job``, loops ``plan`` for ``quantize="auto"`` and hands the Plan to the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch.nn as nn
from torch import Tensor

from memopt.config import GIB, OptimizeConfig, QuantizeConfig
from memopt.errors import InfeasibleBudgetError
from memopt.ir.joint import JointGraph, JointTrace, optimizer_bytes, trace_joint_graph
from memopt.ir.structure import ModelGraph, build_model_graph
from memopt.kernels.dequant import simulating
from memopt.memory import hf_masks
from memopt.memory.autocast import on_target, planned_autocast
from memopt.memory.inputs import input_dtypes, input_shapes
from memopt.memory.report import MemoryReport
from memopt.memory.simulate import OptimizerFactory, simulate_step
from memopt.optim import OPTIMIZERS, factory, plan_notes
from memopt.passes import (
    PassResult,
    RewriteLog,
    after_step_bytes,
    check_bitsandbytes,
    cut_ce,
    layerwise,
    rewrite,
    seq_chunk,
)
from memopt.passes.int8train import is_handle
from memopt.passes.quantize import QuantLinear
from memopt.plan import Plan
from memopt.plan.report import format_bytes, format_us
from memopt.planner.problem import (
    Choice,
    PlanningProblem,
    build_problem,
    offloaded_bytes,
    step_peak,
    with_optimizer_peak,
)
from memopt.planner.solve import ActivationPlan, Measure, PlannerConfig, decisions_for, plan_activations, step_plan
from memopt.runtime.fingerprint import structural_fingerprint
from memopt.runtime.partition import plan_partition

__all__ = ["Captured", "Job", "WeightsExceed", "capture", "plan", "plan_step"]


@dataclass(frozen=True)
class Job:
    """What one plan is made for: the model (rewritten in place by ``plan``), the inputs as the
    returned model runs them, the validated config, and how far to go (``simulate``: measure the
    eager step too; ``lower``: the runtime lowers the step whatever the plan)."""

    model: nn.Module
    inputs: tuple[tuple, dict]
    bound: inspect.BoundArguments
    config: OptimizeConfig
    planner: PlannerConfig
    loss_fn: Callable[..., Any] | None = None
    simulate: bool = True
    lower: bool = False
    progress: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass(frozen=True)
class Captured:
    graph: ModelGraph
    notes: tuple[str, ...] = ()


class WeightsExceed(Exception):
    """The rewritten model's weights alone exceed the usable budget (``quantize="auto"``'s early out)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


def capture(job: Job, rewrites: RewriteLog) -> Captured:
    """The model's structure, captured once before rewriting (roles, heads and couplings come from
    dataflow). Layers loaded quantized by bitsandbytes are shadowed by memory-free Linears for the
    capture, then become ``QuantLinear`` layers over their own bytes; the notes say so."""
    from memopt.passes.bitsandbytes import adopt_shadowed, bitsandbytes_layers, describe, shadow_for_capture

    args, kwargs = job.inputs
    job.say(f"capturing {type(job.model).__name__}")
    if not bitsandbytes_layers(job.model):
        return Captured(build_model_graph(job.model, args, kwargs))
    if job.config.quantize is not None:
        raise ValueError("this model was loaded quantized by bitsandbytes; its layers are taken as they are, so "
                         "leave quantize= unset")
    check_bitsandbytes(job.config.method_config)
    adopted = shadow_for_capture(job.model, rewrites)
    graph = build_model_graph(job.model, args, kwargs)
    adopt_shadowed(adopted, rewrites)
    return Captured(graph, (f"layers loaded by bitsandbytes taken as they are: {describe(adopted)}; memopt reads "
                            "their bytes in place, nothing dequantized or copied",))


def plan(job: Job, captured: Captured, rewrites: RewriteLog, quant: QuantizeConfig | None, *,
         weights_must_fit: bool = False) -> Plan:
    """One plan of the job's method on weights quantized by ``quant`` (None: as they are)."""
    cfg = job.config
    job.say(f"applying {cfg.method}" + ("" if quant is None else f" on {quant.format} weights"))
    # Rewrite in place through the undo log, composed with quantization as the method's pass declares;
    # everything after measures the rewritten model.
    result = rewrite(job.model, captured.graph, cfg.method_config, quant, rewrites)
    if cfg.chunk_sequence == "auto" and not (chunkable := seq_chunk.chunkable(job.model))[0]:
        result = dataclasses.replace(result, notes=(*result.notes, _nothing_to_chunk(chunkable[1])))
    if cfg.chunk_sequence not in (None, "auto"):
        _refuse_empty_pieces(job, cfg.chunk_sequence)
        result = dataclasses.replace(result, notes=(*result.notes, chunk_sequence(job.model, cfg.chunk_sequence,
                                                                                   rewrites)))
    # The weights alone are a lower bound of any step's peak: quantize="auto" moves on without a trace.
    if weights_must_fit and (weights := weight_bytes(job.model)) > cfg.usable_bytes:
        raise WeightsExceed(weights)
    # The step measured (eager, every activation kept), traced as one joint graph, and solved.
    try:
        try:
            memory, trace, activations, chosen, cut = _plan_with_loss(job, result, rewrites)
        except InfeasibleBudgetError as exc:
            pieces = _auto_chunks(job)
            if pieces is None:
                raise
            (memory, trace, activations, chosen, cut), note = _chunked_to_fit(job, result, rewrites, pieces, exc)
            result = dataclasses.replace(result, notes=(*result.notes, note))
        else:
            # (not for a pass with variants, e.g. layerwise sampling: the model is left in the state planned)
            pieces = _auto_chunks(job) if activations.overhead_us > 0 and not result.variants else None
            if pieces is not None:  # it fits, but recomputes or offloads: MLPs in pieces may be faster
                (memory, trace, activations, chosen, cut), note = _faster_chunked(
                    job, result, rewrites, pieces, (memory, trace, activations, chosen, cut))
                result = dataclasses.replace(result, notes=(*result.notes, note))
    except InfeasibleBudgetError as exc:
        raise _named_fixed(job, result, exc) or exc from None
    # The record of it all: what was done per module, per saved tensor, and what it predicts.
    result = dataclasses.replace(result, notes=(*result.notes, *(n for n in (chosen, cut) if n)))
    return _record(job, captured, result, memory, trace, activations)


def _nothing_to_chunk(left: dict[str, str]) -> str:
    """chunk_sequence="auto"'s note where no MLP can run in pieces (``left``: those left whole, with why)."""
    why = "; ".join(f"{name}: {reason}" for name, reason in list(left.items())[:2])
    return ("chunk_sequence='auto' runs no MLP in pieces: " + (f"{len(left)} MLP(s) left whole ({why}"
            f"{'; ...' if len(left) > 2 else ''})" if left else "the model has no MLP memopt knows (a module "
            "named *MLP)"))


_TOKENS_PER_PIECE = 4096  # chunk_sequence="auto": pieces of about this many positions (GEMMs still large),
_MAX_PIECES = 16  # and at most this many (each piece's ops are traced and planned: the graph grows with them)


def _auto_chunks(job: Job) -> int | None:
    """``chunk_sequence="auto"``'s pieces for this job (None: not asked, or nothing to chunk): the
    example's sequence in pieces of about ``_TOKENS_PER_PIECE`` positions, from 2 to ``_MAX_PIECES``."""
    if job.config.chunk_sequence != "auto" or seq_chunk.installed(job.model) or not seq_chunk.chunkable(job.model)[0]:
        return None
    return min(_MAX_PIECES, max(2, -(-_example_tokens(job) // _TOKENS_PER_PIECE)))


def _example_tokens(job: Job) -> int:
    """The example's sequence length: the last dimension of its widest token-id-like input (0: none)."""
    return max((v.shape[-1] for v in job.bound.arguments.values() if isinstance(v, Tensor) and v.dim() >= 2
                and not v.is_floating_point()), default=0)


def _refuse_empty_pieces(job: Job, chunks: int | Mapping[str, int]) -> None:
    """More pieces than the example has tokens leaves pieces empty: every one is traced, planned and
    run for nothing. A shorter batch later is fine (exact, with some pieces empty); the planned one is
    the widest the loop makes."""
    most = chunks if isinstance(chunks, int) else max(chunks.values(), default=0)
    tokens = _example_tokens(job)
    if tokens and most > tokens:
        raise ValueError(f"chunk_sequence={chunks!r} asks for {most} pieces of the sequence, longer than the example's "
                         f"{tokens} positions: {most - tokens} piece{'s' if most - tokens > 1 else ''} would be empty. Use "
                         f"at most {tokens} pieces (pieces of thousands of positions keep the matrix products large), or "
                         "chunk_sequence='auto'")


def _chunked_to_fit(job: Job, result: PassResult, rewrites: RewriteLog, pieces: int,
                    whole: InfeasibleBudgetError) -> tuple[tuple, str]:
    """``chunk_sequence="auto"`` where the step with whole MLPs does not fit (``whole``): the step
    planned with every MLP in ``pieces`` pieces of tokens, and, where only some MLPs are at that
    plan's peak (their ops above the budget), with those alone in pieces too — the faster plan that
    fits is kept (fewer MLPs re-run, but less room for the rest). Cut cross-entropy is decided again
    for each (a failed attempt may have left it installed). Returns ``_plan_with_loss``'s result, with
    the model left as it has it, and the plan's note."""
    everyone = seq_chunk.chunkable(job.model)[0]
    at_peak = [name for name in everyone
               if any(m == name or m.startswith(name + ".") for m in whole.over_budget_modules)]
    why = f"because the step with whole MLPs does not fit ({str(whole).splitlines()[0]})"
    partial = None
    if 0 < len(at_peak) < len(everyone) and not result.variants:  # (a pass with variants: the model is left in
        # the state planned last)
        job.say(f"{str(whole).splitlines()[0]}; planning with the {len(at_peak)} MLPs at its peak run {pieces} "
                "pieces of tokens at a time")
        cut_ce.uninstall(job.model)
        note = chunk_sequence(job.model, dict.fromkeys(at_peak, pieces), rewrites)
        try:
            partial = _plan_with_loss(job, result, rewrites), note, cut_ce.installed(job.model)
        except InfeasibleBudgetError as exc:
            why += f", nor with only the {len(at_peak)} MLPs at its peak in pieces ({str(exc).splitlines()[0]})"
        seq_chunk.uninstall(job.model)
    job.say(f"{str(whole).splitlines()[0]}; planning with every MLP run {pieces} pieces of tokens at a time")
    cut_ce.uninstall(job.model)
    note = chunk_sequence(job.model, pieces, rewrites)
    try:
        every = _plan_with_loss(job, result, rewrites)
    except InfeasibleBudgetError:
        if partial is None:
            raise
        every = None
    if partial is None:
        return every, f"{note}; chosen (chunk_sequence='auto') {why}"
    (planned, partial_note, fused), partial_us = partial, _step_us(partial[0][2])
    if every is not None and _step_us(every[2]) <= partial_us:
        return every, (f"{note}; chosen (chunk_sequence='auto') {why}; every MLP in pieces is the faster step "
                       f"({_step_us(every[2]) / 1e3:,.1f} ms predicted; only the {len(at_peak)} at the peak: "
                       f"{partial_us / 1e3:,.1f} ms)")
    # The plan with the MLPs at the peak in pieces: the model back in the state it was planned in.
    _back_to_whole(job, rewrites, fused)
    chunk_sequence(job.model, dict.fromkeys(at_peak, pieces), rewrites)
    return planned, (f"{partial_note}; chosen (chunk_sequence='auto') {why}: these are the MLPs at that plan's peak "
                     "(their ops above the budget), the others stay whole" + (
                         "" if every is None else f"; the faster step ({partial_us / 1e3:,.1f} ms predicted; every "
                         f"MLP in pieces: {_step_us(every[2]) / 1e3:,.1f} ms)"))


def _faster_chunked(job: Job, result: PassResult, rewrites: RewriteLog, pieces: int,
                    whole: tuple[MemoryReport | None, JointTrace, ActivationPlan, str, str]) -> tuple[
        tuple[MemoryReport | None, JointTrace, ActivationPlan, str, str], str]:
    """``chunk_sequence="auto"`` on a step that fits with whole MLPs but must recompute or offload:
    the step planned with the MLPs in ``pieces`` too (cut cross-entropy decided again for it), and
    the faster plan kept (the model is left as that plan has it); the plan's note on the choice."""
    job.say(f"the step fits with recomputation or offload; planning with the MLPs run {pieces} pieces of tokens "
            "at a time to compare")
    fused = cut_ce.installed(job.model)
    cut_ce.uninstall(job.model)
    note = chunk_sequence(job.model, pieces, rewrites)
    whole_us = _step_us(whole[2])
    try:
        chunked = _plan_with_loss(job, result, rewrites)
    except InfeasibleBudgetError as exc:  # (whole MLPs fitted: pieces add only their re-run's transients)
        _back_to_whole(job, rewrites, fused)
        return whole, (f"sequence chunking not applied (chunk_sequence='auto'): in {pieces} pieces the step does not "
                       f"fit ({str(exc).splitlines()[0]})")
    if _step_us(chunked[2]) < whole_us:
        return chunked, (f"{note}; chosen (chunk_sequence='auto') as the faster step: "
                         f"{_step_us(chunked[2]) / 1e3:,.1f} ms predicted, against {whole_us / 1e3:,.1f} ms with "
                         "whole MLPs")
    _back_to_whole(job, rewrites, fused)
    return whole, (f"sequence chunking not applied (chunk_sequence='auto'): the step with whole MLPs is "
                   f"{'as fast' if whole_us == _step_us(chunked[2]) else 'faster'} ({whole_us / 1e3:,.1f} ms "
                   f"predicted, in {pieces} pieces {_step_us(chunked[2]) / 1e3:,.1f} ms)")


def _back_to_whole(job: Job, rewrites: RewriteLog, fused: bool) -> None:
    """The model as the plan with whole MLPs has it: no MLP in pieces, the head and loss fused if ``fused``."""
    seq_chunk.uninstall(job.model)
    cut_ce.uninstall(job.model)
    if fused:
        cut_ce.install(job.model, job.bound.arguments["labels"].numel(), rewrites)


def chunk_sequence(model: nn.Module, chunks: int | Mapping[str, int], rewrites: RewriteLog) -> str:
    """Run ``model``'s position-wise MLPs in pieces of tokens (``passes.seq_chunk``: ``chunks`` pieces
    each, or MLP name -> pieces); the plan's note on it. A model with no MLP that can be chunked is an
    error naming why."""
    chosen, left = seq_chunk.install(model, chunks, rewrites)
    whole = "; ".join(f"{name}: {why}" for name, why in list(left.items())[:3]) + (
        f" (and {len(left) - 3} more)" if len(left) > 3 else "")
    if not chosen:
        raise ValueError(f"chunk_sequence={chunks}: no MLP of {type(model).__name__} can run in pieces of tokens"
                         + (f" ({whole})" if whole else " (none found: chunking applies to position-wise MLPs)"))
    if isinstance(chunks, int):
        unchosen, pieces = [], f"{chunks} pieces of tokens at a time"
    else:
        unchosen = [name for name in seq_chunk.chunkable(model)[0] if name not in chunks]
        pieces = (f"{next(iter(chunks.values()))} pieces of tokens at a time" if len(set(chunks.values())) == 1 else
                  "in pieces of tokens (" + ", ".join(f"{name}: {n}" for name, n in chunks.items()) + ")")
    which = (f"{len(chosen)} MLP{'s' if len(chosen) > 1 else ''}" if not unchosen else
             f"{len(chosen)} of {len(chosen) + len(unchosen)} MLPs ({_names(chosen)})")
    return (f"sequence chunking: {which} run {pieces} in training, saving only their input (each piece re-run in the "
            f"backward: one more MLP forward per step)" + (f"; whole: {_names(unchosen)}" if unchosen else "")
            + (f"; left whole: {whole}" if whole else ""))


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _plan_with_loss(job: Job, result: PassResult, rewrites: RewriteLog) -> tuple[
        MemoryReport | None, JointTrace, ActivationPlan, str, str]:
    """``_plan_variants``, with the LM head and loss fused by cut cross-entropy where the config says
    (``True``), or, for ``"auto"``, where the step does not fit as it is and the fused step is faster
    (less recompute / offload) or is the only one that fits; the last item is the plan's note on it."""
    choice = job.config.cut_cross_entropy
    labels = job.bound.arguments.get("labels")
    reason = cut_ce.why_not(job.model, isinstance(labels, Tensor), job.loss_fn is not None)
    if reason is not None or choice is False:
        if choice is True:
            raise ValueError(f"cut_cross_entropy=True cannot apply to {type(job.model).__name__}: {reason}")
        said = "cut_cross_entropy=False" if reason is None else reason
        return (*_plan_variants(job, result), "" if cut_ce.why_not(job.model, True, False) else
                f"cut cross-entropy not applied: {said}; the step makes the whole [tokens, vocab] logits")
    first = failure = None
    if choice == "auto":
        try:
            first = _plan_variants(job, result)
        except InfeasibleBudgetError as exc:
            failure = exc
        if first is not None and not first[2].lowered:
            return (*first, "cut cross-entropy not needed: the step fits as it is, logits included")
    chunks = cut_ce.install(job.model, labels.numel(), rewrites)
    job.say("planning the step with cut cross-entropy (the LM head and the loss fused)")
    try:
        fused = _plan_variants(job, result)
    except InfeasibleBudgetError:
        if first is None:
            raise
        cut_ce.uninstall(job.model)
        return (*first, "cut cross-entropy not applied: the fused step did not fit either")
    applied = (f"cut cross-entropy: the LM head and the loss fused ({chunks} piece{'s' if chunks > 1 else ''} of "
               "tokens at a time; no [tokens, vocab] logits); the training step's output.logits are not made "
               "(cut_cross_entropy=False keeps them)")
    if first is None:
        return (*fused, applied + (f"; without it the step does not fit ({failure.message.splitlines()[0]})"
                                   if failure is not None else ""))
    if _step_us(fused[2]) < _step_us(first[2]):
        return (*fused, f"{applied}; chosen as the faster step: {_step_us(fused[2]) / 1e3:,.1f} ms predicted, against "
                        f"{_step_us(first[2]) / 1e3:,.1f} ms with the logits made")
    cut_ce.uninstall(job.model)
    memory, trace, activations, chosen = first
    return memory, trace, activations, chosen, (
        f"cut cross-entropy not applied: the step with the logits made is as fast ({_step_us(first[2]) / 1e3:,.1f} ms "
        f"predicted, fused {_step_us(fused[2]) / 1e3:,.1f} ms)")


def _step_us(activations: ActivationPlan) -> int:
    """A plan's predicted step time: every op's time, plus recomputation and exposed copies."""
    return sum(activations.problem.point_us) + activations.overhead_us


def _plan_variants(job: Job, result: PassResult) -> tuple[MemoryReport | None, JointTrace, ActivationPlan, str]:
    """``plan_step`` for the rewritten model, or, where the pass gives variants (states the model will
    be in, e.g. other active blocks), for each: the costliest is kept — one that must be lowered
    first, then the highest smallest peak — and the model is left in it. An infeasible variant is
    the budget's error. A lowered step of a layerwise-sampled model is then planned for every
    active set at once (``plan_every_set``); where that is not possible or does not fit, the lowered
    step re-plans for the other sets as they come."""
    if not result.variants:
        return (*plan_step(job), "")
    planned = []
    for label, activate in result.variants:
        activate()
        job.say(f"planning {label}")
        planned.append((label, activate, plan_step(job)))
    label, activate, chosen = max(planned, key=lambda v: (v[2][2].lowered, v[2][2].min_peak_bytes, v[2][2].peak_bytes))
    activate()
    others = "; ".join(f"{other}: {format_bytes(p[2].min_peak_bytes)}" for other, _, p in planned if other != label)
    note = (f"planned for {label}, the costliest of the {len(planned)} states planned (smallest peak "
            f"{format_bytes(chosen[2].min_peak_bytes)}; {others})")
    if chosen[2].lowered:
        as_is = max(_as_is_peak(p) for _, _, p in planned) + job.config.reserve_bytes
        free = f"from a budget of {format_bytes(as_is)} the model runs as it is and switches at no cost"
        try:
            every = plan_every_set(job)
        except InfeasibleBudgetError as exc:
            every, why = None, (
                "planning every active set at once does not fit: it needs a budget of "
                f"{format_bytes(exc.min_budget_bytes)} or more, and a set drawn later that needs more than this "
                "budget raises InfeasibleBudgetError at its switch")
        else:
            why = "" if isinstance(every, tuple) else every
        if isinstance(every, tuple):
            return (chosen[0], *every[1:], every_set_note(job.model) + f"; {free}")
        note += (f"; this step is lowered, so each other state re-plans and re-traces when it comes (seconds each, "
                 f"logged), because {why}: {free}")
    return (*chosen, note)


def traced_trainable(model: nn.Module) -> tuple[str, ...]:
    """Names of every parameter a layerwise-sampled model may train (the step planned for every set)."""
    may = {id(p) for p in layerwise.candidates(model) or ()}
    return tuple(n for n, p in model.named_parameters() if id(p) in may)


def every_set_note(model: nn.Module) -> str:
    sampler = layerwise.sampler_of(model)
    assert sampler is not None
    held = ", ".join(sampler.names[i] for i in sampler.worst_case)
    return (f"planned for every active set at once: one lowered step in which every sampled block is traced as "
            f"trainable, and the backward of a call leaves out the gradients of the blocks frozen then (their "
            f"weight-gradient ops); its peak bounds every set of {sampler.active_layers} blocks by the set whose "
            f"gradients are made first ({held}), so a switch re-plans and re-traces nothing")


@contextlib.contextmanager
def _every_block_trainable(model: nn.Module) -> Iterator[tuple[frozenset[str], str]]:
    """Every sampled block's parameters require grad inside (each parameter's flag restored after);
    yields the names of those outside the worst-case active set (their gradients are dropped), and
    why the sets cannot be planned at once ("" if they can)."""
    sampler = layerwise.sampler_of(model)
    if sampler is None:
        yield frozenset(), "the model does not sample blocks"
        return
    sizes = {sum(p.numel() * p.element_size() for p in params) for params in sampler.blocks}
    if len(sizes) > 1:
        yield frozenset(), "its sampled blocks differ in size"
        return
    names = {id(p): n for n, p in model.named_parameters()}
    held = {id(p) for i in sampler.worst_case for p in sampler.blocks[i]}
    flags = [(p, p.requires_grad) for p in sampler.parameters()]
    dropped = frozenset(names[id(p)] for p in sampler.parameters()
                        if id(p) not in held and not any(p is q for q in sampler.always))
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield dropped, ""
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def plan_every_set(job: Job) -> tuple[MemoryReport | None, JointTrace, ActivationPlan] | str:
    """``plan_step`` for every active set of a layerwise-sampled model at once: the step traced with
    every sampled block trainable and the gradients of all but the worst-case set dropped
    (``trace_joint_graph(dropped=...)``). The lowered step runs that program, its backward pruned
    to the blocks active at each call, so switching needs no re-plan or re-trace. The bound holds
    when the worst-case set's gradients are made before any other block's (checked on the trace)
    and blocks are equal in size. Returns why not (a string) when that does not hold."""
    with _every_block_trainable(job.model) as (dropped, why):
        if why:
            return why
        job.say("planning every active set at once (every sampled block traced as trainable)")
        planned = plan_step(dataclasses.replace(job, simulate=False), dropped=dropped)
    sampler = layerwise.sampler_of(job.model)
    assert sampler is not None
    sampled = {id(p) for params in sampler.blocks for p in params}
    params = [(n, p) for n, p in job.model.named_parameters()]
    born = [params[position][0] in dropped for position, _ in planned[1].gradients if id(params[position][1]) in sampled]
    if True in born and False in born[born.index(True):]:
        return "the gradients of the worst-case set are not all made before the other blocks' in this model's backward"
    return planned


def _named_fixed(job: Job, result: PassResult, exc: InfeasibleBudgetError) -> InfeasibleBudgetError | None:
    """``exc`` said first through what the method adds whatever the plan (RandLoRA's bases, RSO's
    projections), where that and the weights alone are above the usable budget; else None."""
    cfg = job.config
    weights = weight_bytes(job.model)
    for label, nbytes in result.fixed:
        if weights + nbytes > cfg.usable_bytes:
            return InfeasibleBudgetError(
                f"{label} take {format_bytes(nbytes)} by themselves; with the model's weights "
                f"({format_bytes(weights)}) that is above the {format_bytes(cfg.usable_bytes)} usable of "
                f"budget_gb={cfg.budget_gb:g} before any activation: raise the budget, or target fewer or smaller "
                f"layers (target_modules= / exclude_modules=). {exc.message}",
                predicted_bytes=exc.predicted_bytes, budget_bytes=exc.budget_bytes, breakdown=exc.breakdown,
                min_budget_bytes=exc.min_budget_bytes)
    return None

def _as_is_peak(planned: tuple[MemoryReport | None, JointTrace, ActivationPlan]) -> int:
    """The model as it is: the simulated eager step's peak, else the trace's with everything kept."""
    memory, _, activations = planned
    if memory is not None:
        return memory.peak_bytes
    return max(activations.keep_all.peak_bytes, activations.problem.static.optimizer_phase_peak)


def plan_step(job: Job, dropped: frozenset[str] = frozenset()) -> tuple[MemoryReport | None, JointTrace, ActivationPlan]:
    """(Simulate,) trace and plan the training step of the already rewritten model (``dropped``:
    trainable parameters whose gradients the step drops, see ``trace_joint_graph``).

    The plan's peak is measured, not modelled: each candidate plan is lowered onto the traced
    joint graph as the runtime lowers it and its liveness swept (``_measure``); the model as it is
    is measured by the simulated eager step."""
    cfg, memory = job.config, None
    optimizer = factory(cfg.optimizer, **cfg.optimizer_options)
    if any(is_handle(p) for p in job.model.parameters()):  # trainable int8 weights: memopt's own update writes them
        optimizer = _with_options(OPTIMIZERS[cfg.optimizer].in_backward(cfg.optimizer_options), cfg.optimizer_options)
    # Quantized GEMMs as the target device runs them (CUDA: fused, no W), under its autocast.
    with simulating(cfg.device.kind), on_target(cfg.device.kind):
        if job.simulate:
            # The eager step the user will run, with every activation kept: exact bytes (ground truth).
            job.say("simulating the eager step")
            memory = simulate_step(job.model, job.inputs, loss_fn=job.loss_fn, optimizer=optimizer,
                                   device=cfg.device.kind, round_to=cfg.device.alloc_granularity)
        # The same step as one joint graph: what backward needs, when, and what recomputing it costs.
        job.say("tracing the joint forward + backward step")
        trace, joint = trace_joint_graph(job.model, job.inputs, loss_fn=job.loss_fn, optimizer=optimizer,
                                         device=cfg.device.kind, granularity=cfg.device.alloc_granularity,
                                         dropped=dropped)
    # Bookkeeping after the optimizer step (RSO's fold of B·P into W): its transient on top of the step's.
    fold, _ = after_step_bytes(job.model)
    trace = dataclasses.replace(trace, optimizer_step_bytes=trace.optimizer_step_bytes + fold)
    problem = _problem(job, trace)
    if memory is not None:  # the optimizer step runs as it is: its simulated peak
        peak = memory.phase_peaks.get("optimizer")
        problem = with_optimizer_peak(problem, None if peak is None else peak + fold)
    try:
        # Keep / recompute / offload each saved activation: the fastest plan inside the budget.
        return memory, trace, _solve(job, problem, joint, trace, None if memory is None else _step_peak(memory))
    except InfeasibleBudgetError as exc:
        per_parameter = OPTIMIZERS[cfg.optimizer].in_backward(cfg.optimizer_options)
        if per_parameter is None or not (job.planner.enabled and job.planner.allow_update_in_backward):
            raise  # (a disabled planner runs the step as it is: no decision of any kind)
        # Gradients held to an optimizer step after the backward do not fit: update each parameter
        # inside the backward as soon as its gradient is made, one update's transient at a time.
        job.say(f"{str(exc).splitlines()[0]}; planning updates inside backward")
        trainable = [p for n, p in job.model.named_parameters() if p.requires_grad and n not in dropped]
        # Its states are the per-parameter optimizer's (no step counter tensors for AdamW, e.g.).
        state, step = optimizer_bytes(trainable, _with_options(per_parameter, cfg.optimizer_options),
                                      cfg.device.kind, cfg.device.alloc_granularity)
        trace = dataclasses.replace(trace, optimizer_state_bytes=state, optimizer_step_bytes=max(step, fold))
        joint = dataclasses.replace(joint, state_bytes=state, step_bytes=step)  # its partitions: measured alike
        problem = _problem(job, trace, update_in_backward=True)
        # The model as it is updates in hooks, after each autograd node: its peak bounded as such.
        return memory, trace, _solve(job, problem, joint, trace, step_peak(trace, True, eager=True)[0])


def _problem(job: Job, trace: JointTrace, update_in_backward: bool = False) -> PlanningProblem:
    return build_problem(trace, job.config.device, allow_recompute=job.planner.allow_recompute,
                         allow_offload=job.planner.allow_offload, allow_rng_recompute=job.planner.allow_rng_recompute,
                         update_in_backward=update_in_backward, host_capacity=job.config.host_budget_bytes)


def _solve(job: Job, problem: PlanningProblem, joint: JointGraph, trace: JointTrace,
           as_is_bytes: int | None) -> ActivationPlan:
    cfg = job.config
    job.say(f"planning {len(problem.candidates)} saved tensors ({problem.num_classes} decision classes) "
            f"for {cfg.usable_bytes / GIB:.2f} GiB usable (traced in {trace.trace_seconds:.1f} s)"
            + (", updates inside backward" if problem.update_in_backward else ""))
    def solve(problem: PlanningProblem) -> ActivationPlan:
        return plan_activations(problem, cfg.usable_bytes, job.planner, reserve_bytes=cfg.reserve_bytes,
                                what=f"{cfg.method} on {type(job.model).__name__}"
                                + (" with updates inside backward" if problem.update_in_backward else ""),
                                progress=job.progress, as_is_bytes=as_is_bytes, measure=_measure(joint),
                                lower=job.lower)

    try:
        return solve(problem)
    except InfeasibleBudgetError as exc:
        exc.over_budget_modules = frozenset(trace.enclosing_module(p) for p in exc.over_points)
        if problem.host_capacity is None or not job.planner.allow_offload:
            raise
        try:  # would more host memory make it fit? Then say how much.
            unlimited = solve(dataclasses.replace(problem, host_capacity=None))
        except InfeasibleBudgetError:
            raise exc from None
        need = offloaded_bytes(problem, unlimited.choices)
        error = InfeasibleBudgetError(
            f"{exc.message}; it fits with {format_bytes(need)} of host memory for offloaded activations (what a plan "
            f"with no host limit offloads; less may do), above the host budget of {format_bytes(problem.host_capacity)}: "
            "raise host_budget_gb= (memopt plan --host-budget)",
            predicted_bytes=exc.predicted_bytes, budget_bytes=exc.budget_bytes, breakdown=exc.breakdown,
            min_budget_bytes=exc.min_budget_bytes)
        error.over_budget_modules = exc.over_budget_modules
        raise error from None


def _with_options(factory: OptimizerFactory, options: Mapping[str, Any]) -> OptimizerFactory:
    def make(params: list, device: str, kwargs: Mapping[str, Any]) -> Any:
        return factory(params, device, {**options, **kwargs})

    return make


def _measure(joint: JointGraph) -> Measure:
    """The exact forward + backward peak of an assignment's lowered step: the traced joint graph
    partitioned by it as the runtime partitions it (recomputation placed by torch's partitioner,
    RNG state saved for replayed random ops, offload copies), its liveness swept."""
    cache: dict[tuple[bool, tuple[Choice, ...]], int] = {}

    def measure(problem: PlanningProblem, choices: tuple[Choice, ...]) -> int:
        key = (problem.wait_at_ready, choices)
        if key not in cache:
            partition = plan_partition(decisions_for(problem, choices), offload_mode="simulated", check_layout=True,
                                       allow_constants=True)
            cache[key] = step_peak(joint.partitioned(partition), problem.update_in_backward)[0]
        return cache[key]

    return measure


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and of the quantized weights' buffers: a lower bound of any step's peak."""
    quantized = (b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *quantized))


def _step_peak(memory: MemoryReport) -> int:
    """The simulated eager step's peak over forward and backward (what the activations decide)."""
    return max(memory.phase_peaks.get(phase, 0) for phase in ("forward", "backward"))


def _record(job: Job, captured: Captured, result: PassResult, memory: MemoryReport | None, trace: JointTrace,
            activations: ActivationPlan) -> Plan:
    model, cfg, graph = job.model, job.config, captured.graph
    params = list(model.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    notes = [*captured.notes, *graph.captured.notes, *graph.notes, *result.notes,
             *plan_notes(cfg.optimizer, cfg.optimizer_options, trainable)]
    if job.planner.allow_offload:
        notes.append(f"host budget {format_bytes(cfg.host_budget_bytes)} for offloaded activations ("
                     + ("host_budget_gb" if cfg.host_budget_gb is not None else "the RAM of the machine this plan was "
                        "made on; host_budget_gb= / --host-budget sets it") + ")")
    if cfg.device.kind == "cuda":
        notes.append(f"device reserve {cfg.reserve_bytes / GIB:.3f} GiB for the CUDA context and allocator slack; "
                     f"every block rounded up to {cfg.device.alloc_granularity} bytes")
    notes.append("offload timing: the exposed copy time is the lowered step's at the roofline (one transfer stream; "
                 "each copy out waited for once it has had its transfer time, or after its last forward use; each copy "
                 "back issued where the previous one is waited for); the planner's model, which it minimises, "
                 "overlaps the copies back from the backward's start: "
                 f"{format_us(activations.evaluation.exposed_transfer_us)}")
    fold, what = after_step_bytes(model)
    if fold:
        notes.append(f"{what} holds {format_bytes(fold)}, counted on top of the optimizer step's peak")
    if memory is None:
        notes.append("the model as it is was not simulated (planned from the joint trace alone)")
    if activations.problem.update_in_backward:
        accumulates = cfg.optimizer_options.get("accumulate")
        notes.append(f"updates inside backward: each parameter's gradient goes to {cfg.optimizer} as soon as it is "
                     f"made, and is freed — {format_bytes(trace.bytes_of('gradient'))} of gradients never coexist; "
                     "build the optimizer with model.make_optimizer(...) (it installs the updates), "
                     + ("each backward adds its projected gradients, optimizer.step() updates (gradient accumulation "
                        "works); " if accumulates else
                        "one optimizer step per backward (no gradient accumulation: optimizer_options={'accumulate': "
                        "True} with galore-adamw(8bit) allows it); ")
                     + "clip per parameter with make_optimizer(max_grad_norm=...): clip_grad_norm_ after backward "
                     "finds no gradient")
    step = step_plan(activations, trace_seconds=trace.trace_seconds, op_flops=[op.flops for op in trace.ops])
    return Plan.build(
        step,
        model=type(model).__name__,
        method=cfg.method,
        method_config=dataclasses.asdict(cfg.method_config),
        optimizer=cfg.optimizer,
        optimizer_options=dict(cfg.optimizer_options),
        device=cfg.device,
        budget_bytes=cfg.budget_bytes,
        reserve_bytes=cfg.reserve_bytes,
        input_shapes=input_shapes(job.bound),
        input_dtypes=input_dtypes(job.bound),
        training=model.training,
        autocast=planned_autocast(cfg.device.kind, next((p.device.type for p in model.parameters()), "cpu")),
        capture=graph.captured.method,
        modules=result.decisions,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        memory=memory,
        notes=tuple(notes),
        fingerprint=structural_fingerprint(model),
        host_budget_bytes=cfg.host_budget_bytes if job.planner.allow_offload else None,
        traced_trainable=traced_trainable(model) if trace.dropped else None,
        sequence_chunks=seq_chunk.installed(model),
        cut_cross_entropy=cut_ce.pieces(model),
        unpadded_mask=bool(hf_masks.unpadded(model, *job.inputs)),
    )
