"""numpy and pandas values in the rest of the API: table documents and ids, and every int argument.

A document's numpy bool, integer and float (float16/32) scalars, at any depth, are stored as the
Python bool, int and float they hold, and a timezone-aware pandas Timestamp as its instant: the stored
bytes are those of the same document written with Python values. What no stored value stands for is
refused with InvalidDocumentError, naming where it is and what to convert it to, and writes nothing.
Every int argument (an index, a limit, a count, a size) takes a numpy integer as its int and still
refuses bools and floats. A damaged document count of a table is a CorruptDatabaseError.
(``test_foreign_scalars`` covers keys, ids, namespaces, values and bounds of aggregates.)
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import pure_python, snapshot, strict

import tallytree
from tallytree._table import encode_doc

np = pytest.importorskip("numpy")

T0 = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
INTEGER_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.fixture(params=["built", "python"])
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs with the C kernels (when built) and with their pure-Python twins."""
    with pure_python() if request.param == "python" else nullcontext():
        yield request.param


# ------------------------------------------------------------------ documents


def _numpy_doc(n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A document of numpy scalars at every depth, and the same document in Python values."""
    given = {
        "shop": np.str_(f"s{n % 3}"),
        "total": np.int64(10 * n),
        "small": getattr(np, INTEGER_TYPES[n % len(INTEGER_TYPES)])(n),
        "price": np.float32(0.5 + n),
        "half": np.float16(0.25),
        "paid": np.bool_(n % 2 == 0),
        "lines": [np.int32(n), {"qty": np.uint16(2), "tags": (np.True_, np.float32(0.1))}],
        "by_day": {np.int64(1): np.int8(-n)},
        "zero_d": np.array(7, dtype="int16"),
    }
    plain = {
        "shop": f"s{n % 3}",
        "total": 10 * n,
        "small": n,
        "price": 0.5 + n,
        "half": 0.25,
        "paid": n % 2 == 0,
        "lines": [n, {"qty": 2, "tags": [True, float(np.float32(0.1))]}],
        "by_day": {1: -n},
        "zero_d": 7,
    }
    return given, plain


def test_numpy_scalars_in_documents_are_stored_as_python_values(kernels: str, db: tallytree.Database) -> None:
    table = db.table("orders")
    by_shop = table.aggregate("by_shop", key="shop", values=("total", "price"))
    docs = [_numpy_doc(n) for n in range(6)]
    for given, plain in docs:
        assert encode_doc(given, 1, "t") == encode_doc(plain, 1, "t")
    with db.write() as tx:
        assert table.insert(tx, docs[0][0]) == 1
        assert table.insert_many(tx, [given for given, _ in docs[1:4]]) == [2, 3, 4]
        table.insert(tx, docs[4][1], id=5)
        assert strict(table.update(tx, 5, {"total": np.uint64(2**64 - 1)})) == strict(
            {**docs[4][1], "total": 2**64 - 1}
        )
        table.replace(tx, 5, docs[4][0])
        assert table.upsert(tx, 5, docs[4][0]) == "unchanged"  # the same as what is stored
        assert table.upsert(tx, 6, docs[5][0]) == "inserted"
    with db.read() as tx:
        assert strict(list(table.items(tx))) == strict([(n + 1, plain) for n, (_, plain) in enumerate(docs)])
        totals = by_shop.totals(tx, eq="s1")
        assert tallytree.verify(tx, by_shop, table).ok
    assert strict(totals) == strict(
        tallytree.Totals(2, ("total", "price"), (10 + 40, float(np.float32(1.5)) + float(np.float32(4.5))))
    )


def test_aware_pandas_timestamps_in_documents_are_their_instant(kernels: str, db: tallytree.Database) -> None:
    pd = pytest.importorskip("pandas")
    table = db.table("events")
    by_time = table.aggregate("by_time", key="at")
    paris = pd.Timestamp("2024-07-01 14:30:00.000001", tz="Europe/Paris")
    given = {"at": pd.Timestamp(T0), "also": [paris], "fixed": pd.Timestamp(T0).tz_convert("+05:30")}
    plain = {"at": T0, "also": [datetime(2024, 7, 1, 12, 30, 0, 1, tzinfo=UTC)], "fixed": T0}
    assert encode_doc(given, 1, "t") == encode_doc(plain, 1, "t")
    with db.write() as tx:
        table.insert(tx, given, id="e1")
    with db.read() as tx:
        stored = table.get(tx, "e1")
        assert strict(stored) == strict(plain)
        assert stored == given  # equal instants
        assert [item.key for item in by_time.items(tx)] == [T0]


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("nanoseconds", "nanosecond(s) beyond its microseconds"),
        ("naive", "is a naive datetime"),
        ("nat", "missing time (NaT)"),
        ("datetime64", "numpy datetime64"),
        ("array", "value.tolist()"),
        ("series", "value.tolist()"),
        ("set", "sorted(value)"),
        ("longdouble", "float(value)"),
        ("naive datetime", "is a naive datetime"),
    ],
)
def test_values_that_stand_for_no_stored_value_are_refused_with_a_hint(
    db: tallytree.Database, value: str, found: str
) -> None:
    """Refused at any depth, naming where; nothing is written. A document of numpy scalars beside it
    is stored (the refusal is of that value, not of numpy)."""
    pd = pytest.importorskip("pandas")
    bad = {
        "nanoseconds": pd.Timestamp("2024-01-01 00:00:00.000000005", tz="UTC"),
        "naive": pd.Timestamp("2024-01-01"),
        "nat": pd.NaT,
        "datetime64": np.datetime64("2024-01-01"),
        "array": np.array([1, 2]),
        "series": pd.Series([1, 2]),
        "set": {1, 2},
        "longdouble": np.longdouble(1.5),
        "naive datetime": datetime(2024, 1, 1),
    }[value]
    table = db.table("t")
    table.aggregate("by_k", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": np.int64(1)}, id=1)
    before = snapshot(db)
    with db.write() as tx:
        with pytest.raises(
            tallytree.InvalidDocumentError, match=r"document 2 cannot be stored: at \['x'\]\[1\]"
        ):
            table.insert(tx, {"k": np.int64(2), "x": [0, bad]}, id=2)
        with pytest.raises(tallytree.InvalidDocumentError) as info:
            table.insert_many(tx, [{"k": 3}, {"k": 4, "deep": {"y": bad}}])
        assert found in str(info.value)
        assert "at ['deep']['y']" in str(info.value)
        with pytest.raises(tallytree.InvalidDocumentError, match="cannot be stored"):
            table.update(tx, 1, {"k": bad})
        assert table.count(tx) == 1
    assert snapshot(db) == before
    with db.read() as tx:
        assert list(table.items(tx)) == [(1, {"k": 1})]


# ------------------------------------------------------------------ document ids


def test_a_numpy_integer_id_is_its_int(db: tallytree.Database) -> None:
    table = db.table("t")
    by_k = table.aggregate("by_k", key="k")
    with db.write() as tx:
        first = table.insert(tx, {"k": 1}, id=np.int64(3))
        assert strict(first) == strict(3)
        assert table.insert(tx, {"k": 2}) == 4  # the generated ids move past it, as past an int id
        assert strict(table.insert_many(tx, [(np.uint8(10), {"k": 3}), {"k": 4}])) == strict([10, 11])
        assert table.upsert(tx, np.int16(20), {"k": 5}) == "inserted"
        assert table.insert(tx, {"k": 6}) == 21
        with pytest.raises(tallytree.DuplicateItemError, match="id 3 exists"):
            table.insert(tx, {"k": 7}, id=np.int32(3))
    with db.write() as tx:
        assert table.get(tx, np.int8(3)) == {"k": 1}
        assert table.update(tx, np.int64(4), {"k": 9}) == {"k": 9}
        assert table.replace(tx, np.uint64(10), {"k": 8}) == {"k": 3}
        assert table.delete(tx, np.int64(11)) == {"k": 4}
        assert table.discard(tx, np.int64(20)) is True
        for wrong in (np.float64(3.0), np.True_):
            with pytest.raises(tallytree.UnsupportedKeyTypeError, match="ids must be str, int or bytes"):
                table.insert(tx, {"k": 1}, id=wrong)
    with db.read() as tx:
        assert strict(list(table.ids(tx))) == strict([3, 4, 10, 21])
        assert [item.id for item in by_k.items(tx)] == [3, 21, 10, 4]  # by key: 1, 6, 8, 9


# ------------------------------------------------------------------ int arguments


class Small(enum.IntEnum):
    TWO = 2


@pytest.fixture
def days(db: tallytree.Database) -> tallytree.Aggregate:
    """Aggregate ``days``: keys 0..9 (ids "d0".."d9", value ``key``) in namespace None, and one item in
    namespaces 1 to 5."""
    days = db.aggregate("days", values=("n",))
    with db.write() as tx:
        days.insert_many(tx, [(key, f"d{key}", (key,)) for key in range(10)])
        for namespace in range(1, 6):
            days.insert(tx, 0, "x", (1,), namespace=namespace)
    return days


def test_at_takes_a_numpy_integer_index(
    kernels: str, db: tallytree.Database, days: tallytree.Aggregate
) -> None:
    with db.read() as tx:
        for index in (np.int64(3), np.uint8(3), np.int8(-7), Small.TWO + 1):
            assert strict(days.at(tx, index)) == strict(days.at(tx, 3))
        with pytest.raises(tallytree.OutOfRangeError, match="index 10 is out of range"):
            days.at(tx, np.int64(10))
        for wrong in (True, np.True_, 3.0, np.float64(3.0), "3"):
            with pytest.raises(tallytree.ArgumentTypeError, match="index must be an int"):
                days.at(tx, wrong)


def test_limits_take_numpy_integers(kernels: str, db: tallytree.Database, days: tallytree.Aggregate) -> None:
    with db.read() as tx:
        page = days.page(tx, limit=np.int64(4))
        assert strict(page) == strict(days.page(tx, limit=4))
        assert [space for space, _ in days.namespaces(tx, limit=np.uint16(2))] == [None, 1]
        for wrong in (True, np.True_, 2.0, np.float32(2.0)):
            with pytest.raises(tallytree.BoundsTypeError, match="limit must be a positive int"):
                days.page(tx, limit=wrong)
            with pytest.raises(tallytree.BoundsTypeError, match="limit must be a positive int or None"):
                list(days.namespaces(tx, limit=wrong))
        with pytest.raises(tallytree.BoundsError, match="limit must be a positive int"):
            days.page(tx, limit=np.int64(0))


def test_random_takes_a_numpy_integer_seed(db: tallytree.Database, days: tallytree.Aggregate) -> None:
    with db.read() as tx:
        assert [days.random(tx, rng=np.int64(seed)) for seed in range(5)] == [
            days.random(tx, rng=seed) for seed in range(5)
        ]
        for wrong in (True, np.True_, [1]):
            with pytest.raises(tallytree.ArgumentTypeError, match=r"rng= takes a random\.Random or a seed"):
                days.random(tx, rng=wrong)


def test_buckets_take_numpy_counts_starts_and_widths(
    kernels: str, db: tallytree.Database, days: tallytree.Aggregate
) -> None:
    with db.read() as tx:
        plain = days.buckets(tx, start=0, width=3, count=3)
        given = days.buckets(tx, start=np.int64(0), width=np.uint8(3), count=np.int32(3))
        assert [(strict(b.start), strict(b.end), strict(b.totals)) for b in given] == [
            (strict(b.start), strict(b.end), strict(b.totals)) for b in plain
        ]
        edges = days.buckets(tx, edges=[np.int64(0), np.uint8(3), 6, np.float64(9.0)])
        assert [(strict(b.start), strict(b.end), b.count) for b in edges] == [
            (strict(0), strict(3), 3),
            (strict(3), strict(6), 3),
            (strict(6), strict(9.0), 3),
        ]
        halves = days.buckets(tx, start=np.float32(0.5), width=np.float16(2.5), count=2)
        assert [(strict(b.start), b.count) for b in halves] == [(strict(0.5), 2), (strict(3.0), 3)]
        months = days.buckets(tx, namespace="empty", start=T0, width=("month", np.int64(2)), count=np.int8(2))
        assert [(b.start, b.end) for b in months] == [
            (T0, T0.replace(month=7)),
            (T0.replace(month=7), T0.replace(month=9)),
        ]
        for wrong in (True, np.True_, 3.0, np.float64(3.0)):
            with pytest.raises(tallytree.BoundsTypeError, match="count must be an int"):
                days.buckets(tx, start=0, width=3, count=wrong)
        with pytest.raises(tallytree.BoundsError, match=r"n in \(unit, n\) is an int >= 1"):
            days.buckets(tx, start=T0, width=("month", np.True_), count=2)


def test_sizes_take_numpy_integers(tmp_path: Path) -> None:
    with tallytree.open(
        tmp_path / "db", map_size=np.int64(1 << 24), max_map_size=np.uint64(1 << 30), cache_nodes=np.int32(8)
    ) as db:
        aggregate = db.aggregate("a", node_size=np.int64(16))
        assert strict(aggregate.node_size) == strict(16)
        assert db.aggregate("a", node_size=np.int16(16)) is aggregate
        table = db.table("t")
        attached = table.aggregate("by_k", key="k", node_size=np.uint8(32))
        assert strict(attached.node_size) == strict(32)
        with db.write() as tx:
            report = aggregate.build(tx, [(key, key) for key in range(100)], memory=np.int64(1 << 20))
            assert report.items == 100
            table.insert(tx, {"k": 1, "id": 1}, id=1)
        with db.read() as tx:
            assert tallytree.verify(tx, attached, [{"k": 1, "id": 1}], examples=np.int64(1)).ok
        for wrong in (True, np.True_, 16.0, np.float64(16.0)):
            with pytest.raises(tallytree.ArgumentTypeError, match="node_size must be an int"):
                db.aggregate("b", node_size=wrong)
            with pytest.raises(tallytree.ArgumentTypeError, match="node_size must be an int"):
                table.aggregate("c", key="k", node_size=wrong)
            with db.write() as tx:
                with pytest.raises(tallytree.InvalidArgumentError, match="memory must be a positive int"):
                    aggregate.build(tx, [], memory=wrong)
                with pytest.raises(tallytree.ArgumentTypeError, match="examples= takes an int"):
                    tallytree.verify(tx, attached, [], examples=wrong)
    with tallytree.open(tmp_path / "db") as db:  # the stored definitions hold plain ints
        assert db.aggregate("a").node_size == 16
        assert db.table("t").aggregate("by_k").node_size == 32
    memory = tallytree.open_memory(cache_nodes=np.uint64(0))
    memory.close()
    for wrong in (True, np.True_, 8.0, np.float64(8.0)):
        with pytest.raises(tallytree.ArgumentTypeError, match=r"cache_nodes .* must be an int"):
            tallytree.open_memory(cache_nodes=wrong)
        with pytest.raises(tallytree.ArgumentTypeError, match=r"map_size .* must be an int"):
            tallytree.open(tmp_path / "other", map_size=wrong)
    with pytest.raises(tallytree.InvalidArgumentError, match="above max_map_size"):
        tallytree.open(tmp_path / "other", map_size=np.int64(1 << 31), max_map_size=np.int64(1 << 30))
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ a damaged document count


def test_a_damaged_document_count_is_a_corrupt_database_error(db: tallytree.Database) -> None:
    table = db.table("t")
    with db.write() as tx:
        table.insert(tx, {"k": 1})
        tx.set_meta(table._state_key, b"\x00" * 5)  # (what a damaged page could leave)
    with db.read() as tx, pytest.raises(tallytree.CorruptDatabaseError, match="is damaged: it holds 5 bytes"):
        table.count(tx)
    with db.write() as tx, pytest.raises(tallytree.CorruptDatabaseError, match="restore the database"):
        table.insert(tx, {"k": 2})
    with db.read() as tx:
        assert [problem for problem in tallytree.check(tx) if "document count" in str(problem)]


def test_a_where_filter_takes_numpy_values() -> None:
    db = tallytree.open_memory()
    orders = db.table("orders")
    paid = orders.aggregate("paid", key="day", where={"status": np.int64(2)})
    with db.write() as tx:
        orders.insert_many(
            tx, [{"day": 1, "status": 2}, {"day": 2, "status": 1}, {"day": 3, "status": np.int64(2)}]
        )
    with db.read() as tx:
        assert paid.count(tx) == 2
    assert orders.aggregate("paid", key="day", where={"status": 2}) is paid  # the same definition
