"""The command line, in-process through ``main(argv)`` and as a subprocess.

Every command with text and ``--json`` output, the exit codes scripts rely on (0 ok, 1 error, 2 usage,
3 check failed or drift, 4 not found), bad arguments, and malformed sources: truncated JSON, wrong
types, missing fields, bad dates, short CSV lines, with their line numbers, failing or skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tallytree
from tallytree._keys import encode_key
from tallytree._sources import RowSpec, SourceError, open_source
from tallytree.cli import main

T0 = datetime(2024, 1, 1, tzinfo=UTC)
Run = tuple[int, str, str]


def make_events(count: int = 300) -> list[dict[str, Any]]:
    events = []
    for index in range(count):
        events.append(
            {
                "org": f"org:{index % 4}",
                "ts": (T0 + timedelta(hours=7 * index)).isoformat().replace("+00:00", "Z"),
                "id": f"e{index}",
                "cost": round(0.01 * (index % 17), 2),
                "tokens": 10 * index,
                "status": "open" if index % 3 else "done",
            }
        )
    return events


EVENTS = make_events()
FIELDS = ["org", "ts", "id", "cost", "tokens", "status"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


KEY_ID_SUM = ["--key", "k", "--id", "id", "--sum", "v"]  # columns k, id and v of the small CSV sources


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def call(*argv: str) -> Run:
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    return {
        "csv": write_csv(tmp_path / "events.csv", EVENTS),
        "jsonl": write_jsonl(tmp_path / "events.jsonl", EVENTS),
    }


BUILD = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--namespace", "org", "--sum", "cost,tokens"]


@pytest.fixture
def built(tmp_path: Path, sources: dict[str, Path], run: Any) -> Path:
    database = tmp_path / "db"
    code, _, err = run("build", database, "events", "--from", sources["csv"], *BUILD, "--quiet")
    assert (code, err) == (0, "")
    return database


def org_rows(org: str) -> list[dict[str, Any]]:
    return [row for row in EVENTS if row["org"] == org]


def when(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["ts"])


# ------------------------------------------------------------------ build


def test_build_from_csv_prints_a_summary(tmp_path: Path, sources: dict[str, Path], run: Any) -> None:
    code, out, err = run("build", tmp_path / "db", "events", "--from", sources["csv"], *BUILD)
    assert code == 0 and err == ""  # no progress bar: stderr is not a terminal
    assert out.startswith("built events: 300 items in 4 namespace(s) from ")
    assert "items/s" in out and "MiB" in out and "parsing" in out


def test_build_json_summary_and_the_answers(tmp_path: Path, sources: dict[str, Path], run: Any) -> None:
    database = tmp_path / "db"
    code, out, _ = run("build", database, "events", "--from", sources["jsonl"], *BUILD, "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["items"] == 300 and summary["namespaces"] == 4 and summary["records"] == 300
    assert summary["database_bytes"] > 0 and summary["items_per_second"] > 0
    assert set(summary) >= {"seconds", "parse_seconds", "build_seconds", "commit_seconds", "skipped"}
    with tallytree.open(database, readonly=True) as db:
        aggregate = db.aggregate("events", create=False)
        assert aggregate.fields == ("cost", "tokens")
        with db.read() as tx:
            totals = aggregate.totals(tx, namespace="org:1")
            rows = org_rows("org:1")
            assert totals.count == len(rows)
            assert totals.tokens == sum(row["tokens"] for row in rows)
            assert totals.cost == math.fsum(row["cost"] for row in rows)
            assert aggregate.min(tx, namespace="org:1") == tallytree.Item(when(rows[0]), "e1", (0.01, 10))
            assert tallytree.check(tx) == []


def test_build_tuple_keys_with_where_and_prefix_queries(
    tmp_path: Path, sources: dict[str, Path], run: Any
) -> None:
    database = tmp_path / "db"
    argv = ["--key", "status,ts", "--key-type", "ts=datetime", "--id", "id", "--where", "org=org:2"]
    code, out, _ = run("build", database, "by_status", "--from", sources["jsonl"], *argv, "--json")
    assert code == 0
    assert json.loads(out)["items"] == len(org_rows("org:2"))
    code, out, _ = run("query", database, "by_status", "count", "--prefix", "open")
    assert (code, out) == (0, f"{sum(1 for row in org_rows('org:2') if row['status'] == 'open')}\n")
    cutoff = T0 + timedelta(days=30)
    code, out, _ = run("query", database, "by_status", "count", "--prefix", '["done"]', "--json")
    assert json.loads(out) == {"count": sum(1 for row in org_rows("org:2") if row["status"] == "done")}
    code, out, _ = run("query", database, "by_status", "count", "--ge", '["open", "2024-01-31T00:00:00Z"]')
    expected = sum(1 for row in org_rows("org:2") if (row["status"], when(row)) >= ("open", cutoff))
    assert (code, out) == (0, f"{expected}\n")


def test_build_replaces_the_aggregate_and_append_merges(tmp_path: Path, run: Any) -> None:
    database = tmp_path / "db"
    first = write_csv(tmp_path / "first.csv", EVENTS[:100])
    second = write_csv(tmp_path / "second.csv", EVENTS[50:120])
    assert run("build", database, "events", "--from", first, *BUILD, "--quiet")[0] == 0
    assert run("build", database, "events", "--from", second, *BUILD, "--quiet")[0] == 0
    expected = sum(1 for row in EVENTS[50:120] if row["org"] == "org:0")
    assert run("query", database, "events", "count", "--namespace", "org:0")[1] == f"{expected}\n"
    code, _, err = run("build", database, "events", "--from", first, *BUILD, "--append")
    assert code == 1 and "is already stored in namespace" in err  # an overlap is a duplicate
    last = ["--append", "--on-duplicate", "last", "--json"]
    code, out, _ = run("build", database, "events", "--from", first, *BUILD, *last)
    assert code == 0 and json.loads(out)["items"] == 120
    code, out, _ = run("stats", database, "--json")
    assert json.loads(out)["aggregates"][0]["items"] == 120


@pytest.mark.parametrize("source", ["header-only.csv", "empty.jsonl", "table", "where"])
def test_a_build_from_a_source_with_no_items_does_not_empty_the_aggregate(
    built: Path, tmp_path: Path, run: Any, source: str
) -> None:
    """A replacing build from a source that gives no item emptied every namespace and exited 0: a
    header-only export, an empty table or a --where that matches nothing wiped the aggregate. It is
    now refused (exit 1, nothing written) unless --allow-empty; --append with nothing is no change."""
    before = run("query", built, "events", "totals", "--namespace", "org:1")
    options: list[Any] = []
    if source == "table":
        path = tmp_path / "app.sqlite"
        with sqlite3.connect(path) as connection:
            connection.execute(f"CREATE TABLE events ({', '.join(FIELDS)})")
        options = ["--from", path, "--table", "events"]
    elif source == "where":
        options = ["--from", write_csv(tmp_path / "events.csv", EVENTS), "--where", "status=nope"]
    else:
        path = tmp_path / source
        path.write_text(",".join(FIELDS) + "\n" if source.endswith(".csv") else "")
        options = ["--from", path]
    code, out, err = run("build", built, "events", *options, *BUILD)
    assert (code, out) == (1, "")
    assert "gave no items" in err and "it would empty aggregate 'events' (300 items in 4 namespace(s))" in err
    assert "nothing was written. Pass --allow-empty to empty it" in err
    if source == "where":
        assert "--where matched none of its 300 record(s)" in err
    assert run("query", built, "events", "totals", "--namespace", "org:1") == before
    assert run("build", built, "events", *options, *BUILD, "--append", "--quiet") == (0, "", "")
    assert run("query", built, "events", "totals", "--namespace", "org:1") == before
    code, out, _ = run("build", built, "events", *options, *BUILD, "--allow-empty", "--json")
    assert code == 0 and json.loads(out)["items"] == 0 and json.loads(out)["namespaces_cleared"] == 4
    assert run("stats", built, "--json")[1].count('"items": 0') == 1
    code, _, err = run("build", tmp_path / "new", "events", *options, *BUILD, "--quiet")
    assert (code, err) == (0, "")  # a new (or empty) aggregate has nothing to lose


def test_a_source_whose_every_record_is_skipped_is_an_error(built: Path, tmp_path: Path, run: Any) -> None:
    """With --on-error skip and every record malformed (a wrong --key-type, say), the build emptied
    the aggregate, or defined an empty one, and exited 0. It is an error in every mode now."""
    source = tmp_path / "bad.csv"
    source.write_text("org,ts,id,cost,tokens\norg:1,yesterday,a,1,1\norg:2,tomorrow,b,2,2\n")
    first = "line 2: field 'ts' is \"yesterday\": not a datetime"
    modes: list[tuple[Path, list[str]]] = [(built, []), (built, ["--append"]), (built, ["--allow-empty"])]
    for database, extra in [*modes, (tmp_path / "new", [])]:
        code, out, err = run(
            "build", database, "events", "--from", source, *BUILD, "--on-error", "skip", *extra
        )
        assert (code, out) == (1, ""), extra
        assert f"bad.csv: no record gave an item: 2 malformed record(s) skipped (the first: {first}" in err
        assert "nothing was written" in err
    assert not (tmp_path / "new").exists()  # the database the build created is removed again
    assert aggregates_of(built) == ["events"]
    assert run("query", built, "events", "count", "--namespace", "org:1") == (0, "75\n", "")


def test_verify_repair_from_a_source_with_no_items_is_refused(built: Path, tmp_path: Path, run: Any) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(FIELDS) + "\n")
    code, _, err = run("verify", built, "events", "--from", empty, *BUILD, "--repair")
    assert code == 1 and "--repair would delete all 300 items of aggregate 'events'" in err
    assert run("query", built, "events", "count", "--namespace", "org:1") == (0, "75\n", "")
    code, out, _ = run("verify", built, "events", "--from", empty, *BUILD)  # reports the drift
    assert code == 3 and "extra: 300" in out
    code, out, _ = run("verify", built, "events", "--from", empty, *BUILD, "--repair", "--allow-empty")
    assert code == 0 and "repaired: 300 item(s)" in out
    assert run("stats", built, "--json")[1].count('"items": 0') == 1


def test_build_without_sum_keeps_the_aggregate_fields(
    built: Path, sources: dict[str, Path], run: Any
) -> None:
    argv = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--namespace", "org"]
    code, out, _ = run("build", built, "events", "--from", sources["csv"], *argv, "--json")
    assert code == 0 and json.loads(out)["items"] == 300
    code, out, err = run("build", built, "events", "--from", sources["csv"], *argv, "--sum", "cost")
    assert code == 1 and "sums ['cost', 'tokens'], not ['cost']" in err


def test_build_from_stdin_as_a_subprocess(tmp_path: Path, sources: dict[str, Path]) -> None:
    database = tmp_path / "db"
    for source in ("csv", "jsonl"):
        result = subprocess.run(
            [sys.executable, "-m", "tallytree", "build", str(database), source, "--from", "-", *BUILD],
            input=sources[source].read_bytes(),
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        assert b"from standard input" in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tallytree",
            "query",
            str(database),
            "jsonl",
            "totals",
            "--namespace",
            "org:3",
        ],
        capture_output=True,
        check=False,
    )
    rows = org_rows("org:3")
    cost = math.fsum(row["cost"] for row in rows)
    tokens = sum(row["tokens"] for row in rows)
    assert result.stdout.decode() == f"count={len(rows)} cost={cost!r} tokens={tokens:,}\n"


def test_build_from_sqlite(tmp_path: Path, run: Any) -> None:
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE events (org TEXT, ts INTEGER, id INTEGER, cost REAL)")
        connection.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?)",
            [(f"org:{index % 3}", 1_700_000_000 + 60 * index, index, 0.5) for index in range(90)],
        )
    database = tmp_path / "db"
    argv = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--namespace", "org", "--sum", "cost"]
    code, out, _ = run("build", database, "a", "--from", path, "--table", "events", *argv, "--json")
    assert code == 0 and json.loads(out)["items"] == 90
    query = "SELECT * FROM events WHERE id % 2 = 0"
    code, out, _ = run(
        "build", database, "b", "--from", f"sqlite:///{path}", "--query", query, *argv, "--json"
    )
    assert code == 0 and json.loads(out)["items"] == 45
    code, out, _ = run("query", database, "a", "max", "--namespace", "org:0", "--json")
    last = datetime.fromtimestamp(1_700_000_000 + 60 * 87, UTC).isoformat()
    assert json.loads(out) == {"key": last, "id": 87, "values": {"cost": 0.5}}
    code, _, err = run("build", database, "c", "--from", path, *argv)
    assert code == 1 and "--table NAME or --query SQL" in err
    code, _, err = run("build", database, "c", "--from", path, "--table", "nope", *argv)
    assert code == 1 and "no such table: nope" in err


class FakeSqlAlchemy(types.ModuleType):
    """Just enough of SQLAlchemy's API (create_engine, text, a streaming result, a transaction, the
    postgresql_readonly option) over sqlite3. ``log`` records what the source did."""

    log: list[str]

    def __init__(self, *, readonly: bool = True) -> None:
        super().__init__("sqlalchemy")
        self.log = []
        self.readonly = readonly  # whether the dialect has read-only transactions

    @staticmethod
    def text(sql: str) -> str:
        return sql

    def create_engine(self, url: str) -> Any:
        path = url.split("@", 1)[1]
        log, readonly = self.log, self.readonly

        class Result:
            def __init__(self, cursor: sqlite3.Cursor) -> None:
                self.cursor = cursor
                self.returns_rows = cursor.description is not None

            def keys(self) -> list[str]:
                return [column[0] for column in self.cursor.description]

            def __iter__(self) -> Iterator[Any]:
                return iter(self.cursor)

        class Connection:
            def __init__(self) -> None:
                self.connection = sqlite3.connect(path)

            def execution_options(self, **options: Any) -> Connection:
                assert options in ({"stream_results": True}, {"postgresql_readonly": True})
                if "postgresql_readonly" in options:
                    if not readonly:
                        raise NotImplementedError
                    self.connection.execute("PRAGMA query_only = ON")  # as SET TRANSACTION READ ONLY
                log.append(f"options {options}")
                return self

            def begin(self) -> None:
                self.connection.execute("BEGIN")  # DDL included: SQLite's is transactional
                log.append("begin")

            def execute(self, sql: str) -> Result:
                return Result(self.connection.execute(sql))

            def close(self) -> None:
                log.append("close")
                self.connection.close()  # uncommitted: rolled back, as SQLAlchemy's close does

        class Engine:
            dialect = types.SimpleNamespace(name=url.partition(":")[0].partition("+")[0])

            def connect(self) -> Connection:
                return Connection()

            def dispose(self) -> None:
                log.append("dispose")

        return Engine()


def test_build_from_an_sql_url(tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE scores (user TEXT, score INTEGER)")
        connection.executemany(
            "INSERT INTO scores VALUES (?, ?)", [(f"u{index}", index % 10) for index in range(50)]
        )
    url = f"postgresql://me:secret@{path}"
    argv = ["--table", "scores", "--key", "score", "--id", "user"]
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # not installed
    code, _, err = run("build", tmp_path / "db", "scores", "--from", url, *argv)
    assert code == 1 and "needs SQLAlchemy" in err and "pip install 'tallytree[sql]'" in err
    monkeypatch.setitem(sys.modules, "sqlalchemy", FakeSqlAlchemy())
    code, out, _ = run("build", tmp_path / "db", "scores", "--from", url, *argv, "--json")
    assert code == 0 and json.loads(out)["items"] == 50
    assert json.loads(out)["source"] == f"postgresql://me:***@{path}"  # no password in output
    assert run("query", tmp_path / "db", "scores", "count", "--ge", "5")[1] == "25\n"


# ------------------------------------------------------------------ malformed sources

BAD_JSONL = """\
{"ts": "2024-01-01T00:00:00Z", "id": "a", "cost": 1}
{"ts": "2024-01-02T00:00:00Z", "id": "b", "cost": "abc"}

