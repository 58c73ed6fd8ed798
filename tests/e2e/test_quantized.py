"""memopt.optimize with quantize=: QLoRA, QPaCA and S²FT on quantized weights, "auto", the planner's
bytes against a measured step, merge, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.passes.lora import LoraLinear
from memopt.passes.paca import QPacaLinear
from memopt.passes.quantize import QuantLinear
from memopt.planner.solve import PlannerConfig
from tests.e2e._steps import assert_unchanged, measured_steady_step, snapshot
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_mlp
from tests.runtime._planned import planned

F32 = 4
# The NF4 lookup tables, buffers every 4-bit layer shares: the byte pairs [256, 2] and the 8-bit
# absmax code [256], fp32.
_TABLES = (256 * 2 + 256) * F32


def _simulation_excess(batch: dict[str, torch.Tensor]) -> int:
    """Where a simulated step may exceed a real one (never the other way), independent of
    quantization: fake tensors carry no values, so HF builds the [B, 1, T, T] causal mask a real run
    skips: at most 8·B·T·T bytes (as tests/e2e/test_optimize.py bounds it)."""
    b, t = batch["input_ids"].shape
    return 8 * b * t * t


def _codes(layer: QuantLinear) -> list[torch.Tensor]:
    """A quantized layer's own buffers: its codes and scales (not the shared, non-persistent tables)."""
    return [b for n, b in layer.named_buffers() if n not in layer._non_persistent_buffers_set]


def _batch(model: nn.Module) -> dict[str, torch.Tensor]:
    batch = lm_batch(model)
    del batch["attention_mask"]  # all ones: a real run drops it, a fake one cannot see that
    return batch


