"""LoRA pass: PEFT-equal numerics, targeting, merge, and a clean undo."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from memopt.config import LoraConfig
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog
from memopt.passes.base import select_targets
from memopt.passes.lora import LoraLinear, apply_lora, merge_lora
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_mlp

# Same fp32 ops in the same order as PEFT, so agreement is to rounding of reordered sums at most.
_ATOL = 1e-6


def _lora(model, **cfg):
    batch = lm_batch(model)
    graph = build_model_graph(model, (), batch)
    log = RewriteLog(model)
    result = apply_lora(model, graph, LoraConfig(**cfg), log)
    return result, log, batch


def _randomise_lora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _copy_lora_into_peft(ours, peft_model):
    peft_params = dict(peft_model.named_parameters())
    for name, module in ours.named_modules():
        if isinstance(module, LoraLinear):
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{name}.{part}.default.weight"
                with torch.no_grad():
                    peft_params[key].copy_(getattr(module, part).weight)


def _grads(model, batch):
    model.eval()  # dropout off: the two models must see the same function
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("factory,fan_in_fan_out", [(tiny_llama, False), (tiny_gpt2, True)])
def test_outputs_and_gradients_equal_peft_for_the_same_a_and_b(factory, fan_in_fan_out):
    ours, theirs = factory(), factory()
    result, _, batch = _lora(ours, rank=4, alpha=8, target_modules="all-linear")
    targets = sorted({d.name.rpartition(".")[2] for d in result.decisions if d.method == "lora"})
    peft_model = get_peft_model(theirs, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0))
    _randomise_lora(ours)
    _copy_lora_into_peft(ours, peft_model)
    logits_ours, grads_ours = _grads(ours, batch)
    logits_peft, grads_peft = _grads(peft_model, batch)
    torch.testing.assert_close(logits_ours, logits_peft, atol=_ATOL, rtol=0)
    assert len(grads_ours) == len(grads_peft) > 0
    for name, grad in grads_ours.items():
        part = "lora_A" if ".lora_A." in name else "lora_B"
        module = name.rpartition(f".{part}.")[0]
        torch.testing.assert_close(grad, grads_peft[f"base_model.model.{module}.{part}.default.weight"],
                                   atol=_ATOL, rtol=0)


def test_only_adapter_weights_require_grad_and_outputs_are_unchanged_at_init():
    model = tiny_llama()
    batch = lm_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    result, _, _ = _lora(model, rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after), "B is zero-initialised, so the function must not change"
    assert sum(d.trainable_params for d in result.decisions) == sum(model.get_parameter(n).numel() for n in trainable)


def test_all_linear_leaves_the_lm_head_frozen_and_says_why():
    result, _, _ = _lora(tiny_llama(), rank=2)
    head = [d for d in result.decisions if d.role == "lm_head"]
    assert len(head) == 1 and head[0].method == "frozen" and "LM head" in head[0].reason
    assert {d.method for d in result.decisions if d.role != "lm_head"} == {"lora"}


@pytest.mark.parametrize("target,exclude,expected", [
    (["q_proj", "v_proj"], None, {"q_proj", "v_proj"}),
    (r".*\.mlp\.(up|down)_proj", None, {"up_proj", "down_proj"}),
    ("all-linear", ["o_proj", "gate_proj", "up_proj", "down_proj"], {"q_proj", "k_proj", "v_proj"}),
])
def test_target_modules_follow_peft_conventions(target, exclude, expected):
    model = tiny_llama()
    graph = build_model_graph(model, (), lm_batch(model))
    chosen = select_targets(graph, model, LoraConfig(target_modules=target, exclude_modules=exclude).target_modules,
                            LoraConfig(target_modules=target, exclude_modules=exclude).exclude_modules)
    assert {layer.name.rpartition(".")[2] for layer in chosen} == expected
    assert len(chosen) == 2 * len(expected)  # two decoder layers


def test_target_matching_nothing_names_the_available_layers():
    model = tiny_llama()
    graph = build_model_graph(model, (), lm_batch(model))
    with pytest.raises(ValueError, match=r"matches no Linear-like layer.*q_proj"):
        select_targets(graph, model, ("query",), None)
    with pytest.raises(ValueError, match="not Linear-like.*LlamaRMSNorm"):
        select_targets(graph, model, ("input_layernorm",), None)


def test_merge_gives_a_plain_model_with_equal_outputs():
    model = tiny_gpt2()
    _, log, batch = _lora(model, rank=4, alpha=16)
    _randomise_lora(model)
    model.eval()  # dropout off
    with torch.no_grad():
        expected = model(**batch).logits
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        merged = model(**batch).logits
    # W + s·BA in fp32 rounds differently from x·Wᵀ + s·(x·Aᵀ)·Bᵀ; 1e-5 covers that at this scale.
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_undo_restores_the_module_objects_and_flags():
    model = tiny_mlp()
    originals = dict(model.named_children())
    x = torch.randn(3, 32)
    graph = build_model_graph(model, (x,))
    log = RewriteLog(model)
    apply_lora(model, graph, LoraConfig(rank=2, target_modules="all-linear"), log)
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    log.undo()
    assert dict(model.named_children()) == originals
    assert all(p.requires_grad for p in model.parameters())


def test_seed_makes_adapter_initialisation_reproducible():
    a, b = tiny_mlp(), tiny_mlp()
    _lora_mlp = lambda m: apply_lora(m, build_model_graph(m, (torch.randn(2, 32),)),
                                     LoraConfig(rank=2, seed=7), RewriteLog(m))
    _lora_mlp(a), _lora_mlp(b)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("adapter_dtype,expected", [("float32", torch.float32), ("model", torch.bfloat16)])
def test_adapters_on_a_16_bit_model_are_fp32_as_peft_makes_them_unless_asked(adapter_dtype, expected):
    model = tiny_mlp().to(torch.bfloat16)
    apply_lora(model, build_model_graph(model, (torch.randn(2, 32, dtype=torch.bfloat16),)),
               LoraConfig(rank=2, adapter_dtype=adapter_dtype), RewriteLog(model))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {expected}
    out = model(torch.randn(2, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16  # the layer's output keeps the model's dtype


def test_a_bf16_model_equals_peft_with_its_default_fp32_adapters_bit_for_bit():
    ours, theirs = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    result, _, batch = _lora(ours, rank=4, alpha=8, target_modules="all-linear")
    targets = sorted({d.name.rpartition(".")[2] for d in result.decisions if d.method == "lora"})
    peft_model = get_peft_model(theirs, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    _randomise_lora(ours)
    _copy_lora_into_peft(ours, peft_model)
    logits_ours, grads_ours = _grads(ours, batch)
    logits_peft, grads_peft = _grads(peft_model, batch)
    assert torch.equal(logits_ours, logits_peft)
    for name, grad in grads_ours.items():
        part = "lora_A" if ".lora_A." in name else "lora_B"
        module = name.rpartition(f".{part}.")[0]
        assert torch.equal(grad, grads_peft[f"base_model.model.{module}.{part}.default.weight"]), name
