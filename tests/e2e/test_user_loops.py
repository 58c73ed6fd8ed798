"""The loop the user has, not the one the plan was made for: every case trains a planned model (a
budget that recomputes) the way a user's loop does, and compares the loss and every gradient with
the unplanned rewritten model run by plain autograd — bit for bit (the same aten ops in the same
order; random ops replay the same numbers)."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch

import memopt
from memopt.errors import PlanMismatchError
from memopt.memory import MemoryTracker
from tests.models import lm_batch, tiny_gpt2, tiny_llama
from tests.runtime._planned import budget_between


def _step(run, params: torch.nn.Module, batch: dict, loss_of, seed: int = 0):
    """Loss and gradients of ``loss_of(run(**batch))``, from a fixed RNG state."""
    for p in params.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = loss_of(run(**batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    for p in params.parameters():
        p.grad = None
    return loss.detach(), grads


def _assert_exact(optimized: memopt.OptimizedModel, batch: dict, loss_of=lambda out: out.loss) -> None:
    inner = optimized.model
    loss_ref, ref = _step(inner, inner, batch, loss_of)
    loss, got = _step(optimized, inner, batch, loss_of)
    assert torch.equal(loss, loss_ref)
    assert got.keys() == ref.keys() and ref
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def _planned(model: torch.nn.Module, batch: dict, fraction: float = 0.3, **options) -> memopt.OptimizedModel:
    options.setdefault("device", "cpu")
    optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, fraction, **options),
                                example_inputs=batch, **options)
    assert optimized.plan.needs_runtime and optimized.runtime is not None
    return optimized


def _steady_step(optimized: memopt.OptimizedModel, x: torch.Tensor, loss_fn):
    """MemoryTracker's report of the user's step ``loss = loss_fn(model(x))``, the loss held to the
    optimizer step, after a first step (the plan is for the steady state: optimizer states exist)."""
    opt = optimized.make_optimizer(lr=1e-3)
    for measured in (False, True):
        with MemoryTracker(optimized, opt, inputs=(x,)) if measured else contextlib.nullcontext() as tracker:
            loss = loss_fn(optimized(x))
            loss.backward()
            opt.step()
            opt.zero_grad()
    return tracker.report()


@pytest.fixture(scope="module")
def llama_plan():
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=4, seq=32)
    return _planned(model, batch), batch


def test_a_padded_loader_of_many_lengths_runs_one_trace_and_never_replans(llama_plan):
    optimized, _ = llama_plan
    traces, replans = optimized.runtime.traces_made, len(optimized.replans)
    for seq in (32, 17, 25, 9, 31, 32):  # a loader that pads each batch to its longest sequence
        _assert_exact(optimized, lm_batch(optimized.model, batch=4, seq=seq))
    _assert_exact(optimized, lm_batch(optimized.model, batch=2, seq=20))  # a smaller last batch
    assert optimized.runtime.traces_made - traces <= 1  # sizes are symbolic: one trace covers them all
    assert len(optimized.replans) == replans


@pytest.mark.slow  # a costly scenario: make test-all
def test_every_step_of_a_padded_loader_measures_inside_the_budget_with_one_trace():
    """The plan is made for the longest batch; every shorter, padded one (attention mask 0 and
    labels -100 on the padding) runs the same trace and peaks at or below the plan, measured."""
    from memopt.memory.tracker import MemoryTracker

    model = tiny_llama(num_hidden_layers=3)
    example = lm_batch(model, batch=4, seq=48)  # a batch of the user's padded loader: one row shorter
    example["attention_mask"][0, 40:] = 0
    example["labels"][0, 40:] = -100
    optimized = _planned(model, example)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad])
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for step in range(6):
        lengths = torch.randint(8, 49, (4,), generator=gen).tolist()
        batch = lm_batch(optimized.model, batch=4, seq=max(lengths))
        for row, n in enumerate(lengths):
            batch["attention_mask"][row, n:] = 0
            batch["labels"][row, n:] = -100
        with MemoryTracker(optimized, opt, inputs=batch) as tracker:  # a dispatch mode while the step traces
            optimized(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step:  # the first step makes the optimizer states the plan counts as resident
            peaks.append(tracker.report().peak_bytes)
    assert optimized.runtime.traces_made == 1 and not optimized.replans
    assert max(peaks) <= optimized.plan.predicted_peak_bytes <= optimized.plan.usable_bytes


def test_a_token_id_outside_the_vocabulary_is_named_as_the_batchs_fault():
    """A tokenizer's pad token past the embeddings fails plain PyTorch too: where it fails the
    step's first trace, the error says so and names the id, not "memopt could not lower the plan"
    (an unsupported model). (On a trace already made, the embedding's own IndexError is raised.)"""
    model = tiny_llama(num_hidden_layers=1)
    batch = lm_batch(model, batch=2, seq=16)
    optimized = _planned(model, batch)
    bad = {k: v[:, :11].clone() for k, v in batch.items()}
    bad["input_ids"][0, 3] = optimized.model.config.vocab_size
    with pytest.raises(IndexError, match=r"input_ids holds token id 96, outside LlamaForCausalLM's input embeddings "
                                         r"\(96 rows: ids 0..95\); plain PyTorch fails on it too"):
        optimized(**bad)
    bad["input_ids"][0, 3] = 0
    _assert_exact(optimized, bad)  # the model is as it was


def test_a_loss_fn_on_the_logits_that_flattens_the_labels_it_closes_over_trains_within_its_plan():
    """``loss_fn`` closing over the labels, flattened (a view of a constant outside the model, which
    the plan keeps without a key): the step without the loss runs the keyed plan (before: the plan
    counted as unkeyed, matched by node names and refused as another program), exact and measured
    to the byte of the prediction."""
    model = tiny_llama(num_hidden_layers=2)
    ids = lm_batch(model, batch=2, seq=16)["input_ids"]

    def loss_of(out, inputs=None):
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())

    optimized = _planned(model, {"input_ids": ids}, loss_fn=loss_of)
    assert any(t.key is None for t in optimized.plan.tensors)  # the flattened labels
    _assert_exact(optimized, {"input_ids": ids}, loss_of)
    opt = optimized.make_optimizer(lr=1e-3)
    loss_of(optimized(input_ids=ids)).backward()
    opt.step()
    opt.zero_grad()
    with MemoryTracker(optimized, opt, inputs={"input_ids": ids}) as tracker:
        loss_of(optimized(input_ids=ids)).backward()
        opt.step()
    assert tracker.report().peak_bytes == optimized.plan.predicted_peak_bytes


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_a_classifier_whose_loss_fn_closes_over_its_own_labels_measures_what_was_planned(fraction):
    """Labels that are not an example input, closed over by ``loss_fn``: on the device during the
    step, so the plan counts them as an input (before: left out, and the step measured their
    32 KiB over the plan at every budget that recomputes). Measured to the byte, budgets from
    the smallest feasible one to keeping everything."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    x, labels = torch.randn(4096, 64), torch.randint(0, 10, (4096,))

    def loss_fn(out, inputs=None):
        return torch.nn.functional.cross_entropy(out, labels)

    budget = budget_between(model, (x,), fraction, device="cpu", loss_fn=loss_fn)
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=(x,), device="cpu", loss_fn=loss_fn)
    assert optimized.plan.needs_runtime == (fraction < 1)
    assert optimized.plan.static.inputs == x.nbytes + labels.nbytes
    report = _steady_step(optimized, x, loss_fn)
    assert report.peak_bytes == optimized.plan.predicted_peak_bytes
    assert report.final.inputs == x.nbytes + labels.nbytes


class _MadeConstants(torch.nn.Module):
    """Makes tensors in its forward from Python numbers, as DeBERTa's attention scale does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.a(x)) / torch.sqrt(torch.tensor(256.0))
        h = torch.nn.functional.gelu(self.b(h)) * torch.tensor([0.5], dtype=torch.float64).float()
        return self.c(h)