{"ts": "yesterday", "id": "c", "cost": 2}
{"id": "d", "cost": 2}
{"ts": 1704067200, "id": "e", "cost": true}
{"ts": "2024-01-03", "id": "f", "cost": 2.5}
{"ts": "2024-01-04", "id": "g", "co"""


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (2, "line 2: field 'cost' is \"abc\", not a number"),
        (4, "line 4: field 'ts' is \"yesterday\": not a datetime (ISO 8601 or epoch seconds/milliseconds)"),
        (5, "line 5: field 'ts' is missing"),
        (6, "line 6: field 'cost' is True, not a number"),
        (
            8,
            "line 8: invalid JSON (Unterminated string starting at: line 1 column 33 (char 32)); the line "
            "may ",
        ),
    ],
)
def test_malformed_records_fail_with_the_line(tmp_path: Path, run: Any, keep: int, message: str) -> None:
    """Each source keeps the first good line and the bad one (numbering as in the full file)."""
    lines = BAD_JSONL.split("\n")
    kept = [line if number in (1, keep) else "" for number, line in enumerate(lines, 1)]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(kept))
    argv = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--sum", "cost"]
    code, out, err = run("build", tmp_path / "db", "bad", "--from", source, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(f"tallytree: error: {source} {message}")
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "db").exists()  # the database created for the failed build is gone


def test_malformed_records_can_be_skipped_and_counted(tmp_path: Path, run: Any) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(BAD_JSONL.replace('"id": "f"', '"id": "' + "x" * 300 + '"'))
    argv = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--sum", "cost", "--on-error", "skip"]
    code, out, _ = run("build", tmp_path / "db", "bad", "--from", source, *argv, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["items"] == 1
    assert summary["skipped"]["count"] == 6
    assert [sample["where"] for sample in summary["skipped"]["examples"]] == [
        f"line {n}" for n in (2, 4, 5, 6, 8)
    ]
    code, out, _ = run("build", tmp_path / "db", "bad", "--from", source, *argv)
    assert "skipped 6 malformed record(s), e.g.:\n    line 2: field 'cost'" in out
    argv[-1] = "fail"
    source.write_text(
        BAD_JSONL.split("\n", maxsplit=1)[0] + "\n" + '{"ts": 1, "id": "' + "x" * 300 + '", "cost": 1}\n'
    )
    code, _, err = run("build", tmp_path / "db", "bad", "--from", source, *argv)
    assert code == 1 and f"{source}: line 2: id is too large" in err  # refused by the library, named by line


def test_malformed_csv_lines(tmp_path: Path, run: Any) -> None:
    source = tmp_path / "short.csv"
    source.write_text('ts,id,cost\n1,a,1\n2,b\n3,c,"unterminated\n')
    code, _, err = run(
        "build", tmp_path / "db", "x", "--from", source, "--key", "ts", "--id", "id", "--sum", "cost"
    )
    assert code == 1
    assert "short.csv line 3: expected 3 fields (as in the header), found 2" in err
    argv = ["--key", "ts", "--id", "id", "--sum", "cost", "--on-error", "skip", "--json"]
    code, out, _ = run("build", tmp_path / "db", "x", "--from", source, *argv)
    assert code == 1 and "short.csv line 4: a quoted field begins there and never ends" in out
    source.write_text('ts,id,cost\n1,a,1\n2,b\n3,c,"7"\n')
    code, out, _ = run("build", tmp_path / "db", "x", "--from", source, *argv)
    skipped = json.loads(out)["skipped"]
    assert code == 0 and skipped["count"] == 1
    assert skipped["examples"][0] == {
        "where": "line 3",
        "error": "expected 3 fields (as in the header), found 2; the line may be truncated or have an "
        "unquoted delimiter",
    }
    source.write_text("ts,id\n")
    code, _, err = run("build", tmp_path / "db", "x", "--from", source, "--key", "nope")
    assert code == 1 and "has no column 'nope'; its columns are ts, id" in err


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("records", [2, 5000])  # the unclosed quote in the first batch or a later one
def test_an_unclosed_csv_quote_is_fatal_and_names_the_line_it_opens(
    tmp_path: Path, run: Any, on_error: str, records: int
) -> None:
    """A quote that is never closed swallowed the rest of the file into one field; with --on-error
    skip that was one skipped record, named by the file's last line, and every record after the
    quote was lost without a word. It stops the build now, whatever --on-error says, naming the line
    where the quoted field opens (from standard input: where its record begins)."""
    rows = "".join(f"{n},e{n},1\n" for n in range(records))
    opened = records + 3  # the header, the records, a record spanning two lines
    text = f'k,id,v\n{rows}-1,"two\nlines",1\n-2,x"y,"never ""closed"" here\n-3,z,1\n-4,w,1\n'
    source = tmp_path / "open.csv"
    source.write_text(text)
    argv = [*KEY_ID_SUM, "--on-error", on_error]
    code, out, err = run("build", tmp_path / "db", "x", "--from", source, *argv)
    assert (code, out) == (1, "")
    assert err == (
        f"tallytree: error: {source} line {opened + 1}: a quoted field begins there and never ends: the "
        "file ends inside it, so every line after it was read as part of that field; close the quote (a "
        'quote inside a quoted field is written twice, "")\n'
    )
    assert not (tmp_path / "db").exists()
    stdin = types.SimpleNamespace(buffer=io.BytesIO(text.encode()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", stdin)
        code, _, err = run("build", tmp_path / "db", "x", "--from", "-", "--format", "csv", *argv)
    assert code == 1
    assert f"standard input line {opened + 1}: the record that begins there has a quoted field" in err
    with pytest.raises(SourceError, match=f"line {opened + 1}: a quoted field begins there"):
        list(open_source(str(source)).records())


def test_a_repeated_column_is_refused_where_it_is_read(tmp_path: Path, run: Any) -> None:
    """CSV records would give the first of two same-named columns and SQL ones the last: neither is
    guessed. A repeated column that no option names is no problem."""
    source = tmp_path / "repeated.csv"
    source.write_text("k,v, v\n1,2,3\n2,4,5\n")
    for option in (
        ["--sum", "v"],
        ["--sum", "total=v"],
        ["--id", "v"],
        ["--where", "v=2"],
        ["--namespace", "v"],
    ):
        code, out, err = run("build", tmp_path / "db", "r", "--from", source, "--key", "k", *option)
        assert (code, out) == (1, ""), option
        assert err == (
            f"tallytree: error: {source} has 2 columns named 'v' (columns 2, 3), so which one to read is "
            "ambiguous; rename them in the header row so that each name is one column\n"
        )
    assert not (tmp_path / "db").exists()  # refused before the database is opened
    code, out, _ = run("build", tmp_path / "db", "r", "--from", source, "--key", "k", "--json")
    assert code == 0 and json.loads(out)["items"] == 2
    spec = RowSpec(key=["k"], sums={"v": "v"})
    opened = open_source(str(source))
    try:
        assert spec.batch_converter(opened) is None  # the record path, which refuses
    finally:
        opened.close()
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER, v INTEGER, w INTEGER)")
        connection.execute("INSERT INTO t VALUES (1, 2, 3)")
    query = ["--query", "SELECT k, v, w AS v FROM t", "--key", "k", "--sum", "v"]
    code, _, err = run("build", tmp_path / "db", "s", "--from", path, *query)
    assert code == 1 and "has 2 columns named 'v' (columns 2, 3)" in err and "(SELECT ... AS ...)" in err


def test_open_source_takes_a_table_or_a_query(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER)")
    with pytest.raises(SourceError, match="--table NAME or --query SQL, not both"):
        open_source(str(path), table="t", query="SELECT 1 AS k")


def test_csv_batches_convert_as_records_do(tmp_path: Path) -> None:
    """The column-at-a-time CSV path gives each record's row exactly, or hands the batch back."""
    source = tmp_path / "cells.csv"
    source.write_text(
        "org,ts,id,cost,n\n"
        'o1,2024-01-02T03:04:05+02:00,7,1.5,3\n o1 ,2024-01-02 03:04:05, a ,-0,"1e3"\n'
        "2,2024-01-02T03:04:05.25Z,007,.5, 7 \n"
    )
    spec = RowSpec(
        key=["ts"], key_types={"ts": "datetime"}, id="id", namespace="org", sums={"c": "cost", "n": "n"}
    )
    opened = open_source(str(source), format=None, table=None, query=None, delimiter=None, stdin=None)
    try:
        batch = next(opened.batches(100))
        records = [record for _, record in batch]
        assert [number for number, _ in batch] == [2, 3, 4]
        convert, batch_convert = spec.converter(opened), spec.batch_converter(opened)
        assert batch_convert is not None
        rows = batch_convert(records, 1)
        assert rows == [convert(number, ordinal, record) for ordinal, (number, record) in enumerate(batch, 1)]
        assert rows is not None and [type(value) for value in rows[1][3]] == [int, float]
        for cell in ("+5", "1_000", "nan", "", "٣", "1e999"):  # _number's own checks decide these
            assert batch_convert([[*records[0][:3], cell, "1"]], 1) is None, cell
        assert batch_convert([["o", "20240102", "1", "1", "1"]], 1) is None  # not the ISO shape
    finally:
        opened.close()


def test_csv_errors_in_later_batches_name_their_lines(tmp_path: Path, run: Any) -> None:
    source = tmp_path / "long.csv"
    lines = [f"{index},e{index},{index % 7}.5" for index in range(10_000)]
    lines[6_000] = "6000,e6000,oops"
    lines[7_000] = '7000,"e\n7000",1'  # a record spanning two lines
    source.write_text("ts,id,cost\n" + "\n".join(lines) + "\n")
    argv = ["--key", "ts", "--id", "id", "--sum", "cost", "--on-error", "skip", "--json"]
    code, out, _ = run("build", tmp_path / "db", "x", "--from", source, *argv)
    report = json.loads(out)
    assert code == 0 and report["items"] == 9_999 and report["skipped"]["count"] == 1
    assert report["skipped"]["examples"][0]["where"] == "line 6002"
    lines.append("6000,e6000,2")  # a duplicate of line 6002, after the two-line record
    lines[6_000] = "6000,e6000,1"
    source.write_text("ts,id,cost\n" + "\n".join(lines) + "\n")
    code, _, err = run("build", tmp_path / "db", "y", "--from", source, *argv[:-3])
    assert code == 1 and "line 6002 and line 10003" in err


def test_duplicates_name_both_lines_or_keep_the_last(tmp_path: Path, run: Any) -> None:
    source = tmp_path / "dup.csv"
    source.write_text("ts,id,cost\n1,a,1\n2,a,2\n1,a,3\n")
    argv = ["--key", "ts", "--id", "id", "--sum", "cost"]
    code, _, err = run("build", tmp_path / "db", "d", "--from", source, *argv)
    assert code == 1
    assert "item (key=1, id='a') appears twice in the input, line 2 and line 4;" in err
    code, out, _ = run(
        "build", tmp_path / "db", "d", "--from", source, *argv, "--on-duplicate", "last", "--json"
    )
    assert code == 0 and json.loads(out)["duplicates_dropped"] == 1
    assert run("query", tmp_path / "db", "d", "totals")[1] == "count=2 cost=5\n"


def test_sorted_promise_is_checked(tmp_path: Path, run: Any) -> None:
    source = tmp_path / "unsorted.csv"
    source.write_text("ts,id\n3,a\n1,b\n")
    code, _, err = run(
        "build", tmp_path / "db", "s", "--from", source, "--key", "ts", "--id", "id", "--sorted"
    )
    assert code == 1 and "line 3 (key=1, id='b') comes after line 2 (key=3, id='a')" in err


# ------------------------------------------------------------------ malformed values, encodings, sizes


def aggregates_of(database: Path) -> list[str]:
    with tallytree.open(database, readonly=True) as db:
        return db.aggregates()


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".csv", "ts,id,v\n2024-01-01T00:00:00Z,a,1\n0001-01-01T00:00:00+01:00,b,2\n2024-01-02,c,3\n"),
        (
            ".jsonl",
            '{"ts": "2024-01-01T00:00:00Z", "id": "a", "v": 1}\n'
            '{"ts": "9999-12-31T23:59:59-01:00", "id": "b", "v": 2}\n'
            '{"ts": "2024-01-02", "id": "c", "v": 3}\n',
        ),
    ],
)
def test_a_datetime_outside_the_years_1_to_9999_in_utc_is_a_malformed_record(
    tmp_path: Path, run: Any, suffix: str, text: str
) -> None:
    """Valid ISO 8601 that leaves the years 1 to 9999 once converted to UTC (0001-01-01T00:00+01:00
    is in the year 0) was an OverflowError traceback; it is a malformed record like a bad date."""
    source = tmp_path / f"dates{suffix}"
    source.write_text(text)
    line = 3 if suffix == ".csv" else 2
    argv = ["--key", "ts", "--key-type", "datetime", "--id", "id", "--sum", "v"]
    code, out, err = run("build", tmp_path / "db", "d", "--from", source, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(f"tallytree: error: {source} line {line}: field 'ts' is ")
    assert err.endswith(": outside the years 1 to 9999 once converted to UTC\n")
    assert not (tmp_path / "db").exists()
    code, out, err = run("build", tmp_path / "db", "d", "--from", source, *argv, "--json")
    assert code == 1 and json.loads(out) == {
        "error": err.removeprefix("tallytree: error: ").strip(),
        "exit_code": 1,
    }
    code, out, _ = run("build", tmp_path / "db", "d", "--from", source, *argv, "--on-error", "skip", "--json")
    report = json.loads(out)
    assert code == 0 and report["items"] == 2 and report["skipped"]["count"] == 1
    assert report["skipped"]["examples"][0]["where"] == f"line {line}"
    code, _, err = run("query", tmp_path / "db", "d", "count", "--ge", "0001-01-01T00:00:00+01:00")
    assert code == 1 and "outside the years 1 to 9999 once converted to UTC" in err


NOT_UTF8_HINT = "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 (if it is Latin-1)"


def test_csv_bytes_that_are_not_utf8_are_malformed_records_named_by_their_line(
    tmp_path: Path, run: Any
) -> None:
    """The text decoder reads ahead in chunks, so a decoding error used to name a line far before the
    bad byte, or blame a good header. A record with bytes that are not UTF-8 is now a malformed record
    (as a JSON Lines line is) named by the line of the bad byte, and can be skipped."""
    big = tmp_path / "big.csv"
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    # the first and the last line of a batch of 4,096 records, the first of the next ones: the
    # decoder reads ahead, so a bad byte is met while the batch before its own is read
    for bad in (2500, 4097, 4098, 8193, 8194):
        rows = (b"%d,%s%d,1\n" % (n, b"n\xff" if n == bad else b"n", n) for n in range(2, 10_001))
        big.write_bytes(b"k,id,v\n" + b"".join(rows))
        code, out, err = run("build", tmp_path / f"db{bad}", "u", "--from", big, *argv)
        assert (code, out) == (1, "")
        assert err == f"tallytree: error: {big} line {bad}: not UTF-8 text (byte 0xff); {NOT_UTF8_HINT}\n"
        assert not (tmp_path / f"db{bad}").exists()
        code, out, _ = run(
            "build", tmp_path / f"db{bad}", "u", "--from", big, *argv, "--on-error", "skip", "--json"
        )
        report = json.loads(out)
        assert code == 0 and report["items"] == 9_998 and report["skipped"]["count"] == 1
        assert report["skipped"]["examples"][0]["where"] == f"line {bad}"
    small = tmp_path / "small.csv"  # the header is fine: the record is named, not the header
    small.write_bytes(b"k,id,v\n1,a,1\n2,b\xe9,1\n3,c,1\n")
    code, _, err = run("build", tmp_path / "db", "s", "--from", small, *argv)
    assert code == 1 and f"{small} line 3: not UTF-8 text (byte 0xe9)" in err and "header" not in err
    spanning = tmp_path / "spanning.csv"  # a quoted cell over three lines, the bad byte on the second
    spanning.write_bytes(b'k,id,v,note\n1,a,1,"one\r\ntw\xf6\r\nthree"\n2,b,1,ok\n')
    code, _, err = run("build", tmp_path / "db", "s", "--from", spanning, *argv)
    assert code == 1 and f"{spanning} line 3: not UTF-8 text (byte 0xf6)" in err
    opened = open_source(str(spanning))
    try:  # the record-by-record reader agrees
        assert [(number, str(record)) for number, record in opened.records()] == [
            (3, f"not UTF-8 text (byte 0xf6); {NOT_UTF8_HINT}"),
            (5, "['2', 'b', '1', 'ok']"),
        ]
    finally:
        opened.close()
    header = tmp_path / "header.csv"  # without its header no record can be read: not skippable
    header.write_bytes(b"k,id,v\xe9\n1,a,1\n")
    code, _, err = run("build", tmp_path / "db", "h", "--from", header, *argv, "--on-error", "skip")
    assert code == 1 and f"{header} line 1: the header row is not UTF-8 text (byte 0xe9)" in err
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"k": 1, "id": "a", "v": 1}\n{"k": 2, "id": "\xe9", "v": 1}\n')
    code, _, err = run("build", tmp_path / "db", "j", "--from", jsonl, *argv)
    assert code == 1 and f"{jsonl} line 2: not UTF-8 text (byte 0xe9); convert the file" in err


