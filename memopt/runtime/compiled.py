"""The compiled lowering: a Plan's forward and backward graphs compiled by Inductor.

The same partitioned graphs as the eager lowering (:mod:`memopt.runtime.partition`: the plan's
saved set, its recomputations placed before their first use, its offload copies) are handed to
Inductor's graph compiler — Triton kernels on GPU, C++ on CPU. Inductor fuses and reorders inside
each graph but keeps its inputs and outputs, so what crosses from forward to backward is the plan's
choice. No global configuration is changed; the compiled graphs cannot run on fake tensors.

Measured on CPU (``benchmarks/bench_runtime.py``): what crosses to the backward is the plan's, but
the peak inside the compiled backward is not yet what the planner predicts — up to 30 MiB above it
on a 4-layer model at a budget that recomputes much (the eager lowering lands within 2 MiB).
Inductor schedules and fuses the recomputed ops itself; the planner does not model that yet.
"""

from __future__ import annotations

import contextlib
from typing import Callable

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


def _inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx_inner

    with _eager_random():
        return compile_fx_inner(_decomposed(gm, example_inputs), example_inputs)


def _inductor_backward(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx_inner

    with _eager_random():
        return compile_fx_inner(_decomposed(gm, example_inputs), example_inputs, is_backward=True)


def _eager_random() -> contextlib.AbstractContextManager:
    """Random ops (dropout) as eager kernels: Inductor's own random ops are installed by its joint
    graph passes, which the plan's partition replaces, and the eager kernels draw the same numbers
    as the unplanned model (and as the RNG state replayed for a recomputed op). Scoped to the call."""
    return torch._inductor.config.patch(fallback_random=True)


INDUCTOR = Compilers(name="compiled", forward=_inductor, backward=_inductor_backward, runs_fake=False)


def lower_compiled(model: nn.Module, plan: Plan) -> PlannedStep:
    """``model``'s forward through Inductor, carrying out ``plan``."""
    return PlannedStep(model, plan, INDUCTOR)
