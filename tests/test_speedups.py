"""The C kernels (``tallytree._speedups``) against the Python code they stand in for.

Each kernel must give exactly what the Python reference gives, or None (the caller then runs the
Python code), never a different answer. Skipped where the extension was not built; ``.ci/run``
checks that it is built there.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import random
import re
import sys
import weakref
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest
from conftest import pure_python, strict
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import tallytree
from tallytree import _keys as keys_module
from tallytree._btree import NodeTree, _Run, vadd
from tallytree._keys import MAX_KEY_BYTES, encode_id, encode_key
from tallytree._native import speedups
from tallytree._node import (
    Node,
    _consistent,
    _join_limbs,
    _limbs,
    decode_node,
    delta_of,
    encode_node,
    scaled,
    summarize,
)
from tallytree._store import NODES
from tallytree._txn import node_key
from tallytree.errors import CorruptDatabaseError, KeyTooLargeError

pytestmark = pytest.mark.skipif(speedups is None, reason="the C extension is not built")

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
EDGES = [0, 1, -1, 2, -2, 127, 128, 255, 256, 2**56 - 1, 2**56, 2**62, 2**63 - 1, -(2**63), -(2**63) + 1]


def python_keys(values: list[Any]) -> list[bytes]:
    """The reference: ``encode_key`` of each value by the Python encoder (it calls the kernels too)."""
    with pure_python():
        return [encode_key(value) for value in values]


def exact_sum(values: list[float]) -> int:
    """The reference: every float as an exact int in units of 2**-1074, added as Python ints."""
    return sum(map(scaled, values))


@given(st.lists(INT64 | st.sampled_from(EDGES), max_size=50))
def test_int_keys_equal_encode_key(values: list[int]) -> None:
    assert speedups is not None
    assert speedups.int_keys(values) == python_keys(values)


def test_int_keys_at_every_width_and_sign() -> None:
    assert speedups is not None
    rng = random.Random(5)
    values = [sign * rng.randrange(1 << bits, 1 << (bits + 1)) for bits in range(63) for sign in (1, -1)]
    values += [*EDGES, 2**63 - 2]
    assert speedups.int_keys(values) == python_keys(values)
    assert speedups.int_keys(tuple(values)) == speedups.int_keys(values)  # any sequence


@pytest.mark.parametrize(
    "values",
    [[2**63], [-(2**63) - 1], [10**30], [True], [1, False], [1.0], ["1"], [None], [1, 2, 2**64]],
    ids=repr,
)
def test_int_keys_leave_what_they_do_not_handle_to_python(values: list[Any]) -> None:
    assert speedups is not None
    assert speedups.int_keys(values) is None


ONE_KEY_SCALARS = (
    INT64
    | st.sampled_from(EDGES)
    | st.datetimes(min_value=datetime(1, 1, 1), timezones=st.just(UTC))
    | st.datetimes(min_value=datetime(1, 1, 1), timezones=st.just(timezone(timedelta(hours=2))))
    | st.integers()
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | st.text(max_size=5)
    | st.text(alphabet="a\x00\ud800é", max_size=4)  # NUL to escape, lone surrogates, non-ASCII
    | st.text(min_size=240, max_size=260)  # around the size limit
    | st.binary(max_size=3)
)


def _one_key_handles(value: Any) -> bool:
    """What ``one_key`` takes (the rest it leaves to Python): an int64, a UTC datetime, a str without
    NUL (and encodable), or a flat tuple of those, None and bools; a whole key within the limit."""
    kind = type(value)
    if kind is tuple:
        return all(
            item is None or type(item) is bool or (type(item) is not tuple and _one_key_handles(item))
            for item in value
        )
    if kind is str:
        return "\x00" not in value and not any("\ud800" <= char <= "\udfff" for char in value)
    return (kind is int and -(2**63) <= value < 2**63) or (kind is datetime and value.tzinfo is UTC)


@given(ONE_KEY_SCALARS | st.lists(ONE_KEY_SCALARS, max_size=4).map(tuple) | st.tuples(st.tuples(INT64)))
def test_one_key_equals_the_python_encoder(value: Any) -> None:
    """One key: its encoding, or its body (the key without the suffix bytes of its ints), as the
    Python encoder gives them (or raises: then None); what it does not take is left to Python
    (None)."""
    assert speedups is not None
    with pure_python():
        try:
            key, body = keys_module.encode_key(value), keys_module.encode_body(value)
        except tallytree.Error:
            key = body = None
    handled = _one_key_handles(value) and key is not None
    assert speedups.one_key(value, False, MAX_KEY_BYTES) == (key if handled else None)
    assert speedups.one_key(value, True, MAX_KEY_BYTES) == (body if handled else None)
    if type(value) is tuple:  # encode_prefix takes the kernel's body
        if key is None:
            with pytest.raises(tallytree.Error):
                keys_module.encode_prefix(value)
        else:
            with pure_python():
                prefix = keys_module.encode_prefix(value)
            assert keys_module.encode_prefix(value) == prefix


def test_one_key_leaves_a_key_over_the_limit_to_python() -> None:
    """A whole key longer than ``limit`` (its suffix bytes counted) is Python's to refuse."""
    assert speedups is not None
    fits = ("a" * 100, 1, 2)
    size = len(python_keys([fits])[0])
    assert speedups.one_key(fits, False, size) == python_keys([fits])[0]
    assert speedups.one_key(fits, True, size) is not None
    assert speedups.one_key(fits, False, size - 1) is None  # one suffix byte over
    assert speedups.one_key(fits, True, size - 1) is None  # the body alone fits; the key does not
    assert speedups.one_key("a" * 10, False, 11) is None  # 40, ten bytes, 00
    assert speedups.one_key("a" * 10, False, 12) == python_keys(["a" * 10])[0]
    with pytest.raises(KeyTooLargeError):
        encode_key(("a" * 200, "b" * 60))


IDS = (
    INT64
    | st.integers()
    | st.text(max_size=5)
    | st.text(alphabet="a\x00\ud800", max_size=3)
    | (st.binary(max_size=3) | st.floats(allow_nan=False) | st.booleans() | st.none())
)


def _python_entry(key: Any, id: Any) -> bytes | type[tallytree.Error]:
    """The reference: ``encode_key(key) + encode_id(id)`` by the Python encoders, or the type of the
    error they raise."""
    with pure_python():
        try:
            return keys_module.encode_key(key) + keys_module.encode_id(id)
        except tallytree.Error as exc:
            return type(exc)


@given(ONE_KEY_SCALARS | st.lists(ONE_KEY_SCALARS, max_size=3).map(tuple), IDS)
def test_item_entry_equals_the_python_encoders(key: Any, id: Any) -> None:
    """An item's entry in one call when the C encoders take the key (as ``one_key`` does) and the id
    (an int64 or a str), else None; ``encode_entry`` gives what the Python encoders give, or raises
    what they raise."""
    assert speedups is not None
    expected = _python_entry(key, id)
    handled = (
        type(expected) is bytes and _one_key_handles(key) and type(id) in (int, str) and _one_key_handles(id)
    )
    assert speedups.item_entry(key, id, MAX_KEY_BYTES) == (expected if handled else None)
    if type(expected) is bytes:
        assert keys_module.encode_entry(key, id) == expected
    else:
        with pytest.raises(expected):
            keys_module.encode_entry(key, id)


def test_item_entry_leaves_a_key_or_an_id_over_the_limit_to_python() -> None:
    assert speedups is not None
    key, id = "k" * 20, "i" * 30
    assert speedups.item_entry(key, id, 32) == _python_entry(key, id)
    assert speedups.item_entry(key, id, 31) is None  # the id's 32 bytes
    assert speedups.item_entry(key, "i", 21) is None  # the key's 22 bytes
    assert speedups.item_entry(Int(3), 1, MAX_KEY_BYTES) is None  # (a subclass: Python's)
    assert speedups.item_entry(3, Int(1), MAX_KEY_BYTES) is None
    for call in (
        lambda: speedups.item_entry(1, 2),  # type: ignore[union-attr, call-arg]
        lambda: speedups.item_entry(1, 2, None),  # type: ignore[union-attr, arg-type]
        lambda: speedups.item_entry(1, 2, 3, 4),  # type: ignore[union-attr, call-arg]
    ):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(ValueError):
        speedups.item_entry(1, 2, -1)


def _plain(values: Any, count: int) -> bool:
    """The reference for ``plain_values``: an exact tuple of ``count`` values that an item holds as
    they are (Aggregate._values' fast path in Python)."""
    return (
        type(values) is tuple
        and len(values) == count
        and all(
            (type(value) is float and math.isfinite(value))
            or (type(value) is int and -(2**63) <= value <= 2**64 - 1)
            for value in values
        )
    )


PLAIN_VALUES = (
    st.integers()
    | st.sampled_from([2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**63, 2**100, -(2**100)])
    | st.floats()
    | st.booleans()
    | st.none()
    | st.text(max_size=2)
)


@given(st.lists(PLAIN_VALUES, max_size=4).map(tuple) | st.lists(PLAIN_VALUES, max_size=3), st.integers(0, 4))
def test_plain_values_takes_what_the_python_check_takes(values: Any, count: int) -> None:
    """The values themselves when they need no conversion nor check, else None; ``_values`` then
    gives what the Python code gives (or raises its error)."""
    assert speedups is not None
    answer = speedups.plain_values(values, count)
    assert answer is (values if _plain(values, count) else None)
    db = tallytree.open_memory()
    aggregate = db.aggregate("a", values=tuple(f"v{index}" for index in range(count)))
    with pure_python():
        try:
            expected: Any = strict(aggregate._values(values))
        except tallytree.Error as exc:
            expected = type(exc)
    if isinstance(expected, type):
        with pytest.raises(expected):
            aggregate._values(values)
    else:
        assert strict(aggregate._values(values)) == expected


def test_plain_values_refuses_bad_arguments() -> None:
    assert speedups is not None
    assert speedups.plain_values([1.0], 1) is None  # a list: converted by the Python code
    assert speedups.plain_values((1.0, Int(2)), 2) is None
    with pytest.raises(TypeError):
        speedups.plain_values((1,))  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        speedups.plain_values((), -1)


def _puts_env(path: Any) -> tuple[Any, list[Any]]:
    import lmdb

    env = lmdb.open(str(path), max_dbs=2, map_size=1 << 22)
    return env, [env.open_db(b"one"), env.open_db(b"two")]


def _contents(env: Any, dbs: list[Any]) -> list[list[tuple[bytes, bytes]]]:
    with env.begin() as txn:
        return [list(txn.cursor(db)) for db in dbs]


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=3), st.none() | st.binary(max_size=6)),
        max_size=12,
    ),
    st.integers(0, 3),
)
@settings(max_examples=40)
def test_put_ops_makes_the_calls_of_the_python_loop(
    ops: list[tuple[int, bytes, bytes | None]], start: int
) -> None:
    """``put_ops`` leaves LMDB as ``_lmdb._apply_ops``' own loop does: each op from ``start`` on, in
    order (a put overwrites; a delete of an absent key does nothing). (``_apply_ops`` with the kernels
    calls ``put_ops``.)"""
    import tempfile

    from tallytree import _lmdb

    assert speedups is not None
    seed = [(0, b"a", b"1"), (1, b"b", b"2"), (0, b"c", b"3")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for built in (True, False):
            env, dbs = _puts_env(f"{tmp}/{built}")
            with env.begin(write=True) as txn:
                for table, key, value in seed:
                    txn.put(key, value, db=dbs[table])
                if built:  # the ops before start are not made
                    speedups.put_ops(txn, dbs, [*[(0, b"x", b"skipped")] * start, *ops], start)
                else:
                    with pure_python():
                        _lmdb._apply_ops(txn, dbs, ops, 0)
            results.append(_contents(env, dbs))
            env.close()
    assert results[0] == results[1]


def test_put_ops_raises_what_lmdb_raises_and_refuses_bad_ops(tmp_path: Any) -> None:
    import lmdb

    assert speedups is not None
    env, dbs = _puts_env(tmp_path)
    txn = env.begin(write=True)
    with pytest.raises(lmdb.BadValsizeError):  # a key beyond LMDB's limit: the ops before it were made
        speedups.put_ops(txn, dbs, [(0, b"a", b"1"), (1, b"k" * 600, b"2"), (0, b"b", b"3")], 0)
    assert txn.get(b"a", db=dbs[0]) == b"1"
    assert txn.get(b"b", db=dbs[0]) is None
    for ops in ([(2, b"a", b"1")], [(-1, b"a", b"1")], [(0, b"a")], [[0, b"a", b"1"]], [("0", b"a", b"1")]):
        with pytest.raises((TypeError, IndexError)):
            speedups.put_ops(txn, dbs, ops, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.put_ops(txn, tuple(dbs), [], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        speedups.put_ops(txn, dbs, [], -1)
    txn.abort()
    env.close()


def test_every_module_using_the_kernels_is_switched_by_kernels() -> None:
    """``kernels(False)`` rebinds ``speedups`` in each module that imports it, or a test of the
    Python code would run the C kernels in the modules it missed."""
    import pathlib

    from tallytree import _native

    source = pathlib.Path(_native.__file__).parent
    imports = re.compile(r"^from \._native import .*\bspeedups\b", re.MULTILINE)
    users = sorted(path.stem for path in source.glob("*.py") if imports.search(path.read_text()))
    assert users == sorted(_native._USERS)


class Int(int):
    pass


def test_int_keys_leave_int_subclasses_to_python() -> None:
    assert speedups is not None
    assert speedups.int_keys([Int(3)]) is None


@given(
    st.lists(
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)),
        max_size=40,
    )
)
def test_datetime_keys_equal_encode_key(naive: list[datetime]) -> None:
    assert speedups is not None
    values = [value.replace(tzinfo=UTC) for value in naive]
    assert speedups.datetime_keys(values) == python_keys(values)


def test_datetime_keys_at_the_edges() -> None:
    assert speedups is not None
    values = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2000, 2, 29, 12, tzinfo=UTC),
        datetime(2100, 3, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    assert speedups.datetime_keys(values) == python_keys(values)


class Stamp(datetime):
    pass


@pytest.mark.parametrize(
    "values",
    [
        [datetime(2024, 1, 1)],  # naive: the Python path rejects it with a hint
        [datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))],  # another zone: converted there
        [datetime(2024, 1, 1, tzinfo=UTC), 5],
        [Stamp(2024, 1, 1, tzinfo=UTC)],
    ],
    ids=["naive", "zone", "mixed", "subclass"],
)
def test_datetime_keys_leave_what_they_do_not_handle_to_python(values: list[Any]) -> None:
    assert speedups is not None
    assert speedups.datetime_keys(values) is None


LIMIT = MAX_KEY_BYTES - 2


TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


@given(st.lists(TEXT.filter(lambda value: len(value.encode()) <= LIMIT), max_size=40))
def test_text_keys_equal_encode_key(values: list[str]) -> None:
    assert speedups is not None
    assert speedups.text_keys(values, LIMIT) == [encode_key(value) for value in values]


def test_text_keys_at_the_length_limit() -> None:
    assert speedups is not None
    longest = ["a" * LIMIT, "é" * (LIMIT // 2), ""]
    assert speedups.text_keys(longest, LIMIT) == [encode_key(value) for value in longest]
    assert speedups.text_keys(["a" * (LIMIT + 1)], LIMIT) is None
    assert speedups.text_keys(["é" * (LIMIT // 2 + 1)], LIMIT) is None


class Text(str):
    pass


@pytest.mark.parametrize(
    "values",
    [["a\x00b"], ["ok", "\ud800"], ["a", 1], [b"a"], [Text("a")]],
    ids=["nul", "surrogate", "mixed", "bytes", "subclass"],
)
def test_text_keys_leave_what_they_do_not_handle_to_python(values: list[Any]) -> None:
    assert speedups is not None
    assert speedups.text_keys(values, LIMIT) is None


FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALES = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1])


@given(st.lists(FINITE | SCALES, max_size=60))
def test_float_sum_is_exact(values: list[float]) -> None:
    assert speedups is not None
    assert speedups.float_sum(values) == exact_sum(values)


def test_float_sum_cancels_exactly_and_holds_extremes() -> None:
    assert speedups is not None
    largest = 1.7976931348623157e308
    cases = [
        [],
        [0.0, -0.0],
        [largest] * 1000,  # far beyond the largest double: still an exact int
        [-largest] * 1000,
        [largest, 5e-324, -largest],  # only the smallest subnormal is left
        [0.1] * 10 + [-1.0],
        [1e300, 1e-300, -1e300, -1e-300],
    ]
    for values in cases:
        assert speedups.float_sum(values) == exact_sum(values), values


def test_float_sum_of_many_values() -> None:
    assert speedups is not None
    rng = random.Random(11)
    values = [math.ldexp(rng.uniform(-1, 1), rng.randrange(-1074, 1000)) for _ in range(200_000)]
    assert speedups.float_sum(values) == exact_sum(values)


@pytest.mark.parametrize(
    "values", [[1.0, math.nan], [math.inf], [-math.inf, 1.0], [1.0, 2], [True], ["0.5"]], ids=repr
)
def test_float_sum_leaves_what_it_does_not_handle_to_python(values: list[Any]) -> None:
    assert speedups is not None
    assert speedups.float_sum(values) is None


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.integers(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)
        ),
        max_size=6,
    )
)
def test_delta_of_scales_each_value_exactly(values: list[int | float]) -> None:
    assert speedups is not None
    expected = [1, *map(scaled, values), *[int(type(value) is float) for value in values]]
    assert strict(speedups.delta_of(values)) == strict(expected)
    assert strict(speedups.delta_of(tuple(values))) == strict(expected)


def test_delta_of_holds_the_extremes() -> None:
    assert speedups is not None
    largest, smallest = 1.7976931348623157e308, 5e-324
    for value in (0.0, -0.0, smallest, -smallest, 2.2250738585072014e-308, 2.225073858507201e-308, largest):
        assert speedups.delta_of((value, -value)) == [1, scaled(value), scaled(-value), 1, 1], value
    assert speedups.delta_of((smallest,))[1] == 1  # type: ignore[index]  # the unit itself
    assert speedups.delta_of((-(2**300), 0)) == [1, -(2**300) << 1074, 0, 0, 0]


@pytest.mark.parametrize(
    "values", [(True,), (1.0, math.inf), (-math.inf,), (math.nan, 1), ("1",), (1, None)], ids=repr
)
def test_delta_of_leaves_what_it_does_not_handle_to_python(values: tuple[Any, ...]) -> None:
    assert speedups is not None
    assert speedups.delta_of(values) is None


