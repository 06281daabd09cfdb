"""Aggregate.buckets: consecutive half-open ranges in one call, checked against brute force."""

from __future__ import annotations

import calendar
import copy
import itertools
import math
import random
from datetime import UTC, date, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree._buckets import bucket_edges
from tallytree._native import kernels
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
        for start, width, count in ((-1e308, 1e308, 3), (0.0, 10**400, 2), (1e308, 2**1023, 2)):
            with pytest.raises(tallytree.BoundsError, match="run past the largest float"):
                agg.buckets(tx, start=start, width=width, count=count)
        # an int start with a whole float width steps by the exact int: no float to run past
        assert [b.end for b in agg.buckets(tx, start=10**400, width=1.0, count=2)] == [
            10**400 + 1,
            10**400 + 2,
        ]
        assert [b.count for b in agg.buckets(tx, start=0, width=1e308, count=1)] == [1]
        with pytest.raises(tallytree.BoundsError, match=r"run past the largest int a key can hold"):
            agg.buckets(tx, start=0, width=2 ** (2**24), count=1)
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


# ------------------------------------------------------------ time zones, exact numbers, units


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:
        pytest.skip("no time zone database")


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def test_sub_day_widths_step_real_time_across_dst(db: tallytree.Database) -> None:
    """Regression: a timedelta was added to the local wall clock, so on the fall-back day one hourly
    bucket spanned two real hours and on the spring-forward day one was empty (0 long); quarter-hours
    across a skipped hour raised "bucket edges must not decrease" (h6 audit: W1, C1)."""
    berlin, new_york = zone("Europe/Berlin"), zone("America/New_York")
    agg = db.aggregate("e")
    first = datetime(2024, 3, 9, tzinfo=UTC)
    with db.write() as tx:  # one event every 15 minutes
        agg.insert_many(tx, [(first + timedelta(minutes=15 * i), i) for i in range(4 * 24 * 242)])
    with db.read() as tx:
        for day, hours in (
            (datetime(2024, 10, 27, tzinfo=berlin), 25),
            (datetime(2024, 3, 31, tzinfo=berlin), 23),
        ):
            buckets = agg.buckets(tx, start=day, width=timedelta(hours=1), count=hours)
            assert [utc(b.end) - utc(b.start) for b in buckets] == [timedelta(hours=1)] * hours
            assert [b.count for b in buckets] == [4] * hours
            assert utc(buckets[-1].end) == utc(
                (day.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=berlin)
            )
            assert agg.buckets(tx, start=day, width="Hour", count=hours) == buckets
        quarters = agg.buckets(
            tx, start=datetime(2024, 3, 10, 1, tzinfo=new_york), width=timedelta(minutes=15), count=8
        )
        assert [b.count for b in quarters] == [1] * 8
        clock = [(1, 0), (1, 15), (1, 30), (1, 45), (3, 0), (3, 15), (3, 30), (3, 45)]  # 02:xx is skipped
        assert [(b.start.hour, b.start.minute) for b in quarters] == clock
        assert utc(quarters[-1].end) == datetime(2024, 3, 10, 8, tzinfo=UTC)


def test_a_start_in_the_second_pass_of_a_repeated_hour_is_edge_zero(db: tallytree.Database) -> None:
    """Regression: edge 0 was start + 0 * width, and datetime addition resets fold, so a start with
    fold=1 (as .astimezone() gives for the second 02:30 of a fall-back night) moved an hour earlier (W2)."""
    berlin = zone("Europe/Berlin")
    agg = db.aggregate("e")
    start = datetime(2024, 10, 27, 1, 30, tzinfo=UTC).astimezone(berlin)
    assert (start.hour, start.minute, start.fold) == (2, 30, 1)
    with db.write() as tx:
        agg.insert_many(tx, [(datetime(2024, 10, 27, 0, 45, tzinfo=UTC), "first 02:45"), (start, "at start")])
    with db.read() as tx:
        for width in (timedelta(minutes=30), timedelta(hours=1), timedelta(days=1), "week", "month"):
            buckets = agg.buckets(tx, start=start, width=width, count=1)
            assert buckets[0].start is start
            assert buckets[0].count == 1, width
        hour = agg.buckets(tx, start=start, width=timedelta(hours=1), count=1)[0]
        assert utc(hour.end) == datetime(2024, 10, 27, 2, 30, tzinfo=UTC)
        day = agg.buckets(tx, start=start, width="day", count=1)[0]
        assert (day.end.day, day.end.hour, day.end.minute, utc(day.end).hour) == (28, 2, 30, 1)


