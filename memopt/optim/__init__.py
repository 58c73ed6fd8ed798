"""The optimizers a plan counts: one registry of names, each a factory the simulation and the joint
trace build on fake tensors (their states and step temporaries are measured, not modelled) and the
returned model builds for real.

    >>> from memopt.optim import OptimizerConfig, factory
    >>> OptimizerConfig("adamw", {"betas": (0.9, 0.95)}).name
    'adamw'

A new optimizer is one entry in ``OPTIMIZERS``: its name, the factory, and the options it takes
(checked before the model is captured).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from memopt.memory import OptimizerFactory, torch_optimizer
from memopt.optim import lowrank
from memopt.optim.lowrank import AdamW8bit, Apollo, ApolloMini, GaLoreAdamW, GaLoreAdamW8bit

__all__ = ["MEMORY_NEUTRAL", "OPTIMIZERS", "AdamW8bit", "Apollo", "ApolloMini", "GaLoreAdamW", "GaLoreAdamW8bit",
           "OptimizerConfig", "OptimizerSpec", "build", "factory", "optimizer_names", "plan_notes"]


def _no_optimizer(params: list[torch.Tensor], device: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"optimizer='none' takes no options, got {sorted(kwargs)}; drop them")
    return None


_no_optimizer.__name__ = "none"


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: the factory the simulation builds it with, the options it accepts,
    what it is for, and the class (with defaults) ``build`` makes for real training."""

    factory: OptimizerFactory
    options: frozenset[str]
    doc: str
    cls: type[torch.optim.Optimizer] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    per_parameter: type[torch.optim.Optimizer] | None = None  # its update(p, grad), run inside backward

    def in_backward(self, options: Mapping[str, Any] | None = None) -> OptimizerFactory | None:
        """The factory of the per-parameter form the simulation counts for updates inside backward
        (None: this optimizer cannot update a parameter on its own, or not with these ``options``,
        e.g. ``amsgrad`` for AdamW)."""
        if self.per_parameter is None or set(options or {}) - _options_of(self.per_parameter):
            return None
        return _lean(self.factory.__name__, self.per_parameter, self.doc).factory

    @classmethod
    def of_class(cls, name: str, optimizer: type[torch.optim.Optimizer], doc: str, **defaults: Any) -> "OptimizerSpec":
        """A torch-style optimizer class: its constructor's keyword arguments are its options."""
        return cls(torch_optimizer(optimizer, name, **defaults), _options_of(optimizer), doc, optimizer, defaults)


def _options_of(optimizer: type[torch.optim.Optimizer]) -> frozenset[str]:
    return frozenset(p for p in inspect.signature(optimizer.__init__).parameters if p not in ("self", "params"))


