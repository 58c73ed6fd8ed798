"""Cut cross-entropy on a HF causal LM: the head and the loss fused, no [tokens, vocab] logits.

Design note. A HF ``*ForCausalLM`` forward computes ``logits = self.lm_head(hidden_states)`` and,
given ``labels``, ``loss = self.loss_function(logits=logits, labels=labels, ...)``; at long
context those logits, their fp32 copy, the log-softmax and their gradient are the largest tensors
of the step (seq × vocab each). :func:`install` fuses the two without touching the model's
structure (same modules, same parameters, same ``state_dict``): while a *training* call with
labels runs (grad enabled), the head passes its input through and the model's ``loss_function``
computes ``memopt.kernels.cut_ce.cut_cross_entropy`` from it with the head's weight; the output's
``logits`` are then not made — reading them raises an error naming the way out. A call without
labels, or without grad (evaluation, generation), runs the head as it is and returns the logits.

The fusion is exact in structure, not assumed: it applies only where the forward's source passes
the head's output straight to ``self.loss_function`` (no soft-capping or scaling between), the
head is a plain ``nn.Linear`` without bias, and the loss is HF's ``ForCausalLM`` loss;
:func:`why_not` gives the reason otherwise, and the plan states it. Whether to apply it is the
pipeline's decision (``cut_cross_entropy="auto"``: when the step does not fit as it is).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from memopt.errors import MemoptError
from memopt.kernels.cut_ce import chunks_for, cut_cross_entropy
from memopt.passes.base import RewriteLog

__all__ = ["CutLogits", "LogitsNotMade", "NOT_MADE", "finish_output", "install", "installed", "resize", "uninstall",
           "why_not"]

NOT_MADE = ("memopt computed this training step's loss with cut cross-entropy, which never makes the "
            "[tokens, vocab] logits; to get them in training, pass cut_cross_entropy=False to memopt.optimize "
            "(memopt plan --no-cut-ce). Evaluation (torch.no_grad) and calls without labels return them as usual")


class LogitsNotMade(MemoptError, AttributeError):
    """Raised on any use of ``CutLogits`` (an AttributeError too, so ``hasattr(out.logits, ...)`` is False)."""


class CutLogits:
    """Stands for the logits a cut cross-entropy step did not make: any use raises ``LogitsNotMade``."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise LogitsNotMade(NOT_MADE)

    def __getitem__(self, key: Any) -> Any:
        raise MemoptError(NOT_MADE)

    def __iter__(self) -> Any:
        raise MemoptError(NOT_MADE)

    def __bool__(self) -> bool:
        raise MemoptError(NOT_MADE)

    def __repr__(self) -> str:
        return "<logits not made: cut cross-entropy>"


@dataclass
class _State:
    """What the fusion holds, on the model (and on its head): found through the module, never through
    a closure, so that a deep copy of the model is fused over its own head."""

    head: nn.Linear
    chunks: int
    loss: Callable[..., torch.Tensor]  # the model's own loss function (calls that are not cut)
    signature: inspect.Signature
    armed: bool = False
    handles: tuple[Any, ...] = ()


_ATTR = "_memopt_cut_ce"


