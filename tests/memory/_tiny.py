"""Batches and a plain conv net for the memory tests; the HF models come from ``tests.models``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tests.models import VOCAB, tiny_gpt2, tiny_llama
from tests.models import tiny_bert_mlm as tiny_bert


class ConvNet(nn.Module):
    """A plain conv + MLP classifier with a BatchNorm buffer; returns the scalar loss."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.GELU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.features(x)), y)


def lm_batch(batch: int = 2, seq: int = 16, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Token ids and labels (separate tensors); on ``meta`` the values are left undefined."""
    if device == "meta":
        ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, VOCAB, (batch, seq), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def conv_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))


# name -> (model factory, batch factory); the batch is kwargs (dict) or positional args (tuple).
REFEREE_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "llama": (tiny_llama, lm_batch),
    "gpt2": (tiny_gpt2, lm_batch),
    "bert": (tiny_bert, lm_batch),
    "convnet": (ConvNet, conv_batch),
}


def call(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def loss_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.loss
