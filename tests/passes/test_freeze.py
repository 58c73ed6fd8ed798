"""Freeze / partial backprop: exact backward FLOP counts against the analytical count.

``FlopCounterMode`` counts the matmul family (mm, addmm, bmm, ...), 2 FLOPs per multiply-add;
elementwise ops, norms, softmax and losses count 0. The Llama here uses eager attention, whose
matmuls are counted (the CPU flash-attention kernel behind SDPA has no FLOP formula in torch).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memopt.config import PacaConfig
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog
from memopt.passes.freeze import apply_freeze, backward_reach, freeze, top_blocks
from memopt.passes.paca import apply_paca
from tests.models import HEADS, HIDDEN, INTERMEDIATE, VOCAB, lm_batch, tiny_gpt2, tiny_llama, tiny_mlp

B, T = 2, 16  # lm_batch's shape
N = B * T  # tokens


def _gemm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _backward_flops(model, batch) -> int:
    loss = model(**batch).loss if isinstance(batch, dict) else model(batch).sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def _llama():
    model = tiny_llama(attn_implementation="eager")
    batch = lm_batch(model)
    return model, batch, build_model_graph(model, (), batch)


# One Llama block's backward with every parameter trained: each of the 7 Linear layers computes
# its weight gradient and its grad_x (the block's norm weights train, so even q/k/v need grad_x),
# and eager attention's two batched matmuls take two each: dQ, dK, dP, dV.
_ATTN = 4 * 2 * B * HEADS * T * T * (HIDDEN // HEADS)
_BLOCK = 2 * (4 * _gemm(N, HIDDEN, HIDDEN) + 3 * _gemm(N, HIDDEN, INTERMEDIATE)) + _ATTN
_HEAD_GRAD_X = _gemm(N, VOCAB, HIDDEN)  # the frozen lm_head still passes the gradient down


def test_a_frozen_linear_computes_no_weight_gradient_gemm():
    model = tiny_mlp((32, 64, 64, 10))  # Linear 0 (32->64), ReLU, Linear 2 (64->64), ReLU, Linear 4 (64->10)
    x = torch.randn(8, 32)
    full = _backward_flops(model, x)
    freeze(model, ["0", "4"])  # Linear 2 frozen, between two trained layers
    partial = _backward_flops(model, x)
    # 4: weight grad + grad_x; 2: grad_x only; 0: weight grad only (the input needs no grad).
    assert partial == _gemm(8, 10, 64) * 2 + _gemm(8, 64, 64) + _gemm(8, 32, 64)
    assert full - partial == _gemm(8, 64, 64)  # exactly Linear 2's weight-gradient GEMM
    freeze(model, ["4"])
    assert _backward_flops(model, x) == _gemm(8, 64, 10)  # only the top weight gradient


@pytest.mark.parametrize("k", [1, 2])
def test_backward_below_the_top_k_blocks_does_no_work(k):
    model, batch, graph = _llama()
    result = apply_freeze(model, graph, list(top_blocks(graph, k)), RewriteLog(model))
    assert _backward_flops(model, batch) == _HEAD_GRAD_X + k * _BLOCK
    reach = backward_reach(model, **batch)
    assert not any(name.startswith("model.embed_tokens") for name in reach)
    assert any(name.startswith("model.layers.0.") for name in reach) == (k == 2)
    assert f"backward stops at model.layers.{2 - k}.self_attn.q_proj" in result.notes[0]


def test_full_fine_tuning_costs_more_than_the_top_block_by_exactly_the_block_below():
    model, batch, graph = _llama()
    full = _backward_flops(model, batch)
    apply_freeze(model, graph, list(top_blocks(graph, 1)), RewriteLog(model))
    top = _backward_flops(model, batch)
    # Full FT also trains the lm_head (its weight gradient) and block 0; the embedding's
    # backward is a scatter-add, no FLOPs.
    assert full - top == _BLOCK + _gemm(N, VOCAB, HIDDEN)


def test_paca_skips_grad_x_exactly_where_nothing_below_needs_it():
    model, batch, graph = _llama()
    apply_paca(model, graph, PacaConfig(rank=4, alpha=8), RewriteLog(model))
    shapes = [(layer.in_features, layer.out_features, layer.name) for layer in graph.linears if layer.role.value != "lm_head"]
    grad_p = sum(_gemm(N, out, 4) for _, out, _ in shapes)
    # Block 0's q/k/v read the normed embeddings, which need no gradient (everything below is
    # frozen): no grad_x there. Every other PaCA layer passes its gradient down.
    first = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    grad_x = sum(_gemm(N, out, n_in) for n_in, out, name in shapes if name not in first)
    assert _backward_flops(model, batch) == _HEAD_GRAD_X + grad_p + grad_x + 2 * _ATTN


def test_hf_input_require_grads_hook_is_reported_and_makes_backward_reach_the_bottom():
    model, batch, graph = _llama()
    model.enable_input_require_grads()  # what reentrant checkpointing needs
    result = apply_freeze(model, graph, list(top_blocks(graph, 1)), RewriteLog(model))
    assert any("enable_input_require_grads" in note and "disable_input_require_grads" in note for note in result.notes)
    assert any(name.startswith("model.layers.0.") for name in backward_reach(model, **batch))
    # The wasted work: grad_x through block 0 (7 Linear layers and attention), no weight gradients.
    wasted = 4 * _gemm(N, HIDDEN, HIDDEN) + 3 * _gemm(N, HIDDEN, INTERMEDIATE) + _ATTN
    assert _backward_flops(model, batch) == _HEAD_GRAD_X + _BLOCK + wasted


def test_decisions_say_which_layers_train():
    model, _, graph = _llama()
    result = apply_freeze(model, graph, r"model\.layers\.1\.mlp\..*", RewriteLog(model))
    trained = {d.name for d in result.decisions if d.method == "full"}
    assert trained == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert {d.method for d in result.decisions} == {"full", "frozen"}
    assert "backward stops at model.layers.1.mlp.gate_proj (block 1)" in result.notes[0]


def test_top_blocks_are_named_by_structure():
    llama, _, graph = _llama()
    assert top_blocks(graph, 2) == ("model.layers.0", "model.layers.1")
    gpt2 = tiny_gpt2()
    assert top_blocks(build_model_graph(gpt2, (), lm_batch(gpt2)), 1) == ("transformer.h.1",)
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        top_blocks(graph, 3)


def test_unknown_module_names_are_an_error_and_undo_restores_the_flags():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="'layers.9', which holds no parameter"):
        freeze(model, ["layers.9"])
    log = RewriteLog(model)
    assert freeze(model, ["4"], log) == ("4.weight", "4.bias")
    log.undo()
    assert all(p.requires_grad for p in model.parameters())