def test_calendar_edges_in_skipped_and_repeated_hours() -> None:
    """Whole days and months step the local calendar; a wall-clock time that is skipped moves forward
    by the gap and one that repeats is its first pass (fold=0), and the edges come back normalized."""
    berlin = zone("Europe/Berlin")
    days = bucket_edges(datetime(2024, 3, 30, 2, 30, tzinfo=berlin), timedelta(days=1), 2, None)
    assert [(e.day, e.hour, e.minute, e.utcoffset()) for e in days[1:]] == [
        (31, 3, 30, timedelta(hours=2)),  # 02:30 does not exist on 31 March: 03:30 CEST
        (1, 2, 30, timedelta(hours=2)),
    ]
    assert [utc(b) - utc(a) for a, b in itertools.pairwise(days)] == [
        timedelta(hours=24),
        timedelta(hours=23),
    ]
    autumn = bucket_edges(datetime(2024, 10, 26, 2, 30, tzinfo=berlin), "day", 2, None)
    assert [utc(e) for e in autumn[1:]] == [
        datetime(2024, 10, 27, 0, 30, tzinfo=UTC),  # the first of the two 02:30s
        datetime(2024, 10, 28, 1, 30, tzinfo=UTC),
    ]
    months = bucket_edges(datetime(2024, 1, 31, 2, 30, tzinfo=berlin), ("MONTH", 1), 3, None)
    assert [(e.month, e.day, e.hour) for e in months] == [(1, 31, 2), (2, 29, 2), (3, 31, 3), (4, 30, 2)]
    weeks = bucket_edges(datetime(2024, 3, 24, tzinfo=berlin), "week", 2, None)
    assert [utc(b) - utc(a) for a, b in itertools.pairwise(weeks)] == [
        timedelta(days=7),
        timedelta(days=7, hours=-1),
    ]


def test_int_keys_beyond_2_53_with_a_float_width(db: tallytree.Database) -> None:
    """Regression: width=1e9 on epoch nanoseconds rounded the edges to floats, moving items between
    buckets; a fractional float width on such ints is refused; float edges are rounded once (W3)."""
    agg = db.aggregate("ns")
    start = 1_700_000_000_000_000_001
    with db.write() as tx:
        agg.insert_many(tx, [(start - 1, "a"), (start, "b"), (start + 10**9 - 1, "c"), (start + 10**9, "d")])
    with db.read() as tx:
        for width in (10**9, 1e9):
            buckets = agg.buckets(tx, start=start, width=width, count=2)
            assert [(b.start, b.end, b.count) for b in buckets] == [
                (start, start + 10**9, 2),
                (start + 10**9, start + 2 * 10**9, 1),
            ]
            assert all(type(b.end) is int for b in buckets)
        with pytest.raises(tallytree.BoundsError, match=r"beyond 2\*\*53.*use an int width"):
            agg.buckets(tx, start=start, width=0.5, count=2)
        with pytest.raises(tallytree.BoundsError, match=r"beyond 2\*\*53"):
            agg.buckets(tx, start=2**53 - 2, width=1.5, count=2)  # the last edge is beyond
        assert [b.end for b in agg.buckets(tx, start=2**53 - 3, width=1.5, count=2)] == [2**53 - 1.5, 2**53]
        tenths = agg.buckets(tx, start=1, width=0.1, count=7)
        assert [b.end for b in tenths][-2:] == [1.6, 1.7]  # 1 + 0.1 * 7 is 1.7000000000000002: rounded once
        assert type(tenths[0].start) is int
        assert [b.end for b in agg.buckets(tx, start=0.5, width=2, count=2)] == [2.5, 4.5]


