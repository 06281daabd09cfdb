"""One write per committed transaction, of each kind, next to SQLite doing the same writes.

``durability.py`` times inserts; applications also delete items, change their values (a quota's
usage, an invoice's amount) and move them to another key (a leaderboard's new score, a load's new
status). This script times, in the same run and in interleaved rounds, one write per committed
transaction (``durable=False``; SQLite in WAL mode with ``synchronous=NORMAL``, which syncs no
commit either) into a namespace preloaded with N events:

* ``insert``: a new event at a random time (a scattered key: its leaf's path is rewritten);
* ``delete``: a random stored event;
* ``update``: a random stored event given new values (``upsert``; SQLite: ``UPDATE ... SET cost,
  tokens``);
* ``move``: a random stored event moved to a new random time (``replace(new_key=...)``; SQLite:
  ``UPDATE ... SET ts``);

SQLite holds the events in a table with the covering index the benchmarks use everywhere,
``(ns, ts, id, cost, tokens)``, so each of its writes changes that index as tallytree's change its
tree.

A third column is the storage floor, ``lmdb``: bare py-lmdb in an environment opened as tallytree
opens its own, holding a copy of tallytree's stored nodes, doing per commit the LMDB work of a
path rewrite and nothing else. A tree that rewrites the path of a write (every tree that keeps
counts and sums in its nodes) must, per committed write, read the leaf, write a new copy of each
node of the path (``depth`` nodes of the sizes tallytree stores; a move rewrites two paths that
share the root) over the old one's key, and put its root record. Whatever tallytree spends above
that floor is its own code; no code that rewrites paths on LMDB, in any language, can go below the
floor. (Until format 4, tallytree wrote each copy under a fresh key and deleted the old one, and
put its node id counter: the floor did the same.)

It prints a markdown table of medians, means and commits per second (one over the mean),
tallytree's median as a multiple of SQLite's, the floor's median and tallytree's as a multiple of
it::

    python benchmarks/single_writes.py              # N = 100,000, 1,000 commits per kind
    python benchmarks/single_writes.py --n 1000000 --commits 3000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

import tallytree

KINDS = ("insert", "delete", "update", "move")
SYSTEMS = ("tallytree", "sqlite", "lmdb")
Write = Callable[[int, int], None]
"""One committed write: ``(item, ts)``, a preloaded event's id (or a new id for an insert) and a
random time."""


Rows = Callable[[], list[tuple[int, int, float, int]]]
"""Every stored event as ``(ts, id, cost, tokens)``, in order: both systems must end with the same."""


def _build(path: Path, n: int, node_size: int | None) -> None:
    """tallytree's database of ``n`` events, built bottom-up and closed."""
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"), node_size=node_size)
        with db.write() as tx:
            events.build(tx, ((ts * 10, ts, (0.25, 100)) for ts in range(n)), namespace="org", sorted=True)


def _tallytree(path: Path) -> tuple[dict[str, Write], Rows, Callable[[], None]]:
    db = tallytree.open(path, durable=False)
    events = db.aggregate("events", values=("cost", "tokens"))

    def insert(item: int, ts: int) -> None:
        with db.write() as tx:
            events.insert(tx, ts, item, (0.25, 100), namespace="org")

    def delete(item: int, ts: int) -> None:
        with db.write() as tx:
            events.delete(tx, item * 10, item, namespace="org")

    def update(item: int, ts: int) -> None:
        with db.write() as tx:
            events.upsert(tx, item * 10, item, (0.5, 7), namespace="org")

    def move(item: int, ts: int) -> None:
        with db.write() as tx:
            events.replace(tx, item * 10, item, namespace="org", new_key=ts)

    def rows() -> list[tuple[int, int, float, int]]:
        with db.read() as tx:
            return [(item.key, item.id, *item.values) for item in events.items(tx, namespace="org")]

    return {"insert": insert, "delete": delete, "update": update, "move": move}, rows, db.close


def _sqlite(directory: Path, n: int) -> tuple[dict[str, Write], Rows, Callable[[], None]]:
    con = sqlite3.connect(directory / "sqlite.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE events (ns TEXT, ts INTEGER, id INTEGER, cost REAL, tokens INTEGER)")
    con.execute("CREATE UNIQUE INDEX cover ON events (ns, ts, id, cost, tokens)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", ((ts * 10, ts) for ts in range(n)))
    con.execute("COMMIT")

    def commit(sql: str, *parameters: object) -> None:
        con.execute("BEGIN")
        if con.execute(sql, parameters).rowcount != 1:
            raise AssertionError(f"{sql} {parameters} changed no row")
        con.execute("COMMIT")

    where = "WHERE ns = 'org' AND ts = ? AND id = ?"
    writes: dict[str, Write] = {
        "insert": lambda item, ts: commit("INSERT INTO events VALUES ('org', ?, ?, 0.25, 100)", ts, item),
        "delete": lambda item, ts: commit(f"DELETE FROM events {where}", item * 10, item),
        "update": lambda item, ts: commit(
            f"UPDATE events SET cost = 0.5, tokens = 7 {where}", item * 10, item
        ),
        "move": lambda item, ts: commit(f"UPDATE events SET ts = ? {where}", ts, item * 10, item),
    }

    def rows() -> list[tuple[int, int, float, int]]:
        return con.execute("SELECT ts, id, cost, tokens FROM events ORDER BY ts, id").fetchall()

    return writes, rows, con.close


