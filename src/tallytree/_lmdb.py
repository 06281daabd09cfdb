"""Everything LMDB: the environment, the four named databases, map growth and error translation.

Design
======
One LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) with four named databases,
``meta``, ``nodes``, ``roots`` and ``docs`` (see ``_store``). LMDB gives one writer at a time and any
number of concurrent readers across threads and processes, each reading one consistent snapshot.

Writes reach LMDB only at commit, as one batch of puts and deletes. Node ids grow, so new nodes are
appended with ``MDB_APPEND``, all in one ``putmulti`` call; LMDB skips, without an error, a key that
is not above every key stored, so the commit checks that every new node was appended (a damaged
node id counter raises CorruptDatabaseError, writing nothing). When the batch does not fit the
map, the write transaction is aborted, the map is doubled (up to ``max_map_size``) and the batch is
re-applied in a new write transaction.
LMDB can resize only while no other transaction of this process is open: the writer waits for other
threads' transactions to end (new ones wait behind it; up to :data:`RESIZE_WAIT` seconds), and fails
at once if its own thread holds one. If another writer committed in between (LMDB then gives the new
write transaction a later id than the aborted one had), or the wait times out,
:class:`~tallytree.errors.MapFullError` or :class:`~tallytree.errors.TransactionError` is raised and
nothing is written. (Databases written before 2026-11-22 hold a generation counter in ``meta`` that
served this check; it is no longer read or written, so a commit writes one record less.) The open
transactions are kept in a list of thread ids that every transaction joins and leaves without a
lock (list appends and removals are atomic); only the rare waits use a condition variable.

How a write transaction ends without committing. py-lmdb (2.0 and later) makes a write transaction's
``abort()`` wait until no other thread of the process is inside an LMDB call; threads that keep
running short reads put that off indefinitely, and meanwhile the transaction holds LMDB's writer
lock, stopping every writer of every process. Its ``commit()`` waits for no one. Since writes are
buffered above until the commit, the LMDB write transaction of a write that fails, changes nothing or
is aborted has had no put: it is ended with ``commit()``, which writes nothing for a transaction
without dirty pages. One whose puts failed in LMDB (the map full, a damaged page) is marked failed
by LMDB, which then turns its ``commit()`` into an abort; the mark is read back (every call of a
failed transaction answers MDB_BAD_TXN), never assumed. Only puts followed by another failure (our
own check of the appended nodes, KeyboardInterrupt between two puts) need ``abort()``: committing
would write part of the batch. That abort holds the process's new transactions back, as a map
growth does, so it waits only for the calls of the transactions already open
(:meth:`LmdbBackend.end_write`). A read transaction's ``abort()`` resets it, waiting for no one.

Each transaction compares its snapshot's LMDB commit id with the last one this process made or saw:
a later one means another process committed in between, and moves the backend's ``epoch``, after
which each ``Aggregate`` object checks once that its stored definition is still there (another
process may have dropped it). A process that only reads, or is the only writer, never checks again.

py-lmdb is called with positional arguments on every hot path: its keyword parsing costs more than
LMDB's own work for a small get, put or begin.

The environment does not use ``MDB_WRITEMAP``, although it halves the cost of a small commit
(measured 44 -> 22 us for a 4-node commit): with it every process that opens or resizes the map
truncates the file to its own idea of the map size, and a writer in another process that had grown it
then dies of SIGBUS (seen in ``test_readers_see_consistent_snapshots_while_another_process_writes``).

Durability: ``durable=True`` syncs on every commit; ``durable=False`` leaves flushing to the operating
system, which survives a killed process (the data is in the page cache) but not a power loss.

An LMDB environment must not be used across ``fork()`` (its lock table, mutexes and map belong to the
process that opened it). A database open when the process forks is marked in the child (an
``os.register_at_fork`` hook): every transaction the child begins on it raises TransactionError,
saying to open it again in the child, before the inherited locks are touched. Nothing inherited is
aborted or closed in the child, which would free the parent's reader slots (see :func:`_mark_forked`);
the child drops it, transactions open at the fork included (they hold the environment, and py-lmdb
refuses a second open of the same files while it lives), and ``_db`` closes the inherited Database
objects: the child may open the database again at once, even inside an inherited ``with`` block.

What is opened must be tallytree's (:meth:`LmdbBackend._open_dbs`, before anything is written):
an environment whose main database names another table, or whose tables hold data without one of
the keys only tallytree writes in ``meta`` (:data:`_OWN_META`), is another application's and is
refused, even one whose only table is called ``meta``; tables that are all empty are a creation
that was interrupted, and open as a new database, as does a directory holding a ``lock.mdb`` alone
(LMDB makes it before ``data.mdb``). A ``data.mdb`` of 0 bytes is refused as damaged: LMDB would
fill it as a new environment, hiding the loss of a truncated database; one that LMDB refuses but
that begins with LMDB's magic is damaged (CorruptDatabaseError), anything else foreign. So is an
environment whose structure LMDB's own records contradict, as in a copy of ``data.mdb`` torn by a live
writer (pages the copy's header names were reused before they were copied): a main database holding
another number of keys than its record counts, LMDB errors in tables that all bear tallytree's names,
a ``meta`` that holds tallytree's keys beside main-database keys tallytree never writes, or a ``meta``
without them whose keys LMDB counts differently: CorruptDatabaseError, saying to restore a backup.

Errors are translated: a full map grows the map (or raises MapFullError), a commit the disk refuses
raises StorageError, the read transaction beyond the reader slots raises TransactionError, and a
read that meets a page LMDB cannot read (:data:`LMDB_DAMAGE`) raises CorruptDatabaseError there.

Workers opening a new path at once: a directory or a ``data.mdb`` that another process makes
meanwhile is taken as it is (:func:`_make_directory`, :func:`_checked_directory`), and ``data.mdb``
is created exclusively before LMDB opens it (:func:`_claim_data_file`), so that of the processes
creating a database one alone counts it as made, and removes it if its open fails.

A map the process cannot map (more than its address space or ``ulimit -v`` allows) is refused before
LMDB tries: LMDB unmaps the old map before it maps the new one, so a failed ``set_mapsize`` leaves
an environment with no map at all, which every later call finds closed. Each size is first tried as
a read-only anonymous mapping (:func:`_unmappable`, about 15 us: it reserves address space, not
memory), at ``open()`` (InvalidArgumentError, nothing created), before growing (a growth that cannot
double grows by an eighth; failing that, MapFullError with nothing written) and before adopting
another process's size (TransactionError). An ``open()`` that fails after LMDB created its files
removes them, and the directory if ``open()`` made it.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref
from _thread import get_ident
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import suppress
from itertools import islice
from operator import itemgetter
from pathlib import Path
from time import monotonic, sleep
from typing import Any

import lmdb

from ._native import speedups
from ._store import NODES, Op
from .errors import (
    CorruptDatabaseError,
    DatabaseFormatError,
    Error,
    InvalidArgumentError,
    MapFullError,
    ReadOnlyError,
    StorageError,
    TransactionError,
)

__all__ = ["LMDB_DAMAGE", "LmdbBackend", "damaged"]

_NAMES = (b"meta", b"nodes", b"roots", b"docs")
# keys of ``meta`` that only tallytree writes: the format tag (_db._FORMAT_KEY, a mark when its value
# is a tallytree tag: another application may keep a "format" of its own), the node, aggregate and
# table id counters (_txn._NEXT_ID, _db.NEXT_AGGREGATE, _table._NEXT_TABLE) and the generation
# counter of databases written before 2026-11-22
_OWN_META = (b"format", b"next_id", b"gen", b"next_agg", b"next_table")
_TAG = b"tallytree-"
_TABLE_RECORD = 48  # bytes of LMDB's record of a named database (MDB_db), its value in the main one
_DAMAGE = (  # LMDB's errors for pages that contradict its own structure (as _db._LMDB_DAMAGE)
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.BadDbiError,
    lmdb.IncompatibleError,
    lmdb.CursorFullError,
    lmdb.PageFullError,
    lmdb.BadChecksumError,
    lmdb.ProblemError,
    lmdb.BadTxnError,
)
_MAIN_LIMIT = 64  # keys of LMDB's main database read at open: tallytree's holds 4 (another's, any number)
_COUNT_LIMIT = 1 << 20  # keys of a meta table counted to tell damage from another application's data
_MAGIC = b"\xde\xc0\xef\xbe"  # LMDB's meta page magic (0xBEEFC0DE, little-endian), after a page header
_EMPTY_WAIT = 0.05  # seconds to let an LMDB environment being created write its first pages
_key_value = itemgetter(1, 2)  # an Op's key and value
_GROW = "the LMDB map is full and must grow"
_ADOPT = "another process grew the database map and this one must follow"
RESIZE_WAIT = 10.0
"""Seconds a writer that must grow the map waits for other threads' transactions to end."""
READERS = 256
"""LMDB reader slots: read transactions open at once, across every process using a database."""
READER_CHECK = 1.0
"""Seconds between two sweeps of the reader slots of dead processes by a process that writes."""
# How far an LMDB transaction went, which decides how it may end (see LmdbBackend.end_write)
_READ = 0  # a read transaction
_NOTHING_PUT = 1  # a write transaction before its first put or delete
_PUT = 2  # a write transaction that may hold puts or deletes
_COMMITTING = 3  # a write transaction handed to LMDB's commit, which ends it whatever it returns
_ENDED = 4  # a write transaction LMDB committed

