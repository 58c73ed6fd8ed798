"""Structure analysis: which Linear-like layers a model has and what each one does.

Design note: everything is inferred from dataflow in the captured graph, never from module names
(names only break the last tie for an lm_head). The analysis runs in four steps:

1. *Linear calls* — ops that multiply an activation by a 2-D parameter that is the ``.weight`` of
   a module: ``aten.linear`` / ``call_module`` nn.Linear (``kind="linear"``, weight ``[out, in]``)
   and ``addmm``/``mm``/``matmul`` with the weight as right operand (``kind="conv1d"``, HF Conv1D,
   weight ``[in, out]``). Linear-like ops on a parameter that is not a module's ``.weight`` (the
   packed ``in_proj_weight`` of ``nn.MultiheadAttention``) are walls for the walks below but are
   not reported, since passes rewrite modules, not raw parameters.
2. *Attention cores* — ``scaled_dot_product_attention`` (any variant) or the eager pattern
   ``matmul(q, kᵀ) → softmax → matmul(·, v)``. q/k/v are the nearest linear calls upstream of the
   core's operands (through views, rotary, repeat_kv, splits); all three the same → fused ``qkv``.
   ``o`` is the nearest linear call downstream. Heads are counted, not parsed: ``head_dim`` is the
   last dim of q at the core, and a projection's head count is the smallest tensor on its path to
   the core whose last dim is ``head_dim``, divided by ``tokens · head_dim`` (after a fused split,
   before repeat_kv) — so GQA, fused qkv and GPT-NeoX's per-head [q|k|v] layout need no cases.
3. *MLPs* — for every other linear D, the linear calls feeding it: two (G, U) reading the same
   tensor, one through an activation, combined by a ``mul`` → gate/up/down; one (U) through an
   activation with ``U.out == D.in`` and ``D.out == U.in`` → up/down; one with
   ``U.out == 2·D.in`` that is split → fused gate_up/down.
4. *lm_head* — a linear with no linear after it whose out_features is the vocabulary (the largest
   ``nn.Embedding``) or whose weight is an embedding's weight (tied).

Blocks are numbered by attention core in graph order; an MLP joins the block of the last attention
before it (or, in a model without attention, MLPs are numbered in order). ``nn.MultiheadAttention``
captured by export yields an ``AttentionInfo`` with ``o = "<mha>.out_proj"`` and q/k/v/qkv ``None``
(its in-projection is a packed parameter, not a module); under symbolic_trace it is an opaque leaf.
Linears in no group (poolers, classifiers, a partially fused kv) are ``Role.OTHER`` with block None.
Results are also written to the fx nodes as ``memopt.ir.meta.NodeMeta`` (``linear`` / ``attention``).

Checked (tests/ir) on HF Llama, Mistral, Qwen2, Phi-3, GPT-2, GPT-NeoX, OPT, BERT (base, MLM,
classifier) with SDPA and eager attention — all captured by torch.export — and on plain modules,
through export and through the symbolic_trace fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx import Node

from memopt.errors import UnsupportedModelError
from memopt.ir.capture import CapturedGraph, capture, node_shape, op_name
from memopt.ir.meta import AttentionMeta, LinearMeta, Role, annotate

__all__ = ["Role", "LinearLayer", "AttentionInfo", "MLPInfo", "Coupling", "ModelGraph", "analyze", "build_model_graph"]

log = logging.getLogger("memopt")

_Roles = dict[Node, tuple[Role, int | None]]  # linear-call node -> (role, block)

_MATMULS = {"matmul", "bmm", "baddbmm", "mm"}
_ACTIVATIONS = ("silu", "gelu", "relu", "mish", "leaky_relu", "elu", "selu", "hardswish", "relu6", "sigmoid")
_VIEWS = {"view", "reshape", "flatten", "contiguous", "alias"}
_SPLITS = {"chunk", "split", "split_with_sizes", "slice", "unbind", "narrow", "tensor_split"}


# ----------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class LinearLayer:
    """One Linear-like module. ``kind``: "linear" (weight [out, in]) or "conv1d" (weight [in, out])."""

    name: str
    kind: str
    in_features: int
    out_features: int
    bias: bool
    role: Role
    block: int | None


@dataclass(frozen=True)
class AttentionInfo:
    """One attention core: its projection modules (``None`` where absent) and head geometry."""

    block: int
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    qkv: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for MHA, >1 for GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLPInfo:
    """One MLP: ``gate``/``up`` or fused ``gate_up`` feeding ``down`` through ``activation``."""

    block: int | None
    gate: str | None
    up: str | None
    down: str
    gate_up: str | None
    activation: str


@dataclass(frozen=True)
class Coupling:
    """``producer``'s output channels are ``consumer``'s input channels (permute them together)."""

    producer: str
    consumer: str
    kind: str


@dataclass(frozen=True)
class ModelGraph:
    """The captured graph plus the structure inferred from it."""

    captured: CapturedGraph
    linears: tuple[LinearLayer, ...]
    attention: tuple[AttentionInfo, ...]
    mlps: tuple[MLPInfo, ...]
    couplings: tuple[Coupling, ...]
    notes: tuple[str, ...] = ()  # weights left alone, and why (see ``_left_alone``)
    inputs: tuple[tuple, Mapping[str, Any]] | None = None  # the (args, kwargs) captured with, for calibration

    def linear(self, name: str) -> LinearLayer:
        """The Linear-like layer named ``name`` (module FQN)."""
        for layer in self.linears:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.linears[:8])
        raise KeyError(f"no Linear-like layer named {name!r}; known layers include: {known or '(none)'}")

    def by_role(self, *roles: Role) -> tuple[LinearLayer, ...]:
        """Layers whose role is one of ``roles``, in graph order."""
        return tuple(layer for layer in self.linears if layer.role in roles)

    def summary(self) -> str:
        """A readable table of layers, then attention and MLP groups."""
        return "\n".join([*_linear_table(self.linears), *_group_lines(self)])


def build_model_graph(model: nn.Module, args: tuple = (), kwargs: Mapping | None = None) -> ModelGraph:
    """Capture ``model(*args, **kwargs)`` and analyse its structure."""
    graph = analyze(capture(model, args, kwargs), model)
    return dataclasses.replace(graph, inputs=(tuple(args), dict(kwargs or {})))


def analyze(captured: CapturedGraph, model: nn.Module) -> ModelGraph:
    """Infer Linear roles, attention heads, MLPs and couplings from ``captured``'s dataflow.

    Requires: ``captured`` was captured from ``model`` (same parameter FQNs) and carries shapes.
    Ensures: every reported Linear call node has ``NodeMeta.linear``; every core ``NodeMeta.attention``.
    """
    graph = _Graph.build(captured, model)
    cores = [c for c in (_attention_core(graph, n) for n in graph.nodes) if c is not None]
    attention = [_attention_info(graph, core, i) for i, core in enumerate(cores)]
    roles: _Roles = {}
    for core, info in zip(cores, attention):
        roles.update(_attention_roles(core, info))
    mlps = _find_mlps(graph, cores, roles)
    roles.update(_lm_heads(graph, model, roles))
    linears = _annotate(graph, roles, cores, attention)
    result = ModelGraph(captured, linears, tuple(attention), tuple(mlps), _couplings(attention, mlps),
                        _left_alone(graph, captured, model))
    log.debug("memopt: structure of %s\n%s", type(model).__name__, result.summary())
    return result


def _left_alone(graph: "_Graph", captured: CapturedGraph, model: nn.Module) -> tuple[str, ...]:
    """Notes on weights a pass will not rewrite: used like a Linear's by a module that is not
    Linear-like (a MoE router, a custom module), read without calling their module
    (``nn.MultiheadAttention``'s ``out_proj``; Mamba's ``dt_proj``, never called), 3-D (MoE experts), or a
    convolution's (one note)."""
    notes: dict[str, str] = {}
    modules = dict(model.named_modules())
    for call in graph.calls.values():
        fqn = captured.param_of_node.get(getattr(call.weight, "name", ""), "")
        if call.module is not None or not fqn:
            continue
        owner = fqn.rpartition(".")[0]
        module = modules.get(owner)
        if module is None or getattr(module, "weight", None) is not _parameter(model, fqn):
            continue
        if is_linear_like(module):
            parent = type(modules.get(owner.rpartition(".")[0], model)).__name__
            notes[owner] = (f"{owner} ({type(module).__name__}) left alone: {parent} reads its weight without calling "
                            "it, so a rewrite of it would be bypassed")
        else:
            notes[owner] = (f"{owner} ({type(module).__name__}) left alone: it uses its weight like a Linear but is "
                            "not nn.Linear or Conv1D (a MoE router, or a custom layer whose forward memopt cannot "
                            "see into)")
    called = {call.module for call in graph.calls.values() if call.module is not None}
    for name, module in modules.items():
        if is_linear_like(module) and name not in called and name not in notes:
            notes[name] = (f"{name} ({type(module).__name__}) left alone: the traced step never calls it — unused, "
                           "or its weight is read directly (as Mamba's dt_proj.weight @ x), where a rewrite of it would "
                           "be bypassed")
    experts: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if p.dim() == 3 and not isinstance(modules.get(owner), nn.modules.conv._ConvNd):  # (Conv1d: below)
            experts.setdefault(owner, []).append(attr)
    for owner, attrs in experts.items():
        notes[owner] = (f"{owner} ({type(modules[owner]).__name__}) left alone: its weights ({', '.join(attrs)}) are "
                        "3-D (mixture-of-experts experts), not Linear layers: no adapter, quantization or "
                        "sparse rewrite applies to them (frozen where the method trains adapters, trained as "
                        "they are where it trains the weights themselves: full, LISA, OwLore)")
    convolutions = [name for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)]
    if convolutions:
        kinds = sorted({type(modules[name]).__name__ for name in convolutions})
        notes["(convolutions)"] = (
            f"{len(convolutions)} convolutions ({', '.join(kinds)}: {', '.join(convolutions[:3])}"
            f"{', ...' if len(convolutions) > 3 else ''}) left alone: not Linear layers, so no adapter, quantization "
            "or sparse rewrite applies to them (frozen where the method trains adapters, trained as they are "
            "where it trains the weights themselves: full, LISA, OwLore)")
    return tuple(notes.values())