def test_tensors_the_models_forward_makes_are_counted_where_the_lowered_step_holds_them():
    """``torch.tensor(...)`` in a forward: the lowered step holds each as a constant of its graph
    and copies it every step (before: the constants were left out of the plan, and the step
    measured their bytes over it: +36 B on DeBERTa-v2, 8 KiB in 512-byte blocks on a GPU). A
    ``loss_fn``'s own ``torch.tensor`` runs eagerly in the loop: its copy alone is counted."""
    torch.manual_seed(0)
    model, x = _MadeConstants(), torch.randn(1024, 64)

    def loss_fn(out, inputs=None):
        return out.square().mean() * torch.tensor(0.5)

    optimized = _planned(model, (x,), 0.5, loss_fn=loss_fn)
    report = _steady_step(optimized, x, loss_fn)
    assert report.peak_bytes == optimized.plan.predicted_peak_bytes
    assert report.final.inputs == x.nbytes + 4 + 8  # the forward's two constants (fp32, fp64), held


def test_every_output_keeps_its_gradient_so_a_loss_on_the_logits_is_exact(llama_plan):
    optimized, batch = llama_plan
    # the model's own loss plus a z-loss on the logits (the term a detached output would lose)
    _assert_exact(optimized, batch, lambda out: out.loss + 1e-2 * torch.logsumexp(out.logits, -1).pow(2).mean())


