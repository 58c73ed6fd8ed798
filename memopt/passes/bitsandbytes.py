"""Models loaded already quantized by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``).

How QLoRA users load a 70B model: transformers replaces every Linear by ``bitsandbytes.nn.Linear4bit``
holding packed NF4 codes, so there is never a full-precision copy. memopt's NF4 format *is*
bitsandbytes' (same code tables, packing, block sizes and double quantization; see
``memopt.passes.quant_format``), so each such layer becomes a ``QuantLinear`` over the very same
byte tensors — nothing is dequantized or copied — and the methods compose with it as with
memopt's own quantization (LoRA → QLoRA, PaCA → QPaCA).

Capture needs Linear layers it can trace (bitsandbytes' ops do not export): during capture each
``Linear4bit`` is shadowed by a plain ``nn.Linear`` whose weight is a stride-0 view of one zero
(no memory), which is enough to find the model's structure from dataflow; then the shadow is
replaced by the ``QuantLinear``. Everything goes through the ``RewriteLog``, so a failure restores
the bitsandbytes layers.

Adopted exactly: NF4 with double quantization (``bnb_4bit_quant_type="nf4"``,
``bnb_4bit_use_double_quant=True``: QLoRA's setting). FP4, NF4 without double quantization and
8-bit (``load_in_8bit``) layers are refused with the way out (their formats are not memopt's; a
conversion would change the numbers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.errors import UnsupportedModelError
from memopt.passes.base import RewriteLog
from memopt.passes.quant_format import QuantizedWeight
from memopt.passes.quantize import QuantLinear

__all__ = ["bitsandbytes_layers", "shadow_for_capture", "adopt_shadowed"]


def _kind(module: nn.Module) -> str | None:
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return {"Linear4bit": "4bit", "LinearNF4": "4bit", "LinearFP4": "4bit", "Linear8bitLt": "8bit"}.get(cls.__name__)


def bitsandbytes_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes Linear layers of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if _kind(m) is not None}


def _quantized(name: str, layer: nn.Module) -> tuple[QuantizedWeight, torch.dtype]:
    """The layer's bytes as a memopt ``QuantizedWeight`` (the same tensors), or a refusal."""
    if _kind(layer) == "8bit":
        raise UnsupportedModelError(
            f"{name} was loaded in 8-bit by bitsandbytes (LLM.int8 with outliers), which memopt does not take as it "
            "is; load the model in 4-bit (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
            "bnb_4bit_use_double_quant=True)) or in full precision and pass quantize='int8' to memopt.optimize")
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        raise UnsupportedModelError(f"{name}: a bitsandbytes 4-bit layer whose weight is not quantized yet "
                                    "(move the model to its device first, as transformers does when loading)")
    if getattr(state, "packing_format_for_cpu", False):
        raise UnsupportedModelError(
            f"{name}: bitsandbytes repacked this layer's weight for its CPU inference kernel (an eval-mode call "
            "without grad does that, in place), so its bytes are no longer NF4's layout; load the model again and "
            "pass it to memopt.optimize before running it in eval mode")
    if state.quant_type != "nf4" or not state.nested:
        raise UnsupportedModelError(
            f"{name} holds bitsandbytes {state.quant_type}{'' if state.nested else ' without double quantization'}; "
            "memopt's 4-bit format is NF4 with double quantization (QLoRA's): load with "
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True), or "
            "load in full precision and pass quantize='nf4'")
    out_features, in_features = (int(s) for s in state.shape)
    compute = getattr(layer, "compute_dtype", None) or state.dtype
    qw = QuantizedWeight("nf4", (out_features, in_features), compute, layer.weight.data.view(-1),
                         absmax_q=state.absmax, absmax_scale=state.state2.absmax,
                         absmax_offset=torch.as_tensor(state.offset, dtype=torch.float32),
                         block=int(state.blocksize), scaler_block=int(state.state2.blocksize))
    return qw, compute


def _zero_weight(out_features: int, in_features: int, dtype: torch.dtype, device: Any) -> nn.Parameter:
    """A [out, in] weight that takes no memory (every element is one zero)."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(out_features, in_features),
                        requires_grad=False)


def shadow_for_capture(model: nn.Module, log: RewriteLog) -> dict[str, nn.Module]:
    """Replace each bitsandbytes layer by a memory-free ``nn.Linear`` of its shape (through ``log``);
    returns the originals by name. Refuses (before any change) a layer memopt cannot adopt."""
    layers = bitsandbytes_layers(model)
    adopted = {name: _quantized(name, layer) for name, layer in layers.items()}  # every refusal first
    for name, layer in layers.items():
        qw, compute = adopted[name]
        out_features, in_features = qw.shape
        shadow = nn.Linear(in_features, out_features, bias=False, device="meta")
        shadow.weight = _zero_weight(out_features, in_features, compute, layer.weight.device)
        shadow.bias = layer.bias
        log.replace(name, shadow)
    return layers


def adopt_shadowed(model: nn.Module, layers: dict[str, nn.Module], log: RewriteLog) -> None:
    """Replace each shadow by a ``QuantLinear`` over the original layer's bytes (no copy)."""
    for name, layer in layers.items():
        qw, _ = _quantized(name, layer)
        log.replace(name, QuantLinear(qw, layer.bias, "linear", weight_requires_grad=False))
