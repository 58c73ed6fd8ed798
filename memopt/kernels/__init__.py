"""Triton kernels, each beside its torch reference; the reference runs wherever Triton cannot."""

from memopt.kernels.paca import paca_forward, paca_forward_reference, paca_forward_triton, uses_triton

__all__ = ["paca_forward", "paca_forward_reference", "paca_forward_triton", "uses_triton"]
