"""Configuration: frozen, validated, JSON-serialisable dataclasses.

Every option `memopt.optimize` understands lives here. Configs validate themselves in
``__post_init__`` and raise ``ValueError`` / ``TypeError`` that say what to change; they are never
silently rewritten. ``to_dict`` / ``from_dict`` round-trip exactly so a Plan can record them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from memopt.device import DEVICE_PRESETS, DeviceSpec, resolve_device

__all__ = [
    "DeviceSpec",
    "DEVICE_PRESETS",
    "resolve_device",
    "MethodConfig",
    "LoraConfig",
    "PacaConfig",
    "RandLoraConfig",
    "RsoConfig",
    "S2ftConfig",
    "LisaConfig",
    "OwloreConfig",
    "FullConfig",
    "METHOD_CONFIGS",
    "QUANT_FORMATS",
    "QuantizeConfig",
    "OptimizeConfig",
    "GIB",
    "MIB",
]

GIB = 2**30
MIB = 2**20

# DeviceSpec, its presets and resolve_device live in memopt.device and are re-exported here.


@dataclass(frozen=True)
class MethodConfig:
    """Base of the per-method configs; ``method`` names the pass that consumes it."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _normalise_targets(value: Any, what: str, allow_none: bool) -> "str | tuple[str, ...] | None":
    """A target spec is a regex string, "all-linear", or a tuple of module-name suffixes."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{what}={value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise TypeError(
        f"{what} must be 'all-linear', a regex string or a non-empty list of module-name suffixes "
        f"(e.g. ['q_proj', 'v_proj']), got {value!r}"
    )


def _normalise_target_fields(cfg: Any) -> None:
    """A frozen config's ``target_modules`` and ``exclude_modules``, normalised in place (``_normalise_targets``)."""
    object.__setattr__(cfg, "target_modules", _normalise_targets(cfg.target_modules, "target_modules", False))
    object.__setattr__(cfg, "exclude_modules", _normalise_targets(cfg.exclude_modules, "exclude_modules", True))


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA: y = x·Wᵀ + (alpha/rank)·dropout(x)·Aᵀ·Bᵀ with B zero-initialised (PEFT's numerics).

    ``target_modules``: "all-linear" (every Linear-like layer but the LM head), a regex matched
    against the full module name, or a list of name suffixes (PEFT's convention).
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0  # PEFT's default (lora_alpha=8): scaling 1 at the default rank
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    exclude_modules: Any = None
    seed: int | None = None
    adapter_dtype: str = "float32"  # over a 16-bit model: "float32" (PEFT's default) or "model" (its dtype)

    def __post_init__(self) -> None:
        if self.adapter_dtype not in ("float32", "model"):
            raise ValueError(f"adapter_dtype must be 'float32' or 'model', got {self.adapter_dtype!r}")
        _check_adapter(self)
        _normalise_target_fields(self)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_adapter(cfg: Any) -> None:
    """An adapter's ``rank`` (a positive int), ``alpha`` (a positive number) and ``dropout`` (in [0, 1))."""
    _positive_int(cfg.rank, "rank")
    if (isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha)
            or cfg.alpha <= 0):
        raise ValueError(f"alpha must be a positive number, got {cfg.alpha!r}")
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {cfg.dropout!r}")


def _check_ratio(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")


@dataclass(frozen=True)
class RandLoraConfig(MethodConfig):
    """RandLoRA: a full-rank update Σⱼ Bⱼ·Λⱼ·A·Γⱼ from random frozen bases of ``rank`` shared by all
    adapted layers, trainable diagonal scalings Λ and Γ, scaling alpha / rank (PEFT's
    ``RandLoraConfig`` numerics: its defaults r=32, randlora_alpha=640; ``seed`` is its
    ``projection_prng_key``). ``target_modules`` / ``exclude_modules`` as for LoRA."""

    method: ClassVar[str] = "randlora"
    rank: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    exclude_modules: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_adapter(self)
        _check_seed(self.seed)
        _normalise_target_fields(self)


@dataclass(frozen=True)
class RsoConfig(MethodConfig):
    """RSO (randomized subspace optimization): each targeted W (out × in) trains B (out × ``rank``)
    in W + B·P, P (``rank`` × in) random and frozen; every ``resample_every`` optimizer steps B·P is
    folded into W, B and its optimizer state are reset and the next P is drawn (``passes.rso``; the
    optimizer from ``make_optimizer`` does it). Backward keeps P·x (rank values per token) instead
    of x. ``target_modules`` / ``exclude_modules`` as for LoRA; ``seed`` draws every P."""

    method: ClassVar[str] = "rso"
    rank: int = 128
    resample_every: int = 100
    target_modules: Any = "all-linear"
    exclude_modules: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.rank, "rank")
        _positive_int(self.resample_every, "resample_every")
        _check_seed(self.seed)
        _normalise_target_fields(self)


@dataclass(frozen=True)
class PacaConfig(MethodConfig):
    """PaCA: per targeted Linear, ``rank`` input columns of W become the trainable P (out × rank).

    The forward is one matmul with W whose columns ``idx`` equal ``scaling · P``
    (``scaling = alpha / rank``; P starts at ``W[:, idx] / scaling``, so the function is unchanged).
    ``selection``: "random" (seeded, the default) or "weight-norm" (the columns of largest norm).
    """

    method: ClassVar[str] = "paca"
    rank: int = 8
    alpha: float = 16.0
    selection: str = "random"
    seed: int = 0
    target_modules: Any = "all-linear"
    exclude_modules: Any = None

    def __post_init__(self) -> None:
        _positive_int(self.rank, "rank")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha <= 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.selection not in ("random", "weight-norm"):
            raise ValueError(f"selection must be 'random' or 'weight-norm', got {self.selection!r}")
        _check_seed(self.seed)
        _normalise_target_fields(self)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class S2ftConfig(MethodConfig):
    """S²FT: train dense blocks of selected attention heads and FFN channels, nothing else.

    ``head_ratio`` of the attention heads (their v rows and/or o columns) and ``channel_ratio`` of
    the FFN channels (their up rows and/or down columns) are selected, pooled over layers (so
    per-layer counts vary), and co-permuted to be contiguous; ``targets`` says which of
    "v", "o", "up", "down" train.
    """

    method: ClassVar[str] = "s2ft"
    head_ratio: float = 0.05
    channel_ratio: float = 0.02
    targets: Any = ("o", "down")
    seed: int = 0

    def __post_init__(self) -> None:
        _check_ratio(self.head_ratio, "head_ratio")
        _check_ratio(self.channel_ratio, "channel_ratio")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (tuple, list)) or not targets or not set(targets) <= {"v", "o", "up", "down"}:
            raise ValueError(f"targets must be a non-empty subset of ('v', 'o', 'up', 'down'), got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(targets))
        _check_seed(self.seed)


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full-parameter training: every parameter of the model trains, or with ``target_modules`` only
    those — a regex fullmatched against parameter names, or a list of module names, each matching
    every module whose dotted name is it or ends with it (``"q_proj"``, ``"model.layers.1"``) and
    every parameter under those. The optimizer is where the memory goes: pair it with ``optimizer="galore-adamw8bit"``
    or ``"apollo-mini"`` (``memopt.optim``)."""

    method: ClassVar[str] = "full"
    target_modules: Any = None

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"target_modules={targets!r} is not a valid regular expression: {exc}") from None
        elif targets is not None:
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be None (every parameter), a regex over parameter names or a "
                                 f"list of module names, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))


@dataclass(frozen=True)
class LisaConfig(MethodConfig):
    """LISA (layerwise importance sampling): every ``switch_every`` optimizer steps, ``active_layers``
    of the model's L blocks are drawn uniformly and train in full; the others are frozen. The
    embeddings and the LM head train throughout (``train_embeddings`` / ``train_head``, as the paper
    does). The plan is made for the first and the last ``active_layers`` blocks and keeps the
    costlier; the optimizer from ``make_optimizer`` switches (``passes.layerwise``)."""

    method: ClassVar[str] = "lisa"
    active_layers: int = 2
    switch_every: int = 20
    train_embeddings: bool = True
    train_head: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.active_layers, "active_layers")
        _positive_int(self.switch_every, "switch_every")
        for name in ("train_embeddings", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_seed(self.seed)


@dataclass(frozen=True)
class OwloreConfig(LisaConfig):
    """OwLore: LISA whose blocks are drawn with probability ∝ their outlier ratio — the fraction of
    Wanda scores |W_ij|·‖X_j‖₂ (X: the block's inputs on the example batch) above
    ``outlier_threshold`` × the block's mean score. The paper trains the active blocks with GaLore
    (``optimizer="galore-adamw"``, rank 128)."""

    method: ClassVar[str] = "owlore"
    active_layers: int = 5
    outlier_threshold: float = 13.0

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.outlier_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"outlier_threshold must be a positive number, got {value!r}")


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {"lora": LoraConfig, "paca": PacaConfig, "s2ft": S2ftConfig,
                                                  "full": FullConfig, "randlora": RandLoraConfig,
                                                  "rso": RsoConfig, "lisa": LisaConfig, "owlore": OwloreConfig}

QUANT_FORMATS = ("nf4", "int8")
_QUANTIZE_CHOICES = (None, *QUANT_FORMATS, "auto")


@dataclass(frozen=True)
class QuantizeConfig:
    """Which frozen Linear-like weights to quantize, and to what (``memopt.passes.quantize``).

    ``format``: "nf4" (QLoRA: 4-bit NormalFloat, absmax per ``block_size`` elements, the absmax
    double-quantized to 8 bits per ``scaler_block_size``) or "int8" (per-output-row absmax).
    ``target_modules`` / ``exclude_modules``: PEFT's conventions, as in ``LoraConfig``
    ("all-linear" leaves the LM head in full precision, as QLoRA does).
    """

    method: ClassVar[str] = "quantize"
    format: str = "nf4"
    block_size: int = 64
    scaler_block_size: int = 256
    target_modules: Any = "all-linear"
    exclude_modules: Any = None

    def __post_init__(self) -> None:
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"format must be one of {QUANT_FORMATS}, got {self.format!r}")
        for name in ("block_size", "scaler_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"{name} must be an even integer >= 2, got {value!r} (QLoRA uses 64 and 256)")
        _normalise_target_fields(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizeConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _quantize_option(value: Any) -> "QuantizeConfig | str | None":
    """``quantize=``: None, "nf4" / "int8" (a default ``QuantizeConfig`` of that format), "auto", or a config."""
    if value is None or isinstance(value, QuantizeConfig):
        return value
    if isinstance(value, str):
        if value == "auto":
            return value
        if value in QUANT_FORMATS:
            return QuantizeConfig(format=value)
        raise ValueError(f"quantize must be one of {_QUANTIZE_CHOICES} or a memopt.QuantizeConfig, got {value!r}")
    raise TypeError(f"quantize must be None, 'nf4', 'int8', 'auto' or a memopt.QuantizeConfig, "
                    f"got {type(value).__name__} {value!r}")


def _positive_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of GiB (e.g. 24), got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive, finite number of GiB, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything `memopt.optimize` was asked to do, validated.

    ``budget_gb`` is GiB (2**30 bytes) of device capacity; ``reserve_gb`` (default: the device's
    documented reserve) is subtracted from it before planning. ``quantize``: None (weights as they
    are), a ``QuantizeConfig`` ("nf4" / "int8" are taken as the default config of that format) or
    "auto" (quantize only if the step does not fit otherwise: int8 first, then nf4).
    """

    budget_gb: float
    method_config: MethodConfig = field(default_factory=LoraConfig)
    optimizer: str = "adamw"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    device: DeviceSpec = field(default_factory=lambda: DEVICE_PRESETS["cpu"])
    reserve_gb: float | None = None
    quantize: QuantizeConfig | str | None = None
    host_budget_gb: float | None = None  # host memory offloaded activations may hold; None: this machine's RAM
    cut_cross_entropy: bool | str = "auto"  # fuse a HF causal LM's head and loss: True, False or "auto"
    chunk_sequence: int | str | Mapping[str, int] | None = None  # each position-wise MLP in this many pieces of
    # tokens, or MLP name -> pieces (the others whole); "auto": if whole MLPs do not fit (those at the peak
    # first), or must recompute / offload and the step in pieces is faster

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget_gb", _positive_number(self.budget_gb, "budget_gb"))
        chunks = self.chunk_sequence
        if isinstance(chunks, Mapping):  # (the names are checked against the model as it is chunked)
            object.__setattr__(self, "chunk_sequence", chunks := dict(chunks))
        if isinstance(chunks, dict):
            for name, count in chunks.items():
                if not isinstance(name, str) or not is_piece_count(count):
                    raise ValueError(f"chunk_sequence maps MLP module names to a number of pieces >= 2; got "
                                     f"{name!r}: {count!r}")
        if chunks not in (None, "auto") and not (is_piece_count(chunks) or isinstance(chunks, dict) and chunks):
            raise ValueError(f"chunk_sequence must be a number of pieces >= 2, a mapping of MLP module names to "
                             f"pieces, 'auto' (pieces when whole MLPs do not fit or are slower) or None (no "
                             f"chunking), got {chunks!r}")
        if not (isinstance(self.cut_cross_entropy, bool) or self.cut_cross_entropy == "auto"):
            raise ValueError(f"cut_cross_entropy must be True, False or 'auto', got {self.cut_cross_entropy!r}")
        if self.host_budget_gb is not None:
            if isinstance(self.host_budget_gb, bool) or not isinstance(self.host_budget_gb, (int, float)) or \
                    not math.isfinite(self.host_budget_gb) or self.host_budget_gb < 0:
                raise ValueError(f"host_budget_gb must be a number of GiB >= 0 (0: never offload), got "
                                 f"{self.host_budget_gb!r}")
        object.__setattr__(self, "quantize", _quantize_option(self.quantize))
        if not isinstance(self.method_config, MethodConfig):
            raise TypeError(f"method_config must be a MethodConfig, got {type(self.method_config).__name__}")
        if self.reserve_gb is not None:
            if isinstance(self.reserve_gb, bool) or not isinstance(self.reserve_gb, (int, float)) or self.reserve_gb < 0:
                raise ValueError(f"reserve_gb must be a number >= 0, got {self.reserve_gb!r}")
        if self.reserve_bytes >= self.budget_bytes:
            raise ValueError(
                f"budget_gb={self.budget_gb} leaves nothing after the {self.reserve_bytes / GIB:.3f} GiB reserve "
                f"of device {self.device.name!r}; raise the budget or pass reserve_gb="
            )

    @property
    def method(self) -> str:
        return self.method_config.method

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gb * GIB)

    @property
    def reserve_bytes(self) -> int:
        return self.device.reserve_bytes if self.reserve_gb is None else int(self.reserve_gb * GIB)

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.reserve_bytes

    @property
    def host_budget_bytes(self) -> int:
        """What offloaded activations may hold in host memory: ``host_budget_gb``, else this machine's RAM."""
        return machine_ram_bytes() if self.host_budget_gb is None else int(self.host_budget_gb * GIB)

    @classmethod
    def from_options(cls, method: str, budget_gb: Any, *, optimizer: str = "adamw",
                     optimizer_options: Mapping[str, Any] | None = None, device: Any = "cpu",
                     reserve_gb: float | None = None, quantize: Any = None, host_budget_gb: float | None = None,
                     cut_cross_entropy: bool | str = "auto",
                     chunk_sequence: int | str | Mapping[str, int] | None = None, **method_options: Any) -> "OptimizeConfig":
        """Build from `optimize`'s keyword options; unknown options are an error, never ignored.

        ``method`` may be a ``peft.LoraConfig`` (its r, lora_alpha, lora_dropout, target_modules and
        exclude_modules become LoRA's options; a feature memopt's LoRA lacks is an error), and
        LoRA's options may be given under PEFT's names (``r``, ``lora_alpha``, ``lora_dropout``).
        ``method`` may also be a method config (``memopt.PacaConfig(rank=16)``); options given beside
        it override its fields."""
        if _is_peft_config(method):
            method, method_options = "lora", {**from_peft_config(method), **method_options}
        elif isinstance(method, MethodConfig):
            given = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
            beside = _peft_names(method_options) if method.method == "lora" else method_options
            method, method_options = method.method, {**given, **beside}
        if not isinstance(method, str) or method not in METHOD_CONFIGS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_CONFIGS)}, a method config "
                             "(memopt.LoraConfig(...), PacaConfig, S2ftConfig, RandLoraConfig, RsoConfig, "
                             "LisaConfig, OwloreConfig, FullConfig) or a peft.LoraConfig")
        method_cls = METHOD_CONFIGS[method]
        if method == "lora":
            method_options = _peft_names(method_options)
        names = {f.name for f in dataclasses.fields(method_cls)}
        unknown = sorted(set(method_options) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(names)}")
        return cls(
            budget_gb=budget_gb,
            method_config=method_cls(**method_options),
            optimizer=optimizer,
            optimizer_options=dict(optimizer_options or {}),
            device=resolve_device(device),
            reserve_gb=reserve_gb,
            quantize=quantize,
            host_budget_gb=host_budget_gb,
            cut_cross_entropy=cut_cross_entropy,
            chunk_sequence=chunk_sequence,
        )


