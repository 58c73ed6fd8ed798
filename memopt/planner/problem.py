"""The planning problem: every saved activation, what each choice for it costs, and the bytes.

Design note. Built from a :class:`~memopt.ir.joint.JointTrace` (pure function of it and a
DeviceSpec). Program points are the trace's ops: forward first, then backward. Each saved storage
(views follow their base: a decision is per storage) is a :class:`Candidate` with three options:

* **keep** — on device from its producer to its last backward use.
* **recompute** — freed after its last forward use and recomputed at a *materialize point* ``m``
  (its first backward use, one of the latest points where a dependent is recomputed, or the first
  backward point of its block — the whole block re-run from what is saved, as a checkpointed block
  is) by re-running its *closure*: the forward ops between it and
  what is still available (parameters, inputs, other saved tensors). The saved tensors the closure
  reads (``deps``) must be on device at ``m``: kept, or themselves materialized at or before
  ``m``; so ``m`` may be moved earlier, to a point where a dependent is recomputed. While it runs,
  the most bytes its closure holds at once (replayed in forward order, each temporary freed after
  its last reader) are counted at ``m`` — the largest of the closures recomputed at ``m``, which
  run one after another (the lowered step's peak is measured, so a closure sharing temporaries
  with another is caught there); its time is counted once per recomputed tensor (an upper
  bound when closures overlap), and once for the outputs of one op (attention's output and
  log-sum-exp: one decision class, the time on the first). Every seeded op in the closure (dropout, and attention kernels
  that take a seed even at dropout 0) makes torch's partitioner save the RNG state to replay it,
  from the forward to ``m`` (``replay_bytes``; once per tensor: an upper bound when closures share
  one). A closure may not reach into another layer (what that layer made is not saved) and has at
  most ``_MAX_CLOSURE_OPS`` ops.
* **offload** — copied to host on a copy engine that overlaps compute, as soon as it is made; on
  device until the copy has had time to finish (``ready``, its own transfer time after the
  producer) or its last forward use, whichever is later; prefetched to arrive by its first
  backward use, on device from the point its own transfer time before that (``fetch_start``) —
  or, for a tensor a recomputation reads, by one of its earlier points (``offload_points``, each
  with its ``fetch_starts``): attention's output offloaded and fetched where its block's
  residual is re-made from it, so the residual need not be saved too. Copies queue on
  one engine per direction (PCIe is full duplex): the forward copies' finishing time is the makespan of a
  single machine with release dates (Jackson's bound, exact for that machine) and whatever passes
  the end of the forward is exposed; prefetches start at the backward and their lateness against
  their deadlines (earliest-due-date order, exact) is exposed. Queueing does not extend residency —
  the one approximation, stated in every Plan.

Recompute sources (``extra`` candidates): the residual stream — tensors a block makes in its own
code or hands across a block boundary — is not saved by the default partitioner, but saving it
instead of what is derived from it (e.g. the fp32 copy a norm makes of a bf16 residual) is what
makes short recomputations possible, as torch's min-cut partitioner does. Such a tensor is a
candidate with the options **drop** (the default: not saved), **keep** (saved until the last
point a dependent may be recomputed), **offload** (saved on the host, prefetched for the first
point a dependent may be recomputed — the offloaded checkpoint of the residual stream Unsloth
runs), and **recompute** if its own closure allows.

Hard rules: a closure containing an RNG op (``rng`` tag: dropout, rand*) is never recomputed —
torch's non-reentrant checkpoint would replay RNG state, but the compiled lowering does not, so
the planner does not rely on it (``allow_rng_recompute`` lifts this); nor one containing a
collective or a mutation (in-place ops are tied to the tensor they write). Offload needs a host
link (CUDA targets). Memory that no decision changes — forward temporaries, backward temporaries,
gradients from the op that makes them — is the ``base`` of each point; parameters, buffers,
inputs and optimizer states are resident for the whole step (``static``).

Identical blocks: blocks (numbered children of one container, e.g. ``model.layers.N``) whose
forward and backward op sequences and saved sizes are identical share one decision per saved
tensor (``klass``) within a run of consecutive blocks (up to ``_CLASS_RUNS`` runs): the solver
decides one block per run and the plan broadcasts it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from memopt.ir.joint import OUTSIDE, JointTrace, Storage, TracedOp
from memopt.plan.schema import StaticMemory
from memopt.planner.costmodel import DeviceSpec, op_time_us, transfer_time_us

__all__ = ["ACTIONS", "StaticMemory", "Candidate", "PlanningProblem", "Choice", "Evaluation",
           "build_problem", "with_optimizer_peak", "evaluate", "without_idle_sources", "keep_all", "offloaded_bytes",
           "step_peak", "lowered_exposure"]

ACTIONS = ("keep", "recompute", "offload", "drop")
# Identical blocks share their decisions in up to this many runs of consecutive blocks, so a plan
# may treat some blocks one way and the rest another (Llama-3.1-8B at 524,288 tokens: attention's
# output offloaded in 25 of 32 layers and recomputed in the last 7, where the host has no room for
# all of them and recomputing all costs +26 %), with a model that grows by this factor, not by the
# number of blocks.
_CLASS_RUNS = 4
_MIN_RUN = 4  # blocks per run at least: fewer identical blocks than 2 runs' worth share one class
_MAX_POINTS = 4  # materialize points per saved tensor: its first backward use and 3 earlier ones
# A closure stays inside one block; longer than this, it walks back through tensors nobody saved
# and is not worth its time, and leaving it out keeps the model small. A Llama block whose MLP and
# norms run in 16 pieces of tokens (passes/seq_chunk.py) has ~500 forward ops: at 64 its LoRA
# inputs could not be recomputed (Llama-3.1-8B at 512k tokens: a 961 GiB lower bound).
_MAX_CLOSURE_OPS = 512
_FORBIDDEN_IN_RECOMPUTE = {
    "rng": "its recomputation would redraw random numbers ({op}); RNG state replay is not planned",
    "collective": "its recomputation would repeat a collective ({op})",
    "mutation": "its recomputation would repeat an in-place write ({op})",
}


@dataclass(frozen=True)
class Candidate:
    """One saved storage and its options; points are program points of the trace."""

    index: int
    storage: int
    name: str
    target: str
    module: str | None
    block: int | None
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    define: int
    last_forward: int
    first_backward: int
    last_backward: int
    points: tuple[int, ...]  # recompute points, ascending; the last is first_backward
    fetch_start: int  # where an offload's prefetch (due at first_backward) becomes resident
    ready: int  # last forward point an offloaded copy keeps it on device
    deps: tuple[int, ...]
    closure: tuple[int, ...]  # op indices re-run to recompute it
    recompute_us: int
    recompute_flops: int
    recompute_bytes: int
    transfer_us: int
    allowed: frozenset[str]
    reasons: Mapping[str, str] = field(default_factory=dict)
    klass: int = -1
    extra: bool = False  # not needed by the backward itself: a recompute source ("keep" or "drop")
    replay_bytes: int = 0  # RNG states saved from the forward to ``m`` to replay its seeded ops
    key: str | None = None  # the producing op's name-free identity (``memopt.ir.joint.op_keys``)
    closure_keys: tuple[str, ...] | None = None  # the closure's ops by key (None: an op without one)
    # Another output of the op that makes it (attention's log-sum-exp beside its output): decided
    # with that one (one class), and its recomputation re-runs the same ops, counted there.
    made_with: int | None = None
    # Where an offloaded copy may be back on device (ascending; the last is first_backward), and
    # from which point each fetch holds it: earlier than its first backward use when a
    # recomputation reads it (attention's output, read where its block's residual is re-made).
    offload_points: tuple[int, ...] = ()
    fetch_starts: tuple[int, ...] = ()
    # The forward op (by key) the lowering waits for an offloaded copy after, when ``ready`` is after
    # the last forward use: the device copy is held to there, as counted (None: at the last use).
    ready_key: str | None = None


@dataclass(frozen=True)
class PlanningProblem:
    """Everything the solver needs, in integers (bytes, µs, program points)."""

    candidates: tuple[Candidate, ...]
    num_points: int
    num_forward: int
    point_us: tuple[int, ...]
    base: tuple[int, ...]
    gradients: tuple[int, ...]  # the part of ``base`` that is parameter gradients
    static: StaticMemory
    device: DeviceSpec
    num_classes: int
    class_blocks: Mapping[int, tuple[int | None, ...]]  # class -> the blocks sharing it
    # class -> the class it shares with every run of the same identical blocks (``merged``)
    run_of: Mapping[int, int] = field(default_factory=dict)
    update_in_backward: bool = False  # each parameter updated (its gradient freed) as its gradient is made
    host_capacity: int | None = None  # bytes offloaded activations may hold in host memory (None: no limit)
    # The lowering waits for a copy out where the model counts it freed (its ``ready`` op): no stall,
    # the device copy held that long. False: right after its last forward use (less memory, stalls).
    wait_at_ready: bool = True

    @property
    def forward_us(self) -> int:
        return sum(self.point_us[: self.num_forward])

    @property
    def backward_us(self) -> int:
        return sum(self.point_us[self.num_forward:])

    @functools.cached_property
    def finish_us(self) -> tuple[int, ...]:
        """The time each op has finished, from the start of the step (nothing recomputed)."""
        return tuple(itertools.accumulate(self.point_us))

    @functools.cached_property
    def base_array(self) -> np.ndarray:
        return np.asarray(self.base, dtype=np.int64)

    @functools.cached_property
    def dependents(self) -> dict[int, list[int]]:
        """Candidate index -> the candidates whose recomputation reads it."""
        out: dict[int, list[int]] = {c.index: [] for c in self.candidates}
        for c in self.candidates:
            for d in c.deps:
                out[d].append(c.index)
        return out

    @functools.cached_property
    def classes(self) -> dict[int, list[Candidate]]:
        """Decision class -> its candidates (one per block sharing it)."""
        out: dict[int, list[Candidate]] = {}
        for c in self.candidates:
            out.setdefault(c.klass, []).append(c)
        return out


@dataclass(frozen=True)
class Choice:
    """What to do with one candidate; ``point`` is the materialize point (None for keep)."""

    action: str
    point: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """Exact bytes and µs of one assignment."""

    memory: tuple[int, ...]  # device bytes at every program point, static included
    peak_bytes: int
    peak_point: int
    recompute_us: int
    exposed_transfer_us: int
    valid: bool
    problems: tuple[str, ...] = ()
    saved: tuple[int, ...] = ()  # bytes of saved tensors on device at every point

    def breakdown(self, problem: "PlanningProblem", point: int | None = None) -> dict[str, int]:
        """Bytes per category at ``point`` (default: the peak); sums to ``memory[point]``."""
        p = self.peak_point if point is None else point
        static = problem.static
        grads = problem.gradients[p]
        out = {"parameters": static.parameters, "buffers": static.buffers, "inputs": static.inputs,
               "optimizer": static.optimizer, "gradients": grads, "activations": self.saved[p]}
        out["temporaries"] = self.memory[p] - sum(out.values())
        return out

    @property
    def overhead_us(self) -> int:
        return self.recompute_us + self.exposed_transfer_us


# ----------------------------------------------------------------------------- building


def build_problem(trace: JointTrace, device: DeviceSpec, *, allow_recompute: bool = True,
                  allow_offload: bool = True, allow_rng_recompute: bool = False,
                  update_in_backward: bool = False, host_capacity: int | None = None) -> PlanningProblem:
    """Requires: ``trace`` from :func:`memopt.ir.joint.trace_joint`. Ensures: one candidate per
    saved storage and per useful recompute source, in forward order; ``keep`` is always allowed.

    ``update_in_backward``: each parameter is updated as soon as its gradient is made and the
    gradient freed (``trace.optimizer_step_bytes`` is then one parameter's update transient, counted
    where a gradient is made, as the lowered step runs it); there is no optimizer phase after the
    backward.
    ``host_capacity``: the host bytes offloaded tensors may hold; they are all on the host at the
    end of the forward, so their sum is the host's peak and must not exceed it."""
    point_us = tuple(op_time_us(device, op.flops, op.bytes_moved, op.dtype) for op in trace.ops)
    uses = trace.uses()
    extra = set(_stream_tensors(trace, uses)) if allow_recompute else set()
    order = sorted(set(trace.saved) | extra, key=lambda sid: (trace.storages[sid].producer, sid))
    stops = {sid: i for i, sid in enumerate(order)}  # where a recomputation may start
    drafts = [_draft(trace, sid, uses.get(sid, []), stops, point_us, allow_rng_recompute, sid in extra)
              for sid in order]
    points = _materialize_points(drafts)
    fetch = _source_fetch_points(drafts, points)
    after = list(itertools.accumulate(point_us))  # time when op i has finished
    candidates = []
    for i, (d, p) in enumerate(zip(drafts, points)):
        if d["extra"] and not p:
            continue  # no recomputation can start from it: it stays a forward temporary
        if d["extra"]:
            d.update(first_backward=fetch[i], last_backward=max(p))
        candidates.append(_candidate(trace, d, p, device, after, allow_recompute, allow_offload))
    candidates = _with_offload_points(_renumbered(candidates, order), after, trace.num_forward)
    candidates, class_blocks, run_of = _outputs_tied(*_classes(trace, candidates))
    num_classes = len(class_blocks)
    modelled = {c.storage for c in candidates}
    return PlanningProblem(
        candidates=tuple(candidates), num_points=trace.num_points, num_forward=trace.num_forward,
        point_us=point_us, base=_updates(trace, _base(trace, uses, skip=modelled, in_backward=update_in_backward),
                                         update_in_backward),
        gradients=_base(trace, uses, kinds=("gradient",), in_backward=update_in_backward),
        static=_static(trace, update_in_backward), device=device,
        num_classes=num_classes, class_blocks=class_blocks, update_in_backward=update_in_backward,
        host_capacity=host_capacity, run_of=run_of,
    )


