"""Side-by-side benchmark of tallytree against the alternatives, in one command.

    python benchmarks/compare.py [--sizes 10000,100000,1000000] [--quick] [--out benchmarks/results]

For each size N and each shape (one namespace of N events; 1,000 namespaces with Zipf-like sizes adding
up to N) it loads the same seeded events into every available system, checks that every system gives
the same answers, then times each operation in interleaved rounds (every round runs every system, in a
rotated order, so that noise on this shared machine hits all of them alike). It writes a JSON file per
run, ``RESULTS.md`` (tables, growth exponents, headline ratios) and log-log plots.

See ``benchmarks/README.md`` for the method and its caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script from anywhere, or imported by the smoke test
    sys.path.insert(0, str(HERE))

import systems as systems_module  # noqa: E402
from systems import ALL_SYSTEMS, Postgres, System, TallyTree, Unavailable  # noqa: E402
from workload import (  # noqa: E402
    SPAN,
    T0,
    Dataset,
    day_bounds,
    make_dataset,
    new_event,
    oracle_count,
    oracle_rank,
    oracle_totals,
    window,
)

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
SHAPES = ("single", "multi")


@dataclass
class Settings:
    """How much work each measurement does."""

    rounds: int = 7  # timed rounds per operation (plus ``warmup`` untimed ones)
    warmup: int = 1
    batch: int = 200  # queries per system per round, at most
    budget: float = 0.1  # seconds per system per round before a batch stops early
    checks: int = 10  # queries compared with the oracle before timing
    write_rounds: int = 5
    writes_per_round: int = 100  # single-event transactions per system per round
    batch_rounds: int = 3
    batch_items: int = 5_000  # events per many-in-one-transaction batch

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            rounds=3,
            warmup=1,
            batch=50,
            budget=0.01,
            checks=5,
            write_rounds=2,
            writes_per_round=20,
            batch_rounds=2,
            batch_items=500,
        )


# Operations, in the order they run. ``single``-only ones are skipped for the multi shape.
READ_OPS: list[tuple[str, str, str]] = [
    # (op name, adapter method, description)
    ("count_1%", "count", "count over a random 1% time window"),
    ("count_10%", "count", "count over a random 10% time window"),
    ("count_50%", "count", "count over a random 50% time window"),
    ("totals_1%", "totals", "count + sum(cost) + sum(tokens) over a 1% window"),
    ("totals_10%", "totals", "count + sums over a 10% window"),
    ("totals_50%", "totals", "count + sums over a 50% window"),
    ("count_10%_own_tx", "count", "10% count, each query in its own read transaction"),
    ("rank", "rank", "number of events before a random time"),
    ("select", "select", "the event at a random position (ORDER BY ts, id LIMIT 1 OFFSET i)"),
    ("buckets_30d", "buckets", "30 daily count + sums buckets over a random month"),
    (
        "buckets_30d_native",
        "buckets_native",
        "the same 30 buckets with tallytree's one-call buckets(edges=...) (tallytree only)",
    ),
]
MULTI_READ_OPS = {"count_10%", "totals_10%", "rank", "select"}
WRITE_OPS = [
    ("insert_one", "insert one event per committed transaction"),
    ("insert_one_append", "insert one new event (after every stored one) per committed transaction"),
    ("delete_one", "delete one event per committed transaction"),
    ("insert_batch_random", "insert many random-time events in one transaction (per event)"),
    ("insert_batch_append", "append many time-ordered events in one transaction (per event)"),
    ("delete_range_10%", "delete the oldest 10% of a namespace in one transaction (whole op)"),
]
MULTI_WRITE_OPS = {"insert_one", "insert_one_append", "delete_one"}
TALLYTREE_ONLY = {"load_build": "load", "buckets_30d_native": "buckets_30d"}
"""tallytree-only variants of an operation, compared with the alternatives' numbers for that operation."""
DESCRIPTIONS = {
    "load": "bulk load of all N events (per event; tallytree: sorted insert_many, one tx per namespace)",
    "load_build": "bulk load by tallytree's bottom-up build() / build_many() of sorted input, one "
    "transaction (tallytree only)",
    **{name: text for name, _, text in READ_OPS},
    **dict(WRITE_OPS),
}
PLOTTED = ["count_10%", "totals_10%", "rank", "select", "buckets_30d", "insert_one"]


# -- recording ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one run measured."""

    settings: Settings
    measurements: list[dict[str, Any]] = field(default_factory=list)
    disk: list[dict[str, Any]] = field(default_factory=list)
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    def record(
        self,
        shape: str,
        n: int,
        op: str,
        system: str,
        seconds: Sequence[float],
        *,
        items: int = 1,
        total: float | None = None,
    ) -> None:
        """Record per-operation times (``items`` events per timed operation, for throughput)."""
        if not seconds:
            return
        ordered = sorted(seconds)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        self.measurements.append(
            {
                "shape": shape,
                "n": n,
                "op": op,
                "system": system,
                "median_s": median,
                "p90_s": p90,
                "mean_s": statistics.fmean(ordered),
                "samples": len(ordered),
                "items_per_op": items,
                "throughput_per_s": items / median if median > 0 else None,
                "total_s": total,
            }
        )

    def check(self, what: str, expected: Any, got: Any) -> bool:
        """Compare two answers; record a failure when they differ."""
        self.checks += 1
        if same(expected, got):
            return True
        message = f"{what}: expected {abbreviate(expected)}, got {abbreviate(got)}"
        self.failures.append(message)
        self.log(f"  CROSS-CHECK FAILED {message}")
        return False


