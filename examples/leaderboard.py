"""Leaderboard: the rank of a player, the top k, and percentiles (median and p95 latency) via ``at``.

Previously: sorting (or ``COUNT(*) WHERE score > ?``) on every request. Here the ``players`` table keeps
an aggregate ordered by (score, updated_at): a rank is one descent, the top k one page, and the
``games`` table an aggregate ordered by latency, where the median and the 95th percentile are
``at(index)`` calls. Score changes are table updates: the player's item moves in the same transaction.

Run: ``python examples/leaderboard.py [games]`` (default 100,000 games by 10,000 players).
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from typing import Any

import tallytree


def attach(db: tallytree.Database) -> tuple[tallytree.Table, tallytree.Table]:
    players = db.table("players")
    players.aggregate("leaderboard", key=("score", "best_at"))
    games = db.table("games")
    games.aggregate("latency", key="latency_ms", values=("latency_ms",))
    return players, games


def generate(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` games: a player, a score and the request latency in milliseconds."""
    rng = random.Random(seed)
    players = max(10, n // 10)
    return [
        {
            "player": f"p{rng.randrange(players)}",
            "score": int(rng.gauss(1000, 300)),
            "latency_ms": round(rng.lognormvariate(3.5, 0.6), 2),
            "at": index,
        }
        for index in range(n)
    ]


def play(db: tallytree.Database, games: list[dict[str, Any]]) -> None:
    """Record every game; a player's best score (first reached wins ties) is kept up to date."""
    players, game_table = attach(db)
    with db.write() as tx:
        for game in games:
            game_table.insert(tx, game)
            best = players.get(tx, game["player"])
            if best is None:
                players.insert(tx, {"score": game["score"], "best_at": -game["at"]}, id=game["player"])
            elif game["score"] > best["score"]:
                players.update(tx, game["player"], {"score": game["score"], "best_at": -game["at"]})


def rank_of(tx: tallytree.Transaction, db: tallytree.Database, player: str) -> int | None:
    """1-based position of a player, best first (the earlier of two equal scores first). O(log n)."""
    players = db.table("players")
    doc = players.get(tx, player)
    if doc is None:
        return None
    board = players.aggregate("leaderboard")
    return board.rank(tx, (doc["score"], doc["best_at"]), player, reverse=True) + 1


def top(tx: tallytree.Transaction, db: tallytree.Database, k: int) -> list[tuple[str, int]]:
    """The k best players with their scores. O(log n + k)."""
    board = db.table("players").aggregate("leaderboard")
    return [(item.id, item.key[0]) for item in board.page(tx, limit=k, reverse=True).items]


def percentile(tx: tallytree.Transaction, db: tallytree.Database, fraction: float) -> float:
    """The latency at a percentile (nearest rank): the ``ceil(fraction * n)``-th smallest. O(log n)."""
    latency = db.table("games").aggregate("latency")
    count = latency.count(tx)
    return float(latency.at(tx, max(0, math.ceil(fraction * count) - 1)).key)


def main(n: int = 100_000) -> None:
    games = generate(n)
    with tempfile.TemporaryDirectory() as directory, tallytree.open(directory + "/db", durable=False) as db:
        started = time.perf_counter()
        play(db, games)
        print(f"recorded {n:,} games in {time.perf_counter() - started:.1f} s")
        with db.read() as tx:
            began = time.perf_counter()
            leaders = top(tx, db, 5)
            print(f"top 5 ({(time.perf_counter() - began) * 1e6:.0f} us): {leaders}")
            for player in ("p0", "p1", "p2"):
                began = time.perf_counter()
                rank = rank_of(tx, db, player)
                took = (time.perf_counter() - began) * 1e6
                print(f"rank of {player}: {rank} of {db.table('players').count(tx):,} ({took:.0f} us)")
            latency = db.table("games").aggregate("latency")
            slowest = latency.max(tx)
            mean = latency.totals(tx).mean("latency_ms")
            print(
                f"latency over {latency.count(tx):,} games: median {percentile(tx, db, 0.5)} ms, "
                f"p95 {percentile(tx, db, 0.95)} ms, p99 {percentile(tx, db, 0.99)} ms, "
                f"max {slowest.key if slowest else None} ms, mean {mean or 0:.2f} ms"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
