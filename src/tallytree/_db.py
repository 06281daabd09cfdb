"""The database: opening a store, its aggregates, and its transactions.

Design
======
A :class:`Database` is one backend (an LMDB environment, or memory) plus what every transaction shares:
the decoded-node cache and the aggregate definitions. It is opened once per process and used from any
number of threads. The ``meta`` table holds the format tag (checked on open, so a foreign or newer
database is refused with a clear error), the id counters and one definition per aggregate::

    b"format"      -> b"tallytree-4" (version 2 added the pending node of each tree, see ``_tree``;
                      version 3 holds it in the tree's root record instead of naming a node;
                      version 4 names nodes by slot and version, and a rewrite of a committed node
                      overwrites its slot, see ``_txn``. An older database is read as it is (its
                      node ids are version 0 of their slots) and tagged version 4 when opened for
                      writing, since older code cannot read what this version writes; a version 2
                      tree's pending node moves into its record the next time its pending entries
                      change)
    b"agg:" + name -> msgpack {"id": 7, "values": ["cost", "tokens"], "node_size": 128}
                      (+ "table": name for an aggregate maintained by a table: it refuses writes;
                      + "extractors": the description of the extractors (``_extract.describe_definition``)
                      a ChangeHandler registered it with, or the table it was detached from had:
                      registrations of another definition are refused, see ``_hooks``. Older
                      releases read such a record as they read any other, ignoring the key)
    b"table:" + name -> a table and its attached aggregates (see ``_table``)
    b"next_agg"    -> the next aggregate id (4 bytes, big-endian; ids are never reused)

The format tag at open: this version's opens; an older one (``_UPGRADABLE``) opens as it is and is
retagged by an open for writing; a newer one (``tallytree-N``, N above 4) raises DatabaseFormatError
saying to upgrade; a tag no tallytree writes, or none, in a store holding tallytree's counters
(``_MARKS``) is damage, CorruptDatabaseError. Retagging stays at the open for writing rather than an
explicit upgrade step: this version writes only format 4, so its first write would have to retag
anyway, and an old process started after the open is refused at its own open instead of failing
mid-work. While a process has the database open, another (of a newer tallytree) may retag it: a write
transaction that begins after another process's commits (the backend's epoch moved; one META get)
checks the tag and raises DatabaseFormatError ("upgraded to format N ... restart this process"),
writing nothing; and a read block that ends in CorruptDatabaseError reads the tag again, so a record of
the newer format that does not decode here says the same instead of "damaged". So a future format
must keep older readers from misreading it silently: its changed records must fail to decode in the
older version (a new layout or version byte), as version 3's root records do in version 2, and
as version 4's node ids do in version 3 (an id of version 1 or more names a key that does not exist
there: the node reads as missing, CorruptDatabaseError, and the tag read then says why).

Write transactions are serialized by the backend (LMDB's writer lock, across processes too). Opening a
second write transaction in a thread that already has one would wait for itself forever, so it raises
:class:`~tallytree.errors.TransactionError` instead.

Damage. A definition is checked whenever it is decoded (``_txn.decode_definition``: when an aggregate
is opened or its record changes, never per read), and a new aggregate refuses an id that a definition
or a tree already uses (a counter set back); both raise CorruptDatabaseError. The LMDB errors of a
damaged file (``_lmdb.LMDB_DAMAGE``) are translated into CorruptDatabaseError where a read meets them
(``_lmdb``: a ``try`` that costs nothing unless raised), and what is left (a write's batch merge, a
commit) where a ``db.read()`` or ``db.write()`` block ends (:func:`damage_error`), and by ``open()``;
``check`` reports them as a problem.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack

from . import _lmdbfile
from ._aggregate import Aggregate
from ._args import as_int, check_flag
from ._btree import Root
from ._extract import Definition
from ._keys import decode_key
from ._lmdb import _OWN_META, LMDB_DAMAGE, LmdbBackend, _unmappable, damaged
from ._store import ROOTS, Backend, MemoryBackend, NodeCache
from ._table import Table, check_writing, create_table, table_from
from ._tree import Tree
from ._txn import (
    DEFINITIONS,
    MAX_AGGREGATE_ID,
    MAX_NODE_SIZE,
    MIN_NODE_SIZE,
    RESERVED_FIELDS,
    ReadTransaction,
    Transaction,
    WriteTransaction,
    counter_damaged,
    decode_definition,
    decode_root,
    field_name_ok,
)
from .errors import (
    AggregateNotFoundError,
    ArgumentTypeError,
    CorruptDatabaseError,
    DatabaseFormatError,
    InvalidArgumentError,
    SchemaMismatchError,
    StorageError,
    TableNotFoundError,
    TransactionError,
)

__all__ = ["DEFAULT_NODE_SIZE", "Database", "open", "open_memory"]

FORMAT = b"tallytree-4"
_FORMAT_VERSION = 4
"""The number of :data:`FORMAT`: the newest format this version reads, and the one it writes."""
_UPGRADABLE = (b"tallytree-1", b"tallytree-2", b"tallytree-3")
"""Older formats this version reads as they are (and upgrades by retagging when writing)."""
_TAG_PREFIX = b"tallytree-"
_MARKS = tuple(key for key in _OWN_META if key != b"format")
"""META keys only tallytree writes besides the tag (the id counters, see ``_lmdb``): a store holding
one is tallytree's, so a format tag missing or unreadable there is damage, not another application's."""
DEFAULT_NODE_SIZE = 128
"""Entries per node; chosen by benchmark (see docs/performance.md, "Settings"): 128 against 64,
single writes of scattered items take 0.82-0.93x the time; reads of 10^6 items the same."""
_OLD_SNAPSHOT_CACHE = 1024
"""The capacity of the node cache of a transaction older than the database's cache (see
``Database._cache_for``): a rare transaction, begun as another thread replaced the cache."""
DEFAULT_CACHE_NODES = 16384
"""Decoded nodes kept per database: with the default node size, about the memory and the items
that 32,768 nodes of 64 entries held."""
_FORMAT_KEY = b"format"
NEXT_AGGREGATE = b"next_agg"
_DEFAULT_MAP_SIZE = 1 << 36 if sys.maxsize > 1 << 32 and sys.platform != "win32" else 1 << 30
"""The ``map_size`` open() starts with when none is given (see :func:`_default_map_size`): 64 GiB where
that is address space only, as on 64-bit POSIX systems (without ``MDB_WRITEMAP``, which ``_lmdb``
explains, LMDB maps the file read-only and writes with ``pwrite``: the file holds the pages in use,
not the map), 1 GiB on Windows (LMDB sets the file's size to the map's there) and 32-bit systems. A
map this large rarely has to grow: a growth blocks the process's new transactions while it waits
for those open (up to 10 s), and a database grown by another process beyond this one's map must
wait the same way for this process's transactions to end before it can follow."""
_SMALLEST_DEFAULT_MAP_SIZE = 1 << 30
_MIN_MAP_SIZE = 16 * mmap.PAGESIZE
"""The smallest ``map_size`` open() takes: 16 LMDB pages (an LMDB page is an OS page; 64 KiB with 4 KiB
pages). Creating the four tables and committing the format tag needs 9; a smaller map fails inside
LMDB, after the files exist. The map grows by doubling from there, so a small start costs little."""
_INT_OPTIONS = {  # name -> (least value, what it is), for _check_options; the most is sys.maxsize
    "map_size": (_MIN_MAP_SIZE, "the initial map size in bytes"),
    "max_map_size": (_MIN_MAP_SIZE, "the largest map size in bytes"),
    "cache_nodes": (0, "the most decoded nodes cached, 0 for no cache"),
}


