"""Data damaged behind tallytree's back (a failing disk, a foreign writer, an old copy of one record):
every read and write raises CorruptDatabaseError (a tallytree.Error) saying what is damaged, never a
raw LMDB, msgpack or built-in error and never a wrong answer, writes nothing, and ``check`` reports
the damage as problems instead of raising.

The damage is made as the other damage tests make it (``test_persistence``): with raw py-lmdb writes
on a closed database."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from conftest import pure_python

import tallytree
from tallytree import CorruptDatabaseError, StorageError
from tallytree._keys import decode_entry
from tallytree._txn import node_key
from tallytree.cli import main as cli_main

# ================================================================== helpers


def _lmdb_env(path: Path) -> Any:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 24)


@contextlib.contextmanager
def _behind_tallytrees_back(path: Path, table: bytes) -> Iterator[tuple[Any, Any]]:
    """A raw LMDB write transaction on the closed database at ``path``, and its named table ``table``
    (``meta``, ``nodes``, ``roots`` or ``docs``)."""
    env = _lmdb_env(path)
    try:
        handle = env.open_db(table)
        with env.begin(write=True) as txn:
            yield txn, handle
    finally:
        env.close()


def _put(path: Path, table: bytes, key: bytes, value: bytes) -> None:
    with _behind_tallytrees_back(path, table) as (txn, handle):
        txn.put(key, value, db=handle)


def _get(path: Path, table: bytes, key: bytes) -> bytes:
    env = _lmdb_env(path)
    try:
        with env.begin() as txn:
            value = txn.get(key, db=env.open_db(table, txn=txn))
    finally:
        env.close()
    assert value is not None
    return bytes(value)


def _dump(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every record of the four tables of the closed database at ``path``: what "nothing was written"
    compares."""
    env = _lmdb_env(path)
    try:
        with env.begin() as txn:
            return {
                name: [(bytes(key), bytes(value)) for key, value in txn.cursor(db=env.open_db(name, txn=txn))]
                for name in (b"meta", b"nodes", b"roots", b"docs")
            }
    finally:
        env.close()


def _events(path: Path) -> None:
    """A database with aggregate ``events`` (one field, node size 8, two namespaces) and table
    ``loads`` with aggregate ``by_status`` attached and 50 documents, ``L0`` to ``L49``."""
    with tallytree.open(path) as db:
        events = db.aggregate("events", values=("cost",), node_size=8)
        with db.write() as tx:
            for namespace in ("a", "b"):
                events.insert_many(tx, [(n, f"e{n}", (n / 4,)) for n in range(200)], namespace=namespace)
        loads = db.table("loads")
        loads.aggregate("by_status", namespace="org", key="status", values=("rate",), node_size=8)
        with db.write() as tx:
            loads.insert_many(
                tx,
                [(f"L{n}", {"org": "acme", "status": ("open", "done")[n % 2], "rate": n}) for n in range(50)],
            )


def _in_write(db: tallytree.Database, write: Callable[[tallytree.WriteTransaction], object]) -> None:
    """``write`` in a write transaction of its own, which an exception aborts."""
    with db.write() as tx:
        write(tx)


def _raises_damage(action: Callable[[], object], *names: str) -> CorruptDatabaseError:
    """Run ``action``, which must raise CorruptDatabaseError whose message holds each of ``names``."""
    with pytest.raises(CorruptDatabaseError) as caught:
        action()
    for name in names:
        assert name in str(caught.value), f"{name!r} not named in: {caught.value}"
    return caught.value


def _cli_check(path: Path) -> int:
    return cli_main(["check", str(path)])


# ================================================================== damaged pages of data.mdb


def _read_everything(db: tallytree.Database) -> None:
    with db.read() as tx:
        for aggregate in db.aggregates_in(tx):
            for namespace, totals in aggregate.namespaces(tx):
                list(aggregate.items(tx, namespace=namespace))
                aggregate.count(tx, namespace=namespace, ge=10, lt=150)
                if totals.count:
                    aggregate.at(tx, -1, namespace=namespace)
                    aggregate.rank(tx, 100, namespace=namespace)


def test_every_zeroed_page_of_the_file_gives_problems_or_typed_errors(tmp_path: Path) -> None:
    """Each 4 KiB page of data.mdb zeroed in turn, as a torn write or a lost sector leaves it: LMDB
    raises its own errors (MDB_CORRUPTED "Located page was wrong type", MDB_PAGE_NOTFOUND, and
    MDB_BAD_TXN for every later call of the transaction). ``open`` raises DatabaseFormatError (a
    tallytree.Error), ``check`` returns problems (the CLI exits 3), reads and writes raise
    CorruptDatabaseError chained to LMDB's error, and nothing is written."""
    origin = tmp_path / "origin"
    with tallytree.open(origin, map_size=1 << 24) as db:
        events = db.aggregate("events", values=("cost",), node_size=16)
        with db.write() as tx:
            for namespace in ("a", "b"):
                events.insert_many(tx, [(n, f"e{n}", (n / 4,)) for n in range(2000)], namespace=namespace)
    pages = os.path.getsize(origin / "data.mdb") // 4096
    corrupt_reads = corrupt_checks = 0
    for page in range(pages):
        path = tmp_path / f"page{page}"
        shutil.copytree(origin, path)
        with (path / "data.mdb").open("r+b") as file:
            file.seek(page * 4096)
            file.write(bytes(4096))
        try:
            db = tallytree.open(path, map_size=1 << 24)
        except tallytree.DatabaseFormatError:
            continue  # the meta pages, or the list of tables
        with db:
            with db.read() as tx:
                problems = tallytree.check(tx)
            if any("LMDB cannot read" in problem.message for problem in problems):
                corrupt_checks += 1
            try:
                _read_everything(db)
            except CorruptDatabaseError as exc:
                corrupt_reads += 1
                assert isinstance(exc.__cause__, lmdb.Error), "LMDB's error is not chained"
                assert "damaged" in str(exc) and "tallytree check" in str(exc)
            except tallytree.Error:
                pass
            writes: list[Callable[[tallytree.WriteTransaction], object]] = [
                lambda tx, db=db: db.aggregate("events").insert_many(
                    tx, [(n + 0.5, "w", (1.0,)) for n in range(0, 2000, 7)]
                ),
                # a new tree: LMDB meets the damaged page only when the commit writes
                lambda tx, db=db: db.aggregate("events").insert(tx, 10**6, "w", (1.0,), namespace="new"),
            ]
            for write in writes:
                try:
                    _in_write(db, write)
                except StorageError:  # the disk did not refuse anything: the file is damaged
                    pytest.fail(f"page {page}: a damaged file was reported as a failing disk")
                except tallytree.Error:
                    pass
        if problems:
            assert _cli_check(path) == 3
    assert corrupt_reads >= 10 and corrupt_checks >= 10, (corrupt_reads, corrupt_checks)


