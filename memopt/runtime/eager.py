"""The eager lowering: a Plan's forward and backward graphs run op by op, as eager PyTorch would.

The graphs come from :mod:`memopt.runtime.partition` (torch's selective-checkpoint tags and
partitioner, plus offload nodes); here they are executed by their generated Python code — one
aten call per node, each intermediate freed after its last use — with no fusion or code
generation, so the numbers equal eager autograd's bit for bit and the memory is what the planner
priced: each value is freed after its last use, inputs included (AOTAutograd's boxed convention;
an input the graph does not read is freed on entry).
Works on fake tensors too (the simulated step).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.fx.graph import _BoxedCodeGen

from memopt.plan import Plan
from memopt.runtime.step import Compilers, PlannedStep

__all__ = ["EAGER", "lower_eager"]


def _run_graph(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """``gm``'s generated code in AOTAutograd's boxed convention: it takes the argument list and
    clears it, so each input (a saved activation, in the backward) is freed after its last use
    rather than held by the caller until the graph returns."""
    unused = [n for n in gm.graph.find_nodes(op="placeholder") if not n.users]
    if unused:  # generated code frees a value after its last use, and an unread input has none: read it once
        with gm.graph.inserting_after(gm.graph.find_nodes(op="placeholder")[-1]):
            gm.graph.call_function(_release, tuple(unused))
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()

    def run(args: list) -> Any:
        return gm.forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _release(*values: Any) -> None:
    """Nothing: the inputs a graph does not read (a backward with gradients pruned) are passed here
    so the generated code drops them right away, not when the graph returns."""


EAGER = Compilers(name="eager", forward=_run_graph, backward=_run_graph, runs_fake=True)


def lower_eager(model: nn.Module, plan: Plan) -> PlannedStep:
    """``model``'s forward, carrying out ``plan``."""
    return PlannedStep(model, plan, EAGER)
