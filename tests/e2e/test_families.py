"""Model families beyond Llama, each with each method, at a budget that recomputes: optimize, then
one training step against the unplanned rewritten model. A representative subset runs in ``make
test``; ``make test-all`` runs the whole table."""

from __future__ import annotations

import copy

import pytest
import torch

import memopt
from tests import families as F
from tests.models import lm_batch, tiny_llama, tiny_qwen2

GIB = 2**30

_BUILD = {"qwen2-gqa": tiny_qwen2, "llama-bf16": lambda: tiny_llama().to(torch.bfloat16), "t5": F.tiny_t5, "bart": F.tiny_bart, "mixtral": F.tiny_mixtral, "qwen2-moe": F.tiny_qwen2_moe,
          "olmoe": F.tiny_olmoe, "falcon": F.tiny_falcon, "torch-encoder": F.TorchEncoderLM, "bloom": F.tiny_bloom,
          "gpt-neox": F.tiny_gpt_neox, "opt": F.tiny_opt, "phi3": F.tiny_phi3, "bert-classifier": F.tiny_bert_classifier}
_FAST = {("mixtral", "lora"), ("torch-encoder", "lora"), ("falcon", "paca"), ("qwen2-gqa", "rso"),
         ("bert-classifier", "lora")}  # the rest (T5 too): make test-all


def _batch(family: str, model: torch.nn.Module) -> dict:
    if family in ("t5", "bart"):
        return F.seq2seq_batch(model)
    if family == "bert-classifier":
        return F.classifier_batch()
    if family == "torch-encoder":
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "labels": ids.clone()}
    return lm_batch(model, batch=2, seq=16)


def _options(family: str, method: str) -> dict:
    """The method's options at these tiny widths (64): RandLoRA's and RSO's default ranks are above them."""
    if method == "lisa":
        return {"active_layers": 1}
    if method not in ("randlora", "rso"):
        return {}
    exclude = {"qwen2-moe": ["shared_expert_gate"], "bert-classifier": ["classifier"]}.get(family) \
        if method == "randlora" else None  # one output; three
    return {"rank": 8, "exclude_modules": exclude}


def _loss(out) -> torch.Tensor:
    return out["loss"] if isinstance(out, dict) else out.loss


def _cases():
    for family in _BUILD:
        for method in ("lora", "paca", "s2ft", "randlora", "rso", "lisa"):
            marks = () if (family, method) in _FAST else (pytest.mark.slow,)
            yield pytest.param(family, method, id=f"{family}-{method}", marks=marks)


@pytest.mark.parametrize("family, method", list(_cases()))
def test_the_family_plans_lowers_and_trains_with_the_unplanned_gradients(family, method):
    model = _BUILD[family]()
    batch = _batch(family, model)
    options = _options(family, method)
    probe = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, method=method, device="cpu",
                            **options).plan
    budget = probe.min_budget_bytes + 0.3 * (probe.predicted_peak_bytes + probe.reserve_bytes - probe.min_budget_bytes)
    optimized = memopt.optimize(model, budget_gb=budget / GIB, example_inputs=batch, method=method, device="cpu",
                                **options)
    # LISA's minimum is often the embeddings' and head's optimizer step, which no activation plan lowers
    assert optimized.plan.fits and (optimized.plan.needs_runtime or method == "lisa")
    inner = optimized.model

    def step(run):
        for p in inner.parameters():
            p.grad = None
        loss = _loss(run(**batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}

    loss_ref, ref = step(inner)
    loss, got = step(optimized)
    assert torch.equal(loss, loss_ref) and got.keys() == ref.keys() and ref
    for name in ref:
        if family in ("t5", "bart"):
            # An encoder output feeds every decoder layer: the traced backward sums those gradients
            # in another order than autograd's engine does (a few ulps).
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6 * ref[name].abs().max().item())
        else:
            assert torch.equal(got[name], ref[name]), name


def test_moe_routers_and_experts_are_left_alone_with_a_note():
    model = F.tiny_mixtral()
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=lm_batch(model, batch=2, seq=16), device="cpu")
    adapted = {d.name for d in optimized.plan.modules if d.method == "lora"}
    assert adapted and not any(".mlp." in name for name in adapted)  # attention projections only
    notes = "\n".join(optimized.plan.notes)
    assert "model.layers.0.mlp.gate (MixtralTopKRouter) left alone" in notes
    assert "model.layers.0.mlp.experts (MixtralExperts) left alone: its weights (gate_up_proj, down_proj) are 3-D" in notes


