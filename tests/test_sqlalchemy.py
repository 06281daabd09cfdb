"""The SQLAlchemy integration, against a real SQLite database through SQLAlchemy."""

from __future__ import annotations

import gc
import random
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Numeric,
    Uuid,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
    with_loader_criteria,
)

import tallytree
from tallytree.sqlalchemy import Sync


class Base(DeclarativeBase):
    pass


class Load(Base):
    __tablename__ = "loads"
    id: Mapped[int] = mapped_column(primary_key=True)
    org: Mapped[int]
    status: Mapped[str]
    amount: Mapped[int]
    note: Mapped[str | None] = mapped_column(default=None)


class Ticket(Base):
    """A row the UPDATE itself changes: the database counts the edits (an SQL ``onupdate``)."""

    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str]
    edits: Mapped[int] = mapped_column(default=0, onupdate=text("edits + 1"))


class Pair(Base):
    __tablename__ = "pairs"
    left: Mapped[int] = mapped_column(primary_key=True)
    right: Mapped[int] = mapped_column(primary_key=True)


class Invoice(Base):
    """The base of a class hierarchy: single-table (CreditNote) and joined (Refund) inheritance."""

    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    total: Mapped[int]
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "plain"}


class CreditNote(Invoice):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "credit"}


class Refund(Invoice):
    __tablename__ = "refunds"
    id: Mapped[int] = mapped_column(ForeignKey("invoices.id"), primary_key=True)
    reason: Mapped[str]
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "refund"}


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    lines: Mapped[list[Line]] = relationship(cascade="all, delete-orphan", back_populates="order")


class Line(Base):
    __tablename__ = "lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"))
    sku: Mapped[str]
    qty: Mapped[int]
    order: Mapped[Order | None] = relationship(back_populates="lines")


class Event(Base):
    """A mutable JSON column, changed in place."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    org: Mapped[str]
    data: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSON))


class Typed(Base):
    """Columns whose loaded types aggregates cannot take as they are."""

    __tablename__ = "typed"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    org: Mapped[str] = mapped_column(default="acme")
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2), default=Decimal(0))
    naive: Mapped[datetime] = mapped_column(DateTime, default=datetime(2024, 1, 1))
    aware: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=datetime(2024, 1, 1, tzinfo=UTC))
    day: Mapped[date] = mapped_column(default=date(2024, 1, 1))
    weight: Mapped[float] = mapped_column(default=0.0)


class LoadView(Base):
    """A second class mapped to the loads table, outside Load's hierarchy: its writes are not Load's."""

    __table__ = Load.__table__


class Widget(Base):
    """Rows in a cycle of foreign keys with Part, broken by post_update relationships: their extra
    UPDATEs (which also run ``edits``'s onupdate) fire no mapper event."""

    __tablename__ = "widgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    edits: Mapped[int] = mapped_column(default=0, onupdate=text("edits + 1"))
    favorite_id: Mapped[int | None] = mapped_column(
        ForeignKey("parts.id", use_alter=True, name="fk_widget_favorite")
    )
    favorite: Mapped[Part | None] = relationship(foreign_keys=[favorite_id], post_update=True)
    parts: Mapped[list[Part]] = relationship(foreign_keys="Part.widget_id", post_update=True, cascade="all")


class Part(Base):
    __tablename__ = "parts"
    id: Mapped[int] = mapped_column(primary_key=True)
    widget_id: Mapped[int | None] = mapped_column(ForeignKey("widgets.id"))
    sku: Mapped[str]


class Node(Base):
    """A tree whose foreign key the database cascades (ON UPDATE CASCADE) when a parent's id changes."""

    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", onupdate="CASCADE"))
    name: Mapped[str]
    children: Mapped[list[Node]] = relationship(back_populates="parent")
    parent: Mapped[Node | None] = relationship(back_populates="children", remote_side=[id])


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def savepoint_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine whose SAVEPOINTs work: SQLAlchemy's documented recipe for pysqlite, which otherwise
    leaves BEGIN to the driver (and the driver emits it late)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'savepoints.db'}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@contextmanager
def listening(
    engine: Engine, **options: Any
) -> Iterator[tuple[tallytree.Database, Sync, sessionmaker[Session]]]:
    """A Sync (``options``) over a new in-memory database, listening to a sessionmaker of ``engine``
    for the block."""
    db = tallytree.open_memory()
    sync = Sync(db, **options)
    factory = sessionmaker(engine)
    sync.listen(factory)
    try:
        yield db, sync, factory
    finally:
        sync.remove(factory)
        db.close()


@pytest.fixture
def setup(
    engine: Engine,
) -> Iterator[tuple[tallytree.Database, Sync, tallytree.Aggregate, sessionmaker[Session]]]:
    with listening(engine) as (db, sync, factory):
        by_status = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        yield db, sync, by_status, factory


def sql_counts(session: Session) -> dict[tuple[int, str], tuple[int, int]]:
    rows = session.execute(
        select(Load.org, Load.status, func.count(), func.sum(Load.amount)).group_by(Load.org, Load.status)
    )
    return {(org, status): (count, total) for org, status, count, total in rows}


def tally_counts(
    db: tallytree.Database, aggregate: tallytree.Aggregate
) -> dict[tuple[int, str], tuple[int, int]]:
    result = {}
    with db.read() as tx:
        for org, _ in aggregate.namespaces(tx):
            for status in ("open", "paid", "void"):
                totals = aggregate.totals(tx, namespace=org, eq=status)
                if totals.count:
                    result[(org, status)] = (totals.count, totals.amount)
    return result


def expected_counts(rows: list[tuple[int, str, int]]) -> dict[tuple[int, str], tuple[int, int]]:
    """What the aggregate should hold for rows of (org, status, amount), computed in Python."""
    result: dict[tuple[int, str], tuple[int, int]] = {}
    for org, status, amount in rows:
        count, total = result.get((org, status), (0, 0))
        result[(org, status)] = (count + 1, total + amount)
    return result


def assert_in_sync(
    db: tallytree.Database,
    sync: Sync,
    aggregate: tallytree.Aggregate,
    session: Session,
    expected: dict[tuple[int, str], tuple[int, int]],
) -> None:
    """The aggregate matches the table and the expected counts, item by item, and its trees are sound."""
    assert tally_counts(db, aggregate) == sql_counts(session) == expected
    assert sync.verify(session)["loads"].ok
    with db.read() as tx:
        assert tallytree.check(tx) == []


def test_inserts_updates_deletes_are_applied_after_commit(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(org=1, status="open", amount=10), Load(org=1, status="open", amount=5)])
        session.flush()
        with db.read() as tx:
            assert by_status.count(tx) == 0  # flushed, not committed: nothing yet
        session.commit()
        with db.read() as tx:
            assert by_status.totals(tx, namespace=1).as_dict() == {"count": 2, "amount": 15}
        first = session.get(Load, 1)
        assert first is not None
        first.status = "paid"
        first.org = 2
        session.flush()
        first.amount = 11  # a second flush in the same transaction
        session.commit()
        session.delete(session.get(Load, 2))
        session.commit()
        assert tally_counts(db, by_status) == sql_counts(session) == {(2, "paid"): (1, 11)}
        assert sync.verify(session)["loads"].ok


def test_rolled_back_changes_are_never_applied(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(org=1, status="open", amount=1))
        session.commit()
        session.add(Load(org=1, status="open", amount=2))
        session.get(Load, 1).status = "void"  # type: ignore[union-attr]
        session.flush()
        session.rollback()
        assert tally_counts(db, by_status) == sql_counts(session) == {(1, "open"): (1, 1)}
        session.add(Load(org=3, status="open", amount=4))
        nested = session.begin_nested()  # SAVEPOINT
        session.add(Load(org=3, status="open", amount=8))
        session.flush()
        nested.rollback()
        inner = session.begin_nested()
        session.add(Load(org=3, status="paid", amount=16))
        inner.commit()
        session.commit()
        assert tally_counts(db, by_status) == sql_counts(session)
        assert sync.verify(session)["loads"].ok


def test_crash_window_and_statements_the_sync_cannot_see_are_repaired(setup: Any, engine: Engine) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(org=i % 3, status="open", amount=i) for i in range(30)])
        session.commit()
    with Session(engine) as unseen:  # a session nobody listens to: a process that died before tallytree
        unseen.add(Load(org=9, status="open", amount=100))
        unseen.commit()
    with factory() as session:
        loads = Load.__table__
        # on the session's connection, not through session.execute(): no event fires
        session.connection().execute(update(loads).where(loads.c.org == 1).values(status="paid"))
        session.commit()
        drift = sync.verify(session)["loads"]
        assert (drift.missing, drift.different, drift.extra) == (1, 10, 0)
        fixed = sync.repair(session)["loads"]
        assert not fixed.ok
        assert sync.verify(session)["loads"].ok
        assert tally_counts(db, by_status) == sql_counts(session)


def test_a_commit_inside_a_tallytree_write_is_refused_before_the_sql_commit(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(org=1, status="open", amount=1))
        with db.write(), pytest.raises(tallytree.TransactionError, match="nothing was committed"):
            session.commit()  # the tallytree write after the SQL commit could not open in this thread
        with Session(session.get_bind()) as other:  # not committed: another session sees nothing
            assert other.execute(select(func.count()).select_from(Load)).scalar() == 0
        session.commit()  # after the block: the same changes, committed to both
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 1)})
        with db.write():  # a commit with nothing registered to apply is not refused
            session.commit()


def test_a_failed_tallytree_write_refuses_the_sql_commit_and_a_failed_tallytree_commit_says_so(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with listening(engine, idempotent=False) as (db, sync, factory):
        strict = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        with db.write() as tx:  # an item tallytree holds already: the strict insert fails
            strict.insert(tx, "open", 1, (1,), namespace=1)
        with factory() as session:
            session.add(Load(id=1, org=1, status="open", amount=1))
            with pytest.raises(tallytree.DuplicateItemError) as raised:
                session.commit()  # applied before the SQL commit, which does not happen
            assert "refused before the SQL commit" in str(raised.value.__notes__)
            session.rollback()
            assert session.scalar(select(func.count()).select_from(Load)) == 0
        with factory() as session:
            assert sync.verify(session)["loads"].extra == 1  # the stray item, and nothing else
            sync.repair(session)
            session.add(Load(id=2, org=1, status="paid", amount=2))
            session.commit()
            assert_in_sync(db, sync, strict, session, {(1, "paid"): (1, 2)})

        # The tallytree commit itself, after the SQL commit, fails: said so, and repair fixes it.
        def failing(self: Any) -> None:
            self.abort()
            raise tallytree.StorageError("the disk refused the commit")

        monkeypatch.setattr(tallytree.sqlalchemy._Pending, "commit", failing)
        with factory() as session:
            session.add(Load(id=3, org=1, status="open", amount=3))
            with pytest.raises(tallytree.StorageError) as raised:
                session.commit()
            assert "SQL transaction was committed" in str(raised.value.__notes__)
            assert "Sync.repair" in str(raised.value.__notes__)
        monkeypatch.undo()
        with factory() as session:  # the SQL commit stands
            assert sync.verify(session)["loads"].missing == 1
            sync.repair(session)
            assert_in_sync(db, sync, strict, session, {(1, "open"): (1, 3), (1, "paid"): (1, 2)})


def test_strict_mode_raises_on_drift(engine: Engine) -> None:
    with listening(engine, idempotent=False) as (db, sync, factory):
        sync.register(Load).aggregate("strict_loads", key="status")
        with factory() as session:
            session.add(Load(id=1, org=1, status="open", amount=1))
            session.commit()
        with db.write() as tx:  # someone removed the item behind the integration's back
            tallytree._extract.move(
                tx,
                db.aggregate("strict_loads"),
                (
                    db.aggregate("strict_loads")._tree_key(None),
                    tallytree._keys.encode_key("open") + tallytree._keys.encode_id(1),
                    (),
                ),
                None,
            )
        with factory() as session:
            session.get(Load, 1).status = "paid"  # type: ignore[union-attr]
            with pytest.raises(tallytree.ItemNotFoundError):
                session.commit()


def test_composite_primary_keys_need_an_id() -> None:
    sync = Sync(tallytree.open_memory())
    with pytest.raises(ValueError, match="composite"):
        sync.register(Pair)
    handler = sync.register(Pair, id=lambda row: f"{row['left']}:{row['right']}")
    assert sync.register(Pair) is handler


def test_random_sessions_never_drift(setup: Any) -> None:
    db, sync, by_status, factory = setup
    rng = random.Random(7)
    with factory() as session:
        for _ in range(60):
            for _ in range(rng.randrange(1, 6)):
                ids = session.execute(select(Load.id)).scalars().all()
                operation = rng.random()
                if operation < 0.45 or not ids:
                    session.add(
                        Load(
                            org=rng.randrange(4),
                            status=rng.choice(["open", "paid", "void"]),
                            amount=rng.randrange(50),
                        )
                    )
                elif operation < 0.8:
                    load = session.get(Load, rng.choice(ids))
                    assert load is not None
                    load.status = rng.choice(["open", "paid", "void"])
                    if rng.random() < 0.5:
                        load.org = rng.randrange(4)
                    if rng.random() < 0.3:
                        load.note = "touched"  # a column no aggregate reads
                else:
                    session.delete(session.get(Load, rng.choice(ids)))
                if rng.random() < 0.3:
                    session.flush()
            if rng.random() < 0.25:
                session.rollback()
            else:
                session.commit()
        assert tally_counts(db, by_status) == sql_counts(session)
        assert sync.verify(session)["loads"].ok


# A commit expires every instance (expire_on_commit=True, the default): setting an attribute then does
# not load the value it replaces, and these updates used to be lost (regressions from an audit).


def test_updates_of_instances_expired_by_a_commit_are_applied(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        loads = [Load(org=i % 2, status="open", amount=i) for i in range(1, 21)]
        session.add_all(loads)
        session.commit()
        loads[0].status = "paid"  # expired: the old "open" is in neither the history nor the database
        session.commit()
        rows = [(1, "paid", 1)] + [(i % 2, "open", i) for i in range(2, 21)]
        assert_in_sync(db, sync, by_status, session, expected_counts(rows))
        for i, load in enumerate(loads[1:], start=2):  # all expired again: several columns of each
            load.org = i % 3
            load.status = "void" if i % 3 else "paid"
            load.amount = 10 * i
        session.flush()
        loads[1].org = 7  # loaded by the flush: a second update of the same row in the transaction
        session.commit()
        rows = [(1, "paid", 1), (7, "void", 20)]
        rows += [(i % 3, "void" if i % 3 else "paid", 10 * i) for i in range(3, 21)]
        assert_in_sync(db, sync, by_status, session, expected_counts(rows))


def _committed_open_loads(session: Any, *amounts: int) -> list[Any]:
    """Open loads of org 1 with these amounts, committed (so expired, as the session expires on commit)."""
    loads = [Load(org=1, status="open", amount=amount) for amount in amounts]
    session.add_all(loads)
    session.commit()
    return loads


def test_setting_an_expired_attribute_to_its_own_value_changes_nothing(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        same, both = _committed_open_loads(session, 5, 7)
        same.status = "open"  # expired, set to the value it has: no change at all
        both.status = "open"  # the same here, while another column of the row does change
        both.amount = 9
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (2, 14)})
        same.status = "paid"  # changed and changed back before the flush
        same.status = "open"
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (2, 14)})


def test_deleting_a_row_updated_while_expired_removes_its_item(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        load, _ = _committed_open_loads(session, 5, 7)
        load.status = "paid"
        session.commit()
        session.delete(load)  # expired again: its old row is "paid", and no stale "open" item is left
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 7)})


def test_a_changed_primary_key_moves_the_item_to_the_new_id(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all(
            [Load(id=1, org=1, status="open", amount=5), Load(id=2, org=1, status="paid", amount=7)]
        )
        session.commit()
        first = session.get(Load, 1)
        assert first is not None
        first.id = 50  # loaded: only the id changes
        second = session.get(Load, 2)
        session.commit()
        assert second is not None
        second.id = 60  # expired, and another column changes with it
        second.status = "void"
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5), (1, "void"): (1, 7)})
        with db.read() as tx:
            assert [(item.key, item.id) for item in by_status.items(tx, namespace=1)] == [
                ("open", 50),
                ("void", 60),
            ]
        session.delete(second)
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5)})


