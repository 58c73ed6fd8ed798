"""The optimizer registry: names, options checked before anything runs, factories the simulation counts."""

import pytest
import torch
from torch import nn

import memopt
from memopt.memory import simulate_step
from memopt.optim import OPTIMIZERS, OptimizerConfig, factory


def test_the_registry_names_todays_optimizers():
    assert {"adamw", "adam", "sgd", "sgd-momentum", "none"} <= set(OPTIMIZERS)


def test_an_unknown_optimizer_or_option_lists_the_known_ones():
    with pytest.raises(ValueError, match="adamw"):
        OptimizerConfig("lion")
    with pytest.raises(TypeError, match="betas"):
        OptimizerConfig("adamw", {"beta": 0.9})
    with pytest.raises(ValueError, match="no options"):
        factory("none")([], "cpu", {"lr": 1.0})


def test_bound_options_reach_the_optimizer_the_simulation_counts():
    batch = (torch.randn(4, 64),)
    loss = lambda out, inputs: out.sum()  # noqa: E731
    plain = simulate_step(nn.Linear(64, 64), batch, loss_fn=loss, optimizer=factory("sgd"), device="cpu")
    momentum = simulate_step(nn.Linear(64, 64), batch, loss_fn=loss, optimizer=factory("sgd", momentum=0.9),
                             device="cpu")
    assert plain.final.optimizer == 0
    assert momentum.final.optimizer == (64 * 64 + 64) * 4  # one fp32 momentum buffer per parameter


def test_optimize_refuses_an_unknown_optimizer_before_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 4))
    weight = model[0].weight
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        memopt.optimize(model, 1, (torch.ones(2, 4),), optimizer="lion", device="cpu", loss_fn=lambda o, i: o.sum())
    assert model[0].weight is weight and isinstance(model[0], nn.Linear)