def test_a_csv_cell_longer_than_128_kib_is_read(tmp_path: Path, run: Any) -> None:
    """The csv module refuses fields over 128 KiB by default: a well-formed file was "malformed"."""
    source = tmp_path / "long.csv"
    rows = [f"{n},e{n},{n}," + ("x" * 200_000 if n == 5 else "short") for n in range(1, 11)]
    source.write_text("k,id,v,note\n" + "\n".join(rows) + "\n")
    previous = csv.field_size_limit()
    try:
        csv.field_size_limit(2**17)  # the default, whatever ran before
        code, out, err = run("build", tmp_path / "db", "l", "--from", source, *KEY_ID_SUM, "--json")
        assert (code, err) == (0, "") and json.loads(out)["items"] == 10
        assert csv.field_size_limit() == 2**31 - 1  # raised, deliberately (process-global)
        csv.field_size_limit(2**40)  # an application that raised it further keeps its limit
        opened = open_source(str(source))
        opened.close()
        assert csv.field_size_limit() == 2**40
    finally:
        csv.field_size_limit(previous)


VALUE_RANGE = "outside the range of a value, -2**63 to 2**64 - 1"
TOO_LARGE = "too large to store (a key, an id or a namespace encodes to at most 255 bytes)"


@pytest.mark.parametrize(
    ("suffix", "record", "start", "end"),
    [
        (".csv", "2,b,{digits}", "field 'v' is ", f"an integer of 5,000 digits, {VALUE_RANGE}"),
        (".csv", "{digits},b,1", "field 'k' is ", f"an integer of 5,000 digits, {TOO_LARGE}"),
        (".csv", "2,{digits},1", "field 'id' (the id) is ", f"an integer of 5,000 digits, {TOO_LARGE}"),
        (".csv", "2,-{digits},1", "field 'id' (the id) is ", f"an integer of 5,000 digits, {TOO_LARGE}"),
        (".jsonl", '{{"k": 2, "id": "b", "v": "{digits}"}}', "field 'v' is ", f"5,000 digits, {VALUE_RANGE}"),
        (".jsonl", '{{"k": 2, "id": "{digits}", "v": 1}}', "field 'id' (the id) is ", f"digits, {TOO_LARGE}"),
        (
            ".jsonl",
            '{{"k": 2, "id": "b", "v": {digits}}}',
            "a JSON number of 5,000 digits",
            f"too large for a key, an id or a namespace, and {VALUE_RANGE}",
        ),
    ],
)
def test_integers_too_long_for_int_are_malformed_records(
    tmp_path: Path, run: Any, suffix: str, record: str, start: str, end: str
) -> None:
    """int() refuses text of more than 4300 digits (sys.get_int_max_str_digits) with a ValueError that
    escaped as a traceback: such a number is a malformed record (too large for a key, an id or a
    value anyway), named by its line and skippable."""
    first = "1,a,1" if suffix == ".csv" else '{"k": 1, "id": "a", "v": 1}'
    source = tmp_path / f"digits{suffix}"
    header = "k,id,v\n" if suffix == ".csv" else ""
    source.write_text(header + first + "\n" + record.format(digits="9" * 5000) + "\n")
    line = 3 if suffix == ".csv" else 2
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    code, out, err = run("build", tmp_path / "db", "n", "--from", source, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(f"tallytree: error: {source} line {line}: {start}") and err.endswith(f"{end}\n")
    assert err.count("\n") == 1 and len(err) < 400  # the number is shortened
    assert not (tmp_path / "db").exists()
    argv += ["--on-error", "skip", "--json"]
    code, out, _ = run("build", tmp_path / "db", "n", "--from", source, *argv)
    report = json.loads(out)
    assert code == 0 and report["items"] == 1
    assert report["skipped"]["examples"][0]["where"] == f"line {line}"


@pytest.mark.parametrize("cell", ["1_000", "\u0663", "\uff11\uff12", "1_0.5"])
@pytest.mark.parametrize(
    ("options", "field", "wanted"),
    [
        (["--key-type", "int"], "'k'", "an int"),
        (["--key-type", "float"], "'k'", "a number"),
        (["--id-type", "int"], "'id' (the id)", "an int"),
    ],
)
def test_numbers_only_python_reads_are_malformed_records(
    tmp_path: Path, run: Any, cell: str, options: list[str], field: str, wanted: str
) -> None:
    """int() and float() read "1_000" (Python's literal syntax) and digits outside ASCII; --key-type
    int/float and --id-type int took them as numbers (1000, 3, 12), which a summed field refuses. They
    are malformed records everywhere."""
    source = tmp_path / "cells.csv"
    record = f"{cell},2,1" if field == "'k'" else f"2,{cell},1"
    source.write_text(f"k,id,v\n1,1,1\n{record}\n")
    argv = ["--key", "k", "--id", "id", "--sum", "v", *options]
    code, out, err = run("build", tmp_path / "db", "n", "--from", source, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(f"tallytree: error: {source} line 3: field {field} is ")
    assert err.endswith(f", not {wanted}\n")


def test_minus_zero_is_not_a_canonical_integer(tmp_path: Path, run: Any) -> None:
    """'-0' is not written canonically, so it stays text, as '042' does: the ids 0 and -0 are two ids
    (they collided as one duplicate item)."""
    source = tmp_path / "zeros.csv"
    source.write_text("k,id,v\n1,0,1\n1,-0,2\n-0,x,3\n0,x,4\n")
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    code, out, err = run("build", tmp_path / "db", "z", "--from", source, *argv)
    assert (code, err) == (0, "") and out.startswith("built z: 4 items")
    code, out, _ = run("query", tmp_path / "db", "z", "items", "--json")
    items = [(item["key"], item["id"]) for item in json.loads(out)["items"]]
    assert items == [(0, "x"), (1, 0), (1, "-0"), ("-0", "x")]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--memory", "nan"], "--memory 'nan' is not a size such as 512M or 2G"),
        (["--memory", "inf"], "--memory 'inf' is not a size such as 512M or 2G"),
        (["--memory", "1e400"], "--memory '1e400' is not a size such as 512M or 2G"),
        (["--memory", "1e308G"], "--memory '1e308G' is not a size such as 512M or 2G"),
        (["--memory=-1G"], "--memory '-1G' must be at least one byte"),
        (["--memory", "0.5"], "--memory '0.5' must be at least one byte"),
        (
            ["--delimiter", ";;"],
            "argument --delimiter: ';;' is not one character; give one, such as ';' or '|' (a tab: ",
        ),
        (["--delimiter", ""], "argument --delimiter: '' is not one character"),
        (
            ["--delimiter", '"'],
            "argument --delimiter: '\"' is a quote or a line break, which CSV reserves",
        ),
    ],
)
@pytest.mark.parametrize("command", ["build", "verify"])
def test_bad_memory_and_delimiter_are_bad_usage_before_anything_is_opened(
    tmp_path: Path, run: Any, command: str, option: list[str], message: str
) -> None:
    """nan, inf and 1e400 were tracebacks, 0.5 an error (exit 1) from the library once the database
    was open, ';;' a TypeError from the csv module, '' a silent comma."""
    source = tmp_path / "ok.csv"
    source.write_text("k,id,v\n1,a,1\n")
    argv = [command, tmp_path / "db", "a", "--from", source, *KEY_ID_SUM, *option]
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "db").exists()
    code, out, _ = run(*argv, "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_a_backslash_t_delimiter_is_a_tab(tmp_path: Path, run: Any) -> None:
    """--delimiter '\\t' in a shell passes a backslash and a t (a TypeError from the csv module
    before): it means a tab, as $'\\t' does."""
    source = tmp_path / "tabs.csv"
    source.write_text("k\tid\tv\n1\ta\t1\n2\tb\t2\n")
    for delimiter in ("\\t", "\t"):
        argv = ["--key", "k", "--id", "id", "--sum", "v", "--delimiter", delimiter, "--json"]
        code, out, err = run("build", tmp_path / "db", "t", "--from", source, *argv)
        assert (code, err) == (0, "") and json.loads(out)["items"] == 2
    with pytest.raises(SourceError, match="delimiter ';;' is not one character"):
        open_source(str(source), delimiter=";;")
    with pytest.raises(SourceError, match="delimiter '\"' is a quote or a line break"):
        open_source(str(source), delimiter='"')


def test_sql_blob_ids_are_bytes_ids(tmp_path: Path, run: Any) -> None:
    """Ids may be bytes (README): an SQL BLOB id is one (it was refused), and verifies as built."""
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER, id BLOB, v INTEGER)")
        rows = [(1, b"\x00\xffa", 1), (2, b"b", 2), (3, "b", 3), (4, 7, 4)]
        connection.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    argv = ["--from", path, "--table", "t", "--key", "k", "--id", "id", "--sum", "v"]
    code, out, err = run("build", tmp_path / "db", "b", *argv, "--json")
    assert (code, err) == (0, "") and json.loads(out)["items"] == 4
    with tallytree.open(tmp_path / "db", readonly=True) as db, db.read() as tx:
        ids = [item.id for item in db.aggregate("b", create=False).items(tx)]
    assert ids == [b"\x00\xffa", b"b", "b", 7]
    code, out, _ = run("verify", tmp_path / "db", "b", *argv)
    assert code == 0 and out.endswith("ok: the aggregate matches the source\n")
    code, _, err = run("build", tmp_path / "db", "c", *argv, "--id-type", "int")
    assert code == 1 and "row 1: field 'id' (the id) is b'\\x00\\xffa', bytes, not an int;" in err
    code, _, err = run("build", tmp_path / "db", "c", *argv, "--id-type", "str")
    assert code == 1 and "row 1: field 'id' (the id) is b'\\x00\\xffa', bytes that are not UTF-8 text" in err
    code, out, _ = run(
        "build", tmp_path / "db", "c", *argv, "--id-type", "str", "--on-error", "skip", "--json"
    )
    assert code == 0 and json.loads(out)["items"] == 3


def test_text_ids_that_are_canonical_integers_are_ints_from_every_source(tmp_path: Path, run: Any) -> None:
    """The documented rule (docs/cli.md, Typing): the JSON string "42" is the id 42, as the CSV cell
    42 is, so that the same data as CSV or JSON Lines gives the same ids; "007" stays text."""
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text(
        '{"k": 1, "id": "42", "v": 1}\n{"k": 1, "id": "007", "v": 1}\n{"k": 1, "id": 5, "v": 1}\n'
    )
    csv_file = tmp_path / "ids.csv"
    csv_file.write_text("k,id,v\n1,42,1\n1,007,1\n1,5,1\n")
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    for name, source in (("j", jsonl), ("c", csv_file)):
        assert run("build", tmp_path / "db", name, "--from", source, *argv, "--quiet")[0] == 0
    with tallytree.open(tmp_path / "db", readonly=True) as db, db.read() as tx:
        for name in ("j", "c"):
            assert [item.id for item in db.aggregate(name, create=False).items(tx)] == [5, 42, "007"]
    assert run("verify", tmp_path / "db", "j", "--from", csv_file, *argv)[0] == 0
    code, out, _ = run("build", tmp_path / "db", "s", "--from", jsonl, *argv, "--id-type", "str", "--json")
    assert code == 0 and json.loads(out)["items"] == 3


def test_namespaces_follow_the_rule_of_ids_from_every_source(tmp_path: Path, run: Any) -> None:
    """The CSV cell 42 was the namespace 42 and the JSON string "42" the namespace "42", so the same
    export as CSV or JSON Lines built different namespaces (and verified as all drift). Namespaces
    follow the rule of ids now: text that is a canonical integer is that int from every source,
    other text stays text; --namespace-type str keeps text, int requires integers."""
    rows = [("42", "a"), ("007", "b"), ("4.5", "c"), ("org:1", "d")]
    csv_file = tmp_path / "n.csv"
    csv_file.write_text("org,k,id,v\n" + "".join(f"{org},1,{name},1\n" for org, name in rows))
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"org": org, "k": 1, "id": name, "v": 1}) + "\n" for org, name in rows)
    )
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"org": 42, "k": 1, "id": "a", "v": 1}\n{"org": 4.5, "k": 1, "id": "c", "v": 1}\n')
    sqlite = tmp_path / "n.sqlite"
    with sqlite3.connect(sqlite) as connection:
        connection.execute("CREATE TABLE t (org TEXT, k INTEGER, id TEXT, v INTEGER)")
        connection.executemany("INSERT INTO t VALUES (?, 1, ?, 1)", rows)
    argv = ["--namespace", "org", *KEY_ID_SUM]
    database = tmp_path / "db"
    sources: list[tuple[str, list[Any]]] = [
        ("c", ["--from", csv_file]),
        ("j", ["--from", jsonl]),
        ("s", ["--from", sqlite, "--table", "t"]),
    ]
    for name, source in sources:
        assert run("build", database, name, *source, *argv, "--quiet") == (0, "", ""), name
        code, out, _ = run("namespaces", database, name, "--json")
        assert [space["namespace"] for space in json.loads(out)["namespaces"]] == [42, "007", "4.5", "org:1"]
        assert run("verify", database, "c", *source, *argv, "--quiet")[0] == 0, name
    assert run("build", database, "n", "--from", numbers, *argv, "--quiet") == (0, "", "")
    code, out, _ = run("namespaces", database, "n", "--json")  # JSON numbers keep their type
    assert [space["namespace"] for space in json.loads(out)["namespaces"]] == [4.5, 42]
    assert run("query", database, "c", "count", "--namespace", "42") == (0, "1\n", "")
    for name, source in [*sources, ("n", ["--from", numbers])]:
        code, _, _ = run("build", database, f"{name}2", *source, *argv, "--namespace-type", "str", "--quiet")
        assert code == 0
        code, out, _ = run("namespaces", database, f"{name}2", "--json")
        expected = ["4.5", "42"] if name == "n" else ["007", "4.5", "42", "org:1"]
        assert [space["namespace"] for space in json.loads(out)["namespaces"]] == expected, name
    code, _, err = run("build", database, "i", "--from", csv_file, *argv, "--namespace-type", "int")
    assert code == 1 and "line 4: field 'org' is \"4.5\", not an int" in err


