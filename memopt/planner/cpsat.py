"""The CP-SAT model of a PlanningProblem: keep / recompute / offload per saved tensor.

Design note (REFERENCES.md, CP-SAT modelling notes). Per decision class (one per saved tensor, or
one per position in a set of identical blocks) three booleans with exactly-one; per candidate
and materialize point a boolean for "recompute here" / "prefetch by here" summing to the class's
recompute / offload boolean (the class boolean itself when there is one point). A recomputed
tensor's inputs must be kept or materialized no later than it. Device bytes are a linear
expression at every program point; points between two events (a tensor's forward end, a copy's
end, a materialize point, a last backward use) share the same expression, so one constraint per
segment (its largest constant) and per distinct expression is emitted. Bytes are quantised to
``quantum`` (coefficients and constants rounded up, the capacity down: a plan the model accepts
fits in exact bytes too). The quantum is chosen per model once its segments are known, so that
rounding every term of the widest segment up costs at most 1/1024 of the bytes that matter (the
capacity, or the warm start's peak): at long context thousands of terms are alive at once, and
a quantum from the keep-everything peak alone overstated Llama-3.3-70B's peak at 137,216 tokens by
10 GiB of 80. Time is µs: the recompute closures' time, plus the exposed copy time —
the copy engines as two single machines, outbound with release dates (Jackson's bound over every
release), inbound with due dates (the earliest-due-date lateness over every due date) — exact for
those machines, so the objective equals :func:`memopt.planner.problem.evaluate`'s overhead.

Two phases (:func:`solve`): the minimum peak (the smallest feasible budget), then the minimum time
at the budget; each with a greedy hint (``AddHint``) and a time limit.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ortools.sat.python import cp_model

from memopt.planner.greedy import greedy_plan, relaxed, whole_blocks_plan, with_sources_offloaded
from memopt.planner.problem import ACTIONS, Candidate, Choice, Evaluation, PlanningProblem, evaluate, keep_all

__all__ = ["SolveResult", "SolverOptions", "choose_quantum", "min_peak_start", "solve_min_peak", "solve_min_time",
           "time_limit_for"]

log = logging.getLogger("memopt")

WARM_START = "WARM_START"  # a phase's status where CP-SAT found nothing better than its warm start, which is returned
_WALL_CLOCK_FACTOR = 10  # the wall-clock safety net, in multiples of the deterministic time limit
# At most 2**20 quanta span the keep-all peak (the coarsest quantum), and rounding up every term
# of the widest segment costs at most 1/_ROUNDING of the bytes that matter.
_QUANTA = 2**20
_ROUNDING = 2**10


@dataclass(frozen=True)
class SolverOptions:
    """``time_limit_s`` per phase, in CP-SAT's deterministic time (about seconds; None: by the
    problem's size, ``time_limit_for``); ``workers`` CP-SAT search workers (0: one per CPU core;
    with 1 the search is repeatable)."""

    time_limit_s: float | None = 10.0
    workers: int = 0
    seed: int = 0
    quantum: int | None = None  # bytes per unit in the model; None: chosen from the problem's size

    def __post_init__(self) -> None:
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 seconds (or None: by the problem's size), got "
                             f"{self.time_limit_s!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per CPU core), got {self.workers!r}")
        if self.quantum is not None and self.quantum < 1:
            raise ValueError(f"quantum must be a positive number of bytes, got {self.quantum!r}")


_CHAIN_FROM = 4  # points of a dependency from which "on the device by" is a chain of running sums
_INTERLEAVE_FROM = 300  # saved tensors from which the search strategies are interleaved
_AUTO_LIMIT_S = (10.0, 60.0)  # time_limit_s=None: from 10 s (up to 100 saved tensors) to 60 s (600 and more)
_AUTO_PER_TENSOR_S = 0.1


def time_limit_for(problem: PlanningProblem) -> float:
    """``time_limit_s=None``'s limit: 0.1 s per saved tensor, from 10 to 60 s. A tiny model's plan is
    proven optimal well inside 10 s; Llama-3.1-8B at 524,288 tokens (647 saved tensors, 150,999
    program points) plans +6.5 % predicted overhead with 60 s per phase and one worker: the relaxed
    warm start's plan (``greedy.relaxed``), which CP-SAT improved by 0.1 s of 114 in that time."""
    low, high = _AUTO_LIMIT_S
    return min(high, max(low, _AUTO_PER_TENSOR_S * len(problem.candidates)))


