"""SQLAlchemy integration: keep aggregates in sync with mapped classes, in the order SQL commits.

Needs the ``sqlalchemy`` extra (``pip install 'tallytree[sqlalchemy]'``, SQLAlchemy 2).

Design
======
:class:`Sync` registers mapped classes, each with a :class:`~tallytree.ChangeHandler` whose aggregates
are defined by the usual extractors over the row's column values (a dict of column attribute name to
value, but the columns ``register(exclude=...)`` leaves out). The rows come from the unit of work, row
by row, through the mapper events of each registered class's hierarchy, and from ORM bulk statements
(``do_orm_execute``, below); the session events, and the ``commit`` event of the engines the
sessions commit on, decide when they reach tallytree:

* ``before_flush`` (session) opens a record for the flush (the mapper events of sessions this Sync
  does not listen to find none and do nothing), and reads the OLD rows of the instances of
  registered classes the flush will update or delete, before any statement of the flush runs: from
  the database, by the primary key they have there, on the flush's own connection, in its
  transaction, ``SELECT ... FOR UPDATE`` (PostgreSQL, MySQL, Oracle lock the rows until the commit;
  SQLite ignores the clause: its writers are serialized, but pysqlite's default handling would run
  this read, the transaction's first statement, before its own ``BEGIN``, outside any transaction,
  where it could read a row as it was before another session's commit that the flush's UPDATE then
  waits for; so on SQLite a transaction not begun yet is begun first with ``BEGIN IMMEDIATE``, which
  waits for that commit: see :func:`_lock_for_writing`). One ``WHERE pk IN (...)`` statement per registered
  class (at most 500 keys each) for a single-column primary key; one by one otherwise. Not the
  session's copy: another session may have committed a change to the row since this one loaded it,
  and a mutable value edited in place (a ``MutableDict`` JSON column) has no old value in the
  history. Before any statement: a parent's new primary key that the database cascades (``ON UPDATE
  CASCADE``) must not show in the children's old rows, so the loaded children of a parent whose
  primary key changes are read too. An update that sets no registered column (only a collection
  changed) reads nothing;
* ``before_update`` / ``before_delete`` (mapper, fired for every row the flush writes: orphans deleted
  by ``delete-orphan``, cascaded deletes and rows updated through a relationship included) take the
  row read in ``before_flush``, or read it now when it was not known then (an orphan, an instance a
  later ``before_flush`` listener changed);
* ``after_insert`` / ``after_update`` / ``after_delete`` (mapper) note the row once its statement ran.
  The NEW row of an update is the old row with the columns the UPDATE set (those changed in the
  history, and those it sets itself: ``onupdate``, ``server_onupdate``, ``Computed``, the version
  counter) taken from the instance, so a stale loaded column is never written back into tallytree. An
  insert's new row is the instance's; it costs no query, but for server-generated values the flush
  did not fetch (``server_default``, ``Computed``: one SELECT loads them, unless ``eager_defaults``);
* a pending instance taking the primary key of one the flush deletes (SQLAlchemy's "row switch": one
  UPDATE, no delete events) removes the deleted row's items in ``before_insert``; the two may be
  instances of different classes of one hierarchy, registered or not (the listeners are those of
  the hierarchy's base class). A switch away from a registered joined-inheritance subclass is
  refused (InvalidArgumentError, nothing committed): SQLAlchemy would update only the new class's
  tables and leave the subclass's row behind, which ``select(Subclass)`` cannot load. So is an
  UPDATE of the polymorphic discriminator that turns the row into a class with other registered
  aggregates (SQLAlchemy fires the events of the instance's class only): delete it and add the new
  class's instance in one flush, a row switch, instead;
* ``after_flush`` (session) turns the flush's rows into :class:`~tallytree.Change` objects, queued on
  the session with the SQL transaction they belong to (and notes the session's connections, whose
  COMMIT will apply them): the removals first, then the updates, then the
  additions (a flush holds each old id and each new id once, and only a removal and an addition of the
  same id depend on their order); an update that changes the document id is a delete of the old id and
  an insert of the new one, since items are keyed by id. It also extracts every change's items now, so
  that a row the aggregates cannot take (an id, key or value of the wrong type, a function that fails)
  fails the flush, which rolls the SQL transaction back, instead of failing after the SQL commit. And
  it refuses (InvalidArgumentError) a flush writing a registered table through a class of another
  hierarchy (two classes mapped to one table): its rows are the registered class's rows, its events
  are not. And it refuses a flush with changes for an aggregate redefined since the handler
  registered it (SchemaMismatchError: another process, or another handler, registered another
  definition with ``redefine=True``; see ``_hooks``): restart the process with the new definition;
* ``after_soft_rollback`` (every rollback: of a SAVEPOINT, or of the whole transaction): the changes
  queued inside the rolled-back transaction (and the SAVEPOINTs in it) are dropped, so nothing reaches
  tallytree for a rolled-back transaction; a rolled-back SAVEPOINT drops only its own changes;
* ``do_orm_execute`` (session): ``session.execute()`` of an ORM ``insert()``, ``update()`` or
  ``delete()`` of a registered class is followed (see :meth:`Sync._bulk`): the primary keys of the
  rows it writes are selected with its criteria before it runs (FOR UPDATE), named by its parameters,
  or returned by the INSERT (``RETURNING``, added to it); the rows of those keys are read before and
  after it, and their difference is queued as the flush's changes are. What cannot be followed is
  refused before it runs (InvalidArgumentError, saying what to write instead): an INSERT that neither
  names nor can return its keys, an upsert that may update (``ON CONFLICT DO UPDATE``), a statement
  on a class with registered subclasses or on a registered table through another class, and a Core
  statement on a registered table through ``session.execute()``; and what turns out wrong after it
  ran (a WHERE statement that wrote another number of rows than it matched a moment before, an
  UPDATE that moved a row to another primary key) raises TransactionError and makes the session's
  commit refused until it rolls back. A SELECT costs three attribute tests;
* ``before_commit``: a commit with changes to apply inside ``with db.write()`` in the same thread, or
  once the database is closed, is refused (TransactionError) before anything is committed: the
  tallytree write held across the SQL commit could not open. So is a commit (or, in ``after_flush``,
  a flush) with changes for an aggregate a handler still registers that ``db.drop_aggregate``
  dropped in this process: ``handler.detach(name)`` first (the queued changes skip it then), and one
  with changes for an aggregate redefined since its handler registered it, by any process. A drop
  cannot be refused instead, as tables refuse it: handlers are plain objects with no close, so the
  database cannot tell a live handler from one the program let go of (a Sync's handlers live in
  reference cycles until the garbage collector runs);
* ``commit`` (engine: fired when a connection is about to send COMMIT, after every ``before_commit``
  listener and the commit's last flush): when it is the COMMIT of a session with changes queued,
  the tallytree write transaction is opened (waiting for the writer lock, LMDB's, which serializes
  writers across threads and processes) and the changes are applied in it, in order, as one batch
  (the path of ``ChangeHandler.apply_many``: checked first, then written per tree in sorted merges),
  with ``idempotent=True`` by default; the write stays open, holding the lock, while SQL commits. A
  change that fails (strict mode, on drift) aborts it and raises: the COMMIT is not sent, nothing is
  committed anywhere. ``handle_error`` (engine): a COMMIT that fails aborts that write at once (the
  session fires nothing until it is rolled back or closed);
* ``after_commit`` (inserted first among the session's listeners): the write held across the SQL
  commit is committed. So the tallytree commits of sessions with changes happen in the order of their
  SQL commits: a session's SQL COMMIT happens while it holds the writer lock, which the next one takes
  only after this commit. SQLAlchemy fires ``after_commit`` for a released SAVEPOINT too, and then
  nothing happens: the SAVEPOINT's changes stay queued with the enclosing transaction, and go with it
  if it rolls back. Changes still queued at the outermost ``after_commit`` (``Sync(ordered=False)``; a
  session joined to a connection whose transaction its caller ends later, ``join_transaction_mode``,
  which sends no COMMIT; a two-phase commit) are applied then, in a write transaction of their own,
  after the SQL commit and without the ordering;
* ``after_soft_rollback`` and ``after_transaction_end`` of the outermost transaction also abort a write
  still held (the COMMIT failed); at the end of the outermost transaction whatever is still queued is
  dropped (a ``session.close()`` ends the transaction without a rollback event), so a session used
  again after a close starts with an empty queue.

Ordering, and its limits. Two sessions changing the same row reach tallytree in the order SQL committed
them, and each change starts from the row as the previous commit left it: its old row is read in its
flush with the row locked (FOR UPDATE; SQLite's write lock, taken before the read), so no other
transaction commits a change to the row between that read and this commit, and the previous commit's
tallytree write was committed before this commit's opens. This needs: row locks from ``FOR UPDATE``
(PostgreSQL, MySQL/MariaDB InnoDB, Oracle), or SQLite through pysqlite (or a driver that
begins its transaction before the first read); a database whose ``FOR UPDATE`` locks nothing may hand a
change a stale old row: strict mode then refuses the commit (nothing committed), idempotent mode may
leave drift for verify. No deadlock arises from the lock order: a session takes the writer lock only
after its flushes (its row locks, SQLite's write lock) and while holding it waits only for its own
COMMIT, which waits for no row lock; but SQL that waits for a row lock while holding the writer lock
can deadlock with a session that holds the row and waits for the writer: a ``db.write()`` block that
writes SQL rows other sessions change, a COMMIT that checks deferred constraints against rows another
transaction holds (PostgreSQL ``DEFERRABLE`` constraints: set ``lock_timeout``). The writer lock is
held for the length of the SQL COMMIT, so the commits of sessions with changes are serialized
(SQLite's are anyway). Green threads (gevent, eventlet) and asyncio run many sessions in one OS
thread, and the write is held while the COMMIT waits for I/O: under asyncio a second session's
commit meanwhile is refused (a write is open in the thread), under gevent it would block the thread
on LMDB's lock, a deadlock (neither is tested here). Use ``Sync(db, ordered=False)`` there: it
applies each commit's changes after its SQL commit, without holding anything across it, and without
the ordering (run verify on a schedule).

Each :class:`Sync` keeps its own queue per session, so several can listen to the same sessions (each
reads the old rows it needs). An instance of a subclass of a registered class (single-table or joined
inheritance) is a row of the registered class, as ``select(Registered)`` returns it: its changes reach
the aggregates of every registered class it is an instance of, the columns of all of them read in one
SELECT.

Listeners: the session listeners go on the targets given to :meth:`Sync.listen`; the mapper listeners
(one set per registered hierarchy) are installed while the Sync listens to any target, and hold it
weakly. :meth:`Sync.remove` of the last target, or :meth:`Sync.close`, removes them all, and nothing
SQLAlchemy holds keeps a Sync that listens to nothing alive. :meth:`Sync.unregister` of the last
registered class of a hierarchy removes that hierarchy's; its aggregates are detached from its handler
(``handler.detach(name)`` stops syncing one aggregate: nothing extracts, applies, verifies or repairs
it from then on).

Columns a ``relationship(post_update=True)`` writes (its foreign key, and the ``onupdate`` /
``server_onupdate`` / ``Computed`` / version columns of the table its extra UPDATE writes) cannot be
followed: that UPDATE fires no mapper event, and before a DELETE it runs before the old row can be
read. :meth:`Sync.register` refuses them (and the first flush does, for a relationship mapped after
the register), naming them: leave them out with ``exclude=``. A value a database trigger writes is
followed only if its column says so (``server_default=FetchedValue()`` /
``server_onupdate=FetchedValue()``), as SQLAlchemy itself needs.

Cost: the old rows of a flush's updated and deleted rows (those whose registered columns change) in
one SELECT per registered class, on the flush's connection (an index lookup per row; on PostgreSQL
row locks the UPDATE takes anyway; on SQLite a ``BEGIN IMMEDIATE`` before it); none for an insert.
Measured on SQLite (a file, 1,000 rows, medians of 40 alternating rounds in one process, five runs on
a shared 2-core machine), a flush updating 100 rows took 0.51 to 0.77 times as long as with one
SELECT per row (e.g. 11.0 ms against 16.5 ms, and 5.8 ms without a Sync; the whole commit 0.70 to
0.84 times); a one-row flush, read by its own event as before, is not slower (0.88 times, within the
noise; 0.6 to 0.7 ms). An ORM bulk statement: one SELECT of its primary keys (an UPDATE or DELETE
with criteria), and the rows read by primary key before and after it (500 keys per statement). The
ordering: 1,000 sessions committing one insert each (SQLite file, LMDB, five alternating runs of
each) took 1.03 to 1.09 times as long as when the changes were applied after the SQL commit
(median 1.07, about 50 us a commit, most of it SQLAlchemy dispatching engine events at all: an
empty engine ``commit`` listener costs the old code about 40 us) with SQLite's and tallytree's
fsyncs off, and the same within the noise of the fsyncs with them on (0.88 to 1.23, median 1.04;
1.5 to 1.8 ms a commit).
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

The crash window: the SQL commit and the tallytree commit are two commits. The changes are applied
before the SQL COMMIT (a change that fails refuses it), and committed to tallytree right after it. If
the process dies between the two, or the tallytree commit itself fails (a disk error), those changes
are in SQL but not in tallytree; a failed tallytree commit raises from ``session.commit()`` after the
SQL commit, its exception noting that SQL committed and tallytree lags (close that session:
SQLAlchemy refuses further SQL in it). Nothing is lost for good: :meth:`Sync.verify` compares every
aggregate with a query over the table and reports the drift, and :meth:`Sync.repair` fixes it (one
transaction per registered class); run it at startup, after a crash, or on a schedule (it reports zero
drift when nothing went wrong).

Not seen either, since neither a mapper event nor ``do_orm_execute`` fires for them (verify reports
their drift, repair fixes it): ``bulk_save_objects``, ``bulk_insert_mappings``, ``bulk_update_mappings``
(legacy: use ``session.execute(insert(Model), [...])`` / ``update(Model)``, which are followed),
statements run on a connection (``session.connection().execute(...)``, ``engine.connect()``),
``text()`` statements, rows the database changes itself (``ON DELETE CASCADE`` / ``SET NULL`` with
``passive_deletes=True``, ``ON UPDATE CASCADE`` of children not loaded, triggers), sessions this Sync
does not listen to, and other programs: repair after them.

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
        session.commit()                      # tallytree commits with each SQL commit, in its order

    with db.read() as tx:
        by_status.count(tx, namespace=1, eq="open"), by_status.totals(tx, namespace=1).total  # (1, 12)

    with Session(engine) as session:          # after a crash, or on a schedule
        drift = sync.repair(session)          # {"invoices": Drift(...)}; drift["invoices"].ok

    sync.close()                              # at shutdown: removes every listener it installed
"""

