"""MemoryBreakdown / MemoryReport: exact integer data that round-trips through JSON."""

import json

import pytest

from memopt.memory import Category, MemoryBreakdown, MemoryReport


def _report() -> MemoryReport:
    peak = MemoryBreakdown(parameters=1024, gradients=1024, optimizer=2056, activations=7, temporaries=1, inputs=3)
    return MemoryReport(
        device="cuda", peak_bytes=peak.total, peak=peak, peak_phase="optimizer",
        phase_peaks={"forward": 2000, "backward": 3000, "optimizer": peak.total},
        final=MemoryBreakdown(parameters=1024, optimizer=2056),
    )


def test_breakdown_total_is_the_sum_of_every_category():
    b = MemoryBreakdown(**{c.value: i + 1 for i, c in enumerate(Category)})
    assert b.total == sum(range(1, len(Category) + 1))


def test_report_round_trips_exactly_through_json():
    r = _report()
    again = MemoryReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    assert again.to_dict() == r.to_dict()


def test_report_rejects_a_peak_breakdown_that_does_not_sum_to_peak_bytes():
    with pytest.raises(ValueError, match="sums to"):
        MemoryReport(device="cpu", peak_bytes=5, peak=MemoryBreakdown(parameters=4), peak_phase="forward")


def test_breakdown_rejects_negative_or_fractional_bytes():
    with pytest.raises(ValueError, match="non-negative int"):
        MemoryBreakdown(parameters=-1)
    with pytest.raises(ValueError, match="non-negative int"):
        MemoryBreakdown(parameters=1.5)  # type: ignore[arg-type]


def test_breakdown_from_dict_names_unknown_categories():
    with pytest.raises(ValueError, match="unknown memory categories"):
        MemoryBreakdown.from_dict({"weights": 1})


def test_summary_lists_the_peak_in_gib():
    text = _report().summary()
    assert text.startswith("cuda: peak") and "optimizer" in text
