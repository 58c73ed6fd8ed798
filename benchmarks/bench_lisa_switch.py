"""What switching LISA's active blocks costs on a lowered step (recompute at a tight budget).

One process, one small Llama, LISA with ``switch_every=2``, at a budget 30 % of the way from the
smallest feasible one to keeping everything, so the step is lowered. The plan is made for every
active set at once (``Plan.traced_trainable``): the step is traced once and each call's backward
leaves out the frozen blocks' gradients, so a switch builds one pruned backward graph the first
time a set is drawn. The same loop runs on the model as it is (a budget where nothing is lowered)
for the step time without memopt's lowering. Step times are medians over the steps of each kind
(wall clock; 2 CPU cores).

    python benchmarks/bench_lisa_switch.py            # 8 layers, hidden 256, batch 4 x 256, fp32, CPU
    python benchmarks/bench_lisa_switch.py --quick    # 4 layers, hidden 128, batch 2 x 128

Measured here (``python benchmarks/bench_lisa_switch.py``, 2 CPU cores):

    shape: 8 layers, hidden 256, batch 4 x 256; LISA 2 of 8, switch every 2 steps; budget 122.8 MiB (keep-all 198.7 MiB)
    run                     plan s  first step s   step s  switch step s  traces  re-plans
    lowered (tight)           25.4          2.25    0.222          0.307       1         0
    as it is (64 GiB)          6.6          0.34    0.234          0.207       0         0

A switch on the lowered step costs 0.085 s (0.38 of a step: pruning and generating one backward
graph for the new set), where re-planning and re-tracing per set cost ≈ 18 s before the step was
planned for every set at once. Planning at the tight budget takes longer (25 s): the two extreme
sets are planned first, then every set at once, with and without cut cross-entropy.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
import transformers

import memopt
from memopt.passes.layerwise import sampler_of


def _loop(optimized: memopt.OptimizedModel, batch: dict, steps: int) -> tuple[list[float], list[bool]]:
    opt = optimized.make_optimizer(lr=1e-3)
    sampler = sampler_of(optimized.model)
    times, switched = [], []
    last = None
    for _ in range(steps):
        active = sampler.active
        start = time.perf_counter()
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        switched.append(last is not None and active != last)
        last = active
    return times, switched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("memopt").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    layers, hidden, batch_size, seq = (4, 128, 2, 128) if args.quick else (8, 256, 4, 256)
    config = transformers.LlamaConfig(vocab_size=2000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    options = dict(method="lisa", active_layers=2, switch_every=2, device="cpu", reserve_gb=0)
    probe = memopt.optimize(copy.deepcopy(model), 64, batch, **options).plan
    budget = (probe.min_budget_bytes + 0.3 * (probe.predicted_peak_bytes - probe.min_budget_bytes)) / 2**30
    print(f"shape: {layers} layers, hidden {hidden}, batch {batch_size} x {seq}; LISA 2 of {layers}, switch every 2 "
          f"steps; budget {budget * 1024:.1f} MiB (keep-all {probe.predicted_peak_bytes / 2**20:.1f} MiB)")
    print(f"{'run':<22}{'plan s':>8}{'first step s':>14}{'step s':>9}{'switch step s':>15}{'traces':>8}{'re-plans':>10}")
    for label, gb in (("lowered (tight)", budget), ("as it is (64 GiB)", 64)):
        start = time.perf_counter()
        optimized = memopt.optimize(copy.deepcopy(model), gb, batch, **options)
        planned = time.perf_counter() - start
        times, switched = _loop(optimized, batch, args.steps)
        steady = statistics.median(t for t, s in zip(times[1:], switched[1:]) if not s)
        switch = statistics.median(t for t, s in zip(times[1:], switched[1:]) if s)
        traces = optimized.runtime.traces_made if optimized.runtime is not None else 0
        print(f"{label:<22}{planned:>8.1f}{times[0]:>14.2f}{steady:>9.3f}{switch:>15.3f}{traces:>8}"
              f"{len(optimized.replans):>10}")


if __name__ == "__main__":
    main()
