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

Adopted exactly, every 4-bit variant: NF4 or FP4 (``bnb_4bit_quant_type``), with or without double
quantization (``bnb_4bit_use_double_quant``): the packed codes are memopt's 4-bit layout with that
format's code table (``memopt.kernels.dequant.CODES``), the absmax either double-quantized (QLoRA's)
or fp32 per block. Any ``bnb_4bit_quant_storage`` dtype: the codes are read as the bytes they are.

8-bit (``load_in_8bit``, LLM.int8): the int8 codes ``CB`` [out, in] become memopt's int8 format over
the same bytes, with ``scale = SCB · (1/127)`` per row (a new fp32 vector of ``out`` elements), so
``W = CB · scale``: bitsandbytes' own dequantization (its CPU training path, ``MatMul8bitFp``), and
the outputs equal bitsandbytes' on CPU in training mode. bitsandbytes' CUDA path (``MatMul8bitLt``)
also quantizes the *activations* to int8 and takes outlier columns (``llm_int8_threshold``) in 16
bits; memopt does not, so on GPU its outputs are those of the dequantized weights — the plan's
notes say so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.errors import UnsupportedModelError
from memopt.kernels.dequant import CODES
from memopt.passes.base import RewriteLog
from memopt.passes.quant_format import QuantizedWeight
from memopt.passes.quantize import QuantLinear

__all__ = ["adopt_shadowed", "bitsandbytes_layers", "describe", "model_dtype", "shadow_for_capture"]


def _kind(module: nn.Module) -> str | None:
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return {"Linear4bit": "4bit", "LinearNF4": "4bit", "LinearFP4": "4bit", "Linear8bitLt": "8bit"}.get(cls.__name__)


def bitsandbytes_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes Linear layers of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if _kind(m) is not None}


def _quantized(name: str, layer: nn.Module, dtype: torch.dtype) -> tuple[QuantizedWeight, torch.dtype]:
    """The layer's bytes as a memopt ``QuantizedWeight`` (the same tensors), or a refusal.

    ``dtype``: the model's floating dtype, the compute dtype of an 8-bit layer (which has none)."""
    if _kind(layer) == "8bit":
        return _int8(name, layer, dtype)
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        raise UnsupportedModelError(f"{name}: a bitsandbytes 4-bit layer whose weight is not quantized yet "
                                    "(move the model to its device first, as transformers does when loading)")
    if getattr(state, "packing_format_for_cpu", False):
        raise UnsupportedModelError(
            f"{name}: bitsandbytes repacked this layer's weight for its CPU inference kernel (an eval-mode call "
            "without grad does that, in place), so its bytes are no longer NF4's layout; load the model again and "
            "pass it to memopt.optimize before running it in eval mode")
    fmt = state.quant_type
    if fmt not in CODES or not torch.equal(state.code.float().cpu(), torch.tensor(CODES[fmt])):
        raise UnsupportedModelError(f"{name} holds bitsandbytes 4-bit '{fmt}' with a code table memopt does not "
                                    f"know (it takes {sorted(CODES)} with bitsandbytes' own tables)")
    out_features, in_features = (int(s) for s in state.shape)
    compute = getattr(layer, "compute_dtype", None) or state.dtype
    data = layer.weight.data.view(torch.uint8).view(-1)  # the packed codes, whatever the storage dtype
    common = dict(block=int(state.blocksize))
    if state.nested:
        return QuantizedWeight(fmt, (out_features, in_features), compute, data, absmax_q=state.absmax,
                               absmax_scale=state.state2.absmax,
                               absmax_offset=torch.as_tensor(state.offset, dtype=torch.float32),
                               scaler_block=int(state.state2.blocksize), **common), compute
    return QuantizedWeight(fmt, (out_features, in_features), compute, data,
                           scale=state.absmax.float(), **common), compute


def _int8(name: str, layer: nn.Module, dtype: torch.dtype) -> tuple[QuantizedWeight, torch.dtype]:
    weight = layer.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if weight.dtype != torch.int8 or scb is None or weight.dim() != 2:
        raise UnsupportedModelError(
            f"{name}: a bitsandbytes 8-bit layer whose weight is not quantized to int8 yet (has_fp16_weights, or "
            "not moved to its device); load it with BitsAndBytesConfig(load_in_8bit=True) as transformers does")
    compute = layer.bias.dtype if layer.bias is not None else dtype
    scale = scb.float() * (1.0 / 127.0)  # bitsandbytes' arithmetic: SCB.mul(1.0 / 127.0)
    return QuantizedWeight("int8", tuple(int(s) for s in weight.shape), compute, weight.data, scale=scale), compute


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters outside bitsandbytes' layers (the default if none)."""
    for module in model.modules():
        if _kind(module) is None:
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    return p.dtype
    return torch.get_default_dtype()


def describe(adopted: "Adopted") -> str:
    """What the adopted layers held, e.g. "30 in NF4 (double quantization), 2 in int8 (LLM.int8)"."""
    counts: dict[str, int] = {}
    for layer, _ in adopted.values():
        if _kind(layer) == "8bit":
            label = "int8 (LLM.int8 codes; computed as W = CB·SCB/127, without int8 activations)"
        else:
            state = layer.weight.quant_state
            label = f"{state.quant_type.upper()} ({'double quantization' if state.nested else 'fp32 absmax'})"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} in {label}" for label, n in counts.items())


def _zero_weight(out_features: int, in_features: int, dtype: torch.dtype, device: Any) -> nn.Parameter:
    """A [out, in] weight that takes no memory (every element is one zero)."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(out_features, in_features),
                        requires_grad=False)


Adopted = dict[str, tuple[nn.Module, QuantizedWeight]]  # by name: the bitsandbytes layer and its bytes


def shadow_for_capture(model: nn.Module, log: RewriteLog) -> Adopted:
    """Replace each bitsandbytes layer by a memory-free ``nn.Linear`` of its shape (through ``log``);
    returns the originals with their bytes as memopt's, by name. Refuses (before any change) a layer
    memopt cannot adopt."""
    dtype = model_dtype(model)
    adopted = {name: (layer, _quantized(name, layer, dtype)) for name, layer in bitsandbytes_layers(model).items()}
    for name, (layer, (qw, compute)) in adopted.items():  # every refusal came first
        out_features, in_features = qw.shape
        shadow = nn.Linear(in_features, out_features, bias=False, device="meta")
        shadow.weight = _zero_weight(out_features, in_features, compute, layer.weight.device)
        shadow.bias = layer.bias
        log.replace(name, shadow)
    return {name: (layer, qw) for name, (layer, (qw, _)) in adopted.items()}


def adopt_shadowed(adopted: Adopted, log: RewriteLog) -> None:
    """Replace each shadow by a ``QuantLinear`` over the original layer's bytes (no copy)."""
    for name, (layer, qw) in adopted.items():
        log.replace(name, QuantLinear(qw, layer.bias, "linear", weight_requires_grad=False))
