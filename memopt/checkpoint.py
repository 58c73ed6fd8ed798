"""Saving what was trained, and rebuilding it on a fresh base model.

A directory written by ``OptimizedModel.save_pretrained(dir)`` holds only what training changed
and what rebuilds the rest — never the frozen base weights:

* ``memopt_config.json``: the format version, the method and its options, the quantization, the
  optimizer and device the plan was made for, and one checksum per adapted base weight (the float64
  sum of its original values: S²FT's permutations leave it unchanged, PaCA's overlaid columns are
  taken from ``paca_orig``), so a different base model is caught at load;
* the trained tensors: for LoRA, PEFT's own files (``adapter_config.json``,
  ``adapter_model.safetensors`` with PEFT's key names, ``base_model.model.<module>.lora_A.weight``),
  so ``peft.PeftModel.from_pretrained(base, dir)`` loads them; for the other methods
  ``memopt_model.safetensors``: every trainable tensor and the method's index buffers
  (``paca_idx``, ``s2ft_perm``, ``s2ft_selected``);
* ``memopt_buffers.safetensors``: the model's own persistent buffers (BatchNorm's running
  statistics, a counter its forward advances), which training changes as it goes;
* ``plan.json``: the plan the model carried out.

For ``method="full"``, ``memopt_config.json`` also names the parameters the model held frozen
(``held_frozen``): the rebuilt model freezes them again, and their values are checked against the
saved checksum like every other frozen weight.

``memopt.from_pretrained(base, dir)`` rewrites ``base`` with the saved method and options (the
seeds make the same indices and permutations, which are checked against the saved ones), loads the
trained tensors, and carries out the saved plan after checking it was made for this model
(``budget_gb`` / ``example_inputs`` given there plan again instead). A LoRA directory written by
PEFT loads too, planned for the ``budget_gb`` and ``example_inputs`` given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memopt._version import package_version
from memopt.config import peft_unsupported
from memopt.errors import MemoptError

if TYPE_CHECKING:
    from memopt.config import OptimizeConfig, QuantizeConfig
    from memopt.runtime.optimized import OptimizedModel

__all__ = ["save_pretrained", "read_checkpoint", "load_trained", "Checkpoint", "METHOD_BUFFERS"]

FORMAT = 1
CONFIG_FILE = "memopt_config.json"
TENSORS_FILE = "memopt_model.safetensors"
BUFFERS_FILE = "memopt_buffers.safetensors"
PLAN_FILE = "plan.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METHOD_BUFFERS = ("paca_idx", "s2ft_perm", "s2ft_selected")  # what a rewrite draws; checked at load


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter (a tied one once, under its first name), every method buffer, and
    the codes and scales of each trainable int8 weight (in place of its memory-free handle)."""
    from memopt.passes.int8train import is_handle
    trained = _trained_without_grad(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # a tied weight once, under its first name
        if (p.requires_grad or id(p) in trained) and not is_handle(p):
            out[name] = p
    for name, b in model.named_buffers():
        if name.rpartition(".")[2] in METHOD_BUFFERS:
            out[name] = b
    for name, module in model.named_modules():
        if getattr(module, "trains_quantized_weight", False):
            out[f"{name}.qweight"], out[f"{name}.qscales"] = module.qweight, module.qscales
        if getattr(module, "trains_base_weight", False):  # RSO: its W is saved above; its step count here
            out[f"{name}.rso_step"] = module.rso_step
    return out


def own_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own persistent buffers (not those of memopt's layers: quantized codes, indices):
    what its forward may update as it trains, BatchNorm's running statistics above all."""
    out = {}
    for prefix, module in model.named_modules():
        if type(module).__module__.startswith("memopt."):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer
    return out


def held_frozen(model: nn.Module) -> list[str]:
    """Parameters a full-parameter model holds frozen (saved with their names, not their values)."""
    trained = _trained_without_grad(model)
    return [name for name, p in model.named_parameters() if not p.requires_grad and id(p) not in trained]


def freeze_as_saved(model: nn.Module, checkpoint: "Checkpoint") -> None:
    """Freeze the parameters the saved full-parameter model held frozen, before it is rebuilt."""
    names = checkpoint.meta.get("held_frozen") or []
    params = dict(model.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise MemoptError(f"{checkpoint.directory}: the saved model held {unknown[0]!r} frozen, which this model does "
                          "not have: it was saved for another base model")
    for name in names:
        params[name].requires_grad_(False)


def _trained_without_grad(model: nn.Module) -> set[int]:
    """Parameters (by id) that training changes though they may not require grad now: every block
    layerwise sampling may have trained, and each base weight RSO folds its updates into."""
    from memopt.passes.layerwise import candidates

    trained = {id(p) for p in candidates(model) or ()}
    return trained | {id(m.base_layer.weight) for m in model.modules() if getattr(m, "trains_base_weight", False)}


def base_checksums(model: nn.Module) -> dict[str, list[float]]:
    """[sum, sum of |w|] in float64 of each adapted layer's original base weight (module docstring)."""
    from memopt.passes.base import WrappedLinear

    sums = {}
    for name, module in model.named_modules():
        if isinstance(module, WrappedLinear) and not getattr(module, "trains_base_weight", False):
            weight = stored_weight(module.base_layer)
            if weight is None or weight.device.type == "meta":
                continue
            w = weight.detach().double()
            total, size = w.sum(), w.abs().sum()
            idx, orig = getattr(module, "paca_idx", None), getattr(module, "paca_orig", None)
            if idx is not None and orig is not None:  # PaCA writes its P into these columns
                cols = w.index_select(1 if module.kind == "linear" else 0, idx)
                total = total - cols.sum() + orig.double().sum()
                size = size - cols.abs().sum() + orig.double().abs().sum()
            sums[name] = [float(total), float(size)]
    return sums


def frozen_checksum(model: nn.Module) -> list[float]:
    """[sum, sum of |w|, eps] over every frozen parameter outside the adapted layers (embeddings,
    norms, the LM head, layers left alone); eps: the coarsest dtype's machine epsilon among them."""
    from memopt.passes.base import WrappedLinear
    adapted = [name + "." for name, m in model.named_modules() if isinstance(m, WrappedLinear)]
    trained = _trained_without_grad(model)  # saved, so not part of the base checked
    total = size = 0.0
    eps = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad or id(p) in trained or p.device.type == "meta" or any(name.startswith(a) for a in adapted):
            continue
        w = p.detach().double()
        total, size = total + float(w.sum()), size + float(w.abs().sum())
        eps = max(eps, torch.finfo(p.dtype).eps if p.is_floating_point() else 0.0)
    return [total, size, eps]


def _same_sum(got: list[float], saved: list[float], eps: float) -> bool:
    """Equal sums of the same values, up to summation order (1e-9) and, when the base was cast to
    another dtype, rounding of each element (eps/2 of its magnitude at most)."""
    slack = max(1e-9, eps / 2) * max(got[1], saved[1], 1e-30)
    return abs(got[0] - saved[0]) <= slack and abs(got[1] - saved[1]) <= slack


def stored_weight(layer: nn.Module) -> torch.Tensor | None:
    """What the layer stores as its weight: the codes of a quantized layer, else ``weight``."""
    qweight = getattr(layer, "qweight", None)
    if isinstance(qweight, torch.Tensor):
        return qweight
    weight = getattr(layer, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def save_pretrained(optimized: "OptimizedModel", directory: "str | Path", config: "OptimizeConfig",
                    quantize: "QuantizeConfig | None") -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = optimized.model
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in trained_tensors(model).items()}
    buffers = {name: t.detach().to("cpu").contiguous().clone() for name, t in own_buffers(model).items()
               if name not in tensors}
    method = config.method
    meta = {
        "format": FORMAT,
        "memopt_version": _version(),
        "model_class": type(model).__name__,
        "method": method,
        "options": _options(config.method_config),
        "quantize": None if quantize is None else _options(quantize),
        "optimizer": config.optimizer,
        "base_checksums": base_checksums(model),
        "frozen_checksum": frozen_checksum(model),
        "tensors": sorted(tensors),
        "buffers": sorted(buffers),
    }
    if method == "full":
        meta["held_frozen"] = held_frozen(model)
    for stale in (PEFT_TENSORS_FILE, PEFT_CONFIG_FILE, TENSORS_FILE, BUFFERS_FILE):  # another save, here before
        if (directory / stale).exists():
            (directory / stale).unlink()
    if method == "lora":
        save_file({PEFT_PREFIX + name: t for name, t in tensors.items()}, str(directory / PEFT_TENSORS_FILE),
                  metadata={"format": "pt"})
        (directory / PEFT_CONFIG_FILE).write_text(json.dumps(_peft_config(model, config), indent=2) + "\n")
    else:
        save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": "pt"})
    if buffers:
        save_file(buffers, str(directory / BUFFERS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    optimized.plan.save(directory / PLAN_FILE)
    return directory


def _version() -> str:
    return package_version()


def _options(config: Any) -> dict[str, Any]:
    import dataclasses

    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _peft_config(model: nn.Module, config: "OptimizeConfig") -> dict[str, Any]:
    """PEFT's ``LoraConfig`` as ``adapter_config.json`` holds it, for the layers memopt adapted."""
    from memopt.passes.lora import LoraLinear

    cfg = config.method_config
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    kinds = {m.kind for m in layers.values()}
    if len(kinds) > 1:
        raise MemoptError("this LoRA model adapts both nn.Linear and Conv1D layers; PEFT's format has one "
                          "fan_in_fan_out flag for all of them, so it cannot be written in PEFT's format")
    hf_config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(layers),
        "fan_in_fan_out": kinds == {"conv1d"},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }


class Checkpoint:
    """A saved directory, read: its method and options, trained tensors, checksums and plan."""

    def __init__(self, directory: Path, meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor],
                 plan: Any, buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.directory, self.meta, self.tensors, self.plan = directory, meta, tensors, plan
        self.buffers = buffers or {}  # the model's own buffers as saved (none in a PEFT adapter)

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.meta["options"])

    @property
    def quantize(self) -> dict[str, Any] | None:
        return self.meta.get("quantize")


def read_checkpoint(directory: "str | Path") -> Checkpoint:
    """Read a directory written by ``save_pretrained`` (or a LoRA adapter written by PEFT)."""
    from safetensors.torch import load_file

    from memopt.plan import load_plan

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (write one with OptimizedModel.save_pretrained)")
    if not (directory / CONFIG_FILE).exists():
        if (directory / PEFT_CONFIG_FILE).exists():
            return _read_peft(directory)
        raise MemoptError(f"{directory} holds neither {CONFIG_FILE} (memopt's save_pretrained) nor "
                          f"{PEFT_CONFIG_FILE} (a PEFT adapter)")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise MemoptError(f"{directory / CONFIG_FILE} is format {meta.get('format')!r}; this memopt reads format {FORMAT}")
    files = [PEFT_TENSORS_FILE, PEFT_CONFIG_FILE] if meta["method"] == "lora" else [TENSORS_FILE]
    if meta.get("buffers"):
        files.append(BUFFERS_FILE)
    missing = [name for name in [*files, PLAN_FILE] if not (directory / name).exists()]
    if missing:
        raise MemoptError(f"{directory} is missing {', '.join(missing)} (written by save_pretrained with "
                          f"{CONFIG_FILE}); copy the whole directory")
    tensors = load_file(str(directory / files[0]))
    if meta["method"] == "lora":
        tensors = _from_peft_names(tensors, directory)
    buffers = load_file(str(directory / BUFFERS_FILE)) if meta.get("buffers") else {}
    return Checkpoint(directory, meta, tensors, load_plan(directory / PLAN_FILE), buffers)


def _read_peft(directory: Path) -> Checkpoint:
    from safetensors.torch import load_file

    config = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    kind = config.get("peft_type")
    if kind != "LORA":
        raise MemoptError(f"{directory} holds a PEFT {kind} adapter; memopt loads PEFT's LORA adapters "
                          "(and its own save_pretrained directories for lora, paca and s2ft)")
    unsupported = peft_unsupported(config)
    if unsupported:
        raise MemoptError(f"{directory}: this PEFT LoRA adapter uses {unsupported}, which memopt's LoRA does not "
                          "support (it supports r, lora_alpha, lora_dropout, target_modules and exclude_modules)")
    path = directory / PEFT_TENSORS_FILE
    if not path.exists():
        raise MemoptError(f"{directory} is missing {PEFT_TENSORS_FILE}")
    targets = config.get("target_modules")
    options = {"rank": config["r"], "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
               "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets}
    exclude = config.get("exclude_modules")
    if exclude:
        options["exclude_modules"] = sorted(exclude) if isinstance(exclude, (list, tuple, set)) else exclude
    meta = {"method": "lora", "options": options, "quantize": None, "base_checksums": {}}
    return Checkpoint(directory, meta, _from_peft_names(load_file(str(path)), directory), None)


def _from_peft_names(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise MemoptError(f"{directory / PEFT_TENSORS_FILE}: key {key!r} is not one of PEFT's (they begin with "
                              f"{PEFT_PREFIX!r})")
        out[key[len(PEFT_PREFIX):]] = value
    return out


def load_trained(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's trained tensors into the rebuilt ``model``, after checking the base
    model and the rewrite are the ones they were trained on."""
    _check_base(model, checkpoint)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    saved = checkpoint.tensors
    expected = set(trained_tensors(model))
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - set(params) - set(buffers))
    if unexpected:
        raise MemoptError(f"{checkpoint.directory}: tensor {unexpected[0]!r} (of {len(unexpected)} unknown) has no "
                          "place in this model: it was saved for another base model or other method options")
    if missing:
        raise MemoptError(f"{checkpoint.directory}: this model trains {missing[0]!r} (and {len(missing) - 1} more) "
                          "but the directory has no such tensor: it was saved for another base model or options")
    for name in sorted(saved):
        target = params.get(name, buffers.get(name))
        value = saved[name]
        if tuple(value.shape) != tuple(target.shape):
            raise MemoptError(f"{checkpoint.directory}: tensor {name!r} was saved with shape {tuple(value.shape)}, this "
                              f"model's is {tuple(target.shape)}: the directory was saved for another base model")
        if name.rpartition(".")[2] in METHOD_BUFFERS and not torch.equal(value.to(target.device), target):
            raise MemoptError(f"{checkpoint.directory}: {name!r} drawn for this model differs from the saved one: "
                              "the base model (or the method's seed) differs from the one trained")
    with torch.no_grad():
        for name, value in saved.items():
            target = params.get(name)
            if target is None and name.rpartition(".")[2] not in METHOD_BUFFERS:  # a trained int8 weight's codes
                target = buffers[name]
            if target is not None:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    _load_buffers(model, checkpoint)
    for module in model.modules():
        if getattr(module, "trains_base_weight", False):
            module.redraw()  # RSO: the saved step's subproblem's P


def _load_buffers(model: nn.Module, checkpoint: Checkpoint) -> None:
    """The model's own buffers as saved (a directory from before they were saved has none)."""
    mine = own_buffers(model)
    for name, value in checkpoint.buffers.items():
        target = mine.get(name)
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise MemoptError(f"{checkpoint.directory}: buffer {name!r} was saved with shape {tuple(value.shape)}, "
                              + ("which this model does not have" if target is None else
                                 f"this model's is {tuple(target.shape)}") + ": it was saved for another base model")
    with torch.no_grad():
        for name, value in checkpoint.buffers.items():
            mine[name].copy_(value.to(device=mine[name].device, dtype=mine[name].dtype))


def _check_base(model: nn.Module, checkpoint: Checkpoint) -> None:
    saved = checkpoint.meta.get("base_checksums") or {}
    mine = base_checksums(model) if saved else {}
    eps = max(checkpoint.meta.get("frozen_checksum", [0, 0, 0])[2], frozen_checksum(model)[2])
    for name, (total, size) in saved.items():
        got = mine.get(name)
        if got is None:
            raise MemoptError(f"{checkpoint.directory}: layer {name!r} was adapted when saved but is not in this model")
        if not _same_sum(got, [total, size], eps):
            raise MemoptError(f"{checkpoint.directory}: the base weight of {name!r} differs from the one the saved "
                              f"tensors were trained on (sum {got[0]!r}, saved {total!r}): load them onto the same "
                              "base model")
    frozen = checkpoint.meta.get("frozen_checksum")
    if frozen and not _same_sum(frozen_checksum(model), frozen, eps):
        raise MemoptError(f"{checkpoint.directory}: the base model's other frozen weights (embeddings, norms, LM head, "
                          "layers left alone) differ from the ones the saved tensors were trained with: load them "
                          "onto the same base model")
