"""MemoryTracker on handcrafted cases whose exact bytes are known, and on what must not break."""

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import return_and_correct_aliasing

from memopt.errors import MemoptError
from memopt.memory import MemoryBreakdown, MemoryTracker
from tests.memory._tiny import lm_batch, tiny_llama

F32 = 4


def test_linear_adamw_step_has_the_exact_breakdown_at_its_peak():
    # W [128, 256] fp32; x [4, 256]; loss = (x @ W.T).sum(); AdamW per-parameter loop.
    # Peak: the division in `denom = (exp_avg_sq.sqrt() / bc2).add_(eps)`, two W-sized temporaries.
    # Gradient and moments are born as temporaries and relabelled after the peak was recorded.
    w_bytes, x_bytes, step_bytes, loss_bytes = 128 * 256 * F32, 4 * 256 * F32, F32, F32
    model = nn.Linear(256, 128, bias=False)
    x = torch.randn(4, 256)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    with MemoryTracker(model, opt, inputs=x) as tracker:
        loss = model(x).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        del loss
    r = tracker.report()
    assert r.peak == MemoryBreakdown(
        parameters=w_bytes, gradients=w_bytes, optimizer=2 * w_bytes + step_bytes,
        temporaries=2 * w_bytes + loss_bytes, inputs=x_bytes,
    )
    assert (r.peak_bytes, r.peak_phase) == (r.peak.total, "optimizer")
    assert r.final == MemoryBreakdown(parameters=w_bytes, optimizer=2 * w_bytes + step_bytes, inputs=x_bytes)


def test_saved_tensors_are_activations_and_new_grads_count_at_the_backward_peak():
    # h = x @ W.T is not saved (mm saves x, an input); relu saves its output r.
    w_bytes, x_bytes, h_bytes = 512 * 256 * F32, 64 * 256 * F32, 64 * 512 * F32
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.ReLU())
    x = torch.randn(64, 256)
    with MemoryTracker(model, inputs=x) as tracker:
        loss = model(x).sum()
        after_forward = tracker.live()
        loss.backward()
        del loss
    assert after_forward == MemoryBreakdown(parameters=w_bytes, activations=h_bytes, temporaries=F32, inputs=x_bytes)
    r = tracker.report()
    assert r.phase_peaks["forward"] == w_bytes + x_bytes + 2 * h_bytes  # at relu: h and r both alive
    # Backward peak at grad_W = grad_h.T @ x: grad_h, the loss and its seed gradient are alive.
    assert r.peak == MemoryBreakdown(
        parameters=w_bytes, gradients=w_bytes, temporaries=h_bytes + 2 * F32, inputs=x_bytes)
    assert r.peak_phase == "backward"


def test_views_share_their_base_storage_and_are_counted_once():
    with MemoryTracker() as tracker:
        base = torch.empty(64, 64)
        views = [base.t(), base[::2], base.view(-1), base.narrow(0, 1, 3), base.expand(2, 64, 64)]
    assert tracker.report().peak_bytes == 64 * 64 * F32
    del views


def test_frozen_parameters_get_no_gradient_bytes():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    model[0].requires_grad_(False)
    with MemoryTracker(model, inputs=None) as tracker:
        model(torch.randn(8, 32)).sum().backward()
    trainable = sum(p.numel() * F32 for p in model[1].parameters())
    assert tracker.report().final.gradients == trainable


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft vs transformers 5
def test_peft_lora_adapters_are_the_only_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters)
    batch = lm_batch()
    with MemoryTracker(model, opt, inputs=batch) as tracker:
        model(**batch).loss.backward()
        opt.step()
    adapter_bytes = sum(p.numel() * F32 for p in adapters)
    r = tracker.report()
    assert r.final.gradients == adapter_bytes
    assert r.final.optimizer == 2 * adapter_bytes + F32 * len(adapters)  # moments + step counters
    assert r.final.parameters == sum(p.numel() * F32 for p in model.parameters())


