"""Core operations of tallytree against two naive baselines, with pytest-benchmark.

Each benchmark group (one operation at one size) holds tallytree and its baselines, measured in the
same run: (a) ``lmdb-scan``, the naive LMDB layout that counts and sums by scanning the window, and
(b) ``sqlite``, a table with a covering index answering ``COUNT(*)`` / ``SUM``. Before anything is
timed, each test checks the system's answers against a plain-Python oracle.

Sizes are powers of ten in one namespace (``single``), plus 1,000 namespaces with Zipf-like sizes
(``multi``) for the main reads and single inserts. See ``conftest.py`` for how to run them and
``compare.py`` for the full side-by-side comparison that produces ``RESULTS.md``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from systems import System
from workload import (
    SPAN,
    T0,
    Dataset,
    new_event,
    oracle_count,
    oracle_rank,
    oracle_totals,
    window,
)

Loaded = Callable[[str, str, int], System]
Datasets = Callable[[str, int], Dataset]

QUERIES = 200
CHECKS = 5
ALL_TIME = (T0 - 1, T0 + 10 * SPAN)
WINDOWS = [("single", 1), ("single", 10), ("single", 50), ("multi", 10)]
"""(shape, window %) pairs: the 1,000-namespace shape is measured on 10% windows only."""


def close(expected: Any, got: Any) -> bool:
    if isinstance(expected, tuple):
        return len(expected) == len(got) and all(map(close, expected, got))
    if isinstance(expected, float):
        return got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    return bool(expected == got)


def whole_namespace(system: System, ns: str) -> tuple[int, float, int]:
    with system.reading():
        return system.totals(ns, *ALL_TIME)


def assert_unchanged(system: System, dataset: Dataset, namespaces: list[str]) -> None:
    for ns in namespaces:
        expected = oracle_totals(dataset.by_namespace[ns], *ALL_TIME)
        assert close(expected, whole_namespace(system, ns)), f"{system.name} {ns} changed"


def run_reads(benchmark: Any, system: System, call: Callable[..., Any], queries: list[tuple]) -> None:
    """Time ``call`` cycling through ``queries``, all inside one read transaction."""
    next_query = itertools.cycle(queries).__next__

    def one() -> Any:
        return call(*next_query())

    with system.reading():
        benchmark(one)


# -- reads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "percent"), WINDOWS)
def test_count(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int, shape: str, percent: int
) -> None:
    dataset = datasets(shape, size)
    system = loaded(system_name, shape, size)
    rng = random.Random(f"count:{shape}:{size}:{percent}")
    queries = [(dataset.pick_namespace(rng), *window(rng, percent / 100)) for _ in range(QUERIES)]
    with system.reading():
        for ns, lo, hi in queries[:CHECKS]:
            assert system.count(ns, lo, hi) == oracle_count(dataset.by_namespace[ns], lo, hi)
    benchmark.group = f"count {percent}% window, {shape}, N={size:,}"
    run_reads(benchmark, system, system.count, queries)


@pytest.mark.parametrize(("shape", "percent"), WINDOWS)
def test_totals(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int, shape: str, percent: int
) -> None:
    dataset = datasets(shape, size)
    system = loaded(system_name, shape, size)
    rng = random.Random(f"totals:{shape}:{size}:{percent}")
    queries = [(dataset.pick_namespace(rng), *window(rng, percent / 100)) for _ in range(QUERIES)]
    with system.reading():
        for ns, lo, hi in queries[:CHECKS]:
            expected = oracle_totals(dataset.by_namespace[ns], lo, hi)
            assert close(expected, system.totals(ns, lo, hi))
    benchmark.group = f"totals (count + 2 sums) {percent}% window, {shape}, N={size:,}"
    run_reads(benchmark, system, system.totals, queries)


def test_rank(benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int) -> None:
    dataset = datasets("single", size)
    system = loaded(system_name, "single", size)
    rng = random.Random(f"rank:{size}")
    queries = [("ns0000", T0 + rng.randrange(SPAN)) for _ in range(QUERIES)]
    with system.reading():
        for ns, ts in queries[:CHECKS]:
            assert system.rank(ns, ts) == oracle_rank(dataset.by_namespace[ns], ts)
    benchmark.group = f"rank, N={size:,}"
    run_reads(benchmark, system, system.rank, queries)


def test_select(benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int) -> None:
    dataset = datasets("single", size)
    system = loaded(system_name, "single", size)
    rng = random.Random(f"select:{size}")
    queries = [("ns0000", rng.randrange(size)) for _ in range(QUERIES)]
    rows = dataset.by_namespace["ns0000"]
    with system.reading():
        for ns, index in queries[:CHECKS]:
            assert system.select(ns, index) == rows[index][:2]
    benchmark.group = f"select (at), N={size:,}"
    run_reads(benchmark, system, system.select, queries)


# -- writes (each leaves the loaded system as it found it) -------------------------------------------


@pytest.mark.parametrize("shape", ["single", "multi"])
def test_insert_one_per_transaction(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int, shape: str
) -> None:
    dataset = datasets(shape, size)
    system = loaded(system_name, shape, size)
    rng = random.Random(f"insert:{shape}:{size}")
    inserted: list[tuple] = []

    def insert() -> None:
        event = new_event(dataset, rng)
        system.insert_one(event)
        inserted.append(event)

    benchmark.group = f"insert one per committed transaction, {shape}, N={size:,}"
    benchmark(insert)
    touched = sorted({event[0] for event in inserted})
    with system.reading():
        for ns in touched[:3]:
            added = sum(1 for event in inserted if event[0] == ns)
            assert system.count(ns, *ALL_TIME) == len(dataset.by_namespace[ns]) + added
    system.delete_batch(inserted)
    assert_unchanged(system, dataset, touched[:3])


def test_delete_one_per_transaction(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int
) -> None:
    dataset = datasets("single", size)
    system = loaded(system_name, "single", size)
    rng = random.Random(f"delete:{size}")

    def setup() -> tuple[tuple, dict]:
        event = new_event(dataset, rng, "ns0000")
        system.insert_one(event)  # untimed: each round deletes an event that setup put there
        return (event[0], event[1], event[2]), {}

    benchmark.group = f"delete one per committed transaction, N={size:,}"
    benchmark.pedantic(system.delete_one, setup=setup, rounds=100, iterations=1)
    assert_unchanged(system, dataset, ["ns0000"])


@pytest.mark.parametrize("order", ["random", "time-ordered"])
def test_insert_many_in_one_transaction(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int, order: str
) -> None:
    """1,000 events per transaction: random times, or appended after the newest (insert_many's fast path)."""
    dataset = datasets("single", size)
    system = loaded(system_name, "single", size)
    rng = random.Random(f"many:{size}:{order}")
    batch = 1_000
    inserted: list[tuple] = []
    next_ts = itertools.count(T0 + SPAN, 7)

    def setup() -> tuple[tuple, dict]:
        if order == "random":
            events = [new_event(dataset, rng, "ns0000") for _ in range(batch)]
        else:
            events = [("ns0000", next(next_ts), dataset.new_id(), 0.002, 250) for _ in range(batch)]
        inserted.extend(events)
        return (events,), {}

    benchmark.group = f"insert 1,000 {order} events in one transaction, N={size:,}"
    benchmark.pedantic(system.insert_batch, setup=setup, rounds=10, iterations=1)
    with system.reading():
        assert system.count("ns0000", *ALL_TIME) == size + len(inserted)
    if order == "random":
        system.delete_batch(inserted)
    else:
        assert system.delete_from("ns0000", T0 + SPAN) == len(inserted)
    assert_unchanged(system, dataset, ["ns0000"])


def test_delete_range(
    benchmark: Any, loaded: Loaded, datasets: Datasets, system_name: str, size: int
) -> None:
    """Delete a random 1% time window in one transaction; setup puts the previous window back."""
    dataset = datasets("single", size)
    system = loaded(system_name, "single", size)
    rows = dataset.by_namespace["ns0000"]
    rng = random.Random(f"delete_range:{size}")
    pending: list[tuple] = []

    def setup() -> tuple[tuple, dict]:
        if pending:
            system.insert_batch(pending)
            pending.clear()
        lo, hi = window(rng, 0.01)
        first, last = oracle_rank(rows, lo), oracle_rank(rows, hi)
        pending.extend(("ns0000", *row) for row in rows[first:last])
        return ("ns0000", lo, hi), {}

    def delete(ns: str, lo: int, hi: int) -> None:
        removed = system.delete_range(ns, lo, hi)
        assert removed == len(pending)

    benchmark.group = f"delete_range of a 1% window, N={size:,}"
    benchmark.pedantic(delete, setup=setup, rounds=10, iterations=1)
    if pending:
        system.insert_batch(pending)
    assert_unchanged(system, dataset, ["ns0000"])


# -- bulk loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["single", "multi"])
def test_bulk_insert_many(
    benchmark: Any,
    fresh: Callable[[str], System],
    datasets: Datasets,
    system_name: str,
    size: int,
    shape: str,
) -> None:
    """Load all N events into an empty store (tallytree: sorted insert_many, one tx per namespace)."""
    dataset = datasets(shape, size)
    made: list[System] = []

    def setup() -> tuple[tuple, dict]:
        made.append(fresh(system_name))
        return (dataset,), {}

    def load(data: Dataset) -> None:
        made[-1].load(data)

    benchmark.group = f"bulk load, {shape}, N={size:,}"
    benchmark.pedantic(load, setup=setup, rounds=1 if size >= 10**6 else 3, iterations=1)
    ns = dataset.namespaces[0]
    with made[-1].reading():
        assert made[-1].count(ns, *ALL_TIME) == len(dataset.by_namespace[ns])
