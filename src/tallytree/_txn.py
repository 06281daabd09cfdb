"""Transactions: one consistent snapshot for reads, and a buffered, atomic batch for writes.

Design
======
A :class:`ReadTransaction` wraps a backend snapshot and hands the tree algorithm committed nodes,
decoded once and shared through the database's node cache. A :class:`WriteTransaction` adds an overlay
that implements the tree's ``NodeAccess`` copy-on-write contract:

* ``mutable(node)`` copies a committed node under the id of its next version (``renew``, below); later
  changes in the same transaction edit the copy in place; new nodes (a split, a batch's leaves) get
  fresh slots from the ``next_id`` counter in ``meta``;
* root records changed by the transaction are kept in a dict;
* META values and documents (the DOCS table, see ``_table``) written by the transaction are kept in
  dicts (``None`` for a deletion) that its own reads consult first;
* *deferred inserts* (:meth:`WriteTransaction.defer_insert`, used by table inserts) are queued per tree
  and merged in sorted runs (``Tree.insert_sorted_run``) before anything reads that tree's root
  (``root``), before ``changed_roots`` and at commit, so every read still sees them;
* new nodes may also come already encoded: bulk builds (``adopt_encoded``) and leaves a batch merged
  in their stored bytes (``replace_stored``, see ``_btree``) are kept as bytes, decoded again only if
  the transaction reads them, and, not being decoded, do not enter the node cache at commit;
* an internal node a single insert rewrote from its stored bytes (``adopt_prepared``, see
  ``NodeTree.insert``) comes with both forms, its bytes and its node in committed form (tuples):
  reads in the transaction get the node, the commit writes the bytes and caches the node, and a
  later change in the transaction copies it like a committed node (the copy replaces it, and it is
  never written);
* nothing reaches the backend until :meth:`WriteTransaction.commit`, which encodes every dirty node once
  and hands the backend one batch. An exception in the ``with`` block discards the overlay, so a failed
  transaction writes nothing;
* after the commit, a dirty internal node is frozen (its lists made tuples) and cached; a dirty leaf is
  cached as a decode would make it, compact (its search image, built from the bytes just written),
  so the cache holds 5.1 KiB for a leaf of 115 entries instead of 19.6, and replacing it later frees
  one object instead of ~300.

Dirty nodes enter the shared cache only after the commit succeeded, so the cache never holds a node
that was not committed.

Slots and versions (format 4)
-----------------------------
A node id is ``version << SLOT_BITS | slot`` (36 bits of slot, 27 of version). The NODES key is the
slot (:func:`node_key`); the version is there for the node cache, which is keyed by id: committed
contents never change under one id. A write that rewrites a committed node (every node of its path)
gives the new copy the same slot and the next version (:meth:`WriteTransaction.renew`), and the
commit *overwrites* the slot's value. Until format 3 every rewrite took a fresh id from the counter:
the commit appended new keys, deleted the old ones (each delete a B-tree search and a page copy in
LMDB) and put the counter. Overwriting writes fewer LMDB pages, and a write that splits nothing
draws no id at all. Measured at 10^6 events, one scattered insert per commit, alternating processes
(session 35): 0.86-0.95x the time per commit (54.1-56.7 us against 59.6-64.4 us median), LMDB's part
of the commit 18.5-19.5 us against 22.3-24.2 us; a bare py-lmdb replay of a three-node path (node
values of 3 KB) 34.8 us overwriting against 47.2 us appending and deleting.

Readers of older snapshots are unaffected: LMDB copies a page on write, so their snapshot keeps the
slot's old value, under the old id their parents name. Three rules keep ids meaning one content:

* a node this transaction made (never committed, so never cached nor seen elsewhere) keeps its id
  when it is rewritten again, so a slot goes up at most one version per commit, however often the
  transaction rewrites it;
* a slot is never reused once deleted: a node dropped (a merge, a batch's replaced leaves) deletes
  its slot, and new nodes take new slots from the counter;
* versions wrap after :data:`VERSIONS` (2**27), so an id can come back naming other contents that
  many commits of its slot later. A node cache serves only transactions whose snapshots are less
  than :data:`CACHE_SPAN` (2**26) commits after the one it started at, and is then replaced by an
  empty one (``Database._cache_for``): within a cache, no id can have come back.

A format 3 database reads as it is: its ids are version 0 of their slots. Format 3 code cannot read
format 4 (a version above 0 names a key it does not find), so the first open for writing retags the
database (``_db``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice, repeat
from operator import itemgetter
from struct import Struct
from typing import TYPE_CHECKING, Any

import msgpack

from ._btree import MAX_LEVELS, Root
from ._gc import gc_paused
from ._keys import _show
from ._native import StoredSource, WriteKit, speedups
from ._node import Node, _PatchedNode, compact_leaf, decode_node, encode_node, pack_summary, unpack_summary
from ._store import DOCS, META, NODES, ROOTS, KVTxn, NodeCache, Op
from ._tree import Tree
from .errors import ArgumentTypeError, CorruptDatabaseError, TransactionError

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["ReadTransaction", "Transaction", "WriteTransaction", "encode_root", "node_key"]

_ENDED = "this transaction has ended; start a new one with db.read() or db.write()"
_NEXT_ID = b"next_id"
_DECODED_ROOTS = 4096  # decoded root records kept, each with its pending node (emptied when full)
_BULK_COMMIT = 64  # dirty nodes beyond which a commit pauses the cyclic garbage collector
_DEFERRED_RUN = 2048  # queued inserts per tree before they are merged: bounds the queue's memory


def _counter_damage(what: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"the database's node id counter (meta next_id) is damaged ({what}); nothing was written. Run "
        "`tallytree check`, and restore the database from a backup or rebuild its aggregates from "
        "their source"
    )


SLOT_BITS = 36
"""A node id is ``version << SLOT_BITS | slot``: the slot names its NODES key, the version tells the
node cache one content of the slot from the next (see the module docstring)."""
SLOT_MASK = (1 << SLOT_BITS) - 1
VERSIONS = 1 << (63 - SLOT_BITS)
"""How many versions a slot counts through before it wraps to 0 (ids stay below 2**63)."""
CACHE_SPAN = VERSIONS >> 1
"""How many commits one node cache may serve before it is replaced by an empty one: fewer than
:data:`VERSIONS`, so no slot's version can wrap around to one the cache holds (see ``Database``)."""


