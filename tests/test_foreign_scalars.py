"""numpy and pandas scalars as keys, ids, namespaces, values and bounds, in C and in pure Python.

A numpy integer is its int, a numpy float (float16 to float64) its float and a numpy bool a bool, with
the rules of those types; a numpy datetime64 is refused as a naive datetime is; a pandas Timestamp is
its instant, refused when it holds nanoseconds or is NaT. What is read back is plain Python: the same
database as the one written with Python scalars. numpy is a test dependency only (the library duck-types
it, see ``_keys.foreign_scalar``); these tests skip without it, and those of pandas without pandas.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import pure_python, snapshot, strict

import tallytree

np = pytest.importorskip("numpy")

FIELDS = ("cost", "tokens")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
INTEGER_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
FLOAT_TYPES = ["float16", "float32", "float64"]


@pytest.fixture(params=["built", "python"])
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs with the C kernels (when built) and with their pure-Python twins."""
    with pure_python() if request.param == "python" else nullcontext():
        yield request.param


def _fill(db: tallytree.Database, rows: list[tuple[Any, Any, Any, Any]], batch: bool) -> None:
    """Write ``(namespace, key, id, values)`` rows into aggregate ``costs``, one insert each or in
    batches per namespace."""
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        if batch:
            namespaces: dict[Any, list[tuple[Any, Any, Any]]] = {}
            for namespace, key, item_id, values in rows:
                namespaces.setdefault(namespace, []).append((key, item_id, values))
            for namespace, items in namespaces.items():
                costs.insert_many(tx, items, namespace=namespace)
        else:
            for namespace, key, item_id, values in rows:
                costs.insert(tx, key, item_id, values, namespace=namespace)


@pytest.mark.parametrize("batch", [False, True], ids=["insert", "insert_many"])
@pytest.mark.parametrize("dtype", INTEGER_TYPES)
def test_a_numpy_integer_is_its_int_everywhere(
    kernels: str, db: tallytree.Database, dtype: str, batch: bool
) -> None:
    kind = getattr(np, dtype)
    plain = [(3, 7, 100 + n, (n, 2 * n)) for n in range(5)]
    given = [
        (kind(space), kind(key), kind(item_id), (kind(a), kind(b))) for space, key, item_id, (a, b) in plain
    ]
    _fill(db, given, batch)
    reference = tallytree.open_memory()
    _fill(reference, plain, batch)
    assert snapshot(db) == snapshot(reference)  # strict: ints read back as int, not numpy
    costs = db.aggregate("costs")
    with db.read() as tx:
        assert costs.count(tx, namespace=kind(3), ge=kind(7)) == 5
        assert costs.rank(tx, kind(7), kind(102), namespace=kind(3)) == 2
        assert strict(costs.get(tx, kind(7), kind(104), namespace=kind(3))) == strict(
            tallytree.Item(7, 104, (4, 8))
        )


def test_the_largest_numpy_integers_are_their_ints(kernels: str, db: tallytree.Database) -> None:
    """A uint64 beyond int64 is a key, an id and a value like the int it is (values reach 2**64 - 1)."""
    costs = db.aggregate("costs", values=FIELDS)
    big = np.uint64(2**64 - 1)
    with db.write() as tx:
        costs.insert(tx, big, big, (big, np.int64(-(2**63))))
    with db.read() as tx:
        (item,) = costs.items(tx)
        assert strict(item) == strict(tallytree.Item(2**64 - 1, 2**64 - 1, (2**64 - 1, -(2**63))))


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_a_numpy_float_is_its_float(kernels: str, db: tallytree.Database, dtype: str) -> None:
    kind = getattr(np, dtype)
    value = kind(0.1)  # not 0.1 below float64: the float that it holds exactly
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        costs.insert(tx, value, "a", (value, kind(2.5)), namespace=kind(1.5))
        costs.insert_many(tx, [(kind(-1.0), "b", (kind(0.25), kind(4)))], namespace=kind(1.5))
    with db.read() as tx:
        items = list(costs.items(tx, namespace=1.5))
        assert strict(items) == strict(
            [
                tallytree.Item(-1.0, "b", (0.25, 4.0)),
                tallytree.Item(float(value), "a", (float(value), 2.5)),
            ]
        )
        assert strict([space for space, _ in costs.namespaces(tx)]) == strict([1.5])
        assert costs.count(tx, namespace=kind(1.5), ge=value) == 1
        assert costs.count(tx, namespace=kind(1.5), eq=float(value)) == 1


