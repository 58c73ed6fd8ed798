"""plan_activations: keep-all when it fits, the fastest plan when not, the smallest budget below."""

from __future__ import annotations

import dataclasses

import pytest

from memopt.errors import InfeasibleBudgetError
from memopt.planner.costmodel import DEVICE_PRESETS
from memopt.planner.problem import build_problem, evaluate, keep_all, lowered_exposure
from memopt.planner.reference import milp
from memopt.planner.solve import PlannerConfig, plan_activations, plan_fields
from tests.planner._synthetic import chain_trace

SLOW_LINK = dataclasses.replace(DEVICE_PRESETS["rtx4090"], name="slow-link", host_bandwidth=2 * 10**9)
GIB = 2**30


@pytest.fixture(scope="module")
def problem():
    return build_problem(chain_trace(40, 1), SLOW_LINK)


def test_keep_all_is_the_plan_when_it_fits(problem):
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    plan = plan_activations(problem, keep)
    assert all(c.action == "keep" for c in plan.choices) and plan.status == "OPTIMAL"
    assert plan.peak_bytes == keep and plan.evaluation.overhead_us == 0
    assert plan.min_peak_status == "OPTIMAL" and plan.min_peak_bytes == milp(problem, None)


def test_below_keep_all_the_plan_is_the_fastest_that_fits(problem):
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    least = milp(problem, None)
    usable = least + (keep - least) // 3
    plan = plan_activations(problem, usable)
    assert plan.peak_bytes <= usable and plan.evaluation.valid
    # the default quantum rounds bytes up, so the plan is at most as good as the exact optimum
    assert plan.evaluation.overhead_us >= milp(problem, usable) > 0
    fields = plan_fields(plan)
    assert fields["predicted_peak_bytes"] == plan.peak_bytes
    # the copy time the lowered step exposes, at least the planner's model's (a lower bound of it)
    assert fields["recompute_us"] == plan.evaluation.recompute_us
    assert fields["exposed_transfer_us"] == lowered_exposure(problem, plan.choices) >= plan.evaluation.exposed_transfer_us
    assert plan.overhead_us == fields["recompute_us"] + fields["exposed_transfer_us"]
    assert sum(t.nbytes for t in fields["tensors"] if t.action != "keep") > 0
    assert max(fields["timeline"].planned) == plan.evaluation.peak_bytes
    assert max(fields["timeline"].keep_all) == keep


def test_where_a_plan_fits_only_with_copies_waited_after_their_last_use_it_waits_so(problem):
    """Waiting for a copy out where the model counts it freed holds the device copy longer (no stall);
    right after its last use holds less (a stall). A stand-in measure: the first holds ``extra`` bytes
    more. The fit comes first: below the smallest peak of waiting at ``ready``, the plan waits after
    the last use, says so in its decisions, and that peak is the smallest feasible budget."""
    problem = dataclasses.replace(problem, candidates=tuple(dataclasses.replace(c, ready_key=f"op#{c.index}")
                                                            for c in problem.candidates))
    extra = 4096

    def measure(p, choices):
        held = p.wait_at_ready and any(ch.action == "offload" for ch in choices)
        return evaluate(p, choices).peak_bytes + (extra if held else 0)

    least = milp(problem, None)
    lean = plan_activations(problem, least, measure=measure)
    assert not lean.problem.wait_at_ready and lean.peak_bytes <= least == lean.min_feasible_bytes
    offloaded = [t for t in plan_fields(lean)["tensors"] if t.action == "offload"]
    assert offloaded and all(t.ready is None for t in offloaded)
    roomy = plan_activations(problem, least + 2 * extra, measure=measure)
    assert roomy.problem.wait_at_ready and roomy.min_feasible_bytes == least
    waited = [(i, t) for i, t in enumerate(plan_fields(roomy)["tensors"]) if t.action == "offload"]
    assert waited and all(t.ready == f"op#{i}" for i, t in waited)


