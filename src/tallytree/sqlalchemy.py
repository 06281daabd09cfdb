"""SQLAlchemy integration: keep aggregates in sync with mapped classes, after each SQL commit.

Needs the ``sqlalchemy`` extra (``pip install 'tallytree[sqlalchemy]'``, SQLAlchemy 2).

Design
======
:class:`Sync` registers mapped classes, each with a :class:`~tallytree.ChangeHandler` whose aggregates
are defined by the usual extractors over the row's column values (a dict of column attribute name to
value). It listens to the session events:

* ``after_flush``: every flushed insert, update and delete of a registered class becomes a
  :class:`~tallytree.Change` (the old row is read from the attribute history, so it is the row as the
  database held it before the flush), queued on the session with the SQL transaction it belongs to;
* ``after_soft_rollback`` (every rollback: of a SAVEPOINT, or of the whole transaction): the changes
  queued inside the rolled-back transaction (and the SAVEPOINTs in it) are dropped, so nothing reaches
  tallytree for a rolled-back transaction;
* ``after_commit`` (the outermost commit, after the database committed): the queued changes are applied
  in one tallytree write transaction, in order, with ``idempotent=True`` by default.

The crash window: the SQL commit and the tallytree commit are two commits. If the process dies (or the
tallytree write fails) after the first and before the second, those changes are in SQL but not in
tallytree; a failed tallytree write raises from ``session.commit()`` after the SQL commit (close that
session: SQLAlchemy refuses further SQL in it). Nothing is lost for good: :meth:`Sync.verify` compares
every aggregate with a query over the table and reports the drift, and :meth:`Sync.repair` fixes it in
one transaction; run it at startup, after a crash, or on a schedule (it reports zero drift when
nothing went wrong). ORM bulk statements
(``session.execute(update(Model)...)``), Core statements and writes by other programs bypass the ORM's
flush events, so they are not seen either: repair after them too.

Usage (tested in ``tests/test_sqlalchemy.py``)::

    import tallytree
    from tallytree.sqlalchemy import Sync
    from sqlalchemy import create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class Invoice(Base):
        __tablename__ = "invoices"
        id: Mapped[int] = mapped_column(primary_key=True)
        org: Mapped[int]
        status: Mapped[str]
        total: Mapped[int]

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    db = tallytree.open_memory()
    sync = Sync(db)
    invoices = sync.register(Invoice)
    by_status = invoices.aggregate("invoices", namespace="org", key="status", values=("total",))
    sync.listen(Session)                      # or a sessionmaker, or one session

    with Session(engine) as session:
        session.add_all([Invoice(org=1, status="open", total=5), Invoice(org=1, status="open", total=7)])
        session.commit()
        session.get(Invoice, 1).status = "paid"
        session.commit()                      # tallytree is updated after each SQL commit

    with db.read() as tx:
        by_status.count(tx, namespace=1, eq="open"), by_status.totals(tx, namespace=1).total  # (1, 12)

    with Session(engine) as session:          # after a crash, or on a schedule
        drift = sync.repair(session)          # {"invoices": Drift(...)}; drift["invoices"].ok
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._hooks import Change, ChangeHandler, Drift, repair, verify
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["Sync"]

_QUEUE = "tallytree.changes"


def _sqlalchemy() -> Any:
    try:
        return importlib.import_module("sqlalchemy")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tallytree.sqlalchemy needs SQLAlchemy 2: pip install 'tallytree[sqlalchemy]'"
        ) from exc


class _Registration:
    __slots__ = ("columns", "handler", "id", "model")

    def __init__(self, model: type, handler: ChangeHandler, id: str | Callable[[dict[str, Any]], Any] | None):
        mapper = _sqlalchemy().inspect(model)
        self.model = model
        self.handler = handler
        self.columns = [attribute.key for attribute in mapper.column_attrs]
        if id is None:
            keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
            if len(keys) != 1:
                raise InvalidArgumentError(
                    f"{model.__name__} has a composite primary key {keys}; pass id= (a column name or a "
                    "function of the row giving a str, int or bytes)"
                )
            id = keys[0]
        self.id = id

    def row_id(self, row: dict[str, Any]) -> Any:
        return row[self.id] if isinstance(self.id, str) else self.id(row)

    def new_row(self, instance: Any) -> dict[str, Any]:
        return {key: getattr(instance, key) for key in self.columns}

    def old_row(self, instance: Any) -> dict[str, Any]:
        attributes = _sqlalchemy().inspect(instance).attrs
        row = {}
        for key in self.columns:
            history = attributes[key].history
            if history.deleted:
                row[key] = history.deleted[0]
            elif history.unchanged:
                row[key] = history.unchanged[0]
            else:
                row[key] = getattr(instance, key)
        return row


class Sync:
    """Applies the changes of registered mapped classes to tallytree after each SQL commit."""

    def __init__(self, db: Database, *, idempotent: bool = True) -> None:
        self._db = db
        self._idempotent = idempotent
        self._registrations: dict[type, _Registration] = {}

    def register(
        self, model: type, *, id: str | Callable[[dict[str, Any]], Any] | None = None
    ) -> ChangeHandler:
        """Register a mapped class; return its ChangeHandler, on which to define the aggregates.

        Documents are dicts of the class's column attributes. ``id`` names the column (or function of
        the row) giving the document id; by default the single primary key column.
        """
        if model in self._registrations:
            return self._registrations[model].handler
        handler = ChangeHandler(self._db)
        self._registrations[model] = _Registration(model, handler, id)
        return handler

    def listen(self, target: Any) -> None:
        """Listen to a Session class, a sessionmaker or one session (any target of session events)."""
        event = _sqlalchemy().event
        event.listen(target, "after_flush", self._after_flush)
        event.listen(target, "after_soft_rollback", self._after_soft_rollback)
        event.listen(target, "after_commit", self._after_commit)

    def remove(self, target: Any) -> None:
        """Stop listening to ``target``."""
        event = _sqlalchemy().event
        for name, function in (
            ("after_flush", self._after_flush),
            ("after_soft_rollback", self._after_soft_rollback),
            ("after_commit", self._after_commit),
        ):
            event.remove(target, name, function)

    # ------------------------------------------------------------ events

    def _queue(self, session: Any) -> list[tuple[Any, ChangeHandler, Change]]:
        queue: list[tuple[Any, ChangeHandler, Change]] = session.info.setdefault(_QUEUE, [])
        return queue

    def _after_flush(self, session: Any, flush_context: Any) -> None:
        transaction = session.get_nested_transaction() or session.get_transaction()
        queue = self._queue(session)
        for instance in session.new:
            registration = self._registrations.get(type(instance))
            if registration is not None:
                row = registration.new_row(instance)
                queue.append(
                    (transaction, registration.handler, Change.insert(registration.row_id(row), row))
                )
        for instance in session.dirty:
            registration = self._registrations.get(type(instance))
            if registration is not None and session.is_modified(instance, include_collections=False):
                old, new = registration.old_row(instance), registration.new_row(instance)
                if old != new:
                    change = Change.update(registration.row_id(new), old, new)
                    queue.append((transaction, registration.handler, change))
        for instance in session.deleted:
            registration = self._registrations.get(type(instance))
            if registration is not None:
                old = registration.old_row(instance)
                queue.append(
                    (transaction, registration.handler, Change.delete(registration.row_id(old), old))
                )

    def _after_soft_rollback(self, session: Any, previous_transaction: Any) -> None:
        queue = session.info.get(_QUEUE)
        if not queue:
            return

        def inside(transaction: Any) -> bool:
            while transaction is not None:
                if transaction is previous_transaction:
                    return True
                transaction = transaction.parent
            return False

        queue[:] = [entry for entry in queue if not inside(entry[0])]

    def _after_commit(self, session: Any) -> None:
        queue = session.info.pop(_QUEUE, None)
        if not queue:
            return
        with self._db.write() as tx:
            for _, handler, change in queue:
                handler.apply(tx, change, idempotent=self._idempotent)

    # ------------------------------------------------------------ verify and repair

    def _rows(self, session: Any, model: type) -> list[tuple[Any, dict[str, Any]]]:
        registration = self._registrations[model]
        rows = []
        for instance in session.execute(_sqlalchemy().select(model)).scalars():
            row = registration.new_row(instance)
            rows.append((registration.row_id(row), row))
        return rows

    def verify(self, session: Any, model: type | None = None) -> dict[str, Drift]:
        """Compare every aggregate of the registered classes (or of ``model``) with the rows the
        session's database holds now; return the drift per aggregate name. O(rows + items)."""
        return self._check(session, model, fix=False)

    def repair(self, session: Any, model: type | None = None) -> dict[str, Drift]:
        """Like :meth:`verify`, then fix the aggregates to match the rows, in one tallytree write
        transaction; return the drift that was fixed."""
        return self._check(session, model, fix=True)

    def _check(self, session: Any, model: type | None, *, fix: bool) -> dict[str, Drift]:
        models = [model] if model is not None else list(self._registrations)
        report: dict[str, Drift] = {}
        for each in models:
            handler = self._registrations[each].handler
            rows = self._rows(session, each)
            context = self._db.write() if fix else self._db.read()
            with context as tx:
                for name in handler.aggregates():
                    aggregate = self._db.aggregate(name)
                    definition = handler.definition(name)
                    check = repair if fix else verify
                    report[name] = check(tx, aggregate, rows, definition=definition)
        return report
