"""Hooks for data that lives elsewhere: changes, change handlers, and verify / repair against a source.

Design
======
When the documents live in another store (PostgreSQL, SQLite, an ORM), the application reports each
write as a :class:`Change` (insert with the new row, update with the old and the new, delete with the
old) to a :class:`ChangeHandler`, built from the same extractors as a table (see ``_extract``). The
handler moves each aggregate's item of the old row to the item of the new one, in the caller's
tallytree transaction:

* ``apply(tx, change)`` is strict: the old item must be present and the new place free, checked for
  every aggregate before anything is written, so a change applied twice, or against drifted data,
  raises instead of double counting;
* ``apply(tx, change, idempotent=True)`` makes the aggregates hold the new row's items whatever they held
  (absent old items and present new ones are fine): for replays of a log in order, and backfills;
* ``apply_many(tx, changes)`` gives the result of ``apply`` change by change, errors included, as one
  batch: the changes are simulated in order on an overlay of the places they touch (a dict of
  ``(tree key, entry)`` to what the place holds after the changes so far), strict checks of places no
  earlier change touched are made at the end against the trees (a new place after a tree's last
  entry, an append, needs no read), and only then is the net effect written, per tree: removals,
  then the new items in one sorted merge (``Tree.merge_sorted``, as under ``Table.insert_many``). A
  batch that raises writes nothing. The SQLAlchemy ``Sync`` applies each commit's changes this way.

A handler holds its definitions in memory (``aggregate()`` registers one, ``detach()`` forgets it; pass
them again in each process), and registers them with the database too, where :func:`verify` and
:func:`repair` find the extractors of an aggregate no table maintains.

Stored definitions. The functions live in the processes, but a description of each definition (that
of ``_extract.describe_definition``: field names as given, functions by name and code fingerprint)
is stored in the aggregate's own META record, under ``"extractors"`` (see ``_db``), so that two
processes, or the old and new workers of a rolling deploy, cannot maintain one aggregate with two
definitions, whose items would drift apart silently::

    registration    stored record          what happens
    ------------    -------------          ------------
    any             no record              the aggregate is created with the description
    D               no description         adopted: D is stored, the items kept (an aggregate of an
                                           older release, or made by db.aggregate())
    D               D                      nothing is written (a read transaction)
    D               E                      SchemaMismatchError, nothing written, saying what differs
    D, redefine     E (or none)            a new aggregate (a new id) with D, empty; the old trees
                                           deleted, in one write transaction: repair() refills it
    D, redefine     D                      nothing is written (so a deploy may run it again)

Whether a registration writes is decided twice: in a read transaction, then, when something must be
written, again in the write transaction, under the writer lock (another process may have registered
meanwhile). Invariant: a description never changes under an aggregate id (a redefinition makes a new
id; only an aggregate without one gets one: by adoption, or by ``Table.detach``, which stores the
table's), so a handler whose aggregate is still the one stored under its name (``Aggregate._check``)
still has the stored definition. ``apply``,
``apply_many`` and the SQLAlchemy ``Sync`` check that for every registered aggregate before they
extract anything (:func:`confirm_registered`), whether the change gives it an item or not: two
attribute tests per aggregate while the backend's epoch stays (it moves when another process
committed, or this one changed a definition), one META get per aggregate once it moved. A process
that registered a definition since redefined elsewhere gets SchemaMismatchError (TransactionError
for an aggregate dropped since), writing nothing: restart it with the new definition. A redefinition
in this process marks the old ``Aggregate`` object gone before its commit, so another thread's
handler is refused too. Processes of releases before this one neither store nor check descriptions:
run this release everywhere before relying on it.

The two stores commit separately, so a crash between them leaves drift. :func:`verify` recomputes what
an aggregate should hold from a source of documents (a table, any iterable of rows, a DB-API cursor or
an SQLAlchemy result) and reports the difference item by item; :func:`repair` applies that difference in
one transaction. Both read the whole aggregate and the whole source: O(n) time, and memory for the
expected items (about 100 bytes each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

import msgpack

from ._aggregate import Aggregate, Item, owned_reason
from ._args import as_int, check_flag, iterator_of
from ._btree import same_values
from ._db import DEFAULT_NODE_SIZE, _check_fields, _check_name, _check_node_size, define_aggregate
from ._extract import (
    Coord,
    Definition,
    Extractor,
    OnMissing,
    Where,
    _drifted,
    check_strict,
    describe_definition,
    move,
    same_description,
)
from ._gc import gc_paused
from ._keys import _show, decode_entry, decode_key, encode_id
from ._table import Table, _drop_trees
from ._tree import Tree
from ._txn import DEFINITIONS, Transaction, WriteTransaction, check_transaction, decode_definition
from .errors import (
    AggregateNotFoundError,
    ArgumentTypeError,
    CorruptDatabaseError,
    DuplicateItemError,
    InvalidArgumentError,
    InvalidDocumentError,
    ItemNotFoundError,
    SchemaMismatchError,
    TransactionError,
)

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["Change", "ChangeHandler", "Drift", "DriftExample", "repair", "verify"]

ChangeKind = Literal["insert", "update", "delete"]
_WANTED = {"insert": (False, True), "update": (True, True), "delete": (True, False)}  # (old, new) given


@dataclass(frozen=True, slots=True)
class Change:
    """One write to a document stored elsewhere: ``insert`` (new), ``update`` (old and new) or
    ``delete`` (old). Build with :meth:`insert`, :meth:`update` or :meth:`delete`.

    >>> Change.update(7, {"status": "open"}, {"status": "paid"}).kind
    'update'
    """

    kind: ChangeKind
    id: Any
    old: Mapping[str, Any] | None = None
    new: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        wanted = _WANTED.get(self.kind) if isinstance(self.kind, str) else None
        if wanted is None:
            raise InvalidArgumentError(
                f"a change is an 'insert', 'update' or 'delete', not {_show(self.kind)}"
            )
        old, new = self.old, self.new
        if ((old is not None), (new is not None)) != wanted:
            raise InvalidArgumentError(
                f"{'an' if self.kind in ('insert', 'update') else 'a'} {self.kind} change takes "
                f"{'an old' if wanted[0] else 'no old'} document and {'a new' if wanted[1] else 'no new'} "
                "document"
            )
        if old is not None and type(old) is not dict and not isinstance(old, Mapping):
            raise _not_a_document("old", old)
        if new is not None and type(new) is not dict and not isinstance(new, Mapping):
            raise _not_a_document("new", new)

    @classmethod
    def insert(cls, id: Any, new: Mapping[str, Any]) -> Change:
        """A new document. O(1).

        >>> change = Change.insert(7, {"org": 3, "status": "open"})
        >>> change.kind, change.old, change.new
        ('insert', None, {'org': 3, 'status': 'open'})
        """
        return cls("insert", id, None, new)

    @classmethod
    def update(cls, id: Any, old: Mapping[str, Any], new: Mapping[str, Any]) -> Change:
        """A document that changed from ``old`` to ``new``. O(1).

        >>> old = {"org": 3, "status": "open"}
        >>> change = Change.update(7, old, {**old, "status": "paid"})
        >>> change.kind, change.new
        ('update', {'org': 3, 'status': 'paid'})
        """
        return cls("update", id, old, new)

    @classmethod
    def delete(cls, id: Any, old: Mapping[str, Any]) -> Change:
        """A document that was removed (``old`` is its last state). O(1).

        >>> change = Change.delete(7, {"org": 3, "status": "paid"})
        >>> change.kind, change.old, change.new
        ('delete', {'org': 3, 'status': 'paid'}, None)
        """
        return cls("delete", id, old, None)


def _not_a_document(which: str, document: object) -> InvalidDocumentError:
    return InvalidDocumentError(
        f"the {which} document of a change must be a mapping (a dict of fields), not "
        f"{type(document).__name__} {_show(document)}"
    )


class ChangeHandler:
    """Keeps aggregates in sync with documents stored elsewhere, from the changes you report.

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> hooks = tallytree.ChangeHandler(db)
    >>> invoices = hooks.aggregate("invoices", namespace="org", key="status", values=("total",))
    >>> with db.write() as tx:
    ...     hooks.apply(tx, Change.insert(1, {"org": 7, "status": "open", "total": 120}))
    ...     hooks.apply(tx, Change.update(1, {"org": 7, "status": "open", "total": 120},
    ...                                      {"org": 7, "status": "paid", "total": 120}))
    >>> with db.read() as tx:
    ...     invoices.count(tx, namespace=7, eq="paid"), invoices.count(tx, namespace=7, eq="open")
    (1, 0)
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._definitions: dict[str, Definition] = {}

    def __repr__(self) -> str:
        return f"<ChangeHandler aggregates={sorted(self._definitions)}>"

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
        """Open (or create) the aggregate ``name`` and register how documents map to its items.

        The extractors are those of :meth:`tallytree.Table.aggregate`. The functions live in this
        handler (pass them again in each process), and a description of the definition (field names,
        functions by name and code fingerprint) is stored with the aggregate, as a table stores
        its own: registering the stored definition again, in any process or handler, returns the
        aggregate (without writing); another one raises SchemaMismatchError, saying what differs,
        since the aggregate holds the stored definition's items and other processes may still
        maintain it with that one. An aggregate without a stored definition (made by
        ``db.aggregate()`` or an older release) is adopted: the definition is stored, its items kept.
        The value fields and node size are fixed at creation, as for ``db.aggregate()``.

        ``redefine=True`` changes the definition: when the stored one differs (or none is stored),
        the aggregate is emptied (made anew, under a new id: its old items followed the old
        definition) and the new definition stored, in one write transaction; refill it from the
        source with :func:`repair` (or ``build``). The value fields and node size may change too.
        Processes still running the old definition are then refused (SchemaMismatchError, nothing
        written) by their next ``apply``: stop them, or restart them with the new definition. When
        the stored definition is the given one already, ``redefine=True`` changes nothing, so a
        deploy may run it twice; yet keep it out of every worker's start-up, where an old worker
        restarting with its own ``redefine=True`` would switch the aggregate back.

        O(1) reads; writing (creating, adopting, redefining) needs its own write transaction, so
        call this before ``with db.write()`` (TransactionError inside); redefining deletes the old
        trees, O(nodes). Raises TransactionError for an aggregate a table maintains.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> paid = hooks.aggregate("paid_by_day", key="day", where={"status": "paid"},
        ...                        values={"cents": lambda row: row["eur"] * 100})
        >>> with db.write() as tx:
        ...     hooks.apply(tx, Change.insert(1, {"day": 1, "status": "paid", "eur": 3}))
        ...     hooks.apply(tx, Change.insert(2, {"day": 1, "status": "open", "eur": 9}))
        >>> with db.read() as tx:
        ...     paid.totals(tx)
        Totals(count=1, cents=300)
        >>> tallytree.ChangeHandler(db).aggregate("paid_by_day", key="week", values=("cents",))
        Traceback (most recent call last):
        tallytree.errors.SchemaMismatchError: aggregate 'paid_by_day' is stored with another definition: ...

        The migration: register the new definition once with ``redefine=True``, then refill:

        >>> rows = [{"id": 1, "week": 1, "cents": 300}, {"id": 3, "week": 1, "cents": 50}]
        >>> weekly = hooks.aggregate("paid_by_day", key="week", values=("cents",), redefine=True)
        >>> with db.write() as tx:
        ...     tallytree.repair(tx, weekly, rows).missing, weekly.totals(tx)
        (2, Totals(count=2, cents=350))
        """
        check_flag(redefine, "redefine")
        if isinstance(values, Mapping):
            specs: dict[str, Extractor] = dict(values)
        elif isinstance(values, str):
            raise InvalidArgumentError(
                f"values= takes a sequence of field names, e.g. ({values!r},), not a str"
            )
        else:
            specs = {field: field for field in _check_fields(values)}
        fields = _check_fields(tuple(specs))
        _check_name(name, "an aggregate")
        if node_size is not None:
            _check_node_size(node_size)
        description = describe_definition(name, key, namespace, specs, where, on_missing)  # before creating
        aggregate = _register(self._db, name, fields, node_size, description, redefine)
        definition = Definition(
            aggregate, key=key, namespace=namespace, values=specs, where=where, on_missing=on_missing
        )
        # copied, not changed in place: an apply() in another thread iterates the one it read
        self._definitions = {**self._definitions, name: definition}
        self._db._handled[name] = definition
        return aggregate

    def detach(self, name: str) -> Aggregate:
        """Stop maintaining the aggregate ``name`` with this handler; return it.

        The counterpart of :meth:`aggregate`, as :meth:`tallytree.Table.detach` is of
        ``table.aggregate()``: the aggregate keeps its items and its stored definition, and
        :meth:`apply` no longer touches it (changes already queued by an integration included). A
        handler never refuses an aggregate's own writes, so those stay allowed. :func:`verify` and
        :func:`repair` without ``definition=`` then no longer know its extractors, unless another
        handler of this process registered it since. Its items still follow the stored definition,
        so registering it again takes that definition, or another one with ``redefine=True``
        (which empties it, to :func:`repair` from the source); to retire it, ``db.drop_aggregate``
        it after detaching. O(a) for a registered aggregates; needs no transaction. Raises
        AggregateNotFoundError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> by_day = hooks.aggregate("by_day", key="day")
        >>> with db.write() as tx:
        ...     hooks.apply(tx, Change.insert(1, {"day": 1}))
        >>> hooks.detach("by_day") is by_day, hooks.aggregates()
        (True, [])
        >>> with db.write() as tx:
        ...     hooks.apply(tx, Change.insert(2, {"day": 2}))  # by_day is no longer maintained
        ...     by_day.count(tx)
        1
        """
        definition = self.definition(name)
        self._definitions = {key: each for key, each in self._definitions.items() if key != name}
        if self._db._handled.get(name) is definition:
            self._db._handled.pop(name, None)
        return definition.aggregate

    def aggregates(self) -> list[str]:
        """The names of the registered aggregates, sorted. O(a log a) for a registered aggregates.

        Only those registered with this handler, unlike :meth:`tallytree.Database.aggregates`:

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> _ = hooks.aggregate("by_user", key="user"), hooks.aggregate("by_day", key="day")
        >>> _ = db.aggregate("other")
        >>> hooks.aggregates(), db.aggregates()
        (['by_day', 'by_user'], ['by_day', 'by_user', 'other'])
        """
        return sorted(self._definitions)

    def definition(self, name: str) -> Definition:
        """The extractors registered for ``name``. O(1). Raises AggregateNotFoundError.

        >>> import tallytree
        >>> hooks = tallytree.ChangeHandler(tallytree.open_memory())
        >>> _ = hooks.aggregate("invoices", namespace="org", key=("status", "due"), values=("total",))
        >>> definition = hooks.definition("invoices")
        >>> definition.namespace_spec, definition.key_spec, definition.fields
        ('org', ('status', 'due'), ('total',))
        >>> hooks.definition("refunds")
        Traceback (most recent call last):
        tallytree.errors.AggregateNotFoundError: this handler has no aggregate 'refunds'
        """
        try:
            return self._definitions[name]
        except KeyError:
            raise AggregateNotFoundError(f"this handler has no aggregate {name!r}") from None

    def apply(self, tx: WriteTransaction, change: Change, *, idempotent: bool = False) -> None:
        """Apply one change to every registered aggregate, in ``tx``. O(a log n).

        Strict by default: raises ItemNotFoundError when an old item is absent and DuplicateItemError
        when a new one is already there (checked for every aggregate first: nothing is written).
        ``idempotent=True`` accepts both, so replaying changes in order converges. Raises
        ExtractionError for a document the extractors cannot read.

        An update that changes the namespace moves the item to the new namespace:

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> per_team = hooks.aggregate("points_per_team", namespace="team", key="due", values=("points",))
        >>> task = {"team": "red", "due": 3, "points": 5}
        >>> with db.write() as tx:
        ...     hooks.apply(tx, Change.insert(1, task))
        ...     hooks.apply(tx, Change.update(1, task, {**task, "team": "blue"}))
        >>> with db.read() as tx:
        ...     per_team.count(tx, namespace="red"), per_team.totals(tx, namespace="blue")
        (0, Totals(count=1, points=5))
        """
        check_flag(idempotent, "idempotent")
        self._apply(tx, change, idempotent)

    def _apply(self, tx: Transaction, change: Change, idempotent: bool) -> None:
        _apply_one(_writable(self._db, tx), self._definitions.values(), change, idempotent)

    def apply_many(self, tx: WriteTransaction, changes: Iterable[Change], *, idempotent: bool = False) -> int:
        """Apply changes in order (see :meth:`apply`) as one batch; return how many.

        The result is that of :meth:`apply` change by change, strict or idempotent, errors included:
        a batch raises the error of the first change that fails (ItemNotFoundError,
        DuplicateItemError, ExtractionError, ArgumentTypeError for something not a Change, or the
        iterator's own), but writes nothing at all, where change by change the earlier changes would
        be written. The changes are checked first, against what the earlier ones in the batch leave;
        then their net effect is written per tree: removals in one pass down the tree, then the new
        items in one sorted merge, as :meth:`tallytree.Table.insert_many` does (a document inserted and
        deleted in the batch costs nothing). O(m a) to check m changes of a aggregates, plus O(log n) per item
        removed, moved or checked, plus O(t log B + k) for k new items landing in t leaves of size B:
        10,000 inserts into 10^6 items took 0.25x the time of change by change when time-ordered,
        0.31x when scattered (0.19x idempotent; see docs/performance.md). Memory: O(m a) for the
        batch's items.

        Replaying a log with ``idempotent=True`` converges instead of counting twice:

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> daily = hooks.aggregate("amount_per_day", key="day", values=("amount",))
        >>> row = {"day": 1, "amount": 5}
        >>> log = [Change.insert(1, row), Change.update(1, row, {"day": 2, "amount": 7})]
        >>> with db.write() as tx:
        ...     hooks.apply_many(tx, log), hooks.apply_many(tx, log, idempotent=True)
        (2, 2)
        >>> with db.read() as tx:
        ...     daily.totals(tx)
        Totals(count=1, amount=7)
        """
        check_flag(idempotent, "idempotent")
        changes = iterator_of(changes, "apply_many", "Change objects")
        return apply_changes(
            self._db, tx, zip(repeat(tuple(self._definitions.values())), changes), idempotent
        )


