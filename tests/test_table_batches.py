"""Table batches: ``get_many``, ``update_many`` and ``delete_many`` against the same calls one by one.

The model is the table itself, written one call at a time (``get``, ``update``, ``delete``,
``discard``) in another database: a batch must leave exactly the state those calls leave, return what
they add up to, and raise the same error, but a batch that raises writes nothing (the one-by-one
reference runs in a transaction that the error aborts).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import pytest
from conftest import pure_python, snapshot, strict
from hypothesis import event, given, settings
from hypothesis import strategies as st

import tallytree
from tallytree._extract import move

Doc = dict[str, Any]
BAD = ["not", {"a": "key"}]  # stored fine, but no key: a list holding a dict (ExtractionError)


def attach(table: tallytree.Table, node_size: int) -> None:
    """Three aggregates: a namespace, a tuple key with a where= mapping, a where= function."""
    table.aggregate("by_status", namespace="org", key="status", values=("cost",), node_size=node_size)
    table.aggregate(
        "timeline",
        key=("status", "at"),
        values=("tokens",),
        where={"flag": True},
        on_missing="skip",
        node_size=node_size,
    )
    table.aggregate("live", key="at", where=lambda doc: doc["status"] != "void", node_size=node_size)


def state(db: tallytree.Database, table: tallytree.Table) -> Any:
    """What a user sees: every document (field order and types included), the count, every aggregate."""
    with db.read() as tx:
        docs = [(repr(doc_id), repr(list(doc.items()))) for doc_id, doc in table.items(tx)]
        return docs, table.count(tx), snapshot(db, tx)


def check(db: tallytree.Database, table: tallytree.Table) -> None:
    """The invariant checker finds nothing, and every aggregate holds what its table implies."""
    with db.read() as tx:
        assert tallytree.check(tx) == []
        for name in table.aggregates():
            drift = tallytree.verify(tx, table.aggregate(name), table)
            assert drift.ok, str(drift)


# ---------------------------------------------------------------- the one-by-one reference


def updates_one_by_one(
    tx: tallytree.WriteTransaction,
    table: tallytree.Table,
    pairs: list[tuple[Any, Any]],
    remove: Any,
    missing: str,
) -> int:
    changed = 0
    for doc_id, patch in pairs:
        before = table.get(tx, doc_id)
        if before is None and missing == "skip":
            continue
        after = table.update(tx, doc_id, patch, remove=remove)
        assert before is not None
        changed += repr(list(after.items())) != repr(list(before.items()))
    return changed


def deletes_one_by_one(
    tx: tallytree.WriteTransaction, table: tallytree.Table, ids: list[Any], missing: str
) -> int:
    if missing == "skip":
        return sum(table.discard(tx, doc_id) for doc_id in ids)
    for doc_id in ids:
        table.delete(tx, doc_id)
    return len(ids)


def outcome(run: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", the exception)``."""
    try:
        return "ok", run()
    except tallytree.Error as exc:
        return "error", exc


# ---------------------------------------------------------------- random batches


ids = st.one_of(st.integers(0, 14), st.sampled_from(["a", "b"]))
orgs = st.sampled_from([1, 2, "x"])
statuses = st.sampled_from(["open", "paid", "void"])
docs = st.fixed_dictionaries(
    {"org": orgs, "status": statuses, "at": st.integers(0, 9), "cost": st.sampled_from([1, 2.5, 0.25])},
    optional={"flag": st.booleans(), "tokens": st.integers(0, 99)},
)
patches = st.fixed_dictionaries(
    {},
    optional={
        "org": orgs,
        "status": statuses,
        "at": st.integers(0, 9),
        "cost": st.sampled_from([1, 2.5, 1.0]),
        "flag": st.booleans(),
        "tokens": st.integers(0, 99),
    },
)


@st.composite
def pairs(draw: st.DrawFn) -> list[tuple[Any, Any]]:
    """(id, patch) pairs; ids repeat and go missing; now and then a patch no extractor can read."""
    drawn = draw(st.lists(st.tuples(ids, patches, st.integers(0, 15)), max_size=8))
    return [(doc_id, {**patch, "status": BAD} if bad == 0 else patch) for doc_id, patch, bad in drawn]


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("update"),
            pairs(),
            st.sampled_from([(), ("flag",), ("tokens",)]),
            st.sampled_from(["skip", "skip", "error"]),
            st.booleans(),  # as a mapping (the last patch of an id wins), or as pairs
        ),
        st.tuples(st.just("delete"), st.lists(ids, max_size=6), st.sampled_from(["skip", "skip", "error"])),
        st.tuples(st.just("get"), st.lists(ids, max_size=6)),
    ),
    min_size=1,
    max_size=6,
)


