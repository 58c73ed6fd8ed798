"""Backward graphs for outputs nobody differentiated: their tangents are known zeros, folded away.

Design note. The planned region is the model's forward and backward, so every output it returns
keeps its gradient (logits, hidden states): a loss computed from them in the user's code gets exact
gradients. When the loop backpropagates only some outputs (``out.loss.backward()``), autograd would
hand the backward a zero tensor for every other one — a logits-sized allocation at the start of the
backward that plain eager autograd never makes. The runtime asks autograd for ``None`` instead
(``set_materialize_grads(False)`` on the step's node) and runs a *variant* of the backward graph in
which those tangents are zero: :func:`fold_zero_tangents` propagates the zeros forward through the
graph — a view, cast, product or ``*_backward`` op of a zero is zero; ``a + 0`` is ``a`` — so the
variant computes what the rest of the backward needs with no zero tensor at all; what the user's
loss did differentiate comes in as a real tangent. A gradient that is zero throughout becomes
``None``, as eager autograd leaves a parameter its loss never reached.

Where a zero reaches an op no rule covers, the fold gives up on that tangent: the runtime then
passes a real zero tensor for it (exact; it costs the tensor's bytes, as torch's own AOTAutograd
does for every unused output).

Gradients nobody wants are the other kind of variant: a step traced with parameters trainable that
are frozen at a call (layerwise sampling plans every active set with one trace) runs the backward
with those gradients pruned (:func:`drop_gradients`): their outputs become ``None`` and every op
that only fed them — the weight-gradient GEMMs, a recomputation or a reload only they read, their
updates inside backward — is removed, so the call computes and allocates what a trace made with
those parameters frozen would, never more than the plan counted.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from memopt.runtime.in_backward import is_update

__all__ = ["fold_zero_tangents", "drop_gradients", "tangent_positions", "BackwardVariants"]

aten = torch.ops.aten

MAX_VARIANTS = 16  # backward variants kept per traced step (each a compiled graph)

# Ops whose result is zero when any tensor argument is zero (products, and ops that only move or
# reshape their one tensor argument).
_ZERO_IF_ANY = {
    aten.mul, aten.mm, aten.bmm, aten.matmul, aten.dot, aten.mv,
}
_ZERO_IF_FIRST = {  # zero when the first argument is (the other arguments are not gradients)
    aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.permute, aten.transpose, aten.t,
    aten.clone, aten.contiguous, aten._to_copy, aten.squeeze, aten.unsqueeze, aten.slice, aten.select,
    aten.alias, aten.neg, aten.sum, aten.mean, aten.div, aten.flatten, aten.unflatten, aten.split,
    aten.split_with_sizes, aten.unbind, aten.chunk, aten.narrow, aten.as_strided, aten.repeat,
    aten.index_select, aten.gather, aten.index, aten.embedding_dense_backward, aten.slice_backward,
    aten.select_backward, aten.expand_copy, aten.view_copy, aten.permute_copy, aten.transpose_copy,
    aten.t_copy, aten.squeeze_copy, aten.unsqueeze_copy, aten.diagonal, aten.tril, aten.triu,
}


def tangent_positions(gm: fx.GraphModule) -> tuple[int, ...]:
    """Positions of the tangent placeholders among ``gm``'s inputs (AOTAutograd names them ``tangents_*``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(i for i, n in enumerate(placeholders) if n.name.startswith("tangents"))


