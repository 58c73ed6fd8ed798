"""Shared helpers: a tiny Llama planned at a budget between its smallest feasible one and keep-all."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import memopt
from tests.models import lm_batch, tiny_llama

GIB = 2**30


def llama(**overrides: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = tiny_llama(num_hidden_layers=3, **overrides)
    return model, lm_batch(model, batch=4, seq=32)


_RANGES: dict[tuple, tuple[int, int]] = {}


def budget_between(model: nn.Module, batch: Any, fraction: float, **options: Any) -> float:
    """A budget (GiB) ``fraction`` of the way from the smallest feasible one to keeping everything
    (the range is planned once per model structure, inputs and options)."""
    config = getattr(model, "config", None)
    key = (repr(model), repr(config), getattr(config, "_attn_implementation", None), next(model.parameters()).dtype,
           tuple((k, tuple(v.shape)) for k, v in sorted(batch.items())) if isinstance(batch, dict) else
           tuple(tuple(v.shape) for v in batch), repr(sorted(options.items())))
    if key not in _RANGES:
        plan = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, **options).plan
        _RANGES[key] = plan.min_budget_bytes, plan.predicted_peak_bytes + plan.reserve_bytes
    low, high = _RANGES[key]
    assert low < high, "this model has nothing to recompute"
    return (low + fraction * (high - low)) / GIB


def planned(model: nn.Module, batch: Any, fraction: float, **options: Any) -> memopt.OptimizedModel:
    options.setdefault("device", "cpu")
    budget = budget_between(model, batch, fraction, **options)
    optimized = memopt.optimize(model, budget_gb=budget, example_inputs=batch, **options)
    assert optimized.plan.needs_runtime and optimized.runtime is not None
    return optimized


def gradients(run: Any, params: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one step ``run(**batch).loss.backward()``."""
    for p in params.parameters():
        p.grad = None
    loss = run(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    for p in params.parameters():
        p.grad = None
    return loss.detach(), grads
