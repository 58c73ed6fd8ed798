"""Parameterizations side by side on one small Llama, in one process: RandLoRA (PEFT's and memopt's)
against LoRA (PEFT's and memopt's) at about equal trainable parameters — peak memory and step time.

PEFT keeps RandLoRA's scaled basis (≈ min_dim × min_dim per layer) for backward and so peaks above
LoRA; memopt plans it like any activation. ``memopt RandLoRA @ LoRA peak`` is memopt's RandLoRA
planned with PEFT LoRA's measured peak as its budget (device "cpu", no reserve): the planner
recomputes what does not fit, and the row shows what that measures and costs. Peaks are measured
by memopt's ``MemoryTracker`` on the second step (optimizer state exists), times are medians of
round-robin timed steps (see ``bench_adapters.py``, whose model, batch and timing this reuses).

    python benchmarks/bench_methods.py            # 8 layers, hidden 512, batch 4 x 256, fp32, CPU
    python benchmarks/bench_methods.py --quick    # 4 layers, hidden 256, batch 2 x 128

Measured here (2 CPU cores shared with a test run; ``python benchmarks/bench_methods.py --quick``, 2 min):

    shape: 4 layers, hidden 256, intermediate 688, vocab 8000, batch 2 x 128; RandLoRA rank 32, LoRA rank 3
    method                        trainable  peak MiB peak/LoRA  wall s wall/LoRA
    PEFT LoRA                        58,560      70.7     1.000   0.253     1.000
    memopt LoRA                      58,560      70.7     1.000   0.237     0.936
    PEFT RandLoRA                    64,512      77.2     1.092   0.394     1.553
    memopt RandLoRA                  64,512      77.2     1.092   0.365     1.438
    memopt RandLoRA @ LoRA peak      64,512      70.7     0.999   0.391     1.543
    memopt RandLoRA @ LoRA peak: predicted 70.7 MiB, recomputed 7.1 MiB, offloaded 0.0 MiB, predicted overhead 1.0 ms

PEFT's RandLoRA peaks 9 % above LoRA at about equal trainable parameters; memopt's, planned at
LoRA's peak, measures at it (0.999x) by recomputing 7.1 MiB of scaled bases, at PEFT RandLoRA's
step time. (With the bases held in bf16 and converted per layer, memopt's keep-everything step
peaked at 89.2 MiB, 1.26x: each layer's fp32 copy was kept for backward; they are fp32 now, as PEFT's.)

The second table (``--corpus-steps``, default 20) trains every method of the founding papers from
the same random small Llama (vocabulary 256: bytes of the Python standard library's source as
tokens, ``bench_optimizers.corpus``) for N steps at one learning rate each, with the optimizer
``make_optimizer`` builds (PEFT: torch AdamW): trainable parameters, the measured peak of step 2,
the median step time, and the loss of the last step. Measured (``--quick``; 2 CPU cores, partly
shared with a test run, so the step times are rough; peaks and losses are exact and repeatable):

    method                            trainable  peak MiB  step s last loss
    PEFT LoRA r16                       312,320      36.8   0.063    3.8067
    memopt LoRA r16                     312,320      36.8   0.065    3.8067
    PEFT RandLoRA r32                    64,512      40.2   0.115    3.7870
    memopt RandLoRA r32                  64,512      40.2   0.115    3.7870
    memopt RSO r32                      339,968      34.6   0.061    3.7546
    memopt LISA 1 of 4                  922,112      38.0   0.120    2.8509
    memopt OwLore 1 of 4 + GaLore       922,112      32.1   0.053    4.7109
    memopt full + GaLore r32          3,295,488      40.0   0.070    3.9024

(LISA's and OwLore's trainable count is the active set's: the embeddings, the head and one block.
RSO keeps P·x per layer, not x, and has the lowest peak of the adapter-sized methods; LISA, which
trains the embeddings and a whole block with AdamW at this learning rate, reaches the lowest loss.)
"""

from __future__ import annotations

import argparse

import torch
from bench_adapters import _LINEARS, FULL, QUICK, _MIB, Shape, llama, lm_batch, prepare, time_steps

import memopt
from memopt.memory import MemoryTracker
from memopt.passes.randlora import num_bases


def randlora_trainable(shape: Shape, rank: int) -> int:
    sides = [(shape.hidden, shape.hidden)] * 4 + [(shape.hidden, shape.intermediate)] * 2 + \
        [(shape.intermediate, shape.hidden)]
    return shape.layers * sum(rank * num_bases(i, o, rank) + num_bases(i, o, rank) * min(i, o) for i, o in sides)


