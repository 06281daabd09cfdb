"""Storage interface: four ordered byte tables, a decoded-node cache, and an in-memory backend.

Design
======
Everything above this module stores its state in four tables of byte keys and byte values:

========  ==========================================  =========================================
table     key                                         value
========  ==========================================  =========================================
META      ``b"format"``, ``b"next_id"``,              format tag, node id counter, aggregate definitions
          ``b"agg:" + name``                          (msgpack)
NODES     node slot, 8 bytes big-endian               encoded node (``_node``)
ROOTS     aggregate id (4 bytes) + encoded namespace  ``[root node id, height, summary]`` (+ the
                                                      pending node and its summary, see ``_tree``)
DOCS      table id (4 bytes) + encoded document id    the document (msgpack; see ``_table``)
========  ==========================================  =========================================

A backend provides transactions over these tables: ``get`` and ordered ``scan`` for reads, and one
``commit(ops)`` that applies a list of puts and deletes atomically. Writes are buffered above this layer
until commit, so a backend sees one batch per transaction; that lets the LMDB backend grow its map and
retry a batch without involving the caller.

A node id names a slot (its NODES key) and a version of it (see ``_txn``, "Slots and versions"), and
the contents committed under one id never change, so a decoded node can be cached by id:
:class:`NodeCache` is a bounded cache (a second-chance clock) shared by the transactions of a
database, replaced by an empty one before versions can wrap around (``Database._cache_for``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Protocol

from sortedcontainers import SortedDict

from . import _native
from ._native import NodeStore
from ._node import Node

__all__ = [
    "DOCS",
    "META",
    "NODES",
    "ROOTS",
    "Backend",
    "KVTxn",
    "MemoryBackend",
    "NodeCache",
    "NodeDict",
    "Op",
]

META = 0
NODES = 1
ROOTS = 2
DOCS = 3
TABLES = 4
"""How many tables a backend holds."""

Op = tuple[int, bytes, bytes | None]
"""One buffered write: (table, key, value); a value of None deletes the key."""


class KVTxn(Protocol):
    """A transaction of a backend: a consistent snapshot, plus one atomic commit for writers."""

    epoch: int
    """The backend's :attr:`Backend.epoch` when this transaction began."""

    snapshot: int
    """The number of the last commit this transaction's snapshot holds: commits are numbered from 1
    as they are made, by every process (LMDB's transaction ids)."""

    def get(self, table: int, key: bytes) -> bytes | None:
        """Return the value stored under ``key``, or None."""
        ...

    def getter(self, table: int) -> Callable[[bytes], bytes | None]:
        """``get`` for one table, as one callable (for loops that read many values of one table)."""
        ...

    def scan(
        self, table: int, start: bytes, stop: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) with ``start <= key < stop`` (no upper limit if ``stop`` is None)."""
        ...

    def scan_batches(
        self, table: int, start: bytes, stop: bytes, size: int
    ) -> Iterator[list[tuple[bytes, bytes]]]:
        """The same entries as ``scan(table, start, stop)``, as lists of up to ``size`` (fewer calls)."""
        ...

    def commit(self, ops: list[Op], appended: int = 0) -> None:
        """Apply ``ops`` atomically and end the transaction (writers only).

        The first ``appended`` ops are NODES puts of new keys, ascending, each above every key
        stored: a backend may append them in one call (LMDB's ``putmulti`` with ``MDB_APPEND``)."""
        ...

    def abort(self) -> None:
        """End the transaction without writing anything."""
        ...


class Backend(Protocol):
    """A store of the four tables."""

    epoch: int
    """A number that changes whenever the stored aggregate definitions may have changed since a
    transaction of this process last saw them: when a transaction of this process finds commits that
    it did not make (another process's), and when this process commits a change of a definition
    (``WriteTransaction``). A check that a definition is still current need not be made again
    while the number stays the same (see ``Aggregate._confirm``)."""

    def begin(self, write: bool) -> KVTxn:
        """Start a transaction; writers are serialized."""
        ...

    def close(self) -> None:
        """Release resources; later calls fail."""
        ...


class NodeDict:
    """Nodes by id in a dict, evicted by a second-chance clock beyond ``capacity``: the pure-Python
    twin of ``_speedups.NodeTable`` (same methods, same policy), used when the C kernels are not built.

    The dict's order is the order of the puts. A node found by :meth:`get` is marked; eviction takes
    the oldest node, but a marked one is unmarked and moved to the end instead: a node looked up since
    it was last the oldest stays. So a tree's internal nodes, read by every descent, stay cached while
    its leaves stream through a cache smaller than the tree.

    >>> from tallytree._node import Node
    >>> store = NodeDict(2)
    >>> for node_id in (1, 2):
    ...     store.put(Node(node_id, True, [], []))
    >>> store.get(1) is not None  # 1 is marked: the next eviction passes it over once
    True
    >>> store.put(Node(3, True, [], []))
    >>> [store.get(node_id) is not None for node_id in (1, 2, 3)]
    [True, False, True]
    """

    __slots__ = ("capacity", "marked", "nodes")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.nodes: dict[int, Node] = {}
        self.marked: set[int] = set()

    def get(self, node_id: int) -> Node | None:
        """The node, or None; a node found is marked (see the class). O(1)."""
        node = self.nodes.get(node_id)
        if node is not None:
            self.marked.add(node_id)
        return node

    def __len__(self) -> int:
        return len(self.nodes)

    def put(self, node: Node) -> None:
        """Remember a committed node, evicting beyond capacity (see the class). O(1) amortized."""
        if self.capacity <= 0:
            return
        nodes, marked = self.nodes, self.marked
        if node.id in nodes:  # the same node decoded twice (two threads): the newer, in place
            nodes[node.id] = node
            return
        while len(nodes) >= self.capacity:  # room first: the new node is no candidate
            try:
                oldest = next(iter(nodes))
                if oldest in marked:  # a second chance
                    marked.discard(oldest)
                    nodes[oldest] = nodes.pop(oldest)
                else:
                    del nodes[oldest]
            except (KeyError, RuntimeError, StopIteration):  # another thread changed the dict
                break
        nodes[node.id] = node

    def discard(self, node_id: int) -> None:
        """Forget one node if cached. O(1)."""
        self.nodes.pop(node_id, None)
        self.marked.discard(node_id)

    def clear(self) -> None:
        """Forget every node (in place: the dict stays the one ``NodeCache.shared`` names)."""
        self.nodes.clear()
        self.marked.clear()


class NodeCache:
    """A bounded cache of decoded committed nodes, keyed by node id. Safe to share between threads.

    ``capacity`` counts nodes; a reader's memory is therefore bounded by ``capacity`` times the node
    size, whatever the size of the data. Eviction is a second-chance clock: the oldest node goes
    unless a lookup found it since it was last the oldest (a lookup only marks the node it finds: an
    LRU's reordering costs more). A tree's internal nodes, which every descent reads, therefore stay
    while leaves stream through a cache smaller than the tree. Nodes are immutable, so a node
    evicted and read again is simply decoded again.

    The nodes are kept in ``_speedups.NodeTable`` when the C kernels are built: an open-addressing
    table of (id, node, search image) slots, from which the kernels' descents take a child in about
    one cache line, with no int object made for its id (see ``_speedups.c``); else in a
    :class:`NodeDict`.
    """

    __slots__ = ("_nodes", "discard", "floor", "hits", "lookup", "misses", "put", "shared")

    def __init__(self, capacity: int, floor: int = 0) -> None:
        built = _native.speedups
        nodes: NodeStore = built.NodeTable(capacity) if built is not None else NodeDict(capacity)
        self._nodes = nodes
        # what the C kernels' descents take nodes from: the NodeTable, or the NodeDict's dict (both
        # emptied in place by clear(), so this stays valid)
        self.shared: object = nodes.nodes if isinstance(nodes, NodeDict) else nodes
        # The store's own methods, without a frame of this class (each commit calls them once per node
        # it writes or replaces; every transaction takes ``lookup``):
        # lookup: :meth:`get`, which :meth:`clear` keeps valid (a property until session 35);
        # put: remember a committed node, evicting one beyond capacity (see the class), O(1) amortized;
        # discard: forget one node if cached (a reader that still needs it decodes it again), O(1)
        self.lookup: Callable[[int], Node | None] = nodes.get
        self.put: Callable[[Node], None] = nodes.put
        self.discard: Callable[[int], None] = nodes.discard
        self.hits = 0
        self.misses = 0
        self.floor = floor
        """The first snapshot whose transactions may use this cache: only those up to
        ``floor + _txn.CACHE_SPAN`` do (``Database._cache_for``)."""

    @property
    def capacity(self) -> int:
        """The most nodes kept."""
        return self._nodes.capacity

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: int) -> Node | None:
        """The cached node, or None. O(1)."""
        node: Node | None = self._nodes.get(node_id)
        return node

    def clear(self) -> None:
        """Forget every node."""
        self._nodes.clear()


