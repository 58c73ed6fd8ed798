"""Trained work is never lost: save what was trained, reload it on a fresh base, in PEFT's format
for LoRA; merge without losing the trained model; the adapters off on demand.

The user's way: train a few steps in a plain loop, ``save_pretrained``, then in a *new process*
build the base model again and ``memopt.from_pretrained`` it; outputs must be equal.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memopt
from tests.models import lm_batch, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _base(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    """The same weights for the same seed (the factories seed themselves); another seed, others."""
    model = tiny_llama(num_hidden_layers=2) if kind == "llama" else tiny_gpt2(n_layer=2)
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3)
    return model.eval()


def _trained(method: str, kind: str = "llama", **options) -> tuple[memopt.OptimizedModel, dict, torch.nn.Module]:
    """An optimized model trained 3 steps, its batch, and an untouched copy of its base."""
    base = _base(kind)
    fresh = copy.deepcopy(base)
    batch = lm_batch(base, batch=2, seq=16)
    optimized = memopt.optimize(base, budget_gb=1, example_inputs=batch, method=method, device="cpu", **options)
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    optimized.train()
    for _ in range(3):
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return optimized.eval(), batch, fresh


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method,options", [
    ("lora", {}), ("paca", {}), ("s2ft", {}),
    pytest.param("lora", {"quantize": "nf4"}, id="qlora", marks=pytest.mark.slow),
    pytest.param("paca", {"quantize": "int8"}, id="qpaca", marks=pytest.mark.slow),
], ids=["lora", "paca", "s2ft", "qlora", "qpaca"])
def test_a_reload_on_a_fresh_base_gives_the_trained_outputs_exactly(method, options, tmp_path):
    optimized, batch, fresh = _trained(method, **options)
    optimized.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "plan.json" in files and "memopt_config.json" in files
    assert not any(name.startswith("model") for name in files)  # never the frozen base weights
    reloaded = memopt.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(_logits(reloaded, batch), _logits(optimized, batch))
    assert reloaded.plan.to_dict() == optimized.plan.to_dict()  # the saved plan, carried out
    # Only what trained (and the method's indices) is written: no frozen weight.
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / ("adapter_model.safetensors" if method == "lora" else "memopt_model.safetensors"))
    trainable = sum(p.numel() for p in optimized.parameters() if p.requires_grad)
    floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert floats == trainable and all(t.dtype == torch.long for t in tensors.values() if not t.is_floating_point())


def test_a_new_process_reloads_every_method_and_keeps_training(tmp_path):
    """save → reload in a fresh Python process (nothing shared but the directory)."""
    for method in ("lora", "paca", "s2ft"):
        optimized, batch, _ = _trained(method)
        optimized.save_pretrained(tmp_path / method)
        torch.save({"batch": batch, "logits": _logits(optimized, batch)}, tmp_path / method / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch, memopt
        sys.path.insert(0, {str(ROOT)!r})
        from tests.models import tiny_llama
        for method in ("lora", "paca", "s2ft"):
            torch.manual_seed(0)
            base = tiny_llama(num_hidden_layers=2).eval()
            directory = {str(tmp_path)!r} + "/" + method
            expected = torch.load(directory + "/expected.pt")
            model = memopt.from_pretrained(base, directory).eval()
            with torch.no_grad():
                assert torch.equal(model(**expected["batch"]).logits, expected["logits"]), method
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            model(**expected["batch"]).loss.backward(); opt.step()
            print(method, "ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["lora", "ok", "paca", "ok", "s2ft", "ok"]


def test_a_new_process_reloads_the_fused_head_and_loss_as_planned(tmp_path):
    """A plan made with cut cross-entropy (and MLPs in pieces) reloads as that step: the head and the
    loss fused again in as many pieces, no re-plan, the simulated step peaking at the saved prediction
    and the loss and gradients of the saved model. (It used to reload unfused: real logits, 2.6x the
    predicted peak, and a plan still saying "fused".)"""
    base = tiny_llama(num_hidden_layers=2, vocab_size=4096)
    fresh = copy.deepcopy(base)
    batch = lm_batch(base, batch=2, seq=64)
    optimized = memopt.optimize(base, budget_gb=1, example_inputs=batch, method="lora", device="cpu",
                                cut_cross_entropy=True, chunk_sequence=4)
    plan = optimized.plan
    assert plan.cut_cross_entropy is not None and plan.cut_cross_entropy > 1 and plan.sequence_chunks == 4
    opt = torch.optim.AdamW([p for p in optimized.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimized(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    optimized.save_pretrained(tmp_path)
    loss = optimized(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in optimized.model.named_parameters() if p.requires_grad}
    torch.save({"batch": batch, "loss": loss.detach(), "grads": grads}, tmp_path / "expected.pt")
    del fresh
    script = textwrap.dedent(f"""
        import sys, torch, memopt
        sys.path.insert(0, {str(ROOT)!r})
        from memopt.memory.simulate import simulate_step
        from memopt.optim import factory
        from memopt.passes import cut_ce, seq_chunk
        from tests.models import tiny_llama
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = memopt.from_pretrained(tiny_llama(num_hidden_layers=2, vocab_size=4096), {str(tmp_path)!r})
        print(cut_ce.pieces(model.model), model.plan.cut_cross_entropy, seq_chunk.installed(model.model))
        out = model(**expected["batch"])
        out.loss.backward()
        torch.testing.assert_close(out.loss.detach(), expected["loss"], rtol=1e-6, atol=0)
        for name, p in model.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, expected["grads"][name], rtol=1e-5, atol=1e-7)
        print("replans", len(model.replans), "logits made", isinstance(out.logits, torch.Tensor))
        peak = simulate_step(model, expected["batch"], optimizer=factory("adamw"), device="cpu").peak_bytes
        print("peak", peak == model.plan.predicted_peak_bytes, peak <= model.plan.usable_bytes)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pieces = plan.cut_cross_entropy
    assert done.stdout.split() == [str(pieces), str(pieces), "4", "replans", "0", "logits", "made", "False",
                                   "peak", "True", "True"]


