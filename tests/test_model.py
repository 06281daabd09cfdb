"""The aggregate against a plain reference model, over both backends (memory and LMDB).

Every rule applies one operation to the real aggregate and to :class:`Model`, a dict of namespace ->
sorted list of items, and compares the results *and the errors raised*. The model orders keys with its
own small comparator (:func:`key_order`), never with tallytree's encoder, and sums with exact rational
arithmetic. After every step the invariant checker must report nothing and the whole database must
equal the model.

Node sizes are drawn from 4..9, so a few dozen items exercise every split, merge and borrow. The
pending nodes (capacity 4..9 too) fill and merge as often; the ``append`` rule writes new events (after
every item of a namespace), the inserts that join a pending node without loading their tree.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from conftest import number_kinds, strict, value_order
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tallytree
from tallytree import (
    BoundKeyTypeError,
    BoundsError,
    DuplicateItemError,
    InvalidArgumentError,
    Item,
    ItemNotFoundError,
    OutOfRangeError,
    Position,
    Totals,
)
from tallytree._db import DEFAULT_CACHE_NODES

FIELDS = ("x", "y")

# ------------------------------------------------------------------ the reference order


def key_order(key: Any) -> tuple[Any, ...]:
    """The full key order: by value, then ``1`` before ``1.0``."""
    return (value_order(key), number_kinds(key))


def item_order(key: Any, item_id: Any) -> tuple[Any, ...]:
    return (key_order(key), key_order(item_id))


def exact_sum(values: list[int | float]) -> int | float:
    """An exact int when no float is involved, else the exact sum correctly rounded to a float."""
    if all(type(value) is int for value in values):
        return sum(values)
    if all(type(value) is float for value in values):
        return math.fsum(values)
    return float(sum(map(Fraction, values)))  # Fraction -> float rounds correctly


def totals_of(rows: list[Item]) -> dict[str, int | float]:
    columns = list(zip(*(row.values for row in rows), strict=True)) or [() for _ in FIELDS]
    return {
        "count": len(rows),
        **{field: exact_sum(list(column)) for field, column in zip(FIELDS, columns, strict=True)},
    }


# ------------------------------------------------------------------ bounds in the model


def _lower_ok(row: Item, bound: Any, inclusive: bool) -> bool:
    if isinstance(bound, Position | Item):
        here, there = item_order(row.key, row.id), item_order(bound.key, bound.id)
    else:
        here, there = value_order(row.key), value_order(bound)
    return here >= there if inclusive else here > there


def _upper_ok(row: Item, bound: Any, inclusive: bool) -> bool:
    if isinstance(bound, Position | Item):
        here, there = item_order(row.key, row.id), item_order(bound.key, bound.id)
    else:
        here, there = value_order(row.key), value_order(bound)
    return here <= there if inclusive else here < there


def in_bounds(row: Item, bounds: dict[str, Any]) -> bool:
    """Whether an item lies within the bounds, computed from the documented semantics."""
    if "prefix" in bounds:
        prefix = bounds["prefix"]
        return (
            type(row.key) is tuple
            and len(row.key) >= len(prefix)
            and value_order(row.key[: len(prefix)]) == value_order(prefix)
        )
    if "eq" in bounds:
        return value_order(row.key) == value_order(bounds["eq"])
    checks = {
        "ge": lambda bound: _lower_ok(row, bound, True),
        "gt": lambda bound: _lower_ok(row, bound, False),
        "le": lambda bound: _upper_ok(row, bound, True),
        "lt": lambda bound: _upper_ok(row, bound, False),
    }
    return all(checks[name](bound) for name, bound in bounds.items())


def cut_order(bound: Any) -> tuple[Any, ...]:
    """Where a lower bound ``ge=bound`` cuts the item order (a key cuts before its equal keys)."""
    if isinstance(bound, Position | Item):
        return (value_order(bound.key), 1, number_kinds(bound.key), key_order(bound.id))
    return (value_order(bound), 0)


def key_class(key: Any) -> tuple[int, ...]:
    """What a bound must share with the keys of a namespace whose keys all share it: the type of a
    key in the order above (False and True one class, ints and floats one), and for a tuple its
    first element's; ``(7,)`` for the empty tuple, which fits tuple keys (and any tuple fits it)."""
    if isinstance(key, Position | Item):
        key = key.key
    if type(key) is tuple:
        return (7, key_class(key[0])[0]) if key else (7,)
    kind = value_order(key)[0]
    return (1,) if kind == 2 else (kind,)


def refuses(rows: list[Item], bounds: list[Any]) -> bool:
    """Whether tallytree must refuse one of these bounds (or a rank's key) with BoundKeyTypeError:
    the namespace's keys are all of one class and the bound is of another (a tuple without a first
    element fits tuple keys, and any tuple fits keys that are all the empty tuple)."""
    classes = {key_class(row.key) for row in rows}
    if len(classes) != 1:
        return False
    (keys,) = classes
    return any(
        key_class(bound) != keys
        and not (key_class(bound)[0] == keys[0] == 7 and (7,) in (key_class(bound), keys))
        for bound in bounds
    )


# ------------------------------------------------------------------ the model


