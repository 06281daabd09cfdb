"""The tree algorithm: an order-statistic B+ tree of counts and exact sums, over an abstract node store.

Design
======
This module is the B+ tree proper; callers reach it through ``_tree.Tree``, which adds each tree's
pending node (inserts not yet merged into the leaves). It knows nothing of LMDB or of keys: it orders
opaque *entries* (bytes, see ``_keys``) and sums value columns, reading and writing nodes only through
the small :class:`NodeAccess` interface (``node``, ``mutable``, ``new_id``, ``adopt``, ``free``, and
``stored``, ``replace_stored``, ``adopt_encoded`` and ``adopt_prepared`` for nodes handled in
their stored bytes). The
same code runs over the in-memory store used by the tests and over LMDB, as SQLite's b-tree runs over
its pager.

Every parent keeps each child's count and sums (see ``_node``), so:

* ``rank`` / ``prefix_summary`` descend once, adding the cumulative count (and sums) of the children left
  of the path: one node per level, O(log n) whatever the size of the range.
* A bounded count or sum is ``prefix(upper) - prefix(lower)``, computed in one fused descent
  (``rank_range`` / ``range_summary``): the path the two cuts share is walked once, then each cut
  descends alone. Sums are gathered as references to cached cumulative rows of internal nodes (exact
  ints, true scale) and added once at the end; the entries needed from the (at most two) leaves
  reached are summed together in one exact pass per field, each leaf on its shorter side, so a leaf
  read for the first time costs no O(B) table (a leaf read often gets one, see ``Node.hot_rows``).
* With the C kernels built, the descents of ``rank``, ``rank_range`` and ``range_summary`` run in one
  C call each (``_speedups.c``): the same steps, with children taken straight from the shared node
  cache in read transactions, and a node's search image read instead of its attributes (its counts,
  child ids and cumulative sums in fixed-width arrays; a leaf's values as raw numbers): a range sum
  is added up in fixed point as the descent goes, with no Python row or value object, and
  ``range_values`` (what ``totals`` reads) also rounds each exact sum to its final value there, once.
  The Python loops below stay the reference and the fallback (for sums the C accumulators do not
  take).
* ``select`` descends by cumulative counts.
* ``insert`` / ``delete`` / ``update`` change one leaf and add a delta to the summary of each node on the
  path, then split, merge or borrow on the way back up.
* With the C kernels, an ``insert`` into a committed path that needs no split is written from stored
  bytes (``_insert_stored``): the leaf is merged with the entry in its stored bytes, as a batch
  merges it (below), and each internal node of the path is rebuilt in committed form, as
  ``Node.bumped`` rebuilds one (a patch of the node it was made from, its bytes repacked from the
  stored ones; see ``_node``). Three C calls do the work of one such write: ``stored_path`` (the
  descent, taking children straight from the node cache while the transaction has changed no node,
  and the path's ids), ``merge_children`` (the leaf) and ``bump_path`` (every level of the path,
  each new node made without running Python code, its bytes repacked through the *layout* of the
  old ones: see the kernels' "Layouts"); a level ``bump_path`` leaves (a column to rescale) is
  bumped in Python. Nothing is copied into lists, encoded or frozen at commit, and the leaf is not
  decoded; the transaction takes the leaf as bytes and the internal nodes in both forms
  (``adopt_path``, ``adopt_prepared``). The first insert of a transaction (the commonest case, one
  write per transaction) is all of that in **one** C call, ``insert_stored``: the descent, the
  merge, the new ids (``renew_all``), the bumps and the hand-over to the transaction, which it
  reads and fills through ``NodeAccess.write_kit``; it answers NotImplemented, changing nothing,
  for what the three calls and the Python code around them take (a later write of the
  transaction, a level to bump in Python). A ``delete`` that leaves its leaf at least half full and
  an ``update`` are written the same way as an insert's three calls (``_edit_stored``): the kernel
  ``leaf_edit`` drops the entry from the leaf's stored bytes, or packs its new values there, and
  hands back its old values. Any other write takes the decoded path.
* ``merge_sorted`` (batches, ``insert_many``) works per touched node, not per entry: a read-only plan
  splits the sorted batch among the children of each node it visits and finds what each touched leaf
  gets (or, for ``existing="error"``, stops at the first entry already there, before anything is
  written); the apply pass then copies each touched leaf once, merges its new entries in, gives each
  touched child one summary delta (from running sums over the batch, O(fields) per child), and cuts an
  overfull node once into as many pieces as needed. Appends past the last entry therefore fill whole
  new leaves and split each node of the right spine once, like a bulk build of the new part::

      batch (sorted)  e1 e2 e3 | e4 e5 | ... e9        plan: two bisections per touched child
      root            [ c0 | c1 | c2 ]                 apply: right to left, so a split (siblings go
      leaves         c0+{e1,e2,e3}  c1+{e4,e5}  c2+...        to the right) moves no child still to do

  With the C kernels, the plan of a node whose children are leaves is one call (``merge_children``):
  it splits the node's slice of the batch among its leaves and merges each slice into the leaf's
  *stored bytes*, copying the stored keys and values as they are and packing only the new ones, cut
  into even pieces (each with its exact summary) if the leaf overflows. A leaf is then neither
  decoded, copied nor encoded, nor taken into the node cache: a batch of scattered keys touches one
  leaf per key or so, most of them out of the cache in a large tree, and those three steps cost more
  than the rest of the write. The kernel reads the leaves' bytes itself from the transaction's parts
  (``NodeAccess.stored_source``), with no Python call per leaf. The merged bytes go to the
  transaction as they are (``NodeAccess.replace_stored``), and the parent gets its children's deltas
  from the batch's prefix sums in one C call (``add_spans``; column by column in Python when a column
  must be rescaled first). A leaf the transaction already changed (a dirty node) and one that holds
  an entry of the batch already take the decoded path above.
* ``delete_range`` drops whole subtrees that fall inside the range (reading none of their leaves), trims
  the two boundary paths, then repairs underfull nodes along them: O(log n + nodes removed).

Writes are copy-on-write: ``mutable(node)`` hands back a copy under a new id the first time a committed
node is changed in a transaction (later changes in the same transaction edit that copy in place), and the
parent's pointer is rewritten. Committed nodes are never modified, which is what makes the node cache and
concurrent readers safe.

Damaged data. Nodes are checked as they are decoded (``_node``), but a decode cannot see damage
that contradicts a parent: every descent counts its levels and raises CorruptDatabaseError past
:data:`MAX_LEVELS` (damaged child ids that form a cycle), a batch's plan checks each node's level and
fences, and ``select`` checks that the leaf holds the index its parent's counts lead to. Reads go by
each node's kind and never use the root record's height; writes do (splits grow it, a range delete
drops subtrees by it), so every write descent compares the height with the nodes it meets, at one
comparison per level: a leaf above the bottom level, or a leaf reached at another depth, raises
CorruptDatabaseError before anything is changed from it.

Costs, with ``B`` the node size: reads O(log_B n) node visits plus O(B) per visit on a node first seen
(cumulative arrays are computed once and cached on committed nodes; a range's leaf parts cost at most
B / 2 entries each); writes O(B log_B n).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from functools import reduce
from itertools import accumulate, repeat
from operator import add, is_, itemgetter, lshift, neg, sub
from typing import Any, Literal, Protocol

from ._native import StoredSource, WriteKit, speedups
from ._node import (
    SCALE_BITS,
    Chunk,
    Node,
    _float_sum,
    _PatchedNode,
    _scaled_column,
    column_sum,
    decode_pending,
    delta_of,
    sum_value,
    summarize,
)
from .errors import CorruptDatabaseError

__all__ = ["NodeAccess", "NodeTree", "Root", "same_values", "vadd", "vsub"]

MAX_LEVELS = 64
"""More levels than any tree has (a node holds at least 2 children, so 2**64 items need fewer): a
descent that goes deeper follows a cycle of damaged child ids. The C kernels use the same bound."""


class NodeAccess(Protocol):
    """What the tree needs from storage, inside one transaction."""

    def node(self, node_id: int) -> Node:
        """Return the node with this id (a dirty one if this transaction changed it)."""
        ...

    def mutable(self, node: Node) -> Node:
        """Return a node that may be changed in place: the node itself if dirty, else a fresh copy."""
        ...

    def new_id(self) -> int:
        """A fresh node id, never used before."""
        ...

    def renew(self, node_id: int) -> int:
        """The id of a new version of node ``node_id``, which replaces it: the caller registers the
        new version under it (:meth:`adopt`, :meth:`adopt_encoded`, :meth:`adopt_prepared`), and
        the old one is gone as :meth:`free` would drop it."""
        ...

    def renew_all(self, node_ids: list[int]) -> list[int]:
        """:meth:`renew` of each node, in order: the new versions' ids."""
        ...

    def adopt_path(self, leaf_id: int, leaf: bytes, nodes: list[Node]) -> None:
        """:meth:`adopt_encoded` of a leaf (its id from :meth:`renew`) and :meth:`adopt_prepared` of
        each node in ``nodes`` (committed ones, as ``Node.bumped`` makes them: each holds its stored
        bytes)."""
        ...

    def adopt(self, node: Node) -> Node:
        """Register a new dirty node (built with an id from :meth:`new_id`) and return it."""
        ...

    def adopt_encoded(self, node_id: int, data: bytes) -> None:
        """Register a new node (id from :meth:`new_id`) given in stored form only."""
        ...

    def adopt_prepared(self, node: Node, data: bytes) -> None:
        """Register a new node (id from :meth:`new_id`) in committed form (never changed in place,
        see ``Node.bumped``) with ``data``, its stored bytes."""
        ...

    def free(self, node_id: int) -> None:
        """Forget a node: drop it if dirty, delete it at commit if committed."""
        ...

    def stored(self, node_id: int) -> bytes | None:
        """The stored bytes of a node this transaction has not changed (``_node`` format), or None
        for a node it changed (a dirty one) or a node that is missing."""
        ...

    def stored_source(self) -> Callable[[int], bytes | None] | StoredSource:
        """:meth:`stored` in the form ``merge_children`` reads fastest: :meth:`stored` itself, or the
        parts it reads (see ``_native.StoredSource``)."""
        ...

    def replace_stored(self, node_ids: list[int], data: list[bytes]) -> list[int]:
        """Write new nodes given in stored form in place of these stored ones (which are freed);
        return the new nodes' ids, in order."""
        ...

    @property
    def shared(self) -> object:
        """Committed nodes a C descent may take directly by id (the store of the shared cache of a
        read transaction: a ``NodeTable`` or a dict of nodes by id), or None when every node must
        come from :meth:`node` (a write transaction that has changed nodes: its own come first)."""
        ...

    def count_hits(self, hits: int) -> None:
        """Count nodes a descent took from :attr:`shared` (cache statistics)."""
        ...

    def write_kit(self) -> WriteKit:
        """The transaction's pieces that the ``insert_stored`` kernel reads and fills (see
        ``_native.WriteKit``); the same tuple for the whole transaction."""
        ...


