"""Simulate one training step on a target device without allocating its memory.

``simulate_step`` runs forward, loss, backward and an optimizer step under ``FakeTensorMode`` and
measures it with ``MemoryTracker``: shapes, dtypes, storages and lifetimes are real, the bytes are
not. The user's model is neither copied nor modified: every parameter and buffer gets a fake CPU
stand-in of the same shape, stride, dtype and ``requires_grad`` (it does not matter whether the
model lives on ``cpu`` or ``meta``), and the model runs through ``torch.func.functional_call``,
which swaps them in for the call only (tied weights stay tied). Fake *CPU* tensors stand in for the
target because autograd refuses the backward of fake CUDA tensors without a driver; bytes and
lifetimes do not depend on the device, and every storage is counted under the target's label.
Where the model is on a GPU this process has, its stand-ins are fake tensors of that GPU
(``stand_in_device``): the trace then holds the GPU's own kernels (CUDA's attention ops are other
ops than the CPU's), which the runtime, tracing the same step on the GPU, must find by name.

What the simulation reflects of the target:
* CUDA's caching allocator rounds every block up to 512 bytes (``round_to``; 1 for CPU targets).
* The optimizer implementation torch picks on the target: on CUDA (and other foreach devices)
  ``foreach=True`` — whose ``_foreach_sqrt`` of the second moments is a temporary as large as the
  trainable parameters, often the step's peak; on CPU the per-parameter loop. Pass
  ``optimizer_kwargs={"fused": True}`` to simulate the fused kernel instead.
* Attention: on fake CPU tensors ``scaled_dot_product_attention`` picks the CPU flash kernel,
  which, like CUDA's flash / memory-efficient kernels, saves q, k, v, the output and a float32
  logsumexp [B, H, T] — never the [B, H, T, T] score matrix (an explicit mask is saved too, as
  CUDA's memory-efficient kernel does). HF models pass ``is_causal=True`` and native GQA here.

What differs from a real GPU: memory inside a kernel (cuBLAS / attention workspaces), the CUDA
context and allocator fragmentation are not counted (keep a reserve for them); Adam's ``step``
counters, which CUDA keeps on the host unless ``capturable``/``fused``, are counted as device bytes
(one rounded block each); a CUDA-only kernel choice elsewhere (e.g. a fused op saving different
tensors) is not reproduced; parameters that are views of one shared storage are counted per view;
tensors held as plain attributes (not parameters or buffers) are not counted.

The step: ``loss = loss_of(model(*args, **kwargs))``; the output is dropped before backward (as HF
``Trainer`` does); ``loss.backward()``; ``optimizer.step()``; ``optimizer.zero_grad()``. With
``steady_state`` the optimizer state exists before the step starts, as in every step after the
first — the peak a training loop actually reaches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves, tree_map_only

from memopt.errors import MemoptError, UnsupportedModelError
from memopt.memory import hf_masks
from memopt.memory.hf_masks import eager_masks
from memopt.memory.inputs import normalize_inputs
from memopt.memory.report import MemoryReport
from memopt.memory.tracker import MemoryTracker

__all__ = ["ADAMW", "LossFn", "OptimizerFactory", "fake_inputs", "fake_like", "loss_of", "normalize_inputs",
           "simulate_step", "torch_optimizer"]

_log = logging.getLogger("memopt")

# CUDA's caching allocator hands out blocks in multiples of 512 bytes.
_CUDA_BLOCK_BYTES = 512

LossFn = Callable[[Any, tuple[tuple[Any, ...], dict[str, Any]]], torch.Tensor]
OptimizerFactory = Callable[[list[torch.Tensor], str, Mapping[str, Any]], "torch.optim.Optimizer | None"]
"""How the simulation builds the optimizer it counts: ``factory(params, device, options)``; the
registry of named ones is ``memopt.optim``. ``None`` instead of a factory: no optimizer step."""


def _uses_foreach(device: str) -> bool:
    """torch's own default on ``device``: foreach kernels where they exist, else a per-tensor loop."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    return torch.device(device).type in _get_foreach_kernels_supported_devices()


