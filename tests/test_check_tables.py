"""``check`` over tables: every stored document decodes, each table holds as many documents as its
stored count says, and no document or count is left without a table; ``Table.items`` and ``ids``
compare what a whole pass met with the count.

In the storage audit's damage trials, reading documents raised while ``check`` said "ok", and once
``items`` silently stopped after 1,160 of 3,000 documents (a damaged key that sorts after the table
ended LMDB's range scan) while ``count`` said 3,000. Damage is made with raw py-lmdb writes, or raw
byte edits of data.mdb, on a closed database."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

import tallytree
from tallytree import CorruptDatabaseError
from tallytree._keys import encode_id
from tallytree.cli import main as cli_main

PAGE = 4096
DOCUMENTS = 3000


def _lmdb_env(path: Path) -> Any:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 24)


def _put(path: Path, table: bytes, key: bytes, value: bytes) -> None:
    env = _lmdb_env(path)
    try:
        handle = env.open_db(table)
        with env.begin(write=True) as txn:
            txn.put(key, value, db=handle)
    finally:
        env.close()


def _database(path: Path) -> None:
    """Table ``docs`` (id 1) with aggregate ``by_kind`` attached and 3,000 documents, ids 0 to 2999;
    aggregate ``events`` beside it. Checked clean, in a write transaction with its own changes too."""
    with tallytree.open(path, durable=False) as db:
        events = db.aggregate("events", values=("v",))
        docs = db.table("docs")
        docs.aggregate("by_kind", namespace="kind", key="n", values=("n",))
        with db.write() as tx:
            events.insert_many(tx, [(n, f"e{n}", (n,)) for n in range(1000)])
            docs.insert_many(tx, [(n, {"kind": f"k{n % 5}", "n": n}) for n in range(DOCUMENTS + 1)])
        with db.write() as tx:  # the pass merges a write transaction's own documents
            docs.delete(tx, DOCUMENTS)
            docs.insert(tx, {"kind": "k0", "n": -1}, id="extra")
            assert tallytree.check(tx) == []
            assert len(list(docs.items(tx))) == len(list(docs.ids(tx))) == docs.count(tx) == DOCUMENTS + 1
            tx.abort()
        with db.write() as tx:
            docs.delete(tx, DOCUMENTS)
        with db.read() as tx:
            assert tallytree.check(tx) == []
            assert docs.count(tx) == DOCUMENTS


def _doc_key(doc_id: Any, table_id: int = 1) -> bytes:
    return table_id.to_bytes(4, "big") + encode_id(doc_id)


def _problems(path: Path) -> list[tallytree.Problem]:
    with tallytree.open(path, readonly=True) as db, db.read() as tx:
        return tallytree.check(tx)


def _cli_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["check", str(path)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (b"\xc1", "the stored bytes do not decode"),
        (msgpack.packb([1, 2]), "it is stored as list"),
        (msgpack.packb({"kind": "k1"}) + b"\x00", "the stored bytes do not decode"),
    ],
)
def test_a_document_that_does_not_decode_is_a_problem(
    tmp_path: Path, stored: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged document raised CorruptDatabaseError when read while ``check`` said ok (exit 0): it
    is a problem naming the table and the document."""
    path = tmp_path / "db"
    _database(path)
    _put(path, b"docs", _doc_key(1234), stored)
    problems = _problems(path)
    assert [(problem.table, problem.document) for problem in problems] == [("docs", 1234)], problems
    assert message in problems[0].message
    code, output = _cli_check(path, capsys)
    assert code == 3 and "table 'docs' document 1234: " in output, output


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (b"\x00\x00\x00\x01\xff\xff", "document key b'\\x00\\x00\\x00\\x01\\xff\\xff' is damaged"),
        (_doc_key(5) + b"\x00", "1 byte(s) follow the id"),
        (b"\x00\x00\x00\x01" + tallytree._keys.encode_key(1.5), "not a str, int or bytes"),
    ],
)
def test_a_document_key_that_does_not_decode_is_a_problem(tmp_path: Path, key: bytes, message: str) -> None:
    """A key under the table's prefix whose id does not decode (or is no id): a problem, and the
    table then holds one document more than its count says."""
    path = tmp_path / "db"
    _database(path)
    _put(path, b"docs", key, msgpack.packb({"kind": "k1"}))
    messages = [(problem.table, problem.message) for problem in _problems(path)]
    assert len(messages) == 2, messages
    assert messages[0][0] == "docs" and message in messages[0][1], messages
    assert messages[1] == (
        "docs",
        f"it holds {DOCUMENTS + 1} document(s), but its stored count (META b'tstate:\\x00\\x00\\x00\\x01') "
        f"says {DOCUMENTS}: documents were lost or the count is damaged",
    )


def _damage_a_key(path: Path, doc_id: int, prefix: bytes) -> None:
    """Overwrite the first 4 bytes of document ``doc_id``'s key where data.mdb stores it (in a leaf
    page of LMDB's docs table), as a damaged sector would: LMDB keeps no checksums."""
    key = _doc_key(doc_id)
    data = (path / "data.mdb").read_bytes()
    assert data.count(key) == 1, "the key is also a separator in a branch page: pick another"
    with (path / "data.mdb").open("r+b") as file:
        file.seek(data.index(key))
        file.write(prefix)


