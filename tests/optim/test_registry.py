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


def test_build_keeps_to_the_plan_and_its_per_parameter_form():
    from memopt.optim import build
    from memopt.optim.lowrank import AdamW

    params = [torch.zeros(3, requires_grad=True)]
    assert isinstance(build("adamw", params, {}), torch.optim.AdamW)
    assert isinstance(build("adamw", params, {}, per_parameter=True), AdamW)
    with pytest.raises(ValueError, match="drop amsgrad"):
        build("adamw", params, {"amsgrad": True}, per_parameter=True)
    with pytest.raises(ValueError, match="cannot update one parameter at a time"):
        build("adam", params, {}, per_parameter=True)
    with pytest.raises(ValueError, match="momentum=0.5 changes the memory"):
        build("sgd-momentum", params, {"momentum": 0.9}, momentum=0.5)
    with pytest.raises(ValueError, match="counts no optimizer"):
        build("none", params, {})