def torch_optimizer(cls: type[torch.optim.Optimizer], name: str | None = None, **defaults: Any) -> OptimizerFactory:
    """A factory for ``cls`` as torch builds it on the target device: ``foreach`` where the device has
    foreach kernels (CUDA), else the per-tensor loop, unless ``foreach`` / ``fused`` is given."""
    def make(params: list[torch.Tensor], device: str, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
        impl = {} if "foreach" in kwargs or "fused" in kwargs else {"foreach": _uses_foreach(device)}
        return cls(params, **{**defaults, **impl, **kwargs})

    make.__name__ = name or cls.__name__.lower()
    return make


ADAMW: OptimizerFactory = torch_optimizer(torch.optim.AdamW, "adamw")  # the default a simulation counts


def simulate_step(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = ADAMW,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    device: str = "cuda",
    round_to: int | None = None,
    steady_state: bool = True,
) -> MemoryReport:
    """Measure one training step of ``model`` on ``device`` under fake tensors.

    Requires: ``model(*args, **kwargs)`` runs on CPU tensors (its parameters may be on ``meta``).
    Ensures: ``model`` is unchanged (same parameter objects and values, no ``.grad``); the report's
    breakdown is exact in bytes for what the module docstring says is simulated.
    ``example_inputs``: see ``normalize_inputs``. ``loss_fn(output, (args, kwargs))`` if given; else
    the output's ``loss`` (HF models given ``labels``); else the output if it is a scalar tensor.
    """
    start = time.perf_counter()
    try:
        report = _simulate(model, example_inputs, loss_fn, optimizer, optimizer_kwargs, device, round_to, steady_state,
                           exporting=False)
    except MemoptError:
        raise
    except Exception as first:  # noqa: BLE001 - a path fake tensors cannot run: try the one torch.export takes
        # Models ask torch.compiler.is_exporting() first and take a value-free, traceable branch
        # (HF: an explicit causal mask; MoE experts through a custom op), as the joint trace does.
        try:
            report = _simulate(model, example_inputs, loss_fn, optimizer, optimizer_kwargs, device, round_to,
                               steady_state, exporting=True)
        except MemoptError:
            raise
        except Exception as second:  # noqa: BLE001 - the first failure is the one to tell
            if isinstance(first, (DataDependentOutputException, DynamicOutputShapeException)):
                raise UnsupportedModelError(_reads_values(model, first, example_inputs)) from first
            if type(second) is type(first) and str(second) == str(first):
                raise first from None  # not the branch: the call itself (an argument the error names)
            raise UnsupportedModelError(_not_simulated(model, first, second)) from first
    _log.debug("simulated one step on %s in %.1f s: %s", device, time.perf_counter() - start, report.summary())
    return report


def _reads_values(model: nn.Module, error: Exception, example_inputs: Any) -> str:
    """Why a step that reads tensor values in Python cannot be planned, and the ways out."""
    labels = "labels" in normalize_inputs(example_inputs)[1]
    return (f"{type(model).__name__}'s training step computes a Python number or a shape from tensor values "
            f"({getattr(error, 'func', error)}: .item(), .tolist(), int(t), nonzero or boolean indexing), which memopt "
            "cannot plan: it measures and traces the step on fake tensors, which carry no values. Ways out: compute "
            "it with tensor ops (keep a scale a tensor instead of .item(); torch.where or a mask instead of indexing)"
            + ("; if it is the model's own loss reading the labels, leave labels out of example_inputs and pass "
               "loss_fn=lambda output, inputs: <your loss of output and the labels>" if labels else ""))


def _not_simulated(model: nn.Module, first: Exception, second: Exception) -> str:
    """Why a step could not run on fake tensors, on either branch, and the way out."""
    def said(error: Exception) -> str:
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"

    hint = ("an op of the step refuses these inputs on the target device; ")
    if "BF16" in str(first) or "bfloat16" in str(first):
        hint = ("an op of the step takes only bfloat16 inputs (mixture-of-experts layers through "
                "torch._grouped_mm): load the model in bfloat16, or set its experts implementation to one "
                "that takes any dtype (config._experts_implementation = 'batched_mm'); ")
    return (f"memopt could not simulate a training step of {type(model).__name__} on fake tensors: {said(first)} "
            f"(on export's branch too: {said(second)}). {hint[0].upper()}{hint[1:]}does the model train as it "
            "is, in plain PyTorch, with these inputs?")


def _simulate(model: nn.Module, example_inputs: Any, loss_fn: LossFn | None, optimizer: OptimizerFactory | None,
              optimizer_kwargs: Mapping[str, Any] | None, device: str, round_to: int | None, steady_state: bool,
              *, exporting: bool) -> MemoryReport:
    from torch._export.utils import _compiling_state_context

    args, kwargs = normalize_inputs(example_inputs)
    # What the fakes stand in for: a loss_fn may close over them (its labels are an input already).
    real = [*model.parameters(), *model.buffers(),
            *(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))]
    unpadded = hf_masks.unpadded(model, args, kwargs)  # an all-ones mask is read before its values are faked
    rounding = _default_round_to(device) if round_to is None else round_to
    state = _compiling_state_context() if exporting else contextlib.nullcontext()
    with state, FakeTensorMode(allow_non_fake_inputs=True):
        # Stand-ins first, outside the tracker: they exist before the step, like the real weights.
        params = {name: fake_like(p) for name, p in model.named_parameters()}
        buffers = {name: fake_like(b) for name, b in model.named_buffers()}
        args, kwargs = fake_inputs((args, kwargs))
        trainable = _trainable(params)
        opt = _optimizer(optimizer, trainable, device, optimizer_kwargs)
        if steady_state and opt is not None:
            _materialize_state(opt, trainable)
        tracker = MemoryTracker(
            optimizer=opt,
            inputs=(args, kwargs),
            parameters=params.values(),
            buffers=buffers.values(),
            round_to=rounding,
            device_label=device,
            stand_ins_for=real,
        )
        with tracker:
            _train_step(model, {**params, **buffers}, args, kwargs, loss_fn, opt, unpadded)
    return tracker.report(device)


