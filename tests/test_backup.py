"""Backups of live databases (``Database.backup``) and the space report (``Database.storage_info``).

A backup must be one consistent snapshot however other threads and processes write meanwhile, must
never write over anything, must leave nothing behind when it fails, and must open as a database that
``check`` finds sound. ``storage_info`` is checked against scenarios whose answer is known: a read
transaction held open while commits go on holds free pages back from reuse, and a compacting backup
is exactly as large as it says.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import snapshot

import tallytree
from tallytree import _lmdbfile

SRC = str(Path(tallytree.__file__).resolve().parent.parent)
BATCH = 7  # items per commit of the writers below: a consistent copy holds a multiple of it


def build(path: Path, items: int = 20_000, namespaces: int = 50) -> tallytree.Database:
    db = tallytree.open(path, durable=False)
    events = db.aggregate("events", values=("v",))
    with db.write() as tx:
        events.build_many(
            tx, [(f"o{n % namespaces}", n * 7919 % 1_000_003, f"i{n}", (1,)) for n in range(items)]
        )
    return db


def copy_state(path: Path) -> tuple[int, int, list[Any]]:
    """(items, the sum of ``v``, check's problems) of the database at ``path``, opened read-only."""
    with tallytree.open(path, readonly=True) as db, db.read() as tx:
        totals = [totals for _, totals in db.aggregate("events", create=False).namespaces(tx)]
        return sum(t.count for t in totals), sum(t["v"] for t in totals), tallytree.check(tx)


def churn(db: tallytree.Database, commits: int, start: int = 0) -> None:
    """``commits`` commits, each inserting 100 items and deleting 100 (so the data keeps its size)."""
    events = db.aggregate("events")
    for commit in range(start, start + commits):
        with db.write() as tx:
            for number in range(100):
                events.insert(
                    tx, 2_000_000 + commit * 100 + number, f"c{commit}-{number}", (1,), namespace="new"
                )
            if commit:
                for number in range(100):
                    events.delete(
                        tx,
                        2_000_000 + (commit - 1) * 100 + number,
                        f"c{commit - 1}-{number}",
                        namespace="new",
                    )
            for number in range(100):
                key = (commit * 100 + number) * 7919 % 1_000_003
                events.delete(
                    tx, key, f"i{commit * 100 + number}", namespace=f"o{(commit * 100 + number) % 50}"
                )


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tallytree.Database]:
    db = build(tmp_path / "db")
    yield db
    db.close()


