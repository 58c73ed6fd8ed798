"""Sequence chunking of position-wise regions: a block's MLP run a piece of the tokens at a time.

Design note. At long context the largest tensors of a transformer block are its MLP's
intermediates (tokens × intermediate size, several of them, and their gradients in the
backward). An MLP is position-wise — each token's output reads only that token's input — so it
may run on pieces of the sequence, one after another, with the same result. :func:`install` makes
each chunkable MLP of the model (or those named, each with its own count of pieces) do that in
training (grad enabled): the forward runs the pieces
without autograd and concatenates their outputs, saving only the MLP's input; the backward re-runs
one piece at a time with autograd and takes its gradients (input and parameters, summed over the
pieces), so no whole-sequence intermediate of the MLP is ever alive — in the forward or the
backward. This is the mini-sequence training of MsT (Luo et al., 2024), here as a rewrite of the
user's model: an instance attribute ``forward`` on each chunked module (its class, parameters and
``state_dict`` unchanged; a deep copy is chunked over its own module; ``uninstall`` removes it).

What memopt's planner then sees is the step that runs: the saved MLP input is a decision like any
other (kept, recomputed with its block, offloaded), the pieces' forward are forward temporaries and
their recomputation is part of the backward. Its cost is one more forward of the MLP per step.

Norms are left whole, by measurement: a chunked norm saves its input for its backward, and that
input is the residual stream entering the block, which no recomputation inside the block can
make again. Llama-3.1-8B, QLoRA r32, 524,288 tokens, a100-80gb, host budget 256 GiB, 16 pieces:
MLPs and norms chunked, the smallest feasible budget was 172.6 GiB; MLPs alone, the plan fits at
70.4 GiB predicted (``memopt plan``, CPU dry runs).

Exactness rules, checked, never assumed (``why_not`` gives the reason a module is left whole, and
the plan's note names them): the module is a transformers model's MLP (its class name ends in
``MLP``; a module of the user's own is not assumed position-wise because of its name), not an
expert MLP routing over the sequence, and its forward takes the hidden states alone; it holds no
active dropout, module or functional (a re-run piece would redraw the mask), and no batch
statistics; an output changing more than the last dimension is refused at the first call. A re-run
piece goes through the class's forward over the saved parameters, so hooks on the module run once,
around the whole call; the pieces re-run under the autocast state of the forward. The
gradients equal the unchunked step's up to the order of the parameter-gradient sums (fp32: within
1e-5 relative; the test says so).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module

from memopt.config import is_piece_count
from memopt.errors import MemoptError
from memopt.passes.base import RewriteLog
from memopt.passes.quant_format import scales_shared

__all__ = ["chunkable", "install", "installed", "pieces_of", "uninstall", "why_not"]

_ATTR = "_memopt_seq_chunks"


def why_not(module: nn.Module) -> str | None:
    """Why ``module`` is not chunked along the sequence (None: it is a position-wise MLP that can be)."""
    name = type(module).__name__
    if not name.upper().endswith("MLP"):
        return f"{name} is not a known position-wise MLP"
    if not type(module).__module__.startswith("transformers."):
        return (f"{name} is not a transformers model's MLP: memopt chunks only those, whose forward is known to treat "
                "each position alone")
    if any(word in name for word in _NOT_POSITION_WISE):
        return (f"{name} is named as a mixture-of-experts MLP, which memopt does not chunk (an expert layer may "
                "route tokens with a capacity over all positions; a plain MLP of a MoE model shares the name)")
    params = [p for p in inspect.signature(type(module).forward).parameters.values()][1:]
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return f"{name}.forward takes more than the hidden states"
    dropout = [n for n, m in module.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropout:
        return (f"{name} holds dropout ({dropout[0] or 'itself'}, p > 0): a re-run piece would redraw its mask (set "
                "that dropout to 0, e.g. the method's dropout=0, or leave chunk_sequence unset)")
    if "dropout" in _source(type(module).forward):
        return f"{name}'s forward applies dropout: a re-run piece would redraw its mask"
    stats = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if stats:
        return f"{name} holds {type(module.get_submodule(stats[0])).__name__}: its statistics span all positions"
    return None


_NOT_POSITION_WISE = ("Sparse", "Switch", "Moe", "MoE")  # expert MLPs whose routing counts over the sequence


def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return "dropout"  # unknown code: assume the worst


def chunkable(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The MLPs of ``model`` that can be chunked (by name, outermost first), and those left whole with why."""
    chosen, left = [], {}
    for name, module in model.named_modules():
        if not type(module).__name__.upper().endswith("MLP") or any(name.startswith(c + ".") for c in chosen):
            continue
        reason = why_not(module)
        if reason is None:
            chosen.append(name)
        else:
            left[name] = reason
    return chosen, left


def install(model: nn.Module, chunks: int | Mapping[str, int], rewrites: RewriteLog) -> tuple[list[str], dict[str, str]]:
    """Run chunkable MLPs of ``model`` in pieces of tokens in training: every one ``chunks`` pieces at a
    time, or, for a mapping, those it names (module name -> pieces; the others stay whole). Returns
    the MLPs chunked, and those that cannot be with why. Undone by ``rewrites``."""
    counts = pieces_of(model, chunks)
    chosen, left = chunkable(model)
    chosen = [name for name in chosen if name in counts]
    for name in chosen:
        module = model.get_submodule(name)
        module.forward = types.MethodType(_chunked_forward, module)
        setattr(module, _ATTR, counts[name])
    rewrites.on_undo(lambda: uninstall(model))
    return chosen, left


