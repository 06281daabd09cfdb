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
    internal:  [2, [fence, ...], [child id, ...], counts, S column 0, ..., F column 0, ...]

An S column is stored as ``[shift, m_0, m_1, ...]`` with ``S_i = m_i << shift`` (the shared trailing
zeros factored out); an ``m_i`` that does not fit in 64 bits is stored as signed big-endian bytes.
Nodes are immutable once committed and every rewrite gets a fresh, never reused id, so a decoded node
can be cached by id across transactions and processes without ever being stale.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import msgpack

from .errors import CorruptDatabaseError

__all__ = [
    "SCALE_BITS",
    "Node",
    "decode_node",
    "delta_of",
    "encode_node",
    "pack_summary",
    "sum_value",
    "unpack_summary",
]

SCALE_BITS = 1074
"""Sums are kept as exact integers in units of ``2**-1074``, the smallest positive double."""

LEAF = 1
INTERNAL = 2

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def scaled(value: int | float) -> int:
    """Return ``value * 2**1074`` as an exact int (the value must be an int or a finite float)."""
    if type(value) is int:
        return value << SCALE_BITS
    numerator, denominator = value.as_integer_ratio()  # type: ignore[union-attr]
    return numerator << (SCALE_BITS + 1 - denominator.bit_length())


def delta_of(values: tuple[int | float, ...] | list[int | float]) -> list[int]:
    """Return the summary of one item with these values: ``[1, S..., F...]``."""
    return [1, *map(scaled, values), *[int(type(value) is float) for value in values]]


def sum_value(total: int, floats: int) -> int | float:
    """Turn a scaled exact sum back into a number: an exact int, or a correctly rounded float."""
    if floats == 0:
        return total >> SCALE_BITS
    return total / (1 << SCALE_BITS)


class Node:
    """One tree node, decoded. Committed nodes are shared and must not be mutated.

    ``dirty`` nodes belong to one write transaction and are mutated in place until it commits.
    """

    __slots__ = ("_cum", "cols", "dirty", "id", "keys", "kids", "leaf")

    def __init__(
        self,
        node_id: int,
        leaf: bool,
        keys: list[bytes],
        cols: list[list[Any]],
        kids: list[int] | None = None,
        dirty: bool = False,
    ) -> None:
        self.id = node_id
        self.leaf = leaf
        self.keys = keys
        self.cols = cols
        self.kids: list[int] = kids if kids is not None else []
        self.dirty = dirty
        self._cum: dict[int, list[int]] | None = None

    def __repr__(self) -> str:
        kind = "leaf" if self.leaf else "internal"
        return f"<Node {self.id} {kind} size={len(self.keys)}{' dirty' if self.dirty else ''}>"

    def copy(self, node_id: int) -> Node:
        """Return a mutable (dirty) copy of this node under a new id."""
        return Node(
            node_id,
            self.leaf,
            list(self.keys),
            [list(col) for col in self.cols],
            list(self.kids),
            dirty=True,
        )

    def cumulative(self, column: int) -> list[int]:
        """Prefix sums of one summary column: ``result[i]`` covers children (or entries) ``< i``.

        For a leaf, column 0 is the count, ``1..F`` the scaled sums and ``F+1..2F`` the float counts,
        computed from the raw values. Cached on committed nodes; recomputed on dirty ones. O(size).
        """
        cache = self._cum
        if cache is not None:
            found = cache.get(column)
            if found is not None:
                return found
        result = self._compute_cumulative(column)
        if not self.dirty:
            if cache is None:
                cache = self._cum = {}
            cache[column] = result
        return result

    def _compute_cumulative(self, column: int) -> list[int]:
        if not self.leaf:
            return list(accumulate(self.cols[column], initial=0))
        if column == 0:
            return list(range(len(self.keys) + 1))
        nfields = len(self.cols)
        if column <= nfields:
            return list(accumulate(map(scaled, self.cols[column - 1]), initial=0))
        values = self.cols[column - 1 - nfields]
        return list(accumulate((type(value) is float for value in values), initial=0))

    def summary(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The summary of entries (leaf) or children (internal) ``start:stop``. O(size)."""
        if self.leaf:
            count = len(self.keys[start:stop])
            sums = [sum(map(scaled, col[start:stop])) for col in self.cols]
            floats = [sum(type(value) is float for value in col[start:stop]) for col in self.cols]
            return [count, *sums, *floats]
        return [sum(col[start:stop]) for col in self.cols]


def _pack_int(value: int) -> int | bytes:
    if _INT64_MIN <= value <= _INT64_MAX:
        return value
    return value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)


def _unpack_int(value: int | bytes) -> int:
    if type(value) is int:
        return value
    return int.from_bytes(value, "big", signed=True)  # type: ignore[arg-type]


def _pack_column(column: list[int]) -> list[int | bytes]:
    nonzero = [value for value in column if value]
    shift = min(((value & -value).bit_length() - 1 for value in nonzero), default=0)
    return [shift, *(_pack_int(value >> shift) for value in column)]


def _unpack_column(packed: list[Any]) -> list[int]:
    shift = packed[0]
    return [_unpack_int(value) << shift for value in packed[1:]]


def pack_summary(summary: list[int]) -> list[Any]:
    """Encode a summary vector for msgpack (big ints become bytes)."""
    return [_pack_int(value) for value in summary]


def unpack_summary(packed: list[Any]) -> list[int]:
    """Inverse of :func:`pack_summary`."""
    return [_unpack_int(value) for value in packed]


def encode_node(node: Node) -> bytes:
    """Serialize a node (format version 1). O(size)."""
    if node.leaf:
        return msgpack.packb([LEAF, node.keys, *node.cols], use_bin_type=True)  # type: ignore[no-any-return]
    nfields = (len(node.cols) - 1) // 2
    cols: list[Any] = [node.cols[0]]
    cols.extend(_pack_column(col) for col in node.cols[1 : 1 + nfields])
    cols.extend(node.cols[1 + nfields :])
    return msgpack.packb([INTERNAL, node.keys, node.kids, *cols], use_bin_type=True)  # type: ignore[no-any-return]


def decode_node(data: bytes, node_id: int) -> Node:
    """Deserialize a committed node; raise CorruptDatabaseError if it is malformed. O(size)."""
    try:
        parts = msgpack.unpackb(data, raw=False, strict_map_key=False)
        kind = parts[0]
        if kind == LEAF and len(parts) >= 2:
            return Node(node_id, True, parts[1], parts[2:])
        if kind == INTERNAL and len(parts) >= 4 and len(parts) % 2 == 0:
            nfields = (len(parts) - 4) // 2
            cols = [parts[3]]
            cols.extend(_unpack_column(col) for col in parts[4 : 4 + nfields])
            cols.extend(parts[4 + nfields :])
            return Node(node_id, False, parts[1], cols, parts[2])
    except CorruptDatabaseError:
        raise
    except Exception as exc:
        raise CorruptDatabaseError(
            f"node {node_id} cannot be decoded ({exc}); run `tallytree check` to locate the damage"
        ) from exc
    raise CorruptDatabaseError(
        f"node {node_id} has an unknown layout; "
        "the database may be damaged or written by another version"
    )
