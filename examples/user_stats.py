"""User statistics over events: created this week, upcoming, all time, follows, upcoming followed.

Previously: five ``COUNT(*)`` queries per profile view, each reading every row of the user
(700-1000 ms per call for active users). Here each number is one or two O(log n) descents into
aggregates attached to the ``events`` and ``follows`` tables.

Run: ``python examples/user_stats.py [events]`` (default 100,000 events, plus 200,000 follows).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import tallytree

NOW = datetime(2024, 6, 15, 12, tzinfo=UTC)


def attach(db: tallytree.Database) -> tuple[tallytree.Table, tallytree.Table]:
    events = db.table("events")
    events.aggregate("events_by_creator_created", namespace="creator", key="created_at")
    events.aggregate("events_by_creator_start", namespace="creator", key="start")
    follows = db.table("follows")
    follows.aggregate("follows_by_user", namespace="user", key="event_start")
    return events, follows


def generate(
    n: int, seed: int = 1
) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """``n`` events by 2,000 users (a few very active ones) and ``2n`` follows."""
    rng = random.Random(seed)
    users = [f"user_{i}" for i in range(2000)]
    weights = [1 / (rank + 1) for rank in range(len(users))]
    creators = rng.choices(users, weights, k=n)
    events = []
    for index, creator in enumerate(creators):
        created = NOW - timedelta(minutes=rng.randrange(365 * 24 * 60))
        start = created + timedelta(hours=rng.randrange(1, 24 * 120))
        events.append((f"evt_{index}", {"creator": creator, "created_at": created, "start": start}))
    follows = []
    for index in range(2 * n):
        event_id, event = events[rng.randrange(n)]
        follows.append(
            (f"fol_{index}", {"user": rng.choice(users), "event": event_id, "event_start": event["start"]})
        )
    return events, follows


def load(db: tallytree.Database, events: list[Any], follows: list[Any]) -> None:
    events_table, follows_table = attach(db)
    with db.write() as tx:
        events_table.insert_many(tx, events)
        follows_table.insert_many(tx, follows)


def user_stats(tx: tallytree.Transaction, db: tallytree.Database, user: str, now: datetime) -> dict[str, int]:
    """The five numbers of a profile page, each O(log n)."""
    created = db.table("events").aggregate("events_by_creator_created")
    starts = db.table("events").aggregate("events_by_creator_start")
    follows = db.table("follows").aggregate("follows_by_user")
    week_start = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "created_this_week": created.count(tx, namespace=user, ge=week_start),
        "upcoming": starts.count(tx, namespace=user, gt=now),
        "all_time": created.count(tx, namespace=user),
        "follows": follows.count(tx, namespace=user),
        "upcoming_followed": follows.count(tx, namespace=user, gt=now),
    }


def main(n: int = 100_000) -> None:
    events, follows = generate(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        started = time.perf_counter()
        load(db, events, follows)
        took = time.perf_counter() - started
        print(f"loaded {len(events):,} events and {len(follows):,} follows in {took:.1f} s")
        with db.read() as tx:
            for user in ("user_0", "user_1", "user_500"):
                began = time.perf_counter()
                stats = user_stats(tx, db, user, NOW)
                print(f"{user} ({(time.perf_counter() - began) * 1e6:,.0f} us): {stats}")
            began = time.perf_counter()
            scan = sum(1 for _, event in events if event["creator"] == "user_0" and event["start"] > NOW)
            took = (time.perf_counter() - began) * 1e3
            print(f"(a scan over the events for user_0's upcoming count: {scan}, {took:,.1f} ms)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
