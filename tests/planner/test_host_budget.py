"""Host memory is a budget too: offloaded activations are all on the host at the end of the forward,
so their sum never exceeds ``host_budget_gb`` (default: this machine's RAM, stated in the plan); a
smaller host budget recomputes instead, and when nothing fits the error names the host bytes needed."""

from __future__ import annotations

import copy

import pytest

import memopt
from memopt.config import machine_ram_bytes
from tests.models import lm_batch, tiny_llama

NO_RECOMPUTE = memopt.PlannerConfig(allow_recompute=False, allow_update_in_backward=False)


@pytest.fixture(scope="module")
def offloading():
    """A budget at which the step fits only by offloading (recompute switched off), and its plan."""
    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=64)
    probe = memopt.optimize(copy.deepcopy(model), 64, batch, device="rtx4090", reserve_gb=0, planner=NO_RECOMPUTE).plan
    budget = (probe.min_budget_bytes + 0.3 * (probe.predicted_peak_bytes - probe.min_budget_bytes)) / 2**30
    plan = memopt.optimize(copy.deepcopy(model), budget, batch, device="rtx4090", reserve_gb=0,
                           planner=NO_RECOMPUTE).plan
    return model, batch, budget, plan


def test_the_default_host_budget_is_this_machines_ram_and_the_plan_says_so(offloading):
    _, _, _, plan = offloading
    offloaded = plan.bytes_by_action()["offload"]
    assert offloaded > 0 and plan.host_budget_bytes == machine_ram_bytes()
    summary = plan.summary()
    assert "offloaded of the" in summary and "host budget" in summary
    assert any("the RAM of the machine this plan was made on" in n for n in plan.notes)
    again = memopt.Plan.from_json(plan.to_json())
    assert again.host_budget_bytes == plan.host_budget_bytes
    data = plan.to_dict()
    del data["host_budget_bytes"]  # a plan file from before host budgets
    assert memopt.Plan.from_dict(data).host_budget_bytes is None


def test_a_smaller_host_budget_recomputes_instead_and_is_never_exceeded(offloading):
    model, batch, budget, plan = offloading
    host = plan.bytes_by_action()["offload"] // 2
    optimized = memopt.optimize(copy.deepcopy(model), budget, batch, device="rtx4090", reserve_gb=0,
                                host_budget_gb=host / 2**30)
    by_action = optimized.plan.bytes_by_action()
    assert 0 < by_action["offload"] <= optimized.plan.host_budget_bytes <= host and by_action["recompute"] > 0
    assert optimized.plan.fits
    none = memopt.optimize(copy.deepcopy(model), budget, batch, device="rtx4090", reserve_gb=0, host_budget_gb=0)
    assert none.plan.bytes_by_action()["offload"] == 0


def test_when_only_more_host_memory_would_fit_the_error_says_how_much(offloading):
    model, batch, budget, plan = offloading
    host = plan.bytes_by_action()["offload"] // 2
    with pytest.raises(memopt.InfeasibleBudgetError, match=r"it fits with [0-9.]+ KiB of host memory for offloaded "
                                                           r"activations \(what a plan with no host limit offloads; less "
                                                           r"may do\), above the host budget of [0-9.]+ KiB: raise "
                                                           r"host_budget_gb="):
        memopt.optimize(copy.deepcopy(model), budget, batch, device="rtx4090", reserve_gb=0,
                        host_budget_gb=host / 2**30, planner=NO_RECOMPUTE)
    with pytest.raises(ValueError, match="host_budget_gb must be a number of GiB >= 0"):
        memopt.optimize(copy.deepcopy(model), budget, batch, device="rtx4090", host_budget_gb=-1)
