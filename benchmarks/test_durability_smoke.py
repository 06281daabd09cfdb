"""Keep ``durability.py`` working: a tiny run, checking that every system was measured."""

from __future__ import annotations

import durability


def test_durability_quick_run() -> None:
    samples = durability.measure(n=500, commits=20, rounds=2)
    assert set(samples) == {
        "fsync (4 KiB + fdatasync)",
        durability.RANDOM,
        durability.ORDERED,
        "tallytree durable=True",
        durability.DURABLE_ORDERED,
        "sqlite WAL synchronous=NORMAL",
        "sqlite WAL synchronous=NORMAL, time-ordered keys",
        "sqlite WAL synchronous=FULL",
        durability.FLOOR,
        durability.FLOOR_PATH,
    }
    assert all(len(times) == 20 and min(times) > 0 for times in samples.values())
    table = durability.report(samples, 500)
    assert table.count("\n| ") == 11  # the header and one row per system
