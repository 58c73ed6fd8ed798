"""The copy ops an offloading plan is lowered with on a GPU (``memopt.runtime.transfer``), run here
on the CPU, where they copy synchronously: values and layouts round-trip, each source is freed at
its wait, and a whole planned step lowered with them gives the gradients of plain autograd."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.runtime import step as step_module
from memopt.runtime import transfer  # noqa: F401 - registers memopt::offload_to_host, ...
from tests.models import lm_batch, tiny_llama
from tests.runtime._planned import budget_between, gradients

ops = torch.ops.memopt


def test_a_tensor_goes_to_host_and_back_in_its_layout_and_each_source_is_freed_at_its_wait():
    x = torch.randn(6, 4).t()  # not contiguous
    expected = x.clone()
    host = ops.offload_to_host.default(x)
    host = ops.wait_transfer.default(host, keepalive=x)
    assert x.untyped_storage().size() == 0  # the device copy is gone
    assert torch.equal(host, expected)
    back = ops.reload_to_device.default(host, torch.device("cpu"))
    back = ops.wait_transfer.default(back, keepalive=host)
    assert host.untyped_storage().size() == 0
    assert back.stride() == expected.stride() and torch.equal(back, expected)


def test_a_wait_without_its_copy_is_an_error():
    with pytest.raises(RuntimeError, match="no copy is pending"):
        ops.wait_transfer.default(torch.ones(3))


def test_a_gpu_plan_lowered_with_the_copy_ops_gives_plain_autograds_gradients(monkeypatch):
    """The lowering a GPU runs (``offload_mode='cuda'``), executed on the CPU: what leaves for the
    host and comes back is what the backward reads."""
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=4, seq=64)
    options = dict(method="full", device="cuda", reserve_gb=0)
    optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, 0.4, **options),
                                example_inputs=batch, **options)
    assert optimized.plan.bytes_by_action()["offload"] > 0
    inner = optimized.model
    want_loss, want = gradients(inner, inner, batch)  # plain autograd on the same model
    partition = step_module.plan_partition

    def as_on_a_gpu(plan, *, offload_mode, **kwargs):
        return partition(plan, offload_mode="cuda" if offload_mode == "host" else offload_mode, **kwargs)

    monkeypatch.setattr(step_module, "plan_partition", as_on_a_gpu)
    loss, got = gradients(optimized, inner, batch)
    report = optimized.runtime.reports[-1]
    assert len(report.offloaded) == sum(t.action == "offload" for t in optimized.plan.tensors) > 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == sum(p.requires_grad for p in inner.parameters())
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)