def installed(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def pieces(model: nn.Module) -> int | None:
    """The pieces of tokens ``model``'s fused head and loss runs in (None: not fused)."""
    state = getattr(model, _ATTR, None)
    return None if state is None else state.chunks


def why_not(model: nn.Module, labels: bool, loss_fn: bool) -> str | None:
    """Why cut cross-entropy cannot apply to ``model`` (None: it can). ``labels``: the example batch
    has labels; ``loss_fn``: the loss is computed outside the model."""
    if loss_fn:
        return "a loss_fn computes the loss from the model's outputs, which needs the logits"
    if not labels:
        return "the model computes no loss (no labels in example_inputs): the loss is computed from its logits"
    head = _head(model)
    if head is None:
        return f"{type(model).__name__} has no output embedding (lm_head) that HF's causal-LM loss reads"
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None:
        return "its LM head has a bias"
    if "_loss_function" in vars(model) or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return f"its loss is not HF's causal-LM cross-entropy (loss_type={getattr(model, 'loss_type', None)!r})"
    return _head_feeds_loss(type(model).forward, type(model).__name__)


def install(model: nn.Module, tokens: int, rewrites: RewriteLog, *, chunks: int | None = None) -> int:
    """Fuse ``model``'s head and loss (``why_not`` must be None); returns the pieces the tokens are cut
    into (``chunks``: a saved plan's; else from the example's ``tokens``). Undone by ``rewrites``."""
    head = _head(model)
    assert head is not None and why_not(model, True, False) is None
    chunks = chunks_for(tokens, head.out_features, _trained_hidden(head)) if chunks is None else chunks
    state = _State(head, chunks, model.loss_function, inspect.signature(model.forward))
    state.handles = (model.register_forward_pre_hook(_arm, with_kwargs=True),
                     model.register_forward_hook(_disarm, with_kwargs=True, always_call=True))
    # Instance attributes: the modules, their classes and the state_dict are unchanged.
    head.forward = types.MethodType(_head_forward, head)
    setattr(head, _ATTR, state)
    model.loss_function = types.MethodType(_loss_function, model)
    setattr(model, _ATTR, state)
    rewrites.on_undo(lambda: uninstall(model))
    return state.chunks


def resize(model: nn.Module, tokens: int) -> None:
    """Cut ``tokens`` (a re-plan's widest batch) into as many pieces as ``install`` would."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        state.chunks = chunks_for(tokens, state.head.out_features, _trained_hidden(state.head))


def use_pieces(model: nn.Module, pieces: int | None) -> None:
    """Cut the tokens into ``pieces`` again (the plan the model switches back to, or keeps after a
    re-plan that failed, was made so); nothing where ``model`` is not fused or ``pieces`` is None."""
    state = getattr(model, _ATTR, None)
    if state is not None and pieces is not None:
        state.chunks = pieces


def _trained_hidden(head: nn.Module) -> int | None:
    """The head's input width if its weight trains (``chunks_for``: pieces of at least half as many rows)."""
    weight = getattr(head, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.requires_grad else None


def uninstall(model: nn.Module) -> None:
    """Nothing of the fusion left on ``model`` (a merged model is plain)."""
    state = vars(model).pop(_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    vars(state.head).pop("forward", None)
    vars(state.head).pop(_ATTR, None)
    vars(model).pop("_loss_function", None)


def _arm(model: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(model, _ATTR)
    try:
        bound = state.signature.bind(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    labels = bound.get("labels")
    state.armed = torch.is_grad_enabled() and isinstance(labels, torch.Tensor)
    extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
    return_dict = bound.get("return_dict", extra.get("return_dict"))
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if state.armed and return_dict is False:
        state.armed = False
        raise MemoptError("this model computes its loss with cut cross-entropy, which makes no logits; a tuple output "
                          "(return_dict=False) would have no place for them: call it with return_dict=True, or pass "
                          "cut_cross_entropy=False to memopt.optimize")


def _disarm(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """The output without the head's pass-through: no ``logits`` entry (``CutLogits`` outside a trace)."""
    state = getattr(model, _ATTR)
    armed, state.armed = state.armed, False  # also when the forward raised (always_call)
    if not armed or output is None or not hasattr(output, "logits"):
        return output
    return _with_logits(output, None if _traced(getattr(output, "loss", None)) else CutLogits())


def _head_forward(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x if getattr(head, _ATTR).armed else F.linear(x, head.weight, head.bias)


def _loss_function(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   **kwargs: Any) -> torch.Tensor:
    state = getattr(model, _ATTR)
    if not state.armed:
        return state.loss(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
    return _cut_loss(logits, labels, state.head.weight, state.chunks, **kwargs)


def finish_output(model: nn.Module, output: Any) -> Any:
    """``output`` with ``CutLogits`` where a cut step made no logits (a traced step's output has none)."""
    if installed(model) and getattr(output, "logits", 0) is None and getattr(output, "loss", None) is not None:
        return _with_logits(output, CutLogits())
    return output


def _with_logits(output: Any, logits: Any) -> Any:
    """A copy of the ``ModelOutput`` ``output`` whose ``logits`` entry is ``logits`` (None: no entry, so
    ``out[1]`` or ``out["logits"]`` cannot find the head's pass-through)."""
    fields = {k: v for k, v in output.items() if k != "logits"}
    return type(output)(**fields) if logits is None else type(output)(**fields, logits=logits)


def _traced(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if not isinstance(t, torch.Tensor):
        return False
    return isinstance(t, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(t)


def _cut_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, chunks: int,
              num_items_in_batch: Any = None, ignore_index: int = -100, shift_labels: torch.Tensor | None = None,
              **_: Any) -> torch.Tensor:
    """HF's ``ForCausalLMLoss`` (shifted labels; mean over valid tokens, or sum / ``num_items_in_batch``)
    with cut cross-entropy from the head's input ``hidden``."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    kind = h.device.type
    if torch.is_autocast_enabled(kind):  # F.linear under autocast: both operands in the autocast dtype
        dtype = torch.get_autocast_dtype(kind)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(kind, enabled=False):
        total = cut_cross_entropy(h, weight, targets, ignore_index, chunks)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) and hasattr(model, "loss_function") else None


def _head_feeds_loss(forward: Callable[..., Any], name: str) -> str | None:
    """None if ``forward`` passes ``x = self.lm_head(...)`` unchanged to ``self.loss_function(x, ...)``
    (first argument or ``logits=x``), with no other use of ``x`` in between; else why not."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return f"{name}.forward's source cannot be read, so memopt cannot check that the head feeds the loss directly"
    changed = (f"{name}.forward changes the logits between lm_head and the loss (soft-capping, scaling) or does not "
               "pass them to self.loss_function")

    def self_call(node: ast.AST, attr: str) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr and \
            isinstance(node.func.value, ast.Name) and node.func.value.id == "self"

    heads = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and self_call(n.value, "lm_head")
             and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]
    losses = [n for n in ast.walk(tree) if self_call(n, "loss_function")]
    if len(heads) != 1 or len(losses) != 1:
        return changed
    var, loss = heads[0].targets[0].id, losses[0]
    first = loss.args[0] if loss.args else next((k.value for k in loss.keywords if k.arg == "logits"), None)
    if not (isinstance(first, ast.Name) and first.id == var):
        return changed
    inside = {id(n) for n in ast.walk(loss)}
    between = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == var and id(n) not in inside
               and heads[0].lineno < n.lineno <= loss.lineno]
    return changed if between else None
