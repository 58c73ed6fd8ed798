"""Typed metadata that memopt attaches to fx nodes.

Design note: analyses write what they learn about a node into ONE key, ``node.meta["memopt"]``,
holding a frozen :class:`NodeMeta`. Each analysis owns one field of it (structure analysis owns
``linear`` and ``attention``); a later analysis adds a field here rather than inventing a new string
key. Readers call :func:`node_meta`, which returns an empty ``NodeMeta`` for unannotated nodes, so
no caller ever needs ``node.meta.get("some-string")``.

:class:`Role` lives here (not in ``structure``) because it is part of the node metadata and both
``structure`` and later passes import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch.fx

__all__ = ["META_KEY", "Role", "LinearMeta", "AttentionMeta", "NodeMeta", "node_meta", "annotate"]

META_KEY = "memopt"


class Role(str, Enum):
    """What a Linear-like layer does in its transformer block, as inferred from dataflow."""

    Q = "q"
    K = "k"
    V = "v"
    O = "o"  # noqa: E741 - the attention output projection is called "o" everywhere
    QKV = "qkv"
    GATE = "gate"
    UP = "up"
    DOWN = "down"
    GATE_UP = "gate_up"
    LM_HEAD = "lm_head"
    OTHER = "other"


@dataclass(frozen=True)
class LinearMeta:
    """On a Linear-like op node: which module it calls and what it does.

    ``kind`` is ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (HF Conv1D, weight ``[in, out]``).
    """

    module: str
    kind: str
    role: Role
    block: int | None


@dataclass(frozen=True)
class AttentionMeta:
    """On an attention core node (SDPA, or the second matmul of an eager attention)."""

    block: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class NodeMeta:
    """Everything memopt knows about one fx node; every field is optional."""

    linear: LinearMeta | None = None
    attention: AttentionMeta | None = None


def node_meta(node: torch.fx.Node) -> NodeMeta:
    """The memopt metadata of ``node`` (an empty ``NodeMeta`` if it has none)."""
    meta = node.meta.get(META_KEY)
    return meta if isinstance(meta, NodeMeta) else NodeMeta()


def annotate(node: torch.fx.Node, **fields: Any) -> NodeMeta:
    """Set ``fields`` of ``node``'s ``NodeMeta`` (other fields are kept) and return the new value."""
    meta = dataclasses.replace(node_meta(node), **fields)
    node.meta[META_KEY] = meta
    return meta
