"""The compiled lowering: a Plan's forward and backward graphs compiled by Inductor.

The same partitioned graphs as the eager lowering (:mod:`memopt.runtime.partition`: the plan's
saved set, its recomputations placed before their first use, its offload copies) are handed to
Inductor's graph compiler — Triton kernels on GPU, C++ on CPU. Inductor fuses and reorders inside
each graph but keeps its inputs and outputs, so what crosses from forward to backward is the plan's
choice. No global configuration is changed; the compiled graphs cannot run on fake tensors.

Measured on CPU (``python benchmarks/bench_runtime.py``: 4-layer Llama, hidden 384, batch 4 x 256):
the compiled step's peak rise is 55.5 / 90.6 / 121.1 MiB against the plan's predicted 57.8 / 92.4 /
127.1 at budgets 0.15 / 0.5 / 0.85 of the way from the smallest feasible one (eager: 55.7 / 90.8 /
125.1), with the backward's Inductor settings below; Inductor's defaults peaked at 85.6 MiB at 0.15.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from memopt.plan import Plan
from memopt.runtime.step import Compilers, PlannedStep

__all__ = ["INDUCTOR", "lower_compiled"]


def _decomposed(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
    """``gm`` re-traced with Inductor's decompositions (the plan's graphs are traced without them,
    as the planner saw the step; Inductor lowers only the decomposed op set)."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(example_inputs)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        return make_fx(gm, decomposition_table=select_decomp_table())(*example_inputs)


# What the forward hands the backward keeps the layout it was traced with. Inductor's layout
# optimization would make a convolution network's activations channels-last in the forward; torch's
# own pipeline then re-strides the backward's inputs from the strides the forward reports, which
# needs a tracing context this lowering does not have. Without it the backward, compiled for the
# traced strides, read the forward's channels-last tensors as if they were not: every gradient
# before the last BatchNorm wrong, the loss right (``tests/e2e/test_convnet.py``).
_FORWARD_LAYOUT = {"layout_optimization": False}


def _inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx_inner

    with _eager_random(), torch._inductor.config.patch(_FORWARD_LAYOUT):
        return compile_fx_inner(_decomposed(gm, example_inputs), example_inputs)


# The backward's memory as the plan priced it (eager order: each value freed after its last use).
# Inductor's defaults raise the backward's peak above the plan where much is recomputed:
# * a multi-user pointwise op (a recomputed LoRA sum ``base + scale * lora``) is inlined into every
#   consumer, so all its inputs stay live until the last consumer runs, and horizontal fusion then
#   computes all of a block's gradients in one kernel (every output allocated at once): a 4-layer
#   Llama's MLP backward held 6 + 5 [tokens x intermediate] buffers where eager holds 5;
# * buffer reuse keeps a dead buffer for a later one of the same size; its guard is Inductor's own
#   peak estimate, which counts no input as freeable (they are named ``arg*``), i.e. not the saved
#   tensors the backward frees as it goes, so buffers were held across layers.
_BACKWARD_MEMORY = {
    "realize_reads_threshold": 1,  # a pointwise result read twice is computed once, into a buffer
    "max_fusion_unique_io_buffers": 6,  # no kernel that makes or holds a block's tensors all at once
    "allow_buffer_reuse": False,  # freed at last use, as eager
}


def _inductor_backward(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx_inner

    decomposed = _decomposed(gm, example_inputs)
    unused = _unused(decomposed, example_inputs)
    # Size and stride asserts on every input the backward reads (torch >= 2.13 checks none it does
    # not, so an input dropped to None passes): a saved tensor of another layout than the one
    # compiled for is an error, not gradients read through the wrong strides.
    with _eager_random(), torch._inductor.config.patch({**_BACKWARD_MEMORY, "size_asserts": True}):
        compiled = compile_fx_inner(decomposed, example_inputs, is_backward=True)
    return _dropping_unused(unused, compiled)


def _unused(gm: torch.fx.GraphModule, example_inputs: list) -> list[int]:
    """The tensor inputs ``gm`` never reads (sizes, SymInts, stay: Inductor binds them)."""
    return [i for i, (p, x) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
            if not p.users and isinstance(x, torch.Tensor)]


def _dropping_unused(unused: list[int], compiled: Callable) -> Callable:
    """``compiled`` (boxed), with the inputs its graph never reads (``unused``) dropped before it runs:
    Inductor frees an input after its last use but never one it does not read, and a decomposition
    can leave a saved tensor unread (``nll_loss_backward`` no longer reads the log-probabilities, a
    [tokens x vocab] tensor whose alias it does read), which would then live until the backward returns."""
    if not unused:
        return compiled

    def run(args: list) -> Any:
        for i in unused:
            args[i] = None
        return compiled(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _eager_random() -> contextlib.AbstractContextManager:
    """Random ops (dropout) as eager kernels: Inductor's own random ops are installed by its joint
    graph passes, which the plan's partition replaces, and the eager kernels draw the same numbers
    as the unplanned model (and as the RNG state replayed for a recomputed op). Scoped to the call."""
    return torch._inductor.config.patch(fallback_random=True)


INDUCTOR = Compilers(name="compiled", forward=_inductor, backward=_inductor_backward, runs_fake=False)


def lower_compiled(model: nn.Module, plan: Plan) -> PlannedStep:
    """``model``'s forward through Inductor, carrying out ``plan``."""
    return PlannedStep(model, plan, INDUCTOR)
