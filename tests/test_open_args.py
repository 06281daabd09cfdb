"""tallytree.open() and open_memory() check their arguments before they create anything on disk."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest

import tallytree
import tallytree._lmdb
from tallytree import ArgumentTypeError, Error, InvalidArgumentError, StorageError

PAGES_16 = 16 * mmap.PAGESIZE
"""The smallest map_size open() takes."""

WRONG_TYPES: list[tuple[str, dict[str, Any]]] = [
    ("map_size", {"map_size": "big"}),
    ("map_size", {"map_size": 1.5e9}),
    ("map_size", {"map_size": True}),
    ("max_map_size", {"max_map_size": "1T"}),
    ("max_map_size", {"max_map_size": False}),
    ("cache_nodes", {"cache_nodes": "x"}),
    ("cache_nodes", {"cache_nodes": 100.0}),
    ("cache_nodes", {"cache_nodes": True}),
    ("durable", {"durable": "no"}),
    ("durable", {"durable": 0}),
    ("readonly", {"readonly": 1}),
    ("readonly", {"readonly": None}),
    ("create", {"create": "yes"}),
]

BAD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("map_size", {"map_size": -1}),
    ("map_size", {"map_size": 0}),
    ("map_size", {"map_size": PAGES_16 - 1}),
    ("map_size", {"map_size": sys.maxsize + 1, "max_map_size": sys.maxsize}),
    ("max_map_size", {"max_map_size": -5}),
    ("max_map_size", {"max_map_size": 2**64}),
    ("max_map_size", {"map_size": 1 << 30, "max_map_size": 1 << 20}),
    ("max_map_size", {"map_size": 2 * PAGES_16, "max_map_size": PAGES_16}),
    ("cache_nodes", {"cache_nodes": -5}),
    ("cache_nodes", {"cache_nodes": -1}),
    ("cache_nodes", {"cache_nodes": sys.maxsize + 1}),
]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [",".join(f"{k}={v!r}" for k, v in options.items()) for _, options in cases]


def _nothing_created(root: Path) -> None:
    assert list(root.iterdir()) == [], "a failed open left something behind"


BAD_OPTIONS = [(ArgumentTypeError, *case) for case in WRONG_TYPES] + [
    (InvalidArgumentError, *case) for case in BAD_VALUES
]


@pytest.mark.parametrize(("error", "name", "options"), BAD_OPTIONS, ids=_ids(WRONG_TYPES) + _ids(BAD_VALUES))
def test_a_bad_option_raises_its_typed_error_and_creates_nothing(
    tmp_path: Path, error: type[Exception], name: str, options: dict[str, Any]
) -> None:
    with pytest.raises(error, match=name) as raised:
        tallytree.open(tmp_path / "db", **options)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, Error)
    # a wrong type is also a TypeError (ArgumentTypeError); a wrong value only a ValueError
    assert isinstance(raised.value, TypeError) == (error is ArgumentTypeError)
    _nothing_created(tmp_path)


def test_map_size_above_max_map_size_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"map_size \(1073741824\) is above max_map_size"):
        tallytree.open(tmp_path / "db", map_size=1 << 30, max_map_size=1 << 20)
    _nothing_created(tmp_path)


@pytest.mark.parametrize("path", [5, 5.0, None, b"/tmp/db", ["db"]], ids=repr)
def test_a_path_of_the_wrong_type_raises_argument_type_error(path: Any) -> None:
    with pytest.raises(ArgumentTypeError, match="path") as raised:
        tallytree.open(path)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, InvalidArgumentError)


@pytest.mark.parametrize("path", ["", "db\0name"], ids=repr)
def test_an_unusable_path_raises_invalid_argument_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.chdir(tmp_path)  # "" would otherwise mean the current directory
    with pytest.raises(InvalidArgumentError, match="path") as raised:
        tallytree.open(path)
    assert isinstance(raised.value, ValueError) and not isinstance(raised.value, TypeError)
    _nothing_created(tmp_path)


def test_a_bad_option_is_found_before_a_bad_directory(tmp_path: Path) -> None:
    """The arguments are checked before the path is looked at, so a missing parent is not created."""
    path = tmp_path / "a" / "b" / "db"
    with pytest.raises(ArgumentTypeError, match="cache_nodes"):
        tallytree.open(path, cache_nodes="x")
    _nothing_created(tmp_path)


@pytest.mark.parametrize(
    ("error", "options"),
    [
        (ArgumentTypeError, {"cache_nodes": "x"}),
        (ArgumentTypeError, {"cache_nodes": 3.0}),
        (ArgumentTypeError, {"cache_nodes": False}),
        (InvalidArgumentError, {"cache_nodes": -5}),
    ],
    ids=repr,
)
def test_open_memory_checks_cache_nodes(error: type[Exception], options: dict[str, Any]) -> None:
    with pytest.raises(error, match="cache_nodes") as raised:
        tallytree.open_memory(**options)
    assert isinstance(raised.value, TypeError if error is ArgumentTypeError else ValueError)


def test_valid_calls_still_work(tmp_path: Path) -> None:
    with tallytree.open(
        str(tmp_path / "db"),
        map_size=PAGES_16,
        max_map_size=PAGES_16 * 64,
        durable=False,
        readonly=False,
        create=True,
        cache_nodes=0,  # 0 caches nothing
    ) as db:
        events = db.aggregate("events", values=("cost",), node_size=4)
        with db.write() as tx:
            events.insert_many(tx, [(n, "e", (1.0,)) for n in range(500)])
        with db.read() as tx:
            assert events.count(tx) == 500 and tallytree.check(tx) == []
        assert db.cache_info()["capacity"] == 0
    with tallytree.open(tmp_path / "db", readonly=True, create=False, cache_nodes=3) as db, db.read() as tx:
        assert db.aggregate("events").count(tx) == 500
    with tallytree.open(tmp_path / "other", map_size=1 << 20, max_map_size=1 << 20) as db:
        assert db._backend.env.info()["map_size"] == 1 << 20  # map_size may equal max_map_size
    memory = tallytree.open_memory(cache_nodes=0)
    assert memory.cache_info()["capacity"] == 0
    assert tallytree.open_memory().cache_info()["capacity"] == tallytree._db.DEFAULT_CACHE_NODES


def test_a_max_map_size_alone_below_the_default_map_size_lowers_the_initial_map(tmp_path: Path) -> None:
    """map_size defaults to tallytree._db._DEFAULT_MAP_SIZE (64 GiB on 64-bit POSIX systems), or to
    max_map_size when that is smaller (it is not raised above it)."""
    limit = 256 * 1024
    with tallytree.open(tmp_path / "small", max_map_size=limit, durable=False) as db:
        assert db._backend.env.info()["map_size"] == limit
        assert db._backend.max_map_size == limit
    with tallytree.open(tmp_path / "default", durable=False) as db:
        assert db._backend.env.info()["map_size"] == tallytree._db._DEFAULT_MAP_SIZE


def test_a_map_size_beyond_the_address_space_raises_and_creates_nothing(tmp_path: Path) -> None:
    """2**62 bytes pass the range checks but no 64-bit process can map them (LMDB failed inside, after
    creating the directory and its files, with a DatabaseFormatError that blamed the directory)."""
    with pytest.raises(InvalidArgumentError, match="address space") as raised:
        tallytree.open(tmp_path / "a" / "db", map_size=1 << 62, max_map_size=1 << 62)
    assert "smaller map_size" in str(raised.value)
    _nothing_created(tmp_path)


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "empty directory"])
def test_an_open_that_fails_after_lmdb_created_its_files_removes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """LMDB creates data.mdb and lock.mdb as it opens; if it then fails (here: it cannot map the
    file), the files go, and so do the directories open() made: the path is left as it was."""
    real_open = lmdb.open

    def open_then_fail(path: str, **options: Any) -> Any:
        real_open(path, **options).close()
        raise lmdb.MemoryError("mdb_env_open: Cannot allocate memory")

    monkeypatch.setattr(tallytree._lmdb.lmdb, "open", open_then_fail)
    path = tmp_path / "db" if existing else tmp_path / "a" / "b" / "db"
    if existing:
        path.mkdir()
    with pytest.raises(StorageError, match="address space"):
        tallytree.open(path)
    if existing:
        assert list(path.iterdir()) == []
        path.rmdir()
    _nothing_created(tmp_path)
    monkeypatch.undo()
    with tallytree.open(path) as db:  # and a later open creates the database as usual
        assert db.aggregates() == []


@pytest.mark.parametrize(
    "failure",
    [
        lmdb.Error("/some/db: Permission denied"),  # LMDB's own open of data.mdb or lock.mdb
        PermissionError(13, "Permission denied"),  # a directory this process may not look into
    ],
)
def test_a_database_the_process_may_not_open_raises_storage_error_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """A permission error was a raw PermissionError (from looking into the directory) or a
    DatabaseFormatError ("cannot open ...: Permission denied"), as if the files were not a database.
    (Simulated: the tests may run as root, whom permissions do not stop.)"""
    with tallytree.open(tmp_path / "db") as db:
        db.aggregate("events")

    def refuse(*args: Any, **options: Any) -> Any:
        raise failure

    target = "open" if isinstance(failure, lmdb.Error) else "_checked_directory"
    owner = tallytree._lmdb.lmdb if target == "open" else tallytree._lmdb
    monkeypatch.setattr(owner, target, refuse)
    for readonly in (False, True):
        with pytest.raises(StorageError, match=r"Permission denied.*fix their permissions"):
            tallytree.open(tmp_path / "db", readonly=readonly)
    monkeypatch.undo()
    with tallytree.open(tmp_path / "db") as db:
        assert db.aggregates() == ["events"]


def test_an_open_while_another_process_grows_the_map_adopts_the_new_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process grew the map between LMDB's open and the open's first transaction: a raw
    lmdb.MapResizedError, or DatabaseFormatError ("not a tallytree database: MDB_MAP_RESIZED")."""
    path = tmp_path / "db"
    with tallytree.open(path, map_size=64 << 10) as db:
        db.aggregate("events")
    grow = (
        "import sys, tallytree\n"
        "with tallytree.open(sys.argv[1], map_size=64 << 10, durable=False) as db:\n"
        "    with db.write() as tx:\n"
        "        db.aggregate('events').insert_many(tx, [(n, 'g') for n in range(30000)])\n"
    )
    real_open = lmdb.open

    def open_then_another_process_grows(*args: Any, **options: Any) -> Any:
        env = real_open(*args, **options)
        subprocess.run([sys.executable, "-c", grow, str(path)], check=True, timeout=120)
        return env

    monkeypatch.setattr(tallytree._lmdb.lmdb, "open", open_then_another_process_grows)
    with tallytree.open(path, map_size=64 << 10) as db, db.read() as tx:
        assert db.aggregate("events").count(tx) == 30000
        assert tallytree.check(tx) == []


def test_opening_without_create_a_directory_of_other_files_says_there_is_no_database(tmp_path: Path) -> None:
    """Opening read-only (or create=False) creates nothing, so the refusal names what is missing
    rather than advising against a creation among foreign files."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    for options in ({"readonly": True}, {"create": False}):
        with pytest.raises(tallytree.DatabaseFormatError, match="holds no database") as raised:
            tallytree.open(photos, **options)
        assert "other files" in str(raised.value) and "refusing to create" not in str(raised.value)
    with pytest.raises(tallytree.DatabaseFormatError, match="refusing to create one among foreign files"):
        tallytree.open(photos)
    assert [path.name for path in photos.iterdir()] == ["cat.jpg"]
