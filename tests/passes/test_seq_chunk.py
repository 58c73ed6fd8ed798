"""Sequence chunking (``chunk_sequence=N``): each position-wise MLP runs N pieces of tokens at a time
in training. Checked the way a user trains: their loop, batches of varying length, autocast, a deep
copy, save and reload — the gradients against the same model unchunked (an independent eager
reference), the peak against the plan with memopt's tracker."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import memopt
from memopt.memory.tracker import MemoryTracker
from memopt.passes import cut_ce, seq_chunk
from tests.models import lm_batch, tiny_gpt2, tiny_llama
from tests.runtime._planned import budget_between


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _close(chunked: dict, whole: dict, rtol: float) -> float:
    assert chunked.keys() == whole.keys() and chunked
    worst = max(((chunked[n] - whole[n]).abs().max() / whole[n].abs().max().clamp_min(1e-30)).item() for n in whole)
    assert worst <= rtol, worst
    return worst


def _planned(seed: int, fraction: float) -> tuple[memopt.OptimizedModel, dict, float]:
    """A tiny Llama's LoRA step with its MLPs in 4 pieces, planned ``fraction`` of the way from its smallest
    feasible budget to keeping everything (the step lowered); and its batch and budget."""
    torch.manual_seed(seed)
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=64)
    options = dict(device="cpu", method="lora", chunk_sequence=4)
    budget = budget_between(model, batch, fraction, **options)
    return memopt.optimize(model, budget_gb=budget, example_inputs=batch, **options), batch, budget


@pytest.fixture(scope="module")
def chunked():
    return _planned(0, 0.0)


def test_a_chunked_step_trains_in_the_users_loop_with_the_unchunked_gradients_inside_its_prediction(chunked):
    optimized, batch = copy.deepcopy(chunked[0]), chunked[1]  # the loop re-plans: the fixture stays as planned
    plan = optimized.plan
    assert plan.sequence_chunks == 4 and plan.needs_runtime
    assert any(n.startswith("sequence chunking: 2 MLPs run 4 pieces") for n in plan.notes)
    assert all(vars(layer.mlp)[seq_chunk._ATTR] == 4 for layer in optimized.model.model.layers)
    reference = copy.deepcopy(optimized.model)  # the same weights, every MLP whole, plain eager autograd
    seq_chunk.uninstall(reference)
    assert seq_chunk.installed(reference) is None and seq_chunk.installed(optimized.model) == 4
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-3)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
    peaks = []
    for step, seq in enumerate((64, 37, 64, 64)):  # a data loader of varying lengths (37: pieces of 9 and 10)
        b = lm_batch(optimized.model, batch=2, seq=seq)
        with MemoryTracker(optimized, opt, inputs=b) as tracker:
            loss = optimized(**b).loss
            loss.backward()
        ref_loss = reference(**b).loss
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
        _close(_grads(optimized.model), _grads(reference), rtol=1e-5)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
        peaks.append(tracker.report("cpu").peak_bytes)
    # The tracker's peak of a full-length step is the plan's prediction; the shorter one is lower.
    assert peaks[0] <= plan.predicted_peak_bytes and peaks[1] < peaks[0]
    assert optimized.replans == []  # a shorter batch runs the same traced step


def test_chunking_lowers_the_smallest_feasible_budget(chunked):
    _, batch, budget = chunked
    model = tiny_llama(num_hidden_layers=2)
    whole = budget_between(model, batch, 0.0, device="cpu", method="lora")
    assert budget < whole * 0.95  # measured: 0.958 against 1.072 MB


@pytest.mark.slow  # a costly scenario: make test-all
def test_a_steady_step_peaks_at_the_prediction():
    """The user's loop with its optimizer, real CPU tensors: the tracker's peak equals the plan's."""
    optimized, batch, _ = _planned(1, 0.3)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        with MemoryTracker(optimized, opt, inputs=batch) as tracker:
            optimized(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert tracker.report("cpu").peak_bytes == optimized.plan.predicted_peak_bytes <= optimized.plan.usable_bytes


def test_under_autocast_the_pieces_rerun_in_the_forwards_precision():
    torch.manual_seed(2)
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=32)
    optimized = memopt.optimize(model, budget_gb=64, example_inputs=batch, device="cpu", chunk_sequence=3)
    reference = copy.deepcopy(optimized.model)
    seq_chunk.uninstall(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimized(**batch).loss.backward()
        reference(**batch).loss.backward()
    _close(_grads(optimized.model), _grads(reference), rtol=2e-2)  # bf16 GEMMs on pieces vs whole


def test_a_deep_copy_is_chunked_over_its_own_modules_and_merge_leaves_a_plain_model(chunked):
    optimized, batch, _ = chunked
    clone = copy.deepcopy(optimized.model)
    mlp = clone.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp and seq_chunk.installed(clone) == 4
    plain = copy.deepcopy(optimized).merge()
    assert seq_chunk.installed(plain) is None and "forward" not in vars(plain.model.layers[0].mlp)


def test_save_and_reload_in_a_fresh_model_keeps_the_chunking(chunked, tmp_path):
    optimized, batch, _ = chunked
    optimized.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = tiny_llama(num_hidden_layers=2)
    reloaded = memopt.from_pretrained(fresh, tmp_path)
    assert reloaded.plan.sequence_chunks == 4 and seq_chunk.installed(reloaded.model) == 4
    reloaded(**batch).loss.backward()
    optimized.model.zero_grad(set_to_none=True)
    optimized(**batch).loss.backward()
    _close(_grads(reloaded.model), _grads(optimized.model), rtol=1e-6)
    assert type(optimized.plan).from_json(optimized.plan.to_json()).sequence_chunks == 4


def test_what_cannot_be_chunked_is_said():
    model = tiny_gpt2()  # GPT-2's MLP holds dropout: a re-run piece would redraw its mask
    batch = lm_batch(model, batch=2, seq=16)
    with pytest.raises(ValueError, match=r"no MLP of GPT2LMHeadModel can run in pieces.*dropout"):
        memopt.optimize(model, budget_gb=64, example_inputs=batch, device="cpu", chunk_sequence=2)
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="chunk_sequence must be a number of pieces >= 2"):
            memopt.optimize(tiny_llama(), budget_gb=64, example_inputs=lm_batch(tiny_llama()), chunk_sequence=bad)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
    with pytest.raises(ValueError, match="none found: chunking applies to position-wise MLPs"):
        memopt.optimize(encoder, budget_gb=64, example_inputs=(torch.randn(2, 8, 16),), method="full",
                        loss_fn=lambda out, inputs: out.square().mean(), chunk_sequence=2)