def _nf4_bytes(n: int) -> int:
    blocks = -(-n // 64)  # packed nibbles + uint8 absmax codes + fp32 scale per 256 codes + fp32 mean
    return -(-n // 2) + blocks + -(-blocks // 256) * F32 + F32


@pytest.fixture(scope="module")
def qlora():
    model = tiny_llama()
    batch = _batch(model)
    return memopt.optimize(model, budget_gb=1, example_inputs=batch, quantize="nf4", rank=4), batch


# ---- what the plan says and counts -------------------------------------------------------------

def test_qlora_plan_marks_every_quantized_layer_with_its_exact_bytes(qlora, tmp_path):
    plan = qlora[0].plan
    assert plan.method == "lora" and plan.module("lm_head").method == "frozen"  # QLoRA keeps the head
    body = [m for m in plan.modules if m.role != "lm_head"]
    assert len(body) == 14 and {m.method for m in body} == {"lora+nf4"}
    for m in body:
        n = m.in_features * m.out_features
        assert m.details["quantized_bytes"] == _nf4_bytes(n) and m.details["dense_bytes"] == n * F32
    assert any(note.startswith("quantize: 14 frozen Linear-like weights stored as NF4") for note in plan.notes)
    assert memopt.load_plan(plan.save(tmp_path / "plan.json")) == plan


def test_the_plan_counts_quantized_buffers_not_full_precision_weights(qlora):
    optimized, _ = qlora
    model, peak = optimized.model, optimized.plan.memory.peak
    quantized = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                    for b in _codes(m))
    assert quantized == sum(m.details.get("quantized_bytes", 0) for m in optimized.plan.modules)
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    assert peak.buffers == quantized + rotary + _TABLES  # the NF4 tables, shared by every layer: once
    # parameters: embeddings, norms, the LM head and the adapters; no dense copy of a quantized W
    assert peak.parameters == sum(p.numel() * F32 for p in model.parameters())


def test_predicted_peak_of_qlora_equals_a_measured_cpu_step_within_2_percent(qlora):
    optimized, batch = qlora
    measured = measured_steady_step(optimized, batch)
    predicted = optimized.plan.predicted_peak_bytes
    assert abs(predicted - measured.peak_bytes) <= 0.02 * measured.peak_bytes
    assert 0 <= predicted - measured.peak_bytes <= _simulation_excess(batch)
    assert measured.peak.buffers == optimized.plan.memory.peak.buffers  # the quantized bytes, exactly


def test_qlora_at_a_budget_that_recomputes_measures_its_prediction_to_the_byte():
    """The step the runtime traces reads the NF4 tables as the buffers they are. (Before: every call
    in the traced step made constants of its own, which the step held and copied: this step measured
    12,160 B over the plan, 33,344 B of constants among its inputs; on a 128-position Llama, 1,223 B
    over the usable budget, with no warning.)"""
    model = tiny_llama(num_hidden_layers=2)
    batch = lm_batch(model, batch=4, seq=64)
    optimized = planned(model, batch, 0.3, quantize="nf4")
    assert any(t.action == "recompute" for t in optimized.plan.tensors)
    measured = measured_steady_step(optimized, batch)
    assert measured.peak_bytes == optimized.plan.predicted_peak_bytes <= optimized.plan.usable_bytes
    assert measured.peak.inputs == sum(t.nbytes for t in batch.values())  # no constant of the step's own


def test_qlora_loss_and_gradients_equal_dense_lora_on_the_dequantized_weights(qlora):
    optimized, batch = qlora
    lora = {n: m for n, m in optimized.model.named_modules() if isinstance(m, LoraLinear)}
    assert lora and all(isinstance(m.base_layer, QuantLinear) for m in lora.values())
    optimized.zero_grad(set_to_none=True)  # another test may have run a step on this model
    with torch.no_grad():
        for m in lora.values():
            m.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))  # non-zero grads for A
    loss = optimized(**batch).loss
    loss.backward()
    # Independent reference: the original architecture holding W_eff = deq(W) + s·B·A as plain weights.
    ref, leaves = tiny_llama(), {}
    weights = {}
    for name, m in lora.items():
        a, b = (leaves.setdefault(f"{name}.{k}", w.detach().clone().requires_grad_(True))
                for k, w in (("A", m.lora_A.weight), ("B", m.lora_B.weight)))
        weights[f"{name}.weight"] = m.base_layer.weight + m.scaling * (b @ a)
    ref_loss = torch.func.functional_call(ref, weights, (), batch).loss
    ref_loss.backward()
    # fp32 throughout; the two differ in summation order only (x·Wᵀ + s·(x·Aᵀ)·Bᵀ vs x·(W + s·BA)ᵀ).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, m in lora.items():
        for key, p in (("A", m.lora_A.weight), ("B", m.lora_B.weight)):
            g = leaves[f"{name}.{key}"].grad
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item())


# ---- QPaCA ---------------------------------------------------------------------------------------

