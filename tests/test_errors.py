"""Bad arguments raise tallytree's typed errors (which also subclass the closest built-in)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import tallytree
from tallytree import ArgumentTypeError, Change, Error, InvalidArgumentError


def _ten_scores(db: tallytree.Database) -> tallytree.Aggregate:
    """Aggregate ``scores`` holding keys 0 to 9 (id "id")."""
    scores = db.aggregate("scores")
    with db.write() as tx:
        scores.insert_many(tx, [(n, "id") for n in range(10)])
    return scores


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


WRONG_TYPES: list[tuple[str, Callable[[tallytree.Database], Any]]] = [
    ("aggregate name", lambda db: db.aggregate(5)),
    ("aggregate node_size", lambda db: db.aggregate("a", node_size="4")),
    ("aggregate values", lambda db: db.aggregate("a", values=5)),
    ("aggregate field name", lambda db: db.aggregate("a", values=(5,))),
    ("table name", lambda db: db.table(b"t")),
    ("table aggregate name", lambda db: db.table("t").aggregate(5, key="at")),
    ("table aggregate values", lambda db: db.table("t").aggregate("a", key="at", values=5)),
    ("table aggregate node_size", lambda db: db.table("t").aggregate("a", key="at", node_size=4.0)),
]


@pytest.mark.parametrize("make", [make for _, make in WRONG_TYPES], ids=[n for n, _ in WRONG_TYPES])
def test_definitions_of_the_wrong_type_raise_argument_type_error(
    db: tallytree.Database, make: Callable[..., Any]
) -> None:
    with pytest.raises(ArgumentTypeError) as raised:
        make(db)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, InvalidArgumentError)
    assert db.aggregates() == []


def test_a_read_or_write_given_no_transaction_raises_argument_type_error(db: tallytree.Database) -> None:
    scores = db.aggregate("scores")
    with pytest.raises(ArgumentTypeError, match="transaction") as raised:
        scores.count(db)  # type: ignore[arg-type]
    assert isinstance(raised.value, TypeError)
    with pytest.raises(ArgumentTypeError, match="transaction"):
        scores.insert(None, 1, "a")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="transaction"):
        tallytree.check(db)  # type: ignore[arg-type]
    with db.read() as tx:
        assert scores.count(tx) == 0


def test_random_refuses_an_rng_that_is_neither_a_generator_nor_a_seed(db: tallytree.Database) -> None:
    scores = _ten_scores(db)
    with db.read() as tx:
        for rng in (object(), [1], True):
            with pytest.raises(ArgumentTypeError, match="rng="):
                scores.random(tx, rng=rng)  # type: ignore[arg-type]
            with pytest.raises(ArgumentTypeError, match="rng="):  # refused before the range is read
                scores.random(tx, ge=100, rng=rng)  # type: ignore[arg-type]
        seeded = [scores.random(tx, rng=seed) for seed in (3, 3.5, "s", b"s", bytearray(b"s"))]
        assert all(item is not None for item in seeded)
        assert scores.random(tx, rng="s") == seeded[2]


def test_random_refuses_a_nan_seed(db: tallytree.Database) -> None:
    """Regression: random(rng=nan) drew a different item each call (Random seeds a float by its hash,
    and each NaN object hashes by its identity), though a seed promises reproducible draws."""
    scores = _ten_scores(db)
    with db.read() as tx:
        for nan in (float("nan"), -float("nan")):
            with pytest.raises(InvalidArgumentError, match="NaN") as raised:
                scores.random(tx, rng=nan)
            assert not isinstance(raised.value, TypeError)
        assert scores.random(tx, rng=float("inf")) == scores.random(tx, rng=float("inf"))


HUGE = 10**5000  # beyond the 4,300 digits str() of an int takes by default
DAY = datetime(2024, 1, 1, tzinfo=UTC)


def test_ints_too_long_to_print_get_typed_errors(db: tallytree.Database) -> None:
    """Regression: the message of the typed error formatted the int, and formatting an int of more than
    4,300 digits raised a bare ValueError (or an OverflowError, for a calendar step) in its place."""
    scores = db.aggregate("scores", values=("points",))
    with db.write() as tx:
        scores.insert_many(tx, [(n, "id", (n,)) for n in range(10)])
    reads: list[tuple[type[Exception], Callable[[Any], Any]]] = [
        (tallytree.OutOfRangeError, lambda tx: scores.at(tx, HUGE)),
        (tallytree.OutOfRangeError, lambda tx: scores.at(tx, -HUGE)),
        (tallytree.BoundsError, lambda tx: scores.page(tx, limit=-HUGE)),
        (tallytree.BoundsError, lambda tx: scores.buckets(tx, start=0, width=1, count=HUGE)),
        (tallytree.BoundsError, lambda tx: scores.buckets(tx, start=0, width=-HUGE, count=2)),
        (tallytree.BoundsError, lambda tx: scores.buckets(tx, start=0, width=("month", -HUGE), count=2)),
        (tallytree.BoundsError, lambda tx: scores.buckets(tx, start=DAY, width=("month", HUGE), count=2)),
        (tallytree.BoundsTypeError, lambda tx: scores.count(tx, prefix=HUGE)),
        (tallytree.UnknownFieldError, lambda tx: scores.sum(tx, HUGE)),
    ]
    with db.read() as tx:
        for error, read in reads:
            with pytest.raises(error):
                read(tx)
    with db.write() as tx:
        for error, write in [
            (tallytree.InvalidValueError, lambda tx: scores.insert(tx, 1, "new", (HUGE,))),
            (tallytree.InvalidValueError, lambda tx: scores.insert(tx, 1, "new", ([HUGE],))),
            (tallytree.InvalidValueError, lambda tx: scores.insert_many(tx, [[HUGE]])),
            (InvalidArgumentError, lambda tx: scores.insert_many(tx, [], on_duplicate=HUGE)),
        ]:
            with pytest.raises(error):
                write(tx)
    with db.read() as tx:
        assert scores.count(tx) == 10


def test_bound_options_of_the_wrong_type_are_bounds_errors_an_index_is_not(db: tallytree.Database) -> None:
    """As the README says: a bound or range option of the wrong type raises BoundsTypeError, an index
    or a seed a plain ArgumentTypeError (an index out of range is an OutOfRangeError, no BoundsError)."""
    scores = _ten_scores(db)
    with db.read() as tx:
        for read in (
            lambda: scores.page(tx, limit="3"),
            lambda: scores.count(tx, prefix="ab"),
            lambda: scores.buckets(tx, start=0, width=1, count="3"),
            lambda: scores.buckets(tx, edges=5),
        ):
            with pytest.raises(tallytree.BoundsTypeError) as raised:
                read()
            assert isinstance(raised.value, ArgumentTypeError) and isinstance(raised.value, TypeError)
        for read in (lambda: scores.at(tx, "3"), lambda: scores.random(tx, rng=[1])):
            with pytest.raises(ArgumentTypeError) as raised:
                read()
            assert not isinstance(raised.value, tallytree.BoundsError)


def test_a_bound_of_another_type_than_every_key_is_a_bounds_type_error(db: tallytree.Database) -> None:
    """BoundKeyTypeError: a BoundsTypeError (so an ArgumentTypeError, a TypeError and a BoundsError)
    that names the bound's type and the keys', and says what to do; public in tallytree and errors."""
    scores = _ten_scores(db)
    with db.read() as tx, pytest.raises(tallytree.BoundKeyTypeError) as raised:
        scores.count(tx, ge="3")
    error = raised.value
    for kind in (
        tallytree.BoundsTypeError,
        ArgumentTypeError,
        TypeError,
        tallytree.BoundsError,
        ValueError,
        Error,
    ):
        assert isinstance(error, kind)
    assert str(error).startswith(
        "scores: the lower bound (ge=, gt=, eq= or prefix=) is a str, but every key in this namespace "
        "is a number"
    )
    assert str(error).endswith("convert the bound to a number (e.g. a datetime's .timestamp() for "
                               "epoch-second keys, or int(text))")  # fmt: skip
    assert "BoundKeyTypeError" in tallytree.__all__ and "BoundKeyTypeError" in tallytree.errors.__all__


def test_insert_many_refuses_what_is_not_iterable_and_writes_nothing(db: tallytree.Database) -> None:
    scores = db.aggregate("scores")
    with db.write() as tx:
        for items in (None, 5, object()):
            with pytest.raises(ArgumentTypeError, match="iterable"):
                scores.insert_many(tx, items)  # type: ignore[arg-type]
        assert scores.insert_many(tx, iter([(1, "a"), (2, "b")])) == 2
    with db.read() as tx:
        assert scores.count(tx) == 2


def test_an_unknown_field_of_totals_is_a_typed_key_error(db: tallytree.Database) -> None:
    costs = db.aggregate("costs", values=("cost",))
    with db.write() as tx:
        costs.insert(tx, 1, "a", (0.5,))
    with db.read() as tx:
        totals = costs.totals(tx)
    assert totals["cost"] == 0.5 and totals["count"] == 1 and totals.mean("cost") == 0.5
    for read in (lambda: totals["tokens"], lambda: totals.mean("tokens")):
        with pytest.raises(tallytree.UnknownFieldError) as raised:
            read()
        assert isinstance(raised.value, KeyError) and isinstance(raised.value, Error)
        assert str(raised.value) == "no value field 'tokens'; the fields are ['cost'] (and 'count')"


def test_check_refuses_an_aggregate_of_another_database(db: tallytree.Database) -> None:
    mine = db.aggregate("events", node_size=4)
    other_db = tallytree.open_memory()
    other = other_db.aggregate("events")
    with other_db.write() as tx:
        other.insert_many(tx, [(n, "id") for n in range(20)])  # healthy, but judged by mine it is not
    with db.write() as tx:
        mine.insert_many(tx, [(n, "id") for n in range(20)])
    with db.read() as tx:
        assert tallytree.check(tx, mine) == []
        with pytest.raises(tallytree.TransactionError, match="another database"):
            tallytree.check(tx, other)
        with pytest.raises(ArgumentTypeError, match="aggregate"):
            tallytree.check(tx, "events")  # type: ignore[arg-type]


def test_check_of_one_namespace_matches_it_as_reads_do(db: tallytree.Database) -> None:
    scores = db.aggregate("scores", node_size=4)
    with db.write() as tx:
        for namespace in (1, 1.0, True):
            scores.insert_many(tx, [(n, "id") for n in range(10)], namespace=namespace)
        assert scores.count(tx, namespace=1.0) == 10
    walked: list[Any] = []
    original = tallytree._check._Walker.__init__

    def spy(self: Any, tx: Any, aggregate: Any, namespace: Any, problems: Any) -> None:
        walked.append(namespace)
        original(self, tx, aggregate, namespace, problems)

    tallytree._check._Walker.__init__ = spy  # type: ignore[method-assign]
    try:
        with db.read() as tx:
            assert tallytree.check(tx, scores, namespace=1) == []
            assert tallytree.check(tx, scores, namespace="absent") == []
            with pytest.raises(tallytree.UnsupportedKeyTypeError):
                tallytree.check(tx, scores, namespace=[1])
            with pytest.raises(tallytree.InvalidArgumentError, match="needs the aggregate"):
                tallytree.check(tx, namespace=1)  # (it reported every other namespace's nodes as leaks)
    finally:
        tallytree._check._Walker.__init__ = original  # type: ignore[method-assign]
    assert walked == [1] and type(walked[0]) is int


BAD_FLAGS: list[tuple[str, Callable[[tallytree.Aggregate, Any], Any]]] = [
    ("items reverse", lambda a, tx: a.items(tx, reverse="yes")),
    ("items reverse 1", lambda a, tx: a.items(tx, reverse=1)),
    ("page reverse", lambda a, tx: a.page(tx, reverse="yes")),
    ("rank reverse", lambda a, tx: a.rank(tx, 3, reverse="yes")),
    ("rank reverse with id", lambda a, tx: a.rank(tx, 3, "id", reverse=None)),
    ("build sorted", lambda a, tx: a.build(tx, [(100, "new")], sorted="yes")),
    ("build replace", lambda a, tx: a.build(tx, [(100, "new")], replace="no")),
    ("build_many sorted", lambda a, tx: a.build_many(tx, [(None, 100, "new")], sorted=1)),
    ("build_many replace", lambda a, tx: a.build_many(tx, [(None, 100, "new")], replace=0)),
    ("build_many clear_others", lambda a, tx: a.build_many(tx, [(None, 100, "new")], clear_others="no")),
]


@pytest.mark.parametrize("call", [call for _, call in BAD_FLAGS], ids=[name for name, _ in BAD_FLAGS])
def test_a_flag_that_is_not_a_bool_raises_argument_type_error(
    db: tallytree.Database, call: Callable[[tallytree.Aggregate, Any], Any]
) -> None:
    """``sorted="no"`` is true: a flag that is not a bool is a mistake, refused before anything is read."""
    scores = _ten_scores(db)
    with db.write() as tx, pytest.raises(ArgumentTypeError, match="= takes True or False, not ") as raised:
        call(scores, tx)
    assert isinstance(raised.value, TypeError)
    with db.read() as tx:
        assert [item.key for item in scores.items(tx)] == list(range(10))  # nothing changed


def test_rank_in_both_directions_still_answers() -> None:
    db = tallytree.open_memory()
    board = db.aggregate("board")
    with db.write() as tx:
        board.insert_many(tx, [(10, "ann"), (20, "bob"), (20, "cy"), (30, "dan")])
    with db.read() as tx:
        assert [board.rank(tx, 20, reverse=flag) for flag in (False, True)] == [1, 1]
        assert [board.rank(tx, 20, "bob", reverse=flag) for flag in (False, True)] == [1, 2]
        assert [board.rank(tx, 20, "cy", ge=20, reverse=flag) for flag in (False, True)] == [1, 1]
        with pytest.raises(ArgumentTypeError, match="reverse="):
            board.rank(tx, 20, reverse=1)


def test_a_build_refuses_an_on_invalid_that_is_not_a_function_before_any_item(db: tallytree.Database) -> None:
    scores = db.aggregate("scores", values=("v",))
    with db.write() as tx:
        scores.insert_many(tx, [(n, "id", (n,)) for n in range(10)])
    for items in ([(1, "a", (1,))], [(float("nan"), "a", (1,))]):  # valid items too: checked up front
        with db.write() as tx, pytest.raises(ArgumentTypeError, match="on_invalid= takes a function"):
            scores.build(tx, items, on_invalid=5)  # type: ignore[arg-type]
    with db.read() as tx:
        assert scores.count(tx) == 10


def test_a_read_option_of_the_wrong_type_is_an_argument_type_error(db: tallytree.Database) -> None:
    """Also the BoundsError it was before; a wrong value (limit=0) stays a BoundsError alone."""
    scores = _ten_scores(db)
    with db.read() as tx:
        wrong_types: list[Callable[[], Any]] = [
            lambda: scores.page(tx, limit="3"),
            lambda: scores.page(tx, limit=None),
            lambda: scores.page(tx, limit=2.0),
            lambda: scores.page(tx, after=5),
            lambda: scores.count(tx, prefix="ab"),
        ]
        for read in wrong_types:
            with pytest.raises(ArgumentTypeError) as raised:
                read()
            assert isinstance(raised.value, TypeError) and isinstance(raised.value, tallytree.BoundsError)
        for limit in (0, -1):
            with pytest.raises(tallytree.BoundsError, match="limit must be a positive int") as bounds:
                scores.page(tx, limit=limit)
            assert not isinstance(bounds.value, TypeError)
        assert len(scores.page(tx, limit=3).items) == 3


def test_sum_of_a_field_the_aggregate_does_not_have_is_an_unknown_field_error(db: tallytree.Database) -> None:
    """As README's list says, and as ``totals["nope"]`` raises; still the InvalidValueError it was."""
    costs = db.aggregate("costs", values=("cost",))
    with db.write() as tx:
        costs.insert(tx, 1, "a", (0.5,))
    with db.read() as tx:
        for field in ("nope", "count", 5):
            with pytest.raises(tallytree.UnknownFieldError, match="no value field") as raised:
                costs.sum(tx, field)  # type: ignore[arg-type]
            assert isinstance(raised.value, KeyError) and isinstance(
                raised.value, tallytree.InvalidValueError
            )
            assert str(raised.value).startswith(f"costs: no value field {field!r}; the fields are ['cost']")
        assert costs.sum(tx, "cost") == 0.5


