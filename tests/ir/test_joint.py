"""The joint trace: exact bytes, FLOPs, lifetimes, modules and tags of one training step."""

from __future__ import annotations

import pytest
import torch

from memopt.config import LoraConfig
from memopt.ir.joint import JointTrace, trace_joint
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog, get_pass
from tests.models import HIDDEN, INTERMEDIATE, lm_batch, tiny_llama

BATCH, SEQ, RANK = 2, 16, 4
F32 = 4


def _lora_llama(device: str = "cpu", dropout: float = 0.0):
    model = tiny_llama()
    batch = lm_batch(model, batch=BATCH, seq=SEQ)
    del batch["attention_mask"]
    graph = build_model_graph(model, (), batch)
    get_pass("lora").apply(model, graph, LoraConfig(rank=RANK, dropout=dropout), RewriteLog(model))
    if device == "meta":
        model = model.to("meta")
        batch = {k: v.to("meta") for k, v in batch.items()}
    return model, batch


@pytest.fixture(scope="module")
def traced() -> tuple[torch.nn.Module, JointTrace]:
    model, batch = _lora_llama()
    return model, trace_joint(model, batch, device="cpu")


def _saved(trace: JointTrace, value: str):
    return next(trace.storages[s] for s in trace.saved if value in trace.storages[s].values)


def test_forward_ops_come_first_and_every_saved_tensor_is_read_by_the_backward(traced):
    _, trace = traced
    assert all(op.phase == "forward" for op in trace.ops[: trace.num_forward])
    assert all(op.phase == "backward" for op in trace.ops[trace.num_forward:])
    uses = trace.uses()
    for sid in trace.saved:
        assert trace.storages[sid].kind == "activation"
        assert any(p >= trace.num_forward for p in uses[sid])


def test_saved_bytes_are_exact_storage_sizes(traced):
    _, trace = traced
    silu = _saved(trace, "silu")
    assert silu.nbytes == BATCH * SEQ * INTERMEDIATE * F32 == 16384 and silu.shape == (BATCH, SEQ, INTERMEDIATE)
    producer = trace.ops[silu.producer]
    assert producer.target == "aten.silu.default"
    assert producer.module == "model.layers.0.mlp.act_fn" and producer.block == 0
    # a LoRA A output is saved for B's weight gradient: [B*T, rank]
    lora_a = trace.ops[_saved(trace, "mm_1").producer]
    assert _saved(trace, "mm_1").nbytes == BATCH * SEQ * RANK * F32 and lora_a.module.endswith("q_proj.lora_A")


def test_matmul_flops_are_exact(traced):
    _, trace = traced
    base_q = next(op for op in trace.ops if op.module == "model.layers.0.self_attn.q_proj.base_layer"
                  and op.target == "aten.mm.default")
    assert base_q.flops == 2 * BATCH * SEQ * HIDDEN * HIDDEN == 262144
    attention = next(op for op in trace.ops if "flash_attention_for_cpu.default" in op.target)
    head_dim = HIDDEN // 4
    assert attention.flops == 4 * BATCH * 4 * SEQ * SEQ * head_dim  # q.k^T and p.v, every head


def test_backward_ops_carry_the_module_of_their_forward_op(traced):
    _, trace = traced
    backward = trace.ops[trace.num_forward:]
    in_blocks = [op for op in backward if op.module and op.module.startswith("model.layers.")]
    assert len(in_blocks) > 100 and all(op.block in (0, 1) for op in in_blocks)
    assert trace.block_prefix == "model.layers" and trace.blocks() == [0, 1]


def test_static_parts_gradients_and_optimizer_states_are_exact(traced):
    model, trace = traced
    params = sum(p.numel() * F32 for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * F32 for p in trainable)
    assert trace.bytes_of("parameter") == params
    assert trace.bytes_of("gradient") == trainable_bytes
    # AdamW: exp_avg and exp_avg_sq per trainable parameter, plus a float32 step counter each
    assert trace.optimizer_state_bytes == 2 * trainable_bytes + F32 * len(trainable)


def test_views_share_their_base_storage(traced):
    _, trace = traced
    attention_out = _saved(trace, "getitem")  # the attention output and its detach/view aliases
    assert {"detach", "view_12"} <= set(attention_out.values)
    assert sum(1 for s in trace.saved if "getitem" in trace.storages[s].values) == 1


