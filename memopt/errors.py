"""The errors memopt raises. Each one says what went wrong and what the user can change."""

from __future__ import annotations

from typing import Mapping

__all__ = ["MemoptError", "InfeasibleBudgetError", "PlanMismatchError", "UnsupportedModelError"]

_GIB = 2**30


class MemoptError(Exception):
    """Base class of every error memopt raises on purpose."""


class UnsupportedModelError(MemoptError):
    """The model could not be captured or analysed; the message names what failed and the way out."""


class InfeasibleBudgetError(MemoptError):
    """The training step cannot fit the budget.

    ``min_budget_gb`` is the smallest budget (GiB, including the device reserve) that memopt
    predicts to be feasible with what it is allowed to do; ``breakdown`` maps memory categories to
    bytes at the predicted peak, so the dominating term can be read off.
    """

    def __init__(
        self,
        message: str,
        *,
        predicted_bytes: int,
        budget_bytes: int,
        min_budget_gb: float,
        breakdown: Mapping[str, int],
    ) -> None:
        self.predicted_bytes = int(predicted_bytes)
        self.budget_bytes = int(budget_bytes)
        self.min_budget_gb = float(min_budget_gb)
        self.breakdown = dict(breakdown)
        dominant = max(self.breakdown, key=self.breakdown.__getitem__) if self.breakdown else None
        parts = ", ".join(f"{k} {v / _GIB:.3f} GiB" for k, v in self.breakdown.items())
        detail = (
            f"{message}\n  predicted peak {self.predicted_bytes / _GIB:.3f} GiB > usable budget "
            f"{self.budget_bytes / _GIB:.3f} GiB; smallest feasible budget {self.min_budget_gb:.3f} GiB"
        )
        if parts:
            detail += f"\n  at the peak: {parts}" + (f" (dominated by {dominant})" if dominant else "")
        super().__init__(detail)


class PlanMismatchError(MemoptError):
    """A Plan was applied to a model, inputs or a format it was not made for; the message says which."""