LMDB_DAMAGE = (
    lmdb.CorruptedError,  # MDB_CORRUPTED: "Located page was wrong type"
    lmdb.PageNotFoundError,  # MDB_PAGE_NOTFOUND: a page number beyond the file
    lmdb.BadDbiError,  # a named database's record in the main one changed under its handle
    lmdb.IncompatibleError,  # a named database's flags damaged
    lmdb.CursorFullError,  # LMDB's own tree deeper than it can be: its page links form a cycle
    lmdb.PageFullError,
    lmdb.BadChecksumError,  # (LMDB 1.0's, as ProblemError: py-lmdb 3.0 opens its files too)
    lmdb.ProblemError,
    lmdb.BadTxnError,  # MDB_BAD_TXN: every later call of a transaction that met one of the above
)
"""The errors LMDB raises for a damaged file (a failing disk, a foreign writer): its pages are not
what its own structure says. A transaction that met one is refused every later call (MDB_BAD_TXN:
tallytree nests no transactions, and ends a write that filled the map before it retries in a new
one, so a read meets that error only after damage). Other LMDB errors (a full map, the reader
slots, a map grown by another process, the disk refusing a write) are about the environment, not
the data, and are translated where they arise. Reads (``get``, ``scan``, ``scan_batches``)
translate these into CorruptDatabaseError (:func:`damaged`) where they meet them."""


def damaged(error: BaseException) -> CorruptDatabaseError:
    """The CorruptDatabaseError for LMDB's ``error`` (one of :data:`LMDB_DAMAGE`), to raise from it.

    >>> damaged(lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"))
    CorruptDatabaseError('the database file is damaged: LMDB found a page ...')
    """
    found = (
        "this transaction met a damaged page earlier, and LMDB refuses it every later call"
        if isinstance(error, lmdb.BadTxnError)
        else "LMDB found a page that its own structure contradicts"
    )
    return CorruptDatabaseError(
        f"the database file is damaged: {found} ({error}). Run `tallytree check` to see what can "
        "still be read, then restore the database from a backup or rebuild its aggregates from their source"
    )


_OPEN: weakref.WeakSet[LmdbBackend] = weakref.WeakSet()


