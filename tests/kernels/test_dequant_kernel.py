"""The fused dequantize-matmul kernel (``memopt.kernels.dequant``) against its torch reference.

The kernel's tests live in ``interpreted_dequant.py`` and run here in a subprocess with
``TRITON_INTERPRET=1`` (Triton's interpreter, CPU tensors, no GPU). Dispatch is tested in-process.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from memopt.kernels.dequant import dequant_matmul, dequant_matmul_reference, simulating, uses_dequant_triton
from memopt.passes.quant_format import quantize_nf4
from tests.kernels._interpreter import run_interpreted


def test_kernel_matches_the_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_interpreted("interpreted_dequant.py")
    assert "22 passed" in stdout, stdout[-2000:]


def test_dispatch_picks_triton_for_cuda_tensors_and_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(0)
    qw = quantize_nf4(torch.randn(24, 40, generator=gen))
    x = torch.randn(5, 40, generator=gen)
    assert not uses_dequant_triton(x)
    args = (qw.fmt, qw.data, qw.scales(), qw.shape, qw.block)
    assert torch.equal(dequant_matmul(x, *args), dequant_matmul_reference(x, *args))
    with FakeTensorMode():  # fake CUDA tensors need no GPU
        x_cuda = torch.empty(4, 8, device="cuda")
        assert uses_dequant_triton(x_cuda) and uses_dequant_triton(x_cuda.half())
        assert not uses_dequant_triton(x_cuda.double())  # no fp64 tiles


def test_a_simulated_cuda_step_sees_one_fused_op_with_the_gemm_s_flops():
    # Planning for CUDA on fake CPU tensors: the fused kernel's op (its fake allocates only the
    # output), not the CPU reference's chunked dequantization, with FLOPs for the cost model.
    qw = quantize_nf4(torch.randn(96, 128))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        a = mode.from_tensor(torch.randn(4, 128))
        with simulating("cuda"), FlopCounterMode(display=False) as flops:
            y = dequant_matmul(a, "nf4", qw.data, qw.scales(), qw.shape, qw.block)
    assert y.shape == (4, 96) and flops.get_total_flops() == 2 * 4 * 96 * 128
    assert "memopt.dequant_matmul" in str(flops.get_flop_counts())


def test_a_table_first_built_inside_a_functional_trace_is_a_plain_tensor_afterwards():
    # The code tables are cached per device; whichever mode asks first (an AOTAutograd trace
    # functionalizes) must not leave a FunctionalTensor in the cache for later real runs.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    from memopt.kernels import dequant

    dequant._real_pair_table.cache_clear()
    dequant._real_table.cache_clear()
    with FunctionalTensorMode():
        dequant._pair_table("fp4", torch.device("cpu"))
    table = dequant._pair_table("fp4", torch.device("cpu"))
    assert type(table) is torch.Tensor
    assert torch.equal(table[0x12], torch.tensor([dequant.FP4_CODE[1], dequant.FP4_CODE[2]]))
