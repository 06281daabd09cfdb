"""Nodes of the augmented B+ tree: what a node holds, exact summaries, and the byte format.

Design
======
A tree is a B+ tree over *entries*: ``entry = encode_key(key) + encode_id(id)`` (both encodings are
prefix-free, so bytes order equals (key, id) order). Items live only in leaves; an internal node keeps,
for every child, what a descent needs to decide without reading the child: its lower fence, its node id,
its item count and its exact sums. One node read per level therefore answers rank, select and any
bounded count or sum::

    internal node (3 children, value fields cost and tokens)
    +---------+-------------+-------------+-------------+
    | keys    | b""         | e7          | e19         |   lower fence of each child (keys[0] is this
    | kids    | 12          | 40          | 41          |   node's own fence; b"" at the root)
    | count   | 7           | 12          | 9           |   items in the child's subtree
    | S:cost  | 2.5*2^1074  | 3.25*2^1074 | 1.0*2^1074  |   exact sums, scaled (see below)
    | S:tokens| 700*2^1074  | 1300*2^1074 | 800*2^1074  |
    | F:cost  | 7           | 12          | 9           |   how many float values each sum holds
    | F:tokens| 0           | 0           | 0           |
    +---------+-------------+-------------+-------------+

    leaf node: keys = entries (sorted), and one column of raw values per field.

Invariants (checked by ``_check``): entries strictly increase; for child i,
``keys[i] <= every entry of child i < keys[i+1]``; an internal child's own ``keys[0]`` equals the fence
its parent stores for it; all leaves are at the same depth; every non-root node holds between
``node_size // 2`` and ``node_size`` entries or children; the root, if internal, has at least two.

Exact summaries
---------------
A summary is a list of ``1 + 2F`` Python ints for ``F`` value fields: ``[count, S_0..S_F-1,
F_0..F_F-1]``. ``S_f`` is the exact sum of field ``f`` multiplied by ``2**1074``: every float is an
integer multiple of ``2**-1074`` and every int is too, so scaled sums are exact integers; adding and
subtracting them never drifts, whatever the churn. ``F_f`` counts the float values in the sum. Reading a
sum gives ``S_f >> 1074`` (an exact int) when ``F_f == 0``, else ``S_f / 2**1074``, which CPython rounds
correctly and so equals ``math.fsum`` of the same floats. Integers are therefore exact at any size.

Byte format (version 1)
-----------------------
A node is one msgpack array (decoding msgpack columns was measured faster in CPython than slicing a
flat fixed-width layout)::

    leaf:      [1, [entry, ...], [value of field 0, ...], ..., [value of field F-1, ...]]
    internal:  [2, [fence, ...], [child id, ...], [shift, ...], counts, S col 0, ..., F col 0, ...]
    wide:      [3, keys, kids, shifts, [limbs per column], columns split into 63-bit limbs ...]
    pending:   [4, [entry, ...], [value of field 0, ...], ..., [value of field F-1, ...]]

A *pending* node holds a tree's appends not yet merged into its leaves (see ``_tree``): laid out as
a leaf, marked by its kind (``Node.pending``).

Column ``c`` of child ``i`` is ``col_c[i] << shift_c``: factoring out the trailing zero bits that the
scaled sums share keeps the stored ints small (a sum of floats with 53-bit mantissas needs ~60-80 bits,
not 1,100). The same representation is used in memory, so decoding does no big-int arithmetic.
msgpack packs ints from -2**63 to 2**64 - 1; a node whose sums need more is written with those sum
columns split into 63-bit limbs (the "wide" form, kind 3). Exact float sums usually need 65-90 bits,
so most internal nodes of an aggregate with a float field are wide: the C kernel ``pack_internal``
measures and splits the columns and writes either form in one pass (see :func:`encode_node`).
Nodes are immutable once committed and every rewrite gets a new id (the next version of the node's
slot, see ``_txn``), so a decoded node can be cached by id across transactions and processes without
ever being stale.

Compact leaves
--------------
With the C kernels, a stored leaf whose value columns are each all floats or all int64s (all of them,
in practice) is decoded into its *search image* alone (:meth:`Node.compact`): one bytes object with
the keys back to back and the values as raw doubles or int64s, from which the kernels' descents,
counts, sums and item reads work. Its ``keys`` and ``cols`` tuples are made from the image the first
time Python code reads them (a write, an iteration). A leaf decoded into tuples is ~150 objects (a
key and a number per value), so decoding a leaf took 6-10 us and dropping it from the cache 1-3
us; the image takes 1-2.5 us and one free. With 10^7 items, where most leaves a read needs are not
in the node cache, that is most of what a read costs.

Patched internal nodes
----------------------
A write from stored bytes rebuilds each internal node of its path with one child's id and summary
changed (:meth:`Node.bumped`). With the C kernels the new node is *patched* (``_PatchedNode``): its
stored bytes, its keys and shifts, the committed node it was made from (its base) and a patch, a dict
of child index -> ``(kid, column values ...)`` for the children that differ from the base's. The
next bump of it patches the same base, one child more; past 16 children the bump makes the tuples
and the node is plain again. Its ``kids`` and ``cols`` tuples are made the first time something
reads them (a read's descent, a dirty copy), and the node then becomes a plain :class:`Node`; a
write's descent reads a child id with :meth:`Node.kid`, which makes nothing. Making the tuples of a
node of 115 children (~115 ids and five columns copied) and freeing them when the next commit
replaced the node was ~16,000 of a bump's ~26,000 instructions (callgrind); a scattered commit at
10^6 items bumps two such nodes.

A write's path is bumped by one C call (``_speedups.bump_path``, from ``NodeTree._write_stored``),
which makes each level's node as :meth:`Node.bumped` does, without running ``__init__``: it sets the
slots by their offsets, read once from this class's member descriptors and checked. A slot added
here must be added to the kernel's list too (``node_slot_names``), or such nodes would leave it
unset: ``test_stored_writes`` compares every slot of the two kinds of nodes. Such a node also keeps
the *layout* of its stored bytes (``_layout``: the place of every 16th number of its child ids and
columns), which its next bump repacks through instead of walking the whole node (see the kernels'
"Layouts"); a node made otherwise has none, and its first such bump walks it once.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from functools import reduce
from itertools import accumulate, repeat
from operator import is_, or_, rshift
from typing import TYPE_CHECKING, Any

import msgpack

from . import _native
from ._native import speedups
from .errors import CorruptDatabaseError

__all__ = [
    "SCALE_BITS",
    "Chunk",
    "Node",
    "decode_node",
    "decode_pending",
    "delta_of",
    "encode_node",
    "normalize",
    "pack_summary",
    "sum_value",
    "summarize",
    "unpack_summary",
]

SCALE_BITS = 1074
"""Sums are kept as exact integers in units of ``2**-1074``, the smallest positive double."""
_UNIT = 1 << SCALE_BITS

LEAF = 1
INTERNAL = 2
INTERNAL_WIDE = 3
PENDING = 4

_IMAGE_COUNT = struct.Struct("=I")  # a search image starts with its entry count (see _speedups.c)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_LIMB_BITS = 63
_LIMB_MASK = (1 << _LIMB_BITS) - 1


def _pack(parts: list[Any]) -> bytes:
    return msgpack.packb(parts, use_bin_type=True)  # type: ignore[no-any-return]


def _pack_node(head: int, parts: tuple[Sequence[Any], ...]) -> bytes:
    """msgpack's bytes for ``[head, *parts]``: the C kernel's (byte for byte the same, 5-8x faster),
    or msgpack's own when the kernel is not built or leaves a value to it (an int beyond 64 bits,
    which msgpack refuses with OverflowError)."""
    if speedups is not None:
        packed = speedups.pack_node(head, parts)
        if packed is not None:
            return packed
    return _pack([head, *parts])


def scaled(value: int | float) -> int:
    """Return ``value * 2**1074`` as an exact int (the value must be an int or a finite float)."""
    if type(value) is int:
        return value << SCALE_BITS
    numerator, denominator = value.as_integer_ratio()
    return numerator << (SCALE_BITS + 1 - denominator.bit_length())


def delta_of(values: tuple[int | float, ...] | list[int | float]) -> list[int]:
    """Return the summary of one item with these values: ``[1, S..., F...]``. O(fields).

    The C kernel ``delta_of`` gives the same list (in 0.3 us for two fields, where this code takes
    1.3; every write of one item makes one).

    >>> delta_of((0.5, 3)) == [1, 1 << 1073, 3 << 1074, 1, 0]
    True
    """
    if speedups is not None:
        delta = speedups.delta_of(values)
        if delta is not None:
            return delta
    return [1, *map(scaled, values), *[int(type(value) is float) for value in values]]


def sum_value(total: int, floats: int) -> int | float:
    """Turn a scaled exact sum back into a number: an exact int, or a correctly rounded float.

    A float sum beyond the largest double rounds to infinity, as IEEE 754 addition does (the int
    division raises OverflowError exactly when the correctly rounded quotient overflows).
    """
    if floats == 0:
        return total >> SCALE_BITS
    try:
        return total / _UNIT
    except OverflowError:
        return math.inf if total > 0 else -math.inf


class Chunk:
    """A run of entries (leaf) or children (internal) detached from a node, to attach elsewhere."""

    __slots__ = ("cols", "keys", "kids", "shifts")

    def __init__(self, keys: list[bytes], kids: list[int], cols: list[list[Any]], shifts: list[int]) -> None:
        self.keys = keys
        self.kids = kids
        self.cols = cols
        self.shifts = shifts


def _trailing_zeros(value: int) -> int:
    return (value & -value).bit_length() - 1


def normalize(values: list[int]) -> tuple[int, list[int]]:
    """Factor out the trailing zero bits that all ``values`` share: ``(shift, [v >> shift])``."""
    combined = reduce(or_, values, 0)
    if not combined:
        return 0, list(values)
    shift = _trailing_zeros(combined)
    return shift, ([value >> shift for value in values] if shift else list(values))


_FLOAT_SCALE = 128
_FLOAT_FACTOR = 2.0**_FLOAT_SCALE


def _scaled_column(values: list[Any]) -> tuple[int, Iterable[int]]:
    """The values of a leaf column as exact ints ``x`` with value ``x << shift >> 1074``, fast.

    All-int columns are summed as they are (shift 1074); all-float columns are multiplied by 2**128
    in floating point, which is exact unless it overflows, and used as ints when every product is an
    integer (shift 1074 - 128). Anything else takes the exact slow path (shift 0).
    """
    kinds = set(map(type, values))
    if kinds <= {int}:
        return SCALE_BITS, values
    if kinds == {float}:
        products = list(map(_FLOAT_FACTOR.__mul__, values))
        if all(map(float.is_integer, products)):
            return SCALE_BITS - _FLOAT_SCALE, map(int, products)
    return 0, map(scaled, values)


_FSUM_ROUNDS = 4
_HOT_READS = 6  # range reads of a leaf before it gets cumulative rows (see Node.hot_rows)


def _float_sum(values: list[float]) -> int | None:
    """The exact sum of finite floats, scaled by ``2**1074``; None if it needs too many rounds.

    ``math.fsum`` is correctly rounded, so it returns 0.0 exactly when the exact sum is 0: each
    round takes the rounded sum ``p`` as the next part and appends ``-p`` to the values, until what
    is left sums to zero. The parts then add up to the exact sum; values of similar magnitude need
    two rounds, each one C loop over the values. The C twin (see ``_native``) adds the values in
    fixed point instead, with no rounding, one pass whatever their magnitudes.
    """
    if speedups is not None:
        return speedups.float_sum(values)
    rest = list(values)
    total = 0
    try:
        for _ in range(_FSUM_ROUNDS):
            part = math.fsum(rest)
            if not part:
                return total
            numerator, denominator = part.as_integer_ratio()
            total += numerator << (SCALE_BITS + 1 - denominator.bit_length())
            rest.append(-part)
    except (OverflowError, ValueError):  # an intermediate sum beyond the largest double
        pass
    return None


def column_sum(values: list[Any]) -> tuple[int, int]:
    """The exact sum of a list of ints and floats, scaled by ``2**1074``, and how many are floats."""
    if values and type(values[0]) is not float:
        total = sum(values)
        if type(total) is int:
            return total << SCALE_BITS, 0
    floats = list(map(type, values)).count(float)
    if floats == len(values):
        exact = _float_sum(values)
        if exact is not None:
            return exact, floats
    return sum(map(scaled, values)), floats


def summarize(count: int, columns: list[list[Any]]) -> list[int]:
    """The summary ``[count, S..., F...]`` of raw value columns (one list per field). O(size).

    >>> summarize(2, [[0.5, 0.25], [3, 4]]) == [2, 3 << 1072, 7 << 1074, 2, 0]
    True
    """
    sums = []
    floats = []
    for column in columns:
        total, number = column_sum(column)
        sums.append(total)
        floats.append(number)
    return [count, *sums, *floats]


class Node:
    """One tree node, decoded. Committed nodes are shared and must not be mutated.

    ``dirty`` nodes belong to one write transaction and are mutated in place until it commits.
    In an internal node, column ``c`` of child ``i`` is ``cols[c][i] << shifts[c]``: factoring out
    the trailing zero bits of the scaled sums keeps the stored ints small (usually below 2**64).

    Reads cache derived arrays on committed nodes only (never on dirty ones): cumulative counts
    (:meth:`counts`), an internal node's cumulative child summaries in true scale (:meth:`rows`),
    and, for a leaf read often, its cumulative summaries in node-local scale (:meth:`hot_rows`).
    """

    __slots__ = (
        "_base",  # a patched node's (see _PatchedNode); never set on others
        "_blob",
        "_counts",
        "_hot",
        "_layout",  # a node bump_path made: its stored bytes' layout (see _speedups.c); never set on others
        "_origin",
        "_packed",
        "_patch",  # a patched node's (see _PatchedNode); never set on others
        "_reads",
        "_rows",
        "_table",
        "cols",
        "dirty",
        "id",
        "keys",
        "kids",
        "leaf",
        "pending",
        "shifts",
    )
    _base: Node | None
    _patch: dict[int, tuple[int, ...]] | None

    def __init__(
        self,
        node_id: int,
        leaf: bool,
        keys: list[bytes],
        cols: list[list[Any]],
        kids: list[int] | None = None,
        shifts: list[int] | None = None,
        dirty: bool = False,
    ) -> None:
        self.id = node_id
        self.leaf = leaf
        self.keys = keys
        self.cols = cols
        self.kids: list[int] = kids if kids is not None else ([] if dirty else ())  # type: ignore[assignment]
        # a leaf's shifts are all zero and never change: a tuple, which the garbage collector untracks
        self.shifts: list[int] = shifts if shifts is not None else (0,) * len(cols)  # type: ignore[assignment]
        self.dirty = dirty
        self.pending = False  # a tree's pending node (see _tree): a leaf stored with its own kind
        # the search image of the C kernels (see _speedups.c); False once searched without one
        self._blob: bytes | bool | None = None
        self._counts: list[int] | None = None
        self._table: list[tuple[int, list[int]]] | None = None
        self._rows: list[tuple[int, ...]] | None = None
        self._reads = 0
        self._hot: tuple[tuple[int, ...], list[tuple[int, ...]]] | None = None
        # an internal node's stored bytes once committed, and a dirty copy's committed original:
        # encode_node writes the copy's bytes from the original's, changing only what changed (a
        # pending node keeps its bytes too, which _txn.encode_root writes again while it is unchanged)
        self._packed: bytes | None = None
        self._origin: Node | None = None

    @classmethod
    def internal_from(
        cls, node_id: int, keys: list[bytes], kids: list[int], summaries: list[list[int]]
    ) -> Node:
        """A dirty internal node with these children and their summaries (true scale)."""
        cols: list[list[int]] = []
        shifts: list[int] = []
        nfields = (len(summaries[0]) - 1) // 2
        for index, column in enumerate(zip(*summaries, strict=True)):
            if 1 <= index <= nfields:  # only the scaled sums have trailing zeros worth sharing
                shift, values = normalize(list(column))
            else:
                shift, values = 0, list(column)
            cols.append(values)
            shifts.append(shift)
        return cls(node_id, False, keys, cols, kids, shifts, dirty=True)

    @classmethod
    def compact(cls, node_id: int, image: bytes, fields: int) -> Node:
        """A committed leaf held as its search image alone (``_speedups.leaf_image``).

        Its ``keys`` and ``cols`` are made from the image the first time something reads them (see
        ``_CompactNode.__getattr__``: the node is of that subclass); the C kernels' reads (searches,
        counts, sums, items by index) never do.
        """
        node = _CompactNode(node_id, True, [], [])
        del node.keys, node.cols
        node.shifts = (0,) * fields  # type: ignore[assignment]
        node._blob = image
        return node

    @classmethod
    def from_chunk(cls, node_id: int, leaf: bool, chunk: Chunk) -> Node:
        """A dirty node holding a detached chunk."""
        return cls(node_id, leaf, chunk.keys, chunk.cols, chunk.kids, chunk.shifts, dirty=True)

    def __repr__(self) -> str:
        kind = "leaf" if self.leaf else "internal"
        return f"<Node {self.id} {kind} size={self.size()}{' dirty' if self.dirty else ''}>"

    def entry_rows(self, start: int, stop: int) -> tuple[Sequence[bytes], Sequence[tuple[Any, ...]]]:
        """A leaf's entries ``start:stop`` (0 <= start <= stop <= size) as their keys and their value
        rows (one tuple per entry), made for those entries alone and not kept: from the search
        image of a committed leaf that has one (a compact leaf always does) in one C call, else
        from the lists. A cached compact leaf stays compact: had it kept its lists, it would hold
        ~300 more objects (twice the memory), all freed one by one when a write replaces the leaf (a
        batch into leaves that ``items`` had read took 1.4x the time). A page of 10 items from a
        compact leaf of 115 made every entry (4.5 us), then each row with a generator.
        O(stop - start).

        >>> Node(0, True, [b"a", b"b", b"c"], [[1, 2, 3], [4.0, 5.0, 6.0]]).entry_rows(1, 3)
        ([b'b', b'c'], [(2, 5.0), (3, 6.0)])
        """
        blob = self._blob
        if type(blob) is bytes and not self.dirty:
            built = _native._built  # a compact node comes from the extension (see _CompactNode)
            found = built.leaf_rows(blob, start, stop) if built is not None else None
            if found is not None:
                return found
        keys = self.keys[start:stop]
        if not self.cols:
            return keys, [()] * len(keys)
        return keys, list(zip(*(col[start:stop] for col in self.cols), strict=True))

    def size(self) -> int:
        """How many entries (or children) the node holds, read from its search image when it has one,
        so that a compact node's lists are not made for it. O(1).

        >>> Node(0, True, [b"a", b"b"], [[1, 2]]).size()
        2
        """
        blob = self._blob
        if type(blob) is bytes:
            return _IMAGE_COUNT.unpack_from(blob)[0]  # type: ignore[no-any-return]
        return len(self.keys)

    def copy(self, node_id: int) -> Node:
        """Return a mutable (dirty) copy of this node under a new id. O(size)."""
        if speedups is not None:  # the same lists, untracked by the garbage collector (see freeze)
            keys, kids, cols, shifts = speedups.thaw(self)
            node = Node(node_id, self.leaf, keys, cols, kids, shifts, dirty=True)
            if self._packed is not None and not self.leaf:
                node._origin = self
        else:
            node = Node(
                node_id,
                self.leaf,
                list(self.keys),
                [list(col) for col in self.cols],
                list(self.kids),
                list(self.shifts),
                dirty=True,
            )
        node.pending = self.pending
        return node

    def freeze(self) -> None:
        """Mark a dirty node committed: from now on it is shared and never changes. O(size).

        Its lists become tuples, as in a decoded node, and so do the arrays it caches later. A
        committed node is typed with lists like a dirty one because only dirty nodes are ever changed;
        the tuples make a mistaken change fail loudly, and CPython's cyclic garbage collector stops
        tracking tuples of bytes and numbers (and tuples of those) after a look, whereas it walks
        every list in every full collection. Measured with 17,500 cached leaves: 87,000 tracked
        objects and 47 ms per full collection when the columns' holder, the shifts, an empty kids
        list and the cached arrays were lists; 32,000 (the Node objects, mostly) and 17-19 ms as
        tuples.

        The C kernels go one step further (``freeze_node``, and ``thaw`` in :meth:`copy`): a node's
        lists and tuples hold only bytes, ints and floats (and, for the columns, such lists or
        tuples), so they can be part of no reference cycle, and the kernels untrack them as they
        make them. The collector then never looks at them at all: after a batch of 5,000 scattered
        inserts, the young collection that walked the dirty copies' lists took 17-35 ms (3-7 us per
        item); it now takes 1-2 ms. ``freeze_node`` also moves a list's items into its tuple when the
        node is the list's only holder, touching none of them (an internal node of 48 children has
        ~340): copy and freeze of such a node took 3.4 us, now 1.8 us. The node itself is untracked
        too, as a decoded one is (``untrack``): it refers to no node (a dirty copy refers to its
        origin, not the other way). Tracked, the ~32,000 nodes of a full cache were walked by every
        full collection: 15-20% of a read that decodes a leaf, with 10^7 items.
        """
        self._origin = None
        if speedups is not None:  # the same, and the tuples untracked at once (no first look)
            speedups.freeze_node(self)
            return
        self.dirty = False
        self.keys = tuple(self.keys)  # type: ignore[assignment]
        self.kids = tuple(self.kids)  # type: ignore[assignment]
        self.cols = tuple(map(tuple, self.cols))  # type: ignore[assignment]
        self.shifts = tuple(self.shifts)  # type: ignore[assignment]

    # ------------------------------------------------------------ reading summaries

    def prefixes(self, index: int) -> list[int]:
        """The summary of the first ``index`` children (entries), true scale: every column at once.

        Leaf columns are derived from the raw values: 0 is the count, ``1..F`` the scaled sums,
        ``F+1..2F`` the float counts. The prefix arrays are built once per committed node and cached.
        O(columns) cached, O(size) otherwise.
        """
        if not self.leaf:
            return list(self.rows()[index])
        table = self._table
        if table is None:
            table = [self._cumulative(column) for column in range(self._width())]
            if not self.dirty:
                self._table = table = tuple((shift, tuple(values)) for shift, values in table)  # type: ignore[assignment]
        return [values[index] << shift if shift else values[index] for shift, values in table]

    def hot_rows(self) -> tuple[tuple[int, ...], list[tuple[int, ...]]] | None:
        """``(shifts, rows)`` for a committed leaf once it has been read a few times, else None.

        ``rows[i]`` is the summary of entries ``< i`` in node-local scale: column ``c`` is
        ``rows[i][c] << shifts[c]`` (small ints; only the shifts are big). A range read sums the few
        entries it needs from a leaf directly (no table: most leaves of a large tree are read once
        in a while); a leaf read again and again gets its rows on its sixth read (building them costs
        about as much as six direct reads, so a leaf never pays more than twice what it would have
        paid either way), after which a span of it costs O(columns) in C-level maps.
        """
        hot = self._hot
        if hot is None and not self.dirty:
            self._reads += 1
            if self._reads >= _HOT_READS:
                table = self._table or [self._cumulative(column) for column in range(self._width())]
                shifts = tuple(shift for shift, _ in table)
                hot = self._hot = (shifts, tuple(zip(*(values for _, values in table), strict=True)))  # type: ignore[assignment]
        return hot

    def rows(self) -> list[tuple[int, ...]]:
        """Cumulative child summaries of an internal node, true scale: ``rows()[i]`` sums children ``< i``.

        One tuple per index ``0..len(kids)``, so a descent adds a whole summary by reference and a
        range inside the node is ``rows()[j] - rows()[i]``. Kept in true scale (big ints), which costs
        memory only on internal nodes, a few percent of a tree. Cached on committed nodes. O(size)
        to build, O(1) cached.
        """
        rows = self._rows
        if rows is not None:
            return rows
        columns = []
        for col, shift in zip(self.cols, self.shifts, strict=True):
            sums = list(accumulate(col, initial=0))
            columns.append([value << shift for value in sums] if shift else sums)
        rows = list(zip(*columns, strict=True))
        if not self.dirty:
            self._rows = rows = tuple(rows)  # type: ignore[assignment]
        return rows

    def _width(self) -> int:
        return 1 + 2 * len(self.cols) if self.leaf else len(self.cols)

    def counts(self) -> list[int]:
        """Cumulative child counts: ``counts()[i]`` items lie in children ``< i``. Cached. O(size)."""
        counts = self._counts
        if counts is not None:
            return counts
        if self.leaf:
            counts = list(range(len(self.keys) + 1))
        else:
            shift, counts = self._cumulative(0)
            if shift:
                counts = [count << shift for count in counts]
        if not self.dirty:
            self._counts = counts = tuple(counts)  # type: ignore[assignment]
        return counts

    def _cumulative(self, column: int) -> tuple[int, list[int]]:
        if column == 0 and self.leaf:
            return 0, list(range(len(self.keys) + 1))
        if not self.leaf:
            return self.shifts[column], list(accumulate(self.cols[column], initial=0))
        nfields = len(self.cols)
        if column <= nfields:
            shift, values = _scaled_column(self.cols[column - 1])
            return shift, list(accumulate(values, initial=0))
        raw = self.cols[column - 1 - nfields]
        return 0, list(accumulate(map(is_, map(type, raw), repeat(float)), initial=0))

    def child(self, index: int) -> list[int]:
        """The stored summary of child ``index`` (internal nodes), true scale."""
        return [col[index] << shift for col, shift in zip(self.cols, self.shifts, strict=True)]

    def summary(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The summary of entries (leaf) or children (internal) ``start:stop``, true scale. O(size)."""
        if not self.leaf:
            return [sum(col[start:stop]) << shift for col, shift in zip(self.cols, self.shifts, strict=True)]
        count = len(range(len(self.keys))[start:stop])
        return summarize(count, [col[start:stop] for col in self.cols])

    # ------------------------------------------------------------ changing (dirty nodes only)

    def _fit(self, column: int, amount: int) -> int:
        """Lower the shift of a column so that ``amount`` is a multiple of it; return the shift."""
        shift = self.shifts[column]
        if shift and amount & ((1 << shift) - 1):
            lower = _trailing_zeros(amount)
            self.cols[column] = [value << (shift - lower) for value in self.cols[column]]
            self.shifts[column] = shift = lower
        return shift

    def add(self, index: int, delta: list[int]) -> None:
        """Add a summary delta (true scale) to child ``index``. O(columns)."""
        for column, amount in enumerate(delta):
            if amount:
                shift = self._fit(column, amount)
                self.cols[column][index] += amount >> shift

    def bumped(self, node_id: int, index: int, kid: int, delta: list[int]) -> Node:
        """A new committed internal node: this one (committed) with child ``index`` replaced by
        ``kid`` and its summary grown by ``delta`` (true scale), its stored bytes ready
        (:meth:`packed`). O(size).

        This is what one insert does to each internal node of its path, without a dirty copy: the
        keys and shifts are shared with this node, and the new node is never changed in place (a
        later change copies it, as it copies any committed node). With the C kernels, one call
        (``bump_internal``) repacks the bytes from this node's (see :func:`encode_node`) and makes
        the new node a *patched* one (:class:`_PatchedNode`): the node it was made from, its base,
        and the children whose id or summary differ from the base's, up to 16 of them; its ``kids``
        and ``cols`` tuples are made the first time something reads them, and the next bump makes a
        patch of the same base, one child more. A node that reads used (its cumulative arrays
        derived) is bumped into tuples at once, as before: when a read follows each write, making
        them from a patch cost more (bump and first read 4.1 us, against 2.5 us for a bump into
        tuples, for a node of 115 children). A bump that makes no such tuples (~115 ids and five
        columns copied, then freed with the old node) took 1.6-1.8 us where one into tuples took
        2.5-2.8 us, for such a node (timeit, bump and free). Past 16 patched children
        the bump makes the tuples: the child ids and the changed columns become new tuples, the
        other columns are shared. Without the kernels, or for a column whose shift does not divide
        its amount (which :meth:`add` rescales), it is a dirty copy changed and frozen at once.

        >>> node = Node.internal_from(5, [b"", b"m"], [1, 2], [[3, 0, 0], [4, 0, 0]])
        >>> node.freeze()
        >>> new = node.bumped(9, 1, 7, [1, 0, 0])
        >>> new.kids, new.child(1), new.dirty, node.child(1)
        ((1, 7), [5, 0, 0], False, [4, 0, 0])
        """
        made = None
        if speedups is not None:
            nfields = (len(self.shifts) - 1) // 2  # (the shifts: a patched node's cols are not made)
            base, patch = _patch_of(self)
            # a read derives its cumulative arrays on a plain node: reads follow writes here, and
            # tuples made now cost less than tuples made from a patch by the next read
            read = patch is None and (
                self._counts is not None or self._rows is not None or self._table is not None
            )
            made = speedups.bump_internal(base, self._packed, index, kid, delta, nfields, patch, read)
        if made is None:  # without the kernels, or a column to rescale: a dirty copy, as writes make
            node = self.copy(node_id)
            node.kids[index] = kid
            node.add(index, delta)
            data = encode_node(node)  # repacked from this node's bytes when it can be
            node.freeze()
            node._packed = data
            return node
        assert speedups is not None  # made by the kernel
        if len(made) == 2:  # a patch of the base: the kids and columns are made if something reads them
            patched = _PatchedNode(node_id, self.keys, self.shifts, base, *made)
            speedups.untrack(patched)  # (it refers to no node that refers to it)
            return patched
        kids, cols, packed = made
        node = Node(node_id, False, self.keys, cols, kids, self.shifts)  # tuples
        if packed is None:
            node._origin = self  # what encode_node repacks it from
            packed = encode_node(node)
            node._origin = None
        node._packed = packed
        speedups.untrack(node)  # as freeze_node leaves a committed node (see freeze)
        return node

    def kid(self, index: int) -> int:
        """The id of child ``index`` of an internal node (a patched node's, without making its
        ``kids``; see :meth:`bumped`). O(1).

        >>> Node.internal_from(5, [b"", b"m"], [1, 2], [[3, 0, 0], [4, 0, 0]]).kid(1)
        2
        """
        return self.kids[index]

    def packed(self) -> bytes:
        """The stored bytes of a committed internal node, as a commit or a decode left them. O(1)."""
        assert self._packed is not None
        return self._packed

    def add_columns(self, indexes: list[int], columns: list[list[int]]) -> None:
        """Add deltas (true scale) to children ``indexes``, given column by column: child
        ``indexes[i]`` gets ``columns[c][i]`` in column ``c``. O(columns * len(indexes)).
        """
        cols = self.cols
        for column, amounts in enumerate(columns):
            combined = reduce(or_, amounts, 0)
            if not combined:
                continue
            shift = self._fit(column, combined)  # one shift that suits every amount
            col = cols[column]
            for index, amount in zip(
                indexes, map(rshift, amounts, repeat(shift)) if shift else amounts, strict=True
            ):
                col[index] += amount

    def detach(self, start: int, stop: int | None = None) -> Chunk:
        """Remove the entries (children) ``start:stop`` and return them as a chunk. O(size)."""
        chunk = Chunk(
            self.keys[start:stop],
            self.kids[start:stop],
            [col[start:stop] for col in self.cols],
            self.shifts[:],
        )
        del self.keys[start:stop]
        del self.kids[start:stop]
        for col in self.cols:
            del col[start:stop]
        return chunk

    def attach(self, index: int, chunk: Chunk) -> None:
        """Insert a chunk's entries (children) at ``index``, aligning the scales. O(size)."""
        self.keys[index:index] = chunk.keys
        self.kids[index:index] = chunk.kids
        for column, incoming in enumerate(chunk.cols):
            theirs = chunk.shifts[column]
            mine = self.shifts[column]
            values = incoming
            if theirs > mine:
                values = [value << (theirs - mine) for value in incoming]
            elif theirs < mine:
                self.cols[column] = [value << (mine - theirs) for value in self.cols[column]]
                self.shifts[column] = theirs
            self.cols[column][index:index] = values

    def insert_child(self, index: int, key: bytes, kid: int, summary: list[int]) -> None:
        """Insert one child with its summary (true scale) at ``index``. O(size)."""
        self.keys.insert(index, key)
        self.kids.insert(index, kid)
        for column, amount in enumerate(summary):
            shift = self._fit(column, amount) if amount else self.shifts[column]
            self.cols[column].insert(index, amount >> shift)

    def remove_child(self, index: int) -> None:
        """Remove child ``index`` (internal nodes). O(size)."""
        del self.keys[index]
        del self.kids[index]
        for col in self.cols:
            del col[index]


