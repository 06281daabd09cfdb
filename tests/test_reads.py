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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import pure_python, snapshot, strict
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree._aggregate import Totals, resolve_bounds
from tallytree._btree import vsub
from tallytree._keys import _int_body, encode_body, encode_key
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


# ---------------------------------------------------------------- bounds of another type than the keys

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SHAPES = ["pending", "leaf", "leaf+pending", "deep", "deep+pending"]


@pytest.fixture(params=["built", "python"])
def kernels_or_python(request: pytest.FixtureRequest) -> Iterator[str]:
    with pure_python() if request.param == "python" else nullcontext():
        yield request.param


def _shaped(db: tallytree.Database, shape: str, keys: list[Any], name: str = "events") -> tallytree.Aggregate:
    """Aggregate ``name`` (node size 4) holding ``keys`` (ids 0, 1, ...; value (1,)) in namespace None,
    as a tree of the given shape: all pending (one insert per commit, each after the last), one leaf,
    several levels, and those with pending entries after them."""
    events = db.aggregate(name, values=("n",), node_size=4)
    rows = sorted(((key, index, (1,)) for index, key in enumerate(keys)), key=lambda row: encode_key(row[0]))
    tail = 2 if shape.endswith("+pending") else len(rows) if shape == "pending" else 0
    head, rest = rows[: len(rows) - tail], rows[len(rows) - tail :]
    if head:
        with db.write() as tx:
            events.build(tx, head, sorted=True)
    for row in rest:
        with db.write() as tx:
            events.insert(tx, *row)
    with db.read() as tx:
        tree = events._reader(tx, None)
        nodes = tree.nodes.root
        assert (tree.pending_summary is not None) == (shape == "pending" or shape.endswith("+pending"))
        assert (nodes is None) == (shape == "pending")
        if nodes is not None:
            assert (nodes.height > 1) == shape.startswith("deep")
    return events


def _keys_for(shape: str, make: Callable[[int], Any]) -> list[Any]:
    return [make(index) for index in range(3 if shape.startswith(("pending", "leaf")) else 40)]