@pytest.mark.parametrize("readonly", [True, False])
@pytest.mark.parametrize("query", ["DELETE FROM t", "DROP TABLE t", "UPDATE t SET k = 0"])
def test_an_sql_query_that_returns_no_rows_is_a_source_error_and_is_rolled_back(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch, query: str, readonly: bool
) -> None:
    """A --query that returns no rows (DDL, DML) gave a traceback, and what it did could be
    committed. It is a source error now, run in a transaction that is rolled back (read-only where
    the dialect allows it, where the statement itself fails)."""
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER)")
        connection.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(10)])
    fake = FakeSqlAlchemy(readonly=readonly)
    monkeypatch.setitem(sys.modules, "sqlalchemy", fake)
    url = f"postgresql://me:hunter2@{path}"
    code, out, err = run("build", tmp_path / "db", "a", "--from", url, "--query", query, "--key", "k")
    assert (code, out) == (1, "")
    shown = f"tallytree: error: cannot read from postgresql://me:***@{path}: "
    if readonly:
        assert err == shown + "attempt to write a readonly database\n"
    else:
        assert err == shown + (
            "the query returns no rows (it is not a SELECT); give a SELECT to read; what it changed is "
            "rolled back\n"
        )
    options = ["options {'postgresql_readonly': True}"] if readonly else []
    assert fake.log == [*options, "options {'stream_results': True}", "begin", "close", "dispose"]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*), sum(k) FROM t").fetchone() == (10, 45)
    assert not (tmp_path / "db").exists()
    fake.log.clear()
    code, _, _ = run("build", tmp_path / "db", "a", "--from", url, "--table", "t", "--key", "k", "--quiet")
    assert code == 0
    assert fake.log == [*options, "options {'stream_results': True}", "begin", "close", "dispose"]


def test_sqlite_urls_are_read_as_sqlite_files(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite+pysqlite:///missing.sqlite created an empty file (through SQLAlchemy) and exited 1;
    sqlite:///app.sqlite?mode=ro read "app.sqlite?mode=ro" as the path. Every SQLite URL is now read
    as a SQLite path is: read-only, its query string apart, a missing file not found (exit 4)."""
    monkeypatch.chdir(tmp_path)
    with sqlite3.connect(tmp_path / "app.sqlite") as connection:
        connection.execute("CREATE TABLE t (k INTEGER)")
        connection.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(10)])
    argv = ["--table", "t", "--key", "k", "--quiet"]
    for url in [
        "sqlite:///app.sqlite?mode=ro",
        "sqlite+pysqlite:///app.sqlite",
        f"SQLite:///{tmp_path}/app.sqlite",
    ]:
        assert run("build", "db", "a", "--from", url, *argv) == (0, "", ""), url
    assert run("query", "db", "a", "count") == (0, "10\n", "")
    code, _, err = run("build", "db", "a", "--from", "sqlite+pysqlite:///missing.sqlite", *argv)
    assert code == 4 and "source missing.sqlite not found" in err
    assert not (tmp_path / "missing.sqlite").exists()
    code, _, err = run("build", "db", "a", "--from", "sqlite://", *argv)
    assert code == 1 and "give the SQLite file, as in sqlite:///relative/app.db" in err
    code, _, err = run(
        "build", "db", "a", "--from", "app.sqlite", "--query", "PRAGMA foreign_keys = ON", "--key", "k"
    )
    assert code == 1 and "app.sqlite: the query returns no rows (it is not a SELECT); give a SELECT" in err
    code, _, err = run("build", "db", "a", "--from", "app.sqlite", "--query", "DELETE FROM t", "--key", "k")
    assert code == 1 and "app.sqlite: attempt to write a readonly database" in err
    odd = tmp_path / "odd?name#1.sqlite"  # a path that is not read as a URI's query or fragment
    shutil.copy(tmp_path / "app.sqlite", odd)
    assert run("build", "db", "b", "--from", odd, *argv) == (0, "", "")


class SecretLeakingSqlAlchemy(FakeSqlAlchemy):
    """A driver whose errors quote the URL it was given, percent-decoded too (as some do)."""

    @staticmethod
    def create_engine(url: str) -> Any:
        from urllib.parse import unquote

        raise RuntimeError(f"could not connect to {url!r} ({unquote(url)})")


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        (
            "postgresql://me:hunter2@db.example/app?sslmode=require&password=s%40uce",
            "postgresql://me:***@db.example/app?sslmode=require&password=***",
            ["hunter2", "s%40uce", "s@uce"],
        ),
        (
            "postgresql://db.example/app?user=me&password=hunter2",
            "postgresql://db.example/app?user=me&password=***",
            ["hunter2"],
        ),
        (
            "postgresql://me:pa/ss?w0rd@db.example/app",
            "postgresql://me:***@db.example/app",
            ["pa/ss?w0rd", "ss?w0rd"],
        ),
    ],
)
def test_no_password_of_a_database_url_appears_in_output(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch, url: str, shown: str, secrets: list[str]
) -> None:
    """A password in the query string (?password=...) was shown, as were the driver's messages."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", SecretLeakingSqlAlchemy())
    code, out, err = run("build", tmp_path / "db", "a", "--from", url, "--table", "t", "--key", "k", "--json")
    assert code == 1 and f"cannot read from {shown}: could not connect to" in err
    for secret in secrets:
        assert secret not in out and secret not in err


def test_a_database_url_with_an_unescaped_at_in_its_password_is_refused(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``me:p@ss@host``: SQLAlchemy ends the password at the first '@' (and reads the host "ss@host"),
    and the redaction hid only "p". Refused before connecting, with nothing of the password shown."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", SecretLeakingSqlAlchemy())
    for url in ("postgresql://me:p@ss@db.example/app", "postgresql://me:p@ss/w@db.example/app?x=1"):
        code, out, err = run(
            "build", tmp_path / "db", "a", "--from", url, "--table", "t", "--key", "k", "--json"
        )
        assert code == 1 and "the database URL has a password and more than one '@'" in err
        assert "percent-encode every '@' but the one before the host as %40" in err
        assert "p@ss" not in out + err and "ss@" not in out + err and "ss/w" not in out + err
    assert not (tmp_path / "db").exists()


def test_sql_url_errors_while_reading_rows_are_source_errors(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver error mid-stream (a lost connection) is an error naming the source (exit 1), without
    the password, not a traceback."""
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER)")
        connection.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(10)])
    fake = FakeSqlAlchemy()
    create_engine = fake.create_engine

    def failing_engine(url: str) -> Any:
        engine = create_engine(url)
        connect = engine.connect

        def connected() -> Any:
            connection = connect()
            execute = connection.execute

            def rows(sql: str) -> Any:
                result = execute(sql)

                class Failing:
                    keys = result.keys
                    returns_rows = True

                    def __iter__(self) -> Iterator[Any]:
                        yield (1,)
                        raise RuntimeError(f"connection to {url} lost")

                return Failing()

            connection.execute = rows
            return connection

        engine.connect = connected
        return engine

    monkeypatch.setattr(fake, "create_engine", failing_engine)
    monkeypatch.setitem(sys.modules, "sqlalchemy", fake)
    url = f"postgresql://me:hunter2@{path}"
    code, out, err = run("build", tmp_path / "db", "a", "--from", url, "--table", "t", "--key", "k")
    assert (code, out) == (1, "")
    shown = f"postgresql://me:***@{path}"
    assert err == f"tallytree: error: cannot read from {shown}: connection to {shown} lost\n"
    assert not (tmp_path / "db").exists()


# ------------------------------------------------------------------ SIGTERM


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("command", ["build", "verify"])
def test_sigterm_during_a_build_or_verify_cleans_up_as_ctrl_c_does(
    tmp_path: Path, run: Any, command: str
) -> None:
    """SIGTERM (kill, timeout, docker stop) ended the process on the spot: a new aggregate stayed
    defined, the sort runs stayed on disk. It now takes Ctrl-C's path and exits with 143.

    Deterministic: the source is standard input, fed by the test and left open, so the process is
    blocked reading it when the signal comes; the signal is sent once a sort run exists on disk (the
    build has defined its aggregate and read past the first 32,768 rows)."""
    database = tmp_path / "db"
    old = tmp_path / "old.csv"
    old.write_text("k,id,v\n1,a,1\n")
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    assert run("build", database, "old", "--from", old, *argv, "--quiet")[0] == 0
    runs = tmp_path / "runs"
    runs.mkdir()
    target = "new" if command == "build" else "old"
    extra = ["--repair"] if command == "verify" else []  # a write transaction, which must be aborted
    source = ["--from", "-", "--format", "csv", *argv, "--memory", "1K", "--temp-dir", str(runs)]
    process = subprocess.Popen(
        [sys.executable, "-m", "tallytree", command, str(database), target, *source, "--quiet", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stderr is not None
    try:
        process.stdin.write(b"k,id,v\n" + b"".join(b"%d,e%d,1\n" % (n, n) for n in range(60_000)))
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while not list(runs.glob("tallytree-sort-*/run-*")):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no sort run was written"
            time.sleep(0.01)
        if command == "build":
            assert sorted(aggregates_of(database)) == ["new", "old"]  # defined for the build
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
    err = process.stderr.read().decode()
    process.stderr.close()
    assert process.stdout is not None and process.stdout.read() == b""
    process.stdout.close()
    assert (code, err) == (143, "tallytree: error: terminated (SIGTERM); nothing was written\n")
    assert list(runs.iterdir()) == []  # the sort runs are removed
    assert aggregates_of(database) == ["old"]
    assert run("query", database, "old", "totals") == (0, "count=1 v=1\n", "")
    assert run("check", database) == (0, "ok: no problems found\n", "")


SIGNAL_IN_COMMIT = """\
import os, signal, sys
from tallytree import _txn
from tallytree.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner ignores SIGINT
when, signum = sys.argv[1], int(sys.argv[2])
commit = _txn.WriteTransaction.commit


def signalled(self):
    if when == "before":  # the signal comes as the commit begins: its handler runs before LMDB's
        os.kill(os.getpid(), signum)
    commit(self)
    if when == "after":  # as if it came during LMDB's commit: its handler runs once that returns
        os.kill(os.getpid(), signum)


_txn.WriteTransaction.commit = signalled
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", ["build", "verify"])
def test_a_signal_during_the_commit_lets_it_complete_and_says_so(
    tmp_path: Path, run: Any, command: str, signum: int, when: str
) -> None:
    """Ctrl-C or SIGTERM during the commit: its handler ran once LMDB's commit had returned, and the
    command said "nothing was written" (exit 130 or 143) with everything written. From the commit
    on, a signal is only noted: the commit completes, the command reports it (exit 0) and says when
    the signal came. Deterministic: the signal is sent from inside a patched commit."""
    database = tmp_path / "db"
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("k,id,v\n1,a,1\n2,b,2\n")
    new.write_text("k,id,v\n1,a,1\n2,b,2\n3,c,5\n")
    assert run("build", database, "a", "--from", old, *KEY_ID_SUM, "--quiet")[0] == 0
    extra = ["--repair"] if command == "verify" else []
    child = [sys.executable, "-c", SIGNAL_IN_COMMIT, when, str(signum)]
    result = subprocess.run(
        [*child, command, str(database), "a", "--from", str(new), *KEY_ID_SUM, *extra, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    name = signal.Signals(signum).name
    what = "the build is in place (3 items)" if command == "build" else "the repair is in place"
    assert (result.returncode, result.stderr) == (
        0,
        f"tallytree: note: {name} arrived during the commit, which cannot be interrupted; it completed: "
        f"{what}\n",
    )
    document = json.loads(result.stdout)
    assert document["signal_during_commit"] == name
    assert document["items" if command == "build" else "repaired"] == (3 if command == "build" else 1)
    assert run("query", database, "a", "totals") == (0, "count=3 v=8\n", "")
    assert run("check", database) == (0, "ok: no problems found\n", "")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_ctrl_c_during_the_commit_of_a_drop_does_not_say_nothing_was_written(
    tmp_path: Path, run: Any
) -> None:
    database = tmp_path / "db"
    source = tmp_path / "s.csv"
    source.write_text("k,id,v\n1,a,1\n")
    assert run("build", database, "a", "--from", source, *KEY_ID_SUM, "--quiet")[0] == 0
    child = [sys.executable, "-c", SIGNAL_IN_COMMIT, "after", str(int(signal.SIGINT))]
    result = subprocess.run(
        [*child, "drop", str(database), "a", "--yes"], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (
        0,
        f"dropped aggregate 'a' from {database}: 1 items in 1 namespace(s)\n",
    )
    assert result.stderr == (
        "tallytree: note: SIGINT arrived during the commit, which cannot be interrupted; it completed: the "
        "drop is done\n"
    )
    assert aggregates_of(database) == []


def test_a_failed_build_leaves_the_previous_contents(built: Path, tmp_path: Path, run: Any) -> None:
    before = run("query", built, "events", "totals", "--namespace", "org:1", "--json")[1]
    source = write_jsonl(tmp_path / "more.jsonl", EVENTS[:50])
    with source.open("a") as file:
        file.write('{"org": "org:1", "ts": "not a date", "id": "zz", "cost": 1, "tokens": 1}\n')
    assert run("build", built, "events", "--from", source, *BUILD)[0] == 1
    assert run("query", built, "events", "totals", "--namespace", "org:1", "--json")[1] == before
    assert run("check", built)[0] == 0


def test_a_failed_build_into_a_new_path_leaves_no_database(tmp_path: Path, run: Any) -> None:
    """A build that fails into a path that held no database removes the database it created, and
    the directories it made for it; one into a database that existed before the build (even an empty
    one) leaves that database, without the aggregate the build defined."""
    source = tmp_path / "bad.csv"
    source.write_text("k,id,v\n1,a,1\n2,b,oops\n")
    argv = ["--key", "k", "--id", "id", "--sum", "v"]
    nested = tmp_path / "new" / "deeper" / "db"
    code, _, err = run("build", nested, "n", "--from", source, *argv)
    assert code == 1 and "line 3: field 'v' is" in err
    assert list(tmp_path.iterdir()) == [source]
    empty = tmp_path / "empty"
    tallytree.open(empty).close()  # a database with nothing in it, made before the build
    other = tmp_path / "other"
    assert run("build", other, "kept", "--from", source, *argv, "--on-error", "skip")[0] == 0
    for database in (empty, other):
        before = sorted(path.name for path in database.iterdir())
        assert run("build", database, "n", "--from", source, *argv)[0] == 1
        assert sorted(path.name for path in database.iterdir()) == before
    assert aggregates_of(empty) == [] and aggregates_of(other) == ["kept"]
    assert run("query", other, "kept", "totals") == (0, "count=1 v=1\n", "")


def table_owned(database: Path) -> None:
    """A database with aggregate ``owned`` maintained by table ``events`` (five documents)."""
    with tallytree.open(database) as db:
        table = db.table("events")
        table.aggregate("owned", key="ts", namespace="org", values=("cost", "tokens"))
        with db.write() as tx:
            for row in EVENTS[:5]:
                table.insert(tx, {**row, "ts": when(row)}, id=row["id"])


def assert_table_owned_intact(database: Path) -> None:
    with tallytree.open(database, readonly=True) as db:
        table, owned = db.table("events"), db.aggregate("owned", create=False)
        with db.read() as tx:
            assert owned.count(tx, namespace="org:0") == 2 and table.count(tx) == 5
            assert tallytree.verify(tx, owned, table).ok


@pytest.mark.parametrize(
    ("source", "options"),
    [
        ("csv", []),
        ("csv", ["--append"]),
        ("jsonl", ["--append", "--on-duplicate", "last"]),
        ("jsonl", ["--on-error", "skip", "--fill", "1.0"]),
        ("sqlite", []),
    ],
)
def test_build_refuses_an_aggregate_a_table_maintains(
    tmp_path: Path, sources: dict[str, Path], run: Any, source: str, options: list[str]
) -> None:
    """Loading items into it directly would make it disagree with the table: nothing is written."""
    database = tmp_path / "db"
    table_owned(database)
    where = ["--from", sources[source]] if source != "sqlite" else []
    if source == "sqlite":
        path = tmp_path / "app.sqlite"
        with sqlite3.connect(path) as connection:
            connection.execute(f"CREATE TABLE events ({', '.join(FIELDS)})")
            connection.executemany(
                f"INSERT INTO events VALUES ({', '.join('?' * len(FIELDS))})",
                [tuple(row[name] for name in FIELDS) for row in EVENTS],
            )
        where = ["--from", str(path), "--table", "events"]
    code, out, err = run("build", database, "owned", *where, *BUILD, *options, "--json")
    assert code == 1
    assert "aggregate 'owned' is maintained by table 'events': write through the table" in err
    assert "detach()" in err and json.loads(out)["exit_code"] == 1
    assert_table_owned_intact(database)


def test_build_loads_a_table_aggregate_once_detached(
    tmp_path: Path, sources: dict[str, Path], run: Any
) -> None:
    """The way out the refusal names: a detached aggregate is an ordinary one. And verify --repair
    refuses an attached one as build does."""
    database = tmp_path / "db"
    table_owned(database)
    code, _, err = run("verify", database, "owned", "--from", sources["csv"], *BUILD, "--repair")
    assert code == 1 and "is maintained by table 'events'" in err
    assert_table_owned_intact(database)
    with tallytree.open(database) as db:
        db.table("events").detach("owned")
    code, out, _ = run("build", database, "owned", "--from", sources["csv"], *BUILD, "--json")
    assert code == 0 and json.loads(out)["items"] == 300


# ------------------------------------------------------------------ not found, usage


def test_not_found_is_exit_code_4(tmp_path: Path, built: Path, run: Any) -> None:
    code, _, err = run("build", tmp_path / "db2", "x", "--from", tmp_path / "missing.csv", "--key", "ts")
    assert (code, err) == (4, f"tallytree: error: source {tmp_path / 'missing.csv'} not found\n")
    assert not (tmp_path / "db2").exists()
    assert run("query", tmp_path / "nowhere", "events", "count")[0] == 4
    code, _, err = run("query", built, "nope", "count")
    assert code == 4 and "no aggregate 'nope'" in err and "(it has: events)" in err
    code, _, err = run("query", built, "events", "count", "--namespace", "org:9")
    assert code == 4 and "no namespace org:9" in err
    assert run("query", built, "events", "count", "--namespace", "org:9", "--missing-ok")[1] == "0\n"
    assert run("check", built, "nope")[0] == 4
    assert run("namespaces", built, "nope")[0] == 4


def test_a_directory_that_is_not_a_database(tmp_path: Path, sources: dict[str, Path], run: Any) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    code, _, err = run("check", foreign)
    assert code == 1 and "non-empty directory without a database" in err
    code, _, err = run("build", foreign, "x", "--from", sources["csv"], *BUILD)
    assert code == 1 and "refusing to create one among foreign files" in err
    code, _, err = run("build", tmp_path / "db", "x", "--from", tmp_path, *BUILD)
    assert code == 1 and "is a directory" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["build", "db", "a", "--from", "x.csv"], "the following arguments are required: --key"),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--fill", "2"],
            "--fill 2.0 must be from 0.5 to 1.0",
        ),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--memory", "lots"],
            "--memory 'lots' is not a size",
        ),
        (["build", "db", "a", "--from", "x.csv", "--key", "k", "--key-type", "date"], "the type is one of"),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--where", "k"],
            "--where 'k' is not FIELD=VALUE",
        ),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--sum", "k=k", "--sum", "k"],
            "--sum 'k': the field 'k' is named twice",
        ),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--sum", "n=k,n=k"],
            "--sum 'n=k': the field 'n' is named twice",
        ),
        (
            ["build", "db", "a", "--from", "x.csv", "--key", "k", "--table", "t", "--query", "SELECT 1"],
            "argument --query: not allowed with argument --table",
        ),
        (
            ["verify", "db", "a", "--from", "x.csv", "--key", "k", "--query", "SELECT 1", "--table", "t"],
            "argument --table: not allowed with argument --query",
        ),
        (["query", "db", "a", "rank"], "query rank needs a KEY"),
        (["query", "db", "a", "count", "5"], "query count takes no argument"),
        (["query", "db", "a", "sum"], "invalid choice: 'sum'"),
        (["check", "db", "--namespace", "x"], "check --namespace needs an AGGREGATE"),
        (["drop", "db"], "one of the arguments AGGREGATE --table is required"),
        (
            ["drop", "db", "a", "--table", "t", "--yes"],
            "argument --table: not allowed with argument AGGREGATE",
        ),
    ],
)
def test_bad_usage_is_exit_code_2(tmp_path: Path, run: Any, argv: list[str], message: str) -> None:
    source = tmp_path / "x.csv"
    source.write_text("k\n1\n")
    argv = [str(source) if arg == "x.csv" else str(tmp_path / "db") if arg == "db" else arg for arg in argv]
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_help_and_version(run: Any) -> None:
    for command in ("build", "query", "check", "verify", "stats", "namespaces", "drop", "demo"):
        code, out, _ = run(command, "--help")
        assert code == 0 and out.startswith(f"usage: tallytree {command}") and "--json" in out
    code, out, _ = run("--help")  # every exit code a script may see, 130 and 143 included
    assert code == 0 and "130 interrupted (Ctrl-C), 143 terminated (SIGTERM)" in " ".join(out.split())
    code, out, _ = run("--version")
    assert (code, out) == (0, f"tallytree {tallytree.__version__}\n")