def _mark_forked() -> None:
    """In a forked child: every environment the parent had open is unusable here.

    Nothing inherited may be aborted or closed either: the reader table is shared memory, and
    LMDB's abort of an inherited read transaction, or close of the environment, would free the
    parent's reader slot, letting a writer reuse the pages of the parent's open snapshot. py-lmdb
    frees a transaction or environment that a child merely drops without touching the table, and
    forgets the environment's files then, so that the child may open the database again: the
    backend drops its references here, those of the transactions open at the fork too
    (``_LmdbTxn.drop``), whose end later does nothing."""
    for backend in list(_OPEN):
        backend.forked = True
        backend.env = None
        backend.dbs = []
        for txn in backend.live:  # a transaction open at the fork holds the environment
            txn.drop()
        backend.live.clear()


os.register_at_fork(after_in_child=_mark_forked)


class _LmdbTxn:
    __slots__ = ("_backend", "_dbs", "_ident", "_stage", "_txn", "epoch", "snapshot")

    def __init__(self, backend: LmdbBackend, write: bool) -> None:
        self._backend = backend
        self._dbs = backend.dbs
        self._ident = ident = get_ident()
        self._stage = _NOTHING_PUT if write else _READ  # how far a write went (see end_write)
        self._txn: Any = backend.begin_raw(write, ident)
        backend.live.add(self)
        # LMDB's id of the last commit this snapshot holds (a write transaction's own id is the next)
        self.snapshot = snapshot = self._txn.id() - write
        if snapshot > backend.seen:  # commits this process did not make (see LmdbBackend.epoch)
            backend.seen = snapshot
            backend.epoch += 1
        self.epoch = backend.epoch

    def get(self, table: int, key: bytes) -> bytes | None:
        # bytes already (the transaction has no buffers); positional arguments, see _apply_ops. The
        # try costs nothing unless LMDB raises (Python 3.11's exceptions cost only when raised)
        try:
            return self._txn.get(key, None, self._dbs[table])  # type: ignore[no-any-return]
        except LMDB_DAMAGE as exc:
            raise damaged(exc) from exc

    def getter(self, table: int) -> Callable[[bytes], bytes | None]:
        """A cursor's ``get`` (bytes: the transaction has no buffers): no table argument to pass.
        It raises LMDB's own errors (a Python wrapper would cost a call per node of a batch merge,
        its one user): ``db.write()`` translates them as its block ends."""
        # cursor(db) by position, as in _apply_ops: 0.13 us against 0.21 with the keyword
        return self._txn.cursor(self._dbs[table]).get  # type: ignore[no-any-return]

    def scan(
        self, table: int, start: bytes, stop: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        try:
            cursor = self._txn.cursor(db=self._dbs[table])
            if not reverse:
                if not cursor.set_range(start):
                    return
                for key, value in cursor:
                    if stop is not None and key >= stop:
                        return
                    yield key, value
                return
            positioned = cursor.set_range(stop) if stop is not None else cursor.last()
            if not positioned:
                positioned = cursor.last()
            if not positioned:
                return
            if stop is not None and cursor.key() >= stop and not cursor.prev():
                return
            for key, value in cursor.iterprev():
                if key < start:
                    return
                yield key, value
        except LMDB_DAMAGE as exc:
            raise damaged(exc) from exc

    def scan_batches(
        self, table: int, start: bytes, stop: bytes, size: int
    ) -> Iterator[list[tuple[bytes, bytes]]]:
        # lists of ``size`` taken by C-level iteration; only the last one is cut at ``stop``
        try:
            cursor = self._txn.cursor(db=self._dbs[table])
            if not cursor.set_range(start):
                return
            items = cursor.iternext(keys=True, values=True)
            while batch := list(islice(items, size)):
                if batch[-1][0] >= stop:
                    end = bisect_left(batch, (stop,))
                    if end:
                        yield batch[:end]
                    return
                yield batch
        except LMDB_DAMAGE as exc:
            raise damaged(exc) from exc

    def commit(self, ops: list[Op], appended: int = 0) -> None:
        backend = self._backend
        txn = self._txn
        # the id a retry must still have (see commit_after_growth): txn.id(), which is the
        # snapshot's + 1 for a write transaction (see __init__), without the call
        txn_id = self.snapshot + 1
        self._stage = _PUT  # before the first put: from here on, only an abort may end it unwritten
        try:
            _apply_ops(txn, self._dbs, ops, appended)
            self._stage = _COMMITTING
            txn.commit()
            self._stage = _ENDED
            if self.snapshot == backend.seen and (appended or _puts(ops, 0)):
                backend.seen = self.snapshot + 1  # this commit's id
        except lmdb.MapFullError:
            self._end()
            backend.commit_after_growth(ops, appended, txn_id)
            return
        except lmdb.Error as exc:  # the disk, not the data: LMDB committed nothing
            self._end()
            raise _storage_error(backend.path, exc) from exc
        except BaseException:
            self._end()
            raise
        # _end's work for a committed transaction, without its call and checks
        self._txn = None
        backend.live.discard(self)
        backend.end_raw(self._ident)

    def abort(self) -> None:
        self._end()

    def drop(self) -> None:
        """In a forked child (see _mark_forked): forget the inherited LMDB transaction without ending
        it, so that py-lmdb frees it, and its environment, without touching the reader table. The
        database is closed in the child (``Database._forked_from``), so nothing uses this wrapper
        again but its end, which then does nothing."""
        self._txn = None

    def _end(self) -> None:
        """End the LMDB transaction (a write one as :meth:`LmdbBackend.end_write` says, unless it was
        committed) and release it. py-lmdb keeps an ended read transaction's reader slot (one of
        ``max_readers``) until the object is freed, so it is dropped here rather than left to
        whatever still refers to this wrapper. Idempotent."""
        txn, self._txn = self._txn, None
        if txn is None:
            return
        backend = self._backend
        backend.live.discard(self)
        try:
            stage = self._stage
            if backend.forked:  # an inherited one is dropped (see _mark_forked)
                pass
            elif stage == _READ:
                txn.abort()  # a read transaction's end (py-lmdb resets it: no wait, see end_write)
            elif stage != _ENDED:  # (one LMDB committed needs nothing more: end_write's first case)
                backend.end_write(txn, stage)
        finally:
            backend.end_raw(self._ident)


def _puts(ops: list[Op], appended: int) -> bool:
    """Whether ``ops`` put a value. LMDB gives a commit an id (the snapshot's + 1) unless it changed
    nothing, which deletes alone can do (of absent keys); a put always changes a page."""
    if appended:
        return True
    for op in ops:  # noqa: SIM110 (a plain loop: 0.1 us against any()'s 0.35 for one op)
        if op[2] is not None:
            return True
    return False


def _apply_ops(txn: Any, dbs: list[Any], ops: list[Op], appended: int) -> None:
    # The first ``appended`` ops (new nodes, ascending) go to LMDB in one putmulti call, which loops
    # in C: 0.50 us per put of 2.5 KB, against 0.73 us for put() called from Python in a bare loop
    # (the loop below, with its checks per op, costs more). putmulti(items, dupdata, overwrite, append).
    nodes = dbs[NODES]
    if appended:
        _, added = txn.cursor(nodes).putmulti(map(_key_value, islice(ops, appended)), True, True, True)
        if added != appended:  # LMDB appends only above the highest key stored
            raise CorruptDatabaseError(
                "a new node id is not above the ids stored: the database's node id counter (meta "
                "next_id) is damaged; nothing was written. Run `tallytree check` and rebuild the "
                "aggregates from their source"
            )
    # py-lmdb's calls take their arguments by position here: its keyword parsing costs more than
    # LMDB's own work for a small value (put 0.41 -> 0.25 us, delete 0.17 -> 0.11 us, get 0.36 ->
    # 0.29 us). put(key, value, dupdata, overwrite, append, db); delete(key, value, db). The C
    # kernel put_ops makes the same calls without the loop's bytecodes (a scattered commit's four
    # puts: about 90 of them).
    if speedups is not None:
        speedups.put_ops(txn, dbs, ops, appended)
        return
    for table, key, value in islice(ops, appended, None) if appended else ops:
        db = dbs[table]
        if value is None:
            txn.delete(key, b"", db)
        else:
            txn.put(key, value, True, True, False, db)


class LmdbBackend:
    """The four tables in one LMDB environment."""

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int,
        max_map_size: int,
        durable: bool,
        readonly: bool,
        create: bool,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.max_map_size = max(max_map_size, map_size)
        if failure := _unmappable(map_size):
            raise InvalidArgumentError(
                f"map_size={map_size} is more address space than this process can map ({failure}); "
                "pass a smaller map_size: the map grows by itself, up to max_map_size, as data is added"
            )
        created = _check_directory(self.path, create=create and not readonly)
        _check_data_file(self.path)
        # what this open makes, which a failed open removes (discard_made)
        fresh = create and not readonly and not (self.path / "data.mdb").exists()
        self._made = (fresh and _claim_data_file(self.path), created)
        try:
            self.env: Any = self._open_env(map_size, durable, readonly, create)
        except BaseException:
            self.discard_made()
            raise
        # The open LMDB transactions of this process, one entry each: the thread that began it. A
        # map growth waits for the list to empty, and new transactions wait for the growth. The hot
        # path (every transaction) takes no lock: list.append and list.remove are atomic, a beginner
        # registers before it looks at _resizing and a growing writer sets _resizing before it looks
        # at the list, so one of the two always sees the other. _lock is only for the waits (a
        # mutex and a thread-local count took 0.5 us of each transaction's 1 us of overhead).
        self._open: list[int] = []
        # The transactions themselves, so that a forked child can drop the ones it inherited (see
        # _mark_forked); a set: 0.1 us of a transaction's begin and end
        self.live: set[_LmdbTxn] = set()
        self._lock = threading.Condition()
        # Writers holding new transactions of this process back: one waiting for the others to end,
        # to grow the map (_resize), or one aborting (_abort_held)
        self._resizing = 0
        self.resize_wait = RESIZE_WAIT
        # The last LMDB commit known to be this process's own, or seen by one of its transactions,
        # and the number of times a transaction found commits after it that this process did not make
        # (the Backend protocol's epoch; WriteTransaction also moves it, see _store).
        self.seen = -1
        self.epoch = 0
        self._next_reader_check = monotonic() + READER_CHECK  # (_check_file has just swept them)
        self.pid = os.getpid()
        self.forked = False  # set in a forked child (see _mark_forked)
        try:
            self._check_file()
            self.dbs = self._opened_dbs()
        except BaseException:
            self.env.close()
            self.discard_made()
            raise
        _OPEN.add(self)

    def made_database(self) -> bool:
        """Whether this open created the database (it made its ``data.mdb``: of processes creating it
        at once, one did). O(1)."""
        return self._made[0]

    def discard_made(self) -> None:
        """After an open that failed (the environment closed or never opened): remove the files and
        directories the open created, so the path is left as it was."""
        fresh, created = self._made
        if fresh:
            for name in ("data.mdb", "lock.mdb"):
                (self.path / name).unlink(missing_ok=True)
            for directory in created:
                directory.rmdir()

    def _open_env(self, map_size: int, durable: bool, readonly: bool, create: bool) -> Any:
        try:
            return lmdb.open(
                str(self.path),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                create=create and not readonly,
                max_dbs=len(_NAMES),
                sync=durable,
                metasync=durable,
                readahead=False,
                max_readers=READERS,
                lock=True,
            )
        except lmdb.InvalidError as exc:
            if _lmdb_file(self.path / "data.mdb"):
                raise CorruptDatabaseError(
                    f"{self.path}/data.mdb is an LMDB file that LMDB cannot read ({exc}): it was cut "
                    "short or its header pages were overwritten. Restore it from a backup, or rebuild "
                    "the aggregates from their source in a new directory"
                ) from exc
            raise DatabaseFormatError(
                f"{self.path} does not hold an LMDB environment ({exc}); "
                "point tallytree.open() at a tallytree database directory or an empty one"
            ) from exc
        except lmdb.MemoryError as exc:  # a file larger than the process can map
            raise StorageError(
                f"cannot map {self.path} ({exc}): the database is larger than the address space this "
                "process may use; raise its limit (ulimit -v) or open it where more is available"
            ) from exc
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):  # py-lmdb refuses a second handle
                raise TransactionError(
                    f"{self.path} is already open in this process; open a database once per "
                    "process and share the Database object between threads (or close it first)"
                ) from exc
            if str(exc).rpartition(": ")[2] in _DENIED:
                raise _denied(self.path, exc) from exc
            if str(exc).rpartition(": ")[2] in _DISK_ERRORS:
                raise StorageError(
                    f"LMDB could not create or open the files of {self.path} ({exc}). Free disk space "
                    "(or raise the file size limit, or mount the file system read-write), then open it again"
                ) from exc
            raise DatabaseFormatError(f"cannot open {self.path}: {exc}") from exc

    def _check_file(self) -> None:
        """Refuse a data file shorter than the pages its last commit uses (truncated: reading past its
        end would kill the process with SIGBUS), and free the reader slots of dead processes.

        A process killed during a read transaction leaves its slot taken, and its snapshot's pages
        can then never be reused: the file grows, and once every slot is taken no read can begin.
        LMDB frees such slots only when asked (``mdb_reader_check``): at each open, when the slots
        run out, before the map grows, and at the first write of each second (:data:`READER_CHECK`;
        a sweep takes a few microseconds). O(reader slots).
        """
        last = self.env.info()["last_pgno"]
        size = (self.path / "data.mdb").stat().st_size
        needed = (last + 1) * self.env.stat()["psize"]
        if size < needed:
            raise CorruptDatabaseError(
                f"{self.path}/data.mdb is {size} bytes, but its last commit uses {needed}: the file was "
                "truncated (a copy cut short, a full disk during a copy). Restore it from a backup or "
                "rebuild the aggregates from their source in a new directory"
            )
        if not self.readonly:
            self.env.reader_check()

    def _opened_dbs(self) -> list[Any]:
        """:meth:`_open_dbs`, after adopting the map size another process grew the map to meanwhile,
        or freeing the reader slots of dead processes."""
        for _ in range(8):
            try:
                return self._open_dbs()
            except lmdb.MapResizedError:
                try:
                    self.env.set_mapsize(0)  # adopt the size in the file (no transaction is open)
                except lmdb.Error as exc:
                    raise StorageError(f"cannot map {self.path} as another process grew it: {exc}") from exc
            except lmdb.ReadersFullError as exc:
                if not self.env.reader_check():
                    raise _readers_full(self.path) from exc
        raise TransactionError(f"another process kept growing the map of {self.path}; open it again")

    def _open_dbs(self) -> list[Any]:
        """Open the four tables, creating those missing (unless read-only), once the environment is
        known to be tallytree's: its main database names no other table, and the tables it names
        hold tallytree's own keys in ``meta`` (:data:`_OWN_META`) or nothing at all (a creation that
        was interrupted). Another application's environment is refused before anything is written
        to it, even one whose only table is called ``meta``.

        Damage is told from foreign data (:meth:`_damaged`): a list of tables that LMDB's own header
        counts differently (its page was overwritten: a file copy made while a process wrote, a
        failing disk), LMDB errors met in tables that all bear tallytree's names, and keys that
        tallytree never writes beside a ``meta`` that holds its format tag raise
        CorruptDatabaseError, not DatabaseFormatError."""
        main = self.env.open_db(None)
        with self.env.begin() as txn:
            counted = txn.stat(main)["entries"]
            entries = islice(txn.cursor(), min(counted, _MAIN_LIMIT) + 1)
            listed = [(bytes(key), len(value)) for key, value in entries]
        present = [key for key, _ in listed]
        if counted <= _MAIN_LIMIT and len(listed) != counted:
            found = f"more than {counted}" if len(listed) > counted else len(listed)
            raise self._damaged(
                f"the list of its tables holds {found} key(s) where LMDB's header counts {counted}"
            )
        foreign = [key for key in present if key not in _NAMES]
        if foreign:
            if b"meta" in present and self._meta_marked():
                raise self._damaged(
                    f"the list of its tables holds keys tallytree never writes ({foreign[0][:40]!r})"
                )
            raise DatabaseFormatError(
                f"{self.path} is an LMDB environment of another application (it holds keys such as "
                f"{foreign[0][:40]!r}); tallytree will not write into it. Use a new directory"
            )
        # the keys of the main database that name tables hold LMDB's record of one (48 bytes): tables
        # of tallytree's names only, whose LMDB errors are damage; a plain key is another application's
        tables = all(size == _TABLE_RECORD for _, size in listed)
        dbs: dict[bytes, Any] = {}
        try:
            # outside any transaction: handles opened in a read-only one are not kept (py-lmdb)
            for name in present:
                dbs[name] = self.env.open_db(name, create=False)
            if dbs and not self._holds_tallytree(dbs):
                if (problem := self._meta_contradicted(dbs)) is not None:
                    raise self._damaged(problem)
                raise DatabaseFormatError(
                    f"{self.path} is an LMDB environment of another application (it has the tables "
                    f"{b', '.join(dbs).decode()}, holding data but no tallytree format tag); tallytree "
                    "will not write into it. Use a new directory"
                )
            for name in _NAMES:
                if name not in dbs:
                    dbs[name] = self.env.open_db(name, create=not self.readonly)
        except lmdb.NotFoundError as exc:
            raise DatabaseFormatError(
                f"{self.path} is an LMDB environment without tallytree's tables; "
                "it was not created by tallytree (or is empty and opened read-only)"
            ) from exc
        except (lmdb.MapResizedError, lmdb.ReadersFullError):
            raise  # (see _opened_dbs)
        except _DAMAGE as exc:
            if tables:
                raise self._damaged(f"LMDB cannot read its tables ({exc})") from exc
            raise DatabaseFormatError(f"{self.path} is not a tallytree database: {exc}") from exc
        except lmdb.Error as exc:
            raise DatabaseFormatError(f"{self.path} is not a tallytree database: {exc}") from exc
        return [dbs[name] for name in _NAMES]

    def _holds_tallytree(self, dbs: dict[bytes, Any]) -> bool:
        """Whether the tables of an environment are tallytree's: ``meta`` holds one of the keys only
        tallytree writes, or every table is empty. O(tables)."""
        with self.env.begin() as txn:
            meta = dbs.get(b"meta")
            if meta is not None and _marked(txn, meta):
                return True
            return all(txn.stat(db)["entries"] == 0 for db in dbs.values())

    def _damaged(self, problem: str) -> CorruptDatabaseError:
        """The error for an environment whose tallytree structure LMDB's own contradicts."""
        return CorruptDatabaseError(
            f"{self.path} is a damaged tallytree database: {problem}. A copy of data.mdb made while a "
            "process wrote to it, or a failing disk, does this. Restore the database from a backup "
            "(or from a copy made with no writer running), or rebuild its aggregates from their source "
            "in a new directory"
        )

    def _meta_marked(self) -> bool:
        """Whether the ``meta`` table holds one of the keys only tallytree writes (:func:`_marked`);
        False when LMDB cannot tell (it is not a table, or cannot be read). O(1)."""
        try:
            meta = self.env.open_db(b"meta", create=False)
            with self.env.begin() as txn:
                return _marked(txn, meta)
        except lmdb.Error:
            return False

    def _meta_contradicted(self, dbs: dict[bytes, Any]) -> str | None:
        """For tables named as tallytree's that hold data but no tallytree key in ``meta``: how LMDB
        contradicts ``meta``, which then is a damaged page of tallytree's (the number of its keys is
        not what LMDB's record of it counts), or None (another application's). Reads up to
        :data:`_COUNT_LIMIT` keys, and only on this path of a refused open."""
        meta = dbs.get(b"meta")
        if meta is None:
            return None
        with self.env.begin() as txn:
            counted = txn.stat(meta)["entries"]
            if counted > _COUNT_LIMIT:
                return None
            found = sum(1 for _ in islice(txn.cursor(meta).iternext(values=False), counted + 1))
        if found == counted:
            return None
        shown = f"more than {counted}" if found > counted else found
        return f"its meta table holds {shown} key(s) where LMDB's record of it counts {counted}"

    # transactions ------------------------------------------------------------

    def begin(self, write: bool) -> _LmdbTxn:
        if not write:
            return _LmdbTxn(self, False)
        if self.readonly:
            raise ReadOnlyError("the database was opened with readonly=True; reopen it to write")
        txn = _LmdbTxn(self, True)
        if (now := monotonic()) >= self._next_reader_check:  # see _check_file
            self._next_reader_check = now + READER_CHECK
            self.env.reader_check()
        return txn

    def begin_raw(self, write: bool, ident: int) -> Any:
        """Begin an LMDB transaction for thread ``ident`` (whoever ends it passes the same ident to
        :meth:`end_raw`), once no map growth is under way."""
        if self.forked:  # before any lock: one held by another thread at the fork stays held here
            raise TransactionError(
                f"{self.path} was opened by process {self.pid}, which then forked: LMDB must not be "
                "used across fork(). In this process, close the database (db.close()) and open it "
                "again with tallytree.open(); in a pre-forking server, open it after the fork"
            )
        opened = self._open
        for _ in range(8):
            opened.append(ident)
            while self._resizing:  # let a pending map growth go first
                self.end_raw(ident)
                with self._lock:
                    while self._resizing:
                        self._lock.wait()
                opened.append(ident)
            try:
                # begin(db, parent, write) by position, as in _apply_ops (a read's begin and end
                # take 0.11 us so, 0.26 us with keywords)
                return self.env.begin(None, None, True) if write else self.env.begin()
            except lmdb.MapResizedError:
                self.end_raw(ident)
                # another process grew the map: adopt its size, then retry
                self._resize(0, _ADOPT, TransactionError)
            except lmdb.ReadonlyError as exc:
                self.end_raw(ident)
                raise ReadOnlyError(f"{self.path} is read-only: {exc}") from exc
            except lmdb.ReadersFullError as exc:
                self.end_raw(ident)
                if not self.env.reader_check():  # no slot held by a dead process to free
                    raise _readers_full(self.path) from exc
            except BaseException:
                self.end_raw(ident)
                raise
        raise TransactionError("another process keeps growing the database map; retry the transaction")

    def end_raw(self, ident: int) -> None:
        """Count a transaction begun for thread ``ident`` as ended (by any thread)."""
        self._open.remove(ident)
        if self._resizing:  # a writer waits for the process's transactions to end
            with self._lock:
                self._lock.notify_all()

    def commit_after_growth(self, ops: list[Op], appended: int, txn_id: int) -> None:
        """Grow the map and apply ``ops`` again (``appended`` as for commit), or raise MapFullError
        writing nothing.

        ``txn_id`` is LMDB's id of the aborted write transaction: a new one gets the same id unless
        another writer (another thread of this process or another process) committed in between, in
        which case ``ops`` (computed from the older snapshot) must not be applied."""
        ident = get_ident()
        self.env.reader_check()  # a dead process's snapshot would keep its pages from reuse
        for _ in range(64):
            size = self.env.info()["map_size"]
            if size >= self.max_map_size:
                break
            self._resize(self._growth(size), _GROW, MapFullError)
            txn = self.begin_raw(True, ident)
            stage = _NOTHING_PUT
            try:
                if txn.id() != txn_id:
                    raise TransactionError(
                        "another write transaction (of another thread of this process, or of another "
                        "process) committed while this one waited for the map to grow; nothing was "
                        "written. Retry the transaction"
                    )
                stage = _PUT
                _apply_ops(txn, self.dbs, ops, appended)
                stage = _COMMITTING
                txn.commit()
            except lmdb.MapFullError:
                self._end_raw_write(txn, stage, ident)
                continue
            except lmdb.Error as exc:
                self._end_raw_write(txn, stage, ident)
                raise _storage_error(self.path, exc) from exc
            except BaseException:
                self._end_raw_write(txn, stage, ident)
                raise
            self.end_raw(ident)
            return
        raise MapFullError(
            f"the LMDB map is full at max_map_size={self.max_map_size} bytes; nothing was written. "
            "Reopen the database with a larger max_map_size"
        )

    def _end_raw_write(self, txn: Any, stage: int, ident: int) -> None:
        try:
            self.end_write(txn, stage)
        finally:
            self.end_raw(ident)

    def end_write(self, txn: Any, stage: int) -> None:
        """End LMDB write transaction ``txn``, which went as far as ``stage``, writing nothing of it.

        py-lmdb (2.0 and later) makes a write transaction's ``abort()`` wait until no other thread of
        the process is inside an LMDB call (issue #180: for a nested transaction's sake), which
        threads that keep reading can put off indefinitely; and while it waits, the transaction holds
        LMDB's writer lock, so every writer of every process waits too. Its ``commit()`` does not wait,
        so a transaction is ended with ``commit()`` whenever that writes nothing, provably:

        * ``_NOTHING_PUT``: nothing was put or deleted (every write is buffered above until the
          commit, so this is a failed or empty write, an exception in its ``with`` block, an
          ``abort()``): LMDB's commit of a transaction without dirty pages writes nothing;
        * ``_PUT``, if LMDB marked the transaction failed (``MDB_TXN_ERROR``, which every put that
          ran out of map sets, and most that met damaged pages): its commit then aborts it
          (``MDB_BAD_TXN``). The mark is read back, not assumed: every call of a failed
          transaction, a ``get`` too, answers BadTxnError;
        * ``_ENDED``: LMDB committed it.

        Otherwise puts were made and then something else failed (tallytree's own check after a put,
        a too-long key, KeyboardInterrupt between two puts): committing would write them, so the
        transaction is aborted, with new transactions of this process held back meanwhile (see
        :meth:`_abort_held`). So is one at ``_COMMITTING``: LMDB's commit ended it, whatever it
        returned (one that failed aborted itself), and py-lmdb's abort of an ended transaction does
        nothing, unless KeyboardInterrupt came just before the call. O(1) (the abort: O(dirty pages)).
        """
        if stage == _ENDED:
            return
        if stage == _PUT:
            try:
                txn.get(_NAMES[0])  # a failed transaction refuses it
            except lmdb.BadTxnError:
                stage = _NOTHING_PUT  # its commit aborts it
            except lmdb.Error:
                pass
        if stage == _NOTHING_PUT:
            with suppress(lmdb.Error):  # BadTxnError: LMDB aborted the failed transaction
                txn.commit()
            return
        self._abort_held(txn)

    def _abort_held(self, txn: Any) -> None:
        """Abort write transaction ``txn`` while new transactions of this process wait (as for a map
        growth): py-lmdb's abort waits for the LMDB calls under way in other threads, which then end
        with the transactions already open, instead of never (see :meth:`end_write`)."""
        with self._lock:
            self._resizing += 1
        try:
            txn.abort()
        finally:
            with self._lock:
                self._resizing -= 1
                self._lock.notify_all()

    def _growth(self, size: int) -> int:
        """The size to grow a map of ``size`` bytes to: double, or an eighth more if the process cannot
        map twice as much (see :func:`_unmappable`), at most ``max_map_size``; MapFullError if
        neither can be mapped."""
        failure: str | None = None
        for grown in (min(size * 2, self.max_map_size), min(size + size // 8, self.max_map_size)):
            if (failure := _unmappable(grown)) is None:
                return grown
        raise MapFullError(
            f"{_GROW} beyond {size} bytes, but this process cannot map more address space ({failure}); "
            "nothing was written. Raise the process's address-space limit (ulimit -v), or free address "
            "space in it (close other databases)"
        )

    def _resize(self, size: int, why: str, error: type[Error]) -> None:
        """Set the map size (0: adopt the size another process grew it to) once no other
        transaction of this process is open.

        LMDB can resize only then. Transactions of other threads are waited for (up to
        ``resize_wait`` seconds; new ones wait meanwhile); one still open in this thread would never
        end, so that fails at once. Either failure raises ``error`` (MapFullError when growing,
        TransactionError when adopting), before anything is written.
        """
        with self._lock:
            if get_ident() in self._open:
                raise error(
                    f"{why}, which LMDB can do only when no other transaction of the process is "
                    "open, and this thread has one open (a read transaction around this one?); "
                    "nothing was written. End it and retry, or open the database with a larger map_size"
                )
            self._resizing += 1
            try:
                if not self._lock.wait_for(lambda: not self._open, timeout=self.resize_wait):
                    raise error(
                        f"{why}, which LMDB can do only when no other transaction of the process is "
                        f"open, and other threads kept theirs open (waited {self.resize_wait:g} s); "
                        "nothing was written. Retry, keep transactions short, or open the database "
                        "with a larger map_size"
                    )
                try:
                    self.env.set_mapsize(size)
                except lmdb.Error as exc:  # LMDB unmapped the old map and could not map the new one
                    raise error(
                        f"{why}, and LMDB could not map it ({exc}); nothing was written, but this "
                        "database object has lost its map: close it and open the database again"
                    ) from exc
            finally:
                self._resizing -= 1
                self._lock.notify_all()

    def close(self) -> None:
        _OPEN.discard(self)
        if not self.forked:  # (see _mark_forked)
            self.env.close()


_DISK_ERRORS = frozenset(
    os.strerror(code) for code in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
)
"""How py-lmdb ends the message of an error that is the disk's, not the data's (its exceptions carry
no errno)."""
_DENIED = frozenset(os.strerror(code) for code in (errno.EACCES, errno.EPERM))


def _readers_full(path: Path) -> TransactionError:
    return TransactionError(
        f"too many read transactions are open on {path} at once: LMDB has {READERS} reader slots, "
        "shared by every process using the database; end read transactions sooner (each `with "
        "db.read()` block holds one until it ends)"
    )


def _storage_error(path: Path, exc: Exception) -> StorageError:
    return StorageError(
        f"LMDB could not commit to {path} ({exc}); nothing of the transaction was written and the "
        "database is as it was. Free disk space (or raise the file size limit), then retry"
    )


def _unmappable(size: int) -> str | None:
    """Why this process cannot map ``size`` bytes now, or None if it can (or cannot tell).

    Maps and unmaps ``size`` bytes of read-only anonymous memory: address space, which the kernel
    neither fills nor charges against memory. Where ``mmap`` has no ``PROT_READ`` (Windows), LMDB
    sizes the file itself and this returns None. About 15 us.

    >>> _unmappable(1 << 20) is None
    True
    """
    if not hasattr(mmap, "PROT_READ"):
        return None
    try:
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ).close()
    except (OSError, OverflowError, ValueError) as exc:
        return str(exc)
    return None


def _check_directory(path: Path, *, create: bool) -> list[Path]:
    """Check that ``path`` is a database directory or can become one; make it if ``create``.
    Returns the directories it made, deepest first (none if ``path`` existed). A directory this process
    may not look into raises StorageError."""
    try:
        return _checked_directory(path, create=create)
    except PermissionError as exc:
        raise _denied(path, exc) from exc


def _marked(txn: Any, meta: Any) -> bool:
    """Whether table ``meta`` holds a key only tallytree writes (:data:`_OWN_META`): a counter, or a
    ``format`` that is a tallytree tag. O(1)."""
    for key in _OWN_META:
        value = txn.get(key, None, meta)
        if value is not None and (key != b"format" or value.startswith(_TAG)):
            return True
    return False


def _check_data_file(path: Path) -> None:
    """Refuse a ``data.mdb`` of 0 bytes, which LMDB would take for a new environment and fill: a
    database truncated to nothing (its loss would go unseen), or a creation killed before LMDB wrote
    its first pages. A file being created by another process at this moment is given
    :data:`_EMPTY_WAIT` to get them. O(1)."""
    data = path / "data.mdb"
    for wait in (0.0, _EMPTY_WAIT):
        sleep(wait)
        try:
            if data.stat().st_size > 0:
                return
        except FileNotFoundError:
            return
    raise CorruptDatabaseError(
        f"{data} is empty (0 bytes): the database was truncated (a copy cut short, a full disk), or "
        "its creation was killed before LMDB wrote its first pages. Restore it from a backup if it "
        "held data; otherwise remove the directory and open it again"
    )


def _claim_data_file(path: Path) -> bool:
    """Create the empty ``data.mdb`` of a new database in directory ``path``, which LMDB then fills
    as a new environment; False if it exists. Exclusive (``O_EXCL``): of processes creating the
    database at once, one alone has made it, and removes it if its open fails (see
    ``LmdbBackend.discard_made``), and the others leave it alone. O(1)."""
    try:
        os.close(os.open(path / "data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    except PermissionError as exc:
        raise _denied(path, exc) from exc
    except OSError as exc:
        raise StorageError(f"cannot create {path / 'data.mdb'}: {exc}") from exc
    return True


def _lmdb_file(data: Path) -> bool:
    """Whether ``data`` begins with an LMDB meta page (its magic after the page header, in the first
    or second page of a common page size), so that a file LMDB refuses is damaged, not foreign."""
    try:
        with data.open("rb") as file:
            head = file.read(65536 + 32)
    except OSError:
        return False
    return any(head[offset + 16 : offset + 20] == _MAGIC for offset in (0, 4096, 8192, 16384, 65536))


def _denied(path: Path, exc: Exception) -> StorageError:
    return StorageError(
        f"cannot open {path}: {exc}. This process may not read (or, to write, may not write) the "
        "database directory or its files data.mdb and lock.mdb; fix their permissions (a reader "
        "needs to write lock.mdb too), or open it as a user that may"
    )


def _checked_directory(path: Path, *, create: bool) -> list[Path]:
    if path.exists() and not path.is_dir():
        raise DatabaseFormatError(
            f"{path} is a file; a tallytree database is a directory (give a new or existing directory path)"
        )
    if path.is_dir() and not (path / "data.mdb").exists():
        # a lock.mdb alone is what a creation killed before LMDB made data.mdb leaves: no data
        # (a data.mdb found now is another process's creation, under way since the test above)
        foreign = any(entry.name not in ("lock.mdb", "data.mdb") for entry in path.iterdir())
        if not create:  # nothing would be created: the refusal says what is missing
            among = " (it holds other files: is this the right path?)" if foreign else ""
            raise DatabaseFormatError(f"{path} holds no database{among}, and create=False (or readonly=True)")
        if foreign:
            raise DatabaseFormatError(
                f"{path} is a non-empty directory without a database in it; refusing to create "
                "one among foreign files. Use an empty or new directory"
            )
    if not path.exists():
        if not create:
            raise DatabaseFormatError(f"{path} does not exist and create=False (or readonly=True)")
        return _make_directory(path)
    return []


def _make_directory(path: Path) -> list[Path]:
    """Make directory ``path`` and its missing parents; return those made, deepest first. One that
    another process makes at the same moment (workers opening a new database together) is taken as
    it is, and not counted as made here: a failed open removes only what it made. On a failure,
    the directories made are removed again. O(depth)."""
    missing = [path, *[parent for parent in path.parents if not parent.exists()]]
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise
                continue
            made.append(directory)
    except BaseException as exc:
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:
                break  # (another process put something in it meanwhile)
        if isinstance(exc, PermissionError):
            raise  # (see _check_directory)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot create the database directory {path}: {exc}") from exc
        raise
    return made[::-1]
