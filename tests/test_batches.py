"""Batch inserts (``insert_many`` / ``Tree.merge_sorted``) against a plain dict model.

Covers the paths a handful of items never reach: appends that fill many new leaves at once (and grow
the tree by several levels in one go), random batches that put many entries into one leaf (the
one-sort merge), the per-column fast path of validation and encoding, and its errors. Every batch is
followed by the invariant checker and a full comparison with the model, exact sums included.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import snapshot, strict

import tallytree
from tallytree import (
    DuplicateItemError,
    InvalidKeyError,
    InvalidValueError,
    Item,
    KeyTooLargeError,
    UnsupportedKeyTypeError,
)
from tallytree._native import speedups

FIELDS = ("cost", "tokens")


def model_totals(model: dict[tuple[int, int], tuple[Any, ...]]) -> dict[str, int | float]:
    costs = [values[0] for values in model.values()]
    return {
        "count": len(model),
        "cost": math.fsum(costs) if any(type(cost) is float for cost in costs) else sum(costs),
        "tokens": sum(values[1] for values in model.values()),
    }


def assert_matches(
    db: tallytree.Database, aggregate: tallytree.Aggregate, model: dict[tuple[int, int], tuple[Any, ...]]
) -> None:
    with db.read() as tx:
        assert tallytree.check(tx) == []
        expected = [Item(key, item_id, values) for (key, item_id), values in sorted(model.items())]
        assert strict(list(aggregate.items(tx))) == strict(expected)
        assert strict(aggregate.totals(tx).as_dict()) == strict(model_totals(model))
        if expected:  # positional reads use the summaries the batch wrote into the parents
            middle = len(expected) // 2
            assert strict(aggregate.at(tx, middle)) == strict(expected[middle])
            assert aggregate.rank(tx, expected[middle].key, expected[middle].id) == middle
            assert aggregate.count(tx, lt=expected[middle].key) == sum(
                1 for item in expected if item.key < expected[middle].key
            )


def event(rng: random.Random, key: int, item_id: int) -> tuple[int, int, tuple[Any, ...]]:
    return key, item_id, (round(rng.uniform(0, 0.05), 6), rng.randint(1, 8000))


@pytest.mark.parametrize("node_size", [4, 5, 9])
@pytest.mark.parametrize("start", [0, 37])
def test_appends_build_whole_leaves_and_levels(db: tallytree.Database, node_size: int, start: int) -> None:
    """Time-ordered batches past the last item, into an empty or a filled tree, many nodes at a time."""
    rng = random.Random(node_size * 100 + start)
    aggregate = db.aggregate("appends", values=FIELDS, node_size=node_size)
    model: dict[tuple[int, int], tuple[Any, ...]] = {}
    if start:
        rows = [event(rng, key * 3, key) for key in rng.sample(range(200), start)]
        with db.write() as tx:
            assert aggregate.insert_many(tx, rows) == start
        model.update({(key, item_id): values for key, item_id, values in rows})
    top = 1000
    for size in (1, 7, 60, 500, 3):
        rows = [event(rng, top + index * 2, top + index) for index in range(size)]
        top += 2 * size
        with db.write() as tx:
            assert aggregate.insert_many(tx, rows) == size
        model.update({(key, item_id): values for key, item_id, values in rows})
        assert_matches(db, aggregate, model)


def test_appends_in_one_transaction_reuse_dirty_nodes(db: tallytree.Database) -> None:
    """Several append batches, a delete and a random batch in one transaction, then commit."""
    rng = random.Random(7)
    aggregate = db.aggregate("appends", values=FIELDS, node_size=4)
    model: dict[tuple[int, int], tuple[Any, ...]] = {}
    with db.write() as tx:
        for batch in range(4):
            rows = [event(rng, batch * 100 + index, index) for index in range(40)]
            assert aggregate.insert_many(tx, rows) == 40
            model.update({(key, item_id): values for key, item_id, values in rows})
        aggregate.delete(tx, 5, 5)
        del model[(5, 5)]
        rows = [event(rng, rng.randrange(400) * 2 + 1, 1000 + index) for index in range(30)]
        assert aggregate.insert_many(tx, rows) == 30
        model.update({(key, item_id): values for key, item_id, values in rows})
    assert_matches(db, aggregate, model)


@pytest.mark.parametrize("on_duplicate", ["skip", "update"])
def test_random_batches_merge_many_entries_per_leaf(db: tallytree.Database, on_duplicate: str) -> None:
    """Large random batches: dozens of new entries per leaf (the merge path), some already stored."""
    rng = random.Random(11)
    aggregate = db.aggregate("random", values=FIELDS, node_size=16)
    model: dict[tuple[int, int], tuple[Any, ...]] = {}
    next_id = 0
    for size in (50, 1500, 20, 3000):
        rows = []
        for _ in range(size):
            next_id += 1
            rows.append(event(rng, rng.randrange(10_000), next_id))
        stored = sorted(model)
        for key, item_id in rng.sample(stored, min(len(stored), size // 10)):  # already there
            values = model[key, item_id] if rng.random() < 0.5 else (rng.random(), rng.randint(0, 9))
            rows.append((key, item_id, values))
        rng.shuffle(rows)
        expected = 0
        for key, item_id, values in rows:
            old = model.get((key, item_id))
            if old is None or (on_duplicate == "update" and strict(old) != strict(values)):
                expected += 1
                model[key, item_id] = values
        with db.write() as tx:
            assert aggregate.insert_many(tx, rows, on_duplicate=on_duplicate) == expected
        assert_matches(db, aggregate, model)


class MergeSpy:
    """Wraps the C kernel ``merge_children`` and counts what it answered for each leaf: merged bytes,
    the pieces of a split, a duplicate's index, or None (the leaf left to the decoded path)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.answers: dict[str, int] = {"bytes": 0, "pieces": 0, "duplicate": 0, "none": 0}

    def __call__(self, *args: Any) -> Any:
        rows = self.kernel(*args)
        for *_, answer in rows:
            kinds = {bytes: "bytes", list: "pieces", int: "duplicate"}
            kind = kinds.get(type(answer), "none")
            self.answers[kind] += 1
        return rows