def node_key(node_id: int) -> bytes:
    """The NODES table key of a node id: its slot, 8 bytes big-endian. O(1).

    >>> node_key(5) == node_key(3 << SLOT_BITS | 5) == (5).to_bytes(8, "big")
    True
    """
    return (node_id & SLOT_MASK).to_bytes(8, "big")


_pack_slot = Struct(">Q").pack


def _node_keys(node_ids: Iterable[int]) -> Iterator[bytes]:
    """:func:`node_key` of each id, by C-level loops (no Python call per id)."""
    return map(_pack_slot, map(SLOT_MASK.__and__, node_ids))


def _stale_reference(node_id: int) -> CorruptDatabaseError:
    """The error for a reference to a committed node this transaction replaced already (see
    ``WriteTransaction.renew``): the tree refers to one node twice, or to a dropped one."""
    return CorruptDatabaseError(f"node {node_id} was replaced in this transaction but is still referenced")


def renewed(node_id: int) -> int:
    """The id of the next version of a node: the same slot, the version after this one's (after the
    last version comes 0). O(1).

    >>> renewed(7) == 1 << SLOT_BITS | 7, renewed((VERSIONS - 1) << SLOT_BITS | 7)
    (True, 7)
    """
    return (((node_id >> SLOT_BITS) + 1) % VERSIONS) << SLOT_BITS | (node_id & SLOT_MASK)


def _remember(decoded: dict[bytes, tuple[bytes, Root]], tree: bytes, data: bytes, root: Root) -> None:
    """Keep a decoded root record with its bytes, emptying the (bounded) dict when it is full. O(1)."""
    if len(decoded) >= _DECODED_ROOTS:
        decoded.clear()
    decoded[tree] = (data, root)


def encode_root(root: Root) -> bytes:
    """The ROOTS table value of a root record: ``[node id, height, summary]``, followed, when the tree
    has pending entries, by the pending node's bytes (``encode_node``, or the bytes a new event's
    commit appended to, ``Root.packed_pending``) and its summary; a format 2 record gives the pending
    node's id in place of its bytes. The C kernel ``pack_root`` writes the
    same bytes (every commit writes one per changed tree): 1.6 us instead of 3.3 for a record with a
    pending id and summary whose float sums need more than 64 bits once their trailing zeros are
    factored out, the usual case for 10^5 events with costs of six decimals. It converts each sum
    once (session 17; the big sums' conversions are most of its work): a record holding a pending
    node of 40 events, 1.8 us with the call where measuring and writing each sum apart took 3.0, and
    0.95x the time of a time-ordered commit (in-process A/B, three runs of 21-31 rounds)."""
    node = root.pending_node
    pending: int | bytes = root.pending if root.packed_pending is None else root.packed_pending
    if node is not None:  # a committed node keeps its bytes: a write elsewhere in the tree reuses them
        pending = node._packed if node._packed is not None and not node.dirty else encode_node(node)
        node._packed = pending  # used once the commit freezes the node
    if speedups is not None:
        packed = speedups.pack_root(root.node_id, root.height, root.summary, pending, root.pending_summary)
        if packed is not None:
            return packed
    parts: list[Any] = [root.node_id, root.height, pack_summary(root.summary)]
    if pending:
        assert root.pending_summary is not None
        parts += [pending, pack_summary(root.pending_summary)]
    return msgpack.packb(parts, use_bin_type=True)  # type: ignore[no-any-return]


def decode_root(data: bytes) -> Root:
    """Inverse of :func:`encode_root`. The pending node's bytes are decoded on first use
    (``Root.pending_of``): listing namespaces reads only the totals. The C kernel ``unpack_root``
    reads the fields (1.5 us, where msgpack and Python took 3.8 us for a record without a pending
    node), which are then checked here."""
    try:
        fields = speedups.unpack_root(data) if speedups is not None and type(data) is bytes else None
        if fields is None:
            fields = _read_root(data)
        node_id, height, summary, held, pending_summary = fields
        if not (0 <= node_id < 1 << 63 and 0 <= height <= MAX_LEVELS and (node_id == 0) == (height == 0)):
            raise ValueError(f"node id {node_id} and height {height} do not go together")
        if pending_summary is None:
            return Root(node_id, height, summary)
        if len(pending_summary) != len(summary) or not 1 <= pending_summary[0] <= summary[0]:
            raise ValueError("the pending totals do not fit the totals")
        if type(held) is bytes and held:
            root = Root(node_id, height, summary, 0, pending_summary)
            root.packed_pending = held
            return root
        if type(held) is not int or held <= 0:
            raise ValueError("malformed pending node")
        return Root(node_id, height, summary, held, pending_summary)
    except Exception as exc:
        raise CorruptDatabaseError(f"a root record cannot be decoded ({exc})") from exc


def _read_root(data: bytes) -> tuple[int, int, list[int], int | bytes | None, list[int] | None]:
    """The fields of a root record, as ``unpack_root`` reads them, in Python; ValueError (or another
    exception) for what is not a root record."""
    node_id, height, summary, *pending = msgpack.unpackb(data, raw=False)
    if not all(type(value) is int for value in (node_id, height)):
        raise ValueError("the node id and the height must be ints")
    if type(summary) is not list or not summary or type(summary[0]) is not int or summary[0] < 0:
        raise ValueError("malformed totals")
    if not pending:
        return node_id, height, unpack_summary(summary), None, None
    held, pending_summary = pending
    if type(pending_summary) is not list or not pending_summary or type(pending_summary[0]) is not int:
        raise ValueError("malformed pending summary")
    return node_id, height, unpack_summary(summary), held, unpack_summary(pending_summary)


