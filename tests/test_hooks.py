"""Change handlers for external stores, and verify / repair against a source of documents."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any
from unittest.mock import patch

import pytest
from conftest import pure_python, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import tallytree
from tallytree import Change, ChangeHandler, _hooks
from tallytree._extract import move


def _handler(db: tallytree.Database) -> tuple[ChangeHandler, tallytree.Aggregate, tallytree.Aggregate]:
    hooks = ChangeHandler(db)
    by_status = hooks.aggregate("by_status", namespace="org", key="status", values=("total",))
    timeline = hooks.aggregate("timeline", key=("org", "day"), where=lambda row: row["status"] != "void")
    return hooks, by_status, timeline


def test_change_values_are_validated() -> None:
    assert Change.insert(1, {"a": 1}) == Change("insert", 1, None, {"a": 1})
    with pytest.raises(ValueError):
        Change("insert", 1, {"a": 1}, {"a": 2})
    with pytest.raises(ValueError):
        Change("delete", 1, None, None)
    with pytest.raises(ValueError):
        Change("upsert", 1, None, {"a": 1})  # type: ignore[arg-type]


def test_strict_apply_checks_every_aggregate_before_writing(db: tallytree.Database) -> None:
    hooks, by_status, timeline = _handler(db)
    row = {"org": 1, "status": "open", "day": 3, "total": 10}
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, row))
        before = snapshot(db, tx)
        with pytest.raises(tallytree.DuplicateItemError):
            hooks.apply(tx, Change.insert(1, row))
        with pytest.raises(tallytree.ItemNotFoundError):
            hooks.apply(tx, Change.delete(2, row))
        with pytest.raises(tallytree.ItemNotFoundError):
            hooks.apply(tx, Change.update(1, {**row, "status": "paid"}, row))
        with pytest.raises(tallytree.ExtractionError):
            hooks.apply(tx, Change.update(1, row, {"org": 1, "status": "paid", "day": 3}))
        assert snapshot(db, tx) == before
        hooks.apply(tx, Change.update(1, row, {**row, "status": "void", "total": 12}))
        assert by_status.totals(tx, namespace=1, eq="void").as_dict() == {"count": 1, "total": 12}
        assert timeline.count(tx) == 0
        hooks.apply(tx, Change.delete(1, {**row, "status": "void", "total": 12}))
        assert by_status.count(tx, namespace=1) == 0
    with db.read() as tx, pytest.raises(tallytree.TransactionError):
        hooks.apply(tx, Change.insert(1, row))


def test_strict_apply_refuses_a_stale_change_whose_old_values_the_aggregate_does_not_hold(
    db: tallytree.Database,
) -> None:
    """An update that changes values only, delivered again after a later update (or out of order),
    names an item that is there, but not with the old values it states: strict mode refuses it
    instead of putting back values the source no longer holds. So does a stale delete."""
    hooks, by_status, _ = _handler(db)
    rows = [{"org": 1, "status": "open", "day": 3, "total": total} for total in (1, 2, 3)]
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, rows[0]))
        hooks.apply(tx, Change.update(1, rows[0], rows[1]))
        hooks.apply(tx, Change.update(1, rows[1], rows[2]))
        before = snapshot(db, tx)
        with pytest.raises(tallytree.ItemNotFoundError, match="stale"):
            hooks.apply(tx, Change.update(1, rows[0], rows[1]))
        with pytest.raises(tallytree.ItemNotFoundError, match="stale"):
            hooks.apply(tx, Change.delete(1, rows[1]))
        with pytest.raises(tallytree.ItemNotFoundError, match="stale"):  # 3.0 is not the 3 stored
            hooks.apply(tx, Change.delete(1, {**rows[2], "total": 3.0}))
        assert snapshot(db, tx) == before
        assert by_status.totals(tx, namespace=1).as_dict() == {"count": 1, "total": 3}
        hooks.apply(tx, Change.delete(1, rows[2]))
        assert by_status.count(tx, namespace=1) == 0


def _random_log(rng: random.Random, size: int) -> tuple[list[Change], dict[int, dict[str, Any]]]:
    rows: dict[int, dict[str, Any]] = {}
    log = []
    for step in range(size):
        if rows and rng.random() < 0.5:
            row_id = rng.choice(list(rows))
            if rng.random() < 0.6:
                new = {
                    **rows[row_id],
                    "status": rng.choice(["open", "paid", "void"]),
                    "day": rng.randrange(9),
                }
                log.append(Change.update(row_id, rows[row_id], new))
                rows[row_id] = new
            else:
                log.append(Change.delete(row_id, rows.pop(row_id)))
        else:
            row = {
                "org": rng.randrange(3),
                "status": "open",
                "day": rng.randrange(9),
                "total": rng.randrange(99),
            }
            rows[step] = row
            log.append(Change.insert(step, row))
    return log, rows


def test_idempotent_replay_of_a_log_converges(db: tallytree.Database) -> None:
    hooks, by_status, timeline = _handler(db)
    log, rows = _random_log(random.Random(3), 400)
    with db.write() as tx:
        assert hooks.apply_many(tx, log) == len(log)
    once = snapshot(db)
    with db.write() as tx:
        hooks.apply_many(tx, log[:150], idempotent=True)  # a replay of a prefix, then of everything
        hooks.apply_many(tx, log[100:], idempotent=True)
    assert snapshot(db) == once
    with db.read() as tx:
        for aggregate in (by_status, timeline):
            assert tallytree.verify(tx, aggregate, rows.items()).ok
    row_id = next(iter(rows))
    with db.write() as tx, pytest.raises(tallytree.DuplicateItemError):
        hooks.apply(tx, Change.insert(row_id, rows[row_id]))


def test_verify_reports_drift_and_repair_fixes_it(db: tallytree.Database) -> None:
    hooks, by_status, _ = _handler(db)
    rows = {i: {"id": i, "org": i % 2, "status": "open", "day": i, "total": i} for i in range(20)}
    with db.write() as tx:
        for row_id, row in rows.items():
            hooks.apply(tx, Change.insert(row_id, row))
    rows[3] = {**rows[3], "status": "paid"}  # written elsewhere, never reported: "different"
    rows[20] = {"id": 20, "org": 0, "status": "open", "day": 20, "total": 20}  # "missing"
    del rows[5]  # "extra"
    rows[7] = {**rows[7], "total": 700}  # "different" values
    with db.read() as tx:
        drift = tallytree.verify(tx, by_status, rows.values(), examples=2)
    assert (drift.documents, drift.expected, drift.actual) == (20, 20, 20)
    assert (drift.missing, drift.extra, drift.different, drift.ok) == (1, 1, 2, False)
    assert len(drift.examples) == 2
    assert "missing 1, extra 1, different 2" in str(drift)
    with db.read() as tx:
        full = tallytree.verify(tx, by_status, rows.values())
    kinds = {example.id: example.kind for example in full.examples}
    assert kinds == {3: "different", 7: "different", 5: "extra", 20: "missing"}
    different = next(example for example in full.examples if example.id == 3)
    assert different.expected is not None and different.actual is not None
    assert different.expected[1].key == "paid" and different.actual[1].key == "open"
    with db.write() as tx:
        fixed = tallytree.repair(tx, by_status, rows.values())
        assert fixed.missing + fixed.extra + fixed.different == 4
        assert tallytree.verify(tx, by_status, rows.values()).ok
    with db.read() as tx:
        assert by_status.totals(tx, namespace=1).as_dict() == {
            "count": sum(1 for r in rows.values() if r["org"] == 1),
            "total": sum(r["total"] for r in rows.values() if r["org"] == 1),
        }
        assert not tallytree.check(tx)


def test_verify_reads_a_dbapi_cursor_and_id_functions(db: tallytree.Database) -> None:
    _, by_status, _ = _handler(db)
    sql = sqlite3.connect(":memory:")
    sql.execute("create table invoices (invoice_id integer primary key, org, status, day, total)")
    rng = random.Random(1)
    for i in range(100):
        values = (i, rng.randrange(3), rng.choice(["open", "paid"]), rng.randrange(9), rng.randrange(50))
        sql.execute("insert into invoices values (?, ?, ?, ?, ?)", values)
    with db.write() as tx:
        cursor = sql.execute("select * from invoices")
        drift = tallytree.repair(tx, by_status, cursor, id="invoice_id")
        assert drift.missing == 100
        assert tallytree.verify(tx, by_status, sql.execute("select * from invoices"), id="invoice_id").ok
        rows = sql.execute("select invoice_id, org, status, day, total from invoices").fetchall()
        as_pairs = [(r[0], dict(zip(("id", "org", "status", "day", "total"), r, strict=True))) for r in rows]
        assert tallytree.verify(tx, by_status, as_pairs).ok
        keyed = [dict(pair[1], ref=f"inv-{pair[0]}") for pair in as_pairs]
        drift = tallytree.verify(tx, by_status, keyed, id=lambda row: row["ref"])
        assert (drift.missing, drift.extra) == (100, 100)
    with db.read() as tx:
        org_totals = dict(sql.execute("select org, sum(total) from invoices group by org").fetchall())
        assert {ns: t.total for ns, t in by_status.namespaces(tx)} == org_totals


def test_verify_needs_extractors(db: tallytree.Database) -> None:
    plain = db.aggregate("plain")
    with db.read() as tx, pytest.raises(tallytree.AggregateNotFoundError):
        tallytree.verify(tx, plain, [])


def test_repair_restores_a_tampered_table_aggregate(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", namespace="g", key="k", values=("v",))
    with db.write() as tx:
        table.insert_many(tx, [(i, {"g": i % 3, "k": i % 7, "v": i}) for i in range(100)])
    with db.write() as tx:  # simulate damage below the public API
        move(
            tx,
            agg,
            (agg._tree_key(1), tallytree._keys.encode_key(1 % 7) + tallytree._keys.encode_id(1), (1,)),
            None,
        )
        move(
            tx,
            agg,
            None,
            (agg._tree_key(9), tallytree._keys.encode_key(0) + tallytree._keys.encode_id("x"), (5,)),
        )
    with db.write() as tx:
        drift = tallytree.verify(tx, agg, table)
        assert (drift.missing, drift.extra, drift.different) == (1, 1, 0)
        tallytree.repair(tx, agg, table)
        assert tallytree.verify(tx, agg, table).ok


def test_handler_refuses_table_owned_aggregates(db: tallytree.Database) -> None:
    db.table("t").aggregate("owned", key="k")
    with pytest.raises(tallytree.TransactionError, match="maintained by table"):
        ChangeHandler(db).aggregate("owned", key="k")


def test_a_handler_refuses_to_write_into_an_aggregate_dropped_since() -> None:
    """It wrote under the dropped aggregate's id: root records of an unknown aggregate (check() flagged
    them), and nothing in the aggregate created again under the name."""
    db = tallytree.open_memory()
    handler = ChangeHandler(db)
    handler.aggregate("inv", key="s")
    db.drop_aggregate("inv")
    with pytest.raises(tallytree.TransactionError, match="dropped"), db.write() as tx:
        handler.apply(tx, Change.insert(1, {"s": "a"}))
    with db.read() as tx:
        assert tallytree.check(tx) == []


def test_detach_stops_maintaining_an_aggregate_and_forgets_its_extractors(db: tallytree.Database) -> None:
    hooks, by_status, timeline = _handler(db)
    rows = {
        1: {"org": 1, "status": "open", "day": 3, "total": 10},
        2: {"org": 2, "status": "paid", "day": 4, "total": 5},
    }
    with db.write() as tx:
        hooks.apply_many(tx, [Change.insert(doc_id, row) for doc_id, row in rows.items()])
    held = snapshot(db)
    assert hooks.detach("timeline") is timeline
    assert hooks.aggregates() == ["by_status"] and "timeline" not in repr(hooks)
    with pytest.raises(tallytree.AggregateNotFoundError, match="no aggregate 'timeline'"):
        hooks.definition("timeline")
    with pytest.raises(tallytree.AggregateNotFoundError):
        hooks.detach("timeline")  # not registered any more
    assert snapshot(db) == held  # it keeps its items
    rows[3] = {"org": 1, "status": "open", "day": 9, "total": 1}
    with db.write() as tx:
        timeline.insert(tx, (1, 9), 3)  # its own writes were never refused, and are not
        hooks.apply(tx, Change.insert(3, rows[3]))  # strict, and the detached aggregate is not checked
        hooks.apply(tx, Change.delete(1, rows.pop(1)))
        assert [item.id for item in timeline.items(tx)] == [1, 3, 2]
        assert [(space, totals.count) for space, totals in by_status.namespaces(tx)] == [(1, 1), (2, 1)]
        with pytest.raises(tallytree.AggregateNotFoundError, match="no extractors"):
            tallytree.verify(tx, timeline, [{"id": i, **row} for i, row in rows.items()])
        assert tallytree.verify(tx, by_status, [{"id": i, **row} for i, row in rows.items()]).ok
    # registered again: its items follow the stored definition, so another one needs redefine=True
    with pytest.raises(tallytree.SchemaMismatchError, match="redefine=True"):
        hooks.aggregate("timeline", key="day")
    # the stored one: maintained, and known to verify and repair, again
    timeline = hooks.aggregate("timeline", key=("org", "day"), where=lambda row: row["status"] != "void")
    with db.write() as tx:
        drift = tallytree.repair(tx, timeline, [{"id": i, **row} for i, row in rows.items()])
        assert (drift.missing, drift.extra, drift.different) == (0, 1, 0)
        hooks.apply(tx, Change.delete(3, rows.pop(3)))
        assert [item.id for item in timeline.items(tx)] == [2]
    hooks.detach("timeline")
    db.drop_aggregate("timeline")  # retired: the handler goes on with the others
    with db.write() as tx:
        hooks.apply(tx, Change.delete(2, rows.pop(2)))
        assert list(by_status.namespaces(tx)) == []
        assert tallytree.check(tx) == []


def test_detaching_from_one_handler_keeps_another_handler_s_registration() -> None:
    db = tallytree.open_memory()
    first, second = ChangeHandler(db), ChangeHandler(db)
    totals = first.aggregate("totals", key="day", values=("amount",))
    second.aggregate("totals", key="day", values=("amount",))
    rows = [{"id": 1, "day": 1, "amount": 5}]
    first.detach("totals")  # not the definition the database uses (second's, registered last): kept
    with db.write() as tx:
        second.apply(tx, Change.insert(1, rows[0]))
        first.apply(tx, Change.insert(2, {"day": 2, "amount": 1}))  # detached: nothing
        assert tallytree.verify(tx, totals, rows).ok
    second.detach("totals")
    with db.read() as tx, pytest.raises(tallytree.AggregateNotFoundError, match="no extractors"):
        tallytree.verify(tx, totals, rows)
    third = ChangeHandler(db)  # a handler registering it again makes it known again
    third.aggregate("totals", key="day", values=("amount",))
    with db.read() as tx:
        assert tallytree.verify(tx, totals, rows).ok


def test_verify_and_repair_refuse_extractors_that_place_items_in_another_aggregate() -> None:
    """They wrote the items where the extractors put them: into a table's aggregate (bypassing the
    table), or under the id of an aggregate dropped since (root records of an unknown aggregate)."""
    db = tallytree.open_memory()
    loads = db.table("loads")
    owned = loads.aggregate("owned", key="day")
    plain = db.aggregate("plain")
    rows = [{"id": 1, "day": 5}]
    with db.write() as tx:
        with pytest.raises(tallytree.InvalidArgumentError, match="gives the items of aggregate 'owned'"):
            tallytree.repair(tx, plain, rows, definition=loads.definition("owned"))
        assert owned.count(tx) == plain.count(tx) == 0
    hooks = ChangeHandler(db)
    hooks.aggregate("x", key="day")
    db.drop_aggregate("x")  # without detaching it first
    x = db.aggregate("x")  # a new aggregate of that name
    for check in (tallytree.verify, tallytree.repair):
        with db.write() as tx, pytest.raises(tallytree.AggregateNotFoundError, match="dropped or redefined"):
            check(tx, x, rows)
    with db.write() as tx, pytest.raises(tallytree.InvalidArgumentError, match="dropped or redefined"):
        tallytree.repair(tx, x, rows, definition=hooks.definition("x"))
    with db.read() as tx:
        assert x.count(tx) == 0 and tallytree.check(tx) == []
    hooks.aggregate("x", key="day")  # registered again: the new aggregate's
    with db.write() as tx:
        assert tallytree.repair(tx, x, rows).missing == 1
        assert x.count(tx) == 1


def test_a_handler_checks_a_definition_before_creating_its_aggregate() -> None:
    db = tallytree.open_memory()
    handler = ChangeHandler(db)
    with pytest.raises(tallytree.InvalidArgumentError, match="on_missing"):
        handler.aggregate("q", key="k", on_missing="no")  # type: ignore[arg-type]
    with pytest.raises(tallytree.ArgumentTypeError, match="key="):
        handler.aggregate("q", key=["a", "b"])  # type: ignore[arg-type]
    assert db.aggregates() == []  # nothing was created


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda h, a, tx: h.apply_many(tx, 5), tallytree.ArgumentTypeError, "iterable of Change"),
        (lambda h, a, tx: tallytree.verify(tx, "inv", []), tallytree.ArgumentTypeError, "take an Aggregate"),
        (lambda h, a, tx: tallytree.repair(tx, "inv", []), tallytree.ArgumentTypeError, "take an Aggregate"),
        (lambda h, a, tx: tallytree.verify(tx, a, [{"s": "a"}]), tallytree.InvalidDocumentError, "no 'id'"),
        (
            lambda h, a, tx: h.apply(None, Change.insert(1, {"s": "a"})),
            tallytree.ArgumentTypeError,
            "transaction",
        ),
    ],
)
def test_bad_handler_arguments_raise_typed_errors(call: Any, error: type[Exception], match: str) -> None:
    db = tallytree.open_memory()
    handler = ChangeHandler(db)
    aggregate = handler.aggregate("inv", key="s")
    with pytest.raises(error, match=match), db.write() as tx:
        call(handler, aggregate, tx)
    with db.read() as tx:  # nothing was written
        assert aggregate.count(tx) == 0 and tallytree.check(tx) == []


def test_repair_refuses_a_table_aggregate_from_any_source_but_its_table(db: tallytree.Database) -> None:
    """A foreign source would make the aggregate disagree with its table, as a direct write would: repair
    raises the TransactionError of every write that bypasses the table, and changes nothing. Its own
    table stays a legitimate source; verify, which only reads, takes any."""
    loads = db.table("loads")
    by_status = loads.aggregate("by_status", key="status", values=("rate",))
    other = db.table("other")
    other.aggregate("rates", key="status", values=("rate",))
    with db.write() as tx:
        loads.insert(tx, {"status": "open", "rate": 5}, id=1)
        other.insert(tx, {"status": "closed", "rate": 999}, id=1)
    foreign = [{"id": 1, "status": "closed", "rate": 999}, {"id": 2, "status": "x", "rate": 1}]
    before = snapshot(db)
    sources: list[Any] = [foreign, iter(foreign), [(1, foreign[0])], other]
    for source in sources:
        with pytest.raises(tallytree.TransactionError, match="maintained by table 'loads'"), db.write() as tx:
            tallytree.repair(tx, by_status, source)
    with db.write() as tx, pytest.raises(tallytree.TransactionError, match="maintained by table"):
        tallytree.repair(tx, by_status, loads, definition=other.definition("rates"))  # not its extractors
    assert snapshot(db) == before
    with db.read() as tx:
        assert tallytree.verify(tx, by_status, loads).ok
        assert tallytree.verify(tx, by_status, foreign).different == 1  # reading is allowed
    with db.write() as tx:
        assert tallytree.repair(tx, by_status, loads).ok
        assert tallytree.repair(tx, by_status, loads, definition=loads.definition("by_status")).ok
        loads.update(tx, 1, {"rate": 6})  # the table's own writes still agree with it
    with db.read() as tx:
        assert by_status.totals(tx).rate == 6 and tallytree.verify(tx, by_status, loads).ok
    loads.detach("by_status")  # an ordinary aggregate again: any source may repair it
    hooks = ChangeHandler(db)
    detached = hooks.aggregate("by_status", key="status", values=("rate",))
    with db.write() as tx:
        assert tallytree.repair(tx, detached, foreign).different == 1
    with db.read() as tx:
        assert [item.key for item in detached.items(tx)] == ["closed", "x"]


def test_flags_must_be_bools(db: tallytree.Database) -> None:
    """``idempotent="no"`` is true: a flag that is not a bool is refused before anything is written."""
    hooks, _, _ = _handler(db)
    row = {"org": 1, "status": "open", "day": 3, "total": 10}
    before = snapshot(db)
    for flag in ("y", 1, None):
        with db.write() as tx:
            with pytest.raises(
                tallytree.ArgumentTypeError, match="idempotent= takes True or False"
            ) as raised:
                hooks.apply(tx, Change.insert(1, row), idempotent=flag)  # type: ignore[arg-type]
            assert isinstance(raised.value, TypeError)
            with pytest.raises(tallytree.ArgumentTypeError, match="idempotent="):
                hooks.apply_many(tx, [Change.insert(1, row)], idempotent=flag)  # type: ignore[arg-type]
            with pytest.raises(tallytree.ArgumentTypeError, match="idempotent="):
                hooks.apply_many(tx, [], idempotent=flag)  # type: ignore[arg-type]
    assert snapshot(db) == before
    with db.write() as tx:
        assert hooks.apply_many(tx, [Change.insert(1, row)] * 2, idempotent=True) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: Change.insert(1, "open"),
        lambda: Change.insert(1, [("status", "open")]),
        lambda: Change.update(1, {"status": "open"}, 5),
        lambda: Change.update(1, "old", {"status": "open"}),
        lambda: Change.delete(1, ["status"]),
    ],
)
def test_a_change_document_must_be_a_mapping(make: Any) -> None:
    with pytest.raises(tallytree.InvalidDocumentError, match="must be a mapping"):
        make()


def test_a_change_kind_of_any_type_is_a_typed_error() -> None:
    for kind in (["insert"], {"insert": 1}, 5, None):
        with pytest.raises(tallytree.InvalidArgumentError, match="'insert', 'update' or 'delete'"):
            Change(kind, 1, None, {"a": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a, tx: tallytree.verify(tx, a, 5), "iterable of rows"),
        (lambda a, tx: tallytree.repair(tx, a, None), "iterable of rows"),
        (lambda a, tx: tallytree.verify(tx, a, [{"id": 1, "s": "a"}], id=5), "id= takes"),
        (lambda a, tx: tallytree.repair(tx, a, [{"id": 1, "s": "a"}], id=None), "id= takes"),
        (lambda a, tx: tallytree.repair(tx, a, [{"id": 1, "s": "a"}], examples="3"), "examples="),
        (lambda a, tx: tallytree.verify(tx, a, [], examples=2.0), "examples="),
        (lambda a, tx: tallytree.repair(tx, a, [{"id": 1, "s": "a"}], definition="inv"), "definition="),
    ],
)
def test_verify_and_repair_refuse_arguments_of_the_wrong_type(call: Any, match: str) -> None:
    db = tallytree.open_memory()
    aggregate = ChangeHandler(db).aggregate("inv", key="s")
    with pytest.raises(tallytree.ArgumentTypeError, match=match) as raised, db.write() as tx:
        call(aggregate, tx)
    assert isinstance(raised.value, TypeError)
    with db.read() as tx:  # nothing was written
        assert aggregate.count(tx) == 0 and tallytree.check(tx) == []


# ---------------------------------------------------------------- batches: apply_many against apply


def _batch_handler(db: tallytree.Database) -> ChangeHandler:
    """Three aggregates of small nodes (so a few items split and merge them): one per namespace,
    one filtered by where= whose composite key needs a field, one of two fields that skips rows
    without it."""
    hooks = ChangeHandler(db)
    hooks.aggregate("by_status", namespace="org", key="status", values=("total",), node_size=4)
    hooks.aggregate("timeline", key=("org", "day"), where=lambda row: row["status"] != "void", node_size=5)
    hooks.aggregate(
        "amounts",
        key="day",
        values={"total": "total", "weight": lambda row: row["total"] * 2},
        on_missing="skip",
        node_size=4,
    )
    return hooks


@st.composite
def _documents(draw: st.DrawFn, chaos: int = 0) -> dict[str, Any]:
    doc = {
        "org": draw(st.integers(0, 2)),
        "status": draw(st.sampled_from(["open", "paid", "void"])),
        "day": draw(st.integers(0, 12)),
        "total": draw(st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 1.0, -2.25]))),
    }
    if chaos >= 2 and draw(st.integers(0, 24)) == 0:  # timeline refuses it (unless void), amounts skips it
        del doc["day"]
    return doc


@st.composite
def _change_logs(draw: st.DrawFn) -> tuple[list[tuple[int, dict[str, Any]]], list[Any]]:
    """Rows held before the batch, and a log of changes consistent with them, or (``chaos`` > 0) with
    some arbitrary changes (stale, repeated, drifted), documents the extractors refuse, and (rarely)
    things that are not changes."""
    chaos = draw(st.integers(0, 3))
    rows = dict(draw(st.lists(st.tuples(st.integers(0, 11), _documents()), max_size=30)))
    held = list(rows.items())
    log: list[Any] = []
    for _ in range(draw(st.integers(0, 40))):
        doc_id = draw(st.integers(0, 11))
        roll = draw(st.integers(0, 59))
        if chaos == 3 and roll == 0:
            log.append(draw(st.sampled_from([None, 5, (doc_id, {"day": 1})])))
        elif roll < chaos and doc_id in dict(held):  # a replayed insert of a row held before
            log.append(Change.insert(doc_id, dict(held)[doc_id]))
        elif roll < chaos * 2:  # arbitrary
            kind = draw(st.sampled_from(["insert", "update", "delete"]))
            old = draw(_documents(chaos)) if kind != "insert" else None
            new = draw(_documents(chaos)) if kind != "delete" else None
            log.append(Change(kind, doc_id, old, new))
        elif doc_id not in rows:
            rows[doc_id] = draw(_documents(chaos))
            log.append(Change.insert(doc_id, rows[doc_id]))
        elif draw(st.booleans()):
            new = {**rows[doc_id], **draw(_documents(chaos))}
            log.append(Change.update(doc_id, rows[doc_id], new))
            rows[doc_id] = new
        else:
            log.append(Change.delete(doc_id, rows.pop(doc_id)))
    return held, log


def _outcome(run: Any) -> tuple[str, str] | None:
    try:
        run()
    except tallytree.Error as exc:
        return type(exc).__name__, str(exc)
    return None


@contextmanager
def _merging_everything() -> Iterator[None]:
    """Batches merge however few items a tree takes: the sorted-run paths, which the thresholds keep
    for larger batches than these tests' small ones."""
    with ExitStack() as stack:
        for name in ("_MERGE_AT", "_APPENDS_MERGE_AT"):
            stack.enter_context(patch.object(_hooks, name, 1))
        yield


