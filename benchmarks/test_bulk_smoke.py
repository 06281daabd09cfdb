"""Keep ``bulk.py`` working: every part, on tiny sizes."""

from __future__ import annotations

import re

import bulk
import pytest


def test_bulk_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    bulk.main(["--n", "3000", "--rounds", "1", "--stream", "3000", "--attach", "2000", "--csv", "2000"])
    out = capsys.readouterr().out
    kernels = r"with the C kernels \(pure Python [\d,]+"
    assert re.search(r"build sorted, int keys, int ids, n=3,000: [\d,]+ items/s " + kernels, out)
    assert "build sorted, datetime keys, str ids, n=3,000" in out
    assert re.search(r"from a generator, n=3,000: .* peak RSS [\d,]+ MiB", out)
    assert re.search(r"attach to a table of 2,000: [\d,]+ documents/s " + kernels, out)
    assert re.search(r"from CSV, 2,000 rows: .* parsing [\d.]+ s, building [\d.]+ s", out)
