"""The pending node of each tree (``_tree``): inserts kept aside in one small node, merged in runs.

The state machine of ``test_model`` runs every operation over trees with pending entries (its node
sizes give capacities of 4 to 9, and its ``append`` rule writes new events). These tests pin what it
cannot see: that a single insert rewrites one node instead of a path, that a new event does not load
its tree, that ranks stay exact through deletes and range deletes, that reads mix pending and stored
entries in order, that a conflicting batch changes nothing, and that the checker and the decoders
catch damaged pending records.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from conftest import record_calls, snapshot, strict

import tallytree
from tallytree._btree import Root
from tallytree._keys import encode_id, encode_key
from tallytree._node import Node, decode_node, encode_node, pack_summary
from tallytree._store import NODES, ROOTS, Op, _MemoryTxn
from tallytree._tree import Tree, pending_capacity
from tallytree._txn import SLOT_MASK, decode_root, encode_root, node_key
from tallytree.errors import CorruptDatabaseError, DuplicateItemError

FIELDS = ("cost", "tokens")
STORED = encode_key(50) + encode_id("s")


def root_of(db: tallytree.Database, aggregate: tallytree.Aggregate, namespace: Any = None) -> Root | None:
    with db.read() as tx:
        return tx.root(aggregate._tree_key(namespace))


def pending_entries(db: tallytree.Database, root: Root | None) -> list[bytes] | None:
    """The entries of a root record's pending node (None: nothing is pending)."""
    if root is None:
        return None
    with db.read() as tx:
        node = root.pending_of(tx)
    return None if node is None else list(node.keys)


def record_commits(monkeypatch: pytest.MonkeyPatch) -> list[list[Op]]:
    """The operations of every commit of an in-memory database from now on, one list per commit."""
    written: list[list[Op]] = []
    commit = _MemoryTxn.commit

    def recording(self: _MemoryTxn, ops: list[Op], appended: int = 0) -> None:
        written.append(ops)
        commit(self, ops, appended)

    monkeypatch.setattr(_MemoryTxn, "commit", recording)
    return written


def model_items(rows: dict[tuple[int, str], tuple[Any, ...]]) -> list[tallytree.Item]:
    return [tallytree.Item(key, item_id, values) for (key, item_id), values in sorted(rows.items())]