def _writable(db: Database, tx: Transaction) -> WriteTransaction:
    check_transaction(tx, db, "applying changes")
    if not isinstance(tx, WriteTransaction):
        raise TransactionError("applying changes needs a write transaction: `with db.write() as tx:`")
    return tx


# ---------------------------------------------------------------- stored definitions

_ROLES = ("key", "namespace", "values", "where", "on_missing")
"""The parts of a stored description (``_extract.describe_definition``), in the order messages show them."""

_Action = Literal["create", "adopt", "recreate"]


def _register(
    db: Database,
    name: str,
    fields: tuple[str, ...],
    node_size: int | None,
    description: dict[str, Any],
    redefine: bool,
) -> Aggregate:
    """The aggregate ``name`` with ``description`` stored, after what :func:`_plan` says to write
    (decided in a read transaction, then again in the write transaction if one is needed)."""
    key = DEFINITIONS + name.encode()
    with db.read() as tx:
        record = tx.meta(key)
        action = _plan(tx, name, record, fields, node_size, description, redefine)
        if action is None or (action == "adopt" and getattr(db._backend, "readonly", False)):
            assert record is not None
            return _aggregate_of(db, tx, name, record)  # (read-only: nothing can be applied anyway)
    if getattr(db._local, "writing", False):
        raise TransactionError(
            f"aggregate {name!r}: registering it {_WRITES[action]}, which needs its own write "
            "transaction; call hooks.aggregate() before `with db.write()`, not inside"
        )
    undo: Callable[[], None] | None = None
    try:
        with db.write() as wtx:
            record = wtx.meta(key)
            action = _plan(wtx, name, record, fields, node_size, description, redefine)
            if action is None:
                assert record is not None
                return _aggregate_of(db, wtx, name, record)
            if action == "adopt":
                assert record is not None
                stored = decode_definition(name, record, wtx)
                stored["extractors"] = description
                wtx.set_meta(key, msgpack.packb(stored, datetime=True))
                return _aggregate_of(db, wtx, name, record)
            size = node_size or DEFAULT_NODE_SIZE
            previous = None
            if action == "recreate":
                assert record is not None
                previous = _aggregate_of(db, wtx, name, record)
                _drop_trees(wtx, previous)
                size = node_size or previous.node_size
            aggregate = define_aggregate(wtx, name, fields, size, extractors=description)
            undo = _replace(db, name, previous, aggregate)  # before the commit: see _replace
    except BaseException:
        if undo is not None:
            undo()
        raise
    return aggregate


