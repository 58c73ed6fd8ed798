"""A picture of a Plan: where the bytes go over the step, at its peak, and per layer.

Three panels, from the Plan alone (a saved plan draws the same):

* **timeline** — device bytes over the step's program points (forward, then backward), under the
  plan and under keep-everything, with the usable budget (budget less reserve) as a line and the
  forward / backward boundary marked. Each point is the maximum of its bucket (``MemoryTimeline``),
  so the peaks are exact.
* **at the peak** — the predicted peak split into what no decision changes (parameters, buffers,
  inputs, optimizer states: ``plan.static``) and the rest (activations, gradients, temporaries).
* **per layer** — bytes of saved activations kept / recomputed / offloaded in each layer.

matplotlib is an optional dependency (``pip install 'memopt[plot]'``); the format follows the
suffix (``.png`` or ``.svg``), checked before anything is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memopt.plan.report import format_bytes
from memopt.plan.schema import check_writable

if TYPE_CHECKING:
    from memopt.plan import Plan

__all__ = ["SUFFIXES", "check_report_path", "draw_plan"]

SUFFIXES = (".png", ".svg")
_COLORS = {"keep": "#4C72B0", "recompute": "#DD8452", "offload": "#55A868"}


def check_report_path(path: "str | Path") -> Path:
    """``path`` if a picture can be written there (known suffix, existing writable folder, matplotlib)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"a plan picture is {' or '.join(SUFFIXES)} (by the file's suffix), got {path.name!r}")
    check_writable(path)
    _figure_class()
    return path


def _figure_class() -> Any:
    """matplotlib's ``Figure``: drawn straight to a file, no pyplot, so the caller's backend and
    open figures (a notebook's) are left as they are."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("drawing a plan needs matplotlib: pip install 'memopt[plot]'") from None
    return Figure


def _unit(largest: int) -> tuple[float, str]:
    return (2**30, "GiB") if largest >= 2**30 else (2**20, "MiB")


def draw_plan(plan: "Plan", path: "str | Path") -> Path:
    path = check_report_path(path)
    fig = _figure_class()(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1))
    _timeline(plan, fig.add_subplot(grid[0, :]))
    _at_peak(plan, fig.add_subplot(grid[1, 0]))
    _per_layer(plan, fig.add_subplot(grid[1, 1]))
    shapes = ", ".join(f"{k}[{'x'.join(map(str, v))}]" for k, v in plan.input_shapes.items())
    fig.suptitle(f"{plan.model}: {plan.method} on {plan.device.name}, {shapes}, budget "
                 f"{format_bytes(plan.budget_bytes)}", fontsize=13)
    fig.savefig(path)
    return path


def _timeline(plan: "Plan", ax: Any) -> None:
    line = plan.timeline
    usable = plan.usable_bytes
    if line is None:
        ax.text(0.5, 0.5, "this plan has no timeline (a plan made before format v2)", ha="center", va="center")
        ax.set_axis_off()
        return
    scale, unit = _unit(max(max(line.keep_all), usable))
    ends = [*line.starts[1:], line.num_points]
    xs = [x for s, e in zip(line.starts, ends) for x in (s, e)]
    for values, label, style in ((line.keep_all, "keep everything", dict(color="#999999", lw=1.2)),
                                 (line.planned, "the plan", dict(color="#C44E52", lw=1.8))):
        ax.plot(xs, [v / scale for v in values for _ in (0, 1)], label=label, **style)
    ax.axhline(usable / scale, color="black", ls="--", lw=1, label=f"usable budget {usable / scale:.2f} {unit}")
    ax.axvline(line.num_forward, color="#555555", ls=":", lw=1)
    top = max(max(line.keep_all), usable) / scale
    ax.text(line.num_forward, top * 1.02, " backward →", va="bottom", fontsize=9)
    ax.text(line.num_forward, top * 1.02, "← forward ", va="bottom", ha="right", fontsize=9)
    ax.set_xlim(0, line.num_points)
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("program point (op of the traced step)")
    ax.set_ylabel(f"device memory ({unit})")
    ax.set_title(f"device memory over the step: predicted peak {plan.predicted_peak_bytes / scale:.2f} {unit} "
                 f"(keep everything: {max(line.keep_all) / scale:.2f} {unit})", fontsize=11)
    ax.legend(loc="upper left", fontsize=9)


def _at_peak(plan: "Plan", ax: Any) -> None:
    static = plan.static
    parts: list[tuple[str, int]] = []
    if static is not None:
        parts = [("parameters", static.parameters), ("buffers", static.buffers), ("inputs", static.inputs),
                 ("optimizer states", static.optimizer)]
    rest = plan.predicted_peak_bytes - sum(b for _, b in parts)
    parts.append(("activations, gradients,\ntemporaries", max(rest, 0)))
    scale, unit = _unit(max(plan.predicted_peak_bytes, plan.usable_bytes))
    left = 0.0
    for i, (label, nbytes) in enumerate(parts):
        if not nbytes:
            continue
        width = nbytes / scale
        ax.barh(0, width, left=left, color=f"C{i}", edgecolor="white", label=f"{label.replace(chr(10), ' ')}: "
                f"{width:.2f} {unit}")
        left += width
    ax.axvline(plan.usable_bytes / scale, color="black", ls="--", lw=1)
    ax.set_yticks([])
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(left, plan.usable_bytes / scale) * 1.05)
    ax.set_title("the predicted peak, by kind (dashed: usable budget)", fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8.5, frameon=False)


def _per_layer(plan: "Plan", ax: Any) -> None:
    layers: dict[str, dict[str, int]] = {}
    for t in plan.tensors:
        action = "keep" if t.action == "save" else t.action
        if action not in _COLORS:
            continue
        label = "-" if t.block is None else str(t.block)
        layers.setdefault(label, dict.fromkeys(_COLORS, 0))[action] += t.nbytes
    if not layers:
        ax.text(0.5, 0.5, "no saved activations", ha="center", va="center")
        ax.set_axis_off()
        return
    names = sorted(layers, key=lambda n: (n != "-", int(n) if n.isdigit() else -1))
    scale, unit = _unit(max(sum(v.values()) for v in layers.values()))
    bottom = [0.0] * len(names)
    for action, color in _COLORS.items():
        heights = [layers[n][action] / scale for n in names]
        ax.bar(range(len(names)), heights, bottom=bottom, color=color, label=action, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)])
    ax.set_xlabel("layer (- : outside the repeated blocks)")
    ax.set_ylabel(unit)
    ax.set_title("saved activations per layer", fontsize=11)
    ax.legend(fontsize=9)
