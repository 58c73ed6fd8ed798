"""memopt.ir.structure: roles, heads, MLPs and couplings inferred from dataflow, family by family.

Every expectation is exact: the complete {module: role} map, head counts read from the config, the
complete set of couplings. Each model is built and captured once per module (module fixtures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import pytest
import torch
from torch import nn

from memopt.ir import Role, analyze, build_model_graph, capture, node_meta, op_name
from tests import models as M

Q, K, V, O, QKV = Role.Q, Role.K, Role.V, Role.O, Role.QKV
GATE, UP, DOWN, GATE_UP, HEAD, OTHER = Role.GATE, Role.UP, Role.DOWN, Role.GATE_UP, Role.LM_HEAD, Role.OTHER


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    layer: str  # module prefix of layer i, "{i}" marks the index
    roles: Mapping[str, Role]  # per layer, relative to the prefix
    extra: Mapping[str, Role]  # outside the layers
    couplings: tuple[tuple[str, str, str], ...]  # per layer: producer, consumer, kind
    activation: str


_LLAMA_ROLES = {
    "self_attn.q_proj": Q, "self_attn.k_proj": K, "self_attn.v_proj": V, "self_attn.o_proj": O,
    "mlp.gate_proj": GATE, "mlp.up_proj": UP, "mlp.down_proj": DOWN,
}
_LLAMA_COUPLINGS = (
    ("self_attn.v_proj", "self_attn.o_proj", "v->o"),
    ("mlp.gate_proj", "mlp.down_proj", "gate->down"),
    ("mlp.up_proj", "mlp.down_proj", "up->down"),
)
_BERT_ROLES = {
    "attention.self.query": Q, "attention.self.key": K, "attention.self.value": V,
    "attention.output.dense": O, "intermediate.dense": UP, "output.dense": DOWN,
}
_BERT_COUPLINGS = (("attention.self.value", "attention.output.dense", "v->o"), ("intermediate.dense", "output.dense", "up->down"))


def _llama_like(build: Callable[[], nn.Module]) -> Family:
    return Family(build, "model.layers.{i}.", _LLAMA_ROLES, {"lm_head": HEAD}, _LLAMA_COUPLINGS, "silu")


def _bert_like(build: Callable[[], nn.Module], prefix: str, extra: Mapping[str, Role]) -> Family:
    return Family(build, prefix + "encoder.layer.{i}.", _BERT_ROLES, extra, _BERT_COUPLINGS, "gelu")


FAMILIES = {
    "llama": _llama_like(M.tiny_llama),
    "llama_eager": _llama_like(lambda: M.tiny_llama(attn_implementation="eager")),
    "mistral": _llama_like(M.tiny_mistral),
    "qwen2": _llama_like(M.tiny_qwen2),
    "qwen2_eager": _llama_like(lambda: M.tiny_qwen2(attn_implementation="eager")),
    "phi3": Family(
        M.tiny_phi3, "model.layers.{i}.",
        {"self_attn.qkv_proj": QKV, "self_attn.o_proj": O, "mlp.gate_up_proj": GATE_UP, "mlp.down_proj": DOWN},
        {"lm_head": HEAD},
        (("self_attn.qkv_proj", "self_attn.o_proj", "qkv->o"), ("mlp.gate_up_proj", "mlp.down_proj", "gate_up->down")),
        "silu",
    ),
    "gpt2": Family(
        M.tiny_gpt2, "transformer.h.{i}.",
        {"attn.c_attn": QKV, "attn.c_proj": O, "mlp.c_fc": UP, "mlp.c_proj": DOWN},
        {"lm_head": HEAD},
        (("attn.c_attn", "attn.c_proj", "qkv->o"), ("mlp.c_fc", "mlp.c_proj", "up->down")),
        "gelu",  # GPT-2's tanh GELU is written out as mul/pow/tanh in the graph
    ),
    "gpt_neox": Family(
        M.tiny_gpt_neox, "gpt_neox.layers.{i}.",
        {"attention.query_key_value": QKV, "attention.dense": O, "mlp.dense_h_to_4h": UP, "mlp.dense_4h_to_h": DOWN},
        {"lm_head": HEAD},
        (("attention.query_key_value", "attention.dense", "qkv->o"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "up->down")),
        "gelu",
    ),
    "opt": Family(
        M.tiny_opt, "model.decoder.layers.{i}.",
        {"self_attn.q_proj": Q, "self_attn.k_proj": K, "self_attn.v_proj": V, "self_attn.out_proj": O, "fc1": UP, "fc2": DOWN},
        {"lm_head": HEAD},
        (("self_attn.v_proj", "self_attn.out_proj", "v->o"), ("fc1", "fc2", "up->down")),
        "relu",
    ),
    "bert": _bert_like(M.tiny_bert, "", {"pooler.dense": OTHER}),
    "bert_mlm": _bert_like(M.tiny_bert_mlm, "bert.", {"cls.predictions.transform.dense": OTHER, "cls.predictions.decoder": HEAD}),
    "bert_classifier": _bert_like(M.tiny_bert_classifier, "bert.", {"bert.pooler.dense": OTHER, "classifier": OTHER}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    fam = FAMILIES[request.param]
    model = fam.build()
    return fam, model, build_model_graph(model, (), M.lm_batch(model))


def _roles(graph) -> dict[str, Role]:
    return {layer.name: layer.role for layer in graph.linears}


def _per_layer(fam: Family, name: str, i: int) -> str:
    return fam.layer.format(i=i) + name


def test_every_linear_gets_exactly_its_role(family):
    fam, model, graph = family
    layers = model.config.num_hidden_layers
    expected = {_per_layer(fam, n, i): r for i in range(layers) for n, r in fam.roles.items()} | dict(fam.extra)
    assert {layer.name: layer.role for layer in graph.linears} == expected


def test_attention_heads_match_the_config(family):
    _, model, graph = family
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert [(a.block, a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attention] == [
        (i, heads, kv_heads, head_dim) for i in range(cfg.num_hidden_layers)
    ]
    assert all(a.groups == heads // kv_heads for a in graph.attention)


def test_attention_and_mlp_groups_name_their_projections(family):
    fam, model, graph = family
    by_role = {r: n for n, r in fam.roles.items()}
    for i, (attn, mlp) in enumerate(zip(graph.attention, graph.mlps, strict=True)):

        def name(role: Role) -> str | None:
            return _per_layer(fam, by_role[role], i) if role in by_role else None

        assert (attn.q, attn.k, attn.v, attn.o, attn.qkv) == (name(Q), name(K), name(V), name(O), name(QKV))
        assert (mlp.block, mlp.gate, mlp.up, mlp.gate_up, mlp.down) == (i, name(GATE), name(UP), name(GATE_UP), name(DOWN))
        assert mlp.activation == fam.activation
    assert len(graph.mlps) == model.config.num_hidden_layers


def test_couplings_are_exactly_the_coupled_pairs(family):
    fam, model, graph = family
    expected = {
        (_per_layer(fam, p, i), _per_layer(fam, c, i), kind)
        for i in range(model.config.num_hidden_layers)
        for p, c, kind in fam.couplings
    }
    assert {(c.producer, c.consumer, c.kind) for c in graph.couplings} == expected
    assert len(graph.couplings) == len(expected)


def test_blocks_follow_the_layers_in_graph_order(family):
    fam, model, graph = family
    for layer in graph.linears:
        in_layer = [i for i in range(model.config.num_hidden_layers) if layer.name.startswith(fam.layer.format(i=i))]
        assert layer.block == (in_layer[0] if in_layer else None), layer.name
    blocks = [layer.block for layer in graph.linears if layer.block is not None]
    assert blocks == sorted(blocks)


def test_features_and_bias_come_from_the_weight_layout(family):
    _, model, graph = family
    for layer in graph.linears:
        module = model.get_submodule(layer.name)
        rows, cols = module.weight.shape
        assert (layer.in_features, layer.out_features) == ((cols, rows) if layer.kind == "linear" else (rows, cols))
        assert layer.kind == ("linear" if isinstance(module, nn.Linear) else "conv1d")
        assert layer.bias == (module.bias is not None)


def test_linear_and_attention_nodes_carry_typed_memopt_meta(family):
    _, model, graph = family
    nodes = list(graph.captured.gm.graph.nodes)
    linear_meta = [node_meta(n).linear for n in nodes if node_meta(n).linear is not None]
    assert {(m.module, m.role, m.block) for m in linear_meta} == {(x.name, x.role, x.block) for x in graph.linears}
    attention_meta = [node_meta(n).attention for n in nodes if node_meta(n).attention is not None]
    assert [a.block for a in attention_meta] == list(range(model.config.num_hidden_layers))


def test_eager_attention_is_found_without_sdpa_in_the_graph():
    model = M.tiny_llama(attn_implementation="eager")
    graph = build_model_graph(model, (), M.lm_batch(model, labels=False))
    ops = {op_name(n, {}) for n in graph.captured.gm.graph.nodes}
    assert "softmax" in ops and not any("scaled_dot_product" in op for op in ops)
    assert len(graph.attention) == 2


def test_qwen2_reports_biased_qkv_and_unbiased_o():
    model = M.tiny_qwen2()
    graph = build_model_graph(model, (), M.lm_batch(model, labels=False))
    assert {r: graph.linear(f"model.layers.0.self_attn.{r}_proj").bias for r in "qkvo"} == {
        "q": True, "k": True, "v": True, "o": False,
    }


def test_gpt2_conv1d_layers_read_their_weight_as_in_by_out():
    model = M.tiny_gpt2()
    graph = build_model_graph(model, (), M.lm_batch(model, labels=False))
    c_attn = graph.linear("transformer.h.0.attn.c_attn")
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features) == ("conv1d", 64, 192)
    assert graph.linear("lm_head").kind == "linear"  # tied to wte, still found by dataflow


def test_lora_wrapped_model_keeps_roles_on_base_layers_and_adapters_are_other():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(M.tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    graph = build_model_graph(model, (), M.lm_batch(model, labels=False))  # PeftModel.forward(**kwargs)
    layer = "base_model.model.model.layers.0."
    assert graph.linear(layer + "self_attn.q_proj.base_layer").role is Q
    assert graph.linear(layer + "mlp.down_proj.base_layer").role is DOWN
    assert graph.linear(layer + "self_attn.q_proj.lora_A.default").role is OTHER
    assert graph.attention[0].q == layer + "self_attn.q_proj.base_layer"


# ----------------------------------------------------------------------------- plain modules


class MisnamedBlock(nn.Module):
    """HandwrittenBlock's dataflow with every projection under a misleading name."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 48) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.down_proj = nn.Linear(dim, dim)  # acts as q
        self.up_proj = nn.Linear(dim, kv_heads * self.head_dim)  # k
        self.gate_proj = nn.Linear(dim, kv_heads * self.head_dim)  # v
        self.q_proj = nn.Linear(dim, dim)  # o
        self.o_proj, self.v_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)  # gate, up
        self.k_proj = nn.Linear(hidden, dim)  # down

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # [B, n, T, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.down_proj(x), self.heads)
        k = self._heads(self.up_proj(x), self.kv_heads)
        v = self._heads(self.gate_proj(x), self.kv_heads)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # [B, H, T, D]
        x = x + self.q_proj(attn.transpose(1, 2).flatten(2))
        return x + self.k_proj(nn.functional.gelu(self.o_proj(x)) * self.v_proj(x))


