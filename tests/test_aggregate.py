"""Focused tests of the aggregate: golden examples, exact sums under churn, bad input at every entry
point (a typed error, and nothing changed), transaction misuse, dropped aggregates, and regressions.

Every test runs over both backends through the ``db`` fixture.
"""

from __future__ import annotations

import base64
import functools
import inspect
import math
import operator
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import snapshot, strict

import tallytree
from tallytree import (
    AggregateNotFoundError,
    ArgumentTypeError,
    BoundsError,
    DuplicateItemError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    Item,
    ItemNotFoundError,
    KeyTooLargeError,
    OutOfRangeError,
    Position,
    SchemaMismatchError,
    Totals,
    TransactionError,
    UnsupportedKeyTypeError,
)
from tallytree._keys import encode_key

FIELDS = ("cost", "tokens")
NAN = float("nan")
INF = float("inf")


def keys_of(items: Any) -> list[Any]:
    return [(type(item.key).__name__, item.key) for item in items]


@pytest.fixture
def filled(db: tallytree.Database) -> tuple[tallytree.Database, tallytree.Aggregate]:
    """A database with 60 items in two namespaces of ``events`` (node size 4) and a bystander."""
    events = db.aggregate("events", values=FIELDS, node_size=4)
    bystander = db.aggregate("bystander")
    with db.write() as tx:
        events.insert_many(tx, [(key, f"e{key}", (key * 0.5, key)) for key in range(40)])
        events.insert_many(
            tx, [(("open", key), key, (0.1, 2**63)) for key in range(20)], namespace=("org", 1)
        )
        bystander.insert(tx, "only", 1)
    return db, events


# ================================================================== golden examples


def test_items_follow_one_total_order_across_types(db: tallytree.Database) -> None:
    in_order: list[Any] = [
        None, False, True,
        -INF, -1e300, -2, -1.5, 0, 0.0, 0.5, 1, 1.0, 2**70, INF,
        "", "a", "a\x00", "ab", "b", "é",
        b"", b"\x00", b"a",
        datetime(2020, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, 3, tzinfo=timezone(timedelta(hours=2))),
        (), (None,), (1, "a"), (1.0, "a"), (1, "b"), (1, "b", 0), ("a",),
    ]  # fmt: skip
    aggregate = db.aggregate("order")
    shuffled = list(in_order)
    random.Random(7).shuffle(shuffled)
    with db.write() as tx:
        for key in shuffled:
            aggregate.insert(tx, key, "id")
    with db.read() as tx:
        forward = list(aggregate.items(tx))
        backward = list(aggregate.items(tx, reverse=True))
        selected = [aggregate.at(tx, index) for index in range(len(in_order))]
    expected = [(type(key).__name__, key) for key in in_order]
    assert keys_of(forward) == expected
    assert keys_of(backward) == expected[::-1]
    assert keys_of(selected) == expected
    assert forward[-8].key == datetime(2024, 1, 1, 1, tzinfo=UTC)
    assert forward[-8].key.utcoffset() == timedelta(0), "datetimes come back in UTC"


def test_equal_keys_are_ordered_by_id_and_ids_by_type(db: tallytree.Database) -> None:
    aggregate = db.aggregate("ids")
    with db.write() as tx:
        for item_id in ["b", 10, b"a", "a", -5, b""]:
            aggregate.insert(tx, 1, item_id)
    with db.read() as tx:
        assert [item.id for item in aggregate.items(tx)] == [-5, 10, "a", "b", b"", b"a"]


def test_key_bounds_compare_by_value_and_positions_exactly(db: tallytree.Database) -> None:
    aggregate = db.aggregate("bounds")
    with db.write() as tx:
        for key, item_id in [(1.0, "a"), (2, "a"), (1, "b"), (0.5, "z"), (1, "a")]:
            aggregate.insert(tx, key, item_id)
    with db.read() as tx:
        assert [(item.key, item.id) for item in aggregate.items(tx)] == [
            (0.5, "z"), (1, "a"), (1, "b"), (1.0, "a"), (2, "a"),
        ]  # fmt: skip
        count = aggregate.count
        assert count(tx, le=1) == count(tx, le=1.0) == 4
        assert count(tx, eq=1) == count(tx, eq=1.0) == 3
        assert count(tx, lt=1) == count(tx, gt=1) == 1
        assert count(tx, ge=1.0) == 4
        assert count(tx, ge=Position(1.0, "a")) == 2
        assert count(tx, gt=Position(1, "b")) == count(tx, gt=Item(1, "b")) == 2
        assert count(tx, le=Position(1, "a")) == 2
        assert count(tx, lt=Position(1, "a")) == 1
        assert count(tx, ge=Position(1, "zz"), lt=Position(1.0, "a")) == 0
        assert count(tx, ge=3, le=0) == 0, "an inverted range is empty"
        assert aggregate.rank(tx, 1) == 1
        assert aggregate.rank(tx, 1, "b") == 2
        assert aggregate.rank(tx, 1.0, "a") == 3
        assert aggregate.rank(tx, 1, reverse=True) == 1
        assert aggregate.rank(tx, 1, "a", reverse=True) == 3
        assert aggregate.rank(tx, 1, ge=1) == 0
        assert aggregate.rank(tx, 2, ge=1, lt=2) == 3
        assert aggregate.rank(tx, 5, le=1) == 4
        assert aggregate.at(tx, -1, eq=1).key == 1.0
        assert aggregate.min(tx, gt=0.5).id == "a"
        assert aggregate.max(tx, lt=2) == Item(1.0, "a", ())
        assert aggregate.min(tx, gt=2) is None
        assert aggregate.max(tx, ge=3, le=0) is None


def test_prefix_bounds_match_tuple_keys_by_leading_elements(db: tallytree.Database) -> None:
    aggregate = db.aggregate("prefix")
    keys = [("open", 3), ("open", 3.0), ("open", 3, "x"), ("open",), ("opened", 1), ("closed", 1),
            "open", 5, ("open", 2)]  # fmt: skip
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id") for key in keys])
    with db.read() as tx:
        assert aggregate.count(tx, prefix=("open",)) == 5
        assert aggregate.count(tx, prefix=("open", 3)) == aggregate.count(tx, prefix=("open", 3.0)) == 3
        assert aggregate.count(tx, prefix=()) == 7
        assert aggregate.count(tx, prefix=("nothing",)) == 0
        assert [item.key for item in aggregate.items(tx, prefix=("open",))] == [
            ("open",), ("open", 2), ("open", 3), ("open", 3.0), ("open", 3, "x"),
        ]  # fmt: skip  # by value first: ("open", 3.0) equals ("open", 3), which is a prefix of the last


