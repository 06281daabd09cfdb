"""Keep ``compare.py`` working: run it in ``--quick`` mode into a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import compare


def test_compare_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = tmp_path / "RESULTS.md"
    status = compare.main(["--quick", "--quiet", "--out", str(out), "--report", str(report)])
    assert status == 0, "compare.py reported failed cross-checks"
    runs = list(out.glob("run-*.json"))
    assert len(runs) == 1
    result = json.loads(runs[0].read_text())
    assert result["cross_checks"]["passed"] is True
    assert result["cross_checks"]["failures"] == []
    assert result["cross_checks"]["compared"] > 1_000
    assert result["sizes"] == list(compare.QUICK_SIZES)
    measured = {(m["system"], m["op"]) for m in result["measurements"]}
    for system in ("tallytree", "sqlite", "sortedcontainers", "lmdb-scan"):
        for op in ("load", "count_10%", "totals_10%", "rank", "select", "buckets_30d", "insert_one"):
            assert (system, op) in measured, (system, op)
    for measurement in result["measurements"]:
        assert measurement["median_s"] > 0
        assert measurement["p90_s"] >= measurement["median_s"]
    for name, info in result["systems"].items():
        assert info["available"] or info["reason"], f"{name} skipped without saying why"
    text = report.read_text()
    assert "Cross-checks: **all passed**" in text
    assert "## Headline" in text
    assert "Growth exponent" in text
    if compare.plotting_available():
        assert (out / "latency-overview.png").stat().st_size > 0
        assert (out / "latency-count_10pct.png").stat().st_size > 0
