"""The eager lowering: a planned model computes exactly what the unplanned one does."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import memopt
from memopt.errors import PlanMismatchError
from memopt.plan import Plan, load_plan
from tests.models import lm_batch
from tests.runtime._planned import budget_between, gradients, llama, planned


@pytest.fixture(scope="module")
def planned_llama():
    model, batch = llama()
    return planned(model, batch, 0.3), batch


def test_the_plan_recomputes_and_the_returned_model_carries_it_out(planned_llama):
    optimized, _ = planned_llama
    plan = optimized.plan
    assert plan.bytes_by_action()["recompute"] > 0
    assert optimized.applied.covers(plan) and optimized.applied.lowering == "eager"
    # On this CPU, host and device are one memory: a lowered step offloads nothing (it recomputes).
    assert set(optimized.applied.actions) == {"keep", "drop", "recompute", "save"}


def test_gradients_equal_the_unplanned_model_bit_for_bit(planned_llama):
    optimized, batch = planned_llama
    inner = optimized.model  # the same rewritten module, run by autograd as it is
    loss_ref, ref = gradients(inner, inner, batch)
    for _ in range(2):  # the first call traces, the second reuses the traced step
        loss, got = gradients(optimized, inner, batch)
        assert torch.equal(loss, loss_ref)
        assert got.keys() == ref.keys() and len(ref) > 0
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
    assert len(optimized.runtime.reports) == 1
    assert optimized.runtime.reports[0].recomputed_nodes


@pytest.mark.slow  # a costly scenario: make test-all
def test_training_steps_follow_the_unplanned_trajectory_exactly():
    model, batch = llama()
    optimized = planned(model, batch, 0.2)
    ref = copy.deepcopy(optimized.model)  # the same rewritten module and adapters, run by autograd as it is
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (optimized, ref)]
    for _ in range(3):
        losses = []
        for m, opt in zip((optimized, ref), opts):
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(optimized.model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name


# make test runs S²FT here; PaCA and QLoRA exactness run there in tests/e2e (families, quantized)
@pytest.mark.parametrize("method, options", [
    pytest.param("paca", {}, id="paca", marks=pytest.mark.slow), pytest.param("s2ft", {}, id="s2ft"),
    pytest.param("lora", {"quantize": "nf4"}, id="qlora-nf4", marks=pytest.mark.slow)])
def test_every_method_runs_planned_with_the_unplanned_gradients(method, options):
    """PaCA writes into W in eager and not when traced (a graph may not); S²FT shares buffers
    between modules; QLoRA dequantizes inside its op: each runs planned, bit for bit."""
    model, batch = llama()
    optimized = planned(model, batch, 0.3, method=method, **options)
    assert optimized.plan.bytes_by_action()["recompute"] > 0
    inner = optimized.model
    loss_ref, ref = gradients(inner, inner, batch)
    loss, got = gradients(optimized, inner, batch)
    assert torch.equal(loss, loss_ref) and len(ref) > 0
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


class _DropoutMLP(nn.Module):
    """A model whose recomputation has to redraw dropout masks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.3), nn.Linear(256, 64))
                                    for _ in range(3))
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _loss(output: torch.Tensor, inputs: object) -> torch.Tensor:
    return output.pow(2).mean()


def test_recomputed_dropout_replays_its_masks_bit_for_bit():
    model, x = _DropoutMLP(), torch.randn(64, 64)
    options = dict(method="lora", device="cpu", loss_fn=_loss, target_modules=["0", "3"], rank=4,
                   planner=memopt.PlannerConfig(allow_rng_recompute=True))
    probe = memopt.optimize(copy.deepcopy(model), budget_gb=1, example_inputs=(x,), **options).plan
    budget = probe.min_budget_bytes / 2**30
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=(x,), **options)
    recomputed = [t for t in optimized.plan.tensors if t.action == "recompute"]
    assert recomputed and optimized.runtime is not None
    inner = optimized.model

    def step(run: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(1234)
        for p in inner.parameters():
            p.grad = None
        loss = _loss(run(x), None)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}

    loss_ref, ref = step(inner)
    for _ in range(2):
        loss, got = step(optimized)
        assert torch.equal(loss, loss_ref)
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
    # The recomputation re-ran a random op: what makes the equality above a test of RNG replay.
    report = optimized.runtime.reports[0]
    assert any(name.startswith("run_with_rng_state") for name in report.recomputed_nodes), report.recomputed_nodes


