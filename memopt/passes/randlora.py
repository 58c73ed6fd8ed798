"""RandLoRA (Albert et al., 2025): a full-rank update from random frozen bases and trainable scalings.

For a layer W (out × in) with d = min(in, out), D = max(in, out) and N = ⌈d / r⌉ bases:

    ΔW = scaling · Σⱼ Bⱼ · Λⱼ · A · Γⱼ        (PEFT's ``RandLoraConfig`` numerics)

with A (r × d) and Bⱼ (D × r) random and frozen, **shared by every adapted layer** (drawn once for
the largest d and D among them, each layer slicing what it needs), and the trainable Λ (r × N,
zero at init: the model starts as it was) and Γ (N × d, 1 / max(N, d) at init), scaling =
alpha / r. A acts on the smaller side: for in ≤ out, y = x·Wᵀ + scaling · (x·Âᵀ)·B̂ᵀ with the
scaled basis Â = (Λ ⊙ A ⊙ Γ) flattened to (r·N × d) and B̂ the bases flattened to (D × N·r), as
PEFT orders them; for in > out the roles swap.

The bases are drawn from ``seed`` exactly as PEFT draws them for ``projection_prng_key`` (Kaiming
uniform in bf16 from a CPU generator, A first, then each Bⱼ, each divided by its standard
deviation), so the same seed gives PEFT's bases and a checkpoint need not hold them: they are
non-persistent buffers, drawn again when the model is rebuilt. They are held in the scalings' fp32,
as PEFT holds them (its adapters' dtype): each layer's slices are then views, and nothing per layer
is converted and kept for backward (measured: bf16 bases converted per step peaked 16 % higher).

Memory: the scaled basis Â (r·N × d ≈ d × d per layer) is what PEFT keeps for backward (its
measured peak is above LoRA's); here it is an activation like any other: the planner may
recompute it from A, Λ and Γ (a few elementwise ops) instead of keeping it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from memopt.config import RandLoraConfig
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
from memopt.passes.quantize import QuantLinear

__all__ = ["RandLoraDetails", "RandLoraLinear", "apply_randlora", "draw_bases", "merge_randlora", "num_bases"]


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class RandLoraDetails(ModuleDetails):
    """A RandLoRA layer: ``bases`` random bases of ``rank`` (shared), trainable Λ and Γ, ``alpha``."""

    kind: ClassVar[str] = "randlora"

    rank: int
    bases: int
    alpha: float
    dropout: float


def num_bases(in_features: int, out_features: int, rank: int) -> int:
    """N = ⌈min(in, out) / rank⌉: enough bases for a full-rank update."""
    return -(-min(in_features, out_features) // rank)


def draw_bases(rank: int, min_dim: int, max_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, 1, d], B [D, N, r]) as PEFT draws them for ``projection_prng_key=seed`` (in bf16), in fp32."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)

    a = kaiming((rank, 1, min_dim))
    b = torch.cat([kaiming((max_dim, 1, rank)) for _ in range(num_bases(min_dim, min_dim, rank))], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()  # PEFT's values, held as its fp32 adapters hold them


class _ScaledBasis(torch.autograd.Function):
    """Â = Λ[:, :, None] ⊙ A ⊙ Γ[None] ([r, N, d]); its gradient reaches Λ and Γ only (A is frozen)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, lam, gamma)
        return lam[:, :, None] * a * gamma[None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        a, lam, gamma = ctx.saved_tensors
        a = a.to(grad.dtype)
        grad_lam = torch.einsum("kbj,kvj,bj->kb", grad, a, gamma.to(grad.dtype))
        grad_gamma = torch.einsum("kbj,kvj,kb->bj", grad, a, lam.to(grad.dtype))
        return None, grad_lam, grad_gamma


class RandLoraLinear(WrappedLinear):
    """A frozen Linear-like ``base_layer`` plus RandLoRA's update (module docstring). ``randlora_A`` /
    ``randlora_B`` are the shared bases (non-persistent buffers, the same tensors in every layer)."""

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int, cfg: RandLoraConfig,
                 bases: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self._wrap(base_layer)
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scaling = cfg.rank, cfg.alpha / cfg.rank
        self.num_bases = num_bases(in_features, out_features, cfg.rank)
        small, large = min(in_features, out_features), max(in_features, out_features)
        dtype = torch.float32
        device = base_layer.qweight.device if isinstance(base_layer, QuantLinear) else base_layer.weight.device
        self.register_buffer("randlora_A", bases[0], persistent=False)
        self.register_buffer("randlora_B", bases[1], persistent=False)
        self.randlora_lambda = nn.Parameter(torch.zeros(cfg.rank, self.num_bases, dtype=dtype, device=device))
        self.randlora_gamma = nn.Parameter(torch.full((self.num_bases, small), 1.0 / max(self.num_bases, small),
                                                      dtype=dtype, device=device))
        self._small, self._large = small, large
        self.randlora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.enabled = True

    def scaled_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first factor, the second) of PEFT's ``get_scaled_bases``: x → x·firstᵀ → ·secondᵀ."""
        a = self.randlora_A[:, : self.num_bases, : self._small]
        b = self.randlora_B[: self._large, : self.num_bases, :]
        lam, gamma = self.randlora_lambda, self.randlora_gamma
        a, b = a.to(lam.dtype), b.to(lam.dtype)  # no copy: the bases are held in the scalings' dtype
        update_b = b.flatten(start_dim=1)  # [D, N·r]
        update_a = _ScaledBasis.apply(a, lam, gamma).flatten(end_dim=1)  # [r·N, d]
        return (update_a, update_b) if self._small == self.in_features else (update_b.t(), update_a.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        first, second = self.scaled_bases()
        h = torch.nn.functional.linear(self.randlora_dropout(x.to(first.dtype)), first)
        return (result + torch.nn.functional.linear(h, second) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · ΔW in the base weight's layout ([out, in], or [in, out] for Conv1D)."""
        first, second = self.scaled_bases()
        delta = (second @ first) * self.scaling  # [out, in]
        return delta.t() if self.kind == "conv1d" else delta

    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (changes it in place)."""
        if isinstance(self.base_layer, QuantLinear):
            raise ValueError("cannot merge RandLoRA into a quantized base layer; call "
                             "memopt.passes.quantize.dequantize_model(model) first, then merge")
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, rank={self.rank}, bases={self.num_bases}, scaling={self.scaling:g}, "
                f"enabled={self.enabled}")


def apply_randlora(model: nn.Module, graph: ModelGraph, cfg: RandLoraConfig, log: RewriteLog) -> PassResult:
    """Freeze every parameter and wrap each targeted Linear-like layer in a ``RandLoraLinear``, all
    sharing one pair of bases drawn for the largest shapes among them.

    Ensures: only ``randlora_lambda`` / ``randlora_gamma`` require grad; outputs are unchanged at init (Λ = 0)."""
    targets = select_targets(graph, model, cfg.target_modules, cfg.exclude_modules)
    log.freeze(model.parameters())
    largest_out = max((t.out_features for t in targets), default=0)
    largest_in = max((t.in_features for t in targets), default=0)
    small, large = min(largest_out, largest_in), max(largest_out, largest_in)
    too_small = [t.name for t in targets if cfg.rank > min(t.in_features, t.out_features)]
    if too_small:
        raise ValueError(f"rank={cfg.rank} is above the smaller side of {too_small[0]} "
                         f"({len(too_small)} layers): RandLoRA's rank is at most each layer's min(in, out); lower rank= or "
                         "exclude them (exclude_modules=...)")
    a, b = draw_bases(cfg.rank, small, large, cfg.seed) if targets else (torch.empty(0), torch.empty(0))
    decisions = []
    for layer in targets:
        base = model.get_submodule(layer.name)
        device = base.qweight.device if isinstance(base, QuantLinear) else base.weight.device
        if device.type == "meta":
            a, b = a.to("meta"), b.to("meta")
        elif a.device != device:
            a, b = a.to(device), b.to(device)
        wrapped = RandLoraLinear(base, layer.kind, layer.in_features, layer.out_features, cfg, (a, b))
        log.replace(layer.name, wrapped)
        n = wrapped.num_bases
        decisions.append(ModuleDecision(
            name=layer.name, role=layer.role.value, method="randlora",
            in_features=layer.in_features, out_features=layer.out_features,
            trainable_params=cfg.rank * n + n * min(layer.in_features, layer.out_features),
            details=RandLoraDetails(rank=cfg.rank, bases=n, alpha=cfg.alpha, dropout=cfg.dropout, block=layer.block),
            reason=why_adapted(cfg),
        ))
    decisions += frozen_rest(graph, targets, cfg)
    notes = ()
    if targets:
        notes = (f"RandLoRA bases: A [{cfg.rank}, 1, {small}] and B [{large}, {num_bases(small, small, cfg.rank)}, "
                 f"{cfg.rank}] in fp32, shared by {len(targets)} layers, drawn from seed {cfg.seed} as PEFT draws "
                 "them (not saved: drawn again on reload)",)
    fixed = ((f"RandLoRA's shared bases (A [{cfg.rank}, 1, {small}] and B [{large}, "
              f"{num_bases(small, small, cfg.rank)}, {cfg.rank}], fp32, sized for the largest adapted layer)",
              (a.numel() + b.numel()) * 4),) if targets else ()
    return PassResult(model, tuple(decisions), notes, fixed=fixed)


def merge_randlora(model: nn.Module) -> nn.Module:
    """Fold every ``RandLoraLinear`` in ``model`` back into a plain layer, in place; returns ``model``."""
    return merge_wrapped(model, RandLoraLinear)