# ----------------------------------------------------------------------------- the graph view


@dataclass(frozen=True)
class _Call:
    """A Linear-like op node; ``module`` is None when the weight is not a module's ``.weight``."""

    node: Node
    input: Node
    module: str | None
    kind: str
    weight: Node | None
    in_features: int
    out_features: int
    bias: bool


_Match = tuple[list[tuple[_Call, Role]], str]  # an MLP's (projection, role) pairs and its activation


@dataclass(frozen=True)
class _Graph:
    nodes: tuple[Node, ...]
    order: Mapping[Node, int]
    ops: Mapping[Node, str]
    calls: Mapping[Node, _Call]
    products: frozenset[Node]  # matmuls of two activations (attention scores / mixing)

    @staticmethod
    def build(captured: CapturedGraph, model: nn.Module) -> "_Graph":
        nodes = tuple(captured.gm.graph.nodes)
        modules = dict(model.named_modules())
        gm_modules = dict(captured.gm.named_modules())
        ops = {n: op_name(n, gm_modules) for n in nodes}
        calls = {}
        for n in nodes:
            call = _linear_call(n, ops[n], captured.param_of_node, modules, model)
            if call is not None:
                calls[n] = call
        products = frozenset(n for n in nodes if ops[n] in _MATMULS and n not in calls)
        return _Graph(nodes, {n: i for i, n in enumerate(nodes)}, ops, calls, products)


