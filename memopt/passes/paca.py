"""PaCA (partial connection adaptation): ``rank`` input columns of each targeted W are trained.

Parameterization. Per targeted Linear-like layer with weight W (logically [out, in]), ``idx`` holds
``rank`` sorted input columns — random from a per-module seed (``PacaConfig.seed`` mixed with the
module name, so adding targets never reshuffles other modules) or the columns of largest L2 norm
(``selection="weight-norm"``). The trainable P [out, rank] is an ordinary ``nn.Parameter`` that
starts at ``W[:, idx] / scaling`` (``scaling = alpha / rank``), so the function is unchanged (to
the rounding of ``(w / s)·s``, exact when s is a power of two). ``idx`` and ``orig`` (the original
``W[:, idx]``, [out, rank]) are persistent buffers: a state dict round-trips, and ``enabled=False``
gives back the original layer's function even after training.

The op (``_PacaMatmul``), and why it is built this way:
* Forward writes ``scaling·P`` into W's columns ``idx`` (an out×rank copy, under no_grad) and then
  runs ONE matmul with W. Writing in place costs nothing beside W; the alternative, an overlaid
  copy of W per call, costs a W-sized temporary in forward and again in backward. The write runs on
  *every* call — there is no "already written" flag or forward counter — so W equals what the
  current P implies under gradient accumulation, non-reentrant checkpoint recomputation, and a
  disabled call in between (which writes ``orig``).
* Backward saves only ``x[..., idx]``, a gathered copy (``index_select``), never a view: the full
  input x is freed after forward unless something else holds it. It writes the forward's columns
  into W again before ``grad_x = g·W_eff`` (cheap, and correct even if W was touched since, e.g. by
  a disabled call or a re-gathered FSDP shard), computes ``grad_P = scaling·g_flatᵀ·x_idx_flat``
  (chain rule through W[:, idx] = scaling·P) and never a gradient for W. ``grad_x`` is skipped when
  the input needs none (the first layer above frozen embeddings), see ``memopt.passes.freeze``.
* Traced into a graph (memopt's joint trace and runtime lowering run AOTAutograd, whose graphs
  may not write into their inputs between forward and backward), the op computes the same
  function without writing W: ``x·Wᵀ + b + x[..., idx]·deltaᵀ`` with ``delta = scaling·P −
  W[:, idx]`` (out×rank), and ``grad_x = g·W`` plus ``g·delta`` added into the columns ``idx`` —
  the same saved tensors, equal to the eager op up to rounding.
* P is saved for backward, so autograd's version check raises if P is changed in place between a
  forward and its backward (an optimizer step in the middle of accumulation).
* Bias: frozen by default, like every original parameter. If a user unfreezes it, its gradient is
  the sum of g over every leading dimension (any input rank), computed only when needed.
* Any input rank (1-D to N-D): the op flattens the leading dims and restores them.
* Autocast: the GEMM runs in autocast's dtype, as ``F.linear`` would, and so does the saved copy;
  backward casts W to the gradient's dtype (autocast is off there) and autograd casts the
  gradients back to the dtypes of x, bias and P.

The forward GEMM goes through ``memopt.kernels.paca.paca_forward`` (a fused Triton kernel that
also writes the gathered copy on CUDA, the torch reference elsewhere). A weight shared by several
modules (tied embeddings) cannot be targeted: writing P into it would change the other users.
``merge`` writes ``scaling·P`` into W for good and returns the plain layer.

A target that is a ``QuantLinear`` (the quantize pass ran first) becomes a ``QPacaLinear`` (QPaCA):
the same parameterization, with P overlaid on the dequantized W instead of written into it, so the
quantized bytes never change; its merge is ``memopt.passes.quantize.dequantize_model``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from memopt.config import PacaConfig
from memopt.ir.structure import LinearLayer, ModelGraph
from memopt.kernels.paca import paca_forward
from memopt.passes.base import (
    ModuleDecision,
    ModuleDetails,
    PassResult,
    RewriteLog,
    WrappedLinear,
    as_output,
    details_kind,
    merge_wrapped,
    select_targets,
)
from memopt.passes.lora import frozen_rest
from memopt.passes.quant_format import QuantizedWeight, dequantize_columns
from memopt.passes.quantize import QuantLinear, _autocast_dtype

__all__ = ["PacaDetails", "PacaLinear", "apply_paca", "merge_paca", "module_seed", "paca_linear",
            "random_columns", "select_columns"]


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class PacaDetails(ModuleDetails):
    """A PaCA layer: ``rank`` of W's input columns train, chosen by ``selection`` (``seed``: a random draw's)."""

    kind: ClassVar[str] = "paca"

    rank: int
    selection: str
    scaling: float
    seed: int | None = None

_SEED_MASK = 2**63 - 1  # torch.Generator seeds are 64-bit; stay non-negative


def _overlay(weight: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor, scaling: float, kind: str) -> None:
    """W[:, idx] = scaling·cols in place, in ``weight``'s own layout; cols is [out, r]."""
    with torch.no_grad():
        src = (cols * scaling if scaling != 1.0 else cols).to(weight.dtype)
        if kind == "linear":
            weight.index_copy_(1, idx, src)  # weight [out, in]
        else:
            weight.index_copy_(0, idx, src.t())  # Conv1D weight [in, out]


