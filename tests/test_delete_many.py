"""Aggregate.delete_many: many items removed in one pass down the tree.

The state machine of test_model.py runs it among every other write; here, trees of every shape lose
random shares of their items (all of them too) in one call, with small nodes so that leaves and
internal nodes empty out, merge and borrow at every level, and the checker runs after each batch.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree import Item
from tallytree.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    ItemNotFoundError,
    TransactionError,
)


def _stored(events: tallytree.Aggregate, tx: tallytree.Transaction, namespace: object = None) -> list[Item]:
    return list(events.items(tx, namespace=namespace))


@settings(max_examples=60, deadline=None)
@given(
    node_size=st.sampled_from([4, 5, 6, 7, 9, 16]),
    size=st.integers(1, 600),
    shares=st.lists(st.sampled_from([0.02, 0.3, 0.7, 0.97, 1.0]), min_size=1, max_size=3),
    how=st.sampled_from(["batch", "one by one", "appended"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_batches_of_deletes_match_a_model(
    node_size: int, size: int, shares: list[float], how: str, seed: int
) -> None:
    rng = random.Random(seed)
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost", "tokens"), node_size=node_size)
    keys = rng.sample(range(10 * size), size)
    if how == "appended":  # in time order, one transaction each: the last ones wait in the pending node
        keys.sort()
    model = {key: (rng.choice([0.1, 0.25, 1e-3]), rng.randrange(100)) for key in keys}
    if how == "batch":
        with db.write() as tx:
            events.insert_many(tx, [(key, f"e{key}", model[key]) for key in keys])
    else:
        for key in keys:
            with db.write() as tx:
                events.insert(tx, key, f"e{key}", model[key])
    for share in shares:
        gone = [key for key in model if rng.random() < share]
        rng.shuffle(gone)  # any order: the call sorts
        with db.write() as tx:
            assert events.delete_many(tx, [(key, f"e{key}") for key in gone]) == len(gone)
            assert tallytree.check(tx) == []
        for key in gone:
            del model[key]
        with db.read() as tx:
            assert [(item.key, item.values) for item in _stored(events, tx)] == sorted(model.items())
            totals = events.totals(tx)
            assert totals.count == len(model)
            assert totals.cost == math.fsum(cost for cost, _ in model.values())
            assert totals.tokens == sum(tokens for _, tokens in model.values())


def _loaded(node_size: int = 4) -> tuple[tallytree.Database, tallytree.Aggregate]:
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost",), node_size=node_size)
    with db.write() as tx:
        events.insert_many(tx, [(key, "e", (1,)) for key in range(100)], namespace="u1")
    return db, events


def test_a_missing_item_is_named_and_nothing_is_removed() -> None:
    db, events = _loaded()
    with db.write() as tx:
        with pytest.raises(ItemNotFoundError, match=r"key=500, id='e'.*nothing was removed.*missing='skip'"):
            events.delete_many(tx, [(1, "e"), (500, "e"), (2, "e"), (600, "e")], namespace="u1")
        assert events.count(tx, namespace="u1") == 100
        assert tallytree.check(tx) == []


def test_an_item_given_twice_is_missing_the_second_time() -> None:
    db, events = _loaded()
    with db.write() as tx:
        with pytest.raises(ItemNotFoundError, match="given twice"):
            events.delete_many(tx, [(3, "e"), (4, "e"), (3, "e")], namespace="u1")
        assert events.count(tx, namespace="u1") == 100
        assert events.delete_many(tx, [(3, "e"), (4, "e"), (3, "e")], namespace="u1", missing="skip") == 2
        assert events.count(tx, namespace="u1") == 98


def test_skip_passes_over_absent_items_and_other_namespaces() -> None:
    db, events = _loaded()
    with db.write() as tx:
        assert events.delete_many(tx, [(5, "e"), (5, "x"), (1000, "e")], namespace="u1", missing="skip") == 1
        assert events.delete_many(tx, [(6, "e")], namespace="u2", missing="skip") == 0
        assert events.delete_many(tx, [], namespace="u1") == 0
    with db.read() as tx:
        assert events.count(tx, namespace="u1") == 99
        assert events.get(tx, 6, "e", namespace="u1") is not None


def test_items_as_returned_by_reads_and_as_given_to_insert_many() -> None:
    db, events = _loaded()
    with db.write() as tx:
        first = list(events.items(tx, namespace="u1", lt=10))
        assert events.delete_many(tx, first, namespace="u1") == 10
        assert events.delete_many(tx, ((key, "e", (1,)) for key in range(10, 20)), namespace="u1") == 10
        assert events.count(tx, namespace="u1") == 80
        assert events.min(tx, namespace="u1") == Item(20, "e", (1,))


def test_every_item_empties_the_namespace() -> None:
    db, events = _loaded()
    with db.write() as tx:
        assert events.delete_many(tx, [(key, "e") for key in range(100)], namespace="u1") == 100
        assert tallytree.check(tx) == []
    with db.read() as tx:
        assert events.count(tx, namespace="u1") == 0
        assert list(events.namespaces(tx)) == []


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda events, tx: events.delete_many(tx, [(1, "e")], namespace="u1", missing="ignore"),
            InvalidArgumentError,
        ),
        (lambda events, tx: events.delete_many(tx, [1], namespace="u1"), InvalidValueError),
        (
            lambda events, tx: events.delete_many(tx, [(1, "e"), (float("nan"), "e")], namespace="u1"),
            InvalidKeyError,
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_removed(call: object, error: type[Exception]) -> None:
    db, events = _loaded()
    with db.write() as tx:
        with pytest.raises(error):
            call(events, tx)  # type: ignore[operator]
        assert events.count(tx, namespace="u1") == 100


def test_a_read_transaction_and_a_table_aggregate_are_refused() -> None:
    db, events = _loaded()
    with db.read() as tx, pytest.raises(TransactionError, match="write transaction"):
        events.delete_many(tx, [(1, "e")], namespace="u1")  # type: ignore[arg-type]
    orders = db.table("orders")
    by_shop = orders.aggregate("by_shop", key="shop")
    with db.write() as tx:
        orders.insert(tx, {"shop": "a"})
        with pytest.raises(TransactionError):
            by_shop.delete_many(tx, [("a", 1)])
        assert by_shop.count(tx) == 1


def test_deletes_persist_and_an_abort_keeps_everything(tmp_path: Path) -> None:
    with tallytree.open(tmp_path / "db") as db:
        events = db.aggregate("events", values=("cost",), node_size=8)
        with db.write() as tx:
            events.insert_many(tx, [(key, "e", (key,)) for key in range(2_000)])
        with pytest.raises(RuntimeError), db.write() as tx:
            events.delete_many(tx, [(key, "e") for key in range(0, 2_000, 3)])
            raise RuntimeError("abort")
        with db.write() as tx:
            assert events.delete_many(tx, [(key, "e") for key in range(1, 2_000, 2)]) == 1_000
    with tallytree.open(tmp_path / "db") as db:
        events = db.aggregate("events", values=("cost",))
        with db.read() as tx:
            assert tallytree.check(tx) == []
            assert events.totals(tx).as_dict() == {"count": 1_000, "cost": sum(range(0, 2_000, 2))}
