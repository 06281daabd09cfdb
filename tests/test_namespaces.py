"""``Aggregate.namespaces()``: bounds on the namespace value, ``after=``, ``limit=``, ``reverse=``.

The listing is checked against a plain model (namespace -> count and sum, ordered by a small
comparator of its own, never by tallytree's encoder) with Hypothesis, over both backends and with the C
kernels and without, in read transactions and inside a write transaction holding uncommitted changes
(namespaces filled, emptied and new). One test counts the ROOTS records the LMDB scan yields, to show
that a page deep into many namespaces reads only that page.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import number_kinds, pure_python, strict, value_order
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree import (
    ArgumentTypeError,
    BoundsError,
    BoundsTypeError,
    Item,
    Position,
    TransactionError,
    UnsupportedKeyTypeError,
)
from tallytree._lmdb import _LmdbTxn

NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# ------------------------------------------------------------------ the model's order


def exact_order(value: Any) -> tuple[Any, ...]:
    return (value_order(value), number_kinds(value))


def in_bounds(namespace: Any, bounds: dict[str, Any]) -> bool:
    """The documented meaning of the bounds of every read, applied to a namespace value."""
    here = value_order(namespace)
    if "prefix" in bounds:
        prefix = bounds["prefix"]
        return (
            type(namespace) is tuple
            and len(namespace) >= len(prefix)
            and value_order(namespace[: len(prefix)]) == value_order(prefix)
        )
    if "eq" in bounds:
        return here == value_order(bounds["eq"])
    tests = {
        "ge": lambda there: here >= there,
        "gt": lambda there: here > there,
        "le": lambda there: here <= there,
        "lt": lambda there: here < there,
    }
    return all(tests[name](value_order(bound)) for name, bound in bounds.items())


Model = dict[tuple[Any, ...], tuple[Any, int, int]]  # exact order -> (namespace, count, sum)


def expected(model: Model, query: dict[str, Any]) -> list[Any]:
    spaces = [model[order] for order in sorted(model)]
    bounds = {name: query[name] for name in ("ge", "gt", "le", "lt", "prefix", "eq") if name in query}
    chosen = [space for space in spaces if in_bounds(space[0], bounds)]
    reverse = query.get("reverse", False)
    if reverse:
        chosen.reverse()
    if "after" in query:
        mark = exact_order(query["after"])
        chosen = [
            space
            for space in chosen
            if (exact_order(space[0]) < mark if reverse else exact_order(space[0]) > mark)
        ]
    if query.get("limit") is not None:
        chosen = chosen[: query["limit"]]
    return [(strict(namespace), count, total) for namespace, count, total in chosen]


def listed(aggregate: tallytree.Aggregate, tx: tallytree.Transaction, query: dict[str, Any]) -> list[Any]:
    return [
        (strict(namespace), totals.count, totals.v) for namespace, totals in aggregate.namespaces(tx, **query)
    ]


# ------------------------------------------------------------------ strategies

POOL: list[Any] = [
    None, False, True, -1, 0, 1, 1.0, 2.5, "", "a", "org:1", "org:2", b"", b"x", NOON,
    (), ("org",), ("org", 1), ("org", 1.0), ("org", 2), ("org", 1, "user", 3), ("org", 1, "user", 3.0),
    ("org", 1, "user", 4), ("org", 1.0, "user", 4), ("org", 2, "user", 1), ("team", "a"),
]  # fmt: skip
EXTRA_BOUNDS: list[Any] = [
    -5, 0.5, 3, math.inf, -math.inf, "b", "org:", "zz", b"zz", NOON + timedelta(seconds=1),
    ("org", 1, "user"), ("org", 1.5), ("zz",),
]  # fmt: skip
PREFIXES: list[tuple[Any, ...]] = [
    (), ("org",), ("org", 1), ("org", 1.0), ("org", 1, "user"), ("org", 1, "user", 3), ("org", 3),
    ("team",), ("zz",),
]  # fmt: skip

bound_values = st.sampled_from([value for value in POOL + EXTRA_BOUNDS if value is not None])


@st.composite
def queries(draw: st.DrawFn) -> dict[str, Any]:
    query: dict[str, Any] = {}
    kind = draw(st.sampled_from(["none", "range", "range", "prefix", "eq"]))
    if kind == "prefix":
        query["prefix"] = draw(st.sampled_from(PREFIXES))
    elif kind == "eq":
        query["eq"] = draw(bound_values)
    elif kind == "range":
        lower = draw(st.sampled_from([None, "ge", "gt"]))
        upper = draw(st.sampled_from([None, "le", "lt"]))
        if lower:
            query[lower] = draw(bound_values)
        if upper:
            query[upper] = draw(bound_values)
    if draw(st.booleans()):
        query["after"] = draw(st.sampled_from(POOL + EXTRA_BOUNDS))
    query["limit"] = draw(st.none() | st.integers(1, 6))
    query["reverse"] = draw(st.booleans())
    return query


namespaces = st.sampled_from(POOL)
changes = st.lists(st.tuples(st.sampled_from(["insert", "insert", "clear"]), namespaces), max_size=12)


@contextmanager
def opened(backend: str) -> Iterator[tallytree.Database]:
    if backend == "memory":
        with tallytree.open_memory() as db:
            yield db
        return
    directory = tempfile.mkdtemp(prefix="tallytree-namespaces-")
    try:
        with tallytree.open(Path(directory) / "db", durable=False) as db:
            yield db
    finally:
        shutil.rmtree(directory)


def insert(
    aggregate: tallytree.Aggregate, tx: tallytree.WriteTransaction, model: Model, namespace: Any
) -> None:
    order = exact_order(namespace)
    _, count, total = model.get(order, (namespace, 0, 0))
    aggregate.insert(tx, count, "x", (count + 1,), namespace=namespace)  # keys 0, 1, 2... per namespace
    model[order] = (namespace, count + 1, total + count + 1)


@pytest.mark.parametrize("kernels", ["built", "python"])
@pytest.mark.parametrize("backend", ["memory", "lmdb"])
@settings(max_examples=150, deadline=None)
@given(
    stored=st.lists(namespaces, max_size=25),
    uncommitted=changes,
    asked=st.lists(queries(), min_size=1, max_size=6),
    paged=queries(),
)
def test_namespaces_match_the_model(
    backend: str,
    kernels: str,
    stored: list[Any],
    uncommitted: list[tuple[str, Any]],
    asked: list[dict[str, Any]],
    paged: dict[str, Any],
) -> None:
    model: Model = {}
    with pure_python() if kernels == "python" else nullcontext(), opened(backend) as db:
        aggregate = db.aggregate("spaces", values=("v",), node_size=4)
        bystander = db.aggregate("bystander")  # the trees of another aggregate sort around its own
        with db.write() as tx:
            for index, namespace in enumerate(stored):
                insert(aggregate, tx, model, namespace)
                bystander.insert(tx, 0, index, namespace=namespace)
        with db.read() as tx:
            for query in asked:
                assert listed(aggregate, tx, query) == expected(model, query), query
        with db.write() as tx:  # uncommitted: namespaces filled, emptied and new, merged with the stored
            for change, namespace in uncommitted:
                if change == "insert":
                    insert(aggregate, tx, model, namespace)
                else:
                    aggregate.clear(tx, namespace=namespace)
                    model.pop(exact_order(namespace), None)
            for query in asked:
                assert listed(aggregate, tx, query) == expected(model, query), query
            check_pages(aggregate, tx, model, paged)
        with db.read() as tx:
            for query in asked:
                assert listed(aggregate, tx, query) == expected(model, query), query
            check_pages(aggregate, tx, model, paged)


def check_pages(
    aggregate: tallytree.Aggregate, tx: tallytree.Transaction, model: Model, query: dict[str, Any]
) -> None:
    """Pages of ``limit``, each after the last namespace of the one before, list what one call lists."""
    whole = {name: value for name, value in query.items() if name not in ("after", "limit")}
    limit = query["limit"] or 3
    pages = [list(aggregate.namespaces(tx, **whole, limit=limit))]
    while len(pages[-1]) == limit:
        pages.append(list(aggregate.namespaces(tx, **whole, after=pages[-1][-1][0], limit=limit)))
    got = [(strict(namespace), totals.count, totals.v) for page in pages for namespace, totals in page]
    assert got == expected(model, whole)


# ------------------------------------------------------------------ focused cases


def test_after_none_is_after_the_default_namespace(db: tallytree.Database) -> None:
    """None is a namespace (the default one): after=None continues after it, so paging in reverse, where
    it comes last, ends; leaving after= out starts at the first."""
    aggregate = db.aggregate("spaces")
    with db.write() as tx:
        for namespace in (None, "a", "b"):
            aggregate.insert(tx, 1, "x", namespace=namespace)
    with db.read() as tx:
        assert [space for space, _ in aggregate.namespaces(tx, after=None)] == ["a", "b"]
        assert [space for space, _ in aggregate.namespaces(tx, after=None, reverse=True)] == []
        assert [space for space, _ in aggregate.namespaces(tx, after="a", reverse=True)] == [None]
        seen: list[Any] = []
        page = list(aggregate.namespaces(tx, reverse=True, limit=1))
        while page:
            seen.append(page[0][0])
            page = list(aggregate.namespaces(tx, reverse=True, limit=1, after=page[0][0]))
        assert seen == ["b", "a", None]


def test_prefix_lists_the_namespaces_under_a_tuple(db: tallytree.Database) -> None:
    usage = db.aggregate("usage", values=("tokens",))
    with db.write() as tx:
        for org in (6, 7, 8):
            for user in (1, 2, 3):
                usage.insert(tx, 0, "x", (org * user,), namespace=("org", org, "user", user))
        usage.insert(tx, 0, "x", (1,), namespace=("org", 7))  # the prefix itself is a namespace too
        usage.insert(tx, 0, "x", (1,), namespace="org:7")
    with db.read() as tx:
        listed = [(space, totals.tokens) for space, totals in usage.namespaces(tx, prefix=("org", 7))]
        assert listed == [(("org", 7), 1), *((("org", 7, "user", user), 7 * user) for user in (1, 2, 3))]
        after = usage.namespaces(tx, prefix=("org", 7), after=("org", 7, "user", 1), limit=1)
        assert [space for space, _ in after] == [("org", 7, "user", 2)]
        assert [space for space, _ in usage.namespaces(tx, prefix=("org", 7, "user"), reverse=True)] == [
            ("org", 7, "user", 3),
            ("org", 7, "user", 2),
            ("org", 7, "user", 1),
        ]


def test_bad_arguments_raise_typed_errors_at_the_call(db: tallytree.Database) -> None:
    """Each bad argument raises when namespaces() is called, before any iteration, as the key bounds of
    the reads do; a namespace has no ids, so a Position or an Item is no bound of it."""
    aggregate = db.aggregate("spaces")
    with db.write() as tx:
        aggregate.insert(tx, 1, "x", namespace="a")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"ge": 1, "gt": 2}, BoundsError, "at most one lower bound"),
        ({"prefix": ("a",), "lt": "b"}, BoundsError, "prefix= cannot be combined"),
        ({"prefix": "a"}, BoundsTypeError, "prefix= takes a tuple"),
        ({"ge": Position("a", "x")}, BoundsTypeError, "namespace values as bounds"),
        ({"lt": Item("a", "x")}, BoundsTypeError, "namespace values as bounds"),
        ({"eq": Position("a", "x")}, BoundsTypeError, "namespace values as bounds"),
        ({"ge": [1]}, UnsupportedKeyTypeError, "list"),
        ({"after": [1]}, UnsupportedKeyTypeError, "namespace"),
        ({"limit": 0}, BoundsError, "limit must be a positive int"),
        ({"limit": "3"}, BoundsTypeError, "limit must be a positive int"),
        ({"limit": True}, BoundsTypeError, "limit must be a positive int"),
        ({"reverse": 1}, ArgumentTypeError, "reverse= takes True or False"),
    ]
    with db.read() as tx:
        for arguments, error, message in cases:
            with pytest.raises(error, match=message):
                aggregate.namespaces(tx, **arguments)  # no next(): raised at the call
        assert [space for space, _ in aggregate.namespaces(tx, ge="b", le="a")] == []  # inverted: nothing


def test_changes_during_a_bounded_listing_raise(db: tallytree.Database) -> None:
    """The rule of namespaces() holds with bounds, after= and limit=: changing the aggregate while
    listing raises TransactionError, at the next namespace or at the end (the end of a limited page too)."""
    spaces = db.aggregate("spaces")
    with db.write() as tx:
        for namespace in ("a", "b", "c", "d"):
            spaces.insert(tx, 1, "x", namespace=namespace)
    with pytest.raises(TransactionError, match=r"list\(agg.namespaces\(tx\)\)"), db.write() as tx:
        listed = spaces.namespaces(tx, ge="b")
        assert next(listed)[0] == "b"
        spaces.insert(tx, 2, "y", namespace="bb")  # a new namespace
        next(listed)
    with pytest.raises(TransactionError), db.write() as tx:
        spaces.insert(tx, 2, "y", namespace="c")  # changed before the listing began
        listed = spaces.namespaces(tx, after="a", limit=2, reverse=False)
        assert [next(listed)[0], next(listed)[0]] == ["b", "c"]
        spaces.insert(tx, 3, "y", namespace="c")  # ... and again, once passed
        next(listed)  # the end of the page
    with pytest.raises(TransactionError), db.write() as tx:
        spaces.delete(tx, 1, "x", namespace="c")  # emptied before the listing began
        listed = spaces.namespaces(tx, reverse=True, limit=3)
        assert [next(listed)[0], next(listed)[0]] == ["d", "b"]
        spaces.insert(tx, 1, "x", namespace="c")  # refilled once passed
        assert next(listed)[0] == "a"
        next(listed)  # the end of the page
    with db.write() as tx:  # changes after the listing are fine
        listed = spaces.namespaces(tx, prefix=(), limit=1)
        assert list(listed) == []
        spaces.insert(tx, 1, "x", namespace=("t",))
        assert [space for space, _ in spaces.namespaces(tx, prefix=())] == [("t",)]


# ------------------------------------------------------------------ laziness, counted


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The keys of the records the LMDB scans yield, as they are pulled."""
    pulled: list[bytes] = []
    scan = _LmdbTxn.scan

    def counting(
        self: _LmdbTxn, table: int, start: bytes, stop: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        for record in scan(self, table, start, stop, reverse):
            pulled.append(record[0])
            yield record

    monkeypatch.setattr(_LmdbTxn, "scan", counting)
    return pulled


def user_namespaces(tmp_path: Path) -> tuple[tallytree.Database, tallytree.Aggregate]:
    """An LMDB database whose aggregate ``usage`` has 5,000 namespaces ``("org", o, "user", u)``."""
    db = tallytree.open(tmp_path / "many", durable=False)
    usage = db.aggregate("usage", values=("tokens",))
    with db.write() as tx:
        for org in range(50):
            for user in range(100):
                usage.insert(tx, 0, "x", (user,), namespace=("org", org, "user", user))
    return db, usage


def test_a_page_deep_into_many_namespaces_reads_only_that_page(tmp_path: Path, counted: list[bytes]) -> None:
    """A page of 10 after the 4,050th of 5,000 namespaces pulls 10 root records from the LMDB scan (one
    seek, then one step each), forwards, in reverse, under a prefix, and in a write transaction with
    uncommitted changes; before, namespaces() read and sorted every record of the aggregate first."""
    db, usage = user_namespaces(tmp_path)
    mark = ("org", 40, "user", 50)
    with db:
        with db.read() as tx:
            assert next(usage.namespaces(tx))[0] == ("org", 0, "user", 0)  # the first one: one record
            assert len(counted) == 1
            counted.clear()
            page = list(usage.namespaces(tx, after=mark, limit=10))
            assert [space for space, _ in page] == [("org", 40, "user", user) for user in range(51, 61)]
            assert [totals.tokens for _, totals in page] == list(range(51, 61))
            assert len(counted) == 10
            counted.clear()
            page = list(usage.namespaces(tx, after=mark, limit=10, reverse=True))
            assert [space for space, _ in page] == [("org", 40, "user", user) for user in range(49, 39, -1)]
            assert len(counted) == 10
            counted.clear()
            page = list(usage.namespaces(tx, prefix=("org", 45), limit=10))
            assert [space for space, _ in page] == [("org", 45, "user", user) for user in range(10)]
            assert len(counted) == 10
            counted.clear()
            first = next(usage.namespaces(tx, ge=("org", 49)))  # one seek to the bound
            assert first[0] == ("org", 49, "user", 0) and len(counted) == 1
            counted.clear()
        with db.write() as tx:
            usage.clear(tx, namespace=("org", 40, "user", 52))  # emptied
            usage.insert(tx, 1, "y", (1,), namespace=("org", 40, "user", 53))  # changed
            usage.insert(tx, 0, "x", (7,), namespace=("org", 40, "user", 53.5))  # new
            page = list(usage.namespaces(tx, after=mark, limit=10))
            assert [space for space, _ in page] == [
                ("org", 40, "user", user) for user in (51, 53, 53.5, 54, 55, 56, 57, 58, 59, 60)
            ]
            assert page[1][1].count == 2 and page[2][1].tokens == 7
            assert len(counted) <= 11  # the 9 stored ones listed, the emptied one, and one looked ahead
            tx.abort()
