"""Transactions: one consistent snapshot for reads, and a buffered, atomic batch for writes.

Design
======
A :class:`ReadTransaction` wraps a backend snapshot and hands the tree algorithm committed nodes,
decoded once and shared through the database's node cache. A :class:`WriteTransaction` adds an overlay
that implements the tree's ``NodeAccess`` copy-on-write contract:

* ``mutable(node)`` copies a committed node under a fresh id (from the ``next_id`` counter in ``meta``)
  and schedules the old id for deletion; later changes in the same transaction edit the copy in place;
* root records changed by the transaction are kept in a dict;
* nothing reaches the backend until :meth:`WriteTransaction.commit`, which encodes every dirty node once
  and hands the backend one batch. An exception in the ``with`` block discards the overlay, so a failed
  transaction writes nothing.

Dirty nodes enter the shared cache only after the commit succeeded, and ids are never reused, so the
cache never holds a node that was not committed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import msgpack

from ._btree import Root
from ._node import Node, decode_node, encode_node, pack_summary, unpack_summary
from ._store import META, NODES, ROOTS, KVTxn, NodeCache, Op
from .errors import CorruptDatabaseError, TransactionError

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["ReadTransaction", "Transaction", "WriteTransaction", "encode_root", "node_key"]

_NEXT_ID = b"next_id"
_GENERATION = b"gen"


def node_key(node_id: int) -> bytes:
    """The NODES table key of a node id."""
    return node_id.to_bytes(8, "big")


def encode_root(root: Root) -> bytes:
    """The ROOTS table value of a root record."""
    return msgpack.packb(  # type: ignore[no-any-return]
        [root.node_id, root.height, pack_summary(root.summary)], use_bin_type=True
    )


def decode_root(data: bytes) -> Root:
    """Inverse of :func:`encode_root`."""
    try:
        node_id, height, summary = msgpack.unpackb(data, raw=False)
        return Root(node_id, height, unpack_summary(summary))
    except Exception as exc:
        raise CorruptDatabaseError(f"a root record cannot be decoded ({exc})") from exc


class Transaction:
    """A consistent snapshot of the database; the base of read and write transactions.

    Use it only as the ``tx`` argument of aggregate methods, inside its ``with`` block.
    """

    write = False

    def __init__(self, db: Database, kv: KVTxn) -> None:
        self._db = db
        self._kv = kv
        self._cache: NodeCache = db._cache
        self._roots: dict[bytes, Root | None] = {}
        self._open = True
        self._thread = threading.get_ident()
        self.versions: dict[bytes, int] = {}

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<{type(self).__name__} {state}>"

    @property
    def kv(self) -> KVTxn:
        """The backend transaction (raises if this transaction has ended)."""
        if not self._open:
            raise TransactionError("this transaction has ended; start a new one with db.read() or db.write()")
        return self._kv

    def check_database(self, db: Database) -> None:
        """Raise unless this transaction is open and belongs to ``db``."""
        if db is not self._db:
            raise TransactionError("this transaction belongs to another database")
        if not self._open:
            raise TransactionError("this transaction has ended; start a new one with db.read() or db.write()")

    def node(self, node_id: int) -> Node:
        """A committed node by id, through the shared cache. O(1) when cached, O(size) to decode."""
        node = self._cache.get(node_id)
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
        if tree in self._roots:
            return self._roots[tree]
        data = self.kv.get(ROOTS, tree)
        root = decode_root(data) if data is not None else None
        self._roots[tree] = root
        return root

    def meta(self, key: bytes) -> bytes | None:
        """A value of the META table."""
        return self.kv.get(META, key)

    def mutable(self, node: Node) -> Node:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def new_id(self) -> int:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def adopt(self, node: Node) -> Node:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def free(self, node_id: int) -> None:
        raise TransactionError("this is a read transaction; use `with db.write() as tx:` to write")

    def _finish(self) -> None:
        self._open = False

    def abort(self) -> None:
        """End the transaction, discarding any change."""
        if self._open:
            self._finish()
            self._kv.abort()


class ReadTransaction(Transaction):
    """A read-only snapshot. Any number may be open at once, in any threads and processes."""


class WriteTransaction(Transaction):
    """The one write transaction: reads see its own changes; all of them commit together or none."""

    write = True

    def __init__(self, db: Database, kv: KVTxn) -> None:
        super().__init__(db, kv)
        self._dirty: dict[int, Node] = {}
        self._freed: list[int] = []
        self._changed_roots: set[bytes] = set()
        self._meta: dict[bytes, bytes | None] = {}
        self._next_id: int | None = None

    def node(self, node_id: int) -> Node:
        dirty = self._dirty.get(node_id)
        if dirty is not None:
            return dirty
        return super().node(node_id)

    def _allocate(self) -> int:
        if self._next_id is None:
            stored = self.kv.get(META, _NEXT_ID)
            self._next_id = int.from_bytes(stored, "big") if stored else 1
        node_id = self._next_id
        self._next_id += 1
        return node_id

    def mutable(self, node: Node) -> Node:
        if node.dirty:
            return node
        copy = node.copy(self._allocate())
        self._dirty[copy.id] = copy
        self._freed.append(node.id)
        return copy

    def new_id(self) -> int:
        return self._allocate()

    def adopt(self, node: Node) -> Node:
        self._dirty[node.id] = node
        return node

    def free(self, node_id: int) -> None:
        if self._dirty.pop(node_id, None) is None:
            self._freed.append(node_id)

    def set_root(self, tree: bytes, root: Root | None) -> None:
        """Record the new root of a tree (None: the tree is now empty)."""
        self._roots[tree] = root
        self._changed_roots.add(tree)
        self.versions[tree] = self.versions.get(tree, 0) + 1

    def changed_roots(self) -> dict[bytes, Root | None]:
        """The root records this transaction changed, by tree key."""
        return {tree: self._roots[tree] for tree in self._changed_roots}

    def set_meta(self, key: bytes, value: bytes | None) -> None:
        """Write (or delete, with None) a META value at commit."""
        self._meta[key] = value

    def meta(self, key: bytes) -> bytes | None:
        if key in self._meta:
            return self._meta[key]
        return super().meta(key)

    @property
    def changed(self) -> bool:
        """Whether committing would write anything."""
        return bool(self._dirty or self._freed or self._changed_roots or self._meta)

    def commit(self) -> None:
        """Write every change in one atomic batch and end the transaction."""
        kv = self.kv
        if not self.changed:
            self._finish()
            kv.abort()
            return
        ops: list[Op] = [
            (NODES, node_key(node_id), encode_node(self._dirty[node_id])) for node_id in sorted(self._dirty)
        ]
        ops.extend((NODES, node_key(node_id), None) for node_id in self._freed)
        for tree in sorted(self._changed_roots):
            root = self._roots[tree]
            ops.append((ROOTS, tree, encode_root(root) if root is not None else None))
        ops.extend((META, key, value) for key, value in self._meta.items())
        if self._next_id is not None:
            ops.append((META, _NEXT_ID, self._next_id.to_bytes(8, "big")))
        stored = kv.get(META, _GENERATION)
        generation = (int.from_bytes(stored, "big") if stored else 0) + 1
        ops.append((META, _GENERATION, generation.to_bytes(8, "big")))
        self._finish()
        kv.commit(ops)
        for node in self._dirty.values():
            node.dirty = False
            self._cache.put(node)
