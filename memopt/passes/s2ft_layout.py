"""S²FT's geometry: which weights move together when heads or FFN channels are permuted.

Design note. A *group* is one attention block (unit: a key/value head together with the query
heads it serves) or one MLP (unit: an FFN channel). Permuting a group's units by one permutation
π preserves the function when every *member* weight permutes its slices of each unit the same way:

* attention: q/k/v output rows and o input columns. Query head ``j`` reads key/value head
  ``j // groups`` (HF's ``repeat_kv``, SDPA's ``enable_gqa``), so the unit of a GQA model is a
  kv group — ``D`` rows of k and v, ``groups·D`` rows of q and columns of o. Moving whole groups
  keeps every query head beside its kv head; moving single query heads could not. Under MHA a
  unit is one head. Rotary and per-``head_dim`` norms act identically on every head, so they need
  no change.
* MLP: gate/up output rows and down input columns, one per channel.

A member's axis is cut into *segments* (``offset``, ``width`` indices per unit); unit ``u`` owns
``[offset + u·width, offset + (u+1)·width)`` of each segment. Separate projections have one
segment at 0. Fused layouts are read from the captured graph's dataflow, never from names:

* stacked ``[q | k | v]`` (Phi-3 ``qkv_proj``, GPT-2 ``c_attn`` — a Conv1D, so its *columns*)
  is sliced or split along the last dim: one segment per piece, ``width = piece / kv_heads``.
  v is the piece that reaches the attention core's value operand; only v trains.
* grouped (GPT-NeoX ``query_key_value``: per head ``[q | k | v]``) is viewed as
  ``[..., kv_heads, rest]``: one segment, a unit is a whole group's chunk. It permutes, but the v
  rows of several heads are not contiguous, so v cannot train there (o still can).
* fused ``[gate | up]`` (Phi-3 ``gate_up_proj``) split in two halves; up is the half that does not
  go through the activation.

Anything else (a packed ``in_proj_weight``, a fused kv, an interleaved split, a module shared by
several blocks) makes the group unpermutable; its layers stay frozen, with the reason recorded.
Not detected (left to the user): per-head parameters outside the projections, such as ALiBi
slopes, attention sinks, or a norm over all heads' q channels (OLMo-2) — they would need the same
permutation.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, deque
from dataclasses import dataclass, replace

import torch
from torch.fx import Node

from memopt.ir.capture import node_shape, op_name
from memopt.ir.meta import node_meta
from memopt.ir.structure import AttentionInfo, MLPInfo, ModelGraph

__all__ = ["Segment", "Member", "Group", "build_groups"]

_VIEWS = {"view", "reshape", "unsafe_view", "alias", "contiguous"}
_SPLITS = {"split", "split_with_sizes", "chunk"}


@dataclass(frozen=True)
class Segment:
    """Indices ``[offset + u·width, offset + (u+1)·width)`` of a member's axis belong to unit ``u``."""

    offset: int
    width: int


@dataclass(frozen=True)
class Member:
    """One weight of a group, permuted along ``axis`` ("out": output rows, "in": input columns)."""

    name: str
    kind: str  # "linear" | "conv1d"
    axis: str
    segments: tuple[Segment, ...]
    target: str | None = None  # the S²FT target this member trains: "v", "o", "up", "down"
    target_segment: int = 0
    blocked: str = ""  # why ``target`` cannot train here ("" if it can)

    def permutation(self, order: torch.Tensor) -> torch.Tensor:
        """The index permutation along ``axis`` when units are reordered to ``order``."""
        parts = [seg.offset + (order[:, None] * seg.width + torch.arange(seg.width)).flatten()
                 for seg in self.segments]
        return torch.cat(parts)

    def block(self, count: int) -> tuple[int, int]:
        """(start, size) on ``axis`` of the first ``count`` units of the target segment."""
        seg = self.segments[self.target_segment]
        return seg.offset, count * seg.width


