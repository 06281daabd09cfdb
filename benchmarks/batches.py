"""insert_many of scattered keys by batch size: how a batch's cost per event falls as it grows.

A batch pays per touched leaf, not per item (docs/performance.md, "What a write writes"): 5,000
random events land in about 4,400 of the 18,600 leaves of a 10^6-event namespace, one leaf rewrite
each, while 500,000 land about 27 to a leaf. This script measures ``insert_many`` of random-time
events (one transaction, ``durable=False``) into a namespace of N seeded events, for several batch
sizes, and time-ordered batches (every event after the stored ones) for reference. Each measurement
starts from a copy of the same freshly built database, with every node decoded in the cache first
(a warm process); batch sizes alternate between rounds; the figure is the median over rounds::

    python benchmarks/batches.py                                  # N = 10^6; 5,000 to 500,000
    python benchmarks/batches.py --n 100000 --sizes 1000,10000 --rounds 3

A second table removes random stored events the two ways an application can, in the same rounds:
``delete_many`` (one pass down the tree for the batch) and ``delete`` called once per event in one
transaction, the baseline; the ratio is the first's time over the second's.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tallytree

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workload import SPAN, T0, make_dataset  # noqa: E402

ORDERS = ("random", "time-ordered")
DELETES = ("delete_many", "delete each")


def build(path: Path, n: int) -> str:
    """The seeded single-namespace dataset of ``n`` events, built bottom-up; returns the namespace."""
    dataset = make_dataset("single", n)
    [(namespace, rows)] = dataset.by_namespace.items()
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"))
        with db.write() as tx:
            items = ((ts, i, (cost, tokens)) for ts, i, cost, tokens in rows)
            events.build(tx, items, namespace=namespace, sorted=True)
    return namespace


def batch(
    rng: random.Random, size: int, order: str, first_id: int
) -> list[tuple[int, int, tuple[float, int]]]:
    """``size`` new events: at random times within the year, or after it, in time order."""
    if order == "random":
        times = [T0 + int(rng.random() * SPAN) for _ in range(size)]
    else:
        times = [T0 + SPAN + index for index in range(size)]
    return [
        (ts, first_id + index, (round(rng.uniform(0.0, 0.05), 6), rng.randint(1, 8_000)))
        for index, ts in enumerate(times)
    ]


def insert_once(
    source: Path,
    work: Path,
    namespace: str,
    stored: int,
    items: list[tuple[int, int, tuple[float, int]]],
    verify: bool,
) -> float:
    """Seconds to insert ``items`` in one transaction into a fresh copy of ``source`` (warm cache),
    which holds ``stored`` events; the count is checked after, and with ``verify`` the whole tree."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    with tallytree.open(work, durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"))
        with db.read() as tx:
            for _ in events.items(tx, namespace=namespace):  # decode every node: a warm process
                pass
        start = time.perf_counter()
        with db.write() as tx:
            added = events.insert_many(tx, items, namespace=namespace)
        elapsed = time.perf_counter() - start
        with db.read() as tx:
            count = events.count(tx, namespace=namespace)
            problems = tallytree.check(tx, events, namespace=namespace) if verify else []
        if added != len(items) or count != stored + len(items):
            raise AssertionError(f"inserted {added} of {len(items)} events; the namespace holds {count}")
        if problems:
            raise AssertionError(f"the tree is damaged after the batch: {problems[:3]}")
    return elapsed


def delete_once(
    source: Path, work: Path, namespace: str, stored: int, way: str, size: int, seed: int, verify: bool
) -> float:
    """Seconds to remove ``size`` random stored events in one transaction from a fresh copy of
    ``source`` (warm cache), with ``delete_many`` or one ``delete`` each; both ways remove the same
    events for the same ``seed``. The count is checked after, and with ``verify`` the whole tree."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    with tallytree.open(work, durable=False) as db:
        events = db.aggregate("events", values=("cost", "tokens"))
        with db.read() as tx:
            chosen = random.Random(seed).sample(range(stored), size)
            stored_items = list(events.items(tx, namespace=namespace))  # decodes every node: warm
            gone = [(stored_items[at].key, stored_items[at].id) for at in chosen]
        start = time.perf_counter()
        with db.write() as tx:
            if way == "delete_many":
                events.delete_many(tx, gone, namespace=namespace)
            else:
                for key, item_id in gone:
                    events.delete(tx, key, item_id, namespace=namespace)
        elapsed = time.perf_counter() - start
        with db.read() as tx:
            count = events.count(tx, namespace=namespace)
            problems = tallytree.check(tx, events, namespace=namespace) if verify else []
        if count != stored - size:
            raise AssertionError(f"{way} of {size} events left {count} of {stored}")
        if problems:
            raise AssertionError(f"the tree is damaged after {way}: {problems[:3]}")
    return elapsed


def measure(
    n: int, sizes: list[int], rounds: int, verify: bool = False, seed: int = 11, deletes: bool = True
) -> dict[tuple[str, int], float]:
    """Median microseconds per event, by (order or way of deleting, batch size); ``verify`` runs the
    checker after each."""
    rng = random.Random(seed)
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        source, work = Path(directory) / "source", Path(directory) / "work"
        namespace = build(source, n)
        kinds = ORDERS + DELETES if deletes else ORDERS
        cells = [(kind, size) for kind in kinds for size in sizes if kind in ORDERS or size < n]
        for round_index in range(rounds):
            picks = rng.getrandbits(32)  # both ways of deleting remove the same events in a round
            for kind, size in cells if round_index % 2 == 0 else reversed(cells):
                if kind in DELETES:
                    elapsed = delete_once(source, work, namespace, n, kind, size, picks + size, verify)
                else:
                    items = batch(rng, size, kind, 10 * n)
                    elapsed = insert_once(source, work, namespace, n, items, verify)
                results.setdefault((kind, size), []).append(elapsed / size * 1e6)
    return {key: statistics.median(values) for key, values in results.items()}


def report(medians: dict[tuple[str, int], float], n: int) -> str:
    lines = [
        f"| batch (events, one transaction) into {n:,} | random keys | time-ordered keys |",
        "|---|---|---|",
    ]
    for size in sorted({size for _, size in medians}):
        cells = [f"{size:,}"]
        for order in ORDERS:
            per_event = medians[order, size]
            cells.append(f"{per_event:.1f} us/event ({1e6 / per_event:,.0f}/s)")
        lines.append("| " + " | ".join(cells) + " |")
    deleted = sorted({size for kind, size in medians if kind in DELETES})
    if deleted:
        lines += [
            "",
            f"| events removed (one transaction) of {n:,} | delete_many | delete each | ratio |",
            "|---|---|---|---|",
        ]
        for size in deleted:
            many, each = medians["delete_many", size], medians["delete each", size]
            lines.append(
                f"| {size:,} | {many:.1f} us/event ({1e6 / many:,.0f}/s) | {each:.1f} us/event "
                f"({1e6 / each:,.0f}/s) | {many / each:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e6, help="events stored before each batch (default 10^6)")
    parser.add_argument("--sizes", default="5000,50000,500000", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--check", action="store_true", help="run tallytree.check after every batch (O(N))")
    parser.add_argument("--no-deletes", action="store_true", help="time inserts only")
    args = parser.parse_args()
    n = int(args.n)
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    started = time.perf_counter()
    medians = measure(n, sizes, args.rounds, verify=args.check, deletes=not args.no_deletes)
    print(report(medians, n))
    elapsed = time.perf_counter() - started
    print(f"\nMedian over {args.rounds} rounds, each batch into a fresh copy; {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
