"""Bulk building: a bulk-built tree equals an insert-built one, and the build is atomic.

* The column encoders give exactly ``encode_key``'s bytes (or decline, never differ).
* For random input (Hypothesis, node sizes 4..9, many namespaces, duplicates, any order), a tree built by
  ``build`` / ``build_many`` holds the same items and answers every read like one built by inserts, and
  both pass the checker; ``sorted=True`` with input out of order raises, naming the items.
* The external sort (runs spilled to disk and merged) gives the same result as the in-memory one.
* An exception in the middle of a build, and a process killed with SIGKILL during one, leave the
  previous contents, and the checker passes.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import pure_python, snapshot, strict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallytree
from tallytree import (
    DuplicateItemError,
    InvalidKeyError,
    InvalidValueError,
    Item,
    TransactionError,
    UnsortedInputError,
    UnsupportedKeyTypeError,
    _bulk,
)
from tallytree._bulk import encode_ids, encode_keys
from tallytree._keys import encode_id, encode_key

FIELDS = ("x", "y")
T0 = datetime(2024, 1, 1, tzinfo=UTC)

# ------------------------------------------------------------------ column encoders

any_int = st.one_of(
    st.integers(-300, 300),
    st.integers(-(2**56) + 1, 2**56 - 1),
    st.integers(-(2**63), 2**63),  # 64-bit ids: the loop's nine-group path, and its limits
    st.integers(-(2**70), 2**70),
    st.integers(0, 56).map(lambda shift: 1 << shift),
)
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e6, 1e6),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.0, 0.5, 1e308]),
)
any_text = st.text(max_size=8) | st.text(max_size=300)
any_datetime = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5))]) | st.none(),
)
homogeneous = st.one_of(
    st.lists(any_int, max_size=30),
    st.lists(any_float, max_size=30),
    st.lists(any_text, max_size=30),
    st.lists(st.binary(max_size=10) | st.binary(max_size=300), max_size=30),
    st.lists(any_datetime, max_size=30),
    st.lists(st.tuples(st.integers(-5, 5), st.text(max_size=3)), max_size=30),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=30),
)


def reference(values: list[Any], encode: Any) -> list[bytes] | type[Exception]:
    try:
        return [encode(value) for value in values]
    except tallytree.Error as exc:
        return type(exc)


@pytest.mark.parametrize("kernels", ["built", "python"])
@given(values=homogeneous)
def test_key_encoder_matches_encode_key(kernels: str, values: list[Any]) -> None:
    expected = reference(values, encode_key)
    with pure_python() if kernels == "python" else nullcontext():
        try:
            found = encode_keys(values)
        except tallytree.Error:
            assert not isinstance(expected, list)
            return
    if found is not None:
        assert found == expected


id_lists = st.one_of(
    st.lists(any_int, max_size=30), st.lists(any_text, max_size=30), st.lists(st.binary(), max_size=30)
)


@pytest.mark.parametrize("kernels", ["built", "python"])
@given(values=id_lists)
def test_id_encoder_matches_encode_id(kernels: str, values: list[Any]) -> None:
    expected = reference(values, encode_id)
    with pure_python() if kernels == "python" else nullcontext():
        found = encode_ids(values)
    if found is not None:
        assert found == expected


def test_encoders_take_the_fast_path_for_common_batches() -> None:
    ints = list(range(-1000, 100_000, 7))
    assert encode_keys(ints) == [encode_key(value) for value in ints]
    stamps = [T0 + timedelta(seconds=31 * index) for index in range(1000)]
    assert encode_keys(stamps) == [encode_key(value) for value in stamps]
    assert encode_keys([1, "a"]) is None  # mixed: item by item
    assert encode_ids([1.5]) is None  # floats are not ids
    assert encode_keys([T0.replace(tzinfo=None)]) is None  # naive: the general path rejects it


def int_batches() -> Iterator[tuple[str, list[int]]]:
    rng = random.Random(7)
    stamps = [1_700_000_000 + 3 * index for index in range(20_000)]  # one exponent: one shift, one head
    yield "timestamps", stamps
    yield "negated timestamps", [-value for value in reversed(stamps)]
    yield "ids across powers of two", list(range(2, 20_000))
    yield "negative ids", list(range(-20_000, -1))
    yield "powers of two", [1 << rng.randrange(1, 56) for _ in range(5_000)]  # zero fractions
    yield "negative powers of two", [-(1 << rng.randrange(1, 56)) for _ in range(5_000)]
    yield "near the lane limit", [(1 << 56) - 1 - rng.randrange(1000) for _ in range(3_000)]
    yield "near the negative limit", [-(1 << 56) + 1 + rng.randrange(1000) for _ in range(3_000)]
    yield "every width", [rng.randrange(2, 1 << rng.randrange(2, 57)) for _ in range(20_000)]
    yield "zeros and ones (item by item)", [rng.randrange(-2, 3) for _ in range(3_000)]
    yield "64-bit ids (nine groups)", [rng.randrange(1 << 56, 1 << 63) for _ in range(5_000)]
    yield "64-bit ids, both signs", [rng.randrange(-(1 << 63) + 1, 1 << 63) for _ in range(5_000)]
    yield "nine-group edges", [1 << 56, (1 << 56) + 1, (1 << 62) + 64, (1 << 63) - 1, -(1 << 63) + 1, 1 << 62]
    yield "beyond 2**63 (encode_key)", [rng.randrange(-(1 << 70), 1 << 70) for _ in range(3_000)]
    yield "huge", [10**100, -(10**100), 2**1000]
    yield "mixed slices", [0, 1, *range(2, 10_000), -5, *range(10_000, 30_000)]


@pytest.mark.parametrize("kernels", ["built", "python"])
@pytest.mark.parametrize(("label", "values"), list(int_batches()), ids=[label for label, _ in int_batches()])
def test_int_lane_encoder_matches_encode_key(kernels: str, label: str, values: list[int]) -> None:
    with pure_python() if kernels == "python" else nullcontext():
        assert encode_keys(values) == [encode_key(value) for value in values], label
        assert encode_ids(values) == [encode_id(value) for value in values], label


def test_float_and_special_keys_match_encode_key() -> None:
    rng = random.Random(3)
    floats = [rng.uniform(-1e9, 1e9) for _ in range(2_000)]
    floats += [0.0, -0.0, float("inf"), float("-inf"), 5e-324, -5e-324, 1.0, -1.0, 2.0**1023]
    assert encode_keys(floats) == [encode_key(value) for value in floats]
    texts = [f"evt_{index}" for index in range(2_000)] + ["", "é"]
    assert encode_keys(texts) == [encode_key(value) for value in texts]
    assert encode_keys([*texts, "a\x00b"]) is None  # an escaped NUL: item by item
    stamps = [T0 + timedelta(microseconds=rng.randrange(-(10**15), 10**15)) for _ in range(2_000)]
    assert encode_keys(stamps) == [encode_key(value) for value in stamps]
    pairs = [(rng.randrange(-3, 3), f"s{index}") for index in range(2_000)]
    assert encode_keys(pairs) == [encode_key(value) for value in pairs]
    assert encode_keys([1, 2.5, 3]) is None  # mixed types: item by item


# ------------------------------------------------------------------ build equals inserts

small_keys = st.one_of(
    st.integers(0, 12),
    st.floats(0, 12).map(lambda value: round(value, 1)),
    st.text("abc", max_size=2),
    st.integers(0, 12).map(lambda hours: T0 + timedelta(hours=hours)),
    st.tuples(st.integers(0, 3), st.text("ab", max_size=1)),
)
values = st.tuples(st.integers(-100, 100), st.floats(-10, 10, allow_nan=False) | st.integers(-5, 5))
ids = st.integers(0, 6) | st.text("xy", max_size=2)


@st.composite
def inputs(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], int]:
    """Rows (namespace, key, id, values): one key type (fast paths) or mixed types (item by item)."""
    node_size = draw(st.integers(4, 9))
    kind = draw(st.sampled_from(["int", "mixed", "datetime", "text", "tuple"]))
    key = {
        "int": st.integers(0, 40),
        "mixed": small_keys,
        "datetime": st.integers(0, 40).map(lambda hours: T0 + timedelta(hours=hours)),
        "text": st.text("abcd", max_size=3),
        "tuple": st.tuples(st.integers(0, 3), st.text("ab", max_size=2)),
    }[kind]
    namespace = st.sampled_from([None, "a", "b", ("org", 1), 7])
    rows = draw(st.lists(st.tuples(namespace, key, ids, values), max_size=120))
    return rows, node_size


def expected_state(rows: list[tuple[Any, ...]]) -> dict[Any, dict[bytes, tuple[Any, ...]]]:
    """Last one wins, per (namespace, key, id) as encoded (1 and 1.0 are different keys)."""
    state: dict[Any, dict[bytes, tuple[Any, ...]]] = {}
    for namespace, key, item_id, row_values in rows:
        space = state.setdefault(encode_key(namespace), {})
        space[encode_key(key) + encode_id(item_id)] = (namespace, key, item_id, row_values)
    return state


def insert_built(rows: list[tuple[Any, ...]], node_size: int) -> tallytree.Database:
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS, node_size=node_size)
    with db.write() as tx:
        for space in expected_state(rows).values():
            items = list(space.values())
            aggregate.insert_many(tx, [row[1:] for row in items], namespace=items[0][0])
    return db


def compare_reads(left: tallytree.Database, right: tallytree.Database, rng: random.Random) -> None:
    """Bounded reads agree: count, totals, rank, at, min, max over random bounds of every namespace."""
    first, second = left.aggregate("agg"), right.aggregate("agg")
    with left.read() as one, right.read() as two:
        for namespace, _ in first.namespaces(one):
            keys = [item.key for item in first.items(one, namespace=namespace)]
            for _ in range(4):
                low, high = sorted(rng.randrange(len(keys)) for _ in range(2))
                low, high = keys[low], keys[high]  # in tree order, whatever their types
                bounds = {"namespace": namespace, "ge": low, "lt": high}
                assert first.count(one, **bounds) == second.count(two, **bounds)
                assert strict(first.totals(one, **bounds)) == strict(second.totals(two, **bounds))
                assert first.rank(one, high, namespace=namespace) == second.rank(
                    two, high, namespace=namespace
                )
                assert strict(first.min(one, **bounds)) == strict(second.min(two, **bounds))
                assert strict(first.max(one, **bounds)) == strict(second.max(two, **bounds))
            index = rng.randrange(len(keys))
            assert strict(first.at(one, index, namespace=namespace)) == strict(
                second.at(two, index, namespace=namespace)
            )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(inputs(), st.floats(0.5, 1.0), st.randoms(use_true_random=False))
def test_build_many_equals_inserts(
    case: tuple[list[tuple[Any, ...]], int], fill: float, rng: random.Random
) -> None:
    rows, node_size = case
    built = tallytree.open_memory()
    aggregate = built.aggregate("agg", values=FIELDS, node_size=node_size)
    state = expected_state(rows)
    duplicated = sum(map(len, state.values())) < len(rows)
    with built.write() as tx:
        if duplicated:
            with pytest.raises(DuplicateItemError, match="appears twice in the input"):
                aggregate.build_many(tx, rows, fill=fill)
        report = aggregate.build_many(tx, rows, on_duplicate="last", fill=fill)
    assert report.items == sum(map(len, state.values()))
    assert report.namespaces == len(state)
    assert report.duplicates == len(rows) - report.items
    reference_db = insert_built(rows, node_size)
    assert snapshot(built) == snapshot(reference_db)
    with built.read() as tx:
        assert tallytree.check(tx) == []
    if rows:
        compare_reads(built, reference_db, rng)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(inputs(), st.data())
def test_sorted_input_streams_and_unsorted_input_is_refused(
    case: tuple[list[tuple[Any, ...]], int], data: st.DataObject
) -> None:
    rows, node_size = case
    unique = [row for space in expected_state(rows).values() for row in space.values()]
    ordered = sorted(unique, key=lambda row: encode_key(row[0]) + encode_key(row[1]) + encode_id(row[2]))
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS, node_size=node_size)
    with db.write() as tx:
        aggregate.build_many(tx, ordered, sorted=True)
    assert snapshot(db) == snapshot(insert_built(rows, node_size))
    with db.read() as tx:
        assert tallytree.check(tx) == []
    if len(ordered) >= 2:
        first = data.draw(st.integers(0, len(ordered) - 2))
        second = data.draw(st.integers(first + 1, len(ordered) - 1))
        shuffled = list(ordered)
        shuffled[first], shuffled[second] = shuffled[second], shuffled[first]
        before = snapshot(db)
        named = rf"item {first + 1}\b|item {second}\b|item {first}\b"
        with pytest.raises(UnsortedInputError, match=named), db.write() as tx:
            aggregate.build_many(tx, shuffled, sorted=True)
        assert snapshot(db) == before


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(inputs())
def test_external_sort_equals_in_memory_sort(case: tuple[list[tuple[Any, ...]], int]) -> None:
    rows, node_size = case
    results = []
    for memory, batch, block in ((_bulk.DEFAULT_MEMORY, _bulk._BATCH, _bulk._BLOCK), (1, 7, 8192), (1, 9, 2)):
        db = tallytree.open_memory()
        aggregate = db.aggregate("agg", values=FIELDS, node_size=node_size)
        saved = _bulk._BATCH, _bulk._BLOCK
        # small batches: many runs, so the merge really merges; small blocks: equal items on both
        # sides of a run's block boundary
        _bulk._BATCH, _bulk._BLOCK = batch, block
        try:
            with db.write() as tx:
                aggregate.build_many(tx, rows, on_duplicate="last", memory=memory)
        finally:
            _bulk._BATCH, _bulk._BLOCK = saved
        results.append(snapshot(db))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("block", [2, 3, 4])
def test_the_last_of_repeated_items_wins_across_block_boundaries_of_spilled_runs(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose repeated item straddles two of its blocks, and a later run that repeats it again:
    the later run's copy is the last (found by an audit: the earlier run's second copy won)."""
    monkeypatch.setattr(_bulk, "_BATCH", 8)
    monkeypatch.setattr(_bulk, "_BLOCK", block)
    first_run = [(None, key, "x", (1, 0.5)) for key in range(block - 1)]
    first_run += [(None, 50, "x", (1, 0.5)), (None, 50, "x", (2, 0.5))]  # across blocks 1 and 2
    first_run += [(None, 100 + key, "x", (1, 0.5)) for key in range(8 - len(first_run))]
    second_run = [(None, 50, "x", (3, 0.5))] + [(None, 200 + key, "x", (1, 0.5)) for key in range(7)]
    rows = first_run + second_run
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS)
    with db.write() as tx:
        report = aggregate.build_many(tx, rows, on_duplicate="last", memory=1)
    assert report.duplicates == 2
    with db.read() as tx:
        assert aggregate.get(tx, 50, "x") == tallytree.Item(50, "x", (3, 0.5))
    kept = list(_bulk.sorted_items(aggregate, rows, memory=1, on_duplicate="last"))  # as verify reads
    assert [values for _, entry, values in kept if entry == encode_key(50) + encode_id("x")] == [(3, 0.5)]
    with pytest.raises(DuplicateItemError, match=rf"item {block - 1} and item {block}\b"):
        list(_bulk.sorted_items(aggregate, rows, memory=1))


