"""Single writes from stored bytes: ``NodeTree._insert_stored``, ``_edit_stored`` and ``Node.bumped``.

An insert inside a committed tree's range merges its entry into the leaf's stored bytes, and a delete
or a value update of a scattered item edits its leaf's stored bytes (the kernel ``leaf_edit``); each
internal node of the path is then rebuilt in committed form (``Node.bumped``, the C kernel
``bump_internal``) instead of being copied into lists. These tests check that ``bumped`` makes
exactly what a dirty copy changed by ``add`` makes (the same children, the same bytes), with and
without the kernels; that such writes decode no leaf when they can take the stored path and take the
decoded one when they cannot (a split, an underfull leaf); and that the trees they write, alone or
mixed with other writes in one transaction, read as the model says and pass the checker.
"""

from __future__ import annotations

import gc
import math
import random
from collections import Counter
from typing import Any

import msgpack
import pytest
from conftest import pure_python, record_calls, strict
from hypothesis import event, given
from hypothesis import strategies as st

import tallytree
from tallytree._btree import NodeTree, Root
from tallytree._keys import encode_id, encode_key
from tallytree._native import speedups
from tallytree._node import Node, _PatchedNode, decode_node, encode_node

FIELDS = ("cost", "tokens")
needs_kernels = pytest.mark.skipif(speedups is None, reason="the stored path needs the C kernels")

SUMS = (
    st.integers(-(2**70), 2**70) | st.integers(-(2**300), 2**300) | st.sampled_from([0, 1, -1, 2**63, 2**64])
)


def _committed(size: int, nfields: int, data: st.DataObject) -> Node:
    """A committed internal node of ``size`` children: drawn summaries whose sums share trailing zero
    bits (so the columns have shifts), as a decode leaves it (tuples, with its stored bytes)."""
    zeros = data.draw(st.integers(0, 1100))
    summaries = [
        [
            data.draw(st.integers(1, 2**40)),
            *(data.draw(SUMS) << zeros for _ in range(nfields)),
            *(data.draw(st.integers(0, 2**20)) for _ in range(nfields)),
        ]
        for _ in range(size)
    ]
    keys = [b""] + [bytes([0x30, index]) for index in range(1, size)]
    node = Node.internal_from(5, keys, list(range(100, 100 + size)), summaries)
    committed = decode_node(encode_node(node), 5)
    assert committed._packed is not None and not committed.dirty
    return committed


def _expected(origin: Node, index: int, kid: int, delta: list[int]) -> Node:
    """What the decoded path makes of ``origin``: a dirty copy, its child replaced, ``add``."""
    copy = origin.copy(6)
    copy.kids[index] = kid
    copy.add(index, delta)
    return copy


@given(st.integers(1, 40), st.integers(0, 3), st.data())
def test_bumped_is_the_dirty_copy_changed_by_add(size: int, nfields: int, data: st.DataObject) -> None:
    """Any internal node (plain or wide, with shifts), any child, any delta (one its shifts divide or
    one that forces a column to be rescaled), with the kernels and without: the new node has the
    children, ids and summaries a dirty copy changed by ``add`` has, and the bytes a full pack of
    that copy writes; it is committed (never changed in place) and the original is unchanged."""
    origin = _committed(size, nfields, data)
    before = [origin.child(index) for index in range(size)]
    index = data.draw(st.integers(0, size - 1))
    kid = data.draw(st.integers(0, 2**63))
    delta = [
        data.draw(st.integers(-3, 3)),
        *(data.draw(SUMS) << data.draw(st.integers(0, 1100)) for _ in range(nfields)),
        *(data.draw(st.integers(-3, 3)) for _ in range(nfields)),
    ]
    expected = _expected(origin, index, kid, delta)
    with pure_python():
        full = encode_node(expected)
    for mode in ("kernels", "python"):
        if mode == "kernels":
            bumped = origin.bumped(7, index, kid, delta)
        else:
            with pure_python():
                bumped = origin.bumped(7, index, kid, delta)
        assert bumped.id == 7 and not bumped.dirty and not bumped.leaf, mode
        assert type(bumped.kids) is tuple and all(type(col) is tuple for col in bumped.cols), mode
        assert list(bumped.kids) == expected.kids, mode
        assert [bumped.child(at) for at in range(size)] == [expected.child(at) for at in range(size)], mode
        assert bumped.packed() == full, mode
        assert [origin.child(at) for at in range(size)] == before
        assert origin.kids == tuple(range(100, 100 + size))


@needs_kernels
def test_bump_internal_refuses_what_it_does_not_take() -> None:
    """A shift that does not divide the amount, an index past the children and a delta of another
    width give None (the Python code takes those); wrong argument types raise TypeError."""
    assert speedups is not None
    node = Node.internal_from(5, [b"", b"m"], [1, 2], [[3, 8 << 40, 0], [4, 4 << 40, 0]])
    node.freeze()
    node._packed = encode_node(node)
    assert node.shifts[1] == 42  # the two sums share 42 trailing zero bits
    made = speedups.bump_internal(node, node._packed, 1, 9, [1, 4 << 42, 0], 1)
    assert made is not None and made[0] == {1: (9, 5, 5, 0)} and type(made[1]) is bytes  # a patch
    assert speedups.patched_parts(node, made[0], 1) == ((1, 9), ((3, 5), (2, 5), (0, 0)))
    assert speedups.bump_internal(node, node._packed, 1, 9, [1, 1 << 41, 0], 1) is None  # rescale
    assert speedups.bump_internal(node, node._packed, 2, 9, [1, 0, 0], 1) is None  # no child 2
    assert speedups.bump_internal(node, node._packed, 0, 9, [1, 0], 1) is None  # too short
    assert speedups.bump_internal(node, None, 0, 9, [1, 0, 0], 1) is not None  # packed in full
    for bad in (
        (node, bytearray(node._packed), 0, 9, [1, 0, 0], 1),
        (node, node._packed, 0, 9, (1, 0, 0), 1),
        (node, node._packed, 0, 9, [1.0, 0, 0], 1),
        (node, node._packed, "0", 9, [1, 0, 0], 1),
    ):
        with pytest.raises(TypeError):
            speedups.bump_internal(*bad)


def _unmade(node: Node) -> bool:
    """Whether ``node`` is a patched node whose kids and cols were never made (see Node.bumped)."""
    return type(node) is _PatchedNode and node._patch is not None


