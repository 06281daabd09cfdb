"""Bulk initialization: builds from sorted input, a table attach, and ``tallytree build`` from CSV.

Run: ``python benchmarks/bulk.py [--n 1000000] [--rounds 5] [--stream 10000000] [--attach 1000000]
[--csv 1000000]`` (each part runs only when asked, except the in-memory build). Everything runs in
this one process, on seeded data:

* ``--n``: ``Aggregate.build(tx, items, namespace=..., sorted=True)`` of ``n`` in-memory items, int keys
  (epoch seconds) and int ids, then UTC datetime keys and str ids, values (float, int), into a fresh
  in-memory database, commit included. The current column encoders are compared with the previous
  ones (int keys one Python step per value, datetime keys through ``int.to_bytes``, leaf sums by
  ``summarize``: kept below), interleaved over ``--rounds`` rounds; the median of each and their
  ratio are printed.
* ``--stream N``: the same int build of ``N`` items from a generator (nothing buffered), into an
  LMDB database (``durable=False``): items/s and the process's peak resident memory.
* ``--attach N``: attaching an aggregate (namespace org, key at, values cost and tokens) to a table
  of ``N`` documents, against the previous attach (one item per document, inserted per tree in
  sorted runs), interleaved in this run on the same table (each attached aggregate is dropped).
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
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import add, attrgetter, floordiv, itemgetter, sub
from typing import Any

import tallytree
from tallytree import _bulk, _extract, _table, cli
from tallytree._btree import Tree
from tallytree._keys import encode_key
from tallytree._node import _scaled_column

T0 = 1_700_000_000
START = datetime(2023, 11, 14, tzinfo=UTC)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def int_items(n: int) -> Iterator[tuple[int, int, tuple[float, int]]]:
    return ((T0 + 3 * i, i, (0.25 + i % 7, i % 1000)) for i in range(n))


def datetime_items(n: int) -> Iterator[tuple[datetime, str, tuple[float, int]]]:
    second = timedelta(seconds=1)
    return ((START + 3 * i * second, f"evt_{i}", (0.25 + i % 7, i % 1000)) for i in range(n))


def previous_int_keys(values: Any) -> list[bytes]:
    """The int key encoder before the lane encoder: one Python step per value."""
    if not (min(values) > -_bulk._FAST_INT_LIMIT and max(values) < _bulk._FAST_INT_LIMIT):
        return list(map(encode_key, values))
    return _bulk._int_keys_loop(values)


def previous_datetime_keys(values: Any) -> list[bytes] | None:
    """The datetime key encoder before the struct lanes."""
    if set(map(attrgetter("tzinfo"), values)) != {UTC}:
        return None
    micros = map(floordiv, map(sub, values, repeat(_bulk._EPOCH)), repeat(_bulk._MICROSECOND))
    biased = map(add, micros, repeat(1 << 63))
    return list(map(b"\x60".__add__, map(int.to_bytes, biased, repeat(8))))


def previous_summarize(count: int, columns: list[list[Any]]) -> list[int]:
    """The leaf summary before the repeated-fsum exact sum: scaled ints summed as big ints."""
    sums = []
    floats = []
    for column in columns:
        shift, values = _scaled_column(column)
        sums.append(sum(values) << shift)
        floats.append(list(map(type, column)).count(float))
    return [count, *sums, *floats]


CURRENT = {
    "_int_keys": _bulk._int_keys,
    "_datetime_keys": _bulk._datetime_keys,
    "summarize": _bulk.summarize,
}
PREVIOUS = {
    "_int_keys": previous_int_keys,
    "_datetime_keys": previous_datetime_keys,
    "summarize": previous_summarize,
}


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
        times: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(rounds):
            for name, functions in (("new", CURRENT), ("old", PREVIOUS)):
                for attribute, function in functions.items():
                    setattr(_bulk, attribute, function)
                try:
                    times[name].append(build_once(items))
                finally:
                    for attribute, function in CURRENT.items():
                        setattr(_bulk, attribute, function)
        new, old = statistics.median(times["new"]), statistics.median(times["old"])
        print(
            f"build sorted, {label}, n={n:,}: {n / new:,.0f} items/s (previous encoders {n / old:,.0f}; "
            f"{old / new:.2f}x), medians of {rounds}"
        )


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


def previous_attach(table: tallytree.Table, tx: Any, definition: _extract.Definition) -> None:
    """The attach before the column path (its code, kept here): one item per document, grouped per
    tree, sorted, then inserted per tree in a sorted run."""
    start = len(table._prefix)
    by_tree: dict[bytes, list[tuple[bytes, tuple[Any, ...]]]] = {}
    for key, data in tx.docs(table._prefix, table._stop):
        coord = definition.coordinates(_table.decode_doc(data), None, key[start:])
        if coord is not None:
            by_tree.setdefault(coord[0], []).append((coord[1], coord[2]))
    aggregate = definition.aggregate
    for tree_key in sorted(by_tree):
        rows = by_tree[tree_key]
        rows.sort(key=itemgetter(0))
        tree = Tree(tx, len(aggregate.fields), aggregate.node_size, tx.root(tree_key))
        tree.insert_sorted_run([row[0] for row in rows], [row[1] for row in rows])
        if tree.changed:
            tx.set_root(tree_key, tree.root)


def attach(n: int, rounds: int) -> None:
    docs = documents(n)
    times: dict[str, list[float]] = {"new": [], "old": []}
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        table = db.table("events")
        with db.write() as tx:
            table.insert_many(tx, docs)
        del docs
        for round_ in range(rounds):
            for name in ("new", "old"):
                aggregate = f"{name}_{round_}"
                started = time.perf_counter()
                if name == "new":
                    table.aggregate(aggregate, namespace="org", key="at", values=("cost", "tokens"))
                else:
                    _attach_with(table, aggregate, previous_attach)
                times[name].append(time.perf_counter() - started)
                table.drop_aggregate(aggregate)
    new, old = statistics.median(times["new"]), statistics.median(times["old"])
    print(
        f"attach to a table of {n:,}: {n / new:,.0f} documents/s (previous {n / old:,.0f}; "
        f"{old / new:.2f}x), medians of {rounds}"
    )


def _attach_with(table: tallytree.Table, name: str, how: Callable[..., None]) -> None:
    """Attach as ``table.aggregate`` does, with another way to build (for the comparison)."""
    original = _table.build_columns

    def previous(aggregate: Any, tx: Any, batches: Any) -> Any:
        definition = table._probe(aggregate, "at", "org", {"cost": "cost", "tokens": "tokens"}, None, "error")
        how(table, tx, definition)

    _table.build_columns = previous  # type: ignore[assignment]
    try:
        table.aggregate(name, namespace="org", key="at", values=("cost", "tokens"))
    finally:
        _table.build_columns = original


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
