"""One insert per commit where new events append at several places: a key ``(status, created_at)``.

Only a tree's last position has the pending node (see docs/performance.md, "What a write writes"),
so a time-ordered event is cheap and a scattered one rewrites its leaf's path. An application that
keys events by ``(status, created_at)`` appends at the end of each status's run: inside the tree
for every status but the last. This script measures, in rounds that interleave the cases, one
committed insert (``durable=False``) into trees preloaded with N events of five statuses:

* ``time-ordered``: a tree keyed by ``created_at`` alone, a new event at the end;
* ``status key``: a tree keyed by ``(status, created_at)``, a new event of a random status;
* ``status namespace``: a namespace per status, keyed by ``created_at``, the same events;
* ``scattered``: the time-ordered tree, an event at a random time.

and then each case's events in batches of 64 per commit (``insert_many``), per event. Every tree's
count per status is checked against the script's own count at the end::

    python benchmarks/append_points.py                   # N = 10^6, 6 rounds of 500 commits
    python benchmarks/append_points.py --n 100000 --rounds 4
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import tallytree

CASES = ("time-ordered", "status key", "status namespace", "scattered")
STATUSES = ("new", "open", "paid", "void", "late")
BATCH = 64
ORG = "org"


def measure(n: int, rounds: int, commits: int = 500, seed: int = 7) -> dict[str, tuple[float, float]]:
    """Per case: median microseconds of one insert per commit, and per event in batches of 64."""
    rng = random.Random(seed)
    initial = {status: len(range(i, n, len(STATUSES))) for i, status in enumerate(STATUSES)}
    counts = {"status key": Counter(initial), "status namespace": Counter(initial)}  # the script's own
    with tempfile.TemporaryDirectory() as directory, tallytree.open(Path(directory), durable=False) as db:
        plain = db.aggregate("plain", values=("cost",))
        keyed = db.aggregate("keyed", values=("cost",))
        spaced = db.aggregate("spaced", values=("cost",))
        with db.write() as tx:
            plain.build(tx, ((ts * 10, ts, (0.25,)) for ts in range(n)), namespace=ORG, sorted=True)
            by_key = sorted(((STATUSES[ts % len(STATUSES)], ts * 10), ts, (0.25,)) for ts in range(n))
            keyed.build(tx, iter(by_key), namespace=ORG, sorted=True)
            for i, status in enumerate(STATUSES):
                rows = ((ts * 10, ts, (0.25,)) for ts in range(i, n, len(STATUSES)))
                spaced.build(tx, rows, namespace=(ORG, status), sorted=True)
        clock = time.perf_counter
        state = {"id": 10 * n, "ts": 10 * n}
        plain_count = [n]

        def counted(case: str, statuses: list[str]) -> None:
            if case in counts:
                counts[case].update(statuses)
            else:
                plain_count[0] += len(statuses)

        def event() -> tuple[int, int, str]:
            state["id"] += 1
            state["ts"] += 1
            return state["id"], state["ts"], rng.choice(STATUSES)

        def batch(case: str) -> None:
            rows = [event() for _ in range(BATCH)]
            with db.write() as tx:
                if case == "time-ordered":
                    plain.insert_many(tx, [(ts, i, (0.5,)) for i, ts, _ in rows], namespace=ORG)
                elif case == "scattered":
                    plain.insert_many(
                        tx, [(rng.randrange(10 * n), i, (0.5,)) for i, _, _ in rows], namespace=ORG
                    )
                elif case == "status key":
                    keyed.insert_many(tx, [((s, ts), i, (0.5,)) for i, ts, s in rows], namespace=ORG)
                else:
                    for i, ts, s in rows:
                        spaced.insert(tx, ts, i, (0.5,), namespace=(ORG, s))
            counted(case, [s for _, _, s in rows])

        def one(case: str) -> None:
            i, ts, status = event()
            with db.write() as tx:
                if case == "time-ordered":
                    plain.insert(tx, ts, i, (0.5,), namespace=ORG)
                elif case == "scattered":
                    plain.insert(tx, rng.randrange(10 * n), i, (0.5,), namespace=ORG)
                elif case == "status key":
                    keyed.insert(tx, (status, ts), i, (0.5,), namespace=ORG)
                else:
                    spaced.insert(tx, ts, i, (0.5,), namespace=(ORG, status))
            counted(case, [status])

        singles = _rounds(clock, rounds, commits, one)
        batches = _rounds(clock, rounds, max(1, commits // BATCH), batch)
        with db.read() as tx:
            if plain.count(tx, namespace=ORG) != plain_count[0]:
                raise AssertionError(
                    f"plain: {plain.count(tx, namespace=ORG)} events, expected {plain_count[0]}"
                )
            for status in STATUSES:
                found = {
                    "status key": keyed.count(tx, namespace=ORG, prefix=(status,)),
                    "status namespace": spaced.count(tx, namespace=(ORG, status)),
                }
                for case, count in found.items():
                    if count != counts[case][status]:
                        raise AssertionError(
                            f"{case} {status!r}: {count} events, expected {counts[case][status]}"
                        )
    return {
        case: (statistics.median(singles[case]), statistics.median(batches[case]) / BATCH) for case in CASES
    }


def _rounds(
    clock: Callable[[], float], rounds: int, per_round: int, write: Callable[[str], None]
) -> dict[str, list[float]]:
    """Microseconds of each write, the cases interleaved (their order reversed every other round)."""
    times: dict[str, list[float]] = {case: [] for case in CASES}
    for round_index in range(rounds):
        for case in CASES if round_index % 2 == 0 else CASES[::-1]:
            for _ in range(per_round):
                began = clock()
                write(case)
                times[case].append((clock() - began) * 1e6)
    return times


def report(medians: dict[str, tuple[float, float]], n: int) -> str:
    base = medians["time-ordered"][0]
    lines = [
        f"| new event ({n:,} events, five statuses) | one insert per commit | / time-ordered "
        f"| per event, {BATCH} per commit |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        one, many = medians[case]
        lines.append(f"| {case} | {one:.1f} us | {one / base:.2f}x | {many:.1f} us |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e6, help="events in each tree (default 10^6)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the four cases (default 6)")
    parser.add_argument(
        "--commits", type=int, default=500, help="single commits per case and round (default 500)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    medians = measure(int(args.n), args.rounds, args.commits)
    print(report(medians, int(args.n)))
    elapsed = time.perf_counter() - started
    print(f"\nMedians over {args.rounds} interleaved rounds, every count checked; {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