def test_external_sort_spills_runs_and_removes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bulk, "_BATCH", 100)
    rng = random.Random(5)
    rows = [(f"ns{rng.randrange(5)}", rng.randrange(10**6), index, (index, 1.5)) for index in range(3000)]
    phases: list[tuple[str, int]] = []
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS, node_size=8)
    with db.write() as tx:
        report = _bulk.build_many(
            aggregate,
            tx,
            rows,
            memory=20_000,
            temp_dir=str(tmp_path),
            progress=lambda phase, done: phases.append((phase, done)),
        )
    assert report.items == 3000 and report.namespaces == 5
    assert sum(1 for phase, _ in phases if phase == "spill") > 5
    assert list(tmp_path.iterdir()) == []  # the runs are gone
    assert snapshot(db) == snapshot(insert_built(rows, 8))


def test_sorted_input_beyond_the_memory_budget_concatenates_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bulk, "_BATCH", 50)
    rows = [(None, key, 0, (key, 0.5)) for key in range(2000)]
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS, node_size=6)
    with db.write() as tx:
        assert aggregate.build_many(tx, rows, memory=5_000).items == 2000
    with db.read() as tx:
        assert [item.key for item in aggregate.items(tx)] == list(range(2000))
        assert tallytree.check(tx) == []


@pytest.mark.parametrize("memory", [_bulk.DEFAULT_MEMORY, 5_000])
def test_sorted_items_treats_a_repeated_item_as_build_many_does(
    memory: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What verify compares a source with: a repeated (namespace, key, id) raises naming both rows, in
    memory or across spilled runs, or with on_duplicate="last" the last one is kept, as a build does."""
    monkeypatch.setattr(_bulk, "_BATCH", 50)
    rows = [("ns", key, key, (key, 0.5)) for key in range(1000)]
    rows.append(("ns", 7, 7, (70, 0.5)))  # item 1000 repeats item 7
    rows.append(("other", 7, 7, (1, 0.5)))  # the same (key, id) in another namespace is another item
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS)
    with pytest.raises(
        DuplicateItemError,
        match=r"item \(key=7, id=7\) appears twice in the input, item 7 and "
        r"item 1000 in namespace 'ns'",
    ):
        list(_bulk.sorted_items(aggregate, rows, memory=memory))
    with db.write() as tx, pytest.raises(DuplicateItemError, match="item 7 and item 1000"):
        aggregate.build_many(tx, rows, memory=memory)
    kept = list(_bulk.sorted_items(aggregate, rows, memory=memory, on_duplicate="last"))
    assert len(kept) == 1001
    assert [values for _, entry, values in kept if entry == encode_key(7) + encode_id(7)] == [
        (70, 0.5),
        (1, 0.5),
    ]
    with pytest.raises(ValueError, match="on_duplicate"):
        list(_bulk.sorted_items(aggregate, rows, on_duplicate="skip"))  # type: ignore[arg-type]


# ------------------------------------------------------------------ single namespace, options


def test_build_replaces_the_namespace_and_leaves_the_others(db: tallytree.Database) -> None:
    aggregate = db.aggregate("agg", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, "old", (key, 0)) for key in range(50)], namespace="a")
        aggregate.insert_many(tx, [(key, "other", (key, 0)) for key in range(10)], namespace="b")
    with db.write() as tx:
        report = aggregate.build(tx, [(key, "new", (1, 2.5)) for key in range(30)], namespace="a")
    assert report == tallytree.BuildReport(items=30, namespaces=1)
    with db.read() as tx:
        assert {item.id for item in aggregate.items(tx, namespace="a")} == {"new"}
        assert aggregate.count(tx, namespace="b") == 10
        assert aggregate.totals(tx, namespace="a").as_dict() == {"count": 30, "x": 30, "y": 75.0}
        assert tallytree.check(tx) == []  # the old nodes were freed: no leaks


def test_build_with_no_items_empties_the_namespace(db: tallytree.Database) -> None:
    aggregate = db.aggregate("agg", node_size=4)
    with db.write() as tx:
        aggregate.insert_many(tx, [(key, key) for key in range(20)])
    with db.write() as tx:
        assert aggregate.build(tx, []).items == 0
    with db.read() as tx:
        assert aggregate.count(tx) == 0
        assert list(aggregate.namespaces(tx)) == []
        assert tallytree.check(tx) == []


def test_build_takes_items_pairs_and_mappings() -> None:
    db = tallytree.open_memory()
    plain = db.aggregate("plain", node_size=5)
    valued = db.aggregate("valued", values=FIELDS, node_size=5)
    with db.write() as tx:
        plain.build(tx, [(3, "c"), (1, "a"), Item(2, "b")])
        valued.build(tx, [Item(key, key, (key, 0.5)) for key in range(40)])
        valued.build(tx, [(0, "m", {"x": 1, "y": 2})], namespace="mapping")
    with db.read() as tx:
        assert [item.key for item in plain.items(tx)] == [1, 2, 3]
        assert valued.totals(tx).as_dict() == {"count": 40, "x": 780, "y": 20.0}
        assert valued.get(tx, 0, "m", namespace="mapping") == Item(0, "m", (1, 2))


def test_replace_false_merges_with_the_stored_items() -> None:
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.build(tx, [(key, "s", (key, 0)) for key in range(0, 40, 2)])
    with db.write() as tx, pytest.raises(DuplicateItemError, match=r"key=4, id='s'\) is already stored"):
        aggregate.build(tx, [(5, "s", (0, 0)), (4, "s", (0, 0))], replace=False)
    with db.write() as tx:
        report = aggregate.build(
            tx, [(key, "s", (100, 0)) for key in range(1, 41, 3)], replace=False, on_duplicate="last"
        )
    expected = {key: key for key in range(0, 40, 2)} | {key: 100 for key in range(1, 41, 3)}
    with db.read() as tx:
        assert {item.key: item.values[0] for item in aggregate.items(tx)} == expected
        assert tallytree.check(tx) == []
    assert report.items == len(expected)
    assert report.duplicates == len(set(range(0, 40, 2)) & set(range(1, 41, 3)))


def test_clear_others_makes_the_aggregate_equal_the_rows() -> None:
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", node_size=4)
    with db.write() as tx:
        for namespace in "abc":
            aggregate.insert_many(tx, [(key, key) for key in range(9)], namespace=namespace)
    with db.write() as tx:
        report = aggregate.build_many(tx, [("b", 1, 1), ("d", 2, 2)], clear_others=True)
    assert (report.items, report.namespaces, report.cleared) == (2, 2, 2)
    with db.read() as tx:
        assert [namespace for namespace, _ in aggregate.namespaces(tx)] == ["b", "d"]
        assert tallytree.check(tx) == []


def test_invalid_items_raise_naming_them_or_are_skipped() -> None:
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=("x",), node_size=4)
    rows = [(1, "a", (1,)), (float("nan"), "b", (1,)), (2, "c", ("one",)), ([3], "d", (1,)), (4, None, (1,))]
    with db.write() as tx, pytest.raises(InvalidKeyError, match=r"^item 1: "):
        aggregate.build(tx, rows)
    with db.write() as tx, pytest.raises(InvalidValueError, match=r"^item 0: .*not 'x'"):
        aggregate.build(tx, ["x"])
    skipped: list[tuple[int, type]] = []
    with db.write() as tx:
        report = aggregate.build(
            tx, rows, on_invalid=lambda position, error: skipped.append((position, type(error)))
        )
    assert skipped == [
        (1, InvalidKeyError),
        (2, InvalidValueError),
        (3, UnsupportedKeyTypeError),
        (4, UnsupportedKeyTypeError),
    ]
    assert (report.items, report.invalid) == (1, 4)


def test_options_are_validated() -> None:
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg")
    with db.write() as tx:
        with pytest.raises(ValueError, match="on_duplicate"):
            aggregate.build(tx, [], on_duplicate="skip")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="fill"):
            aggregate.build(tx, [], fill=0.2)
        with pytest.raises(ValueError, match="memory"):
            aggregate.build(tx, [], memory=0)
    with db.read() as tx, pytest.raises(TransactionError, match="write transaction"):
        aggregate.build(tx, [(1, 1)])


@pytest.mark.parametrize("count", [1, 57, 58, 59, 64, 65, 121, 122, 3_712, 3_777, 10_000])
def test_node_sizes_at_level_boundaries(count: int) -> None:
    """Counts around multiples of the fill target: every node within bounds, leaves about 90% full."""
    db = tallytree.open_memory()
    aggregate = db.aggregate("agg", values=("x",))
    with db.write() as tx:
        aggregate.build(tx, [(key, 0, (key,)) for key in range(count)], sorted=True)
        root = tx.root(aggregate._tree_key(None))
    assert root is not None
    with db.read() as tx:
        assert tallytree.check(tx) == []
        assert aggregate.totals(tx).as_dict() == {"count": count, "x": count * (count - 1) // 2}
        level = [root.node_id]
        for _ in range(root.height - 1):
            level = [kid for node_id in level for kid in tx.node(node_id).kids]
    leaves = len(level)
    assert leaves <= max(1, -(-count // 57))  # leaves about 58 full (0.9 x 64): never sparser than 57


def test_the_transaction_reads_and_changes_what_it_built(db: tallytree.Database) -> None:
    aggregate = db.aggregate("agg", values=("x",), node_size=4)
    with db.write() as tx:
        aggregate.build(tx, [(key, 0, (key,)) for key in range(100)])
        assert aggregate.count(tx, ge=10, lt=20) == 10
        aggregate.insert(tx, 10.5, 0, (1000,))
        aggregate.delete(tx, 50, 0)
        assert aggregate.totals(tx).x == sum(range(100)) - 50 + 1000
    with db.read() as tx:
        assert aggregate.count(tx) == 100
        assert tallytree.check(tx) == []


# ------------------------------------------------------------------ atomicity


def failing(count: int) -> Iterator[tuple[Any, ...]]:
    for key in range(count):
        yield (key, "new", (key, 0))
    raise RuntimeError("the source broke")


@pytest.mark.parametrize("presorted", [True, False])
def test_an_exception_during_a_build_leaves_the_old_tree(db: tallytree.Database, presorted: bool) -> None:
    aggregate = db.aggregate("agg", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.build(tx, [(key, "old", (key, 1)) for key in range(200)])
    before = snapshot(db)
    with pytest.raises(RuntimeError, match="the source broke"), db.write() as tx:
        aggregate.build(tx, failing(100_000), sorted=presorted)
    assert snapshot(db) == before
    with db.read() as tx:
        assert tallytree.check(tx) == []


def test_a_failed_build_caught_inside_the_transaction_changes_nothing(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for every write: catch the error, go on, commit, and the failed build left no trace."""
    monkeypatch.setattr(_bulk, "_BATCH", 50)  # several chunks: earlier namespaces are written first
    aggregate = db.aggregate("agg", values=FIELDS, node_size=4)
    with db.write() as tx:
        aggregate.build_many(
            tx, [(namespace, key, "old", (key, 1)) for namespace in "abc" for key in range(30)]
        )
    before = snapshot(db)
    rows = [(namespace, key, "new", (key, 2)) for namespace in "abcd" for key in range(100)]
    rows.append(("d", 99, "new", (0, 0)))  # a duplicate in the last namespace
    for presorted in (True, False):
        with db.write() as tx:
            with pytest.raises(DuplicateItemError, match="item 399 and item 400 in namespace 'd'"):
                aggregate.build_many(tx, rows, sorted=presorted, clear_others=True)
            assert snapshot(db, tx) == before
        assert snapshot(db) == before
        with db.read() as tx:
            assert tallytree.check(tx) == []  # no node of the failed build was left behind


KILLED_BUILD = textwrap.dedent(
    """
    import sys, tallytree
    db = tallytree.open(sys.argv[1])
    aggregate = db.aggregate("agg", values=("x", "y"), node_size=8)
    def rows():
        for key in range(10**7):
            if key == 1000:
                print("building", flush=True)
            yield (f"ns{key % 7}", key, "new", (key, 0.5))
    with db.write() as tx:
        aggregate.build_many(tx, rows(), sorted=False, memory=2_000_000, clear_others=True)
    print("committed", flush=True)
    """
)


def test_sigkill_during_a_build_leaves_the_previous_contents(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path) as db:
        aggregate = db.aggregate("agg", values=("x", "y"), node_size=8)
        with db.write() as tx:
            aggregate.build_many(tx, [(f"ns{key % 3}", key, "old", (key, 1.0)) for key in range(500)])
        before = snapshot(db)
    script = tmp_path / "build.py"
    script.write_text(KILLED_BUILD)
    spills = tmp_path / "tmp"  # where the killed builds leave their runs (not the system's /tmp)
    spills.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(tallytree.__file__).parent.parent), "TMPDIR": str(spills)}
    rng = random.Random(11)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"building"
        time.sleep(rng.uniform(0.0, 0.8))  # reading, sorting, spilling runs to disk or writing nodes
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        with tallytree.open(path) as db:
            assert snapshot(db) == before
            with db.read() as tx:
                assert tallytree.check(tx) == []