def test_a_call_without_labels_and_a_loss_of_the_users_own_is_exact(llama_plan, caplog):
    optimized, batch = llama_plan
    ids = batch["input_ids"]
    no_labels = {"input_ids": ids, "attention_mask": batch["attention_mask"]}

    def dpo_like(out):  # log-probabilities of the next tokens, the way DPO and custom losses use them
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        return -logp.gather(-1, ids[:, 1:, None]).mean()

    with caplog.at_level(logging.WARNING, logger="memopt"):
        _assert_exact(optimized, no_labels, dpo_like)
    assert "has no labels, which the plan was made with" in caplog.text


def test_a_call_without_labels_that_replans_still_says_its_loss_is_not_planned(caplog):
    # The re-plan for this call (a padded batch, planned without padding) is made from the call,
    # without labels: the loss the loop computes is still not in it, and that is said.
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=32)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu")
    padded = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][1, 24:] = 0
    with caplog.at_level(logging.WARNING, logger="memopt"):
        optimized(**padded).logits.float().logsumexp(-1).mean().backward()
    assert optimized.replans and "labels" not in optimized.plan.input_shapes
    assert "has no labels, which the plan was made with" in caplog.text


@pytest.mark.slow  # make test-all; CI keeps the other user-loop claims
def test_batch_one_gets_a_plan_of_its_own_and_is_exact(llama_plan):
    optimized, _ = llama_plan
    _assert_exact(optimized, lm_batch(optimized.model, batch=1, seq=24))


def test_disabling_an_adapter_runs_the_base_layers_never_a_stale_trace(llama_plan):
    optimized, batch = llama_plan
    lora = next(m for m in optimized.model.modules() if type(m).__name__ == "LoraLinear")
    with torch.no_grad():
        lora.lora_B.weight.normal_()  # a trained adapter: disabling it changes the output
    try:
        lora.enabled = False
        _assert_exact(optimized, batch)
        with torch.no_grad():
            off = optimized(**batch).logits
        lora.enabled = True
        _assert_exact(optimized, batch)
        with torch.no_grad():
            on = optimized(**batch).logits
        assert not torch.equal(on, off)
    finally:
        lora.enabled = True
        with torch.no_grad():
            lora.lora_B.weight.zero_()