@contextmanager
def databases(backend: str) -> Iterator[tuple[tallytree.Database, tallytree.Database]]:
    with ExitStack() as stack:
        if backend == "memory":
            yield stack.enter_context(tallytree.open_memory()), stack.enter_context(tallytree.open_memory())
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory())
            one = stack.enter_context(tallytree.open(directory + "/one", durable=False))
            many = stack.enter_context(tallytree.open(directory + "/many", durable=False))
            yield one, many


@pytest.mark.parametrize("backend", ["memory", "lmdb"])
@pytest.mark.parametrize("kernels", ["built", "python"])
@settings(max_examples=200)
@given(
    initial=st.dictionaries(ids, docs, max_size=12),
    node_size=st.integers(4, 6),
    steps=operations,
)
def test_batches_leave_what_the_calls_one_by_one_leave(
    kernels: str, backend: str, initial: dict[Any, Doc], node_size: int, steps: list[Any]
) -> None:
    with pure_python() if kernels == "python" else nullcontext(), databases(backend) as (db_one, db_many):
        tables = []
        for db in (db_one, db_many):
            table = db.table("invoices")
            attach(table, node_size)
            with db.write() as tx:
                table.insert_many(tx, list(initial.items()))
            tables.append(table)
        one, many = tables
        for step in steps:
            kind = step[0]
            if kind == "get":
                with db_one.read() as tx:
                    expected = [one.get(tx, doc_id) for doc_id in step[1]]
                with db_many.read() as tx:
                    found = many.get_many(tx, step[1])
                assert strict(found) == strict(expected)
                assert len({id(doc) for doc in found if doc is not None}) == sum(
                    doc is not None for doc in found
                )
                continue
            if kind == "update":
                _, batch, remove, missing, as_mapping = step
                updates: Any = dict(batch) if as_mapping else batch
                if as_mapping:
                    batch = list(updates.items())

                def by_one(tx: Any, batch: Any = batch, remove: Any = remove, missing: Any = missing) -> int:
                    return updates_one_by_one(tx, one, batch, remove, missing)

                def in_batch(
                    tx: Any, updates: Any = updates, remove: Any = remove, missing: Any = missing
                ) -> int:
                    return many.update_many(tx, updates, remove=remove, missing=missing)

            else:
                _, doc_ids, missing = step

                def by_one(tx: Any, doc_ids: Any = doc_ids, missing: Any = missing) -> int:
                    return deletes_one_by_one(tx, one, doc_ids, missing)

                def in_batch(tx: Any, doc_ids: Any = doc_ids, missing: Any = missing) -> int:
                    return many.delete_many(tx, doc_ids, missing=missing)

            with db_one.write() as tx:  # an error aborts the reference's transaction: nothing written
                expected_outcome = outcome(lambda tx=tx: by_one(tx))
                if expected_outcome[0] == "error":
                    tx.abort()
            before = state(db_many, many)
            with db_many.write() as tx:  # the batch's transaction commits even after an error
                found_outcome = outcome(lambda tx=tx: in_batch(tx))
            event(f"{kind}: {type(expected_outcome[1]).__name__ if expected_outcome[0] == 'error' else 'ok'}")
            if expected_outcome[0] == "ok":
                assert found_outcome == expected_outcome
            else:
                assert found_outcome[0] == "error", found_outcome
                assert type(found_outcome[1]) is type(expected_outcome[1]), (found_outcome, expected_outcome)
                assert state(db_many, many) == before  # a failing batch writes nothing
            assert state(db_many, many) == state(db_one, one)
        check(db_many, many)
        check(db_one, one)


# ---------------------------------------------------------------- particular cases


def invoices(db: tallytree.Database) -> tallytree.Table:
    table = db.table("invoices")
    attach(table, node_size=4)
    with db.write() as tx:
        table.insert_many(
            tx,
            [
                (
                    i,
                    {
                        "org": i % 3,
                        "status": "open",
                        "at": i,
                        "cost": 1.5 * i,
                        "flag": i % 2 == 0,
                        "tokens": i,
                    },
                )
                for i in range(40)
            ],
        )
    return table