def _linear_call(
    node: Node, op: str, param_of_node: Mapping[str, str], modules: Mapping[str, nn.Module], model: nn.Module
) -> _Call | None:
    if node.op == "call_module" and op == "linear":
        module = modules[str(node.target)]
        return _make_call(node, node.args[0], str(node.target), module, "linear", None)
    # aten.linear(x, W[out, in]); x @ W.T (FalconLinear); Conv1D: addmm(bias, x, W[in, out]) or mm(x, W[in, out])
    weight_pos, input_pos, kind = {"linear": (1, 0, "linear"), "addmm": (2, 1, "conv1d")}.get(op, (1, 0, "conv1d"))
    if op not in ("linear", "addmm", *_MATMULS) or len(node.args) <= weight_pos:
        return None
    weight = node.args[weight_pos]
    if kind == "conv1d" and isinstance(weight, Node) and _transposes_2d(weight):  # x @ W.T: a Linear's layout
        weight, kind = weight.args[0], "linear"
    fqn = param_of_node.get(weight.name) if isinstance(weight, Node) else None
    param = _parameter(model, fqn)
    if param is None or param.dim() != 2:
        return None
    owner = _owner(node, fqn, param, modules, kind)
    return _make_call(node, node.args[input_pos], owner, modules[owner] if owner is not None else None, kind, weight)


