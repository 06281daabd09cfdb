"""The fused read paths against their definitions: one-descent ranges, leaf spans and exact column sums.

``Tree.rank_range`` and ``Tree.range_summary`` walk the shared part of two descents once; they must equal
two separate descents and a brute-force sum over the items in range, on trees of every shape (small node
sizes), both backends, and value columns of ints, floats and mixes of the two (exact sums compared as
scaled ints, float counts included), inside read and write transactions.
"""

from __future__ import annotations

import math
import random
import sys
from contextlib import nullcontext
from typing import Any

import pytest
from conftest import pure_python, strict
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree._aggregate import Totals, resolve_bounds
from tallytree._btree import vsub
from tallytree._keys import _int_body, encode_body
from tallytree._node import SCALE_BITS, column_sum, scaled
from tallytree._tree import Tree

FIELDS = ("cost", "tokens")


def _value(rng: random.Random, kind: str) -> int | float:
    if kind == "int":
        return rng.choice(
            [rng.randrange(-(2**63), 2**63), rng.randrange(-50, 50), rng.randrange(2**53, 2**63)]
        )
    if kind == "float":
        return rng.choice(
            [
                round(rng.uniform(0, 0.05), 6),
                rng.uniform(-1e6, 1e6),
                rng.uniform(-1, 1) * 10.0 ** rng.randrange(-320, 300),
                5e-324,
                -0.0,
                1e308,
            ]
        )
    return _value(rng, rng.choice(["int", "float"]))


def _items(rng: random.Random, size: int, kinds: tuple[str, str]) -> list[tuple[int, int, tuple[Any, ...]]]:
    keys = [rng.randrange(size * 3) for _ in range(size)]  # repeated keys: runs of equal keys
    return [(key, index, (_value(rng, kinds[0]), _value(rng, kinds[1]))) for index, key in enumerate(keys)]


def _brute(rows: list[tuple[bytes, tuple[Any, ...]]], lower: Any, upper: Any) -> list[int]:
    """The summary of the entries between two cuts, by scanning them all."""

    def below(entry: bytes, cut: Any) -> bool:
        return entry <= cut[0] if cut[1] else entry < cut[0]

    inside = [
        values
        for entry, values in rows
        if (lower is None or not below(entry, lower)) and (upper is None or below(entry, upper))
    ]
    columns = [[values[field] for values in inside] for field in range(len(FIELDS))]
    sums = [sum(map(scaled, column)) for column in columns]
    floats = [sum(type(value) is float for value in column) for column in columns]
    return [len(inside), *sums, *floats]


def _cuts(rng: random.Random, rows: list[tuple[bytes, tuple[Any, ...]]], size: int) -> list[Any]:
    cuts: list[Any] = [None]
    for _ in range(12):
        choice = rng.random()
        if choice < 0.4 and rows:
            entry = rng.choice(rows)[0]  # on a stored entry: inclusive and exclusive differ
            cuts.append((entry, rng.random() < 0.5))
        elif choice < 0.8:
            bounds = resolve_bounds(ge=rng.randrange(-2, size * 3 + 2))
            assert bounds.lower is not None
            cuts.append(bounds.lower)
        else:
            bounds = resolve_bounds(le=rng.randrange(-2, size * 3 + 2))
            assert bounds.upper is not None
            cuts.append(bounds.upper)
    return cuts


