"""The invariant checker: walks whole trees and reports every violated invariant with its path.

Design
======
Like SQLite's integrity check and the BTrees ``check`` module, the checker recomputes everything from
the leaves up and keeps going after the first problem. For each tree it verifies:

* every node decodes, has a known layout, and its columns have one entry per key;
* entries strictly increase, decode as (key, id), and lie within the fences passed down from the root
  (``fence <= entry < next fence``); an internal child's own first fence equals its parent's;
* each parent's stored count and exact sums for each child equal what the child's subtree holds,
  and the root record's totals equal the whole tree's;
* every leaf is at the root record's height; every non-root node holds ``node_size // 2`` to
  ``node_size`` entries, and an internal root at least two children;
* values are ints or finite floats;
* the pending node, if any (see ``_tree``), holds fewer entries than its capacity, in strictly
  increasing order, all after every entry of the tree's other nodes, with the totals its root
  record gives.

Checking the whole database (no aggregate given) also reports nodes that no tree references (leaks),
root records of unknown aggregates, aggregate definitions that do not decode (a handler's extractors
stored with one included), and ids that two definitions share or that the id counter would give
again. And it checks the tables, in one pass over
every stored document (the DOCS table, in LMDB's order):

* each table record decodes, no two tables share an id, and each id is below the table id counter;
* document keys strictly increase (LMDB walks its pages in order: a key out of order is a damaged
  page, which a range scan would stop at, hiding the documents after it), and each belongs to a table;
* each document's id decodes (a str, int or bytes, the whole key) and its bytes decode to a map;
* each table holds as many documents as its stored count says (the count ``Table.count`` answers
  from, and that ``Table.items`` compares with when it ends);
* every stored document count (META ``tstate:``) belongs to a table.

It does not recompute the aggregates attached to a table from its documents: that runs the
extractors (which may be functions the checker does not have) and is what ``tallytree.verify(tx,
aggregate, table)`` does, O(n log n); the checker stays structural and O(n).

Damage is reported, not raised: a node, root record, definition or document that does not decode,
and pages of the LMDB file that LMDB itself cannot read, each become a problem (with the namespace,
the aggregate, or the table and document, they belong to), and the walk goes on with the rest. Cost:
O(n) node reads, and O(d) for d documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ._aggregate import Aggregate, Sentinel
from ._btree import NodeTree, Root, vadd
from ._db import NEXT_AGGREGATE, lmdb_damage, stored_name
from ._hooks import stored_extractors
from ._keys import decode_entry, decode_key
from ._node import Node
from ._store import META, NODES, ROOTS
from ._table import _NEXT_TABLE, _STATE, _STATE_PREFIX, _TABLE_PREFIX, decode_doc, decode_record
from ._tree import pending_capacity
from ._txn import DEFINITIONS, SLOT_MASK, Transaction, decode_root
from .errors import ArgumentTypeError, CorruptDatabaseError, Error, InvalidArgumentError

__all__ = ["Problem", "check"]

_ALL: Any = Sentinel("ALL")


@dataclass(frozen=True, slots=True)
class Problem:
    """One violated invariant: where (aggregate, namespace, child indexes from the root) and what.

    A problem of a table names it in ``table`` (its ``aggregate`` is None), and the document in
    ``document`` (its id) when it is about one document whose id decodes.

    >>> print(Problem(None, None, (), None, "it does not decode", table="orders", document=7))
    table 'orders' document 7: it does not decode
    """

    aggregate: str | None
    namespace: Any
    path: tuple[int, ...]
    node_id: int | None
    message: str
    table: str | None = None
    document: Any = None

    def __str__(self) -> str:
        if self.table is not None:
            document = "" if self.document is None else f" document {self.document!r}"
            return f"table {self.table!r}{document}: {self.message}"
        where = "/".join(map(str, self.path)) or "root"
        return f"{self.aggregate}[{self.namespace!r}] {where} (node {self.node_id}): {self.message}"


class _Walker:
    def __init__(
        self, tx: Transaction, aggregate: Aggregate, namespace: Any, problems: list[Problem]
    ) -> None:
        self.tx = tx
        self.aggregate = aggregate
        self.namespace = namespace
        self.problems = problems
        self.nfields = len(aggregate.fields)
        self.max_size = aggregate.node_size
        self.min_size = aggregate.node_size // 2
        self.seen: set[int] = set()  # the slots (NODES keys) of the nodes walked: see _txn.node_key

    def report(self, path: tuple[int, ...], node_id: int | None, message: str) -> None:
        self.problems.append(Problem(self.aggregate.name, self.namespace, path, node_id, message))

    def tree(self, root: Root) -> None:
        before = len(self.problems)
        if root.node_id:
            summary = self.node(root.node_id, (), 1, root.height, b"", None)
        else:
            summary = [0] * (1 + 2 * self.nfields)
            if root.height:
                self.report((), None, f"a tree without nodes has height {root.height}")
        if summary is None:
            return
        nodes_clean = len(self.problems) == before
        if root.pending_summary is not None:
            pending = self.pending(root, summary, nodes_clean)
            if pending is None:
                return
            summary = vadd(summary, pending)
        if summary != root.summary:
            self.report((), root.node_id, f"root record totals {root.summary} != tree {summary}")
        if summary[0] == 0:
            self.report((), root.node_id, "empty tree still has a root record")

    def pending(self, root: Root, nodes: list[int], nodes_clean: bool) -> list[int] | None:
        """Check a tree's pending node (see ``_tree``); return its summary (None: unreadable)."""
        node_id = root.pending or None  # None: the record holds the node (format 3)
        if node_id is not None:
            self.seen.add(node_id & SLOT_MASK)
        try:
            node = root.pending_of(self.tx)
        except Exception as exc:
            if isinstance(exc, Error) and lmdb_damage(exc) is None:
                self.report((), node_id, f"cannot read the pending node: {exc}")
                return None
            raise _halt(
                exc, Problem(self.aggregate.name, self.namespace, (), node_id, "the pending node")
            ) from exc
        if node is None:
            self.report((), None, "the root record has pending totals but no pending node")
            return None
        size = len(node.keys)
        if not node.pending:
            self.report((), node_id, "the root record's pending node is not a pending node")
            return None
        capacity = pending_capacity(self.max_size)
        if not 0 < size < capacity:
            self.report(
                (), node_id, f"the pending node holds {size} entries; it must hold 1 to {capacity - 1}"
            )
        for earlier, later in zip(node.keys, node.keys[1:], strict=False):
            if not earlier < later:
                self.report((), node_id, "pending entries are not strictly increasing")
                break
        summary = self.leaf(node, ())
        if summary is not None and summary != root.pending_summary:
            self.report((), node_id, f"root record pending totals {root.pending_summary} != {summary}")
        if nodes_clean and root.node_id and node.keys:  # every pending entry after every stored one
            base = Root(root.node_id, root.height, nodes)
            last = NodeTree.reader(self.tx, self.nfields, self.max_size, base).last_entry()
            if last is not None and node.keys[0] <= last:
                self.report(
                    (), node_id, f"pending entry {node.keys[0]!r} is not after the tree's other entries"
                )
        return summary

    def node(
        self,
        node_id: int,
        path: tuple[int, ...],
        depth: int,
        height: int,
        low: bytes,
        high: bytes | None,
    ) -> list[int] | None:
        slot = node_id & SLOT_MASK
        if slot in self.seen:  # a cycle, a child shared by two parents, or two versions of a node
            self.report(
                path,
                node_id,
                "node is reached a second time (a cycle, a shared child, or another version of it)",
            )
            return None
        self.seen.add(slot)
        try:
            node = self.tx.node(node_id)
        except Exception as exc:
            if isinstance(exc, Error) and lmdb_damage(exc) is None:
                self.report(path, node_id, f"cannot read node: {exc}")
                return None
            raise _halt(exc, Problem(self.aggregate.name, self.namespace, path, node_id, "the node")) from exc
        is_root = not path
        size = len(node.keys)
        if node.leaf != (depth == height):
            self.report(
                path,
                node_id,
                f"{'leaf' if node.leaf else 'internal node'} at depth "
                f"{depth}, but the tree's height is {height}",
            )
            if depth >= height:  # its children would lie below the leaves' level: not walked
                return None
        if size > self.max_size:
            self.report(path, node_id, f"holds {size} entries, more than node_size {self.max_size}")
        if is_root and not node.leaf and size < 2:
            self.report(path, node_id, f"internal root has {size} child(ren); it needs 2 or more")
        if not is_root and size < self.min_size:
            self.report(path, node_id, f"holds {size} entries, fewer than {self.min_size}")
        if is_root and size == 0:
            self.report(path, node_id, "root node is empty")
        for earlier, later in zip(node.keys, node.keys[1:], strict=False):
            if not earlier < later:
                self.report(path, node_id, "keys are not strictly increasing")
                break
        if node.keys:
            if node.keys[0] < low:
                self.report(path, node_id, "first key is below the fence set by the parent")
            if high is not None and node.keys[-1] >= high:
                self.report(path, node_id, "last key is not below the next fence of the parent")
        return self.leaf(node, path) if node.leaf else self.internal(node, path, depth, height, low, high)

    def leaf(self, node: Node, path: tuple[int, ...]) -> list[int] | None:
        if len(node.cols) != self.nfields:
            self.report(path, node.id, f"leaf has {len(node.cols)} value columns, expected {self.nfields}")
            return None
        for col in node.cols:
            if len(col) != len(node.keys):
                self.report(path, node.id, "a value column and the keys differ in length")
                return None
            for value in col:
                if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
                    self.report(path, node.id, f"invalid value {value!r}")
        for entry in node.keys:
            try:
                decode_entry(entry)
            except Error as exc:
                self.report(path, node.id, f"entry {entry!r} does not decode: {exc}")
        return node.summary()

    def internal(
        self,
        node: Node,
        path: tuple[int, ...],
        depth: int,
        height: int,
        low: bytes,
        high: bytes | None,
    ) -> list[int] | None:
        width = 1 + 2 * self.nfields
        if (
            len(node.cols) != width
            or len(node.kids) != len(node.keys)
            or any(len(col) != len(node.keys) for col in node.cols)
        ):
            self.report(path, node.id, "internal node columns do not match its children")
            return None
        if node.keys and node.keys[0] != low:
            self.report(path, node.id, "first fence differs from the fence its parent stores")
        total = [0] * width
        for index, kid in enumerate(node.kids):
            upper = node.keys[index + 1] if index + 1 < len(node.keys) else high
            actual = self.node(kid, (*path, index), depth + 1, height, node.keys[index], upper)
            stored = node.child(index)
            if actual is None:
                total = vadd(total, stored)
                continue
            if actual != stored:
                self.report((*path, index), kid, f"parent stores totals {stored}, subtree holds {actual}")
            total = vadd(total, actual)
        return total


