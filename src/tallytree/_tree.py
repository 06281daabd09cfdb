"""A tree as its callers see it: the B+ tree of nodes plus a small node of pending appends.

Design
======
Committing one insert into the B+ tree rewrites every node on its path: copy-on-write gives each a
new id (the next version of its slot, see ``_txn``), so a tree of height 4 writes four nodes of a
few KiB, whatever the size of the change. For the commonest write of the applications tallytree
serves, one new event per committed transaction, that page traffic is most of the cost.

So an insert after every entry of the tree's nodes (a new event, keyed by its time; also a short
sorted run of them, such as a table's per-document inserts) first goes to the tree's *pending* node:
one small sorted node held inside the tree's root record, which every commit rewrites anyway. Such
a commit writes the root record alone, one LMDB put, instead of a whole path; when the pending node
reaches :func:`pending_capacity` entries (64 with the default node size), they are appended to the
leaves in one sorted run (``NodeTree.merge_sorted``), one path for all of them::

    root record   [node id, height, totals of everything, pending node (its bytes), pending totals]
                      |
    nodes         the B+ tree (NodeTree): e1 ... e90    pending: e93 e95 e99   all after the nodes

Held in the record (format 3), the pending node has no id, so it is never looked up, cached or
freed by id: it is decoded from the record the first time a read needs its entries
(``Root.pending_of``, through ``Tree.pending``; listing namespaces reads only the totals), copied
when a write changes it, and frozen when the record is committed. Format 2 stored it as a node of
its own, named by id in the record: such a node is read by id, and the first change of its entries
moves them into the record and frees it. Measured against format 2 with one time-ordered insert
per commit into a tree of 10^6 items: 51-56 us against 72-76 us per commit (three runs each), of
which LMDB's share went from 17-18 us (a node put, a node delete, the root record and the node id
counter) to 10-12 us (the root record alone); 0.76x in an in-process A/B of 21 alternating rounds.

The insert of a new event does not even load the tree: :func:`appended` builds the next root record
from the current one (the tree is loaded when the entry is not after every pending entry, or fills
the node). That took a commit from 53 to 45 us. With the C kernels the entry is appended to the
pending node's stored bytes (``append_pending``): no node is copied, packed or frozen, and a read
decodes the new pending node compact, as its search image (``decode_pending``), when it first needs
it (0.77-0.79x the commit time, in-process A/B, session 18). Most reads need none of the pending
entries or all of them (last week's totals, or totals up to now): the pending node's count and first
and last entries, read from its bytes in place (``pending_edges``), tell such bounds apart, and only
a bound that falls among the entries, or a read of the entries themselves, decodes the node. That
took the 4-5 us of the decode off the first read after each new event (session 19).

A full pending node becomes a new last leaf (``NodeTree.append_leaf``): the internal nodes of the
right edge get one more child, and the leaves before it are not touched. A merge would also rewrite
the last leaf and plan and cut the run; a commit that fills the pending node took 450 us at 10^6
events, one commit in 64 and a quarter of their time (300 us with the new leaf; 0.92x per commit,
A/B). When the pending entries are too few for a leaf (node sizes above 128), they are merged as
before.

An insert that falls inside the nodes' range goes straight into its leaf, as before: such scattered
entries would land in as many leaves when merged, which costs what inserting them one by one costs
(measured: no gain in commits per second; again in session 17, 0.95x the time with the merges
counted, not worth the invariant below), so they skip the pending node. Session 34 measured it once
more, in full: pending entries anywhere, the root record giving each one's index in the tree (so
``select`` and ``iterate`` stay positional), a scattered insert put into the pending node's stored
bytes in C after one descent that checks the nodes do not hold it. At 10^6 events, alternating
processes, 3,500 commits each: median 40.8-40.9 us against 55.8-57.8 us for the code here, but mean
67.9-68.5 us against 57.5-59.8 (14,600-14,700 commits/s against 16,700-17,400). Each merge of 64
scattered entries rewrites about 64 leaves and their parents in one commit (26-31 us per entry in
``insert_many`` of 64), more than the path writes it saves; commits per second being the target,
the design was not adopted.

With the C kernels such an insert loads no tree either: :func:`inserted` writes it in one kernel
call (``insert_stored``) and builds the next record (session 38). A tree holding pending entries
takes the same call when the entry sorts before the first pending one, which the pending node's
bytes give (``pending_edges``); the record keeps the pending node as it was. :func:`appended`, which
sees the insert first, leaves the node in its bytes when the entry is no append, rather than
decoding it to decline: 0.90x the instructions of such a commit at 10^6 events (session 39).

Invariant: every pending entry sorts after every entry of the nodes. Inserts keep it (see above),
deletes cannot break it, and batch merges (``merge_sorted``, long sorted runs) merge the pending
entries first. So the whole tree is the nodes' entries followed by the pending ones, and every read
stays O(log n):

* counts and sums add the pending entries inside the bounds (two bisections and the pending
  node's cumulative sums, cached like a leaf's) to what the nodes give;
* ``select(k)`` is the nodes' entry ``k`` below their count, else pending entry ``k - count``;
* ``iterate`` chains the two.

``delete`` and ``update`` of a pending entry change the pending node only, and ``delete_range``
splits into its node and pending parts. The root record's ``summary`` covers everything, so
``namespaces()`` still reads each total in O(1).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import chain
from typing import Any, Literal

from ._btree import Cut, Edits, Existing, NodeAccess, NodeTree, Root, _finder, same_values, vadd, vsub
from ._native import speedups
from ._node import Node, delta_of, summarize
from .errors import CorruptDatabaseError

__all__ = ["Tree", "appended", "inserted", "pending_capacity"]

_PENDING_MAX = 64
"""The most entries a pending node holds: each insert rewrites it, so it stays small (64 was measured
faster than 32: fewer merges, for a pending node still under 2 KiB)."""
_new = object.__new__  # Tree.reader's allocations, without the class attribute lookups


def pending_capacity(node_size: int) -> int:
    """How many inserts a tree keeps pending before merging them into its leaves. O(1).

    >>> pending_capacity(64), pending_capacity(1024), pending_capacity(4)
    (64, 64, 4)
    """
    return min(node_size, _PENDING_MAX)


class Tree:
    """The items of one tree (one aggregate namespace) inside one transaction: nodes and pending.

    Indexes are positions in the whole tree: the nodes' entries, then the pending ones. The tree
    works on copies of the records it is given; after writes, the caller stores the record that
    :meth:`take_root` hands out when it says the record changed.
    """

    __slots__ = (
        "_pending",
        "_record",
        "access",
        "capacity",
        "nfields",
        "nodes",
        "original",
        "pending_summary",
    )

    def __init__(self, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> None:
        nodes = self._load(access, nfields, node_size, root)
        self.nodes: NodeTree = NodeTree(access, nfields, node_size, nodes)

    @classmethod
    def reader(cls, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> Tree:
        """A tree for reads only: its node tree shares the root record when it can. O(1).

        The first read of a namespace in each transaction makes one, so it is lean: the pending
        fields set once, no constructor passed around (0.83 us for both trees, where they took 1.15
        us of the 10 us of a count in a transaction of its own).
        """
        tree = _new(cls)
        tree.nodes = NodeTree.reader(access, nfields, node_size, tree._load(access, nfields, node_size, root))
        return tree

    def _load(self, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> Root | None:
        """Set up the tree from a root record; return the record of its nodes alone (None when it
        has none), for its node tree."""
        self.access = access
        self.nfields = nfields
        self.capacity = node_size if node_size < _PENDING_MAX else _PENDING_MAX  # pending_capacity
        self.original = root
        if root is not None and (
            len(root.summary) != 1 + 2 * nfields
            or (root.pending_summary is not None and len(root.pending_summary) != 1 + 2 * nfields)
        ):
            raise _foreign_root()
        if root is None or root.pending_summary is None:
            self._pending: Node | None = None
            self._record: Root | None = None  # a record whose pending node is not decoded yet
            self.pending_summary: list[int] | None = None
            return root if root is not None and root.node_id else None
        if root.pending_node is None and root.packed_pending is not None and speedups is not None:
            self._pending = None
            self._record = root  # decoded by the first read that needs its entries (see pending)
        else:
            self._pending = root.pending_of(access)
            self._record = None
        self.pending_summary = root.pending_summary  # replaced, never changed in place
        return root.nodes_root() if root.node_id else None

    @property
    def pending(self) -> Node | None:
        """The pending node (None when nothing is pending), decoded from the record the first time
        it is needed. O(B) the first time, O(1) after.

        A record that a new event's commit wrote holds the pending node's bytes alone (see
        :func:`appended`), and decoding them took 4-5 us of the first read after each such commit.
        Most reads need none of its entries, or all of them: a window that ends before the first
        pending entry (last week's totals), or one that takes every pending entry (up to now). They
        are told apart by the count and the first and last entries, read from the bytes in place
        (:meth:`_edges_of_record`), and only a bound that falls among the pending entries, or a read
        of the entries themselves, decodes the node.
        """
        record = self._record
        if record is not None:
            self._pending = record.pending_of(self.access)
            self._record = None
        return self._pending

    @pending.setter
    def pending(self, node: Node | None) -> None:
        self._pending = node
        self._record = None

    def _edges_of_record(self) -> tuple[int, bytes, bytes] | None:
        """``(count, first, last)`` of a pending node not decoded yet, read from its bytes
        (:meth:`Root.stored_edges`); None once it is decoded, or when the bytes do not give them (the
        decode then says what is wrong). O(B) in C the first time, O(1) after."""
        record = self._record
        return None if record is None else record.stored_edges()

    def _pending_find(self, bound: bytes, after: bool) -> int:
        """Number of pending entries ``< bound`` (``<= bound`` when ``after``); the pending node must
        exist. O(log B), without decoding it when the bound falls outside its entries."""
        edges = self._edges_of_record()
        if edges is not None:
            count, first, last = edges  # entries are unique: one equal to an edge counts once
            if bound <= first:
                return 1 if after and bound == first else 0
            if bound >= last:
                return count - 1 if bound == last and not after else count
        pending = self.pending
        assert pending is not None
        return _finder()(pending, bound, after)

    @property
    def root(self) -> Root | None:
        """The root record of the tree as it is now (None: the tree is empty)."""
        nodes = self.nodes.root
        summary = self.pending_summary
        if summary is None:  # nothing pending (then the pending node is not looked at)
            return nodes
        pending = self.pending
        if pending is None:
            return nodes
        # a pending node with an id is one a format 2 record named, not changed since
        held = None if pending.id else pending
        if nodes is None:
            return Root(0, 0, list(summary), pending.id, list(summary), None, held)
        # the nodes' own record goes along (a copy: the node tree changes its record in place), so
        # that the next transaction does not compute it back from the totals (``Root.nodes_root``)
        alone = Root(nodes.node_id, nodes.height, list(nodes.summary))
        return Root(
            nodes.node_id, nodes.height, vadd(nodes.summary, summary), pending.id, list(summary), alone, held
        )

    @property
    def changed(self) -> bool:
        """Whether the root record differs from the one the tree started from (or last handed out
        by :meth:`take_root`)."""
        return self.root != self.original

    def take_root(self) -> tuple[bool, Root | None]:
        """``(changed, root)``: the root record to store, and whether it differs from the one the
        tree started from or last handed out. Later changes are measured from this record, so a
        tree saved twice (a delete, then an insert) is seen to change again. O(1)."""
        root = self.root
        if root == self.original:
            return False, root
        if root is not None and root is self.nodes.root:  # the node tree changes its record in place
            root = Root(root.node_id, root.height, list(root.summary))
        self.original = root
        return True, root

    def take_new_root(self) -> Root | None:
        """The root record to store after a change known to have changed it (an insert: the count
        grew), for a tree not used after it: :meth:`take_root` without comparing the record with
        the one before (a dataclass ``__eq__``, which makes a tuple of each record's fields), and
        without copying the node tree's record, which it would go on changing in place were the
        tree used again (the tree is left without a record to compare with: ``original`` is None).
        The two took 0.4 us of a scattered insert. O(1)."""
        self.original = None
        return self.root

    # ----------------------------------------------------------------- reads

    @property
    def count(self) -> int:
        """Number of items in the tree. O(1)."""
        summary = self.pending_summary  # its count, not len(keys): a compact pending node has no lists
        return self.nodes.count + (summary[0] if summary is not None else 0)

    def zero(self) -> list[int]:
        """The summary of no items."""
        return [0] * (1 + 2 * self.nfields)

    def rank(self, bound: bytes, after: bool) -> int:
        """Number of entries ``< bound`` (``<= bound`` when ``after``). O(log n)."""
        rank = self.nodes.rank(bound, after)
        if self.pending_summary is not None:
            rank += self._pending_find(bound, after)
        return rank

    def rank_range(self, lower: Cut | None, upper: Cut | None) -> tuple[int, int]:
        """``(rank(*lower), rank(*upper))``, 0 and ``count`` for a missing cut. O(log n)."""
        start, stop = self.nodes.rank_range(lower, upper)
        if self.pending_summary is not None:
            start += self._pending_find(*lower) if lower is not None else 0
            stop += self._pending_find(*upper) if upper is not None else self._pending_count()
        return start, stop

    def prefix_summary(self, bound: bytes, after: bool) -> list[int]:
        """Summary of the entries ``< bound`` (``<= bound`` when ``after``). O(log n + B)."""
        return self.range_summary(None, (bound, after))

    def range_summary(self, lower: Cut | None, upper: Cut | None) -> list[int]:
        """Summary of the entries between two cuts (None: no cut on that side); zero when they are
        inverted. O(log n + B)."""
        summary = self.nodes.range_summary(lower, upper)
        extra = self._pending_summary(lower, upper)
        return vadd(summary, extra) if extra is not None else summary

    def range_values(self, lower: Cut | None, upper: Cut | None) -> list[Any]:
        """``[count, value of each field]`` between two cuts (see ``NodeTree.range_values``): the
        pending entries inside the bounds go into the same exact sum, rounded once. O(log n + B).

        With the C kernels, a pending node already decoded, or one that a cut falls among (which
        decodes it), is handed to the kernel that sums the nodes' range, which finds and sums its
        part in the same call: in a small namespace, most of whose entries are pending, a bounded
        total took 6.9 us, 2.5 of them for the pending part in Python (session 29).
        """
        summary = self.pending_summary
        bounded = lower is not None or upper is not None
        if summary is not None and speedups is not None and bounded and self._pending_needed(lower, upper):
            pending = self.pending
            assert pending is not None
            values = self.nodes.range_values_with(lower, upper, pending, summary)
            if values is not None:
                return values
        return self.nodes.range_values(lower, upper, self._pending_summary(lower, upper))

    def _pending_needed(self, lower: Cut | None, upper: Cut | None) -> bool:
        """Whether the pending node is decoded, or a cut may fall among its entries (by its first
        and last entries, read from its bytes; True when they cannot be read so: the decode
        decides). O(1) after the first call."""
        if self._record is None:
            return True
        edges = self._edges_of_record()
        if edges is None:
            return True
        _, first, last = edges
        return any(cut is not None and first <= cut[0] <= last for cut in (lower, upper))

    def _pending_summary(self, lower: Cut | None, upper: Cut | None) -> list[int] | None:
        """The summary of the pending entries between two cuts, or None when there are none."""
        if self.pending_summary is None:
            return None
        count = self._pending_count()
        start = self._pending_find(*lower) if lower is not None else 0
        stop = self._pending_find(*upper) if upper is not None else count
        if start == 0 and stop == count:  # every pending entry, the usual case of a window up to now
            return self.pending_summary
        if start >= stop:  # none, the usual case of a window that ends before now
            return None
        pending = self.pending
        assert pending is not None
        return _span(pending, start, stop)

    def _pending_count(self) -> int:
        """How many entries are pending: from their summary, which a compact pending node (its
        search image alone, see ``decode_pending``) answers without making its lists. O(1)."""
        summary = self.pending_summary
        return summary[0] if summary is not None else 0

    def summary_at(self, index: int) -> list[int]:
        """Summary of the first ``index`` entries (0 <= index <= count). O(log n)."""
        stored = self.nodes.count
        pending = None if self.pending_summary is None or index <= stored else self.pending
        if pending is None:
            return self.nodes.summary_at(index)
        return vadd(self.nodes.summary_at(stored), pending.prefixes(index - stored))

    def select(self, index: int) -> tuple[bytes, tuple[Any, ...]]:
        """The entry at ``index`` (0 <= index < count) and its values. O(log n)."""
        stored = self.nodes.count
        pending = None if self.pending_summary is None or index < stored else self.pending
        if pending is None:
            return self.nodes.select(index)
        at = index - stored
        if at >= len(pending.keys):
            raise CorruptDatabaseError(
                "a root record counts more entries than its tree holds; run `tallytree check`"
            )
        return pending.keys[at], tuple(col[at] for col in pending.cols)

    def find(self, entry: bytes) -> tuple[Any, ...] | None:
        """The values of ``entry``, or None if absent. O(log n)."""
        at = self._pending_index(entry)
        if at is not None:
            assert self.pending is not None
            return tuple(col[at] for col in self.pending.cols)
        return self.nodes.find(entry)

    def iterate(
        self, start: int, stop: int, reverse: bool = False
    ) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
        """Yield entries with index in ``[start, stop)``, lazily; O(log n) to start, O(1) amortized each."""
        stored = self.nodes.count
        pending = None if self.pending_summary is None or stop <= stored else self.pending
        if pending is None:
            return self.nodes.iterate(start, stop, reverse)
        first, last = max(start - stored, 0), min(stop - stored, len(pending.keys))
        appended = [(pending.keys[at], tuple(col[at] for col in pending.cols)) for at in range(first, last)]
        nodes = self.nodes.iterate(start, min(stop, stored), reverse)
        if reverse:
            return chain(reversed(appended), nodes)
        return chain(nodes, appended)

    def _pending_index(self, entry: bytes) -> int | None:
        """The index of ``entry`` in the pending node, or None. O(log B)."""
        edges = self._edges_of_record()
        if edges is not None and not edges[1] <= entry <= edges[2]:
            return None
        pending = self.pending
        if pending is None:
            return None
        at = bisect_left(pending.keys, entry)
        return at if at < len(pending.keys) and pending.keys[at] == entry else None

    # ----------------------------------------------------------------- writes

    def insert(self, entry: bytes, values: tuple[Any, ...]) -> bool:
        """Insert ``entry`` with ``values``; return False (changing nothing) if it exists.

        An entry after every entry of the nodes (a new event) goes to the pending node, and a full
        pending node is merged into the leaves, one path for all its entries. Any other entry goes
        straight into its leaf: scattered entries would land in as many leaves when merged, which
        costs what inserting them one by one costs (measured: no gain in commits per second), so
        they skip the pending node. O(log n) (plus the merge every :func:`pending_capacity`
        inserts).
        """
        if self._pending is None and self._record is None:
            pending = None  # nothing pending: no pending entry to find (two calls fewer)
        elif self._pending_index(entry) is not None:
            return False
        else:
            pending = self.pending
        # after the first pending entry means after every entry of the nodes (the invariant);
        # otherwise the descent to the entry's leaf tells whether it falls inside the nodes' range
        if pending is None or entry < pending.keys[0]:
            inserted = self.nodes.insert(entry, values, inside=True)
            if inserted is not None:  # inside the nodes' range: into its leaf (or already there)
                return inserted
        pending = self._writable_pending(delta_of(values))  # after every entry of the nodes
        at = bisect_left(pending.keys, entry)
        pending.keys.insert(at, entry)
        for col, value in zip(pending.cols, values, strict=True):
            col.insert(at, value)
        if len(pending.keys) >= self.capacity:
            self.flush()
        return True

    def insert_sorted_run(self, entries: list[bytes], values: list[tuple[Any, ...]]) -> int:
        """Insert many new entries given in strictly ascending order; return how many were inserted.

        Entries already present are skipped. A run that fits the pending node goes there; a longer
        one is merged into the leaves with the pending entries. O(t log B + m) for ``m`` entries
        landing in ``t`` leaves.
        """
        pending = self.pending
        if len(entries) + (len(pending.keys) if pending is not None else 0) < self.capacity:
            return sum(map(self.insert, entries, values))
        self.flush()
        return self.nodes.insert_sorted_run(entries, values)

    def merge_sorted(
        self, entries: list[bytes], cols: list[list[Any]], existing: Existing = "skip"
    ) -> tuple[int, int | None]:
        """:meth:`NodeTree.merge_sorted`, after the pending entries are merged into the leaves when
        the batch reaches them (a batch that sorts before every pending entry leaves them pending).

        With ``existing="error"``, a batch that conflicts changes nothing, pending entries included.
        With ``existing="skip"``, entries already pending are dropped from the batch first, so a
        batch that is all there already changes nothing.
        """
        if existing == "error" and self.pending is not None:  # find a conflict before writing anything
            pending = self.pending.keys
            conflicts = [
                index
                for index, entry in enumerate(entries)
                if (at := bisect_left(pending, entry)) < len(pending) and pending[at] == entry
            ][:1]
            conflict = self.nodes.first_existing(entries, cols)
            if conflict is not None:
                conflicts.append(conflict)
            if conflicts:
                return 0, min(conflicts)
        node = self.pending
        if node is not None and entries and entries[-1] >= node.keys[0]:
            first = node.keys[0]
            cut = bisect_left(entries, first)
            if existing == "skip":
                kept = [at for at in range(cut, len(entries)) if self._pending_index(entries[at]) is None]
                if len(kept) < len(entries) - cut:
                    kept[:0] = range(cut)
                    entries = list(map(entries.__getitem__, kept))
                    cols = [list(map(col.__getitem__, kept)) for col in cols]
            if entries and entries[-1] >= first:
                self.flush()
        if not entries:
            return 0, None
        return self.nodes.merge_sorted(entries, cols, existing)

    def flush(self) -> None:
        """Merge the pending entries into the leaves (one sorted run) and drop the pending node."""
        pending, summary = self.pending, self.pending_summary
        if pending is None:
            return
        keys, cols = list(pending.keys), [list(col) for col in pending.cols]
        if summary is None or not self.nodes.append_leaf(keys, cols, summary):  # a leaf of its own, or merged
            self.nodes.merge_sorted(keys, cols)
        if pending.id:  # a format 2 pending node, stored by itself
            self.access.free(pending.id)
        self.pending = self.pending_summary = None

    def delete(self, entry: bytes) -> tuple[Any, ...] | None:
        """Remove ``entry``; return its values, or None (changing nothing) if absent. O(log n + B)."""
        at = self._pending_index(entry)
        if at is not None:
            assert self.pending is not None
            values = tuple(col[at] for col in self.pending.cols)
            pending = self._writable_pending(_negate(delta_of(values)))
            del pending.keys[at]
            for col in pending.cols:
                del col[at]
            self._drop_if_empty()
            return values
        return self.nodes.delete(entry)

    def find_sorted(self, entries: list[bytes]) -> tuple[list[tuple[Any, ...] | None], Edits]:
        """The values of each of ``entries`` (strictly ascending; None for one not in the tree), and
        the leaf edits that removing them makes (see :meth:`NodeTree.find_sorted`), for
        :meth:`delete_sorted`. Entries at or after the first pending one are looked up among the
        pending entries (the invariant). O(t log B + m) for ``m`` entries in ``t`` leaves."""
        pending = self.pending
        cut = len(entries) if pending is None else bisect_left(entries, pending.keys[0])
        found, edits = self.nodes.find_sorted(entries[:cut])
        if cut < len(entries):
            assert pending is not None
            keys, cols = pending.keys, pending.cols
            for entry in entries[cut:]:
                at = bisect_left(keys, entry)
                found.append(tuple(col[at] for col in cols) if at < len(keys) and keys[at] == entry else None)
        return found, edits

    def delete_sorted(self, entries: list[bytes], edits: Edits | None = None) -> list[int]:
        """Remove entries given in strictly ascending order, each of them in the tree (the caller found
        them, with :meth:`find_sorted`, whose ``edits`` this takes); return their summary. Those at
        or after the first pending entry are pending (the invariant) and leave the pending node in
        one pass; the others leave the nodes in one pass down the tree
        (:meth:`NodeTree.remove_sorted`). O(t log B + m) for ``m`` entries in ``t`` leaves."""
        pending = self.pending
        cut = len(entries) if pending is None else bisect_left(entries, pending.keys[0])
        removed = self.nodes.remove_sorted(entries[:cut], edits) if cut else self.zero()
        if cut < len(entries):
            assert pending is not None
            keys = pending.keys
            places = [bisect_left(keys, entry) for entry in entries[cut:]]
            part = summarize(len(places), [[col[at] for at in places] for col in pending.cols])
            pending = self._writable_pending(_negate(part))
            for at in reversed(places):
                del pending.keys[at]
                for col in pending.cols:
                    del col[at]
            self._drop_if_empty()
            removed = vadd(removed, part)
        return removed

    def update(self, entry: bytes, values: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Overwrite the values of an existing entry; return the old values (None if absent).

        Writes nothing when the values are unchanged (same type and value). O(log n).
        """
        at = self._pending_index(entry)
        if at is None:
            return self.nodes.update(entry, values)
        assert self.pending is not None
        old = tuple(col[at] for col in self.pending.cols)
        if not same_values(old, values):
            pending = self._writable_pending(vsub(delta_of(values), delta_of(old)))
            for col, value in zip(pending.cols, values, strict=True):
                col[at] = value
        return old

    def delete_range(self, start: int, stop: int) -> list[int]:
        """Remove the entries with index in ``[start, stop)``; return their summary.

        O(log n + nodes removed).
        """
        pending, stored = self.pending, self.nodes.count
        if pending is None or stop <= stored:
            return self.nodes.delete_range(start, stop)
        start = max(start, 0)
        removed = self.nodes.delete_range(start, stored) if start < stored else self.zero()
        first, last = max(start - stored, 0), min(stop - stored, len(pending.keys))
        if first < last:
            part = vsub(pending.prefixes(last), pending.prefixes(first))
            removed = vadd(removed, part)
            pending = self._writable_pending(_negate(part))
            del pending.keys[first:last]
            for col in pending.cols:
                del col[first:last]
            self._drop_if_empty()
        return removed

    def _writable_pending(self, delta: list[int] | None = None) -> Node:
        """The pending node, made mutable (created empty if there is none); ``delta`` is added to
        its summary."""
        pending = self.pending
        if pending is None:
            cols: list[list[Any]] = [[] for _ in range(self.nfields)]
            pending = Node(0, True, [], cols, dirty=True)
            pending.pending = True
            self.pending_summary = self.zero()
        elif not pending.dirty:  # committed: copied, and held by the root record from now on
            if pending.id:  # a format 2 pending node, stored by itself
                self.access.free(pending.id)
            pending = pending.copy(0)
        if delta is not None:
            assert self.pending_summary is not None
            self.pending_summary = vadd(self.pending_summary, delta)
        self.pending = pending
        return pending

    def _drop_if_empty(self) -> bool:
        """Free the pending node if it holds nothing any more; return whether it did."""
        pending = self.pending
        if pending is None or pending.keys:
            return False
        if pending.id:  # a format 2 pending node, stored by itself
            self.access.free(pending.id)
        self.pending = self.pending_summary = None
        return True


def appended(
    access: NodeAccess, root: Root | None, capacity: int, entry: bytes, values: tuple[Any, ...]
) -> Root | None:
    """The root record with ``entry`` appended to its pending node, or None when the insert needs
    the whole tree (:meth:`Tree.insert`): no pending node yet, a format 2 one, ``entry`` not after
    every pending entry (a duplicate, or one that may fall among the nodes' entries), or a pending
    node that the entry would fill (time to merge). O(B) for the copy of the pending node (none when
    this transaction already copied it), O(1) otherwise.

    The commonest write, one new event per committed transaction, costs the record rewrite alone:
    loading a Tree, then building and comparing its record, took 8 us of the 53 us of such a commit
    (measured 45 us with this path, 10^6 items, in-process A/B). With the C kernels the entry goes
    into the pending node's stored bytes (``append_pending``), and the new record holds those bytes
    alone (``packed_pending``, decoded by the first read that needs it): 0.77-0.79x the commit time
    again. A pending node this transaction already changed takes its lists.

    >>> from tallytree._btree import Root
    >>> from tallytree._node import Node, delta_of
    >>> node = Node(0, True, [b"a"], [[5]], dirty=True)
    >>> node.pending = True
    >>> root = Root(0, 0, delta_of((5,)), 0, delta_of((5,)), None, node)
    >>> new = appended(None, root, 64, b"b", (7,))
    >>> new.pending_node.keys, new.summary[0], new.pending_summary[0]
    ([b'a', b'b'], 2, 2)
    >>> appended(None, root, 64, b"a", (1,)) is None  # not after the last pending entry: the tree decides
    True
    """
    if root is None or root.pending_summary is None or root.pending:
        return None
    width = 1 + 2 * len(values)
    if len(root.summary) != width or len(root.pending_summary) != width:
        raise _foreign_root()
    node = root.pending_node
    packed = None
    if speedups is not None:  # the stored bytes, appended to in C
        stored = root.packed_pending if node is None else None if node.dirty else node._packed
        if stored is not None:
            packed = speedups.append_pending(stored, entry, values, capacity)
            # not an append (or a full node): the tree decides, and the node stays in its bytes,
            # undecoded (inserted reads its first entry from them)
            if (
                packed is None
                and (edges := root.stored_edges()) is not None
                and (entry <= edges[2] or edges[0] + 1 >= capacity)
            ):
                return None
    if packed is not None:
        node = None
    else:  # without the extension, or for a node this transaction changed: the node's lists
        pending = root.pending_of(access)
        if pending is None or len(pending.keys) + 1 >= capacity or entry <= pending.keys[-1]:
            return None
        node = pending if pending.dirty else pending.copy(0)  # a dirty one is this transaction's own
        node.keys.append(entry)
        for col, value in zip(node.cols, values, strict=True):
            col.append(value)
    delta = delta_of(values)
    nodes = root.nodes_root() if root.node_id else None
    new = Root(
        root.node_id,
        root.height,
        vadd(root.summary, delta),
        0,
        vadd(root.pending_summary, delta),
        nodes,
        node,
    )
    new.packed_pending = packed
    return new


def inserted(
    access: NodeAccess, root: Root | None, node_size: int, entry: bytes, values: tuple[Any, ...]
) -> Root | Literal[False] | None:
    """The root record after ``entry`` is inserted into the tree's nodes by the C kernel
    ``insert_stored`` (the transaction's first write, in one call: see ``NodeTree._insert_stored``);
    False, changing nothing, when the entry is there already; None, changing nothing, when the
    insert needs the whole tree (:meth:`Tree.insert`): without the kernels, a tree of one leaf, an
    entry that does not sort before every pending entry (or pending entries whose bytes are not at
    hand: a format 2 record, a node this transaction changed), and whatever the kernel leaves (a
    leaf that splits, an entry after every entry of the nodes, which goes to the pending node, a
    later write of the transaction). O(B log_B n).

    The commonest write of scattered keys, one per committed transaction, then costs no Tree and no
    NodeTree, as :func:`appended` spares a new event them (about 220 of the 1,600 bytecodes of such
    a commit at 10^6 events: 0.95x its instructions). A tree with pending entries (new events not
    merged yet) takes it the same way: the entry goes into the nodes, as :meth:`Tree.insert` puts
    it, and the new record keeps the pending node as it was.

    >>> from tallytree._btree import Root
    >>> inserted(None, Root(5, 1, [1, 0, 0]), 64, b"a", (1,)) is None  # one leaf: the tree decides
    True
    """
    if speedups is None or root is None or root.height < 2:
        return None
    delta = delta_of(values)
    if len(root.summary) != len(delta):  # (the Tree's load raises what this is)
        return None
    pending = root.pending_summary
    if pending is not None:
        edges = root.stored_edges()  # (appended, which declined the entry, read them already)
        if edges is None or entry >= edges[1]:  # the pending node's, or the tree's to place
            return None
        nodes = root.nodes_root()
    else:
        nodes = root
    written = speedups.insert_stored(
        nodes.node_id, entry, nodes.height, True, values, node_size, delta, access.write_kit()
    )
    if type(written) is not int:
        return False if written is False else None
    if pending is None:
        return Root(written, root.height, vadd(root.summary, delta))
    # the pending node unchanged, in whichever form the record holds it (see Tree.root)
    alone = Root(written, root.height, vadd(nodes.summary, delta))
    new = Root(written, root.height, vadd(root.summary, delta), 0, pending, alone, root.pending_node)
    new.packed_pending = root.packed_pending
    return new


def _foreign_root() -> CorruptDatabaseError:
    return CorruptDatabaseError(
        "a root record sums another number of value fields than its aggregate has (another "
        "aggregate's record, or damage); run `tallytree check` to locate it"
    )


def _span(pending: Node, start: int, stop: int) -> list[int]:
    """The summary of pending entries ``start:stop``: from cumulative rows once the node has been read
    a few times (``Node.hot_rows``), else summed directly (each commit makes a new pending node,
    which a read after every write would otherwise pay a table for). O(stop - start), O(1) hot."""
    hot = pending.hot_rows()
    if hot is None:
        return pending.summary(start, stop)
    shifts, rows = hot
    return [(high - low) << shift for low, high, shift in zip(rows[start], rows[stop], shifts, strict=True)]


def _negate(summary: list[int]) -> list[int]:
    return [-value for value in summary]
