"""Quotas: "can this org create 1,000 more items?" answered from namespace totals in O(1).

Previously: a ``COUNT(*)`` (and a ``SUM(size)``) on every check. Here the ``items`` table keeps one
aggregate per org whose root holds the count and the total size, so a check reads one record, and the
check and the insert happen in the same write transaction: no race between checking and creating.

Run: ``python examples/quotas.py [items]`` (default 100,000 items).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import tallytree

PLANS = {"free": (1_000, 50_000_000), "team": (20_000, 5_000_000_000), "enterprise": (10**9, 10**15)}


class QuotaExceeded(Exception):
    """The org would go over its plan."""


def attach(db: tallytree.Database) -> tallytree.Table:
    items = db.table("items")
    items.aggregate("items_by_org", namespace="org", key="kind", values=("size",))
    return items


def plan_of(org: str) -> str:
    return ("free", "team", "enterprise")[int(org.split("_")[1]) % 3]


def usage(tx: tallytree.Transaction, db: tallytree.Database, org: str) -> tallytree.Totals:
    """Items and bytes used by an org: the totals of its namespace, O(1)."""
    return db.table("items").aggregate("items_by_org").totals(tx, namespace=org)


def can_create(
    tx: tallytree.Transaction, db: tallytree.Database, org: str, count: int, size: int = 0
) -> bool:
    """Whether ``count`` more items of ``size`` bytes in all stay within the org's plan."""
    max_items, max_bytes = PLANS[plan_of(org)]
    used = usage(tx, db, org)
    return used.count + count <= max_items and used.size + size <= max_bytes


def create_items(
    tx: tallytree.WriteTransaction, db: tallytree.Database, org: str, items: Iterable[dict[str, Any]]
) -> int:
    """Check the quota and insert, in one transaction: all of the items or none."""
    batch = [{**item, "org": org} for item in items]
    if not can_create(tx, db, org, len(batch), sum(item["size"] for item in batch)):
        raise QuotaExceeded(f"{org} ({plan_of(org)}) cannot create {len(batch)} more items")
    db.table("items").insert_many(tx, batch)
    return len(batch)


def generate(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    orgs = [f"org_{i}" for i in range(200)]
    weights = [1 / (rank + 1) for rank in range(len(orgs))]
    return [
        {
            "org": rng.choices(orgs, weights)[0],
            "kind": rng.choice(("doc", "image", "video")),
            "size": rng.randrange(1, 200_000),
        }
        for _ in range(n)
    ]


def load(db: tallytree.Database, docs: list[dict[str, Any]]) -> tuple[int, int]:
    """Create the items one request at a time, enforcing quotas; return (accepted, refused)."""
    attach(db)
    accepted = refused = 0
    with db.write() as tx:
        for doc in docs:
            try:
                create_items(tx, db, doc["org"], [doc])
                accepted += 1
            except QuotaExceeded:
                refused += 1
    return accepted, refused


def main(n: int = 100_000) -> None:
    docs = generate(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        started = time.perf_counter()
        accepted, refused = load(db, docs)
        took = time.perf_counter() - started
        print(f"{n:,} create requests in {took:.1f} s: {accepted:,} accepted, {refused:,} over quota")
        with db.read() as tx:
            for org in ("org_0", "org_1", "org_2", "org_3"):
                began = time.perf_counter()
                used = usage(tx, db, org)
                answer = can_create(tx, db, org, 1000)
                took = (time.perf_counter() - began) * 1e6
                print(
                    f"{org} ({plan_of(org)}): {used.count:,} items, {used.size:,} bytes; "
                    f"can create 1,000 more: {answer}  ({took:.0f} us)"
                )
        try:
            with db.write() as tx:
                create_items(tx, db, "org_0", [{"kind": "doc", "size": 1}] * 1000)
        except QuotaExceeded as exc:
            print(f"refused, nothing written: {exc}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