@pytest.mark.slow
def test_a_model_optimized_in_eval_mode_trains_after_train_and_in_eval_mode_too():
    # Dropout 0.1 in the residual stream and embeddings: train and eval are different steps. (GPT-2's
    # attention dropout draws through SDPA's math kernel, whose traced form draws other numbers.)
    model = tiny_gpt2(n_layer=2, attn_pdrop=0.0)
    batch = lm_batch(model, batch=4, seq=32)
    model.eval()  # what from_pretrained returns
    optimized = _planned(model, batch)
    assert optimized.plan.training is True and not optimized.model.training  # planned in train mode, mode kept
    optimized.train()
    _assert_exact(optimized, batch)
    optimized.eval()  # a training step in eval mode (no dropout) is another step: re-planned, never stale
    _assert_exact(optimized, batch)
    assert optimized.plan.training is False and any("eval mode" in why for why in optimized.replans)
    optimized.train()
    _assert_exact(optimized, batch)  # back: the train-mode plan is kept, not made again
    assert sum("eval mode" in why or "train mode" in why for why in optimized.replans) == 1


@pytest.mark.slow
def test_changing_a_dropout_probability_retraces_the_step():
    model = tiny_llama(num_hidden_layers=2, attention_dropout=0.0)
    batch = lm_batch(model, batch=4, seq=32)
    optimized = _planned(model, batch, dropout=0.1, rank=4)
    _assert_exact(optimized, batch)
    traces = optimized.runtime.traces_made
    for module in optimized.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    _assert_exact(optimized, batch)
    assert optimized.runtime.traces_made > traces or optimized.replans


