"""Keep ``append_points.py`` working: small trees, a few rounds, every count checked."""

from __future__ import annotations

import append_points


def test_append_points_quick_run() -> None:
    medians = append_points.measure(3_000, rounds=2, commits=70)  # raises if a count is wrong
    assert set(medians) == set(append_points.CASES)
    assert all(one > 0 and many > 0 for one, many in medians.values())
    assert "status namespace" in append_points.report(medians, 3_000)
