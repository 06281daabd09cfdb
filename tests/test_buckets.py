"""Aggregate.buckets: consecutive half-open ranges in one call, checked against brute force."""

from __future__ import annotations

import calendar
import random
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree._tree import Tree


def brute(items: list[tuple[Any, float]], lower: Any, upper: Any) -> tuple[int, float]:
    chosen = [cost for key, cost in items if lower <= key < upper]
    return len(chosen), sum(chosen)


def test_numeric_buckets_match_brute_force(db: tallytree.Database) -> None:
    rng = random.Random(2)
    agg = db.aggregate("nums", values=("cost",), node_size=5)
    items = {ns: [(rng.randrange(1000) / 10, rng.randrange(100)) for _ in range(300)] for ns in ("a", "b")}
    with db.write() as tx:
        for ns, rows in items.items():
            agg.insert_many(tx, [(key, i, (cost,)) for i, (key, cost) in enumerate(rows)], namespace=ns)
    with db.read() as tx:
        for ns, rows in items.items():
            buckets = agg.buckets(tx, namespace=ns, start=10, width=7.5, count=12)
            assert [b.start for b in buckets] == [10 + 7.5 * i for i in range(12)]
            assert [b.end for b in buckets] == [10 + 7.5 * (i + 1) for i in range(12)]
            for bucket in buckets:
                count, total = brute(rows, bucket.start, bucket.end)
                assert (bucket.count, bucket["cost"], bucket.totals.cost) == (count, total, total)
                assert bucket.mean("cost") == (total / count if count else None)
            whole = agg.totals(tx, namespace=ns, ge=10, lt=100)
            assert sum(b.count for b in buckets) == whole.count
            assert sum(b.totals.cost for b in buckets) == whole.cost


def test_edges_equal_to_keys_bound_like_ge(db: tallytree.Database) -> None:
    agg = db.aggregate("ints")
    with db.write() as tx:
        agg.insert_many(tx, [(k, f"{k}-{i}") for k in range(10) for i in range(2)] + [(5.0, "float five")])
    with db.read() as tx:
        assert [b.count for b in agg.buckets(tx, edges=[0, 5, 5, 6, 100])] == [10, 0, 3, 8]
        assert [b.count for b in agg.buckets(tx, start=0, width=1, count=3)] == [2, 2, 2]
        assert [b.count for b in agg.buckets(tx, edges=[-5, 0])] == [0]
        assert [b.count for b in agg.buckets(tx, namespace="unknown", edges=[0, 1, 2])] == [0, 0]


def test_daily_buckets_over_datetimes(db: tallytree.Database) -> None:
    rng = random.Random(8)
    calls = db.aggregate("calls", values=("cost", "tokens"))
    start = datetime(2024, 2, 25, tzinfo=UTC)
    rows = [
        (start + timedelta(seconds=rng.randrange(10 * 86400)), rng.randrange(5), rng.randrange(900))
        for _ in range(2000)
    ]
    with db.write() as tx:
        calls.insert_many(tx, [(at, i, (cost, tokens)) for i, (at, cost, tokens) in enumerate(rows)])
    with db.read() as tx:
        days = calls.buckets(tx, start=start + timedelta(days=1), width=timedelta(days=1), count=7)
    for day in days:
        chosen = [(cost, tokens) for at, cost, tokens in rows if day.start <= at < day.end]
        assert day.count == len(chosen)
        assert day.totals.as_dict() == {
            "count": len(chosen),
            "cost": sum(c for c, _ in chosen),
            "tokens": sum(t for _, t in chosen),
        }
    assert days[3].start == datetime(2024, 2, 29, tzinfo=UTC)  # a leap day


def test_local_days_follow_daylight_saving_time(db: tallytree.Database) -> None:
    try:
        paris = ZoneInfo("Europe/Paris")
    except ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    hourly = db.aggregate("hourly")
    first = datetime(2024, 3, 29, tzinfo=UTC)
    with db.write() as tx:
        hourly.insert_many(tx, [(first + timedelta(hours=h), h) for h in range(24 * 4)])
    with db.read() as tx:
        days = hourly.buckets(tx, start=datetime(2024, 3, 30, tzinfo=paris), width=timedelta(days=1), count=2)
    assert [day.count for day in days] == [24, 23]  # 31 March 2024 has 23 hours in Paris


