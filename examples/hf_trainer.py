"""memopt with HF Trainer: optimize the model once, hand it to Trainer as usual.

``memopt.integrations.hf.Trainer`` is transformers' Trainer whose checkpoints of a memopt model hold
only the trained tensors (and resume from them); plain ``transformers.Trainer`` trains it too.

Run: ``python examples/hf_trainer.py`` (a small Llama, byte tokens from the Python stdlib).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import memopt
from memopt.integrations.hf import Trainer
from finetune import stdlib_bytes


class ByteChunks(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, seq: int) -> None:
        self.chunks = tokens[: len(tokens) // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i].clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128))
    data = ByteChunks(stdlib_bytes(200_000), seq=128)
    example = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    model = memopt.optimize(model, budget_gb=1, example_inputs=example, method="lora", rank=8)
    print(next(line for line in model.plan.summary().splitlines() if "predicted peak" in line))
    with tempfile.TemporaryDirectory() as out:
        half = max(1, args.steps // 2)
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=args.steps,
                                     learning_rate=3e-3, logging_steps=max(1, args.steps // 3), report_to=[],
                                     use_cpu=True, save_strategy="steps", save_steps=half)
        Trainer(model=model, args=training, train_dataset=data).train()
        print(f"checkpoint-{half}:", sorted(p.name for p in Path(out, f"checkpoint-{half}").iterdir()))


if __name__ == "__main__":
    main()