class _MemoryTxn:
    def __init__(self, backend: MemoryBackend, write: bool) -> None:
        self._backend = backend
        self._tables = backend.tables  # a snapshot: commits replace the table objects they change
        self._write = write
        self.epoch = backend.epoch  # (no other process shares the tables)
        self.snapshot = backend.commits

    def get(self, table: int, key: bytes) -> bytes | None:
        return self._tables[table].get(key)  # type: ignore[no-any-return]

    def getter(self, table: int) -> Callable[[bytes], bytes | None]:
        return self._tables[table].get  # type: ignore[no-any-return]

    def scan(
        self, table: int, start: bytes, stop: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        data = self._tables[table]
        keys = list(data.irange(start, stop, inclusive=(True, False), reverse=reverse))
        for key in keys:
            yield key, data[key]

    def scan_batches(
        self, table: int, start: bytes, stop: bytes, size: int
    ) -> Iterator[list[tuple[bytes, bytes]]]:
        items = self.scan(table, start, stop)
        while batch := list(islice(items, size)):
            yield batch

    def commit(self, ops: list[Op], appended: int = 0) -> None:
        assert self._write
        tables = [table.copy() for table in self._tables]
        for table, key, value in ops:
            if value is None:
                tables[table].pop(key, None)
            else:
                tables[table][key] = value
        self._backend.tables = tables
        self._backend.commits += 1
        self._backend.writer.release()

    def abort(self) -> None:
        if self._write:
            self._backend.writer.release()


class MemoryBackend:
    """Tables held in memory, with snapshot reads: for tests and for small, throwaway data.

    A commit copies the tables it changes (O(n)), so this backend is not meant for large data.
    """

    def __init__(self) -> None:
        self.tables: list[SortedDict] = [SortedDict() for _ in range(TABLES)]
        self.writer = threading.Lock()
        self.epoch = 0
        self.commits = 0  # the number of the last commit (a transaction's snapshot)

    def begin(self, write: bool) -> KVTxn:
        if write:
            self.writer.acquire()
        return _MemoryTxn(self, write)

    def close(self) -> None:
        self.tables = [SortedDict() for _ in range(TABLES)]