def _transposes_2d(node: Node) -> bool:
    """``t(W)``, ``W.T``, ``transpose(W, 0, 1)`` or ``permute(W, [1, 0])`` of a 2-D tensor."""
    name = str(getattr(getattr(node.target, "overloadpacket", node.target), "__name__", node.target)).lstrip("_")
    if name in ("t", "numpy_T", "T"):
        return True
    if name == "transpose" and len(node.args) >= 3:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return name == "permute" and len(node.args) >= 2 and [d % 2 for d in node.args[1]] == [1, 0]


def _parameter(model: nn.Module, fqn: str | None) -> torch.Tensor | None:
    if fqn is None:
        return None
    try:
        return model.get_parameter(fqn)
    except AttributeError:
        return None  # a buffer, not a parameter


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (any subclass: FalconLinear, NonDynamicallyQuantizableLinear) or HF's ``Conv1D``."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _owner(
    node: Node, fqn: str, param: torch.Tensor, modules: Mapping[str, nn.Module], kind: str
) -> str | None:
    """The Linear-like module (``is_linear_like``) holding ``param`` as ``.weight`` that the model
    *calls* here: the FQN's owner, else the innermost on the call stack. A module whose weight the
    forward reads without calling it (``nn.MultiheadAttention``'s ``out_proj``) is no owner: a
    rewrite of it would be bypassed."""
    stack = node.meta.get("nn_module_stack") or {}
    called = {str(path) for path, _ in stack.values()}
    candidates = [fqn.rpartition(".")[0], *reversed([str(path) for path, _ in stack.values()])]
    for name in candidates:
        module = modules.get(name)
        if module is None or not is_linear_like(module) or getattr(module, "weight", None) is not param:
            continue
        if called and name not in called:
            continue
        if kind == "linear" or not isinstance(module, nn.Linear):
            return name
    return None


def _make_call(node: Node, input_arg: object, name: str | None, module: nn.Module | None, kind: str,
               weight: Node | None) -> _Call:
    assert isinstance(input_arg, Node), f"Linear-like op without a tensor input: {node.format_node()}"
    if module is None:
        return _Call(node, input_arg, None, kind, weight, 0, 0, False)
    rows, cols = module.weight.shape
    n_in, n_out = (cols, rows) if kind == "linear" else (rows, cols)
    has_bias = getattr(module, "bias", None) is not None
    return _Call(node, input_arg, name, kind, weight, int(n_in), int(n_out), has_bias)


# ----------------------------------------------------------------------------- graph walks


def _walk(start: Node, walls: set[Node], up: bool) -> tuple[dict[Node, list[Node]], set[Node]]:
    """Breadth-first from ``start`` (inputs if ``up``, else users), stopping at ``walls``.

    Returns the walls reached, each with a shortest path (ordered wall → start if ``up``, start →
    wall otherwise), and every node visited.
    """
    came_from: dict[Node, Node | None] = {start: None}
    hits: dict[Node, list[Node]] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node in walls:
            hits[node] = _path(came_from, node, up)
            continue
        for nxt in node.all_input_nodes if up else node.users:
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return hits, set(came_from)


def _path(came_from: Mapping[Node, Node | None], end: Node, up: bool) -> list[Node]:
    path = [end]
    while (prev := came_from[path[-1]]) is not None:
        path.append(prev)
    return path if up else path[::-1]


def _nearest(hits: Mapping[Node, list[Node]], allowed: Iterable[Node]) -> tuple[Node, list[Node]] | None:
    """The unique allowed hit at the smallest distance (None if none or tied)."""
    allowed = set(allowed)
    ranked = sorted((len(p), id(n), n) for n, p in hits.items() if n in allowed)
    if not ranked or (len(ranked) > 1 and ranked[0][0] == ranked[1][0]):
        return None
    return ranked[0][2], hits[ranked[0][2]]


