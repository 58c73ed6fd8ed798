"""The cost model: device presets with datasheet numbers, roofline op times, host-link copies."""

from __future__ import annotations

import dataclasses

import pytest

from memopt.config import DEVICE_PRESETS as REEXPORTED
from memopt.planner.costmodel import DEVICE_PRESETS, DeviceSpec, op_time_us, resolve_device, transfer_time_us

GIB = 2**30


def test_presets_are_the_config_presets_with_capacity_and_rates():
    assert REEXPORTED is DEVICE_PRESETS
    for name in ("rtx4090", "l4", "a100-40gb", "a100-80gb", "h100", "cpu"):
        spec = DEVICE_PRESETS[name]
        assert spec.flops_fp32 > 0 and spec.flops_bf16 > 0 and spec.memory_bandwidth > 0, name
    assert DEVICE_PRESETS["rtx4090"].memory_bytes == 24 * GIB
    assert DEVICE_PRESETS["rtx4090"].flops_bf16 == 165_200_000_000_000
    assert DEVICE_PRESETS["rtx4090"].memory_bandwidth == 1_008_000_000_000
    assert DEVICE_PRESETS["h100"].flops_bf16 == 989_400_000_000_000
    assert DEVICE_PRESETS["h100"].host_bandwidth == 64_000_000_000
    assert DEVICE_PRESETS["a100-80gb"].memory_bandwidth == 2_039_000_000_000


def test_matmul_time_is_compute_bound_at_the_dtype_peak():
    rtx = DEVICE_PRESETS["rtx4090"]
    flops = 2 * 4096 * 4096 * 4096  # one 4096^3 matmul
    assert op_time_us(rtx, flops, 3 * 4096 * 4096 * 2, "bfloat16") == -(-flops * 10**6 // rtx.flops_bf16) == 832
    # fp32 matmuls run at the fp32 peak (tf32 is off by default in torch)
    assert op_time_us(rtx, flops, 0, "float32") == -(-flops * 10**6 // rtx.flops_fp32) == 1664


def test_elementwise_time_is_bandwidth_bound_and_never_below_one_microsecond():
    rtx = DEVICE_PRESETS["rtx4090"]
    nbytes = 2 * 4096 * 4096 * 2  # read and write a 4096x4096 bf16 tensor
    assert op_time_us(rtx, 0, nbytes, "bfloat16") == -(-nbytes * 10**6 // rtx.memory_bandwidth) == 67
    assert op_time_us(rtx, 0, 512, "bfloat16") == 1
    assert op_time_us(rtx, 0, 0, None) == 0  # a view moves nothing


def test_host_copies_use_the_link_and_the_cpu_cannot_offload():
    rtx = DEVICE_PRESETS["rtx4090"]
    assert transfer_time_us(rtx, 32 * 2**20) == -(-32 * 2**20 * 10**6 // 32_000_000_000) == 1049
    assert transfer_time_us(DEVICE_PRESETS["cpu"], 2**20) == 0 and not DEVICE_PRESETS["cpu"].can_offload


def test_device_specs_round_trip_and_validate_rates():
    spec = DEVICE_PRESETS["l4"]
    assert DeviceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="integers >= 0"):
        dataclasses.replace(spec, flops_bf16=-1)
    assert resolve_device("cuda:1").flops_bf16 == DEVICE_PRESETS["cuda"].flops_bf16