def test_create_and_reverse_flags_of_databases_tables_and_sync_take_bools_only(
    db: tallytree.Database,
) -> None:
    """``db.aggregate("zz", create="no")`` created the aggregate ("no" is true), and table.items and
    Sync took any value as a flag."""
    with pytest.raises(tallytree.ArgumentTypeError, match="create= takes True or False"):
        db.aggregate("zz", create="no")  # type: ignore[arg-type]
    with pytest.raises(tallytree.ArgumentTypeError, match="create= takes True or False"):
        db.table("zz", create=0)  # type: ignore[arg-type]
    assert db.aggregates() == [] and db.tables() == []
    notes = db.table("notes")
    with db.read() as tx, pytest.raises(tallytree.ArgumentTypeError, match="reverse="):
        list(notes.items(tx, reverse="yes"))  # type: ignore[arg-type]
    sqlalchemy = pytest.importorskip("tallytree.sqlalchemy")
    with pytest.raises(tallytree.ArgumentTypeError, match="idempotent="):
        sqlalchemy.Sync(db, idempotent="no")


@pytest.mark.parametrize("backend", ["memory", "lmdb"])
def test_commit_or_abort_inside_the_with_block_ends_the_transaction_and_the_block_accepts_it(
    backend: str, tmp_path: Path
) -> None:
    """``tx.commit()`` in ``with db.write() as tx:`` committed, then the block's end raised
    TransactionError ("this transaction has ended"); so did ``tx.abort()``."""
    db = tallytree.open(tmp_path / "db.tt") if backend == "lmdb" else tallytree.open_memory()
    scores = db.aggregate("scores")
    docs = db.table("docs")
    by_kind = docs.aggregate("by_kind", key="kind")
    with db.write() as tx:
        scores.insert(tx, 1, "a")
        docs.insert(tx, {"kind": 1})  # queued (a deferred insert): the commit merges it
        tx.commit()
        tx.commit()  # ended already: nothing to do
        for write in (lambda: scores.insert(tx, 2, "b"), lambda: docs.insert(tx, {"kind": 2})):
            with pytest.raises(tallytree.TransactionError, match="this transaction has ended"):
                write()
        with db.read() as rtx:
            assert scores.count(rtx) == by_kind.count(rtx) == 1
        with db.write() as again:  # the write lock is free: a new write transaction may begin
            scores.insert(again, 3, "c")
    with db.write() as tx:
        scores.insert(tx, 4, "d")
        docs.insert(tx, {"kind": 4})
        tx.abort()
    # the block's error still propagates, and still aborts a transaction the block left open
    with pytest.raises(RuntimeError, match="after the commit"), db.write() as tx:
        scores.insert(tx, 5, "e")
        tx.commit()
        raise RuntimeError("after the commit")
    with pytest.raises(RuntimeError, match="before the end"), db.write() as tx:
        scores.insert(tx, 6, "f")
        raise RuntimeError("before the end")
    with db.read() as tx:
        tx.abort()
        with pytest.raises(tallytree.TransactionError, match="this transaction has ended"):
            scores.count(tx)
    with db.write() as tx:  # nothing was left half-done: the table's state and queue start afresh
        assert docs.insert(tx, {"kind": 7}) == 2
    with db.read() as tx:
        assert [item.key for item in scores.items(tx)] == [1, 3, 5]
        assert [(item.key, item.id) for item in by_kind.items(tx)] == [(1, 1), (7, 2)]
        assert docs.count(tx) == 2 and tallytree.check(tx) == []
    db.close()