def check_transaction(tx: object, db: Database, who: str) -> None:
    """Raise unless ``tx`` is an open transaction of ``db``: ArgumentTypeError when it is not a
    transaction at all (``who`` names the caller), else as :meth:`Transaction.check_database`. O(1).
    """
    if not isinstance(tx, Transaction):
        raise ArgumentTypeError(
            f"{who}: the first argument is a transaction (`with db.read() as tx:` or "
            f"`with db.write() as tx:`), not {_show(tx)}"
        )
    tx.check_database(db)


DEFINITIONS = b"agg:"
"""The prefix of the META keys of aggregate definitions (``agg:`` + name; written by ``_db`` and
``_table``)."""
MIN_NODE_SIZE = 4
MAX_NODE_SIZE = 1024
"""The node sizes an aggregate may have: ``node_size=`` is checked against them when an aggregate is
created (``_db``), and a stored definition when it is decoded (:func:`decode_definition`)."""
RESERVED_FIELDS = ("count", "fields", "sums", "mean", "as_dict", "from_summary", "from_values")
"""Names no new value field may have: they name attributes of ``Totals`` (every public one: a field of
such a name would read as the attribute, ``totals.from_values`` a method; tests/test_aggregate.py
checks the list against ``dir(Totals)``)."""
_RESERVED_STORED = RESERVED_FIELDS[:5]
"""The names a stored definition may not have: the last two were reserved in session 29, and a field
so named before stays readable (as ``totals["from_values"]``)."""
MAX_AGGREGATE_ID = (1 << 32) - 2
"""Aggregate ids are counted from 1 and are the 4-byte prefix of their trees' keys (ROOTS); the next
prefix ends the scans of an aggregate's trees, so the last one is not an id."""


def field_name_ok(field: str) -> bool:
    """Whether ``field`` may name a stored value field: an identifier not starting with ``_`` and not
    one of :data:`_RESERVED_STORED`. What a stored definition is held to; a new aggregate's
    ``values=`` is also held to :data:`RESERVED_FIELDS` (``_db``).

    >>> field_name_ok("cost"), field_name_ok("_cost"), field_name_ok("count")
    (True, False, False)
    """
    return field.isidentifier() and field[0] != "_" and field not in _RESERVED_STORED


def counter_damaged(kind: str, name: str, counter: bytes, new_id: int) -> CorruptDatabaseError:
    """The error for a new aggregate or table (``kind``) whose id counter (META ``counter``) gives an
    id that one already uses, or that is out of range: the counter was set back or damaged."""
    return CorruptDatabaseError(
        f"cannot create {kind} {name!r}: the {kind} id counter (META {counter!r}) gives id {new_id}, "
        f"which an existing {kind} uses (or which is out of range): the counter is damaged; nothing "
        "was written. Run `tallytree check`, then restore the database from a backup or rebuild it "
        "from the source data"
    )


def decode_definition(name: str, data: bytes, tx: Transaction | None = None) -> dict[str, Any]:
    """The stored definition of aggregate ``name`` (the META record ``agg:`` + name), checked.

    The only decoder of definitions: a map of ``id`` (an int from 1 to :data:`MAX_AGGREGATE_ID`),
    ``values`` (a list of distinct field names), ``node_size`` (an int from :data:`MIN_NODE_SIZE`
    to :data:`MAX_NODE_SIZE`) and, for an aggregate a table maintains, ``table`` (its name, or
    None). With ``tx``, its field count is also compared with the totals held by the first of its
    trees' root records (one cursor seek): a definition that gained or lost a field would read the
    trees' sums under the wrong names. A definition is decoded when an aggregate is opened or its
    record changes, never on the path of a read or a write. Raises CorruptDatabaseError naming the
    record. O(fields).

    >>> decode_definition("events", msgpack.packb({"id": 3, "values": ["cost"], "node_size": 128}))
    {'id': 3, 'values': ['cost'], 'node_size': 128}
    >>> decode_definition("events", msgpack.packb({"id": "3", "values": ["cost"], "node_size": 128}))
    Traceback (most recent call last):
    tallytree.errors.CorruptDatabaseError: the definition of aggregate 'events' ... its id is '3', not an...
    """
    try:
        definition = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError) as exc:  # msgpack's errors (and UnicodeDecodeError) are ValueErrors
        raise _damaged_definition(name, f"it does not decode ({type(exc).__name__}: {exc})") from exc
    problem = _definition_problem(definition)
    if problem is None and tx is not None:
        problem = _field_count_problem(definition, tx)
    if problem is not None:
        raise _damaged_definition(name, problem)
    return definition  # type: ignore[no-any-return]


def _definition_problem(definition: Any) -> str | None:
    """What makes a decoded definition unusable, or None."""
    if type(definition) is not dict:
        return f"it holds {type(definition).__name__} {_show(definition)}, not a map"
    missing = [field for field in ("id", "values", "node_size") if field not in definition]
    if missing:
        return f"it has no {' and no '.join(missing)}"
    agg_id, values, node_size = definition["id"], definition["values"], definition["node_size"]
    if type(agg_id) is not int or not 1 <= agg_id <= MAX_AGGREGATE_ID:
        return f"its id is {_show(agg_id)}, not an int from 1 to {MAX_AGGREGATE_ID}"
    if type(values) is not list or not all(type(field) is str and field_name_ok(field) for field in values):
        return f"its value fields {_show(values)} are not a list of field names"
    if len(set(values)) != len(values):
        return f"its value fields {values} repeat a name"
    if type(node_size) is not int or not MIN_NODE_SIZE <= node_size <= MAX_NODE_SIZE:
        return f"its node_size is {_show(node_size)}, not an int from {MIN_NODE_SIZE} to {MAX_NODE_SIZE}"
    owner = definition.get("table")
    if owner is not None and (type(owner) is not str or not owner):
        return f"the table that maintains it is {_show(owner)}, not a table name"
    return None