def _candidate(trace: JointTrace, d: dict, points: tuple[int, ...], device: DeviceSpec, after: Sequence[int],
               allow_recompute: bool, allow_offload: bool) -> Candidate:
    reasons = dict(d.pop("reasons"))
    allowed = {"keep"}
    if allow_recompute and "recompute" not in reasons:
        allowed.add("recompute")
    elif not allow_recompute:
        reasons.setdefault("recompute", "recomputation is switched off")
    transfer = transfer_time_us(device, d["nbytes"])
    if d["extra"]:  # a recompute source: not saved, saved, or saved on the host until a recomputation
        allowed.add("drop")
    if allow_offload and device.can_offload and "offload" not in reasons:
        allowed.add("offload")
    elif "offload" not in reasons:
        reasons["offload"] = "offload is switched off" if not allow_offload else f"{device.name} has no host link"
    ready = _ready(d["define"], transfer, after, trace.num_forward)
    return Candidate(index=-1, points=points, fetch_start=_fetch_start(d["first_backward"], transfer, after,
                                                                         trace.num_forward),
                     ready=ready, ready_key=_key_at(trace, ready) if ready > d["last_forward"] else None,
                     transfer_us=transfer, allowed=frozenset(allowed), reasons=reasons, **d)


def _key_at(trace: JointTrace, point: int) -> str | None:
    """The key of the forward op at ``point``, or of the nearest keyed one before it (a view has none)."""
    return next((op.key for op in reversed(trace.ops[:point + 1]) if op.key is not None), None)


