"""Blockwise 8-bit storage of optimizer states (the format of bitsandbytes' 8-bit optimizers).

A state tensor is stored as one uint8 code index per element and one fp32 absmax per block of
``BLOCK`` elements: x ≈ code[q] · absmax(block). The codes are the *dynamic* maps of Dettmers'
8-bit optimizers (a sign, a run of exponent bits ended by an indicator bit, the rest a linear
fraction): ``SIGNED`` for first moments, ``UNSIGNED`` for second moments (non-negative, so the
sign bit buys another fraction bit). ``dynamic_map`` builds them as bitsandbytes'
``create_dynamic_map`` does (tests check the two are equal).
"""

from __future__ import annotations

import functools

import torch

from memopt.kernels.dequant import no_modes

__all__ = ["BLOCK", "dequantize", "dynamic_map", "quantize", "stored_bytes"]

BLOCK = 256


@functools.cache
def _map(signed: bool) -> torch.Tensor:
    with no_modes():  # a plain tensor, whichever mode (a fake-tensor simulation) asks first
        return _build_map(signed)


def _build_map(signed: bool) -> torch.Tensor:
    values: list[float] = []
    exponent_bits, fraction_bits = 7, 7  # 8 bits: a sign (or one more fraction bit) and 7 more
    for i in range(exponent_bits):
        items = 2 ** (i + fraction_bits - exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        magnitude = 10.0 ** (i - exponent_bits + 1)
        values += (magnitude * means).tolist()
        if signed:
            values += (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 code values, sorted (fp32, CPU; a fresh copy)."""
    return _map(signed).clone()


def stored_bytes(numel: int) -> int:
    """Bytes of one state tensor of ``numel`` elements in this format: codes and block absmaxes."""
    return numel + 4 * -(-numel // BLOCK)


def quantize(x: torch.Tensor, signed: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel], absmax fp32 [blocks]) of ``x``; each element to its nearest code value."""
    flat = x.detach().reshape(-1).float()
    blocks = -(-flat.numel() // BLOCK)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK - flat.numel())).view(blocks, BLOCK)
    absmax = padded.abs().amax(dim=1)
    normed = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    code = _map(signed).to(x.device)
    mids = (code[1:] + code[:-1]) / 2
    q = torch.bucketize(normed, mids).to(torch.uint8).view(-1)[: flat.numel()]
    if out is None:
        return q, absmax
    out[0].copy_(q)
    out[1].copy_(absmax)
    return out


def dequantize(q: torch.Tensor, absmax: torch.Tensor, signed: bool, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The fp32 tensor of ``shape`` that ``q`` / ``absmax`` store."""
    code = _map(signed).to(q.device)
    values = code[q.long()]
    blocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, blocks * BLOCK - values.numel())).view(blocks, BLOCK)
    return (values * absmax.unsqueeze(1)).view(-1)[: q.numel()].view(shape)
