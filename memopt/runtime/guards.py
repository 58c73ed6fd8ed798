"""What a traced training step depends on besides its inputs' sizes, read on every call.

Design note. A traced step bakes in everything Python decided while it was traced: ``training``
(dropout on or off), a dropout probability, an adapter's ``enabled`` flag or ``scaling``, the
model config's attention implementation, the autocast state, the default dtype, the parameters'
dtypes and ``requires_grad``. :func:`step_state` reads all of that on every call as one hashable
value; the runtime keeps one trace per value, so a change re-traces the step (and, when the new
step is another program than the plan's, re-plans) — a stale graph never runs.

What is read of a module: ``training`` and every public attribute holding a plain value (bool,
int, float, str, None, dtype), and the plain values of a config object it holds (HF's
``PretrainedConfig``, read once per object). Tensors are inputs of the trace, not state; nested
containers and other objects are not read — a model whose forward branches on such an attribute
must be re-optimized after changing it.
"""

from __future__ import annotations

from typing import Any, Collection, Hashable

import torch
from torch import nn

from memopt.memory.autocast import autocast_state

__all__ = ["step_state", "module_state", "global_state"]

_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def step_state(model: nn.Module, device_type: str, trainable_as: Collection[str] = ()) -> Hashable:
    """Everything besides the inputs' sizes that a traced step of ``model`` depends on
    (``trainable_as``: parameters traced as trainable whether or not they require grad now)."""
    params = tuple((tuple(p.shape), p.dtype, p.requires_grad or name in trainable_as, p.device.type)
                   for name, p in model.named_parameters())
    return module_state(model), global_state(device_type), params


def module_state(model: nn.Module) -> tuple:
    """``training`` and the plain public attributes of every module (see the module docstring)."""
    configs: dict[int, tuple] = {}
    out = []
    for module in model.modules():
        items = []
        for name, value in vars(module).items():
            if isinstance(value, _PLAIN):
                if not name.startswith("_") or name == "training":
                    items.append((name, value))
            elif _is_config(value):
                key = id(value)
                if key not in configs:
                    configs[key] = tuple(sorted((k, v) for k, v in vars(value).items() if isinstance(v, _PLAIN)))
                items.append((name, configs[key]))
        out.append(tuple(items))
    return tuple(out)


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "_attn_implementation")


def global_state(device_type: str) -> tuple:
    """Process-wide settings a trace bakes in: autocast, deterministic algorithms, default dtype."""
    return (autocast_state(device_type), torch.are_deterministic_algorithms_enabled(), torch.get_default_dtype())
