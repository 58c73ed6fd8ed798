"""The compiled lowering (Inductor, C++ on this CPU) and the CUDA offload graph (built, not run)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch._functorch.aot_autograd import aot_function

import memopt
from memopt.optim import factory as optim_factory
from memopt.ir.joint import op_keys
from memopt.runtime.partition import LoweringReport, _node_of, plan_partition
from tests.models import lm_batch, tiny_llama
from tests.runtime._planned import budget_between, gradients, llama

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="Inductor's CPU backend needs a C++ compiler")


def _configs() -> tuple[dict, dict]:
    return torch._inductor.config.get_config_copy(), torch._functorch.config.get_config_copy()


@needs_compiler
@pytest.mark.slow
def test_compiled_step_matches_eager_gradients_and_saves_the_same_tensors():
    model, batch = llama()
    before = _configs()
    optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, 0.3, device="cpu"),
                                example_inputs=batch, device="cpu", compile=True)
    plan = optimized.plan
    assert optimized.runtime.compilers.name == "compiled" and plan.needs_runtime
    inner = optimized.model
    loss_ref, ref = gradients(inner, inner, batch)
    for _ in range(2):
        loss, got = gradients(optimized, inner, batch)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for name in ref:  # Inductor fuses and reorders fp32 sums: a few ulps
            scale = ref[name].abs().max().item()
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    compiled = optimized.runtime.reports[0]
    eager = memopt.OptimizedModel.use_plan(optimized, plan).runtime  # the same plan, op by op
    gradients(optimized, inner, batch)
    assert eager.compilers.name == "eager"
    assert eager.reports[0].saved_bytes == compiled.saved_bytes  # what crosses to the backward: the plan's
    assert eager.reports[0].recompute_flops == compiled.recompute_flops == plan.recompute_flops
    assert _configs() == before  # no global configuration was changed


@pytest.mark.slow  # a costly scenario: make test-all
def test_compiled_lowering_refuses_fake_tensors():
    from memopt.memory.simulate import simulate_step

    model, batch = llama()
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu", compile=True)
    with pytest.raises(memopt.MemoptError, match="cannot run on fake tensors; simulate the eager one"):
        simulate_step(optimized, batch, optimizer=optim_factory("adamw"), device="cpu")


@pytest.mark.slow  # a costly scenario: make test-all
def test_cuda_offload_is_async_copies_one_per_storage_prefetched_one_ahead():
    """The graphs of a GPU plan lowered for CUDA (built here on fake CPU tensors, never run)."""
    model = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)
    batch = lm_batch(model, batch=4, seq=64)
    options = dict(device="cuda", reserve_gb=0)
    optimized = memopt.optimize(model, budget_gb=budget_between(model, batch, 0.0, **options),
                                example_inputs=batch, **options)
    plan = optimized.plan
    offloaded = [t for t in plan.tensors if t.action == "offload"]
    assert offloaded
    report, graphs = LoweringReport(), {}
    partition = plan_partition(plan, offload_mode="cuda", check_layout=True, report=report)

    simulated = plan_partition(plan, offload_mode="simulated", check_layout=True)

    def capture(joint: torch.fx.GraphModule, joint_inputs: list, **kwargs: object):
        graphs["simulated_fw"], graphs["simulated"] = simulated(copy.deepcopy(joint), joint_inputs, **kwargs)
        graphs["fw"], graphs["bw"] = partition(joint, joint_inputs, **kwargs)
        raise _Done()

    inner = optimized.model

    def step(p: dict, b: dict, kwargs: dict):
        return torch.func.functional_call(inner, {**p, **b}, (), {**kwargs, "use_cache": False}).loss

    fn = aot_function(step, fw_compiler=None, partition_fn=capture)
    import torch.fx.traceback as fx_traceback
    from torch._export.utils import _compiling_state_context

    from memopt.ir.joint import module_annotations

    # Traced as the runtime traces: module annotations give the ops the keys the plan names.
    from memopt.memory.hf_masks import eager_masks

    with pytest.raises(_Done), _compiling_state_context(), fx_traceback.preserve_node_meta(), \
            module_annotations(inner), eager_masks(inner, (), batch, optimized.plan.unpadded_mask):
        fn(dict(inner.named_parameters()), dict(inner.named_buffers()), batch)
    fw = graphs["fw"]
    targets = [n.target for n in fw.graph.nodes]
    assert targets.count(torch.ops.memopt.offload_to_host.default) == len(offloaded) == len(report.offloaded)
    assert targets.count(torch.ops.memopt.wait_transfer.default) == len(offloaded)
    transfers = (torch.ops.memopt.offload_to_host.default, torch.ops.memopt.wait_transfer.default)
    for node in fw.graph.nodes:  # the copy starts where the tensor is made (after other copies' nodes)
        if node.target is torch.ops.memopt.offload_to_host.default:
            before = node.prev
            while before.target in transfers:
                before = before.prev
            assert before is node.args[0]
    order = {n: i for i, n in enumerate(graphs["bw"].graph.nodes)}
    reloads = [n for n in order if n.target is torch.ops.memopt.reload_to_device.default]
    waits = [next(u for u in r.users if u.target is torch.ops.memopt.wait_transfer.default) for r in reloads]
    assert len(reloads) == len(offloaded)
    moves = (torch.ops.aten.as_strided.default, torch.ops.memopt.wait_transfer.default,
             torch.ops.memopt.reload_to_device.default)
    for wait in waits:  # each copy back is waited for right before the first read of its data
        reader, views = wait.next, {wait}  # past other copies back and views (moved to their first reader)
        while reader.target in moves or getattr(reader.target, "is_view", False):
            views |= {reader} if views & set(reader.all_input_nodes) else set()
            reader = reader.next
        assert views & set(reader.all_input_nodes)
    # Prefetch: a copy back is issued before the previous one is waited for.
    assert any(order[r] < order[w] for r, w in zip(reloads[1:], waits))
    # The simulated lowering (what the plan's peak is measured on) makes each reloaded tensor where
    # this one does: after the same ops of the backward.
    assert _ops_before(graphs["simulated"], torch.ops.memopt.reload_simulated.default) == \
        _ops_before(graphs["bw"], torch.ops.memopt.reload_to_device.default)
    # A copy out is waited for where the plan counts it freed: after its last forward use, or after
    # the op by which its copy has had its transfer time (``ready``), if later; the simulated forward
    # drops the device tensor after the same ops.
    ready = [t for t in offloaded if t.ready is not None]
    assert ready  # this plan holds some copies past their last use
    by_name = {n.name: n for n in fw.graph.nodes}
    by_key = {key: by_name[name] for name, key in op_keys(fw.graph).items()}
    position = {n: i for i, n in enumerate(fw.graph.nodes)}
    copies = {n.args[0]: n for n in fw.graph.nodes if n.target is torch.ops.memopt.offload_to_host.default}
    for t in ready:
        carrier = _node_of(t, by_name, by_key)
        copied = next(n for n in copies if n.meta["val"].untyped_storage()._cdata ==
                      carrier.meta["val"].untyped_storage()._cdata)
        wait = next(u for u in copies[copied].users if u.target is torch.ops.memopt.wait_transfer.default)
        assert position[wait] > position[by_key[t.ready]]
    assert _ops_before(graphs["simulated_fw"], torch.ops.memopt.offload_simulated.default) == \
        _ops_before(fw, torch.ops.memopt.wait_transfer.default)
    # One host copy per offloaded storage: its raw bytes (the plan counts device blocks of 512 bytes).
    planned = sum(t.nbytes for t in offloaded)
    assert planned - 512 * len(offloaded) < report.host_bytes <= planned


def _ops_before(graph: torch.fx.GraphModule, reload: object) -> list[int]:
    """For each ``reload`` node (a transfer op) in ``graph``, how many of the graph's own ops (no
    transfer, view or size node) run before it."""
    ours = {torch.ops.memopt.reload_to_device.default, torch.ops.memopt.wait_transfer.default,
            torch.ops.memopt.reload_simulated.default, torch.ops.aten.as_strided.default,
            torch.ops.memopt.offload_to_host.default, torch.ops.memopt.offload_simulated.default}
    out, ops = [], 0
    for node in graph.graph.nodes:
        if node.target is reload:
            out.append(ops)
        elif node.op == "call_function" and node.target not in ours and isinstance(node.meta.get("val"), torch.Tensor):
            ops += 1
    return out


class _Done(Exception):
    pass
