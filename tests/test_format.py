"""The format tag and what open() makes of a store: a newer format, a damaged or missing tag, a file
whose LMDB structure contradicts itself (a copy torn by a live writer), another application's
environment, and a database retagged by a newer tallytree while this process has it open.

Damage is made with raw py-lmdb writes, or raw page copies within data.mdb, on a closed database."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import pure_python

import tallytree
from tallytree import CorruptDatabaseError, DatabaseFormatError
from tallytree.cli import main as cli_main

PAGE = 4096


def _lmdb_env(path: Path) -> Any:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 24)


def _set_meta(path: Path, key: bytes, value: bytes | None) -> None:
    env = _lmdb_env(path)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            if value is None:
                txn.delete(key, db=meta)
            else:
                txn.put(key, value, db=meta)
    finally:
        env.close()


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


def _database(path: Path) -> None:
    """A database with an aggregate of 5,000 items in namespace "o", in 50 namespaces besides."""
    with tallytree.open(path) as db:
        events = db.aggregate("events", values=("v",))
        with db.write() as tx:
            events.insert_many(tx, [(n, f"i{n}", (n,)) for n in range(5000)], namespace="o")
            for namespace in range(50):
                events.insert(tx, 1, "x", (1,), namespace=f"n{namespace}")


def _cli_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["check", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ================================================================== the tag


@pytest.mark.parametrize("tag", [b"\xff\x00zz", b"tallytree-0", b"tallytree-03", b"tallytree-", b""])
def test_a_damaged_format_tag_is_damage_not_another_version(
    tmp_path: Path, tag: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tag no tallytree writes, in a store holding tallytree's counters, was reported as a format
    to "open with the tallytree version that wrote it" (DatabaseFormatError, exit 1): no version wrote
    it; it is damage (CorruptDatabaseError, exit 3), and nothing is written."""
    path = tmp_path / "db"
    _database(path)
    _set_meta(path, b"format", tag)
    before = _digest(path)
    for readonly in (True, False):
        with pytest.raises(CorruptDatabaseError, match="the tag is damaged") as caught:
            tallytree.open(path, readonly=readonly)
        assert "version that wrote it" not in str(caught.value)
    assert _digest(path) == before
    code, output = _cli_check(path, capsys)
    assert code == 3 and "tag is damaged" in output, (code, output)


def test_a_missing_format_tag_is_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tag deleted from a database that holds tallytree's counters: "it is damaged", said a plain
    DatabaseFormatError (exit 1); now CorruptDatabaseError (exit 3), nothing written."""
    path = tmp_path / "db"
    _database(path)
    _set_meta(path, b"format", None)
    before = _digest(path)
    for readonly in (True, False):
        with pytest.raises(CorruptDatabaseError, match="no format tag"):
            tallytree.open(path, readonly=readonly)
    assert _digest(path) == before
    code, output = _cli_check(path, capsys)
    assert code == 3 and "no format tag" in output, (code, output)


@pytest.mark.parametrize("number", [5, 10])
def test_a_newer_format_says_to_upgrade(
    tmp_path: Path, number: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newer tallytree's tag: a DatabaseFormatError that is no CorruptDatabaseError (exit 1), naming
    the format and saying to upgrade (it said to open it "with the version that wrote it")."""
    path = tmp_path / "db"
    _database(path)
    _set_meta(path, b"format", b"tallytree-%d" % number)
    before = _digest(path)
    for readonly in (True, False):
        with pytest.raises(DatabaseFormatError) as caught:
            tallytree.open(path, readonly=readonly)
        assert not isinstance(caught.value, CorruptDatabaseError)
        message = str(caught.value)
        assert f"format {number}" in message and "newer tallytree" in message and "upgrade" in message
    assert _digest(path) == before
    code, output = _cli_check(path, capsys)
    assert code == 1 and "newer tallytree" in output


