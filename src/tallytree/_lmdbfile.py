"""LMDB's data file read directly: a snapshot's meta page and free list, backups, space accounting.

Design
======
``Database.backup`` and ``Database.storage_info`` need two things py-lmdb gives only at a cost, so
they read ``data.mdb`` itself, under a read transaction of the database (``LmdbBackend.begin_raw``,
so that a map growth of this process waits for it as for any reader):

* **A copy of a live database.** py-lmdb's ``Environment.copy`` is one long call on the environment,
  and py-lmdb 3 makes a write transaction of the same process that aborts wait until every such call
  has returned: during a backup, a write block of another thread that raised (or changed nothing)
  would hold LMDB's writer lock, which every process shares, until the backup ends; and a copy
  without compaction first takes that writer lock itself, which such a writer holds while it waits:
  a deadlock. (Measured: an aborted write block took 0.81 s, the length of a copy to a slow
  destination; with the copy without compaction, neither ended.) Reading the file calls no LMDB
  function once the read transaction has begun.
* **The free list**, which py-lmdb does not expose (LMDB keeps it in a table of its own, ``FREE_DBI``):
  how many free pages the next write may reuse, and how many the snapshots of open read transactions
  hold back (see :func:`space`).

Why reading the file is safe. LMDB (without ``MDB_WRITEMAP``, which tallytree never sets; see ``_lmdb``)
changes the file only by writing new or reused pages and the meta pages, and reuses only pages freed by
commits older than the snapshot of every open read transaction. So while a read transaction on commit
``S`` is open, every page of ``S`` (its tables and its free list) reads the same from the file, and so
does every page of a later commit, whatever other threads and processes commit meanwhile. Only the two
meta pages are rewritten: commit ``N`` writes its meta to page ``N & 1``, and LMDB hands out ``N`` to
new read transactions only once that page is written. Page ``S & 1`` therefore holds the meta of ``S``
as the read transaction begins, until commit ``S + 2``; it is read twice, and taken only if both reads
agree and name ``S`` (:func:`_snapshot_metas`; otherwise the transaction is begun again).

A backup (:func:`backup`) copies the two meta pages and every page up to the snapshot's last one: the
image of the file as of commit ``S``, as ``mdb_env_copy`` makes it (free pages may hold what a
concurrent writer put there since; they are free in ``S``, and no one reads them). A compacting backup
then runs LMDB's own compacting copy (``MDB_CP_COMPACT``: the live pages of each tree, renumbered, no
free list) on that image, through an environment of its own, so the database's environment is never
busy. The result is written under a temporary name, synced, and renamed to ``data.mdb``: a backup that
fails or is interrupted leaves no ``data.mdb`` behind (a process killed outright may leave the
temporary file, which a later backup into the same directory names).

Layout read (LMDB 0.9, 64-bit, the machine's byte order; another layout, which the LMDB bundled with
py-lmdb never writes, is not parsed: a backup then takes LMDB's compacting copy under its read
transaction, with the costs above, and the free list is reported unknown)::

    page header (16 bytes)   pgno u64 | pad u16 | flags u16 (1 branch, 2 leaf, 4 overflow, 8 meta)
                             | lower u16 | upper u16 (an overflow page: its page count, u32)
    meta, at byte 16         magic u32 (0xBEEFC0DE) | version u32 (1) | address u64 | mapsize u64
                             | free-list table (48) | main table (48) | last_pg u64 | txnid u64
    table record (48 bytes)  pad u32 | flags u16 | depth u16 | branch, leaf, overflow pages u64
                             | entries u64 | root u64
    node                     lo u16 | hi u16 | flags u16 | key size u16 | key | data (a branch
                             node's child page is lo | hi << 16 | flags << 32; a leaf node's data size
                             lo | hi << 16, and with flag 1 (big data) the data is the u64 number of
                             the overflow page holding it)
    free-list record         key: the id of the commit that freed the pages (u64); data: a count
                             u64, then that many page numbers

The pages of a snapshot are its two meta pages, the pages of its tables (LMDB's catalog, ``meta``,
``nodes``, ``roots``, ``docs``), its free list's own pages and the free pages the free list names,
exactly (LMDB's compacting copy relies on it); :func:`space` reports the free list only when its
counts add up so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
from _thread import get_ident
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import lmdb

from ._lmdb import LmdbBackend
from ._store import TABLES, MemoryBackend
from .errors import CorruptDatabaseError, InvalidArgumentError, StorageError

__all__ = ["PARTIAL", "SNAPSHOT_PARTIAL", "backup", "prepare_destination", "space"]

PARTIAL = "data.mdb.backup-partial"
"""The name a backup's ``data.mdb`` is written under until it is complete and synced."""
SNAPSHOT_PARTIAL = "data.mdb.snapshot-partial"
"""The uncompacted image a compacting backup compacts from, removed once it is done."""
_NAMES = (b"meta", b"nodes", b"roots", b"docs")  # the named tables, in _store's order (as _lmdb's)
_ORDER = "<" if sys.byteorder == "little" else ">"
_U16 = struct.Struct(_ORDER + "H")
_U32 = struct.Struct(_ORDER + "I")
_U64 = struct.Struct(_ORDER + "Q")
_MAGIC = 0xBEEFC0DE
_HEADER = 16  # LMDB 0.9's page header
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 1, 2, 4, 8
_F_BIGDATA = 1
_METAS = 2
_CHUNK = 1 << 22  # bytes copied per read
_ATTEMPTS = 8  # read transactions begun to catch a consistent meta page (the first one almost always)