def test_qpaca_grads_match_a_dense_overlay_then_training_merge_gives_plain_linears():
    model = tiny_llama()
    batch = _batch(model)
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, method="paca", quantize="nf4", rank=4)
    paca = {n: m for n, m in model.named_modules() if isinstance(m, QPacaLinear)}
    assert len(paca) == 14 and {m.method for m in optimized.plan.modules if m.role != "lm_head"} == {"paca+nf4"}
    codes = {n: m.base_layer.qweight.clone() for n, m in paca.items()}
    with torch.no_grad():
        for m in paca.values():
            m.paca_P.add_(torch.randn(m.paca_P.shape, generator=torch.Generator().manual_seed(2)), alpha=0.05)
    loss = optimized(**batch).loss
    loss.backward()
    # Reference: plain weights deq(W) with columns idx = s·P (a dense, differentiable overlay).
    leaves = {n: m.paca_P.detach().clone().requires_grad_(True) for n, m in paca.items()}
    weights = {f"{n}.weight": m.base_layer.weight.index_copy(1, m.paca_idx, m.scaling * leaves[n])
               for n, m in paca.items()}
    ref_loss = torch.func.functional_call(tiny_llama(), weights, (), batch).loss
    ref_loss.backward()
    # QPaCA computes x·deq(W)ᵀ + x_idx·Δᵀ instead of one GEMM with the overlaid W: fp32 reassociation.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, m in paca.items():
        g = leaves[n].grad
        torch.testing.assert_close(m.paca_P.grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item())

    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    losses = []
    for _ in range(8):
        step = optimized(**batch).loss
        step.backward()
        opt.step()
        opt.zero_grad()
        losses.append(step.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(m.base_layer.qweight, codes[n]) for n, m in paca.items()), "W's bytes never change"

    with torch.no_grad():
        trained = optimized(**batch).logits
    plain = optimized.merge()
    linears = [plain.get_submodule(n) for n in paca]
    assert all(type(m) is nn.Linear for m in linears)
    assert not any(isinstance(m, (QuantLinear, QPacaLinear)) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters()), "the original flags, dequantized weights included"
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    with torch.no_grad():  # the merged W holds deq(W) with s·P written in: the same function
        torch.testing.assert_close(plain(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_int8_qlora_on_gpt2_predicts_the_measured_peak_and_merges_into_conv1d():
    model = tiny_gpt2()  # Conv1D layers, [in, out] weights
    batch = _batch(model)
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, quantize="int8", rank=4)
    measured = measured_steady_step(optimized, batch)
    assert 0 <= optimized.plan.predicted_peak_bytes - measured.peak_bytes <= 0.02 * measured.peak_bytes
    assert measured.peak.buffers == optimized.plan.memory.peak.buffers == sum(
        m.details["quantized_bytes"] for m in optimized.plan.modules if m.method == "lora+int8")
    optimized.eval()  # GPT-2 has dropout
    with torch.no_grad():
        for m in optimized.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.05)
        trained = optimized(**batch).logits
    plain = optimized.merge()
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not any(isinstance(m, (QuantLinear, LoraLinear)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, trained, rtol=1e-5, atol=1e-5)


# ---- S²FT ----------------------------------------------------------------------------------------

def test_s2ft_quantizes_only_weights_it_does_not_train_and_merges_back_in_order():
    model = tiny_llama()
    batch = _batch(model)
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, method="s2ft", quantize="nf4",
                                head_ratio=0.5, channel_ratio=0.5)
    methods = {m.name: m.method for m in optimized.plan.modules}
    trained = {n for n, meth in methods.items() if meth == "s2ft"}
    assert trained and all(n.endswith(("o_proj", "down_proj")) for n in trained)
    assert all(meth == "frozen+nf4" for n, meth in methods.items() if n not in trained and n != "lm_head")
    assert any("S²FT trains a dense block of each" in note for note in optimized.plan.notes)
    for name in trained:  # a trained block's weight stays full precision
        assert not isinstance(model.get_submodule(name).base_layer, QuantLinear)
    loss = optimized(**batch).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in optimized.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = optimized(**batch).logits
    plain = optimized.merge()
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    with torch.no_grad():  # permutations undone around deq(W): the same function
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_naming_a_weight_s2ft_trains_for_quantization_is_refused_and_the_model_restored():
    model = tiny_llama()
    snap = snapshot(model)
    cfg = memopt.QuantizeConfig(target_modules=("o_proj",))
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.\d\.self_attn\.o_proj: S2ftLinear trains "
                                         r"part of its weight \(s2ft_block\)"):
        memopt.optimize(model, 1, _batch(model), method="s2ft", quantize=cfg, head_ratio=0.5)
    assert_unchanged(model, snap)  # S²FT's in-place permutations undone too


# ---- the device the plan is for ------------------------------------------------------------------

_MLP = (60, 500, 500, 10)  # two 500-wide layers: each dense fp32 W is 1 MB, activations are KBs


def _mlp_plan(quantize, budget=1.0, device="cuda"):
    model = tiny_mlp(_MLP)
    x = torch.randn(4, _MLP[0], generator=torch.Generator().manual_seed(0))
    return memopt.optimize(model, budget, (x,), loss_fn=lambda out, _: out.square().mean(), quantize=quantize,
                           rank=2, device=device, reserve_gb=0, planner=PlannerConfig(enabled=False)), model


