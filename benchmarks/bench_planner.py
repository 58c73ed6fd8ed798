"""The activation planner: solve time at 7B scale, optimality on small graphs, recompute vs torch.

    python benchmarks/bench_planner.py [--part a|b|c|all] [--layers 32] [--seq 4096]

(a) LLaMA-2-7B shape, batch 1 x seq 4096, LoRA r=16, RTX 4090, 24 GiB: time to capture, trace and
    solve (minimum peak, then minimum time), and the plan's headline numbers.
(b) Graphs with <= 60 saved tensors (tiny HF models with LoRA, random chains): the plan's predicted
    overhead against the exact optimum of the same model from an independent MILP (SCIP).
(c) At equal peak bytes, recompute FLOPs of memopt's plan (recompute only, offload off, so that
    both sides trade memory for FLOPs alone) against torch's min-cut partitioner with
    ``activation_memory_budget`` swept (scoped with ``torch._functorch.config.patch``) and against
    HF gradient checkpointing (every layer recomputed). torch's peak is its partitioned program's,
    measured with the same liveness accounting; gradient checkpointing's is the simulated eager
    step's. memopt's plan is made at exactly that peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import transformers

from memopt.config import DEVICE_PRESETS, LoraConfig
from memopt.errors import InfeasibleBudgetError
from memopt.ir.joint import trace_joint
from memopt.ir.structure import build_model_graph
from memopt.passes import RewriteLog, get_pass
from memopt.planner.cpsat import SolverOptions, solve_min_peak, solve_min_time
from memopt.planner.problem import build_problem, evaluate, keep_all
from memopt.planner.reference import milp
from memopt.planner.solve import PlannerConfig, plan_activations

GIB = 2**30
RTX = DEVICE_PRESETS["rtx4090"]
# (b) reuses the test suite's tiny models and random chains: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama_7b_shape(layers: int, seq: int, batch: int = 1) -> tuple[torch.nn.Module, dict]:
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model.to(torch.bfloat16), {"input_ids": ids, "labels": ids.clone()}


def with_lora(model: torch.nn.Module, batch: dict, rank: int) -> torch.nn.Module:
    get_pass("lora").apply(model, build_model_graph(model, (), batch), LoraConfig(rank=rank), RewriteLog(model))
    return model


# ----------------------------------------------------------------------------- (a)


def part_a(layers: int, seq: int, budget_gb: float = 24.0) -> None:
    print(f"\n(a) LLaMA-2-7B shape ({layers} layers), batch 1 x seq {seq}, LoRA r=16, rtx4090, {budget_gb:g} GiB")
    start = time.perf_counter()
    model, batch = llama_7b_shape(layers, seq)
    model = with_lora(model, batch, 16)
    capture = time.perf_counter() - start
    trace = trace_joint(model, batch, device="cuda", granularity=RTX.alloc_granularity)
    start = time.perf_counter()
    problem = build_problem(trace, RTX)
    build = time.perf_counter() - start
    usable = int(budget_gb * GIB) - RTX.reserve_bytes
    phase1 = solve_min_peak(problem, PlannerConfig().solver)
    phase2 = solve_min_time(problem, usable, PlannerConfig().solver, hint=phase1.choices)
    start = time.perf_counter()
    plan = plan_activations(problem, usable, reserve_bytes=RTX.reserve_bytes)
    total = time.perf_counter() - start
    keep = evaluate(problem, keep_all(problem)).peak_bytes
    print(f"  capture + LoRA {capture:.1f} s | joint trace {trace.trace_seconds:.1f} s | problem {build:.2f} s "
          f"({len(problem.candidates)} saved tensors, {problem.num_classes} classes, {problem.num_points} points)")
    print(f"  CP-SAT minimum peak: {phase1.status} in {phase1.seconds:.1f} s | minimum time: {phase2.status} "
          f"in {phase2.seconds:.1f} s | plan_activations end to end (both phases, greedy, model building): {total:.1f} s")
    print(f"  keep-all peak {keep / GIB:.2f} GiB -> plan {plan.peak_bytes / GIB:.2f} GiB (usable {usable / GIB:.2f}); "
          f"smallest feasible budget {(plan.min_feasible_bytes + RTX.reserve_bytes) / GIB:.2f} GiB")
    by = {a: sum(c.nbytes for c, ch in zip(problem.candidates, plan.choices) if ch.action == a) / GIB
          for a in ("keep", "recompute", "offload")}
    print(f"  saved: keep {by['keep']:.2f} GiB, recompute {by['recompute']:.2f} GiB, offload {by['offload']:.2f} GiB; "
          f"overhead {plan.evaluation.overhead_us / 1e3:.1f} ms on {sum(problem.point_us) / 1e3:.0f} ms of compute")
    solo = plan_activations(build_problem(trace, RTX, allow_offload=False), usable, reserve_bytes=RTX.reserve_bytes)
    print(f"  recompute only (no offload): overhead {solo.evaluation.overhead_us / 1e3:.1f} ms "
          f"({100 * solo.evaluation.overhead_us / sum(problem.point_us):.1f} %), solved in {solo.seconds:.1f} s")


# ----------------------------------------------------------------------------- (b)


def _tiny_models() -> dict:
    from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_mistral

    return {name: (factory, lm_batch) for name, factory in
            (("llama", tiny_llama), ("mistral", tiny_mistral), ("gpt2", tiny_gpt2))}


def part_b() -> None:
    print("\n(b) optimality on graphs with <= 60 saved tensors: CP-SAT plan (default quantum, time limit) vs the "
          "exact optimum (MILP, SCIP)")
    slow = dataclasses.replace(RTX, name="rtx4090-slow-link", host_bandwidth=2 * 10**9)
    worst = 1.0
    cases = []
    for name, (factory, make_batch) in _tiny_models().items():
        model = factory()
        batch = make_batch(model)
        model = with_lora(model, batch, 4)
        trace = trace_joint(model, batch, device="cuda", granularity=512)
        for device in (slow, DEVICE_PRESETS["cpu"]):  # the cpu has no host link: recompute only
            cases.append((f"tiny {name} LoRA, {device.name}", build_problem(trace, device)))
    from tests.planner._synthetic import chain_trace

    for seed in (1, 2, 4):
        cases.append((f"random chain seed {seed}, slow link", build_problem(chain_trace(60, seed), slow)))
    print(f"  {'graph':<40} {'saved':>5} {'budget':>7}  {'memopt us':>9} {'optimum us':>10} {'ratio':>6}")
    for label, problem in cases:
        least = milp(problem, None)
        keep = evaluate(problem, keep_all(problem)).peak_bytes
        for share in (0.25, 0.5, 0.75):
            capacity = least + int((keep - least) * share)
            plan = plan_activations(problem, capacity)
            exact = milp(problem, capacity)
            ratio = (1 + plan.evaluation.overhead_us) / (1 + exact)
            worst = max(worst, ratio)
            print(f"  {label:<40} {len(problem.candidates):>5} {share:>6.0%}  {plan.evaluation.overhead_us:>9} "
                  f"{exact:>10} {ratio:>6.3f}")
    print(f"  worst ratio (1 + memopt) / (1 + optimum): {worst:.4f} (target <= 1.01)")


# ----------------------------------------------------------------------------- (c)


def _recompute_flops(trace, base) -> int:
    """FLOPs of forward ops that a partitioned backward runs again (same node names as the forward)."""
    forward = {op.name for op in base.ops[: base.num_forward]}
    return sum(op.flops for op in trace.ops[trace.num_forward:] if op.name in forward)


def _memopt_at(problem, peak: int) -> tuple[int | None, str]:
    try:
        plan = plan_activations(problem, peak)
    except InfeasibleBudgetError as exc:
        return None, f"infeasible (min {exc.predicted_bytes / GIB:.3f} GiB)"
    flops = sum(c.recompute_flops for c, ch in zip(problem.candidates, plan.choices) if ch.action == "recompute")
    return flops, f"{flops / 1e12:.2f}"


def part_c(layers: int, seq: int) -> None:
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    print(f"\n(c) recompute FLOPs at equal peak: LLaMA-2-7B shape, {layers} layers, batch 1 x seq {seq}, LoRA r=16")
    model, batch = llama_7b_shape(layers, seq)
    model = with_lora(model, batch, 16)
    base = trace_joint(model, batch, device="cuda", granularity=512)
    ours = build_problem(base, RTX, allow_offload=False)
    keep = evaluate(ours, keep_all(ours)).peak_bytes
    print(f"  memopt keep-all peak {keep / GIB:.3f} GiB; memopt recompute-only minimum "
          f"{solve_min_peak(ours, SolverOptions()).objective / GIB:.3f} GiB")
    print(f"  {'baseline':<34} {'peak GiB':>9} {'its TFLOPs':>10} {'memopt TFLOPs':>13} {'ratio':>7}")
    for budget in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        with functorch_config.patch(activation_memory_budget=budget):
            trace = trace_joint(model, batch, device="cuda", granularity=512,
                                partition_fn=min_cut_rematerialization_partition)
        theirs = build_problem(trace, RTX, allow_offload=False, allow_recompute=False)
        peak = evaluate(theirs, keep_all(theirs)).peak_bytes
        flops = _recompute_flops(trace, base)
        mine, text = _memopt_at(ours, peak)
        ratio = "-" if not mine else f"{flops / mine:.2f}x"
        print(f"  {'torch min-cut, budget ' + format(budget, '.1f'):<34} {peak / GIB:>9.3f} {flops / 1e12:>10.2f} "
              f"{text:>13} {ratio:>7}")
    _gradient_checkpointing(model, batch, base, ours)


def _gradient_checkpointing(model, batch, base, ours) -> None:
    checkpointed = _eager_step_peak(model, batch, checkpointing=True)
    flops = sum(op.flops for op in base.ops[: base.num_forward] if op.block is not None)  # each layer's forward again
    mine, text = _memopt_at(ours, checkpointed)
    ratio = "-" if not mine else f"{flops / mine:.2f}x"
    print(f"  {'HF gradient checkpointing (eager)':<34} {checkpointed / GIB:>9.3f} {flops / 1e12:>10.2f} {text:>13} {ratio:>7}")


def _eager_step_peak(model, batch, checkpointing: bool) -> int:
    """Peak of forward + backward of an eager step on fake parameters (checkpoint recomputation
    runs after the forward, so the parameters must really be the module's: no functional_call)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memopt.memory.tracker import MemoryTracker

    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")
        inputs = {k: torch.zeros(v.shape, dtype=v.dtype, device="cpu") for k, v in batch.items()}
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with MemoryTracker(model, inputs=inputs, round_to=512, device_label="cuda") as tracker:
            model(**inputs).loss.backward()
        model.gradient_checkpointing_disable()
        for p in model.parameters():
            p.grad = None
    report = tracker.report("cuda")
    return max(report.phase_peaks.get("forward", 0), report.phase_peaks.get("backward", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=("a", "b", "c", "all"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--c-layers", type=int, default=4, help="layers for part (c), which traces ~8 times")
    args = parser.parse_args()
    if args.part in ("a", "all"):
        part_a(args.layers, args.seq)
    if args.part in ("b", "all"):
        part_b()
    if args.part in ("c", "all"):
        part_c(args.c_layers, args.seq)


if __name__ == "__main__":
    main()
