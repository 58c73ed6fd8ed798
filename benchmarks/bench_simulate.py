"""Simulate one LLaMA-2-7B training step (bf16, AdamW, batch 1 x 512) for a CUDA target on CPU.

Prints the wall time and the breakdown at the peak in GiB, for full fine-tuning and for a variant
where every parameter is frozen except the last decoder layer (frozen parameters get no gradient,
no optimizer state, and backward saves nothing below the last layer).

    python benchmarks/bench_simulate.py [--layers 32] [--seq 512]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from memopt.memory import MemoryReport, simulate_step
from memopt.optim import factory as optim_factory


def llama2_7b(layers: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):  # no memory, no init time
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16)


def timed(model: torch.nn.Module, seq: int) -> tuple[MemoryReport, float]:
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    report = simulate_step(model, {"input_ids": ids, "labels": ids.clone()}, optimizer=optim_factory("adamw"), device="cuda")
    return report, time.perf_counter() - start


def show(title: str, report: MemoryReport, seconds: float) -> None:
    gib = 2**30
    print(f"\n{title}: simulated in {seconds:.1f} s")
    print(f"  peak {report.peak_bytes / gib:.3f} GiB in {report.peak_phase}")
    for name, nbytes in report.peak.to_dict().items():
        print(f"    {name:<12} {nbytes / gib:8.3f} GiB")
    phases = ", ".join(f"{p} {b / gib:.2f}" for p, b in report.phase_peaks.items())
    print(f"  phase peaks (GiB): {phases}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()

    model = llama2_7b(args.layers)
    n = sum(p.numel() for p in model.parameters())
    print(f"LLaMA-2-7B shape, {args.layers} layers, {n / 1e9:.3f} B parameters, bf16, AdamW (foreach), CUDA target")
    show("full fine-tuning", *timed(model, args.seq))

    model.requires_grad_(False)
    model.model.layers[-1].requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    show(f"only the last layer trainable ({trainable / 1e6:.0f} M parameters)", *timed(model, args.seq))


if __name__ == "__main__":
    main()