def _optimizer(factory: OptimizerFactory | None, params: list[torch.Tensor], device: str,
               kwargs: Mapping[str, Any] | None) -> torch.optim.Optimizer | None:
    if factory is None:
        if kwargs:
            raise MemoptError(f"optimizer=None (no optimizer step) takes no optimizer_kwargs, got {sorted(kwargs)}")
        return None
    if not callable(factory):
        raise TypeError(f"optimizer must be a factory (memopt.optim.factory('adamw')) or None, got {factory!r}")
    return factory(params, device, kwargs or {})


def _trainable(params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    trainable = [p for p in params.values() if p.requires_grad]
    if not trainable:
        raise MemoptError(
            "no parameter of the model requires grad, so there is no training step to simulate: "
            "unfreeze some parameters (requires_grad=True) or apply a pass that adds trainable ones"
        )
    return trainable


def _default_round_to(device: str) -> int:
    return _CUDA_BLOCK_BYTES if torch.device(device).type == "cuda" else 1


def stand_in_device(t: torch.Tensor) -> str:
    """Where a fake stand-in of ``t`` lives: on the GPU ``t`` is on when this process has one — the
    trace then holds the kernels the GPU runs (its attention kernels are other ops than the CPU's,
    and a plan names ops), as the runtime's trace of the same step on the GPU will — else the CPU,
    standing in for the target device."""
    return str(t.device) if t.device.type == "cuda" and torch.cuda.is_available() else "cpu"


def fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake tensor with ``t``'s layout and ``requires_grad`` on its stand-in device
    (``stand_in_device``; call inside FakeTensorMode)."""
    if is_traceable_wrapper_subclass(t) and t.device.type != "meta":
        from torch._guards import active_fake_mode

        mode = active_fake_mode()
        assert mode is not None, "fake_like runs inside FakeTensorMode"
        return mode.from_tensor(t)
    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=stand_in_device(t))
    return fake.requires_grad_(t.requires_grad)


def fake_inputs(tree: Any) -> Any:
    """Fake copies of the input tensors in ``tree`` (on their ``stand_in_device``), sharing storages
    where the inputs do.

    ``labels`` given as the same tensor as ``input_ids``, or as a view of it, is counted once, as
    in a real run. Inputs that require grad or are wrapper subclasses get storages of their own.
    """
    bases: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad or is_traceable_wrapper_subclass(t):
            return fake_like(t)
        st = t.untyped_storage()
        base = bases.get((id(st), t.dtype))
        if base is None:
            base = bases[(id(st), t.dtype)] = torch.empty(st.nbytes() // t.element_size(), dtype=t.dtype,
                                                          device=stand_in_device(t))
        return base.as_strided(t.shape, t.stride(), t.storage_offset())

    return tree_map_only(torch.Tensor, fake, tree)


def _materialize_state(opt: torch.optim.Optimizer, trainable: list[torch.Tensor]) -> None:
    """Create the optimizer state a training loop has after its first step (values don't matter)."""
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_step(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_fn: LossFn | None,
    opt: torch.optim.Optimizer | None,
    unpadded: bool | None = None,
) -> None:
    # The output dies with this call's frame before backward, as in HF Trainer's compute_loss.
    with eager_masks(model, args, kwargs, unpadded):
        loss = loss_of(torch.func.functional_call(model, state, args, kwargs), args, kwargs, loss_fn)
    # Into the stand-ins only: a loss_fn closing over a real parameter (a penalty on a weight) would
    # leave a fake gradient in that parameter's .grad.
    loss.backward(inputs=[t for t in (*state.values(), *tree_leaves((args, kwargs)))
                          if isinstance(t, torch.Tensor) and t.requires_grad])
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def loss_of(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any], loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        try:
            loss = loss_fn(output, (args, kwargs))
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            raise MemoptError(
                f"loss_fn computes a shape or value from the data ({exc.func}: boolean indexing, nonzero, .item()), "
                "which the simulated step on fake tensors cannot do; write it with masks, e.g. "
                "cross_entropy(logits, labels.masked_fill(~mask, -100), ignore_index=-100)") from exc
    else:
        loss = _builtin_loss(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise MemoptError(f"the loss must be a one-element tensor, got {_describe(loss)}; check loss_fn")
    if not loss.requires_grad:
        raise MemoptError(
            "the loss does not require grad: no trainable parameter feeds it. Unfreeze some "
            "parameters (requires_grad=True) or check loss_fn"
        )
    return loss


def _builtin_loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if loss is None:
        raise MemoptError(
            f"cannot find a loss in the model's output ({_describe(output)}): pass loss_fn="
            "lambda output, inputs: ... or, for a HF model, put labels in example_inputs"
        )
    return loss


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
