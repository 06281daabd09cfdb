"""Keep ``reads.py`` working: two tiny sizes, both modes, answers cross-checked, a full report."""

from __future__ import annotations

import reads


def test_reads_quick_run() -> None:
    medians = reads.measure([1_000, 3_000], rounds=2, per_round=10)  # raises if the modes disagree
    assert all(value > 0 for value in medians.values())
    table = reads.report(medians, [1_000, 3_000])
    assert all(op in table for op in reads.OPERATIONS) and "growth" in table


def test_every_size_answers_the_same_windows() -> None:
    import random

    batches = reads.queries(random.Random(3), 50, [1_000, 1_000_000])
    small, large = batches[1_000], batches[1_000_000]
    assert [q[:2] for q in small] == [q[:2] for q in large]  # the same windows
    assert all(0 <= q[2] < 1_000 for q in small) and all(0 <= q[2] < 1_000_000 for q in large)
    # the same place in the items: an index at the same fraction of n, to within one item
    assert all(abs(a[2] / 1_000 - b[2] / 1_000_000) < 1 / 1_000 for a, b in zip(small, large, strict=True))
    assert len({q[:2] for q in small}) == 50  # drawn, not repeated
