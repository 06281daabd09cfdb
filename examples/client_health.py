"""Client health without a materialized view: a per-client summary that is exact at every moment.

Previously: ``client_health_summary``, a materialized view over the ``tickets`` and ``invoices`` tables
of an SQL database, refreshed every 5 minutes: up to 5 minutes stale, its "overdue" figures frozen at
the time of the refresh, and every refresh reading every row again.

Here the rows stay in SQL (SQLite, from the standard library). Each write of the application also
records the change in an ``outbox`` table, in the same SQL transaction; ``sync`` applies the outbox to
tallytree aggregates through a ``ChangeHandler`` per SQL table and stores its position in the outbox
in the same tallytree transaction. So a crash between the SQL commit and the sync loses nothing: the
next sync applies what was missed, exactly once. A client's summary is then a few O(log n) reads with
"overdue" computed at the time of the question, and ``tallytree.verify`` against the SQL rows proves
that nothing drifted.

Run: ``python examples/client_health.py [writes]`` (default 50,000 writes for 300 clients).
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import tempfile
import time
from typing import Any

import tallytree
from tallytree import Change, ChangeHandler

DAY = 86_400
WINDOW = 7 * DAY  # "opened this week", "satisfaction this week"
REFRESH = 300  # the view's refresh period, seconds
COLUMNS = {
    "tickets": ("id", "client", "status", "opened_at", "due_at", "closed_at", "csat"),
    "invoices": ("id", "client", "status", "amount", "due_at"),
}
SCHEMA = """
create table tickets (id integer primary key, client text not null, status text not null,
                      opened_at integer not null, due_at integer not null, closed_at integer, csat integer);
create table invoices (id integer primary key, client text not null, status text not null,
                       amount integer not null, due_at integer not null);
create index tickets_client on tickets (client);
create index invoices_client on invoices (client);
create table outbox (seq integer primary key autoincrement, source text not null, kind text not null,
                     id integer not null, old text, new text);
create table client_health_summary (client text primary key, open_tickets integer, overdue_tickets integer,
                                    opened_this_week integer, csat_sum integer, csat_count integer,
                                    unpaid integer, overdue_amount integer);
"""

# What the materialized view holds, per client, computed at :now. The same figures for one client
# (`where client = :client`) are the live query an application would run instead of the view.
TICKETS_SQL = """
select client, sum(status = 'open'), sum(status = 'open' and due_at < :now), sum(opened_at >= :week),
       coalesce(sum(case when csat is not null and closed_at >= :week then csat end), 0),
       sum(csat is not null and closed_at >= :week)
from tickets {where} group by client
"""
INVOICES_SQL = """
select client, coalesce(sum(case when status = 'sent' then amount end), 0),
       coalesce(sum(case when status = 'sent' and due_at < :now then amount end), 0)
from invoices {where} group by client
"""
FIELDS = (
    "open_tickets",
    "overdue_tickets",
    "opened_this_week",
    "csat_sum",
    "csat_count",
    "unpaid",
    "overdue_amount",
)


def connect(path: str) -> sqlite3.Connection:
    """The application's SQL database, with its tables created."""
    sql = sqlite3.connect(path, isolation_level=None)
    sql.execute("pragma journal_mode = wal")
    sql.execute("pragma synchronous = normal")  # WAL's usual setting, no fsync per commit, as durable=False
    if sql.execute("select count(*) from sqlite_master where name = 'tickets'").fetchone()[0] == 0:
        sql.executescript(SCHEMA)
    return sql