def _every_read(events: tallytree.Aggregate, bounds: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """Each read entry point with these bounds (rank's key and bucket edges are given the bound)."""
    bound = next(iter(bounds.values()))
    return {
        "count": lambda tx: events.count(tx, **bounds),
        "totals": lambda tx: events.totals(tx, **bounds),
        "sum": lambda tx: events.sum(tx, "n", **bounds),
        "at": lambda tx: events.at(tx, 0, **bounds),
        "rank": lambda tx: events.rank(tx, 0, **bounds),
        "min": lambda tx: events.min(tx, **bounds),
        "max": lambda tx: events.max(tx, **bounds),
        "random": lambda tx: events.random(tx, rng=1, **bounds),
        "items": lambda tx: list(events.items(tx, **bounds)),
        "page": lambda tx: events.page(tx, **bounds),
        "delete_range": lambda tx: events.delete_range(tx, **bounds),
        "rank's key": lambda tx: events.rank(tx, bound if not isinstance(bound, tuple) or bound else 0),
        "buckets": lambda tx: events.buckets(tx, edges=[bound, bound]),
    }


def _hours(n: int) -> datetime:
    return T0 + timedelta(hours=n)


def _open(n: int) -> tuple[str, datetime]:
    return ("open", T0 + timedelta(hours=n))


STR_FIRST = "tuple whose first element is a str"
DATETIME_FIRST = "tuple whose first element is a datetime"
MISMATCHES: list[tuple[str, Callable[[int], Any], dict[str, Any], str, str]] = [
    ("datetime keys, str bound", _hours, {"ge": "2024-05-01"}, "str", "datetime"),
    ("datetime keys, upper str bound", _hours, {"lt": "2025"}, "str", "datetime"),
    ("datetime keys, epoch bound", _hours, {"le": 1714521600}, "number", "datetime"),
    ("int keys, str bound", lambda n: 10 * n, {"gt": "5"}, "str", "number"),
    ("float keys, bytes bound", lambda n: n / 4, {"eq": b"1"}, "bytes", "number"),
    ("bool keys, int bound", lambda n: n % 2 == 1, {"ge": 1}, "number", "bool"),
    ("str keys, int bound", lambda n: f"k{n:03}", {"lt": 5}, "number", "str"),
    ("(status, ts) keys, bare ts", _open, {"ge": T0}, "datetime", STR_FIRST),
    ("(status, ts) keys, (ts,) bound", _open, {"lt": (T0,)}, DATETIME_FIRST, STR_FIRST),
    ("(status, ts) keys, prefix (ts,)", _open, {"prefix": (T0,)}, DATETIME_FIRST, STR_FIRST),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("make", "bounds", "bound_type", "key_type"),
    [case[1:] for case in MISMATCHES],
    ids=[case[0] for case in MISMATCHES],
)
def test_a_bound_of_another_type_than_every_key_is_refused(
    kernels_or_python: str,
    db: tallytree.Database,
    shape: str,
    make: Callable[[int], Any],
    bounds: dict[str, Any],
    bound_type: str,
    key_type: str,
) -> None:
    """Keys of one type and a bound of another: the bound selects all or nothing by the order of the
    types, so every read (and delete_range) refuses it, naming both types, and changes nothing."""
    events = _shaped(db, shape, _keys_for(shape, make))
    before = snapshot(db)
    for name, read in _every_read(events, bounds).items():
        if name == "buckets" and "prefix" in bounds:
            continue  # a prefix is no bucket edge
        with db.write() as tx:
            with pytest.raises(tallytree.BoundKeyTypeError) as raised:
                read(tx)
            assert not tx.changed, name
        message = str(raised.value)
        assert f"is a {bound_type}, but every key in this namespace is a {key_type}" in message, (
            name,
            message,
        )
        assert "convert the bound" in message or "give a tuple" in message
        assert isinstance(raised.value, tallytree.BoundsTypeError) and isinstance(raised.value, TypeError)
    assert snapshot(db) == before


def _brute_count(keys: list[Any], bounds: dict[str, Any]) -> int:
    """How many keys lie within key bounds, by comparing encodings (the documented order)."""
    entries = [encode_key(key) for key in keys]
    lower = resolve_bounds(**bounds).lower
    upper = resolve_bounds(**bounds).upper
    return sum(
        (lower is None or (entry > lower[0] if lower[1] else entry >= lower[0]))
        and (upper is None or (entry <= upper[0] if upper[1] else entry < upper[0]))
        for entry in entries
    )


DAY = timedelta(days=1)
FITTING: list[tuple[str, Callable[[int], Any], list[dict[str, Any]]]] = [
    (
        "datetime keys",
        _hours,
        [{"ge": T0 - DAY}, {"lt": T0 + 9 * DAY}, {"ge": T0, "lt": _hours(1)}, {"eq": T0}],
    ),
    ("datetime keys, all or none", _hours, [{"gt": T0 + 9 * DAY}, {"le": T0 - DAY}, {"lt": T0 - DAY}]),
    ("int keys", lambda n: 10 * n, [{"ge": -1}, {"lt": 10**9}, {"ge": 2.5}, {"le": -0.5}, {"eq": 10.0}]),
    (
        "(status, ts) keys",
        _open,
        [{"ge": ("open",)}, {"lt": ("zz",)}, {"prefix": ("open",)}, {"gt": ("a", T0)}],
    ),
    ("(status, ts) keys, no first element", _open, [{"prefix": ()}, {"ge": ()}, {"le": ()}]),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("make", "cases"), [case[1:] for case in FITTING], ids=[case[0] for case in FITTING])
def test_bounds_of_the_keys_type_answer_as_before(
    kernels_or_python: str,
    db: tallytree.Database,
    shape: str,
    make: Callable[[int], Any],
    cases: list[dict[str, Any]],
) -> None:
    """Bounds of the keys' type, before, after or among every key (a tuple without a first element
    fits any tuple key): the usual answers, no error, in every shape of tree; the same tree refuses
    a bound of another type (bytes, which no case here uses for keys)."""
    keys = _keys_for(shape, make)
    events = _shaped(db, shape, keys)
    with db.read() as tx:
        for bounds in cases:
            expected = _brute_count(keys, bounds)
            assert events.count(tx, **bounds) == expected, bounds
            assert events.totals(tx, **bounds).count == expected, bounds
            assert len(list(events.items(tx, **bounds))) == expected, bounds
        with pytest.raises(tallytree.BoundKeyTypeError, match="is a bytes, but every key"):
            events.count(tx, ge=b"")


@pytest.mark.parametrize("shape", SHAPES)
def test_a_namespace_of_keys_of_several_types_takes_bounds_of_any_type(
    kernels_or_python: str, db: tallytree.Database, shape: str
) -> None:
    """Mixed types are legal: no bound is refused, even when the other type is only the first or the
    last key (behind every node's fences), and every answer follows the order of the types. Once
    the keys of the other type are deleted, the namespace refuses bounds of that type."""
    size = {"pending": 1, "leaf": 1, "leaf+pending": 2}.get(shape, 40)  # pending holds 3 here, a leaf 4
    layouts = {
        "ints then strs": [*range(size), *(f"s{n:03}" for n in range(size))],
        "one str last": [*range(size), "last"],
        "one None first": [None, *range(size)],
    }
    bounds_list: list[dict[str, Any]] = [
        {"ge": "a"},
        {"lt": b"x"},
        {"ge": T0},
        {"le": False},
        {"gt": 1},
        {"lt": ("t",)},
        {"eq": "last"},
    ]
    for index, (name, keys) in enumerate(layouts.items()):
        events = _shaped(db, shape, keys, name=f"mixed{index}")
        with db.read() as tx:
            for bounds in bounds_list:
                expected = _brute_count(keys, bounds)
                assert events.count(tx, **bounds) == expected, (name, bounds)
                assert events.totals(tx, **bounds).count == expected, (name, bounds)
                assert events.rank(tx, next(iter(bounds.values()))) == _brute_count(
                    keys, {"lt": next(iter(bounds.values()))}
                )
        with db.write() as tx:
            events.delete_range(tx, ge="")  # the strs go
            if name == "one None first":  # None and ints: still two types
                assert events.count(tx, ge="a") == 0
            else:
                with pytest.raises(tallytree.BoundKeyTypeError, match="is a str, but every key"):
                    events.count(tx, ge="a")


def test_an_empty_namespace_answers_any_bound(kernels_or_python: str, db: tallytree.Database) -> None:
    """No key, no type to compare with: an empty namespace (never written, or emptied) answers 0."""
    events = _shaped(db, "deep", _keys_for("deep", _hours))
    for namespace in ("never", "emptied"):
        if namespace == "emptied":
            with db.write() as tx:
                events.insert(tx, T0, "a", (1,), namespace=namespace)
            with db.read() as tx, pytest.raises(tallytree.BoundKeyTypeError):
                events.count(tx, namespace=namespace, ge="2024")
            with db.write() as tx:
                events.clear(tx, namespace=namespace)
        with db.read() as tx:
            assert events.count(tx, namespace=namespace, ge="2024") == 0
            assert events.totals(tx, namespace=namespace, lt=5).count == 0
            assert events.rank(tx, "x", namespace=namespace) == 0
            assert events.buckets(tx, namespace=namespace, start=0, width=1, count=2)[1].count == 0


def test_a_table_range_delete_refuses_a_bound_of_another_type(db: tallytree.Database) -> None:
    runs = db.table("runs")
    runs.aggregate("by_time", key="at")
    with db.write() as tx:
        for n in range(10):
            runs.insert(tx, {"at": T0 + timedelta(hours=n)}, id=n)
    with db.write() as tx:
        with pytest.raises(tallytree.BoundKeyTypeError, match="is a str, but every key"):
            runs.delete_range(tx, "by_time", lt="2024-05-02")
        assert not tx.changed
        assert runs.delete_range(tx, "by_time", lt=T0 + timedelta(hours=5)).count == 5


KEY_KINDS: dict[str, Callable[[int], Any]] = {
    "none": lambda n: None,
    "bool": lambda n: n % 2 == 0,
    "int": lambda n: n - 20,
    "float": lambda n: n / 8,
    "str": lambda n: f"k{n:02}",
    "bytes": lambda n: bytes([n + 1]),
    "datetime": lambda n: T0 + timedelta(minutes=n),
    "tuple(str)": lambda n: ("s", n),
    "tuple(int)": lambda n: (n, "x"),
    "empty tuple": lambda n: (),
}


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(KEY_KINDS)), min_size=1, max_size=2),
    numbers=st.lists(st.integers(0, 40), min_size=0, max_size=40),
    node_size=st.integers(4, 6),
    appended=st.integers(0, 3),
    bound_kind=st.sampled_from(sorted(set(KEY_KINDS) - {"none"})),  # None is no bound: the lack of one
    bound_number=st.integers(-1, 41),
    side=st.sampled_from(["ge", "gt", "le", "lt", "eq"]),
    python=st.booleans(),
)
def test_a_bound_is_refused_exactly_when_every_key_has_one_class_and_it_another(
    kinds: list[str],
    numbers: list[int],
    node_size: int,
    appended: int,
    bound_kind: str,
    bound_number: int,
    side: str,
    python: bool,
) -> None:
    """Against the definition: refused iff the keys share one class (type; for tuples, the type of
    the first element; between tuples, the empty tuple fits and is fitted by any) and the bound has
    another; else the count a scan gives."""
    keys = sorted(
        {KEY_KINDS[kinds[index % len(kinds)]](number) for index, number in enumerate(numbers)},
        key=encode_key,
    )

    def key_class(key: Any) -> tuple[str, ...]:
        if type(key) is tuple:
            return ("tuple", key_class(key[0])[0]) if key else ("tuple",)
        return ("number",) if type(key) in (int, float) else (type(key).__name__,)

    bound = KEY_KINDS[bound_kind](bound_number)
    classes = {key_class(key) for key in keys}
    keys_class = next(iter(classes)) if len(classes) == 1 else None
    fits = (
        keys_class is None
        or key_class(bound) == keys_class
        or (key_class(bound)[0] == keys_class[0] == "tuple" and ("tuple",) in (key_class(bound), keys_class))
    )
    with pure_python() if python else nullcontext(), tallytree.open_memory() as db:
        events = db.aggregate("events", values=("n",), node_size=node_size)
        split = max(0, len(keys) - appended)
        with db.write() as tx:
            events.insert_many(tx, [(key, index, (1,)) for index, key in enumerate(keys[:split])])
        for index in range(split, len(keys)):
            with db.write() as tx:
                events.insert(tx, keys[index], index, (1,))
        with db.read() as tx:
            if fits:
                assert events.count(tx, **{side: bound}) == _brute_count(keys, {side: bound})
                assert events.totals(tx, **{side: bound}).count == _brute_count(keys, {side: bound})
            else:
                with pytest.raises(tallytree.BoundKeyTypeError):
                    events.count(tx, **{side: bound})
                with pytest.raises(tallytree.BoundKeyTypeError):
                    events.totals(tx, **{side: bound})


def test_a_write_transaction_checks_bounds_against_its_own_changes(
    kernels_or_python: str, db: tallytree.Database
) -> None:
    """Inside a write transaction its own changes count: a namespace whose last other-typed key was
    just replaced (same count and sums, so a root record equal to the one before) refuses a bound of
    that type, and one that just got such a key takes it."""
    events = db.aggregate("events", values=("n",), node_size=4)
    with db.write() as tx:
        events.insert_many(tx, [(n, n, (1,)) for n in range(3)] + [("s", 3, (1,))])  # one leaf
        assert events.count(tx, ge="a") == 1  # ints and a str: any bound
        events.replace(tx, "s", 3, new_key=1.5)  # into the same leaf
        with pytest.raises(tallytree.BoundKeyTypeError):
            events.count(tx, ge="a")
        events.replace(tx, 1.5, 3, new_key="s")
        assert events.count(tx, ge="a") == 1
        assert events.totals(tx, lt="a").count == 3