# ----------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class _Core:
    anchor: Node  # the SDPA node, or the matmul with v
    q: Node  # the query operand at the core: its last dim is head_dim
    q_call: _Call | None
    k_call: _Call | None
    v_call: _Call | None
    o_call: _Call | None
    paths: tuple[list[Node], list[Node]]  # projection → q operand, projection → k operand


def _attention_core(graph: _Graph, node: Node) -> _Core | None:
    op = graph.ops[node]
    if "scaled_dot_product" in op and "backward" not in op:
        named = [node.kwargs.get(n) for n in ("query", "key", "value")]
        q, k, v = [*node.args[:3], *named[len(node.args[:3]):]]
        return _resolve_core(graph, node, q, k, v)
    if op.endswith("softmax"):  # softmax, _softmax, _safe_softmax
        return _eager_core(graph, node)
    return None


def _eager_core(graph: _Graph, softmax: Node) -> _Core | None:
    walls = graph.products | set(graph.calls)
    scores = _nearest(_walk(softmax, walls, up=True)[0], graph.products)
    mixed = _nearest(_walk(softmax, walls, up=False)[0], graph.products)
    if scores is None or mixed is None:
        return None
    s_node, (p_node, p_path) = scores[0], mixed
    q, k = s_node.args[1:3] if graph.ops[s_node] == "baddbmm" else s_node.args[:2]
    weights_first = len(p_path) > 1 and p_path[-2] is p_node.args[0]
    v = p_node.args[1] if weights_first else p_node.args[0]
    return _resolve_core(graph, p_node, q, k, v)


def _resolve_core(graph: _Graph, anchor: Node, q: object, k: object, v: object) -> _Core | None:
    if not all(isinstance(x, Node) for x in (q, k, v)):
        return None
    walls = set(graph.calls)
    q_hit, k_hit, v_hit = (_nearest(_walk(x, walls, up=True)[0], walls) for x in (q, k, v))
    o_hit = _nearest(_walk(anchor, walls, up=False)[0], walls)
    if q_hit is None or k_hit is None:
        log.debug("memopt: attention at %s has no q/k projection; skipped", anchor.name)
        return None
    call = lambda hit: graph.calls[hit[0]] if hit is not None else None  # noqa: E731
    return _Core(anchor, q, call(q_hit), call(k_hit), call(v_hit), call(o_hit), (q_hit[1], k_hit[1]))


def _heads(path: Sequence[Node], head_dim: int) -> int:
    """Heads carried by a projection→core path: smallest head_dim-last tensor / (tokens · head_dim)."""
    proj = node_shape(path[0])
    sizes = [math.prod(s) for s in map(node_shape, path) if s and s[-1] == head_dim and math.prod(s) > 0]
    if proj is None or not sizes:
        raise _shape_error(path[0])
    tokens = math.prod(proj) // proj[-1]
    return max(1, min(sizes) // (tokens * head_dim))


def _shape_error(node: Node) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"structure analysis needs tensor shapes but node {node.format_node()} has none; "
        "capture with example inputs so shapes can be propagated."
    )


def _attention_info(graph: _Graph, core: _Core, block: int) -> AttentionInfo:
    head_dim = node_shape(core.q)
    if head_dim is None:
        raise _shape_error(core.q)
    d = head_dim[-1]
    heads, kv_heads = _heads(core.paths[0], d), _heads(core.paths[1], d)
    if heads % kv_heads:
        log.warning("memopt: attention block %d: %d query heads is not a multiple of %d kv heads", block, heads, kv_heads)
    names = [c.module if c is not None else None for c in (core.q_call, core.k_call, core.v_call)]
    fused = core.q_call is not None and core.q_call is core.k_call is core.v_call
    q, k, v = (None, None, None) if fused else names
    o = core.o_call.module if core.o_call is not None else None
    return AttentionInfo(block, q, k, v, o, names[0] if fused else None, heads, kv_heads, d)


def _attention_roles(core: _Core, info: AttentionInfo) -> _Roles:
    pairs = [(core.o_call, Role.O)]
    if info.qkv is not None:
        pairs.append((core.q_call, Role.QKV))
    else:
        shared = {id(c) for c in (core.q_call, core.k_call, core.v_call)}
        partial = len(shared) < 3  # e.g. a fused kv: no role for it in the Role enum
        pairs += [] if partial else [(core.q_call, Role.Q), (core.k_call, Role.K), (core.v_call, Role.V)]
    return {c.node: (role, info.block) for c, role in pairs if c is not None and c.module is not None}