def test_a_plan_file_from_before_the_field_says_its_fusion_in_a_note():
    plan = memopt.Plan.from_json(_a_plan_json())
    data = plan.to_dict()
    del data["cut_cross_entropy"]
    data["notes"] = ["cut cross-entropy: the LM head and the loss fused (8 pieces of tokens at a time; no "
                     "[tokens, vocab] logits)"]
    assert memopt.Plan.from_dict(data).cut_cross_entropy == 8
    data["notes"] = ["cut cross-entropy not applied: cut_cross_entropy=False; the step makes the whole logits"]
    assert memopt.Plan.from_dict(data).cut_cross_entropy is None


def _a_plan_json() -> str:
    model = tiny_llama(num_hidden_layers=1)
    return memopt.optimize(model, budget_gb=1, example_inputs=lm_batch(model, batch=1, seq=8), method="lora",
                           device="cpu").plan.to_json()


@pytest.mark.parametrize("kind", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_peft_loads_a_memopt_lora_and_memopt_loads_a_peft_one(kind, tmp_path):
    peft = pytest.importorskip("peft")
    optimized, batch, fresh = _trained("lora", kind)
    other = copy.deepcopy(fresh)
    optimized.save_pretrained(tmp_path / "memopt")
    config = json.loads((tmp_path / "memopt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (kind == "gpt2")
    by_peft = peft.PeftModel.from_pretrained(fresh, tmp_path / "memopt").eval()
    expected = _logits(optimized, batch)
    assert torch.equal(_logits(by_peft, batch), expected)
    # And back: PEFT's own directory (no plan in it) planned for the budget and batch given.
    by_peft.save_pretrained(tmp_path / "peft")
    reloaded = memopt.from_pretrained(other, tmp_path / "peft", budget_gb=1, example_inputs=batch).eval()
    assert torch.equal(_logits(reloaded, batch), expected)


def test_the_inner_models_save_pretrained_writes_what_reloads(tmp_path, caplog):
    """HF's own save_pretrained on the rewritten model used to write adapter key names that its
    from_pretrained ignored (random weights on reload); it now writes memopt's directory."""
    optimized, batch, fresh = _trained("lora")
    with caplog.at_level("WARNING", logger="memopt"):
        optimized.model.save_pretrained(tmp_path)
    assert "writes only the trained tensors" in caplog.text
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(_logits(memopt.from_pretrained(fresh, tmp_path).eval(), batch), _logits(optimized, batch))


def test_loading_onto_another_base_or_from_a_broken_directory_names_the_problem(tmp_path):
    optimized, batch, _ = _trained("paca")
    optimized.save_pretrained(tmp_path / "paca")
    with pytest.raises(memopt.MemoptError, match=r"base weight of 'model\.layers\.0\..*differs"):
        memopt.from_pretrained(_base(seed=1), tmp_path / "paca")
    other = _base()
    other.model.layers = other.model.layers[:1]  # one layer fewer: no place for layer 1's tensors
    other.config.num_hidden_layers = 1
    with pytest.raises(memopt.MemoptError, match="model.layers.1"):
        memopt.from_pretrained(other, tmp_path / "paca")
    (tmp_path / "paca" / "memopt_model.safetensors").unlink()
    with pytest.raises(memopt.MemoptError, match="missing memopt_model.safetensors"):
        memopt.from_pretrained(_base(), tmp_path / "paca")
    with pytest.raises(memopt.MemoptError, match="neither"):
        memopt.from_pretrained(_base(), tmp_path)


def test_a_peft_adapter_type_memopt_lacks_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    with pytest.raises(memopt.MemoptError, match="PEFT IA3 adapter.*LORA"):
        memopt.from_pretrained(_base(), tmp_path, budget_gb=1, example_inputs=lm_batch(_base(), batch=2, seq=16))


def test_a_failed_load_leaves_the_base_model_as_it_was(tmp_path):
    optimized, _, _ = _trained("s2ft")
    optimized.save_pretrained(tmp_path)
    other = _base(seed=1)
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(memopt.MemoptError):
        memopt.from_pretrained(other, tmp_path)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", ["lora", "paca", pytest.param("s2ft", marks=pytest.mark.slow)])
def test_disable_adapter_gives_the_base_models_function(method):
    optimized, batch, fresh = _trained(method)
    trained = _logits(optimized, batch)
    with optimized.disable_adapter():
        off = _logits(optimized, batch)
    torch.testing.assert_close(off, _logits(fresh, batch), rtol=1e-5, atol=1e-5)  # S²FT/PaCA: permuted GEMM order
    assert not torch.allclose(off, trained)
    assert torch.equal(_logits(optimized, batch), trained)  # back on after the block


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow),
                                    pytest.param("paca", marks=pytest.mark.slow), "s2ft"])
