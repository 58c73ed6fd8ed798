"""What every rewrite pass shares: its result type, module targeting, and an undo log.

A pass has the signature ``(module, ModelGraph, method_config, RewriteLog) -> PassResult``. It
rewrites ``module`` in place through the ``RewriteLog`` so that `optimize` can undo every change
when a later stage fails: nothing is ever left half-rewritten.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, TypeVar

import torch
import torch.nn as nn

from memopt.ir.structure import LinearLayer, ModelGraph, Role

__all__ = ["DETAILS", "ModuleDecision", "ModuleDetails", "PassResult", "details_kind",
           "RewriteLog", "WrappedLinear", "as_output", "merge_wrapped", "select_targets"]


@dataclass(frozen=True, eq=False)
class ModuleDetails(Mapping[str, Any]):
    """A pass's details on one module, typed: one subclass per method, registered by ``kind`` with
    :func:`details_kind` (a plan file names the kind, so it reads back as the same type).

    Read as a mapping of the fields that are set (``details["rank"]``, ``details.get("block")``,
    ``dict(details)``), so a report lists them without knowing the method. The fields here are
    every method's: the block the layer sits in and, for a method over a quantized base weight
    (``lora+nf4``), that weight's bytes quantized and dense (and NF4's flat tail block).

    Equal to details of the same type and fields, and to a mapping of the same items (subclasses
    are declared ``eq=False`` so this comparison is theirs too)."""

    kind: ClassVar[str] = "layer"
    __hash__ = None  # type: ignore[assignment]  (a mapping: compared by value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModuleDetails):
            return type(self) is type(other) and all(
                getattr(self, name) == getattr(other, name) for name in _field_names(type(self)))
        if isinstance(other, Mapping):
            return dict(self) == dict(other)
        return NotImplemented

    block: int | None = None
    quantized_bytes: int | None = None
    dense_bytes: int | None = None
    last_block: int | None = None

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key) if key in _field_names(type(self)) else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in _field_names(type(self)) if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}}

    @staticmethod
    def from_dict(data: Mapping[str, Any], method: str | None = None) -> "ModuleDetails":
        """The typed details ``data`` describes: by its ``kind``, else (a plan file before kinds, a pass
        that gives a dict) the one type of ``method`` or of all registered types that has every key."""
        if not isinstance(data, Mapping):
            raise TypeError(f"details must be an object, got {type(data).__name__} {data!r}")
        data = dict(data)
        kind = data.pop("kind", None)
        if kind is not None:
            if kind not in DETAILS:
                raise ValueError(f"unknown details kind {kind!r}; the kinds are {', '.join(sorted(DETAILS))}")
            cls = DETAILS[kind]
        else:
            cls = _details_type(data, method)
        unknown = sorted(set(data) - set(_field_names(cls)))
        if unknown:
            raise ValueError(f"{cls.kind} details have no field(s) {', '.join(map(repr, unknown))}; they hold "
                             f"{', '.join(_field_names(cls))}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except TypeError as exc:  # a required field missing: name the kind
            raise ValueError(f"{cls.kind} details: {str(exc).split('.__init__() ')[-1]}") from None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _TYPES.get(str(f.type))
            if allowed is not None and not (value is None and "None" in str(f.type)) and (
                    not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                raise ValueError(f"{self.kind} details field {f.name!r} must be {f.type}, got {value!r}")


_TYPES: dict[str, tuple[type, ...]] = {  # the field types details use, checked as they are made
    "int": (int,), "int | None": (int,), "float": (int, float), "str": (str,), "str | None": (str,),
    "bool": (bool,), "tuple[int, int] | None": (tuple,)}

_Details = TypeVar("_Details", bound=type[ModuleDetails])
DETAILS: dict[str, type[ModuleDetails]] = {"layer": ModuleDetails}


def details_kind(cls: _Details) -> _Details:
    """Register a ``ModuleDetails`` subclass under its ``kind`` (a class decorator; a pass of one's own
    registers its details beside it, so its plans read back typed)."""
    if "__eq__" in cls.__dict__ and cls.__dict__["__eq__"] is not ModuleDetails.__eq__:
        raise TypeError(f"{cls.__qualname__} compares by its own __eq__: declare it @dataclass(..., eq=False)")
    if DETAILS.get(cls.kind, cls) is not cls:
        raise ValueError(f"details kind {cls.kind!r} is registered already ({DETAILS[cls.kind].__qualname__})")
    DETAILS[cls.kind] = cls
    return cls


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _details_type(data: Mapping[str, Any], method: str | None) -> type[ModuleDetails]:
    base = (method or "").split("+")[0]
    for kind in (base, base.split("-")[0]):
        if kind in DETAILS and set(data) <= set(_field_names(DETAILS[kind])):
            return DETAILS[kind]
    fitting = [cls for cls in DETAILS.values() if set(data) <= set(_field_names(cls))]
    if not fitting:
        raise ValueError(f"no registered details type holds the fields {', '.join(map(repr, sorted(data)))}: a pass "
                         "of one's own gives a ModuleDetails subclass registered with memopt.passes.details_kind")
    return min(fitting, key=lambda cls: len(_field_names(cls)))  # the narrowest: a frozen layer's block is a layer's


@dataclass(frozen=True)
class ModuleDecision:
    """What a pass did to one module, and why; recorded in the Plan. ``details`` are typed per method
    (a plain mapping given here is read into its type, see ``ModuleDetails.from_dict``)."""

    name: str
    role: str
    method: str  # "lora", "frozen", "lora+nf4", ...
    in_features: int
    out_features: int
    trainable_params: int
    details: ModuleDetails = field(default_factory=ModuleDetails)
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.details, ModuleDetails):
            object.__setattr__(self, "details", ModuleDetails.from_dict(self.details, self.method))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "method": self.method,
            "in_features": self.in_features, "out_features": self.out_features,
            "trainable_params": self.trainable_params, "details": self.details.to_dict(), "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModuleDecision":
        return cls(**data)


@dataclass(frozen=True)
class PassResult:
    """A pass's output: the (same, rewritten) module, per-module decisions and notes."""

    module: nn.Module
    decisions: tuple[ModuleDecision, ...]
    notes: tuple[str, ...] = ()
    # Other states of the rewritten model the plan must hold too (layerwise sampling's active sets),
    # each (label, a call that puts the model in it): the plan is made for the costliest.
    variants: tuple[tuple[str, Callable[[], None]], ...] = ()
    # What the method itself adds to the device whatever the plan (label, bytes), e.g. RandLoRA's
    # shared bases: checked against the budget before anything is traced.
    fixed: tuple[tuple[str, int], ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.decisions)


