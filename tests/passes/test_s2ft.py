"""S²FT pass: function-preserving GQA-aware co-permutation, partial-backprop blocks, merge, plan."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import memopt
from memopt.config import S2ftConfig
from memopt.ir.structure import build_model_graph
from memopt.memory import MemoryTracker
from memopt.passes import RewriteLog, get_pass
from memopt.passes.s2ft import S2ftLinear, apply_s2ft, merge_s2ft
from memopt.passes.s2ft_ops import permute_weight_
from tests.models import (
    HandwrittenBlock,
    MHABlock,
    lm_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_llama,
    tiny_mistral,
    tiny_mlp,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
)

# A permutation is exact, but the permuted model sums o/down inputs in another order and splits
# each GEMM at the block; in fp32 that moves logits of magnitude ~1 by a few ulps (measured ≤ 1e-6).
_PRESERVE_ATOL = 1e-5
# Gradients: the same fp32 sums reordered (permuted heads/channels, GEMMs split at the block) over
# reductions of 32..128 terms: ~n·eps·|g| ≈ 1e-6 at |g| ≤ 0.1; measured ≤ 3e-8.
_GRAD_ATOL, _GRAD_RTOL = 1e-6, 1e-5
_ALL = ("v", "o", "up", "down")

_FAMILIES = {
    "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "phi3": tiny_phi3, "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox, "opt": tiny_opt, "bert": tiny_bert,
    "phi3_eager": functools.partial(tiny_phi3, attn_implementation="eager"),  # v found without SDPA's kwargs
}


@functools.lru_cache(maxsize=None)
def _captured(family: str):
    """(graph, batch) of a family, captured once; apply it to fresh models with the same weights."""
    model = _FAMILIES[family]()
    batch = lm_batch(model, labels=family != "bert")
    return build_model_graph(model, (), batch), batch


def _s2ft(family: str, **cfg):
    """A fresh model of ``family`` rewritten by S²FT, an untouched twin, the batch and the result."""
    model, reference = _FAMILIES[family](), _FAMILIES[family]()
    graph, batch = _captured(family)
    result = apply_s2ft(model, graph, S2ftConfig(**cfg), RewriteLog(model))
    return model, reference, batch, result


def _out(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, S2ftLinear)}


def _is_identity(perm):
    return torch.equal(perm, torch.arange(perm.numel()))


# ----------------------------------------------------------------------------- function preservation


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_permutation_preserves_the_function(family):
    # seed 1 draws non-identity head orders in every family (checked below, so the test has teeth)
    model, reference, batch, result = _s2ft(family, head_ratio=0.5, channel_ratio=0.25, targets=_ALL, seed=1)
    model.eval(), reference.eval()
    with torch.no_grad():
        diff = (_out(model, batch) - _out(reference, batch)).abs().max().item()
    assert diff <= _PRESERVE_ATOL, f"{family}: max abs diff {diff:.2e}"
    o_layers = [model.get_submodule(d.name) for d in result.decisions if d.role == "o" and d.details["permuted"]]
    assert any(not _is_identity(layer.s2ft_perm) for layer in o_layers), "the draw must actually reorder heads"


def test_handwritten_gqa_block_with_repeat_interleave_is_preserved():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    model, reference = HandwrittenBlock(), HandwrittenBlock()
    reference.load_state_dict(model.state_dict())
    cfg = S2ftConfig(head_ratio=0.5, channel_ratio=0.5, targets=_ALL, seed=1)
    apply_s2ft(model, build_model_graph(model, (x,)), cfg, RewriteLog(model))
    assert not _is_identity(model.o.s2ft_perm)
    torch.testing.assert_close(model(x), reference(x), atol=_PRESERVE_ATOL, rtol=0)


def test_gqa_moves_whole_kv_groups_and_crossing_groups_would_break_the_function():
    model, reference, batch, result = _s2ft("mistral", head_ratio=0.25, targets=("v", "o"), seed=1)
    decisions = {d.name: d for d in result.decisions}
    groups, head_dim = 2, 16  # 4 query heads share 2 kv heads
    picked = [d for d in decisions.values() if d.method == "s2ft" and d.details["target"] == "o"]
    assert len(picked) == 1 and picked[0].details["unit"] == "kv group"
    layer = model.get_submodule(picked[0].name.rpartition(".")[0])
    # o trains the query heads of the selected kv group (2·16 columns), v that kv head (16 rows)
    assert layer.o_proj.s2ft_block.shape == (64, groups * head_dim)
    assert layer.v_proj.s2ft_block.shape == (head_dim, 64)
    kv_order = layer.k_proj.s2ft_perm.view(-1, head_dim)[:, 0] // head_dim
    q_order = layer.q_proj.s2ft_perm.view(-1, head_dim)[:, 0] // head_dim
    assert torch.equal(q_order // groups, kv_order.repeat_interleave(groups))  # query heads follow their kv head
    assert torch.equal(layer.q_proj.s2ft_perm, layer.o_proj.s2ft_perm)
    # The pitfall of the public code: swapping query heads of different groups changes the output.
    wrong = torch.arange(64).view(4, head_dim)[[0, 2, 1, 3]].flatten()
    ref_attn = reference.model.layers[0].self_attn
    permute_weight_(ref_attn.q_proj, "linear", "out", wrong)
    permute_weight_(ref_attn.o_proj, "linear", "in", wrong)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert (_out(model, batch) - _out(reference, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["phi3", "phi3_eager"])
def test_fused_layers_train_their_v_and_up_slices(family):
    phi3, *_ = _s2ft(family, head_ratio=1.0, channel_ratio=0.25, targets=_ALL)
    heads, kv, d, channels = 4, 2, 16, 128
    attn, mlp = phi3.model.layers[0].self_attn, phi3.model.layers[0].mlp
    # qkv_proj rows are [q (4·16) | k (2·16) | v (2·16)]: v is the slice that reaches the core's value
    assert attn.qkv_proj.block_start == (heads + kv) * d and attn.qkv_proj.s2ft_block.shape == (kv * d, 64)
    assert mlp.gate_up_proj.block_start == channels  # [gate | up]: up is the half without the activation
    if family == "phi3_eager":
        return
    gpt2, *_ = _s2ft("gpt2", head_ratio=1.0, channel_ratio=0.25, targets=_ALL)
    c_attn = gpt2.transformer.h[0].attn.c_attn  # Conv1D weight [in, 3·out]: v is its last 64 columns
    assert c_attn.kind == "conv1d" and c_attn.block_start == 128 and c_attn.s2ft_block.shape == (64, 64)
    torch.testing.assert_close(c_attn.s2ft_block, c_attn.base_layer.weight[:, 128:].t())


def test_per_head_interleaved_qkv_permutes_but_only_o_trains():
    model, _, _, result = _s2ft("gpt_neox", head_ratio=1.0, targets=("v", "o"))
    decisions = {d.name: d for d in result.decisions}
    qkv = decisions["gpt_neox.layers.0.attention.query_key_value"]
    assert qkv.method == "frozen" and qkv.details["permuted"] and "not contiguous" in qkv.reason
    assert decisions["gpt_neox.layers.0.attention.dense"].method == "s2ft"
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*per head"):
        _s2ft("gpt_neox", targets=("v",))


# ----------------------------------------------------------------------------- selection


def test_pooled_sampling_counts_and_seed():
    model, reference, _, result = _s2ft("llama", head_ratio=0.25, channel_ratio=0.1, targets=("o", "down"), seed=0)
    trained = [d for d in result.decisions if d.method == "s2ft"]
    heads = [d.details["selected"] for d in trained if d.details["target"] == "o"]
    channels = [d.details["selected"] for d in trained if d.details["target"] == "down"]
    assert sum(heads) == round(0.25 * 8) and sum(channels) == round(0.1 * 256)  # pooled over 2 layers
    d = trained[0].details
    assert d["ratio"] in (0.25, 0.1) and d["seed"] == 0 and d["of"] in (4, 128)
    again = _s2ft("llama", head_ratio=0.25, channel_ratio=0.1, targets=("o", "down"), seed=0)[3]
    assert [x.details for x in again.decisions] == [x.details for x in result.decisions]
    other = _s2ft("llama", head_ratio=0.25, channel_ratio=0.1, targets=("o", "down"), seed=5)[3]
    assert [x.details for x in other.decisions] != [x.details for x in result.decisions]


def test_a_block_that_draws_nothing_is_left_untouched():
    model, reference, _, result = _s2ft("mistral", head_ratio=0.25, targets=("o",), seed=1)
    empty = [d for d in result.decisions if d.role == "o" and d.details["selected"] == 0]
    assert len(empty) == 1 and "trains nothing" in empty[0].reason
    block = empty[0].name.rpartition(".self_attn")[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer = model.get_submodule(f"{block}.self_attn.{name}")
        assert isinstance(layer, nn.Linear)
        assert torch.equal(layer.weight, reference.get_submodule(f"{block}.self_attn.{name}").weight)


def test_decisions_record_every_linear_and_say_why_frozen():
    _, _, _, result = _s2ft("bert", head_ratio=0.5, channel_ratio=0.1, targets=("o", "down"))
    decisions = {d.name: d for d in result.decisions}
    assert "S²FT" in decisions["pooler.dense"].reason and decisions["pooler.dense"].method == "frozen"
    assert "not in targets" in decisions["encoder.layer.0.attention.self.value"].reason
    _, _, _, llama = _s2ft("llama", targets=("up",), channel_ratio=0.1)
    reasons = {d.name.rpartition(".")[2]: d.reason for d in llama.decisions}
    assert "gate is never trained" in reasons["gate_proj"] and "LM head" in reasons["lm_head"]
    assert json.loads(json.dumps([d.to_dict() for d in llama.decisions]))  # plan-serialisable


def test_packed_attention_falls_back_per_module_and_the_mlp_still_trains():
    x = torch.randn(2, 5, 32)
    model = MHABlock()
    result = apply_s2ft(model, build_model_graph(model, (x,)), S2ftConfig(targets=("o", "down"), channel_ratio=0.1),
                        RewriteLog(model))
    decisions = {d.name: d for d in result.decisions}
    assert "attn.out_proj" not in decisions  # MultiheadAttention reads its weight without calling it: left alone
    assert decisions["fc2"].method == "s2ft" and decisions["fc2"].details["selected"] == round(0.1 * 64)


def test_a_model_without_attention_or_mlp_is_refused_by_name():
    model = tiny_mlp()
    graph = build_model_graph(model, (torch.randn(2, 32),))
    with pytest.raises(ValueError, match=r"S²FT needs attention heads.*Sequential has neither"):
        apply_s2ft(model, graph, S2ftConfig(), RewriteLog(model))
    assert all(p.requires_grad for p in model.parameters())  # refused before touching anything


def test_undo_after_a_failure_inside_the_pass_restores_the_weights():
    class FailingLog(RewriteLog):
        calls = 0

        def replace(self, name, new):
            self.calls += 1
            if self.calls == 2:  # after q_proj and k_proj of block 0 were permuted
                raise RuntimeError("boom")
            return super().replace(name, new)

    cfg = S2ftConfig(head_ratio=0.5, targets=_ALL, seed=1)  # block 0 draws head 2: order [2, 0, 1, 3]
    model, reference = tiny_llama(), tiny_llama()
    log = FailingLog(model)
    with pytest.raises(RuntimeError, match="boom"):
        apply_s2ft(model, _captured("llama")[0], cfg, log)
    log.undo()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- numerics


def _out_loss(model, batch):
    return model(**batch).loss


def _logical(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return weight if kind == "linear" else weight.t()  # [out, in]


def _original_slice(layer: S2ftLinear, weight: torch.Tensor) -> torch.Tensor:
    """The rows/columns of an original-order ``weight`` [out, in] that ``layer``'s block holds."""
    index = layer.s2ft_perm[layer.block_start:layer.block_start + layer.block_size]  # original indices
    return weight[index] if layer.axis == "out" else weight[:, index]


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "gpt2"])
def test_block_gradients_equal_the_dense_reference(family):
    model, reference, batch, _ = _s2ft(family, head_ratio=0.5, channel_ratio=0.25, targets=_ALL, seed=1)
    model.eval(), reference.eval()  # dropout off: one function
    layers = {n: m for n, m in _layers(model).items() if m.s2ft_block is not None}
    assert len(layers) >= 6
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every block away from W, and the reference's W the same way
        for name, layer in layers.items():
            delta = torch.randn(layer.s2ft_block.shape, generator=gen) * 0.05
            layer.s2ft_block.add_(delta)
            ref = _logical(reference.get_submodule(name).weight, layer.kind)
            index = layer.s2ft_perm[layer.block_start:layer.block_start + layer.block_size]
            if layer.axis == "out":
                ref[index] += delta
            else:
                ref[:, index] += delta
    _out_loss(model, batch).backward()
    _out_loss(reference, batch).backward()  # every original parameter requires grad
    for name, layer in layers.items():
        expected = _original_slice(layer, _logical(reference.get_submodule(name).weight.grad, layer.kind))
        torch.testing.assert_close(layer.s2ft_block.grad, expected, atol=_GRAD_ATOL, rtol=_GRAD_RTOL, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if "s2ft_block" not in n)