def test_the_peak_breakdown_sums_to_the_peak_and_every_phase_is_seen():
    torch.manual_seed(0)
    model, batch = tiny_llama(), lm_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with MemoryTracker(model, opt, inputs=batch) as tracker:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        model(**batch).loss.backward()  # a second forward is "forward" again
    r = tracker.report()
    assert r.peak.total == r.peak_bytes == max(r.phase_peaks.values())
    assert set(r.phase_peaks) == {"forward", "backward", "optimizer", "other"}
    assert r.final.optimizer == sum(p.numel() * F32 for p in model.parameters())  # momentum buffers


def test_round_to_rounds_every_storage_up():
    with MemoryTracker(round_to=512) as tracker:
        a, b = torch.empty(1), torch.empty(129)  # 4 and 516 bytes
    assert tracker.report().peak_bytes == 512 + 1024
    del a, b


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_uint8_and_quantized_storages_count_their_bytes():
    packed = torch.randint(0, 255, (64, 32), dtype=torch.uint8)  # e.g. two 4-bit weights per byte
    with MemoryTracker(buffers=[packed]) as tracker:
        scales = torch.empty(64, dtype=torch.float16)
        q = torch.quantize_per_tensor(torch.randn(10, 10), 0.1, 0, torch.qint8)
    r = tracker.report()
    assert r.peak.buffers == 64 * 32
    assert r.peak.temporaries == 64 * 2 + 10 * 10 * F32 + 10 * 10  # scales, fp32 source, qint8
    del scales, q


class _Pair(torch.Tensor):
    """A minimal traceable wrapper subclass holding two inner tensors (like torch's TwoTensor)."""

    @staticmethod
    def __new__(cls, a, b):
        return torch.Tensor._make_wrapper_subclass(cls, a.shape, dtype=a.dtype, device=a.device)

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __tensor_flatten__(self):
        return ["a", "b"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return _Pair(inner["a"], inner["b"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pick = lambda name: [getattr(x, name) if isinstance(x, _Pair) else x for x in args]  # noqa: E731
        out = _Pair(func(*pick("a"), **kwargs), func(*pick("b"), **kwargs))
        return return_and_correct_aliasing(func, args, kwargs, out)


def test_wrapper_subclass_counts_its_inner_storages_and_the_ops_inside_it():
    pair = _Pair(torch.zeros(100), torch.ones(100))
    with MemoryTracker(inputs=pair) as tracker:
        doubled = pair + pair
        # Like a quantized weight: a float64 temporary made and dropped inside the subclass op.
        squeezed = pair.to(torch.float64).to(torch.float32)
    r = tracker.report()
    assert r.peak.inputs == 2 * 100 * F32
    assert r.peak_bytes == 2 * 100 * F32 * 3 + 2 * 100 * 8  # inputs, doubled, the float64 pair, its cast
    assert r.final.temporaries == 4 * 100 * F32
    del doubled, squeezed


def test_devices_are_reported_separately():
    with MemoryTracker() as tracker:
        a, b = torch.empty(10), torch.empty(20, device="meta")
    assert {d: r.peak_bytes for d, r in tracker.reports().items()} == {"cpu": 40, "meta": 80}
    with pytest.raises(MemoptError, match="several devices"):
        tracker.report()
    del a, b


def test_in_place_modification_of_a_saved_tensor_still_raises():
    x = torch.randn(3, requires_grad=True)
    with MemoryTracker():
        y = x.exp()
        y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_forward_outputs_without_backward_are_freed_not_leaked():
    model = nn.Linear(8, 8)
    with MemoryTracker(model) as tracker:
        out = torch.sigmoid(model(torch.randn(4, 8)))  # sigmoid saves its own output
        alive = weakref.ref(out.untyped_storage())
        del out
        assert alive() is None
        assert tracker.live().activations == 0


def test_torch_func_runs_inside_when_activations_are_not_labelled():
    x = torch.randn(4, requires_grad=True)
    with MemoryTracker(label_activations=False) as tracker:
        grad = torch.func.grad(lambda a: a.exp().sum())(x)
    assert torch.allclose(grad, x.exp())
    assert tracker.report().peak.activations == 0 and tracker.report().peak_bytes > 0


def test_hooks_are_removed_on_exit():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with MemoryTracker(model, opt):
        pass
    assert not model._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_checkpointed_region_is_measured_and_smaller():
    def run(checkpointed: bool) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4)])
        x = torch.randn(128, 64, requires_grad=True)
        with MemoryTracker(model, inputs=x) as tracker:
            h = x
            for block in model:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
            h.sum().backward()
        return tracker.report().phase_peaks["forward"]

    assert run(checkpointed=True) < run(checkpointed=False)