from __future__ import annotations

import copy
import datetime
import functools
import importlib
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._args import check_flag
from ._extract import Definition, Extractor, OnMissing, Where
from ._hooks import (
    Change,
    ChangeHandler,
    Drift,
    apply_changes,
    confirm_registered,
    not_registered,
    repair,
    verify,
)
from ._keys import encode_id
from .errors import ArgumentTypeError, InvalidArgumentError, SchemaMismatchError, TransactionError

if TYPE_CHECKING:
    from ._aggregate import Aggregate
    from ._db import Database

__all__ = ["Sync"]

_QUEUE = "tallytree.changes"
_FLUSH = "tallytree.flush"
_WRITE = "tallytree.write"  # session.info[(_WRITE, db)]: the _Pending write of the session's commit
_BROKEN = "tallytree.broken"  # session.info[(_BROKEN, sync)]: (transaction, why its commit is refused)
# Dialects whose drivers load DateTime(timezone=True) columns back as naive datetimes (no offset stored).
_NAIVE_DIALECTS = frozenset({"sqlite", "mysql", "mariadb"})
_KEY_TYPES = (int, float, str, bytes, datetime.datetime)  # bool is an int; tuples come from several columns
_ID_TYPES = (int, str, bytes)
_ABSENT: Any = object()  # no prefetched old row: read it
_CHUNK = 500  # primary keys per batched old-row SELECT (SQLite allows 999 parameters before 3.32)
_MAPPER_EVENTS = (
    "before_insert",
    "after_insert",
    "before_update",
    "after_update",
    "before_delete",
    "after_delete",
)

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


def _identity(value: Any) -> Any:
    return value


def _lock_for_writing(connection: Any) -> None:
    """Make the transaction of ``connection`` a writer before it reads rows it is about to write.

    pysqlite's default ("legacy") transaction handling emits its ``BEGIN`` only before the first
    INSERT, UPDATE or DELETE, so a flush's first statement, the read of its old rows, would run
    outside any transaction: it could read a row as it was before another session's commit that its
    UPDATE then waits for, and the change would start from a stale old row. ``BEGIN IMMEDIATE`` takes
    SQLite's write lock first (waiting for the other writer's commit, as the UPDATE would a moment
    later), so the old rows read are the ones the UPDATE replaces. Nothing for other dialects (their
    ``SELECT ... FOR UPDATE`` locks the rows), a transaction already begun, or a driver in autocommit
    mode (``isolation_level=None``, or Python 3.12's ``autocommit=``). O(1)."""
    if connection.dialect.name != "sqlite":
        return
    driver = getattr(connection.connection, "driver_connection", None)
    if (
        getattr(driver, "in_transaction", True)
        or getattr(driver, "isolation_level", None) is None
        or getattr(driver, "autocommit", -1) != -1  # sqlite3.LEGACY_TRANSACTION_CONTROL
    ):
        return
    level = str(getattr(driver, "isolation_level", "")).upper()
    connection.exec_driver_sql("BEGIN EXCLUSIVE" if level == "EXCLUSIVE" else "BEGIN IMMEDIATE")


def _describe(identity: Sequence[Any]) -> str:
    """A primary key for a message: ``7``, or ``(7, 'a')`` for a composite one."""
    return repr(identity[0]) if len(identity) == 1 else repr(tuple(identity))


def _snapshot(value: Any) -> Any:
    """A copy of a mutable value (a JSON dict or list), so that later in-place edits of the instance's
    value do not rewrite a change queued for the commit."""
    return copy.deepcopy(value) if isinstance(value, dict | list | set) else value


