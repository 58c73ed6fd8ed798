"""The errors memopt raises. Each one says what went wrong and what the user can change."""

from __future__ import annotations

import math
from typing import Mapping

__all__ = ["MemoptError", "InfeasibleBudgetError", "PlanMismatchError", "UnsupportedModelError", "gib_up"]

_GIB = 2**30


class MemoptError(Exception):
    """Base class of every error memopt raises on purpose."""


class UnsupportedModelError(MemoptError):
    """The model could not be captured or analysed; the message names what failed and the way out."""


class InfeasibleBudgetError(MemoptError):
    """The training step cannot fit the budget.

    ``min_budget_bytes`` is the smallest budget (bytes, including the device reserve) at which
    memopt finds a plan with what it is allowed to do — the same bytes every call — and
    ``min_budget_gb`` the same in GiB, exactly (``optimize(..., budget_gb=err.min_budget_gb)``
    plans); the message rounds it *up*, so a budget typed from it fits too. ``breakdown`` maps
    memory categories to bytes at the predicted peak, so the dominating term can be read off.
    ``over_budget_modules``: where the step's smallest plan is above the budget, the modules whose
    ops are there (empty where unknown) — what ``chunk_sequence="auto"`` runs in pieces first.
    """

    over_points: tuple[int, ...] = ()  # the traced step's program points above the budget (planner's own)
    over_budget_modules: frozenset[str] = frozenset()

    def __init__(
        self,
        message: str,
        *,
        predicted_bytes: int,
        budget_bytes: int,
        breakdown: Mapping[str, int],
        min_budget_bytes: int | None = None,
        min_budget_gb: float | None = None,
    ) -> None:
        if (min_budget_bytes is None) == (min_budget_gb is None):
            raise TypeError("give exactly one of min_budget_bytes and min_budget_gb")
        self.predicted_bytes = int(predicted_bytes)
        self.budget_bytes = int(budget_bytes)
        self.min_budget_bytes = int(min_budget_bytes if min_budget_bytes is not None else
                                    math.ceil(min_budget_gb * _GIB))  # type: ignore[operator]
        self.min_budget_gb = self.min_budget_bytes / _GIB
        self.message = message
        self.breakdown = dict(breakdown)
        dominant = max(self.breakdown, key=self.breakdown.__getitem__) if self.breakdown else None
        parts = ", ".join(f"{k} {v / _GIB:.3f} GiB" if v >= _GIB // 1000 else f"{k} {v:,} bytes"
                          for k, v in self.breakdown.items())  # (below a thousandth of a GiB: bytes)
        peak, usable = f"{self.predicted_bytes / _GIB:.3f} GiB", f"{self.budget_bytes / _GIB:.3f} GiB"
        if peak == usable:  # (small budgets: the bytes tell them apart)
            peak, usable = f"{peak} ({self.predicted_bytes:,} bytes)", f"{usable} ({self.budget_bytes:,} bytes)"
        detail = (
            f"{message}\n  predicted peak {peak} > usable budget {usable}; smallest feasible budget "
            f"{gib_up(self.min_budget_bytes)} GiB "
            f"({self.min_budget_bytes:,} bytes)"
        )
        if parts:
            detail += f"\n  at the peak: {parts}" + (f" (dominated by {dominant})" if dominant else "")
        super().__init__(detail)


def gib_up(nbytes: int, decimals: int = 3) -> str:
    """``nbytes`` in GiB, rounded *up* at ``decimals`` (a budget typed from it is never too small)."""
    scale = 10**decimals
    return f"{math.ceil(nbytes * scale / _GIB) / scale:.{decimals}f}"


class PlanMismatchError(MemoptError):
    """A Plan was applied to a model, inputs or a format it was not made for; the message says which."""