@pytest.fixture(scope="module")
def handwritten_graph():
    return build_model_graph(M.HandwrittenBlock(), (torch.randn(2, 8, 32),))


def test_handwritten_gqa_block_is_understood(handwritten_graph):
    graph = handwritten_graph
    assert _roles(graph) == {
        "q": Q, "k": K, "v": V, "o": O, "gate": GATE, "up": UP, "down": DOWN,
    }
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attention] == [(4, 2, 8)]


def test_symbolic_trace_fallback_finds_the_same_structure_as_export(handwritten_graph):
    model = M.HandwrittenBlock()
    captured = capture(model, (torch.randn(2, 8, 32),), methods=("symbolic_trace",))
    traced = analyze(captured, model)
    assert captured.method == "symbolic_trace"
    assert (traced.linears, traced.attention, traced.mlps, traced.couplings) == (
        handwritten_graph.linears, handwritten_graph.attention, handwritten_graph.mlps, handwritten_graph.couplings,
    )


def test_roles_come_from_dataflow_not_module_names():
    graph = build_model_graph(MisnamedBlock(), (torch.randn(2, 8, 32),))
    assert _roles(graph) == {
        "down_proj": Q, "up_proj": K, "gate_proj": V, "q_proj": O, "o_proj": GATE, "v_proj": UP, "k_proj": DOWN,
    }
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attention] == [(4, 2, 8)]  # SDPA with enable_gqa
    assert graph.mlps[0].activation == "gelu"