@needs_kernels
@given(st.integers(1, 40), st.integers(0, 3), st.integers(1, 60), st.data())
def test_a_chain_of_bumps_is_the_chain_of_dirty_copies(
    size: int, nfields: int, steps: int, data: st.DataObject
) -> None:
    """Each bump of a bumped node, as one insert after another makes them: the node stays a patch of
    the first one's base while it has at most 16 changed children, then becomes tuples, and becomes a
    patch again at the next bump; at every step, its child ids (read with ``kid``, which makes
    nothing), summaries and bytes are those of the dirty copy changed by ``add`` step after step,
    whether or not something read its kids in between (which makes its tuples)."""
    node = _committed(size, nfields, data)
    model = node
    shapes: set[str] = set()
    for step in range(steps):
        index = data.draw(st.integers(0, size - 1), label="index")
        kid = data.draw(st.integers(0, 2**63), label="kid")
        delta = [data.draw(st.integers(-3, 3))] + [0] * (2 * nfields)
        if nfields:  # an amount the column's shift divides (the kernel's case), or one it does not
            delta[1] = data.draw(st.sampled_from([0, 1, 2**1072, -(2**1080)]))
            delta[1 + nfields] = data.draw(st.integers(-3, 3))
        expected = _expected(model, index, kid, delta)
        with pure_python():
            full = encode_node(expected)
        patched_before = _unmade(node)
        node = node.bumped(10 + step, index, kid, delta)
        assert node.id == 10 + step and not node.dirty and node.packed() == full, step
        assert [node.kid(at) for at in range(size)] == expected.kids
        if _unmade(node):  # (else tuples: past 16 children, or a column rescaled by the dirty copy)
            assert node._patch is not None and 1 <= len(node._patch) <= 16
            assert node._base is not None and not _unmade(node._base)  # never a patch of a patch
            shapes.add("patch" if not patched_before else "patch of a patch's base")
        else:
            shapes.add("tuples")
        if data.draw(st.booleans(), label="read"):
            assert [node.child(at) for at in range(size)] == [expected.child(at) for at in range(size)]
            assert type(node) is Node and type(node.kids) is tuple and not _unmade(node)
        expected.freeze()
        model = expected
    assert list(node.kids) == list(model.kids)
    assert [node.child(at) for at in range(size)] == [model.child(at) for at in range(size)]
    event(" ".join(sorted(shapes)))


@needs_kernels
def test_patched_nodes_make_their_tuples_on_first_read() -> None:
    """A bumped node holds no tuples of its children until something reads ``kids`` or ``cols``; then
    it is a plain node, its base and patch dropped, and reads as the dirty copy does. More than 16
    changed children make the tuples at the bump, and so does the bump of a node a read used. A
    patch that does not fit its base is refused."""
    assert speedups is not None
    origin = _uniform(20, 3, 5, 14)
    node = origin
    for step in range(16):
        node = node.bumped(50 + step, step, 1000 + step, [1, 2, 6, 1, 0])
        assert _unmade(node) and node._base is origin and len(node._patch or ()) == step + 1
    assert node.kid(3) == 1003 and node.kid(17) == origin.kids[17] and _unmade(node)
    made = node.bumped(70, 16, 1016, [1, 2, 6, 1, 0])  # the 17th child changed: tuples
    assert (
        type(made) is Node
        and made.kids[:17] == tuple(range(1000, 1017))
        and made.kids[17:] == (117, 118, 119)
    )
    assert node.cols[0][:16] == (4,) * 16 and type(node) is Node and node._patch is None
    again = made.bumped(71, 0, 5, [1, 0, 0, 0, 0])
    assert _unmade(again) and again._base is made and again.kid(0) == 5 and again.cols[0][0] == 5
    assert again.counts()[1] == 5  # a read derived its cumulative counts: reads follow writes here
    read = again.bumped(72, 1, 6, [1, 0, 0, 0, 0])  # so the next bump makes tuples at once
    assert type(read) is Node and read.kids[:3] == (5, 6, 1002) and read.cols[0][:2] == (5, 5)
    assert _unmade(read.bumped(73, 2, 7, [1, 0, 0, 0, 0]))  # which nothing read: patched again
    for bad in ({0: (1, 2)}, {99: (1, 2, 3, 4, 5, 6)}, {"0": (1, 2, 3, 4, 5, 6)}):
        assert speedups.patched_parts(origin, bad, 2) is None
        assert speedups.bump_internal(origin, origin._packed, 1, 9, [1, 0, 0, 0, 0], 2, bad) is None
    with pytest.raises(TypeError):
        speedups.bump_internal(origin, origin._packed, 1, 9, [1, 0, 0, 0, 0], 2, [(0, 1)])
    with pytest.raises(TypeError):
        speedups.bump_internal(origin, origin._packed, 1, 9, [1, 0, 0, 0, 0], 2, None, 1)  # not a bool
    patched = origin.bumped(80, 0, 9, [1, 0, 0, 0, 0])
    for args in ((patched, "Node", 2), (patched, Node, "2"), (patched, Node)):
        with pytest.raises(TypeError):
            speedups.make_patched(*args)
    assert _unmade(patched)  # refused calls changed nothing
    patched._patch = {0: (1, 2)}  # damage: the node refuses to make its tuples, with the typed error
    with pytest.raises(tallytree.CorruptDatabaseError):
        patched.kids  # noqa: B018 (the read is the test)
    assert speedups.make_patched(patched, Node, 2) is None and _unmade(patched)


_SLOTS = [name for name in Node.__slots__ if name not in ("kids", "cols", "_layout")]


def _slots(node: Node) -> dict[str, Any]:
    """Every slot of ``node`` as it is set (unset ones left out), read from the slots themselves (a
    patched node's kids and cols are not made)."""
    found = {}
    for name in (*_SLOTS, "kids", "cols"):
        try:
            found[name] = Node.__dict__[name].__get__(node)
        except AttributeError:
            continue
    return found


@needs_kernels
@given(st.integers(1, 4), st.integers(0, 2), st.data())
def test_bump_path_bumps_each_level_as_bumped_does(levels: int, nfields: int, data: st.DataObject) -> None:
    """``bump_path`` (the kernel a write from stored bytes rebuilds its path with) makes, level by level
    from the bottom up, the node ``Node.bumped`` makes: the same class (a patch, or tuples for a node
    a read used or one past 16 patched children), the same slots, bytes and children, untracked by
    the garbage collector. It stops at the first level ``bumped`` leaves to the dirty copy (a column
    to rescale), having made only the levels below."""
    assert speedups is not None
    path: list[tuple[Node, int]] = []
    for _ in range(levels):
        size = data.draw(st.integers(1, 30))
        node = _committed(size, nfields, data)
        for step in range(data.draw(st.integers(0, 20))):  # an earlier bump or more: a patched node
            node = node.bumped(
                200 + step, data.draw(st.integers(0, size - 1)), 300 + step, [1] + [0] * 2 * nfields
            )
        if data.draw(st.booleans()):
            node.counts()  # a node reads used (made plain, if patched)
        path.append((node, data.draw(st.integers(0, size - 1))))
    ids = [1000 + level for level in range(levels)]
    delta = [1] + [0] * (2 * nfields)
    if nfields:  # an amount every shift divides (the kernel's case), or one some shift may not
        delta[1] = data.draw(st.sampled_from([0, 3 << 1100, 1, -(2**1080)]))
    made = speedups.bump_path(path, ids, 99, delta, Node, _PatchedNode)
    child = 99
    for level in range(levels - 1, -1, -1):
        node, index = path[level]
        depth = levels - 1 - level  # made[depth] is this level's node, when made
        if depth == len(made):  # where it stopped: bumped leaves this level to the dirty copy
            base, patch = (node._base, node._patch) if type(node) is _PatchedNode else (node, None)
            bumped = speedups.bump_internal(base, node._packed, index, child, delta, nfields, patch)
            assert bumped is None or (len(bumped) == 3 and bumped[2] is None), level
            break
        expected = node.bumped(ids[level], index, child, delta)
        new = made[depth]
        assert type(new) is type(expected) and new.id == ids[level], level
        assert _slots(new).keys() == _slots(expected).keys(), level
        for name, value in _slots(expected).items():
            if name in ("_base", "keys", "shifts"):
                assert _slots(new)[name] is value, (level, name)
            else:
                assert _slots(new)[name] == value, (level, name)
        assert not gc.is_tracked(new)
        _assert_layout(new, nfields)
        assert [new.kid(at) for at in range(len(node.keys))] == [
            expected.kid(at) for at in range(len(node.keys))
        ]
        assert [new.child(at) for at in range(len(node.keys))] == [
            expected.child(at) for at in range(len(node.keys))
        ]
        child = ids[level]
    event(f"made {len(made)} of {levels}")


