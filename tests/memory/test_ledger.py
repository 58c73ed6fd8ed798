"""Ledger: the torch-free bookkeeping behind MemoryTracker (peaks, phases, relabel-at-peak)."""

import pytest

from memopt.memory.ledger import Ledger
from memopt.memory.report import Category


def test_peak_is_the_largest_total_seen_at_an_op_boundary():
    led = Ledger()
    a = led.new("cpu", 100, Category.TEMPORARIES)
    led.observe("forward")
    b = led.new("cpu", 50, Category.TEMPORARIES)
    led.observe("forward")
    led.free(a)
    led.free(b)
    led.observe("backward")
    r = led.report("cpu")
    assert (r.peak_bytes, r.peak_phase, dict(r.phase_peaks)) == (150, "forward", {"forward": 150, "backward": 0})
    assert r.final.total == 0


def test_relabel_after_the_peak_moves_bytes_of_storages_alive_at_the_peak():
    led = Ledger()
    early = led.new("cpu", 10, Category.TEMPORARIES)
    led.observe("backward")  # peak: 10 temporaries
    late = led.new("cpu", 1, Category.TEMPORARIES)  # born after the peak
    led.relabel(early, Category.GRADIENTS)
    led.relabel(late, Category.GRADIENTS)
    r = led.report("cpu")
    assert r.peak.gradients == 10 and r.peak.temporaries == 0
    assert r.final.gradients == 11


def test_relabel_before_the_peak_is_already_in_the_peak_snapshot():
    led = Ledger()
    s = led.new("cpu", 10, Category.TEMPORARIES)
    led.relabel(s, Category.ACTIVATIONS)
    led.observe("forward")
    assert led.report("cpu").peak.activations == 10


def test_resize_after_the_peak_keeps_the_peak_total_and_category():
    led = Ledger()
    s = led.new("cpu", 10, Category.TEMPORARIES)
    led.observe("forward")
    led.resize(s, 4)
    led.relabel(s, Category.OPTIMIZER)
    r = led.report("cpu")
    assert (r.peak_bytes, r.peak.temporaries, r.final.optimizer) == (10, 10, 4)


def test_round_to_rounds_every_storage_up():
    led = Ledger(round_to=512)
    led.new("cuda", 1, Category.PARAMETERS)
    led.new("cuda", 512, Category.PARAMETERS)
    led.new("cuda", 0, Category.PARAMETERS)
    led.observe("forward")
    assert led.report("cuda").peak.parameters == 1024


def test_devices_are_counted_separately():
    led = Ledger()
    led.new("cpu", 3, Category.INPUTS)
    led.new("meta", 5, Category.INPUTS)
    led.observe("forward")
    assert (led.report("cpu").peak_bytes, led.report("meta").peak_bytes) == (3, 5)


def test_round_to_must_be_a_positive_int():
    with pytest.raises(ValueError, match="round_to"):
        Ledger(round_to=0)