def test_numpy_floats_keep_the_float_rules(kernels: str, db: tallytree.Database) -> None:
    """NaN is no key and no value, infinity a key but no value; a float is no id."""
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        with pytest.raises(tallytree.InvalidKeyError, match="NaN"):
            costs.insert(tx, np.float32("nan"), "a", (1, 1))
        with pytest.raises(tallytree.InvalidValueError, match="not finite"):
            costs.insert(tx, 1, "a", (np.float32("inf"), 1))
        with pytest.raises(tallytree.InvalidValueError, match="not finite"):
            costs.insert_many(tx, [(1, "a", (np.float64("nan"), 1))])
        with pytest.raises(tallytree.UnsupportedKeyTypeError, match="ids must be str, int or bytes"):
            costs.insert(tx, 1, np.float32(1), (1, 1))
        costs.insert(tx, np.float32("inf"), "a", (1, 1))
    with db.read() as tx:
        assert strict(list(costs.items(tx))) == strict([tallytree.Item(float("inf"), "a", (1, 1))])


def test_a_numpy_bool_is_a_bool(kernels: str, db: tallytree.Database) -> None:
    """A key like True (not the number 1), and refused as a value or an id, as bool is."""
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        costs.insert(tx, np.True_, "a", (1, 1), namespace=np.False_)
        costs.insert_many(tx, [(np.False_, "b", (1, 1))], namespace=np.False_)
        with pytest.raises(tallytree.InvalidValueError, match="bool is not accepted"):
            costs.insert(tx, 1, "c", (np.True_, 1))
        with pytest.raises(tallytree.UnsupportedKeyTypeError, match="not bool"):
            costs.insert(tx, 1, np.True_, (1, 1))
    with db.read() as tx:
        assert strict(list(costs.items(tx, namespace=False))) == strict(
            [tallytree.Item(False, "b", (1, 1)), tallytree.Item(True, "a", (1, 1))]
        )
        assert costs.count(tx, namespace=False, eq=np.True_) == 1
        assert costs.count(tx, namespace=False, eq=True) == 1


def test_a_numpy_datetime64_is_refused_as_a_naive_datetime(kernels: str, db: tallytree.Database) -> None:
    costs = db.aggregate("costs", values=FIELDS)
    for value in (np.datetime64("2024-05-01"), np.datetime64("2024-05-01T12:00:00.000000001")):
        with db.write() as tx:
            for write in (
                lambda tx, value=value: costs.insert(tx, value, "a", (1, 1)),
                lambda tx, value=value: costs.insert_many(tx, [(value, "a", (1, 1))]),
                lambda tx, value=value: costs.insert(tx, 1, "a", (1, 1), namespace=value),
                lambda tx, value=value: costs.count(tx, ge=value),
            ):
                with pytest.raises(tallytree.InvalidKeyError, match=r"holds no timezone.*tz='UTC'"):
                    write(tx)
            assert not tx.changed


class _Stamp(datetime):
    """A datetime that holds nanoseconds, as pandas.Timestamp does (for the tests without pandas)."""

    nanosecond = 0


