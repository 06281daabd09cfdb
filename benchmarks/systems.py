"""Adapters that give every compared system the same small interface.

Each adapter stores the events of a :class:`workload.Dataset` and answers the same questions, with the
same semantics, so that answers can be compared exactly (floats to a relative 1e-9: sums are added in
different orders):

* ``count(ns, lo, hi)`` and ``totals(ns, lo, hi)`` over ``lo <= ts < hi``; totals are
  ``(count, sum of cost, sum of tokens)``;
* ``rank(ns, ts)``: the number of events with a smaller ``ts``;
* ``select(ns, index)``: ``(ts, id)`` of the event at 0-based ``index`` in ``(ts, id)`` order;
* ``buckets(ns, bounds)``: the totals of each ``[bounds[i], bounds[i + 1])``;
* ``insert_one`` / ``delete_one``: one event per committed transaction;
* ``insert_batch``: many events (of one namespace) in one transaction;
* ``delete_range(ns, lo, hi)`` (either bound None for unbounded): one transaction, returning the
  number of events removed; ``delete_before`` / ``delete_from`` are its one-sided forms.

Reads run inside ``with system.reading():`` (one read transaction / snapshot, where the system has
them). Configuration choices (durability, caches, indexes) are in each class docstring and in
``benchmarks/README.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from sortedcontainers import SortedList
from workload import DAY, Dataset

import tallytree

Event = tuple[str, int, int, float, int]
Totals = tuple[int, float, int]


def _disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count what they use)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(item.stat().st_blocks * 512 for item in path.rglob("*") if item.is_file())


class Unavailable(Exception):
    """The system cannot run on this machine; the message says why."""


class System:
    """The interface every adapter implements (see the module docstring)."""

    name = "system"
    persisted = True
    config = ""

    def open(self, workdir: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def version(self) -> str:
        return ""

    def load(self, dataset: Dataset) -> None:
        raise NotImplementedError

    def reading(self) -> contextlib.AbstractContextManager[Any]:
        return nullcontext()

    def count(self, ns: str, lo: int, hi: int) -> int:
        raise NotImplementedError

    def totals(self, ns: str, lo: int, hi: int) -> Totals:
        raise NotImplementedError

    def rank(self, ns: str, ts: int) -> int:
        raise NotImplementedError

    def select(self, ns: str, index: int) -> tuple[int, int]:
        raise NotImplementedError

    def buckets(self, ns: str, bounds: list[int]) -> list[Totals]:
        raise NotImplementedError

    def insert_one(self, event: Event) -> None:
        raise NotImplementedError

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        raise NotImplementedError

    def insert_batch(self, events: list[Event]) -> None:
        raise NotImplementedError

    def delete_batch(self, events: list[Event]) -> None:
        for event in events:
            self.delete_one(event[0], event[1], event[2])

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        """Delete every event with ``lo <= ts < hi`` (None: unbounded) in one transaction."""
        raise NotImplementedError

    def delete_before(self, ns: str, ts: int) -> int:
        return self.delete_range(ns, None, ts)

    def delete_from(self, ns: str, ts: int) -> int:
        return self.delete_range(ns, ts, None)

    def disk_bytes(self) -> int | None:
        return None

    def settle(self) -> None:
        """Finish background work the load left (untimed), so that it does not run during the
        measurements of any system: a server's checkpoint, for example."""


# -- tallytree ---------------------------------------------------------------------------------------


