"""Keep ``single_writes.py`` working: a tiny run, checking that every write was measured on both
systems and that both end with the same events."""

from __future__ import annotations

import single_writes


def test_single_writes_quick_run() -> None:
    samples = single_writes.measure(n=500, commits=20, rounds=2)
    assert set(samples) == {(name, kind) for name in single_writes.SYSTEMS for kind in single_writes.KINDS}
    assert all(len(times) == 20 and min(times) > 0 for times in samples.values())
    table = single_writes.report(samples, 500)
    assert table.count("\n| ") == 5  # the header and one row per kind of write
