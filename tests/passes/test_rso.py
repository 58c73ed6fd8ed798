"""RSO: B's gradient against full training's (dL/dB = dL/dW · Pᵀ), what backward keeps per layer
(P·x, measured), subproblems ended by the optimizer from make_optimizer (fold, reset, state freed,
a new P), the function kept by folds, merge and reload, the plan's counts, and the bad inputs it
refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.passes import RsoDetails, RsoLinear
from memopt.passes.rso import draw_projection, end_subproblem
from tests.models import lm_batch, tiny_llama


@pytest.fixture(scope="module")
def planned():
    torch.manual_seed(0)
    model = tiny_llama()
    batch = lm_batch(model, batch=2, seq=16)
    with torch.no_grad():
        reference = model(**batch).logits
    optimized = memopt.optimize(copy.deepcopy(model), 1, batch, method="rso", rank=8, resample_every=2, seed=5,
                                device="cpu")
    return model, batch, reference, optimized


def _layers(model: nn.Module) -> dict[str, RsoLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RsoLinear)}


def test_rso_starts_as_the_model_was_and_trains_only_b(planned):
    _, batch, reference, optimized = planned
    with torch.no_grad():
        assert torch.equal(optimized(**batch).logits, reference)
    trainable = {n for n, p in optimized.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("rso_B") for n in trainable)
    layers = _layers(optimized.model)
    assert len(layers) == 14
    decisions = [d for d in optimized.plan.modules if d.method == "rso"]
    assert all(isinstance(d.details, RsoDetails) and d.details["rank"] == 8 for d in decisions)
    assert sum(d.trainable_params for d in decisions) == optimized.plan.trainable_params == sum(
        p.numel() for p in optimized.parameters() if p.requires_grad)
    # P: N(0, 1/r) entries from (seed, layer, subproblem), the same on every draw
    q = layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.rso_P, draw_projection(8, q.in_features, 5, q.index, 0))
    assert not torch.equal(q.rso_P, draw_projection(8, q.in_features, 5, q.index, 1))
    assert abs(float(draw_projection(64, 4096, 0, 0, 0).var()) - 1 / 64) < 1e-3


def test_b_gets_the_full_gradient_projected_on_p(planned):
    model, batch, _, optimized = planned
    # Independent reference: full training of the plain model; dL/dB = dL/dW' · Pᵀ at W' = W + B·P.
    rso = copy.deepcopy(optimized.model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in _layers(rso).values():
            m.rso_B.copy_(torch.randn(m.rso_B.shape, generator=g) * 0.05)
    full = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in _layers(rso).items():
            full.get_submodule(name).weight.copy_(m.base_layer.weight + m.rso_B @ m.rso_P)
    for p in full.parameters():
        p.requires_grad_(True)
    rso(**batch).loss.backward()
    full(**batch).loss.backward()
    for name, m in _layers(rso).items():
        expected = full.get_submodule(name).weight.grad @ m.rso_P.t()
        torch.testing.assert_close(m.rso_B.grad, expected, rtol=1e-4, atol=1e-6)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for backward (parameters and buffers not counted)."""
    owned = {t.data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved = []

    def pack(t):
        if t.data_ptr() not in owned:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(saved)


def test_backward_keeps_p_x_not_x():
    torch.manual_seed(0)
    b, s, n, out, r = 2, 64, 512, 256, 16
    x = torch.randn(b, s, n, requires_grad=True)
    cfg = memopt.RsoConfig(rank=r)
    rso = RsoLinear(nn.Linear(n, out, bias=False).requires_grad_(False), "linear", n, out, cfg, index=0)
    assert _saved_bytes(rso, x) == b * s * r * 4  # P·x only, in B's dtype (fp32)
    frozen = nn.Linear(n, out, bias=False).requires_grad_(False)
    assert _saved_bytes(frozen, x) == 0
    from memopt.passes.lora import LoraLinear

    lora = LoraLinear(nn.Linear(n, out, bias=False).requires_grad_(False), "linear", n, out, memopt.LoraConfig(rank=r))
    assert _saved_bytes(lora, x) == b * s * (n + r) * 4  # LoRA keeps x and x·Aᵀ


def test_the_optimizer_ends_each_subproblem_on_time(planned):
    model, batch, _, _ = planned
    optimized = memopt.optimize(copy.deepcopy(model), 1, batch, method="rso", rank=8, resample_every=2, seed=5,
                                device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    layers = _layers(optimized.model)
    q = layers["model.layers.0.self_attn.q_proj"]
    w0, p0 = q.base_layer.weight.detach().clone(), q.rso_P.clone()
    sizes = []
    for step in range(1, 5):
        optimized(**batch).loss.backward()
        b_before = q.rso_B.detach().clone()
        opt.step()
        opt.zero_grad()
        sizes.append(sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)))
        if step % 2:  # inside a subproblem: B moved, W and P did not
            assert not torch.equal(q.rso_B, b_before) and torch.equal(q.base_layer.weight, w0)
            assert torch.equal(q.rso_P, p0)
        else:  # the step that ends it: B·P (B as stepped) folded into W, B zero, its state gone, a new P
            assert torch.count_nonzero(q.rso_B) == 0 and q.rso_B not in opt.state
            assert not torch.equal(q.rso_P, p0) and torch.equal(q.rso_P, draw_projection(8, q.in_features, 5, q.index,
                                                                                            step // 2))
            assert not torch.equal(q.base_layer.weight, w0)
            w0, p0 = q.base_layer.weight.detach().clone(), q.rso_P.clone()
        assert int(q.rso_step) == step
    assert sizes[1] == sizes[3] == 0 and sizes[0] == sizes[2] > 0  # state freed at each fold, never growing


def test_a_fold_keeps_the_function(planned):
    _, batch, _, optimized = planned
    model = copy.deepcopy(optimized.model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in _layers(model).values():
            m.rso_B.copy_(torch.randn(m.rso_B.shape, generator=g) * 0.05)
        before = model(**batch).logits
        for m in _layers(model).values():
            m.fold()
            m.rso_B.zero_()
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    assert end_subproblem(_layers(model).values()) == 0  # step 1 of 2: nothing ends


@pytest.mark.slow
def test_merge_and_save_reload_mid_subproblem_continue_exactly(planned, tmp_path):
    model, batch, reference, _ = planned
    optimized = memopt.optimize(copy.deepcopy(model), 1, batch, method="rso", rank=8, resample_every=2, seed=5,
                                device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    for _ in range(3):  # one fold, then one step into the second subproblem
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = optimized(**batch).logits
    assert not torch.equal(trained, reference)
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)
    mine, theirs = _layers(optimized.model), _layers(reloaded.model)
    assert all(torch.equal(mine[n].rso_P, theirs[n].rso_P) and theirs[n].subproblem == 1 for n in mine)
    # the reloaded model continues as the original does: the next step ends the subproblem in both
    opt2 = reloaded.make_optimizer(lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares the step tensors otherwise
    for run, o in ((optimized, opt), (reloaded, opt2)):
        run(**batch).loss.backward()
        o.step()
        o.zero_grad()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, optimized(**batch).logits)
        merged = optimized.merge(inplace=False)
        torch.testing.assert_close(merged(**batch).logits, optimized(**batch).logits, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, RsoLinear) for m in merged.modules())


def test_bad_input_and_what_rso_cannot_do(planned):
    model, batch, _, optimized = planned
    with pytest.raises(ValueError, match=r"rank=64 is not below the input width of model.layers.0.self_attn.q_proj "
                                         r"\(in_features=64"):
        memopt.optimize(copy.deepcopy(model), 1, batch, method="rso", rank=64, device="cpu")
    with pytest.raises(ValueError, match="resample_every must be a positive integer"):
        memopt.RsoConfig(resample_every=0)
    with pytest.raises(ValueError, match="RSO folds B·P into each weight every subproblem"):
        memopt.optimize(copy.deepcopy(model), 1, batch, method="rso", rank=8, quantize="nf4", device="cpu")
    with pytest.raises(memopt.MemoptError, match="rso trains the weights themselves, so there is no adapter to switch off"):
        with optimized.disable_adapter():
            pass


def test_a_tied_lm_head_trained_by_rso_reloads(tmp_path):
    import transformers

    def tied():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            tie_word_embeddings=True))

    batch = lm_batch(tied(), batch=2, seq=16)
    optimized = memopt.optimize(tied(), 1, batch, method="rso", rank=8, resample_every=1,
                                target_modules=["lm_head", "q_proj"], device="cpu")
    opt = optimized.make_optimizer(lr=1e-2)
    for _ in range(2):  # two folds into the tied weight
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(tied(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, optimized(**batch).logits)