class TallyTree(System):
    """tallytree on LMDB, ``durable=False`` (no fsync per commit), default node size and cache."""

    name = "tallytree"
    config = "LMDB, durable=False (no fsync per commit), default node_size and node cache"

    def open(self, workdir: Path) -> None:
        self.path = workdir / "tallytree.tt"
        self.db = tallytree.open(self.path, durable=False)
        self.agg = self.db.aggregate("events", values=("cost", "tokens"))
        self.tx: Any = None

    def close(self) -> None:
        self.db.close()

    def version(self) -> str:
        return tallytree.__version__

    def load(self, dataset: Dataset) -> None:
        agg = self.agg
        for ns, rows in dataset.by_namespace.items():
            with self.db.write() as tx:
                agg.insert_many(tx, [(ts, i, (cost, tokens)) for ts, i, cost, tokens in rows], namespace=ns)

    def supports(self, method: str) -> bool:
        """Whether this tallytree has an optional API (``build``, ``buckets``): newer versions do."""
        return callable(getattr(self.agg, method, None))

    def load_build(self, dataset: Dataset) -> None:
        """Bulk load by the bottom-up builder (``Aggregate.build`` / ``build_many``, sorted input)."""
        agg = self.agg
        with self.db.write() as tx:
            if len(dataset.by_namespace) == 1:
                [(ns, rows)] = dataset.by_namespace.items()
                agg.build(
                    tx,
                    ((ts, i, (cost, tokens)) for ts, i, cost, tokens in rows),
                    namespace=ns,
                    sorted=True,
                )
            else:
                agg.build_many(
                    tx,
                    (
                        (ns, ts, i, (cost, tokens))
                        for ns in sorted(dataset.by_namespace)
                        for ts, i, cost, tokens in dataset.by_namespace[ns]
                    ),
                    sorted=True,
                )

    def buckets_native(self, ns: str, bounds: list[int]) -> list[Totals]:
        """The 30 buckets in one ``Aggregate.buckets(edges=...)`` call (one descent per edge)."""
        out = []
        for bucket in self.agg.buckets(self.tx, namespace=ns, edges=bounds):
            found = bucket.totals
            out.append((found.count, found.cost, found.tokens))
        return out

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self.db.read() as tx:
            self.tx = tx
            try:
                yield
            finally:
                self.tx = None

    def count(self, ns: str, lo: int, hi: int) -> int:
        return self.agg.count(self.tx, namespace=ns, ge=lo, lt=hi)

    def totals(self, ns: str, lo: int, hi: int) -> Totals:
        found = self.agg.totals(self.tx, namespace=ns, ge=lo, lt=hi)
        return found.count, found.cost, found.tokens

    def rank(self, ns: str, ts: int) -> int:
        return self.agg.rank(self.tx, ts, namespace=ns)

    def select(self, ns: str, index: int) -> tuple[int, int]:
        item = self.agg.at(self.tx, index, namespace=ns)
        return item.key, item.id

    def buckets(self, ns: str, bounds: list[int]) -> list[Totals]:
        agg, tx = self.agg, self.tx
        out = []
        for lo, hi in itertools.pairwise(bounds):
            found = agg.totals(tx, namespace=ns, ge=lo, lt=hi)
            out.append((found.count, found.cost, found.tokens))
        return out

    def insert_one(self, event: Event) -> None:
        ns, ts, item_id, cost, tokens = event
        with self.db.write() as tx:
            self.agg.insert(tx, ts, item_id, (cost, tokens), namespace=ns)

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        with self.db.write() as tx:
            self.agg.delete(tx, ts, item_id, namespace=ns)

    def insert_batch(self, events: list[Event]) -> None:
        ns = events[0][0]
        with self.db.write() as tx:
            self.agg.insert_many(
                tx, [(ts, i, (cost, tokens)) for _, ts, i, cost, tokens in events], namespace=ns
            )

    def delete_batch(self, events: list[Event]) -> None:
        with self.db.write() as tx:
            for ns, ts, item_id, _, _ in events:
                self.agg.delete(tx, ts, item_id, namespace=ns)

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        with self.db.write() as tx:
            return self.agg.delete_range(tx, namespace=ns, ge=lo, lt=hi).count

    def disk_bytes(self) -> int | None:
        return _disk_bytes(self.path)


# -- the naive LMDB layout: one row per event, scans for everything ---------------------------------


def _lmdb_key(ns: str, ts: int, item_id: int) -> bytes:
    return ns.encode() + b"\x00" + ts.to_bytes(8, "big") + item_id.to_bytes(8, "big")


