"""The ``tallytree`` command line: ``main(argv) -> int``, no module-level state.

Commands:

* ``demo [DIR]``: generate a realistic event dataset, load it into per-user trees and print the
  answers of the scenario queries, each timed next to a naive scan that computes the same answer.
* ``check DB [AGGREGATE]``: run the invariant checker; exit code 3 if it finds problems.

Exit codes: 0 ok, 1 error (bad input, one line on stderr), 2 bad usage, 3 check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from . import _db
from ._check import check
from .errors import Error

__all__ = ["console_main", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tallytree",
        description="Exact counts, sums and ranks in O(log n), persisted in LMDB.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="load generated events and answer the scenario queries, timed against scans"
    )
    demo.add_argument("directory", nargs="?", help="where to create the database (default: a temp dir)")
    demo.add_argument("--users", type=int, default=200, help="number of users (default 200)")
    demo.add_argument("--events", type=int, default=200_000, help="number of events (default 200000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    checker = commands.add_parser("check", help="run the invariant checker on a database")
    checker.add_argument("database", help="database directory")
    checker.add_argument("aggregate", nargs="?", help="only this aggregate")
    checker.add_argument("--json", action="store_true", help="print the problems as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return int(exc.code or 0)
    try:
        if args.command == "demo":
            return _demo(args)
        return _check(args)
    except Error as exc:
        print(f"tallytree: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def console_main() -> None:
    """Entry point of the ``tallytree`` console script."""
    sys.exit(main())


def _check(args: argparse.Namespace) -> int:
    with _db.open(args.database, readonly=True) as db:
        aggregate = db.aggregate(args.aggregate, create=False) if args.aggregate else None
        with db.read() as tx:
            problems = check(tx, aggregate)
    if args.json:
        print(json.dumps([str(problem) for problem in problems], indent=2))
    else:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)" if problems else "ok: no problems found")
    return EXIT_CHECK_FAILED if problems else EXIT_OK


def _timed(function: Callable[[], T], repeat: int = 5) -> tuple[T, float]:
    """Run ``function`` ``repeat`` times; return its result and the best time in microseconds."""
    best = float("inf")
    result: Any = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best * 1e6


def _demo(args: argparse.Namespace) -> int:
    directory = Path(args.directory) if args.directory else Path(tempfile.mkdtemp()) / "demo.tt"
    rng = random.Random(args.seed)
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    users = [f"user:{number}" for number in range(args.users)]
    weights = [1 / (rank + 1) for rank in range(len(users))]  # a few heavy users, a long tail
    print(f"Generating {args.events:,} events for {len(users)} users ...")
    events: dict[str, list[tuple[datetime, str, tuple[float, int]]]] = {user: [] for user in users}
    for number, user in enumerate(rng.choices(users, weights, k=args.events)):
        created = now - timedelta(seconds=rng.randrange(0, 365 * 86400))
        cost = round(rng.uniform(0.0005, 0.05), 6)
        events[user].append((created, f"evt_{number}", (cost, rng.randrange(100, 5000))))

    with _db.open(directory, durable=False) as db:
        created_at = db.aggregate("events_by_created", values=("cost", "tokens"))
        start = time.perf_counter()
        with db.write() as tx:
            for user, rows in events.items():
                created_at.insert_many(tx, rows, namespace=user)
        seconds = time.perf_counter() - start
        print(f"Loaded into {directory} in {seconds:.2f} s ({args.events / seconds:,.0f} items/s)\n")

        heavy = users[0]
        rows = events[heavy]
        week_ago = now - timedelta(days=7)
        print(f"Questions for {heavy} ({len(rows):,} events), tallytree vs a scan of the rows:")
        with db.read() as tx:
            _report(
                "events in the last 7 days",
                lambda: created_at.count(tx, namespace=heavy, ge=week_ago),
                lambda: sum(1 for created, _, _ in rows if created >= week_ago),
            )
            _report(
                "all-time events",
                lambda: created_at.count(tx, namespace=heavy),
                lambda: len([row for row in rows]),
            )
            _report(
                "cost in the last 30 days",
                lambda: round(created_at.sum(tx, "cost", namespace=heavy, ge=now - timedelta(30)), 6),
                lambda: round(
                    sum(values[0] for created, _, values in rows if created >= now - timedelta(30)),
                    6,
                ),
            )
            _report(
                "tokens in the last 24 h",
                lambda: created_at.sum(tx, "tokens", namespace=heavy, ge=now - timedelta(1)),
                lambda: sum(values[1] for created, _, values in rows if created >= now - timedelta(1)),
            )
            middle = sorted(rows)[len(rows) // 2][0]
            _report(
                "rank of the median event",
                lambda: created_at.rank(tx, middle, namespace=heavy),
                lambda: sum(1 for created, _, _ in rows if created < middle),
            )
            _report(
                "10,000th oldest event",
                lambda: created_at.at(tx, min(9_999, len(rows) - 1), namespace=heavy).id,
                lambda: sorted(rows)[min(9_999, len(rows) - 1)][1],
            )
            print("\nDaily cost for the last 7 days (one totals() call per day):")
            for day in range(7, 0, -1):
                begin, end = now - timedelta(days=day), now - timedelta(days=day - 1)
                totals = created_at.totals(tx, namespace=heavy, ge=begin, lt=end)
                print(
                    f"  {begin:%a %d %b}: {totals.count:4d} events, cost {totals.cost:8.4f}, "
                    f"tokens {totals.tokens:9,d}"
                )
            print("\nBusiest users (namespace totals, O(1) each):")
            busiest = sorted(created_at.namespaces(tx), key=lambda pair: -pair[1].count)[:3]
            for user, totals in busiest:
                print(f"  {user}: {totals.count:,} events, cost {totals.cost:.2f}")
            problems = check(tx, created_at)
        print(f"\nInvariant check: {'ok' if not problems else problems[:3]}")
    return EXIT_OK if not problems else EXIT_CHECK_FAILED


def _report(label: str, fast: Callable[[], Any], scan: Callable[[], Any]) -> None:
    answer, fast_us = _timed(fast)
    expected, scan_us = _timed(scan, repeat=3)
    status = "" if answer == expected else f"   MISMATCH: scan says {expected!r}"
    print(
        f"  {label:<28} {answer!s:>14}   tallytree {fast_us:9.1f} us   scan {scan_us:11.1f} us"
        f"   ({scan_us / fast_us:,.0f}x){status}"
    )
