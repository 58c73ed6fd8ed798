"""Recurrent models in a loader of many sequence lengths: a step whose trace unrolls a loop over the
sequence (``nn.LSTM`` decomposed, a hand-written recurrence) is specialized to its length, so
another length gets a trace of its own (before, the symbolic trace's guards left that
specialization out and the trace of one length ran on another: a shape error inside the step)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.runtime._planned import planned


class Unrolled(nn.Module):
    """An Elman recurrence written as a Python loop over the tokens, with an MLP before it."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.pre = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.w, self.u = nn.Linear(width, width), nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.pre(x)
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.w(x[:, t]) + self.u(h))
        return self.head(h)


class Lstm(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.pre = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        out, _ = self.rnn(x + self.pre(x))
        return self.head(out[:, -1])


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0]) % 4)


@pytest.mark.parametrize("kind, exact", [(Unrolled, True), (Lstm, False)], ids=["loop", "lstm"])
def test_a_loader_of_shorter_sequences_gets_a_trace_per_length_and_plain_torchs_gradients(kind, exact):
    torch.manual_seed(0)
    model = kind()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    optimized = planned(model, (torch.randint(0, 50, (4, 12), generator=gen),), 0.3, method="full",
                        loss_fn=lambda out, inputs: _loss(out))
    for seq in (12, 8, 12, 5):
        ids = torch.randint(0, 50, (4, seq), generator=gen)
        loss, ref_loss = _loss(optimized(ids)), _loss(reference(ids))
        loss.backward(), ref_loss.backward()
        for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
            if exact:
                assert torch.equal(p.grad, q.grad), (seq, name)
            else:  # nn.LSTM's fused cell eagerly, its decomposition in the traced step
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=f"{seq} {name}")
            p.grad, q.grad = None, None
    assert optimized.runtime.traces_made == 3 and not optimized.replans  # 12, 8 and 5: one trace each


def test_more_lengths_than_traces_kept_says_so_once(caplog):
    import logging

    torch.manual_seed(0)
    optimized = planned(Unrolled(), (torch.randint(0, 50, (4, 12)),), 0.3, method="full",
                        loss_fn=lambda out, inputs: _loss(out))
    optimized.runtime.max_traces = 2
    with caplog.at_level(logging.WARNING, logger="memopt"):
        for seq in (12, 8, 5, 12, 3):
            _loss(optimized(torch.randint(0, 50, (4, seq)))).backward()
    assert optimized.runtime.traces_made == 5  # 12 was dropped for 5, and traced again
    assert caplog.text.count("more than max_traces=2 traces of Unrolled's step") == 1