def test_errors_are_json_too_with_json(built: Path, run: Any) -> None:
    code, out, err = run("query", built, "nope", "count", "--json")
    assert code == 4 and json.loads(out) == {
        "error": err.removeprefix("tallytree: error: ").strip(),
        "exit_code": 4,
    }


# ------------------------------------------------------------------ query


def test_eight_digit_dates_are_basic_iso_dates_not_epoch_seconds(tmp_path: Path, run: Any) -> None:
    """``20240131`` was read as epoch seconds (1970-08-23). Eight digits that form a date are that
    date, as text (CSV, JSON Lines, a query bound) or a JSON number; eight digits that form none stay
    epoch seconds, and a date with no such day is a malformed record."""
    source = tmp_path / "days.csv"
    source.write_text("day,id,v\n20240131,a,1\n2024-02-01,b,2\n20240229,c,4\n12345678,d,8\n")
    jsonl = write_jsonl(tmp_path / "days.jsonl", [{"day": 20240131, "id": "a", "v": 1}])
    argv = ["--key", "day", "--key-type", "datetime", "--id", "id", "--sum", "v"]
    assert run("build", tmp_path / "db", "days", "--from", source, *argv)[0] == 0
    assert run("build", tmp_path / "db", "json", "--from", jsonl, *argv)[0] == 0
    code, out, _ = run("query", tmp_path / "db", "days", "items", "--json")
    days = [item["key"] for item in json.loads(out)["items"]]
    expected = [
        datetime(1970, 5, 23, 21, 21, 18),
        *(datetime(2024, m, d) for m, d in ((1, 31), (2, 1), (2, 29))),
    ]
    assert days == [day.replace(tzinfo=UTC).isoformat() for day in expected]
    code, out, _ = run("query", tmp_path / "db", "json", "items", "--json")
    assert [item["key"] for item in json.loads(out)["items"]] == [days[1]]
    assert run("query", tmp_path / "db", "days", "totals", "--ge", "20240201") == (0, "count=2 v=6\n", "")
    source.write_text("day,id,v\n20240131,a,1\n20230229,b,2\n")
    code, _, err = run("build", tmp_path / "db", "days", "--from", source, *argv)
    assert code == 1 and "line 3: field 'day' is \"20230229\": not a date: YYYYMMDD with no such day" in err


def test_infinite_float_keys_are_strict_json_and_infinity_is_a_bound(tmp_path: Path, run: Any) -> None:
    """--json printed the bare Infinity of Python's json module (not JSON: strict parsers refuse
    the document); and --lt Infinity was the text "Infinity" (after every number). Infinite floats
    are now {"float": "Infinity"} in JSON, and Infinity and -Infinity on the command line are the
    float infinities ("Infinity" in quotes stays text)."""
    source = tmp_path / "inf.jsonl"
    source.write_text(
        '{"k": 1.5, "id": "a", "v": 1}\n{"k": Infinity, "id": "b", "v": 2}\n'
        '{"k": -Infinity, "id": "c", "v": 3}\n{"k": "Infinity", "id": "d", "v": 4}\n'
    )
    database = tmp_path / "db"
    assert run("build", database, "a", "--from", source, *KEY_ID_SUM, "--quiet") == (0, "", "")
    code, out, _ = run("query", database, "a", "items", "--json")
    document = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert [item["key"] for item in document["items"]] == [
        {"float": "-Infinity"},
        1.5,
        {"float": "Infinity"},
        "Infinity",
    ]
    for bound, expected in [
        (["--lt", "Infinity"], "2"),
        (["--ge", "Infinity"], "2"),
        (["--gt=-Infinity"], "3"),  # with =: argparse reads a separate -Infinity as an option
        (["--eq", "Infinity"], "1"),
        (["--eq", '"Infinity"'], "1"),
        (["--lt", '"Infinity"'], "3"),
    ]:
        assert run("query", database, "a", "count", *bound) == (0, f"{expected}\n", ""), bound
    code, out, _ = run("query", database, "a", "max", "--lt", '"Infinity"', "--json")
    assert json.loads(out)["key"] == {"float": "Infinity"}
    code, out, _ = run("query", database, "a", "items", "--limit", "3")
    assert code == 0 and out.splitlines()[:3] == ["-Infinity  c  v=3", "1.5  a  v=1", "Infinity  b  v=2"]
    assert run("query", database, "a", "rank", "Infinity") == (0, "2\n", "")  # text output reads back


def test_query_operations(built: Path, run: Any) -> None:
    rows = org_rows("org:2")
    ns = ["--namespace", "org:2"]
    start, stop = "2024-02-01", "2024-03-01T00:00:00+00:00"
    inside = [
        row
        for row in rows
        if datetime(2024, 2, 1, tzinfo=UTC) <= when(row) < datetime(2024, 3, 1, tzinfo=UTC)
    ]
    assert run("query", built, "events", "count", *ns, "--ge", start, "--lt", stop)[1] == f"{len(inside)}\n"
    epoch = str(int(datetime(2024, 2, 1, tzinfo=UTC).timestamp()))
    assert run("query", built, "events", "count", *ns, "--ge", epoch, "--lt", stop)[1] == f"{len(inside)}\n"
    code, out, _ = run("query", built, "events", "totals", *ns, "--ge", start, "--lt", stop, "--json")
    assert json.loads(out) == {
        "count": len(inside),
        "cost": math.fsum(row["cost"] for row in inside),
        "tokens": sum(row["tokens"] for row in inside),
    }
    assert run("query", built, "events", "rank", start, *ns)[1] == f"{rows.index(inside[0])}\n"
    assert (
        run("query", built, "events", "rank", start, *ns, "--reverse")[1]
        == f"{len(rows) - rows.index(inside[0])}\n"
    )
    code, out, _ = run("query", built, "events", "at", "-1", *ns, "--json")
    assert json.loads(out)["id"] == rows[-1]["id"]
    code, out, _ = run("query", built, "events", "at", "0", *ns)
    assert (
        out == f"{when(rows[0]).isoformat()}  {rows[0]['id']}  cost={rows[0]['cost']!r} "
        f"tokens={rows[0]['tokens']}\n"
    )
    code, _, err = run("query", built, "events", "at", "1000", *ns)
    assert code == 1 and "out of range" in err
    code, _, err = run("query", built, "events", "at", "first", *ns)
    assert code == 2 and "integer INDEX" in err
    assert json.loads(run("query", built, "events", "min", *ns, "--json")[1])["id"] == rows[0]["id"]
    assert json.loads(run("query", built, "events", "max", *ns, "--gt", "2030-01-01", "--json")[1]) is None
    assert run("query", built, "events", "max", *ns, "--gt", "2030-01-01")[1] == "(no items)\n"
    code, _, err = run("query", built, "events", "count", *ns, "--ge", "tomorrow")
    assert code == 1 and "--ge 'tomorrow': not a datetime" in err


def test_query_buckets(built: Path, run: Any) -> None:
    rows = org_rows("org:0")
    argv = ["query", built, "events", "buckets", "--namespace", "org:0", "--start", "2024-01-01"]
    code, out, _ = run(*argv, "--width", "1w", "--count", "3", "--json")
    weeks = json.loads(out)
    assert code == 0 and len(weeks) == 3
    for index, bucket in enumerate(weeks):
        low, high = T0 + timedelta(weeks=index), T0 + timedelta(weeks=index + 1)
        assert bucket["start"] == low.isoformat()
        assert bucket["count"] == sum(1 for row in rows if low <= when(row) < high)
    code, out, _ = run(*argv, "--width", "month", "--count", "2")
    assert out.splitlines()[1].startswith("2024-02-01T00:00:00+00:00  count=")
    code, _, err = run(*argv, "--width", "fortnight", "--count", "2")
    assert code == 2 and "--width 'fortnight'" in err
    assert run(*argv[:-2], "--count", "2")[0] == 2


def test_query_buckets_takes_the_library_units_in_any_case(built: Path, run: Any) -> None:
    """Regression: --width took the words month, quarter and year but not hour, day and week, which the
    library names too (the library's unit names are case-insensitive, like --width)."""
    argv = ["query", built, "events", "buckets", "--namespace", "org:0", "--start", "2024-01-01"]
    for width, step in (
        ("day", timedelta(days=1)),
        ("2Days", timedelta(days=2)),
        ("WEEK", timedelta(weeks=1)),
    ):
        code, out, err = run(*argv, "--width", width, "--count", "2", "--json")
        assert (code, err) == (0, ""), width
        assert [bucket["start"] for bucket in json.loads(out)] == [T0.isoformat(), (T0 + step).isoformat()]
    code, out, _ = run(*argv, "--width", "3hours", "--count", "2", "--json")
    assert [bucket["end"] for bucket in json.loads(out)][-1] == (T0 + timedelta(hours=6)).isoformat()
    code, _, err = run(*argv, "--width", "fortnight", "--count", "2")
    assert code == 2 and "day, week, month" in err


def test_query_items_pages_with_a_cursor(built: Path, run: Any) -> None:
    rows = org_rows("org:3")
    seen: list[str] = []
    cursor: list[str] = []
    while True:
        code, out, _ = run(
            "query", built, "events", "items", "--namespace", "org:3", "--limit", "30", *cursor, "--json"
        )
        assert code == 0
        page = json.loads(out)
        seen.extend(item["id"] for item in page["items"])
        if page["done"]:
            break
        cursor = ["--after", page["cursor"]]
    assert seen == [row["id"] for row in rows]
    _, out, _ = run("query", built, "events", "items", "--namespace", "org:3", "--limit", "2", "--reverse")
    lines = out.splitlines()
    assert [line.split()[1] for line in lines[:2]] == [rows[-1]["id"], rows[-2]["id"]]
    assert lines[2].startswith("# more: --after ")


# ------------------------------------------------------------------ check, stats, namespaces