def _with_offload_points(candidates: list[Candidate], after: Sequence[int], num_forward: int) -> list[Candidate]:
    """A saved tensor a recomputation may read is fetched by the earliest of its points it is read
    at (one of its recompute points); any other offload is fetched for its first backward use, and
    a recompute source for its first point (``_source_fetch_points``)."""
    read = {d for c in candidates for d in c.deps}
    out = []
    for c in candidates:
        points = c.points if c.index in read and not c.extra and c.points else (c.first_backward,)
        starts = tuple(c.fetch_start if m == c.first_backward else _fetch_start(m, c.transfer_us, after, num_forward)
                       for m in points)
        out.append(dataclasses.replace(c, offload_points=points, fetch_starts=starts))
    return out


def _renumbered(candidates: list[Candidate], order: list[int]) -> list[Candidate]:
    """Number candidates in order and their dependencies (drafted over ``order``) likewise. A
    recompute source that is no candidate was named only by tensors that are never recomputed."""
    index = {c.storage: i for i, c in enumerate(candidates)}
    return [dataclasses.replace(c, index=i, deps=tuple(index[order[d]] for d in c.deps if order[d] in index))
            for i, c in enumerate(candidates)]


def _draft(trace: JointTrace, sid: int, used_at: list[int], saved: Mapping[int, int], point_us: Sequence[int],
           allow_rng: bool, extra: bool) -> dict:
    storage = trace.storages[sid]
    producer = trace.ops[storage.producer]
    forward_uses = [p for p in used_at if p < trace.num_forward]
    backward_uses = [p for p in used_at if p >= trace.num_forward]
    assert backward_uses or extra, f"saved storage {storage.values[0]} is never read by the backward"
    closure, deps = _closure(trace, sid, saved)
    reasons = {}
    for op_index in closure:
        op = trace.ops[op_index]
        for tag, why in _FORBIDDEN_IN_RECOMPUTE.items():
            if tag in op.tags and not (tag == "rng" and allow_rng):
                reasons.setdefault("recompute", why.format(op=op.target))
    other_blocks = sorted({trace.ops[i].block for i in closure} - {None, producer.block})
    if producer.block is not None and other_blocks:
        reasons.setdefault("recompute", f"its recomputation would re-run ops of earlier layers ({other_blocks[0]}"
                                        f"{'' if len(other_blocks) == 1 else f'-{other_blocks[-1]}'}): what "
                                        "they made is not saved")
    if len(closure) > _MAX_CLOSURE_OPS:
        reasons.setdefault("recompute", f"its recomputation would re-run {len(closure)} forward ops (more than "
                                        f"{_MAX_CLOSURE_OPS}: back to tensors the backward does not keep)")
    if producer.module == OUTSIDE:  # a loss_fn's op: it runs in the user's code, by eager autograd
        for action in ("recompute", "offload"):
            reasons[action] = "made by the loss outside the model's forward, which autograd runs as it is"
    return dict(
        storage=sid, name=storage.values[0], key=storage.key, target=producer.target, module=producer.module,
        block=producer.block,
        nbytes=storage.nbytes, shape=storage.shape, dtype=storage.dtype, define=storage.producer,
        last_forward=max(forward_uses, default=storage.producer),
        first_backward=backward_uses[0] if backward_uses else None,
        last_backward=backward_uses[-1] if backward_uses else None, deps=tuple(sorted(deps)), closure=tuple(closure),
        closure_keys=_keys(trace.ops[i].key for i in closure),
        recompute_us=sum(point_us[i] for i in closure),
        recompute_flops=sum(trace.ops[i].flops for i in closure),
        recompute_bytes=_replay_peak(trace, closure, sid),
        replay_bytes=trace.rng_state_bytes * sum("seeded" in trace.ops[i].tags for i in closure),
        reasons=reasons, extra=extra,
    )


