"""Archival: remove every event older than 365 days, per group, exporting what is removed first.

Previously: a scan for old rows and one delete per row. Here the ``events`` table's aggregate keyed by
time per group finds the range in O(log n), the documents are written to a JSON Lines file, and
``Table.delete_range`` removes them: their items in the time aggregate go by a range delete that drops
whole subtrees, and every other attached aggregate loses their items in the same transaction.

Run: ``python examples/archival.py [events]`` (default 100,000 events over two years).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tallytree

NOW = datetime(2025, 1, 1, tzinfo=UTC)
RETENTION = timedelta(days=365)


def attach(db: tallytree.Database) -> tallytree.Table:
    events = db.table("events")
    events.aggregate("events_by_group", namespace="group", key="at", values=("bytes",))
    events.aggregate("events_by_kind", key="kind", values=("bytes",))
    return events


def generate(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` events in 50 groups, spread over the two years before NOW."""
    rng = random.Random(seed)
    return [
        {
            "group": f"group_{rng.randrange(50)}",
            "at": NOW - timedelta(seconds=rng.randrange(2 * 365 * 86400)),
            "kind": rng.choice(("login", "upload", "share", "comment")),
            "bytes": rng.randrange(100, 10_000),
        }
        for _ in range(n)
    ]


def load(db: tallytree.Database, docs: list[dict[str, Any]]) -> None:
    table = attach(db)
    with db.write() as tx:
        table.insert_many(tx, docs)


def totals(tx: tallytree.Transaction, db: tallytree.Database) -> dict[str, Any]:
    """Everything at once: events and bytes overall, and per kind."""
    by_group = db.table("events").aggregate("events_by_group")
    by_kind = db.table("events").aggregate("events_by_kind")
    overall = [t for _, t in by_group.namespaces(tx)]
    return {
        "events": sum(t.count for t in overall),
        "bytes": sum(t.bytes for t in overall),
        "by_kind": {kind: by_kind.count(tx, eq=kind) for kind in ("comment", "login", "share", "upload")},
    }


def archive(db: tallytree.Database, now: datetime, path: Path) -> dict[str, int]:
    """Export then delete every event older than ``now - RETENTION``, group by group, in one
    transaction; return how many events (and bytes) were removed per group."""
    table = db.table("events")
    by_group = table.aggregate("events_by_group")
    cutoff = now - RETENTION
    removed: dict[str, int] = {}
    with path.open("w", encoding="utf-8") as out, db.write() as tx:

        def export(event_id: Any, doc: dict[str, Any]) -> None:
            out.write(json.dumps({"id": event_id, **doc, "at": doc["at"].isoformat()}) + "\n")

        for group, _ in list(by_group.namespaces(tx)):
            gone = table.delete_range(tx, by_group, namespace=group, lt=cutoff, export=export)
            if gone.count:
                removed[group] = gone.count
        out.flush()  # the archive is complete before the deletion commits
    return removed


def main(n: int = 100_000) -> None:
    docs = generate(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        load(db, docs)
        with db.read() as tx:
            before = totals(tx, db)
        print(f"before: {before}")
        path = Path(directory) / "archive.jsonl"
        started = time.perf_counter()
        removed = archive(db, NOW, path)
        took = time.perf_counter() - started
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        count = sum(removed.values())
        print(f"archived and removed {count:,} events from {len(removed)} groups in {took:.1f} s")
        print(f"archive file: {lines:,} lines, {path.stat().st_size:,} bytes")
        with db.read() as tx:
            after = totals(tx, db)
            print(f"after:  {after}")
            by_group = db.table("events").aggregate("events_by_group")
            firsts = [by_group.min(tx, namespace=group) for group, _ in by_group.namespaces(tx)]
            oldest = min(item.key for item in firsts if item is not None)
            print(f"oldest event kept: {oldest.isoformat()} (cutoff {(NOW - RETENTION).isoformat()})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