def test_a_custom_module_owning_a_weight_is_left_alone_and_keeps_its_function():
    model = F.CustomLinearish()
    x = torch.randn(4, 64)
    before = model(x).detach()
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=(x,), method="paca", rank=4, device="cpu",
                                loss_fn=lambda out, _: out.pow(2).mean())
    assert {d.name for d in optimized.plan.modules if d.method == "paca"} == {"up", "down"}
    assert any(n.startswith("custom (_Scaled) left alone") for n in optimized.plan.notes)
    torch.testing.assert_close(optimized(x), before, rtol=1e-6, atol=1e-6)  # PaCA's P round trip: ulps


def test_torchs_fused_encoder_path_never_bypasses_an_adapter():
    model = F.TorchEncoderLM()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    optimized = memopt.optimize(model, budget_gb=1, example_inputs={"input_ids": ids, "labels": ids}, device="cpu")
    for module in optimized.model.modules():
        if type(module).__name__ == "LoraLinear":
            with torch.no_grad():
                module.lora_B.weight.normal_()  # a trained adapter
    optimized.eval()
    with torch.no_grad():
        out = optimized(input_ids=ids)["logits"]
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = optimized(input_ids=ids)["logits"]
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
        for module in optimized.model.modules():
            if type(module).__name__ == "LoraLinear":
                module.enabled = False
        base = optimized(input_ids=ids)["logits"]
    # The attention block may still take its own fused kernel (a few ulps); the adapters always count.
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-5)
    assert (out - base).abs().max() > 100 * (out - unfused).abs().max()
    assert any("out_proj (NonDynamicallyQuantizableLinear) left alone" in n for n in optimized.plan.notes)


def test_moe_experts_that_take_only_bfloat16_say_so_and_plan_in_bfloat16():
    """transformers' default MoE experts (``torch._grouped_mm``) take only bfloat16 on CUDA: an fp32
    model planned for a GPU fails on both of the simulation's branches, and the error names the first
    failure and the ways out (not the second branch's unrelated one)."""
    model = F.tiny_qwen2_moe()
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        pytest.skip("this transformers runs MoE experts without torch._grouped_mm")
    batch = lm_batch(model, batch=2, seq=32)
    with pytest.raises(memopt.UnsupportedModelError, match=r"(?s)BF16.*load the model in bfloat16.*batched_mm"):
        memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, device="cuda", method="full")
    plan = memopt.optimize(model.to(torch.bfloat16), budget_gb=64, example_inputs=batch, device="cuda",
                           method="full").plan
    assert plan.predicted_peak_bytes > 0


@pytest.mark.slow  # a costly scenario: make test-all
def test_clip_trains_in_full_with_plain_torchs_gradients_but_one_scalars_order_of_sums():
    """CLIPModel (two towers and a contrastive loss), every parameter trained at a budget that
    recomputes: loss and gradients are plain torch's bit for bit except ``logit_scale``'s, a scalar
    that scales the similarity matrix both losses read (one as its transpose): its gradient is a sum
    over that matrix, which the traced backward makes in another order than autograd's engine
    (1.5e-7 relative measured)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=32, bos_token_id=0,
                                         eos_token_id=2, pad_token_id=1),
                        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, image_size=32, patch_size=8), projection_dim=32)
    torch.manual_seed(0)
    model = CLIPModel(config)
    reference = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(0, 96, (8, 16)), "pixel_values": torch.randn(8, 3, 32, 32), "return_loss": True}
    probe = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, method="full", device="cpu").plan
    budget = probe.min_budget_bytes + 0.3 * (probe.predicted_peak_bytes + probe.reserve_bytes - probe.min_budget_bytes)
    optimized = memopt.optimize(model, budget_gb=budget / GIB, example_inputs=batch, method="full", device="cpu")
    assert optimized.plan.needs_runtime
    loss, ref_loss = optimized(**batch).loss, reference(**batch).loss
    loss.backward(), ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
        if name == "logit_scale":
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.grad, q.grad), name