@pytest.fixture
def merge_spy(monkeypatch: pytest.MonkeyPatch) -> MergeSpy | None:
    """A spy on ``merge_children`` for the test's duration, or None when the kernels are not built."""
    if speedups is None:
        return None
    spy = MergeSpy(speedups.merge_children)
    monkeypatch.setattr(speedups, "merge_children", spy)
    return spy


@pytest.mark.parametrize("on_duplicate", ["error", "skip", "update"])
def test_scattered_batches_merge_into_stored_leaves(
    db: tallytree.Database, on_duplicate: str, merge_spy: MergeSpy | None
) -> None:
    """Scattered batches into roomy leaves take their new entries in the leaves' stored bytes (the C
    kernel ``merge_children``, no decoding), and a leaf that must split is cut there too; a leaf
    changed earlier in the transaction and one that holds an entry already are left to the decoded
    path. Both give the model's
    answers, and a duplicate with ``on_duplicate="error"`` found in a stored leaf writes nothing."""
    rng = random.Random(23)
    aggregate = db.aggregate("scattered", values=FIELDS, node_size=16)
    model: dict[tuple[int, int], tuple[Any, ...]] = {}
    rows = [event(rng, key * 10, key) for key in range(600)]
    with db.write() as tx:
        aggregate.insert_many(tx, rows)
    model.update({(key, item_id): values for key, item_id, values in rows})
    assert_matches(db, aggregate, model)
    free = [key for key in range(6000) if key % 10]
    rng.shuffle(free)
    for round_index in range(6):
        with db.write() as tx:
            for _ in range(2):  # the second batch meets leaves the first rewrote in this transaction
                rows = [event(rng, free.pop(), 10_000 + len(free)) for _ in range(25)]
                assert aggregate.insert_many(tx, rows, on_duplicate=on_duplicate) == 25
                model.update({(key, item_id): values for key, item_id, values in rows})
            if round_index == 3:  # a dozen entries into one leaf: it must split
                keys = [key for key in range(2001, 2020) if key % 10][:12]
                free = [key for key in free if key not in keys]
                rows = [event(rng, key, 20_000 + key) for key in keys]
                assert aggregate.insert_many(tx, rows, on_duplicate=on_duplicate) == 12
                model.update({(key, item_id): values for key, item_id, values in rows})
        assert_matches(db, aggregate, model)
    stored_key = rng.choice(sorted(model))
    rows = [event(rng, free.pop(), 30_000 + index) for index in range(30)]
    rows.append((*stored_key, (0.75, 3)))
    rows.sort()
    before = snapshot(db)
    with db.write() as tx:
        if on_duplicate == "error":
            with pytest.raises(DuplicateItemError, match="already exists"):
                aggregate.insert_many(tx, rows, on_duplicate="error")
            assert not tx.changed
        else:
            changed = aggregate.insert_many(tx, rows, on_duplicate=on_duplicate)
            updated = on_duplicate == "update" and strict(model[stored_key]) != strict((0.75, 3))
            assert changed == 30 + updated
            for key, item_id, values in rows:
                if (key, item_id) != stored_key or on_duplicate == "update":
                    model[key, item_id] = values
    if on_duplicate == "error":
        assert snapshot(db) == before
    assert_matches(db, aggregate, model)
    if merge_spy is not None:
        answers = merge_spy.answers
        assert answers["bytes"] > 100, answers
        assert answers["pieces"] > 0, answers  # the leaves that split
        assert answers["duplicate"] == 1, answers


