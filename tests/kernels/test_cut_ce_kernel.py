"""Cut cross-entropy: the chunked op against the unfused loss, the Triton kernels (under
``TRITON_INTERPRET=1``, in a subprocess) against the torch reference, and what a simulated CUDA
step traces."""

from __future__ import annotations

import pytest
import torch

from memopt.kernels.cut_ce import (
    chunks_for,
    cut_ce_rows,
    cut_ce_rows_grad,
    cut_cross_entropy,
    cut_cross_entropy_reference,
)
from memopt.kernels.dequant import simulating
from tests.kernels._interpreter import run_interpreted


def _operands(dtype: torch.dtype, tokens: int = 37, hidden: int = 16, vocab: int = 101):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / 4).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=gen)
    t[3] = t[10] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunks", [1, 3, 37])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_loss_and_gradients_equal_the_unfused_loss(dtype, tol, chunks):
    h, w, t = _operands(dtype)
    ref = _loss_and_grads(cut_cross_entropy_reference, h, w, t)
    cut = _loss_and_grads(lambda *a: cut_cross_entropy(*a, chunks=chunks), h, w, t)
    assert cut[0].dtype == torch.float32
    torch.testing.assert_close(cut[0], ref[0], rtol=1e-6 if dtype == torch.float32 else 1e-4, atol=0)
    for got, want in zip(cut[1:], ref[1:]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


def test_ignored_rows_give_no_gradient_and_nan_logits_there_do_not_leak():
    h, w, t = _operands(torch.float32)
    with torch.no_grad():
        h[3] = float("nan")  # row 3 is ignored: the unfused loss ignores it, so does the fused one
    loss, gh, _ = _loss_and_grads(lambda *a: cut_cross_entropy(*a, chunks=4), h, w, t)
    assert torch.isfinite(loss)
    assert torch.isnan(gh[3]).all() or (gh[3] == 0).all()
    assert torch.isfinite(gh[torch.arange(37) != 3]).all()


def test_a_frozen_head_gets_no_gradient_and_costs_none():
    h, w, t = _operands(torch.float32)
    w.requires_grad_(False)
    cut_cross_entropy(h, w, t, chunks=2).backward()
    assert w.grad is None and h.grad is not None


def test_bad_input_is_refused():
    h, w, t = _operands(torch.float32)
    with pytest.raises(ValueError, match="targets"):
        cut_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="tokens, hidden"):
        cut_cross_entropy(h, w.t(), t)
    t[0] = 101  # outside the vocabulary, not ignore_index
    with pytest.raises(RuntimeError, match="outside"):
        cut_cross_entropy(h, w, t)


def test_pieces_bound_the_logits_held_at_once():
    assert chunks_for(16, 100) == 8  # at least 8 pieces, so short sequences are cut too
    assert chunks_for(3, 100) == 3  # never more pieces than tokens
    assert chunks_for(32768, 32000) == 63  # 2**24 logits a piece
    # a head that trains: pieces of at least hidden / 2 rows (each adds the head's fp32 gradient)
    assert chunks_for(8192, 128256) == 63 and chunks_for(8192, 128256, trained_hidden=4096) == 4
    assert chunks_for(2048, 32000, trained_hidden=512) == 8 and chunks_for(100, 50, trained_hidden=4096) == 1
    assert chunks_for(524288, 128256) == 256  # at most 256 pieces


def test_a_simulated_cuda_step_traces_one_op_per_row_part():
    """Planning a GPU step sees the kernels as the GPU runs them: one op each, allocating only its outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    h, w, t = _operands(torch.bfloat16)
    h, w = h.detach(), w.detach()

    def rows(h, w, t):
        logits = h @ w.t()
        lse, picked = cut_ce_rows(logits, t, -100)
        return cut_ce_rows_grad(logits, t, lse, torch.ones_like(lse), -100)

    with simulating("cuda"), FakeTensorMode(allow_non_fake_inputs=True):
        graph = make_fx(rows)(h, w, t).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert "memopt.cut_ce_rows.default" in targets and "memopt.cut_ce_rows_grad.default" in targets
    assert not any(x.startswith(("aten.logsumexp", "aten.exp")) for x in targets)
    with FakeTensorMode(allow_non_fake_inputs=True):  # a CPU target traces the reference's own ops
        cpu = [str(n.target) for n in make_fx(rows)(h, w, t).graph.nodes if n.op == "call_function"]
    assert "aten.logsumexp.default" in cpu and not any(x.startswith("memopt.") for x in cpu)


def test_triton_kernels_match_the_reference_under_the_interpreter():
    run_interpreted("interpreted_cut_ce.py")


def test_a_target_outside_the_vocabulary_is_an_error_and_never_another_number(monkeypatch):
    """Called on real tensors the op says which target is wrong; a traced step holds the assert where
    torch's partitioner accepts it (2.13 on: ``tests/passes/test_cut_ce.py`` sees it raise in a
    lowered step), and before that its loss is NaN."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.kernels import cut_ce

    h, w, t = _operands(torch.float32)
    t[0] = w.shape[0]
    with pytest.raises(RuntimeError, match=r"outside \[0, 101\) and is not ignore_index=-100"):
        cut_cross_entropy(h, w, t)
    assert cut_ce._ASSERTS_TRACE == (tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 13))
    monkeypatch.setattr(cut_ce, "_ASSERTS_TRACE", False)  # as on an older torch
    graph = make_fx(lambda a, b, c: cut_cross_entropy(a, b, c), tracing_mode="fake")(h.detach(), w.detach(), t)
    assert not any("assert" in str(n.target) for n in graph.graph.nodes)
    assert graph(h.detach(), w.detach(), t).isnan()
