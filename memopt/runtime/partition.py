"""A Plan lowered onto the joint graph: selective-checkpoint tags, torch's partitioner, offload nodes.

Design note. The runtime traces the training step the same way the planner did
(``memopt.ir.joint``: AOTAutograd over ``functional_call``), so the joint graph's forward nodes
carry the names the Plan's decisions refer to. Lowering a Plan is then three graph edits:

1. **Tags.** Each saved storage the Plan decides on gets torch's selective-checkpoint policy on
   its nodes (``node.meta["recompute"]``, as ``torch.utils.checkpoint``'s SAC contexts leave it
   under ``torch.compile``): kept, saved and offloaded tensors ``MUST_SAVE``; a recomputed one
   ``MUST_RECOMPUTE``, together with its *closure* — the forward nodes between it and what is
   available (primals and the tensors the Plan saves), the same walk the planner prices.
2. **Partition.** torch's ``default_partition`` honours the tags: it saves the ``MUST_SAVE``
   nodes and whatever else the backward reads, copies the ``MUST_RECOMPUTE`` nodes into the
   backward, places each copy right before its first use (``reordering_to_mimic_autograd_engine``)
   and, if a recomputed node draws random numbers, replays its RNG state
   (``functionalize_rng_ops``): recomputed dropout masks are the forward's.
3. **Offload.** Each saved node of an offloaded storage leaves the forward through a copy to host
   and enters the backward through a copy back, by one of three lowerings (``OffloadMode``):
   ``"cuda"`` — asynchronous ``offload_to_host`` / ``reload_to_device`` / ``wait_transfer`` ops
   (``memopt.runtime.transfer``) on a transfer stream with events (copy out when made, device
   copy freed after its last forward use; reload prefetched ahead of its first backward use);
   ``"host"`` — nothing: where host and
   device are one memory (a CPU running a plan made for a GPU) the tensor stays; ``"simulated"`` —
   for fake tensors standing in for a GPU: the forward drops the tensor for a zero-byte token
   (counting its bytes as host bytes) and the backward re-creates an empty tensor of its layout
   right before its first use. Values are not kept, so only fake-tensor runs may use it.

Decisions are found by their ``key`` (the producing op's module, op and ordinal there:
:func:`memopt.ir.joint.op_keys`), so a trace with symbolic sizes, another batch size or without the
loss finds them as well as one at the plan's shapes. A decision whose tensor this step does not
make is skipped (a call without labels makes no loss; batch 1 drops a copy) — nothing is left to
keep or free. What is an error, never a silent fallback (:class:`~memopt.errors.PlanMismatchError`):
a decided tensor made by another op, or of another layout at the plan's shapes, and a tensor the
step saves for its backward that the plan has no decision on — the step is another program than
the one planned (dropout switched on, another model), and its peak is not the plan's. Plans
without keys (format v3) are matched by fx node name, and every decision must be found.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._functorch.partitioners import _has_tag_is_forward, _is_primal, _is_tangent, default_partition
from torch.utils.checkpoint import CheckpointPolicy

from memopt.errors import MemoptError, PlanMismatchError
from memopt.ir.joint import OUTSIDE, op_keys
from memopt.plan import Plan, TensorDecision

__all__ = ["OFFLOAD_MODES", "LoweringReport", "is_keyed", "plan_partition", "tag_joint"]

OFFLOAD_MODES = ("cuda", "host", "simulated")
_SAVED = ("keep", "save", "offload")
_AC_GRAPH = 1  # one region: the whole step (see torch's cleanup_recompute_tags)


@dataclass
class LoweringReport:
    """What one lowering did to the graph (filled in by the partition function)."""

    recomputed_nodes: list[str] = field(default_factory=list)  # forward nodes copied into the backward
    recompute_flops: int = 0  # their FLOPs: what recomputation adds to one step
    saved: list[str] = field(default_factory=list)  # forward nodes handed to the backward
    saved_bytes: int = 0  # their distinct storages' bytes, parameters and inputs excluded
    offloaded: list[str] = field(default_factory=list)
    host_bytes: int = 0  # bytes on host between forward and backward
    skipped: list[str] = field(default_factory=list)  # decisions on tensors this step does not make (lenient)


# ----------------------------------------------------------------------------- simulated offload ops

@torch.library.custom_op("memopt::offload_simulated", mutates_args=())
def offload_simulated(x: torch.Tensor) -> torch.Tensor:
    """The device copy of ``x`` may die: a zero-byte token stands for the host copy (fake runs only)."""
    raise RuntimeError("memopt's simulated offload runs only on fake tensors; lower with offload mode 'host' "
                       "or 'cuda' to execute a plan with offloaded tensors on real ones")


@offload_simulated.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("memopt::reload_simulated", mutates_args=())
def reload_simulated(token: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A new device tensor of the offloaded layout (fake runs only: the values are not kept)."""
    raise RuntimeError("memopt's simulated reload runs only on fake tensors")


