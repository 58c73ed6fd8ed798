"""A real loop: variable-length batches padded to their longest sequence, at a budget that recomputes.

The corpus is the Python standard library's source (bytes as tokens, offline everywhere), cut into
documents of random lengths; each batch is padded to its longest document (``attention_mask`` 0 and
labels -100 on the padding), as an HF data collator does. The model is planned once, for the
longest batch (``max_seq``), at a budget between the smallest feasible one and keeping everything,
then trains ``--steps`` steps in a plain loop. Printed, measured in this one process:

* traces made and re-plans, and the seconds spent planning (``optimize``) and tracing (the first
  step of each traced program);
* every step's peak (memopt's tracker, steady state) against the usable budget;
* the step time against the same rewritten model run unplanned by plain autograd (which keeps every
  activation: it would not fit the budget on a device; on the CPU it runs), as a ratio.

    python benchmarks/bench_real_loops.py               # 200 steps, ~4 min on 2 cores
    python benchmarks/bench_real_loops.py --steps 40
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memopt  # noqa: E402
from examples.finetune import stdlib_bytes  # noqa: E402
from memopt.memory.tracker import MemoryTracker  # noqa: E402

GIB, MIB = 2**30, 2**20


def padded_batches(tokens: torch.Tensor, batch: int, min_seq: int, max_seq: int, seed: int):
    """Batches of ``batch`` documents of random lengths in [min_seq, max_seq], padded to the longest."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        lengths = torch.randint(min_seq, max_seq + 1, (batch,), generator=gen).tolist()
        longest = max(lengths)
        ids = torch.zeros(batch, longest, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for row, n in enumerate(lengths):
            start = int(torch.randint(0, len(tokens) - n, (1,), generator=gen))
            ids[row, :n] = tokens[start:start + n]
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def largest(tokens: torch.Tensor, batch: int, max_seq: int) -> dict:
    ids = tokens[: batch * max_seq].view(batch, max_seq).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(model: torch.nn.Module, data, steps: int, track: bool) -> tuple[list[float], list[int], list[float]]:
    """Step times, per-step peaks (if ``track``) and losses of ``steps`` steps of a plain loop."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    times, peaks, losses = [], [], []
    for _ in range(steps):
        batch = next(data)
        tracker = MemoryTracker(model, opt, inputs=batch) if track else None
        start = time.perf_counter()
        with tracker if tracker is not None else _nothing():
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if tracker is not None:
            peaks.append(tracker.report().peak_bytes)
    return times, peaks, losses


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-seq", type=int, default=16)
    parser.add_argument("--max-seq", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=0.3, help="budget between smallest (0) and keep-all (1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.max_seq)
    model = LlamaForCausalLM(config)
    tokens = stdlib_bytes(4_000_000)
    example = largest(tokens, args.batch, args.max_seq)
    options = dict(method="lora", rank=16, alpha=32, device="cpu")

    probe = memopt.optimize(copy.deepcopy(model), budget_gb=64, example_inputs=example, **options).plan
    low, high = probe.min_budget_bytes, probe.predicted_peak_bytes + probe.reserve_bytes
    budget = (low + args.fraction * (high - low)) / GIB
    start = time.perf_counter()
    planned = memopt.optimize(model, budget_gb=budget, example_inputs=example, **options)
    planning = time.perf_counter() - start
    plan = planned.plan
    unplanned = copy.deepcopy(planned.model)  # the same rewrite and adapters, run by plain autograd
    print(f"model: Llama 4 layers, hidden 256, LoRA r16; batches of {args.batch} x {args.min_seq}..{args.max_seq} "
          f"tokens, padded to the longest; budget {budget * GIB / MIB:.2f} MiB (usable {plan.usable_bytes / MIB:.2f} "
          f"MiB; keep-all {high / MIB:.2f}); planned in {planning:.1f} s; recomputes "
          f"{plan.bytes_by_action()['recompute'] / MIB:.2f} MiB")

    _, peaks, losses = train(planned, padded_batches(tokens, args.batch, args.min_seq, args.max_seq, 1),
                             args.steps, track=True)
    runtime = planned.runtime
    traced = runtime.trace_seconds if runtime is not None else 0.0
    # Timed without the tracker (a dispatch mode slows every op), on other batches of the same loader.
    times, _, _ = train(planned, padded_batches(tokens, args.batch, args.min_seq, args.max_seq, 2), args.steps,
                        track=False)
    ref_times, _, ref_losses = train(unplanned, padded_batches(tokens, args.batch, args.min_seq, args.max_seq, 1),
                                     args.steps, track=False)
    over = [p for p in peaks if p > plan.usable_bytes]
    steady = times[5:] or times
    ref_steady = ref_times[5:] or ref_times
    print(f"traces made {runtime.traces_made if runtime else 0}, re-plans {len(planned.replans)}, "
          f"tracing {traced:.1f} s in all, planning {planning:.1f} s")
    print(f"peak per step: max {max(peaks) / MIB:.3f} MiB, median {statistics.median(peaks) / MIB:.3f} MiB; usable "
          f"{plan.usable_bytes / MIB:.3f} MiB; steps over it: {len(over)} of {len(peaks)}")
    print(f"step time (median, after 5): planned {statistics.median(steady) * 1e3:.1f} ms, unplanned "
          f"{statistics.median(ref_steady) * 1e3:.1f} ms: x{statistics.median(steady) / statistics.median(ref_steady):.3f}"
          f" (both untracked, same process)")
    print(f"loss: first 10 {statistics.mean(losses[:10]):.3f} -> last 10 {statistics.mean(losses[-10:]):.3f}; "
          f"unplanned last 10 {statistics.mean(ref_losses[-10:]):.3f}")


if __name__ == "__main__":
    main()
