"""memopt.optimize end to end for LoRA: the returned model, its plan, and every bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.passes.lora import LoraLinear
from tests.e2e._steps import assert_unchanged, measured_steady_step, snapshot
from tests.models import lm_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_mlp


@pytest.fixture(scope="module")
def llama_optimized():
    model = tiny_llama()
    batch = lm_batch(model)
    return memopt.optimize(model, budget_gb=1, example_inputs=batch, rank=4, alpha=8), batch


def test_returns_a_module_with_the_original_signature_and_outputs(llama_optimized):
    optimized, batch = llama_optimized
    reference = tiny_llama()
    assert isinstance(optimized, nn.Module) and isinstance(optimized, memopt.OptimizedModel)
    assert inspect.signature(optimized.forward) == inspect.signature(reference.forward)
    with torch.no_grad():
        ours, theirs = optimized(**batch), reference(**batch)
    assert type(ours) is type(theirs)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    assert optimized.config is optimized.model.config  # attributes reach the wrapped model


def test_plan_records_methods_and_a_peak_within_budget(llama_optimized):
    plan = llama_optimized[0].plan
    assert plan.method == "lora" and plan.capture == "export"
    assert {m.method for m in plan.modules if m.role != "lm_head"} == {"lora"}
    assert plan.module("lm_head").method == "frozen"
    assert plan.input_shapes == {"input_ids": (2, 16), "attention_mask": (2, 16), "labels": (2, 16)}
    assert 0 < plan.predicted_peak_bytes <= plan.usable_bytes == plan.budget_bytes
    assert plan.memory.peak.total == plan.predicted_peak_bytes
    text = plan.summary()
    assert "model.layers.1.mlp.down_proj" in text and "fits, headroom" in text and "optimizer" in text


def test_plan_round_trips_through_json_exactly(llama_optimized, tmp_path):
    plan = llama_optimized[0].plan
    path = plan.save(tmp_path / "plan.json")
    assert memopt.load_plan(path) == plan
    assert memopt.Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_a_plan_of_another_format_version_is_refused(llama_optimized, tmp_path):
    data = llama_optimized[0].plan.to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        memopt.Plan.from_dict(data)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a memopt plan"):
        memopt.load_plan(tmp_path / "x.json")


def test_predicted_peak_equals_the_measured_peak_of_a_real_step():
    model = tiny_gpt2()
    batch = lm_batch(model)
    del batch["attention_mask"]
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, rank=4)
    measured = measured_steady_step(optimized, batch)
    assert measured.peak_bytes == optimized.plan.predicted_peak_bytes
    assert measured.peak == optimized.plan.memory.peak


@pytest.mark.parametrize("mask", [True, False])
def test_a_batch_without_padding_is_planned_without_a_mask_exactly(mask):
    # A real Llama run sees that the mask is all ones (or absent) and makes no [B, 1, T, T] mask; the
    # plan reads the example's mask before tracing, so it counts none either: prediction = measurement.
    model = tiny_llama()
    batch = lm_batch(model)
    if not mask:
        del batch["attention_mask"]
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, rank=4)
    measured = measured_steady_step(optimized, batch)
    assert optimized.plan.unpadded_mask is mask
    assert measured.peak_bytes == optimized.plan.predicted_peak_bytes


def test_training_reduces_the_loss_and_only_adapters_change():
    model = tiny_gpt2()
    batch = lm_batch(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, rank=8, alpha=16)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = optimized(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, value in frozen.items():
        assert torch.equal(optimized.model.get_parameter(_base_name(optimized.model, name)), value)


def _base_name(model: nn.Module, name: str) -> str:
    module_name, _, leaf = name.rpartition(".")
    wrapped = model.get_submodule(module_name) if module_name else model
    return f"{module_name}.base_layer.{leaf}" if isinstance(wrapped, LoraLinear) else name


def test_merge_returns_a_plain_model_with_equal_outputs_and_original_flags():
    model = tiny_llama()
    batch = lm_batch(model)
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, rank=4)
    with torch.no_grad():
        for n, p in optimized.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        expected = optimized(**batch).logits
    plain = optimized.merge()
    assert plain is model and not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)  # fp32 reassociation
    with pytest.raises(memopt.MemoptError, match="was merged"):
        optimized(**batch)


def test_print_trainable_parameters_uses_peft_format(llama_optimized, capsys):
    optimized = llama_optimized[0]
    optimized.print_trainable_parameters()
    trainable, total = optimized.parameter_counts()
    assert trainable == optimized.plan.trainable_params and total == optimized.plan.total_params
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


@pytest.mark.parametrize("form", ["tuple", "dict", "pair"])
def test_example_inputs_may_be_args_kwargs_or_a_pair(form):
    model = tiny_mlp()
    x = torch.randn(4, 32)
    inputs = {"tuple": (x,), "dict": {"input": x}, "pair": ((x,), {})}[form]
    optimized = memopt.optimize(model, 1, inputs, rank=2, loss_fn=lambda out, _: out.square().mean())
    assert optimized.plan.input_shapes == {"input": (4, 32)}


def test_a_plain_model_without_a_loss_fn_is_told_to_pass_one():
    model = tiny_mlp()
    snap = snapshot(model)
    with pytest.raises(memopt.MemoptError, match="loss_fn"):
        memopt.optimize(model, 1, (torch.randn(4, 32),))
    assert_unchanged(model, snap)


def test_a_gpu_plan_is_made_without_a_gpu():
    model = tiny_bert_classifier()
    optimized = memopt.optimize(model, 8, lm_batch(model), device="rtx4090", rank=4)
    plan = optimized.plan
    assert plan.device.name == "rtx4090" and plan.device.kind == "cuda"
    assert plan.reserve_bytes == 768 * 2**20 and any("reserve" in note for note in plan.notes)
    assert plan.predicted_peak_bytes % 512 == 0  # every block rounded like the CUDA caching allocator


@pytest.mark.parametrize("method,options", [("lora", {"rank": 4}), ("s2ft", {"head_ratio": 0.5, "channel_ratio": 0.5})])
def test_infeasible_budget_raises_with_the_bytes_and_restores_the_model(method, options):
    model = tiny_llama()
    snap = snapshot(model)  # S²FT permutes weights in place: undo must put them back in order
    with pytest.raises(memopt.InfeasibleBudgetError) as info:
        memopt.optimize(model, 1e-4, lm_batch(model), method=method, **options)
    err = info.value
    assert err.predicted_bytes > err.budget_bytes == int(1e-4 * 2**30)
    assert sum(err.breakdown.values()) == err.predicted_bytes
    assert err.min_budget_gb == pytest.approx(err.predicted_bytes / 2**30)
    assert "smallest feasible budget" in str(err)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, b: memopt.optimize("not a model", 1, b), TypeError, "must be a torch.nn.Module"),
    (lambda m, b: memopt.optimize(m, 1, (b["input_ids"],) * 20), TypeError, "do not fit LlamaForCausalLM.forward"),
    # forward(**kwargs) accepts any name, so a misspelt one surfaces when the model runs:
    (lambda m, b: memopt.optimize(m, 1, {"input_idz": b["input_ids"]}), memopt.UnsupportedModelError, "input_ids"),
    (lambda m, b: memopt.optimize(m, 0, b), ValueError, "positive, finite"),
    (lambda m, b: memopt.optimize(m, "8", b), TypeError, "number of GiB"),
    (lambda m, b: memopt.optimize(m, 1, b, method="magic"), ValueError, "unknown method 'magic'"),
    (lambda m, b: memopt.optimize(m, 1, b, target_modules=["nope"]), ValueError, "matches no Linear-like layer"),
    (lambda m, b: memopt.optimize(m, 1, b, rank=0), ValueError, "rank must be a positive integer"),
    (lambda m, b: memopt.optimize(m, 1, b, device="tpu"), ValueError, "unknown device"),
])
def test_bad_input_is_refused_and_leaves_the_model_untouched(call, error, match):
    model = tiny_llama()
    batch = lm_batch(model)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        call(model, batch)
    assert_unchanged(model, snap)


def test_an_optimized_model_is_not_optimized_twice(llama_optimized):
    optimized, batch = llama_optimized
    with pytest.raises(TypeError, match="already optimized"):
        memopt.optimize(optimized, 1, batch)
