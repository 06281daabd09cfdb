"""SQLAlchemy integration: keep aggregates in sync with mapped classes, after each SQL commit.

Needs the ``sqlalchemy`` extra (``pip install 'tallytree[sqlalchemy]'``, SQLAlchemy 2).

Design
======
:class:`Sync` registers mapped classes, each with a :class:`~tallytree.ChangeHandler` whose aggregates
are defined by the usual extractors over the row's column values (a dict of column attribute name to
value). It listens to the session events:

* ``before_flush``: the old row of every registered instance about to be updated or deleted is read
  while the database still holds it: from the attribute history for the columns loaded or set, and
  by loading the others (expired after a commit, deferred), which the flush has not changed yet;
* ``after_flush``: every flushed insert, update and delete of a registered class becomes a
  :class:`~tallytree.Change`, queued on the session with the SQL transaction it belongs to. Within a
  flush the deletes come first, then the updates, then the inserts, so a row deleted and re-added
  with the same id (SQLAlchemy's "row switch") ends with the new row's items; an update that changes
  the document id (a new primary key) is a delete of the old id and an insert of the new one, since
  items are keyed by id;
* ``after_soft_rollback`` (every rollback: of a SAVEPOINT, or of the whole transaction): the changes
  queued inside the rolled-back transaction (and the SAVEPOINTs in it) are dropped, so nothing reaches
  tallytree for a rolled-back transaction; a rolled-back SAVEPOINT drops only its own changes;
* ``after_commit``: SQLAlchemy fires it for a released SAVEPOINT too, and then nothing happens: the
  SAVEPOINT's changes stay queued with the enclosing transaction, and go with it if it rolls back. At
  the outermost commit (after the database committed) the queued changes are applied in one tallytree
  write transaction, in order, with ``idempotent=True`` by default. Outermost is the session's: a
  session joined to a connection whose transaction its caller ends later (``join_transaction_mode``)
  applies at its own commit;
* ``after_transaction_end`` of the outermost transaction: whatever is still queued is dropped (a
  ``session.close()`` ends the transaction without a rollback event), so a session used again after a
  close starts with an empty queue.

Each :class:`Sync` keeps its own queue per session, so several can listen to the same sessions. An
instance of a subclass of a registered class (single-table or joined inheritance) is a row of the
registered class, as ``select(Registered)`` returns it: its changes reach the aggregates of every
registered class it is an instance of.

Old values of expired attributes: after a commit (``expire_on_commit=True``, the default) or
``session.expire()``, setting an attribute does not load the value it replaces, so neither the history
nor the database (the flush has written the new value by ``after_flush``) could tell the old row.
:meth:`Sync.register` therefore gives every column attribute of the class active history (a "set"
listener with ``active_history=True``, for the process, for every session): setting an expired
attribute first loads the instance's expired columns, one SELECT, which reading any of them would
cost anyway; setting loaded attributes costs nothing more.

The crash window: the SQL commit and the tallytree commit are two commits. If the process dies (or the
tallytree write fails) after the first and before the second, those changes are in SQL but not in
tallytree; a failed tallytree write raises from ``session.commit()`` after the SQL commit (close that
session: SQLAlchemy refuses further SQL in it). Nothing is lost for good: :meth:`Sync.verify` compares
every aggregate with a query over the table and reports the drift, and :meth:`Sync.repair` fixes it in
one transaction; run it at startup, after a crash, or on a schedule (it reports zero drift when
nothing went wrong). ORM bulk statements
(``session.execute(update(Model)...)``), Core statements and writes by other programs bypass the ORM's
flush events, so they are not seen either: repair after them too.

Verify and repair read the registered columns with a column select in the given session's transaction
(``no_autoflush``): not through the identity map, whose instances may be stale, and without flushing or
refreshing the session's instances. They see what that transaction sees: uncommitted rows it wrote with
Core statements, but not the session's unflushed changes (those reach tallytree at the commit, as
usual). :meth:`Sync.repair` refuses (TransactionError) while the session holds flushed changes of
registered classes not yet committed, which a rollback would leave in tallytree; run it in a fresh
session, or right after a commit.

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

from ._args import check_flag
from ._hooks import Change, ChangeHandler, Drift, repair, verify
from .errors import InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["Sync"]

_QUEUE = "tallytree.changes"
_OLD_ROWS = "tallytree.old_rows"


def _sqlalchemy() -> Any:
    try:
        return importlib.import_module("sqlalchemy")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tallytree.sqlalchemy needs SQLAlchemy 2: pip install 'tallytree[sqlalchemy]'"
        ) from exc


def _load_old_value(target: Any, value: Any, oldvalue: Any, initiator: Any) -> None:
    """The "set" listener that gives a column attribute active history; it does nothing itself.

    Listening with ``active_history=True`` is what makes SQLAlchemy load the value a set replaces when
    that value is not loaded (an expired attribute), so the attribute history keeps the old value."""


class _Registration:
    __slots__ = ("columns", "handler", "id", "model")

    def __init__(self, model: type, handler: ChangeHandler, id: str | Callable[[dict[str, Any]], Any] | None):
        mapper = _sqlalchemy().inspect(model)
        self.model = model
        self.handler = handler
        self.columns = [attribute.key for attribute in mapper.column_attrs]
        event = _sqlalchemy().event
        for key in self.columns:  # every column: extractor functions may read any of them
            attribute = getattr(model, key)
            if not event.contains(attribute, "set", _load_old_value):  # once per class, for any Sync
                event.listen(attribute, "set", _load_old_value, active_history=True, propagate=True)
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
        """The row as the database holds it before the coming flush; call it in ``before_flush``.

        A column set since it was loaded has its old value in the history (always: active history
        loads it when the set replaced an expired value); a column neither loaded nor set is loaded
        now, and the database still holds its old value."""
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
        check_flag(idempotent, "idempotent")
        self._db = db
        self._idempotent = idempotent
        self._registrations: dict[type, _Registration] = {}
        # The registrations an instance of a class reaches: every registered class in its MRO, nearest
        # first; cached per class, cleared by register.
        self._matches: dict[type, tuple[_Registration, ...]] = {}

    def register(
        self, model: type, *, id: str | Callable[[dict[str, Any]], Any] | None = None
    ) -> ChangeHandler:
        """Register a mapped class; return its ChangeHandler, on which to define the aggregates.

        Documents are dicts of the class's column attributes. ``id`` names the column (or function of
        the row) giving the document id; by default the single primary key column. Instances of the
        class's mapped subclasses are its rows too (``select(model)`` returns them). Gives the class's
        column attributes active history, for good (see the module docstring). O(columns).
        Raises InvalidArgumentError for a composite primary key without ``id``.
        """
        if model in self._registrations:
            return self._registrations[model].handler
        handler = ChangeHandler(self._db)
        self._registrations[model] = _Registration(model, handler, id)
        self._matches.clear()
        return handler

    def listen(self, target: Any) -> None:
        """Listen to a Session class, a sessionmaker or one session (any target of session events)."""
        event = _sqlalchemy().event
        for name, function in self._listeners():
            event.listen(target, name, function)

    def remove(self, target: Any) -> None:
        """Stop listening to ``target``."""
        event = _sqlalchemy().event
        for name, function in self._listeners():
            event.remove(target, name, function)

    def _listeners(self) -> list[tuple[str, Callable[..., None]]]:
        return [
            ("before_flush", self._before_flush),
            ("after_flush", self._after_flush),
            ("after_soft_rollback", self._after_soft_rollback),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
        ]

    # ------------------------------------------------------------ events

    def _matching(self, cls: type) -> tuple[_Registration, ...]:
        """The registrations of ``cls`` and its registered bases, nearest first."""
        matches = self._matches.get(cls)
        if matches is None:
            matches = tuple(self._registrations[base] for base in cls.__mro__ if base in self._registrations)
            self._matches[cls] = matches
        return matches

    def _queue_key(self) -> tuple[str, Sync]:
        return (_QUEUE, self)  # one queue per Sync: several may listen to the same session

    def _queue(self, session: Any) -> list[tuple[Any, ChangeHandler, Change]]:
        queue: list[tuple[Any, ChangeHandler, Change]] = session.info.setdefault(self._queue_key(), [])
        return queue

    def _before_flush(self, session: Any, flush_context: Any, instances: Any) -> None:
        # after_flush is too late to read what is not loaded: the database holds the new rows by then.
        # The rows live in the flush's own scratch dict, so a failed flush leaves none behind. None
        # marks a deleted instance whose row was already gone. Keyed by (registration, state): a
        # registered subclass and its registered base each read their own columns.
        old_rows: dict[tuple[_Registration, Any], dict[str, Any] | None] = {}
        for instance in session.dirty:
            registrations = self._matching(type(instance))
            if registrations and session.is_modified(instance, include_collections=False):
                state = _sqlalchemy().inspect(instance)
                for registration in registrations:
                    old_rows[(registration, state)] = registration.old_row(instance)
        deleted_elsewhere = importlib.import_module("sqlalchemy.orm.exc").ObjectDeletedError
        for instance in session.deleted:
            registrations = self._matching(type(instance))
            state = _sqlalchemy().inspect(instance) if registrations else None
            for registration in registrations:
                try:
                    old_rows[(registration, state)] = registration.old_row(instance)
                except deleted_elsewhere:
                    # Deleted by someone else: the flush deletes nothing and does not fail, so neither
                    # do we; the row's items, if any, were already drift for repair.
                    old_rows[(registration, state)] = None
        flush_context.attributes[(_OLD_ROWS, self)] = old_rows

    def _after_flush(self, session: Any, flush_context: Any) -> None:
        transaction = session.get_nested_transaction() or session.get_transaction()
        old_rows: dict[tuple[_Registration, Any], dict[str, Any] | None] = flush_context.attributes.get(
            (_OLD_ROWS, self), {}
        )

        def old_row(registration: _Registration, instance: Any) -> dict[str, Any] | None:
            # Missing only for an instance changed by a before_flush listener that ran after ours;
            # its history is complete then (active history), so reading it now is still right.
            key = (registration, _sqlalchemy().inspect(instance))
            return old_rows[key] if key in old_rows else registration.old_row(instance)

        # Removals before updates before additions: a flush holds each old id and each new id once,
        # and only a removal and an addition of the same id (a row switch, a primary key moved onto a
        # deleted row's) depend on their order.
        removals: list[tuple[ChangeHandler, Change]] = []
        updates: list[tuple[ChangeHandler, Change]] = []
        additions: list[tuple[ChangeHandler, Change]] = []
        for instance in session.deleted:
            for registration in self._matching(type(instance)):
                old = old_row(registration, instance)
                if old is not None:
                    removals.append((registration.handler, Change.delete(registration.row_id(old), old)))
        for instance in session.dirty:
            registrations = self._matching(type(instance))
            if not registrations or not session.is_modified(instance, include_collections=False):
                continue
            for registration in registrations:
                old, new = old_row(registration, instance), registration.new_row(instance)
                assert old is not None  # None is only ever recorded for deleted instances
                old_id, new_id = registration.row_id(old), registration.row_id(new)
                if old_id != new_id:  # items are keyed by id: the old id's go, the new id's come
                    removals.append((registration.handler, Change.delete(old_id, old)))
                    additions.append((registration.handler, Change.insert(new_id, new)))
                elif old != new:
                    updates.append((registration.handler, Change.update(new_id, old, new)))
        for instance in session.new:
            for registration in self._matching(type(instance)):
                row = registration.new_row(instance)
                additions.append((registration.handler, Change.insert(registration.row_id(row), row)))
        changes = [*removals, *updates, *additions]
        if changes:
            self._queue(session).extend((transaction, handler, change) for handler, change in changes)

    def _after_soft_rollback(self, session: Any, previous_transaction: Any) -> None:
        queue = session.info.get(self._queue_key())
        if not queue:
            return

        def inside(transaction: Any) -> bool:
            while transaction is not None:
                if transaction is previous_transaction:
                    return True
                transaction = transaction.parent
            return False

        # A rolled-back SAVEPOINT drops the changes queued in it and in the SAVEPOINTs inside it
        # (released or not), and keeps those of the enclosing transactions.
        queue[:] = [entry for entry in queue if not inside(entry[0])]

    def _after_commit(self, session: Any) -> None:
        # SQLAlchemy fires after_commit when a SAVEPOINT is released too; the SAVEPOINT's transaction
        # is still the session's nested transaction then (it closes after this event), and its changes
        # stay queued, tagged with it, until the outermost commit or a rollback that encloses it.
        if session.in_nested_transaction():
            return
        queue = session.info.pop(self._queue_key(), None)
        if not queue:
            return
        with self._db.write() as tx:
            for _, handler, change in queue:
                handler.apply(tx, change, idempotent=self._idempotent)

    def _after_transaction_end(self, session: Any, transaction: Any) -> None:
        # The outermost transaction ended: committed (the queue was applied and removed), rolled back
        # (dropped), or closed without either (session.close()): nothing queued may outlive it.
        if transaction.parent is None:
            session.info.pop(self._queue_key(), None)

    # ------------------------------------------------------------ verify and repair

    def _rows(self, session: Any, model: type) -> list[tuple[Any, dict[str, Any]]]:
        # A column select, not select(model): the identity map would hand back the instances the
        # session already holds, with their (possibly stale) loaded values, and populate_existing
        # would overwrite their unflushed changes. no_autoflush: reading must not write the session's
        # pending changes into the transaction. An ORM-enabled select of a mapped class's columns
        # returns the rows of its subclasses too (and only a single-table subclass's own rows).
        registration = self._registrations[model]
        columns = [getattr(model, key) for key in registration.columns]
        rows = []
        with session.no_autoflush:
            for values in session.execute(_sqlalchemy().select(*columns)):
                row = dict(zip(registration.columns, values, strict=True))
                rows.append((registration.row_id(row), row))
        return rows

    def verify(self, session: Any, model: type | None = None) -> dict[str, Drift]:
        """Compare every aggregate of the registered classes (or of ``model``) with the rows the
        session's transaction sees now (read from the database, without flushing the session); return
        the drift per aggregate name. O(rows + items)."""
        return self._check(session, model, fix=False)

    def repair(self, session: Any, model: type | None = None) -> dict[str, Drift]:
        """Like :meth:`verify`, then fix the aggregates to match the rows, in one tallytree write
        transaction; return the drift that was fixed.

        Raises TransactionError while ``session`` holds flushed changes of registered classes that are
        not committed yet (a rollback would leave them in tallytree): run it in a fresh session, or
        after the commit."""
        if session.info.get(self._queue_key()):
            raise TransactionError(
                "Sync.repair: the session holds flushed changes that are not committed; commit or roll "
                "back first (or repair in a fresh session)"
            )
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
