"""PaCA's fused forward kernel (``memopt.kernels.paca``) against its torch reference.

The kernel's tests live in ``interpreted_paca.py`` and run here in a subprocess with
``TRITON_INTERPRET=1`` (Triton's interpreter, CPU tensors, no GPU), since the interpreter must be
chosen before triton is imported. The dispatch between kernel and reference is tested in-process.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt.kernels.paca import paca_forward, paca_forward_reference, uses_triton
from tests.kernels._interpreter import run_interpreted


def test_kernel_matches_the_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_interpreted("interpreted_paca.py")
    assert "10 passed, 1 xfailed" in stdout, stdout[-2000:]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(37, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)


def test_dispatch_picks_triton_for_cuda_tensors_and_the_reference_on_cpu():
    x, w, b = _inputs()
    idx = torch.tensor([1, 7, 8, 20, 39])
    assert not uses_triton(x, w)
    y, x_idx = paca_forward(x, w, b, idx, "linear")
    assert torch.equal(y, paca_forward_reference(x, w, b, idx, "linear")[0]) and x_idx.shape == (37, 5)
    with FakeTensorMode():  # fake CUDA tensors need no GPU
        x_cuda, w_cuda = torch.empty(4, 8, device="cuda"), torch.empty(3, 8, device="cuda")
        assert uses_triton(x_cuda, w_cuda)
        assert not uses_triton(x_cuda.double(), w_cuda.double())  # no fp64 tiles