def _keys(keys: Iterable[str | None]) -> tuple[str, ...] | None:
    keys = tuple(keys)
    return None if None in keys else keys  # type: ignore[return-value]


def _replay_peak(trace: JointTrace, closure: list[int], sid: int) -> int:
    """The most bytes of temporaries alive while the closure re-runs in forward order, each freed
    after its last reader in the closure (the recomputed tensor itself is counted as resident)."""
    last_reader: dict[int, int] = {}
    for i in closure:
        for read in trace.ops[i].reads:
            last_reader[read] = i
    live, peak = 0, 0
    dying: dict[int, int] = {}  # op index -> bytes freed after it
    for i in closure:
        live += sum(trace.storages[a].nbytes for a in trace.ops[i].allocates if a != sid)
        peak = max(peak, live)
        for a in trace.ops[i].allocates:
            if a != sid:
                end = last_reader.get(a, i)
                dying[end] = dying.get(end, 0) + trace.storages[a].nbytes
        live -= dying.pop(i, 0)
    return peak


def _closure(trace: JointTrace, sid: int, saved: Mapping[int, int]) -> tuple[list[int], set[int]]:
    """Forward ops to re-run for storage ``sid``, and the saved candidates they read."""
    ops: set[int] = set()
    deps: set[int] = set()
    stack = [trace.storages[sid].producer]
    while stack:
        index = stack.pop()
        if index in ops:
            continue
        ops.add(index)
        for read in trace.ops[index].reads:
            storage = trace.storages[read]
            if read != sid and read in saved:
                deps.add(saved[read])
            elif storage.kind == "activation" and read != sid:
                stack.append(storage.producer)
    return sorted(ops), deps