def test_a_tracker_measures_one_region_only():
    tracker = MemoryTracker()
    with tracker, pytest.raises(MemoptError, match="one region"):
        tracker.__enter__()
    with pytest.raises(MemoptError, match="make a new one"), tracker:
        pass


def test_a_real_region_does_not_count_fake_tensors_and_a_simulated_one_does():
    # A step that re-plans traces on fake tensors inside the user's measured region: they allocate
    # nothing, so a tracker of real tensors leaves them out. A tracker entered under a
    # FakeTensorMode measures that simulation and counts them.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(64, 64)
    with MemoryTracker(inputs=x) as real:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with MemoryTracker() as simulated:
                (torch.empty(1024, 1024) * 2).sum()
            w = torch.empty(8, requires_grad=True)
            (w * 2).sum().backward()  # a simulated backward: the real ops after it are still the forward
        y = x * 2
    assert real.report().peak == MemoryBreakdown(inputs=x.numel() * F32, temporaries=y.numel() * F32)
    assert real.report().phase_peaks == {"forward": (x.numel() + y.numel()) * F32}
    assert simulated.report().peak_bytes == 2 * 1024 * 1024 * F32
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(8, 8)
    with MemoryTracker(inputs=fake) as given_fakes:  # fake tensors registered: a simulation too
        fake + 1
    assert given_fakes.report().peak_bytes == 2 * 8 * 8 * F32


def test_a_tensor_made_before_the_region_counts_as_an_input_from_its_first_read():
    # Labels a loss closes over: on the device before the step, not registered. Read by an op, they
    # count once, as an input (before: the saved-tensor hook's detach made them a temporary born
    # in the forward, and a plain read counted nothing).
    model = nn.Linear(16, 4)
    x, labels, other = torch.randn(8, 16), torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,))
    with MemoryTracker(model, inputs=x) as tracker:
        loss = nn.functional.cross_entropy(model(x), labels)  # nll_loss saves the labels for backward
        loss.backward()
        del loss
        other.clone()  # read once, after the backward: counted from here
        made = torch.tensor([0.5])  # made in the region (eager torch.tensor): a temporary, not an input
    r = tracker.report()
    assert r.final.inputs == x.numel() * F32 + 2 * labels.numel() * 8
    assert r.peak.inputs == x.numel() * F32 + labels.numel() * 8  # at the backward's peak, `other` unread yet
    assert r.final.temporaries == made.numel() * F32


def test_a_simulation_does_not_count_the_real_tensors_its_fakes_stand_in_for():
    # A loss_fn that closes over the example input itself (labels = input_ids): the simulation
    # registered a fake of it; the real one the loss reads is the same data, not a second input.
    from torch._subclasses.fake_tensor import FakeTensorMode

    real_x, labels = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(8, 16)
        with MemoryTracker(inputs=x, stand_ins_for=[real_x]) as tracker:
            (x + real_x).sum() + labels.sum()
    assert tracker.report().final.inputs == x.numel() * F32 + labels.numel() * 8
