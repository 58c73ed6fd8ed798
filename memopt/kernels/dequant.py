"""Dequantize-matmul for frozen quantized weights (NF4, FP4, int8): ``y = x·deq(W)ᵀ`` and ``g·deq(W)``.

Design note. A quantized Linear never keeps a full-precision copy of its weight: each GEMM
dequantizes what it needs and drops it. On CUDA the Triton kernel here dequantizes one
[BLOCK_K, BLOCK_N] tile of W in registers right before ``tl.dot``, so no dequantized weight exists
in memory at all; elsewhere the torch reference dequantizes the whole W (one transient) and calls
``F.linear`` / ``mm``. One kernel serves both directions: the forward reads W transposed
(``B[k, n] = W[n, k]``), grad_x reads it as it is (``B[n, k] = W[n, k]``).

Formats (the bytes are made by ``memopt.passes.quant_format``). W is logically [N, K] = [out, in],
row-major, flat index ``f = n·K + k``.
* ``"nf4"`` / ``"fp4"``: ``packed`` uint8 [ceil(N·K / 2)], element f in the high nibble of byte f//2
  when f is even, the low nibble when odd (bitsandbytes' order); ``absmax`` fp32 [ceil(N·K / block)],
  the scale of the flat block f // block (already undone from any double quantization, see
  ``nf4_absmax``); ``w = CODE[code] · absmax`` in fp32, then cast to the compute dtype, where CODE is
  the format's 16-value table (``CODES``; bitsandbytes' NF4 and FP4 tables).
* ``"int8"``: ``q`` int8 [N, K], ``scale`` fp32 [N] (absmax / 127 per output row);
  ``w = q · scale`` in fp32, then cast.

Dispatch, interpreter and laziness as in ``memopt.kernels.paca``: ``uses_dequant_triton`` picks the
kernel for CUDA fp32/fp16/bf16 inputs; with ``TRITON_INTERPRET=1`` set before triton is imported,
``dequant_matmul_triton`` runs on CPU tensors (how the tests check it without a GPU).

Planning a GPU step on fake CPU tensors (``memopt.memory.simulate``, ``memopt.ir.joint``) must see
what the GPU runs, not the CPU reference: inside ``simulating("cuda")`` the GEMM is the custom op
``memopt::dequant_matmul``, one op whose fake implementation allocates only its output — exactly
what the Triton kernel allocates — with the GEMM's FLOPs registered for ``FlopCounterMode``. (The
reference would put a W-sized transient and ~N·K/16384 chunk ops per GEMM into the trace: wrong
bytes for the GPU, and millions of ops for a 70B model.) Outside that context, and for a CPU
target, the reference runs on fake tensors too, so a CPU plan counts its transients exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils import flop_counter

from memopt.kernels.paca import Blocks, _cdiv, _precision, triton_available

try:  # optional: without it the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

__all__ = [
    "CODES", "FOUR_BIT", "FP4_CODE", "NF4_CODE", "dequant_matmul", "dequant_matmul_reference", "pair_table",
    "shared_table",
    "dequant_matmul_triton", "dequantize_int8",
    "dequantize_4bit", "simulating", "uses_dequant_triton",
]

# The 16 NF4 values of QLoRA (Dettmers et al. 2023, appendix E), as bitsandbytes stores them (fp32).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit; code 0b0001 is its subnormal 1/192), as it stores
# them: index = sign·8 + magnitude code, so the table is not sorted.
FP4_CODE = (
    0.0, 0.005208333333333333, 0.6666666666666666, 1.0, 0.3333333333333333, 0.5, 0.16666666666666666, 0.25,
    -0.0, -0.005208333333333333, -0.6666666666666666, -1.0, -0.3333333333333333, -0.5, -0.16666666666666666, -0.25,
)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}  # the 4-bit formats by name
FOUR_BIT = tuple(CODES)

_BLOCKS = {torch.float32: Blocks(m=64, n=64, k=32, num_warps=4), torch.float16: Blocks(m=64, n=64, k=64, num_warps=4),
           torch.bfloat16: Blocks(m=64, n=64, k=64, num_warps=4)}


# The torch reference dequantizes in chunks of this many elements (a multiple of every even block
# size <= 2**14 that divides it; chunks are aligned to blocks), so its transients beside the output
# W stay ~20 bytes per chunk element (int64 indices, fp32 values and scales) whatever W's size.
_CHUNK = 1 << 14


def real_table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a real fp32 tensor on ``device``, made once per device.

    Made outside any fake mode: a table first asked for while simulating must not be cached as a
    fake tensor, and a real constant is what a traced graph may hold.
    """
    if _strict_fake_mode():  # traced by AOTAutograd: a constant made inside the graph
        return torch.tensor(values, dtype=torch.float32, device=device)
    return _real_table(tuple(values), torch.device(device))


