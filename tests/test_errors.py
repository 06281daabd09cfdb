"""Bad arguments raise tallytree's typed errors (which also subclass the closest built-in)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import tallytree
from tallytree import ArgumentTypeError, Change, Error, InvalidArgumentError


@pytest.fixture
def db() -> tallytree.Database:
    return tallytree.open_memory()


BAD_DEFINITIONS: list[tuple[str, Callable[[tallytree.Database], Any]]] = [
    ("empty aggregate name", lambda db: db.aggregate("")),
    ("aggregate name not a str", lambda db: db.aggregate(7)),
    ("values given as a str", lambda db: db.aggregate("a", values="cost")),
    ("field name not an identifier", lambda db: db.aggregate("a", values=("my cost",))),
    ("reserved field name", lambda db: db.aggregate("a", values=("count",))),
    ("repeated field name", lambda db: db.aggregate("a", values=("cost", "cost"))),
    ("node_size too small", lambda db: db.aggregate("a", node_size=2)),
    ("node_size not an int", lambda db: db.aggregate("a", node_size=64.0)),
    ("empty table name", lambda db: db.table("")),
    ("change kind", lambda db: Change("upsert", "id", new={})),
    ("change without its document", lambda db: Change("insert", "id")),
]


@pytest.mark.parametrize("make", [make for _, make in BAD_DEFINITIONS], ids=[n for n, _ in BAD_DEFINITIONS])
def test_bad_arguments_raise_invalid_argument_error(db: tallytree.Database, make: Callable[..., Any]) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        make(db)
    assert isinstance(raised.value, Error) and isinstance(raised.value, ValueError)
    assert db.aggregates() == []  # nothing was created


def test_a_wrong_type_is_also_a_type_error(db: tallytree.Database) -> None:
    handler = tallytree.ChangeHandler(db)
    handler.aggregate("events", key="at")
    with db.write() as tx, pytest.raises(ArgumentTypeError) as raised:
        handler.apply(tx, {"kind": "insert"})  # type: ignore[arg-type]
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, InvalidArgumentError)
    with db.read() as tx:
        assert db.aggregate("events").count(tx) == 0