@dataclass(frozen=True)
class SolveResult:
    """One phase's outcome; ``choices`` is None when no assignment was found."""

    status: str  # "OPTIMAL" | "FEASIBLE" | "INFEASIBLE" | "UNKNOWN" | WARM_START
    choices: tuple[Choice, ...] | None
    objective: int | None  # peak bytes (exact, evaluated) or overhead µs
    bound: int | None
    seconds: float
    quantum: int
    start: tuple[Choice, ...] | None = None  # the minimum-peak phase's warm start


def choose_quantum(problem: PlanningProblem, widest: int = 0, scale: int | None = None) -> int:
    """Bytes per unit of the model: a power of two, 2**20 of them span the keep-everything peak, and
    where ``scale`` is given, ``widest`` terms rounded up by one each cost at most 1/1024 of it."""
    keep_peak = max(problem.base, default=0) + sum(c.nbytes for c in problem.candidates) + problem.static.resident
    quantum = max(0, math.floor(math.log2(max(keep_peak, 1))) - int(math.log2(_QUANTA)))
    if scale is not None:
        allowed = scale // (_ROUNDING * max(widest, 1))
        quantum = min(quantum, max(0, math.floor(math.log2(allowed)) if allowed >= 1 else 0))
    return 1 << quantum


def min_peak_start(problem: PlanningProblem, sources: str = "lowest peak") -> tuple[tuple[Choice, ...], Evaluation]:
    """The minimum-peak phase's warm start and its evaluation: the lowest-peak of three, the greedy
    plan, whole blocks recomputed, and those with the residual stream's checkpoints offloaded in
    ``sources`` order (``with_sources_offloaded``)."""
    whole = whole_blocks_plan(problem)
    starts = [(c, evaluate(problem, c)) for c in (greedy_plan(problem, 0), whole,
                                                  with_sources_offloaded(problem, whole, sources))]
    return min(((c, e) for c, e in starts if e.valid), key=lambda ce: ce[1].peak_bytes)


def solve_min_peak(problem: PlanningProblem, options: SolverOptions = SolverOptions(),
                   progress: Callable[[str], None] | None = None,
                   start: tuple[tuple[Choice, ...], Evaluation] | None = None) -> SolveResult:
    """Phase 1: the assignment with the smallest peak device bytes (the smallest feasible budget).
    ``start``: its warm start and evaluation (default ``min_peak_start(problem)``).
    Ensures: ``choices`` is an assignment — the warm start (status ``WARM_START``) where CP-SAT found
    none in its time, or only ones with a larger exact peak."""
    start, start_eval = start or min_peak_start(problem)
    model = _Model(problem, options.quantum, scale=start_eval.peak_bytes)
    peak = model.cp.NewIntVar(0, model.upper_bound(), "peak")
    model.add_memory(peak)
    model.cp.Minimize(peak)
    model.hint(start)
    # (complete, so CP-SAT takes it as its first solution: on Llama-3.3-70B at 18,432 tokens the
    # search, led by a hint missing only this variable, had found none in 60 s)
    model.cp.AddHint(peak, model.peak_in_quanta(start))
    result = model.run(options, "minimum peak", progress, lambda v: f"{v * model.quantum / 2**30:.3f} GiB")
    exact = None if result.choices is None else evaluate(problem, result.choices).peak_bytes
    if exact is None or exact > start_eval.peak_bytes:  # (none, or lower in quanta but not in bytes)
        result, exact = replace(result, status=WARM_START, choices=start), start_eval.peak_bytes
    bound = None if result.bound is None else result.bound * model.quantum
    return SolveResult(result.status, result.choices, exact, bound, result.seconds, model.quantum, start)