def _strict_fake_mode() -> bool:
    """Is a fake mode active that refuses real tensors (AOTAutograd's, tracing memopt's runtime)?"""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode()
    return mode is not None and not mode.allow_non_fake_inputs


@functools.cache
def _real_table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    with no_modes():
        return torch.tensor(values, dtype=torch.float32, device=device)


@contextlib.contextmanager
def no_modes() -> Iterator[None]:
    """No fake, functional or proxy mode: a cached table is a plain tensor, whichever mode (an
    AOTAutograd trace, a fake-tensor simulation) asked for it first."""
    from torch.utils._python_dispatch import _disable_current_modes

    with unset_fake_temporarily(), _disable_current_modes():
        yield


def _code_table(fmt: str, device: torch.device) -> torch.Tensor:
    return real_table(CODES[fmt], device)


def _pair_table(fmt: str, device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two 4-bit values of every byte (high nibble first)."""
    if _strict_fake_mode():
        return _pairs(_code_table(fmt, device))
    return pair_table(fmt, device)


def pair_table(fmt: str, device: torch.device | str) -> torch.Tensor:
    """The [256, 2] table of ``fmt`` on ``device``, one real tensor per device and format: what a
    quantized layer holds as a buffer (shared), so a traced step reads it as an input rather than
    making a constant of its own at every call (``_pair_table`` under AOTAutograd)."""
    return _real_pair_table(fmt, torch.device(device))


def shared_table(values: tuple[float, ...], device: torch.device | str) -> torch.Tensor:
    """``values`` as one real fp32 tensor per device, made once (a buffer quantized layers share,
    as ``pair_table``'s)."""
    return _real_table(tuple(values), torch.device(device))


@functools.cache
def _real_pair_table(fmt: str, device: torch.device) -> torch.Tensor:
    with no_modes():
        return _pairs(_real_table(CODES[fmt], torch.device(device)))


def _pairs(table: torch.Tensor) -> torch.Tensor:
    byte = torch.arange(256, device=table.device)
    return table[torch.stack((byte >> 4, byte & 0xF), dim=1)]


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], block: int,
                    dtype: torch.dtype, fmt: str = "nf4", pairs: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in ``dtype`` from 4-bit bytes of ``fmt`` and per-block fp32 absmax (fp32, cast once).
    ``pairs``: ``fmt``'s [256, 2] table if the caller holds it (``pair_table``)."""
    n = shape[0] * shape[1]
    if packed.device.type == "meta":  # shapes only (a model built to be planned): no chunk loop
        return torch.empty(shape, dtype=dtype, device="meta")
    out = torch.empty(n, dtype=dtype, device=packed.device)
    pairs = _pair_table(fmt, packed.device) if pairs is None else pairs
    step = _CHUNK - _CHUNK % block if block <= _CHUNK else block  # whole blocks, an even count of elements
    for start in range(0, n, step):
        stop = min(start + step, n)
        vals = pairs.index_select(0, packed[start // 2: (stop + 1) // 2].long()).view(-1)[: stop - start]
        scale = absmax[start // block: -(-stop // block)].repeat_interleave(block)[: stop - start]
        out[start:stop] = vals * scale  # fp32 product, rounded once to dtype
    return out.view(shape)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` from int8 codes and per-row fp32 scales."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.device.type == "meta":
        return out
    rows = max(1, _CHUNK // max(1, q.shape[1]))
    for r in range(0, q.shape[0], rows):
        out[r: r + rows] = q[r: r + rows].float() * scale[r: r + rows, None]
    return out


def _dequantize(fmt: str, data: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], block: int,
                dtype: torch.dtype, pairs: torch.Tensor | None = None) -> torch.Tensor:
    if fmt in FOUR_BIT:
        return dequantize_4bit(data, scales, shape, block, dtype, fmt, pairs)
    return dequantize_int8(data, scales, dtype)


def dequant_matmul_reference(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor,
                             shape: tuple[int, int], block: int, bias: torch.Tensor | None = None,
                             transpose: bool = True, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """``a·deq(W)ᵀ + bias`` ([M, K] -> [M, N]) if ``transpose``, else ``a·deq(W)`` ([M, N] -> [M, K])."""
    w = _dequantize(fmt, data, scales, shape, block, a.dtype, pairs)  # the one transient full-precision W
    return F.linear(a, w, bias) if transpose else a.mm(w)


def uses_dequant_triton(a: torch.Tensor) -> bool:
    """Whether ``dequant_matmul`` runs the Triton kernel for this activation: CUDA, triton, fp32/16-bit."""
    return a.is_cuda and triton_available() and a.dtype in _BLOCKS


def dequant_matmul(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                   block: int, bias: torch.Tensor | None = None, transpose: bool = True,
                   pairs: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA when available, the torch reference otherwise (same contract).

    Inside ``simulating("cuda")`` it is the fused op ``memopt::dequant_matmul`` (see the module docstring);
    so it is wherever the GEMM is being traced rather than run — under ``torch.compile``, or on fake
    or functional (AOTAutograd) CUDA tensors — where one opaque op is what the graph should hold.
    ``pairs``: the 4-bit format's table, if the caller holds it (``pair_table``).
    """
    if _as_one_op(a):
        return torch.ops.memopt.dequant_matmul(a, fmt, data, scales, list(shape), block, bias, transpose, pairs)
    return _eager_dequant_matmul(a, fmt, data, scales, shape, block, bias, transpose, pairs)


def _as_one_op(a: torch.Tensor) -> bool:
    simulated = _SIMULATED.get()
    if simulated is not None:
        return simulated == "cuda"
    return torch.compiler.is_compiling() or (a.is_cuda and (is_fake(a) or isinstance(a, FunctionalTensor)))


def _eager_dequant_matmul(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor,
                          shape: tuple[int, int], block: int, bias: torch.Tensor | None, transpose: bool,
                          pairs: torch.Tensor | None = None) -> torch.Tensor:
    if uses_dequant_triton(a):
        return dequant_matmul_triton(a, fmt, data, scales, shape, block, bias, transpose)
    return dequant_matmul_reference(a, fmt, data, scales, shape, block, bias, transpose, pairs)


# Which device's dequant-matmul a simulation models: None (the tensors' own), or a device kind.
_SIMULATED: contextvars.ContextVar[str | None] = contextvars.ContextVar("memopt_dequant_simulated", default=None)


@contextlib.contextmanager
def simulating(device_kind: str) -> Iterator[None]:
    """Within this block, ``dequant_matmul`` is the one the target ``device_kind`` runs ("cuda": fused)."""
    token = _SIMULATED.set(device_kind)
    try:
        yield
    finally:
        _SIMULATED.reset(token)


@torch.library.custom_op("memopt::dequant_matmul", mutates_args=())
def _fused_dequant_matmul(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor, shape: list[int],
                          block: int, bias: torch.Tensor | None, transpose: bool,
                          pairs: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant_matmul`` as one op (what the fused kernel is); real tensors run the eager dispatch."""
    return _eager_dequant_matmul(a, fmt, data, scales, (shape[0], shape[1]), block, bias, transpose, pairs)


@_fused_dequant_matmul.register_fake
def _(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor, shape: list[int], block: int,
      bias: torch.Tensor | None, transpose: bool, pairs: torch.Tensor | None = None) -> torch.Tensor:
    return a.new_empty((a.shape[0], shape[0] if transpose else shape[1]))  # the output: all the kernel allocates


@flop_counter.register_flop_formula(torch.ops.memopt.dequant_matmul)
def _fused_flops(a_shape: Any, fmt: str, data_shape: Any, scales_shape: Any, shape: list[int], block: int,
                 bias_shape: Any, transpose: bool, pairs_shape: Any = None, out_shape: Any = None, **_: Any) -> int:
    return 2 * a_shape[0] * shape[0] * shape[1]  # one GEMM, [M, K] x [K, N] either way round


def dequant_matmul_triton(a: torch.Tensor, fmt: str, data: torch.Tensor, scales: torch.Tensor,
                          shape: tuple[int, int], block: int, bias: torch.Tensor | None = None,
                          transpose: bool = True, blocks: Blocks | None = None) -> torch.Tensor:
    """``dequant_matmul_reference``'s contract, W dequantized tile by tile inside the GEMM."""
    n_w, k_w = shape
    m, red = a.shape
    out_cols = n_w if transpose else k_w
    if red != (k_w if transpose else n_w):
        raise ValueError(f"dequant_matmul_triton: operand has {red} columns, W {tuple(shape)} (transpose={transpose})")
    blocks = blocks or _BLOCKS[a.dtype]
    out = torch.empty((m, out_cols), device=a.device, dtype=a.dtype)
    grid = (_cdiv(m, blocks.m) * _cdiv(out_cols, blocks.n),)
    _kernel()[grid](
        a, data, scales, _code_table(fmt if fmt in FOUR_BIT else "nf4", a.device), bias if bias is not None else out, out,
        m, out_cols, red, k_w, block, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, GROUP_M=blocks.group_m, FOUR=fmt in FOUR_BIT,
        TRANSPOSE=transpose, HAS_BIAS=bias is not None, PRECISION=_precision(a.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


@functools.cache
def _kernel() -> Any:
    return triton.jit(_dequant_matmul_kernel)


def _dequant_matmul_kernel(a_ptr, q_ptr, s_ptr, code_ptr, b_ptr, c_ptr, M, N, K, KW, QBLOCK,
                           stride_am, stride_ak, stride_cm, stride_cn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, FOUR: tl.constexpr, TRANSPOSE: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of C = A·B (+ bias); B[k, n] = W[n, k] if TRANSPOSE else W[k, n]."""
    pid = tl.program_id(0)
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
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        mask_b = (ks[:, None] < K) & (cols[None, :] < N)
        if TRANSPOSE:  # B[k, n] = W[n, k]: W row n, column k
            w_row, w_col = cols[None, :], ks[:, None]
        else:  # B[k, n] = W[k, n]
            w_row, w_col = ks[:, None], cols[None, :]
        flat = w_row.to(tl.int64) * KW + w_col  # [BLOCK_K, BLOCK_N] flat indices into W
        if FOUR:
            byte = tl.load(q_ptr + flat // 2, mask=mask_b, other=0).to(tl.int32)
            code = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
            scale = tl.load(s_ptr + flat // QBLOCK, mask=mask_b, other=0.0)
            w = tl.load(code_ptr + code, mask=mask_b, other=0.0) * scale
        else:
            scale = tl.load(s_ptr + w_row, mask=mask_b, other=0.0)
            w = tl.load(q_ptr + flat, mask=mask_b, other=0).to(tl.float32) * scale
        acc = tl.dot(a, w.to(a_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
