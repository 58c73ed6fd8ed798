"""RandLoRA: PEFT's numerics bit for bit (the same bases from the same seed, the same loss and
gradients), the original function at init, only Λ and Γ train, merge / reload / disable_adapter and
a quantized base, and the bad inputs it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import memopt
from memopt.passes import RandLoraDetails, RandLoraLinear
from tests.models import lm_batch, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def planned():
    torch.manual_seed(0)
    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=16)
    with torch.no_grad():
        reference = model(**batch).logits
    optimized = memopt.optimize(copy.deepcopy(model), 1, batch, method="randlora", rank=8, alpha=160, seed=3,
                                device="cpu")
    return model, batch, reference, optimized


def _layers(optimized):
    return {n: m for n, m in optimized.model.named_modules() if isinstance(m, RandLoraLinear)}


def _randomise(layers, peft_model=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in layers.items():
            lam = torch.randn(m.randlora_lambda.shape, generator=g) * 0.1
            gam = torch.randn(m.randlora_gamma.shape, generator=g) * 0.1
            m.randlora_lambda.copy_(lam)
            m.randlora_gamma.copy_(gam)
            if peft_model is not None:
                theirs = peft_model.base_model.model.get_submodule(name)
                theirs.randlora_lambda["default"].copy_(lam)
                theirs.randlora_gamma["default"].copy_(gam)


def test_randlora_equals_pefts_bases_loss_and_gradients(planned):
    peft = pytest.importorskip("peft")
    model, batch, _, _ = planned
    ours = memopt.optimize(copy.deepcopy(model), 1, batch, method="randlora", rank=8, alpha=160, seed=3, device="cpu")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.RandLoraConfig(r=8, randlora_alpha=160, target_modules=TARGETS,
                                                                            projection_prng_key=3))
    layers = _layers(ours)
    first = next(iter(layers.values()))
    assert torch.equal(first.randlora_A.float(), next(iter(theirs.base_model.randlora_A.values())).float())
    assert torch.equal(first.randlora_B.float(), next(iter(theirs.base_model.randlora_B.values())).float())
    _randomise(layers, theirs)
    loss, peft_loss = ours(**batch).loss, theirs(**batch).loss
    assert torch.equal(loss, peft_loss)
    loss.backward()
    peft_loss.backward()
    for name, m in layers.items():
        other = theirs.base_model.model.get_submodule(name)
        assert torch.equal(m.randlora_lambda.grad, other.randlora_lambda["default"].grad), name
        assert torch.equal(m.randlora_gamma.grad, other.randlora_gamma["default"].grad), name


def test_randlora_starts_as_the_model_was_and_trains_only_its_scalings(planned):
    _, batch, reference, optimized = planned
    with torch.no_grad():
        assert torch.equal(optimized(**batch).logits, reference)
    trainable = {n for n, p in optimized.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("randlora_lambda", "randlora_gamma")) for n in trainable)
    layers = _layers(optimized)
    assert len(layers) == 14 and len({id(m.randlora_A) for m in layers.values()}) == 1  # one shared pair of bases
    decisions = [d for d in optimized.plan.modules if d.method == "randlora"]
    assert all(isinstance(d.details, RandLoraDetails) for d in decisions)
    assert sum(d.trainable_params for d in decisions) == sum(p.numel() for p in optimized.parameters() if p.requires_grad)


@pytest.mark.slow
def test_merge_reload_and_disable_adapter_keep_the_function(planned, tmp_path):
    model, batch, reference, _ = planned
    optimized = memopt.optimize(copy.deepcopy(model), 1, batch, method="randlora", rank=8, alpha=160, seed=3,
                                device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    for _ in range(2):
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = optimized(**batch).logits
        assert not torch.equal(trained, reference)
        with optimized.disable_adapter():
            assert torch.equal(optimized(**batch).logits, reference)
        merged = optimized.merge(inplace=False)
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)


@pytest.mark.slow
def test_a_quantized_base_and_bad_ranks(planned):
    model, batch, _, _ = planned
    qrandlora = memopt.optimize(copy.deepcopy(model), 1, batch, method="randlora", rank=8, quantize="nf4", device="cpu")
    assert {d.method for d in qrandlora.plan.modules} >= {"randlora+nf4"}
    qrandlora(**batch).loss.backward()
    with pytest.raises(ValueError, match="rank=4096 is above the smaller side of model.layers.0"):
        memopt.optimize(copy.deepcopy(model), 1, batch, method="randlora", rank=4096, device="cpu")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        memopt.RandLoraConfig(rank=0)


@pytest.mark.slow
def test_bases_that_do_not_fit_beside_the_weights_are_named_before_any_trace(planned):
    model, batch, _, _ = planned
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bases = (8 * 128 + 128 * 16 * 8) * 4  # A [r, 1, d] and B [D, N, r] in fp32, d = D = 128 (the MLP's width)
    with pytest.raises(memopt.InfeasibleBudgetError, match=r"RandLoRA's shared bases \(A \[8, 1, 128\] and B \[128, "
                                                           r"16, 8\], fp32, sized for the largest adapted layer\) take "
                                                           r"68.00 KiB by themselves.*raise the budget") as info:
        memopt.optimize(copy.deepcopy(model), (weights + bases) / 2**30, batch, method="randlora", rank=8,
                        device="cpu", reserve_gb=0)
    scalings = sum(m.randlora_lambda.numel() + m.randlora_gamma.numel()
                   for m in _layers(planned[3]).values()) * 4
    assert info.value.min_budget_bytes > weights + scalings + bases  # the planner's smallest feasible budget
    fits = memopt.optimize(copy.deepcopy(model), info.value.min_budget_gb, batch, method="randlora", rank=8,
                           device="cpu", reserve_gb=0)
    assert fits.plan.fits