def test_check_passes_and_fails(built: Path, run: Any) -> None:
    assert run("check", built) == (0, "ok: no problems found\n", "")
    assert json.loads(run("check", built, "events", "--namespace", "org:1", "--json")[1]) == {
        "ok": True,
        "problems": [],
    }
    import lmdb

    environment = lmdb.open(str(built), max_dbs=8)
    roots = environment.open_db(b"roots")
    with environment.begin(write=True) as txn:
        key, value = next(iter(txn.cursor(db=roots)))
        node_id, height, summary = tallytree._txn.decode_root(value).node_id, 1, [1, 0, 0, 0, 0]
        txn.put(
            key, tallytree._txn.encode_root(tallytree._btree.Root(node_id, height + 5, summary)), db=roots
        )
    environment.close()
    code, out, _ = run("check", built)
    assert code == 3 and "problem(s)" in out and "height is 6" in out
    code, out, _ = run("check", built, "--json")
    assert code == 3 and json.loads(out)["ok"] is False


def test_damage_met_by_build_or_verify_is_exit_code_3(
    built: Path, sources: dict[str, Path], run: Any
) -> None:
    """A damaged node met while reading the stored items was reported as a failure of the source
    (exit 1, "events.csv: node ... cannot be decoded"); it is the database's, exit 3, as for query."""
    import lmdb

    environment = lmdb.open(str(built), max_dbs=8)
    nodes = environment.open_db(b"nodes")
    with environment.begin(write=True) as txn:
        for key in list(txn.cursor(db=nodes).iternext(values=False)):
            txn.put(key, b"\xc1" * 24, db=nodes)  # 0xc1: never used by msgpack
    environment.close()
    for command, extra in [
        ("verify", []),
        ("verify", ["--repair"]),
        ("build", ["--append", "--on-duplicate", "last"]),
    ]:
        code, out, err = run(command, built, "events", "--from", sources["csv"], *BUILD, *extra, "--json")
        assert code == 3, (command, err)
        assert json.loads(out)["exit_code"] == 3 and not err.startswith(f"tallytree: error: {sources['csv']}")


def test_stats(tmp_path: Path, sources: dict[str, Path], run: Any) -> None:
    built = tmp_path / "db"  # nodes of 64 entries: 75 items per namespace make trees of two levels
    code, _, err = run(
        "build", built, "events", "--from", sources["csv"], *BUILD, "--node-size", "64", "--quiet"
    )
    assert (code, err) == (0, "")
    code, out, _ = run("stats", built, "--json")
    document = json.loads(out)
    [events] = document["aggregates"]
    assert code == 0 and document["database_bytes"] > 0
    assert (events["name"], events["items"], events["namespaces"], events["depth"]) == ("events", 300, 4, 2)
    assert events["leaves"] >= 4 and events["internal_nodes"] == 4 and events["bytes"] > 0
    assert 0 < events["fill"] <= 1
    code, out, _ = run("stats", built)
    assert "events (values: cost, tokens; node size 64): 300 items in 4 namespace(s), depth 2" in out
    assert events["pending_items"] == 0 and "pending" not in out
    with tallytree.open(built) as db:  # single inserts wait in their trees' pending nodes
        aggregate = db.aggregate("events")
        for number in range(3):
            with db.write() as tx:
                aggregate.insert(
                    tx, datetime(2030, 1, 1, tzinfo=UTC), f"late{number}", (0.5, 1), namespace="new"
                )
    code, out, _ = run("stats", built, "--json")
    [events] = json.loads(out)["aggregates"]
    assert (events["items"], events["pending_items"], events["namespaces"]) == (303, 3, 5)
    assert events["bytes"] > document["aggregates"][0]["bytes"]  # the pending node its record holds
    code, out, _ = run("stats", built)
    assert "303 items in 5 namespace(s)" in out and "; 3 pending inserts" in out
    assert run("check", built)[0] == 0


def test_namespaces_are_paged(built: Path, run: Any) -> None:
    code, out, _ = run("namespaces", built, "events", "--limit", "3")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].startswith("org:0  count=75 cost=")
    assert lines[-1] == "# more: --after org:2"
    _, out, _ = run("namespaces", built, "events", "--after", "org:2", "--json")
    document = json.loads(out)
    assert [space["namespace"] for space in document["namespaces"]] == ["org:3"]
    assert document["done"] is True and document["next"] is None


def test_namespaces_after_names_its_option_in_errors(built: Path, run: Any) -> None:
    code, _, err = run("namespaces", built, "events", "--after", '{"org": 1}')
    assert code == 2 and err.startswith("tallytree: error: --after '{\"org\": 1}': ")


def _user_namespaces(path: Path, orgs: int, users: int) -> Path:
    """A database whose aggregate ``usage`` has the namespaces ``("org", o, "user", u)``, the default
    namespace and ``"org:7"``."""
    with tallytree.open(path, durable=False) as db:
        usage = db.aggregate("usage", values=("tokens",))
        with db.write() as tx:
            for org in range(orgs):
                for user in range(users):
                    usage.insert(tx, 0, "x", (user,), namespace=("org", org, "user", user))
            usage.insert(tx, 0, "x", (1,))
            usage.insert(tx, 0, "x", (1,), namespace="org:7")
    return path


def test_namespaces_bounds_prefix_and_reverse(tmp_path: Path, run: Any) -> None:
    """--prefix lists the tuple namespaces under it, --reverse pages from the end, the bounds read
    namespace values, and paging with --after (null: after the default namespace) ends."""
    database = _user_namespaces(tmp_path / "db", 3, 3)

    def names(*argv: str) -> list[Any]:
        code, out, err = run("namespaces", database, "usage", "--json", *argv)
        assert (code, err) == (0, ""), argv
        return [space["namespace"] for space in json.loads(out)["namespaces"]]

    assert names("--prefix", '["org", 1]') == [["org", 1, "user", user] for user in range(3)]
    assert names("--prefix", '["org", 1]', "--reverse", "--limit", "2") == [
        ["org", 1, "user", 2],
        ["org", 1, "user", 1],
    ]
    assert names("--ge", "org:", "--lt", "org;") == ["org:7"]
    assert names("--eq", '["org", 2, "user", 1.0]') == [["org", 2, "user", 1]]
    assert names("--gt", '["org", 2, "user", 1]', "--limit", "1") == [["org", 2, "user", 2]]
    assert names("--limit", "1") == [None]
    assert names("--after", "null", "--limit", "1") == ["org:7"]
    seen: list[Any] = []
    argv = ["--reverse", "--limit", "4"]
    while True:  # text output, following its "# more" line: the default namespace ends the listing
        code, out, _ = run("namespaces", database, "usage", *argv)
        lines = out.splitlines()
        more = lines.pop() if lines[-1].startswith("# more: ") else None
        seen += [line.split("  ")[0] for line in lines]
        if more is None:
            break
        argv = ["--reverse", "--limit", "4", *shlex.split(more.removeprefix("# more: "))]
    assert len(seen) == 11 and seen[0] == '["org", 2, "user", 2]' and seen[-2:] == ["org:7", "null"]
    code, _, err = run("namespaces", database, "usage", "--ge", "a", "--gt", "b")
    assert code == 1 and "at most one lower bound" in err
    code, _, err = run("namespaces", database, "usage", "--prefix", '{"a": 1}')
    assert code == 2 and err.startswith("tallytree: error: --prefix")


