"""Capture a model's forward as an fx graph that structure analysis can read.

Design note: the first stage of the pipeline. It tries, in order,

1. ``torch.export.export(model, args, kwargs, strict=False)`` — an aten-level graph in which every
   parameter and buffer is a placeholder (``param_of_node`` maps it back to its FQN) and every op
   carries ``nn_module_stack`` meta, so an op can be traced back to the module that ran it
   (:func:`module_path`). HF causal LMs return a ``DynamicCache`` that export rejects, so when
   ``forward`` takes ``use_cache`` and the caller did not pass it we capture with
   ``use_cache=False`` and say so in ``notes``.
2. ``torch.fx.symbolic_trace(model)`` — a module-level graph (leaf modules such as ``nn.Linear``,
   ``nn.MultiheadAttention`` are ``call_module`` nodes; parameters read in code are ``get_attr``
   nodes). This covers plain modules that export cannot run, e.g. a forward that calls a
   ``torch.fx.wrap``-ped host function (``.numpy()``). Every node gets ``meta["val"]`` from a run
   under ``FakeTensorMode`` (or, if the model cannot run on fake tensors, from one real
   ``no_grad`` forward, kept as meta tensors, whose buffer updates are undone).

``capture(..., methods=("symbolic_trace",))`` picks one method. If every method fails,
:class:`UnsupportedModelError` names each failure (exception type and first line) and the ways out.
All HF families memopt is tested on (see ``structure``) capture with export.

Capture never changes the model: the same object, parameters, ``requires_grad`` flags, buffers and
training mode come out as went in. It does not move or cast the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from memopt.errors import UnsupportedModelError

__all__ = ["METHODS", "CapturedGraph", "capture", "module_path", "node_shape", "op_name"]

log = logging.getLogger("memopt")

METHODS = ("export", "symbolic_trace")


@dataclass(frozen=True)
class CapturedGraph:
    """A captured forward.

    ``gm`` is ``ExportedProgram.graph_module`` (aten ops, parameters as placeholders) for
    ``method == "export"`` or the ``symbolic_trace`` GraphModule for ``"symbolic_trace"``.
    ``param_of_node`` maps fx node names to parameter/buffer FQNs in the original module.
    """

    gm: torch.fx.GraphModule
    method: str
    param_of_node: Mapping[str, str]
    notes: tuple[str, ...]


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    methods: Sequence[str] = METHODS,
) -> CapturedGraph:
    """Capture ``model(*args, **kwargs)``, trying ``methods`` in order (default: export, then
    symbolic_trace). Raises ``UnsupportedModelError`` naming every failure if none works."""
    if not methods or not set(methods) <= set(METHODS):
        raise ValueError(f"methods must be a non-empty sequence drawn from {METHODS}, got {tuple(methods)!r}")
    kwargs, notes = _exportable_kwargs(model, dict(kwargs or {}))
    errors: dict[str, BaseException] = {}
    for method in methods:
        try:
            return _CAPTURERS[method](model, tuple(args), kwargs, notes)
        except AssertionError:
            raise  # a broken memopt invariant, not a capture failure
        except Exception as error:  # noqa: BLE001 - any failure means "try the next method"
            errors[method] = error
            notes = [*notes, f"{_LABELS[method]} failed ({_error_line(error)})"]
            log.info("memopt: %s failed (%s)", _LABELS[method], _first_line(error))
    dependent = [e for e in errors.values() if _data_dependent(e)]
    if "labels" in kwargs and dependent and "export" in methods:
        try:  # is it what the model does with labels (its own loss), reading their values?
            _capture_export(model, tuple(args), {k: v for k, v in kwargs.items() if k != "labels"}, notes)
        except Exception:  # noqa: BLE001 - not the labels alone: the general message
            pass
        else:
            raise _reads_labels(model, dependent[0]) from dependent[0]
    raise _unsupported(model, errors) from errors[methods[-1]]


def _data_dependent(error: BaseException) -> bool:
    return any("DataDependent" in type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None)


def _reads_labels(model: nn.Module, error: BaseException) -> UnsupportedModelError:
    name = type(model).__name__
    hf = type(model).__module__.startswith("transformers.")
    return UnsupportedModelError(
        f"memopt could not capture {name} with labels: it computes from the labels' values ({_error_line(error)}), "
        f"which a traced step cannot; without labels it captures{' (what reads them is its own loss)' if hf else ''}. "
        "Ways out: if the loss reads them, leave labels out of example_inputs and of the loop's calls and pass "
        "loss_fn=lambda output, inputs: <your loss of output and the labels>"
        + (", or set config.problem_type (e.g. 'single_label_classification') for a loss that does not read "
           "their values" if hf else "")
        + "; if the model needs their values otherwise, compute with them by tensor ops (torch.where, masks)")


def module_path(node: torch.fx.Node) -> str | None:
    """FQN of the innermost module that ran ``node`` (export graphs; ``call_module`` targets)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _type = list(stack.values())[-1]
    return str(path)


