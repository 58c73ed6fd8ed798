"""S²FT: structured sparse fine-tuning — train dense blocks of a few heads and FFN channels.

Design note (DESIGN.md §4, REFERENCES.md "S²FT").

1. *Select.* Units are pooled over all blocks and ``round(ratio · pool)`` of them (at least one)
   are sampled without replacement by a generator seeded with ``seed`` — one draw for heads at
   ``head_ratio``, an independent one for FFN channels at ``channel_ratio``. Per-block counts
   vary; a block that draws nothing is left exactly as it was and trains nothing. A head unit is a
   kv group under GQA (see ``s2ft_layout``), so ``head_ratio`` is the fraction of v rows and of o
   columns that train. memopt draws **one** head set used by both v and o (and one channel set for
   up and down): the config has one ratio per kind, so the paper's order (only-v, v∩o, only-o,
   rest) degenerates to (selected, rest), and every trained block starts at its segment's start.
2. *Co-permute.* In each block with a selection, the selected units move first (ascending), the
   rest follow (ascending). Every member weight of the group is permuted in place along its axis
   (q/k/v/gate/up rows with their biases, o/down columns), so the function is unchanged.
3. *Train.* Each member whose target is in ``targets`` gets a dense ``nn.Parameter`` block: rows
   of v/up (output rows), columns of o/down (input columns); ``S2ftLinear`` computes it with
   partial backprop (``s2ft_ops``). gate, q and k never train. Every other parameter is frozen.
   Biases stay frozen (permuted with their rows).
4. *Merge* writes each block back, undoes every permutation and returns plain layers: the
   state-dict keys are the original model's again.

Permutations (``s2ft_perm``) and selections (``s2ft_selected``) are persistent buffers of each
``S2ftLinear``, so a saved S²FT state dict loads into a model rewritten with the same config.
The weights are permuted *in place* (a second copy of a large model is not affordable); every
permutation is registered with the ``RewriteLog``, so ``undo`` — after a failure in this pass or in
any later stage of ``optimize`` — puts the weights back in their original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from memopt.config import S2ftConfig
from memopt.ir.structure import LinearLayer, ModelGraph, Role
from memopt.passes.base import ModuleDecision, ModuleDetails, PassResult, RewriteLog, details_kind, merge_wrapped
from memopt.passes.s2ft_layout import Group, Member, build_groups
from memopt.passes.s2ft_ops import S2ftLinear, permute_weight_

__all__ = ["S2ftDetails", "S2ftLinear", "apply_s2ft", "merge_s2ft"]

_RATIO = {"heads": "head_ratio", "channels": "channel_ratio"}


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class S2ftDetails(ModuleDetails):
    """A layer of an S²FT group: ``selected`` of the block's ``of`` units (heads or channels) drawn
    (``ratio``, ``seed``) and permuted to the front; a trained member's ``target``, ``axis`` and the
    ``slice`` [start, end) of rows or columns that train."""

    kind: ClassVar[str] = "s2ft"

    unit: str
    ratio: float
    selected: int
    of: int
    seed: int
    permuted: bool
    target: str | None = None
    axis: str | None = None
    slice: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Draw:
    """The units a group drew (original indices, ascending) out of a pool of ``pool`` units."""

    chosen: torch.Tensor
    pool: int
    eligible: bool


def apply_s2ft(model: nn.Module, graph: ModelGraph, cfg: S2ftConfig, log: RewriteLog) -> PassResult:
    """Select heads and channels, co-permute their weights and train their dense blocks.

    Requires: ``graph`` was captured from ``model`` (structure analysis found its attention
    blocks and/or MLPs); ``cfg`` is validated.
    Ensures: only ``s2ft_block`` parameters require grad; outputs equal the original model's up to
    fp32 rounding of reordered sums; one ModuleDecision per Linear-like layer of ``graph``.
    """
    groups = build_groups(graph)
    _check_something_trains(model, graph, groups, cfg)
    log.freeze(model.parameters())
    draws = _draw(groups, cfg)
    for group, draw in zip(groups, draws):
        _rewrite(model, group, draw, cfg, log)
    decisions = _decisions(graph, groups, draws, cfg)
    trained = sum(d.trainable_params for d in decisions)
    notes = (f"s2ft: {trained} trainable parameters in {sum(d.method == 's2ft' for d in decisions)} dense blocks; "
             "weights of the selected blocks were permuted in place (merge() undoes it)",)
    return PassResult(model, decisions, notes)


def merge_s2ft(model: nn.Module) -> nn.Module:
    """Write every trained block back, undo every permutation, return plain layers (in place)."""
    return merge_wrapped(model, S2ftLinear)


# ----------------------------------------------------------------------------- checks, sampling


def _check_something_trains(model: nn.Module, graph: ModelGraph, groups: list[Group], cfg: S2ftConfig) -> None:
    name = type(model).__name__
    if not graph.attention and not graph.mlps:
        raise ValueError(
            f"S²FT needs attention heads (for v/o) or FFN channels (for up/down), but {name} has neither: "
            "structure analysis found no attention core and no MLP (up → activation → down). "
            "Use method='lora' for this model."
        )
    if not any(not g.reason and g.trainable(cfg.targets) for g in groups):
        why = "; ".join(sorted({g.reason or _blocked(g, cfg) for g in groups} - {""})) or "no such layer"
        raise ValueError(
            f"S²FT with targets={cfg.targets} trains nothing in {name}: {why}. "
            "Choose targets among the ones this model has (e.g. ('o', 'down'))."
        )


def _blocked(group: Group, cfg: S2ftConfig) -> str:
    reasons = [m.blocked for m in group.members if m.target in cfg.targets and m.blocked]
    return reasons[0] if reasons else ""


def _draw(groups: list[Group], cfg: S2ftConfig) -> list[_Draw]:
    """Pooled sampling: per kind, round(ratio · pool) units (at least one) over all eligible groups."""
    draws = [_Draw(torch.empty(0, dtype=torch.long), 0, False)] * len(groups)
    for kind, attr in _RATIO.items():
        eligible = [i for i, g in enumerate(groups) if g.kind == kind and not g.reason and g.trainable(cfg.targets)]
        pool = [(i, u) for i in eligible for u in range(groups[i].units)]
        if not pool:
            continue
        count = max(1, int(getattr(cfg, attr) * len(pool) + 0.5))  # round half up
        generator = torch.Generator().manual_seed(cfg.seed)  # one stream per kind: heads never shift channels
        picks = torch.randperm(len(pool), generator=generator)[:count].tolist()
        for i in eligible:
            chosen = sorted(u for g, u in (pool[p] for p in picks) if g == i)
            draws[i] = _Draw(torch.tensor(chosen, dtype=torch.long), len(pool), True)
    return draws


def _order(units: int, chosen: torch.Tensor) -> torch.Tensor:
    """Selected units first, then the rest, each ascending."""
    rest = torch.ones(units, dtype=torch.bool)
    rest[chosen] = False
    return torch.cat([chosen, torch.arange(units)[rest]])


# ----------------------------------------------------------------------------- rewriting


def _rewrite(model: nn.Module, group: Group, draw: _Draw, cfg: S2ftConfig, log: RewriteLog) -> None:
    """Permute every member of ``group`` (the log can revert it) and wrap it; trainable members get a block."""
    if draw.chosen.numel() == 0:
        return
    order = _order(group.units, draw.chosen)
    trainable = group.trainable(cfg.targets)
    for member in group.members:
        base = model.get_submodule(member.name)
        perm = member.permutation(order)
        permute_weight_(base, member.kind, member.axis, perm)
        log.on_undo(_unpermute(base, member, perm))
        block = member.block(draw.chosen.numel()) if member in trainable else None
        log.replace(member.name, S2ftLinear(base, member.kind, member.axis, perm, draw.chosen, block))


def _unpermute(base: nn.Module, member: Member, perm: torch.Tensor):
    return lambda: permute_weight_(base, member.kind, member.axis, torch.argsort(perm))


# ----------------------------------------------------------------------------- decisions


def _decisions(graph: ModelGraph, groups: list[Group], draws: list[_Draw],
               cfg: S2ftConfig) -> tuple[ModuleDecision, ...]:
    where = {m.name: (g, m, d) for g, d in zip(groups, draws) for m in g.members}
    failed: dict[str, str] = {}
    for g in groups:
        for name in g.layers if g.reason else ():
            failed.setdefault(name, g.reason)
    decisions = []
    for layer in graph.linears:
        if layer.name in where:
            decisions.append(_member_decision(layer, *where[layer.name], cfg))
        else:
            decisions.append(_frozen(layer, failed.get(layer.name) or _why_not_a_group(layer)))
    return tuple(decisions)


def _member_decision(layer: LinearLayer, group: Group, member: Member, draw: _Draw, cfg: S2ftConfig) -> ModuleDecision:
    count = int(draw.chosen.numel())
    details = S2ftDetails(block=layer.block, unit=group.unit, ratio=getattr(cfg, _RATIO[group.kind]), selected=count,
                          of=group.units, seed=cfg.seed, permuted=count > 0)
    # which units: the s2ft_selected buffers (a list per layer would swamp the plan's table)
    if count and member in group.trainable(cfg.targets):
        start, size = member.block(count)
        other = layer.in_features if member.axis == "out" else layer.out_features
        axis = "rows" if member.axis == "out" else "columns"
        details = dataclasses.replace(details, target=member.target, axis=axis, slice=(start, start + size))
        reason = (f"trains {member.target} {axis} [{start}:{start + size}): {count} of this block's {group.units} "
                  f"{group.unit}s, drawn from {draw.pool} pooled over all blocks ({_RATIO[group.kind]}="
                  f"{getattr(cfg, _RATIO[group.kind])}, seed={cfg.seed})")
        return _decision(layer, "s2ft", size * other, details, reason)
    return _decision(layer, "frozen", 0, details, _why_frozen(group, member, draw, cfg))


def _why_frozen(group: Group, member: Member, draw: _Draw, cfg: S2ftConfig) -> str:
    if member.target in cfg.targets and member.blocked:
        return member.blocked
    if not draw.eligible:
        return f"this block offers targets {_targets(group)}, none of them in targets={cfg.targets}; left as it was"
    if draw.chosen.numel() == 0:
        return (f"0 of its {group.units} {group.unit}s were drawn from the pool of {draw.pool} "
                f"({_RATIO[group.kind]}={getattr(cfg, _RATIO[group.kind])}): this block trains nothing")
    if member.target is None:
        what = "gate is never trained" if group.kind == "channels" else "q and k are never trained"
    else:
        what = f"{member.target!r} is not in targets={cfg.targets}"
    return f"{what}; permuted with the selected {group.unit}s so the function is unchanged"


def _targets(group: Group) -> list[str]:
    return sorted({m.target for m in group.members if m.target})


def _why_not_a_group(layer: LinearLayer) -> str:
    if layer.role is Role.LM_HEAD:
        return "the LM head is not an S²FT target"
    return "not part of an attention block or MLP that S²FT can permute (it trains v/o heads and up/down channels)"


def _frozen(layer: LinearLayer, reason: str) -> ModuleDecision:
    return _decision(layer, "frozen", 0, ModuleDetails(block=layer.block), reason)


def _decision(layer: LinearLayer, method: str, trainable: int, details: ModuleDetails, reason: str) -> ModuleDecision:
    return ModuleDecision(name=layer.name, role=layer.role.value, method=method, in_features=layer.in_features,
                          out_features=layer.out_features, trainable_params=trainable, details=details, reason=reason)