def test_named_widths_hour_day_week_in_any_case(db: tallytree.Database) -> None:
    agg = db.aggregate("e")
    start = datetime(2024, 1, 1, tzinfo=UTC)
    with db.write() as tx:
        agg.insert_many(tx, [(start + timedelta(hours=h), h) for h in range(24 * 21)])
    with db.read() as tx:
        assert [b.count for b in agg.buckets(tx, start=start, width="day", count=3)] == [24] * 3
        assert [b.count for b in agg.buckets(tx, start=start, width="Week", count=3)] == [168] * 3
        assert [b.count for b in agg.buckets(tx, start=start, width=("HOUR", 6), count=3)] == [6] * 3
        assert [b.count for b in agg.buckets(tx, start=start, width=("day", 7), count=3)] == [168] * 3
        assert agg.buckets(tx, start=start, width="YEAR", count=1)[0].end == datetime(2025, 1, 1, tzinfo=UTC)
        for width in ("fortnight", "days", ("day", 0)):
            with pytest.raises(
                tallytree.BoundsError, match="'hour', 'day', 'week', 'month', 'quarter', 'year'"
            ):
                agg.buckets(tx, start=start, width=width, count=2)
        with pytest.raises(tallytree.BoundsError, match=r"n in \(unit, n\) is an int >= 1"):
            agg.buckets(tx, start=start, width=("Day", 1.0), count=2)
        with pytest.raises(tallytree.BoundsError, match=r"needs a datetime start.*numeric width"):
            agg.buckets(tx, start=1_700_000_000, width="day", count=2)


def test_bucket_fields_read_as_attributes(db: tallytree.Database) -> None:
    """Regression: Totals has t.cost and t["cost"], Bucket had only b["cost"]."""
    agg = db.aggregate("a", values=("cost", "start"))
    with db.write() as tx:
        agg.insert_many(tx, [(k, k, (0.5, 1)) for k in range(4)])
    with db.read() as tx:
        bucket = agg.buckets(tx, start=0, width=3, count=1)[0]
    assert (bucket.cost, bucket["cost"], bucket.count) == (1.5, 1.5, 3)
    assert (bucket.start, bucket["start"]) == (0, 3)  # Bucket's own attribute wins; [] reads the field
    with pytest.raises(
        AttributeError, match="Bucket has no attribute or value field 'tokens'; the fields are cost"
    ):
        _ = bucket.tokens
    assert not hasattr(bucket, "_missing")
    assert copy.copy(bucket) == bucket


def test_key_errors_name_start_and_edges(db: tallytree.Database) -> None:
    agg = db.aggregate("a")
    with db.read() as tx:
        for arguments, error, message in (
            (
                {"start": datetime(2024, 1, 1), "width": timedelta(days=1), "count": 2},
                "InvalidKeyError",
                "naive",
            ),
            ({"start": datetime(2024, 1, 1), "width": "month", "count": 2}, "InvalidKeyError", "naive"),
            ({"start": math.nan, "width": 1, "count": 2}, "InvalidKeyError", "NaN"),
            ({"edges": [0, math.nan]}, "InvalidKeyError", "NaN"),
            ({"edges": [datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2)]}, "InvalidKeyError", "naive"),
            ({"edges": [0, [1]]}, "UnsupportedKeyTypeError", "unsupported type list"),
        ):
            with pytest.raises(getattr(tallytree, error)) as raised:
                agg.buckets(tx, **arguments)
            where = "buckets(start=)" if "start" in arguments else "buckets(edges=), edge 1"
            assert str(raised.value).startswith(where + ": key "), raised.value
            assert message in str(raised.value)
        late = datetime(9999, 12, 31, 10, tzinfo=timezone(timedelta(hours=-5)))
        for width in (timedelta(hours=1), "day"):  # valid local times, instants past the year 9999
            with pytest.raises(tallytree.BoundsError, match="run past the year 9999"):
                agg.buckets(tx, start=late, width=width, count=10)
        new_york = late.replace(tzinfo=zone("America/New_York"))
        for width in (timedelta(hours=1), "day", "month"):
            with pytest.raises(tallytree.BoundsError, match="run past the year 9999"):
                agg.buckets(tx, start=new_york, width=width, count=10)