class Model:
    """namespace -> items sorted by (key, id), with the operations of an aggregate, naively."""

    def __init__(self) -> None:
        self.spaces: dict[tuple[Any, ...], tuple[Any, list[Item]]] = {}

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def rows(self, namespace: Any) -> list[Item]:
        entry = self.spaces.get(key_order(namespace))
        return entry[1] if entry is not None else []

    def _space(self, namespace: Any) -> list[Item]:
        return self.spaces.setdefault(key_order(namespace), (namespace, []))[1]

    def _find(self, namespace: Any, key: Any, item_id: Any) -> int | None:
        target = item_order(key, item_id)
        for index, row in enumerate(self.rows(namespace)):
            if item_order(row.key, row.id) == target:
                return index
        return None

    def _add(self, namespace: Any, row: Item) -> None:
        space = self._space(namespace)
        space.append(row)
        space.sort(key=lambda each: item_order(each.key, each.id))

    def _drop_empty(self) -> None:
        self.spaces = {order: entry for order, entry in self.spaces.items() if entry[1]}

    def select(self, namespace: Any, bounds: dict[str, Any]) -> list[Item]:
        return [row for row in self.rows(namespace) if in_bounds(row, bounds)]

    def namespaces(self) -> list[tuple[Any, dict[str, int | float]]]:
        return [(namespace, totals_of(rows)) for _, (namespace, rows) in sorted(self.spaces.items()) if rows]

    # writes: each raises the error tallytree must raise, changing nothing, or returns its result

    def insert(self, namespace: Any, key: Any, item_id: Any, values: tuple[Any, ...]) -> None:
        if self._find(namespace, key, item_id) is not None:
            raise DuplicateItemError
        self._add(namespace, Item(key, item_id, values))

    def delete(self, namespace: Any, key: Any, item_id: Any) -> Item:
        index = self._find(namespace, key, item_id)
        if index is None:
            raise ItemNotFoundError
        row = self._space(namespace).pop(index)
        self._drop_empty()
        return row

    def discard(self, namespace: Any, key: Any, item_id: Any) -> bool:
        try:
            self.delete(namespace, key, item_id)
        except ItemNotFoundError:
            return False
        return True

    def upsert(self, namespace: Any, key: Any, item_id: Any, values: tuple[Any, ...]) -> str:
        index = self._find(namespace, key, item_id)
        if index is None:
            self._add(namespace, Item(key, item_id, values))
            return "inserted"
        old = self._space(namespace)[index]
        if strict(old.values) == strict(values):
            return "unchanged"
        self._space(namespace)[index] = Item(old.key, old.id, values)
        return "updated"

    def replace(self, namespace: Any, key: Any, item_id: Any, changes: dict[str, Any]) -> Item:
        if not changes:  # nothing new to give: refused before anything is looked up
            raise InvalidArgumentError
        index = self._find(namespace, key, item_id)
        if index is None:
            raise ItemNotFoundError
        old = self._space(namespace)[index]
        new_namespace = changes.get("new_namespace", namespace)
        new_key = changes.get("new_key", old.key)
        new_id = changes.get("new_id", old.id)
        values = changes.get("new_values", old.values)
        same_place = key_order(new_namespace) == key_order(namespace) and item_order(
            new_key, new_id
        ) == item_order(old.key, old.id)
        if same_place:
            self._space(namespace)[index] = Item(old.key, old.id, values)
            return Item(old.key, old.id, values)
        if self._find(new_namespace, new_key, new_id) is not None:
            raise DuplicateItemError
        self._space(namespace).pop(index)
        self._add(new_namespace, Item(new_key, new_id, values))
        self._drop_empty()
        return Item(new_key, new_id, values)

    def insert_many(self, namespace: Any, rows: list[Item], on_duplicate: str) -> int:
        batch: dict[tuple[Any, ...], Item] = {}
        for row in rows:
            order = item_order(row.key, row.id)
            if order in batch:
                if on_duplicate == "error":
                    raise DuplicateItemError
                if on_duplicate == "skip":
                    continue
            batch[order] = row  # "update": the last one wins
        if on_duplicate == "error" and any(
            self._find(namespace, row.key, row.id) is not None for row in batch.values()
        ):
            raise DuplicateItemError
        changed = 0
        for row in batch.values():
            if on_duplicate == "update":
                changed += self.upsert(namespace, row.key, row.id, row.values) != "unchanged"
            elif self._find(namespace, row.key, row.id) is None:
                self._add(namespace, row)
                changed += 1
        return changed

    def delete_many(self, namespace: Any, pairs: list[tuple[Any, Any]], missing: str) -> int:
        seen: set[tuple[Any, ...]] = set()
        found: list[tuple[Any, Any]] = []
        for key, item_id in pairs:
            order = item_order(key, item_id)
            if order in seen or self._find(namespace, key, item_id) is None:
                if missing == "error":
                    raise ItemNotFoundError
                continue
            seen.add(order)
            found.append((key, item_id))
        for key, item_id in found:
            index = self._find(namespace, key, item_id)
            assert index is not None
            self._space(namespace).pop(index)
        self._drop_empty()
        return len(found)

    def delete_range(self, namespace: Any, bounds: dict[str, Any]) -> dict[str, int | float]:
        if refuses(self.rows(namespace), list(bounds.values())):
            raise BoundKeyTypeError
        removed = self.select(namespace, bounds)
        space = self._space(namespace)
        space[:] = [row for row in space if not in_bounds(row, bounds)]
        self._drop_empty()
        return totals_of(removed)