@pytest.mark.parametrize("paths", ["measured", "merging"])
@pytest.mark.parametrize("kernels", ["c", "python"])
@settings(max_examples=100)
@given(case=_change_logs(), idempotent=st.booleans())
def test_apply_many_equals_applying_one_by_one(
    paths: str, kernels: str, case: tuple[list[tuple[int, dict[str, Any]]], list[Any]], idempotent: bool
) -> None:
    """A batch gives the items and totals of its changes applied one by one, strict or idempotent,
    and raises the same error (the same change named); a batch that raises writes nothing."""
    held, log = case
    with (
        pure_python() if kernels == "python" else nullcontext(),
        _merging_everything() if paths == "merging" else nullcontext(),
    ):
        batched, single = tallytree.open_memory(), tallytree.open_memory()
        handlers = [_batch_handler(batched), _batch_handler(single)]
        for db, hooks in zip((batched, single), handlers, strict=True):
            with db.write() as tx:
                for doc_id, doc in held:  # the rows held before: in the nodes, and appends pending
                    hooks.apply(tx, Change.insert(doc_id, doc))
        before = snapshot(batched)
        with batched.write() as tx:
            got = _outcome(lambda: handlers[0].apply_many(tx, log, idempotent=idempotent))
            after = snapshot(batched, tx)
        with single.write() as tx:
            expected = _outcome(lambda: [handlers[1].apply(tx, c, idempotent=idempotent) for c in log])
            if expected is not None:
                tx.abort()  # one by one, the changes before the failing one were written
        assert got == expected
        if got is not None:
            assert after == before
        else:
            assert after == snapshot(single)
        for db in (batched, single):
            with db.read() as tx:
                assert tallytree.check(tx) == []