class _Registration:
    """A registered mapped class: its column attributes, id, and how its old rows are read."""

    __slots__ = (
        "aware_keys",
        "column_objects",
        "columns",
        "excluded",
        "floats",
        "handler",
        "id",
        "id_as_str",
        "mapper",
        "model",
        "primary_key_index",
        "python_types",
        "select",
        "select_many",
        "server_changed",
        "updated_by",
        "written_by",
    )

    def __init__(
        self,
        db: Database,
        model: type,
        id: str | Callable[[dict[str, Any]], Any] | None,
        exclude: Sequence[str] = (),
    ) -> None:
        sqlalchemy = _sqlalchemy()
        mapper = sqlalchemy.inspect(model)
        self.model = model
        self.mapper = mapper
        if isinstance(exclude, str) or not all(isinstance(key, str) for key in exclude):
            raise ArgumentTypeError(
                f"exclude= takes a tuple of column attribute names, not {exclude!r}; e.g. exclude=('notes',)"
            )
        every = [attribute.key for attribute in mapper.column_attrs]
        primary_key = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
        for key in exclude:
            if key not in every:
                raise InvalidArgumentError(
                    f"exclude=: {model.__name__} has no column attribute {key!r} (columns: {every})"
                )
            if key in primary_key or key == id:
                raise InvalidArgumentError(
                    f"exclude=: {model.__name__}.{key} is the primary key or the id; the old rows are read "
                    "by primary key and items are keyed by id: keep it"
                )
        self.excluded = frozenset(exclude)
        attributes = [attribute for attribute in mapper.column_attrs if attribute.key not in self.excluded]
        self.columns: list[str] = [attribute.key for attribute in attributes]
        # The table columns the documents come from: a write of one of them is a write of the documents.
        self.column_objects = frozenset(column for attribute in attributes for column in attribute.columns)
        self.python_types = {attribute.key: _python_type(attribute.columns[0]) for attribute in attributes}
        # Columns the UPDATE itself may change (onupdate=, server_onupdate=, Computed, a version
        # counter): after an UPDATE their new values are the instance's (fetched or expired), not the
        # old row's.
        self.server_changed = frozenset(
            attribute.key
            for attribute in attributes
            if any(
                column.onupdate is not None
                or column.server_onupdate is not None
                or column is mapper.version_id_col
                for column in attribute.columns
            )
        )
        # The attributes whose change makes the flush write a registered column (the column's own, and
        # a many-to-one relationship's, whose foreign key the flush sets), or the row at all.
        many_to_one = [
            relationship
            for relationship in mapper.relationships
            if relationship.direction.name == "MANYTOONE"
        ]
        self.written_by = frozenset(self.columns) | {
            relationship.key
            for relationship in many_to_one
            if any(column in self.column_objects for column in relationship.local_columns)
        }
        self.updated_by = frozenset(every) | {relationship.key for relationship in many_to_one}
        # A Float column given an int loads back as a float, and 5 and 5.0 are distinct keys.
        self.floats = frozenset(key for key, kind in self.python_types.items() if kind is float)
        self.aware_keys: list[tuple[str, str]] = []  # (aggregate, column): DateTime(timezone=True) keys
        if id is None:
            if len(primary_key) != 1:
                raise InvalidArgumentError(
                    f"{model.__name__} has a composite primary key {primary_key}; pass id= (a column name "
                    "or a function of the row giving a str, int or bytes)"
                )
            id = primary_key[0]
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
        where = [
            column == sqlalchemy.bindparam(f"pk{index}") for index, column in enumerate(mapper.primary_key)
        ]
        columns = [getattr(model, key) for key in self.columns]
        self.select = sqlalchemy.select(*columns).where(*where).with_for_update()
        # The old rows of several updates or deletes of one flush in one statement (a single-column
        # primary key; chunked): WHERE pk IN (...), FOR UPDATE too.
        self.primary_key_index: int | None = None
        self.select_many = None
        if len(primary_key) == 1:
            self.primary_key_index = self.columns.index(primary_key[0])
            self.select_many = (
                sqlalchemy.select(*columns)
                .where(mapper.primary_key[0].in_(sqlalchemy.bindparam("pks", expanding=True)))
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
        _lock_for_writing(connection)
        values = connection.execute(
            self.select, {f"pk{i}": value for i, value in enumerate(identity)}
        ).first()
        return None if values is None else dict(zip(self.columns, values, strict=True))

    def read_many(self, connection: Any, identities: Sequence[Sequence[Any]]) -> dict[Any, Row]:
        """The rows of these (single-column) primary keys the database holds now, by primary key value,
        in ``connection``'s transaction, FOR UPDATE; a key the result lacks is gone, or compares
        differently in Python and SQL (a case-insensitive collation): read it alone."""
        assert self.select_many is not None and self.primary_key_index is not None
        _lock_for_writing(connection)
        rows: dict[Any, Row] = {}
        keys = [identity[0] for identity in identities]
        for start in range(0, len(keys), _CHUNK):
            for values in connection.execute(self.select_many, {"pks": keys[start : start + _CHUNK]}):
                rows[values[self.primary_key_index]] = dict(zip(self.columns, values, strict=True))
        return rows

    def read_rows(
        self, connection: Any, identities: Sequence[tuple[Any, ...]], *, gone: bool = False
    ) -> dict[tuple[Any, ...], Row]:
        """The rows of these primary keys the database holds now, by primary key tuple, FOR UPDATE: in
        ``WHERE pk IN (...)`` statements for a single-column primary key, one by one otherwise. A key
        the batch lacks is read alone (a collation may compare it differently), unless ``gone`` (the
        rows are expected to be gone: a key the batch lacks is). O(rows)."""
        if not identities:
            return {}
        found: dict[tuple[Any, ...], Row] = {}
        if self.select_many is not None and len(identities) > 1:
            for key, row in self.read_many(connection, identities).items():
                found[(key,)] = row
            if gone:
                return found
        for identity in identities:
            if identity not in found:
                alone = self.read(connection, identity)
                if alone is not None:
                    found[identity] = alone
        return found

    def post_updated(self) -> dict[str, str]:
        """The registered columns that a relationship with ``post_update=True`` (of any class mapped in
        this class's registry) may write in its extra UPDATE, each with that relationship's name.

        That UPDATE fires no mapper event, sets the foreign key and whatever the UPDATE itself sets
        (``onupdate=``, ``server_onupdate=``, ``Computed``, the version counter) of the table it writes,
        and before a DELETE it runs before the old row can be read: no value it writes can be followed."""
        tables = set(self.mapper.tables)
        found: dict[str, str] = {}
        for other in self.mapper.registry.mappers:
            for relationship in other.relationships:
                if not relationship.post_update:
                    continue
                for _, written in relationship.synchronize_pairs:  # (source, the foreign key written)
                    if written.table not in tables:
                        continue
                    changed = [written] + [
                        column
                        for column in written.table.columns
                        if column.onupdate is not None
                        or column.server_onupdate is not None
                        or column is self.mapper.version_id_col
                    ]
                    for column in changed:
                        if column in self.column_objects:
                            key = self.mapper.get_property_by_column(column).key
                            found.setdefault(key, f"{other.class_.__name__}.{relationship.key}")
        return found

    def refuse_post_updates(self) -> None:
        """Raise InvalidArgumentError when a registered column may be written by a post_update."""
        found = self.post_updated()
        if found:
            relationships = sorted(set(found.values()))
            raise InvalidArgumentError(
                f"{self.model.__name__}: the column(s) {sorted(found)} may be written by the extra UPDATE "
                f"of the relationship(s) {relationships} (post_update=True), which fires no mapper event "
                "(and, before a DELETE, runs before the old row can be read): the aggregates would "
                "drift; leave them out of the documents with "
                f"register({self.model.__name__}, exclude={tuple(sorted(found))!r}), or drop "
                "post_update=True"
            )

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
    ) -> list[tuple[str, str]]:
        """Refuse, before the aggregate exists, a column named as a key, namespace or value field whose
        type the aggregate cannot take as SQLAlchemy loads it (functions are checked row by row).
        Return the ``(aggregate, column)`` pairs of its ``DateTime(timezone=True)`` key and namespace
        columns, for :attr:`aware_keys` once the aggregate is registered."""
        model = self.model.__name__
        aware: list[tuple[str, str]] = []
        roles: list[tuple[str, str, Any]] = [("key", name, key), ("namespace", name, namespace)]
        if isinstance(values, Mapping):
            roles += [("value", field, spec) for field, spec in values.items()]
        elif not isinstance(values, str):
            roles += [("value", field, field) for field in values]
        for role, _, spec in roles:
            for column in spec if isinstance(spec, tuple) else (spec,):
                if not isinstance(column, str):
                    continue
                if column in self.excluded:
                    raise InvalidArgumentError(
                        f"{name}: {model}.{column} (the {role} {spec!r}) was left out of the documents "
                        "(register(exclude=...))"
                    )
                if column not in self.python_types:
                    raise InvalidArgumentError(
                        f"{name}: {model} has no column attribute {column!r} (the {role} {spec!r}); "
                        f"columns: {self.columns}"
                    )
                problem = self._problem(role, column)
                if problem:
                    raise ArgumentTypeError(f"{name}: {model}.{column}, used as a {role}, {problem}")
                if role != "value" and self._aware_datetime(column):
                    aware.append((name, column))
        return aware

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
        redefine: bool = False,
    ) -> Aggregate:
        """:meth:`tallytree.ChangeHandler.aggregate`, refusing first (ArgumentTypeError, with a hint)
        a column named as a key or namespace, or as a value field, whose type SQLAlchemy loads as
        something the aggregate cannot take: a naive datetime (DateTime without timezone), a
        Decimal (Numeric), a uuid, a date... Functions of the row are checked in each flush, before
        the SQL commit. InvalidArgumentError for a name that is no column attribute."""
        registration = self._registration
        aware = registration.check_definition(name, key, namespace, values)
        aggregate = super().aggregate(
            name,
            key=key,
            namespace=namespace,
            values=values,
            where=where,
            node_size=node_size,
            on_missing=on_missing,
            redefine=redefine,
        )
        # the definition given last is the one kept (also when it replaces an earlier one)
        registration.aware_keys = [pair for pair in registration.aware_keys if pair[0] != name] + aware
        return aggregate

    def detach(self, name: str) -> Aggregate:
        """:meth:`tallytree.ChangeHandler.detach`: the flushes of the registered class stop extracting,
        checking and applying the aggregate's items (changes already queued included), and
        :meth:`Sync.verify` and :meth:`Sync.repair` stop covering it."""
        aggregate = super().detach(name)
        registration = self._registration
        registration.aware_keys = [pair for pair in registration.aware_keys if pair[0] != name]
        return aggregate


class _Flush:
    """What one flush wrote, gathered by the mapper events, turned into changes by ``after_flush``."""

    __slots__ = ("additions", "old", "prefetched", "removals", "switched", "updates")

    def __init__(self) -> None:
        # state -> (old row or None when gone, the registered columns the UPDATE sets)
        self.old: dict[Any, tuple[Row | None, frozenset[str]]] = {}
        self.removals: list[tuple[tuple[_Registration, ...], Row]] = []
        self.updates: list[tuple[tuple[_Registration, ...], Any, Row, frozenset[str]]] = []
        self.additions: list[tuple[tuple[_Registration, ...], Any]] = []
        self.switched: set[Any] = set()  # the new instances of row switches (see _before_insert)
        # state -> old row (None when gone), read in before_flush (see Sync._prefetch) and taken by the
        # state's own before_update / before_delete (or by the row switch that replaces it).
        self.prefetched: dict[Any, Row | None] = {}


class _Pending:
    """The tallytree write transaction of a session's commit: opened once the commit has flushed (it
    waits for the writer lock, LMDB's, across threads and processes), given the commit's changes,
    and held across the SQL commit; committed in ``after_commit``, aborted on a rollback, on the end
    of the transaction, or when the SQL commit fails (``handle_error``). Shared by the Syncs of one
    database listening to the session (``session.info[(_WRITE, db)]``)."""

    __slots__ = ("changes", "connections", "context", "tx")

    def __init__(self, db: Database) -> None:
        self.context: Any = db.write()
        self.tx = self.context.__enter__()  # waits while another writer holds the lock
        self.connections: frozenset[Any] = frozenset()  # the SQL connections whose commit it follows
        self.changes = 0

    @property
    def open(self) -> bool:
        return self.context is not None

    def commit(self) -> None:
        context, self.context = self.context, None
        if context is not None:
            context.__exit__(None, None, None)

    def abort(self) -> None:
        context, self.context = self.context, None
        if context is not None:
            try:
                self.tx.abort()
            finally:
                context.__exit__(None, None, None)  # the transaction has ended: this releases the lock


