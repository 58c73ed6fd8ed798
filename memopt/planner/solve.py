"""Plan the saved activations of one step inside a byte budget: the planner's entry point.

Design note. ``plan_activations`` is pure (a PlanningProblem, integers and an optional measure
in, an ActivationPlan out) and runs the two phases of REFERENCES.md's CP-SAT notes:

1. the smallest peak any plan reaches (CP-SAT, warm-started with the lowest of the greedy plan and
   whole-block recomputation with or without its checkpoints offloaded, which is returned where
   CP-SAT finds nothing lower in its *deterministic* time limit; one decision for all identical blocks:
   the same problem gives the same plan and the same smallest feasible budget every call; where its
   lowered step does not fit, again from a second start where that differs, the lower kept) — with
   the optimizer step's own peak, the smallest feasible budget. Below it:
   ``InfeasibleBudgetError`` naming it, the solver's status and what dominates it;
2. if the model as it is fits (``as_is_bytes``: its simulated eager step), that is the plan
   (nothing is faster) and nothing is lowered; otherwise the fastest plan at the budget (CP-SAT,
   warm-started with the fastest of the greedy plan, phase 1's and phase 1's relaxed towards
   keeping what the budget has room for, one decision per run of identical blocks), carried out
   by the lowered step.

**The budget promise.** The CP-SAT model prices each decision from the trace; the lowered step
places recomputations where torch's partitioner puts them and saves RNG state for replayed
random ops. ``measure(problem, choices)`` — where given — returns the exact peak of the lowered step
for an assignment (``memopt.api`` partitions the traced joint graph by it and sweeps its liveness).
Offloaded copies are waited for where the model counts them freed (``wait_at_ready``); where
phase 1's plan fits only with each copy waited for right after its last forward use (stalls, less
memory), the plan is made so, and the smallest feasible budget is the smaller of the two.
Every plan is measured before it is returned: one over the budget is solved again at a capacity
lowered by its excess, up to ``_ROUNDS`` times, then phase 1's plan is taken. The smallest
feasible budget is phase 1's measured peak. So a returned plan's peak is what its lowered step
allocates, and never above the budget.

``PlannerConfig(enabled=False)`` is the kill switch: keep everything, only check that it fits.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from memopt.errors import InfeasibleBudgetError
from memopt.planner.cpsat import SolveResult, SolverOptions, min_peak_start, solve_min_peak, solve_min_time
from memopt.planner.problem import (
    Candidate,
    Choice,
    Evaluation,
    PlanningProblem,
    evaluate,
    keep_all,
    lowered_exposure,
    merged,
    without_idle_sources,
)

if TYPE_CHECKING:
    from memopt.plan import MemoryTimeline, StepPlan, TensorDecision

__all__ = ["PlannerConfig", "ActivationPlan", "Measure", "plan_activations", "plan_fields", "step_plan", "recompute_flops",
           "decisions_for", "tensor_decisions", "timeline"]

log = logging.getLogger("memopt")
_GIB = 2**30


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner may do. ``time_limit_s`` is per CP-SAT phase (None: by the problem's
    size, 0.1 s per saved tensor from 10 to 60 s, ``cpsat.time_limit_for``); ``workers=1`` is
    deterministic (the same plan every run); more workers share CP-SAT's interleaved search
    (sooner) and may plan differently.
    ``allow_update_in_backward``: when the step does not fit with its gradients held for an
    optimizer step after the backward, update each parameter inside the backward instead (one
    optimizer step per backward: no gradient accumulation)."""

    enabled: bool = True
    allow_recompute: bool = True
    allow_offload: bool = True
    allow_rng_recompute: bool = False
    allow_update_in_backward: bool = True
    time_limit_s: float | None = 10.0
    workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("enabled", "allow_recompute", "allow_offload", "allow_rng_recompute", "allow_update_in_backward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PlannerConfig.{name} must be True or False, got {getattr(self, name)!r}")
        SolverOptions(self.time_limit_s, self.workers, self.seed)  # validates the solver fields

    @property
    def solver(self) -> SolverOptions:
        return SolverOptions(self.time_limit_s, self.workers, self.seed)


_ROUNDS = 4  # solves at a tightened capacity before phase 1's plan is taken

# The exact forward + backward peak of an assignment of the problem, lowered
Measure = Callable[[PlanningProblem, tuple[Choice, ...]], int]