def _stream_tensors(trace: JointTrace, uses: Mapping[int, list[int]]) -> tuple[int, ...]:
    """Forward tensors the backward does not need that are worth saving *instead*: the residual
    stream — made by a block's own code (not a submodule) or read across a block boundary. Saving
    one can make a recomputation short (e.g. re-cast a bf16 residual rather than keep its fp32 copy)."""
    saved = set(trace.saved)
    out = []
    for s in trace.storages:
        if s.kind != "activation" or s.id in saved:
            continue
        producer = trace.ops[s.producer]
        own = producer.block is not None and producer.module == f"{trace.block_prefix}.{producer.block}"
        readers = {trace.ops[p].block for p in uses.get(s.id, []) if p < trace.num_forward}
        if own or readers - {producer.block}:
            out.append(s.id)
    return tuple(out)


def _materialize_points(drafts: list[dict]) -> list[tuple[int, ...]]:
    """A dependency may have to be on device where a dependent is recomputed: add those points.

    Transitively, but only the ``_MAX_POINTS`` latest per tensor (a longer chain of recomputation
    would have to keep the tensor, which is sound — it only narrows the choices), plus the first
    backward point of each block: a tensor may be recomputed with its whole block there, so one
    saved block input serves the whole block's backward (the plan HF gradient checkpointing runs).
    A recompute source has no use of its own: its points are all its dependents'."""
    starts = _block_starts(drafts)  # where a whole block is re-run
    whole = set(starts.values())
    points = [set() if d["extra"] else {d["first_backward"]} for d in drafts]
    for i in reversed(range(len(drafts))):  # dependents are made after their dependencies
        start = starts.get(drafts[i]["block"])
        if start is not None and points[i] and min(points[i]) >= start:
            points[i].add(start)  # recomputed with its whole block, as a checkpointed block is
        points[i] = set(sorted(points[i])[-_MAX_POINTS:]) | (points[i] & whole)
        if "recompute" in drafts[i]["reasons"]:
            continue
        for dep in drafts[i]["deps"]:
            own = drafts[dep]["first_backward"]
            points[dep] |= {m for m in points[i] if own is None or m < own}
    return [tuple(sorted(p)) for p in points]


def _block_starts(drafts: list[dict]) -> dict[int, int]:
    """Block -> the first backward point of any tensor it saves (its backward's start)."""
    starts: dict[int, int] = {}
    for d in drafts:
        if d["block"] is not None and d["first_backward"] is not None:
            starts[d["block"]] = min(starts.get(d["block"], d["first_backward"]), d["first_backward"])
    return starts


def _source_fetch_points(drafts: list[dict], points: list[tuple[int, ...]]) -> dict[int, int]:
    """Where an offloaded recompute source must be back on device: the first of its points in the
    backward of the blocks that read it (the block it is the input of, re-run from it). Its earlier
    points serve recomputations reaching through it for later blocks (a block output re-made at
    the next block's start); an offloaded source is not back for those, so they must find it kept
    (the solver's dependency rule), which keeps the offloaded copy's device time short."""
    starts = _block_starts(drafts)
    readers: dict[int, set] = {i: set() for i, d in enumerate(drafts) if d["extra"]}
    for d in drafts:
        for dep in d["deps"]:
            if dep in readers:
                readers[dep].add(d["block"])
    out = {}
    for i, blocks in readers.items():
        if not points[i]:
            continue
        start = None if None in blocks or not blocks else min(starts.get(b, 0) for b in blocks)
        out[i] = min((p for p in points[i] if start is None or p >= start), default=min(points[i]))
    return out


def _ready(define: int, transfer: int, after: Sequence[int], num_forward: int) -> int:
    """The forward point after which a copy started when ``define`` finishes has had time to end."""
    for q in range(define, num_forward):
        if after[q] - after[define] >= transfer:
            return q
    return num_forward - 1


def _fetch_start(m: int, transfer: int, after: Sequence[int], num_forward: int) -> int:
    """The latest point whose start leaves ``transfer`` µs before op ``m`` starts (>= backward start)."""
    start_of = lambda p: after[p - 1] if p > 0 else 0  # noqa: E731
    for q in range(m, num_forward - 1, -1):
        if start_of(m) - start_of(q) >= transfer:
            return q
    return num_forward


def _base(trace: JointTrace, uses: Mapping[int, list[int]],
          kinds: tuple[str, ...] = ("activation", "temporary", "gradient", "output", "tangent"),
          skip: set[int] = frozenset(), with_saved: bool = False, in_backward: bool = False) -> tuple[int, ...]:
    """Bytes at each point of storages no decision changes (temporaries, gradients, the loss);
    ``with_saved``: and of the saved activations as the trace keeps them (from producer to last reader);
    ``in_backward``: a gradient lives only at the point that makes it (its update frees it)."""
    delta = [0] * (trace.num_points + 1)
    saved = set(skip) if with_saved else set(trace.saved) | set(skip)
    for s in trace.storages:
        if s.producer is None or s.id in saved or s.kind not in kinds:
            continue
        delta[s.producer] += s.nbytes
        delta[_last_point(trace, s, uses, in_backward) + 1] -= s.nbytes
    return tuple(itertools.accumulate(delta[:-1]))


