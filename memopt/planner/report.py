"""Human-readable views of a Plan: the per-layer table and the memory breakdown."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from memopt.planner.plan import Plan

__all__ = ["format_table", "format_bytes", "plan_summary"]

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int) -> str:
    for unit, size in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def _layer_rows(plan: "Plan") -> list[list[object]]:
    rows = []
    for m in plan.modules:
        detail = ", ".join(f"{k}={v}" for k, v in m.details.items() if k != "block")
        block = m.details.get("block")
        rows.append([m.name, m.role, "-" if block is None else block, m.method,
                     f"{m.in_features}->{m.out_features}", f"{m.trainable_params:,}", detail])
    return rows


def plan_summary(plan: "Plan") -> str:
    mem = plan.memory
    shapes = ", ".join(f"{k}{list(v)}" for k, v in plan.input_shapes.items())
    head = [
        f"memopt plan v{plan.version}: {plan.model}, method={plan.method}, optimizer={plan.optimizer}, "
        f"device={plan.device.name}, captured by {plan.capture}",
        f"planned inputs: {shapes}",
        "",
        format_table(["module", "role", "block", "method", "shape", "trainable", "details"], _layer_rows(plan)),
        "",
        f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} "
        f"({100.0 * plan.trainable_params / max(plan.total_params, 1):.4f}%)",
        "",
        "simulated training step (forward, backward, optimizer step), bytes live at the peak:",
        format_table(["category", "bytes", "size"],
                     [[k, f"{v:,}", format_bytes(v)] for k, v in mem.peak.to_dict().items()]),
        "",
        f"predicted peak {format_bytes(plan.predicted_peak_bytes)} during {mem.peak_phase} "
        f"| budget {format_bytes(plan.budget_bytes)} - reserve {format_bytes(plan.reserve_bytes)} "
        f"= usable {format_bytes(plan.usable_bytes)} | "
        + ("fits, headroom " + format_bytes(plan.headroom_bytes) if plan.fits
           else "DOES NOT FIT, over by " + format_bytes(-plan.headroom_bytes)),
    ]
    if plan.notes:
        head += ["", "notes:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(head)