def same(a: Any, b: Any) -> bool:
    """Equal answers: ints exactly, floats to a relative 1e-9 (sums are added in different orders)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def abbreviate(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


# -- the measurements ---------------------------------------------------------------------------------


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= max(1, len(items))
    return items[by:] + items[:by]


def oracle(method: str, rows: list[tuple], args: tuple) -> Any:
    """The answer computed from the sorted rows in plain Python."""
    if method == "count":
        return oracle_count(rows, args[1], args[2])
    if method == "totals":
        return oracle_totals(rows, args[1], args[2])
    if method == "rank":
        return oracle_rank(rows, args[1])
    if method == "select":
        return rows[args[1]][:2]
    if method in ("buckets", "buckets_native"):
        bounds = args[1]
        return [oracle_totals(rows, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    raise ValueError(method)


def make_queries(op: str, dataset: Dataset, rng: random.Random, count: int) -> list[tuple]:
    queries = []
    for _ in range(count):
        ns = dataset.pick_namespace(rng)
        if op.startswith(("count", "totals")):
            fraction = float(op.split("_")[1].rstrip("%")) / 100
            queries.append((ns, *window(rng, fraction)))
        elif op == "rank":
            queries.append((ns, T0 + rng.randrange(SPAN)))
        elif op == "select":
            queries.append((ns, rng.randrange(len(dataset.by_namespace[ns]))))
        elif op == "buckets_30d":
            queries.append((ns, day_bounds(rng)))
        else:
            raise ValueError(op)
    return queries


def measure_reads(
    run: Run,
    shape: str,
    n: int,
    op: str,
    method: str,
    live: list[System],
    dataset: Dataset,
    queries: list[tuple],
) -> None:
    """Cross-check, then time ``method`` on every system in interleaved rounds."""
    live = [system for system in live if callable(getattr(system, method, None))]
    if not live:
        return
    settings = run.settings
    own_tx = op.endswith("own_tx")
    where = f"{shape} N={n} {op}"
    # 1. correctness first: the first queries against the plain-Python oracle, on every system
    for index, args in enumerate(queries[: settings.checks]):
        expected = oracle(method, dataset.by_namespace[args[0]], args)
        for system in live:
            with system.reading():
                got = getattr(system, method)(*args)
            run.check(f"{where} {system.name} query {index} {args!r}", expected, got)
    # 2. interleaved rounds; every answer given while timing is compared with tallytree's
    answers: dict[str, dict[int, Any]] = {system.name: {} for system in live}
    samples: dict[str, list[float]] = {system.name: [] for system in live}
    position = dict.fromkeys(answers, 0)
    clock = time.perf_counter_ns
    for round_index in range(settings.warmup + settings.rounds):
        timed = round_index >= settings.warmup
        for system in rotated(live, round_index):
            call = getattr(system, method)
            mine = answers[system.name]
            times = samples[system.name]
            deadline = time.perf_counter() + settings.budget
            context = contextlib.nullcontext() if own_tx else system.reading()
            with context:
                for _ in range(settings.batch):
                    index = position[system.name] % len(queries)
                    position[system.name] += 1
                    args = queries[index]
                    if own_tx:
                        start = clock()
                        with system.reading():
                            answer = call(*args)
                        stop = clock()
                    else:
                        start = clock()
                        answer = call(*args)
                        stop = clock()
                    if timed:
                        times.append((stop - start) / 1e9)
                    mine.setdefault(index, answer)
                    if time.perf_counter() > deadline:
                        break
    reference = answers[live[0].name]
    for system in live[1:]:
        for index, answer in answers[system.name].items():
            if index in reference:
                run.check(
                    f"{where} {system.name} vs {live[0].name} query {index}",
                    reference[index],
                    answer,
                )
    for system in live:
        run.record(shape, n, op, system.name, samples[system.name])


def namespace_totals(system: System, ns: str) -> Any:
    with system.reading():
        return system.totals(ns, T0 - 1, T0 + 10 * SPAN)


def check_state(run: Run, where: str, live: list[System], dataset: Dataset, namespaces: list[str]) -> None:
    """Every system holds exactly the dataset's events in these namespaces (totals over all time)."""
    for ns in namespaces:
        expected = oracle_totals(dataset.by_namespace[ns], T0 - 1, T0 + 10 * SPAN)
        for system in live:
            run.check(f"{where} {system.name} {ns} totals", expected, namespace_totals(system, ns))


def measure_single_writes(
    run: Run, shape: str, n: int, live: list[System], dataset: Dataset, rng: random.Random
) -> None:
    """insert_one then delete_one of the same events, then insert_one_append of new events (each after
    every stored event of its namespace, as events arrive), removed afterwards untimed: each system
    ends with the dataset it started with."""
    settings = run.settings
    per_round = settings.writes_per_round
    events = [new_event(dataset, rng) for _ in range(settings.write_rounds * per_round)]
    touched = sorted({event[0] for event in events})
    measure_appends(run, shape, n, live, dataset, rng)
    for op in ("insert_one", "delete_one"):
        samples = time_single_writes(run, live, events, insert=op == "insert_one")
        for system in live:
            run.record(shape, n, op, system.name, samples[system.name])
        if op == "insert_one":
            for ns in touched[:5]:
                expected = namespace_totals(live[0], ns)
                added = [event for event in events if event[0] == ns]
                base = oracle_totals(dataset.by_namespace[ns], T0 - 1, T0 + 10 * SPAN)
                run.check(f"{shape} N={n} after inserts count {ns}", base[0] + len(added), expected[0])
                for system in live[1:]:
                    run.check(
                        f"{shape} N={n} after inserts {system.name} {ns}",
                        expected,
                        namespace_totals(system, ns),
                    )
    check_state(run, f"{shape} N={n} after deletes", live, dataset, touched[:5])


