"""Asynchronous copies between a GPU and pinned host memory, as graph ops.

An offloaded tensor leaves the forward graph through two nodes and enters the backward through two::

    host = memopt.offload_to_host(x)            # copy out starts on the transfer stream
    host = memopt.wait_transfer(host)           # the compute stream waits for it
    ...
    y = memopt.reload_to_device(host, device)   # copy back starts (a prefetch)
    y = memopt.wait_transfer(y)                 # waited for right before y is read

One transfer stream per device carries every copy, in the order the graph issues them. Each copy
records an event that its ``wait_transfer`` makes the compute stream wait for (found by the data
pointer of the copy's result). Nothing is freed by these ops: a tensor is freed where its graph
drops it. A device source is marked used by the transfer stream (``record_stream``), so the caching
allocator gives its block to no other tensor before the copy has read it, however early the graph
drops it (Inductor may drop it right after issuing the copy; it may even compute a pointwise source
twice, once for the copy and once elsewhere); pinned host memory is guarded by torch's host
allocator, which records the copies that use it.

The ops are memopt's own (torch's ``ao.*`` ops of the same shape exist only from torch 2.13), and
run on the CPU too (synchronous copies, no streams), so a lowering with them executes in tests on
machines without a GPU.
"""

from __future__ import annotations

import torch
from torch.fx import has_side_effect

__all__ = ["offload_to_host", "reload_to_device", "wait_transfer"]

_streams: dict[torch.device, torch.cuda.Stream] = {}
_pending: dict[int, tuple[torch.cuda.Event, torch.device] | None] = {}  # a copy's result -> its completion


def _transfer_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def _copy(source: torch.Tensor, result: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy ``source`` into ``result`` on ``device``'s transfer stream after the work queued so far."""
    if result.numel() == 0:  # nothing to copy (and every empty tensor's data pointer is 0)
        return result
    if device.type != "cuda":
        result.copy_(source)
        _pending[result.data_ptr()] = None
        return result
    stream, compute = _transfer_stream(device), torch.cuda.current_stream(device)
    stream.wait_stream(compute)  # the source is complete
    with torch.cuda.stream(stream):
        result.copy_(source, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    if source.is_cuda:  # its block is not reused before the copy has read it, whoever frees it when
        source.record_stream(stream)
    _pending[result.data_ptr()] = done, device
    return result


@torch.library.custom_op("memopt::offload_to_host", mutates_args=())
def offload_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying ``tensor`` into new pinned host memory (CPU: a copy). Pair with ``wait_transfer``."""
    host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu",
                               pin_memory=tensor.device.type == "cuda")
    return _copy(tensor, host, tensor.device)


@offload_to_host.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")


@torch.library.custom_op("memopt::reload_to_device", mutates_args=())
def reload_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start copying a host tensor back into a new ``device`` tensor of its layout (the original's:
    ``offload_to_host`` keeps it). The device memory is allocated on the compute stream (its owner
    for the caching allocator)."""
    result = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
    return _copy(tensor, result, torch.device(device))


@reload_to_device.register_fake
def _(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


_lib = torch.library.Library("memopt", "FRAGMENT")
_lib.define("wait_transfer(Tensor(a) tensor) -> Tensor(a)")


@torch.library.impl("memopt::wait_transfer", "CompositeExplicitAutograd")
def _wait_transfer(tensor: torch.Tensor) -> torch.Tensor:
    """The compute stream waits for the copy that made ``tensor``."""
    if tensor.numel() == 0:
        return tensor
    try:
        done = _pending.pop(tensor.data_ptr())
    except KeyError:
        raise RuntimeError("memopt.wait_transfer: no copy is pending for this tensor (each wait_transfer "
                           "follows its offload_to_host or reload_to_device)") from None
    if done is not None:
        event, device = done
        torch.cuda.current_stream(device).wait_event(event)
    return tensor


@torch.library.register_fake("memopt::wait_transfer")
def _(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


has_side_effect(torch.ops.memopt.wait_transfer.default)


def wait_transfer(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ops.memopt.wait_transfer.default(tensor)
