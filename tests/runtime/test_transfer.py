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


def test_a_tensor_goes_to_host_and_back_in_its_layout():
    x = torch.randn(6, 4).t()  # not contiguous
    host = ops.wait_transfer.default(ops.offload_to_host.default(x))
    assert host.stride() == x.stride() and torch.equal(host, x)
    back = ops.wait_transfer.default(ops.reload_to_device.default(host, torch.device("cpu")))
    assert back.stride() == x.stride() and torch.equal(back, x)
    assert x.untyped_storage().size() > 0  # nothing is freed by the ops: where the graph drops a tensor
    empty = torch.empty(0, 3)  # every empty tensor's data pointer is 0: no copy, no pending entry
    firsts = [ops.offload_to_host.default(empty) for _ in range(2)]
    assert [ops.wait_transfer.default(h).shape for h in firsts] == [(0, 3), (0, 3)]


def test_a_wait_without_its_copy_is_an_error():
    with pytest.raises(RuntimeError, match="no copy is pending"):
        ops.wait_transfer.default(torch.ones(3))


@pytest.mark.parametrize("compile", [False, True])
def test_a_gpu_plan_lowered_with_the_copy_ops_gives_plain_autograds_gradients(monkeypatch, compile):
    """The lowering a GPU runs (``offload_mode='cuda'``), executed on the CPU, op by op and through
    Inductor (which may drop or recompute a copied tensor's source: the ops must not free it): what
    leaves for the host and comes back is what the backward reads."""
    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=4, seq=64)
    options = dict(method="full", device="cuda", reserve_gb=0, compile=compile)
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


def test_a_gpu_plan_run_on_the_cpu_says_its_offloads_stay_in_place(caplog):
    """On a CPU host and device are one memory: the lowering keeps what the plan offloads. The model's
    summary and a warning at its first step say so, with the bound the measured peak keeps."""
    import logging

    from memopt.memory import MemoryTracker

    model = tiny_llama(num_hidden_layers=3)
    batch = lm_batch(model, batch=4, seq=64)
    options = dict(method="full", device="cuda", reserve_gb=0)
    optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, 0.4, **options),
                                example_inputs=batch, **options)
    plan = optimized.plan
    offloaded = plan.bytes_by_action()["offload"]
    assert offloaded > 0 and "offload" not in optimized.applied.actions and not optimized.applied.covers(plan)
    assert f"applied: all but the {sum(t.action == 'offload' for t in plan.tensors)} offload decisions" in \
        optimized.summary() and "this model runs on cpu" in optimized.summary()
    peaks = []
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="memopt"), \
                MemoryTracker(optimized, inputs=batch, round_to=512) as tracker:
            optimized(**batch).loss.backward()
        optimized.zero_grad(set_to_none=True)
        peaks.append(tracker.report().peak_bytes)
    assert caplog.text.count("where host and device are one memory") == 1
    assert not optimized.replans
    # The plan's peak counts the offloaded tensors on the host; here they stay: above it, within the bound.
    assert plan.predicted_peak_bytes < peaks[0] == peaks[1] <= plan.predicted_peak_bytes + offloaded


def test_symbolic_sizes_and_strides_become_nodes_that_compute_them():
    """A backward traced with symbolic sizes re-creates an offloaded view with ``as_strided``: its
    size, stride and offset must be graph values, built from what the graph has (here a [b, s, s]
    tensor: stride s**2, s and 1)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.runtime.partition import _SizeNodes

    gm = make_fx(lambda x: x * 2, tracing_mode="symbolic")(torch.randn(2, 5, 5))
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    val = x.meta["val"]
    out = gm.graph.find_nodes(op="output")[0]
    with gm.graph.inserting_before(out):  # as the lowering inserts: before the first reader
        sizes = _SizeNodes(gm.graph, x)
        stride, shape = sizes.of(val.stride()), sizes.of(val.shape)
        view = gm.graph.call_function(torch.ops.aten.as_strided.default, (x, shape, stride))
    out.args = ((out.args[0], view),)
    gm.recompile()
    for b, s in ((2, 5), (3, 7)):
        t = torch.randn(b, s, s)
        _, again = gm(t)
        assert again.shape == t.shape and again.stride() == t.stride() and torch.equal(again, t)
