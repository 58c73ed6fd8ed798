"""Reference solvers for checking the CP-SAT planner: exhaustive search and an independent MILP.

Neither is used to plan. ``exhaustive`` enumerates every assignment (tiny problems only) with
:func:`memopt.planner.problem.evaluate` as the judge. ``milp`` states the same model from the
evaluation's definition, point by point with no segment compression, quantisation or chains, and
hands it to SCIP (OR-Tools' MILP interface): a second formulation and a second solver.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from ortools.linear_solver import pywraplp

from memopt.planner.problem import ACTIONS, Candidate, Choice, PlanningProblem, evaluate

__all__ = ["exhaustive", "milp"]


def _options(c: Candidate) -> list[Choice]:
    out = [Choice("keep")] + ([Choice("drop")] if "drop" in c.allowed else [])
    if "recompute" in c.allowed:
        out += [Choice("recompute", m) for m in c.points]
    if "offload" in c.allowed:
        out += [Choice("offload", m) for m in c.offload_points]
    return out


def _assignments(problem: PlanningProblem) -> Iterator[tuple[Choice, ...]]:
    """Every assignment in which identical-block classes agree on the action."""
    for combo in itertools.product(*(_options(c) for c in problem.candidates)):
        actions: dict[int, str] = {}
        if all(actions.setdefault(c.klass, ch.action) == ch.action for c, ch in zip(problem.candidates, combo)):
            yield combo


def exhaustive(problem: PlanningProblem, capacity: int | None) -> tuple[int, tuple[Choice, ...]] | None:
    """(best value, assignment): the least overhead at ``capacity``, or with ``capacity=None`` the
    least peak. None when nothing fits."""
    best: tuple[int, tuple[Choice, ...]] | None = None
    for combo in _assignments(problem):
        result = evaluate(problem, combo)
        if not result.valid or (capacity is not None and result.peak_bytes > capacity):
            continue
        value = result.peak_bytes if capacity is None else result.overhead_us
        if best is None or value < best[0]:
            best = (value, combo)
    return best


def milp(problem: PlanningProblem, capacity: int | None, time_limit_s: float = 60.0) -> int | None:
    """The optimum value (overhead µs at ``capacity``, or the least peak with ``capacity=None``)."""
    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    x = {}  # (candidate, option index) -> bool
    for c in problem.candidates:
        opts = _options(c)
        row = [solver.BoolVar(f"x_{c.index}_{i}") for i in range(len(opts))]
        solver.Add(sum(row) == 1)
        x.update({(c.index, i): v for i, v in enumerate(row)})
    _same_class_actions(problem, solver, x)
    _recompute_inputs(problem, solver, x)
    peak = solver.NumVar(0, solver.infinity(), "peak")
    for point in range(problem.num_points):
        spike = solver.NumVar(0, solver.infinity(), f"spike_{point}")  # the largest closure recomputed here
        for c in problem.candidates:
            for i, ch in enumerate(_options(c)):
                if ch.action == "recompute" and ch.point == point:
                    solver.Add(spike >= c.recompute_bytes * x[c.index, i])
        solver.Add(_bytes_at(problem, x, point) + spike <= (peak if capacity is None else capacity))
    if capacity is None:
        solver.Minimize(peak)
    else:
        solver.Minimize(_overhead(problem, solver, x))
    status = solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL,):
        return None
    return round(solver.Objective().Value())


def _same_class_actions(problem: PlanningProblem, solver: pywraplp.Solver, x: dict) -> None:
    for group in problem.classes.values():
        first = group[0]
        for c in group[1:]:
            for action in ACTIONS:
                solver.Add(_action(c, x, action) == _action(first, x, action))


def _action(c: Candidate, x: dict, action: str):
    return sum(x[c.index, i] for i, ch in enumerate(_options(c)) if ch.action == action)


def _recompute_inputs(problem: PlanningProblem, solver: pywraplp.Solver, x: dict) -> None:
    for c in problem.candidates:
        for i, ch in enumerate(_options(c)):
            if ch.action != "recompute":
                continue
            for d in c.deps:
                dep = problem.candidates[d]
                ready = [x[d, j] for j, o in enumerate(_options(dep))
                         if o.action == "keep" or (o.point is not None and o.point <= ch.point)]
                solver.Add(x[c.index, i] <= sum(ready))


def _bytes_at(problem: PlanningProblem, x: dict, p: int):
    total = problem.static.resident + problem.base[p]
    for c in problem.candidates:
        for i, ch in enumerate(_options(c)):
            if _resident(problem, c, ch, p):
                total = total + c.nbytes * x[c.index, i]
            if ch.action == "recompute" and c.define <= p <= ch.point:
                total = total + c.replay_bytes * x[c.index, i]
    return total


def _resident(problem: PlanningProblem, c: Candidate, ch: Choice, p: int) -> bool:
    if ch.action == "keep":
        return c.define <= p <= c.last_backward
    if ch.action == "drop":
        return c.define <= p <= c.last_forward
    forward_end = c.last_forward if ch.action == "recompute" else max(c.last_forward, c.ready)
    back_start = ch.point if ch.action == "recompute" else c.fetch_starts[c.offload_points.index(ch.point)]
    return c.define <= p <= forward_end or back_start <= p <= c.last_backward


def _overhead(problem: PlanningProblem, solver: pywraplp.Solver, x: dict):
    """Recompute time + Jackson's exposed outbound time + EDD exposed inbound time, point by point."""
    after = list(itertools.accumulate(problem.point_us))
    before = [0] + after
    end = after[problem.num_forward - 1]
    off = {c.index: _action(c, x, "offload") for c in problem.candidates if "offload" in c.allowed}
    # (due, transfer, variable) of every fetch a plan may make
    fetches = [(before[ch.point] - before[problem.num_forward], c.transfer_us, x[c.index, i])
               for c in problem.candidates for i, ch in enumerate(_options(c)) if ch.action == "offload"]
    out = solver.NumVar(0, solver.infinity(), "exposed_out")
    inn = solver.NumVar(0, solver.infinity(), "exposed_in")
    for c in problem.candidates:
        if c.index in off:
            release = after[c.define]
            solver.Add(out >= sum(d.transfer_us * off[d.index] for d in problem.candidates
                                  if d.index in off and after[d.define] >= release) - (end - release))
    for due, _, _ in fetches:
        solver.Add(inn >= sum(t * var for d, t, var in fetches if d <= due) - due)
    recompute = sum(c.recompute_us * _action(c, x, "recompute") for c in problem.candidates)
    return recompute + out + inn