@pytest.mark.slow  # a costly scenario: make test-all
def test_autocast_around_the_forward_is_planned_for_and_exact():
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=4, seq=32)
    optimized = _planned(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inner = optimized.model
        loss_ref, ref = _step(inner, inner, batch, lambda out: out.loss)
        loss, got = _step(optimized, inner, batch, lambda out: out.loss)
    assert torch.equal(loss, loss_ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert optimized.plan.autocast == "bfloat16"  # re-planned for the autocast step
    assert optimized.plan.fits


def test_a_gpu_plan_run_on_the_cpu_under_cpu_autocast_is_planned_once():
    """The GPU's plan, tried on a CPU under ``torch.autocast("cpu")`` (a laptop before the cluster):
    planned under autocast, each step runs that plan (it used to record the GPU's autocast, off, and
    re-plan at every step)."""
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=2, seq=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, method="lora", device="rtx4090")
    assert optimized.plan.autocast == "bfloat16"
    opt = optimized.make_optimizer(lr=1e-3)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = optimized(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert optimized.replans == []
    optimized(**batch).loss.backward()  # without autocast: another state, planned once
    assert len(optimized.replans) == 1 and optimized.plan.autocast is None


def test_torch_compile_around_a_planned_model_trains():
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=4, seq=32)
    optimized = _planned(model, batch)
    compiled = torch.compile(optimized)  # the lowered step runs as memopt lowered it (a graph break)
    losses = []
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = compiled(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_compile_true_with_active_dropout_trains():
    model = tiny_gpt2(n_layer=2)
    batch = lm_batch(model, batch=2, seq=16)
    optimized = _planned(model, batch, compile=True)
    for _ in range(2):
        loss = optimized(**batch).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert not any(note.startswith("compile=True") for note in optimized.plan.notes)


def test_a_larger_batch_replans_by_default_and_says_so(caplog):
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=4, seq=32)
    optimized = _planned(model, batch, 0.9)
    large = lm_batch(optimized.model, batch=4, seq=48)
    peaks = []
    for _ in range(2):  # the first step re-plans: its trace on fake tensors allocates nothing real
        with caplog.at_level(logging.WARNING, logger="memopt"), MemoryTracker(optimized, inputs=large) as tracker:
            optimized(**large).loss.backward()
        peaks.append(tracker.report().peak_bytes)
        optimized.zero_grad(set_to_none=True)
    assert "re-planned in" in caplog.text and "inputs larger than planned" in caplog.text
    assert peaks[0] == peaks[1] <= optimized.plan.predicted_peak_bytes
    _assert_exact(optimized, large)
    assert optimized.plan.input_shapes["input_ids"] == (4, 48) and optimized.plan.fits
    optimized.use_plan(optimized.plan, larger_inputs="error")
    with pytest.raises(PlanMismatchError, match=r"larger than planned: input_ids \[4, 64\] \(planned \[4, 48\]\)"):
        optimized(**lm_batch(optimized.model, batch=4, seq=64))


def test_a_replan_never_switches_the_users_loop_to_updates_inside_backward():
    """A user's own optimizer steps after backward: a longer batch whose plan would fit only with
    updates inside backward is refused at the call, naming the way out, not planned so (the next
    step used to fail on "no optimizer is attached")."""
    model = tiny_llama(num_hidden_layers=2)
    batch, longer = lm_batch(model, batch=2, seq=32), lm_batch(model, batch=2, seq=40)
    held = memopt.PlannerConfig(allow_update_in_backward=False)
    budget = memopt.optimize(copy.deepcopy(model), 8, batch, "full", device="cpu", planner=held).plan.min_budget_bytes / 2**30
    assert memopt.optimize(copy.deepcopy(model), budget, longer, "full", device="cpu").plan.update_in_backward
    optimized = memopt.optimize(model, budget, batch, "full", device="cpu")
    assert not optimized.plan.update_in_backward
    opt = torch.optim.AdamW(optimized.parameters(), lr=1e-3)
    optimized(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(memopt.InfeasibleBudgetError, match=r"(?s)re-planning for this call \(inputs larger than "
                       r"planned.*plan with memopt.optimize for the widest batch.*keeps the optimizer stepping after "
                       r"backward"):
        optimized(**longer)
    assert not optimized.plan.update_in_backward and optimized.plan.input_shapes["input_ids"] == (2, 32)
    optimized(**batch).loss.backward()  # the planned batch still trains
    opt.step()


# ----------------------------------------------------------------------------- bad input


def test_an_input_of_the_wrong_dtype_or_rank_is_named(llama_plan):
    optimized, batch = llama_plan
    with pytest.raises(ValueError, match=r"input 'input_ids' is float32\[4, 32\]; the plan was made for int64"):
        optimized(**{**batch, "input_ids": batch["input_ids"].float()})
    with pytest.raises(ValueError, match=r"input 'input_ids' has shape \[128\] \(1 dimensions\); the plan was made "
                                         r"for \[4, 32\] \(2 dimensions\)"):
        optimized(**{**batch, "input_ids": batch["input_ids"].flatten()})


def test_optimize_refuses_an_empty_batch_sequences_past_the_positions_and_a_rewritten_model(llama_plan):
    model = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match="example input 'input_ids' is empty"):
        memopt.optimize(copy.deepcopy(model), 1, lm_batch(model, batch=0, seq=8), device="cpu")
    with pytest.raises(ValueError, match=r"80 tokens long, but LlamaForCausalLM's positions end at 64 "
                                         r"\(config.max_position_embeddings\)"):
        memopt.optimize(copy.deepcopy(model), 1, lm_batch(model, batch=1, seq=80), device="cpu")
    optimized, batch = llama_plan
    with pytest.raises(TypeError, match="already rewritten by memopt .*LoraLinear"):
        memopt.optimize(optimized.model, 1, batch, device="cpu")


@pytest.mark.slow  # make test-all; CI keeps the other user-loop claims
def test_a_grad_recording_call_in_eval_mode_without_labels_is_planned_for_it():
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=2, seq=16)
    optimized = _planned(model, batch)
    optimized.eval()
    out = optimized(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out.logits.float().pow(2).mean().backward()  # the user's own loss, no labels, eval mode
    assert any(p.grad is not None for p in optimized.parameters() if p.requires_grad)
    assert optimized.replans and "eval" in optimized.plan.notes[-1]


def test_a_loss_fn_with_a_data_dependent_shape_is_named_with_the_way_out():
    model = tiny_llama(num_hidden_layers=1)
    batch = lm_batch(model, batch=2, seq=16)

    def loss_fn(output, inputs):  # boolean indexing: the shape depends on the mask's values
        keep = inputs[1]["attention_mask"].bool()
        return output.logits[keep].float().logsumexp(-1).mean()

    with pytest.raises(memopt.MemoptError, match="write it with masks"):
        memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu", loss_fn=loss_fn)


def test_a_loss_fn_that_closes_over_a_parameter_leaves_no_gradient_behind_and_trains_as_plain_torch():
    """A weight penalty in ``loss_fn``: the simulated step's fake gradient landed in the real
    parameter's ``.grad`` (before: the user's first step added to a FakeTensor)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 64))
    reference, x, weight = copy.deepcopy(model), torch.randn(512, 64), model[0].weight

    def loss_fn(out, inputs=None):
        return out.square().mean() + 0.1 * weight.square().sum()

    optimized = _planned(model, (x,), method="full", loss_fn=loss_fn)
    assert all(p.grad is None for p in model.parameters())
    loss = loss_fn(optimized(x))
    ref_loss = reference(x).square().mean() + 0.1 * reference[0].weight.square().sum()
    loss.backward(), ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


class _ItemScaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h / h.abs().max().item())  # a fake-quant's scale, read as a Python number


def test_a_forward_that_reads_a_tensor_value_is_named_with_the_way_out():
    """(Before: a bare DataDependentOutputException from the fake-tensor simulation.)"""
    x = torch.randn(8, 16)
    with pytest.raises(memopt.UnsupportedModelError, match=r"_ItemScaled's training step computes a Python number "
                                                           r"or a shape from tensor values .*keep a scale a tensor"):
        memopt.optimize(_ItemScaled(), budget_gb=1, example_inputs=(x,), device="cpu", method="full",
                        loss_fn=lambda out, inputs: out.square().mean())


def test_a_models_own_loss_that_reads_the_labels_values_names_the_loss_fn_way_out_which_trains():
    """DeBERTa-v2's classification loss, without config.problem_type, picks labels by value
    (``(labels >= 0).nonzero()``): the error says it is the loss, and its way out trains as plain torch."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64, num_labels=3,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DebertaV2ForSequenceClassification(config)
    reference = copy.deepcopy(model)
    ids, labels = torch.randint(0, 96, (4, 16)), torch.tensor([0, 2, 1, 2])
    with pytest.raises(memopt.UnsupportedModelError, match=r"it computes from the labels' values.*without labels it "
                                                           r"captures \(what reads them is its own loss\).*pass "
                                                           r"loss_fn=.*config.problem_type"):
        memopt.optimize(model, budget_gb=1, example_inputs={"input_ids": ids, "labels": labels}, device="cpu")

    def loss_fn(output, inputs=None):
        return torch.nn.functional.cross_entropy(output.logits, labels)

    optimized = _planned(model, {"input_ids": ids}, method="full", loss_fn=loss_fn)
    loss, ref_loss = loss_fn(optimized(input_ids=ids)), loss_fn(reference(input_ids=ids))
    loss.backward(), ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.slow
def test_a_deep_copy_of_a_planned_model_steps_with_its_own_parameters():
    """An EMA or reference copy: ``copy.deepcopy`` of a lowered model (plan, traced step and all)."""
    from tests.runtime._planned import gradients, llama, planned

    model, batch = llama()
    optimized = planned(model, batch, 0.3)
    twin = copy.deepcopy(optimized)
    assert twin.plan.memory is optimized.plan.memory  # immutable records are shared
    loss, grads = gradients(optimized, optimized.model, batch)
    twin_loss, twin_grads = gradients(twin, twin.model, batch)
    assert torch.equal(loss, twin_loss) and all(torch.equal(grads[k], twin_grads[k]) for k in grads)
    with torch.no_grad():
        for p in twin.model.parameters():
            p.add_(0.01)
    assert not torch.equal(gradients(twin, twin.model, batch)[0], loss)
    assert torch.equal(gradients(optimized, optimized.model, batch)[0], loss)
