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


def test_reads_and_batches_raise_typed_argument_errors(db: tallytree.Database) -> None:
    scores = db.aggregate("scores")
    with db.write() as tx:
        scores.insert_many(tx, [(n, "id") for n in range(10)])
        with pytest.raises(InvalidArgumentError, match="on_duplicate"):
            scores.insert_many(tx, [(99, "id")], on_duplicate="replace")  # type: ignore[arg-type]
    with db.read() as tx:
        with pytest.raises(ArgumentTypeError, match="index must be an int"):
            scores.at(tx, 1.0)  # type: ignore[arg-type]
        assert scores.count(tx) == 10  # the failed batch wrote nothing


def test_table_definitions_raise_typed_argument_errors(db: tallytree.Database) -> None:
    events = db.table("events")
    with pytest.raises(InvalidArgumentError, match="values="):
        events.aggregate("by_day", key="day", values="cost")
    with pytest.raises(InvalidArgumentError, match="aggregate name"):
        events.aggregate("", key="day")
    with pytest.raises(ArgumentTypeError, match="key= is required"):
        events.aggregate("by_day", values=("cost",))
    assert db.aggregates() == []