class _Table(NamedTuple):
    """A table record of a meta page (``MDB_db``)."""

    depth: int
    pages: int  # branch + leaf + overflow pages
    root: int


class _Meta(NamedTuple):
    """The meta page of a commit: what a snapshot of it reads."""

    txnid: int
    last_page: int
    free: _Table  # the free list's own table
    main: _Table  # LMDB's catalog of the named tables


def _table(data: bytes, offset: int) -> _Table:
    depth = _U16.unpack_from(data, offset + 6)[0]
    branch, leaf, overflow = struct.unpack_from(_ORDER + "3Q", data, offset + 8)
    return _Table(depth, branch + leaf + overflow, _U64.unpack_from(data, offset + 40)[0])


def _parse_meta(page: bytes) -> _Meta | None:
    """The meta of a meta page, or None if it is not one of LMDB 0.9's (64-bit) layout. O(1).

    >>> _parse_meta(bytes(4096)) is None
    True
    """
    if len(page) < _HEADER + 136:
        return None
    flags = _U16.unpack_from(page, 10)[0]
    magic, version = struct.unpack_from(_ORDER + "II", page, _HEADER)
    if not flags & _P_META or magic != _MAGIC or version != 1:
        return None
    last_page, txnid = struct.unpack_from(_ORDER + "QQ", page, _HEADER + 120)
    return _Meta(txnid, last_page, _table(page, _HEADER + 24), _table(page, _HEADER + 72))


def _read_at(source: IO[bytes], offset: int, size: int) -> bytes:
    """``size`` bytes of ``source`` from ``offset``, or fewer at the end of the file."""
    source.seek(offset)
    parts = []
    while size > 0:
        part = source.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _snapshot_metas(source: IO[bytes], page_size: int, snapshot: int) -> tuple[bytes, _Meta] | None:
    """The two meta pages of ``source`` and the meta of commit ``snapshot`` (which a read transaction
    holds), or None when they could not be read consistently: page ``snapshot & 1`` changed between
    two reads or no longer names that commit (commits went on meanwhile; begin a new transaction),
    or the other page names a later commit. See the module's design. O(1)."""
    first = _read_at(source, 0, _METAS * page_size)
    if _read_at(source, 0, _METAS * page_size) != first:
        return None
    slot = snapshot & 1
    meta = _parse_meta(first[slot * page_size : (slot + 1) * page_size])
    other = _parse_meta(first[(1 - slot) * page_size : (2 - slot) * page_size])
    if meta is None or other is None or meta.txnid != snapshot or other.txnid > snapshot:
        return None
    return first, meta


