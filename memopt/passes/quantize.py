"""Quantize: frozen Linear-like weights stored as NF4 (double-quantized, QLoRA) or int8.

A targeted ``nn.Linear`` / HF ``Conv1D`` becomes a ``QuantLinear`` whose weight exists only as
quantized buffers (``memopt.passes.quant_format``); the bias stays the original Parameter. The op
(``_QuantMatmul``) and why it is built this way:
* Forward dequantizes W inside the GEMM (the Triton kernel on CUDA: tile by tile, never a full W;
  the torch reference elsewhere: one transient W freed when the op returns) and saves NOTHING for
  backward: W is frozen, so grad_x = g·deq(W) needs neither x nor a full-precision W. Backward
  dequantizes again (recomputation) instead of keeping W alive between forward and backward.
* No gradient for W, ever: a quantized weight cannot be trained. Quantizing a weight that requires
  grad is refused; adapters (LoRA: ``LoraLinear(base_layer=QuantLinear)`` = QLoRA; PaCA:
  ``QPacaLinear``) train on top.
* Autocast: the GEMM runs in autocast's dtype, as ``F.linear`` would.

PaCA on a quantized base is ``memopt.passes.paca.QPacaLinear`` (it merges its base itself:
``merges_quantized_base``). ``dequantize_model`` / ``QuantLinear.dequantized()`` give plain layers
back (with the quantization error baked in: quantization is lossy; ``RewriteLog.undo`` restores the
original objects exactly).

How `optimize` composes it (``quantize=``, config ``memopt.config.QuantizeConfig``, re-exported
here): for LoRA / PaCA the quantize pass runs first on the frozen weights and the adapter wraps
each ``QuantLinear``; S²FT runs first (it permutes weights in place) and ``apply_quantize(...,
keep=...)`` leaves the weights it trains blocks of in full precision. Every method's registry
merge runs ``dequantize_model`` first (``memopt.passes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from memopt.config import QuantizeConfig
from memopt.ir.structure import LinearLayer, ModelGraph
from memopt.kernels.dequant import FOUR_BIT, pair_table
from memopt.passes.base import (
    ModuleDecision,
    ModuleDetails,
    PassResult,
    RewriteLog,
    WrappedLinear,
    as_output,
    details_kind,
    select_targets,
)
from memopt.passes.quant_format import QuantizedWeight, code8_table, quantize_int8, quantize_nf4

__all__ = ["QuantizeDetails", "QuantLinear", "QuantizeConfig", "apply_quantize", "dequantize_model", "quant_linear"]


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class QuantizeDetails(ModuleDetails):
    """A frozen weight stored quantized: its ``format`` and ``bytes`` (``dense_bytes`` as it was)."""

    kind: ClassVar[str] = "quantize"

    format: str
    bytes: int


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _QuantMatmul(torch.autograd.Function):
    """y = x·deq(W)ᵀ + b. Inputs 0 (x) and 1 (bias) may need grad; nothing is saved for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, qw: QuantizedWeight) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # [M, in]
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x2d, bias = x2d.to(dtype), None if bias is None else bias.to(dtype)
        y2d = qw.matmul(x2d, bias)  # [M, out]; the dequantized W (if any) dies here
        ctx.qw, ctx.x_shape = qw, x.shape
        return as_output(y2d, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [M, out]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.qw.matmul(g2d, transpose=False).view(ctx.x_shape)  # dequantized again, not kept
        if ctx.needs_input_grad[1]:
            grad_bias = g2d.sum(0)
        return grad_x, grad_bias, None


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized-Linear op: ``x·deq(W)ᵀ + bias``, any input rank, gradients to x and bias."""
    return _QuantMatmul.apply(x, bias, qw)


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized; ``weight`` dequantizes on access (a copy).

    Persistent buffers, so a state dict round-trips: NF4 ``qweight`` (packed uint8), ``absmax_q``
    (uint8), ``absmax_scale`` (fp32), ``absmax_offset`` (fp32 scalar); int8 ``qweight`` (int8
    [out, in]) and ``scale`` (fp32 [out]). A 4-bit layer also holds its format's lookup tables,
    ``code_pairs`` and (double quantization) ``code8``: non-persistent buffers, one tensor per
    device shared by every layer of the process (never write them), so a traced step reads them as
    the inputs they are — counted once by the plan and by the tracker — instead of making constants
    of its own at every call, which the step would hold and copy beyond the plan. A move re-shares
    them; so does a call that finds them elsewhere than the codes (a state dict loaded with
    ``assign=True`` into a meta model moves the codes alone). ``kind`` remembers the original
    layout ("conv1d": GPT-2's [in, out]) for ``dequantized()``; the buffers are always [out, in].
    Module casts (``model.half()``, ``model.to(torch.bfloat16)``) change ``compute_dtype`` and the
    bias but leave the codes and the fp32 scales exactly as they are (see ``_apply``).
    ``weight_requires_grad``: the flag the original weight had, given back by ``dequantized()``.
    """

    _FP32_BUFFERS = ("absmax_scale", "absmax_offset", "scale")

    def __init__(self, qw: QuantizedWeight, bias: nn.Parameter | None, kind: str = "linear",
                 weight_requires_grad: bool = False) -> None:
        super().__init__()
        self.fmt, self.kind, self.compute_dtype = qw.fmt, kind, qw.dtype
        self.out_features, self.in_features = qw.shape
        self.block_size, self.scaler_block_size = qw.block, qw.scaler_block
        self.weight_requires_grad = weight_requires_grad
        self.register_buffer("qweight", qw.data)
        if qw.double_quantized:
            self.register_buffer("absmax_q", qw.absmax_q)
            self.register_buffer("absmax_scale", qw.absmax_scale)
            self.register_buffer("absmax_offset", qw.absmax_offset)
        else:
            self.register_buffer("scale", qw.scale)
        self.bias = bias
        self._share_tables()

    def _share_tables(self) -> None:
        """(Re)point the table buffers at the shared tables of the device the codes are on."""
        if self.fmt not in FOUR_BIT:
            return
        device = self.qweight.device
        self.register_buffer("code_pairs", pair_table(self.fmt, device), persistent=False)
        if "absmax_q" in self._buffers:
            self.register_buffer("code8", code8_table(device), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        """Moves apply to every buffer; a dtype cast sets ``compute_dtype`` and spares the fp32 scales.

        ``nn.Module`` casts every floating buffer, which would round the scales to 16 bits and
        change every dequantized value; the integer codes are never cast. A cast is recognised by
        ``fn`` sending fp16 and bf16 to the same dtype (a pure move keeps each).
        """
        scales = {name: self._buffers[name] for name in self._FP32_BUFFERS if self._buffers.get(name) is not None}
        device = next(iter(scales.values())).device
        cast = {fn(torch.empty(0, dtype=dt, device=device)).dtype for dt in (torch.float16, torch.bfloat16)}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            self._buffers[name] = before.to(self._buffers[name].device)  # fp32, bit for bit
        self._share_tables()  # (a move gave every layer copies of its own; a cast rounded them)
        if len(cast) == 1:
            self.compute_dtype = cast.pop()
        return self

    @classmethod
    def from_layer(cls, layer: nn.Module, kind: str, cfg: QuantizeConfig,
                   weight_requires_grad: bool = False) -> "QuantLinear":
        weight = layer.weight.detach()
        weight = weight.t() if kind == "conv1d" else weight  # [out, in]
        qw = quantize_nf4(weight, cfg.block_size, cfg.scaler_block_size) if cfg.format == "nf4" else quantize_int8(weight)
        return cls(qw, getattr(layer, "bias", None), kind, weight_requires_grad)

    def quantized(self) -> QuantizedWeight:
        """A view of the buffers as a ``QuantizedWeight`` (no copy)."""
        tables = self._buffers.get("code_pairs")
        if tables is not None and tables.device != self.qweight.device:
            self._share_tables()
        common = dict(fmt=self.fmt, shape=(self.out_features, self.in_features), dtype=self.compute_dtype,
                      data=self.qweight, block=self.block_size, scaler_block=self.scaler_block_size,
                      pairs=self._buffers.get("code_pairs"), code8=self._buffers.get("code8"))
        if "absmax_q" in self._buffers:
            return QuantizedWeight(**common, absmax_q=self.absmax_q, absmax_scale=self.absmax_scale,
                                   absmax_offset=self.absmax_offset)
        return QuantizedWeight(**common, scale=self.scale)

    @property
    def weight(self) -> torch.Tensor:
        """deq(W) [out, in], a NEW full-precision tensor each access (for inspection, init, merging)."""
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized(), self.bias)

    def dequantized(self) -> nn.Module:
        """A plain frozen layer holding deq(W) and the same bias: ``nn.Linear``, or HF ``Conv1D`` ([in, out]) for one."""
        w = self.weight  # [out, in]
        if self.kind == "conv1d":
            from transformers.pytorch_utils import Conv1D  # only GPT-2-style models have kind "conv1d"

            layer: nn.Module = Conv1D(self.out_features, self.in_features)
            w = w.t().contiguous()  # Conv1D keeps [in, out]
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        layer.weight = nn.Parameter(w, requires_grad=self.weight_requires_grad)
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, kind={self.kind}"


def apply_quantize(model: nn.Module, graph: ModelGraph, cfg: QuantizeConfig, log: RewriteLog, *,
                   keep: Mapping[str, str] | None = None) -> PassResult:
    """Replace each targeted frozen Linear-like layer (or a wrapper's frozen ``base_layer``) with a ``QuantLinear``.

    ``keep`` maps layers a method trains part of (S²FT blocks) to why: they stay in full precision
    and the notes say so. A width that is not a multiple of ``block_size`` needs no padding (NF4
    blocks run across rows; only the last flat block may be shorter, with its own absmax).
    Requires: ``graph`` was captured from ``model``; every target's weight is frozen (an adapter
    pass or the caller froze it), not shared with another module, and not partly trained by a wrapper.
    Ensures: targets hold only quantized buffers + the original bias; ``log.undo()`` puts the
    original layers back; one decision per quantized layer, with its quantized and dense bytes.
    """
    keep = dict(keep or {})
    targets = [t for t in select_targets(graph, model, cfg.target_modules, cfg.exclude_modules) if t.name not in keep]
    _check_targets(model, targets)  # before any change, so a bad call leaves the model as it was
    original = log.original_requires_grad()
    decisions = []
    for layer in targets:
        path = _weight_owner(model, layer.name)
        base = model.get_submodule(path)
        qlayer = QuantLinear.from_layer(base, layer.kind, cfg, original.get(id(base.weight), False))
        log.replace(path, qlayer)
        decisions.append(_decision(layer, cfg, qlayer, base.weight))
    return PassResult(model, tuple(decisions), _notes(cfg, decisions, keep))


def _weight_owner(model: nn.Module, name: str) -> str:
    """The dotted path of the module holding the weight of layer ``name`` (a wrapper's ``base_layer``)."""
    module = model.get_submodule(name)
    return f"{name}.base_layer" if isinstance(getattr(module, "base_layer", None), nn.Module) else name


def _decision(layer: LinearLayer, cfg: QuantizeConfig, qlayer: QuantLinear, weight: torch.Tensor) -> ModuleDecision:
    n = layer.in_features * layer.out_features
    tail = n % cfg.block_size if cfg.format == "nf4" else 0  # NF4's flat tail block: its own absmax, no padding
    details = QuantizeDetails(format=cfg.format, bytes=qlayer.quantized().nbytes, dense_bytes=n * weight.element_size(),
                              block=layer.block, last_block=tail or None)
    return ModuleDecision(
        name=layer.name, role=layer.role.value, method=f"quantize-{cfg.format}",
        in_features=layer.in_features, out_features=layer.out_features, trainable_params=0, details=details,
        reason="all-linear" if cfg.target_modules == "all-linear" else f"matched target_modules={cfg.target_modules!r}",
    )


def _notes(cfg: QuantizeConfig, decisions: list[ModuleDecision], keep: Mapping[str, str]) -> tuple[str, ...]:
    quantized = sum(d.details["bytes"] for d in decisions)
    dense = sum(d.details["dense_bytes"] for d in decisions)
    what = (f"NF4 with double quantization (block {cfg.block_size}, absmax in 8 bits per {cfg.scaler_block_size})"
            if cfg.format == "nf4" else "int8 (per-row absmax)")
    notes = [f"quantize: {len(decisions)} frozen Linear-like weights stored as {what}: {quantized:,} bytes "
             f"instead of {dense:,} ({quantized / max(dense, 1):.3f}x); forward and backward dequantize them"]
    if keep:
        reasons = sorted(set(keep.values()))
        notes.append(f"quantize: {len(keep)} weights stay in full precision: " + "; ".join(reasons))
    return tuple(notes)


def _check_targets(model: nn.Module, targets: list[LinearLayer]) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for layer in targets:
        module, owner = model.get_submodule(layer.name), _weight_owner(model, layer.name)
        wrapper = owner != layer.name
        trained = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad] if wrapper else []
        if trained:  # a wrapper (S²FT) that trains part of this weight in place
            raise ValueError(
                f"cannot quantize {layer.name}: {type(module).__name__} trains part of its weight "
                f"({', '.join(trained)}), and a quantized weight cannot be trained; add {layer.name!r} to exclude_modules")
        weight = model.get_submodule(owner).weight
        if weight.requires_grad:
            raise ValueError(
                f"cannot quantize {layer.name}: its weight requires grad (a trainable full-rank layer), and a "
                f"quantized weight cannot be trained; freeze it (weight.requires_grad_(False)) and train an adapter "
                f"on top (LoRA / PaCA), or add {layer.name!r} to exclude_modules")
        if len(owners.get(id(weight), ())) > 1:
            others = [n for n in owners[id(weight)] if n != owner + ".weight"]
            raise ValueError(f"cannot quantize {layer.name}: its weight is shared with {others} (tied); add "
                             f"{layer.name!r} to exclude_modules or untie the weights")
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"cannot quantize {layer.name}: weight dtype {weight.dtype} is not fp32/fp16/bf16")


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantLinear`` (and trainable int8 layer) in ``model`` with a plain ``nn.Linear``,
    in place; a wrapper that merges its quantized base itself (``merges_quantized_base``: QPaCA) is
    replaced by its merge.

    A ``LoraLinear`` over a ``QuantLinear`` keeps its adapter (its base becomes plain): merge LoRA after.
    """
    names = [name for name, m in model.named_modules()
             if isinstance(m, QuantLinear) or _merges_base(m) or getattr(m, "trains_quantized_weight", False)]
    done: list[str] = []
    for name in names:  # pre-order: a QPacaLinear is merged (with its base) before its base comes up
        if any(name.startswith(prefix + ".") for prefix in done):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, attr)
        setattr(parent, attr, module.merged() if _merges_base(module) else module.dequantized())
        done.append(name)
    return model


def _merges_base(module: nn.Module) -> bool:
    return isinstance(module, WrappedLinear) and getattr(module, "merges_quantized_base", False)
