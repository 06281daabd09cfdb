"""Table writes: one table insert maintaining three aggregates, next to a plain single-aggregate insert.

Run: ``python benchmarks/table_writes.py [n] [--attach] [--buckets]`` (default n = 100,000). Both
loops run in this one process, each inside one LMDB write transaction (``durable=False``), on the
same seeded documents: AI-usage events ``{"org", "user", "status", "at", "cost", "tokens"}`` with
``at`` increasing (the usual shape of an event log) and random orgs and users. The table maintains

* ``usage``: namespace org, key at, values (cost, tokens);
* ``by_user``: namespace user, key at;
* ``by_status``: namespace org, key (status, at), values (cost,);

the plain loop inserts into one aggregate shaped like ``usage``. Also timed: ``insert_many`` of the
same documents; with ``--attach``, attaching one aggregate to a table of 10^6 documents (the build);
with ``--buckets``, ``buckets`` (30 daily buckets) against one ``totals`` call on a 10^6-item
namespace. Prints one line per measurement; every write figure includes the commit.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import tallytree

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def documents(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "org": rng.randrange(100),
            "user": f"u{rng.randrange(5000)}",
            "status": rng.choice(("ok", "ok", "ok", "error", "cached")),
            "at": T0 + timedelta(seconds=i * 3),
            "cost": rng.randrange(1, 10_000) / 1e4,
            "tokens": rng.randrange(50, 5000),
        }
        for i in range(n)
    ]


def attach(table: tallytree.Table) -> None:
    table.aggregate("usage", namespace="org", key="at", values=("cost", "tokens"))
    table.aggregate("by_user", namespace="user", key="at")
    table.aggregate("by_status", namespace="org", key=("status", "at"), values=("cost",))


def _rate(label: str, n: int, seconds: float, extra: str = "") -> None:
    print(f"{label:<34}{n / seconds:>10,.0f} docs/s{extra}")


def inserts(n: int) -> None:
    """Plain single-aggregate inserts, then table inserts maintaining three aggregates, same run."""
    docs = documents(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        plain = db.aggregate("plain", values=("cost", "tokens"))
        started = time.perf_counter()
        with db.write() as tx:
            for i, doc in enumerate(docs):
                plain.insert(tx, doc["at"], i, (doc["cost"], doc["tokens"]), namespace=doc["org"])
        plain_seconds = time.perf_counter() - started

        table = db.table("events")
        attach(table)
        started = time.perf_counter()
        with db.write() as tx:
            for doc in docs:
                table.insert(tx, doc)
        table_seconds = time.perf_counter() - started

        batch = db.table("batch")
        batch.aggregate("b_usage", namespace="org", key="at", values=("cost", "tokens"))
        batch.aggregate("b_by_user", namespace="user", key="at")
        batch.aggregate("b_by_status", namespace="org", key=("status", "at"), values=("cost",))
        started = time.perf_counter()
        with db.write() as tx:
            batch.insert_many(tx, docs)
        many_seconds = time.perf_counter() - started
        with db.read() as tx:
            assert tallytree.verify(tx, table.aggregate("usage"), table).ok
    print(f"documents: {n:,} (commit included in every figure)")
    _rate("plain aggregate insert", n, plain_seconds)
    _rate("table insert, 3 aggregates", n, table_seconds, f"  ({table_seconds / plain_seconds:.2f}x plain)")
    _rate("table insert_many, 3 aggregates", n, many_seconds)


def attaching(n: int) -> None:
    """Attach one aggregate to a table that already holds ``n`` documents (the build)."""
    docs = documents(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        late = db.table("late")
        with db.write() as tx:
            late.insert_many(tx, docs)
        del docs
        started = time.perf_counter()
        late.aggregate("l_usage", namespace="org", key="at", values=("cost", "tokens"))
        _rate(f"attach to a table of {n:,}", n, time.perf_counter() - started)


def buckets(n: int = 1_000_000, repeat: int = 200) -> None:
    """30 daily buckets against one totals call, on one n-item namespace.

    Two regimes: *warm*, the same 30-day window again and again (a dashboard; the nodes on the paths
    and their cumulative arrays are cached), and *cold*, a window shifted at random for each call, the
    totals call with its own shift (so it does not reuse the leaves the buckets call just touched).
    """
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        calls = db.aggregate("calls", values=("cost", "tokens"))
        with db.write() as tx:
            rows = ((T0 + timedelta(seconds=i * 3), i, (0.001, 10)) for i in range(n))
            calls.insert_many(tx, rows, namespace="org")
        end = T0 + timedelta(seconds=n * 3)
        start = end - timedelta(days=30)
        rng = random.Random(3)
        for regime in ("warm", "cold"):
            bucket_times, totals_times = [], []
            with db.read() as tx:
                for _ in range(repeat):
                    shift = timedelta(seconds=rng.randrange(4 * 86400)) if regime == "cold" else timedelta(0)
                    began = time.perf_counter()
                    calls.buckets(tx, namespace="org", start=start - shift, width=timedelta(days=1), count=30)
                    bucket_times.append(time.perf_counter() - began)
                    shift = timedelta(seconds=rng.randrange(4 * 86400)) if regime == "cold" else timedelta(0)
                    began = time.perf_counter()
                    calls.totals(tx, namespace="org", ge=start - shift, lt=end - shift)
                    totals_times.append(time.perf_counter() - began)
            bucket_median, totals_median = statistics.median(bucket_times), statistics.median(totals_times)
            print(
                f"{regime}: buckets(30) median {bucket_median * 1e6:,.0f} us, totals median "
                f"{totals_median * 1e6:,.0f} us on {n:,} items: {bucket_median / totals_median:.1f}x"
            )


if __name__ == "__main__":
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    inserts(int(arguments[0]) if arguments else 100_000)
    if "--attach" in sys.argv:
        attaching(1_000_000)
    if "--buckets" in sys.argv:
        buckets()