def time_single_writes(
    run: Run, live: list[System], events: list[tuple], insert: bool
) -> dict[str, list[float]]:
    """Seconds per committed insert (or delete) of each event, per system, in rotated rounds."""
    per_round = run.settings.writes_per_round
    samples: dict[str, list[float]] = {system.name: [] for system in live}
    for round_index in range(run.settings.write_rounds):
        chunk = events[round_index * per_round : (round_index + 1) * per_round]
        for system in rotated(live, round_index):
            times = samples[system.name]
            clock = time.perf_counter_ns
            for event in chunk:
                start = clock()
                if insert:
                    system.insert_one(event)
                else:
                    system.delete_one(event[0], event[1], event[2])
                times.append((clock() - start) / 1e9)
    return samples


def measure_appends(
    run: Run, shape: str, n: int, live: list[System], dataset: Dataset, rng: random.Random
) -> None:
    """insert_one_append: one new event per committed transaction, each after every stored event of
    its namespace (times past the dataset's year, increasing); the events are deleted afterwards."""
    settings = run.settings
    per_round = settings.writes_per_round
    events = []
    for index in range(settings.write_rounds * per_round):
        _, _, item_id, cost, tokens = new_event(dataset, rng)
        events.append((dataset.pick_namespace(rng), T0 + SPAN + index, item_id, cost, tokens))
    samples = time_single_writes(run, live, events, insert=True)
    for system in live:
        run.record(shape, n, "insert_one_append", system.name, samples[system.name])
        for event in events:
            system.delete_one(event[0], event[1], event[2])


def measure_batches(
    run: Run, shape: str, n: int, live: list[System], dataset: Dataset, rng: random.Random
) -> None:
    """Many inserts in one transaction: random times, then time-ordered appends; cleaned up after."""
    settings = run.settings
    size = settings.batch_items
    ns = dataset.namespaces[0]
    random_batches = [
        [new_event(dataset, rng, ns) for _ in range(size)] for _ in range(settings.batch_rounds)
    ]
    end = T0 + SPAN
    append_batches = []
    for round_index in range(settings.batch_rounds):
        first = end + round_index * size * 10
        append_batches.append(
            [
                (ns, first + index * 10, dataset.new_id(), 0.001 * (index % 7), 100 + index % 13)
                for index in range(size)
            ]
        )
    for op, batches in (("insert_batch_random", random_batches), ("insert_batch_append", append_batches)):
        samples: dict[str, list[float]] = {system.name: [] for system in live}
        for round_index, batch in enumerate(batches):
            for system in rotated(live, round_index):
                gc.collect()
                start = time.perf_counter()
                system.insert_batch(batch)
                samples[system.name].append((time.perf_counter() - start) / size)
        for system in live:
            run.record(shape, n, op, system.name, samples[system.name], items=1)
        expected = namespace_totals(live[0], ns)
        for system in live[1:]:
            run.check(f"{shape} N={n} after {op} {system.name}", expected, namespace_totals(system, ns))
    every_random = [event for batch in random_batches for event in batch]
    for system in live:  # clean up, untimed
        system.delete_batch(every_random)
        removed = system.delete_from(ns, end)
        run.check(f"{shape} N={n} {system.name} appended events removed", size * len(append_batches), removed)
    check_state(run, f"{shape} N={n} after batch cleanup", live, dataset, [ns])


def measure_delete_range(run: Run, shape: str, n: int, live: list[System], dataset: Dataset) -> None:
    """Delete the oldest 10% of the first namespace (destructive: runs last), once per system."""
    ns = dataset.namespaces[0]
    cut = T0 + SPAN // 10
    expected = oracle_rank(dataset.by_namespace[ns], cut)
    for system in rotated(live, n):
        gc.collect()
        start = time.perf_counter()
        removed = system.delete_before(ns, cut)
        elapsed = time.perf_counter() - start
        run.check(f"{shape} N={n} delete_range {system.name} removed", expected, removed)
        run.record(
            shape, n, "delete_range_10%", system.name, [elapsed], items=max(1, expected), total=elapsed
        )
    rows = dataset.by_namespace[ns]
    remaining = len(rows) - expected
    for system in live:
        with system.reading():
            run.check(
                f"{shape} N={n} after delete_range {system.name}",
                remaining,
                system.count(ns, T0 - 1, T0 + 2 * SPAN),
            )


def supports(live: list[System], method: str) -> bool:
    """Whether the tallytree under test has an optional API method."""
    return any(isinstance(system, TallyTree) and system.supports(method) for system in live)


def settle(live: list[System]) -> None:
    """Let the background work of the loads end before timing anything (untimed): each system's own
    (a server's checkpoint), then the operating system's write-back of the files every system
    wrote. Without it, a full run measured every system's writes at 10^6 events 2-3x slower than
    runs of two systems (tallytree and SQLite), the others' late disk writes running on the same
    two cores."""
    for system in live:
        system.settle()
    os.sync()