def test_a_datetime_subclass_with_nanoseconds_or_missing_is_refused(
    kernels: str, db: tallytree.Database
) -> None:
    """A key holds microseconds: an instant with nanoseconds is refused rather than cut (two instants
    a nanosecond apart would be one key); NaT, a datetime not equal to itself, is a missing time."""
    costs = db.aggregate("costs", values=FIELDS)
    exact = _Stamp(2024, 5, 1, 12, tzinfo=UTC)
    fine = _Stamp(2024, 5, 1, 12, tzinfo=UTC)
    fine.nanosecond = 5  # type: ignore[misc]
    with db.write() as tx:
        costs.insert(tx, exact, "a", (1, 1))
        with pytest.raises(tallytree.InvalidKeyError, match=r"5 nanosecond.*floor\('us'\)"):
            costs.insert(tx, fine, "b", (1, 1))
        with pytest.raises(tallytree.InvalidKeyError, match="nanosecond"):
            costs.count(tx, ge=fine)
    with db.read() as tx:
        assert strict(list(costs.items(tx))) == strict(
            [tallytree.Item(datetime(2024, 5, 1, 12, tzinfo=UTC), "a", (1, 1))]
        )


def test_pandas_timestamps(kernels: str, db: tallytree.Database) -> None:
    """An aware Timestamp is its instant, in any zone (read back as a datetime in UTC); nanoseconds,
    NaT and naive Timestamps are refused with InvalidKeyError, so is a datetime64 column's value."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "ts": pd.to_datetime(["2024-05-01 12:00", "2024-05-01 13:00", "2024-05-01 14:00"], utc=True),
            "id": np.array([1, 2, 3], dtype="int64"),
            "cost": np.array([0.5, 0.25, 1.0], dtype="float32"),
            "tokens": np.array([10, 20, 30], dtype="int64"),
        }
    )
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        # the user's line, and the same columns as numpy arrays (whose items are numpy scalars)
        assert (
            costs.insert_many(
                tx, zip(frame.ts, frame.id, zip(frame.cost, frame.tokens, strict=True), strict=True)
            )
            == 3
        )
        columns = (frame.ts.dt.tz_convert("Europe/Paris"), frame.id.to_numpy() + 10)
        values = zip(frame.cost.to_numpy(), frame.tokens.to_numpy(), strict=True)
        assert costs.insert_many(tx, zip(*columns, values, strict=True), namespace="numpy") == 3
        for bad, match in (
            (pd.Timestamp("2024-05-01 12:00:00.000000001", tz="UTC"), "nanosecond"),
            (pd.NaT, r"missing time \(NaT\)"),
            (pd.Timestamp("2024-05-01 12:00"), "naive datetime"),
            (frame.ts.dt.tz_localize(None).to_numpy()[0], "holds no timezone"),  # a datetime64[ns]
        ):
            with pytest.raises(tallytree.InvalidKeyError, match=match):
                costs.insert(tx, bad, 99, (1, 1))
    with db.read() as tx:
        noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
        expected = [
            tallytree.Item(noon + timedelta(hours=n), n + 1, (cost, 10 * (n + 1)))
            for n, cost in enumerate([0.5, 0.25, 1.0])
        ]
        assert strict(list(costs.items(tx))) == strict(expected)
        moved = [tallytree.Item(item.key, item.id + 10, item.values) for item in expected]
        assert strict(list(costs.items(tx, namespace="numpy"))) == strict(moved)
        assert costs.count(tx, ge=frame.ts[1]) == 2


def test_other_numpy_values_are_no_keys_and_a_0d_array_is_its_scalar(
    kernels: str, db: tallytree.Database
) -> None:
    """Only numpy's bools, integers and floats up to float64 stand for a Python scalar: a longdouble
    (no float holds it), a complex, a timedelta and an array of one element are refused as other
    unsupported types are; a 0-d array is the scalar it holds."""
    costs = db.aggregate("costs", values=FIELDS)
    with db.write() as tx:
        for value in (np.longdouble(1.5), np.complex64(1), np.timedelta64(5, "ns"), np.array([5])):
            with pytest.raises(tallytree.UnsupportedKeyTypeError, match="has unsupported type"):
                costs.insert(tx, value, "a", (1, 1))
            with pytest.raises(tallytree.InvalidValueError, match="values are ints or floats"):
                costs.insert(tx, 1, "a", (value, 1))
        costs.insert(tx, np.array(5), np.array(6), (np.array(7), np.array(0.5)))
    with db.read() as tx:
        assert strict(list(costs.items(tx))) == strict([tallytree.Item(5, 6, (7, 0.5))])