def assert_reads_match(db: tallytree.Database, aggregate: tallytree.Aggregate, rows: dict[Any, Any]) -> None:
    """Every read of the namespace equals the sorted model, in both orders and at every index."""
    expected = model_items(rows)
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert strict(list(aggregate.items(tx))) == strict(expected)
        assert strict(list(aggregate.items(tx, reverse=True))) == strict(expected[::-1])
        assert aggregate.count(tx) == len(expected)
        for index, item in enumerate(expected):
            assert strict(aggregate.at(tx, index)) == strict(item)
            assert aggregate.rank(tx, item.key, item.id) == index
            assert strict(aggregate.get(tx, item.key, item.id)) == strict(item)
        keys = sorted({item.key for item in expected})
        for low in keys[:: max(1, len(keys) // 7)]:
            for high in keys[:: max(1, len(keys) // 5)]:
                inside = [item for item in expected if low <= item.key < high]
                totals = aggregate.totals(tx, ge=low, lt=high)
                assert totals.count == len(inside)
                assert totals.tokens == sum(item.values[1] for item in inside)
                assert strict(list(aggregate.items(tx, ge=low, lt=high))) == strict(inside)
                if inside:
                    assert strict(aggregate.at(tx, -1, ge=low, lt=high)) == strict(inside[-1])


@pytest.fixture
def events(db: tallytree.Database) -> Iterator[tallytree.Aggregate]:
    yield db.aggregate("events", values=FIELDS, node_size=8)


def test_capacity_follows_the_node_size() -> None:
    assert [pending_capacity(size) for size in (4, 5, 8, 16, 63, 64, 1024)] == [4, 5, 8, 16, 63, 64, 64]


def test_single_inserts_wait_in_the_pending_node_and_reads_include_them(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    rows = {(key * 10, "s"): (0.5, key) for key in range(40)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    stored = root_of(db, events)
    assert stored is not None and stored.pending_summary is None
    for key in (1000, 395, 5000):  # after the stored entries: new events
        with db.write() as tx:
            events.insert(tx, key, "p", (0.25, 1000 + key))
        rows[(key, "p")] = (0.25, 1000 + key)
    root = root_of(db, events)
    assert root is not None and root.pending == 0  # held by the record, not a node of its own
    assert pending_entries(db, root) == [encode_key(key) + encode_id("p") for key in (395, 1000, 5000)]
    assert root.node_id == stored.node_id  # the stored nodes were not rewritten
    assert root.summary[0] == 43 and root.pending_summary is not None and root.pending_summary[0] == 3
    assert_reads_match(db, events, rows)
    with db.read() as tx:
        assert strict(events.min(tx)) == strict(tallytree.Item(0, "s", (0.5, 0)))
        assert strict(events.max(tx)) == strict(tallytree.Item(5000, "p", (0.25, 6000)))
        assert events.rank(tx, 1000, reverse=True) == 1
    with db.write() as tx:  # inside the stored range: straight into its leaf, pending ones untouched
        events.insert(tx, 5, "q", (0.75, 7))
    rows[(5, "q")] = (0.75, 7)
    scattered = root_of(db, events)
    assert scattered is not None and scattered.node_id != root.node_id
    assert pending_entries(db, scattered) == pending_entries(db, root)
    assert_reads_match(db, events, rows)


def test_a_write_that_leaves_the_pending_entries_alone_writes_their_bytes_as_they_were(
    db: tallytree.Database, events: tallytree.Aggregate, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.write() as tx:
        events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(40)])
    with db.write() as tx:
        events.insert(tx, 100, "p", (0.25, 1))
    at_commit = record_calls(monkeypatch, tallytree._txn, "encode_node")
    in_place = record_calls(monkeypatch, tallytree._node, "encode_node")  # Node.bumped without C
    for key in (5, 7):  # inside the stored range: the path is rewritten, the pending node is not
        before = root_of(db, events)
        with db.write() as tx:
            events.insert(tx, key, "q", (1.0, 2))
        after = root_of(db, events)
        assert before is not None and after is not None and after.node_id != before.node_id
    assert not any(node.pending for node in at_commit + in_place)
    with db.write() as tx:  # changed: appended to the stored bytes in C, or encoded again
        events.insert(tx, 101, "p", (0.25, 1))
    with db.read() as tx:
        data = tx.kv.get(ROOTS, events._tree_key(None))
        assert tallytree.check(tx) == []
        assert events.count(tx, ge=100) == 2 and events.count(tx) == 44
    assert data is not None
    held = decode_root(data).packed_pending
    assert held is not None and held == encode_node(decode_node(held, 0))  # what encode_node writes
    assert decode_node(held, 0).keys[-1] == encode_key(101) + encode_id("p")


def test_a_full_pending_node_is_merged_into_the_leaves(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    capacity = pending_capacity(events.node_size)
    rows = {}
    for key in range(capacity - 1):
        with db.write() as tx:
            events.insert(tx, key, "a", (1.0, key))
        rows[(key, "a")] = (1.0, key)
    root = root_of(db, events)
    assert root is not None and root.node_id == 0 and root.height == 0  # everything is pending
    assert_reads_match(db, events, rows)
    with db.write() as tx:
        events.insert(tx, capacity, "a", (1.0, capacity))
    rows[(capacity, "a")] = (1.0, capacity)
    root = root_of(db, events)
    assert root is not None and root.pending_summary is None and root.node_id != 0
    assert_reads_match(db, events, rows)


def test_one_insert_per_commit_writes_the_root_record_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = tallytree.open_memory()
    events = db.aggregate("events", values=FIELDS, node_size=8)
    with db.write() as tx:
        events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(2000)])  # height 4 or more
    root = root_of(db, events)
    assert root is not None and root.height >= 4
    written = record_commits(monkeypatch)
    capacity = pending_capacity(events.node_size)
    for key in range(capacity - 1):
        with db.write() as tx:
            events.insert(tx, 10_000 + key, "new", (0.5, key))
    assert len(written) == capacity - 1
    for ops in written:  # the record holds the pending entries: no node is written or deleted
        assert [op[0] for op in ops] == [ROOTS]
    assert root_of(db, events).node_id == root.node_id  # type: ignore[union-attr]


def _right_edge(db: tallytree.Database, root: Root) -> list[Node]:
    """The nodes from the root down to the last leaf."""
    with db.read() as tx:
        nodes = [tx.node(root.node_id)]
        while not nodes[-1].leaf:
            nodes.append(tx.node(nodes[-1].kids[-1]))
    return nodes


@pytest.mark.parametrize("stored", [2000, 6, 3])
def test_a_full_pending_node_becomes_the_last_leaf_and_the_leaves_before_it_stay(
    stored: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full, the pending node becomes a new last leaf: the flush commit writes that leaf and the
    right edge of internal nodes (one more child each, or a split), and rewrites or deletes no leaf.
    A tree that is one leaf gets a root over it and the new leaf, unless that leaf is too small to
    stop being the root (3 entries with node size 8): then the entries are merged into it."""
    db = tallytree.open_memory()
    events = db.aggregate("events", values=FIELDS, node_size=8)
    rows = {(key, "s"): (0.5, key) for key in range(stored)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    before = root_of(db, events)
    assert before is not None
    edge = _right_edge(db, before)
    with db.read() as tx:
        leaves_before = {node.id: tx.stored(node.id) for node in edge if node.leaf}
    written = record_commits(monkeypatch)
    capacity = pending_capacity(events.node_size)
    for key in range(capacity):
        with db.write() as tx:
            events.insert(tx, 10_000 + key, "new", (0.25, key))
        rows[(10_000 + key, "new")] = (0.25, key)
    after = root_of(db, events)
    assert after is not None and after.pending_summary is None
    assert_reads_match(db, events, rows)
    new_edge = _right_edge(db, after)
    last = new_edge[-1]
    flush = [op for op in written[-1] if op[0] == NODES]
    (old_leaf,) = leaves_before
    with db.read() as tx:
        written_nodes = [decode_node(value, int.from_bytes(key, "big")) for _, key, value in flush if value]
        deleted = [int.from_bytes(key, "big") for _, key, value in flush if value is None]
    if stored == 3:  # merged: the lone leaf rewritten with the new entries (a new version of it,
        # under its slot), and cut in two
        rewritten = [int.from_bytes(key, "big") for _, key, value in flush if value]
        assert old_leaf & SLOT_MASK in rewritten and old_leaf not in deleted
        assert len([node for node in written_nodes if node.leaf]) == 2
        return
    assert list(last.keys) == [encode_key(10_000 + key) + encode_id("new") for key in range(capacity)]
    assert after.height == max(before.height, 2)
    with db.read() as tx:
        assert tx.stored(old_leaf) == leaves_before[old_leaf]  # the last leaf before: as it was
    assert [node.id for node in written_nodes if node.leaf] == [last.id]
    assert old_leaf not in deleted and all(not node.leaf for node in edge if node.id in deleted)
    assert len(written_nodes) <= len(new_edge) + 1  # the edge, and a sibling of a split at most


def test_new_events_join_the_pending_node_without_loading_the_tree(
    db: tallytree.Database, events: tallytree.Aggregate, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = {(key, "s"): (0.5, key) for key in range(30)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    with db.write() as tx:  # the first pending entry: the tree makes the pending node
        events.insert(tx, 100, "p", (0.25, 100))
    rows[(100, "p")] = (0.25, 100)
    loaded = record_calls(monkeypatch, Tree, "insert", arg=1)  # the entries
    committed = root_of(db, events)
    assert committed is not None
    with db.read() as tx:
        held = committed.pending_of(tx)
    assert held is not None and not held.dirty
    old = snapshot(db)
    with db.read() as before, db.write() as tx:  # appends, twice to a node this transaction copied
        for key in (101, 102, 103):
            events.insert(tx, key, "p", (0.25, key))
            rows[(key, "p")] = (0.25, key)
        assert events.count(tx, ge=100) == 4 and events.at(tx, -1, ge=100).key == 103
        assert snapshot(db, before) == old  # an older snapshot still sees its pending entries
    assert loaded == []
    assert list(held.keys) == [encode_key(100) + encode_id("p")]  # the committed node was copied
    assert_reads_match(db, events, rows)
    with db.write() as tx, pytest.raises(DuplicateItemError):  # the last entry again: the tree refuses it
        events.insert(tx, 103, "p", (1.0, 1))
    assert loaded == [encode_key(103) + encode_id("p")]
    with pytest.raises(RuntimeError), db.write() as tx:  # an aborted append changes nothing
        events.insert(tx, 104, "p", (0.25, 104))
        raise RuntimeError
    with db.write() as tx:  # before the last pending entry: the tree places it (here: pending)
        events.insert(tx, 102, "q", (0.25, 102))
    rows[(102, "q")] = (0.25, 102)
    assert loaded[-1] == encode_key(102) + encode_id("q")
    assert_reads_match(db, events, rows)
    capacity = pending_capacity(events.node_size)
    for key in range(200, 200 + capacity):  # appends until the node fills: the tree merges it
        with db.write() as tx:
            events.insert(tx, key, "p", (0.25, key))
        rows[(key, "p")] = (0.25, key)
    root = root_of(db, events)
    assert root is not None and root.node_id != committed.node_id
    assert_reads_match(db, events, rows)


def test_appends_scattered_inserts_and_deletes_interleaved(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    rng = random.Random(5)
    rows = {(key * 2, "s"): (0.5, key) for key in range(60)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    newest = 200
    for step in range(200):
        with db.write() as tx:
            choice = rng.random()
            if choice < 0.45:  # a new event
                newest += rng.randrange(1, 4)
                events.insert(tx, newest, "p", (0.25, step))
                rows[(newest, "p")] = (0.25, step)
            elif choice < 0.6:  # an event inside the stored range
                key = rng.randrange(newest)
                if (key, "q") not in rows:
                    events.insert(tx, key, "q", (1.5, step))
                    rows[(key, "q")] = (1.5, step)
            elif rows:
                key, item_id = rng.choice(sorted(rows))
                events.delete(tx, key, item_id)
                del rows[(key, item_id)]
        if step % 10 == 0:
            assert_reads_match(db, events, rows)
    assert_reads_match(db, events, rows)


def test_updates_of_pending_entries_change_only_the_pending_node(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    with db.write() as tx:
        events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(30)])
    with db.write() as tx:
        events.insert(tx, 100, "p", (1.0, 1))
    before = root_of(db, events)
    with db.write() as tx:
        assert events.upsert(tx, 100, "p", (1.0, 1)) == "unchanged"
        assert events.upsert(tx, 100, "p", (2.0, 5)) == "updated"
    after = root_of(db, events)
    assert before is not None and after is not None
    assert after.node_id == before.node_id and after.pending_summary != before.pending_summary
    with db.read() as tx:
        assert events.totals(tx, ge=100).as_dict() == {"count": 1, "cost": 2.0, "tokens": 5}
        assert tallytree.check(tx) == []


@pytest.mark.parametrize(
    ("low", "high"), [(0, 1000), (5, 42), (41, 42), (43, 1000), (-5, 3), (30, 44), (39, 40), (45, 50)]
)
def test_a_range_delete_across_pending_and_stored_entries(
    db: tallytree.Database, events: tallytree.Aggregate, low: int, high: int
) -> None:
    rows = {(key * 2, "s"): (0.5, key) for key in range(20)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    for key in (41, 43, 45):
        with db.write() as tx:
            events.insert(tx, key, "p", (0.25, key))
        rows[(key, "p")] = (0.25, key)
    assert root_of(db, events).pending_summary[0] == 3  # type: ignore[union-attr,index]
    with db.write() as tx:
        removed = events.delete_range(tx, ge=low, lt=high)
    gone = [row for row in rows if low <= row[0] < high]
    assert removed.count == len(gone)
    assert removed.tokens == sum(rows[row][1] for row in gone)
    for row in gone:
        del rows[row]
    assert_reads_match(db, events, rows)


def test_a_conflicting_batch_changes_nothing_pending_included(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    with db.write() as tx:
        events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(0, 40, 2)])
    with db.write() as tx:
        events.insert(tx, 41, "p", (0.25, 1))
    before = snapshot(db)
    root = root_of(db, events)
    assert root is not None and root.pending_summary is not None
    for batch in (
        [(39, "x"), (41, "p"), (43, "x")],
        [(41, "p"), (20, "s")],
        [(3, "x"), (20, "s"), (41, "p")],
    ):
        with db.write() as tx:
            with pytest.raises(DuplicateItemError) as raised:
                events.insert_many(tx, [(key, item_id, (0.0, 0)) for key, item_id in batch])
            first = min((key, item_id) for key, item_id in batch if (key, item_id) in {(41, "p"), (20, "s")})
            assert f"key={first[0]!r}, id={first[1]!r}" in str(raised.value)
        assert snapshot(db) == before
        assert root_of(db, events) == root
    with db.write() as tx:  # "skip" merges the pending entry in and inserts the rest
        assert events.insert_many(tx, [(41, "p", (0.0, 0)), (43, "x", (0.0, 0))], on_duplicate="skip") == 1
    with db.read() as tx:
        assert strict(events.get(tx, 41, "p")) == strict(tallytree.Item(41, "p", (0.25, 1)))
        assert tallytree.check(tx) == []


def test_a_batch_before_the_pending_entries_or_already_there_leaves_them_pending(
    db: tallytree.Database, events: tallytree.Aggregate
) -> None:
    """A batch merge flushed the pending node first, whatever the batch: one that sorts before every
    pending entry now leaves them pending, and on_duplicate="skip" of items all present (stored or
    pending) writes nothing at all (it rewrote the root record, the pending entries merged in)."""
    with db.write() as tx:
        events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(0, 400, 2)])
    with db.write() as tx:
        for key in (401, 402):
            events.insert(tx, key, "p", (0.25, 1))
    pending = pending_entries(db, root_of(db, events))
    assert pending is not None and len(pending) == 2
    before = snapshot(db)
    for batch in ([(2, "s"), (402, "p")], [(401, "p")], [(10, "s"), (12, "s")]):
        with db.write() as tx:
            assert events.insert_many(tx, [(k, i, (0.0, 0)) for k, i in batch], on_duplicate="skip") == 0
            assert not tx.changed_roots()
        assert snapshot(db) == before
    with db.write() as tx:  # new items before the pending ones: merged into the leaves, pending kept
        assert (
            events.insert_many(
                tx, [(1, "n", (1.0, 1)), (399, "n", (1.0, 1)), (401, "p", (0.0, 0))], on_duplicate="skip"
            )
            == 2
        )
    assert pending_entries(db, root_of(db, events)) == pending
    with db.write() as tx:  # one that reaches them merges them in
        assert events.insert_many(tx, [(3, "n", (1.0, 1)), (403, "n", (1.0, 1))]) == 2
    assert pending_entries(db, root_of(db, events)) is None
    with db.read() as tx:
        assert events.count(tx) == 206 and events.count(tx, ge=401) == 3
        assert tallytree.check(tx) == []


def test_pending_entries_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=FIELDS)
        for key in range(5):
            with db.write() as tx:
                events.insert(tx, key, "a", (0.1, key), namespace="org")
        before = snapshot(db)
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        root = root_of(db, events, "org")
        assert root is not None and root.node_id == 0 and root.pending_summary is not None
        assert snapshot(db) == before
        with db.read() as tx:
            assert tallytree.check(tx) == []
            assert events.totals(tx, namespace="org").as_dict() == {"count": 5, "cost": 0.5, "tokens": 10}


# ------------------------------------------------------------------ records and damage


def test_a_pending_node_round_trips_through_its_byte_form() -> None:
    node = Node(7, True, [b"a", b"c"], [[0.5, 2], [1, 2]], dirty=True)
    node.pending = True
    decoded = decode_node(encode_node(node), 7)
    assert decoded.leaf and decoded.pending and list(decoded.keys) == [b"a", b"c"]
    assert [list(col) for col in decoded.cols] == [[0.5, 2], [1, 2]]
    assert decoded.copy(9).pending
    plain = decode_node(encode_node(Node(8, True, [b"a", b"c"], [[0.5, 2], [1, 2]], dirty=True)), 8)
    assert plain.leaf and not plain.pending


@pytest.mark.parametrize(
    "parts",
    [[4, [b"a", b"b"], [1], [1, 2]], [4, [], [], []], [4, [b"a"], [0, 1]], [4], [4, "ab", [1, 2]]],
)
def test_a_malformed_pending_node_is_a_corruption_error(parts: list[Any]) -> None:
    with pytest.raises(CorruptDatabaseError):
        decode_node(msgpack.packb(parts), 3)


def test_root_records_with_and_without_a_pending_node_round_trip() -> None:
    plain = Root(5, 2, [3, 1 << 1074, 1])
    assert decode_root(encode_root(plain)) == plain
    node = Node(0, True, [b"a", b"c"], [[0.5, 2], [1, 2]], dirty=True)
    node.pending = True
    held = Root(0, 0, [2, 5 << 1073, 2], 0, [2, 5 << 1073, 2], None, node)
    decoded = decode_root(encode_root(held))
    assert (decoded.node_id, decoded.height, decoded.summary) == (0, 0, held.summary)
    assert decoded.pending == 0 and decoded.pending_summary == held.pending_summary
    assert decoded.packed_pending == encode_node(node)  # decoded on first use only
    pending = decoded.pending_of(None)  # type: ignore[arg-type]  # a held node needs no store
    assert pending is not None and pending.pending and pending.id == 0
    assert list(pending.keys) == [b"a", b"c"] and [list(col) for col in pending.cols] == [[0.5, 2], [1, 2]]
    assert decoded.pending_of(None) is pending and decoded.packed_pending is None  # type: ignore[arg-type]
    version_2 = Root(0, 0, [2, 3 << 1074, 0], 9, [2, 3 << 1074, 0])  # the pending node stored by id
    assert decode_root(encode_root(version_2)) == version_2
    version_1 = [5, 2, [3, (1 << 1074).to_bytes(136, "big", signed=True), 1]]  # big ints as bytes
    assert decode_root(msgpack.packb(version_1)) == plain
    for damaged in (
        [5, 2, [3, 1, 1], 9],
        [5, 2, [3, 1, 1], 9, [1]],
        [5, 2, [3, 1, 1], 0, [3, 1, 1]],
        [5, 2, [3, 1, 1], -4, [3, 1, 1]],
        [5, 2, [3, 1, 1], b"", [3, 1, 1]],
        [5, 2, [3, 1, 1], "node", [3, 1, 1]],
        [5, 2, [3, 1, 1], 9, [4, 1, 1]],  # more pending entries than entries
        [5, 2, [3, 1, 1], 9, [0, 1, 1]],
        [-5, 2, [3, 1, 1]],  # ids and heights that cannot be
        [5, 0, [3, 1, 1]],
        [0, 2, [3, 1, 1]],
        [5, 65, [3, 1, 1]],
        [5, 2, [-3, 1, 1]],
        [5, 2, [[3, 1], 1, 1]],
        [5, 2, [3, [1, 10**6], 1]],  # an int of a million bits
        [5, 2, [3, [b"\x01" * 2000, 0], 1]],
        [5, "2", [3, 1, 1]],
        [5, 2, [3, [1, -4], 1]],
        [5, 2, [3, [1.5, 4], 1]],
        [5, 2, [3, "1", 1]],
    ):
        with pytest.raises(CorruptDatabaseError):
            decode_root(msgpack.packb(damaged))


@pytest.mark.parametrize(
    "held",
    [msgpack.packb([1, [b"a"], [1.0], [1]]), msgpack.packb([4, [], [], []]), b"\x93\x04", b"\xc1"],
)
def test_a_record_holding_something_else_than_a_pending_node_is_a_corruption_error(held: bytes) -> None:
    record = decode_root(msgpack.packb([0, 0, [1, 1, 0], held, [1, 1, 0]]))
    with pytest.raises(CorruptDatabaseError, match="pending"):
        record.pending_of(None)  # type: ignore[arg-type]


def _as_version_2(path: Path) -> int:
    """Rewrite a database raw as format 2 wrote it: each pending node stored by itself under a fresh
    id, its record naming it. Returns the last id given."""
    env = lmdb.open(str(path), max_dbs=4)
    roots, nodes, meta = env.open_db(b"roots"), env.open_db(b"nodes"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        next_id = int.from_bytes(txn.get(b"next_id", db=meta), "big")
        for key, value in list(txn.cursor(db=roots)):
            root = decode_root(value)
            if root.packed_pending is None:
                continue
            txn.put(node_key(next_id), root.packed_pending, db=nodes)
            stored = Root(root.node_id, root.height, root.summary, next_id, root.pending_summary)
            txn.put(key, encode_root(stored), db=roots)
            next_id += 1
        txn.put(b"next_id", next_id.to_bytes(8, "big"), db=meta)
        txn.put(b"format", b"tallytree-2", db=meta)
    env.close()
    return next_id - 1


def test_a_version_2_pending_node_is_read_and_moves_into_the_record_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "db"
    rows = {(key * 2, "s"): (0.5, key) for key in range(30)}
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=FIELDS, node_size=8)
        with db.write() as tx:
            events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
            events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(8)], namespace="full")
        for key in (100, 101):
            with db.write() as tx:
                events.insert(tx, key, "p", (0.25, key))
                events.insert(tx, 1000 + key, "p", (0.25, key), namespace="full")
            rows[(key, "p")] = (0.25, key)
    stored = _as_version_2(path)
    with tallytree.open(path, readonly=True) as db:  # read as it is
        events = db.aggregate("events")
        root = root_of(db, events)
        assert root is not None and root.pending == stored - 1 and root.packed_pending is None
        assert_reads_match(db, events, rows)
        with db.read() as tx:
            assert tx.meta(b"format") == b"tallytree-2"
    with tallytree.open(path) as db:
        events = db.aggregate("events")
        with db.read() as tx:
            assert tx.meta(b"format") == b"tallytree-4"
            assert tx.kv.get(NODES, node_key(stored - 1)) is not None
        with db.write() as tx:  # a change of the pending entries: the node moves into the record
            events.insert(tx, 102, "p", (0.25, 102))
            events.delete(tx, 1101, "p", namespace="full")
        rows[(102, "p")] = (0.25, 102)
        root = root_of(db, events)
        assert root is not None and root.pending == 0 and pending_entries(db, root) is not None
        assert_reads_match(db, events, rows)
        with db.read() as tx:
            assert tx.kv.get(NODES, node_key(stored - 1)) is None  # freed, not leaked (check() agrees)
            assert tx.kv.get(NODES, node_key(stored)) is None
            assert events.count(tx, namespace="full") == 9
        with db.write() as tx:  # and a full pending node merges into the leaves as before
            for key in range(103, 103 + pending_capacity(8)):
                events.insert(tx, key, "p", (0.25, key))
                rows[(key, "p")] = (0.25, key)
        assert_reads_match(db, events, rows)


def test_a_record_that_miscounts_its_pending_entries_is_a_corruption_error() -> None:
    node = Node(0, True, [b"a", b"c"], [[1, 1]], dirty=True)  # two entries, counted as three
    node.pending = True
    record = decode_root(msgpack.packb([0, 0, [3, 2, 0], encode_node(node), [3, 2, 0]]))
    with pytest.raises(CorruptDatabaseError, match="counts 3 pending entries"):
        record.pending_of(None)  # type: ignore[arg-type]


def _rewrite_pending(path: Path, change: Any) -> None:
    """Apply ``change(root, pending parts) -> (root, parts)`` to the one tree's record, raw."""
    env = lmdb.open(str(path), max_dbs=4)
    roots = env.open_db(b"roots")
    with env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor(db=roots)))
        root = decode_root(value)
        assert root.packed_pending is not None
        root, parts = change(root, msgpack.unpackb(root.packed_pending))
        assert root.pending_summary is not None
        record = [root.node_id, root.height, pack_summary(root.summary), msgpack.packb(parts)]
        txn.put(key, msgpack.packb([*record, pack_summary(root.pending_summary)]), db=roots)
    env.close()


def _damaged_pending(tmp_path: Path, change: Any) -> Path:
    """A database of 100 stored events and two pending ones, its record then changed by ``change``
    (see :func:`_rewrite_pending`); returns its path."""
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=FIELDS)
        with db.write() as tx:
            events.insert_many(tx, [(key, "s", (0.5, key)) for key in range(100)])
        for key in (200, 300):
            with db.write() as tx:
                events.insert(tx, key, "s", (0.5, key))
    _rewrite_pending(path, change)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root, parts: (root, [parts[0], [STORED, *parts[1][1:]], *parts[2:]]), "is not after"),
        (lambda root, parts: (root, [parts[0], parts[1][::-1], *parts[2:]]), "not strictly increasing"),
        (lambda root, parts: (root, [*parts[:2], [9.0, *parts[2][1:]], *parts[3:]]), "pending totals"),
        (lambda root, parts: (root, [1, *parts[1:]]), "not a pending node"),
    ],
)
def test_the_checker_reports_damaged_pending_records(tmp_path: Path, change: Any, message: str) -> None:
    path = _damaged_pending(tmp_path, change)
    with tallytree.open(path) as db, db.read() as tx:
        problems = tallytree.check(tx)
    assert any(message in problem.message for problem in problems), problems


