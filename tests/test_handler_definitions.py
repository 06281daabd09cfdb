"""A ChangeHandler's definition is stored with its aggregate: another one is refused, in any process,
until it is registered with redefine=True, and a process still running the old one is refused on apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import snapshot

import tallytree
from tallytree import Change, ChangeHandler
from tallytree._extract import describe_definition

SOURCE = str(Path(tallytree.__file__).resolve().parent.parent)


def _not_void(row: dict[str, Any]) -> bool:  # the same code as the worker's (see WORKER)
    return row["status"] != "void"


def _record(db: tallytree.Database, name: str) -> dict[str, Any] | None:
    with db.read() as tx:
        data = tx.meta(b"agg:" + name.encode())
    return None if data is None else msgpack.unpackb(data, raw=False, timestamp=3)  # type: ignore[no-any-return]


def _invoices(hooks: ChangeHandler, **changes: Any) -> tallytree.Aggregate:
    spec: dict[str, Any] = {"namespace": "org", "key": "status", "values": ("total",), **changes}
    return hooks.aggregate("invoices", **spec)


ROW = {"org": 1, "status": "open", "total": 10}


# ================================================================== one process


def test_a_registration_stores_its_definition_and_refuses_another(db: tallytree.Database) -> None:
    hooks = ChangeHandler(db)
    invoices = _invoices(hooks, where=_not_void)
    stored = _record(db, "invoices")
    assert stored is not None
    wanted = describe_definition("invoices", "status", "org", {"total": "total"}, _not_void, "error")
    assert stored["extractors"] == wanted
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, ROW))
    before = snapshot(db), _record(db, "invoices")
    for other in (
        {"key": "day"},
        {"namespace": None},
        {"where": None},
        {"where": lambda row: row["status"] != "void"},  # another function name
        {"where": _not_void, "on_missing": "skip"},
        {"where": _not_void, "values": {"total": lambda row: row["total"] * 100}},
    ):
        for handler in (hooks, ChangeHandler(db)):  # this handler, or another of the same process
            with pytest.raises(tallytree.SchemaMismatchError, match="is stored with another definition"):
                _invoices(handler, **other)
    with pytest.raises(tallytree.SchemaMismatchError, match=r"key='status' stored, 'day' given"):
        _invoices(ChangeHandler(db), key="day", where=_not_void)
    with pytest.raises(tallytree.SchemaMismatchError, match=r"value fields \['total'\], not \['cents'\]"):
        _invoices(ChangeHandler(db), values=("cents",), where=_not_void)
    with pytest.raises(tallytree.SchemaMismatchError, match=r"node_size=128, not 16"):
        _invoices(ChangeHandler(db), node_size=16, where=_not_void)
    assert (snapshot(db), _record(db, "invoices")) == before  # nothing was written
    assert hooks.definition("invoices").where_spec is _not_void  # the registration stands
    other = ChangeHandler(db)
    assert _invoices(other, where=_not_void) is invoices  # the same definition: accepted
    with db.write() as tx:
        other.apply(tx, Change.insert(2, ROW))
        assert invoices.count(tx, namespace=1) == 2


def test_the_stored_definition_is_registered_again_without_a_write(tmp_path: Path) -> None:
    """Another process, or a restart, registers it in a read transaction: inside `with db.write()`
    too, and on a database opened read-only. A where= mapping holding a datetime compares equal
    after the round trip through the record."""
    since = {"status": "open", "since": datetime(2024, 5, 1, tzinfo=UTC)}
    with tallytree.open(tmp_path / "db") as db:
        _invoices(ChangeHandler(db), where=since)
    with tallytree.open(tmp_path / "db") as db:
        hooks = ChangeHandler(db)
        with db.write() as tx:
            invoices = _invoices(hooks, where=since)
            hooks.apply(tx, Change.insert(1, {**ROW, **since}))
            assert invoices.count(tx, namespace=1) == 1
            with pytest.raises(tallytree.SchemaMismatchError, match="another definition"):
                _invoices(ChangeHandler(db), where={**since, "since": datetime(2024, 5, 2, tzinfo=UTC)})
    with tallytree.open(tmp_path / "db", readonly=True) as db:
        _invoices(ChangeHandler(db), where=since)
        with pytest.raises(tallytree.SchemaMismatchError, match="another definition"):
            _invoices(ChangeHandler(db))


def test_an_aggregate_without_a_stored_definition_is_adopted(db: tallytree.Database) -> None:
    """One made by db.aggregate() (or by a release that stored no definition): the first registration
    stores its definition and keeps the items, in a write transaction of its own."""
    invoices = db.aggregate("invoices", values=("total",))
    with db.write() as tx:
        invoices.insert(tx, "open", 1, (10,), namespace=1)
    hooks = ChangeHandler(db)
    with db.write() as tx, pytest.raises(tallytree.TransactionError, match="stores its definition"):
        _invoices(hooks)
    assert "extractors" not in (_record(db, "invoices") or {}) and hooks.aggregates() == []
    assert _invoices(hooks) is invoices
    assert (_record(db, "invoices") or {})["extractors"]["key"] == ["field", "status"]
    with db.write() as tx:
        hooks.apply(tx, Change.delete(1, ROW))  # strict: the item was kept
        assert invoices.count(tx) == 0
    with pytest.raises(tallytree.SchemaMismatchError, match="another definition"):
        _invoices(ChangeHandler(db), key="day")


def test_redefine_empties_the_aggregate_stores_the_new_definition_and_refuses_the_old(
    db: tallytree.Database,
) -> None:
    old_hooks = ChangeHandler(db)
    invoices = _invoices(old_hooks)
    with db.write() as tx:
        old_hooks.apply(tx, Change.insert(1, ROW))
    new_hooks = ChangeHandler(db)
    weekly = _invoices(new_hooks, key="week", values=("total", "tax"), node_size=16, redefine=True)
    assert weekly is not invoices and weekly is db.aggregate("invoices")
    assert (weekly.fields, weekly.node_size) == (("total", "tax"), 16)
    assert (_record(db, "invoices") or {})["extractors"]["key"] == ["field", "week"]
    before = snapshot(db)
    with db.read() as tx:
        assert weekly.count(tx) == 0  # emptied: its items followed the old definition
        with pytest.raises(tallytree.TransactionError, match="redefined"):
            invoices.count(tx)  # the old aggregate is gone
        assert tallytree.check(tx) == []  # its trees too
    void = {**ROW, "status": "void"}
    refusals = [
        lambda tx: old_hooks.apply(tx, Change.insert(2, ROW)),
        lambda tx: old_hooks.apply(tx, Change.insert(2, ROW), idempotent=True),
        lambda tx: old_hooks.apply_many(tx, [Change.insert(2, ROW), Change.insert(3, ROW)]),
        lambda tx: old_hooks.apply_many(tx, [Change.insert(2, ROW), Change.insert(3, ROW)], idempotent=True),
    ]
    for refused in refusals:
        with (
            pytest.raises(tallytree.SchemaMismatchError, match=r"was redefined after") as raised,
            db.write() as tx,
        ):
            refused(tx)
        assert "key='week' stored now, 'status' this handler's" in str(raised.value)
        assert "value fields ['total', 'tax'], not ['total']" in str(raised.value)
    assert snapshot(db) == before  # nothing was written
    with db.write() as tx:
        new_hooks.apply(tx, Change.insert(2, {**void, "week": 7, "tax": 1}))
        assert weekly.count(tx, namespace=1) == 1
    # redefine=True with the stored definition changes nothing (a deploy may run it twice)
    assert _invoices(ChangeHandler(db), key="week", values=("total", "tax"), redefine=True) is weekly
    with db.read() as tx:
        assert weekly.count(tx, namespace=1) == 1


def test_an_apply_refuses_a_stale_definition_even_for_a_change_that_gives_no_item(
    db: tallytree.Database,
) -> None:
    """The old definition's where= leaves the row out, the new one's takes it: applying nothing would
    still make the aggregate drift from the new definition."""
    old_hooks = ChangeHandler(db)
    _invoices(old_hooks, where=_not_void)
    _invoices(ChangeHandler(db), redefine=True)  # without the where= filter
    with pytest.raises(tallytree.SchemaMismatchError, match=r"where=None stored now"), db.write() as tx:
        old_hooks.apply(tx, Change.insert(1, {**ROW, "status": "void"}))


def test_a_redefinition_refuses_the_old_definition_in_verify_and_repair_and_after_a_drop(
    db: tallytree.Database,
) -> None:
    hooks = ChangeHandler(db)
    _invoices(hooks)
    new = _invoices(ChangeHandler(db), key="week", redefine=True)
    rows = [{"id": 1, **ROW, "week": 3}]
    with db.write() as tx:
        with pytest.raises(tallytree.InvalidArgumentError, match="dropped or redefined"):
            tallytree.repair(tx, new, rows, definition=hooks.definition("invoices"))
        assert tallytree.repair(tx, new, rows).missing == 1  # the definition registered since
        assert [item.key for item in new.items(tx, namespace=1)] == [3]
    db.drop_aggregate("invoices")
    with pytest.raises(tallytree.TransactionError, match="was dropped after this handler"), db.write() as tx:
        hooks.apply(tx, Change.insert(2, ROW))
    _invoices(ChangeHandler(db))  # made again with the old handler's very definition
    with (
        pytest.raises(tallytree.TransactionError, match="created again with this handler's"),
        db.write() as tx,
    ):
        hooks.apply(tx, Change.insert(2, ROW))
    _invoices(hooks)  # registered again: it maintains the new one
    with db.write() as tx:
        hooks.apply(tx, Change.insert(2, ROW))


def test_detaching_keeps_the_stored_definition(db: tallytree.Database) -> None:
    """A detached aggregate keeps its items, which follow its definition: registering another one
    needs redefine=True, from a handler's detach and from a table's."""
    hooks = ChangeHandler(db)
    _invoices(hooks)
    hooks.detach("invoices")
    with pytest.raises(tallytree.SchemaMismatchError, match="redefine=True"):
        _invoices(hooks, key="day")
    _invoices(hooks)
    loads = db.table("loads")
    by_day = loads.aggregate("by_day", key="day", values=("kg",), where=_not_void)
    with db.write() as tx:
        loads.insert(tx, {"day": 1, "kg": 5, "status": "open"}, id=1)
    with pytest.raises(tallytree.TransactionError, match="maintained by table 'loads'"):
        ChangeHandler(db).aggregate("by_day", key="day", values=("kg",), where=_not_void, redefine=True)
    loads.detach("by_day")
    with pytest.raises(tallytree.SchemaMismatchError, match="where=function"):
        ChangeHandler(db).aggregate("by_day", key="day", values=("kg",))
    taken = ChangeHandler(db)
    assert taken.aggregate("by_day", key="day", values=("kg",), where=_not_void) is by_day
    with db.write() as tx:
        taken.apply(tx, Change.delete(1, {"day": 1, "kg": 5, "status": "open"}))  # strict: it was there
        assert by_day.count(tx) == 0


def test_redefine_must_be_a_bool_and_a_damaged_stored_definition_is_damage(db: tallytree.Database) -> None:
    with pytest.raises(tallytree.ArgumentTypeError, match="redefine"):
        _invoices(ChangeHandler(db), redefine="yes")
    assert db.aggregates() == []
    _invoices(ChangeHandler(db))
    stored = _record(db, "invoices") or {}
    with db.write() as tx:
        tx.set_meta(b"agg:invoices", msgpack.packb({**stored, "extractors": [1, 2]}))
    with pytest.raises(tallytree.CorruptDatabaseError, match="extractors stored with it"):
        _invoices(ChangeHandler(db))


# ================================================================== processes

WORKER = r"""
import json, sys
import tallytree
from tallytree import Change, ChangeHandler


