"""One spelling for example inputs: ``(args, kwargs)``.

Users hand over example inputs the way they call their model — a tuple of positional arguments, a
dict of keyword arguments (a HF batch), or both as an ``(args_tuple, kwargs_dict)`` pair — and every
part of memopt that runs the model wants the same normal form.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

__all__ = ["input_dtypes", "input_shapes", "normalize_inputs", "tensor_inputs", "token_ids_outside", "training_kwargs"]


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Accepted: a tuple (or list) of positional args; a mapping of kwargs; a pair
    ``(tuple, mapping)``; a single tensor (one positional arg).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), _kwargs(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if _is_args_kwargs_pair(example_inputs):
            return tuple(example_inputs[0]), _kwargs(example_inputs[1])
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tuple of positional args, a dict of keyword args, an "
        f"(args_tuple, kwargs_dict) pair or a tensor; got {type(example_inputs).__name__}"
    )


def _is_args_kwargs_pair(x: tuple[Any, ...] | list[Any]) -> bool:
    return len(x) == 2 and isinstance(x[0], (tuple, list)) and isinstance(x[1], Mapping)


def _kwargs(m: Mapping[Any, Any]) -> dict[str, Any]:
    bad = [k for k in m if not isinstance(k, str)]
    if bad:
        raise TypeError(f"keyword inputs must have str keys, got {bad!r}; pass positional inputs as a tuple")
    return dict(m)


def tensor_inputs(bound: inspect.BoundArguments) -> dict[str, torch.Tensor]:
    """Every tensor among a call's bound arguments, by argument name (``name[i]`` inside a tuple
    or list, ``name.key`` inside a dict)."""
    out = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, (tuple, list)):
            out.update({f"{name}[{i}]": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        elif isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


def token_ids_outside(model: torch.nn.Module, bound: inspect.BoundArguments) -> str | None:
    """Why a call's ``input_ids`` do not index the model's input embeddings (an id below 0 or past
    the table: a tokenizer's pad or added token the model was not resized for), or None. Reads the
    ids' values: called where a step has already failed, not on every call."""
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    ids = tensor_inputs(bound).get("input_ids")
    rows = getattr(embed, "num_embeddings", None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not isinstance(rows, int) or \
            ids.device.type == "meta" or ids.numel() == 0:
        return None
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < rows:
        return None
    return (f"input_ids holds token id {high if high >= rows else low}, outside {type(model).__name__}'s input "
            f"embeddings ({rows} rows: ids 0..{rows - 1}); plain PyTorch fails on it too. A tokenizer's pad or "
            "added token the model was not resized for? model.resize_token_embeddings(len(tokenizer))")


def input_shapes(bound: inspect.BoundArguments) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor input (see ``tensor_inputs``)."""
    return {name: tuple(t.shape) for name, t in tensor_inputs(bound).items()}


def input_dtypes(bound: inspect.BoundArguments) -> dict[str, str]:
    """The dtype of every tensor input (see ``tensor_inputs``), as ``"float32"``, ``"int64"``, ..."""
    return {name: str(t.dtype).replace("torch.", "") for name, t in tensor_inputs(bound).items()}


def training_kwargs(signature: inspect.Signature, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a training step: ``use_cache=False`` where the forward takes ``use_cache``
    and the caller did not set it (as HF does under gradient checkpointing) — a key/value cache is
    inference state, and building one in a training step costs a copy of every key and value."""
    if "use_cache" in signature.parameters and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs
