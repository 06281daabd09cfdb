"""The SQLAlchemy integration, against a real SQLite database through SQLAlchemy."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import Engine, create_engine, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

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


class Pair(Base):
    __tablename__ = "pairs"
    left: Mapped[int] = mapped_column(primary_key=True)
    right: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def setup(
    engine: Engine,
) -> Iterator[tuple[tallytree.Database, Sync, tallytree.Aggregate, sessionmaker[Session]]]:
    db = tallytree.open_memory()
    sync = Sync(db)
    loads = sync.register(Load)
    by_status = loads.aggregate("loads", namespace="org", key="status", values=("amount",))
    factory = sessionmaker(engine)
    sync.listen(factory)
    yield db, sync, by_status, factory
    sync.remove(factory)
    db.close()


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


def test_crash_window_and_bulk_statements_are_repaired(setup: Any, engine: Engine) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add_all([Load(org=i % 3, status="open", amount=i) for i in range(30)])
        session.commit()
    with Session(engine) as unseen:  # a session nobody listens to: a process that died before tallytree
        unseen.add(Load(org=9, status="open", amount=100))
        unseen.commit()
    with factory() as session:
        session.execute(update(Load).where(Load.org == 1).values(status="paid"))  # bypasses flush events
        session.commit()
        drift = sync.verify(session)["loads"]
        assert (drift.missing, drift.different, drift.extra) == (1, 10, 0)
        fixed = sync.repair(session)["loads"]
        assert not fixed.ok
        assert sync.verify(session)["loads"].ok
        assert tally_counts(db, by_status) == sql_counts(session)


def test_a_failed_tallytree_write_leaves_sql_committed_and_repair_fixes_it(setup: Any) -> None:
    db, sync, by_status, factory = setup
    with factory() as session:
        session.add(Load(org=1, status="open", amount=1))
        with db.write(), pytest.raises(tallytree.TransactionError):  # tallytree busy: its write fails
            session.commit()
    with factory() as session:  # the SQL commit stands
        assert session.execute(select(func.count()).select_from(Load)).scalar() == 1
        assert sync.verify(session)["loads"].missing == 1
        sync.repair(session)
        assert tally_counts(db, by_status) == sql_counts(session)


def test_strict_mode_raises_on_drift(engine: Engine) -> None:
    db = tallytree.open_memory()
    sync = Sync(db, idempotent=False)
    sync.register(Load).aggregate("strict_loads", key="status")
    factory = sessionmaker(engine)
    sync.listen(factory)
    try:
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
    finally:
        sync.remove(factory)


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
