"""The Plan: exact JSON round trip, a per-layer summary, honest about what is applied, and diffs."""

from __future__ import annotations

import dataclasses
import json

import pytest

import memopt
from memopt.planner.plan import PLAN_FORMAT_VERSION
from tests.models import lm_batch, tiny_llama


@pytest.fixture(scope="module")
def plans():
    model = tiny_llama()
    batch = lm_batch(model)
    roomy = memopt.optimize(model, 1, batch, rank=4).plan
    least = roomy.min_budget_bytes
    budget = (least + (roomy.predicted_peak_bytes - least) // 2) / 2**30
    tight = memopt.optimize(tiny_llama(), budget, batch, rank=4).plan
    return roomy, tight


def test_a_plan_round_trips_through_json_exactly(plans, tmp_path):
    for plan in plans:
        assert memopt.load_plan(plan.save(tmp_path / "plan.json")) == plan
        assert json.loads(plan.to_json())["version"] == PLAN_FORMAT_VERSION == 4


def test_a_roomy_budget_keeps_everything_and_says_it_is_applied(plans):
    roomy, _ = plans
    assert {t.action for t in roomy.tensors} == {"keep", "drop"} and roomy.fully_applied
    assert roomy.predicted_peak_bytes == roomy.memory.peak_bytes  # keeping everything: the simulated step itself
    assert roomy.overhead_us == 0 and roomy.solver.status == "OPTIMAL"
    assert "everything in this plan is applied" in roomy.summary()


def test_a_tight_budget_recomputes_and_the_returned_model_applies_it(plans):
    roomy, tight = plans
    assert tight.fits and tight.predicted_peak_bytes < roomy.predicted_peak_bytes
    assert tight.bytes_by_action()["recompute"] > 0 and tight.recompute_us > 0
    assert tight.fully_applied and tight.applied_peak_bytes is None and "recompute" in tight.runtime_applies
    assert "everything in this plan is applied" in tight.summary()
    # The same decisions as a dry run's prediction (what `memopt plan` prints).
    dry = dataclasses.replace(tight, runtime_applies=("keep", "drop"), applied_peak_bytes=roomy.predicted_peak_bytes)
    applied = next(line for line in dry.summary().splitlines() if line.startswith("PREDICTION ONLY"))
    assert "recompute" in applied and "memopt.optimize" in applied
    assert tight.solver.min_feasible_bytes + tight.reserve_bytes == tight.min_budget_bytes == roomy.min_budget_bytes


def test_the_summary_has_a_row_per_layer_with_bytes_by_action(plans):
    _, tight = plans
    text = tight.summary()
    assert "saved activations per layer" in text
    for header in ("layer", "kept", "recomputed", "offloaded", "overhead"):
        assert header in text
    rows = [line.split()[0] for line in text.splitlines() if line[:2] in ("- ", "0 ", "1 ")]
    assert rows[:3] == ["-", "0", "1"]
    assert "smallest feasible budget" in text and "predicted overhead" in text


def test_compare_lists_peak_time_and_changed_decisions(plans):
    roomy, tight = plans
    changed = sum(1 for a, b in zip(roomy.tensors, tight.tensors) if a.action != b.action)
    text = roomy.compare(tight)
    assert f"decisions changed: {changed} of {len(roomy.tensors)} saved tensors" in text
    assert "predicted peak:" in text and "keep -> recompute" in text
    assert "decisions changed: 0 of" in roomy.compare(roomy)


def test_an_old_plan_format_is_refused_with_the_way_out(plans):
    data = plans[0].to_dict()
    data["version"] = 1
    with pytest.raises(ValueError, match="version 1 is not supported.*re-plan"):
        memopt.Plan.from_dict(data)
