"""Org statistics by status: freight loads and invoices, counted per status per org, always exact.

Previously: an ``organizationStats`` counter table that every mutation had to remember to update, and
a nightly job that recalculated every org and logged the drift it found. Here the counts are
aggregates attached to the ``loads`` and ``invoices`` tables, so every write path - creation, a status
change, a bulk status update, a void - updates them in the same transaction, and there is nothing to
drift. ``tallytree.verify`` proves it at the end.

Run: ``python examples/org_stats.py [documents]`` (default 100,000 loads, plus their invoices).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import tallytree

LOAD_STATUSES = ("quoted", "booked", "in_transit", "delivered", "invoiced")
INVOICE_STATUSES = ("draft", "sent", "paid")
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def attach(db: tallytree.Database) -> tuple[tallytree.Table, tallytree.Table]:
    """The two tables and their aggregates: counts (and sums) per org per status."""
    loads = db.table("loads")
    loads.aggregate("loads_by_status", namespace="org", key="status", values=("rate",))
    invoices = db.table("invoices")
    invoices.aggregate(
        "invoices_by_status", namespace="org", key="status", values=("amount",), where={"void": False}
    )
    invoices.aggregate("voided_invoices", namespace="org", key="voided_at", where={"void": True})
    return loads, invoices


def simulate(db: tallytree.Database, n: int, seed: int = 1, batch: int = 10_000) -> None:
    """Create ``n`` loads over 500 orgs, move them through their statuses, invoice the delivered
    ones, pay and void some invoices, and run bulk status updates; all through the tables."""
    loads, invoices = attach(db)
    rng = random.Random(seed)
    orgs = [f"org_{i}" for i in range(500)]
    for start in range(0, n, batch):
        with db.write() as tx:
            for index in range(start, min(n, start + batch)):
                load_id = f"load_{index}"
                org = rng.choice(orgs)
                created = T0 + timedelta(minutes=index)
                loads.insert(
                    tx,
                    {"org": org, "status": "quoted", "rate": rng.randrange(500, 5000), "created_at": created},
                    id=load_id,
                )
                for status in LOAD_STATUSES[1 : rng.randrange(1, len(LOAD_STATUSES))]:
                    loads.update(tx, load_id, {"status": status})
                current = loads.get(tx, load_id) or {}
                if current["status"] == "delivered" and rng.random() < 0.7:
                    loads.update(tx, load_id, {"status": "invoiced"})
                    invoice = {
                        "org": org,
                        "load": load_id,
                        "status": "draft",
                        "amount": rng.randrange(500, 5000),
                        "void": False,
                    }
                    invoices.insert(tx, invoice, id=f"inv_{index}")
                    if rng.random() < 0.6:
                        invoices.update(tx, f"inv_{index}", {"status": rng.choice(INVOICE_STATUSES[1:])})
                    if rng.random() < 0.05:
                        void(tx, invoices, f"inv_{index}", created)
        with db.write() as tx:  # a bulk status update: every in-transit load of one org is delivered
            bulk_update_status(tx, loads, rng.choice(orgs), "in_transit", "delivered")


def void(tx: tallytree.WriteTransaction, invoices: tallytree.Table, invoice_id: str, when: datetime) -> None:
    """Void an invoice: it leaves the per-status counts and enters the voided ones."""
    invoices.update(tx, invoice_id, {"void": True, "voided_at": when})


def bulk_update_status(
    tx: tallytree.WriteTransaction, loads: tallytree.Table, org: str, old: str, new: str
) -> int:
    """Move every load of ``org`` from ``old`` to ``new``; return how many. The ids come from the
    aggregate itself (O(log n + k)), and each update moves its item."""
    by_status = loads.aggregate("loads_by_status")
    ids = [item.id for item in by_status.items(tx, namespace=org, eq=old)]
    for load_id in ids:
        loads.update(tx, load_id, {"status": new})
    return len(ids)


def org_stats(tx: tallytree.Transaction, db: tallytree.Database, org: str) -> dict[str, Any]:
    """The dashboard: loads and invoices per status for one org, with sums. O(statuses x log n)."""
    loads = db.table("loads").aggregate("loads_by_status")
    invoices = db.table("invoices").aggregate("invoices_by_status")
    voided = db.table("invoices").aggregate("voided_invoices")
    return {
        "loads": {status: loads.count(tx, namespace=org, eq=status) for status in LOAD_STATUSES},
        "invoices": {
            status: invoices.totals(tx, namespace=org, eq=status).as_dict() for status in INVOICE_STATUSES
        },
        "voided": voided.count(tx, namespace=org),
        "total_rate": loads.totals(tx, namespace=org).rate,
    }


def main(n: int = 100_000) -> None:
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        started = time.perf_counter()
        simulate(db, n)
        print(f"simulated {n:,} loads with their invoices in {time.perf_counter() - started:.1f} s")
        with db.read() as tx:
            loads = db.table("loads")
            print(f"documents: {loads.count(tx):,} loads, {db.table('invoices').count(tx):,} invoices")
            for org in ("org_0", "org_1", "org_42"):
                began = time.perf_counter()
                stats = org_stats(tx, db, org)
                took = (time.perf_counter() - began) * 1e6
                print(f"{org} ({took:,.0f} us): loads {stats['loads']}")
                print(f"    invoices {stats['invoices']}")
                print(f"    voided {stats['voided']}, total rate {stats['total_rate']}")
            for name, table in (("loads_by_status", loads), ("invoices_by_status", db.table("invoices"))):
                drift = tallytree.verify(tx, table.aggregate(name), table)
                print(f"verify {name}: {'no drift' if drift.ok else drift}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