@pytest.mark.parametrize("replace", [False, True])
def test_a_build_over_a_namespace_with_pending_items(db: tallytree.Database, replace: bool) -> None:
    events = db.aggregate("events", values=FIELDS, node_size=8)
    with db.write() as tx:
        events.insert_many(tx, [(key * 2, "s", (0.5, key)) for key in range(50)], namespace="org")
    for key in (1, 51, 501):
        with db.write() as tx:
            events.insert(tx, key, "p", (0.25, key), namespace="org")
    rows = {(key * 2, "s"): (0.5, key) for key in range(50)} | {
        (key, "p"): (0.25, key) for key in (1, 51, 501)
    }
    built = {(key * 2 + 1, "b"): (1.0, key) for key in range(100, 130)}
    with db.write() as tx:
        events.build(
            tx,
            [(key, item_id, values) for (key, item_id), values in built.items()],
            namespace="org",
            replace=replace,
        )
    expected = built if replace else rows | built
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert strict(list(events.items(tx, namespace="org"))) == strict(model_items(expected))
        assert events.totals(tx, namespace="org").tokens == sum(values[1] for values in expected.values())


def test_a_table_insert_per_commit_goes_to_the_pending_nodes(db: tallytree.Database) -> None:
    table = db.table("events")
    by_day = table.aggregate("by_day", key="day", values=("cost",), node_size=8)
    for number in range(3):
        with db.write() as tx:
            table.insert(tx, {"day": number, "cost": 0.5}, id=f"e{number}")
    root = root_of(db, by_day)
    assert root is not None and root.node_id == 0 and root.pending_summary is not None
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert by_day.totals(tx).as_dict() == {"count": 3, "cost": 1.5}
        assert [item.id for item in by_day.items(tx)] == ["e0", "e1", "e2"]