_WRITES = {
    "create": "creates it",
    "adopt": (
        "stores its definition with it (an aggregate without one: made by db.aggregate() or an older release)"
    ),
    "recreate": "with redefine=True empties it and stores the new definition",
}


def _plan(
    tx: Transaction,
    name: str,
    record: bytes | None,
    fields: tuple[str, ...],
    node_size: int | None,
    description: dict[str, Any],
    redefine: bool,
) -> _Action | None:
    """What registering ``description`` must write, given the stored record of the aggregate: None
    (nothing: it is stored already), or an action (see the module docstring). Raises
    SchemaMismatchError for another definition without ``redefine``, TransactionError for an
    aggregate a table maintains, CorruptDatabaseError for a damaged record. O(size of the record)."""
    if record is None:
        return "create"
    stored = decode_definition(name, record, tx)
    table = stored.get("table")
    if table is not None:
        raise TransactionError(owned_reason(name, table))
    extractors = stored_extractors(name, record)
    shape = _shape_differences(stored, fields, node_size)
    if not shape and extractors is not None and same_description(extractors, description):
        return None
    if redefine:
        return "recreate"
    if shape:
        raise SchemaMismatchError(
            f"aggregate {name!r} is stored with {'; '.join(shape)}: they are fixed at creation. To "
            f"change them, {_MIGRATION.format(name=name)}"
        )
    if extractors is None:
        return "adopt"
    raise SchemaMismatchError(
        f"aggregate {name!r} is stored with another definition: {_differences(extractors, description)}. "
        f"Its items follow the stored one, which other processes may still be running. To change it, "
        f"{_MIGRATION.format(name=name)}"
    )


_MIGRATION = (
    "stop the processes that register the stored definition, register the new one once with "
    "handler.aggregate({name!r}, ..., redefine=True) (it empties the aggregate) and refill it from "
    "the source: tallytree.repair(tx, aggregate, rows)"
)


def _shape_differences(
    stored: Mapping[str, Any], fields: tuple[str, ...], node_size: int | None
) -> list[str]:
    """How the value fields and node size given differ from a stored aggregate's."""
    found = []
    if tuple(stored["values"]) != fields:
        found.append(f"value fields {list(stored['values'])}, not {list(fields)}")
    if node_size is not None and node_size != stored["node_size"]:
        found.append(f"node_size={stored['node_size']}, not {node_size}")
    return found