def _updates(trace: JointTrace, base: tuple[int, ...], in_backward: bool, eager: bool = False) -> tuple[int, ...]:
    """``base`` with one parameter's update transient (the largest) where a gradient is made: with
    updates inside backward, the lowered step updates each parameter there, and nowhere else.
    ``eager``: the model run as it is updates in a hook after the whole autograd node (a node may
    make more gradients after the parameter's), so at every backward point, as an upper bound."""
    if not in_backward:
        return base
    at = {s.producer for s in trace.storages if s.kind == "gradient" and s.producer is not None}
    return tuple(b + (trace.optimizer_step_bytes if p in at or (eager and p >= trace.num_forward) else 0)
                 for p, b in enumerate(base))


def _last_point(trace: JointTrace, s: Storage, uses: Mapping[int, list[int]], in_backward: bool = False) -> int:
    """Where a storage no decision changes dies: gradients (unless updated inside backward: where
    made) and what the step returns (the loss, which the caller holds) live to the end; a tangent
    for the whole backward; the rest after their last reader."""
    if s.kind == "gradient" and in_backward:
        return s.producer
    if s.kind in ("gradient", "output", "tangent"):
        return trace.num_points - 1
    return max(uses.get(s.id, [s.producer])[-1], s.producer)


def _static(trace: JointTrace, in_backward: bool = False) -> StaticMemory:
    """What no decision changes; updated inside backward, no gradient outlives the backward and
    there is no optimizer step after it (its transient is in the backward's base)."""
    return StaticMemory(
        parameters=trace.bytes_of("parameter"), buffers=trace.bytes_of("buffer"), inputs=trace.bytes_of("input"),
        optimizer=trace.optimizer_state_bytes, gradients=0 if in_backward else trace.bytes_of("gradient"),
        optimizer_step=0 if in_backward else trace.optimizer_step_bytes,
    )


def _classes(trace: JointTrace, candidates: list[Candidate]) -> tuple[list[Candidate], dict, dict]:
    """Share one decision class per position across a run of consecutive blocks whose step is
    identical; and say, per class, the class of the same position in the first run of its blocks."""
    by_block: dict[int, list[Candidate]] = {}
    for c in candidates:
        if c.block is not None:
            by_block.setdefault(c.block, []).append(c)
    signature = {b: _block_signature(trace, b, by_block[b]) for b in by_block}
    groups: dict[tuple, list[int]] = {}
    for b in sorted(by_block):
        groups.setdefault(signature[b], []).append(b)
    klass: dict[int, int] = {}
    class_blocks: dict[int, tuple[int | None, ...]] = {}
    run_of: dict[int, int] = {}
    for same in groups.values():
        for position in range(len(by_block[same[0]])):
            first = len(class_blocks)
            for blocks in _runs(same):
                k = len(class_blocks)
                class_blocks[k] = tuple(blocks)
                run_of[k] = first
                for b in blocks:
                    klass[by_block[b][position].index] = k
    out = []
    for c in candidates:
        if c.index not in klass:
            k = len(class_blocks)
            class_blocks[k] = (c.block,)
            run_of[k] = k
            klass[c.index] = k
        out.append(dataclasses.replace(c, klass=klass[c.index]))
    return out, class_blocks, run_of


def _outputs_tied(candidates: list[Candidate], class_blocks: dict, run_of: dict) -> tuple[list[Candidate], dict, dict]:
    """Outputs of one op (attention's output and log-sum-exp) share a class: recomputing one re-runs
    the op, which makes both, so the time is counted once (on the first); keeping one while
    recomputing the other would pay for the op and keep its bytes too."""
    first: dict[int, Candidate] = {}
    into: dict[int, int] = {}
    for c in candidates:
        if c.extra:
            continue
        f = first.setdefault(c.define, c)
        if f is not c and f.allowed == c.allowed and f.closure == c.closure and f.klass != c.klass:
            into.setdefault(c.klass, f.klass)
    if not into:
        return candidates, class_blocks, run_of
    out = []
    for c in candidates:
        if c.klass in into:
            c = dataclasses.replace(c, klass=into[c.klass], recompute_us=0, made_with=first[c.define].index)
        out.append(c)
    return (out, {k: v for k, v in class_blocks.items() if k not in into},
            {k: into.get(v, v) for k, v in run_of.items() if k not in into})


def merged(problem: PlanningProblem) -> PlanningProblem:
    """``problem`` with every run of identical blocks sharing one class (one decision for all of
    them): a smaller model, whose assignments are assignments of ``problem`` too."""
    if all(k == v for k, v in problem.run_of.items()):
        return problem
    renumber = {k: i for i, k in enumerate(sorted(set(problem.run_of.values())))}
    blocks: dict[int, tuple[int | None, ...]] = {}
    for k, first in sorted(problem.run_of.items()):
        blocks[renumber[first]] = blocks.get(renumber[first], ()) + tuple(problem.class_blocks[k])
    candidates = tuple(dataclasses.replace(c, klass=renumber[problem.run_of[c.klass]]) for c in problem.candidates)
    return dataclasses.replace(problem, candidates=candidates, num_classes=len(renumber), class_blocks=blocks,
                               run_of={k: k for k in renumber.values()})


