"""Folding zero tangents out of a backward graph: Before / Expected pairs, and the runtime's variants."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_function

from memopt.runtime.tangents import BackwardVariants, drop_gradients, fold_zero_tangents, tangent_positions

aten = torch.ops.aten


def _backward_of(fn, *inputs) -> fx.GraphModule:
    """The backward graph AOTAutograd makes for ``fn`` (every output differentiable)."""
    graphs = {}

    def keep(gm: fx.GraphModule, example_inputs: list):
        graphs["bw"] = gm
        return gm

    out = aot_function(fn, fw_compiler=lambda gm, _: gm, bw_compiler=keep)(*inputs)
    torch.autograd.backward([o for o in out if o.requires_grad], [torch.ones_like(o) for o in out if o.requires_grad])
    return graphs["bw"]


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _loss_and_logits(x, w):
    logits = x @ w  # [4, 6]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    return loss, logits


def test_an_unused_logits_tangent_folds_away_to_the_losss_backward_alone():
    x, w = torch.randn(4, 5), torch.randn(5, 6, requires_grad=True)
    bw = _backward_of(_loss_and_logits, x, w)
    logits_tangent = tangent_positions(bw)[1]
    # Before: the logits' tangent is added to the loss's gradient of the logits.
    assert aten.add.Tensor in _targets(bw)
    folded = fold_zero_tangents(bw, {logits_tangent})
    # Expected: no add, and nothing reads the logits' tangent.
    assert aten.add.Tensor not in _targets(folded)
    placeholders = [n for n in folded.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len([n for n in bw.graph.nodes if n.op == "placeholder"])  # positions kept
    assert not placeholders[logits_tangent].users


def test_the_folded_graph_computes_what_autograd_computes_for_the_loss_alone():
    x, w = torch.randn(4, 5), torch.randn(5, 6, requires_grad=True)
    (ref,) = torch.autograd.grad(_loss_and_logits(x, w)[0], w)
    fn = aot_function(_loss_and_logits, fw_compiler=lambda gm, _: gm,
                      bw_compiler=lambda gm, ex: _boxed(BackwardVariants(gm, ex, lambda g, _: _boxed_graph(g))))
    loss, logits = fn(x, w)
    loss.grad_fn.set_materialize_grads(False)
    (got,) = torch.autograd.grad(loss, w)
    assert torch.equal(got, ref)


def test_a_gradient_reached_only_through_folded_tangents_becomes_none():
    def two_heads(x, w1, w2):
        return (x @ w1).sum(), x @ w2  # w2 feeds only the second output

    x, w1, w2 = torch.randn(3, 4), torch.randn(4, 2, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    bw = _backward_of(two_heads, x, w1, w2)
    folded = fold_zero_tangents(bw, {tangent_positions(bw)[1]})
    output = next(n for n in folded.graph.nodes if n.op == "output")
    grads = output.args[0]
    assert grads[-1] is None and grads[-2] is not None  # d/dw2: None, as eager autograd leaves it


def test_a_zero_reaching_an_op_without_a_rule_is_passed_as_real_zeros():
    def cumulative(x, w):
        y = x @ w
        return y.sum(), y.cumsum(0)  # cumsum's backward flips: no folding rule

    x, w = torch.randn(3, 4), torch.randn(4, 2, requires_grad=True)
    bw = _backward_of(cumulative, x, w)
    assert fold_zero_tangents(bw, {tangent_positions(bw)[1]}) is None
    (ref,) = torch.autograd.grad(cumulative(x, w)[0], w)
    fn = aot_function(cumulative, fw_compiler=lambda gm, _: gm,
                      bw_compiler=lambda gm, ex: _boxed(BackwardVariants(gm, ex, lambda g, _: _boxed_graph(g))))
    loss, _ = fn(x, w)
    loss.grad_fn.set_materialize_grads(False)
    (got,) = torch.autograd.grad(loss, w)  # the unfolded graph with a zero tensor for the cumsum's tangent
    assert torch.equal(got, ref)


def _boxed(fn):
    def run(args):
        return fn(args)

    run._boxed_call = True
    return run


def _boxed_graph(gm: fx.GraphModule):
    def run(args):
        out = gm(*args)
        args.clear()
        return out

    return run


def _two_layers(x, w1, w2):
    return ((x @ w1).relu() @ w2).sum()


def test_dropping_a_gradient_removes_the_ops_that_only_made_it():
    x, w1, w2 = torch.randn(3, 4), torch.randn(4, 5, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    bw = _backward_of(lambda *a: (_two_layers(*a),), x, w1, w2)
    outputs = next(n for n in bw.graph.nodes if n.op == "output").args[0]
    assert outputs[1] is not None and outputs[2] is not None  # before: both weights' gradients
    mms = sum(t is aten.mm.default for t in _targets(bw))
    pruned = drop_gradients(bw, {1})  # w1 frozen at this call
    out = next(n for n in pruned.graph.nodes if n.op == "output").args[0]
    assert out[1] is None and out[2] is not None
    # w1's gradient GEMM and the grad-of-activation GEMM only it needed are gone: w2's gradient alone remains
    assert sum(t is aten.mm.default for t in _targets(pruned)) == mms - 2 == 1
    assert len([n for n in pruned.graph.nodes if n.op == "placeholder"]) == len(
        [n for n in bw.graph.nodes if n.op == "placeholder"])  # positions kept


def test_a_backward_variant_per_set_of_dropped_gradients_computes_what_autograd_does():
    x, w1, w2 = torch.randn(3, 4), torch.randn(4, 5), torch.randn(5, 2)
    dropped = {"positions": frozenset()}
    fn = aot_function(_two_layers, fw_compiler=lambda gm, _: gm,
                      bw_compiler=lambda gm, ex: _boxed(BackwardVariants(gm, ex, lambda g, _: _boxed_graph(g),
                                                                         lambda: dropped["positions"])))
    for frozen in (frozenset(), frozenset({1}), frozenset({2})):
        # the step traced with both weights trainable; a frozen one passed as a trainable stand-in
        a, b = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        dropped["positions"] = frozen
        fn(x, a, b).backward()
        ra, rb = w1.clone().requires_grad_(1 not in frozen), w2.clone().requires_grad_(2 not in frozen)
        _two_layers(x, ra, rb).backward()
        for got, want in ((a, ra), (b, rb)):
            assert (got.grad is None) == (want.grad is None)  # a dropped gradient never reaches .grad
            assert got.grad is None or torch.equal(got.grad, want.grad)
