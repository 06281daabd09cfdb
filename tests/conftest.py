"""Shared helpers and fixtures: databases over both backends, exact comparisons and snapshots.

The test modules import :func:`strict`, :func:`snapshot` and :func:`pure_python` from here
(``from conftest import ...``).

Hypothesis profiles: ``dev`` (the default) and ``ci`` (derandomized, so CI runs are reproducible, and
printing the blob to reproduce a failure). Pick one with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import tallytree
from tallytree._native import kernels

settings.register_profile("dev", deadline=None)
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def strict(value: Any) -> Any:
    """A form of ``value`` whose ``==`` also compares types: ``1``, ``1.0`` and ``True`` differ.

    Plain ``==`` would accept ``Item(1, ...)`` where ``Item(1.0, ...)`` is expected, and ``1`` where
    a float sum is expected; every comparison of results in the tests goes through this.
    """
    if isinstance(value, tallytree.Item):
        return ("Item", strict(value.key), strict(value.id), strict(value.values))
    if isinstance(value, tallytree.Totals):
        return ("Totals", strict(value.as_dict()))
    if isinstance(value, tuple):
        return ("tuple", tuple(strict(each) for each in value))
    if isinstance(value, list):
        return ("list", [strict(each) for each in value])
    if isinstance(value, dict):
        return ("dict", sorted((repr(key), strict(each)) for key, each in value.items()))
    return (type(value).__name__, value)


@contextmanager
def pure_python() -> Iterator[None]:
    """Run the Python twins of the C kernels (``tallytree._native``) inside the block, built or not."""
    with kernels(False):
        yield


def snapshot(db: tallytree.Database, tx: tallytree.Transaction | None = None) -> Any:
    """Everything a user can observe of ``db``: every aggregate, namespace, item and total, exactly.

    Reads in ``tx`` when given (to look inside a write transaction that goes on), else in a new read
    transaction.
    """
    if tx is None:
        with db.read() as read_tx:
            return snapshot(db, read_tx)
    state = []
    for name in db.aggregates():
        aggregate = db.aggregate(name)
        spaces = []
        for namespace, totals in aggregate.namespaces(tx):
            items = list(aggregate.items(tx, namespace=namespace))
            spaces.append((strict(namespace), strict(totals), strict(items)))
        state.append((name, aggregate.fields, aggregate.node_size, spaces))
    return state


@pytest.fixture(params=["memory", "lmdb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tallytree.Database]:
    """A fresh, empty database over each backend in turn."""
    if request.param == "memory":
        database = tallytree.open_memory()
    else:
        database = tallytree.open(tmp_path / "db", durable=False)
    with database:
        yield database


def record_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, arg: int = 0) -> list[Any]:
    """Argument ``arg`` of every call of ``owner.name`` from now on (the function still runs)."""
    calls: list[Any] = []
    original = getattr(owner, name)

    def recording(*args: Any) -> Any:
        calls.append(args[arg])
        return original(*args)

    monkeypatch.setattr(owner, name, recording)
    return calls


# ------------------------------------------------------------------ the models' key order


def value_order(key: Any) -> tuple[Any, ...]:
    """Order by value: None < False < True < numbers < str < bytes < datetime < tuple.

    Ints and floats compare by value (Python compares them exactly); tuples element by element, a
    proper prefix first.
    """
    if key is None:
        return (0,)
    if key is False:
        return (1,)
    if key is True:
        return (2,)
    kind = type(key)
    if kind is int or kind is float:
        return (3, key)
    if kind is str:
        return (4, key)
    if kind is bytes:
        return (5, key)
    if kind is datetime:
        return (6, key)
    if kind is tuple:
        return (7, tuple(value_order(element) for element in key))
    raise AssertionError(f"the model has no order for {key!r}")


def number_kinds(key: Any) -> tuple[int, ...]:
    """The tie-break between keys equal in value: int (0) or float (1) for each number, depth first."""
    if type(key) is int:
        return (0,)
    if type(key) is float:
        return (1,)
    if type(key) is tuple:
        return tuple(kind for element in key for kind in number_kinds(element))
    return ()
