"""memopt with FSDP2: optimize on every rank, shard with ``fully_shard``, train as usual.

Run on CPU with two processes: ``torchrun --standalone --nproc_per_node=2 examples/fsdp2.py``.
Each rank builds the same model (same seed), makes the same plan, shards every decoder layer and
the root, and trains; the last line on rank 0 reports the loss and that both ranks agree on it.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import memopt
from finetune import batches, stdlib_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64))
    data = batches(stdlib_bytes(200_000), batch=4, seq=64, seed=rank)  # each rank its own shard of data
    model = memopt.optimize(model, budget_gb=1, example_inputs=next(data), method="lora", rank=8)
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(args.steps):
        loss = model(**next(data)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        print(f"fsdp2 world={world} loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    dist.barrier()  # no rank tears gloo down while its peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