class Database:
    """An open tallytree database. Use :func:`tallytree.open` (or :func:`tallytree.open_memory`).

    It is a context manager that closes the database on exit.
    """

    def __init__(self, backend: Backend, *, cache_nodes: int, path: Path | None = None) -> None:
        self._backend = backend
        self._cache = NodeCache(cache_nodes)
        self._roots: dict[bytes, tuple[bytes, Root]] = {}  # decoded root records, see Transaction.root
        self._local = threading.local()
        self._aggregates: dict[str, Aggregate] = {}
        self._tables: dict[str, Table] = {}
        self._handled: dict[str, Definition] = {}  # extractors registered by ChangeHandlers
        self._closed = False
        self._forked_from: int | None = None  # the pid that opened it, in a process forked since
        self.path = path
        self._format: bytes | None = None  # the format tag as this process last found or wrote it
        self._format_epoch = -1  # the backend epoch at which a write transaction last confirmed it
        self._check_format()
        if path is not None:  # (a database in memory is this process's own copy after a fork)
            _ON_DISK.add(self)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"<tallytree.Database {where}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database. Idempotent. O(cached nodes).

        End transactions first: one still open raises TransactionError on its next read, and a write
        transaction still open writes nothing (its commit raises). Every later transaction, and so
        every read or write, raises TransactionError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> db.close()
        >>> db.close()  # a second close does nothing
        >>> db.aggregates()
        Traceback (most recent call last):
        tallytree.errors.TransactionError: the database is closed; open it again with tallytree.open()
        """
        if not self._closed:
            self._closed = True
            self._cache.clear()
            self._roots.clear()
            self._backend.close()

    def _cache_for(self, snapshot: int) -> NodeCache:
        """The node cache for a transaction of ``snapshot`` that the current one may not serve: a new
        empty one, from now on the database's, when the current one has served ``CACHE_SPAN``
        commits; a small one of its own for a transaction older than the current cache. O(1).

        A node id names a slot and a version of it (``_txn``), and a slot's version goes up by one
        per commit that rewrites it, wrapping after ``VERSIONS``: an id can come back, naming other
        contents, ``VERSIONS`` commits later. The nodes of one cache come from snapshots less than
        ``CACHE_SPAN`` (half of ``VERSIONS``) apart, so no id in it can mean two nodes. Replacing
        the cache, rather than clearing it, keeps it so: a transaction that began with the old one
        goes on using it alone. At 50,000 commits a second, a cache is replaced every 22 minutes."""
        cache = self._cache
        if snapshot < cache.floor:  # began before the cache was replaced (another thread's)
            return NodeCache(min(cache.capacity, _OLD_SNAPSHOT_CACHE), snapshot)
        fresh = NodeCache(cache.capacity, snapshot)
        fresh.hits, fresh.misses = cache.hits, cache.misses
        self._cache = fresh
        return fresh

    def _discard_if_unused(self) -> bool:
        """Close the database and remove it (and the directories ``open()`` made for it) if this
        ``open()`` created it and it holds no aggregate and no table: so that a failed first write,
        such as the CLI's build into a new path, leaves the path as it was. Returns whether it was
        removed. O(aggregates + tables).
        """
        backend = self._backend
        if not isinstance(backend, LmdbBackend) or not backend.made_database():
            return False
        if self.aggregates() or self.tables():
            return False
        self.close()
        try:
            backend.discard_made()
        except OSError:  # (something else was put in the directory meanwhile: leave it)
            return False
        return True

    def _check_format(self) -> None:
        """Check the format tag at open (see the module docstring): the current format opens; an
        older one opens as it is and is retagged when opened for writing; a newer one raises
        DatabaseFormatError; a tag missing or unreadable in a store that tallytree wrote (it holds
        one of :data:`_MARKS`) raises CorruptDatabaseError; a new database gets the tag. O(1)."""
        with self.read() as tx:
            stored = tx.meta(_FORMAT_KEY)
            marked = any(tx.meta(key) is not None for key in _MARKS)
            epoch = tx._epoch
        self._format, self._format_epoch = stored, epoch
        readonly = getattr(self._backend, "readonly", False)
        if stored == FORMAT:
            return
        if stored in _UPGRADABLE:
            if not readonly:
                with self.write() as wtx:
                    wtx.set_meta(_FORMAT_KEY, FORMAT)
                self._format = FORMAT
            return
        if stored is not None:
            raise _tag_error(stored, marked)
        if marked:
            raise CorruptDatabaseError(
                "this database holds tallytree's id counters but no format tag (META b'format'): the "
                "tag was lost to damage, and the database is refused. Restore it from a backup, or "
                "rebuild its aggregates from their source in a new directory"
            )
        if readonly:
            raise DatabaseFormatError("the database is empty and opened read-only; create it first")
        with self.write() as wtx:
            wtx.set_meta(_FORMAT_KEY, FORMAT)
        self._format = FORMAT

    def format_version(self) -> int:
        """The number of the format the database is stored in: 4, what this tallytree writes, or 1 to
        3 for an older database opened read-only (opening it for writing retags it 4). O(1).

        Raises CorruptDatabaseError if its tag was damaged since it was opened.

        >>> import tallytree
        >>> tallytree.open_memory().format_version()
        4
        """
        with self.read() as tx:
            stored = tx.meta(_FORMAT_KEY)
        number = format_number(stored) if stored is not None else None
        if number is None:
            raise _tag_error(stored or b"", marked=True)
        return number

    def _confirm_format(self, tx: WriteTransaction) -> None:
        """In a write transaction that found other processes' commits (its epoch moved): raise before
        anything is written if the format tag is no longer one this tallytree writes to (a newer
        tallytree opened the database for writing and retagged it; or the tag was damaged). One META
        get, in a transaction after another process's commit only."""
        stored = tx.meta(_FORMAT_KEY)
        if stored not in (self._format, FORMAT, *_UPGRADABLE):
            raise _format_changed(stored, self._format, writing=True)
        self._format, self._format_epoch = stored, tx._epoch

    def _upgraded(self) -> DatabaseFormatError | None:
        """After a CorruptDatabaseError out of a read block: the error to raise instead if the
        database has since been tagged with a newer format than this tallytree reads (a newer
        tallytree opened it for writing, while this process had it open), else None. One read
        transaction, on that error's path only."""
        if self._closed:
            return None
        try:
            with self.read() as tx:
                stored = tx.meta(_FORMAT_KEY)
        except Exception:  # (damage that keeps the tag from being read: the first error stands)
            return None
        number = format_number(stored) if stored is not None else None
        if number is None or number <= _FORMAT_VERSION:
            return None
        return _format_changed(stored, self._format, writing=False)

    # ------------------------------------------------------------ transactions

    def read(self) -> AbstractContextManager[ReadTransaction]:
        """A read transaction: one consistent snapshot, never blocking or blocked by the writer.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> with db.read() as tx:
        ...     db.aggregate("events").count(tx)
        0
        """
        return _Reading(self)

    def write(self) -> AbstractContextManager[WriteTransaction]:
        """The write transaction: every change inside commits together when the block ends.

        An exception in the block aborts it, writing nothing. One writer at a time (across processes
        too); a second ``db.write()`` in the same thread raises TransactionError. ``tx.commit()`` or
        ``tx.abort()`` in the block ends the transaction early: later uses of ``tx`` raise
        TransactionError, a new ``db.write()`` may begin, and the block's end does nothing more.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores")
        >>> try:
        ...     with db.write() as tx:
        ...         scores.insert(tx, 1, "a")
        ...         raise RuntimeError("something went wrong")
        ... except RuntimeError:
        ...     pass
        >>> with db.read() as tx:  # the insert was rolled back with the rest of the transaction
        ...     scores.count(tx)
        0
        """
        return _Writing(self)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error("the database is closed; open it again with tallytree.open()")

    def _closed_error(self, message: str) -> TransactionError:
        """The error for a use of this closed database: ``message``, or, in a process forked since
        the database was opened, what to do about the fork."""
        if self._forked_from is None:
            return TransactionError(message)
        return TransactionError(
            f"{self.path} was opened by process {self._forked_from}, which then forked: LMDB must not "
            "be used across fork(), and this process may use neither the database nor a transaction "
            "begun before the fork. Open it again here with tallytree.open() (in a pre-forking "
            "server, open it after the fork)"
        )

    # ------------------------------------------------------------ aggregates

    def aggregate(
        self,
        name: str,
        *,
        values: Sequence[str] | None = None,
        node_size: int | None = None,
        create: bool = True,
    ) -> Aggregate:
        """Open the aggregate ``name``, creating it (in its own transaction) if needed.

        ``values`` names the numeric fields summed for every item, fixed at creation; reopening with
        different ``values`` or ``node_size`` raises SchemaMismatchError. ``create=False`` raises
        AggregateNotFoundError for an unknown name. An object this database returned before is
        returned again while it is current (a read transaction confirms it, about 4 us), and a new
        one once another process dropped the aggregate. O(1).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> db.aggregate("events", values=("cost", "tokens"))
        <Aggregate 'events' values=('cost', 'tokens') node_size=128>
        """
        self._check_open()
        _check_name(name, "an aggregate")
        check_flag(create, "create")
        fields = _check_fields(values) if values is not None else None
        if node_size is not None:
            node_size = _check_node_size(node_size)
        known = self._aggregates.get(name)
        if known is None or not known._current():  # (dropped, by another process perhaps: load again)
            known = self._load_aggregate(name)
        if known is None:
            if not create:
                raise AggregateNotFoundError(
                    f"no aggregate named {name!r}; the database has {self.aggregates()}"
                )
            known = self._create_aggregate(name, fields or (), node_size or DEFAULT_NODE_SIZE)
        if fields is not None and fields != known.fields:
            raise SchemaMismatchError(
                f"aggregate {name!r} sums {list(known.fields)}, not {list(fields)}; value fields "
                "are fixed at creation (drop_aggregate() and rebuild to change them)"
            )
        if node_size is not None and node_size != known.node_size:
            raise SchemaMismatchError(
                f"aggregate {name!r} was created with node_size={known.node_size}, not {node_size}"
            )
        self._aggregates[name] = known
        return known

    def _load_aggregate(self, name: str) -> Aggregate | None:
        with self.read() as tx:
            data = tx.meta(DEFINITIONS + name.encode())
            if data is None:
                return None
            return self._aggregate_from(name, data, tx)

    def _aggregate_from(self, name: str, data: bytes, tx: Transaction) -> Aggregate:
        """The aggregate of a stored definition, read in ``tx`` (see ``_txn.decode_definition``, which
        raises CorruptDatabaseError for a damaged one). O(fields)."""
        definition = decode_definition(name, data, tx)
        fields = tuple(definition["values"])
        aggregate = Aggregate(self, name, definition["id"], fields, definition["node_size"])
        aggregate._set_owner(definition.get("table"))
        aggregate._record = data  # decoded: its first confirmation (Aggregate._confirm) compares bytes
        return aggregate

    def _create_aggregate(self, name: str, fields: tuple[str, ...], node_size: int) -> Aggregate:
        if getattr(self._local, "writing", False):
            raise TransactionError(
                f"aggregate {name!r} does not exist yet and creating it needs its own write "
                "transaction; define it (db.aggregate(), table.aggregate() or hooks.aggregate()) "
                "before `with db.write()`"
            )
        with self.write() as tx:
            data = tx.meta(DEFINITIONS + name.encode())
            if data is not None:  # created meanwhile by another thread or process
                return self._aggregate_from(name, data, tx)
            return define_aggregate(tx, name, fields, node_size)

    def aggregates(self) -> list[str]:
        """The names of the aggregates in the database, sorted.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> _ = db.aggregate("visits"), db.aggregate("costs", values=("usd",))
        >>> db.aggregates()
        ['costs', 'visits']
        """
        with self.read() as tx:
            return [aggregate.name for aggregate in self.aggregates_in(tx)]

    def aggregates_in(self, tx: Transaction) -> list[Aggregate]:
        """The aggregates defined in the snapshot of ``tx``, by name, read through ``tx`` itself.

        Opens no transaction of its own: a second transaction opened while ``tx`` is open would fail
        if another process grew the map in between (LMDB adopts a new map size only when no
        transaction of the process is open). O(aggregates). Raises TransactionError for a
        transaction of another database or one that has ended.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> _ = db.aggregate("visits")
        >>> with db.read() as tx:
        ...     [aggregate.name for aggregate in db.aggregates_in(tx)]
        ['visits']
        """
        found = []
        for _, aggregate in self._definitions_in(tx):
            if isinstance(aggregate, CorruptDatabaseError):
                raise aggregate
            found.append(aggregate)
        return found

    def _definitions_in(self, tx: Transaction) -> list[tuple[str | bytes, Aggregate | CorruptDatabaseError]]:
        """Every aggregate definition in the snapshot of ``tx``, by name: the aggregate, or the
        CorruptDatabaseError of a damaged definition, with its name (the raw bytes of a name that is
        not UTF-8). What ``check`` reports damaged definitions from. O(aggregates)."""
        tx.check_database(self)
        prefix = DEFINITIONS
        stop = prefix[:-1] + bytes([prefix[-1] + 1])
        found: list[tuple[str | bytes, Aggregate | CorruptDatabaseError]] = []
        for key, data in tx.kv.scan(0, prefix, stop):
            try:
                name = stored_name(key, prefix, "an aggregate")
            except CorruptDatabaseError as exc:
                found.append((key[len(prefix) :], exc))
                continue
            known = self._aggregates.get(name)
            try:
                if known is None:
                    found.append((name, self._aggregate_from(name, data, tx)))
                    continue
                if known._record != data:  # (checked even so: check() reports a damaged definition)
                    decode_definition(name, data, tx)
                found.append((name, known))
            except CorruptDatabaseError as exc:
                if lmdb_damage(exc) is not None:  # a page of the file, not this definition
                    raise
                found.append((name, exc))
        return found

    def drop_aggregate(self, name: str) -> None:
        """Delete an aggregate with every namespace and node. O(nodes). Raises AggregateNotFoundError.

        Reads and writes through the old :class:`Aggregate` object then raise TransactionError (it
        would otherwise answer as an empty aggregate); ``db.aggregate(name)`` creates a new one.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> old = db.aggregate("old")
        >>> with db.write() as tx:
        ...     old.insert_many(tx, [(n, "x") for n in range(100)], namespace="a")
        100
        >>> db.drop_aggregate("old")
        >>> db.aggregates()
        []
        """
        aggregate = self.aggregate(name, create=False)
        with self.read() as tx:
            data = tx.meta(DEFINITIONS + name.encode())
            owner = decode_definition(name, data).get("table") if data is not None else None
        if owner is not None:
            raise TransactionError(
                f"aggregate {name!r} is maintained by table {owner!r}; use "
                f"db.table({owner!r}).drop_aggregate({name!r}) (or detach it first)"
            )
        with self.write() as tx:
            for tree_key, root in list(self._trees(tx, aggregate)):
                tree = Tree(tx, len(aggregate.fields), aggregate.node_size, root)
                tree.delete_range(0, tree.count)
                tx.set_root(tree_key, None)
            tx.set_meta(DEFINITIONS + name.encode(), None)
        aggregate._dropped = f"aggregate {name!r} was dropped"
        self._aggregates.pop(name, None)

    def _trees(self, tx: Transaction, aggregate: Aggregate) -> Iterator[tuple[bytes, Any]]:
        prefix = aggregate._prefix
        stop = (aggregate._id + 1).to_bytes(4, "big")
        for key, value in tx.kv.scan(ROOTS, prefix, stop):
            yield key, decode_root(value)

    # ------------------------------------------------------------ tables

    def table(self, name: str, *, create: bool = True) -> Table:
        """Open the table ``name``, creating it (in its own transaction) if needed.

        A table stores documents and keeps its attached aggregates in sync with them; see
        :class:`~tallytree.Table`. Reattaches the field-based aggregates stored with it. ``create=False``
        raises TableNotFoundError for an unknown name. O(attached aggregates).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> db.table("events")
        <Table 'events' aggregates=[]>
        """
        self._check_open()
        _check_name(name, "a table")
        check_flag(create, "create")
        known = self._tables.get(name)
        if known is not None and known._dropped is None:  # (a dropped one: the name may be reused)
            return known
        key = b"table:" + name.encode()
        with self.read() as tx:
            record = tx.meta(key)
        if record is None:
            if not create:
                raise TableNotFoundError(f"no table named {name!r}; the database has {self.tables()}")
            check_writing(self, f"creating table {name!r}")
            with self.write() as wtx:
                record = wtx.meta(key) or create_table(self, wtx, name)
        table = table_from(self, name, record)
        with self.read() as tx:
            table._load(tx, tx.meta(key))
        self._tables[name] = table
        return table

    def tables(self) -> list[str]:
        """The names of the tables in the database, sorted. O(t) for t tables.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> _ = db.table("orders"), db.table("invoices")
        >>> db.tables()
        ['invoices', 'orders']
        """
        with self.read() as tx:
            prefix = b"table:"
            stop = prefix[:-1] + bytes([prefix[-1] + 1])
            return [stored_name(key, prefix, "a table") for key, _ in tx.kv.scan(0, prefix, stop)]

    def drop_table(self, name: str) -> None:
        """Delete a table with its documents and attached aggregates. Raises TableNotFoundError.

        Needs its own write transaction (call it before ``with db.write()``). O(documents + nodes of
        the attached aggregates).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> orders = db.table("orders")
        >>> _ = orders.aggregate("orders_by_day", key="day")
        >>> with db.write() as tx:
        ...     _ = orders.insert_many(tx, [{"day": day} for day in range(10)])
        >>> db.drop_table("orders")
        >>> db.tables(), db.aggregates()
        ([], [])
        """
        self.table(name, create=False).drop()

    def namespace_of(self, tree_key: bytes) -> Any:
        """Decode the namespace part of a tree key (aggregate id + encoded namespace). O(key length).

        Tree keys are what :meth:`tallytree.WriteTransaction.changed_roots` returns, for instance:

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events")
        >>> with db.write() as tx:
        ...     events.insert(tx, 1, "e1", namespace=("eu", 7))
        ...     [db.namespace_of(tree_key) for tree_key in tx.changed_roots()]
        [('eu', 7)]
        """
        return decode_key(tree_key, 4)[0]

    def cache_info(self) -> dict[str, int]:
        """Node cache statistics: size, capacity, hits and misses.

        >>> import tallytree
        >>> tallytree.open_memory(cache_nodes=1000).cache_info()["capacity"]
        1000
        """
        cache = self._cache
        return {
            "size": len(cache),
            "capacity": cache.capacity,
            "hits": cache.hits,
            "misses": cache.misses,
        }

    # ------------------------------------------------------------ backups and space

    def backup(self, path: str | os.PathLike[str], *, compact: bool = True) -> None:
        """Copy the database, as of its last commit, into the new or empty directory ``path``.

        The copy is one consistent snapshot, taken while other threads and processes go on reading and
        writing (they are not blocked; the snapshot is held as a read transaction is, see
        docs/operations.md), and it opens as a tallytree database of its own. It works on a database
        opened with ``readonly=True``. ``compact=True`` (the default) writes only the pages in use,
        renumbered, so the copy is as small as the data (a database whose file grew, with many free
        pages, shrinks: see docs/operations.md, "Space"); ``compact=False`` copies the file's pages as
        they are, free ones too. A database in memory is written out as a new LMDB database (always
        compact), which ``tallytree.open(path)`` then opens.

        ``path`` is made, with missing parents, if it does not exist; it is never written over: a file,
        or a directory holding anything, raises InvalidArgumentError (a ValueError). Inside
        ``with db.write()`` it raises TransactionError (the copy would not hold the block's writes). A
        failure (a full disk raises StorageError, a damaged file CorruptDatabaseError) or an
        interruption (Ctrl-C) leaves no ``data.mdb`` in ``path``, and removes the directories made for
        it. The copy is synced to the disk before this returns.

        O(pages of the file) to copy it, plus O(pages in use) to compact; O(entries) in memory. A
        compacting backup needs room for the uncompacted image too while it runs.

        >>> import tallytree, tempfile
        >>> db = tallytree.open(tempfile.mkdtemp() + "/live.tt")
        >>> events = db.aggregate("events")
        >>> with db.write() as tx:
        ...     events.insert(tx, 1, "e1")
        >>> copy = tempfile.mkdtemp() + "/copy.tt"
        >>> db.backup(copy)
        >>> with tallytree.open(copy, readonly=True) as restored, restored.read() as tx:
        ...     restored.aggregate("events").count(tx), tallytree.check(tx)
        (1, [])
        >>> db.close()
        """
        self._check_open()
        _check_path(path)
        check_flag(compact, "compact")
        if getattr(self._local, "writing", False):
            raise TransactionError(
                "db.backup() inside `with db.write()`: the copy holds committed data only, not this "
                "block's writes; call it after the block"
            )
        backend = self._backend
        assert isinstance(backend, (LmdbBackend, MemoryBackend))
        destination = Path(path)
        made = _lmdbfile.prepare_destination(destination)
        try:
            _lmdbfile.backup(backend, destination, compact=compact)
        except BaseException as exc:
            for directory in made:
                try:
                    directory.rmdir()
                except OSError:
                    break
            if (damage := damage_error(exc)) is not None:
                raise damage from exc
            raise

    def storage_info(self) -> dict[str, Any] | None:
        """How the database file uses its space, and who holds old snapshots; None in memory.

        An LMDB file is made of pages (``page_bytes`` each). A commit writes the pages it changes as
        new copies and frees the old ones; LMDB reuses free pages for later writes, but only once no
        read transaction still reads a snapshot that uses them. The file never shrinks. Entries, as
        of the last commit (``last_commit``, LMDB's commit id):

        * ``file_bytes`` (the size of ``data.mdb``), ``disk_bytes`` (what it takes on the disk),
          ``map_bytes`` (the map: address space, grows by doubling; see docs/operations.md);
        * ``pages``: the pages up to the last one in use; ``pages_used`` by the data, LMDB's catalog
          and its free list; ``pages_free`` (the rest); of these, ``pages_reusable`` by the next write,
          and ``pages_held_by_readers``: free pages kept from reuse only because an open read
          transaction reads an older snapshot (the others were freed by the last commit, which LMDB
          keeps until the next one). Both are None when the free list could not be read (another
          LMDB file layout; it never happens with the LMDB py-lmdb bundles);
        * ``compacted_bytes``: the size a compacting :meth:`backup` would have;
        * ``readers``: read transactions open now, in every process; ``oldest_reader_lag``: how many
          commits behind the last one the oldest of them reads (None without readers), and
          ``oldest_reader_pid`` its process; ``dead_readers``: how many belong to processes of this
          machine that no longer run (a killed process's slot stays until the next write frees it;
          None where that cannot be asked).

        O(records of LMDB's free list): a page read each, the first page of each record only.

        >>> import tallytree, tempfile
        >>> db = tallytree.open(tempfile.mkdtemp() + "/space.tt")
        >>> info = db.storage_info()
        >>> info["pages"] == info["pages_used"] + info["pages_free"], info["readers"]
        (True, 0)
        >>> db.close()
        >>> tallytree.open_memory().storage_info() is None
        True
        """
        self._check_open()
        backend = self._backend
        if not isinstance(backend, LmdbBackend):
            return None
        try:
            return _lmdbfile.space(backend)
        except LMDB_DAMAGE as exc:
            raise damaged(exc) from exc


