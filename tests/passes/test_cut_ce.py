"""Cut cross-entropy on HF causal LMs, used as a user would: memopt.optimize at a budget where the
logits do not fit, the user's loop (``out.loss.backward()``, varying lengths, HF Trainer's
``num_items_in_batch``, evaluation), against the same model unfused (an independent reference)."""

from __future__ import annotations

import copy

import pytest
import torch

import memopt
from memopt.errors import MemoptError
from memopt.memory.simulate import simulate_step
from memopt.optim import factory as optim_factory
from memopt.passes import cut_ce
from tests.models import lm_batch, tiny_llama

GIB = 2**30


def _model(**overrides):
    # A large vocabulary against a small body: the logits dominate the step, as at long context.
    return tiny_llama(vocab_size=4096, num_hidden_layers=2, **overrides)


def _optimized(model, batch, cut="auto", budget=None, method="lora", **options):
    if budget is None:  # halfway between the fused step's smallest feasible peak and the unfused one's
        lows = [memopt.optimize(copy.deepcopy(model), 8, batch, method, cut_cross_entropy=fused,
                                **options).plan.min_budget_bytes for fused in (True, False)]
        assert lows[0] < lows[1]
        budget = sum(lows) / 2 / GIB
    return memopt.optimize(model, budget, batch, method, cut_cross_entropy=cut, **options)


def _step(run, params, batch):
    for p in params.parameters():
        p.grad = None
    out = run(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def _assert_same_step(got, want, rtol=1e-5):
    (out, grads), (ref, ref_grads) = got, want
    torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=rtol * ref_grads[name].abs().max())


def test_auto_fuses_where_the_logits_do_not_fit_and_the_step_equals_the_unfused_one():
    model = _model()
    batch = lm_batch(model, batch=2, seq=64)
    batch["labels"][0, :7] = -100  # a prompt the loss ignores
    reference = copy.deepcopy(model)
    optimized = _optimized(model, batch)
    assert cut_ce.installed(optimized.model)
    assert any(n.startswith("cut cross-entropy: the LM head and the loss fused") for n in optimized.plan.notes)
    assert optimized.plan.fits
    # The reference: the same rewritten model (LoRA's layers) with HF's own head and loss, run plainly.
    unfused = copy.deepcopy(optimized.model)
    cut_ce.uninstall(unfused)
    assert not cut_ce.installed(unfused)
    got, want = _step(optimized, optimized.model, batch), _step(unfused, unfused, batch)
    assert isinstance(want[0].logits, torch.Tensor)
    _assert_same_step(got, want)
    assert any("lora_B" in n for n in got[1])
    torch.testing.assert_close(got[0].loss, reference(**batch).loss, rtol=1e-5, atol=0)  # B = 0: the base model


def test_full_training_gradients_equal_the_unfused_models():
    model = _model()
    batch = lm_batch(model, batch=2, seq=48)
    reference = copy.deepcopy(model)
    optimized = _optimized(model, batch, method="full")
    assert cut_ce.installed(optimized.model)
    _assert_same_step(_step(optimized, optimized.model, batch), _step(reference, reference, batch), rtol=1e-4)


@pytest.mark.parametrize("lowered", [False, True])
def test_the_logits_a_fused_step_did_not_make_say_how_to_get_them(lowered):
    model = _model()
    batch = lm_batch(model, batch=2, seq=32)
    tight = 1.01 * memopt.optimize(copy.deepcopy(model), 8, batch, cut_cross_entropy=True).plan.min_budget_bytes / GIB
    optimized = _optimized(model, batch, cut=True, budget=tight if lowered else 8)
    assert (optimized.runtime is not None) == lowered  # the planned step (traced) or the model as it is
    out = optimized(**batch)
    with pytest.raises(MemoptError, match="cut_cross_entropy=False"):
        out.logits.argmax(-1)
    for read in (lambda: out["logits"].shape, lambda: out[1].shape, lambda: out.to_tuple()[1].shape):
        with pytest.raises(MemoptError, match="cut_cross_entropy=False"):  # never the head's input in their place
            read()
    assert not hasattr(out.logits, "shape")
    assert out.loss.requires_grad
    bare = optimized.model(**batch)  # the HF model inside, called directly
    with pytest.raises(MemoptError, match="cut_cross_entropy=False"):
        bare[1].shape
    with pytest.raises(MemoptError, match="return_dict=True"):
        optimized(**batch, return_dict=False)
    with pytest.raises(RuntimeError, match="outside"):  # a step that fails leaves the head as it is
        optimized(**{**batch, "labels": batch["labels"] + 4096})
    assert optimized.model.lm_head(torch.zeros(1, 64)).shape == (1, 4096)
    with torch.no_grad():  # evaluation returns the logits as usual
        assert optimized(**batch).logits.shape == (2, 32, 4096)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert optimized(**no_labels).logits.shape == (2, 32, 4096)  # a loss computed by the user from the logits


def test_a_varying_length_loader_trains_with_the_unfused_numbers():
    model = _model()
    reference = copy.deepcopy(model)
    optimized = _optimized(model, lm_batch(model, batch=2, seq=64), method="full")
    assert cut_ce.installed(optimized.model)
    for seq in (64, 37, 80):  # shorter, and one longer than planned (re-planned)
        batch = lm_batch(model, batch=2, seq=seq)
        _assert_same_step(_step(optimized, optimized.model, batch), _step(reference, reference, batch), rtol=1e-4)