@reload_simulated.register_fake
def _(token: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype, device=token.device)


# ----------------------------------------------------------------------------- the partition function

def is_keyed(decisions: Sequence[TensorDecision]) -> bool:
    """Are the decisions found by op key (format v4 and later), not by fx node name? A decision made
    outside the model without a key — a view of a constant a ``loss_fn`` closes over (its labels,
    flattened) — is no reason to fall back to names: the step without the loss never makes it."""
    return all(t.key is not None or t.module == OUTSIDE for t in decisions)


def plan_partition(plan: "Plan | Sequence[TensorDecision]", *, offload_mode: str, check_layout: bool,
                   report: LoweringReport | None = None,
                   allow_constants: bool = False) -> Callable[..., tuple[fx.GraphModule, fx.GraphModule]]:
    """A partition function (torch's signature) that carries out ``plan``'s decisions (a Plan,
    or its ``tensors``).

    ``check_layout``: the graph is traced at the plan's input shapes, so every decided tensor must
    have the planned shape and dtype too (off for a graph traced at smaller shapes).
    ``allow_constants``: a simulated lowering whose graphs hold tensor constants is only measured
    (``memopt.ir.joint.JointGraph.partitioned``), not run.
    """
    decisions = tuple(plan.tensors if isinstance(plan, Plan) else plan)
    if offload_mode not in OFFLOAD_MODES:
        raise ValueError(f"offload_mode must be one of {OFFLOAD_MODES}, got {offload_mode!r}")
    report = LoweringReport() if report is None else report

    def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        _sizes_not_tensors(joint.graph)
        _no_full_slices(joint.graph)
        keyed = is_keyed(decisions)
        keys = op_keys(joint.graph) if keyed else {}
        # what the forward returns (its outputs, the new values of buffers it writes): held by the
        # caller, as the planner counts them
        returned = {_storage(n) for n in joint.graph.output_node().args[0][:kwargs["num_fwd_outputs"]]
                    if isinstance(n, fx.Node)}
        offloaded = tag_joint(joint, decisions, check_layout=check_layout, skipped=report.skipped if keyed else None,
                              returned=returned)
        with _static_rng_state():
            fw, bw = default_partition(joint, joint_inputs, **kwargs)
        for gm in (fw, bw):  # as the planner's trace: no unused copy of a multi-output op (attention)
            gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
            _sizes_early(gm.graph)
            gm.recompile()
        recomputed = [n for n in bw.graph.nodes if _is_recomputed(n)]
        report.recomputed_nodes = [n.name for n in recomputed]
        report.recompute_flops = sum(_flops(n) for n in recomputed)
        saved = _saved_outputs(fw, kwargs["num_fwd_outputs"])
        report.saved = [n.name for n in saved]
        primals = {_storage(p) for p in fw.graph.find_nodes(op="placeholder")}
        report.saved_bytes = sum(_nbytes(n) for n in {_storage(n): n for n in saved
                                                      if _storage(n) not in primals}.values())
        if keyed:
            _refuse_unplanned(fw, saved, primals | returned, keys, {t.key.partition("[")[0] for t in decisions
                                                                          if t.key is not None})
        offloads = _offloads(fw, saved, offloaded, kwargs["num_fwd_outputs"], _ready_names(joint, decisions, keys)) \
            if offload_mode in _OFFLOAD else []
        if offloads:
            _OFFLOAD[offload_mode](fw, bw, offloads)
            fw.recompile()
            bw.recompile()
        report.offloaded = [o.carrier.name for o in offloads]
        report.host_bytes = sum(_nbytes(o.carrier) for o in offloads)
        if _mutated_inputs_saved_as_copies(joint, fw, kwargs["num_fwd_outputs"]):
            fw.recompile()
        if offload_mode == "simulated" and not allow_constants:
            _refuse_constants(fw, bw)
        return fw, bw

    return partition


_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


