"""LoRA: a low-rank trainable update beside every targeted frozen Linear (the baseline method).

``y = base(x) + scaling · B(A(dropout(x)))`` with ``scaling = alpha / rank``, A Kaiming-uniform
and B zero-initialised — PEFT's numerics exactly, so a memopt LoRA and a PEFT LoRA with the same
A and B give the same outputs and gradients. Works on ``nn.Linear`` (weight [out, in]) and on the
transposed Conv1D-style linear of GPT-2 (weight [in, out]); ``merge`` folds BA back into W.
Over a ``QuantLinear`` base (QLoRA) the base's forward dequantizes; ``merge`` needs a plain base
(``dequantize_model`` first — the registry's merge does both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from memopt.config import LoraConfig
from memopt.ir.structure import LinearLayer, ModelGraph, Role
from memopt.passes.base import (
    ModuleDecision,
    ModuleDetails,
    PassResult,
    RewriteLog,
    WrappedLinear,
    details_kind,
    merge_wrapped,
    select_targets,
)
from memopt.passes.quantize import QuantLinear

__all__ = ["LoraDetails", "LoraLinear", "apply_lora", "merge_lora"]


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class LoraDetails(ModuleDetails):
    """A LoRA layer: ``W x + (alpha / rank) · B A dropout(x)``."""

    kind: ClassVar[str] = "lora"

    rank: int
    alpha: float
    dropout: float


def _factory(base_layer: nn.Module, adapter_dtype: str) -> dict:
    """The adapters' device and dtype: the base weight's device; its dtype (a ``QuantLinear``'s
    compute dtype, without dequantizing it), or float32 over a 16-bit base when ``adapter_dtype``
    is ``"float32"`` (PEFT's default, ``autocast_adapter_dtype=True``)."""
    if isinstance(base_layer, QuantLinear):
        device, dtype = base_layer.qweight.device, base_layer.compute_dtype
    else:
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
    if adapter_dtype == "float32" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return {"device": device, "dtype": dtype}


class LoraLinear(WrappedLinear):
    """A frozen Linear-like ``base_layer`` plus a trainable rank-``r`` update ``lora_B·lora_A``."""

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int,
                 cfg: LoraConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self._wrap(base_layer)
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        factory = _factory(base_layer, cfg.adapter_dtype)
        self.lora_A = nn.Linear(in_features, cfg.rank, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.rank, out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.enabled = True
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator | None) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        # PEFT's order: the input in the adapters' dtype (fp32 adapters on a 16-bit model), the sum
        # in the promoted dtype, the result back in the base layer's.
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x if x.dtype == dtype else x.to(dtype)))) * self.scaling
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A in the base weight's layout ([out, in], or [in, out] for Conv1D)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # [out, in]
        return delta.t() if self.kind == "conv1d" else delta

    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (changes it in place)."""
        if isinstance(self.base_layer, QuantLinear):  # its weight is a fresh copy: adding into it would be lost
            raise ValueError("cannot merge LoRA into a quantized base layer; call "
                             "memopt.passes.quantize.dequantize_model(model) first, then merge")
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}"


def apply_lora(model: nn.Module, graph: ModelGraph, cfg: LoraConfig, log: RewriteLog) -> PassResult:
    """Freeze every parameter and wrap each targeted Linear-like layer in a ``LoraLinear``.

    Requires: ``graph`` was captured from ``model`` (names refer to its submodules).
    Ensures: only ``lora_A`` / ``lora_B`` weights require grad; outputs are unchanged at init (B = 0).
    """
    targets = select_targets(graph, model, cfg.target_modules, cfg.exclude_modules)
    log.freeze(model.parameters())
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    decisions = []
    for layer in targets:
        base = model.get_submodule(layer.name)
        log.replace(layer.name, LoraLinear(base, layer.kind, layer.in_features, layer.out_features, cfg, generator))
        decisions.append(ModuleDecision(
            name=layer.name, role=layer.role.value, method="lora",
            in_features=layer.in_features, out_features=layer.out_features,
            trainable_params=cfg.rank * (layer.in_features + layer.out_features),
            details=LoraDetails(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, block=layer.block),
            reason=why_adapted(cfg),
        ))
    return PassResult(model, tuple(decisions + frozen_rest(graph, targets, cfg)))


def why_adapted(cfg: Any) -> str:
    """Why an adapter method (``cfg.target_modules``) adapts a layer it targets."""
    target = cfg.target_modules
    return "all-linear" if target == "all-linear" else f"matched target_modules={target!r}"


def frozen_rest(graph: ModelGraph, targets: list[LinearLayer], cfg: Any) -> list[ModuleDecision]:
    """A "frozen" decision, with why, for each Linear-like layer of ``graph`` not in ``targets``."""
    chosen = {layer.name for layer in targets}
    return [ModuleDecision(name=layer.name, role=layer.role.value, method="frozen", in_features=layer.in_features,
                           out_features=layer.out_features, trainable_params=0,
                           details=ModuleDetails(block=layer.block), reason=why_frozen(layer, cfg))
            for layer in graph.linears if layer.name not in chosen]


def why_frozen(layer: LinearLayer, cfg: Any) -> str:
    """Why an adapter method (``cfg.target_modules``) leaves ``layer`` frozen."""
    if layer.role is Role.LM_HEAD and cfg.target_modules == "all-linear":
        return "'all-linear' leaves the LM head out"
    return "not matched by target_modules, or excluded"


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoraLinear`` in ``model`` back into a plain layer, in place; returns ``model``."""
    return merge_wrapped(model, LoraLinear)