def _field_count_problem(definition: dict[str, Any], tx: Transaction) -> str | None:
    """A disagreement between a definition's field count and the totals of its first root record."""
    agg_id = definition["id"]
    start = agg_id.to_bytes(4, "big")
    for _, data in tx.kv.scan(ROOTS, start, (agg_id + 1).to_bytes(4, "big")):
        try:
            width = len(decode_root(data).summary)
        except CorruptDatabaseError:  # the record's own damage (``check`` reports it)
            return None
        if width != 1 + 2 * len(definition["values"]):
            return (
                f"it has {len(definition['values'])} value field(s) {definition['values']}, but its "
                f"trees hold totals of {(width - 1) // 2}"
            )
        return None
    return None


def _damaged_definition(name: str, problem: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"the definition of aggregate {name!r} (META record {DEFINITIONS + name.encode()!r}) is damaged: "
        f"{problem}; run `tallytree check` to see all the damage, then restore the database from a "
        "backup or rebuild its aggregates from their source"
    )


class Transaction:
    """A consistent snapshot of the database; the base of read and write transactions.

    Use it only as the ``tx`` argument of aggregate methods, inside its ``with`` block. Reads take
    any transaction and are annotated ``tx: Transaction``: annotate a helper of your own that only
    reads the same way, and one that writes ``tx: WriteTransaction`` (see :class:`WriteTransaction`).
    """

    write = False

    def __init__(self, db: Database, kv: KVTxn) -> None:
        self._db = db
        self._kv = kv
        cache = db._cache
        if not 0 <= kv.snapshot - cache.floor < CACHE_SPAN:  # see CACHE_SPAN
            cache = db._cache_for(kv.snapshot)
        self._cache: NodeCache = cache
        self._cached = self._cache.lookup  # the cache store's own get: one C call per node on a descent
        self._decoded = db._roots
        self._roots: dict[bytes, Root | None] = {}
        self._open = True
        self.versions: dict[bytes, int] = {}
        # The trees a read transaction has read, by tree key (see Aggregate._reader): its snapshot
        # never changes, so a namespace read again reuses its tree. Bounded: cleared when full.
        self._readers: dict[bytes, Tree] = {}
        self._epoch = kv.epoch  # see Aggregate._confirm

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<{type(self).__name__} {state}>"

    @property
    def kv(self) -> KVTxn:
        """The backend transaction (raises if this transaction has ended)."""
        if not self._open:
            raise TransactionError(_ENDED)
        return self._kv

    def check_database(self, db: Database) -> None:
        """Raise unless this transaction is open and belongs to ``db``."""
        if db is not self._db:
            raise TransactionError("this transaction belongs to another database")
        if not self._open:
            raise TransactionError(_ENDED)
        if db._closed:
            raise db._closed_error(
                "the database was closed while this transaction was open; end transactions before "
                "db.close(), and open the database again"
            )

    @property
    def shared(self) -> object:
        """The shared cache's store, which a read transaction's descents may take nodes from."""
        return self._cache.shared

    def count_hits(self, hits: int) -> None:
        """Count cache hits of a descent that took nodes from :attr:`shared`."""
        self._cache.hits += hits

    def write_kit(self) -> WriteKit:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def node(self, node_id: int) -> Node:
        """A committed node by id, through the shared cache. O(1) when cached, O(size) to decode."""
        node = self._cached(node_id)
        if node is not None:
            self._cache.hits += 1
            return node
        self._cache.misses += 1
        data = self.kv.get(NODES, node_key(node_id))
        if data is None:
            raise CorruptDatabaseError(
                f"node {node_id} is referenced but missing; run `tallytree check` on the database"
            )
        node = decode_node(data, node_id)
        self._cache.put(node)
        return node

    def root(self, tree: bytes) -> Root | None:
        """The root record of a tree (aggregate id + namespace), or None for an empty tree."""
        roots = self._roots
        if tree in roots:
            return roots[tree]
        if not self._open:  # (the kv property, inlined: every write looks its tree's record up)
            raise TransactionError(_ENDED)
        data = self._kv.get(ROOTS, tree)
        root = None
        if data is not None:
            # A record decoded before, by any transaction, is reused when its bytes are the same: root
            # records are never changed in place (trees copy what they change), so sharing is safe.
            known = self._decoded.get(tree)
            if known is not None and known[0] == data:
                root = known[1]
            else:
                root = decode_root(data)
                _remember(self._decoded, tree, data, root)
        roots[tree] = root
        return root

    def meta(self, key: bytes) -> bytes | None:
        """A value of the META table."""
        return self.kv.get(META, key)

    def doc(self, key: bytes) -> bytes | None:
        """A value of the DOCS table (an encoded document), or None."""
        return self.kv.get(DOCS, key)

    def docs(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """The DOCS entries with ``start <= key < stop``, in key order (descending when ``reverse``).

        Lazy: an iteration resumed after the transaction ended raises TransactionError (rather than
        the backend's own error, or reading on from a snapshot that is gone)."""
        for entry in self.kv.scan(DOCS, start, stop, reverse):
            yield entry
            if not self._open:
                raise TransactionError(_ENDED)

    def doc_batches(self, start: bytes, stop: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """The entries of :meth:`docs`, as lists of up to ``size``: for whole-table passes."""
        return self.kv.scan_batches(DOCS, start, stop, size)

    def stored(self, node_id: int) -> bytes | None:
        """The stored bytes of a committed node (None if it is missing). O(1)."""
        return self.kv.get(NODES, node_key(node_id))

    def stored_source(self) -> Callable[[int], bytes | None] | StoredSource:
        return self.stored

    def mutable(self, node: Node) -> Node:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def replace_stored(self, node_ids: list[int], data: list[bytes]) -> list[int]:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def new_id(self) -> int:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def renew(self, node_id: int) -> int:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def renew_all(self, node_ids: list[int]) -> list[int]:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def adopt_path(self, leaf_id: int, leaf: bytes, nodes: list[Node]) -> None:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def adopt(self, node: Node) -> Node:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def adopt_encoded(self, node_id: int, data: bytes) -> None:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def adopt_prepared(self, node: Node, data: bytes) -> None:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def free(self, node_id: int) -> None:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def _finish(self) -> None:
        self._open = False
        # The trees read refer back to this transaction: without them it is freed as soon as its
        # caller drops it, not at the next cyclic collection (an LMDB reader slot waits for that)
        self._readers.clear()

    def abort(self) -> None:
        """End the transaction, discarding any change of a write transaction. O(1).

        The ``with`` block ends it anyway (a write block by committing, unless it raised); inside
        the block, abort() ends it early: later reads and writes in it raise TransactionError, and
        the block's end does nothing. On a transaction already ended, abort() does nothing.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores")
        >>> with db.write() as tx:
        ...     scores.insert(tx, 1, "a")
        ...     tx.abort()  # the insert is dropped, and the block's end commits nothing
        >>> with db.read() as tx:
        ...     scores.count(tx)
        0
        """
        if self._open:
            self._finish()
            self._kv.abort()


class ReadTransaction(Transaction):
    """A read-only snapshot, what ``db.read()`` gives. Any number may be open at once, in any threads
    and processes. Writes refuse it: a type checker, as they take a :class:`WriteTransaction`, and at
    run time with TransactionError."""


class WriteTransaction(Transaction):
    """The one write transaction, what ``db.write()`` gives: reads see its own changes; all of them
    commit together or none.

    Every write (the writes of :class:`~tallytree.Aggregate` and :class:`~tallytree.Table`,
    ``ChangeHandler.apply``, :func:`tallytree.repair`) is annotated ``tx: WriteTransaction``, so
    ``mypy --strict`` refuses one given the ``tx`` of ``with db.read() as tx:``, which raises
    TransactionError at run time. Annotate your own write helpers the same way:

    >>> import tallytree
    >>> def record(tx: tallytree.WriteTransaction, events: tallytree.Aggregate, when: int) -> None:
    ...     events.insert(tx, when, f"e{when}")
    >>> db = tallytree.open_memory()
    >>> events = db.aggregate("events")
    >>> with db.write() as tx:
    ...     record(tx, events, 1)
    >>> with db.read() as tx:
    ...     record(tx, events, 2)  # mypy: incompatible type "ReadTransaction"
    Traceback (most recent call last):
    tallytree.errors.TransactionError: events: writes need a write transaction; use `with db.write() as tx:`
    """

    write = True

    def __init__(self, db: Database, kv: KVTxn) -> None:
        # The base class named, here and below, rather than super(): Python 3.11 makes a super
        # object for each such call, 0.1 us more per call (five of them per scattered insert)
        Transaction.__init__(self, db, kv)
        self._dirty: dict[int, Node] = {}
        self._encoded: dict[int, bytes] = {}  # new nodes given in stored form (bulk builds)
        self._prepared: dict[int, Node] = {}  # of those, the ones given decoded too (adopt_prepared)
        self._freed: list[int] = []  # committed nodes dropped: their slots are deleted at commit
        # slot -> the committed node a new version of it replaces (see renew): the commit puts the
        # new version under the slot's key, and the old one leaves the node cache
        self._overwrites: dict[int, int] = {}
        self._changed_roots: set[bytes] = set()
        self._meta: dict[bytes, bytes | None] = {}
        self._docs: dict[bytes, bytes | None] = {}
        self.docs_version = 0
        self._deferred: dict[bytes, tuple[int, int, list[tuple[bytes, tuple[Any, ...]]]]] = {}
        self._next_id: int | None = None
        self._source: StoredSource | None = None  # see stored_source()
        self._kit: WriteKit | None = None  # see write_kit()

    @property
    def shared(self) -> object:
        # the shared cache while the transaction has changed no node (its first write's descent);
        # once it has, its own nodes come first: every node through node()
        if self._dirty or self._encoded or self._overwrites or self._freed:
            return None
        return self._cache.shared

    def _finish(self) -> None:
        Transaction._finish(self)
        self._kit = None  # (it holds self.node: a cycle that would keep the transaction until a collection)
        # The thread holds no write transaction any more, even before its with block ends (a commit
        # or an abort in the block): a new db.write() may begin. (No other thread's flag can be set
        # while this transaction holds the backend's write lock, so resetting it is always right.)
        self._db._local.writing = False

    def node(self, node_id: int) -> Node:
        dirty = self._dirty.get(node_id)
        if dirty is not None:
            return dirty
        if self._prepared and node_id in self._prepared:
            return self._prepared[node_id]
        if self._encoded and node_id in self._encoded:  # read back a bulk-built node: now a dirty one
            dirty = self._dirty[node_id] = decode_node(self._encoded.pop(node_id), node_id).copy(node_id)
            return dirty
        node = self._cached(node_id)  # Transaction.node's hit, without its call (a descent's step)
        if node is not None:
            self._cache.hits += 1
            return node
        if self._overwrites and self._overwrites.get(node_id & SLOT_MASK, node_id) != node_id:
            # a new version of a slot, since dropped: its key still holds the committed version,
            # which must not be read (nor cached) under this id
            raise CorruptDatabaseError(
                f"node {node_id} was dropped in this transaction but is still referenced"
            )
        return Transaction.node(self, node_id)

    def stored(self, node_id: int) -> bytes | None:
        if node_id in self._dirty:
            return None
        data = self._encoded.get(node_id)
        if data is None:
            if self._overwrites and self._overwrites.get(node_id & SLOT_MASK, node_id) != node_id:
                return None  # a new version since dropped (see node): not the slot's stored bytes
            data = self.stored_source()[2](node_key(node_id))
        return data

    def stored_source(self) -> StoredSource:
        """What :meth:`stored` reads, for ``merge_children``: the dirty nodes (no stored bytes), the
        nodes given in stored form, and the NODES table's getter. The same objects for the whole
        transaction. O(1)."""
        if self._source is None:
            self._source = (self._dirty, self._encoded, self.kv.getter(NODES))
        return self._source

    def write_kit(self) -> WriteKit:
        """What the ``insert_stored`` kernel reads and fills, the same tuple for the whole
        transaction: :meth:`node`, the shared cache's store, :meth:`stored_source`, the dirty,
        encoded, prepared and overwritten nodes, the freed ones, the node cache, the node classes,
        and :data:`VERSIONS`. The kernel writes only while the transaction has changed no node (its
        first write), doing there what :meth:`renew_all` and :meth:`adopt_path` do. O(1)."""
        kit = self._kit
        if kit is None:
            kit = self._kit = (
                self.node,
                self._cache.shared,
                self.stored_source(),
                self._dirty,
                self._encoded,
                self._prepared,
                self._overwrites,
                self._freed,
                self._cache,
                Node,
                _PatchedNode,
                VERSIONS,
            )
        return kit

    def _allocate(self, count: int = 1) -> int:
        """The first of ``count`` fresh ids."""
        if self._next_id is None:
            stored = self.kv.get(META, _NEXT_ID)
            if stored is not None and len(stored) != 8:
                raise _counter_damage(f"it holds {len(stored)} bytes, not 8")
            self._next_id = int.from_bytes(stored, "big") if stored else 1
        node_id = self._next_id
        if node_id + count >= 1 << 63:  # ids are 8-byte keys: 2**63 of them is more than any disk holds
            raise _counter_damage(f"it is at {node_id:,}")
        self._next_id = node_id + count
        return node_id

    def mutable(self, node: Node) -> Node:
        if node.dirty:
            return node
        copy = node.copy(self.renew(node.id))
        self._dirty[copy.id] = copy
        return copy

    def new_id(self) -> int:
        return self._allocate()

    def renew(self, node_id: int) -> int:
        """The id of a new version of node ``node_id``, which replaces it (see ``NodeAccess``). O(1).

        A committed node's new version takes its slot with the next version (:func:`renewed`): the
        commit overwrites the slot's value where a fresh id would append a new key and delete the
        old one (fewer LMDB pages written), and no id is drawn from the counter. A node this
        transaction made was never committed, so never cached or seen by another transaction: its
        new version keeps its id, and a slot's version goes up by at most one per commit, which the
        node cache's bound relies on (:data:`CACHE_SPAN`)."""
        if self._dirty.pop(node_id, None) is not None or self._encoded.pop(node_id, None) is not None:
            if self._prepared:
                self._prepared.pop(node_id, None)
            return node_id
        slot = node_id & SLOT_MASK
        if slot in self._overwrites:  # the committed node was replaced already: a stale reference
            raise _stale_reference(node_id)
        self._overwrites[slot] = node_id
        return renewed(node_id)

    def renew_all(self, node_ids: list[int]) -> list[int]:
        """:meth:`renew` of each node, in order: the ids of their new versions. O(len(node_ids)).

        A write's path renews every node of it at once (``NodeTree._write_stored``); when the
        transaction has made no node yet (its first write), each is a committed node, and the loop
        does only that case's work."""
        if self._dirty or self._encoded:
            return [self.renew(node_id) for node_id in node_ids]
        overwrites = self._overwrites
        new_ids = []
        for node_id in node_ids:
            slot = node_id & SLOT_MASK
            if slot in overwrites:
                raise _stale_reference(node_id)
            overwrites[slot] = node_id
            new_ids.append(((node_id >> SLOT_BITS) + 1) % VERSIONS << SLOT_BITS | slot)  # renewed(node_id)
        return new_ids

    def adopt_path(self, leaf_id: int, leaf: bytes, nodes: list[Node]) -> None:
        """:meth:`adopt_encoded` of a leaf and :meth:`adopt_prepared` of each of ``nodes`` (their
        stored bytes their own ``_packed``), in one call: a write's path. O(len(nodes))."""
        encoded, prepared = self._encoded, self._prepared
        encoded[leaf_id] = leaf
        for node in nodes:
            assert node._packed is not None
            prepared[node.id] = node
            encoded[node.id] = node._packed

    def adopt(self, node: Node) -> Node:
        self._dirty[node.id] = node
        return node

    def adopt_encoded(self, node_id: int, data: bytes) -> None:
        """Register a new node (id from :meth:`new_id`) already in its stored form (``encode_node``).

        Bulk builds use it so that a transaction writing millions of items holds their encoded bytes
        only; the node is decoded again only if the transaction reads it.
        """
        self._encoded[node_id] = data

    def adopt_prepared(self, node: Node, data: bytes) -> None:
        """Register a new node (id from :meth:`new_id`) given in both forms: committed (its lists
        tuples, ``dirty`` false) and stored (``data``, its ``encode_node`` bytes).

        Reads in the transaction get ``node``; the commit writes ``data`` and puts ``node`` in the node
        cache, where a copy-on-write path would have encoded and frozen a dirty node. A change later in
        the transaction copies it (:meth:`mutable`), and the copy replaces it. O(1).
        """
        self._prepared[node.id] = node
        self._encoded[node.id] = data

    def free(self, node_id: int) -> None:
        if self._dirty.pop(node_id, None) is None and self._encoded.pop(node_id, None) is None:
            self._freed.append(node_id)  # committed: its slot is deleted at commit
            return
        if self._prepared:
            self._prepared.pop(node_id, None)
        if self._overwrites:  # a new version of a committed node: the slot goes with it
            replaced = self._overwrites.pop(node_id & SLOT_MASK, None)
            if replaced is not None:
                self._freed.append(replaced)

    def replace_stored(self, node_ids: list[int], data: list[bytes]) -> list[int]:
        """Nodes given in stored form (see :meth:`adopt_encoded`) in place of stored ones, which are
        freed; returns the new ids. O(len(data))."""
        first = self._allocate(len(data))
        ids = list(range(first, first + len(data)))
        dirty, encoded = self._dirty, self._encoded
        if dirty.keys().isdisjoint(node_ids) and encoded.keys().isdisjoint(node_ids):
            self._freed.extend(node_ids)  # all committed (a batch's leaves): free() by C-level loops
        else:
            for node_id in node_ids:
                self.free(node_id)
        encoded.update(zip(ids, data, strict=True))
        return ids

    def set_root(self, tree: bytes, root: Root | None) -> None:
        """Record the new root of a tree (None: the tree is now empty)."""
        self._roots[tree] = root
        self._changed_roots.add(tree)
        self.versions[tree] = self.versions.get(tree, 0) + 1

    def changed_roots(self) -> dict[bytes, Root | None]:
        """The root records this transaction changed, by tree key."""
        if self._deferred:
            self.flush_deferred()
        return {tree: self._roots[tree] for tree in self._changed_roots}

    def root(self, tree: bytes) -> Root | None:
        if self._deferred and tree in self._deferred:
            self._flush_tree(tree)
        return Transaction.root(self, tree)

    def defer_insert(
        self, tree: bytes, nfields: int, node_size: int, entry: bytes, values: tuple[Any, ...]
    ) -> None:
        """Queue the insertion of an entry known to be new (an entry already in the tree is left as it
        is). Queued entries are merged per tree in sorted runs before the tree is next read, which
        costs much less than one insert each. O(1) now, amortized O(log n / run length) later."""
        pending = self._deferred.get(tree)
        if pending is None:
            pending = self._deferred[tree] = (nfields, node_size, [])
        versions = self.versions  # queued, the entry is a change of the tree already (see set_root)
        versions[tree] = versions.get(tree, 0) + 1
        rows = pending[2]
        rows.append((entry, values))
        if len(rows) >= _DEFERRED_RUN:
            self._flush_tree(tree)

    def flush_deferred(self) -> None:
        """Apply every queued insert."""
        for tree in sorted(self._deferred):
            self._flush_tree(tree)

    def _flush_tree(self, tree_key: bytes) -> None:
        nfields, node_size, rows = self._deferred.pop(tree_key)
        rows.sort(key=itemgetter(0))
        tree = Tree(self, nfields, node_size, super().root(tree_key))
        tree.insert_sorted_run([row[0] for row in rows], [row[1] for row in rows])
        changed, root = tree.take_root()
        if changed:
            self.set_root(tree_key, root)

    def set_meta(self, key: bytes, value: bytes | None) -> None:
        """Write (or delete, with None) a META value at commit."""
        self._meta[key] = value

    def meta(self, key: bytes) -> bytes | None:
        if key in self._meta:
            return self._meta[key]
        return super().meta(key)

    def set_doc(self, key: bytes, value: bytes | None) -> None:
        """Write (or delete, with None) a DOCS value at commit."""
        self._docs[key] = value
        self.docs_version += 1

    def doc(self, key: bytes) -> bytes | None:
        docs = self._docs
        if key in docs:
            return docs[key]
        return super().doc(key)

    def doc_batches(self, start: bytes, stop: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        if not any(start <= key < stop for key in self._docs):
            yield from super().doc_batches(start, stop, size)
            return
        entries = self.docs(start, stop)  # merge this transaction's own writes, entry by entry
        while batch := list(islice(entries, size)):
            yield batch

    def docs(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """The DOCS entries in ``[start, stop)`` as this transaction sees them (its own writes merged).

        In reverse, the entries are streamed when the transaction wrote none in the range, and
        collected first otherwise.
        """
        pending = sorted(key for key in self._docs if start <= key < stop)
        if not pending:
            yield from super().docs(start, stop, reverse)
            return
        if reverse:
            yield from reversed(list(self.docs(start, stop)))
            return
        index = 0
        for key, value in super().docs(start, stop):
            while index < len(pending) and pending[index] <= key:
                written = self._docs[pending[index]]
                if pending[index] < key and written is not None:
                    yield pending[index], written
                index += 1
            if key not in self._docs:
                yield key, value
            elif (written := self._docs[key]) is not None:
                yield key, written
        for key in pending[index:]:
            written = self._docs[key]
            if written is not None:
                yield key, written

    @property
    def changed(self) -> bool:
        """Whether committing would write anything."""
        return bool(
            self._deferred
            or self._dirty
            or self._encoded
            or self._freed
            or self._changed_roots
            or self._meta
            or self._docs
        )

    def commit(self) -> None:
        """Write every change in one atomic batch and end the transaction. O(changed nodes).

        ``with db.write() as tx:`` commits when its block ends: call this only to commit earlier. The
        transaction has then ended (so has the thread's write lock: a new ``db.write()`` may begin);
        a later read or write in ``tx`` raises TransactionError, and the block's end does nothing.
        On a transaction already ended (committed, or aborted with :meth:`abort`), commit() does
        nothing, as ``sqlite3``'s does with no transaction open.

        Merging queued inserts and encoding many dirty nodes is bulk work: the cyclic garbage
        collector is paused for it (see ``_gc``) when the transaction holds more than a few nodes.
        Raises TransactionError, writing nothing, if the database was closed meanwhile; whatever
        the commit raises, the transaction has ended, writing nothing.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores")
        >>> with db.write() as tx:
        ...     scores.insert(tx, 1, "a")
        ...     tx.commit()  # committed now: the block's end does nothing more
        ...     with db.read() as rtx:
        ...         scores.count(rtx)
        1
        """
        if not self._open:  # ended in the with block itself: nothing left to do
            return
        if self._db._closed:
            self.abort()
            raise self._db._closed_error(
                "the database was closed while this write transaction was open; nothing was written"
            )
        redefined = self._meta and any(key.startswith(DEFINITIONS) for key in self._meta)
        try:
            if self._deferred or len(self._dirty) > _BULK_COMMIT:
                with gc_paused():
                    self._commit()
            else:
                self._commit()
        except BaseException:
            # raised before the backend's commit (damage met merging queued inserts, say): the
            # backend transaction must end too, or it would hold the write lock (the backend ends
            # its own on a failed commit; abort does nothing then)
            self.abort()
            raise
        if redefined:  # an aggregate created, changed or dropped: objects check theirs again
            self._db._backend.epoch += 1

    def _commit(self) -> None:
        kv = self.kv
        if self._deferred:
            self.flush_deferred()
        if len(self._changed_roots) == 1 and not (
            self._dirty or self._freed or self._meta or self._docs or self._next_id is not None
        ):
            if not self._encoded:
                self._commit_root(kv)
            else:  # every node written is the new version of a committed one (see renew)
                self._commit_overwrites(kv)
            return
        if not self.changed:
            self._finish()
            kv.abort()
            return
        ops: list[Op] = []
        compact: dict[int, Node] = {}  # dirty leaves as the node cache will hold them (see below)
        for node_id, node in self._dirty.items():
            data = encode_node(node)
            ops.append((NODES, node_key(node_id), data))
            if not node.leaf:  # what the node's next copy is repacked from (see encode_node)
                node._packed = data
            elif (leaf := compact_leaf(data, node_id)) is not None:
                compact[node_id] = leaf
        if self._encoded:
            encoded = self._encoded
            ops.extend(zip(repeat(NODES), _node_keys(encoded), encoded.values()))
        ops.sort(key=itemgetter(1))  # slots ascending: new ones last, above every slot stored
        overwrites = len(self._overwrites)
        if overwrites:  # the new slots first, for LMDB's append (the overwrites are plain puts)
            ops = ops[overwrites:] + ops[:overwrites]
        appended = len(ops) - overwrites  # new slots, ascending: LMDB appends them in one call
        if self._freed:  # a batch frees a node per leaf: the ops made by C-level loops
            ops.extend(zip(repeat(NODES), sorted(_node_keys(self._freed)), repeat(None)))
        written: list[tuple[bytes, bytes, Root]] = []
        for tree in sorted(self._changed_roots):
            root = self._roots[tree]
            if root is None:
                ops.append((ROOTS, tree, None))
                continue
            data = encode_root(root)
            ops.append((ROOTS, tree, data))
            written.append((tree, data, root))
        if self._meta:
            ops.extend((META, key, value) for key, value in self._meta.items())
        if self._docs:
            ops.extend((DOCS, key, value) for key, value in sorted(self._docs.items()))
        if self._next_id is not None:
            ops.append((META, _NEXT_ID, self._next_id.to_bytes(8, "big")))
        self._finish()
        kv.commit(ops, appended)
        cache = self._cache
        for node_id in self._freed:  # dropped: only readers of older snapshots need them
            cache.discard(node_id)
        for node_id in self._overwrites.values():  # replaced by their new versions: the same
            cache.discard(node_id)
        for node in self._dirty.values():
            cached = compact.get(node.id)  # a leaf compact: 5.1 KiB for 115 entries, where its lists
            if cached is None:  # take 19.6 and, evicted or replaced, free ~300 objects (Node.entries)
                node.freeze()
                cached = node
            cache.put(cached)
        for node in self._prepared.values():
            cache.put(node)
        for tree, data, root in written:
            self._committed_root(tree, data, root)

    def _commit_overwrites(self, kv: KVTxn) -> None:
        """:meth:`_commit` of a transaction that changed one root record and wrote only new versions of
        committed nodes, each given in stored form (``adopt_encoded``, ``adopt_prepared``): a
        scattered insert, delete or update written from stored bytes (``NodeTree._write_stored``),
        a commonest write too. No id was drawn (every node overwrites its slot), no node was freed,
        none is dirty: the general path's checks and loops over empty collections cost about 120
        bytecodes of the ~2,600 such a commit runs."""
        (tree,) = self._changed_roots
        root = self._roots[tree]
        encoded = self._encoded
        assert len(encoded) == len(self._overwrites)  # (no dirty node, no id drawn, none freed)
        # (slots are unique: sorting the (table, key, value) ops never compares two values)
        ops: list[Op] = sorted(zip(repeat(NODES), _node_keys(encoded), encoded.values()))
        data = None if root is None else encode_root(root)
        ops.append((ROOTS, tree, data))
        self._finish()
        kv.commit(ops)
        cache = self._cache
        for node_id in self._overwrites.values():  # replaced by their new versions
            cache.discard(node_id)
        for node in self._prepared.values():
            cache.put(node)
        if data is not None:
            assert root is not None
            self._committed_root(tree, data, root)

    def _commit_root(self, kv: KVTxn) -> None:
        """:meth:`_commit` of a transaction that changed one root record and nothing else: a new event
        appended to its tree's pending node, the commonest write (the general path's checks and
        loops over empty collections cost about a microsecond of its 25-35)."""
        (tree,) = self._changed_roots
        root = self._roots[tree]
        if root is None:  # the tree was emptied
            self._finish()
            kv.commit([(ROOTS, tree, None)])
            return
        data = encode_root(root)
        self._finish()
        kv.commit([(ROOTS, tree, data)])
        self._committed_root(tree, data, root)

    def _committed_root(self, tree: bytes, data: bytes, root: Root) -> None:
        """After the commit of a root record: the pending node it holds is committed too (frozen), and
        the next transaction finds the record decoded (see :meth:`root`)."""
        node = root.pending_node
        if node is not None and node.dirty:
            node.freeze()
        _remember(self._decoded, tree, data, root)
