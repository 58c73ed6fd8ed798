"""Trainable int8 weights: the gradient is the dense layer's at the dequantized W, the handle holds no
memory through casts and state dicts, stochastic rounding is unbiased, and memopt's optimizers
update the fp32 copy and write it back as a reference written here does."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn

from memopt.optim.lowrank import AdamW, GaLoreAdamW
from memopt.passes.int8train import GROUP, Int8TrainLinear, dequantize, int8_master, is_handle, requantize


def _layer(out=48, inp=512, bias=True, seed=0):
    torch.manual_seed(seed)
    return Int8TrainLinear.from_linear(nn.Linear(inp, out, bias=bias))


def test_the_gradient_is_the_dense_layers_at_the_dequantized_weight():
    layer = _layer()
    dense = nn.Linear(512, 48)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float32))
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 512, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_the_handle_holds_no_memory_through_casts_and_state_dicts():
    layer = _layer()
    assert is_handle(layer.weight) and layer.weight.untyped_storage().nbytes() == 4 and int8_master(layer.weight) is layer
    assert layer.qweight.dtype == torch.int8 and layer.qscales.shape == (48, 512 // GROUP)
    layer.to(torch.bfloat16)
    assert is_handle(layer.weight) and layer.weight.dtype == torch.bfloat16 and layer.qscales.dtype == torch.float32
    assert int8_master(layer.weight) is layer and layer.weight.requires_grad
    state = layer.state_dict()
    assert "weight" not in state and set(state) == {"qweight", "qscales", "bias"}
    other = _layer(seed=1).to(torch.bfloat16)
    other.load_state_dict(state)
    assert torch.equal(other.qweight, layer.qweight) and torch.equal(other.qscales, layer.qscales)
    narrow = _layer(inp=40)  # not a multiple of the group: one group per row
    assert narrow.qscales.shape == (48, 1)


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    torch.manual_seed(0)
    w = torch.randn(8, 256) * 0.02
    draws = []
    for seed in range(400):
        codes, scales = requantize(w, torch.Generator().manual_seed(seed))
        step = scales[:, :, None].expand(8, 1, 256).reshape(8, 256)
        deq = dequantize(codes, scales, torch.float32)
        assert torch.all((deq - w).abs() <= step * (1 + 1e-5))  # floor or ceil of w / step
        draws.append(deq)
    mean = torch.stack(draws).mean(0)
    # the mean of 400 draws: within 4 standard errors (≤ step / 2 / sqrt(400)) of w
    assert torch.all((mean - w).abs() <= 4 * step / 2 / 20)
    nearest = torch.round(w / step) * step
    assert (mean - w).abs().mean() < 0.5 * (nearest - w).abs().mean()  # round-to-nearest is biased per weight


@pytest.mark.parametrize("cls, options", [(AdamW, {}), (GaLoreAdamW, {"rank": 4, "update_proj_gap": 2})])
def test_the_optimizer_updates_an_fp32_copy_and_writes_it_back_by_stochastic_rounding(cls, options):
    layer = _layer(bias=False)
    dense = nn.Parameter(layer.dequantized_weight(torch.float32))  # the reference: the same update on W itself
    opt, ref = cls([layer.weight], lr=1e-2, **options), cls([dense], lr=1e-2, **options)
    for step in range(1, 4):
        grad = torch.randn(48, 512, generator=torch.Generator().manual_seed(step))
        layer.weight.grad, dense.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        codes, scales = requantize(dense.detach(), torch.Generator().manual_seed(zlib.crc32(f"int8:0:{step}".encode())))
        assert torch.equal(layer.qweight, codes) and torch.equal(layer.qscales, scales)
        with torch.no_grad():
            dense.copy_(dequantize(codes, scales, torch.float32))  # what the int8 weight now holds
    assert is_handle(layer.weight)