@pytest.mark.parametrize("kernels", ["built", "python"])
def test_marking_invoices_paid_moves_their_items(db: tallytree.Database, kernels: str) -> None:
    table = invoices(db)
    with pure_python() if kernels == "python" else nullcontext(), db.write() as tx:
        assert table.update_many(tx, {i: {"status": "paid"} for i in range(0, 40, 2)}) == 20
        assert table.delete_many(tx, range(1, 40, 4)) == 10
        assert table.count(tx) == 30
    by_status = table.aggregate("by_status")
    with db.read() as tx:
        assert sum(by_status.count(tx, namespace=org, eq="paid") for org in range(3)) == 20
        assert sum(by_status.count(tx, namespace=org, eq="open") for org in range(3)) == 10
        assert table.aggregate("timeline").count(tx, prefix=("paid",)) == 20  # every even one is flagged
    check(db, table)


def test_batches_see_the_documents_inserted_earlier_in_their_transaction(db: tallytree.Database) -> None:
    """Table inserts queue their items (merged before a tree is next read): a batch in the same
    transaction moves and removes them like any other."""
    table = db.table("invoices")
    attach(table, node_size=4)
    with db.write() as tx:
        for i in range(30):
            table.insert(
                tx, {"org": i % 2, "status": "open", "at": i, "cost": 1, "flag": True, "tokens": i}, id=i
            )
        assert table.update_many(tx, [(i, {"status": "paid"}) for i in range(0, 30, 3)]) == 10
        assert table.delete_many(tx, range(1, 30, 3)) == 10
        table.insert(tx, {"org": 0, "status": "void", "at": 99, "cost": 1}, id=99)
        assert table.update_many(tx, {99: {"status": "open"}}) == 1
        assert table.aggregate("live").count(tx) == 21
    check(db, table)


def test_a_missing_id_is_named_and_nothing_is_written(db: tallytree.Database) -> None:
    table = invoices(db)
    before = state(db, table)
    with db.write() as tx:
        with pytest.raises(tallytree.ItemNotFoundError, match="no document with id 'nope' to update"):
            table.update_many(tx, [(1, {"status": "paid"}), ("nope", {"status": "paid"})])
        with pytest.raises(tallytree.ItemNotFoundError, match="no document with id 77 to delete;"):
            table.delete_many(tx, [1, 2, 77, 3])
        with pytest.raises(
            tallytree.ItemNotFoundError, match=r"id 2 to delete \(it was deleted earlier in this batch\)"
        ):
            table.delete_many(tx, [1, 2, 2])
        assert not tx.changed
    assert state(db, table) == before
    with db.write() as tx:
        assert table.delete_many(tx, [1, 2, 2, 77], missing="skip") == 2
        assert table.update_many(tx, [(1, {"status": "paid"}), (3, {"status": "paid"})], missing="skip") == 1


def test_an_extraction_error_mid_batch_writes_nothing(db: tallytree.Database) -> None:
    table = invoices(db)
    before = state(db, table)
    with db.write() as tx:
        with pytest.raises(tallytree.ExtractionError, match="document 5"):
            table.update_many(tx, [(4, {"status": "paid"}), (5, {"status": BAD}), (6, {"status": "void"})])
        assert not tx.changed
    assert state(db, table) == before
    check(db, table)


def test_updates_that_change_nothing_write_nothing(db: tallytree.Database) -> None:
    table = invoices(db)
    with db.write() as tx:
        assert table.update_many(tx, {1: {"status": "open"}, 2: {"cost": 3.0}}) == 0
        assert table.update_many(tx, [(3, {"status": "paid"}), (3, {"status": "open"})]) == 2  # and back
        assert table.update_many(tx, {}) == 0
        assert table.delete_many(tx, [], missing="error") == 0
        assert table.delete_many(tx, [99], missing="skip") == 0
        assert not tx.changed


def test_a_patch_that_keeps_the_items_in_place_writes_the_document_only(db: tallytree.Database) -> None:
    table = invoices(db)
    with db.write() as tx:
        assert table.update_many(tx, {1: {"note": "late"}, 2: {"note": "late"}}) == 2
        assert not tx.changed_roots()
        assert table.get_many(tx, [1, 2])[1] == {
            "org": 2,
            "status": "open",
            "at": 2,
            "cost": 3.0,
            "flag": True,
            "tokens": 2,
            "note": "late",
        }


