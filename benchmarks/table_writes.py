"""Table writes: one table insert maintaining three aggregates, next to a plain single-aggregate insert;
and batch updates and deletes next to the same calls one by one.

Run: ``python benchmarks/table_writes.py [n] [--attach] [--buckets] [--batches ...]`` (default n =
100,000; 0 skips the inserts). Both insert loops run in this one process, each inside one LMDB write
transaction (``durable=False``), on the same seeded documents: AI-usage events ``{"org", "user",
"status", "at", "cost", "tokens"}`` with ``at`` increasing (the usual shape of an event log) and random
orgs and users. The table maintains

* ``usage``: namespace org, key at, values (cost, tokens);
* ``by_user``: namespace user, key at;
* ``by_status``: namespace org, key (status, at), values (cost,);

the plain loop inserts into one aggregate shaped like ``usage``. Also timed: ``insert_many`` of the
same documents; with ``--attach``, attaching one aggregate to a table of 10^6 documents (the build);
with ``--buckets``, ``buckets`` (30 daily buckets) against one ``totals`` call on a 10^6-item
namespace.

With ``--batches``: ``update_many`` and ``delete_many`` of ``--ids`` ids (default 5,000) against the
same calls one by one (``update``, ``delete``), in a table of ``--table`` documents (default 10^5)
with two aggregates, ``usage`` and ``by_status`` above. The ids are a random sample, or with
``--order recent`` the newest documents (in each namespace, a run of neighbouring keys). The update
is a refund, ``{"status": "refunded", "cost": 0.0}``: the item moves in ``by_status`` and its values
change in ``usage``. Each measurement starts from a fresh copy of the same database, every node of
its aggregates decoded first (a warm process); the two ways alternate for ``--rounds`` rounds (default
3), so each ratio compares runs of the same moment, and both must end with the same table.

Prints one line per measurement; every write figure includes the commit::

    python benchmarks/table_writes.py                        # inserts of 10^5 documents
    python benchmarks/table_writes.py 0 --batches --table 1000000 --order recent
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
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


BATCH_KINDS = ("update", "delete")
WAYS = ("one by one", "batch")
REFUND = {"status": "refunded", "cost": 0.0}


def build_invoices(path: Path, n: int) -> None:
    """A table of ``n`` documents (ids 1 to n) with two aggregates, written with insert_many."""
    with tallytree.open(path, durable=False) as db:
        table = db.table("invoices")
        table.aggregate("usage", namespace="org", key="at", values=("cost", "tokens"))
        table.aggregate("by_status", namespace="org", key=("status", "at"), values=("cost",))
        with db.write() as tx:
            table.insert_many(tx, documents(n))


def _write(table: tallytree.Table, kind: str, way: str, ids: list[int]) -> Callable[[Any], Any]:
    if kind == "update":
        if way == "batch":
            return lambda tx: table.update_many(tx, [(doc_id, REFUND) for doc_id in ids])
        return lambda tx: [table.update(tx, doc_id, REFUND) for doc_id in ids]
    if way == "batch":
        return lambda tx: table.delete_many(tx, ids)
    return lambda tx: [table.delete(tx, doc_id) for doc_id in ids]


def batch_once(source: Path, work: Path, kind: str, way: str, ids: list[int]) -> tuple[float, Any]:
    """Seconds for one way of one kind of write, commit included, in a fresh copy of ``source``
    (every node of the aggregates decoded first); and what the table holds after, to compare."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    with tallytree.open(work, durable=False) as db:
        table = db.table("invoices")
        aggregates = [table.aggregate(name) for name in table.aggregates()]
        with db.read() as tx:
            for aggregate in aggregates:  # a warm process: every node decoded and cached
                for namespace, _ in aggregate.namespaces(tx):
                    for _ in aggregate.items(tx, namespace=namespace):
                        pass
        write = _write(table, kind, way, ids)
        started = time.perf_counter()
        with db.write() as tx:
            write(tx)
        seconds = time.perf_counter() - started
        with db.read() as tx:
            held = (
                table.count(tx),
                [
                    sorted(
                        (repr(namespace), totals.as_dict()) for namespace, totals in aggregate.namespaces(tx)
                    )
                    for aggregate in aggregates
                ],
            )
    shutil.rmtree(work, ignore_errors=True)
    return seconds, held


def batches(
    n: int = 100_000, m: int = 5_000, rounds: int = 3, order: str = "scattered"
) -> dict[tuple[str, str], list[float]]:
    """``update_many`` and ``delete_many`` of ``m`` ids against one call per id, in a table of ``n``
    documents with two aggregates; the ways alternate in each round. The ids are ``scattered`` (a
    random sample) or the ``recent`` ones (the last m documents: in each namespace, a run of
    neighbouring keys). Returns the seconds per (kind, way), one per round, and prints them with the
    same-round ratios."""
    if order == "scattered":
        ids = random.Random(7).sample(range(1, n + 1), m)
    else:
        ids = list(range(n - m + 1, n + 1))
    seconds: dict[tuple[str, str], list[float]] = {(kind, way): [] for kind in BATCH_KINDS for way in WAYS}
    with tempfile.TemporaryDirectory() as directory:
        source, work = Path(directory) / "source", Path(directory) / "work"
        build_invoices(source, n)
        for round_ in range(rounds):
            for kind in BATCH_KINDS:
                held = {}
                for way in WAYS if round_ % 2 == 0 else WAYS[::-1]:
                    took, held[way] = batch_once(source, work, kind, way, ids)
                    seconds[kind, way].append(took)
                assert held["batch"] == held["one by one"], (kind, held)  # the same end state
    print(f"table of {n:,} documents, 2 aggregates, {m:,} {order} ids (commit included)")
    for kind in BATCH_KINDS:
        one, many = seconds[kind, "one by one"], seconds[kind, "batch"]
        ratios = [batch / single for batch, single in zip(many, one, strict=True)]
        print(
            f"{kind:<8} one by one {min(one) * 1e3:,.0f}-{max(one) * 1e3:,.0f} ms, batch "
            f"{min(many) * 1e3:,.0f}-{max(many) * 1e3:,.0f} ms: batch/one-by-one "
            f"{min(ratios):.2f}-{max(ratios):.2f}x in {rounds} rounds"
        )
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="documents to insert (0: skip)")
    parser.add_argument("--attach", action="store_true", help="attach to a table of 10^6 documents")
    parser.add_argument("--buckets", action="store_true", help="buckets against totals on 10^6 items")
    parser.add_argument("--batches", action="store_true", help="update_many/delete_many against one by one")
    parser.add_argument("--table", type=int, default=100_000, help="documents in the table for --batches")
    parser.add_argument("--ids", type=int, default=5_000, help="ids per batch for --batches")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for --batches")
    parser.add_argument(
        "--order", choices=("scattered", "recent"), default="scattered", help="which ids --batches writes"
    )
    options = parser.parse_args()
    if options.n:
        inserts(options.n)
    if options.attach:
        attaching(1_000_000)
    if options.buckets:
        buckets()
    if options.batches:
        batches(options.table, options.ids, options.rounds, options.order)