def is_piece_count(value: Any) -> bool:
    """A number of pieces of tokens (``chunk_sequence``): an int >= 2, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2


def machine_ram_bytes() -> int:
    """This machine's physical memory (what offloaded activations may use unless ``host_budget_gb`` says)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: psutil if present, else say so
        try:
            import psutil
        except ImportError:
            raise RuntimeError("cannot read this machine's RAM; pass host_budget_gb= (GiB offloaded activations may "
                               "hold in host memory)") from None
        return int(psutil.virtual_memory().total)


PEFT_LORA_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def _peft_names(options: dict[str, Any]) -> dict[str, Any]:
    """LoRA's options with PEFT's names (``r``, ``lora_alpha``, ``lora_dropout``) as memopt's."""
    out = dict(options)
    for peft_name, name in PEFT_LORA_NAMES.items():
        if peft_name in out:
            if name in out:
                raise TypeError(f"give {name}= or PEFT's {peft_name}=, not both")
            out[name] = out.pop(peft_name)
    if "modules_to_save" in out:
        if out.pop("modules_to_save"):
            raise TypeError("modules_to_save (training whole modules beside the adapters) is not supported by "
                            "memopt's LoRA; leave it None")
    return out


def _is_peft_config(value: Any) -> bool:
    return type(value).__module__.startswith("peft.") and hasattr(value, "peft_type")


