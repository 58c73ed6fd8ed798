"""A structural fingerprint of a model: what a Plan's decisions depend on, as one short string.

Parameter and buffer names, shapes, dtypes and trainability, and the type of every submodule, in
order. Values are not included (training changes them; the plan does not depend on them), nor
the device (a plan for a GPU is made on a CPU).
"""

from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["structural_fingerprint"]


def structural_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of ``model``'s structure (see the module docstring)."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"m {name} {type(module).__qualname__}\n".encode())
    for name, p in model.named_parameters(remove_duplicate=False):
        digest.update(f"p {name} {tuple(p.shape)} {p.dtype} {p.requires_grad}\n".encode())
    for name, b in model.named_buffers(remove_duplicate=False):
        digest.update(f"b {name} {tuple(b.shape)} {b.dtype}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]