def attach(db: tallytree.Database) -> dict[str, ChangeHandler]:
    """One ChangeHandler per SQL table, with the aggregates the summary reads (register them in every
    process: a handler's extractors live in the process)."""
    tickets = ChangeHandler(db)
    # (status, due_at): "open" is a prefix, "overdue" the open tickets due before now
    tickets.aggregate("tickets_by_status", namespace="client", key=("status", "due_at"))
    tickets.aggregate("tickets_by_opened", namespace="client", key="opened_at")
    tickets.aggregate("ratings", namespace="client", key="closed_at", values=("csat",), where=_rated)
    invoices = ChangeHandler(db)
    invoices.aggregate("invoices_by_status", namespace="client", key=("status", "due_at"), values=("amount",))
    db.table("outbox_position")  # where sync keeps its place, next to the aggregates it writes
    return {"tickets": tickets, "invoices": invoices}


def _rated(row: dict[str, Any]) -> bool:
    return row["csat"] is not None


def record(sql: sqlite3.Connection, source: str, id: int, new: dict[str, Any] | None) -> None:
    """The application's write: one row of ``source`` inserted, updated or (``new`` None) deleted, and
    the change appended to the outbox, in one SQL transaction."""
    columns = COLUMNS[source]
    sql.execute("begin immediate")
    try:
        found = sql.execute(f"select {', '.join(columns)} from {source} where id = ?", (id,)).fetchone()
        old = dict(zip(columns, found, strict=True)) if found is not None else None
        if new is None:
            kind = "delete"
            sql.execute(f"delete from {source} where id = ?", (id,))
        else:
            kind = "insert" if old is None else "update"
            row = {**new, "id": id}
            names = ", ".join(columns)
            marks = ", ".join(f":{column}" for column in columns)
            sql.execute(f"insert or replace into {source} ({names}) values ({marks})", row)
        sql.execute(
            "insert into outbox (source, kind, id, old, new) values (?, ?, ?, ?, ?)",
            (source, kind, id, json.dumps(old), json.dumps(new and {**new, "id": id})),
        )
        sql.execute("commit")
    except BaseException:
        sql.execute("rollback")
        raise


def sync(db: tallytree.Database, sql: sqlite3.Connection, hooks: dict[str, ChangeHandler]) -> int:
    """Apply the outbox after the stored position to the aggregates, and move the position, in one
    tallytree transaction; then trim the applied outbox rows. Returns the number of changes applied.

    Run it after each write, on a schedule, or both: it applies each change exactly once, whatever
    crashed before (a change is in the outbox if and only if its row change committed)."""
    position = db.table("outbox_position")
    with db.write() as tx:
        stored = position.get(tx, "sql")
        done = stored["seq"] if stored is not None else 0
        rows = sql.execute(
            "select seq, source, kind, id, old, new from outbox where seq > ? order by seq", (done,)
        ).fetchall()
        for _, source, kind, id, old, new in rows:
            hooks[source].apply(tx, Change(kind, id, json.loads(old), json.loads(new)))
        if rows:
            done = rows[-1][0]
            position.upsert(tx, "sql", {"seq": done})
    sql.execute("delete from outbox where seq <= ?", (done,))  # applied: safe to trim, even if never run
    return len(rows)


def health(
    tx: tallytree.Transaction, hooks: dict[str, ChangeHandler], client: str, now: int
) -> dict[str, int]:
    """A client's summary at ``now``, from the aggregates: six O(log n) reads."""
    tickets, invoices = hooks["tickets"], hooks["invoices"]
    by_status = tickets.definition("tickets_by_status").aggregate
    ratings = tickets.definition("ratings").aggregate.totals(tx, namespace=client, ge=now - WINDOW)
    opened = tickets.definition("tickets_by_opened").aggregate
    unpaid = invoices.definition("invoices_by_status").aggregate
    return {
        "open_tickets": by_status.count(tx, namespace=client, prefix=("open",)),
        "overdue_tickets": by_status.count(tx, namespace=client, ge=("open",), lt=("open", now)),
        "opened_this_week": opened.count(tx, namespace=client, ge=now - WINDOW),
        "csat_sum": ratings.csat,
        "csat_count": ratings.count,
        "unpaid": unpaid.sum(tx, "amount", namespace=client, prefix=("sent",)),
        "overdue_amount": unpaid.sum(tx, "amount", namespace=client, ge=("sent",), lt=("sent", now)),
    }