class WrappedLinear(nn.Module):
    """What memopt's layer wrappers share (LoRA, PaCA, QPaCA, S²FT): a frozen Linear-like
    ``base_layer`` inside a module that takes its place.

    * ``weight`` and ``bias`` are the base layer's (PEFT's convention), so code that reads them
      off a projection keeps working — T5 checks ``self.wo.weight.dtype``, torch's
      ``TransformerEncoderLayer`` gathers ``linear1.weight`` for its fused inference path.
    * No fused path computes around the wrapper with those raw weights: torch's fused encoder-layer
      kernel (eval mode, no grad) would bypass the adapter and return the base model's outputs. It
      is skipped for any layer holding a module with a forward pre-hook, so every wrapper carries a
      no-op one (``_keeps_fused_paths_off``).
    """

    base_layer: nn.Module

    def _wrap(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.register_forward_pre_hook(_keeps_fused_paths_off)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)


def _keeps_fused_paths_off(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing; its presence turns fused fast paths off (``WrappedLinear``)."""
    return None


def as_output(y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A custom Function's [M, out] result in ``x``'s leading shape, as a tensor of its own rather
    than a view: an output a Function returns as a view may not be modified in place (Falcon's
    ``mlp_output += attention_output``), a fresh one may."""
    return torch.ops.aten._unsafe_view.default(y2d, [*x.shape[:-1], y2d.shape[-1]])


class RewriteLog:
    """An undo log for in-place rewrites.

    Records every submodule replacement, every in-place change a pass registers with
    ``on_undo``, and the ``requires_grad`` flag of every parameter before the first change, so
    ``undo()`` restores the user's module exactly (same objects, same values). ``undo`` is
    idempotent.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._undo: list[Callable[[], None]] = []
        self._requires_grad = {id(p): (p, p.requires_grad) for p in root.parameters()}

    def replace(self, name: str, new: nn.Module) -> nn.Module:
        """Swap the submodule at dotted ``name`` for ``new``; return the old one."""
        parent_name, _, attr = name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._undo.append(lambda: setattr(parent, attr, old))
        return old

    def on_undo(self, action: Callable[[], None]) -> None:
        """Register how to revert an in-place change the pass just made (run in reverse order)."""
        self._undo.append(action)

    def freeze(self, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            p.requires_grad_(False)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        for p, flag in self._requires_grad.values():
            p.requires_grad_(flag)

    def original_requires_grad(self) -> dict[int, bool]:
        return {key: flag for key, (_, flag) in self._requires_grad.items()}


def _matches(name: str, spec: "str | tuple[str, ...]") -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def select_targets(
    graph: ModelGraph, model: nn.Module, target: "str | tuple[str, ...]", exclude: "str | tuple[str, ...] | None"
) -> list[LinearLayer]:
    """The Linear-like layers a method applies to, PEFT's targeting conventions.

    ``"all-linear"`` takes every Linear-like layer the forward calls except the LM head; a regex
    must match the whole module name; a list matches names equal to, or ending in ``.`` + an entry.
    Raises ``ValueError`` naming what is available when nothing matches, and when a target names a
    module that is not Linear-like.
    """
    if target == "all-linear":
        chosen = [layer for layer in graph.linears if layer.role is not Role.LM_HEAD]
    else:
        chosen = [layer for layer in graph.linears if _matches(layer.name, target)]
        linear_names = {layer.name for layer in graph.linears}
        others = [n for n, _ in model.named_modules() if n and n not in linear_names and _matches(n, target)]
        if others and not chosen:
            kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in others[:5])
            raise ValueError(f"target_modules={target!r} matches only modules that are not Linear-like: {kinds}")
    if exclude is not None:
        chosen = [layer for layer in chosen if not _matches(layer.name, exclude)]
    if not chosen:
        suffixes = sorted({layer.name.rpartition(".")[2] for layer in graph.linears})
        raise ValueError(
            f"target_modules={target!r} (exclude_modules={exclude!r}) matches no Linear-like layer; "
            f"the model's Linear layers end in {suffixes}"
        )
    return chosen


def merge_wrapped(model: nn.Module, wrapper: type[nn.Module]) -> nn.Module:
    """Replace every ``wrapper`` instance in ``model`` by its ``merged()`` plain layer, in place."""
    names = [name for name, m in model.named_modules() if isinstance(m, wrapper)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, getattr(parent, attr).merged())
    return model