def format_number(tag: bytes) -> int | None:
    """The format number of a format tag, ``tallytree-`` and a number from 1 without leading zeros,
    or None for bytes that no tallytree writes as one. O(len(tag)).

    >>> format_number(b"tallytree-3"), format_number(b"tallytree-0"), format_number(b"\\xff")
    (3, None, None)
    """
    digits = tag[len(_TAG_PREFIX) :] if tag.startswith(_TAG_PREFIX) else b""
    if not digits.isdigit() or digits.startswith(b"0") or len(digits) > 9:
        return None
    return int(digits)


def _tag_error(stored: bytes, marked: bool) -> DatabaseFormatError:
    """The error for a format tag this tallytree does not read, found at open: a newer format's
    (DatabaseFormatError), a damaged tag in a store tallytree wrote (``marked``: it holds tallytree's
    counters, or the tag begins as tallytree's) or another application's record (DatabaseFormatError)."""
    number = format_number(stored)
    if number is not None and number > _FORMAT_VERSION:
        return DatabaseFormatError(
            f"this database has format {number} (tag {stored!r}), written by a newer tallytree; this "
            f"tallytree reads formats 1 to {_FORMAT_VERSION}. Open it with a tallytree that reads format "
            f"{number} (upgrade tallytree)"
        )
    if marked or stored.startswith(_TAG_PREFIX):
        return CorruptDatabaseError(
            f"the format tag of this database (META b'format') is {stored!r:.60}, which no tallytree "
            f"writes (tags are {_TAG_PREFIX!r} and a format number from 1): the tag is damaged, and the "
            "database is refused. Restore it from a backup, or rebuild its aggregates from their source "
            "in a new directory"
        )
    return DatabaseFormatError(
        f"this LMDB environment's meta table holds {stored!r:.60} under b'format', which is no tallytree "
        "format tag, and none of tallytree's counters: it is another application's; tallytree will not "
        "write into it. Use a new directory"
    )


