"""Running a model's forward through a lowered Plan: one traced step per input signature.

Design note. ``PlannedStep(model, plan, compilers)`` replaces ``model(*args, **kwargs)`` while
autograd records (training): the forward runs as the forward graph of the step AOTAutograd traced
from ``functional_call(model, parameters and buffers, args, kwargs)``, partitioned by
:func:`memopt.runtime.partition.plan_partition`, and ``loss.backward()`` runs its backward graph;
gradients land in the parameters' ``.grad`` as usual and mutated buffers are written back. The
graphs go to ``compilers`` (``memopt.runtime.eager``: run op by op; ``memopt.runtime.compiled``:
Inductor). Without grad (evaluation, ``torch.no_grad``) the model's own forward runs unchanged.
A model that returns its own ``loss`` returns its other outputs (logits, ...) detached: the step
backpropagates from the loss, as planned (``_loss_only``).

One trace per *signature*: the tree of the inputs, each tensor's shape, dtype, device and
``requires_grad``, the non-tensor values, ``model.training`` and whether the tensors are fake.
HF models that take ``use_cache`` get ``use_cache=False`` unless the caller sets it
(``memopt.memory.inputs.training_kwargs``), as the plan was made. The Plan holds for its input shapes; inputs with a dimension larger than planned raise
:class:`~memopt.errors.PlanMismatchError` (or, with ``larger_inputs="replan"``, get a new Plan
from ``replan``); smaller ones run with the same decisions.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch._export.utils import _compiling_state_context
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from memopt.errors import MemoptError, PlanMismatchError, UnsupportedModelError
from memopt.kernels.dequant import simulating
from memopt.memory.inputs import input_shapes, training_kwargs
from memopt.memory.tracker import not_counted
from memopt.planner.plan import Plan
from memopt.runtime.partition import LoweringReport, plan_partition

__all__ = ["LARGER_INPUTS", "Compilers", "PlannedStep", "ShapeGuard"]

log = logging.getLogger("memopt")

LARGER_INPUTS = ("error", "replan")


@dataclass(frozen=True)
class Compilers:
    """How the partitioned graphs become callables (AOTAutograd's compiler signature)."""

    name: str
    forward: Callable[[torch.fx.GraphModule, list], Callable]
    backward: Callable[[torch.fx.GraphModule, list], Callable]
    runs_fake: bool  # can the compiled code run on fake tensors (a simulated step)?


class PlannedStep:
    """``model``'s forward lowered by ``plan``; see the module docstring."""

    def __init__(self, model: nn.Module, plan: Plan, compilers: Compilers) -> None:
        self.model = model
        self.plan = plan
        self.compilers = compilers
        self._signature = inspect.signature(model.forward)
        self._cache: dict[Any, tuple[Callable, LoweringReport]] = {}

    @property
    def reports(self) -> list[LoweringReport]:
        """What each traced signature's lowering did (recomputed nodes, saved, offloaded)."""
        return [report for _, report in self._cache.values()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(self.model.named_parameters())
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params.values())):
            return self.model(*args, **kwargs)
        buffers = dict(self.model.named_buffers())
        kwargs = training_kwargs(self._signature, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in [*tensors, *params.values()])
        key = (spec, tuple(_describe(x) for x in leaves), self.model.training, fake,
               tuple(p.requires_grad for p in params.values()))
        entry = self._cache.get(key)
        if entry is not None:
            return entry[0](params, buffers, tensors)
        fn, report, output = self._lower(args, kwargs, fake, leaves, spec, (params, buffers, tensors))
        self._cache[key] = (fn, report)
        return output

    def _lower(self, args: tuple, kwargs: dict, fake: bool, leaves: list, spec: Any,
               inputs: tuple[dict, dict, list]) -> tuple[Callable, LoweringReport, Any]:
        """Trace, partition and compile the step for these inputs, and run it on them once."""
        if fake and not self.compilers.runs_fake:
            raise MemoptError(f"the {self.compilers.name} lowering cannot run on fake tensors; simulate the eager one")
        at_plan_shapes = self._at_plan_shapes(args, kwargs)
        device = next((t.device for t in leaves if isinstance(t, torch.Tensor)), torch.device("cpu"))
        mode = "simulated" if fake else ("cuda" if device.type == "cuda" else "host")
        model, constants = self.model, [None if isinstance(x, torch.Tensor) else x for x in leaves]

        def step(params: dict, buffers: dict, tensors: list) -> Any:
            it = iter(tensors)
            call_args, call_kwargs = tree_unflatten([next(it) if c is None and isinstance(x, torch.Tensor) else c
                                                     for c, x in zip(constants, leaves)], spec)
            return _loss_only(torch.func.functional_call(model, {**params, **buffers}, call_args, call_kwargs))

        report = LoweringReport()
        partition = plan_partition(self.plan, offload_mode=mode, check_layout=at_plan_shapes, report=report)
        for exporting in (False, True):
            # Tracing makes fake tensors a simulated step must not count: count from the first op run.
            with not_counted() as resume:
                def forward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
                    compiled = self.compilers.forward(gm, example_inputs)
                    resume()
                    return compiled

                try:
                    # Traced as the planner traced it: quantized matmuls as the target device runs them.
                    with simulating(self.plan.device.kind), \
                            _compiling_state_context() if exporting else contextlib.nullcontext():
                        fn = aot_function(step, fw_compiler=forward_compiler, bw_compiler=self.compilers.backward,
                                          partition_fn=partition)
                        return fn, report, fn(*inputs)
                except DataDependentOutputException:
                    if exporting:
                        raise
                except (MemoptError, torch.OutOfMemoryError):
                    raise
                except Exception as exc:  # noqa: BLE001 - tracing failures are reported with the way out
                    if isinstance(exc.__cause__ or exc.__context__, DataDependentOutputException) and not exporting:
                        continue
                    raise UnsupportedModelError(
                        f"memopt could not lower the plan onto {type(model).__name__}'s training step: "
                        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    ) from exc
        raise AssertionError("unreachable")

    def _at_plan_shapes(self, args: tuple, kwargs: dict) -> bool:
        """Are these the inputs the plan was made for (so every decided tensor has its planned layout)?"""
        shapes = input_shapes(self._signature.bind(*args, **kwargs))
        return all(shapes.get(name) == tuple(shape) for name, shape in self.plan.input_shapes.items())


