"""Full-parameter training the way a user runs it: ``method="full"`` with a memory-lean optimizer, the
optimizer the plan counted built by ``make_optimizer``, a plain loop, gradient accumulation, a save
and a reload — and the plan's optimizer bytes equal to what the real optimizer holds."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.errors import InfeasibleBudgetError, MemoptError
from tests.models import lm_batch, tiny_llama


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name, options", [pytest.param("adamw", {}, marks=pytest.mark.slow),
                                           ("galore-adamw8bit", {"rank": 8}),
                                           pytest.param("apollo-mini", {}, marks=pytest.mark.slow)])
def test_full_training_counts_exactly_the_optimizer_it_builds(name, options):
    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=16)
    optimized = memopt.optimize(model, 1, batch, method="full", optimizer=name, optimizer_options=options,
                                device="cpu")
    plan = optimized.plan
    assert plan.trainable_params == plan.total_params and plan.optimizer_options == options
    opt = optimized.make_optimizer(lr=1e-2)
    losses = []
    for _ in range(4):
        loss = optimized(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert _state_bytes(opt) == plan.static.optimizer  # measured on fakes == held for real, to the byte


@pytest.mark.slow
def test_lean_optimizers_shrink_the_counted_state():
    batch = lm_batch(tiny_llama())
    states = {}
    for name in ("adamw", "adamw8bit", "galore-adamw8bit", "apollo-mini"):
        options = {"rank": 8} if name.startswith("galore") else {}
        states[name] = memopt.optimize(tiny_llama(), 1, batch, method="full", optimizer=name, optimizer_options=options,
                                       device="cpu").plan.static.optimizer
    assert states["apollo-mini"] < states["galore-adamw8bit"] < states["adamw8bit"] < states["adamw"]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch():
    batch = lm_batch(tiny_llama(), batch=4, seq=16)
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    results = []
    for micro in ([batch], halves):
        model = tiny_llama()
        optimized = memopt.optimize(model, 1, batch, method="full", optimizer="galore-adamw",
                                    optimizer_options={"rank": 4}, device="cpu")
        opt = optimized.make_optimizer(lr=1e-2)
        for part in micro:
            (optimized(**part).loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(optimized.parameters(), 0.5)  # clipping reads the accumulated gradients
        opt.step()
        results.append([p.detach().clone() for p in optimized.model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_make_optimizer_keeps_to_the_plan():
    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), method="full", optimizer="galore-adamw",
                                optimizer_options={"rank": 4}, device="cpu")
    opt = optimized.make_optimizer(lr=3e-4, weight_decay=0.01)  # arithmetic only: free
    assert type(opt).__name__ == "GaLoreAdamW" and opt.defaults["rank"] == 4 and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="rank=8 changes the memory"):
        optimized.make_optimizer(rank=8)


@pytest.mark.slow
def test_make_optimizer_on_lora_gives_adamw_over_the_adapters_only():
    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), device="cpu")
    opt = optimized.make_optimizer(lr=1e-4)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(p.numel() for p in params) == optimized.plan.trainable_params < optimized.plan.total_params


def test_bad_optimizer_choices_fail_before_the_model_is_touched(monkeypatch):
    import memopt.pipeline as pipeline

    monkeypatch.setattr(pipeline, "capture", lambda *a, **k: pytest.fail("the model was captured"))
    model = tiny_llama()
    batch = lm_batch(model)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\] for optimizer 'galore-adamw'"):
        memopt.optimize(model, 1, batch, method="full", optimizer="galore-adamw", optimizer_options={"rnak": 4})
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        memopt.optimize(model, 1, batch, method="full", optimizer="galore-adamw", optimizer_options={"rank": 0},
                        device="cpu")
    with pytest.raises(ValueError, match="stored int8 \\(quantize='int8'.*not nf4"):
        memopt.optimize(model, 1, batch, method="full", quantize="nf4", device="cpu")
    with pytest.raises(ValueError, match="trainable int8 weights are written back by memopt's own optimizers"):
        memopt.optimize(model, 1, batch, method="full", quantize="int8", optimizer="sgd", device="cpu")
    config = memopt.OptimizerConfig("apollo-mini", {"seed": 1})
    with pytest.raises(ValueError, match="matches no parameter"):
        monkeypatch.undo()
        memopt.optimize(model, 1, batch, method=memopt.FullConfig(target_modules="nothing"), optimizer=config,
                        device="cpu")
    assert all(p.requires_grad for p in model.parameters())  # restored after the failed rewrite


@pytest.mark.slow
def test_target_modules_match_module_name_suffixes_and_the_notes_say_what_trains():
    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), method=memopt.FullConfig(target_modules=["q_proj"]),
                                optimizer="sgd", device="cpu")
    trained = {n for n, p in optimized.model.named_parameters() if p.requires_grad}
    assert trained == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert any(note.startswith("backward stops at model.layers.0.self_attn.q_proj") for note in optimized.plan.notes)
    everything = memopt.optimize(tiny_llama(), 1, lm_batch(model), method="full", optimizer="sgd", device="cpu")
    notes = everything.plan.notes
    assert any(n.startswith("every parameter trains") for n in notes) and not any("backward stops" in n for n in notes)
    with pytest.raises(ValueError, match="fullmatched against parameter names"):
        memopt.optimize(tiny_llama(), 1, lm_batch(model), method="full", target_modules=r"layers\.1\.", device="cpu")


def test_a_parameter_the_model_holds_frozen_stays_frozen_and_the_notes_say_so():
    """Whisper freezes its sinusoidal position table, users freeze layers: ``method="full"`` trains
    what requires grad (before, it unfroze them and trained another model than the one given)."""
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    table = model.model.embed_tokens.weight.detach().clone()
    batch = lm_batch(model)
    optimized = memopt.optimize(model, 1, batch, method="full", optimizer="sgd", device="cpu")
    frozen = [n for n, p in optimized.model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight"]
    assert optimized.plan.trainable_params == optimized.plan.total_params - table.numel()
    assert any("1 parameter tensors the model held frozen" in n and "model.embed_tokens.weight" in n
               for n in optimized.plan.notes), optimized.plan.notes
    opt = optimized.make_optimizer(lr=1e-1)
    for _ in range(2):
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(optimized.model.model.embed_tokens.weight, table)
    with pytest.raises(ValueError, match="names only parameters .* holds frozen"):
        memopt.optimize(model, 1, batch, method="full", target_modules=["embed_tokens"], device="cpu")
    with pytest.raises(ValueError, match=r"none of LlamaForCausalLM's does: call model.requires_grad_\(True\)"):
        memopt.optimize(tiny_llama().requires_grad_(False), 1, batch, method="full", device="cpu")


def _one_step_saved_and_reloaded(model, batch: dict, optimizer: str, path):
    """``model`` trained in full for one step, saved, and rebuilt on a fresh tiny Llama."""
    optimized = memopt.optimize(model, 1, batch, method="full", optimizer=optimizer, device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    optimized(**batch).loss.backward()
    opt.step()
    optimized.save_pretrained(path)
    return optimized, memopt.from_pretrained(tiny_llama(), path)


def test_a_model_trained_with_a_frozen_part_reloads_frozen_and_checks_that_part(tmp_path):
    """The saved directory names what the model held frozen: a fresh base, not frozen, is frozen so
    again on reload; a base whose frozen part differs is refused (its values are not saved)."""
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    batch = lm_batch(model)
    optimized, reloaded = _one_step_saved_and_reloaded(model, batch, "sgd", tmp_path)
    assert [n for n, p in reloaded.model.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, optimized(**batch).logits)
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    with pytest.raises(MemoptError, match="other frozen weights .* differ from the ones the saved tensors were trained"):
        memopt.from_pretrained(other, tmp_path)
    assert all(p.requires_grad for p in other.parameters())  # the failed load put the flags back


@pytest.mark.slow
def test_make_optimizer_takes_the_planned_lr_and_a_planned_gap_may_change():
    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), method="full", optimizer="galore-adamw",
                                optimizer_options={"rank": 4, "lr": 5e-4}, device="cpu")
    assert optimized.make_optimizer().param_groups[0]["lr"] == 5e-4
    assert optimized.make_optimizer(update_proj_gap=5).defaults["update_proj_gap"] == 5  # memory-neutral


def test_a_rank_above_a_side_falls_back_with_a_note_and_a_subset_trains():
    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), method=memopt.FullConfig(target_modules=["model.layers.1"]),
                                optimizer="galore-adamw", optimizer_options={"rank": 64}, device="cpu")
    plan = optimized.plan
    trained = {n for n, p in optimized.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") for n in trained)
    # every matrix of the tiny model has a side of 64: none is projected, each says why
    assert any("projects 0 of" in note and "side not above the rank" in note for note in plan.notes), plan.notes


@pytest.mark.slow
def test_full_training_saves_and_reloads(tmp_path):
    model = tiny_llama()
    batch = lm_batch(model)
    optimized, reloaded = _one_step_saved_and_reloaded(model, batch, "apollo-mini", tmp_path)
    assert reloaded.plan.optimizer == "apollo-mini"
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, optimized(**batch).logits)


@pytest.mark.slow
def test_an_infeasible_full_plan_names_the_smallest_budget():
    model = tiny_llama()
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget|at least"):
        memopt.optimize(model, 0.0005, lm_batch(model), method="full", reserve_gb=0, device="cpu")


@pytest.mark.slow
def test_compile_with_updates_inside_backward_is_refused_with_the_way_out():
    import dataclasses

    from memopt.errors import MemoptError

    model = tiny_llama()
    optimized = memopt.optimize(model, 1, lm_batch(model), method="full", device="cpu")
    in_backward = dataclasses.replace(optimized.plan, update_in_backward=True)
    with pytest.raises(MemoptError, match="compile=False"):
        optimized.use_plan(in_backward, compile=True)


def test_trainable_int8_weights_are_counted_as_int8_trained_in_the_users_loop_and_reload(tmp_path):
    """``method="full", quantize="int8"``: the plan counts the int8 codes and scales to the byte (the
    handles hold nothing), ``make_optimizer`` trains them in a plain loop, and a save / reload and a
    merge give the same model."""
    from memopt.passes import Int8TrainLinear

    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=16)
    optimized = memopt.optimize(model, 1, batch, method="full", quantize="int8", optimizer="galore-adamw8bit",
                                optimizer_options={"rank": 4}, device="cpu")
    plan = optimized.plan
    layers = [m for m in optimized.model.modules() if isinstance(m, Int8TrainLinear)]
    int8 = [m for m in plan.modules if m.method == "full+int8"]
    assert len(layers) == len(int8) > 0 and plan.trainable_params == plan.total_params
    stored = sum(m.qweight.numel() + 4 * m.qscales.numel() for m in layers)
    assert sum(m.details["bytes"] for m in int8) == stored
    params = dict(optimized.model.named_parameters())
    handles = {f"{n}.weight" for n, m in optimized.model.named_modules() if isinstance(m, Int8TrainLinear)}
    dense = sum(p.numel() * p.element_size() for n, p in params.items() if n not in handles)
    held = sum(params[n].untyped_storage().nbytes() for n in handles)  # one element each
    assert held == 4 * len(handles) and plan.static.parameters == dense + held and plan.static.buffers >= stored
    opt = optimized.make_optimizer(lr=1e-2)
    before = [m.qweight.clone() for m in layers]
    losses = []
    for _ in range(4):
        loss = optimized(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(not torch.equal(a, m.qweight) for a, m in zip(before, layers))
    with pytest.raises(RuntimeError):  # a torch optimizer cannot write into the memory-free handle
        layer = layers[0]
        layer.weight.grad = torch.ones(layer.weight.shape)
        torch.optim.SGD([layer.weight], lr=0.1).step()
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        logits = optimized(**batch).logits
        assert torch.equal(reloaded(**batch).logits, logits)
        merged = optimized.merge(inplace=False)
        assert not any(isinstance(m, Int8TrainLinear) for m in merged.modules())
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trainable_int8_weights_updated_inside_a_lowered_backward_train_as_the_model_as_it_is():
    """A budget that fits only with updates inside backward and recomputation: the lowered step hands
    each int8 weight's gradient to the optimizer inside its backward graph, and trains bit for bit
    as the model as it is (its hooks) does."""
    from memopt.passes import Int8TrainLinear

    batch = lm_batch(tiny_llama(), batch=2, seq=16)
    kw = dict(method="full", quantize="int8", optimizer="adamw", device="cpu", reserve_gb=0)
    with pytest.raises(InfeasibleBudgetError) as info:
        memopt.optimize(tiny_llama(), 1e-6, batch, planner=memopt.PlannerConfig(allow_update_in_backward=False), **kw)
    as_is = memopt.optimize(tiny_llama(), (info.value.min_budget_bytes - 1) / 2**30, batch, **kw)
    assert as_is.plan.update_in_backward and not as_is.plan.needs_runtime
    low = as_is.plan.min_budget_bytes
    lowered = memopt.optimize(tiny_llama(), (low + (as_is.plan.predicted_peak_bytes - low) // 3) / 2**30, batch, **kw)
    assert lowered.plan.update_in_backward and lowered.plan.bytes_by_action()["recompute"] > 0
    assert lowered.applied.lowering == "eager"
    opts = [as_is.make_optimizer(lr=1e-2), lowered.make_optimizer(lr=1e-2)]
    for _ in range(3):
        losses = []
        for model, opt in zip((as_is, lowered), opts):
            loss = model(**batch).loss
            loss.backward()
            assert all(p.grad is None for p in model.parameters())
            opt.step()
            losses.append(loss)
        assert torch.equal(*losses)
    codes = [[m.qweight for m in model.model.modules() if isinstance(m, Int8TrainLinear)] for model in (as_is, lowered)]
    assert all(torch.equal(a, b) for a, b in zip(*codes))


@pytest.mark.slow
def test_quantize_auto_for_full_training_stores_int8_weights_only_when_needed():
    batch = lm_batch(tiny_llama(), batch=2, seq=16)
    kw = dict(method="full", quantize="auto", optimizer="galore-adamw8bit", optimizer_options={"rank": 4},
              device="cpu", reserve_gb=0)
    roomy = memopt.optimize(tiny_llama(), 1, batch, **kw)
    assert {m.method for m in roomy.plan.modules} == {"full"}
    with pytest.raises(InfeasibleBudgetError) as info:
        memopt.optimize(tiny_llama(), 1e-6, batch, **{**kw, "quantize": None})
    tight = memopt.optimize(tiny_llama(), (info.value.min_budget_bytes - 1) / 2**30, batch, **kw)
    assert "full+int8" in {m.method for m in tight.plan.modules}
    assert any("quantize='auto' chose int8" in note for note in tight.plan.notes)