@dataclass
class Root:
    """A tree's root record: the root node id, the height (1 = the root is a leaf), the totals, and
    the tree's pending inserts (see ``_tree``).

    ``summary`` covers every item, pending ones included, and ``pending_summary`` the pending ones
    (None when nothing is pending). A tree whose items are all pending has no nodes: ``node_id`` and
    ``height`` are 0. The pending node is held in the record itself (format 3: ``pending_node``,
    decoded from ``packed_pending`` on first use, see :meth:`pending_of`; the record a new event's
    commit builds by appending to those bytes, ``_tree.appended``, holds the bytes alone); a record
    written by format 2 names it by id instead (``pending``, 0 when none), and the tree's next
    change of its pending entries moves them into the record.
    """

    node_id: int
    height: int
    summary: list[int]
    pending: int = 0
    pending_summary: list[int] | None = None
    _nodes: Root | None = dataclass_field(default=None, compare=False, repr=False)
    pending_node: Node | None = None  # compared by identity: records are never changed in place
    packed_pending: bytes | None = dataclass_field(default=None, compare=False, repr=False)
    _edges: tuple[int, bytes, bytes] | None = dataclass_field(default=None, compare=False, repr=False)

    def stored_edges(self) -> tuple[int, bytes, bytes] | None:
        """``(count, first, last)`` of the pending entries, read from the pending node's stored bytes
        in place by the kernel ``pending_edges`` (nothing decoded), once per record; None without the
        kernels or pending entries, for a format 2 record (the node named by id), a pending node
        changed since it was stored (no bytes), or bytes that do not give them (damage, which the
        node's decode reports). Reads use them to take none or all of the pending entries, and a
        write to tell an append from an entry that belongs among the nodes. O(B) in C the first
        time, O(1) after.

        >>> Root(5, 2, [3, 0, 0]).stored_edges() is None  # nothing pending
        True
        """
        edges = self._edges
        if edges is None:
            node = self.pending_node
            if (
                speedups is None
                or self.pending_summary is None
                or self.pending
                or (node is not None and node.dirty)
            ):
                return None  # (a dirty node changes in place: never cached for it)
            packed = self.packed_pending if node is None else node._packed
            if packed is None:
                return None
            edges = speedups.pending_edges(packed)
            if edges is None or edges[0] != self.pending_summary[0]:
                return None
            self._edges = edges
        return edges

    def nodes_root(self) -> Root:
        """The record of the tree's nodes alone: the totals less the pending ones (computed once per
        record: a record is never changed once it holds a pending node). O(1)."""
        nodes = self._nodes
        if nodes is None:
            assert self.pending_summary is not None  # decode_root reads both or neither
            nodes = self._nodes = Root(self.node_id, self.height, vsub(self.summary, self.pending_summary))
        return nodes

    def pending_of(self, access: NodeAccess) -> Node | None:
        """The pending node, or None: decoded from the record once (then kept with it), or, for a
        format 2 record, read by id. O(B) the first time, O(1) after."""
        node = self.pending_node
        if node is None:
            if self.packed_pending is not None:
                node = decode_pending(self.packed_pending)
            elif self.pending:
                node = access.node(self.pending)
            counted = self.pending_summary[0] if self.pending_summary is not None else 0
            if node is not None and counted != node.size():
                raise CorruptDatabaseError(
                    f"a root record counts {counted} pending entries, but its pending node holds "
                    f"{node.size()}; run `tallytree check`"
                )
            if self.packed_pending is not None:
                self.pending_node, self.packed_pending = node, None
        return node


def summary_values(summary: list[int], nfields: int) -> list[Any]:
    """``[count, value of each field]`` of a summary ``[count, S..., F...]`` (see ``sum_value``).

    >>> summary_values([2, 3 << SCALE_BITS, 1 << SCALE_BITS, 0, 1], 2)  # an int sum, a float sum
    [2, 3, 1.0]
    """
    return [summary[0], *map(sum_value, summary[1 : 1 + nfields], summary[1 + nfields :])]


def vadd(left: list[int], right: list[int]) -> list[int]:
    """Element-wise sum of two summaries (of equal length)."""
    return list(map(add, left, right))


def vsub(left: list[int], right: list[int]) -> list[int]:
    """Element-wise difference of two summaries (of equal length)."""
    return list(map(sub, left, right))


Path = list[tuple[Node, int]]
Existing = Literal["error", "skip", "update"]
"""What a merge does with an entry already in the tree (see :meth:`NodeTree.merge_sorted`)."""

_INSERT_EACH = 16
"""Up to this many new entries are inserted into a leaf one by one; more are merged in one sort."""


Edits = dict[int, tuple[bytes, list[int]]]
"""Leaves with entries removed in their stored bytes, by leaf id: (new bytes, the entries' summary)."""


class _Path(Enum):
    DECODED = 0
    """What ``NodeTree._insert_stored`` returns for an insert it leaves to the decoded path."""


_DECODED = _Path.DECODED

_Merged = tuple[int, int, int, int, Any]
"""A leaf merged in its stored bytes (see :meth:`NodeTree._plan_stored`): its index in its parent, the
slice ``lo:hi`` of the run it took, its node id, and its new bytes or (when it splits) its pieces:
the first piece's bytes, then ``(fence, bytes, summary)`` for each other piece."""

Cut = tuple[bytes, bool]
"""Where a bound cuts: ``(bound, after)`` means "entries ``< bound``" (``<= bound`` when ``after``)."""

Span = tuple[Node, int, int, bool, Sequence[int], Sequence[int]]
"""Entries ``start:stop`` of a leaf, to be added (True) to or subtracted from a range summary, and the
summaries up to the leaf's start and end (their difference is the leaf's summary, kept by its parent)."""


def _bisect_keys(node: Node, key: bytes, right: bool) -> int:
    """``bisect_right`` (``bisect_left`` unless ``right``) of ``key`` in ``node.keys``. O(log B)."""
    return bisect_right(node.keys, key) if right else bisect_left(node.keys, key)


def _finder() -> Callable[[Node, bytes, bool], int]:
    """The key search of the descents: the C kernel's (through each committed node's cached search
    image, see ``_speedups.c``), or :func:`_bisect_keys`. O(1)."""
    return _bisect_keys if speedups is None else speedups.bisect


def _damaged(node: Node, what: str) -> CorruptDatabaseError:
    """The error for a node that contradicts its parent (damage a decode cannot see)."""
    return CorruptDatabaseError(f"node {node.id} is damaged: {what}; run `tallytree check` to locate it")


def _by_count(node: Node, counts: Sequence[int], index: int) -> int:
    """The child of an internal node whose subtree holds its entry ``index`` (``counts`` are its
    cumulative counts); CorruptDatabaseError when the node holds fewer entries than its parent (or
    the root record) counts. O(log B)."""
    child = bisect_right(counts, index) - 1
    if not 0 <= child < len(node.kids):
        raise _damaged(node, "its parent (or the root record) counts more entries than it holds")
    return child


def _of_tree(node: Node, nfields: int) -> Node:
    """``node``, if it holds its tree's number of value fields (``nfields``), else CorruptDatabaseError:
    a node of another aggregate (a damaged child id, or a node record a foreign writer swapped), whose
    counts, rows and values would answer wrong or fail untyped. Read from its shifts: a leaf has one
    per column, an internal node one per summary column (the count, then a sum and a float count per
    field), and a compact leaf's lists are not made. The C descents make the same check. O(1)."""
    width = len(node.shifts)
    if width == (nfields if node.leaf else 1 + 2 * nfields):
        return node
    held = width if node.leaf else f"{(width - 1) / 2:g}"
    raise CorruptDatabaseError(
        f"node {node.id} holds {held} value field(s) where its aggregate has {nfields}: a node of another "
        "aggregate (a damaged child id, or node record); run `tallytree check` to locate the damage"
    )


def _deeper(levels: int, node: Node) -> int:
    """``levels + 1``, for a descent going below ``node``; CorruptDatabaseError past
    :data:`MAX_LEVELS` (damaged child ids that lead back up would otherwise loop for ever). O(1)."""
    if levels >= MAX_LEVELS:
        raise CorruptDatabaseError(
            f"node {node.id} lies deeper than any tree goes: damaged child ids form a cycle; "
            "run `tallytree check` to locate the damage"
        )
    return levels + 1


def _misplaced(node: Node, height: int) -> CorruptDatabaseError:
    """The error for a node met at a level where the tree's height (``height``: that of the subtree
    the node heads) puts the other kind: a leaf above the bottom level or an internal node at it.
    The root record's height is damaged, or child ids are (a cycle, a node of another tree)."""
    return CorruptDatabaseError(
        f"node {node.id} is {'a leaf' if node.leaf else 'an internal node'} where the tree's height "
        f"puts {'leaves' if height == 1 else 'internal nodes'}: its root record's height or damaged "
        "child ids (a cycle or a node of another tree) disagree with the nodes; run `tallytree check` "
        "to locate the damage"
    )


def _wrong_depth(leaf: Node, levels: int, height: int) -> CorruptDatabaseError:
    """The error for a leaf a descent met below ``levels`` internal nodes, in a tree whose root record
    gives ``height`` (leaves below ``height - 1`` of them): the record's height or child ids are
    damaged."""
    return CorruptDatabaseError(
        f"leaf {leaf.id} lies at depth {levels + 1}, but its tree's root record gives height {height}: "
        "the record's height or damaged child ids (a cycle or a node of another tree) disagree with "
        "the nodes; run `tallytree check` to locate the damage"
    )


def _rightmost(path: Path) -> bool:
    """Whether a descent took the last child at every level (its leaf is the tree's last). O(height)."""
    return all(index == len(node.kids) - 1 for node, index in path)


def _locate(leaf: Node, entry: bytes) -> tuple[int, bool]:
    """Where ``entry`` is, or would go, in a leaf, and whether it is there. O(log B).

    Through the search of the descents: a compact leaf (``Node.compact``) is searched in its image,
    and its lists are not made for it (a write then makes its dirty copy's lists from the image)."""
    find = _finder()
    index = find(leaf, entry, False)
    return index, find(leaf, entry, True) > index


