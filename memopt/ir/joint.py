"""The joint trace: one training step (forward + backward) as a program of aten ops with sizes.

Design note: the fourth stage of the pipeline (DESIGN.md §1). The rewritten model runs once under
``FakeTensorMode`` through ``torch.func.functional_call`` with fake CPU stand-ins for its
parameters and buffers (as ``memopt.memory.simulate`` does; the model itself is not touched and may
live on ``meta``). AOTAutograd traces forward and backward into one joint graph and torch's
``default_partition`` splits it, so the *saved activations* are exactly what the default
partitioner would hand from forward to backward. We stop AOTAutograd right after partitioning:
nothing is compiled or run.

What comes out is plain data (:class:`JointTrace`), no torch objects:

* ``ops`` — every op of the forward graph, then every op of the backward graph, in program order:
  its target, the module that ran it (from forward hooks that annotate the trace; backward ops
  inherit their forward op's module), its transformer block, the storages it reads and allocates,
  its FLOPs (``torch.utils.flop_counter``'s formulas, plus the CPU flash-attention kernels that
  fake CPU tensors pick) and bytes moved, and tags (``rng``, ``view``, ``mutation``, ``collective``).
* ``storages`` — every distinct storage (views share their base's), with exact bytes from the fake
  tensors' storage sizes, rounded up to the device's allocation granularity, and what it is:
  parameter / buffer / input (resident for the step), activation (made by a forward op),
  gradient (a backward output: a parameter's ``.grad``), temporary (made by a backward op),
  output (what the step returns — the loss: held by the caller until the step ends) or tangent
  (the gradient autograd hands the backward for an output: held for the whole backward).
* ``saved`` — the activation storages the forward hands to the backward, in forward order.
* ``key`` of an activation storage — a name-free identity of the op that made it,
  ``"<module>:<op>#<ordinal>"`` (:func:`op_keys`): the runtime finds the plan's tensors in its own
  trace by key, so a trace with symbolic sizes, another batch size or without the loss still
  matches. An op's ``module`` is ``OUTSIDE`` when it ran outside the model's forward (a ``loss_fn``).
* ``optimizer_state_bytes`` / ``optimizer_step_bytes`` — the optimizer's states, and the extra
  bytes of its step, from a fake steady-state step on the trainable parameters.

Lifetimes are program points: op ``i`` of ``ops`` is point ``i``; forward points come first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._export.utils import _compiling_state_context
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten, tree_leaves

from memopt.errors import MemoptError, UnsupportedModelError
from memopt.memory.hf_masks import eager_masks
from memopt.memory.inputs import normalize_inputs
from memopt.memory.simulate import ADAMW, LossFn, OptimizerFactory, fake_inputs, fake_like, loss_of
from memopt.memory.tracker import MemoryTracker

__all__ = ["TracedOp", "Storage", "JointTrace", "JointGraph", "trace_joint", "trace_joint_graph", "op_keys",
           "op_flops", "optimizer_bytes", "module_annotations", "OUTSIDE", "STORAGE_KINDS", "TAGS"]

log = logging.getLogger("memopt")

STORAGE_KINDS = ("parameter", "buffer", "input", "activation", "gradient", "temporary", "output", "tangent")
TAGS = ("rng", "seeded", "view", "mutation", "collective")
_MODULE_KEY = "memopt_module"
_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")  # the outermost numbered container: "model.layers.3.mlp"
OUTSIDE = "<outside>"  # the module part of a key made outside the model's forward (a loss_fn)


@dataclass(frozen=True)
class TracedOp:
    """One aten op of the step. ``reads`` / ``allocates`` are storage ids (indices of ``storages``)."""

    name: str
    target: str
    phase: str  # "forward" | "backward"
    module: str | None
    block: int | None
    reads: tuple[int, ...]
    allocates: tuple[int, ...]
    flops: int
    bytes_moved: int
    dtype: str | None  # of the first tensor input (what a matmul runs in)
    tags: frozenset[str] = frozenset()
    key: str | None = None  # a forward op's name-free identity (``op_keys``; None: a view, a backward op)

    def signature(self) -> tuple[Any, ...]:
        """What makes two ops the same op: target, dtype, work and tags (not names or modules)."""
        return (self.target, self.dtype, self.flops, self.bytes_moved, tuple(sorted(self.tags)))


@dataclass(frozen=True)
class Storage:
    """One distinct storage. ``producer`` is the op index that allocates it (None for primals)."""

    id: int
    nbytes: int  # rounded up to the allocation granularity
    kind: str  # one of STORAGE_KINDS
    producer: int | None
    values: tuple[str, ...]  # fx node names whose value lives in this storage (base first)
    shape: tuple[int, ...]
    dtype: str
    key: str | None = None  # of the op that made it (activations; see ``op_keys``)


@dataclass(frozen=True)
class JointTrace:
    """One training step as data; see the module docstring."""

    ops: tuple[TracedOp, ...]
    storages: tuple[Storage, ...]
    num_forward: int
    saved: tuple[int, ...]
    granularity: int
    optimizer: str
    optimizer_state_bytes: int
    optimizer_step_bytes: int
    block_prefix: str | None = None  # "model.layers": the container whose children are blocks
    trace_seconds: float = field(default=0.0, compare=False)
    rng_state_bytes: int = 0  # what torch's partitioner saves to replay one recomputed seeded op
    # (parameter position, storage id) of each parameter's gradient, in backward order; a dropped
    # gradient (``trace_joint_graph(dropped=...)``) is here with a storage of 0 bytes
    gradients: tuple[tuple[int, int], ...] = ()
    dropped: frozenset[int] = frozenset()  # parameter positions whose gradients count 0 bytes (``dropped``)

    @property
    def num_points(self) -> int:
        return len(self.ops)

    def bytes_of(self, kind: str) -> int:
        return sum(s.nbytes for s in self.storages if s.kind == kind)

    def uses(self) -> dict[int, list[int]]:
        """Storage id -> the program points that read its data, ascending.

        A view reads no data (its result aliases the storage, and whoever reads the view reads the
        storage): partitioners hoist views of saved tensors to the start of the backward, which
        must not count as needing the tensor there."""
        out: dict[int, list[int]] = {}
        for point, op in enumerate(self.ops):
            if "view" in op.tags:
                continue
            for sid in dict.fromkeys(op.reads):
                out.setdefault(sid, []).append(point)
        return out

    def blocks(self) -> list[int]:
        return sorted({op.block for op in self.ops if op.block is not None})

    def enclosing_module(self, point: int) -> str:
        """The module the op at ``point`` ran in; for an op of no module (autograd summing the
        gradients of a tensor read twice), the innermost module both neighbouring ops of its phase
        ran in ("": the model)."""
        op = self.ops[point]
        if op.module:
            return op.module
        around = []
        for step in (-1, 1):
            p = point + step
            while 0 <= p < len(self.ops) and self.ops[p].phase == op.phase and not self.ops[p].module:
                p += step
            inside = 0 <= p < len(self.ops) and self.ops[p].phase == op.phase
            around.append(self.ops[p].module.split(".") if inside else [])
        shared = []
        for a, b in zip(*around):
            if a != b:
                break
            shared.append(a)
        return ".".join(shared)


@dataclass(frozen=True)
class JointGraph:
    """The joint forward + backward graph a trace was made from, kept to be partitioned again:
    ``partitioned(partition_fn)`` is the step as another partition (a plan's lowering) runs it,
    as a JointTrace — what that lowering allocates, op by op (its recomputations, the RNG state it
    saves for replayed random ops, its offload copies)."""

    gm: torch.fx.GraphModule
    inputs: tuple
    kwargs: Mapping[str, Any]
    kinds: tuple[str, ...]
    granularity: int
    optimizer: str
    state_bytes: int
    step_bytes: int
    fake_mode: Any
    dropped: frozenset[int] = frozenset()  # parameter positions whose gradients the step drops
    resident: frozenset[int] = frozenset()  # storages of the real parameters, buffers and inputs (_Builder)

    def partitioned(self, partition_fn: Callable[..., Any]) -> JointTrace:
        graph = torch.fx.Graph()
        output, old_output = graph.graph_copy(self.gm.graph, {}, return_output_node=True)
        graph.output(output).meta = dict(old_output.meta)
        gm = torch.fx.GraphModule(self.gm, graph)
        with self.fake_mode:
            fw, bw = partition_fn(gm, list(self.inputs), **self.kwargs)
        for module in (fw, bw):
            module.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        builder = _Builder(self.granularity, op_keys(gm.graph), self.resident)
        return builder.build(fw, bw, list(self.kinds), self.optimizer, self.state_bytes, self.step_bytes,
                             self.kwargs["num_fwd_outputs"], self.dropped)


def trace_joint(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = ADAMW,
    device: str = "cuda",
    granularity: int = 1,
    partition_fn: Callable[..., Any] = default_partition,
) -> JointTrace:
    """Trace one training step of ``model`` on fake tensors; see the module docstring."""
    return trace_joint_graph(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, device=device,
                             granularity=granularity, partition_fn=partition_fn)[0]


def trace_joint_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = ADAMW,
    device: str = "cuda",
    granularity: int = 1,
    partition_fn: Callable[..., Any] = default_partition,
    dropped: frozenset[str] = frozenset(),
) -> tuple[JointTrace, JointGraph]:
    """Trace one training step of ``model`` on fake tensors; see the module docstring. Also
    returns the joint graph, to measure other partitions of the same step (``JointGraph``).

    ``partition_fn`` splits the joint graph (torch's partitioner signature); the default saves what
    eager-like autograd would. Another partitioner (e.g. torch's min-cut) gives its own saved set,
    and the ops it recomputes appear in the backward.

    ``dropped``: names of trainable parameters whose gradients the step makes but does not keep
    (layerwise sampling plans every active set with one step: the blocks frozen at a call have
    their gradients pruned from its backward). Their gradient storages count 0 bytes and the ops
    making them no time; what those ops read lives as long as in the step that keeps them (so the
    trace bounds every set of kept gradients whose gradients are made no earlier); the optimizer
    holds no state for them.

    Requires: ``model(*args, **kwargs)`` runs on CPU tensors (parameters may be on ``meta``) and
    some parameter requires grad. Ensures: ``model`` is unchanged (hooks are removed again).
    """
    start = time.perf_counter()
    args, kwargs = normalize_inputs(example_inputs)
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        params = {n: fake_like(p) for n, p in model.named_parameters()}
        buffers = {n: fake_like(b) for n, b in model.named_buffers()}
        fargs, fkwargs = fake_inputs((args, kwargs))
        unknown = sorted(set(dropped) - {n for n, p in params.items() if p.requires_grad})
        if unknown:
            raise ValueError(f"dropped gradients of parameters that do not train in this step: {unknown[:3]}")
        trainable = [p for n, p in params.items() if p.requires_grad and n not in dropped]
        if not any(p.requires_grad for p in params.values()):
            raise MemoptError("no parameter requires grad, so there is no training step to trace: "
                              "unfreeze some parameters or apply a pass that adds trainable ones")
        state_bytes, step_bytes = _optimizer_bytes(trainable, optimizer, device, granularity)
        done = _partitioned(model, params, buffers, fargs, fkwargs, loss_fn, partition_fn)
    kinds = ["parameter"] * len(names) + ["buffer"] * len(buffer_names)
    label = "none" if optimizer is None else getattr(optimizer, "__name__", type(optimizer).__name__)
    positions = frozenset(i for i, n in enumerate(names) if n in dropped)
    resident = frozenset(_storage_key(t) for t in (*model.parameters(), *model.buffers(), *_tensors((args, kwargs))))
    trace = _Builder(granularity, done.keys, resident).build(done.fw, done.bw, kinds, label, state_bytes,
                                                             step_bytes, done.kwargs["num_fwd_outputs"], positions)
    trace = _with_time(trace, time.perf_counter() - start)
    trace = dataclasses.replace(trace, rng_state_bytes=-(-torch.get_rng_state().nbytes // granularity) * granularity)
    log.debug("memopt: traced the joint step in %.1f s: %d forward + %d backward ops, %d saved storages",
              trace.trace_seconds, trace.num_forward, len(trace.ops) - trace.num_forward, len(trace.saved))
    joint = JointGraph(done.joint, tuple(done.joint_inputs), dict(done.kwargs), tuple(kinds), granularity, label,
                       state_bytes, step_bytes, fake_mode, positions, resident)
    return trace, joint


def _with_time(trace: JointTrace, seconds: float) -> JointTrace:
    import dataclasses

    return dataclasses.replace(trace, trace_seconds=seconds)


# ----------------------------------------------------------------------------- tracing


class _Partitioned(Exception):
    """Raised from our partition_fn once the graphs are recorded: nothing needs compiling."""

    def __init__(self, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, keys: dict[str, str],
                 joint: torch.fx.GraphModule, joint_inputs: Any, kwargs: dict) -> None:
        super().__init__("partitioned")
        self.fw, self.bw, self.keys = fw, bw, keys
        self.joint, self.joint_inputs, self.kwargs = joint, joint_inputs, kwargs


def _partition_and_stop(partition_fn: Callable[..., Any]) -> Callable[..., Any]:
    def partition(joint: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        keys = op_keys(joint.graph)  # before the partitioner copies nodes into the backward
        graph = torch.fx.Graph()
        output, old_output = graph.graph_copy(joint.graph, {}, return_output_node=True)
        graph.output(output).meta = dict(old_output.meta)
        kept = torch.fx.GraphModule(joint, graph)  # untouched by the partitioner's tags
        fw, bw = partition_fn(joint, joint_inputs, **kwargs)
        # The default partitioner copies multi-output ops whose getitems it saves into the
        # backward, unused; compilers drop them and so do we (they would read q, k, v there).
        for gm in (fw, bw):  # an unused attention op draws no random numbers worth keeping
            gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        raise _Partitioned(fw, bw, keys, kept, joint_inputs, kwargs)

    return partition


def _partitioned(model: nn.Module, params: dict, buffers: dict, args: tuple, kwargs: dict,
                 loss_fn: LossFn | None, partition_fn: Callable[..., Any]) -> "_Partitioned":
    partition = _partition_and_stop(partition_fn)
    try:
        return _trace_once(model, params, buffers, args, kwargs, loss_fn, partition, exporting=False)
    except (DataDependentOutputException, UnsupportedModelError) as first:
        # The model branched on a tensor's value (HF: "is the attention mask all ones?") or took a
        # path fake tensors cannot run (HF MoE: a grouped GEMM whose fake kernel wants bf16).
        # Models ask torch.compiler.is_exporting() first and take the value-free, traceable branch
        # (an explicit mask; a custom op): say so, for this trace only, as non-strict export does.
        try:
            return _trace_once(model, params, buffers, args, kwargs, loss_fn, partition, exporting=True)
        except UnsupportedModelError as second:
            if isinstance(first, UnsupportedModelError):
                raise UnsupportedModelError(f"{first} (as torch.export traces it, too: {str(second)[:300]})") from first
            raise


def _trace_once(model: nn.Module, params: dict, buffers: dict, args: tuple, kwargs: dict, loss_fn: LossFn | None,
                partition: Callable[..., Any], *, exporting: bool) -> "_Partitioned":
    def step(p: dict, b: dict, a: tuple, kw: dict) -> torch.Tensor:
        return loss_of(torch.func.functional_call(model, {**p, **b}, a, kw), a, kw, loss_fn)

    compiled = aot_function(step, fw_compiler=_never, partition_fn=partition)
    state = _compiling_state_context() if exporting else contextlib.nullcontext()
    try:
        with fx_traceback.preserve_node_meta(), state, module_annotations(model), eager_masks(model, args, kwargs), \
                attention_kernels():
            compiled(params, buffers, args, kwargs)
    except _Partitioned as done:
        return done
    except (MemoptError, DataDependentOutputException):
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported with the way out
        if not exporting and isinstance(exc.__cause__ or exc.__context__, DataDependentOutputException):
            raise DataDependentOutputException(exc) from exc
        raise UnsupportedModelError(
            f"memopt could not trace a training step of {type(model).__name__} with AOTAutograd: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
            "The model must run under torch.func.functional_call on fake tensors (no .item() or "
            "data-dependent Python control flow on activations)."
        ) from exc
    raise AssertionError("AOTAutograd finished without partitioning: no input requires grad")


def _never(gm: torch.fx.GraphModule, args: Any) -> Any:  # pragma: no cover - partitioning stops first
    raise AssertionError("memopt's joint trace compiles nothing")


@contextlib.contextmanager
def attention_kernels() -> Iterator[None]:
    """The attention kernels a planned step is traced and run with: SDPA's flash, memory-efficient
    and math kernels, not cuDNN's. CUDA's SDPA picks a kernel by the inputs; the planner traces at
    exact sizes and the runtime with symbolic ones, and a plan names ops, so the two must pick the
    same kernel. On an H200 the runtime's trace held cuDNN's kernel (the plan, traced on the CPU
    then, named another op) and the step was refused; cuDNN's conditions are the least plain of the
    four (they include sizes), so it is left out, and flash runs where it applies. Of the others,
    those the caller has switched off (``sdpa_kernel``, ``torch.backends.cuda.enable_*_sdp``) stay
    off; if cuDNN's is the only one left on, nothing is changed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    enabled = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                                           (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
                                           (SDPBackend.MATH, cuda.math_sdp_enabled())) if on]
    with sdpa_kernel(enabled) if enabled else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def module_annotations(model: nn.Module) -> Iterator[None]:
    """Annotate every traced op with the FQN of the innermost module running it (hooks, removed after)."""
    stack: list[contextlib.AbstractContextManager] = []
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            ctx = fx_traceback.annotate({_MODULE_KEY: name})
            ctx.__enter__()
            stack.append(ctx)
        return pre_hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        while stack:
            stack.pop().__exit__(None, None, None)


def optimizer_bytes(trainable: list[torch.Tensor], factory: OptimizerFactory | None, device: str,
                    granularity: int) -> tuple[int, int]:
    """(state bytes, extra bytes at the peak of a steady-state step) of the optimizer ``factory``
    builds over tensors shaped as ``trainable``, measured on fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _optimizer_bytes([fake_like(p) for p in trainable], factory, device, granularity)


def _optimizer_bytes(trainable: list[torch.Tensor], factory: OptimizerFactory | None, device: str,
                     granularity: int) -> tuple[int, int]:
    """(state bytes, extra bytes at the peak of a steady-state step), measured on fakes."""
    params = [fake_like(p) for p in trainable]  # fresh leaves: the step must not touch the trace's
    opt = None if factory is None else factory(params, device, {})
    if opt is None:
        return 0, 0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # the state a training loop has after its first step
    with MemoryTracker(optimizer=opt, parameters=params, round_to=granularity, device_label=device) as tracker:
        opt.step()
    report = tracker.report(device)
    state = report.final.optimizer
    resident = report.peak.parameters + report.peak.gradients + state
    return state, max(0, report.peak_bytes - resident)


# ----------------------------------------------------------------------------- graph -> data


class _Builder:
    """Turns the partitioned forward and backward graphs into a JointTrace (one pass each).

    Storages are followed per node, not per fake tensor: an op's output is its input's storage
    when the two share a storage (a view, a getitem, an in-place write), else a new storage — even
    if the fake tensor is shared with another node (a partitioner that recomputes in the backward
    copies the forward node, value and all)."""

    def __init__(self, granularity: int, keys: Mapping[str, str] | None = None,
                 resident: frozenset[int] = frozenset()) -> None:
        self.granularity = granularity
        self.keys = keys or {}
        self.resident = resident
        self.storages: list[dict[str, Any]] = []
        self.ops: list[TracedOp] = []
        self.module_of_seq: dict[int, str] = {}
        self.outputs: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (graph, node) -> [(key, sid)]
        self.constants: dict[int, int] = {}  # a constant tensor's storage -> its sid

    def build(self, fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, kinds: list[str], optimizer: str,
              state_bytes: int, step_bytes: int, num_fwd_outputs: int = 0,
              dropped: frozenset[int] = frozenset()) -> JointTrace:
        primal_keys: dict[int, int] = {}  # inputs that share a storage (labels a view of input_ids) share it here
        for i, node in enumerate(n for n in fw.graph.nodes if n.op == "placeholder"):
            kind = kinds[i] if i < len(kinds) else "input"
            self.outputs["fw", node.name] = [(k, primal_keys.get(k) if k in primal_keys else primal_keys.setdefault(
                k, self._new(node.name, t, kind, None))) for k, t in _keyed(node)]
        self._constants(fw, "fw")
        self._run(fw, "fw", "forward")
        num_forward = len(self.ops)
        saved = self._saved(fw, {n.name for n in bw.graph.nodes if n.op == "placeholder"})
        for node in bw.graph.nodes:
            if node.op == "placeholder" and ("fw", node.name) in self.outputs:
                self.outputs["bw", node.name] = self.outputs["fw", node.name]
        # The partitioner's RNG states for replayed random ops enter the backward under names of
        # their own (``rng_state_output_i``), in the order the forward returns them.
        states = [n for n in tree_leaves(next(n for n in fw.graph.nodes if n.op == "output").args)
                  if isinstance(n, torch.fx.Node) and n.target is operator.getitem
                  and n.args[0].target is torch._prims.rng_prims.run_and_save_rng_state and n.args[1] == 0]
        inputs = [n for n in bw.graph.nodes if n.op == "placeholder" and n.name.startswith("rng_state_output")]
        for state, node in zip(states, inputs):
            self.outputs["bw", node.name] = self.outputs["fw", state.name]
        self._mark_outputs(fw, num_fwd_outputs)
        for node in bw.graph.nodes:
            if node.op == "placeholder" and node.name.startswith("tangents"):
                self.outputs["bw", node.name] = [(k, self._new(node.name, t, "tangent", num_forward))
                                                 for k, t in _keyed(node)]
        self._constants(bw, "bw")
        self._run(bw, "bw", "backward")
        gradients = self._mark_gradients(bw, kinds.count("parameter"), dropped)
        storages = tuple(Storage(id=i, **s) for i, s in enumerate(self.storages))
        prefix, ops = _assign_blocks(tuple(self.ops))
        return JointTrace(ops, storages, num_forward, saved, self.granularity, optimizer, state_bytes, step_bytes, prefix,
                          gradients=gradients, dropped=dropped)

    def _constants(self, gm: torch.fx.GraphModule, graph: str) -> None:
        """Constant tensors the step reads, as inputs: one storage each however many graphs read them.

        * One that existed before the step (labels a ``loss_fn`` closes over) is taken to be on the
          target device throughout (one kept on the host and copied over is counted too: an
          over-count); not counted again if it is a parameter, buffer or example input.
        * One the model's code makes (``torch.tensor(...)`` in its forward: read by ``lift_fresh_copy``
          only, whose output is each step's copy) is held by the lowered graph that traced it, for as
          long as the plan runs (made without a device, a scalar stays on the host: an over-count of
          a block each on a GPU). One a ``loss_fn`` makes runs eagerly in the user's loop, outside
          any lowered graph: its copy alone is counted."""
        for node in gm.graph.find_nodes(op="get_attr"):
            value = getattr(gm, node.target, None)
            if not isinstance(value, torch.Tensor) or _storage_key(value) in self.resident or not node.users:
                continue
            sid = self.constants.get(_storage_key(value))
            made = all(user.target is torch.ops.aten.lift_fresh_copy.default for user in node.users)
            if sid is None and made and not any(self._in_model(user, graph) for user in node.users):
                continue
            if sid is None:
                sid = self.constants[_storage_key(value)] = self._new(node.name, value, "input", None)
            self.outputs[graph, node.name] = [(key, sid) for key, _ in _keyed(node)]

    def _in_model(self, node: torch.fx.Node, graph: str) -> bool:
        """Does ``node`` belong to the model's step (not to a ``loss_fn``'s forward or backward)?"""
        if graph == "fw":
            return (node.meta.get("custom") or {}).get(_MODULE_KEY) is not None
        return self.module_of_seq.get(node.meta.get("seq_nr"), OUTSIDE) != OUTSIDE

    def _new(self, name: str, t: torch.Tensor, kind: str, producer: int | None, key: str | None = None) -> int:
        nbytes = -(-t.untyped_storage().nbytes() // self.granularity) * self.granularity
        self.storages.append(dict(nbytes=nbytes, kind=kind, producer=producer, values=(name,),
                                  shape=tuple(int(x) for x in t.shape), dtype=str(t.dtype).replace("torch.", ""),
                                  key=key))
        return len(self.storages) - 1

    def _run(self, gm: torch.fx.GraphModule, graph: str, phase: str) -> None:
        kind = "activation" if phase == "forward" else "temporary"
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            point = len(self.ops)
            inputs = [(k, sid) for arg in _input_nodes(node) for k, sid in self.outputs.get((graph, arg.name), ())]
            aliases = dict(inputs)
            outs, allocates = [], []
            keyed = _keyed(node)
            op_key = self.keys.get(node.name) if phase == "forward" else None
            for i, (key, t) in enumerate(keyed):
                suffix = "" if len(keyed) == 1 else f"[{i}]"  # one name per output
                name = node.name + suffix
                if key in aliases:
                    sid = aliases[key]
                    self.storages[sid]["values"] += (name,) if name not in self.storages[sid]["values"] else ()
                else:
                    sid = self._new(name, t, kind, point, None if op_key is None else op_key + suffix)
                    allocates.append(sid)
                outs.append((key, sid))
            self.outputs[graph, node.name] = outs
            reads = tuple(dict.fromkeys(sid for _, sid in inputs))
            self.ops.append(_traced_op(node, phase, reads, tuple(allocates), self._module(node, phase), op_key))

    def _module(self, node: torch.fx.Node, phase: str) -> str | None:
        custom = node.meta.get("custom") or {}
        module = custom.get(_MODULE_KEY)
        if module is None and phase == "forward":
            module = OUTSIDE  # run outside the model's forward: by a loss_fn
        seq = node.meta.get("seq_nr")
        if module is not None and phase == "forward" and seq is not None:
            self.module_of_seq.setdefault(seq, module)
        if module is None and seq is not None:
            module = self.module_of_seq.get(seq)
        return module

    def _saved(self, fw: torch.fx.GraphModule, saved_names: set[str]) -> tuple[int, ...]:
        out = next(n for n in fw.graph.nodes if n.op == "output")
        saved: dict[int, None] = {}
        for value in tree_leaves(out.args):
            if isinstance(value, torch.fx.Node) and value.name in saved_names:
                for _, sid in self.outputs.get(("fw", value.name), ()):
                    if self.storages[sid]["kind"] == "activation":
                        saved[sid] = None
        return tuple(sorted(saved, key=lambda sid: self.storages[sid]["producer"]))

    def _mark_outputs(self, fw: torch.fx.GraphModule, num_fwd_outputs: int) -> None:
        out = next(n for n in fw.graph.nodes if n.op == "output")
        for value in tree_leaves(out.args)[:num_fwd_outputs]:
            if isinstance(value, torch.fx.Node):
                for _, sid in self.outputs.get(("fw", value.name), ()):
                    if self.storages[sid]["kind"] == "activation":
                        self.storages[sid]["kind"] = "output"

    def _mark_gradients(self, bw: torch.fx.GraphModule, num_params: int,
                        dropped: frozenset[int]) -> tuple[tuple[int, int], ...]:
        """Mark the backward's outputs as gradients; (parameter position, storage) of each, by
        birth. A ``dropped`` parameter's gradient is made by no op (0 bytes, no time)."""
        out = next(n for n in bw.graph.nodes if n.op == "output")
        found: list[tuple[int, int]] = []
        values = out.args[0] if isinstance(out.args[0], (list, tuple)) else tree_leaves(out.args)
        for position, value in enumerate(values):
            if isinstance(value, torch.fx.Node):
                for _, sid in self.outputs.get(("bw", value.name), ()):
                    if self.storages[sid]["kind"] == "temporary":
                        self.storages[sid]["kind"] = "gradient"
                        if position < num_params:
                            found.append((position, sid))
        for position, sid in found:
            if position in dropped:
                self.storages[sid]["nbytes"] = 0
                point = self.storages[sid]["producer"]
                self.ops[point] = dataclasses.replace(self.ops[point], flops=0, bytes_moved=0)
        return tuple(sorted(found, key=lambda f: self.storages[f[1]]["producer"]))


