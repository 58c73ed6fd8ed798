"""normalize_inputs: every accepted spelling of example inputs becomes (args, kwargs)."""

import pytest
import torch

from memopt.memory import normalize_inputs

X = torch.zeros(2)


@pytest.mark.parametrize(
    "given, expected",
    [
        ((X, 3), ((X, 3), {})),
        ([X], ((X,), {})),
        ({"input_ids": X}, ((), {"input_ids": X})),
        (((X,), {"mask": X}), ((X,), {"mask": X})),
        (X, ((X,), {})),
    ],
)
def test_normalize_inputs_accepts_args_kwargs_and_pairs(given, expected):
    args, kwargs = normalize_inputs(given)
    assert len(args) == len(expected[0]) and all(a is b for a, b in zip(args, expected[0]))
    assert kwargs.keys() == expected[1].keys()


def test_normalize_inputs_says_what_it_accepts():
    with pytest.raises(TypeError, match="tuple of positional args"):
        normalize_inputs(3)
