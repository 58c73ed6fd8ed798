"""Run by ``test_cut_ce_kernel.py`` in a subprocess with ``TRITON_INTERPRET=1`` (not collected on its own).

Vocabulary blocks of 16 over 101 entries: several blocks, a partial last one; ignored rows, a row
whose target is in the last block, and large logits (the online max must rescale)."""

from __future__ import annotations

import os

import pytest
import torch

from memopt.kernels.cut_ce import (
    cut_ce_rows_grad_reference,
    cut_ce_rows_grad_triton,
    cut_ce_rows_reference,
    cut_ce_rows_triton,
)

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_cut_ce_kernel.py"


def _rows(dtype: torch.dtype, rows: int = 7, vocab: int = 101):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    logits[1, 90:] += 30  # the row's max sits in the last, partial block
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[2] = -100
    targets[1] = 100
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_match_the_reference(dtype):
    logits, targets = _rows(dtype)
    lse, picked = cut_ce_rows_triton(logits, targets, -100, block_v=16)
    want_lse, want_picked = cut_ce_rows_reference(logits, targets, -100)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(picked, want_picked, rtol=0, atol=0)
    assert picked[2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_rows_match_the_reference(dtype):
    logits, targets = _rows(dtype)
    lse, _ = cut_ce_rows_reference(logits, targets, -100)
    scale = torch.linspace(0.5, 2.0, logits.shape[0])
    scale[2] = 0.0
    got = cut_ce_rows_grad_triton(logits, targets, lse, scale, -100, block_v=16)
    want = cut_ce_rows_grad_reference(logits, targets, lse, scale, -100)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert (got[2] == 0).all()


def test_a_target_outside_the_vocabulary_gives_nan_as_the_reference():
    logits, targets = _rows(torch.float32)
    targets[4], targets[5] = 101, -7  # neither a class nor ignore_index
    lse, picked = cut_ce_rows_triton(logits, targets, -100, block_v=16)
    _, want = cut_ce_rows_reference(logits, targets, -100)
    assert picked[4].isnan() and picked[5].isnan() and want[4].isnan() and want[5].isnan()
    keep = [0, 1, 2, 3, 6]
    torch.testing.assert_close(picked[keep], want[keep], rtol=0, atol=0)
