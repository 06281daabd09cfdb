"""Node slots and versions (format 4, see ``_txn``): a rewrite of a committed node overwrites its slot.

A node id is ``version << SLOT_BITS | slot``; the NODES key is the slot. A write that rewrites a
committed node gives the new copy the same slot and the next version, so its commit puts the slot's
new value where it used to append a fresh key and delete the old one, and draws no id from the
counter. These tests check what such commits write, that a slot goes up one version per commit
however often a transaction rewrites it, that dropping a rewritten node deletes its slot, and that
the node cache stays right when versions wrap around (the cache is replaced before an id can come
back naming other contents, ``Database._cache_for``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from test_pending import record_commits

import tallytree
from tallytree import _txn
from tallytree._store import META, NODES, ROOTS
from tallytree._txn import SLOT_BITS, SLOT_MASK, node_key, renewed


def _filled(db: tallytree.Database, count: int = 400, node_size: int = 8) -> tallytree.Aggregate:
    events = db.aggregate("events", values=("cost",), node_size=node_size)
    with db.write() as tx:
        events.insert_many(tx, [(2 * n, f"e{n}", (n / 4,)) for n in range(count)])
    return events


def _root_id(db: tallytree.Database, events: tallytree.Aggregate) -> int:
    with db.read() as tx:
        root = tx.root(events._tree_key(None))
        assert root is not None
        return root.node_id


def test_a_scattered_insert_overwrites_its_path_and_draws_no_id(monkeypatch: pytest.MonkeyPatch) -> None:
    db = tallytree.open_memory()
    events = _filled(db)
    before = _root_id(db, events)
    written = record_commits(monkeypatch)
    with db.write() as tx:
        events.insert(tx, 101, "new", (0.5,))  # inside the tree, into a leaf with room
    (ops,) = written
    after = _root_id(db, events)
    assert after == renewed(before) and after >> SLOT_BITS == (before >> SLOT_BITS) + 1
    with db.read() as tx:
        height = tx.root(events._tree_key(None)).height  # type: ignore[union-attr]
    nodes = [op for op in ops if op[0] == NODES]
    assert len(nodes) == height and all(value is not None for _, _, value in nodes)  # no delete
    assert node_key(before) in {key for _, key, _ in nodes}  # the root's own slot
    assert not [op for op in ops if op[0] == META]  # the id counter was not touched
    assert [op[0] for op in ops if op[0] != NODES] == [ROOTS]
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert events.count(tx) == 401 and events.rank(tx, 101, "new") == 51


def test_a_slot_goes_up_one_version_per_commit() -> None:
    """Many writes through one root in one transaction: the root's slot is rewritten once, one
    version up (a node the transaction made keeps its id when it is rewritten again)."""
    db = tallytree.open_memory()
    events = _filled(db)
    before = _root_id(db, events)
    with db.write() as tx:
        for n in range(0, 400, 7):
            events.insert(tx, 2 * n + 1, f"odd{n}", (1.0,))
        events.delete(tx, 10, "e5")
        events.upsert(tx, 20, "e10", (9.0,))
    assert _root_id(db, events) == renewed(before)
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert events.count(tx) == 400 + len(range(0, 400, 7)) - 1


def test_a_rewritten_node_that_is_dropped_deletes_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletes that empty leaves: nodes rewritten and then merged away in one transaction leave no
    slot behind (the checker reports a slot no tree references)."""
    db = tallytree.open_memory()
    events = _filled(db, count=60, node_size=4)
    with db.read() as tx:
        slots_before = {key for key, _ in tx.kv.scan(NODES, b"", None)}
    written = record_commits(monkeypatch)
    with db.write() as tx:
        for n in range(10, 50):
            events.delete(tx, 2 * n, f"e{n}")
    (ops,) = written
    deleted = {key for table, key, value in ops if table == NODES and value is None}
    with db.read() as tx:
        slots_after = {key for key, _ in tx.kv.scan(NODES, b"", None)}
        assert tallytree.check(tx) == []
        assert events.count(tx) == 20
    assert deleted and deleted <= slots_before and not deleted & slots_after


@pytest.mark.parametrize("backend", ["memory", "lmdb"])
def test_reads_stay_right_when_versions_wrap_around(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With four versions per slot, ids come back every four rewrites of a slot; the node cache is
    replaced every two commits (CACHE_SPAN), so it never holds a node under an id that now names
    other contents. A read transaction begun early reads its snapshot again after every commit: it
    decodes the old versions of the rewritten nodes, which a cache shared with later transactions
    would then serve them once their ids came back (the test fails so with a CACHE_SPAN of 2**40).
    Every read after every commit matches the model."""
    monkeypatch.setattr(_txn, "VERSIONS", 4)
    monkeypatch.setattr(_txn, "CACHE_SPAN", 2)
    db = tallytree.open_memory() if backend == "memory" else tallytree.open(tmp_path / "db", durable=False)
    with db:
        events = _filled(db, count=200, node_size=4)
        model = {(2 * n, f"e{n}"): n / 4 for n in range(200)}
        rng = random.Random(5)
        early = db.read()
        early_tx = early.__enter__()
        early_items = list(events.items(early_tx))
        replaced, cache = 0, db._cache
        versions: set[int] = set()
        for step in range(120):
            key = rng.randrange(400)
            with db.write() as tx:
                if (key, f"k{key}") in model:
                    events.delete(tx, key, f"k{key}")
                    del model[(key, f"k{key}")]
                else:
                    events.insert(tx, key, f"k{key}", (step / 8,))
                    model[(key, f"k{key}")] = step / 8
            assert list(events.items(early_tx)) == early_items
            with db.read() as tx:
                replaced, cache = replaced + (db._cache is not cache), db._cache
                versions.add(tx.root(events._tree_key(None)).node_id >> SLOT_BITS)  # type: ignore[union-attr]
                _check_reads(events, tx, model, rng)
        assert versions == {0, 1, 2, 3} and replaced >= 50  # the versions wrapped; caches replaced
        assert list(events.items(early_tx)) == early_items
        early.__exit__(None, None, None)
        with db.read() as tx:
            assert tallytree.check(tx) == []


def _check_reads(
    events: tallytree.Aggregate, tx: Any, model: dict[tuple[int, str], float], rng: random.Random
) -> None:
    expected = sorted(model)
    assert events.count(tx) == len(expected)
    assert [(item.key, item.id) for item in events.items(tx)] == expected
    for _ in range(5):
        index = rng.randrange(len(expected))
        item = events.at(tx, index)
        assert (item.key, item.id) == expected[index] and item.values == (model[expected[index]],)
        low = rng.randrange(400)
        assert events.count(tx, ge=low) == sum(1 for key, _ in expected if key >= low)


def test_a_transaction_older_than_the_cache_gets_one_of_its_own() -> None:
    """A transaction whose snapshot is older than the database's cache (it began as another thread
    replaced the cache) gets a small cache of its own; the database's stays."""
    db = tallytree.open_memory()
    _filled(db)
    current = db._cache
    current.floor = 10
    own = db._cache_for(5)
    assert own is not current and own.floor == 5 and db._cache is current
    fresh = db._cache_for(10 + _txn.CACHE_SPAN)
    assert fresh is db._cache and fresh is not current and len(fresh) == 0
    assert fresh.floor == 10 + _txn.CACHE_SPAN


def test_node_keys_are_slots() -> None:
    node_id = 5 << SLOT_BITS | 1234
    assert node_key(node_id) == node_key(1234) == (1234).to_bytes(8, "big")
    assert renewed(node_id) & SLOT_MASK == 1234 and renewed(node_id) >> SLOT_BITS == 6
