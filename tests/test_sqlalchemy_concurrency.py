"""The SQLAlchemy integration under concurrent sessions: threads and processes on one SQLite file and one
tallytree database (LMDB), committing changes to the same rows. Whatever the interleaving, tallytree
must end equal to SQL (``Sync.verify`` finds no drift), and in strict mode no commit may fail for a
change that reached tallytree out of SQL's order."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import Engine, ForeignKey, create_engine, event, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

import tallytree
from tallytree.sqlalchemy import Sync

STATUSES = ("open", "paid", "void")


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    org: Mapped[int]
    status: Mapped[str]
    total: Mapped[int]


class Org(Base):
    __tablename__ = "orgs"
    id: Mapped[int] = mapped_column(primary_key=True)


class Payment(Base):
    """A row whose foreign key SQLite checks at the COMMIT (deferred): a commit that fails there."""

    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", deferrable=True, initially="DEFERRED"))
    amount: Mapped[int]


def make_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    return engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(tmp_path / "app.db")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def define(sync: Sync) -> tallytree.Aggregate:
    return sync.register(Invoice).aggregate("invoices", namespace="org", key="status", values=("total",))


def assert_no_drift(db: tallytree.Database, sync: Sync, factory: sessionmaker[Session]) -> None:
    with factory() as session:
        drift = sync.verify(session)["invoices"]
        assert drift.ok, drift
    with db.read() as tx:
        assert tallytree.check(tx) == []


def run_threads(workers: list[threading.Thread]) -> None:
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert not worker.is_alive(), "a worker is stuck"


def _one_open_invoice(
    db: tallytree.Database, engine: Engine, idempotent: bool
) -> tuple[Sync, tallytree.Aggregate, sessionmaker[Session]]:
    """A Sync of ``db`` listening to sessions of ``engine``, and invoice 7 open in both stores."""
    sync = Sync(db, idempotent=idempotent)
    invoices = define(sync)
    factory = sessionmaker(engine)
    sync.listen(factory)
    with factory() as session:
        session.add(Invoice(id=7, org=1, status="open", total=100))
        session.commit()
    return sync, invoices, factory


@pytest.mark.parametrize("idempotent", [True, False])
def test_a_commit_paused_after_its_sql_commit_reaches_tallytree_before_the_next_one(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idempotent: bool
) -> None:
    """Worker A sets an invoice open -> paid and commits; between its SQL commit and its tallytree
    commit it is descheduled (the pause); worker B then sets it paid -> void and commits. tallytree
    must see A's change before B's, as SQL did: B waits for A's tallytree commit."""
    a_sql_committed, b_done = threading.Event(), threading.Event()
    after_commit = Sync._after_commit

    def paused(self: Sync, session: Session) -> None:
        if session.info.get("pause"):
            a_sql_committed.set()
            b_done.wait(0.5)  # B goes first if it can
        after_commit(self, session)

    monkeypatch.setattr(Sync, "_after_commit", paused)
    db = tallytree.open(tmp_path / "tally")
    sync, invoices, factory = _one_open_invoice(db, engine, idempotent)
    errors: list[BaseException] = []

    def worker_a() -> None:
        try:
            with factory() as session:
                session.info["pause"] = True
                session.get(Invoice, 7).status = "paid"  # type: ignore[union-attr]
                session.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def worker_b() -> None:
        try:
            a_sql_committed.wait(10)
            with factory() as session:
                session.get(Invoice, 7).status = "void"  # type: ignore[union-attr]
                session.commit()
        except BaseException as exc:
            errors.append(exc)
        finally:
            b_done.set()

    try:
        run_threads([threading.Thread(target=worker_a), threading.Thread(target=worker_b)])
        assert errors == []
        with db.read() as tx:
            assert [(item.key, item.id) for item in invoices.items(tx, namespace=1)] == [("void", 7)]
            assert invoices.totals(tx, namespace=1).total == 100
        assert_no_drift(db, sync, factory)
    finally:
        sync.close()
        db.close()


