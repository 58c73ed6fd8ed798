"""RSO, randomized subspace optimization (Chen et al., 2025, arXiv 2502.07222): full-parameter
training as a sequence of low-dimensional subproblems.

Subproblem k trains, for each adapted layer W (out × in), only B (out × r) in

    y = x·(W + B·P)ᵀ = x·Wᵀ + (x·Pᵀ)·Bᵀ          P (r × in) random and frozen, B = 0 at its start

and ends after ``resample_every`` optimizer steps: W ← W + B·P, B and its optimizer state are reset
to zero (the moments are dropped, not kept at zero: the memory they held is freed and re-made, the
same bytes), and subproblem k + 1 draws its own P. The optimizer ``make_optimizer`` returns does
this after its ``step()`` (:func:`attach`); a loop with its own optimizer calls :func:`end_subproblem`.

Why it saves memory: B's gradient is Σ (∂L/∂y)ᵀ·(P·x), so backward keeps P·x — r values per token,
fp32 (B's dtype) — instead of x (``in`` values per token); the gradient with respect to x is
(∂L/∂y)·W + ((∂L/∂y)·B)·P, from weights alone. W is frozen, so it has no gradient or optimizer
state: per layer out·r of each.

Choices (the paper leaves them open or has no public code):

* **P's distribution**: i.i.d. N(0, 1/r) entries, so E[PᵀP] = I: SGD on B moves W by −η·G·PᵀP, an
  unbiased estimate of full SGD's −η·G, and Adam on B (each step about η per entry) moves each
  entry of W by about η, as full-parameter Adam would — the learning rate carries over.
* **P's seed**: drawn on the CPU from (``seed``, the layer's index among the adapted layers, k),
  so P is never saved: a reload draws it again from the saved step count. Held in W's dtype.
* **No proximal term** (the paper's ‖B‖²/2η): each subproblem is a few hundred steps from B = 0;
  weight decay on B (AdamW's) plays that part if wanted.
* **The fold** W += B·P runs in row chunks of at most 2²⁰ elements in fp32 and rounds into W's
  dtype (on a bf16 model, as bf16 full training rounds its update). Its transient — P in fp32
  plus one chunk — is counted on top of the optimizer step's peak (an upper bound: it runs after
  the step's own temporaries are gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn as nn

from memopt.config import RsoConfig
from memopt.ir.structure import ModelGraph
from memopt.passes.base import (
    ModuleDecision,
    ModuleDetails,
    PassResult,
    RewriteLog,
    WrappedLinear,
    details_kind,
    merge_wrapped,
    select_targets,
)
from memopt.passes.lora import frozen_rest, why_adapted

__all__ = ["RsoDetails", "RsoLinear", "apply_rso", "attach", "draw_projection", "end_subproblem", "merge_rso",
           "rso_layers"]

_FOLD_CHUNK = 2**20  # elements of B·P made at a time by the fold


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class RsoDetails(ModuleDetails):
    """An RSO layer: B (out × ``rank``) trains in W + B·P; P redrawn every ``resample_every`` steps."""

    kind: ClassVar[str] = "rso"

    rank: int
    resample_every: int


def draw_projection(rank: int, in_features: int, seed: int, layer: int, subproblem: int) -> torch.Tensor:
    """P for ``layer`` (its index among the adapted layers) in ``subproblem``: [rank, in] fp32 on the
    CPU, entries N(0, 1/rank) (module docstring), the same on every machine."""
    key = (seed * 0x9E3779B1 + layer * 0x85EBCA77 + subproblem * 0xC2B2AE3D) % (2**63 - 1)
    generator = torch.Generator(device="cpu").manual_seed(key)
    return torch.randn(rank, in_features, generator=generator) / rank**0.5


class RsoLinear(WrappedLinear):
    """A Linear-like ``base_layer`` whose weight trains through RSO's subproblems (module docstring).

    ``rso_B`` (out × r, fp32) is the trainable parameter; ``rso_P`` (r × in, W's dtype) a
    non-persistent buffer drawn from the seed; ``rso_step`` (persistent) counts optimizer steps, so
    a reloaded layer knows its subproblem. The base layer's weight is frozen, and changed by folds."""

    trains_base_weight = True  # its W is what training changes: a checkpoint saves it

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int, cfg: RsoConfig,
                 index: int) -> None:
        super().__init__()
        self._wrap(base_layer)
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.resample_every, self.seed, self.index = cfg.rank, cfg.resample_every, cfg.seed, index
        weight = base_layer.weight
        self.rso_B = nn.Parameter(torch.zeros(out_features, cfg.rank, dtype=torch.float32, device=weight.device))
        self.register_buffer("rso_P", torch.empty(cfg.rank, in_features, dtype=weight.dtype, device=weight.device),
                             persistent=False)
        self.register_buffer("rso_step", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._steps = 0  # rso_step as a Python int (read every step without a device sync)
        self.redraw()

    @property
    def subproblem(self) -> int:
        return self._steps // self.resample_every

    def redraw(self) -> None:
        """Draw P for the current subproblem (after a fold, or a reload of ``rso_step``)."""
        if self.rso_P.device.type == "meta":
            return
        self._steps = int(self.rso_step)
        p = draw_projection(self.rank, self.in_features, self.seed, self.index, self.subproblem)
        with torch.no_grad():
            self.rso_P.copy_(p.to(self.rso_P.dtype))  # converted on the CPU: no fp32 copy on the device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = torch.nn.functional.linear(x, self.rso_P)  # P·x: what backward keeps (r per token)
        update = torch.nn.functional.linear(h.to(self.rso_B.dtype), self.rso_B)
        return result + update.to(result.dtype)

    @property
    def fold_rows(self) -> int:
        """Rows of B·P the fold makes at a time (at most 2²⁰ elements)."""
        return min(self.out_features, max(1, _FOLD_CHUNK // self.in_features))

    after_step = "RSO's fold of B·P into W at the end of each subproblem (P in fp32 and one chunk of B·P)"

    def after_step_bytes(self) -> int:
        """What the fold holds beside the model (``after_step``; ``passes.after_step_bytes``)."""
        return 4 * (self.rank + self.fold_rows) * self.in_features

    @torch.no_grad()
    def fold(self) -> None:
        """W ← W + B·P in row chunks (module docstring); B is left as it is."""
        weight, b = self.base_layer.weight, self.rso_B
        p = self.rso_P.float()
        rows = self.fold_rows
        for start in range(0, self.out_features, rows):
            delta = b[start:start + rows] @ p  # [rows, in]
            if self.kind == "conv1d":  # Conv1D stores W as [in, out]
                weight[:, start:start + rows].add_(delta.t())
            else:
                weight[start:start + rows].add_(delta)

    @torch.no_grad()
    def end_subproblem(self) -> None:
        """Fold B·P into W, zero B and draw the next subproblem's P (``rso_step`` is the caller's)."""
        self.fold()
        self.rso_B.zero_()
        self.redraw()

    def merged(self) -> nn.Module:
        """The base layer with B·P folded into its weight (changes it in place)."""
        self.fold()
        return self.base_layer

    def count_step(self) -> bool:
        """One optimizer step taken; True if it ends the subproblem."""
        self._steps += 1
        self.rso_step.fill_(self._steps)
        return self._steps % self.resample_every == 0

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, resample_every={self.resample_every}, step={self._steps}"


def rso_layers(model: nn.Module) -> list[RsoLinear]:
    return [m for m in model.modules() if isinstance(m, RsoLinear)]


def end_subproblem(layers: Iterable[RsoLinear], optimizer: torch.optim.Optimizer | None = None) -> int:
    """Count one optimizer step on each layer; those whose subproblem ends fold B·P into W, reset B and
    drop B's state in ``optimizer`` (freed, re-made by its next step), and draw the next P. Returns
    how many layers started a new subproblem."""
    started = 0
    for layer in layers:
        if layer.count_step():
            layer.end_subproblem()
            if optimizer is not None:
                optimizer.state.pop(layer.rso_B, None)
            started += 1
    return started


def attach(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Run :func:`end_subproblem` over ``model``'s RSO layers after every ``optimizer.step()``."""
    layers = rso_layers(model)
    if layers:
        optimizer.register_step_post_hook(lambda opt, args, kwargs: end_subproblem(layers, opt))
    return optimizer


def apply_rso(model: nn.Module, graph: ModelGraph, cfg: RsoConfig, log: RewriteLog) -> PassResult:
    """Freeze every parameter and wrap each targeted Linear-like layer in an ``RsoLinear``.

    Ensures: only ``rso_B`` requires grad; outputs are unchanged at init (B = 0)."""
    targets = select_targets(graph, model, cfg.target_modules, cfg.exclude_modules)
    too_wide = [t for t in targets if cfg.rank >= t.in_features]
    if too_wide:
        raise ValueError(f"rank={cfg.rank} is not below the input width of {too_wide[0].name} "
                         f"(in_features={too_wide[0].in_features}; {len(too_wide)} such layers): RSO's P·x must be "
                         "smaller than x, so its rank is below each layer's input width; lower rank= or exclude "
                         "them (exclude_modules=...)")
    log.freeze(model.parameters())
    decisions = []
    for index, layer in enumerate(targets):
        base = model.get_submodule(layer.name)
        if not isinstance(getattr(base, "weight", None), torch.Tensor) or base.weight.dim() != 2:
            raise ValueError(f"RSO folds B·P into {layer.name}'s weight, which is not a plain 2-D tensor "
                             f"({type(base).__name__}); RSO runs on full-precision weights (use method='lora' on "
                             "quantized ones)")
        log.replace(layer.name, RsoLinear(base, layer.kind, layer.in_features, layer.out_features, cfg, index))
        decisions.append(ModuleDecision(
            name=layer.name, role=layer.role.value, method="rso",
            in_features=layer.in_features, out_features=layer.out_features,
            trainable_params=layer.out_features * cfg.rank,
            details=RsoDetails(rank=cfg.rank, resample_every=cfg.resample_every, block=layer.block),
            reason=why_adapted(cfg),
        ))
    decisions += frozen_rest(graph, targets, cfg)
    notes: tuple[str, ...] = ()
    if targets:
        notes = (f"RSO: {len(targets)} layers train B (out × {cfg.rank}) in W + B·P; every {cfg.resample_every} "
                 "optimizer steps B·P is folded into W, B and its optimizer state reset and a new P drawn (the "
                 "optimizer from make_optimizer does it); backward keeps P·x, not x",)
    layers = rso_layers(model)
    fixed = ((f"RSO's projections P ({len(layers)} layers, {cfg.rank} × in_features each, in the weights' dtype)",
              sum(m.rso_P.numel() * m.rso_P.element_size() for m in layers)),) if layers else ()
    return PassResult(model, tuple(decisions), notes, fixed=fixed)


def merge_rso(model: nn.Module) -> nn.Module:
    """Fold every ``RsoLinear``'s B·P into its weight and put the plain layer back, in place; returns ``model``."""
    return merge_wrapped(model, RsoLinear)

