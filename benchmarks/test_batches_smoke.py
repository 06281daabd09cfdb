"""Keep ``batches.py`` working: a small namespace, two batch sizes, both key orders, trees checked."""

from __future__ import annotations

import batches


def test_batches_quick_run() -> None:
    medians = batches.measure(2_000, [50, 500], rounds=1, verify=True)  # raises if a tree is damaged
    assert set(medians) == {(order, size) for order in batches.ORDERS for size in (50, 500)}
    assert all(value > 0 for value in medians.values())
    assert "random keys" in batches.report(medians, 2_000)