def measure_build(run: Run, shape: str, n: int, live: list[System], dataset: Dataset, workdir: Path) -> None:
    """tallytree's bottom-up build of the same data into a new database, when it has one."""
    if not supports(live, "build"):
        return
    builder = TallyTree()
    (workdir / "build").mkdir()
    builder.open(workdir / "build")
    try:
        gc.collect()
        start = time.perf_counter()
        builder.load_build(dataset)
        elapsed = time.perf_counter() - start
        run.record(shape, n, "load_build", builder.name, [elapsed / n], total=elapsed)
        run.log(f"  load_build tallytree  {elapsed:8.2f}s  {n / elapsed:12,.0f} events/s")
        check_state(run, f"{shape} N={n} after build", [builder], dataset, dataset.namespaces[:3])
    except Exception as exc:  # an API in flux must not stop the run: report it instead
        run.errors.append(f"{shape} N={n} load_build: {type(exc).__name__}: {exc}")
        run.log(f"  load_build failed: {type(exc).__name__}: {exc}")
    finally:
        builder.close()
        shutil.rmtree(workdir / "build", ignore_errors=True)


def run_shape(
    run: Run,
    shape: str,
    n: int,
    classes: list[type[System]],
    skipped: dict[str, str],
    versions: dict[str, str],
) -> None:
    settings = run.settings
    log = run.log
    started = time.perf_counter()
    dataset = make_dataset(shape, n)
    log(
        f"[{shape} N={n:,}] dataset in {time.perf_counter() - started:.1f}s, "
        f"{len(dataset.namespaces)} namespace(s)"
    )
    workdir = Path(tempfile.mkdtemp(prefix=f"tallytree-compare-{shape}-{n}-"))
    live: list[System] = []
    # The harness's own objects (the dataset, below also the in-memory baseline) move to the
    # permanent generation, so that a system allocating many Python objects does not pay for the
    # garbage collector scanning millions of objects that belong to the harness.
    gc.collect()
    gc.freeze()
    try:
        for cls in classes:
            if cls.name in skipped:
                continue
            system = cls()
            try:
                system.open(workdir)
            except Unavailable as exc:
                skipped[cls.name] = str(exc)
                log(f"  skipping {cls.name}: {exc}")
                continue
            versions.setdefault(cls.name, system.version())
            live.append(system)
        # bulk load, in a rotated order
        for system in rotated(live, n):
            gc.collect()
            start = time.perf_counter()
            system.load(dataset)
            elapsed = time.perf_counter() - start
            run.record(shape, n, "load", system.name, [elapsed / n], items=1, total=elapsed)
            log(f"  load {system.name:17} {elapsed:8.2f}s  {n / elapsed:12,.0f} events/s")
        gc.collect()
        gc.freeze()
        for system in live:
            size = system.disk_bytes()
            if size is not None:
                run.disk.append({"shape": shape, "n": n, "system": system.name, "bytes": size})
        check_state(run, f"{shape} N={n} after load", live, dataset, dataset.namespaces[:3])
        measure_build(run, shape, n, live, dataset, workdir)
        settle(live)
        for op, method, _ in READ_OPS:
            if shape == "multi" and op not in MULTI_READ_OPS:
                continue
            if method == "buckets_native" and not supports(live, "buckets"):
                continue
            base_op = op.removesuffix("_own_tx").removesuffix("_native")
            rng = random.Random(f"{shape}:{n}:{base_op}")  # variants get the same queries
            queries = make_queries(base_op, dataset, rng, settings.batch)
            op_start = time.perf_counter()
            measure_reads(run, shape, n, op, method, live, dataset, queries)
            log(f"  {op:20} {time.perf_counter() - op_start:6.1f}s  " + summary(run, shape, n, op))
        rng = random.Random(f"{shape}:{n}:writes")
        settle(live)
        measure_single_writes(run, shape, n, live, dataset, rng)
        log("  insert_one           " + summary(run, shape, n, "insert_one"))
        log("  insert_one_append    " + summary(run, shape, n, "insert_one_append"))
        log("  delete_one           " + summary(run, shape, n, "delete_one"))
        if shape == "single":
            settle(live)
            measure_batches(run, shape, n, live, dataset, rng)
            log("  insert_batch_random  " + summary(run, shape, n, "insert_batch_random"))
            log("  insert_batch_append  " + summary(run, shape, n, "insert_batch_append"))
            measure_delete_range(run, shape, n, live, dataset)
            log("  delete_range_10%     " + summary(run, shape, n, "delete_range_10%"))
    finally:
        for system in live:
            with contextlib.suppress(Exception):
                system.close()
        shutil.rmtree(workdir, ignore_errors=True)
        gc.unfreeze()
    log(f"[{shape} N={n:,}] done in {time.perf_counter() - started:.1f}s")


def summary(run: Run, shape: str, n: int, op: str) -> str:
    cells = [
        f"{m['system']}={fmt_time(m['median_s'])}"
        for m in run.measurements
        if m["shape"] == shape and m["n"] == n and m["op"] == op
    ]
    return " ".join(cells)


