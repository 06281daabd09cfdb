"""The node byte format: every form round-trips, and the wide form is used only when needed."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tallytree import CorruptDatabaseError
from tallytree._node import INTERNAL, INTERNAL_WIDE, LEAF, Node, decode_node, encode_node


def _internal(sums: list[int]) -> Node:
    size = len(sums)
    keys = [b""] + [bytes([0x30, index]) for index in range(1, size)]
    cols = [[1] * size, sums, [0] * size]  # count, the scaled sums of one field, its float count
    return Node(9, False, keys, cols, list(range(100, 100 + size)), [0, 3, 0], dirty=True)


def _kind(data: bytes) -> int:
    kind: int = msgpack.unpackb(data)[0]
    return kind


def _same(decoded: Node, node: Node) -> bool:
    def fields(each: Node) -> tuple[object, ...]:
        return (
            each.leaf,
            list(each.keys),
            list(each.kids),
            list(each.shifts),
            [list(col) for col in each.cols],
        )

    return fields(decoded) == fields(node)


@pytest.mark.parametrize(
    ("sums", "kind"),
    [
        ([5, -7, 2**40], INTERNAL),
        ([2**63 - 1, -(2**63)], INTERNAL),
        ([2**64 - 1, 0], INTERNAL),  # msgpack packs uint64 too: still the plain form
        ([2**64, 1], INTERNAL_WIDE),
        ([-(2**63) - 1, 1], INTERNAL_WIDE),
        ([2**200 + 12345, -(2**130) + 7, 3], INTERNAL_WIDE),  # several limbs
    ],
)
def test_internal_nodes_round_trip_in_the_smallest_form(sums: list[int], kind: int) -> None:
    node = _internal(sums)
    data = encode_node(node)
    assert _kind(data) == kind
    decoded = decode_node(data, 9)
    assert _same(decoded, node) and not decoded.dirty


@given(st.lists(st.integers(min_value=-(2**300), max_value=2**300), min_size=1, max_size=20))
def test_any_sums_round_trip(sums: list[int]) -> None:
    node = _internal(sums)
    assert _same(decode_node(encode_node(node), 9), node)


def test_leaves_round_trip() -> None:
    leaf = Node(4, True, [b"a", b"b"], [[0.5, 2], [7, -1]], dirty=True)
    data = encode_node(leaf)
    assert _kind(data) == LEAF
    assert _same(decode_node(data, 4), leaf)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", msgpack.packb([9, [], []]), msgpack.packb([INTERNAL, [b""], [1]]), msgpack.packb("node")],
)
def test_malformed_nodes_raise_corrupt_database_error(data: bytes) -> None:
    with pytest.raises(CorruptDatabaseError, match="node 3"):
        decode_node(data, 3)


def test_decoded_and_committed_nodes_are_frozen_and_copies_are_not() -> None:
    leaf = decode_node(encode_node(Node(4, True, [b"a", b"b"], [[0.5, 2]], dirty=True)), 4)
    with pytest.raises((TypeError, AttributeError)):
        leaf.keys.insert(0, b"0")
    with pytest.raises((TypeError, AttributeError)):
        leaf.cols[0][0] = 1.5
    copy = leaf.copy(5)
    copy.keys.insert(0, b"0")
    copy.cols[0].insert(0, 7)
    assert copy.dirty and list(leaf.keys) == [b"a", b"b"] and list(leaf.cols[0]) == [0.5, 2]
    copy.freeze()
    assert not copy.dirty and copy.keys == (b"0", b"a", b"b") and copy.cols == ((7, 0.5, 2),)
    with pytest.raises((TypeError, AttributeError)):
        copy.cols.append((1,))  # the holder of the columns too


def test_committed_nodes_leave_no_container_tracked_by_the_garbage_collector() -> None:
    """Tuples of bytes and numbers are untracked after one collection; lists never are, and a
    full collection walks every tracked container of every cached node."""
    import gc

    wide = _internal([2**100 + 3, -(2**90), 5])
    nodes = [decode_node(encode_node(wide), 9), decode_node(encode_node(_internal([1, 2, 3])), 8)]
    nodes.append(decode_node(encode_node(Node(4, True, [b"a", b"b"], [[0.5, 2]], dirty=True)), 4))
    copy = nodes[-1].copy(5)
    copy.counts(), copy.freeze()
    nodes.append(copy)
    for node in nodes:
        node.counts(), node.prefixes(1)
        if not node.leaf:
            node.rows()
    for _ in range(3):  # a tuple is untracked once its items are: nested tuples take a look each
        gc.collect()
    tracked = [
        name
        for node in nodes
        for name in ("keys", "kids", "cols", "shifts", "_counts", "_rows", "_table")
        if gc.is_tracked(getattr(node, name))
    ]
    assert tracked == []


def _fresh(node: Node) -> Node:
    """The same node built anew: no limbs kept from an earlier encoding or decoding."""
    return Node(
        node.id,
        node.leaf,
        list(node.keys),
        [list(col) for col in node.cols],
        list(node.kids),
        list(node.shifts),
    )


_WIDE = st.integers(min_value=-(2**200), max_value=2**200)


@given(
    st.lists(_WIDE, min_size=2, max_size=12),
    st.lists(st.tuples(st.integers(min_value=0, max_value=11), st.integers(0, 3), _WIDE), max_size=12),
)
def test_a_changed_wide_node_encodes_as_a_fresh_one(
    sums: list[int], changes: list[tuple[int, int, int]]
) -> None:
    """A wide node's bytes depend only on its contents, whatever the change: a value that needs
    another limb or one fewer, a delta with fewer trailing zeros (a lower shift), a structural change."""
    node = decode_node(encode_node(_internal(sums)), 9).copy(10)
    for position, kind, amount in changes:
        index = position % len(node.keys)
        if kind == 0:
            node.add(index, [0, amount, 0])
        elif kind == 1:
            node.add(index, [0, amount << 40, 0])  # a multiple of the shift
        elif kind == 2 and len(node.keys) > 2:
            node.remove_child(index)
        else:
            node.insert_child(index, bytes([0x30, 0x80]), 99, [1, amount, 0])
        assert encode_node(node) == encode_node(_fresh(node))
        node = decode_node(encode_node(node), node.id).copy(node.id + 1)
        assert _same(node, _fresh(node))


@pytest.mark.parametrize("shrunk", [2**64 - 1, 2**63, 2**63 - 1, 5, -(2**63)])
def test_a_wide_node_whose_sums_shrink_back_is_written_plain(shrunk: int) -> None:
    """A node decoded wide is written plain once its sums fit msgpack's ints again (up to
    2**64 - 1, above int64's range included), as a fresh node would be."""
    node = decode_node(encode_node(_internal([2**100, 7, 5])), 9).copy(10)
    node.add(0, [0, (shrunk - 2**100) << 3, 0])
    data = encode_node(node)
    assert _kind(data) == INTERNAL and data == encode_node(_fresh(node))
    assert _same(decode_node(data, 10), _fresh(node))


