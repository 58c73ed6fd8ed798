"""S²FT's layer: a frozen, co-permuted Linear-like layer with an optional trainable dense block.

Design note. The selected rows (v, up) or columns (o, down) of a permuted weight form one
contiguous slice ``[start, start + size)`` of the logical weight ``W`` ``[out, in]`` (for a GPT-2
Conv1D, whose weight is ``[in, out]``, the logical weight is its transposed view). That slice is
held as a separate dense ``nn.Parameter`` ``s2ft_block``; the frozen ``W`` is never copied, and its
stale slice is never read. The effective weight is ``W`` with the block overlaid, and the matmul is
split along the slice so no second copy of ``W`` is ever made:

* row block (``axis="out"``): ``y[:, piece] = x · W_pieceᵀ`` written into one output buffer, the
  block's piece from ``s2ft_block``. Backward: ``grad_x = Σ g_piece · W_piece`` and
  ``grad_block = g_blockᵀ · x`` — this needs the full ``x``, which is saved (it is the layer's input).
* column block (``axis="in"``): ``y = Σ x[:, piece] · W_pieceᵀ`` accumulated in one buffer.
  Backward: ``grad_x[:, piece] = g · W_piece`` and ``grad_block = gᵀ · x[:, block]``. Only
  ``x[:, block]`` is saved, as a contiguous *copy*, so the full activation can be freed.

No gradient is ever formed for ``W`` or the bias (both frozen): backward is one ``grad_x`` GEMM
(skipped when the input needs no gradient) plus the block's small GEMM. Eager matmuls use
``mm``/``addmm`` with ``out=`` on strided column views, so pieces are never concatenated (under
``torch.compile``, which refuses strided ``out=``, they are, and Inductor plans the buffer); every
GEMM is visible to ``FlopCounterMode`` (which does not count an in-place ``addmm_``).

``s2ft_perm`` (the permutation applied to the weight along ``axis``: new index i holds old index
``perm[i]``) and ``s2ft_selected`` (the original unit indices selected in this layer) are
persistent buffers, so the state dict of an S²FT model round-trips and ``merged()`` can undo the
permutation exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn

from memopt.passes.base import WrappedLinear

__all__ = ["S2ftLinear", "permute_weight_", "row_block_linear", "column_block_linear"]

_Pieces = list[tuple[int, int, bool]]  # (lo, hi, is_block) along the blocked axis


def _pieces(length: int, start: int, size: int) -> _Pieces:
    """The axis ``[0, length)`` cut at the block ``[start, start + size)``; empty pieces dropped."""
    cuts = [(0, start, False), (start, start + size, True), (start + size, length, False)]
    return [(lo, hi, blk) for lo, hi, blk in cuts if hi > lo]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would pick for a matmul here (``x``'s own dtype outside autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _columns(rows: int, width: int, like: torch.Tensor, dtype: torch.dtype,
             parts: list[tuple[int, int, Callable[..., torch.Tensor]]]) -> torch.Tensor:
    """A [rows, width] tensor whose columns [lo, hi) are ``make(out=...)`` of each part.

    Eager: each GEMM writes straight into its strided column view (no concatenation copy).
    Compiling: dynamo refuses a strided ``out=``, so the parts are concatenated and Inductor
    plans the buffer.
    """
    if torch.compiler.is_compiling():
        return torch.cat([make() for _, _, make in parts], dim=1)
    result = like.new_empty(rows, width, dtype=dtype)
    for lo, hi, make in parts:
        make(out=result[:, lo:hi])
    return result


def _no_autocast(x: torch.Tensor) -> Any:
    # The ops below cast explicitly, and autocast does not apply to ``out=`` variants anyway.
    return torch.autocast(x.device.type, enabled=False)


class _RowBlock(torch.autograd.Function):
    """``y = x · W_effᵀ (+ bias)``; W_eff = ``weight`` with rows ``[start, start+k)`` = ``block``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor,
                bias: torch.Tensor | None, start: int) -> torch.Tensor:
        # x [N, in], weight [out, in] (logical), block [k, in], bias [out]
        ctx.save_for_backward(x, weight, block)
        ctx.start = start
        dtype = _compute_dtype(x)
        with _no_autocast(x):
            x_ = x.to(dtype)
            parts = []
            for lo, hi, is_block in _pieces(weight.shape[0], start, block.shape[0]):
                w = (block if is_block else weight[lo:hi]).to(dtype)  # [hi - lo, in]
                if bias is None:
                    make = partial(torch.mm, x_, w.t())
                else:
                    make = partial(torch.addmm, bias[lo:hi].to(dtype), x_, w.t())
                parts.append((lo, hi, make))
            return _columns(x.shape[0], weight.shape[0], x, dtype, parts)  # [N, out]

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, block = ctx.saved_tensors
        start, size, dtype = ctx.start, block.shape[0], grad_y.dtype
        grad_x = grad_block = None
        with _no_autocast(grad_y):
            if ctx.needs_input_grad[0]:
                grad_x = _grad_x_of_rows(grad_y, weight, block, start)  # [N, in]
            if ctx.needs_input_grad[2]:
                grad_block = torch.mm(grad_y[:, start:start + size].t(), x.to(dtype))  # [k, in]
        return grad_x, None, grad_block, None, None