def _weight_matmul(g2d: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """g·W_log: [M, out] -> [M, in]."""
    return g2d.mm(weight) if kind == "linear" else g2d.mm(weight.t())


def _autocast(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GEMM operands in autocast's dtype when autocast is on for x's device (as F.linear would)."""
    device = x2d.device.type
    if not torch.is_autocast_enabled(device):
        return x2d, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x2d.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _traced(weight: torch.Tensor) -> bool:
    """Is the op being traced into a graph (AOTAutograd's functional tensors: memopt's joint trace
    and the runtime lowering)? A graph may not write into its inputs between forward and backward."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(weight, FunctionalTensor)


def _delta(weight: torch.Tensor, cols: torch.Tensor, idx: torch.Tensor, scaling: float, kind: str) -> torch.Tensor:
    """scaling·cols − W_log[:, idx]: what the columns ``idx`` add to W ([out, r])."""
    current = weight.index_select(1, idx) if kind == "linear" else weight.index_select(0, idx).t()
    return cols.to(weight.dtype) * scaling - current


def _overlaid_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor,
                      idx: torch.Tensor, scaling: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function without writing W (traced graphs): x·Wᵀ + b + x[:, idx]·deltaᵀ."""
    x_idx = x2d.index_select(1, idx)
    w_log = weight if kind == "linear" else weight.t()
    y2d = torch.nn.functional.linear(x2d, w_log, bias) + x_idx.mm(_delta(weight, cols, idx, scaling, kind).t())
    return y2d, x_idx


class _PacaMatmul(torch.autograd.Function):
    """y = x·W_effᵀ + b with W_eff = W, columns idx = scaling·cols. Inputs 0, 2, 3 may need grad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor,
                idx: torch.Tensor, scaling: float, kind: str) -> torch.Tensor:
        ctx.traced = _traced(weight)
        if not ctx.traced:
            _overlay(weight, idx, cols, scaling, kind)
        x2d, w, b = _autocast(x.reshape(-1, x.shape[-1]), weight, bias)  # x2d [M, in]
        if ctx.traced:
            y2d, x_idx = _overlaid_forward(x2d, w, b, cols, idx, scaling, kind)
        else:
            y2d, x_idx = paca_forward(x2d, w, b, idx, kind, gather=ctx.needs_input_grad[3])
        ctx.save_for_backward(x_idx, cols)  # x_idx [M, r] is a copy, never a view of x
        ctx.weight, ctx.idx, ctx.scaling, ctx.kind, ctx.x_shape = weight, idx, scaling, kind, x.shape
        return as_output(y2d, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_idx, cols = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [M, out]
        grad_x = grad_bias = grad_cols = None
        if ctx.needs_input_grad[0] and ctx.traced:
            weight = ctx.weight.to(g2d.dtype)
            delta = _delta(weight, cols, ctx.idx, ctx.scaling, ctx.kind)  # [out, r]
            grad_x = _weight_matmul(g2d, weight, ctx.kind).index_add(1, ctx.idx, g2d.mm(delta)).view(ctx.x_shape)
        elif ctx.needs_input_grad[0]:
            _overlay(ctx.weight, ctx.idx, cols, ctx.scaling, ctx.kind)  # the weights this forward used
            weight = ctx.weight.to(g2d.dtype)  # a copy only under autocast, as autocast's forward made
            grad_x = _weight_matmul(g2d, weight, ctx.kind).view(ctx.x_shape)  # autograd casts it to x's dtype
        if ctx.needs_input_grad[2]:
            grad_bias = g2d.sum(0)
        if ctx.needs_input_grad[3]:
            # (x_idxᵀ·g)ᵀ, not gᵀ·x_idx: the same product, 4-7x faster on CPU BLAS for r << out.
            grad_cols = x_idx.t().mm(g2d).t().mul_(ctx.scaling)  # [out, r]
        return grad_x, None, grad_bias, grad_cols, None, None, None


def paca_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor,
                idx: torch.Tensor, scaling: float, kind: str = "linear") -> torch.Tensor:
    """The PaCA op: ``x·W_effᵀ + b`` where W_eff is W with columns ``idx`` set to ``scaling·cols``.

    Writes those columns into ``weight`` (in place). Gradients flow to ``x``, ``bias`` and ``cols``
    (whichever require grad), never to ``weight``, which must not require grad.
    """
    if weight.requires_grad:
        raise ValueError("PaCA keeps the base weight frozen and trains P instead; the weight passed to "
                         "paca_linear requires grad: call weight.requires_grad_(False), or merge() for full fine-tuning")
    return _PacaMatmul.apply(x, weight, bias, cols, idx, scaling, kind)


def select_columns(weight: torch.Tensor, kind: str, rank: int, selection: str, seed: int) -> torch.Tensor:
    """``rank`` sorted input-column indices of W (int64, on W's device)."""
    in_features = weight.shape[1] if kind == "linear" else weight.shape[0]
    if selection == "random":
        return random_columns(in_features, rank, seed).to(weight.device)
    # "weight-norm": the columns of largest L2 norm, accumulated in fp32
    norms = torch.linalg.vector_norm(weight, dim=0 if kind == "linear" else 1, dtype=torch.float32)
    return norms.topk(rank).indices.sort().values.to(weight.device)


def random_columns(in_features: int, rank: int, seed: int) -> torch.Tensor:
    """``rank`` sorted random input columns of ``in_features`` (int64, CPU), a function of the seed only."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(in_features, generator=gen)[:rank].sort().values


def _columns(weight: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    """W_log[:, idx] as a new [out, r] tensor."""
    if kind == "linear":
        return weight.detach().index_select(1, idx)
    return weight.detach().index_select(0, idx).t().contiguous()


class PacaLinear(WrappedLinear):
    """A frozen Linear-like ``base_layer`` whose input columns ``paca_idx`` are ``scaling·paca_P``."""

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int,
                 idx: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self._wrap(base_layer)
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scaling = idx.numel(), scaling
        orig = _columns(base_layer.weight, idx, kind)  # [out, r]
        self.register_buffer("paca_idx", idx)
        self.register_buffer("paca_orig", orig)
        self.paca_P = nn.Parameter(orig / scaling)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        if weight.requires_grad:
            raise ValueError(f"{type(self).__name__}: base_layer.weight requires grad, but PaCA trains P and keeps W "
                             "frozen; call base_layer.weight.requires_grad_(False), or merge() to fine-tune W fully")
        if not self.enabled:  # the original columns, written back: the original layer's function
            return _PacaMatmul.apply(x, weight, bias, self.paca_orig, self.paca_idx, 1.0, self.kind)
        return _PacaMatmul.apply(x, weight, bias, self.paca_P, self.paca_idx, self.scaling, self.kind)

    def merged(self) -> nn.Module:
        """The base layer with W[:, idx] = scaling·P written for good (changes it in place)."""
        _overlay(self.base_layer.weight, self.paca_idx, self.paca_P.detach(), self.scaling, self.kind)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}"


def module_seed(seed: int, name: str) -> int:
    """The column seed of module ``name``: a function of (seed, name) only, stable across runs."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) & _SEED_MASK


class _QPacaMatmul(torch.autograd.Function):
    """y = x·W_effᵀ + b, W_eff = deq(W) with columns idx = scaling·cols. Saves x[..., idx] and cols.

    Computed as ``x·deq(W)ᵀ + x[:, idx]·Δᵀ`` with ``Δ = scaling·cols − deq(W)[:, idx]`` ([out, r],
    read from those columns' bytes only), and grad_x as ``g·deq(W)`` plus ``g·Δ`` added into columns
    idx: the same function as dequantizing and overlaying, but the GEMMs are the plain quantized
    ones, so on CUDA the fused kernel runs and no full-precision W exists at any time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor, qw: QuantizedWeight,
                idx: torch.Tensor, scaling: float) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # [M, in]
        dtype = _autocast_dtype(x) or x2d.dtype
        x2d, bias = x2d.to(dtype), None if bias is None else bias.to(dtype)
        x_idx = x2d.index_select(1, idx)  # [M, r], a copy: x can be freed
        scales = qw.scales()  # once for the columns and the GEMM; delta [out, r] first, so only it outlives them
        delta = _quantized_delta(qw, idx, cols, scaling, dtype, scales)
        y2d = qw.matmul(x2d, bias, scales=scales).addmm_(x_idx, delta.t())  # [M, out]
        ctx.save_for_backward(x_idx if ctx.needs_input_grad[2] else None, cols)
        ctx.qw, ctx.idx, ctx.scaling, ctx.x_shape = qw, idx, scaling, x.shape
        return as_output(y2d, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_idx, cols = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [M, out]
        grad_x = grad_bias = grad_cols = None
        if ctx.needs_input_grad[0]:
            scales = ctx.qw.scales()
            delta = _quantized_delta(ctx.qw, ctx.idx, cols, ctx.scaling, g2d.dtype, scales)  # recomputed, [out, r]
            grad_x = ctx.qw.matmul(g2d, transpose=False, scales=scales).index_add_(1, ctx.idx, g2d.mm(delta))
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_bias = g2d.sum(0)
        if ctx.needs_input_grad[2]:
            grad_cols = x_idx.t().mm(g2d).t().mul_(ctx.scaling)  # [out, r]
        return grad_x, grad_bias, grad_cols, None, None, None


def _quantized_delta(qw: QuantizedWeight, idx: torch.Tensor, cols: torch.Tensor, scaling: float, dtype: torch.dtype,
           scales: torch.Tensor) -> torch.Tensor:
    """scaling·cols − deq(W)[:, idx] in ``dtype``, [out, r]: exactly 0 where P still equals deq(W)[:, idx] / scaling."""
    return (cols.detach().float() * scaling - dequantize_columns(qw, idx, scales)).to(dtype)


class QPacaLinear(WrappedLinear):
    """PaCA on a ``QuantLinear`` base: columns ``paca_idx`` of deq(W) are ``scaling·paca_P``; W's bytes never change."""

    merges_quantized_base = True  # ``dequantize_model`` replaces it by ``merged()``, base and all

    def __init__(self, base_layer: QuantLinear, idx: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self._wrap(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scaling = idx.numel(), scaling
        # [out, r] of deq(W) in the compute dtype, read from those columns' bytes: the quantized function at init
        orig = dequantize_columns(base_layer.quantized(), idx).to(base_layer.compute_dtype)
        self.register_buffer("paca_idx", idx)
        self.paca_P = nn.Parameter(orig / scaling)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        qw = self.base_layer.quantized()
        return _QPacaMatmul.apply(x, self.base_layer.bias, self.paca_P, qw, self.paca_idx, self.scaling)

    def merged(self) -> nn.Module:
        """A plain ``nn.Linear`` with deq(W), columns idx = scaling·P (the base stays quantized and unchanged)."""
        layer = self.base_layer.dequantized()
        with torch.no_grad():
            layer.weight.index_copy_(1, self.paca_idx, (self.paca_P * self.scaling).to(layer.weight.dtype))
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}"


def apply_paca(model: nn.Module, graph: ModelGraph, cfg: PacaConfig, log: RewriteLog) -> PassResult:
    """Freeze every parameter and wrap each targeted Linear-like layer in a ``PacaLinear``.

    Requires: ``graph`` was captured from ``model``; every target has ``in_features >= rank`` and a
    weight no other module shares.
    Ensures: only the ``paca_P`` parameters require grad; outputs are unchanged at init up to the
    rounding of ``(w / scaling)·scaling``; decisions record rank, selection, seed and scaling.
    """
    targets = select_targets(graph, model, cfg.target_modules, cfg.exclude_modules)
    _check_targets(model, targets, cfg)  # before any change, so a bad call leaves the model as it was
    log.freeze(model.parameters())
    decisions = [_wrap(model, layer, cfg, log) for layer in targets]
    decisions += frozen_rest(graph, targets, cfg)
    return PassResult(model, tuple(decisions))


def _check_targets(model: nn.Module, targets: list[LinearLayer], cfg: PacaConfig) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for layer in targets:
        if cfg.rank > layer.in_features:
            raise ValueError(f"PaCA rank={cfg.rank} exceeds in_features={layer.in_features} of {layer.name}: "
                             f"lower rank to <= {layer.in_features} or add {layer.name!r} to exclude_modules")
        module = model.get_submodule(layer.name)
        if isinstance(module, QuantLinear):  # buffers, never tied (the quantize pass refuses shared weights)
            continue
        weight = module.weight
        if len(owners.get(id(weight), ())) > 1:
            raise ValueError(f"PaCA cannot target {layer.name}: its weight is shared with "
                             f"{[n for n in owners[id(weight)] if n != layer.name + '.weight']} (tied), and PaCA writes "
                             f"P into it; add {layer.name!r} to exclude_modules or untie the weights")


def _wrap(model: nn.Module, layer: LinearLayer, cfg: PacaConfig, log: RewriteLog) -> ModuleDecision:
    base = model.get_submodule(layer.name)
    seed = module_seed(cfg.seed, layer.name)
    if isinstance(base, QuantLinear):  # QPaCA: the buffers are [out, in] whatever the original layout
        if cfg.selection == "random":
            idx = random_columns(base.in_features, cfg.rank, seed).to(base.qweight.device)
        else:  # the norms of deq(W)'s columns: one transient dequantized W
            idx = select_columns(base.weight, "linear", cfg.rank, cfg.selection, seed)
        wrapped: nn.Module = QPacaLinear(base, idx, cfg.scaling)
    else:
        idx = select_columns(base.weight, layer.kind, cfg.rank, cfg.selection, seed)
        wrapped = PacaLinear(base, layer.kind, layer.in_features, layer.out_features, idx, cfg.scaling)
    log.replace(layer.name, wrapped)
    details = PacaDetails(rank=cfg.rank, selection=cfg.selection, scaling=cfg.scaling, block=layer.block,
                          seed=seed if cfg.selection == "random" else None)
    return ModuleDecision(
        name=layer.name, role=layer.role.value, method="paca",
        in_features=layer.in_features, out_features=layer.out_features,
        trainable_params=cfg.rank * layer.out_features, details=details,
        reason="all-linear" if cfg.target_modules == "all-linear" else f"matched target_modules={cfg.target_modules!r}",
    )


def merge_paca(model: nn.Module) -> nn.Module:
    """Write every ``PacaLinear``'s P into its W and put the plain layer back, in place; returns ``model``."""
    return merge_wrapped(model, PacaLinear)
