"""The Plan: what memopt decided for one model, step and device, as plain, versioned data.

A Plan is frozen and JSON-serialisable; ``Plan.from_json(plan.to_json()) == plan`` holds exactly.
It records the target device and budget, the method applied per module, the static memory of the
step, one decision per saved activation (keep / recompute / offload, with its size, producer op,
module and reason), the activation timeline (the device bytes over the step, bucketed, under the
plan and under keep-everything), the predicted peak and time overhead, and how the solver did.
Applying a plan is the runtime's job; a Plan never holds a reference to a model.

What a model does with a plan is not part of it: a Plan is the same whether `memopt plan` predicted
it or `memopt.optimize` returned it. The model `memopt.optimize` returns says what it carries out
(``OptimizedModel.applied``, the runtime's own report); ``as_is_peak_bytes`` is what the model as it
is (every activation kept, no lowering) would peak at.
``fingerprint`` identifies the rewritten model's structure (parameter and buffer names, shapes,
dtypes, trainability, module types): a plan is applied only to a model with the same one.
``recompute_flops`` is what recomputation adds to one step: the FLOPs of every forward op re-run
in the backward, each counted once (closures that share ops share them).

Format history: v1 held the simulated memory only; v2 added the planner's fields; v3 added
``fingerprint`` and ``recompute_flops``; v4 added each decision's ``key`` (the producing op's
name-free identity, by which the runtime finds it in a trace of other shapes or without the loss)
and the step's ``training`` / ``autocast`` state; v5 typed each module's ``details`` (their
``kind``), gave each recomputed tensor its ``closure`` (the forward ops the step re-runs for it, by
key) and dropped the runtime's state (``runtime_applies``, ``applied_peak_bytes``: a model's, not a
plan's); v6 (this) gives each offloaded tensor the op after which its copy to host is waited for
(``ready``; a v5 plan's wait after its last forward use). An older plan is read with what it lacks left
``None`` (no fingerprint check, recompute FLOPs unknown, decisions found by fx node name, closures
walked by the runtime) and what it has extra ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from memopt.device import DeviceSpec
from memopt.memory.report import MemoryReport
from memopt.passes.base import ModuleDecision

__all__ = ["PLAN_FORMAT_VERSION", "RUNTIME_ACTIONS", "Action", "Plan", "PlanFileError", "StaticMemory", "StepPlan",
           "check_writable", "TensorDecision", "MemoryTimeline", "SolverReport", "load_plan"]

PLAN_FORMAT_VERSION = 6
_UPGRADABLE = (2, 3, 4, 5)  # older versions read by filling in the fields they lack


class Action(str, enum.Enum):
    """What happens to a saved activation between forward and backward (a ``str``: ``Action.KEEP == "keep"``).

    keep: stays in device memory; recompute: dropped after its last forward use and recomputed in the
    backward from what is available; offload: copied to the host and back; save: a recompute source
    (a tensor others are recomputed from) kept in addition; drop: a recompute source not kept."""

    KEEP = "keep"
    DROP = "drop"
    SAVE = "save"
    RECOMPUTE = "recompute"
    OFFLOAD = "offload"


RUNTIME_ACTIONS = tuple(a.value for a in Action)  # ("keep", "drop", "save", "recompute", "offload")


class PlanFileError(ValueError):
    """A plan file (or dict) that is not a valid memopt plan; the message names the file and the field."""


@dataclass(frozen=True)
class StaticMemory:
    """Bytes that no planning decision changes. Resident for the whole step: parameters, buffers,
    inputs, optimizer states. ``gradients`` appear during backward; ``optimizer_step`` is the
    optimizer step's extra peak (e.g. foreach temporaries)."""

    parameters: int
    buffers: int
    inputs: int
    optimizer: int
    gradients: int
    optimizer_step: int

    @property
    def resident(self) -> int:
        return self.parameters + self.buffers + self.inputs + self.optimizer

    @property
    def optimizer_phase_peak(self) -> int:
        return self.resident + self.gradients + self.optimizer_step

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "buffers": self.buffers, "inputs": self.inputs,
                "optimizer": self.optimizer, "gradients": self.gradients, "optimizer_step": self.optimizer_step}

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> "StaticMemory":
        return cls(**{k: int(v) for k, v in data.items()})