# ---------------------------------------------------------------- consistent copies of live databases


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("lmdb_copy", [False, True])
def test_backup_while_another_thread_writes_is_consistent(
    tmp_path: Path,
    database: tallytree.Database,
    compact: bool,
    lmdb_copy: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also when commits come too fast for any snapshot to find its meta page intact (forced here:
    no attempt), where LMDB's own copy takes over (a writer thread of the same process can commit
    hundreds of times while the backup's thread waits for the GIL: seen in CI)."""
    if lmdb_copy:
        monkeypatch.setattr(_lmdbfile, "_ATTEMPTS", 0)
    events = database.aggregate("events")
    stop = threading.Event()
    commits = [0]

    def write() -> None:
        while not stop.is_set():
            with database.write() as tx:
                for number in range(BATCH):
                    events.insert(
                        tx, commits[0] * BATCH + number, f"w{commits[0]}-{number}", (1,), namespace="w"
                    )
            commits[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while commits[0] < 5:  # (the copies below then overlap a writer that is running)
            stop.wait(0.01)
        for copy in range(3):
            database.backup(tmp_path / f"copy{copy}", compact=compact)
    finally:
        stop.set()
        writer.join()
    for copy in range(3):
        count, total, problems = copy_state(tmp_path / f"copy{copy}")
        assert problems == [] and count == total and (count - 20_000) % BATCH == 0
    assert commits[0] > 5


WRITER = """
import sys, tallytree
db = tallytree.open(sys.argv[1], durable=False)
events = db.aggregate("events")
commit = 0
print("writing", flush=True)
while True:
    with db.write() as tx:
        for number in range(7):
            events.insert(tx, commit * 7 + number, f"p{commit}-{number}", (1,), namespace="p")
        for number in range(7):  # and as many deletions, of the base items, freeing pages
            key = commit * 7 + number
            events.delete(tx, key * 7919 % 1_000_003, f"i{key}", namespace=f"o{key % 50}")
            events.insert(tx, key * 7919 % 1_000_003, f"i{key}", (1,), namespace=f"o{key % 50}")
    commit += 1
"""


def test_backup_while_another_process_writes_is_consistent(
    tmp_path: Path, database: tallytree.Database
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "db")],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        events = database.aggregate("events")
        while True:  # (the copies below then overlap a writer that is running)
            with database.read() as tx:
                if events.count(tx, namespace="p") >= 20 * BATCH:
                    break
        for copy, compact in enumerate((True, False, True, False)):
            database.backup(tmp_path / f"copy{copy}", compact=compact)
    finally:
        writer.kill()
        writer.wait()
    for copy in range(4):
        count, total, problems = copy_state(tmp_path / f"copy{copy}")
        assert problems == [] and count == total and (count - 20_000) % BATCH == 0


@pytest.mark.parametrize("compact", [True, False])
def test_backup_does_not_wait_for_a_writer_of_its_process(
    tmp_path: Path, database: tallytree.Database, compact: bool
) -> None:
    """A write block of another thread, open as the backup begins and ending by an exception (an
    abort), neither waits for the backup nor makes it wait: py-lmdb's own ``Environment.copy``
    deadlocks there (a copy without compaction takes LMDB's writer lock, and py-lmdb 3 lets the
    writer's abort wait for the copy to return)."""
    events = database.aggregate("events")
    inside, backed_up = threading.Event(), threading.Event()

    def write() -> None:
        try:
            with database.write() as tx:
                events.insert(tx, -1, "never", (1,))
                inside.set()
                backed_up.wait(0.5)  # (ends, aborting, while the backup runs, or once it is done)
                raise RuntimeError("abort")
        except RuntimeError:
            pass

    writer = threading.Thread(target=write)
    writer.start()
    inside.wait()
    backup = threading.Thread(
        target=lambda: (database.backup(tmp_path / "copy", compact=compact), backed_up.set())
    )
    backup.daemon = True  # (were it to deadlock, the test fails instead of hanging the run)
    backup.start()
    backup.join(60)
    writer.join(60)
    assert not backup.is_alive() and not writer.is_alive()
    assert copy_state(tmp_path / "copy") == (20_000, 20_000, [])


def test_backup_of_a_readonly_database(tmp_path: Path, database: tallytree.Database) -> None:
    expected = snapshot(database)
    database.close()
    with tallytree.open(tmp_path / "db", readonly=True) as readonly:
        readonly.backup(tmp_path / "compact")
        readonly.backup(tmp_path / "pages", compact=False)
    for copy in ("compact", "pages"):
        with tallytree.open(tmp_path / copy) as restored:  # a database of its own: it takes writes
            assert snapshot(restored) == expected
            with restored.write() as tx:
                restored.aggregate("events").insert(tx, 1, "after", (1,))
            with restored.read() as tx:
                assert tallytree.check(tx) == []


# ---------------------------------------------------------------- compaction


def test_compacting_backup_shrinks_a_file_after_deletes(tmp_path: Path, database: tallytree.Database) -> None:
    events = database.aggregate("events")
    for first in range(5, 50, 5):  # empty 45 of the 50 namespaces, a few per commit
        with database.write() as tx:
            for number in range(first, first + 5):
                events.clear(tx, namespace=f"o{number}")
    expected = snapshot(database)
    info = database.storage_info()
    assert info is not None
    file_bytes = (tmp_path / "db" / "data.mdb").stat().st_size
    assert info["file_bytes"] == file_bytes == info["pages"] * info["page_bytes"]
    assert info["pages_free"] > 3 * info["pages_used"]  # the file keeps its size, mostly free pages
    database.backup(tmp_path / "compact")
    database.backup(tmp_path / "pages", compact=False)
    compacted = (tmp_path / "compact" / "data.mdb").stat().st_size
    assert compacted == info["compacted_bytes"] < file_bytes / 3
    assert (tmp_path / "pages" / "data.mdb").stat().st_size == file_bytes  # every page, free ones too
    for copy in ("compact", "pages"):
        with tallytree.open(tmp_path / copy, readonly=True) as restored, restored.read() as tx:
            assert tallytree.check(tx) == [] and snapshot(restored) == expected
    with tallytree.open(tmp_path / "compact", readonly=True) as restored:
        after = restored.storage_info()
        assert after is not None and after["pages_free"] == 0 and after["file_bytes"] == compacted


# ---------------------------------------------------------------- destinations and refusals


def test_backup_never_writes_over_anything(tmp_path: Path, database: tallytree.Database) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(tallytree.InvalidArgumentError, match=r"is not empty \(it holds notes.txt\)"):
        database.backup(occupied)
    assert [entry.name for entry in occupied.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(tallytree.InvalidArgumentError, match="exists and is not a directory"):
        database.backup(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(tallytree.InvalidArgumentError, match="is not empty"):
        database.backup(tmp_path / "db")  # the database itself
    database.backup(tmp_path / "copy")
    with pytest.raises(tallytree.InvalidArgumentError, match=r"is not empty \(it holds data.mdb\)"):
        database.backup(tmp_path / "copy")  # a second backup into the first one
    (tmp_path / "empty").mkdir()
    database.backup(tmp_path / "empty")  # an empty directory is taken
    database.backup(tmp_path / "new" / "nested" / "copy")  # missing parents are made
    for copy in ("copy", "empty", "new/nested/copy"):
        assert copy_state(tmp_path / copy) == (20_000, 20_000, [])
        assert sorted(entry.name for entry in (tmp_path / copy).iterdir()) in (
            ["data.mdb"],
            ["data.mdb", "lock.mdb"],
        )


def test_backup_refusals(tmp_path: Path, database: tallytree.Database) -> None:
    with pytest.raises(tallytree.ArgumentTypeError, match="compact= takes True or False"):
        database.backup(tmp_path / "copy", compact="yes")  # type: ignore[arg-type]
    with pytest.raises(tallytree.ArgumentTypeError):
        database.backup(3)  # type: ignore[arg-type]
    with pytest.raises(tallytree.InvalidArgumentError):
        database.backup("")
    with database.write(), pytest.raises(tallytree.TransactionError, match=r"inside `with db\.write"):
        database.backup(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    database.close()
    with pytest.raises(tallytree.TransactionError, match="closed"):
        database.backup(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_failed_backup_leaves_nothing(
    tmp_path: Path, database: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (the sync fails) or Ctrl-C (during the compaction) leave the destination as it was:
    no file, and none of the directories made for it."""

    def full(_descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(_lmdbfile.os, "fsync", full)
        for compact in (True, False):
            with pytest.raises(tallytree.StorageError, match="nothing of it was left there"):
                database.backup(tmp_path / "new" / "copy", compact=compact)
            assert not (tmp_path / "new").exists()

    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    (tmp_path / "empty").mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(_lmdbfile, "_compact", interrupted)
        with pytest.raises(KeyboardInterrupt):
            database.backup(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # (a directory that existed stays)
    database.backup(tmp_path / "empty")  # and takes the next backup
    assert copy_state(tmp_path / "empty") == (20_000, 20_000, [])


def test_an_interrupted_backup_is_named(tmp_path: Path, database: tallytree.Database) -> None:
    """What a backup killed outright (``kill -9``) leaves is no database, and the next backup into the
    same directory says what it is."""
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / _lmdbfile.PARTIAL).write_bytes(b"\0" * 4096)
    with pytest.raises(tallytree.InvalidArgumentError, match="is left by an interrupted backup"):
        database.backup(tmp_path / "copy")
    with pytest.raises(tallytree.DatabaseFormatError):
        tallytree.open(tmp_path / "copy", create=False)


def test_backup_of_a_memory_database_writes_a_database(tmp_path: Path) -> None:
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost",), node_size=4)
    orders = db.table("orders")
    orders.aggregate("orders_by_day", key="day", values=("amount",))
    with db.write() as tx:
        events.insert_many(tx, [(n, f"e{n}", (n / 4,)) for n in range(500)], namespace=("eu", 1))
        orders.insert_many(tx, [{"day": n % 7, "amount": n} for n in range(50)])
    expected = snapshot(db)
    db.backup(tmp_path / "copy", compact=False)  # (in memory, compact has nothing to leave out)
    db.close()
    with tallytree.open(tmp_path / "copy") as restored:
        assert snapshot(restored) == expected
        with restored.read() as tx:
            assert tallytree.check(tx) == [] and restored.table("orders").count(tx) == 50
    assert sorted(entry.name for entry in (tmp_path / "copy").iterdir()) == ["data.mdb", "lock.mdb"]


# ---------------------------------------------------------------- storage_info


HOLDER = """
import sys, tallytree
db = tallytree.open(sys.argv[1], readonly=True)
with db.read() as tx:
    db.aggregate("events").count(tx, namespace="o1")
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_storage_info_shows_a_reader_holding_free_pages(tmp_path: Path, database: tallytree.Database) -> None:
    churn(database, 10)
    quiet = database.storage_info()
    assert quiet is not None
    assert (quiet["readers"], quiet["oldest_reader_lag"], quiet["pages_held_by_readers"]) == (0, None, 0)
    assert quiet["pages"] == quiet["pages_used"] + quiet["pages_free"]
    assert quiet["pages_reusable"] > 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "db")],
        env={**os.environ, "PYTHONPATH": SRC},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        churn(database, 20, start=10)
        held = database.storage_info()
        assert held is not None
        assert (held["readers"], held["oldest_reader_lag"], held["oldest_reader_pid"]) == (1, 20, holder.pid)
        assert held["dead_readers"] == 0
        # the pages the 20 commits freed are all held for the reader's snapshot; the file grew
        assert held["pages_held_by_readers"] > held["pages_reusable"] + quiet["pages_reusable"]
        assert held["pages"] > quiet["pages"]
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait() == 0
    finally:
        holder.kill()
        holder.wait()
    released = database.storage_info()
    assert released is not None
    assert (released["readers"], released["pages_held_by_readers"]) == (0, 0)
    assert released["pages_reusable"] >= held["pages_held_by_readers"]  # free for the next writes
    assert released["pages"] == held["pages"]  # and the file keeps its size


def test_storage_info_counts_the_reader_of_a_killed_process(
    tmp_path: Path, database: tallytree.Database
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "db")],
        env={**os.environ, "PYTHONPATH": SRC},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    info = database.storage_info()
    assert info is not None
    assert (info["readers"], info["dead_readers"], info["oldest_reader_pid"]) == (1, 1, holder.pid)


def test_storage_info_agrees_with_the_compacted_copy_and_in_memory(
    tmp_path: Path, database: tallytree.Database
) -> None:
    churn(database, 5)
    info = database.storage_info()
    assert info is not None and info["last_commit"] > 0
    database.backup(tmp_path / "copy")
    assert (tmp_path / "copy" / "data.mdb").stat().st_size == info["compacted_bytes"]
    assert tallytree.open_memory().storage_info() is None
    database.close()
    with pytest.raises(tallytree.TransactionError, match="closed"):
        database.storage_info()


def test_a_file_layout_not_parsed_falls_back_to_lmdb(
    tmp_path: Path, database: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the file in a layout ``_lmdbfile`` does not parse (another LMDB build), a backup takes
    LMDB's compacting copy, and the free list is reported unknown rather than guessed."""
    churn(database, 3)
    expected = snapshot(database)
    known = database.storage_info()
    monkeypatch.setattr(_lmdbfile, "_layout_known", lambda _source: False)
    for copy, compact in (("compact", True), ("pages", False)):
        database.backup(tmp_path / copy, compact=compact)
        assert sorted(entry.name for entry in (tmp_path / copy).iterdir()) == ["data.mdb"]
        with tallytree.open(tmp_path / copy, readonly=True) as restored, restored.read() as tx:
            assert tallytree.check(tx) == [] and snapshot(restored) == expected
    info = database.storage_info()
    assert info is not None and known is not None
    assert (info["pages_reusable"], info["pages_held_by_readers"]) == (None, None)
    assert info["pages"] == known["pages"] and info["readers"] == 0
