"""Rewrite passes, found by method name in a small registry.

Each entry pairs ``apply(module, ModelGraph, method_config, RewriteLog) -> PassResult`` with
``merge(module) -> module``, which folds the method's parameterization back into a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from memopt.passes.base import ModuleDecision, PassResult, RewriteLog
from memopt.passes.lora import apply_lora, merge_lora
from memopt.passes.paca import apply_paca, merge_paca
from memopt.passes.s2ft import apply_s2ft, merge_s2ft

__all__ = ["PassSpec", "PASSES", "get_pass", "ModuleDecision", "PassResult", "RewriteLog"]


@dataclass(frozen=True)
class PassSpec:
    apply: Callable[..., PassResult]
    merge: Callable[[nn.Module], nn.Module]


PASSES: dict[str, PassSpec] = {
    "lora": PassSpec(apply=apply_lora, merge=merge_lora),
    "paca": PassSpec(apply=apply_paca, merge=merge_paca),
    "s2ft": PassSpec(apply=apply_s2ft, merge=merge_s2ft),
}


def get_pass(method: str) -> PassSpec:
    if method not in PASSES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(PASSES)}")
    return PASSES[method]
