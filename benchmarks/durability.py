"""One insert per committed transaction, durable and not, next to the cost of one fsync.

PRODUCT.md asks for >= 20,000 single-insert commits per second without fsync, and for durable mode
to be "bounded by fsync, report it". This script measures, in the same run and interleaved rounds:

* ``fsync``: writing 4 KiB to a file and ``os.fdatasync`` -- the floor of any durable commit here;
* tallytree with ``durable=False`` and ``durable=True`` (LMDB syncs the data and the meta page);
* SQLite (WAL) with ``synchronous=NORMAL`` (no sync per commit) and ``synchronous=FULL``;

each inserting one event per transaction into a namespace preloaded with N events. It prints a
markdown table of medians, commits per second and the ratio to one fsync::

    python benchmarks/durability.py              # N = 100,000, 1,000 commits per system
    python benchmarks/durability.py --n 1000000 --commits 3000
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tallytree

Insert = Callable[[int, int], None]


def _tallytree(directory: Path, n: int, durable: bool) -> tuple[Insert, Callable[[], None]]:
    db = tallytree.open(directory / f"tt-{durable}", durable=durable)
    events = db.aggregate("events", values=("cost", "tokens"))
    with db.write() as tx:
        events.build(tx, ((ts * 10, ts, (0.25, 100)) for ts in range(n)), namespace="org", sorted=True)

    def insert(ts: int, item: int) -> None:
        with db.write() as tx:
            events.insert(tx, ts, item, (0.25, 100), namespace="org")

    return insert, db.close


def _sqlite(directory: Path, n: int, synchronous: str) -> tuple[Insert, Callable[[], None]]:
    con = sqlite3.connect(directory / f"sqlite-{synchronous}.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE events (ns TEXT, ts INTEGER, id INTEGER, cost REAL, tokens INTEGER)")
    con.execute("CREATE UNIQUE INDEX cover ON events (ns, ts, id, cost, tokens)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", ((ts * 10, ts) for ts in range(n)))
    con.execute("COMMIT")

    def insert(ts: int, item: int) -> None:
        con.execute("BEGIN")
        con.execute("INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", (ts, item))
        con.execute("COMMIT")

    return insert, con.close


def _fsync(directory: Path) -> tuple[Insert, Callable[[], None]]:
    descriptor = os.open(directory / "fsync.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    block = os.urandom(4096)

    def write(ts: int, item: int) -> None:
        os.pwrite(descriptor, block, (item % 256) * 4096)
        os.fdatasync(descriptor)

    return write, lambda: os.close(descriptor)


def measure(n: int, commits: int, rounds: int, seed: int = 7) -> dict[str, list[float]]:
    """Per-commit seconds for each system, ``commits`` in all, in ``rounds`` interleaved rounds."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tt-durability-") as tmp:
        directory = Path(tmp)
        systems = {
            "fsync (4 KiB + fdatasync)": _fsync(directory),
            "tallytree durable=False": _tallytree(directory, n, durable=False),
            "tallytree durable=True": _tallytree(directory, n, durable=True),
            "sqlite WAL synchronous=NORMAL": _sqlite(directory, n, "NORMAL"),
            "sqlite WAL synchronous=FULL": _sqlite(directory, n, "FULL"),
        }
        next_id = n
        try:
            for _ in range(rounds):
                for name, (insert, _) in systems.items():
                    times = samples.setdefault(name, [])
                    for _ in range(commits // rounds):
                        next_id += 1
                        ts = rng.randrange(n * 10)
                        start = time.perf_counter()
                        insert(ts, next_id)
                        times.append(time.perf_counter() - start)
        finally:
            for _, close in systems.values():
                close()
    return samples


def report(samples: dict[str, list[float]], n: int) -> str:
    """A markdown table: median and p90 per commit, commits/s, and the ratio to one fsync."""
    fsync = statistics.median(samples["fsync (4 KiB + fdatasync)"])
    lines = [
        f"One insert per committed transaction into a namespace of {n:,} events",
        "",
        "| system | median | p90 | commits/s | median / fsync |",
        "|---|---|---|---|---|",
    ]
    for name, times in samples.items():
        ordered = sorted(times)
        median = statistics.median(ordered)
        p90 = ordered[int(len(ordered) * 0.9)]
        cells = [name, f"{median * 1e6:,.1f} us", f"{p90 * 1e6:,.1f} us", f"{1 / median:,.0f}"]
        lines.append("| " + " | ".join([*cells, f"{median / fsync:.2f}x"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="events preloaded (default 100,000)")
    parser.add_argument("--commits", type=int, default=1_000, help="commits per system (default 1,000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)
    samples = measure(args.n, args.commits, args.rounds)
    print(report(samples, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
