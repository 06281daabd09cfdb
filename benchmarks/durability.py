"""One insert per committed transaction, durable and not, next to the cost of one fsync.

PRODUCT.md asks for >= 20,000 single-insert commits per second without fsync, and for durable mode
to be "bounded by fsync, report it". This script measures, in the same run and interleaved rounds:

* ``fsync``: writing 4 KiB to a file and ``os.fdatasync`` -- the floor of any durable commit here;
* tallytree with ``durable=False`` and ``durable=True`` (LMDB syncs the data and the meta page),
  each with random keys and with time-ordered keys (new events, after every stored one);
* SQLite (WAL) with ``synchronous=NORMAL`` (no sync per commit; random and time-ordered keys) and
  ``synchronous=FULL``;
* two LMDB floors (``sync=False``), bare LMDB transactions in an environment holding as many nodes
  of the same sizes as tallytree's: a *pending-node commit* (the tree's root record, holding a
  half-full pending node, rewritten: what one tallytree insert writes while its tree's pending node
  fills), and a *path rewrite* (one node per tree level appended, as many random old ones deleted,
  the root and next-id records rewritten: what every insert wrote before the pending node, and
  what merging it costs per random key);

each inserting one event per transaction into a namespace preloaded with N events. It prints a
markdown table of medians, p90s, means, commits per second (one over the mean: the throughput, the
occasional commit that merges a pending node included) and the ratio to one fsync::

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
from typing import Any

import lmdb

import tallytree
from tallytree._store import NODES

Insert = Callable[[int, int], None]
FLOOR = "lmdb floor: a pending-node commit"
FLOOR_PATH = "lmdb floor: a path rewrite"
RANDOM = "tallytree durable=False"
ORDERED = "tallytree durable=False, time-ordered keys"
DURABLE_ORDERED = "tallytree durable=True, time-ordered keys"
PENDING_BYTES = 866
"""The size of a half-full pending node (32 of the benchmark's events), as tallytree stores it."""


def _tallytree(
    directory: Path, n: int, durable: bool, shape: list[Any] | None = None, ordered: bool = False
) -> tuple[Insert, Callable[[], None]]:
    """Inserts into a namespace of ``n`` events (``ordered``: each after every stored one, as new
    events arrive); ``shape`` receives the tree's :func:`node_shape`."""
    db = tallytree.open(directory / f"tt-{durable}-{ordered}", durable=durable)
    events = db.aggregate("events", values=("cost", "tokens"))
    with db.write() as tx:
        events.build(tx, ((ts * 10, ts, (0.25, 100)) for ts in range(n)), namespace="org", sorted=True)
    if shape is not None:
        shape.extend(node_shape(db, events, "org"))

    def insert(ts: int, item: int) -> None:
        with db.write() as tx:
            events.insert(tx, n * 10 + item if ordered else ts, item, (0.25, 100), namespace="org")

    return insert, db.close


def _sqlite(
    directory: Path, n: int, synchronous: str, ordered: bool = False
) -> tuple[Insert, Callable[[], None]]:
    con = sqlite3.connect(directory / f"sqlite-{synchronous}-{ordered}.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE events (ns TEXT, ts INTEGER, id INTEGER, cost REAL, tokens INTEGER)")
    con.execute("CREATE UNIQUE INDEX cover ON events (ns, ts, id, cost, tokens)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", ((ts * 10, ts) for ts in range(n)))
    con.execute("COMMIT")

    def insert(ts: int, item: int) -> None:
        con.execute("BEGIN")
        con.execute(
            "INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", (n * 10 + item if ordered else ts, item)
        )
        con.execute("COMMIT")

    return insert, con.close


def node_shape(
    db: tallytree.Database, aggregate: tallytree.Aggregate, namespace: str
) -> tuple[int, list[int]]:
    """The height of a namespace's tree and the sizes of the stored nodes (every tree's), in bytes."""
    with db.read() as tx:
        root = tx.root(aggregate._tree_key(namespace))
        height = root.height if root is not None else 1
    backend = db._backend
    with backend.env.begin() as txn:
        sizes = [len(value) for _, value in txn.cursor(db=backend.dbs[NODES])]
    return height, sizes


def _lmdb_floor(
    directory: Path, height: int, sizes: list[int], path: bool
) -> tuple[Insert, Callable[[], None]]:
    """Bare LMDB commits with the page writes of one insert: with ``path``, ``height`` nodes appended
    and as many random old ones deleted, then the root record and the node id counter rewritten;
    else the root record alone, holding a pending node (format 3, see ``_tree``)."""
    env = lmdb.open(str(directory / f"floor-{path}"), map_size=1 << 34, sync=False, metasync=False, max_dbs=3)
    nodes, meta, roots = env.open_db(b"nodes"), env.open_db(b"meta"), env.open_db(b"roots")
    values = [os.urandom(size) for size in sizes]
    with env.begin(write=True) as txn:
        for node_id, value in enumerate(values):
            txn.put(node_id.to_bytes(8, "big"), value, db=nodes, append=True)
    live = list(range(len(values)))
    rng = random.Random(3)
    state = {"next": len(values)}

    record = os.urandom(60 + PENDING_BYTES)

    def commit(ts: int, item: int) -> None:
        with env.begin(write=True) as txn:
            if not path:
                txn.put(b"root", record, db=roots)
                return
            for level in range(height):
                node_id = state["next"]
                state["next"] += 1
                txn.put(
                    node_id.to_bytes(8, "big"), values[(item + level) % len(values)], db=nodes, append=True
                )
                at = rng.randrange(len(live))  # the replaced node: a random old one, its page rewritten
                live[at], live[-1] = live[-1], live[at]
                txn.delete(live.pop().to_bytes(8, "big"), db=nodes)
                live.append(node_id)
            txn.put(b"root", os.urandom(60), db=roots)
            txn.put(b"next_id", state["next"].to_bytes(8, "big"), db=meta)

    return commit, env.close


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
        shape: list[Any] = []
        systems = {
            "fsync (4 KiB + fdatasync)": _fsync(directory),
            RANDOM: _tallytree(directory, n, durable=False, shape=shape),
            ORDERED: _tallytree(directory, n, durable=False, ordered=True),
            "tallytree durable=True": _tallytree(directory, n, durable=True),
            DURABLE_ORDERED: _tallytree(directory, n, durable=True, ordered=True),
            "sqlite WAL synchronous=NORMAL": _sqlite(directory, n, "NORMAL"),
            "sqlite WAL synchronous=NORMAL, time-ordered keys": _sqlite(directory, n, "NORMAL", ordered=True),
            "sqlite WAL synchronous=FULL": _sqlite(directory, n, "FULL"),
        }
        height, sizes = shape
        systems[FLOOR] = _lmdb_floor(directory, height, sizes, path=False)
        systems[FLOOR_PATH] = _lmdb_floor(directory, height, sizes, path=True)
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
    """A markdown table: median, p90 and mean per commit, commits/s (from the mean: the throughput,
    occasional slow commits included), and the median as a multiple of one fsync."""
    fsync = statistics.median(samples["fsync (4 KiB + fdatasync)"])
    lines = [
        f"One insert per committed transaction into a namespace of {n:,} events",
        "",
        "| system | median | p90 | mean | commits/s | median / fsync |",
        "|---|---|---|---|---|---|",
    ]
    for name, times in samples.items():
        ordered = sorted(times)
        median = statistics.median(ordered)
        mean = statistics.fmean(ordered)
        p90 = ordered[int(len(ordered) * 0.9)]
        cells = [name, *(f"{value * 1e6:,.1f} us" for value in (median, p90, mean)), f"{1 / mean:,.0f}"]
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
