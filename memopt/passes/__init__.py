"""Rewrite passes, found by method name in a small registry.

Each entry pairs ``apply(module, ModelGraph, method_config, RewriteLog) -> PassResult`` with
``merge(module) -> module``, which folds the method's parameterization back into a plain model.
Every method's merge first dequantizes (``dequantize_model``: a no-op without quantized layers),
because an adapter merges into a plain weight: ``merge`` of a QLoRA / QPaCA / quantized-S²FT
model gives plain ``nn.Linear`` / ``Conv1D`` layers holding deq(W) plus the trained update.
``QUANTIZE`` is the quantize pass; it composes with a method rather than being one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from memopt.passes.base import ModuleDecision, PassResult, RewriteLog
from memopt.passes.lora import LoraLinear, apply_lora, merge_lora
from memopt.passes.paca import PacaLinear, apply_paca, merge_paca
from memopt.passes.quantize import QPacaLinear, QuantLinear, apply_quantize, dequantize_model
from memopt.passes.s2ft import apply_s2ft, merge_s2ft
from memopt.passes.s2ft_ops import S2ftLinear

__all__ = ["PassSpec", "PASSES", "QUANTIZE", "REWRITTEN", "get_pass", "ModuleDecision", "PassResult", "RewriteLog"]

# The modules memopt's passes put into a model: a model holding one was rewritten already.
REWRITTEN = (LoraLinear, PacaLinear, QPacaLinear, QuantLinear, S2ftLinear)


@dataclass(frozen=True)
class PassSpec:
    apply: Callable[..., PassResult]
    merge: Callable[[nn.Module], nn.Module]


def _dequantized_then(merge: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    @functools.wraps(merge)
    def merged(model: nn.Module) -> nn.Module:
        return merge(dequantize_model(model))

    return merged


PASSES: dict[str, PassSpec] = {
    "lora": PassSpec(apply=apply_lora, merge=_dequantized_then(merge_lora)),
    "paca": PassSpec(apply=apply_paca, merge=_dequantized_then(merge_paca)),
    "s2ft": PassSpec(apply=apply_s2ft, merge=_dequantized_then(merge_s2ft)),
}

QUANTIZE = PassSpec(apply=apply_quantize, merge=dequantize_model)


def get_pass(method: str) -> PassSpec:
    if method not in PASSES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(PASSES)}")
    return PASSES[method]