def _pack_int(value: int) -> int | list[int | bytes]:
    """An int for msgpack: itself when it fits int64, else ``[mantissa, shift]`` with the trailing
    zero bits factored out (scaled sums have ~1,074 of them), the mantissa as bytes if it is still
    too big."""
    if _INT64_MIN <= value <= _INT64_MAX:
        return value
    shift = _trailing_zeros(value)
    mantissa = value >> shift
    if _INT64_MIN <= mantissa <= _INT64_MAX:
        return [mantissa, shift]
    return [mantissa.to_bytes((mantissa.bit_length() + 8) // 8, "big", signed=True), shift]


_SUMMARY_BITS = 8192
"""More bits than any summary value has: a sum of 2**63 doubles of the largest magnitude, scaled by
2**1074, has about 2,160. A stored value beyond it is damage (and would take memory and time to
build: the shift alone could ask for 2**63 bits)."""


def _unpack_int(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is list:
        mantissa, shift = value
        if type(mantissa) is bytes and len(mantissa) <= _SUMMARY_BITS // 8:
            mantissa = int.from_bytes(mantissa, "big", signed=True)
        if type(mantissa) is not int or type(shift) is not int or not 0 <= shift <= _SUMMARY_BITS:
            raise ValueError("malformed packed int")
        if mantissa.bit_length() + shift > _SUMMARY_BITS:
            raise ValueError(f"a packed int of more than {_SUMMARY_BITS} bits")
        return mantissa << shift
    if kind is bytes and len(value) <= _SUMMARY_BITS // 8:  # format version 1: the whole int as bytes
        return int.from_bytes(value, "big", signed=True)
    raise ValueError("malformed packed int")


def pack_summary(summary: list[int]) -> list[Any]:
    """Encode a summary vector for msgpack: small ints as they are, big ones as ``[mantissa, shift]``.

    >>> pack_summary([3, 3 << 1074, -(1 << 80)])
    [3, [3, 1074], [-1, 80]]
    """
    return [value if _INT64_MIN <= value <= _INT64_MAX else _pack_int(value) for value in summary]


def unpack_summary(packed: list[Any]) -> list[int]:
    """Inverse of :func:`pack_summary` (which also reads version 1's big ints given as bytes)."""
    return [_unpack_int(value) for value in packed]


def _limbs(column: list[int]) -> list[list[int]]:
    """Split a column of ints into 63-bit limbs, most significant first, each fitting in int64."""
    if not column or (min(column) >= _INT64_MIN and max(column) <= _INT64_MAX):
        return [column]
    limbs: list[list[int]] = []
    rest = column
    while True:
        limbs.append([value & _LIMB_MASK for value in rest])
        rest = [value >> _LIMB_BITS for value in rest]  # floor shift: the sign stays on top
        if min(rest) >= _INT64_MIN and max(rest) <= _INT64_MAX:
            break
    limbs.append(rest)
    limbs.reverse()
    return limbs


def _join_limbs(limbs: list[list[int]]) -> list[int]:
    column = limbs[0]
    for limb in limbs[1:]:
        column = [(high << _LIMB_BITS) | low for high, low in zip(column, limb, strict=True)]
    return column


def encode_node(node: Node) -> bytes:
    """Serialize a node. O(size).

    msgpack refuses an int beyond 64 bits: a sum column that holds one (the exact sum of floats of
    several magnitudes usually does) is split into limbs, and the node takes the "wide" form. The
    output depends only on the node's contents: plain when every value fits msgpack's ints (from
    ``-2**63`` to ``2**64 - 1``), else wide, with each sum column in as few limbs as leave its top
    limb in int64. Only sum columns can be that large: counts, float counts, ids and shifts are small.
    The C kernel ``pack_internal`` writes either form in one pass (6-8 us for a wide node of 59
    children, where the Python code took 17 us reusing limbs kept from decoding and takes 35 us
    without); the Python code packs plainly first, and only if msgpack refuses a value splits the
    sum columns.

    A write of one item changes each internal node on its path in a few numbers (a child's id, count
    and sums). Such a node, a dirty copy of a committed one (``_origin``, whose stored bytes a commit
    or a decode left in ``_packed``), is written by ``repack_internal`` from those bytes, only the
    changed numbers encoded again: the same bytes as a full pack, in 1.6 us where the full pack of a
    wide node of 50 children takes 4.5 us. Anything else (a key, a shift or a limb count changed, a
    child more or less) is packed in full.
    """
    if node.leaf:
        return _pack_node(PENDING if node.pending else LEAF, (node.keys, *node.cols))
    nfields = (len(node.cols) - 1) // 2
    parts: tuple[Sequence[Any], ...] = (node.keys, node.kids, node.shifts, *node.cols)
    if speedups is not None:
        origin = node._origin
        if origin is not None and origin._packed is not None:
            packed = speedups.repack_internal(node, origin, origin._packed, nfields)
            if packed is not None:
                return packed
        packed = speedups.pack_internal(parts, nfields)
        if packed is not None:
            return packed
    try:
        return _pack([INTERNAL, *parts])
    except OverflowError:
        pass
    split = [_limbs(col) if 1 <= index <= nfields else [col] for index, col in enumerate(node.cols)]
    counts = [len(limbs) for limbs in split]
    flat = [limb for limbs in split for limb in limbs]
    return _pack([INTERNAL_WIDE, node.keys, node.kids, node.shifts, counts, *flat])


_ARRAYS = (tuple, list)  # msgpack arrays decode to tuples; joined limbs are lists
_KINDS_OF_KEYS = frozenset({bytes})
_KINDS_OF_VALUES = frozenset({int, float})
_KINDS_OF_SUMS = frozenset({int})
_MAX_SHIFT = 2048  # trailing zeros of a stored sum: under 1074 + 64 + 64 bits (see scaled), with room


def _consistent(node: Node) -> Node:
    """The decoded node, if its parts are arrays of one length holding what they must: keys bytes,
    child ids and an internal node's summaries ints, its shifts ints in ``[0, _MAX_SHIFT]``, a
    leaf's values ints or finite floats (else a read would fail untyped, or answer wrong). The C kernel
    ``valid_node`` makes the same checks (the decode of an internal node took 15-20 us more with the
    Python ones). O(size)."""
    if speedups is not None:
        if speedups.valid_node(node.leaf, node.keys, node.kids, node.cols, node.shifts):
            return node
        raise _inconsistent(node)
    size = len(node.keys)
    parts: list[Sequence[Any]] = [node.keys, *node.cols] if node.leaf else [node.keys, node.kids, *node.cols]
    if all(type(part) in _ARRAYS and len(part) == size for part in parts) and _KINDS_OF_KEYS.issuperset(
        map(type, node.keys)
    ):
        allowed = _KINDS_OF_VALUES if node.leaf else _KINDS_OF_SUMS
        if all(allowed.issuperset(map(type, part)) for part in parts[1:]) and (
            all(all(map(math.isfinite, part)) for part in parts[1:]) if node.leaf else _in_range(node)
        ):
            return node
    raise _inconsistent(node)


def _inconsistent(node: Node) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"node {node.id} is inconsistent (its keys and columns differ in kind or length, or hold "
        "what they cannot); run `tallytree check` to locate the damage"
    )


def _in_range(node: Node) -> bool:
    """Whether an internal node's numbers (typed already) are ones a commit can write: at least one
    child, child ids and counts from 1 and float counts from 0 (all below 2**63, none shifted), the
    sums' shifts in ``[0, _MAX_SHIFT]``. The sums may be any int. O(size)."""
    cols, kids = node.cols, node.kids
    fields = (len(cols) - 1) // 2
    counts = [cols[0], *cols[1 + fields :]]
    return (
        len(kids) > 0
        and min(kids) >= 1
        and max(kids) <= _INT64_MAX
        and min(cols[0]) >= 1
        and all(min(column) >= 0 and max(column) <= _INT64_MAX for column in counts)
        and all(type(shift) is int and 0 <= shift <= _MAX_SHIFT for shift in node.shifts)
        and not any(node.shifts[0:1] + node.shifts[1 + fields :])  # counts are never shifted
    )


def decode_node(data: bytes, node_id: int) -> Node:
    """Deserialize a committed node; raise CorruptDatabaseError if it is malformed. O(size).

    With the C kernels, the node is untracked by the cyclic garbage collector, as a frozen one is
    (see :meth:`Node.freeze`), and a leaf of floats and int64s is its image alone (:meth:`Node.compact`).
    """
    if speedups is None:
        return _decode(data, node_id)
    node = compact_leaf(data, node_id)
    return node if node is not None else speedups.untrack(_decode(data, node_id))


def compact_leaf(data: bytes, node_id: int) -> Node | None:
    """The stored leaf ``data`` as a compact node (:meth:`Node.compact`, untracked by the cyclic
    garbage collector), or None without the C kernels or for bytes their image does not hold (not a
    leaf, or a column that mixes ints and floats). What :func:`decode_node` makes of a leaf, and what
    a commit caches for a leaf it writes. O(size)."""
    if speedups is None or type(data) is not bytes:
        return None
    image = speedups.leaf_image(data)
    return speedups.untrack(Node.compact(node_id, *image)) if image is not None else None


def decode_pending(data: bytes) -> Node:
    """Deserialize the pending node a root record holds (see ``_tree``); raise CorruptDatabaseError
    unless it is one. Such a node has no id of its own (0). O(size).

    With the C kernels it is decoded compact, as a leaf is (its search image alone, see
    :meth:`Node.compact`): a new event's commit appends to the record's bytes without a node
    (``_tree.appended``), so the first read after it decodes the new pending node, and a read of
    totals needs only its searches and, for a window that takes every pending entry, the record's
    pending totals. 1.3 us for 32 events, where a decode into tuples takes 7.3."""
    if speedups is not None and type(data) is bytes and (compact := speedups.leaf_image(data, PENDING)):
        node: Node = speedups.untrack(Node.compact(0, *compact))
        node.pending = True
        node._packed = data
        return node
    try:
        node = decode_node(data, 0)
    except CorruptDatabaseError as exc:
        raise CorruptDatabaseError(f"the pending entries of a root record cannot be decoded: {exc}") from exc
    if not node.pending:
        raise CorruptDatabaseError(
            "a root record holds a node that is not a pending node; run `tallytree check` to locate it"
        )
    node._packed = data  # written again as it is while the node stays the same (``encode_root``)
    return node


def _decode(data: bytes, node_id: int) -> Node:
    try:
        parts = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=False)  # see freeze()
        kind = parts[0]
        if kind == LEAF and len(parts) >= 2:
            return _consistent(Node(node_id, True, parts[1], parts[2:]))
        if kind == PENDING and len(parts) >= 2 and parts[1]:
            node = _consistent(Node(node_id, True, parts[1], parts[2:]))
            node.pending = True
            return node
        if kind == INTERNAL and len(parts) >= 5 and len(parts) % 2 == 1 and len(parts[3]) == len(parts) - 4:
            node = _consistent(Node(node_id, False, parts[1], parts[4:], parts[2], parts[3]))
            node._packed = data if type(data) is bytes else None
            return node
        if kind == INTERNAL_WIDE and len(parts) >= 6:
            counts, flat = parts[4], parts[5:]
            if sum(counts) == len(flat) and len(counts) == len(parts[3]):
                cols, at = [], 0
                for count in counts:
                    limbs = flat[at : at + count]
                    joined = speedups.join_limbs(limbs) if speedups is not None and count > 1 else None
                    cols.append(joined if joined is not None else tuple(_join_limbs(limbs)))
                    at += count
                node = _consistent(Node(node_id, False, parts[1], tuple(cols), parts[2], parts[3]))  # type: ignore[arg-type]
                node._packed = data if type(data) is bytes else None
                return node
    except CorruptDatabaseError:
        raise
    except Exception as exc:
        raise CorruptDatabaseError(
            f"node {node_id} cannot be decoded ({exc}); run `tallytree check` to locate the damage"
        ) from exc
    raise CorruptDatabaseError(
        f"node {node_id} has an unknown layout; the database may be damaged or written by another version"
    )


class _CompactNode(Node):
    """A compact leaf (:meth:`Node.compact`): a :class:`Node` whose ``keys`` and ``cols`` are made
    from its search image the first time something reads them.

    The ``__getattr__`` that makes them lives on this subclass, not on :class:`Node`: a class with a
    ``__getattr__`` has CPython 3.11 look every attribute up through it (``slot_tp_getattr_hook``:
    the type's MRO searched for ``__getattr__`` on each read, and no specialized ``LOAD_ATTR``), which
    cost each read of ``node.dirty`` or ``node.keys`` on every other node about 300 instructions."""

    __slots__ = ()

    if not TYPE_CHECKING:  # for the type checker, a node has only the attributes it declares

        def __getattr__(self, name: str) -> Any:
            """Called only for an attribute not set: a compact leaf's keys and cols, made on first use."""
            built = _native._built  # a compact node comes from the extension, whether it is in use now or not
            if name in ("keys", "cols") and type(self._blob) is bytes and built is not None:
                lists = built.leaf_lists(self._blob)
                if lists is not None:
                    self.keys, self.cols = lists
                    return lists[name == "cols"]
            raise AttributeError(f"'Node' object has no attribute {name!r}")


class _PatchedNode(Node):
    """A committed internal node that :meth:`Node.bumped` made: its stored bytes (``_packed``), its
    keys and shifts, the node it was made from (``_base``, one with tuples) and a patch
    (``_patch``, child index -> ``(kid, column values ...)`` at the columns' scales) for the children
    whose id or summary differ from the base's. Its ``kids`` and ``cols`` are made from those the
    first time something reads them, and the node then becomes a plain :class:`Node` (its class
    set, the base and patch dropped); a write's descent reads a child id with :meth:`kid`, and the
    next bump patches the same base (see the C kernels' "Patched nodes").

    The two are properties of this class, where ``_CompactNode`` has a ``__getattr__``: a class with
    one has CPython 3.11 look every attribute up through it (see ``_CompactNode``), which a write's
    reads of the node's other attributes paid (~10,000 instructions per scattered commit in
    callgrind, tried first)."""

    __slots__ = ()  # Node's layout: the class can be set to Node once the tuples are made

    def __init__(
        self,
        node_id: int,
        keys: Any,
        shifts: Any,
        base: Node,
        patch: dict[int, tuple[int, ...]],
        packed: bytes,
    ) -> None:
        # Node.__init__'s attributes, but kids and cols: made from the base and patch when read
        self.id = node_id
        self.leaf = False
        self.keys = keys
        self.shifts = shifts
        self.dirty = False
        self.pending = False
        self._blob = None
        self._counts = None
        self._table = None
        self._rows = None
        self._reads = 0
        self._hot = None
        self._packed = packed
        self._origin = None
        self._base = base
        self._patch = patch

    def kid(self, index: int) -> int:
        base, patch = self._base, self._patch
        if base is None or patch is None:  # made already (a plain node now: not called again)
            return self.kids[index]
        entry = patch.get(index)
        return base.kids[index] if entry is None else entry[0]

    if not TYPE_CHECKING:  # for the type checker, a node has the attributes Node declares

        @property
        def kids(self) -> tuple[int, ...]:
            return self._made()[0]

        @property
        def cols(self) -> tuple[tuple[int, ...], ...]:
            return self._made()[1]

    def _made(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """The kids and cols, made from the base and patch, once: the kernel sets them in the node's
        slots and makes it a plain Node, with no Python code run (no thread sees it half made)."""
        built = _native._built  # a patched node comes from the extension, whether it is in use now or not
        made = built.make_patched(self, Node, (len(self.shifts) - 1) // 2) if built is not None else None
        if made is None:
            raise CorruptDatabaseError(f"node {self.id}: its changes do not fit the node they were made from")
        return made


def _patch_of(node: Node) -> tuple[Node, dict[int, tuple[int, ...]] | None]:
    """The node a bump starts from and the patch to apply to it: a patched node's base and patch, else
    the node itself and None (a plain node, or a patched one made plain since). O(1)."""
    if type(node) is _PatchedNode:
        base, patch = node._base, node._patch
        if base is not None and patch is not None:
            return base, patch
    return node, None


_KEYS_SLOT: Any = Node.__dict__["keys"]  # the slot's descriptor: reading it never calls __getattr__


def _is_compact(node: Node) -> bool:
    """Whether ``node`` is a compact leaf whose lists were never made (see :meth:`Node.compact`)."""
    try:
        _KEYS_SLOT.__get__(node)
    except AttributeError:
        return True
    return False
