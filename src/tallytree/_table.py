"""Tables: documents with attached aggregates that stay in sync by construction.

Design
======
A table stores documents (dicts of msgpack-serializable values) in the DOCS store, keyed by
``table id (4 bytes) + encode_id(document id)``, in the same LMDB environment and transactions as the
aggregates. Aggregates are *attached* to a table by extractors (see ``_extract``); every write through
the table computes, for every attached aggregate, the item of the old document and the item of the new
one, validates all of them, and only then writes the document and moves each item, all in the caller's
transaction. The aggregates therefore cannot drift from the documents: there is no other write path
(their public writes are refused), and a write that raises has changed nothing.

What the META table holds for a table::

    b"table:" + name   -> msgpack {"id": 3, "aggregates": {name: description, ...}}
    b"tstate:" + id    -> document count, next generated id (two unsigned 64-bit big-endian ints)
    b"agg:" + name     -> the aggregate's usual definition, plus "table": name (owned: read-only)

Documents are stored as msgpack (numpy and pandas values as the Python values they stand for, see
``_docs``) and extractors always run on the decoded form (what ``get`` returns),
so the item computed when a document is removed is exactly the one computed when it was written. In
that form tuples are lists (a list key is used as a tuple) and datetimes are UTC.

Definitions persist. Field-based ones reattach on reopening; one that uses a function is *pending*
until the same ``table.aggregate(...)`` call is made again (the function is compared with the stored
name and code fingerprint), and until then the table refuses writes rather than let it drift. Each write
transaction first checks the stored table record, so an aggregate attached by another process is never
skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

import msgpack

from ._aggregate import Aggregate, Totals, resolve_bounds
from ._args import check_flag, iterator_of
from ._btree import Root
from ._bulk import Columns, build_columns
from ._docs import STORED_TYPES, Refused, path_to, stand_in
from ._extract import (
    Coord,
    Definition,
    Extractor,
    OnMissing,
    Where,
    definition_from,
    has_function,
    move,
    move_exactly,
    same_description,
)
from ._gc import gc_paused
from ._keys import decode_key, encode_id, foreign_scalar
from ._store import META, ROOTS
from ._tree import Tree
from ._txn import (
    DEFINITIONS,
    MAX_AGGREGATE_ID,
    Transaction,
    WriteTransaction,
    check_transaction,
    counter_damaged,
    decode_definition,
    decode_root,
)
from .errors import (
    AggregateNotFoundError,
    ArgumentTypeError,
    CorruptDatabaseError,
    DuplicateItemError,
    ExtractionError,
    InvalidArgumentError,
    InvalidDocumentError,
    ItemNotFoundError,
    SchemaMismatchError,
    TransactionError,
    UnsupportedKeyTypeError,
)

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["Table", "decode_doc", "encode_doc"]

_TABLE_PREFIX = b"table:"
_STATE_PREFIX = b"tstate:"
_NEXT_TABLE = b"next_table"
_STATE = struct.Struct(">QQ")
_MAX_GENERATED = 2**62  # explicit int ids above this do not move the generated-id counter
_ATTACH_BATCH = 8_192  # documents read, decoded and extracted at once when attaching

Document = dict[str, Any]
_Net = list[Any]
"""A document a batch write changes (``update_many``, ``delete_many``): ``[id, its stored bytes before
the batch (None for a deletion), its items before (a Coord or None per attached aggregate, in order),
its bytes after (None: deleted), its items after (None: deleted)]``."""


def encode_doc(doc: Any, doc_id: Any, where: str) -> bytes:
    """The stored form of a document: msgpack, with the values of other types that stand for stored
    ones (numpy scalars, pandas Timestamps) stored as those (``_docs``). O(size of the document).

    >>> decode_doc(encode_doc({"n": 3, "tags": ("a", "b")}, 1, "table 't'"))
    {'n': 3, 'tags': ['a', 'b']}
    >>> encode_doc({"tags": {"a"}}, 1, "table 't'")
    Traceback (most recent call last):
    tallytree.errors.InvalidDocumentError: table 't': document 1 cannot be stored: at ['tags'], ...

    Raises InvalidDocumentError, naming where in the document a value that cannot be stored is.
    """
    if not isinstance(doc, Mapping):
        raise InvalidDocumentError(
            f"{where}: document {doc_id!r} must be a mapping (a dict of fields), not {type(doc).__name__}"
        )
    try:  # a plain document: msgpack alone (with a default= hook an insert ran 1.3% more instructions)
        return msgpack.packb(doc, use_bin_type=True, datetime=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError):  # again, with the values that stand for stored ones
        pass
    try:
        return msgpack.packb(  # type: ignore[no-any-return]
            doc, use_bin_type=True, datetime=True, default=stand_in
        )
    except Refused as exc:
        path = path_to(doc, exc.value)
        at = f"at {path}, " if path is not None else ""
        raise InvalidDocumentError(f"{where}: document {doc_id!r} cannot be stored: {at}{exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidDocumentError(
            f"{where}: document {doc_id!r} cannot be stored: {exc}. Documents hold {STORED_TYPES}"
        ) from exc


def plain_id(doc_id: Any) -> Any:
    """A document id as the table stores it: an int subclass or a numpy integer is its int (what
    :meth:`Table.ids` reads back, and what moves the generated-id counter); any other id as given
    (:func:`~tallytree._keys.encode_id` refuses those of no id type). O(1).

    >>> from enum import IntEnum
    >>> plain_id(IntEnum("Id", "ONE")(1)), plain_id("a")
    (1, 'a')
    """
    if type(doc_id) is int or type(doc_id) is str or isinstance(doc_id, bool):
        return doc_id
    if isinstance(doc_id, int):
        return int(doc_id)
    plain = foreign_scalar(doc_id)
    return plain if type(plain) is int else doc_id


def decode_doc(data: bytes) -> Document:
    """Inverse of :func:`encode_doc`: dicts, lists for tuples, UTC datetimes. For bytes it encoded
    itself; a stored document goes through :meth:`Table._stored_doc`, which checks it."""
    try:
        return msgpack.unpackb(  # type: ignore[no-any-return]
            data, raw=False, timestamp=3, strict_map_key=False
        )
    except TypeError as exc:  # packed, but not back: a dict key that is a tuple comes back a list
        raise InvalidDocumentError(
            f"a document cannot be stored: {exc} (a dict key that is a tuple or a list?). Dict keys "
            "in documents are str, int, float, bool, None or bytes"
        ) from exc


def _damage(what: str, problem: str) -> CorruptDatabaseError:
    """The error for a stored table record or document that is damaged (``what`` names it)."""
    return CorruptDatabaseError(
        f"{what} is damaged: {problem}; restore the database from a backup, or rebuild the table from "
        "the source data (`tallytree check` reports damage to the tables' records, their documents and "
        "the aggregates)"
    )


def decode_record(name: str, record: bytes) -> dict[str, Any]:
    """The stored record of table ``name`` (META ``table:`` + name), checked: a map of ``id`` (an
    int from 1 to 2**32 - 2) and ``aggregates`` (a map of aggregate names to descriptions, each a
    map). Decoded when a table is opened or its record changes, never per document. Raises
    CorruptDatabaseError naming the record. O(attached aggregates).

    >>> decode_record("loads", msgpack.packb({"id": 2, "aggregates": {}}))
    {'id': 2, 'aggregates': {}}
    >>> decode_record("loads", msgpack.packb([2, {}]))
    Traceback (most recent call last):
    tallytree.errors.CorruptDatabaseError: the record of table 'loads' (META b'table:loads') is damaged: ...
    """
    what = f"the record of table {name!r} (META {_TABLE_PREFIX + name.encode()!r})"
    try:
        data = msgpack.unpackb(record, raw=False)
    except (ValueError, TypeError) as exc:  # msgpack's errors (and UnicodeDecodeError) are ValueErrors
        raise _damage(what, f"it does not decode ({type(exc).__name__}: {exc})") from exc
    if type(data) is not dict or "id" not in data or "aggregates" not in data:
        raise _damage(what, "it is not a map of an id and the attached aggregates")
    table_id, aggregates = data["id"], data["aggregates"]
    if type(table_id) is not int or not 1 <= table_id <= MAX_AGGREGATE_ID:
        raise _damage(what, f"its id is {table_id!r:.60}, not an int from 1 to {MAX_AGGREGATE_ID}")
    if type(aggregates) is not dict or not all(
        type(key) is str and key and type(description) is dict for key, description in aggregates.items()
    ):
        raise _damage(what, f"its aggregates {aggregates!r:.60} are not a map of names to definitions")
    return data


def same_doc(stored: bytes | None, data: bytes) -> bool:
    """Whether two stored documents hold the same fields and values, types included, in whatever
    field order (``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are the same document). O(size).

    >>> same_doc(encode_doc({"a": 1, "b": 2}, 1, ""), encode_doc({"b": 2, "a": 1}, 1, ""))
    True
    >>> same_doc(encode_doc({"a": 1}, 1, ""), encode_doc({"a": 1.0}, 1, ""))
    False
    """
    if stored == data:
        return True
    if stored is None or len(stored) != len(data):  # reordering fields keeps the length
        return False
    return _canonical(decode_doc(stored)) == _canonical(decode_doc(data))


def _canonical(value: Any) -> bytes:
    """msgpack of ``value`` with every mapping's fields in sorted order (by type, then value)."""

    def ordered(item: Any) -> Any:
        if isinstance(item, dict):
            pairs = sorted(item.items(), key=lambda pair: (type(pair[0]).__name__, pair[0]))
            return {key: ordered(inner) for key, inner in pairs}
        if isinstance(item, list):
            return [ordered(inner) for inner in item]
        return item

    return msgpack.packb(ordered(value), use_bin_type=True, datetime=True)  # type: ignore[no-any-return]


