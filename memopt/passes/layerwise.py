"""Layerwise sampling: LISA (Pan et al., 2024) and OwLore (Li et al., 2024).

Every ``switch_every`` optimizer steps, ``active_layers`` (γ) of the model's L blocks are drawn and
train in full; the other blocks are frozen. The embeddings and the LM head train throughout unless
configured off. LISA draws uniformly; OwLore draws block ℓ with probability ∝ its outlier ratio
D_ℓ, the fraction of its Wanda scores |W_ij|·‖X_j‖₂ above M × their mean (X_j: input feature j of
the block's Linear layers on the example batch, M = ``outlier_threshold``), computed here by one
forward pass of the example batch when the model is rewritten (nothing shipped per model).

What the public code gets wrong and this does not:

* **Memory does not grow as blocks rotate.** At a switch the optimizer's state of each block frozen
  again is dropped (freed; a block drawn again later starts from fresh moments, as at its first
  draw), and its gradient is set to None.
* **Blocks activated later are in the optimizer.** ``make_optimizer`` builds it over every
  parameter that may train (each block, the embeddings, the head), whether active now or not; a
  frozen parameter has no gradient, so it takes no step and holds no state.
* **The schedule counts optimizer steps**, not forward or backward calls: gradient accumulation
  switches after ``switch_every`` updates. The count is saved in the optimizer's ``state_dict``
  (``"memopt_layerwise"``), so a resumed run switches when the original would have.

The plan is made for two active sets and keeps the costlier: the γ blocks with the most parameters
(ties broken toward the last blocks, whose gradients are made first in backward, while most saved
activations are still alive) and the first γ blocks (whose saved inputs live longest); with equal
blocks these are the extremes of the sets the sampler draws, not every set. Which blocks are
active is only ``requires_grad``: the model as it is runs the next set with no re-trace. A step
that must be lowered (recompute, offload) is planned for every set at once
(``memopt.pipeline.plan_every_set``): traced with every sampled block trainable, each call's
backward pruned to the blocks active then, so a switch re-plans and re-traces nothing; where that
bound does not hold (blocks of unequal sizes) the lowered step re-plans for each new set (a set
that does not fit is the budget's error then, not a silent overrun).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from memopt.config import LisaConfig, OwloreConfig
from memopt.ir.structure import ModelGraph, Role
from memopt.passes.base import ModuleDecision, ModuleDetails, PassResult, RewriteLog, details_kind

__all__ = ["LayerSampler", "LayerwiseDetails", "apply_layerwise", "attach", "candidates", "merge_layerwise",
           "outlier_ratios", "sampler_of"]

ATTR = "_memopt_layer_sampler"
STATE_KEY = "memopt_layerwise"


@details_kind
@dataclass(frozen=True, kw_only=True, eq=False)
class LayerwiseDetails(ModuleDetails):
    """A Linear-like layer of a sampled block: its block's ``probability`` of being drawn."""

    kind: ClassVar[str] = "layerwise"

    probability: float