# ----------------------------------------------------------------------------- MLPs


def _find_mlps(graph: _Graph, cores: Sequence[_Core], roles: _Roles) -> list[MLPInfo]:
    """MLPs in graph order; also writes their roles into ``roles``."""
    core_nodes = [c.anchor for c in cores]
    found: list[MLPInfo] = []
    for node, down in graph.calls.items():
        if node in roles or down.module is None:
            continue
        match = _mlp_for(graph, down, set(core_nodes), roles)
        if match is None:
            continue
        block = _block_of(graph, node, core_nodes, len(found))
        roles.update({c.node: (r, block) for c, r in match[0]})
        roles[node] = (Role.DOWN, block)
        found.append(_mlp_info(down, match, block))
    return found


def _mlp_for(graph: _Graph, down: _Call, cores: set[Node], roles: Mapping[Node, object]) -> _Match | None:
    """The projections feeding ``down`` as (call, role) pairs and the activation, or None."""
    hits, visited = _walk(down.input, set(graph.calls) | cores, up=True)
    if any(h in cores or h in roles for h in hits) or not hits:
        return None
    feeders = [graph.calls[h] for h in sorted(hits, key=graph.order.__getitem__)]
    if any(f.module is None for f in feeders):
        return None
    regions = [_region(f.node, visited) for f in feeders]
    if len(feeders) == 2:
        return _gated(graph, down, feeders, regions)
    if len(feeders) == 1:
        return _ungated(graph, down, feeders[0], regions[0])
    return None


def _region(start: Node, visited: set[Node]) -> set[Node]:
    """Nodes of ``visited`` (the upstream walk from a down projection) that depend on ``start``."""
    seen, queue = {start}, deque([start])
    while queue:
        for user in queue.popleft().users:
            if user in visited and user not in seen:
                seen.add(user)
                queue.append(user)
    return seen - {start}


def _activation(graph: _Graph, region: Iterable[Node]) -> str | None:
    ops = {graph.ops[n] for n in region}
    named = next((a for a in _ACTIVATIONS if a in ops), None)
    if named is not None:
        return named
    if "tanh" in ops:
        return "gelu" if "pow" in ops else "tanh"  # tanh-approximate GELU written out
    return None


def _gated(graph: _Graph, down: _Call, feeders: list[_Call], regions: list[set[Node]]) -> _Match | None:
    (a, b), (ra, rb) = feeders, regions
    same_input = _strip_views(graph, a.input) is _strip_views(graph, b.input)
    shapes_ok = a.out_features == b.out_features == down.in_features and down.out_features == a.in_features
    combined = any(graph.ops[n] == "mul" for n in ra & rb)
    act_a, act_b = _activation(graph, ra - rb), _activation(graph, rb - ra)
    if not (same_input and shapes_ok and combined) or (act_a is None) == (act_b is None):
        return None
    gate, up = (a, b) if act_a is not None else (b, a)
    return [(gate, Role.GATE), (up, Role.UP)], act_a or act_b or ""


def _ungated(graph: _Graph, down: _Call, up: _Call, region: set[Node]) -> _Match | None:
    act = _activation(graph, region)
    if act is None or down.out_features != up.in_features:
        return None
    if up.out_features == down.in_features:
        return [(up, Role.UP)], act
    split = any(graph.ops[n] in _SPLITS for n in region)
    combined = any(graph.ops[n] == "mul" for n in region)
    if up.out_features == 2 * down.in_features and split and combined:
        return [(up, Role.GATE_UP)], act
    return None


def _strip_views(graph: _Graph, node: Node) -> Node:
    while graph.ops[node] in _VIEWS and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _block_of(graph: _Graph, node: Node, core_nodes: Sequence[Node], mlps_so_far: int) -> int | None:
    if not core_nodes:
        return mlps_so_far  # no attention: number the MLPs in order
    before = [i for i, c in enumerate(core_nodes) if graph.order[c] < graph.order[node]]
    return before[-1] if before else None


def _mlp_info(down: _Call, match: _Match, block: int | None) -> MLPInfo:
    by_role = {role: call.module for call, role in match[0]}
    gate, up, gate_up = (by_role.get(r) for r in (Role.GATE, Role.UP, Role.GATE_UP))
    return MLPInfo(block, gate, up, str(down.module), gate_up, match[1])