def pieces_of(model: nn.Module, chunks: int | Mapping[str, int]) -> dict[str, int]:
    """``chunks`` (a number of pieces for every chunkable MLP, or MLP name -> pieces) as MLP name ->
    pieces, checked: a count below 2, or a name that is no chunkable MLP of ``model``, is a
    ValueError saying why."""
    if isinstance(chunks, Mapping):
        if not chunks:
            raise ValueError("chunk_sequence={}: name at least one MLP (module name -> pieces), or leave it unset")
        names, left = chunkable(model)
        for name, count in chunks.items():
            _check_count(count, f"chunk_sequence[{name!r}]")
            if name in left:
                raise ValueError(f"chunk_sequence names {name!r}, which cannot run in pieces of tokens: {left[name]}")
            if name not in names:
                raise ValueError(f"chunk_sequence names {name!r}, which is not an MLP of {type(model).__name__} that "
                                 f"can run in pieces of tokens (those that can: "
                                 f"{', '.join(names[:3]) + (', ...' if len(names) > 3 else '') or 'none'})")
        return dict(chunks)
    _check_count(chunks, "chunk_sequence")
    return dict.fromkeys(chunkable(model)[0], chunks)


def _check_count(count: Any, what: str) -> None:
    if not is_piece_count(count):
        raise ValueError(f"{what} must be a number of pieces >= 2 (or None: no chunking), got {count!r}")


def installed(model: nn.Module) -> int | dict[str, int] | None:
    """The pieces ``model``'s MLPs run in: one number where every chunkable MLP runs in that many,
    else MLP name -> pieces for those chunked (None: none is)."""
    counts = {name: vars(m)[_ATTR] for name, m in model.named_modules() if _ATTR in vars(m)}
    if not counts:
        return None
    if len(set(counts.values())) == 1 and list(counts) == chunkable(model)[0]:
        return next(iter(counts.values()))
    return counts


def uninstall(model: nn.Module) -> None:
    """Nothing of the chunking left on ``model``."""
    for module in model.modules():
        if vars(module).pop(_ATTR, None) is not None:
            vars(module).pop("forward", None)


def _chunked_forward(self: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plain = type(self).forward
    if args or kwargs or not torch.is_grad_enabled() or hidden.dim() < 2:
        return plain(self, hidden, *args, **kwargs)
    named = dict(self.named_parameters())
    named.update(self.named_buffers())
    if not (hidden.requires_grad or any(t.requires_grad for t in named.values())):
        return plain(self, hidden)
    return _Pieces.apply(hidden, self, tuple(named), *named.values())


def _pieces(x: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """``chunks`` pieces along the sequence (the dim before the features), always that many (some empty
    when the sequence is shorter), so the count never depends on a symbolic size."""
    dim, length = x.dim() - 2, x.shape[x.dim() - 2]
    bounds = [(i * length) // chunks for i in range(chunks + 1)]
    return [x.narrow(dim, lo, hi - lo).contiguous() for lo, hi in zip(bounds, bounds[1:])]


class _Pieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, module: nn.Module, names: tuple[str, ...],
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.module, ctx.names = module, names
        ctx.device_type = hidden.device.type if hidden.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.save_for_backward(hidden, *tensors)
        plain = type(module).forward
        pieces = _pieces(hidden, getattr(module, _ATTR))
        with torch.no_grad(), scales_shared():  # (quantized weights' scales undone once for all pieces)
            outs = [plain(module, piece) for piece in pieces]
        if any(o.shape[:-1] != piece.shape[:-1] for o, piece in zip(outs, pieces)):
            raise MemoptError(f"{type(module).__name__} changes more than the last dimension of its input, so it cannot "
                              "run in pieces of tokens: leave chunk_sequence unset")
        return torch.cat(outs, dim=hidden.dim() - 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, *tensors = ctx.saved_tensors
        wanted = [i for i in range(len(tensors)) if ctx.needs_input_grad[3 + i]]
        chunks = getattr(ctx.module, _ATTR)
        enabled, dtype = ctx.autocast
        inputs, sums = [], [None] * len(wanted)
        frozen = [t.detach() for t in tensors]  # one leaf per frozen tensor for all pieces (so a quantized
        # weight's scales are undone once)
        with scales_shared():
            for piece, grad_piece in zip(_pieces(hidden, chunks), _pieces(grad, chunks)):
                piece = piece.detach().requires_grad_(ctx.needs_input_grad[0])
                leaves = [t.detach().requires_grad_() if i in wanted else frozen[i] for i, t in enumerate(tensors)]
                with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled), \
                        _reparametrize_module(ctx.module, dict(zip(ctx.names, leaves))):
                    out = type(ctx.module).forward(ctx.module, piece)  # as the forward's pieces ran: the module's own hooks
                    # ran once, around the whole chunked call
                targets = ([piece] if ctx.needs_input_grad[0] else []) + [leaves[i] for i in wanted]
                grads = torch.autograd.grad(out, targets, grad_piece, allow_unused=True)
                if ctx.needs_input_grad[0]:
                    inputs.append(grads[0])
                    grads = grads[1:]
                sums = [g if s is None else s if g is None else s + g for s, g in zip(sums, grads)]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for i, total in zip(wanted, sums):
            out[i] = total
        grad_in = torch.cat(inputs, dim=hidden.dim() - 2) if ctx.needs_input_grad[0] else None
        return (grad_in, None, None, *out)