@pytest.mark.slow  # a costly scenario: make test-all
def test_auto_chunks_only_when_whole_mlps_do_not_fit():
    torch.manual_seed(3)
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=64)
    options = dict(device="cpu", method="lora")
    # Halfway between the smallest budget in 2 pieces (64 tokens: what "auto" makes) and with whole MLPs:
    # whole MLPs do not fit, pieces fit with room (not at their exact minimum, which a re-plan may miss).
    chunked = budget_between(model, batch, 0.0, chunk_sequence=2, **options)
    budget = (chunked + budget_between(model, batch, 0.0, **options)) / 2
    with pytest.raises(memopt.InfeasibleBudgetError):
        memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, **options)
    optimized = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence="auto",
                                **options)
    assert optimized.plan.sequence_chunks == 2 and optimized.plan.fits
    assert any("chosen (chunk_sequence='auto') because the step with whole MLPs does not fit" in n
               for n in optimized.plan.notes)
    roomy = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, chunk_sequence="auto", **options)
    assert roomy.plan.sequence_chunks is None and seq_chunk.installed(roomy.model) is None
    # Cut cross-entropy asked for: the attempt with whole MLPs leaves no fusion behind for the retry to trip on.
    fused = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence="auto",
                            cut_cross_entropy=True, **options)
    assert fused.plan.sequence_chunks == 2 and cut_ce.installed(fused.model)
    assert sum(n.startswith("cut cross-entropy: the LM head and the loss fused") for n in fused.plan.notes) == 1


def _step_us(plan: memopt.Plan) -> int:
    return plan.compute_us + plan.overhead_us


def test_auto_keeps_whole_mlps_when_they_fit_and_pieces_are_slower():
    """A step that fits with whole MLPs but recomputes: "auto" plans it in pieces too, and keeps the
    faster plan — here whole MLPs (their recomputation costs less than re-running every MLP)."""
    torch.manual_seed(3)
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=64)
    options = dict(device="cpu", method="lora")
    budget = budget_between(model, batch, 0.3, **options)
    whole = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, **options).plan
    assert whole.overhead_us > 0
    auto = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence="auto",
                           **options)
    assert auto.plan.sequence_chunks is None and seq_chunk.installed(auto.model) is None
    assert _step_us(auto.plan) == _step_us(whole)
    assert any(n.startswith("sequence chunking not applied (chunk_sequence='auto'): the step with whole MLPs is "
                            "faster") for n in auto.plan.notes)


