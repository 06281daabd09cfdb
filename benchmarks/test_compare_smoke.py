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


def test_targets_put_the_run_of_tallytree_by_itself_next_to_the_shared_run() -> None:
    """The targets table judges each target on this run and, when given, on the run of tallytree by
    itself (``measure_alone``); a target with no such figure shows a dash."""

    def measured(op: str, seconds: float, system: str = "tallytree") -> dict[str, object]:
        return {"shape": "single", "n": 1000, "op": op, "system": system, "median_s": seconds}

    shared = [measured("totals_10%", 12e-6), measured("rank", 3e-6), measured("insert_one", 100e-6)]
    alone = [measured("totals_10%", 6e-6), measured("insert_one", 40e-6)]

    def index(rows: list[dict[str, object]]) -> dict[tuple[str, int, str, str], dict[str, object]]:
        return {(m["shape"], m["n"], m["op"], m["system"]): m for m in rows}  # type: ignore[misc]

    table = compare.targets_section(index(shared), 1000, index(alone))
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "tallytree by itself" in lines["target"]
    assert lines["count + sums, 10% window"].endswith("| **not met** | 6 µs | met |")
    assert lines["insert_one"].endswith("| **not met** | 25 k/s | met |")
    assert lines["rank"].endswith("| met | - | - |")
    assert "tallytree by itself" not in compare.targets_section(index(shared), 1000)