def test_remove_drops_fields_from_every_updated_document(db: tallytree.Database) -> None:
    table = invoices(db)
    with db.write() as tx:
        assert table.update_many(tx, {0: {}, 2: {"status": "paid"}}, remove=["flag"]) == 2
        assert table.update_many(tx, {0: {}}, remove=["flag"]) == 0  # gone already: unchanged
        assert [doc and doc.get("flag") for doc in table.get_many(tx, [0, 2, 4])] == [None, None, True]
    with db.read() as tx:
        assert table.aggregate("timeline").count(tx) == 18  # 0 and 2 left the where= filter
    check(db, table)


def test_get_many_reads_one_snapshot_in_the_order_given(db: tallytree.Database) -> None:
    table = invoices(db)
    with db.write() as tx:
        table.update(tx, 3, {"status": "paid"})
        table.delete(tx, 4)
        found = table.get_many(tx, (3, 4, 3, "x", b"y"))  # a write transaction sees its own writes
        assert [doc and doc["status"] for doc in found] == ["paid", None, "paid", None, None]
        assert found[0] == found[2] and found[0] is not found[2]
        assert table.get_many(tx, iter([])) == []
    with db.read() as tx:
        assert table.get_many(tx, range(40)) == [table.get(tx, i) for i in range(40)]
        with pytest.raises(tallytree.UnsupportedKeyTypeError, match="table 'invoices'"):
            table.get_many(tx, [1, 2.5])
        with pytest.raises(tallytree.ArgumentTypeError, match="get_many takes an iterable of document ids"):
            table.get_many(tx, 7)


def test_arguments_are_checked_before_anything_is_written(db: tallytree.Database) -> None:
    table = invoices(db)
    with db.write() as tx:
        with pytest.raises(tallytree.InvalidArgumentError, match="missing= must be 'error' or 'skip'"):
            table.update_many(tx, {1: {"status": "paid"}}, missing="ignore")  # type: ignore[arg-type]
        with pytest.raises(tallytree.InvalidArgumentError, match="missing= must be 'error' or 'skip'"):
            table.delete_many(tx, [1], missing=False)  # type: ignore[arg-type]
        with pytest.raises(tallytree.ArgumentTypeError, match="remove= takes a list of field names"):
            table.update_many(tx, {1: {"status": "paid"}}, remove="flag")
        with pytest.raises(tallytree.ArgumentTypeError, match=r"update_many takes \(id, patch\) pairs"):
            table.update_many(tx, [(1, {"status": "paid"}), [2, {"status": "paid"}]])  # type: ignore[list-item]
        with pytest.raises(tallytree.ArgumentTypeError, match="update_many takes an iterable"):
            table.update_many(tx, 5)  # type: ignore[arg-type]
        with pytest.raises(tallytree.InvalidDocumentError, match="a patch is a mapping"):
            table.update_many(tx, [(1, {"status": "paid"}), (2, ["status"])])  # type: ignore[list-item]
        with pytest.raises(
            tallytree.ArgumentTypeError, match="delete_many takes an iterable of document ids"
        ):
            table.delete_many(tx, None)  # type: ignore[arg-type]
        with pytest.raises(tallytree.UnsupportedKeyTypeError, match="table 'invoices'"):
            table.delete_many(tx, [1, 2.5])
        assert not tx.changed
    with db.read() as tx, pytest.raises(tallytree.TransactionError, match=r"writes need `with db\.write"):
        table.delete_many(tx, [1])  # type: ignore[arg-type]


def test_an_iterator_that_raises_writes_nothing(db: tallytree.Database) -> None:
    table = invoices(db)

    def ids() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("the export broke")

    with db.write() as tx:
        with pytest.raises(RuntimeError, match="the export broke"):
            table.delete_many(tx, ids())
        assert not tx.changed


# ---------------------------------------------------------------- drift: refused, as one by one


def drifting(db: tallytree.Database) -> tuple[tallytree.Table, dict[str, int]]:
    """A table whose aggregate ``impure`` reads outside the document (``shift``)."""
    table = db.table("t")
    table.aggregate("by_k", key="k", values=("v",))
    shift = {"n": 0}
    table.aggregate("impure", key=lambda doc: doc["k"] + shift["n"] * (doc["k"] > 2), values=("v",))
    with db.write() as tx:
        table.insert_many(tx, [(i, {"k": i, "v": i}) for i in range(1, 6)])
    return table, shift