@pytest.mark.parametrize("kinds", [("float", "int"), ("int", "int"), ("mixed", "float"), ("mixed", "mixed")])
@pytest.mark.parametrize("node_size", [4, 5, 9, 64])
def test_fused_descents_equal_two_descents_and_a_scan(
    db: tallytree.Database, node_size: int, kinds: tuple[str, str]
) -> None:
    rng = random.Random(f"{node_size}{kinds}")
    agg = db.aggregate("reads", values=FIELDS, node_size=node_size)
    size = rng.choice([1, 7, 60, 400])
    with db.write() as tx:
        agg.insert_many(tx, _items(rng, size, kinds), namespace="n")
    for write in (False, True):
        with db.write() if write else db.read() as tx:
            if write:  # dirty nodes on some paths: nothing cached on them, same answers
                agg.insert_many(tx, _items(rng, 5, kinds), namespace="n")
            tree = agg._reader(tx, "n")
            rows = list(tree.iterate(0, tree.count))
            cuts = _cuts(rng, rows, size)
            for lower in cuts:
                for upper in cuts:
                    expected = _brute(rows, lower, upper)
                    assert tree.range_summary(lower, upper) == expected, (lower, upper)
                    start = tree.rank(*lower) if lower is not None else 0
                    stop = tree.rank(*upper) if upper is not None else tree.count
                    assert tree.rank_range(lower, upper) == (start, stop)
                    if lower is not None and upper is not None and start < stop:
                        two = vsub(tree.prefix_summary(*upper), tree.prefix_summary(*lower))
                        assert two == expected
                    if upper is not None:
                        assert tree.prefix_summary(*upper) == _brute(rows, None, upper)


def test_totals_equal_fsum_of_the_range(db: tallytree.Database) -> None:
    rng = random.Random(7)
    agg = db.aggregate("costs", values=FIELDS, node_size=6)
    items = [
        (rng.randrange(500), index, (rng.uniform(-1, 1) * 10.0 ** rng.randrange(-30, 30), index))
        for index in range(300)
    ]
    with db.write() as tx:
        agg.insert_many(tx, items)
    with db.read() as tx:
        for _ in range(200):
            low, high = sorted(rng.randrange(-5, 505) for _ in range(2))
            inside = [values for key, _, values in items if low <= key < high]
            expected = Totals(
                len(inside), FIELDS, (math.fsum(v[0] for v in inside), sum(v[1] for v in inside))
            )
            if not inside:
                expected = Totals(0, FIELDS, (0, 0))
            assert strict(agg.totals(tx, ge=low, lt=high)) == strict(expected)
            assert agg.count(tx, ge=low, lt=high) == len(inside)


def test_a_tree_without_value_fields(db: tallytree.Database) -> None:
    agg = db.aggregate("bare", node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key % 13, key) for key in range(100)])
    with db.read() as tx:
        tree = agg._reader(tx, None)
        for low in range(-1, 15):
            for high in range(-1, 15):
                bounds = resolve_bounds(ge=low, lt=high)
                expected = sum(1 for key in range(100) if low <= key % 13 < high)
                assert tree.range_summary(bounds.lower, bounds.upper) == [expected]
                assert agg.count(tx, ge=low, lt=high) == expected


def test_an_empty_tree_reads_as_zero(db: tallytree.Database) -> None:
    agg = db.aggregate("empty", values=FIELDS)
    with db.read() as tx:
        tree = agg._reader(tx, "nobody")
        bounds = resolve_bounds(ge=1, lt=5)
        assert tree.range_summary(bounds.lower, bounds.upper) == [0, 0, 0, 0, 0]
        assert tree.rank_range(bounds.lower, bounds.upper) == (0, 0)
        assert strict(agg.totals(tx, ge=1, lt=5, namespace="nobody")) == strict(Totals(0, FIELDS, (0, 0)))


def test_a_read_tree_shares_the_root_record(db: tallytree.Database) -> None:
    agg = db.aggregate("shared")
    with db.write() as tx:
        agg.insert(tx, 1, "a")
        reader = agg._reader(tx, None)
        writer, _ = agg._tree(tx, None)
        assert reader.root is not None and writer.root is not None
        assert reader.root.summary is not writer.root.summary or reader.root is writer.root
        assert not reader.changed