def _not_void(row):  # the test module's, in another module (compared by name and code)
    return row["status"] != "void"


db = tallytree.open(sys.argv[1], durable=False)
hooks = ChangeHandler(db)
for line in sys.stdin:
    command = json.loads(line)
    try:
        if command["do"] == "register":
            spec = {"namespace": "org", "key": "status", "values": ("total",), **command["spec"]}
            if spec.pop("where_not_void", False):
                spec["where"] = _not_void
            hooks.aggregate("invoices", **spec)
        else:
            with db.write() as tx:
                changes = [Change.insert(doc_id, row) for doc_id, row in command["rows"]]
                if command["do"] == "apply":
                    for change in changes:
                        hooks.apply(tx, change)
                else:
                    hooks.apply_many(tx, changes)
        answer = "ok"
    except tallytree.Error as exc:
        answer = f"{type(exc).__name__}: {exc}"
    print(json.dumps(answer), flush=True)
"""


class _Worker:
    """Another process with a ChangeHandler of its own on the database, driven line by line."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": SOURCE},
        )

    def ask(self, **command: Any) -> str:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(command) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            _, errors = process.communicate(timeout=60)
            raise AssertionError(f"the worker exited ({process.returncode}): {errors}")
        answer: str = json.loads(line)
        return answer

    def close(self) -> None:
        _, errors = self.process.communicate(timeout=60)  # (closes its stdin: the worker ends)
        assert self.process.returncode == 0, errors