@dataclass(frozen=True)
class TensorDecision:
    """What happens to one saved activation (a storage; its views follow it) between forward and backward.

    ``point`` is the backward program point where a recomputed tensor is recomputed or an offloaded
    one is due back (its first backward use, or an earlier point where a recomputation reads it);
    ``klass`` is the decision class: a run of consecutive blocks with identical steps shares it. A
    recomputed tensor's ``closure`` lists the forward ops re-run to make it, by key (the ops its
    ``recompute_us`` and ``recompute_flops`` price): the runtime recomputes exactly those and the
    views between them, and refuses a step that would re-run another op.
    """

    name: str
    module: str | None
    block: int | None
    op: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    action: str  # "keep" | "recompute" | "offload"; for a recompute source: "save" | "drop"
    point: int | None
    recompute_us: int
    recompute_flops: int
    transfer_us: int
    klass: int
    reason: str
    key: str | None = None  # the producing op's name-free identity (``memopt.ir.joint.op_keys``; None: v3)
    closure: tuple[str, ...] | None = None  # recompute: the forward ops re-run for it, by key (None: before v5)
    # offload: the forward op (by key) after which its copy to host has had time to finish, when that
    # is after its last forward use: the device copy is held, and the copy waited for, there (None: at
    # its last forward use; a plan from before this field)
    ready: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["shape"] = list(self.shape)
        out["closure"] = None if self.closure is None else list(self.closure)
        return out

    def __post_init__(self) -> None:
        if self.action not in RUNTIME_ACTIONS:
            raise ValueError(f"unknown action {self.action!r} for tensor {self.name!r}; the actions are "
                             f"{', '.join(RUNTIME_ACTIONS)}")
        for name in ("nbytes", "recompute_us", "recompute_flops", "transfer_us", "klass"):
            value = getattr(self, name)
            if not _is_count(value):
                raise ValueError(f"{name} of tensor {self.name!r} must be a non-negative integer, got {value!r}")
        if not all(_is_count(d) for d in self.shape):
            raise ValueError(f"shape of tensor {self.name!r} must hold non-negative integers, got {self.shape!r}")
        if self.point is not None and (isinstance(self.point, bool) or not isinstance(self.point, int)):
            raise ValueError(f"point of tensor {self.name!r} must be an integer or null, got {self.point!r}")
        if self.closure is not None and (self.action != "recompute" or not all(isinstance(k, str) for k in self.closure)):
            raise ValueError(f"closure of tensor {self.name!r} must be null, or op keys for a recomputed tensor; got "
                             f"{self.closure!r} for action {self.action!r}")
        if self.ready is not None and (self.action != "offload" or not isinstance(self.ready, str)):
            raise ValueError(f"ready of tensor {self.name!r} must be null, or an op key for an offloaded tensor; got "
                             f"{self.ready!r} for action {self.action!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorDecision":
        closure = data.get("closure")
        if closure is not None and not isinstance(closure, list):
            raise TypeError(f"closure must be a list of op keys or null, got {closure!r}")
        return cls(**{**data, "shape": tuple(data["shape"]), "closure": None if closure is None else tuple(closure)})


@dataclass(frozen=True)
class MemoryTimeline:
    """Device bytes over the step's program points, as the maximum within each bucket.

    Bucket ``i`` covers points ``starts[i]`` up to ``starts[i + 1]``; points below ``num_forward``
    are the forward. ``planned`` is under the plan, ``keep_all`` if every saved tensor is kept.
    """

    num_points: int
    num_forward: int
    starts: tuple[int, ...]
    planned: tuple[int, ...]
    keep_all: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"num_points": self.num_points, "num_forward": self.num_forward, "starts": list(self.starts),
                "planned": list(self.planned), "keep_all": list(self.keep_all)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemoryTimeline":
        return cls(int(data["num_points"]), int(data["num_forward"]), tuple(data["starts"]),
                   tuple(data["planned"]), tuple(data["keep_all"]))


@dataclass(frozen=True)
class SolverReport:
    """How the plan was found. Times in milliseconds; bytes exact."""

    status: str  # of the minimum-time phase ("OPTIMAL", "FEASIBLE", ...; "OPTIMAL" if keep-all fits)
    min_peak_status: str  # of the minimum-peak phase: OPTIMAL, FEASIBLE or WARM_START (CP-SAT found no better plan)
    min_feasible_bytes: int  # smallest peak of the whole step any plan reaches (budget = this + reserve)
    trace_ms: int
    solve_ms: int
    candidates: int
    classes: int
    quantum: int  # bytes per unit in the CP-SAT model
    rounds: int = 1  # solves until the lowered step's measured peak fitted the budget
    min_peak_bound: int | None = None  # the solver's proven lower bound on the modelled minimum peak

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SolverReport":
        data = dict(data)
        data.pop("calibration_bytes", None)  # plans before v4 were calibrated to a simulated step
        return cls(**data)


@dataclass(frozen=True)
class StepPlan:
    """What the planner decided and predicts for one step: the part of a ``Plan`` a (re-)plan makes.
    ``Plan.build`` assembles a Plan from it and the job's description; ``Plan.with_step`` replaces it."""

    predicted_peak_bytes: int
    static: StaticMemory
    tensors: tuple[TensorDecision, ...]
    timeline: MemoryTimeline
    compute_us: int
    recompute_us: int
    exposed_transfer_us: int
    solver: SolverReport
    lowered: bool
    update_in_backward: bool
    recompute_flops: int | None

    def fields(self) -> dict[str, Any]:
        """As ``Plan`` field values, by name (nested records kept as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


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
    trainable_params: int
    total_params: int
    predicted_peak_bytes: int
    memory: MemoryReport | None = None  # the simulated eager step with every activation kept
    static: StaticMemory | None = None
    tensors: tuple[TensorDecision, ...] = ()
    timeline: MemoryTimeline | None = None
    compute_us: int = 0  # forward + backward at the device's roofline, nothing recomputed
    recompute_us: int = 0
    exposed_transfer_us: int = 0
    solver: SolverReport | None = None
    notes: tuple[str, ...] = ()
    fingerprint: str | None = None  # of the rewritten model's structure (None: a v2 plan)
    recompute_flops: int | None = None  # added to one step by recomputation (None: a v2 plan)
    training: bool | None = None  # the train/eval mode the step was planned in (None: a v3 plan)
    autocast: str | None = None  # the autocast dtype the step was planned under ("bfloat16"; None: off)
    input_dtypes: Mapping[str, str] | None = None  # of the planned inputs, by name (None: a v3 plan)
    lowered: bool | None = None  # must the model run the lowered step? (None: a v3 plan: if it recomputes/offloads)
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)  # the counted optimizer's options (rank, ...)
    update_in_backward: bool = False  # each parameter updated, its gradient freed, as soon as its gradient is made
    host_budget_bytes: int | None = None  # host memory offloaded activations may hold (None: an older plan, no limit)
    # parameters the lowered step is traced with as trainable, whether or not they train at a call
    # (layerwise sampling: every sampled block; a call's backward leaves out the frozen ones'
    # gradients); None: those that require grad at the call
    traced_trainable: tuple[str, ...] | None = None
    # the pieces of tokens each position-wise MLP runs in, or MLP name -> pieces where not every MLP
    # runs in the same number (None: whole)
    sequence_chunks: int | Mapping[str, int] | None = None
    # the pieces of tokens the fused LM head and loss (cut cross-entropy) runs in (None: not fused, the
    # step makes the logits)
    cut_cross_entropy: int | None = None
    # the planned batch's attention_mask was all ones: the step is planned, as HF runs it, with no mask
    # tensor; a padded batch is another state of the step, with a plan of its own (memory.hf_masks)
    unpadded_mask: bool = False
    version: int = field(default=PLAN_FORMAT_VERSION)

    @classmethod
    def build(cls, step: StepPlan, *, model: str, method: str, method_config: Mapping[str, Any], optimizer: str,
              optimizer_options: Mapping[str, Any], device: DeviceSpec, budget_bytes: int, reserve_bytes: int,
              input_shapes: Mapping[str, tuple[int, ...]], input_dtypes: Mapping[str, str] | None,
              training: bool | None, autocast: str | None, capture: str, modules: tuple[ModuleDecision, ...],
              trainable_params: int, total_params: int, memory: MemoryReport | None, notes: tuple[str, ...],
              fingerprint: str | None, host_budget_bytes: int | None = None,
              traced_trainable: tuple[str, ...] | None = None,
              sequence_chunks: int | Mapping[str, int] | None = None,
              cut_cross_entropy: int | None = None, unpadded_mask: bool = False) -> "Plan":
        """A Plan from the planner's ``step`` and what the job was: every field named and typed."""
        return cls(model=model, method=method, method_config=method_config, optimizer=optimizer,
                   optimizer_options=optimizer_options, device=device, budget_bytes=budget_bytes,
                   reserve_bytes=reserve_bytes, input_shapes=input_shapes, input_dtypes=input_dtypes,
                   training=training, autocast=autocast, capture=capture, modules=modules,
                   trainable_params=trainable_params, total_params=total_params, memory=memory, notes=notes,
                   fingerprint=fingerprint, host_budget_bytes=host_budget_bytes, traced_trainable=traced_trainable,
                   sequence_chunks=sequence_chunks, cut_cross_entropy=cut_cross_entropy, unpadded_mask=unpadded_mask,
                   **step.fields())

    def with_step(self, step: StepPlan, **changes: Any) -> "Plan":
        """This Plan with the planner's part replaced by ``step`` (a re-plan), and ``changes``."""
        return dataclasses.replace(self, **step.fields(), **changes)

    @property
    def usable_bytes(self) -> int:
        """The budget less the device reserve: what the tracked tensors may occupy."""
        return self.budget_bytes - self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.predicted_peak_bytes

    @property
    def overhead_us(self) -> int:
        """Predicted extra time per step: recomputation plus copies not hidden under compute."""
        return self.recompute_us + self.exposed_transfer_us

    @property
    def needs_runtime(self) -> bool:
        """Does carrying out this plan take the lowered step? Yes when it recomputes or offloads,
        and when the model as it is would not fit (the lowered step saves what torch's
        partitioner saves, which can be less than eager autograd)."""
        return bool(self.lowered) or any(t.action in ("recompute", "offload") for t in self.tensors)

    @property
    def as_is_peak_bytes(self) -> int | None:
        """What the model as it is peaks at in this step: every activation kept, nothing lowered (the
        simulated eager step; else the planner's keep-everything timeline; None: a plan without either)."""
        if self.memory is not None:
            return self.memory.peak_bytes
        if self.timeline is None or self.static is None:
            return None
        return max(max(self.timeline.keep_all, default=0), self.static.optimizer_phase_peak)

    @property
    def min_budget_bytes(self) -> int | None:
        """The smallest budget (reserve included) at which a plan exists."""
        return None if self.solver is None else self.solver.min_feasible_bytes + self.reserve_bytes

    def bytes_by_action(self) -> dict[str, int]:
        """Bytes of saved tensors per action; "save" counts recompute sources saved in addition."""
        out = {"keep": 0, "recompute": 0, "offload": 0, "save": 0}
        for t in self.tensors:
            if t.action in out:
                out[t.action] += t.nbytes
        return out

    def module(self, name: str) -> ModuleDecision:
        for decision in self.modules:
            if decision.name == name:
                return decision
        raise KeyError(f"the plan has no decision for module {name!r}")

    def summary(self) -> str:
        """A per-layer table of decisions, the static breakdown, the predicted peak and overhead."""
        from memopt.plan.report import plan_summary

        return plan_summary(self)

    def __str__(self) -> str:  # print(plan): the summary, not the dataclass's field dump (repr keeps that)
        return self.summary()

    def draw(self, path: "str | Path") -> Path:
        """A picture of the plan (PNG or SVG by suffix; needs matplotlib, ``pip install 'memopt[plot]'``):
        device memory over the step for the plan and for keep-everything against the usable budget,
        the peak by kind, and kept / recomputed / offloaded bytes per layer. Returns the path."""
        from memopt.plan.draw import draw_plan

        return draw_plan(self, path)

    def compare(self, other: "Plan") -> str:
        """A readable diff of two plans: peak, time, and the decisions that changed."""
        from memopt.plan.report import compare_plans

        return compare_plans(self, other)

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
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "memory": None if self.memory is None else self.memory.to_dict(),
            "static": None if self.static is None else self.static.to_dict(),
            "tensors": [t.to_dict() for t in self.tensors],
            "timeline": None if self.timeline is None else self.timeline.to_dict(),
            "compute_us": self.compute_us,
            "recompute_us": self.recompute_us,
            "exposed_transfer_us": self.exposed_transfer_us,
            "solver": None if self.solver is None else self.solver.to_dict(),
            "notes": list(self.notes),
            "fingerprint": self.fingerprint,
            "recompute_flops": self.recompute_flops,
            "training": self.training,
            "autocast": self.autocast,
            "input_dtypes": None if self.input_dtypes is None else dict(self.input_dtypes),
            "lowered": self.lowered,
            "optimizer_options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.optimizer_options.items()},
            "update_in_backward": self.update_in_backward,
            "host_budget_bytes": self.host_budget_bytes,
            "traced_trainable": None if self.traced_trainable is None else list(self.traced_trainable),
            "sequence_chunks": self.sequence_chunks,
            "cut_cross_entropy": self.cut_cross_entropy,
            "unpadded_mask": self.unpadded_mask,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: "str | Path") -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanFileError(f"not a memopt plan: a JSON object is expected, got {type(data).__name__}")
        lacking = [k for k in ("version", "method", "budget_bytes") if k not in data]
        if lacking:
            raise PlanFileError(f"not a memopt plan: field(s) {', '.join(map(repr, lacking))} missing")
        version = data["version"]
        if version != PLAN_FORMAT_VERSION and version not in _UPGRADABLE:
            raise PlanFileError(
                f"plan format version {version!r} is not supported by this memopt (it reads versions "
                f"{', '.join(map(str, (*_UPGRADABLE, PLAN_FORMAT_VERSION)))}); version 1 plans hold no "
                "activation decisions to apply: re-plan with memopt.optimize or `memopt plan`"
            )
        def req(key: str, parse: Any = lambda v: v) -> Any:
            if key not in data:
                raise PlanFileError(f"field {key!r} is missing")
            return _parsed(key, data[key], parse)

        def opt(key: str, parse: Any = lambda v: v) -> Any:
            return None if data.get(key) is None else _parsed(key, data[key], parse)

        return cls(
            model=req("model", _str),
            method=req("method", _str),
            method_config=req("method_config", _lists_to_tuples),
            optimizer=req("optimizer", _str),
            device=req("device", _record(DeviceSpec)),
            budget_bytes=req("budget_bytes", _count),
            reserve_bytes=req("reserve_bytes", _count),
            input_shapes=req("input_shapes", lambda v: {k: tuple(_count(d) for d in s) for k, s in v.items()}),
            capture=req("capture", _str),
            modules=req("modules", lambda v: _each(v, _record(ModuleDecision))),
            trainable_params=req("trainable_params", _count),
            total_params=req("total_params", _count),
            predicted_peak_bytes=req("predicted_peak_bytes", _count),
            memory=opt("memory", MemoryReport.from_dict),
            static=opt("static", _record(StaticMemory)),
            tensors=req("tensors", lambda v: _each(v, _record(TensorDecision))),
            timeline=opt("timeline", MemoryTimeline.from_dict),
            compute_us=req("compute_us", _count),
            recompute_us=req("recompute_us", _count),
            exposed_transfer_us=req("exposed_transfer_us", _count),
            solver=opt("solver", SolverReport.from_dict),
            notes=req("notes", lambda v: tuple(_str(n) for n in v)),
            fingerprint=opt("fingerprint", _str),
            recompute_flops=opt("recompute_flops", _count),
            training=opt("training", _bool),
            autocast=opt("autocast", _str),
            input_dtypes=opt("input_dtypes", dict),
            lowered=opt("lowered", _bool),
            optimizer_options=opt("optimizer_options", _lists_to_tuples) or {},
            update_in_backward=opt("update_in_backward", _bool) or False,
            host_budget_bytes=opt("host_budget_bytes", _count),
            traced_trainable=opt("traced_trainable", lambda v: tuple(_str(n) for n in v)),
            sequence_chunks=opt("sequence_chunks", _pieces),
            cut_cross_entropy=opt("cut_cross_entropy", _count) if "cut_cross_entropy" in data else
            _fused_pieces(data.get("notes") or ()),
            unpadded_mask=opt("unpadded_mask", _bool) or False,
            version=PLAN_FORMAT_VERSION,  # an older plan is upgraded as it is read
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text, parse_constant=_no_constant))