def stored_extractors(name: str, record: bytes) -> dict[str, Any] | None:
    """The description of the definition stored in an aggregate's META record (None when it has
    none), in the form of ``describe_definition`` (datetimes as UTC datetimes). Call after
    ``decode_definition`` accepted the record. Raises CorruptDatabaseError for one that is no
    description. O(size of the record).

    >>> import msgpack
    >>> stored_extractors("a", msgpack.packb({"id": 1, "values": [], "node_size": 64}))
    >>> record = {"id": 1, "values": [], "node_size": 64, "extractors": {"key": ["field", "day"],
    ...           "namespace": None, "values": [], "where": None, "on_missing": "error"}}
    >>> stored_extractors("a", msgpack.packb(record))["key"]
    ['field', 'day']
    """
    try:
        extractors = msgpack.unpackb(record, raw=False, timestamp=3).get("extractors")
    except Exception as exc:  # (a timestamp beyond datetime's range, say)
        raise _damaged_extractors(name, f"they do not decode ({type(exc).__name__}: {exc})") from exc
    if extractors is None:
        return None
    if type(extractors) is not dict or sorted(extractors) != sorted(_ROLES):
        raise _damaged_extractors(name, f"they are {_show(extractors)}, not a map of {list(_ROLES)}")
    return extractors


def _damaged_extractors(name: str, problem: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"the definition of aggregate {name!r} (META record {DEFINITIONS + name.encode()!r}) is damaged: "
        f"the extractors stored with it: {problem}; restore the database from a backup, or register "
        f"the aggregate again with handler.aggregate({name!r}, ..., redefine=True) and repair it from "
        "the source"
    )


def _differences(stored: Mapping[str, Any], given: Mapping[str, Any], labels: str = "stored, given") -> str:
    """The parts of two descriptions that differ, as written: ``key='day' stored, 'week' given``."""
    first, second = labels.split(", ")
    parts = []
    for role in _ROLES:
        was, now = stored.get(role), given.get(role)
        if same_description(was, now):
            continue
        shown_was, shown_now = _show_part(role, was), _show_part(role, now)
        if shown_was == shown_now:  # a function of the same name whose code differs
            shown_now += " (other code)"
        parts.append(f"{role}={shown_was} {first}, {shown_now} {second}")
    return "; ".join(parts)


def _show_part(role: str, part: Any) -> str:
    """A part of a description as the extractor was written: ``'day'``, ``('org', 'day')``,
    ``function stats.day_of``, ``{'total': 'total'}``."""
    if role == "values" and isinstance(part, list):
        return "{" + ", ".join(f"{field!r}: {_show_part('', spec)}" for field, spec in part) + "}"
    if isinstance(part, list) and len(part) >= 2:
        kind = part[0]
        if kind == "field":
            return repr(part[1])
        if kind == "fields":
            return repr(tuple(part[1]))
        if kind == "equals":
            return repr(part[1])
        if kind == "function":
            return f"function {part[1]}"
    return repr(part)


def _aggregate_of(db: Database, tx: Transaction, name: str, record: bytes) -> Aggregate:
    """The database's object for the aggregate stored as ``record`` (a new one when the object it
    holds is of an aggregate of that name dropped since)."""
    agg_id = decode_definition(name, record, tx)["id"]
    known = db._aggregates.get(name)
    if known is None or known._id != agg_id or known._dropped is not None:
        known = db._aggregate_from(name, record, tx)
        db._aggregates[name] = known
    return known


def _replace(db: Database, name: str, previous: Aggregate | None, aggregate: Aggregate) -> Callable[[], None]:
    """Make ``aggregate`` the database's object for ``name``, the ``previous`` one (redefined) gone,
    before the write transaction that made it commits: a handler of another thread whose
    transaction begins right after the commit would find the backend's epoch not moved yet (it
    moves after the commit), and go on with the old definition. Returns what puts it back if the
    commit fails."""
    registered = db._aggregates.get(name)
    dropped = previous._dropped if previous is not None else None

    def undo() -> None:
        if registered is None:
            db._aggregates.pop(name, None)
        else:
            db._aggregates[name] = registered
        if previous is not None:
            previous._dropped = dropped

    if previous is not None:
        previous._dropped = f"aggregate {name!r} was redefined (handler.aggregate(..., redefine=True))"
    db._aggregates[name] = aggregate
    return undo


def confirm_registered(tx: Transaction, definitions: Iterable[Definition]) -> None:
    """Raise unless the aggregate of every definition a handler registered is still the one stored
    under its name, so with that definition (see the module docstring): SchemaMismatchError when it
    was redefined since, TransactionError when it was dropped. Called before anything is extracted
    or written. Two attribute tests per definition while the backend's epoch stays, one META get
    per aggregate when it moved. O(a) for a definitions.

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> old, new = tallytree.ChangeHandler(db), tallytree.ChangeHandler(db)
    >>> _ = old.aggregate("by_day", key="day")
    >>> _ = new.aggregate("by_day", key="week", redefine=True)
    >>> with db.write() as tx:
    ...     old.apply(tx, Change.insert(1, {"day": 3}))
    Traceback (most recent call last):
    tallytree.errors.SchemaMismatchError: aggregate 'by_day' was redefined after this handler ...
    """
    epoch = tx._epoch
    for definition in definitions:
        aggregate = definition.aggregate
        if aggregate._epoch != epoch or aggregate._dropped is not None:
            try:
                aggregate._check(tx)
            except TransactionError as exc:
                if aggregate._dropped is None:  # (a transaction of another database, or ended)
                    raise
                raise not_registered(tx, definition) from exc


def not_registered(tx: Transaction, definition: Definition) -> Exception:
    """The error for a definition whose aggregate is no longer the one stored under its name."""
    name = definition.name
    record = tx.meta(DEFINITIONS + name.encode())
    if record is None:
        return TransactionError(
            f"aggregate {name!r} was dropped after this handler registered it; nothing was written. "
            f"Stop maintaining it (handler.detach({name!r})), or register it again "
            f"(handler.aggregate({name!r}, ...)) to maintain a new aggregate of that name"
        )
    stored = decode_definition(name, record, tx)
    table = stored.get("table")
    if table is not None:
        return TransactionError(
            f"aggregate {name!r} was dropped after this handler registered it, and is now maintained "
            f"by table {table!r}; nothing was written. Stop maintaining it: handler.detach({name!r})"
        )
    extractors = stored_extractors(name, record)
    aggregate = definition.aggregate
    if (
        extractors is not None
        and same_description(extractors, definition.description)
        and not _shape_differences(stored, aggregate.fields, aggregate.node_size)
    ):
        return TransactionError(
            f"aggregate {name!r} was dropped and created again with this handler's definition after "
            f"this handler registered it; nothing was written. Register it again "
            f"(handler.aggregate({name!r}, ...)) to maintain the new one"
        )
    differences = _shape_differences(stored, aggregate.fields, aggregate.node_size)
    if extractors is None:
        differences.insert(0, "no definition stored now")
    elif not same_description(extractors, definition.description):
        differences.insert(0, _differences(extractors, definition.description, "stored now, this handler's"))
    return SchemaMismatchError(
        f"aggregate {name!r} was redefined after this handler registered it (by another process, or "
        f"another handler with redefine=True): {'; '.join(differences)}; nothing was written. This "
        "process must not maintain it with the old definition: restart it with the new one (or "
        f"register the new one: handler.aggregate({name!r}, ...))"
    )


# ---------------------------------------------------------------- batches of changes

_Place = tuple[bytes, bytes]
"""An item's place in a database: (tree key, entry). The tree key holds the aggregate's id, and the
entry the document id, so places of different aggregates or documents never meet."""

_Need = tuple[Aggregate, Coord | None, Coord | None, Any]
"""A strict check against a tree as stored before the batch: (aggregate, old item that must be held
or None, new item whose place must be free or None, document id)."""

