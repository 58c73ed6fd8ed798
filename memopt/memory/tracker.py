"""Exact live tensor bytes of a region of eager PyTorch, per device and per category.

How it counts (DESIGN.md §8). A ``TorchDispatchMode`` sees the outputs of every aten op; each
untyped storage it has not seen yet is counted once, under a weak reference, until the storage dies.
Storages are keyed by the identity of their ``UntypedStorage`` object: torch keeps that Python
object alive exactly as long as the storage, views return the same object (so a view is never
counted twice), and it works for fake and meta storages, which have no data pointer. Traceable
wrapper subclasses (``__tensor_flatten__``) are counted through their inner tensors, and the ops
they run inside are seen too; a uint8 or quantized storage is just bytes. What exists on
``__enter__`` is registered up front: parameters, buffers, existing ``.grad``, optimizer state and
``inputs``. A storage an op reads that the tracker has not seen, on that op's output device, is
counted from that read, as an INPUT: data made before the region and not registered (labels a loss
closes over), which a GPU's allocator holds from before — so a peak before that first read
measures without it — or a tensor made without an op the mode sees (``torch.from_numpy``; an
unregistered optimizer's state). Otherwise this agrees with torch's ``MemTracker`` to the byte on
full fine-tuning.

Categories. In the forward a new storage is a TEMPORARY until autograd packs it for backward
(``saved_tensors_hooks`` → ACTIVATIONS). Hooks installed inside the region — by user code or
``torch.utils.checkpoint`` — take precedence over ours, so their saved tensors stay temporaries:
accepted, the totals are unaffected. The pack hook stores ``t.detach()`` and ``t._version``, not
``t``: packing an op's own output as itself would make a reference cycle through autograd's C++
graph that leaks it whenever no backward frees the graph; the unpack hook redoes autograd's
in-place-modification check, which any pack hook otherwise disables. torch.func transforms and
code under ``disable_saved_tensors_hooks`` refuse to run while such hooks exist: for them, pass
``label_activations=False`` (saved tensors then stay temporaries; totals are unchanged). In backward a new storage is
a TEMPORARY until it becomes a parameter's ``.grad`` (post-accumulate-grad hook → GRADIENTS). Storages made during
``optimizer.step`` that end up in ``optimizer.state`` become OPTIMIZER at the step post-hook.
Relabelling after the peak keeps the peak breakdown exact (see ``memopt.memory.ledger``).

Phases, without user help: "optimizer" between the optimizer's step pre/post hooks; "backward"
while the autograd engine runs a graph task; "forward" before the first backward (and again from a
forward pre-hook on ``model``); "other" otherwise.

Limits: memory inside one op (a kernel's workspace) and inside compiled (Inductor) code is not
seen; nor are tensors made under ``no_dispatch`` or inside non-traceable wrapper subclasses;
``UntypedStorage.resize_`` called directly is not seen (``Tensor.resize_`` is).

Real or simulated. A tracker entered while a ``FakeTensorMode`` is active, or given fake tensors to
register, measures a simulation and counts fake storages. Any other tracker measures real memory and
does not count fake tensors made inside it: they allocate nothing. An example is a training step that
re-plans, which traces and simulates the step on fake tensors before it runs.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from memopt.errors import MemoptError
from memopt.memory.ledger import Ledger, StorageRecord
from memopt.memory.report import Category, MemoryBreakdown, MemoryReport

__all__ = ["Category", "MemoryBreakdown", "MemoryReport", "MemoryTracker", "not_counted", "storages_of"]

_Entry = tuple[StorageRecord, "weakref.ref[torch.UntypedStorage]"]
_PAUSED = threading.local()
# A parameter's or buffer's storage keeps its category even if an optimizer or hook holds it.
_PROTECTED = frozenset({Category.PARAMETERS, Category.BUFFERS})


def storages_of(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages that hold ``t``'s bytes (inner tensors of wrapper subclasses too)."""
    if is_traceable_wrapper_subclass(t):
        inner_names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in inner_names)
        return [s for x in inner if isinstance(x, torch.Tensor) for s in storages_of(x)]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse / nested / opaque wrappers: no one storage
        return []