def test_a_namespaces_page_deep_into_many_reads_only_that_page(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page read every namespace before --after (and the whole list); now it pulls the page and
    one more record from the LMDB scan, counted here, whatever its depth."""
    from tallytree._lmdb import _LmdbTxn

    database = _user_namespaces(tmp_path / "db", 20, 100)
    pulled: list[bytes] = []
    scan = _LmdbTxn.scan

    def counting(self: Any, table: int, start: bytes, stop: bytes | None, reverse: bool = False) -> Any:
        for record in scan(self, table, start, stop, reverse):
            pulled.append(record[0])
            yield record

    monkeypatch.setattr(_LmdbTxn, "scan", counting)
    code, out, _ = run("namespaces", database, "usage", "--after", '["org", 18, "user", 90]', "--limit", "5")
    assert code == 0
    assert out.splitlines()[-1] == """# more: --after '["org", 18, "user", 95]'"""
    first = (1).to_bytes(4, "big") + encode_key(None)  # opening the aggregate reads its first record
    assert pulled[0] == first and len(pulled[1:]) == 6
    pulled.clear()
    code, out, _ = run(
        "namespaces", database, "usage", "--prefix", '["org", 19]', "--reverse", "--limit", "5"
    )
    assert code == 0 and out.splitlines()[0].startswith('["org", 19, "user", 99]  count=1 tokens=99')
    assert pulled[0] == first and len(pulled[1:]) == 6


@pytest.mark.parametrize("name", ["namespace", "start", "end"])
def test_sums_named_like_the_json_output_keys_are_refused(tmp_path: Path, run: Any, name: str) -> None:
    """A summed field named namespace, start or end overwrote that key of `namespaces --json` or
    `query buckets --json` (they print the sums beside their own keys, as `count`, which the library
    reserves). build refuses the names for a new aggregate; an aggregate the library defined with
    one is refused by the JSON output that would merge them, and read in text."""
    source = tmp_path / "s.csv"
    source.write_text("k,id,v\n1,a,5\n2,b,7\n")
    database = tmp_path / "db"
    code, out, err = run(
        "build", database, "a", "--from", source, "--key", "k", "--id", "id", "--sum", f"{name}=v"
    )
    assert (code, out) == (1, "")
    assert f"the value field name {name!r} is reserved: `tallytree " in err and "pick another name" in err
    assert not database.exists()
    with tallytree.open(database) as db:  # the library defines it
        aggregate = db.aggregate("a", values=(name,))
        with db.write() as tx:
            aggregate.insert_many(tx, [(1, "a", (5,)), (2, "b", (7,))], namespace="n")
    argv = ["--namespace", "n", "--start", "0", "--width", "10", "--count", "1"]
    command = (
        ["namespaces", database, "a"] if name == "namespace" else ["query", database, "a", "buckets", *argv]
    )
    code, out, err = run(*command, "--json")
    assert code == 1 and f"aggregate 'a' has a value field named {name!r}" in err
    assert json.loads(out) == {"error": err.removeprefix("tallytree: error: ").strip(), "exit_code": 1}
    code, out, _ = run(*command)
    assert code == 0 and f"count=2 {name}=12" in out
    code, out, _ = run("query", database, "a", "totals", "--namespace", "n", "--json")
    assert json.loads(out) == {"count": 2, name: 12}  # no key of its own there


# ------------------------------------------------------------------ drop


def aggregate_names(database: Path) -> tuple[list[str], list[str]]:
    with tallytree.open(database, readonly=True) as db:
        return db.aggregates(), db.tables()


def test_drop_an_aggregate_leaves_the_others(built: Path, sources: dict[str, Path], run: Any) -> None:
    code, _, err = run("build", built, "costs", "--from", sources["jsonl"], *BUILD[:-1], "cost", "--quiet")
    assert (code, err) == (0, "")
    costs_before = run("query", built, "costs", "totals", "--namespace", "org:2", "--json")[1]
    code, out, err = run("drop", built, "events", "--yes")
    assert (code, out, err) == (
        0,
        f"dropped aggregate 'events' from {built}: 300 items in 4 namespace(s)\n",
        "",
    )
    assert aggregate_names(built) == (["costs"], [])
    code, _, err = run("query", built, "events", "count")
    assert code == 4 and "no aggregate 'events'" in err and "(it has: costs)" in err
    assert run("query", built, "costs", "totals", "--namespace", "org:2", "--json")[1] == costs_before
    assert run("check", built) == (0, "ok: no problems found\n", "")


def test_drop_json(built: Path, run: Any) -> None:
    code, out, err = run("drop", built, "events", "--yes", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"dropped": "aggregate", "name": "events", "items": 300, "namespaces": 4}
    assert aggregate_names(built) == ([], [])


def test_drop_refuses_without_yes(built: Path, tmp_path: Path, run: Any) -> None:
    """Nothing is deleted, nor even written (the database is opened read-only), and the refusal
    says what --yes would delete."""
    written = (built / "data.mdb").stat().st_mtime_ns
    code, out, err = run("drop", built, "events")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"drop would delete aggregate 'events' of {built}: 300 items in 4 namespace(s)" in err
    assert "pass --yes" in err
    code, out, err = run("drop", built, "events", "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2 and "300 items" in json.loads(out)["error"]
    assert (built / "data.mdb").stat().st_mtime_ns == written
    assert aggregate_names(built) == (["events"], [])
    for org in ("org:0", "org:1", "org:2", "org:3"):
        assert run("query", built, "events", "count", "--namespace", org)[1] == "75\n"
    database = tmp_path / "tables"
    table_owned(database)
    code, out, err = run("drop", database, "--table", "events")
    assert code == 2 and out == ""
    assert "drop would delete table 'events'" in err and "5 document(s) and 1 attached aggregate(s)" in err
    assert "owned: 5 items" in err and "pass --yes" in err
    assert_table_owned_intact(database)


def test_drop_a_table_with_its_documents_and_aggregates(
    tmp_path: Path, sources: dict[str, Path], run: Any
) -> None:
    database = tmp_path / "db"
    table_owned(database)
    assert run("build", database, "free", "--from", sources["csv"], *BUILD, "--quiet")[0] == 0
    code, out, err = run("drop", database, "--table", "events", "--yes", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "dropped": "table",
        "name": "events",
        "documents": 5,
        "aggregates": [{"name": "owned", "items": 5, "namespaces": 4}],
    }
    assert aggregate_names(database) == (["free"], [])
    with tallytree.open(database) as db:
        table = db.table("events")  # a new, empty table of the same name
        with db.read() as tx:
            assert table.count(tx) == 0 and table.aggregates() == []
    assert run("query", database, "free", "count", "--namespace", "org:0")[1] == "75\n"
    assert run("check", database)[0] == 0
    table_owned(tmp_path / "again")
    code, out, _ = run("drop", tmp_path / "again", "--table", "events", "--yes")
    assert code == 0
    assert out == (
        f"dropped table 'events' from {tmp_path / 'again'}: 5 document(s) and 1 attached aggregate(s) "
        "(owned: 5 items)\n"
    )


@pytest.mark.parametrize("options", [[], ["--yes"], ["--yes", "--json"]])
def test_drop_refuses_an_aggregate_a_table_maintains(tmp_path: Path, run: Any, options: list[str]) -> None:
    """It goes with its table: dropped alone, the table would no longer match it. --yes changes nothing."""
    database = tmp_path / "db"
    table_owned(database)
    code, out, err = run("drop", database, "owned", *options)
    assert code == 1 and err.count("\n") == 1
    assert "aggregate 'owned' is maintained by table 'events' and cannot be dropped on its own" in err
    assert "--table events" in err and "detach" in err
    if "--json" in options:
        assert json.loads(out) == {"error": err.removeprefix("tallytree: error: ").strip(), "exit_code": 1}
    else:
        assert out == ""
    assert aggregate_names(database) == (["owned"], ["events"])
    assert_table_owned_intact(database)


def test_drop_not_found_is_exit_code_4_and_creates_nothing(tmp_path: Path, built: Path, run: Any) -> None:
    nowhere, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    for database in (nowhere, empty, nowhere / "deeper"):
        for target in (["events"], ["--table", "events"]):
            code, _, err = run("drop", database, *target, "--yes")
            assert (code, err) == (4, f"tallytree: error: no tallytree database at {database}\n")
    assert not nowhere.exists() and list(empty.iterdir()) == []
    code, out, err = run("drop", built, "nope", "--yes", "--json")
    assert code == 4 and "no aggregate 'nope'" in err and "(it has: events)" in err
    assert json.loads(out)["exit_code"] == 4
    code, _, err = run("drop", built, "--table", "nope", "--yes")
    assert code == 4 and "no table 'nope'" in err and "(it has: none)" in err
    table_owned(tmp_path / "tables")
    code, _, err = run("drop", tmp_path / "tables", "events", "--yes")  # a table, not an aggregate
    assert code == 4 and "but a table of that name" in err and "use --table events" in err
    assert_table_owned_intact(tmp_path / "tables")
    assert aggregate_names(built) == (["events"], [])


def test_drop_then_build_again_after_a_killed_build(
    tmp_path: Path, sources: dict[str, Path], run: Any
) -> None:
    """A build killed after defining its aggregate (kill -9: no cleanup) leaves it defined and empty,
    with the fields of that build. A build with other fields is refused and names drop; after the
    drop, the build runs cleanly."""
    database = tmp_path / "db"
    killed = (
        "import os, sys\n"
        "from tallytree import cli\n"
        "cli._run_build = lambda *args: os._exit(9)  # killed once the aggregate is defined\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = ["build", str(database), "events", "--from", str(sources["csv"]), *BUILD[:-1], "cost", "--quiet"]
    result = subprocess.run([sys.executable, "-c", killed, *argv], capture_output=True, check=False)
    assert result.returncode == 9, result.stderr
    with tallytree.open(database, readonly=True) as db:  # left behind, empty, summing cost alone
        left = db.aggregate("events", create=False)
        with db.read() as tx:
            assert (left.fields, left.count(tx), list(left.namespaces(tx))) == (("cost",), 0, [])
    code, _, err = run("build", database, "events", "--from", sources["csv"], *BUILD, "--quiet")
    assert code == 1 and "sums ['cost'], not ['cost', 'tokens']" in err
    assert f"drop it: tallytree drop {database} events --yes" in err
    code, out, _ = run("drop", database, "events", "--yes")
    assert (code, out) == (0, f"dropped aggregate 'events' from {database}: 0 items in 0 namespace(s)\n")
    assert aggregate_names(database) == ([], [])
    code, out, err = run("build", database, "events", "--from", sources["csv"], *BUILD, "--json")
    assert (code, err) == (0, "") and json.loads(out)["items"] == 300
    assert run("query", database, "events", "count", "--namespace", "org:1")[1] == "75\n"
    assert run("check", database) == (0, "ok: no problems found\n", "")


# ------------------------------------------------------------------ verify


def test_verify_reports_drift_and_repairs_it(built: Path, tmp_path: Path, run: Any) -> None:
    argv = [
        "--key",
        "ts",
        "--key-type",
        "datetime",
        "--id",
        "id",
        "--namespace",
        "org",
        "--sum",
        "cost,tokens",
    ]
    source = write_csv(tmp_path / "same.csv", EVENTS)
    assert run("verify", built, "events", "--from", source, *argv)[:2] == (
        0,
        "verify events against "
        f"{source}: 300 source items, 300 stored\n"
        "  missing: 0 (in the source, not in the aggregate)\n"
        "  extra: 0 (in the aggregate, not in the source)\n"
        "  different: 0 (values differ)\n"
        "ok: the aggregate matches the source\n",
    )
    changed = [dict(row) for row in EVENTS[:-2]]  # the last two are gone: extra in the aggregate
    changed[5]["cost"] = 99.5  # different
    changed.append({**EVENTS[0], "id": "new"})  # missing from the aggregate
    drifted = write_csv(tmp_path / "drifted.csv", changed)
    code, out, _ = run("verify", built, "events", "--from", drifted, *argv, "--json")
    report = json.loads(out)
    assert code == 3
    assert (report["missing"]["count"], report["extra"]["count"], report["different"]["count"]) == (1, 2, 1)
    assert report["different"]["examples"] == [
        {
            "namespace": "org:1",
            "key": when(EVENTS[5]).isoformat(),
            "id": "e5",
            "stored": {"cost": EVENTS[5]["cost"], "tokens": 50},
            "source": {"cost": 99.5, "tokens": 50},
        }
    ]
    code, out, _ = run("verify", built, "events", "--from", drifted, *argv)
    assert code == 3 and "drift: 4 item(s); run again with --repair to fix it" in out
    code, out, _ = run("verify", built, "events", "--from", drifted, *argv, "--repair")
    assert code == 0 and "repaired: 4 item(s)" in out
    assert run("verify", built, "events", "--from", drifted, *argv)[0] == 0
    assert run("check", built)[0] == 0
    code, _, err = run("verify", built, "events", "--from", drifted, "--key", "ts", "--sum", "cost")
    assert code == 1 and "sums ['cost', 'tokens'], but --sum names ['cost']" in err


def test_verify_says_when_the_keys_differ_only_in_type(
    built: Path, sources: dict[str, Path], run: Any
) -> None:
    """A verify without the build's --key-type datetime reported every item missing and extra and
    suggested --repair, which rewrote every key. It now says that the key types differ, with the
    --key-type to give, and --repair refuses it (exit 1, nothing written) unless --force."""
    argv = [option for option in BUILD if option not in ("--key-type", "datetime")]
    code, out, _ = run("verify", built, "events", "--from", sources["csv"], *argv)
    assert code == 3 and "missing: 300" in out and "extra: 300" in out
    assert out.splitlines()[-1] == (
        "drift: 600 item(s); the stored keys are of type datetime and the source's of type text: the "
        "source is probably read with another --key-type than the build that stored them: verify again "
        "with --key-type datetime"
    )
    code, out, _ = run("verify", built, "events", "--from", sources["csv"], *argv, "--json")
    assert code == 3 and json.loads(out)["key_types"]["hint"] == "--key-type datetime"
    assert json.loads(out)["key_types"]["stored"] == ["datetime"]
    before = run("query", built, "events", "items", "--namespace", "org:1", "--limit", "2")
    code, out, err = run("verify", built, "events", "--from", sources["csv"], *argv, "--repair")
    assert (code, out) == (1, "")
    assert "--repair would rewrite every key, so nothing was written: verify again with --key-type" in err
    assert run("query", built, "events", "items", "--namespace", "org:1", "--limit", "2") == before
    code, out, _ = run("verify", built, "events", "--from", sources["csv"], *argv, "--repair", "--force")
    assert code == 0 and "repaired: 600 item(s)" in out
    assert run("verify", built, "events", "--from", sources["csv"], *argv)[0] == 0  # text keys now
    assert run("verify", built, "events", "--from", sources["csv"], *BUILD)[0] == 3
    document = json.loads(run("verify", built, "events", "--from", sources["csv"], *BUILD, "--json")[1])
    assert document["key_types"]["hint"] == "--key-type str"
    tuples = ["--key", "status,ts", "--key-type", "ts=datetime", "--id", "id", "--sum", "cost"]
    assert run("build", built, "pairs", "--from", sources["csv"], *tuples, "--quiet")[0] == 0
    code, out, _ = run("verify", built, "pairs", "--from", sources["csv"], *tuples[:2], *tuples[4:])
    assert code == 3 and out.splitlines()[-1].endswith(
        "the stored keys are of type (text, datetime) and the source's of type (text, text): the source "
        "is probably read with another --key-type than the build that stored them: verify again with "
        "--key-type ts=datetime"
    )


def test_verify_treats_a_repeated_item_as_build_does(tmp_path: Path, run: Any) -> None:
    """A source build refuses verifies as an error naming both lines, not as "ok" with the last row
    kept; --on-duplicate last compares what a build with it holds. --repair writes nothing then."""
    source = tmp_path / "dup.csv"
    source.write_text("ts,id,cost\n1,a,1\n2,b,2\n1,a,3\n")
    argv = ["--key", "ts", "--id", "id", "--sum", "cost"]
    database = tmp_path / "db"
    assert run("build", database, "d", "--from", source, *argv, "--on-duplicate", "last", "--quiet")[0] == 0
    twice = "item (key=1, id='a') appears twice in the input, line 2 and line 4;"
    assert run("build", database, "d", "--from", source, *argv)[0] == 1
    for extra in ([], ["--on-duplicate", "error"], ["--repair"], ["--json"]):
        code, out, err = run("verify", database, "d", "--from", source, *argv, *extra)
        assert code == 1 and twice in (err if "--json" not in extra else json.loads(out)["error"]), extra
        assert "ok:" not in out
    assert run("query", database, "d", "totals")[1] == "count=2 cost=5\n"
    code, out, _ = run("verify", database, "d", "--from", source, *argv, "--on-duplicate", "last")
    assert code == 0 and "2 source items, 2 stored" in out and "ok: the aggregate matches the source" in out
    source.write_text("ts,id,cost\n1,a,1\n2,b,2\n1,a,9\n")  # the last one wins: it differs
    code, out, _ = run("verify", database, "d", "--from", source, *argv, "--on-duplicate", "last")
    assert code == 3 and "different: 1" in out
    code, out, _ = run("verify", database, "d", "--from", source, *argv, "--on-duplicate", "last", "--repair")
    assert code == 0 and run("query", database, "d", "totals")[1] == "count=2 cost=11\n"


# ------------------------------------------------------------------ demo and the console script


def test_demo_json(tmp_path: Path, run: Any) -> None:
    code, out, _ = run("demo", tmp_path / "demo.tt", "--events", "3000", "--users", "20", "--json")
    report = json.loads(out)
    assert code == 0 and report["check_ok"] is True
    assert all(question["match"] for question in report["questions"])
    assert {question["question"] for question in report["questions"]} >= {
        "events in the last 7 days",
        "upcoming events (next 7 days)",
        "daily cost, 30 days",
        "rank of the median event",
    }


def test_demo_without_a_directory_removes_its_database(tmp_path: Path) -> None:
    """It left a database of about 15 MB in a new /tmp directory at every run."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "tallytree", "demo", "--events", "2000", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["database"].startswith(str(tmp_path))  # it was made there
    assert list(tmp_path.iterdir()) == []


def test_demo_as_the_readme_runs_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tallytree", "demo", str(tmp_path / "demo.tt"), "--events", "5000"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Bulk-built 2 aggregates" in result.stdout
    assert "MISMATCH" not in result.stdout
    assert result.stdout.rstrip().endswith("Invariant check: ok")


def test_console_script(built: Path) -> None:
    script = shutil.which("tallytree", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if script is None:
        pytest.skip("the tallytree console script is not installed")
    argv = [script, "query", str(built), "events", "count"]
    result = subprocess.run([*argv, "--namespace", "org:1"], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (0, "75\n")
    result = subprocess.run(argv, capture_output=True, text=True, check=False)  # the default namespace
    assert (result.returncode, result.stdout) == (0, "0\n")
    assert "the default namespace of 'events' is empty" in result.stderr
    result = subprocess.run(
        [script, "query", str(built), "nope", "count"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 4 and result.stderr.count("\n") == 1


def test_docs_commands_run(tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``$ tallytree`` line of docs/cli.md, against the files the page describes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write_csv(tmp_path / "events.csv", EVENTS)
    write_csv(tmp_path / "header-only.csv", [])
    lines = BAD_JSONL.split("\n")
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], lines[6], lines[3]]) + "\n")
    (tmp_path / "export.json").write_text(json.dumps(EVENTS[:3], indent=2))  # a JSON array
    with sqlite3.connect(tmp_path / "app.sqlite") as connection:
        connection.execute(f"CREATE TABLE events ({', '.join(FIELDS)})")
        connection.executemany(
            f"INSERT INTO events VALUES ({', '.join('?' * len(FIELDS))})",
            [tuple(row[name] for name in FIELDS) for row in EVENTS],
        )
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    commands = re.findall(r"^\$ (.*tallytree .*)$", text, flags=re.MULTILINE)
    assert len(commands) >= 15
    for line in commands:
        command, _, comment = line.partition("   # ")
        expected = int(comment.removeprefix("exit ")) if comment else 0
        if command.startswith("cat "):
            source, _, piped = command.removeprefix("cat ").partition(" | ")
            stdin = types.SimpleNamespace(buffer=io.BytesIO((tmp_path / source).read_bytes()))
            monkeypatch.setattr(sys, "stdin", stdin)
            command = piped
        argv = shlex.split(command)
        assert argv[0] == "tallytree"
        code, _, err = run(*argv[1:])
        assert code == expected, (command, err)


# ------------------------------------------------------------------ verify's memory, JSON Lines, compression


def drift_streams(count: int) -> tuple[Iterator[Any], Iterator[Any]]:
    """A source and a stored stream of ``3 * count`` items each, all drift: ``count`` missing,
    ``count`` extra and ``count`` different, every item a new object made as it is read."""
    from tallytree._keys import encode_id, encode_key

    namespace = encode_key("org:1")

    def items(side: int) -> Iterator[Any]:
        for number in range(3 * count):
            kind = number % 3  # 0: source only, 1: stored only, 2: both, with other values
            if kind in (2, side):
                yield namespace, encode_key(number) + encode_id(f"e{number}"), (float(number), number + side)

    return items(0), items(1)


def test_verify_holds_no_item_of_the_drift(tmp_path: Path) -> None:
    """verify without --repair kept a write for every item of drift (1,000,000 items of drift took
    310 MB more than a build of the same source): it holds only counts and the examples now."""
    import tracemalloc

    from tallytree.cli import _Drift

    db = tallytree.open_memory()
    aggregate = db.aggregate("events", values=("cost", "tokens"))
    source, stored = drift_streams(20_000)
    drift = _Drift(aggregate, 5)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        drift.compare(source, stored)
        grown = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert drift.counts == {"missing": 20_000, "extra": 20_000, "different": 20_000}
    assert (drift.source_items, drift.stored_items) == (40_000, 40_000)
    assert [len(examples) for examples in drift.examples.values()] == [5, 5, 5]
    assert grown < 256 * 1024  # 60,000 items of drift held would be several MB


def test_verify_repair_spools_its_writes(
    built: Path, tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--repair collects its writes in a Spool (a block in memory, the rest in a nameless file in
    --temp-dir), applies them after the compare, and the aggregate then matches the source."""
    from tallytree import _bulk

    monkeypatch.setattr(_bulk, "_SPOOL", 7)  # 7 writes a block: the 130 writes below spill 126
    spools: list[Any] = []
    spool_class = _bulk.Spool

    def spool(**options: Any) -> Any:
        spools.append(spool_class(**options))
        return spools[-1]

    monkeypatch.setattr(_bulk, "Spool", spool)
    changed = [
        {**row, "tokens": row["tokens"] + 1} if index % 4 == 0 else row for index, row in enumerate(EVENTS)
    ]
    changed = [row for index, row in enumerate(changed) if index % 5 != 1]  # 60 extra in the aggregate
    changed += [{**row, "id": f"new{index}"} for index, row in enumerate(EVENTS[:10])]  # 10 missing
    source = write_jsonl(tmp_path / "changed.jsonl", changed)
    temp = tmp_path / "temp"
    temp.mkdir()
    code, out, _ = run("verify", built, "events", "--from", source, *BUILD, "--json", "--temp-dir", temp)
    report = json.loads(out)
    assert code == 3 and spools == []  # no --repair: nothing collected
    counts = [report[kind]["count"] for kind in ("missing", "extra", "different")]
    assert counts == [10, 60, 60]
    argv = ["verify", built, "events", "--from", source, *BUILD, "--repair", "--temp-dir", temp]
    code, out, _ = run(*argv)
    assert code == 0 and "repaired: 130 item(s)" in out
    assert [(one.spilled, one.held, one.file) for one in spools] == [(126, [], None)]  # then closed
    assert os.listdir(temp) == []
    code, out, _ = run("verify", built, "events", "--from", source, *BUILD)
    assert code == 0 and out.endswith("ok: the aggregate matches the source\n")
    assert run("check", built)[0] == 0


def json_lines_reference(data: bytes) -> list[tuple[int, Any]]:
    """What a JSON Lines source gives, by the rules it documents: one ``json.loads`` per line (split
    at line feeds only), blank lines left out, a RowError with the beginning of the reason for each
    malformed line."""
    from tallytree._sources import RowError

    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            record = RowError("not UTF-8 text")
        except RecursionError:
            record = RowError("JSON nested deeper")
        except ValueError as error:
            record = RowError("a JSON number of" if "digits" in str(error) else "invalid JSON")
        if not isinstance(record, dict | RowError):
            record = RowError("expected a JSON object")
        out.append((number, record))
    return out


JSON_LINES = [
    b'\xef\xbb\xbf{"k": 1, "id": "bom"}',  # a byte order mark: json.loads reads it
    b'{"k": 2, "id": "crlf", "v": [1, {"a": null}]}\r',
    b"",
    b"   \t",
    b'  {"k": 3, "id": "leading space"}',
    b'{"k": 4, "id": "trailing"}  \t ',
    b'{"k": 5, "id": "two"} {"k": 6}',
    b"[1, 2]",
    b'"text"',
    b'{"k": 7, "id": "\xe9t\xe9"}',  # Latin-1
    b'{"k": 8, "id": "\\ud800 lone surrogate", "nan": NaN, "inf": -Infinity}',
    b'{"k": 9, "id": "huge", "v": ' + b"9" * 5_000 + b"}",
    b'{"k": 10, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"k": 11, "id": "unterminated',
    b'{"k": 12, "id": "caf\xc3\xa9 \xe2\x80\xa8 sep", "x": 1.5e300}',
    b'{"k": 13, "id": "\x0c form feed"}\x0c',
    b'{"k": 14, "id": "last, no line feed"}',
]


@pytest.mark.parametrize("size", [1, 3, 4_096])
def test_json_lines_read_as_json_loads_reads_each_line(tmp_path: Path, size: int) -> None:
    """Lines are parsed a batch at a time by json's C scanner; a batch with anything but one object
    per line goes line by line. Either way each line reads as json.loads reads it, and a line nested
    deeper than the recursion limit is a malformed record (it was a traceback)."""
    from conftest import strict

    from tallytree._sources import RowError

    clean = [b'{"k": %d, "id": "e%d", "v": %d.5}' % (n, n, n) for n in range(20)]
    data = b"\n".join([*clean, *JSON_LINES, *clean])
    path = tmp_path / "lines.jsonl"
    path.write_bytes(data)
    expected = json_lines_reference(data)
    opened = open_source(str(path))
    try:
        got = [record for batch in opened.batches(size) for record in batch]
    finally:
        opened.close()
    assert [number for number, _ in got] == [number for number, _ in expected]
    for (number, record), (_, wanted) in zip(got, expected, strict=True):
        if isinstance(wanted, RowError):
            assert isinstance(record, RowError) and str(record).startswith(str(wanted)), (number, record)
        else:
            assert strict(record) == strict(wanted), number
    assert sum(isinstance(record, dict) for _, record in got) == 47


def test_json_batches_convert_as_records_do(tmp_path: Path) -> None:
    """The column-at-a-time path of JSON Lines gives each record's row exactly (types included),
    or hands the batch back to the record-by-record path, which names a bad record."""
    from conftest import strict

    from tallytree._sources import RowError

    records = [
        {"org": "o1", "ts": "2024-01-02T03:04:05+02:00", "id": 7, "cost": 1.5, "n": 3},
        {"org": "42", "ts": "2024-01-02 03:04:05", "id": "a", "cost": -0.0, "n": 10**20},
        {"org": "007", "ts": "2024-01-02T03:04:05.25Z", "id": "0042", "cost": 0.5, "n": 7},
        {"org": "", "ts": "2024-01-03", "id": "12", "cost": 2, "n": -(2**63)},
    ]
    path = write_jsonl(tmp_path / "records.jsonl", records)
    specs = [
        RowSpec(
            key=["ts"], key_types={"ts": "datetime"}, id="id", namespace="org", sums={"c": "cost", "n": "n"}
        ),
        RowSpec(key=["org", "n"], id="id", id_type="str", sums={"c": "cost"}),
        RowSpec(key=["n"], key_types={"n": "int"}, id="ts", namespace="id", namespace_type="str"),
        RowSpec(key=["cost"], key_types={"*": "float"}, namespace="id", sums={"n": "n"}),
    ]
    opened = open_source(str(path))
    try:
        batch = next(opened.batches(100))
        for spec in specs:
            convert, batch_convert = spec.converter(opened), spec.batch_converter(opened)
            assert batch_convert is not None
            rows = [convert(number, ordinal, record) for ordinal, (number, record) in enumerate(batch, 1)]
            assert strict(batch_convert([record for _, record in batch], 1)) == strict(rows), spec
        spec = specs[0]
        batch_convert = spec.batch_converter(opened)
        assert batch_convert is not None
        convert = spec.converter(opened)
        for (
            times
        ) in (  # naive ISO text is UTC: read again with +00:00 after it, or after a date alone by replace
            ["2024-01-02 03:04:05", "2024-01-02T03", "2024-01-02T03:04:05.123456", " 2024-02-29T23:59 "],
            ["2024-01-02T03:04:05", "2024-01-03"],
        ):
            naive = [{**record, "ts": text} for record, text in zip(records, times, strict=False)]
            rows = [convert(number, number, record) for number, record in enumerate(naive, 1)]
            assert strict(batch_convert(naive, 1)) == strict(rows)
            assert {row[1].tzinfo for row in rows} == {UTC}
        for field, value in (("cost", True), ("cost", "1e3"), ("ts", 1704067200), ("org", 1), ("id", 1.5)):
            one = {**records[0], field: value}
            try:
                wanted = strict([convert(1, 1, one)])
            except RowError:
                wanted = None  # the batch path hands it back, for the record path to name it
            got = batch_convert([one], 1)
            assert got is None if wanted is None else strict(got) == wanted, (field, value)
        assert batch_convert([{key: value for key, value in records[0].items() if key != "cost"}], 1) is None
        assert RowSpec(key=["user.id"]).batch_converter(opened) is None  # a nested field: record by record
    finally:
        opened.close()


def test_gzip_sources_are_read_decompressed(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip file (by its magic bytes: .gz, or no telling name) or gzip piped in is decompressed as
    it is read; it failed as a CSV header that is not UTF-8, with a hint to convert with iconv."""
    import gzip

    plain = run(
        "build", tmp_path / "plain", "events", "--from", write_csv(tmp_path / "e.csv", EVENTS), *BUILD
    )
    assert plain[0] == 0
    expected = run("query", tmp_path / "plain", "events", "totals", "--namespace", "org:1")[1]
    csv_gz = tmp_path / "events.csv.gz"
    csv_gz.write_bytes(gzip.compress((tmp_path / "e.csv").read_bytes()))
    jsonl_gz = tmp_path / "events.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress(write_jsonl(tmp_path / "e.jsonl", EVENTS).read_bytes()))
    unnamed = tmp_path / "export"
    unnamed.write_bytes(jsonl_gz.read_bytes())
    for number, source in enumerate([csv_gz, jsonl_gz, unnamed, "-"]):
        if source == "-":
            monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(jsonl_gz.read_bytes())))
        database = tmp_path / f"db{number}"
        code, out, err = run("build", database, "events", "--from", source, *BUILD, "--json")
        assert (code, err, json.loads(out)["items"]) == (0, "", 300), source
        assert run("query", database, "events", "totals", "--namespace", "org:1")[1] == expected
        if source != "-":
            assert run("verify", database, "events", "--from", source, *BUILD)[0] == 0
    tsv = tmp_path / "events.tsv.gz"
    tsv.write_bytes(gzip.compress(b"k\tid\tv\n1\ta\t2\n"))
    assert run("build", tmp_path / "tsv", "t", "--from", tsv, *KEY_ID_SUM, "--json")[0] == 0


def test_a_damaged_gzip_source_is_an_error_naming_it(built: Path, tmp_path: Path, run: Any) -> None:
    import gzip

    data = gzip.compress(write_jsonl(tmp_path / "e.jsonl", EVENTS[:100]).read_bytes())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    damaged = tmp_path / "crc.jsonl.gz"
    damaged.write_bytes(data[:-8] + bytes(4) + data[-4:])  # a wrong CRC, met at the end of the data
    before = run("query", built, "events", "totals", "--namespace", "org:1")
    for source, reason in (
        (truncated, "Compressed file ended before the end-of-stream marker was reached"),
        (damaged, "CRC check failed"),
    ):
        for command in (["build", built, "events"], ["verify", built, "events", "--repair"]):
            code, out, err = run(*command, "--from", source, *BUILD, "--on-error", "skip")
            assert (code, out) == (1, "")
            assert err.startswith(
                f"tallytree: error: {source} is gzip-compressed, but its compressed data is truncated or "
                f"damaged ({reason}"
            )
            assert err.endswith(
                "so it cannot be read to the end; test it with gzip -t, and compress or copy it again\n"
            )
    assert run("query", built, "events", "totals", "--namespace", "org:1") == before  # nothing written
    code, _, err = run("build", tmp_path / "new", "events", "--from", truncated, *BUILD)
    assert code == 1 and not (tmp_path / "new").exists()


def test_a_json_array_is_refused_with_how_to_convert_it(
    built: Path, tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON array given as JSON Lines gave malformed records, or with --on-error skip loaded the
    objects that happened to sit alone on their lines and dropped the rest without failing."""
    import gzip

    one_line = tmp_path / "events.json"
    one_line.write_text(json.dumps(EVENTS[:3]) + "\n")
    pretty = tmp_path / "pretty export.json"
    pretty.write_text(json.dumps(EVENTS[:3], indent=2))
    unnamed = tmp_path / "export"
    unnamed.write_text("\n  [\n" + ",\n".join(json.dumps(row) for row in EVENTS[:3]) + "\n]\n")
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(one_line.read_bytes()))
    before = run("query", built, "events", "totals")
    for source, fix in (
        (one_line, f"jq -c '.[]' {one_line} > {tmp_path / 'events.jsonl'}"),
        (pretty, f"jq -c '.[]' '{pretty}' > '{tmp_path / 'pretty export.jsonl'}'"),
        (unnamed, f"jq -c '.[]' {unnamed} > {unnamed}.jsonl"),
        (packed, f"gzip -dc {packed} | jq -c '.[]' > {tmp_path / 'events.jsonl'}"),
    ):
        for command in (["build", built, "events"], ["verify", built, "events"]):
            code, out, err = run(*command, "--from", source, *BUILD, "--on-error", "skip")
            assert (code, out) == (1, "")
            assert err == (
                f"tallytree: error: {source} holds a JSON array, not JSON Lines (one JSON object per line); "
                f"convert it: {fix}\n"
            )
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(pretty.read_bytes())))
    code, out, err = run("build", built, "events", "--from", "-", *BUILD, "--json")
    assert code == 1 and json.loads(out)["error"] == (
        "standard input holds a JSON array, not JSON Lines (one JSON object per line); pipe it through "
        "jq -c '.[]' first, which prints one object per line"
    )
    assert run("query", built, "events", "totals") == before
    csv_like = tmp_path / "brackets.csv"  # a CSV header may begin with "[": sniffed as CSV still
    csv_like.write_text("[k],id,v\n1,a,2\n")
    assert (
        run("build", tmp_path / "db2", "b", "--from", csv_like, "--key", "[k]", "--id", "id", "--sum", "v")[0]
        == 0
    )


@pytest.mark.parametrize(
    ("magic", "compression", "command"),
    [
        (b"\xfd7zXZ\x00\x00\x04", "xz", "xz -dc"),
        (b"BZh91AY&SY\x12", "bzip2", "bzip2 -dc"),
        (b"\x28\xb5\x2f\xfd\x24", "zstd", "zstd -dc"),
        (b"PK\x03\x04\x14\x00", "zip", "unzip -p"),
    ],
)
def test_other_compressions_name_the_command_that_decompresses_them(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch, magic: bytes, compression: str, command: str
) -> None:
    source = tmp_path / "events.jsonl.x"
    source.write_bytes(magic + bytes(range(256)))
    code, out, err = run("build", tmp_path / "db", "events", "--from", source, *BUILD)
    assert (code, out) == (1, "")
    assert err == (
        f"tallytree: error: {source} is {compression}-compressed; tallytree decompresses gzip but not "
        f"{compression}: decompress it first, or pipe it in with --from - ({command} {source} | "
        "tallytree ... --from -)\n"
    )
    assert not (tmp_path / "db").exists()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(source.read_bytes())))
    code, _, err = run("build", tmp_path / "db", "events", "--from", "-", *BUILD)
    assert code == 1 and err == (
        f"tallytree: error: standard input is {compression}-compressed; tallytree decompresses gzip but not "
        f"{compression}: pipe it through {command} first\n"
    )