_MERGE_AT = 6
"""A batch puts fewer items than this into a tree one by one, more in one sorted merge. Measured on
scattered keys into a tree of 10^5 items (apply_many, both modes, medians per change): the merge
cost 1.15x, 1.08x and 1.04x the single inserts for 2, 3 and 4 items, 0.94x for 6, 0.88x for 8 and
0.56-0.62x for 32."""

_APPENDS_MERGE_AT = 24
"""Fewer items than this that all sort after a tree's pending appends go in one by one: they join the
pending node, which a merge would first merge into the leaves. Measured on time-ordered batches
committed one after another into a tree of 10^5 items: the merge cost 1.5x the single appends for 8
items, 1.2x for 16, 1.0x for 24, 0.95x for 28, 0.7x for 32 and 0.5-0.6x from 100."""


def _apply_one(
    tx: WriteTransaction, definitions: Iterable[Definition], change: Any, idempotent: bool
) -> None:
    """Apply one change to the aggregates of ``definitions``: every item extracted and checked (or, in
    idempotent mode, every aggregate found not dropped) before anything is written."""
    if not isinstance(change, Change):
        raise ArgumentTypeError(f"apply() takes a Change, not {type(change).__name__}")
    confirm_registered(tx, definitions)
    id_bytes = encode_id(change.id)
    plans: list[tuple[Aggregate, Coord | None, Coord | None]] = []
    for definition in definitions:
        old = definition.coordinates(change.old, change.id, id_bytes) if change.old is not None else None
        new = definition.coordinates(change.new, change.id, id_bytes) if change.new is not None else None
        plans.append((definition.aggregate, old, new))
    for aggregate, old, new in plans:
        if idempotent:
            if not _stays(old, new):  # a dropped aggregate raises before anything is written
                aggregate._check(tx)
        else:
            check_strict(tx, aggregate, old, new, change.id)
    for aggregate, old, new in plans:
        if old is not None or new is not None:
            move(tx, aggregate, old, new)


def apply_changes(
    db: Database,
    tx: Transaction,
    changes: Iterable[tuple[Sequence[Definition], Any]],
    idempotent: bool,
) -> int:
    """Apply ``(definitions, change)`` pairs in order as one batch, each change to the aggregates of
    its definitions; return how many changes there were. ``ChangeHandler.apply_many`` and the
    SQLAlchemy ``Sync`` go through here.

    Same result as :meth:`ChangeHandler.apply` change by change, errors included (the same error,
    naming the same change), but a batch that raises writes nothing. The changes are simulated first
    on an overlay of the places they touch (:class:`_Batch`): each change is checked against what the
    changes before it left (strict mode), and only a place no earlier change touched is read from
    the trees, all of those at the end, per tree (a new place after the tree's last entry, an
    append, is free without a read). Then the net effect is written, per tree: removals in one
    pass, then the items to put there in one sorted merge (``Tree.merge_sorted``, the kernel under
    ``Table.insert_many``, which also overwrites the values of items there), or one by one when few
    (see :data:`_MERGE_AT`). A batch of one change goes straight through :func:`_apply_one`, which
    costs less than building the overlay. A document inserted and deleted in the batch costs nothing
    in the trees. O(m a) for m changes of a aggregates, plus O(log n) per item removed, updated or
    checked as held, plus O(t log B + k) for k new items landing in t leaves.
    """
    wtx = _writable(db, tx)
    changes = iter(changes)
    first = next(changes, None)
    if first is None:
        return 0
    failure: Exception | None = None
    try:
        second = next(changes, None)
    except Exception as exc:  # the iterator's own, raised unless the first change fails
        failure, second = exc, None
    if second is None and failure is None:
        _apply_one(wtx, *first, idempotent)
        return 1
    batch = _Batch(wtx, idempotent)
    with gc_paused():  # the overlay is many live tuples: spare the GC's rescans (as Table.insert_many)
        try:
            batch.add(*first)
            if second is not None:
                batch.add(*second)
                for definitions, change in changes:
                    batch.add(definitions, change)
        except Exception as exc:  # this change (or the iterator) fails, unless an earlier one does
            failure = exc
        earlier = batch.first_failure()
        if earlier is not None:
            raise earlier
        if failure is not None:
            raise failure
        batch.write()
    return batch.count


