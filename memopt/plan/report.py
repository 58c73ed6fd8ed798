"""Human-readable views of a Plan: the per-layer table, the memory breakdown, and plan diffs."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from memopt.plan import Plan, TensorDecision

__all__ = ["applied_lines", "format_table", "format_bytes", "format_us", "plan_summary", "compare_plans"]

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_MAX_MODULE_ROWS = 40  # above this the per-module table is summarised by role and method
_OUTSIDE = "-"  # the layer column of tensors outside the numbered blocks (embeddings, head, loss)


def format_bytes(n: int) -> str:
    for unit, size in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_us(us: int) -> str:
    if abs(us) >= 10**6:
        return f"{us / 1e6:.2f} s"
    if abs(us) >= 10**3:
        return f"{us / 1e3:.1f} ms"
    return f"{us} us"


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
    head = text.split(" ")[0]
    return head.replace(",", "").replace(".", "", 1).lstrip("+-").isdigit()


# ----------------------------------------------------------------------------- summary


def plan_summary(plan: "Plan") -> str:
    shapes = ", ".join(f"{k}{list(v)}" for k, v in plan.input_shapes.items())
    options = ", ".join(f"{k}={v}" for k, v in plan.optimizer_options.items())
    lines = [
        f"memopt plan v{plan.version}: {plan.model}, method={plan.method}, "
        f"optimizer={plan.optimizer}{f'({options})' if options else ''}, "
        f"device={plan.device.name}, captured by {plan.capture}",
        f"planned inputs: {shapes}",
        "",
        *_headline(plan),
    ]
    if plan.tensors:
        lines += ["", "saved activations per layer (bytes per layer; overhead = recompute time per step):",
                  format_table(["layer", "method", "kept", "recomputed", "offloaded", "overhead"], _layer_rows(plan))]
        lines += ["", *_tensor_table(plan)]
    lines += ["", "modules:", *_module_lines(plan)]
    lines += ["", *_static_lines(plan)]
    lines += ["", *_lowering_lines(plan)]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def _stepping_after(plan: "Plan") -> str:
    """The smallest budget of a plan whose optimizer steps after backward is that of such plans; one
    updating each parameter inside backward frees the gradients sooner and may fit below it."""
    from memopt.optim import OPTIMIZERS

    spec = OPTIMIZERS.get(plan.optimizer)
    if plan.update_in_backward or spec is None or spec.in_backward(plan.optimizer_options) is None:
        return ""
    return ("; with the optimizer stepping after backward: below it, a plan that updates each parameter inside "
            "backward may fit, which memopt.optimize plans when asked for a smaller budget")


def _headline(plan: "Plan") -> list[str]:
    fit = ("fits, headroom " + format_bytes(plan.headroom_bytes) if plan.fits
           else "DOES NOT FIT, over by " + format_bytes(-plan.headroom_bytes))
    as_is = " (the model as it is, simulated)" if plan.memory is not None else " (the model as it is, joint trace)"
    how = {True: " (the lowered step, swept op by op)", False: as_is}.get(plan.lowered, "")
    lines = [f"budget {format_bytes(plan.budget_bytes)} - reserve {format_bytes(plan.reserve_bytes)} = usable "
             f"{format_bytes(plan.usable_bytes)} | predicted peak {format_bytes(plan.predicted_peak_bytes)}{how} | {fit}"]
    if plan.solver is not None:
        s = plan.solver
        proven = "" if s.min_peak_status == "OPTIMAL" else ", the smallest found, not proven"
        lines.append(f"smallest feasible budget {format_bytes(plan.min_budget_bytes)} "
                     f"(minimum-peak phase {s.min_peak_status}{proven}{_stepping_after(plan)}); plan {s.status}, "
                     f"{len(plan.tensors)} saved tensors "
                     f"in {s.classes} decision classes, "
                     f"traced in {s.trace_ms / 1e3:.1f} s, solved in {s.solve_ms / 1e3:.1f} s")
    if plan.compute_us:
        share = 100.0 * plan.overhead_us / plan.compute_us
        lines.append(f"time per step at {plan.device.name}'s roofline: compute {format_us(plan.compute_us)}"
                     f" + recompute {format_us(plan.recompute_us)} + exposed copies "
                     f"{format_us(plan.exposed_transfer_us)} = +{share:.1f} % predicted overhead")
    by_action = plan.bytes_by_action()
    if plan.tensors:
        lines.append("saved activations: " + ", ".join(f"{a} {format_bytes(b)}" for a, b in by_action.items()))
        if plan.host_budget_bytes is not None and by_action.get("offload"):
            lines.append(f"host memory: {format_bytes(by_action['offload'])} offloaded of the "
                         f"{format_bytes(plan.host_budget_bytes)} host budget")
    return lines


def _layer_rows(plan: "Plan") -> list[list[object]]:
    methods: dict[object, set[str]] = {}
    for m in plan.modules:
        methods.setdefault(m.details.get("block", _OUTSIDE), set()).add(m.method)
    by_layer: dict[object, list["TensorDecision"]] = {}
    for t in plan.tensors:
        by_layer.setdefault(_OUTSIDE if t.block is None else t.block, []).append(t)
    rows, runs = [], _runs(sorted((k for k in by_layer if k != _OUTSIDE), key=int), by_layer)
    if _OUTSIDE in by_layer:
        rows.append(_row(_OUTSIDE, methods.get(_OUTSIDE, set()), by_layer[_OUTSIDE]))
    for first, last in runs:
        label = str(first) if first == last else f"{first}-{last} (each)"
        rows.append(_row(label, methods.get(first, set()), by_layer[first]))
    return rows


def _runs(layers: list[int], by_layer: dict) -> list[tuple[int, int]]:
    """Consecutive layers with the same decisions and sizes, as (first, last)."""
    key = lambda layer: tuple((t.op, t.nbytes, t.action) for t in by_layer[layer])  # noqa: E731
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1 and key(runs[-1][0]) == key(layer):
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _row(label: str, methods: Iterable[str], tensors: list["TensorDecision"]) -> list[object]:
    total = Counter()
    for t in tensors:
        total["keep" if t.action == "save" else t.action] += t.nbytes
    overhead = sum(t.recompute_us for t in tensors if t.action == "recompute")
    return [label, "/".join(sorted(methods)) or "-", format_bytes(total["keep"]), format_bytes(total["recompute"]),
            format_bytes(total["offload"]), format_us(overhead)]


def _tensor_table(plan: "Plan") -> list[str]:
    """The decisions of one representative layer (the first that moves anything, else the largest)."""
    blocks = sorted({t.block for t in plan.tensors if t.block is not None})
    moved = {t.block for t in plan.tensors if t.block is not None and t.action in ("recompute", "offload")}
    sharing_of = {b: len({t2.block for t2 in plan.tensors if t2.klass in {t.klass for t in plan.tensors if t.block == b}})
                  for b in blocks}
    # the layer most others share decisions with, preferring one where something moves
    block = max(blocks, key=lambda b: (b in moved, sharing_of[b], -b)) if blocks else None
    chosen = [t for t in plan.tensors if t.block == block]
    sharing = sharing_of.get(block, 1)
    title = "outside the layers" if block is None else f"layer {block}" + (
        f" (decided once for {sharing} identical layers)" if sharing > 1 else "")
    rows = [[t.name, t.op.replace("aten.", ""), t.module or "-", "x".join(map(str, t.shape)), format_bytes(t.nbytes),
             t.action, t.reason] for t in chosen if t.action != "drop"]
    header = ["tensor", "op", "module", "shape", "size", "action", "reason"]
    return [f"saved tensors of {title}:", format_table(header, rows)]


def _module_lines(plan: "Plan") -> list[str]:
    if len(plan.modules) <= _MAX_MODULE_ROWS:
        rows = []
        for m in plan.modules:
            detail = ", ".join(f"{k}={v}" for k, v in m.details.items() if k != "block")
            block = m.details.get("block")
            rows.append([m.name, m.role, "-" if block is None else block, m.method,
                         f"{m.in_features}->{m.out_features}", f"{m.trainable_params:,}", detail])
        table = format_table(["module", "role", "block", "method", "shape", "trainable", "details"], rows)
    else:
        counts = Counter((m.role, m.method) for m in plan.modules)
        table = format_table(["role", "method", "modules"], [[r, meth, n] for (r, meth), n in sorted(counts.items())])
    share = 100.0 * plan.trainable_params / max(plan.total_params, 1)
    return [table, "", f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} ({share:.4f}%)"]


def _static_lines(plan: "Plan") -> list[str]:
    lines = []
    if plan.static is not None:
        static = plan.static.to_dict()
        lines += ["static memory (no plan changes it; gradients appear in backward, optimizer_step is the "
                  "optimizer step's extra peak):",
                  format_table(["category", "bytes", "size"], [[k, f"{v:,}", format_bytes(v)] for k, v in static.items()])]
    if plan.memory is not None:
        mem = plan.memory
        lines += ["" if lines else "", f"simulated eager step with everything kept: peak {format_bytes(mem.peak_bytes)} "
                  f"during {mem.peak_phase} (" + ", ".join(f"{k} {format_bytes(v)}" for k, v in
                                                           mem.peak.to_dict().items() if v) + ")"]
    return [line for line in lines if line is not None]


def _lowering_lines(plan: "Plan") -> list[str]:
    if not plan.needs_runtime:
        return ["carried out by: the model as it is (autograd keeps what this plan keeps and frees what it drops)"]
    moved = Counter(t.action for t in plan.tensors if t.action in ("recompute", "offload"))
    detail = ", ".join(f"{n} {a}" for a, n in sorted(moved.items())) or "the partitioner's saved set"
    as_is = plan.as_is_peak_bytes
    as_is = "" if as_is is None else f"; the model as it is keeps every activation and peaks at {format_bytes(as_is)}"
    return [f"carried out by: the lowered step ({detail}): the model memopt.optimize returns, or "
            f"OptimizedModel.use_plan{as_is}"]


def applied_lines(plan: "Plan", actions: "tuple[str, ...]", runs_on: str | None = None) -> list[str]:
    """What a model that carries out the decisions ``actions`` does with ``plan``: all of it, or which
    decisions it leaves undone (a dry run's model only keeps and drops, as autograd does). ``runs_on``:
    the device type a lowered model runs on; one without a host link (a CPU) carries out every
    decision but offloading."""
    left = Counter(t.action for t in plan.tensors if t.action not in actions)
    if not left:
        return [f"applied: everything in this plan is applied by this model ({', '.join(actions)})"]
    if runs_on is not None and set(left) == {"offload"}:
        offloaded = format_bytes(plan.bytes_by_action()["offload"])
        return [f"applied: all but the {left['offload']} offload decisions ({offloaded}): this model runs on {runs_on}, "
                "where host and device are one memory, so the tensors the plan offloads stay where they are and a "
                f"step peaks up to {offloaded} above the prediction; on the plan's GPU every decision is carried out"]
    detail = ", ".join(f"{n} {a}" for a, n in sorted(left.items()))
    as_is = plan.as_is_peak_bytes
    as_is = "" if as_is is None else f"; keeping every activation instead peaks at {format_bytes(as_is)}"
    return [f"PREDICTION ONLY: no model carries out this plan (a dry run): memopt.optimize, or "
            f"OptimizedModel.use_plan, lowers the {detail} decisions{as_is}"]


# ----------------------------------------------------------------------------- compare


def compare_plans(a: "Plan", b: "Plan") -> str:
    """``a`` -> ``b``: peak, predicted time, and the saved tensors whose action changed."""
    lines = [
        f"plan A: {a.model} {a.method} on {a.device.name}, budget {format_bytes(a.budget_bytes)}",
        f"plan B: {b.model} {b.method} on {b.device.name}, budget {format_bytes(b.budget_bytes)}",
        f"predicted peak: {format_bytes(a.predicted_peak_bytes)} -> {format_bytes(b.predicted_peak_bytes)} "
        f"({_signed_bytes(b.predicted_peak_bytes - a.predicted_peak_bytes)})",
        f"predicted overhead: {format_us(a.overhead_us)} -> {format_us(b.overhead_us)} "
        f"({_signed_us(b.overhead_us - a.overhead_us)}; recompute {format_us(a.recompute_us)} -> "
        f"{format_us(b.recompute_us)}, exposed copies {format_us(a.exposed_transfer_us)} -> "
        f"{format_us(b.exposed_transfer_us)})",
    ]
    theirs = {t.name: t for t in b.tensors}
    changed = [(t, theirs[t.name]) for t in a.tensors if t.name in theirs and theirs[t.name].action != t.action]
    only = len(set(t.name for t in a.tensors) ^ set(theirs))
    lines.append(f"decisions changed: {len(changed)} of {len(a.tensors)} saved tensors"
                 + (f" ({only} tensors are in only one plan)" if only else ""))
    groups: dict[tuple, list[int | None]] = {}
    for old, new in changed:
        key = (old.module and _without_block(old.module, old.block), old.op, old.nbytes, old.action, new.action)
        groups.setdefault(key, []).append(old.block)
    rows = [[_layers(blocks), module or "-", op.replace("aten.", ""), format_bytes(nbytes), f"{x} -> {y}"]
            for (module, op, nbytes, x, y), blocks in groups.items()]
    if rows:
        lines.append(format_table(["layers", "module", "op", "size", "action"], rows))
    return "\n".join(lines)


def _without_block(module: str, block: int | None) -> str:
    return module if block is None else module.replace(f".{block}.", ".N.", 1) if f".{block}." in module else module


def _layers(blocks: list[int | None]) -> str:
    numbered = sorted(b for b in blocks if b is not None)
    if not numbered:
        return _OUTSIDE
    span = str(numbered[0]) if numbered[0] == numbered[-1] else f"{numbered[0]}-{numbered[-1]}"
    return span if len(numbered) == 1 else f"{span} ({len(numbered)})"


def _signed_bytes(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_bytes(abs(n))


def _signed_us(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_us(abs(n))