def _layout_known(source: IO[bytes]) -> bool:
    """Whether the file's meta pages are in the layout this module parses (LMDB 0.9, 64-bit)."""
    return _parse_meta(_read_at(source, 0, _HEADER + 160)) is not None


@contextlib.contextmanager
def _snapshot(backend: LmdbBackend) -> Iterator[tuple[Any, int]]:
    """A read transaction of ``backend`` (py-lmdb's), registered as the backend's others are, and
    the commit id of its snapshot; ended when the block ends."""
    ident = get_ident()
    txn = backend.begin_raw(False, ident)
    try:
        yield txn, txn.id()
    finally:
        try:
            txn.abort()
        finally:
            backend.end_raw(ident)


# ---------------------------------------------------------------- space


def space(backend: LmdbBackend) -> dict[str, Any]:
    """The space of an LMDB database: what ``Database.storage_info`` returns (its docstring says what
    each entry means). O(pages of the free list) reads of the file, plus one listing of the reader
    slots."""
    env = backend.env
    data_file = backend.path / "data.mdb"
    found = records = None
    for _ in range(_ATTEMPTS):
        # (everything asked of LMDB inside the transaction: no map growth of this process meanwhile)
        with _snapshot(backend) as (txn, snapshot), data_file.open("rb", buffering=0) as source:
            page_size = env.stat()["psize"]
            tables = sum(_pages(txn.stat(db)) for db in backend.dbs)
            info, main, listing = env.info(), _pages(env.stat()), env.readers()
            if not _layout_known(source):
                break
            found = _snapshot_metas(source, page_size, snapshot)
            if found is not None:
                records = _free_records(source, page_size, found[1])
                break
    if found is not None:
        meta = found[1]
        pages = meta.last_page + 1
        kept = _METAS + meta.main.pages + tables  # what a compacting copy keeps
        own = meta.free.pages
        if records is not None and sum(records.values()) != pages - kept - own:
            records = None  # (a free list that does not add up is not reported as if it did)
    else:  # another layout, or a meta page that kept changing: the free list is unknown
        pages = info["last_pgno"] + 1
        kept = _METAS + main + tables
        own = 0  # (counted as free)
        snapshot = info["last_txnid"]
    readers = _readers(listing)
    if (os.getpid(), snapshot) in readers:  # this function's own transaction
        readers.remove((os.getpid(), snapshot))
    active = [txnid for _, txnid in readers if txnid is not None]
    oldest = min(active, default=None)
    free = pages - kept - own
    reusable = pinned = None
    if records is not None:
        horizon = min(snapshot, oldest) if oldest is not None else snapshot
        reusable = sum(count for txnid, count in records.items() if txnid < horizon)
        pinned = sum(count for txnid, count in records.items() if horizon <= txnid < snapshot)
    stat = data_file.stat()
    oldest_pid = None
    if oldest is not None:
        oldest_pid = next(pid for pid, txnid in readers if txnid == oldest)
    return {
        "file_bytes": stat.st_size,
        "disk_bytes": getattr(stat, "st_blocks", 0) * 512 or stat.st_size,
        "map_bytes": info["map_size"],
        "page_bytes": page_size,
        "last_commit": snapshot,
        "pages": pages,
        "pages_used": kept + own,
        "pages_free": free,
        "pages_reusable": reusable,
        "pages_held_by_readers": pinned,
        "compacted_bytes": kept * page_size,
        "readers": len(active),
        "oldest_reader_lag": info["last_txnid"] - oldest if oldest is not None else None,
        "oldest_reader_pid": oldest_pid,
        "dead_readers": _dead(readers),
    }