def test_multihead_attention_projections_are_left_alone_since_it_reads_their_weights_directly():
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj`` (and packs
    q/k/v into one parameter): a rewrite of out_proj would be bypassed, so it is no Linear layer
    here, and a note says why."""
    graph = build_model_graph(M.MHABlock(), (torch.randn(2, 8, 32),))
    assert _roles(graph) == {"fc1": UP, "fc2": DOWN}
    assert any(n.startswith("attn.out_proj (NonDynamicallyQuantizableLinear) left alone: MultiheadAttention reads")
               for n in graph.notes)
    (attn,) = graph.attention
    assert (attn.q, attn.k, attn.v, attn.qkv, attn.o) == (None, None, None, None, None)
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 4, 8)
    assert [(c.producer, c.consumer, c.kind) for c in graph.couplings] == [("fc1", "fc2", "up->down")]


class WeightReadDirectly(nn.Module):
    """Mamba's mixer: ``dt_proj.weight @ x`` — a Linear whose module is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.x_proj, self.dt_proj, self.unused = nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dt_proj.weight @ self.x_proj(x).transpose(1, 2)).transpose(1, 2)


def test_a_linear_never_called_is_left_alone_with_a_note():
    graph = build_model_graph(WeightReadDirectly(), (torch.randn(2, 8, 16),))
    assert [layer.name for layer in graph.linears] == ["x_proj"]
    never = [n.partition(" ")[0] for n in graph.notes if "the traced step never calls it" in n]
    assert never == ["dt_proj", "unused"]


