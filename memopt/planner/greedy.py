"""A greedy plan: the CP-SAT warm start, and a fallback when the solver finds nothing in time.

Starting from what the default partitioner does (keep every saved tensor, save nothing extra),
repeatedly take the decision class that frees the most bytes *at the current peak* per
microsecond it costs — recompute (its closure time) or offload (its two copies, as if not
hidden) — until the peak fits ``capacity`` or nothing is left to change. A class is changed in
every block that shares it (broadcast). A recomputed tensor's inputs must be on device: kept,
materialized no later than it, or — for a recompute source such as the residual stream — saved
as part of the move (its bytes are charged to the move).
"""

from __future__ import annotations

from typing import Sequence

from memopt.planner.problem import Candidate, Choice, Evaluation, PlanningProblem, evaluate, keep_all, offloaded_bytes

__all__ = ["greedy_plan", "relaxed", "whole_blocks_plan", "with_sources_offloaded"]


def greedy_plan(problem: PlanningProblem, capacity: int) -> tuple[Choice, ...]:
    """Requires: ``capacity`` in bytes (static included). Ensures: a valid assignment (maybe not fitting)."""
    choices = list(keep_all(problem))
    members = problem.classes
    while True:
        result = evaluate(problem, choices)
        if result.peak_bytes <= capacity:
            return tuple(choices)
        best = _best_move(problem, members, choices, result.peak_point)
        if best is None:
            return tuple(choices)
        klass, action = best
        choices = _moved(problem, members, choices, members[klass], action)


def relaxed(problem: PlanningProblem, choices: Sequence[Choice], capacity: int) -> tuple[Choice, ...]:
    """Requires: ``choices`` valid and within ``capacity``. Ensures: the same, no slower, moved back
    towards keeping: a recomputed decision class kept or offloaded, an offloaded one kept — the
    costliest first, while the plan stays valid, within ``capacity`` and gets faster; where such a
    move alone does not fit (device or host bytes), followed by the cheapest moves the other way
    that make room (the greedy plan's moves at the peak; recomputing what is offloaded, for host
    bytes), kept where the whole is faster.

    The minimum-time phase's warm start from the minimum-peak plan, which recomputes far more than
    a larger budget needs. On Llama-3.1-8B at 524,288 tokens the greedy plan from keeping
    everything does not get under 80 GiB, and in 60 s CP-SAT did not move from the minimum-peak
    plan's +26 %; from this one (+6.5 %: attention's outputs offloaded in 25 of 32 layers, keys
    and values recomputed to make host room) it moved by 0.1 s of 114."""
    members = problem.classes
    current = list(choices)
    base = evaluate(problem, current)
    groups = sorted(members.values(), key=lambda g: -_cost(g))
    improved = True
    while improved:
        improved = False
        for group in groups:
            for action in _FASTER.get(current[group[0].index].action, ()):
                trial = _moved(problem, members, current, group, action)
                repaired = trial and _repaired(problem, members, trial, capacity, base.overhead_us)
                if repaired is not None:
                    (current, base), improved = repaired, True
                    break
    return tuple(current)


def _repaired(problem: PlanningProblem, members: dict[int, list[Candidate]], choices: list[Choice],
              capacity: int, faster_than: int) -> tuple[list[Choice], Evaluation] | None:
    """``choices`` made to fit with the greedy plan's moves, with its evaluation, or None where that
    costs ``faster_than``."""
    for _ in range(len(members)):
        result = evaluate(problem, choices)
        if result.overhead_us >= faster_than:
            return None
        if result.valid and result.peak_bytes <= capacity:
            return choices, result
        host_over = problem.host_capacity is not None and offloaded_bytes(problem, choices) > problem.host_capacity
        if host_over:  # recompute the offloaded class that costs least per host byte
            offloaded = sorted((g for g in members.values() if choices[g[0].index].action == "offload"),
                               key=lambda g: _cost(g, "recompute") / max(1, sum(c.nbytes for c in g)))
            moves = (_moved(problem, members, choices, g, "recompute") for g in offloaded)
            choices = next((m for m in moves if m is not None), None)
            if choices is None:
                return None
            continue
        if not result.valid:
            return None
        best = _best_move(problem, members, choices, result.peak_point)
        if best is None:
            return None
        choices = _moved(problem, members, choices, members[best[0]], best[1])
    return None


_FASTER = {"recompute": ("keep", "offload"), "offload": ("keep",)}  # moves that may save time


def _cost(group: Sequence[Candidate], action: str | None = None) -> int:
    """µs per step of ``group`` recomputed, or offloaded (its two copies, as if not hidden);
    without ``action``, of the two."""
    recompute = sum(c.recompute_us for c in group)
    offload = sum(2 * c.transfer_us for c in group)
    return {"recompute": recompute, "offload": offload}.get(action, recompute + offload)


