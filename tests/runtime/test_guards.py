"""What a traced step depends on besides sizes: any change of it is a new step state."""

from __future__ import annotations

import torch
from torch import nn

from memopt.runtime.guards import step_state
from tests.models import tiny_llama


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))


def test_the_state_is_stable_when_nothing_changes():
    model = _model()
    assert step_state(model, "cpu") == step_state(model, "cpu")


def test_train_eval_a_dropout_probability_and_a_flag_each_change_the_state():
    model = _model()
    before = step_state(model, "cpu")
    model.eval()
    assert step_state(model, "cpu") != before
    model.train()
    assert step_state(model, "cpu") == before
    model[1].p = 0.2
    assert step_state(model, "cpu") != before
    model[1].p = 0.1
    model[0].enabled = False  # an adapter's flag, a plain attribute
    assert step_state(model, "cpu") != before


def test_autocast_requires_grad_and_dtype_change_the_state():
    model = _model()
    before = step_state(model, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_state(model, "cpu") != before
    model[0].weight.requires_grad_(False)
    assert step_state(model, "cpu") != before
    model[0].weight.requires_grad_(True)
    model.to(torch.float64)
    assert step_state(model, "cpu") != before


def test_an_hf_config_attention_implementation_is_part_of_the_state():
    model = tiny_llama(num_hidden_layers=1)
    before = step_state(model, "cpu")
    model.config._attn_implementation = "eager"
    assert step_state(model, "cpu") != before
