"""SQLAlchemy integration: keep aggregates in sync with mapped classes, after each SQL commit.

Needs the ``sqlalchemy`` extra (``pip install 'tallytree[sqlalchemy]'``, SQLAlchemy 2).

Design
======
:class:`Sync` registers mapped classes, each with a :class:`~tallytree.ChangeHandler` whose aggregates
are defined by the usual extractors over the row's column values (a dict of column attribute name to
value). The rows come from the unit of work, row by row, through the mapper events of each registered
class; the session events decide when they reach tallytree:

* ``before_flush`` (session) opens a record for the flush; the mapper events of sessions this Sync
  does not listen to find none and do nothing;
* ``before_update`` / ``before_delete`` (mapper, fired for every row the flush writes: orphans deleted
  by ``delete-orphan``, cascaded deletes and rows updated through a relationship included) read the
  OLD row from the database, by the primary key it has there, on the flush's own connection, in its
  transaction, ``SELECT ... FOR UPDATE`` (PostgreSQL, MySQL, Oracle lock the row until the commit;
  SQLite ignores the clause: its writers are serialized, though pysqlite's default handling runs a
  transaction's first statement, when it is this read, before its own ``BEGIN``; SQLAlchemy's recipe
  that emits ``BEGIN`` itself closes that gap). Not the session's copy: another session may
  have committed a change to the row since this one loaded it, and a mutable value edited in place
  (a ``MutableDict`` JSON column) has no old value in the history. An update that sets no registered
  column (only a collection changed) reads nothing;
* ``after_insert`` / ``after_update`` / ``after_delete`` (mapper) note the row once its statement ran.
  The NEW row of an update is the old row with the columns the UPDATE set (those changed in the
  history, and those it sets itself: ``onupdate``, ``server_onupdate``, ``Computed``, the version
  counter) taken from the instance, so a stale loaded column is never written back into tallytree. An
  insert's new row is the instance's; it costs no query. A pending instance taking the primary key of
  one the flush deletes (SQLAlchemy's "row switch": one UPDATE, no delete events) removes the deleted
  row's items, read from the database in ``before_insert``;
* ``after_flush`` (session) turns the flush's rows into :class:`~tallytree.Change` objects, queued on
  the session with the SQL transaction they belong to: the removals first, then the updates, then the
  additions (a flush holds each old id and each new id once, and only a removal and an addition of the
  same id depend on their order); an update that changes the document id is a delete of the old id and
  an insert of the new one, since items are keyed by id. It also extracts every change's items now, so
  that a row the aggregates cannot take (an id, key or value of the wrong type, a function that fails)
  fails the flush, which rolls the SQL transaction back, instead of failing after the SQL commit;
* ``after_soft_rollback`` (every rollback: of a SAVEPOINT, or of the whole transaction): the changes
  queued inside the rolled-back transaction (and the SAVEPOINTs in it) are dropped, so nothing reaches
  tallytree for a rolled-back transaction; a rolled-back SAVEPOINT drops only its own changes;
* ``before_commit``: a commit inside ``with db.write()`` in the same thread, with changes to apply, is
  refused (TransactionError) before anything is committed: the tallytree write that follows the SQL
  commit could not open;
* ``after_commit``: SQLAlchemy fires it for a released SAVEPOINT too, and then nothing happens: the
  SAVEPOINT's changes stay queued with the enclosing transaction, and go with it if it rolls back. At
  the outermost commit (after the database committed) the queued changes are applied in one tallytree
  write transaction, in order, with ``idempotent=True`` by default. Outermost is the session's: a
  session joined to a connection whose transaction its caller ends later (``join_transaction_mode``)
  applies at its own commit;
* ``after_transaction_end`` of the outermost transaction: whatever is still queued is dropped (a
  ``session.close()`` ends the transaction without a rollback event), so a session used again after a
  close starts with an empty queue.

Each :class:`Sync` keeps its own queue per session, so several can listen to the same sessions (each
reads the old rows it needs). An instance of a subclass of a registered class (single-table or joined
inheritance) is a row of the registered class, as ``select(Registered)`` returns it: its changes reach
the aggregates of every registered class it is an instance of; the nearest registered class's mapper
listener handles it, reading the columns of all of them in one SELECT.

Cost: one SELECT by primary key per updated or deleted row whose registered columns change, on the
flush's connection (an index lookup; on PostgreSQL a row lock the UPDATE takes anyway); none for an
insert. Measured on SQLite (a file, 1,000 rows, median of 500 committed one-row updates after a
warm-up), a committed update costs about 0.45 ms with the Sync, 0.1 ms more than without it, and the
same as the design before this one, which read the history and loaded expired columns instead.
Setting an expired attribute loads nothing.

Types, checked before anything is committed: a document id is a str, int or bytes, so
:meth:`Sync.register` refuses an id column that loads as anything else (pass ``id=`` a function), except
a ``Uuid`` column, whose canonical ``str`` is the id in every change and in verify and repair. The
handler's ``aggregate()`` refuses (ArgumentTypeError, with a hint) a column named as a key or namespace
that loads as no key type (a naive ``DateTime`` without ``timezone=True``, ``Numeric``'s ``Decimal``,
``Date``, ``Uuid``), or as a value field that loads as no int or float (``Numeric``: store integer
cents, or declare ``asdecimal=False``, or convert in a function); a ``DateTime(timezone=True)`` key on
SQLite or MySQL, which store no offset and load naive datetimes, is refused at the first flush. A Float
column set to an int is held as the float it loads as. Functions of the row and ``TypeDecorator``
columns are checked row by row in the flush.

The crash window: the SQL commit and the tallytree commit are two commits. If the process dies (or the
tallytree write fails) after the first and before the second, those changes are in SQL but not in
tallytree; a failed tallytree write raises from ``session.commit()`` after the SQL commit, its
exception noting that SQL committed and tallytree lags (close that session: SQLAlchemy refuses further
SQL in it). Nothing is lost for good: :meth:`Sync.verify` compares every aggregate with a query over
the table and reports the drift, and :meth:`Sync.repair` fixes it in one transaction; run it at
startup, after a crash, or on a schedule (it reports zero drift when nothing went wrong). ORM bulk
statements (``session.execute(update(Model)...)``, ``bulk_save_objects``), Core statements and writes
by other programs bypass the ORM's flush events, so they are not seen either: repair after them too.

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

import copy
import datetime
import importlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._args import check_flag
from ._extract import Definition, Extractor, OnMissing, Where
from ._hooks import Change, ChangeHandler, Drift, repair, verify
from ._keys import encode_id
from ._txn import WriteTransaction
from .errors import ArgumentTypeError, InvalidArgumentError, TransactionError

if TYPE_CHECKING:
    from ._aggregate import Aggregate
    from ._db import Database

__all__ = ["Sync"]

_QUEUE = "tallytree.changes"
_FLUSH = "tallytree.flush"
# Dialects whose drivers load DateTime(timezone=True) columns back as naive datetimes (no offset stored).
_NAIVE_DIALECTS = frozenset({"sqlite", "mysql", "mariadb"})
_KEY_TYPES = (int, float, str, bytes, datetime.datetime)  # bool is an int; tuples come from several columns
_ID_TYPES = (int, str, bytes)

Row = dict[str, Any]


def _sqlalchemy() -> Any:
    try:
        return importlib.import_module("sqlalchemy")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tallytree.sqlalchemy needs SQLAlchemy 2: pip install 'tallytree[sqlalchemy]'"
        ) from exc


def _python_type(column: Any) -> type | None:
    """The Python type a column loads as, or None when SQLAlchemy does not say (or a TypeDecorator
    converts it: its own conversions are trusted, and checked value by value in the flush)."""
    sqlalchemy = _sqlalchemy()
    if isinstance(column.type, sqlalchemy.TypeDecorator):
        return None
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return None
    return python_type if isinstance(python_type, type) else None


def _snapshot(value: Any) -> Any:
    """A copy of a mutable value (a JSON dict or list), so that later in-place edits of the instance's
    value do not rewrite a change queued for the commit."""
    return copy.deepcopy(value) if isinstance(value, dict | list | set) else value


class _Registration:
    """A registered mapped class: its column attributes, id, and how its old rows are read."""

    __slots__ = (
        "aware_keys",
        "columns",
        "floats",
        "handler",
        "id",
        "id_as_str",
        "model",
        "python_types",
        "select",
        "server_changed",
    )

    def __init__(self, db: Database, model: type, id: str | Callable[[dict[str, Any]], Any] | None) -> None:
        sqlalchemy = _sqlalchemy()
        mapper = sqlalchemy.inspect(model)
        self.model = model
        self.columns: list[str] = [attribute.key for attribute in mapper.column_attrs]
        self.python_types = {
            attribute.key: _python_type(attribute.columns[0]) for attribute in mapper.column_attrs
        }
        # Columns the UPDATE itself may change (onupdate=, server_onupdate=, Computed, a version
        # counter): after an UPDATE their new values are the instance's (fetched or expired), not the
        # old row's.
        self.server_changed = frozenset(
            attribute.key
            for attribute in mapper.column_attrs
            if any(
                column.onupdate is not None
                or column.server_onupdate is not None
                or column is mapper.version_id_col
                for column in attribute.columns
            )
        )
        # A Float column given an int loads back as a float, and 5 and 5.0 are distinct keys.
        self.floats = frozenset(key for key, kind in self.python_types.items() if kind is float)
        self.aware_keys: list[tuple[str, str]] = []  # (aggregate, column): DateTime(timezone=True) keys
        if id is None:
            keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
            if len(keys) != 1:
                raise InvalidArgumentError(
                    f"{model.__name__} has a composite primary key {keys}; pass id= (a column name or a "
                    "function of the row giving a str, int or bytes)"
                )
            id = keys[0]
        self.id_as_str = False
        if isinstance(id, str):
            if id not in self.python_types:
                raise InvalidArgumentError(
                    f"{model.__name__} has no column attribute {id!r} to use as the id (columns: "
                    f"{self.columns})"
                )
            kind = self.python_types[id]
            if kind is uuid.UUID:
                self.id_as_str = True  # the canonical str: exact, and the same in verify and repair
            elif kind is not None and (not issubclass(kind, _ID_TYPES) or issubclass(kind, bool)):
                raise ArgumentTypeError(
                    f"{model.__name__}.{id} loads as {kind.__name__}, and document ids are str, int or "
                    f"bytes; pass id= a function of the row giving one, e.g. id=lambda row: str(row[{id!r}])"
                )
        elif not callable(id):
            raise ArgumentTypeError(
                f"id= takes a column name or a function of the row, not {type(id).__name__}"
            )
        self.id = id
        # The old row of an update or delete, read in the flush's transaction (FOR UPDATE where the
        # dialect locks rows): the registered columns, by primary key. An ORM-enabled select of a
        # subclass's columns joins its tables (joined inheritance) or adds its discriminator.
        primary_key = [
            column == sqlalchemy.bindparam(f"pk{index}") for index, column in enumerate(mapper.primary_key)
        ]
        self.select = (
            sqlalchemy.select(*[getattr(model, key) for key in self.columns])
            .where(*primary_key)
            .with_for_update()
        )
        self.handler = _ModelHandler(db, self)

    def row_id(self, row: Row) -> Any:
        if isinstance(self.id, str):
            value = row[self.id]
            return str(value) if self.id_as_str and isinstance(value, uuid.UUID) else value
        return self.id(row)

    def read(self, connection: Any, identity: Sequence[Any]) -> Row | None:
        """The row with primary key ``identity`` as the database holds it now, in ``connection``'s
        transaction; None when it is gone."""
        values = connection.execute(
            self.select, {f"pk{i}": value for i, value in enumerate(identity)}
        ).first()
        return None if values is None else dict(zip(self.columns, values, strict=True))

    def instance_value(self, instance: Any, key: str) -> Any:
        value = getattr(instance, key)
        if key in self.floats and type(value) is int:
            return float(value)
        return _snapshot(value)

    def project(self, row: Row) -> Row:
        """The row of a subclass, cut down to this (base) class's columns."""
        return row if len(row) == len(self.columns) else {key: row[key] for key in self.columns}

    def check_definition(
        self, name: str, key: Any, namespace: Any, values: Sequence[str] | Mapping[str, Extractor]
    ) -> None:
        """Refuse, before the aggregate exists, a column named as a key, namespace or value field whose
        type the aggregate cannot take as SQLAlchemy loads it (functions are checked row by row)."""
        model = self.model.__name__
        roles: list[tuple[str, str, Any]] = [("key", name, key), ("namespace", name, namespace)]
        if isinstance(values, Mapping):
            roles += [("value", field, spec) for field, spec in values.items()]
        elif not isinstance(values, str):
            roles += [("value", field, field) for field in values]
        for role, _, spec in roles:
            for column in spec if isinstance(spec, tuple) else (spec,):
                if not isinstance(column, str):
                    continue
                if column not in self.python_types:
                    raise InvalidArgumentError(
                        f"{name}: {model} has no column attribute {column!r} (the {role} {spec!r}); "
                        f"columns: {self.columns}"
                    )
                problem = self._problem(role, column)
                if problem:
                    raise ArgumentTypeError(f"{name}: {model}.{column}, used as a {role}, {problem}")
                if role != "value" and self._aware_datetime(column):
                    self.aware_keys.append((name, column))

    def _aware_datetime(self, column: str) -> bool:
        column_type = getattr(self.model, column).property.columns[0].type
        return isinstance(column_type, _sqlalchemy().DateTime) and bool(column_type.timezone)

    def _problem(self, role: str, column: str) -> str | None:
        kind = self.python_types[column]
        if kind is None:
            return None
        lambda_hint = f"lambda row: row[{column!r}]"
        if role == "value":
            if kind.__name__ == "Decimal":
                return (
                    "loads as Decimal, and value fields are ints or floats (sums kept exact or "
                    "correctly rounded); store integer cents in an Integer column for exact money, or "
                    "declare Numeric(asdecimal=False) to load floats, or pass "
                    f"values={{{column!r}: lambda row: float(row[{column!r}])}}"
                )
            if not issubclass(kind, int | float) or issubclass(kind, bool):
                return f"loads as {kind.__name__}, and value fields are ints or floats"
            return None
        column_type = getattr(self.model, column).property.columns[0].type
        if isinstance(column_type, _sqlalchemy().DateTime) and not column_type.timezone:
            return (
                "is DateTime without timezone: it loads naive datetimes, which name no instant and "
                "are not keys; declare DateTime(timezone=True) on a database that stores the offset "
                f"(PostgreSQL), or pass {role}={lambda_hint}.replace(tzinfo=timezone.utc) if it holds UTC"
            )
        if not issubclass(kind, _KEY_TYPES):
            return (
                f"loads as {kind.__name__}, which is not a key type (int, float, str, bytes, bool, "
                f"timezone-aware datetime, or a tuple of them); pass {role}= a function converting "
                f"it, e.g. {role}=lambda row: str(row[{column!r}])"
            )
        return None