def _assert_layout(node: Node, nfields: int) -> bool:
    """That a node ``bump_path`` made holds the layout of its own bytes (the places a whole walk of
    them finds), or none; whether it holds one."""
    assert speedups is not None
    layout = Node.__dict__["_layout"].__get__(node)
    if layout is None:
        return False
    assert layout[0] is node._packed
    assert layout[1] == speedups.packed_layout(node._packed, len(node.keys), 1 + 2 * nfields)
    return True


@needs_kernels
@given(st.integers(1, 40), st.integers(0, 3), st.integers(1, 50), st.data())
def test_a_chain_of_path_bumps_carries_each_layout(
    size: int, nfields: int, steps: int, data: st.DataObject
) -> None:
    """Bumps by ``bump_path``, one after another, as a node on every write's path has them: each
    node's bytes are those ``Node.bumped`` makes of the same node (which walks the bytes whole), and
    the layout each carries to the next (moved by each edit) is the one a whole walk of its bytes
    finds, whatever numbers change size (ids, counts and sums of every width, sums that make the
    node wide)."""
    assert speedups is not None
    node = _committed(size, nfields, data)
    laid = 0
    for step in range(steps):
        index = data.draw(st.integers(0, size - 1), label="index")
        kid = data.draw(st.sampled_from([7, 300, 70_000, 2**40, 2**63 - 1, node.kid(index)]), label="kid")
        delta = [data.draw(st.integers(-3, 3))] + [0] * (2 * nfields)
        if nfields:
            delta[1] = data.draw(st.sampled_from([0, 1 << 1100, -(1 << 1100), (2**64) << 1100, 1]))
            delta[1 + nfields] = data.draw(st.sampled_from([0, 1, -1, 200, 2**33, -(2**40)]))
        expected = node.bumped(10 + step, index, kid, delta)
        made = speedups.bump_path([(node, index)], [10 + step], kid, delta, Node, _PatchedNode)
        if not made:  # a column to rescale: the Python code's (no layout)
            node = expected
            continue
        (new,) = made
        assert new.packed() == expected.packed() and type(new) is type(expected), step
        assert [new.child(at) for at in range(size)] == [expected.child(at) for at in range(size)]
        laid += _assert_layout(new, nfields)
        node = new
    event(f"laid {min(laid, 3)}+")


@needs_kernels
def test_bump_path_refuses_what_it_does_not_take() -> None:
    """Wrong argument types, ids that do not match the path and classes of another layout raise
    TypeError; a node of another class ends the levels it makes (the Python code bumps it)."""
    assert speedups is not None
    node = _uniform(5, 1, 1, 3)
    path = [(node, 2)]
    for bad in (
        ((node, 2), [7], 9, [1, 0, 0, 0, 0], Node, _PatchedNode),  # path not a list
        (path, [7, 8], 9, [1, 0, 0, 0, 0], Node, _PatchedNode),  # an id per node
        (path, ["7"], 9, [1, 0, 0, 0, 0], Node, _PatchedNode),
        ([node], [7], 9, [1, 0, 0, 0, 0], Node, _PatchedNode),  # not (node, index)
        (path, [7], 9, (1, 0, 0, 0, 0), Node, _PatchedNode),
        (path, [7], 9, [1, 0, 0, 0, 0], Node, int),  # not a subclass of Node
        (path, [7], 9, [1, 0, 0, 0, 0], int, bool),  # no node slots
    ):
        with pytest.raises(TypeError):
            speedups.bump_path(*bad)
    expected = node.bumped(8, 2, 9, [1, 0, 0, 0, 0])
    made = speedups.bump_path([(object(), 0), (node, 2)], [7, 8], 9, [1, 0, 0, 0, 0], Node, _PatchedNode)
    assert len(made) == 1 and made[0].id == 8 and made[0].packed() == expected.packed()  # then stops
    assert (
        speedups.bump_path([(node, 2), (object(), 0)], [7, 8], 9, [1, 0, 0, 0, 0], Node, _PatchedNode) == []
    )


