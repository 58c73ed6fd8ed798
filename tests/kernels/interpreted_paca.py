"""Run by ``test_paca_kernel.py`` in a subprocess with ``TRITON_INTERPRET=1`` (not collected on its own).

The interpreter must be chosen before triton is imported — triton decorates its own library
functions at import — so these tests cannot share a process with tests that import triton
normally. Shapes are small and tiles 16 wide, so the interpreter takes about a second in all.
"""

from __future__ import annotations

import os

import pytest
import torch

import memopt.passes.paca as paca_pass
from memopt.kernels.paca import Blocks, paca_forward_reference, paca_forward_triton
from memopt.passes.paca import PacaLinear

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_paca_kernel.py"

# Several row and column blocks, a partial last tile, grouped ordering over 2 row blocks.
_SMALL = Blocks(m=16, n=16, k=16, group_m=2, num_warps=1, num_stages=1)


def _inputs(kind: str, dtype: torch.dtype, bias: bool, m: int = 37, k: int = 40, n: int = 24):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn((n, k) if kind == "linear" else (k, n), generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, w, b, torch.tensor([1, 7, 8, 20, 39])  # r = 5: not a power of two


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_reference(kind, bias, dtype):
    x, w, b, idx = _inputs(kind, dtype, bias)
    y, x_idx = paca_forward_triton(x, w, b, idx, kind, blocks=_SMALL)
    y_ref, x_idx_ref = paca_forward_reference(x, w, b, idx, kind)
    assert torch.equal(x_idx, x_idx_ref), "the gathered copy is a copy: bit-exact"
    # fp32: the interpreter sums each 16-wide K tile with numpy, torch in its own order: ~K·eps
    # of Σ|x·w| (K = 40, |x·w| ~ 1). fp16: both accumulate in fp32 and round once to fp16, so
    # they differ by at most an fp16 rounding step of the output (|y| < 32: 2^-6 = 0.016).
    atol = 1e-4 if dtype == torch.float32 else 0.016
    torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)


def test_kernel_reads_strided_inputs_and_can_skip_the_gather():
    x, w, _, idx = _inputs("linear", torch.float32, False)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    y, x_idx = paca_forward_triton(x_t, w, None, idx, "linear", gather=False, blocks=_SMALL)
    assert x_idx is None
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="Triton 3.9's interpreter runs tl.dot on bf16 bit patterns as integers "
                                       "(np.matmul of uint16 data); strict, so a fixed interpreter is noticed")
def test_kernel_matches_the_reference_in_bf16():
    x, w, b, idx = _inputs("linear", torch.bfloat16, True)
    y, _ = paca_forward_triton(x, w, b, idx, "linear", blocks=_SMALL)
    torch.testing.assert_close(y.float(), paca_forward_reference(x, w, b, idx, "linear")[0].float(), rtol=0, atol=0.5)


def test_paca_layer_gives_the_same_outputs_and_grads_through_the_kernel(monkeypatch):
    def make():
        torch.manual_seed(0)
        base = torch.nn.Linear(40, 24).requires_grad_(False)
        return PacaLinear(base, "linear", 40, 24, torch.tensor([3, 9, 27, 33]), scaling=2.0)

    x = torch.randn(3, 7, 40)
    ref_layer, layer = make(), make()
    x_ref, x_ker = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref_layer(x_ref).square().sum().backward()
    kernel = lambda *a, **kw: paca_forward_triton(*a, **kw, blocks=_SMALL)  # noqa: E731
    monkeypatch.setattr(paca_pass, "paca_forward", kernel)
    y = layer(x_ker)
    y.square().sum().backward()
    # Forward as in test_kernel_matches_the_reference (fp32); the gradients inherit that error.
    torch.testing.assert_close(y, ref_layer(x_ref), rtol=0, atol=1e-4)
    torch.testing.assert_close(layer.paca_P.grad, ref_layer.paca_P.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x_ker.grad, x_ref.grad, rtol=1e-4, atol=1e-3)