@pytest.mark.parametrize("idempotent", [True, False])
def test_an_old_row_is_read_after_the_commit_its_update_waits_for(engine: Engine, idempotent: bool) -> None:
    """SQLite through pysqlite: B's flush reads the invoice's old row while A holds an uncommitted
    update of it, then B's UPDATE waits for A's commit. B's change must start from A's row ("paid"),
    not from the row as it was before A's commit ("open"): B's transaction begins as SQLite's writer
    before it reads."""
    db = tallytree.open_memory()
    sync, invoices, factory = _one_open_invoice(db, engine, idempotent)
    errors: list[BaseException] = []
    first, second = factory(), factory()
    started = threading.Event()

    def worker_b() -> None:
        try:
            invoice = second.get(Invoice, 7)  # loaded before A commits: "open"
            assert invoice is not None
            invoice.status = "void"
            started.set()
            second.commit()  # its flush reads the old row, then waits for A's commit
        except BaseException as exc:
            errors.append(exc)

    try:
        first.get(Invoice, 7).status = "paid"  # type: ignore[union-attr]
        first.flush()  # A holds SQLite's write lock, uncommitted
        worker = threading.Thread(target=worker_b)
        worker.start()
        started.wait(10)
        time.sleep(0.3)  # B reaches its flush and waits for A
        first.commit()
        worker.join(60)
        assert not worker.is_alive()
        assert errors == []
        with db.read() as tx:
            assert [(item.key, item.id) for item in invoices.items(tx, namespace=1)] == [("void", 7)]
        assert_no_drift(db, sync, factory)
    finally:
        first.close()
        second.close()
        sync.close()
        db.close()


@pytest.mark.parametrize("ordered", [True, False])
def test_the_writer_is_held_across_the_sql_commit_and_released_when_it_fails(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordered: bool
) -> None:
    """The tallytree write of a commit is open (holding LMDB's writer lock) while SQL commits, so
    another writer waits for it; an SQL commit that fails releases it at once, before the session is
    rolled back, and tallytree holds nothing of that commit. With ordered=False the changes are
    applied after the SQL commit instead, and nothing waits for it."""
    db = tallytree.open(tmp_path / "tally")
    sync = Sync(db, ordered=ordered)
    invoices = define(sync)
    per_org = sync.register(Payment).aggregate("payments", key="org_id", values=("amount",))
    factory = sessionmaker(engine)
    sync.listen(factory)
    waited: list[bool] = []

    def another_writer() -> threading.Thread:
        def write() -> None:
            with db.write():
                pass

        thread = threading.Thread(target=write)
        thread.start()
        return thread

    do_commit = engine.dialect.do_commit

    def during_sql_commit(dbapi_connection: Any) -> None:  # the DBAPI commit
        thread = another_writer()
        thread.join(0.3)
        waited.append(thread.is_alive())
        threads.append(thread)
        do_commit(dbapi_connection)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(engine.dialect, "do_commit", during_sql_commit)
    with factory() as session:
        session.add_all([Org(id=1), Invoice(id=1, org=1, status="open", total=5)])
        session.commit()
    monkeypatch.undo()
    assert waited == [ordered]  # the other writer waited for the SQL commit
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    session = factory()
    try:
        session.add_all([Invoice(id=2, org=1, status="paid", total=7), Payment(id=1, org_id=99, amount=3)])
        with pytest.raises(Exception, match="FOREIGN KEY"):
            session.commit()  # SQLite checks the deferred foreign key at the COMMIT, which fails
        thread = another_writer()  # not rolled back yet: the writer is free all the same
        thread.join(10)
        assert not thread.is_alive()
        with db.write():  # in this thread too
            pass
        session.rollback()
    finally:
        session.close()
    with db.read() as tx:
        assert [(item.key, item.id) for item in invoices.items(tx, namespace=1)] == [("open", 1)]
        assert per_org.count(tx) == 0
    assert_no_drift(db, sync, factory)
    sync.close()
    db.close()


def random_work(factory: sessionmaker[Session], seed: int, commits: int, rows: int) -> int:
    """Random commits on a few shared rows: attribute changes, deletes and inserts through the
    session, and ORM bulk statements; a rollback now and then. A conflict with another worker's
    commit (a row it deleted, or inserted first) rolls back, as an application would; return how
    many did."""
    rng = random.Random(seed)
    conflicts = 0
    for _ in range(commits):
        with factory() as session:
            try:
                random_commit(session, rng, rows)
            except (IntegrityError, StaleDataError):
                session.rollback()
                conflicts += 1
    return conflicts


def random_commit(session: Session, rng: random.Random, rows: int) -> None:
    for _ in range(rng.randrange(1, 4)):
        choice = rng.random()
        invoice_id = rng.randrange(1, rows + 1)
        invoice = session.get(Invoice, invoice_id)
        if choice < 0.5 and invoice is not None:
            invoice.status = rng.choice(STATUSES)
            if rng.random() < 0.3:
                invoice.org = rng.randrange(3)
            invoice.total = rng.randrange(100)
        elif choice < 0.65 and invoice is not None:
            session.delete(invoice)
        elif choice < 0.8 and invoice is None:
            session.add(Invoice(id=invoice_id, org=rng.randrange(3), status=rng.choice(STATUSES), total=1))
        elif choice < 0.9:
            session.execute(
                update(Invoice)
                .where(Invoice.org == rng.randrange(3))
                .values(status=rng.choice(STATUSES), total=Invoice.total + 1)
            )
        elif invoice is None:
            session.execute(
                insert(Invoice),
                [{"id": invoice_id, "org": rng.randrange(3), "status": "open", "total": 2}],
            )
        session.flush()
    if rng.random() < 0.1:
        session.rollback()
    else:
        session.commit()


