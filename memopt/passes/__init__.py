"""Rewrite passes, registered by the type of their method config (``PASSES``).

Each entry pairs ``apply(module, ModelGraph, method_config, RewriteLog) -> PassResult`` with
``merge(module) -> module``, which folds the method's parameterization back into a plain model, and
declares how it composes with quantization (``quantize``) and with layers loaded quantized by
bitsandbytes (``bitsandbytes``), so that no caller branches on a method. ``rewrite`` applies a
method, composed with the quantize pass when asked.

Every method's merge first dequantizes (``dequantize_model``: a no-op without quantized layers),
because an adapter merges into a plain weight: ``merge`` of a QLoRA / QPaCA / quantized-S²FT
model gives plain ``nn.Linear`` / ``Conv1D`` layers holding deq(W) plus the trained update.
``QUANTIZE`` is the quantize pass; it composes with a method rather than being one.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch.nn as nn

from memopt.config import (
    METHOD_CONFIGS,
    FullConfig,
    LisaConfig,
    LoraConfig,
    MethodConfig,
    OwloreConfig,
    PacaConfig,
    QuantizeConfig,
    RandLoraConfig,
    RsoConfig,
    S2ftConfig,
)
from memopt.errors import UnsupportedModelError
from memopt.ir.structure import ModelGraph
from memopt.passes.base import DETAILS, ModuleDecision, ModuleDetails, PassResult, RewriteLog, details_kind
from memopt.passes.freeze import apply_full
from memopt.passes.int8train import Int8TrainDetails, Int8TrainLinear, apply_int8_trainable
from memopt.passes.layerwise import LayerwiseDetails, apply_layerwise, merge_layerwise
from memopt.passes.lora import LoraDetails, LoraLinear, apply_lora, merge_lora
from memopt.passes.paca import PacaDetails, PacaLinear, QPacaLinear, apply_paca, merge_paca
from memopt.passes.quantize import QuantizeDetails, QuantLinear, apply_quantize, dequantize_model
from memopt.passes.randlora import RandLoraDetails, RandLoraLinear, apply_randlora, merge_randlora
from memopt.passes.rso import RsoDetails, RsoLinear, apply_rso, merge_rso
from memopt.passes.s2ft import S2ftDetails, apply_s2ft, merge_s2ft
from memopt.passes.s2ft_ops import S2ftLinear

__all__ = ["PassSpec", "PASSES", "QUANTIZE", "REWRITTEN", "after_step_bytes", "check_bitsandbytes", "get_pass",
           "register_pass",
           "rewrite", "DETAILS", "Int8TrainDetails", "Int8TrainLinear", "LayerwiseDetails",
           "LoraDetails", "ModuleDecision", "ModuleDetails", "PacaDetails", "PassResult",
           "QuantizeDetails", "RandLoraDetails", "RandLoraLinear", "RewriteLog", "RsoDetails", "RsoLinear",
           "S2ftDetails", "details_kind"]

# The modules memopt's passes put into a model: a model holding one was rewritten already.
REWRITTEN = (Int8TrainLinear, LoraLinear, PacaLinear, QPacaLinear, QuantLinear, RandLoraLinear, RsoLinear, S2ftLinear)


@dataclass(frozen=True)
class PassSpec:
    """A method's pass. ``quantize``: ``"before"`` — the frozen base weights are quantized first and the
    method wraps each ``QuantLinear`` (QLoRA, QPaCA); ``"after"`` — the method rewrites the weights
    themselves first, and those it trains stay in full precision (S²FT); ``"trainable"`` — it trains
    the weights themselves, and quantize="int8" stores them int8, trained by stochastic rounding
    (full training, ``passes.int8train``); ``"never"`` — it cannot compose. ``bitsandbytes``: None if
    the method runs on layers loaded quantized by bitsandbytes, else why it cannot (the error)."""

    label: str
    apply: Callable[..., PassResult]
    merge: Callable[[nn.Module], nn.Module]
    quantize: Literal["before", "after", "trainable", "never"] = "before"
    bitsandbytes: str | None = None


def _dequantized_then(merge: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    @functools.wraps(merge)
    def merged(model: nn.Module) -> nn.Module:
        return merge(dequantize_model(model))

    return merged


def _nothing_to_fold(model: nn.Module) -> nn.Module:
    return model  # full training changes the weights themselves


_FULL_QUANTIZED = ("method='full' trains the weights themselves, which a model loaded quantized by bitsandbytes "
                   "cannot give; load it in full precision (quantize='int8' then trains int8 weights), or train "
                   "adapters over the quantized weights with method='lora' (QLoRA)")

_SAMPLED = ("{} trains whole blocks' weights, which quantized weights (quantize=, or a model loaded quantized by "
            "bitsandbytes) cannot give; train it in full precision, or adapters over quantized weights with "
            "method='lora' (QLoRA)")

PASSES: dict[type[MethodConfig], PassSpec] = {
    LoraConfig: PassSpec("LoRA", apply=apply_lora, merge=_dequantized_then(merge_lora)),
    PacaConfig: PassSpec("PaCA", apply=apply_paca, merge=_dequantized_then(merge_paca)),
    S2ftConfig: PassSpec("S²FT", apply=apply_s2ft, merge=_dequantized_then(merge_s2ft), quantize="after",
                         bitsandbytes="S²FT permutes and trains blocks of the weights themselves, which a model "
                                      "loaded quantized by bitsandbytes cannot give; use method='lora' or 'paca' "
                                      "(QLoRA / QPaCA), or load the model in full precision"),
    RandLoraConfig: PassSpec("RandLoRA", apply=apply_randlora, merge=_dequantized_then(merge_randlora)),
    RsoConfig: PassSpec("RSO", apply=apply_rso, merge=merge_rso, quantize="never",
                        bitsandbytes="RSO folds B·P into each weight every subproblem, which a quantized weight cannot "
                                     "hold; train RSO on full-precision weights, or adapters over quantized ones with "
                                     "method='lora' or 'paca' (QLoRA / QPaCA)"),
    LisaConfig: PassSpec("LISA", apply=apply_layerwise, merge=merge_layerwise, quantize="never",
                         bitsandbytes=_SAMPLED.format("LISA")),
    OwloreConfig: PassSpec("OwLore", apply=apply_layerwise, merge=merge_layerwise, quantize="never",
                           bitsandbytes=_SAMPLED.format("OwLore")),
    FullConfig: PassSpec("full", apply=apply_full, merge=_dequantized_then(_nothing_to_fold), quantize="trainable",
                         bitsandbytes=_FULL_QUANTIZED),
}

QUANTIZE = PassSpec("quantize", apply=apply_quantize, merge=dequantize_model)


def register_pass(config_type: type[MethodConfig], spec: PassSpec) -> None:
    """Register the pass of a method config type (and its name, for ``method="name"``)."""
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig) and config_type.method):
        raise TypeError(f"a pass is registered for a MethodConfig subclass with a method name, got {config_type!r}")
    PASSES[config_type] = spec
    METHOD_CONFIGS[config_type.method] = config_type


def get_pass(method: MethodConfig | type[MethodConfig] | str) -> PassSpec:
    """The pass of a method config (or its type, or its name)."""
    config_type = METHOD_CONFIGS.get(method) if isinstance(method, str) else (
        method if isinstance(method, type) else type(method))
    if config_type not in PASSES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(c.method for c in PASSES)}")
    return PASSES[config_type]


def after_step_bytes(model: nn.Module) -> tuple[int, str]:
    """The most any module's bookkeeping after an optimizer step holds beside the model (RSO's fold),
    and what it is: a module that has such work says so with ``after_step`` and ``after_step_bytes()``."""
    found = [(m.after_step_bytes(), m.after_step) for m in model.modules() if hasattr(m, "after_step_bytes")]
    return max(found, default=(0, ""))


def check_bitsandbytes(method: MethodConfig) -> None:
    """Refuse a method that cannot run on layers loaded quantized by bitsandbytes, saying why."""
    why = get_pass(method).bitsandbytes
    if why is not None:
        raise UnsupportedModelError(why)


def rewrite(model: nn.Module, graph: ModelGraph, method: MethodConfig, quant: QuantizeConfig | None,
            rewrites: RewriteLog) -> PassResult:
    """``method``'s pass on ``model`` in place (through ``rewrites``), composed with the quantize pass
    when ``quant`` is given, in the order the pass declares."""
    spec = get_pass(method)
    if quant is None:
        return spec.apply(model, graph, method, rewrites)
    if spec.quantize == "never":
        raise ValueError(spec.bitsandbytes or f"{spec.label} cannot be combined with quantize=")
    if spec.quantize == "trainable":  # the method chooses what trains; those weights are stored int8
        return apply_int8_trainable(model, graph, quant, rewrites, spec.apply(model, graph, method, rewrites))
    if spec.quantize == "after":
        # The method rewrites weights in place and trains dense blocks of some: it runs first, and the
        # weights it trains stay in full precision ("all-linear"), or are refused if named.
        result = spec.apply(model, graph, method, rewrites)
        keep = {d.name: f"{spec.label} trains a dense block of each (a quantized weight cannot be trained)"
                for d in result.decisions if d.trainable_params} if quant.target_modules == "all-linear" else {}
        return _combined(result, QUANTIZE.apply(model, graph, quant, rewrites, keep=keep))
    # The frozen base weights are quantized (the method freezes every parameter anyway), then the
    # method wraps each QuantLinear.
    rewrites.freeze(model.parameters())
    quantized = QUANTIZE.apply(model, graph, quant, rewrites)
    return _combined(spec.apply(model, graph, method, rewrites), quantized)


def _combined(result: PassResult, quantized: PassResult) -> PassResult:
    """The method's decisions, each quantized layer's marked ``method+format`` with its bytes."""
    by_name = {d.name: d for d in quantized.decisions}
    decisions = [_with_format(d, by_name.pop(d.name, None)) for d in result.decisions]
    return PassResult(result.module, tuple(decisions) + tuple(by_name.values()), result.notes + quantized.notes)


def _with_format(decision: ModuleDecision, quantized: ModuleDecision | None) -> ModuleDecision:
    if quantized is None:
        return decision
    q = quantized.details
    details = dataclasses.replace(decision.details, quantized_bytes=q["bytes"], dense_bytes=q["dense_bytes"],
                                  last_block=q.get("last_block"))
    return dataclasses.replace(decision, method=f"{decision.method}+{q['format']}", details=details)
