"""PaCA pass: gradients against a dense reference, saved bytes, accumulation, recomputation,
disable / merge / state dict, targeting errors, FLOPs of the first layer, and optimize end to end."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import memopt
from memopt.config import PacaConfig
from memopt.ir.structure import build_model_graph
from memopt.memory import MemoryTracker
from memopt.passes import RewriteLog, get_pass
from memopt.passes.paca import PacaLinear, apply_paca, merge_paca, module_seed, paca_linear, select_columns
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_mlp

F32 = 4
# grad_P is one [out, N]·[N, r] GEMM; the reference slices an [out, N]·[N, in] GEMM. Both sum the
# same N products in fp32, blocked differently: the rounding error is bounded by ~N·eps·Σ|terms|
# (N = 32 here: ~4e-6 of the largest entry); measured <= 2.2e-7 of it. So 1e-5 of the largest
# entry, plus 1e-5 relative.
_RTOL = 1e-5


def _assert_grad_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=_RTOL, atol=_RTOL * ref.abs().max().item())


def _paca(model, batch=None, **cfg):
    batch = batch or lm_batch(model)
    result = apply_paca(model, build_model_graph(model, (), batch), PacaConfig(**cfg), RewriteLog(model))
    return result, batch


def _paca_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PacaLinear)}


def _perturb(model, seed=1, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _paca_modules(model).values():
            m.paca_P.add_(torch.randn(m.paca_P.shape, generator=gen) * scale)


def _dense_reference(reference, paca_model):
    """``reference`` with W[:, idx] = scaling·P and those W trainable: the function PaCA computes."""
    reference.requires_grad_(False)
    pairs = {}
    with torch.no_grad():
        for name, m in _paca_modules(paca_model).items():
            w = reference.get_submodule(name).weight
            cols = m.scaling * m.paca_P
            if m.kind == "linear":
                w[:, m.paca_idx] = cols  # nn.Linear weight [out, in]
            else:
                w[m.paca_idx, :] = cols.t()  # Conv1D weight [in, out]
            pairs[name] = w.requires_grad_(True)
    return pairs


def _reference_grad(m: PacaLinear, w: torch.Tensor) -> torch.Tensor:
    g = w.grad[:, m.paca_idx] if m.kind == "linear" else w.grad[m.paca_idx, :].t()
    return m.scaling * g  # dL/dP = scaling · dL/dW[:, idx]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_grads_of_p_equal_a_dense_reference(factory):
    ours, reference = factory().eval(), factory().eval()  # eval: dropout off in both
    _, batch = _paca(ours, rank=4, alpha=8)
    _perturb(ours)
    weights = _dense_reference(reference, ours)
    out, ref_out = ours(**batch), reference(**batch)
    out.loss.backward()
    ref_out.loss.backward()
    assert torch.equal(out.logits, ref_out.logits), "the same W_eff and the same matmul: bitwise equal"
    for name, m in _paca_modules(ours).items():
        _assert_grad_close(m.paca_P.grad, _reference_grad(m, weights[name]))


def test_only_p_trains_and_outputs_are_unchanged_at_init():
    model, reference = tiny_llama(), tiny_llama()
    result, batch = _paca(model, rank=4, alpha=8)  # scaling 2: (w / 2)·2 is exact
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".paca_P") for n in trainable)
    assert sum(d.trainable_params for d in result.decisions) == sum(model.get_parameter(n).numel() for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("shape", [(6, 20), (2, 5, 20), (2, 3, 4, 20)])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_any_input_rank_and_a_trainable_bias_get_the_dense_gradients(shape, kind):
    torch.manual_seed(0)
    weight = torch.randn(12, 20) if kind == "linear" else torch.randn(20, 12)
    bias = torch.randn(12, requires_grad=True)
    idx, scaling = torch.tensor([2, 5, 11]), 1.5
    cols = torch.randn(12, 3, requires_grad=True)
    x = torch.randn(shape, requires_grad=True)
    y = paca_linear(x, weight, bias, cols, idx, scaling, kind)
    g = torch.randn(y.shape)
    y.backward(g)
    w_ref = (weight if kind == "linear" else weight.t()).clone()  # [out, in]
    w_ref[:, idx] = 0
    w_ref = w_ref.requires_grad_(True)
    x_ref, b_ref, c_ref = (t.detach().clone().requires_grad_(True) for t in (x, bias, cols))
    full = w_ref.index_add(1, idx, scaling * c_ref)  # W with columns idx = scaling·cols
    y_ref = torch.nn.functional.linear(x_ref, full, b_ref)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-5)  # the same sums, reordered by the reshape
    for ours, ref in ((x.grad, x_ref.grad), (bias.grad, b_ref.grad), (cols.grad, c_ref.grad)):
        _assert_grad_close(ours, ref)


def test_backward_saves_only_the_gathered_columns_and_the_input_is_freed():
    layer = PacaLinear(nn.Linear(64, 48, bias=False).requires_grad_(False), "linear", 64, 48,
                       torch.tensor([1, 9, 30, 63]), scaling=2.0)
    raw = torch.randn(4, 8, 64)
    with MemoryTracker(layer, inputs=raw) as tracker:
        x = raw * 2  # an intermediate that only the layer could keep alive, [4, 8, 64]
        x_storage = weakref.ref(x.untyped_storage())
        y = layer(x)
        del x
        gc.collect()
        assert x_storage() is None, "x must be freed: backward keeps a copy of x[..., idx], not a view"
        assert tracker.live().activations == 4 * 8 * 4 * F32  # B·T·r fp32
        y.sum().backward()
    assert layer.paca_P.grad.shape == (48, 4)


def test_gradient_accumulation_and_steps_always_use_the_current_p():
    model, reference = tiny_llama().eval(), tiny_llama().eval()
    _, batch = _paca(model, rank=4, alpha=8)
    micro = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two optimizer steps of two micro-batches each
        weights = _dense_reference(reference, model)
        reference.zero_grad(set_to_none=True)
        for mb in micro:
            (model(**mb).loss / 2).backward()
            (reference(**mb).loss / 2).backward()
        for name, m in _paca_modules(model).items():
            _assert_grad_close(m.paca_P.grad, _reference_grad(m, weights[name]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        _dense_reference(reference, model)
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_non_reentrant_recomputation_sees_the_same_weights_and_gives_the_same_grads():
    plain, ckpt = tiny_llama().eval(), tiny_llama().eval()
    _, batch = _paca(plain, rank=4, alpha=8)
    _paca(ckpt, batch, rank=4, alpha=8)
    _perturb(plain)
    _perturb(ckpt)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()  # HF checkpoints only in training mode; the tiny Llama has no dropout
    calls = []
    ckpt.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(lambda *_: calls.append(1))
    for _ in range(2):  # accumulate twice: recomputation must not double-write or skip
        plain(**batch).loss.backward()
        ckpt(**batch).loss.backward()
    assert len(calls) == 4, "each forward runs again in backward (recomputation stops inside the last op)"
    for name, m in _paca_modules(plain).items():
        assert torch.equal(m.paca_P.grad, _paca_modules(ckpt)[name].paca_P.grad), name


def test_changing_p_between_forward_and_backward_is_refused():
    layer = PacaLinear(nn.Linear(8, 4).requires_grad_(False), "linear", 8, 4, torch.tensor([0, 3]), 1.0)
    y = layer(torch.randn(2, 8))
    with torch.no_grad():
        layer.paca_P.add_(1.0)  # e.g. an optimizer step in the middle of accumulation
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_disable_gives_the_original_function_after_training_and_enable_the_trained_one():
    model, reference = tiny_gpt2().eval(), tiny_gpt2().eval()
    _, batch = _paca(model, rank=4, alpha=8)
    _perturb(model)
    with torch.no_grad():
        trained = model(**batch).logits
        for m in _paca_modules(model).values():
            m.enabled = False
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
        for m in _paca_modules(model).values():
            m.enabled = True
        assert torch.equal(model(**batch).logits, trained)


def test_merge_gives_a_plain_model_with_equal_outputs():
    model = tiny_gpt2().eval()
    _, batch = _paca(model, rank=4, alpha=8)
    _perturb(model)
    with torch.no_grad():
        expected = model(**batch).logits
    merge_paca(model)
    assert not _paca_modules(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)  # the same W_eff, the same matmul


def test_state_dict_round_trips_indices_p_and_originals():
    model = tiny_llama().eval()
    _, batch = _paca(model, rank=4, alpha=8, seed=0)
    _perturb(model)
    with torch.no_grad():
        expected = model(**batch).logits
    state = model.state_dict()
    assert any(k.endswith(".paca_idx") for k in state) and any(k.endswith(".paca_orig") for k in state)
    fresh = tiny_llama().eval()
    _paca(fresh, batch, rank=4, alpha=8, seed=123)  # other columns until the state dict is loaded
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
        for m in _paca_modules(fresh).values():
            m.enabled = False
        assert torch.equal(fresh(**batch).logits, tiny_llama().eval()(**batch).logits)


def test_columns_are_seeded_per_module_and_weight_norm_takes_the_largest():
    a, b = tiny_llama(), tiny_llama()
    result, _ = _paca(a, rank=4, seed=7)
    _paca(b, rank=4, seed=7)
    idx_a = {n: m.paca_idx for n, m in _paca_modules(a).items()}
    assert all(torch.equal(idx_a[n], m.paca_idx) for n, m in _paca_modules(b).items())
    assert len({tuple(i.tolist()) for i in idx_a.values()}) > 1, "modules get different columns"
    decision = next(d for d in result.decisions if d.method == "paca")
    assert decision.details["seed"] == module_seed(7, decision.name)
    weight = torch.ones(5, 10)
    weight[:, [2, 7, 8]] = 3.0
    assert select_columns(weight, "linear", 3, "weight-norm", 0).tolist() == [2, 7, 8]
    assert select_columns(weight.t(), "conv1d", 3, "weight-norm", 0).tolist() == [2, 7, 8]


def test_rank_above_in_features_names_the_module_and_changes_nothing():
    model = tiny_mlp((32, 64, 16, 10))
    log = RewriteLog(model)
    graph = build_model_graph(model, (torch.randn(2, 32),))
    with pytest.raises(ValueError, match=r"rank=20 exceeds in_features=16 of 4"):
        apply_paca(model, graph, PacaConfig(rank=20, target_modules=["2", "4"]), log)
    assert not _paca_modules(model) and all(p.requires_grad for p in model.parameters())


def test_a_tied_weight_is_refused():
    model = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    with pytest.raises(ValueError, match=r"cannot target lm_head: its weight is shared with \['transformer.wte.weight'\]"):
        _paca(model, rank=2, target_modules=["lm_head"])


def test_first_layer_computes_only_the_gradient_of_p():
    # x·W_effᵀ with x not requiring grad: backward is grad_P = s·gᵀ·x_idx alone, 2·M·out·r FLOPs.
    m, n_in, n_out, r = 24, 32, 16, 4
    layer = PacaLinear(nn.Linear(n_in, n_out).requires_grad_(False), "linear", n_in, n_out,
                       torch.arange(0, n_in, n_in // r), scaling=1.0)
    for needs_x, expected in ((False, 2 * m * n_out * r), (True, 2 * m * n_out * r + 2 * m * n_out * n_in)):
        y = layer(torch.randn(m, n_in, requires_grad=needs_x))
        with FlopCounterMode(display=False) as counter:
            y.sum().backward()
        assert counter.get_total_flops() == expected


def _text_batch(data: torch.Tensor, step: int, batch: int = 8, seq: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
    ids = torch.stack([data[s:s + seq] for s in starts])
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module")
def optimized_on_text():
    data = torch.tensor(list(open(json.decoder.__file__, "rb").read()), dtype=torch.long)  # real bytes
    model = tiny_llama(vocab_size=256)
    return memopt.optimize(model, budget_gb=1, example_inputs=_text_batch(data, 0), method="paca",
                           rank=8, alpha=16, selection="random", seed=3), data


def test_optimize_records_rank_selection_seed_and_scaling_in_the_plan(optimized_on_text):
    optimized, _ = optimized_on_text
    plan = optimized.plan
    assert plan.method == "paca" and get_pass("paca").apply is apply_paca
    down = plan.module("model.layers.1.mlp.down_proj")
    assert down.method == "paca" and down.trainable_params == 8 * 64
    assert down.details == {"rank": 8, "selection": "random", "scaling": 2.0, "block": 1,
                            "seed": module_seed(3, "model.layers.1.mlp.down_proj")}
    assert plan.module("lm_head").method == "frozen"
    text = plan.summary()
    assert "model.layers.1.mlp.down_proj" in text and "rank=8, selection=random, scaling=2.0" in text
    assert memopt.Plan.from_json(plan.to_json()) == plan


def test_a_few_steps_reduce_the_loss_on_real_text_and_merge_keeps_the_function(optimized_on_text):
    optimized, data = optimized_on_text
    held_out = _text_batch(data, 10_000)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=2e-2)
    with torch.no_grad():
        before = optimized(**held_out).loss.item()
    for step in range(30):
        optimized(**_text_batch(data, step)).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = optimized(**held_out).loss
    # Measured 5.52 -> 5.06 nats with frozen random embeddings and head; 0.3 leaves room for seeds.
    assert after.item() < before - 0.3
    plain = optimized.merge()
    assert not _paca_modules(plain) and all(p.requires_grad for p in plain.parameters())  # flags restored
    with torch.no_grad():
        assert torch.equal(plain(**held_out).loss, after)


def test_autocast_runs_the_gemm_in_its_dtype_and_gives_grads_in_the_parameters_dtype():
    torch.manual_seed(0)
    base, reference = nn.Linear(32, 16).requires_grad_(False), nn.Linear(32, 16)
    reference.load_state_dict(base.state_dict())  # at init W_eff = W
    layer = PacaLinear(base, "linear", 32, 16, torch.tensor([1, 4, 9]), scaling=2.0)
    x = torch.randn(4, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), reference(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert layer.paca_P.grad.dtype == torch.float32
    # Both are bf16 GEMMs over the same bf16 operands, summed in different orders; bf16 keeps
    # 8 bits, so 1e-2 of the largest entry.
    expected = 2.0 * reference.weight.grad[:, layer.paca_idx]
    torch.testing.assert_close(layer.paca_P.grad, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_a_model_on_the_meta_device_is_planned_for_cuda_without_memory():
    with torch.device("meta"):
        model = tiny_llama()
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    plan = memopt.optimize(model, budget_gb=1, example_inputs={"input_ids": ids, "labels": ids}, method="paca",
                           device="cuda", rank=4).plan
    assert plan.memory.peak.total > 0 and plan.module("model.layers.0.self_attn.q_proj").method == "paca"


def test_an_infeasible_budget_leaves_the_model_exactly_as_it_was():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = {n: id(m) for n, m in model.named_modules()}
    with pytest.raises(memopt.InfeasibleBudgetError):
        memopt.optimize(model, budget_gb=1e-6, example_inputs=lm_batch(model), method="paca", rank=4)
    assert {n: id(m) for n, m in model.named_modules()} == modules
    for name, p in model.named_parameters():  # the simulated step wrote P into fake weights only
        assert torch.equal(p, before[name]) and p.requires_grad, name
