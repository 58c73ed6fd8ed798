"""A model that writes a buffer of its own in forward and reads the new value (a step counter that
scales an activation, an EMA of its inputs), planned to recompute what reads it: the backward reads
the value the forward returned, and training is plain torch's, bit for bit."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import memopt
from memopt.memory import MemoryTracker
from tests.e2e._steps import steps_equal_plain_torch
from tests.runtime._planned import planned


class Counted(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(16))
        self.a, self.b = nn.Linear(16, 4 * width), nn.Linear(4 * width, width)
        self.c, self.d = nn.Linear(width, 4 * width), nn.Linear(4 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            with torch.no_grad():
                self.mean.lerp_(x.mean(0), 0.1)
        h = self.b(F.gelu(self.a(x - self.mean))) * (1 + 0.01 * self.calls)  # both new values read back
        return self.d(F.gelu(self.c(h)))


def test_a_buffer_written_and_read_back_in_forward_trains_as_plain_torch_does(tmp_path):
    torch.manual_seed(0)
    model = Counted()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)) for _ in range(3)]
    labels = batches[0][1]
    optimized = planned(model, (batches[0][0],), 0.3, method="full",
                        loss_fn=lambda out, inputs: F.cross_entropy(out, labels))
    assert any(t.action == "recompute" for t in optimized.plan.tensors)
    assert int(optimized.model.calls) == 0  # planning ran no real step
    opts = optimized.make_optimizer(lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    steps_equal_plain_torch(optimized, reference, opts, batches, F.cross_entropy)
    assert int(optimized.model.calls) == 3
    assert torch.equal(optimized.model.mean, reference.mean)
    assert not optimized.replans
    # What the backward saves of the buffers' new values is counted: the step measures at or below
    # the plan (72 B below: the traced graph is functional, so the plan counts the buffers' new
    # values as tensors of their own, which the step writes in place), and the same
    # network without buffers measures the plan to the byte. (Both measured 440-512 B above when
    # the labels the loss_fn closes over were left out of the plan.)
    assert _over_plan(optimized, batches[0], labels) <= 0
    assert _over_plan(_plain(batches[0][0], labels), batches[0], labels) == 0
    optimized.save_pretrained(tmp_path)  # the buffers as training left them, saved with the weights
    reloaded = memopt.from_pretrained(Counted(), tmp_path, loss_fn=lambda out, inputs: F.cross_entropy(out, labels))
    assert int(reloaded.model.calls) == 5 and torch.equal(reloaded.model.mean, optimized.model.mean)  # (2 more steps)


class _Plain(Counted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(F.gelu(self.c(self.b(F.gelu(self.a(x))))))


def _plain(x: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    return planned(_Plain(), (x,), 0.3, method="full", loss_fn=lambda out, inputs: F.cross_entropy(out, labels))


def _over_plan(optimized, batch, labels) -> int:
    """Bytes a steady training step measures above the plan's prediction."""
    opt = optimized.make_optimizer(lr=1e-2)
    F.cross_entropy(optimized(batch[0]), labels).backward()
    opt.step()
    opt.zero_grad()
    with MemoryTracker(optimized, opt, inputs=(batch[0],)) as tracker:
        F.cross_entropy(optimized(batch[0]), labels).backward()
        opt.step()
    return tracker.report().peak_bytes - optimized.plan.predicted_peak_bytes