@pytest.mark.slow  # a costly scenario (2048 tokens): make test-all
def test_auto_chunks_where_whole_mlps_fit_when_pieces_are_faster():
    """At the smallest budget whole MLPs fit, 2048 tokens: keeping attention's outputs (quadratic to
    recompute) pays once MLPs run in pieces; "auto" picks the faster plan, and says both times."""
    torch.manual_seed(3)
    model = tiny_llama(num_hidden_layers=2, intermediate_size=512, max_position_embeddings=2048)
    batch = lm_batch(model, batch=1, seq=2048)
    options = dict(device="cpu", method="lora", planner=memopt.PlannerConfig(workers=1))  # (the same plan each
    # call: "auto"'s is compared with one planned on its own)
    budget = budget_between(model, batch, 0.0, **options)
    whole = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, **options).plan
    pieces = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence=2,
                             **options).plan
    assert _step_us(pieces) < _step_us(whole)
    auto = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence="auto",
                           **options)
    assert auto.plan.sequence_chunks == 2 == seq_chunk.installed(auto.model)
    assert _step_us(auto.plan) == _step_us(pieces) and auto.plan.fits
    assert any("chosen (chunk_sequence='auto') as the faster step" in n for n in auto.plan.notes)


def test_chosen_mlps_run_in_their_own_pieces_in_the_users_loop_and_a_reload_keeps_them(tmp_path):
    """chunk_sequence={name: pieces}: only the MLPs named run in pieces (each its own count), the others
    stay whole; the user's loop (varying lengths) gets the unchunked gradients, within the prediction;
    the plan, its JSON and a reload in a fresh model keep the choice."""
    torch.manual_seed(5)
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=2, seq=64)
    chosen = {"model.layers.1.mlp": 4, "model.layers.2.mlp": 3}
    options = dict(device="cpu", method="lora", chunk_sequence=chosen)
    budget = budget_between(model, batch, 0.0, **options)
    assert budget < budget_between(model, batch, 0.0, device="cpu", method="lora")  # it lowers the minimum
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=batch, **options)
    plan = optimized.plan
    assert plan.sequence_chunks == chosen == seq_chunk.installed(optimized.model) and plan.needs_runtime
    layers = optimized.model.model.layers
    assert seq_chunk._ATTR not in vars(layers[0].mlp) and [vars(m.mlp)[seq_chunk._ATTR] for m in layers[1:]] == [4, 3]
    note = next(n for n in plan.notes if n.startswith("sequence chunking:"))
    assert note.startswith("sequence chunking: 2 of 3 MLPs (model.layers.1.mlp, model.layers.2.mlp) run in pieces "
                           "of tokens (model.layers.1.mlp: 4, model.layers.2.mlp: 3)") and "whole: model.layers.0.mlp" in note
    reference = copy.deepcopy(optimized.model)
    seq_chunk.uninstall(reference)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-3)
    for seq in (64, 41, 64):
        b = lm_batch(optimized.model, batch=2, seq=seq)
        with MemoryTracker(optimized, opt, inputs=b) as tracker:
            optimized(**b).loss.backward()
        reference.load_state_dict(optimized.model.state_dict())  # the weights the step ran with
        reference(**b).loss.backward()
        _close(_grads(optimized.model), _grads(reference), rtol=1e-5)  # measured: <= 3.5e-7
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        assert tracker.report("cpu").peak_bytes <= plan.predicted_peak_bytes
    assert type(plan).from_json(plan.to_json()).sequence_chunks == chosen
    optimized.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = memopt.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path)
    assert reloaded.plan.sequence_chunks == chosen == seq_chunk.installed(reloaded.model)
    b = lm_batch(optimized.model, batch=2, seq=64)
    reloaded(**b).loss.backward()
    optimized(**b).loss.backward()
    _close(_grads(reloaded.model), _grads(optimized.model), rtol=1e-6)