def test_only_blocks_train_and_gradients_accumulate():
    model, _, batch, result = _s2ft("llama", head_ratio=0.5, channel_ratio=0.1, targets=_ALL)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("s2ft_block") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(d.trainable_params for d in result.decisions)
    model.eval()
    _out_loss(model, batch).backward()
    once = {n: p.grad.clone() for n, p in trainable.items()}
    _out_loss(model, batch).backward()
    for n, p in trainable.items():
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, 2 * once[n], atol=1e-6, rtol=1e-6)  # ordinary .grad accumulation


def test_a_few_steps_reduce_the_loss_and_merge_keeps_the_function():
    model, reference, batch, _ = _s2ft("qwen2", head_ratio=0.5, channel_ratio=0.25, targets=_ALL)
    original_keys = list(reference.state_dict())
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = _out_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():
        trained = _out(model, batch)
    merged = merge_s2ft(model)
    assert not _layers(merged) and list(merged.state_dict()) == original_keys
    with torch.no_grad():
        # merge swaps the split GEMMs for one and reorders sums back: a few ulps of ~1-sized logits
        torch.testing.assert_close(_out(merged, batch), trained, atol=1e-5, rtol=0)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, reference.get_parameter(n))}
    assert changed and all(n.rpartition(".")[2] == "weight" for n in changed)
    assert {n.split(".")[-2] for n in changed} <= {"v_proj", "o_proj", "up_proj", "down_proj"}


