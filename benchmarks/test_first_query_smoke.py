"""Keep ``first_query.py`` working: a tiny database, two fresh processes, right answers."""

from __future__ import annotations

from pathlib import Path

import first_query


def test_first_query_quick_run(tmp_path: Path) -> None:
    path = tmp_path / "db"
    first_query.build(path, 1_000)
    results = first_query.measure(path, 1_000, runs=2)  # raises if a process answers wrongly
    assert len(results) == 2
    assert all(0 < result["count_s"] <= result["both_s"] for result in results)