def test_a_root_record_is_decoded_once_while_it_stays_the_same(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = db.aggregate("events", values=FIELDS)
    with db.write() as tx:
        events.insert(tx, 1, "a", (0.5, 1))
    decoded = record_calls(monkeypatch, tallytree._txn, "decode_root")
    for _ in range(3):
        with db.read() as tx:
            assert events.count(tx) == 1
    assert len(decoded) <= 1  # once at most (the write may have left it decoded already)
    with db.write() as tx:
        events.insert(tx, 2, "b", (0.5, 1))
    with db.read() as tx:  # the new record is read, not the remembered one
        assert events.count(tx) == 2 and events.totals(tx).tokens == 2


@pytest.mark.skipif(tallytree._tree.speedups is None, reason="without the C kernels every read decodes it")
def test_reads_whose_bounds_miss_the_pending_entries_do_not_decode_them(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a new event's commit the record holds the pending node's bytes alone. Reads that take
    none of the pending entries or all of them (told by the count and the first and last entries,
    read from the bytes) answer without decoding the node; a bound among them, or a read of a
    pending item, decodes it once. Every answer matches the model."""
    events = db.aggregate("events", values=FIELDS, node_size=16)
    rows = {(key * 10, "s"): (0.5, key) for key in range(60)}
    with db.write() as tx:
        events.insert_many(tx, [(key, item_id, values) for (key, item_id), values in rows.items()])
    decoded = record_calls(monkeypatch, tallytree._btree, "decode_pending")
    for key in (700, 710, 720, 730):  # new events: the last commit appends to the record's bytes
        with db.write() as tx:
            events.insert(tx, key, "p", (0.25, key))
        rows[(key, "p")] = (0.25, key)
    root = root_of(db, events)
    assert root is not None and root.pending_node is None and root.packed_pending is not None
    decoded.clear()
    expected = model_items(rows)
    with db.read() as tx:  # none of the pending entries, or all of them
        assert events.count(tx) == 64
        assert events.totals(tx, ge=100, lt=700).count == 60 - 10
        assert events.totals(tx, ge=100, le=590).tokens == sum(range(10, 60))
        assert events.totals(tx, ge=300).count == 34 and events.totals(tx, ge=300, lt=731).count == 34
        assert events.totals(tx, gt=590).tokens == 700 + 710 + 720 + 730
        assert events.totals(tx, ge=700, le=730).cost == 1.0  # exactly the pending entries
        assert events.count(tx, gt=730) == 0 and events.count(tx, gt=800) == 0
        assert events.rank(tx, 700) == 60 and events.rank(tx, 731) == 64
        assert events.rank(tx, 730, "p") == 63  # the last one: ahead of it, every pending entry but it
        assert events.rank(tx, 100, reverse=True) == 64 - 11
        assert strict(events.get(tx, 100, "s")) == strict(expected[10])
        assert events.get(tx, 5, "p") is None and events.get(tx, 999, "p") is None
        assert strict(events.at(tx, 59)) == strict(expected[59])
        assert strict(events.min(tx)) == strict(expected[0])
    assert decoded == []
    with db.read() as tx:  # a bound among the pending entries
        assert events.count(tx, ge=705, lt=725) == 2 and events.rank(tx, 715) == 62
        assert strict(events.max(tx)) == strict(expected[-1])
        assert strict(events.get(tx, 710, "p")) == strict(tallytree.Item(710, "p", (0.25, 710)))
    assert len(decoded) == 1  # once, then kept with the record for every later reader
    with db.read() as tx:
        assert events.count(tx, ge=711) == 2
    assert len(decoded) == 1
    assert_reads_match(db, events, rows)


def test_a_read_that_misses_a_miscounted_pending_node_still_reports_it(tmp_path: Path) -> None:
    """The count read from the bytes must agree with the record's before a read skips the decode:
    a record that counts three pending entries for two is reported by any read that consults them,
    even one whose bounds end before them."""

    def miscount(root: Root, parts: Any) -> tuple[Root, Any]:
        assert root.pending_summary is not None
        root.summary[0] += 1
        root.pending_summary[0] += 1
        return root, parts

    path = _damaged_pending(tmp_path, miscount)
    with tallytree.open(path) as db, db.read() as tx:
        events = db.aggregate("events")
        for read in (
            lambda: events.count(tx, lt=50),
            lambda: events.rank(tx, 10),
            lambda: events.totals(tx, ge=150),
        ):
            with pytest.raises(CorruptDatabaseError, match="counts 3 pending entries"):
                read()