def test_a_row_deleted_and_added_again_in_one_flush_holds_the_new_row(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        load = Load(id=1, org=1, status="open", amount=5)
        session.add(load)
        session.commit()
        session.delete(load)  # the same id in one flush: SQLAlchemy turns both into one UPDATE
        session.add(Load(id=1, org=1, status="open", amount=9))
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 9)})


def test_columns_the_update_itself_changes_keep_their_old_values(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        by_edits = sync.register(Ticket).aggregate("tickets_by_edits", key="edits")
        with factory() as session:
            ticket = Ticket(status="open")
            session.add(ticket)
            session.commit()
            ticket.status = "paid"  # the UPDATE sets edits to 1, after the old row was read
            session.commit()
            ticket.status = "void"  # and to 2
            session.commit()
            assert sync.verify(session)["tickets_by_edits"].ok
            with db.read() as tx:
                assert (by_edits.count(tx), by_edits.count(tx, eq=2)) == (1, 1)
                assert tallytree.check(tx) == []


# Regressions from a second audit: SAVEPOINTs, stale identity maps in verify and repair, subclasses,
# verify and repair flushing the session, sessions closed without a commit, several Syncs.


def test_changes_are_applied_at_the_outermost_commit_not_when_a_savepoint_is_released(
    savepoint_engine: Engine,
) -> None:
    with listening(savepoint_engine) as (db, sync, factory):
        by_status = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        with factory() as session:
            session.add(Load(id=1, org=1, status="open", amount=5))
            session.commit()
            load = session.get(Load, 1)
            assert load is not None
            load.status = "paid"  # the outer transaction's change
            session.flush()
            with session.begin_nested():  # SAVEPOINT, then RELEASE: SQLAlchemy fires after_commit
                load.amount = 100
            assert tally_counts(db, by_status) == {(1, "open"): (1, 5)}  # nothing before the commit
            session.rollback()  # the whole transaction, released SAVEPOINT included
            assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5)})

            session.add(Load(org=2, status="open", amount=1))  # outer: kept
            with session.begin_nested():  # released: kept
                session.add(Load(org=2, status="paid", amount=2))
            rolled_back = session.begin_nested()  # rolled back: only its own changes go
            session.add(Load(org=2, status="void", amount=4))
            session.flush()
            rolled_back.rollback()
            outer = session.begin_nested()  # a released SAVEPOINT inside a rolled-back one goes too
            with session.begin_nested():
                session.add(Load(org=3, status="open", amount=8))
            session.add(Load(org=3, status="paid", amount=16))
            session.flush()
            outer.rollback()
            session.add(Load(org=2, status="open", amount=32))  # outer again, after the SAVEPOINTs
            session.flush()
            assert tally_counts(db, by_status) == {(1, "open"): (1, 5)}
            session.commit()
            expected = {(1, "open"): (1, 5), (2, "open"): (2, 33), (2, "paid"): (1, 2)}
            assert_in_sync(db, sync, by_status, session, expected)


def test_verify_and_repair_read_the_database_not_the_instances_the_session_holds(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(org=i % 2, status="open", amount=i) for i in range(1, 11)])
        session.commit()
        loads = session.scalars(select(Load).order_by(Load.id)).all()  # in the identity map, loaded
        session.execute(text("UPDATE loads SET amount = amount + 1000 WHERE org = 1"))  # no flush event
        drift = sync.verify(session)["loads"]
        assert (drift.missing, drift.different, drift.extra) == (0, 5, 0)
        assert not sync.repair(session)["loads"].ok
        assert inspect(loads[0]).attrs.amount.loaded_value == 1  # the instances were left alone
        session.commit()
    with factory() as session:
        rows = [(i % 2, "open", i + 1000 * (i % 2)) for i in range(1, 11)]
        assert_in_sync(db, sync, by_status, session, expected_counts(rows))


def test_subclasses_of_a_registered_class_are_synced(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        by_kind = sync.register(Invoice).aggregate("invoices_by_kind", key="kind", values=("total",))
        by_reason = sync.register(Refund).aggregate("refunds_by_reason", key="reason", values=("total",))

        def items(aggregate: tallytree.Aggregate) -> dict[Any, tuple[Any, ...]]:
            with db.read() as tx:
                return {item.id: (item.key, *item.values) for item in aggregate.items(tx)}

        with factory() as session:
            session.add_all(
                [
                    Invoice(id=1, total=5),
                    CreditNote(id=2, total=7),
                    CreditNote(id=3, total=9),
                    Refund(id=4, total=11, reason="late"),
                    Refund(id=5, total=13, reason="broken"),
                ]
            )
            session.commit()
            assert items(by_kind) == {
                1: ("plain", 5),
                2: ("credit", 7),
                3: ("credit", 9),
                4: ("refund", 11),
                5: ("refund", 13),
            }
            assert items(by_reason) == {4: ("late", 11), 5: ("broken", 13)}
            # A subclass registered later (the classes matched so far are cached): repair fills it in,
            # and from then on its instances reach both its own aggregates and its base's.
            credit_notes = sync.register(CreditNote).aggregate("credit_notes", key="total")
            assert sync.repair(session, CreditNote)["credit_notes"].missing == 2
            note = session.get(CreditNote, 2)
            refund = session.get(Refund, 4)
            assert note is not None and refund is not None
            note.total = 70
            refund.reason = "broken"  # a column of the subclass's own table
            refund.total = 110
            session.delete(session.get(CreditNote, 3))
            session.delete(session.get(Refund, 5))
            session.commit()
            assert items(by_kind) == {1: ("plain", 5), 2: ("credit", 70), 4: ("refund", 110)}
            assert items(credit_notes) == {2: (70,)}
            assert items(by_reason) == {4: ("broken", 110)}
            report = sync.verify(session)
            assert set(report) == {"invoices_by_kind", "credit_notes", "refunds_by_reason"}
            assert all(drift.ok for drift in report.values()), report
            with db.read() as tx:
                assert tallytree.check(tx) == []


def test_verify_and_repair_do_not_flush_the_session(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(id=1, org=1, status="open", amount=5))
        session.commit()
        load = session.get(Load, 1)
        assert load is not None
        load.status = "paid"
        pending = Load(org=1, status="open", amount=7)
        session.add(pending)  # unflushed: neither verify nor repair may write it into the transaction
        assert sync.verify(session)["loads"].ok
        assert sync.repair(session)["loads"].ok
        assert pending in session.new and session.is_modified(load)  # still pending, not flushed
        with session.no_autoflush:
            assert sql_counts(session) == {(1, "open"): (1, 5)}
        session.rollback()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5)})

        session.add(Load(org=1, status="open", amount=7))
        session.flush()  # flushed, not committed: a repair now could leave a rollback's rows behind
        with pytest.raises(tallytree.TransactionError, match="not committed"):
            sync.repair(session)
        assert sync.verify(session)["loads"].missing == 1  # verify only reads: the flushed row shows
        session.rollback()
        assert sync.repair(session)["loads"].ok
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5)})


def test_a_session_closed_without_a_commit_forgets_its_changes(setup: Any) -> None:
    db, sync, by_status, factory = setup
    session = factory()
    session.add(Load(org=1, status="open", amount=5))
    session.flush()
    session.close()  # ends the transaction without a rollback event
    session.add(Load(org=1, status="paid", amount=7))  # the same session, used again
    session.commit()
    assert_in_sync(db, sync, by_status, session, {(1, "paid"): (1, 7)})
    session.close()


def test_several_syncs_can_listen_to_the_same_sessions(engine: Engine) -> None:
    first, second = tallytree.open_memory(), tallytree.open_memory()
    syncs = [Sync(first), Sync(second)]
    aggregates = [sync.register(Load).aggregate("loads", key="status") for sync in syncs]
    factory = sessionmaker(engine)
    for sync in syncs:
        sync.listen(factory)
    try:
        with factory() as session:
            session.add_all([Load(org=1, status="open", amount=1), Load(org=1, status="paid", amount=2)])
            session.commit()
            for db, sync, aggregate in zip((first, second), syncs, aggregates, strict=True):
                with db.read() as tx:
                    assert [item.key for item in aggregate.items(tx)] == ["open", "paid"]
                assert sync.verify(session)["loads"].ok
    finally:
        for sync in syncs:
            sync.remove(factory)
        first.close()
        second.close()


# Regressions from a third audit: old rows must come from the database in the flush's transaction (two
# requests, in-place edits of mutable columns, orphans), and a row the aggregates cannot take must be
# refused before the SQL commit, never after it.