def test_integer_sums_stay_exact_in_batches(db: tallytree.Database) -> None:
    """Ints up to the largest accepted value and floats mixed in one column sum exactly."""
    aggregate = db.aggregate("exact", values=FIELDS, node_size=4)
    rows = [(key, 0, (2**64 - 1 if key % 2 else 0.1, -(2**63))) for key in range(300)]
    with db.write() as tx:
        assert aggregate.insert_many(tx, rows) == 300
    with db.read() as tx:
        totals = aggregate.totals(tx)
        assert totals.cost == math.fsum([2**64 - 1, 0.1] * 150)
        assert totals.tokens == -(2**63) * 300
        assert tallytree.check(tx) == []


def test_fast_path_encodes_like_the_item_path(db: tallytree.Database) -> None:
    """Batches of one key type take the per-column encoders; the entries must be the very bytes
    ``encode_key`` gives, so reads with single keys find every item."""
    aggregate = db.aggregate("kinds", values=("value",), node_size=4)
    moment = datetime(2024, 5, 1, tzinfo=UTC)
    batches: list[list[tuple[Any, Any, tuple[Any, ...]]]] = [
        [(key, f"id{key}", (key % 7,)) for key in (0, -1, 1, 2**55, -(2**60), 2**80, 17, 255)],
        [(key, index, (1.5,)) for index, key in enumerate((0.5, -2.25, 1e300, -0.0, 5e-324, 3.0))],
        [(key, key.encode(), (1,)) for key in ("", "a", "zz", "é", "\U0001f600")],
        [(key, 1, (2,)) for key in (b"", b"\x01", b"\xff\xfe")],
        [(moment + timedelta(microseconds=step), "d", (3,)) for step in (0, 1, -1, 10**12)],
        [((key, "x"), 2, (4,)) for key in range(5)],
    ]
    for namespace, batch in enumerate(batches):
        fast = aggregate._encode_batch(list(batch))
        assert fast is not None, batch
        assert fast[0] == aggregate._encode_items(list(batch))[0]
        with db.write() as tx:
            assert aggregate.insert_many(tx, batch, namespace=namespace) == len(batch)
        with db.read() as tx:
            for key, item_id, values in batch:
                found = aggregate.get(tx, key, item_id, namespace=namespace)
                assert found is not None and strict(found.values) == strict(values)
    with db.read() as tx:
        assert tallytree.check(tx) == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ((50, 50, (float("nan"), 1)), InvalidValueError),
        ((50, 50, (1.0, float("inf"))), InvalidValueError),
        ((50, 50, (1.0, True)), InvalidValueError),
        ((50, 50, (1.0, 2**64)), InvalidValueError),
        ((50, 50, (1.0,)), InvalidValueError),
        ((float("nan"), 50, (1.0, 1)), InvalidKeyError),
        ((50, None, (1.0, 1)), UnsupportedKeyTypeError),
        ((50, "x" * 600, (1.0, 1)), KeyTooLargeError),
    ],
)
def test_a_bad_item_in_a_fast_batch_changes_nothing(
    db: tallytree.Database, bad: tuple[Any, ...], error: type[Exception]
) -> None:
    """One bad item among good ones: the same typed error as item by item, and nothing written."""
    aggregate = db.aggregate("strict", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, key, (0.5, key)) for key in range(0, 200, 2)])
    before = snapshot(db)
    rows: list[Any] = [(key, key, (0.25, key)) for key in range(1, 100, 2)]
    rows.insert(20, bad)
    with db.write() as tx:
        with pytest.raises(error) as raised:
            aggregate.insert_many(tx, rows)
        with pytest.raises(error) as alone:
            aggregate.insert(tx, bad[0], bad[1], bad[2])
        assert str(raised.value) == str(alone.value)
        assert not tx.changed
    assert snapshot(db) == before


def test_duplicates_are_named_and_nothing_is_written(db: tallytree.Database) -> None:
    aggregate = db.aggregate("dups", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, key, (0.5, key)) for key in range(0, 400, 4)])
    before = snapshot(db)
    fresh = [(key, key, (0.5, key)) for key in range(399, 0, -4)]  # unsorted: the sort path
    with db.write() as tx:
        with pytest.raises(DuplicateItemError, match=r"key=203, id=203\) appears twice"):
            aggregate.insert_many(tx, [*fresh, (203, 203, (9.0, 9))])
        with pytest.raises(DuplicateItemError, match=r"key=200, id=200\) already exists"):
            aggregate.insert_many(tx, [*fresh, (300, 300, (1.0, 1)), (200, 200, (1.0, 1))])
        with pytest.raises(DuplicateItemError, match=r"key=0, id=0\) already exists"):
            aggregate.insert_many(tx, [(0, 0, (1.0, 1)), (1, 1, (1.0, 1))])  # sorted: no sort
        assert not tx.changed
    assert snapshot(db) == before