# ------------------------------------------------------------------ strategies

UTC_NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SAME_INSTANT = UTC_NOON.astimezone(timezone(timedelta(hours=2)))  # another zone, the same key
KEYS: list[Any] = [
    None, False, True,
    -1, 0, 1, 1.0, 2, 2.0, 0.5, 2.5, -1.5, 3,
    "", "a", "b", "ab",
    b"b", UTC_NOON, SAME_INSTANT,
    ("open", 3), ("open", 3.0), ("closed", 1), ("open", 1), (1, "a"), (1.0, "a"), (1, "b"),
]  # fmt: skip
EXTRA_BOUND_KEYS: list[Any] = [
    -10, 1.5, 100, math.inf, -math.inf, "zz", "aa", b"", b"zz",
    UTC_NOON + timedelta(seconds=1), (), ("open",), ("open", 2), ("open", 3, "x"), ("zz", 0),
]  # fmt: skip
IDS: list[Any] = ["a", "b", 1, 2]
BOUND_IDS: list[Any] = [*IDS, 0, 3, "", "c"]
NAMESPACES: list[Any] = [None, "a", ("org", 1)]
READ_NAMESPACES: list[Any] = [*NAMESPACES, "unknown"]
PREFIXES: list[tuple[Any, ...]] = [
    (),
    ("open",),
    ("open", 3),
    ("open", 3.0),
    ("closed",),
    (1,),
    (1.0,),
    ("zz",),
    ("open", 3, "x"),
]
# 1 and 1.0 (and 0 and 0.0) are equal values of different types: rewriting one with the other is an
# update, and a sum that includes a float is a float
X_VALUES: list[int | float] = [
    0,
    0.0,
    1,
    1.0,
    -3,
    7,
    0.1,
    0.2,
    0.3,
    1e-3,
    2.5,
    -0.1,
    1e16,
    -1e16,
    1e300,
    5e-324,
]
Y_VALUES: list[int | float] = [0, 1, 1.0, -1, 12345678901, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, 1e-300]

keys = st.sampled_from(KEYS)
ids = st.sampled_from(IDS)
namespaces = st.sampled_from(NAMESPACES)
value_tuples = st.tuples(st.sampled_from(X_VALUES), st.sampled_from(Y_VALUES))
plain_bounds = st.sampled_from([key for key in KEYS + EXTRA_BOUND_KEYS if key is not None])
positions = st.builds(
    Position, st.sampled_from(KEYS + EXTRA_BOUND_KEYS), st.sampled_from(BOUND_IDS)
) | st.builds(Item, st.sampled_from(KEYS), st.sampled_from(IDS))
bound_values = plain_bounds | positions


@st.composite
def bounds_strategy(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["none", "range", "range", "range", "prefix", "eq"]))
    if kind == "none":
        return {}
    if kind == "prefix":
        return {"prefix": draw(st.sampled_from(PREFIXES))}
    if kind == "eq":
        return {"eq": draw(plain_bounds)}
    result = {}
    lower = draw(st.sampled_from([None, "ge", "gt"]))
    upper = draw(st.sampled_from([None, "le", "lt"]))
    if lower:
        result[lower] = draw(bound_values)
    if upper:
        result[upper] = draw(bound_values)
    return result


bounds = bounds_strategy()


@st.composite
def values_argument(draw: st.DrawFn) -> tuple[tuple[Any, ...], Any]:
    """Values as the model keeps them, and as passed to tallytree (a tuple, a list or a mapping)."""
    values = draw(value_tuples)
    form = draw(st.sampled_from(["tuple", "tuple", "list", "mapping"]))
    if form == "list":
        return values, list(values)
    if form == "mapping":
        return values, dict(zip(reversed(FIELDS), reversed(values), strict=True))
    return values, values


CONFLICTS: list[dict[str, Any]] = [
    {"ge": 1, "gt": 2},
    {"le": 1, "lt": 2},
    {"ge": Position(1, "a"), "gt": 0},
    {"prefix": ("open",), "ge": 1},
    {"prefix": ("open",), "lt": "b"},
    {"prefix": ("open",), "eq": 1},
    {"eq": 1, "lt": 2},
    {"eq": "a", "ge": "a"},
    {"eq": Position(1, "a")},
    {"prefix": "open"},
    {"prefix": 1},
]


class _Abort(Exception):
    """Raised inside a write transaction to abort it."""


# ------------------------------------------------------------------ the machine