def test_a_cuda_plan_has_no_dequantized_weight_and_a_cpu_plan_has_one():
    w_bytes = 500 * 500 * F32
    optimized, model = _mlp_plan("nf4")
    cuda = optimized.plan.memory.peak
    cpu = _mlp_plan("nf4", device="cpu")[0].plan.memory.peak
    # CUDA runs the fused dequant-matmul (W only ever in registers); the CPU reference makes W.
    assert cuda.activations + cuda.temporaries < w_bytes / 4
    assert cpu.activations + cpu.temporaries >= w_bytes
    # The quantized buffers exactly, each block rounded up to 512 bytes as the caching allocator does.
    expected = sum(-(-b.numel() * b.element_size() // 512) * 512 for m in model.modules() if isinstance(m, QuantLinear)
                   for b in _codes(m)) + _TABLES  # (the shared tables, whole blocks of 512 B)
    params = sum(-(-p.numel() * F32 // 512) * 512 for p in model.parameters())  # adapters and biases only
    assert cuda.buffers == expected and cuda.parameters == params
    static = optimized.plan.static  # the joint trace's count, independent of the simulated step
    assert static.buffers == expected and static.parameters == params


def test_a_width_that_is_not_a_multiple_of_the_block_is_quantized_without_padding():
    optimized, model = _mlp_plan("nf4")
    # 60·500 = 30000 = 468 blocks of 64 + 48; 500·10 = 5000 = 78·64 + 8; 500·500 = 3906·64 + 16
    assert [m.details.get("last_block") for m in optimized.plan.modules] == [48, 16, 8]
    layer = model[0].base_layer
    assert isinstance(layer, QuantLinear) and layer.qweight.numel() == 30000 // 2 and layer.absmax_q.numel() == 469
    x = torch.randn(3, 60)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


# ---- quantize="auto" -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_peaks():
    return {q: _mlp_plan(q)[0].plan.predicted_peak_bytes for q in (None, "int8", "nf4")}


@pytest.mark.parametrize("between,chosen", [((None, None), None), ((None, "int8"), "int8"), (("int8", "nf4"), "nf4")])
def test_auto_quantizes_only_when_needed_and_picks_the_least_lossy_format_that_fits(mlp_peaks, between, chosen):
    hi, lo = between
    assert mlp_peaks[None] > mlp_peaks["int8"] > mlp_peaks["nf4"]
    usable = 2 * mlp_peaks[None] if lo is None else (mlp_peaks[hi] + mlp_peaks[lo]) // 2
    optimized, model = _mlp_plan("auto", budget=usable / 2**30)
    formats = {m.fmt for m in model.modules() if isinstance(m, QuantLinear)}
    assert formats == (set() if chosen is None else {chosen})
    assert optimized.plan.predicted_peak_bytes == mlp_peaks[chosen]
    note = optimized.plan.notes[-1]
    assert note.startswith(f"quantize='auto' chose {chosen or 'no quantization'}: ")
    if chosen is not None:
        assert "unquantized: the weights alone take" in note
    if chosen == "nf4":
        assert "int8 needs a budget of" in note


def test_auto_raises_for_nf4_when_nothing_fits_and_restores_the_model(mlp_peaks):
    model = tiny_mlp(_MLP)
    snap = snapshot(model)
    match = r"quantize='auto': no option fits .*nf4, the most compressed"
    with pytest.raises(memopt.InfeasibleBudgetError, match=match) as info:
        memopt.optimize(model, mlp_peaks["nf4"] / 2 / 2**30, (torch.randn(4, _MLP[0]),), quantize="auto",
                        loss_fn=lambda out, _: out.square().mean(), rank=2, device="cuda", reserve_gb=0,
                        planner=PlannerConfig(enabled=False))
    assert info.value.predicted_bytes == mlp_peaks["nf4"]
    assert_unchanged(model, snap)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,error,match", [
    ("fp4", ValueError, r"quantize must be one of \(None, 'nf4', 'int8', 'auto'\)"),
    (4, TypeError, "quantize must be None, 'nf4', 'int8', 'auto' or a memopt.QuantizeConfig"),
])
def test_a_bad_quantize_option_is_refused_before_anything_changes(value, error, match):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        memopt.optimize(model, 1, _batch(model), quantize=value)
    assert_unchanged(model, snap)