def test_a_gzip_sqlite_database_is_refused(tmp_path: Path, run: Any) -> None:
    import gzip

    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (k INTEGER)")
    connection.close()
    packed = tmp_path / "app.sqlite.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    code, _, err = run("build", tmp_path / "db", "t", "--from", packed, "--table", "t", "--key", "k")
    assert code == 1 and err == (
        f"tallytree: error: {packed} is gzip-compressed; a SQLite database is read from its file: decompress "
        f"it first (gunzip -k {packed}) and give the database\n"
    )


# ---------------------------------------------------------------- backup, and stats of the file


def test_backup_command(built: Path, tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "backups" / "copy"
    code, out, err = run("backup", built, copy)
    assert (code, err) == (0, "") and out.startswith(f"backed up {built} (") and out.endswith(", compacted\n")
    assert run("check", copy)[0] == 0
    for org in ("org:1", "org:2"):
        assert run("query", copy, "events", "totals", "--namespace", org) == run(
            "query", built, "events", "totals", "--namespace", org
        )
    code, out, err = run("backup", built, copy, "--json")  # never written over
    assert code == 1 and json.loads(out)["exit_code"] == 1 and "is not empty" in json.loads(out)["error"]
    assert err.count("\n") == 1 and "a backup never writes over anything" in err
    assert run("backup", tmp_path / "nowhere", tmp_path / "copy2")[0] == 4
    assert not (tmp_path / "copy2").exists()
    code, out, _ = run("backup", built, tmp_path / "pages", "--no-compact", "--json")
    document = json.loads(out)
    assert code == 0 and document["compact"] is False
    assert document["backup_bytes"] == document["database_bytes"] == (built / "data.mdb").stat().st_size
    assert run("check", tmp_path / "pages")[0] == 0

    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    from tallytree import _lmdbfile

    monkeypatch.setattr(_lmdbfile, "_compact", interrupted)
    code, _, err = run("backup", built, tmp_path / "cut")
    assert code == 130 and "nothing was written" in err and not (tmp_path / "cut").exists()


def test_stats_shows_the_file_pages_and_readers(built: Path, run: Any) -> None:
    code, out, _ = run("stats", built, "--json")
    storage = json.loads(out)["storage"]
    assert code == 0 and storage["file_bytes"] == (built / "data.mdb").stat().st_size
    assert storage["pages"] == storage["pages_used"] + storage["pages_free"]
    assert storage["pages"] * storage["page_bytes"] == storage["file_bytes"]
    assert storage["pages_reusable"] is not None and storage["pages_held_by_readers"] == 0
    assert (storage["readers"], storage["oldest_reader_lag"], storage["dead_readers"]) == (0, None, 0)
    code, out, _ = run("stats", built)
    lines = out.splitlines()
    assert lines[1].startswith(f"  pages of {storage['page_bytes'] // 1024} KiB: {storage['pages']:,} (")
    assert f"{storage['pages_used']:,} in use, {storage['pages_free']:,} free (" in lines[1]
    assert "a compacting backup would take" in lines[1] and lines[2] == "  readers: no read transaction open"
