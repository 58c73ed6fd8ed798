"""simulate_step: a fake-tensor training step that measures what a real one would, byte for byte."""

import pytest
import torch
from torch import nn

from memopt.errors import MemoptError
from memopt.memory import MemoryReport, MemoryTracker, simulate_step
from memopt.optim import factory as optim_factory
from tests.memory._tiny import REFEREE_MODELS, call, lm_batch, loss_of, tiny_gpt2, tiny_llama

F32 = 4


def _real_step(model: nn.Module, batch) -> MemoryReport:
    """The step simulate_step models, run for real on CPU: state exists (steady state), output
    dropped before backward, AdamW with torch's CPU default (per-parameter loop)."""
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    with MemoryTracker(model, opt, inputs=batch) as tracker:
        loss = loss_of(call(model, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        del loss
    return tracker.report()


@pytest.mark.parametrize("name", sorted(REFEREE_MODELS))
def test_simulated_step_equals_the_real_run_to_the_byte(name):
    torch.manual_seed(0)
    make_model, make_batch = REFEREE_MODELS[name]
    model, batch = make_model(), make_batch()
    simulated = simulate_step(model, batch, device="cpu")
    real = _real_step(model, batch)
    assert simulated == real


def test_the_model_is_left_untouched():
    torch.manual_seed(0)
    model, batch = tiny_llama(), lm_batch()
    before = {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    simulate_step(model, batch)
    for name, p in model.named_parameters():
        obj, value, requires_grad = before[name]
        assert p is obj and torch.equal(p, value) and p.requires_grad == requires_grad and p.grad is None
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert not model._forward_pre_hooks


def test_a_meta_model_simulates_without_memory_and_stays_on_meta():
    with torch.device("meta"):
        model = tiny_llama()
    report = simulate_step(model, lm_batch(device="meta"), device="cuda")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert report.device == "cuda" and report.peak_bytes > 0


def test_tied_weights_are_one_parameter_and_one_gradient():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = sum(p.numel() * F32 for p in model.parameters())  # parameters() deduplicates
    report = simulate_step(model, lm_batch(), device="cpu", optimizer=None)  # grads live at exit
    assert report.final.parameters == unique
    assert report.final.gradients == unique


def test_cuda_target_rounds_to_512_and_uses_foreach_adamw():
    model = tiny_llama()
    blocks = [-(-p.numel() * F32 // 512) * 512 for p in model.parameters()]
    report = simulate_step(model, lm_batch(), device="cuda")
    assert report.peak.parameters == sum(blocks)
    assert report.peak.optimizer == 2 * sum(blocks) + 512 * len(blocks)  # moments + step counters
    # foreach AdamW's sqrt of all second moments is one parameter-sized temporary (+ the loss).
    assert (report.peak_phase, report.peak.temporaries) == ("optimizer", sum(blocks) + 512)
    fused = simulate_step(model, lm_batch(), device="cuda", optimizer_kwargs={"fused": True})
    # The fused kernel needs no such temporary: its optimizer phase is exactly that much lower.
    assert report.phase_peaks["optimizer"] - fused.phase_peaks["optimizer"] == sum(blocks)


@pytest.mark.parametrize(
    "name, state_per_param",
    [("adamw", 2), ("adam", 2), ("sgd", 0), ("sgd-momentum", 1), ("none", 0)],
)
def test_optimizer_state_per_registry_entry(name, state_per_param):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
    params = list(model.parameters())
    report = simulate_step(model, (torch.randn(4, 16),), loss_fn=lambda out, _: out.sum(), optimizer=optim_factory(name),
                           device="cpu")
    steps = F32 * len(params) if name.startswith("adam") else 0
    assert report.final.optimizer == state_per_param * sum(p.numel() * F32 for p in params) + steps
    assert ("optimizer" in report.phase_peaks) == (name != "none")


def test_frozen_parameters_get_no_gradients_or_state():
    model = tiny_llama()
    model.requires_grad_(False)
    head = model.lm_head.weight.requires_grad_(True)
    no_step = simulate_step(model, lm_batch(), device="cpu", optimizer=None)  # grads live at exit
    assert no_step.final.gradients == head.numel() * F32
    momentum = simulate_step(model, lm_batch(), device="cpu", optimizer=optim_factory("sgd-momentum"))
    assert momentum.final.optimizer == head.numel() * F32


def test_first_step_has_no_state_before_the_optimizer_runs():
    model = tiny_llama()
    first = simulate_step(model, lm_batch(), device="cpu", steady_state=False)
    steady = simulate_step(model, lm_batch(), device="cpu")
    assert first.phase_peaks["backward"] < steady.phase_peaks["backward"]
    assert first.final == steady.final


def test_loss_fn_receives_the_output_and_the_fake_inputs():
    seen = {}

    def loss_fn(output, inputs):
        seen["inputs"] = inputs
        return output.square().mean()

    simulate_step(nn.Linear(8, 8), ((torch.randn(2, 8),), {}), loss_fn=loss_fn, device="cpu")
    (x,), kwargs = seen["inputs"]
    assert x.shape == (2, 8) and kwargs == {}


def test_labels_sharing_input_storage_are_counted_once():
    model = tiny_llama()
    ids = lm_batch()["input_ids"]
    shared = simulate_step(model, {"input_ids": ids, "labels": ids}, device="cpu")
    assert shared.peak.inputs == ids.numel() * 8


def test_a_missing_loss_says_how_to_provide_one():
    with pytest.raises(MemoptError, match="loss_fn"):
        simulate_step(nn.Linear(8, 8), (torch.randn(2, 8),), device="cpu")


def test_an_optimizer_is_a_factory_or_none():
    with pytest.raises(TypeError, match="factory"):
        simulate_step(nn.Linear(8, 8), (torch.randn(2, 8),), optimizer="lion")
    with pytest.raises(MemoptError, match="no optimizer_kwargs"):
        simulate_step(nn.Linear(8, 8), (torch.randn(2, 8),), optimizer=None, optimizer_kwargs={"lr": 1.0})


def test_a_fully_frozen_model_is_an_error_that_says_what_to_unfreeze():
    model = nn.Linear(8, 8).requires_grad_(False)
    with pytest.raises(MemoptError, match="requires_grad"):
        simulate_step(model, (torch.randn(2, 8),), loss_fn=lambda out, _: out.sum())


def test_stand_ins_live_on_the_gpu_the_model_is_on_only_where_this_process_has_one(monkeypatch):
    """A plan must name the kernels the runtime's trace will hold: on a GPU, the GPU's (its attention
    ops are other ops than the CPU's); without one, fake CPU tensors stand in for the target."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memopt.memory.simulate import fake_like, stand_in_device

    with FakeTensorMode():
        on_gpu = torch.empty(4, 3, device="cuda")
        assert on_gpu.device.type == "cuda"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert stand_in_device(on_gpu) == "cpu" and fake_like(on_gpu).device.type == "cpu"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert stand_in_device(on_gpu) == str(on_gpu.device) and fake_like(on_gpu).device == on_gpu.device
        assert fake_like(on_gpu).shape == (4, 3)
    for t in (torch.empty(2), torch.empty(2, device="meta")):
        assert stand_in_device(t) == "cpu"