class _Batch:
    """The net effect of changes applied in order, checked as :meth:`ChangeHandler.apply` checks them.

    ``state`` holds, for every place a change touched, what it holds after the changes so far (its
    values, or None when empty). In strict mode, a check of a place no change touched yet is deferred
    (``needs``, in order) and assumed to hold: ``initial`` records what the place must then have held
    (the old item's values, or None for a free place). The first deferred check that fails, if any,
    is the first failure of the whole batch: every check before it held, so the overlay was exact up
    to it.

    A :class:`~tallytree.Table`'s batch writes (``update_many``, ``delete_many``) go through here too,
    with ``table`` its name: each document's net move is added once (:meth:`add_moves`), and a check
    that fails is the table's drift error, for an absent old item only (a table's one-by-one writes do
    not compare the values an aggregate holds either). An item a table's batch removes is not looked
    up first: :meth:`write` removes every such item before it puts any, and finding one absent puts
    back those removed and raises, so the batch still writes nothing (a find per removal cost 15% of
    ``delete_many``).
    """

    __slots__ = (
        "aggregates", "alive", "confirmed", "count", "idempotent", "initial", "needs", "state", "table", "tx",
    )  # fmt: skip

    def __init__(self, tx: WriteTransaction, idempotent: bool, table: str | None = None) -> None:
        self.tx = tx
        self.idempotent = idempotent
        self.table = table
        self.count = 0
        self.state: dict[_Place, tuple[Any, ...] | None] = {}
        self.initial: dict[_Place, tuple[Any, ...] | None] = {}
        self.needs: list[_Need] = []
        self.aggregates: dict[bytes, Aggregate] = {}  # tree key -> its aggregate
        self.alive: set[int] = set()  # ids of the aggregates found not dropped
        # id -> the sequences of definitions found still registered (kept: their ids stay theirs)
        self.confirmed: dict[int, Sequence[Definition]] = {}

    def add(self, definitions: Sequence[Definition], change: Any) -> None:
        """Simulate one change (see :meth:`ChangeHandler.apply`). Raises its error."""
        if not isinstance(change, Change):
            raise ArgumentTypeError(f"apply() takes a Change, not {type(change).__name__}")
        if id(definitions) not in self.confirmed:  # (each handler's, once per batch)
            confirm_registered(self.tx, definitions)
            self.confirmed[id(definitions)] = definitions
        doc_id, old_doc, new_doc = change.id, change.old, change.new
        id_bytes = encode_id(doc_id)
        moves: list[tuple[Aggregate, Coord | None, Coord | None]] = []
        for definition in definitions:  # every item extracted before any check, as apply() does
            old = definition.coordinates(old_doc, doc_id, id_bytes) if old_doc is not None else None
            new = definition.coordinates(new_doc, doc_id, id_bytes) if new_doc is not None else None
            if old is not None or new is not None:
                moves.append((definition.aggregate, old, new))
        self.add_moves(moves, doc_id)

    def add_moves(self, moves: Sequence[tuple[Aggregate, Coord | None, Coord | None]], doc_id: Any) -> None:
        """Simulate one change given as its moves, each (aggregate, old item or None, new item or None),
        extracted already. Raises the error of its first check that fails against the overlay."""
        alive, strict = self.alive, not self.idempotent
        for aggregate, old, new in moves:
            if id(aggregate) not in alive and (strict or not _stays(old, new)):
                aggregate._check(self.tx)  # dropped: TransactionError (move() reads no tree for a stay)
                alive.add(id(aggregate))
            if strict:
                self._check(aggregate, old, new, doc_id)
        state, aggregates = self.state, self.aggregates
        for aggregate, old, new in moves:
            if old is not None:
                if new is not None and _stays(old, new):
                    continue
                state[old[0], old[1]] = None
                aggregates[old[0]] = aggregate
            if new is not None:
                state[new[0], new[1]] = new[2]
                aggregates[new[0]] = aggregate
        self.count += 1

    def _check(self, aggregate: Aggregate, old: Coord | None, new: Coord | None, doc_id: Any) -> None:
        """``check_strict`` against the overlay; a place the batch has not touched is checked later."""
        state = self.state
        if old is not None:
            place = (old[0], old[1])
            if place in state:
                held = state[place]
                if held is None or not same_values(held, old[2]):
                    error = self._not_held(aggregate, doc_id, held, old[2])
                    if error is not None:
                        raise error
            else:
                if self.table is None or (new is not None and new[0] == old[0] and new[1] == old[1]):
                    # (a table's removal is checked as it is made: see _remove_exactly)
                    self.needs.append((aggregate, old, None, doc_id))
                state[place] = self.initial[place] = old[2]
        if new is not None and (old is None or old[0] != new[0] or old[1] != new[1]):
            place = (new[0], new[1])
            if place in state:
                if state[place] is not None:
                    raise self._taken(aggregate, doc_id)
            else:
                self.needs.append((aggregate, None, new, doc_id))
                state[place] = self.initial[place] = None

    def first_failure(self) -> Exception | None:
        """The error of the first deferred check that fails against the trees, or None. Reads only,
        one find per item that must be held or place that must be free, but for new places after a
        tree's last entry (time-ordered appends), free by construction: O(log n) each."""
        needs = self.needs
        per_tree: dict[bytes, list[int]] = {}
        for index, (_, old, new, _) in enumerate(needs):
            coord = old if old is not None else new
            assert coord is not None
            per_tree.setdefault(coord[0], []).append(index)
        first: tuple[int, Exception] | None = None
        for tree_key, indexes in per_tree.items():
            aggregate = needs[indexes[0]][0]
            tree = _tree_of(self.tx, aggregate, tree_key)
            last = _last_entry(tree)
            for index in indexes:
                if first is not None and index > first[0]:
                    break
                _, old, new, doc_id = needs[index]
                if old is not None:
                    held = tree.find(old[1]) if last is not None else None
                    if held is None or not same_values(held, old[2]):
                        error = self._not_held(aggregate, doc_id, held, old[2])
                        if error is not None:
                            first = (index, error)
                elif (
                    new is not None and last is not None and new[1] <= last and tree.find(new[1]) is not None
                ):
                    first = (index, self._taken(aggregate, doc_id))
        return first[1] if first is not None else None

    def _not_held(
        self, aggregate: Aggregate, doc_id: Any, held: tuple[Any, ...] | None, old: tuple[Any, ...]
    ) -> Exception | None:
        """The error for an old item the aggregate holds as ``held`` (None: not at all) instead of with
        the values ``old``; None for a table's batch when it holds the item (with other values)."""
        if self.table is None:
            return _not_held(aggregate, doc_id, held, old)
        if held is not None:
            return None
        return _drifted(
            ItemNotFoundError, aggregate, f"table {self.table!r}, document {doc_id!r}", "does not hold"
        )

    def _taken(self, aggregate: Aggregate, doc_id: Any) -> Exception:
        """The error for a new item whose place the aggregate holds already."""
        if self.table is None:
            return _taken(aggregate, doc_id)
        return _drifted(
            DuplicateItemError, aggregate, f"table {self.table!r}, document {doc_id!r}", "already holds"
        )

    def write(self) -> None:
        """Write the net effect, tree by tree: removals (in one pass down the tree when they are many:
        ``Tree.delete_sorted``), then one sorted merge of the items to put (for a table's batch,
        every tree's removals first: :meth:`_remove_exactly`)."""
        initial, strict = self.initial, not self.idempotent
        per_tree: dict[bytes, tuple[list[bytes], list[tuple[bytes, tuple[Any, ...]]]]] = {}
        for place, values in self.state.items():
            if strict and place in initial:  # skip what the tree holds already
                before = initial[place]
                if before is None or values is None:
                    if before is values:
                        continue
                elif same_values(before, values):
                    continue
            tree_key, entry = place
            work = per_tree.get(tree_key)
            if work is None:
                work = per_tree[tree_key] = ([], [])
            if values is None:
                work[0].append(entry)
            else:
                work[1].append((entry, values))
        tx = self.tx
        exact = self.table is not None
        if exact:
            self._remove_exactly(per_tree)
        for tree_key, (removals, items) in per_tree.items():
            if exact and not items:
                continue
            aggregate = self.aggregates[tree_key]
            tree = _tree_of(tx, aggregate, tree_key)
            if not exact:
                _remove(tree, removals)
            items.sort(key=itemgetter(0))
            if _one_by_one(tree, items):
                for entry, values in items:
                    if not tree.insert(entry, values):
                        tree.update(entry, values)
            elif items:
                entries = [entry for entry, _ in items]
                cols = [list(col) for col in zip(*[values for _, values in items], strict=True)]
                tree.merge_sorted(entries, cols if aggregate.fields else [], "update")
            changed, root = tree.take_root()
            if changed:
                tx.set_root(tree_key, root)

    def _absent(self, aggregate: Aggregate, entry: bytes) -> ItemNotFoundError:
        """The drift error for an item a table's batch removes and the tree does not hold."""
        error = self._not_held(aggregate, decode_entry(entry)[1], None, ())
        assert isinstance(error, ItemNotFoundError)
        return error

    def _remove_exactly(self, per_tree: Mapping[bytes, tuple[list[bytes], Any]]) -> None:
        """A table's removals, in every tree, before any item is put: an item that is not there is
        drift, raised after the items removed so far are put back (so nothing is written).
        O(log n) per removal; many in a tree: O(t log B + m) for m in t leaves."""
        tx = self.tx
        removed: list[tuple[bytes, bytes, tuple[Any, ...]]] = []  # put back if one is absent
        try:
            for tree_key, (removals, _) in per_tree.items():
                if not removals:
                    continue
                aggregate = self.aggregates[tree_key]
                tree = _tree_of(tx, aggregate, tree_key)
                try:
                    if len(removals) >= _MERGE_AT:  # one pass down the tree to find them, one to remove
                        removals.sort()
                        found, edits = tree.find_sorted(removals)
                        held: list[tuple[bytes, bytes, tuple[Any, ...]]] = []
                        for entry, values in zip(removals, found, strict=True):
                            if values is None:
                                raise self._absent(aggregate, entry)
                            held.append((tree_key, entry, values))
                        tree.delete_sorted(removals, edits)
                        removed += held
                        continue
                    for entry in removals:
                        values = tree.delete(entry)
                        if values is None:
                            raise self._absent(aggregate, entry)
                        removed.append((tree_key, entry, values))
                finally:
                    changed, root = tree.take_root()
                    if changed:
                        tx.set_root(tree_key, root)
        except ItemNotFoundError:  # (the trees hold the items the earlier removals took: put them back)
            for tree_key, entry, values in reversed(removed):
                tree = _tree_of(tx, self.aggregates[tree_key], tree_key)
                tree.insert(entry, values)
                changed, root = tree.take_root()
                if changed:
                    tx.set_root(tree_key, root)
            raise


def _remove(tree: Tree, removals: list[bytes]) -> None:
    """Remove the items of ``removals`` that ``tree`` holds: one by one when few, else in one pass
    down the tree to find them (a batch may name absent ones) and one to remove them
    (``Tree.find_sorted``, ``Tree.delete_sorted``)."""
    if len(removals) < _MERGE_AT:
        for entry in removals:
            tree.delete(entry)
        return
    removals.sort()
    found, edits = tree.find_sorted(removals)
    tree.delete_sorted(
        [entry for entry, there in zip(removals, found, strict=True) if there is not None], edits
    )


