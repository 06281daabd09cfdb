"""Keep ``table_writes.py`` working: tiny runs, checking that every figure was measured (and, for the
batches, that a batch and the same calls one by one end with the same table)."""

from __future__ import annotations

import table_writes


def test_table_writes_quick_run() -> None:
    table_writes.inserts(300)
    seconds = table_writes.batches(n=400, m=50, rounds=2)  # asserts the same end state itself
    table_writes.batches(n=400, m=50, rounds=1, order="recent")
    assert set(seconds) == {(kind, way) for kind in table_writes.BATCH_KINDS for way in table_writes.WAYS}
    assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