def _moved(problem: PlanningProblem, members: dict[int, list[Candidate]], choices: Sequence[Choice],
           group: Sequence[Candidate], action: str) -> list[Choice] | None:
    """``choices`` with every candidate of ``group`` changed to ``action`` (a recomputed one's
    recompute sources saved), or None where that is not allowed."""
    trial = list(choices)
    for c in group:
        trial[c.index] = Choice("keep")
    if action == "keep":
        return trial
    if action == "recompute":  # inputs offloaded or recomputed for a later point are brought forward
        for c in group:
            m = _point(problem, c, trial)
            if m is not None and not all(_readied(problem, trial, d, m) for d in c.deps):
                return None
    if not all(_can(problem, c, action, trial) for c in group):
        return None
    for c in group:
        for d in _sources_to_save(problem, c, action, trial):
            for e in members[problem.candidates[d].klass]:
                trial[e.index] = Choice("keep")
        m = _point(problem, c, trial)
        trial[c.index] = Choice(action, c.first_backward if action == "offload" and c.extra else m)
    if action == "recompute":  # a member reading another (blocks handing tensors across) has it by its point
        for c in group:
            if not all(_readied(problem, trial, d, trial[c.index].point) for d in c.deps):
                return None
    return trial


def _readied(problem: PlanningProblem, choices: list[Choice], d: int, m: int, depth: int = 0) -> bool:
    """Make candidate ``d`` on the device by point ``m`` in ``choices`` (in place): its fetch, or its
    recomputation (with what that reads, in turn), moved to the latest of its points no later than
    ``m``. False where none is early enough (``choices`` may then be partly moved: discard them)."""
    dep, choice = problem.candidates[d], choices[d]
    if choice.action in ("keep", "drop") or (choice.point is not None and choice.point <= m):
        return True  # (a dropped input is a recompute source: the move saves it)
    points = dep.offload_points if choice.action == "offload" else dep.points
    point = max((p for p in points if p <= m), default=None)
    if point is None or depth > _MAX_DEPTH:
        return False
    choices[d] = Choice(choice.action, point)
    return choice.action == "offload" or all(_readied(problem, choices, e, point, depth + 1) for e in dep.deps)


_MAX_DEPTH = 8  # recomputations reading recomputations: a closure stays inside one block


def whole_blocks_plan(problem: PlanningProblem) -> tuple[Choice, ...]:
    """What gradient checkpointing does, as an assignment: every saved tensor of a block that may be
    recomputed is, at the block's first backward point (the whole block re-run from what is
    saved); recompute sources are saved where a recomputation starts from them. Ensures: a valid
    assignment (the caller compares its peak); the CP-SAT warm start on problems too large for the
    solver to get there from the greedy plan in its time."""
    starts: dict[int, int] = {}
    for c in problem.candidates:
        if c.block is not None and not c.extra:
            starts[c.block] = min(starts.get(c.block, c.first_backward), c.first_backward)
    choices = list(keep_all(problem))
    for c in problem.candidates:
        start = starts.get(c.block) if c.block is not None else None
        if not c.extra and "recompute" in c.allowed and start in c.points:
            choices[c.index] = Choice("recompute", start)
    for c in reversed(problem.candidates):  # dependents come after their dependencies
        if choices[c.index].action == "recompute":
            m = choices[c.index].point
            for d in c.deps:
                dep = problem.candidates[d]
                if dep.extra and choices[d].action != "recompute":  # a source: re-run with the block, else saved
                    can = "recompute" in dep.allowed and m in dep.points and dep.block == c.block
                    choices[d] = Choice("recompute", m) if can else Choice("keep")
                elif choices[d].action == "recompute" and choices[d].point > m:
                    choices[d] = Choice("keep")  # needed earlier than its block re-runs
    return tuple(choices)


def with_sources_offloaded(problem: PlanningProblem, choices: Sequence[Choice],
                           order: str = "lowest peak") -> tuple[Choice, ...]:
    """``choices`` with every saved recompute source (the residual stream a block re-runs from)
    offloaded where allowed: the offloaded checkpoints of the residual stream. A decision class
    moves whole (the solver decides per class, so this stays an assignment it can take as its warm
    start). Ensures: a valid assignment when ``choices`` is one.

    ``order="lowest peak"``: a member nothing re-runs from (the last block's output) moves with its
    class (before, such a class stayed on device, and Llama-3.3-70B at 137,216 tokens kept its
    blocks' inputs (165 GiB) there and started the minimum-peak phase at 249.7 GiB, not 90.0); under
    a host budget, one class at a time while the budget lasts, each time the one whose offload
    leaves the lowest peak. ``order="forward"``: only classes saved whole, in forward order while
    the host budget lasts — the start this replaced, kept as the second one (``solve_min_peak``):
    from it CP-SAT ended LLaMA-2-7B at 98,304 tokens with a 64 GiB host budget at a lowered peak of
    22.97 GiB, where from the first it ended at 25.98 GiB."""
    if order not in ("lowest peak", "forward"):
        raise ValueError(f"order: 'lowest peak' or 'forward', not {order!r}")
    out = list(choices)
    forward = order == "forward"
    groups = [g for g in problem.classes.values() if all(_offloadable_source(problem, c, out, forward) for c in g)
              and any(out[c.index].action == "keep" for c in g)]  # (a member nothing re-runs from is moved too)
    if problem.host_capacity is None:
        return tuple(_sources_moved(out, [c for g in groups for c in g]))
    host_left = problem.host_capacity - offloaded_bytes(problem, out)
    if forward:  # (the classes are in forward order: by each class's first member)
        for g in groups:
            if (need := sum(c.nbytes for c in g)) <= host_left:
                out, host_left = _sources_moved(out, g), host_left - need
        return tuple(out)
    while groups := [g for g in groups if sum(c.nbytes for c in g) <= host_left]:
        trials = [(evaluate(problem, trial).peak_bytes, i, trial)
                  for i, trial in enumerate(_sources_moved(out, g) for g in groups)]
        _, i, out = min(trials, key=lambda t: t[:2])
        host_left -= sum(c.nbytes for c in groups.pop(i))
    return tuple(out)