def test_a_non_sequence_raises_type_error() -> None:
    assert speedups is not None
    for kernel in (speedups.int_keys, speedups.datetime_keys, speedups.float_sum, speedups.delta_of):
        with pytest.raises(TypeError):
            kernel(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.text_keys(5, LIMIT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.text_keys(["a"])  # type: ignore[call-arg]


VALUE = st.one_of(FINITE, st.integers(-(2**63), 2**63 - 1))


class Leaf:
    """What a span needs of a leaf: its columns."""

    def __init__(self, cols: Any) -> None:
        self.cols = cols


Span = tuple[Any, ...]


@st.composite
def leaf_spans(draw: st.DrawFn) -> tuple[list[Span], int]:
    """Spans ``(leaf, start, stop, positive)`` over leaves of ``fields`` columns (tuples or lists)."""
    fields = draw(st.integers(0, 3))
    spans: list[Span] = []
    for _ in range(draw(st.integers(0, 4))):
        size = draw(st.integers(0, 12))
        columns = [draw(st.lists(VALUE, min_size=size, max_size=size)) for _ in range(fields)]
        start = draw(st.integers(0, size))
        stop = draw(st.integers(start, size))
        holder = tuple(map(tuple, columns)) if draw(st.booleans()) else columns
        spans.append((Leaf(holder), start, stop, draw(st.booleans()), "ignored"))
    return spans, fields


def reference_span_sums(spans: list[Span], fields: int) -> list[tuple[int, int]]:
    found = []
    for field in range(fields):
        total = floats = 0
        for leaf, start, stop, positive, *_ in spans:
            values = leaf.cols[field][start:stop]
            sign = 1 if positive else -1
            total += sign * sum(map(scaled, values))
            floats += sign * sum(type(value) is float for value in values)
        found.append((total, floats))
    return found


def settled(spans: list[Span], fields: int) -> list[int]:
    """The reference answer of ``settle`` with no rows: the signed count, the sums, the float counts."""
    count = sum((stop - start) * (1 if positive else -1) for _, start, stop, positive, *_ in spans)
    sums = reference_span_sums(spans, fields)
    return [count, *(total for total, _ in sums), *(floats for _, floats in sums)]


@given(leaf_spans())
def test_settle_sums_spans_exactly(case: tuple[list[Span], int]) -> None:
    assert speedups is not None
    spans, fields = case
    zero = [0] * (1 + 2 * fields)
    assert speedups.settle([zero], [], spans, fields) == settled(spans, fields)
    assert speedups.settle([zero], [], tuple(spans), fields) == settled(spans, fields)  # any sequence


@pytest.mark.parametrize(
    "column", [[math.nan, 1.5], [math.inf, 1.5], [2**70, 3], [True, 3], ["a", 3]], ids=repr
)
def test_settle_leaves_a_span_with_a_value_it_does_not_handle_to_python(column: list[Any]) -> None:
    assert speedups is not None
    leaf = Leaf(([0.5, 1], column))
    assert speedups.settle([[0] * 5], [], [(leaf, 0, 2, True)], 2) is None
    found = speedups.settle([[0] * 5], [], [(leaf, 1, 2, False)], 2)  # the value is outside the span
    assert found == settled([(leaf, 1, 2, False)], 2)


@given(leaf_spans(), st.data())
def test_settle_adds_rows_and_spans_exactly(case: tuple[list[Span], int], data: st.DataObject) -> None:
    assert speedups is not None
    spans, fields = case
    width = 1 + 2 * fields
    row = st.tuples(*[st.integers(-(2**1200), 2**1200)] * width) | st.lists(
        st.integers(-(2**70), 2**70), min_size=width, max_size=width
    )
    plus = data.draw(st.lists(row, min_size=1, max_size=4))
    minus = data.draw(st.lists(row, max_size=4))
    expected = [sum(column) for column in zip(*plus, strict=True)]
    for other in minus:
        expected = [mine - theirs for mine, theirs in zip(expected, other, strict=True)]
    expected[0] += sum((stop - start) * (1 if positive else -1) for _, start, stop, positive, _ in spans)
    for field, (total, floats) in enumerate(reference_span_sums(spans, fields)):
        expected[1 + field] += total
        expected[1 + fields + field] += floats
    assert speedups.settle(plus, minus, spans, fields) == expected


def test_settle_leaves_a_read_with_an_unhandled_value_to_python() -> None:
    assert speedups is not None
    leaf = Leaf(([1.5, 2**70],))
    assert speedups.settle([[0, 0, 0]], [], [(leaf, 0, 1, True)], 1) == [1, scaled(1.5), 1]
    assert speedups.settle([[0, 0, 0]], [], [(leaf, 0, 2, True)], 1) is None


@pytest.mark.parametrize(
    ("spans", "fields", "error"),
    [
        ([("no columns", 0, 0, True)], 1, AttributeError),
        ([(Leaf("text"), 0, 0, True)], 1, TypeError),
        ([(Leaf(([1.0],)), 0, 2, True)], 1, IndexError),
        ([(Leaf(([1.0],)), 1, 0, True)], 1, IndexError),
        # a leaf of another number of fields: a node of another aggregate (see the descents' checks)
        ([(Leaf(([1.0],)), 0, 1, True)], 2, CorruptDatabaseError),
        ([(Leaf(([1.0], [2.0])), 0, 1, True)], 1, CorruptDatabaseError),
        ([(Leaf(([1.0],)), 0, 1)], 1, TypeError),
        ([[Leaf(([1.0],)), 0, 1, True]], 1, TypeError),
        ([(Leaf(("abc",)), 0, 1, True)], 1, TypeError),
        (5, 1, TypeError),
        ([], -1, ValueError),
    ],
)
def test_settle_refuses_malformed_spans(spans: Any, fields: int, error: type[Exception]) -> None:
    assert speedups is not None
    with pytest.raises(error):
        speedups.settle([[0] * (1 + 2 * max(fields, 0))], [], spans, fields)


def test_settle_refuses_rows_of_another_width() -> None:
    assert speedups is not None
    with pytest.raises(ValueError):
        speedups.settle([[0, 0]], [], [], 1)
    with pytest.raises(TypeError):
        speedups.settle((0, 0, 0), [], [], 1)  # type: ignore[arg-type]


class Keyed:
    """What bisect needs of a leaf: its keys, whether it may still change, a slot for the image, and
    its value columns (none)."""

    leaf = True
    cols = ()

    def __init__(self, keys: Any, dirty: bool) -> None:
        self.keys = keys
        self.dirty = dirty
        self._blob: bytes | bool | None = None


@given(
    st.lists(st.binary(max_size=12), max_size=70, unique=True), st.lists(st.binary(max_size=13), max_size=20)
)
def test_bisect_equals_the_bisect_module(keys: list[bytes], probes: list[bytes]) -> None:
    assert speedups is not None
    keys.sort()
    committed, dirty = Keyed(tuple(keys), False), Keyed(list(keys), True)
    for probe in [*probes, *keys]:
        for right, reference in ((True, bisect_right), (False, bisect_left)):
            expected = reference(keys, probe)
            assert speedups.bisect(committed, probe, right) == expected
            assert speedups.bisect(dirty, probe, right) == expected
    assert dirty._blob is None  # a node that may still change keeps no image
    assert isinstance(committed._blob, bytes) == bool(probes or keys)  # built by the second search


def test_a_committed_node_gets_its_search_image_on_its_second_search() -> None:
    assert speedups is not None
    node = Keyed((b"a", b"c", b"e"), False)
    assert speedups.bisect(node, b"c", True) == 2 and node._blob is False  # searched in its keys
    assert speedups.bisect(node, b"d", False) == 2 and isinstance(node._blob, bytes)
    assert speedups.bisect(node, b"a", False) == 0 and speedups.bisect(node, b"f", True) == 3


def test_an_internal_node_gets_its_search_image_on_its_first_search() -> None:
    """Internal nodes are few and every descent passes through them: one searched once already has
    its image, so that a range sum right after a write replaced it reads its rows from the image
    instead of building all of them in Python (Node.rows)."""
    assert speedups is not None
    node = Node.internal_from(7, [b"", b"m"], [1, 2], [[3, 6 << 1074, 3], [2, 1 << 1074, 0]])
    node.freeze()
    assert speedups.bisect(node, b"n", True) == 2 and isinstance(node._blob, bytes)
    assert node._rows is None  # the sums come from the image
    dirty = node.copy(8)
    assert speedups.bisect(dirty, b"a", True) == 1 and dirty._blob is None  # may still change


TIED = st.binary(max_size=12).map(lambda raw: bytes(byte % 2 for byte in raw))
"""Keys over a two-letter alphabet: many share their first 8 bytes, or are prefixes of each other,
or end in zero bytes (which the blob's zero-padded 8-byte prefixes cannot tell apart)."""


@given(st.lists(TIED, max_size=70, unique=True), st.lists(TIED, max_size=20))
def test_bisect_with_keys_that_tie_on_their_first_eight_bytes(keys: list[bytes], probes: list[bytes]) -> None:
    assert speedups is not None
    keys.sort()
    committed = Keyed(tuple(keys), False)
    for probe in [*probes, *keys, *(key + b"\x00" for key in keys), *(key[:-1] for key in keys)]:
        assert speedups.bisect(committed, probe, True) == bisect_right(keys, probe)
        assert speedups.bisect(committed, probe, False) == bisect_left(keys, probe)


def test_bisect_refuses_what_is_not_a_node_of_bytes() -> None:
    assert speedups is not None
    with pytest.raises(TypeError):
        speedups.bisect(Keyed((b"a",), False), "a", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.bisect(Keyed((b"a", "b"), False), b"a", True)
    with pytest.raises(TypeError):
        speedups.bisect(Keyed([b"a", 2], True), b"b", True)
    with pytest.raises(AttributeError):
        speedups.bisect(object(), b"a", True)
    for blob in (
        b"\x00",
        b"\x00" * 8,
        (400).to_bytes(4, "little") + b"\x00" * 4,
        bytes([8, 0, 0, 0, 99, 0, 0, 0]),  # an unknown kind
        # one key whose prefix ties with b"a"'s, and offsets beyond the image
        bytes([1, 0, 0, 0, 1, 0, 0, 0])
        + (0x61 << 56).to_bytes(8, sys.byteorder)
        + (99).to_bytes(4, sys.byteorder) * 2,
    ):
        damaged = Keyed((b"a",), False)
        damaged._blob = blob
        with pytest.raises(TypeError):
            speedups.bisect(damaged, b"a", True)


class Computed:
    """A leaf whose columns are built anew on every access (nothing else holds them)."""

    @property
    def cols(self) -> tuple[tuple[float, ...]]:
        return (tuple(float(value) for value in range(50)),)


def test_settle_holds_columns_that_only_it_references() -> None:
    assert speedups is not None
    spans: list[Span] = [(Computed(), 10, 40, True), (Computed(), 0, 5, False)]
    assert (
        speedups.settle([[0, 0, 0]], [], spans, 1)
        == settled(spans, 1)
        == [30 - 5, *reference_span_sums(spans, 1)[0]]
    )


def test_settle_takes_exact_types_only() -> None:
    assert speedups is not None
    leaf = Leaf(([1.0, 2.0],))
    for span in [(leaf, 0, 2, 1), (leaf, 0.0, 2, True), (leaf, 0, True, True)]:
        with pytest.raises(TypeError):
            speedups.settle([[0, 0, 0]], [], [span], 1)
    with pytest.raises(TypeError):
        speedups.settle([[0, 0, 0.5]], [], [], 1)


# ------------------------------------------------------------------ node encoding

SCALAR = (
    st.binary(max_size=300)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from(
        [*EDGES, 2**64 - 1, 2**32, 2**32 - 1, 65535, 65536, -32, -33, -128, -129, -32768, -32769]
    )
    | st.floats(allow_nan=True, allow_infinity=True)
)


@given(st.integers(0, 127), st.lists(st.lists(SCALAR, max_size=40) | st.tuples(SCALAR, SCALAR), max_size=20))
def test_pack_node_is_msgpack_byte_for_byte(head: int, parts: list[Any]) -> None:
    assert speedups is not None
    assert speedups.pack_node(head, tuple(parts)) == msgpack.packb([head, *parts], use_bin_type=True)


def test_pack_node_at_the_size_boundaries_of_arrays_and_bins() -> None:
    assert speedups is not None
    parts = (list(range(70_000)), [b"a"] * 15, [b"b"] * 16, [b"c" * 65_535, b"d" * 65_536], [])
    assert speedups.pack_node(2, parts) == msgpack.packb([2, *parts], use_bin_type=True)
    many = tuple([[1]] * 20)  # more than 15 parts: an array16 header
    assert speedups.pack_node(1, many) == msgpack.packb([1, *many], use_bin_type=True)


@pytest.mark.parametrize(
    "part",
    [[2**64], [-(2**63) - 1], [True], [None], ["text"], [[1]], [Int(3)], [bytearray(b"x")], "abc"],
    ids=repr,
)
def test_pack_node_leaves_what_it_does_not_handle_to_python(part: Any) -> None:
    assert speedups is not None
    assert speedups.pack_node(1, (part,)) is None


def test_pack_node_refuses_malformed_arguments() -> None:
    assert speedups is not None
    for arguments in ((1, [[1]]), ("1", ([1],)), (1,), (128, ([1],)), (-1, ([1],))):
        with pytest.raises((TypeError, ValueError)):
            speedups.pack_node(*arguments)


@given(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=70, unique=True), st.data())
def test_encode_node_is_the_same_with_and_without_the_kernel(keys: list[bytes], data: st.DataObject) -> None:
    keys.sort()
    values = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    cols = [data.draw(st.lists(values, min_size=len(keys), max_size=len(keys))) for _ in range(2)]
    nodes = [
        Node(1, True, keys, cols, dirty=True),
        Node(2, True, keys, cols, list(range(len(keys))), dirty=True),  # a pending node
        Node.internal_from(
            3, keys, list(range(len(keys))), [delta_of((a, b)) for a, b in zip(*cols, strict=True)]
        ),
    ]
    for node in nodes:
        built = encode_node(node)
        with pure_python():
            assert encode_node(node) == built


# ------------------------------------------------------------------ merging into stored leaves

LEAF_VALUE = (
    st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([*EDGES, 2**64 - 1, 2**32, 65535, 65536, -32, -33, -129, -32769])
    | st.floats(allow_nan=False, allow_infinity=False)
)
ENTRY = st.binary(min_size=1, max_size=300)


def merge_leaf(
    data: bytes,
    entries: list[bytes],
    lo: int,
    hi: int,
    cols: list[list[Any]],
    limit: int,
    target: int | None = None,
) -> Any:
    """``merge_children`` over a parent of one leaf child: what it gives for that leaf."""
    assert speedups is not None
    rows = speedups.merge_children(
        [b""], [7], entries, lo, hi, cols, limit, limit if target is None else target, {7: data}.get
    )
    assert [row[:4] for row in rows] == [(0, lo, hi, 7)]
    return rows[0][4]


def merged_leaf(
    keys: list[bytes], cols: list[list[Any]], new: list[bytes], new_cols: list[list[Any]]
) -> bytes:
    """What encode_node writes for the leaf holding both sets of entries (the reference)."""
    rows = sorted(
        zip([*keys, *new], *[[*old, *more] for old, more in zip(cols, new_cols, strict=True)], strict=True)
    )
    columns = [[row[1 + field] for row in rows] for field in range(len(cols))]
    return encode_node(Node(1, True, [row[0] for row in rows], columns, dirty=True))


@given(st.lists(ENTRY, min_size=1, max_size=40, unique=True), st.integers(0, 3), st.integers(0, 3), st.data())
def test_merge_leaf_writes_what_encode_node_writes(
    entries: list[bytes], fields: int, pad: int, data: st.DataObject
) -> None:
    """A stored leaf and a sorted slice of new entries merge into the bytes of the merged leaf."""
    split = data.draw(st.integers(0, len(entries) - 1))
    stored, new = sorted(entries[:split]), sorted(entries[split:])
    cols = [
        data.draw(st.lists(LEAF_VALUE, min_size=len(stored), max_size=len(stored))) for _ in range(fields)
    ]
    new_cols = [data.draw(st.lists(LEAF_VALUE, min_size=len(new), max_size=len(new))) for _ in range(fields)]
    leaf = encode_node(Node(1, True, stored, cols, dirty=True))
    batch = [b"\x00"] * pad + new + [b"\xff" * 301]  # the slice sits inside a longer run
    batch_cols = [[0] * pad + column + [0] for column in new_cols]
    merged = merge_leaf(leaf, batch, pad, pad + len(new), batch_cols, len(entries))
    assert merged == merged_leaf(stored, cols, new, new_cols)
    if len(entries) > 1:  # one entry too many: the leaf is cut into even pieces of at most target
        target = data.draw(st.integers(1, len(entries) - 1))
        pieces = merge_leaf(leaf, batch, pad, pad + len(new), batch_cols, len(entries) - 1, target)
        rows = sorted(zip(stored + new, *[a + b for a, b in zip(cols, new_cols, strict=True)], strict=True))
        count = -(-len(rows) // target)
        cuts = [len(rows) * piece // count for piece in range(count + 1)]
        expected = []
        for begin, end in itertools.pairwise(cuts):
            part = rows[begin:end]
            columns = [[row[1 + field] for row in part] for field in range(fields)]
            encoded = encode_node(Node(1, True, [row[0] for row in part], columns, dirty=True))
            expected.append((part[0][0], encoded, summarize(len(part), columns)))
        assert pieces == [expected[0][1], *expected[1:]]


@given(st.lists(ENTRY, min_size=1, max_size=40, unique=True), st.data())
def test_merge_leaf_names_the_first_entry_already_stored(entries: list[bytes], data: st.DataObject) -> None:
    """A new entry equal to a stored one: its index in the batch, whatever the leaf's size limit."""
    assert speedups is not None
    stored = sorted(data.draw(st.lists(st.sampled_from(entries), min_size=1, unique=True)))
    new = sorted(data.draw(st.lists(st.sampled_from(entries), min_size=1, unique=True)))
    leaf = encode_node(Node(1, True, stored, [[1.5] * len(stored)], dirty=True))
    first = next((index for index, entry in enumerate(new) if entry in stored), None)
    for limit in (0, len(stored) + len(new)):
        answer = merge_leaf(leaf, new, 0, len(new), [[7] * len(new)], limit)
        if first is not None:
            assert answer == first
        elif limit:
            assert type(answer) is bytes
        else:
            assert answer is None


def test_merge_leaf_at_the_size_boundaries_of_arrays_and_bins() -> None:
    """Array headers of 15/16 and 65,535/65,536 entries, bins of 255/256 and 65,535/65,536 bytes."""
    assert speedups is not None
    for stored, new in ((14, 1), (15, 1), (7, 9), (65_000, 536), (65_535, 1)):
        old = [(2 * index).to_bytes(4, "big") for index in range(stored)]
        more = [(2 * index + 1).to_bytes(4, "big") for index in range(new)]  # between the stored ones
        cols = [list(range(stored)), [0.5] * stored]
        new_cols = [list(range(-new, 0)), [2.0**64] * new]
        leaf = encode_node(Node(1, True, old, cols, dirty=True))
        merged = merge_leaf(leaf, more, 0, new, new_cols, stored + new)
        assert merged == merged_leaf(old, cols, more, new_cols)
    for size in (254, 255, 256, 65_535, 65_536):
        leaf = encode_node(Node(1, True, [b"a" * size], [[1]], dirty=True))
        merged = merge_leaf(leaf, [b"b" * size], 0, 1, [[2]], 2)
        assert merged == merged_leaf([b"a" * size], [[1]], [b"b" * size], [[2]])


def test_merge_leaf_leaves_what_it_does_not_handle_to_python() -> None:
    """Another layout, another field count, a value pack_node leaves to Python, truncated or damaged
    bytes: None, and the decoded path takes the leaf (and reports the damage)."""
    assert speedups is not None
    keys = [b"a", b"c", b"e"]
    leaf = encode_node(Node(1, True, keys, [[1, 2.5, -3]], dirty=True))
    assert type(merge_leaf(leaf, [b"b"], 0, 1, [[4]], 8)) is bytes
    pending = Node(1, True, keys, [[1, 2, 3]], dirty=True)
    pending.pending = True
    internal = Node.internal_from(1, keys, [1, 2, 3], [delta_of((value,)) for value in (1, 2, 3)])
    for other in (encode_node(pending), encode_node(internal), msgpack.packb([1, ["a"], [1]])):
        assert merge_leaf(other, [b"b"], 0, 1, [[4]], 8) is None
    assert merge_leaf(leaf, [b"b"], 0, 1, [[4], [5]], 8) is None  # two fields, one stored
    for value in (2**64, -(2**63) - 1, True, None, "4", b"4", Int(4)):
        assert merge_leaf(leaf, [b"b"], 0, 1, [[value]], 8) is None
    for cut in range(len(leaf)):
        assert merge_leaf(leaf[:cut], [b"b"], 0, 1, [[4]], 8) is None
    assert merge_leaf(leaf + b"\x00", [b"b"], 0, 1, [[4]], 8) is None
    for value in (math.inf, math.nan):  # a split sums its pieces: not these (validated away before)
        assert merge_leaf(leaf, [b"f"], 0, 1, [[value]], 3, 2) is None
    assert type(merge_leaf(leaf, [b"f"], 0, 1, [[math.inf]], 4)) is bytes  # no split: packed as given
    assert merge_leaf(leaf, [b"f"], 0, 1, [[4]], 3, 0) is None  # no fill target to cut to
    damaged = encode_node(Node(1, True, keys, [[1, -3, math.inf]], dirty=True))  # "e" goes to the 2nd piece
    assert merge_leaf(damaged, [b"f"], 0, 1, [[4]], 3, 2) is None
    assert merge_leaf(leaf.replace(b"\xcb", b"\xc1"), [b"b"], 0, 1, [[4]], 8) is None
    for value in (math.nan, math.inf):  # stored, only damage makes them: the decode reports it
        stored = encode_node(Node(1, True, keys, [[1.5, value, 2.5]], dirty=True))
        assert merge_leaf(stored, [b"b"], 0, 1, [[4]], 8) is None
        assert speedups.leaf_image(stored) is None
    assert leaf[2] == 0x93  # the keys' array header: claiming 2**31 keys, it must not be believed
    assert merge_leaf(leaf[:2] + b"\xdd\x7f\xff\xff\xff" + leaf[3:], [b"b"], 0, 1, [[4]], 8) is None


def _leaf(keys: list[bytes], cols: list[list[Any]]) -> bytes:
    return encode_node(Node(1, True, keys, cols, dirty=True))


@given(st.lists(ENTRY, min_size=1, max_size=40, unique=True), st.integers(0, 3), st.data())
def test_leaf_edit_writes_what_encode_node_writes(
    entries: list[bytes], fields: int, data: st.DataObject
) -> None:
    """One entry removed from a stored leaf, or given new values: the bytes ``encode_node`` writes
    for the leaf so changed, the entry's old values as the decode makes them, and the new count; an
    entry the leaf does not hold gives None."""
    assert speedups is not None
    entries.sort()
    size = len(entries)
    cols = [data.draw(st.lists(LEAF_VALUE, min_size=size, max_size=size)) for _ in range(fields)]
    leaf = _leaf(entries, cols)
    at = data.draw(st.integers(0, size - 1))
    old = decode_node(leaf, 1)
    stored = tuple(column[at] for column in old.cols)
    removed = speedups.leaf_edit(leaf, entries[at], None, fields)
    rest = [column[:at] + column[at + 1 :] for column in cols]
    assert strict(removed) == strict((_leaf(entries[:at] + entries[at + 1 :], rest), stored, size - 1))
    new = tuple(data.draw(LEAF_VALUE) for _ in range(fields))
    updated = speedups.leaf_edit(leaf, entries[at], new, fields)
    changed = [[*column[:at], value, *column[at + 1 :]] for column, value in zip(cols, new, strict=True)]
    assert strict(updated) == strict((_leaf(entries, changed), stored, size))
    absent = data.draw(ENTRY.filter(lambda entry: entry not in entries))
    assert speedups.leaf_edit(leaf, absent, None, fields) is None
    assert speedups.leaf_edit(leaf, absent, new, fields) is None


def test_leaf_edit_at_the_size_boundaries_of_arrays_and_bins() -> None:
    """A removal that shrinks an array header from 16 to 15 or from 65,536 to 65,535 entries, and
    edits of keys in bins of 255/256 and 65,535/65,536 bytes."""
    assert speedups is not None
    for size in (1, 16, 17, 65_536):
        keys = [index.to_bytes(4, "big") for index in range(size)]
        cols = [list(range(size)), [0.5] * size]
        leaf = _leaf(keys, cols)
        for at in {0, size // 2, size - 1}:
            rest = [column[:at] + column[at + 1 :] for column in cols]
            made = speedups.leaf_edit(leaf, keys[at], None, 2)
            assert made == (_leaf(keys[:at] + keys[at + 1 :], rest), (at, 0.5), size - 1)
            made = speedups.leaf_edit(leaf, keys[at], (2**64 - 1, -1), 2)
            changed = [
                [*cols[0][:at], 2**64 - 1, *cols[0][at + 1 :]],
                [*cols[1][:at], -1, *cols[1][at + 1 :]],
            ]
            assert made == (_leaf(keys, changed), (at, 0.5), size)
    for length in (254, 255, 256, 65_535, 65_536):
        keys = [b"a" * length, b"b" * length]
        leaf = _leaf(keys, [[1, 2]])
        assert speedups.leaf_edit(leaf, keys[1], None, 1) == (_leaf(keys[:1], [[1]]), (2,), 1)
        assert speedups.leaf_edit(leaf, keys[0], (7,), 1) == (_leaf(keys, [[7, 2]]), (1,), 2)
    assert speedups.leaf_edit(_leaf([], [[]]), b"a", None, 1) is None  # an empty leaf holds nothing


def test_leaf_edit_leaves_what_it_does_not_handle_to_python() -> None:
    """Another layout or field count, a value pack_node leaves to Python, truncated or damaged bytes:
    False, and the decoded path takes the edit (and reports the damage); bad arguments raise."""
    assert speedups is not None
    keys = [b"a", b"c", b"e"]
    leaf = _leaf(keys, [[1, 2.5, -3]])
    assert speedups.leaf_edit(leaf, b"c", (4,), 1) == (_leaf(keys, [[1, 4, -3]]), (2.5,), 3)
    pending = Node(1, True, keys, [[1, 2, 3]], dirty=True)
    pending.pending = True
    internal = Node.internal_from(1, keys, [1, 2, 3], [delta_of((value,)) for value in (1, 2, 3)])
    for other in (encode_node(pending), encode_node(internal), msgpack.packb([1, ["a"], [1]])):
        assert speedups.leaf_edit(other, b"a", None, 1) is False
    assert speedups.leaf_edit(leaf, b"c", None, 2) is False  # two fields, one stored
    assert speedups.leaf_edit(leaf, b"c", None, 0) is False
    for value in (2**64, -(2**63) - 1, True, None, "4", b"4", Int(4), 4.0j):
        assert speedups.leaf_edit(leaf, b"c", (value,), 1) is False
    for cut in range(len(leaf)):
        assert speedups.leaf_edit(leaf[:cut], b"c", None, 1) is False
    assert speedups.leaf_edit(leaf + b"\x00", b"c", None, 1) is False
    assert speedups.leaf_edit(leaf.replace(b"\xcb", b"\xc1"), b"c", None, 1) is False
    for value in (math.nan, math.inf):  # stored, only damage makes them: the decode reports it
        damaged = _leaf(keys, [[1.5, value, 2.5]])
        assert speedups.leaf_edit(damaged, b"a", None, 1) is False
    assert leaf[2] == 0x93  # the keys' array header: claiming 2**31 keys, it must not be believed
    assert speedups.leaf_edit(leaf[:2] + b"\xdd\x7f\xff\xff\xff" + leaf[3:], b"c", None, 1) is False
    for arguments, error in (
        ((leaf, b"c", None), TypeError),
        ((bytearray(leaf), b"c", None, 1), TypeError),
        ((leaf, "c", None, 1), TypeError),
        ((leaf, b"c", [4], 1), TypeError),
        ((leaf, b"c", None, 1.0), TypeError),
        ((leaf, b"c", (4, 5), 1), ValueError),
        ((leaf, b"c", None, -1), ValueError),
    ):
        with pytest.raises(error):
            speedups.leaf_edit(*arguments)


@given(
    st.lists(st.binary(max_size=6), min_size=1, max_size=12, unique=True),
    st.lists(st.binary(min_size=1, max_size=6), max_size=40, unique=True),
    st.data(),
)
def test_merge_children_splits_a_batch_as_the_python_plan_does(
    fences: list[bytes], entries: list[bytes], data: st.DataObject
) -> None:
    """Each touched child gets the slice the Python plan gives it (``bisect_right`` on the fences,
    ``bisect_left`` on the batch), with its id and its merge; a child with no stored bytes, None."""
    assert speedups is not None
    fences = [b"", *sorted(fence for fence in fences if fence)]
    entries.sort()
    lo = data.draw(st.integers(0, len(entries)))
    hi = data.draw(st.integers(lo, len(entries)))
    kids = [100 + index for index in range(len(fences))]
    leaves = {kid: encode_node(Node(kid, True, [], [[]], dirty=True)) for kid in kids[::2]}  # odd ones: None
    rows = speedups.merge_children(fences, kids, entries, lo, hi, [[1] * len(entries)], 64, 64, leaves.get)
    expected = []
    at, child = lo, 0
    while at < hi:
        child = bisect_right(fences, entries[at], child) - 1
        stop = bisect_left(entries, fences[child + 1], at + 1, hi) if child + 1 < len(fences) else hi
        merged = None
        if kids[child] in leaves:
            merged = encode_node(Node(1, True, entries[at:stop], [[1] * (stop - at)], dirty=True))
        expected.append((child, at, stop, kids[child], merged))
        at = stop
    assert rows == expected


def test_merge_children_reports_every_leaf_after_a_duplicate() -> None:
    """A duplicate in one leaf does not end the merge: the plan needs the leaves after it (for
    ``existing="skip"``) and raises a conflict in order (for ``"error"``)."""
    assert speedups is not None
    leaves = {
        1: encode_node(Node(1, True, [b"b"], [], dirty=True)),
        2: encode_node(Node(2, True, [b"x"], [], dirty=True)),
    }
    rows = speedups.merge_children((b"", b"m"), (1, 2), [b"b", b"c", b"y"], 0, 3, [], 8, 8, leaves.get)
    assert rows == [(0, 0, 2, 1, 0), (1, 2, 3, 2, encode_node(Node(2, True, [b"x", b"y"], [], dirty=True)))]


def test_merge_children_reads_a_transactions_source_as_stored_reads_it() -> None:
    """``stored`` as a write transaction's source (``stored_source``): a dirty child has no stored
    bytes (None, left to the Python code), a child given in stored form is read from that dict, any
    other from the table by its key (``node_key``: the 8 bytes of its slot, whatever its version);
    the rows are those the callable ``stored`` gives."""
    assert speedups is not None
    leaves = {
        kid: encode_node(Node(kid, True, [bytes([97 + kid])], [[kid]], dirty=True)) for kid in (1, 2, 3)
    }
    assert node_key(2**40 + 3) == (3).to_bytes(8, "big")  # version 16 of slot 3
    table = {node_key(2**40 + 3): leaves[3]}
    source: tuple[dict[int, Any], dict[int, bytes], Any] = ({1: "dirty"}, {2: leaves[2]}, table.get)
    fences, kids = (b"", b"c", b"e"), (1, 2, 2**40 + 3)
    entries = [b"b1", b"c1", b"e1"]
    rows = speedups.merge_children(fences, kids, entries, 0, 3, [[7, 8, 9]], 8, 8, source)
    merged = [
        encode_node(Node(2, True, [b"c", b"c1"], [[2, 8]], dirty=True)),
        encode_node(Node(3, True, [b"d", b"e1"], [[3, 9]], dirty=True)),
    ]
    assert rows == [(0, 0, 1, 1, None), (1, 1, 2, 2, merged[0]), (2, 2, 3, 2**40 + 3, merged[1])]
    stored = {2: leaves[2], 2**40 + 3: leaves[3]}.get
    assert speedups.merge_children(fences, kids, entries, 0, 3, [[7, 8, 9]], 8, 8, stored) == [
        (0, 0, 1, 1, None),
        *rows[1:],
    ]
    table.clear()  # a missing node: None, as the callable's None
    assert speedups.merge_children(fences, kids, entries, 2, 3, [[7, 8, 9]], 8, 8, source) == [
        (2, 2, 3, 2**40 + 3, None)
    ]
    for bad in (({}, {}), ({}, [], table.get), ([], {}, table.get), ({}, {}, None), ({}, {}, table.get, 1)):
        with pytest.raises(TypeError):
            speedups.merge_children(fences, kids, entries, 0, 3, [[7, 8, 9]], 8, 8, bad)
    with pytest.raises(OverflowError):  # a node id outside the 8-byte keys
        speedups.merge_children([b""], [-1], [b"a"], 0, 1, [[1]], 8, 8, ({}, {}, table.get))


SPAN_VALUE = st.integers(-(2**70), 2**70) | st.sampled_from([0.5, 0.25, 1.5, 3.0, -2.0, 1e300, 5e-324])


@given(st.integers(1, 3), st.data())
def test_add_spans_adds_what_add_columns_adds(fields: int, data: st.DataObject) -> None:
    """A batch's spans added to a dirty parent's columns (``_apply_merged``): each child's summary
    grows by its span's summary, as ``add_columns(children, run.deltas(...))`` grows it; when an
    amount does not fit a column's shift the kernel returns False and changes nothing."""
    assert speedups is not None
    children = data.draw(st.integers(1, 6))
    summaries = [delta_of(tuple(data.draw(SPAN_VALUE) for _ in range(fields))) for _ in range(children)]
    size = data.draw(st.integers(1, 12))
    cols = [data.draw(st.lists(SPAN_VALUE, min_size=size, max_size=size)) for _ in range(fields)]
    run = _Run([bytes([index]) for index in range(size)], cols, "skip")
    cuts = sorted(data.draw(st.lists(st.integers(0, size), min_size=2, max_size=2 * children)))
    touched = sorted(data.draw(st.sets(st.integers(0, children - 1), max_size=len(cuts) - 1)))
    rows = [(child, lo, hi, 0, b"") for child, lo, hi in zip(touched, cuts, cuts[1:], strict=False)]
    node = Node.internal_from(1, [b""] * children, list(range(children)), summaries)
    reference = node.copy(2)
    before = [node.child(index) for index in range(children)], list(node.shifts)
    reference.add_columns([row[0] for row in rows], run.deltas([(row[1], row[2]) for row in rows]))
    expected = [reference.child(index) for index in range(children)]
    for row in rows:
        assert expected[row[0]] == vadd(before[0][row[0]], run.delta(row[1], row[2]))
    if speedups.add_spans(node, rows, run.prefix_sums()):
        assert [node.child(index) for index in range(children)] == expected
        assert node.shifts == before[1]
    else:
        assert ([node.child(index) for index in range(children)], node.shifts) == before
        assert reference.shifts != before[1]  # the Python code had to rescale a column


def test_add_spans_refuses_what_it_does_not_handle() -> None:
    assert speedups is not None
    node = Node.internal_from(1, [b"", b"m"], [1, 2], [delta_of((1,)), delta_of((2,))])
    run = _Run([b"a", b"b"], [[3, 4]], "skip")
    prefixes = run.prefix_sums()
    assert speedups.add_spans(node, [(1, 0, 2, 0, b"")], prefixes) is True
    assert node.child(1) == vadd(delta_of((2,)), run.delta(0, 2))
    assert speedups.add_spans(node, [(2, 0, 2)], prefixes) is False  # no such child
    assert speedups.add_spans(node, [(0, 0, 2)], prefixes[:1]) is False  # another column count
    frozen = node.copy(3)
    frozen.freeze()
    assert speedups.add_spans(frozen, [(0, 0, 1)], prefixes) is False  # tuples: a committed node
    for rows, error in (
        ([(0, 0)], TypeError),
        ([[0, 0, 1]], TypeError),
        ([(0, 1, 0)], ValueError),
        ([(0, -1, 1)], ValueError),
        ([(0, 0, 5)], TypeError),  # beyond the prefix sums
    ):
        with pytest.raises(error):
            speedups.add_spans(node, rows, prefixes)
    with pytest.raises(TypeError):
        speedups.add_spans(node, (), prefixes)
    with pytest.raises(TypeError):  # sums that would run Python code: refused before any is read
        speedups.add_spans(node, [(0, 0, 1)], [(shift, [Int(x) for x in sums]) for shift, sums in prefixes])
    odd = node.copy(4)
    odd.cols[1][0] = Int(odd.cols[1][0])  # a column item that is not an exact int: left to Python
    assert speedups.add_spans(odd, [(0, 0, 1)], prefixes) is False
    assert odd.child(0) == node.child(0)


def test_merge_children_refuses_malformed_arguments() -> None:
    assert speedups is not None
    leaf = encode_node(Node(1, True, [b"a"], [[1]], dirty=True))
    stored = {1: leaf}.get
    good = ([b""], [1], [b"b"], 0, 1, [[4]], 8, 8, stored)
    assert [row[:4] for row in speedups.merge_children(*good)] == [(0, 0, 1, 1)]
    for arguments, error in (
        (good[:-1], TypeError),
        (([b""], [1], (b"b",), 0, 1, [[4]], 8, 8, stored), TypeError),
        (([b""], [1], [b"b"], 0, 1, [[4]], 8, 8, None), TypeError),
        (([b""], [1, 2], [b"b"], 0, 1, [[4]], 8, 8, stored), TypeError),
        (([], [], [b"b"], 0, 1, [[4]], 8, 8, stored), TypeError),
        (([""], [1], [b"b"], 0, 1, [[4]], 8, 8, stored), TypeError),
        (([b""], [1], ["b"], 0, 1, [[4]], 8, 8, stored), TypeError),
        (([b""], [1], [b"b"], 0, 1, [(4,)], 8, 8, stored), TypeError),
        (([b""], [1], [b"b"], 0, 1, [[]], 8, 8, stored), TypeError),
        (([b""], [1], [b"b"], 0, 1, [[4]], 8, 8, {1: bytearray(leaf)}.get), TypeError),
        (([b""], [1], [b"b"], 0, 2, [[4]], 8, 8, stored), IndexError),
        (([b""], [1], [b"b"], 1, 0, [[4]], 8, 8, stored), IndexError),
        (([b""], [1], [b"b"], -1, 1, [[4]], 8, 8, stored), ValueError),
        (([b""], [1], [b"b"], 0, 1, [[4]], -1, 8, stored), ValueError),
        (([b""], [1], [b"b"], 0, 1, [[4]], 8, -1, stored), ValueError),
        (([b""], [1], [b"b"], 0, 1, [[4]], 8, 8, {}.__getitem__), KeyError),  # stored() raised
    ):
        with pytest.raises(error):
            speedups.merge_children(*arguments)


# ------------------------------------------------------------------ internal nodes, wide sums

LIMB_EDGES = [
    0,
    1,
    -1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    -(2**64),
    2**126 - 1,
    2**126,
    -(2**126),
    -(2**126) - 1,
    2**189,
    -(2**189) - 1,
    2**63 * 3,
    -(2**64) + 1,
]
BIG = st.integers(-(2**300), 2**300) | st.sampled_from(LIMB_EDGES) | st.integers(-(2**70), 2**70)


def _wide_node(sums: list[list[int]], size: int) -> Node:
    keys = [b""] + [bytes([0x30, index % 256, index // 256]) for index in range(1, size)]
    nfields = len(sums)
    cols = [
        [2**40 + index for index in range(size)],
        *sums,
        *([[index % 3 for index in range(size)]] * nfields),
    ]
    return Node(9, False, keys, cols, list(range(7, 7 + size)), [0] * (1 + 2 * nfields), dirty=True)


@given(st.integers(1, 40), st.integers(0, 9), st.data())
def test_pack_internal_is_the_python_encoding_byte_for_byte(
    size: int, nfields: int, data: st.DataObject
) -> None:
    """Plain or wide, with any number of limbs, any number of columns (more than 15 parts, an
    array16 header) and children: the kernel writes the bytes the Python code writes."""
    sums = [data.draw(st.lists(BIG, min_size=size, max_size=size)) for _ in range(nfields)]
    node = _wide_node(sums, size)
    built = encode_node(node)
    with pure_python():
        assert encode_node(node) == built
    assert [list(col) for col in decode_node(built, 9).cols] == node.cols


@given(st.lists(BIG, min_size=1, max_size=30))
def test_join_limbs_is_the_python_join(column: list[int]) -> None:
    """A column split into limbs by the Python encoder is joined back by the kernel, exactly."""
    assert speedups is not None
    limbs = _limbs(column)
    assert speedups.join_limbs(tuple(map(tuple, limbs))) == tuple(_join_limbs(limbs)) == tuple(column)


def test_join_limbs_at_every_depth() -> None:
    assert speedups is not None
    rng = random.Random(11)
    for bits in (64, 126, 127, 189, 500, 4000):
        column = [rng.randrange(-(2**bits), 2**bits) for _ in range(20)] + [2**bits - 1, -(2**bits)]
        limbs = _limbs(column)
        assert speedups.join_limbs(limbs) == tuple(column), bits


@pytest.mark.parametrize(
    "limbs",
    [
        ([1, 2], [3]),  # columns of unequal lengths
        ([1], [-1]),  # a lower limb below 0
        ([1], [2**63]),  # a lower limb beyond 63 bits
        ([2**63], [1]),  # a top limb beyond int64
        ([1.0], [1]),
        ([True], [1]),
        "ab",
        [[0]] * 65,  # more limbs than the kernel takes
    ],
    ids=repr,
)
def test_join_limbs_leaves_what_it_does_not_handle_to_python(limbs: Any) -> None:
    assert speedups is not None
    assert speedups.join_limbs(limbs) is None


def test_pack_internal_with_many_children_and_limbs() -> None:
    size = 70_000 // 1000 * 300  # more than 65,535 values over all limbs, an array16 per limb
    node = _wide_node([[(-1) ** index * 2 ** (index % 400) for index in range(size)]], size)
    built = encode_node(node)
    with pure_python():
        assert encode_node(node) == built


@pytest.mark.parametrize("value", [1.5, True, None, Int(3)], ids=repr)
def test_pack_internal_leaves_what_it_does_not_handle_to_python(value: Any) -> None:
    assert speedups is not None
    node = _wide_node([[2**100, 1]], 2)
    parts = (node.keys, node.kids, node.shifts, node.cols[0], [2**100, value], node.cols[2])
    assert speedups.pack_internal(parts, 1) is None
    assert speedups.pack_internal((node.keys, node.kids, node.shifts, "abc", [1, 2], [1, 1]), 1) is None


def _committed(node: Node) -> Node:
    """``node`` as a transaction leaves it once committed: frozen, with its stored bytes."""
    committed = decode_node(encode_node(node), node.id)
    assert committed._packed is not None
    return committed


def _packed(node: Node) -> bytes:
    """The Python code's bytes for a node (the full pack, which pack_internal equals)."""
    with pure_python():
        return encode_node(node)


@given(st.integers(1, 30), st.integers(0, 3), st.data())
def test_repack_internal_writes_pack_internal_bytes_or_leaves_the_node_to_it(
    size: int, nfields: int, data: st.DataObject
) -> None:
    """A committed node's copy, changed in a few numbers (a child's id, its count and sums, within
    a limb count or across one, to or from the plain form), is repacked from the stored bytes into
    exactly what a full pack writes, or left to the full pack (None); never anything else. A copy
    changed only in ids and counts is always repacked."""
    assert speedups is not None
    sums = [data.draw(st.lists(BIG, min_size=size, max_size=size)) for _ in range(nfields)]
    origin = _committed(_wide_node(sums, size))
    copy = origin.copy(10)
    assert copy._origin is origin
    for _ in range(data.draw(st.integers(0, 4))):
        index = data.draw(st.integers(0, size - 1))
        column = data.draw(st.integers(-1, len(copy.cols) - 1))
        if column < 0:
            copy.kids[index] = data.draw(st.integers(0, 2**64 - 1))
        else:
            copy.cols[column][index] += data.draw(BIG if 1 <= column <= nfields else st.integers(-5, 2**40))
    repacked = speedups.repack_internal(copy, origin, origin._packed, nfields)
    if repacked is not None:
        assert repacked == _packed(copy)
    assert encode_node(copy) == _packed(copy)
    copy.kids[0] = 2**33 + 1
    copy.cols[0][-1] += 1
    plain_copy = origin.copy(11)
    plain_copy.kids[-1] += 300
    plain_copy.cols[0][0] += 70_000
    assert speedups.repack_internal(plain_copy, origin, origin._packed, nfields) == _packed(plain_copy)
    unchanged = origin.copy(12)
    assert speedups.repack_internal(unchanged, origin, origin._packed, nfields) is origin._packed


def test_repack_internal_leaves_other_changes_and_other_bytes_to_the_full_pack() -> None:
    """A changed key or shift, a child more or less, more than 16 changed numbers, and stored bytes
    that are not the layout it expects (cut short, another kind, a key where a number goes) all give
    None, so that the caller packs the node in full."""
    assert speedups is not None
    origin = _committed(_wide_node([[2**100 + index for index in range(30)]], 30))
    packed = origin._packed
    assert packed is not None

    def changed(change: Any) -> Node:
        copy = origin.copy(10)
        copy.kids[3] += 1  # a change repack_internal handles, so only ``change`` can refuse it
        change(copy)
        return copy

    refused = [
        changed(lambda copy: copy.keys.__setitem__(5, copy.keys[5] + b"\x00")),
        changed(lambda copy: copy.shifts.__setitem__(1, 7)),
        changed(lambda copy: copy.insert_child(4, b"\x30\x04\x00\x01", 99, [1, 2**100, 0])),
        changed(lambda copy: [copy.cols[0].__setitem__(index, 5) for index in range(17)]),
        changed(lambda copy: copy.kids.__setitem__(6, 2**64)),  # beyond msgpack's ints
    ]
    for copy in refused:
        assert speedups.repack_internal(copy, origin, packed, 1) is None
    copy = changed(lambda copy: None)
    assert speedups.repack_internal(copy, origin, packed, 1) == _packed(copy)
    two = _committed(_wide_node([[2**100, 5], [7, 9]], 2))  # the sums take 2 limbs and 1
    swapped = two.copy(10)
    swapped.cols[1][0] = 3  # now 1 limb
    swapped.cols[2][1] = 2**100  # and 2: as many arrays, split otherwise
    assert speedups.repack_internal(swapped, two, two._packed, 2) is None
    plain = _committed(_wide_node([[index for index in range(30)]], 30))
    assert plain._packed is not None
    for stored in (
        packed[:-1],
        packed[:40],
        packed + b"\x00",
        plain._packed,
        packed.replace(b"\xc4\x03", b"\xd9\x03", 1),
    ):
        assert speedups.repack_internal(copy, origin, stored, 1) is None
    with pytest.raises(TypeError):
        speedups.repack_internal(copy, origin, bytearray(packed), 1)
    with pytest.raises(ValueError):
        speedups.repack_internal(copy, origin, packed, -1)


def test_writes_of_single_items_store_what_a_full_pack_writes(tmp_path: Any) -> None:
    """Scattered inserts, updates and deletes, one per transaction, through tiny nodes (so that
    splits and merges come too): every stored internal node is byte for byte the full pack of its
    contents, and the tree checks out."""
    db = tallytree.open(tmp_path / "db", durable=False)
    events = db.aggregate("events", values=("cost", "tokens"), node_size=4)
    rng = random.Random(3)
    live: list[tuple[int, str]] = []
    for step in range(600):
        with db.write() as tx:
            if live and step % 4 == 0:
                key, item_id = live.pop(rng.randrange(len(live)))
                events.delete(tx, key, item_id)
            elif live and step % 4 == 1:
                key, item_id = rng.choice(live)
                events.upsert(tx, key, item_id, (rng.random() * 2.0 ** rng.randrange(-60, 60), step))
            else:
                key, item_id = rng.randrange(10**6), f"e{step}"
                events.insert(tx, key, item_id, (rng.random(), rng.randrange(10**9)))
                live.append((key, item_id))
    with db.read() as tx:
        assert tallytree.check(tx, events) == []
        internal = 0
        for key, data in tx.kv.scan(NODES, b"", None):
            node = decode_node(data, int.from_bytes(key, "big"))
            if not node.leaf:
                internal += 1
                assert data == _packed(node)
        assert internal > 10
    db.close()


def test_pack_internal_refuses_malformed_arguments() -> None:
    assert speedups is not None
    for arguments in (
        ([[1]], 0),
        ((), 0),
        (([], [], [], [1]), 1),
        (([], [], [], []), "1"),
        (([], [], [], []), -1),
    ):
        with pytest.raises((TypeError, ValueError)):
            speedups.pack_internal(*arguments)


# ------------------------------------------------------------------ descents


class _Abort(Exception):
    """Raised to abort a write transaction."""


def _hits_of(db: Any, read: Any) -> int:
    before = db.cache_info()["hits"]
    with db.read() as tx:
        read(tx)
    hits: int = db.cache_info()["hits"] - before
    return hits


@given(st.lists(st.integers(-50, 250), min_size=2, max_size=6))
def test_descents_in_c_answer_and_count_cache_hits_as_the_python_ones(bounds: list[int]) -> None:
    """rank, rank_range and the range sums' descents, in a read transaction (nodes taken from the
    shared cache) and in a write transaction (dirty nodes first), give the Python answers; the cache
    hits are counted alike."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("cost", "n"), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key // 3, key, (key / 7, key)) for key in range(0, 200, 2)])
    low, high = min(bounds), max(bounds)

    def reads(tx: Any) -> Any:
        return (
            agg.count(tx, ge=low, lt=high),
            agg.count(tx, gt=low, le=high),
            agg.rank(tx, bounds[0]),
            agg.rank(tx, bounds[1], reverse=True),
            agg.totals(tx, ge=low, lt=high),
            agg.totals(tx, lt=bounds[0]),
            agg.totals(tx, ge=bounds[1]),
            agg.at(tx, bounds[0] % 100),
            agg.at(tx, -1 - bounds[1] % 100),
        )

    with db.read() as tx:
        expected = reads(tx)
    for _ in range(3):  # nodes searched once, then with search images built, then through them
        with db.read() as tx:
            assert reads(tx) == expected
    with pure_python(), db.read() as tx:
        assert reads(tx) == expected
    with pytest.raises(_Abort), db.write() as tx:  # dirty nodes: C descents fetch every node
        agg.insert(tx, key=1000, id=-1, values=(0.5, 1))
        changed = reads(tx)
        with pure_python():
            assert reads(tx) == changed
        raise _Abort  # abort the transaction
    assert _hits_of(db, reads) > 0
    with pure_python():
        python_hits = _hits_of(db, reads)
    assert _hits_of(db, reads) == python_hits


FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
"""Floats of every magnitude (subnormals to 1e300): node-local sums of a few hundred bits, shifts
from 0 to ~2000."""
INTS = st.integers(-(2**63), 2**63 - 1)
"""Values are int64 (their sums are not): raw int64 leaf columns."""


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), FLOATS, INTS, FLOATS | INTS), min_size=1, max_size=60),
    st.lists(
        st.tuples(st.none() | st.integers(-5, 65), st.none() | st.integers(-5, 65)), min_size=1, max_size=6
    ),
)
def test_range_totals_equal_the_python_sums(
    rows: list[tuple[int, float, int, float | int]], windows: list[tuple[int | None, int | None]]
) -> None:
    """totals through range_totals (one-sided, two-sided and inverted ranges) equal the pure Python
    answer: with nodes searched once, with their images built, through the images, and in a write
    transaction (dirty nodes, read through their attributes). A float field of every magnitude, an
    int field beyond int64 at times, a field mixing both."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("f", "i", "mixed"), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key, at, values) for at, (key, *values) in enumerate(rows)])

    def reads(tx: Any) -> list[Any]:
        answers = []
        for low, high in windows:
            bounds = {name: value for name, value in (("ge", low), ("lt", high)) if value is not None}
            answers.append(agg.totals(tx, **bounds))
        return answers

    with pure_python(), db.read() as tx:
        expected = reads(tx)
    for _ in range(3):
        with db.read() as tx:
            assert reads(tx) == expected
    with pytest.raises(_Abort), db.write() as tx:
        agg.insert(tx, key=30, id=-1, values=(0.5, 1, 2.5))
        changed = reads(tx)
        with pure_python():
            assert reads(tx) == changed
        raise _Abort


def test_range_descents_in_phases_answer_as_python_in_a_deep_tree(tmp_path: Any) -> None:
    """count, totals, rank and the range ranks of a deep LMDB tree (nodes of 4: six levels) through
    the node table and the search images, where the two cuts' descents run in phases (see
    ``prefetch_child``): they part at every depth, from the root to the leaves' parents, and end in
    leaves on either side of the cut's shorter span. Every answer equals the pure Python one and the
    model's."""
    rng = random.Random(40)
    keys = sorted(rng.sample(range(100_000), 3_000))
    rows = [
        (key, at, (rng.uniform(-1e6, 1e6), rng.randrange(-(2**40), 2**40))) for at, key in enumerate(keys)
    ]
    db = tallytree.open(tmp_path / "deep", durable=False)
    agg = db.aggregate("a", values=("f", "i"), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, rows)
    windows = [(None, None)] + [tuple(sorted(rng.sample(range(-5, 100_005), 2))) for _ in range(150)]
    windows += [(key, key + width) for key in rng.sample(keys, 50) for width in (1, 40, 400)]

    def reads(tx: Any) -> list[Any]:
        answers: list[Any] = []
        for low, high in windows:
            bounds = {name: value for name, value in (("ge", low), ("lt", high)) if value is not None}
            answers += [agg.count(tx, **bounds), agg.totals(tx, **bounds)]
            answers.append(agg.rank(tx, low) if low is not None else None)
        return answers

    with pure_python(), db.read() as tx:
        expected = reads(tx)
    for _ in range(3):  # the first reads build the images; the last go through them and the table
        with db.read() as tx:
            assert reads(tx) == expected
    for (low, high), count, totals, _rank in zip(windows, *[iter(expected)] * 3, strict=True):
        inside = [row for row in rows if (low is None or row[0] >= low) and (high is None or row[0] < high)]
        assert count == totals.count == len(inside)
        assert totals.f == math.fsum(row[2][0] for row in inside)
        assert totals.i == sum(row[2][1] for row in inside)
    db.close()


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 30),
    st.lists(st.tuples(FLOATS, INTS), min_size=1, max_size=7),
    st.lists(
        st.tuples(
            st.sampled_from(["ge", "gt"]),
            st.none() | st.integers(-2, 42),
            st.sampled_from(["le", "lt"]),
            st.none() | st.integers(-2, 42),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_range_totals_sum_the_pending_node_in_the_same_call(
    stored: int, appended: list[tuple[float, int]], windows: list[tuple[str, int | None, str, int | None]]
) -> None:
    """A tree's pending node (time-ordered inserts, one per transaction) handed to range_totals with
    the nodes: its part between the cuts is found and summed there, with cuts before, among, on and
    after the pending entries, and in a tree of no nodes (``stored`` 0), to what the pure Python code
    gives; the kernel is used whenever a cut falls among the pending entries."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("f", "i"), node_size=8)
    with db.write() as tx:
        agg.insert_many(tx, [(key, "s", (key / 3, key)) for key in range(0, stored)])
    for offset, values in enumerate(appended):  # keys stored .. stored + 6, pending (8 fill a leaf)
        with db.write() as tx:
            agg.insert(tx, stored + offset, "p", values)

    def reads(tx: Any) -> list[Any]:
        return [
            strict(agg.totals(tx, **{low_name: low, high_name: high}))
            for low_name, low, high_name, high in windows
            if low is not None or high is not None
        ]

    with db.read() as tx:
        tree = agg._reader(tx, None)
        assert tree.pending_summary is not None and tree.pending_summary[0] == len(appended)
        assert (tree.nodes.root is None) == (stored == 0)
    with pure_python(), db.read() as tx:
        expected = reads(tx)
    calls = []
    original = NodeTree.range_values_with

    def counted(self: NodeTree, *args: Any) -> Any:
        found = original(self, *args)
        calls.append(found is not None)
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NodeTree, "range_values_with", counted)
        for _ in range(2):  # the pending node as stored, then decoded
            with db.read() as tx:
                assert reads(tx) == expected
    among = any(
        bound is not None and stored <= bound < stored + len(appended)
        for _, low, _, high in windows
        for bound in (low, high)
    )
    assert all(calls) and (not among or calls)


ROUNDING_CASES = [
    [1.0, 2.0**-53],  # exactly halfway between 1 and its successor: to even, 1.0
    [1.0, 2.0**-53, 2.0**-80],  # just above halfway: up
    [1.0 + 2.0**-52, 2.0**-53],  # halfway from an odd mantissa: up, to even
    [-1.0, -(2.0**-53)],  # the same below zero
    [2.0**53, 1.0],  # halfway at the integers
    [2.0**53, 1.0, 2.0**-1074],  # a sticky bit 1,127 places below
    [5e-324, 5e-324, -1e-323],  # subnormals cancelling to zero
    [5e-324, 1e-320],  # subnormal sums, exact
    [2.2250738585072014e-308, -5e-324],  # just below the smallest normal
    [1.7976931348623157e308, 9.9e291],  # below half an ulp above the largest double: stays finite
    [1.7976931348623157e308, 1e292],  # above it: rounds to infinity, as IEEE addition does
    [-1.7976931348623157e308, -1e292],
    [1e16, 1.0, -1e16],  # cancellation that naive addition gets wrong
    [0.1] * 10,
    [-0.0, -0.0],
    [8.316417288928509e-306],  # 54 to 64 significant bits in units of 2**-1074
    [8.316417288928509e-306, 5e-324],  # the same, rounded
    [-3e-306, 2**-1020, 5e-324],
]


@pytest.mark.parametrize("pending", [False, True], ids=["in the leaves", "pending"])
@pytest.mark.parametrize("values", ROUNDING_CASES, ids=repr)
def test_range_values_round_the_exact_sum_once(values: list[float], pending: bool) -> None:
    """The kernel's values (``range_values``: the sum rounded in C, no big int) equal the Python
    rounding of the exact sum, ties, sticky bits, subnormals and overflow included: with the values
    in the leaves (among zero-valued fillers), and with them pending (time-ordered appends after
    the fillers, added to the same exact sum)."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x", "n"), node_size=4)
    fillers = [(key, "filler", (0.0, 0)) for key in range(-12, 0)]
    rows = [(key, "id", (value, key)) for key, value in enumerate(values)]
    with db.write() as tx:
        agg.insert_many(tx, fillers if pending else fillers + rows)
    with db.write() as tx:
        for key, id_, row in rows if pending else []:
            agg.insert(tx, key, id_, row)
    windows = [(0, len(values)), (0, None), (-12, None), (-5, len(values)), (None, len(values))]

    def reads(tx: Any) -> list[Any]:
        bounded = [{k: v for k, v in (("ge", low), ("lt", high)) if v is not None} for low, high in windows]
        return [strict(agg.totals(tx, **bounds)) for bounds in bounded]

    with db.read() as tx:
        assert (agg._reader(tx, None).pending is not None) == pending
    with pure_python(), db.read() as tx:
        expected = reads(tx)
    for _ in range(3):  # nodes read once, then through their images
        with db.read() as tx:
            assert reads(tx) == expected
    if all(abs(value) < 1e300 for value in values):
        with db.read() as tx:
            assert agg.totals(tx, ge=0).x == math.fsum(values)


def test_range_totals_refuses_an_extra_summary_of_the_wrong_shape() -> None:
    """The extra summary (a tree's pending entries) must be ``[count, S..., F...]`` of ints: another
    width or type raises, and no value is made up."""
    assert speedups is not None
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x",), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key, "id", (1.5,)) for key in range(20)])
    with db.read() as tx:
        tree = agg._reader(tx, None).nodes
        assert tree.root is not None
        node = tree.access.node(tree.root.node_id)
        args = (node, tree.root.summary, encode_key(3), False, None, False, tx.node, tx.shared, 1)
        found = speedups.range_totals(*args, [1, 3 << 1073, 1], True)  # one more item of 1.5
        assert found is not None and found[0] == [18, 27.0]
        with pytest.raises(ValueError, match="width"):
            speedups.range_totals(*args, [1, 2], True)
        with pytest.raises(TypeError):
            speedups.range_totals(*args, [1, 1.5, 1], True)


def test_range_totals_leaves_what_it_cannot_sum_to_python() -> None:
    """Sums beyond the accumulators (~2**2112 units: 2**14 values near the largest float) make the
    kernel answer None; totals then still gives the exact answer, through the Python code."""
    assert speedups is not None
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x",))
    with db.write() as tx:
        agg.insert_many(tx, [(key, key, (1.7e308,)) for key in range(40_000)])
    with db.read() as tx:
        tree = agg._reader(tx, None).nodes
        assert tree.root is not None
        node = tree.access.node(tree.root.node_id)
        # the whole tree's summary, added for a lower bound alone: 2**2113 units
        found = speedups.range_totals(
            node, tree.root.summary, encode_key(5), False, None, False, len, None, 1
        )
        assert found is None
        for _ in range(3):
            answers = [agg.totals(tx, ge=5), agg.totals(tx, ge=5, lt=39_000), agg.totals(tx, lt=20)]
            with pure_python():
                assert [
                    agg.totals(tx, ge=5),
                    agg.totals(tx, ge=5, lt=39_000),
                    agg.totals(tx, lt=20),
                ] == answers
    assert [(totals.count, totals.x) for totals in answers] == [
        (39_995, math.inf),
        (38_995, math.inf),
        (20, math.inf),
    ]


@pytest.mark.parametrize("first_id", [3, 2**64 + 3], ids=["64-bit ids", "wider ids"])
def test_descents_through_images_of_internal_nodes(first_id: int) -> None:
    """An internal node's image holds its cumulative counts and child ids; one whose ids do not fit
    in 64 bits gets an image of its keys alone and is followed through its attributes."""
    assert speedups is not None
    runs = [[b"a", b"c", b"e"], [b"g", b"h"], [b"m", b"p", b"q", b"s"]]
    leaves = {first_id + at: Node(first_id + at, True, tuple(run), ()) for at, run in enumerate(runs)}  # type: ignore[arg-type]
    fences = (b"", b"g", b"m")
    sizes = tuple(len(run) for run in runs)
    root = Node(1, False, fences, (sizes,), tuple(leaves), (0,))  # type: ignore[arg-type]
    everything = sorted(key for run in runs for key in run)
    probes = [b"", b"a", b"b", b"f", b"g", b"ga", b"m", b"n", b"s", b"t"]
    for _ in range(3):  # searched in its keys, then its image built, then through it
        for low in probes:
            rank, _ = speedups.rank(root, low, False, leaves.__getitem__, leaves)
            assert rank == bisect_left(everything, low)
            for high in probes:
                start, stop, _ = speedups.rank_range(root, low, False, high, True, leaves.__getitem__, None)
                assert (start, stop) == (bisect_left(everything, low), bisect_right(everything, high))
        for index, key in enumerate(everything):
            leaf, position, _ = speedups.select(root, index, leaves.__getitem__, leaves)
            assert leaf.keys[position] == key
        for outside in (-1, len(everything)):  # callers stay within the record's count: damage
            with pytest.raises(CorruptDatabaseError, match="fewer entries than its parent counts"):
                speedups.select(root, outside, leaves.__getitem__, leaves)
    image = root._blob
    assert isinstance(image, bytes)
    assert int.from_bytes(image[4:6], sys.byteorder) == (2 if first_id < 2**64 else 3)  # the image's kind


RUNS = [[b"a", b"c", b"e"], [b"g", b"h"], [b"m", b"p", b"q", b"s"]]
"""The keys of three leaves; the descents below cut into the third (``_shape_descents``)."""


def _shaped_leaf(node_id: int, keys: list[bytes], fields: int) -> Node:
    cols = tuple(tuple(float(at + field) for at in range(len(keys))) for field in range(fields))
    return Node(node_id, True, tuple(keys), cols)  # type: ignore[arg-type]  # committed, decoded whole


def _hand_tree(
    fields: int, first_id: int, runs: list[list[bytes]] = RUNS
) -> tuple[Node, dict[int, Node], list[int]]:
    """A committed root (id 1) over leaves of ``runs`` (ids from ``first_id``), every node of
    ``fields`` value fields; with its leaves by id and the tree's summary."""
    leaves = {first_id + at: _shaped_leaf(first_id + at, run, fields) for at, run in enumerate(runs)}
    summaries = [summarize(len(leaf.keys), [list(col) for col in leaf.cols]) for leaf in leaves.values()]
    fences = [b"", *(run[0] for run in runs[1:])]
    root = Node.internal_from(1, fences, list(leaves), summaries)
    root.freeze()
    summary = [sum(column) for column in zip(*summaries, strict=True)]
    return root, leaves, summary


def _shape_descents(
    root: Node, nodes: dict[int, Node], summary: list[int], fields: int, given: bool
) -> dict[str, Any]:
    """Each descent kernel, cutting into the third leaf of ``RUNS`` (its entry 1, b"p"), the tree's
    number of value fields given (range_totals always takes it) or not."""
    assert speedups is not None
    fetch, extra = nodes.__getitem__, (fields,) if given else ()
    return {
        "rank": lambda: speedups.rank(root, b"n", False, fetch, nodes, *extra),
        "rank_range": lambda: speedups.rank_range(root, b"b", False, b"n", True, fetch, nodes, *extra),
        "select": lambda: speedups.select(root, 6, fetch, nodes, True, *extra),
        "find": lambda: speedups.find(root, b"p", fetch, nodes, *extra),
        "range_totals": lambda: speedups.range_totals(
            root, summary, b"b", False, b"n", True, fetch, nodes, fields, None, True
        ),
    }


@pytest.mark.parametrize("first_id", [3, 2**64 + 3], ids=["root image with sums", "root image of keys alone"])
@pytest.mark.parametrize("fields", [0, 1, 2])
@pytest.mark.parametrize("given", [True, False], ids=["fields given", "fields of the root"])
def test_descents_refuse_a_leaf_of_another_number_of_fields(first_id: int, fields: int, given: bool) -> None:
    """A leaf of another aggregate below a root (a damaged child id, or a swapped node record):
    every descent that reaches it raises CorruptDatabaseError naming it, whether the caller gives the
    tree's number of value fields or the root's stands for it; through the leaf's columns (its first
    search), its image, and a root whose image holds no sums (ids beyond 64 bits: its number read
    from its columns). rank, rank_range, select and find answered from the foreign leaf, and
    range_totals raised TypeError or answered when its cut fell at the leaf's end."""
    assert speedups is not None
    root, leaves, summary = _hand_tree(fields, first_id)
    sound = {
        name: descent() for name, descent in _shape_descents(root, leaves, summary, fields, given).items()
    }
    assert sound["rank"][0] == 6 and sound["find"][0] is not None  # a sound tree answers
    for foreign in {fields + 1, max(fields - 1, 0), fields + 2} - {fields}:
        damaged = dict(leaves)
        third = first_id + 2
        damaged[third] = _shaped_leaf(third, RUNS[2], foreign)
        for _ in range(3):  # the leaf searched in its keys, then its image built, then through it
            for descent in _shape_descents(root, damaged, summary, fields, given).values():
                with pytest.raises(CorruptDatabaseError, match=f"node {third} holds {foreign} value field"):
                    descent()


@pytest.mark.parametrize("fields", [0, 1, 2])
def test_descents_given_the_number_of_fields_refuse_a_root_of_another(fields: int) -> None:
    """A whole tree of another aggregate under a root node id (its root's record swapped): consistent
    in itself, so only the number the caller gives tells; every descent raises, naming the root."""
    root, leaves, summary = _hand_tree(fields + 1, 3)
    for descent in _shape_descents(root, leaves, summary, fields, True).values():
        with pytest.raises(
            CorruptDatabaseError, match=f"node 1 holds {fields + 1} value field.* has {fields}"
        ):
            descent()
    for name in ("rank", "rank_range", "select", "find"):  # without it, nothing to compare the root with
        _shape_descents(root, leaves, summary, fields, False)[name]()


@pytest.mark.parametrize(
    "keys", [[b"m", b"p"], [b"m", b"p", b"q", b"r", b"s"], []], ids=["fewer", "more", "none"]
)
def test_descents_refuse_a_leaf_that_holds_another_count_than_its_parent(keys: list[bytes]) -> None:
    """A leaf of the tree's own aggregate that holds another number of entries than its parent counts
    for it (a leaf of another place, or emptied): rank, rank_range, select and range_totals raise
    CorruptDatabaseError naming it, where they answered by mixing the parent's counts and sums with
    the leaf's entries; find reads no counts, and answers from the leaf's keys."""
    assert speedups is not None
    root, leaves, summary = _hand_tree(1, 3)
    damaged = {**leaves, 5: _shaped_leaf(5, keys, 1)}
    for _ in range(3):
        descents = _shape_descents(root, damaged, summary, 1, True)
        for name in ("rank", "rank_range", "select", "range_totals"):
            with pytest.raises(
                CorruptDatabaseError, match=f"node 5 holds {len(keys)} entries where its parent counts 4"
            ):
                descents[name]()
        found = descents["find"]()
        assert (found[0] is None) == (b"p" not in keys)
    # the root leaf of a one-leaf tree: range_totals compares it with the root record's count
    leaf = _shaped_leaf(2, [b"a", b"b"], 1)
    with pytest.raises(CorruptDatabaseError, match="node 2 holds 2 entries where its parent counts 3"):
        speedups.range_totals(leaf, [3, 0, 0], b"b", False, None, False, len, None, 1)


def test_two_descents_refuse_leaves_at_different_depths() -> None:
    """A root whose first child is a leaf and whose second is an internal node (a child id that leads
    to another level of the tree): rank_range and range_totals, whose cuts part at the root and step
    down in turn, raise CorruptDatabaseError when one reaches its leaf a level before the other."""
    assert speedups is not None
    leaves = {3: _shaped_leaf(3, RUNS[0], 1), 4: _shaped_leaf(4, RUNS[1], 1), 5: _shaped_leaf(5, RUNS[2], 1)}
    summaries = {
        at: summarize(len(leaf.keys), [list(col) for col in leaf.cols]) for at, leaf in leaves.items()
    }
    lower = Node.internal_from(10, [b"g", b"m"], [4, 5], [summaries[4], summaries[5]])
    lower.freeze()
    inner = vadd(summaries[4], summaries[5])
    root = Node.internal_from(1, [b"", b"g"], [3, 10], [summaries[3], inner])
    root.freeze()
    nodes: dict[int, Node] = {**leaves, 10: lower}
    summary = vadd(summaries[3], inner)
    for _ in range(3):
        with pytest.raises(CorruptDatabaseError, match="different depths"):
            speedups.rank_range(root, b"b", False, b"n", True, nodes.__getitem__, nodes, 1)
        with pytest.raises(CorruptDatabaseError, match="different depths"):
            speedups.range_totals(root, summary, b"b", False, b"n", True, nodes.__getitem__, nodes, 1)
        # one descent alone cannot tell, and a range inside one child does not part at the root
        assert speedups.rank(root, b"n", False, nodes.__getitem__, nodes, 1)[0] == 6
        assert speedups.rank_range(root, b"h", False, b"n", True, nodes.__getitem__, nodes, 1)[:2] == (4, 6)


@given(
    st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=40, unique=True),
    st.sampled_from(["float", "int", "mixed", "none"]),
    st.data(),
)
def test_select_reads_the_entry_and_values_from_a_leaf_image(
    keys: list[bytes], kind: str, data: st.DataObject
) -> None:
    """With ``item``, select returns the entry and the values of the leaf's image once the leaf has
    one, equal (in type too: -0.0, ints) to the node's own; before that, and for a column that mixes
    ints and floats, it returns the leaf and the position, as without ``item``."""
    assert speedups is not None
    keys.sort()
    size = len(keys)
    floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([-0.0, 5e-324])
    ints = INT64 | st.sampled_from(EDGES)
    column = {"float": floats, "int": ints, "mixed": floats | ints, "none": floats}[kind]
    cols = [
        data.draw(st.lists(column, min_size=size, max_size=size)) for _ in range(0 if kind == "none" else 2)
    ]
    mixed = kind == "mixed" and any(len({type(value) for value in col}) > 1 for col in cols)
    leaf = Node(5, True, tuple(keys), tuple(map(tuple, cols)))  # type: ignore[arg-type]  # committed, decoded whole
    width = 1 + 2 * len(cols)  # the count, then a sum and a float count per field (their values unread)
    root = Node(1, False, (b"",), ((size,), *[(0,)] * (width - 1)), (5,), (0,) * width)  # type: ignore[arg-type]
    nodes = {5: leaf}
    calls = 0
    for _ in range(2):
        for index in range(size):
            found, at, _ = speedups.select(root, index, nodes.__getitem__, nodes, True)
            calls += 1
            expected_values = tuple(col[index] for col in cols)
            if calls == 1 or mixed:  # the leaf's first search marks it, its second builds the image
                assert (found, at) == (leaf, index)
                continue
            assert at is None
            entry, values = found
            assert entry == keys[index]
            assert values == expected_values
            assert [(type(value), math.copysign(1, value)) for value in values] == [
                (type(value), math.copysign(1, value)) for value in expected_values
            ]
    assert isinstance(leaf._blob, bytes)


# ------------------------------------------------------------------ untracked node containers


@given(st.lists(st.binary(min_size=1, max_size=9), min_size=1, max_size=40, unique=True), st.data())
def test_thaw_and_freeze_node_build_what_the_python_code_builds_untracked(
    keys: list[bytes], data: st.DataObject
) -> None:
    """Node.copy and Node.freeze through the kernels: equal lists and tuples, with the same items,
    untracked by the garbage collector; a thawed copy still changes like a list."""
    import gc

    keys.sort()
    values = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    cols = [data.draw(st.lists(values, min_size=len(keys), max_size=len(keys))) for _ in range(3)]
    leaf = Node(1, True, keys, cols, dirty=True)
    internal = Node(2, False, keys, cols, list(range(len(keys))), [0, 5, 0], dirty=True)
    for node in (leaf, internal):
        with pure_python():
            expected = node.copy(7)
            expected.freeze()
        copy = node.copy(7)
        parts = [copy.keys, copy.kids, copy.shifts, copy.cols, *copy.cols]
        assert all(type(part) is list and not gc.is_tracked(part) for part in parts)
        copy.keys.append(b"\xff")  # still a list that changes (and the collector need not see it)
        copy.keys.pop()
        copy.freeze()
        assert not copy.dirty
        for name in ("keys", "kids", "shifts", "cols"):
            assert getattr(copy, name) == getattr(expected, name)
            assert type(getattr(copy, name)) is tuple and not gc.is_tracked(getattr(copy, name))
        assert all(type(col) is tuple and not gc.is_tracked(col) for col in copy.cols)


def test_freeze_moves_only_the_lists_nothing_else_holds() -> None:
    """freeze_node gives a list's items to its tuple when the node is the list's only holder; a list
    that something else also holds is copied and left as it was."""
    import gc

    shared_keys, shared_col = [b"a", b"b"], [1, 2]
    node = Node(1, True, shared_keys, [shared_col, [0.5, 0.25]], dirty=True)  # the holder is the node's
    whole = Node(2, False, [b"a", b"b"], [[7, 8], [9, 10]], [5, 6], [0, 3], dirty=True)
    node.freeze()
    whole.freeze()
    assert shared_keys == [b"a", b"b"] and shared_col == [1, 2]
    assert node.keys == (b"a", b"b") and node.cols == ((1, 2), (0.5, 0.25))
    assert (whole.keys, whole.kids, whole.shifts) == ((b"a", b"b"), (5, 6), (0, 3))
    assert whole.cols == ((7, 8), (9, 10))
    frozen = [node.keys, node.cols, *node.cols, whole.keys, whole.kids, whole.shifts, whole.cols, *whole.cols]
    assert all(type(part) is tuple and not gc.is_tracked(part) for part in frozen)


def test_thaw_keeps_tracking_a_container_that_could_join_a_cycle() -> None:
    import gc

    assert speedups is not None
    odd = Keyed([b"a", [1]], False)  # a list inside keys: not a node's shape, so left tracked
    odd.kids, odd.cols, odd.shifts = (), ([object()],), ()  # type: ignore[attr-defined]
    keys, _, cols, _ = speedups.thaw(odd)
    assert gc.is_tracked(keys) and gc.is_tracked(cols) and gc.is_tracked(cols[0])


# ------------------------------------------------------------------ root records

BIG_MANTISSA = st.integers(-(2**2100), 2**2100)  # written as bin16 once beyond 2,040 bits
SUMMARY_VALUE = (
    st.integers(-(2**63), 2**63 - 1)
    | st.builds(lambda mantissa, shift: mantissa << shift, st.integers(-(2**70), 2**70), st.integers(0, 1100))
    | st.builds(lambda mantissa, shift: mantissa << shift, BIG_MANTISSA, st.integers(0, 9))
    | st.sampled_from([*LIMB_EDGES, 3 << 1074, -(5 << 1000), (2**63 - 1) << 7, -(2**63) << 9, 2**63 << 9])
)


PENDING_NODE = st.builds(
    lambda keys, count: (sorted(keys), [list(range(len(keys)))] * count),
    st.sets(st.binary(min_size=1, max_size=40), min_size=1, max_size=400),  # bin8 to bin16 nodes
    st.integers(0, 3),
)


def _drawn_root(
    node_id: int, height: int, summary: list[int], pending: Any, data: st.DataObject, fit: bool = True
) -> Any:
    """A root record of these fields: no pending node (``pending`` 0), one named by id (an int), or
    one held (``PENDING_NODE``'s keys and columns). With ``fit``, its count and pending totals are
    made ones a record can hold; else they are any summary values, as drawn."""
    from tallytree._btree import Root

    pending_summary = data.draw(st.lists(SUMMARY_VALUE, min_size=len(summary), max_size=len(summary)))
    if fit:
        summary[0] = data.draw(st.integers(1, 2**40))  # the count
        pending_summary[0] = data.draw(st.integers(1, summary[0]))
    node = None
    if type(pending) is tuple:
        node = Node(0, True, pending[0], pending[1], dirty=True)
        node.pending = True
        pending = 0
    held = node is not None or pending != 0
    return Root(node_id, height, summary, pending, pending_summary if held else None, None, node)


@given(
    st.integers(0, 2**40),
    st.integers(0, 9),
    st.lists(SUMMARY_VALUE, min_size=1, max_size=9),
    st.integers(0, 2**40) | PENDING_NODE,
    st.data(),
)
def test_pack_root_is_the_python_encoding_byte_for_byte(
    node_id: int, height: int, summary: list[int], pending: Any, data: st.DataObject
) -> None:
    """Plain ints, [mantissa, shift] pairs at the int64 edges, and mantissas too big for int64 (written
    as bytes, bin8 and bin16); no pending node, a format 2 one named by id, or one held by the record
    (its bytes a bin8 or bin16): the kernel writes every one, the same bytes as the Python code, and
    they decode back (when their fields can be a record's; else they are refused)."""
    from tallytree._txn import decode_root, encode_root

    assert speedups is not None
    for fit in (False, True):  # any values are packed alike; fitting ones also round-trip
        if fit:
            height = 0 if node_id == 0 else max(height, 1)  # a record decodes only if they agree
        root = _drawn_root(node_id, height, list(summary), pending, data, fit)
        node, reference = root.pending_node, root.pending
        if node is not None:
            reference = encode_node(node)
        built = speedups.pack_root(node_id, height, root.summary, reference, root.pending_summary)
        assert built is not None
        assert encode_root(root) == built
        with pure_python():
            assert encode_root(root) == built
        if not fit:  # read, or refused with the typed error, never another exception
            with contextlib.suppress(CorruptDatabaseError):
                decode_root(built)
    summary, pending = root.summary, root.pending
    decoded = decode_root(built)
    assert (decoded.node_id, decoded.height, decoded.summary, decoded.pending) == (
        node_id,
        height,
        summary,
        pending,
    )
    assert decoded.pending_summary == root.pending_summary
    assert decoded.packed_pending == (encode_node(node) if node is not None else None)


def test_pack_root_leaves_what_it_does_not_handle_to_python() -> None:
    assert speedups is not None
    assert speedups.pack_root(1, 1, [1, 2**9000 + 1], 0, None) is None  # a mantissa beyond 8,176 bits
    assert speedups.pack_root(1, 1, (1, 2), 0, None) is None  # not a list
    assert speedups.pack_root(2**64, 1, [1], 0, None) is None
    assert speedups.pack_root(1, 1, [1.5], 0, None) is None
    with pytest.raises(TypeError):
        speedups.pack_root(1, 1, [1])  # type: ignore[call-arg]


def test_descent_kernels_refuse_malformed_arguments() -> None:
    """Wrong argument counts or types raise TypeError; a fetch that is not callable or a cache that is
    not a dict too; an object that is not a node fails on its missing attributes, never crashes."""
    assert speedups is not None
    node = Keyed((b"a", b"b"), False)
    calls = [
        lambda: speedups.rank(node, "a", True, len, None),  # type: ignore[arg-type]
        lambda: speedups.rank(node, b"a", True, 3, None),
        lambda: speedups.rank(node, b"a", True, len, [1]),  # type: ignore[arg-type]
        lambda: speedups.rank_range(node, b"a", False, "b", False, len, None),  # type: ignore[arg-type]
        lambda: speedups.range_totals(node, [0], b"a", False, b"b", False, len, None),  # type: ignore[call-arg]
        lambda: speedups.range_totals(node, [0], None, False, None, False, len, None, 0),  # no cut at all
        lambda: speedups.range_totals(node, [0], "a", False, None, False, len, None, 0),  # type: ignore[arg-type]
        lambda: speedups.range_totals(node, [0], b"a", False, None, False, 3, None, 0),
        lambda: speedups.range_totals(node, [0], b"a", False, None, False, len, None, 0, None),  # type: ignore[call-arg]
        lambda: speedups.one_key(1),  # type: ignore[call-arg]
        lambda: speedups.one_key(1, True),  # type: ignore[call-arg]
        lambda: speedups.one_key(1, True, None),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    with pytest.raises(AttributeError):
        speedups.rank(object(), b"a", True, len, None)
    for call in (
        lambda: speedups.select(node, 0, len),  # type: ignore[call-arg]
        lambda: speedups.select(node, "0", len, None),  # type: ignore[arg-type]
        lambda: speedups.select(node, 0, len, [1]),  # type: ignore[arg-type]
        lambda: speedups.select(node, 0, len, None, True, 0, 1),  # type: ignore[call-arg]
        lambda: speedups.select(node, 0, len, None, True, "0"),  # type: ignore[arg-type]
        lambda: speedups.rank(node, b"a", True, len, None, 0, 1),  # type: ignore[call-arg]
        lambda: speedups.rank(node, b"a", True, len, None, None),  # type: ignore[arg-type]
        lambda: speedups.rank_range(node, b"a", False, b"b", False, len, None, 0, 1),  # type: ignore[call-arg]
        lambda: speedups.find(node, b"a", len, None, 0, 1),  # type: ignore[call-arg]
        lambda: speedups.find(node, b"a", len, None, 1.0),  # type: ignore[arg-type]
        lambda: speedups.find(node, b"a", len),  # type: ignore[call-arg]
        lambda: speedups.find(node, "a", len, None),  # type: ignore[arg-type]
        lambda: speedups.find(node, b"a", 3, None),
        lambda: speedups.find(node, b"a", len, [1]),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError):
            call()


# ------------------------------------------------------------------ decoding entries

COMMON_KEYS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63) + 1, 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.datetimes(timezones=st.just(UTC))
    | st.datetimes(timezones=st.sampled_from([timezone(timedelta(hours=-11)), timezone(timedelta(hours=14))]))
)
"""What the kernel decodes: lone None, bools, int64 ints (but -2**63), floats, str, bytes and aware
datetimes (stored as instants: decoded in UTC)..."""
NUMBERS = st.integers(-(2**63) + 1, 2**63 - 1) | st.floats(allow_nan=False)
COMMON_KEYS = st.one_of(COMMON_KEYS, st.lists(NUMBERS | COMMON_KEYS, max_size=4).map(tuple))
"""... and tuples of those, such as (status, created_at) (half the examples; numbers often, whose
types are written after the tuple's body, in order)."""
OTHER_KEYS = (
    st.integers().filter(lambda value: not -(2**63) < value < 2**63)
    | st.tuples(st.integers(), st.tuples(st.text(max_size=5)))
    | st.tuples(st.integers(2**63, 2**70), st.text(max_size=5))
)
"""What it leaves to the Python decoder: bigger ints, nested tuples."""
IDS = st.text(max_size=20) | st.integers(-(2**63) + 1, 2**63 - 1) | st.binary(max_size=20)


def _decoded(entry: bytes) -> tuple[Any, Any]:
    with pure_python():
        return keys_module.decode_entry(entry)


def _same(found: Any, expected: Any) -> bool:
    """Equal, with equal types all the way down (1 and 1.0 are distinct keys), float signs and time
    zones."""
    if type(found) is not type(expected):
        return False
    if type(found) is tuple:
        return len(found) == len(expected) and all(map(_same, found, expected))
    if type(found) is float:
        return found == expected and math.copysign(1, found) == math.copysign(1, expected)
    if type(found) is datetime:
        return found == expected and found.tzinfo is expected.tzinfo
    return bool(found == expected)


def _entry(key: Any, item_id: Any) -> bytes:
    """The entry of (key, id); examples too large for a key are rejected."""
    try:
        return encode_key(key) + encode_id(item_id)
    except KeyTooLargeError:
        reject()


@given(COMMON_KEYS, IDS)
def test_decode_entry_decodes_the_common_entries_as_python_does(key: Any, item_id: Any) -> None:
    assert speedups is not None
    entry = _entry(key, item_id)
    found = speedups.decode_entry(entry, MAX_KEY_BYTES)
    assert found is not None
    assert _same(found, _decoded(entry))
    assert keys_module.decode_entry(entry) == found


@given(OTHER_KEYS, IDS)
def test_decode_entry_leaves_other_keys_to_python(key: Any, item_id: Any) -> None:
    assert speedups is not None
    entry = _entry(key, item_id)
    assert speedups.decode_entry(entry, MAX_KEY_BYTES) is None
    assert keys_module.decode_entry(entry) == _decoded(entry) == (key, item_id)


@given(COMMON_KEYS, IDS, st.data())
def test_decode_entry_of_damaged_bytes_is_none_or_what_python_decodes(
    key: Any, item_id: Any, data: st.DataObject
) -> None:
    """A byte changed, dropped or added anywhere: the kernel gives None (the Python decoder then
    decodes the bytes or raises CorruptDatabaseError) or exactly the Python answer."""
    assert speedups is not None
    entry = bytearray(_entry(key, item_id))
    at = data.draw(st.integers(0, 3) | st.integers(0, len(entry)))  # a number's head and exponent often
    change = data.draw(st.sampled_from(["set", "drop", "add"]))
    byte = data.draw(st.integers(0, 255))
    if change == "set" and at < len(entry):
        entry[at] = byte
    elif change == "drop" and at < len(entry):
        del entry[at]
    else:
        entry.insert(at, byte)
    _agree(bytes(entry))


def _agree(entry: bytes) -> None:
    """The kernel gives None, or what the Python decoder gives; None when that one raises."""
    assert speedups is not None
    found = speedups.decode_entry(entry, MAX_KEY_BYTES)
    try:
        expected = _decoded(entry)
    except CorruptDatabaseError:
        assert found is None
        return
    assert found is None or _same(found, expected)


def _non_minimal(body: bytes) -> bytes:
    """A finite number's body with its exponent written one byte longer than it needs."""
    flip = 0xFF if body[0] == 0x31 else 0
    head = body[1] ^ flip
    longer = head + 1 if head >= 0x80 else head - 1
    return bytes([body[0], longer ^ flip, flip]) + body[2:]


@pytest.mark.parametrize("value", [5, -5, 2.5, -2.5, 1e-300, -1e300, 2**62, 0.1, 3, -(2**40)], ids=repr)
def test_decode_entry_refuses_numbers_that_are_not_canonical(value: Any) -> None:
    """Written by hand: an exponent one byte too long, an int suffix on a fraction, a float suffix on
    an int beyond 53 bits, a third suffix byte; the kernel leaves each to the Python decoder."""
    key = encode_key(value)
    body, suffix = key[:-1], key[-1]
    tail = encode_id("a")
    for entry in (
        _non_minimal(body) + bytes([suffix]) + tail,
        body + bytes([1 - suffix]) + tail,
        body + b"\x02" + tail,
    ):
        _agree(entry)
    assert speedups is not None
    assert speedups.decode_entry(_non_minimal(body) + bytes([suffix]) + tail, MAX_KEY_BYTES) is None


def test_decode_entry_respects_the_size_limit_and_refuses_bad_arguments() -> None:
    assert speedups is not None
    entry = encode_key("abcdef") + encode_id(1)
    assert speedups.decode_entry(entry, MAX_KEY_BYTES) == ("abcdef", 1)
    assert speedups.decode_entry(entry, 5) is None  # the key's 8 bytes exceed the limit
    with pytest.raises(TypeError):
        speedups.decode_entry(bytearray(entry), MAX_KEY_BYTES)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        speedups.decode_entry(entry, -1)


def test_decode_entry_leaves_datetimes_beyond_the_range_to_python() -> None:
    """Eight bytes one microsecond past datetime.max (or before datetime.min): the kernel gives None
    and the Python decoder reports the corruption."""
    assert speedups is not None
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for instant, step in ((datetime.max.replace(tzinfo=UTC), 1), (datetime.min.replace(tzinfo=UTC), -1)):
        micros = (instant - epoch) // timedelta(microseconds=1)
        inside = encode_key(instant) + encode_id("a")
        assert speedups.decode_entry(inside, MAX_KEY_BYTES) == (instant, "a")
        outside = b"\x60" + (micros + step + 2**63).to_bytes(8, "big") + encode_id("a")
        assert speedups.decode_entry(outside, MAX_KEY_BYTES) is None
        with pytest.raises(CorruptDatabaseError):
            _decoded(outside)


# ------------------------------------------------------------------ the node table


class Cached:
    """A node as the node cache sees one: an id, and a search image or not."""

    def __init__(self, node_id: Any, blob: Any = None) -> None:
        self.id = node_id
        self._blob = blob


TABLE_IDS = st.integers(1, 120) | st.sampled_from([2**32, 2**63, 2**64 - 1])
TABLE_OPS = st.lists(
    st.tuples(st.sampled_from(["put", "put", "put", "discard", "get", "clear"]), TABLE_IDS), max_size=400
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([-1, 0, 1, 2, 5, 12, 30, 1000]), TABLE_OPS)
def test_node_table_behaves_as_the_python_node_dict(capacity: int, ops: list[tuple[str, int]]) -> None:
    """NodeTable (open addressing, a ring of puts for first-in first-out eviction) against its
    pure-Python twin: the same nodes kept, evicted and forgotten after any sequence of puts (of new
    and cached ids, and of ids discarded before), discards, lookups and clears."""
    from tallytree._store import NodeDict

    assert speedups is not None
    table, model = speedups.NodeTable(capacity), NodeDict(capacity)
    for op, node_id in ops:
        if op == "put":
            node = Cached(node_id)
            table.put(node)
            model.put(node)  # type: ignore[arg-type]
        elif op == "discard":
            table.discard(node_id)
            model.discard(node_id)
        elif op == "clear":
            table.clear()
            model.clear()
        assert table.get(node_id) is model.get(node_id)
        assert len(table) == len(model)
    assert all(table.get(node_id) is node for node_id, node in model.nodes.items())
    assert table.capacity == capacity


def _home(node_id: int, slots: int) -> int:
    """The slot NodeTable probes first for an id (see ``slot_of`` in _speedups.c)."""
    return ((node_id * 0x9E3779B97F4A7C15) % 2**64 >> 20) % slots


def test_node_table_keeps_runs_of_colliding_ids_reachable() -> None:
    """Ids that share their first slot form one probe run; removing any of them (discard or eviction)
    shifts the rest back, and every remaining id stays reachable, also when the run wraps around
    the end of the table."""
    assert speedups is not None
    ids = [node_id for node_id in range(1, 20_000) if _home(node_id, 64) in (5, 6)][:24]
    neighbours = [node_id for node_id in range(1, 20_000) if _home(node_id, 64) == 7][:4]
    wrapping = [node_id for node_id in range(1, 20_000) if _home(node_id, 64) in (62, 63)][:8]
    rng = random.Random(3)
    runs = [(wrapping + neighbours[:2] + ids[:4], 5), (ids + neighbours, 14)]  # 14 ids: a run wraps to slot 0
    for (chosen, removed), _ in itertools.product(runs, range(20)):
        table = speedups.NodeTable(1000)  # 64 slots for these
        nodes = {node_id: Cached(node_id) for node_id in chosen}
        order = list(nodes)
        rng.shuffle(order)
        for node_id in order:
            table.put(nodes[node_id])
        gone = set(rng.sample(order, removed))
        for node_id in gone:
            table.discard(node_id)
        for node_id in order:
            assert table.get(node_id) is (None if node_id in gone else nodes[node_id])
    fifo = speedups.NodeTable(4)  # eviction removes from the middle of a run too
    for node_id in ids:
        fifo.put(Cached(node_id))
        assert fifo.get(node_id) is not None
    assert [fifo.get(node_id) is not None for node_id in ids] == [False] * 20 + [True] * 4


def test_node_table_evicts_in_order_of_the_puts_that_stand() -> None:
    """A node discarded then put again is as new: its earlier put does not evict it."""
    assert speedups is not None
    table = speedups.NodeTable(3)
    for node_id in (1, 2, 3):
        table.put(Cached(node_id))
    table.discard(1)
    table.put(Cached(1))  # queued after 2 and 3 now
    table.put(Cached(4))  # evicts 2, the oldest put that stands
    assert [table.get(node_id) is not None for node_id in (1, 2, 3, 4)] == [True, False, True, True]


def test_node_table_releases_every_node_it_forgets() -> None:
    """Evicted, discarded, replaced and cleared nodes lose the table's reference, and no other."""
    assert speedups is not None
    table = speedups.NodeTable(100)
    nodes = [Cached(node_id) for node_id in range(1, 1001)]
    before = [sys.getrefcount(node) for node in nodes]
    for node_id in range(1000):  # 900 evicted on the way
        table.put(nodes[node_id])
    assert [table.get(node.id) for node in nodes[-100:]] == nodes[-100:]
    for node_id in range(901, 951):
        table.discard(node_id)
    table.put(Cached(nodes[-1].id))  # a node decoded twice: the newer one is kept
    assert table.get(nodes[-1].id) is not nodes[-1]
    assert len(table) == 50
    table.clear()
    assert len(table) == 0
    assert [sys.getrefcount(node) for node in nodes] == before


@pytest.mark.parametrize("node_id", [0, -1, 2**64, 1.0, "1", None, True])
def test_node_table_refuses_a_node_without_a_64_bit_id(node_id: Any) -> None:
    assert speedups is not None
    table = speedups.NodeTable(10)
    with pytest.raises(ValueError, match="id must be an int"):
        table.put(Cached(node_id))
    assert table.get(node_id) is None  # a lookup of anything that is not an id finds nothing
    table.discard(node_id)
    with pytest.raises(AttributeError):
        table.put(object())
    assert len(table) == 0


def test_node_table_of_no_capacity_keeps_nothing() -> None:
    assert speedups is not None
    table = speedups.NodeTable(0)
    table.put(Cached(1))
    assert len(table) == 0 and table.get(1) is None


def _small_tree() -> tuple[tallytree.Database, tallytree.Aggregate]:
    """300 items with a float field in nodes of 4: a tree of five levels."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x",), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key, key, (key / 3,)) for key in range(300)])
    return db, agg


def test_descents_take_nodes_and_images_from_a_node_table() -> None:
    """rank, rank_range, select and range_totals through a NodeTable give what they give through a
    dict, as nodes get their images (the table learns each image on the lookup after it is built),
    and count the same cache hits."""
    assert speedups is not None
    db, agg = _small_tree()
    with db.read() as tx:
        record = tx.root(agg._tree_key(None))
        assert record is not None and not record.pending
        root, summary = tx.node(record.node_id), record.summary
        store = tx.shared
        assert isinstance(store, speedups.NodeTable)
        as_dict = {node_id: store.get(node_id) for node_id in range(1, 1000) if store.get(node_id)}
        cuts = [(b"", b"\xff"), (encode_key(10), encode_key(200)), (encode_key(57), encode_key(58))]
        for _ in range(4):  # first search, image built, image learnt by the table, then used
            for low, high in cuts:
                answers = [
                    (
                        speedups.rank(root, low, False, tx.node, nodes),
                        speedups.rank_range(root, low, False, high, True, tx.node, nodes),
                        speedups.select(root, 37, tx.node, nodes)[1:],
                        speedups.find(root, encode_key(37) + encode_id(37), tx.node, nodes),
                        speedups.range_totals(root, summary, low, False, high, False, tx.node, nodes, 1),
                    )
                    for nodes in (store, as_dict)
                ]
                assert answers[0] == answers[1]


@given(st.lists(st.integers(0, 400), max_size=120, unique=True), st.sampled_from(["float", "int", "mixed"]))
def test_find_gives_what_the_python_find_gives(keys: list[int], kind: str) -> None:
    """NodeTree.find through the kernel (``find``) answers what the Python descent answers, for
    entries present and absent, in a read transaction as leaves get their images (from which the
    values come, in type too) and in a write transaction, whose changed nodes have none."""
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x", "y"), node_size=4)

    def values(key: int) -> tuple[Any, ...]:
        if kind == "float" or (kind == "mixed" and key % 3):
            return (key / 7, -0.0)
        return (key * 3, -key)

    with db.write() as tx:
        agg.insert_many(tx, [(key, f"i{key}", values(key)) for key in keys])
    probes = [(key, f"i{key}") for key in range(0, 402, 3)] + [(key, "other") for key in keys[:20]]

    def answers(tx: Any) -> list[Any]:
        found = [agg.get(tx, key, item_id) for key, item_id in probes]
        return [
            (item.key, item.id, item.values, [type(value) for value in item.values]) if item else None
            for item in found
        ]

    with pure_python(), db.read() as tx:
        expected = answers(tx)
    for _ in range(3):  # leaves searched once, then with their images built, then through them
        with db.read() as tx:
            assert answers(tx) == expected
    with pytest.raises(_Abort), db.write() as tx:
        agg.upsert(tx, 3, "i3", (0.5, 1.5))
        agg.discard(tx, keys[0] if keys else 0, f"i{keys[0] if keys else 0}")
        changed = answers(tx)
        with pure_python():
            assert answers(tx) == changed
        raise _Abort


class Watched(Node):
    """A committed node that a weak reference can watch (Node has slots, and no ``__weakref__``)."""

    __slots__ = ("__weakref__",)

    @classmethod
    def copy_of(cls, node: Node) -> Watched:
        kids = list(node.kids) if not node.leaf else None
        cols = [list(col) for col in node.cols]
        copy = cls(node.id, node.leaf, list(node.keys), cols, kids, list(node.shifts))
        copy.dirty = True
        copy.freeze()  # committed: its lists made tuples, as decoding makes them
        return copy


@pytest.mark.parametrize("descent", ["rank", "rank_range", "select", "find", "range_totals"])
def test_descents_keep_the_nodes_a_table_drops_under_them(descent: str) -> None:
    """A descent borrows the nodes it takes from a NodeTable (see ``fetcher_keep``). When the table
    drops them while it runs (here a fetch clears it; an eviction or another thread's clear does the
    same), they stay alive until the descent ends, and are released then; the answer is unchanged."""
    assert speedups is not None
    db, agg = _small_tree()
    with db.read() as tx:
        record = tx.root(agg._tree_key(None))
        assert record is not None
        root, summary = Watched.copy_of(tx.node(record.node_id)), record.summary
        ids, frontier = [], [root]
        while frontier:  # every node below the root
            kids = [tx.node(kid) for node in frontier if not node.leaf for kid in node.kids]
            ids += [kid.id for kid in kids]
            frontier = kids
        low, high = encode_key(10), encode_key(200)

        def run(fetch: Any, nodes: Any) -> Any:
            if descent == "rank":
                return speedups.rank(root, high, False, fetch, nodes)[0]
            if descent == "rank_range":
                return speedups.rank_range(root, low, False, high, True, fetch, nodes)[:2]
            if descent == "select":
                leaf, at, _ = speedups.select(root, 137, fetch, nodes)
                return leaf.keys[at]
            if descent == "find":
                found, at, _ = speedups.find(root, encode_key(137) + encode_id(137), fetch, nodes)
                return found if at is None else tuple(col[at] for col in found.cols)
            return speedups.range_totals(root, summary, low, False, high, False, fetch, nodes, 1)[0]

        expected = run(tx.node, None)
        table = speedups.NodeTable(10_000)
        for node_id in ids:
            table.put(Watched.copy_of(tx.node(node_id)))
        watches = [weakref.ref(table.get(node_id)) for node_id in ids]
        for _ in range(3):  # every node searched enough to have its image, learnt by the table
            assert run(tx.node, table) == expected
        leaves = [node_id for node_id in ids if tx.node(node_id).leaf]
        for node_id in leaves:  # every leaf fetched: the first fetch clears the table
            table.discard(node_id)
        alive_during: list[int] = []

        def clearing_fetch(node_id: int) -> Node:
            if not alive_during:
                table.clear()
                gc.collect()
                alive_during.append(sum(watch() is not None for watch in watches))
            return tx.node(node_id)

        assert run(clearing_fetch, table) == expected
        assert len(table) == 0
        internal = len(ids) - len(leaves)
        assert alive_during == [internal]  # dropped by the table, kept for the descent
        gc.collect()
        assert [watch() for watch in watches] == [None] * len(ids)  # and released when it ended


def test_descents_keep_any_number_of_fetched_nodes() -> None:
    """A descent keeps the nodes it fetches until it ends, 16 in the Fetcher itself and the rest on
    the heap: two cuts parting at the root of a tree of ten levels fetch 18."""
    assert speedups is not None
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x",), node_size=4)
    keys = list(range(30_000))
    random.Random(1).shuffle(keys)  # nodes about 3/4 full: a deeper tree than sorted inserts make
    with db.write() as tx:
        for key in keys:
            agg.insert(tx, key, key, (key,))
    with db.read() as tx:
        record = tx.root(agg._tree_key(None))
        assert record is not None and record.height >= 10
        root = tx.node(record.node_id)
        for low, high in ((10, 29_990), (1, 15_000), (14_999, 15_001)):
            cuts = (encode_key(low), False, encode_key(high), False)
            assert speedups.rank_range(root, *cuts, tx.node, None)[:2] == (
                low,
                high,
            )  # None: every node fetched
            found = speedups.range_totals(root, record.summary, *cuts, tx.node, None, 1, None, True)
            assert found is not None and found[0] == [high - low, sum(range(low, high))]


# ------------------------------------------------------------------ compact leaves, second-chance cache

LEAF_COLUMNS = {
    "float": st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([-0.0, 5e-324]),
    "int": INT64 | st.sampled_from(EDGES),
    "mixed": st.floats(allow_nan=False, allow_infinity=False) | INT64,
    "wide": st.integers(2**63, 2**64 - 1),  # a leaf stores uint64s too
}


def _whole_image(keys: list[bytes], cols: list[list[Any]]) -> bytes:
    """The image build_image makes for a committed leaf decoded whole (on its second search)."""
    assert speedups is not None
    leaf = Node(9, True, tuple(keys), tuple(map(tuple, cols)))  # type: ignore[arg-type]
    for _ in range(2):
        speedups.bisect(leaf, b"", True)
    assert isinstance(leaf._blob, bytes)
    return leaf._blob


@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=70, unique=True),
    st.lists(st.sampled_from(sorted(LEAF_COLUMNS)), max_size=3),
    st.data(),
)
def test_leaf_image_builds_a_stored_leafs_image_from_its_bytes(
    keys: list[bytes], kinds: list[str], data: st.DataObject
) -> None:
    """leaf_image(bytes) is byte for byte the image of the leaf decoded whole, when every column is
    all floats or all int64s, and None exactly otherwise; leaf_lists gives the leaf back from it, the
    type and the sign of each value included, in tuples the garbage collector does not track."""
    import gc

    assert speedups is not None
    keys.sort()
    cols = [data.draw(st.lists(LEAF_COLUMNS[kind], min_size=len(keys), max_size=len(keys))) for kind in kinds]
    stored = encode_node(Node(9, True, keys, cols, dirty=True))
    whole = all(
        all(type(value) is float for value in col)
        or all(type(value) is int and -(2**63) <= value < 2**63 for value in col)
        for col in cols
    )
    compact = speedups.leaf_image(stored)
    if not whole:
        assert compact is None
        return
    assert compact is not None
    image, fields = compact
    assert fields == len(cols)
    assert image == _whole_image(keys, cols)
    lists = speedups.leaf_lists(image)
    assert lists is not None
    got_keys, got_cols = lists
    assert got_keys == tuple(keys)
    assert [[(type(value), value, math.copysign(1, value)) for value in col] for col in got_cols] == [
        [(type(value), value, math.copysign(1, value)) for value in col] for col in cols
    ]
    assert not any(gc.is_tracked(part) for part in (got_keys, got_cols, *got_cols))
    rows = list(zip(*cols, strict=True)) if cols else [()] * len(keys)
    start = data.draw(st.integers(0, len(keys) + 2))
    stop = data.draw(st.integers(0, len(keys) + 2))
    sliced = speedups.leaf_rows(image, start, stop)  # entries start:stop alone, clipped to the leaf
    assert sliced is not None
    got_keys, got_rows = sliced
    assert got_keys == tuple(keys[start:stop])
    assert [[(type(value), value, math.copysign(1, value)) for value in row] for row in got_rows] == [
        [(type(value), value, math.copysign(1, value)) for value in row] for row in rows[start:stop]
    ]
    assert not any(gc.is_tracked(part) for part in (got_keys, got_rows, *got_rows))
    node = Node.compact(9, image, fields)
    assert node.entry_rows(start, stop) == sliced  # and through the node
    assert Node(9, True, keys, cols).entry_rows(start, stop) == (keys[start:stop], rows[start:stop])


def test_leaf_image_refuses_what_is_not_a_whole_leaf() -> None:
    """None for another kind (an internal or pending node), a leaf of no entries, bytes cut short or
    extended, and values of another type; leaf_lists refuses an internal node's image, and one
    with a column left to the node's attributes. Both refuse a non-bytes argument."""
    assert speedups is not None
    keys = [encode_key(key) + encode_id(key) for key in range(5)]
    stored = encode_node(Node(9, True, keys, [[1.5] * 5, list(range(5))], dirty=True))
    assert speedups.leaf_image(stored) is not None
    internal = Node(9, False, keys, [[1] * 5], list(range(10, 15)), [0], dirty=True)
    pending = Node(9, True, keys, [[1.5] * 5], dirty=True)
    pending.pending = True
    refused = [
        encode_node(internal),
        encode_node(pending),
        msgpack.packb([1, [], []]),
        stored[:-1],
        stored + b"\x00",
        msgpack.packb([1, keys, [True] * 5]),
        msgpack.packb([1, [key.decode("latin-1") for key in keys], [1.5] * 5]),
        msgpack.packb([2, keys, [1.5] * 5]),
        msgpack.packb({"a": 1}),
        b"",
    ]
    assert [speedups.leaf_image(data) for data in refused] == [None] * len(refused)
    assert speedups.leaf_lists(_whole_image(keys, [[1, 2.5, 3, 4, 5]])) is None  # a mixed column
    branch = Node(1, False, tuple(keys), ((1,) * 5,), tuple(range(10, 15)), (0,))  # type: ignore[arg-type]
    speedups.bisect(branch, b"", True)
    assert isinstance(branch._blob, bytes) and speedups.leaf_lists(branch._blob) is None
    assert speedups.leaf_rows(branch._blob, 0, 5) is None
    assert speedups.leaf_rows(_whole_image(keys, [[1, 2.5, 3, 4, 5]]), 0, 5) is None
    for kernel in (speedups.leaf_image, speedups.leaf_lists):
        with pytest.raises(TypeError):
            kernel(bytearray(stored))
    whole = _whole_image(keys, [[1.5] * 5])
    with pytest.raises(TypeError):
        speedups.leaf_rows(bytearray(whole), 0, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start must be >= 0"):
        speedups.leaf_rows(whole, -1, 5)
    with pytest.raises(TypeError):
        speedups.leaf_rows(whole, 0)  # type: ignore[call-arg]


def test_a_decoded_leaf_is_its_image_until_its_lists_are_read() -> None:
    """decode_node turns a stored leaf of floats and int64s into a compact node: its image, and its
    keys and columns made on first read (equal to a whole decode's); other leaves are decoded whole,
    and an attribute a node does not have still raises AttributeError."""
    assert speedups is not None
    keys = [encode_key(key) + encode_id(f"e{key}") for key in range(40)]
    cols = [[key / 3 for key in range(40)], [key * 1000 for key in range(40)]]
    stored = encode_node(Node(9, True, keys, cols, dirty=True))
    node = decode_node(stored, 9)
    slot = Node.__dict__["keys"]
    with pytest.raises(AttributeError):
        slot.__get__(node)  # not made yet
    assert node._blob == _whole_image(keys, cols)
    assert node.shifts == (0, 0) and node.leaf and not node.dirty and not node.pending
    assert node.keys == tuple(keys) and node.cols == tuple(map(tuple, cols))
    assert slot.__get__(node) is node.keys  # made once, then kept
    with pytest.raises(AttributeError, match="nope"):
        node.nope  # noqa: B018
    with pure_python():
        whole = decode_node(stored, 9)
        late = decode_node(stored, 9)
        assert late._blob is None and late.keys == tuple(keys)
        compact = speedups.leaf_image(stored)
        assert compact is not None
        cached = Node.compact(9, *compact)  # decoded with the kernels, read by the Python code
        assert cached.keys == tuple(keys) and cached.cols == tuple(map(tuple, cols))
    assert whole.keys == node.keys and whole.cols == node.cols and whole._blob is None
    mixed = decode_node(encode_node(Node(9, True, keys, [[1] * 39 + [1.5], cols[1]], dirty=True)), 9)
    assert mixed._blob is None and slot.__get__(mixed) == tuple(keys)
    with pytest.raises(CorruptDatabaseError):
        decode_node(stored[:-3], 9)


def test_items_leaves_the_cached_leaves_compact(tmp_path: Any) -> None:
    """``items`` (forward, reverse, bounded) reads a compact leaf's lists without keeping them: the
    cached leaves stay compact, and a write that replaces them has no lists to free."""
    assert speedups is not None
    from tallytree._node import _is_compact

    with tallytree.open(tmp_path / "db") as db:
        events = db.aggregate("events", values=("cost", "tokens"), node_size=8)
        with db.write() as tx:
            events.insert_many(tx, [(key, f"e{key}", (key / 4, key)) for key in range(200)])
    with tallytree.open(tmp_path / "db") as db:  # a new process's cache: leaves decoded compact
        events = db.aggregate("events", values=("cost", "tokens"))
        with db.read() as tx:
            assert [item.key for item in events.items(tx)] == list(range(200))
            assert [item.key for item in events.items(tx, reverse=True, ge=30, lt=170)] == list(
                range(169, 29, -1)
            )
            assert [item.values for item in events.items(tx, ge=57, lt=60)] == [
                (57 / 4, 57),
                (58 / 4, 58),
                (59 / 4, 59),
            ]
            page = events.page(tx, limit=50, ge=100)
            assert [item.key for item in page.items] == list(range(100, 150))
            leaves, stack = [], [tx.node(tx.root(events._tree_key(None)).node_id)]
            while stack:
                node = stack.pop()
                if node.leaf:
                    leaves.append(node)
                else:
                    stack.extend(tx.node(kid) for kid in node.kids)
            assert len(leaves) > 20 and all(map(_is_compact, leaves))
            assert leaves[0].keys is not None and not _is_compact(leaves[0])  # the attribute still makes them


@pytest.mark.parametrize("store", ["NodeTable", "NodeDict"])
def test_the_node_cache_gives_a_node_found_since_it_was_oldest_a_second_chance(store: str) -> None:
    """A node looked up since it was last the oldest is passed over once by eviction (unmarked and
    queued again); an unmarked one goes; a new node is never evicted by its own put."""
    from tallytree._store import NodeDict

    assert speedups is not None
    table = speedups.NodeTable(3) if store == "NodeTable" else NodeDict(3)
    for node_id in (1, 2, 3):
        table.put(Cached(node_id))  # type: ignore[arg-type]
    assert table.get(1) is not None
    table.put(Cached(4))  # type: ignore[arg-type]  # 1 was found: 2 goes
    assert [table.get(node_id) is not None for node_id in (1, 2, 3, 4)] == [True, False, True, True]
    table.put(Cached(5))  # type: ignore[arg-type]  # 3 and 1 found again by the line above, 4 too: all get a second chance, 3 goes
    assert table.get(3) is None
    for node_id in (6, 7, 8):
        table.put(Cached(node_id))  # type: ignore[arg-type]
        assert table.get(node_id) is not None  # marked at once: still never evicted by its own put
    assert len(table) == 3


def test_internal_nodes_stay_cached_while_leaves_stream_through_a_small_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tree with many more leaves than the cache holds, read under each parent of leaves in turn:
    once each node was decoded, only leaves are (first in, first out would decode the internal
    nodes again each time the leaves pushed them out)."""
    from tallytree import _txn

    db = tallytree.open_memory(cache_nodes=100)
    agg = db.aggregate("a", values=("x",), node_size=16)
    with db.write() as tx:
        agg.insert_many(tx, [(key, key, (key / 2,)) for key in range(3000)])
    starts: dict[int, list[int]] = {}  # the first key of each leaf (keys are 0..2999), by parent

    def walk(node: Node, start: int) -> int:
        for kid in node.kids:
            child = tx.node(kid)
            if child.leaf:
                starts.setdefault(node.id, []).append(start)
                start += len(child.keys)
            else:
                start = walk(child, start)
        return start

    with db.read() as tx:
        record = tx.root(agg._tree_key(None))
        assert record is not None and walk(tx.node(record.node_id), 0) == 3000
    groups = list(starts.values())
    assert 15 < len(groups) < 30
    db._cache.clear()
    decoded: list[bool] = []

    def decode(data: bytes, node_id: int) -> Node:
        node = decode_node(data, node_id)
        decoded.append(node.leaf)
        return node

    monkeypatch.setattr(_txn, "decode_node", decode)
    with db.read() as tx:
        for query in range(600):
            if query == len(groups):
                assert not all(decoded)  # the internal nodes, decoded in the first round
                decoded.clear()
            group = groups[query % len(groups)]
            key = group[query // len(groups) % len(group)] + 1  # inside the leaf: a fence would lead left
            assert agg.rank(tx, key) == key
    assert len(decoded) > 200 and all(decoded)  # more leaves than the cache holds, and only leaves


def test_committed_nodes_are_untracked_by_the_garbage_collector() -> None:
    """A node decoded (leaf, compact leaf, internal) or frozen at commit is untracked by the cyclic
    collector (it can be part of no cycle); a dirty copy, which refers to its origin, is tracked. A
    dirty leaf enters the node cache compact, as a decode would make it."""
    import gc

    from tallytree._node import _is_compact

    assert speedups is not None
    db = tallytree.open_memory()
    agg = db.aggregate("a", values=("x",), node_size=4)
    with db.write() as tx:
        agg.insert_many(tx, [(key, key, (key / 2 if key % 5 else key,)) for key in range(60)])
    with db.read() as tx:
        record = tx.root(agg._tree_key(None))
        assert record is not None
        nodes = [decode_node(data, node_id) for node_id, data in _stored_nodes(tx)]
    assert {node.leaf for node in nodes} == {True, False}
    assert not any(gc.is_tracked(node) for node in nodes)
    with db.write() as tx:
        agg.insert(tx, 30.5, 1000, (1.0,))  # into a leaf: a path of dirty copies
        agg.insert(tx, 52.5, 1001, (1.0,))  # into a leaf of floats only (51 to 54)
        agg.insert(tx, 1000, 1000, (1.0,))  # after the last entry: into the record's pending node
        dirty = [node for node in tx._dirty.values()]
        pending = tx.root(agg._tree_key(None)).pending_node  # type: ignore[union-attr]
        assert pending is not None and pending.dirty
        dirty.append(pending)
        assert len(dirty) > 1 and all(gc.is_tracked(node) for node in dirty)
    leaves = [node for node in dirty if node.leaf and not node.pending]
    assert leaves and len(leaves) < len(dirty)
    compact = [speedups.leaf_image(encode_node(node)) is not None for node in leaves]
    assert True in compact and False in compact  # all floats, and ints mixed with floats
    for node, image in zip(leaves, compact, strict=True):
        if not image:  # a column the image does not hold: cached frozen
            continue
        cached = db._cache.get(node.id)  # compact, made from the committed bytes (see Node.entries)
        assert cached is not None and cached is not node and _is_compact(cached)
        assert not gc.is_tracked(cached) and not cached.dirty
        assert cached.keys == tuple(node.keys) and cached.cols == tuple(map(tuple, node.cols))
    frozen = [node for node, image in zip(leaves, compact, strict=True) if not image]
    frozen += [node for node in dirty if node not in leaves]
    assert not any(gc.is_tracked(node) or node.dirty for node in frozen)  # frozen by the commit
    assert all(db._cache.get(node.id) is node for node in frozen if not node.pending)
    assert not gc.is_tracked(speedups.untrack(Node(1, True, [], [])))


def _stored_nodes(tx: tallytree.Transaction) -> list[tuple[int, bytes]]:
    """Every stored node of a database as (id, bytes)."""
    return [(int.from_bytes(key, "big"), bytes(data)) for key, data in tx.kv.scan(NODES, b"", b"\xff" * 9)]


# ------------------------------------------------------------------ damaged stored nodes

DAMAGE = st.tuples(st.sampled_from(["set", "drop", "add"]), st.integers(0, 2**16), st.integers(0, 255))


def _damaged(data: bytes, damage: tuple[str, int, int]) -> bytes:
    """``data`` with one byte set, dropped or added (at a position taken modulo its length)."""
    change, at, byte = damage
    damaged = bytearray(data)
    at %= len(damaged) + (change == "add")
    if change == "set":
        damaged[at] = byte if byte != damaged[at] else byte ^ 0xFF
    elif change == "drop":
        del damaged[at]
    else:
        damaged.insert(at, byte)
    return bytes(damaged)


def _decoded_or_corrupt(data: bytes) -> Node | None:
    try:
        return decode_node(data, 3)
    except CorruptDatabaseError:
        return None


def _parts(node: Node) -> tuple[Any, ...]:
    return (node.leaf, node.pending, tuple(node.keys), tuple(node.kids), tuple(map(tuple, node.cols)))


@st.composite
def stored_nodes(draw: st.DrawFn) -> Node:
    """A leaf (floats, int64s or both per column), a pending node or an internal node, as stored."""
    keys = sorted(draw(st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=12, unique=True)))
    kind = draw(st.sampled_from(["leaf", "pending", "internal"]))
    if kind == "internal":
        counts = draw(st.lists(st.integers(1, 10**6), min_size=len(keys), max_size=len(keys)))
        sums = draw(st.lists(st.integers(-(2**130), 2**130), min_size=len(keys), max_size=len(keys)))
        kids = list(range(50, 50 + len(keys)))
        return Node(9, False, keys, [counts, sums, [0] * len(keys)], kids, [0, 3, 0], dirty=True)
    column = st.sampled_from(sorted(LEAF_COLUMNS)).flatmap(
        lambda name: st.lists(LEAF_COLUMNS[name], min_size=len(keys), max_size=len(keys))
    )
    node = Node(9, True, keys, draw(st.lists(column, min_size=1, max_size=2)), dirty=True)
    node.pending = kind == "pending"
    return node


@settings(max_examples=500)
@given(stored_nodes(), DAMAGE, st.data())
def test_a_damaged_stored_node_is_refused_or_read_as_python_reads_it(
    node: Node, damage: tuple[str, int, int], data: st.DataObject
) -> None:
    """A stored node with one byte set, dropped or added, as a failing disk or a foreign writer
    leaves it: every kernel that reads stored bytes (the decode, the compact leaf's image and lists,
    the searches in it, the batch merge into a stored leaf, the repack of an internal node) either
    refuses it or reads exactly what the Python decoder reads. Run under AddressSanitizer too (see
    the C design note): none of them may read outside the bytes."""
    assert speedups is not None
    damaged = _damaged(encode_node(node), damage)
    with pure_python():
        expected = _decoded_or_corrupt(damaged)
    found = _decoded_or_corrupt(damaged)
    assert (found is None) == (expected is None)
    image = speedups.leaf_image(damaged)
    if expected is None:
        assert image is None
    else:
        assert found is not None and _same(_parts(found), _parts(expected))
    entry = data.draw(st.binary(min_size=1, max_size=12), label="new entry")
    merged = merge_leaf(damaged, [entry], 0, 1, [[1.5]] * len(node.cols), 64)
    if expected is None:
        assert merged is None
        return
    # keys out of order (damage the checker reports) are searched as they are: answers may differ
    ordered = all(a < b for a, b in itertools.pairwise(expected.keys))
    if type(merged) is bytes:
        with pure_python():
            merged_node = decode_node(merged, 1)
        assert expected.leaf and not expected.pending
        if ordered:  # the decoded leaf with the entry added (numbers copied as stored)
            at = bisect_left(expected.keys, entry)
            assert expected.keys[at : at + 1] != (entry,)
            keys = [*expected.keys[:at], entry, *expected.keys[at:]]
            cols = [[*col[:at], 1.5, *col[at:]] for col in expected.cols]
            assert _same(_parts(merged_node), _parts(Node(1, True, keys, cols)))
    assert found is not None
    if found.leaf:
        assert isinstance(found.keys, tuple)  # the compact leaf's lists (made from its image)
        for probe in [*expected.keys, entry] if ordered else ():
            for after in (False, True):
                search = bisect_right if after else bisect_left
                assert speedups.bisect(found, probe, after) == search(expected.keys, probe)
        return
    copy = found.copy(4)  # a write's copy of the damaged internal node: repacked from its bytes
    copy.add(0, [1, 8, 0])
    repacked = encode_node(copy)
    with pure_python():
        assert _same(_parts(decode_node(repacked, 4)), _parts(decode_node(encode_node(copy.copy(5)), 5)))


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=20),
            st.sampled_from([b"", b"\x00", b"12345678", b"12345678\x00", b"123456789", b"12345679"]),
        ),
        max_size=60,
    )
)
def test_sort_order_is_a_stable_argsort_of_bytes(items: list[bytes]) -> None:
    """``sort_order`` gives the order ``sorted`` gives, ties (equal items, and items equal in their
    first 8 bytes, zero bytes included) kept in input order, with the kernel and without it."""
    assert speedups is not None
    expected = sorted(range(len(items)), key=items.__getitem__)
    assert speedups.sort_order(items) == expected
    with pure_python():
        assert keys_module.sort_order(items) == expected


def test_sort_order_leaves_anything_but_a_list_of_bytes_to_python() -> None:
    assert speedups is not None
    assert speedups.sort_order([b"b", "a"]) is None
    assert speedups.sort_order([b"b", bytearray(b"a")]) is None
    assert speedups.sort_order((b"b", b"a")) is None  # type: ignore[arg-type]
    assert speedups.sort_order([]) == []


@pytest.mark.parametrize("cols", [[[1.5]], [[7], [2.5]]])
@pytest.mark.parametrize("damage", [("set", 9, 0), ("drop", -1, 0)])  # 9: the first column's header
def test_a_merge_into_a_damaged_leaf_reports_the_damage_not_a_duplicate(
    cols: list[list[Any]], damage: tuple[str, int, int]
) -> None:
    """A new entry equal to a stored key, merged into a leaf whose value columns are damaged (a column
    header overwritten, the last byte dropped): the merge gives None, so the Python decoder reports the
    damage, rather than the duplicate's index it found in the leaf's keys. (Found by the Hypothesis
    test above: the splice searched the keys before it walked the columns.)"""
    stored = encode_node(Node(9, True, [b"\x00", b"k"], [col * 2 for col in cols], dirty=True))
    assert stored[9] == 0x92  # after the node's head (3 bytes) and two keys of one byte (3 bytes each)
    change, at, byte = damage
    damaged = _damaged(stored, (change, at % len(stored), byte))
    with pure_python():
        assert _decoded_or_corrupt(damaged) is None
    assert merge_leaf(stored, [b"k"], 0, 1, [[1.5]] * len(cols), 64) == 0  # intact: the duplicate
    assert merge_leaf(damaged, [b"k"], 0, 1, [[1.5]] * len(cols), 64) is None


@pytest.mark.parametrize(
    "parts",
    [
        (True, (b"a", b"b"), (), ((1, 2.5),), (0,)),
        (True, [], (), ([],), (0,)),  # an empty leaf, with a list (joined limbs are lists)
        (True, (b"a", "b"), (), ((1, 2),), (0,)),
        (True, (b"a",), (), ((True,),), (0,)),
        (True, (b"a",), (), ((1, 2),), (0,)),
        (False, (b"", b"a"), (5, 6), ((1, 2), (-(2**200), 3), (0, 1)), (0, 7, 0)),
        (False, (b"", b"a"), (5, 6), ((1, 2), [-(2**200), 3], (0, 1)), (0, 7, 0)),
        (False, (b"", b"a"), (5, 2**63), ((1, 2), (1, 3), (0, 1)), (0, 7, 0)),
        (False, (b"", b"a"), (5, 6), ((1, 2), (1, 3), (0, 1)), (1, 7, 0)),
        (False, (b"", b"a"), (5, 6), ((1, 2), (1, 3), (0, 1)), (0, 2049, 0)),
        (False, (b"", b"a"), (5, 6), ((1, 2), (1, 3.0), (0, 1)), (0, 7, 0)),
        (False, (b"", b"a"), (5, 6), ((0, 2), (1, 3), (0, 1)), (0, 7, 0)),
        (False, (), (), ((), (), ()), (0, 0, 0)),
    ],
)
def test_valid_node_makes_the_python_checks(parts: tuple[Any, ...]) -> None:
    """The kernel answers what _node._consistent's Python checks answer, on nodes it accepts and on
    each kind of damage it refuses."""
    assert speedups is not None
    leaf, keys, kids, cols, shifts = parts
    node = Node(3, leaf, keys, cols, kids, shifts)
    with pure_python():
        try:
            _consistent(node)
            expected = True
        except CorruptDatabaseError:
            expected = False
    assert speedups.valid_node(leaf, keys, kids, cols, shifts) is expected


def _decoded_root(data: bytes) -> Any:
    """What ``decode_root`` makes of ``data``: the record's fields, or the error class it raises."""
    from tallytree._txn import decode_root

    try:
        root = decode_root(data)
    except CorruptDatabaseError:
        return CorruptDatabaseError
    return (root.node_id, root.height, root.summary, root.pending, root.pending_summary, root.packed_pending)


@settings(max_examples=400)
@given(
    st.integers(1, 2**40),
    st.lists(SUMMARY_VALUE, min_size=1, max_size=5),
    st.integers(0, 2**40) | PENDING_NODE,
    DAMAGE,
    st.data(),
)
def test_unpack_root_reads_a_record_or_a_damaged_one_as_python_does(
    node_id: int, summary: list[int], pending: Any, damage: tuple[str, int, int], data: st.DataObject
) -> None:
    """The kernel reads every record ``encode_root`` writes (no pending node, one named by id, one
    held) into the fields the Python reader gives; for the same record with one byte set, dropped or
    added, ``decode_root`` either refuses it in both modes or reads the same fields."""
    from tallytree._txn import _read_root, encode_root

    assert speedups is not None
    record = encode_root(_drawn_root(node_id, 3, summary, pending, data))
    assert speedups.unpack_root(record) == _read_root(record)
    damaged = _damaged(record, damage)
    decoded = _decoded_root(damaged)
    with pure_python():
        assert _decoded_root(damaged) == decoded


def test_unpack_root_leaves_what_it_does_not_read_to_python() -> None:
    assert speedups is not None
    for fields in (
        [1, 1, [3, 1.5]],  # a float in a summary
        [1, 1, [[3, 1], 1]],  # a count given as a pair
        [1, 1, [3, 1], "pending", [1, 1]],
        [1, 1, [3, 1], 9],  # four fields
        [1, 1, [3, [1, 9000]]],  # beyond 8,192 bits
        [1, 1, [3, [1, 8192]]],
        [1, 1, [3, [1, 2**63 - 1]]],  # a shift that would overflow the bit count (found by UBSan)
        [1, 1, [3, [b"\x01" * 1025, 0]]],
        [1, 1, [3, 2**64 - 1]],  # beyond int64
        [1, 1, [-3, 1]],
    ):
        assert speedups.unpack_root(msgpack.packb(fields)) is None, fields
    assert speedups.unpack_root(msgpack.packb([1, 1, [3, 1]]) + b"\x00") is None  # bytes after it
    with pytest.raises(TypeError):
        speedups.unpack_root(bytearray(b"\x93"))  # type: ignore[arg-type]


BIG_NEGATIVE = st.integers(-(2**70), -(2**63) - 1)


def _pending_bytes(keys: list[bytes], cols: list[list[Any]]) -> bytes:
    node = Node(0, True, list(keys), [list(col) for col in cols], dirty=True)
    node.pending = True
    return encode_node(node)


@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=70, unique=True),
    st.lists(st.sampled_from(sorted(LEAF_COLUMNS)), max_size=3),
    st.binary(min_size=1, max_size=300),
    st.integers(0, 80),
    st.data(),
)
def test_append_pending_writes_what_encode_node_writes_for_the_appended_node(
    keys: list[bytes], kinds: list[str], entry: bytes, capacity: int, data: st.DataObject
) -> None:
    """append_pending(stored, entry, values, capacity) is byte for byte ``encode_node`` of the pending
    node with the entry and its values appended, when the entry sorts after every stored one, the node
    then holds fewer than ``capacity`` entries and each value is one msgpack packs (an int from
    -2**63 to 2**64 - 1, a float); None exactly otherwise, for the Python code to decide."""
    assert speedups is not None
    keys.sort()
    cols = [data.draw(st.lists(LEAF_COLUMNS[kind], min_size=len(keys), max_size=len(keys))) for kind in kinds]
    values = tuple(data.draw(LEAF_COLUMNS[kind] | st.integers(2**64, 2**70) | BIG_NEGATIVE) for kind in kinds)
    stored = _pending_bytes(keys, cols)
    appended = speedups.append_pending(stored, entry, values, capacity)
    packable = all(type(value) is float or -(2**63) <= value < 2**64 for value in values)
    if entry <= keys[-1] or len(keys) + 1 >= capacity or not packable:
        assert appended is None
        return
    assert appended == _pending_bytes(
        [*keys, entry], [[*col, value] for col, value in zip(cols, values, strict=True)]
    )


def test_append_pending_leaves_what_it_does_not_read_to_python() -> None:
    """None for bytes that are not a whole pending node of as many fields as values are given: a leaf,
    an internal node, bytes cut short or extended, a column of another length, keys or values of
    another type; a TypeError for arguments of the wrong types."""
    assert speedups is not None
    keys = [encode_key(key) + encode_id(key) for key in range(5)]
    stored = _pending_bytes(keys, [[1.5] * 5, list(range(5))])
    entry, values = encode_key(9) + encode_id(9), (2.5, 7)
    assert speedups.append_pending(stored, entry, values, 64) is not None
    refused = [
        encode_node(Node(9, True, keys, [[1.5] * 5, list(range(5))], dirty=True)),  # a leaf
        encode_node(Node(9, False, keys, [[1] * 5], list(range(10, 15)), [0], dirty=True)),
        stored[:-1],
        stored + b"\x00",
        msgpack.packb([4, keys, [1.5] * 5, list(range(4))]),  # a column one short
        msgpack.packb([4, keys, [1.5] * 5]),  # one field where two values are given
        msgpack.packb([4, keys, [1.5] * 5, [None] * 5]),
        msgpack.packb([4, [key.decode("latin-1") for key in keys], [1.5] * 5, list(range(5))]),
        msgpack.packb([4, [], [], []]),
        msgpack.packb({"a": 1}),
        b"",
    ]
    assert [speedups.append_pending(data, entry, values, 64) for data in refused] == [None] * len(refused)
    assert speedups.append_pending(stored, entry, (2.5,), 64) is None  # one value for two fields
    assert speedups.append_pending(stored, entry, (2.5, b"7"), 64) is None  # not a number
    assert speedups.append_pending(stored, b"\xff" * 70000, values, 64) is None  # beyond any key
    for arguments in (
        (bytearray(stored), entry, values, 64),
        (stored, bytearray(entry), values, 64),
        (stored, entry, list(values), 64),
        (stored, entry, values, 64.0),
        (stored, entry, values),
    ):
        with pytest.raises(TypeError):
            speedups.append_pending(*arguments)  # type: ignore[arg-type]


def test_leaf_image_reads_a_pending_node_when_asked_for_its_kind() -> None:
    """leaf_image(data, 4) gives a pending node's image, the image of a leaf of the same entries and
    values; each kind refuses the other's bytes, and any other kind is a ValueError."""
    assert speedups is not None
    keys = [encode_key(key) + encode_id(key) for key in range(7)]
    cols = [[0.5 * key for key in range(7)], list(range(7))]
    pending = _pending_bytes(keys, cols)
    leaf = encode_node(Node(9, True, keys, cols, dirty=True))
    assert speedups.leaf_image(pending, 4) == speedups.leaf_image(leaf, 1) == speedups.leaf_image(leaf)
    assert speedups.leaf_image(pending) is None and speedups.leaf_image(leaf, 4) is None
    for kind in (0, 2, 3, 5, -1, 2**70):
        with pytest.raises((ValueError, OverflowError)):
            speedups.leaf_image(pending, kind)
    with pytest.raises(TypeError):
        speedups.leaf_image(pending, 4.0)  # type: ignore[arg-type]


def test_a_pending_node_read_from_its_record_is_compact_until_its_lists_are_read() -> None:
    """decode_pending makes the node from its search image alone; its size, a bisection and the
    totals of a window that takes every pending entry or none need no lists, and the lists made on
    first use hold the stored entries and values."""
    from tallytree._node import decode_pending
    from tallytree._tree import Tree

    assert speedups is not None
    keys = [encode_key(key) + encode_id(key) for key in range(100, 110)]
    cols = [[0.25] * 10, list(range(10))]
    node = decode_pending(_pending_bytes(keys, cols))
    assert node.pending and not node.dirty and node.size() == 10
    with pytest.raises(AttributeError):
        object.__getattribute__(node, "keys")  # not made yet
    assert speedups.bisect(node, keys[4], False) == 4
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost", "tokens"))
    with db.write() as tx:
        events.insert_many(tx, [(key, key, (1.0, 1)) for key in range(50)])
    for key in range(100, 110):  # new events, each appended to the record's bytes by its commit
        with db.write() as tx:
            events.insert(tx, key, key, (0.25, key - 100))
    with db.read() as tx:
        tree = Tree.reader(tx, 2, events.node_size, tx.root(events._tree_key(None)))
        assert tree.pending is not None and tree.pending.size() == 10
        assert events.totals(tx, ge=20).count == 40 and events.totals(tx, lt=60).cost == 50.0
        assert events.count(tx) == 60 and events.rank(tx, 105) == 55
        with pytest.raises(AttributeError):
            object.__getattribute__(tree.pending, "keys")
        part = events.totals(tx, ge=103, lt=106)  # a part of the pending entries: summed from the lists
        assert (part.count, part.cost, part.tokens) == (3, 0.75, 12)
        assert list(tree.pending.keys) == keys and list(tree.pending.cols[1]) == list(range(10))


@given(
    st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=70, unique=True),
    st.lists(st.sampled_from(sorted(LEAF_COLUMNS)), max_size=3),
    st.data(),
)
def test_pending_edges_reads_the_count_and_the_first_and_last_entries(
    keys: list[bytes], kinds: list[str], data: st.DataObject
) -> None:
    """pending_edges(stored) is the entry count and the first and last entries of the pending node
    those bytes hold, whatever its columns."""
    assert speedups is not None
    keys.sort()
    cols = [data.draw(st.lists(LEAF_COLUMNS[kind], min_size=len(keys), max_size=len(keys))) for kind in kinds]
    assert speedups.pending_edges(_pending_bytes(keys, cols)) == (len(keys), keys[0], keys[-1])


def test_pending_edges_leaves_what_it_does_not_read_to_python() -> None:
    """None for bytes that are not a pending node with entries (the decoder then says what is wrong):
    a leaf, an internal node, no entries, keys that are not bytes, bytes cut inside the keys; a
    TypeError for an argument that is not bytes."""
    assert speedups is not None
    keys = [encode_key(key) + encode_id(key) for key in range(5)]
    stored = _pending_bytes(keys, [[1.5] * 5])
    keys_end = len(stored) - len(msgpack.packb([1.5] * 5))
    refused = [
        encode_node(Node(9, True, keys, [[1.5] * 5], dirty=True)),  # a leaf
        encode_node(Node(9, False, keys, [[1] * 5], list(range(10, 15)), [0], dirty=True)),
        stored[: keys_end - 1],
        msgpack.packb([4, [], []]),
        msgpack.packb([4, [key.decode("latin-1") for key in keys], [1.5] * 5]),
        msgpack.packb([4]),
        msgpack.packb({"a": 1}),
        b"",
    ]
    assert [speedups.pending_edges(data) for data in refused] == [None] * len(refused)
    for argument in (bytearray(stored), memoryview(stored), None):
        with pytest.raises(TypeError):
            speedups.pending_edges(argument)  # type: ignore[arg-type]