def _grad_x_of_rows(grad_y: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, start: int) -> torch.Tensor:
    grad_x = None
    for lo, hi, is_block in _pieces(weight.shape[0], start, block.shape[0]):
        w = (block if is_block else weight[lo:hi]).to(grad_y.dtype)  # [hi - lo, in]
        if grad_x is None:
            grad_x = torch.mm(grad_y[:, lo:hi], w)
        else:
            torch.addmm(grad_x, grad_y[:, lo:hi], w, out=grad_x)
    assert grad_x is not None
    return grad_x


class _ColumnBlock(torch.autograd.Function):
    """``y = x · W_effᵀ (+ bias)``; W_eff = ``weight`` with columns ``[start, start+k)`` = ``block``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor,
                bias: torch.Tensor | None, start: int) -> torch.Tensor:
        # x [N, in], weight [out, in] (logical), block [out, k], bias [out]
        size, dtype = block.shape[1], _compute_dtype(x)
        # A copy, never a view: a view would keep the whole input alive until backward.
        narrow = size < x.shape[1]
        x_block = x[:, start:start + size].to(dtype, copy=narrow, memory_format=torch.contiguous_format)  # [N, k]
        ctx.save_for_backward(x_block, weight, block)
        ctx.start = start
        y = None
        with _no_autocast(x):
            for lo, hi, is_block in _pieces(weight.shape[1], start, size):
                w = (block if is_block else weight[:, lo:hi]).to(dtype)  # [out, hi - lo]
                x_ = x[:, lo:hi].to(dtype)  # [N, hi - lo]
                if y is None:
                    y = torch.mm(x_, w.t()) if bias is None else torch.addmm(bias.to(dtype), x_, w.t())
                else:
                    torch.addmm(y, x_, w.t(), out=y)
        assert y is not None
        return y  # [N, out]

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_block, weight, block = ctx.saved_tensors
        dtype = grad_y.dtype
        grad_x = grad_block = None
        with _no_autocast(grad_y):
            if ctx.needs_input_grad[0]:
                parts = [(lo, hi, partial(torch.mm, grad_y, (block if is_block else weight[:, lo:hi]).to(dtype)))
                         for lo, hi, is_block in _pieces(weight.shape[1], ctx.start, block.shape[1])]
                grad_x = _columns(grad_y.shape[0], weight.shape[1], grad_y, dtype, parts)  # [N, in]
            if ctx.needs_input_grad[2]:
                grad_block = torch.mm(grad_y.t(), x_block)  # [out, k]
        return grad_x, None, grad_block, None, None


def row_block_linear(x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor,
                     bias: torch.Tensor | None, start: int) -> torch.Tensor:
    """``x · W_effᵀ + bias`` for a row block; ``x`` [..., in], ``weight`` logical [out, in]."""
    y = _RowBlock.apply(x.reshape(-1, x.shape[-1]), weight, block, bias, start)
    return y.view(*x.shape[:-1], y.shape[-1])


def column_block_linear(x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor,
                        bias: torch.Tensor | None, start: int) -> torch.Tensor:
    """``x · W_effᵀ + bias`` for a column block; ``x`` [..., in], ``weight`` logical [out, in]."""
    y = _ColumnBlock.apply(x.reshape(-1, x.shape[-1]), weight, block, bias, start)
    return y.view(*x.shape[:-1], y.shape[-1])


def _weight_dim(kind: str, axis: str) -> int:
    """The dim of the stored weight that is the logical ``axis`` ("out" rows / "in" columns)."""
    out_dim = 0 if kind == "linear" else 1  # Conv1D stores [in, out]
    return out_dim if axis == "out" else 1 - out_dim


def permute_weight_(layer: nn.Module, kind: str, axis: str, perm: torch.Tensor) -> None:
    """Permute ``layer``'s weight along ``axis`` in place (and its bias with output rows)."""
    with torch.no_grad():
        weight = layer.weight
        dim = _weight_dim(kind, axis)
        weight.copy_(weight.index_select(dim, perm.to(weight.device)))
        bias = getattr(layer, "bias", None)
        if axis == "out" and bias is not None:
            bias.copy_(bias.index_select(0, perm.to(bias.device)))