@dataclass(frozen=True)
class Group:
    """An attention block ("heads") or an MLP ("channels") whose ``units`` permute together."""

    kind: str  # "heads" | "channels"
    block: int | None
    units: int
    unit: str  # "head", "kv group" or "channel"
    members: tuple[Member, ...]
    layers: tuple[str, ...]  # every projection of the block (members or not, e.g. when it failed)
    reason: str = ""  # non-empty: the group cannot be permuted, and why

    def trainable(self, targets: tuple[str, ...]) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.target in targets and not m.blocked)


def build_groups(graph: ModelGraph) -> list[Group]:
    """One Group per attention block and per MLP of ``graph``, in that order.

    Requires: ``graph`` came from ``memopt.ir.structure.analyze`` (roles, heads, NodeMeta).
    Ensures: a group with an empty ``reason`` lists every weight its permutation touches, and each
    member's segments cover its axis exactly.
    """
    view = _View(graph)
    groups = [_head_group(view, a) for a in graph.attention] + [_channel_group(view, m) for m in graph.mlps]
    return _refuse_shared(groups)


# ----------------------------------------------------------------------------- groups


def _head_group(view: "_View", a: AttentionInfo) -> Group:
    unit = "head" if a.num_heads == a.num_kv_heads else "kv group"
    layers = tuple(n for n in (a.q, a.k, a.v, a.qkv, a.o) if n is not None)
    group = Group("heads", a.block, a.num_kv_heads, unit, (), layers)
    where = f"attention block {a.block}"
    if a.o is None:
        return replace(group, reason=f"{where}: no output projection was found after the attention core")
    if a.num_heads % a.num_kv_heads:
        return replace(group, reason=f"{where}: {a.num_heads} query heads do not split into {a.num_kv_heads} kv groups")
    if a.qkv is not None:
        producers = _fused_qkv(view, a)
        if isinstance(producers, str):
            return replace(group, reason=f"{where}: {producers}")
    elif a.q and a.k and a.v and len({a.q, a.k, a.v}) == 3:
        producers = (_plain(view, a.q, a.num_kv_heads), _plain(view, a.k, a.num_kv_heads),
                     _plain(view, a.v, a.num_kv_heads, "v"))
    else:
        return replace(group, reason=f"{where}: q, k and v are not three Linear modules (a packed "
                                     "in_proj_weight or a fused kv), so its heads cannot be permuted")
    o = view.graph.linear(a.o)
    members = (*producers, Member(o.name, o.kind, "in", (Segment(0, o.in_features // a.num_kv_heads),), "o"))
    return _checked(group, members, view)


def _channel_group(view: "_View", m: MLPInfo) -> Group:
    down = view.graph.linear(m.down)
    channels = down.in_features
    layers = tuple(n for n in (m.gate, m.up, m.gate_up, m.down) if n is not None)
    group = Group("channels", m.block, channels, "channel", (), layers)
    members: list[Member] = []
    if m.gate is not None:
        members.append(_plain(view, m.gate, channels))
    if m.up is not None:
        members.append(_plain(view, m.up, channels, "up"))
    if m.gate_up is not None:
        fused = _fused_gate_up(view, m, channels)
        if isinstance(fused, str):
            return replace(group, reason=f"MLP of block {m.block}: {fused}")
        members.append(fused)
    members.append(Member(down.name, down.kind, "in", (Segment(0, 1),), "down"))
    return _checked(group, tuple(members), view)


def _plain(view: "_View", name: str, units: int, target: str | None = None) -> Member:
    layer = view.graph.linear(name)
    return Member(name, layer.kind, "out", (Segment(0, layer.out_features // units),), target)


def _checked(group: Group, members: tuple[Member, ...], view: "_View") -> Group:
    """``group`` with ``members``, or with a reason if a member's axis is not covered exactly."""
    for m in members:
        layer = view.graph.linear(m.name)
        length = layer.out_features if m.axis == "out" else layer.in_features
        covered = sum(seg.width for seg in m.segments) * group.units
        if covered != length or any(seg.width == 0 for seg in m.segments):
            return replace(group, reason=f"{m.name} has {length} {'output' if m.axis == 'out' else 'input'} "
                                         f"channels, which do not split into {group.units} {group.unit}s")
    return replace(group, members=members)


def _refuse_shared(groups: list[Group]) -> list[Group]:
    uses = Counter(m.name for g in groups for m in g.members)
    result = []
    for g in groups:
        shared = sorted(m.name for m in g.members if uses[m.name] > 1)
        if shared:
            g = replace(g, members=(), reason=f"{shared[0]} is shared by several blocks; permuting it "
                                              "for one block would change the others")
        result.append(g)
    return result


# ----------------------------------------------------------------------------- fused layouts


def _fused_qkv(view: "_View", a: AttentionInfo) -> tuple[Member, ...] | str:
    assert a.qkv is not None
    layer = view.graph.linear(a.qkv)
    out = view.fused_output(a.qkv)
    if out is None:
        return f"the fused {a.qkv} is not called exactly once"
    pieces = view.split_last_dim(out)
    if pieces is not None:
        widths = sorted(w for _, w, _ in pieces)
        if widths != sorted([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]):
            return f"the pieces of the fused {a.qkv} are not [q | k | v]"
        segments = tuple(Segment(off, w // a.num_kv_heads) for off, w, _ in pieces)
        value = view.value_operand(a.block)
        hits = [i for i, (_, _, node) in enumerate(pieces) if value is not None and view.reaches(node, value)]
        blocked = "" if len(hits) == 1 else f"could not tell which slice of the fused {a.qkv} is v"
        return (Member(a.qkv, layer.kind, "out", segments, "v", hits[0] if hits else 0, blocked),)
    if view.grouped_view(out, a.num_kv_heads):
        blocked = (f"{a.qkv} lays out [q | k | v] per head, so the v rows of several heads are not "
                   "contiguous; it is permuted but only o can train")
        return (Member(a.qkv, layer.kind, "out", (Segment(0, layer.out_features // a.num_kv_heads),), "v", 0, blocked),)
    return f"the layout of the fused {a.qkv} was not recognised (neither sliced along its last dim nor viewed per head)"


def _fused_gate_up(view: "_View", m: MLPInfo, channels: int) -> Member | str:
    assert m.gate_up is not None
    layer = view.graph.linear(m.gate_up)
    out = view.fused_output(m.gate_up)
    pieces = view.split_last_dim(out) if out is not None else None
    if pieces is None or [(off, w) for off, w, _ in pieces] != [(0, channels), (channels, channels)]:
        return f"{m.gate_up} is not split into two contiguous halves [gate | up]"
    through = [m.activation in view.downstream_ops(node) for _, _, node in pieces]
    blocked = "" if through.count(True) == 1 else f"could not tell which half of {m.gate_up} is up"
    up = through.index(False) if not blocked else 0
    return Member(m.gate_up, layer.kind, "out", (Segment(0, 1), Segment(channels, 1)), "up", up, blocked)


class _View:
    """Dataflow questions about the captured graph, for fused layouts."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        gm = graph.captured.gm
        modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.ops = {n: op_name(n, modules) for n in self.nodes}
        self.calls = {n for n in self.nodes if node_meta(n).linear is not None}

    def fused_output(self, module: str) -> Node | None:
        """The call of ``module`` followed through views that keep its last dim (None unless called once)."""
        calls = [n for n in self.calls if node_meta(n).linear.module == module]  # type: ignore[union-attr]
        if len(calls) != 1:
            return None
        node = calls[0]
        while len(node.users) == 1:
            user = next(iter(node.users))
            shape, user_shape = node_shape(node), node_shape(user)
            if self.ops[user] not in _VIEWS or not shape or not user_shape or user_shape[-1] != shape[-1]:
                break
            node = user
        return node

    def split_last_dim(self, node: Node) -> list[tuple[int, int, Node]] | None:
        """(offset, width, piece) of a slice/split of ``node`` along its last dim covering it exactly."""
        shape = node_shape(node)
        users = list(node.users)
        if not shape or not users:
            return None
        if all(self.ops[u] == "slice" for u in users):
            found = [_slice_piece(u, shape) for u in users]
        elif len(users) == 1 and self.ops[users[0]] in _SPLITS:
            found = _split_pieces(users[0], shape) or [None]
        else:
            return None
        if any(p is None for p in found):
            return None
        pieces = sorted(found, key=lambda p: p[0])  # type: ignore[arg-type, index]
        ends = [0] + [off + w for off, w, _ in pieces]
        if any(off != end for (off, _, _), end in zip(pieces, ends)):
            return None  # a gap or an overlap
        return pieces if ends[-1] == shape[-1] else None

    def grouped_view(self, node: Node, groups: int) -> bool:
        """Whether ``node`` [..., F] is viewed as [..., groups, F / groups (, ...)]."""
        users = list(node.users)
        shape = node_shape(node)
        if len(users) != 1 or self.ops[users[0]] not in _VIEWS or not shape:
            return False
        viewed = node_shape(users[0])
        lead = len(shape) - 1
        return (viewed is not None and viewed[:lead] == shape[:lead] and len(viewed) > lead + 1
                and viewed[lead] == groups and math.prod(viewed[lead:]) == shape[-1])

    def value_operand(self, block: int) -> Node | None:
        """The value input of attention block ``block``'s core (SDPA's ``value``; eager: not from softmax)."""
        anchor = next((n for n in self.nodes if (m := node_meta(n).attention) and m.block == block), None)
        if anchor is None:
            return None
        if "scaled_dot_product" in self.ops[anchor]:
            value = anchor.args[2] if len(anchor.args) > 2 else anchor.kwargs.get("value")
            return value if isinstance(value, Node) else None
        operands = [x for x in anchor.args[:2] if isinstance(x, Node)]
        plain = [x for x in operands if not any(self.ops[n].endswith("softmax") for n in self._walk(x, up=True))]
        return plain[0] if len(plain) == 1 else None

    def reaches(self, src: Node, dst: Node) -> bool:
        return dst in self._walk(src, up=False, until=self.order[dst])

    def downstream_ops(self, src: Node) -> set[str]:
        return {self.ops[n] for n in self._walk(src, up=False)}

    def _walk(self, start: Node, up: bool, until: int | None = None) -> set[Node]:
        """Nodes reachable from ``start`` without passing a linear call (or, downstream, past ``until``)."""
        seen, queue = {start}, deque([start])
        while queue:
            node = queue.popleft()
            if node in self.calls and node is not start:
                continue
            for nxt in node.all_input_nodes if up else node.users:
                if nxt not in seen and (until is None or self.order[nxt] <= until):
                    seen.add(nxt)
                    queue.append(nxt)
        return seen


def _dim_arg(node: Node, position: int, ndim: int) -> int:
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return int(dim) % ndim


def _slice_piece(node: Node, shape: tuple[int, ...]) -> tuple[int, int, Node] | None:
    """aten.slice(x, dim, start, end, step) along the last dim, step 1 → (offset, width, node)."""
    args = [*node.args, None, None, None, None][:5]
    dim, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
    if not all(isinstance(v, int) for v in (dim, start, step)) or dim % len(shape) != len(shape) - 1 or step != 1:
        return None
    stop = min(shape[-1], end) if isinstance(end, int) else shape[-1]
    return (start, stop - start, node) if 0 <= start < stop else None


def _split_pieces(split: Node, shape: tuple[int, ...]) -> list[tuple[int, int, Node]] | None:
    """The getitem outputs of a split/chunk along the last dim, as (offset, width, node)."""
    if _dim_arg(split, 2, len(shape)) != len(shape) - 1:
        return None
    outputs = split.meta.get("val")
    if not isinstance(outputs, (list, tuple)):
        return None
    widths = [int(t.shape[-1]) for t in outputs]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    items = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    if sorted(items) != list(range(len(widths))):
        return None  # a piece is unused: no node to follow for it
    return [(offsets[i], widths[i], items[i]) for i in range(len(widths))]