def _summaries(sql: sqlite3.Connection, now: int, client: str | None = None) -> dict[str, dict[str, int]]:
    where = "where client = :client" if client is not None else ""
    params = {"now": now, "week": now - WINDOW, "client": client}
    found: dict[str, dict[str, int]] = {}
    for row in sql.execute(TICKETS_SQL.format(where=where), params):
        found.setdefault(row[0], dict.fromkeys(FIELDS, 0)).update(zip(FIELDS[:5], row[1:], strict=True))
    for row in sql.execute(INVOICES_SQL.format(where=where), params):
        found.setdefault(row[0], dict.fromkeys(FIELDS, 0)).update(zip(FIELDS[5:], row[1:], strict=True))
    return found


def health_sql(sql: sqlite3.Connection, client: str, now: int) -> dict[str, int]:
    """The same summary from a live SQL query over the client's rows: O(rows of the client)."""
    return _summaries(sql, now, client).get(client, dict.fromkeys(FIELDS, 0))


def refresh_view(sql: sqlite3.Connection, now: int) -> None:
    """What the 5-minute job does: recompute ``client_health_summary`` from every row."""
    summaries = _summaries(sql, now)
    with sql:
        sql.execute("begin")
        sql.execute("delete from client_health_summary")
        sql.executemany(
            f"insert into client_health_summary values (?, {', '.join('?' * len(FIELDS))})",
            ([client, *(summary[field] for field in FIELDS)] for client, summary in summaries.items()),
        )


def view(sql: sqlite3.Connection, client: str) -> dict[str, int]:
    """A client's row of the materialized view, as of its last refresh."""
    row = sql.execute(
        f"select {', '.join(FIELDS)} from client_health_summary where client = ?", (client,)
    ).fetchone()
    return dict(zip(FIELDS, row, strict=True)) if row is not None else dict.fromkeys(FIELDS, 0)


def simulate(
    db: tallytree.Database,
    sql: sqlite3.Connection,
    hooks: dict[str, ChangeHandler],
    writes: int,
    *,
    clients: int = 300,
    seed: int = 1,
    start: int = 1_700_000_000,
    refresh_at: int | None = None,
) -> int:
    """``writes`` application writes (tickets opened and closed, invoices sent, paid and voided), each
    one synced; the view refreshed once, just before write ``refresh_at``. Returns the clock."""
    rng = random.Random(seed)
    names = [f"client_{i}" for i in range(clients)]
    open_tickets: list[tuple[int, dict[str, Any]]] = []
    sent: list[tuple[int, dict[str, Any]]] = []
    next_id = 1
    now = start
    for write in range(writes):
        if write == refresh_at:
            refresh_view(sql, now)
        now += rng.randrange(1, 10)
        kind = rng.choices(("open", "send", "close", "pay"), (30, 25, 25, 20))[0]
        if kind == "close" and not open_tickets:
            kind = "open"
        if kind == "pay" and not sent:
            kind = "send"
        if kind == "open":
            row = {
                "client": rng.choice(names),
                "status": "open",
                "opened_at": now,
                "due_at": now + rng.randrange(DAY, 3 * DAY),
                "closed_at": None,
                "csat": None,
            }
            record(sql, "tickets", next_id, row)
            open_tickets.append((next_id, row))
            next_id += 1
        elif kind == "send":
            row = {
                "client": rng.choice(names),
                "status": "sent",
                "amount": rng.randrange(5_000, 500_000),
                "due_at": now + rng.randrange(DAY, 10 * DAY),
            }
            record(sql, "invoices", next_id, row)
            sent.append((next_id, row))
            next_id += 1
        elif kind == "close":  # a ticket closed, most of them rated 1 to 5
            id, row = open_tickets.pop(rng.randrange(len(open_tickets)))
            csat = rng.randint(1, 5) if rng.random() < 0.7 else None
            record(sql, "tickets", id, {**row, "status": "closed", "closed_at": now, "csat": csat})
        else:  # an invoice paid, or (one in ten) voided: deleted
            id, row = sent.pop(rng.randrange(len(sent)))
            record(sql, "invoices", id, None if rng.random() < 0.1 else {**row, "status": "paid"})
        sync(db, sql, hooks)
    return now