class _ModelHandler(ChangeHandler):
    """The ChangeHandler of a registered class: :meth:`aggregate` also checks the named columns' types."""

    def __init__(self, db: Database, registration: _Registration) -> None:
        super().__init__(db)
        self._registration = registration

    def aggregate(
        self,
        name: str,
        *,
        key: Extractor,
        namespace: Extractor | None = None,
        values: Sequence[str] | Mapping[str, Extractor] = (),
        where: Where = None,
        node_size: int | None = None,
        on_missing: OnMissing = "error",
    ) -> Aggregate:
        """:meth:`tallytree.ChangeHandler.aggregate`, refusing first (ArgumentTypeError, with a hint)
        a column named as a key or namespace, or as a value field, whose type SQLAlchemy loads as
        something the aggregate cannot take: a naive datetime (DateTime without timezone), a
        Decimal (Numeric), a uuid, a date... Functions of the row are checked in each flush, before
        the SQL commit. InvalidArgumentError for a name that is no column attribute."""
        self._registration.check_definition(name, key, namespace, values)
        return super().aggregate(
            name,
            key=key,
            namespace=namespace,
            values=values,
            where=where,
            node_size=node_size,
            on_missing=on_missing,
        )


class _Flush:
    """What one flush wrote, gathered by the mapper events, turned into changes by ``after_flush``."""

    __slots__ = ("additions", "old", "removals", "switched", "updates")

    def __init__(self) -> None:
        # state -> (old row or None when gone, the registered columns the UPDATE sets)
        self.old: dict[Any, tuple[Row | None, frozenset[str]]] = {}
        self.removals: list[tuple[tuple[_Registration, ...], Row]] = []
        self.updates: list[tuple[tuple[_Registration, ...], Any, Row, frozenset[str]]] = []
        self.additions: list[tuple[tuple[_Registration, ...], Any]] = []
        self.switched: set[Any] = set()  # the new instances of row switches (see _before_insert)


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
        the row) giving the document id; by default the single primary key column. A ``Uuid`` id
        column gives its canonical ``str`` (in every change, and in verify and repair). Instances of
        the class's mapped subclasses are its rows too (``select(model)`` returns them). Listens to
        the class's mapper events for good (they do nothing for sessions this Sync does not listen
        to). The handler's ``aggregate()`` refuses columns whose loaded type the aggregate cannot take
        (see the module docstring). O(columns).

        Raises InvalidArgumentError for a composite primary key without ``id`` or an ``id`` naming no
        column attribute, ArgumentTypeError for an id column that loads as neither str, int, bytes
        nor uuid (pass ``id=`` a function).
        """
        if model in self._registrations:
            return self._registrations[model].handler
        registration = _Registration(self._db, model, id)
        event = _sqlalchemy().event
        for name, method in (
            ("before_insert", self._before_insert),
            ("after_insert", self._after_insert),
            ("before_update", self._before_update),
            ("after_update", self._after_update),
            ("before_delete", self._before_delete),
            ("after_delete", self._after_delete),
        ):
            event.listen(model, name, self._mapper_listener(registration, method), propagate=True)
        self._registrations[model] = registration
        self._matches.clear()
        return registration.handler

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
            ("before_commit", self._before_commit),
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

    def _mapper_listener(
        self, registration: _Registration, method: Callable[[tuple[_Registration, ...], Any, Any, Any], None]
    ) -> Callable[[Any, Any, Any], None]:
        """A mapper event listener of ``registration``'s class (and, propagated, its subclasses).

        Each registered class in an instance's MRO has one, and only the nearest acts: it handles the
        instance for every registered class it is an instance of. It acts only in the flush of a session
        this Sync listens to (whose ``before_flush`` left a :class:`_Flush` in ``session.info``)."""

        def listener(mapper: Any, connection: Any, target: Any) -> None:
            matches = self._matching(type(target))
            if matches[0] is not registration:
                return
            state = _sqlalchemy().inspect(target)
            session = state.session
            flush = session.info.get((_FLUSH, self)) if session is not None else None
            if flush is None:
                return
            for each in matches:
                if each.aware_keys and connection.dialect.name in _NAIVE_DIALECTS:
                    aggregate, column = each.aware_keys[0]
                    raise ArgumentTypeError(
                        f"{aggregate}: {each.model.__name__}.{column} is DateTime(timezone=True), which "
                        f"{connection.dialect.name} stores without its offset: rows load back naive, "
                        "which are not keys; store UTC through a TypeDecorator that returns aware "
                        "datetimes, or key on a function of the row (nothing was committed)"
                    )
            method(matches, flush, connection, state)

        return listener

    def _before_insert(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        # A pending instance whose primary key is that of an instance this flush deletes: SQLAlchemy
        # turns the pair into one UPDATE (a "row switch"), fires before_insert then after_update for
        # the new instance, and no delete events for the old one, whose row the database still holds
        # now: read it to remove its items. An insert of a new key costs a dictionary lookup, no query.
        key = state.mapper.identity_key_from_instance(state.obj())
        if None in key[1]:
            return
        existing = state.session.identity_map.get(key)
        if existing is None or existing is state.obj():
            return
        flush.switched.add(state)
        existing_matches = self._matching(type(existing))
        if existing_matches:
            old = existing_matches[0].read(connection, key[1])
            if old is not None:
                flush.removals.append((existing_matches, old))

    def _after_insert(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        flush.additions.append((matches, state))

    def _before_update(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        # before_update fires for every dirty instance, also those whose UPDATE sets no column (a
        # collection changed): read the old row only when a registered column changes.
        nearest = matches[0]
        attributes = state.attrs
        written = frozenset(key for key in nearest.columns if attributes[key].history.has_changes())
        if not written and not (
            nearest.server_changed
            and any(attributes[prop.key].history.has_changes() for prop in state.mapper.column_attrs)
        ):
            return
        flush.old[state] = (nearest.read(connection, state.identity), written)

    def _after_update(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        if state in flush.switched:  # the new instance of a row switch: its whole row is new
            flush.additions.append((matches, state))
            return
        old, written = flush.old.pop(state, (None, frozenset()))
        if old is not None:  # None: no registered column changed, or the row was gone
            flush.updates.append((matches, state, old, written))

    def _before_delete(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        flush.old[state] = (matches[0].read(connection, state.identity), frozenset())

    def _after_delete(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        old, _ = flush.old.pop(state, (None, frozenset()))
        if old is not None:  # None: deleted by someone else already; its items were drift for repair
            flush.removals.append((matches, old))

    def _before_flush(self, session: Any, flush_context: Any, instances: Any) -> None:
        # A new record per flush: a failed flush's leftovers are dropped here (or at the rollback).
        session.info[(_FLUSH, self)] = _Flush()

    def _after_flush(self, session: Any, flush_context: Any) -> None:
        flush: _Flush | None = session.info.pop((_FLUSH, self), None)
        if flush is None:
            return
        transaction = session.get_nested_transaction() or session.get_transaction()
        # Removals before updates before additions: a flush holds each old id and each new id once,
        # and only a removal and an addition of the same id (a row switch, a primary key moved onto a
        # deleted row's) depend on their order.
        removals: list[tuple[ChangeHandler, Change]] = []
        updates: list[tuple[ChangeHandler, Change]] = []
        additions: list[tuple[ChangeHandler, Change]] = []
        for matches, old_row in flush.removals:
            for registration in matches:
                old = registration.project(old_row)
                removals.append((registration.handler, Change.delete(registration.row_id(old), old)))
        for matches, state, old_row, written in flush.updates:
            nearest, instance = matches[0], state.obj()
            # The columns this UPDATE did not set hold what the database held (the instance's loaded
            # values may be stale); those it set, or the database set with it, are the instance's.
            new_row = {
                key: nearest.instance_value(instance, key)
                if key in written or key in nearest.server_changed
                else old_row[key]
                for key in nearest.columns
            }
            for registration in matches:
                old, new = registration.project(old_row), registration.project(new_row)
                old_id, new_id = registration.row_id(old), registration.row_id(new)
                if old_id != new_id:  # items are keyed by id: the old id's go, the new id's come
                    removals.append((registration.handler, Change.delete(old_id, old)))
                    additions.append((registration.handler, Change.insert(new_id, new)))
                elif old != new:
                    updates.append((registration.handler, Change.update(new_id, old, new)))
        for matches, state in flush.additions:
            nearest, instance = matches[0], state.obj()
            new_row = {key: nearest.instance_value(instance, key) for key in nearest.columns}
            for registration in matches:
                new = registration.project(new_row)
                additions.append((registration.handler, Change.insert(registration.row_id(new), new)))
        changes = [*removals, *updates, *additions]
        if changes:
            self._check_changes(changes)
            self._queue(session).extend((transaction, handler, change) for handler, change in changes)

    def _check_changes(self, changes: list[tuple[ChangeHandler, Change]]) -> None:
        """Extract the items of every change now, in the flush, so that a row the aggregates cannot
        take (a bad id, a naive datetime key, a Decimal value, a failing function) fails the flush,
        which rolls the SQL transaction back, instead of failing after the SQL commit."""
        definitions: dict[ChangeHandler, list[Definition]] = {}
        try:
            for handler, change in changes:
                if handler not in definitions:
                    definitions[handler] = [handler.definition(name) for name in handler.aggregates()]
                id_bytes = encode_id(change.id)
                for definition in definitions[handler]:
                    for row in (change.old, change.new):
                        if row is not None:
                            definition.coordinates(row, change.id, id_bytes)
        except Exception as exc:
            exc.add_note(
                "tallytree.sqlalchemy: refused in the flush, before the SQL commit: roll the session "
                "back; nothing reached SQL or tallytree"
            )
            raise

    def _after_soft_rollback(self, session: Any, previous_transaction: Any) -> None:
        session.info.pop((_FLUSH, self), None)
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

    def _before_commit(self, session: Any) -> None:
        # The changes are applied in a tallytree write transaction after the SQL commit; one already
        # open in this thread would make that fail after the SQL commit. Refuse now, while nothing
        # is committed. (Fired for a SAVEPOINT's release too, which applies nothing.)
        if session.in_nested_transaction() or not getattr(self._db._local, "writing", False):
            return
        pending = [*session.new, *session.dirty, *session.deleted]
        if session.info.get(self._queue_key()) or any(self._matching(type(each)) for each in pending):
            raise TransactionError(
                "session.commit() inside `with db.write()` in the same thread: the changes reach "
                "tallytree in a write transaction of their own after the SQL commit, which cannot open "
                "here; commit after the `with` block (nothing was committed: the session's transaction "
                "is still open)"
            )

    def _after_commit(self, session: Any) -> None:
        # SQLAlchemy fires after_commit when a SAVEPOINT is released too; the SAVEPOINT's transaction
        # is still the session's nested transaction then (it closes after this event), and its changes
        # stay queued, tagged with it, until the outermost commit or a rollback that encloses it.
        if session.in_nested_transaction():
            return
        queue = session.info.pop(self._queue_key(), None)
        if not queue:
            return
        try:
            with self._db.write() as tx:
                for _, handler, change in queue:
                    handler.apply(tx, change, idempotent=self._idempotent)
        except Exception as exc:
            exc.add_note(
                f"tallytree.sqlalchemy: the SQL transaction was committed and tallytree was not: it "
                f"lags by {len(queue)} change(s); run Sync.repair(session) in a fresh session"
            )
            raise

    def _after_transaction_end(self, session: Any, transaction: Any) -> None:
        # The outermost transaction ended: committed (the queue was applied and removed), rolled back
        # (dropped), or closed without either (session.close()): nothing queued may outlive it.
        if transaction.parent is None:
            session.info.pop(self._queue_key(), None)
            session.info.pop((_FLUSH, self), None)

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
                    if isinstance(tx, WriteTransaction):
                        report[name] = repair(tx, aggregate, rows, definition=definition)
                    else:
                        report[name] = verify(tx, aggregate, rows, definition=definition)
        return report