def test_a_minimum_peak_plan_whose_lowered_step_does_not_fit_is_solved_again_from_a_second_start():
    """CP-SAT ends where its warm start leads it, and its model is not the lowered step. A stand-in
    measure: the first minimum-peak plan's lowered step needs ``extra`` bytes more than modelled.
    The minimum-peak phase runs again from the residual stream's checkpoints offloaded in forward
    order; its plan fits, is kept, and its peak is the smallest feasible budget. Where that start is
    the first one (here: without a host budget, every class offloaded either way) it does not run
    again: one worker ends where it did."""
    from memopt.planner.cpsat import min_peak_start
    from memopt.planner.problem import merged
    from memopt.planner.solve import _min_peak

    problem = build_problem(chain_trace(12, 9, blocks=3), DEVICE_PRESETS["rtx4090"], allow_offload=True,
                            host_capacity=927_744)
    first = _min_peak(problem, PlannerConfig(), None).choices
    second = _min_peak(problem, PlannerConfig(), None, sources="forward").choices
    assert first != second
    extra = 2**20

    def measure(p, choices):
        return evaluate(p, choices).peak_bytes + (extra if choices == first else 0)

    usable = max(evaluate(problem, first).peak_bytes, evaluate(problem, second).peak_bytes)
    said = []
    plan = plan_activations(problem, usable, measure=measure, progress=said.append)
    assert sum("second warm start" in line for line in said) == 1
    assert plan.min_feasible_bytes == evaluate(problem, second).peak_bytes and plan.peak_bytes <= usable
    said.clear()
    unlimited = dataclasses.replace(problem, host_capacity=None)
    assert min_peak_start(merged(unlimited))[0] == min_peak_start(merged(unlimited), "forward")[0]
    first = _min_peak(unlimited, PlannerConfig(), None).choices
    with pytest.raises(InfeasibleBudgetError):
        plan_activations(unlimited, evaluate(unlimited, first).peak_bytes, measure=measure, progress=said.append)
    assert said and not any("second warm start" in line for line in said)


def test_below_the_smallest_peak_the_error_names_the_smallest_budget(problem):
    least = milp(problem, None)
    reserve = 768 * 2**20
    with pytest.raises(InfeasibleBudgetError) as info:
        plan_activations(problem, least - 1, reserve_bytes=reserve, what="the chain")
    err = info.value
    assert err.predicted_bytes == least and err.budget_bytes == least - 1
    assert err.min_budget_gb == (least + reserve) / GIB
    assert sum(err.breakdown.values()) == least
    assert "the chain does not fit" in str(err) and "dominated by" in str(err)
    # one byte apart, the same in GiB: the bytes tell them apart
    assert f"predicted peak {least / GIB:.3f} GiB ({least:,} bytes) > usable budget {(least - 1) / GIB:.3f} GiB " \
        f"({least - 1:,} bytes)" in str(err)
    # where it does not fit: the points of the smallest plan above the budget (what "auto" chunks first)
    assert err.over_points and list(err.over_points) == sorted(set(err.over_points))
    assert all(0 <= p < problem.num_points for p in err.over_points)


def test_an_optimizer_step_above_the_budget_is_named_as_what_dominates(problem):
    static = dataclasses.replace(problem.static, optimizer_step=10**9)
    heavy = dataclasses.replace(problem, static=static)
    with pytest.raises(InfeasibleBudgetError, match="optimizer step") as info:
        plan_activations(heavy, 10**8)
    assert info.value.predicted_bytes == static.optimizer_phase_peak
    assert max(info.value.breakdown, key=info.value.breakdown.get) == "temporaries"
    assert info.value.over_points == ()  # no op of the forward or backward is what does not fit


def test_the_kill_switch_keeps_everything(problem):
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    plan = plan_activations(problem, keep, PlannerConfig(enabled=False))
    assert plan.status == "DISABLED" and all(c.action == "keep" for c in plan.choices)
    with pytest.raises(InfeasibleBudgetError, match="planner switched off"):
        plan_activations(problem, keep - 1, PlannerConfig(enabled=False))


def test_planner_config_is_validated():
    with pytest.raises(TypeError, match="allow_offload must be True or False"):
        PlannerConfig(allow_offload="no")
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        PlannerConfig(time_limit_s=0)
