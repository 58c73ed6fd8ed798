"""The module `memopt.optimize` returns: the rewritten model with its Plan attached.

``OptimizedModel`` is an ``nn.Module`` whose ``forward`` has the wrapped model's signature (HF
Trainer reads it to pick dataset columns) and returns the wrapped model's outputs unchanged.
Attributes it does not have are looked up on the wrapped model (``config``, ``generate``, ...).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch.nn as nn

from memopt.errors import MemoptError
from memopt.planner.plan import Plan

__all__ = ["OptimizedModel", "wrap"]


class OptimizedModel(nn.Module):
    """A model rewritten by memopt. ``.model`` is the rewritten module, ``.plan`` what was done."""

    def __init__(self, model: nn.Module, plan: Plan, merge_fn: Callable[[nn.Module], nn.Module],
                 original_requires_grad: dict[int, bool]) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self._merge_fn = merge_fn
        self._original_requires_grad = original_requires_grad
        self._merged = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._merged:
            raise MemoptError("this OptimizedModel was merged; use the plain model merge() returned")
        return self.model(*args, **kwargs)

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
         original_requires_grad: dict[int, bool]) -> OptimizedModel:
    return _class_for(type(model))(model, plan, merge_fn, original_requires_grad)