def test_at_takes_negative_indexes_and_raises_out_of_range(db: tallytree.Database) -> None:
    aggregate = db.aggregate("positions", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id") for key in range(30)])
    with db.read() as tx:
        assert aggregate.at(tx, 0).key == 0
        assert aggregate.at(tx, -1).key == 29
        assert aggregate.at(tx, -30).key == 0
        assert aggregate.at(tx, 2, ge=10).key == 12
        assert aggregate.at(tx, -1, lt=10).key == 9
        for index in (30, -31, 10**30):
            with pytest.raises(OutOfRangeError):
                aggregate.at(tx, index)
        with pytest.raises(IndexError):  # OutOfRangeError is an IndexError
            aggregate.at(tx, 0, ge=100)


def test_page_cursors_stay_valid_when_items_change_between_pages(db: tallytree.Database) -> None:
    aggregate = db.aggregate("pages", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id") for key in range(0, 40, 2)])
    with db.read() as tx:
        first = aggregate.page(tx, limit=5)
    assert [item.key for item in first.items] == [0, 2, 4, 6, 8] and not first.done
    with db.write() as tx:
        aggregate.insert(tx, 7, "id")  # before the cursor: not seen again
        aggregate.insert(tx, 9, "id")  # after it: seen
        aggregate.delete(tx, 10, "id")  # the next item: skipped
        aggregate.delete(tx, 8, "id")  # the cursor's own item: the cursor stays valid
    with db.read() as tx:
        second = aggregate.page(tx, limit=5, after=first.cursor)
        assert [item.key for item in second.items] == [9, 12, 14, 16, 18]
        back = aggregate.page(tx, limit=3, after=second.cursor, reverse=True)
        assert [item.key for item in back.items] == [16, 14, 12]
        rest = aggregate.page(tx, limit=100, after=second.cursor)
        assert rest.done and [item.key for item in rest.items] == list(range(20, 40, 2))
        empty = aggregate.page(tx, ge=1000)
        assert empty.items == [] and empty.done and empty.cursor is None


def test_namespaces_are_independent_and_listed_with_totals(db: tallytree.Database) -> None:
    aggregate = db.aggregate("spaces", values=("cost",))
    with db.write() as tx:
        aggregate.insert(tx, 1, "a", (1.5,), namespace=("org", 1.0))
        aggregate.insert(tx, 1, "a", (2,), namespace=("org", 1))
        aggregate.insert(tx, 1, "a", (3,), namespace="user:1")
        aggregate.insert(tx, 2, "a", (4,), namespace="user:1")
        aggregate.insert(tx, 1, "a", (5,))
    with db.read() as tx:
        listed = [(namespace, totals.as_dict()) for namespace, totals in aggregate.namespaces(tx)]
        assert strict(listed) == strict([
            (None, {"count": 1, "cost": 5}),
            ("user:1", {"count": 2, "cost": 7}),
            (("org", 1), {"count": 1, "cost": 2}),
            (("org", 1.0), {"count": 1, "cost": 1.5}),
        ])  # fmt: skip
        assert aggregate.count(tx, namespace="user:2") == 0
        assert list(aggregate.items(tx, namespace="user:2")) == []
        assert aggregate.totals(tx, namespace="nobody") == Totals(0, ("cost",), (0,))
    with db.write() as tx:
        aggregate.clear(tx, namespace="user:1")
    with db.read() as tx:
        assert [namespace for namespace, _ in aggregate.namespaces(tx)] == [None, ("org", 1), ("org", 1.0)]
        assert tallytree.check(tx, aggregate) == []
        assert tallytree.check(tx, aggregate, namespace=("org", 1)) == []


def test_float_sums_are_correctly_rounded_not_accumulated(db: tallytree.Database) -> None:
    aggregate = db.aggregate("floats", values=("value",), node_size=4)
    cases = [
        [0.1, 0.2, 0.3],
        [1e16, 1.0, -1e16],
        [1e100, 1.0, -1e100, 1e-100],
        [0.1] * 10,
        [2.0**-1074] * 3 + [1.0],
    ]
    for number, values in enumerate(cases):
        with db.write() as tx:
            aggregate.insert_many(
                tx, [(index, "id", (value,)) for index, value in enumerate(values)], namespace=number
            )
    with db.read() as tx:
        for number, values in enumerate(cases):
            total = aggregate.sum(tx, "value", namespace=number)
            assert type(total) is float and total == math.fsum(values)
            tail = aggregate.sum(tx, "value", namespace=number, ge=1)
            assert tail == math.fsum(values[1:])
    naive = functools.reduce(operator.add, cases[0])  # left to right (sum() compensates since 3.12)
    assert naive != math.fsum(cases[0]), "the cases must tell exact sums from naive ones"


def test_mixed_int_and_float_values_sum_exactly_then_round_once(db: tallytree.Database) -> None:
    aggregate = db.aggregate("mixed", values=("value",))
    values: list[int | float] = [2**60 + 1, 0.5, 2**60 + 1, -0.25]
    with db.write() as tx:
        aggregate.insert_many(tx, [(index, "id", (value,)) for index, value in enumerate(values)])
    with db.read() as tx:
        total = aggregate.sum(tx, "value")
        assert type(total) is float
        assert total == float(sum(map(Fraction, values)))
        ints_only = aggregate.sum(tx, "value", eq=0)
        assert type(ints_only) is int and ints_only == 2**60 + 1


def test_int_sums_are_exact_beyond_64_bits(db: tallytree.Database) -> None:
    aggregate = db.aggregate("ints", values=("big", "small"), node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(index, "max", (2**64 - 1, -(2**63))) for index in range(50)])
    with db.read() as tx:
        totals = aggregate.totals(tx)
        assert strict(totals.as_dict()) == strict(
            {"count": 50, "big": 50 * (2**64 - 1), "small": -50 * 2**63}
        )
        assert aggregate.sum(tx, "big", ge=10, lt=13) == 3 * (2**64 - 1)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30])
def test_an_int_value_beyond_the_stored_range_is_refused(db: tallytree.Database, value: int) -> None:
    """A single value is stored in 64 bits (-2**63 to 2**64 - 1, as the README says); its sums are not."""
    aggregate = db.aggregate("ints", values=("big",))
    with db.write() as tx:
        aggregate.insert(tx, 0, "ok", (2**64 - 1,))
        with pytest.raises(InvalidValueError, match=r"-2\*\*63 to 2\*\*64 - 1") as raised:
            aggregate.insert(tx, 1, "big", (value,))
        assert "larger unit" in str(raised.value)
    with db.read() as tx:
        assert aggregate.count(tx) == 1


def test_float_sum_beyond_the_largest_double_is_infinite_and_recovers(db: tallytree.Database) -> None:
    """Regression: a float sum above the largest double made totals() and namespaces() raise
    OverflowError; IEEE 754 rounds it to infinity. The exact sum lives on, so it comes back."""
    aggregate = db.aggregate("huge", values=("value",))
    with db.write() as tx:
        aggregate.insert(tx, 1, "a", (1e308,))
        aggregate.insert(tx, 2, "b", (1e308,))
        aggregate.insert(tx, 3, "c", (-1e308,), namespace="negative")
        aggregate.insert(tx, 4, "d", (-1e308,), namespace="negative")
    with db.read() as tx:
        assert aggregate.sum(tx, "value") == INF
        assert aggregate.sum(tx, "value", namespace="negative") == -INF
        assert aggregate.sum(tx, "value", lt=2) == 1e308
        assert [totals.value for _, totals in aggregate.namespaces(tx)] == [INF, -INF]
    with db.write() as tx:
        aggregate.insert(tx, 5, "e", (-1e308,))
    with db.read() as tx:
        assert aggregate.sum(tx, "value") == 1e308


def test_upsert_reports_what_happened(db: tallytree.Database) -> None:
    aggregate = db.aggregate("upserts", values=("value",))
    with db.write() as tx:
        assert aggregate.upsert(tx, 1, "a", (1,)) == "inserted"
        assert aggregate.upsert(tx, 1, "a", (1,)) == "unchanged"
        assert aggregate.upsert(tx, 1, "a", (1.0,)) == "updated", "1 and 1.0 are different values"
        assert aggregate.upsert(tx, 1, "a", {"value": 2}) == "updated"
    with db.read() as tx:
        assert strict(aggregate.get(tx, 1, "a")) == strict(Item(1, "a", (2,)))
        assert aggregate.get(tx, 1.0, "a") is None, "1.0 is another key"


def test_writes_that_change_nothing_write_nothing(filled: Any) -> None:
    db, events = filled
    before = snapshot(db)
    noops: list[Callable[[Any], Any]] = [
        lambda tx: events.upsert(tx, 3, "e3", (1.5, 3)),
        lambda tx: events.discard(tx, 3, "missing"),
        lambda tx: events.discard(tx, 3, "e3", namespace="elsewhere"),
        lambda tx: events.insert_many(tx, [(3, "e3", (9.0, 9)), (4, "e4", (0, 0))], on_duplicate="skip"),
        lambda tx: events.insert_many(tx, [(3, "e3", (1.5, 3)), (4, "e4", (2.0, 4))], on_duplicate="update"),
        lambda tx: events.insert_many(tx, []),
        lambda tx: events.delete_range(tx, ge=100),
        lambda tx: events.delete_range(tx, ge=5, lt=5),
        lambda tx: events.clear(tx, namespace="elsewhere"),
    ]
    for noop in noops:
        with db.write() as tx:
            noop(tx)
            assert not tx.changed
    assert snapshot(db) == before


def test_insert_many_update_counts_only_real_changes(db: tallytree.Database) -> None:
    """Regression: on_duplicate="update" counted (and rewrote the root for) items whose values were
    already stored, unlike upsert(), which says "unchanged"."""
    aggregate = db.aggregate("replay", values=("value",))
    batch = [(key, "id", (key,)) for key in range(10)]
    with db.write() as tx:
        assert aggregate.insert_many(tx, batch) == 10
    with db.write() as tx:
        assert aggregate.insert_many(tx, batch, on_duplicate="update") == 0
        assert not tx.changed
    with db.write() as tx:
        changed = [(0, "id", (0.0,)), (1, "id", (1,)), (99, "id", (5,))]
        assert aggregate.insert_many(tx, changed, on_duplicate="update") == 2
    with db.read() as tx:
        assert aggregate.totals(tx).as_dict() == {"count": 11, "value": 50.0}


