"""Keep ``batches.py`` working: a small namespace, two batch sizes, both key orders and both ways of
deleting, trees checked."""

from __future__ import annotations

import batches


def test_batches_quick_run() -> None:
    medians = batches.measure(2_000, [50, 500], rounds=1, verify=True)  # raises if a tree is damaged
    kinds = batches.ORDERS + batches.DELETES
    assert set(medians) == {(kind, size) for kind in kinds for size in (50, 500)}
    assert all(value > 0 for value in medians.values())
    report = batches.report(medians, 2_000)
    assert "random keys" in report
    assert "delete_many" in report