def _zero_root_page(path: Path, table: bytes) -> None:
    """Zero the root page of named table ``table`` in the closed database at ``path``: LMDB then
    fails every read of the table (MDB_CORRUPTED, then MDB_BAD_TXN for the transaction's later calls)."""
    env = _lmdb_env(path)
    with env.begin() as txn:
        record = bytes(txn.get(table))  # the named table's MDB_db record, md_root last
    env.close()
    root_page = int.from_bytes(record[40:48], "little")
    assert 0 < root_page < os.path.getsize(path / "data.mdb") // 4096
    with (path / "data.mdb").open("r+b") as file:
        file.seek(root_page * 4096)
        file.write(bytes(4096))


@pytest.mark.parametrize("table", [b"nodes", b"roots", b"docs"])
def test_a_read_that_meets_a_damaged_page_raises_a_typed_error_inside_the_block(
    tmp_path: Path, table: bytes
) -> None:
    """Inside ``with db.read()``, a read meeting a page LMDB cannot read raised LMDB's own error, which
    became CorruptDatabaseError only as the block ended: ``except tallytree.Error`` inside the block
    missed it. Now the read raises CorruptDatabaseError (chained to LMDB's), through every way reads
    meet LMDB: a get (a node), a scan (the namespaces of an aggregate), a batched scan (a table's
    documents); so do the reads after it, which LMDB refuses."""
    path = tmp_path / "db"
    _events(path)
    _zero_root_page(path, table)
    with tallytree.open(path) as db:
        read: Callable[[tallytree.Transaction], object]
        if table == b"nodes":
            events = db.aggregate("events")
            read = lambda tx: list(events.items(tx, namespace="a"))  # noqa: E731
        elif table == b"roots":
            read = db.aggregates_in  # (each aggregate's definition is compared with its trees)
        else:
            loads = db.table("loads")
            read = lambda tx: list(loads.items(tx))  # noqa: E731
        caught: list[tallytree.Error] = []
        with db.read() as tx:
            for _ in range(2):
                try:
                    read(tx)
                except tallytree.Error as exc:
                    caught.append(exc)
        assert [type(exc) for exc in caught] == [CorruptDatabaseError] * 2
        assert isinstance(caught[0].__cause__, lmdb.Error) and "damaged" in str(caught[0])
        if table != b"docs":  # (check reads the aggregates)
            with db.read() as tx:
                problems = tallytree.check(tx)
            assert problems and "LMDB cannot read" in problems[-1].message


def test_an_lmdb_error_of_the_callers_own_environment_is_not_taken_for_damage(tmp_path: Path) -> None:
    """The translation looks at where LMDB's error was raised: a caller's own LMDB environment that
    fails inside a ``with db.read()`` block keeps its error. And a damaged page that tallytree meets
    is translated."""
    path = tmp_path / "db"
    _events(path)
    with tallytree.open(path) as db, pytest.raises(lmdb.CorruptedError), db.read():
        raise lmdb.CorruptedError("the caller's own environment")
    # the root page of the nodes table zeroed: LMDB fails every read of a node
    env = _lmdb_env(path)
    with env.begin() as txn:
        record = bytes(txn.get(b"nodes"))  # the named table's MDB_db record, md_root last
    env.close()
    root_page = int.from_bytes(record[40:48], "little")
    assert 0 < root_page < os.path.getsize(path / "data.mdb") // 4096
    with (path / "data.mdb").open("r+b") as file:
        file.seek(root_page * 4096)
        file.write(bytes(4096))
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        error = _raises_damage(lambda: _read_everything(db), "damaged")
        assert isinstance(error.__cause__, lmdb.Error)
        with db.read() as tx:
            problems = tallytree.check(tx)
        assert problems and "LMDB cannot read" in problems[-1].message
        with pytest.raises(CorruptDatabaseError), db.write() as tx:
            events.insert(tx, 1000, "new", (1.0,), namespace="a")


# ================================================================== damaged META records


def _definition(path: Path, name: str) -> dict[str, Any]:
    return msgpack.unpackb(_get(path, b"meta", b"agg:" + name.encode()), raw=False)  # type: ignore[no-any-return]