# -- reporting ----------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.9995e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 0.9995e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 0.9995:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_rate(per_second: float | None) -> str:
    if per_second is None:
        return "-"
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f} M/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.3g} k/s"
    return f"{per_second:.3g} /s"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.0f}x"
    return f"{ratio:.2g}x"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "sqlite": __import__("sqlite3").sqlite_version,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    packages = {}
    for name in (
        "tallytree",
        "lmdb",
        "msgpack",
        "sortedcontainers",
        "duckdb",
        "psycopg",
        "numpy",
        "matplotlib",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    info["packages"] = packages
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        info["git_commit"] = commit + (" (src modified)" if dirty else "")
    return info


def growth(points: dict[int, float]) -> float | None:
    """log(t_max / t_min) / log(N_max / N_min): 0 for O(1) or O(log n)-flat, 1 for O(n)."""
    if len(points) < 2:
        return None
    n_min, n_max = min(points), max(points)
    if points[n_min] <= 0 or points[n_max] <= 0:
        return None
    return math.log(points[n_max] / points[n_min]) / math.log(n_max / n_min)


def write_report(result: dict[str, Any], path: Path, out: Path, plots: list[str]) -> None:
    measurements = result["measurements"]
    system_names = [name for name, info in result["systems"].items() if info["available"]]
    index = {(m["shape"], m["n"], m["op"], m["system"]): m for m in measurements}
    sizes = sorted({m["n"] for m in measurements})
    ops_order = ["load", "load_build"] + [op for op, _, _ in READ_OPS] + [op for op, _ in WRITE_OPS]
    largest = max(sizes) if sizes else 0
    lines: list[str] = []
    add = lines.append
    machine = result["machine"]
    add("# tallytree benchmark results")
    add("")
    add(
        f"Generated by `{' '.join(['python benchmarks/compare.py', *result['argv']])}`"
        + f" on {result['started']} in {result['duration_s'] / 60:.1f} min. "
        f"Method and caveats: [README.md]({os.path.relpath(HERE / 'README.md', path.parent)}). "
        "Raw numbers: "
        f"[`{result['json_name']}`]({os.path.relpath(out / result['json_name'], path.parent)})."
    )
    add("")
    add(
        f"Machine: {machine.get('cpu', machine['machine'])}, {machine['cpu_count']} CPUs, "
        f"{machine.get('memory_gib', '?')} GiB, {machine['platform']}, Python {machine['python']}; "
        f"tallytree {machine['packages'].get('tallytree', '?')} at {machine.get('git_commit', '?')}. "
        f"Load average {result['loadavg_start']} at the start, {result['loadavg_end']} at the end "
        "(a shared machine: absolute times are indicative, ratios between systems measured in the same "
        "rounds count)."
    )
    add("")
    passed = result["cross_checks"]["passed"]
    add(
        f"Cross-checks: **{'all passed' if passed else 'FAILED'}** "
        f"({result['cross_checks']['compared']:,} answers compared between systems and with a "
        "plain-Python oracle; every answer given while timing is compared with tallytree's)."
    )
    add("")
    add("## Systems")
    add("")
    add("| system | version | configuration |")
    add("|---|---|---|")
    for name, info in result["systems"].items():
        if info["available"]:
            add(f"| {name} | {info['version']} | {info['config']} |")
    for name, info in result["systems"].items():
        if not info["available"]:
            add(f"| {name} | not run | {info['reason']} |")
    add("")
    # headline
    alternatives = [name for name in system_names if name != "tallytree"]
    if largest and "tallytree" in system_names and alternatives:
        add(f"## Headline: tallytree against each alternative at N = {largest:,} (one namespace)")
        add("")
        add(
            "Each cell is the alternative's median time divided by tallytree's (per query, per event "
            "for loads and inserts): above 1x tallytree is faster, below 1x slower."
        )
        add("")
        add(
            "| operation | tallytree | "
            + " | ".join(alternatives)
            + " | best alternative | best persisted alternative |"
        )
        add("|---|---|" + "---|" * len(alternatives) + "---|---|")
        persisted = {name for name in alternatives if result["systems"][name]["persisted"]}
        for op in ops_order:
            mine = index.get(("single", largest, op, "tallytree"))
            if mine is None:
                continue
            cells = []
            best: tuple[float, str] | None = None
            best_persisted: tuple[float, str] | None = None
            for name in alternatives:
                other = index.get(("single", largest, TALLYTREE_ONLY.get(op, op), name))
                if other is None:
                    cells.append("-")
                    continue
                cells.append(fmt_ratio(other["median_s"] / mine["median_s"]))
                if best is None or other["median_s"] < best[0]:
                    best = (other["median_s"], name)
                if name in persisted and (best_persisted is None or other["median_s"] < best_persisted[0]):
                    best_persisted = (other["median_s"], name)
            ends = [
                f"{found[1]} {fmt_time(found[0])}: {fmt_ratio(found[0] / mine['median_s'])}" if found else "-"
                for found in (best, best_persisted)
            ]
            label = f"{op} (vs their {TALLYTREE_ONLY[op]})" if op in TALLYTREE_ONLY else op
            add(f"| {label} | {fmt_time(mine['median_s'])} | " + " | ".join(cells + ends) + " |")
        add("")
        alone = result.get("alone")
        alone_index = (
            None if alone is None else {(m["shape"], m["n"], m["op"], m["system"]): m for m in alone}
        )
        add(targets_section(index, largest, alone_index))
    # latency tables
    for shape in SHAPES:
        shape_sizes = sorted({m["n"] for m in measurements if m["shape"] == shape})
        if not shape_sizes:
            continue
        title = (
            "one namespace"
            if shape == "single"
            else "1,000 namespaces (Zipf sizes; queries pick a namespace in proportion to its size)"
        )
        add(f"## Median latency: {title}")
        add("")
        add(
            "Per query (reads), per event (load, insert_batch_*), per transaction (insert_one, "
            "delete_one), per operation (delete_range_10%). p90 and sample counts are in the JSON."
        )
        for n in shape_sizes:
            add("")
            add(f"### N = {n:,}")
            add("")
            add("| operation | " + " | ".join(system_names) + " |")
            add("|---|" + "---|" * len(system_names))
            for op in ops_order:
                row = [index.get((shape, n, op, name)) for name in system_names]
                if not any(row):
                    continue
                add(f"| {op} | " + " | ".join(fmt_time(m["median_s"]) if m else "-" for m in row) + " |")
        add("")
        # throughput
        add(
            f"### Throughput, {'one namespace' if shape == 'single' else '1,000 namespaces'} "
            "(events per second, from the median)"
        )
        add("")
        add("| operation | N | " + " | ".join(system_names) + " |")
        add("|---|---|" + "---|" * len(system_names))
        for op in (
            "load",
            "insert_one",
            "insert_one_append",
            "delete_one",
            "insert_batch_random",
            "insert_batch_append",
        ):
            for n in shape_sizes:
                row = [index.get((shape, n, op, name)) for name in system_names]
                if not any(row):
                    continue
                add(
                    f"| {op} | {n:,} | "
                    + " | ".join(fmt_rate(m["throughput_per_s"]) if m else "-" for m in row)
                    + " |"
                )
        add("")
        # growth exponents
        if len(shape_sizes) >= 2:
            add(
                f"### Growth exponent from N = {shape_sizes[0]:,} to {shape_sizes[-1]:,} "
                "(log(t_max / t_min) / log(N_max / N_min))"
            )
            add("")
            add(
                "0 means the time does not grow with N (O(1), or O(log n) in practice); 1 means it "
                "grows in proportion to N (a scan)."
            )
            add("")
            add("| operation | " + " | ".join(system_names) + " |")
            add("|---|" + "---|" * len(system_names))
            for op in ops_order:
                cells = []
                for name in system_names:
                    points = {
                        n: index[(shape, n, op, name)]["median_s"]
                        for n in shape_sizes
                        if (shape, n, op, name) in index
                    }
                    value = growth(points)
                    cells.append("-" if value is None else f"{value:+.2f}")
                if any(cell != "-" for cell in cells):
                    add(f"| {op} | " + " | ".join(cells) + " |")
            add("")
    # disk
    if result["disk"]:
        add("## Storage after the bulk load (bytes on disk per event)")
        add("")
        persisted = [name for name in system_names if result["systems"][name]["persisted"]]
        add("| shape | N | " + " | ".join(persisted) + " |")
        add("|---|---|" + "---|" * len(persisted))
        disk = {(d["shape"], d["n"], d["system"]): d["bytes"] for d in result["disk"]}
        for shape in SHAPES:
            for n in sizes:
                cells = [disk.get((shape, n, name)) for name in persisted]
                if any(cell is not None for cell in cells):
                    add(
                        f"| {shape} | {n:,} | "
                        + " | ".join("-" if c is None else f"{c / n:.0f}" for c in cells)
                        + " |"
                    )
        add("")
        add(
            "The raw size of one event (namespace id, 8-byte ts, 8-byte id, 8-byte cost, 8-byte tokens) is "
            "about 40 bytes. PostgreSQL counts its table and index (pg_total_relation_size)."
        )
        add("")
    # plots
    if plots:
        add("## Plots")
        add("")
        add("Median latency against N, log-log, one line per system (one namespace).")
        add("")
        for name in plots:
            add(f"![{name}]({os.path.relpath(out / name, path.parent)})")
        add("")
    add("## Operations")
    add("")
    for op in ops_order:
        add(f"- **{op}**: {DESCRIPTIONS[op]}")
    add("")
    path.write_text("\n".join(lines))


def targets_section(
    index: dict[tuple[str, int, str, str], dict[str, Any]],
    n: int,
    alone: dict[tuple[str, int, str, str], dict[str, Any]] | None = None,
) -> str:
    """The performance targets of PRODUCT.md section 4 against this run (one namespace, largest N).

    ``alone``: the same operations measured by a run of tallytree by itself in a process of its own
    (see :func:`measure_alone`), shown next to this run's for the targets stated for tallytree alone.
    """

    def median(op: str, system: str = "tallytree") -> float | None:
        found = index.get(("single", n, op, system))
        return found["median_s"] if found else None

    def alone_median(op: str) -> float | None:
        found = (alone or {}).get(("single", n, op, "tallytree"))
        return found["median_s"] if found else None

    rows = []

    def target(
        what: str,
        goal: str,
        value: float | None,
        text: str,
        ok: bool | None,
        by_itself: tuple[str, bool] | None = None,
    ) -> None:
        verdict = "-" if ok is None or value is None else ("met" if ok else "**not met**")
        row = f"| {what} | {goal} | {text if value is not None else '-'} | {verdict} |"
        if alone is not None:
            row += (
                f" {by_itself[0]} | {'met' if by_itself[1] else '**not met**'} |" if by_itself else " - | - |"
            )
        rows.append(row)

    def alone_time(op: str, limit: float) -> tuple[str, bool] | None:
        value = alone_median(op)
        return (fmt_time(value), value <= limit) if value is not None else None

    def alone_rate(op: str, goal: int) -> tuple[str, bool] | None:
        value = alone_median(op)
        return (fmt_rate(1 / value), 1 / value >= goal) if value else None

    totals = median("totals_10%")
    target(
        "count + sums, 10% window",
        "median <= 10 µs",
        totals,
        fmt_time(totals),
        totals is not None and totals <= 10e-6,
        alone_time("totals_10%", 10e-6),
    )
    sqlite = median("totals_10%", "sqlite")
    if totals and sqlite:
        target(
            "vs SQLite COUNT/SUM, 10% window",
            ">= 1000x faster",
            sqlite,
            fmt_ratio(sqlite / totals),
            sqlite / totals >= 1000,
        )
    count = median("count_10%")
    sorted_count = median("count_10%", "sortedcontainers")
    if count and sorted_count:
        target(
            "count vs sortedcontainers (two bisects)",
            "within 3x",
            sorted_count,
            f"{count / sorted_count:.1f}x its time",
            count <= 3 * sorted_count,
        )
    for op in ("rank", "select"):
        value = median(op)
        target(
            op,
            "median <= 10 µs",
            value,
            fmt_time(value),
            value is not None and value <= 10e-6,
            alone_time(op, 10e-6),
        )
    load_op = "load_build" if median("load_build") is not None else "load"
    for op, goal in (
        ("insert_batch_random", 100_000),
        ("insert_batch_append", 300_000),
        ("insert_one", 20_000),
        ("insert_one_append", 20_000),
        (load_op, 1_000_000),
    ):
        value = median(op)
        rate = 1 / value if value else None
        target(
            op,
            f">= {goal:,} /s",
            value,
            fmt_rate(rate),
            rate is not None and rate >= goal,
            alone_rate(op, goal),
        )
    header = "| target | goal | measured | verdict |"
    rule = "|---|---|---|---|"
    note = ""
    if alone is not None:
        header += " tallytree by itself | verdict |"
        rule += "---|---|"
        note = (
            ' "Measured" is this run, where one process holds every system\'s data and the'
            ' systems take turns; "tallytree by itself" is the same benchmark run again with'
            " tallytree alone, in a process of its own, right after (`--systems tallytree`), as an"
            " application holds it. Writes that replace cached nodes cost most in the shared process"
            ' (see README.md, "Headline ratios").'
        )
    return "\n".join(
        [
            f"### PRODUCT.md performance targets at N = {n:,}",
            "",
            header,
            rule,
            *rows,
            "",
            "(The targets are stated for 10^6 items; with smaller N they are only indicative.)" + note,
            "",
        ]
    )


def measure_alone(size: int, rounds: int | None) -> list[dict[str, Any]] | None:
    """tallytree's measurements at ``size`` (one namespace) from this script run again with tallytree
    alone, in a process of its own: what an application holding only tallytree sees. None when that
    run fails (the report then has no such column)."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(Path(__file__).resolve()), "--systems", "tallytree"]
        command += ["--sizes", str(size), "--shapes", "single", "--out", scratch, "--no-plots", "-q"]
        if rounds:
            command += ["--rounds", str(rounds)]
        if subprocess.run(command, stdout=subprocess.DEVNULL, check=False).returncode != 0:
            return None
        runs = sorted(Path(scratch).glob("run-*.json"))
        return json.loads(runs[-1].read_text())["measurements"] if runs else None


def plotting_available() -> bool:
    """Whether matplotlib can be imported (plots are skipped without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def make_plots(result: dict[str, Any], out: Path) -> list[str]:
    """Log-log latency-vs-N plots for the main operations; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    measurements = [m for m in result["measurements"] if m["shape"] == "single"]
    system_names = [name for name, info in result["systems"].items() if info["available"]]
    written = []
    markers = "osD^vP*X"
    figure, axes = plt.subplots(2, 3, figsize=(15, 9))
    for number, op in enumerate(PLOTTED):
        single, single_axes = plt.subplots(figsize=(6.4, 4.8))
        for target_axes in (single_axes, axes.flat[number]):
            for k, name in enumerate(system_names):
                points = sorted(
                    (m["n"], m["median_s"]) for m in measurements if m["op"] == op and m["system"] == name
                )
                if not points:
                    continue
                target_axes.plot(
                    [p[0] for p in points],
                    [p[1] * 1e6 for p in points],
                    marker=markers[k % len(markers)],
                    linewidth=2.5 if name == "tallytree" else 1.2,
                    label=name,
                )
            for variant, base in TALLYTREE_ONLY.items():
                points = sorted(
                    (m["n"], m["median_s"])
                    for m in measurements
                    if base == op and m["op"] == variant and m["system"] == "tallytree"
                )
                if points:
                    target_axes.plot(
                        [p[0] for p in points],
                        [p[1] * 1e6 for p in points],
                        marker="o",
                        linestyle="--",
                        linewidth=2.0,
                        color="C0",
                        label=f"tallytree ({variant})",
                    )
            target_axes.set_xscale("log")
            target_axes.set_yscale("log")
            target_axes.set_xlabel("events in the namespace (N)")
            target_axes.set_ylabel("median latency (µs)")
            target_axes.set_title(f"{op}: {DESCRIPTIONS[op]}", fontsize=9)
            target_axes.grid(True, which="both", alpha=0.3)
            target_axes.legend(fontsize=8)
        name = f"latency-{op.replace('%', 'pct')}.png"
        single.tight_layout()
        single.savefig(out / name, dpi=110)
        plt.close(single)
        written.append(name)
    figure.suptitle("tallytree vs alternatives: median latency vs N (log-log, lower is better)")
    figure.tight_layout()
    figure.savefig(out / "latency-overview.png", dpi=90)
    plt.close(figure)
    return ["latency-overview.png", *written]


# -- main ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for raw in text.split(","):
        part = raw.strip().replace("_", "")
        if not part:
            continue
        value = int(float(part)) if ("e" in part.lower() or "." in part) else int(part)
        if value < 100:
            raise argparse.ArgumentTypeError(f"sizes start at 100 events, not {value}")
        sizes.append(value)
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return sorted(set(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description="Benchmark tallytree side by side with SQLite, sortedcontainers, a naive LMDB "
        "layout, DuckDB and PostgreSQL (when available).",
    )
    parser.add_argument("--sizes", type=parse_sizes, help="comma-separated N (default 10000,100000,1000000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 1000,10000 and few rounds")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the JSON and the plots (default benchmarks/results, or "
        "benchmarks/results/quick with --quick)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="markdown report (default benchmarks/RESULTS.md for the default --out, else "
        "RESULTS.md in --out)",
    )
    parser.add_argument(
        "--systems", help="comma-separated subset of: " + ", ".join(c.name for c in ALL_SYSTEMS)
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help="single, multi or both (default)")
    parser.add_argument("--rounds", type=int, help="timed rounds per operation")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RUN_JSON",
        help="measure nothing: rebuild the report and plots from a saved run-*.json",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; return 0 when every cross-check passed (1 otherwise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.rounds:
        settings.rounds = args.rounds
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    shapes = [shape.strip() for shape in args.shapes.split(",") if shape.strip()]
    for shape in shapes:
        if shape not in SHAPES:
            build_parser().error(f"unknown shape {shape!r}")
    classes = list(ALL_SYSTEMS)
    if args.systems:
        wanted = {name.strip() for name in args.systems.split(",")}
        unknown = wanted - {cls.name for cls in classes}
        if unknown:
            build_parser().error(f"unknown system(s) {sorted(unknown)}")
        classes = [cls for cls in classes if cls.name in wanted or cls.name == "tallytree"]
    out: Path = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        out = args.out or args.render.parent
        report = args.report or (
            HERE / "RESULTS.md" if out.resolve() == (HERE / "results").resolve() else out / "RESULTS.md"
        )
        plots = [] if args.no_plots else make_plots(result, out)
        write_report(result, report, out, plots)
        print(f"rendered {report} from {args.render}")
        return 0
    if args.report is not None:
        report = args.report
    elif out.resolve() == (HERE / "results").resolve():
        report = HERE / "RESULTS.md"
    else:
        report = out / "RESULTS.md"
    run = Run(
        settings, log=(lambda _message: None) if args.quiet else lambda message: print(message, flush=True)
    )
    skipped: dict[str, str] = {}
    if shutil.which("redis-server") is None:
        skipped_redis = "redis-server is not installed on this machine, so Redis (ZSET) was not run"
    else:
        skipped_redis = "redis-server is installed but there is no Redis adapter yet (ZSETs have no sums)"
    versions: dict[str, str] = {}
    started_wall = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    loadavg_start = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    started = time.perf_counter()
    try:
        for n in sizes:
            for shape in shapes:
                run_shape(run, shape, n, classes, skipped, versions)
                gc.collect()
    finally:
        Postgres.shutdown()
    duration = time.perf_counter() - started
    alone = None
    if (
        not args.quick
        and "single" in shapes
        and len(classes) > 1
        and any(cls.name == "tallytree" for cls in classes)
    ):
        alone = measure_alone(max(sizes), args.rounds)
    systems_info: dict[str, Any] = {}
    for cls in classes:
        available = cls.name not in skipped
        systems_info[cls.name] = {
            "available": available,
            "version": versions.get(cls.name, ""),
            "config": cls.config,
            "persisted": cls.persisted,
            "reason": skipped.get(cls.name, ""),
        }
    systems_info["redis"] = {
        "available": False,
        "version": "",
        "config": "",
        "persisted": True,
        "reason": skipped_redis,
    }
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_name = f"run-{stamp}.json"
    result: dict[str, Any] = {
        "argv": argv,
        "started": started_wall,
        "duration_s": duration,
        "loadavg_start": loadavg_start,
        "loadavg_end": ", ".join(f"{value:.2f}" for value in os.getloadavg()),
        "machine": machine_info(),
        "settings": settings.__dict__,
        "sizes": sizes,
        "shapes": shapes,
        "systems": systems_info,
        "cross_checks": {"passed": not run.failures, "compared": run.checks, "failures": run.failures},
        "errors": run.errors,
        "measurements": run.measurements,
        "alone": alone,
        "disk": run.disk,
        "json_name": json_name,
        "adapters": systems_module.__file__ and Path(systems_module.__file__).name,
    }
    (out / json_name).write_text(json.dumps(result, indent=1))
    plots = [] if args.no_plots else make_plots(result, out)
    write_report(result, report, out, plots)
    print(
        f"{len(run.measurements)} measurements in {duration / 60:.1f} min; "
        f"cross-checks {'passed' if not run.failures else 'FAILED'} ({run.checks:,} compared); "
        f"wrote {out / json_name}, {report}" + (f" and {len(plots)} plots" if plots else "")
    )
    for failure in run.failures[:20]:
        print("  FAILED:", failure)
    return 0 if not run.failures else 1


if __name__ == "__main__":
    sys.exit(main())