@pytest.mark.parametrize("kernels", ["c", "python"])
@pytest.mark.parametrize("idempotent", [False, True])
def test_a_large_batch_equals_applying_one_by_one(
    db: tallytree.Database, kernels: str, idempotent: bool
) -> None:
    """Thousands of changes of every kind into trees of default node size holding thousands of items,
    with appends pending: merged runs, scattered and time-ordered, and removals."""
    rng = random.Random(11)
    other = tallytree.open_memory()
    with pure_python() if kernels == "python" else nullcontext():
        hooks = [_batch_handler_default(db), _batch_handler_default(other)]
        rows: dict[int, dict[str, Any]] = {}
        held = []
        for doc_id in range(3000):
            rows[doc_id] = {
                "org": rng.randrange(3),
                "status": "open",
                "day": doc_id,
                "total": rng.randrange(9),
            }
            held.append(Change.insert(doc_id, rows[doc_id]))
        log = []
        for doc_id in range(3000, 6000):  # new rows, scattered and time-ordered, some changed or gone
            day = doc_id if doc_id % 2 else rng.randrange(3000)
            rows[doc_id] = {"org": rng.randrange(3), "status": "open", "day": day, "total": rng.random()}
            log.append(Change.insert(doc_id, rows[doc_id]))
            old_id = rng.randrange(doc_id)
            if old_id in rows and rng.random() < 0.3:
                new = {**rows[old_id], "status": rng.choice(["paid", "void"]), "total": rng.randrange(9)}
                log.append(Change.update(old_id, rows[old_id], new))
                rows[old_id] = new
            elif old_id in rows and rng.random() < 0.1:
                log.append(Change.delete(old_id, rows.pop(old_id)))
        for database, handler in zip((db, other), hooks, strict=True):
            with database.write() as tx:
                handler.apply_many(tx, held[:2990])
                for change in held[2990:]:  # appends left pending
                    handler.apply(tx, change)
        with db.write() as tx:
            assert hooks[0].apply_many(tx, log, idempotent=idempotent) == len(log)
        with other.write() as tx:
            for change in log:
                hooks[1].apply(tx, change, idempotent=idempotent)
        assert snapshot(db) == snapshot(other)
        with db.read() as tx:
            assert tallytree.check(tx) == []
            for name in hooks[0].aggregates():
                assert tallytree.verify(tx, db.aggregate(name), rows.items()).ok
        held = snapshot(db)
        fresh = [Change.insert(doc_id, {**rows[0], "day": doc_id}) for doc_id in range(6000, 9000)]
        replayed = next(c for c in log if c.kind == "insert" and rows.get(c.id) == c.new)  # unchanged since
        with db.write() as tx:  # a strict batch failing at its last change writes nothing
            with pytest.raises(tallytree.DuplicateItemError, match=f"document {replayed.id} is already"):
                hooks[0].apply_many(tx, [*fresh, replayed])
            assert snapshot(db, tx) == held