def test_writes_are_typed_to_refuse_a_read_transaction(tmp_path: Path) -> None:
    """Writes were annotated ``tx: Transaction``, so ``agg.insert(read_tx, ...)`` type-checked and
    failed only at run time."""
    api = pytest.importorskip("mypy.api")
    setup = (
        "import tallytree\n"
        "db = tallytree.open_memory()\n"
        "events = db.aggregate('events')\n"
        "docs = db.table('docs')\n"
        "hooks = tallytree.ChangeHandler(db)\n"
    )
    writes = (
        "    events.insert(tx, 1, 'a')\n"
        "    events.delete_range(tx, lt=5)\n"
        "    docs.insert(tx, {'kind': 1})\n"
        "    hooks.apply(tx, tallytree.Change.insert(1, {'kind': 1}))\n"
        "    tallytree.repair(tx, events, [])\n"
    )
    (tmp_path / "good.py").write_text(f"{setup}with db.write() as tx:\n{writes}")
    (tmp_path / "bad.py").write_text(f"{setup}with db.read() as tx:\n{writes}")
    report, errors, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            str(tmp_path / "good.py"),
            str(tmp_path / "bad.py"),
        ]
    )
    assert status == 1, report + errors
    lines = [line for line in report.splitlines() if ": error:" in line]
    assert not [line for line in lines if "good.py" in line], report
    assert [int(line.split(":")[1]) for line in lines] == [7, 8, 9, 10, 11], report
    assert all('"ReadTransaction"; expected "WriteTransaction"' in line for line in lines), report