def test_a_mapping_that_names_no_chunkable_mlp_is_an_error_saying_which():
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=16)
    for bad, said in (({}, "a mapping of MLP module names"),
                      ({"model.layers.0.mlp": 1}, "maps MLP module names to a number of pieces >= 2; got "
                                                  "'model.layers.0.mlp': 1"),
                      ({"model.layers.7.mlp": 2}, "not an MLP of LlamaForCausalLM that can run in pieces of tokens "
                                                  r"\(those that can: model.layers.0.mlp, model.layers.1.mlp\)"),
                      ({"lm_head": 2}, "not an MLP of LlamaForCausalLM"), ({3: 2}, "got 3: 2")):
        with pytest.raises(ValueError, match=said):
            memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, chunk_sequence=bad)
    # More pieces than the example has tokens: empty pieces, refused with the most it takes; the model is untouched.
    untouched = copy.deepcopy(model)
    for too_many in (17, {"model.layers.1.mlp": 40}):
        with pytest.raises(ValueError, match=r"longer than the example's 16 positions: \d+ pieces? would be empty. "
                                             "Use at most 16 pieces"):
            memopt.optimize(untouched, budget_gb=64, example_inputs=batch, chunk_sequence=too_many)
    assert seq_chunk.installed(untouched) is None
    assert [n for n, _ in untouched.named_modules()] == [n for n, _ in model.named_modules()]
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"names 'transformer.h.0.mlp', which cannot run in pieces of tokens: .*dropout"):
        memopt.optimize(gpt2, budget_gb=64, example_inputs=lm_batch(gpt2, batch=2, seq=16),
                        chunk_sequence={"transformer.h.0.mlp": 2})


@pytest.mark.slow  # plans one model five times (2 of them measured ranges): make test-all
def test_auto_plans_the_mlps_at_the_peak_alone_too_and_keeps_the_faster_plan():
    """Just below the smallest budget with whole MLPs, only the last blocks' MLPs are above it (their
    backward runs with the most saved): "auto" plans the step with those alone in pieces and with
    every MLP in pieces, keeps the faster, and says both; the step trains with the whole model's
    gradients. (One solver worker: the two plans differ by about 0.2 %, and which is faster may
    change with the search.)"""
    torch.manual_seed(3)
    model = tiny_llama(num_hidden_layers=4, intermediate_size=512, max_position_embeddings=2048)
    batch = lm_batch(model, batch=1, seq=1024)
    options = dict(device="cpu", method="lora", cut_cross_entropy=False, planner=memopt.PlannerConfig(workers=1))
    budget = budget_between(model, batch, 0.0, **options) - 120e3 / 2**30  # measured: 1 or 2 of the 4 MLPs above it
    auto = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence="auto",
                           **options)
    every = memopt.optimize(copy.deepcopy(model), budget_gb=budget, example_inputs=batch, chunk_sequence=2,
                            **options).plan
    note = next(n for n in auto.plan.notes if n.startswith("sequence chunking:"))
    assert auto.plan.fits and "because the step with whole MLPs does not fit" in note
    at_peak = re.search(r"only the (\d+) at the peak: ([\d.,]+) ms|these are the MLPs at that plan's peak", note)
    assert at_peak, note  # both plans made, both said
    if isinstance(auto.plan.sequence_chunks, dict):  # those at the peak alone were faster
        assert 0 < len(auto.plan.sequence_chunks) < 4 and "model.layers.3.mlp" in auto.plan.sequence_chunks
        assert f"every MLP in pieces: {_step_us(every) / 1e3:,.1f} ms" in note
        assert _step_us(auto.plan) < _step_us(every)
    else:  # every MLP in pieces was
        assert auto.plan.sequence_chunks == 2 and _step_us(auto.plan) == _step_us(every)
        assert "every MLP in pieces is the faster step" in note and 0 < int(at_peak.group(1)) < 4
        assert float(at_peak.group(2).replace(",", "")) * 1e3 >= _step_us(every) - 50  # (ms, to 0.1)
    reference = copy.deepcopy(auto.model)
    seq_chunk.uninstall(reference)
    auto(**batch).loss.backward()
    reference(**batch).loss.backward()
    _close(_grads(auto.model), _grads(reference), rtol=1e-5)


def test_quantized_weights_scales_are_undone_once_per_chunked_call_not_per_piece():
    """QLoRA with MLPs in 4 pieces: each nf4 weight's scales are undone once in the chunked forward and
    once in its backward — as often as with whole MLPs (the traced step holds as many lookups of the
    double-quantized absmax), not once per piece; the gradients are the whole MLPs'."""
    from memopt.ir.joint import trace_joint

    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=64)
    optimized = memopt.optimize(model, budget_gb=64, example_inputs=batch, device="cpu", quantize="nf4",
                                chunk_sequence=4)
    reference = copy.deepcopy(optimized.model)
    seq_chunk.uninstall(reference)
    optimized(**batch).loss.backward()
    reference(**batch).loss.backward()
    _close(_grads(optimized.model), _grads(reference), rtol=1e-5)  # measured: 4.5e-7
    del batch["attention_mask"]
    lookups = [sum(op.target == "aten.index.Tensor" for op in trace_joint(m, batch, device="cpu").ops)
               for m in (optimized.model, reference)]
    assert lookups[0] == lookups[1] == 25  # measured (77 in the chunked step when each piece undid them)