def with_peft_default_targets(method: Any, model: Any) -> Any:
    """``method`` as given, except a ``peft.LoraConfig`` with ``target_modules=None``: a copy targeting
    what PEFT targets on ``model``'s architecture (its table by ``config.model_type``, e.g. q_proj and
    v_proj on Llama), as ``peft.get_peft_model`` would; an architecture PEFT has no default for is an
    error, as it is in PEFT."""
    if not _is_peft_config(method) or method.target_modules is not None:
        return method
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise TypeError(f"this peft.LoraConfig has target_modules=None and PEFT has no default targets for "
                        f"{'model_type ' + repr(model_type) if model_type else type(model).__name__}; name them: "
                        "target_modules=['q_proj', 'v_proj'] or 'all-linear'")
    resolved = copy.copy(method)
    resolved.target_modules = set(defaults[model_type])
    return resolved


def peft_unsupported(config: Any) -> dict[str, Any]:
    """The settings of a PEFT LoRA config (a ``LoraConfig`` or its JSON dict) memopt's LoRA does not do."""
    get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
    out = {name: get(name) for name in ("use_dora", "use_rslora", "modules_to_save", "layers_to_transform",
                                        "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias",
                                        "use_qalora", "target_parameters", "trainable_token_indices") if get(name)}
    if get("bias", "none") != "none":
        out["bias"] = get("bias")
    if get("init_lora_weights", True) is not True:  # gaussian, pissa, olora, loftq, ...: another init or base
        out["init_lora_weights"] = get("init_lora_weights")
    return out


def from_peft_config(config: Any) -> dict[str, Any]:
    """memopt LoRA options from a ``peft.LoraConfig``; what memopt's LoRA cannot do is an error."""
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        raise TypeError(f"a PEFT {kind} config: memopt takes PEFT's LoraConfig (or method='lora' | 'paca' | 's2ft')")
    unsupported = peft_unsupported(config)
    if unsupported:
        raise TypeError(f"this peft.LoraConfig sets {unsupported}, which memopt's LoRA does not support; it "
                        "supports r, lora_alpha, lora_dropout, target_modules and exclude_modules")
    targets = config.target_modules
    if targets is None:
        raise TypeError("this peft.LoraConfig has target_modules=None (PEFT picks them per architecture from the "
                        "model, which memopt was not given here); name them: target_modules=['q_proj', 'v_proj'] "
                        "or 'all-linear'")
    options = {"rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
               "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        options["exclude_modules"] = sorted(exclude) if isinstance(exclude, (set, list, tuple)) else exclude
    return options
