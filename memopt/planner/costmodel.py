"""The cost model: what a target device can do, and how long an op or a host copy takes on it.

Design note: a roofline, in integers. An op takes ``max(FLOPs / peak FLOP/s, bytes / memory
bandwidth)``; a copy between device and host takes ``bytes / host-link bandwidth`` on a copy engine
that runs beside compute. Times are whole microseconds (rounded up, so the smallest kernel costs
1 µs — about a launch). Peak numbers are the public datasheet figures, dense (no 2:4 sparsity);
real kernels reach a fraction of them, so predicted times are optimistic by a similar factor for
every plan — what the planner compares is relative.

``DeviceSpec`` and its presets are ``memopt.device``'s (data every layer reads); the cost model
turns them into times.

fp32 matmuls are costed at the fp32 peak, not tf32: torch's default
(``torch.backends.cuda.matmul.allow_tf32 = False``) runs them in full fp32.
"""

from __future__ import annotations

from memopt.device import DEVICE_PRESETS, DeviceSpec, resolve_device

__all__ = ["DeviceSpec", "DEVICE_PRESETS", "resolve_device", "op_time_us", "transfer_time_us"]

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def op_time_us(device: DeviceSpec, flops: int, bytes_moved: int, dtype: str | None) -> int:
    """Roofline time of one kernel in whole µs (>= 1 for any op that moves or computes anything)."""
    if flops <= 0 and bytes_moved <= 0:
        return 0
    peak = device.peak_flops(dtype)
    compute = _ceil_div(flops * 10**6, peak) if peak > 0 and flops > 0 else 0
    memory = _ceil_div(bytes_moved * 10**6, device.memory_bandwidth) if device.memory_bandwidth > 0 else 0
    return max(1, compute, memory)


def transfer_time_us(device: DeviceSpec, nbytes: int) -> int:
    """One-way device <-> host copy of ``nbytes`` in whole µs; 0 if the device has no host link."""
    if not device.can_offload or nbytes <= 0:
        return 0
    return max(1, _ceil_div(nbytes * 10**6, device.host_bandwidth))