def _batch_handler_default(db: tallytree.Database) -> ChangeHandler:
    hooks = ChangeHandler(db)
    hooks.aggregate("by_status", namespace="org", key="status", values=("total",))
    hooks.aggregate("timeline", key=("org", "day"), where=lambda row: row["status"] != "void")
    return hooks


def test_a_strict_batch_names_the_first_failing_change_in_its_order_and_writes_nothing() -> None:
    """The places a batch needs are checked at its end, tree by tree; the error names the first
    change that fails in the batch's order (not the first place in key order), as one by one, and
    nothing is written. So for an item pending (appended, not merged yet), and for an item a change
    before removed (its place is free then)."""
    db = tallytree.open_memory()
    hooks = ChangeHandler(db)
    events = hooks.aggregate("events", key="at", values=("n",))
    with db.write() as tx:
        hooks.apply_many(tx, [Change.insert(at, {"at": at, "n": 1}) for at in range(0, 1000, 10)])
        hooks.apply(tx, Change.insert(2000, {"at": 2000, "n": 1}))  # pending
    before = snapshot(db)
    taken = [Change.insert(at, {"at": at, "n": 1}) for at in (990, 500)]
    batch = [Change.insert(at, {"at": at, "n": 1}) for at in range(3, 1500, 10)]  # all new
    pending = Change.insert(2000, {"at": 2000, "n": 1})
    for position, change in ((60, taken[0]), (90, taken[1]), (140, pending)):
        batch.insert(position, change)
    with db.write() as tx:
        with pytest.raises(tallytree.DuplicateItemError, match="document 990 is already"):
            hooks.apply_many(tx, batch)
        assert snapshot(db, tx) == before
        with pytest.raises(tallytree.DuplicateItemError, match="document 2000 is already"):
            hooks.apply_many(tx, batch[100:])
        assert snapshot(db, tx) == before
        freed = [Change.delete(990, {"at": 990, "n": 1}), *batch[:61]]  # 990 leaves, then comes back
        assert hooks.apply_many(tx, freed) == 62
        assert events.totals(tx).as_dict() == {"count": 100 + 1 + 60, "n": 161}
        assert tallytree.check(tx) == []