def _format_changed(
    stored: bytes | None, opened: bytes | None, *, writing: bool
) -> CorruptDatabaseError | DatabaseFormatError:
    """The error for a format tag that changed, while this process had the database open, to one
    this tallytree does not read or write: a newer format's, or a damaged tag (``writing``: met as a
    write transaction began)."""
    number = format_number(stored) if stored is not None else None
    if number is None or number <= _FORMAT_VERSION:
        return CorruptDatabaseError(
            f"the format tag of this database (META b'format') changed to {stored!r:.60} while this "
            f"process had it open (it was {opened!r}): the tag is damaged, and the database will be refused "
            "at its next open. Restore it from a backup, or rebuild its aggregates from their source"
        )
    return DatabaseFormatError(
        f"the database was upgraded to format {number} by a newer tallytree after this process opened it "
        f"(at {opened!r}); this tallytree reads and writes formats up to {_FORMAT_VERSION}"
        + (", and nothing was written" if writing else "")
        + ". Restart this process with the newer tallytree (every process sharing the database must run it)"
    )


def stored_name(key: bytes, prefix: bytes, what: str) -> str:
    """The name in a META key (``prefix`` + name) of ``what`` ("an aggregate", "a table");
    CorruptDatabaseError for one that is not UTF-8 (tallytree writes names as str). O(len(key))."""
    try:
        return key[len(prefix) :].decode()
    except UnicodeDecodeError as exc:
        raise CorruptDatabaseError(
            f"the META record {key!r} names {what} with bytes that are not UTF-8: the record is damaged; "
            "run `tallytree check` to see all the damage, then restore the database from a backup "
            "or rebuild its aggregates from their source"
        ) from exc


