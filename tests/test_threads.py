"""Threads of one process sharing a database: a write transaction that ends without committing, while
other threads keep reading, must end at once and release LMDB's writer lock.

py-lmdb 2.0 and later make a write transaction's ``abort()`` wait until no other thread of the process
is inside an LMDB call. Threads that keep running short reads put that off indefinitely: the writer
hung, holding LMDB's writer lock, so every writer of every process waited too. Each case below ran
into it (a watchdog fails the test after :data:`LIMIT` seconds instead of hanging the suite; then the
readers stop, which lets a blocked abort finish); each now takes milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tallytree
from tallytree import _lmdb

LIMIT = 10.0
"""Seconds an ending write transaction may take before the watchdog fails the test."""
READERS = 4


class _Readers:
    """Threads that each run short read transactions in a loop until stopped."""

    def __init__(self, db: tallytree.Database, events: tallytree.Aggregate) -> None:
        self.stop = threading.Event()
        self.reads = [0] * READERS
        self.failures: list[BaseException] = []

        def read(slot: int) -> None:
            try:
                while not self.stop.is_set():
                    with db.read() as tx:
                        events.count(tx, ge=5)
                    self.reads[slot] += 1
            except BaseException as exc:
                self.failures.append(exc)

        self.threads = [threading.Thread(target=read, args=(slot,), daemon=True) for slot in range(READERS)]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + LIMIT
        while not all(self.reads) and time.monotonic() < deadline:  # every reader is under way
            time.sleep(0.01)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(LIMIT)
        assert self.failures == []


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[tallytree.Database, tallytree.Aggregate, _Readers]]:
    """A database of 2,000 events (on a 1 MiB map, so that a large write must grow it), read in a
    loop by :data:`READERS` threads."""
    with tallytree.open(tmp_path / "db", map_size=1 << 20, durable=False) as db:
        events = db.aggregate("events", values=("v",))
        with db.write() as tx:
            events.insert_many(tx, [(n, f"e{n}", (1,)) for n in range(2000)])
        readers = _Readers(db, events)
        try:
            yield db, events, readers
        finally:
            readers.end()


def _within_limit(action: Callable[[], object], readers: _Readers, rounds: int = 1) -> list[str]:
    """Run ``action`` ``rounds`` times in a thread; return the name of what each round raised
    ("-" for nothing). Fail the test if they have not returned after :data:`LIMIT` seconds, once the
    readers are stopped (which unblocks a waiting abort)."""
    done = threading.Event()
    raised: list[str] = []

    def run() -> None:
        try:
            for _ in range(rounds):
                try:
                    action()
                except Exception as exc:
                    raised.append(type(exc).__name__)
                else:
                    raised.append("-")
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(LIMIT):
        readers.stop.set()  # a waiting abort proceeds once no other thread calls LMDB
        done.wait(LIMIT)
        pytest.fail(
            f"a write transaction was still ending after {LIMIT:g} s while other threads read "
            f"({len(raised)} of {rounds} had ended)"
        )
    return raised


def _no_op(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    with db.write() as tx:
        assert events.upsert(tx, 5, "e5", (1,)) == "unchanged"  # writes nothing


def _raising(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    with db.write() as tx:
        events.insert(tx, -1, "new", (1,))
        raise KeyError("the caller's own error")


def _aborted(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    with db.write() as tx:
        events.insert(tx, -1, "new", (1,))
        tx.abort()


def _duplicate(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    with db.write() as tx:
        events.insert(tx, 5, "e5", (1,))


def _failing_after_its_puts(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    """A commit that fails between LMDB puts (as tallytree's own check of appended nodes, a too-long
    key or KeyboardInterrupt would): committing what was put would write a part of the batch, so
    this one must be aborted."""
    real = _lmdb._apply_ops

    def put_then_fail(*args: object) -> None:
        real(*args)  # type: ignore[arg-type]
        raise RuntimeError("failed after the puts")

    _lmdb._apply_ops = put_then_fail  # type: ignore[assignment]
    try:
        with db.write() as tx:
            events.insert_many(tx, [(10**6 + n, f"n{n}", (1,)) for n in range(300)])
    finally:
        _lmdb._apply_ops = real


@pytest.mark.parametrize(
    ("end", "error"),
    [
        (_no_op, None),
        (_raising, KeyError),
        (_aborted, None),
        (_duplicate, tallytree.DuplicateItemError),
        (_failing_after_its_puts, RuntimeError),
    ],
    ids=["no-op write", "exception in the block", "tx.abort()", "duplicate", "failure after puts"],
)
def test_a_write_that_commits_nothing_ends_at_once_while_other_threads_read(
    busy: tuple[tallytree.Database, tallytree.Aggregate, _Readers],
    end: Callable[[tallytree.Database, tallytree.Aggregate], None],
    error: type[BaseException] | None,
) -> None:
    db, events, readers = busy
    # (the abort did not always wait: several rounds, so that the test failed every time before)
    raised = _within_limit(lambda: end(db, events), readers, rounds=5)
    assert raised == [error.__name__ if error is not None else "-"] * 5
    assert db._backend._resizing == 0, "no transaction of the process is held back any more"
    with db.read() as tx:  # nothing was written
        assert events.count(tx) == 2000 and events.totals(tx).v == 2000 and tallytree.check(tx) == []
    assert _within_limit(lambda: _one_insert(db, events), readers) == ["-"]  # the writer lock is free
    with db.read() as tx:
        assert events.count(tx) == 2001


def _one_insert(db: tallytree.Database, events: tallytree.Aggregate) -> None:
    with db.write() as tx:
        events.insert(tx, -5, "after", (1,))


def test_a_write_that_fills_the_map_grows_it_while_other_threads_read(
    busy: tuple[tallytree.Database, tallytree.Aggregate, _Readers],
) -> None:
    """The put that runs out of map fails the LMDB transaction (LMDB marks it so): ended by a commit,
    which LMDB turns into an abort, it waits for no one, and the batch is applied again on the grown
    map."""
    db, events, readers = busy
    size = db._backend.env.info()["map_size"]

    def fill() -> None:
        with db.write() as tx:
            events.insert_many(tx, [(10**6 + n, f"n{n}", (1,)) for n in range(100_000)])

    assert _within_limit(fill, readers) == ["-"]
    assert db._backend.env.info()["map_size"] > size
    with db.read() as tx:
        assert events.count(tx) == 102_000 and tallytree.check(tx) == []