@contextmanager
def _worker(path: Path) -> Iterator[_Worker]:
    worker = _Worker(path)
    try:
        yield worker
    finally:
        if worker.process.poll() is None:
            worker.close()


def test_another_process_with_another_definition_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        hooks = ChangeHandler(db)
        invoices = _invoices(hooks, where=_not_void)
        with db.write() as tx:
            hooks.apply(tx, Change.insert(1, ROW))
        with _worker(path) as worker:
            answer = worker.ask(do="register", spec={"key": "day", "where_not_void": True})
            assert answer.startswith("SchemaMismatchError: aggregate 'invoices' is stored with another")
            assert "key='status' stored, 'day' given" in answer
            answer = worker.ask(do="register", spec={})  # without the where= function
            assert answer.startswith("SchemaMismatchError") and "where=function" in answer
            assert worker.ask(do="register", spec={"where_not_void": True}) == "ok"  # the same: taken
            assert worker.ask(do="apply", rows=[[2, ROW], [3, {**ROW, "status": "void"}]]) == "ok"
        with db.read() as tx:
            assert invoices.count(tx, namespace=1) == 2 and tallytree.check(tx) == []


def test_a_process_that_registered_before_a_redefinition_is_refused_on_apply(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        hooks = ChangeHandler(db)
        _invoices(hooks)
        with _worker(path) as old_worker:
            assert old_worker.ask(do="register", spec={}) == "ok"  # an old worker, running the first
            assert old_worker.ask(do="apply", rows=[[1, ROW]]) == "ok"
            with _worker(path) as new_worker:  # a new worker of a rolling deploy
                assert new_worker.ask(do="register", spec={"key": "day"}).startswith("SchemaMismatchError")
                assert new_worker.ask(do="register", spec={"key": "day", "redefine": True}) == "ok"
                assert new_worker.ask(do="apply", rows=[[2, {**ROW, "day": 5}]]) == "ok"
            before = snapshot(db)
            for do in ("apply", "apply_many"):
                answer = old_worker.ask(do=do, rows=[[3, ROW], [4, ROW]])
                assert answer.startswith("SchemaMismatchError: aggregate 'invoices' was redefined after")
                assert "key='day' stored now, 'status' this handler's" in answer
                assert "restart it with the new one" in answer
        for idempotent in (False, True):  # this process registered the first too
            with pytest.raises(tallytree.SchemaMismatchError, match="was redefined after"), db.write() as tx:
                hooks.apply(tx, Change.insert(5, ROW), idempotent=idempotent)
        assert snapshot(db) == before  # nothing was written
        with db.read() as tx:
            assert [item.key for item in db.aggregate("invoices").items(tx, namespace=1)] == [5]
            assert tallytree.check(tx) == []


# ================================================================== the SQLAlchemy Sync


def _bills() -> tuple[type, Any]:
    """A mapped class of bills (org, status, total) and a sessionmaker over a new SQLite database."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import Column, Integer, String, create_engine
    from sqlalchemy.orm import declarative_base, sessionmaker

    base: Any = declarative_base()  # (Column-style: the annotations of this module are strings)

    class Bill(base):  # type: ignore[misc,valid-type]  # a dynamic base
        __tablename__ = "bills"
        id = Column(Integer, primary_key=True)
        org = Column(Integer, nullable=False)
        status = Column(String, nullable=False)
        total = Column(Integer, nullable=False)

    engine = create_engine("sqlite://")
    base.metadata.create_all(engine)
    return Bill, sessionmaker(engine)


def _sql_count(factory: Any, model: type) -> int:
    from sqlalchemy import func, select

    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)))


def test_a_sync_refuses_a_commit_for_an_aggregate_redefined_in_this_process() -> None:
    from tallytree.sqlalchemy import Sync

    bill, factory = _bills()
    db = tallytree.open_memory()
    with Sync(db) as sync:
        sync.register(bill).aggregate("invoices", namespace="org", key="status", values=("total",))
        sync.listen(factory)
        _invoices(ChangeHandler(db), key="total", redefine=True)
        with factory() as session:
            session.add(bill(org=1, status="open", total=5))
            with pytest.raises(tallytree.SchemaMismatchError, match="'invoices' was redefined") as raised:
                session.commit()
            assert "before the SQL commit" in "".join(raised.value.__notes__)
            session.rollback()
    assert _sql_count(factory, bill) == 0


def test_a_sync_refuses_a_commit_for_an_aggregate_another_process_redefined(tmp_path: Path) -> None:
    """Refused in the flush and, for changes flushed before the redefinition, before the commit:
    while SQL can still roll back (after the SQL commit, tallytree would lag)."""
    from tallytree.sqlalchemy import Sync

    bill, factory = _bills()
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db, Sync(db) as sync:
        sync.register(bill).aggregate("invoices", namespace="org", key="status", values=("total",))
        sync.listen(factory)
        with factory() as session:
            session.add(bill(org=1, status="open", total=5))
            session.commit()
            session.add(bill(org=1, status="open", total=7))
            session.flush()  # queued before the redefinition
            with _worker(path) as worker:
                assert worker.ask(do="register", spec={"key": "total", "redefine": True}) == "ok"
            with pytest.raises(tallytree.SchemaMismatchError, match="was redefined after") as raised:
                session.commit()
            assert "before the SQL commit" in "".join(raised.value.__notes__)
            session.rollback()
            session.add(bill(org=1, status="open", total=9))
            with pytest.raises(tallytree.SchemaMismatchError, match="was redefined after") as raised:
                session.commit()  # flushed after the redefinition: refused in the flush
            assert "refused in the flush" in "".join(raised.value.__notes__)
            session.rollback()
        assert _sql_count(factory, bill) == 1
        with db.read() as tx:
            assert db.aggregate("invoices").count(tx, namespace=1) == 0  # emptied by the redefinition


def test_check_reports_damaged_stored_extractors() -> None:
    """The checker decodes the extractors a handler stored with an aggregate's definition (a damaged
    one is otherwise met only when a handler registers)."""
    db = tallytree.open_memory()
    tallytree.ChangeHandler(db).aggregate("paid", key="day", values=("cents",))
    record_key = b"agg:paid"
    with db.write() as tx:
        record = msgpack.unpackb(tx.meta(record_key))
        assert record["extractors"]["key"] == ["field", "day"]
        tx.set_meta(record_key, msgpack.packb({**record, "extractors": [1, 2]}))
    with db.read() as tx:
        problems = tallytree.check(tx)
    assert [(problem.aggregate, "extractors stored with it" in problem.message) for problem in problems] == [
        ("paid", True)
    ]