def _pages(stat: dict[str, int]) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def _readers(listing: str) -> list[tuple[int, int | None]]:
    """The reader slots in use, from LMDB's listing (``mdb_reader_list``): (pid, the commit id of
    the snapshot read, or None for a slot kept for a transaction that has ended).

    >>> _readers("    pid     thread     txnid\\n     41 7f2a931c3b80 3\\n     42 7f2a931c3b81 -\\n")
    [(41, 3), (42, None)]
    >>> _readers("(no active readers)\\n")
    []
    """
    found = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            found.append((int(fields[0]), int(fields[2]) if fields[2].isdigit() else None))
    return found


def _dead(readers: list[tuple[int, int | None]]) -> int | None:
    """How many of the slots of open read transactions belong to processes of this machine that no
    longer run (their slot stays until a write, or an ``open()`` for writing, frees it); None where
    that cannot be asked (not POSIX: there, ``os.kill(pid, 0)`` would end the process)."""
    if os.name != "posix":
        return None
    dead = 0
    for pid in {pid for pid, txnid in readers if txnid is not None}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead += 1
        except OSError:  # (another user's process: it runs)
            pass
    return dead


def _free_records(source: IO[bytes], page_size: int, meta: _Meta) -> dict[int, int] | None:
    """The free list of the snapshot of ``meta``: pages freed, by the id of the commit that freed
    them; None for anything that is not a well-formed tree within the snapshot's pages. O(pages of
    the free list): only the first page of a record held in overflow pages is read."""
    records: dict[int, int] = {}
    if meta.free.root == (1 << 64) - 1:  # P_INVALID: an empty free list
        return records
    end = meta.last_page + 1
    seen: set[int] = set()
    stack = [(meta.free.root, 1)]
    while stack:
        number, depth = stack.pop()
        if not _METAS <= number < end or number in seen or depth > max(meta.free.depth, 1):
            return None
        seen.add(number)
        page = _read_at(source, number * page_size, page_size)
        if len(page) != page_size or _U64.unpack_from(page, 0)[0] != number:
            return None
        flags, lower = _U16.unpack_from(page, 10)[0], _U16.unpack_from(page, 12)[0]
        if not flags & (_P_BRANCH | _P_LEAF) or not _HEADER <= lower <= page_size:
            return None
        for index in range((lower - _HEADER) >> 1):
            offset = _U16.unpack_from(page, _HEADER + 2 * index)[0]
            if offset + 8 > page_size:
                return None
            low, high, node_flags, key_size = struct.unpack_from(_ORDER + "4H", page, offset)
            if flags & _P_BRANCH:
                stack.append((low | high << 16 | node_flags << 32, depth + 1))
                continue
            data = offset + 8 + key_size
            if key_size != 8 or data + 8 > page_size:
                return None
            txnid = _U64.unpack_from(page, offset + 8)[0]
            if node_flags & _F_BIGDATA:
                overflow = _U64.unpack_from(page, data)[0]
                if not _METAS <= overflow < end:
                    return None
                head = _read_at(source, overflow * page_size, _HEADER + 8)
                if len(head) != _HEADER + 8 or not _U16.unpack_from(head, 10)[0] & _P_OVERFLOW:
                    return None
                count = _U64.unpack_from(head, _HEADER)[0]
            else:
                count = _U64.unpack_from(page, data)[0]
            if count > end:
                return None
            records[txnid] = records.get(txnid, 0) + count
    return records


# ---------------------------------------------------------------- backup