def _lists_to_tuples(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _record(cls: Any) -> Any:
    """``cls.from_dict``, after checking the value is an object holding ``cls``'s required fields."""
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    def parse(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object with the fields of a {cls.__name__} ({', '.join(required)}), got "
                            f"{type(value).__name__} {value!r}")
        missing = [name for name in required if name not in value]
        if missing:
            raise ValueError(f"field(s) {', '.join(map(repr, missing))} missing")
        return cls.from_dict(value)

    return parse


def _located(where: str, parse: Any, value: Any) -> Any:
    """``parse(value)``; a failure becomes a ``PlanFileError`` prefixed by ``where`` (a field, a list
    index), so nested failures read ``field 'tensors'[3]: ...``."""
    try:
        return parse(value)
    except PlanFileError as exc:  # already located below: prefix the outer place
        raise PlanFileError(f"{where}{exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PlanFileError(f"{where}: {detail}") from None


def _parsed(key: str, value: Any, parse: Any) -> Any:
    return _located(f"field {key!r}", parse, value)


def _each(values: Any, parse: Any) -> tuple:
    if not isinstance(values, list):
        raise TypeError(f"expected a list, got {type(values).__name__}")
    return tuple(_located(f"[{i}]", parse, value) for i, value in enumerate(values))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> int:
    if not _is_count(value):
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _pieces(value: Any) -> int | dict[str, int]:
    """``sequence_chunks``: a count, or module name -> count."""
    if isinstance(value, dict):
        return {_str(name): _count(count) for name, count in value.items()}
    return _count(value)


_FUSED = re.compile(r"cut cross-entropy: the LM head and the loss fused \((\d+) pieces? ")


def _fused_pieces(notes: Any) -> int | None:
    """A plan saved before ``cut_cross_entropy`` was a field says it in its notes."""
    found = (_FUSED.match(n) for n in notes if isinstance(n, str))
    return next((int(m.group(1)) for m in found if m), None)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value a plan holds")


class _Constant(str):
    """A JSON ``NaN`` / ``Infinity`` as read, so the error can name the field that holds it."""


def _constant_at(tree: Any, where: str) -> tuple[str, str] | None:
    """(the place, the constant) of the first NaN / Infinity in ``tree``, e.g. ``'tensors'[3]['nbytes']``."""
    if isinstance(tree, _Constant):
        return where, str(tree)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        found = _constant_at(value, f"{where}[{key!r}]" if where else repr(key))
        if found is not None:
            return found
    return None


def check_writable(path: "str | Path") -> Path:
    """``path`` if a file can be written there (not a directory, an existing writable folder), else a
    ``ValueError`` saying why; checked before long work whose result goes there."""
    import os

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path}: not writable")
    return path


def load_plan(path: "str | Path") -> Plan:
    """Read a Plan written by ``Plan.save`` / ``Plan.to_json``; every field is checked, and an error
    (``PlanFileError``, a ``ValueError``) names the file and the field."""
    path = Path(path)
    if path.is_dir():
        raise PlanFileError(f"{path} is a directory; a plan is one JSON file (`memopt plan ... --json PATH` "
                            "or Plan.save(PATH) writes one)")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no plan file at {path}") from None
    except UnicodeDecodeError as exc:
        raise PlanFileError(f"{path} is not a memopt plan: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_Constant)
        where = _constant_at(data, "")
        if where is not None:  # NaN / Infinity: no field of a plan holds one
            raise PlanFileError(f"{path} is not a memopt plan: field {where[0]}: {where[1]} is not a value a plan holds")
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{path} is not a memopt plan: invalid JSON at line {exc.lineno} column {exc.colno} "
                            f"({exc.msg})") from None
    except RecursionError:
        raise PlanFileError(f"{path} is not a memopt plan: its JSON is nested too deeply") from None
    try:
        return Plan.from_dict(data)
    except (PlanFileError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PlanFileError(f"{path} is not a valid memopt plan: {exc}") from None
