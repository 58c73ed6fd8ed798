"""Plan the saved activations of one step inside a byte budget: the planner's entry point.

Design note. ``plan_activations`` is pure (a PlanningProblem and integers in, an ActivationPlan
out) and runs the two phases of REFERENCES.md's CP-SAT notes:

1. the smallest peak any plan reaches (CP-SAT, greedy warm start) — with the optimizer step's
   own peak, the smallest feasible budget. Below it: ``InfeasibleBudgetError`` naming it and what
   dominates it;
2. if keeping everything fits, that is the plan (nothing is faster); otherwise the fastest plan at
   the budget (CP-SAT, warm-started with the better of the greedy plan and phase 1's).

``PlannerConfig(enabled=False)`` is the kill switch: keep everything, only check that it fits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from memopt.errors import InfeasibleBudgetError
from memopt.planner.cpsat import SolveResult, SolverOptions, solve_min_peak, solve_min_time
from memopt.planner.greedy import greedy_plan
from memopt.planner.problem import Candidate, Choice, Evaluation, PlanningProblem, evaluate, keep_all

if TYPE_CHECKING:
    from memopt.planner.plan import MemoryTimeline, TensorDecision

__all__ = ["PlannerConfig", "ActivationPlan", "plan_activations", "plan_fields", "recompute_flops", "tensor_decisions", "timeline"]

log = logging.getLogger("memopt")
_GIB = 2**30


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner may do. ``time_limit_s`` is per CP-SAT phase; ``workers=1`` is
    deterministic (the same plan every run); more workers race a portfolio and may vary."""

    enabled: bool = True
    allow_recompute: bool = True
    allow_offload: bool = True
    allow_rng_recompute: bool = False
    time_limit_s: float = 10.0
    workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("enabled", "allow_recompute", "allow_offload", "allow_rng_recompute"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PlannerConfig.{name} must be True or False, got {getattr(self, name)!r}")
        SolverOptions(self.time_limit_s, self.workers, self.seed)  # validates the solver fields

    @property
    def solver(self) -> SolverOptions:
        return SolverOptions(self.time_limit_s, self.workers, self.seed)


@dataclass(frozen=True)
class ActivationPlan:
    """The chosen assignment with its exact evaluation, and how it was found."""

    problem: PlanningProblem
    choices: tuple[Choice, ...]
    evaluation: Evaluation
    keep_all: Evaluation
    min_peak_bytes: int  # the smallest peak of the forward + backward any plan reaches
    min_peak_status: str
    status: str
    seconds: float
    quantum: int

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of the whole step: forward + backward, or the optimizer step."""
        return max(self.evaluation.peak_bytes, self.problem.static.optimizer_phase_peak)

    @property
    def min_feasible_bytes(self) -> int:
        return max(self.min_peak_bytes, self.problem.static.optimizer_phase_peak)


def plan_activations(problem: PlanningProblem, usable_bytes: int, config: PlannerConfig = PlannerConfig(), *,
                     reserve_bytes: int = 0, what: str = "the training step",
                     progress: Callable[[str], None] | None = None) -> ActivationPlan:
    """Requires: ``usable_bytes`` = budget - reserve (what tracked tensors may occupy).
    Ensures: the returned plan's ``peak_bytes <= usable_bytes``, or InfeasibleBudgetError."""
    start = time.perf_counter()
    keep = evaluate(problem, keep_all(problem))
    if not config.enabled:
        return _keep_everything(problem, keep, usable_bytes, reserve_bytes, what, start)
    phase1 = _min_peak(problem, config, progress)
    minimum = evaluate(problem, phase1.choices)
    if max(minimum.peak_bytes, problem.static.optimizer_phase_peak) > usable_bytes:
        raise _infeasible(problem, minimum, usable_bytes, reserve_bytes, what)
    if keep.peak_bytes <= usable_bytes:
        choices, status, quantum = keep_all(problem), "OPTIMAL", phase1.quantum
    else:
        choices, status, quantum = _min_time(problem, usable_bytes, config, progress, phase1)
    result = evaluate(problem, choices)
    assert result.valid and result.peak_bytes <= usable_bytes, result.problems
    plan = ActivationPlan(problem, choices, result, keep, minimum.peak_bytes, phase1.status, status,
                          time.perf_counter() - start, quantum)
    log.debug("memopt: activation plan: memory reduced from %.3f GiB -> %.3f GiB (+%d us per step, %s)",
              keep.peak_bytes / _GIB, result.peak_bytes / _GIB, result.overhead_us, status)
    return plan


def _min_peak(problem: PlanningProblem, config: PlannerConfig, progress: Callable[[str], None] | None) -> SolveResult:
    result = solve_min_peak(problem, config.solver, progress)
    if result.choices is not None:
        return result
    greedy = greedy_plan(problem, 0)  # the solver found nothing in time: the greedy plan is an upper bound
    return SolveResult("GREEDY", greedy, evaluate(problem, greedy).peak_bytes, None, result.seconds, result.quantum)


def _min_time(problem: PlanningProblem, usable: int, config: PlannerConfig,
              progress: Callable[[str], None] | None, phase1: SolveResult) -> tuple[tuple[Choice, ...], str, int]:
    result = solve_min_time(problem, usable, config.solver, progress, hint=phase1.choices)
    if result.choices is not None:
        return result.choices, result.status, result.quantum
    return phase1.choices, f"{result.status}: the minimum-peak plan", phase1.quantum


def _keep_everything(problem: PlanningProblem, keep: Evaluation, usable: int, reserve: int, what: str,
                     start: float) -> ActivationPlan:
    if max(keep.peak_bytes, problem.static.optimizer_phase_peak) > usable:
        raise _infeasible(problem, keep, usable, reserve, what + " (planner switched off: everything kept)")
    return ActivationPlan(problem, keep_all(problem), keep, keep, keep.peak_bytes, "DISABLED", "DISABLED",
                          time.perf_counter() - start, 1)


def _infeasible(problem: PlanningProblem, best: Evaluation, usable: int, reserve: int,
                what: str) -> InfeasibleBudgetError:
    static = problem.static
    if static.optimizer_phase_peak > best.peak_bytes:
        needed = static.optimizer_phase_peak
        breakdown = {"parameters": static.parameters, "buffers": static.buffers, "inputs": static.inputs,
                     "optimizer": static.optimizer, "gradients": static.gradients,
                     "temporaries": static.optimizer_step}
        where = "the optimizer step"
    else:
        needed, breakdown = best.peak_bytes, best.breakdown(problem)
        where = "backward" if best.peak_point >= problem.num_forward else "forward"
    return InfeasibleBudgetError(
        f"{what} does not fit: even with every saved activation recomputed or offloaded where allowed, "
        f"the peak (in {where}) is {needed / _GIB:.3f} GiB",
        predicted_bytes=needed, budget_bytes=usable, min_budget_gb=(needed + reserve) / _GIB, breakdown=breakdown,
    )


# ----------------------------------------------------------------------------- plan records


def tensor_decisions(plan: ActivationPlan) -> tuple["TensorDecision", ...]:
    """One TensorDecision per saved tensor, with the reason for its action."""
    from memopt.planner.plan import TensorDecision

    problem = plan.problem
    fits = plan.keep_all.peak_bytes <= plan.evaluation.peak_bytes
    out = []
    for c, choice in zip(problem.candidates, plan.choices):
        action = "save" if c.extra and choice.action == "keep" else choice.action
        out.append(TensorDecision(
            name=c.name, module=c.module, block=c.block, op=c.target, shape=c.shape, dtype=c.dtype,
            nbytes=c.nbytes, action=action, point=choice.point, recompute_us=c.recompute_us,
            recompute_flops=c.recompute_flops, transfer_us=c.transfer_us, klass=c.klass,
            reason=_reason(problem, c, plan.choices, fits), key=c.key,
        ))
    return tuple(out)


def _reason(problem: PlanningProblem, c: "Candidate", choices: tuple[Choice, ...], fits: bool) -> str:
    choice = choices[c.index]
    if c.extra:
        recomputed = [problem.candidates[t].name for t in problem.dependents[c.index] if choices[t].action == "recompute"]
        if choice.action == "keep":
            return f"saved (the backward does not read it) so that {', '.join(recomputed)} can be recomputed from it"
        return "not saved: the backward does not read it and no recomputation starts from it"
    if choice.action == "recompute":
        inputs = ", ".join(problem.candidates[d].name for d in c.deps) or "parameters and inputs"
        return (f"recomputed before backward point {choice.point}: {len(c.closure)} forward ops from {inputs} "
                f"({c.recompute_flops:,} FLOPs, {c.recompute_us} us)")
    if choice.action == "offload":
        return (f"offloaded to host: {c.transfer_us} us each way, copied out when made and back by "
                f"backward point {choice.point}")
    if fits:
        return "kept: keeping every saved tensor fits the budget"
    blocked = "; ".join(f"no {a}: {why}" for a, why in sorted(c.reasons.items()))
    return "kept: freeing it costs more time than the budget needs" + (f" ({blocked})" if blocked else "")


def timeline(plan: ActivationPlan, buckets: int = 512) -> "MemoryTimeline":
    """The device bytes over the step, as bucket maxima (the peak is always a bucket's value)."""
    from memopt.planner.plan import MemoryTimeline

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


def plan_fields(plan: ActivationPlan, *, trace_seconds: float = 0.0, applied_peak_bytes: int | None = None,
                op_flops: "Sequence[int] | None" = None) -> dict:
    """The planner's part of a ``Plan``'s fields, as keyword arguments."""
    from memopt.planner.plan import SolverReport

    problem = plan.problem
    return dict(
        predicted_peak_bytes=plan.peak_bytes,
        static=problem.static,
        tensors=tensor_decisions(plan),
        timeline=timeline(plan),
        compute_us=sum(problem.point_us),
        recompute_us=plan.evaluation.recompute_us,
        exposed_transfer_us=plan.evaluation.exposed_transfer_us,
        solver=SolverReport(
            status=plan.status, min_peak_status=plan.min_peak_status, min_feasible_bytes=plan.min_feasible_bytes,
            trace_ms=round(trace_seconds * 1000), solve_ms=round(plan.seconds * 1000),
            candidates=len(problem.candidates), classes=problem.num_classes, quantum=plan.quantum,
            calibration_bytes=problem.offset_bytes,
        ),
        runtime_applies=("keep", "drop"),
        applied_peak_bytes=max(plan.keep_all.peak_bytes, problem.static.optimizer_phase_peak)
        if applied_peak_bytes is None else applied_peak_bytes,
        recompute_flops=None if op_flops is None else recompute_flops(plan, op_flops),
    )