def op_keys(graph: torch.fx.Graph) -> dict[str, str]:
    """A name-free identity for every op of a joint graph's forward that allocates its output:
    ``"<module>:<op>#<ordinal>"`` — the module that ran it (from ``module_annotations``; ``OUTSIDE``
    for ops outside the model, e.g. a ``loss_fn``), the op without its overload (``mul.Scalar`` and
    ``mul.Tensor`` are one op: a symbolic size turns one into the other) and how many such ops the
    module ran before it. fx node names count ops over the whole graph, so they shift when a
    symbolic size adds a node or a call without labels drops the loss; keys do not. Views and
    symbolic-size arithmetic get no key (they allocate nothing)."""
    counts: dict[str, int] = {}
    out = {}
    for node in graph.nodes:
        if node.meta.get("partitioner_tag") == "is_backward":  # traced by autograd's backward
            continue
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or _aliases(target):
            continue
        if not _tensors(node.meta.get("val")):
            continue
        module = (node.meta.get("custom") or {}).get(_MODULE_KEY)
        base = f"{OUTSIDE if module is None else module}:{target.overloadpacket.__name__}"
        out[node.name] = f"{base}#{counts.get(base, 0)}"
        counts[base] = counts.get(base, 0) + 1
    return out


def _aliases(target: torch._ops.OpOverload) -> bool:
    """Does the op return an alias of an input (a view, or an in-place write)?"""
    return any(r.alias_info is not None for r in target._schema.returns)


