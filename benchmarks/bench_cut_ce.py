"""Cut cross-entropy against HF's unfused loss on CPU: the same full fine-tuning step, measured peak
(memopt's tracker, and torch's MemTracker as the referee) and step time, in one process.

A small Llama with a large vocabulary (random weights, fp32 or bf16): one batch of random token ids
with labels, forward + ``out.loss.backward()`` + AdamW step. "unfused" is the plain HF model;
"cut CE" is the same model with ``memopt.passes.cut_ce.install`` (what ``memopt.optimize`` applies
with ``cut_cross_entropy=True``), run as it is — no planning — so only the head and the loss differ.
Loss and gradients of the two are compared (max relative difference) as a check.

    python benchmarks/bench_cut_ce.py [--seq 2048] [--vocab 32000] [--dtype float32] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig, LlamaForCausalLM

from memopt.memory import MemoryTracker
from memopt.passes import RewriteLog, cut_ce


def _model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))


def _step(model, opt, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _measure(model, batch, steps: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    _step(model, opt, batch)  # AdamW's state exists from here on, as in a running loop
    with MemoryTracker(model, opt, inputs=batch) as tracker:
        _step(model, opt, batch)
    ours = tracker.report().peak_bytes
    mt = MemTracker()
    mt.track_external(model, opt, batch)
    with mt:
        _step(model, opt, batch)
    theirs = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _step(model, opt, batch)
        times.append(time.perf_counter() - start)
    return {"peak": ours, "referee": theirs, "seconds": statistics.median(times)}


def _grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    plain = _model(args)
    fused = copy.deepcopy(plain)
    tokens = args.batch * args.seq
    chunks = cut_ce.install(fused, tokens, RewriteLog(fused))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}

    loss_a, grads_a = _grads(plain, batch)
    loss_b, grads_b = _grads(fused, batch)
    worst = max(((grads_b[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in grads_a.items())
    rows = {"unfused (HF)": _measure(plain, batch, args.steps), f"cut CE ({chunks} pieces)": _measure(fused, batch,
                                                                                                       args.steps)}
    logits = tokens * args.vocab
    print(f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.batch} x {args.seq} tokens, "
          f"{args.dtype}, full fine-tuning + AdamW, CPU; the logits are {logits * 4 / 2**20:,.1f} MiB in fp32")
    print(f"loss unfused {loss_a.item():.6f}, cut CE {loss_b.item():.6f}; largest gradient difference "
          f"{worst:.2e} of the gradient's largest entry")
    print("| step | peak (memopt tracker) | peak (torch MemTracker) | step s |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['peak'] / 2**20:,.1f} MiB | {row['referee'] / 2**20:,.1f} MiB | {row['seconds']:.3f} |")
    a, b = rows.values()
    print(f"cut CE / unfused: peak {b['peak'] / a['peak']:.3f}x, step time {b['seconds'] / a['seconds']:.3f}x")


if __name__ == "__main__":
    main()