@needs_kernels
def test_the_stored_descent_is_the_python_descent(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel ``stored_path`` (a write's descent in one call) finds the path the Python descent
    finds (the same node objects, child indexes and right-edge flag), or None where it gives None: in
    a write transaction that has changed no node (children taken from the node cache, counted as its
    hits), after writes from stored bytes in it (patched nodes: children read through their patches),
    and after writes that split leaves (dirty nodes: None on their paths)."""
    from tallytree import _btree

    events, rows = _loaded(db, 300, 9)
    rng = random.Random(10)
    entries = [encode_key(key) + encode_id(item_id) for key, item_id in rows]
    entries += [encode_key(rng.randrange(-5, 3100)) + encode_id("q") for _ in range(60)]

    def compare(tx: tallytree.WriteTransaction, fresh: bool = False) -> Counter[str]:
        root = tx.root(events._tree_key(None))
        assert root is not None
        tree = NodeTree(tx, len(FIELDS), events.node_size, root)
        found: Counter[str] = Counter()
        for entry in entries:
            hits = tx._cache.hits
            kernel = tree._stored_path(entry)
            taken = tx._cache.hits - hits
            with monkeypatch.context() as patched:
                patched.setattr(_btree, "speedups", None)
                python = tree._stored_path(entry)
            if kernel is None or python is None:
                assert kernel is None and python is None, entry
                found["none"] += 1
                continue
            assert [(id(node), index) for node, index in kernel[0]] == [
                (id(node), index) for node, index in python[0]
            ]
            assert kernel[1:] == python[1:] and len(kernel[0]) == root.height - 1  # right edge, ids
            if fresh:  # the root (through tx.node) and each child below it (from the cache's store)
                assert taken == root.height - 1
            found["patched" if any(type(node) is _PatchedNode for node, _ in kernel[0]) else "plain"] += 1
            found["right edge"] += kernel[1]
        return found

    with db.write() as tx:  # leaves split, some with room left
        for key in range(15, 2990, 150):
            events.insert(tx, key, "s", (0.25, key))
            rows[(key, "s")] = (0.25, key)
    keys = [key for key in range(1, 2990) if key % 10 and (key, "n") not in rows]
    roomy = [key for key in keys if _leaf_of(db, events, key, "n")[0] < 4]  # written from stored bytes
    roomy = roomy[::7][:3]  # (in different leaves)
    full = next(key for key in keys if _leaf_of(db, events, key, "n")[0] == 4)  # one that splits its leaf
    with db.read() as tx:  # every node cached
        assert len(list(events.items(tx))) == len(rows)
    with db.write() as tx:
        assert tx.shared is tx._cache.shared  # no node changed: a descent may take committed nodes directly
        kinds = compare(tx, fresh=True)
        assert kinds["plain"] == len(entries) and kinds["right edge"] > 0, kinds
        for key in roomy:
            events.insert(tx, key, "n", (0.5, key))
            rows[(key, "n")] = (0.5, key)
        assert tx.shared is None  # its own nodes come first
        kinds = compare(tx)
        assert kinds["patched"] > 0 and kinds["none"] == 0, kinds
        events.insert(tx, full, "n", (0.5, full))
        rows[(full, "n")] = (0.5, full)
        kinds = compare(tx)
        assert kinds["none"] > 0, kinds  # (the root is dirty now: every path)
    _assert_matches(db, events, rows)


@needs_kernels
def test_stored_path_refuses_what_it_does_not_take(db: tallytree.Database) -> None:
    """Wrong argument types raise TypeError; a tree of one level, a root of another class and a dirty
    node give None (the Python code's cases)."""
    assert speedups is not None
    node = _uniform(5, 1, 1, 3)
    entry = bytes([0x30, 0, 2])
    fetch: Any = {}.__getitem__
    found = speedups.stored_path(node, entry, 2, fetch, None, Node, _PatchedNode)
    assert found == ([(node, 2)], False, 0, [5, 102])  # the node's id, then its child's
    for bad in (
        (node, bytearray(entry), 2, fetch, None, Node, _PatchedNode),
        (node, entry, 2.0, fetch, None, Node, _PatchedNode),
        (node, entry, 2, None, None, Node, _PatchedNode),
        (node, entry, 2, fetch, [], Node, _PatchedNode),
        (node, entry, 2, fetch, None, Node, int),
    ):
        with pytest.raises(TypeError):
            speedups.stored_path(*bad)
    assert speedups.stored_path(node, entry, 1, fetch, None, Node, _PatchedNode) is None
    assert speedups.stored_path(object(), entry, 2, fetch, None, Node, _PatchedNode) is None
    dirty = node.copy(6)
    assert speedups.stored_path(dirty, entry, 2, fetch, None, Node, _PatchedNode) is None
    odd = _uniform(5, 1, 1, 3)
    odd.keys = (b"", 1, 2, 3, 4)  # damage: keys that are not bytes
    assert speedups.stored_path(odd, entry, 2, fetch, None, Node, _PatchedNode) is None
    assert speedups.stored_path(node, b"", 2, fetch, None, Node, _PatchedNode) is not None  # (the fence)
    child = _uniform(4, 1, 1, 3)
    top = _uniform(3, 1, 1, 3, kids=[child.id, 8, 9])
    # a child from the store (a dict here, as without the NodeTable), then one from fetch
    assert speedups.stored_path(top, b"\x00", 3, fetch, {child.id: child}, Node, _PatchedNode) == (
        [(top, 0), (child, 0)],
        False,
        1,
        [5, 5, 100],
    )
    assert speedups.stored_path(top, b"\x00", 3, {child.id: child}.__getitem__, None, Node, _PatchedNode) == (
        [(top, 0), (child, 0)],
        False,
        0,
        [5, 5, 100],
    )
    with pytest.raises(KeyError):  # what fetch raises goes through
        speedups.stored_path(top, b"\x00", 3, fetch, None, Node, _PatchedNode)


# One value of each stored width, as msgpack writes ints: fixints, 1, 2, 4 and 8 bytes, signed and
# unsigned, and beyond (wide); odd, so that no column gets a shift.
WIDTHS = [
    5,
    201,
    60_001,
    2**20 + 1,
    2**40 + 1,
    -5,
    -101,
    -1001,
    -(10**6) - 1,
    -(2**40) - 1,
    2**63 + 1,
    2**100 + 1,
]


def _uniform(size: int, count: int, total: int, key_length: int, kids: list[int] | None = None) -> Node:
    """A committed internal node of ``size`` children, two fields, its columns runs of one number each
    (one width each: the stored walk skips such runs eight or four numbers at a time), its keys of
    one length (bin 8 or bin 16)."""
    keys = [b""] + [bytes([0x30]) + index.to_bytes(key_length - 1, "big") for index in range(1, size)]
    summaries = [[count, total, 3 * total, count, 0] for _ in range(size)]
    node = Node.internal_from(5, keys, kids or list(range(100, 100 + size)), summaries)
    committed = decode_node(encode_node(node), 5)
    assert committed._packed is not None and list(committed.shifts) == [0] * 5
    return committed


def _form(packed: bytes) -> tuple[int, Any]:
    """An internal node's stored form, plain (2) or wide (3), and a wide one's limbs per column:
    what a repack keeps (it leaves a node whose form changes to the full pack)."""
    parts = msgpack.unpackb(packed)
    return parts[0], parts[4] if parts[0] == 3 else None


@needs_kernels
@pytest.mark.parametrize("size", [1, 9, 70])
@pytest.mark.parametrize("total", WIDTHS, ids=repr)
def test_bump_internal_repacks_runs_of_every_width(size: int, total: int) -> None:
    """Nodes whose columns are runs of one stored width, bumped at their first child, their last, and
    at the edges of the eight-number steps of the walk, by amounts that keep each number's width,
    change it (larger, smaller, negative) or push a sum beyond msgpack's ints (the node turns wide):
    the bytes are those of the full pack, as are repack_internal's for the same change."""
    assert speedups is not None
    for count, key_length, kids in ((3, 14, None), (200, 300, [2**40 + index for index in range(size)])):
        origin = _uniform(size, count, total, key_length, kids)
        packed = origin._packed
        assert packed is not None
        for index in sorted({0, 1, 7, 8, 9, size // 2, size - 2, size - 1} & set(range(size))):
            for kid, delta in (
                (origin.kids[index], [1, 2, 6, 1, 0]),
                (7, [2**33, -2 * total, 0, 300, 0]),
                (2**63, [0, -total - 2**20, 2**64, 0, -1]),
                (origin.kids[index] + 1, [0, 0, 0, 0, 0]),
            ):
                expected = _expected(origin, index, kid, delta)
                with pure_python():
                    full = encode_node(expected)
                bumped = origin.bumped(7, index, kid, delta)
                assert bumped.packed() == full, (index, kid, delta)
                assert list(bumped.kids) == expected.kids
                assert [bumped.child(at) for at in range(size)] == [expected.child(at) for at in range(size)]
                repacked = speedups.repack_internal(expected, origin, packed, 2)
                assert repacked == (None if _form(full) != _form(packed) else full)


@needs_kernels
@pytest.mark.parametrize("shift", [1, 29, 30, 31, 59, 60, 61, 1072])
def test_bump_internal_takes_amounts_its_shifts_divide(shift: int) -> None:
    """A sum column with a shift (all its sums share ``shift`` trailing zero bits), bumped by amounts
    with fewer, as many and more trailing zeros, positive and negative (the check reads the int's
    digits, 30 bits each): the kernel takes exactly those the shift divides, and gives what the
    dirty copy changed by ``add`` gives; the others are left to that copy."""
    assert speedups is not None
    summaries = [[1, (2 * index + 1) << shift, 0] for index in range(12)]
    node = Node.internal_from(
        5, [b""] + [bytes([0x30, index]) for index in range(1, 12)], list(range(1, 13)), summaries
    )
    origin = decode_node(encode_node(node), 5)
    assert origin.shifts[1] == shift
    for zeros in (0, shift - 1, shift, shift + 1, shift + 40):
        for amount in (3 << zeros, -(3 << zeros), (2**90 + 1) << zeros):
            delta = [1, amount, 0]
            made = speedups.bump_internal(origin, origin._packed, 4, 99, delta, 1)
            assert (made is None) == (zeros < shift), (zeros, amount)
            expected = _expected(origin, 4, 99, delta)
            with pure_python():
                full = encode_node(expected)
            assert origin.bumped(7, 4, 99, delta).packed() == full


def _rows(count: int, seed: int) -> dict[tuple[int, str], tuple[Any, ...]]:
    rng = random.Random(seed)
    return {
        (key * 10, "s"): (rng.choice([0.25, 0.1, 3.0, 1e-9]), rng.randrange(1000)) for key in range(count)
    }


def _assert_matches(db: tallytree.Database, events: tallytree.Aggregate, rows: dict[Any, Any]) -> None:
    expected = [tallytree.Item(key, item_id, values) for (key, item_id), values in sorted(rows.items())]
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert strict(list(events.items(tx))) == strict(expected)
        for low, high in ((0, 10**9), (55, 905), (300, 301), (17, 2000)):
            inside = [item for item in expected if low <= item.key < high]
            totals = events.totals(tx, ge=low, lt=high)
            assert totals.cost == math.fsum(item.values[0] for item in inside)
            assert totals.count == len(inside)
            assert totals.tokens == sum(item.values[1] for item in inside)


def _loaded(db: tallytree.Database, count: int, seed: int) -> tuple[tallytree.Aggregate, dict[Any, Any]]:
    """An aggregate of nodes of four entries holding ``count`` items (a tree of four levels or more),
    and its model."""
    events = db.aggregate("events", values=FIELDS, node_size=4)
    rows = _rows(count, seed)
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    with db.read() as tx:
        root = tx.root(events._tree_key(None))
        assert root is not None and root.height >= 4
    return events, rows


class Spy:
    """Counts the writes that take the decoded path (a descent that decodes the leaf and copies the
    nodes it changes into lists) and the writes from stored bytes (by ``_write_stored``, or whole by
    the ``insert_stored`` kernel)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decoded = 0
        self.stored = 0
        descend, write = NodeTree._path, NodeTree._write_stored
        if speedups is not None:
            kernel = speedups.insert_stored

            def spy_kernel(*args: Any) -> Any:
                written = kernel(*args)
                self.stored += type(written) is int
                return written

            monkeypatch.setattr(speedups, "insert_stored", spy_kernel)

        def spy_descend(tree: NodeTree, entry: bytes) -> Any:
            self.decoded += 1
            return descend(tree, entry)

        def spy_write(tree: NodeTree, path: Any, ids: list[int], leaf: bytes, delta: list[int]) -> None:
            self.stored += 1
            write(tree, path, ids, leaf, delta)

        monkeypatch.setattr(NodeTree, "_path", spy_descend)
        monkeypatch.setattr(NodeTree, "_write_stored", spy_write)

    def counts(self) -> tuple[int, int]:
        return self.decoded, self.stored


def _leaf_of(db: tallytree.Database, events: tallytree.Aggregate, key: int, item_id: str) -> tuple[int, bool]:
    """How many entries the leaf that ``(key, item_id)`` goes to holds now, and whether it holds
    that item (it may be in the tree's pending node instead)."""
    entry = encode_key(key) + encode_id(item_id)
    with db.read() as tx:
        root = tx.root(events._tree_key(None))
        assert root is not None
        _, leaf = NodeTree(tx, len(FIELDS), events.node_size, root)._path(entry)
        return leaf.size(), entry in leaf.keys


@needs_kernels
def test_scattered_inserts_write_their_paths_from_stored_bytes(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts inside a committed tree of four levels, one per transaction: one that splits no leaf
    is one write from stored bytes and decodes no leaf; duplicates are refused the same way and
    write nothing; every read then matches the model."""
    events, rows = _loaded(db, 300, 1)
    spy = Spy(monkeypatch)
    stored = 0
    rng = random.Random(2)
    for key in rng.sample(range(1, 2990), 60):
        if (key, "n") in rows or key % 10 == 0:
            continue
        leaf_size, _ = _leaf_of(db, events, key, "n")
        decoded, writes = spy.counts()
        with db.write() as tx:
            events.insert(tx, key, "n", (0.5, key))
        rows[(key, "n")] = (0.5, key)
        if leaf_size < 4:  # no split: the stored path
            assert spy.counts() == (decoded, writes + 1), key
            stored += 1
        decoded, writes = spy.counts()
        with pytest.raises(tallytree.DuplicateItemError), db.write() as tx:
            events.insert(tx, key, "n", (1.0, 1))
        assert spy.counts() == (decoded, writes)
    assert stored >= 10
    _assert_matches(db, events, rows)


@needs_kernels
def test_scattered_deletes_and_updates_write_their_paths_from_stored_bytes(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes and value updates of items of a committed tree of four levels, one per transaction:
    an update, and a delete that leaves its leaf at least half full, are one write from stored
    bytes each and decode no leaf; a delete that would leave its leaf underfull takes the decoded path
    (which merges or borrows); an update to the same values and the removal of an absent item
    write nothing. Every read then matches the model, and the checker finds nothing."""
    events, rows = _loaded(db, 300, 5)
    spy = Spy(monkeypatch)
    rng = random.Random(6)
    kinds: Counter[str] = Counter()
    for key, item_id in rng.sample(sorted(rows), 150):
        size, held = _leaf_of(db, events, key, item_id)
        decoded, writes = spy.counts()
        if rng.random() < 0.6:
            with db.write() as tx:
                removed = events.delete(tx, key, item_id)
            assert strict(removed) == strict(tallytree.Item(key, item_id, rows.pop((key, item_id))))
            kind = "pending" if not held else "stored delete" if size > 2 else "rebalanced"
            if kind == "stored delete":
                assert spy.counts() == (decoded, writes + 1), key
            elif kind == "rebalanced":
                assert spy.decoded > decoded and spy.stored == writes, key
        else:
            values = (rng.choice([0.5, 7.25, 1e-300, 2.0**70]), rng.randrange(-5, 5))
            with db.write() as tx:
                assert events.upsert(tx, key, item_id, values) == "updated"
            rows[(key, item_id)] = values
            kind = "stored update" if held else "pending"
            if held:
                assert spy.counts() == (decoded, writes + 1), key
            decoded, writes = spy.counts()
            with db.write() as tx:
                assert events.upsert(tx, key, item_id, values) == "unchanged"
            assert spy.counts() == (decoded, writes)
        kinds[kind] += 1
        decoded, writes = spy.counts()
        with pytest.raises(tallytree.ItemNotFoundError), db.write() as tx:
            events.delete(tx, key, "absent")
        with db.write() as tx:
            assert not events.discard(tx, key, item_id if kind != "stored update" else "absent")
        assert spy.counts() == (decoded, writes)
        if len(rows) % 16 == 0:
            _assert_matches(db, events, rows)
    assert kinds["stored delete"] >= 20 and kinds["stored update"] >= 20 and kinds["rebalanced"] >= 5, kinds
    _assert_matches(db, events, rows)


@needs_kernels
def test_writes_mixed_with_stored_inserts_in_one_transaction(db: tallytree.Database) -> None:
    """In one transaction, stored-path inserts followed by more inserts into the same leaves, deletes
    of what they inserted and of older items, an upsert, then an abort of another such transaction:
    each read in the transaction and after the commit matches the model, and the aborted one changed
    nothing."""
    events = db.aggregate("events", values=FIELDS, node_size=4)
    rows = _rows(200, 3)
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    rng = random.Random(4)
    with db.write() as tx:
        for key in rng.sample(range(1, 1990), 40):
            if key % 10 == 0:
                continue
            events.insert(tx, key, "a", (0.25, key))
            rows[(key, "a")] = (0.25, key)
            events.insert(tx, key, "b", (0.75, 1))  # the same leaf, now given in stored form
            rows[(key, "b")] = (0.75, 1)
            assert events.count(tx, le=key) == sum(1 for (k, _) in rows if k <= key)
        for key, item_id in rng.sample(sorted(rows), 30):
            assert strict(events.delete(tx, key, item_id)) == strict(
                tallytree.Item(key, item_id, rows.pop((key, item_id)))
            )
        some = next(iter(sorted(rows)))
        assert events.upsert(tx, some[0], some[1], (2.0, 2)) == "updated"
        rows[some] = (2.0, 2)
        assert events.totals(tx).count == len(rows)
    _assert_matches(db, events, rows)
    before = _snapshot(db, events)
    with pytest.raises(RuntimeError), db.write() as tx:
        for key in range(1, 1990, 37):
            if key % 10:
                events.insert(tx, key, "z", (9.0, 9))
        raise RuntimeError("abort")
    assert _snapshot(db, events) == before
    _assert_matches(db, events, rows)


def _snapshot(db: tallytree.Database, events: tallytree.Aggregate) -> Any:
    with db.read() as tx:
        return strict(list(events.items(tx))), strict(events.totals(tx))


@needs_kernels
def test_moves_of_scattered_items(db: tallytree.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaderboard's score changes: items moved to new keys (a delete and an insert in one write),
    one per transaction, then many in one; a move onto a taken position and a transaction of moves
    that aborts change nothing. Most moves are written from stored bytes; every read matches the
    model."""
    events, rows = _loaded(db, 300, 7)
    spy = Spy(monkeypatch)
    rng = random.Random(8)

    def move(tx: tallytree.Transaction, key: int, item_id: str) -> None:
        target = key + rng.randrange(1, 400)
        while (target, item_id) in rows:
            target += 1
        values = (rng.choice([0.5, 1e-9]), key)
        moved = events.replace(tx, key, item_id, new_key=target, new_values=values)
        assert strict(moved) == strict(tallytree.Item(target, item_id, values))
        del rows[(key, item_id)]
        rows[(target, item_id)] = values

    for key, item_id in rng.sample(sorted(rows), 40):
        with db.write() as tx:
            move(tx, key, item_id)
    assert spy.stored >= 40  # most of the 80 writes
    with db.write() as tx:
        for key, item_id in rng.sample(sorted(rows), 30):
            move(tx, key, item_id)
            assert events.count(tx) == len(rows)
    _assert_matches(db, events, rows)
    before = _snapshot(db, events)
    (first, first_id), (second, second_id) = sorted(rows)[:2]
    with pytest.raises(tallytree.DuplicateItemError), db.write() as tx:
        events.replace(tx, first, first_id, new_key=second, new_id=second_id)
    assert _snapshot(db, events) == before
    with pytest.raises(RuntimeError), db.write() as tx:
        for key, item_id in rng.sample(sorted(rows), 30):
            events.replace(tx, key, item_id, new_key=key + 0.5)
        raise RuntimeError("abort")
    assert _snapshot(db, events) == before
    _assert_matches(db, events, rows)


@needs_kernels
def test_a_batch_checked_against_a_pending_tree_searches_leaves_in_their_stored_bytes(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """insert_many into a tree with pending entries first looks for a conflict anywhere in the tree
    (nothing is written if there is one): that search reads the committed leaves in their stored
    bytes, as the merge itself does, and decodes none; the error names the batch's first conflict."""
    events, rows = _loaded(db, 300, 3)
    with db.write() as tx:
        events.insert(tx, 5000, "p", (1.0, 1))  # after every entry: it stays pending
    rows[(5000, "p")] = (1.0, 1)
    with db.read() as tx:
        root = tx.root(events._tree_key(None))
        assert root is not None and root.pending_summary is not None
    decoded_leaves = record_calls(monkeypatch, NodeTree, "_plan_leaf", 1)
    rng = random.Random(4)
    for _ in range(20):
        fresh = [(key, "n") for key in rng.sample(range(1, 2990), 30) if key % 10]
        taken = [(key * 10, "s") for key in rng.sample(range(300), 2)]
        batch = sorted(fresh + taken)
        with db.write() as tx, pytest.raises(tallytree.DuplicateItemError) as raised:
            events.insert_many(tx, [(key, item_id, (0.5, 1)) for key, item_id in batch])
        first = min(taken)
        assert f"key={first[0]!r}, id={first[1]!r}" in str(raised.value)
        assert [node for node in decoded_leaves if not node.dirty] == []
    _assert_matches(db, events, rows)


def test_renew_all_refuses_a_node_replaced_already(db: tallytree.Database) -> None:
    """``renew_all`` gives each node's next version, as ``renew`` does one by one; a node whose slot
    this transaction replaced already (a stale reference: damage) raises CorruptDatabaseError, on
    the first write's path and after it alike; a read transaction refuses both path calls."""
    from tallytree._txn import renewed

    with db.write() as tx:
        assert tx.renew_all([5, 6]) == [renewed(5), renewed(6)]
        with pytest.raises(tallytree.CorruptDatabaseError, match="node 5 was replaced"):
            tx.renew_all([5])
        tx.adopt_path(renewed(6), b"leaf", [])  # now the transaction holds a node: one by one
        with pytest.raises(tallytree.CorruptDatabaseError, match="node 6 was replaced"):
            tx.renew_all([7, 6])
        tx.abort()
    with db.read() as rtx:
        with pytest.raises(tallytree.TransactionError):
            rtx.renew_all([5])
        with pytest.raises(tallytree.TransactionError):
            rtx.adopt_path(5, b"", [])


def _split_leaves(db: tallytree.Database, events: tallytree.Aggregate, rows: dict[Any, Any]) -> None:
    """Split leaves of a tree of full ones, leaving room in some: an item every 60 keys, in one
    transaction (added to the model ``rows``)."""
    with db.write() as tx:
        for key in range(15, 2990, 60):
            events.insert(tx, key, "s", (0.25, key))
            rows[(key, "s")] = (0.25, key)


def _answers(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """Wrap ``owner.name`` (for the test) so that each call's answer is appended to the list returned."""
    answers: list[Any] = []
    function = getattr(owner, name)

    def answering(*args: Any) -> Any:
        answers.append(function(*args))
        return answers[-1]

    monkeypatch.setattr(owner, name, answering)
    return answers


def _write_state(tx: tallytree.WriteTransaction, events: tallytree.Aggregate) -> tuple[Any, ...]:
    """What a write left in ``tx``: the slots it overwrites, the bytes it will write, the nodes it made
    (class and every slot; a node's base compared by identity), and the root record."""
    made = {}
    for node_id, node in tx._prepared.items():
        slots = _slots(node)
        if "_base" in slots:
            slots["_base"] = id(slots["_base"])
        made[node_id] = (type(node), slots)
    root = tx.root(events._tree_key(None))
    assert root is not None
    return dict(tx._overwrites), dict(tx._encoded), made, tx._dirty.copy(), (root.node_id, list(root.summary))


@needs_kernels
def test_insert_stored_writes_what_the_python_stored_path_writes(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``insert_stored`` (the whole first write of a transaction in one call) leaves the transaction as
    the Python code of the stored path leaves it (``_stored_path``, ``merge_children`` and
    ``_write_stored``): the same overwritten slots, the same bytes to write, nodes of the same class
    with every slot equal, the same root record; on plain nodes and on patched ones (each commit
    makes the path's nodes patched). It takes the path's nodes from the cache's store, counting
    them as hits. A second write in the transaction is the Python code's (NotImplemented)."""
    assert speedups is not None
    events, rows = _loaded(db, 300, 12)
    results = _answers(monkeypatch, speedups, "insert_stored")
    _split_leaves(db, events, rows)
    rng = random.Random(13)
    with db.read() as tx:  # every node cached
        assert len(list(events.items(tx))) == len(rows)
    written = 0
    for key in rng.sample(range(1, 2990), 80):
        if key % 10 == 0 or (key, "n") in rows or _leaf_of(db, events, key, "n")[0] >= 4:
            continue  # (a leaf that splits is the decoded path's, tested above)
        with db.write() as tx:
            with db.read() as rtx:
                height = rtx.root(events._tree_key(None)).height  # type: ignore[union-attr]
            hits = tx._cache.hits
            events.insert(tx, key, "n", (0.5, key))
            if type(results[-1]) is not int:
                tx.abort()
                continue
            assert tx._cache.hits - hits == height - 1  # the root and each internal node below it
            fused = _write_state(tx, events)
            tx.abort()
        with monkeypatch.context() as patched, db.write() as tx:
            patched.setattr(speedups, "insert_stored", lambda *args: NotImplemented)
            events.insert(tx, key, "n", (0.5, key))
            assert _write_state(tx, events) == fused
            tx.abort()
        with db.write() as tx:  # committed: the next paths hold patched nodes
            events.insert(tx, key, "n", (0.5, key))
            events.insert(tx, key, "m", (0.25, -key))  # a second write: the Python code's
            assert results[-1] is NotImplemented
        rows[(key, "n")] = (0.5, key)
        rows[(key, "m")] = (0.25, -key)
        written += 1
    assert written >= 10
    _assert_matches(db, events, rows)


@needs_kernels
def test_insert_stored_leaves_what_it_does_not_write(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing nothing, ``insert_stored`` answers False for an entry there already (the insert then
    raises DuplicateItemError), None for the decoded path's inserts (a leaf that splits, the right
    edge with ``inside``) and NotImplemented in a transaction that changed nodes already."""
    assert speedups is not None
    events, rows = _loaded(db, 300, 14)
    results: list[Any] = []
    kernel = speedups.insert_stored

    def recorded(*args: Any) -> Any:  # what the kernel answered, and whether it changed the transaction
        kit = args[-1]
        before = ({**kit[4]}, {**kit[5]}, {**kit[6]})
        written = kernel(*args)
        changed = ({**kit[4]}, {**kit[5]}, {**kit[6]}) != before
        results.append(written if type(written) is int else (written, changed))
        return written

    monkeypatch.setattr(speedups, "insert_stored", recorded)
    (key, item_id), values = next(iter(rows.items()))
    with db.write() as tx, pytest.raises(tallytree.DuplicateItemError):
        events.insert(tx, key, item_id, values)
    assert results[-1] == (False, False)
    full = next(key for key in range(1, 2990) if key % 10 and _leaf_of(db, events, key, "n")[0] == 4)
    with db.write() as tx:
        events.insert(tx, full, "n", (0.5, 1))
        assert results[-1] == (None, False)
        tx.abort()
    with db.write() as tx:  # the right edge: an entry after every entry of the tree, with inside=True
        tree = NodeTree(tx, len(FIELDS), events.node_size, tx.root(events._tree_key(None)))
        entry = encode_key(10**6) + encode_id("z")
        assert tree.insert(entry, (0.5, 1), inside=True) is None
        assert results[-1] == (None, False)
        tx.abort()
    _split_leaves(db, events, {})
    roomy = next(key for key in range(1, 2990) if key % 10 and _leaf_of(db, events, key, "n")[0] < 4)
    results.clear()
    with db.write() as tx:  # a second write: the Python code's
        for item_id in ("n", "o"):
            events.insert(tx, roomy, item_id, (0.5, 1))
        assert type(results[0]) is int and results[-1] == (NotImplemented, False)
        tx.abort()


def _pending_events(db: tallytree.Database, events: tallytree.Aggregate, rows: dict[Any, Any]) -> list[int]:
    """New events after every item, one per commit: they stay in the tree's pending node. Their keys."""
    keys = list(range(5000, 5000 + 10 * (events._capacity - 2), 10))  # (the next one would merge them)
    for key in keys:
        with db.write() as tx:
            events.insert(tx, key, "p", (0.1, key))
        rows[(key, "p")] = (0.1, key)
    with db.read() as tx:
        root = tx.root(events._tree_key(None))
        assert root is not None and root.pending_summary is not None
        assert root.pending_summary[0] == len(keys)
    return keys


@needs_kernels
def test_inserted_writes_into_a_tree_with_pending_entries_as_the_tree_does(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scattered insert into a tree holding pending entries (new events not merged yet) is written
    by ``_tree.inserted`` in one kernel call, without a Tree: it leaves the transaction as the
    Tree's path (and the Python stored path) leaves it, the new record's bytes included, with the
    pending node unchanged. An entry at or after the first pending one, a later write of the
    transaction and a pending node the transaction changed are the Tree's; every read then matches
    the model."""
    from tallytree import _aggregate, _txn

    assert speedups is not None
    events, rows = _loaded(db, 300, 21)
    _split_leaves(db, events, rows)
    pending_keys = _pending_events(db, events, rows)
    results = _answers(monkeypatch, speedups, "insert_stored")
    answers = _answers(monkeypatch, _aggregate, "inserted")  # what _tree.inserted returned
    tree_key = events._tree_key(None)
    rng = random.Random(22)
    written = 0
    for key in rng.sample(range(1, 2990), 60):
        if key % 10 == 0 or (key, "n") in rows or _leaf_of(db, events, key, "n")[0] >= 4:
            continue
        results.clear()
        with db.write() as tx:
            events.insert(tx, key, "n", (0.5, key))
            assert type(results[-1]) is int and isinstance(answers[-1], Root)  # written without a Tree
            fused = _write_state(tx, events), _txn.encode_root(tx.root(tree_key))  # type: ignore[arg-type]
            tx.abort()
        with monkeypatch.context() as patched, db.write() as tx:  # the Tree's path, in Python
            patched.setattr(_aggregate, "inserted", lambda *args: None)
            patched.setattr(speedups, "insert_stored", lambda *args: NotImplemented)
            events.insert(tx, key, "n", (0.5, key))
            assert (_write_state(tx, events), _txn.encode_root(tx.root(tree_key))) == fused  # type: ignore[arg-type]
            tx.abort()
        with db.write() as tx:
            events.insert(tx, key, "n", (0.5, key))
            root = tx.root(tree_key)
            assert root is not None and root.pending_summary is not None
            assert root.pending_summary[0] == len(pending_keys)  # the pending node as it was
        rows[(key, "n")] = (0.5, key)
        written += 1
    assert written >= 10
    _assert_matches(db, events, rows)
    answers.clear()
    with db.write() as tx:  # at or after the first pending entry: the pending node's, by the Tree
        events.insert(tx, pending_keys[0] + 5, "q", (0.5, 1))
        events.insert(tx, 1, "q", (0.5, 1))  # the pending node changed in this transaction: the Tree's
        root = tx.root(tree_key)
        assert root is not None and root.pending_summary is not None
        assert root.pending_summary[0] == len(pending_keys) + 1
    assert answers == [None, None]
    rows[(pending_keys[0] + 5, "q")] = rows[(1, "q")] = (0.5, 1)
    with pytest.raises(tallytree.DuplicateItemError), db.write() as tx:  # a pending item, again
        events.insert(tx, pending_keys[0], "p", (0.5, 1))
    with pytest.raises(tallytree.DuplicateItemError), db.write() as tx:  # an item of the nodes, again
        events.insert(tx, 1, "q", (0.5, 1))
    _assert_matches(db, events, rows)


def _two_level(root_id: int, leaf_id: int, first: float = 0.25) -> tuple[Node, bytes, list[int]]:
    """A committed root over two leaves (``leaf_id`` first, two entries each, values (first, 1) and
    (0.5, 2)): the root, the first leaf's stored bytes, and the delta of an item of values (0.5, 1)."""
    from tallytree._btree import vadd
    from tallytree._node import delta_of

    keys = [[encode_key(key) + encode_id("a") for key in pair] for pair in ((1, 2), (5, 6))]
    leaves = [
        Node(node_id, True, entries, [[first, 0.5], [1, 2]])
        for node_id, entries in zip((leaf_id, 77), keys, strict=True)
    ]
    summary = vadd(delta_of((first, 1)), delta_of((0.5, 2)))
    root = Node.internal_from(root_id, [b"", keys[1][0]], [leaf_id, 77], [list(summary), list(summary)])
    committed = decode_node(encode_node(root), root_id)
    return committed, encode_node(leaves[0]), delta_of((0.5, 1))


@needs_kernels
def test_insert_stored_renews_ids_as_renewed_does() -> None:
    """The kernel's new versions are ``_txn.renewed``'s (its slot width is ``SLOT_BITS``, its count of
    versions the kit's ``VERSIONS``), the last version wrapping to 0; ids that repeat a slot (damage),
    a level bump_level leaves and a count of versions out of range are the Python code's
    (NotImplemented, changing nothing); arguments of the wrong types raise TypeError."""
    from types import SimpleNamespace

    from tallytree._txn import SLOT_BITS, VERSIONS, node_key, renewed

    assert speedups is not None and speedups.SLOT_BITS == SLOT_BITS
    for root_id, leaf_id in ((5, 6), ((VERSIONS - 1) << SLOT_BITS | 5, 3 << SLOT_BITS | 6)):
        root, leaf, delta = _two_level(root_id, leaf_id)
        overwrites: dict[int, int] = {}
        encoded: dict[int, bytes] = {}
        prepared: dict[int, Node] = {}
        cache = SimpleNamespace(hits=0)
        source = ({}, encoded, {node_key(leaf_id): leaf}.get)
        fetch = {root_id: root}.__getitem__
        kit = (
            fetch,
            None,
            source,
            {},
            encoded,
            prepared,
            overwrites,
            [],
            cache,
            Node,
            _PatchedNode,
            VERSIONS,
        )
        entry = encode_key(3) + encode_id("a")
        top = speedups.insert_stored(root_id, entry, 2, False, (0.5, 1), 4, delta, kit)
        assert top == renewed(root_id) and overwrites == {5: root_id, 6: leaf_id}
        assert cache.hits == 0  # (the root came from fetch: no store)
        new_leaf = decode_node(encoded[renewed(leaf_id)], renewed(leaf_id))
        assert new_leaf.keys[2] == entry
        assert [list(col) for col in new_leaf.cols] == [[0.25, 0.5, 0.5], [1, 2, 1]]
        assert prepared[top]._packed is encoded[top] and list(prepared[top].kids) == [renewed(leaf_id), 77]
        assert encoded[top] == encode_node(decode_node(encoded[top], top))
    entry = encode_key(3) + encode_id("a")
    # the leaf in the root's slot; a root whose cost column must be rescaled (1.0 + 0.5: bump_level's
    # case for the Python code)
    for root_id, leaf_id, first in ((5, 1 << SLOT_BITS | 5, 0.25), (5, 6, 0.5)):
        root, leaf, delta = _two_level(root_id, leaf_id, first)
        source = ({}, {}, {node_key(leaf_id): leaf}.get)
        kit = ({5: root}.__getitem__, None, source, {}, {}, {}, {}, [], None, Node, _PatchedNode, VERSIONS)
        assert speedups.insert_stored(5, entry, 2, False, (0.5, 1), 4, delta, kit) is NotImplemented
        assert kit[4] == kit[5] == kit[6] == {}
    root, leaf, delta = _two_level(5, 6)
    source = ({}, {}, {node_key(6): leaf}.get)
    kit = (
        {5: root}.__getitem__,
        None,
        source,
        {},
        {},
        {},
        {},
        [],
        None,
        Node,
        _PatchedNode,
        0,
    )  # no versions
    assert speedups.insert_stored(5, entry, 2, False, (0.5, 1), 4, delta, kit) is NotImplemented
    assert kit[4] == kit[5] == kit[6] == {}
    good = (5, entry, 2, False, (0.5, 1), 4, delta, kit)
    for at, bad in ((0, 5.0), (1, bytearray(entry)), (3, 1), (4, {0.5, 1}), (6, tuple(delta)), (7, kit[:-1])):
        with pytest.raises(TypeError):
            speedups.insert_stored(*good[:at], bad, *good[at + 1 :])


def test_a_read_transaction_has_no_write_kit(db: tallytree.Database) -> None:
    """``write_kit`` is a write transaction's, and the same tuple for the whole transaction; a read
    transaction refuses it as it refuses every write."""
    with db.write() as tx:
        assert tx.write_kit() is tx.write_kit()
    with db.read() as rtx, pytest.raises(tallytree.TransactionError):
        rtx.write_kit()
