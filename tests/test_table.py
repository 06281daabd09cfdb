"""Tables: documents with attached aggregates, checked against brute force over the documents."""

from __future__ import annotations

import functools
import json
import operator
import os
import random
import subprocess
import sys
import textwrap
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import snapshot, strict
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tallytree
from tallytree import Change, ChangeHandler, _bulk, _extract, _table
from tallytree._txn import WriteTransaction

# ---------------------------------------------------------------- brute force


def expected_items(
    docs: dict[Any, dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    namespace: Callable[[dict[str, Any]], Any] = lambda doc: None,
    values: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda doc: (),
    where: Callable[[dict[str, Any]], bool] = lambda doc: True,
) -> dict[Any, list[tuple[Any, Any, tuple[Any, ...]]]]:
    """What an aggregate should hold: per namespace, sorted (key, id, values)."""
    spaces: dict[Any, list[tuple[Any, Any, tuple[Any, ...]]]] = defaultdict(list)
    for doc_id, doc in docs.items():
        if where(doc):
            spaces[namespace(doc)].append((key(doc), doc_id, values(doc)))
    return {
        space: sorted(
            items, key=lambda item: tallytree._keys.encode_key(item[0]) + tallytree._keys.encode_id(item[1])
        )
        for space, items in spaces.items()
    }


def held_items(tx: tallytree.Transaction, aggregate: tallytree.Aggregate) -> dict[Any, list[Any]]:
    return {
        namespace: [(item.key, item.id, item.values) for item in aggregate.items(tx, namespace=namespace)]
        for namespace, _ in aggregate.namespaces(tx)
    }


# ---------------------------------------------------------------- basics


def test_insert_get_update_delete_keep_aggregates_exact(db: tallytree.Database) -> None:
    loads = db.table("loads")
    by_status = loads.aggregate("by_status", namespace="org", key="status", values=("amount",))
    with db.write() as tx:
        first = loads.insert(tx, {"org": 1, "status": "open", "amount": 100})
        second = loads.insert(tx, {"org": 1, "status": "open", "amount": 250})
        third = loads.insert(tx, {"org": 2, "status": "open", "amount": 7}, id="manual")
        assert (first, second, third) == (1, 2, "manual")
        assert loads.get(tx, first) == {"org": 1, "status": "open", "amount": 100}
        assert loads.update(tx, first, {"status": "delivered", "amount": 120}) == {
            "org": 1,
            "status": "delivered",
            "amount": 120,
        }
        assert by_status.totals(tx, namespace=1).as_dict() == {"count": 2, "amount": 370}
        assert by_status.count(tx, namespace=1, eq="open") == 1
        loads.update(tx, "manual", {"org": 1})  # moves between namespaces
        assert by_status.count(tx, namespace=2) == 0
        assert by_status.totals(tx, namespace=1).as_dict() == {"count": 3, "amount": 377}
        assert loads.delete(tx, second)["amount"] == 250
        assert loads.count(tx) == 2
    with db.read() as tx:
        assert by_status.totals(tx, namespace=1).as_dict() == {"count": 2, "amount": 127}
        assert [doc_id for doc_id, _ in loads.items(tx)] == [1, "manual"]
        assert [doc_id for doc_id, _ in loads.items(tx, reverse=True)] == ["manual", 1]
        assert list(loads.ids(tx)) == [1, "manual"]
        assert loads.get(tx, second) is None
        assert loads.count(tx) == 2
        assert not tallytree.check(tx)


def test_a_document_iterator_does_not_outlive_its_transaction(db: tallytree.Database) -> None:
    """Resumed after its transaction ended, items() and ids() raise TransactionError on both backends
    (LMDB's cursor used to raise py-lmdb's own error; the memory backend read on)."""
    notes = db.table("notes")
    with db.write() as tx:
        for index in range(50):
            notes.insert(tx, {"n": index})
    for make in (notes.items, notes.ids, lambda tx: notes.items(tx, reverse=True)):
        with db.read() as tx:
            iterator = iter(make(tx))
            next(iterator)
        with pytest.raises(tallytree.TransactionError, match="has ended"):
            next(iterator)
    with db.read() as tx:  # inside its transaction, the same iteration reads everything
        assert [doc["n"] for _, doc in notes.items(tx)] == list(range(50))


def test_strict_and_idempotent_variants(db: tallytree.Database) -> None:
    table = db.table("t")
    counts = table.aggregate("counts", key="kind")
    with db.write() as tx:
        table.insert(tx, {"kind": "a"}, id="x")
        with pytest.raises(tallytree.DuplicateItemError):
            table.insert(tx, {"kind": "b"}, id="x")
        with pytest.raises(tallytree.ItemNotFoundError):
            table.update(tx, "nope", {"kind": "b"})
        with pytest.raises(tallytree.ItemNotFoundError):
            table.replace(tx, "nope", {"kind": "b"})
        with pytest.raises(tallytree.ItemNotFoundError):
            table.delete(tx, "nope")
        assert table.discard(tx, "nope") is False
        assert table.upsert(tx, "y", {"kind": "b"}) == "inserted"
        assert table.upsert(tx, "y", {"kind": "b"}) == "unchanged"
        assert table.upsert(tx, "y", {"kind": "c"}) == "updated"
        assert table.replace(tx, "y", {"kind": "a", "extra": 1}) == {"kind": "c"}
        assert table.discard(tx, "y") is True
        assert counts.count(tx) == 1
        assert table.count(tx) == 1


def test_unchanged_writes_write_nothing(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("counts", key="kind")
    with db.write() as tx:
        table.insert(tx, {"kind": "a"}, id="x")
    with db.write() as tx:
        table.upsert(tx, "x", {"kind": "a"})
        table.update(tx, "x", {"kind": "a"})
        table.replace(tx, "x", {"kind": "a"})
        assert not tx.changed


def test_generated_ids_skip_explicit_ints_and_are_never_reused(db: tallytree.Database) -> None:
    table = db.table("t")
    with db.write() as tx:
        assert table.insert(tx, {}) == 1
        table.insert(tx, {}, id=10)
        assert table.insert(tx, {}) == 11
        table.delete(tx, 11)
    with db.write() as tx:
        assert table.insert(tx, {}) == 12
        assert table.insert_many(tx, [{}, ("s", {}), {}]) == [13, "s", 14]
    top = 2**62  # explicit ids from here on do not move the counter; generated ones still do
    with db.write() as tx:
        table.insert(tx, {}, id=top - 1)
        first = table.insert(tx, {})
        table.delete(tx, table.insert(tx, {}))
        assert (first, table.insert(tx, {}), table.insert_many(tx, [{}])) == (top, top + 2, [top + 3])
        table.insert(tx, {}, id=top + 100)  # an explicit id above: skipped when met, not jumped to
        assert table.insert(tx, {}) == top + 4


def test_failed_generated_insert_does_not_consume_the_id(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("k", key="kind")
    with db.write() as tx:
        with pytest.raises(tallytree.ExtractionError):
            table.insert(tx, {"other": 1})
        assert table.insert(tx, {"kind": 1}) == 1


def test_extraction_error_names_document_and_field_and_writes_nothing(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("a", key="created", namespace="org")
    table.aggregate("b", key="kind", values=("cost",))
    with db.write() as tx:
        table.insert(tx, {"org": 1, "created": 5, "kind": "x", "cost": 1.5}, id="ok")
        before = snapshot(db, tx)
        count = table.count(tx)
        with pytest.raises(tallytree.ExtractionError) as info:
            table.insert(tx, {"org": 1, "created": 6, "kind": "x"}, id="bad")
        assert info.value.document_id == "bad"
        assert info.value.aggregate == "b"
        assert "cost" in str(info.value) and "'bad'" in str(info.value)
        with pytest.raises(tallytree.ExtractionError) as info:
            table.insert(tx, {"org": 1, "created": 6, "kind": "x", "cost": "cheap"}, id="bad")
        assert "cost" in str(info.value)
        with pytest.raises(tallytree.ExtractionError) as info:
            table.insert(tx, {"org": {"nested": 1}, "created": 6, "kind": "x", "cost": 1.0}, id="bad")
        assert info.value.field == "org"
        with pytest.raises(tallytree.ExtractionError):
            table.update(tx, "ok", {"cost": None})
        with pytest.raises(tallytree.InvalidDocumentError):
            table.insert(tx, {"created": datetime(2024, 1, 1)}, id="naive")
        with pytest.raises(tallytree.InvalidDocumentError):
            table.insert(tx, ["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(tallytree.ExtractionError):
            table.insert_many(tx, [{"org": 1, "created": 7, "kind": "y", "cost": 2.0}, {"org": 1}])
        assert snapshot(db, tx) == before
        assert table.count(tx) == count
        assert table.get(tx, "bad") is None


def test_callable_extractor_errors_are_wrapped(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("a", key=lambda doc: 1 / doc["n"])
    with db.write() as tx, pytest.raises(tallytree.ExtractionError) as info:
        table.insert(tx, {"n": 0}, id=1)
    assert "ZeroDivisionError" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_on_missing_skip_and_where(db: tallytree.Database) -> None:
    table = db.table("t")
    paid = table.aggregate("paid", key="paid_at", values=("amount",), on_missing="skip")
    active = table.aggregate("active", key="created", where={"void": False})
    truthy = table.aggregate("flagged", key="created", where="flag")
    big = table.aggregate("big", key="created", where=lambda doc: (doc["amount"] or 0) > 100)
    with db.write() as tx:
        table.insert(tx, {"created": 1, "amount": 50, "void": False}, id="a")
        table.insert(tx, {"created": 2, "amount": 500, "void": False, "paid_at": 9, "flag": 1}, id="b")
        table.insert(tx, {"created": 3, "amount": None, "void": True, "paid_at": 4}, id="c")
        assert [i.id for i in paid.items(tx)] == ["b"]  # c has amount None: skipped
        assert [i.id for i in active.items(tx)] == ["a", "b"]
        assert [i.id for i in truthy.items(tx)] == ["b"]
        with pytest.raises(tallytree.ExtractionError, match="'amount'"):  # the predicate's KeyError
            table.insert(tx, {"created": 4}, id="d")
        table.update(tx, "c", {"void": False, "amount": 300})  # starts matching both
        assert [i.id for i in active.items(tx)] == ["a", "b", "c"]
        assert [i.id for i in big.items(tx)] == ["b", "c"]
        assert paid.totals(tx).as_dict() == {"count": 2, "amount": 800}
        table.update(tx, "b", {"void": True}, remove=["paid_at"])  # stops matching, loses a field
        assert [i.id for i in active.items(tx)] == ["a", "c"]
        assert [i.id for i in paid.items(tx)] == ["c"]


def test_composite_and_function_keys_and_value_mappings(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate(
        "calls",
        namespace=lambda doc: ("org", doc["org"]),
        key=("status", "at"),
        values={"cost": "cost_usd", "tokens": lambda doc: doc["input"] + doc["output"]},
    )
    with db.write() as tx:
        table.insert(
            tx, {"org": 1, "status": "ok", "at": 5, "cost_usd": 0.25, "input": 10, "output": 3}, id=1
        )
        table.insert(tx, {"org": 1, "status": "ok", "at": 7, "cost_usd": 0.5, "input": 1, "output": 1}, id=2)
    with db.read() as tx:
        assert agg.totals(tx, namespace=("org", 1), prefix=("ok",)).as_dict() == {
            "count": 2,
            "cost": 0.75,
            "tokens": 15,
        }
        assert agg.count(tx, namespace=("org", 1), ge=("ok", 6)) == 1


def test_list_fields_are_tuple_keys_and_datetimes_are_instants(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", key="pair", namespace="when")
    when = datetime(2024, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    with db.write() as tx:
        table.insert(tx, {"pair": (1, "x"), "when": when}, id=1)
        table.update(tx, 1, {"pair": [2, "y"]})
        assert table.get(tx, 1) == {"pair": [2, "y"], "when": when}
        assert table.get(tx, 1)["when"].tzinfo == UTC  # type: ignore[index]
        assert [i.key for i in agg.items(tx, namespace=when)] == [(2, "y")]
        table.delete(tx, 1)
        assert agg.count(tx, namespace=when) == 0


def test_direct_writes_to_owned_aggregates_are_refused(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1}, id=1)
        for write in (
            lambda: agg.insert(tx, 2, 2),
            lambda: agg.delete(tx, 1, 1),
            lambda: agg.upsert(tx, 1, 1),
            lambda: agg.insert_many(tx, [(3, 3)]),
            lambda: agg.delete_range(tx),
            lambda: agg.clear(tx),
            lambda: db.aggregate("a").insert(tx, 4, 4),
        ):
            with pytest.raises(tallytree.TransactionError, match="maintained by table 't'"):
                write()
        assert agg.count(tx) == 1
    with pytest.raises(tallytree.TransactionError, match="drop_aggregate"):
        db.drop_aggregate("a")


def test_attach_builds_from_existing_documents_in_one_transaction(db: tallytree.Database) -> None:
    table = db.table("t")
    rng = random.Random(4)
    docs = {
        i: {"org": rng.randrange(5), "t": rng.randrange(1000), "v": rng.randrange(100)} for i in range(2000)
    }
    with db.write() as tx:
        table.insert_many(tx, list(docs.items()))
    agg = table.aggregate("late", namespace="org", key="t", values=("v",), node_size=8)
    with db.read() as tx:
        assert held_items(tx, agg) == expected_items(
            docs, key=lambda d: d["t"], namespace=lambda d: d["org"], values=lambda d: (d["v"],)
        )
        assert not tallytree.check(tx, agg)
    other = db.table("u")
    with db.write() as tx:
        other.insert(tx, {"t": 1}, id="good")
        other.insert(tx, {"org": 1, "v": 1}, id="bad")  # no "t": fine until an aggregate needs it
    with pytest.raises(tallytree.ExtractionError, match="'bad'"):
        other.aggregate("needs_t", key="t")
    assert "needs_t" not in db.aggregates()
    assert other.aggregates() == []
    assert table.aggregates() == ["late"]


@pytest.mark.parametrize("spill", [False, True])
def test_attach_by_columns_equals_the_documents(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch, spill: bool
) -> None:
    """Batches that take the column path, batches that go document by document (a list key, a
    missing field skipped, a bool value, namespaces of two types), keys out of id order, and the
    external sort (a tiny memory budget): the aggregate holds exactly the documents' items."""
    monkeypatch.setattr(_table, "_ATTACH_BATCH", 97)
    if spill:
        monkeypatch.setattr(_bulk, "DEFAULT_MEMORY", 20_000)
    rng = random.Random(5)
    docs: dict[Any, dict[str, Any]] = {}
    for i in range(3000):
        doc: dict[str, Any] = {"org": rng.randrange(7), "t": rng.randrange(-50, 10**6), "v": rng.random()}
        if 1000 <= i < 1100:
            doc["t"] = [rng.randrange(3), i]  # stored tuples come back as lists
        if 1500 <= i < 1600 and i % 3 == 0:
            del doc["v"]  # skipped (on_missing="skip")
        if 2000 <= i < 2100:
            doc["org"] = f"org{doc['org']}"
        if i == 2500:
            doc["v"] = 7
        docs[i if i % 5 else f"id{i}"] = doc
    table = db.table("t")
    with db.write() as tx:
        table.insert_many(tx, list(docs.items()))
    agg = table.aggregate("cols", namespace="org", key="t", values=("v",), on_missing="skip", node_size=8)
    kept = {i: doc for i, doc in docs.items() if "v" in doc}
    with db.read() as tx:
        assert held_items(tx, agg) == expected_items(
            kept,
            key=lambda d: tuple(d["t"]) if isinstance(d["t"], list) else d["t"],
            namespace=lambda d: d["org"],
            values=lambda d: (d["v"],),
        )
        assert not tallytree.check(tx, agg)
        assert tallytree.verify(tx, agg, table).ok
    where = table.aggregate("big", key="t", where=lambda d: d.get("org") == 3)
    with db.read() as tx:
        assert where.count(tx) == sum(1 for doc in docs.values() if doc["org"] == 3)


def test_same_definition_again_returns_the_aggregate_and_mismatch_raises(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", key="k", values=("v",))
    assert table.aggregate("a", key="k", values=("v",)) is agg
    assert table.aggregate("a") is agg
    with pytest.raises(tallytree.SchemaMismatchError):
        table.aggregate("a", key="other", values=("v",))
    with pytest.raises(tallytree.SchemaMismatchError):
        table.aggregate("a", key="k", values=("v", "w"))
    with pytest.raises(tallytree.AggregateNotFoundError):
        table.aggregate("unknown")
    db.aggregate("plain")
    with pytest.raises(tallytree.SchemaMismatchError, match="not attached"):
        table.aggregate("plain", key="k")


def test_rebuild_with_a_new_definition(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("a", key="k", values=("v",))
    with db.write() as tx:
        table.insert_many(tx, [(i, {"k": i, "j": -i, "v": i, "w": 2 * i}) for i in range(50)])
    rebuilt = table.aggregate("a", key="j", values=("v", "w"), rebuild=True, node_size=6)
    assert rebuilt.fields == ("v", "w") and rebuilt.node_size == 6
    with db.read() as tx:
        assert rebuilt.at(tx, 0).id == 49
        assert rebuilt.totals(tx).as_dict() == {"count": 50, "v": 1225, "w": 2450}
        assert not tallytree.check(tx)
    with db.write() as tx:
        table.delete(tx, 49)
        assert rebuilt.at(tx, 0).id == 48


def test_detach_and_drop(db: tallytree.Database) -> None:
    table = db.table("t")
    kept = table.aggregate("kept", key="k")
    dropped = table.aggregate("dropped", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1}, id=1)
    detached = table.detach("kept")
    assert detached is kept
    with db.write() as tx:
        kept.insert(tx, 5, "manual")  # an ordinary aggregate now
        table.insert(tx, {"k": 2}, id=2)  # no longer maintained
        assert kept.count(tx) == 2 and dropped.count(tx) == 2
    table.drop_aggregate("dropped")
    assert "dropped" not in db.aggregates()
    assert table.aggregates() == []
    with db.write() as tx, pytest.raises(tallytree.TransactionError, match="dropped"):
        dropped.insert(tx, 1, 1)
    other = db.table("other")
    other.aggregate("o", key="k")
    with db.write() as tx:
        other.insert(tx, {"k": 1})
    db.drop_table("other")
    assert db.tables() == ["t"]
    assert "o" not in db.aggregates()
    with pytest.raises(tallytree.TableNotFoundError):
        db.table("other", create=False)
    with db.write() as tx, pytest.raises(tallytree.TransactionError):
        other.insert(tx, {"k": 1})
    fresh = db.table("other")
    with db.read() as tx:
        assert fresh.count(tx) == 0 and list(fresh.items(tx)) == []


def test_table_management_refuses_inside_a_write_transaction(db: tallytree.Database) -> None:
    table = db.table("t")
    with db.write() as tx, pytest.raises(tallytree.TransactionError, match=r"before `with db\.write"):
        table.aggregate("a", key="k")
    with db.write() as tx, pytest.raises(tallytree.TransactionError):
        db.table("new")
    with db.read() as tx, pytest.raises(tallytree.TransactionError, match="write"):
        table.insert(tx, {})


def test_iteration_sees_own_writes_and_refuses_changes_during_iteration(db: tallytree.Database) -> None:
    table = db.table("t")
    with db.write() as tx:
        table.insert_many(tx, [(i, {"n": i}) for i in range(0, 10, 2)])
    with db.write() as tx:
        table.insert(tx, {"n": 5}, id=5)
        table.delete(tx, 4)
        table.update(tx, 0, {"n": 100})
        assert [(doc_id, doc["n"]) for doc_id, doc in table.items(tx)] == [
            (0, 100),
            (2, 2),
            (5, 5),
            (6, 6),
            (8, 8),
        ]
        with pytest.raises(tallytree.TransactionError, match="during iteration"):
            for doc_id, _ in table.items(tx):
                table.delete(tx, doc_id)


def test_insert_many_duplicates(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", key="k", values=("v",))
    with db.write() as tx:
        table.insert_many(tx, [(1, {"k": 1, "v": 1}), (2, {"k": 2, "v": 2})])
        with pytest.raises(tallytree.DuplicateItemError):
            table.insert_many(tx, [(3, {"k": 3, "v": 3}), (1, {"k": 9, "v": 9})])
        with pytest.raises(tallytree.DuplicateItemError):
            table.insert_many(tx, [(3, {"k": 3, "v": 3}), (3, {"k": 9, "v": 9})])
        assert table.count(tx) == 2
        table.insert_many(tx, [(3, {"k": 3, "v": 3}), (1, {"k": 9, "v": 9})], on_duplicate="skip")
        assert agg.totals(tx).as_dict() == {"count": 3, "v": 6}
        table.insert_many(
            tx, [(1, {"k": 9, "v": 9}), (4, {"k": 4, "v": 4}), (4, {"k": 5, "v": 5})], on_duplicate="update"
        )
        assert agg.totals(tx).as_dict() == {"count": 4, "v": 19}
        assert [i.key for i in agg.items(tx)] == [2, 3, 5, 9]
        assert table.count(tx) == 4


def test_delete_range_exports_then_removes_from_every_aggregate(db: tallytree.Database) -> None:
    table = db.table("events")
    by_time = table.aggregate("by_time", namespace="group", key="at", values=("size",))
    by_kind = table.aggregate("by_kind", key="kind")
    docs = {i: {"group": i % 3, "at": i, "size": i * 10, "kind": "k" + str(i % 4)} for i in range(60)}
    with db.write() as tx:
        table.insert_many(tx, list(docs.items()))
    exported: list[tuple[Any, dict[str, Any]]] = []
    with db.write() as tx:
        removed = table.delete_range(
            tx, "by_time", namespace=1, lt=30, export=lambda i, d: exported.append((i, d))
        )
    gone = [i for i in docs if docs[i]["group"] == 1 and docs[i]["at"] < 30]
    assert [i for i, _ in exported] == gone
    assert removed.as_dict() == {"count": len(gone), "size": sum(docs[i]["size"] for i in gone)}
    for i in gone:
        del docs[i]
    with db.read() as tx:
        assert held_items(tx, by_kind) == expected_items(docs, key=lambda d: d["kind"])
        assert held_items(tx, by_time) == expected_items(
            docs, key=lambda d: d["at"], namespace=lambda d: d["group"], values=lambda d: (d["size"],)
        )
        assert table.count(tx) == len(docs)
        assert all(tallytree.verify(tx, agg, table).ok for agg in (by_time, by_kind))

    def failing(doc_id: Any, doc: Any) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError), db.write() as tx:
        table.delete_range(tx, "by_time", namespace=2, export=failing)
    with db.read() as tx:
        assert by_time.count(tx, namespace=2) == 20


# ---------------------------------------------------------------- clear


def test_clear_empties_the_table_and_every_aggregate_and_keeps_the_definitions(
    db: tallytree.Database,
) -> None:
    rng = random.Random(11)
    table = db.table("t")
    other = db.aggregate("other")  # not the table's: untouched
    with db.write() as tx:
        other.insert(tx, 1, "x")
        docs = {
            doc_id: doc
            for doc in (_random_doc(rng) for _ in range(300))
            for doc_id in [table.insert(tx, doc)]
        }
    attached = _attach_all(table, node_size=4)  # several levels, in several namespaces
    with db.write() as tx:
        late = [_random_doc(rng) for _ in range(40)]  # queued inserts of this transaction go too
        table.insert_many(tx, [*late, ("s1", _random_doc(rng))])
        assert table.clear(tx) == len(docs) + 41
        _check_all(tx, table, attached, {})
        assert [list(aggregate.namespaces(tx)) for aggregate, _ in attached] == [[], [], [], []]
        assert table.clear(tx) == 0
    with db.read() as tx:
        _check_all(tx, table, attached, {})
        assert tallytree.check(tx) == []  # every node of the dropped trees was freed: no leak
        assert [item.id for item in other.items(tx)] == ["x"]
    assert table.aggregates() == ["by_status", "live", "timeline", "tokens"]
    with db.write() as tx:  # the aggregates go on following the table; ids are not reused
        fresh = {
            doc_id: doc for doc in (_random_doc(rng) for _ in range(30)) for doc_id in [table.insert(tx, doc)]
        }
        assert min(fresh) == len(docs) + len(late) + 1
        _random_writes(rng, tx, table, fresh, 100)
    with db.read() as tx:
        _check_all(tx, table, attached, fresh)
        assert tallytree.check(tx) == []


def test_clear_decodes_no_document_runs_no_extractor_and_drops_leaves_unread(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Counter[str]()

    def status_of(doc: dict[str, Any]) -> Any:
        calls["extract"] += 1
        return doc["status"]

    table = db.table("t")
    aggregate = table.aggregate("by_status", namespace="org", key=status_of, node_size=4)
    with db.write() as tx:
        table.insert_many(tx, [{"org": n % 3, "status": str(n)} for n in range(600)])
    calls.clear()
    real_node = WriteTransaction.node

    def counted_node(self: WriteTransaction, node_id: int) -> Any:
        node = real_node(self, node_id)
        calls["leaf" if node.leaf else "internal"] += 1
        return node

    def no_decoding(*args: Any) -> Any:
        raise AssertionError("clear() decoded a document")

    monkeypatch.setattr(WriteTransaction, "node", counted_node)
    monkeypatch.setattr(_table, "decode_doc", no_decoding)
    monkeypatch.setattr(_table, "decode_docs", no_decoding)
    with db.write() as tx:
        assert table.clear(tx) == 600
    monkeypatch.undo()
    # leaves are dropped by id: at most one read per tree (of 200 items, in leaves of 2 to 4)
    assert calls["extract"] == 0 and calls["leaf"] <= 3, calls
    assert calls["internal"] < 600 / 4, calls
    with db.read() as tx:
        assert aggregate.count(tx, namespace=0) == table.count(tx) == 0
        assert tallytree.check(tx) == []


def test_clear_is_refused_while_a_function_aggregate_awaits_its_function(tmp_path: Path) -> None:
    path = tmp_path / "db"

    def org_of(doc: dict[str, Any]) -> Any:
        return doc["org"]

    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        table.aggregate("fields", key="at")
        table.aggregate("func", namespace=org_of, key="at")
        with db.write() as tx:
            table.insert_many(tx, [{"org": 1, "at": at} for at in range(20)])
    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        before = snapshot(db)
        with (
            db.write() as tx,
            pytest.raises(tallytree.TransactionError, match="'func' is defined with a function"),
        ):
            table.clear(tx)
        with db.read() as tx:
            assert snapshot(db, tx) == before and table.count(tx) == 20
        table.aggregate("func", namespace=org_of, key="at")
        with db.write() as tx:
            assert table.clear(tx) == 20
        with db.read() as tx:
            assert table.count(tx) == 0 and all(not spaces for *_, spaces in snapshot(db, tx))


def test_an_exception_after_clear_in_its_transaction_undoes_it(db: tallytree.Database) -> None:
    table = db.table("t")
    by_status = table.aggregate("by_status", namespace="org", key="status", values=("amount",), node_size=4)
    with db.write() as tx:
        table.insert_many(tx, [{"org": n % 4, "status": str(n % 7), "amount": n} for n in range(200)])
    with db.read() as tx:
        before = _table_state(db, table, tx)
    with pytest.raises(RuntimeError, match="later"), db.write() as tx:
        assert table.clear(tx) == 200
        assert table.count(tx) == 0 and by_status.count(tx, namespace=1) == 0
        raise RuntimeError("something later in the transaction")
    with db.read() as tx:
        assert _table_state(db, table, tx) == before
        assert tallytree.check(tx) == []
    with db.write() as tx:  # the table's own state (count, next id) is read again, not kept from it
        assert table.insert(tx, {"org": 0, "status": "new", "amount": 1}) == 201
        assert table.count(tx) == 201


# ---------------------------------------------------------------- persistence


def test_definitions_persist_and_function_definitions_must_be_passed_again(tmp_path: Path) -> None:
    path = tmp_path / "db"

    def org_of(doc: dict[str, Any]) -> Any:
        return doc["org"]

    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        table.aggregate("fields", namespace="org", key=("status", "at"), values=("v",), where={"void": False})
        table.aggregate("func", namespace=org_of, key="at")
        with db.write() as tx:
            table.insert(tx, {"org": 1, "status": "a", "at": 1, "v": 2, "void": False}, id=1)
    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        assert table.aggregates() == ["fields", "func"]
        fields = table.aggregate("fields")
        with db.read() as tx:
            assert fields.totals(tx, namespace=1).as_dict() == {"count": 1, "v": 2}
            assert table.aggregate("func").count(tx, namespace=1) == 1  # reads work
        with (
            db.write() as tx,
            pytest.raises(tallytree.TransactionError, match="'func' is defined with a function"),
        ):
            table.insert(tx, {"org": 1, "status": "a", "at": 2, "v": 3, "void": False})

        def other(doc: dict[str, Any]) -> Any:
            return doc["status"]

        other.__qualname__ = org_of.__qualname__  # same name, different code
        with pytest.raises(tallytree.SchemaMismatchError):
            table.aggregate("func", namespace=other, key="at")
        func = table.aggregate("func", namespace=org_of, key="at")
        with db.write() as tx:
            table.insert(tx, {"org": 1, "status": "a", "at": 2, "v": 3, "void": False}, id=2)
        with db.read() as tx:
            assert func.count(tx, namespace=1) == 2
            assert fields.totals(tx, namespace=1).as_dict() == {"count": 2, "v": 5}
            assert db.aggregate("fields") is fields
        with db.write() as tx, pytest.raises(tallytree.TransactionError, match="maintained"):
            db.aggregate("func").insert(tx, 1, 1)


def test_an_aggregate_attached_by_another_process_is_maintained(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        table.aggregate("first", key="k")
        with db.write() as tx:
            table.insert(tx, {"k": 1}, id=1)
        script = textwrap.dedent(
            f"""
            import tallytree
            with tallytree.open({str(path)!r}, durable=False) as db:
                db.table("t").aggregate("second", key="k", values=("k",))
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True)
        with db.write() as tx:
            table.insert(tx, {"k": 2}, id=2)
        second = table.aggregate("second")
        with db.read() as tx:
            assert second.totals(tx).as_dict() == {"count": 2, "k": 3}
            assert tallytree.verify(tx, second, table).ok


# ---------------------------------------------------------------- function definitions in a new process

_REOPEN_SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    import tallytree

    def field_of(field, doc):
        return doc[field]

    def other_field_of(field, doc):  # the same name, other code
        return doc.get(field)

    other_field_of.__qualname__ = "field_of"

    def field_in(doc, field):
        return doc[field]

    class Field:
        def __init__(self, field):
            self.field = field

        def __call__(self, doc):
            return doc[self.field]

        def of(self, doc):
            return doc[self.field]

    class OtherField(Field):  # the same names, other code
        def __call__(self, doc):
            return doc.get(self.field)

        def of(self, doc):
            return doc.get(self.field)

    OtherField.__name__ = OtherField.__qualname__ = "Field"
    OtherField.of.__qualname__ = "Field.of"

    class SubField(Field):  # the same code, another class
        pass

    class Slotted:
        __slots__ = ("field",)

        def __init__(self, field):
            self.field = field

        def __call__(self, doc):
            return doc[self.field]

    def open_or_paid(doc):  # a frozenset of str constant: its order depends on the hash seed
        return doc["status"] in {"open", "paid", "late"}

    SAME = {
        "partial": {"key": functools.partial(field_of, "at")},
        "nested": {"key": functools.partial(functools.partial(field_in), field="at")},
        "object": {"key": Field("at")},
        "slotted": {"key": Slotted("at")},
        "method": {"key": Field("at").of},
        "where": {"key": "at", "where": open_or_paid},
    }
    OTHER = [
        ("partial", {"key": functools.partial(field_of, "day")}),
        ("partial", {"key": functools.partial(other_field_of, "at")}),
        ("nested", {"key": functools.partial(functools.partial(field_in), field="day")}),
        ("object", {"key": Field("day")}),
        ("object", {"key": OtherField("at")}),
        ("slotted", {"key": Slotted("day")}),
        ("method", {"key": OtherField("at").of}),
        ("method", {"key": SubField("at").of}),
    ]
    path, step = sys.argv[1], sys.argv[2]
    with tallytree.open(path, durable=False) as db:
        table = db.table("docs")
        if step == "other":
            refused = []
            for name, definition in OTHER:
                try:
                    table.aggregate(name, **definition)
                    refused.append([name, None])
                except tallytree.SchemaMismatchError as exc:
                    refused.append([name, str(exc)])
            print(json.dumps(refused))
        else:
            aggregates = {name: table.aggregate(name, **definition) for name, definition in SAME.items()}
            with db.write() as tx:
                table.insert(tx, {"at": 1, "day": 2, "status": "open"})
            with db.read() as tx:
                print(json.dumps({name: aggregate.count(tx) for name, aggregate in aggregates.items()}))
    """
)


def test_partials_callable_objects_and_methods_reattach_in_a_new_process_and_others_are_refused(
    tmp_path: Path,
) -> None:
    # a fresh process has other memory addresses (which a repr holds) and, with another hash seed,
    # another order for a frozenset of strings: what a fingerprint must not depend on
    script = tmp_path / "extractors.py"
    script.write_text(_REOPEN_SCRIPT)
    path = tmp_path / "db"

    def run(step: str, seed: str) -> Any:
        result = subprocess.run(
            [sys.executable, str(script), str(path), step],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    kinds = ["partial", "nested", "object", "slotted", "method", "where"]
    assert run("create", "1") == dict.fromkeys(kinds, 1)
    assert run("same", "2") == dict.fromkeys(kinds, 2)  # every one reattached, and maintained
    refused = run("other", "3")
    kinds_refused = ["partial", "partial", "nested", "object", "object", "slotted", "method", "method"]
    assert [name for name, _ in refused] == kinds_refused
    for name, message in refused:
        assert message is not None, f"a different {name} extractor was accepted"
        assert "stored with a different definition" in message
    assert "functools.partial(__main__.field_of)" in refused[0][1]  # names what the partial wraps


def _field_of(field: str, doc: dict[str, Any]) -> Any:
    return doc[field]


def test_an_extraction_error_names_the_function_a_partial_wraps(db: tallytree.Database) -> None:
    table = db.table("t")
    table.aggregate("a", key=functools.partial(_field_of, "at"))
    with (
        pytest.raises(tallytree.ExtractionError, match=r"function functools\.partial\([\w.]*_field_of\)"),
        db.write() as tx,
    ):
        table.insert(tx, {"day": 1})


def _golden_key(doc: dict[str, Any], scale: int = 2) -> Any:
    """Databases store the fingerprint of a function like this one: it must not change."""
    return tuple(doc[name] * scale for name in ("at", "v") if doc.get(name) in {1, 2, 8}) or None


def _golden_closure(field: str) -> Callable[[dict[str, Any]], Any]:
    def key(doc: dict[str, Any]) -> Any:
        return (doc[field], 1.5, b"x", None)

    return key


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="golden values of Python 3.11 bytecode")
def test_fingerprints_of_plain_functions_and_builtins_are_unchanged() -> None:
    # Golden values, computed once under Python 3.11 with the _fingerprint of tallytree before partials,
    # callable objects and bound methods had fingerprints of their own (`git show
    # 9b02f0b:src/tallytree/_extract.py`, applied to these same functions): databases created then store
    # them, and must reattach.
    assert _extract._fingerprint(_golden_key) == "35b0ce18d57030bc"
    assert _extract._fingerprint(_golden_closure("at")) == "b619581fba49bc85"
    assert _extract._fingerprint(lambda doc: doc["org"]) == "53ddaada1234b04b"
    assert _extract._fingerprint(operator.itemgetter("org", "day")) == "7f4af7038ab046df"
    assert _extract._fingerprint(len) == "a581f2ee9214df62"


def test_a_script_s_function_reattaches_when_the_script_is_imported(tmp_path: Path) -> None:
    # The same code is __main__.shop_of when run and stats_defs.shop_of when imported: one function.
    shop_of = "def shop_of(doc):\n    return doc['shop'].lower()\n"
    (tmp_path / "stats_defs.py").write_text(
        "import os, sys, tallytree\n"
        + shop_of
        + "with tallytree.open(sys.argv[1] if __name__ == '__main__' else os.environ['STATS_DB']) as db:\n"
        "    orders = db.table('orders')\n"
        "    orders.aggregate('by_shop', namespace=shop_of, key='day')\n"
        "    with db.write() as tx:\n"
        "        orders.insert(tx, {'shop': 'A', 'day': len(list(orders.ids(tx)))})\n"
    )
    db_path = tmp_path / "db"
    subprocess.run([sys.executable, str(tmp_path / "stats_defs.py"), str(db_path)], check=True)
    imported = subprocess.run(
        [sys.executable, "-c", "import stats_defs"],
        check=False,
        cwd=tmp_path,
        env={**os.environ, "STATS_DB": str(db_path)},
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr
    with tallytree.open(db_path) as db:
        orders = db.table("orders")
        by_shop = orders.aggregate("by_shop", namespace=_compiled(shop_of, "elsewhere"), key="day")
        with db.read() as tx:
            assert by_shop.count(tx, namespace="a") == 2
        with pytest.raises(tallytree.SchemaMismatchError):  # the same name, other code
            orders.aggregate("by_shop", namespace=_compiled(shop_of.replace("lower", "upper")), key="day")


def _compiled(source: str, module: str = "elsewhere") -> Any:
    """The one function ``source`` defines, compiled in a module of another name."""
    scope: dict[str, Any] = {"__name__": module}
    exec(compile(source, "<test>", "exec"), scope)
    [function] = (value for name, value in scope.items() if not name.startswith("__"))
    return function


def test_keyword_only_defaults_count_in_a_fingerprint() -> None:
    def at_field(doc: Any, *, field: str = "at") -> Any:
        return doc[field]

    def day_field(doc: Any, *, field: str = "day") -> Any:
        return doc[field]

    day_field.__code__ = at_field.__code__  # the same code: only the keyword-only default differs
    assert _extract._fingerprint(at_field) != _extract._fingerprint(day_field)
    day_field.__kwdefaults__ = {"field": "at"}
    assert _extract._fingerprint(at_field) == _extract._fingerprint(day_field)


# ---------------------------------------------------------------- long random sequences: zero drift

Doc = dict[str, Any]


def _random_doc(rng: random.Random) -> Doc:
    doc: Doc = {
        "org": rng.choice([1, 2, 3, "x"]),
        "status": rng.choice(["open", "paid", "void"]),
        "at": rng.randrange(50),
        "cost": rng.choice([0.1, 0.25, 1.5, 3]),
        "tokens": rng.randrange(100),
    }
    if rng.random() < 0.3:
        del doc["tokens"]
    if rng.random() < 0.2:
        doc["flag"] = rng.random() < 0.5
    return doc


def _attach_all(table: tallytree.Table, node_size: int) -> list[tuple[tallytree.Aggregate, dict[str, Any]]]:
    """Four aggregates covering every extractor kind, with their brute-force definitions."""
    return [
        (
            table.aggregate(
                "by_status", namespace="org", key="status", values=("cost",), node_size=node_size
            ),
            {"key": lambda d: d["status"], "namespace": lambda d: d["org"], "values": lambda d: (d["cost"],)},
        ),
        (
            table.aggregate("timeline", key=("status", "at"), where={"flag": True}, node_size=node_size),
            {"key": lambda d: (d["status"], d["at"]), "where": lambda d: d.get("flag") is True},
        ),
        (
            table.aggregate(
                "tokens",
                namespace=lambda d: ("org", d["org"]),
                key="at",
                values={"tokens": "tokens", "double": lambda d: 2 * d["tokens"]},
                on_missing="skip",
                node_size=node_size,
            ),
            {
                "key": lambda d: d["at"],
                "namespace": lambda d: ("org", d["org"]),
                "values": lambda d: (d["tokens"], 2 * d["tokens"]),
                "where": lambda d: "tokens" in d,
            },
        ),
        (
            table.aggregate("live", key="at", where=lambda d: d["status"] != "void", node_size=node_size),
            {"key": lambda d: d["at"], "where": lambda d: d["status"] != "void"},
        ),
    ]


def _check_all(
    tx: tallytree.Transaction,
    table: tallytree.Table,
    attached: list[tuple[tallytree.Aggregate, dict[str, Any]]],
    docs: dict[Any, Doc],
) -> None:
    assert table.count(tx) == len(docs)
    assert dict(table.items(tx)) == docs
    for aggregate, brute in attached:
        assert strict(held_items(tx, aggregate)) == strict(expected_items(docs, **brute)), aggregate.name
        drift = tallytree.verify(tx, aggregate, table)
        assert drift.ok, str(drift)


def _random_writes(
    rng: random.Random,
    tx: tallytree.WriteTransaction,
    table: tallytree.Table,
    docs: dict[Any, Doc],
    steps: int,
) -> None:
    for _ in range(steps):
        operation = rng.random()
        ids = list(docs)
        if operation < 0.3 or not ids:
            doc = _random_doc(rng)
            doc_id = table.insert(tx, doc, id=rng.choice([None, f"s{rng.randrange(10**6)}"]))
            docs[doc_id] = doc
        elif operation < 0.5:
            doc_id = rng.choice(ids)
            patch = {field: value for field, value in _random_doc(rng).items() if rng.random() < 0.5}
            remove = ["flag"] if rng.random() < 0.2 else []
            docs[doc_id] = table.update(tx, doc_id, patch, remove=remove)
        elif operation < 0.6:
            doc_id = rng.choice(ids)
            docs[doc_id] = _random_doc(rng)
            table.replace(tx, doc_id, docs[doc_id])
        elif operation < 0.7:
            doc_id = rng.choice([*ids, "fresh" + str(rng.randrange(100))])
            docs[doc_id] = _random_doc(rng)
            table.upsert(tx, doc_id, docs[doc_id])
        elif operation < 0.82:
            doc_id = rng.choice(ids)
            table.delete(tx, doc_id)
            del docs[doc_id]
        elif operation < 0.9:
            batch = [_random_doc(rng) for _ in range(rng.randrange(1, 20))]
            for doc_id, doc in zip(table.insert_many(tx, batch), batch, strict=True):
                docs[doc_id] = doc
        elif operation < 0.95:
            namespace = rng.choice([1, 2, 3, "x"])
            status = rng.choice(["open", "paid"])
            table.delete_range(tx, "by_status", namespace=namespace, eq=status)
            for doc_id in [i for i, d in docs.items() if d["org"] == namespace and d["status"] == status]:
                del docs[doc_id]
        else:
            doc_id = rng.choice(ids)
            bad = dict(docs[doc_id])
            bad["status"] = ["not", {"a": "key"}]
            with pytest.raises(tallytree.ExtractionError):
                table.replace(tx, doc_id, bad)


@pytest.mark.parametrize("seed", range(3))
def test_long_random_sequences_never_drift(db: tallytree.Database, seed: int) -> None:
    rng = random.Random(seed)
    table = db.table("t")
    with db.write() as tx:  # some documents before the aggregates are attached
        docs = {}
        for _ in range(50):
            doc = _random_doc(rng)
            docs[table.insert(tx, doc)] = doc
    attached = _attach_all(table, node_size=rng.choice([4, 5, 8]))
    for _ in range(6):
        with db.write() as tx:
            _random_writes(rng, tx, table, docs, 250)
            _check_all(tx, table, attached, docs)
        with db.read() as tx:
            _check_all(tx, table, attached, docs)
            assert not tallytree.check(tx)


def _table_state(db: tallytree.Database, table: tallytree.Table, tx: tallytree.Transaction) -> Any:
    """What a user sees of a table inside ``tx``: its documents, its count and every aggregate."""
    return strict(dict(table.items(tx))), table.count(tx), snapshot(db, tx)


def test_delete_range_writes_nothing_when_an_extractor_raises(db: tallytree.Database) -> None:
    """Found by an audit: the documents before the failing one were deleted, and their items."""
    logs = db.table("logs")
    by_day = logs.aggregate("by_day", key="day")

    down = {"day": 0}

    def region(doc: dict[str, Any]) -> str:
        if doc["day"] == down["day"]:
            raise RuntimeError("the region service is down")
        return "eu"

    logs.aggregate("by_region", key=region)
    with db.write() as tx:
        logs.insert_many(tx, [{"day": day} for day in range(1, 6)])
    down["day"] = 3  # the third document of the range fails
    with db.write() as tx:
        before = _table_state(db, logs, tx)
        with pytest.raises(tallytree.ExtractionError, match="region service"):
            logs.delete_range(tx, by_day, lt=5)
        assert _table_state(db, logs, tx) == before  # the caller may go on and commit
    down["day"] = 0
    with db.read() as tx:
        assert _table_state(db, logs, tx) == before
        assert all(tallytree.verify(tx, logs.aggregate(name), logs).ok for name in logs.aggregates())


def test_delete_range_refuses_an_aggregate_that_drifted(db: tallytree.Database) -> None:
    """As delete() does: an item its definition gives but the aggregate lacks is drift, which
    delete_range used to pass over, leaving the other items behind."""
    logs = db.table("logs")
    by_day = logs.aggregate("by_day", key="day")
    shift = {"n": 0}
    logs.aggregate("impure", key=lambda doc: doc["day"] + shift["n"])  # reads outside the document
    with db.write() as tx:
        logs.insert_many(tx, [{"day": day} for day in range(1, 6)])
    shift["n"] = 100
    with db.write() as tx:
        before = _table_state(db, logs, tx)
        with pytest.raises(tallytree.ItemNotFoundError, match="'impure' does not hold"):
            logs.delete_range(tx, by_day, lt=4)
        assert _table_state(db, logs, tx) == before


def test_insert_many_with_updates_writes_nothing_when_an_update_meets_drift(db: tallytree.Database) -> None:
    """Found by an audit: the batch's new documents stayed written (and the updates before the
    failing one stayed made)."""
    table = db.table("t")
    shift = {"n": 0}
    table.aggregate("by_k", key=lambda doc: doc["k"] + shift["n"] * (doc["k"] > 1), values=("v",))
    with db.write() as tx:
        table.insert(tx, {"k": 1, "v": 1}, id=1)
        table.insert(tx, {"k": 2, "v": 2}, id=2)
    shift["n"] = 100  # document 2's item has drifted; document 1's has not
    with db.write() as tx:
        before = _table_state(db, table, tx)
        batch = [(3, {"k": 0, "v": 3}), (1, {"k": 1, "v": 10}), (2, {"k": 5, "v": 20})]
        with pytest.raises(tallytree.ItemNotFoundError, match="'by_k' does not hold"):
            table.insert_many(tx, batch, on_duplicate="update")
        assert _table_state(db, table, tx) == before


def test_where_mapping_tells_bools_from_numbers(db: tallytree.Database) -> None:
    """``{"test": False}`` matches False only, not 0 or 0.0; ``{"n": 0}`` matches 0 and 0.0, not
    False (found by an audit: Python's == made them equal)."""
    loads = db.table("loads")
    real = loads.aggregate("real", key="at", where={"test": False})
    zero = loads.aggregate("zero", key="at", where={"n": 0})
    docs = [
        {"at": 1, "test": False, "n": 0},
        {"at": 2, "test": 0, "n": False},
        {"at": 3, "test": 0.0, "n": 0.0},
        {"at": 4, "test": True, "n": 1},
    ]
    with db.write() as tx:
        loads.insert_many(tx, docs)
    with db.read() as tx:
        assert [item.key for item in real.items(tx)] == [1]
        assert [item.key for item in zero.items(tx)] == [1, 3]
        assert tallytree.verify(tx, real, loads).ok and tallytree.verify(tx, zero, loads).ok


@pytest.mark.parametrize("write", ["insert", "upsert", "update", "replace", "insert_many"])
def test_a_document_with_a_tuple_as_dict_key_is_refused(db: tallytree.Database, write: str) -> None:
    """msgpack packs such a key but cannot unpack it (it comes back a list): InvalidDocumentError,
    not a bare TypeError, and nothing written."""
    table = db.table("t")
    table.aggregate("by_k", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1}, id=1)
    bad = {"k": 2, "grid": {(1, 2): 3}}
    calls: dict[str, Callable[[tallytree.WriteTransaction], object]] = {
        "insert": lambda tx: table.insert(tx, bad, id=2),
        "upsert": lambda tx: table.upsert(tx, 1, bad),
        "update": lambda tx: table.update(tx, 1, {"grid": {(1, 2): 3}}),
        "replace": lambda tx: table.replace(tx, 1, bad),
        "insert_many": lambda tx: table.insert_many(tx, [{"k": 3}, bad]),
    }
    with db.write() as tx:
        before = _table_state(db, table, tx)
        with pytest.raises(tallytree.InvalidDocumentError, match="tuple"):
            calls[write](tx)
        assert _table_state(db, table, tx) == before


def test_delete_range_in_random_sequences_matches_brute_force(db: tallytree.Database) -> None:
    rng = random.Random(11)
    table = db.table("t")
    attached = _attach_all(table, node_size=4)
    docs: dict[Any, Doc] = {}
    with db.write() as tx:
        for _ in range(300):
            doc = _random_doc(rng)
            docs[table.insert(tx, doc)] = doc
        for _ in range(10):
            namespace = rng.choice([1, 2, 3, "x"])
            status = rng.choice(["open", "paid", "void"])
            table.delete_range(tx, "by_status", namespace=namespace, eq=status)
            docs = {i: d for i, d in docs.items() if not (d["org"] == namespace and d["status"] == status)}
            _check_all(tx, table, attached, docs)


class TableMachine(RuleBasedStateMachine):
    """Hypothesis: random table writes against a dict of documents; aggregates must match brute force."""

    def __init__(self) -> None:
        super().__init__()
        self.db = tallytree.open_memory()
        self.table = self.db.table("t")
        self.docs: dict[Any, Doc] = {}
        self.attached: list[tuple[tallytree.Aggregate, dict[str, Any]]] = []

    @initialize(node_size=st.integers(4, 9))
    def attach(self, node_size: int) -> None:
        self.attached = _attach_all(self.table, node_size)

    docs_strategy = st.fixed_dictionaries(
        {
            "org": st.sampled_from([1, 2, "x"]),
            "status": st.sampled_from(["open", "paid", "void"]),
            "at": st.integers(0, 20),
            "cost": st.sampled_from([0.1, 0.2, 1, 2**40]),
        },
        optional={"tokens": st.integers(0, 10), "flag": st.booleans()},
    )

    @rule(doc=docs_strategy, doc_id=st.one_of(st.none(), st.integers(0, 30), st.text(max_size=2)))
    def insert(self, doc: Doc, doc_id: Any) -> None:
        with self.db.write() as tx:
            if doc_id is not None and doc_id in self.docs:
                with pytest.raises(tallytree.DuplicateItemError):
                    self.table.insert(tx, doc, id=doc_id)
                return
            self.docs[self.table.insert(tx, doc, id=doc_id)] = doc

    @rule(data=st.data(), patch=docs_strategy)
    def update(self, data: st.DataObject, patch: Doc) -> None:
        if not self.docs:
            return
        doc_id = data.draw(st.sampled_from(sorted(self.docs, key=repr)))
        with self.db.write() as tx:
            self.docs[doc_id] = self.table.update(tx, doc_id, patch)

    @rule(data=st.data(), doc=docs_strategy)
    def replace(self, data: st.DataObject, doc: Doc) -> None:
        if not self.docs:
            return
        doc_id = data.draw(st.sampled_from(sorted(self.docs, key=repr)))
        with self.db.write() as tx:
            self.table.replace(tx, doc_id, doc)
        self.docs[doc_id] = doc

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.docs:
            return
        doc_id = data.draw(st.sampled_from(sorted(self.docs, key=repr)))
        with self.db.write() as tx:
            self.table.delete(tx, doc_id)
        del self.docs[doc_id]

    @rule(docs=st.lists(docs_strategy, max_size=8))
    def insert_many(self, docs: list[Doc]) -> None:
        with self.db.write() as tx:
            ids = self.table.insert_many(tx, docs)
        self.docs.update(zip(ids, docs, strict=True))

    @rule(before=st.lists(docs_strategy, max_size=4), after=st.lists(docs_strategy, max_size=4))
    def clear(self, before: list[Doc], after: list[Doc]) -> None:
        with self.db.write() as tx:  # inserts queued before the clear, and writes after it
            self.table.insert_many(tx, before)
            assert self.table.clear(tx) == len(self.docs) + len(before)
            ids = self.table.insert_many(tx, after)
        self.docs = dict(zip(ids, after, strict=True))

    @invariant()
    def in_sync(self) -> None:
        if not self.attached:
            return
        with self.db.read() as tx:
            _check_all(tx, self.table, self.attached, self.docs)
            assert not tallytree.check(tx)

    def teardown(self) -> None:
        self.db.close()


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------- hooks share the extractors


def test_change_handler_matches_a_table_on_the_same_writes(db: tallytree.Database) -> None:
    rng = random.Random(5)
    table = db.table("t")
    table.aggregate("table_view", namespace="org", key="status", values=("cost",))
    hooks = ChangeHandler(db)
    external = hooks.aggregate("external_view", namespace="org", key="status", values=("cost",))
    docs: dict[Any, Doc] = {}
    with db.write() as tx:
        for _ in range(400):
            if docs and rng.random() < 0.4:
                doc_id = rng.choice(list(docs))
                if rng.random() < 0.5:
                    new = table.update(tx, doc_id, {"status": rng.choice(["open", "paid"])})
                    hooks.apply(tx, Change.update(doc_id, docs[doc_id], new))
                    docs[doc_id] = new
                else:
                    hooks.apply(tx, Change.delete(doc_id, table.delete(tx, doc_id)))
                    del docs[doc_id]
            else:
                doc = _random_doc(rng)
                doc_id = table.insert(tx, doc)
                hooks.apply(tx, Change.insert(doc_id, doc))
                docs[doc_id] = doc
        table_view = table.aggregate("table_view")
        assert [(ns, t.as_dict()) for ns, t in table_view.namespaces(tx)] == [
            (ns, t.as_dict()) for ns, t in external.namespaces(tx)
        ]
        assert tallytree.verify(tx, external, table).ok
        assert tallytree.verify(tx, external, [(i, d) for i, d in table.items(tx)]).ok


def test_json_roundtrip_of_documents_is_what_get_returns(db: tallytree.Database) -> None:
    table = db.table("t")
    doc = {"a": [1, 2, {"b": None}], "c": b"\x00", "d": 1.5, "e": True, "f": "é"}
    with db.write() as tx:
        table.insert(tx, doc, id=b"raw")
    with db.read() as tx:
        assert table.get(tx, b"raw") == doc
        assert json.dumps(Counter(type(v).__name__ for v in table.get(tx, b"raw").values()))  # type: ignore[union-attr]


def test_iterating_a_table_is_lazy(db: tallytree.Database) -> None:
    table = db.table("t")
    with db.write() as tx:
        table.insert_many(tx, [{"n": i} for i in range(100)])
    with db.read() as tx:
        iterator: Iterator[Any] = table.items(tx)
        assert next(iterator) == (1, {"n": 0})


def test_where_mappings_with_tuples_reattach(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        db.table("t").aggregate("a", key="k", where={"pair": (1, 2)})
    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        assert table.aggregate("a", key="k", where={"pair": (1, 2)}) is table.aggregate("a")
        with db.write() as tx:
            table.insert(tx, {"k": 1, "pair": (1, 2)}, id=1)
            table.insert(tx, {"k": 2, "pair": (2, 1)}, id=2)
        with db.read() as tx:
            assert [item.id for item in table.aggregate("a").items(tx)] == [1]
        with pytest.raises(TypeError, match="cannot be stored"):
            table.aggregate("b", key="k", where={"x": object()})


def test_where_mapping_compares_like_stored_documents(db: tallytree.Database) -> None:
    table = db.table("t")
    agg = table.aggregate("a", key="k", where={"pair": (1, 2)})
    with db.write() as tx:
        table.insert(tx, {"k": 1, "pair": (1, 2)}, id=1)
        table.insert(tx, {"k": 2, "pair": [1, 2]}, id=2)
        assert [item.id for item in agg.items(tx)] == [1, 2]


def test_an_aggregate_opened_before_another_process_attached_it_becomes_read_only(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        db.table("t")
        with pytest.raises(tallytree.AggregateNotFoundError):
            db.aggregate("later", create=False)
        script = textwrap.dedent(
            f"""
            import tallytree
            with tallytree.open({str(path)!r}, durable=False) as db:
                db.table("t").aggregate("later", key="k")
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True)
        later = db.aggregate("later")
        with db.write() as tx:
            db.table("t").insert(tx, {"k": 1}, id=1)  # the write transaction reloads the definitions
            with pytest.raises(tallytree.TransactionError, match="maintained"):
                later.insert(tx, 2, 2)
            assert later.count(tx) == 1


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize("backend", ["memory", "lmdb"])
def test_document_batches_equal_the_document_scan(tmp_path: Path, backend: str, size: int) -> None:
    db = tallytree.open_memory() if backend == "memory" else tallytree.open(tmp_path / "db", durable=False)
    first, second = db.table("first"), db.table("second")  # a second table bounds the first's range
    with db.write() as tx:
        first.insert_many(tx, [{"id": n, "v": n} for n in range(20)])
        second.insert_many(tx, [{"id": n, "v": -n} for n in range(5)])
    start, stop = first._prefix, first._stop
    with db.read() as tx:
        expected = list(tx.docs(start, stop))
        batches = list(tx.doc_batches(start, stop, size))
    assert len(expected) == 20 and [entry for batch in batches for entry in batch] == expected
    assert all(0 < len(batch) <= size for batch in batches)
    with db.write() as tx:  # the transaction's own writes are merged in
        first.delete(tx, 3)
        first.insert(tx, {"id": 99, "v": 1})
        merged = list(tx.docs(start, stop))
        assert [entry for batch in tx.doc_batches(start, stop, size) for entry in batch] == merged
        assert len(merged) == 20


def test_a_definition_shows_its_extractors(db: tallytree.Database) -> None:
    def cents(doc: dict[str, Any]) -> int:
        return int(doc["amount"] * 100)

    table = db.table("invoices")
    table.aggregate(
        "open_by_org", namespace="org", key="due", values={"cents": cents}, where={"state": "open"}
    )
    table.aggregate("by_day", key=("day", "hour"), on_missing="skip")
    shown = repr(table.definition("open_by_org"))
    assert shown.startswith("<Definition 'open_by_org' key='due' namespace='org' values={'cents': ")
    assert "cents" in shown.split("values=")[1] and "where={'state': 'open'}" in shown
    assert repr(table.definition("by_day")) == (
        "<Definition 'by_day' key=('day', 'hour') namespace=None values={} on_missing='skip'>"
    )


def test_items_in_reverse_are_the_items_reversed_in_every_transaction(db: tallytree.Database) -> None:
    """Streamed from a reverse scan (read transactions, or a write transaction that has not written to
    the table), or collected (one that has): the same documents, within the table's own bounds."""
    before, table, after = db.table("a"), db.table("b"), db.table("c")
    with db.write() as tx:
        before.insert_many(tx, [{"n": n} for n in range(5)])
        table.insert_many(tx, [({"n": n}) for n in range(50)] + [{"n": "s"}])
        table.insert(tx, {"n": "named"}, id="zz")
        after.insert_many(tx, [{"n": n} for n in range(5)])
    with db.read() as tx:
        forward = list(table.items(tx))
        assert list(table.items(tx, reverse=True)) == forward[::-1] and len(forward) == 52
    with db.write() as tx:
        assert list(table.items(tx, reverse=True)) == forward[::-1]  # nothing written yet: streamed
        table.delete(tx, 3)
        table.insert(tx, {"n": "new"}, id="m")
        changed = list(table.items(tx))
        assert list(table.items(tx, reverse=True)) == changed[::-1]
        assert ("m", {"n": "new"}) in changed and all(doc_id != 3 for doc_id, _ in changed)


# ================================================================== stale objects and bad arguments


def test_a_table_dropped_and_created_again_by_another_process_refuses_the_old_object(tmp_path: Path) -> None:
    """The old object wrote its documents under the dropped table's id (records nothing ever deletes)
    and its items into the new table's aggregate, which then held items for no document."""
    path = tmp_path / "db"
    with tallytree.open(path, durable=False) as db:
        table = db.table("t")
        table.aggregate("a", key="k", values=("v",))
        with db.write() as tx:
            table.insert(tx, {"k": 1, "v": 1}, id=1)
        script = textwrap.dedent(
            f"""
            import tallytree
            with tallytree.open({str(path)!r}, durable=False) as db:
                db.drop_table("t")
                db.table("t").aggregate("a", key="k", values=("v",))
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True)
        before = snapshot(db)
        with pytest.raises(tallytree.TransactionError, match="dropped and created again"), db.write() as tx:
            table.insert(tx, {"k": 50, "v": 1})
        assert snapshot(db) == before
        fresh = db.table("t")
        with db.write() as tx:
            fresh.insert(tx, {"k": 50, "v": 1})
        with db.read() as tx:
            assert fresh.count(tx) == 1 and tallytree.check(tx) == []
            assert tallytree.verify(tx, fresh.aggregate("a"), fresh).ok


def test_an_aggregate_object_from_before_a_redefinition_raises_instead_of_reading_empty() -> None:
    db = tallytree.open_memory()
    table = db.table("t")
    old = table.aggregate("a", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1})
    new = table.aggregate("a", key="k", rebuild=True)
    with db.read() as tx:
        assert new.count(tx) == 1
        with pytest.raises(tallytree.TransactionError, match="was redefined"):
            old.count(tx)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t, tx: t.insert_many(tx, 5), tallytree.ArgumentTypeError, "iterable of documents"),
        (lambda t, tx: t.update(tx, 1, {}, remove="note"), tallytree.ArgumentTypeError, "remove="),
        (lambda t, tx: t.update(tx, 1, {}, remove=5), tallytree.ArgumentTypeError, "remove="),
        (lambda t, tx: t.delete_range(tx, 5), tallytree.ArgumentTypeError, "attached aggregate or its name"),
        (lambda t, tx: t.delete_range(tx, "a", export=5), tallytree.ArgumentTypeError, "export="),
        (lambda t, tx: t.insert(None, {"k": 1}), tallytree.ArgumentTypeError, "is a transaction"),
        (lambda t, tx: t.get("tx", 1), tallytree.ArgumentTypeError, "is a transaction"),
    ],
)
def test_bad_table_arguments_raise_typed_errors_and_change_nothing(
    call: Callable[[Any, Any], Any], error: type[Exception], match: str
) -> None:
    """An audit found each of these escaping as a raw TypeError, AttributeError or ValueError (and
    ``remove="note"`` removing the fields n, o, t and e)."""
    db = tallytree.open_memory()
    table = db.table("t")
    table.aggregate("a", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1, "n": 1, "o": 1, "note": "x"}, id=1)
    before = snapshot(db)
    tables = db.tables()
    with pytest.raises(error, match=match), db.write() as tx:
        call(table, tx)
    assert snapshot(db) == before and db.tables() == tables and db.aggregates() == ["a"]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"key": 5}, tallytree.ArgumentTypeError, "key="),
        ({"key": ()}, tallytree.ArgumentTypeError, "key="),
        ({"key": "k", "namespace": 3.5}, tallytree.ArgumentTypeError, "namespace="),
        ({"key": "k", "where": 5}, tallytree.ArgumentTypeError, "where="),
        ({"key": "k", "where": {1: 2}}, tallytree.ArgumentTypeError, "where="),
        ({"key": "k", "where": {"a": {1}}}, tallytree.ArgumentTypeError, "where="),
        ({"key": "k", "values": {"x": 5}}, tallytree.ArgumentTypeError, "values"),
        ({"key": "k", "on_missing": "x"}, tallytree.InvalidArgumentError, "on_missing"),
    ],
)
def test_bad_definitions_raise_typed_errors_and_attach_nothing(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    db = tallytree.open_memory()
    table = db.table("t")
    with db.write() as tx:
        table.insert(tx, {"k": 1}, id=1)
    with pytest.raises(error, match=match):
        table.aggregate("b", **options)
    assert db.aggregates() == [] and table.aggregates() == []


def test_upsert_of_the_same_fields_in_another_order_is_unchanged_but_a_type_change_is_not() -> None:
    db = tallytree.open_memory()
    table = db.table("t")
    totals = table.aggregate("a", key="k", values=("v",))
    with db.write() as tx:
        assert table.upsert(tx, 1, {"k": 1, "v": 2, "m": {"x": 1, "y": [1, {"p": 1, "q": 2}]}}) == "inserted"
    with db.write() as tx:
        reordered = {"m": {"y": [1, {"q": 2, "p": 1}], "x": 1}, "v": 2, "k": 1}
        assert table.upsert(tx, 1, reordered) == "unchanged"
        assert not tx.changed  # nothing written
        assert table.upsert(tx, 1, {"k": 1, "v": 2.0, "m": {"x": 1, "y": [1, {"p": 1, "q": 2}]}}) == "updated"
    with db.read() as tx:
        assert table.get(tx, 1)["v"] == 2.0 and type(table.get(tx, 1)["v"]) is float
        assert totals.totals(tx).as_dict() == {"count": 1, "v": 2.0}


def test_a_write_that_finds_its_aggregate_drifted_raises_and_writes_nothing() -> None:
    """A key function that reads something besides the document (here a global factor, changed after
    the items were written) gives an old item the aggregate does not hold. The write used to skip the
    missing item silently and insert the new one: two items for one document, which check() cannot
    see. Now it raises, and the aggregates moved before the drifted one are moved back."""
    factor = [1]
    db = tallytree.open_memory()
    table = db.table("t")
    plain = table.aggregate("plain", key="k", values=("v",))
    scaled = table.aggregate("scaled", key=lambda doc: doc["k"] * factor[0], values=("v",))
    with db.write() as tx:
        for n in range(3):
            table.insert(tx, {"k": n, "v": n + 1}, id=n)
    factor[0] = 10
    before = snapshot(db)
    for write in (
        lambda tx: table.update(tx, 2, {"k": 5}),
        lambda tx: table.replace(tx, 1, {"k": 7, "v": 9}),
        lambda tx: table.delete(tx, 2),
        lambda tx: table.upsert(tx, 1, {"k": 1, "v": 4}),
    ):
        with pytest.raises(tallytree.ItemNotFoundError, match="drifted"), db.write() as tx:
            write(tx)
        assert snapshot(db) == before
    with db.write() as tx:  # caught inside the transaction: the transaction goes on unchanged
        with pytest.raises(tallytree.ItemNotFoundError, match="drifted"):
            table.update(tx, 2, {"k": 5})
        assert snapshot(db, tx) == before
        assert table.get(tx, 2) == {"k": 2, "v": 3}
    factor[0] = 1  # the definition behaves as when the items were written: writes work again
    with db.write() as tx:
        table.update(tx, 2, {"k": 5})
    with db.read() as tx:
        assert plain.count(tx, eq=5) == scaled.count(tx, eq=5) == 1
        assert tallytree.verify(tx, scaled, table).ok and tallytree.check(tx) == []


def test_a_write_onto_an_item_the_aggregate_already_holds_raises_and_writes_nothing() -> None:
    """The new item's place is taken by a stray item of the same document (planted here as a write
    that bypassed the table would): DuplicateItemError, and the old item, already removed, is put back
    with the values it had."""
    from tallytree._extract import move

    db = tallytree.open_memory()
    table = db.table("t")
    aggregate = table.aggregate("a", key="k", values=("v",))
    with db.write() as tx:
        table.insert(tx, {"k": 1, "v": 2}, id=1)
        coords = table._coordinates({"k": 5, "v": 9}, 1, tallytree._keys.encode_id(1))
        move(tx, aggregate, None, coords[0])  # a stray item of document 1 at key 5
    before = snapshot(db)
    with pytest.raises(tallytree.DuplicateItemError, match="drifted"), db.write() as tx:
        table.update(tx, 1, {"k": 5, "v": 3})
    assert snapshot(db) == before
    with db.read() as tx:
        assert aggregate.get(tx, 1, 1) == tallytree.Item(1, 1, (2,))


def test_aggregate_iteration_refuses_a_table_insert_into_its_namespace(db: tallytree.Database) -> None:
    """A table's insert is queued (deferred) and merged into the tree later: it is still a change of
    the namespace, which an aggregate's items() in progress must refuse, not miss."""
    table = db.table("t")
    agg = table.aggregate("a", key="k", namespace="ns", values=("v",))
    with db.write() as tx:
        table.insert_many(tx, [(i, {"k": i, "ns": "x", "v": 1}) for i in range(5)])
    with db.write() as tx:
        with pytest.raises(tallytree.TransactionError, match="during iteration"):
            for item in agg.items(tx, namespace="x"):
                table.insert(tx, {"k": item.key + 100, "ns": "x", "v": 1}, id=item.key + 100)
        seen = []
        for item in agg.items(tx, namespace="x"):  # another namespace changing is no change of this one
            seen.append(item.key)
            table.insert(tx, {"k": item.key, "ns": "y", "v": 1}, id=item.key + 200)
        assert seen == [0, 1, 2, 3, 4, 100]
        assert agg.count(tx, namespace="y") == 6


def test_delete_range_refuses_an_export_that_writes_to_the_table(db: tallytree.Database) -> None:
    """The range is found before export runs: a document export adds (or deletes) in the table would
    make the delete remove the wrong items. It is refused, and nothing is deleted."""
    logs = db.table("logs")
    by_day = logs.aggregate("by_day", key="day", values=("size",))
    by_kind = logs.aggregate("by_kind", key="kind", values=("size",))
    with db.write() as tx:
        logs.insert_many(tx, [(day, {"day": day, "size": 10, "kind": "raw"}) for day in range(1, 8)])

    def export(doc_id: Any, doc: Any) -> None:
        if doc_id == 1:  # a roll-up document inside the range being deleted
            logs.insert(tx, {"day": 0, "size": 0, "kind": "rollup"}, id="rollup")

    with db.write() as tx:
        with pytest.raises(tallytree.TransactionError, match="export wrote"):
            logs.delete_range(tx, by_day, lt=4, export=export)
        assert [doc_id for doc_id, _ in logs.items(tx)] == [1, 2, 3, 4, 5, 6, 7, "rollup"]
        for aggregate in (by_day, by_kind):
            assert tallytree.verify(tx, aggregate, logs).ok
        exported: list[Any] = []
        assert logs.delete_range(tx, by_day, lt=4, export=lambda i, d: exported.append(i)).count == 4
        assert exported == ["rollup", 1, 2, 3]
        assert tallytree.verify(tx, by_kind, logs).ok


def test_a_write_right_after_attaching_a_function_aggregate_sees_it(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread's write that begins the moment the attaching transaction commits (before
    ``aggregate()`` returns) finds the new aggregate attached with its function, not pending as if
    the table had been reopened."""
    table = db.table("t")
    with db.write() as tx:
        table.insert(tx, {"k": 1})
    commit = WriteTransaction.commit
    errors: list[BaseException] = []

    def write_from_another_thread() -> None:
        try:
            with db.write() as tx:
                table.insert(tx, {"k": 2})
        except BaseException as exc:  # reported below
            errors.append(exc)

    def commit_then_write(self: WriteTransaction) -> None:
        commit(self)
        monkeypatch.setattr(WriteTransaction, "commit", commit)  # once
        other = threading.Thread(target=write_from_another_thread)
        other.start()
        other.join()

    monkeypatch.setattr(WriteTransaction, "commit", commit_then_write)
    doubled = table.aggregate("doubled", key=lambda doc: 2 * doc["k"])
    assert errors == []
    with db.read() as tx:
        assert [item.key for item in doubled.items(tx)] == [2, 4]


def test_attaching_an_aggregate_whose_commit_fails_leaves_the_table_as_it_was(
    db: tallytree.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = db.table("t")
    table.aggregate("by_k", key="k")
    with db.write() as tx:
        table.insert(tx, {"k": 1})

    def fail(self: WriteTransaction) -> None:
        raise OSError("the disk failed")

    monkeypatch.setattr(WriteTransaction, "_commit", fail)
    with pytest.raises(OSError, match="disk"):
        table.aggregate("doubled", key=lambda doc: 2 * doc["k"])
    with pytest.raises(OSError, match="disk"):
        table.aggregate("by_k", key="k", values=("k",), rebuild=True)
    monkeypatch.undo()
    assert table.aggregates() == ["by_k"]
    assert db.aggregates() == ["by_k"]
    with db.write() as tx:
        table.insert(tx, {"k": 2})
    with db.read() as tx:
        assert table.definition("by_k").aggregate.count(tx) == 2
        with pytest.raises(tallytree.AggregateNotFoundError):
            db.aggregate("doubled", create=False)
