"""The command line as a new user meets it: queries over datetime and tuple keys with bounds typed
the way people type them, and the errors a slip gives (one line saying what to type instead, in the
command line's terms, never a wrong answer).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tallytree.cli import main

T0 = datetime(2024, 1, 1, tzinfo=UTC)
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: Any) -> tuple[int, str, str]:
        code = main([str(arg) for arg in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def stats(tmp_path: Path, run: Run) -> Path:
    """A database with ``events`` (datetime keys) and ``by_status`` (``(status, ts)`` keys), 2 orgs,
    one event every 7 hours of 2024 and 2025 (2,507 events; org:0 has 628 in 2024, 626 in 2025, 418
    of them open, 208 open in 2025)."""
    source = tmp_path / "events.csv"
    with source.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["org", "ts", "id", "cost", "status"])
        moment, index = T0, 0
        while moment < datetime(2026, 1, 1, tzinfo=UTC):
            status = ("open", "paid", "void")[index % 3]
            writer.writerow([f"org:{index % 2}", moment.isoformat(), f"e{index}", index % 5, status])
            moment, index = moment + timedelta(hours=7), index + 1
    database = tmp_path / "stats.tt"
    common = ["--from", source, "--id", "id", "--namespace", "org", "--sum", "cost", "--quiet"]
    assert run("build", database, "events", "--key", "ts", "--key-type", "datetime", *common)[0] == 0
    assert (
        run("build", database, "by_status", "--key", "status,ts", "--key-type", "ts=datetime", *common)[0]
        == 0
    )
    return database


def test_a_year_typed_as_a_bound_over_datetime_keys_is_refused_not_read_as_epoch_seconds(
    stats: Path, run: Run
) -> None:
    """``--lt 2025`` read as epoch second 2025 (1970-01-01T00:33:45Z) counted 0 events, and ``--ge
    2024`` every event: a silent wrong answer. Four digits (a year) and six (a year and a month) are
    refused, saying what to type; the epoch time stays reachable as a float or in ISO 8601."""
    for bound, text in (("--lt", "2025"), ("--ge", "2024"), ("--ge", "202402"), ("--start", "2024")):
        extra = ["--width", "day", "--count", "2"] if bound == "--start" else []
        op = "buckets" if bound == "--start" else "count"
        code, out, err = run("query", stats, "events", op, "--namespace", "org:0", f"{bound}={text}", *extra)
        assert (code, out) == (1, ""), (bound, text, out)
        assert err.count("\n") == 1 and err.startswith(f"tallytree: error: {bound} {text!r}: "), err
        year = text[:4]
        assert "1970-01-01T" in err or "1970-01-03T" in err, err
        assert f"give {year}-0" in err and f"{text}.0" in err, err
    code, out, err = run("query", stats, "events", "rank", "2025", "--namespace", "org:0")
    assert code == 1 and "KEY '2025'" in err
    code, out, _ = run("query", stats, "events", "count", "--namespace", "org:0", "--lt", "2025-01-01")
    assert (code, out) == (0, "628\n")
    assert run("query", stats, "events", "count", "--namespace", "org:0", "--lt", "2025.0")[1] == "0\n"
    assert run("query", stats, "events", "count", "--namespace", "org:0", "--lt", "20250101")[1] == "628\n"
    assert run("query", stats, "events", "count", "--namespace", "org:0", "--ge", "1735689600")[1] == "626\n"
    # inside a tuple bound too
    code, _, err = run("query", stats, "by_status", "count", "--namespace", "org:0", "--ge", '["open", 2025]')
    assert code == 1 and "2025-01-01" in err
    code, out, _ = run(
        "query",
        stats,
        "by_status",
        "count",
        "--namespace",
        "org:0",
        "--ge",
        '["open", "2025-01-01"]',
        "--lt",
        '["open", "9999-12-31"]',
    )
    assert (code, out) == (0, "208\n")


def test_a_bound_of_another_type_than_the_keys_says_how_to_type_it_on_the_command_line(
    stats: Path, run: Run
) -> None:
    """A bare datetime over ``(status, ts)`` keys is refused (the library's BoundKeyTypeError), with
    the command line's spelling of the fix (a JSON array, ``--prefix``), not Python's ``ge=(...)``."""
    code, out, err = run("query", stats, "by_status", "count", "--namespace", "org:0", "--ge", "2024-02-01")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert '--ge \'["open", "2024-02-01"]\'' in err and "--prefix '[\"open\"]'" in err, err
    assert "ge=(" not in err and "prefix=(" not in err
    code, _, err = run("query", stats, "by_status", "rank", "open", "--namespace", "org:0")
    assert code == 1 and "KEY 'open'" in err and '\'["open", "2024-' in err, err
    code, out, _ = run("query", stats, "by_status", "count", "--namespace", "org:0", "--prefix", '["open"]')
    assert (code, out) == (0, "418\n")

    # text keys and a bound that reads as a number: quote it as JSON text
    code, out, err = run("query", stats, "by_status", "count", "--namespace", "org:0", "--prefix", "5")
    assert code == 1 and "'[\"open\"]'" in err
    code, out, err = run(
        "query", stats, "events", "count", "--namespace", "org:0", "--key-type", "str", "--ge", "x"
    )
    assert code == 1 and err.count("\n") == 1 and "--key-type" in err, err


def test_a_cursor_that_is_not_one_names_the_option(stats: Path, run: Run) -> None:
    code, out, err = run("query", stats, "events", "items", "--namespace", "org:0", "--after", "garbage")
    assert (code, out) == (1, "")
    assert "--after 'garbage'" in err and "# more: --after" in err and "page()" not in err, err
    code, out, err = run(
        "query", stats, "events", "items", "--namespace", "org:0", "--after", "garbage", "--json"
    )
    assert json.loads(out)["exit_code"] == 1


def test_a_directory_that_holds_no_database_is_named_as_such_by_reading_commands(
    tmp_path: Path, run: Run
) -> None:
    """``query`` / ``check`` / ``stats`` / ``namespaces`` on a directory of other files said "refusing
    to create one among foreign files. Use an empty or new directory": advice for a create, which
    these commands never do. They say there is no database there, and what the directory holds."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    for argv in (
        ["query", photos, "events", "count"],
        ["check", photos],
        ["stats", photos],
        ["namespaces", photos, "a"],
    ):
        code, out, err = run(*argv)
        assert (code, out) == (1, ""), argv
        assert "non-empty directory without a database" in err and "cat.jpg" in err, err
        assert "create" not in err and "Use an empty or new directory" not in err, err
    assert sorted(path.name for path in photos.iterdir()) == ["cat.jpg"]

    # a lock.mdb alone (a creation killed before LMDB made data.mdb) holds no data: not found, as
    # docs/cli.md says of "no database at the path" (it said "holds no database and create=False", 1)
    killed = tmp_path / "killed.tt"
    killed.mkdir()
    (killed / "lock.mdb").write_bytes(b"")
    code, out, err = run("check", killed)
    assert (code, out) == (4, "") and err == f"tallytree: error: no tallytree database at {killed}\n"
