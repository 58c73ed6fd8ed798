"""Autocast as the target device would run it, for a simulation on fake CPU tensors.

A plan for a GPU is made on fake CPU tensors; a user's ``torch.autocast("cuda", dtype=...)`` does
not reach CPU ops, so the simulation would trace the step in full precision. ``on_target`` runs the
simulation under CPU autocast with the dtype the user set for the target. CPU autocast's op lists
stand in for CUDA's: matmuls, convolutions and attention run in the low-precision dtype on both;
a few ops CUDA casts and CPU does not (or the reverse) keep their dtype here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["autocast_state", "on_target", "planned_autocast"]


def autocast_state(device_type: str) -> str | None:
    """The autocast dtype in force for ``device_type`` (``"bfloat16"``, ...), or None when off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return str(torch.get_autocast_dtype(device_type)).replace("torch.", "")


def planned_autocast(target: str, runs_on: str) -> str | None:
    """The autocast state a plan is made for and a call is checked against: the target device's (a
    GPU plan made under ``torch.autocast("cuda")``), else that of the device the model's tensors are
    on (a GPU plan run on a CPU under ``torch.autocast("cpu")``). The plan records it and the runtime
    compares with it, so a call in the planned state never re-plans."""
    if not torch.amp.is_autocast_available(runs_on):  # a model on the meta device (a dry run)
        return autocast_state(target)
    return autocast_state(target) or autocast_state(runs_on)


@contextlib.contextmanager
def on_target(device_type: str) -> Iterator[str | None]:
    """CPU autocast with the dtype autocast sets for ``device_type`` (if any); yields that dtype."""
    state = autocast_state(device_type)
    if state is None or device_type == "cpu":
        yield state
        return
    with torch.autocast("cpu", dtype=getattr(torch, state)):
        yield state
