"""The LLaMA-2-7B layer shape (4 of its 32 layers, so it runs in seconds): a plan inside a 4090-sized
budget, blocks decided once, exact static bytes, and an honest minimum budget."""

from __future__ import annotations

import pytest
import torch
import transformers

from memopt.config import DEVICE_PRESETS, LoraConfig
from memopt.errors import InfeasibleBudgetError
from memopt.ir.joint import trace_joint
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog, get_pass
from memopt.planner.problem import build_problem, evaluate, keep_all
from memopt.planner.solve import plan_activations

RTX = DEVICE_PRESETS["rtx4090"]
LAYERS, SEQ, RANK = 4, 2048, 16


@pytest.fixture(scope="module")
def problem():
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=LAYERS,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids.clone()}
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=RANK, adapter_dtype="model"), RewriteLog(model))
    params = sum(-(-p.numel() * 2 // 512) * 512 for p in model.parameters())
    return build_problem(trace_joint(model, batch, device="cuda", granularity=512), RTX), params


@pytest.mark.slow
def test_a_7b_shaped_step_is_planned_inside_a_budget_with_blocks_decided_once(problem):
    problem, params = problem
    assert problem.static.parameters == params  # bf16, every tensor rounded to 512-byte blocks
    # gradients: lora_A and lora_B of 7 linears per layer, bf16, 512-byte blocks
    assert problem.static.gradients == LAYERS * sum(-(-n * 2 // 512) * 512 for n in _lora_sizes())
    shared = [blocks for blocks in problem.class_blocks.values() if len(blocks) > 1]
    assert shared and all(blocks == (1, 2, 3) for blocks in shared)  # layer 0 saves less: no grad to embeddings
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    usable = (keep + problem.static.resident) // 2
    plan = plan_activations(problem, usable)
    assert plan.status == "OPTIMAL" and plan.min_peak_status == "OPTIMAL"
    assert plan.peak_bytes <= usable < keep and plan.evaluation.valid
    for klass, group in problem.classes.items():  # broadcast: one action per class in every layer
        assert len({plan.choices[c.index].action for c in group}) == 1
    with pytest.raises(InfeasibleBudgetError) as info:
        plan_activations(problem, plan.min_peak_bytes - 1)
    assert info.value.predicted_bytes == plan.min_peak_bytes


def _lora_sizes() -> list[int]:
    q = k = v = o = (RANK * 4096, 4096 * RANK)
    gate = up = (RANK * 4096, 11008 * RANK)
    down = (RANK * 11008, 4096 * RANK)
    return [n for pair in (q, k, v, o, gate, up, down) for n in pair]