def solve_min_time(problem: PlanningProblem, capacity: int, options: SolverOptions = SolverOptions(),
                   progress: Callable[[str], None] | None = None,
                   hint: Sequence[Choice] | None = None) -> SolveResult:
    """Phase 2: the fastest assignment whose device bytes stay <= ``capacity`` (static included).

    ``hint``: a known assignment (e.g. phase 1's), the warm start when it or its relaxation beats the
    greedy. Where CP-SAT finds nothing in its time, or nothing faster, the warm start is returned
    (status ``WARM_START``)."""
    model = _Model(problem, options.quantum, scale=capacity)
    limit = capacity // model.quantum
    model.add_memory(limit)
    model.cp.Minimize(model.time_objective())
    starts = [(c, evaluate(problem, c)) for c in (_greedy_hint(model, capacity, limit), hint,
                                                  _relaxed_hint(model, capacity, limit, hint))
              if c is not None and model.peak_in_quanta(c) <= limit]
    start, start_eval = min(((c, e) for c, e in starts if e.valid), key=lambda ce: ce[1].overhead_us,
                            default=(None, None))
    if start is not None:
        model.hint(start)
    result = model.run(options, "minimum time", progress, lambda v: f"+{v / 1000:.1f} ms per step")
    if start is not None and (result.choices is None or
                              evaluate(problem, result.choices).overhead_us > start_eval.overhead_us):
        result = replace(result, status=WARM_START, choices=start)
    if result.choices is None:
        return result
    # Many plans tie on time (offloads hidden under compute cost nothing): keep what need not move.
    choices = _keep_what_fits(problem, result.choices, capacity)
    return SolveResult(result.status, choices, evaluate(problem, choices).overhead_us, result.bound,
                       result.seconds, result.quantum)


def _keep_what_fits(problem: PlanningProblem, choices: Sequence[Choice], capacity: int) -> tuple[Choice, ...]:
    """Turn decision classes back to what the default partitioner does (keep a saved tensor, do not
    save a recompute source), smallest first, while the plan stays valid, fits and is no slower."""
    current = list(choices)
    base = evaluate(problem, current)
    default = keep_all(problem)
    groups = sorted(problem.classes.values(), key=lambda g: sum(c.nbytes for c in g))
    for group in groups:
        if all(current[c.index] == default[c.index] for c in group):
            continue
        trial = list(current)
        for c in group:
            trial[c.index] = default[c.index]
        result = evaluate(problem, trial)
        if result.valid and result.peak_bytes <= capacity and result.overhead_us <= base.overhead_us:
            current, base = trial, result
    return tuple(current)


def _greedy_hint(model: "_Model", capacity: int, limit: int) -> tuple[Choice, ...] | None:
    """A greedy plan that also fits the rounded-up model: aim below the capacity by what rounding
    can add (a quantum per term of the longest segment), and lower again if that was not enough."""
    target = capacity - model.rounding()
    for _ in range(2):
        choices = greedy_plan(model.problem, target)
        over = model.peak_in_quanta(choices) - limit
        if over <= 0:
            return choices
        target -= over * model.quantum
    return None


def _relaxed_hint(model: "_Model", capacity: int, limit: int,
                  hint: Sequence[Choice] | None) -> tuple[Choice, ...] | None:
    """``hint`` (phase 1's plan) relaxed towards keeping, below the capacity by what rounding can add."""
    if hint is None or model.peak_in_quanta(hint) > limit:
        return None
    return relaxed(model.problem, hint, capacity - model.rounding())


