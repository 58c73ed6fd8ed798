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
inputs; a call with an ``attention_mask`` or explicit position ids traces HF's own logic unchanged.
The planner, the simulation and the runtime all trace under it, so the plan and the lowered step
see the same program.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Iterator

from torch import nn

__all__ = ["eager_masks"]

_INPUTS = ("attention_mask", "position_ids", "cache_position")
_lock = threading.Lock()
_depth = 0
_saved: dict[str, Any] = {}


def _applies(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    if getattr(model, "config", None) is None or not hasattr(model, "get_input_embeddings"):
        return False
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return False
    if "input_ids" not in bound and "inputs_embeds" not in bound:
        return False
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    return all(bound.get(name) is None and extra.get(name) is None for name in _INPUTS)


@contextlib.contextmanager
def eager_masks(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[None]:
    """Within this block, HF's mask helpers decide as eager HF does for this call (see the note)."""
    global _depth
    if not _applies(model, args, kwargs):
        yield
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
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                masking_utils.find_packed_sequence_indices = _saved["find"]
                masking_utils._ignore_causal_mask_sdpa = _saved["ignore"]


def _not_packed(position_ids: Any) -> None:
    return None  # the model's own arange: one sequence per row


def _skip_without_padding(padding_mask: Any, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
                          local_attention_size: int | None = None) -> bool:
    if padding_mask is not None or not isinstance(q_offset, int):
        return _saved["ignore"](padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)
    if local_attention_size is not None and kv_length >= local_attention_size:
        return False
    return q_length == 1 or kv_length == q_length