class LmdbScan(System):
    """The naive layout: one LMDB database, key = namespace + ts + id, value = msgpack (cost, tokens).

    Counts and sums scan the window with a cursor (O(k)); rank scans from the namespace start and select
    steps the cursor ``index`` times. Same durability as tallytree: sync=False, metasync=False.
    """

    name = "lmdb-scan"
    config = "one LMDB db, key=namespace+ts+id, msgpack(cost, tokens); cursor scans; sync=False"

    def open(self, workdir: Path) -> None:
        self.path = workdir / "lmdb-scan"
        self.env = lmdb.open(
            str(self.path),
            map_size=1 << 37,
            max_dbs=1,
            sync=False,
            metasync=False,
            readahead=False,
        )
        self.db = self.env.open_db(b"events")
        self.txn: Any = None

    def close(self) -> None:
        self.env.close()

    def version(self) -> str:
        return metadata.version("lmdb")

    def load(self, dataset: Dataset) -> None:
        pack = msgpack.packb
        with self.env.begin(write=True, db=self.db) as txn:
            cursor = txn.cursor()
            for ns in sorted(dataset.by_namespace):
                prefix = ns.encode() + b"\x00"
                cursor.putmulti(
                    (
                        (prefix + ts.to_bytes(8, "big") + i.to_bytes(8, "big"), pack((cost, tokens)))
                        for ts, i, cost, tokens in dataset.by_namespace[ns]
                    ),
                    append=True,
                )

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self.env.begin(db=self.db) as txn:
            self.txn = txn
            try:
                yield
            finally:
                self.txn = None

    def _scan_count(self, start: bytes, end: bytes) -> int:
        cursor = self.txn.cursor()
        if not cursor.set_range(start):
            return 0
        found = 0
        for key in cursor.iternext(keys=True, values=False):
            if key >= end:
                break
            found += 1
        return found

    def count(self, ns: str, lo: int, hi: int) -> int:
        prefix = ns.encode() + b"\x00"
        return self._scan_count(prefix + lo.to_bytes(8, "big"), prefix + hi.to_bytes(8, "big"))

    def totals(self, ns: str, lo: int, hi: int) -> Totals:
        prefix = ns.encode() + b"\x00"
        end = prefix + hi.to_bytes(8, "big")
        cursor = self.txn.cursor()
        found, cost, tokens = 0, 0.0, 0
        if not cursor.set_range(prefix + lo.to_bytes(8, "big")):
            return found, cost, tokens
        unpack = msgpack.unpackb
        for key, value in cursor:
            if key >= end:
                break
            item_cost, item_tokens = unpack(value)
            found += 1
            cost += item_cost
            tokens += item_tokens
        return found, cost, tokens

    def rank(self, ns: str, ts: int) -> int:
        prefix = ns.encode() + b"\x00"
        return self._scan_count(prefix, prefix + ts.to_bytes(8, "big"))

    def select(self, ns: str, index: int) -> tuple[int, int]:
        prefix = ns.encode() + b"\x00"
        cursor = self.txn.cursor()
        cursor.set_range(prefix)
        for position, key in enumerate(cursor.iternext(keys=True, values=False)):
            if position == index:
                return int.from_bytes(key[-16:-8], "big"), int.from_bytes(key[-8:], "big")
        raise IndexError(index)

    def buckets(self, ns: str, bounds: list[int]) -> list[Totals]:
        prefix = ns.encode() + b"\x00"
        start = bounds[0]
        out = [[0, 0.0, 0] for _ in bounds[1:]]
        end = prefix + bounds[-1].to_bytes(8, "big")
        cursor = self.txn.cursor()
        if cursor.set_range(prefix + start.to_bytes(8, "big")):
            unpack = msgpack.unpackb
            offset = len(prefix)
            for key, value in cursor:
                if key >= end:
                    break
                ts = int.from_bytes(key[offset : offset + 8], "big")
                cell = out[(ts - start) // DAY]
                item_cost, item_tokens = unpack(value)
                cell[0] += 1
                cell[1] += item_cost
                cell[2] += item_tokens
        return [(cell[0], cell[1], cell[2]) for cell in out]

    def insert_one(self, event: Event) -> None:
        ns, ts, item_id, cost, tokens = event
        with self.env.begin(write=True, db=self.db) as txn:
            txn.put(_lmdb_key(ns, ts, item_id), msgpack.packb((cost, tokens)))

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            if not txn.delete(_lmdb_key(ns, ts, item_id)):
                raise KeyError((ns, ts, item_id))

    def insert_batch(self, events: list[Event]) -> None:
        pack = msgpack.packb
        with self.env.begin(write=True, db=self.db) as txn:
            for ns, ts, item_id, cost, tokens in events:
                txn.put(_lmdb_key(ns, ts, item_id), pack((cost, tokens)))

    def delete_batch(self, events: list[Event]) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            for ns, ts, item_id, _, _ in events:
                txn.delete(_lmdb_key(ns, ts, item_id))

    def _delete_keys(self, start: bytes, end: bytes) -> int:
        removed = 0
        with self.env.begin(write=True, db=self.db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return 0
            while cursor.key() and cursor.key() < end:
                cursor.delete()
                removed += 1
        return removed

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        prefix = ns.encode() + b"\x00"
        start = prefix if lo is None else prefix + lo.to_bytes(8, "big")
        end = ns.encode() + b"\x01" if hi is None else prefix + hi.to_bytes(8, "big")
        return self._delete_keys(start, end)

    def disk_bytes(self) -> int | None:
        return _disk_bytes(self.path)


# -- sortedcontainers in memory -----------------------------------------------------------------------


class Sorted(System):
    """A ``SortedList`` of ``(ts, id, cost, tokens)`` tuples per namespace, in memory (not persisted).

    Count, rank and select are bisects / positional index lookups (O(log n)); sums iterate the window.
    A plain ``SortedList`` of tuples orders like a ``SortedKeyList`` keyed on ``(ts, id)`` but skips the
    key function, so it is the faster of the two.
    """

    name = "sortedcontainers"
    persisted = False
    config = "SortedList of (ts, id, cost, tokens) per namespace, in memory, not persisted"

    def open(self, workdir: Path) -> None:
        self.lists: dict[str, SortedList] = {}

    def version(self) -> str:
        return metadata.version("sortedcontainers")

    def load(self, dataset: Dataset) -> None:
        self.lists = {ns: SortedList(rows) for ns, rows in dataset.by_namespace.items()}

    def _list(self, ns: str) -> SortedList:
        found = self.lists.get(ns)
        if found is None:
            found = self.lists[ns] = SortedList()
        return found

    def count(self, ns: str, lo: int, hi: int) -> int:
        rows = self._list(ns)
        return rows.bisect_left((hi,)) - rows.bisect_left((lo,))

    def totals(self, ns: str, lo: int, hi: int) -> Totals:
        rows = self._list(ns)
        start, stop = rows.bisect_left((lo,)), rows.bisect_left((hi,))
        cost, tokens = 0.0, 0
        for row in rows.islice(start, stop):
            cost += row[2]
            tokens += row[3]
        return stop - start, cost, tokens

    def rank(self, ns: str, ts: int) -> int:
        return self._list(ns).bisect_left((ts,))

    def select(self, ns: str, index: int) -> tuple[int, int]:
        row = self._list(ns)[index]
        return row[0], row[1]

    def buckets(self, ns: str, bounds: list[int]) -> list[Totals]:
        rows = self._list(ns)
        cuts = [rows.bisect_left((bound,)) for bound in bounds]
        out = []
        for start, stop in itertools.pairwise(cuts):
            cost, tokens = 0.0, 0
            for row in rows.islice(start, stop):
                cost += row[2]
                tokens += row[3]
            out.append((stop - start, cost, tokens))
        return out

    def insert_one(self, event: Event) -> None:
        self._list(event[0]).add(event[1:])

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        rows = self._list(ns)
        index = rows.bisect_left((ts, item_id))
        if index >= len(rows) or rows[index][:2] != (ts, item_id):
            raise KeyError((ns, ts, item_id))
        del rows[index]

    def insert_batch(self, events: list[Event]) -> None:
        self._list(events[0][0]).update(event[1:] for event in events)

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        rows = self._list(ns)
        start = 0 if lo is None else rows.bisect_left((lo,))
        stop = len(rows) if hi is None else rows.bisect_left((hi,))
        if stop <= start:
            return 0
        del rows[start:stop]
        return stop - start


# -- SQL systems --------------------------------------------------------------------------------------

_COLUMNS = "namespace, ts, id, cost, tokens"


class _Sql(System):
    """Shared SQL text; subclasses set the placeholder and integer division operator."""

    mark = "?"
    intdiv = "/"

    def _sql(self) -> None:
        m = self.mark
        where = f"namespace = {m} AND ts >= {m} AND ts < {m}"
        self.q_count = f"SELECT COUNT(*) FROM events WHERE {where}"
        self.q_totals = (
            f"SELECT COUNT(*), COALESCE(SUM(cost), 0.0), COALESCE(SUM(tokens), 0) FROM events WHERE {where}"
        )
        self.q_rank = f"SELECT COUNT(*) FROM events WHERE namespace = {m} AND ts < {m}"
        self.q_select = f"SELECT ts, id FROM events WHERE namespace = {m} ORDER BY ts, id LIMIT 1 OFFSET {m}"
        self.q_buckets = (
            f"SELECT (ts - {m}) {self.intdiv} {DAY} AS day, COUNT(*), SUM(cost), SUM(tokens) "
            f"FROM events WHERE {where} GROUP BY day"
        )
        self.q_insert = f"INSERT INTO events ({_COLUMNS}) VALUES ({m}, {m}, {m}, {m}, {m})"
        self.q_delete = f"DELETE FROM events WHERE namespace = {m} AND ts = {m} AND id = {m}"

    def _range_delete_sql(self, ns: str, lo: int | None, hi: int | None) -> tuple[str, tuple[Any, ...]]:
        m = self.mark
        sql = f"DELETE FROM events WHERE namespace = {m}"
        params: list[Any] = [ns]
        if lo is not None:
            sql += f" AND ts >= {m}"
            params.append(lo)
        if hi is not None:
            sql += f" AND ts < {m}"
            params.append(hi)
        return sql, tuple(params)

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        raise NotImplementedError

    def count(self, ns: str, lo: int, hi: int) -> int:
        return int(self._one(self.q_count, (ns, lo, hi))[0])

    def totals(self, ns: str, lo: int, hi: int) -> Totals:
        found, cost, tokens = self._one(self.q_totals, (ns, lo, hi))
        return int(found), float(cost), int(tokens)

    def rank(self, ns: str, ts: int) -> int:
        return int(self._one(self.q_rank, (ns, ts))[0])

    def select(self, ns: str, index: int) -> tuple[int, int]:
        ts, item_id = self._one(self.q_select, (ns, index))
        return int(ts), int(item_id)

    def buckets(self, ns: str, bounds: list[int]) -> list[Totals]:
        out: list[Totals] = [(0, 0.0, 0)] * (len(bounds) - 1)
        for day, found, cost, tokens in self._all(self.q_buckets, (bounds[0], ns, bounds[0], bounds[-1])):
            out[int(day)] = (int(found), float(cost), int(tokens))
        return out


class Sqlite(_Sql):
    """stdlib sqlite3: WAL, synchronous=NORMAL (no fsync per commit), a covering index.

    Table ``events(namespace, ts, id, cost, tokens)`` with the covering index
    ``(namespace, ts, id, cost, tokens)``; 512 MiB page cache and a 4 GiB mmap, so reads are warm.
    """

    name = "sqlite"
    config = (
        "stdlib sqlite3, WAL + synchronous=NORMAL (no fsync per commit), covering index "
        "(namespace, ts, id, cost, tokens), cache_size 512 MiB, mmap 4 GiB"
    )

    def open(self, workdir: Path) -> None:
        self.path = workdir / "events.sqlite"
        self.conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=64)
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "cache_size=-524288",
            "mmap_size=4294967296",
            "temp_store=MEMORY",
        ):
            self.conn.execute(f"PRAGMA {pragma}")
        self.conn.execute(
            "CREATE TABLE events (namespace TEXT NOT NULL, ts INTEGER NOT NULL, id INTEGER NOT NULL, "
            "cost REAL NOT NULL, tokens INTEGER NOT NULL)"
        )
        self._sql()

    def close(self) -> None:
        self.conn.close()

    def version(self) -> str:
        return sqlite3.sqlite_version

    def load(self, dataset: Dataset) -> None:
        conn = self.conn
        conn.execute("BEGIN")
        for ns, rows in dataset.by_namespace.items():
            conn.executemany(self.q_insert, ((ns, ts, i, cost, tokens) for ts, i, cost, tokens in rows))
        conn.execute("COMMIT")
        conn.execute("CREATE INDEX events_window ON events (namespace, ts, id, cost, tokens)")

    @contextmanager
    def reading(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def insert_one(self, event: Event) -> None:
        self.conn.execute(self.q_insert, event)

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        if self.conn.execute(self.q_delete, (ns, ts, item_id)).rowcount != 1:
            raise KeyError((ns, ts, item_id))

    def insert_batch(self, events: list[Event]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany(self.q_insert, events)
        self.conn.execute("COMMIT")

    def delete_batch(self, events: list[Event]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany(self.q_delete, [event[:3] for event in events])
        self.conn.execute("COMMIT")

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        return int(self.conn.execute(*self._range_delete_sql(ns, lo, hi)).rowcount)

    def disk_bytes(self) -> int | None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return _disk_bytes(self.path)


class DuckDb(_Sql):
    """DuckDB (optional), a file database; rows loaded sorted by (namespace, ts, id), no index.

    DuckDB answers range filters with zone maps (min/max per row group) over the sorted load, which is
    its recommended layout; an ART index would only slow its writes. Every commit writes its WAL
    (DuckDB has no setting to skip that).
    """

    name = "duckdb"
    intdiv = "//"
    config = "file database, rows loaded sorted by (namespace, ts, id), zone maps, no index"

    def open(self, workdir: Path) -> None:
        try:
            import duckdb
            import numpy  # noqa: F401 - loads go through numpy arrays; import it before timing
        except ImportError as exc:
            raise Unavailable(f"duckdb is not usable ({exc}; pip install duckdb numpy)") from exc
        self.duckdb = duckdb
        self.path = workdir / "events.duckdb"
        self.conn = duckdb.connect(str(self.path))
        self.conn.execute(
            "CREATE TABLE events (namespace VARCHAR NOT NULL, ts BIGINT NOT NULL, id BIGINT NOT NULL, "
            "cost DOUBLE NOT NULL, tokens BIGINT NOT NULL)"
        )
        self._sql()

    def close(self) -> None:
        self.conn.close()

    def version(self) -> str:
        return str(self.duckdb.__version__)

    def load(self, dataset: Dataset) -> None:
        import numpy as np

        names: list[str] = []
        for ns, rows in dataset.by_namespace.items():
            names.extend([ns] * len(rows))
        rows = [row for ns in dataset.by_namespace for row in dataset.by_namespace[ns]]
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        source = {
            "namespace": np.array(names, dtype=object),
            "ts": np.array(columns[0], dtype=np.int64),
            "id": np.array(columns[1], dtype=np.int64),
            "cost": np.array(columns[2], dtype=np.float64),
            "tokens": np.array(columns[3], dtype=np.int64),
        }
        self.conn.register("source_rows", source)
        self.conn.execute(f"INSERT INTO events SELECT {_COLUMNS} FROM source_rows")
        self.conn.unregister("source_rows")
        self.conn.execute("CHECKPOINT")

    @contextmanager
    def reading(self) -> Iterator[None]:
        self.conn.execute("BEGIN TRANSACTION")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def insert_one(self, event: Event) -> None:
        self.conn.execute(self.q_insert, event)

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        if self.conn.execute(self.q_delete, (ns, ts, item_id)).fetchone()[0] != 1:
            raise KeyError((ns, ts, item_id))

    def insert_batch(self, events: list[Event]) -> None:
        import numpy as np

        columns = list(zip(*events, strict=True))
        source = {
            "namespace": np.array(columns[0], dtype=object),
            "ts": np.array(columns[1], dtype=np.int64),
            "id": np.array(columns[2], dtype=np.int64),
            "cost": np.array(columns[3], dtype=np.float64),
            "tokens": np.array(columns[4], dtype=np.int64),
        }
        self.conn.register("batch_rows", source)
        self.conn.execute(f"INSERT INTO events SELECT {_COLUMNS} FROM batch_rows")
        self.conn.unregister("batch_rows")

    def delete_batch(self, events: list[Event]) -> None:
        self.conn.execute("BEGIN TRANSACTION")
        self.conn.executemany(self.q_delete, [event[:3] for event in events])
        self.conn.execute("COMMIT")

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        return int(self.conn.execute(*self._range_delete_sql(ns, lo, hi)).fetchone()[0])

    def disk_bytes(self) -> int | None:
        self.conn.execute("CHECKPOINT")
        return _disk_bytes(self.path)


# -- PostgreSQL (only when its server binaries are installed) ----------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A private PostgreSQL server in a temporary directory, on 127.0.0.1, stopped at exit.

    As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
    """

    SETTINGS = (
        "synchronous_commit=off",
        "shared_buffers=512MB",
        "max_wal_size=4GB",
        "jit=off",
    )

    def __init__(self) -> None:
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl is None:
            raise Unavailable("no PostgreSQL server binaries (pg_ctl not on PATH)")
        bindir = Path(pg_ctl).resolve().parent
        self.pg_ctl = str(bindir / "pg_ctl")
        self.initdb = str(bindir / "initdb")
        if not Path(self.initdb).exists():
            raise Unavailable(f"pg_ctl found but no initdb beside it in {bindir}")
        try:
            import psycopg
        except ImportError as exc:
            raise Unavailable(
                "PostgreSQL is installed but psycopg is not (pip install psycopg[binary])"
            ) from exc
        self.psycopg = psycopg
        self.user: str | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise Unavailable(
                    "running as root and there is no 'postgres' user to run the server"
                ) from exc
            self.user = "postgres"
        self.base: Path | None = None
        self.running = False

    def _run(self, args: list[str]) -> None:
        result = subprocess.run(
            args, user=self.user, capture_output=True, text=True, timeout=120, check=False, cwd="/"
        )
        if result.returncode != 0:
            raise Unavailable(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-400:]}"
            )

    def start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tallytree-bench-pg-"))
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        data = self.base / "data"
        self._run([self.initdb, "-D", str(data), "-U", "bench", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync"])  # fmt: skip
        self.port = _free_port()
        options = " ".join(
            [f"-c listen_addresses=127.0.0.1 -c port={self.port}",
             f"-c unix_socket_directories={self.base}"]
            + [f"-c {setting}" for setting in self.SETTINGS]
        )  # fmt: skip
        atexit.register(self.stop)
        self._run([self.pg_ctl, "-D", str(data), "-l", str(self.base / "log"), "-w", "-t", "60",
                   "-o", options, "start"])  # fmt: skip
        self.running = True
        with self.connect() as conn:
            self.server_version = conn.execute("SHOW server_version").fetchone()[0]

    def connect(self) -> Any:
        return self.psycopg.connect(
            host=str(self.base), port=self.port, user="bench", dbname="postgres", autocommit=True
        )

    def stop(self) -> None:
        if self.running and self.base is not None:
            self.running = False
            with contextlib.suppress(Exception):
                self._run([self.pg_ctl, "-D", str(self.base / "data"), "-m", "fast", "-w", "stop"])
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


class Postgres(_Sql):
    """PostgreSQL through psycopg 3 over its private Unix socket; synchronous_commit=off, covering index.

    Same table and index as SQLite; loaded with COPY, then indexed and VACUUM ANALYZEd so that window
    queries are index-only scans.
    """

    name = "postgresql"
    mark = "%s"
    config = (
        "private server, psycopg 3 over a Unix socket, synchronous_commit=off (no WAL flush wait per "
        "commit), covering index (namespace, ts, id, cost, tokens), shared_buffers=512MB, jit=off"
    )
    server: PostgresServer | None = None

    def open(self, workdir: Path) -> None:
        if Postgres.server is None or not Postgres.server.running:
            server = PostgresServer()
            server.start()
            Postgres.server = server
        self.conn = Postgres.server.connect()
        self.conn.execute("DROP TABLE IF EXISTS events")
        self.conn.execute(
            "CREATE TABLE events (namespace TEXT NOT NULL, ts BIGINT NOT NULL, id BIGINT NOT NULL, "
            "cost DOUBLE PRECISION NOT NULL, tokens BIGINT NOT NULL)"
        )
        self._sql()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("DROP TABLE IF EXISTS events")
        self.conn.close()

    @classmethod
    def shutdown(cls) -> None:
        if cls.server is not None:
            cls.server.stop()
            cls.server = None

    def version(self) -> str:
        server = Postgres.server
        version = server.server_version if server is not None else "?"
        return f"{version} (psycopg {metadata.version('psycopg')})"

    def settle(self) -> None:
        """A checkpoint now: after a bulk load, the spread checkpoint (and its disk writes) would
        otherwise run for minutes, on the cores every system's measurements share."""
        self.conn.execute("CHECKPOINT")

    def load(self, dataset: Dataset) -> None:
        with (
            self.conn.cursor() as cursor,
            cursor.copy(f"COPY events ({_COLUMNS}) FROM STDIN") as copy,
        ):
            for ns, rows in dataset.by_namespace.items():
                for ts, i, cost, tokens in rows:
                    copy.write_row((ns, ts, i, cost, tokens))
        self.conn.execute("CREATE INDEX events_window ON events (namespace, ts, id, cost, tokens)")
        self.conn.execute("VACUUM ANALYZE events")

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.conn.execute(sql, params, prepare=True).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self.conn.execute(sql, params, prepare=True).fetchall()

    def insert_one(self, event: Event) -> None:
        self.conn.execute(self.q_insert, event, prepare=True)

    def delete_one(self, ns: str, ts: int, item_id: int) -> None:
        if self.conn.execute(self.q_delete, (ns, ts, item_id), prepare=True).rowcount != 1:
            raise KeyError((ns, ts, item_id))

    def insert_batch(self, events: list[Event]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.executemany(self.q_insert, events)

    def delete_batch(self, events: list[Event]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.executemany(self.q_delete, [event[:3] for event in events])

    def delete_range(self, ns: str, lo: int | None, hi: int | None) -> int:
        return int(self.conn.execute(*self._range_delete_sql(ns, lo, hi)).rowcount)

    def disk_bytes(self) -> int | None:
        return int(self.conn.execute("SELECT pg_total_relation_size('events')").fetchone()[0])


ALL_SYSTEMS: list[type[System]] = [TallyTree, Sorted, LmdbScan, Sqlite, DuckDb, Postgres]
"""Every adapter, in the order of the tables; tallytree first (it is what the ratios compare)."""