def test_a_stale_instance_updates_the_row_the_database_holds(setup: Any, engine: Engine) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(id=1, org=1, status="open", amount=10))
        session.commit()
    first, second = factory(), factory()  # two requests
    try:
        stale = first.get(Load, 1)
        assert stale is not None
        other = second.get(Load, 1)
        assert other is not None
        other.status = "paid"  # request 2 marks it paid
        second.commit()
        stale.amount = 12  # request 1 edits another column of its stale copy ("open")
        first.commit()
        assert_in_sync(db, sync, by_status, first, {(1, "paid"): (1, 12)})
        stale.status, other.status = "void", "open"  # both set the status: the last commit wins
        second.commit()
        first.commit()
        assert_in_sync(db, sync, by_status, first, {(1, "void"): (1, 12)})
        stale_delete = second.get(Load, 1)  # request 2's copy says "open", the row is "void"
        first.execute(update(Load).values(amount=99))  # a Core write in request 1's transaction...
        first.rollback()  # ...rolled back: it never happened
        second.delete(stale_delete)
        second.commit()
        assert_in_sync(db, sync, by_status, first, {})
    finally:
        first.close()
        second.close()


def test_an_in_place_change_of_a_mutable_json_column_is_applied(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        events = sync.register(Event).aggregate(
            "events",
            namespace="org",
            key=lambda row: row["data"]["status"],
            values={"cost": lambda row: row["data"]["cost"]},
        )
        with factory() as session:
            session.add(Event(id=1, org="acme", data={"status": "open", "cost": 5}))
            session.commit()
            event_row = session.get(Event, 1)
            assert event_row is not None
            event_row.data["status"] = "paid"  # MutableDict flags the attribute, with no old value
            session.flush()
            event_row.data["cost"] = 7  # a second in-place edit: the first change queued is not rewritten
            session.commit()
            assert sync.verify(session)["events"].ok
            with db.read() as tx:
                assert [(item.key, item.values) for item in events.items(tx, namespace="acme")] == [
                    ("paid", (7,))
                ]


def test_orphans_and_cascaded_deletes_are_removed(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        by_sku = sync.register(Line).aggregate(
            "lines_by_sku", namespace="order_id", key="sku", values=("qty",)
        )
        with factory() as session:
            session.add(Order(id=1, lines=[Line(sku="a", qty=1), Line(sku="b", qty=2), Line(sku="c", qty=3)]))
            session.add(Order(id=2))
            session.commit()
            order = session.get(Order, 1)
            assert order is not None
            order.lines.pop(0)  # delete-orphan: line "a" is deleted by the flush, not by session.delete
            session.commit()
            second = session.get(Order, 2)
            assert second is not None
            second.lines.append(order.lines[0])  # moved to another order: an UPDATE of its foreign key
            session.commit()
            with db.read() as tx:
                assert by_sku.totals(tx, namespace=1).as_dict() == {"count": 1, "qty": 3}
                assert by_sku.totals(tx, namespace=2).as_dict() == {"count": 1, "qty": 2}
            session.delete(order)  # cascades to its remaining line
            session.commit()
            assert sync.verify(session)["lines_by_sku"].ok
            with db.read() as tx:
                assert [by_sku.count(tx, namespace=order_id) for order_id in (1, 2)] == [0, 1]
                assert tallytree.check(tx) == []


def test_updates_and_deletes_read_their_old_rows_and_inserts_read_nothing(setup: Any, engine: Engine) -> None:
    db, sync, by_status, factory = setup
    statements: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(maxsplit=1)[0])

    def run(session: Session, org: int) -> list[list[str]]:
        """Insert, update, delete: the statements of each commit."""
        steps = []
        first = max(session.scalars(select(Load.id)).all(), default=0) + 1
        statements.clear()
        session.add_all([Load(id=first + i, org=org, status="open", amount=i) for i in range(5)])
        session.commit()
        steps.append(statements[:])
        loads = session.scalars(select(Load).where(Load.id >= first)).all()
        loads[0].status = "paid"
        loads[1].note = "a column no aggregate reads: still a registered column"
        session.add(Order(id=first, lines=[Line(sku="x", qty=1)]))  # unregistered classes
        statements.clear()
        session.commit()
        steps.append(statements[:])
        session.delete(loads[2])
        statements.clear()
        session.commit()
        steps.append(statements[:])
        return steps

    event.listen(engine, "before_cursor_execute", record)
    try:
        with Session(engine) as session:  # nobody listens
            baseline = run(session, 2)
        with factory() as session:
            sync.repair(session)
            synced = run(session, 1)
            expected = {(org, "open"): (3, 8) for org in (1, 2)} | {(org, "paid"): (1, 0) for org in (1, 2)}
            assert_in_sync(db, sync, by_status, session, expected)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert synced[0] == baseline[0] == ["INSERT"]  # one executemany, and no SELECT
    # the old rows of both updated Loads, in one statement, in a transaction begun as SQLite's writer
    # (pysqlite would begin it only at the UPDATE, after the read: see _lock_for_writing)
    assert synced[1] == ["BEGIN", "SELECT", *baseline[1]]
    assert synced[2] == ["BEGIN", "SELECT", *baseline[2]]  # the old row of the deleted one


def test_a_uuid_id_is_its_str_in_changes_and_in_repair(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        by_org = sync.register(Typed).aggregate("typed_by_org", key="org", values=("weight",))
        with factory() as session:
            session.add(Typed(weight=1))  # an int in a Float column: held as the float it loads as
            session.commit()
            row = session.scalars(select(Typed)).one()
            with db.read() as tx:
                assert [(item.id, item.values) for item in by_org.items(tx)] == [(str(row.id), (1.0,))]
            row.org = "globex"
            session.commit()
            assert sync.verify(session)["typed_by_org"].ok
            session.connection().execute(update(Typed.__table__).values(org="initech"))  # unseen
            session.commit()
            assert sync.repair(session)["typed_by_org"].different == 1
            with db.read() as tx:
                assert [(item.key, item.id) for item in by_org.items(tx)] == [("initech", str(row.id))]


def test_register_refuses_columns_the_aggregates_cannot_take() -> None:
    sync = Sync(tallytree.open_memory())
    handler = sync.register(Typed)
    with pytest.raises(tallytree.ArgumentTypeError, match=r"Decimal.*integer cents"):
        handler.aggregate("t1", key="org", values=("amount",))
    with pytest.raises(tallytree.ArgumentTypeError, match=r"naive datetimes.*tzinfo=timezone\.utc"):
        handler.aggregate("t2", key="naive")
    with pytest.raises(tallytree.ArgumentTypeError, match="date, which is not a key type"):
        handler.aggregate("t3", namespace=("org", "day"), key="org")
    with pytest.raises(
        tallytree.ArgumentTypeError, match="loads as str, and value fields are ints or floats"
    ):
        handler.aggregate("t4", key="org", values={"n": "org"})
    with pytest.raises(tallytree.InvalidArgumentError, match="no column attribute 'status'"):
        handler.aggregate("t5", key="status")
    assert handler.aggregates() == []  # nothing was created

    class Dated(Base):
        __tablename__ = "dated"
        day: Mapped[date] = mapped_column(primary_key=True)

    with pytest.raises(tallytree.ArgumentTypeError, match="ids are str, int or bytes"):
        sync.register(Dated)
    sync.register(Dated, id=lambda row: row["day"].isoformat())  # a function of the row is fine


def test_rows_the_aggregates_cannot_take_fail_the_flush_not_the_commit(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        handler = sync.register(Typed)
        handler.aggregate("typed_by_time", key="aware")  # SQLite stores no offset: refused at the flush
        with factory() as session:
            session.add(Typed())
            with pytest.raises(tallytree.ArgumentTypeError, match="sqlite stores without its offset"):
                session.commit()
            session.rollback()
            assert session.execute(select(func.count()).select_from(Typed)).scalar() == 0
    with listening(engine) as (db, sync, factory):
        handler = sync.register(Typed)
        handler.aggregate("typed_amounts", key="org", values={"amount": lambda row: row["amount"]})
        with factory() as session:
            session.add(Typed(amount=Decimal("9.99")))  # a function giving a Decimal
            with pytest.raises(tallytree.ExtractionError, match="Decimal") as raised:
                session.commit()
            assert "before the SQL commit" in str(raised.value.__notes__)
            session.rollback()
            assert session.execute(select(func.count()).select_from(Typed)).scalar() == 0
            with db.read() as tx:
                assert db.aggregate("typed_amounts").count(tx) == 0


def test_old_rows_are_read_for_update_where_the_dialect_locks_rows() -> None:
    """PostgreSQL is not available to the tests: check the statement it would run, which locks the row
    until the commit (SQLite renders no FOR UPDATE: its writers are serialized)."""
    from sqlalchemy.dialects import postgresql, sqlite

    sync = Sync(tallytree.open_memory())
    sync.register(Refund)
    statement = sync._registrations[Refund].select
    compiled = str(statement.compile(dialect=postgresql.dialect()))
    assert compiled.endswith("FOR UPDATE") and "JOIN refunds" in compiled
    assert "FOR UPDATE" not in str(statement.compile(dialect=sqlite.dialect()))


# Regressions from a fourth audit: listeners outliving a Sync, row switches and discriminator changes
# across a class hierarchy, other classes mapped to a registered table, post_update columns, database
# cascades of a primary key change, and the old rows of a flush read in one statement per class.

_MAPPER_EVENTS = (
    "before_insert",
    "after_insert",
    "before_update",
    "after_update",
    "before_delete",
    "after_delete",
)


def _mapper_listeners(model: type) -> int:
    mapper = inspect(model)
    return sum(len(getattr(mapper.dispatch, name)) for name in _MAPPER_EVENTS)


def test_remove_and_close_take_away_every_listener_and_release_the_sync(engine: Engine) -> None:
    baseline = _mapper_listeners(Load)
    db = tallytree.open_memory()
    sync = Sync(db)
    by_status = sync.register(Load).aggregate("loads", key="status")
    factory = sessionmaker(engine)
    sync.listen(factory)
    sync.listen(factory)  # again: nothing more
    assert _mapper_listeners(Load) == baseline + len(_MAPPER_EVENTS)
    with factory() as session:
        session.add(Load(id=1, org=1, status="open", amount=1))
        session.commit()
    sync.remove(factory)
    assert _mapper_listeners(Load) == baseline  # removing the last target took the mapper listeners too
    sync.remove(factory)  # a target it no longer listens to: nothing happens
    with factory() as session:
        session.get(Load, 1).status = "paid"  # type: ignore[union-attr]
        session.commit()
    with db.read() as tx:
        assert [item.key for item in by_status.items(tx)] == ["open"]  # not listened to any more
    reference = weakref.ref(sync)
    del sync
    gc.collect()
    assert reference() is None  # nothing SQLAlchemy holds keeps a Sync that listens to nothing alive

    with Sync(db) as sync:  # close() at the end of the block
        sync.register(Load).aggregate("loads_again", key="status")
        session = factory()
        sync.listen(factory)
        sync.listen(session)  # one session, held weakly
        assert _mapper_listeners(Load) == baseline + len(_MAPPER_EVENTS)
    assert _mapper_listeners(Load) == baseline
    assert not event.contains(factory, "after_commit", sync._after_commit)
    assert not event.contains(session, "after_commit", sync._after_commit)
    session.close()
    with pytest.raises(tallytree.TransactionError, match="closed"):
        sync.listen(factory)
    with pytest.raises(tallytree.TransactionError, match="closed"):
        sync.register(Ticket)
    sync.close()  # idempotent
    with factory() as session:  # verify and repair still work
        assert sync.repair(session)["loads_again"].missing == 1
    db.close()


def test_a_class_registered_while_listening_is_followed_at_once(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        with factory() as session:
            session.add(Ticket(id=1, status="open"))
            session.commit()
        by_status = sync.register(Ticket).aggregate("tickets_by_status", key="status")
        with factory() as session:
            assert sync.repair(session)["tickets_by_status"].missing == 1
            session.get(Ticket, 1).status = "paid"  # type: ignore[union-attr]
            session.commit()
            assert sync.verify(session)["tickets_by_status"].ok
        with db.read() as tx:
            assert [item.key for item in by_status.items(tx)] == ["paid"]


def test_a_commit_after_the_database_is_closed_is_refused_before_the_sql_commit(
    setup: Any, engine: Engine
) -> None:
    db, _, _, factory = setup
    with factory() as session:
        session.add(Load(org=1, status="open", amount=1))
        db.close()
        with pytest.raises(tallytree.TransactionError, match=r"sync\.close\(\).*nothing was committed"):
            session.commit()
        session.rollback()
    with Session(engine) as other:
        assert other.execute(select(func.count()).select_from(Load)).scalar() == 0


@pytest.mark.parametrize(
    "registered",
    [(Invoice,), (CreditNote,), (Refund,), (Invoice, Refund), (CreditNote, Refund)],
    ids=lambda models: "+".join(model.__name__ for model in models),
)
def test_a_row_switch_across_a_class_hierarchy_ends_equal_to_a_recount(
    engine: Engine, registered: tuple[type, ...]
) -> None:
    """One flush deletes an instance and adds one of another (or the same) class of the hierarchy with
    the same primary key: SQLAlchemy's "row switch", one UPDATE."""
    kinds: dict[str, Any] = {
        "plain": lambda: Invoice(id=1, total=5),
        "credit": lambda: CreditNote(id=1, total=7),
        "refund": lambda: Refund(id=1, total=9, reason="late"),
    }
    with listening(engine) as (db, sync, factory):
        for model in registered:
            sync.register(model).aggregate(f"switch_{model.__name__}", key="kind", values=("total",))
        for old, new in [(old, new) for old in kinds for new in kinds]:
            if new == "refund" and old != "refund":
                continue  # SQLAlchemy's own StaleDataError: the UPDATE finds no refunds row to update
            with factory() as session:
                session.add(kinds[old]())
                session.commit()
                session.delete(session.get(Invoice, 1))
                session.add(kinds[new]())
                if old == "refund" and new != "refund" and Refund in registered:
                    # SQLAlchemy would leave the refunds row behind, which select(Refund) cannot load
                    with pytest.raises(tallytree.InvalidArgumentError, match="flush the delete before"):
                        session.commit()
                    session.rollback()
                    session.delete(session.get(Invoice, 1))
                    session.flush()  # as the message says: then the new row is an INSERT
                    session.add(kinds[new]())
                session.commit()
                report = sync.verify(session)
                assert all(drift.ok for drift in report.values()), (old, new, report)
                session.delete(session.get(Invoice, 1))
                session.commit()
                # A refunds row SQLAlchemy left behind when the unregistered Refund was switched away
                session.execute(text("DELETE FROM refunds"))
                session.commit()
                with db.read() as tx:
                    assert tallytree.check(tx) == []


def test_a_discriminator_change_that_moves_a_row_between_registered_classes_is_refused(
    engine: Engine,
) -> None:
    with listening(engine) as (db, sync, factory):
        notes = sync.register(CreditNote).aggregate("notes_by_total", key="total")
        with factory() as session:
            session.add_all([Invoice(id=1, total=5), CreditNote(id=2, total=7)])
            session.commit()
            session.get(Invoice, 1).kind = "credit"  # type: ignore[union-attr]  # makes it a CreditNote row
            with pytest.raises(tallytree.InvalidArgumentError, match="add a new CreditNote with the same"):
                session.commit()
            session.rollback()
            session.get(CreditNote, 2).kind = "plain"  # type: ignore[union-attr]  # and out of one
            with pytest.raises(tallytree.InvalidArgumentError, match="makes the row a Invoice"):
                session.commit()
            session.rollback()
            session.delete(session.get(Invoice, 1))  # what the message says: a row switch
            session.add(CreditNote(id=1, total=5))
            session.commit()
            assert sync.verify(session)["notes_by_total"].ok
            with db.read() as tx:
                assert sorted(item.id for item in notes.items(tx)) == [1, 2]
    with listening(engine) as (db, sync, factory):
        sync.register(Invoice).aggregate("invoices_by_kind", key="kind")  # both classes are Invoices
        with factory() as session:
            assert sync.repair(session)["invoices_by_kind"].missing == 2
            session.get(Invoice, 1).kind = "plain"  # type: ignore[union-attr]  # the same registrations
            with pytest.warns(Warning, match="incompatible polymorphic identity"):  # SQLAlchemy's own
                session.commit()
            assert sync.verify(session)["invoices_by_kind"].ok


def test_writes_through_another_class_mapped_to_a_registered_table_are_refused(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(id=1, org=1, status="open", amount=5))
        session.commit()
        view = session.get(LoadView, 1)  # reading through it is fine
        assert view is not None and view.status == "open"
        view.status = "paid"
        with pytest.raises(
            tallytree.InvalidArgumentError, match=r"update a row of \['loads'\] through LoadView"
        ):
            session.commit()
        session.rollback()
        session.add(LoadView(id=2, org=1, status="open", amount=1))
        with pytest.raises(tallytree.InvalidArgumentError, match="insert a row"):
            session.commit()
        session.rollback()
        session.delete(session.get(LoadView, 1))
        with pytest.raises(tallytree.InvalidArgumentError, match="delete a row"):
            session.commit()
        session.rollback()
        assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 5)})
    with pytest.raises(tallytree.InvalidArgumentError, match=r"both map the table\(s\) \['loads'\]"):
        sync.register(LoadView)


def test_columns_a_post_update_writes_are_refused_until_excluded(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        with pytest.raises(
            tallytree.InvalidArgumentError,
            match=r"\['edits', 'favorite_id'\].*\['Widget\.favorite'\].*exclude=\('edits', 'favorite_id'\)",
        ):
            sync.register(Widget)
        with pytest.raises(tallytree.InvalidArgumentError, match=r"\['widget_id'\].*\['Widget\.parts'\]"):
            sync.register(Part)
        with pytest.raises(tallytree.InvalidArgumentError, match="primary key or the id"):
            sync.register(Part, exclude=("id", "widget_id"))
        with pytest.raises(tallytree.InvalidArgumentError, match="no column attribute 'nope'"):
            sync.register(Part, exclude=("nope",))
        widgets = sync.register(Widget, exclude=("edits", "favorite_id"))
        by_name = widgets.aggregate("widgets_by_name", key="name")
        with pytest.raises(tallytree.InvalidArgumentError, match="left out of the documents"):
            widgets.aggregate("widgets_by_favorite", key="favorite_id")
        by_sku = sync.register(Part, exclude=("widget_id",)).aggregate("parts_by_sku", key="sku")
        with factory() as session:
            widget = Widget(id=1, name="a", parts=[Part(id=10, sku="x"), Part(id=11, sku="y")])
            widget.favorite = widget.parts[0]
            other = Widget(id=2, name="b")
            session.add_all([widget, other])
            session.commit()
            widget.favorite = widget.parts[1]  # post_update: the favorite, and edits
            widget.name = "c"
            other.parts.append(widget.parts.pop(0))  # post_update of the part's widget_id
            session.commit()
            session.delete(widget)  # nulls favorite_id and the parts' widget_id first, then deletes
            session.commit()
            report = sync.verify(session)
            assert set(report) == {"widgets_by_name", "parts_by_sku"}
            assert all(drift.ok for drift in report.values()), report
        with db.read() as tx:
            assert [item.key for item in by_name.items(tx)] == ["b"]
            assert [item.key for item in by_sku.items(tx)] == ["x"]


def test_a_primary_key_change_the_database_cascades_keeps_the_children_in_sync(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'cascade.db'}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")  # SQLite enforces (and cascades) them

    Base.metadata.create_all(engine)
    try:
        with listening(engine) as (db, sync, factory):
            by_parent = sync.register(Node).aggregate(
                "nodes_by_parent", namespace=lambda row: row["parent_id"] or 0, key="name"
            )
            with factory() as session:
                root = Node(id=1, name="root")
                session.add(root)
                session.flush()
                session.add_all([Node(id=2, name="a", parent=root), Node(id=3, name="b", parent=root)])
                session.commit()
                root = session.get(Node, 1)
                assert root is not None
                first, _ = sorted(root.children, key=lambda node: node.id)
                root.id = 100  # the database moves both children's parent_id before their UPDATEs
                first.name = "a2"  # a child changed in the same flush, and one that is not
                session.commit()
                assert sync.verify(session)["nodes_by_parent"].ok
                with db.read() as tx:
                    assert [(item.key, item.id) for item in by_parent.items(tx, namespace=100)] == [
                        ("a2", 2),
                        ("b", 3),
                    ]
    finally:
        engine.dispose()


def test_the_old_rows_of_a_flush_are_read_in_one_statement_per_class(setup: Any, engine: Engine) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(id=i, org=i % 3, status="open", amount=i) for i in range(1, 1201)])
        session.commit()
    statements: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(maxsplit=1)[0])

    with factory() as session:
        loads = session.scalars(select(Load).order_by(Load.id)).all()
        for load in loads[:1100]:
            load.status = "paid"
        event.listen(engine, "before_cursor_execute", record)
        try:
            session.commit()  # 1,100 old rows: three statements of at most 500 keys
            assert statements.count("SELECT") == 3
            loads = session.scalars(select(Load).where(Load.id > 1100)).all()
            statements.clear()
            for load in loads:
                session.delete(load)
            session.commit()
            assert statements == ["BEGIN", "SELECT", "DELETE"]  # one SELECT and one executemany DELETE
        finally:
            event.remove(engine, "before_cursor_execute", record)
        rows = [(i % 3, "paid", i) for i in range(1, 1101)]
        assert_in_sync(db, sync, by_status, session, expected_counts(rows))


