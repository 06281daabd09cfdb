"""Keep ``read_after_write.py`` working: a small namespace, a few rounds, every answer checked."""

from __future__ import annotations

import read_after_write


def test_read_after_write_quick_run() -> None:
    medians = read_after_write.measure(3_000, rounds=6)  # raises if an answer is wrong
    assert set(medians) == set(read_after_write.CASES)
    assert all(first > 0 and second > 0 for first, second in medians.values())
    assert "scattered" in read_after_write.report(medians, 3_000)
