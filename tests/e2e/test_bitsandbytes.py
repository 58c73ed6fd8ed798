"""A model loaded already quantized by bitsandbytes (how QLoRA users load large models) is taken as
it is: its NF4 / FP4 / int8 bytes become memopt's quantized layers without a copy, outputs equal the
bitsandbytes model's, the methods train on it, and what memopt cannot take is refused by name.

bitsandbytes runs on CPU, so the real loader runs here: a tiny Llama saved to a temporary directory
and loaded back through transformers with a ``BitsAndBytesConfig``.
"""

from __future__ import annotations

import pytest
import torch

import memopt
from tests.models import lm_batch, tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

NF4_DQ = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(num_hidden_layers=2).save_pretrained(path)
    return path


def _load(path, **quant):
    config = transformers.BitsAndBytesConfig(**quant)
    # train(): in eval mode without grad bitsandbytes repacks its CPU weights in place for its own kernel
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").train()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_an_nf4_model_is_taken_as_it_is_equals_bitsandbytes_and_trains(saved, method):
    from bitsandbytes.nn import Linear4bit

    from memopt.passes.quantize import QuantLinear

    reference = _load(saved, **NF4_DQ)
    batch = lm_batch(reference, batch=2, seq=16)
    expected = _logits(reference, batch)
    model = _load(saved, **NF4_DQ)
    storages = {name: m.weight.data.data_ptr() for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, method=method, device="cpu")
    assert torch.equal(_logits(optimized, batch), expected)  # LoRA's B and PaCA's P start as the identity
    quantized = {name.replace(".base_layer", ""): m for name, m in optimized.model.named_modules()
                 if isinstance(m, QuantLinear)}
    assert quantized.keys() == storages.keys()
    assert all(quantized[n].qweight.data_ptr() == ptr for n, ptr in storages.items())  # the same bytes, no copy
    assert any("bitsandbytes" in note for note in optimized.plan.notes)
    # The plan counts the packed bytes: no full-precision weight of an adopted layer anywhere.
    dense = sum(m.out_features * m.in_features * 4 for m in quantized.values())
    packed = sum(m.quantized().nbytes for m in quantized.values())
    assert packed * 6 < dense
    held = optimized.plan.memory.peak.parameters + optimized.plan.memory.peak.buffers
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*optimized.model.parameters(), *optimized.model.buffers()]}
    assert held == sum(storages.values())  # exactly what the model holds: packed codes, scales, the rest
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = optimized(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


_OTHER_FORMATS = {
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32),
    "nf4-single": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4-single-bf16-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                    bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.mark.parametrize("fmt", [
    "fp4", pytest.param("nf4-single", marks=pytest.mark.slow),
    pytest.param("fp4-single-bf16-storage", marks=pytest.mark.slow), "int8"])
def test_every_bitsandbytes_format_is_taken_as_it_is_and_equals_bitsandbytes(saved, fmt):
    from memopt.passes.quantize import QuantLinear

    quant = _OTHER_FORMATS[fmt]
    reference = _load(saved, **quant)
    batch = lm_batch(reference, batch=2, seq=16)
    expected = _logits(reference, batch)  # train() mode: bitsandbytes' CPU training path for int8
    model = _load(saved, **quant)
    weights = {name: m.weight.data for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu")
    assert torch.equal(_logits(optimized, batch), expected)
    quantized = {name.replace(".base_layer", ""): m for name, m in optimized.model.named_modules()
                 if isinstance(m, QuantLinear)}
    assert quantized.keys() == weights.keys()
    for name, w in weights.items():  # the same bytes, read in place
        assert quantized[name].qweight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert quantized[name].fmt == ("int8" if fmt == "int8" else fmt[:3])
    note = next(n for n in optimized.plan.notes if "bitsandbytes" in n)
    assert ("int8" if fmt == "int8" else fmt[:3].upper()) in note
    loss = optimized(**batch).loss
    loss.backward()
    assert all(p.grad is not None for p in optimized.parameters() if p.requires_grad)


def test_a_4bit_layer_with_a_code_table_memopt_does_not_know_is_refused(saved):
    model = _load(saved, **NF4_DQ)
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    layer.weight.quant_state.code = layer.weight.quant_state.code.flip(0)
    batch = lm_batch(model, batch=2, seq=16)
    before = [type(m) for m in model.modules()]
    with pytest.raises(memopt.UnsupportedModelError, match="code table"):
        memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu")
    assert [type(m) for m in model.modules()] == before


def test_s2ft_and_quantize_on_a_bitsandbytes_model_are_refused_and_undone(saved):
    model = _load(saved, **NF4_DQ)
    batch = lm_batch(model, batch=2, seq=16)
    expected = _logits(model, batch)
    with pytest.raises(memopt.UnsupportedModelError, match="S²FT"):
        memopt.optimize(model, budget_gb=1, example_inputs=batch, method="s2ft", device="cpu")
    with pytest.raises(ValueError, match="leave quantize= unset"):
        memopt.optimize(model, budget_gb=1, example_inputs=batch, quantize="nf4", device="cpu")
    assert torch.equal(_logits(model, batch), expected)


def test_a_trained_adapter_on_a_bitsandbytes_model_saves_and_reloads(saved, tmp_path):
    model = _load(saved, **NF4_DQ)
    batch = lm_batch(model, batch=2, seq=16)
    optimized = memopt.optimize(model, budget_gb=1, example_inputs=batch, device="cpu")
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    optimized(**batch).loss.backward()
    opt.step()
    optimized.save_pretrained(tmp_path)
    reloaded = memopt.from_pretrained(_load(saved, **NF4_DQ), tmp_path)
    assert torch.equal(_logits(reloaded, batch), _logits(optimized, batch))
