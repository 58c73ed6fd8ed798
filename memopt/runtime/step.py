"""Running a model's forward through a lowered Plan: traced once, reused for every batch it covers.

Design note. ``PlannedStep(model, plan, compilers)`` replaces ``model(*args, **kwargs)`` while
autograd records (training). The forward runs as the forward graph of the step AOTAutograd traced
from ``functional_call(model, parameters and buffers, args, kwargs)``, partitioned by
:func:`memopt.runtime.partition.plan_partition`; ``backward()`` runs its backward graph. Gradients
land in ``.grad`` as usual and mutated buffers are written back. The graphs go to ``compilers``
(``memopt.runtime.eager``: op by op; ``memopt.runtime.compiled``: Inductor). Without grad
(evaluation, ``torch.no_grad``) the model's own forward runs unchanged.

* **Every output keeps its gradient.** The planned region is the model's forward and backward:
  logits, hidden states and the model's own ``loss`` are all differentiable, so a loss computed in
  the user's code gets exact gradients. Outputs the loss does not reach get no zero gradient
  tensor: their tangents are folded out of the backward (:mod:`memopt.runtime.tangents`).
* **One trace for many sizes.** The step is traced with *symbolic* sizes for every input
  dimension (a ``ShapeEnv``, as ``torch.compile(dynamic=True)`` does), and the trace is reused for
  every call whose sizes satisfy the guards the trace recorded (e.g. batch 1 specializes, a
  padded length does not; a loop unrolled over the sequence specializes its length). A model
  whose step cannot be traced symbolically, a simulated step (fake tensors) and a plan without
  decision keys (format v3) are traced at the call's exact sizes instead. Traces live in a
  bounded LRU cache (``max_traces``).
* **Guards.** A trace is reused only for the same input structure (tree, dtypes, devices,
  ``requires_grad``, non-tensor values), the same :func:`memopt.runtime.guards.step_state`
  (training flags, dropout probabilities, adapter flags, autocast, parameter dtypes, ...) and the
  same attention-mask state (all ones: no mask tensor, as HF runs it; :mod:`memopt.memory.hf_masks`);
  any change traces again. A trace in which the plan's tensors are not found (another program: an
  adapter disabled, dropout switched on) raises :class:`~memopt.errors.PlanMismatchError`, which
  ``OptimizedModel`` answers by re-planning.
* **Autocast.** A step traced under autocast records the casts; its backward is traced without
  autocast, as eager autograd runs a backward called outside the autocast region.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._export.utils import _compiling_state_context
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from memopt.errors import MemoptError, UnsupportedModelError
from memopt.ir.joint import attention_kernels, module_annotations
from memopt.kernels.dequant import simulating
from memopt.memory import hf_masks
from memopt.memory.hf_masks import eager_masks
from memopt.memory.inputs import input_shapes, token_ids_outside, training_kwargs
from memopt.memory.tracker import not_counted
from memopt.plan import Plan
from memopt.runtime import in_backward
from memopt.runtime.guards import step_state
from memopt.runtime.partition import LoweringReport, is_keyed, plan_partition
from memopt.runtime.tangents import BackwardVariants

__all__ = ["Compilers", "PlannedStep", "MAX_TRACES"]

log = logging.getLogger("memopt")

MAX_TRACES = 8  # traced steps kept per lowered plan (each holds its graphs and compiled code)


@dataclass(frozen=True)
class Compilers:
    """How the partitioned graphs become callables (AOTAutograd's compiler signature)."""

    name: str
    forward: Callable[[torch.fx.GraphModule, list], Callable]
    backward: Callable[[torch.fx.GraphModule, list], Callable]
    runs_fake: bool  # can the compiled code run on fake tensors (a simulated step)?


_local = threading.local()  # .calling: the gradients the forward being called drops; .backward: the backward's


@contextlib.contextmanager
def _dropping(positions: frozenset[int]) -> Any:
    """The step called inside leaves the gradient outputs at ``positions`` out of its backward:
    parameters traced as trainable (``plan.traced_trainable``) that are frozen at this call. The
    set travels with the call's autograd node (a pre-hook hands it to the backward), so a deep copy
    sharing the traced function, or a second forward before the first's backward, gets its own."""
    previous = getattr(_local, "calling", frozenset())
    _local.calling = positions
    try:
        yield
    finally:
        _local.calling = previous


def _backward_dropped() -> frozenset[int]:
    return getattr(_local, "backward", frozenset())


@dataclass
class _Trace:
    """One traced step: the AOT function, what its lowering did, and the sizes it covers."""

    fn: Callable[..., Any]
    report: LoweringReport
    covers: Callable[[list[torch.Tensor]], bool]  # do these input tensors' sizes satisfy its guards?
    symbolic: bool


class PlannedStep:
    """``model``'s forward lowered by ``plan``; see the module docstring."""

    def __init__(self, model: nn.Module, plan: Plan, compilers: Compilers, *, max_traces: int = MAX_TRACES) -> None:
        if max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, got {max_traces}")
        self.model = model
        self.plan = plan
        self.compilers = compilers
        self.max_traces = max_traces
        self._signature = inspect.signature(model.forward)
        self._traces: OrderedDict[tuple[Hashable, int], _Trace] = OrderedDict()
        self._said_evicted = False
        self._serial = 0
        self.traces_made = 0
        self.trace_seconds = 0.0  # spent tracing, partitioning and compiling (each trace's first call included)
        self.update_owner: int | None = None  # with plan.update_in_backward: whose optimizer gets the gradients
        self._traced_trainable = frozenset(plan.traced_trainable or ())

    @property
    def reports(self) -> list[LoweringReport]:
        """What each cached trace's lowering did (recomputed nodes, saved, offloaded), oldest first."""
        return [trace.report for trace in self._traces.values()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(self.model.named_parameters())
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params.values())):
            return self.model(*args, **kwargs)
        buffers = dict(self.model.named_buffers())
        kwargs = training_kwargs(self._signature, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in [*tensors, *params.values()])
        device = next((t.device for t in [*tensors, *params.values()]), torch.device("cpu"))
        # An attention_mask of all ones (read on the real tensor; a fake one: as planned) traces no mask.
        unpadded = hf_masks.unpadded(self.model, args, kwargs)
        unpadded = self.plan.unpadded_mask if unpadded is None else unpadded
        key = (spec, tuple(_describe(x, exact=fake) for x in leaves), fake,
               step_state(self.model, device.type, self._traced_trainable), unpadded)
        # Parameters traced as trainable but frozen now: this call's backward leaves their gradients out.
        dropped = frozenset(i for i, (name, p) in enumerate(params.items())
                            if name in self._traced_trainable and not p.requires_grad)
        for cache_key, trace in self._traces.items():
            if cache_key[0] == key and trace.covers(tensors):
                self._traces.move_to_end(cache_key)
                with _dropping(dropped):
                    return trace.fn(params, buffers, tensors)
        start = time.perf_counter()
        # HF's masks as eager HF makes them, as the planner traced them
        with eager_masks(self.model, args, kwargs, unpadded), _dropping(dropped):
            trace, output = self._lower(args, kwargs, fake, leaves, spec, (params, buffers, tensors), device)
        self.trace_seconds += time.perf_counter() - start
        self._serial += 1
        self._traces[(key, self._serial)] = trace
        while len(self._traces) > self.max_traces:
            self._traces.popitem(last=False)
            if not self._said_evicted:
                self._said_evicted = True
                log.warning("memopt: more than max_traces=%d traces of %s's step (a loop unrolled over the sequence "
                            "traces each length; batch 1 and sizes of 0 specialize): the least recently used is "
                            "dropped and traced again when met; padding batches to a few lengths avoids it",
                            self.max_traces, type(self.model).__name__)
        return output

    # ------------------------------------------------------------------------- tracing

    def _lower(self, args: tuple, kwargs: dict, fake: bool, leaves: list, spec: Any,
               inputs: tuple[dict, dict, list], device: torch.device) -> tuple[_Trace, Any]:
        """Trace, partition and compile the step for these inputs, and run it on them once."""
        if fake and not self.compilers.runs_fake:
            raise MemoptError(f"the {self.compilers.name} lowering cannot run on fake tensors; simulate the eager one")
        shapes = input_shapes(self._signature.bind(*args, **kwargs))
        at_plan_shapes = shapes == {k: tuple(v) for k, v in self.plan.input_shapes.items()}
        mode = "simulated" if fake else ("cuda" if device.type == "cuda" else "host")
        model, constants = self.model, [None if isinstance(x, torch.Tensor) else x for x in leaves]

        def step(params: dict, buffers: dict, tensors: list) -> Any:
            it = iter(tensors)
            call_args, call_kwargs = tree_unflatten([next(it) if c is None and isinstance(x, torch.Tensor) else c
                                                     for c, x in zip(constants, leaves)], spec)
            return torch.func.functional_call(model, {**params, **buffers}, call_args, call_kwargs)

        self.traces_made += 1
        # A plan without keys (format v3) names fx nodes of a trace at exact sizes.
        if not fake and is_keyed(self.plan.tensors):
            try:
                return self._trace_symbolic(step, inputs, mode, at_plan_shapes)
            except (MemoptError, torch.OutOfMemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - the exact-size trace below reports real failures
                log.info("memopt: %s's step could not be traced with symbolic sizes (%s: %s); tracing it at "
                         "these sizes (one trace per size)", type(model).__name__, type(exc).__name__,
                         _first_line(exc))
        try:
            return self._trace_exact(step, inputs, mode, at_plan_shapes, fake)
        except UnsupportedModelError as exc:
            outside = None if fake else token_ids_outside(model, self._signature.bind(*args, **kwargs))
            if outside is not None:  # the batch, not the model: as eager fails on it
                raise IndexError(outside) from exc
            raise

    def _traced_as(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` as the step is traced: each parameter of ``plan.traced_trainable`` frozen now
        stands in as a trainable alias (its gradient is left out of the backward, ``_dropping``)."""
        return {n: p.detach().requires_grad_(True) if n in self._traced_trainable and not p.requires_grad else p
                for n, p in params.items()}

    def _aot(self, step: Callable, partition: Callable, resume: Callable[[], None] | None) -> Callable[..., Any]:
        """The AOT function of ``step``; ``resume`` (if given) is called once compiled, before the
        forward first runs (a simulated step counts from there)."""
        compilers = self.compilers
        first_call = [True]

        def forward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            compiled = compilers.forward(gm, example_inputs)
            if resume is not None:
                resume()
            if compilers.runs_fake:
                return compiled
            eager = _boxed(gm)

            def run(args: list) -> Any:  # AOTAutograd runs the forward once on the trace's fakes
                if first_call[0]:
                    first_call[0] = False
                    if any(isinstance(a, FakeTensor) for a in args):
                        return eager(args)
                return compiled(args)

            run._boxed_call = True  # type: ignore[attr-defined]
            return run

        def backward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            return BackwardVariants(gm, example_inputs, compilers.backward, _backward_dropped)

        fn = aot_function(step, fw_compiler=forward_compiler, bw_compiler=backward_compiler, partition_fn=partition)
        return _without_zero_gradients(fn)

    def _trace_symbolic(self, step: Callable, inputs: tuple[dict, dict, list], mode: str,
                        at_plan_shapes: bool) -> tuple[_Trace, Any]:
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        params, buffers, tensors = inputs
        report = LoweringReport()
        partition = self._partition(mode, at_plan_shapes, report)
        shape_env = ShapeEnv()
        fake_mode = FakeTensorMode(shape_env=shape_env)
        # The trace runs on fakes of its own, outside any dispatch mode the caller has on (a memory
        # tracker, a FLOP counter): what it does is not the step, and such a mode would see real
        # tensors the trace makes (the RNG state saved for a replayed op) in the fake mode.
        with _disable_current_modes():
            with fake_mode:
                fparams = {n: fake_mode.from_tensor(p, static_shapes=True) for n, p in self._traced_as(params).items()}
                fbuffers = {n: fake_mode.from_tensor(b, static_shapes=True) for n, b in buffers.items()}
                ftensors = [fake_mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
                    dynamic_sizes=[DimDynamic.DUCK] * t.dim())) for t in tensors]
            fn = None
            for exporting in (False, True):
                with not_counted():  # nothing of the trace, its fake run included, is a real allocation
                    fn = self._aot(step, partition, None)
                    try:
                        # The caller's saved-tensor hooks (a tracker's) see no fake tensor either.
                        with self._tracing(exporting), fake_mode, \
                                torch.autograd.graph.saved_tensors_hooks(_same, _same):
                            fn(fparams, fbuffers, ftensors)
                        break
                    except (MemoptError, torch.OutOfMemoryError):
                        raise
                    except Exception:  # noqa: BLE001 - as the planner's trace: once more on export's branch
                        if exporting:
                            raise
            # Sizes the trace specialized (a loop unrolled over the sequence: nn.LSTM, a Python
            # recurrence) are guards too; torch leaves them out by default (Dynamo checks them itself).
            guards = shape_env.produce_guards_expression(ftensors, ignore_static=False)

        def covers(actual: list[torch.Tensor]) -> bool:
            try:
                return guards is None or bool(shape_env.evaluate_guards_expression(guards, actual))
            except ZeroDivisionError:  # a guard dividing by a size that is 0 here (a piece of a short sequence)
                return False

        output = fn(params, buffers, tensors)
        log.debug("memopt: traced the planned step with symbolic sizes (guards: %s)", guards)
        return _Trace(fn, report, covers, symbolic=True), output

    def _trace_exact(self, step: Callable, inputs: tuple[dict, dict, list], mode: str, at_plan_shapes: bool,
                     fake: bool) -> tuple[_Trace, Any]:
        report = LoweringReport()
        partition = self._partition(mode, at_plan_shapes, report)
        sizes = [tuple(t.shape) for t in inputs[2]]
        inputs = (self._traced_as(inputs[0]), *inputs[1:])
        for exporting in (False, True):
            # Tracing makes fake tensors a simulated step must not count: count from the first op run.
            with not_counted() as resume:
                fn = self._aot(step, partition, resume)
                try:
                    with self._tracing(exporting):
                        output = fn(*inputs)
                    return _Trace(fn, report, lambda actual: [tuple(t.shape) for t in actual] == sizes,
                                  symbolic=False), output
                except (MemoptError, torch.OutOfMemoryError):
                    raise
                except Exception as exc:  # noqa: BLE001 - tracing failures are reported with the way out
                    if not exporting:
                        first = exc
                        # As the planner's trace (ir/joint.py): a value-dependent branch (HF: "is the
                        # mask all ones?") or a path fake tensors cannot run (HF MoE: a grouped GEMM
                        # whose fake kernel wants bf16) is traced again on export's branch. A failed
                        # forward wrote no buffer back (AOTAutograd writes mutations after it ends).
                        continue
                    raise UnsupportedModelError(
                        f"memopt could not lower the plan onto {type(self.model).__name__}'s training step: "
                        f"{type(first).__name__}: {_first_line(first)} (on export's branch too: "
                        f"{type(exc).__name__}: {_first_line(exc)})") from first
        raise AssertionError("unreachable")

    def _partition(self, mode: str, at_plan_shapes: bool, report: LoweringReport) -> Callable[..., Any]:
        """The plan's partition; with updates inside backward, each parameter's gradient is handed to
        the optimizer where the backward makes it (``memopt.runtime.in_backward``)."""
        partition = plan_partition(self.plan, offload_mode=mode, check_layout=at_plan_shapes, report=report)
        if not self.plan.update_in_backward:
            return partition
        if self.update_owner is None:
            raise MemoptError(in_backward.NO_OPTIMIZER)
        num_params = sum(1 for _ in self.model.named_parameters())
        return in_backward.partition_with_updates(partition, self.update_owner, num_params)

    @contextlib.contextmanager
    def _tracing(self, exporting: bool) -> Any:
        """Traced as the planner traced it: module annotations for the plan's keys, quantized matmuls
        as the target device runs them, data-dependent branches as export takes them (``exporting``),
        and the backward outside autocast, as eager autograd runs it."""
        with simulating(self.plan.device.kind), fx_traceback.preserve_node_meta(), \
                module_annotations(self.model), attention_kernels(), \
                torch._functorch.config.patch(backward_pass_autocast="off"), \
                (_compiling_state_context() if exporting else contextlib.nullcontext()):
            yield


def _same(t: Any) -> Any:
    return t


def _without_zero_gradients(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``'s outputs, with autograd told to pass ``None`` for the gradient of an output the loss
    does not reach (instead of a zero tensor of its size): the backward folds those tangents away."""

    def call(*args: Any) -> Any:
        dropped = getattr(_local, "calling", frozenset())
        output = fn(*args)
        seen: set[int] = set()
        for t in tree_leaves(output):
            node = t.grad_fn if isinstance(t, torch.Tensor) else None
            for candidate in (node, *(f for f, _ in (node.next_functions if node is not None else ()))):
                if candidate is not None and id(candidate) not in seen and \
                        type(candidate).__name__ == "CompiledFunctionBackward":
                    seen.add(id(candidate))
                    candidate.set_materialize_grads(False)
                    candidate.register_prehook(_hand_over(dropped))
        return output

    return call


def _hand_over(dropped: frozenset[int]) -> Callable[[Any], None]:
    def prehook(grad_outputs: Any) -> None:  # runs on the thread that runs this node's backward, right before it
        _local.backward = dropped

    return prehook


def _boxed(gm: torch.fx.GraphModule) -> Callable[[list], Any]:
    def run(args: list) -> Any:
        return torch.fx.Interpreter(gm).boxed_run(args)

    return run



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _describe(x: Any, *, exact: bool) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape) if exact else x.dim(), x.dtype, x.device.type, x.requires_grad)
    return ("value", repr(x))


def describe_shapes(larger: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    return ", ".join(f"{name} {list(shape)} (planned {list(planned)})" for name, (shape, planned) in larger.items())