def _lmdb_floor(source: Path, path: Path, seed: int) -> tuple[dict[str, Write], Rows, Callable[[], None]]:
    """The storage floor of a path rewrite (see the module docstring), on a copy of tallytree's
    closed database ``source``: its nodes, its depth (from ``tallytree stats --json``), its root
    record. Each write overwrites ``depth`` stored nodes drawn at random (two paths for a move)."""
    stats = subprocess.run(
        [sys.executable, "-m", "tallytree", "stats", str(source), "events", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    depth = json.loads(stats.stdout)["aggregates"][0]["depth"]
    shutil.copytree(source, path)
    # as tallytree opens a database with durable=False (tallytree/_lmdb.py)
    env = lmdb.open(
        str(path), map_size=1 << 30, max_dbs=4, sync=False, metasync=False, readahead=False, lock=True
    )
    nodes, roots = (env.open_db(name) for name in (b"nodes", b"roots"))
    with env.begin() as txn:
        stored = dict(txn.cursor(nodes))  # node key (slot) -> stored bytes
        root_key, root_record = next(iter(txn.cursor(roots)))
    slots = sorted(stored)
    rng = random.Random(seed)

    def rewrite(count: int) -> None:
        # the calls take their arguments by position, as tallytree's do (tallytree/_lmdb.py)
        txn = env.begin(None, None, True)
        keys = rng.sample(slots, count)
        txn.get(keys[0], None, nodes)  # the leaf, read to merge the write in (the rest are cached)
        for key in sorted(keys):  # each node rewritten at its own size, over its own key
            txn.put(key, stored[key], True, True, False, nodes)
        txn.put(root_key, root_record, True, True, False, roots)
        txn.commit()

    def path_rewrite(item: int, ts: int) -> None:
        rewrite(depth)

    def two_paths(item: int, ts: int) -> None:
        rewrite(2 * depth - 1)

    writes = {"insert": path_rewrite, "delete": path_rewrite, "update": path_rewrite, "move": two_paths}
    return writes, lambda: [], env.close


def measure(
    n: int, commits: int, rounds: int, seed: int = 7, node_size: int | None = None
) -> dict[tuple[str, str], list[float]]:
    """Per-commit seconds for each (system, kind), ``commits`` each, in ``rounds`` interleaved
    rounds, tallytree's aggregate with ``node_size`` (None: the default). tallytree and SQLite get
    the same items and times; each stored item is written once. Raises AssertionError if the two
    then hold different events."""
    rng = random.Random(seed)
    per_round = commits // rounds
    chosen = rng.sample(range(n), 3 * per_round * rounds)  # distinct items to delete, update, move
    targets = {
        kind: chosen[index * per_round * rounds : (index + 1) * per_round * rounds]
        for index, kind in enumerate(("delete", "update", "move"))
    }
    targets["insert"] = list(range(n, n + per_round * rounds))  # new ids
    times = [rng.randrange(n * 10) for _ in range(per_round * rounds)]
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tt-single-writes-") as tmp:
        directory = Path(tmp)
        _build(directory / "built", n, node_size)
        systems: dict[str, tuple[dict[str, Write], Rows, Callable[[], None]]] = {}
        try:  # each system made is closed, whatever happens after
            systems["lmdb"] = _lmdb_floor(directory / "built", directory / "lmdb", seed)
            shutil.move(directory / "built", directory / "tallytree")
            systems["tallytree"] = _tallytree(directory / "tallytree")
            systems["sqlite"] = _sqlite(directory, n)
            for round_ in range(rounds):
                for name, (writes, _, _) in systems.items():
                    for kind in KINDS:
                        measured = samples.setdefault((name, kind), [])
                        write = writes[kind]
                        for at in range(round_ * per_round, (round_ + 1) * per_round):
                            item, ts = targets[kind][at], times[at]
                            start = time.perf_counter()
                            write(item, ts)
                            measured.append(time.perf_counter() - start)
            if systems["tallytree"][1]() != systems["sqlite"][1]():
                raise AssertionError("tallytree and SQLite hold different events after the same writes")
        finally:
            for _, _, close in systems.values():
                close()
    return samples


def report(samples: dict[tuple[str, str], list[float]], n: int) -> str:
    """A markdown table: per kind of write, tallytree's and SQLite's median and mean per commit and
    commits/s (from the mean), tallytree's median as a multiple of SQLite's, the storage floor's
    median and tallytree's median as a multiple of it."""
    lines = [
        f"One write per committed transaction into a namespace of {n:,} events",
        "",
        "| write | tallytree median | mean | commits/s | sqlite median | mean | commits/s | ratio to sqlite "
        "| LMDB floor median | ratio to floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        cells = [kind]
        medians = {name: statistics.median(samples[(name, kind)]) for name in SYSTEMS}
        for name in ("tallytree", "sqlite"):
            mean = statistics.fmean(samples[(name, kind)])
            cells += [f"{medians[name] * 1e6:,.1f} us", f"{mean * 1e6:,.1f} us", f"{1 / mean:,.0f}"]
        cells.append(f"{medians['tallytree'] / medians['sqlite']:.2f}x")
        cells += [f"{medians['lmdb'] * 1e6:,.1f} us", f"{medians['tallytree'] / medians['lmdb']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="events preloaded (default 100,000)")
    parser.add_argument("--commits", type=int, default=1_000, help="commits per kind (default 1,000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--node-size", type=int, help="tallytree's node size (default: the library's)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.commits < args.rounds or 3 * args.commits > args.n:
        parser.error("need 1 <= rounds <= commits and 3 * commits <= n (each stored item is written once)")
    print(report(measure(args.n, args.commits, args.rounds, node_size=args.node_size), args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