def define_aggregate(
    tx: WriteTransaction,
    name: str,
    fields: tuple[str, ...],
    node_size: int,
    *,
    owner: str | None = None,
    extractors: Mapping[str, Any] | None = None,
) -> Aggregate:
    """Write the definition of a new aggregate in ``tx`` (``owner``: the table that maintains it;
    ``extractors``: the description of the definition a ChangeHandler registers it with) and return
    it, with the next id of the counter (META ``next_agg``).

    An id is never reused, so a counter set back (a foreign writer, a META record restored from an
    old copy) would give the new aggregate the trees of an existing one, which it would then answer
    from and write into: an id that a definition or a root record (one cursor seek) already uses
    raises CorruptDatabaseError, and the write transaction, aborted, writes nothing. O(aggregates)."""
    stored = tx.meta(NEXT_AGGREGATE)
    agg_id = int.from_bytes(stored, "big") if stored else 1
    taken = not 1 <= agg_id <= MAX_AGGREGATE_ID
    if not taken:
        start, stop = agg_id.to_bytes(4, "big"), (agg_id + 1).to_bytes(4, "big")
        taken = next(tx.kv.scan(ROOTS, start, stop), None) is not None
    if not taken:
        taken = any(
            aggregate._id == agg_id
            for _, aggregate in tx._db._definitions_in(tx)
            if not isinstance(aggregate, CorruptDatabaseError)
        )
    if taken:
        raise counter_damaged("aggregate", name, NEXT_AGGREGATE, agg_id)
    tx.set_meta(NEXT_AGGREGATE, (agg_id + 1).to_bytes(4, "big"))
    definition: dict[str, Any] = {"id": agg_id, "values": list(fields), "node_size": node_size}
    if owner is not None:
        definition["table"] = owner
    if extractors is not None:
        definition["extractors"] = dict(extractors)
    tx.set_meta(DEFINITIONS + name.encode(), msgpack.packb(definition, datetime=True))
    return Aggregate(tx._db, name, agg_id, fields, node_size)