def test_a_format_record_of_another_application_is_foreign(tmp_path: Path) -> None:
    """An LMDB environment of another application with a table "meta" holding a "format" of its own
    and none of tallytree's counters: foreign (DatabaseFormatError, not damage), nothing written."""
    path = tmp_path / "other"
    env = _lmdb_env(path)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"json", db=meta)
        txn.put(b"schema", b"7", db=meta)
    env.close()
    before = _digest(path)
    with pytest.raises(DatabaseFormatError, match="another application") as caught:
        tallytree.open(path)
    assert not isinstance(caught.value, CorruptDatabaseError)
    assert _digest(path) == before


def test_format_version_says_what_the_database_is_stored_in(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _database(path)
    with tallytree.open(path, readonly=True) as db:
        assert db.format_version() == 4
    _set_meta(path, b"format", b"tallytree-3")
    with tallytree.open(path, readonly=True) as db:  # read as it is
        assert db.format_version() == 3
    _set_meta(path, b"format", b"tallytree-2")
    with tallytree.open(path, readonly=True) as db:  # read as it is
        assert db.format_version() == 2
    with tallytree.open(path) as db:  # retagged by an open for writing
        assert db.format_version() == 4
    assert tallytree.open_memory().format_version() == 4


# ================================================================== retagged by a newer tallytree


_NEWER = """
import lmdb, sys
env = lmdb.open(sys.argv[1], max_dbs=8)
meta, roots = env.open_db(b"meta"), env.open_db(b"roots")
with env.begin(write=True) as txn:
    txn.put(b"format", sys.argv[2].encode(), db=meta)
    for key, _ in list(txn.cursor(db=roots)):
        if key.endswith(b"o\\x00"):  # the records of namespace "o" in a layout this version cannot read
            txn.put(key, b"\\xc1", db=roots)
"""


def _newer_process(path: Path, tag: str) -> None:
    """Another process, as a newer tallytree: it retags the database and rewrites namespace "o"'s root
    record in a layout that this version does not decode."""
    subprocess.run([sys.executable, "-c", _NEWER, str(path), tag], check=True, timeout=60)


def _count(db: tallytree.Database, namespace: str) -> int:
    with db.read() as tx:
        return db.aggregate("events").count(tx, namespace=namespace)


@pytest.mark.parametrize("kernels", ["C", "Python"])
def test_a_process_meets_a_newer_format_written_while_it_has_the_database_open(
    tmp_path: Path, kernels: str
) -> None:
    """Rolling upgrade: a process of this version has the database open when a newer tallytree
    retags it (and writes records this version cannot decode). Its reads raised CorruptDatabaseError
    "a root record cannot be decoded", as if the file were damaged; now a DatabaseFormatError (no
    CorruptDatabaseError) says the database was upgraded and to restart with the newer tallytree. Its
    writes are refused as they begin, where no record fails to decode too (a namespace the newer
    process did not touch), and write nothing. The same records without a new tag are damage."""
    path = tmp_path / "db"
    _database(path)
    with pure_python() if kernels == "Python" else nullcontext(), tallytree.open(path, durable=False) as db:
        assert _count(db, "o") == 5000
        _newer_process(path, "tallytree-4")  # the tag as it was: damage, and writes elsewhere go on
        with pytest.raises(CorruptDatabaseError, match="root record"):
            _count(db, "o")
        _insert(db, "n3")
        _newer_process(path, "tallytree-5")
        attempts = [
            lambda: _count(db, "o"),
            lambda: _insert(db, "o"),
            lambda: _insert(db, "n3"),  # decodes: refused all the same
        ]
        for attempt in attempts:
            with pytest.raises(DatabaseFormatError) as caught:
                attempt()
            assert not isinstance(caught.value, CorruptDatabaseError), caught.value
            message = str(caught.value)
            assert (
                "upgraded to format 5 by a newer tallytree" in message and "Restart this process" in message
            )
        assert _count(db, "n3") == 2  # what still decodes reads; nothing more was written
        assert _count(db, "n4") == 1


def _insert(db: tallytree.Database, namespace: str) -> None:
    with db.write() as tx:
        db.aggregate("events").insert(tx, 10**6, "new", (1,), namespace=namespace)


def test_a_tag_damaged_while_the_database_is_open_stops_writes(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _database(path)
    with tallytree.open(path, durable=False) as db:
        _newer_process(path, "tallytree-x")
        with pytest.raises(CorruptDatabaseError, match="changed to b'tallytree-x'"):
            _insert(db, "n3")
        assert _count(db, "n3") == 1


# ================================================================== LMDB's structure contradicted


def _meta_page(data: bytes) -> tuple[int, int]:
    """The offset of the main database's record in LMDB's current meta page (the one of the later
    transaction), and the page number of its root. An LMDB meta page: a 16-byte page header, then
    magic (4), version (4), address (8), map size (8), the free and the main database's records (48
    bytes each: pad 4, flags 2, depth 2, branch, leaf and overflow pages, entries, root: 8 each),
    last page (8), transaction id (8)."""
    found = []
    for page in (0, 1):
        record = page * PAGE + 16 + 24 + 48
        (transaction,) = struct.unpack_from("<Q", data, page * PAGE + 16 + 24 + 96 + 8)
        (root,) = struct.unpack_from("<Q", data, record + 40)
        found.append((transaction, record, root))
    _, record, root = max(found)
    return record, root


def _table_root(path: Path, name: bytes) -> int:
    """The page number of the root of LMDB table ``name`` (its record in the main database)."""
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            record = txn.get(name)
    finally:
        env.close()
    (root,) = struct.unpack_from("<Q", record, 40)
    return int(root)


def _copy_page(path: Path, source: int, target: int) -> None:
    """Overwrite page ``target`` of data.mdb with page ``source`` (its own page number in the header
    set to ``target``), as a page reused by a later transaction is found in a copy of the file torn by
    a live writer."""
    with (path / "data.mdb").open("r+b") as file:
        file.seek(source * PAGE)
        page = bytearray(file.read(PAGE))
        page[:8] = struct.pack("<Q", target)
        file.seek(target * PAGE)
        file.write(page)


@pytest.fixture
def torn(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "db"
    _database(path)
    yield path


@pytest.mark.parametrize(
    "damage",
    [
        "the list of tables holds a page of root records",
        "the meta table holds a page of root records",
        "the meta table's page is of the wrong type",
    ],
)
def test_a_torn_copy_is_damaged_not_another_applications(
    torn: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy of data.mdb made while a writer ran (backup_torn in the storage audit): pages the copy's
    meta page refers to were reused by later transactions before they were copied. open() called it
    "an LMDB environment of another application" or "not a tallytree database: MDB_CORRUPTED"
    (DatabaseFormatError, exit 1); it is a damaged tallytree database (CorruptDatabaseError, exit 3),
    saying to restore a backup."""
    path = torn
    if damage.startswith("the list of tables"):
        _copy_page(path, _table_root(path, b"roots"), _meta_page((path / "data.mdb").read_bytes())[1])
    elif "root records" in damage:
        _copy_page(path, _table_root(path, b"roots"), _table_root(path, b"meta"))
    else:
        _copy_page(path, 0, _table_root(path, b"meta"))  # a meta page where a leaf page belongs
    before = _digest(path)
    for readonly in (True, False):
        with pytest.raises(CorruptDatabaseError, match="damaged tallytree database") as caught:
            tallytree.open(path, readonly=readonly)
        assert "another application" not in str(caught.value) and "Restore" in str(caught.value)
    assert _digest(path) == before
    code, output = _cli_check(path, capsys)
    assert code == 3 and "damaged tallytree database" in output, (code, output)


def test_a_table_added_beside_tallytrees_is_damage(tmp_path: Path) -> None:
    """A table that tallytree never makes, in an environment whose meta holds tallytree's format tag
    (a foreign writer): damage, not another application's environment."""
    path = tmp_path / "db"
    _database(path)
    env = _lmdb_env(path)
    users = env.open_db(b"users")
    with env.begin(write=True) as txn:
        txn.put(b"u1", b"ann", db=users)
    env.close()
    with pytest.raises(CorruptDatabaseError, match="keys tallytree never writes"):
        tallytree.open(path, readonly=True)