def decode_docs(datas: Sequence[bytes]) -> list[Document]:
    """:func:`decode_doc` of many documents, in one msgpack call (as one array)."""
    header = b"\xdd" + len(datas).to_bytes(4)  # msgpack array32
    return msgpack.unpackb(  # type: ignore[no-any-return]
        header + b"".join(datas), raw=False, timestamp=3, strict_map_key=False
    )


def check_writing(db: Database, what: str) -> None:
    """Raise if the calling thread holds a write transaction (``what`` needs its own)."""
    if getattr(db._local, "writing", False):
        raise TransactionError(
            f"{what} needs its own write transaction; call it before `with db.write()`, not inside"
        )


class Table:
    """A collection of documents with attached aggregates, kept in sync in the same transaction.

    Obtain one with :meth:`tallytree.Database.table`. Document ids are str, int or bytes; ids generated
    by :meth:`insert` are increasing ints, never reused.

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> loads = db.table("loads")
    >>> by_status = loads.aggregate("loads_by_status", namespace="org", key="status", values=("amount",))
    >>> with db.write() as tx:
    ...     first = loads.insert(tx, {"org": 1, "status": "open", "amount": 100})
    ...     _ = loads.insert(tx, {"org": 1, "status": "open", "amount": 250})
    ...     _ = loads.update(tx, first, {"status": "delivered"})
    >>> with db.read() as tx:
    ...     by_status.count(tx, namespace=1, eq="open"), by_status.totals(tx, namespace=1)
    (1, Totals(count=2, amount=350))
    """

    def __init__(self, db: Database, name: str, table_id: int) -> None:
        self._db = db
        self.name = name
        self._id = table_id
        self._prefix = table_id.to_bytes(4, "big")
        self._stop = (table_id + 1).to_bytes(4, "big")
        self._record_key = _TABLE_PREFIX + name.encode()
        self._where = f"table {name!r}"
        self._state_key = _STATE_PREFIX + self._prefix
        self._record = b""
        self._definitions: dict[str, Definition] = {}
        self._pending: dict[str, Any] = {}
        self._dropped: str | None = None
        self._tx: WriteTransaction | None = None
        self._count = 0
        self._next_id = 1

    def __repr__(self) -> str:
        return f"<Table {self.name!r} aggregates={sorted([*self._definitions, *self._pending])}>"

    # ------------------------------------------------------------ definitions

    def _load(self, tx: Transaction, record: bytes | None) -> None:
        """Adopt the stored table record: attach field-based aggregates, keep given functions."""
        if record is None:
            self._dropped = f"table {self.name!r} was dropped"
            raise TransactionError(self._dropped)
        if record == self._record:
            return
        data = decode_record(self.name, record)
        if data["id"] != self._id:  # dropped and created again (by another process): a new table
            self._dropped = f"table {self.name!r} was dropped and created again"
            raise TransactionError(f"{self._dropped}; get it again with db.table({self.name!r})")
        definitions: dict[str, Definition] = {}
        pending: dict[str, Any] = {}
        for name, description in data["aggregates"].items():
            current = self._definitions.get(name)
            stored = tx.meta(DEFINITIONS + name.encode())
            if stored is None:
                raise _damage(f"table {self.name!r}", f"its aggregate {name!r} has no definition")
            aggregate = self._db._aggregates.get(name)
            fresh = self._db._aggregate_from(name, stored, tx)
            if aggregate is None or (aggregate._id, aggregate.fields, aggregate.node_size) != (
                fresh._id,
                fresh.fields,
                fresh.node_size,
            ):
                self._adopt_owned(fresh)
                aggregate = fresh
            elif aggregate._owner is None:  # opened with db.aggregate() before it was attached
                aggregate._set_owner(self.name)
            if (
                current is not None
                and current.aggregate is aggregate
                and same_description(current.description, description)
            ):
                definitions[name] = current
            elif has_function(description):
                pending[name] = description
            else:
                definitions[name] = self._definition_from(aggregate, description)
        self._definitions = definitions
        self._pending = pending
        self._record = record

    def _definition_from(self, aggregate: Aggregate, description: dict[str, Any]) -> Definition:
        """The definition a table record describes for ``aggregate``; CorruptDatabaseError for a
        description that makes none (a missing part, an extractor of no known kind, value fields
        that are not the aggregate's). O(fields)."""
        try:
            return definition_from(aggregate, description)
        except CorruptDatabaseError:
            raise
        except Exception as exc:  # whatever a damaged description makes the definition raise
            raise _damage(
                f"the record of table {self.name!r} (META {self._record_key!r})",
                f"its description of aggregate {aggregate.name!r} makes no definition "
                f"({type(exc).__name__}: {exc})",
            ) from exc

    def _stored_doc(self, data: bytes, doc_id: Any) -> Document:
        """A stored document, decoded and checked to be a map (as every document written is);
        CorruptDatabaseError naming it and the table otherwise. O(size)."""
        try:
            doc = decode_doc(data)
        except (ValueError, TypeError) as exc:  # msgpack's errors (and UnicodeDecodeError) are ValueErrors
            raise _damage(
                f"document {doc_id!r} of table {self.name!r}",
                f"its stored bytes do not decode ({type(exc).__name__}: {exc})",
            ) from exc
        if type(doc) is not dict:
            raise _damage(
                f"document {doc_id!r} of table {self.name!r}",
                f"it is stored as {type(doc).__name__} {doc!r:.60}, not as a map of fields",
            )
        return doc

    def _definition_record(self, changes: Mapping[str, Any]) -> bytes:
        data: dict[str, Any] = decode_record(self.name, self._record) if self._record else {}
        aggregates = dict(data.get("aggregates", {}))
        for name, description in changes.items():
            if description is None:
                aggregates.pop(name, None)
            else:
                aggregates[name] = description
        return msgpack.packb({"id": self._id, "aggregates": aggregates})  # type: ignore[no-any-return]

    def aggregate(
        self,
        name: str,
        *,
        key: Extractor | None = None,
        namespace: Extractor | None = None,
        values: Sequence[str] | Mapping[str, Extractor] = (),
        where: Where = None,
        node_size: int | None = None,
        on_missing: OnMissing = "error",
        rebuild: bool = False,
    ) -> Aggregate:
        """Attach the aggregate ``name`` to this table (or return it when already attached).

        ``key`` and ``namespace`` are extractors: a field name, a tuple of field names (a composite
        key such as ``("status", "created_at")``) or a function of the document. ``values`` names the
        summed fields (each read from the field of the same name), or maps each summed field to an
        extractor: ``{"cost": "cost_usd", "tokens": lambda d: d["input"] + d["output"]}``. ``where``
        keeps only matching documents: a field name (truthy), a mapping of required field values, or
        a predicate. ``on_missing="skip"`` leaves out documents that lack a field (or have a None
        value) instead of raising ExtractionError.

        Attaching to a table that holds documents builds the aggregate from them, sorted per namespace,
        in the same transaction as the definition. Definitions persist: calling again with the same
        arguments returns the aggregate, with different ones raises SchemaMismatchError unless
        ``rebuild=True`` (which rebuilds it from the documents). With only ``name``, returns the
        attached aggregate (AggregateNotFoundError if there is none).

        The returned aggregate has every read of :class:`~tallytree.Aggregate`; its writes raise
        TransactionError (write through the table). Needs its own write transaction (call it before
        ``with db.write()``). O(n log n) for n documents when building, O(1) otherwise.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> orders = db.table("orders")
        >>> with db.write() as tx:
        ...     orders.insert_many(tx, [{"shop": "a", "total": 5}, {"shop": "b", "total": 7}, {"shop": "a"}])
        [1, 2, 3]
        >>> by_shop = orders.aggregate("orders_by_shop", key="shop", values=("total",), on_missing="skip")
        >>> orders.aggregate("orders_by_shop", key="shop", values=("total",), on_missing="skip") is by_shop
        True
        >>> with db.read() as tx:
        ...     by_shop.totals(tx, eq="a"), by_shop.totals(tx)
        (Totals(count=1, total=5), Totals(count=2, total=12))
        """
        self._check_alive()
        if key is None:
            if namespace is not None or values or where is not None or node_size is not None or rebuild:
                raise ArgumentTypeError("table.aggregate(): key= is required to define an aggregate")
            return self._attached(name)
        from ._db import (  # noqa: PLC0415  # _db imports this module
            DEFAULT_NODE_SIZE,
            _check_fields,
            _check_name,
            _check_node_size,
        )

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
            node_size = _check_node_size(node_size)
        with self._db.read() as tx:
            self._load(tx, tx.meta(self._record_key))
        known = self._definitions.get(name)
        if known is not None and not rebuild and self._matches(known.aggregate, specs, node_size):
            probe = self._probe(known.aggregate, key, namespace, specs, where, on_missing)
            if same_description(known.description, probe.description):
                return known.aggregate
        check_writing(self._db, f"attaching aggregate {name!r} to table {self.name!r}")
        undo: Callable[[], None] | None = None
        try:
            with self._db.write() as tx:
                self._load(tx, tx.meta(self._record_key))
                stored = decode_record(self.name, self._record)["aggregates"].get(name)
                if stored is None and tx.meta(DEFINITIONS + name.encode()) is not None:
                    raise SchemaMismatchError(
                        f"an aggregate named {name!r} already exists and is not attached to table "
                        f"{self.name!r}; pick another name, or drop it first (db.drop_aggregate)"
                    )
                size = node_size or DEFAULT_NODE_SIZE
                if stored is not None:
                    previous = self._db._aggregates[name]
                    if self._matches(previous, specs, node_size):
                        probe = self._probe(previous, key, namespace, specs, where, on_missing)
                        if same_description(stored, probe.description) and not rebuild:
                            self._definitions[name] = probe  # a function given again after reopening
                            self._pending.pop(name, None)
                            return previous
                        given = probe.description
                    else:
                        given = {"values": list(specs), "node_size": node_size}
                    if not rebuild:
                        raise SchemaMismatchError(
                            f"table {self.name!r}: aggregate {name!r} is stored with a different definition "
                            f"({_show(stored, previous)}) than the one given ({given}). Pass rebuild=True "
                            "to rebuild it from the documents with the new definition"
                        )
                    _drop_trees(tx, previous)
                    if node_size is None:
                        size = previous.node_size
                aggregate = _define_aggregate(tx, name, fields, size, owner=self.name)
                definition = self._probe(aggregate, key, namespace, specs, where, on_missing)
                build_columns(aggregate, tx, self._columns(tx, definition))
                record = self._definition_record({name: definition.description})
                tx.set_meta(self._record_key, record)
                # Adopted before the commit, while this thread holds the write lock: another thread's
                # write begun right after the commit would otherwise load the new record without this
                # function, and refuse to write as if the table had been reopened. Put back if the
                # commit fails.
                undo = self._adopt_before_commit(aggregate, name, definition, record)
        except BaseException:
            if undo is not None:
                undo()
            raise
        return aggregate

    @staticmethod
    def _probe(
        aggregate: Aggregate,
        key: Extractor,
        namespace: Extractor | None,
        specs: Mapping[str, Extractor],
        where: Where,
        on_missing: OnMissing,
    ) -> Definition:
        return Definition(
            aggregate, key=key, namespace=namespace, values=specs, where=where, on_missing=on_missing
        )

    @staticmethod
    def _matches(aggregate: Aggregate, specs: Mapping[str, Any], node_size: int | None) -> bool:
        return aggregate.fields == tuple(specs) and node_size in (None, aggregate.node_size)

    def _adopt_before_commit(
        self, aggregate: Aggregate, name: str, definition: Definition, record: bytes
    ) -> Callable[[], None]:
        """Make ``aggregate`` (attached as ``definition``, the table record now ``record``) this
        table's and the database's, before the transaction that writes them commits; return what
        puts everything back if the commit fails."""
        state = self._definitions, self._pending, self._record, self._tx
        registered = self._db._aggregates.get(name)
        dropped = registered._dropped if registered is not None else None

        def undo() -> None:
            self._definitions, self._pending, self._record, self._tx = state
            if registered is None:
                self._db._aggregates.pop(name, None)
            else:
                self._db._aggregates[name] = registered
                registered._dropped = dropped

        self._adopt_owned(aggregate)
        self._definitions = {**self._definitions, name: definition}
        self._pending = {key: value for key, value in self._pending.items() if key != name}
        self._record = record
        self._tx = None
        return undo

    def _adopt_owned(self, aggregate: Aggregate) -> None:
        previous = self._db._aggregates.get(aggregate.name)
        if previous is not None and previous._id != aggregate._id:  # its trees are gone
            previous._dropped = f"aggregate {aggregate.name!r} was redefined"
        aggregate._set_owner(self.name)
        self._db._aggregates[aggregate.name] = aggregate

    def _attached(self, name: str) -> Aggregate:
        with self._db.read() as tx:
            self._load(tx, tx.meta(self._record_key))
        definition = self._definitions.get(name)
        if definition is not None:
            return definition.aggregate
        if name in self._pending:
            return self._db._aggregates[name]
        raise AggregateNotFoundError(
            f"table {self.name!r} has no aggregate {name!r}; it has {self.aggregates()}"
        )

    def aggregates(self) -> list[str]:
        """The names of the attached aggregates, sorted (those awaiting their functions included).

        O(a) for a attached aggregates.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> runs = db.table("runs")
        >>> _ = runs.aggregate("runs_by_model", key="model", values=("tokens",))
        >>> _ = runs.aggregate("runs_by_day", key="day")
        >>> runs.aggregates()
        ['runs_by_day', 'runs_by_model']
        """
        self._check_alive()
        with self._db.read() as tx:
            self._load(tx, tx.meta(self._record_key))
        return sorted([*self._definitions, *self._pending])

    def definition(self, name: str) -> Definition:
        """The extractors of an attached aggregate (for verify/repair). Raises AggregateNotFoundError
        (or TransactionError when its function has not been passed again since reopening). O(a) for a
        attached aggregates.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> runs = db.table("runs")
        >>> _ = runs.aggregate("runs_by_model", namespace="org", key="model", values=("tokens",))
        >>> definition = runs.definition("runs_by_model")
        >>> definition.namespace_spec, definition.key_spec, definition.aggregate.fields
        ('org', 'model', ('tokens',))
        """
        self._attached(name)
        definition = self._definitions.get(name)
        if definition is None:
            raise TransactionError(self._pending_message(name))
        return definition

    def _pending_message(self, name: str) -> str:
        return (
            f"table {self.name!r}: aggregate {name!r} is defined with a function; after reopening, call "
            f"table.aggregate({name!r}, key=..., ...) again with the same definition before writing to "
            "the table (writing without it would leave it out of sync)"
        )

    def detach(self, name: str) -> Aggregate:
        """Stop maintaining an aggregate; it keeps its items and becomes an ordinary, writable one.

        Its definition stays stored with it, since its items follow it: a
        :class:`~tallytree.ChangeHandler` may take it over with the same definition (another one
        needs ``redefine=True``, which empties it).
        Needs its own write transaction (call it before ``with db.write()``). O(a) for a attached
        aggregates, whatever the number of items. Raises AggregateNotFoundError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> jobs = db.table("jobs")
        >>> by_state = jobs.aggregate("jobs_by_state", key="state")
        >>> with db.write() as tx:
        ...     jobs.insert(tx, {"state": "done"})
        1
        >>> by_state = jobs.detach("jobs_by_state")
        >>> with db.write() as tx:
        ...     jobs.insert(tx, {"state": "done"})  # no longer indexed
        ...     by_state.insert(tx, "done", "manual")  # its own writes are allowed again
        2
        >>> with db.read() as tx:
        ...     jobs.count(tx), by_state.count(tx, eq="done")
        (2, 2)
        """
        aggregate = self._attached(name)
        check_writing(self._db, f"detaching aggregate {name!r}")
        with self._db.write() as tx:
            self._load(tx, tx.meta(self._record_key))
            stored = tx.meta(DEFINITIONS + name.encode())
            if stored is not None:
                definition = decode_definition(name, stored, tx)
                definition.pop("table", None)
                # its items follow the table's definition: a ChangeHandler registering another is
                # refused without redefine=True (see _hooks)
                described = decode_record(self.name, self._record)["aggregates"].get(name)
                if described is not None:
                    definition["extractors"] = described
                tx.set_meta(DEFINITIONS + name.encode(), msgpack.packb(definition, datetime=True))
            record = self._definition_record({name: None})
            tx.set_meta(self._record_key, record)
        aggregate._set_owner(None)
        self._definitions.pop(name, None)
        self._pending.pop(name, None)
        self._record = record
        return aggregate

    def drop_aggregate(self, name: str) -> None:
        """Detach an aggregate and delete it with all its items, in one transaction. O(nodes).

        The documents stay. Needs its own write transaction (call it before ``with db.write()``).
        Raises AggregateNotFoundError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> jobs = db.table("jobs")
        >>> _ = jobs.aggregate("jobs_by_state", key="state")
        >>> _ = jobs.aggregate("jobs_by_owner", key="owner")
        >>> with db.write() as tx:
        ...     _ = jobs.insert_many(tx, [{"state": "done", "owner": "ann"}, {"state": "new", "owner": "bo"}])
        >>> jobs.drop_aggregate("jobs_by_owner")
        >>> with db.read() as tx:
        ...     jobs.count(tx)
        2
        >>> jobs.aggregates(), db.aggregates()
        (['jobs_by_state'], ['jobs_by_state'])
        """
        aggregate = self._attached(name)
        check_writing(self._db, f"dropping aggregate {name!r}")
        with self._db.write() as tx:
            self._load(tx, tx.meta(self._record_key))
            _drop_trees(tx, aggregate)
            tx.set_meta(DEFINITIONS + name.encode(), None)
            record = self._definition_record({name: None})
            tx.set_meta(self._record_key, record)
        aggregate._dropped = f"aggregate {name!r} was dropped"
        self._db._aggregates.pop(name, None)
        self._definitions.pop(name, None)
        self._pending.pop(name, None)
        self._record = record

    def drop(self) -> None:
        """Delete the table: its documents and every attached aggregate, in one transaction.

        Needs its own write transaction (call it before ``with db.write()``). O(n + nodes) for n
        documents. Afterwards every method of this object raises TransactionError, as do reads and
        writes through the dropped aggregates; ``db.table(name)`` creates a new, empty table.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scratch = db.table("scratch")
        >>> _ = scratch.aggregate("scratch_by_kind", key="kind")
        >>> with db.write() as tx:
        ...     _ = scratch.insert_many(tx, [{"kind": "a"}, {"kind": "b"}])
        >>> scratch.drop()
        >>> db.tables(), db.aggregates()
        ([], [])
        """
        self._check_alive()
        check_writing(self._db, f"dropping table {self.name!r}")
        with self._db.write() as tx:
            self._load(tx, tx.meta(self._record_key))
            names = [*self._definitions, *self._pending]
            for name in names:
                aggregate = self._db._aggregates.get(name)
                stored = tx.meta(DEFINITIONS + name.encode())
                if stored is None:
                    continue
                if aggregate is None:
                    aggregate = self._db._aggregate_from(name, stored, tx)
                _drop_trees(tx, aggregate)
                tx.set_meta(DEFINITIONS + name.encode(), None)
            for key, _ in list(tx.docs(self._prefix, self._stop)):
                tx.set_doc(key, None)
            tx.set_meta(self._record_key, None)
            tx.set_meta(self._state_key, None)
        for name in names:
            dropped = self._db._aggregates.pop(name, None)
            if dropped is not None:
                dropped._dropped = f"aggregate {name!r} was dropped with table {self.name!r}"
        self._dropped = f"table {self.name!r} was dropped"
        self._db._tables.pop(self.name, None)

    def _check_alive(self) -> None:
        if self._dropped is not None:
            raise TransactionError(self._dropped)

    # ------------------------------------------------------------ per-transaction state

    def _begin(self, tx: Transaction) -> WriteTransaction:
        """Check a write transaction and load the table's state for it (once per transaction)."""
        if tx is self._tx and tx._open:  # ended (a commit in its with block): checked below, raises
            return tx
        self._check_alive()
        check_transaction(tx, self._db, self._where)
        if not isinstance(tx, WriteTransaction):
            raise TransactionError(f"table {self.name!r}: writes need `with db.write() as tx:`")
        self._load(tx, tx.meta(self._record_key))
        if self._pending:
            raise TransactionError(self._pending_message(sorted(self._pending)[0]))
        self._count, self._next_id = self._state(tx)
        self._tx = tx
        return tx

    def _state(self, tx: Transaction) -> tuple[int, int]:
        """The stored document count and next generated id; CorruptDatabaseError for a damaged record."""
        state = tx.meta(self._state_key)
        if state is None:
            return 0, 1
        if len(state) != _STATE.size:
            raise _damage(
                f"the document count of table {self.name!r} (META {self._state_key!r})",
                f"it holds {len(state)} bytes, not {_STATE.size}",
            )
        count, next_id = _STATE.unpack(state)
        return count, next_id

    def _save_state(self, tx: WriteTransaction) -> None:
        tx.set_meta(self._state_key, _STATE.pack(self._count, self._next_id))

    def _generate_id(self, tx: WriteTransaction) -> tuple[int, bytes]:
        doc_id = self._next_id  # taken only when the insert succeeds (see _note_id)
        while True:
            id_bytes = encode_id(doc_id)
            if tx.doc(self._prefix + id_bytes) is None:
                return doc_id, id_bytes
            doc_id += 1

    def _note_id(self, doc_id: Any, generated: bool = False) -> None:
        """Move the generated-id counter past an inserted id: a generated one always (ids are never
        reused, even past an explicit id at the top of the range), an explicit int below
        ``_MAX_GENERATED``."""
        if type(doc_id) is int and self._next_id <= doc_id and (generated or doc_id < _MAX_GENERATED):
            self._next_id = doc_id + 1

    def _encode_id(self, doc_id: Any) -> bytes:
        try:
            return encode_id(doc_id)
        except UnsupportedKeyTypeError as exc:
            raise UnsupportedKeyTypeError(f"table {self.name!r}: {exc}") from None

    def _coordinates(self, doc: Document, doc_id: Any, id_bytes: bytes) -> list[Coord | None]:
        return [definition.coordinates(doc, doc_id, id_bytes) for definition in self._definitions.values()]

    def _columns(self, tx: Transaction, definition: Definition) -> Iterator[Columns]:
        """The items of every stored document as batches of encoded columns (one pass, in id order).

        Documents are read and decoded a batch at a time (one msgpack call per batch) and extracted a
        column at a time (:meth:`Definition.columns`); a batch that needs it goes document by document
        (:meth:`Definition.coordinates`), which names a document whose extraction fails.
        """
        start = len(self._prefix)
        cut = slice(start, None)
        prefix = len(definition.aggregate._prefix)
        for batch in tx.doc_batches(self._prefix, self._stop, _ATTACH_BATCH):
            keys = list(map(itemgetter(0), batch))
            try:
                docs = decode_docs(list(map(itemgetter(1), batch)))
            except (ValueError, TypeError):
                docs = []
            if len(docs) != len(batch) or not all(type(doc) is dict for doc in docs):
                # (a damaged document: named by decoding them one by one)
                docs = [self._stored_doc(data, decode_key(key, start)[0]) for key, data in batch]
            ids = list(map(bytes.__getitem__, keys, repeat(cut)))
            columns = definition.columns(docs, ids)
            if columns is None:
                columns = [], [], [[] for _ in definition.fields]
                namespaces, items, cols = columns
                for key, doc, id_bytes in zip(keys, docs, ids, strict=True):
                    try:  # the id is decoded only to name a document in an error
                        coord = definition.coordinates(doc, None, id_bytes)
                    except ExtractionError:
                        definition.coordinates(doc, decode_key(key, start)[0], id_bytes)
                        raise
                    if coord is not None:
                        namespaces.append(coord[0][prefix:])
                        items.append(coord[1])
                        for col, value in zip(cols, coord[2], strict=True):
                            col.append(value)
            yield columns

    # ------------------------------------------------------------ reads

    def get(self, tx: Transaction, id: Any) -> Document | None:
        """The document with this id, or None. O(log n).

        The document comes back in its stored form: tuples as lists, datetimes in UTC.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> users = db.table("users")
        >>> with db.write() as tx:
        ...     users.insert(tx, {"name": "ada", "langs": ("en", "fr")}, id="u1")
        'u1'
        >>> with db.read() as tx:
        ...     users.get(tx, "u1"), users.get(tx, "u2")
        ({'name': 'ada', 'langs': ['en', 'fr']}, None)
        """
        self._check_alive()
        check_transaction(tx, self._db, self._where)
        data = tx.doc(self._prefix + self._encode_id(id))
        return self._stored_doc(data, id) if data is not None else None

    def count(self, tx: Transaction) -> int:
        """The number of documents. O(1). Raises CorruptDatabaseError if the stored count is damaged.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> tasks = db.table("tasks")
        >>> with db.write() as tx:
        ...     _ = tasks.insert_many(tx, [{"n": 1}, {"n": 2}, {"n": 3}])
        ...     _ = tasks.delete(tx, 2)
        ...     tasks.count(tx)
        2
        """
        self._check_alive()
        check_transaction(tx, self._db, self._where)
        if tx is self._tx:
            return self._count
        return self._state(tx)[0]

    def items(self, tx: Transaction, *, reverse: bool = False) -> Iterator[tuple[Any, Document]]:
        """Iterate lazily over ``(id, document)`` in id order (ints, then str, then bytes).

        Writing to the table while iterating raises TransactionError; collect with list() first.
        A pass that ends having met another number of documents than :meth:`count` raises
        CorruptDatabaseError (a damaged page can end LMDB's scan early). O(log n) to start, then O(1)
        per document (in reverse, inside a write transaction that wrote to the table, its documents
        are collected first).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> notes = db.table("notes")
        >>> with db.write() as tx:
        ...     _ = notes.insert(tx, {"text": "b"}, id="x")
        ...     _ = notes.insert(tx, {"text": "a"}, id=2)
        ...     _ = notes.insert(tx, {"text": "c"})  # a generated id, after the int ids used
        >>> with db.read() as tx:
        ...     list(notes.items(tx))
        [(2, {'text': 'a'}), (3, {'text': 'c'}), ('x', {'text': 'b'})]
        """
        check_flag(reverse, "reverse")
        start = len(self._prefix)
        read = 0
        for key, data in self._scan_docs(tx, reverse):
            doc_id = decode_key(key, start)[0]
            read += 1
            yield doc_id, self._stored_doc(data, doc_id)
        self._check_read(tx, read)

    def _check_read(self, tx: Transaction, read: int) -> None:
        """At the end of a whole pass over the documents (``items``, ``ids``) that met ``read`` of
        them: raise CorruptDatabaseError unless that is the table's stored count. LMDB ends a range
        scan, without an error, at a damaged key that sorts after the range, and the documents after
        it would go unseen. O(1): one META get."""
        count = self.count(tx)
        if read != count:
            raise _damage(
                f"table {self.name!r}",
                f"a pass over its documents met {read}, but its stored count is {count} (a damaged page "
                "of the documents ends a scan early, or holds documents it should not)",
            )

    def _scan_docs(self, tx: Transaction, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        """The stored ``(key, document bytes)`` pairs in order; raises if the table changes meanwhile."""
        self._check_alive()
        check_transaction(tx, self._db, self._where)
        entries = tx.docs(self._prefix, self._stop, reverse)
        version = getattr(tx, "docs_version", 0)
        for entry in entries:
            if getattr(tx, "docs_version", 0) != version:
                raise TransactionError(
                    f"table {self.name!r} changed during iteration; collect the documents "
                    "(list(...)) before changing them"
                )
            yield entry

    def ids(self, tx: Transaction) -> Iterator[Any]:
        """Iterate over the document ids in order (ints by value, then str, then bytes).

        Only the ids are decoded, not the documents. A pass that ends having met another number of
        ids than :meth:`count` raises CorruptDatabaseError, as :meth:`items` does. O(log n) to start,
        then O(1) per document.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> tags = db.table("tags")
        >>> with db.write() as tx:
        ...     for id in ("a", 10, b"k", 2):
        ...         _ = tags.insert(tx, {}, id=id)
        >>> with db.read() as tx:
        ...     list(tags.ids(tx))
        [2, 10, 'a', b'k']
        """
        start = len(self._prefix)
        read = 0
        for key, _ in self._scan_docs(tx, False):
            read += 1
            yield decode_key(key, start)[0]
        self._check_read(tx, read)

    def get_many(self, tx: Transaction, ids: Iterable[Any]) -> list[Document | None]:
        """The documents with these ids, in the order given: None for an id with no document.

        All are read in ``tx``'s one snapshot (a write transaction sees its own writes). A repeated id
        gives its document again, as a dict of its own. Every id is encoded before anything is read:
        one that cannot be a document id raises UnsupportedKeyTypeError. The documents come back in
        their stored form, as from :meth:`get`, and are decoded in one msgpack call. O(m log n) for m
        ids: 200 ids took 0.74x the time of 200 :meth:`get` calls. The ids are read in the order
        given: reading them in key order gained nothing (docs/tables.md).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> invoices = db.table("invoices")
        >>> with db.write() as tx:
        ...     invoices.insert_many(tx, [{"total": 10}, {"total": 25}, {"total": 5}])
        [1, 2, 3]
        >>> with db.read() as tx:
        ...     invoices.get_many(tx, [3, 9, 1, 3])
        [{'total': 5}, None, {'total': 10}, {'total': 5}]
        """
        self._check_alive()
        check_transaction(tx, self._db, self._where)
        ids = list(iterator_of(ids, f"table {self.name!r}: get_many", "document ids"))
        prefix, encode = self._prefix, self._encode_id
        datas = list(map(tx.doc, [prefix + encode(doc_id) for doc_id in ids]))
        found = [data for data in datas if data is not None]
        try:
            decoded = decode_docs(found)
        except (ValueError, TypeError):
            decoded = []
        if len(decoded) != len(found) or not all(type(doc) is dict for doc in decoded):
            # a damaged document: named by decoding them one by one
            decoded = [
                self._stored_doc(data, doc_id)
                for doc_id, data in zip(ids, datas, strict=True)
                if data is not None
            ]
        docs = iter(decoded)
        return [next(docs) if data is not None else None for data in datas]

    # ------------------------------------------------------------ writes

    def insert(self, tx: WriteTransaction, doc: Mapping[str, Any], id: Any = None) -> Any:
        """Insert a document and its item in every attached aggregate; return its id.

        Without ``id``, a new int id is generated. O(a log n) for a attached aggregates. Raises
        DuplicateItemError (a KeyError) if the id exists, InvalidDocumentError or ExtractionError for
        a document that cannot be stored or indexed; then nothing is written.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> runs = db.table("runs")
        >>> by_model = runs.aggregate("runs_by_model", key="model", values=("tokens",))
        >>> with db.write() as tx:
        ...     runs.insert(tx, {"model": "small", "tokens": 120})
        ...     runs.insert(tx, {"model": "large", "tokens": 900}, id="r-7")
        1
        'r-7'
        >>> with db.read() as tx:
        ...     by_model.totals(tx, eq="small"), by_model.totals(tx)
        (Totals(count=1, tokens=120), Totals(count=2, tokens=1020))
        """
        wtx = self._begin(tx)
        generated = id is None
        if id is None:
            id, id_bytes = self._generate_id(wtx)
            doc_key = self._prefix + id_bytes
        else:
            id = plain_id(id)
            id_bytes = self._encode_id(id)
            doc_key = self._prefix + id_bytes
            if wtx.doc(doc_key) is not None:
                raise DuplicateItemError(
                    f"table {self.name!r}: a document with id {id!r} exists; use upsert() or replace()"
                )
        data = encode_doc(doc, id, self._where)
        coords = self._coordinates(decode_doc(data), id, id_bytes)
        wtx.set_doc(doc_key, data)
        for definition, coord in zip(self._definitions.values(), coords, strict=True):
            if coord is not None:  # the entry is new (its id is): queue it, merged in sorted runs
                aggregate = definition.aggregate
                wtx.defer_insert(coord[0], len(aggregate.fields), aggregate.node_size, coord[1], coord[2])
        self._count += 1
        self._note_id(id, generated)
        self._save_state(wtx)
        return id

    def _change(
        self, tx: WriteTransaction, doc_id: Any, id_bytes: bytes, old: Document | None, data: bytes | None
    ) -> None:
        """Replace document ``old`` (None: absent) by the encoded ``data`` (None: delete)."""
        new = decode_doc(data) if data is not None else None
        old_coords = self._coordinates(old, doc_id, id_bytes) if old is not None else None
        new_coords = self._coordinates(new, doc_id, id_bytes) if new is not None else None
        done: list[tuple[Aggregate, Coord | None, Coord | None]] = []
        why = f"table {self.name!r}, document {doc_id!r}"
        try:
            for index, definition in enumerate(self._definitions.values()):
                before = old_coords[index] if old_coords is not None else None
                after = new_coords[index] if new_coords is not None else None
                if before is not None or after is not None:
                    held = move_exactly(tx, definition.aggregate, before, after, why)
                    done.append((definition.aggregate, held, after))
        except (ItemNotFoundError, DuplicateItemError):  # drift: undo the moves made, write nothing
            for aggregate, before, after in reversed(done):
                move(tx, aggregate, after, before)
            raise
        tx.set_doc(self._prefix + id_bytes, data)
        self._count += (new is not None) - (old is not None)
        self._save_state(tx)

    def _stored(self, tx: WriteTransaction, id: Any) -> tuple[bytes, bytes | None]:
        id_bytes = self._encode_id(id)
        return id_bytes, tx.doc(self._prefix + id_bytes)

    def update(
        self, tx: WriteTransaction, id: Any, patch: Mapping[str, Any], *, remove: Iterable[str] = ()
    ) -> Document:
        """Merge ``patch`` into the document (top-level fields), drop the ``remove`` fields, and move
        its items accordingly; return the new document. O(a log n). Writes nothing if the document
        does not change.

        Raises ItemNotFoundError (a KeyError) if there is no such document.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> tickets = db.table("tickets")
        >>> by_team = tickets.aggregate("tickets_by_team", namespace="team", key="priority")
        >>> with db.write() as tx:
        ...     ticket = tickets.insert(tx, {"team": "web", "priority": 2, "note": "slow"})
        ...     tickets.update(tx, ticket, {"team": "db"}, remove=["note"])
        {'team': 'db', 'priority': 2}
        >>> with db.read() as tx:
        ...     by_team.count(tx, namespace="web"), by_team.count(tx, namespace="db")
        (0, 1)
        """
        wtx = self._begin(tx)
        id_bytes, stored = self._stored(wtx, id)
        if stored is None:
            raise ItemNotFoundError(f"table {self.name!r}: no document with id {id!r} to update")
        if not isinstance(patch, Mapping):
            raise InvalidDocumentError(f"table {self.name!r}: a patch is a mapping, not {patch!r}")
        if isinstance(remove, str | bytes) or not isinstance(remove, Iterable):
            raise ArgumentTypeError(
                f"table {self.name!r}: remove= takes a list of field names, e.g. [{remove!r}], "
                f"not {remove!r:.60}"
            )
        old = self._stored_doc(stored, id)
        new = {**old, **patch}
        for field in remove:
            new.pop(field, None)
        data = encode_doc(new, id, f"table {self.name!r}")
        if data != stored:
            self._change(wtx, id, id_bytes, old, data)
        return decode_doc(data)

    def replace(self, tx: WriteTransaction, id: Any, doc: Mapping[str, Any]) -> Document:
        """Replace the whole document; return the old one. Raises ItemNotFoundError. O(a log n).

        Unlike :meth:`update`, fields missing from ``doc`` are gone afterwards.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> prices = db.table("prices")
        >>> by_sku = prices.aggregate("prices_by_sku", key="sku", values=("cents",))
        >>> with db.write() as tx:
        ...     _ = prices.insert(tx, {"sku": "A1", "cents": 250, "promo": True}, id="A1")
        ...     prices.replace(tx, "A1", {"sku": "A1", "cents": 199})
        {'sku': 'A1', 'cents': 250, 'promo': True}
        >>> with db.read() as tx:
        ...     prices.get(tx, "A1"), by_sku.totals(tx)
        ({'sku': 'A1', 'cents': 199}, Totals(count=1, cents=199))
        """
        wtx = self._begin(tx)
        id_bytes, stored = self._stored(wtx, id)
        if stored is None:
            raise ItemNotFoundError(f"table {self.name!r}: no document with id {id!r} to replace")
        data = encode_doc(doc, id, f"table {self.name!r}")
        old = self._stored_doc(stored, id)
        if not same_doc(stored, data):
            self._change(wtx, id, id_bytes, old, data)
        return old

    def upsert(
        self, tx: WriteTransaction, id: Any, doc: Mapping[str, Any]
    ) -> Literal["inserted", "updated", "unchanged"]:
        """Insert the document or replace the stored one; writes nothing when it is identical.

        Returns what happened, so replays and backfills can be run again safely. O(a log n) for a
        attached aggregates.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> stock = db.table("stock")
        >>> by_item = stock.aggregate("stock_by_item", key="item", values=("qty",))
        >>> with db.write() as tx:
        ...     [stock.upsert(tx, "A1", {"item": "A1", "qty": qty}) for qty in (5, 5, 7)]
        ['inserted', 'unchanged', 'updated']
        >>> with db.read() as tx:
        ...     by_item.totals(tx)
        Totals(count=1, qty=7)
        """
        wtx = self._begin(tx)
        id = plain_id(id)
        id_bytes, stored = self._stored(wtx, id)
        data = encode_doc(doc, id, f"table {self.name!r}")
        if stored == data:
            return "unchanged"
        old = self._stored_doc(stored, id) if stored is not None else None
        if same_doc(stored, data):
            return "unchanged"
        self._change(wtx, id, id_bytes, old, data)
        if stored is None:
            self._note_id(id)
            self._save_state(wtx)
            return "inserted"
        return "updated"

    def delete(self, tx: WriteTransaction, id: Any) -> Document:
        """Delete a document and its items; return it. Raises ItemNotFoundError. O(a log n).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> carts = db.table("carts")
        >>> by_user = carts.aggregate("carts_by_user", namespace="user", key="day", values=("total",))
        >>> with db.write() as tx:
        ...     first = carts.insert(tx, {"user": "u1", "day": 1, "total": 30})
        ...     _ = carts.insert(tx, {"user": "u1", "day": 2, "total": 12})
        ...     carts.delete(tx, first)
        {'user': 'u1', 'day': 1, 'total': 30}
        >>> with db.read() as tx:
        ...     by_user.totals(tx, namespace="u1")
        Totals(count=1, total=12)
        """
        wtx = self._begin(tx)
        id_bytes, stored = self._stored(wtx, id)
        if stored is None:
            raise ItemNotFoundError(
                f"table {self.name!r}: no document with id {id!r}; use discard() to ignore missing ones"
            )
        old = self._stored_doc(stored, id)
        self._change(wtx, id, id_bytes, old, None)
        return old

    def discard(self, tx: WriteTransaction, id: Any) -> bool:
        """Delete the document if present; return whether it was. Writes nothing if absent.

        The idempotent form of :meth:`delete`, for replays. O(a log n) for a attached aggregates.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> sessions = db.table("sessions")
        >>> by_user = sessions.aggregate("sessions_by_user", key="user")
        >>> with db.write() as tx:
        ...     _ = sessions.insert(tx, {"user": "u1"}, id="s1")
        ...     sessions.discard(tx, "s1"), sessions.discard(tx, "s1")
        (True, False)
        >>> with db.read() as tx:
        ...     by_user.count(tx)
        0
        """
        wtx = self._begin(tx)
        id_bytes, stored = self._stored(wtx, id)
        if stored is None:
            return False
        self._change(wtx, id, id_bytes, self._stored_doc(stored, id), None)
        return True

    def insert_many(
        self,
        tx: WriteTransaction,
        docs: Iterable[Mapping[str, Any] | tuple[Any, Mapping[str, Any]]],
        *,
        on_duplicate: Literal["error", "skip", "update"] = "error",
    ) -> list[Any]:
        """Insert many documents (each a mapping, or an ``(id, document)`` pair); return their ids.

        Everything is validated first; the items of new documents are then merged into each aggregate
        in sorted runs per namespace (much faster than one insert per document). ``on_duplicate`` says
        what to do with an id already stored or repeated: ``"error"`` raises DuplicateItemError and
        writes nothing, ``"skip"`` keeps the stored document, ``"update"`` replaces it. The ids are
        returned in input order, those of skipped documents included. The cyclic garbage collector is
        paused during the call, as during builds (see ``_gc``). O(a (m log m + t log n)) for m new
        documents whose items land in t leaves of each of the a aggregates, plus O(a log n) per
        replaced document.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.table("events")
        >>> by_user = events.aggregate("events_by_user", namespace="user", key="at", values=("cost",))
        >>> with db.write() as tx:
        ...     len(events.insert_many(tx, [{"user": "u1", "at": at, "cost": 2} for at in range(100)]))
        ...     late = [(100, {"user": "u2", "at": 0, "cost": 5}), (101, {"user": "u2", "at": 1, "cost": 1})]
        ...     events.insert_many(tx, late, on_duplicate="update")  # 100 exists: it moves to u2
        100
        [100, 101]
        >>> with db.read() as tx:
        ...     by_user.totals(tx, namespace="u1"), by_user.totals(tx, namespace="u2")
        (Totals(count=99, cost=198), Totals(count=2, cost=6))
        """
        if on_duplicate not in ("error", "skip", "update"):
            raise InvalidArgumentError(
                f"on_duplicate must be 'error', 'skip' or 'update', not {on_duplicate!r}"
            )
        wtx = self._begin(tx)
        docs = iterator_of(docs, f"table {self.name!r}: insert_many", "documents or (id, document) pairs")
        with gc_paused():  # the pending documents are many live objects: spare the GC's rescans
            return self._insert_many(wtx, docs, on_duplicate)

    def _insert_many(
        self,
        wtx: WriteTransaction,
        docs: Iterable[Mapping[str, Any] | tuple[Any, Mapping[str, Any]]],
        on_duplicate: Literal["error", "skip", "update"],
    ) -> list[Any]:
        where = f"table {self.name!r}"
        fresh: dict[bytes, tuple[Any, bytes, list[Coord | None]]] = {}
        updates: dict[bytes, tuple[Any, bytes]] = {}
        ids: list[Any] = []
        next_id = self._next_id
        for each in docs:
            if isinstance(each, tuple) and len(each) == 2:
                doc_id, doc = each
            else:
                doc_id, doc = None, each
            if doc_id is None:
                while True:
                    doc_id = next_id
                    next_id += 1
                    id_bytes = encode_id(doc_id)
                    if id_bytes not in fresh and wtx.doc(self._prefix + id_bytes) is None:
                        break
                exists = False
            else:
                doc_id = plain_id(doc_id)
                if type(doc_id) is int and next_id <= doc_id < _MAX_GENERATED:
                    next_id = doc_id + 1
                id_bytes = self._encode_id(doc_id)
                present = wtx.doc(self._prefix + id_bytes) is not None
                exists = present or id_bytes in fresh or id_bytes in updates
            ids.append(doc_id)
            if exists:
                if on_duplicate == "error":
                    raise DuplicateItemError(
                        f"{where}: a document with id {doc_id!r} exists (or repeats in the batch); "
                        "nothing was inserted"
                    )
                if on_duplicate == "skip":
                    continue
            data = encode_doc(doc, doc_id, where)
            coords = self._coordinates(decode_doc(data), doc_id, id_bytes)  # validates updates too
            if exists and id_bytes not in fresh:
                updates[id_bytes] = (doc_id, data)
                continue
            fresh[id_bytes] = (doc_id, data, coords)
        # the updates first, each undone if a later one fails (an aggregate that drifted): a batch
        # that raises writes nothing
        made: list[tuple[Any, bytes, bytes | None, bytes]] = []
        try:
            for id_bytes, (doc_id, data) in updates.items():
                stored = wtx.doc(self._prefix + id_bytes)
                if stored != data:
                    old = self._stored_doc(stored, doc_id) if stored is not None else None
                    self._change(wtx, doc_id, id_bytes, old, data)
                    made.append((doc_id, id_bytes, stored, data))
        except Exception:
            for doc_id, id_bytes, stored, data in reversed(made):
                self._change(wtx, doc_id, id_bytes, self._stored_doc(data, doc_id), stored)
            raise
        shapes = [
            (len(definition.aggregate.fields), definition.aggregate.node_size)
            for definition in self._definitions.values()
        ]
        for id_bytes, (_, data, coords) in fresh.items():
            wtx.set_doc(self._prefix + id_bytes, data)
            for (nfields, node_size), coord in zip(shapes, coords, strict=True):
                if coord is not None:
                    wtx.defer_insert(coord[0], nfields, node_size, coord[1], coord[2])
        self._count += len(fresh)
        self._next_id = next_id
        self._save_state(wtx)
        return ids

    def update_many(
        self,
        tx: WriteTransaction,
        updates: Mapping[Any, Mapping[str, Any]] | Iterable[tuple[Any, Mapping[str, Any]]],
        *,
        remove: Iterable[str] = (),
        missing: Literal["error", "skip"] = "error",
    ) -> int:
        """:meth:`update` many documents as one batch: ``updates`` maps ids to patches, or is an
        iterable of ``(id, patch)`` pairs (an id may repeat: its patches apply in order). Returns how
        many of the updates changed their document.

        Each patch merges into the document as :meth:`update` merges it, and the ``remove`` fields
        are dropped from every updated document. An id with no document raises ItemNotFoundError
        naming it (``missing="error"``) or is passed over (``missing="skip"``). The result is that of
        :meth:`update` update by update, but a batch that raises writes nothing at all: a missing id,
        a patch that is not a mapping (InvalidDocumentError), a document that cannot be stored
        (InvalidDocumentError) or indexed (ExtractionError), each raised at the first update that
        meets it; then, when every update was read, an aggregate that drifted from the table
        (ItemNotFoundError or DuplicateItemError, as :meth:`update` says). The updates are read and
        their items extracted first; then each changed document's net move, from its items before
        the batch to its items after, is written per aggregate tree: removals, then the new items in
        one sorted merge (the batch under :meth:`tallytree.ChangeHandler.apply_many`). A document
        that ends as it began writes nothing, nor does an item that stays in place. The cyclic
        garbage collector is paused during the call. O(m a) to read and extract m updates of a
        attached aggregates, plus O(log n) per item moved, plus O(t log B + k) for k new items
        landing in t leaves of size B: 5,000 updates took 0.56-0.82x the time of the calls one by
        one in tables of 10^5 and 10^6 documents with two aggregates (docs/tables.md). Memory: O(m a)
        for the moved items.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> invoices = db.table("invoices")
        >>> by_status = invoices.aggregate("invoices_by_status", key="status", values=("total",))
        >>> with db.write() as tx:
        ...     invoices.insert_many(tx, [{"status": "open", "total": t} for t in (10, 25, 5)])
        ...     invoices.update_many(tx, {1: {"status": "paid"}, 3: {"status": "paid"}})
        ...     invoices.update_many(tx, [(3, {"status": "paid"}), (7, {"status": "paid"})], missing="skip")
        [1, 2, 3]
        2
        0
        >>> with db.read() as tx:
        ...     by_status.totals(tx, eq="paid"), by_status.totals(tx, eq="open")
        (Totals(count=2, total=15), Totals(count=1, total=25))
        """
        wtx = self._begin(tx)
        self._check_missing(missing)
        if isinstance(remove, str | bytes) or not isinstance(remove, Iterable):
            raise ArgumentTypeError(
                f"table {self.name!r}: remove= takes a list of field names, e.g. [{remove!r}], "
                f"not {remove!r:.60}"
            )
        fields = list(remove)
        where = f"table {self.name!r}"
        if isinstance(updates, Mapping):
            pairs: Iterator[Any] = iter(updates.items())
        else:
            pairs = iterator_of(
                updates, f"{where}: update_many", "(id, patch) pairs, or a mapping of ids to patches"
            )
        prefix, doc = self._prefix, wtx.doc
        batch: dict[bytes, _Net] = {}
        changed = 0
        with gc_paused():  # the batch's items are many live tuples: spare the GC's rescans
            for pair in pairs:
                if not isinstance(pair, tuple) or len(pair) != 2:
                    raise ArgumentTypeError(
                        f"{where}: update_many takes (id, patch) pairs, or a mapping of ids to patches, "
                        f"not {pair!r:.60}; nothing was written"
                    )
                doc_id, patch = pair
                id_bytes = self._encode_id(doc_id)
                net = batch.get(id_bytes)
                stored = net[3] if net is not None else doc(prefix + id_bytes)
                if stored is None:
                    if missing == "skip":
                        continue
                    raise ItemNotFoundError(
                        f"{where}: no document with id {doc_id!r} to update; pass missing='skip' to pass "
                        "over missing ones. Nothing was written"
                    )
                if not isinstance(patch, Mapping):
                    raise InvalidDocumentError(f"{where}: a patch is a mapping, not {patch!r:.60}")
                old = self._stored_doc(stored, doc_id)
                new = {**old, **patch}
                for field in fields:
                    new.pop(field, None)
                data = encode_doc(new, doc_id, where)
                if data == stored:
                    continue
                before = net[2] if net is not None else self._coordinates(old, doc_id, id_bytes)
                after = self._coordinates(decode_doc(data), doc_id, id_bytes)
                if net is None:
                    batch[id_bytes] = [doc_id, stored, before, data, after]
                else:
                    net[3], net[4] = data, after
                changed += 1
            self._write_batch(wtx, batch)
        return changed

    def delete_many(
        self, tx: WriteTransaction, ids: Iterable[Any], *, missing: Literal["error", "skip"] = "error"
    ) -> int:
        """:meth:`delete` many documents and their items as one batch; return how many were deleted.

        An id with no document (or one deleted earlier in the batch: ids may repeat) raises
        ItemNotFoundError naming it (``missing="error"``) or is passed over (``missing="skip"``, as
        :meth:`discard` does). The result is that of :meth:`delete` id by id, but a batch that raises
        writes nothing at all: a missing id, or a document that cannot be indexed (ExtractionError),
        raised at the first id that meets it; then, when every id was read, an aggregate that
        drifted from the table (ItemNotFoundError, as :meth:`delete` says). The documents are read
        and their items extracted first, then removed per aggregate tree (the batch under
        :meth:`tallytree.ChangeHandler.apply_many`). Unlike :meth:`delete`, the documents are not
        returned (read them first with :meth:`get_many` if they are needed): the batch holds only
        their items. The cyclic garbage collector is paused during the call. O(m a log n) for m ids
        and a attached aggregates: 5,000 deletes took 0.49-0.85x the time of the calls one by one in
        tables of 10^5 and 10^6 documents with two aggregates (docs/tables.md). Memory: O(m a) for
        the removed items. To delete a range of one aggregate's keys, :meth:`delete_range` drops
        whole subtrees instead.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> invoices = db.table("invoices")
        >>> by_status = invoices.aggregate("invoices_by_status", key="status", values=("total",))
        >>> with db.write() as tx:
        ...     invoices.insert_many(tx, [{"status": "open", "total": t} for t in (10, 25, 5)])
        ...     invoices.delete_many(tx, [1, 3])
        ...     invoices.delete_many(tx, [2, 3], missing="skip")
        [1, 2, 3]
        2
        1
        >>> with db.write() as tx:
        ...     invoices.delete_many(tx, [4])
        Traceback (most recent call last):
        tallytree.errors.ItemNotFoundError: table 'invoices': no document with id 4 to delete; ...
        >>> with db.read() as tx:
        ...     invoices.count(tx), by_status.totals(tx)
        (0, Totals(count=0, total=0))
        """
        wtx = self._begin(tx)
        self._check_missing(missing)
        where = f"table {self.name!r}"
        ids = iterator_of(ids, f"{where}: delete_many", "document ids")
        prefix, doc = self._prefix, wtx.doc
        batch: dict[bytes, _Net] = {}
        with gc_paused():  # the batch's items are many live tuples: spare the GC's rescans
            for doc_id in ids:
                id_bytes = self._encode_id(doc_id)
                stored = None if id_bytes in batch else doc(prefix + id_bytes)
                if stored is None:
                    if missing == "skip":
                        continue
                    again = " (it was deleted earlier in this batch)" if id_bytes in batch else ""
                    raise ItemNotFoundError(
                        f"{where}: no document with id {doc_id!r} to delete{again}; pass missing='skip' "
                        "to pass over missing ones. Nothing was deleted"
                    )
                before = self._coordinates(self._stored_doc(stored, doc_id), doc_id, id_bytes)
                batch[id_bytes] = [doc_id, None, before, None, None]
            self._write_batch(wtx, batch)
        return len(batch)

    @staticmethod
    def _check_missing(missing: object) -> None:
        if missing not in ("error", "skip"):
            raise InvalidArgumentError(f"missing= must be 'error' or 'skip', not {missing!r:.60}")

    def _write_batch(self, wtx: WriteTransaction, batch: Mapping[bytes, _Net]) -> None:
        """Write the net effect of a batch of changed documents (see :data:`_Net`): every item move is
        checked against the trees first (an item to move or remove must be there, a new place must be
        free: else the aggregate drifted, and the drift error is raised with nothing written), then
        written per tree (``ChangeHandler.apply_many``'s batch), then the documents."""
        from ._hooks import _Batch, _stays  # noqa: PLC0415  # _hooks imports this module

        checked = _Batch(wtx, False, self.name)
        aggregates = [definition.aggregate for definition in self._definitions.values()]
        written: list[tuple[bytes, bytes | None]] = []
        for id_bytes, (doc_id, stored, before, data, after) in batch.items():
            if data is not None and data == stored:  # changed, then back byte for byte: nothing to write
                continue
            written.append((id_bytes, data))
            if after is None:
                moves = [
                    (aggregate, old, None)
                    for aggregate, old in zip(aggregates, before, strict=True)
                    if old is not None
                ]
            else:
                moves = [
                    (aggregate, old, new)
                    for aggregate, old, new in zip(aggregates, before, after, strict=True)
                    if (old is not None or new is not None) and not _stays(old, new)
                ]
            if moves:
                checked.add_moves(moves, doc_id)
        failure = checked.first_failure()
        if failure is not None:
            raise failure
        if not written:  # nothing changed: nothing is written, the table's state included
            return
        checked.write()
        prefix = self._prefix
        for id_bytes, data in written:
            wtx.set_doc(prefix + id_bytes, data)
        self._count -= sum(data is None for _, data in written)
        self._save_state(wtx)

    def delete_range(
        self,
        tx: WriteTransaction,
        aggregate: str | Aggregate,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        export: Callable[[Any, Document], object] | None = None,
    ) -> Totals:
        """Delete every document whose item in ``aggregate`` lies within the bounds; return the totals
        of the removed items of that aggregate.

        ``export(id, document)`` is called for each of them, in key order, before anything is deleted
        (to archive them; if it raises, nothing is deleted; if it writes to the table, TransactionError
        is raised and nothing is deleted). The items in ``aggregate`` go with a range
        delete that drops whole subtrees; the other aggregates lose one item per document.
        O(k (log n + a log n)) for k documents. Raises AggregateNotFoundError if ``aggregate`` is not
        attached to this table.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> logs = db.table("logs")
        >>> by_day = logs.aggregate("logs_by_day", key="day", values=("size",))
        >>> with db.write() as tx:
        ...     _ = logs.insert_many(tx, [{"day": day, "size": 10 * day} for day in range(1, 8)])
        >>> archived = []
        >>> with db.write() as tx:
        ...     logs.delete_range(tx, by_day, lt=4, export=lambda id, doc: archived.append(id))
        Totals(count=3, size=60)
        >>> with db.read() as tx:
        ...     archived, logs.count(tx), by_day.totals(tx)
        ([1, 2, 3], 4, Totals(count=4, size=220))
        """
        wtx = self._begin(tx)
        if isinstance(aggregate, Aggregate):
            name = aggregate.name
        elif isinstance(aggregate, str):
            name = aggregate
        else:
            raise ArgumentTypeError(
                f"table {self.name!r}: delete_range takes an attached aggregate or its name, "
                f"not {aggregate!r:.60}"
            )
        if export is not None and not callable(export):
            raise ArgumentTypeError(
                f"table {self.name!r}: export= takes a function of (id, document), not {export!r:.60}"
            )
        driving = self._definitions.get(name)
        if driving is None:
            raise AggregateNotFoundError(f"table {self.name!r} has no aggregate {name!r}")
        target = driving.aggregate
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree_key = target._tree_key(namespace)
        tree = Tree(wtx, len(target.fields), target.node_size, wtx.root(tree_key))
        start, stop = target._range(tree, bounds)
        if start >= stop:
            return Totals.from_summary(target.fields, tree.zero())
        removed: list[tuple[Any, bytes, Document]] = []
        for entry, _ in tree.iterate(start, stop):
            _, offset = decode_key(entry)
            id_bytes = entry[offset:]
            doc_id = decode_key(id_bytes)[0]
            stored = wtx.doc(self._prefix + id_bytes)
            if stored is None:
                raise ItemNotFoundError(
                    f"{name}: holds document {doc_id!r}, which table {self.name!r} does not have; "
                    "run tallytree.repair() on it"
                )
            removed.append((doc_id, id_bytes, self._stored_doc(stored, doc_id)))
        if export is not None:
            version = (wtx.docs_version, wtx.versions.get(tree_key, 0))
            for doc_id, _, doc in removed:
                export(doc_id, doc)
                if (wtx.docs_version, wtx.versions.get(tree_key, 0)) != version:
                    # the range found above may no longer be these documents' items
                    raise TransactionError(
                        f"table {self.name!r}: export wrote to the table (or to {name}) during "
                        "delete_range; nothing was deleted. Collect what to write, and write it after "
                        "delete_range returns"
                    )
        # every item to remove from the other aggregates, before anything is written: an extractor
        # that raises (or an aggregate that drifted, below) then leaves the table as it was
        others = [d.aggregate for d in self._definitions.values() if d is not driving]
        coords = [
            (
                doc_id,
                [
                    d.coordinates(doc, doc_id, id_bytes)
                    for d in self._definitions.values()
                    if d is not driving
                ],
            )
            for doc_id, id_bytes, doc in removed
        ]
        done: list[tuple[Aggregate, Coord]] = []
        try:
            for doc_id, places in coords:
                why = f"table {self.name!r}, document {doc_id!r}"
                for other, coord in zip(others, places, strict=True):
                    if coord is not None:
                        held = move_exactly(wtx, other, coord, None, why)
                        assert held is not None
                        done.append((other, held))
        except (ItemNotFoundError, DuplicateItemError):  # drift: undo the moves made, write nothing
            for other, held in reversed(done):
                move(wtx, other, None, held)
            raise
        for _, id_bytes, _ in removed:
            wtx.set_doc(self._prefix + id_bytes, None)
        tree = Tree(wtx, len(target.fields), target.node_size, wtx.root(tree_key))
        summary = tree.delete_range(start, stop)
        changed, root = tree.take_root()
        if changed:
            wtx.set_root(tree_key, root)
        self._count -= len(removed)
        self._save_state(wtx)
        return Totals.from_summary(target.fields, summary)

    def clear(self, tx: WriteTransaction) -> int:
        """Delete every document and empty every attached aggregate, in ``tx``; return how many
        documents were removed.

        The aggregates stay attached (with their definitions) and are emptied whole, every namespace's
        tree dropped at once, as :meth:`tallytree.Aggregate.clear` drops one: no document is decoded
        and no extractor runs. The generated-id counter is kept (ids are never reused). O(n + nodes)
        for n documents and the aggregates' nodes (leaves are dropped by id without being read),
        where deleting the documents one by one costs O(n a log n) for a attached aggregates. Like
        every table write, it raises TransactionError, changing nothing, while an aggregate defined
        with a function awaits that function after reopening; an exception later in the transaction
        undoes it with the rest.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> jobs = db.table("jobs")
        >>> by_state = jobs.aggregate("jobs_by_state", namespace="team", key="state", values=("secs",))
        >>> with db.write() as tx:
        ...     jobs.insert_many(tx, [{"team": team, "state": "done", "secs": 5} for team in "abc"])
        ...     jobs.clear(tx)
        [1, 2, 3]
        3
        >>> with db.write() as tx:
        ...     jobs.insert(tx, {"team": "a", "state": "new", "secs": 1})  # a new id: 4
        ...     jobs.count(tx), by_state.totals(tx, namespace="a"), list(by_state.namespaces(tx))
        4
        (1, Totals(count=1, secs=1), [('a', Totals(count=1, secs=1))])
        """
        wtx = self._begin(tx)
        for definition in self._definitions.values():
            _drop_trees(wtx, definition.aggregate)
        keys = [key for key, _ in wtx.docs(self._prefix, self._stop)]
        for key in keys:
            wtx.set_doc(key, None)
        self._count = 0
        self._save_state(wtx)
        return len(keys)


def _show(description: Any, aggregate: Aggregate | None) -> str:
    parts = [f"{role}={description[role]!r}" for role in ("key", "namespace", "values", "where")]
    parts.append(f"on_missing={description['on_missing']!r}")
    if aggregate is not None:
        parts.append(f"node_size={aggregate.node_size}")
    return ", ".join(parts)


def _define_aggregate(
    tx: WriteTransaction, name: str, fields: tuple[str, ...], node_size: int, *, owner: str
) -> Aggregate:
    """Write a new aggregate definition (owned by a table) in ``tx``, as ``_db`` writes one (which
    refuses an id the damaged counter would give again)."""
    from ._db import define_aggregate  # noqa: PLC0415  # _db imports this module

    return define_aggregate(tx, name, fields, node_size, owner=owner)


def _drop_trees(tx: WriteTransaction, aggregate: Aggregate) -> None:
    """Delete every tree of an aggregate, including trees created earlier in this transaction."""
    prefix = aggregate._prefix
    stop = (aggregate._id + 1).to_bytes(4, "big")
    roots: dict[bytes, Root | None] = {
        key: decode_root(value) for key, value in tx.kv.scan(ROOTS, prefix, stop)
    }
    roots.update({key: root for key, root in tx.changed_roots().items() if key.startswith(prefix)})
    for tree_key, root in roots.items():
        if root is None:
            continue
        tree = Tree(tx, len(aggregate.fields), aggregate.node_size, root)
        tree.delete_range(0, tree.count)
        tx.set_root(tree_key, None)


def create_table(db: Database, tx: WriteTransaction, name: str) -> bytes:
    """Write a new, empty table record in ``tx``; return it.

    Table ids are never reused, so a counter (META ``next_table``) set back would give the new table
    the documents of an existing one: an id that documents (one cursor seek), a document count or
    another table's record already use raises CorruptDatabaseError, and the write transaction,
    aborted, writes nothing. O(tables)."""
    stored = tx.meta(_NEXT_TABLE)
    table_id = int.from_bytes(stored, "big") if stored else 1
    taken = not 1 <= table_id <= MAX_AGGREGATE_ID
    if not taken:
        prefix, stop = table_id.to_bytes(4, "big"), (table_id + 1).to_bytes(4, "big")
        taken = next(tx.docs(prefix, stop), None) is not None or tx.meta(_STATE_PREFIX + prefix) is not None
    if not taken:
        stop = _TABLE_PREFIX[:-1] + bytes([_TABLE_PREFIX[-1] + 1])
        for key, other in tx.kv.scan(META, _TABLE_PREFIX, stop):
            try:
                taken = (
                    decode_record(key[len(_TABLE_PREFIX) :].decode(errors="replace"), other)["id"] == table_id
                )
            except CorruptDatabaseError:  # (its id is unknown; ``Database.table`` reports it when opened)
                continue
            if taken:
                break
    if taken:
        raise counter_damaged("table", name, _NEXT_TABLE, table_id)
    tx.set_meta(_NEXT_TABLE, (table_id + 1).to_bytes(4, "big"))
    record: bytes = msgpack.packb({"id": table_id, "aggregates": {}})
    tx.set_meta(_TABLE_PREFIX + name.encode(), record)
    return record


def table_from(db: Database, name: str, record: bytes) -> Table:
    """A Table object for a stored record (CorruptDatabaseError for a damaged one)."""
    return Table(db, name, decode_record(name, record)["id"])