def _connections_of(session: Any) -> frozenset[Any]:
    """The SQL connections of the session's outermost transaction, whose commit it is (SQLAlchemy
    keeps them in ``SessionTransaction._connections``: bind -> (connection, transaction, ...))."""
    connections = getattr(session.get_transaction(), "_connections", None) or {}
    return frozenset(value[0] for value in connections.values())


def _refuse_dropped(handler: ChangeHandler) -> None:
    """TransactionError for an aggregate the handler syncs that was dropped since (``db.drop_aggregate``
    in this process), SchemaMismatchError for one redefined since: the tallytree write after the SQL
    commit would fail. Raised in the flush and before the commit instead, while SQL can still roll
    back. O(aggregates of the handler)."""
    for definition in handler._definitions.values():
        gone = definition.aggregate._dropped  # "aggregate 'x' was dropped", or "... was redefined (...)"
        if gone is not None:
            db = handler._db
            if not db._closed:  # redefined (by a handler of any process): say how
                with db.read() as tx:
                    error = not_registered(tx, definition)
                if isinstance(error, SchemaMismatchError):
                    raise error
            name = definition.name
            registration = getattr(handler, "_registration", None)
            model = registration.model.__name__ if registration is not None else "the class"
            raise TransactionError(
                f"{gone} while the Sync still syncs {model} into it, so the tallytree write after the "
                f"SQL commit would fail; stop syncing it first: handler.detach({name!r}) (changes "
                f"queued already skip it then) or sync.unregister({model}); or register it again (with "
                "the definition stored now) to sync into the new aggregate"
            )


def _engine_hooks(sync: weakref.ref[Sync]) -> list[tuple[str, Callable[[Any], None]]]:
    """An engine's ``commit`` and ``handle_error`` listeners, holding their Sync weakly (see
    :meth:`Sync._watch`)."""

    def commit(connection: Any) -> None:
        live = sync()
        if live is not None:
            live._on_commit(connection)

    def handle_error(context: Any) -> None:
        live = sync()
        if live is not None:
            live._on_error(context)

    return [("commit", commit), ("handle_error", handle_error)]


def _mapper_hook(sync: weakref.ref[Sync], name: str) -> Callable[[Any, Any, Any], None]:
    """A mapper event listener that holds its Sync weakly: the mapper registry, which keeps listeners
    for good, must not keep a Sync (and its database) alive; a Sync that is gone does nothing."""

    def hook(mapper: Any, connection: Any, target: Any) -> None:
        live = sync()
        if live is not None:
            live._on_row(name, connection, target)

    return hook


def _with_definitions(
    entries: Iterable[tuple[Any, ChangeHandler, Change]],
) -> Iterator[tuple[tuple[Definition, ...], Change]]:
    """Each queued change with the definitions of the handler that queued it (read once per handler,
    when its first change is applied), as ``apply_changes`` takes them. O(1) per change."""
    definitions: dict[ChangeHandler, tuple[Definition, ...]] = {}
    for _, handler, change in entries:
        known = definitions.get(handler)
        if known is None:
            known = definitions[handler] = tuple(handler._definitions.values())
        yield known, change