def lora_trainable(shape: Shape, rank: int) -> int:
    return shape.layers * rank * (4 * 2 * shape.hidden + 3 * (shape.hidden + shape.intermediate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--randlora-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus-steps", type=int, default=20, help="steps of the second table (0: skip it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    r = args.randlora_rank
    target = randlora_trainable(shape, r)
    lora_rank = min(range(1, 65), key=lambda k: abs(lora_trainable(shape, k) - target))  # about equal trainable

    def peft_lora(model, batch, _):
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=_LINEARS))

    def peft_randlora(model, batch, _):
        from peft import RandLoraConfig, get_peft_model
        return get_peft_model(model, RandLoraConfig(r=r, randlora_alpha=20 * r, target_modules=_LINEARS))

    def ours(method, budget=64.0, **options):
        def build(model, batch, _):
            return memopt.optimize(model, budget, batch, method=method, device="cpu", reserve_gb=0, **options)
        return build

    runs = [prepare("PEFT LoRA", peft_lora, shape, lora_rank),
            prepare("memopt LoRA", ours("lora", rank=lora_rank, alpha=2 * lora_rank), shape, lora_rank),
            prepare("PEFT RandLoRA", peft_randlora, shape, r),
            prepare("memopt RandLoRA", ours("randlora", rank=r, alpha=20 * r), shape, r)]
    lora_peak = runs[0].peak_bytes
    planned = prepare("memopt RandLoRA @ LoRA peak", ours("randlora", budget=lora_peak / 2**30, rank=r, alpha=20 * r),
                      shape, r)
    runs.append(planned)
    results = time_steps(runs, args.steps, warmup=1)
    print(f"shape {shape}; RandLoRA rank {r}, LoRA rank {lora_rank} (about equal trainable parameters)")
    print(f"{'method':<28} {'trainable':>10} {'peak MiB':>9} {'peak/LoRA':>9} {'wall s':>7} {'wall/LoRA':>9}")
    for res in results:
        print(f"{res.name:<28} {res.trainable:>10,} {res.peak_bytes / _MIB:9.1f} {res.peak_bytes / lora_peak:9.3f} "
              f"{res.step_s:7.3f} {res.step_s / results[0].step_s:9.3f}")
    plan = planned.model.plan
    print(f"memopt RandLoRA @ LoRA peak: predicted {plan.predicted_peak_bytes / _MIB:.1f} MiB, "
          f"recomputed {plan.bytes_by_action()['recompute'] / _MIB:.1f} MiB, offloaded "
          f"{plan.bytes_by_action()['offload'] / _MIB:.1f} MiB, predicted overhead {plan.overhead_us / 1000:.1f} ms")
    if args.corpus_steps:
        papers(args.corpus_steps, seq=64 if args.quick else 128)


# name, how to build it, learning rate
_PAPERS = [
    ("PEFT LoRA r16", "peft-lora", {}, 1e-3),
    ("memopt LoRA r16", "lora", {"rank": 16, "alpha": 32}, 1e-3),
    ("PEFT RandLoRA r32", "peft-randlora", {}, 1e-3),
    ("memopt RandLoRA r32", "randlora", {"rank": 32, "alpha": 640}, 1e-3),
    ("memopt RSO r32", "rso", {"rank": 32, "resample_every": 10}, 1e-3),
    ("memopt LISA 1 of 4", "lisa", {"active_layers": 1, "switch_every": 5}, 1e-3),
    ("memopt OwLore 1 of 4 + GaLore", "owlore", {"active_layers": 1, "switch_every": 5, "optimizer": "galore-adamw",
                                                  "optimizer_options": {"rank": 32}}, 1e-3),
    ("memopt full + GaLore r32", "full", {"optimizer": "galore-adamw", "optimizer_options": {"rank": 32}}, 1e-3),
]


def papers(steps: int, seq: int, batch: int = 4) -> None:
    """Each method from the same weights on the same stdlib batches (module docstring, second table)."""
    import statistics
    import time

    from bench_optimizers import corpus
    from bench_optimizers import model as byte_llama

    tokens = corpus(steps * batch * seq + 1)
    batches = [tokens[i * batch * seq:(i + 1) * batch * seq].view(batch, seq) for i in range(steps)]
    print(f"\nthe founding papers' methods: {steps} steps of batch {batch} x {seq} stdlib bytes, 4 layers, hidden 256")
    print(f"{'method':<32} {'trainable':>10} {'peak MiB':>9} {'step s':>7} {'last loss':>9}")
    for name, method, options, lr in _PAPERS:
        model = byte_llama()
        example = {"input_ids": batches[0], "labels": batches[0]}
        if method.startswith("peft-"):
            from peft import LoraConfig, RandLoraConfig, get_peft_model

            config = LoraConfig(r=16, lora_alpha=32, target_modules=_LINEARS) if method == "peft-lora" else \
                RandLoraConfig(r=32, randlora_alpha=640, target_modules=_LINEARS)
            model = get_peft_model(model, config)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        else:
            model = memopt.optimize(model, 64, example, method=method, device="cpu", reserve_gb=0, **options)
            opt = model.make_optimizer(lr=lr)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        times, peak, loss = [], 0, float("nan")
        for i, ids in enumerate(batches):
            start = time.perf_counter()
            if i == 1:
                with MemoryTracker(model, opt, inputs={"input_ids": ids}) as tracker:
                    loss = _step(model, opt, ids)
                peak = tracker.report().peak_bytes
            else:
                loss = _step(model, opt, ids)
            times.append(time.perf_counter() - start)
        print(f"{name:<32} {trainable:>10,} {peak / _MIB:9.1f} {statistics.median(times):7.3f} {loss:9.4f}")


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


if __name__ == "__main__":
    main()
