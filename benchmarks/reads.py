"""Range reads in a process of their own: count, totals, rank and at, from 10^4 to 10^6 items.

Issue #2 asks for a median of at most 15 us per count or totals over any window, and less than 1.5x
growth from 10^4 to 10^6 items. ``compare.py`` measures reads next to five other systems, whose data
and scans share the CPU caches with tallytree's nodes; this script measures tallytree alone, on the
seeded events of ``compare.py`` (one namespace, spread over a year), with the C kernels and in pure
Python alternating in one process, so that both modes see the same machine load. Every answer of one
mode is compared with the other's.

``count_own_tx`` is ``count`` with a read transaction of its own per query (begun and ended around
it, as a request that asks one question does): what a transaction and the first read of a namespace
in it add.

Two query sets per operation, each asked of every size alike (the same windows, and ``at`` indices at
the same fractions of ``n``, so that the growth compares the same questions):

* ``fresh``: new random windows every round, so most leaves a round reads were not read in a while
  (out of the CPU caches): a service answering scattered questions;
* ``repeated``: the same windows every round (the ones a dashboard asks again and again).

Before the rounds, every node is decoded and searched a few times, as in a process that has served
reads for a while (a committed node gets its search image on its second search); ``--no-warm`` skips
the searches, so that the first rounds meet nodes searched for the first time (a process just
started: the first operation of a round to reach a leaf pays for its image). Each round runs every
(mode, size, set, operation) once, in an order that alternates between rounds; the figure reported
is the median over rounds of the mean time per query in a round::

    python benchmarks/reads.py                          # N = 10^4 and 10^6, 15 rounds
    python benchmarks/reads.py --sizes 10000,100000 --rounds 5 --queries 100
    python benchmarks/reads.py --no-warm                # first searches during the run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tallytree
from tallytree._native import kernels, speedups

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workload import make_dataset, window  # noqa: E402

OPERATIONS = ("count", "totals", "rank", "at", "count_own_tx")
SETS = ("fresh", "repeated")
MODES = ("C kernels", "pure Python")
FRACTION = 0.1  # windows cover 10% of the year


def build(path: Path, n: int, warm: bool = True, built: bool = True) -> tuple[Any, Any, str]:
    """A database holding the seeded single-namespace dataset of ``n`` events, opened for reading and
    its nodes decoded with the C kernels (``built``) or in pure Python, as a process of that mode has.

    ``warm``: search every node a few times first, as a process that has served reads has: a committed
    node gets its search image (see ``_speedups.c``) on its second search. Without it, most leaves of
    the 10^6 tree are searched for the first or second time during the run (a process just started).
    """
    dataset = make_dataset("single", n)
    [(namespace, rows)] = dataset.by_namespace.items()
    db = tallytree.open(path, durable=False)
    events = db.aggregate("events", values=("cost", "tokens"))
    with db.write() as tx:
        events.build(
            tx, ((ts, i, (cost, tokens)) for ts, i, cost, tokens in rows), namespace=namespace, sorted=True
        )
    db.close()  # reopened with an empty node cache, decoded in the mode measured
    db = tallytree.open(path, durable=False)
    events = db.aggregate("events", values=("cost", "tokens"))
    # decode every node once: the cache holds the whole tree, as in a warm process
    with kernels(built), db.read() as tx:
        for _ in events.items(tx, namespace=namespace):
            pass
        if warm:  # every leaf searched about three times, twice over
            for _ in range(2):
                for ts, *_ in rows[::16]:
                    events.rank(tx, ts, namespace=namespace)
    return db, events, namespace


def queries(rng: random.Random, count: int, sizes: list[int]) -> dict[int, list[tuple[int, int, int]]]:
    """``count`` (lo, hi, index) for each size in ``sizes``: a 10% window, and an index for ``at``.

    Every size gets the same windows, and the same place in its items for ``at`` (an index at the
    same fraction of ``n``): the growth from one size to the next compares the same questions, where
    independent samples (a fixed sample for the ``repeated`` set) would add their own differences.
    """
    drawn = [(*window(rng, FRACTION), rng.random()) for _ in range(count)]
    return {n: [(lo, hi, min(int(place * n), n - 1)) for lo, hi, place in drawn] for n in sizes}


def reader(op: str, db: Any, events: Any, namespace: str) -> Callable[[Any, tuple[int, int, int]], Any]:
    """The read of one query, inside a transaction (``count_own_tx``: in a read transaction of its
    own, begun and ended around it, as a request that asks one question does)."""
    if op == "count_own_tx":

        def own(_: Any, q: tuple[int, int, int]) -> Any:
            with db.read() as tx:
                return events.count(tx, namespace=namespace, ge=q[0], lt=q[1])

        return own
    if op == "count":
        return lambda tx, q: events.count(tx, namespace=namespace, ge=q[0], lt=q[1])
    if op == "totals":
        return lambda tx, q: events.totals(tx, namespace=namespace, ge=q[0], lt=q[1])
    if op == "rank":
        return lambda tx, q: events.rank(tx, q[0], namespace=namespace)
    return lambda tx, q: events.at(tx, q[2], namespace=namespace)


def measure(
    sizes: list[int], rounds: int, per_round: int, seed: int = 7, warm: bool = True
) -> dict[tuple[str, int, str, str], float]:
    """Median microseconds per query, by (mode, size, set, operation). Raises if the modes disagree."""
    rng = random.Random(seed)
    modes = MODES if speedups is not None else MODES[1:]
    results: dict[tuple[str, int, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        trees = {
            (mode, n): build(Path(directory) / f"{index}-{n}", n, warm, mode == MODES[0])
            for index, mode in enumerate(modes)
            for n in sizes
        }
        # each operation its own windows: one that followed another on the same windows would find
        # their leaves in the CPU caches
        repeated = {
            (n, op): batch for op in OPERATIONS for n, batch in queries(rng, per_round, sizes).items()
        }
        cells = [(mode, n, kind) for mode in modes for n in sizes for kind in SETS]
        for round_index in range(rounds):
            fresh = {
                (n, op): batch for op in OPERATIONS for n, batch in queries(rng, per_round, sizes).items()
            }
            answers: dict[tuple[int, str, str], list[Any]] = {}
            for mode, n, kind in cells if round_index % 2 == 0 else reversed(cells):
                db, events, namespace = trees[mode, n]
                with kernels(mode == MODES[0]), db.read() as tx:
                    for op in OPERATIONS:
                        batch = fresh[n, op] if kind == "fresh" else repeated[n, op]
                        read = reader(op, db, events, namespace)
                        start = time.perf_counter()
                        found = [read(tx, q) for q in batch]
                        elapsed = time.perf_counter() - start
                        results.setdefault((mode, n, kind, op), []).append(elapsed / len(batch) * 1e6)
                        known = answers.setdefault((n, kind, op), found)
                        if known != found:
                            raise AssertionError(f"{op} at N={n} ({kind}): the C kernels and Python disagree")
        for db, _, _ in trees.values():
            db.close()
    return {key: statistics.median(values) for key, values in results.items()}


def report(medians: dict[tuple[str, int, str, str], float], sizes: list[int]) -> str:
    """A markdown table: one row per (operation, set), one column per (mode, size), and the growth."""
    modes = [mode for mode in MODES if any(key[0] == mode for key in medians)]
    low, high = min(sizes), max(sizes)
    head = ["read", "queries"]
    for mode in modes:
        head += [f"{mode}, N={n:,}" for n in sizes] + [f"{mode}, growth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in OPERATIONS:
        for kind in SETS:
            cells = [op, kind]
            for mode in modes:
                cells += [f"{medians[mode, n, kind, op]:.2f} us" for n in sizes]
                cells.append(f"{medians[mode, high, kind, op] / medians[mode, low, kind, op]:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated N (default 10000,1000000)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    parser.add_argument(
        "--queries", type=int, default=200, help="queries per operation and round (default 200)"
    )
    parser.add_argument(
        "--no-warm",
        action="store_true",
        help="skip the warm-up searches: most nodes meet their first searches during the run",
    )
    args = parser.parse_args()
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    started = time.perf_counter()
    medians = measure(sizes, args.rounds, args.queries, warm=not args.no_warm)
    print(report(medians, sizes))
    print(
        f"\nMedian over {args.rounds} rounds of the mean per query ({args.queries} queries per round), "
        f"10% windows; growth = N={max(sizes):,} / N={min(sizes):,}; "
        f"{'no warm-up' if args.no_warm else 'every node searched before'}; "
        f"{time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