DAMAGED_DEFINITIONS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not msgpack": lambda _: b"\xc1",
    "cut short": lambda stored: msgpack.packb(stored)[:-3],
    "not a map": lambda _: msgpack.packb(7),
    "no values": lambda stored: msgpack.packb({"id": stored["id"], "node_size": 8}),
    "values not a list": lambda stored: msgpack.packb({**stored, "values": 5}),
    "values not names": lambda stored: msgpack.packb({**stored, "values": [b"cost"]}),
    "values repeated": lambda stored: msgpack.packb({**stored, "values": ["cost", "cost"]}),
    "a value named as a total": lambda stored: msgpack.packb({**stored, "values": ["count"]}),
    "id a str": lambda stored: msgpack.packb({**stored, "id": str(stored["id"])}),
    "id negative": lambda stored: msgpack.packb({**stored, "id": -1}),
    "id beyond 4 bytes": lambda stored: msgpack.packb({**stored, "id": 2**40}),
    "node_size 0": lambda stored: msgpack.packb({**stored, "node_size": 0}),
    "node_size a str": lambda stored: msgpack.packb({**stored, "node_size": "8"}),
    "table not a name": lambda stored: msgpack.packb({**stored, "table": 7}),
    "a field more than its trees": lambda stored: msgpack.packb({**stored, "values": ["cost", "extra"]}),
    "no field, its trees one": lambda stored: msgpack.packb({**stored, "values": []}),
}


@pytest.mark.parametrize("damage", list(DAMAGED_DEFINITIONS))
def test_a_damaged_aggregate_definition_raises_corrupt_database_error_naming_it(
    tmp_path: Path, damage: str
) -> None:
    """The META record ``agg:events`` damaged: listing, opening, reading and writing raise
    CorruptDatabaseError naming the record (not a msgpack, Key, Type, Attribute or ZeroDivision
    error, nor sums read under the wrong names), writing nothing; check() reports it and goes on
    with the other aggregates; the CLI's check exits 3."""
    path = tmp_path / "db"
    _events(path)
    _put(path, b"meta", b"agg:events", DAMAGED_DEFINITIONS[damage](_definition(path, "events")))
    before = _dump(path)
    with tallytree.open(path) as db:
        _raises_damage(db.aggregates, "agg:events")
        _raises_damage(lambda: db.aggregate("events"), "agg:events")
        with db.read() as tx:
            _raises_damage(lambda: db.aggregates_in(tx), "agg:events")
            problems = tallytree.check(tx)
        assert [problem.aggregate for problem in problems if problem.aggregate is not None] == ["events"]
        assert "agg:events" in problems[0].message
        by_status = db.aggregate("by_status")  # the others work
        with db.read() as tx:
            assert by_status.count(tx, namespace="acme") == 50
            assert tallytree.check(tx, by_status) == []
        _raises_damage(lambda: db.drop_aggregate("events"), "agg:events")
    assert _dump(path) == before
    assert _cli_check(path) == 3


def test_a_definition_damaged_while_its_aggregate_is_open_is_refused(tmp_path: Path) -> None:
    """An Aggregate object opened before its definition was damaged (by another process): ``check``
    reports the damaged definition rather than reading its trees with the fields it had."""
    path = tmp_path / "db"
    _events(path)
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        stored = _definition_in(db, "events")
        with db.write() as tx:
            tx.set_meta(b"agg:events", msgpack.packb({**stored, "values": ["cost", "extra"]}))
        with db.read() as tx:
            problems = tallytree.check(tx)
        assert [problem.aggregate for problem in problems if problem.aggregate is not None] == ["events"]
        assert "2 value field(s)" in problems[0].message and "agg:events" in problems[0].message
        assert events.fields == ("cost",)


def test_an_open_aggregate_whose_definition_another_process_damaged_raises_corrupt_database_error(
    tmp_path: Path,
) -> None:
    """The object checks its definition again after another process's commit (Aggregate._confirm):
    a damaged record raised msgpack's or Python's own errors there."""
    path = tmp_path / "db"
    _events(path)
    damage = (
        "import sys, lmdb\n"
        "env = lmdb.open(sys.argv[1], max_dbs=4)\n"
        "with env.begin(write=True) as txn:\n"
        "    txn.put(b'agg:events', b'\\xc1 not msgpack', db=env.open_db(b'meta', txn=txn))\n"
        "env.close()\n"
    )
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        with db.read() as tx:
            assert events.count(tx, namespace="a") == 200
        subprocess.run([sys.executable, "-c", damage, str(path)], check=True, timeout=60)
        with db.read() as tx:
            _raises_damage(lambda: events.count(tx, namespace="a"), "agg:events")


def _definition_in(db: tallytree.Database, name: str) -> dict[str, Any]:
    with db.read() as tx:
        data = tx.meta(b"agg:" + name.encode())
    assert data is not None
    return msgpack.unpackb(data, raw=False)  # type: ignore[no-any-return]


def test_names_that_are_not_utf8_are_reported_as_damage(tmp_path: Path) -> None:
    """tallytree writes names as UTF-8: a META key ``agg:`` or ``table:`` followed by other bytes is
    damage, reported by name (its bytes), not a UnicodeDecodeError."""
    path = tmp_path / "db"
    _events(path)
    _put(path, b"meta", b"agg:\xff\xfe", msgpack.packb({"id": 9, "values": [], "node_size": 8}))
    with tallytree.open(path) as db:
        _raises_damage(db.aggregates, "agg:\\xff\\xfe", "UTF-8")
        with db.read() as tx:
            problems = tallytree.check(tx)
        assert any("UTF-8" in problem.message for problem in problems)
    path = tmp_path / "db2"
    _events(path)
    _put(path, b"meta", b"table:\xff", msgpack.packb({"id": 99, "aggregates": {}}))
    with tallytree.open(path) as db:
        _raises_damage(db.tables, "table:\\xff", "UTF-8")
        with db.read() as tx:
            assert any("UTF-8" in problem.message for problem in tallytree.check(tx))


