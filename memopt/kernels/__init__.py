"""Triton kernels, each beside its torch reference; the reference runs wherever Triton cannot."""

from memopt.kernels.dequant import dequant_matmul
from memopt.kernels.paca import paca_forward, paca_forward_reference, paca_forward_triton, uses_triton

__all__ = ["dequant_matmul", "paca_forward", "paca_forward_reference", "paca_forward_triton", "uses_triton"]