def node_shape(node: object) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value (``meta["val"]``), or None (no tensor, symbolic sizes)."""
    if not isinstance(node, torch.fx.Node):
        return None
    shape = getattr(node.meta.get("val"), "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except TypeError:
        return None


def op_name(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """One name per op across both capture dialects: ``aten.linear.default``, ``F.linear`` and a
    ``call_module`` to nn.Linear are all "linear"; ``aten._softmax`` and ``x.softmax()`` are
    "softmax". ``modules`` are the graph module's submodules (to name ``call_module`` nodes)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        named = (op for cls, op in _MODULE_OPS if isinstance(module, cls))
        return next(named, type(module).__name__.lower())
    if node.op == "call_method":
        return str(node.target).lstrip("_")
    if node.op == "call_function":
        target = node.target
        packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
        return str(getattr(packet, "__name__", target)).lstrip("_")
    return node.op


_MODULE_OPS = (
    (nn.Linear, "linear"), (nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"), (nn.Softmax, "softmax"), (nn.Mish, "mish"), (nn.Dropout, "dropout"),
)


def _exportable_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    # HF causal LMs return a DynamicCache unless told otherwise, and export rejects it.
    if _takes_use_cache(model) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
        return kwargs, ["captured with use_cache=False (export rejects DynamicCache outputs)"]
    return kwargs, []


def _takes_use_cache(model: nn.Module) -> bool:
    """``forward`` names ``use_cache``, or passes ``**kwargs`` on to an HF model (e.g. a PeftModel)."""
    params = inspect.signature(model.forward).parameters
    forwards_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hf_config = getattr(getattr(model, "config", None), "use_cache", None) is not None
    return "use_cache" in params or (forwards_kwargs and hf_config)


def _capture_export(model: nn.Module, args: tuple, kwargs: dict[str, Any], notes: list[str]) -> CapturedGraph:
    with _unchanged(model):
        program = torch.export.export(model, args, kwargs, strict=False)
    sig = program.graph_signature
    param_of_node = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return CapturedGraph(program.graph_module, "export", param_of_node, tuple(notes))


def _capture_symbolic(model: nn.Module, args: tuple, kwargs: dict[str, Any], notes: list[str]) -> CapturedGraph:
    bound, concrete = _split_inputs(model, args, kwargs)
    with _unchanged(model):
        gm = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
        notes = [*notes, _propagate_shapes(gm, model, bound)]
    param_of_node = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return CapturedGraph(gm, "symbolic_trace", param_of_node, tuple(notes))


def _split_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inputs to trace (bound tensors) and inputs to burn in as constants (everything else)."""
    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs).arguments
    concrete = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
    for name, p in sig.parameters.items():
        plain = p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if plain and name not in bound and p.default is not p.empty:
            concrete[name] = p.default
    return {k: v for k, v in bound.items() if k not in concrete}, concrete


def _propagate_shapes(gm: torch.fx.GraphModule, model: nn.Module, bound: dict[str, Any]) -> str:
    """Give every node ``meta["val"]`` (a fake or meta tensor), as export does."""
    inputs = [bound.get(str(n.target)) for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        # Real buffers meet fake inputs here; ops on real buffers alone (num_batches_tracked += 1) run for real.
        with _buffers_restored(model), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
            _ShapeRecorder(gm, keep=lambda t: t).run(*[_fake(fake_mode, x) for x in inputs])
        return "shapes from a FakeTensorMode run"
    except Exception as fake_error:  # noqa: BLE001 - e.g. a host function that needs real data
        with torch.no_grad(), _buffers_restored(model):
            _ShapeRecorder(gm, keep=lambda t: torch.empty_like(t, device="meta")).run(*inputs)
        return f"shapes from one real no_grad forward (a fake run failed: {_error_line(fake_error)})"


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the graph and stores each node's result (through ``keep``) as ``node.meta["val"]``."""

    def __init__(self, gm: torch.fx.GraphModule, keep: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(gm)
        self.keep = keep

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = tree_map(lambda x: self.keep(x) if isinstance(x, torch.Tensor) else x, result)
        return result


def _fake(mode: FakeTensorMode, x: Any) -> Any:
    return mode.from_tensor(x) if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Check (internal invariant) that tracing left training mode and requires_grad as they were."""
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    yield
    assert modes == [m.training for m in model.modules()], "capture changed a module's training mode"
    assert grads == [p.requires_grad for p in model.parameters()], "capture changed requires_grad"


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    # A real forward may update buffers (BatchNorm running stats); put them back.
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def _unsupported(model: nn.Module, errors: Mapping[str, BaseException]) -> UnsupportedModelError:
    name = type(model).__name__
    failures = "".join(f"  {_LABELS[m]} failed: {_error_line(e)}\n" for m, e in errors.items())
    return UnsupportedModelError(
        f"memopt could not capture {name}.\n{failures}"
        "Ways out: pass example inputs (args/kwargs) that match "
        f"{name}.forward{inspect.signature(model.forward)}; make forward exportable (no Python "
        "control flow on tensor values - use torch.cond or torch.where; no .item()/.numpy() on "
        "activations); or report the failing op to memopt with the message above."
    )


_CAPTURERS = {"export": _capture_export, "symbolic_trace": _capture_symbolic}
_LABELS = {"export": "torch.export.export(strict=False)", "symbolic_trace": "torch.fx.symbolic_trace"}


def _error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
