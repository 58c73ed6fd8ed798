"""The Plan: exact JSON round trip, a per-layer summary, honest about what is applied, and diffs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import memopt
from memopt.passes import LoraDetails, ModuleDetails
from memopt.plan import PLAN_FORMAT_VERSION
from memopt.plan.report import applied_lines, format_bytes
from tests.models import lm_batch, tiny_llama


@pytest.fixture(scope="module")
def optimized():
    """(the roomily planned model, the tightly planned model, their batch)."""
    model = tiny_llama()
    batch = lm_batch(model)
    roomy_model = memopt.optimize(model, 1, batch, rank=4)
    roomy = roomy_model.plan
    least = roomy.min_budget_bytes
    budget = (least + (roomy.predicted_peak_bytes - least) // 2) / 2**30
    return roomy_model, memopt.optimize(tiny_llama(), budget, batch, rank=4), batch


@pytest.fixture(scope="module")
def plans(optimized):
    roomy, tight, _ = optimized
    return roomy.plan, tight.plan


def test_a_plan_round_trips_through_json_exactly(plans, tmp_path):
    for plan in plans:
        assert memopt.load_plan(plan.save(tmp_path / "plan.json")) == plan
        assert json.loads(plan.to_json())["version"] == PLAN_FORMAT_VERSION == 6
    roomy, _ = plans
    details = {type(m.details) for m in roomy.modules if m.method == "lora"}
    assert details == {LoraDetails} and {type(m.details) for m in roomy.modules if m.method == "frozen"} == {ModuleDetails}


def test_a_roomy_budget_keeps_everything_and_says_it_is_applied(optimized):
    model = optimized[0]
    roomy = model.plan
    assert {t.action for t in roomy.tensors} == {"keep", "drop"} and model.applied.covers(roomy)
    assert model.applied.lowering == "none" and not roomy.needs_runtime
    assert roomy.predicted_peak_bytes == roomy.memory.peak_bytes == roomy.as_is_peak_bytes  # everything kept
    assert roomy.overhead_us == 0 and roomy.solver.status == "OPTIMAL"
    assert "carried out by: the model as it is" in roomy.summary()
    assert "everything in this plan is applied" in model.summary()
    assert str(roomy) == roomy.summary() and repr(roomy).startswith("Plan(model=")  # print(plan) reads as the summary


def test_a_tight_budget_recomputes_and_the_returned_model_applies_it(optimized):
    roomy, model = optimized[0].plan, optimized[1]
    tight = model.plan
    assert tight.fits and tight.predicted_peak_bytes < roomy.predicted_peak_bytes
    assert tight.bytes_by_action()["recompute"] > 0 and tight.recompute_us > 0
    assert model.applied.covers(tight) and model.applied.lowering == "eager" and "recompute" in model.applied.actions
    assert "everything in this plan is applied" in model.summary()
    # The plan itself says how it is carried out, and what the model as it is would peak at.
    lowering = next(line for line in tight.summary().splitlines() if line.startswith("carried out by"))
    assert "the lowered step" in lowering and format_bytes(tight.as_is_peak_bytes) in lowering
    assert tight.as_is_peak_bytes == roomy.predicted_peak_bytes
    # The same decisions as a dry run's prediction (what `memopt plan` prints).
    applied = next(line for line in applied_lines(tight, ("keep", "drop")) if line.startswith("PREDICTION ONLY"))
    assert "recompute" in applied and "memopt.optimize" in applied
    assert tight.solver.min_feasible_bytes + tight.reserve_bytes == tight.min_budget_bytes == roomy.min_budget_bytes


def test_the_smallest_budget_says_updates_inside_backward_may_fit_below_it():
    # At a roomy budget the smallest feasible budget is that of plans stepping the optimizer after
    # backward; asked for less, memopt.optimize plans updates inside backward, which do fit there.
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=32)
    roomy = memopt.optimize(copy.deepcopy(model), 8, batch, "full", device="cpu").plan
    said = "with the optimizer stepping after backward: below it, a plan that updates each parameter inside backward"
    assert not roomy.update_in_backward and said in roomy.summary()
    below = memopt.optimize(model, (roomy.min_budget_bytes - 4096) / 2**30, batch, "full", device="cpu").plan
    assert below.update_in_backward and below.fits and below.min_budget_bytes < roomy.min_budget_bytes
    assert said not in below.summary()
    assert said not in dataclasses.replace(roomy, optimizer="adam").summary()  # no per-parameter form


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


def _written(tmp_path, data, name="plan.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_plan_file_is_checked_field_by_field_and_errors_name_the_file_and_field(plans, tmp_path):
    from memopt.plan import PlanFileError

    tight = plans[1].to_dict()
    bad_action = json.loads(json.dumps(tight))
    bad_action["tensors"][3]["action"] = "stream"
    with pytest.raises(PlanFileError, match=r"plan\.json.*field 'tensors'\[3\].*unknown action 'stream'.*keep, drop"):
        memopt.load_plan(_written(tmp_path, bad_action))
    bad_kind = json.loads(json.dumps(tight))
    bad_kind["modules"][2]["details"]["kind"] = "stream"
    with pytest.raises(PlanFileError, match=r"field 'modules'\[2\].*unknown details kind 'stream'; the kinds are"):
        memopt.load_plan(_written(tmp_path, bad_kind))
    kept = next(i for i, t in enumerate(tight["tensors"]) if t["action"] == "keep")
    bad_closure = json.loads(json.dumps(tight))
    bad_closure["tensors"][kept]["closure"] = ["model:mm#0"]  # only a recomputed tensor has a closure
    with pytest.raises(PlanFileError, match=rf"field 'tensors'\[{kept}\].*closure of tensor .* action 'keep'"):
        memopt.load_plan(_written(tmp_path, bad_closure))
    bad_ready = json.loads(json.dumps(tight))
    bad_ready["tensors"][kept]["ready"] = "model:mm#0"  # only an offloaded tensor waits for its copy out
    with pytest.raises(PlanFileError, match=rf"field 'tensors'\[{kept}\].*ready of tensor .* action 'keep'"):
        memopt.load_plan(_written(tmp_path, bad_ready))
    negative = json.loads(json.dumps(tight))
    negative["tensors"][0]["nbytes"] = -5
    with pytest.raises(PlanFileError, match=r"field 'tensors'\[0\].*nbytes.*non-negative"):
        memopt.load_plan(_written(tmp_path, negative))
    missing = {k: v for k, v in tight.items() if k != "predicted_peak_bytes"}
    with pytest.raises(PlanFileError, match="field 'predicted_peak_bytes' is missing"):
        memopt.load_plan(_written(tmp_path, missing))
    wrong_type = {**tight, "budget_bytes": "24GB"}
    with pytest.raises(PlanFileError, match="field 'budget_bytes'.*'24GB'"):
        memopt.load_plan(_written(tmp_path, wrong_type))
    with pytest.raises(PlanFileError, match="is a directory"):
        memopt.load_plan(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"version": 4, "model": "\xe9"}')
    with pytest.raises(PlanFileError, match=r"latin1\.json.*not UTF-8"):
        memopt.load_plan(tmp_path / "latin1.json")
    (tmp_path / "nan.json").write_text(plans[1].to_json().replace('"predicted_peak_bytes": ', '"predicted_peak_bytes": NaN, "x": ', 1))
    with pytest.raises(PlanFileError, match=r"nan\.json.*field 'predicted_peak_bytes': NaN"):
        memopt.load_plan(tmp_path / "nan.json")
    no_size = json.loads(json.dumps(tight))
    del no_size["tensors"][1]["nbytes"]
    with pytest.raises(PlanFileError, match=r"field 'tensors'\[1\]: field\(s\) 'nbytes' missing"):
        memopt.load_plan(_written(tmp_path, no_size))
    named_device = {**tight, "device": "rtx4090"}
    with pytest.raises(PlanFileError, match="field 'device': expected an object with the fields of a DeviceSpec"):
        memopt.load_plan(_written(tmp_path, named_device))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PlanFileError, match="nested too deeply"):
        memopt.load_plan(tmp_path / "deep.json")
    (tmp_path / "broken.json").write_text(plans[1].to_json()[:-20])
    with pytest.raises(PlanFileError, match=r"broken\.json.*invalid JSON at line"):
        memopt.load_plan(tmp_path / "broken.json")
    assert issubclass(PlanFileError, ValueError) and memopt.PlanFileError is PlanFileError


def test_a_plan_whose_decisions_do_not_cover_the_step_is_refused_naming_what_is_missing(optimized):
    _, optimized, batch = optimized
    tight = optimized.plan
    assert tight.needs_runtime
    dropped = next(t for t in tight.tensors if t.action == "keep" and t.block == 1)
    for cut in (dataclasses.replace(tight, tensors=()),
                dataclasses.replace(tight, tensors=tuple(t for t in tight.tensors if t is not dropped))):
        with pytest.raises(memopt.PlanMismatchError, match="(saves .* which the plan has no decision on|an op no closure of the plan holds).*cut short"):
            optimized.use_plan(cut)
            optimized(**batch).loss.backward()
    optimized.use_plan(tight)  # the module's other tests read this model's plan


def test_a_plan_draws_its_timeline_peak_and_layers(plans, tmp_path):
    pytest.importorskip("matplotlib")
    tight = plans[1]
    svg = tight.draw(tmp_path / "tight.svg").read_text()
    usable = tight.usable_bytes / 2**20
    for text in ("the plan", "keep everything", f"usable budget {usable:.2f} MiB", "recompute",
                 "optimizer states", "layer (- : outside the repeated blocks)"):
        assert text in svg, text
    with pytest.raises(ValueError, match=r"is \.png or \.svg"):
        tight.draw(tmp_path / "tight.jpg")