def main(writes: int = 50_000) -> None:
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        sql = connect(directory + "/app.sqlite")
        hooks = attach(db)
        started = time.perf_counter()
        # the view's last refresh: about 5 minutes of writes (one every 5 s on average) before the end
        now = simulate(db, sql, hooks, writes, refresh_at=max(0, writes - REFRESH // 5))
        took = time.perf_counter() - started
        print(f"{writes:,} writes to SQL, each synced to tallytree through the outbox: {took:.1f} s")

        clients = sorted(_summaries(sql, now))
        with db.read() as tx:
            began = time.perf_counter()
            ours = {client: health(tx, hooks, client, now) for client in clients}
            per_client = (time.perf_counter() - began) / len(clients) * 1e6
        began = time.perf_counter()
        live = {client: health_sql(sql, client, now) for client in clients}
        per_query = (time.perf_counter() - began) / len(clients) * 1e6
        began = time.perf_counter()
        everything = _summaries(sql, now)
        refresh = (time.perf_counter() - began) * 1e3
        if ours != live or ours != everything:
            raise AssertionError("tallytree and SQL disagree")  # never: the test checks it too
        stale = [client for client in clients if view(sql, client) != ours[client]]
        print(
            f"a client's summary from tallytree: {per_client:.0f} us; live SQL over the client's rows: "
            f"{per_query:.0f} us; the view's refresh reads every row: {refresh:.0f} ms"
        )
        print(f"the view, refreshed 5 minutes ago, is wrong for {len(stale)} of {len(clients)} clients")

        busiest = max(clients, key=lambda client: ours[client]["open_tickets"])
        old = view(sql, busiest)
        print(f"\n{busiest:<22}{'tallytree':>12}{'live SQL':>12}{'view':>12}")
        for field in FIELDS:
            print(f"{field:<22}{ours[busiest][field]:>12,}{live[busiest][field]:>12,}{old[field]:>12,}")

        # The process dies after a write's SQL commit, before its sync: the outbox keeps the change.
        ticket = sql.execute(
            "select * from tickets where client = ? and status = 'open'", (busiest,)
        ).fetchone()
        row = dict(zip(COLUMNS["tickets"], ticket, strict=True))
        record(sql, "tickets", row.pop("id"), {**row, "status": "closed", "closed_at": now, "csat": 5})
        with db.read() as tx:
            behind = health(tx, hooks, busiest, now) != health_sql(sql, busiest, now)
        applied = sync(db, sql, hooks)  # the next sync, after a restart
        with db.read() as tx:
            caught_up = health(tx, hooks, busiest, now) == health_sql(sql, busiest, now)
        print(
            f"\na write whose sync never ran: tallytree behind: {behind}; "
            f"the next sync applied {applied} change, equal again: {caught_up}"
        )

        with db.read() as tx:
            drift = [
                tallytree.verify(tx, db.aggregate(name), sql.execute(f"select * from {source}"))
                for name, source in (
                    ("tickets_by_status", "tickets"),
                    ("tickets_by_opened", "tickets"),
                    ("ratings", "tickets"),
                    ("invoices_by_status", "invoices"),
                )
            ]
            problems = tallytree.check(tx)
        print(
            f"verify against the SQL rows: {sum(not d.ok for d in drift)} of 4 aggregates drifted; "
            f"check: {len(problems)} problems"
        )
        sql.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
