"""Run by ``test_dequant_kernel.py`` in a subprocess with ``TRITON_INTERPRET=1`` (not collected on its own).

The interpreter must be chosen before triton is imported (see ``interpreted_paca.py``). Shapes are
small and tiles 16 wide; W's shapes make NF4 blocks span rows and end in a partial block.
"""

from __future__ import annotations

import os

import pytest
import torch

import memopt.passes.quant_format as quant_format
from memopt.kernels.dequant import dequant_matmul_reference, dequant_matmul_triton
from memopt.kernels.paca import Blocks
from memopt.passes.paca import QPacaLinear
from memopt.passes.quant_format import quantize_int8, quantize_nf4
from memopt.passes.quantize import QuantizeConfig, QuantLinear

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_dequant_kernel.py"

# Several row and column blocks, a partial last tile, grouped ordering over 2 row blocks.
_SMALL = Blocks(m=16, n=16, k=16, group_m=2, num_warps=1, num_stages=1)


def _operands(fmt: str, dtype: torch.dtype, transpose: bool, bias: bool, m: int = 37, n: int = 24, k: int = 41):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)  # [out, in] = 984 elements: 15 whole 64-blocks + 24
    qw = quantize_int8(w) if fmt == "int8" else quantize_nf4(w)
    if fmt == "fp4":  # the same codes read through FP4's table, fp32 absmax (a bitsandbytes layout memopt adopts)
        qw = quant_format.QuantizedWeight("fp4", qw.shape, qw.dtype, qw.data, scale=qw.scales())
    a = torch.randn(m, k if transpose else n, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return a, qw, b


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("transpose, bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_reference(fmt, transpose, bias, dtype):
    a, qw, b = _operands(fmt, dtype, transpose, bias)
    args = (a, qw.fmt, qw.data, qw.scales(), qw.shape, qw.block, b, transpose)
    out = dequant_matmul_triton(*args, blocks=_SMALL)
    ref = dequant_matmul_reference(*args)
    # Both dequantize in fp32 and round W once to the compute dtype, bit-identically. fp32: the
    # interpreter sums each 16-wide tile with numpy, torch in its own order: ~K·eps of Σ|a·w|
    # (K <= 41, |a·w| ~ 1). fp16: both accumulate in fp32 and round once, so they differ by at most
    # one fp16 rounding step of the output (|y| < 32: 2^-6 = 0.016).
    atol = 1e-4 if dtype == torch.float32 else 0.016
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_kernel_reads_strided_activations():
    a, qw, _ = _operands("nf4", torch.float32, True, False)
    a_t = a.t().contiguous().t()  # same values, column-major strides
    out = dequant_matmul_triton(a_t, qw.fmt, qw.data, qw.scales(), qw.shape, qw.block, blocks=_SMALL)
    torch.testing.assert_close(out, a @ qw.dequantize().t(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quant_linear_gives_the_same_outputs_and_grads_through_the_kernel(fmt, monkeypatch):
    layer = QuantLinear.from_layer(torch.nn.Linear(41, 24), "linear", QuantizeConfig(format=fmt))
    (y_ref, grad_ref), (y, grad) = _reference_then_kernel(layer, monkeypatch)
    # As test_kernel_matches_the_reference (fp32); grad_x inherits the forward's error through g = 2y.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-3)


def _reference_then_kernel(layer, monkeypatch):
    """(output, grad_x) of ``layer`` on one input through the torch reference, then the kernel."""
    x = torch.randn(3, 7, 41)
    x_ref, x_ker = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref = layer(x_ref)
    y_ref.square().sum().backward()
    kernel = lambda *args, pairs=None: dequant_matmul_triton(*args, blocks=_SMALL)  # noqa: E731 (reads its own table)
    monkeypatch.setattr(quant_format, "dequant_matmul", kernel)
    y = layer(x_ker)
    y.square().sum().backward()
    return (y_ref, x_ref.grad), (y, x_ker.grad)


def test_qpaca_gives_the_same_outputs_and_grads_through_the_kernel(monkeypatch):
    base = QuantLinear.from_layer(torch.nn.Linear(41, 24), "linear", QuantizeConfig())
    layer = QPacaLinear(base, torch.tensor([0, 5, 40]), scaling=2.0)
    with torch.no_grad():
        layer.paca_P.add_(0.1)
    grads_p = []
    layer.paca_P.register_hook(grads_p.append)  # P's gradient of each of the two backward passes
    (y_ref, grad_ref), (y, grad) = _reference_then_kernel(layer, monkeypatch)
    # As test_quant_linear_gives_the_same_outputs_and_grads_through_the_kernel.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads_p[1], grads_p[0], rtol=1e-4, atol=1e-3)
