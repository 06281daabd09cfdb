"""pytest-benchmark fixtures: seeded datasets and loaded systems, built once per session.

Run the benchmarks (the project's ``addopts`` disable them by default, so enable them explicitly)::

    pytest benchmarks/ --benchmark-enable                      # N = 10^3, 10^4, 10^5
    TALLYTREE_BENCH_LARGE=1 pytest benchmarks/ --benchmark-enable   # adds N = 10^6
    pytest benchmarks/ --benchmark-disable -q                  # smoke test: N = 10^3, 10^4, each once

These files live outside the project's ``testpaths``, so a plain ``pytest`` never collects them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from systems import LmdbScan, Sqlite, System, TallyTree  # noqa: E402
from workload import Dataset, make_dataset  # noqa: E402

SYSTEMS: dict[str, type[System]] = {
    TallyTree.name: TallyTree,
    LmdbScan.name: LmdbScan,  # baseline (a): the naive LMDB layout, scans
    Sqlite.name: Sqlite,  # baseline (b): SQLite with a covering index
}
SIZES = (10**3, 10**4, 10**5)
LARGE = 10**6
SMOKE_SIZES = (10**3, 10**4)


def benchmarks_disabled(config: pytest.Config) -> bool:
    """Whether pytest-benchmark runs each benchmark once only (``--benchmark-disable``, not re-enabled)."""
    return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")


def sizes_for(config: pytest.Config) -> tuple[int, ...]:
    if benchmarks_disabled(config):
        return SMOKE_SIZES
    if os.environ.get("TALLYTREE_BENCH_LARGE") == "1":
        return (*SIZES, LARGE)
    return SIZES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        sizes = sizes_for(metafunc.config)
        metafunc.parametrize("size", sizes, ids=[f"1e{len(str(n)) - 1}" for n in sizes])
    if "system_name" in metafunc.fixturenames:
        metafunc.parametrize("system_name", list(SYSTEMS))


@pytest.fixture(scope="session")
def datasets() -> Callable[[str, int], Dataset]:
    """``datasets(shape, n)``: the seeded dataset, built once per session."""
    cache: dict[tuple[str, int], Dataset] = {}

    def get(shape: str, n: int) -> Dataset:
        key = (shape, n)
        if key not in cache:
            cache[key] = make_dataset(shape, n)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, datasets: Callable[[str, int], Dataset]
) -> Iterator[Callable[[str, str, int], System]]:
    """``loaded(system_name, shape, n)``: a system holding the dataset, loaded once per session.

    Benchmarks that write must leave the system as they found it (they clean up after timing).
    """
    cache: dict[tuple[str, str, int], System] = {}
    base = tmp_path_factory.mktemp("loaded")

    def get(system_name: str, shape: str, n: int) -> System:
        key = (system_name, shape, n)
        if key not in cache:
            workdir = base / f"{system_name}-{shape}-{n}"
            workdir.mkdir()
            system = SYSTEMS[system_name]()
            system.open(workdir)
            system.load(datasets(shape, n))
            cache[key] = system
        return cache[key]

    yield get
    for system in cache.values():
        system.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[[str], System]]:
    """``fresh(system_name)``: a new, empty system in its own directory (closed after the test)."""
    made: list[System] = []
    counter = iter(range(1_000_000))

    def make(system_name: str) -> System:
        workdir = tmp_path / f"{system_name}-{next(counter)}"
        workdir.mkdir()
        system = SYSTEMS[system_name]()
        system.open(workdir)
        made.append(system)
        return system

    yield make
    for system in made:
        system.close()