def _check_name(name: object, what: str) -> None:
    """Raise ArgumentTypeError unless ``name`` (of ``what``: "an aggregate", "a table") is a str, and
    InvalidArgumentError unless it has 1 to 200 chars."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{what} name is a str, not {type(name).__name__} {name!r}")
    if not name or len(name) > 200:
        raise InvalidArgumentError(f"{what} name is a non-empty str of at most 200 chars, not {name!r}")


def _check_node_size(node_size: object) -> int:
    """``node_size`` as a plain int (a numpy integer is its int); ArgumentTypeError for another type
    (a bool, a float), InvalidArgumentError out of range. O(1)."""
    message = f"node_size must be an int from {MIN_NODE_SIZE} to {MAX_NODE_SIZE}, not {node_size!r}"
    size = node_size if type(node_size) is int else as_int(node_size, message)
    if not MIN_NODE_SIZE <= size <= MAX_NODE_SIZE:
        raise InvalidArgumentError(message)
    return size


def _check_fields(values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise InvalidArgumentError(f"values= takes a sequence of field names, e.g. ({values!r},), not a str")
    try:
        fields = tuple(values)
    except TypeError:
        raise ArgumentTypeError(
            f"values= takes a sequence of field names, e.g. ('cost', 'tokens'), not {values!r}"
        ) from None
    for field in fields:
        if not isinstance(field, str):
            raise ArgumentTypeError(f"value field names are str identifiers, not {field!r}")
        if field in RESERVED_FIELDS:
            raise InvalidArgumentError(
                f"{field!r} is reserved (it names a Totals attribute); pick another name"
            )
        if not field_name_ok(field):
            raise InvalidArgumentError(
                f"value field names are identifiers not starting with '_', not {field!r}"
            )
    if len(set(fields)) != len(fields):
        raise InvalidArgumentError(f"value field names must be unique: {list(fields)}")
    return fields


class _Reading:
    """What :meth:`Database.read` returns: the transaction begins on entering the block and ends on
    leaving it (a plain class: a generator-based context manager costs a microsecond more per read)."""

    __slots__ = ("_db", "_tx")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tx: ReadTransaction | None = None

    def __enter__(self) -> ReadTransaction:
        db = self._db
        db._check_open()
        tx = self._tx = ReadTransaction(db, db._backend.begin(False))
        return tx

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.abort()
        if kind is not None and (damage := damage_error(value)) is not None:
            raise damage from value
        if kind is not None and isinstance(value, CorruptDatabaseError) and (newer := self._db._upgraded()):
            raise newer from value  # (a newer tallytree's records do not decode here)


class _Writing:
    """What :meth:`Database.write` returns: the transaction begins on entering the block, commits
    when the block ends normally and aborts when it raises (a plain class, as :class:`_Reading`)."""

    __slots__ = ("_db", "_tx")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tx: WriteTransaction | None = None

    def __enter__(self) -> WriteTransaction:
        db = self._db
        if db._closed:  # (_check_open, inlined)
            db._check_open()
        local = db._local
        if getattr(local, "writing", False):
            raise TransactionError(
                "a write transaction is already open in this thread; do all the writes in it "
                "(nested write transactions would wait for each other forever)"
            )
        tx = self._tx = WriteTransaction(db, db._backend.begin(True))
        local.writing = True
        if tx._epoch != db._format_epoch:  # another process committed: is the format still this one?
            try:
                db._confirm_format(tx)
            except BaseException:
                self._tx = None
                try:
                    tx.abort()
                finally:
                    local.writing = False
                raise
        return tx

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        try:
            if kind is None:
                tx.commit()  # which ends the transaction whatever it raises
            else:
                tx.abort()
        except StorageError as exc:  # LMDB met damaged pages as it wrote: not the disk's refusal
            if (damage := damage_error(exc.__cause__)) is None:
                raise
            raise damage from exc.__cause__
        finally:
            self._db._local.writing = False
        if kind is not None and (damage := damage_error(value)) is not None:
            raise damage from value


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def damage_error(error: BaseException | None) -> CorruptDatabaseError | None:
    """The CorruptDatabaseError for ``error`` if it is an LMDB error for a damaged file that tallytree
    met (:data:`~tallytree._lmdb.LMDB_DAMAGE`, raised from its own code: one a caller's own LMDB
    environment raised inside a ``with db.read()`` block is left alone), else None.

    Reads translate these where they meet LMDB (``_lmdb``); ``db.read()`` and ``db.write()``
    translate what is left as their block ends (raising the new error from ``__exit__``, chained to
    LMDB's): what a write's batch merge met (it reads through LMDB directly) and what a commit
    met; ``open()`` and ``check()`` too. O(frames) on the error's way only."""
    if not isinstance(error, LMDB_DAMAGE):
        return None
    trace = error.__traceback__
    if trace is None:
        return None
    while trace.tb_next is not None:
        trace = trace.tb_next
    if not trace.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        return None
    return damaged(error)


def lmdb_damage(error: BaseException | None) -> BaseException | None:
    """LMDB's error for a damaged file that tallytree met, if ``error`` is one (see
    :func:`damage_error`) or a CorruptDatabaseError translated from one, else None: damage that
    makes LMDB refuse every later call of the transaction, which ``check`` stops at. O(frames)."""
    if isinstance(error, CorruptDatabaseError):
        error = error.__cause__
    return error if damage_error(error) is not None else None


_ON_DISK: weakref.WeakSet[Database] = weakref.WeakSet()
"""The databases on LMDB this process opened (see :func:`_forked`)."""


def _forked() -> None:
    """In a forked child: every database on LMDB the parent had open is closed here, without touching
    LMDB (see ``_lmdb._mark_forked``), so that neither it nor a transaction inherited from the parent
    reads or writes, and ``tallytree.open()`` can open the database again."""
    parent = os.getppid()
    for db in list(_ON_DISK):
        if not db._closed:
            db._closed = True
            db._forked_from = parent


os.register_at_fork(after_in_child=_forked)


def open(
    path: str | os.PathLike[str],
    *,
    map_size: int | None = None,
    max_map_size: int = 1 << 40,
    durable: bool = True,
    readonly: bool = False,
    create: bool = True,
    cache_nodes: int = DEFAULT_CACHE_NODES,
) -> Database:
    """Open (or create) the database in the directory ``path``.

    ``map_size`` is the initial size of the LMDB map in bytes (by default 64 GiB of address space on
    64-bit POSIX systems, less if the process cannot map that much, 1 GiB on Windows and 32-bit
    systems; ``max_map_size`` if that is smaller); it doubles when full, up to ``max_map_size`` (1 TiB
    by default). Both are ints (a numpy integer too; never a bool or a float, as for every int argument)
    from 16 OS pages (64 KiB with 4 KiB pages) to ``sys.maxsize``, and ``map_size`` may not exceed
    ``max_map_size``. ``durable=False`` skips the fsync of each commit (safe against a killed process,
    not against a power loss). ``cache_nodes`` (an int >= 0; 0 caches nothing) bounds the decoded-node
    cache shared by all transactions. ``durable``, ``readonly`` and ``create`` are bools.

    Arguments are checked before anything is created: a wrong type raises ArgumentTypeError (a
    TypeError), an unacceptable value (an empty path, a size out of range) InvalidArgumentError (a
    ValueError). Raises DatabaseFormatError for a path that is a file, a non-empty foreign directory, an
    LMDB environment that tallytree did not create, or an incompatible format version.

    >>> import tallytree, tempfile
    >>> with tallytree.open(tempfile.mkdtemp() + "/stats.tt") as db:
    ...     db.aggregates()
    []
    """
    _check_path(path)
    options = _check_options(
        map_size=map_size,
        max_map_size=max_map_size,
        durable=durable,
        readonly=readonly,
        create=create,
        cache_nodes=cache_nodes,
    )
    map_size, max_map_size, cache_nodes = options["map_size"], options["max_map_size"], options["cache_nodes"]
    if map_size is None:
        map_size = _default_map_size(max_map_size)
    directory = Path(path)
    try:
        backend = LmdbBackend(
            directory,
            map_size=map_size,
            max_map_size=max_map_size,
            durable=durable,
            readonly=readonly,
            create=create,
        )
    except LMDB_DAMAGE as exc:  # (the backend closed what it opened)
        raise CorruptDatabaseError(
            f"{directory} is damaged: LMDB cannot read the list of its tables ({exc}). Restore the "
            "database from a backup, or rebuild its aggregates from their source"
        ) from exc
    try:
        return Database(backend, cache_nodes=cache_nodes, path=directory)
    except BaseException:  # (a new database whose format tag could not be written, for one)
        backend.close()
        backend.discard_made()
        raise


def _default_map_size(max_map_size: int) -> int:
    """The map size open() starts with when none is given: :data:`_DEFAULT_MAP_SIZE` or
    ``max_map_size``, whichever is smaller, halved while this process cannot map it (an address-space
    limit, ``ulimit -v``), down to 1 GiB (below which the backend reports what it cannot map).
    About 15 us per size tried.

    >>> _default_map_size(1 << 20)
    1048576
    """
    size = min(_DEFAULT_MAP_SIZE, max_map_size)
    while size > _SMALLEST_DEFAULT_MAP_SIZE and _unmappable(size) is not None:
        size //= 2
    return size


def open_memory(*, cache_nodes: int = DEFAULT_CACHE_NODES) -> Database:
    """Open a new, empty database held in memory (for tests, examples and throwaway data).

    It has the same API and semantics as an LMDB database, but commits cost O(size of the data).
    ``cache_nodes`` is as for :func:`open` (an int >= 0; a wrong type raises ArgumentTypeError, a
    negative number InvalidArgumentError).
    """
    options = _check_options(cache_nodes=cache_nodes)
    return Database(MemoryBackend(), cache_nodes=options["cache_nodes"])


def _check_path(path: object) -> None:
    """Raise ArgumentTypeError unless ``path`` is a str or os.PathLike of str, InvalidArgumentError
    if it is empty or holds a NUL. O(len(path))."""
    name = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"path must be a str or os.PathLike naming a directory, not {type(path).__name__} {path!r}"
        )
    if not name:
        raise InvalidArgumentError("path is empty (unset?); name a directory, '.' for the current one")
    if "\0" in name:
        raise InvalidArgumentError(f"path {name!r} contains a NUL character, which no file name can hold")