ALTERNATING_BUILDS = textwrap.dedent(
    """
    import sys, tallytree
    db = tallytree.open(sys.argv[1])
    aggregate = db.aggregate("agg", values=("x", "y"), node_size=8)
    version = 0
    while True:
        version = 1 - version
        rows = [(f"ns{key % 3}", key, f"v{version}", (key, 0.5 * version)) for key in range(3000)]
        with db.write() as tx:
            aggregate.build_many(tx, rows, clear_others=True)
        if version:
            print("committed", flush=True)  # from here on, the database always holds a full state
    """
)


def test_sigkill_between_and_during_commits_leaves_one_committed_state(tmp_path: Path) -> None:
    """Builds that commit over and over: a kill at any moment leaves exactly one of the two states."""
    path = tmp_path / "db"
    states = []
    for version in (1, 0):
        with tallytree.open_memory() as memory:
            aggregate = memory.aggregate("agg", values=("x", "y"), node_size=8)
            rows = [(f"ns{key % 3}", key, f"v{version}", (key, 0.5 * version)) for key in range(3000)]
            with memory.write() as tx:
                aggregate.build_many(tx, rows)
            states.append(snapshot(memory))
    script = tmp_path / "alternate.py"
    script.write_text(ALTERNATING_BUILDS)
    env = {**os.environ, "PYTHONPATH": str(Path(tallytree.__file__).parent.parent)}
    rng = random.Random(3)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"committed"
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        with tallytree.open(path) as db:
            assert snapshot(db) in states
            with db.read() as tx:
                assert tallytree.check(tx) == []


