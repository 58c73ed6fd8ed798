"""Freeze / partial backprop: untrained parameters get no gradient, and backward does no work
below the lowest layer that needs one.

Design note. Autograd already does most of this, so the pass states it, sets it up and checks it
rather than re-implementing it:
* A frozen Linear computes no weight-gradient GEMM: the backward of ``linear`` / ``mm`` / ``addmm``
  evaluates only the outputs whose inputs require grad (autograd's output mask). ``grad_x`` is
  still computed wherever something below needs it.
* Below the lowest parameter that requires grad nothing requires grad — frozen embeddings give a
  tensor without ``requires_grad`` — so autograd records no graph there and backward stops.
* What can still make backward run below, and what this module does about it:
  1. an input forced to require grad: HF's ``enable_input_require_grads()`` (which *reentrant*
     checkpointing needs) makes the embedding output require grad, so ``grad_x`` is computed
     through every frozen block. ``apply_freeze`` finds that hook and says so in its notes (use
     non-reentrant checkpointing and ``model.disable_input_require_grads()``); it does not remove
     a hook the user installed.
  2. a custom ``autograd.Function`` that computes ``grad_x`` without checking
     ``ctx.needs_input_grad`` (memopt's PaCA op checks it, so the first PaCA layer above frozen
     embeddings computes only ``grad_P``).
  3. a parameter left trainable by accident (a norm weight of a lower block): ``freeze`` sets the
     trainable set exactly, and ``backward_reach`` lists the modules backward will touch.
The tests count backward FLOPs with ``FlopCounterMode`` and compare them with the analytical count.

``apply_full`` is the pass of ``method="full"`` (``FullConfig``): ``apply_freeze`` with every
parameter that requires grad trainable, or those of them its ``target_modules`` name; a parameter
the model holds frozen stays frozen, and the notes say which.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from memopt.config import FullConfig
from memopt.ir.structure import LinearLayer, ModelGraph
from memopt.passes.base import ModuleDecision, ModuleDetails, PassResult, RewriteLog

__all__ = ["Trainable", "apply_freeze", "apply_full", "backward_reach", "block_name", "freeze", "top_blocks"]

# A regex fullmatched against parameter names, module names (their parameters), or a predicate.
Trainable = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool], None]

_HF_INPUT_GRAD_HOOK = "make_inputs_require_grads"  # transformers' enable_input_require_grads hook


def _matcher(trainable: Trainable) -> Callable[[str, nn.Parameter], bool]:
    if trainable is None:
        return lambda name, p: False
    if callable(trainable):
        return trainable
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        return lambda name, p: pattern.fullmatch(name) is not None
    prefixes = tuple(trainable)
    if not all(isinstance(m, str) and m for m in prefixes):
        raise TypeError(f"trainable must be a regex, a list of module names or a predicate, got {trainable!r}")
    return lambda name, p: any(name == m or name.startswith(m + ".") for m in prefixes)


def freeze(model: nn.Module, trainable: Trainable = None, log: RewriteLog | None = None) -> tuple[str, ...]:
    """Make exactly the parameters matched by ``trainable`` require grad; return their names.

    ``trainable``: a regex fullmatched against parameter names, a list of module names (every
    parameter under them), a predicate ``(name, param) -> bool``, or None (freeze everything).
    A list entry that names no parameter is an error naming it. Changes ``model`` in place; with a
    ``log`` the previous flags are restored by ``log.undo()``.
    """
    match = _matcher(trainable)
    if isinstance(trainable, (list, tuple)):
        _check_modules_exist(model, trainable)
    kept, frozen = [], []
    for name, p in model.named_parameters():
        (kept if match(name, p) else frozen).append((name, p))
    if log is not None:
        log.freeze(p for _, p in frozen)
    else:
        for _, p in frozen:
            p.requires_grad_(False)
    for _, p in kept:
        p.requires_grad_(True)
    return tuple(name for name, _ in kept)


def _check_modules_exist(model: nn.Module, names: Iterable[str]) -> None:
    params = [name for name, _ in model.named_parameters()]
    for m in names:
        if not any(name == m or name.startswith(m + ".") for name in params):
            raise ValueError(f"trainable names {m!r}, which holds no parameter of {type(model).__name__}; "
                             f"parameter names look like {params[:3]}")


def top_blocks(graph: ModelGraph, k: int) -> tuple[str, ...]:
    """Module names of the last ``k`` blocks, from the graph's block numbering (e.g. 'model.layers.7').

    A block's name is the longest dotted prefix shared by its Linear-like layers.
    """
    blocks: dict[int, list[list[str]]] = {}  # block -> dotted names of its layers, split
    for layer in graph.linears:
        if layer.block is not None:
            blocks.setdefault(layer.block, []).append(layer.name.split("."))
    if not 0 < k <= len(blocks):
        raise ValueError(f"k={k}: the model has {len(blocks)} blocks; pass 1 <= k <= {len(blocks)}")
    return tuple(".".join(_common_prefix(blocks[b])) for b in sorted(blocks)[-k:])


def block_name(layer_names: list[str]) -> str:
    """A block's module name from its Linear-like layers' names: their longest shared dotted prefix."""
    return ".".join(_common_prefix([name.split(".") for name in layer_names]))


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = paths[0]
    for path in paths[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, path)) if a != b), min(len(prefix), len(path)))
        prefix = prefix[:n]
    return prefix[:-1] if len(paths) == 1 else prefix  # one layer alone: its parent module


def apply_freeze(model: nn.Module, graph: ModelGraph, trainable: Trainable, log: RewriteLog) -> PassResult:
    """Freeze every parameter not matched by ``trainable`` (see ``freeze``).

    Requires: ``graph`` was captured from ``model``.
    Ensures: exactly the matched parameters require grad; each Linear-like layer's decision says
    "full" (its weight trains) or "frozen"; the notes name the lowest trained layer and any hook
    that would make backward run below it.
    """
    freeze(model, trainable, log)
    decisions = tuple(_decision(model, layer) for layer in graph.linears)
    notes = [_lowest_note(decisions)]
    hooked = _input_grad_hooks(model)
    if hooked:
        notes.append(f"{hooked} forces its output to require grad (transformers' enable_input_require_grads), "
                     "so backward computes grad_x through every frozen block below the trained ones; unless you "
                     "use reentrant checkpointing, call model.disable_input_require_grads()")
    return PassResult(model, decisions, tuple(notes))


def apply_full(model: nn.Module, graph: ModelGraph, cfg: FullConfig, log: RewriteLog) -> PassResult:
    """Full-parameter training: every parameter that requires grad trains, or those of them
    ``cfg.target_modules`` names — a regex fullmatched against parameter names, or module names,
    each matching a module whose dotted name is it or ends with it (PEFT's convention: ``"q_proj"``
    is every ``...q_proj``) and every parameter under it; the rest are frozen. A parameter the model
    holds frozen is never unfrozen (the notes name them). Nothing else changes."""
    targets = cfg.target_modules
    held = [name for name, p in model.named_parameters() if not p.requires_grad]
    if len(held) == sum(1 for _ in model.parameters()):
        raise ValueError(f"method='full' trains the parameters that require grad, and none of "
                         f"{type(model).__name__}'s does: call model.requires_grad_(True) first to train them all")
    if targets is None:
        named: Callable[[str], bool] = lambda name: True  # noqa: E731
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        named = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        def named(name: str) -> bool:
            parts = name.split(".")
            return any(".".join(parts[i:j]) in targets for j in range(1, len(parts)) for i in range(j))
    if targets is not None and not any(named(name) for name, _ in model.named_parameters()):
        how = "a regex is fullmatched against parameter names" if isinstance(targets, str) else \
            "each name matches a module whose dotted name is it or ends with it"
        raise ValueError(f"target_modules={targets!r} matches no parameter of {type(model).__name__} ({how}); "
                         f"parameter names look like {[n for n, _ in model.named_parameters()][:3]}")
    # A parameter the model holds frozen (Whisper's sinusoidal position table, a layer the user
    # froze) stays frozen: training it would be another model than the one given.
    result = apply_freeze(model, graph, lambda name, p: p.requires_grad and named(name), log)
    notes = list(result.notes)
    total = sum(1 for _ in model.parameters())
    if targets is None:  # not "backward stops at" the first Linear: the embeddings train too
        notes[0] = f"every parameter not held frozen trains ({total - len(held)} of {total} tensors)" if held else \
            f"every parameter trains ({total} tensors): backward runs through the whole model"
    some = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if held:
        notes.append(f"{len(held)} parameter tensors the model held frozen (requires_grad=False) stay frozen: {some} "
                     "(model.requires_grad_(True) before memopt.optimize trains them too)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"target_modules={targets!r} names only parameters {type(model).__name__} holds frozen "
                         f"({some}): unfreeze them (requires_grad_(True)) before memopt.optimize to train them")
    return dataclasses.replace(result, notes=tuple(notes))


def _decision(model: nn.Module, layer: LinearLayer) -> ModuleDecision:
    module = model.get_submodule(layer.name)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return ModuleDecision(
        name=layer.name, role=layer.role.value, method="full" if trained else "frozen",
        in_features=layer.in_features, out_features=layer.out_features, trainable_params=trained,
        details=ModuleDetails(block=layer.block), reason="matched trainable" if trained else "not matched by trainable",
    )


def _lowest_note(decisions: tuple[ModuleDecision, ...]) -> str:
    trained = [d for d in decisions if d.method == "full"]
    if not trained:
        return "no Linear-like layer trains"
    lowest = trained[0]  # decisions follow graph (forward) order
    return f"backward stops at {lowest.name} (block {lowest.details.get('block')}): no Linear-like layer before it trains"


def _input_grad_hooks(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if any(getattr(h, "__name__", "") == _HF_INPUT_GRAD_HOOK for h in module._forward_hooks.values()):
            return name or type(model).__name__
    return None


def backward_reach(model: nn.Module, *args: object, **kwargs: object) -> tuple[str, ...]:
    """Submodules whose output requires grad when ``model(*args, **kwargs)`` runs.

    Backward does work in exactly these modules (and in the ops between them); it never visits the
    others. Listed in the order their forwards return (inner modules before their parents). Runs
    one forward with grad enabled and discards the output; the model is not changed.
    """
    reached: list[str] = []
    handles = [m.register_forward_hook(_recorder(name, reached)) for name, m in model.named_modules() if name]
    try:
        with torch.enable_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return tuple(dict.fromkeys(reached))


def _recorder(name: str, reached: list[str]) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: object, output: object) -> None:
        tensors = tree_leaves(output)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            reached.append(name)

    return hook