def test_a_damaged_key_that_ends_the_scan_early_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit's silent case: a key in the middle of the table damaged into one that sorts after
    every table. LMDB's range scan stops at it: ``items`` and ``ids`` ended after 1,160 documents
    without an error, and ``check`` said ok. Now both raise CorruptDatabaseError at their end, and
    ``check`` reports the key out of order, the count that differs and the document of no table."""
    path = tmp_path / "db"
    _database(path)
    _damage_a_key(path, 1160, b"=\n\xa4\xc4")
    with tallytree.open(path, readonly=True) as db:
        docs = db.table("docs")
        with db.read() as tx:
            assert docs.count(tx) == DOCUMENTS
            for iterate in (docs.items, docs.ids):
                with pytest.raises(CorruptDatabaseError, match="met 1160, but its stored count is 3000"):
                    list(iterate(tx))
    problems = _problems(path)
    assert [problem.table for problem in problems] == ["docs", "docs", None], problems
    assert "comes after b'=\\n\\xa4\\xc4" in problems[0].message
    assert f"it holds {DOCUMENTS - 1} document(s)" in problems[1].message
    assert "1 document(s) (the first with key b'=\\n\\xa4\\xc4" in problems[2].message
    assert "which no table has" in problems[2].message
    code, output = _cli_check(path, capsys)
    assert code == 3 and "3 problem(s)" in output


def test_a_pass_that_meets_fewer_documents_than_the_count_raises(tmp_path: Path) -> None:
    """The stored count above the documents (a count damaged, or documents lost): ``items`` and
    ``ids`` returned every document there is without a word; ``check`` said ok."""
    path = tmp_path / "db"
    _database(path)
    _put(path, b"meta", b"tstate:\x00\x00\x00\x01", struct.pack(">QQ", DOCUMENTS + 5, DOCUMENTS))
    with tallytree.open(path, readonly=True) as db:
        docs = db.table("docs")
        with db.read() as tx:
            for iterate in (docs.items, docs.ids):
                with pytest.raises(CorruptDatabaseError, match=f"met {DOCUMENTS}, but its stored count is"):
                    list(iterate(tx))
            assert next(iter(docs.items(tx))) == (0, {"kind": "k0", "n": 0})  # a partial pass reads on
    assert [problem.message for problem in _problems(path)] == [
        f"it holds {DOCUMENTS} document(s), but its stored count (META b'tstate:\\x00\\x00\\x00\\x01') "
        f"says {DOCUMENTS + 5}: documents were lost or the count is damaged"
    ]


def test_documents_and_counts_of_no_table_are_problems(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _database(path)
    _put(path, b"docs", _doc_key("x", table_id=9), msgpack.packb({}))
    _put(path, b"docs", _doc_key("y", table_id=9), msgpack.packb({}))
    _put(path, b"meta", b"tstate:\x00\x00\x00\x09", struct.pack(">QQ", 2, 1))
    assert [str(problem) for problem in _problems(path)] == [
        "None[None] root (node None): 2 document(s) (the first with key b'\\x00\\x00\\x00\\t@x\\x00') "
        "under the id b'\\x00\\x00\\x00\\t', which no table has",
        "None[None] root (node None): the document count META b'tstate:\\x00\\x00\\x00\\t' belongs to "
        "no table",
    ]


def test_table_records_that_share_an_id_or_that_the_counter_would_give_again_are_problems(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    _database(path)
    _put(path, b"meta", b"table:copy", msgpack.packb({"id": 1, "aggregates": {}}))
    _put(path, b"meta", b"next_table", (1).to_bytes(4, "big"))
    messages = [(problem.table, problem.message) for problem in _problems(path)]
    assert messages == [
        (
            "copy",
            "its id 1 is not below the table id counter (META b'next_table', 1): a new table would take "
            "it, and its documents",
        ),
        ("docs", "table 'copy' has the same id, 1, and so the same documents"),
        (
            "docs",
            "its id 1 is not below the table id counter (META b'next_table', 1): a new table would take "
            "it, and its documents",
        ),
    ]


def test_a_damaged_record_leaves_the_documents_unowned_in_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _database(path)
    _put(path, b"meta", b"table:docs", b"\xc1")
    messages = [problem.message for problem in _problems(path)]
    assert "the record of table 'docs'" in messages[0] and "is damaged" in messages[0]
    assert messages[-1] == (
        f"{DOCUMENTS} document(s) and 1 document count(s) of no table checked; the damaged table records "
        "reported above may own them"
    )


def test_a_document_count_that_does_not_decode_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _database(path)
    _put(path, b"meta", b"tstate:\x00\x00\x00\x01", b"\x01")
    assert [str(problem) for problem in _problems(path)] == [
        "table 'docs': its document count (META b'tstate:\\x00\\x00\\x00\\x01') is damaged: b'\\x01'"
    ]


def _docs_root(path: Path) -> int:
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            record = txn.get(b"docs")
    finally:
        env.close()
    return int(struct.unpack_from("<Q", record, 40)[0])


def test_a_page_of_the_documents_that_lmdb_cannot_read_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The root page of LMDB's docs table overwritten with a page of another kind: reading a document
    raised CorruptDatabaseError while ``check``, which read no document, said ok."""
    path = tmp_path / "db"
    _database(path)
    root = _docs_root(path)
    with (path / "data.mdb").open("r+b") as file:
        page = bytearray(file.read(PAGE))  # LMDB's first meta page: the wrong type here
        page[:8] = struct.pack("<Q", root)
        file.seek(root * PAGE)
        file.write(page)
    with tallytree.open(path, readonly=True) as db:
        docs = db.table("docs")
        with pytest.raises(CorruptDatabaseError), db.read() as tx:
            docs.get(tx, 5)
        with db.read() as tx:
            assert db.aggregate("events").count(tx) == 1000  # the aggregates read on
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].message.startswith("LMDB cannot read the stored documents (CorruptedError")
    code, output = _cli_check(path, capsys)
    assert code == 3 and "LMDB cannot read the stored documents" in output