def check(tx: Transaction, aggregate: Aggregate | None = None, *, namespace: Any = _ALL) -> list[Problem]:
    """Walk trees and return every violated invariant (an empty list means all is well).

    With an aggregate, checks its trees (or only ``namespace``); without, checks every aggregate of the
    database, reports unreferenced nodes, and checks every table: each document decodes, and each table
    holds the number of documents its stored count says (``namespace`` without an aggregate raises
    InvalidArgumentError). It does not recompute a table's aggregates from its documents:
    ``tallytree.verify(tx, aggregate, table)`` does. O(n) for n items and documents.

    >>> import tallytree
    >>> db = tallytree.open_memory()
    >>> scores = db.aggregate("scores", node_size=4)
    >>> with db.write() as tx:
    ...     scores.insert_many(tx, [(k, "id") for k in range(100)])
    100
    >>> with db.read() as tx:
    ...     tallytree.check(tx)
    []
    """
    if not isinstance(tx, Transaction):
        raise ArgumentTypeError(f"check() takes a transaction (`with db.read() as tx:`), not {tx!r}")
    db = tx._db
    tx.check_database(db)
    if aggregate is not None:
        if not isinstance(aggregate, Aggregate):
            raise ArgumentTypeError(
                f"check() takes an aggregate (db.aggregate(name)) or None, not {aggregate!r}"
            )
        aggregate._check(tx)  # one of this transaction's database, not dropped
    elif namespace is not _ALL:  # (every aggregate's trees of that namespace would leave the others'
        # nodes unreferenced: as the command line does, a namespace goes with an aggregate)
        raise InvalidArgumentError(
            "check(tx, namespace=...) needs the aggregate: check(tx, aggregate, namespace=...)"
        )
    problems: list[Problem] = []
    try:
        _walk(tx, aggregate, namespace, problems)
    except _Halt as halt:
        problems.append(halt.problem)
    except Exception as exc:  # (an LMDB error out of a scan: no one node to name)
        problems.append(_halt(exc, Problem(None, None, (), None, "a table of the database")).problem)
    return problems