def test_calendar_months_quarters_and_years(db: tallytree.Database) -> None:
    monthly = db.aggregate("monthly", values=("n",))
    first = datetime(2023, 1, 1, tzinfo=UTC)
    days = [first + timedelta(days=d) for d in range(800)]
    with db.write() as tx:
        monthly.insert_many(tx, [(day, i, (1,)) for i, day in enumerate(days)])
    with db.read() as tx:
        months = monthly.buckets(tx, start=first, width="month", count=14)
        assert [m.count for m in months] == [
            calendar.monthrange(2023 + (index // 12), index % 12 + 1)[1] for index in range(14)
        ]
        assert months[-1].end == datetime(2024, 3, 1, tzinfo=UTC)
        quarters = monthly.buckets(tx, start=first, width="quarter", count=4)
        assert [q.count for q in quarters] == [90, 91, 92, 92]
        years = monthly.buckets(tx, start=first, width="year", count=2)
        assert [y.count for y in years] == [365, 366]
        two = monthly.buckets(tx, start=first, width=("month", 2), count=2)
        assert [b.end.month for b in two] == [3, 5]
        clamped = monthly.buckets(tx, start=datetime(2023, 1, 31, tzinfo=UTC), width="month", count=3)
        assert [b.end for b in clamped] == [
            datetime(2023, 2, 28, tzinfo=UTC),
            datetime(2023, 3, 31, tzinfo=UTC),
            datetime(2023, 4, 30, tzinfo=UTC),
        ]


def test_buckets_within_a_tuple_prefix(db: tallytree.Database) -> None:
    loads = db.aggregate("loads", values=("amount",))
    rows = [
        (status, day, i)
        for i, (status, day) in enumerate((s, d) for s in ("open", "paid") for d in range(10))
    ]
    with db.write() as tx:
        loads.insert_many(tx, [((status, day), i, (day,)) for status, day, i in rows])
    with db.read() as tx:
        buckets = loads.buckets(tx, prefix=("open",), start=0, width=4, count=3)
        assert [(b.start, b.count, b["amount"]) for b in buckets] == [(0, 4, 6), (4, 4, 22), (8, 2, 17)]
        assert [b.count for b in loads.buckets(tx, prefix=("paid",), edges=[5, 20])] == [5]


def test_bucket_argument_errors(db: tallytree.Database) -> None:
    agg = db.aggregate("a")
    now = datetime(2024, 1, 1, tzinfo=UTC)
    with db.read() as tx:
        for arguments in (
            {"start": 0, "width": 1},
            {"start": 0, "width": 1, "count": 0},
            {"start": 0, "width": 0, "count": 3},
            {"start": 0, "width": -1, "count": 3},
            {"start": 0, "width": timedelta(days=1), "count": 3},
            {"start": now, "width": 1, "count": 3},
            {"start": 0, "width": "month", "count": 3},
            {"start": now, "width": "fortnight", "count": 3},
            {"start": now, "width": timedelta(0), "count": 3},
            {"start": 0, "width": 1, "count": 3, "edges": [0, 1]},
            {"edges": [0]},
            {"edges": [3, 1]},
            {"edges": [0, 1], "prefix": "x"},
            {"start": True, "width": 1, "count": 2},
            {"start": date(2024, 1, 1), "width": "month", "count": 2},
        ):
            with pytest.raises(tallytree.BoundsError):
                agg.buckets(tx, **arguments)


def test_bucket_arguments_of_the_wrong_type_raise_argument_type_error(db: tallytree.Database) -> None:
    """A wrong type is a TypeError (and still the BoundsError it was); a wrong value stays a BoundsError."""
    agg = db.aggregate("a")
    with db.write() as tx:
        agg.insert_many(tx, [(k, k) for k in range(10)])
    with db.read() as tx:
        for arguments in (
            {"edges": 5},
            {"edges": None, "start": 0, "width": 1, "count": "3"},
            {"start": 0, "width": 1, "count": 3.0},
            {"start": 0, "width": 1, "count": True},
            {"start": 0, "width": [1], "count": 3},
            {"start": 0, "width": True, "count": 3},
            {"start": 0, "width": 1, "count": 3, "prefix": "x"},
        ):
            with pytest.raises(tallytree.ArgumentTypeError) as raised:
                agg.buckets(tx, **arguments)
            assert isinstance(raised.value, TypeError), arguments
        with pytest.raises(tallytree.BoundsTypeError, match=r"buckets\(edges=\) takes an iterable of keys"):
            agg.buckets(tx, edges=5)  # type: ignore[arg-type]  # a BoundsError too, as documented
        with pytest.raises(tallytree.BoundsTypeError, match="edges= takes a sequence of keys"):
            agg.buckets(tx, edges="abc")  # iterable, but its characters are not meant as edges
        for arguments in (
            {"start": 0, "width": 1, "count": -1},
            {"start": 0, "width": 1, "count": 0},
            {"start": 0, "width": "fortnight", "count": 3},
            {"start": 0, "width": ("month", "3"), "count": 3},
            {"start": datetime(2024, 1, 1, tzinfo=UTC), "width": ("month", True), "count": 3},
            {"start": datetime(2024, 1, 1, tzinfo=UTC), "width": ("year", False), "count": 3},
        ):
            with pytest.raises(tallytree.BoundsError) as bounds:
                agg.buckets(tx, **arguments)
            assert not isinstance(bounds.value, TypeError), arguments
        assert [b.count for b in agg.buckets(tx, edges=iter([0, 5, 10]))] == [5, 5]


def test_bucket_arguments_of_the_wrong_type_are_bounds_errors(db: tallytree.Database) -> None:
    """Regression: edges= that is not iterable raised a plain ArgumentTypeError, which the docstring
    promises is also a BoundsError; and width=("month", True) stepped one month, though count=True
    (and every other bool given for an int) is refused."""
    agg = db.aggregate("a")
    now = datetime(2024, 1, 1, tzinfo=UTC)
    with db.read() as tx:
        for arguments in (
            {"edges": 5},
            {"edges": object()},
            {"start": now, "width": ("month", True), "count": 2},
            {"start": now, "width": ("quarter", 1.0), "count": 2},
        ):
            with pytest.raises(tallytree.BoundsError):
                agg.buckets(tx, **arguments)
        assert [b.end.month for b in agg.buckets(tx, start=now, width=("month", 1), count=2)] == [2, 3]


def test_buckets_past_what_a_key_can_be_raise_bounds_error(db: tallytree.Database) -> None:
    """Regression: edges past the year 9999 leaked ValueError or OverflowError from datetime, naming
    nothing the caller passed; width=inf made the first edge 0 * inf, a NaN key the caller never gave;
    and a float width whose edges overflowed gave buckets up to inf."""
    agg = db.aggregate("a", values=("v",))
    late = datetime(9999, 6, 1, tzinfo=UTC)
    with db.write() as tx:
        agg.insert_many(tx, [(late, 1, (1,)), (0, 2, (1,))])
    with db.read() as tx:
        for width, count in (
            ("year", 2),
            ("month", 7),
            (("month", 10**6), 1),
            (("quarter", 2**70), 1),
            (timedelta(days=300), 2),
            (timedelta(days=10**5), 10**4),  # the width times the count is beyond a timedelta
        ):
            with pytest.raises(tallytree.BoundsError, match=r"count=.* run past the year 9999") as raised:
                agg.buckets(tx, start=late, width=width, count=count)
            assert "start=datetime.datetime(9999, 6, 1" in str(raised.value)
        assert [b.count for b in agg.buckets(tx, start=late, width="month", count=6)] == [1, 0, 0, 0, 0, 0]
        last = agg.buckets(tx, start=late, width=timedelta(days=213), count=1)[0].end
        assert (last.year, last.month) == (9999, 12)
        for width in (float("inf"), float("nan")):
            with pytest.raises(tallytree.BoundsError, match="finite positive"):
                agg.buckets(tx, start=0, width=width, count=2)
        for start, width, count in ((0, 1e308, 3), (-1e308, 1e308, 3), (10**400, 1.0, 2), (0.0, 10**400, 2)):
            with pytest.raises(tallytree.BoundsError, match="run past the largest float"):
                agg.buckets(tx, start=start, width=width, count=count)
        assert [b.count for b in agg.buckets(tx, start=0, width=1e308, count=1)] == [1]
        assert [b.end for b in agg.buckets(tx, start=float("inf"), width=1, count=1)] == [float("inf")]


def test_one_descent_per_edge(db: tallytree.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    agg = db.aggregate("big", node_size=8)
    with db.write() as tx:
        agg.insert_many(tx, [(k, k) for k in range(5000)])
    calls = []
    original = Tree.prefix_summary

    def counting(self: Tree, bound: bytes, after: bool) -> list[int]:
        calls.append(bound)
        return original(self, bound, after)

    monkeypatch.setattr(Tree, "prefix_summary", counting)
    with db.read() as tx:
        buckets = agg.buckets(tx, start=0, width=100, count=30)
    assert len(calls) == 31
    assert [b.count for b in buckets] == [100] * 30


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(-50, 50), max_size=80),
    edges=st.lists(st.integers(-60, 60), min_size=2, max_size=8).map(sorted),
)
def test_buckets_property(keys: list[int], edges: list[int]) -> None:
    with tallytree.open_memory() as db:
        agg = db.aggregate("p", values=("v",), node_size=4)
        with db.write() as tx:
            agg.insert_many(tx, [(key, i, (key * 2,)) for i, key in enumerate(keys)])
        with db.read() as tx:
            buckets = agg.buckets(tx, edges=edges)
            for bucket in buckets:
                assert bucket.totals == agg.totals(tx, ge=bucket.start, lt=bucket.end)
                assert bucket.count == sum(1 for key in keys if bucket.start <= key < bucket.end)
