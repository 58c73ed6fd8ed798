"""Helpers the end-to-end tests share: model snapshots, a measured steady-state step, and steps
trained side by side with plain torch."""

from __future__ import annotations

import torch
import torch.nn as nn

from memopt.memory.tracker import MemoryTracker


def snapshot(model: nn.Module):
    """Module identities and parameter values and flags, to compare after a failed call."""
    return ({n: id(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, taken) -> None:
    modules, params = taken
    assert {n: id(m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (value, flag) in params.items():
        assert torch.equal(now[name], value) and now[name].requires_grad == flag, name


def measured_steady_step(optimized: nn.Module, batch: dict):
    """MemoryTracker's report of a real training step after the first (optimizer states exist)."""
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad])
    optimized(**batch).loss.backward()  # the plan is for the steady state: optimizer states exist
    opt.step()
    opt.zero_grad(set_to_none=True)
    with MemoryTracker(optimized, opt, inputs=batch) as tracker:
        optimized(**batch).loss.backward()
        opt.step()
    return tracker.report()


def steps_equal_plain_torch(optimized: nn.Module, reference: nn.Module, opts: tuple, batches, loss_of) -> None:
    """Train ``optimized`` and ``reference`` (an untouched copy, plain autograd) side by side on
    ``batches`` of ``(input, target)``: each loss and every gradient ``torch.equal``."""
    opt, ref_opt = opts
    for x, y in batches:
        loss, ref_loss = loss_of(optimized(x), y), loss_of(reference(x), y)
        loss.backward(), ref_loss.backward()
        assert torch.equal(loss, ref_loss)
        for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