class LayerSampler:
    """Which blocks train now, and the schedule that switches them (module docstring)."""

    def __init__(self, blocks: list[tuple[str, list[nn.Parameter]]], always: list[nn.Parameter],
                 probabilities: torch.Tensor, cfg: LisaConfig) -> None:
        self.names = [name for name, _ in blocks]
        self.blocks = [params for _, params in blocks]
        self.always = always
        self.probabilities = probabilities
        self.active_layers, self.switch_every, self.seed = cfg.active_layers, cfg.switch_every, cfg.seed
        self.step = 0  # optimizer steps taken
        self.active: tuple[int, ...] = ()
        self.worst_case: tuple[int, ...] = ()  # the set planned for: its gradients are made first in backward
        self.on_switch: Callable[[], None] | None = None  # run after each switch (bind's)

    def draw(self, switch: int) -> tuple[int, ...]:
        """The blocks of switch number ``switch`` (γ distinct, by ``probabilities``), the same every time."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + switch)
        picked = torch.multinomial(self.probabilities, self.active_layers, replacement=False, generator=generator)
        return tuple(sorted(int(i) for i in picked))

    def activate(self, indices: tuple[int, ...], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Blocks ``indices`` train from now on; the others are frozen, their gradients and (in
        ``optimizer``) their state dropped."""
        chosen = set(indices)
        for i, params in enumerate(self.blocks):
            for p in params:
                p.requires_grad_(i in chosen)
                if i not in chosen:
                    p.grad = None
                    if optimizer is not None:
                        optimizer.state.pop(p, None)
        self.active = tuple(sorted(chosen))
        if self.on_switch is not None:
            self.on_switch()

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter that may train (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for p in (*self.always, *(p for params in self.blocks for p in params)):
            seen.setdefault(id(p), p)
        return list(seen.values())

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step += 1
        if self.step % self.switch_every == 0:
            self.activate(self.draw(self.step // self.switch_every), optimizer)

    def bind(self, optimizer: torch.optim.Optimizer, on_switch: Callable[[], None] | None = None) -> None:
        """Switch after ``optimizer``'s steps (from now on, this optimizer only; ``on_switch`` runs after
        each switch), and keep the step count in its ``state_dict``; the current switch's blocks are
        activated now."""
        self.on_switch = on_switch
        self.activate(self.draw(self.step // self.switch_every), optimizer)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(opt))

        def save(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
            return {**state, STATE_KEY: {"step": self.step, "probabilities": self.probabilities.tolist()}}

        def load(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
            state = dict(state)
            saved = state.pop(STATE_KEY, None)
            if saved is not None:  # the schedule as it was: the step, and the draw's probabilities
                if len(saved["probabilities"]) != len(self.blocks):
                    raise ValueError(f"this optimizer state was saved for {len(saved['probabilities'])} sampled "
                                     f"blocks; this model has {len(self.blocks)}")
                self.step = int(saved["step"])
                self.probabilities = torch.tensor(saved["probabilities"])
                self.activate(self.draw(self.step // self.switch_every), opt)
            return state

        optimizer.register_state_dict_post_hook(save)
        optimizer.register_load_state_dict_pre_hook(load)


def sampler_of(model: nn.Module) -> LayerSampler | None:
    return getattr(model, ATTR, None)


def candidates(model: nn.Module) -> list[nn.Parameter] | None:
    """Every parameter that may train under layerwise sampling (None: the model does not sample)."""
    sampler = sampler_of(model)
    return None if sampler is None else sampler.parameters()


def attach(optimizer: torch.optim.Optimizer, model: nn.Module,
           on_switch: Callable[[], None] | None = None) -> torch.optim.Optimizer:
    """Let ``optimizer``'s steps drive ``model``'s sampler (if it has one; see ``LayerSampler.bind``)."""
    sampler = sampler_of(model)
    if sampler is not None:
        sampler.bind(optimizer, on_switch)
    return optimizer


def _blocks(graph: ModelGraph) -> dict[int, tuple[str, list[str]]]:
    """Block number -> (the block's module name, its Linear-like layers' names), in block order."""
    from memopt.passes.freeze import block_name

    layers: dict[int, list[str]] = {}
    for layer in graph.linears:
        if layer.block is not None and layer.role is not Role.LM_HEAD:
            layers.setdefault(layer.block, []).append(layer.name)
    return {b: (block_name(names), names) for b, names in sorted(layers.items())}


def outlier_ratios(model: nn.Module, graph: ModelGraph, threshold: float) -> list[float] | None:
    """Each block's fraction of Wanda scores |W_ij|·‖X_j‖₂ above ``threshold`` × the block's mean,
    from one forward of the example batch (None: the weights are on meta, a dry run)."""
    blocks = _blocks(graph)
    if graph.inputs is None or any(p.device.type == "meta" for p in model.parameters()):
        return None
    kinds = {layer.name: layer.kind for layer in graph.linears}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            squares = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = squares if name not in sums else sums[name] + squares
        return record

    names = [n for _, layer_names in blocks.values() for n in layer_names]
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        args, kwargs = graph.inputs
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    ratios = []
    for _, layer_names in blocks.values():
        scores = []
        for n in layer_names:
            weight = model.get_submodule(n).weight.detach().float().abs()
            norm = sums[n].sqrt()
            scores.append((weight * (norm[:, None] if kinds[n] == "conv1d" else norm[None, :])).flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > threshold * flat.mean()).float().mean()))
    return ratios


def draw_probabilities(ratios: list[float] | None, blocks: int, active: int) -> torch.Tensor:
    """Each block's probability of being drawn: ∝ its outlier ratio (OwLore), uniform without ratios
    or when all are 0. Blocks with a ratio of 0 get 1 % of the smallest positive one, so a draw of
    ``active`` distinct blocks fills from them at random when fewer have outliers (a draw without
    replacement would otherwise take the same zero-weight blocks every time)."""
    if ratios is None or sum(ratios) == 0:
        return torch.full((blocks,), 1.0 / blocks)
    weights = torch.tensor(ratios, dtype=torch.float64)
    if int((weights > 0).sum()) < blocks:
        weights = torch.where(weights > 0, weights, weights[weights > 0].min() / 100)
    return (weights / weights.sum()).float()


def apply_layerwise(model: nn.Module, graph: ModelGraph, cfg: LisaConfig, log: RewriteLog) -> PassResult:
    """Freeze the model but the embeddings and head (as configured) and the worst-case active set,
    and attach the sampler that switches blocks (module docstring)."""
    label = "OwLore" if isinstance(cfg, OwloreConfig) else "LISA"
    blocks = _blocks(graph)
    if not blocks:
        raise ValueError(f"{label} samples the model's blocks, and none was found in {type(model).__name__} (no "
                         "Linear-like layers numbered by block); use method='full' or 'lora'")
    if cfg.active_layers > len(blocks):
        raise ValueError(f"active_layers={cfg.active_layers} is above the {len(blocks)} blocks of "
                         f"{type(model).__name__}; pass 1 <= active_layers <= {len(blocks)}")
    log.freeze(model.parameters())
    params = [(name, list(model.get_submodule(name).parameters())) for name, _ in blocks.values()]
    always: list[nn.Parameter] = []
    if cfg.train_embeddings:
        embeddings = _input_embeddings(model)
        always += [p for m in embeddings for p in m.parameters()]
    heads = [layer.name for layer in graph.linears if layer.role is Role.LM_HEAD]
    if cfg.train_head:
        always += [p for name in heads for p in model.get_submodule(name).parameters()]
    ratios = outlier_ratios(model, graph, cfg.outlier_threshold) if isinstance(cfg, OwloreConfig) else None
    probabilities = draw_probabilities(ratios, len(blocks), cfg.active_layers)
    size = [sum(p.numel() for p in ps) for _, ps in params]
    planned = tuple(sorted(sorted(range(len(params)), key=lambda i: (size[i], i))[-cfg.active_layers:]))
    sampler = LayerSampler(params, always, probabilities, cfg)
    for p in always:
        p.requires_grad_(True)
    sampler.worst_case = planned
    sampler.activate(planned)
    setattr(model, ATTR, sampler)
    log.on_undo(lambda: model.__dict__.pop(ATTR, None))

    number = {b: i for i, b in enumerate(blocks)}
    decisions = []
    for layer in graph.linears:
        module = model.get_submodule(layer.name)
        if layer.block in number and layer.role is not Role.LM_HEAD:
            decisions.append(ModuleDecision(
                name=layer.name, role=layer.role.value, method=cfg.method, in_features=layer.in_features,
                out_features=layer.out_features, trainable_params=sum(p.numel() for p in module.parameters()),
                details=LayerwiseDetails(block=layer.block, probability=round(float(probabilities[number[layer.block]]),
                                                                              6)),
                reason="trains while its block is drawn"))
        else:
            trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
            decisions.append(ModuleDecision(
                name=layer.name, role=layer.role.value, method="full" if trained else "frozen",
                in_features=layer.in_features, out_features=layer.out_features, trainable_params=trained,
                details=ModuleDetails(block=layer.block),
                reason="trains throughout (train_head)" if trained else "outside the sampled blocks"))
    if not isinstance(cfg, OwloreConfig):
        how = "uniformly"
    elif ratios is None:
        how = "uniformly for now: the outlier ratios need real weights (a dry run on meta); the plan does not depend on them"
    elif sum(ratios) == 0:
        how = f"uniformly: no block has a Wanda score above M = {cfg.outlier_threshold:g} × its mean"
    else:
        how = f"by outlier ratio (M = {cfg.outlier_threshold:g}): " + ", ".join(f"{r:.3g}" for r in ratios) + \
            (" (blocks without outliers are drawn at 1 % of the smallest ratio)" if 0 in ratios else "")
    tied = cfg.train_head and not cfg.train_embeddings and any(p.requires_grad for m in _input_embeddings(model)
                                                               for p in m.parameters())
    embeddings = "train" if cfg.train_embeddings else "train with it (tied to it)" if tied else "frozen"
    notes = (f"{label}: {cfg.active_layers} of {len(blocks)} blocks train at a time, drawn {how}, switched every "
             f"{cfg.switch_every} optimizer steps by the optimizer from make_optimizer (it holds every block; the "
             f"state of a block frozen again is freed); LM head {'trains' if cfg.train_head else 'frozen'}, "
             f"embeddings {embeddings}; "
             "the per-layer table counts each sampled layer's parameters as when its block is drawn",)
    first = tuple(range(cfg.active_layers))

    def named(indices: tuple[int, ...]) -> str:
        return ", ".join(params[i][0] for i in indices)

    variants = () if first == planned else (
        (f"{named(planned)} active", lambda: sampler.activate(planned)),
        (f"{named(first)} active", lambda: sampler.activate(first)))
    return PassResult(model, tuple(decisions), notes, variants)


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return [found]
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def merge_layerwise(model: nn.Module) -> nn.Module:
    """Nothing to fold (the weights themselves trained); the sampler is taken off."""
    model.__dict__.pop(ATTR, None)
    return model