_SAMPLES = [
    encode_node(Node(4, True, [b"a", b"b", b"c"], [[0.5, 2, -1.25], [1, 2, 3]], dirty=True)),
    encode_node(_internal([5, -7, 2**40])),
    encode_node(_internal([2**100 + 3, -(2**90), 5])),  # the wide form
]


@given(
    st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)
)
def test_damaged_node_bytes_decode_consistently_or_raise_a_typed_error(
    data: bytes, damage: list[tuple[int, int]]
) -> None:
    """Any byte changes: either a node whose arrays agree (reads of it cannot fail untyped) or
    CorruptDatabaseError, never another exception."""
    damaged = bytearray(data)
    for at, value in damage:
        damaged[at % len(damaged)] = value
    try:
        node = decode_node(bytes(damaged), 7)
    except CorruptDatabaseError:
        return
    size = len(node.keys)
    assert all(len(col) == size for col in node.cols)
    assert all(type(key) is bytes for key in node.keys)
    if node.leaf:
        assert all(type(value) in (int, float) for col in node.cols for value in col)
    else:
        assert len(node.kids) == size and all(type(value) is int for col in node.cols for value in col)


@pytest.mark.parametrize(
    "parts",
    [
        [LEAF, [b"a", b"b"], [1]],  # a column shorter than the keys
        [LEAF, b"ab", [1, 2]],  # keys that are not an array
        [LEAF, [b"a", "b"], [1, 2]],  # a key that is not bytes (a search would fail untyped)
        [LEAF, [b"a", b"b"], [1, None]],  # a value that is not a number
        [LEAF, [b"a", b"b"], [1, True]],  # nor is a bool
        [LEAF, [b"a", b"b"], [1.5, math.nan]],  # values are finite (a sum would fail untyped)
        [LEAF, [b"a", b"b"], [-math.inf, 2.5]],
        [INTERNAL, [b"", b"a"], [1], [0, 0, 0], [1, 1], [2, 2], [0, 0]],  # one kid for two keys
        [INTERNAL, [b"", b"a"], [1, 2], [0, 0, 0], [1, 1], [2.5, 2], [0, 0]],  # a sum that is not an int
        [INTERNAL, [b"", b"a"], [1, -2], [0, 0, 0], [1, 1], [2, 2], [0, 0]],  # a negative child id
        [INTERNAL, [b"", b"a"], [1, 2], [0, 0, 0], [1, 0], [2, 2], [0, 0]],  # an empty child
        [INTERNAL, [b"", b"a"], [1, 2], [0, 0, 0], [1, 1], [2, 2], [0, -1]],  # a negative float count
        [INTERNAL, [b"", b"a"], [1, 2], [46, 0, 0], [1, 1], [2, 2], [0, 0]],  # a shifted count
        [INTERNAL, [b"", b"a"], [1, 2], [0, -1, 0], [1, 1], [2, 2], [0, 0]],  # a negative shift
        [INTERNAL, [b"", b"a"], [1, 2], [0, 10**6, 0], [1, 1], [2, 2], [0, 0]],  # a shift no sum has
        [INTERNAL, [], [], [0, 0, 0], [], [], []],  # no child
    ],
)
def test_inconsistent_nodes_raise_corrupt_database_error(parts: list[object]) -> None:
    with pytest.raises(CorruptDatabaseError, match="node 5 is inconsistent"):
        decode_node(msgpack.packb(parts), 5)
