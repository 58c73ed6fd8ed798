"""HF attention masks as eager HF decides them, while memopt traces or simulates a step.

Design note. Given no ``attention_mask`` and no ``position_ids`` / ``cache_position`` (a training
batch of whole sequences, as ``memopt plan`` builds it), an eager HF decoder computes its position
ids as ``arange`` — never packed sequences — and runs SDPA with ``is_causal=True``: no mask tensor
exists. Traced on fake tensors, HF cannot read those ids: ``find_packed_sequence_indices`` asks a
data-dependent question (memopt's trace then falls back to export's branch), and under export
``_ignore_causal_mask_sdpa`` refuses to skip the mask. Either way the traced step materializes a
[batch, 1, T, T] mask per forward (and, on the CPU SDPA path, a float copy per layer) that the
eager step — and a GPU running memopt's lowered step — never makes: 2 GiB at 32k tokens.

:func:`eager_masks` answers both questions as eager HF does for such a call, from what is known
without values: the ids are the model's own ``arange`` (so not packed), and with no padding mask
the causal mask may be skipped exactly when HF's own rule says (``q_length == kv_length`` or
``q_length == 1``, no sliding window reached). It applies only when the call passes none of those
inputs; a call with explicit position ids traces HF's own logic unchanged.

A call with an ``attention_mask`` of all ones (the tokenizer's mask of a batch without padding) is
such a call too: eager HF reads the mask's values, finds no padding and skips the causal mask.
Traced on fake tensors, those values are unknown, and the trace would build the mask a GPU never
allocates. Whether the mask is all ones is read, on the real tensor, before the trace
(:func:`unpadded`: a ``.all()``, the same device sync eager HF makes on every call), and the trace
is told (``eager_masks(..., unpadded=True)``): it is a *state* of the step, like training or
autocast, so a padded batch is another trace — and another plan (``Plan.unpadded_mask``) — and
both are kept. Fake or meta inputs carry no values: the planner takes what it was told
(:func:`assume_unpadded`), a simulated step the plan's state.

The planner, the simulation and the runtime all trace under it, so the plan and the lowered step
see the same program.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import weakref
from typing import Any, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["assume_unpadded", "eager_masks", "unpadded"]

_INPUTS = ("attention_mask", "position_ids", "cache_position")
_lock = threading.Lock()
_depth = 0
_saved: dict[str, Any] = {}
_IGNORE_PADDING = contextvars.ContextVar("memopt_ignore_padding", default=False)  # inside eager_masks(unpadded=True)
_ASSUMED = contextvars.ContextVar("memopt_assumed_unpadded", default=False)  # assume_unpadded: the planner's state


def _inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name, if ``model`` is an HF model called with token ids or embeddings."""
    if getattr(model, "config", None) is None or not hasattr(model, "get_input_embeddings"):
        return None
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    inputs = {**extra, **bound}  # a wrapper's forward(*args, **kwargs) too (memopt's OptimizedModel)
    return inputs if "input_ids" in inputs or "inputs_embeds" in inputs else None


def unpadded(model: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Does this call pass an ``attention_mask`` of all ones (True) or with padding (False)? None: it
    passes none, passes position inputs too, is not an HF model's, or its mask carries no values
    (fake or meta tensors)."""
    inputs = _inputs(model, args, kwargs)
    if inputs is None or any(inputs.get(name) is not None for name in _INPUTS[1:]):
        return None
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return None
    if isinstance(mask, FakeTensor) or mask.device.type == "meta":
        return None
    # Anything but a plain [batch, tokens] 0/1 mask of a decoder-only model is taken as padded: HF's
    # own logic decides (a float or 4-D mask; an encoder-decoder's decoder mask, which this does not read).
    others = any(isinstance(v, torch.Tensor) for k, v in inputs.items() if k.endswith("attention_mask")
                 and k != "attention_mask")
    if (mask.dim() != 2 or mask.is_floating_point() or mask.is_complex() or others
            or getattr(getattr(model, "config", None), "is_encoder_decoder", False)):
        return False
    return _all_ones(mask)


_last_read: tuple[Any, int, bool] | None = None  # (weak reference to the mask, its version, the answer)


def _all_ones(mask: torch.Tensor) -> bool:
    """``mask.all()``, read once per mask: ``OptimizedModel`` and its lowered step both ask of the
    same call's mask, and on a GPU each read waits for the device. The answer is kept for the
    same tensor object at the same version (an in-place write bumps it)."""
    global _last_read
    last = _last_read
    if last is not None and last[0]() is mask and last[1] == mask._version:
        return last[2]
    value = bool(mask.all())
    _last_read = (weakref.ref(mask), mask._version, value)
    return value


@contextlib.contextmanager
def assume_unpadded(value: bool | None) -> Iterator[None]:
    """Within this block, ``eager_masks`` without its own ``unpadded`` takes a call's ``attention_mask``
    as all ones when ``value`` (the planner: what :func:`unpadded` said of the real example batch)."""
    token = _ASSUMED.set(bool(value))
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def _applies(model: nn.Module, args: tuple, kwargs: dict, unpadded: bool) -> bool:
    inputs = _inputs(model, args, kwargs)
    return inputs is not None and all(inputs.get(name) is None for name in _INPUTS[1 if unpadded else 0:])


@contextlib.contextmanager
def eager_masks(model: nn.Module, args: tuple, kwargs: dict, unpadded: bool | None = None) -> Iterator[None]:
    """Within this block, HF's mask helpers decide as eager HF does for this call (see the note).
    ``unpadded``: the call's ``attention_mask`` is all ones (None: as ``assume_unpadded`` says)."""
    global _depth
    unpadded = _ASSUMED.get() if unpadded is None else unpadded
    if not _applies(model, args, kwargs, unpadded):
        token = _IGNORE_PADDING.set(False)  # HF's own logic, even inside an outer block that ignores padding
        try:
            yield
        finally:
            _IGNORE_PADDING.reset(token)
        return
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - a model with a config but no transformers
        yield
        return
    with _lock:
        if _depth == 0:
            _saved.update(find=masking_utils.find_packed_sequence_indices,
                          ignore=masking_utils._ignore_causal_mask_sdpa)
            masking_utils.find_packed_sequence_indices = _not_packed
            masking_utils._ignore_causal_mask_sdpa = _skip_without_padding
        _depth += 1
    token = _IGNORE_PADDING.set(unpadded)
    try:
        yield
    finally:
        _IGNORE_PADDING.reset(token)
        with _lock:
            _depth -= 1
            if _depth == 0:
                masking_utils.find_packed_sequence_indices = _saved["find"]
                masking_utils._ignore_causal_mask_sdpa = _saved["ignore"]


def _not_packed(position_ids: Any) -> None:
    return None  # the model's own arange: one sequence per row


def _skip_without_padding(padding_mask: Any, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
                          local_attention_size: int | None = None) -> bool:
    if padding_mask is not None and _IGNORE_PADDING.get():
        padding_mask = None  # all ones: read on the real tensor before this trace (``unpadded``)
    if padding_mask is not None or not isinstance(q_offset, int):
        return _saved["ignore"](padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)
    if local_attention_size is not None and kv_length >= local_attention_size:
        return False
    return q_length == 1 or kv_length == q_length