def _keyed(node: torch.fx.Node) -> list[tuple[int, torch.Tensor]]:
    return [(_storage_key(t), t) for t in _tensors(node.meta.get("val"))]


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return [n for n in leaves if isinstance(n, torch.fx.Node)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(value) if isinstance(x, torch.Tensor)]


def _input_tensors(node: torch.fx.Node) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return [t for n in leaves if isinstance(n, torch.fx.Node) for t in _tensors(n.meta.get("val"))]


def _traced_op(node: torch.fx.Node, phase: str, reads: tuple[int, ...], allocates: tuple[int, ...],
               module: str | None, key: str | None = None) -> TracedOp:
    tags = _tags(node, allocates)
    inputs = _input_tensors(node)
    outputs = _tensors(node.meta.get("val"))
    moved = 0 if "view" in tags else sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
    return TracedOp(
        name=node.name, target=_target_name(node.target), phase=phase, module=module, block=None,
        reads=reads, allocates=allocates, flops=op_flops(node), bytes_moved=moved,
        dtype=str(inputs[0].dtype).replace("torch.", "") if inputs else None, tags=tags, key=key,
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _target_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    return str(target)


def _tags(node: torch.fx.Node, allocates: tuple[int, ...]) -> frozenset[str]:
    target = node.target
    tags = set()
    if target is operator.getitem or (not allocates and _tensors(node.meta.get("val"))):
        tags.add("view")
    if isinstance(target, torch._ops.OpOverload):
        if _draws_random(node, target):
            tags.add("rng")
        if torch.Tag.nondeterministic_seeded in target.tags:  # recomputed, torch replays its RNG state
            tags.add("seeded")
        if any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments):
            tags.add("mutation")
        if target.namespace in ("_c10d_functional", "c10d", "c10d_functional", "_dtensor"):
            tags.add("collective")
    return frozenset(tags)


def _draws_random(node: torch.fx.Node, target: torch._ops.OpOverload) -> bool:
    """Seeded ops draw random numbers, except attention / dropout with probability 0 or not training."""
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    names = [a.name for a in target._schema.arguments]
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    if "dropout_p" in names:
        return bound.get("dropout_p", 0.0) != 0.0
    if target.overloadpacket is torch.ops.aten.native_dropout:
        return bound.get("p") != 0.0 and bound.get("train") is not False
    return True


# ----------------------------------------------------------------------------- FLOPs


def op_flops(node: torch.fx.Node) -> int:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    args, kwargs = _values(node.args), _values(node.kwargs)
    extra = _EXTRA_FLOPS.get(target.overloadpacket)
    if extra is not None:
        return int(extra(*args))
    formula = flop_counter.flop_registry.get(target.overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=node.meta.get("val")))


def _values(tree: Any) -> Any:
    """The nodes' example values; symbolic sizes at their hints (a FLOP formula adds no guard)."""
    return torch.utils._pytree.tree_map(lambda n: _concrete(n.meta.get("val")) if isinstance(n, torch.fx.Node)
                                        else _concrete(n), tree)


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
        return torch.empty([_concrete(s) for s in value.shape], dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.SymInt) for v in value):
        return type(value)(_concrete(v) for v in value)
    return value