@contextlib.contextmanager
def _static_rng_state() -> Any:
    """The partitioner fakes the RNG state it saves for a replayed random op with the tracing fake
    mode; under symbolic sizes that would give the state (a fixed-size byte tensor) a size symbol of
    its own, which nothing binds (Inductor refuses such a graph)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode()
    if mode is None or mode.static_shapes:
        yield
        return
    mode.static_shapes = True
    try:
        yield
    finally:
        mode.static_shapes = False


def _sizes_not_tensors(graph: fx.Graph) -> None:
    """In a trace with symbolic sizes the backward reads some sizes off forward tensors
    (``sym_size(logits, 1)``), and the partitioner then saves the whole tensor for its size. Read
    each such size from a forward size node of the same value, or off an input, instead: the
    backward then saves an integer, as a trace with static sizes saves nothing."""
    forward_sizes: dict[Any, fx.Node] = {}
    input_sizes: dict[Any, tuple[fx.Node, int]] = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and not _is_tangent(node) and isinstance(val, torch.Tensor):
            for dim, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    input_sizes.setdefault(size.node.expr, (node, dim))
        elif isinstance(val, torch.SymInt) and node.op == "call_function" and not _is_backward(node):
            forward_sizes.setdefault(val.node.expr, node)
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.sym_size.int or not _is_backward(node):
            continue
        source = node.args[0]
        if source.op == "placeholder" or _is_backward(source):
            continue
        expr = node.meta["val"].node.expr
        if expr in forward_sizes:
            node.replace_all_uses_with(forward_sizes[expr])
        elif expr in input_sizes:
            node.args = input_sizes[expr]
        else:
            continue
        if not node.users:
            graph.erase_node(node)


_SIZE_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
             torch.ops.aten.sym_storage_offset.default)


def _sizes_early(graph: fx.Graph) -> None:
    """Read each symbolic size right where its tensor is made: a size read late (the partitioner
    puts the sizes it hands to the backward at the end of the forward) would keep the tensor alive
    until then — memory a trace with static sizes does not hold."""
    placeholders = graph.find_nodes(op="placeholder")
    for node in list(graph.nodes):
        if node.target in _SIZE_OPS and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            (placeholders[-1] if source.op == "placeholder" else source).append(node)


_FULL = 2**62  # a slice's end at or past this is "to the end" (Python's ``x[:, i:]``)


def _no_full_slices(graph: fx.Graph) -> None:
    """``x[:, 0:]`` traced with static sizes is ``x`` itself; with symbolic sizes it is a slice op,
    and its backward a ``slice_backward`` that copies the whole gradient into a new tensor. Both
    are the identity: drop them, so the symbolic step is the static one."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is aten.slice.Tensor:
            _, dim, start, end, step = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
        elif node.target is aten.slice_backward.default:
            _, sizes, dim, start, end, step = node.args
            val = node.args[0].meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.shape == node.meta["val"].shape):
                continue
        else:
            continue
        if start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= _FULL)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _is_backward(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_backward"


def _refuse_unplanned(fw: fx.GraphModule, saved: list[fx.Node], primals: set[Any], keys: dict[str, str],
                      planned: set[str]) -> None:
    """Every activation the forward hands to the backward must be one the plan decided on (``primals``:
    the storages of the step's inputs and of what the forward returns, which it holds anyway)."""
    carriers: dict[Any, fx.Node] = {}
    for node in fw.graph.nodes:
        if node.op == "call_function":
            carriers.setdefault(_storage(node), node)
    for node in saved:
        storage = _storage(node)
        carrier = carriers.get(storage)
        if storage in primals or carrier is None or _makes_rng_state(carrier):
            continue
        key = keys.get(carrier.name)
        if key is not None and key not in planned:
            raise PlanMismatchError(
                f"this training step saves {carrier.name} ({carrier.target} in "
                f"{key.rpartition(':')[0] or 'the model'}, key {key}) for its backward, which the plan has no "
                "decision on: the plan does not cover this step (a plan file edited or cut short), or the step is "
                "another program than the one planned (a changed train/eval mode, dropout or adapter flag, or "
                "another model)")


def _makes_rng_state(node: fx.Node) -> bool:
    """The partitioner's own RNG-state saves for replayed random ops (not in the plan's trace)."""
    while node.target is operator.getitem:
        node = node.args[0]
    return node.target is torch._prims.rng_prims.run_and_save_rng_state


def _refuse_constants(*modules: fx.GraphModule) -> None:
    """A simulated step (fake tensors) cannot hold the graph's lifted real constants (a tensor the
    model's code makes, ``torch.tensor(...)``): AOTAutograd copies the backward graph under the fake
    mode, which fails."""
    for gm in modules:
        for node in gm.graph.find_nodes(op="get_attr"):
            if isinstance(getattr(gm, node.target, None), torch.Tensor):
                raise MemoptError(
                    "simulating the lowered step of this model is not supported yet: its traced step holds "
                    f"tensor constants ({node.target}; a tensor the model's code makes, torch.tensor(...)). The "
                    "plan's prediction and a real run are not affected")


def _is_recomputed(node: fx.Node) -> bool:
    """A forward node copied into the backward (an op replaying its RNG state is one, untagged)."""
    return node.meta.get("recompute") in _RECOMPUTE or node.target is torch._prims.rng_prims.run_with_rng_state


def tag_joint(joint: fx.GraphModule, plan: "Plan | Sequence[TensorDecision]", *, check_layout: bool = True,
              skipped: list[str] | None = None, returned: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Tag ``joint``'s forward nodes with the plan's policies; return the offloaded storages' keys.

    ``skipped``: where given, decisions on tensors the graph does not make are appended there (by
    name) instead of raising ``PlanMismatchError``. ``returned``: the storages of what the forward
    returns (its outputs, the new values of buffers it writes) — the planner counts them held by the
    caller, so a recomputation that reads one reads it saved, never re-made."""
    forward = _forward_nodes(joint)
    by_name = {n.name: n for n in forward}
    by_key = {key: by_name[name] for name, key in op_keys(joint.graph).items() if name in by_name}
    decisions = plan.tensors if isinstance(plan, Plan) else plan
    storage_nodes: dict[int, list[fx.Node]] = {}
    for node in forward:
        key = _storage(node)
        if key is not None:
            storage_nodes.setdefault(key, []).append(node)
    action: dict[int, str] = {}
    found: list[TensorDecision] = []
    for decision in decisions:
        node = None if skipped is not None and decision.key is None else _node_of(decision, by_name, by_key)
        if node is None:
            if skipped is None:
                raise PlanMismatchError(
                    f"the plan decides on tensor {decision.name!r} ({decision.op} in {decision.module or 'the model'}"
                    f"{'' if decision.key is None else f', key {decision.key}'}), which this training step does not "
                    "make: the step is another program than the one planned (another model or method, or a changed "
                    "train/eval mode, dropout or adapter flag)")
            skipped.append(decision.name)
            continue
        _check(decision, node, check_layout)
        action[_storage(node)] = decision.action
        found.append(decision)
    available = {key for key, a in action.items() if a in _SAVED}
    recomputed = [n for key, a in action.items() if a == "recompute" for n in storage_nodes[key]]
    for key in available:
        for node in storage_nodes[key]:
            _tag(node, CheckpointPolicy.MUST_SAVE)
    # The closure of every recomputed tensor: the ops the plan lists (and priced), with the views
    # between them — walked back from each recomputed tensor to what is available. An op with a key
    # outside the plan's closures means this step recomputes what the plan did not price: refused.
    # Sizes (SymInt nodes of a trace with symbolic sizes) are not walked through: the partitioner
    # hands them to the backward as integers; walking into the tensor a size was read from would
    # recompute it too.
    planned = _planned_closure(found, by_key)
    keyed = set(by_key.values())
    constant = _constant_nodes(forward)
    stack, seen = list(recomputed), set()
    while stack:
        node = stack.pop()
        if node in seen or _is_primal(node) or node.op != "call_function" or _is_size(node):
            continue
        seen.add(node)
        if _storage(node) in available:
            continue
        if _storage(node) in returned and _storage(node) not in action:  # (a counter written back and read again)
            _tag(node, CheckpointPolicy.MUST_SAVE)
            continue
        if planned is not None and node in keyed and node not in planned and _allocates_from_activations(node, constant):
            raise PlanMismatchError(
                f"recomputing what the plan recomputes re-runs {node.name} ({_packet(str(node.target))}), an op no "
                "closure of the plan holds: the plan does not cover this step (a plan file edited or cut short), or "
                "the step is another program than the one planned (a changed train/eval mode, dropout or adapter "
                "flag, or another model)")
        _tag(node, CheckpointPolicy.MUST_RECOMPUTE)
        stack.extend(node.all_input_nodes)
    return {key for key, a in action.items() if a == "offload"}


def _planned_closure(decisions: Sequence[TensorDecision], by_key: dict[str, fx.Node]) -> set[fx.Node] | None:
    """The forward nodes the plan's recomputed tensors re-run (None: a plan before v5, without closures:
    the runtime's walk alone decides). A key this trace lacks is an op it does not run (a call without
    labels runs no loss): nothing to re-run."""
    recomputed = [d for d in decisions if d.action == "recompute"]
    if any(d.closure is None for d in recomputed):
        return None
    return {by_key[key] for d in recomputed for key in d.closure if key in by_key}


def _allocates_from_activations(node: fx.Node, constant: set[fx.Node]) -> bool:
    """Does ``node`` make a storage of its own (not a view of an input's, as ``_unsafe_view`` makes) from
    the step's inputs? Not so an op on constants alone (a lookup table lifted and indexed): a trace on
    fake tensors may hold its result as a constant, and the planner prices it so."""
    return node not in constant and _storage(node) not in {_storage(arg) for arg in node.all_input_nodes}


def _constant_nodes(forward: list[fx.Node]) -> set[fx.Node]:
    """The forward nodes computed from constants alone (``get_attr`` tensors, ``arange``): no primal feeds them."""
    out: set[fx.Node] = set()
    for node in forward:  # in graph order: inputs first
        if node.op == "call_function" and all(a.op == "get_attr" or a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _tag(node: fx.Node, policy: CheckpointPolicy) -> None:
    node.meta["recompute"] = policy
    node.meta["ac_graph_id"] = _AC_GRAPH


def _forward_nodes(joint: fx.GraphModule) -> list[fx.Node]:
    """The joint graph's forward, as torch's default partitioner delimits it."""
    last = None
    for node in joint.graph.nodes:
        if _has_tag_is_forward(node) or _is_primal(node):
            last = node
    out = []
    for node in joint.graph.nodes:
        if not _is_tangent(node) and node.op != "output":
            out.append(node)
        if node is last:
            break
    return out


def _node_of(decision: TensorDecision, by_name: dict[str, fx.Node], by_key: dict[str, fx.Node]) -> fx.Node | None:
    """The node holding the decided tensor: found by key (by fx node name for a plan without keys)."""
    ident, table = (decision.name, by_name) if decision.key is None else (decision.key, by_key)
    index = None
    if ident.endswith("]") and "[" in ident:  # output ``index`` of a multi-output op
        ident, _, rest = ident.partition("[")
        index = int(rest[:-1])
    node = table.get(ident)
    if node is not None and index is not None:
        node = next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)
    return node


def _check(decision: TensorDecision, node: fx.Node, check_layout: bool) -> None:
    producer = node.args[0] if node.target is operator.getitem else node
    target = str(producer.target)
    if _packet(target) != _packet(decision.op):
        raise PlanMismatchError(f"the plan's tensor {decision.name!r} is made by {decision.op}, here by {target}: "
                                "the plan was made for another model; make a new one with memopt.optimize")
    val = node.meta.get("val")
    if check_layout and isinstance(val, torch.Tensor):
        shape, dtype = tuple(_hint(s) for s in val.shape), str(val.dtype).replace("torch.", "")
        if shape != tuple(decision.shape) or dtype != decision.dtype:
            raise PlanMismatchError(
                f"the plan's tensor {decision.name!r} is {decision.dtype}{list(decision.shape)}, here "
                f"{dtype}{list(shape)}: the plan was made for other input shapes or dtypes")


def _packet(op: str) -> str:
    """``aten.mul.Tensor`` -> ``aten.mul``: a symbolic size turns ``mul.Scalar`` into ``mul.Tensor``."""
    return op.rsplit(".", 1)[0] if op.count(".") >= 2 else op


def _hint(size: Any) -> int:
    """A size as an int: a symbolic one at the value the trace was made with (no guard added)."""
    return size if isinstance(size, int) else int(size.node.hint)


def _storage(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.untyped_storage()._cdata
    return None


def _nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return _hint(val.untyped_storage().nbytes()) if isinstance(val, torch.Tensor) else 0


def _flops(node: fx.Node) -> int:
    """The node's FLOPs; an op wrapped for RNG replay counts as the op it wraps."""
    from memopt.ir.joint import op_flops

    if node.target is torch._prims.rng_prims.run_with_rng_state:
        _, op, *args = node.args
        node = _Unwrapped(op, tuple(args), node.kwargs, node.meta)
    return op_flops(node)


@dataclass
class _Unwrapped:
    """The wrapped op of an RNG-replay node, with what ``memopt.ir.joint._flops`` reads of a node."""

    target: Any
    args: tuple
    kwargs: Any
    meta: dict


def _mutated_inputs_saved_as_copies(joint: fx.GraphModule, fw: fx.GraphModule, num_fwd_outputs: int) -> bool:
    """A recomputation re-runs ops on the step's inputs as the forward saw them. An input the forward
    mutates (a BatchNorm's running statistics) is written after the forward ends, so the backward
    gets a copy of it taken in the forward (as small as the buffer); saved as it is, autograd would
    refuse it as modified in place. Returns whether any was copied."""
    mutated = {getattr(desc, "mutated_input", None)
               for desc in joint.graph.output_node().meta.get("desc") or ()} - {None}
    if not mutated:
        return False
    inputs = {p for p in fw.graph.find_nodes(op="placeholder") if p.meta.get("desc") in mutated}
    output = fw.graph.output_node()
    outputs = list(output.args[0])
    copies: dict[fx.Node, fx.Node] = {}
    for i in range(num_fwd_outputs, len(outputs)):
        node = outputs[i]
        if node in inputs:
            if node not in copies:
                with fw.graph.inserting_before(output):
                    copies[node] = fw.graph.call_function(torch.ops.aten.clone.default, (node,))
                copies[node].meta["val"] = node.meta["val"].clone()
            outputs[i] = copies[node]
    output.args = (tuple(outputs),)
    return bool(copies)


def _saved_outputs(fw: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    return [n for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


# ----------------------------------------------------------------------------- offload lowerings
#
# One copy per storage: the forward hands the backward a host copy of the storage's *carrier* (the
# node that made it), in place of every saved node that lives in it; the backward brings the
# carrier back and re-creates each saved view from it with ``as_strided`` (same size, stride and
# offset into the same layout). Copying each saved view on its own would copy a storage as many
# times as it has saved views, and bring as many back.


@dataclass
class _Offload:
    carrier: fx.Node  # in the forward graph
    aliases: list[fx.Node]  # every forward node in the carrier's storage (it and its views)
    saved: list[fx.Node]  # the forward's saved outputs living in the carrier's storage
    num_fwd_outputs: int  # the forward's outputs before the saved ones: what the caller gets
    ready: fx.Node | None = None  # the plan's op after which the copy out has had time to finish


def _offloads(fw: fx.GraphModule, saved: list[fx.Node], storages: set[int], num_fwd_outputs: int,
              ready: dict[int, str]) -> list[_Offload]:
    aliases: dict[int, list[fx.Node]] = {}  # in graph order: the first call is the carrier
    for node in fw.graph.nodes:
        key = _storage(node)
        if key in storages and (key in aliases or node.op == "call_function"):
            aliases.setdefault(key, []).append(node)
    by_name = {n.name: n for n in fw.graph.nodes}
    out: dict[int, _Offload] = {}
    for node in saved:
        key = _storage(node)
        if key in aliases:
            offload = out.setdefault(key, _Offload(aliases[key][0], aliases[key], [], num_fwd_outputs,
                                                   by_name.get(ready.get(key, ""))))
            offload.saved.append(node)
    return list(out.values())


def _ready_names(joint: fx.GraphModule, decisions: Sequence[TensorDecision], keys: dict[str, str]) -> dict[int, str]:
    """Offloaded storage -> the joint node after which the plan waits for its copy to host (``ready``)."""
    forward = {n.name: n for n in _forward_nodes(joint)}
    by_key = {key: forward[name] for name, key in keys.items() if name in forward}
    out = {}
    for decision in decisions:
        if decision.action == "offload" and decision.ready in by_key:
            node = _node_of(decision, forward, by_key)
            if node is not None:
                out[_storage(node)] = by_key[decision.ready].name
    return out


def _rewire(fw: fx.GraphModule, bw: fx.GraphModule, offload: _Offload,
            send: Callable[[fx.Graph, fx.Node, fx.Node], fx.Node],
            receive: Callable[[fx.Graph, fx.Node, fx.Node, "_SizeNodes"], fx.Node]) -> None:
    """Forward: ``send(graph, carrier, last_use)`` replaces the saved nodes in the output (a node the
    caller gets as well stays there as it is). Backward:
    ``receive(graph, token, carrier_like, sizes)`` before the first use of any of them; views from
    it (a saved node of the carrier's own layout is the copy back itself)."""
    graph, output = fw.graph, fw.graph.find_nodes(op="output")[0]
    aliases = offload.aliases  # (fx nodes compare by their place in the graph, kept as it changes)
    last_use = max((u for n in aliases for u in n.users if u is not output), default=offload.carrier)
    # held to where the plan counts it: until its copy out has had time to finish, if that is later
    last_use = max(last_use, *aliases, *([offload.ready] if offload.ready is not None else []))
    with graph.inserting_after(last_use):
        token = send(graph, offload.carrier, last_use)
    saved, first = set(offload.saved), offload.num_fwd_outputs  # a node both returned and saved: returned as is
    output.args = (tuple(token if i >= first and a in saved else a for i, a in enumerate(output.args[0])),)

    bgraph = bw.graph
    placeholders = {p.name: p for p in bgraph.find_nodes(op="placeholder")}
    olds = [placeholders[n.name] for n in offload.saved]
    views, readers = _view_closure(olds)
    if not readers:
        return
    first_use = min(readers)
    news = []
    for old in olds:
        with bgraph.inserting_after(old):
            new = bgraph.placeholder(f"{old.name}_host")
        new.meta["val"] = token.meta.get("val")
        news.append(new)
    carrier = offload.carrier.meta["val"]
    with bgraph.inserting_before(first_use):
        sizes = _SizeNodes(bgraph, news[0])
        base = receive(bgraph, news[0], offload.carrier, sizes)
        base.meta["val"] = carrier
        for old in olds:
            val = old.meta["val"]
            view = base
            if _layout_of(val) != _layout_of(carrier):
                view = bgraph.call_function(torch.ops.aten.as_strided.default,
                                            (base, sizes.of(val.shape), sizes.of(val.stride()),
                                             sizes(val.storage_offset())))
                view.meta["val"] = val
            old.replace_all_uses_with(view)
            bgraph.erase_node(old)
    for view in sorted(views):  # partitioners hoist views of saved tensors: sink them
        first_use.prepend(view)


def _view_closure(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """The views taken of ``nodes`` (transitively: ops whose result shares their storage), and the
    ops that read data from any of them — the first of those is where the data must be back."""
    keys = {_storage(n) for n in nodes}
    views, readers, stack, seen = [], [], list(nodes), set(nodes)
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and _storage(user) in keys:
                views.append(user)
                stack.append(user)
            else:
                readers.append(user)
    return views, readers


def _layout_of(val: torch.Tensor) -> tuple:
    """Size, stride, offset and dtype, symbolic ones as expressions (compared without guards)."""
    def exact(x: Any) -> Any:
        return x.node.expr if isinstance(x, torch.SymInt) else x

    return tuple(map(exact, val.shape)), tuple(map(exact, val.stride())), exact(val.storage_offset()), val.dtype


_NO_SIZE = ("memopt cannot express the size {} in the backward graph of an offloaded tensor; plan without "
            "offload: memopt.optimize(..., planner=memopt.PlannerConfig(allow_offload=False))")


class _SizeNodes:
    """Sizes, strides and offsets as arguments of new nodes in ``graph``: an int stays an int; a
    symbolic one (a trace with symbolic sizes: varying batch and sequence) becomes nodes computing
    it — from the graph's SymInt inputs, else from the sizes of ``tensor`` (a node whose value has
    the symbols in its shape). A raw SymInt in a node's arguments would print as an undefined name.
    New nodes go where the graph's insertion point is."""

    def __init__(self, graph: fx.Graph, tensor: fx.Node) -> None:
        import sympy

        self._graph, self._tensor, self._sympy = graph, tensor, sympy
        self._nodes: dict[Any, fx.Node] = {}
        for p in graph.find_nodes(op="placeholder"):
            val = p.meta.get("val")
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                self._nodes.setdefault(val.node.expr, p)

    def of(self, values: Sequence[Any]) -> list[Any]:
        return [self(v) for v in values]

    def __call__(self, value: Any) -> Any:
        return self._node(value.node.expr) if isinstance(value, torch.SymInt) else int(value)

    def _node(self, expr: Any) -> Any:
        from torch.utils._sympy.functions import FloorDiv

        sympy = self._sympy
        if expr.is_Integer:
            return int(expr)
        if expr in self._nodes:
            return self._nodes[expr]
        if isinstance(expr, sympy.Symbol):
            shape = self._tensor.meta["val"].shape
            dim = next((d for d, s in enumerate(shape) if isinstance(s, torch.SymInt) and s.node.expr == expr), None)
            if dim is None:
                raise MemoptError(_NO_SIZE.format(expr))
            node = self._graph.call_function(torch.ops.aten.sym_size.int, (self._tensor, dim))
            node.meta["val"] = shape[dim]
        elif isinstance(expr, (sympy.Add, sympy.Mul, FloorDiv, sympy.Pow)):
            if isinstance(expr, sympy.Pow):  # s**2: the stride of a [..., s, s] tensor
                base, exponent = expr.args
                if not (exponent.is_Integer and int(exponent) > 0):
                    raise MemoptError(_NO_SIZE.format(expr))
                expr_args, combine = [base] * int(exponent), operator.mul
            else:
                expr_args = expr.args
                combine = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv}[type(expr)]
            args = [self._node(a) for a in expr_args]
            node = args[0]
            for arg in args[1:]:
                node = self._graph.call_function(combine, (node, arg))
            if not isinstance(node, fx.Node):
                return node
        else:
            raise MemoptError(_NO_SIZE.format(expr))
        self._nodes[expr] = node
        return node


def _offload_simulated(fw: fx.GraphModule, bw: fx.GraphModule, offloads: list[_Offload]) -> None:
    def send(graph: fx.Graph, carrier: fx.Node, last_use: fx.Node) -> fx.Node:
        token = graph.call_function(torch.ops.memopt.offload_simulated.default, (carrier,))
        token.meta["val"] = carrier.meta["val"].new_empty(0)
        return token

    def receive(graph: fx.Graph, token: fx.Node, carrier: fx.Node, sizes: _SizeNodes) -> fx.Node:
        val = carrier.meta["val"]
        return graph.call_function(torch.ops.memopt.reload_simulated.default,
                                   (token, sizes.of(val.shape), sizes.of(val.stride()), val.dtype))

    for offload in offloads:
        _rewire(fw, bw, offload, send, receive)
    reloads = [n for n in bw.graph.nodes if n.target is torch.ops.memopt.reload_simulated.default]
    _prefetch(bw.graph, [(reload, min(reload.users)) for reload in reloads])


def _prefetch(graph: fx.Graph, transfers: list[tuple[fx.Node, fx.Node]]) -> None:
    """Issue each copy back where the previous one is waited for: one copy in flight ahead of the
    compute. ``transfers``: ``(reload, first_use)`` pairs in graph order, ``reload`` making the
    device tensor and ``first_use`` the node before which it is waited for. Both offload lowerings
    place their reloads so, so the simulated step allocates each reloaded tensor where the CUDA
    step does: from the previous wait on, not from its own first use. A reload moves with what it
    reads after the previous wait (sizes of a symbolic shape computed there); one that reads a
    tensor made there stays."""
    for (_, previous), (reload, _) in zip(transfers, transfers[1:]):  # (nodes compare by place in the graph)
        if reload < previous:  # read by the same op as the previous one: already there
            continue
        moved, stack = {reload}, list(reload.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in moved or node < previous:
                continue
            if isinstance(node.meta.get("val"), torch.Tensor):
                moved = set()
                break
            moved.add(node)
            stack.extend(node.all_input_nodes)
        for node in sorted(moved):
            previous.prepend(node)


def _offload_cuda(fw: fx.GraphModule, bw: fx.GraphModule, offloads: list[_Offload]) -> None:
    """Asynchronous copies on a transfer stream (``memopt.runtime.transfer``): the copy out starts
    when the carrier is made and is waited for after the carrier's last forward use, where the graph
    drops it (its block is reused only once the copy has read it); the copy back is issued one
    offloaded tensor ahead (when the previous one is waited for) and waited for right before the
    first use."""
    from memopt.runtime import transfer  # noqa: F401 - registers memopt::offload_to_host, ...

    ops = torch.ops.memopt
    started: dict[fx.Node, fx.Node] = {}

    def send(graph: fx.Graph, carrier: fx.Node, last_use: fx.Node) -> fx.Node:
        with graph.inserting_after(carrier):
            copy = graph.call_function(ops.offload_to_host.default, (carrier,))
        copy.meta["val"] = carrier.meta["val"]  # layout metadata only: the graph is not re-traced
        with graph.inserting_after(copy if last_use is carrier else last_use):  # a carrier no one else reads
            wait = graph.call_function(ops.wait_transfer.default, (copy,))
        wait.meta["val"] = copy.meta["val"]
        return wait

    def receive(graph: fx.Graph, token: fx.Node, carrier: fx.Node, sizes: _SizeNodes) -> fx.Node:
        # the host copy has the carrier's layout: the copy back takes it from there
        reload = graph.call_function(ops.reload_to_device.default, (token, carrier.meta["val"].device))
        reload.meta["val"] = carrier.meta["val"]
        started[reload] = token
        return graph.call_function(ops.wait_transfer.default, (reload,))

    for offload in offloads:
        _rewire(fw, bw, offload, send, receive)
    waits = [n for n in bw.graph.nodes if n.target is ops.wait_transfer.default and n.args[0] in started]
    _prefetch(bw.graph, [(wait.args[0], wait) for wait in waits])  # the simulated lowering's too


_OFFLOAD = {"simulated": _offload_simulated, "cuda": _offload_cuda}
