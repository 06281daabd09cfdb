"""Bulk initialization: builds from sorted input, a table attach, and ``tallytree build`` from CSV.

Run: ``python benchmarks/bulk.py [--n 1000000] [--rounds 5] [--stream 10000000] [--attach 1000000]
[--csv 1000000]`` (each part runs only when asked, except the in-memory build). Everything runs in
this one process, on seeded data:

* ``--n``: ``Aggregate.build(tx, items, namespace=..., sorted=True)`` of ``n`` in-memory items, int keys
  (epoch seconds) and int ids, then UTC datetime keys and str ids, values (float, int), into a fresh
  in-memory database, commit included. Builds with the C kernels (``tallytree._native``) and with
  their pure-Python twins alternate over ``--rounds`` rounds; the median of each and their ratio are
  printed (the Python figure is what an install without a C compiler gets).
* ``--stream N``: the same int build of ``N`` items from a generator (nothing buffered), into an
  LMDB database (``durable=False``): items/s and the process's peak resident memory.
* ``--attach N``: attaching an aggregate (namespace org, key at, values cost and tokens) to a table
  of ``N`` documents, with the C kernels and without, alternating in this run on the same table (each
  attached aggregate is dropped).
* ``--csv N``: ``tallytree build`` (``cli.main``) of an unsorted CSV file of ``N`` rows (org, ISO
  timestamp, id, cost, tokens; 1,000 namespaces), with the parse / build / commit split it reports.

Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the whole process so far), so run
``--stream`` alone to read its peak.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import tallytree
from tallytree import _native, cli
from tallytree._native import kernels

T0 = 1_700_000_000
START = datetime(2023, 11, 14, tzinfo=UTC)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def int_items(n: int) -> Iterator[tuple[int, int, tuple[float, int]]]:
    return ((T0 + 3 * i, i, (0.25 + i % 7, i % 1000)) for i in range(n))


def datetime_items(n: int) -> Iterator[tuple[datetime, str, tuple[float, int]]]:
    second = timedelta(seconds=1)
    return ((START + 3 * i * second, f"evt_{i}", (0.25 + i % 7, i % 1000)) for i in range(n))


KERNELS = {"C": True, "Python": False}


def build_once(items: list[Any]) -> float:
    db = tallytree.open_memory()
    events = db.aggregate("events", values=("cost", "tokens"))
    started = time.perf_counter()
    with db.write() as tx:
        events.build(tx, items, namespace="user:42", sorted=True)
    return time.perf_counter() - started


def in_memory(n: int, rounds: int) -> None:
    for label, items in (
        ("int keys, int ids", list(int_items(n))),
        ("datetime keys, str ids", list(datetime_items(n))),
    ):
        times: dict[str, list[float]] = {name: [] for name in KERNELS}
        for _ in range(rounds):
            for name, built in KERNELS.items():
                with kernels(built):
                    times[name].append(build_once(items))
        fast, slow = statistics.median(times["C"]), statistics.median(times["Python"])
        print(
            f"build sorted, {label}, n={n:,}: {n / fast:,.0f} items/s with the C kernels{_missing()} "
            f"(pure Python {n / slow:,.0f}; {slow / fast:.2f}x), medians of {rounds}"
        )


def _missing() -> str:
    return "" if _native.speedups is not None else " [NOT BUILT: both figures are pure Python]"


def stream(n: int) -> None:
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"))
        started = time.perf_counter()
        with db.write() as tx:
            events.build(tx, int_items(n), namespace="user:42", sorted=True)
        seconds = time.perf_counter() - started
        size = sum(entry.stat().st_blocks * 512 for entry in os.scandir(directory + "/db"))
    print(
        f"build sorted from a generator, n={n:,}: {seconds:.1f} s, {n / seconds:,.0f} items/s (commit and "
        f"generator included); peak RSS {peak_mib():,.0f} MiB; database {size / 2**20:,.0f} MiB"
    )


def documents(n: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    return [
        {
            "org": rng.randrange(100),
            "user": f"u{rng.randrange(5000)}",
            "at": START + timedelta(seconds=i * 3),
            "cost": rng.randrange(1, 10_000) / 1e4,
            "tokens": rng.randrange(50, 5000),
        }
        for i in range(n)
    ]


def attach(n: int, rounds: int) -> None:
    docs = documents(n)
    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        table = db.table("events")
        with db.write() as tx:
            table.insert_many(tx, docs)
        del docs
        for round_ in range(rounds):
            for name, built in KERNELS.items():
                aggregate = f"{name}_{round_}"
                with kernels(built):
                    started = time.perf_counter()
                    table.aggregate(aggregate, namespace="org", key="at", values=("cost", "tokens"))
                    times[name].append(time.perf_counter() - started)
                table.drop_aggregate(aggregate)
    fast, slow = statistics.median(times["C"]), statistics.median(times["Python"])
    print(
        f"attach to a table of {n:,}: {n / fast:,.0f} documents/s with the C kernels{_missing()} "
        f"(pure Python {n / slow:,.0f}; {slow / fast:.2f}x), medians of {rounds}"
    )


def csv_build(n: int) -> None:
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "events.csv")
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["org", "ts", "id", "cost", "tokens"])
            for i in range(n):
                at = START + timedelta(seconds=rng.randrange(365 * 86400))
                writer.writerow(
                    [
                        f"org{rng.randrange(1000)}",
                        at.isoformat(),
                        f"e{i}",
                        rng.randrange(1, 10_000) / 1e4,
                        rng.randrange(1, 5000),
                    ]
                )
        argv = [
            "build",
            os.path.join(directory, "db"),
            "usage",
            "--from",
            path,
            "--namespace",
            "org",
            "--key",
            "ts",
            "--key-type",
            "datetime",
            "--id",
            "id",
            "--sum",
            "cost",
            "--sum",
            "tokens",
            "--json",
            "--quiet",
        ]
        saved = sys.stdout
        sys.stdout = captured = _Capture()
        try:
            status = cli.main(argv)
        finally:
            sys.stdout = saved
        summary = json.loads(captured.text)
    assert status == 0, status
    print(
        f"tallytree build from CSV, {n:,} rows: {summary['seconds']:.1f} s, "
        f"{n / summary['seconds']:,.0f} rows/s; "
        f"parsing {summary['parse_seconds']:.1f} s, building {summary['build_seconds']:.1f} s, commit "
        f"{summary['commit_seconds']:.1f} s; peak RSS {peak_mib():,.0f} MiB"
    )


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e6, help="items of the in-memory builds (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison")
    parser.add_argument("--stream", type=float, default=0, help="items of the streamed build")
    parser.add_argument("--attach", type=float, default=0, help="documents of the table attach")
    parser.add_argument("--csv", type=float, default=0, help="rows of the CSV build")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    if args.n:
        in_memory(int(args.n), args.rounds)
    if args.stream:
        stream(int(args.stream))
    if args.attach:
        attach(int(args.attach), args.rounds)
    if args.csv:
        csv_build(int(args.csv))


if __name__ == "__main__":
    main()
