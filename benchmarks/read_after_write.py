"""Reads right after a write: what a service that records an event and then shows a total pays.

``reads.py`` measures reads of a tree that does not change. A write replaces the nodes of its path
(copy-on-write), and the new nodes have none of what reads derive and cache on committed nodes
(search images, cumulative rows); the write also leaves the CPU caches cold. This script measures, in
rounds that interleave the cases, one committed write (``durable=False``) followed by one read
transaction that asks ``totals`` over the same 10% window twice: the *first* read after the write and
the *second*. The cases:

* ``no write``: the baseline, the same reads with no write before them;
* ``other namespace``: the write goes to another namespace (the read's path is unchanged: only the
  cold caches and the transaction are left);
* ``time-ordered``: a new event in the read's namespace (it joins the pending node);
* ``scattered``: an event at a random time in the read's namespace (its path is rewritten).

Windows come from a fixed set read a few times before the rounds, so that their leaves are no longer
read for the first time (``reads.py`` measures that). Every answer is checked against a count kept
by the script. The figure is the median over rounds of each read's time::

    python benchmarks/read_after_write.py                  # N = 10^6, 1,000 rounds
    python benchmarks/read_after_write.py --n 100000 --rounds 300
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from bisect import bisect_left, insort
from pathlib import Path

import tallytree

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workload import SPAN, T0, make_dataset  # noqa: E402

CASES = ("no write", "other namespace", "time-ordered", "scattered")
WINDOWS = 300
OTHER = "other"


def measure(n: int, rounds: int, seed: int = 7) -> dict[str, tuple[float, float]]:
    """Median microseconds of the first and the second ``totals`` after each case's write."""
    rng = random.Random(seed)
    dataset = make_dataset("single", n)
    [(namespace, rows)] = dataset.by_namespace.items()
    stamps = [ts for ts, _, _, _ in rows]  # every stored time, sorted: the script's own count
    first: dict[str, list[float]] = {case: [] for case in CASES}
    second: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as directory, tallytree.open(Path(directory), durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"))
        with db.write() as tx:
            events.build(tx, ((ts, i, (cost, tokens)) for ts, i, cost, tokens in rows), namespace=namespace)
            events.insert(tx, 0, 0, (0.0, 0), namespace=OTHER)
        starts = [T0 + int(rng.random() * SPAN * 0.9) for _ in range(WINDOWS)]
        with db.read() as tx:
            for _ in events.items(tx, namespace=namespace):  # every node decoded: a warm process
                pass
            for _ in range(3):
                for start in starts:
                    events.totals(tx, namespace=namespace, ge=start, lt=start + SPAN // 10)
        clock = time.perf_counter
        next_id, newest = 10 * n, T0 + SPAN
        for round_index in range(rounds):
            order = CASES if round_index % 2 == 0 else CASES[::-1]
            for case in order:
                next_id += 1
                if case == "other namespace":
                    with db.write() as tx:
                        events.insert(tx, next_id, next_id, (0.5, 1), namespace=OTHER)
                elif case != "no write":
                    if case == "time-ordered":
                        newest += 1
                        ts = newest
                    else:
                        ts = T0 + int(rng.random() * SPAN)
                    with db.write() as tx:
                        events.insert(tx, ts, next_id, (0.01, 10), namespace=namespace)
                    insort(stamps, ts)
                start = rng.choice(starts)
                stop = start + SPAN // 10
                with db.read() as tx:
                    began = clock()
                    found = events.totals(tx, namespace=namespace, ge=start, lt=stop)
                    middle = clock()
                    again = events.totals(tx, namespace=namespace, ge=start, lt=stop)
                    ended = clock()
                expected = bisect_left(stamps, stop) - bisect_left(stamps, start)
                if found.count != expected or again != found:
                    raise AssertionError(f"{case}: totals {found.count}, {again.count}; expected {expected}")
                first[case].append((middle - began) * 1e6)
                second[case].append((ended - middle) * 1e6)
    return {case: (statistics.median(first[case]), statistics.median(second[case])) for case in CASES}


def report(medians: dict[str, tuple[float, float]], n: int) -> str:
    lines = [
        f"| write before the read transaction ({n:,} events) | first `totals` | second `totals` |",
        "|---|---|---|",
    ]
    for case in CASES:
        one, two = medians[case]
        lines.append(f"| {case} | {one:.1f} us | {two:.1f} us |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e6, help="events in the namespace read (default 10^6)")
    parser.add_argument("--rounds", type=int, default=1000, help="rounds of the four cases (default 1,000)")
    args = parser.parse_args()
    started = time.perf_counter()
    medians = measure(int(args.n), args.rounds)
    print(report(medians, int(args.n)))
    elapsed = time.perf_counter() - started
    print(f"\nMedians over {args.rounds} rounds, cases interleaved, every answer checked; {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