def test_merge_can_leave_the_trained_model_intact(method):
    optimized, batch, _ = _trained(method)
    trained = _logits(optimized, batch)
    merged = memopt_merge = optimized.merge(inplace=False)
    torch.testing.assert_close(_logits(merged.eval(), batch), trained, rtol=1e-5, atol=1e-5)
    assert memopt_merge is not optimized.model
    assert torch.equal(_logits(optimized, batch), trained)  # still the trained, trainable model
    assert any(p.requires_grad for p in optimized.parameters())
    assert all(p.requires_grad for p in merged.parameters())  # the flags the base model had


def test_merging_two_updates_of_one_shared_weight_is_refused():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)
            self.b.weight = self.a.weight  # tied: one weight, two layers

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).sum()

    optimized = memopt.optimize(Shared(), budget_gb=1, example_inputs=(torch.randn(4, 16),), method="lora",
                                device="cpu", loss_fn=lambda out, _: out)
    with pytest.raises(memopt.MemoptError, match="a and b"):
        optimized.merge(inplace=False)
    with pytest.raises(memopt.MemoptError, match="a and b"):
        optimized.merge()


@pytest.mark.slow  # a costly scenario: make test-all
def test_peft_configs_and_peft_option_names_are_accepted():
    peft = pytest.importorskip("peft")
    base = _base()
    batch = lm_batch(base, batch=2, seq=16)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    optimized = memopt.optimize(base, budget_gb=1, example_inputs=batch, method=config, device="cpu")
    adapted = [d.name for d in optimized.plan.modules if d.trainable_params]
    assert adapted and all(n.endswith(("q_proj", "v_proj")) for n in adapted)
    assert optimized.plan.method_config["rank"] == 4 and optimized.plan.method_config["alpha"] == 8
    same = memopt.optimize(_base(), budget_gb=1, example_inputs=batch, method="lora", device="cpu",
                           r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert same.plan.method_config == optimized.plan.method_config
    with pytest.raises(TypeError, match="use_dora"):
        memopt.optimize(_base(), budget_gb=1, example_inputs=batch, device="cpu",
                        method=peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))

    # PEFT's defaults: LoraConfig() adapts what get_peft_model adapts on this architecture, at its r and alpha.
    defaults = memopt.optimize(_base(), budget_gb=1, example_inputs=batch, device="cpu", method=peft.LoraConfig())
    by_peft = peft.get_peft_model(_base(), peft.LoraConfig())
    peft_adapted = sorted(n.removeprefix("base_model.model.") for n, m in by_peft.named_modules()
                          if hasattr(m, "lora_A") and n.count("lora_") == 0)
    assert sorted(d.name for d in defaults.plan.modules if d.trainable_params) == peft_adapted
    assert (defaults.plan.method_config["rank"], defaults.plan.method_config["alpha"]) == (8, 8)
    native = memopt.LoraConfig()
    assert (native.rank, native.alpha) == (peft.LoraConfig().r, peft.LoraConfig().lora_alpha)
    with pytest.raises(TypeError, match="no default targets.*target_modules="):
        memopt.optimize(torch.nn.Sequential(torch.nn.Linear(4, 4)), budget_gb=1, example_inputs=torch.ones(2, 4),
                        device="cpu", method=peft.LoraConfig())


