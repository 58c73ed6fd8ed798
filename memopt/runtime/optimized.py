"""The module `memopt.optimize` returns: the rewritten model with its Plan attached.

``OptimizedModel`` is an ``nn.Module`` whose ``forward`` has the wrapped model's signature (HF
Trainer reads it to pick dataset columns) and returns the wrapped model's outputs unchanged.
Attributes it does not have are looked up on the wrapped model (``config``, ``generate``, ...).

While autograd records, the forward runs through the plan's lowering (``runtime``, a
``memopt.runtime.step.PlannedStep``: eager or compiled) when the plan recomputes or offloads
anything or compilation was asked for; otherwise the wrapped model runs as it is, which is then
exactly the plan. Either way a training step gets ``use_cache=False`` unless the caller sets it
(``memopt.memory.inputs.training_kwargs``), as the plan was made. Without grad the wrapped model
runs unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from memopt.errors import MemoptError, PlanMismatchError
from memopt.memory.inputs import training_kwargs
from memopt.planner.plan import RUNTIME_ACTIONS, Plan
from memopt.runtime.fingerprint import structural_fingerprint
from memopt.runtime.step import ShapeGuard

__all__ = ["OptimizedModel", "wrap"]


class OptimizedModel(nn.Module):
    """A model rewritten by memopt. ``.model`` is the rewritten module, ``.plan`` what was done."""

    def __init__(self, model: nn.Module, plan: Plan, merge_fn: Callable[[nn.Module], nn.Module],
                 original_requires_grad: dict[int, bool], runtime: Any = None) -> None:
        super().__init__()
        self.model = model
        self._plan = plan
        self.runtime = runtime
        self._merge_fn = merge_fn
        self._original_requires_grad = original_requires_grad
        self._merged = False
        self._signature = inspect.signature(model.forward)
        self._guard = ShapeGuard(self._signature)
        self._compile = False

    @property
    def plan(self) -> Plan:
        """The plan the model carries out (a re-plan for larger inputs replaces it)."""
        return self._plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._merged:
            raise MemoptError("this OptimizedModel was merged; use the plain model merge() returned")
        if torch.is_grad_enabled():  # a training step: the plan's
            new_plan = self._guard.check(self._plan, args, kwargs)
            if new_plan is not None:
                self._install(new_plan, self._compile)
            if self.runtime is not None:
                return self.runtime(*args, **kwargs)
            kwargs = training_kwargs(self._signature, kwargs)
        return self.model(*args, **kwargs)

    def use_plan(self, plan: Plan, *, compile: bool = False, larger_inputs: str = "error",
                 replan: Callable[[tuple, dict], Plan] | None = None) -> "OptimizedModel":
        """Carry out ``plan`` from now on (e.g. one read with ``memopt.load_plan``); returns self.

        The plan must have been made for this model as rewritten (same structural fingerprint)
        and its inputs; a mismatch raises ``PlanMismatchError`` (here, or at the first step for a
        tensor the step does not make). ``compile``: run the step through Inductor.
        ``larger_inputs`` / ``replan``: what a step with larger inputs than planned does
        (``memopt.runtime.step.ShapeGuard``).
        """
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a memopt Plan, got {type(plan).__name__}")
        if plan.fingerprint is not None and plan.fingerprint != structural_fingerprint(self.model):
            raise PlanMismatchError(
                f"the plan was made for another model ({plan.model}, method {plan.method}): its structural "
                f"fingerprint {plan.fingerprint} differs from this model's {structural_fingerprint(self.model)} "
                "(parameter names, shapes, dtypes, trainability or module types)")
        self._guard = ShapeGuard(self._signature, larger_inputs, replan)
        self._install(plan, compile)
        return self

    def _install(self, plan: Plan, compile: bool) -> None:
        """Carry out ``plan``: lowered if it recomputes or offloads anything or ``compile`` is set."""
        from memopt.runtime.compiled import lower_compiled
        from memopt.runtime.eager import lower_eager

        self._compile = compile
        if compile or plan.needs_runtime:
            self._plan = dataclasses.replace(plan, runtime_applies=RUNTIME_ACTIONS, applied_peak_bytes=None)
            self.runtime = (lower_compiled if compile else lower_eager)(self.model, self._plan)
        else:
            self._plan, self.runtime = plan, None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied parameters count once."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary: trainable, all, and their ratio."""
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def merge(self) -> nn.Module:
        """Fold the trained parameterization back into a plain model and return it.

        The wrapped module is changed in place (adapter layers replaced by their merged base
        layers) and its parameters get back the ``requires_grad`` flags they had before
        `optimize`. This wrapper cannot be used afterwards.
        """
        if self._merged:
            raise MemoptError("merge() was already called on this model")
        self.runtime = None
        plain = self._merge_fn(self.model)
        for p in plain.parameters():
            flag = self._original_requires_grad.get(id(p))
            if flag is not None:
                p.requires_grad_(flag)
        self._merged = True
        return plain


@functools.lru_cache(maxsize=None)
def _class_for(model_cls: type) -> type:
    """A subclass of OptimizedModel whose forward reports ``model_cls.forward``'s signature."""

    def forward(self: OptimizedModel, *args: Any, **kwargs: Any) -> Any:
        return OptimizedModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(model_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = model_cls.forward.__doc__
    name = f"Optimized{model_cls.__name__}"
    return type(name, (OptimizedModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def wrap(model: nn.Module, plan: Plan, merge_fn: Callable[[nn.Module], nn.Module],
         original_requires_grad: dict[int, bool], runtime: Any = None) -> OptimizedModel:
    return _class_for(type(model))(model, plan, merge_fn, original_requires_grad, runtime)