def _runs(blocks: list[int]) -> list[list[int]]:
    """Identical blocks in up to ``_CLASS_RUNS`` contiguous runs of at least ``_MIN_RUN`` blocks, one
    decision class each."""
    runs = min(_CLASS_RUNS, max(1, len(blocks) // _MIN_RUN))
    size, extra = divmod(len(blocks), runs)
    out, start = [], 0
    for r in range(runs):
        end = start + size + (r < extra)
        out.append(blocks[start:end])
        start = end
    return out


def _block_signature(trace: JointTrace, block: int, members: list[Candidate]) -> tuple:
    ops: list[TracedOp] = [op for op in trace.ops if op.block == block]
    return (tuple(op.signature() for op in ops),
            tuple((c.nbytes, c.target, tuple(sorted(c.allowed))) for c in members))


def with_optimizer_peak(problem: PlanningProblem, optimizer_peak: int | None) -> PlanningProblem:
    """``problem`` with the optimizer step's peak a simulation measured (the step runs as it is)."""
    if optimizer_peak is None:
        return problem
    static = problem.static
    return dataclasses.replace(problem, static=dataclasses.replace(
        static, optimizer_step=max(0, optimizer_peak - static.resident - static.gradients)))


def step_peak(trace: JointTrace, update_in_backward: bool = False, eager: bool = False) -> tuple[int, int]:
    """(peak bytes, program point) of the step exactly as traced: every storage from the op that
    makes it to its last reader (gradients to the end of the step, or, updated inside backward,
    only where made, with one update's transient), plus what is resident. For a trace of a lowered
    plan (``JointGraph.partitioned``) this is what the lowered step allocates; ``eager``: the step
    run as it is, its updates in hooks (their transient counted at every backward point)."""
    live = list(_updates(trace, _base(trace, trace.uses(), with_saved=True, in_backward=update_in_backward),
                         update_in_backward, eager)) or [0]
    static = _static(trace, update_in_backward)
    point = max(range(len(live)), key=live.__getitem__)
    return static.resident + live[point], point


# ----------------------------------------------------------------------------- evaluation


def keep_all(problem: PlanningProblem) -> tuple[Choice, ...]:
    """What the default partitioner does: keep every saved tensor, save nothing extra."""
    return tuple(Choice("drop" if c.extra else "keep") for c in problem.candidates)


def evaluate(problem: PlanningProblem, choices: Sequence[Choice]) -> Evaluation:
    """Exact device bytes at every point and the time overhead of ``choices`` (one per candidate)."""
    n = problem.num_points
    delta = [0] * (n + 1)
    spikes = [0] * n
    issues = []

    def add(lo: int, hi: int, nbytes: int) -> None:
        if lo <= hi:
            delta[lo] += nbytes
            delta[hi + 1] -= nbytes

    for c, choice in zip(problem.candidates, choices):
        if choice.action not in c.allowed:
            issues.append(f"{c.name}: {choice.action} is not allowed ({c.reasons.get(choice.action, '')})")
        if choice.action == "keep":
            add(c.define, c.last_backward, c.nbytes)
            continue
        if choice.action == "drop":
            add(c.define, c.last_forward, c.nbytes)
            continue
        points = c.points if choice.action == "recompute" else c.offload_points
        if choice.point not in points:
            issues.append(f"{c.name}: {choice.action} point {choice.point} is not one of {points}")
            continue
        fwd_end = c.last_forward if choice.action == "recompute" else max(c.last_forward, c.ready)
        add(c.define, fwd_end, c.nbytes)
        back = choice.point if choice.action == "recompute" else c.fetch_starts[points.index(choice.point)]
        add(back, c.last_backward, c.nbytes)
        if choice.action == "recompute":
            spikes[choice.point] = max(spikes[choice.point], c.recompute_bytes)  # closures run one after another
            add(c.define, choice.point, c.replay_bytes)
            issues += _missing_deps(problem, c, choice.point, choices)
    host = offloaded_bytes(problem, choices)
    if problem.host_capacity is not None and host > problem.host_capacity:
        issues.append(f"{host:,} bytes offloaded, above the host budget of {problem.host_capacity:,} bytes")
    static = problem.static.resident
    live = np.cumsum(np.asarray(delta[:-1], dtype=np.int64))
    total = problem.base_array + live + np.asarray(spikes, dtype=np.int64) + static
    memory = tuple(total.tolist())
    peak_point = int(np.argmax(total)) if n else 0
    recompute = sum(c.recompute_us for c, ch in zip(problem.candidates, choices) if ch.action == "recompute")
    exposed = _exposed_out(problem, choices) + _exposed_in(problem, choices)
    return Evaluation(memory, memory[peak_point] if n else static, peak_point, recompute, exposed, not issues,
                      tuple(issues), tuple(live.tolist()))


def without_idle_sources(problem: PlanningProblem, choices: Sequence[Choice], *,
                         each: bool = False) -> tuple[Choice, ...]:
    """``choices`` with every recompute source (``extra``) that no recomputation reads put back to
    drop: saving one costs device or host bytes and copies for nothing, and the lowering (torch's
    partitioner saves only what the backward reads) would not save it, so the plan would not say
    what runs. Per decision class, as the solver decides (a class is dropped only when none of its
    members has a recomputed dependent: the choices stay a hint the solver can take), or, with
    ``each``, per source (the plan's final word: the last block's output, in a class whose other
    members are read, is not saved either)."""
    groups = [[c] for c in problem.candidates if c.extra] if each else list(problem.classes.values())
    out = list(choices)
    changed = True
    while changed:  # a source dropped may leave the source it was recomputed from idle
        changed = False
        for members in groups:
            if not members[0].extra or all(out[c.index].action == "drop" for c in members):
                continue
            if any(out[t].action == "recompute" for c in members for t in problem.dependents[c.index]):
                continue
            for c in members:
                out[c.index] = Choice("drop")
            changed = True
    return tuple(out)


def offloaded_bytes(problem: PlanningProblem, choices: Sequence[Choice]) -> int:
    """Host bytes of ``choices``' offloads: all are on the host at the end of the forward (the host's peak)."""
    return sum(c.nbytes for c, ch in zip(problem.candidates, choices) if ch.action == "offload")


def _missing_deps(problem: PlanningProblem, c: Candidate, m: int, choices: Sequence[Choice]) -> list[str]:
    out = []
    for d in c.deps:
        dep = choices[d]
        if dep.action == "drop" or (dep.action != "keep" and (dep.point is None or dep.point > m)):
            out.append(f"{c.name} is recomputed at {m} but its input {problem.candidates[d].name} is not on device")
    return out


def lowered_exposure(problem: PlanningProblem, choices: Sequence[Choice]) -> int:
    """The copy time ``choices`` expose in the step the CUDA lowering runs (``memopt.runtime.partition``),
    at the device's roofline: one transfer stream carries every copy in the order they are issued; a
    copy out starts after its producer and is waited for after its last forward use or its ``ready``
    point, whichever is later (without ``wait_at_ready``: after its last use); a copy back is issued
    where the previous one is waited for (the first where it is itself) and waited for at its
    materialize point; recomputation runs before its point. The time the compute stream spends
    waiting is what is exposed. The planner's own model (``evaluate``) lets every copy back start at
    the backward's start and overlaps the directions: a lower bound of this."""
    offloaded = [c for c, ch in zip(problem.candidates, choices) if ch.action == "offload"]
    sent, waited = {}, {}
    for c in offloaded:
        sent.setdefault(c.define, []).append(c)
        at_ready = c.ready if c.ready_key is not None and problem.wait_at_ready else c.define
        waited.setdefault(max(c.last_forward, at_ready), []).append(c)
    back = sorted(offloaded, key=lambda c: (choices[c.index].point, c.index))
    due: dict[int, list[int]] = {}
    for k, c in enumerate(back):
        due.setdefault(choices[c.index].point, []).append(k)
    recompute = [0] * problem.num_points
    for c, ch in zip(problem.candidates, choices):
        if ch.action == "recompute":
            recompute[ch.point] += c.recompute_us
    clock = stream = stalled = 0
    done_out: dict[int, int] = {}
    done_in: dict[int, int] = {}

    def issue(duration: int) -> int:
        nonlocal stream
        stream = max(stream, clock) + duration
        return stream

    def wait(done: int) -> None:
        nonlocal clock, stalled
        stalled += max(0, done - clock)
        clock = max(clock, done)

    for p in range(problem.num_points):
        clock += recompute[p]
        for k in due.get(p, ()):
            for j in (k, k + 1):
                if j < len(back) and j not in done_in:
                    done_in[j] = issue(back[j].transfer_us)
            wait(done_in[k])
        clock += problem.point_us[p]
        for c in sent.get(p, ()):
            done_out[c.index] = issue(c.transfer_us)
        for c in waited.get(p, ()):
            wait(done_out[c.index])
    return stalled


def _exposed_out(problem: PlanningProblem, choices: Sequence[Choice]) -> int:
    after = problem.finish_us
    end = after[problem.num_forward - 1] if problem.num_forward else 0
    jobs = sorted((after[c.define], c.transfer_us) for c, ch in zip(problem.candidates, choices)
                  if ch.action == "offload")
    finish = 0
    for release, duration in jobs:  # FIFO by release date: Jackson's optimal makespan
        finish = max(finish, release) + duration
    return max(0, finish - end)


def _exposed_in(problem: PlanningProblem, choices: Sequence[Choice]) -> int:
    f = problem.num_forward
    before = (0,) + problem.finish_us
    jobs = sorted((before[ch.point] - before[f], c.transfer_us) for c, ch in zip(problem.candidates, choices)
                  if ch.action == "offload")
    done, late = 0, 0
    for deadline, duration in jobs:  # earliest-due-date order minimises the maximum lateness
        done += duration
        late = max(late, done - deadline)
    return late