def prepare_destination(destination: Path) -> list[Path]:
    """Check that ``destination`` is a new or empty directory and make it (with its missing parents)
    if new; return the directories made, deepest first. A file or a directory holding anything
    raises InvalidArgumentError; a directory this process may not create StorageError. O(1)."""
    if destination.exists() or destination.is_symlink():
        if not destination.is_dir():
            raise InvalidArgumentError(
                f"the backup destination {destination} exists and is not a directory; a backup is a "
                "new directory: name a new or empty one"
            )
        held = sorted(entry.name for entry in destination.iterdir())
        if held:
            partial = [name for name in held if name in (PARTIAL, SNAPSHOT_PARTIAL)]
            hint = ""
            if partial:
                hint = f" ({partial[0]} is left by an interrupted backup: remove the directory, retry)"
            raise InvalidArgumentError(
                f"the backup destination {destination} is not empty (it holds {', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}); a backup never writes over anything: name a new "
                f"or empty directory{hint}"
            )
        return []
    made = [destination, *[parent for parent in destination.parents if not parent.exists()]]
    try:
        destination.mkdir(parents=True)
    except OSError as exc:
        raise StorageError(f"cannot create the backup directory {destination}: {exc}") from exc
    return made


def backup(backend: LmdbBackend | MemoryBackend, destination: Path, *, compact: bool) -> None:
    """Write a copy of the last commit of ``backend`` as ``destination/data.mdb`` (``destination``
    checked and made by :func:`prepare_destination`). What ``Database.backup`` does, besides
    checking its arguments: its docstring says what the copy is. On any failure the files written
    are removed (the directories too are the caller's). O(pages of the file) for a copy; O(live
    pages) more to compact it; O(entries) for a database in memory."""
    final = destination / "data.mdb"
    partial = destination / PARTIAL
    image = destination / SNAPSHOT_PARTIAL
    created: list[Path] = []  # (only these are removed on failure: never another backup's files)
    try:
        if isinstance(backend, MemoryBackend):
            _write_memory(backend, partial, created)
        else:
            first = image if compact else partial
            with _exclusive(first, created) as target:
                copied = _copy_snapshot(backend, target)
                if not copied:  # (a layout it does not parse, or commits too fast: LMDB copies it)
                    with _snapshot(backend) as (txn, _):
                        backend.env.copyfd(target.fileno(), compact=True, txn=txn)
                if first is partial or not copied:
                    _sync(target)
            if first is image and copied:
                with _exclusive(partial, created) as target:
                    _compact(image, target)
                    _sync(target)
                image.unlink()
            elif first is image:
                os.replace(image, partial)
                created.append(partial)
        if final.exists():  # (made there meanwhile by someone else: never written over)
            raise InvalidArgumentError(
                f"{final} appeared while the backup was written; nothing was replaced. Name a new directory"
            )
        os.replace(partial, final)
        _sync_directory(destination)
    except BaseException:
        for leftover in created:
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise


@contextlib.contextmanager
def _exclusive(path: Path, created: list[Path]) -> Iterator[IO[bytes]]:
    """A new file at ``path`` (never an existing one), appended to ``created`` once made. An OSError
    in the block (a full disk) raises StorageError."""
    try:
        target = path.open("xb")
    except FileExistsError as exc:
        raise InvalidArgumentError(
            f"{path} appeared while the backup was written (another backup into the same directory?); "
            "name a new directory"
        ) from exc
    except OSError as exc:
        raise _write_error(path.parent, exc) from exc
    created.append(path)
    with target:
        try:
            yield target
        except OSError as exc:
            raise _write_error(path.parent, exc) from exc


def _sync(target: IO[bytes]) -> None:
    """Write ``target`` out and sync it to the disk."""
    target.flush()
    os.fsync(target.fileno())


