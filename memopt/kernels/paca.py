"""PaCA's forward GEMM with the saved-input gather fused in: ``y = x·Wᵀ (+ b)`` and ``x[:, idx]``.

Design note. PaCA's backward needs only ``x[..., idx]`` (B·T × r) of the layer's input, as a copy
that owns its memory so that x itself can be freed. Done in torch, that copy is a second kernel that
reads those columns of x again after the GEMM has streamed all of x. The Triton kernel here makes
one launch produce both: every program computes a [BLOCK_M, BLOCK_N] tile of y, and the programs of
the first column block (``pid_n == 0``) also copy the r selected columns of their BLOCK_M rows —
rows they have just streamed through, so the gather hits L2 rather than HBM.

``W`` is read through strides, so both layouts PaCA rewrites work: ``nn.Linear`` (weight
[out, in], ``kind="linear"``) and GPT-2's Conv1D (weight [in, out], ``kind="conv1d"``). The weight
is read as it is: PaCA writes ``scaling·P`` into its columns ``idx`` before calling this.

``paca_forward`` dispatches: the Triton kernel for CUDA tensors when ``triton`` imports, else
``paca_forward_reference`` (torch; CPU and everything else). With ``TRITON_INTERPRET=1`` in the
environment *before triton is imported* (triton decorates its own library functions at import),
``paca_forward_triton`` runs in Triton's interpreter on CPU tensors — which is how the tests
compare it with the reference on a machine without a GPU (in a subprocess). The kernel is
decorated on first use, so importing this module costs nothing where triton is missing. fp32
inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is on, as torch's
own matmul does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:  # optional (it ships with CUDA builds of torch on Linux); without it the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is installed wherever the tests run
    triton = tl = None

__all__ = ["Blocks", "paca_forward", "paca_forward_reference", "paca_forward_triton", "triton_available", "uses_triton"]


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of the Triton kernel (``tl.dot`` needs every tile dim >= 16)."""

    m: int = 128
    n: int = 128
    k: int = 32
    group_m: int = 8  # consecutive programs share W column blocks (L2 reuse)
    num_warps: int = 8
    num_stages: int = 3


# fp32 tiles take twice the shared memory of 16-bit ones, so they get half the K depth.
_BLOCKS = {torch.float32: Blocks(k=32), torch.float16: Blocks(k=64), torch.bfloat16: Blocks(k=64)}


def paca_forward_reference(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           idx: torch.Tensor, kind: str, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x2d·W_logᵀ + bias, x2d[:, idx] copy or None)``; x2d [M, in], idx [r] -> ([M, out], [M, r])."""
    if kind == "linear":
        y = F.linear(x2d, weight, bias)  # weight [out, in]
    else:
        y = torch.addmm(bias, x2d, weight) if bias is not None else x2d.mm(weight)  # weight [in, out]
    return y, (x2d.index_select(1, idx) if gather else None)  # index_select copies: x can be freed


def triton_available() -> bool:
    """Whether ``triton`` imported (it is an optional dependency outside Linux)."""
    return tl is not None


def uses_triton(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``paca_forward`` runs the Triton kernel for these operands: CUDA, triton, fp32/16-bit."""
    return x2d.is_cuda and triton_available() and x2d.dtype in _BLOCKS and x2d.dtype == weight.dtype


def paca_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                 kind: str, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton kernel on CUDA when available, the torch reference otherwise (same contract)."""
    if uses_triton(x2d, weight):
        return paca_forward_triton(x2d, weight, bias, idx, kind, gather)
    return paca_forward_reference(x2d, weight, bias, idx, kind, gather)


def paca_forward_triton(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                        kind: str, gather: bool = True, blocks: Blocks | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``paca_forward_reference``'s contract, computed by the fused Triton kernel."""
    m, k = x2d.shape
    # The kernel reads W as [K, N]: W_logᵀ for nn.Linear, the weight itself for Conv1D.
    w_kn = weight.t() if kind == "linear" else weight
    n = w_kn.shape[1]
    if w_kn.shape[0] != k:
        raise ValueError(f"paca_forward_triton: x has {k} features but the {kind} weight {tuple(weight.shape)} "
                         f"expects {w_kn.shape[0]}")
    blocks = blocks or _BLOCKS[x2d.dtype]
    y = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    r = idx.numel()
    x_idx = torch.empty((m, r), device=x2d.device, dtype=x2d.dtype) if gather else None
    grid = (_cdiv(m, blocks.m) * _cdiv(n, blocks.n),)
    _kernel()[grid](
        x2d, w_kn, y, bias if bias is not None else y, idx, x_idx if gather else y,
        m, n, k, r,
        x2d.stride(0), x2d.stride(1), w_kn.stride(0), w_kn.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, BLOCK_R=max(16, _next_pow2(r)), GROUP_M=blocks.group_m,
        HAS_BIAS=bias is not None, GATHER=gather, PRECISION=_precision(x2d.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return y, x_idx


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


@functools.cache
def _kernel() -> Any:
    """``triton.jit`` of the kernel body, made once, on first use."""
    return triton.jit(_paca_forward_kernel)


def _paca_forward_kernel(x_ptr, w_ptr, y_ptr, b_ptr, idx_ptr, xi_ptr, M, N, K, R,
                         stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                         GATHER: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y = x·W (+ b); column block 0 also writes x[rows, idx]."""
    pid = tl.program_id(0)
    # Grouped ordering: GROUP_M row blocks walk the column blocks together, sharing W tiles in L2.
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        ks = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    if GATHER:
        if pid_n == 0:
            rs = tl.arange(0, BLOCK_R)
            picked = tl.load(idx_ptr + rs, mask=rs < R, other=0)
            mask = (rows[:, None] < M) & (rs[None, :] < R)
            v = tl.load(x_ptr + rows[:, None] * stride_xm + picked[None, :] * stride_xk, mask=mask, other=0.0)
            tl.store(xi_ptr + rows[:, None] * R + rs[None, :], v, mask=mask)