@dataclass(frozen=True)
class ActivationPlan:
    """The chosen assignment with its exact evaluation, and how it was found.

    ``lowered``: the returned model must run the step lowered by these decisions (the model as it
    is would not fit); ``step_bytes``: the forward + backward peak of the step that runs —
    measured on the lowered step, or the model as it is (``as_is_bytes``)."""

    problem: PlanningProblem
    choices: tuple[Choice, ...]
    evaluation: Evaluation
    keep_all: Evaluation
    min_peak_bytes: int  # the smallest forward + backward peak found (phase 1's, measured)
    min_peak_status: str
    status: str
    seconds: float
    quantum: int
    lowered: bool = True
    step_bytes: int | None = None
    rounds: int = 1  # solves until the measured peak fitted
    min_peak_bound: int | None = None  # the solver's proven lower bound on the modelled minimum peak

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of the whole step: forward + backward, or the optimizer step."""
        step = self.evaluation.peak_bytes if self.step_bytes is None else self.step_bytes
        return max(step, self.problem.static.optimizer_phase_peak)

    @property
    def min_feasible_bytes(self) -> int:
        return max(self.min_peak_bytes, self.problem.static.optimizer_phase_peak)

    @functools.cached_property
    def exposed_transfer_us(self) -> int:
        """The copy time the lowered step exposes (``lowered_exposure``; the evaluation's is the
        planner's lower bound)."""
        return lowered_exposure(self.problem, self.choices)

    @property
    def overhead_us(self) -> int:
        """The predicted time the plan adds to a step: recomputation and the lowered step's exposed copies."""
        return self.evaluation.recompute_us + self.exposed_transfer_us


def plan_activations(problem: PlanningProblem, usable_bytes: int, config: PlannerConfig = PlannerConfig(), *,
                     reserve_bytes: int = 0, what: str = "the training step",
                     progress: Callable[[str], None] | None = None, as_is_bytes: int | None = None,
                     measure: Measure | None = None, lower: bool = False) -> ActivationPlan:
    """Requires: ``usable_bytes`` = budget - reserve (what tracked tensors may occupy);
    ``as_is_bytes``: the forward + backward peak of the model as it is (default: the trace's
    keep-everything); ``measure``: see the module docstring; ``lower``: the step is lowered
    whatever the plan (``compile=True``).
    Ensures: the returned plan's ``peak_bytes <= usable_bytes`` (measured, where ``measure`` is
    given), or InfeasibleBudgetError."""
    start = time.perf_counter()
    keep = evaluate(problem, keep_all(problem))
    measure = measure or (lambda problem, choices: evaluate(problem, choices).peak_bytes)
    as_is = keep.peak_bytes if as_is_bytes is None else as_is_bytes
    optimizer_peak = problem.static.optimizer_phase_peak
    if not config.enabled:
        return _keep_everything(problem, keep, as_is, usable_bytes, reserve_bytes, what, start, lower, measure)
    phase1 = _min_peak(problem, config, progress)
    given, (problem, minimum, least) = problem, _measured(problem, phase1, usable_bytes, measure)
    as_is_fits = not lower and max(as_is, optimizer_peak) <= usable_bytes
    if minimum > usable_bytes and optimizer_peak <= usable_bytes and not as_is_fits:
        # CP-SAT ends where its warm start leads it, and its model is not the lowered step: the
        # residual stream's checkpoints offloaded in forward order lead elsewhere (LLaMA-2-7B at
        # 98,304 tokens, 64 GiB host: a lowered 22.97 GiB, against 25.98 GiB from the lowest-peak
        # order). The fit comes first: where the first plan does not fit, the second start is tried
        # and the lower measured peak kept.
        second = _min_peak(given, config, progress, "forward", unlike=phase1.start,
                           why=f"the minimum-peak plan's lowered step needs {minimum / _GIB:.3f} GiB")
        if second is not None:
            lowered, peak, low = _measured(given, second, usable_bytes, measure)
            least = min(least, low)
            if peak < minimum:
                phase1, problem, minimum = second, lowered, peak
    smallest = least if lower else min(least, as_is)  # the model as it is may be the smallest
    if as_is_fits:  # the model as it is fits: nothing to lower
        return ActivationPlan(problem, keep_all(problem), keep, keep, smallest, phase1.status, "OPTIMAL",
                              time.perf_counter() - start, phase1.quantum, lowered=False, step_bytes=as_is,
                              min_peak_bound=phase1.bound)
    if max(minimum, optimizer_peak) > usable_bytes:  # (as_is does not fit either: checked above)
        raise _infeasible(problem, evaluate(problem, phase1.choices), smallest, usable_bytes, reserve_bytes, what,
                          phase1.status + ("" if phase1.bound is None else f", proven bound {phase1.bound:,} bytes"))
    choices, status, quantum, peak, rounds = _fitting(problem, usable_bytes, config, progress, phase1, minimum,
                                                      measure)
    choices = without_idle_sources(problem, choices, each=True)  # (the lowering saves none of them: same peak)
    fallback = without_idle_sources(problem, phase1.choices, each=True)
    if _lowered_us(problem, fallback) < _lowered_us(problem, choices):
        # The planner's model bounds the copies' time from below: in the lowered step's own schedule
        # the minimum-peak plan (which fits: measured above) is the faster one.
        choices, status, quantum, peak = fallback, f"{phase1.status}: the minimum-peak plan, faster lowered", \
            phase1.quantum, minimum
    result = evaluate(problem, choices)
    assert result.valid and peak <= usable_bytes, result.problems
    plan = ActivationPlan(problem, choices, result, keep, smallest, phase1.status, status,
                          time.perf_counter() - start, quantum, lowered=True, step_bytes=peak, rounds=rounds,
                          min_peak_bound=phase1.bound)
    log.debug("memopt: activation plan: memory reduced from %.3f GiB -> %.3f GiB (+%d us per step, %s)",
              as_is / _GIB, peak / _GIB, result.overhead_us, status)
    return plan


def _lowered_us(problem: PlanningProblem, choices: Sequence[Choice]) -> int:
    """The time ``choices`` add to the lowered step: recomputation and the copies it exposes."""
    return evaluate(problem, choices).recompute_us + lowered_exposure(problem, choices)


def _fitting(problem: PlanningProblem, usable: int, config: PlannerConfig, progress: Callable[[str], None] | None,
             phase1: SolveResult, minimum: int,
             measure: Measure) -> tuple[tuple[Choice, ...], str, int, int, int]:
    """The fastest assignment whose *measured* peak fits ``usable`` (see the module docstring):
    (choices, status, quantum, measured peak, solves)."""
    capacity = usable
    floor = evaluate(problem, phase1.choices).peak_bytes
    for round_ in range(1, _ROUNDS + 1):
        if evaluate(problem, keep_all(problem)).peak_bytes <= capacity:
            choices, status, quantum = keep_all(problem), "OPTIMAL", phase1.quantum
        else:
            choices, status, quantum = _min_time(problem, capacity, config, progress, phase1)
        peak = measure(problem, choices)
        if peak <= usable:
            return choices, status, quantum, peak, round_
        # The lowered step needs this much more than the model priced: ask for a plan the model
        # prices that much lower than this one (which excludes this one).
        capacity = min(capacity, evaluate(problem, choices).peak_bytes) - (peak - usable)
        if capacity < floor:
            break
    return phase1.choices, f"{phase1.status}: the minimum-peak plan", phase1.quantum, minimum, _ROUNDS


def _min_peak(problem: PlanningProblem, config: PlannerConfig, progress: Callable[[str], None] | None,
              sources: str = "lowest peak", unlike: Sequence[Choice] | None = None, why: str = "") -> SolveResult | None:
    """Phase 1 from the warm start of ``sources`` order (``cpsat.min_peak_start``); None where that
    start is ``unlike`` (a start already solved from: CP-SAT, one worker, ends where it did)."""
    # One decision for every run of identical blocks: the smaller model reaches a low peak in the
    # time given; its assignment is one of ``problem``'s, and the hint of the minimum-time phase,
    # which decides each run on its own.
    one = merged(problem)
    start = min_peak_start(one, sources)
    if unlike is not None:
        if start[0] == tuple(unlike):
            return None
        if progress is not None:
            progress(f"{why}; trying a second warm start (the residual stream's checkpoints offloaded in {sources} "
                     "order)")
    result = solve_min_peak(one, config.solver, progress, start)
    return replace(result, choices=without_idle_sources(problem, result.choices))


def _measured(problem: PlanningProblem, phase1: SolveResult, usable: int,
              measure: Measure) -> tuple[PlanningProblem, int, int]:
    """(``problem`` as the plan waits for its copies out, phase 1's measured peak so, the lower of
    the two ways). Each copy out waited for right after its tensor's last forward use instead of
    where it has had its transfer time: stalls, but less memory. The fit comes first: the plan is
    made so where only so does it fit."""
    minimum = least = measure(problem, phase1.choices)
    if any(choice.action == "offload" and c.ready_key for c, choice in zip(problem.candidates, phase1.choices)):
        lean = replace(problem, wait_at_ready=False)
        least = min(minimum, measure(lean, phase1.choices))
        if minimum > usable and least < minimum:
            problem, minimum = lean, least
    return problem, minimum, least


def _min_time(problem: PlanningProblem, usable: int, config: PlannerConfig,
              progress: Callable[[str], None] | None, phase1: SolveResult) -> tuple[tuple[Choice, ...], str, int]:
    result = solve_min_time(problem, usable, config.solver, progress, hint=phase1.choices)
    if result.choices is not None:
        return without_idle_sources(problem, result.choices), result.status, result.quantum
    return phase1.choices, f"{result.status}: the minimum-peak plan", phase1.quantum


def _keep_everything(problem: PlanningProblem, keep: Evaluation, as_is: int, usable: int, reserve: int, what: str,
                     start: float, lower: bool, measure: Measure) -> ActivationPlan:
    step = measure(problem, keep_all(problem)) if lower else as_is
    if max(step, problem.static.optimizer_phase_peak) > usable:
        raise _infeasible(problem, keep, step, usable, reserve, what + " (planner switched off: everything kept)",
                          "DISABLED")
    return ActivationPlan(problem, keep_all(problem), keep, keep, step, "DISABLED", "DISABLED",
                          time.perf_counter() - start, 1, lowered=lower, step_bytes=step)


def _infeasible(problem: PlanningProblem, best: Evaluation, step_bytes: int, usable: int, reserve: int,
                what: str, status: str) -> InfeasibleBudgetError:
    """``step_bytes``: the smallest forward + backward peak found (measured); ``best``: its plan's
    evaluation, for the breakdown at the peak."""
    static = problem.static
    if static.optimizer_phase_peak > step_bytes:
        needed = static.optimizer_phase_peak
        breakdown = {"parameters": static.parameters, "buffers": static.buffers, "inputs": static.inputs,
                     "optimizer": static.optimizer, "gradients": static.gradients,
                     "temporaries": static.optimizer_step}
        where = "the optimizer step"
    else:
        needed, breakdown = step_bytes, best.breakdown(problem)
        breakdown["temporaries"] += needed - sum(breakdown.values())  # what the lowered step adds, measured
        where = "backward" if best.peak_point >= problem.num_forward else "forward"
    error = InfeasibleBudgetError(
        f"{what} does not fit: even with every saved activation recomputed or offloaded where allowed, "
        f"the peak (in {where}) is {needed / _GIB:.3f} GiB (solver: {status}"
        + ("" if status.startswith("OPTIMAL") or where == "the optimizer step" else
           "; the smallest found, not proven: a longer --time-limit / PlannerConfig(time_limit_s=...) may find less")
        + ")",
        predicted_bytes=needed, budget_bytes=usable, min_budget_bytes=needed + reserve, breakdown=breakdown,
    )
    if where != "the optimizer step":  # (no op of the forward or backward is what does not fit)
        error.over_points = tuple(p for p, nbytes in enumerate(best.memory) if nbytes > usable)
    return error


# ----------------------------------------------------------------------------- plan records


def tensor_decisions(plan: ActivationPlan) -> tuple["TensorDecision", ...]:
    """One TensorDecision per saved tensor, with the reason for its action."""
    fits = not plan.lowered or plan.keep_all.peak_bytes <= plan.evaluation.peak_bytes
    return decisions_for(plan.problem, plan.choices,
                         lambda c: _reason(plan.problem, c, plan.choices, fits))


def decisions_for(problem: PlanningProblem, choices: Sequence[Choice],
                  reason: "Callable[[Candidate], str]" = lambda c: "") -> tuple["TensorDecision", ...]:
    """The TensorDecisions of an assignment (what a lowering reads)."""
    from memopt.plan import TensorDecision

    out = []
    for c, choice in zip(problem.candidates, choices):
        action = "save" if c.extra and choice.action == "keep" else choice.action
        out.append(TensorDecision(
            name=c.name, module=c.module, block=c.block, op=c.target, shape=c.shape, dtype=c.dtype,
            nbytes=c.nbytes, action=action, point=choice.point, recompute_us=c.recompute_us,
            recompute_flops=c.recompute_flops, transfer_us=c.transfer_us, klass=c.klass,
            reason=reason(c), key=c.key, closure=c.closure_keys if action == "recompute" else None,
            ready=c.ready_key if action == "offload" and problem.wait_at_ready else None,
        ))
    return tuple(out)


def _reason(problem: PlanningProblem, c: "Candidate", choices: tuple[Choice, ...], fits: bool) -> str:
    choice = choices[c.index]
    if c.extra:
        recomputed = [problem.candidates[t].name for t in problem.dependents[c.index] if choices[t].action == "recompute"]
        if choice.action == "keep":
            return f"saved (the backward does not read it) so that {', '.join(recomputed)} can be recomputed from it"
        if choice.action == "offload":
            return (f"saved on the host (the backward does not read it; {c.transfer_us} us each way, back by backward "
                    f"point {choice.point}) so that {', '.join(recomputed)} can be recomputed from it")
        if choice.action == "recompute":
            return (f"recomputed before backward point {choice.point} (the backward does not read it) so that "
                    f"{', '.join(recomputed)} can be recomputed from it")
        return "not saved: the backward does not read it and no recomputation starts from it"
    if choice.action == "recompute":
        if c.made_with is not None:
            return (f"recomputed before backward point {choice.point} with {problem.candidates[c.made_with].name}, "
                    "by the same op (its time counted there)")
        inputs = ", ".join(problem.candidates[d].name for d in c.deps) or "parameters and inputs"
        return (f"recomputed before backward point {choice.point}: {len(c.closure)} forward ops from {inputs} "
                f"({c.recompute_flops:,} FLOPs, {c.recompute_us} us)")
    if choice.action == "offload":
        early = "" if choice.point == c.first_backward else (
            f", before its first backward use ({c.first_backward}): a recomputation reads it there")
        return (f"offloaded to host: {c.transfer_us} us each way, copied out when made and back by "
                f"backward point {choice.point}{early}")
    if fits:
        return "kept: keeping every saved tensor fits the budget"
    blocked = "; ".join(f"no {a}: {why}" for a, why in sorted(c.reasons.items()))
    return "kept: freeing it costs more time than the budget needs" + (f" ({blocked})" if blocked else "")


def timeline(plan: ActivationPlan, buckets: int = 512) -> "MemoryTimeline":
    """The device bytes over the step, as bucket maxima (the peak is always a bucket's value)."""
    from memopt.plan import MemoryTimeline

    problem = plan.problem
    n = problem.num_points
    width = max(1, -(-n // buckets))
    starts = tuple(range(0, n, width))
    peak = lambda memory: tuple(max(memory[s:s + width]) for s in starts)  # noqa: E731
    return MemoryTimeline(n, problem.num_forward, starts, peak(plan.evaluation.memory), peak(plan.keep_all.memory))


def recompute_flops(plan: ActivationPlan, op_flops: "Sequence[int]") -> int:
    """FLOPs recomputation adds to one step: the union of the recomputed tensors' closures (an op
    two closures share runs once: the runtime recomputes it once), ``op_flops`` per program point."""
    ops = {i for c, choice in zip(plan.problem.candidates, plan.choices) if choice.action == "recompute"
           for i in c.closure}
    return sum(op_flops[i] for i in ops)


def step_plan(plan: ActivationPlan, *, trace_seconds: float = 0.0, op_flops: "Sequence[int] | None" = None) -> "StepPlan":
    """The planner's part of a ``Plan``: its decisions and predictions for the step."""
    from memopt.plan import SolverReport, StepPlan

    problem = plan.problem
    return StepPlan(
        predicted_peak_bytes=plan.peak_bytes,
        static=problem.static,
        tensors=tensor_decisions(plan),
        timeline=timeline(plan),
        compute_us=sum(problem.point_us),
        recompute_us=plan.evaluation.recompute_us,
        exposed_transfer_us=plan.exposed_transfer_us,  # the step that runs, not the model's bound
        solver=SolverReport(
            status=plan.status, min_peak_status=plan.min_peak_status, min_feasible_bytes=plan.min_feasible_bytes,
            trace_ms=round(trace_seconds * 1000), solve_ms=round(plan.seconds * 1000),
            candidates=len(problem.candidates), classes=problem.num_classes, quantum=plan.quantum,
            rounds=plan.rounds, min_peak_bound=plan.min_peak_bound,
        ),
        lowered=plan.lowered,
        update_in_backward=problem.update_in_backward,
        recompute_flops=None if op_flops is None else recompute_flops(plan, op_flops),
    )


def plan_fields(plan: ActivationPlan, **kwargs: Any) -> dict:
    """``step_plan(plan, ...)`` as ``Plan`` field values by name."""
    return step_plan(plan, **kwargs).fields()