def test_insert_many_skip_of_existing_items_keeps_the_tree_whole(db: tallytree.Database) -> None:
    """Regression: a skip batch in which every item already existed copied a leaf and freed the
    original without saving the new root, leaving a root record that pointed at a deleted node."""
    aggregate = db.aggregate("skips", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id") for key in range(20)])
    with db.write() as tx:
        assert aggregate.insert_many(tx, [(1, "id"), (2, "id")], on_duplicate="skip") == 0
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert [item.key for item in aggregate.items(tx)] == list(range(20))


def test_insert_many_on_duplicate_modes(db: tallytree.Database) -> None:
    aggregate = db.aggregate("batches", values=("value",))
    with db.write() as tx:
        aggregate.insert(tx, 1, "a", (1,))
    before = snapshot(db)
    with db.write() as tx:
        with pytest.raises(DuplicateItemError):
            aggregate.insert_many(tx, [(5, "a", (5,)), (1, "a", (2,))])
        with pytest.raises(DuplicateItemError):
            aggregate.insert_many(tx, [(5, "a", (5,)), (6, "a", (6,)), (5, "a", (7,))])
        assert not tx.changed
    assert snapshot(db) == before
    with db.write() as tx:
        assert (
            aggregate.insert_many(tx, [(2, "a", (2,)), (1, "a", (9,)), (2, "a", (3,))], on_duplicate="skip")
            == 1
        )
    with db.read() as tx:
        assert [item.values for item in aggregate.items(tx)] == [(1,), (2,)], "the first one wins"
    with db.write() as tx:
        assert (
            aggregate.insert_many(tx, [(2, "a", (4,)), (3, "a", (3,)), (2, "a", (5,))], on_duplicate="update")
            == 2
        )
    with db.read() as tx:
        assert [item.values for item in aggregate.items(tx)] == [(1,), (5,), (3,)], "the last one wins"
    with db.write() as tx:  # Item objects and tuples mix
        assert aggregate.insert_many(tx, [Item(7, "a", (7,)), (8, "a", [8])]) == 2
    without_values = db.aggregate("no_values")
    with db.write() as tx:  # (key, id) pairs when there are no value fields
        assert without_values.insert_many(tx, [(9, "a"), Item(8, "a")]) == 2
    with db.read() as tx:
        assert [item.values for item in aggregate.items(tx, ge=7)] == [(7,), (8,)]
        assert [item.values for item in without_values.items(tx)] == [(), ()]


def test_replace_moves_items_atomically(db: tallytree.Database) -> None:
    aggregate = db.aggregate("moves", values=("value",), node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id", (key,)) for key in range(10)], namespace="from")
        aggregate.insert(tx, 100, "id", (100,), namespace="to")
    with db.write() as tx:
        moved = aggregate.replace(tx, 3, "id", namespace="from", new_namespace="to", new_key=50)
        assert strict(moved) == strict(Item(50, "id", (3,)))
        renamed = aggregate.replace(tx, 4, "id", namespace="from", new_id="other", new_values=(4.5,))
        assert strict(renamed) == strict(Item(4, "other", (4.5,)))
        same = aggregate.replace(tx, 5, "id", namespace="from", new_values={"value": 55})
        assert strict(same) == strict(Item(5, "id", (55,)))
    with db.read() as tx:
        assert aggregate.totals(tx, namespace="from").as_dict() == {"count": 9, "value": 92.5}
        assert [item.key for item in aggregate.items(tx, namespace="to")] == [50, 100]
    before = snapshot(db)
    with db.write() as tx:
        with pytest.raises(DuplicateItemError):
            aggregate.replace(tx, 6, "id", namespace="from", new_namespace="to", new_key=100)
        with pytest.raises(DuplicateItemError):
            aggregate.replace(tx, 6, "id", namespace="from", new_key=7)
        with pytest.raises(ItemNotFoundError):
            aggregate.replace(tx, 6, "nope", namespace="from", new_key=1000)
        with pytest.raises(ItemNotFoundError):
            aggregate.replace(tx, 6, "id", namespace="elsewhere", new_key=1000)
        with pytest.raises(ItemNotFoundError):  # absent, and its new place taken: absence is reported
            aggregate.replace(tx, 6, "nope", namespace="from", new_key=7, new_id="id")
        with pytest.raises(ItemNotFoundError):  # absent, given new values only
            aggregate.replace(tx, 6, "nope", namespace="from", new_values=(1,))
        assert strict(aggregate.replace(tx, 6, "id", namespace="from", new_values=(6,))) == strict(
            Item(6, "id", (6,))
        )
        assert not tx.changed
        assert snapshot(db, tx) == before
    assert snapshot(db) == before


def test_replace_given_nothing_new_raises_naming_what_it_takes(db: tallytree.Database) -> None:
    """replace() without a new_* argument returned the item unchanged (or raised ItemNotFoundError for
    an absent one), as if it had done something."""
    aggregate = db.aggregate("moves", values=("value",))
    with db.write() as tx:
        aggregate.insert(tx, 1, "id", (1,), namespace="from")
    before = snapshot(db)
    with db.write() as tx:
        for item_id in ("id", "absent"):
            with pytest.raises(InvalidArgumentError) as raised:
                aggregate.replace(tx, 1, item_id, namespace="from")
            message = str(raised.value)
            assert message.startswith("moves: replace() changes an item: give at least one of ")
            assert all(f"{name}=" in message for name in ("new_key", "new_id", "new_namespace", "new_values"))
        assert not tx.changed
    assert snapshot(db) == before


def test_rank_and_get_take_an_item_or_a_position_as_bounds_do(db: tallytree.Database) -> None:
    """rank(tx, item) raised UnsupportedKeyTypeError advising to convert the Item, though every bound
    takes one; get(tx, item) too."""
    board = db.aggregate("board", values=("points",))
    with db.write() as tx:
        board.insert_many(tx, [(10, "ann", (1,)), (20, "bob", (2,)), (20, "cy", (3,)), (30, "di", (4,))])
    with db.read() as tx:
        bob = board.at(tx, 1)
        for position in (bob, Position(20, "bob")):
            assert board.rank(tx, position) == board.rank(tx, 20, "bob") == board.count(tx, lt=position) == 1
            assert board.rank(tx, position, reverse=True) == board.count(tx, gt=position) == 2
            assert board.rank(tx, position, ge=20) == 0
            assert strict(board.get(tx, position)) == strict(Item(20, "bob", (2,)))
            assert board.get(tx, position, namespace="elsewhere") is None
            with pytest.raises(InvalidArgumentError, match=r"board: rank\(\) takes a key and an id, or an"):
                board.rank(tx, position, "cy")
            with pytest.raises(InvalidArgumentError, match=r"board: get\(\) takes a key and an id, or an"):
                board.get(tx, position, "cy")
        assert board.get(tx, Position(20, "nobody")) is None
        with pytest.raises(
            ArgumentTypeError, match=r"board: get\(\) takes a key and an id, get\(tx, key, id\)"
        ):
            board.get(tx, 20)
        with pytest.raises(UnsupportedKeyTypeError, match="use a tuple instead"):  # the key's own error
            board.get(tx, [20])
        with pytest.raises(UnsupportedKeyTypeError, match=r"id 1\.5"):
            board.get(tx, 20, 1.5)
        with pytest.raises(UnsupportedKeyTypeError, match=r"key \{20\} has unsupported type set"):
            board.rank(tx, {20})


def test_defaults_that_stand_for_an_argument_not_given_show_their_name() -> None:
    """help(Aggregate.replace) showed ``new_key=<object object at 0x...>``."""
    shown = str(inspect.signature(tallytree.Aggregate.replace))
    assert "new_key: 'Any' = KEEP" in shown and "new_values: 'Any' = KEEP" in shown
    assert "id: 'Any' = UNSET" in str(inspect.signature(tallytree.Aggregate.get))
    for owner in (tallytree.Aggregate, tallytree.Table, tallytree.ChangeHandler):
        for name, method in vars(owner).items():
            if callable(method) and not name.startswith("_"):
                assert " at 0x" not in str(inspect.signature(method)), f"{owner.__name__}.{name}"
    for function in (tallytree.verify, tallytree.repair):
        assert " at 0x" not in str(inspect.signature(function))


def test_the_readme_names_the_attributes_of_an_aggregate(db: tallytree.Database) -> None:
    """The README listed the methods of an aggregate, not its name, fields and node_size."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    aggregate = db.aggregate("costs", values=("cost",))
    attributes = sorted(name for name in vars(aggregate) if not name.startswith("_"))
    assert attributes == ["fields", "name", "node_size"]
    section = readme[readme.index("## Reads and writes") :]
    section = section[: section.index("\n## ")]
    for name in attributes:
        assert f"`{name}`" in section, name


def test_delete_returns_the_item_and_strict_deletes_raise(db: tallytree.Database) -> None:
    aggregate = db.aggregate("deletes", values=("value",))
    with db.write() as tx:
        aggregate.insert(tx, ("k", 1.0), 7, (0.25,))
    with db.write() as tx:
        with pytest.raises(ItemNotFoundError):
            aggregate.delete(tx, ("k", 1), 7)
        with pytest.raises(KeyError):  # ItemNotFoundError is a KeyError
            aggregate.delete(tx, ("k", 1.0), 8)
        assert strict(aggregate.delete(tx, ("k", 1.0), 7)) == strict(Item(("k", 1.0), 7, (0.25,)))
        assert aggregate.discard(tx, ("k", 1.0), 7) is False
    with db.read() as tx:
        assert aggregate.count(tx) == 0
        assert list(aggregate.namespaces(tx)) == []


def test_delete_range_returns_the_totals_of_what_it_removed(db: tallytree.Database) -> None:
    aggregate = db.aggregate("archive", values=("cost",), node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(day, f"e{day}", (0.1,)) for day in range(100)])
    with db.write() as tx:
        removed = aggregate.delete_range(tx, lt=30)
        assert removed.count == 30 and removed.cost == math.fsum([0.1] * 30)
        assert aggregate.delete_range(tx, lt=30).count == 0
        assert aggregate.delete_range(tx, ge=Position(50, "e50"), le=Position(60, "e59")).count == 10
        assert tallytree.check(tx) == []
    with db.read() as tx:
        assert aggregate.count(tx) == 60
        assert aggregate.min(tx).key == 30 and aggregate.at(tx, 20).key == 60
        assert aggregate.totals(tx).cost == math.fsum([0.1] * 60)
    with db.write() as tx:
        cleared = aggregate.clear(tx)
        assert cleared.count == 60
    with db.read() as tx:
        assert aggregate.count(tx) == 0 and tallytree.check(tx) == []


@pytest.mark.parametrize("seed", range(6))
def test_range_deletes_on_deep_trees_match_a_list(db: tallytree.Database, seed: int) -> None:
    """Range deletes on three- and four-level trees: whole subtrees dropped, fences repaired."""
    rng = random.Random(seed)
    aggregate = db.aggregate("deep", values=("value",), node_size=4)
    keys = rng.sample(range(10_000), 400)
    model = sorted(keys)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id", (key,)) for key in keys])
    for _ in range(12):
        low = rng.randrange(10_000)
        high = low + rng.choice([1, 50, 300, 2000, 10_000])
        bounds: dict[str, Any] = rng.choice(
            [{"ge": low, "lt": high}, {"lt": high}, {"ge": low}, {"gt": low, "le": high}]
        )
        expected = [key for key in model if _within(key, bounds)]
        with db.write() as tx:
            removed = aggregate.delete_range(tx, **bounds)
            assert removed.as_dict() == {"count": len(expected), "value": sum(expected)}
            assert tallytree.check(tx) == []
        model = [key for key in model if not _within(key, bounds)]
        with db.read() as tx:
            assert tallytree.check(tx) == []
            assert [item.key for item in aggregate.items(tx)] == model
            assert aggregate.count(tx, ge=low) == sum(key >= low for key in model)
        if len(model) < 50:  # refill, so that deletes keep hitting deep trees
            fresh = rng.sample(sorted(set(range(10_000)) - set(model)), 300)
            with db.write() as tx:
                aggregate.insert_many(tx, [(key, "id", (key,)) for key in fresh])
            model = sorted(model + fresh)


def _within(key: int, bounds: dict[str, int]) -> bool:
    checks = {
        "ge": lambda bound: key >= bound,
        "gt": lambda bound: key > bound,
        "le": lambda bound: key <= bound,
        "lt": lambda bound: key < bound,
    }
    return all(checks[name](bound) for name, bound in bounds.items())


def test_random_is_uniform_seedable_and_within_bounds(db: tallytree.Database) -> None:
    aggregate = db.aggregate("draws", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id") for key in range(20)])
    with db.read() as tx:
        assert aggregate.random(tx, rng=3) == aggregate.random(tx, rng=3)
        assert aggregate.random(tx, ge=100) is None
        assert aggregate.random(tx, namespace="empty", rng=1) is None
        generator = random.Random(1)
        counts = {key: 0 for key in range(5, 9)}
        for _ in range(4000):
            item = aggregate.random(tx, ge=5, lt=9, rng=generator)
            assert item is not None
            counts[item.key] += 1
    assert all(850 < count < 1150 for count in counts.values()), counts


def test_reads_in_a_write_transaction_see_its_own_writes(db: tallytree.Database) -> None:
    aggregate = db.aggregate("own", values=("value",), node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "id", (1,)) for key in range(30)])
        assert aggregate.count(tx) == 30
        aggregate.delete_range(tx, ge=10, lt=20)
        assert aggregate.totals(tx).as_dict() == {"count": 20, "value": 20}
        assert [namespace for namespace, _ in aggregate.namespaces(tx)] == [None]
        assert tallytree.check(tx) == []
        with db.read() as read_tx:  # another snapshot sees nothing yet
            assert aggregate.count(read_tx) == 0
    with db.read() as tx:
        assert aggregate.count(tx) == 20


def test_every_public_totals_attribute_is_a_reserved_field_name(db: tallytree.Database) -> None:
    """Regression: value fields named from_values or from_summary were accepted, and totals.from_values
    then read as the classmethod, not the sum. The reserved names cover every public attribute."""
    from tallytree._txn import RESERVED_FIELDS

    public = sorted(name for name in dir(Totals) if not name.startswith("_"))
    assert set(public) <= set(RESERVED_FIELDS)
    for name in public:
        with pytest.raises(tallytree.InvalidArgumentError, match="reserved"):
            db.aggregate("a", values=("cost", name))
        with pytest.raises(tallytree.InvalidArgumentError, match="reserved"):
            db.table("t").aggregate("a", key="k", values=(name,))
    assert db.aggregates() == []


def test_items_read_back_are_whole_items(db: tallytree.Database) -> None:
    """Reads make their Items without the dataclass __init__ (their slots set directly): each is the
    same as one made by Item(...), equal, hashed alike, frozen, copied and pickled whole."""
    import copy
    import pickle

    aggregate = db.aggregate("a", values=("v",))
    with db.write() as tx:
        aggregate.insert(tx, 1, "x", (2,))
    with db.read() as tx:
        read = [aggregate.at(tx, 0), *aggregate.items(tx), *aggregate.page(tx).items, aggregate.min(tx)]
    made = Item(1, "x", (2,))
    for item in read:
        assert type(item) is Item and item == made and hash(item) == hash(made) and repr(item) == repr(made)
        assert pickle.loads(pickle.dumps(item)) == made and copy.copy(item) == made
        with pytest.raises(AttributeError):
            item.key = 3  # type: ignore[misc]


def test_totals_api() -> None:
    totals = Totals(4, ("cost", "tokens"), (1.0, 3000))
    assert (totals.count, totals.cost, totals["tokens"], totals["count"]) == (4, 1.0, 3000, 4)
    assert totals.mean("cost") == 0.25
    assert Totals(0, ("cost",), (0,)).mean("cost") is None
    for empty_or_not in (totals, Totals(0, ("cost",), (0,))):  # an unknown field, items or none
        with pytest.raises(KeyError):
            empty_or_not.mean("price")
    assert totals.fields == ("cost", "tokens")
    assert totals.sums == {"cost": 1.0, "tokens": 3000}
    assert totals.as_dict() == {"count": 4, "cost": 1.0, "tokens": 3000}
    assert totals == Totals(4, ("cost", "tokens"), (1.0, 3000)) and hash(totals) == hash(
        Totals(4, ("cost", "tokens"), (1.0, 3000))
    )
    assert totals != Totals(5, ("cost", "tokens"), (1.0, 3000))
    assert repr(totals) == "Totals(count=4, cost=1.0, tokens=3000)"
    with pytest.raises(AttributeError):
        _ = totals.latency
    with pytest.raises(KeyError):
        _ = totals["latency"]


# ================================================================== exactness under churn


def test_sums_stay_exact_after_long_churn(db: tallytree.Database) -> None:
    """5,000 inserts and deletes of floats that cancel badly and ints near the 64-bit limits."""
    rng = random.Random(2024)
    aggregate = db.aggregate("churn", values=("real", "whole"), node_size=6)
    floats = [0.1, 1e16, -1e16, 1e-3, 0.3, 2.5, 1e-300, -0.7]
    ints = [2**63 - 1, 2**64 - 1, -(2**63), 1, -1, 12345]
    model: dict[tuple[int, int], tuple[float, int]] = {}
    next_id = 0
    for _ in range(20):
        with db.write() as tx:
            for _ in range(250):
                if model and rng.random() < 0.4:
                    key, item_id = rng.choice(list(model))
                    values = model.pop((key, item_id))
                    assert aggregate.delete(tx, key, item_id).values == values
                else:
                    key, next_id = rng.randrange(2000), next_id + 1
                    values = (rng.choice(floats), rng.choice(ints))
                    aggregate.insert(tx, key, next_id, values)
                    model[(key, next_id)] = values
        with db.read() as tx:
            totals = aggregate.totals(tx)
            assert totals.count == len(model)
            assert totals.real == math.fsum(real for real, _ in model.values())
            assert totals.whole == sum(whole for _, whole in model.values())
            for _ in range(5):
                low, high = sorted(rng.sample(range(2001), 2))
                inside = [values for (key, _), values in model.items() if low <= key < high]
                bounded = aggregate.totals(tx, ge=low, lt=high)
                assert bounded.count == len(inside)
                assert bounded.real == math.fsum(real for real, _ in inside)
                assert bounded.whole == sum(whole for _, whole in inside)
            assert tallytree.check(tx) == []
    reals = [real for real, _ in model.values()]
    naive = functools.reduce(operator.add, reals)  # left to right (sum() compensates since 3.12)
    assert naive != math.fsum(reals), "the data must tell exact sums from naive ones"
    assert abs(sum(whole for _, whole in model.values())) > 2**64, "the int sum must leave 64 bits"


# ================================================================== bad input, everywhere

naive = datetime(2024, 1, 1)
BAD_KEYS: list[tuple[str, Any, type[Exception]]] = [
    ("list", [1], UnsupportedKeyTypeError),
    ("set", {1}, UnsupportedKeyTypeError),
    ("object", object(), UnsupportedKeyTypeError),
    ("decimal", Decimal(1), UnsupportedKeyTypeError),
    ("nested-list", (1, [2]), UnsupportedKeyTypeError),
    ("nan", NAN, InvalidKeyError),
    ("nan-in-tuple", (1, NAN), InvalidKeyError),
    ("naive-datetime", naive, InvalidKeyError),
    ("lone-surrogate", "\ud800", InvalidKeyError),
    ("long-str", "x" * 300, KeyTooLargeError),
    ("long-bytes", b"x" * 300, KeyTooLargeError),
    ("huge-int", 3**3000, KeyTooLargeError),
    ("long-tuple", tuple(range(200)), KeyTooLargeError),
]
BAD_IDS: list[tuple[str, Any, type[Exception]]] = [
    ("float", 1.5, UnsupportedKeyTypeError),
    ("none", None, UnsupportedKeyTypeError),
    ("bool", True, UnsupportedKeyTypeError),
    ("tuple", (1,), UnsupportedKeyTypeError),
    ("nan", NAN, UnsupportedKeyTypeError),
    ("long-str", "x" * 300, KeyTooLargeError),
]
BAD_NAMESPACES: list[tuple[str, Any, type[Exception]]] = [
    ("list", [1], UnsupportedKeyTypeError),
    ("dict", {"org": 1}, UnsupportedKeyTypeError),
    ("nan", NAN, InvalidKeyError),
    ("naive-datetime", naive, InvalidKeyError),
    ("long-str", "x" * 300, KeyTooLargeError),
]
BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("nan", (NAN, 1), InvalidValueError),
    ("inf", (INF, 1), InvalidValueError),
    ("minus-inf", (1.0, -INF), InvalidValueError),
    ("bool", (True, 1), InvalidValueError),
    ("str", ("1", 1), InvalidValueError),
    ("none", (None, 1), InvalidValueError),
    ("decimal", (Decimal("1.5"), 1), InvalidValueError),
    ("fraction", (Fraction(1, 2), 1), InvalidValueError),
    ("above-64-bits", (1, 2**64), InvalidValueError),
    ("below-64-bits", (-(2**63) - 1, 1), InvalidValueError),
    ("too-few", (1,), InvalidValueError),
    ("too-many", (1, 2, 3), InvalidValueError),
    ("none-at-all", (), InvalidValueError),
    ("unknown-field", {"cost": 1, "tokens": 2, "latency": 3}, InvalidValueError),
    ("missing-field", {"cost": 1}, InvalidValueError),
    ("nan-in-mapping", {"cost": NAN, "tokens": 2}, InvalidValueError),
    ("scalar", 5, InvalidValueError),
    ("str-not-tuple", "12", InvalidValueError),
    ("none-not-tuple", None, InvalidValueError),
]

Call = Callable[[tallytree.Aggregate, tallytree.Transaction], Any]

KEY_SITES: dict[str, Callable[[Any], Call]] = {
    "insert": lambda key: lambda a, tx: a.insert(tx, key, "new", (1, 2)),
    "upsert": lambda key: lambda a, tx: a.upsert(tx, key, "new", (1, 2)),
    "delete": lambda key: lambda a, tx: a.delete(tx, key, "e1"),
    "discard": lambda key: lambda a, tx: a.discard(tx, key, "e1"),
    "get": lambda key: lambda a, tx: a.get(tx, key, "e1"),
    "replace": lambda key: lambda a, tx: a.replace(tx, key, "e1", new_key=2),
    "replace-new-key": lambda key: lambda a, tx: a.replace(tx, 1, "e1", new_key=key),
    "insert-many": lambda key: lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2)), (key, "x", (1, 2))]),
    "rank": lambda key: lambda a, tx: a.rank(tx, key),
    "rank-with-id": lambda key: lambda a, tx: a.rank(tx, key, "e1"),
    "count-ge": lambda key: lambda a, tx: a.count(tx, ge=key),
    "totals-lt": lambda key: lambda a, tx: a.totals(tx, lt=key),
    "sum-le": lambda key: lambda a, tx: a.sum(tx, "cost", le=key),
    "items-gt": lambda key: lambda a, tx: a.items(tx, gt=key),
    "page-eq": lambda key: lambda a, tx: a.page(tx, eq=key),
    "at-prefix": lambda key: lambda a, tx: a.at(tx, 0, prefix=(key,)),
    "min-position": lambda key: lambda a, tx: a.min(tx, ge=Position(key, "e1")),
    "max-item": lambda key: lambda a, tx: a.max(tx, lt=Item(key, "e1")),
    "random-ge": lambda key: lambda a, tx: a.random(tx, ge=key, rng=1),
    "page-after": lambda key: lambda a, tx: a.page(tx, after=Position(key, "e1")),
    "delete-range": lambda key: lambda a, tx: a.delete_range(tx, ge=key),
}
ID_SITES: dict[str, Callable[[Any], Call]] = {
    "insert": lambda item_id: lambda a, tx: a.insert(tx, 1, item_id, (1, 2)),
    "upsert": lambda item_id: lambda a, tx: a.upsert(tx, 1, item_id, (1, 2)),
    "delete": lambda item_id: lambda a, tx: a.delete(tx, 1, item_id),
    "discard": lambda item_id: lambda a, tx: a.discard(tx, 1, item_id),
    "get": lambda item_id: lambda a, tx: a.get(tx, 1, item_id),
    "replace": lambda item_id: lambda a, tx: a.replace(tx, 1, item_id, new_key=2),
    "replace-new-id": lambda item_id: lambda a, tx: a.replace(tx, 1, "e1", new_id=item_id),
    "insert-many": lambda item_id: (
        lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2)), (1, item_id, (1, 2))])
    ),
    "rank": lambda item_id: lambda a, tx: a.rank(tx, 1, item_id),
    "count-position": lambda item_id: lambda a, tx: a.count(tx, ge=Position(1, item_id)),
    "page-after": lambda item_id: lambda a, tx: a.page(tx, after=Item(1, item_id)),
    "delete-range": lambda item_id: lambda a, tx: a.delete_range(tx, lt=Position(5, item_id)),
}
NAMESPACE_SITES: dict[str, Callable[[Any], Call]] = {
    "insert": lambda ns: lambda a, tx: a.insert(tx, 1, "new", (1, 2), namespace=ns),
    "upsert": lambda ns: lambda a, tx: a.upsert(tx, 1, "new", (1, 2), namespace=ns),
    "delete": lambda ns: lambda a, tx: a.delete(tx, 1, "e1", namespace=ns),
    "discard": lambda ns: lambda a, tx: a.discard(tx, 1, "e1", namespace=ns),
    "replace": lambda ns: lambda a, tx: a.replace(tx, 1, "e1", namespace=ns, new_key=2),
    "replace-new-namespace": lambda ns: lambda a, tx: a.replace(tx, 1, "e1", new_namespace=ns),
    "insert-many": lambda ns: lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2))], namespace=ns),
    "delete-range": lambda ns: lambda a, tx: a.delete_range(tx, namespace=ns),
    "clear": lambda ns: lambda a, tx: a.clear(tx, namespace=ns),
    "count": lambda ns: lambda a, tx: a.count(tx, namespace=ns),
    "totals": lambda ns: lambda a, tx: a.totals(tx, namespace=ns),
    "sum": lambda ns: lambda a, tx: a.sum(tx, "cost", namespace=ns),
    "at": lambda ns: lambda a, tx: a.at(tx, 0, namespace=ns),
    "rank": lambda ns: lambda a, tx: a.rank(tx, 1, namespace=ns),
    "min": lambda ns: lambda a, tx: a.min(tx, namespace=ns),
    "max": lambda ns: lambda a, tx: a.max(tx, namespace=ns),
    "random": lambda ns: lambda a, tx: a.random(tx, namespace=ns),
    "get": lambda ns: lambda a, tx: a.get(tx, 1, "e1", namespace=ns),
    "items": lambda ns: lambda a, tx: a.items(tx, namespace=ns),
    "page": lambda ns: lambda a, tx: a.page(tx, namespace=ns),
}
VALUE_SITES: dict[str, Callable[[Any], Call]] = {
    "insert": lambda values: lambda a, tx: a.insert(tx, 1000, "new", values),
    "upsert-new": lambda values: lambda a, tx: a.upsert(tx, 1000, "new", values),
    "upsert-existing": lambda values: lambda a, tx: a.upsert(tx, 1, "e1", values),
    "replace": lambda values: lambda a, tx: a.replace(tx, 1, "e1", new_values=values),
    "replace-moving": lambda values: lambda a, tx: a.replace(tx, 1, "e1", new_key=1000, new_values=values),
    "insert-many": lambda values: (
        lambda a, tx: a.insert_many(tx, [(1000, "ok", (1, 2)), (1001, "x", values)])
    ),
    "insert-many-item": lambda values: (
        lambda a, tx: a.insert_many(tx, [Item(1001, "x", values)], on_duplicate="skip")
    ),
    "insert-many-update": lambda values: (
        lambda a, tx: a.insert_many(tx, [(1, "e1", values)], on_duplicate="update")
    ),
}
OTHER_BAD_CALLS: list[tuple[str, Call, type[Exception]]] = [
    ("ge-and-gt", lambda a, tx: a.count(tx, ge=1, gt=2), BoundsError),
    ("le-and-lt", lambda a, tx: a.totals(tx, le=1, lt=2), BoundsError),
    ("prefix-and-ge", lambda a, tx: a.items(tx, prefix=("a",), ge=1), BoundsError),
    ("prefix-and-eq", lambda a, tx: a.min(tx, prefix=("a",), eq=1), BoundsError),
    ("eq-and-lt", lambda a, tx: a.at(tx, 0, eq=1, lt=2), BoundsError),
    ("eq-position", lambda a, tx: a.count(tx, eq=Position(1, "e1")), BoundsError),
    ("prefix-not-tuple", lambda a, tx: a.count(tx, prefix="open"), BoundsError),
    ("prefix-list", lambda a, tx: a.count(tx, prefix=["open"]), BoundsError),
    ("delete-range-conflict", lambda a, tx: a.delete_range(tx, ge=1, gt=1), BoundsError),
    ("rank-conflict", lambda a, tx: a.rank(tx, 1, le=1, lt=1), BoundsError),
    ("random-conflict", lambda a, tx: a.random(tx, eq=1, gt=0), BoundsError),
    ("limit-zero", lambda a, tx: a.page(tx, limit=0), BoundsError),
    ("limit-negative", lambda a, tx: a.page(tx, limit=-1), BoundsError),
    ("limit-float", lambda a, tx: a.page(tx, limit=1.5), BoundsError),
    ("limit-bool", lambda a, tx: a.page(tx, limit=True), BoundsError),
    ("limit-str", lambda a, tx: a.page(tx, limit="3"), BoundsError),
    ("limit-none", lambda a, tx: a.page(tx, limit=None), BoundsError),
    ("cursor-garbage", lambda a, tx: a.page(tx, after="!!!"), BoundsError),
    ("cursor-empty", lambda a, tx: a.page(tx, after=""), BoundsError),
    ("cursor-not-an-entry", lambda a, tx: a.page(tx, after="mZk="), BoundsError),
    ("cursor-non-ascii", lambda a, tx: a.page(tx, after="é"), BoundsError),
    ("cursor-int", lambda a, tx: a.page(tx, after=123), BoundsError),
    ("cursor-bytes", lambda a, tx: a.page(tx, after=b"MwA="), BoundsError),
    ("index-float", lambda a, tx: a.at(tx, 1.0), TypeError),
    ("index-str", lambda a, tx: a.at(tx, "1"), TypeError),
    ("index-bool", lambda a, tx: a.at(tx, True), TypeError),
    ("index-none", lambda a, tx: a.at(tx, None), TypeError),
    ("sum-unknown-field", lambda a, tx: a.sum(tx, "latency"), InvalidValueError),
    ("sum-count", lambda a, tx: a.sum(tx, "count"), InvalidValueError),
    (
        "insert-many-short-tuple",
        lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2)), (1,)]),
        InvalidValueError,
    ),
    ("insert-many-long-tuple", lambda a, tx: a.insert_many(tx, [(1, "a", (1, 2), 4)]), InvalidValueError),
    ("insert-many-scalar", lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2)), 1]), InvalidValueError),
    (
        "insert-many-bad-mode",
        lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2))], on_duplicate="replace"),
        ValueError,
    ),
    ("insert-duplicate", lambda a, tx: a.insert(tx, 1, "e1", (1, 2)), DuplicateItemError),
    (
        "insert-many-duplicate",
        lambda a, tx: a.insert_many(tx, [(100, "ok", (1, 2)), (2, "e2", (1, 2))]),
        DuplicateItemError,
    ),
    ("delete-missing", lambda a, tx: a.delete(tx, 1, "e2"), ItemNotFoundError),
    ("replace-missing", lambda a, tx: a.replace(tx, 1.0, "e1", new_key=3), ItemNotFoundError),
    ("replace-onto-taken", lambda a, tx: a.replace(tx, 1, "e1", new_key=2, new_id="e2"), DuplicateItemError),
]


def _bad_calls() -> list[Any]:
    params = []
    for table, sites in (
        (BAD_KEYS, KEY_SITES),
        (BAD_IDS, ID_SITES),
        (BAD_NAMESPACES, NAMESPACE_SITES),
        (BAD_VALUES, VALUE_SITES),
    ):
        kind = {id(BAD_KEYS): "key", id(BAD_IDS): "id", id(BAD_NAMESPACES): "namespace"}.get(
            id(table), "values"
        )
        for site, make in sites.items():
            for label, value, error in table:
                if (site, kind, label) == ("rank", "id", "none"):
                    continue  # rank(key, None) means "before every item with this key": valid
                params.append(pytest.param(make(value), error, id=f"{site}-{kind}-{label}"))
    params.extend(pytest.param(call, error, id=label) for label, call, error in OTHER_BAD_CALLS)
    return params


@pytest.mark.parametrize(("call", "error"), _bad_calls())
def test_bad_input_raises_a_typed_error_and_changes_nothing(
    filled: Any, call: Call, error: type[Exception]
) -> None:
    db, events = filled
    before = snapshot(db)
    with db.write() as tx:
        with pytest.raises(error):
            call(events, tx)
        assert not tx.changed, "a failed write left changes in the transaction"
        assert snapshot(db, tx) == before
        events.insert(tx, -1, "goes-on", (1, 2))  # the transaction goes on and commits
    with db.read() as tx:
        assert tallytree.check(tx) == []
    with db.write() as tx:
        events.delete(tx, -1, "goes-on")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda a, tx: a.count(tx, ge=[1]), id="count"),
        pytest.param(lambda a, tx: a.items(tx, namespace=NAN), id="items"),
        pytest.param(lambda a, tx: a.page(tx, after=123), id="page"),
        pytest.param(lambda a, tx: a.rank(tx, 1, 1.5), id="rank"),
        pytest.param(lambda a, tx: a.at(tx, 10**6), id="at"),
        pytest.param(lambda a, tx: a.get(tx, 1, None), id="get"),
    ],
)
def test_bad_reads_raise_in_read_transactions_too(filled: Any, call: Call) -> None:
    db, events = filled
    with db.read() as tx:
        with pytest.raises(tallytree.Error):
            call(events, tx)
        assert events.count(tx) == 40, "the transaction is still usable"


def test_typed_errors_subclass_the_closest_builtins() -> None:
    assert issubclass(DuplicateItemError, KeyError) and issubclass(ItemNotFoundError, KeyError)
    assert issubclass(OutOfRangeError, IndexError)
    assert issubclass(UnsupportedKeyTypeError, TypeError)
    assert issubclass(KeyTooLargeError, InvalidKeyError) and issubclass(InvalidKeyError, ValueError)
    assert issubclass(InvalidValueError, ValueError) and issubclass(BoundsError, ValueError)
    assert issubclass(tallytree.ReadOnlyError, TransactionError)
    assert str(DuplicateItemError("plain message")) == "plain message"


# ================================================================== transactions and definitions

WRITES: list[Any] = [
    pytest.param(lambda a, tx: a.insert(tx, 1000, "x", (1, 2)), id="insert"),
    pytest.param(lambda a, tx: a.upsert(tx, 1, "e1", (7, 7)), id="upsert"),
    pytest.param(lambda a, tx: a.delete(tx, 1, "e1"), id="delete"),
    pytest.param(lambda a, tx: a.discard(tx, 1, "e1"), id="discard"),
    pytest.param(lambda a, tx: a.replace(tx, 1, "e1", new_key=1000), id="replace"),
    pytest.param(lambda a, tx: a.insert_many(tx, [(1000, "x", (1, 2))]), id="insert_many"),
    pytest.param(lambda a, tx: a.delete_range(tx, lt=10), id="delete_range"),
    pytest.param(lambda a, tx: a.clear(tx), id="clear"),
]


@pytest.mark.parametrize("write", WRITES)
def test_writes_in_a_read_transaction_raise(filled: Any, write: Call) -> None:
    db, events = filled
    before = snapshot(db)
    with db.read() as tx, pytest.raises(TransactionError):
        write(events, tx)
    assert snapshot(db) == before


@pytest.mark.parametrize("write", WRITES)
def test_a_transaction_that_ended_cannot_be_used(filled: Any, write: Call) -> None:
    db, events = filled
    before = snapshot(db)
    with db.write() as tx:
        pass
    with pytest.raises(TransactionError):
        write(events, tx)
    with pytest.raises(TransactionError):
        events.count(tx)
    with db.read() as read_tx:
        pass
    with pytest.raises(TransactionError):
        events.totals(read_tx)
    assert snapshot(db) == before


@pytest.mark.parametrize("write", WRITES)
def test_an_exception_in_the_block_aborts_every_write(filled: Any, write: Call) -> None:
    db, events = filled
    before = snapshot(db)
    with pytest.raises(ZeroDivisionError), db.write() as tx:
        events.insert(tx, 5000, "first", (1, 1))
        write(events, tx)
        assert snapshot(db, tx) != before
        _ = 1 / 0
    assert snapshot(db) == before
    with db.read() as tx:
        assert tallytree.check(tx) == []


def test_nested_write_transaction_raises_and_the_outer_one_goes_on(filled: Any) -> None:
    db, events = filled
    with db.write() as tx:
        events.insert(tx, 1000, "outer", (1, 1))
        with pytest.raises(TransactionError), db.write():
            pass
        with pytest.raises(TransactionError):
            db.drop_aggregate("bystander")
        events.insert(tx, 1001, "outer", (1, 1))
    with db.read() as tx:
        assert events.count(tx, ge=1000) == 2
        assert db.aggregate("bystander").count(tx) == 1


def test_transactions_belong_to_their_database(filled: Any) -> None:
    _, events = filled
    with tallytree.open_memory() as other, other.write() as tx:
        with pytest.raises(TransactionError):
            events.insert(tx, 1000, "x", (1, 1))
        with pytest.raises(TransactionError):
            events.count(tx)


def test_a_closed_database_refuses_transactions(db: tallytree.Database) -> None:
    events = db.aggregate("events")
    db.close()
    db.close()  # idempotent
    with pytest.raises(TransactionError), db.read():
        pass
    with pytest.raises(TransactionError), db.write():
        pass
    with pytest.raises(TransactionError):
        db.aggregate("events")
    assert events.name == "events"


def test_transactions_open_when_the_database_closes_raise_typed_errors(db: tallytree.Database) -> None:
    """Closing under an open transaction: its reads raise TransactionError (not the backend's own
    error, nor answers from a closed store) and its commit raises, writing nothing."""
    events = db.aggregate("events")
    with db.write() as tx:
        events.insert_many(tx, [(n, "id") for n in range(100)])
    reading, writing = db.read(), db.write()
    reader = reading.__enter__()
    writer = writing.__enter__()
    events.insert(writer, 1000, "late")
    db.close()
    for read in (
        lambda: events.count(reader),
        lambda: events.count(reader, ge=5),
        lambda: list(events.items(reader)),
    ):
        with pytest.raises(TransactionError, match="closed while this transaction was open"):
            read()
    reading.__exit__(None, None, None)
    with pytest.raises(TransactionError, match="nothing was written"):
        writing.__exit__(None, None, None)
    if db.path is not None:  # LMDB: the file holds the last commit, without the late insert
        with tallytree.open(db.path) as again, again.read() as tx:
            assert again.aggregate("events").count(tx) == 100


def test_aggregate_definitions_are_checked_and_never_half_created(filled: Any) -> None:
    db, events = filled
    names = db.aggregates()
    assert names == ["bystander", "events"]
    with pytest.raises(SchemaMismatchError):
        db.aggregate("events", values=("cost",))
    with pytest.raises(SchemaMismatchError):
        db.aggregate("events", values=("tokens", "cost"))
    with pytest.raises(SchemaMismatchError):
        db.aggregate("events", node_size=8)
    with pytest.raises(AggregateNotFoundError):
        db.aggregate("missing", create=False)
    with pytest.raises(AggregateNotFoundError):
        db.drop_aggregate("missing")
    bad_definitions: list[dict[str, Any]] = [
        {"name": ""}, {"name": 5}, {"name": "x" * 201},
        {"name": "new", "values": "cost"}, {"name": "new", "values": ("cost", "cost")},
        {"name": "new", "values": ("count",)}, {"name": "new", "values": ("_private",)},
        {"name": "new", "values": ("2fast",)}, {"name": "new", "values": (1,)},
        {"name": "new", "node_size": 3}, {"name": "new", "node_size": 1025},
        {"name": "new", "node_size": 8.0}, {"name": "new", "node_size": True},
    ]  # fmt: skip
    for definition in bad_definitions:
        with pytest.raises(ValueError):
            db.aggregate(definition.pop("name"), **definition)
    with db.write() as tx:
        with pytest.raises(TransactionError):
            db.aggregate("created-inside-a-write")
        assert not tx.changed
    assert db.aggregates() == names
    same = db.aggregate("events", values=list(FIELDS), node_size=4)
    assert (same.fields, same.node_size) == (FIELDS, 4)
    assert db.aggregate("events") is events


def test_a_dropped_aggregate_is_gone_and_its_handle_refuses_reads_and_writes(filled: Any) -> None:
    """A stale handle raises instead of answering as an empty aggregate: a silent 0 would hide the bug."""
    db, events = filled
    db.drop_aggregate("events")
    assert db.aggregates() == ["bystander"]
    with pytest.raises(AggregateNotFoundError):
        db.aggregate("events", create=False)
    with db.write() as tx:
        for write in WRITES:
            with pytest.raises(TransactionError):
                write.values[0](events, tx)
        assert not tx.changed
    with db.read() as tx:
        assert tallytree.check(tx) == [], "dropping leaves no node behind"
        for read in (events.count, events.totals, lambda tx: list(events.namespaces(tx)), events.min):
            with pytest.raises(TransactionError, match="'events' was dropped"):
                read(tx)
        assert db.aggregate("bystander").count(tx) == 1
    reborn = db.aggregate("events", values=("latency",))
    with db.write() as tx:
        reborn.insert(tx, 1, "a", (0.5,))
    with db.read() as tx:
        assert reborn.totals(tx).as_dict() == {"count": 1, "latency": 0.5}
        with pytest.raises(TransactionError):  # the old handle does not see the new aggregate
            events.count(tx)
        assert tallytree.check(tx) == []


def test_changing_a_namespace_while_iterating_it_raises(filled: Any) -> None:
    db, events = filled
    with db.write() as tx:
        iterator = events.items(tx)
        assert next(iterator).key == 0
        events.insert(tx, 500, "x", (1, 1), namespace="another")  # another namespace: fine
        assert next(iterator).key == 1
        events.insert(tx, 501, "x", (1, 1))
        with pytest.raises(TransactionError):
            next(iterator)
        pages = events.page(tx, limit=2)
        events.delete(tx, 0, "e0")
        assert [item.key for item in events.page(tx, limit=2, after=pages.cursor).items] == [2, 3]


def test_changing_the_aggregate_while_listing_its_namespaces_raises(db: tallytree.Database) -> None:
    """Regression: namespaces() in a write transaction kept yielding the roots it read when it began,
    so a namespace emptied meanwhile was listed with its old totals, a changed one with stale totals,
    and a new one was missing. It now raises TransactionError, as items() does."""
    spaces = db.aggregate("spaces", values=("v",))
    other = db.aggregate("other")
    table = db.table("docs")
    by_ns = table.aggregate("by_ns", key="k", namespace="ns")
    with db.write() as tx:
        for namespace in ("a", "b", "c"):
            spaces.insert(tx, 1, "x", (1,), namespace=namespace)
            table.insert(tx, {"k": 1, "ns": namespace})

    def changes(tx: Any) -> list[Callable[[], Any]]:
        return [
            lambda: spaces.delete(tx, 1, "x", namespace="c"),  # a namespace not reached yet, emptied
            lambda: spaces.insert(tx, 2, "y", (1,), namespace="c"),  # ... changed
            lambda: spaces.insert(tx, 2, "y", (1,), namespace="bb"),  # a new namespace
            lambda: spaces.insert(tx, 2, "y", (1,), namespace="a"),  # the namespace just listed
        ]

    for at in range(4):  # each transaction is aborted by the error
        with pytest.raises(TransactionError, match=r"list\(agg.namespaces\(tx\)\)"), db.write() as tx:
            listed = spaces.namespaces(tx)
            assert next(listed)[0] == "a"
            changes(tx)[at]()
            next(listed)
    with pytest.raises(TransactionError), db.write() as tx:  # changed before, changed again once passed
        spaces.insert(tx, 3, "z", (1,), namespace="a")
        listed = spaces.namespaces(tx)
        assert [next(listed)[0], next(listed)[0]] == ["a", "b"]
        spaces.insert(tx, 4, "z", (1,), namespace="a")
        assert next(listed)[0] == "c"
        next(listed)  # at the end
    with pytest.raises(TransactionError), db.write() as tx:  # emptied before, filled again once passed
        spaces.delete(tx, 1, "x", namespace="b")
        listed = spaces.namespaces(tx)
        assert [next(listed)[0], next(listed)[0]] == ["a", "c"]
        spaces.insert(tx, 1, "x", (1,), namespace="b")
        next(listed)
    with pytest.raises(TransactionError), db.write() as tx:  # a table's queued inserts are changes too
        listed = by_ns.namespaces(tx)
        assert next(listed)[0] == "a"
        table.insert(tx, {"k": 2, "ns": "c"})
        next(listed)
    with db.write() as tx:  # writes elsewhere, and writes after collecting the list, are fine
        for namespace, totals in spaces.namespaces(tx):
            other.insert(tx, totals.count, namespace)
            table.insert(tx, {"k": 3, "ns": namespace})
        for namespace, _ in list(spaces.namespaces(tx)):
            spaces.insert(tx, 5, "w", (1,), namespace=namespace)
        spaces.delete(tx, 1, "x", namespace="c")
        assert [(n, t.count) for n, t in spaces.namespaces(tx)] == [("a", 2), ("b", 2), ("c", 1)]
    with db.read() as tx:
        assert [n for n, _ in other.namespaces(tx)] == [None] and other.count(tx) == 3
        assert [(n, t.count) for n, t in by_ns.namespaces(tx)] == [("a", 2), ("b", 2), ("c", 2)]


def test_page_refuses_a_cursor_it_did_not_return(db: tallytree.Database) -> None:
    """Regression: a cursor with bytes after its id, or whose id had a type no id has (a float, None,
    a tuple), was taken as a position."""
    keys = [None, False, -INF, -(2**70), -0.5, 0, 2**64, 1e300, "", "\x00", b"", b"\xff", ("a", (1, "b"))]
    keys.append(datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5))))
    aggregate = db.aggregate("paged", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, ident) for key in keys for ident in ("i", -(2**80), b"\x00")])
    with db.read() as tx:
        pages = [aggregate.page(tx, limit=1)]
        while not pages[-1].done:  # every real cursor, over awkward keys and ids, is taken
            pages.append(aggregate.page(tx, limit=1, after=pages[-1].cursor))
        assert len(pages) == 3 * len(keys)
        cursor = pages[0].cursor
        assert cursor is not None
        raw = base64.urlsafe_b64decode(cursor)
        forged = [raw + b"junk!!", raw + b"\x00", encode_key(0) + encode_key(1.5)]
        forged += [encode_key(0) + encode_key(ident) for ident in (None, True, (1, "x"), ("i",))]
        texts = [base64.urlsafe_b64encode(data).decode() for data in forged]
        standard = cursor.replace("-", "+").replace("_", "/")  # the same bytes in standard base64
        assert standard != cursor
        texts += [cursor + "!", cursor + "\n", cursor[:-1], standard, "", "é"]
        for text in texts:
            with pytest.raises(BoundsError, match="is not a cursor returned by page"):
                aggregate.page(tx, after=text)


def test_an_iterator_does_not_outlive_its_transaction(filled: Any) -> None:
    """Regression: items() kept yielding from the node cache after its transaction had ended."""
    db, events = filled
    with db.read() as tx:
        list(events.items(tx))  # every node of the namespace is now in the cache
        iterator = events.items(tx)
        assert next(iterator).key == 0
    with pytest.raises(TransactionError):
        next(iterator)
    with db.read() as tx:
        pending = events.items(tx, reverse=True)
    with pytest.raises(TransactionError):
        next(pending)
    with db.read() as tx:  # two namespaces (the fixture's)
        namespaces = events.namespaces(tx)
        next(namespaces)
    with pytest.raises(TransactionError):
        next(namespaces)


@pytest.mark.parametrize("nfields", [0, 1, 2, 3])
def test_totals_from_a_summary_of_any_width(nfields: int) -> None:
    """The spelt-out shapes (one and two fields) and the general one read a summary alike."""
    from tallytree._aggregate import Totals
    from tallytree._node import SCALE_BITS

    fields = tuple(f"f{index}" for index in range(nfields))
    sums = [(index + 1) * 3 << SCALE_BITS - 1 for index in range(nfields)]  # 1.5, 3.0, 4.5 as floats
    floats = [1 if index % 2 == 0 else 0 for index in range(nfields)]  # float, int, float
    totals = Totals.from_summary(fields, [7, *sums, *floats])
    expected = tuple(
        (index + 1) * 1.5 if index % 2 == 0 else (index + 1) * 3 >> 1 for index in range(nfields)
    )
    assert totals.count == 7
    assert tuple(totals[name] for name in fields) == expected
    assert [type(totals[name]) for name in fields] == [type(value) for value in expected]


def test_totals_and_buckets_copy_and_pickle() -> None:
    import copy
    import pickle

    db = tallytree.open_memory()
    calls = db.aggregate("calls", values=("cost",))
    with db.write() as tx:
        calls.insert_many(tx, [(i, i, (0.25 * i,)) for i in range(6)])
    with db.read() as tx:
        totals = calls.totals(tx)
        [bucket] = calls.buckets(tx, start=0, width=10, count=1)
    for clone in (copy.copy(totals), copy.deepcopy(totals), pickle.loads(pickle.dumps(totals))):
        assert clone == totals and clone.cost == 3.75
    for bucket_clone in (copy.deepcopy(bucket), pickle.loads(pickle.dumps(bucket))):
        assert bucket_clone == bucket and bucket_clone.cost == 3.75
