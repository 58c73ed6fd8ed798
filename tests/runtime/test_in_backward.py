"""Updates inside backward, planned when the gradients held for a step after the backward do not fit:
the user's loop with ``make_optimizer`` trains exactly as torch's AdamW does, no gradient outlives
the backward, the simulated lowered step stays inside the plan, and what cannot work says so."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.errors import InfeasibleBudgetError, MemoptError
from memopt.memory.simulate import simulate_step
from memopt.optim import factory
from tests.models import lm_batch, tiny_llama

GIB = 2**30


@pytest.fixture(scope="module")
def tight():
    """A full-training budget between the in-backward plan's peak and the smallest plan holding gradients."""
    batch = lm_batch(tiny_llama(), batch=2, seq=16)
    loose = memopt.optimize(tiny_llama(), 1, batch, method="full", device="cpu", reserve_gb=0)
    with pytest.raises(InfeasibleBudgetError) as info:
        memopt.optimize(tiny_llama(), 1e-6, batch, method="full", device="cpu", reserve_gb=0,
                        planner=memopt.PlannerConfig(allow_update_in_backward=False))
    holding = info.value.min_budget_bytes  # the least any plan that holds the gradients needs
    budget = holding - loose.plan.static.gradients // 2
    return budget, batch


def test_a_step_that_fits_only_with_updates_inside_backward_trains_as_torch_adamw(tight):
    budget, batch = tight
    optimized = memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", device="cpu", reserve_gb=0)
    plan = optimized.plan
    assert plan.update_in_backward and plan.static.gradients == 0 and plan.predicted_peak_bytes <= plan.usable_bytes
    assert any("updates inside backward" in note for note in plan.notes)
    assert memopt.Plan.from_json(plan.to_json()).update_in_backward
    with pytest.raises(MemoptError, match="make_optimizer"):
        optimized(**batch)  # no optimizer attached: the gradients would be held, over the plan
    opt = optimized.make_optimizer(lr=1e-2)
    reference = tiny_llama()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        loss = optimized(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in optimized.parameters())  # each freed where it was made
        opt.step()
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.equal(loss, ref_loss)
    for a, b in zip(optimized.model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_simulated_lowered_step_stays_inside_the_plan(tight):
    budget, batch = tight
    optimized = memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", device="cpu", reserve_gb=0)
    optimized.make_optimizer()
    plan = optimized.plan
    measured = simulate_step(optimized, batch, optimizer=factory("adamw"), device="cpu")
    # The simulation frees each gradient where it is made but runs no update: the plan adds one
    # update's transient to every backward point, so it may only be above the measurement.
    assert measured.peak_bytes <= plan.predicted_peak_bytes <= plan.usable_bytes
    assert measured.peak_bytes + plan.trainable_params * 4 > plan.usable_bytes  # held gradients would not fit


@pytest.mark.slow
def test_gradient_accumulation_and_global_clipping_are_refused_or_per_parameter(tight):
    budget, batch = tight
    optimized = memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", device="cpu", reserve_gb=0)
    opt = optimized.make_optimizer(lr=1e-2, max_grad_norm=1e-3)
    before = [p.detach().clone() for p in optimized.parameters()]
    optimized(**batch).loss.backward()
    opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(optimized.parameters(), before))
    assert 0 < moved <= 1e-2 * 1.01  # Adam's first step moves each weight by ~lr whatever the clipping
    optimized(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        optimized(**batch).loss.backward()  # a second backward before step()


@pytest.mark.slow
def test_an_optimizer_that_cannot_update_one_parameter_is_not_planned_inside_backward(tight):
    budget, batch = tight
    with pytest.raises(InfeasibleBudgetError):
        memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", optimizer="adam", device="cpu",
                        reserve_gb=0)


