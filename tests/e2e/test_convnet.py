"""A convolutional network with BatchNorm, trained in full the way a user trains one: a budget that
recomputes BatchNorm's outputs, the user's own loss, batches of new data, an eval pass between
epochs. The recomputation re-runs BatchNorm on its running statistics as the forward read them,
while the step writes the new statistics into the buffers — compared bit for bit with plain
torch (the same aten ops in the same order)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import memopt
from memopt.memory import MemoryTracker
from tests.e2e._steps import steps_equal_plain_torch
from tests.runtime._planned import planned


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 8, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(images)).mean((2, 3)))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def _planned_resnet() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = SmallResNet()
    reference = copy.deepcopy(model)
    images, labels = _batches(1, seed=1)[0]
    # the smallest feasible budget: the plan re-runs the stem's BatchNorm in backward
    optimized = planned(model, (images,), 0.0, method="full", loss_fn=lambda out, inputs: _loss(out, labels))
    return reference, optimized


def test_a_batchnorm_network_planned_to_recompute_trains_as_plain_torch_does():
    reference, optimized = _planned_resnet()
    plan = optimized.plan
    assert any("batch_norm" in op for t in plan.tensors if t.action == "recompute" for op in t.closure), \
        "the plan must re-run a BatchNorm for this test to mean anything"
    assert any(n.startswith("7 convolutions (Conv2d: stem.0, blocks.0.conv1, blocks.0.conv2, ...) left alone: "
                            "not Linear layers") for n in plan.notes), plan.notes

    opts = optimized.make_optimizer(lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for epoch in range(2):
        optimized.train(), reference.train()
        steps_equal_plain_torch(optimized, reference, opts, _batches(3, seed=epoch), _loss)
        for (name, b), c in zip(optimized.model.named_buffers(), reference.buffers()):
            assert torch.equal(b, c), name  # running statistics updated once per step, as plain torch does
        optimized.eval(), reference.eval()
        with torch.no_grad():
            images, _ = _batches(1, seed=9)[0]
            assert torch.equal(optimized(images), reference(images))
    assert not optimized.replans


def test_the_batchnorm_networks_step_measures_at_most_its_plan():
    _, optimized = _planned_resnet()
    opt = optimized.make_optimizer(lr=1e-2)
    (images, labels), *rest = _batches(2)
    _loss(optimized(images), labels).backward()  # the plan is for the steady state: optimizer states exist
    opt.step()
    opt.zero_grad(set_to_none=True)
    images, labels = rest[0]
    with MemoryTracker(optimized, opt, inputs=(images,)) as tracker:
        _loss(optimized(images), labels).backward()
        opt.step()
    assert tracker.report().peak_bytes <= optimized.plan.predicted_peak_bytes <= optimized.plan.usable_bytes


def test_a_compiled_batchnorm_network_gets_plain_torchs_gradients():
    """Inductor would lay a convolution network's activations out channels-last in the forward; the
    backward is compiled for the traced layout, so the forward keeps it (and the backward asserts
    the strides it reads)."""
    torch.manual_seed(0)
    model = SmallResNet(blocks=1)
    reference = copy.deepcopy(model)
    images, labels = _batches(1, seed=1)[0]
    optimized = planned(model, (images,), 0.0, method="full", loss_fn=lambda out, inputs: _loss(out, labels),
                        compile=True)
    loss, ref_loss = _loss(optimized(images), labels), _loss(reference(images), labels)
    loss.backward(), ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)  # Inductor's own kernels, not aten's
    for (name, p), q in zip(optimized.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_trained_batchnorm_network_saves_and_reloads_with_its_running_statistics(tmp_path):
    reference, optimized = _planned_resnet()
    opt = optimized.make_optimizer(lr=1e-2)
    for images, labels in _batches(2):
        _loss(optimized(images), labels).backward()
        opt.step()
        opt.zero_grad()
    optimized.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = memopt.from_pretrained(SmallResNet(), tmp_path)
    for (name, b), c in zip(reloaded.model.named_buffers(), optimized.model.buffers()):
        assert torch.equal(b, c), name  # the running statistics training moved, not the fresh model's
    optimized.eval(), reloaded.eval()
    images, _ = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(images), optimized(images))