def _sources_moved(choices: Sequence[Choice], sources: Sequence[Candidate]) -> list[Choice]:
    out = list(choices)
    for c in sources:
        out[c.index] = Choice("offload", c.first_backward)
    return out


def _offloadable_source(problem: PlanningProblem, c: Candidate, choices: Sequence[Choice], saved: bool = False) -> bool:
    """A recompute source that may be offloaded (saved, or, unless ``saved``, not where nothing
    re-runs from it), and no dependent is re-made before it is back."""
    return (c.extra and choices[c.index].action in (("keep",) if saved else ("keep", "drop")) and "offload" in c.allowed
            and not any(choices[t].action == "recompute" and choices[t].point < c.first_backward
                        for t in problem.dependents[c.index]))


def _best_move(problem: PlanningProblem, members: dict[int, list[Candidate]], choices: list[Choice],
               peak: int) -> tuple[int, str] | None:
    best, best_score = None, None
    host_left = None if problem.host_capacity is None else problem.host_capacity - offloaded_bytes(problem, choices)
    for klass, group in members.items():
        if any(choices[c.index].action != "keep" for c in group):
            continue
        sources = any(c.extra for c in group)  # saved recompute sources: only offloaded
        for action in ("offload",) if sources else ("recompute", "offload"):
            if not all(_can(problem, c, action, choices) for c in group):
                continue
            freed = sum(c.nbytes for c in group if _freed_at(problem, c, peak, action))
            if action == "offload" and host_left is not None and sum(c.nbytes for c in group) > host_left:
                continue  # the host budget is spent
            sources = {d for c in group for d in _sources_to_save(problem, c, action, choices)}
            extra = sum(e.nbytes for d in sources for e in members[problem.candidates[d].klass]
                        if e.define <= peak <= e.last_backward)
            if freed - extra <= 0:
                continue
            cost = sum(c.recompute_us if action == "recompute" else 2 * c.transfer_us for c in group)
            score = cost / (freed - extra)
            if best_score is None or score < best_score:
                best, best_score = (klass, action), score
    return best


def _freed_at(problem: PlanningProblem, c: Candidate, point: int, action: str) -> bool:
    """Would ``action`` (recompute / offload) of ``c`` remove it from device at ``point``?"""
    if action == "offload":
        return max(c.last_forward, c.ready) < point < c.fetch_start
    if point < problem.num_forward:
        return c.last_forward < point
    return point < c.points[-1] if c.points else False


def _sources_to_save(problem: PlanningProblem, c: Candidate, action: str, choices: Sequence[Choice]) -> list[int]:
    """The extra recompute sources ``c``'s recomputation needs that are not saved yet."""
    if action != "recompute":
        return []
    return [d for d in c.deps if problem.candidates[d].extra and choices[d].action == "drop"]


def _can(problem: PlanningProblem, c: Candidate, action: str, choices: Sequence[Choice]) -> bool:
    if action not in c.allowed:
        return False
    m = _point(problem, c, choices)
    if m is None or (action == "offload" and (m < c.first_backward if c.extra else m not in c.offload_points)):
        return False  # (an offloaded source is back at its first point: no dependent may be re-made earlier)
    if action == "recompute":
        return all(choices[d].action == "keep" or (problem.candidates[d].extra and choices[d].action == "drop")
                   or (choices[d].point is not None and choices[d].point <= m) for d in c.deps)
    return True


def _point(problem: PlanningProblem, c: Candidate, choices: Sequence[Choice]) -> int | None:
    """The latest materialize point no later than any recomputed dependent's (None: there is none)."""
    need = [choices[t].point for t in problem.dependents[c.index]
            if choices[t].action == "recompute" and choices[t].point is not None]
    limit = min(need, default=c.points[-1] if c.points else None)
    return max((p for p in c.points if p <= limit), default=None) if limit is not None else None