def test_a_module_of_the_users_own_is_not_assumed_position_wise_because_of_its_name():
    class TokenMixingMLP(torch.nn.Module):  # mixes positions: chunking it would be silently wrong
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.proj(hidden - hidden.mean(dim=1, keepdim=True))

    model = torch.nn.Sequential(TokenMixingMLP())
    assert "not a transformers model's MLP" in seq_chunk.why_not(model[0])
    with pytest.raises(ValueError, match="not a transformers model's MLP"):
        memopt.optimize(model, budget_gb=64, example_inputs=(torch.randn(2, 6, 8),), method="full",
                        loss_fn=lambda out, inputs: out.square().mean(), chunk_sequence=2)


def test_what_is_not_position_wise_or_redraws_at_random_is_left_whole():
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    config = Starcoder2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, residual_dropout=0.5)
    mlp = Starcoder2ForCausalLM(config).model.layers[0].mlp  # functional dropout in its forward
    assert "forward applies dropout" in seq_chunk.why_not(mlp)
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    assert "capacity over all positions" in seq_chunk.why_not(SwitchTransformersSparseMLP.__new__(
        SwitchTransformersSparseMLP))


def test_hooks_on_a_chunked_mlp_run_once_around_the_whole_call_and_a_short_batch_still_runs():
    optimized, _, _ = _planned(4, 0.5)
    reference = copy.deepcopy(optimized.model)
    seq_chunk.uninstall(reference)
    handles = [m.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
               for m in (optimized.model, reference)]
    try:
        for seq in (64, 3):  # 3 tokens in 4 pieces: some empty
            b = lm_batch(optimized.model, batch=2, seq=seq)
            for m in (optimized.model, reference):
                m.zero_grad(set_to_none=True)
            loss = optimized(**b).loss
            loss.backward()
            reference(**b).loss.backward()
            _close(_grads(optimized.model), _grads(reference), rtol=1e-5)
        # The hook is another program (re-planned); 3 tokens in 4 pieces specialize the trace (pieces of
        # 0 and 1 token), a program the plan widened to 64 tokens does not hold: planned at its own sizes.
        assert optimized.replans == []  # the hook's op is in no recomputation: the plan holds
    finally:
        for h in handles:
            h.remove()


@pytest.mark.slow  # plans a model of its own: make test-all
def test_a_smaller_batch_whose_program_the_widened_plan_does_not_hold_is_planned_at_its_own_sizes():
    """Sizes of 0 and 1 specialize a trace (fewer tokens than pieces): when the plan re-made for the
    widest shapes still does not hold the small batch's program, it is planned at the batch's own."""
    optimized = _planned(0, 0.0)[0]  # as planned: no batch seen yet
    calls = []
    real_replan, real_install = optimized._replan, optimized._install

    def replan(plan, args, kwargs, why, widen=True):
        calls.append(widen)
        return real_replan(plan, args, kwargs, why, widen=widen)

    def refusing(inner):  # refuses every program but one planned at the call's own sizes
        def runtime(*args, **kwargs):
            if tuple(optimized.plan.input_shapes["input_ids"]) != tuple(kwargs["input_ids"].shape):
                raise memopt.PlanMismatchError("recomputing what the plan recomputes re-runs an op no closure holds")
            return inner(*args, **kwargs)
        return runtime

    def install(plan, compile):
        real_install(plan, compile)
        if optimized.runtime is not None:  # a plan keeping everything runs the model as it is
            optimized.runtime = refusing(optimized.runtime)

    optimized._replan, optimized._install = replan, install
    optimized.runtime = refusing(optimized.runtime)
    batch = lm_batch(optimized.model, batch=2, seq=3)
    optimized(**batch).loss.backward()
    assert calls == [True, False] and optimized.plan.input_shapes["input_ids"] == (2, 3)
    assert "planned at this batch's own sizes" in optimized.replans[-1]


def test_auto_on_a_model_whose_mlps_cannot_be_chunked_says_so():
    """chunk_sequence='auto' never leaves the user guessing: a MoE model's MLPs stay whole, and the
    plan's notes say that nothing ran in pieces and why."""
    from tests import families as F

    model = F.tiny_qwen2_moe()
    model.config._experts_implementation = "batched_mm"  # any dtype (grouped_mm takes bfloat16 alone)
    batch = lm_batch(model, batch=2, seq=32)
    plan = memopt.optimize(model, budget_gb=64, example_inputs=batch, chunk_sequence="auto").plan
    note = next(n for n in plan.notes if n.startswith("chunk_sequence='auto' runs no MLP in pieces"))
    assert "mixture-of-experts" in note