def _check_options(**options: object) -> dict[str, Any]:
    """Raise ArgumentTypeError or InvalidArgumentError for the first unacceptable option of
    :func:`open` or :func:`open_memory`, before anything is created on disk; return the options
    with each int option a plain int (a numpy integer is its int). The rules are in ``open``'s
    docstring. O(1)."""
    checked: dict[str, Any] = {}
    for option, value in options.items():
        if option not in _INT_OPTIONS:
            if not isinstance(value, bool):
                raise ArgumentTypeError(f"{option} must be True or False, not {value!r}")
        elif value is not None or option != "map_size":  # map_size=None: the default
            least, meaning = _INT_OPTIONS[option]
            message = f"{option} ({meaning}) must be an int, not {type(value).__name__} {value!r}"
            number = value if type(value) is int else as_int(value, message)
            if not least <= number <= sys.maxsize:
                raise InvalidArgumentError(
                    f"{option} ({meaning}) must be from {least} to sys.maxsize, not {number}"
                )
            checked[option] = number
            continue
        checked[option] = value
    map_size, max_map_size = checked.get("map_size"), checked.get("max_map_size")
    if map_size is not None and max_map_size is not None and map_size > max_map_size:
        raise InvalidArgumentError(
            f"map_size ({map_size}) is above max_map_size ({max_map_size}), and the map cannot start "
            "beyond its limit; raise max_map_size or lower map_size"
        )
    return checked