def _stays(old: Coord | None, new: Coord | None) -> bool:
    """Whether a change leaves the item as it is: same place, same values (``move`` does nothing)."""
    return (
        old is not None
        and new is not None
        and old[0] == new[0]
        and old[1] == new[1]
        and same_values(old[2], new[2])
    )


def _one_by_one(tree: Tree, items: list[tuple[bytes, tuple[Any, ...]]]) -> bool:
    """Whether to put ``items`` (sorted) into ``tree`` one by one rather than in one merge."""
    if len(items) < _MERGE_AT:
        return True
    if len(items) >= _APPENDS_MERGE_AT:
        return False
    pending = tree.pending
    return pending is not None and items[0][0] > pending.keys[-1]


def _tree_of(tx: WriteTransaction, aggregate: Aggregate, tree_key: bytes) -> Tree:
    return Tree(tx, len(aggregate.fields), aggregate.node_size, tx.root(tree_key))


def _last_entry(tree: Tree) -> bytes | None:
    """The greatest entry of the tree (None when empty): its last pending append, if any, else the
    last entry of its nodes. O(log n)."""
    pending = tree.pending
    if pending is not None and pending.keys:
        return pending.keys[-1]
    return tree.nodes.last_entry()


def _not_held(
    aggregate: Aggregate, doc_id: Any, held: tuple[Any, ...] | None, old: tuple[Any, ...]
) -> Exception:
    """The error of ``check_strict`` for an old item the aggregate does not hold (same words)."""
    if held is None:
        return ItemNotFoundError(
            f"{aggregate.name}: the item of document {doc_id!r} is not in the aggregate; use "
            "apply(..., idempotent=True) for replays, or repair() to fix drift"
        )
    return ItemNotFoundError(
        f"{aggregate.name}: the item of document {doc_id!r} holds values {held!r}, not the "
        f"{old!r} of the change's old document: the change is stale or delivered twice; "
        "use apply(..., idempotent=True) for replays, or repair() to fix drift"
    )


def _taken(aggregate: Aggregate, doc_id: Any) -> Exception:
    """The error of ``check_strict`` for a new item whose place is taken (same words)."""
    return DuplicateItemError(
        f"{aggregate.name}: the item of document {doc_id!r} is already in the aggregate; use "
        "apply(..., idempotent=True) for replays and backfills"
    )


# ---------------------------------------------------------------- verify and repair


@dataclass(frozen=True, slots=True)
class DriftExample:
    """One item that differs: what the source implies (``expected``) and what the aggregate holds."""

    kind: Literal["missing", "extra", "different"]
    id: Any
    expected: tuple[Any, Item] | None
    actual: tuple[Any, Item] | None

    def __str__(self) -> str:
        def show(place: tuple[Any, Item] | None) -> str:
            if place is None:
                return "nothing"
            namespace, item = place
            return f"key={item.key!r} values={item.values!r} in namespace {namespace!r}"

        return f"{self.kind} id={self.id!r}: expected {show(self.expected)}, found {show(self.actual)}"