DAMAGED_TABLE_RECORDS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not msgpack": lambda _: b"\xc1",
    "no id": lambda stored: msgpack.packb({"aggregates": stored["aggregates"]}),
    "id a str": lambda stored: msgpack.packb({**stored, "id": "1"}),
    "aggregates a list": lambda stored: msgpack.packb({**stored, "aggregates": [1, 2]}),
    "a description not a map": lambda stored: msgpack.packb({**stored, "aggregates": {"by_status": 3}}),
    "a description without its key": lambda stored: msgpack.packb(
        {
            **stored,
            "aggregates": {
                "by_status": {k: v for k, v in stored["aggregates"]["by_status"].items() if k != "key"}
            },
        }
    ),
    "a description with other fields": lambda stored: msgpack.packb(
        {
            **stored,
            "aggregates": {
                "by_status": {**stored["aggregates"]["by_status"], "values": [["n", ["field", "n"]]]}
            },
        }
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGED_TABLE_RECORDS))
def test_a_damaged_table_record_raises_corrupt_database_error_naming_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "db"
    _events(path)
    stored = msgpack.unpackb(_get(path, b"meta", b"table:loads"), raw=False)
    _put(path, b"meta", b"table:loads", DAMAGED_TABLE_RECORDS[damage](stored))
    before = _dump(path)
    with tallytree.open(path) as db:
        _raises_damage(lambda: db.table("loads"), "table 'loads'")
        _raises_damage(lambda: db.table("loads", create=False), "table 'loads'")
        _raises_damage(lambda: db.drop_table("loads"), "table 'loads'")
        with db.read() as tx:
            problems = tallytree.check(tx)
        if damage not in ("a description without its key", "a description with other fields"):
            assert any("table:loads" in problem.message for problem in problems), problems
    assert _dump(path) == before


# ================================================================== id counters set back


def test_an_aggregate_id_counter_set_back_refuses_to_reuse_an_id(tmp_path: Path) -> None:
    """META ``next_agg`` set back to 1 (a foreign writer, a record restored from an old copy): a new
    aggregate would get the id of ``events`` and hold its 400 items at once, and write into its trees.
    Creating one, by the database or by a table, raises CorruptDatabaseError naming the counter and
    writes nothing; check() reports the ids the counter would give again."""
    path = tmp_path / "db"
    _events(path)
    _put(path, b"meta", b"next_agg", (1).to_bytes(4, "big"))
    before = _dump(path)
    with tallytree.open(path) as db:
        _raises_damage(lambda: db.aggregate("brand_new", values=("cost",), node_size=8), "next_agg")
        loads = db.table("loads")
        _raises_damage(lambda: loads.aggregate("by_org", key="org"), "next_agg")
        with db.read() as tx:
            problems = tallytree.check(tx)
        assert sorted(problem.aggregate for problem in problems if "next_agg" in problem.message) == [
            "by_status",
            "events",
        ]
        assert db.aggregates() == ["by_status", "events"]
    assert _dump(path) == before


def test_a_counter_set_back_to_an_id_that_only_trees_use_is_refused(tmp_path: Path) -> None:
    """The id of a dropped aggregate whose trees a foreign writer left behind (no definition uses it):
    the one cursor seek on the root records finds them."""
    path = tmp_path / "db"
    with tallytree.open(path) as db:
        kept = db.aggregate("kept")
        with db.write() as tx:
            kept.insert(tx, 1, "a", namespace="n")
    definition = _definition(path, "kept")
    with _behind_tallytrees_back(path, b"meta") as (txn, meta):
        txn.delete(b"agg:kept", db=meta)
        txn.put(b"next_agg", definition["id"].to_bytes(4, "big"), db=meta)
    with tallytree.open(path) as db:
        _raises_damage(lambda: db.aggregate("brand_new"), "next_agg")
        assert db.aggregates() == []