def test_a_batch_of_changes_that_cancel_out_writes_nothing() -> None:
    """A document inserted, moved and deleted within the batch leaves every tree untouched; one
    moved back to where it was, with its values, too."""
    db = tallytree.open_memory()
    hooks = ChangeHandler(db)
    hooks.aggregate("per_org", namespace="org", key="day", values=("n",))
    row = {"org": 1, "day": 5, "n": 2}
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, row))
    moved = {**row, "org": 2, "day": 9}
    log = [
        Change.insert(2, row),
        Change.update(2, row, moved),
        Change.delete(2, moved),
        Change.update(1, row, moved),
        Change.update(1, moved, row),
    ]
    with db.write() as tx:
        assert hooks.apply_many(tx, log) == 5
        assert tx.changed_roots() == {}  # no tree was written


def test_registering_another_definition_of_a_registered_name_is_refused() -> None:
    """As a table does (SchemaMismatchError): the aggregate holds the first definition's items, so a
    silent replacement would make later changes remove items that are not there. The same
    definition again is fine (a function passed anew replaces the old); another after the aggregate
    was dropped too, but after detaching only with redefine=True (the items are still the first's)."""
    db = tallytree.open_memory()
    hooks = ChangeHandler(db)
    by_day = hooks.aggregate("by_day", key="day", where=lambda row: row["ok"])
    assert hooks.aggregate("by_day", key="day", where=lambda row: row["ok"]) is by_day
    for other in (
        {"key": "week"},
        {"key": "day"},  # without the where= filter
        {"key": "day", "where": lambda row: row["ok"], "on_missing": "skip"},
        {"key": "day", "namespace": "org", "where": lambda row: row["ok"]},
    ):
        with pytest.raises(tallytree.SchemaMismatchError, match=r"redefine=True"):
            hooks.aggregate("by_day", **other)
    assert hooks.definition("by_day").key_spec == "day"
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, {"day": 3, "ok": True}))
    hooks.detach("by_day")
    with pytest.raises(tallytree.SchemaMismatchError, match=r"redefine=True"):
        hooks.aggregate("by_day", key="week", on_missing="skip")
    weekly = hooks.aggregate("by_day", key="week", on_missing="skip", redefine=True)
    assert weekly is not by_day  # made anew, empty
    with db.read() as tx:
        assert weekly.count(tx) == 0
    hooks.detach("by_day")
    db.drop_aggregate("by_day")
    assert hooks.aggregate("by_day", key="day", where="ok") is not weekly  # registered anew
    hooks.aggregate("by_day", key="day", where="ok")
    db.drop_aggregate("by_day")  # without detaching: the registration names a dropped aggregate
    fresh = hooks.aggregate("by_day", key="week")
    with db.write() as tx:
        hooks.apply(tx, Change.insert(1, {"week": 1}))
        assert fresh.count(tx) == 1