@dataclass(frozen=True, slots=True)
class Drift:
    """What :func:`verify` found: counts of missing, extra and different items, and examples.

    ``ok`` is True when the aggregate holds exactly the items the source implies.
    """

    aggregate: str
    documents: int
    expected: int
    actual: int
    missing: int
    extra: int
    different: int
    examples: list[DriftExample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No drift at all: nothing missing, extra or different. O(1).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> hooks = tallytree.ChangeHandler(db)
        >>> sizes = hooks.aggregate("sizes", key="size")
        >>> with db.write() as tx:
        ...     hooks.apply_many(tx, [Change.insert(1, {"size": 3}), Change.insert(2, {"size": 5})])
        2
        >>> rows = [{"id": 1, "size": 4}]  # 1 changed and 2 was deleted, neither reported
        >>> with db.read() as tx:
        ...     drift = tallytree.verify(tx, sizes, rows)
        >>> drift.ok, drift.missing, drift.extra, drift.different
        (False, 0, 1, 1)
        """
        return not (self.missing or self.extra or self.different)

    def __str__(self) -> str:
        head = (
            f"{self.aggregate}: {self.documents} document(s) -> {self.expected} item(s) expected, "
            f"{self.actual} held; missing {self.missing}, extra {self.extra}, different {self.different}"
        )
        return "\n  ".join([head, *map(str, self.examples)])


_Fix = tuple[Coord | None, Coord | None]


def _definition_for(db: Database, aggregate: Aggregate, source: Any) -> Definition:
    name = aggregate.name
    for table in db._tables.values():
        if name in table._definitions:
            return table._definitions[name]
        if name in table._pending:
            return table.definition(name)  # raises: its function must be passed again
    handled = db._handled.get(name)
    if handled is not None:
        return handled
    if isinstance(source, Table):
        return source.definition(name)
    raise AggregateNotFoundError(
        f"{aggregate.name}: no extractors known for it; attach it to a table or register it with a "
        "ChangeHandler in this process (or pass definition=)"
    )


def _documents(tx: Transaction, source: Any, id: str | Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """``(id, document)`` pairs from a table, DB-API cursor, SQLAlchemy result or iterable of rows."""
    if isinstance(source, Table):
        yield from source.items(tx)
        return
    get_id: Callable[[Any], Any] = _field_getter(id) if isinstance(id, str) else id
    rows = iterator_of(source, "verify() or repair()", _SOURCES)
    description = getattr(source, "description", None)
    if description is not None and not isinstance(source, Mapping):  # a DB-API cursor
        names = [column[0] for column in description]
        for row in rows:
            doc = dict(zip(names, row, strict=True))
            yield get_id(doc), doc
        return
    for row in rows:
        if isinstance(row, Mapping):
            yield get_id(row), row
        elif hasattr(row, "_mapping"):  # an SQLAlchemy Row
            doc = dict(row._mapping)
            yield get_id(doc), doc
        elif isinstance(row, tuple) and len(row) == 2:
            yield row[0], row[1]
        else:
            raise InvalidDocumentError(
                f"verify() reads mappings, (id, document) pairs, DB-API cursors or SQLAlchemy rows, "
                f"not {type(row).__name__}"
            )


def _field_getter(field: str) -> Callable[[Any], Any]:
    """``doc[field]``, and for a row without it an InvalidDocumentError saying what to pass."""

    def get(doc: Any) -> Any:
        try:
            return doc[field]
        except KeyError:
            raise InvalidDocumentError(
                f"a row has no {field!r} field to identify it (fields: {sorted(map(str, doc))[:10]}); pass "
                "id= the name of the rows' id field, or a function of a row"
            ) from None

    return get


_SOURCES = "rows (mappings or (id, document) pairs), a Table, a DB-API cursor or an SQLAlchemy result"


def _check_aggregate(aggregate: object) -> None:
    if not isinstance(aggregate, Aggregate):
        raise ArgumentTypeError(
            "verify() and repair() take an Aggregate (from db.aggregate(name) or table.aggregate(name)), "
            f"not {aggregate!r:.60}"
        )


def _check_options(definition: object, id: object, examples: object) -> int:
    """The options of verify() and repair(), checked before anything is read; return ``examples``
    as a plain int (a numpy integer is its int)."""
    if definition is not None and not isinstance(definition, Definition):
        raise ArgumentTypeError(
            f"definition= takes a Definition (handler.definition(name) or table.definition(name)), or "
            f"None, not {_show(definition)}"
        )
    if not isinstance(id, str) and not callable(id):
        raise ArgumentTypeError(
            f"id= takes the name of the rows' id field or a function of a row, not {_show(id)}"
        )
    if type(examples) is not int:
        return as_int(examples, f"examples= takes an int (how many examples to keep), not {_show(examples)}")
    return examples


def _owned_by(aggregate: Aggregate, source: Any, definition: Definition | None) -> bool:
    """Whether ``source`` is the table that maintains the aggregate, read with that table's extractors.

    Only then may repair() write to a table-owned aggregate: it makes the aggregate agree with its
    table again. Call after ``aggregate._check(tx)``, which reads who owns it now.
    """
    return (
        isinstance(source, Table)
        and source._db is aggregate._db
        and aggregate._owner == source.name
        and (definition is None or definition is source._definitions.get(aggregate.name))
    )


def _diff(
    tx: Transaction,
    aggregate: Aggregate,
    source: Any,
    definition: Definition | None,
    id: str | Callable[[Any], Any],
    examples: int,
) -> tuple[Drift, list[_Fix]]:
    _check_aggregate(aggregate)
    examples = _check_options(definition, id, examples)
    aggregate._check(tx)  # a transaction of its database, and the aggregate not dropped
    given = definition is not None
    if definition is None:
        definition = _definition_for(aggregate._db, aggregate, source)
    if definition.aggregate._id != aggregate._id:  # its items would go to that aggregate's trees
        raise _not_its_definition(aggregate, definition, given)
    expected: dict[bytes, Coord] = {}
    documents = 0
    for doc_id, doc in _documents(tx, source, id):
        documents += 1
        id_bytes = encode_id(doc_id)
        coord = definition.coordinates(doc, doc_id, id_bytes)
        if coord is not None:
            expected[id_bytes] = coord
        else:
            expected.pop(id_bytes, None)
    fixes: list[_Fix] = []
    shown: list[DriftExample] = []
    counts = {"missing": 0, "extra": 0, "different": 0}

    def note(kind: Literal["missing", "extra", "different"], want: Coord | None, have: Coord | None) -> None:
        counts[kind] += 1
        fixes.append((have, want))
        if len(shown) < examples:
            some = want if want is not None else have
            assert some is not None
            doc_id = decode_entry(some[1])[1]
            shown.append(DriftExample(kind, doc_id, _place(aggregate, want), _place(aggregate, have)))

    actual = 0
    seen: set[bytes] = set()
    for namespace, _ in list(aggregate.namespaces(tx)):
        tree_key = aggregate._tree_key(namespace)
        tree = Tree(tx, len(aggregate.fields), aggregate.node_size, tx.root(tree_key))
        for entry, values in tree.iterate(0, tree.count):
            actual += 1
            _, offset = decode_key(entry)
            id_bytes = entry[offset:]
            have: Coord = (tree_key, entry, values)
            want = expected.get(id_bytes)
            if want is None or id_bytes in seen:
                note("extra", None, have)
                continue
            seen.add(id_bytes)
            if want[0] != tree_key or want[1] != entry or not same_values(want[2], values):
                note("different", want, have)
    for id_bytes, want in expected.items():
        if id_bytes not in seen:
            note("missing", want, None)
    drift = Drift(
        aggregate.name,
        documents,
        len(expected),
        actual,
        counts["missing"],
        counts["extra"],
        counts["different"],
        shown,
    )
    return drift, fixes


def _not_its_definition(aggregate: Aggregate, definition: Definition, given: bool) -> Exception:
    """The error for extractors that place items in another aggregate than the one verified: another
    aggregate's (``definition=``), or those of an aggregate of the same name dropped or redefined
    since they were registered."""
    name = aggregate.name
    other = (
        f"aggregate {definition.name!r}"
        if definition.name != name
        else f"an aggregate {name!r} dropped or redefined since"
    )
    if given:
        return InvalidArgumentError(
            f"{name}: definition= gives the items of {other}, not of this one; pass the definition "
            f"of {name!r} (handler.definition({name!r}) or table.definition({name!r}))"
        )
    return AggregateNotFoundError(
        f"{name}: the extractors a ChangeHandler registered for it are those of {other}; register it "
        f"again with handler.aggregate({name!r}, ...) (or pass definition=)"
    )


def _place(aggregate: Aggregate, coord: Coord | None) -> tuple[Any, Item] | None:
    if coord is None:
        return None
    namespace = decode_key(coord[0], len(aggregate._prefix))[0]
    key, item_id = decode_entry(coord[1])
    return namespace, Item(key, item_id, tuple(coord[2]))


def verify(
    tx: Transaction,
    aggregate: Aggregate,
    source: Any,
    *,
    definition: Definition | None = None,
    id: str | Callable[[Any], Any] = "id",
    examples: int = 10,
) -> Drift:
    """Compare an aggregate with what a source of documents implies; report the drift.

    ``source`` is a :class:`~tallytree.Table`, a DB-API cursor (after ``execute``), an SQLAlchemy
    result, or any iterable of mappings (the document id read from the field ``id``, or by a function)
    or of ``(id, document)`` pairs. The extractors are the aggregate's: those of the table it is
    attached to, or of the ChangeHandler that registered it in this process (or ``definition=``).
    Returns a :class:`Drift` with counts and up to ``examples`` examples. O(n) reads, O(n) memory.
    Raises AggregateNotFoundError when no extractors are known for it (or those a handler registered
    are of an aggregate of that name dropped since), InvalidArgumentError for a ``definition=`` of
    another aggregate (its extractors place items in that aggregate's trees).

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> hooks = tallytree.ChangeHandler(db)
    >>> totals = hooks.aggregate("totals", key="day", values=("amount",))
    >>> rows = [{"id": 1, "day": 1, "amount": 5}, {"id": 2, "day": 2, "amount": 7}]
    >>> with db.write() as tx:
    ...     hooks.apply(tx, Change.insert(1, rows[0]))  # the second insert was lost
    ...     drift = tallytree.verify(tx, totals, rows)
    ...     (drift.ok, drift.missing), tallytree.repair(tx, totals, rows).missing
    ((False, 1), 1)
    >>> with db.read() as tx:
    ...     tallytree.verify(tx, totals, rows).ok
    True
    """
    return _diff(tx, aggregate, source, definition, id, examples)[0]


def repair(
    tx: WriteTransaction,
    aggregate: Aggregate,
    source: Any,
    *,
    definition: Definition | None = None,
    id: str | Callable[[Any], Any] = "id",
    examples: int = 10,
) -> Drift:
    """Make the aggregate hold exactly what the source implies, in ``tx`` (a write transaction);
    return the drift that was fixed. O(n + d log n) for d fixes.

    An aggregate a table maintains refuses writes from any other source, as its own writes do
    (TransactionError: a foreign source would make it disagree with its table); ``repair(tx, aggregate,
    table)`` from that very table restores it after damage. Raises what :func:`verify` raises.

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> loads = db.table("loads")
    >>> by_status = loads.aggregate("by_status", key="status")
    >>> with db.write() as tx:
    ...     _ = loads.insert(tx, {"status": "open"}, id=1)
    ...     tallytree.repair(tx, by_status, loads).ok
    True
    >>> with db.write() as tx:
    ...     tallytree.repair(tx, by_status, [{"id": 1, "status": "closed"}])
    Traceback (most recent call last):
    tallytree.errors.TransactionError: aggregate 'by_status' is maintained by table 'loads': write ...
    """
    _check_aggregate(aggregate)
    wtx = _writable(aggregate._db, tx)
    aggregate._check(wtx)  # the aggregate's stored definition, current: whether a table owns it now
    if not _owned_by(aggregate, source, definition):
        aggregate._writable(wtx)  # raises TransactionError for an aggregate a table maintains
    drift, fixes = _diff(wtx, aggregate, source, definition, id, examples)
    for have, _ in fixes:  # every removal first, so no insertion is undone by a later removal
        if have is not None:
            move(wtx, aggregate, have, None)
    for _, want in fixes:
        if want is not None:
            move(wtx, aggregate, None, want)
    return drift