@pytest.mark.parametrize("write", ["update in place", "update", "delete"])
@pytest.mark.parametrize("kernels", ["built", "python"])
def test_an_item_the_aggregate_lacks_is_refused_and_nothing_is_written(
    db: tallytree.Database, write: str, kernels: str
) -> None:
    """Document 3's item in ``impure`` is missing. Its update in place is refused before anything is
    written; a removal (a move, a delete) is found missing as it is made, after documents 1 and 2 lost
    their items in ``by_k`` and ``impure``: those are put back."""
    table, shift = drifting(db)
    shift["n"] = 100  # the items of documents 3 to 5 have drifted; those of 1 and 2 have not
    before = state(db, table)
    batch = {
        "update in place": lambda tx: table.update_many(tx, [(1, {"k": 0}), (3, {"v": 30})]),
        "update": lambda tx: table.update_many(tx, [(1, {"k": 0}), (2, {"v": 20}), (3, {"k": 0})]),
        "delete": lambda tx: table.delete_many(tx, [1, 2, 3]),
    }[write]
    with pure_python() if kernels == "python" else nullcontext(), db.write() as tx:
        with pytest.raises(
            tallytree.ItemNotFoundError, match="table 't', document 3: aggregate 'impure' does not hold"
        ):
            batch(tx)
        assert not tx.changed or write != "update in place"
    assert state(db, table) == before  # the batch's transaction went on and committed
    check_trees(db)
    one_by_one = pytest.raises(
        tallytree.ItemNotFoundError, match="document 3: aggregate 'impure' does not hold"
    )
    with db.write() as tx, one_by_one:  # one by one, the same error
        if write == "delete":
            table.delete(tx, 3)
        else:
            table.update(tx, 3, {"v": 30})
    assert state(db, table) == before


def check_trees(db: tallytree.Database) -> None:
    with db.read() as tx:
        assert tallytree.check(tx) == []


def test_a_new_place_the_aggregate_holds_already_is_refused(db: tallytree.Database) -> None:
    table, _ = drifting(db)
    by_k = table.aggregate("by_k")
    with db.write() as tx:  # a stray item where document 2's would go (written behind the table's back)
        move(
            tx,
            by_k,
            None,
            table.definition("by_k").coordinates({"k": 9, "v": 2}, 2, tallytree._keys.encode_id(2)),
        )
    before = state(db, table)
    with db.write() as tx:
        with pytest.raises(tallytree.DuplicateItemError, match="document 2: aggregate 'by_k' already holds"):
            table.update_many(tx, {1: {"k": 7}, 2: {"k": 9}})
        assert not tx.changed
        with pytest.raises(tallytree.DuplicateItemError, match="document 2: aggregate 'by_k' already holds"):
            table.update(tx, 2, {"k": 9})  # one by one, the same error
    assert state(db, table) == before


def test_values_the_aggregate_holds_are_overwritten_as_one_by_one() -> None:
    """A table's one-by-one writes do not compare the values an aggregate holds with those its
    definition gives; the batch does not either (only a missing item, or a taken place, is drift)."""
    scale = {"n": 1}
    results = []
    for batch in (True, False):
        scale["n"] = 1
        with tallytree.open_memory() as database:
            table = database.table("t")
            table.aggregate("scaled", key="k", values={"v": lambda doc: doc["v"] * scale["n"]})
            with database.write() as tx:
                table.insert_many(tx, [(i, {"k": i, "v": i}) for i in range(1, 4)])
            scale["n"] = 10  # the values drifted
            with database.write() as tx:
                if batch:
                    table.update_many(tx, {1: {"k": 5}, 2: {"v": 7}})
                    table.delete_many(tx, [3])
                else:
                    table.update(tx, 1, {"k": 5})
                    table.update(tx, 2, {"v": 7})
                    table.delete(tx, 3)
            results.append(state(database, table))
    assert results[0] == results[1]


def test_a_table_awaiting_a_function_refuses_batches(tmp_path: Any) -> None:
    with tallytree.open(tmp_path / "db", durable=False) as db:
        table = db.table("t")
        table.aggregate("odd", key=lambda doc: doc["k"] % 2)
        with db.write() as tx:
            table.insert(tx, {"k": 1}, id=1)
    with tallytree.open(tmp_path / "db", durable=False) as db:
        table = db.table("t")
        with db.write() as tx:
            with pytest.raises(tallytree.TransactionError, match=r"call table\.aggregate\('odd'"):
                table.update_many(tx, {1: {"k": 2}})
            with pytest.raises(tallytree.TransactionError, match=r"call table\.aggregate\('odd'"):
                table.delete_many(tx, [1])
            assert table.get_many(tx, [1]) == [{"k": 1}]  # reads need no extractor