def test_docs_snippets_run() -> None:
    """Every ```python block of docs/bulk.md, in order, in one namespace."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "bulk.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert len(blocks) >= 6
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "docs/bulk.md", "exec"), namespace)


@pytest.mark.parametrize("enabled", [True, False])
def test_builds_restore_the_garbage_collector_state(enabled: bool) -> None:
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost",))
    table = db.table("docs")
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with db.write() as tx:
            events.build(tx, [(n, "id", (1,)) for n in range(100)], namespace="a", sorted=True)
        assert gc.isenabled() is enabled
        with pytest.raises(tallytree.UnsortedInputError), db.write() as tx:
            events.build(tx, [(2, "id", (1,)), (1, "id", (1,))], namespace="b", sorted=True)
        assert gc.isenabled() is enabled
        with db.write() as tx:
            table.insert_many(tx, [{"id": n, "at": n} for n in range(100)])
        table.aggregate("by_at", key="at")  # attaching builds from the documents
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_a_spool_holds_one_block_and_writes_the_rest_to_a_nameless_file(tmp_path: Path) -> None:
    """verify --repair collects its repairs in a Spool: O(limit) items in memory whatever their
    number, read back in order and equal (tuples, bytes, None, floats, the whole value range)."""
    from tallytree._bulk import Spool

    items = [
        (encode_key(f"org:{n % 3}"), encode_key(n) + encode_id(f"e{n}"), (n * 0.5, 2**64 - 1 - n, -(2**63)))
        if n % 4
        else (encode_key(None), encode_key(-n) + encode_id(n), None)
        for n in range(1_000)
    ]
    spool = Spool(limit=64, temp_dir=str(tmp_path))
    try:
        for item in items:
            spool.append(item)
            assert len(spool.held) < 64  # never more than one block in memory
        assert (len(spool), spool.spilled) == (1_000, 960)
        assert os.listdir(tmp_path) == []  # the file has no name: nothing to leave behind
        assert [strict(item) for item in spool] == [strict(item) for item in items]
    finally:
        spool.close()
    with pytest.raises(tallytree.InvalidArgumentError, match="limit must be a positive int"):
        Spool(limit=0)