def test_without_grad_the_model_runs_as_it_is(planned_llama):
    optimized, batch = planned_llama
    traced = len(optimized.runtime.reports)
    with torch.no_grad():
        out = optimized(**batch)
        ref = optimized.model(**batch)
    assert torch.equal(out.logits, ref.logits)
    assert len(optimized.runtime.reports) == traced


@pytest.mark.slow  # make test: tests/e2e/test_user_loops.py's padded loader and larger batch cover it
def test_smaller_inputs_run_with_the_same_decisions_and_larger_ones_are_refused_when_asked():
    model, batch = llama()
    optimized = planned(model, batch, 0.3)
    optimized.use_plan(optimized.plan, larger_inputs="error")
    small = {k: v[:2, :16] for k, v in batch.items()}
    loss_ref, ref = gradients(optimized.model, optimized.model, small)
    loss, got = gradients(optimized, optimized.model, small)
    assert torch.equal(loss, loss_ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    large = lm_batch(optimized.model, batch=8, seq=32)
    with pytest.raises(PlanMismatchError, match=r"larger than planned: input_ids \[8, 32\] \(planned \[4, 32\]\)"):
        optimized(**large)


@pytest.mark.slow  # make test: tests/e2e/test_user_loops.py's larger-batch test covers it
def test_larger_inputs_are_replanned_when_asked():
    model, batch = llama()
    large = lm_batch(model, batch=8, seq=32)
    budget = budget_between(model, large, 0.3, device="cpu")  # the large batch needs recomputation there
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=batch, device="cpu")  # the default
    before = optimized.plan
    assert optimized.runtime is None  # the planned batch fits as it is
    loss_ref, ref = gradients(optimized.model, optimized.model, large)
    loss, got = gradients(optimized, optimized.model, large)
    assert torch.equal(loss, loss_ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    after = optimized.plan
    assert after.input_shapes["input_ids"] == (8, 32) and before.input_shapes["input_ids"] == (4, 32)
    assert after.budget_bytes == before.budget_bytes and after.fits and after.needs_runtime
    assert after.fingerprint == before.fingerprint and any(n.startswith("re-planned") for n in after.notes)
    assert optimized.runtime is not None and optimized.runtime.reports[0].recomputed_nodes


@pytest.mark.slow  # a costly scenario: make test-all
def test_a_plan_written_by_hand_is_carried_out():
    """Planning and applying are separate: recompute one tensor the planner chose to keep."""
    model, batch = llama()
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu")
    assert optimized.runtime is None  # keeping everything fits: nothing to lower
    plan = optimized.plan
    index = next(i for i, t in enumerate(plan.tensors) if t.op == "aten.silu.default")
    tensors = list(plan.tensors)
    tensors[index] = dataclasses.replace(tensors[index], action="recompute")
    optimized.use_plan(dataclasses.replace(plan, tensors=tuple(tensors)))
    loss_ref, ref = gradients(optimized.model, optimized.model, batch)
    loss, got = gradients(optimized, optimized.model, batch)
    assert torch.equal(loss, loss_ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert optimized.runtime.reports[0].recomputed_nodes == [tensors[index].name]


@pytest.mark.slow  # a costly scenario: make test-all
def test_a_plan_for_another_model_is_refused(planned_llama):
    optimized, batch = planned_llama
    other_model, other_batch = llama()
    other = memopt.optimize(other_model, budget_gb=1, example_inputs=other_batch, device="cpu", rank=4)
    with pytest.raises(PlanMismatchError, match="structural fingerprint"):
        other.use_plan(optimized.plan)
    # Without a fingerprint and keys (an upgraded v2 plan) the decisions themselves are checked, by name.
    mismatched = dataclasses.replace(optimized.plan, fingerprint=None,
                                     tensors=(dataclasses.replace(optimized.plan.tensors[0], name="no_such_node",
                                                                         action="recompute", key=None),))
    with pytest.raises(PlanMismatchError, match="no_such_node"):
        other.use_plan(mismatched)(**other_batch)


def test_the_runtime_recomputes_the_closures_the_plan_lists(planned_llama):
    """Each recomputed tensor's closure is the plan's: a step that would re-run an op no closure holds
    (here: a plan file whose closure was cut) is refused, not run at a cost the plan did not price."""
    optimized, batch = planned_llama
    plan = optimized.plan
    recomputed = [t for t in plan.tensors if t.action == "recompute"]
    op = {t.name: t.key.partition("[")[0] for t in recomputed}  # the op's key (a storage's names its output)
    assert recomputed and all(op[t.name] in t.closure for t in recomputed)
    others = {key for t in recomputed for key in t.closure if op[t.name] != key}
    target = next(t for t in recomputed if op[t.name] not in others)
    cut = dataclasses.replace(plan, tensors=tuple(dataclasses.replace(t, closure=()) if t is target else t
                                                  for t in plan.tensors))
    with pytest.raises(PlanMismatchError, match=f"re-runs {target.name} .*no closure of the plan holds"):
        optimized.use_plan(cut)(**batch)
    optimized.use_plan(plan)  # the module's other tests read this model's plan


def test_an_older_plan_format_is_upgraded_or_refused(planned_llama, tmp_path):
    optimized, batch = planned_llama
    plan = optimized.plan
    data = plan.to_dict()
    # v5: no op to wait for a copy out after (``ready``: its last forward use then)
    for tensor in data["tensors"]:
        del tensor["ready"]
    assert Plan.from_dict({**data, "version": 5}) == plan
    with pytest.raises(ValueError, match=r"plan format version 7 is not supported by this memopt \(it reads versions "
                                         r"2, 3, 4, 5, 6\)"):
        Plan.from_dict({**data, "version": 7})
    # v4: untyped details, no closures, and the runtime's state in the plan (ignored as it is read)
    for tensor in data["tensors"]:
        del tensor["closure"]
    for module in data["modules"]:
        del module["details"]["kind"]
    data.update(version=4, runtime_applies=["keep", "drop"], applied_peak_bytes=1)
    v4 = load_plan(tmp_path.joinpath("v4.json").write_text(json.dumps(data)) and tmp_path / "v4.json")
    assert v4.version == 6 and all(t.closure is None for t in v4.tensors)
    assert v4.modules == plan.modules  # each module's details read back as its method's type
    assert v4.tensors == tuple(dataclasses.replace(t, closure=None) for t in plan.tensors)
    for field in ("training", "autocast", "input_dtypes"):  # what v4 added
        del data[field]
    for tensor in data["tensors"]:
        del tensor["key"]
    data["version"] = 3
    v3 = load_plan(tmp_path.joinpath("v3.json").write_text(json.dumps(data)) and tmp_path / "v3.json")
    assert v3.version == 6 and v3.training is None and all(t.key is None for t in v3.tensors)
    assert v3.tensors == tuple(dataclasses.replace(t, key=None, closure=None) for t in plan.tensors)
    # A v3 plan's decisions are found by fx node name, and carried out all the same.
    loss_ref, ref = gradients(optimized.model, optimized.model, batch)
    optimized.use_plan(v3)
    loss, got = gradients(optimized, optimized.model, batch)
    assert torch.equal(loss, loss_ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert optimized.runtime.reports[0].recomputed_nodes
    data["version"] = 2
    del data["fingerprint"], data["recompute_flops"]
    upgraded = Plan.from_dict(data)
    assert upgraded.version == 6 and upgraded.fingerprint is None and upgraded.recompute_flops is None
    data["version"] = 1
    with pytest.raises(ValueError, match="version 1 plans hold no activation decisions"):
        Plan.from_dict(data)