def _write_error(destination: Path, exc: OSError) -> StorageError:
    return StorageError(
        f"could not write the backup in {destination} ({exc}); nothing of it was left there. Free "
        "disk space (or fix the permissions), then back up again"
    )


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where a directory can be opened: POSIX)."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _copy_snapshot(backend: LmdbBackend, target: IO[bytes]) -> bool:
    """Write the image of the last commit of ``backend`` (its meta pages and every page up to its
    last) to ``target``, under a read transaction that pins it; False, writing nothing, if the
    file's layout is not the one this module parses, or if commits followed each other too fast for
    ``_ATTEMPTS`` snapshots to find their meta page intact (a writer thread of this process may
    commit hundreds of times while this one waits for the GIL after a read): LMDB's own copy then
    takes over. O(pages)."""
    data_file = backend.path / "data.mdb"
    for _ in range(_ATTEMPTS):
        with _snapshot(backend) as (_txn, snapshot), data_file.open("rb", buffering=0) as source:
            page_size = backend.env.stat()["psize"]
            if not _layout_known(source):
                return False
            found = _snapshot_metas(source, page_size, snapshot)
            if found is None:
                continue  # commits went on as the meta page was read: take a newer snapshot
            metas, meta = found
            end = (meta.last_page + 1) * page_size
            target.write(metas)
            offset = len(metas)
            while offset < end:
                chunk = _read_at(source, offset, min(_CHUNK, end - offset))
                if not chunk:
                    raise CorruptDatabaseError(
                        f"{data_file} ends at byte {offset}, but its commit {snapshot} uses {end} "
                        "bytes: the file was truncated. Restore it from a backup or rebuild the "
                        "aggregates from their source"
                    )
                target.write(chunk)
                offset += len(chunk)
            return True
    return False


def _compact(image: Path, target: IO[bytes]) -> None:
    """LMDB's compacting copy of the database image ``image`` (a file no one else uses) to
    ``target``. O(live pages)."""
    try:
        env = lmdb.open(str(image), subdir=False, readonly=True, lock=False, max_dbs=len(_NAMES))
    except lmdb.Error as exc:
        raise CorruptDatabaseError(f"LMDB cannot read the copy of the database it made ({exc})") from exc
    try:
        env.copyfd(target.fileno(), compact=True)
    except lmdb.Error as exc:
        if str(exc).rpartition(": ")[2] in _DISK_ERRORS:
            raise _write_error(image.parent, OSError(str(exc))) from exc
        raise CorruptDatabaseError(
            f"the database is damaged: LMDB could not walk its pages to compact them ({exc}). Run "
            "`tallytree check` to see what can still be read; a backup with compact=False "
            "(`--no-compact`) copies the pages as they are"
        ) from exc
    finally:
        env.close()


_DISK_ERRORS = frozenset(
    os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
)


def _write_memory(backend: MemoryBackend, path: Path, created: list[Path]) -> None:
    """Write the last commit of a database in memory as a new LMDB file at ``path``: one write
    transaction, the map doubled until it fits. O(entries)."""
    tables = backend.tables  # a snapshot: a commit replaces the list, never changes it
    size = sum(len(key) + len(value) + 16 for table in tables for key, value in table.items())
    map_size = max(1 << 20, 4 * size)
    with _exclusive(path, created):  # (claimed, empty: LMDB makes a new environment of it)
        pass
    for _ in range(16):
        try:
            env = lmdb.open(
                str(path), subdir=False, lock=False, map_size=map_size, max_dbs=len(_NAMES), sync=True
            )
        except lmdb.Error as exc:
            raise _write_error(path.parent, OSError(str(exc))) from exc
        try:
            dbs = [env.open_db(name) for name in _NAMES]
            with env.begin(write=True) as txn:
                for number in range(TABLES):
                    txn.cursor(dbs[number]).putmulti(tables[number].items(), append=True)
            env.sync(True)
            return
        except lmdb.MapFullError:
            map_size *= 2
        except lmdb.Error as exc:
            raise _write_error(path.parent, OSError(str(exc))) from exc
        finally:
            env.close()
        os.truncate(path, 0)  # (start again in a larger map)
    raise StorageError(f"could not size a map for the {size} bytes of the database")