def test_a_model_already_wrapped_by_peft_is_refused_with_the_way_to_pass_it():
    peft = pytest.importorskip("peft")
    base = _base()
    batch = lm_batch(base, batch=2, seq=16)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"wrapped by PEFT.*method=peft_config.*from_pretrained"):
        memopt.optimize(wrapped, budget_gb=1, example_inputs=batch, device="cpu")
    with pytest.raises(TypeError, match="wrapped by PEFT"):  # its inner model too
        memopt.optimize(wrapped.base_model.model, budget_gb=1, example_inputs=batch, device="cpu")


@pytest.mark.slow  # a re-plan on reload; the checksum refusal is in test_loading_onto_another_base_...
def test_a_base_cast_to_another_dtype_loads_and_another_frozen_weight_is_caught(tmp_path):
    optimized, batch, fresh = _trained("lora")
    optimized.save_pretrained(tmp_path)
    other = copy.deepcopy(fresh)
    cast = memopt.from_pretrained(fresh.to(torch.bfloat16), tmp_path).eval()  # a dtype cast is no other model
    torch.testing.assert_close(_logits(cast, batch).float(), _logits(optimized, batch), rtol=0.05, atol=0.05)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)  # not adapted, but part of the base the adapters were trained with
    with pytest.raises(memopt.MemoptError, match="other frozen weights"):
        memopt.from_pretrained(other, tmp_path)


@pytest.mark.slow
def test_saving_another_method_into_the_same_directory_leaves_no_stale_files(tmp_path):
    _trained("lora")[0].save_pretrained(tmp_path)
    _trained("paca")[0].save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists() and not (tmp_path / "adapter_model.safetensors").exists()


def test_peft_settings_memopt_lacks_are_named_in_configs_and_directories(tmp_path):
    peft = pytest.importorskip("peft")
    base = _base()
    batch = lm_batch(base, batch=2, seq=16)
    for setting in (dict(init_lora_weights="pissa"), dict(lora_bias=True)):
        with pytest.raises(TypeError, match=next(iter(setting))):
            memopt.optimize(_base(), budget_gb=1, example_inputs=batch, device="cpu",
                            method=peft.LoraConfig(r=4, target_modules=["q_proj"], **setting))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        alpha_pattern={"v_proj": 32}))
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(memopt.MemoptError, match="alpha_pattern"):
        memopt.from_pretrained(_base(), tmp_path, budget_gb=1, example_inputs=batch)
