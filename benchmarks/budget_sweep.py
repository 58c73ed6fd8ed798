"""The budget promise, swept: for every plan, the measured peak of a real training step against the
budget and the prediction.

Models (tiny, random weights, CPU, fp32): Llama (MHA), Qwen2 (GQA, biased q/k/v), GPT-2 (Conv1D,
tied head, dropout 0.1 everywhere) × methods LoRA, PaCA, S²FT × budgets from the smallest feasible
one to keeping everything. Each plan's model trains for real: the steady-state step (optimizer
states exist, the step traced) is measured by memopt's tracker, and compared with the usable budget
(budget - reserve) and the predicted peak. Also: the smallest feasible budget asked for twice
(determinism, with the solver's status) and a plan at exactly that budget (accepted?), and whether
the measured peak ever rises as the budget falls.

    python benchmarks/budget_sweep.py              # 3 models x 3 methods x 12 budgets (~15 min on 2 cores)
    python benchmarks/budget_sweep.py --budgets 4  # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memopt  # noqa: E402
from benchmarks.plan_vs_measured import real_step_peak as steady_peak  # noqa: E402
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_qwen2  # noqa: E402

GIB, KIB = 2**30, 2**10

FAMILIES = {
    "llama": lambda: tiny_llama(num_hidden_layers=3),
    "qwen2-gqa": lambda: tiny_qwen2(num_hidden_layers=3),
    "gpt2-dropout": lambda: tiny_gpt2(n_layer=3, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
}
METHODS = ("lora", "paca", "s2ft")


def sweep(family: str, method: str, budgets: int) -> list[dict]:
    model = FAMILIES[family]()
    batch = lm_batch(model, batch=4, seq=32)
    options = dict(method=method, device="cpu")
    if method == "s2ft":
        options.update(head_ratio=0.25, channel_ratio=0.1)
    probe = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, **options).plan
    again = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=batch, **options).plan
    low, high = probe.min_budget_bytes, probe.predicted_peak_bytes + probe.reserve_bytes
    rows = []
    for i in range(budgets):
        budget = low + (high - low) * i / max(1, budgets - 1)
        optimized = memopt.optimize(copy.deepcopy(model), budget_gb=budget / GIB, example_inputs=batch, **options)
        plan = optimized.plan
        rows.append(dict(family=family, method=method, budget=plan.budget_bytes, usable=plan.usable_bytes,
                         predicted=plan.predicted_peak_bytes, measured=steady_peak(optimized, batch),
                         lowered=plan.needs_runtime))
    exact = {"min_bytes": (probe.solver.min_feasible_bytes, again.solver.min_feasible_bytes),
             "status": probe.solver.min_peak_status}
    try:
        at_min = memopt.optimize(copy.deepcopy(model), budget_gb=probe.min_budget_bytes / GIB, example_inputs=batch,
                                 **options).plan
        exact["at_min"] = f"accepted, predicted {at_min.predicted_peak_bytes:,} of {at_min.usable_bytes:,}"
    except memopt.InfeasibleBudgetError as exc:
        exact["at_min"] = f"REFUSED ({str(exc).splitlines()[0][:80]})"
    rows[0]["minimum"] = exact
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, default=12)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    print(f"{'model':<14}{'method':<6}{'budget KiB':>12}{'usable':>10}{'predicted':>11}{'measured':>10}"
          f"{'meas-usable':>12}{'meas-pred':>11}")
    for family in args.families:
        for method in args.methods:
            group = sweep(family, method, args.budgets)
            for r in group:
                print(f"{r['family']:<14}{r['method']:<6}{r['budget'] / KIB:>12.1f}{r['usable'] / KIB:>10.1f}"
                      f"{r['predicted'] / KIB:>11.1f}{r['measured'] / KIB:>10.1f}"
                      f"{(r['measured'] - r['usable']) / KIB:>+12.1f}{(r['measured'] - r['predicted']) / KIB:>+11.1f}")
            m = group[0]["minimum"]
            print(f"  smallest feasible: {m['min_bytes'][0]:,} and {m['min_bytes'][1]:,} bytes asked twice "
                  f"({m['status']}); a plan at exactly that budget: {m['at_min']}")
            rows += group
    over = [r for r in rows if r["measured"] > r["usable"]]
    errors = [abs(r["measured"] - r["predicted"]) / r["predicted"] for r in rows]
    rises = 0
    for key in {(r["family"], r["method"]) for r in rows}:
        group = sorted((r for r in rows if (r["family"], r["method"]) == key), key=lambda r: -r["budget"])
        rises += sum(b["measured"] > a["measured"] for a, b in zip(group, group[1:]))
    print(f"\n{len(rows)} plans; measured over the usable budget: {len(over)}"
          + (f" (worst +{max((r['measured'] - r['usable']) / r['usable'] for r in over):.2%})" if over else ""))
    print(f"prediction error |measured - predicted| / predicted: max {max(errors):.3%}, median "
          f"{statistics.median(errors):.3%}")
    print(f"measured peak rose as the budget fell: {rises} times; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