@pytest.mark.slow
def test_trainer_refuses_global_clipping_and_accumulation_for_such_a_plan(tight, tmp_path):
    transformers = pytest.importorskip("transformers")
    from memopt.integrations.hf import Trainer

    budget, batch = tight
    optimized = memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", device="cpu", reserve_gb=0)
    opt = optimized.make_optimizer(lr=1e-2)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    for args, message in (({}, "max_grad_norm=1.0 would clip nothing"),
                          ({"max_grad_norm": 0, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps")):
        training = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                                  save_strategy="no", **args)
        with pytest.raises(ValueError, match=message):
            Trainer(model=optimized, args=training, train_dataset=rows, optimizers=(opt, None)).train()


@pytest.mark.slow
def test_options_the_per_parameter_form_lacks_keep_the_plan_from_updating_inside_backward(tight):
    budget, batch = tight
    with pytest.raises(InfeasibleBudgetError):
        memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", optimizer_options={"amsgrad": False},
                        device="cpu", reserve_gb=0)


@pytest.mark.slow
def test_galore_accumulates_micro_batches_inside_backward_in_the_users_loop(tmp_path):
    """GaLore with ``accumulate=True``, planned to update inside backward: two backwards per optimizer
    step (the loop of gradient accumulation) hold no gradient, and update as the same optimizer
    handed each gradient by hand on the model as it is; HF Trainer accepts accumulation for it."""
    transformers = pytest.importorskip("transformers")
    from memopt.integrations.hf import Trainer
    from memopt.optim.lowrank import GaLoreAdamW

    batch = lm_batch(tiny_llama(), batch=2, seq=16)
    options = {"rank": 4, "accumulate": True}
    with pytest.raises(InfeasibleBudgetError) as info:
        memopt.optimize(tiny_llama(), 1e-6, batch, method="full", device="cpu", reserve_gb=0, optimizer="galore-adamw",
                        optimizer_options=options, planner=memopt.PlannerConfig(allow_update_in_backward=False))
    optimized = memopt.optimize(tiny_llama(), (info.value.min_budget_bytes - 1) / GIB, batch, method="full",
                                device="cpu", reserve_gb=0, optimizer="galore-adamw", optimizer_options=options)
    assert optimized.plan.update_in_backward and any("gradient accumulation works" in n for n in optimized.plan.notes)
    opt = optimized.make_optimizer(lr=1e-2)
    reference = tiny_llama()
    ref_opt = GaLoreAdamW(list(reference.parameters()), lr=1e-2, **options)
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    for _ in range(2):
        for half in halves:
            (optimized(**half).loss / 2).backward()
            assert all(p.grad is None for p in optimized.parameters())
            (reference(**half).loss / 2).backward()
            for p in reference.parameters():
                ref_opt.update_in_backward(p, p.grad)
                p.grad = None
        opt.step()
        ref_opt.step()
    for a, b in zip(optimized.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    training = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                              save_strategy="no", max_grad_norm=0, gradient_accumulation_steps=2,
                                              per_device_train_batch_size=1)
    Trainer(model=optimized, args=training, train_dataset=rows, optimizers=(opt, None)).train()


@pytest.mark.slow
def test_an_lr_schedule_drives_the_updates_and_a_resumed_run_continues_them(tight, tmp_path):
    """Inside backward, each update reads its group's lr when it runs: a scheduler over the returned
    optimizer sets it (a zero lr moves nothing), and a run resumed from save_pretrained plus the
    optimizer's and scheduler's state dicts makes the same updates as one that went on."""
    budget, batch = tight

    def run(model, opt, sched, steps):
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            sched.step()

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    optimized = memopt.optimize(tiny_llama(), budget / GIB, batch, method="full", device="cpu", reserve_gb=0)
    assert optimized.plan.update_in_backward
    frozen_opt = optimized.make_optimizer(lr=1e-2, weight_decay=0.0)
    before = [p.detach().clone() for p in optimized.parameters()]
    run(optimized, frozen_opt, torch.optim.lr_scheduler.LambdaLR(frozen_opt, lambda step: 0.0), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, optimized.parameters()))  # lr 0 from the schedule
    opt = optimized.make_optimizer(lr=1e-2)
    sched = schedule(opt)
    run(optimized, opt, sched, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    optimized.save_pretrained(tmp_path)
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "train_state.pt")
    run(optimized, opt, sched, 2)
    resumed = memopt.from_pretrained(tiny_llama(), tmp_path)
    assert resumed.plan.update_in_backward
    opt2 = resumed.make_optimizer(lr=1e-2)
    sched2 = schedule(opt2)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    run(resumed, opt2, sched2, 2)
    for a, b in zip(optimized.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