class Sync:
    """Applies the changes of registered mapped classes to tallytree with each SQL commit, in the order
    SQL commits them.

    Listens to the sessions given to :meth:`listen`, to the mapper events of the registered classes
    while it listens to any, and to the ``commit`` and ``handle_error`` events of the engines those
    sessions commit changes on; :meth:`close` (or the end of a ``with Sync(db) as sync:`` block)
    removes every listener it installed.

    ``idempotent=True`` (the default) applies each change as ``ChangeHandler.apply(...,
    idempotent=True)`` does: an old item already gone, or a new one already there, is fine (tallytree
    catching up after a crash). ``idempotent=False`` is strict: a change whose old item tallytree does
    not hold (drift) raises, and the SQL commit does not happen. ``ordered=True`` (the default) applies
    a commit's changes just before its SQL COMMIT and commits them just after it, holding tallytree's
    writer lock across it, so that commits reach tallytree in SQL's order; ``ordered=False`` applies
    them after the SQL commit, in a write of their own, for green threads and asyncio (see the module
    docstring, "Ordering"). Raises ArgumentTypeError for a flag that is not a bool.

    Example::

        sync = Sync(db)                    # strict: Sync(db, idempotent=False)
        sync.register(Invoice).aggregate("by_status", key="status", values=("total",))
        sync.listen(Session)
    """

    def __init__(self, db: Database, *, idempotent: bool = True, ordered: bool = True) -> None:
        check_flag(idempotent, "idempotent")
        check_flag(ordered, "ordered")
        self._db = db
        self._idempotent = idempotent
        self._ordered = ordered
        # The engines whose commit and handle_error events this Sync listens to (see _watch), with
        # the listeners; the connections of the sessions with changes queued, each with its session
        # (weakly: a connection object lasts one session transaction); and, per thread, the writes
        # held across an SQL commit (``writes``).
        self._engines: weakref.WeakKeyDictionary[Any, list[tuple[str, Callable[[Any], None]]]] = (
            weakref.WeakKeyDictionary()
        )
        self._committing: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()
        self._held = threading.local()
        self._registrations: dict[type, _Registration] = {}
        # The registrations an instance of a class reaches: every registered class in its MRO, nearest
        # first; cached per class, cleared by register.
        self._matches: dict[type, tuple[_Registration, ...]] = {}
        # The session targets listened to: weak references where the target allows one (a session
        # that is gone took its listeners with it).
        self._targets: list[Callable[[], Any]] = []
        # The mapper listeners installed, per base class of each registered class's hierarchy: one set
        # per hierarchy sees every row written through any of its classes (see _on_row).
        self._hooks: dict[type, list[tuple[str, Callable[..., None]]]] = {}
        # Mapped classes outside the registered hierarchies that map a registered table (their writes
        # are refused in the flush), by base mapper; computed at the first flush after a change.
        self._foreign: dict[Any, list[tuple[_Registration, frozenset[Any]]]] = {}
        self._discriminators: dict[Any, str | None] = {}
        # The tables of the registered classes, each with a registered class mapping it (for Core
        # statements on them; computed with _foreign).
        self._tables: dict[Any, _Registration] = {}
        self._checked = False
        self._closed = False

    def __enter__(self) -> Sync:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def register(
        self,
        model: type,
        *,
        id: str | Callable[[dict[str, Any]], Any] | None = None,
        exclude: Sequence[str] = (),
    ) -> ChangeHandler:
        """Register a mapped class; return its ChangeHandler, on which to define the aggregates.

        Documents are dicts of the class's column attributes, but those named in ``exclude``. ``id``
        names the column (or function of the row) giving the document id; by default the single
        primary key column. A ``Uuid`` id column gives its canonical ``str`` (in every change, and in
        verify and repair). Instances of the class's mapped subclasses are its rows too
        (``select(model)`` returns them). While the Sync listens to sessions, it listens to the mapper
        events of the class's hierarchy (they do nothing for sessions it does not listen to). The
        handler's ``aggregate()`` refuses columns whose loaded type the aggregate cannot take (see the
        module docstring). O(columns + relationships of the mapped classes).

        Raises InvalidArgumentError for a composite primary key without ``id``, an ``id`` or
        ``exclude`` name that is no column attribute, an excluded primary key or id, a column that a
        ``post_update=True`` relationship may write (its extra UPDATE fires no event: exclude it, as the
        message says), and a class mapped to a table that a registered class of another hierarchy
        maps too (each would see only the writes through its own class); ArgumentTypeError for an id
        column that loads as neither str, int, bytes nor uuid (pass ``id=`` a function);
        TransactionError after :meth:`close`.

        Example::

            handler = sync.register(Invoice, exclude=("notes",))
            handler.aggregate("by_status", key="status", values=("total",))
        """
        self._refuse_closed("register")
        if model in self._registrations:
            return self._registrations[model].handler
        registration = _Registration(self._db, model, id, exclude)
        registration.refuse_post_updates()
        for other in self._registrations.values():
            shared = set(registration.mapper.tables) & set(other.mapper.tables)
            if shared and other.mapper.base_mapper is not registration.mapper.base_mapper:
                raise InvalidArgumentError(
                    f"{model.__name__} and the registered {other.model.__name__} both map the table(s) "
                    f"{sorted(table.name for table in shared)} without one inheriting from the other: "
                    "each would count every row of the table and see only the writes through its own "
                    "class; register one of them and write the table only through it"
                )
        self._registrations[model] = registration
        self._matches.clear()
        self._checked = False
        if self._live_targets():
            self._install()
        return registration.handler

    def unregister(self, model: type) -> None:
        """Stop syncing a registered class: the counterpart of :meth:`register`.

        Its handler detaches every aggregate (:meth:`tallytree.ChangeHandler.detach`): they keep
        their items, the flushes of the class stop extracting and applying its changes (those a
        session already flushed and commits later included: as for :meth:`close`, call it when no
        session it listens to has such a transaction in flight, or repair after), and :meth:`verify`
        and :meth:`repair` stop covering them. The mapper listeners of the class's hierarchy are
        removed once no registered class is left in it. The other registered classes (a registered
        base or subclass of ``model`` too) go on as before. To sync the class again, :meth:`register`
        it and define its aggregates anew, then :meth:`repair` the changes made meanwhile. Like
        :meth:`remove`, call it while no session it listens to is flushing. O(registered classes +
        aggregates of ``model``).

        Raises InvalidArgumentError for a class that is not registered.

        Example::

            sync.unregister(Invoice)      # Invoice rows no longer reach tallytree
            db.drop_aggregate("by_status")  # say, to retire its aggregate
        """
        registration = self._registration(model, "unregister")
        handler = registration.handler
        for name in handler.aggregates():
            handler.detach(name)
        del self._registrations[model]
        self._matches.clear()
        self._foreign = {}
        self._checked = False
        base = registration.mapper.base_mapper
        hooks = self._hooks.get(base.class_)
        if hooks is not None and not any(
            other.mapper.base_mapper is base for other in self._registrations.values()
        ):
            event = _sqlalchemy().event
            for name, hook in hooks:
                event.remove(base.class_, name, hook)
            del self._hooks[base.class_]

    def _registration(self, model: object, method: str) -> _Registration:
        """The registration of ``model``; InvalidArgumentError naming the registered classes when it has
        none."""
        registration = self._registrations.get(model) if isinstance(model, type) else None
        if registration is None:
            registered = sorted(each.__name__ for each in self._registrations)
            raise InvalidArgumentError(
                f"Sync.{method}: {model!r:.60} is not a class registered with this Sync (registered: "
                f"{registered}); register it with sync.register(model)"
            )
        return registration

    def listen(self, target: Any) -> None:
        """Listen to a Session class, a sessionmaker, a scoped_session or one session (any target of
        session events); again for a target already listened to does nothing. Holds ``target`` weakly:
        a session that is gone stops being listened to. O(registered classes).

        Raises TransactionError after :meth:`close`."""
        self._refuse_closed("listen")
        if any(live is target for live in self._live_targets()):
            return
        event = _sqlalchemy().event
        for name, function in self._listeners():
            # after_commit first: the tallytree write held across the SQL commit is committed before
            # the session's other after_commit listeners run (one may write tallytree itself)
            event.listen(target, name, function, insert=name == "after_commit")
        try:
            reference: Callable[[], Any] = weakref.ref(target)
        except TypeError:  # not weakly referenceable: held until remove or close
            reference = functools.partial(_identity, target)
        self._targets.append(reference)
        self._checked = False
        self._install()

    def remove(self, target: Any) -> None:
        """Stop listening to ``target`` (nothing happens for a target it does not listen to). Once it
        listens to no target, its mapper listeners are removed too. Like SQLAlchemy's
        ``event.remove``, call it while no session it listens to is flushing. O(registered classes)."""
        event = _sqlalchemy().event
        for reference in self._targets:
            if reference() is target:
                for name, function in self._listeners():
                    event.remove(target, name, function)
                self._targets.remove(reference)
                break
        if not self._live_targets():
            self._uninstall()

    def close(self) -> None:
        """Remove every listener this Sync installed (on its session targets and on the mapper events
        of the registered classes); then :meth:`listen` and :meth:`register` raise TransactionError,
        while :meth:`verify` and :meth:`repair` still work. Changes a session flushed and commits
        after this are not applied: close when no session it listens to is in a transaction (at
        shutdown; a commit under way between its SQL COMMIT and its ``after_commit`` would keep
        tallytree's writer lock), or repair after. Idempotent. O(targets + registered classes).

        Example::

            with Sync(db) as sync:   # or sync.close() when done
                sync.register(Invoice).aggregate("by_status", key="status")
                sync.listen(Session)
                ...
        """
        for reference in list(self._targets):
            target = reference()
            if target is not None:
                self.remove(target)
        self._targets.clear()
        self._uninstall()
        self._closed = True

    def _refuse_closed(self, method: str) -> None:
        if self._closed:
            raise TransactionError(f"Sync.{method}: this Sync is closed; create a new Sync")

    def _live_targets(self) -> list[Any]:
        live = [reference() for reference in self._targets]
        self._targets = [
            reference for reference, target in zip(self._targets, live, strict=True) if target is not None
        ]
        return [target for target in live if target is not None]

    def _install(self) -> None:
        """Install the mapper listeners of every registered hierarchy that has none yet."""
        event = _sqlalchemy().event
        reference = weakref.ref(self)
        for registration in self._registrations.values():
            base = registration.mapper.base_mapper.class_
            if base in self._hooks:
                continue
            hooks = [(name, _mapper_hook(reference, name)) for name in _MAPPER_EVENTS]
            for name, hook in hooks:
                event.listen(base, name, hook, propagate=True)
            self._hooks[base] = hooks

    def _uninstall(self) -> None:
        event = _sqlalchemy().event
        for base, hooks in self._hooks.items():
            for name, hook in hooks:
                event.remove(base, name, hook)
        self._hooks.clear()
        for engine, hooks in list(self._engines.items()):
            for name, hook in hooks:
                event.remove(engine, name, hook)
        self._engines.clear()

    def _listeners(self) -> list[tuple[str, Callable[..., None]]]:
        return [
            ("before_flush", self._before_flush),
            ("after_flush", self._after_flush),
            ("after_soft_rollback", self._after_soft_rollback),
            ("before_commit", self._before_commit),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
            ("do_orm_execute", self._do_orm_execute),
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

    def _on_row(self, name: str, connection: Any, target: Any) -> None:
        """A mapper event of a row of a registered hierarchy (any class in it, registered or not).

        It acts only in the flush of a session this Sync listens to (whose ``before_flush`` left a
        :class:`_Flush` in ``session.info``), for the registered classes the instance is an instance
        of (none for an unregistered class of the hierarchy: only a row switch or a discriminator
        change can concern them)."""
        state = _sqlalchemy().inspect(target)
        session = state.session
        flush = session.info.get((_FLUSH, self)) if session is not None else None
        if flush is None:
            return
        matches = self._matching(type(target))
        for each in matches:
            if each.aware_keys and connection.dialect.name in _NAIVE_DIALECTS:
                aggregate, column = each.aware_keys[0]
                raise ArgumentTypeError(
                    f"{aggregate}: {each.model.__name__}.{column} is DateTime(timezone=True), which "
                    f"{connection.dialect.name} stores without its offset: rows load back naive, "
                    "which are not keys; store UTC through a TypeDecorator that returns aware "
                    "datetimes, or key on a function of the row (nothing was committed)"
                )
        getattr(self, f"_{name}")(matches, flush, connection, state)

    def _before_insert(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        # A pending instance whose primary key is that of an instance this flush deletes: SQLAlchemy
        # turns the pair into one UPDATE (a "row switch"), fires before_insert then after_update for
        # the new instance, and no delete events for the old one, whose row the database still holds
        # now: read it to remove its items. The two may be of different classes of one hierarchy, of
        # which either may be unregistered. An insert of a new key costs a dictionary lookup, no query.
        key = state.mapper.identity_key_from_instance(state.obj())
        if None in key[1]:
            return
        existing = state.session.identity_map.get(key)
        if existing is None or existing is state.obj():
            return
        flush.switched.add(state)
        existing_matches = self._matching(type(existing))
        if not existing_matches:
            return
        new_tables = set(state.mapper.tables)
        for registration in existing_matches:
            left = [table.name for table in registration.mapper.tables if table not in new_tables]
            if left:
                old_name, new_name = type(existing).__name__, type(state.obj()).__name__
                name = registration.model.__name__
                raise InvalidArgumentError(
                    f"{old_name} {_describe(key[1])} deleted and a new {new_name} with the same primary "
                    "key added in one flush: SQLAlchemy turns the pair into an UPDATE of the new "
                    f"class's tables and leaves the row of {left} behind (select({name}) could not "
                    f"load it, and the aggregates of {name} would drift); flush the delete before "
                    "adding the new instance (nothing was committed)"
                )
        old = self._old_row(flush, existing_matches[0], connection, _sqlalchemy().inspect(existing))
        if old is not None:
            flush.removals.append((existing_matches, old))

    def _after_insert(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        if matches:
            flush.additions.append((matches, state))

    def _before_update(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        self._refuse_class_change(matches, state)
        if not matches:
            return
        # before_update fires for every dirty instance, also those whose UPDATE sets no column (a
        # collection changed): read the old row only when a registered column changes.
        nearest = matches[0]
        attributes = state.attrs
        written = frozenset(key for key in nearest.columns if attributes[key].history.has_changes())
        if not written and not (
            nearest.server_changed
            and any(attributes[prop.key].history.has_changes() for prop in state.mapper.column_attrs)
        ):
            flush.prefetched.pop(state, None)
            return
        flush.old[state] = (self._old_row(flush, nearest, connection, state), written)

    def _after_update(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        if not matches:
            return
        if state in flush.switched:  # the new instance of a row switch: its whole row is new
            flush.additions.append((matches, state))
            return
        old, written = flush.old.pop(state, (None, frozenset()))
        if old is not None:  # None: no registered column changed, or the row was gone
            flush.updates.append((matches, state, old, written))

    def _before_delete(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        if matches:
            flush.old[state] = (
                self._old_row(flush, matches[0], connection, state),
                frozenset(),
            )

    def _after_delete(
        self, matches: tuple[_Registration, ...], flush: _Flush, connection: Any, state: Any
    ) -> None:
        old, _ = flush.old.pop(state, (None, frozenset())) if matches else (None, frozenset())
        if old is not None:  # None: deleted by someone else already; its items were drift for repair
            flush.removals.append((matches, old))

    def _old_row(self, flush: _Flush, registration: _Registration, connection: Any, state: Any) -> Row | None:
        """The old row of ``state``: read in ``before_flush``, or now when it was not known then."""
        row = flush.prefetched.pop(state, _ABSENT)
        return registration.read(connection, state.identity) if row is _ABSENT else row

    def _prefetch(self, session: Any, flush: _Flush) -> None:
        """Read the old rows of the instances of registered classes that the flush will update (whose
        registered columns, or many-to-one relationships setting them, changed) or delete, before
        any statement of the flush runs: in one ``WHERE pk IN (...)`` statement per registered class
        (chunked; FOR UPDATE too) for a single-column primary key, else one by one. A single row
        (when no primary key changes) is left to its own event, which reads the same row.

        Before any statement, not in each row's before_update: an UPDATE of a parent's primary key
        that the database cascades (``ON UPDATE CASCADE``) would otherwise show the child's new
        foreign key as its old value, which is not what tallytree holds. So the loaded children of a
        parent whose primary key changes, which SQLAlchemy updates with it, are read here too. An
        instance this leaves out (an orphan of ``delete-orphan``, one a later ``before_flush``
        listener changes) is read by its own event, as is every instance under a session with
        ``connection_callable`` (sharding). O(dirty + deleted instances), and O(identity map) when
        a primary key changes."""
        if getattr(session, "connection_callable", None) is not None:
            return
        inspect = _sqlalchemy().inspect
        groups: dict[_Registration, dict[Any, None]] = {}  # ordered sets of states
        moved: dict[Any, set[Any]] = {}  # primary key column -> old values, of rows whose key changes
        for deleting, instances in ((False, session.dirty), (True, session.deleted)):
            for instance in instances:
                state = inspect(instance)
                if state.key is None:
                    continue
                changed = state.committed_state.keys()  # the attributes that may have changed
                if not deleting and changed:
                    mapper = state.mapper
                    for index, column in enumerate(mapper.primary_key):
                        if mapper.get_property_by_column(column).key in changed:
                            moved.setdefault(column, set()).add(state.identity[index])
                matches = self._matching(type(instance))
                if not matches:
                    continue
                nearest = matches[0]
                if (
                    deleting
                    or any(key in nearest.written_by for key in changed)
                    or (nearest.server_changed and any(key in nearest.updated_by for key in changed))
                ):
                    groups.setdefault(nearest, {})[state] = None
        if moved:
            self._children_of_moved_keys(session, moved, groups)
        for registration, members in groups.items():
            states = list(members)
            if len(states) == 1 and not moved:  # read by its own event: the same row, one statement
                continue
            connection = session.connection(bind_arguments={"mapper": registration.mapper.base_mapper})
            rows: dict[Any, Row] = {}
            if len(states) > 1 and registration.select_many is not None:
                rows = registration.read_many(connection, [state.identity for state in states])
            for state in states:
                row = rows.get(state.identity[0]) if rows else None
                # A key the batch lacks is gone, or compares differently in SQL (a collation): alone.
                flush.prefetched[state] = (
                    row if row is not None else registration.read(connection, state.identity)
                )

    def _children_of_moved_keys(
        self, session: Any, moved: dict[Any, set[Any]], groups: dict[_Registration, dict[Any, None]]
    ) -> None:
        """Add to ``groups`` the loaded instances of registered classes whose foreign key holds an old
        primary key of ``moved``: SQLAlchemy updates them with their parent's new key (and the
        database may cascade it first)."""
        for state in session.identity_map.all_states():
            matches = self._matching(state.class_)
            if not matches or state.key is None:
                continue
            nearest = matches[0]
            for key in nearest.columns:
                value = state.dict.get(key)
                if value is None:
                    continue
                column = nearest.mapper.column_attrs[key].columns[0]
                if any(value in moved.get(foreign.column, ()) for foreign in column.foreign_keys):
                    groups.setdefault(nearest, {})[state] = None
                    break

    def _refuse_class_change(self, matches: tuple[_Registration, ...], state: Any) -> None:
        """Refuse an UPDATE of the polymorphic discriminator that moves the row into or out of a
        registered class: SQLAlchemy fires the events of the instance's class, not of the class the
        row becomes (and with joined inheritance leaves or lacks that class's table row)."""
        mapper = state.mapper
        if mapper.polymorphic_on is None:
            return
        key = self._discriminators.get(mapper, "")
        if key == "":
            try:
                key = mapper.get_property_by_column(mapper.polymorphic_on).key
            except Exception:  # a SQL expression, not a column attribute: nothing to check
                key = None
            self._discriminators[mapper] = key
        if key is None or not state.attrs[key].history.has_changes():
            return
        value = state.dict.get(key)
        target = mapper.polymorphic_map.get(value)
        if target is None or self._matching(target.class_) == matches:
            return
        new_name = target.class_.__name__
        raise InvalidArgumentError(
            f"{mapper.class_.__name__} {_describe(state.identity)}: setting {key} to {value!r} makes "
            f"the row a {new_name}, whose registered aggregates differ, and SQLAlchemy fires no event "
            f"for that move; delete the instance and add a new {new_name} with the same primary key "
            "in the same flush instead (nothing was committed)"
        )

    def _before_flush(self, session: Any, flush_context: Any, instances: Any) -> None:
        if not self._checked:
            self._check_configuration()
        # A new record per flush: a failed flush's leftovers are dropped here (or at the rollback).
        flush = session.info[(_FLUSH, self)] = _Flush()
        self._prefetch(session, flush)

    def _check_configuration(self) -> None:
        """At the first flush after a register or listen (every mapper is configured by then, also
        those defined after register): refuse post_update relationships on registered columns, and
        find the classes outside the registered hierarchies that map a registered table."""
        foreign: dict[Any, list[tuple[_Registration, frozenset[Any]]]] = {}
        self._tables = {}
        for registration in self._registrations.values():
            registration.refuse_post_updates()
            tables = frozenset(registration.mapper.tables)
            for table in tables:
                self._tables.setdefault(table, registration)
            for other in registration.mapper.registry.mappers:
                shared = tables & set(other.tables)
                if shared and other.base_mapper is not registration.mapper.base_mapper:
                    entries = foreign.setdefault(other.base_mapper, [])
                    if (registration, shared) not in entries:
                        entries.append((registration, frozenset(shared)))
        self._foreign = foreign
        self._checked = True

    def _refuse_foreign_writes(self, session: Any) -> None:
        """Refuse (fail the flush) a write of a registered table through a class of another hierarchy:
        its rows are the registered class's rows (``select(Registered)`` reads them), and its mapper
        events are not the registered class's."""
        inspect = _sqlalchemy().inspect
        for kind, instances in (
            ("insert", session.new),
            ("update", session.dirty),
            ("delete", session.deleted),
        ):
            for instance in instances:
                state = inspect(instance)
                for registration, tables in self._foreign.get(state.mapper.base_mapper, ()):
                    if not tables & set(state.mapper.tables):
                        continue
                    if kind == "update" and not any(
                        attribute.history.has_changes()
                        for attribute in state.attrs
                        if attribute.key in state.mapper.column_attrs
                        and registration.column_objects
                        & set(state.mapper.column_attrs[attribute.key].columns)
                    ):
                        continue
                    raise InvalidArgumentError(
                        f"a flush would {kind} a row of {sorted(table.name for table in tables)} through "
                        f"{type(instance).__name__}, which is not (a subclass of) the registered "
                        f"{registration.model.__name__}: the aggregates of {registration.model.__name__} "
                        f"count every row of that table and see only writes through "
                        f"{registration.model.__name__} and its subclasses; write through "
                        f"{registration.model.__name__} (nothing was committed)"
                    )

    def _after_flush(self, session: Any, flush_context: Any) -> None:
        flush: _Flush | None = session.info.pop((_FLUSH, self), None)
        if flush is None:
            return
        if self._foreign:
            self._refuse_foreign_writes(session)
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
        self._enqueue(session, [*removals, *updates, *additions])

    def _enqueue(self, session: Any, changes: list[tuple[ChangeHandler, Change]]) -> None:
        """Check the changes of a flush or of an ORM bulk statement (see :meth:`_check_changes`) and
        queue them on the session, tagged with its innermost transaction; in the commit itself (a
        flush of the commit), apply them at once."""
        if not changes:
            return
        self._check_changes(changes)
        transaction = session.get_nested_transaction() or session.get_transaction()
        self._queue(session).extend((transaction, handler, change) for handler, change in changes)
        if self._ordered:  # the SQL COMMIT of these connections applies the queue first
            self._follow_commit(session)

    def _follow_commit(self, session: Any) -> None:
        """Have the SQL COMMIT of the session's connections call :meth:`_on_commit` first."""
        committing = self._committing
        for connection in _connections_of(session):
            known = committing.get(connection)
            if known is None or known() is not session:
                committing[connection] = weakref.ref(session)
                self._watch(connection.engine)

    def _check_changes(self, changes: list[tuple[ChangeHandler, Change]]) -> None:
        """Extract the items of every change now, in the flush, so that a row the aggregates cannot
        take (a bad id, a naive datetime key, a Decimal value, a failing function) fails the flush,
        which rolls the SQL transaction back, instead of failing after the SQL commit; so does an
        aggregate dropped or redefined since its handler registered it (``confirm_registered``, in
        a read transaction: attribute tests, or one META get per aggregate after another process's
        commit)."""
        definitions: dict[ChangeHandler, list[Definition]] = {}
        try:
            for handler, change in changes:
                if handler not in definitions:
                    definitions[handler] = [handler.definition(name) for name in handler.aggregates()]
                    _refuse_dropped(handler)
                id_bytes = encode_id(change.id)
                for definition in definitions[handler]:
                    for row in (change.old, change.new):
                        if row is not None:
                            definition.coordinates(row, change.id, id_bytes)
            if not getattr(self._db, "_closed", False):  # (refused before the commit, with its words)
                with self._db.read() as tx:  # redefined by another process since it was registered?
                    for known in definitions.values():
                        confirm_registered(tx, known)
        except Exception as exc:
            exc.add_note(
                "tallytree.sqlalchemy: refused in the flush, before the SQL commit: roll the session "
                "back; nothing reached SQL or tallytree"
            )
            raise

    def _after_soft_rollback(self, session: Any, previous_transaction: Any) -> None:
        info = session.info
        info.pop((_FLUSH, self), None)
        # A rollback while a write is held for the commit (the COMMIT failed, and handle_error did
        # not say so): the write goes.
        self._abort_write(session)
        broken = info.get((_BROKEN, self))
        queue = info.get(self._queue_key())
        if not queue and broken is None:
            return

        def inside(transaction: Any) -> bool:
            while transaction is not None:
                if transaction is previous_transaction:
                    return True
                transaction = transaction.parent
            return False

        if broken is not None and inside(broken[0]):  # the statement that broke it was rolled back
            del info[(_BROKEN, self)]
        if queue:
            # A rolled-back SAVEPOINT drops the changes queued in it and in the SAVEPOINTs inside it
            # (released or not), and keeps those of the enclosing transactions.
            queue[:] = [entry for entry in queue if not inside(entry[0])]

    def _before_commit(self, session: Any) -> None:
        # Refuse, while nothing is committed, what would make the tallytree write fail. (Fired for
        # a SAVEPOINT's release too, which applies nothing.)
        if session.in_nested_transaction():
            return
        info = session.info
        broken = info.get((_BROKEN, self))
        if broken is not None:
            raise TransactionError(
                f"session.commit() refused: {broken[1]}; roll the session back (nothing was committed)"
            )
        queue = info.get(self._queue_key())
        db = self._db
        closed = getattr(db, "_closed", False)
        writing = getattr(db._local, "writing", False)
        if queue:
            try:
                handlers = list(dict.fromkeys(handler for _, handler, _ in queue))
                for handler in handlers:
                    _refuse_dropped(handler)
                if not closed and not writing:  # redefined by another process
                    with db.read() as tx:
                        for handler in handlers:
                            confirm_registered(tx, handler._definitions.values())
            except (TransactionError, SchemaMismatchError) as exc:
                exc.add_note(
                    "tallytree.sqlalchemy: refused before the SQL commit (nothing was committed: the "
                    "session's transaction is still open)"
                )
                raise
        if closed or writing:
            self._refuse_commit(session, closed)

    def _refuse_commit(self, session: Any, closed: bool) -> None:
        """Refuse (TransactionError) a commit with changes to apply while the database is closed, or
        inside ``with db.write()`` in the same thread, where the tallytree write cannot open."""
        pending = [*session.new, *session.dirty, *session.deleted]
        if not session.info.get(self._queue_key()) and not any(
            self._matching(type(each)) for each in pending
        ):
            return
        if closed:
            raise TransactionError(
                "session.commit(): the tallytree database this Sync applies the changes to is closed, "
                "and they would reach SQL only; close the Sync (sync.close()) before the database, or "
                "open the database again and make a new Sync (nothing was committed: the session's "
                "transaction is still open)"
            )
        raise TransactionError(
            "session.commit() inside `with db.write()` in the same thread: the changes reach "
            "tallytree in a write transaction of their own, held across the SQL commit, which cannot "
            "open here; commit after the `with` block (nothing was committed: the session's "
            "transaction is still open)"
        )

    def _on_commit(self, connection: Any) -> None:
        """An SQL COMMIT is about to be sent on ``connection`` (the engine's ``commit`` event): if it
        is the commit of a session with changes queued for this Sync (in this thread), apply them
        now, in the write transaction held across that COMMIT."""
        known = self._committing.get(connection)
        session = known() if known is not None else None
        if session is None:
            return
        broken = session.info.get((_BROKEN, self))
        if broken is not None:  # (also when before_commit did not see it: SAVEPOINTs still open)
            raise TransactionError(
                f"session.commit() refused: {broken[1]}; roll the session back (nothing was committed)"
            )
        if session.info.get(self._queue_key()):
            self._apply_queued(session)

    def _apply_queued(self, session: Any) -> None:
        """Apply the changes queued on the session in the write transaction of its commit, opened
        first if this commit has none yet (waiting for the writer lock): one batch, in order (the
        path of ``ChangeHandler.apply_many``). A change that fails (strict mode, on drift) aborts
        that write and raises, so the SQL COMMIT is not sent."""
        queue = session.info.get(self._queue_key())
        if not queue:
            return
        pending = self._open_write(session)
        entries = list(queue)
        queue.clear()
        try:
            pending.changes += apply_changes(
                self._db, pending.tx, _with_definitions(entries), self._idempotent
            )
        except Exception as exc:
            queue[:0] = entries  # still to apply: a commit tried again without a rollback applies them
            self._abort_write(session)
            exc.add_note(
                "tallytree.sqlalchemy: refused before the SQL commit, which will not happen: roll "
                "the session back; nothing reached SQL or tallytree"
            )
            raise

    def _open_write(self, session: Any) -> _Pending:
        """The write transaction of the session's commit for this Sync's database: the one another
        Sync of the database opened, or a new one (which waits for the writer lock)."""
        key = (_WRITE, self._db)
        pending: _Pending | None = session.info.get(key)
        if pending is None or not pending.open:
            try:
                pending = _Pending(self._db)
            except TransactionError as exc:
                exc.add_note(
                    "tallytree.sqlalchemy: the commit's changes reach tallytree in a write "
                    "transaction held across the SQL commit, which could not open; nothing was "
                    "committed: roll the session back"
                )
                raise
            session.info[key] = pending
            pending.connections = _connections_of(session)  # (their engines are watched: _follow_commit)
        held: list[_Pending] = self._held.__dict__.setdefault("writes", [])
        if pending not in held:
            if held:
                held[:] = [each for each in held if each.open]  # (those another Sync of the db ended)
            held.append(pending)
        return pending

    def _abort_write(self, session: Any) -> None:
        pending: _Pending | None = session.info.pop((_WRITE, self._db), None)
        if pending is not None:
            self._release(pending, commit=False)

    def _release(self, pending: _Pending, *, commit: bool) -> None:
        held: list[_Pending] = self._held.__dict__.get("writes", [])
        if pending in held:
            held.remove(pending)
        if commit:
            pending.commit()
        else:
            pending.abort()

    def _watch(self, engine: Any) -> None:
        """Listen to the engine's ``commit`` (fired just before a connection sends COMMIT: the
        queued changes are applied then, see :meth:`_on_commit`) and ``handle_error`` (a COMMIT that
        fails aborts at once the tallytree write held across it: SQLAlchemy fires no session event
        until the session is rolled back or closed, and other writers wait meanwhile)."""
        if engine in self._engines:
            return
        hooks = _engine_hooks(weakref.ref(self))
        event = _sqlalchemy().event
        for name, hook in hooks:
            event.listen(engine, name, hook)
        self._engines[engine] = hooks

    def _on_error(self, context: Any) -> None:
        """An error of a statement or commit on an engine this Sync watches: if it is on a connection
        whose commit this thread holds a tallytree write for, that commit has failed."""
        held: list[_Pending] = self._held.__dict__.get("writes", [])
        for pending in list(held):
            if context.connection in pending.connections:
                self._release(pending, commit=False)

    def _after_commit(self, session: Any) -> None:
        # SQLAlchemy fires after_commit when a SAVEPOINT is released too; the SAVEPOINT's transaction
        # is still the session's nested transaction then (it closes after this event), and its changes
        # stay queued, tagged with it, until the outermost commit or a rollback that encloses it.
        if session.in_nested_transaction():
            return
        info = session.info
        pending: _Pending | None = info.pop((_WRITE, self._db), None)
        if pending is not None and pending.open:
            try:
                self._release(pending, commit=True)
            except Exception as exc:
                exc.add_note(
                    f"tallytree.sqlalchemy: the SQL transaction was committed and tallytree was not: it "
                    f"lags by {pending.changes} change(s); run Sync.repair(session) in a fresh session"
                )
                raise
        queue = info.pop(self._queue_key(), None)
        if not queue:
            return
        # Changes not applied before an SQL COMMIT (ordered=False; a session joined to a connection
        # whose transaction its caller ends; a two-phase commit): applied now, in a write
        # transaction of their own.
        try:
            with self._db.write() as tx:  # one batch, in order: see ChangeHandler.apply_many
                apply_changes(self._db, tx, _with_definitions(queue), self._idempotent)
        except Exception as exc:
            exc.add_note(
                f"tallytree.sqlalchemy: the SQL transaction was committed and tallytree was not: it "
                f"lags by {len(queue)} change(s); run Sync.repair(session) in a fresh session"
            )
            raise

    def _after_transaction_end(self, session: Any, transaction: Any) -> None:
        # The outermost transaction ended: committed (the queue was applied and removed), rolled back
        # (dropped), or closed without either (session.close()): nothing queued may outlive it, nor
        # a write held for a commit that did not happen.
        if transaction.parent is None:
            info = session.info
            info.pop(self._queue_key(), None)
            info.pop((_FLUSH, self), None)
            info.pop((_BROKEN, self), None)
            self._abort_write(session)

    # ------------------------------------------------------------ ORM bulk statements

    def _do_orm_execute(self, state: Any) -> Any:
        """``session.execute()`` of an INSERT, UPDATE or DELETE: follow it when it writes a registered
        class (see :meth:`_bulk`), refuse it when it cannot be followed; a SELECT (or a statement of
        a class nothing registered concerns) costs three attribute tests."""
        if not (state.is_update or state.is_delete or state.is_insert):
            return None
        if not self._checked:
            self._check_configuration()
        statement = state.statement
        mapper = state.bind_mapper
        sqlalchemy = _sqlalchemy()
        if mapper is None or not isinstance(statement, sqlalchemy.sql.dml.UpdateBase):
            dml = getattr(statement, "element", statement)  # select(...).from_statement(dml)
            table = getattr(dml, "table", None)
            registration = self._tables.get(getattr(table, "_deannotate", lambda: table)())
            if registration is None:
                return None
            model = registration.model.__name__
            kind = "INSERT" if state.is_insert else "UPDATE" if state.is_update else "DELETE"
            how = (
                f"write it as an ORM statement on the class, e.g. session.execute({kind.lower()}"
                f"({model})...), which the Sync follows"
                if mapper is None
                else f"run the {kind} itself through session.execute(), which the Sync follows"
            )
            raise InvalidArgumentError(
                f"session.execute(): an {kind} of the table {getattr(table, 'name', table)!r} of the "
                f"registered {model} "
                f"that the Sync cannot follow (the aggregates would drift); {how}, or run "
                "Sync.repair(session) after it through session.connection() (nothing was executed)"
            )
        if state.is_delete and state.is_executemany:
            return None  # SQLAlchemy refuses an ORM DELETE with a list of parameters itself
        model = mapper.class_.__name__
        for registration, tables in self._foreign.get(mapper.base_mapper, ()):
            if tables & set(mapper.tables):
                name = registration.model.__name__
                raise InvalidArgumentError(
                    f"session.execute(): a statement on {model}, which maps a table of the registered "
                    f"{name} without being (a subclass of) it: the Sync follows writes through {name} "
                    f"only; write through {name} (nothing was executed)"
                )
        below = sorted(
            other.model.__name__
            for other in self._registrations.values()
            if other.mapper is not mapper and other.mapper.isa(mapper)
        )
        if below:
            raise InvalidArgumentError(
                f"session.execute(): a statement on {model}, whose rows include those of the "
                f"registered subclass(es) {below}: the Sync cannot tell which rows are theirs; run it "
                f"on each subclass (update({below[0]})...), or change the rows one by one through the "
                "session (nothing was executed)"
            )
        matches = self._matching(mapper.class_)
        if not matches:
            return None
        if getattr(state.session, "connection_callable", None) is not None:
            raise InvalidArgumentError(
                f"session.execute(): a statement on the registered {model} in a session that picks "
                "its connection per statement (horizontal sharding): the Sync cannot read the rows "
                "it writes; change them one by one through the session (nothing was executed)"
            )
        return self._bulk(state, mapper, matches)

    def _bulk(self, state: Any, mapper: Any, matches: tuple[_Registration, ...]) -> Any:
        """Run an ORM INSERT, UPDATE or DELETE of a registered class, and queue its changes.

        Before it, the primary keys of the rows it will write are found: an UPDATE or DELETE with a
        WHERE selects them with its criteria, ``FOR UPDATE`` (on SQLite, in a transaction begun as a
        writer, see :func:`_lock_for_writing`), so that no other transaction changes them until the
        commit; an UPDATE by primary key (a list of parameter dicts) names them; an INSERT names
        them in its parameters, or, when a row does not (a key the database generates, ``.values()``,
        ``from_select``, ``ON CONFLICT DO NOTHING``), returns them (``RETURNING`` added to it). The
        rows of those keys are read before (for an UPDATE or DELETE) and after the statement, by
        primary key, each registered class's columns; their difference is the change of each row.
        A WHERE statement must have written exactly the rows selected (its row count; a row another
        transaction committed in between would make it differ); an UPDATE must leave each row at
        its primary key. Refused (InvalidArgumentError) before it runs: an INSERT that neither names
        nor can return its keys, an upsert that updates (``ON CONFLICT DO UPDATE``). When anything
        fails after it ran, the session's commit is refused until it rolls back. O(rows) reads, in
        ``IN`` statements of 500 keys (one by one for a composite primary key)."""
        session = state.session
        statement = state.statement
        kind = "insert" if state.is_insert else "update" if state.is_update else "delete"
        keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
        bind = {"mapper": mapper}
        connection = session.connection(bind_arguments=bind)
        params = state.parameters
        by_key = isinstance(params, list)
        returned: list[tuple[Any, ...]] | None = None  # the primary keys an INSERT returns
        identities: list[tuple[Any, ...]] = []
        before: dict[_Registration, dict[tuple[Any, ...], Row]] = {each: {} for each in matches}
        if kind == "insert":
            rows = params if by_key else [params] if params else []
            plain = (
                getattr(statement, "select", None) is None
                and not getattr(statement, "_values", None)
                and not getattr(statement, "_multi_values", None)
                and getattr(statement, "_post_values_clause", None) is None
            )
            if plain and rows and all(row.get(key) is not None for row in rows for key in keys):
                identities = [tuple(row[key] for key in keys) for row in rows]
            else:
                self._refuse_unreturnable(statement, connection.dialect, mapper, by_key)
                returned = []
        else:
            if by_key:  # UPDATE by primary key: one parameter dict per row
                missing = [row for row in params if any(key not in row for key in keys)]
                if missing:
                    raise InvalidArgumentError(
                        f"session.execute(update({mapper.class_.__name__}), [...]): a parameter dict "
                        f"without the primary key {keys} ({missing[0]!r:.80}); give it in every dict "
                        "(nothing was executed)"
                    )
                identities = list(dict.fromkeys(tuple(row[key] for key in keys) for row in params))
            else:
                identities = self._selected(session, connection, statement, mapper, params)
            for registration in matches:
                before[registration] = registration.read_rows(connection, identities)
        if returned is not None:
            primary_key = [getattr(mapper.class_, key) for key in keys]
            result = state.invoke_statement(statement=statement.returning(*primary_key))
        else:
            result = state.invoke_statement()
        try:  # the statement ran: whatever fails now must keep the SQL transaction from committing
            if returned is not None or bool(getattr(statement, "_returning", ())):
                frozen = result.freeze()  # its rows, for the caller and (an INSERT's keys) for us
                if returned is not None:
                    identities = list(dict.fromkeys(tuple(row) for row in frozen.data))
                written: int | None = len(frozen.data)
                result = frozen()
            elif kind != "insert" and not by_key and connection.dialect.supports_sane_rowcount:
                written = getattr(result, "rowcount", None)
            else:
                written = None
            if kind != "insert" and not by_key and written is not None and written != len(identities):
                raise TransactionError(
                    f"session.execute({kind}({mapper.class_.__name__})...) wrote {written} row(s) "
                    f"where {len(identities)} matched its criteria just before (another transaction "
                    "committed rows that match them in between, or a rule or trigger changed the "
                    "count): the Sync cannot tell which rows changed; roll back and run it again"
                )
            changes = self._bulk_changes(connection, mapper, matches, kind, identities, before)
            self._enqueue(session, changes)
        except Exception as exc:
            transaction = session.get_nested_transaction() or session.get_transaction()
            session.info[(_BROKEN, self)] = (
                transaction,
                f"a {kind.upper()} of {mapper.class_.__name__} ran that the Sync could not follow",
            )
            self._follow_commit(session)
            exc.add_note(
                f"tallytree.sqlalchemy: the {kind.upper()} ran in the SQL transaction and its changes "
                "cannot reach tallytree: roll the session back (its commit is refused until then)"
            )
            raise
        return result

    def _refuse_unreturnable(self, statement: Any, dialect: Any, mapper: Any, many: bool) -> None:
        """Refuse an INSERT whose rows do not all name their primary key when ``RETURNING`` cannot
        give it: the database lacks it, the statement returns columns of its own, or it is an
        upsert that may update rows (whose old rows nothing read)."""
        model = mapper.class_.__name__
        upsert = getattr(statement, "_post_values_clause", None)
        if upsert is not None and type(upsert).__name__ != "OnConflictDoNothing":
            raise InvalidArgumentError(
                f"session.execute(insert({model})...) with an upsert ({type(upsert).__name__}) that "
                "may update existing rows, whose old values the Sync does not read: the aggregates "
                f"would drift; use session.merge({model}(...)) per row, or split the rows into "
                "inserts and updates (nothing was executed)"
            )
        can_return = dialect.insert_executemany_returning if many else dialect.insert_returning
        if getattr(statement, "_returning", ()) or not can_return:
            why = (
                "it returns columns of its own"
                if getattr(statement, "_returning", ())
                else f"{dialect.name} cannot return the keys it generates"
            )
            raise InvalidArgumentError(
                f"session.execute(insert({model})...): the Sync reads the inserted rows back by "
                f"primary key, which not every row names, and {why}; give each row its primary key "
                f"(a list of dicts), or add the instances with session.add_all() (nothing was "
                "executed)"
            )

    def _selected(
        self, session: Any, connection: Any, statement: Any, mapper: Any, params: Any
    ) -> list[tuple[Any, ...]]:
        """The primary keys of the rows an UPDATE or DELETE with criteria will write, selected with
        its criteria (and its options, such as ``with_loader_criteria``), FOR UPDATE, in the
        session's transaction (as SQLAlchemy's ``synchronize_session='fetch'`` selects them)."""
        sqlalchemy = _sqlalchemy()
        _lock_for_writing(connection)
        select = sqlalchemy.select(*mapper.primary_key).select_from(mapper).with_for_update()
        if statement.whereclause is not None:
            select = select.where(statement.whereclause)
        options = getattr(statement, "_with_options", ())
        if options:
            select = select.options(*options)
        with session.no_autoflush:
            rows = session.execute(select, params, bind_arguments={"mapper": mapper})
            return list(dict.fromkeys(tuple(row) for row in rows))

    def _bulk_changes(
        self,
        connection: Any,
        mapper: Any,
        matches: tuple[_Registration, ...],
        kind: str,
        identities: list[tuple[Any, ...]],
        before: dict[_Registration, dict[tuple[Any, ...], Row]],
    ) -> list[tuple[ChangeHandler, Change]]:
        """The changes of a bulk statement: per registered class, each row's old row (``before``)
        against the row read now; removals, then updates, then additions (as a flush's)."""
        removals: list[tuple[ChangeHandler, Change]] = []
        updates: list[tuple[ChangeHandler, Change]] = []
        additions: list[tuple[ChangeHandler, Change]] = []
        model = mapper.class_.__name__
        for registration in matches:
            old_rows = before[registration]
            new_rows = registration.read_rows(connection, identities, gone=kind == "delete")
            handler = registration.handler
            for identity in identities:
                old, new = old_rows.get(identity), new_rows.get(identity)
                if kind == "update" and (old is None) != (new is None):
                    raise TransactionError(
                        f"session.execute(update({model})...): the row with primary key "
                        f"{_describe(identity)} "
                        + (
                            "is not where it was before the UPDATE (it changed its primary key, or "
                            "a trigger moved it): the Sync follows an UPDATE by primary key; change "
                            "primary keys one instance at a time through the session"
                            if new is None
                            else "appeared during the UPDATE (another transaction committed it "
                            "between the Sync's read and the UPDATE): roll back and run it again"
                        )
                    )
                if old is not None and new is not None:
                    old_id, new_id = registration.row_id(old), registration.row_id(new)
                    if old_id != new_id:
                        removals.append((handler, Change.delete(old_id, old)))
                        additions.append((handler, Change.insert(new_id, new)))
                    elif old != new:
                        updates.append((handler, Change.update(new_id, old, new)))
                elif old is not None:
                    removals.append((handler, Change.delete(registration.row_id(old), old)))
                elif new is not None:
                    additions.append((handler, Change.insert(registration.row_id(new), new)))
        return [*removals, *updates, *additions]

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
        the drift per aggregate name. O(rows + items). Raises InvalidArgumentError for a ``model``
        that is not registered, TransactionError for an aggregate dropped since it was defined."""
        return self._check(session, model, fix=False)

    def repair(self, session: Any, model: type | None = None) -> dict[str, Drift]:
        """Like :meth:`verify`, then fix the aggregates to match the rows, in one tallytree write
        transaction per registered class; return the drift that was fixed.

        Raises TransactionError while ``session`` holds flushed changes of registered classes that are
        not committed yet (a rollback would leave them in tallytree): run it in a fresh session, or
        after the commit; and what :meth:`verify` raises."""
        if session.info.get(self._queue_key()):
            raise TransactionError(
                "Sync.repair: the session holds flushed changes that are not committed; commit or roll "
                "back first (or repair in a fresh session)"
            )
        return self._check(session, model, fix=True)

    def _check(self, session: Any, model: type | None, *, fix: bool) -> dict[str, Drift]:
        method = "repair" if fix else "verify"
        models = [model] if model is not None else list(self._registrations)
        report: dict[str, Drift] = {}
        for each in models:
            handler = self._registration(each, method).handler
            rows = self._rows(session, each)
            # the handler's own aggregate objects: one dropped since raises (TransactionError), where
            # db.aggregate(name) would create an empty one
            if fix:
                with self._db.write() as wtx:
                    for name in handler.aggregates():
                        definition = handler.definition(name)
                        report[name] = repair(wtx, definition.aggregate, rows, definition=definition)
            else:
                with self._db.read() as tx:
                    for name in handler.aggregates():
                        definition = handler.definition(name)
                        report[name] = verify(tx, definition.aggregate, rows, definition=definition)
        return report
