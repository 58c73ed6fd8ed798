"""memopt.ir: capture a model as an fx graph and infer its structure (see capture.py, structure.py)."""

from memopt.ir.capture import CapturedGraph, capture, module_path, node_shape, op_name
from memopt.ir.meta import AttentionMeta, LinearMeta, NodeMeta, Role, annotate, node_meta
from memopt.ir.structure import (
    AttentionInfo,
    Coupling,
    LinearLayer,
    MLPInfo,
    ModelGraph,
    analyze,
    build_model_graph,
)

__all__ = [
    "CapturedGraph",
    "capture",
    "module_path",
    "node_shape",
    "op_name",
    "Role",
    "LinearMeta",
    "AttentionMeta",
    "NodeMeta",
    "node_meta",
    "annotate",
    "LinearLayer",
    "AttentionInfo",
    "MLPInfo",
    "Coupling",
    "ModelGraph",
    "analyze",
    "build_model_graph",
]
