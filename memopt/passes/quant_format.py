"""The bytes of a quantized frozen weight: NF4 with double quantization (QLoRA), and int8.

(Adopted from bitsandbytes-loaded models, ``memopt.passes.bitsandbytes``, also: FP4, and NF4 / FP4
without double quantization, whose per-block absmax is kept as fp32 in ``scale``.)

NF4 (Dettmers et al. 2023, "QLoRA", §3 and appendix E; bitsandbytes is the reference code). W is
taken in its logical [out, in] layout, row-major, flattened; every run of ``block`` (64) elements
is scaled by its absmax into [-1, 1] and each element stored as the index of the nearest of the 16
NF4 values (ties to the lower index), two per byte, the first in the high nibble. A width that is
not a multiple of the block needs no padding: blocks run across rows, and only the last flat block
may be shorter (its absmax is its own); an odd element count gets one pad nibble (the code of 0.0) at the end.
Double quantization: the fp32 absmax constants minus their mean are quantized blockwise (block 256)
to 8 bits with bitsandbytes' dynamic (sign + exponent + fraction) code — QLoRA's "8-bit floats";
the mean and the 256-block scales stay fp32. Per element that is 4 + 8/64 + 32/(64·256) bits.

int8: symmetric per-output-row absmax, ``q = round(w · 127 / absmax)`` (int8 in [-127, 127]),
``scale = absmax / 127`` (fp32), ``w ≈ q · scale``; all-zero rows get scale 0.

Quantization runs in fp32 whatever W's dtype; dequantization computes in fp32 and casts once to the
compute dtype (W's original dtype), as bitsandbytes does.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memopt.kernels.dequant import (
    CODES,
    FOUR_BIT,
    NF4_CODE,
    dequant_matmul,
    dequantize_4bit,
    dequantize_int8,
    real_table,
    shared_table,
)

__all__ = ["QuantizedWeight", "code8_table", "dequantize_columns", "dequantize_with_overlay", "dynamic_code",
           "quantize_int8", "quantize_nf4", "nf4_absmax"]

_NF4_ZERO = NF4_CODE.index(0.0)  # 7
_INT8_MAX = 127  # symmetric: -128 is never used, so negation is exact


@functools.cache
def dynamic_code() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(True, 7, 8)``), 256 sorted fp32 values.

    Exponent i in 0..6 scales ``2**i`` fraction means of ``linspace(0.1, 1)`` by ``10**(i - 6)``,
    both signs; then 0 and 1.0 (the positive side has one value more than the negative side).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # real values even when first asked for inside a fake-tensor simulation
        return _dynamic_code()


def _dynamic_code() -> tuple[float, ...]:
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return tuple(torch.tensor(sorted(data), dtype=torch.float32).tolist())


def _table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return real_table(values, device)


def code8_table(device: torch.device | str) -> torch.Tensor:
    """The 256-value code of double quantization on ``device``: one real tensor per device, which a
    quantized layer holds as a buffer (see ``memopt.kernels.dequant.pair_table``)."""
    return shared_table(dynamic_code(), device)


def _code8(qw: "QuantizedWeight") -> torch.Tensor:
    return _table(dynamic_code(), qw.absmax_q.device) if qw.code8 is None else qw.code8


def _blockwise_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 absmax of each run of ``block`` elements of ``flat`` (the last run may be shorter)."""
    full = flat.numel() - flat.numel() % block
    absmax = flat[:full].view(-1, block).abs().amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def _quantize_to_code(flat: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling, then the nearest code index (uint8) of each element; and the absmax."""
    absmax = _blockwise_absmax(flat, block)
    inv = 1.0 / absmax.clamp(min=1e-38)  # an all-zero block scales to 0 and stays exactly 0
    per_elem = inv.repeat_interleave(block)[: flat.numel()]
    scaled = (flat * per_elem).clamp(-1, 1)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


@dataclass(frozen=True)
class QuantizedWeight:
    """A frozen weight's quantized bytes (the tensors are the owning module's buffers).

    ``fmt`` "nf4" / "fp4": ``data`` packed uint8 and either the double-quantized absmax
    (``absmax_q`` uint8 codes, ``absmax_scale`` fp32 per 256 codes, ``absmax_offset`` fp32 scalar) or,
    without double quantization, ``scale`` the fp32 absmax per block. ``fmt`` "int8": ``data`` int8
    [out, in], ``scale`` fp32 [out]. ``shape`` is the logical [out, in]; ``dtype`` the compute
    (original) dtype. ``pairs`` ([256, 2], the 4-bit format's values of every byte) and ``code8``
    (the 256-value code of double quantization) are the tables, when the owning module holds them
    as buffers (``QuantLinear``); else the process's own real tables are read.
    """

    fmt: str
    shape: tuple[int, int]
    dtype: torch.dtype
    data: torch.Tensor
    scale: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    block: int = 64
    scaler_block: int = 256
    pairs: torch.Tensor | None = None
    code8: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        """Per-block (4-bit, double quantization undone) or per-row (int8) fp32 scales; inside
        ``scales_shared()`` undone once per weight."""
        if not self.double_quantized:
            return self.scale
        if (shared := _SHARED.get()) is None:
            return nf4_absmax(self)
        # Keyed by the tensors the scales are undone from (a layer makes a new QuantizedWeight over its
        # buffers every call), held with them so no id is reused inside.
        held = (self.absmax_q, self.absmax_scale, self.absmax_offset)
        key = tuple(map(id, held))
        if key not in shared:
            shared[key] = (held, nf4_absmax(self))
        return shared[key][1]

    @property
    def double_quantized(self) -> bool:
        return self.absmax_q is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision W [out, in] (a new tensor, in ``dtype`` or the compute dtype)."""
        dtype = dtype or self.dtype
        if self.fmt in FOUR_BIT:
            return dequantize_4bit(self.data, self.scales(), self.shape, self.block, dtype, self.fmt, self.pairs)
        return dequantize_int8(self.data, self.scale, dtype)

    def matmul(self, a: torch.Tensor, bias: torch.Tensor | None = None, transpose: bool = True,
               scales: torch.Tensor | None = None) -> torch.Tensor:
        """``a·Wᵀ + bias`` ([M, in] -> [M, out]) or, with ``transpose=False``, ``a·W`` ([M, out] -> [M, in]).

        ``scales``: ``self.scales()`` if the caller has it already (computed otherwise).
        """
        scales = self.scales() if scales is None else scales
        return dequant_matmul(a, self.fmt, self.data, scales, self.shape, self.block, bias, transpose, pairs=self.pairs)

    @property
    def nbytes(self) -> int:
        tensors = (self.data, self.scale, self.absmax_q, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_SHARED: contextvars.ContextVar[dict[tuple, tuple[tuple, torch.Tensor]] | None] = contextvars.ContextVar(
    "memopt_shared_scales", default=None)


@contextlib.contextmanager
def scales_shared() -> Iterator[None]:
    """Inside, each double-quantized weight's scales are undone once and reused: a module run on
    pieces of its input (``passes.seq_chunk``) reads the same weights for every piece, and would
    otherwise undo them per piece (ops in the trace and work on the device)."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def nf4_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 per-64-block absmax: ``code8[absmax_q] · absmax_scale[block // 256] + offset``."""
    codes = _code8(qw)[qw.absmax_q.long()]
    per_code = qw.absmax_scale.repeat_interleave(qw.scaler_block)[: codes.numel()]
    return codes * per_code + qw.absmax_offset


def quantize_nf4(weight: torch.Tensor, block: int = 64, scaler_block: int = 256) -> QuantizedWeight:
    """NF4 + double quantization of a [out, in] weight (see the module docstring)."""
    flat = weight.detach().float().reshape(-1)
    codes, absmax = _quantize_to_code(flat, block, _table(NF4_CODE, flat.device))
    if codes.numel() % 2:  # pad with the code of 0.0, as bitsandbytes does
        codes = torch.cat([codes, codes.new_full((1,), _NF4_ZERO)])
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = absmax.mean()
    absmax_q, absmax_scale = _quantize_to_code(absmax - offset, scaler_block, _table(dynamic_code(), flat.device))
    return QuantizedWeight("nf4", tuple(weight.shape), weight.dtype, packed, absmax_q=absmax_q,
                           absmax_scale=absmax_scale, absmax_offset=offset, block=block, scaler_block=scaler_block)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-row int8 of a [out, in] weight."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (_INT8_MAX / absmax.clamp(min=1e-38))[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return QuantizedWeight("int8", tuple(weight.shape), weight.dtype, q, scale=absmax / _INT8_MAX)


def dequantize_with_overlay(qw: QuantizedWeight, idx: torch.Tensor, cols: torch.Tensor,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """deq(W) [out, in] with columns ``idx`` replaced by ``cols`` [out, r] (QPaCA); W's bytes untouched."""
    w = qw.dequantize(dtype)
    return w.index_copy_(1, idx, cols.to(w.dtype))


def dequantize_columns(qw: QuantizedWeight, idx: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """deq(W)[:, idx] as fp32 [out, r], read from the bytes of those columns only (bit-equal to ``dequantize``).

    ``scales``: ``qw.scales()`` if the caller has it already; else only the columns' 4-bit blocks undo
    their double quantization.
    """
    if qw.fmt == "int8":
        return qw.data.index_select(1, idx).float() * (qw.scale if scales is None else scales)[:, None]
    rows = torch.arange(qw.shape[0], device=qw.data.device)
    flat = rows[:, None] * qw.shape[1] + idx[None, :]  # [out, r] flat element indices
    byte = qw.data[flat // 2]
    codes = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    blk = flat // qw.block
    # (the 16 values: the table's high nibbles of bytes 0x00, 0x10, ..., 0xF0)
    code = _table(CODES[qw.fmt], byte.device) if qw.pairs is None else qw.pairs[::16, 0]
    values = code[codes.long()]
    if scales is None and qw.double_quantized:  # the same fp32 arithmetic as nf4_absmax, for these blocks only
        code8 = _code8(qw)[qw.absmax_q[blk].long()]
        return values * (code8 * qw.absmax_scale[blk // qw.scaler_block] + qw.absmax_offset)
    return values * (qw.scale if scales is None else scales)[blk]