def _lean(name: str, cls: type[torch.optim.Optimizer], doc: str) -> OptimizerSpec:
    """One of memopt's optimizers (``memopt.optim.lowrank``). The simulation builds it with
    ``update_proj_gap=1``, so the step it measures refreshes every projection: its peak holds the
    largest refresh transient (the fp32 gradient copy and its SVD factors, one parameter at a time)."""
    names = _options_of(cls)

    def make(params: list[torch.Tensor], device: str, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
        refresh = {"update_proj_gap": 1} if "update_proj_gap" in names else {}
        return cls(params, **{**kwargs, **refresh})

    make.__name__ = name
    return OptimizerSpec(make, names, doc, cls, per_parameter=cls)


OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType({
    "adamw": dataclasses.replace(OptimizerSpec.of_class("adamw", torch.optim.AdamW, "torch AdamW: two moments per "
                                                        "parameter"), per_parameter=lowrank.AdamW),
    "adam": OptimizerSpec.of_class("adam", torch.optim.Adam, "torch Adam"),
    "sgd": OptimizerSpec.of_class("sgd", torch.optim.SGD, "torch SGD, no state", lr=1e-3),
    "sgd-momentum": OptimizerSpec.of_class("sgd-momentum", torch.optim.SGD, "torch SGD with one momentum buffer",
                                           lr=1e-3, momentum=0.9),
    "adamw8bit": _lean("adamw8bit", AdamW8bit, "AdamW, moments blockwise 8-bit: 2 bytes per parameter"),
    "galore-adamw": _lean("galore-adamw", GaLoreAdamW, "GaLore: Adam on the gradient's top-rank projection"),
    "galore-adamw8bit": _lean("galore-adamw8bit", GaLoreAdamW8bit, "GaLore with 8-bit low-rank moments"),
    "apollo": _lean("apollo", Apollo, "APOLLO: channel-wise scaling from a random rank-r projection"),
    "apollo-mini": _lean("apollo-mini", ApolloMini, "APOLLO-Mini: rank 1, one scaling factor per tensor"),
    "none": OptimizerSpec(_no_optimizer, frozenset(), "no optimizer step (gradients only)"),
})


def optimizer_names() -> list[str]:
    return sorted(OPTIMIZERS)


# Options that change an optimizer's arithmetic but not its memory: free to differ from the plan's.
# update_proj_gap: the simulation measures every projection refreshing in the step it counts (_lean).
MEMORY_NEUTRAL = frozenset({"lr", "betas", "eps", "weight_decay", "scale", "norm_growth_limit", "seed", "maximize",
                            "nesterov", "dampening", "update_proj_gap"})


def build(name: str, params: Any, planned: Mapping[str, Any] | None = None, *, per_parameter: bool = False,
          **options: Any) -> torch.optim.Optimizer:
    """The registered optimizer ``name`` over ``params`` for real training, with the ``planned``
    options (those the plan counted) and ``options`` on top. An option that changes the optimizer's
    memory (``rank``, ``foreach``, ``momentum``, ...) may not differ from the planned one: the plan's
    peak would no longer hold (plan again with other ``optimizer_options`` instead).
    ``per_parameter``: its form that updates one parameter at a time (``update_in_backward``)."""
    planned = dict(planned or {})
    config = OptimizerConfig(name, {**planned, **options})  # names and options checked
    spec = OPTIMIZERS[config.name]
    changed = sorted(k for k, v in options.items() if k not in MEMORY_NEUTRAL and planned.get(k, _UNSET) != v)
    if changed:
        raise ValueError(f"{', '.join(f'{k}={options[k]!r}' for k in changed)} changes the memory of the optimizer the "
                         f"plan counted ({name} with {planned or 'its defaults'}); plan again with "
                         f"optimizer_options={{...}} instead")
    if spec.cls is None:
        raise ValueError(f"the plan counts no optimizer ({name!r}): there is none to build")
    if per_parameter:
        if spec.per_parameter is None:
            raise ValueError(f"{name} cannot update one parameter at a time (inside backward)")
        extra = sorted(set(config.options) - _options_of(spec.per_parameter))
        if extra:
            raise ValueError(f"updates inside backward run {name} parameter by parameter "
                             f"({spec.per_parameter.__module__}.{spec.per_parameter.__name__}), which takes "
                             f"{', '.join(sorted(_options_of(spec.per_parameter)))}; drop {', '.join(extra)}")
        return spec.per_parameter(params, **config.options)
    return spec.cls(params, **{**spec.defaults, **config.options})


_UNSET = object()


def plan_notes(name: str, options: Mapping[str, Any], trainable: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """What the plan should say about the optimizer on these trainable parameters (by name): which
    get AdamW's update because a projection does not fit them."""
    spec = OPTIMIZERS[name]
    parameters = inspect.signature(spec.cls.__init__).parameters if spec.cls is not None else {}
    if "rank" not in parameters or not hasattr(spec.cls, "not_projected"):
        return ()
    rank = options.get("rank", parameters["rank"].default)
    why = {n: spec.cls.not_projected(tuple(p.shape), rank) for n, p in trainable.items()}
    fallback = {n: w for n, w in why.items() if w}
    if not fallback:
        return ()
    matrices = [n for n, w in fallback.items() if "rank" in w]
    note = (f"{name} (rank {rank}) projects {len(why) - len(fallback)} of {len(why)} trainable parameters; "
            f"the other {len(fallback)} get AdamW's update ({len(fallback) - len(matrices)} not matrices")
    if matrices:
        note += f"; {len(matrices)} with a side not above the rank, e.g. {matrices[0]}"
    return (note + ")",)


@dataclass(frozen=True)
class OptimizerConfig:
    """A registered optimizer by name, with options its constructor takes (checked here)."""

    name: str = "adamw"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {optimizer_names()}")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"optimizer options must be a dict, got {type(self.options).__name__}")
        unknown = sorted(set(self.options) - OPTIMIZERS[self.name].options)
        if unknown:
            valid = sorted(OPTIMIZERS[self.name].options)
            raise TypeError(f"unknown option(s) {unknown} for optimizer {self.name!r}; valid options: "
                            f"{valid if valid else 'none'}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        spec = OPTIMIZERS[self.name]
        if spec.cls is not None:  # the values, checked by the optimizer itself on a stand-in parameter
            spec.cls([torch.zeros(1, requires_grad=True)], **{**spec.defaults, **self.options})

    def factory(self) -> OptimizerFactory:
        """The factory with this config's options, for the simulation and the joint trace."""
        return factory(self.name, **self.options)


def factory(name: str, **options: Any) -> OptimizerFactory:
    """The registered optimizer ``name`` as the simulation builds it, with ``options`` bound:
    ``simulate_step(model, batch, optimizer=factory("sgd-momentum"))``."""
    spec = OPTIMIZERS[OptimizerConfig(name, options).name]
    if not options:
        return spec.factory

    def make(params: list[torch.Tensor], device: str, kwargs: Mapping[str, Any]) -> Any:
        return spec.factory(params, device, {**options, **kwargs})

    make.__name__ = name
    return make

