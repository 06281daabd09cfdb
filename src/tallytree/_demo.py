"""The README's demo: generated events, bulk-built aggregates, the dashboard questions, timed.

Each question is answered twice, by the aggregate (O(log n)) and by a scan of the generated rows (what
a ``COUNT(*)`` without a covering index does), and the report shows both times and that the answers
agree. Used by ``tallytree demo``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from . import _db
from ._check import check

__all__ = ["run_demo"]

T = TypeVar("T")

Row = tuple[datetime, str, tuple[float, int]]


def _timed(function: Callable[[], T], repeat: int = 5) -> tuple[T, float]:
    """Run ``function`` ``repeat`` times; return its result and the best time in microseconds."""
    best = float("inf")
    result: Any = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best * 1e6


def run_demo(directory: Path, *, users: int, events: int, seed: int, quiet: bool) -> dict[str, Any]:
    """Generate ``events`` events of ``users`` users, bulk-build, ask, print (unless ``quiet``).

    Returns the report as a dict (for ``--json``); ``report["check_ok"]`` says whether the invariant
    checker passed.
    """
    rng = random.Random(seed)
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    names = [f"user:{number}" for number in range(users)]
    weights = [1 / (rank + 1) for rank in range(len(names))]  # a few heavy users, a long tail

    def say(*parts: Any) -> None:
        if not quiet:
            print(*parts)

    say(f"Generating {events:,} events for {len(names)} users ...")
    created: dict[str, list[Row]] = {user: [] for user in names}
    starting: dict[str, list[Row]] = {user: [] for user in names}
    for number, user in enumerate(rng.choices(names, weights, k=events)):
        created_at = now - timedelta(seconds=rng.randrange(0, 365 * 86400))
        starts_at = created_at + timedelta(seconds=rng.randrange(0, 60 * 86400))  # some still to come
        values = (round(rng.uniform(0.0005, 0.05), 6), rng.randrange(100, 5000))
        created[user].append((created_at, f"evt_{number}", values))
        starting[user].append((starts_at, f"evt_{number}", values))

    report: dict[str, Any] = {"database": str(directory), "events": events, "users": len(names)}
    with _db.open(directory, durable=False) as db:
        by_created = db.aggregate("events_by_created", values=("cost", "tokens"))
        by_start = db.aggregate("events_by_start", values=("cost", "tokens"))
        start = time.perf_counter()
        with db.write() as tx:
            for aggregate, table in ((by_created, created), (by_start, starting)):
                stream = ((user, *row) for user, user_rows in table.items() for row in user_rows)
                aggregate.build_many(tx, stream, clear_others=True)
        seconds = time.perf_counter() - start
        report["build_seconds"] = round(seconds, 3)
        say(
            f"Bulk-built 2 aggregates into {directory} in {seconds:.2f} s "
            f"({2 * events / seconds:,.0f} items/s)\n"
        )

        heavy = max(names, key=lambda user: len(created[user]))  # the busiest user (never without events)
        rows = created[heavy]
        upcoming = starting[heavy]
        week_ago = now - timedelta(days=7)
        month_ago = now - timedelta(days=30)
        ordered = sorted(rows)
        nth = min(9_999, len(rows) - 1)
        day0 = (now - timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)
        day = timedelta(days=1)
        questions: list[dict[str, Any]] = []

        def ask(label: str, fast: Callable[[], Any], scan: Callable[[], Any]) -> None:
            questions.append(_report(label, fast, scan, say))

        say(f"Questions for {heavy} ({len(rows):,} events), tallytree vs a scan of the rows:")
        with db.read() as rtx:
            ask(
                "events in the last 7 days",
                lambda: by_created.count(rtx, namespace=heavy, ge=week_ago),
                lambda: sum(1 for when, _, _ in rows if when >= week_ago),
            )
            ask(
                "upcoming events (next 7 days)",
                lambda: by_start.count(rtx, namespace=heavy, ge=now, lt=now + 7 * day),
                lambda: sum(1 for when, _, _ in upcoming if now <= when < now + 7 * day),
            )
            ask(
                "all-time events",
                lambda: by_created.count(rtx, namespace=heavy),
                lambda: len([row for row in rows]),
            )
            ask(
                "cost in the last 30 days",
                lambda: round(by_created.sum(rtx, "cost", namespace=heavy, ge=month_ago), 6),
                lambda: round(math.fsum(values[0] for when, _, values in rows if when >= month_ago), 6),
            )
            ask(
                "tokens in the last 24 h",
                lambda: by_created.sum(rtx, "tokens", namespace=heavy, ge=now - day),
                lambda: sum(values[1] for when, _, values in rows if when >= now - day),
            )
            middle = ordered[len(rows) // 2][0]
            ask(
                "rank of the median event",
                lambda: by_created.rank(rtx, middle, namespace=heavy),
                lambda: sum(1 for when, _, _ in rows if when < middle),
            )
            ask(
                f"{_ordinal(nth + 1)} oldest event",
                lambda: by_created.at(rtx, nth, namespace=heavy).id,
                lambda: sorted(rows)[nth][1],
            )
            ask(
                "daily cost, 30 days",
                lambda: [
                    round(bucket.totals.cost, 6)
                    for bucket in by_created.buckets(rtx, namespace=heavy, start=day0, width=day, count=30)
                ],
                lambda: _daily_scan(rows, day0, 30),
            )
            say("\nDaily cost for the last 7 of those days (one buckets() call):")
            last_week = by_created.buckets(rtx, namespace=heavy, start=day0 + 23 * day, width=day, count=7)
            for bucket in last_week:
                say(
                    f"  {bucket.start:%a %d %b}: {bucket.count:4d} events, cost {bucket.totals.cost:8.4f}, "
                    f"tokens {bucket.totals.tokens:9,d}"
                )
            say("\nBusiest users (namespace totals, O(1) each):")
            busiest = sorted(by_created.namespaces(rtx), key=lambda pair: -pair[1].count)[:3]
            for user, totals in busiest:
                say(f"  {user}: {totals.count:,} events, cost {totals.cost:.2f}")
            problems = check(rtx)
        say(f"\nInvariant check: {'ok' if not problems else [str(problem) for problem in problems[:3]]}")
    report["questions"] = questions
    report["busiest"] = [{"namespace": user, **totals.as_dict()} for user, totals in busiest]
    report["check_ok"] = not problems
    return report


def _ordinal(number: int) -> str:
    """``number`` (>= 1) as an English ordinal, with thousands separators. O(1).

    >>> [_ordinal(number) for number in (1, 2, 3, 4, 11, 12, 13, 21, 112, 3411, 10_000)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '112th', '3,411th', '10,000th']
    """
    teen = number % 100 in (11, 12, 13)
    suffix = "th" if teen else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number:,}{suffix}"


def _daily_scan(rows: list[Row], day0: datetime, days: int) -> list[float]:
    sums: list[list[float]] = [[] for _ in range(days)]
    for created, _, values in rows:
        index = (created - day0) // timedelta(days=1)
        if 0 <= index < days:
            sums[index].append(values[0])
    return [round(math.fsum(day), 6) for day in sums]


def _report(
    label: str, fast: Callable[[], Any], scan: Callable[[], Any], say: Callable[..., None]
) -> dict[str, Any]:
    answer, fast_us = _timed(fast)
    expected, scan_us = _timed(scan, repeat=3)
    shown = answer if not isinstance(answer, list) else f"{len(answer)} values"
    status = "" if answer == expected else f"   MISMATCH: scan says {expected!r}"
    say(
        f"  {label:<30} {shown!s:>14}   tallytree {fast_us:9.1f} us   scan {scan_us:11.1f} us"
        f"   ({scan_us / fast_us:,.0f}x){status}"
    )
    return {
        "question": label,
        "answer": answer,
        "tallytree_us": round(fast_us, 1),
        "scan_us": round(scan_us, 1),
        "match": answer == expected,
    }