# An independent oracle: the edges from their definition, the buckets by brute force over a list.

ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu")
ANCHORS = (  # local times near 2024's transitions: skipped and repeated hours (30 minutes at Lord Howe)
    datetime(2024, 3, 31, 2),
    datetime(2024, 10, 27, 2),
    datetime(2024, 3, 10, 2),
    datetime(2024, 11, 3, 1),
    datetime(2024, 4, 7, 1, 30),
    datetime(2024, 10, 6, 2),
    datetime(2024, 1, 31, 2, 30),
    datetime(2024, 2, 29, 23),
)
WIDTHS = (
    *(timedelta(minutes=m) for m in (1, 15, 30, 45, 60, 90, 120, 1440, 2 * 1440, 7 * 1440)),
    timedelta(days=1, hours=1),
    "hour",
    ("hour", 3),
    "day",
    ("day", 2),
    "week",
    "month",
    ("month", 2),
    "quarter",
    "year",
)


def local_instant(wall: datetime, where: ZoneInfo) -> datetime:
    """The UTC instant of the wall-clock time ``wall`` in ``where``, by the documented fold=0 rule,
    found without utcoffset(fold): try the offsets in force a day before and a day after; the earlier
    valid one is the first pass of a repeated time; none is valid in a gap, and then the offset before
    the gap applies (the time moves forward by the gap)."""
    as_utc = wall.replace(tzinfo=UTC)
    before = (as_utc - timedelta(days=1)).astimezone(where).utcoffset()
    after = (as_utc + timedelta(days=1)).astimezone(where).utcoffset()
    assert before is not None and after is not None
    valid = [
        as_utc - offset
        for offset in (before, after)
        if (as_utc - offset).astimezone(where).replace(tzinfo=None) == wall
    ]
    return min(valid) if valid else as_utc - before


def oracle_edges(start: datetime, width: Any, count: int) -> list[datetime]:
    """The UTC instants of the edges, from the rules in the _buckets docstring."""
    where = start.tzinfo
    assert isinstance(where, ZoneInfo)
    unit, n = width if isinstance(width, tuple) else (width, 1)
    if isinstance(unit, str) and unit in ("hour", "day", "week"):
        unit = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}[unit] * n
    if isinstance(unit, timedelta) and unit % timedelta(days=1):
        return [utc(start) + unit * i for i in range(count + 1)]
    wall = start.replace(tzinfo=None)
    edges = [utc(start)]
    for i in range(1, count + 1):
        if isinstance(unit, timedelta):
            edges.append(local_instant(wall + unit * i, where))
        else:
            months = {"month": 1, "quarter": 3, "year": 12}[unit] * n * i
            year, month = divmod(wall.year * 12 + wall.month - 1 + months, 12)
            day = min(wall.day, calendar.monthrange(year, month + 1)[1])
            edges.append(local_instant(wall.replace(year=year, month=month + 1, day=day, fold=0), where))
    return edges


def oracle_buckets(
    rows: list[tuple[datetime, float, int]], edges: list[datetime]
) -> list[tuple[int, float, int]]:
    result = []
    for low, high in itertools.pairwise(edges):
        inside = [(cost, tokens) for at, cost, tokens in rows if low <= utc(at) < high]
        result.append((len(inside), math.fsum(c for c, _ in inside), sum(t for _, t in inside)))
    return result


@st.composite
def zoned_scenario(draw: st.DrawFn) -> tuple[datetime, Any, int, list[tuple[datetime, float, int]]]:
    where = zone(draw(st.sampled_from(ZONES)))
    anchor = draw(st.sampled_from(ANCHORS))
    start = (anchor + timedelta(minutes=draw(st.integers(-150, 150)))).replace(
        tzinfo=where, fold=draw(st.integers(0, 1))
    )
    width = draw(st.sampled_from(WIDTHS))
    count = draw(st.integers(1, 8))
    edges = oracle_edges(start, width, count)
    rows = []
    for _ in range(draw(st.integers(0, 30))):  # keys on, just before and just after the edges
        near = edges[draw(st.integers(0, count))]
        at = near + timedelta(seconds=draw(st.sampled_from([0, 0, -1, 1, -60, 59, -3600, 1800, 7200])))
        shown = at.astimezone(draw(st.sampled_from([where, UTC])))  # keys in any zone: instants
        rows.append((shown, draw(st.sampled_from([0.1, 1e16, -1e16, 2.5, -0.3])), draw(st.integers(-5, 5))))
    return start, width, count, rows