class ShapeGuard:
    """Checks a training step's inputs against the plan's: larger ones raise ``PlanMismatchError``
    or, with ``larger_inputs="replan"``, get a new Plan from ``replan(args, kwargs)``."""

    def __init__(self, signature: inspect.Signature, larger_inputs: str = "error",
                 replan: Callable[[tuple, dict], Plan] | None = None) -> None:
        if larger_inputs not in LARGER_INPUTS:
            raise ValueError(f"larger_inputs must be one of {LARGER_INPUTS}, got {larger_inputs!r}")
        if larger_inputs == "replan" and replan is None:
            raise ValueError("larger_inputs='replan' needs a replan function")
        self.signature = signature
        self.larger_inputs = larger_inputs
        self.replan = replan

    def check(self, plan: Plan, args: tuple, kwargs: dict) -> Plan | None:
        """None if ``plan`` holds for these inputs; else the new plan (or PlanMismatchError)."""
        try:
            shapes = input_shapes(self.signature.bind(*args, **kwargs))
        except TypeError:
            return None  # the model's own call reports a bad call
        larger = {name: (shape, plan.input_shapes[name]) for name, shape in shapes.items()
                  if name in plan.input_shapes and _exceeds(shape, plan.input_shapes[name])}
        if not larger:
            return None
        if self.larger_inputs == "replan":
            assert self.replan is not None
            log.info("memopt: inputs larger than planned (%s); re-planning", _describe_shapes(larger))
            return self.replan(args, kwargs)
        raise PlanMismatchError(
            f"inputs larger than the plan was made for: {_describe_shapes(larger)}. The plan's peak holds "
            "only up to the planned shapes; call memopt.optimize with a batch of the new size, or pass "
            "larger_inputs='replan'")


def _loss_only(output: Any) -> Any:
    """A model that returns its own loss (HF, given labels): the other outputs, detached.

    The step the plan was made for backpropagates from the loss. Were the logits differentiable
    outputs of the traced step, autograd would hand its backward a zero gradient for them (a
    logits-sized tensor at the start of the backward, outside the plan)."""
    loss = output.get("loss") if isinstance(output, Mapping) else None
    if not isinstance(loss, torch.Tensor):
        return output
    for key in list(output.keys()):
        if key != "loss":
            output[key] = tree_map_only(torch.Tensor, torch.Tensor.detach, output[key])
    return output


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device.type, x.requires_grad)
    return ("value", repr(x))


def _exceeds(shape: tuple[int, ...], planned: tuple[int, ...]) -> bool:
    return len(shape) != len(planned) or any(s > p for s, p in zip(shape, planned))


def _describe_shapes(larger: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    return ", ".join(f"{name} {list(shape)} (planned {list(planned)})" for name, (shape, planned) in larger.items())
