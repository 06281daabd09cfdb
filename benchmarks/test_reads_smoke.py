"""Keep ``reads.py`` working: two tiny sizes, both modes, answers cross-checked, a full report."""

from __future__ import annotations

import reads


def test_reads_quick_run() -> None:
    medians = reads.measure([1_000, 3_000], rounds=2, per_round=10)  # raises if the modes disagree
    assert all(value > 0 for value in medians.values())
    table = reads.report(medians, [1_000, 3_000])
    assert all(op in table for op in reads.OPERATIONS) and "growth" in table
