"""Change handlers for external stores, and verify / repair against a source of documents."""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest
from conftest import snapshot

import tallytree
from tallytree import Change, ChangeHandler
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
    # registered again (with a new definition, say): maintained, and known to verify and repair, again
    timeline = hooks.aggregate("timeline", key="day")
    with db.write() as tx:
        drift = tallytree.repair(tx, timeline, [{"id": i, **row} for i, row in rows.items()])
        assert (drift.missing, drift.extra, drift.different) == (0, 1, 2)
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