@settings(max_examples=150, deadline=None)
@given(zoned_scenario())
def test_zoned_buckets_match_the_oracle_in_c_and_python(
    scenario: tuple[datetime, Any, int, list[tuple[datetime, float, int]]],
) -> None:
    start, width, count, rows = scenario
    edges = oracle_edges(start, width, count)
    want = oracle_buckets(rows, edges)
    for built in (True, False):
        with kernels(built), tallytree.open_memory() as db:
            agg = db.aggregate("calls", values=("cost", "tokens"), node_size=4)
            with db.write() as tx:
                agg.insert_many(tx, [(at, i, (cost, tokens)) for i, (at, cost, tokens) in enumerate(rows)])
            with db.read() as tx:
                got = agg.buckets(tx, start=start, width=width, count=count)
        assert got[0].start is start
        assert [utc(b.start) for b in got] + [utc(got[-1].end)] == edges
        assert all(a.end is b.start for a, b in itertools.pairwise(got))
        for bucket in got[1:]:  # normalized: as astimezone shows the instant
            again = utc(bucket.start).astimezone(start.tzinfo)
            assert (bucket.start.replace(tzinfo=None), bucket.start.fold) == (
                again.replace(tzinfo=None),
                again.fold,
            )
        assert [(b.count, b.cost, b["tokens"]) for b in got] == want
        assert all(b.mean("cost") is None and b.cost == 0 for b in got if not b.count)  # empty ones too


@settings(max_examples=150, deadline=None)
@given(
    start=st.one_of(
        st.integers(-(2**60), 2**60),
        st.integers(-1000, 1000),
        st.floats(-1e6, 1e6, allow_nan=False),
    ),
    width=st.one_of(
        st.integers(1, 10**12),
        st.floats(1e-3, 1e12).map(lambda w: float(round(w)) or 1.0),
        st.floats(1e-3, 1e12),
    ),
    count=st.integers(1, 6),
    data=st.data(),
)
def test_numeric_edges_are_exact(
    start: int | float, width: int | float, count: int, data: st.DataObject
) -> None:
    exact = [Fraction(start) + Fraction(width) * i for i in range(count + 1)]
    whole = isinstance(start, int) and float(width).is_integer()
    if isinstance(start, int) and not whole and max(abs(exact[0]), abs(exact[-1])) > 2**53:
        with pytest.raises(tallytree.BoundsError, match=r"beyond 2\*\*53"):
            bucket_edges(start, width, count, None)
        return
    edges = bucket_edges(start, width, count, None)
    assert edges[0] is start
    if whole:
        assert all(type(edge) is int for edge in edges) and edges == exact
    else:
        assert all(type(edge) is float for edge in edges[1:])
        assert edges[1:] == [float(edge) for edge in exact[1:]]  # float(Fraction) rounds once, to nearest
    keys = [
        data.draw(st.sampled_from([math.floor(edge), math.ceil(edge), float(edge)]))
        + data.draw(st.integers(-1, 1))
        for edge in exact
    ]
    with tallytree.open_memory() as db:
        agg = db.aggregate("n", node_size=4)
        with db.write() as tx:
            agg.insert_many(tx, [(key, i) for i, key in enumerate(keys)])
        with db.read() as tx:
            counts = [b.count for b in agg.buckets(tx, start=start, width=width, count=count)]
    cuts = [Fraction(edge) for edge in edges]
    assert counts == [
        sum(1 for key in keys if low <= Fraction(key) < high) for low, high in itertools.pairwise(cuts)
    ]
