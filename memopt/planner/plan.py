"""The Plan: what memopt decided for one model, step and device, as plain, versioned data.

A Plan is frozen and JSON-serialisable; ``Plan.from_json(plan.to_json()) == plan`` holds exactly.
It records the target device and budget, the method applied per module, the simulated memory of
the planned training step, and notes that say what was done and why. Applying a plan is the
runtime's job; a Plan never holds a reference to a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from memopt.config import DeviceSpec
from memopt.memory.report import MemoryReport
from memopt.passes.base import ModuleDecision

__all__ = ["PLAN_FORMAT_VERSION", "Plan", "load_plan"]

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """Decisions and predictions for one training step; see DESIGN.md §6."""

    model: str
    method: str
    method_config: Mapping[str, Any]
    optimizer: str
    device: DeviceSpec
    budget_bytes: int
    reserve_bytes: int
    input_shapes: Mapping[str, tuple[int, ...]]
    capture: str
    modules: tuple[ModuleDecision, ...]
    memory: MemoryReport
    trainable_params: int
    total_params: int
    notes: tuple[str, ...] = ()
    version: int = field(default=PLAN_FORMAT_VERSION)

    @property
    def usable_bytes(self) -> int:
        """The budget less the device reserve: what the tracked tensors may occupy."""
        return self.budget_bytes - self.reserve_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.predicted_peak_bytes

    def module(self, name: str) -> ModuleDecision:
        for decision in self.modules:
            if decision.name == name:
                return decision
        raise KeyError(f"the plan has no decision for module {name!r}")

    def summary(self) -> str:
        """A per-layer table, then the memory breakdown and the predicted peak against the budget."""
        from memopt.planner.report import plan_summary

        return plan_summary(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "method": self.method,
            "method_config": dict(self.method_config),
            "optimizer": self.optimizer,
            "device": self.device.to_dict(),
            "budget_bytes": self.budget_bytes,
            "reserve_bytes": self.reserve_bytes,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "capture": self.capture,
            "modules": [m.to_dict() for m in self.modules],
            "memory": self.memory.to_dict(),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: "str | Path") -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or "version" not in data:
            raise ValueError("not a memopt plan: it has no 'version' field")
        version = data["version"]
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"plan format version {version!r} is not supported by this memopt "
                f"(it reads version {PLAN_FORMAT_VERSION}); re-plan with memopt.optimize"
            )
        return cls(
            model=data["model"],
            method=data["method"],
            method_config=_lists_to_tuples(data["method_config"]),
            optimizer=data["optimizer"],
            device=DeviceSpec.from_dict(data["device"]),
            budget_bytes=int(data["budget_bytes"]),
            reserve_bytes=int(data["reserve_bytes"]),
            input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()},
            capture=data["capture"],
            modules=tuple(ModuleDecision.from_dict(m) for m in data["modules"]),
            memory=MemoryReport.from_dict(data["memory"]),
            trainable_params=int(data["trainable_params"]),
            total_params=int(data["total_params"]),
            notes=tuple(data["notes"]),
            version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _lists_to_tuples(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def load_plan(path: "str | Path") -> Plan:
    """Read a Plan written by ``Plan.save`` / ``Plan.to_json``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no plan file at {path}") from None
    try:
        return Plan.from_json(text)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a memopt plan: {type(exc).__name__}: {exc}") from None