def seed_rows(factory: sessionmaker[Session], rows: int) -> None:
    with factory() as session:
        session.add_all([Invoice(id=i, org=i % 3, status="open", total=i) for i in range(1, rows + 1)])
        session.commit()


@contextmanager
def busy_writer(db: tallytree.Database) -> Iterator[None]:
    """Another writer of the tallytree database (the application's own aggregates, a repair) holding
    the writer lock for a moment now and then, which commits of the Sync wait for."""
    stop = threading.Event()
    other = db.aggregate("other")

    def write() -> None:
        rng = random.Random(0)
        count = 0
        while not stop.is_set():
            with db.write() as tx:
                count += 1
                other.insert(tx, count, count)
                time.sleep(rng.random() * 0.02)
            time.sleep(rng.random() * 0.002)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


@pytest.mark.filterwarnings("ignore:DELETE statement on table")  # a row another worker deleted
@pytest.mark.parametrize("idempotent", [True, False])
def test_sessions_in_threads_never_drift(engine: Engine, tmp_path: Path, idempotent: bool) -> None:
    """The acceptance test: four threads, each with its own sessions, commit random changes to the same
    three rows while another thread writes tallytree too (so commits wait for its writer lock, in an
    order of their own); tallytree ends equal to SQL and no commit fails."""
    db = tallytree.open(tmp_path / "tally")
    factory = sessionmaker(engine)
    sync = Sync(db, idempotent=idempotent)
    define(sync)
    sync.listen(factory)
    seed_rows(factory, 3)
    errors: list[BaseException] = []
    switch = sys.getswitchinterval()

    def worker(seed: int) -> None:
        try:
            random_work(factory, seed, commits=40, rows=3)
        except BaseException as exc:
            errors.append(exc)

    sys.setswitchinterval(1e-5)  # threads interleave finely
    try:
        with busy_writer(db):
            run_threads([threading.Thread(target=worker, args=(seed,)) for seed in range(4)])
    finally:
        sys.setswitchinterval(switch)
    try:
        assert errors == []
        assert_no_drift(db, sync, factory)
    finally:
        sync.close()
        db.close()


CHILD = textwrap.dedent(
    """
    import sys
    from sqlalchemy.orm import sessionmaker
    import tallytree
    from tallytree.sqlalchemy import Sync
    from test_sqlalchemy_concurrency import define, make_engine, random_work

    database, sqlite, seed, idempotent = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    engine = make_engine(sqlite)
    factory = sessionmaker(engine)

    db = tallytree.open(database)
    sync = Sync(db, idempotent=idempotent)
    define(sync)
    sync.listen(factory)
    random_work(factory, seed, commits=40, rows=3)
    sync.close()
    db.close()
    """
)


@pytest.mark.filterwarnings("ignore:DELETE statement on table")  # a row another worker deleted
@pytest.mark.parametrize("idempotent", [True, False])
def test_sessions_in_processes_never_drift(engine: Engine, tmp_path: Path, idempotent: bool) -> None:
    """Three processes commit random changes to the same five rows of one SQLite file, each with its
    own Sync on one tallytree database: tallytree ends equal to SQL, and no commit fails."""
    database = tmp_path / "tally"
    db = tallytree.open(database)
    sync = Sync(db, idempotent=idempotent)
    define(sync)
    factory = sessionmaker(engine)
    sync.listen(factory)
    seed_rows(factory, 3)
    source = str(Path(tallytree.__file__).parent.parent)  # the tallytree under test
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    sqlite = engine.url.database
    assert sqlite is not None
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(database), sqlite, str(seed), "1" if idempotent else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), source])},
        )
        for seed in range(3)
    ]
    try:
        with busy_writer(db):
            outputs = [child.communicate(timeout=240)[0].decode() for child in children]
        assert [child.returncode for child in children] == [0, 0, 0], outputs
        assert_no_drift(db, sync, factory)
    finally:
        for child in children:
            if child.poll() is None:  # pragma: no cover - a stuck child
                child.kill()
        sync.close()
        db.close()
