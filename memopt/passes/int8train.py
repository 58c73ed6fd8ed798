"""Trainable int8 weights (``method="full", quantize="int8"``, as Q-GaLore trains them).

Each targeted Linear becomes an ``Int8TrainLinear``: its weight is stored as int8 codes ``qweight``
[out, in] with one fp32 scale per group of ``GROUP`` inputs of a row (``qscales`` [out, in / GROUP];
a row whose width is not a multiple of ``GROUP`` is one group), W = qweight · scale. The forward and
the backward dequantize W for their matmul (a transient, never kept); the gradient is taken against
that dequantized W, so it is the gradient of the dense layer with weights W.

The trainable ``weight`` is a handle: a Parameter of W's shape and compute dtype that holds no
memory of its own (a zero-stride view of one element) and that the layer's op gives W's gradient.
Everything that asks "which parameters train, how large, what gradient" — the plan, the optimizer,
the trainable count, updates inside backward — sees a dense [out, in] parameter; only the update
is different. memopt's optimizers (``memopt.optim``; ``model.make_optimizer``) recognise the
handle (``int8_master``): they update an fp32 copy of W, dequantized for the update, and write it
back with **stochastic rounding** (``requantize``): per group, scale = absmax / 127 and
q = floor(w / scale + u), u ~ U[0, 1) — unbiased, E[q · scale] = w, so updates far below one
quantization step still move the weight on average (round-to-nearest would drop them). The
rounding noise is drawn from a generator seeded by the optimizer (the parameter's index and step),
so a resumed run rounds alike. A torch optimizer cannot write into the handle: train with
``model.make_optimizer``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from memopt.config import QuantizeConfig
from memopt.ir.structure import ModelGraph, Role
from memopt.passes.base import ModuleDetails, PassResult, RewriteLog, as_output, details_kind
from memopt.passes.quantize import _autocast_dtype

__all__ = ["GROUP", "Int8TrainDetails", "Int8TrainLinear", "apply_int8_trainable", "int8_master", "is_handle",
           "requantize"]

GROUP = 256  # inputs per fp32 scale (Q-GaLore's group size)
_ROWS_AT_ONCE = 1 << 20  # elements requantized at once: bounds the fp32 temporaries of the rounding

_MASTERS: dict[int, "weakref.ReferenceType[Int8TrainLinear]"] = {}  # id(handle) -> its layer


@details_kind
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Int8TrainDetails(ModuleDetails):
    """A trainable weight stored int8: ``bytes`` of codes and scales (``dense_bytes`` as it was), ``group``."""

    kind: ClassVar[str] = "int8-train"

    bytes: int
    group: int


def group_size(in_features: int) -> int:
    return GROUP if in_features % GROUP == 0 else in_features


def is_handle(p: torch.Tensor) -> bool:
    """Is ``p`` the memory-free handle of a trainable int8 weight (a 2-D tensor of zero strides)?"""
    return p.dim() == 2 and p.numel() > 1 and p.stride() == (0, 0)


def int8_master(p: torch.Tensor) -> "Int8TrainLinear | None":
    """The layer whose int8 weight the handle ``p`` stands for (None: not a handle of a live layer)."""
    ref = _MASTERS.get(id(p))
    layer = None if ref is None else ref()
    return layer if layer is not None and layer.weight is p else None


def dequantize(qweight: torch.Tensor, qscales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in ``dtype``: each group's codes times its fp32 scale (the product in fp32)."""
    out, n = qweight.shape
    groups = qscales.shape[1]
    w = qweight.view(out, groups, n // groups).float() * qscales[:, :, None]
    return w.view(out, n).to(dtype)


def requantize(w: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scales) of ``w`` [out, in] by stochastic rounding (module docstring), a block of
    rows at a time."""
    out, n = w.shape
    group = group_size(n)
    codes = torch.empty((out, n), dtype=torch.int8, device=w.device)
    scales = torch.empty((out, n // group), dtype=torch.float32, device=w.device)
    rows = max(1, _ROWS_AT_ONCE // n)
    for r in range(0, out, rows):
        part = w[r: r + rows].float().view(-1, n // group, group)
        scale = part.abs().amax(-1).clamp_min(1e-30) / 127
        noise = torch.rand(part.shape, generator=generator, dtype=torch.float32, device=w.device)
        codes[r: r + rows] = (part / scale[..., None]).add_(noise).floor_().clamp_(-127, 127).view(-1, n).to(torch.int8)
        scales[r: r + rows] = scale
    return codes, scales


class _Int8TrainMatmul(torch.autograd.Function):
    """y = x·Wᵀ + b with W = deq(qweight, qscales); gradients to x, the handle (W's) and b. Saves x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, handle: torch.Tensor, qweight: torch.Tensor, qscales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        dtype = _autocast_dtype(x) or handle.dtype
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        w = dequantize(qweight, qscales, dtype)
        y2d = torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(dtype))
        del w
        ctx.save_for_backward(x2d, qweight, qscales)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return as_output(y2d, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, qweight, qscales = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(x2d.dtype)  # [M, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize(qweight, qscales, x2d.dtype)
            grad_x = (g2d @ w).view(ctx.x_shape).to(ctx.x_dtype)
            del w
        if ctx.needs_input_grad[1]:
            grad_w = g2d.t() @ x2d  # [out, in], against the dequantized W
        if ctx.needs_input_grad[4]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, None, None, grad_b


class Int8TrainLinear(nn.Module):
    """A Linear whose trainable weight is stored int8 (see the module docstring). ``weight`` is the
    handle (no memory; its values are not W's: ``dequantized_weight()`` gives W); ``qweight`` and
    ``qscales`` are the stored weight, in the state dict; ``bias`` stays as it was."""

    trains_quantized_weight = True  # dequantize_model / checkpoints find it by this

    def __init__(self, qweight: torch.Tensor, qscales: torch.Tensor, bias: nn.Parameter | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("qscales", qscales)
        self.bias = bias
        self._new_handle(compute_dtype, qweight.device)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "Int8TrainLinear":
        device = layer.weight.device  # a meta model (a dry run) has shapes only: no generator to seed
        generator = None if device.type == "meta" else torch.Generator(device).manual_seed(0)
        qweight, qscales = requantize(layer.weight.detach().float(), generator)
        return cls(qweight, qscales, layer.bias, layer.weight.dtype)

    def _new_handle(self, dtype: torch.dtype, device: torch.device) -> None:
        requires_grad = self._parameters["weight"].requires_grad if "weight" in self._parameters else True
        handle = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(self.out_features, self.in_features),
                              requires_grad=requires_grad)
        self.weight = handle
        _MASTERS[id(handle)] = weakref.ref(self)

    def _apply(self, fn: Any, recurse: bool = True) -> "Int8TrainLinear":
        """Moves and casts apply to the codes' device and the handle's dtype; the fp32 scales stay fp32
        and the handle stays memory-free (a cast would otherwise materialize it)."""
        handle = self._parameters.pop("weight")
        scales = self._buffers["qscales"]
        super()._apply(fn, recurse)
        self._buffers["qscales"] = scales.to(self.qweight.device)
        probe = fn(torch.empty(0, dtype=handle.dtype, device=handle.device))
        self._parameters["weight"] = handle  # for _new_handle's requires_grad
        _MASTERS.pop(id(handle), None)
        self._new_handle(probe.dtype if probe.is_floating_point() else handle.dtype, self.qweight.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the handle holds nothing to save

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in], a new tensor (in the compute dtype unless ``dtype``)."""
        return dequantize(self.qweight, self.qscales, dtype or self.weight.dtype)

    def write_(self, w: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store ``w`` [out, in] (stochastically rounded, fresh scales)."""
        codes, scales = requantize(w, generator)
        self.qweight.copy_(codes)
        self.qscales.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8TrainMatmul.apply(x, self.weight, self.qweight, self.qscales, self.bias)

    def dequantized(self) -> nn.Linear:
        """A plain trainable ``nn.Linear`` holding W and the same bias."""
        w = self.dequantized_weight()
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                          dtype=w.dtype)
        layer.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        group = group_size(self.in_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group={group}"


def apply_int8_trainable(model: nn.Module, graph: ModelGraph, cfg: QuantizeConfig, log: RewriteLog,
                         trained: PassResult) -> PassResult:
    """Store each trained Linear layer's weight int8 (``Int8TrainLinear``), after full training chose
    what trains. Not so: the LM head under "all-linear", a weight tied to another module's, a layer of
    another layout (GPT-2's Conv1D), a layer that does not train — each with why."""
    if cfg.format != "int8":
        raise ValueError(f"trainable quantized weights are int8 (quantize='int8'); {cfg.format} codes cannot take "
                         "an update: use quantize='int8' with method='full', or train adapters over "
                         f"{cfg.format} weights with method='lora' (QLoRA)")
    shared = _shared_weights(model)
    by_name = {d.name: d for d in trained.decisions}
    decisions, kept = [], []
    for layer in graph.linears:
        module = model.get_submodule(layer.name)
        why = ("the LM head: 'all-linear' leaves it in full precision" if layer.role is Role.LM_HEAD
               and cfg.target_modules == "all-linear" else
               "not an nn.Linear" if type(module) is not nn.Linear else
               "its weight is tied to another module's" if id(module.weight) in shared else
               "its weight does not train" if not module.weight.requires_grad else None)
        decision = by_name.get(layer.name)
        if why is not None:
            kept.append(f"{layer.name} ({why})")
            continue
        dense = module.weight.numel() * module.weight.element_size()
        new = Int8TrainLinear.from_linear(module)
        log.replace(layer.name, new)
        stored = new.qweight.numel() + new.qscales.numel() * 4
        details = Int8TrainDetails(block=layer.block, bytes=stored, dense_bytes=dense, group=group_size(layer.in_features))
        decisions.append(dataclasses.replace(decision, method="full+int8", details=details,
                                             reason=f"{decision.reason}; stored int8, updated by stochastic rounding"))
    names = {d.name for d in decisions}
    stored, dense = sum(d.details["bytes"] for d in decisions), sum(d.details["dense_bytes"] for d in decisions)
    notes = [f"trainable int8 weights: {len(decisions)} Linear layers store W as int8 with an fp32 scale per "
             f"group of {GROUP} inputs (a narrower row: one group), {stored:,} bytes instead of {dense:,}; "
             "gradients are taken against the dequantized W "
             "and memopt's optimizers (model.make_optimizer) write each update back by stochastic rounding"]
    if kept:
        more = f" and {len(kept) - 6} more" if len(kept) > 6 else ""
        notes.append("kept in full precision: " + ", ".join(kept[:6]) + more)
    return PassResult(model, tuple(d for d in trained.decisions if d.name not in names) + tuple(decisions),
                      trained.notes + tuple(notes))


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one module name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}
