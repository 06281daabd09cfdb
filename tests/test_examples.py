"""The examples' answers, checked against brute force over the same documents (at a smaller size)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import tallytree

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tallytree.Database]:
    with tallytree.open(tmp_path / "db", durable=False) as database:
        yield database


def test_org_stats(db: tallytree.Database) -> None:
    org_stats = example("org_stats")
    org_stats.simulate(db, 3000, batch=700)
    with db.read() as tx:
        loads = dict(db.table("loads").items(tx))
        invoices = dict(db.table("invoices").items(tx))
        orgs = {doc["org"] for doc in loads.values()}
        for org in orgs:
            answer = org_stats.org_stats(tx, db, org)
            mine = [doc for doc in loads.values() if doc["org"] == org]
            assert answer["loads"] == {
                s: sum(1 for d in mine if d["status"] == s) for s in org_stats.LOAD_STATUSES
            }
            assert answer["total_rate"] == sum(d["rate"] for d in mine)
            live = [d for d in invoices.values() if d["org"] == org and not d["void"]]
            assert answer["invoices"] == {
                s: {
                    "count": sum(1 for d in live if d["status"] == s),
                    "amount": sum(d["amount"] for d in live if d["status"] == s),
                }
                for s in org_stats.INVOICE_STATUSES
            }
            assert answer["voided"] == sum(1 for d in invoices.values() if d["org"] == org and d["void"])
        assert sum(1 for d in invoices.values() if d["void"]) > 0
        assert all(loads[d["load"]]["status"] == "invoiced" for d in invoices.values())
        for name, table in (
            ("loads_by_status", "loads"),
            ("invoices_by_status", "invoices"),
            ("voided_invoices", "invoices"),
        ):
            assert tallytree.verify(tx, db.table(table).aggregate(name), db.table(table)).ok
        assert not tallytree.check(tx)


def test_org_stats_bulk_update_moves_every_load(db: tallytree.Database) -> None:
    org_stats = example("org_stats")
    org_stats.simulate(db, 1500, batch=1500)
    with db.read() as tx:
        org, count = max(
            (
                (org, org_stats.org_stats(tx, db, org)["loads"]["booked"])
                for org in {d["org"] for _, d in db.table("loads").items(tx)}
            ),
            key=lambda pair: pair[1],
        )
        before = org_stats.org_stats(tx, db, org)["loads"]
    assert count > 0
    with db.write() as tx:
        assert org_stats.bulk_update_status(tx, db.table("loads"), org, "booked", "in_transit") == count
    with db.read() as tx:
        after = org_stats.org_stats(tx, db, org)["loads"]
    assert after["booked"] == 0 and after["in_transit"] == before["in_transit"] + count


def test_user_stats(db: tallytree.Database) -> None:
    user_stats = example("user_stats")
    events, follows = user_stats.generate(4000, seed=3)
    user_stats.load(db, events, follows)
    by_id = dict(events)
    for now in (user_stats.NOW, user_stats.NOW - timedelta(days=40, hours=5)):
        week_start = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        with db.read() as tx:
            for user in ("user_0", "user_1", "user_17", "user_1999", "nobody"):
                mine = [e for e in by_id.values() if e["creator"] == user]
                followed = [f for _, f in follows if f["user"] == user]
                assert user_stats.user_stats(tx, db, user, now) == {
                    "created_this_week": sum(1 for e in mine if e["created_at"] >= week_start),
                    "upcoming": sum(1 for e in mine if e["start"] > now),
                    "all_time": len(mine),
                    "follows": len(followed),
                    "upcoming_followed": sum(1 for f in followed if by_id[f["event"]]["start"] > now),
                }


def test_ai_usage(db: tallytree.Database) -> None:
    ai_usage = example("ai_usage")
    calls = ai_usage.generate(5000, seed=2)
    ai_usage.load(db, calls)
    start = ai_usage.T0 + timedelta(days=10, hours=3)
    with db.read() as tx:
        for org in ("org_0", "org_5", "org_299"):
            rows = ai_usage.daily_usage(tx, db, org, start, 20)
            assert len(rows) == 20
            for day, row in enumerate(rows):
                lower, upper = start + timedelta(days=day), start + timedelta(days=day + 1)
                chosen = [c for c in calls if c["org"] == org and lower <= c["at"] < upper]
                assert row["calls"] == len(chosen)
                assert row["cost"] == math.fsum(c["cost"] for c in chosen)
                for field in ("input_tokens", "cached_tokens", "output_tokens"):
                    assert row[field] == sum(c[field] for c in chosen)
                rates = [c["cached_tokens"] / c["input_tokens"] for c in chosen]
                if chosen:
                    assert row["mean_cost"] == pytest.approx(
                        math.fsum(c["cost"] for c in chosen) / len(chosen)
                    )
                    assert row["mean_cache_hit_rate"] == pytest.approx(math.fsum(rates) / len(rates))
                    total_input = sum(c["input_tokens"] for c in chosen)
                    assert row["cached_share"] == sum(c["cached_tokens"] for c in chosen) / total_input
                else:
                    assert row["mean_cost"] is None and row["cached_share"] is None


def test_quotas(db: tallytree.Database) -> None:
    quotas = example("quotas")
    docs = quotas.generate(6000, seed=4)
    accepted, refused = quotas.load(db, docs)
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    refusals = 0
    for doc in docs:  # the same requests against plain counters
        max_items, max_bytes = quotas.PLANS[quotas.plan_of(doc["org"])]
        used = expected[doc["org"]]
        if used[0] + 1 <= max_items and used[1] + doc["size"] <= max_bytes:
            used[0] += 1
            used[1] += doc["size"]
        else:
            refusals += 1
    assert (accepted, refused) == (len(docs) - refusals, refusals)
    assert refused > 0
    with db.read() as tx:
        for org, (count, size) in expected.items():
            used = quotas.usage(tx, db, org)
            assert (used.count, used.size) == (count, size)
            max_items, max_bytes = quotas.PLANS[quotas.plan_of(org)]
            assert quotas.can_create(tx, db, org, 1000) == (count + 1000 <= max_items)
    with db.write() as tx, pytest.raises(quotas.QuotaExceeded):
        quotas.create_items(tx, db, "org_0", [{"kind": "doc", "size": 1}] * 2000)
    with db.read() as tx:
        assert quotas.usage(tx, db, "org_0").count == expected["org_0"][0]


def test_archival(db: tallytree.Database, tmp_path: Path) -> None:
    archival = example("archival")
    docs = archival.generate(5000, seed=5)
    archival.load(db, docs)
    cutoff = archival.NOW - archival.RETENTION
    path = tmp_path / "archive.jsonl"
    with db.read() as tx:
        before = archival.totals(tx, db)
    assert before["events"] == len(docs) and before["bytes"] == sum(d["bytes"] for d in docs)
    removed = archival.archive(db, archival.NOW, path)
    old = [d for d in docs if d["at"] < cutoff]
    kept = [d for d in docs if d["at"] >= cutoff]
    assert removed == dict(Counter(d["group"] for d in old))
    exported = [json.loads(line) for line in path.open(encoding="utf-8")]
    assert sorted((e["group"], e["at"], e["bytes"]) for e in exported) == sorted(
        (d["group"], d["at"].isoformat(), d["bytes"]) for d in old
    )
    with db.read() as tx:
        after = archival.totals(tx, db)
        assert after == {
            "events": len(kept),
            "bytes": sum(d["bytes"] for d in kept),
            "by_kind": {
                k: sum(1 for d in kept if d["kind"] == k) for k in ("comment", "login", "share", "upload")
            },
        }
        table = db.table("events")
        assert table.count(tx) == len(kept)
        for name in ("events_by_group", "events_by_kind"):
            assert tallytree.verify(tx, table.aggregate(name), table).ok
    assert archival.archive(db, archival.NOW, path) == {}  # idempotent: nothing older is left


def test_leaderboard(db: tallytree.Database) -> None:
    leaderboard = example("leaderboard")
    games = leaderboard.generate(5000, seed=6)
    leaderboard.play(db, games)
    best: dict[str, tuple[int, int]] = {}
    for game in games:
        if game["player"] not in best or game["score"] > best[game["player"]][0]:
            best[game["player"]] = (game["score"], -game["at"])
    order = sorted(best, key=lambda p: (best[p], p), reverse=True)
    latencies = sorted(g["latency_ms"] for g in games)
    with db.read() as tx:
        assert leaderboard.top(tx, db, 10) == [(p, best[p][0]) for p in order[:10]]
        for player in order[::37]:
            assert leaderboard.rank_of(tx, db, player) == order.index(player) + 1
        assert leaderboard.rank_of(tx, db, "nobody") is None
        for fraction in (0.5, 0.95, 0.99, 1.0, 0.0001):
            assert (
                leaderboard.percentile(tx, db, fraction)
                == latencies[max(0, math.ceil(fraction * len(latencies)) - 1)]
            )


@pytest.mark.parametrize(
    "name", ["org_stats", "user_stats", "ai_usage", "quotas", "archival", "leaderboard", "client_health"]
)
def test_examples_run_and_print(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    example(name).main(1500)
    output = capsys.readouterr().out
    assert output.count("\n") >= 3


def test_docs_snippets_run() -> None:
    """Every ```python block of docs/tables.md, in order, in one namespace."""
    text = (EXAMPLES.parent / "docs" / "tables.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert len(blocks) >= 8
    namespace: dict[str, Any] = {}
    for block in blocks:
        if "sqlalchemy" in block and importlib.util.find_spec("sqlalchemy") is None:
            continue
        exec(compile(block, "docs/tables.md", "exec"), namespace)


def _client_health_by_hand(rows: dict[str, list[dict[str, Any]]], client: str, now: int) -> dict[str, int]:
    week = now - 7 * 86_400
    tickets = [row for row in rows["tickets"] if row["client"] == client]
    rated = [row for row in tickets if row["csat"] is not None and row["closed_at"] >= week]
    sent = [row for row in rows["invoices"] if row["client"] == client and row["status"] == "sent"]
    return {
        "open_tickets": sum(row["status"] == "open" for row in tickets),
        "overdue_tickets": sum(row["status"] == "open" and row["due_at"] < now for row in tickets),
        "opened_this_week": sum(row["opened_at"] >= week for row in tickets),
        "csat_sum": sum(row["csat"] for row in rated),
        "csat_count": len(rated),
        "unpaid": sum(row["amount"] for row in sent),
        "overdue_amount": sum(row["amount"] for row in sent if row["due_at"] < now),
    }


def test_client_health(tmp_path: Path) -> None:
    client_health = example("client_health")
    sql = client_health.connect(str(tmp_path / "app.sqlite"))
    with tallytree.open(tmp_path / "db", durable=False) as db:
        hooks = client_health.attach(db)
        now = client_health.simulate(db, sql, hooks, 2500, clients=12, seed=3, refresh_at=2400)
        rows = {
            source: [dict(zip(columns, row, strict=True)) for row in sql.execute(f"select * from {source}")]
            for source, columns in client_health.COLUMNS.items()
        }
        clients = sorted({row["client"] for source in rows.values() for row in source})
        assert len(clients) == 12
        stale = 0
        for when in (now, now + 86_400, now + 5 * 86_400):  # "overdue" and "this week" move with the clock
            with db.read() as tx:
                for client in clients:
                    expected = _client_health_by_hand(rows, client, when)
                    assert client_health.health(tx, hooks, client, when) == expected
                    assert client_health.health_sql(sql, client, when) == expected
                    stale += when == now and client_health.view(sql, client) != expected
        assert stale > 0  # the view, refreshed 100 writes before the end, is behind for some client
        later = now + 5 * 86_400  # some tickets and invoices are overdue by then (the answers were checked)
        assert any(client_health.health_sql(sql, c, later)["overdue_tickets"] for c in clients)
        assert any(client_health.health_sql(sql, c, later)["overdue_amount"] for c in clients)
        client_health.refresh_view(sql, now)
        assert all(client_health.view(sql, c) == client_health.health_sql(sql, c, now) for c in clients)

        # a write committed in SQL whose sync never ran: the next sync (in a new process) applies it once
        client = clients[0]
        ticket = {"client": client, "status": "open", "opened_at": now, "due_at": now - 1}
        client_health.record(sql, "tickets", 10**9, {**ticket, "closed_at": None, "csat": None})
        with db.read() as tx:
            before = client_health.health(tx, hooks, client, now)
        assert client_health.health_sql(sql, client, now)["overdue_tickets"] == before["overdue_tickets"] + 1
    with tallytree.open(tmp_path / "db", durable=False) as db:
        hooks = client_health.attach(db)  # a handler's extractors are registered in each process
        assert client_health.sync(db, sql, hooks) == 1
        assert client_health.sync(db, sql, hooks) == 0
        assert sql.execute("select count(*) from outbox").fetchone()[0] == 0
        with db.read() as tx:
            assert client_health.health(tx, hooks, client, now) == client_health.health_sql(sql, client, now)
            for name, source in (
                ("tickets_by_status", "tickets"),
                ("tickets_by_opened", "tickets"),
                ("ratings", "tickets"),
                ("invoices_by_status", "invoices"),
            ):
                assert tallytree.verify(tx, db.aggregate(name), sql.execute(f"select * from {source}")).ok
            assert not tallytree.check(tx)
    sql.close()
