"""Per-module details are typed per method, read like a mapping, and read back from a plan file as
the same type (files before typed details included)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from memopt.passes import (
    DETAILS,
    LoraDetails,
    ModuleDecision,
    ModuleDetails,
    PacaDetails,
    QuantizeDetails,
    S2ftDetails,
    details_kind,
)


def _decision(method: str, details) -> ModuleDecision:
    return ModuleDecision(name="layers.0.q", role="q", method=method, in_features=8, out_features=8,
                          trainable_params=0, details=details)


def test_details_read_as_a_mapping_of_the_fields_that_are_set():
    lora = LoraDetails(rank=4, alpha=8.0, dropout=0.0, block=2)
    assert dict(lora) == {"block": 2, "rank": 4, "alpha": 8.0, "dropout": 0.0}
    assert lora["rank"] == 4 and lora.get("seed") is None and "quantized_bytes" not in lora
    with pytest.raises(KeyError):
        lora["seed"]
    with pytest.raises(TypeError):
        LoraDetails(rank=4)  # alpha and dropout are a LoRA layer's, not optional
    assert {LoraDetails, PacaDetails, S2ftDetails, QuantizeDetails} <= set(DETAILS.values())


def test_a_decision_round_trips_with_its_details_type():
    for method, details in [("lora+nf4", LoraDetails(rank=4, alpha=8.0, dropout=0.1, block=0, quantized_bytes=36,
                                                      dense_bytes=256, last_block=8)),
                            ("paca", PacaDetails(rank=2, selection="random", scaling=1.0, seed=7, block=1)),
                            ("s2ft", S2ftDetails(unit="head", ratio=0.1, selected=1, of=4, seed=0, permuted=True,
                                                 target="o", axis="columns", slice=(0, 2), block=0)),
                            ("quantize-int8", QuantizeDetails(format="int8", bytes=96, dense_bytes=256)),
                            ("frozen", ModuleDetails(block=3))]:
        decision = _decision(method, details)
        data = decision.to_dict()
        assert data["details"]["kind"] == details.kind and "kind" not in details
        assert ModuleDecision.from_dict(data) == decision and type(ModuleDecision.from_dict(data).details) is type(details)


def test_untyped_details_are_read_into_their_methods_type():
    """A plan file before typed details (v4), and a pass that gives a plain mapping."""
    s2ft_frozen = {"block": 1, "unit": "head", "ratio": 0.1, "selected": 0, "of": 4, "seed": 0, "permuted": False}
    assert type(_decision("frozen", s2ft_frozen).details) is S2ftDetails  # S²FT's frozen layers keep their draw
    assert type(_decision("frozen", {"block": 1}).details) is ModuleDetails
    quantized = _decision("lora+nf4", {"rank": 4, "alpha": 8, "dropout": 0.0, "block": 0, "quantized_bytes": 3,
                                       "dense_bytes": 9})
    assert quantized.details == LoraDetails(rank=4, alpha=8, dropout=0.0, block=0, quantized_bytes=3, dense_bytes=9)
    assert type(_decision("quantize-nf4", {"format": "nf4", "bytes": 3, "dense_bytes": 9}).details) is QuantizeDetails


def test_details_no_type_holds_are_refused_naming_the_way_out():
    with pytest.raises(ValueError, match="'foo'.*ModuleDetails subclass registered with memopt.passes.details_kind"):
        _decision("mine", {"foo": 1})
    with pytest.raises(ValueError, match="unknown details kind 'mine'; the kinds are"):
        ModuleDetails.from_dict({"kind": "mine"})
    with pytest.raises(ValueError, match="lora details have no field\\(s\\) 'seed'"):
        ModuleDetails.from_dict({"kind": "lora", "rank": 1, "alpha": 1, "dropout": 0, "seed": 3})


def test_a_pass_of_ones_own_registers_its_details():
    @details_kind
    @dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
    class SketchDetails(ModuleDetails):
        kind: ClassVar[str] = "sketch-test"
        width: int

    try:
        decision = _decision("sketch-test", {"width": 3, "block": 0})
        assert decision.details == SketchDetails(width=3, block=0)
        assert ModuleDecision.from_dict(decision.to_dict()) == decision
        with pytest.raises(ValueError, match="already"):
            details_kind(dataclasses.make_dataclass("Other", [], bases=(ModuleDetails,), namespace={"kind": "sketch-test"}, eq=False,
                                                    frozen=True))
    finally:
        DETAILS.pop("sketch-test")


def test_details_of_the_wrong_type_or_shape_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="layer details field 'block' must be int \\| None, got 'zero'"):
        ModuleDetails.from_dict({"kind": "layer", "block": "zero"})
    with pytest.raises(TypeError, match="details must be an object, got list"):
        ModuleDetails.from_dict([1, 2])
    with pytest.raises(ValueError, match="lora details: missing 3 required keyword-only arguments"):
        ModuleDetails.from_dict({"kind": "lora", "block": 0})
    with pytest.raises(ValueError, match="'rank' must be int"):
        LoraDetails(rank=True, alpha=1.0, dropout=0.0)
