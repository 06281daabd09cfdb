"""Daily AI usage per org: calls, cost, input / cached / output tokens and the cache hit rate, for any
date range, without a nightly roll-up table.

Previously: ``aiUsageDailyAggregates`` rebuilt by a 1 AM cron (24 h stale, fixed granularity, backfill
headaches). Here every call is a document of the ``ai_calls`` table; one aggregate keyed by time per org
holds exact sums, and ``buckets`` answers "per day for the last 30 days" in one O(buckets x log n) call,
at any granularity (hours, days, weeks, calendar months).

Run: ``python examples/ai_usage.py [calls]`` (default 200,000 calls).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import tallytree

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SPAN_DAYS = 90
FIELDS = ("cost", "input_tokens", "cached_tokens", "output_tokens")


def cache_hit_rate(call: dict[str, Any]) -> float:
    """The share of a call's input tokens served from the cache."""
    return float(call["cached_tokens"] / call["input_tokens"])


def attach(db: tallytree.Database) -> tallytree.Table:
    calls = db.table("ai_calls")
    values = {field: field for field in FIELDS} | {"cache_hit_rate": cache_hit_rate}
    calls.aggregate("ai_usage", namespace="org", key="at", values=values)
    return calls


def generate(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` calls by 300 orgs over 90 days, in time order (as a log would deliver them)."""
    rng = random.Random(seed)
    orgs = [f"org_{i}" for i in range(300)]
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(orgs))]
    calls = []
    for index in range(n):
        input_tokens = rng.randrange(100, 20_000)
        cached = rng.randrange(0, input_tokens) if rng.random() < 0.6 else 0
        output = rng.randrange(10, 4000)
        cost = round((input_tokens - cached) * 3e-6 + cached * 3e-7 + output * 1.5e-5, 6)
        calls.append(
            {
                "org": rng.choices(orgs, weights)[0],
                "at": T0 + timedelta(seconds=SPAN_DAYS * 86400 * index // n),
                "model": rng.choice(("small", "large")),
                "cost": cost,
                "input_tokens": input_tokens,
                "cached_tokens": cached,
                "output_tokens": output,
            }
        )
    return calls


def load(db: tallytree.Database, calls: list[dict[str, Any]]) -> None:
    table = attach(db)
    with db.write() as tx:
        for call in calls:  # one insert per call, as an API server would record them
            table.insert(tx, call)


def daily_usage(
    tx: tallytree.Transaction, db: tallytree.Database, org: str, start: datetime, days: int
) -> list[dict[str, Any]]:
    """Per day from ``start``: calls, the sums, the mean cost per call, the mean cache hit rate per
    call, and the share of all input tokens served from the cache."""
    usage = db.table("ai_calls").aggregate("ai_usage")
    rows = []
    for bucket in usage.buckets(tx, namespace=org, start=start, width=timedelta(days=1), count=days):
        totals = bucket.totals
        rows.append(
            {
                "day": bucket.start.date().isoformat(),
                "calls": totals.count,
                **totals.sums,
                "mean_cost": totals.mean("cost"),
                "mean_cache_hit_rate": totals.mean("cache_hit_rate"),
                "cached_share": totals.cached_tokens / totals.input_tokens if totals.input_tokens else None,
            }
        )
    return rows


def main(n: int = 200_000) -> None:
    calls = generate(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        started = time.perf_counter()
        load(db, calls)
        print(f"recorded {n:,} calls in {time.perf_counter() - started:.1f} s")
        with db.read() as tx:
            began = time.perf_counter()
            rows = daily_usage(tx, db, "org_0", T0 + timedelta(days=SPAN_DAYS - 30), 30)
            print(f"org_0, last 30 days, one buckets() call: {(time.perf_counter() - began) * 1e3:.2f} ms")
            for row in rows[-7:]:
                print(
                    f"  {row['day']}: {row['calls']:5} calls  ${row['cost']:9.4f}"
                    f"  in {row['input_tokens']:>10,}"
                    f"  cached {row['cached_tokens']:>10,}  out {row['output_tokens']:>9,}"
                    f"  hit rate {row['mean_cache_hit_rate']:.1%} (tokens {row['cached_share']:.1%})"
                    f"  mean ${row['mean_cost']:.5f}/call"
                )
            usage = db.table("ai_calls").aggregate("ai_usage")
            weeks = usage.buckets(tx, namespace="org_7", start=T0, width=timedelta(weeks=1), count=4)
            print(
                "org_7, first 4 weeks:",
                [(w.start.date().isoformat(), w.count, round(w["cost"], 4)) for w in weeks],
            )
            months = usage.buckets(tx, namespace="org_7", start=T0, width="month", count=3)
            print("org_7, by calendar month:", [(m.start.strftime("%Y-%m"), m.count) for m in months])


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