def fold_zero_tangents(gm: fx.GraphModule, zero: Iterable[int]) -> fx.GraphModule | None:
    """A copy of backward graph ``gm`` in which the placeholders at positions ``zero`` are zero
    tensors, folded away (see the module docstring); None when a zero reaches an op no rule covers.

    Requires: ``gm`` is an AOTAutograd backward graph (aten ops, ``getitem`` for tuple outputs).
    Ensures: the copy reads no placeholder in ``zero``; every other input and output keeps its
    position; outputs that are zero become ``None``.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env, return_output_node=True)
    out_value, old_output = output if isinstance(output, tuple) else (output, None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    zeros: set[fx.Node] = {placeholders[i] for i in zero}
    for node in list(graph.nodes):
        if node.op != "call_function" or node in zeros:
            continue
        hit = [a for a in _tensor_args(node) if a in zeros]
        if not hit:
            continue
        result = _fold(graph, node, zeros)
        if result is None:
            return None
        if result is _ZERO:
            zeros.add(node)
        else:
            node.replace_all_uses_with(result)
            graph.erase_node(node)
    out_value = _outputs(out_value, zeros)
    if any(isinstance(n, fx.Node) and n in zeros for n in tree_flatten(out_value)[0]):
        return None  # pragma: no cover - _outputs replaced every zero
    graph.output(out_value)
    if old_output is not None:
        graph.output_node().meta = dict(old_output.meta)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "placeholder" or n.is_impure(impure_random=False))
    graph.lint()
    return fx.GraphModule(gm, graph)


class _Zero:
    """The result of folding a node whose value is zero."""


_ZERO = _Zero()


def _fold(graph: fx.Graph, node: fx.Node, zeros: set[fx.Node]) -> Any:
    """``_ZERO`` if ``node`` is zero, a replacement node, or None (no rule)."""
    target = node.target
    is_zero = lambda a: isinstance(a, fx.Node) and a in zeros  # noqa: E731
    if target is operator.getitem:
        return _ZERO if is_zero(node.args[0]) else None
    if not isinstance(target, torch._ops.OpOverload):
        return None
    packet, args = target.overloadpacket, node.args
    first = args[0] if args else None
    if packet in (aten.add, aten.sub):
        return _fold_sum(graph, node, packet is aten.sub, is_zero)
    if packet in _ZERO_IF_ANY:
        return _ZERO
    if packet in (aten.index_put, aten.index_add, aten.scatter_add):
        src = args[2] if packet is aten.index_put else args[3]
        if is_zero(first) and is_zero(src):
            return _ZERO
        return first if is_zero(src) and _same_layout(first, node) else None
    if packet is aten.masked_fill:  # masked_fill(grad, mask, 0): zero stays zero
        return _ZERO if is_zero(first) and (is_zero(args[2]) or args[2] == 0) else None
    if packet is aten.where:  # where(cond, a, b)
        return _ZERO if all(is_zero(v) or v == 0 for v in args[1:3]) else None
    if packet is aten.cat:
        return _ZERO if all(is_zero(t) for t in first) else None
    if packet in _ZERO_IF_FIRST or _is_backward_op(packet):
        return _ZERO if is_zero(first) else None
    return None


def _fold_sum(graph: fx.Graph, node: fx.Node, subtract: bool, is_zero: Callable[[Any], bool]) -> Any:
    """``a + alpha·b`` / ``a - alpha·b`` with ``a`` or ``b`` zero."""
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    if is_zero(a) and is_zero(b):
        return _ZERO
    if is_zero(b):
        return a if _same_layout(a, node) else None
    if alpha != 1 or not _same_layout(b, node):
        return None
    if not subtract:
        return b
    with graph.inserting_before(node):
        neg = graph.call_function(aten.neg.default, (b,))
    neg.meta = dict(node.meta)
    return neg


def _is_backward_op(packet: Any) -> bool:
    """A derivative op of autograd: linear in its first argument, the incoming gradient."""
    name = packet.__name__
    return name.endswith("_backward") or name.endswith("_backward_data")


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return [a for a in leaves if isinstance(a, fx.Node)]


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _same_layout(a: Any, b: fx.Node) -> bool:
    """Can ``a`` stand in for ``b`` (same shape and dtype)?"""
    va, vb = getattr(a, "meta", {}).get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and va.shape == vb.shape and va.stride() == vb.stride()


def _outputs(value: Any, zeros: set[fx.Node]) -> Any:
    if isinstance(value, fx.Node):
        return None if value in zeros else value
    if isinstance(value, (list, tuple)):
        return type(value)(_outputs(v, zeros) for v in value)
    return value


def drop_gradients(gm: fx.GraphModule, positions: Iterable[int]) -> fx.GraphModule:
    """A copy of backward graph ``gm`` whose outputs at ``positions`` (gradients) are ``None``, with
    every op that only fed them removed (updates inside backward of those positions included; the
    offload reloads only they read too). Requires: ``gm`` is an AOTAutograd backward graph."""
    drop = set(positions)
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    out_value, old_output = output if isinstance(output, tuple) else (output, None)
    outs = list(out_value) if isinstance(out_value, (list, tuple)) else [out_value]
    for i in drop:
        if i < len(outs):
            outs[i] = None
    for node in list(graph.nodes):
        if is_update(node) and node.args[2] in drop:
            graph.erase_node(node)
    graph.output(type(out_value)(outs) if isinstance(out_value, (list, tuple)) else outs[0])
    if old_output is not None:
        graph.output_node().meta = dict(old_output.meta)
    graph.eliminate_dead_code(is_impure_node=_kept)
    graph.lint()
    return fx.GraphModule(gm, graph)


_RELOADS = ("memopt.reload_to_device", "memopt.wait_transfer", "memopt.reload_simulated")


def _kept(node: fx.Node) -> bool:
    """Is ``node`` kept even when nothing reads it? Placeholders and side effects, except the copies
    back from host (a reload nobody reads need not happen)."""
    if node.op == "placeholder":
        return True
    target = node.target
    name = f"{target.namespace}.{target._opname}" if isinstance(target, torch._ops.OpOverload) else ""
    return name not in _RELOADS and node.is_impure(impure_random=False)


class BackwardVariants:
    """A backward callable (AOTAutograd's boxed convention) that runs, for each set of tangents
    the caller leaves ``None``, the graph with those tangents folded away — built on first use by
    ``compile_graph(gm, example_inputs)``. A tangent that does not fold is passed as real zeros."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list,
                 compile_graph: Callable[[fx.GraphModule, list], Callable[[list], Any]],
                 dropped: Callable[[], frozenset[int]] = frozenset) -> None:
        self.gm, self.example_inputs, self.compile_graph = gm, list(example_inputs), compile_graph
        self.dropped = dropped  # the gradient outputs this call does not want (drop_gradients)
        self.positions = tangent_positions(gm)
        self._symbols = {x.node.expr: i for i, x in enumerate(self.example_inputs)
                         if isinstance(x, torch.SymInt) and x.node.expr.is_Symbol}
        self._variants: OrderedDict[tuple[frozenset[int], frozenset[int]],
                                    tuple[Callable[[list], Any], frozenset[int]]] = OrderedDict()
        self._boxed_call = True

    def __call__(self, args: list) -> Any:
        key = (frozenset(i for i in self.positions if args[i] is None), self.dropped())
        entry = self._variants.get(key)
        if entry is None:
            entry = self._variants[key] = self._build(*key)
            while len(self._variants) > MAX_VARIANTS:
                self._variants.popitem(last=False)
        self._variants.move_to_end(key)
        run, materialize = entry
        for i in materialize:
            args[i] = _zeros_like_example(self.example_inputs[i], args, self._symbols)
        return run(args)

    @property
    def variants(self) -> int:
        return len(self._variants)

    def _build(self, zero: frozenset[int], dropped: frozenset[int]) -> tuple[Callable[[list], Any], frozenset[int]]:
        gm = drop_gradients(self.gm, dropped) if dropped else self.gm
        if not zero:
            return self.compile_graph(gm, self.example_inputs), frozenset()
        folded = fold_zero_tangents(gm, zero)
        if folded is not None:
            return self.compile_graph(folded, self.example_inputs), frozenset()
        foldable = frozenset(i for i in zero if fold_zero_tangents(gm, {i}) is not None)
        folded = fold_zero_tangents(gm, foldable) if foldable else gm
        assert folded is not None
        return self.compile_graph(folded, self.example_inputs), zero - foldable


def _zeros_like_example(example: Any, args: list, symbols: dict) -> torch.Tensor:
    """A real zero tensor of a tangent's traced layout; symbolic sizes are read off ``args``."""
    shape = [_concrete(size, args, symbols) for size in example.shape]
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), example.device)
    return torch.zeros(shape, dtype=example.dtype, device=device)


def _concrete(size: Any, args: list, symbols: dict) -> int:
    """``size`` (an int, or a SymInt of the trace) at this call: its symbols are the graph's
    SymInt inputs, whose values ``args`` holds at ``symbols[symbol]``."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    values = {sym: args[i] for sym, i in symbols.items() if sym in expr.free_symbols}
    if set(values) != set(expr.free_symbols):
        raise RuntimeError(f"memopt cannot size a zero gradient of symbolic size {expr}: its sizes are not "
                           "inputs of the backward graph")
    return int(expr.xreplace(values))