def test_two_definitions_sharing_an_id_are_reported_by_check(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _events(path)
    by_status = _definition(path, "by_status")
    _put(path, b"meta", b"agg:events", msgpack.packb({**_definition(path, "events"), "id": by_status["id"]}))
    with tallytree.open(path) as db, db.read() as tx:
        problems = tallytree.check(tx)
    assert any("has the same id" in problem.message for problem in problems), problems


def test_a_table_id_counter_set_back_refuses_to_reuse_an_id(tmp_path: Path) -> None:
    """META ``next_table`` set back: a new table would share the documents of ``loads``."""
    path = tmp_path / "db"
    _events(path)
    _put(path, b"meta", b"next_table", (1).to_bytes(4, "big"))
    before = _dump(path)
    with tallytree.open(path) as db:
        _raises_damage(lambda: db.table("other"), "next_table")
        assert db.tables() == ["loads"]
    assert _dump(path) == before


# ================================================================== damaged documents


DAMAGED_DOCUMENTS: dict[str, Callable[[bytes], bytes]] = {
    "not msgpack": lambda _: b"\xc1",
    "cut short": lambda stored: stored[:-2],
    "not a map": lambda _: msgpack.packb([1, 2]),
    "not UTF-8": lambda _: b"\x81\xa3\xff\xfe\xfd\x01",
}


@pytest.mark.parametrize("damage", list(DAMAGED_DOCUMENTS))
def test_a_damaged_document_raises_corrupt_database_error_naming_it_and_its_table(
    tmp_path: Path, damage: str
) -> None:
    """Document ``L10`` of table ``loads`` damaged in the DOCS table: every read and write of it (and
    the whole-table passes that meet it) raises CorruptDatabaseError naming the document and the
    table, writing nothing."""
    path = tmp_path / "db"
    _events(path)
    with _behind_tallytrees_back(path, b"docs") as (txn, docs):
        (key,) = [bytes(key) for key, _ in txn.cursor(db=docs) if bytes(key).endswith(b"L10\x00")]
        txn.put(key, DAMAGED_DOCUMENTS[damage](bytes(txn.get(key, db=docs))), db=docs)
    before = _dump(path)
    with tallytree.open(path) as db:
        loads = db.table("loads")
        with db.read() as tx:
            _raises_damage(lambda: loads.get(tx, "L10"), "'L10'", "table 'loads'")
            _raises_damage(lambda: list(loads.items(tx)), "'L10'", "table 'loads'")
            assert loads.get(tx, "L11") is not None
        new = {"org": "acme", "status": "open", "rate": 1}
        writes: list[Callable[[tallytree.WriteTransaction], object]] = [
            lambda tx: loads.update(tx, "L10", {"status": "done"}),
            lambda tx: loads.replace(tx, "L10", new),
            lambda tx: loads.upsert(tx, "L10", new),
            lambda tx: loads.delete(tx, "L10"),
            lambda tx: loads.discard(tx, "L10"),
            lambda tx: loads.insert_many(tx, [("L10", new)], on_duplicate="update"),
            lambda tx: loads.delete_range(tx, "by_status", namespace="acme"),
        ]
        for write in writes:
            _raises_damage(lambda write=write: _in_write(db, write), "'L10'", "table 'loads'")
        _raises_damage(lambda: loads.aggregate("by_rate", key="rate"), "'L10'", "table 'loads'")
    assert _dump(path) == before


def _in_write(db: tallytree.Database, write: Callable[[tallytree.WriteTransaction], object]) -> None:
    with db.write() as tx:
        write(tx)


# ================================================================== damaged root records


def _one_tree(path: Path) -> bytes:
    """A tree of height 4 (node size 4, 200 items) in namespace "s" of aggregate "a"; its tree key."""
    with tallytree.open(path) as db:
        a = db.aggregate("a", values=("x",), node_size=4)
        with db.write() as tx:
            a.insert_many(tx, [(f"k{n:05d}", n, (n,)) for n in range(200)], namespace="s")
        with db.read() as tx:
            root = tx.root(a._tree_key("s"))
            assert root is not None and root.height == 4
        return a._tree_key("s")


@pytest.mark.parametrize("kernels", [True, False], ids=["C kernels", "pure Python"])
@pytest.mark.parametrize("change", [-3, -1, 1, 3])
def test_a_root_record_with_a_wrong_height_is_refused_by_every_write(
    tmp_path: Path, change: int, kernels: bool
) -> None:
    """The height in a root record changed to another plausible height: reads, which go by each node's
    kind, answer as before, but writes go by the height (splits grow it, a range delete drops
    subtrees by it, appends hang a new leaf at it). Each write raises CorruptDatabaseError (delete_range
    raised a bare IndexError, and the others wrote on, on a tree whose leaves then lay at two
    depths), writing nothing."""
    path = tmp_path / "db"
    tree_key = _one_tree(path)
    record = msgpack.unpackb(_get(path, b"roots", tree_key), raw=False)
    record[1] += change
    _put(path, b"roots", tree_key, msgpack.packb(record, use_bin_type=True))
    before = _dump(path)
    with tallytree.open(path) as db, contextlib.ExitStack() as stack:
        if not kernels:
            stack.enter_context(pure_python())
        a = db.aggregate("a")
        with db.read() as tx:
            assert a.count(tx, namespace="s") == 200
            assert a.totals(tx, namespace="s", ge="k00010", lt="k00020").x == sum(range(10, 20))
            assert any("height" in problem.message for problem in tallytree.check(tx))
        writes: list[Callable[[tallytree.WriteTransaction], object]] = [
            lambda tx: a.insert(tx, "k00050x", 1, (1,), namespace="s"),
            lambda tx: a.upsert(tx, "k00051", 51, (7,), namespace="s"),
            lambda tx: a.delete(tx, "k00050", 50, namespace="s"),
            lambda tx: a.insert_many(tx, [(f"k{n:05d}y", 1, (1,)) for n in range(0, 200, 9)], namespace="s"),
            lambda tx: [a.insert(tx, f"z{n:03d}", 1, (1,), namespace="s") for n in range(70)],
            lambda tx: a.delete_range(tx, namespace="s", ge="k00050", lt="k00100"),
            lambda tx: a.delete_range(tx, namespace="s", ge="k00000", lt="k00016"),
            lambda tx: a.clear(tx, namespace="s"),
        ]
        for write in writes:
            _raises_damage(lambda write=write: _in_write(db, write), "height")
    assert _dump(path) == before


def test_check_reports_a_root_record_that_does_not_decode_and_goes_on(tmp_path: Path) -> None:
    """One of three root records replaced by bytes that do not decode: check() returns a problem
    naming its aggregate and namespace (it raised CorruptDatabaseError, naming neither), the other
    trees are checked, and the CLI's check exits 3 (it exited 1, as for an error)."""
    path = tmp_path / "db"
    with tallytree.open(path) as db:
        a = db.aggregate("a", values=("x",), node_size=4)
        with db.write() as tx:
            for namespace in ("good1", "bad", "good2"):
                a.insert_many(tx, [(n, n, (n,)) for n in range(50)], namespace=namespace)
        tree_key = a._tree_key("bad")
    _put(path, b"roots", tree_key, b"\x2a" + _get(path, b"roots", tree_key)[1:])
    with tallytree.open(path) as db:
        with db.read() as tx:
            problems = tallytree.check(tx)
        assert [(problem.aggregate, problem.namespace) for problem in problems if problem.namespace] == [
            ("a", "bad")
        ]
        assert "root record" in problems[0].message
        a = db.aggregate("a")
        with db.read() as tx:
            assert a.count(tx, namespace="good2") == 50
            _raises_damage(lambda: a.count(tx, namespace="bad"), "root record")
    assert _cli_check(path) == 3


# ================================================================== damage met at commit


def test_damage_met_at_commit_ends_the_write_transaction(tmp_path: Path) -> None:
    """A table insert queues its aggregate's entry and merges it at commit, where a damaged root
    record is first decoded: the commit raises CorruptDatabaseError, and the LMDB write transaction
    ends with it. It held the write lock: the next write raised a raw lmdb.Error ("another write
    transaction is active"), and writers in other processes would have waited for ever."""
    path = tmp_path / "db"
    _events(path)
    with tallytree.open(path) as db, db.read() as tx:
        tree_key = db.aggregate("by_status")._tree_key("acme")
    record = _get(path, b"roots", tree_key)
    _put(path, b"roots", tree_key, record[:1])  # the record's array header alone
    before = _dump(path)
    with tallytree.open(path) as db:
        loads = db.table("loads")
        for _ in range(2):
            with pytest.raises(CorruptDatabaseError), db.write() as tx:
                loads.insert(tx, {"org": "acme", "status": "open", "rate": 3.5}, "Lnew")
        with db.write() as tx:  # another namespace's tree is sound
            loads.insert(tx, {"org": "globex", "status": "open", "rate": 1}, "G1")
    after = _dump(path)
    assert after[b"roots"] != before[b"roots"]  # globex's tree
    assert [row for row in after[b"roots"] if row[0] == tree_key] == [(tree_key, record[:1])]
    script = f"import tallytree\nwith tallytree.open({str(path)!r}) as db, db.write() as tx: pass\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # the lock is free


@pytest.mark.parametrize("counter", [b"tallytree-3", b"\x01", (1 << 63).to_bytes(8, "big")])
def test_a_damaged_node_id_counter_raises_corrupt_database_error(tmp_path: Path, counter: bytes) -> None:
    """meta next_id is 8 bytes below 2**63: other bytes there made ids that no key holds (a raw
    OverflowError from msgpack or int.to_bytes) or, shorter, ids of nodes that exist. Writes that
    draw new ids read it: a batch (its new leaves), a split. (A write that only rewrites nodes gives
    each the next version of its own slot and draws none.)"""
    path = tmp_path / "db"
    _events(path)
    _put(path, b"meta", b"next_id", counter)
    before = _dump(path)
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        new = [(5 + n / 64, f"new{n}", (1.0,)) for n in range(1, 64)]
        for write in (
            lambda tx: events.insert_many(tx, new, namespace="a"),
            lambda tx: [events.insert(tx, *item, namespace="b") for item in new],  # one splits its leaf
        ):
            _raises_damage(partial(_in_write, db, write), "next_id")  # aborted: nothing written
        with db.read() as tx:
            assert events.count(tx, namespace="a") == events.count(tx, namespace="b") == 200
    assert _dump(path) == before


# ================================================================== another aggregate's records


def _two_aggregates(path: Path) -> None:
    """Aggregates ``one`` (one field) and ``two`` (two fields), node size 4, 60 items each in the
    default namespace, and ``two`` in namespaces ``a`` and ``b`` too."""
    with tallytree.open(path) as db:
        one = db.aggregate("one", values=("v",), node_size=4)
        two = db.aggregate("two", values=("a", "b"), node_size=4)
        with db.write() as tx:
            one.insert_many(tx, [(k, f"i{k}", (k,)) for k in range(60)])
            for namespace in (None, "a", "b"):
                two.insert_many(tx, [(k, f"j{k}", (k, k)) for k in range(60)], namespace=namespace)


@pytest.mark.skipif(tallytree._btree.speedups is None, reason="the C range sum's check (Python sums it)")
def test_a_node_of_another_aggregate_in_a_tree_is_damage(tmp_path: Path) -> None:
    """An internal node of an aggregate of two fields stored where one of an aggregate of one field
    was (a record swapped by a foreign writer): the C range sum raised a raw ValueError. (The Python
    sum does not notice; ``check`` does.)"""
    path = tmp_path / "db"
    _two_aggregates(path)
    with _behind_tallytrees_back(path, b"nodes") as (txn, nodes):
        parts = [
            (bytes(key), msgpack.unpackb(bytes(value)), bytes(value)) for key, value in txn.cursor(nodes)
        ]
        # internal nodes (_node.INTERNAL): [2, keys, kids, shifts, counts, sums..., float counts...]
        ones = [key for key, part, _ in parts if part[0] == 2 and len(part) == 7]
        twos = [value for _, part, value in parts if part[0] == 2 and len(part) == 9]
        txn.put(ones[0], twos[0], db=nodes)
    with tallytree.open(path) as db, db.read() as tx:
        one = db.aggregate("one")
        for read in (lambda: one.totals(tx, lt=7), lambda: one.totals(tx, ge=3, lt=50)):
            _raises_damage(read, "node")
        assert tallytree.check(tx, one)


# ================================================================== a node of another aggregate, read

KERNELS = [True, False]


def _path_to(path: Path, name: str, key: int) -> list[tuple[bytes, int, int]]:
    """The nodes from the root of aggregate ``name``'s tree (default namespace) down to the leaf that
    holds ``key``: for each, its NODES key and the first and last keys of its subtree."""
    with tallytree.open(path) as db, db.read() as tx:
        record = tx.root(db.aggregate(name)._tree_key(None))
        assert record is not None

        def edge(node_id: int, last: bool) -> Any:
            node = tx.node(node_id)
            while not node.leaf:
                node = tx.node(node.kids[-1 if last else 0])
            return decode_entry(node.keys[-1 if last else 0])[0]

        found, node_id = [], record.node_id
        while True:
            node = tx.node(node_id)
            found.append((node_key(node_id), edge(node_id, False), edge(node_id, True)))
            if node.leaf:
                return found
            fences = [decode_entry(fence)[0] if at else -1 for at, fence in enumerate(node.keys)]
            node_id = node.kids[max(at for at, fence in enumerate(fences) if fence <= key)]


FOREIGN = {  # damaged aggregate, the aggregate whose node takes the place, the level (0: the root)
    "a leaf of two fields in a tree of one": ("one", "two", -1),
    "a leaf of one field in a tree of two": ("two", "one", -1),
    "an internal node of two fields in a tree of one": ("one", "two", 1),
    "an internal node of one field in a tree of two": ("two", "one", 1),
    "the root node of two fields in a tree of one": ("one", "two", 0),
}


def _foreign_node(path: Path, damage: str) -> tuple[str, int, int]:
    """Aggregates ``one`` and ``two`` (``_two_aggregates``: trees of the same shape), one node of the
    tree of ``one`` (or ``two``) replaced by the node at its place in the other's tree (the same
    entry counts, child counts and keys but the ids, so that only the number of value fields tells
    them apart); the damaged aggregate and the first and last keys under the node."""
    damaged, other, level = FOREIGN[damage]
    _two_aggregates(path)
    target, first, last = _path_to(path, damaged, 30)[level]
    source = _path_to(path, other, 30)[level][0]
    assert level == 0 or len(_path_to(path, damaged, 30)) >= 3  # an internal node below the root
    _put(path, b"nodes", target, _get(path, b"nodes", source))
    return damaged, first, last


def _damage_in(reads: dict[str, Callable[[], object]]) -> list[str]:
    """The reads (by name) that did not raise CorruptDatabaseError, with what they did instead."""
    wrong = []
    for name, read in reads.items():
        try:
            answer = read()
        except CorruptDatabaseError:
            continue
        except Exception as exc:
            wrong.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            try:
                shown = repr(answer)
            except Exception as exc:
                shown = f"a {type(answer).__name__} whose repr raises {type(exc).__name__}: {exc}"
            wrong.append(f"{name}: answered {shown}")
    return wrong


@pytest.mark.parametrize("damage", list(FOREIGN))
@pytest.mark.parametrize("kernels", KERNELS, ids=["C kernels", "pure Python"])
def test_reads_that_cut_into_a_node_of_another_aggregate_raise_corrupt_database_error(
    tmp_path: Path, damage: str, kernels: bool
) -> None:
    """A node of a tree replaced by the node at its place in the tree of an aggregate of another
    number of value fields (a damaged child id, or a node record a foreign writer swapped): every
    read whose bounds cut into the node's subtree (inside one leaf, half-open either way, across
    leaves, at the leaf's last entry, at its first entry and id) raises CorruptDatabaseError. The C
    range sum answered some bounds (a cut at the end of the foreign leaf reads none of its values)
    and raised ValueError at others, and count, rank, at, min, max, items, page and get answered
    from the foreign node, as the Python descents still do."""
    path = tmp_path / "db"
    name, first, last = _foreign_node(path, damage)
    middle = (first + last + 1) // 2  # first < middle <= last
    prefix = "i" if name == "one" else "j"
    bounds: list[dict[str, Any]] = [
        {"eq": middle},
        {"ge": middle},
        {"lt": middle},
        {"gt": middle},
        {"le": middle},
        {"ge": first + 1, "le": last},
        {"ge": 0, "lt": middle},
        {"gt": middle, "le": 59},
        {"le": last},
        {"gt": last},
    ]
    with tallytree.open(path) as db, contextlib.ExitStack() as stack:
        if not kernels:
            stack.enter_context(pure_python())
        aggregate = db.aggregate(name)
        field = aggregate.fields[0]
        tx = stack.enter_context(db.read())
        reads: dict[str, Callable[[], object]] = {
            f"rank({first}, {prefix}{first})": lambda: aggregate.rank(tx, first, f"{prefix}{first}"),
            f"get({middle})": lambda: aggregate.get(tx, middle, f"{prefix}{middle}"),
            f"buckets(edges=[0, {middle}, 60])": lambda: aggregate.buckets(tx, edges=[0, middle, 60]),
        }
        for bound in bounds:
            reads |= {
                f"count({bound})": partial(aggregate.count, tx, **bound),
                f"totals({bound})": partial(aggregate.totals, tx, **bound),
                f"sum({bound})": partial(aggregate.sum, tx, field, **bound),
                f"rank({middle}, {bound})": partial(aggregate.rank, tx, middle, **bound),
                f"at(0, {bound})": partial(aggregate.at, tx, 0, **bound),
                f"at(-1, {bound})": partial(aggregate.at, tx, -1, **bound),
                f"min({bound})": partial(aggregate.min, tx, **bound),
                f"max({bound})": partial(aggregate.max, tx, **bound),
                f"items({bound})": lambda bound=bound: list(aggregate.items(tx, **bound)),
                f"page({bound})": partial(aggregate.page, tx, limit=2, **bound),
            }
        assert _damage_in(reads) == []
        assert tallytree.check(tx, aggregate)


@pytest.mark.parametrize("damage", list(FOREIGN))
@pytest.mark.parametrize("kernels", KERNELS, ids=["C kernels", "pure Python"])
def test_iterations_through_a_node_of_another_aggregate_raise_corrupt_database_error(
    tmp_path: Path, damage: str, kernels: bool
) -> None:
    """The same damage met by iterations whose bounds do not cut into the node but take it whole
    (every item, or from before it to after it): they descend through it in Python, in both paths."""
    path = tmp_path / "db"
    name, first, last = _foreign_node(path, damage)
    with tallytree.open(path) as db, contextlib.ExitStack() as stack:
        if not kernels:
            stack.enter_context(pure_python())
        aggregate = db.aggregate(name)
        tx = stack.enter_context(db.read())
        reads: dict[str, Callable[[], object]] = {
            "items()": lambda: list(aggregate.items(tx)),
            "items(reverse=True)": lambda: list(aggregate.items(tx, reverse=True)),
            "page(limit=100)": lambda: aggregate.page(tx, limit=100),
        }
        if first > 0 and last < 59:
            around = {"ge": first - 1, "le": last + 1}
            reads[f"items({around})"] = lambda: list(aggregate.items(tx, **around))
        assert _damage_in(reads) == []


@pytest.mark.skipif(tallytree._btree.speedups is None, reason="the C descents' check (Python's do not count)")
@pytest.mark.parametrize("kept", [0, 1], ids=["emptied", "cut to its first entry"])
def test_a_leaf_that_holds_fewer_entries_than_its_parent_counts_is_damage(tmp_path: Path, kept: int) -> None:
    """A leaf of aggregate ``one`` whose record was emptied or cut by damage (its parent still counts
    its four entries): reads whose cuts fall in it raise CorruptDatabaseError naming it, where the C
    descents answered by the parent's counts and sums plus what the leaf holds."""
    path = tmp_path / "db"
    _two_aggregates(path)
    target, first, last = _path_to(path, "one", 30)[-1]
    kind, entries, values = msgpack.unpackb(_get(path, b"nodes", target))  # [1, entries, one column]
    _put(path, b"nodes", target, msgpack.packb([kind, entries[:kept], values[:kept]], use_bin_type=True))
    with tallytree.open(path) as db, db.read() as tx:
        one = db.aggregate("one")
        reads: dict[str, Callable[[], object]] = {
            "count": lambda: one.count(tx, ge=first + 1, le=last),
            "totals": lambda: one.totals(tx, lt=last),
            "rank": lambda: one.rank(tx, first + 1),
            "at": lambda: one.at(tx, 0, gt=first),
            "min": lambda: one.min(tx, ge=last),
        }
        assert _damage_in(reads) == []
        assert "holds" in str(_raises_damage(reads["count"], f"node {int.from_bytes(target, 'big')}"))


def test_a_root_record_of_another_aggregate_is_damage(tmp_path: Path) -> None:
    """The root record of an aggregate of one field stored as the record of namespace ``b`` of one of
    two fields: listing namespaces, sums and an insert (which appends to the record without loading
    the tree) raised raw IndexError and ValueError."""
    path = tmp_path / "db"
    _two_aggregates(path)
    with tallytree.open(path) as db:
        keys = {
            name: db.aggregate(name)._tree_key(namespace) for name, namespace in (("one", None), ("two", "b"))
        }
        with db.write() as tx:  # a pending entry in one's record
            db.aggregate("one").insert(tx, 100, "p", (1,))
    _put(path, b"roots", keys["two"], _get(path, b"roots", keys["one"]))
    before = _dump(path)
    with tallytree.open(path) as db:
        two = db.aggregate("two")
        with db.read() as tx:
            for read in (
                lambda: list(two.namespaces(tx)),
                lambda: two.sum(tx, "b", namespace="b"),
                lambda: two.totals(tx, lt=5, namespace="b"),
            ):
                _raises_damage(read, "root record")
            assert two.totals(tx, namespace="a").count == 60
        for write in (
            lambda tx: two.insert(tx, 200, "x", (1, 2), namespace="b"),
            lambda tx: two.insert_many(tx, [(3, "y", (1, 2))], namespace="b"),
        ):
            with pytest.raises(CorruptDatabaseError), db.write() as tx:
                write(tx)
    assert _dump(path) == before


def test_a_root_record_that_undercounts_its_nodes_is_damage(tmp_path: Path) -> None:
    """A root record's count lowered below what its nodes hold: a position from the nodes' ranks
    (``at(-1, lt=)``, ``max(lt=)``) went past the record's count and met an assert (under ``python
    -O``, no check: an answer that disagreed with ``at(-1)``)."""
    path = tmp_path / "db"
    with tallytree.open(path) as db:
        events = db.aggregate("a", values=("v",), node_size=4)
        with db.write() as tx:
            events.insert_many(tx, [(k, f"i{k}", (k,)) for k in range(40)])
        tree_key = events._tree_key(None)
    record = msgpack.unpackb(_get(path, b"roots", tree_key))
    record[2][0] -= 3
    _put(path, b"roots", tree_key, msgpack.packb(record, use_bin_type=True))
    with tallytree.open(path) as db, db.read() as tx:
        events = db.aggregate("a")
        for read in (lambda: events.at(tx, -1, lt=39), lambda: events.max(tx, lt=39)):
            _raises_damage(read, "root record")
        assert tallytree.check(tx, events)
