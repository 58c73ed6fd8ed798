"""Config validation: bad values are refused with a message that says what to change."""

from __future__ import annotations

import math

import pytest
import torch

import memopt
from memopt.config import DEVICE_PRESETS, GIB, LoraConfig, OptimizeConfig, QuantizeConfig, resolve_device


@pytest.mark.parametrize("budget", [0, -1, math.inf, math.nan])
def test_budget_must_be_positive_and_finite(budget):
    with pytest.raises(ValueError, match="positive, finite number of GiB"):
        OptimizeConfig.from_options("lora", budget)


@pytest.mark.parametrize("budget", ["24", None, True])
def test_budget_must_be_a_number(budget):
    with pytest.raises(TypeError, match="budget_gb must be a number"):
        OptimizeConfig.from_options("lora", budget)


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"unknown method 'qlora'.*'lisa', 'lora', 'owlore', 'paca', 'randlora', 'rso', 's2ft'.*"
                                         r"RandLoraConfig, RsoConfig, LisaConfig, OwloreConfig"):
        OptimizeConfig.from_options("qlora", 8)


def test_unknown_option_is_an_error_not_ignored():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rnak'\].*rank"):
        OptimizeConfig.from_options("lora", 8, rnak=4)
    assert OptimizeConfig.from_options("lora", 8, r=4, lora_alpha=8).method_config.rank == 4  # PEFT's names
    with pytest.raises(TypeError, match="not both"):
        OptimizeConfig.from_options("lora", 8, r=4, rank=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(alpha=-1), "alpha must be a positive number"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
])
def test_lora_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_target_modules_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="target_modules must be"):
        LoraConfig(target_modules=[])
    with pytest.raises(TypeError, match="target_modules must be"):
        LoraConfig(target_modules=3)


def test_cuda_presets_subtract_a_reserve_and_round_blocks():
    cfg = OptimizeConfig.from_options("lora", 24, device="rtx4090")
    assert cfg.device is DEVICE_PRESETS["rtx4090"]
    assert cfg.reserve_bytes == 768 * 2**20 and cfg.usable_bytes == 24 * GIB - 768 * 2**20
    assert cfg.device.alloc_granularity == 512
    assert OptimizeConfig.from_options("lora", 24, device="rtx4090", reserve_gb=0).usable_bytes == 24 * GIB


def test_a_budget_below_the_reserve_is_refused():
    with pytest.raises(ValueError, match="leaves nothing after"):
        OptimizeConfig.from_options("lora", 0.5, device="cuda")


def test_unknown_device_lists_the_presets():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*rtx4090"):
        resolve_device("tpu")
    assert resolve_device("cuda:1").name == "cuda:1" and resolve_device("cuda:1").kind == "cuda"


def test_method_config_round_trips_through_a_dict():
    cfg = LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], exclude_modules="lm_head")
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value,expected", [
    (None, None), ("auto", "auto"), ("nf4", QuantizeConfig(format="nf4")), ("int8", QuantizeConfig(format="int8")),
    (QuantizeConfig(format="int8", block_size=128), QuantizeConfig(format="int8", block_size=128)),
])
def test_quantize_option_accepts_a_format_auto_or_a_config(value, expected):
    cfg = OptimizeConfig.from_options("paca", 8, quantize=value, rank=4)
    assert cfg.quantize == expected and cfg.method_config.rank == 4


@pytest.mark.parametrize("value,error,match", [
    ("fp4", ValueError, r"quantize must be one of \(None, 'nf4', 'int8', 'auto'\) or a memopt.QuantizeConfig, got 'fp4'"),
    ("NF4", ValueError, "got 'NF4'"),
    (True, TypeError, "quantize must be None, 'nf4', 'int8', 'auto' or a memopt.QuantizeConfig, got bool"),
    ({"format": "nf4"}, TypeError, "got dict"),
])
def test_a_bad_quantize_option_says_what_to_pass(value, error, match):
    with pytest.raises(error, match=match):
        OptimizeConfig.from_options("lora", 8, quantize=value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(format="fp4"), r"format must be one of \('nf4', 'int8'\)"),
    (dict(block_size=63), "block_size must be an even integer >= 2, got 63"),
    (dict(scaler_block_size=0), "scaler_block_size must be an even integer"),
    (dict(block_size=True), "block_size must be an even integer"),
])
def test_quantize_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizeConfig(**kwargs)


def test_quantize_config_round_trips_through_a_dict():
    cfg = QuantizeConfig(format="int8", target_modules=["q_proj"], exclude_modules="lm_head")
    assert QuantizeConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["target_modules"] == ["q_proj"]


def test_an_unknown_optimizer_is_refused_before_the_model_is_touched(monkeypatch):
    import memopt.pipeline as pipeline

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setattr(pipeline, "capture", lambda *a, **k: pytest.fail("the model was captured"))
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; choose one of \['adam', 'adamw'"):
        memopt.optimize(model, 1, torch.ones(2, 4), optimizer="lion", device="cpu")


def test_a_method_config_object_is_a_method_and_options_beside_it_override_its_fields():
    from memopt.config import PacaConfig, S2ftConfig

    cfg = OptimizeConfig.from_options(PacaConfig(rank=16, alpha=4.0), 1)
    assert cfg.method == "paca" and cfg.method_config == PacaConfig(rank=16, alpha=4.0)
    assert OptimizeConfig.from_options(PacaConfig(rank=16), 1, rank=2).method_config.rank == 2
    assert OptimizeConfig.from_options(LoraConfig(rank=4), 1, lora_alpha=2).method_config == LoraConfig(rank=4, alpha=2)
    assert OptimizeConfig.from_options(S2ftConfig(), 1).method == "s2ft"
    with pytest.raises(TypeError, match="unknown option"):
        OptimizeConfig.from_options(PacaConfig(), 1, dropout=0.1)
    with pytest.raises(ValueError, match="a method config"):
        OptimizeConfig.from_options(object(), 1)