def test_hf_trainers_token_count_and_autocast_are_honoured():
    model = _model()
    batch = lm_batch(model, batch=2, seq=32)
    reference = copy.deepcopy(model)
    optimized = _optimized(model, batch, cut=True, budget=8, method="full")
    count = torch.tensor(40)  # Trainer passes the tokens of the whole accumulated batch
    _assert_same_step(_step(optimized, optimized.model, {**batch, "num_items_in_batch": count}),
                      _step(reference, reference, {**batch, "num_items_in_batch": count}), rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _step(optimized, optimized.model, batch)
        want = _step(reference, reference, batch)
    _assert_same_step(got, want, rtol=3e-2)


def test_not_applied_where_the_loop_needs_the_logits_and_the_plan_says_why():
    model = _model()
    batch = lm_batch(model, batch=2, seq=32)

    def loss_fn(output, inputs):
        return torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1), inputs[1]["labels"][:, 1:].flatten())

    optimized = memopt.optimize(copy.deepcopy(model), 8, batch, loss_fn=loss_fn)
    assert not cut_ce.installed(optimized.model)
    assert any("cut cross-entropy not applied: a loss_fn" in n for n in optimized.plan.notes)
    with pytest.raises(ValueError, match="cut_cross_entropy=True cannot apply.*loss_fn"):
        memopt.optimize(copy.deepcopy(model), 8, batch, loss_fn=loss_fn, cut_cross_entropy=True)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        memopt.optimize(copy.deepcopy(model), 8, batch, cut_cross_entropy="yes")
    roomy = memopt.optimize(copy.deepcopy(model), 8, batch)  # fits as it is: the logits are kept
    assert not cut_ce.installed(roomy.model) and any("not needed" in n for n in roomy.plan.notes)


def test_models_whose_logits_change_before_the_loss_are_left_alone():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    reason = cut_ce.why_not(model, labels=True, loss_fn=False)
    assert reason is not None and "soft-capping" in reason


def test_measured_peak_of_the_fused_step_is_the_plans_and_below_the_unfused_minimum():
    """memopt's tracker on the simulated step (fake CPU tensors): the fused step peaks where its plan says,
    below the smallest peak any plan of the unfused step reaches."""
    model = _model()
    batch = lm_batch(model, batch=2, seq=64)
    unfused = memopt.optimize(copy.deepcopy(model), 8, batch, "full", cut_cross_entropy=False).plan
    optimized = _optimized(model, batch, method="full")
    assert cut_ce.installed(optimized.model)
    measured = simulate_step(optimized, batch, optimizer=optim_factory("adamw"), device="cpu").peak_bytes
    print(f"unfused smallest peak {unfused.min_budget_bytes:,}; fused predicted "
          f"{optimized.plan.predicted_peak_bytes:,}, measured {measured:,}")
    assert measured == optimized.plan.predicted_peak_bytes <= optimized.plan.usable_bytes
    assert measured < unfused.min_budget_bytes


def test_save_and_reload_see_the_models_own_parameters(tmp_path):
    model = _model()
    batch = lm_batch(model, batch=2, seq=32)
    optimized = _optimized(model, batch, cut=True, budget=8)
    keys = set(optimized.model.state_dict())
    assert "lm_head.weight" in keys and not any("_memopt" in k for k in keys)
    optimized.save_pretrained(tmp_path)
    fresh = _model()
    reloaded = memopt.from_pretrained(fresh, tmp_path, budget_gb=8, example_inputs=batch)
    torch.testing.assert_close(reloaded(**batch).loss, optimized(**batch).loss)


def test_a_plan_is_used_only_on_a_model_fused_as_it_was_and_a_failed_replan_keeps_its_pieces():
    """``use_plan`` of a fused plan on an unfused model (or the other way round) is refused: its step
    makes other tensors than the plan counts (it used to run at 2.2x the predicted peak). A re-plan
    that does not fit leaves the tokens cut as the plan in use says."""
    model = _model()
    batch = lm_batch(model, batch=2, seq=64)
    fused = memopt.optimize(copy.deepcopy(model), 8, batch, "lora", cut_cross_entropy=True)
    plain = memopt.optimize(copy.deepcopy(model), 8, batch, "lora", cut_cross_entropy=False)
    with pytest.raises(memopt.PlanMismatchError, match="the plan fuses the LM head and the loss.*this model does not"):
        plain.use_plan(fused.plan)
    with pytest.raises(memopt.PlanMismatchError, match="does not fuse the LM head and the loss.*this model does"):
        fused.use_plan(plain.plan)
    # A vocabulary wide enough that 2 x 1024 tokens are cut into more pieces than 2 x 64.
    wide = tiny_llama(vocab_size=131072, num_hidden_layers=1)
    small, large = lm_batch(wide, batch=2, seq=64), lm_batch(wide, batch=2, seq=1024)
    roomy = memopt.optimize(copy.deepcopy(wide), 8, small, "lora", cut_cross_entropy=True)
    assert roomy.plan.cut_cross_entropy == cut_ce.pieces(roomy.model) == 8
    roomy(**large)
    assert roomy.plan.cut_cross_entropy == cut_ce.pieces(roomy.model) == 16  # re-planned for the larger batch
    tight = memopt.optimize(wide, _smallest(wide, small), small, "lora",
                            cut_cross_entropy=True)
    with pytest.raises(memopt.InfeasibleBudgetError, match="re-planning for this call"):
        tight(**large)
    assert cut_ce.pieces(tight.model) == 8 == tight.plan.cut_cross_entropy


def _smallest(model, batch):
    return memopt.optimize(copy.deepcopy(model), 8, batch, "lora", cut_cross_entropy=True).plan.min_budget_bytes / GIB