class NodeTree:
    """Operations on the nodes of one tree (one aggregate namespace) inside one transaction.

    This is the B+ tree proper; callers use :class:`~tallytree._tree.Tree`, which adds the tree's
    pending inserts.

    The tree works on a copy of the root record it is given; after writes, the caller persists
    ``root`` when :attr:`changed` says it differs.
    """

    __slots__ = ("access", "max_size", "min_size", "nfields", "original", "root")

    def __init__(self, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> None:
        self.access = access
        self.nfields = nfields
        self.max_size = node_size
        self.min_size = node_size // 2
        self.original = root
        self.root = Root(root.node_id, root.height, list(root.summary)) if root is not None else None

    @classmethod
    def reader(cls, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> NodeTree:
        """A tree for reads only: it shares the root record instead of copying it. O(1)."""
        tree = cls.__new__(cls)
        tree.access = access
        tree.nfields = nfields
        tree.max_size = node_size
        tree.min_size = node_size // 2
        tree.original = root
        tree.root = root
        return tree

    @property
    def changed(self) -> bool:
        """Whether the root record differs from the one the tree started from."""
        return self.root != self.original

    # ----------------------------------------------------------------- reads

    @property
    def count(self) -> int:
        """Number of items in the tree. O(1)."""
        return self.root.summary[0] if self.root is not None else 0

    def zero(self) -> list[int]:
        """The summary of no items."""
        return [0] * (1 + 2 * self.nfields)

    def rank(self, bound: bytes, after: bool) -> int:
        """Number of entries ``< bound`` (``<= bound`` when ``after``). O(log n)."""
        if self.root is None:
            return 0
        access = self.access
        if speedups is not None:  # the same descent, in one C call
            rank, hits = speedups.rank(
                access.node(self.root.node_id), bound, after, access.node, access.shared, self.nfields
            )
            if hits:
                access.count_hits(hits)
            return rank
        return self._rank_in(access.node(self.root.node_id), bound, after)

    def last_entry(self) -> bytes | None:
        """The greatest entry of the tree, or None if it is empty. O(log n)."""
        if self.root is None:
            return None
        access, nfields = self.access, self.nfields
        node = _of_tree(access.node(self.root.node_id), nfields)
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            node = _of_tree(access.node(node.kids[-1]), nfields)
        return node.keys[-1]

    def _rank_in(self, node: Node, bound: bytes, after: bool) -> int:
        """Number of entries ``< bound`` (``<= bound``) in the subtree of ``node``."""
        access, nfields = self.access, self.nfields
        find = _finder()
        total = 0
        levels = 0
        _of_tree(node, nfields)
        while not node.leaf:
            levels = _deeper(levels, node)
            index = find(node, bound, True) - 1
            total += node.counts()[index]
            node = _of_tree(access.node(node.kids[index]), nfields)
        return total + find(node, bound, after)

    def rank_range(self, lower: Cut | None, upper: Cut | None) -> tuple[int, int]:
        """``(rank(*lower), rank(*upper))``, 0 and ``count`` for a missing cut, in one descent.

        The two cuts share the path down to the node where they part; from there each descends
        alone. O(log n).
        """
        root = self.root
        if root is None:
            return 0, 0
        if lower is None:
            return 0, (self.rank(*upper) if upper is not None else root.summary[0])
        if upper is None:
            return self.rank(*lower), root.summary[0]
        low, low_after = lower
        high, high_after = upper
        access = self.access
        node = access.node(root.node_id)
        if speedups is not None:  # the same descent, in one C call
            start, stop, hits = speedups.rank_range(
                node, low, low_after, high, high_after, access.node, access.shared, self.nfields
            )
            if hits:
                access.count_hits(hits)
            return start, stop
        find = _finder()
        base = 0
        levels = 0
        _of_tree(node, self.nfields)
        while not node.leaf:
            levels = _deeper(levels, node)
            index = find(node, low, True) - 1
            other = find(node, high, True) - 1
            counts = node.counts()
            if index != other:
                start = base + counts[index] + self._rank_in(access.node(node.kids[index]), low, low_after)
                stop = base + counts[other] + self._rank_in(access.node(node.kids[other]), high, high_after)
                return start, stop
            base += counts[index]
            node = _of_tree(access.node(node.kids[index]), self.nfields)
        return base + find(node, low, low_after), base + find(node, high, high_after)

    def prefix_summary(self, bound: bytes, after: bool) -> list[int]:
        """Summary of the entries ``< bound`` (``<= bound`` when ``after``). O(log n + B)."""
        return self.range_summary(None, (bound, after))

    def range_values(self, lower: Cut | None, upper: Cut | None, extra: list[int] | None) -> list[Any]:
        """``[count, value of each field]`` of the entries between two cuts plus the summary ``extra``
        (None: nothing more), each sum as :func:`_node.sum_value` gives it from the exact total.

        :meth:`range_summary` then ``sum_value``, with the C kernels in one call that makes no big
        int (the exact sum is rounded once, in C). O(log n + B).
        """
        root = self.root
        if speedups is not None and root is not None and (lower is not None or upper is not None):
            values = self._range_totals(root, lower, upper, extra, True)
            if values is not None:
                return values
        summary = self.range_summary(lower, upper)
        return summary_values(vadd(summary, extra) if extra is not None else summary, self.nfields)

    def range_values_with(
        self, lower: Cut | None, upper: Cut | None, pending: Node, pending_summary: list[int]
    ) -> list[Any] | None:
        """:meth:`range_values` of these entries and the leaf ``pending`` (a tree's pending node, of
        summary ``pending_summary``) together, in one C call: its part between the cuts is found and
        summed there too (at least one cut; the C kernels built). None when the kernel leaves the
        sum to the Python code. O(log n + B)."""
        return self._range_totals(self.root, lower, upper, None, True, pending, pending_summary)

    def _range_totals(
        self,
        root: Root | None,
        lower: Cut | None,
        upper: Cut | None,
        extra: list[int] | None,
        values: bool,
        pending: Node | None = None,
        pending_summary: list[int] | None = None,
    ) -> list[Any] | None:
        """The C kernel's range sum (``range_totals``; at least one cut): the summary, or with
        ``values`` the final values; None when it leaves the sum to the Python code."""
        access = self.access
        low, low_after = lower if lower is not None else (None, False)
        high, high_after = upper if upper is not None else (None, False)
        assert speedups is not None
        try:
            found = speedups.range_totals(
                access.node(root.node_id) if root is not None else None,
                root.summary if root is not None else None,
                low,
                low_after,
                high,
                high_after,
                access.node,
                access.shared,
                self.nfields,
                extra,
                values,
                pending,
                pending_summary,
            )
        except CorruptDatabaseError:  # the kernel named the damaged node itself
            raise
        except (TypeError, ValueError, IndexError) as exc:  # its arguments are sound: a node is not
            raise CorruptDatabaseError(
                f"a node of the tree is not one of this aggregate's ({exc}); run `tallytree check` to "
                "locate the damage"
            ) from exc
        if found is None:
            return None
        total, hits = found
        if hits:
            access.count_hits(hits)
        return total

    def range_summary(self, lower: Cut | None, upper: Cut | None) -> list[int]:
        """Summary of the entries between two cuts (None: no cut on that side), in one descent.

        Equals ``prefix_summary(*upper) - prefix_summary(*lower)``, or zero when the cuts are
        inverted. The cuts share the path down to the node where they part; from there each descends
        alone, adding the cumulative rows (:meth:`Node.rows`) of the children left of its path. The
        parts of the (at most two) leaves reached are summed together at the end, each leaf on its
        shorter side (its prefix, or the whole leaf as its parent knows it minus its suffix), so a
        leaf never seen before costs no table: O(log n + B).
        """
        root = self.root
        if root is None:
            return self.zero()
        if upper is None and lower is None:
            return list(root.summary)
        if speedups is not None:  # the same descent in one C call, summed in fixed point as it goes
            total = self._range_totals(root, lower, upper, None, False)
            if total is not None:
                return total
            # None: a sum beyond the kernel's accumulators (~2**2112 units), for the Python code below
        access, nfields = self.access, self.nfields
        node = _of_tree(access.node(root.node_id), nfields)
        plus: list[Sequence[int]] = []
        minus: list[Sequence[int]] = []
        spans: list[Span] = []
        if lower is None or upper is None:
            if upper is not None:
                self._prefix_into(node, self.zero(), root.summary, upper, plus, minus, spans, True)
            elif lower is not None:
                plus.append(root.summary)
                self._prefix_into(node, self.zero(), root.summary, lower, minus, plus, spans, False)
            return self._settle(plus, minus, spans)
        low, low_after = lower
        high, high_after = upper
        before: Sequence[int] = self.zero()
        after: Sequence[int] = root.summary
        find = _finder()
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            index = find(node, low, True) - 1
            other = find(node, high, True) - 1
            rows = node.rows()
            if index != other:
                if index > other:
                    return self.zero()
                kids = node.kids
                high_kid = access.node(kids[other])
                self._prefix_into(high_kid, rows[other], rows[other + 1], upper, plus, minus, spans, True)
                low_kid = access.node(kids[index])
                self._prefix_into(low_kid, rows[index], rows[index + 1], lower, minus, plus, spans, False)
                return self._settle(plus, minus, spans)
            before, after = rows[index], rows[index + 1]
            node = _of_tree(access.node(node.kids[index]), nfields)
        start = find(node, low, low_after)
        stop = find(node, high, high_after)
        if start >= stop:
            return self.zero()
        size = len(node.keys)
        if 2 * (stop - start) <= size:
            spans.append((node, start, stop, True, before, after))
            return self._settle([self.zero()], minus, spans)
        plus.append(after)  # the whole leaf, as its parent knows it, minus both ends
        minus.append(before)
        if start:
            spans.append((node, 0, start, False, before, after))
        if stop < size:
            spans.append((node, stop, size, False, before, after))
        return self._settle(plus, minus, spans)

    def _prefix_into(
        self,
        node: Node,
        before: Sequence[int],
        after: Sequence[int],
        cut: Cut,
        plus: list[Sequence[int]],
        minus: list[Sequence[int]],
        spans: list[Span],
        positive: bool,
    ) -> None:
        """Add what precedes ``cut`` in ``node``'s subtree to ``plus`` (rows to subtract to ``minus``).

        ``before`` and ``after`` are the summaries up to the start and the end of the subtree, in the
        caller's frame. Each level adds the cumulative row of the children left of the path; the leaf
        adds ``before`` and a span of its first entries, or, when that is shorter, ``after`` minus a
        span of its last entries (spans are recorded with their sign, ``positive`` for ``plus``).
        """
        bound, bound_after = cut
        access, nfields = self.access, self.nfields
        find = _finder()
        levels = 0
        _of_tree(node, nfields)
        while not node.leaf:
            levels = _deeper(levels, node)
            index = find(node, bound, True) - 1
            rows = node.rows()
            plus.append(before)
            before, after = rows[index], rows[index + 1]
            node = _of_tree(access.node(node.kids[index]), nfields)
        index = find(node, bound, bound_after)
        size = len(node.keys)
        if 2 * index <= size:
            plus.append(before)
            if index:
                spans.append((node, 0, index, positive, before, after))
        else:
            plus.append(after)
            if index < size:
                spans.append((node, index, size, not positive, before, after))

    def _settle(self, plus: list[Sequence[int]], minus: list[Sequence[int]], spans: list[Span]) -> list[int]:
        """``sum(plus) - sum(minus)``, plus the signed leaf spans summed together (one pass per field)."""
        if speedups is not None:  # the C twin of what follows (None: a value it leaves to this code)
            settled = speedups.settle(plus, minus, spans, self.nfields)
            if settled is not None:
                return settled
        total = plus[0]
        for row in plus[1:]:
            total = list(map(add, total, row))
        for row in minus:
            total = list(map(sub, total, row))
        total = list(total)
        if spans:
            total, spans = self._from_hot_leaves(total, spans)
        added = taken = 0
        for _, start, stop, positive, _, _ in spans:
            if positive:
                added += stop - start
            else:
                taken += stop - start
        if not added and not taken:
            return total
        total[0] += added - taken
        nfields = self.nfields
        for field in range(nfields):
            at = 1 + nfields + field  # the float count of the field: the leaves' own, from their parents
            values: list[Any] = []
            only_floats = no_floats = True
            for leaf, start, stop, positive, before, after in spans:
                column = leaf.cols[field]
                values += column[start:stop] if positive else map(neg, column[start:stop])
                floats = after[at] - before[at]
                if floats:
                    no_floats = False
                if floats != after[0] - before[0]:
                    only_floats = False
            if no_floats:
                total[1 + field] += sum(values) << SCALE_BITS
                continue
            exact = _float_sum(values) if only_floats else None
            if exact is None:
                exact, floats = column_sum(values)
                if floats != added + taken:  # a mix of ints and floats: count each side
                    floats = 0
                    for leaf, start, stop, positive, _, _ in spans:
                        found = list(map(type, leaf.cols[field][start:stop])).count(float)
                        floats += found if positive else -found
                    total[1 + field] += exact
                    total[at] += floats
                    continue
            total[1 + field] += exact
            total[at] += added - taken
        return total

    @staticmethod
    def _from_hot_leaves(total: list[int], spans: list[Span]) -> tuple[list[int], list[Span]]:
        """Add the spans of leaves with cumulative rows to ``total``; return it and the other spans."""
        rest = []
        for span in spans:
            hot = span[0].hot_rows()
            if hot is None:
                rest.append(span)
                continue
            shifts, rows = hot
            part = map(lshift, map(sub, rows[span[2]], rows[span[1]]), shifts)
            total = list(map(add if span[3] else sub, total, part))
        return total, rest

    def summary_at(self, index: int) -> list[int]:
        """Summary of the first ``index`` entries (0 <= index <= count). O(log n)."""
        totals = self.zero()
        if self.root is None or index <= 0:
            return totals
        if index >= self.count:
            return list(self.root.summary)
        access, nfields = self.access, self.nfields
        node = _of_tree(access.node(self.root.node_id), nfields)
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            counts = node.counts()
            child = _by_count(node, counts, index)
            totals = vadd(totals, node.prefixes(child))
            index -= counts[child]
            node = _of_tree(access.node(node.kids[child]), nfields)
        return vadd(totals, node.prefixes(index))

    def select(self, index: int) -> tuple[bytes, tuple[Any, ...]]:
        """The entry at ``index`` (0 <= index < count) and its values. O(log n).

        With the C kernels, a leaf that has a search image gives the entry and values from it (one
        bytes object and a few numbers made from contiguous lines), rather than from its tuples,
        whose items are out of the CPU caches in a large tree: `at` at 10^6 items 22% faster, at
        10^4 14% (in-process A/B, 13 paired rounds).
        """
        assert self.root is not None
        if not 0 <= index < self.count:  # an index from the nodes' ranks beyond the record's count
            raise CorruptDatabaseError(
                f"a root record counts {self.count} entries, fewer than its nodes hold; run "
                "`tallytree check` to locate the damage"
            )
        access = self.access
        node = access.node(self.root.node_id)
        if speedups is not None:  # the same descent, in one C call
            found, at, hits = speedups.select(node, index, access.node, access.shared, True, self.nfields)
            if hits:
                access.count_hits(hits)
            if at is None:  # the entry and its values, read from the leaf's search image
                return found  # type: ignore[no-any-return]
            node, index = found, at
        levels = 0
        _of_tree(node, self.nfields)
        while not node.leaf:
            levels = _deeper(levels, node)
            counts = node.counts()
            child = _by_count(node, counts, index)
            index -= counts[child]
            node = _of_tree(access.node(node.kids[child]), self.nfields)
        if not 0 <= index < len(node.keys):
            raise _damaged(node, "it holds fewer entries than its parent counts")
        return node.keys[index], tuple(col[index] for col in node.cols)

    def find(self, entry: bytes) -> tuple[Any, ...] | None:
        """The values of ``entry``, or None if absent. O(log n).

        With the C kernels, the descent is one call through the nodes' search images, and a leaf
        that has an image gives the values from it (see :meth:`select`): `get` at 10^6 items took
        6.3 us through :meth:`_path` (a descent in Python, each bisection comparing cold key
        objects), and takes 3.3 us.
        """
        if self.root is None:
            return None
        if speedups is not None:
            access = self.access
            found, at, hits = speedups.find(
                access.node(self.root.node_id), entry, access.node, access.shared, self.nfields
            )
            if hits:
                access.count_hits(hits)
            if at is None:  # absent (None), or the values read from the leaf's image
                return found  # type: ignore[no-any-return]
            return tuple(col[at] for col in found.cols)
        _, leaf = self._path(entry)
        index = bisect_left(leaf.keys, entry)
        if index < len(leaf.keys) and leaf.keys[index] == entry:
            return tuple(col[index] for col in leaf.cols)
        return None

    def iterate(
        self, start: int, stop: int, reverse: bool = False
    ) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
        """Yield entries with index in ``[start, stop)``, lazily; O(log n) to start, O(1) amortized each.

        Each leaf gives the entries taken from it in one piece, made for them alone
        (:meth:`Node.entry_rows`): 10 entries at 10^6 took 16.2 us, when every entry of the leaf was
        made and each row gathered by a generator, and take 7.1 us (session 29).
        """
        remaining = stop - start
        if self.root is None or remaining <= 0:
            return
        access, nfields = self.access, self.nfields
        stack: Path = []
        node = _of_tree(access.node(self.root.node_id), nfields)
        index = stop - 1 if reverse else start
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            counts = node.counts()
            child = _by_count(node, counts, index)
            index -= counts[child]
            stack.append((node, child))
            node = _of_tree(access.node(node.kids[child]), nfields)
        step = -1 if reverse else 1
        while True:
            # the leaf's entries this iteration takes, made for them alone (a cached compact leaf
            # stays compact), then handed out as they are
            size = node.size()
            if reverse:
                low, high = max(0, index - remaining + 1), min(index + 1, size)
            else:
                low, high = max(0, index), min(size, index + remaining)
            if low < high:
                keys, rows = node.entry_rows(low, high)
                if reverse:
                    yield from zip(reversed(keys), reversed(rows), strict=True)
                else:
                    yield from zip(keys, rows, strict=True)
                remaining -= high - low
                if remaining <= 0:
                    return
            while stack:  # climb to the next subtree, then descend to its first (last) leaf
                parent, child = stack.pop()
                child += step
                if 0 <= child < len(parent.kids):
                    stack.append((parent, child))
                    node = _of_tree(access.node(parent.kids[child]), nfields)
                    while not node.leaf:
                        _deeper(len(stack), node)
                        child = len(node.kids) - 1 if reverse else 0
                        stack.append((node, child))
                        node = _of_tree(access.node(node.kids[child]), nfields)
                    index = node.size() - 1 if reverse else 0
                    break
            else:
                return

    # ----------------------------------------------------------------- writes

    def insert(
        self, entry: bytes, values: tuple[Any, ...], delta: list[int] | None = None, *, inside: bool = False
    ) -> bool | None:
        """Insert ``entry`` with ``values``; return False (changing nothing) if it exists. O(log n).

        With ``inside=True`` only an entry inside the tree's range is inserted: for one after every
        entry (or into an empty tree) the call changes nothing and returns None, found on the same
        descent (``Tree.insert`` keeps such entries in its pending node).
        """
        if delta is None:
            delta = delta_of(values)
        if self.root is None:
            if inside:
                return None
            access = self.access
            cols = [[value] for value in values]
            leaf = access.adopt(Node(access.new_id(), True, [entry], cols, dirty=True))
            self.root = Root(leaf.id, 1, list(delta))
            return True
        if speedups is not None and self.root.height > 1:
            done = self._insert_stored(entry, values, delta, inside)
            if done is not _DECODED:
                return done
        path, leaf = self._path(entry)
        index, present = _locate(leaf, entry)
        if present:
            return False
        if inside and _rightmost(path) and entry > leaf.keys[-1]:
            return None
        path, leaf = self._make_mutable(path, leaf)
        leaf.keys.insert(index, entry)
        for col, value in zip(leaf.cols, values, strict=True):
            col.insert(index, value)
        self._add_along(path, delta)
        if len(leaf.keys) > self.max_size:
            self._split_up(path, leaf)
        return True

    def _insert_stored(
        self, entry: bytes, values: tuple[Any, ...], delta: list[int], inside: bool
    ) -> bool | Literal[_Path.DECODED] | None:
        """:meth:`insert` written from stored bytes, when it can be: the leaf merged with the entry in
        its stored bytes (``merge_children``, as a batch merges it) and each internal node of the
        path rebuilt in committed form (:meth:`_write_stored`); all of it in one call
        (``insert_stored``) in a transaction that has changed no node yet. Returns what
        :meth:`insert` returns, or ``_DECODED``, having changed nothing, for an insert it leaves to
        the decoded path: a path the transaction changed already (a dirty node), a leaf that would
        split, an entry that may belong after the last leaf (the right edge, where the pending node
        may take it), a leaf the kernel leaves to Python, damage.

        This is the path of a scattered insert into a committed tree, one per transaction. The
        decoded path copies each node into lists, changes the copies, and encodes and freezes them
        at commit, after decoding the leaf if it was not cached. The new leaf is not decoded: it
        enters the node cache when a read decodes it. O(B log_B n).
        """
        assert speedups is not None and self.root is not None
        root = self.root
        # the whole write in one call, in a transaction that has changed no node yet
        written = speedups.insert_stored(
            root.node_id, entry, root.height, inside, values, self.max_size, delta, self.access.write_kit()
        )
        if type(written) is int:
            root.node_id = written
            root.summary = vadd(root.summary, delta)
            return True
        if written is not NotImplemented:  # False (there already), or None: the decoded path's
            return False if written is False else _DECODED
        found = self._stored_path(entry)
        if found is None:
            return _DECODED
        path, last, ids = found
        if inside and last:
            return _DECODED
        parent, index = path[-1]
        max_size = self.max_size
        rows = speedups.merge_children(
            # the child alone (its fence, its id): a patched parent's kids are not made for it
            (parent.keys[index],),
            (ids[-1],),
            [entry],
            0,
            1,
            [[value] for value in values],
            max_size,
            # the size of the pieces of a leaf that overflows: a split is left to the decoded path
            # below, so any size does (the merge finds a duplicate before it cuts anything), and
            # max_size saves the computation of _fill_target
            max_size,
            self.access.stored_source(),
        )
        if len(rows) != 1:
            return _DECODED
        merged = rows[0][4]
        if type(merged) is int:
            return False  # the entry is there already
        if type(merged) is not bytes:  # the leaf splits, or is one this kernel leaves to Python
            return _DECODED
        self._write_stored(path, ids, merged, delta)
        return True

    def _edit_stored(
        self, entry: bytes, values: tuple[Any, ...] | None
    ) -> tuple[Any, ...] | Literal[_Path.DECODED] | None:
        """:meth:`delete` (``values`` None) or :meth:`update` written from stored bytes, as
        :meth:`_insert_stored` writes an insert: the entry removed from its leaf's stored bytes, or
        given its new values there (the kernel ``leaf_edit``), and the path rebuilt in committed form.
        Returns the entry's old values, None (changing nothing) when it is absent, or ``_DECODED``,
        having changed nothing, for a change left to the decoded path: a path the transaction
        changed already, a delete that leaves the leaf underfull (the decoded path merges or borrows),
        a leaf the kernel leaves to Python, damage. An update to equal values writes nothing.

        A leaderboard's score change (a delete and an insert) and a status change (an item moved to
        another key) are such writes of scattered items. O(B log_B n).
        """
        assert speedups is not None
        found = self._stored_path(entry)
        if found is None:
            return _DECODED
        path, _, ids = found
        data = self.access.stored(ids[-1])
        if data is None:  # a leaf this transaction changed: its lists
            return _DECODED
        if values is not None and type(values) is not tuple:
            values = tuple(values)
        edited = speedups.leaf_edit(data, entry, values, self.nfields)
        if edited is None:  # not in its leaf
            return None
        if type(edited) is not tuple:  # False: a leaf or value the kernel leaves to Python
            return _DECODED
        changed, old, count = edited
        if values is None:
            if count < self.min_size:
                return _DECODED
            delta = _negate(delta_of(old))
        elif same_values(old, values):
            return old
        else:
            delta = vsub(delta_of(values), delta_of(old))
        self._write_stored(path, ids, changed, delta)
        return old

    def _stored_path(self, entry: bytes) -> tuple[Path, bool, list[int]] | None:
        """The internal nodes of the path to ``entry``'s leaf, each with the index of the child taken,
        whether the path is the right edge, and the ids of the path's nodes followed by the leaf's;
        None when a write from stored bytes cannot take it:
        a tree of one leaf, or a node of the path that this transaction changed (a dirty one, whose
        lists the decoded path changes) or that holds no stored bytes. O(log n)."""
        root = self.root
        assert root is not None
        height = root.height
        if height < 2:
            return None
        access = self.access
        if speedups is not None:  # the same descent in one call
            found = speedups.stored_path(
                access.node(root.node_id), entry, height, access.node, access.shared, Node, _PatchedNode
            )
            if found is None:
                return None
            path, last, hits, ids = found
            if hits:
                access.count_hits(hits)
            return path, last, ids
        path = []
        node = access.node(root.node_id)
        last = True  # on the right edge so far
        for level in range(height - 1):
            if node.dirty or node.leaf or node._packed is None:
                return None
            keys = node.keys
            index = bisect_right(keys, entry) - 1
            last = last and index == len(keys) - 1
            path.append((node, index))
            if level < height - 2:
                node = access.node(node.kid(index))
        return path, last, [each.id for each, _ in path] + [node.kid(index)]

    def _write_stored(self, path: Path, ids: list[int], leaf: bytes, delta: list[int]) -> None:
        """Write a changed leaf given as its stored bytes, in place of the leaf ``path`` leads to (``ids``:
        the ids of the path's nodes, then the leaf's, as :meth:`_stored_path` gives them), and each
        internal node of the path rebuilt in committed form by ``Node.bumped`` (new child id, summary
        grown by ``delta``), all handed to the transaction ready to write (``adopt_path``,
        ``adopt_prepared``); nothing is copied into lists, encoded or frozen at commit. O(B log_B n)."""
        assert self.root is not None and speedups is not None
        access = self.access
        ids = access.renew_all(ids)
        child = ids.pop()
        # the C kernel bumps each level it can, from the bottom up; a level it leaves (a column to
        # rescale, say) and those above it are bumped here
        made = speedups.bump_path(path, ids, child, delta, Node, _PatchedNode)
        access.adopt_path(child, leaf, made)
        if made:
            child = made[-1].id
        for level in range(len(path) - len(made) - 1, -1, -1):
            node, index = path[level]
            bumped = node.bumped(ids[level], index, child, delta)
            access.adopt_prepared(bumped, bumped.packed())
            child = bumped.id
        self.root.node_id = child
        self.root.summary = vadd(self.root.summary, delta)

    def append_leaf(self, keys: list[bytes], cols: list[list[Any]], summary: list[int]) -> bool:
        """Add entries that sort after every entry of the tree (ascending, ``summary`` theirs) as a
        new last leaf, leaving the leaves before it as they are; False, changing nothing, when they
        are too few or too many for a leaf, or the tree is one leaf too small to stop being the root.
        O(log n).

        This is what a full pending node becomes (``Tree.flush``): one new leaf, and the right edge
        of internal nodes given one more child, where a merge would also rewrite the last leaf
        (and plan the run and cut it): a time-ordered commit that fills the pending node took 450
        us in a loop at 10^6 events, one in 64 commits and a quarter of their time; 300 us now.
        """
        if not self.min_size <= len(keys) <= self.max_size:
            return False
        access = self.access
        root = self.root
        if root is None:
            leaf = access.adopt(Node(access.new_id(), True, keys, cols, dirty=True))
            self.root = Root(leaf.id, 1, list(summary))
            return True
        path: Path = []
        node = access.node(root.node_id)
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            path.append((node, len(node.kids) - 1))
            node = access.node(node.kids[-1])
        if levels != root.height - 1:  # (a damaged height would grow a tree of leaves at two depths)
            raise _wrong_depth(node, levels, root.height)
        if not path and node.size() < self.min_size:
            return False
        leaf = access.adopt(Node(access.new_id(), True, keys, cols, dirty=True))
        if not path:  # the root is a leaf: a new root over it and the new leaf
            top = Node.internal_from(
                access.new_id(), [b"", keys[0]], [root.node_id, leaf.id], [root.summary, summary]
            )
            root.node_id = access.adopt(top).id
            root.height += 1
            root.summary = vadd(root.summary, summary)
            return True
        path = self._mutable_path(path)
        parent, _ = path.pop()
        parent.insert_child(len(parent.kids), keys[0], leaf.id, summary)
        self._add_along(path, summary)
        if len(parent.keys) > self.max_size:
            self._split_up(path, parent)
        return True

    def insert_sorted_run(self, entries: list[bytes], values: list[tuple[Any, ...]]) -> int:
        """Insert many new entries given in strictly ascending order; return how many were inserted.

        Entries already present are skipped. The values are turned into columns and merged as
        :meth:`merge_sorted` does. O(t log B + m) for ``m`` entries landing in ``t`` leaves.
        """
        if not entries:
            return 0
        cols = [list(col) for col in zip(*values, strict=True)] if self.nfields else []
        return self.merge_sorted(entries, cols)[0]

    def merge_sorted(
        self, entries: list[bytes], cols: list[list[Any]], existing: Existing = "skip"
    ) -> tuple[int, int | None]:
        """Merge entries given in strictly ascending order, their values as columns, into the tree.

        ``existing`` says what happens to an entry already in the tree: ``"skip"`` keeps the stored
        one, ``"update"`` overwrites its values (an entry whose values are equal, types included, is
        neither written nor counted), ``"error"`` changes nothing at all. Returns ``(changed,
        conflict)``: how many entries were inserted or updated, and with ``"error"`` the index of the
        first entry already present (None if there is none).

        Two passes. The *plan* only reads: it splits the entries among the children of each node it
        visits (two bisections per touched child), so every touched node is read once, and finds for
        each touched leaf where its entries go and which already exist. The *apply* pass then writes
        bottom-up, right to left (a split puts siblings right of the child it splits, so the
        children still to visit keep their index): each touched leaf is copied once and merged with
        its new entries, each touched child's summary in its parent gets one delta, and an overfull
        node is cut once into as many pieces as needed. Deltas come from running sums over the batch
        (:class:`_Run`), so a subtree's delta costs O(fields) whatever the number of its new
        entries. A run past the last entry (time-ordered appends) lands in the rightmost leaf and is
        cut there into whole new leaves, and their parent is cut once: a bulk build of the new part.

        O(t log B + m) work for ``m`` entries landing in ``t`` leaves, and O(t log_B n + m / B)
        nodes written.
        """
        if not entries:
            return 0, None
        run = _Run(entries, cols, existing)
        run.stored = speedups is not None
        access = self.access
        if self.root is None:
            leaf = access.adopt(Node(access.new_id(), True, [], [[] for _ in cols], dirty=True))
            self.root = Root(leaf.id, 1, self.zero())
        root = self.root
        try:
            plan = self._plan(access.node(root.node_id), root.height, 0, len(entries), run)
        except _Conflict as conflict:
            return 0, conflict.index
        if plan is None:
            return 0, None
        node = access.mutable(plan.node)
        root.node_id = node.id
        if root.height == 1:
            self._apply_leaf(node, plan, run)
        else:
            self._apply(node, plan, root.height - 1, run)
        root.summary = vadd(root.summary, run.delta(0, len(entries), plan.correction))
        if len(node.keys) > self.max_size:
            self._grow_root(node)
        return run.changed, None

    def first_existing(self, entries: list[bytes], cols: list[list[Any]]) -> int | None:
        """The index of the first of ``entries`` (strictly ascending) already in the tree, or None.

        The read-only plan of :meth:`merge_sorted` with ``existing="error"``. O(t log B + m).
        """
        if self.root is None or not entries:
            return None
        run = _Run(entries, cols, "error")
        run.stored = speedups is not None  # as merge_sorted: search leaves in their stored bytes
        try:
            self._plan(self.access.node(self.root.node_id), self.root.height, 0, len(entries), run)
        except _Conflict as conflict:
            return conflict.index
        return None

    def _plan(self, node: Node, height: int, lo: int, hi: int, run: _Run) -> _Step | None:
        """What merging ``run.entries[lo:hi]`` changes below ``node`` (None: nothing). Reads only."""
        if node.leaf != (height == 1):  # a damaged height or child ids: a node at another level
            raise _misplaced(node, height)
        if height == 1:
            return self._plan_leaf(node, lo, hi, run)
        if height == 2 and run.stored:
            return self._plan_stored(node, lo, hi, run)
        access = self.access
        steps: list[_Step] = []
        correction: list[int] | None = None
        for child, at, stop in _spans(node, run.entries, lo, hi):
            step = self._plan(access.node(node.kids[child]), height - 1, at, stop, run)
            correction = _collect(steps, step, child, at, stop, run, correction)
        if not steps:
            return None
        step = _Step(node, lo, hi, correction)
        step.kids = steps
        return step

    def _plan_stored(self, node: Node, lo: int, hi: int, run: _Run) -> _Step | None:
        """:meth:`_plan` for a node whose children are leaves, each touched leaf merged in its stored
        bytes if it can be (the C kernel ``merge_children``): the merged leaf, or its pieces if it
        overflows, ready to write, without decoding the leaf. A leaf changed in this transaction and
        one that holds an entry already (for ``existing="error"``, a conflict, raised in order) are
        left to :meth:`_plan_leaf`. O(B + slice) per touched leaf.
        """
        assert speedups is not None  # run.stored is only set with the kernels built
        access = self.access
        steps: list[_Step] = []
        merged: list[_Merged] = []
        correction: list[int] | None = None
        splits: list[_Merged] = []
        for row in speedups.merge_children(
            node.keys,
            node.kids,
            run.entries,
            lo,
            hi,
            run.cols,
            self.max_size,
            self._fill_target(),
            access.stored_source(),
        ):
            child, start, stop, kid, data = row
            if type(data) is bytes:
                merged.append(row)
            elif type(data) is list:
                splits.append(row)
            elif data is not None and run.existing == "error":
                raise _Conflict(data)
            else:  # left to the decoded path (which checks that the child is a leaf)
                step = self._plan(access.node(kid), 1, start, stop, run)
                correction = _collect(steps, step, child, start, stop, run, correction)
                continue
            run.changed += stop - start
        if not steps and not merged and not splits:
            return None
        step = _Step(node, lo, hi, correction)
        step.kids = steps
        step.merged = merged
        step.splits = splits
        return step

    def _plan_leaf(self, leaf: Node, lo: int, hi: int, run: _Run) -> _Step | None:
        entries = run.entries
        keys = leaf.keys
        if not keys or entries[lo] > keys[-1]:  # all after the last entry: append them
            run.changed += hi - lo
            return _Step(leaf, lo, hi, None)
        batch = entries[lo:hi]
        places = list(map(bisect_left, repeat(keys), batch))
        step = _Step(leaf, lo, hi, None)
        if places == list(map(bisect_right, repeat(keys), batch)):  # none of them is there yet
            run.changed += hi - lo
            step.fresh, step.places = range(lo, hi), places
            return step
        fresh: list[int] = []
        fresh_places: list[int] = []
        correction: list[int] | None = None
        size = len(keys)
        for index, at in zip(range(lo, hi), places, strict=True):
            if at == size or keys[at] != entries[index]:
                fresh.append(index)
                fresh_places.append(at)
                continue
            if run.existing == "error":
                raise _Conflict(index)
            new = run.values(index)
            if run.existing == "skip":
                gone = delta_of(new)  # its share of the run's sums, which does not arrive
            else:
                old = tuple(col[at] for col in leaf.cols)
                gone = delta_of(old)  # replaced by the new values, counted in the run's sums
                if not same_values(old, new):
                    step.updates.append((index, at))
            correction = gone if correction is None else vadd(correction, gone)
        if not fresh and not step.updates:
            return None
        run.changed += len(fresh) + len(step.updates)
        step.fresh, step.places, step.correction = fresh, fresh_places, correction
        return step

    def _apply(self, parent: Node, plan: _Step, height: int, run: _Run) -> None:
        """Carry out the steps planned below a mutable ``parent`` whose children have height ``height``."""
        access = self.access
        if plan.merged:  # first, while no split has moved a child
            self._apply_merged(parent, plan.merged, run)
        splits = plan.splits  # leaves cut in their stored bytes, right to left among the steps
        for step in reversed(plan.kids):  # right to left: splits shift only the children already done
            while splits and splits[-1][0] > step.child:
                self._apply_split(parent, splits.pop(), run)
            kid = access.mutable(step.node)
            parent.kids[step.child] = kid.id
            if height == 1:
                self._apply_leaf(kid, step, run)
            else:
                self._apply(kid, step, height - 1, run)
            parent.add(step.child, run.delta(step.lo, step.hi, step.correction))
            if len(kid.keys) > self.max_size:
                self._split_child(parent, step.child, kid)
        while splits:
            self._apply_split(parent, splits.pop(), run)

    def _apply_split(self, parent: Node, row: _Merged, run: _Run) -> None:
        """A leaf merged in its stored bytes and cut into pieces: the first piece takes its place in
        ``parent``, the others follow it, each with the summary the kernel summed. O(B)."""
        child, lo, hi, kid, pieces = row
        first, *rest = pieces
        ids = self.access.replace_stored([kid], [first, *(piece[1] for piece in rest)])
        parent.kids[child] = ids[0]
        summaries = [piece[2] for piece in rest]
        parent.add(child, vsub(run.delta(lo, hi), reduce(vadd, summaries)))
        self._insert_siblings(parent, child, [piece[0] for piece in rest], ids[1:], summaries)

    def _apply_merged(self, parent: Node, merged: list[_Merged], run: _Run) -> None:
        """Write leaves merged in their stored bytes under fresh ids and give ``parent`` their deltas
        (none of them splits): one C call (``add_spans``), or column by column when a column must be
        rescaled first. O(fields * len(merged))."""
        children = list(map(itemgetter(0), merged))
        ids = self.access.replace_stored(list(map(itemgetter(3), merged)), list(map(itemgetter(4), merged)))
        kids = parent.kids
        for child, kid in zip(children, ids, strict=True):
            kids[child] = kid
        if speedups is not None and speedups.add_spans(parent, merged, run.prefix_sums()):
            return
        parent.add_columns(children, run.deltas([(row[1], row[2]) for row in merged]))

    @staticmethod
    def _apply_leaf(leaf: Node, step: _Step, run: _Run) -> None:
        keys, cols, lo, hi = leaf.keys, leaf.cols, step.lo, step.hi
        for index, at in step.updates:
            for col, values in zip(cols, run.cols, strict=True):
                col[at] = values[index]
        fresh = step.fresh
        entries = run.entries
        if fresh is None:
            keys.extend(entries[lo:hi])
            for col, values in zip(cols, run.cols, strict=True):
                col.extend(values[lo:hi])
        elif len(fresh) <= _INSERT_EACH:
            places = step.places
            for back in range(len(fresh) - 1, -1, -1):  # from the right: the places left stay valid
                at, index = places[back], fresh[back]
                keys.insert(at, entries[index])
                for col, values in zip(cols, run.cols, strict=True):
                    col.insert(at, values[index])
        else:  # many: one C-level merge of two sorted runs, the columns following the keys
            merged = keys + list(map(entries.__getitem__, fresh))
            order = sorted(range(len(merged)), key=merged.__getitem__)
            leaf.keys = list(map(merged.__getitem__, order))
            leaf.cols = [
                list(map((col + list(map(values.__getitem__, fresh))).__getitem__, order))
                for col, values in zip(cols, run.cols, strict=True)
            ]

    def delete(self, entry: bytes) -> tuple[Any, ...] | None:
        """Remove ``entry``; return its values, or None (changing nothing) if absent. O(log n)."""
        if self.root is None:
            return None
        if speedups is not None and self.root.height > 1:
            done = self._edit_stored(entry, None)
            if done is not _DECODED:
                return done
        path, leaf = self._path(entry)
        index, present = _locate(leaf, entry)
        if not present:
            return None
        path, leaf = self._make_mutable(path, leaf)
        del leaf.keys[index]
        values = tuple(col.pop(index) for col in leaf.cols)
        self._add_along(path, _negate(delta_of(values)))
        self._rebalance_up(path, leaf)
        return values

    def update(self, entry: bytes, values: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Overwrite the values of an existing entry; return the old values (None if absent).

        Writes nothing when the values are unchanged (same type and value). O(log n).
        """
        if self.root is None:
            return None
        if speedups is not None and self.root.height > 1:
            done = self._edit_stored(entry, values)
            if done is not _DECODED:
                return done
        path, leaf = self._path(entry)
        index, present = _locate(leaf, entry)
        if not present:
            return None
        old = tuple(col[index] for col in leaf.cols)
        if same_values(old, values):
            return old
        path, leaf = self._make_mutable(path, leaf)
        for col, value in zip(leaf.cols, values, strict=True):
            col[index] = value
        self._add_along(path, vsub(delta_of(values), delta_of(old)))
        return old

    def delete_range(self, start: int, stop: int) -> list[int]:
        """Remove the entries with index in ``[start, stop)``; return their summary.

        Whole subtrees inside the range are dropped by id without reading their leaves.
        O(log n + nodes removed).
        """
        start, stop = max(start, 0), min(stop, self.count)
        if self.root is None or start >= stop:
            return self.zero()
        root = self.root
        if start == 0 and stop == root.summary[0]:
            removed = list(root.summary)
            self._leftmost_leaf(root)  # (the subtrees are freed by height, their leaves unread)
            self._free_subtree(root.node_id, root.height)
            self.root = None
            return removed
        node = self.access.mutable(self.access.node(root.node_id))
        root.node_id = node.id
        removed = self._remove_range(node, start, stop)
        root.summary = vsub(root.summary, removed)
        self._repair_after_range(start)
        return removed

    def find_sorted(self, entries: list[bytes]) -> tuple[list[tuple[Any, ...] | None], Edits]:
        """The values of each of ``entries`` (strictly ascending; None for one not in the tree), and
        what removing those found does to each leaf that holds some: the leaf's stored bytes without
        them and their summary, by the leaf's id, for :meth:`remove_sorted`.

        One pass down the tree for the batch, each touched node read once, and with the C kernels
        each touched leaf searched in its stored bytes (``leaf_edit``, which removes the entry it
        finds from a copy), so the removal that follows is already made; a leaf this transaction
        changed, or one the kernels leave to Python, is searched decoded (no edit). A lookup per
        entry (``find``) goes through the node cache once per level: 50,000 of them took a third of
        a batch removal. O(t log B + m) for ``m`` entries in ``t`` leaves.
        """
        found: list[tuple[Any, ...] | None] = [None] * len(entries)
        edits: Edits = {}
        if self.root is not None and entries:
            self._find_below(
                self.access.node(self.root.node_id), self.root.height, entries, 0, len(entries), found, edits
            )
        return found, edits

    def _find_below(
        self,
        node: Node,
        height: int,
        entries: list[bytes],
        lo: int,
        hi: int,
        found: list[tuple[Any, ...] | None],
        edits: Edits,
    ) -> None:
        if node.leaf != (height == 1):
            raise _misplaced(node, height)
        keys = node.keys
        if height == 1:
            at = 0
            for index in range(lo, hi):
                at = bisect_left(keys, entries[index], at)
                if at < len(keys) and keys[at] == entries[index]:
                    found[index] = tuple(col[at] for col in node.cols)
            return
        access = self.access
        for child, at, stop in _spans(node, entries, lo, hi):
            kid = node.kids[child]
            if height > 2 or not self._find_stored(kid, entries, at, stop, found, edits):
                self._find_below(access.node(kid), height - 1, entries, at, stop, found, edits)

    def _find_stored(
        self,
        kid: int,
        entries: list[bytes],
        lo: int,
        hi: int,
        found: list[tuple[Any, ...] | None],
        edits: Edits,
    ) -> bool:
        """:meth:`_find_below` for leaf ``kid`` in its stored bytes; False, finding nothing, when the
        decoded leaf must be searched instead. O(B) per entry."""
        if speedups is None:
            return False
        data = self.access.stored(kid)
        if data is None:  # a leaf this transaction changed: its lists
            return False
        nfields = self.nfields
        removed: list[tuple[Any, ...]] = []
        for index in range(lo, hi):
            edited = speedups.leaf_edit(data, entries[index], None, nfields)
            if edited is None:  # not there
                continue
            if type(edited) is not tuple:  # a leaf or value the kernel leaves to Python
                found[lo:hi] = [None] * (hi - lo)
                return False
            data, old, _ = edited
            found[index] = old
            removed.append(old)
        if removed:
            columns = [list(col) for col in zip(*removed, strict=True)] if nfields else []
            edits[kid] = (data, summarize(len(removed), columns))
        return True

    def remove_sorted(self, entries: list[bytes], edits: Edits | None = None) -> list[int]:
        """Remove entries given in strictly ascending order, each of them in the tree (the caller
        found them, with :meth:`find_sorted`, whose ``edits`` this takes); return their summary.

        One pass down the tree for the whole batch, as :meth:`merge_sorted` goes: the entries are
        split among the children of each node (two bisections per touched child), each touched leaf
        is copied once and loses its entries in one pass, each touched child's summary in its parent
        gets one delta, and a subtree that loses every entry is dropped by id without reading its
        leaves. Then, bottom-up, each touched child left underfull is merged with a sibling or
        borrows from it (:meth:`_fix_child`), so every node but the root keeps at least ``min_size``
        entries. Removing the items one by one copies and rebalances a path per item: 5,000
        scattered items of 10^6 took 43.6 us each that way (see ``Aggregate.delete_many``).

        O(t log B + m) work for ``m`` entries in ``t`` leaves, and O(t log_B n) nodes written.
        """
        root = self.root
        if root is None or not entries:
            return self.zero()
        if len(entries) >= root.summary[0]:  # every entry (the caller found each): the whole tree
            removed = list(root.summary)
            self._leftmost_leaf(root)  # (checks the height the subtrees are freed by)
            self._free_subtree(root.node_id, root.height)
            self.root = None
            return removed
        access = self.access
        node = access.mutable(access.node(root.node_id))
        root.node_id = node.id
        if root.height == 1:
            removed = self._remove_from_leaf(node, entries, 0, len(entries))
        else:
            removed = self._remove_below(node, root.height, entries, 0, len(entries), edits or {})
        root.summary = vsub(root.summary, removed)
        self._shrink_root()
        return removed

    def _remove_below(
        self, node: Node, height: int, entries: list[bytes], lo: int, hi: int, edits: Edits
    ) -> list[int]:
        """Remove ``entries[lo:hi]`` (all present, none the whole subtree) below a mutable internal
        ``node`` heading a subtree of height ``height``; return their summary. Touched children left
        underfull are fixed before returning; ``node`` itself may be left underfull (its parent
        fixes it, or it is the root)."""
        if node.leaf:
            raise _misplaced(node, height)
        access = self.access
        removed = self.zero()
        touched: list[int] = []  # children changed (kept), by their index before any is dropped
        parts: list[list[int]] = []  # what each of them lost
        dropped: list[int] = []  # children whose every entry goes
        counts, shift = node.cols[0], node.shifts[0]
        for child, at, stop in _spans(node, entries, lo, hi):
            if stop - at >= counts[child] << shift:
                self._free_subtree(node.kids[child], height - 1)
                dropped.append(child)
                part = node.child(child)
            else:
                edited = self._remove_stored(node, child, entries, at, stop, edits) if height == 2 else None
                if edited is not None:
                    part = edited
                else:
                    kid = access.mutable(access.node(node.kids[child]))
                    node.kids[child] = kid.id
                    if height == 2:
                        part = self._remove_from_leaf(kid, entries, at, stop)
                    else:
                        part = self._remove_below(kid, height - 1, entries, at, stop, edits)
                touched.append(child)
                parts.append(_negate(part))
            removed = vadd(removed, part)
        if touched:  # one rescale per column for all of them
            node.add_columns(touched, [list(column) for column in zip(*parts, strict=True)])
        if dropped:
            fence = node.keys[0]
            for index in reversed(dropped):
                node.remove_child(index)
            if dropped[0] == 0:  # the child now first must start at this node's own fence
                self._set_fence(node, fence, height)
            touched = [index - bisect_left(dropped, index) for index in touched]
        self._refill(node, height, touched)
        return removed

    def _refill(self, node: Node, height: int, indexes: list[int] | None = None) -> None:
        """Merge or refill the underfull children of a mutable internal ``node`` (heading a subtree of
        height ``height``) among ``indexes`` (ascending; all children when None), right to left: a
        fix changes only the child and the one before it (after it for the first).

        A child left with one child of its own (the others dropped) cannot fix that one, which may be
        underfull: once this node merges or refills such a child, the child's new siblings are
        there, so after each fix among internal children the children of the nodes it changed are
        refilled too, which can leave those nodes underfull in turn: they are checked again. O(B) per
        node changed, reading no leaf (a leaf's size is its count here)."""
        access = self.access
        kids = node.kids
        queue = list(indexes) if indexes is not None else list(range(len(kids)))
        for _ in range(4 * len(queue) + 4 * self.max_size + 8):  # a bug raises rather than loops
            if not queue:
                return
            index = queue.pop()
            if index >= len(kids) or len(kids) < 2:
                continue
            size = node.child(index)[0] if height == 2 else len(access.node(kids[index]).keys)
            if size >= self.min_size:
                continue
            before = len(kids)
            self._fix_child(node, index)
            if height > 2:
                first = max(index - 1, 0)
                changed = range(first, first + (1 if len(kids) < before else 2))
                for near in changed:
                    kid = access.mutable(access.node(kids[near]))  # (made mutable by the fix)
                    kids[near] = kid.id
                    self._refill(kid, height - 1)
                queue.extend(changed)  # refilled, they may have shrunk below the minimum
        if queue:
            raise AssertionError("tallytree bug: refilling the tree after delete_many did not end")

    def _remove_stored(
        self, parent: Node, child: int, entries: list[bytes], lo: int, hi: int, edits: Edits
    ) -> list[int] | None:
        """Remove ``entries[lo:hi]`` (all present, not all of the leaf) from leaf ``child`` of a mutable
        ``parent`` in the leaf's stored bytes (the C kernel ``leaf_edit``, as a single delete goes),
        written under a fresh id; return their summary. None, changing nothing, without the kernels
        or for a leaf they leave to the decoded path (one this transaction changed, or values they
        do not take): the leaf is then not decoded, copied and encoded again for a few removals,
        and only a leaf left underfull is decoded (by :meth:`_refill`). O(B) per entry."""
        made = edits.pop(parent.kids[child], None)  # the lookup made it already
        if made is not None:
            (parent.kids[child],) = self.access.replace_stored([parent.kids[child]], [made[0]])
            return made[1]
        if speedups is None:
            return None
        data = self.access.stored(parent.kids[child])
        if data is None:
            return None
        nfields = self.nfields
        removed: list[tuple[Any, ...]] = []
        for index in range(lo, hi):
            edited = speedups.leaf_edit(data, entries[index], None, nfields)
            if type(edited) is not tuple:  # None (not there: the decoded path reports it) or False
                return None
            data, old, _ = edited
            removed.append(old)
        (parent.kids[child],) = self.access.replace_stored([parent.kids[child]], [data])
        return summarize(len(removed), [list(col) for col in zip(*removed, strict=True)] if nfields else [])

    def _remove_from_leaf(self, leaf: Node, entries: list[bytes], lo: int, hi: int) -> list[int]:
        """Remove ``entries[lo:hi]`` (all present) from a mutable leaf; return their summary. O(B)."""
        if not leaf.leaf:
            raise _misplaced(leaf, 1)
        keys, cols = leaf.keys, leaf.cols
        places: list[int] = []
        at = 0
        for index in range(lo, hi):
            at = bisect_left(keys, entries[index], at)
            if at == len(keys) or keys[at] != entries[index]:
                raise _damaged(leaf, "an entry its parent leads to is not in it")
            places.append(at)
        removed = summarize(len(places), [[col[at] for at in places] for col in cols])
        if len(places) <= _INSERT_EACH:
            for at in reversed(places):
                del keys[at]
                for col in cols:
                    del col[at]
        else:
            gone = set(places)
            kept = [at for at in range(len(keys)) if at not in gone]
            leaf.keys = list(map(keys.__getitem__, kept))
            leaf.cols = [list(map(col.__getitem__, kept)) for col in cols]
        return removed

    # ----------------------------------------------------------------- internals

    def _path(self, entry: bytes) -> tuple[Path, Node]:
        assert self.root is not None
        access, nfields = self.access, self.nfields
        path: Path = []
        node = _of_tree(access.node(self.root.node_id), nfields)
        levels = 0
        while not node.leaf:  # no search images: a write replaces these nodes, and their images would go
            levels = _deeper(levels, node)
            index = bisect_right(node.keys, entry) - 1
            path.append((node, index))
            node = _of_tree(access.node(node.kids[index]), nfields)
        if levels != self.root.height - 1:  # the writes' splits and merges go by the height
            raise _wrong_depth(node, levels, self.root.height)
        return path, node

    def _leftmost_leaf(self, root: Root) -> Node:
        """The first leaf, found down the left edge; CorruptDatabaseError unless it lies at the depth
        the root record's height gives. O(height)."""
        access = self.access
        node = access.node(root.node_id)
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            node = access.node(node.kids[0])
        if levels != root.height - 1:
            raise _wrong_depth(node, levels, root.height)
        return node

    def _make_mutable(self, path: Path, leaf: Node) -> tuple[Path, Node]:
        assert self.root is not None
        result = self._mutable_path(path)
        changed = self.access.mutable(leaf)
        if result:
            parent, index = result[-1]
            parent.kids[index] = changed.id
        else:
            self.root.node_id = changed.id
        return result, changed

    def _mutable_path(self, path: Path) -> Path:
        """The internal nodes of a path made mutable, each linked from its (mutable) parent."""
        assert self.root is not None
        access = self.access
        result: Path = []
        for node, index in path:
            changed = access.mutable(node)
            if result:
                parent, parent_index = result[-1]
                parent.kids[parent_index] = changed.id
            else:
                self.root.node_id = changed.id
            result.append((changed, index))
        return result

    def _add_along(self, path: Path, delta: list[int]) -> None:
        assert self.root is not None
        for node, index in path:
            node.add(index, delta)
        self.root.summary = vadd(self.root.summary, delta)

    def _split_up(self, path: Path, node: Node) -> None:
        """Split an overfull node into as many pieces as needed, then its parent, up to the root."""
        while len(node.keys) > self.max_size:
            if not path:
                self._grow_root(node)
                return
            parent, index = path.pop()
            self._split_child(parent, index, node)
            node = parent

    def _cut(self, node: Node) -> list[Node]:
        """Cut an overfull mutable node into even pieces of at most the fill target.

        The node keeps the first piece; the others become new nodes, returned in order. O(size).
        """
        access = self.access
        size = len(node.keys)
        pieces = -(-size // self._fill_target())
        cuts = [size * piece // pieces for piece in range(pieces + 1)]
        chunks = [node.detach(begin) for begin in reversed(cuts[1:-1])]  # from the end: O(size)
        chunks.reverse()
        return [access.adopt(Node.from_chunk(access.new_id(), node.leaf, chunk)) for chunk in chunks]

    def _split_child(self, parent: Node, index: int, node: Node) -> None:
        """Cut the overfull child ``index`` (``node``) of a mutable parent; the new pieces follow it."""
        siblings = self._cut(node)
        summaries = [sibling.summary() for sibling in siblings]
        parent.add(index, _negate(reduce(vadd, summaries)))
        fences = [sibling.keys[0] for sibling in siblings]
        self._insert_siblings(parent, index, fences, [sibling.id for sibling in siblings], summaries)

    @staticmethod
    def _insert_siblings(
        parent: Node, index: int, fences: list[bytes], ids: list[int], summaries: list[list[int]]
    ) -> None:
        """Insert the new pieces of child ``index`` of ``parent`` after it. O(size)."""
        if len(ids) == 1:  # the common case: a plain insert is cheaper than a block
            parent.insert_child(index + 1, fences[0], ids[0], summaries[0])
            return
        block = Node.internal_from(0, fences, ids, summaries)
        parent.attach(index + 1, Chunk(block.keys, block.kids, block.cols, block.shifts))

    def _grow_root(self, node: Node) -> None:
        """Cut an overfull root into pieces under a new root, as many levels as needed."""
        assert self.root is not None
        access = self.access
        while len(node.keys) > self.max_size:
            siblings = self._cut(node)
            summaries = [sibling.summary() for sibling in siblings]
            left = vsub(self.root.summary, reduce(vadd, summaries))
            keys = [b"", *(sibling.keys[0] for sibling in siblings)]
            kids = [node.id, *(sibling.id for sibling in siblings)]
            node = access.adopt(Node.internal_from(access.new_id(), keys, kids, [left, *summaries]))
            self.root.node_id = node.id
            self.root.height += 1

    def _fill_target(self) -> int:
        """How full to make the pieces of a split: about 80% of the node size.

        Leaves room for later inserts after a batch (a split into full pieces would make the next
        insert into each of them split again), while every piece keeps at least ``min_size``
        entries: with pieces of at most ``target`` entries, the smallest holds at least
        ``(2 * target + 1) / 3``, so ``target >= 1.5 * min_size`` is enough.
        """
        return min(self.max_size, max(self.max_size * 4 // 5, (3 * self.min_size) // 2 + 1))

    def _rebalance_up(self, path: Path, node: Node) -> None:
        while path and len(node.keys) < self.min_size:
            parent, index = path.pop()
            self._fix_child(parent, index)
            node = parent
        self._shrink_root()

    def _shrink_root(self) -> None:
        access = self.access
        while self.root is not None:
            node = access.node(self.root.node_id)
            if node.leaf:
                if not node.keys:
                    access.free(node.id)
                    self.root = None
                return
            if len(node.kids) != 1:
                return
            access.free(node.id)
            self.root.node_id = node.kids[0]
            self.root.height -= 1

    def _fix_child(self, parent: Node, index: int) -> bool:
        """Merge the underfull child ``index`` with a sibling, or borrow from it. Return True if done."""
        if len(parent.kids) < 2:
            return False
        access = self.access
        left_index, right_index = (index - 1, index) if index > 0 else (index, index + 1)
        left = access.mutable(access.node(parent.kids[left_index]))
        parent.kids[left_index] = left.id
        right = access.node(parent.kids[right_index])
        total = len(left.keys) + len(right.keys)
        if total <= self.max_size:  # merge right into left; right itself is only read
            left.attach(len(left.keys), Chunk(right.keys, right.kids, right.cols, right.shifts))
            parent.add(left_index, parent.child(right_index))
            parent.remove_child(right_index)
            access.free(right.id)
            return True
        right = access.mutable(right)
        parent.kids[right_index] = right.id
        target = total // 2
        if len(left.keys) < target:  # move the first entries of right to the end of left
            count = target - len(left.keys)
            moved = right.summary(0, count)
            left.attach(len(left.keys), right.detach(0, count))
            parent.add(left_index, moved)
            parent.add(right_index, _negate(moved))
        else:  # move the last entries of left to the front of right
            cut = target
            moved = left.summary(cut)
            right.attach(0, left.detach(cut))
            parent.add(left_index, _negate(moved))
            parent.add(right_index, moved)
        parent.keys[right_index] = right.keys[0]
        return True

    def _free_subtree(self, node_id: int, height: int) -> None:
        if height > 1:
            node = self.access.node(node_id)
            if node.leaf:
                raise _misplaced(node, height)
            for kid in node.kids:
                self._free_subtree(kid, height - 1)
        self.access.free(node_id)

    def _remove_range(self, node: Node, start: int, stop: int, height: int | None = None) -> list[int]:
        """Remove entries ``[start, stop)`` below a mutable ``node``; return their summary."""
        assert self.root is not None
        if height is None:
            height = self.root.height
        if node.leaf != (height == 1):  # (the subtrees it drops, and the fences it sets, go by height)
            raise _misplaced(node, height)
        if node.leaf:
            removed = node.summary(start, stop)
            node.detach(start, stop)
            return removed
        removed = self.zero()
        counts = node.counts()
        first = bisect_right(counts, start) - 1
        drop: list[int] = []
        for child in range(first, len(node.kids)):
            begin, end = counts[child], counts[child + 1]
            if begin >= stop:
                break
            low, high = max(start, begin) - begin, min(stop, end) - begin
            if low == 0 and high == end - begin:
                removed = vadd(removed, node.child(child))
                self._free_subtree(node.kids[child], height - 1)
                drop.append(child)
                continue
            kid = self.access.mutable(self.access.node(node.kids[child]))
            node.kids[child] = kid.id
            part = self._remove_range(kid, low, high, height - 1)
            node.add(child, _negate(part))
            removed = vadd(removed, part)
            if not kid.keys:
                self.access.free(kid.id)
                drop.append(child)
        fence = node.keys[0]
        for child in reversed(drop):
            node.remove_child(child)
        if node.keys and drop and drop[0] == 0:
            self._set_fence(node, fence, height)
        return removed

    def _set_fence(self, node: Node, fence: bytes, height: int) -> None:
        """Give a mutable node (of subtree height ``height``) and its leftmost spine a new fence.

        After its first child was dropped, a node keeps its own lower fence, and the child now first
        must start at that fence too, so every descent that reaches it finds a child to follow.
        """
        access = self.access
        while True:
            node.keys[0] = fence
            if height <= 2:  # the children are leaves, which store no fence
                return
            kid = access.node(node.kids[0])
            if kid.leaf:
                raise _misplaced(kid, height - 1)
            kid = access.mutable(kid)
            node.kids[0] = kid.id
            node, height = kid, height - 1

    def _repair_after_range(self, start: int) -> None:
        """Fix underfull nodes along the paths to entries ``start - 1`` and ``start``.

        A pass fixes each path top-down; a merge can leave the parent underfull, which the next pass
        fixes, so passes are bounded by the height. The bound turns a bug into an error (the write
        transaction then aborts, writing nothing) rather than an endless loop.
        """
        height = self.root.height if self.root is not None else 1
        for _ in range(4 * height + 8):
            changed = False
            self._shrink_root()
            for target in (start - 1, start):
                if self.root is not None and 0 <= target < self.count:
                    changed |= self._fix_path(target)
            if not changed:
                return
        raise AssertionError("tallytree bug: repairing the tree after delete_range did not settle")

    def _fix_path(self, index: int) -> bool:
        assert self.root is not None
        access = self.access
        changed = False
        node = access.mutable(access.node(self.root.node_id))
        self.root.node_id = node.id
        levels = 0
        while not node.leaf:
            levels = _deeper(levels, node)
            while True:
                counts = node.counts()
                child = bisect_right(counts, index) - 1
                child = min(child, len(node.kids) - 1)
                kid = access.node(node.kids[child])
                if len(kid.keys) >= self.min_size or not self._fix_child(node, child):
                    break
                changed = True
            counts = node.counts()
            child = min(bisect_right(counts, index) - 1, len(node.kids) - 1)
            index -= counts[child]
            kid = access.mutable(access.node(node.kids[child]))
            node.kids[child] = kid.id
            node = kid
        if levels != self.root.height - 1:
            raise _wrong_depth(node, levels, self.root.height)
        return changed


def _spans(node: Node, entries: list[bytes], lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """How an internal node splits ``entries[lo:hi]`` (ascending) among its children: ``(child, start,
    stop)`` for each child that gets some, left to right (two bisections per such child). A batch's
    passes down the tree (merge, lookup, removal) all split it this way. O(t log B) for t children."""
    keys = node.keys
    last = len(keys) - 1
    child = 0
    at = lo
    while at < hi:
        child = bisect_right(keys, entries[at], child) - 1
        if child < 0:  # below the node's own fence: only damaged keys send an entry there
            raise _damaged(node, "its first key is above entries its parent sends to it")
        stop = bisect_left(entries, keys[child + 1], at + 1, hi) if child < last else hi
        yield child, at, stop
        at = stop


class _Run:
    """A batch of entries in strictly ascending order, its values as columns (one list per field).

    ``delta(lo, hi)`` is the summary of entries ``lo:hi``. The whole run's is computed once (appends
    ask for no other); other slices come from prefix sums of the scaled values (exact ints) and of
    the float counts, built on first use in O(m), then O(fields) per slice.
    """

    __slots__ = ("changed", "cols", "entries", "existing", "prefixes", "stored", "total")

    def __init__(self, entries: list[bytes], cols: list[list[Any]], existing: Existing) -> None:
        self.entries = entries
        self.cols = cols
        self.existing = existing
        self.stored = False  # merge new entries into leaves' stored bytes (see NodeTree._plan_stored)
        self.changed = 0
        self.total: list[int] | None = None
        self.prefixes: list[tuple[int, list[int]]] | None = None  # (shift, sums) per summary column

    def values(self, index: int) -> tuple[Any, ...]:
        """The values of entry ``index``."""
        return tuple(col[index] for col in self.cols)

    def delta(self, lo: int, hi: int, correction: list[int] | None = None) -> list[int]:
        """The summary of entries ``lo:hi``, less ``correction`` (the part that changes nothing)."""
        if lo == 0 and hi == len(self.entries):
            if self.total is None:
                self.total = summarize(hi, self.cols)
            summary = self.total
        else:
            summary = [hi - lo, *[(sums[hi] - sums[lo]) << shift for shift, sums in self.prefix_sums()]]
        return list(summary) if correction is None else vsub(summary, correction)

    def deltas(self, slices: list[tuple[int, int]]) -> list[list[int]]:
        """The summaries of the slices ``lo:hi`` of the run, column by column: ``deltas(s)[c][i]`` is
        column ``c`` of slice ``i``'s summary. O(fields * len(slices))."""
        prefixes = self.prefix_sums()
        columns = [[hi - lo for lo, hi in slices]]
        for shift, sums in prefixes:
            if shift:
                columns.append([(sums[hi] - sums[lo]) << shift for lo, hi in slices])
            else:
                columns.append([sums[hi] - sums[lo] for lo, hi in slices])
        return columns

    def prefix_sums(self) -> list[tuple[int, list[int]]]:
        """For each summary column after the counts, ``(shift, sums)``: ``sums[i] << shift`` is the
        column's sum over the run's first ``i`` entries at true scale. Made once per run. O(m)."""
        if self.prefixes is None:
            sums: list[tuple[int, list[int]]] = []
            floats: list[tuple[int, list[int]]] = []
            for col in self.cols:
                shift, values = _scaled_column(col)
                sums.append((shift, list(accumulate(values, initial=0))))
                floats.append((0, list(accumulate(map(is_, map(type, col), repeat(float)), initial=0))))
            self.prefixes = [*sums, *floats]
        return self.prefixes


class _Step:
    """A planned change of one node: entries ``lo:hi`` of the run land below it.

    ``child`` is its index in its parent. An internal node's step lists the steps of its touched
    children (``kids``); a leaf's lists the entries to insert (``fresh``, indexes into the run; None:
    append the whole slice) and where in the leaf (``places``), and the ``(entry index, position)``
    pairs to overwrite (``updates``). ``correction`` is the summary of
    the slice's entries that were already there (their stored values for "update", their new ones
    for "skip"), so the node's delta is ``run.delta(lo, hi, correction)``.
    """

    __slots__ = (
        "child",
        "correction",
        "fresh",
        "hi",
        "kids",
        "lo",
        "merged",
        "node",
        "places",
        "splits",
        "updates",
    )

    def __init__(self, node: Node, lo: int, hi: int, correction: list[int] | None) -> None:
        self.node = node
        self.lo = lo
        self.hi = hi
        self.correction = correction
        self.child = 0
        self.kids: list[_Step] = []
        self.merged: list[_Merged] = []
        self.splits: list[_Merged] = []
        self.fresh: list[int] | range | None = None
        self.places: list[int] = []
        self.updates: list[tuple[int, int]] = []


def _collect(
    steps: list[_Step],
    step: _Step | None,
    child: int,
    lo: int,
    hi: int,
    run: _Run,
    correction: list[int] | None,
) -> list[int] | None:
    """Record the planned step of child ``child`` (None: its slice ``lo:hi`` is all there already)
    and return its parent's correction with the child's part added."""
    part: list[int] | None
    if step is None:  # every entry of the slice is there already, unchanged
        part = run.delta(lo, hi)
    else:
        step.child = child
        steps.append(step)
        part = step.correction
    if part is None:
        return correction
    return part if correction is None else vadd(correction, part)


class _Conflict(Exception):
    """Raised by the plan when ``existing="error"`` meets an entry already in the tree."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _negate(summary: list[int]) -> list[int]:
    return [-value for value in summary]


def same_values(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether two value tuples are equal in value and in type (1 and 1.0 differ)."""
    return all(type(a) is type(b) and a == b for a, b in zip(old, new, strict=True))