# ---------------------------------------------------------------- detach and unregister


def test_an_aggregate_detached_from_a_registered_class_is_no_longer_synced_or_verified(
    engine: Engine,
) -> None:
    with listening(engine) as (db, sync, factory):
        handler = sync.register(Load)
        by_status = handler.aggregate("loads", namespace="org", key="status", values=("amount",))
        by_org = handler.aggregate("loads_by_org", key="org", values=("amount",))
        with factory() as session:
            session.add_all([Load(id=i, org=i % 2, status="open", amount=i) for i in range(1, 5)])
            session.commit()
            held = snapshot_of(db, by_org)
            session.get(Load, 1).amount = 100  # type: ignore[union-attr]
            session.flush()  # queued before the detach, committed after: not applied to it either
            assert handler.detach("loads_by_org") is by_org
            session.commit()
            session.add(Load(id=5, org=7, status="paid", amount=5))
            session.delete(session.get(Load, 2))
            session.commit()
            assert snapshot_of(db, by_org) == held
            rows = [(1, "open", 100), (1, "open", 3), (0, "open", 4), (7, "paid", 5)]
            assert_in_sync(db, sync, by_status, session, expected_counts(rows))
            assert set(sync.verify(session)) == set(sync.repair(session)) == {"loads"}
            assert snapshot_of(db, by_org) == held  # repair left it alone
            with db.write() as tx:
                by_org.insert(tx, 9, "manual", (1,))  # its own writes are allowed, as they were
                with pytest.raises(tallytree.AggregateNotFoundError, match="no extractors"):
                    tallytree.verify(tx, by_org, sync._rows(session, Load))