class _Halt(Exception):
    """LMDB met a damaged page of the file: it refuses every later read of the transaction (with
    MDB_BAD_TXN), so the check stops there and reports where (``problem``)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _halt(exc: Exception, where: Problem) -> _Halt:
    """The _Halt for an LMDB error met reading ``where`` (a Problem whose message names what was read)
    if it is one for a damaged file; any other error is re-raised: a bug, not damage."""
    raw = lmdb_damage(exc)  # LMDB's own error (the reads translate it: see _lmdb)
    if raw is None:
        raise exc
    message = (
        f"LMDB cannot read {where.message} ({type(raw).__name__}: {raw}): the database file is damaged "
        "there, and the check stopped (LMDB refuses every later read of a transaction that met a "
        "damaged page); restore the database from a backup or rebuild its aggregates from their source"
    )
    return _Halt(replace(where, message=message))


def _walk(tx: Transaction, aggregate: Aggregate | None, namespace: Any, problems: list[Problem]) -> None:
    """The walk of :func:`check`, appending to ``problems``."""
    before = len(problems)
    aggregates = [aggregate] if aggregate is not None else _aggregates(tx, problems)
    skipped = len(problems) > before  # trees of damaged definitions, or under unreadable records
    seen: set[int] = set()
    for each in aggregates:
        # A namespace is matched by its encoded key, as reads find it (1, 1.0 and True are three),
        # which also rejects a value that is no namespace with the key errors reads raise.
        wanted = None if namespace is _ALL else each._tree_key(namespace)
        for tree_key, root in _roots(tx, each):
            if wanted is not None and tree_key != wanted:
                continue
            walker = _Walker(tx, each, _namespace(tree_key), problems)
            if isinstance(root, Exception):
                walker.report((), None, f"the root record cannot be read: {root}")
                skipped = True
            elif root is not None:
                walker.tree(root)
            seen |= walker.seen
    if aggregate is None:
        tables, tables_skipped = _tables(tx, problems)
        known = {each._prefix for each in aggregates}
        for key, _ in tx.kv.scan(ROOTS, b"", None):
            if key[:4] not in known:
                problems.append(Problem(None, None, (), None, f"root record of unknown aggregate {key!r}"))
        if not tx.write:  # a write transaction's freed and new nodes reach the table at commit
            _leaks(tx, seen, skipped, problems)
        _documents(tx, tables, tables_skipped, problems)  # last: a damaged page stops the check


def _leaks(tx: Transaction, seen: set[int], skipped: bool, problems: list[Problem]) -> None:
    """Report the nodes no tree walked references, one problem each; or, when trees were ``skipped``
    (their definition or root record is damaged: the damage is reported, and they hold nodes), one
    problem for all of them."""
    leaked = [
        node_id
        for key, _ in tx.kv.scan(NODES, b"", None)
        if (node_id := int.from_bytes(key, "big")) not in seen  # a slot: the id of its version 0
    ]
    if not skipped:
        problems.extend(
            Problem(None, None, (), node_id, "no tree references this node") for node_id in leaked
        )
    elif leaked:
        shown = ", ".join(map(str, leaked[:10])) + (", ..." if len(leaked) > 10 else "")
        message = (
            f"{len(leaked)} node(s) that no tree checked references ({shown}); the trees of the damaged "
            "definitions or root records reported above may hold them"
        )
        problems.append(Problem(None, None, (), None, message))


def _namespace(tree_key: bytes) -> Any:
    """The namespace of a tree key, for a Problem (the key itself when it does not decode)."""
    try:
        return decode_key(tree_key, 4)[0]
    except Error:
        return tree_key


def _aggregates(tx: Transaction, problems: list[Problem]) -> list[Aggregate]:
    """The aggregates defined in ``tx``'s snapshot; damaged definitions, ids two of them share and ids
    at or above the id counter (a new aggregate would take them) appended to ``problems``."""
    found: list[Aggregate] = []
    for name, each in tx._db._definitions_in(tx):
        if isinstance(each, CorruptDatabaseError):
            problems.append(Problem(_show_name(name), None, (), None, str(each)))
            continue
        found.append(each)
        record = tx.meta(DEFINITIONS + each.name.encode())
        try:  # a handler's extractors, stored with the definition: read when a handler registers
            if record is not None:
                stored_extractors(each.name, record)
        except CorruptDatabaseError as exc:
            problems.append(Problem(each.name, None, (), None, str(exc)))
    counter = tx.meta(NEXT_AGGREGATE)
    next_id = int.from_bytes(counter, "big") if counter else 1
    owners: dict[int, str] = {}
    for each in found:
        if each._id in owners:
            shared = f"aggregate {owners[each._id]!r} has the same id, {each._id}"
            problems.append(Problem(each.name, None, (), None, shared))
        owners.setdefault(each._id, each.name)
        if each._id >= next_id:
            problems.append(
                Problem(
                    each.name,
                    None,
                    (),
                    None,
                    f"its id {each._id} is not below the aggregate id counter (META {NEXT_AGGREGATE!r}, "
                    f"{next_id}): a new aggregate would take it, and its trees",
                )
            )
    return found


_DOC_BATCH = 4096
_DOCS_END = b"\xff" * 5  # above every key of a table id (at most 2**32 - 2, see _txn.MAX_AGGREGATE_ID)
_ID_TYPES = (int, str, bytes)


def _tables(tx: Transaction, problems: list[Problem]) -> tuple[dict[bytes, str], bool]:
    """The tables of ``tx``'s snapshot, by the 4-byte prefix of their documents' keys, and whether a
    table record is damaged (its documents cannot be told from foreign ones). Records that do not
    decode, ids that two tables share and ids at or above the table id counter (META ``next_table``:
    a new table would take them) are appended to ``problems``. O(tables)."""
    tables: dict[bytes, str] = {}
    damaged = False
    counter = tx.meta(_NEXT_TABLE)
    next_id = int.from_bytes(counter, "big") if counter else 1
    stop = _TABLE_PREFIX[:-1] + bytes([_TABLE_PREFIX[-1] + 1])
    for key, record in tx.kv.scan(META, _TABLE_PREFIX, stop):
        name: str | None = None
        try:
            name = stored_name(key, _TABLE_PREFIX, "a table")
            table_id: int = decode_record(name, record)["id"]
        except CorruptDatabaseError as exc:
            problems.append(Problem(None, None, (), None, str(exc), table=name))
            damaged = True
            continue
        prefix = table_id.to_bytes(4, "big")
        if prefix in tables:
            shared = f"table {tables[prefix]!r} has the same id, {table_id}, and so the same documents"
            problems.append(Problem(None, None, (), None, shared, table=name))
        tables.setdefault(prefix, name)
        if table_id >= next_id:
            message = (
                f"its id {table_id} is not below the table id counter (META {_NEXT_TABLE!r}, {next_id}): "
                "a new table would take it, and its documents"
            )
            problems.append(Problem(None, None, (), None, message, table=name))
    return tables, damaged


def _documents(tx: Transaction, tables: dict[bytes, str], skipped: bool, problems: list[Problem]) -> None:
    """One pass over every stored document, in LMDB's order (see the module docstring), appending to
    ``problems``; then each table's stored count against the documents found, and the documents and
    counts of no table (one problem for all of them when a table record is ``skipped``: damaged).
    Raises _Halt where LMDB cannot read a page. O(d) for d documents."""
    found = dict.fromkeys(tables, 0)
    orphans: dict[bytes, list[Any]] = {}  # key prefix -> [documents, first key]
    previous = b""
    try:
        for batch in tx.doc_batches(b"", _DOCS_END, _DOC_BATCH):
            for key, data in batch:
                prefix = key[:4]
                name = tables.get(prefix)
                if key <= previous:
                    message = (
                        f"document key {key!r} comes after {previous!r} in LMDB's order: a page of the "
                        "documents is damaged (a read of the table stops at such a key, missing the "
                        "documents after it)"
                    )
                    problems.append(Problem(None, None, (), None, message, table=name))
                previous = key
                if name is None:
                    orphans.setdefault(prefix, [0, key])[0] += 1
                    continue
                found[prefix] += 1
                _document(name, key, data, problems)
    except Exception as exc:
        where = "the stored documents" + (f" after the key {previous!r}" if previous else "")
        raise _halt(exc, Problem(None, None, (), None, where, table=tables.get(previous[:4]))) from exc
    for prefix, name in tables.items():
        state = tx.meta(_STATE_PREFIX + prefix)
        if state is not None and len(state) != _STATE.size:
            message = f"its document count (META {_STATE_PREFIX + prefix!r}) is damaged: {state!r:.60}"
            problems.append(Problem(None, None, (), None, message, table=name))
            continue
        count = _STATE.unpack(state)[0] if state is not None else 0
        if count != found[prefix]:
            message = (
                f"it holds {found[prefix]} document(s), but its stored count (META "
                f"{_STATE_PREFIX + prefix!r}) says {count}: documents were lost or the count is damaged"
            )
            problems.append(Problem(None, None, (), None, message, table=name))
    stop = _STATE_PREFIX[:-1] + bytes([_STATE_PREFIX[-1] + 1])
    counts = [
        key for key, _ in tx.kv.scan(META, _STATE_PREFIX, stop) if key[len(_STATE_PREFIX) :] not in tables
    ]
    if skipped:
        if orphans or counts:
            documents = sum(number for number, _ in orphans.values())
            message = (
                f"{documents} document(s) and {len(counts)} document count(s) of no table checked; the "
                "damaged table records reported above may own them"
            )
            problems.append(Problem(None, None, (), None, message))
        return
    for prefix, (number, first) in orphans.items():
        message = (
            f"{number} document(s) (the first with key {first!r}) under the id {prefix!r}, which no table has"
        )
        problems.append(Problem(None, None, (), None, message))
    problems.extend(
        Problem(None, None, (), None, f"the document count META {key!r} belongs to no table")
        for key in counts
    )


def _document(table: str, key: bytes, data: bytes, problems: list[Problem]) -> None:
    """Check one stored document of ``table``: its id (the rest of ``key``) and its bytes decode, to a
    str, int or bytes and to a map. O(size)."""
    try:
        doc_id, end = decode_key(key, 4)
        if end != len(key):
            raise CorruptDatabaseError(f"{len(key) - end} byte(s) follow the id")
        if type(doc_id) not in _ID_TYPES:
            raise CorruptDatabaseError(
                f"the id is {type(doc_id).__name__} {doc_id!r:.60}, not a str, int or bytes"
            )
    except CorruptDatabaseError as exc:
        problems.append(Problem(None, None, (), None, f"document key {key!r} is damaged: {exc}", table=table))
        return
    try:
        doc = decode_doc(data)
    except Exception as exc:  # msgpack's errors are ValueErrors, mostly; whatever bytes make it raise
        message = f"the stored bytes do not decode ({type(exc).__name__}: {exc})"
        problems.append(Problem(None, None, (), None, message, table=table, document=doc_id))
        return
    if type(doc) is not dict:
        message = f"it is stored as {type(doc).__name__} {doc!r:.60}, not as a map of fields"
        problems.append(Problem(None, None, (), None, message, table=table, document=doc_id))


def _show_name(name: str | bytes) -> str:
    return name if isinstance(name, str) else repr(name)


def _roots(tx: Transaction, aggregate: Aggregate) -> list[tuple[bytes, Root | Exception | None]]:
    """The root records of an aggregate's trees by tree key (those a write transaction changed as
    it holds them); one that does not decode as its error."""
    prefix = aggregate._prefix
    stop = (aggregate._id + 1).to_bytes(4, "big")
    found: dict[bytes, Root | Exception | None] = {}
    for key, value in tx.kv.scan(ROOTS, prefix, stop):
        try:
            found[key] = decode_root(value)
        except CorruptDatabaseError as exc:
            found[key] = exc
    changed = getattr(tx, "changed_roots", None)
    if changed is not None:
        found.update({key: root for key, root in changed().items() if key.startswith(prefix)})
    return sorted(found.items(), key=lambda pair: pair[0])
