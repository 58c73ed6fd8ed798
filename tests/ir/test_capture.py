"""memopt.ir.capture: which method captures what, what the graph carries, and that the model is untouched.

Families checked here and in test_structure.py: every HF family in tests/models.py (Llama, Mistral,
Qwen2, Phi-3, GPT-2, GPT-NeoX, OPT, BERT x3) and the plain modules capture with torch.export.
symbolic_trace is the fallback for a forward export cannot run (a ``torch.fx.wrap``-ped host
function calling ``.numpy()``); Python control flow on a tensor value defeats both.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from memopt.errors import UnsupportedModelError
from memopt.ir import capture, module_path, node_shape, op_name
from memopt.ir.capture import METHODS
from tests.models import HandwrittenBlock, lm_batch, tiny_llama


def host_round(x: torch.Tensor) -> torch.Tensor:
    """Rounds on the host through numpy: fine eagerly and for symbolic_trace, impossible for export."""
    return torch.from_numpy(x.detach().cpu().numpy().round()).to(x)


torch.fx.wrap("host_round")  # symbolic_trace records calls to it as one opaque node


class HostRoundedBlock(nn.Module):
    """A transformer block, a BatchNorm in training mode, then a host-side rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.block = HandwrittenBlock()
        self.bn = nn.BatchNorm1d(8)  # 8 = sequence positions, used as BN channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return host_round(self.bn(self.block(x)))


class BranchesOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:  # Python control flow on a tensor value
            return y
        return -y


def _state(model: nn.Module) -> tuple:
    params = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    return params, buffers, modes


def _assert_same_state(model: nn.Module, before: tuple) -> None:
    params, buffers, modes = before
    for (name, p, value, grad), (name2, p2) in zip(params, model.named_parameters()):
        assert name == name2 and p is p2, f"parameter {name} was replaced"
        assert p2.requires_grad == grad, f"requires_grad of {name} changed"
        assert torch.equal(p2.detach(), value), f"value of {name} changed"
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), f"buffer {name} changed"
    assert modes == [m.training for m in model.modules()]


@pytest.fixture(scope="module")
def llama_and_captured():
    model = tiny_llama()
    return model, capture(model, (), lm_batch(model))


def test_hf_causal_lm_is_exported_with_use_cache_false_and_says_so(llama_and_captured):
    _, captured = llama_and_captured
    assert captured.method == "export"
    assert any("use_cache=False" in note for note in captured.notes)


def test_use_cache_given_by_the_caller_is_kept_and_not_noted():
    model = tiny_llama()
    captured = capture(model, (), {**lm_batch(model, labels=False), "use_cache": False})
    assert captured.method == "export" and captured.notes == ()


def test_param_of_node_maps_every_parameter_placeholder_to_its_fqn(llama_and_captured):
    model, captured = llama_and_captured
    placeholders = {n.name for n in captured.gm.graph.nodes if n.op == "placeholder"}
    assert set(captured.param_of_node) <= placeholders
    assert {n for n, _ in model.named_parameters()} <= set(captured.param_of_node.values())


def test_every_linear_op_maps_back_to_its_module_through_the_module_stack(llama_and_captured):
    model, captured = llama_and_captured
    linear_ops = [n for n in captured.gm.graph.nodes if op_name(n, {}) == "linear"]
    assert len(linear_ops) == 15  # 2 layers x 7 projections + lm_head
    for node in linear_ops:
        weight_fqn = captured.param_of_node[node.args[1].name]
        assert module_path(node) == weight_fqn.removesuffix(".weight")


def test_export_graph_nodes_carry_static_shapes(llama_and_captured):
    _, captured = llama_and_captured
    embedding = next(n for n in captured.gm.graph.nodes if op_name(n, {}) == "embedding")
    assert node_shape(embedding) == (2, 16, 64)  # [B, T, hidden]


def test_capture_leaves_model_unchanged():
    model = tiny_llama()
    model.model.layers[0].requires_grad_(False)
    model.model.layers[1].eval()  # a mixed training mode must survive too
    before = _state(model)
    capture(model, (), lm_batch(model))
    _assert_same_state(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_capture_does_not_advance_batchnorm_running_stats(method):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # training mode: BN would update stats
    before = _state(model)
    capture(model, (torch.randn(3, 4),), methods=(method,))
    _assert_same_state(model, before)


def test_capture_uses_the_model_dtype_as_is():
    model = tiny_llama().to(torch.bfloat16)
    captured = capture(model, (), lm_batch(model))
    linear = next(n for n in captured.gm.graph.nodes if op_name(n, {}) == "linear")
    assert linear.meta["val"].dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_forward_export_cannot_run_falls_back_to_symbolic_trace_with_shapes():
    model, x = HostRoundedBlock(), torch.randn(2, 8, 32)
    before = _state(model)
    captured = capture(model, (x,))
    assert captured.method == "symbolic_trace"
    assert any("export" in note and ".numpy()" in note for note in captured.notes)
    q_call = next(n for n in captured.gm.graph.nodes if n.op == "call_module" and n.target == "block.q")
    assert node_shape(q_call) == (2, 8, 32)
    _assert_same_state(model, before)  # the real forward for shapes must not move BN running stats


def test_symbolic_trace_records_shapes_from_a_fake_run_when_the_model_allows():
    model = HandwrittenBlock()
    captured = capture(model, (torch.randn(2, 8, 32),), methods=("symbolic_trace",))
    assert captured.method == "symbolic_trace"
    assert any("FakeTensorMode" in note for note in captured.notes)
    k_call = next(n for n in captured.gm.graph.nodes if n.op == "call_module" and n.target == "k")
    assert node_shape(k_call) == (2, 8, 16)  # [B, T, kv_heads * head_dim]


def test_symbolic_trace_maps_get_attr_nodes_to_parameter_fqns():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    captured = capture(Scaled(), (torch.randn(2, 4),), methods=("symbolic_trace",))
    assert set(captured.param_of_node.values()) == {"scale"}


def test_model_neither_method_captures_raises_unsupported_naming_both_failures():
    with pytest.raises(UnsupportedModelError) as info:
        capture(BranchesOnValue(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "torch.export.export(strict=False) failed: GuardOnDataDependentSymNode" in message
    assert "torch.fx.symbolic_trace failed: TraceError" in message
    assert "Ways out" in message and "BranchesOnValue.forward(x" in message


def test_unknown_capture_method_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match="export"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), methods=("jit",))
    assert METHODS == ("export", "symbolic_trace")