def snapshot_of(db: tallytree.Database, aggregate: tallytree.Aggregate) -> list[Any]:
    with db.read() as tx:
        return [(item.key, item.id, item.values) for item in aggregate.items(tx)]


def test_detaching_or_redefining_an_aware_datetime_key_lifts_its_refusal(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        handler = sync.register(Typed)
        with pytest.raises(tallytree.ArgumentTypeError, match="Decimal"):
            handler.aggregate("typed_bad", key="aware", values=("amount",))  # refused: not registered
        handler.aggregate("typed_by_org", key="org")
        with factory() as session:
            session.add(Typed())
            session.commit()  # nothing of the refused definition is left behind
            handler.aggregate("typed_by_time", key="aware")  # SQLite stores no offset: refused at the flush
            session.add(Typed())
            with pytest.raises(tallytree.ArgumentTypeError, match="sqlite stores without its offset"):
                session.commit()
            session.rollback()
            with pytest.raises(tallytree.SchemaMismatchError, match=r"redefine=True"):
                handler.aggregate("typed_by_time", key="org")  # another definition: redefine=True
            handler.aggregate("typed_by_time", key="org", redefine=True)  # on a column SQLite keeps
            session.add(Typed())
            session.commit()
            with db.read() as tx:
                assert db.aggregate("typed_by_time").count(tx) == 1
            handler.detach("typed_by_time")
            handler.aggregate("typed_by_time", key="aware", redefine=True)  # emptied again
            session.add(Typed())
            with pytest.raises(tallytree.ArgumentTypeError, match="sqlite stores without its offset"):
                session.commit()
            session.rollback()
            handler.detach("typed_by_time")
            session.add(Typed())
            session.commit()
            with db.read() as tx:
                assert db.aggregate("typed_by_org").count(tx) == 3
                assert db.aggregate("typed_by_time").count(tx) == 0


def test_unregister_stops_syncing_a_class_and_removes_its_listeners(engine: Engine) -> None:
    baseline = _mapper_listeners(Load), _mapper_listeners(Ticket)
    with listening(engine) as (db, sync, factory):
        by_status = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        tickets = sync.register(Ticket).aggregate("tickets_by_status", key="status")
        assert _mapper_listeners(Load) == baseline[0] + len(_MAPPER_EVENTS)
        with factory() as session:
            session.add_all([Load(id=1, org=1, status="open", amount=5), Ticket(id=1, status="open")])
            session.commit()
            session.get(Load, 1).status = "paid"  # type: ignore[union-attr]
            session.flush()  # committed after the unregister: not applied
            sync.unregister(Load)
            assert _mapper_listeners(Load) == baseline[0]  # no registered class left in its hierarchy
            assert _mapper_listeners(Ticket) == baseline[1] + len(_MAPPER_EVENTS)
            session.get(Ticket, 1).status = "closed"  # type: ignore[union-attr]
            session.add(Load(id=2, org=1, status="open", amount=7))
            session.commit()
            with db.read() as tx:
                assert [(item.key, item.id) for item in by_status.items(tx, namespace=1)] == [("open", 1)]
                assert [item.key for item in tickets.items(tx)] == ["closed"]
                with pytest.raises(tallytree.AggregateNotFoundError, match="no extractors"):
                    tallytree.verify(tx, by_status, [])
            assert set(sync.verify(session)) == set(sync.repair(session)) == {"tickets_by_status"}
            for method in (sync.verify, sync.repair, sync.unregister):
                args = (session, Load) if method != sync.unregister else (Load,)
                with pytest.raises(tallytree.InvalidArgumentError, match=r"not a class registered.*Ticket"):
                    method(*args)  # type: ignore[operator]
            # registered again: followed at once, and repair brings in what happened meanwhile
            sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
            assert _mapper_listeners(Load) == baseline[0] + len(_MAPPER_EVENTS)
            drift = sync.repair(session, Load)["loads"]
            assert (drift.missing, drift.different) == (1, 1)
            session.get(Load, 2).amount = 8  # type: ignore[union-attr]
            session.commit()
            assert_in_sync(db, sync, by_status, session, expected_counts([(1, "paid", 5), (1, "open", 8)]))
        sync.unregister(Load)
        sync.unregister(Ticket)
        assert (_mapper_listeners(Load), _mapper_listeners(Ticket)) == baseline
        sync.register(Ticket)  # while listening: installed again
        assert _mapper_listeners(Ticket) == baseline[1] + len(_MAPPER_EVENTS)
    assert _mapper_listeners(Ticket) == baseline[1]


def test_unregistering_one_class_of_a_hierarchy_keeps_the_others_synced(engine: Engine) -> None:
    baseline = _mapper_listeners(Invoice)
    with listening(engine) as (db, sync, factory):
        by_kind = sync.register(Invoice).aggregate("invoices_by_kind", key="kind", values=("total",))
        credit_notes = sync.register(CreditNote).aggregate("credit_notes", key="total")
        with factory() as session:
            session.add_all([Invoice(id=1, total=5), CreditNote(id=2, total=7)])
            session.commit()
            sync.unregister(CreditNote)
            assert _mapper_listeners(Invoice) == baseline + len(_MAPPER_EVENTS)  # Invoice still needs them
            session.get(CreditNote, 2).total = 70  # type: ignore[union-attr]
            session.add(CreditNote(id=3, total=9))
            session.commit()
            with db.read() as tx:
                assert [(item.id, item.values) for item in by_kind.items(tx)] == [
                    (2, (70,)),
                    (3, (9,)),
                    (1, (5,)),
                ]
                assert [item.key for item in credit_notes.items(tx)] == [7]
            report = sync.verify(session)
            assert set(report) == {"invoices_by_kind"} and report["invoices_by_kind"].ok
            sync.register(CreditNote).aggregate("credit_notes", key="total")
            assert sync.repair(session, CreditNote)["credit_notes"].missing == 1
            sync.unregister(Invoice)
            assert _mapper_listeners(Invoice) == baseline + len(_MAPPER_EVENTS)  # CreditNote's hierarchy
            session.get(CreditNote, 3).total = 90  # type: ignore[union-attr]
            session.get(Invoice, 1).total = 50  # type: ignore[union-attr]
            session.commit()
            with db.read() as tx:
                assert [item.key for item in credit_notes.items(tx)] == [70, 90]
                assert [item.values for item in by_kind.items(tx) if item.id == 1] == [(5,)]
            sync.unregister(CreditNote)
            assert _mapper_listeners(Invoice) == baseline


def test_verify_of_an_aggregate_dropped_behind_the_sync_raises_and_creates_nothing(setup: Any) -> None:
    db, sync, _, factory = setup
    with factory() as session:
        session.add(Load(id=1, org=1, status="open", amount=5))
        session.commit()
        db.drop_aggregate("loads")
        for check in (sync.verify, sync.repair):
            with pytest.raises(tallytree.TransactionError, match="'loads' was dropped"):
                check(session)
        assert db.aggregates() == []  # not created again, empty, by verify
        with db.read() as tx:
            assert tallytree.check(tx) == []


def test_a_commit_s_changes_reach_tallytree_as_one_batch(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes of a commit, of several registered classes (their handlers interleaved, a subclass's
    rows reaching two), go through the batch path of ChangeHandler.apply_many, not change by change;
    in strict mode a failing change is named as one by one would name it and nothing is written."""

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a commit applies its changes as one batch")

    monkeypatch.setattr(tallytree.ChangeHandler, "apply", refused)
    with listening(engine, idempotent=False) as (db, sync, factory):
        by_kind = sync.register(Invoice).aggregate("invoices_by_kind", key="kind", values=("total",))
        by_reason = sync.register(Refund).aggregate("refunds_by_reason", key="reason", values=("total",))
        with factory() as session:
            session.add_all([Refund(id=i, total=i, reason=("late", "broken")[i % 2]) for i in range(50)])
            session.add_all([CreditNote(id=i, total=i) for i in range(50, 300)])
            session.commit()
            for refund in session.scalars(select(Refund).where(Refund.id < 10)):
                refund.total += 1000
            session.delete(session.get(CreditNote, 60))
            session.add(Invoice(id=300, total=1))
            session.commit()
            report = sync.verify(session)
            assert all(drift.ok for drift in report.values()), report
            with db.read() as tx:
                assert by_kind.totals(tx).as_dict() == {
                    "count": 300,
                    "total": sum(range(300)) - 60 + 10 * 1000 + 1,
                }
                assert by_reason.count(tx) == 50
            with db.write() as tx:  # drift: refund 20 is gone from its base class's aggregate
                by_kind.delete(tx, "refund", 20)
            before = [(drift.actual, drift.missing) for drift in sync.verify(session).values()]
            session.add(Invoice(id=301, total=1))
            session.get(Refund, 30).reason = "other"  # type: ignore[union-attr]
            session.get(Refund, 20).total = 7  # type: ignore[union-attr]
            with pytest.raises(
                tallytree.ItemNotFoundError, match="invoices_by_kind: the item of document 20 "
            ):
                session.commit()  # refused before the SQL commit
            session.rollback()
        with factory() as session:  # nothing of the commit reached SQL or tallytree
            after = {name: (drift.actual, drift.missing) for name, drift in sync.verify(session).items()}
            assert after == {"invoices_by_kind": (299, 1), "refunds_by_reason": (50, 0)}
            assert before == [(299, 1), (50, 0)]
            assert session.get(Invoice, 301) is None


def test_dropping_an_aggregate_the_sync_still_syncs_is_refused_before_the_sql_commit(engine: Engine) -> None:
    """db.drop_aggregate of an aggregate a registered class's handler still syncs would make the
    tallytree write after the SQL commit fail: the Sync refuses the commit before it (at the flush, or
    before the commit for changes flushed earlier), while SQL can roll back. Detaching it lets the
    commit go on; the other aggregates get their changes."""
    with listening(engine) as (db, sync, factory):
        handler = sync.register(Load)
        handler.aggregate("loads", namespace="org", key="status", values=("amount",))
        per_org = handler.aggregate("loads_per_org", key="org")
        with factory() as session:
            session.add(Load(id=1, org=1, status="open", amount=1))
            session.commit()
            session.add(Load(id=2, org=1, status="open", amount=2))
            session.flush()
            db.drop_aggregate("loads")  # changes flushed already are queued for it
            with pytest.raises(tallytree.TransactionError, match="'loads' was dropped") as raised:
                session.commit()
            assert "before the SQL commit" in str(raised.value.__notes__)
            handler.detach("loads")  # the queued changes skip it now
            session.commit()
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Load)) == 2
            with db.read() as tx:
                assert per_org.count(tx) == 2
            handler.aggregate("loads", namespace="org", key="status", values=("amount",))  # anew
            db.drop_aggregate("loads")
            session.add(Load(id=3, org=1, status="open", amount=3))
            with pytest.raises(tallytree.TransactionError, match="'loads' was dropped") as raised:
                session.commit()  # refused in the flush
            assert "refused in the flush" in str(raised.value.__notes__)
            session.rollback()
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Load)) == 2  # row 3 never committed
            with db.read() as tx:
                assert per_org.count(tx) == 2 and tallytree.check(tx) == []


# ---------------------------------------------------------------- ORM bulk statements
# session.execute() of insert(), update() and delete() on a registered class fires no mapper event: the
# Sync follows them through do_orm_execute (the rows read by primary key before and after), or refuses
# them before they run (regressions from a user journey audit: each left drift only verify found).


def test_orm_bulk_statements_reach_tallytree(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(id=i, org=i % 3, status="open", amount=i) for i in range(1, 31)])
        session.commit()
        steps = [
            lambda: session.execute(update(Load).where(Load.org == 0).values(status="paid")),
            lambda: session.execute(update(Load).where(Load.id < 5).values(amount=Load.amount + 100)),
            lambda: session.execute(update(Load), [{"id": 4, "amount": 999}, {"id": 5, "status": "void"}]),
            lambda: session.execute(  # criteria in an option: the Sync's SELECT has them too
                update(Load).values(status="void").options(with_loader_criteria(Load, Load.org == 1))
            ),
            lambda: session.execute(delete(Load).where(Load.amount > 25, Load.amount < 100)),
            lambda: session.execute(insert(Load), [{"id": 100, "org": 9, "status": "open", "amount": 1}]),
            lambda: session.execute(  # ids the database generates: returned by the INSERT
                insert(Load),
                [{"org": 9, "status": "paid", "amount": 2}, {"org": 9, "status": "paid", "amount": 3}],
            ),
            lambda: session.execute(insert(Load).values(org=8, status="void", amount=4)),
            lambda: session.execute(insert(Load).values([{"org": 8, "status": "open", "amount": 5}])),
            lambda: session.execute(
                insert(Load).from_select(
                    ["org", "status", "amount"],
                    select(Load.org, Load.status, Load.amount).where(Load.org == 9),
                )
            ),
            lambda: session.execute(
                sqlite_insert(Load).on_conflict_do_nothing(),
                [
                    {"id": 100, "org": 7, "status": "void", "amount": 6},
                    {"id": 500, "org": 7, "status": "open", "amount": 7},
                ],
            ),
        ]
        for step in steps:
            step()
            session.commit()
            assert_in_sync(db, sync, by_status, session, sql_counts(session))
        # the caller's own RETURNING rows are still there
        returned = session.execute(update(Load).where(Load.org == 7).values(status="paid").returning(Load.id))
        assert returned.scalars().all() == [500]  # (100 was there: DO NOTHING)
        rows = session.execute(delete(Load).where(Load.org == 8).returning(Load.amount)).scalars().all()
        assert sorted(rows) == [4, 5]
        session.commit()
        assert_in_sync(db, sync, by_status, session, sql_counts(session))


def test_bulk_statements_reach_tallytree_at_the_commit_of_their_transaction(
    savepoint_engine: Engine,
) -> None:
    with listening(savepoint_engine, idempotent=False) as (db, sync, factory):
        by_status = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        with factory() as session:
            session.add_all([Load(id=i, org=1, status="open", amount=i) for i in range(1, 5)])
            session.commit()
            session.execute(update(Load).where(Load.id == 1).values(status="paid"))
            with db.read() as tx:
                assert by_status.count(tx, namespace=1, eq="paid") == 0  # not committed: nothing yet
            nested = session.begin_nested()
            session.execute(update(Load).where(Load.id == 2).values(status="void"))
            nested.rollback()  # its change goes with it
            with session.begin_nested():
                session.execute(delete(Load).where(Load.id == 3))  # released: kept
            session.get(Load, 4).amount = 40  # type: ignore[union-attr]  # and a flushed change
            session.commit()
            expected = {(1, "paid"): (1, 1), (1, "open"): (2, 42)}
            assert_in_sync(db, sync, by_status, session, expected)
            session.execute(update(Load).values(status="void"))
            session.rollback()
            assert_in_sync(db, sync, by_status, session, expected)


def test_bulk_statements_the_sync_cannot_follow_are_refused_before_they_run(engine: Engine) -> None:
    with listening(engine) as (db, sync, factory):
        by_status = sync.register(Load).aggregate("loads", namespace="org", key="status", values=("amount",))
        sync.register(Refund).aggregate("refunds", key="reason")
        with factory() as session:
            session.add_all([Load(id=1, org=1, status="open", amount=1), Refund(id=1, total=1, reason="x")])
            session.commit()
            loads = Load.__table__
            refused = [
                (update(loads).where(loads.c.id == 1).values(status="paid"), None, "update\\(Load\\)"),
                (delete(loads), None, "ORM statement"),
                (insert(loads), [{"id": 2, "org": 1, "status": "open", "amount": 2}], "ORM statement"),
                (
                    sqlite_insert(Load).on_conflict_do_update(index_elements=["id"], set_={"status": "void"}),
                    [{"id": 1, "org": 1, "status": "open", "amount": 1}],
                    "session.merge",
                ),
                (insert(Load).returning(Load.amount), [{"org": 1, "status": "open", "amount": 3}], "own"),
                (update(Invoice).values(total=5), None, "registered subclass"),
                (update(LoadView).values(status="void"), None, "write through Load"),
            ]
            for statement, params, match in refused:
                with pytest.raises(tallytree.InvalidArgumentError, match=match) as raised:
                    session.execute(statement, params)
                assert "nothing was executed" in str(raised.value)
            session.commit()
            assert session.scalars(select(Load.status)).all() == ["open"]
            assert session.scalars(select(Invoice.total)).all() == [1]
            assert_in_sync(db, sync, by_status, session, {(1, "open"): (1, 1)})
            # what the Sync does not see at all: statements on the session's connection (repair after)
            session.connection().execute(update(loads).values(status="void"))
            session.commit()
            assert sync.repair(session)["loads"].different == 1


def test_a_bulk_statement_that_ran_and_cannot_be_followed_blocks_the_commit_until_a_rollback(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(id=i, org=1, status="open", amount=i) for i in (1, 2)])
        session.commit()
        with pytest.raises(tallytree.TransactionError, match="changed its primary key") as raised:
            session.execute(update(Load).where(Load.id == 1).values(id=100))
        assert "roll the session back" in str(raised.value.__notes__)
        with pytest.raises(tallytree.TransactionError, match="roll the session back"):
            session.commit()  # the UPDATE ran: committing it would leave drift
        session.rollback()
        assert session.scalars(select(Load.id).order_by(Load.id)).all() == [1, 2]

        # rows another transaction commits between the Sync's read and the statement: the count differs
        selected = Sync._selected
        monkeypatch.setattr(Sync, "_selected", lambda *args: selected(*args)[:1])
        with pytest.raises(tallytree.TransactionError, match="wrote 2 row\\(s\\) where 1 matched"):
            session.execute(update(Load).values(status="paid"))
        monkeypatch.undo()
        with pytest.raises(tallytree.TransactionError):
            session.commit()
        session.rollback()
        session.execute(update(Load).values(status="paid"))  # after the rollback: as usual
        session.commit()
        assert_in_sync(db, sync, by_status, session, {(1, "paid"): (2, 3)})
