"""The main job: fine-tune a small Llama on the Python standard library's own source code.

The corpus exists offline on every machine (the stdlib's ``.py`` files), tokenised as raw bytes
(vocabulary 256). The training loop is a plain PyTorch loop; the only memopt line is the one
marked below. The default budget, 0.075 GiB, is below the 93 MiB a step needs with every
activation kept, so the plan recomputes some and the returned model carries that out; the last
lines check the predicted peak against a measured real step. Run with ``make demo`` (or
``python examples/finetune.py --steps 40 --budget-gb 1`` to keep everything; ``--method rso``,
``randlora``, ``lisa`` or ``owlore`` for the founding papers' other methods).
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memopt
from memopt.memory import MemoryTracker


# Each method's options at this size (the README's "Subspaces and sampled layers" says what they mean).
METHODS = {
    "lora": {"rank": 16, "alpha": 32},
    "randlora": {"rank": 32, "alpha": 640},
    "rso": {"rank": 16, "resample_every": 20},
    "lisa": {"active_layers": 1, "switch_every": 10},
    "owlore": {"active_layers": 1, "switch_every": 10, "optimizer": "galore-adamw", "optimizer_options": {"rank": 32}},
}


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's top-level modules, as token ids."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen)
        ids = torch.stack([tokens[s : s + seq] for s in starts.tolist()])
        yield {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-gb", type=float, default=0.075)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--method", default="lora", choices=sorted(METHODS),
                        help="lora (the default), or one of the founding papers' other methods")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    tokens = stdlib_bytes(4_000_000)
    data = batches(tokens, args.batch, args.seq, seed=0)
    print(f"corpus: {len(tokens):,} bytes of the Python standard library")

    # The one memopt line: LoRA on every linear layer, planned for the budget, on this batch shape.
    model = memopt.optimize(model, budget_gb=args.budget_gb, example_inputs=next(data), method=args.method,
                            **METHODS[args.method])
    print(model.summary())
    model.print_trainable_parameters()

    if args.method == "lora":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    else:  # RSO's subproblems and LISA's / OwLore's switches happen in the steps of memopt's optimizer
        optimizer = model.make_optimizer(lr=args.lr)
    start, window = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {sum(window) / len(window):.4f} (mean of last {len(window)})"
                  f"  {time.perf_counter() - start:5.1f} s")
            window = []

    # Check the plan against a measurement of one more real step, counted tensor by tensor.
    with MemoryTracker(model, optimizer, inputs=(batch := next(data))) as tracker:
        model(**batch).loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    measured, predicted = tracker.report().peak_bytes, model.plan.predicted_peak_bytes
    print(f"peak of a real step: measured {measured / 2**20:.2f} MiB, predicted {predicted / 2**20:.2f} MiB "
          f"({100 * (predicted - measured) / measured:+.2f}%)")

if __name__ == "__main__":
    main()
