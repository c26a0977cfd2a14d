"""The ETA of ``hardneg grid``'s progress lines."""

import pytest

from experiments.grid.progress import estimate_eta, format_seconds


def test_eta_from_finished_cells():
    # Cells take 100 s; 2 slots; 1 running for 30 s, 3 not started: (70 + 300) / 2.
    assert estimate_eta(pending=3, running=[(30.0, 0.5)], durations=[90.0, 100.0, 110.0], slots=2) == pytest.approx(185.0)
    # Never less than what the slowest running cell still needs.
    assert estimate_eta(pending=0, running=[(10.0, None), (90.0, None)], durations=[100.0], slots=2) == pytest.approx(90.0)
    assert estimate_eta(pending=0, running=[], durations=[100.0], slots=2) == 0.0


def test_eta_before_any_cell_finished():
    assert estimate_eta(pending=4, running=[(20.0, None)], durations=[], slots=2) is None
    assert estimate_eta(pending=4, running=[(20.0, 0.01)], durations=[], slots=2) is None  # too early to extrapolate
    # 40 s for a quarter of training: a cell takes 160 s; (120 + 4 * 160) / 2.
    assert estimate_eta(pending=4, running=[(40.0, 0.25)], durations=[], slots=2) == pytest.approx(380.0)


def test_format_seconds():
    assert [format_seconds(s) for s in (None, 5, 65, 3725)] == ["?", "5s", "1m05s", "1h02m"]