class _Model:
    """The CP-SAT variables of one problem and the linear expressions over them."""

    def __init__(self, problem: PlanningProblem, quantum: int | None, scale: int | None = None) -> None:
        """``quantum``: bytes per unit (None: ``choose_quantum`` for the widest segment and ``scale``)."""
        self.problem, self._quantum, self._scale = problem, quantum, scale
        self.cp = cp_model.CpModel()
        self._segments: list | None = None
        # candidate -> (its points ascending, "on the device by the i-th" for i = 0 .. len)
        self._chains: dict[int, tuple[list[int], list]] = {}
        self._spikes: dict[int, list[tuple[int, int, int]]] = {}  # point -> (candidate, point index, bytes)
        self._spike_vars: dict[int, cp_model.IntVar] = {}
        self._upper: dict[int, int] = {}  # variable index -> its largest value, where it is not a boolean
        # Auxiliary variables and how to compute them from the decisions, so a hint is complete:
        # (variable, [(variable index, coefficient)], constant, base variable index or None)
        # -> max(0, constant + base + sum), each after its base.
        self._derived: list[tuple[cp_model.IntVar, list[tuple[int, int]], int, int | None]] = []
        # (variable, [(running sum's variable index, constant)]) -> max(0, max(sum + constant))
        self._exposed: list[tuple[cp_model.IntVar, list[tuple[int, int]]]] = []
        self.action: dict[tuple[int, str], cp_model.IntVar] = {}
        members = problem.classes
        for klass, group in members.items():
            allowed = group[0].allowed
            row = [self._bool(f"{a}_{klass}", a in allowed) for a in ACTIONS]
            self.cp.AddExactlyOne(row)
            self.action.update({(klass, a): v for a, v in zip(ACTIONS, row)})
        if problem.host_capacity is not None:  # every offloaded tensor is on the host at the end of the forward
            host: dict[int, int] = {}
            for c in problem.candidates:
                if "offload" in c.allowed:
                    host[c.klass] = host.get(c.klass, 0) + c.nbytes
            self.cp.Add(cp_model.LinearExpr.WeightedSum([self.action[k, "offload"] for k in host], list(host.values()))
                        <= problem.host_capacity)
        self.at: dict[int, list[cp_model.IntVar]] = {c.index: self._per_point(c, "recompute", c.points)
                                                     for c in problem.candidates}
        self.off: dict[int, list[cp_model.IntVar]] = {c.index: self._per_point(c, "offload", c.offload_points)
                                                      for c in problem.candidates}
        for c in problem.candidates:
            self._dependencies(c)

    def _bool(self, name: str, allowed: bool = True) -> cp_model.IntVar:
        var = self.cp.NewBoolVar(name)
        if not allowed:
            self.cp.Add(var == 0)
        return var

    def _per_point(self, c: Candidate, action: str, points: Sequence[int]) -> list[cp_model.IntVar]:
        """"``action`` ``c`` at point j" per point (recomputed there, or fetched for it when offloaded);
        the class variable itself when there is one point."""
        whole = self.action[c.klass, action]
        if len(points) == 1 or action not in c.allowed:
            return [whole] + [self._bool(f"{action}_{c.index}_{j}", False) for j in range(1, len(points))]
        row = [self._bool(f"{action}_{c.index}_{j}") for j in range(len(points))]
        self.cp.Add(sum(row) == whole)
        return row

    def _dependencies(self, c: Candidate) -> None:
        if "recompute" not in c.allowed:
            return
        for j, m in enumerate(c.points):
            for d in c.deps:
                self.cp.Add(self.at[c.index][j] <= self._ready(d, m))

    def _ready(self, d: int, m: int) -> "cp_model.LinearExprT":
        """1 when candidate ``d`` is on the device by point ``m`` (kept, or recomputed or fetched by
        then). Where it has many points, a chain of running sums (one variable per point, each the
        one before plus what is new there), so a dependency is two terms, not one per point: with
        MLPs in pieces, a tensor has dozens of points, and 70B's model had 7.2 M terms this way."""
        if d not in self._chains:
            dep = self.problem.candidates[d]
            items = list(zip(dep.points, self.at[d]))
            if "offload" in dep.allowed:
                items += list(zip(dep.offload_points, self.off[d]))
            items.sort(key=lambda item: item[0])
            running = self.action[dep.klass, "keep"]
            chain: list = [running]
            for i, (_, v) in enumerate(items):
                if len(items) <= _CHAIN_FROM:
                    chain.append(running := running + v)
                    continue
                new = self.cp.NewBoolVar(f"ready_{d}_{i}")  # (at most one of keep and the points is 1)
                self.cp.Add(new == running + v)
                self._derived.append((new, [(v.Index(), 1)], 0, running.Index()))
                chain.append(running := new)
            self._chains[d] = [md for md, _ in items], chain
        points, chain = self._chains[d]
        return chain[bisect.bisect_right(points, m)]

    def upper_bound(self) -> int:
        p = self.problem
        total = p.static.resident + max(p.base, default=0) + sum(c.nbytes + c.recompute_bytes + c.replay_bytes
                                                                 for c in p.candidates)
        return -(-total // self.quantum)

    def rounding(self) -> int:
        """Bytes rounding up can add to a plan's peak in the model: a quantum per term of the widest segment."""
        return max((segment.size for segment in self.segments()), default=0) * self.quantum

    @property
    def quantum(self) -> int:
        if self._quantum is None:
            self.segments()  # (which chooses it)
        return self._quantum

    def segments(self) -> list[_Segment]:
        """The distinct expressions of the device bytes at a point, in quanta, each as its change from
        the one before (so memory grows with the events, not with points x terms)."""
        if self._segments is None:
            kept = self._sweep(*self._events())
            if self._quantum is None:
                self._quantum = choose_quantum(self.problem, _widest(kept), self._scale)
            self._segments = self._quantized(kept)
        return self._segments

    def _events(self) -> tuple[list[int], dict[int, list[tuple[int, tuple, int]]]]:
        p = self.problem
        delta = [0] * (p.num_points + 1)
        events: dict[int, list[tuple[int, tuple, int]]] = {}  # point -> (sign, key, coef)

        def interval(lo: int, hi: int, key: tuple, coef: int) -> None:
            if lo <= hi and coef:
                events.setdefault(lo, []).append((1, key, coef))
                events.setdefault(hi + 1, []).append((-1, key, coef))

        for c in p.candidates:
            delta[c.define] += c.nbytes  # needed in the forward whatever is decided
            delta[c.last_forward + 1] -= c.nbytes
            interval(c.last_forward + 1, p.num_forward - 1, ("class", c.klass, "keep"), c.nbytes)
            interval(p.num_forward, c.last_backward, ("class", c.klass, "keep"), c.nbytes)
            if "offload" in c.allowed:
                interval(c.last_forward + 1, min(c.ready, p.num_forward - 1), ("class", c.klass, "offload"), c.nbytes)
                for j, start in enumerate(c.fetch_starts):
                    interval(start, c.last_backward, ("off", c.index, j), c.nbytes)
            for j, m in enumerate(c.points):
                interval(m, c.last_backward, ("at", c.index, j), c.nbytes)
                if c.recompute_bytes:
                    self._spikes.setdefault(m, []).append((c.index, j, c.recompute_bytes))
                interval(c.define, m, ("at", c.index, j), c.replay_bytes)
        for m in self._spikes:  # the largest closure recomputed at m (they run one after another), in quanta
            interval(m, m, ("spike", m, 0), 1)
        forward = itertools.accumulate(delta[:-1])
        constant = [p.static.resident + b + x for b, x in zip(p.base, forward)]
        return constant, events

    def _sweep(self, constant: list[int], events: dict) -> list[tuple[dict[tuple, int], int]]:
        """Walk the points; a segment dominated by its neighbour (fewer terms, smaller constant) is
        dropped. Each segment kept is (bytes per key changed from the segment kept before, constant):
        ``a`` dominates ``b`` exactly when the change from ``a`` to ``b`` only lowers terms."""
        kept: list[tuple[dict[tuple, int], int]] = []
        since: dict[tuple, int] = {}  # the terms' change since the last segment kept
        current: int | None = None

        def close() -> None:
            nonlocal since
            if current is None:
                return
            if kept and kept[-1][1] >= current and all(c <= 0 for c in since.values()):
                return  # dominated by the one before: the change stays pending
            change = since
            while kept and current >= kept[-1][1] and all(c >= 0 for c in change.values()):
                change = _merged(kept.pop()[0], change)  # it dominates the one before
            kept.append((change, current))
            since = {}

        for t in range(self.problem.num_points):
            if t in events:
                close()
                for sign, key, coef in events[t]:
                    since[key] = since.get(key, 0) + sign * coef
                    if since[key] == 0:
                        del since[key]
                current = None
            current = constant[t] if current is None else max(current, constant[t])
        close()
        return kept

    def _quantized(self, kept: list[tuple[dict[tuple, int], int]]) -> list[_Segment]:
        """The segments' byte changes per key as quanta changes per variable: a variable's coefficient
        is its bytes (summed over the keys it stands for) rounded up (a spike variable's is in quanta)."""
        q = self.quantum
        total: dict[int, int] = {}  # variable index -> bytes (quanta, for a spike) in the current segment
        out = []
        for change, const in kept:
            moved: dict[int, list] = {}
            for key, coef in change.items():
                var = self._var(key)
                moved.setdefault(var.Index(), [var, 0, key[0] == "spike"])[1] += coef
            step = {}
            for i, (var, coef, spike) in moved.items():
                before = total.get(i, 0)
                total[i] = before + coef
                if not total[i]:
                    del total[i]
                if (delta := coef if spike else -(-(before + coef) // q) - -(-before // q)):
                    step[i] = (var, delta)
            out.append(_Segment(step, -(-const // q), len(total)))
        return out

    def add_memory(self, bound: "cp_model.IntVar | int") -> None:
        """Device bytes <= bound at every segment, as a chain: each segment's variable part is the
        previous one's plus what changed; a segment that changes most of its terms starts the chain
        again from its terms."""
        terms: dict[int, tuple[cp_model.IntVar, int]] = {}
        previous: cp_model.IntVar | None = None
        for i, segment in enumerate(self.segments()):
            for k, (var, delta) in segment.change.items():
                coef = terms.get(k, (var, 0))[1] + delta
                if coef:
                    terms[k] = (var, coef)
                else:
                    del terms[k]
            upper = sum(c * self._upper.get(k, 1) for k, (_, c) in terms.items())  # (a boolean's is 1)
            part = self.cp.NewIntVar(0, upper, f"bytes_{i}")
            if previous is not None and len(segment.change) * 2 < len(terms):
                change = [(k, c) for k, (_, c) in segment.change.items()]
                self.cp.Add(part == previous + cp_model.LinearExpr.WeightedSum(
                    [v for v, _ in segment.change.values()], [c for _, c in segment.change.values()]))
                self._derived.append((part, change, 0, previous.Index()))
            else:  # the first, or a big change: from the terms themselves
                self.cp.Add(part == cp_model.LinearExpr.WeightedSum([v for v, _ in terms.values()],
                                                                    [c for _, c in terms.values()]))
                self._derived.append((part, [(k, c) for k, (_, c) in terms.items()], 0, None))
            self.cp.Add(part + segment.const <= bound)
            previous = part

    def peak_in_quanta(self, choices: Sequence[Choice]) -> int:
        """The model's (rounded-up) peak of ``choices``: what a hint must satisfy."""
        segments = self.segments()  # (first: it makes the spike variables _values reads)
        values = self._values(choices)
        peak, running = 0, 0
        for segment in segments:
            running += sum(c * values[i] for i, (_, c) in segment.change.items())
            peak = max(peak, running + segment.const)
        return peak

    def _var(self, key: tuple) -> cp_model.IntVar:
        kind, a, b = key
        if kind == "spike":
            return self._spike(a)
        if kind == "off":
            return self.off[a][b]
        return self.action[a, b] if kind == "class" else self.at[a][b]

    def _spike(self, m: int) -> cp_model.IntVar:
        """Quanta of the largest closure recomputed at point ``m``."""
        if m not in self._spike_vars:
            q = self.quantum
            terms = [(self.at[i][j], -(-nbytes // q)) for i, j, nbytes in self._spikes[m]]
            var = self.cp.NewIntVar(0, max(c for _, c in terms), f"spike_{m}")
            self._upper[var.Index()] = max(c for _, c in terms)
            for at, c in terms:
                self.cp.Add(var >= c * at)
            self._spike_vars[m] = var
        return self._spike_vars[m]

    def time_objective(self) -> cp_model.LinearExpr:
        p = self.problem
        recompute = cp_model.LinearExpr.WeightedSum(
            [self.action[k, "recompute"] for k in p.classes],
            [sum(c.recompute_us for c in group) for group in p.classes.values()])
        return recompute + self._exposed_out() + self._exposed_in()

    def _exposed_out(self) -> cp_model.IntVar:
        """Outbound copies, released when their producer ends: Jackson's makespan past the forward."""
        p = self.problem
        after = list(itertools.accumulate(p.point_us))
        end = after[p.num_forward - 1] if p.num_forward else 0
        jobs = [(after[c.define], c.transfer_us, self.action[c.klass, "offload"])
                for c in p.candidates if "offload" in c.allowed]
        # exposed >= (work released at or after r) - (end - r) for every release r; the running
        # sums are a chain of variables so the model stays linear in the number of jobs.
        return self._lateness(sorted(jobs, key=lambda j: -j[0]), lambda r: end - r, "exposed_out")

    def _exposed_in(self) -> cp_model.IntVar:
        """Prefetches, due by their materialize point: earliest-due-date lateness from the backward's start."""
        p = self.problem
        before = [0] + list(itertools.accumulate(p.point_us))
        start = before[p.num_forward]
        jobs = [(before[m] - start, c.transfer_us, self.off[c.index][j])
                for c in p.candidates if "offload" in c.allowed for j, m in enumerate(c.offload_points)]
        return self._lateness(sorted(jobs, key=lambda j: j[0]), lambda due: due, "exposed_in")

    def _lateness(self, jobs: list[tuple[int, int, cp_model.IntVar]], slack: Callable[[int], int],
                  name: str) -> cp_model.IntVar:
        """max(0, max over job groups g of (work of the jobs up to g) - slack(g)) as one variable."""
        total = sum(d for _, d, _ in jobs)
        exposed = self.cp.NewIntVar(0, total, name)
        running: cp_model.IntVar | None = None
        worst: list[tuple[int, int]] = []  # (running sum's variable index, -slack)
        for key, group in itertools.groupby(jobs, key=lambda j: j[0]):
            group = list(group)
            step = cp_model.LinearExpr.WeightedSum([v for _, _, v in group], [d for _, d, _ in group])
            cumulative = self.cp.NewIntVar(0, total, f"{name}_work_{key}")
            self.cp.Add(cumulative == (step if running is None else running + step))
            self.cp.Add(exposed >= cumulative - slack(key))
            self._derived.append((cumulative, [(v.Index(), d) for _, d, v in group], 0,
                                  None if running is None else running.Index()))
            worst.append((cumulative.Index(), -slack(key)))
            running = cumulative
        self._exposed.append((exposed, worst))
        return exposed

    def _values(self, choices: Sequence[Choice]) -> dict[int, int]:
        """The value of every decision variable under ``choices``."""
        values: dict[int, int] = {}
        for klass, group in self.problem.classes.items():
            action = choices[group[0].index].action
            for a in ACTIONS:
                values[self.action[klass, a].Index()] = int(a == action)
        for c in self.problem.candidates:
            ch = choices[c.index]
            for j, m in enumerate(c.points):
                var = self.at[c.index][j]
                if var is not self.action[c.klass, "recompute"]:
                    values[var.Index()] = int(ch.action == "recompute" and ch.point == m)
            for j, m in enumerate(c.offload_points):
                var = self.off[c.index][j]
                if var is not self.action[c.klass, "offload"]:
                    values[var.Index()] = int(ch.action == "offload" and ch.point == m)
        q = self.quantum
        for m, var in self._spike_vars.items():
            values[var.Index()] = max(-(-nbytes // q) * values[self.at[i][j].Index()] for i, j, nbytes in self._spikes[m])
        return values

    def hint(self, choices: Sequence[Choice]) -> None:
        """Hint every variable (an incomplete hint costs CP-SAT a search to complete it)."""
        values = self._values(choices)
        for index, value in values.items():
            self.cp.AddHint(self.cp.GetIntVarFromProtoIndex(index), value)
        for var, terms, const, base in self._derived:  # (in order: a base is hinted before)
            values[var.Index()] = max(0, const + (0 if base is None else values[base]) +
                                      sum(c * values[i] for i, c in terms))
            self.cp.AddHint(var, values[var.Index()])
        for var, bounds in self._exposed:
            self.cp.AddHint(var, max([0] + [values[i] + const for i, const in bounds]))

    def run(self, options: SolverOptions, phase: str, progress: Callable[[str], None] | None,
            unit: Callable[[float], str] = str) -> SolveResult:
        solver = cp_model.CpSolver()
        # A deterministic time limit (CP-SAT's work units, about seconds): with one worker the same
        # problem gives the same plan every call, however loaded the machine; the wall-clock limit
        # is only a safety net.
        limit = options.time_limit_s or time_limit_for(self.problem)
        solver.parameters.max_deterministic_time = limit
        solver.parameters.max_time_in_seconds = limit * _WALL_CLOCK_FACTOR
        solver.parameters.num_workers = options.workers or max(1, os.cpu_count() or 1)
        # On a large problem, CP-SAT's strategies interleaved in batches (deterministic): one worker
        # alone runs a single strategy, which on Llama-3.1-8B at 524,288 tokens found no minimum peak
        # under 84.2 GiB in 60 s; interleaved, 69.3 GiB. A small one is proven
        # optimal sooner by the single strategy.
        solver.parameters.interleave_search = len(self.problem.candidates) >= _INTERLEAVE_FROM
        solver.parameters.random_seed = options.seed
        # Probing (trying each boolean both ways in presolve) costs seconds on a model this size
        # and has not paid for itself on transformer plans.
        solver.parameters.cp_model_probing_level = 0
        callback = _Progress(phase, progress, unit) if progress is not None else None
        start = time.perf_counter()
        status = solver.Solve(self.cp, callback) if callback else solver.Solve(self.cp)
        seconds = time.perf_counter() - start
        name = solver.StatusName(status)
        log.debug("memopt: CP-SAT %s: %s in %.2f s (objective %s)", phase, name, seconds,
                  solver.ObjectiveValue() if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return SolveResult(name, None, None, None, seconds, self.quantum)
        return SolveResult(name, self._choices(solver), round(solver.ObjectiveValue()),
                           math.ceil(solver.BestObjectiveBound() - 1e-6), seconds, self.quantum)

    def _choices(self, solver: cp_model.CpSolver) -> tuple[Choice, ...]:
        out = []
        for c in self.problem.candidates:
            action = next(a for a in ACTIONS if solver.Value(self.action[c.klass, a]))
            point = None
            if action == "recompute":
                point = next(m for j, m in enumerate(c.points) if solver.Value(self.at[c.index][j]))
            elif action == "offload":
                point = next(m for j, m in enumerate(c.offload_points) if solver.Value(self.off[c.index][j]))
            out.append(Choice(action, point))
        return tuple(out)


@dataclass(frozen=True)
class _Segment:
    """One expression of the device bytes, in quanta: ``change`` per variable index (variable,
    coefficient change) from the segment before, ``const`` its constant, ``size`` its terms."""

    change: dict[int, tuple[cp_model.IntVar, int]]
    const: int
    size: int


def _widest(kept: list[tuple[dict[tuple, int], int]]) -> int:
    """The most terms alive at once in the sweep's segments (each rounds up by under a quantum)."""
    total: dict[tuple, int] = {}
    widest = 0
    for change, _ in kept:
        for key, coef in change.items():
            total[key] = total.get(key, 0) + coef
            if not total[key]:
                del total[key]
        widest = max(widest, len(total))
    return widest


def _merged(a: dict[tuple, int], b: dict[tuple, int]) -> dict[tuple, int]:
    """Two changes one after the other, as one (terms that cancel dropped)."""
    out = dict(a)
    for key, coef in b.items():
        out[key] = out.get(key, 0) + coef
        if not out[key]:
            del out[key]
    return out


class _Progress(cp_model.CpSolverSolutionCallback):
    """Reports every improving solution: the phase, its value, the proven bound, the time so far."""

    def __init__(self, phase: str, report: Callable[[str], None], unit: Callable[[float], str]) -> None:
        super().__init__()
        self.phase, self.report, self.unit, self.start = phase, report, unit, time.perf_counter()

    def on_solution_callback(self) -> None:
        bound = max(0.0, self.BestObjectiveBound())  # the LP bound can dip below what the objective can reach
        self.report(f"{self.phase}: {self.unit(self.ObjectiveValue())} (bound {self.unit(bound)}) "
                    f"after {time.perf_counter() - self.start:.1f} s")