def test_mlp_stack_without_expand_and_contract_is_all_other():
    graph = build_model_graph(M.tiny_mlp(), (torch.randn(4, 32),))
    assert [(x.name, x.role, x.block) for x in graph.linears] == [
        ("0", OTHER, None), ("2", OTHER, None), ("4", OTHER, None),
    ]
    assert graph.attention == () and graph.mlps == () and graph.couplings == ()


def test_expand_activate_contract_without_attention_is_an_mlp_in_block_zero():
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 32))
    graph = build_model_graph(model, (torch.randn(4, 32),))
    assert [(x.name, x.role, x.block) for x in graph.linears] == [("0", UP, 0), ("3", DOWN, 0)]
    assert graph.mlps[0].activation == "gelu"


# ----------------------------------------------------------------------------- ModelGraph API


def test_linear_lookup_of_unknown_name_says_which_names_exist(handwritten_graph):
    with pytest.raises(KeyError, match="no Linear-like layer named 'q_proj'.*known layers include: q, k"):
        handwritten_graph.linear("q_proj")


def test_by_role_returns_layers_of_any_given_role_in_graph_order(handwritten_graph):
    assert [x.name for x in handwritten_graph.by_role(V, Q)] == ["q", "v"]
    assert handwritten_graph.by_role(HEAD) == ()


def test_summary_lists_every_layer_and_group(handwritten_graph):
    text = handwritten_graph.summary()
    assert text.splitlines()[0].split() == ["name", "kind", "in", "out", "role", "block"]
    assert "down  linear     48     32  down     0" in text
    assert "attention block 0: q=q k=k v=v o=o heads=4 kv_heads=2 head_dim=8" in text
    assert "mlp block 0: gate=gate up=up down=down activation=silu" in text