def _is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor, through functionalization and wrapper subclasses."""
    try:
        return is_fake(t)
    except AssertionError:  # a wrapper holding fake and real tensors: its real bytes are real
        return False


def _in_fake_mode() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _tensors(tree: Any) -> Iterable[torch.Tensor]:
    if isinstance(tree, torch.Tensor):  # the common case, without pytree overhead
        return (tree,)
    return (x for x in tree_leaves(tree) if isinstance(x, torch.Tensor))


# Eager ``torch.tensor(...)``'s op: what it reads was made just before, by the same call (not an input).
# (A traced graph's ``lift_fresh_copy`` reads a constant the graph holds: an input, counted.)
_FRESH = frozenset({torch.ops.aten.lift_fresh.default})


def _read(inputs: tuple[tuple, dict | None]) -> Iterable[torch.Tensor]:
    """The tensors an op reads: its arguments, and the tensors of argument lists (without pytree's
    overhead on every op)."""
    args, kwargs = inputs
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (x for x in value if isinstance(x, torch.Tensor))


class _CountingMode(TorchDispatchMode):
    """Hands every op's inputs and outputs to the tracker; the mode itself holds no state.

    An op on a traceable wrapper subclass is first left to the subclass (``NotImplemented``), so
    the mode sees the plain ops it runs inside — e.g. the dequantized weight a quantized tensor
    makes for a matmul — and not only the wrapper it returns.
    """

    def __init__(self, on_op: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self._on_op = on_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if not getattr(_PAUSED, "depth", 0):
            self._on_op(((), None) if func in _FRESH else (args, kwargs), out)
        return out


@contextlib.contextmanager
def not_counted() -> Any:
    """Storages made inside are not counted by any tracker: work that allocates nothing on the
    device in a real run but does on the fake tensors of a simulation (tracing a graph). Yields
    ``resume()``, which ends the pause early (e.g. once tracing is done and the step runs)."""
    _PAUSED.depth = getattr(_PAUSED, "depth", 0) + 1
    paused = [True]

    def resume() -> None:
        if paused[0]:
            paused[0] = False
            _PAUSED.depth -= 1

    try:
        yield resume
    finally:
        resume()


def _count_through(hop: Any) -> None:
    """Let ``hop`` (a higher-order op) run under the counting mode: the mode is popped while a
    higher-order op's rule runs, so the rule runs it below the mode and counts its outputs."""

    @hop.py_impl(_CountingMode)
    def _(mode: _CountingMode, *args: Any, **kwargs: Any) -> Any:
        out = hop(*args, **kwargs)
        if not getattr(_PAUSED, "depth", 0):
            mode._on_op((args, kwargs), out)
        return out


# The RNG-replay wrappers torch's partitioner puts around recomputed random ops (memopt.runtime).
_count_through(torch._prims.rng_prims.run_and_save_rng_state)
_count_through(torch._prims.rng_prims.run_with_rng_state)