def _logical(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return weight if kind == "linear" else weight.t()  # [out, in]


class S2ftLinear(WrappedLinear):
    """A frozen Linear-like ``base_layer`` whose weight was permuted along ``axis`` by ``perm``.

    With ``block=(start, size)``, rows (``axis="out"``) or columns (``axis="in"``)
    ``[start, start + size)`` of the logical weight train as ``s2ft_block``
    (``[size, in]`` or ``[out, size]``); without it the layer only carries its permutation.
    """

    def __init__(self, base_layer: nn.Module, kind: str, axis: str, perm: torch.Tensor,
                 selected: torch.Tensor, block: tuple[int, int] | None = None) -> None:
        super().__init__()
        if axis not in ("out", "in"):
            raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
        self._wrap(base_layer)
        self.kind, self.axis = kind, axis
        device = base_layer.weight.device
        self.register_buffer("s2ft_perm", perm.to(device=device, dtype=torch.long))
        self.register_buffer("s2ft_selected", selected.to(device=device, dtype=torch.long))
        self.block_start, self.block_size = block if block is not None else (0, 0)
        self.s2ft_block = nn.Parameter(self._block_view().clone()) if block is not None else None
        # Off: the base layer's permuted weight (its block slice still holds the original values);
        # with every layer of a coupled group off, the model computes its original function.
        self.enabled = True

    def _block_view(self) -> torch.Tensor:
        w = _logical(self.base_layer.weight, self.kind)
        lo, hi = self.block_start, self.block_start + self.block_size
        return w[lo:hi] if self.axis == "out" else w[:, lo:hi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s2ft_block is None or not self.enabled:
            return self.base_layer(x)
        weight = _logical(self.base_layer.weight, self.kind)
        bias = getattr(self.base_layer, "bias", None)
        fn = row_block_linear if self.axis == "out" else column_block_linear
        return fn(x, weight, self.s2ft_block, bias, self.block_start)

    def merged(self) -> nn.Module:
        """The base layer with the block written back and the permutation undone (in place)."""
        if self.s2ft_block is not None:
            with torch.no_grad():
                self._block_view().copy_(self.s2ft_block)
        permute_weight_(self.base_layer, self.kind, self.axis, torch.argsort(self.s2ft_perm))
        return self.base_layer

    def extra_repr(self) -> str:
        block = f"[{self.block_start}:{self.block_start + self.block_size})" if self.s2ft_block is not None else "none"
        return f"kind={self.kind}, axis={self.axis}, block={block}, selected={self.s2ft_selected.numel()}"