class AggregateMachine(RuleBasedStateMachine):
    """Drives one aggregate (and a bystander aggregate that must never change) against the model."""

    backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.directory: str | None = None
        self.db: tallytree.Database | None = None

    # -------------------------------------------------------------- setup

    # a node cache of a few nodes evicts during every read: the C descents then meet nodes fetched
    # and nodes the cache drops under them (see NodeTable in _speedups.c)
    @initialize(node_size=st.integers(4, 9), cache_nodes=st.sampled_from([3, 12, DEFAULT_CACHE_NODES]))
    def open_database(self, node_size: int, cache_nodes: int) -> None:
        if self.backend == "lmdb":
            self.directory = tempfile.mkdtemp(prefix="tallytree-model-")
            # a small map, so that the map also grows during the run
            self.db = tallytree.open(
                f"{self.directory}/db", map_size=128 * 1024, durable=False, cache_nodes=cache_nodes
            )
        else:
            self.db = tallytree.open_memory(cache_nodes=cache_nodes)
        self.aggregate = self.db.aggregate("agg", values=FIELDS, node_size=node_size)
        self.bystander = self.db.aggregate("bystander", node_size=4)
        with self.db.write() as tx:
            self.bystander.insert_many(tx, [(key, "id") for key in (1, 2, 3)], namespace=None)
        self.model = Model()

    def teardown(self) -> None:
        if self.db is not None:
            self.db.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -------------------------------------------------------------- applying one operation

    def _pick(self, data: st.DataObject, namespace: Any) -> tuple[Any, Any]:
        """A (key, id) that is usually in the namespace, so deletes and replaces mostly hit."""
        rows = self.model.rows(namespace)
        if rows and data.draw(st.integers(0, 3)) > 0:
            row = data.draw(st.sampled_from(rows))
            return row.key, row.id
        return data.draw(keys), data.draw(ids)

    def _after_last(self, data: st.DataObject, namespace: Any) -> tuple[Any, Any]:
        """A (key, id) after every item of the namespace, as new events come (they join the tree's
        pending node without loading the tree, ``_tree.appended``): the last item's key with a
        greater id. Any (key, id) for an empty namespace."""
        rows = self.model.rows(namespace)
        if not rows:
            return data.draw(keys), data.draw(ids)
        last = rows[-1]
        if isinstance(last.id, int):
            return last.key, last.id + data.draw(st.integers(1, 3))
        return last.key, last.id + ("a" if isinstance(last.id, str) else b"\x00")

    def _draw_op(self, data: st.DataObject, kind: str) -> tuple[str, dict[str, Any]]:
        namespace = data.draw(namespaces)
        if kind == "append":  # a new event: after every item of the namespace (see _after_last)
            key, item_id = self._after_last(data, namespace)
            values, argument = data.draw(values_argument())
            return "insert", {
                "namespace": namespace, "key": key, "id": item_id,
                "values": values, "argument": argument,
            }  # fmt: skip
        if kind in ("insert", "upsert"):
            if kind == "insert":
                key, item_id = data.draw(keys), data.draw(ids)
            else:
                key, item_id = self._pick(data, namespace)
            values, argument = data.draw(values_argument())
            return kind, {
                "namespace": namespace, "key": key, "id": item_id,
                "values": values, "argument": argument,
            }  # fmt: skip
        if kind in ("delete", "discard"):
            key, item_id = self._pick(data, namespace)
            return kind, {"namespace": namespace, "key": key, "id": item_id}
        if kind == "replace":
            key, item_id = self._pick(data, namespace)
            changes: dict[str, Any] = {}
            if data.draw(st.booleans()):
                changes["new_key"] = data.draw(keys)
            if data.draw(st.booleans()):
                changes["new_id"] = data.draw(ids)
            if data.draw(st.booleans()):
                changes["new_namespace"] = data.draw(namespaces)
            if data.draw(st.booleans()):
                changes["new_values"] = data.draw(value_tuples)
            return kind, {"namespace": namespace, "key": key, "id": item_id, "changes": changes}
        if kind == "insert_many":
            size = data.draw(st.integers(0, 8))
            rows = [Item(data.draw(keys), data.draw(ids), data.draw(value_tuples)) for _ in range(size)]
            # items already in the namespace, with their stored values or new ones; sometimes the
            # whole batch, so that nothing is new
            stored = self.model.rows(namespace)
            if stored and data.draw(st.integers(0, 2)) == 0:
                rows = []
            for _ in range(data.draw(st.integers(0, 3)) if stored else 0):
                row = data.draw(st.sampled_from(stored))
                if data.draw(st.booleans()):
                    row = Item(row.key, row.id, data.draw(value_tuples))
                rows.insert(data.draw(st.integers(0, len(rows))), row)
            as_tuples = data.draw(st.booleans())
            return kind, {
                "namespace": namespace,
                "rows": rows,
                "argument": [(row.key, row.id, row.values) for row in rows] if as_tuples else rows,
                "on_duplicate": data.draw(st.sampled_from(["error", "skip", "update"])),
            }
        if kind == "delete_many":
            # stored items (a few, most or all of them, so that leaves empty out and nodes merge at
            # every level), now and then one absent or given twice
            stored = self.model.rows(namespace)
            chosen: list[tuple[Any, Any]] = []
            if stored:
                share = data.draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
                chosen = [(row.key, row.id) for row in stored if data.draw(st.floats(0, 1)) < share]
            for _ in range(data.draw(st.integers(0, 2))):
                again = chosen and data.draw(st.booleans())  # an item given twice, or any (key, id)
                pair = chosen[0] if again else (data.draw(keys), data.draw(ids))
                chosen.insert(data.draw(st.integers(0, len(chosen))), pair)
            as_items = data.draw(st.booleans())
            return kind, {
                "namespace": namespace,
                "pairs": chosen,
                "argument": [Item(key, item_id, ()) for key, item_id in chosen] if as_items else chosen,
                "missing": data.draw(st.sampled_from(["error", "skip"])),
            }
        if kind == "delete_range":
            return kind, {"namespace": namespace, "bounds": self._anchor(data, namespace, data.draw(bounds))}
        assert kind == "clear"
        return kind, {"namespace": namespace}

    def _apply(self, tx: tallytree.WriteTransaction, model: Model, op: tuple[str, dict[str, Any]]) -> None:
        """Apply one write to tallytree and to the model; results and errors must match."""
        kind, args = op
        aggregate = self.aggregate
        namespace, key, item_id = args["namespace"], args.get("key"), args.get("id")
        calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
            "insert": (
                lambda: aggregate.insert(tx, key, item_id, args["argument"], namespace=namespace),
                lambda: model.insert(namespace, key, item_id, args["values"]),
            ),
            "upsert": (
                lambda: aggregate.upsert(tx, key, item_id, args["argument"], namespace=namespace),
                lambda: model.upsert(namespace, key, item_id, args["values"]),
            ),
            "delete": (
                lambda: aggregate.delete(tx, key, item_id, namespace=namespace),
                lambda: model.delete(namespace, key, item_id),
            ),
            "discard": (
                lambda: aggregate.discard(tx, key, item_id, namespace=namespace),
                lambda: model.discard(namespace, key, item_id),
            ),
            "replace": (
                lambda: aggregate.replace(tx, key, item_id, namespace=namespace, **args["changes"]),
                lambda: model.replace(namespace, key, item_id, args["changes"]),
            ),
            "insert_many": (
                lambda: aggregate.insert_many(
                    tx, args["argument"], namespace=namespace, on_duplicate=args["on_duplicate"]
                ),
                lambda: model.insert_many(namespace, args["rows"], args["on_duplicate"]),
            ),
            "delete_many": (
                lambda: aggregate.delete_many(
                    tx, args["argument"], namespace=namespace, missing=args["missing"]
                ),
                lambda: model.delete_many(namespace, args["pairs"], args["missing"]),
            ),
            "delete_range": (
                lambda: aggregate.delete_range(tx, namespace=namespace, **args["bounds"]),
                lambda: model.delete_range(namespace, args["bounds"]),
            ),
            "clear": (
                lambda: aggregate.clear(tx, namespace=namespace),
                lambda: model.delete_range(namespace, {}),
            ),
        }
        real, expected = calls[kind]
        outcome_real = _outcome(real)
        outcome_model = _outcome(expected)  # the model raises before it changes anything
        assert outcome_real == outcome_model, (
            f"{kind} {args}: tallytree {outcome_real}, model {outcome_model}"
        )

    def _one_write(self, data: st.DataObject, kind: str) -> None:
        op = self._draw_op(data, kind)
        with self.db.write() as tx:
            self._apply(tx, self.model, op)

    # -------------------------------------------------------------- write rules

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        self._one_write(data, "insert")

    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        self._one_write(data, "append")

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self._one_write(data, "delete")

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        self._one_write(data, "discard")

    @rule(data=st.data())
    def upsert(self, data: st.DataObject) -> None:
        self._one_write(data, "upsert")

    @rule(data=st.data())
    def replace(self, data: st.DataObject) -> None:
        self._one_write(data, "replace")

    @rule(data=st.data())
    def insert_many(self, data: st.DataObject) -> None:
        self._one_write(data, "insert_many")

    @rule(
        namespace=namespaces,
        rows=st.lists(st.builds(Item, keys, ids, value_tuples), min_size=10, max_size=30),
        on_duplicate=st.sampled_from(["skip", "update"]),
    )
    def grow(self, namespace: Any, rows: list[Item], on_duplicate: str) -> None:
        """Many items at once, so that trees reach three levels and range deletes drop subtrees."""
        with self.db.write() as tx:
            self._apply(
                tx,
                self.model,
                ("insert_many", {
                    "namespace": namespace, "rows": rows, "argument": rows,
                    "on_duplicate": on_duplicate,
                }),
            )  # fmt: skip

    @rule(data=st.data())
    def delete_many(self, data: st.DataObject) -> None:
        self._one_write(data, "delete_many")

    @rule(data=st.data())
    def delete_range(self, data: st.DataObject) -> None:
        self._one_write(data, "delete_range")

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        self._one_write(data, "clear")

    @rule(data=st.data(), commit=st.booleans())
    def several_writes_in_one_transaction(self, data: st.DataObject, commit: bool) -> None:
        """Writes see each other inside the transaction; all commit together, or none on abort."""
        kinds = ["insert", "insert", "append", "append", "upsert", "delete", "discard", "replace",
                 "insert_many", "delete_many", "delete_range", "clear"]  # fmt: skip
        ops = [
            self._draw_op(data, data.draw(st.sampled_from(kinds)))
            for _ in range(data.draw(st.integers(1, 6)))
        ]
        working = self.model.copy()
        try:
            with self.db.write() as tx:
                for op in ops:
                    self._apply(tx, working, op)
                    namespace = op[1]["namespace"]
                    self._compare_namespace(tx, working, namespace)
                assert tallytree.check(tx) == []
                if not commit:
                    raise _Abort
        except _Abort:
            pass
        if commit:
            self.model = working

    # -------------------------------------------------------------- reads

    def _anchor(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any]) -> dict[str, Any]:
        """Often move the bounds onto items of the namespace: a bound that equals an item (its key, or
        its exact position) is where inclusive and exclusive bounds differ."""
        rows = self.model.rows(namespace)
        if not rows or not bounds or data.draw(st.booleans()):
            return bounds
        anchored = {}
        for name, bound in bounds.items():
            row = data.draw(st.sampled_from(rows))
            if name == "prefix":
                anchored[name] = row.key[:1] if type(row.key) is tuple else bound
            elif isinstance(bound, Position | Item):
                anchored[name] = Position(row.key, row.id)
            else:
                anchored[name] = row.key if row.key is not None else bound
        return anchored

    def _refused(
        self, data: st.DataObject, namespace: Any, bounds: list[Any], *calls: Callable[[Any], Any]
    ) -> bool:
        """Whether the model refuses these bounds (see :func:`refuses`); then each call must raise
        BoundKeyTypeError."""
        if not refuses(self.model.rows(namespace), bounds):
            return False
        with self._reader(data) as tx:
            for call in calls:
                with pytest.raises(BoundKeyTypeError):
                    call(tx)
        return True

    def _reader(self, data: st.DataObject) -> Any:
        """Reads run in a read transaction, or (seeing the same data) in a write transaction."""
        return self.db.write() if data.draw(st.integers(0, 4)) == 0 else self.db.read()

    def _compare_namespace(self, tx: tallytree.Transaction, model: Model, namespace: Any) -> None:
        rows = model.rows(namespace)
        real = list(self.aggregate.items(tx, namespace=namespace))
        assert strict(real) == strict(rows)
        totals = self.aggregate.totals(tx, namespace=namespace)
        assert strict(totals.as_dict()) == strict(totals_of(rows))
        listed = [(space, totals.as_dict()) for space, totals in self.aggregate.namespaces(tx)]
        assert strict(listed) == strict(model.namespaces())

    @rule(data=st.data(), namespace=st.sampled_from(READ_NAMESPACES), bounds=bounds)
    def read_count_and_totals(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any]) -> None:
        bounds = self._anchor(data, namespace, bounds)
        aggregate = self.aggregate
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: aggregate.count(tx, namespace=namespace, **bounds),
            lambda tx: aggregate.totals(tx, namespace=namespace, **bounds),
            lambda tx: aggregate.sum(tx, "x", namespace=namespace, **bounds),
        ):
            return
        expected = totals_of(self.model.select(namespace, bounds))
        with self._reader(data) as tx:
            assert self.aggregate.count(tx, namespace=namespace, **bounds) == expected["count"]
            totals = self.aggregate.totals(tx, namespace=namespace, **bounds)
            assert strict(totals.as_dict()) == strict(expected)
            for field in FIELDS:
                total = self.aggregate.sum(tx, field, namespace=namespace, **bounds)
                assert strict(total) == strict(expected[field])

    @rule(data=st.data(), namespace=st.sampled_from(READ_NAMESPACES), bounds=bounds)
    def read_at(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any]) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: self.aggregate.at(tx, 0, namespace=namespace, **bounds),
        ):
            return
        rows = self.model.select(namespace, bounds)
        size = len(rows)
        indexes = data.draw(st.lists(st.integers(-size - 2, size + 1), min_size=1, max_size=4))
        with self._reader(data) as tx:
            for index in indexes:
                if -size <= index < size:
                    item = self.aggregate.at(tx, index, namespace=namespace, **bounds)
                    assert strict(item) == strict(rows[index])
                else:
                    try:
                        self.aggregate.at(tx, index, namespace=namespace, **bounds)
                    except OutOfRangeError:
                        pass
                    else:
                        raise AssertionError(f"at({index}) of {size} items did not raise")

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        bounds=bounds,
        key=st.sampled_from(KEYS + EXTRA_BOUND_KEYS),
        item_id=st.none() | st.sampled_from(BOUND_IDS),
        reverse=st.booleans(),
    )
    def read_rank(
        self,
        data: st.DataObject,
        namespace: Any,
        bounds: dict[str, Any],
        key: Any,
        item_id: Any,
        reverse: bool,
    ) -> None:
        bounds = self._anchor(data, namespace, bounds)
        rows = self.model.select(namespace, bounds)
        if rows and data.draw(st.booleans()):  # often an item within the bounds: counted exactly
            row = data.draw(st.sampled_from(rows))
            key, item_id = row.key, data.draw(st.sampled_from([None, row.id, row.id]))
        if self._refused(
            data,
            namespace,
            [*bounds.values(), key],
            lambda tx: self.aggregate.rank(tx, key, item_id, namespace=namespace, reverse=reverse, **bounds),
        ):
            return
        if item_id is None:
            here = value_order(key)
            expected = sum(
                (value_order(row.key) > here) if reverse else (value_order(row.key) < here) for row in rows
            )
        else:
            here = item_order(key, item_id)
            expected = sum(
                (item_order(row.key, row.id) > here) if reverse else (item_order(row.key, row.id) < here)
                for row in rows
            )
        with self._reader(data) as tx:
            rank = self.aggregate.rank(tx, key, item_id, namespace=namespace, reverse=reverse, **bounds)
        assert rank == expected

    @rule(data=st.data(), namespace=st.sampled_from(READ_NAMESPACES), bounds=bounds)
    def read_min_max(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any]) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: self.aggregate.min(tx, namespace=namespace, **bounds),
            lambda tx: self.aggregate.max(tx, namespace=namespace, **bounds),
        ):
            return
        rows = self.model.select(namespace, bounds)
        with self._reader(data) as tx:
            first = self.aggregate.min(tx, namespace=namespace, **bounds)
            last = self.aggregate.max(tx, namespace=namespace, **bounds)
        assert strict(first) == strict(rows[0] if rows else None)
        assert strict(last) == strict(rows[-1] if rows else None)

    @rule(data=st.data(), namespace=st.sampled_from(READ_NAMESPACES))
    def read_get(self, data: st.DataObject, namespace: Any) -> None:
        key, item_id = self._pick(data, namespace)
        index = self.model._find(namespace, key, item_id)
        expected = self.model.rows(namespace)[index] if index is not None else None
        with self._reader(data) as tx:
            found = self.aggregate.get(tx, key, item_id, namespace=namespace)
        assert strict(found) == strict(expected)

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        bounds=bounds,
        reverse=st.booleans(),
    )
    def read_items(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any], reverse: bool) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: list(self.aggregate.items(tx, namespace=namespace, reverse=reverse, **bounds)),
        ):
            return
        rows = self.model.select(namespace, bounds)
        with self._reader(data) as tx:
            items = list(self.aggregate.items(tx, namespace=namespace, reverse=reverse, **bounds))
        assert strict(items) == strict(rows[::-1] if reverse else rows)

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        bounds=bounds,
        limit=st.integers(1, 4),
        reverse=st.booleans(),
    )
    def read_all_pages(
        self, data: st.DataObject, namespace: Any, bounds: dict[str, Any], limit: int, reverse: bool
    ) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: self.aggregate.page(tx, namespace=namespace, limit=limit, reverse=reverse, **bounds),
        ):
            return
        rows = self.model.select(namespace, bounds)
        expected = rows[::-1] if reverse else rows
        seen: list[Item] = []
        cursor = None
        with self._reader(data) as tx:
            for _ in range(len(rows) + 2):
                page = self.aggregate.page(
                    tx, namespace=namespace, after=cursor, limit=limit, reverse=reverse, **bounds
                )
                assert len(page.items) <= limit
                seen.extend(page.items)
                if page.done:
                    break
                assert len(page.items) == limit, "a page that is not the last one is full"
                assert page.cursor is not None
                cursor = page.cursor
            else:
                raise AssertionError("paging did not finish")
        assert strict(seen) == strict(expected)

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        bounds=bounds,
        after=positions,
        limit=st.integers(1, 4),
        reverse=st.booleans(),
    )
    def read_page_after_position(
        self,
        data: st.DataObject,
        namespace: Any,
        bounds: dict[str, Any],
        after: Position | Item,
        limit: int,
        reverse: bool,
    ) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self.model.rows(namespace) and data.draw(st.booleans()):  # the page starts at an item
            after = data.draw(st.sampled_from(self.model.rows(namespace)))
        if self._refused(  # after= is a position to resume from, not a bound: never refused
            data,
            namespace,
            list(bounds.values()),
            lambda tx: self.aggregate.page(tx, namespace=namespace, after=after, limit=limit, **bounds),
        ):
            return
        mark = item_order(after.key, after.id)
        rows = self.model.select(namespace, bounds)
        if reverse:
            rest = [row for row in reversed(rows) if item_order(row.key, row.id) < mark]
        else:
            rest = [row for row in rows if item_order(row.key, row.id) > mark]
        with self._reader(data) as tx:
            page = self.aggregate.page(
                tx, namespace=namespace, after=after, limit=limit, reverse=reverse, **bounds
            )
        assert strict(page.items) == strict(rest[:limit])
        assert page.done == (len(rest) <= limit)

    @rule(data=st.data())
    def read_namespaces(self, data: st.DataObject) -> None:
        with self._reader(data) as tx:
            listed = [(namespace, totals.as_dict()) for namespace, totals in self.aggregate.namespaces(tx)]
        assert strict(listed) == strict(self.model.namespaces())

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        bounds=bounds,
        seed=st.integers(0, 2**32),
    )
    def read_random(self, data: st.DataObject, namespace: Any, bounds: dict[str, Any], seed: int) -> None:
        bounds = self._anchor(data, namespace, bounds)
        if self._refused(
            data,
            namespace,
            list(bounds.values()),
            lambda tx: self.aggregate.random(tx, namespace=namespace, rng=seed, **bounds),
        ):
            return
        rows = self.model.select(namespace, bounds)
        with self._reader(data) as tx:
            drawn = self.aggregate.random(tx, namespace=namespace, rng=seed, **bounds)
            again = self.aggregate.random(tx, namespace=namespace, rng=random.Random(seed), **bounds)
        if not rows:
            assert drawn is None
        else:
            assert strict(drawn) in [strict(row) for row in rows]
        assert strict(again) == strict(drawn), "the same seed draws the same item"

    # -------------------------------------------------------------- metamorphic reads

    @rule(data=st.data(), namespace=st.sampled_from(READ_NAMESPACES), key=plain_bounds)
    def rank_is_count_below(self, data: st.DataObject, namespace: Any, key: Any) -> None:
        if self._refused(
            data,
            namespace,
            [key],
            lambda tx: self.aggregate.rank(tx, key, namespace=namespace),
            lambda tx: self.aggregate.count(tx, namespace=namespace, lt=key),
            lambda tx: self.aggregate.rank(tx, key, namespace=namespace, reverse=True),
            lambda tx: self.aggregate.count(tx, namespace=namespace, gt=key),
        ):
            return
        with self._reader(data) as tx:
            rank = self.aggregate.rank(tx, key, namespace=namespace)
            assert rank == self.aggregate.count(tx, namespace=namespace, lt=key)
            after = self.aggregate.rank(tx, key, namespace=namespace, reverse=True)
            assert after == self.aggregate.count(tx, namespace=namespace, gt=key)
            if rank < self.aggregate.count(tx, namespace=namespace):
                found = self.aggregate.at(tx, rank, namespace=namespace)
                assert value_order(found.key) >= value_order(key)

    @rule(data=st.data())
    def rank_and_at_agree_for_every_item(self, data: st.DataObject) -> None:
        """For each item: at(rank(item)) is the item; ranks from both ends add up to count - 1."""
        spaces = [namespace for namespace, _ in self.model.namespaces()]
        if not spaces:
            return
        namespace = data.draw(st.sampled_from(spaces))
        rows = self.model.rows(namespace)
        with self._reader(data) as tx:
            for index, row in enumerate(rows):
                forward = self.aggregate.rank(tx, row.key, row.id, namespace=namespace)
                backward = self.aggregate.rank(tx, row.key, row.id, namespace=namespace, reverse=True)
                assert (forward, backward) == (index, len(rows) - 1 - index)
                assert strict(self.aggregate.at(tx, forward, namespace=namespace)) == strict(row)
                assert strict(self.aggregate.at(tx, -1 - backward, namespace=namespace)) == strict(row)

    @rule(
        data=st.data(),
        namespace=st.sampled_from(READ_NAMESPACES),
        cuts=st.lists(bound_values, min_size=3, max_size=3),
    )
    def counts_of_adjacent_ranges_add_up(self, data: st.DataObject, namespace: Any, cuts: list[Any]) -> None:
        cuts = list(self._anchor(data, namespace, dict(enumerate(cuts))).values())
        refused = [cut for cut in cuts if refuses(self.model.rows(namespace), [cut])]
        if self._refused(
            data,
            namespace,
            refused,
            *(lambda tx, cut=cut: self.aggregate.count(tx, namespace=namespace, ge=cut) for cut in refused),
        ):
            return
        low, middle, high = sorted(cuts, key=cut_order)
        with self._reader(data) as tx:
            count = self.aggregate.count
            left = count(tx, namespace=namespace, ge=low, lt=middle)
            right = count(tx, namespace=namespace, ge=middle, lt=high)
            assert left + right == count(tx, namespace=namespace, ge=low, lt=high)
            below = count(tx, namespace=namespace, lt=middle)
            assert below + count(tx, namespace=namespace, ge=middle) == count(tx, namespace=namespace)

    @rule(
        data=st.data(),
        conflict=st.sampled_from(CONFLICTS),
        method=st.sampled_from(
            ["count", "totals", "sum", "at", "rank", "min", "max", "random", "items", "page", "delete_range"]
        ),
    )
    def conflicting_bounds_raise(self, data: st.DataObject, conflict: dict[str, Any], method: str) -> None:
        aggregate = self.aggregate
        calls: dict[str, Callable[[Any], Any]] = {
            "count": lambda tx: aggregate.count(tx, **conflict),
            "totals": lambda tx: aggregate.totals(tx, **conflict),
            "sum": lambda tx: aggregate.sum(tx, "x", **conflict),
            "at": lambda tx: aggregate.at(tx, 0, **conflict),
            "rank": lambda tx: aggregate.rank(tx, 1, **conflict),
            "min": lambda tx: aggregate.min(tx, **conflict),
            "max": lambda tx: aggregate.max(tx, **conflict),
            "random": lambda tx: aggregate.random(tx, rng=1, **conflict),
            "items": lambda tx: aggregate.items(tx, **conflict),
            "page": lambda tx: aggregate.page(tx, **conflict),
            "delete_range": lambda tx: aggregate.delete_range(tx, **conflict),
        }
        with self.db.write() as tx:
            try:
                calls[method](tx)
            except BoundsError:
                pass
            else:
                raise AssertionError(f"{method}({conflict}) did not raise BoundsError")
            assert not tx.changed, "a write that raised wrote something"

    # -------------------------------------------------------------- invariants

    @invariant()
    def checker_finds_nothing(self) -> None:
        with self.db.read() as tx:
            assert tallytree.check(tx) == []

    @invariant()
    def database_equals_model(self) -> None:
        with self.db.read() as tx:
            for namespace in NAMESPACES:
                self._compare_namespace(tx, self.model, namespace)
            assert [item.key for item in self.bystander.items(tx)] == [1, 2, 3]


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", strict result) or ("error", error type) for a tallytree error."""
    try:
        result = call()
    except tallytree.Error as exc:
        return ("error", type(exc))
    if isinstance(result, Totals):
        result = result.as_dict()
    return ("ok", strict(result))


class MemoryMachine(AggregateMachine):
    backend = "memory"


class LmdbMachine(AggregateMachine):
    backend = "lmdb"


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None)

TestMemoryBackend = MemoryMachine.TestCase
TestMemoryBackend.settings = MACHINE_SETTINGS
TestLmdbBackend = LmdbMachine.TestCase
TestLmdbBackend.settings = MACHINE_SETTINGS