def test_tracing_leaves_the_model_unchanged():
    model, batch = _lora_llama()
    before = {n: p for n, p in model.named_parameters()}
    trace_joint(model, batch, device="cpu")
    assert {n: p for n, p in model.named_parameters()} == before
    from memopt.passes.base import _keeps_fused_paths_off

    assert all(not m._forward_hooks for m in model.modules())  # the trace's annotation hooks are gone
    assert all(list(m._forward_pre_hooks.values()) in ([], [_keeps_fused_paths_off]) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_meta_device_model_traces_like_a_cpu_one(traced):
    _, trace = traced
    model, batch = _lora_llama(device="meta")
    meta = trace_joint(model, batch, device="cpu")
    assert [s.nbytes for s in meta.storages] == [s.nbytes for s in trace.storages]
    assert [op.flops for op in meta.ops] == [op.flops for op in trace.ops]


def test_dropout_is_tagged_rng_and_cuda_targets_round_blocks():
    model, batch = _lora_llama(dropout=0.1)
    trace = trace_joint(model, batch, device="cuda", granularity=512)
    rng = [op for op in trace.ops if "rng" in op.tags]
    assert rng and all(op.module.endswith("lora_dropout") for op in rng)
    assert all(s.nbytes % 512 == 0 for s in trace.storages)
    # attention with dropout_p=0 draws nothing: it is not an RNG op
    assert not any("rng" in op.tags for op in trace.ops if "attention" in op.target)


def test_attention_kernels_leave_out_cudnn_and_keep_what_the_caller_switched_off():
    """Planner and runtime trace with one SDPA kernel choice (``attention_kernels``): never cuDNN's,
    and never a kernel the caller switched off (a user who picked the math kernel keeps it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from memopt.ir.joint import attention_kernels

    cuda = torch.backends.cuda
    with attention_kernels():
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    with sdpa_kernel([SDPBackend.MATH]), attention_kernels():
        assert cuda.math_sdp_enabled() and not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled())
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), attention_kernels():  # nothing else on: unchanged
        assert cuda.cudnn_sdp_enabled() and not cuda.flash_sdp_enabled()


def test_grouped_query_attention_flops_are_counted_as_its_keys_repeated():
    """Every SDPA kernel's FLOPs, on any torch: k/v with fewer heads count as if repeated to q's."""
    from memopt.ir.joint import _EXTRA_FLOPS

    q, kv = torch.empty(2, 8, 16, 4, device="meta"), torch.empty(2, 2, 16, 4, device="meta")
    full = torch.empty(2, 8, 16, 4, device="meta")
    forward = _EXTRA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    assert forward(q, kv, kv) == forward(q, full, full) == 2 * (2 * 2 * 8 * 16 * 16 * 4)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        assert _EXTRA_FLOPS[getattr(torch.ops.aten, name)](q, kv, kv) == forward(q, full, full)
    backward = _EXTRA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_backward]
    assert backward(q, q, kv, kv) == backward(q, q, full, full) > 0


def test_an_op_of_no_module_belongs_to_the_module_both_its_neighbours_ran_in(traced):
    """Autograd sums the gradients of a tensor read twice with ops of no module (a residual's): such an
    op is placed in the innermost module its neighbours of the same phase share, so where a plan is
    above its budget can be named by module (``chunk_sequence="auto"`` chunks those MLPs first)."""
    _, trace = traced
    orphans = [p for p, op in enumerate(trace.ops) if op.phase == "backward" and not op.module]
    assert orphans  # (a Llama's residual stream is read twice in every block)
    for p in orphans:
        backward = range(trace.num_forward, len(trace.ops))  # (its neighbours in its own phase)
        before = next((trace.ops[q].module for q in reversed(backward[:p - trace.num_forward]) if trace.ops[q].module),
                      "")
        after = next((trace.ops[q].module for q in backward[p - trace.num_forward + 1:] if trace.ops[q].module), "")
        b, a = before.split(".") if before else [], after.split(".") if after else []
        n = len(trace.enclosing_module(p).split(".")) if trace.enclosing_module(p) else 0
        assert trace.enclosing_module(p) == ".".join(b[:n]) and b[:n] == a[:n]  # shared by both
        assert n == len(b) or n == len(a) or b[n] != a[n]  # and the innermost so
    inside_mlp = [p for p in orphans if trace.enclosing_module(p).endswith(".mlp")]
    assert inside_mlp  # the MLP's input feeds gate_proj and up_proj: their gradients are summed inside it
    assert all(trace.enclosing_module(p) == trace.ops[p].module for p in range(len(trace.ops)) if trace.ops[p].module)
