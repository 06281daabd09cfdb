"""Seeded workloads shared by ``compare.py`` and the pytest-benchmark suite.

An *event* is ``(namespace, ts, id, cost, tokens)``: ``ts`` an int epoch second drawn uniformly over one
year (so a window of a fraction ``f`` of the year holds about ``f`` of a namespace's events), ``id`` a
unique int, ``cost`` a float in dollars, ``tokens`` an int. Two shapes:

* ``single``: one namespace holding all ``n`` events;
* ``multi``: 1,000 namespaces whose sizes follow a Zipf-like law (size of the ``i``-th namespace
  proportional to ``1 / (i + 1)``), adding up to ``n``.

Everything is derived from a seed, so every system (and every run) sees the same data and queries.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from dataclasses import dataclass, field

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
DAY = 86_400
SPAN = 365 * DAY
NAMESPACES = 1_000

Row = tuple[int, int, float, int]
"""One event inside a namespace: (ts, id, cost, tokens), sorted by (ts, id)."""


@dataclass
class Dataset:
    """The events of one shape and size, grouped by namespace and sorted by (ts, id)."""

    shape: str
    n: int
    seed: int
    by_namespace: dict[str, list[Row]]
    namespaces: list[str] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    next_id: int = 0

    def __post_init__(self) -> None:
        self.namespaces = list(self.by_namespace)
        self.weights = [len(rows) for rows in self.by_namespace.values()]
        self.next_id = self.n

    def new_id(self) -> int:
        """A fresh id never used by the dataset (for inserts)."""
        self.next_id += 1
        return self.next_id

    def pick_namespace(self, rng: random.Random) -> str:
        """A namespace drawn with probability proportional to its size (the namespace of a random event)."""
        return rng.choices(self.namespaces, weights=self.weights)[0]


def _rows(rng: random.Random, count: int, first_id: int) -> list[Row]:
    rows = [
        (
            T0 + int(rng.random() * SPAN),
            first_id + index,
            round(rng.uniform(0.0, 0.05), 6),
            rng.randint(1, 8_000),
        )
        for index in range(count)
    ]
    rows.sort()
    return rows


def zipf_sizes(n: int, namespaces: int = NAMESPACES) -> list[int]:
    """Sizes proportional to 1/(i+1), summing exactly to ``n`` (largest remainders get the rest)."""
    weights = [1.0 / (index + 1) for index in range(namespaces)]
    total = sum(weights)
    exact = [n * weight / total for weight in weights]
    sizes = [int(value) for value in exact]
    order = sorted(range(namespaces), key=lambda index: exact[index] - sizes[index], reverse=True)
    for index in order[: n - sum(sizes)]:
        sizes[index] += 1
    return sizes


def make_dataset(shape: str, n: int, seed: int = 20240101) -> Dataset:
    """Build the seeded dataset of ``shape`` (``"single"`` or ``"multi"``) with ``n`` events."""
    rng = random.Random(f"{seed}:{shape}:{n}")
    if shape == "single":
        by_namespace = {"ns0000": _rows(rng, n, 0)}
    elif shape == "multi":
        by_namespace = {}
        first_id = 0
        for index, size in enumerate(zipf_sizes(n)):
            if size:
                by_namespace[f"ns{index:04d}"] = _rows(rng, size, first_id)
                first_id += size
    else:
        raise ValueError(f"unknown shape {shape!r}; use 'single' or 'multi'")
    return Dataset(shape, n, seed, by_namespace)


def window(rng: random.Random, fraction: float) -> tuple[int, int]:
    """A random half-open time window ``[lo, hi)`` covering ``fraction`` of the year."""
    width = int(SPAN * fraction)
    lo = T0 + rng.randrange(0, SPAN - width + 1)
    return lo, lo + width


def day_bounds(rng: random.Random, days: int = 30) -> list[int]:
    """``days + 1`` consecutive midnights: the bounds of ``days`` daily buckets inside the year."""
    start = T0 + rng.randrange(0, 365 - days) * DAY
    return [start + index * DAY for index in range(days + 1)]


def new_event(dataset: Dataset, rng: random.Random, namespace: str | None = None) -> tuple:
    """A new event ``(namespace, ts, id, cost, tokens)`` at a random time inside the year."""
    namespace = namespace or dataset.pick_namespace(rng)
    return (
        namespace,
        T0 + int(rng.random() * SPAN),
        dataset.new_id(),
        round(rng.uniform(0.0, 0.05), 6),
        rng.randint(1, 8_000),
    )


# -- a plain-Python oracle over the sorted rows, for correctness checks -------------------------------


def oracle_count(rows: list[Row], lo: int, hi: int) -> int:
    """Events with ``lo <= ts < hi``."""
    return bisect_left(rows, (hi,)) - bisect_left(rows, (lo,))


def oracle_totals(rows: list[Row], lo: int, hi: int) -> tuple[int, float, int]:
    """(count, sum of cost, sum of tokens) of events with ``lo <= ts < hi``."""
    window_rows = rows[bisect_left(rows, (lo,)) : bisect_left(rows, (hi,))]
    return (
        len(window_rows),
        sum(row[2] for row in window_rows),
        sum(row[3] for row in window_rows),
    )


def oracle_rank(rows: list[Row], ts: int) -> int:
    """Events with ``ts`` strictly before ``ts``."""
    return bisect_left(rows, (ts,))