def _kv_as_query(query: torch.Tensor, *kv: torch.Tensor) -> list[torch.Size]:
    """Key and value shapes [batch, heads, seq, dim] with the query's heads: grouped-query attention
    does the FLOPs of its keys repeated (torch's formulas before 2.13 refuse fewer kv heads)."""
    return [torch.Size((t.shape[0], query.shape[1], *t.shape[2:])) for t in kv]


def _sdpa_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any) -> int:
    return flop_counter.sdpa_flop_count(query.shape, *_kv_as_query(query, key, value))


def _sdpa_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   *_: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, *_kv_as_query(query, key, value))


# SDPA's kernels, [batch, heads, seq, dim] inputs: the CPU's (torch's registry has none) and the
# CUDA ones (the registry's, with grouped-query attention counted on every torch).
_EXTRA_FLOPS: Mapping[Any, Callable[..., int]] = {
    getattr(torch.ops.aten, name): formula
    for names, formula in (
        (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"), _sdpa_forward),
        (("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"),
         _sdpa_backward))
    for name in names if hasattr(torch.ops.aten, name)
}


# ----------------------------------------------------------------------------- blocks


def _assign_blocks(ops: tuple[TracedOp, ...]) -> tuple[str | None, tuple[TracedOp, ...]]:
    """Give each op the index of the numbered container child it runs in (the most common one)."""
    import dataclasses
    from collections import Counter

    prefixes = Counter(m.group(1) for op in ops if op.module and (m := _BLOCK.match(op.module)))
    if not prefixes:
        return None, ops
    prefix = prefixes.most_common(1)[0][0]
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?:\.|$)")

    def block(op: TracedOp) -> int | None:
        m = pattern.match(op.module) if op.module else None
        return int(m.group(1)) if m else None

    return prefix, tuple(dataclasses.replace(op, block=block(op)) for op in ops)