# ----------------------------------------------------------------------------- lm_head, results


def _lm_heads(graph: _Graph, model: nn.Module, roles: Mapping[Node, object]) -> dict[Node, tuple[Role, None]]:
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab = max((e.num_embeddings for e in embeddings), default=None)
    tied = {id(e.weight) for e in embeddings}
    free = [c for c in graph.calls.values() if c.module and c.node not in roles]
    terminal = [c for c in free if _is_terminal(graph, c.node)]
    heads = [c for c in terminal if c.out_features == vocab or id(model.get_submodule(str(c.module)).weight) in tied]
    if not heads:  # last resort: a name
        heads = [c for c in terminal if str(c.module).rpartition(".")[2] == "lm_head"]
    return {c.node: (Role.LM_HEAD, None) for c in heads}


def _is_terminal(graph: _Graph, node: Node) -> bool:
    """No linear call downstream of ``node``, and its value is used."""
    if not node.users:
        return False
    hits, _ = _walk(node, set(graph.calls) - {node}, up=False)
    return not hits


def _annotate(
    graph: _Graph, roles: _Roles, cores: Sequence[_Core], attention: Sequence[AttentionInfo]
) -> tuple[LinearLayer, ...]:
    """Write NodeMeta on linear calls and attention cores; one LinearLayer per module, first role wins."""
    for core, a in zip(cores, attention):
        annotate(core.anchor, attention=AttentionMeta(a.block, a.num_heads, a.num_kv_heads, a.head_dim))
    layers: dict[str, LinearLayer] = {}
    for node, call in graph.calls.items():
        if call.module is None:
            continue
        role, block = roles.get(node, (Role.OTHER, None))
        annotate(node, linear=LinearMeta(call.module, call.kind, role, block))
        known = layers.get(call.module)
        if known is None or (known.role is Role.OTHER and role is not Role.OTHER):
            layers[call.module] = LinearLayer(
                call.module, call.kind, call.in_features, call.out_features, call.bias, role, block
            )
    return tuple(layers.values())  # dicts keep first-seen (graph) order


def _couplings(attention: Sequence[AttentionInfo], mlps: Sequence[MLPInfo]) -> tuple[Coupling, ...]:
    """Coupled pairs, block by block (attention before MLP); blockless groups last."""
    keyed: list[tuple[float, int, Coupling]] = []
    for a in attention:
        if a.o is not None and (a.qkv or a.v):
            keyed.append((a.block, 0, Coupling(a.qkv or str(a.v), a.o, "qkv->o" if a.qkv else "v->o")))
    for m in mlps:
        for producer, kind in ((m.gate_up, "gate_up->down"), (m.gate, "gate->down"), (m.up, "up->down")):
            if producer is not None:
                block = float("inf") if m.block is None else m.block
                keyed.append((block, 1, Coupling(producer, m.down, kind)))
    return tuple(c for _, _, c in sorted(keyed, key=lambda t: t[:2]))


def _linear_table(linears: Sequence[LinearLayer]) -> list[str]:
    width = max((len(layer.name) for layer in linears), default=4)
    head = f"{'name':<{width}}  {'kind':<6} {'in':>6} {'out':>6}  {'role':<8} block"
    rows = [
        f"{x.name:<{width}}  {x.kind:<6} {x.in_features:>6} {x.out_features:>6}  {x.role.value:<8} "
        + ("" if x.block is None else str(x.block))
        for x in linears
    ]
    return [head, *rows]


def _group_lines(graph: ModelGraph) -> list[str]:
    lines = [f"captured with {graph.captured.method}" + "".join(f"; {n}" for n in graph.captured.notes)]
    for a in graph.attention:
        proj = f"qkv={a.qkv}" if a.qkv else f"q={a.q} k={a.k} v={a.v}"
        heads = f"heads={a.num_heads} kv_heads={a.num_kv_heads} head_dim={a.head_dim}"
        lines.append(f"attention block {a.block}: {proj} o={a.o} {heads}")
    for m in graph.mlps:
        proj = f"gate_up={m.gate_up}" if m.gate_up else f"gate={m.gate} up={m.up}"
        lines.append(f"mlp block {m.block}: {proj} down={m.down} activation={m.activation}")
    return lines