def test_namespaces_that_compare_equal_keep_their_own_trees(db: tallytree.Database) -> None:
    agg = db.aggregate("spaces")
    with db.write() as tx:
        for namespace in (1, 1.0, True, "1", None):
            agg.insert(tx, 0, repr(namespace), namespace=namespace)
        agg.insert(tx, 1, "second", namespace=1)
    with db.read() as tx:
        assert [agg.count(tx, namespace=namespace) for namespace in (1, 1.0, True, "1", None)] == [
            2,
            1,
            1,
            1,
            1,
        ]
        assert agg.at(tx, 0, namespace=1.0).id == "1.0"


FINITE = st.floats(allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("kernels", ["built", "python"])
@settings(max_examples=300)
@given(values=st.lists(st.one_of(FINITE, st.integers(-(2**63), 2**63 - 1))) | st.lists(FINITE))
def test_column_sum_is_exact(kernels: str, values: list[int | float]) -> None:
    with pure_python() if kernels == "python" else nullcontext():
        found = column_sum(values)
    assert found == (sum(map(scaled, values)), sum(type(value) is float for value in values))


@pytest.mark.parametrize("kernels", ["built", "python"])
def test_column_sum_of_floats_that_need_many_parts(kernels: str) -> None:
    with pure_python() if kernels == "python" else nullcontext():
        check_column_sums()


def check_column_sums() -> None:
    values = [1e308, 1e308, -1e308, 1e-300, 5e-324, 1.0, -1e308, 3.0]  # an intermediate overflow, tiny parts
    assert column_sum(values) == (sum(map(scaled, values)), len(values))
    spread = [2.0**exponent for exponent in range(-1074, 1000, 20)]  # too many parts: the exact slow path
    assert column_sum(spread) == (sum(map(scaled, spread)), len(spread))
    assert column_sum([]) == (0, 0)
    assert column_sum([3, 4]) == ((7) << SCALE_BITS, 0)


@settings(max_examples=500)
@given(st.integers(1, 2**60))
def test_encode_body_fast_path_for_small_ints(value: int) -> None:
    assert encode_body(value) == _int_body(value, "key")


def test_encode_body_fast_path_edges() -> None:
    for value in [
        1,
        2,
        127,
        128,
        2**56 - 1,
        2**56,
        2**57 - 1,
        2**57,
        *(2**k for k in range(58)),
        sys.maxsize,
    ]:
        assert encode_body(value) == _int_body(value, "key"), value


def test_tree_reader_is_a_tree() -> None:
    assert isinstance(Tree.reader(None, 0, 4, None), Tree)  # type: ignore[arg-type]


def test_a_read_transaction_reuses_its_trees_and_keeps_its_snapshot(db: tallytree.Database) -> None:
    """A read transaction keeps the trees it read (a bounded number): namespaces read again, more of
    them than it keeps, give the same answers, which a later commit does not change."""
    from tallytree._aggregate import _READERS

    events = db.aggregate("events", values=("n",), node_size=4)
    spaces = range(_READERS + 40)
    with db.write() as tx:
        for space in spaces:
            events.insert_many(tx, [(key, key, (space,)) for key in range(space % 7 + 1)], namespace=space)
    expected = {space: (space % 7 + 1, (space % 7 + 1) * space) for space in spaces}
    with db.read() as tx:
        for round_ in range(2):
            for space in spaces:
                totals = events.totals(tx, namespace=space)
                assert (totals.count, totals.n) == expected[space]
                assert events.count(tx, namespace=space, ge=1) == expected[space][0] - 1
                assert len(tx._readers) <= _READERS
            with db.write() as writer:  # committed meanwhile: invisible to this snapshot
                events.insert(writer, key=100 + round_, id=100, values=(1,), namespace=0)
                events.delete(writer, key=round_, id=round_, namespace=1)
        assert tx._readers  # it kept trees
    with db.read() as tx:
        assert events.count(tx, namespace=0) == expected[0][0] + 2
        assert events.count(tx, namespace=1) == expected[1][0] - 2
