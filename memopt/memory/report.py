"""What a memory measurement returns: bytes per category, at the peak and at exit.

These are plain data — frozen, integer bytes, JSON round-trippable — so that a Plan, a test or a
report can carry a measurement without holding on to torch objects. The categories follow the
memory model of DESIGN.md §3: every live byte of a training step is exactly one of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Category", "MemoryBreakdown", "MemoryReport", "PHASES"]

# The phases a training step goes through; "other" is anything after backward outside a step.
PHASES: tuple[str, ...] = ("forward", "backward", "optimizer", "other")


class Category(str, Enum):
    """What a live storage is, from the point of view of a training step."""

    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"  # saved by autograd for backward
    TEMPORARIES = "temporaries"  # everything else created during the step
    INPUTS = "inputs"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per category (exact integers). ``total`` is their sum."""

    parameters: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MemoryBreakdown.{f.name} must be a non-negative int of bytes, got {value!r}")

    @property
    def total(self) -> int:
        return sum(getattr(self, c.value) for c in Category)

    def to_dict(self) -> dict[str, int]:
        return {c.value: getattr(self, c.value) for c in Category}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "MemoryBreakdown":
        unknown = set(d) - {c.value for c in Category}
        if unknown:
            raise ValueError(f"unknown memory categories {sorted(unknown)}; known: {[c.value for c in Category]}")
        return cls(**{k: int(v) for k, v in d.items()})


@dataclass(frozen=True)
class MemoryReport:
    """One device's measurement of a region (usually one training step).

    ``peak`` is the breakdown at the instant of the peak and sums to ``peak_bytes``; a storage that
    was relabelled after the peak (a temporary that became a ``.grad`` or optimizer state) is
    counted under its final category. ``phase_peaks`` holds the peak within each phase that ran.
    """

    device: str
    peak_bytes: int
    peak: MemoryBreakdown
    peak_phase: str
    phase_peaks: Mapping[str, int] = field(default_factory=dict)
    final: MemoryBreakdown = field(default_factory=MemoryBreakdown)

    def __post_init__(self) -> None:
        if self.peak.total != self.peak_bytes:
            raise ValueError(f"peak breakdown sums to {self.peak.total} bytes, not peak_bytes={self.peak_bytes}")
        if self.peak_phase not in PHASES:
            raise ValueError(f"peak_phase {self.peak_phase!r} is not one of {PHASES}")
        object.__setattr__(self, "phase_peaks", MappingProxyType(dict(self.phase_peaks)))

    def __deepcopy__(self, memo: dict) -> "MemoryReport":
        return self  # immutable (frozen, a read-only mapping): a copy of a model and its plan shares it

    def __reduce__(self) -> Any:
        return (type(self), (self.device, self.peak_bytes, self.peak, self.peak_phase, dict(self.phase_peaks),
                             self.final))

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "peak_bytes": self.peak_bytes,
            "peak": self.peak.to_dict(),
            "peak_phase": self.peak_phase,
            "phase_peaks": dict(self.phase_peaks),
            "final": self.final.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MemoryReport":
        return cls(
            device=str(d["device"]),
            peak_bytes=int(d["peak_bytes"]),
            peak=MemoryBreakdown.from_dict(d["peak"]),
            peak_phase=str(d["peak_phase"]),
            phase_peaks={str(k): int(v) for k, v in d["phase_peaks"].items()},
            final=MemoryBreakdown.from_dict(d["final"]),
        )

    def summary(self) -> str:
        """A few readable lines in GiB, largest category first."""
        gib = float(2**30)
        parts = sorted(self.peak.to_dict().items(), key=lambda kv: -kv[1])
        lines = [f"{self.device}: peak {self.peak_bytes / gib:.3f} GiB in {self.peak_phase}"]
        lines += [f"  {name:<12} {nbytes / gib:9.3f} GiB" for name, nbytes in parts if nbytes]
        return "\n".join(lines)
