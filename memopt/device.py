"""What a target device is: its memory, its peak FLOP/s per dtype, its bandwidths, and its allocator.

``DeviceSpec`` and its presets (``DEVICE_PRESETS``: the public datasheet figures, dense) are data
the cost model (``memopt.planner.costmodel``), the memory simulation and the configuration all
read; they live at the bottom layer so that none of those imports another for them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["DeviceSpec", "DEVICE_PRESETS", "resolve_device"]

_GIB = 2**30
_MIB = 2**20
_TERA = 10**12
_GIGA = 10**9

# A CUDA context takes ~300-500 MiB before the first tensor; the caching allocator's block
# rounding and fragmentation take a few hundred MiB more. Both are outside what the tracker sees.
_CUDA_CONTEXT_BYTES = 512 * _MIB
_CUDA_ALLOCATOR_SLACK_BYTES = 256 * _MIB
# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
_CUDA_BLOCK_BYTES = 512


@dataclass(frozen=True)
class DeviceSpec:
    """The device a training step is planned for.

    ``reserve_bytes`` is subtracted from the budget for memory the tracker cannot see (device
    context, allocator slack); ``alloc_granularity`` is the allocator's rounding of every block.
    ``flops_*`` are peak dense FLOP/s per dtype, ``memory_bandwidth`` the device memory's bytes/s,
    ``host_bandwidth`` the host link's bytes/s in one direction (0: no offload to host).
    """

    name: str
    kind: str  # "cuda" | "cpu"
    memory_bytes: int | None = None
    reserve_bytes: int = 0
    alloc_granularity: int = 1
    flops_fp32: int = 0
    flops_tf32: int = 0
    flops_bf16: int = 0
    flops_fp16: int = 0
    memory_bandwidth: int = 0
    host_bandwidth: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "cpu"):
            raise ValueError(f"DeviceSpec.kind must be 'cuda' or 'cpu', got {self.kind!r}")
        if self.reserve_bytes < 0 or self.alloc_granularity < 1:
            raise ValueError("DeviceSpec.reserve_bytes must be >= 0 and alloc_granularity >= 1")
        rates = (self.flops_fp32, self.flops_tf32, self.flops_bf16, self.flops_fp16,
                 self.memory_bandwidth, self.host_bandwidth)
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in rates):
            raise ValueError("DeviceSpec FLOP/s and bandwidths must be integers >= 0 (0: unknown / none)")

    def peak_flops(self, dtype: str | None) -> int:
        """Peak FLOP/s for a matmul whose inputs are ``dtype`` ("bfloat16", "float32", ...)."""
        by_dtype = {"bfloat16": self.flops_bf16, "float16": self.flops_fp16, "float32": self.flops_fp32}
        return by_dtype.get(dtype or "", 0) or self.flops_fp32

    @property
    def can_offload(self) -> bool:
        return self.kind == "cuda" and self.host_bandwidth > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeviceSpec":
        return cls(**data)


def _cuda(name: str, memory_gib: int | None, *, fp32: float, tf32: float, bf16: float, fp16: float,
          memory_gbps: float, host_gbps: float) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        kind="cuda",
        memory_bytes=None if memory_gib is None else memory_gib * _GIB,
        reserve_bytes=_CUDA_CONTEXT_BYTES + _CUDA_ALLOCATOR_SLACK_BYTES,
        alloc_granularity=_CUDA_BLOCK_BYTES,
        flops_fp32=int(fp32 * _TERA), flops_tf32=int(tf32 * _TERA),
        flops_bf16=int(bf16 * _TERA), flops_fp16=int(fp16 * _TERA),
        memory_bandwidth=int(memory_gbps * _GIGA), host_bandwidth=int(host_gbps * _GIGA),
    )


# Datasheet figures (dense; tensor-core bf16/fp16 with fp32 accumulation):
# * RTX 4090 — NVIDIA Ada Lovelace GPU architecture whitepaper v2.1, Appendix A: 82.6 TFLOPS fp32,
#   82.6 tf32, 165.2 bf16/fp16 (fp32 accumulate); 1008 GB/s GDDR6X; PCIe 4.0 x16 (32 GB/s per
#   direction, PCI-SIG).
# * L4 — NVIDIA L4 Tensor Core GPU datasheet: 30.3 TFLOPS fp32, 60 tf32, 121 bf16/fp16 (the sheet
#   gives 120 / 242 with sparsity); 300 GB/s; PCIe 4.0 x16 (64 GB/s bidirectional).
# * A100 40GB / 80GB SXM — NVIDIA A100 datasheet: 19.5 TFLOPS fp32, 156 tf32, 312 bf16/fp16;
#   1555 GB/s (40GB HBM2) and 2039 GB/s (80GB HBM2e); PCIe 4.0 (64 GB/s bidirectional).
# * H100 SXM — NVIDIA H100 datasheet: 67 TFLOPS fp32, 494.7 tf32 and 989.4 bf16/fp16 (half the
#   sheet's with-sparsity 989 / 1979); 3.35 TB/s HBM3; PCIe 5.0 x16 (128 GB/s bidirectional).
# * "cuda" (a GPU of unknown model) is costed as an A100 80GB.
# * "cpu" — a CPU's core count is unknowable here: 0.2 TFLOPS and 20 GB/s stand for a few AVX2
#   cores; no host link (activations cannot be offloaded to where they already are).
DEVICE_PRESETS: Mapping[str, DeviceSpec] = {
    "cpu": DeviceSpec(name="cpu", kind="cpu", flops_fp32=200 * _GIGA, flops_tf32=200 * _GIGA,
                      flops_bf16=200 * _GIGA, flops_fp16=200 * _GIGA, memory_bandwidth=20 * _GIGA),
    "cuda": _cuda("cuda", None, fp32=19.5, tf32=156, bf16=312, fp16=312, memory_gbps=2039, host_gbps=32),
    "rtx4090": _cuda("rtx4090", 24, fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, memory_gbps=1008, host_gbps=32),
    "l4": _cuda("l4", 24, fp32=30.3, tf32=60, bf16=121, fp16=121, memory_gbps=300, host_gbps=32),
    "a100-40gb": _cuda("a100-40gb", 40, fp32=19.5, tf32=156, bf16=312, fp16=312, memory_gbps=1555, host_gbps=32),
    "a100-80gb": _cuda("a100-80gb", 80, fp32=19.5, tf32=156, bf16=312, fp16=312, memory_gbps=2039, host_gbps=32),
    "h100": _cuda("h100", 80, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, memory_gbps=3350, host_gbps=64),
}


def resolve_device(device: "str | DeviceSpec") -> DeviceSpec:
    """A DeviceSpec from a preset name, a torch device string ("cuda:0", "cpu") or a DeviceSpec."""
    if isinstance(device, DeviceSpec):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a preset name or a DeviceSpec, got {type(device).__name__}")
    key = device.lower()
    if key in DEVICE_PRESETS:
        return DEVICE_PRESETS[key]
    base = key.split(":")[0]
    if base in ("cuda", "cpu") and re.fullmatch(r"(cuda|cpu)(:\d+)?", key):
        return dataclasses.replace(DEVICE_PRESETS[base], name=key)
    raise ValueError(f"unknown device {device!r}; use one of {sorted(DEVICE_PRESETS)} or a DeviceSpec")