class MemoryTracker:
    """Context manager measuring live tensor bytes per device, category and phase.

    ``model`` / ``optimizer`` / ``inputs`` are registered on enter (their tensors are counted from
    the start) and hooked for categories and phases; ``parameters`` / ``buffers`` register extra
    tensors as such (e.g. the tensors given to ``torch.func.functional_call``). ``round_to`` rounds
    every storage up to a multiple of that many bytes (512 mirrors CUDA's caching allocator).
    ``device_label``, if given, counts every storage under that one device name (a simulation of
    a target device on fake CPU tensors). ``label_activations=False`` installs no saved-tensor
    hooks (see the module docstring). ``stand_ins_for``: the real tensors that registered fakes
    stand in for (a simulation's model and inputs), which code closing over them may read: not
    counted again. Hooks are removed on exit; the model is not modified.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        inputs: Any = None,
        parameters: Iterable[torch.Tensor] = (),
        buffers: Iterable[torch.Tensor] = (),
        round_to: int = 1,
        device_label: str | None = None,
        label_activations: bool = True,
        stand_ins_for: Iterable[torch.Tensor] = (),
    ) -> None:
        self._model, self._optimizer, self._inputs = model, optimizer, inputs
        self._params = _unique((list(model.parameters()) if model is not None else []) + list(parameters))
        self._buffers = (list(model.buffers()) if model is not None else []) + list(buffers)
        self._ledger = Ledger(round_to)
        self._device_label = device_label
        self._entries: dict[int, _Entry] = {}
        self._handles: list[RemovableHandle] = []
        self._mode: _CountingMode | None = None
        self._label_activations = label_activations
        self._saved_hooks: Any = None
        self._in_optimizer = False
        self._seen_backward = False
        self._used = False
        self._simulated = False  # decided on enter: does this region count fake tensors?
        # The real tensors a simulation's registered fakes stand in for: a read of one counts nothing
        # (their storages held here, so no other storage takes one of their ids meanwhile).
        self._stood_in = {id(st): st for t in stand_ins_for for st in storages_of(t)}

    # ---- context manager -------------------------------------------------------------------

    def __enter__(self) -> "MemoryTracker":
        if self._used:
            raise MemoptError("a MemoryTracker measures one region (it is not re-entrant or reusable): make a new one")
        self._used = True
        self._simulated = _in_fake_mode() or any(_is_fake(t) for t in self._registered_tensors())
        try:
            self._register_existing()
            self._install_hooks()
            if self._label_activations:
                self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
                self._saved_hooks.__enter__()
            self._mode = _CountingMode(self._count_op)
            self._mode.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._ledger.observe(self._phase())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(*exc)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._entries.clear()  # dropping the weakrefs cancels their callbacks: `final` is frozen

    # ---- results ---------------------------------------------------------------------------

    def report(self, device: str | None = None) -> MemoryReport:
        """The report of ``device``; with one device tracked, ``device`` may be left out."""
        devices = self._ledger.devices()
        if device is None:
            if len(devices) > 1:
                raise MemoptError(f"tensors on several devices {devices}: pass report(device=...) or call reports()")
            device = devices[0] if devices else (self._device_label or "cpu")
        if device not in devices:
            if devices:
                raise MemoptError(f"no tensors were tracked on {device!r}; tracked devices: {devices}")
            return MemoryReport(device, 0, MemoryBreakdown(), "other")
        return self._ledger.report(device)

    def reports(self) -> dict[str, MemoryReport]:
        return {d: self._ledger.report(d) for d in self._ledger.devices()}

    def live(self, device: str | None = None) -> MemoryBreakdown:
        """Bytes live now (inside the region) or at exit, on ``device`` (the only one if left out)."""
        return self.report(device).final

    # ---- registration ----------------------------------------------------------------------

    def _registered_tensors(self) -> Iterable[torch.Tensor]:
        yield from self._params
        yield from self._buffers
        yield from _tensors(self._inputs)

    def _register_existing(self) -> None:
        for p in self._params:
            self._register(p, Category.PARAMETERS)
            if p.grad is not None:
                self._register(p.grad, Category.GRADIENTS)
        for b in self._buffers:
            self._register(b, Category.BUFFERS)
        self._register_optimizer_state()
        for t in _tensors(self._inputs):
            self._register(t, Category.INPUTS)

    def _register_optimizer_state(self) -> None:
        if self._optimizer is None:
            return
        for state in self._optimizer.state.values():
            for t in _tensors(list(state.values())):
                self._register(t, Category.OPTIMIZER, relabel=True)

    def _register(self, t: torch.Tensor, category: Category, *, relabel: bool = False) -> None:
        """Count ``t``'s storages under ``category``; already known ones are relabelled if asked."""
        for st in storages_of(t):
            entry = self._entries.get(id(st))
            if entry is None:
                self._track_new(st, t, category)
            elif relabel and entry[0].category not in _PROTECTED:
                self._ledger.relabel(entry[0], category)
            else:
                self._ledger.resize(entry[0], st.nbytes())

    def _track_new(self, st: torch.UntypedStorage, t: torch.Tensor, category: Category) -> None:
        device = self._device_label or str(t.device)
        rec = self._ledger.new(device, st.nbytes(), category)
        key = id(st)
        self._entries[key] = (rec, weakref.ref(st, self._make_free_callback(key)))

    def _make_free_callback(self, key: int) -> Callable[[Any], None]:
        def on_free(_: Any) -> None:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._ledger.free(entry[0])

        return on_free

    # ---- hooks -----------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        for p in self._params:
            if p.requires_grad and p.is_leaf:  # only leaves accumulate a .grad
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(self._on_step_start))
            self._handles.append(self._optimizer.register_step_post_hook(self._on_step_end))
        if self._model is not None:
            self._handles.append(self._model.register_forward_pre_hook(self._on_forward))

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._register(p.grad, Category.GRADIENTS, relabel=True)

    def _on_step_start(self, *_: Any) -> None:
        self._in_optimizer = True

    def _on_step_end(self, *_: Any) -> None:
        self._register_optimizer_state()
        self._in_optimizer = False

    def _on_forward(self, *_: Any) -> None:
        self._seen_backward = False

    def _pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Pack hook: a temporary saved for backward is an activation; the tensor is unchanged."""
        for st in storages_of(t):
            entry = self._entries.get(id(st))
            if entry is not None and entry[0].category is Category.TEMPORARIES:
                self._ledger.relabel(entry[0], Category.ACTIVATIONS)
        return t.detach(), t._version

    # ---- the per-op path -------------------------------------------------------------------

    def _phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            self._seen_backward = True
            return "backward"
        return "other" if self._seen_backward else "forward"

    def _count_op(self, inputs: Any, out: Any) -> None:
        tensors = list(_tensors(out))
        if not self._simulated and (_in_fake_mode() or any(_is_fake(t) for t in tensors)):
            return  # an op of a simulation inside a real region: no bytes, and no phase of this region
        devices = {t.device for t in tensors}
        for t in _read(inputs):  # read here, made before the region and not registered: an input
            if t.device in devices and any(id(st) not in self._entries and id(st) not in self._stood_in
                                           for st in storages_of(t)):
                self._register(t, Category.INPUTS)
        for t in tensors:
            self._register(t, Category.TEMPORARIES)
        self._ledger.observe(self._phase())


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """Give the saved tensor back, raising as autograd would if it was modified in place."""
    t, version = packed
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: {type(t).__name__} {tuple(t.shape)} is at version {t._version}; expected "
            f"version {version} instead (reported by memopt's MemoryTracker, which packs saved tensors)"
        )
    return t


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]