def test_state_dict_round_trips_with_permutations_and_selections():
    model, _, batch, _ = _s2ft("phi3", head_ratio=0.5, channel_ratio=0.1, targets=_ALL, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    state = model.state_dict()
    assert any(k.endswith("s2ft_perm") for k in state) and any(k.endswith("s2ft_selected") for k in state)
    fresh, *_ = _s2ft("phi3", head_ratio=0.5, channel_ratio=0.1, targets=_ALL, seed=2)
    fresh.load_state_dict(state, strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(_out(fresh, batch), _out(model, batch))


# ----------------------------------------------------------------------------- partial backprop


_N, _IN, _OUT, _K = 24, 48, 40, 8  # tokens, in_features, out_features, block width


def _layer(axis: str, start: int = 0) -> S2ftLinear:
    torch.manual_seed(0)
    base = nn.Linear(_IN, _OUT).requires_grad_(False)
    length = _OUT if axis == "out" else _IN
    return S2ftLinear(base, "linear", axis, torch.arange(length), torch.tensor([0]), block=(start, _K))


@pytest.mark.parametrize("axis,start", [("out", 0), ("out", 16), ("in", 0), ("in", 8)])
def test_backward_flops_are_grad_x_plus_the_block_weight_grad(axis, start):
    layer = _layer(axis, start)
    x = torch.randn(2, _N // 2, _IN, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = layer(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    block = _K * _IN if axis == "out" else _OUT * _K
    assert fwd.get_total_flops() == 2 * _N * _IN * _OUT  # one GEMM's worth, split at the block
    assert bwd.get_total_flops() == 2 * _N * _IN * _OUT + 2 * _N * block  # grad_x + grad_block only
    dense = nn.Linear(_IN, _OUT)
    with FlopCounterMode(display=False) as full:
        dense(x.detach().requires_grad_()).sum().backward()
    assert full.get_total_flops() == 3 * 2 * _N * _IN * _OUT  # forward + grad_x + grad_W
    reference = x.detach().requires_grad_()
    effective = layer.base_layer.weight.detach().clone()
    (effective[start:start + _K] if axis == "out" else effective[:, start:start + _K]).copy_(layer.s2ft_block)
    torch.nn.functional.linear(reference, effective, layer.base_layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-6, rtol=1e-6)  # grad_x is the full one


def test_without_an_input_gradient_backward_is_the_block_gemm_alone():
    layer = _layer("in")
    x = torch.randn(_N, _IN)  # e.g. the first layer: nothing below needs a gradient
    y = layer(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    assert bwd.get_total_flops() == 2 * _N * _OUT * _K and layer.base_layer.weight.grad is None


def test_a_column_block_saves_only_a_copy_of_its_input_slice():
    for axis, saved in (("in", _N * _K * 4), ("out", _N * _IN * 4)):  # fp32 x[:, :k] vs all of x
        layer, leaf = _layer(axis), torch.randn(_N, _IN, requires_grad=True)
        with MemoryTracker(layer) as tracker:
            x = leaf * 2  # an activation, as the previous layer's output would be
            y = layer(x)
            assert tracker.live().activations == saved, axis
            before = tracker.live().temporaries
            del x  # a column block kept nothing that refers to x: its memory goes now
            freed = before - tracker.live().temporaries
            y.sum().backward()
        assert freed == (_N * _IN * 4 if axis == "in" else 0), axis


@pytest.mark.parametrize("axis", ["out", "in"])
def test_blocks_compile_without_graph_breaks(axis):
    layer = _layer(axis, start=8)
    x = torch.randn(_N, _IN, requires_grad=True)
    layer(x).square().sum().backward()
    eager_x, eager_block = x.grad, layer.s2ft_block.grad
    x.grad = layer.s2ft_block.grad = None
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    torch.testing.assert_close(x.grad, eager_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.s2ft_block.grad, eager_block, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- optimize


def test_optimize_end_to_end_records_the_plan_and_merges():
    model, reference = tiny_mistral(), tiny_mistral()
    batch = lm_batch(model)
    optimized = memopt.optimize(model, 1, batch, method="s2ft", head_ratio=0.5, channel_ratio=0.1,
                                targets=["o", "down"], seed=0)
    plan = optimized.plan
    assert plan.method == "s2ft" and plan.method_config["targets"] == ("o", "down")
    trained = [m for m in plan.modules if m.method == "s2ft"]
    assert {m.role for m in trained} == {"o", "down"}
    assert plan.trainable_params == sum(m.trainable_params for m in trained)
    assert all({"ratio", "selected", "seed", "unit"} <= m.details.keys() for m in trained)
    assert plan.module("lm_head").method == "frozen"
    assert type(plan).from_json(plan.to_json()) == plan
    assert "selected=" in plan.summary()
    loss = optimized(**batch).loss
    loss.backward()
    plain = optimized.merge()
    assert list(plain.state_dict()) == list(reference.state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # flags restored by identity: weights permuted in place
    plain.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(plain, batch), _out(reference, batch), atol=_PRESERVE_ATOL, rtol=0)


def test_registry_has_s2ft():
    spec = get_pass("s2ft")
    # every method's merge dequantizes first (a no-op without quantized layers), then merges
    assert spec.apply is apply_s2ft and spec.merge.__wrapped__ is merge_s2ft
