"""The user-facing aggregate: bounds, reads and writes over one tree per namespace.

Design
======
An :class:`Aggregate` is a named, sorted multiset of items ``(key, id, values)`` with one tree per
namespace. This module turns user arguments into entries and bounds and calls ``_btree``:

* an item's entry is ``encode_key(key) + encode_id(id)`` (``encode_entry``); its tree is
  ``aggregate id + namespace``;
* every read takes the same bounds, keyword-only: ``ge``/``gt`` (lower), ``le``/``lt`` (upper),
  ``prefix`` (tuple keys starting with these elements) or ``eq`` (this key, every id). A bound is a key,
  or a :class:`Position` / :class:`Item` to start or stop inside a run of equal keys. A key bound compares
  by value (``le=1`` includes the key ``1.0``), a position bound is exact;
* bounds become a lower and an upper *cut*: ``(bytes, after)`` meaning "entries ``< bytes``" or, with
  ``after``, "entries ``<= bytes``"; a key ``k`` cuts at its body (before every key equal to ``k``) or
  at ``body + b"\\xff"`` (after every one). Counting below a cut is ``Tree.rank``; a bounded count is
  the difference of two such ranks, found in one fused O(log n) descent (``Tree.rank_range``), and
  ``count(a..b) + count(b..c) == count(a..c)`` holds exactly. Totals use ``Tree.range_summary``.
* a bound of another type than the keys (see "Bounds of another type" below) raises BoundKeyTypeError.

Bounds of another type
----------------------
Keys of different types compare by the order of their types, so over datetime keys
``count(ge="2024-01-01")`` is valid and counts no key (every datetime is after every str): a wrong
answer. Mixed-type namespaces are legal, so a bound is refused only in a namespace whose keys are all
of one *class* (the high nibble of the type code: None, bool, number, str, bytes, datetime; for
tuples, tuple plus the class of the first element, see :func:`_key_class`) when the bound's class is
another (BoundKeyTypeError). Classes ascend as encodings do, so the keys are of one class exactly
when the first and the last key are, and then a cut of another class lies before or after every key:
the bound selects all or nothing, never what was meant. What the check costs a read:

* nothing more than comparisons of what the read found: a count within the bounds strictly between
  0 and the namespace's count rules a refusal out when there is one cut (the other missing), or two
  of one class, or two at ranks strictly among the keys. Reads that take all keys or none, and
  ranges whose two cuts are of different classes, look further (``_check_bounds``);
* the class of the keys of the root record at hand, kept per record (records are shared between
  transactions while unchanged, and never changed in place), so a record read before costs a dict
  lookup, and the last one a comparison of each cut with the range of its class. For a record not
  seen yet, two *witnesses* found without a descent: an internal root's second and last fences
  (each lies between two keys, so it is of their class when they have one), a leaf root's first and
  last entries, or the first and last pending entries read from the record's bytes when there are
  no nodes. Witnesses of two classes mean keys of several: no bound is refused;
* only a bound of another class than the witnesses' reads the first and the last key (two
  O(log n) descents), and raises when both are of one class that is not the bound's.

So no bound is ever refused in a namespace holding keys of two classes, and every refusal is decided
from the real first and last keys. A read pays a few comparisons in Python, which cost as much as
they do next to reads that run in C: instructions per read (callgrind, reads repeated in one read
transaction, 10^5 int keys, against the code before) +2-4% for a bound among the keys (count, totals,
at, rank), +4-6% for a window of two bounds, +8% for one that reaches past the last key, and +8-13%
for a read that takes every key or none (``count(ge=before_all)``, ``totals(lt=now)``); a read in a
transaction of its own, +2.5% in time. Done in the C descents, the check would cost next to nothing:
that is where to move it if these percents matter. ``page(after=...)`` positions are not bounds and
are not checked.

Writes validate everything (key, id, namespace, values) before touching a tree and check for
duplicates or absence before changing a node, so a write that raises has changed nothing, even inside a
transaction that goes on.
"""

from __future__ import annotations

import base64
import contextlib
import math
import operator
import random as _random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import compress, islice
from operator import add, attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, Literal, final

from ._args import ITEMS, as_int, check_flag, flag_error, iterator_of
from ._btree import Root, same_values, vsub
from ._buckets import Bucket, bucket_edges
from ._bulk import (
    DEFAULT_FILL,
    DEFAULT_MEMORY,
    BuildReport,
    OnDuplicate,
    encode_ids,
    encode_keys,
    valid_column,
)
from ._bulk import build as _bulk_build
from ._bulk import build_many as _bulk_build_many
from ._gc import gc_paused
from ._keys import (
    _show,
    decode_entry,
    decode_key,
    encode_body,
    encode_entry,
    encode_key,
    encode_prefix,
    foreign_scalar,
    sort_order,
)
from ._native import speedups
from ._node import sum_value
from ._store import ROOTS
from ._tree import Tree, appended, inserted, pending_capacity
from ._txn import (
    DEFINITIONS,
    Transaction,
    WriteTransaction,
    check_transaction,
    decode_definition,
    decode_root,
)
from .errors import (
    ArgumentTypeError,
    BoundKeyTypeError,
    BoundsError,
    BoundsTypeError,
    CorruptDatabaseError,
    DuplicateItemError,
    Error,
    InvalidArgumentError,
    InvalidValueError,
    ItemNotFoundError,
    OutOfRangeError,
    TransactionError,
    UnknownFieldError,
    UnsupportedKeyTypeError,
)

if TYPE_CHECKING:
    from ._db import Database

__all__ = ["Aggregate", "Item", "Page", "Position", "Totals"]

_SEEDS = (int, float, str, bytes, bytearray)  # what random.Random takes as a seed (bool aside)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**64 - 1
_AFTER = b"\xff"
_TREE_KEYS = 4096  # tree keys remembered per aggregate (then forgotten all at once)
_READERS = 64  # trees a read transaction keeps for namespaces read again (then forgotten all at once)

Cut = tuple[bytes, bool]


@dataclass(frozen=True, slots=True)
class Item:
    """One item of an aggregate: its sort key, its id (tie-breaker) and its values (in field order)."""

    key: Any
    id: Any
    values: tuple[Any, ...] = ()


# An Item made without its dataclass __init__, which sets each field through object.__setattr__
# (a frozen dataclass): its slots set directly, 0.9 us an item with its entry decoded, against 1.4 us
# (session 29), for items, pages and every read that returns one. The same object in every way.
_SET_KEY, _SET_ID, _SET_VALUES = (Item.__dict__[name].__set__ for name in ("key", "id", "values"))
_new_object = object.__new__


@dataclass(frozen=True, slots=True)
class Position:
    """An exact position ``(key, id)`` for bounds: ``gt=Position(k, "evt_9")`` starts after that item."""

    key: Any
    id: Any


class Totals:
    """The count and the exact sum of every value field of a set of items.

    Sums of ints are exact ints; sums involving floats are correctly rounded (``math.fsum``).

    >>> t = Totals(2, ("cost", "tokens"), (0.75, 3000))
    >>> t.count, t.cost, t["tokens"], t.mean("cost")
    (2, 0.75, 3000, 0.375)
    """

    __slots__ = ("_fields", "_sums", "count")

    def __init__(self, count: int, fields: tuple[str, ...], sums: tuple[int | float, ...]) -> None:
        self.count = count
        self._fields = fields
        self._sums = sums

    @classmethod
    def from_summary(cls, fields: tuple[str, ...], summary: list[int]) -> Totals:
        """Build from an internal summary vector ``[count, S..., F...]``."""
        nfields = len(fields)
        totals = cls.__new__(cls)
        totals.count = summary[0]
        totals._fields = fields
        if nfields == 2:  # the commonest shape, spelt out: 0.4 us less than the general form
            totals._sums = (sum_value(summary[1], summary[3]), sum_value(summary[2], summary[4]))
        elif nfields == 1:
            totals._sums = (sum_value(summary[1], summary[2]),)
        else:
            totals._sums = tuple(map(sum_value, summary[1 : 1 + nfields], summary[1 + nfields :]))
        return totals

    @classmethod
    def from_values(cls, fields: tuple[str, ...], values: list[Any]) -> Totals:
        """Build from ``[count, value of each field]`` (``Tree.range_values``). O(fields).

        >>> Totals.from_values(("cost", "tokens"), [2, 0.5, 30])
        Totals(count=2, cost=0.5, tokens=30)
        """
        totals = cls.__new__(cls)
        totals.count = values[0]
        totals._fields = fields
        totals._sums = tuple(values[1:])
        return totals

    def __getattr__(self, name: str) -> int | float:
        if name.startswith("_"):  # not set yet (copy, pickle make the object first): no recursion
            raise AttributeError(name)
        try:
            return self._sums[self._fields.index(name)]
        except ValueError:
            raise AttributeError(
                f"Totals has no field {_show(name)}; the fields are {', '.join(self._fields) or 'none'}"
            ) from None

    def __getitem__(self, name: str) -> int | float:
        if name == "count":
            return self.count
        try:
            return self._sums[self._fields.index(name)]
        except ValueError:
            raise UnknownFieldError(
                f"no value field {_show(name)}; the fields are {list(self._fields)} (and 'count')"
            ) from None

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the summed fields, in declaration order. O(1).

        >>> Totals(2, ("cost", "tokens"), (0.75, 3000)).fields
        ('cost', 'tokens')
        """
        return self._fields

    @property
    def sums(self) -> dict[str, int | float]:
        """The sums by field name (a new dict each time). O(f) for f fields.

        >>> Totals(2, ("cost", "tokens"), (0.75, 3000)).sums
        {'cost': 0.75, 'tokens': 3000}
        """
        return dict(zip(self._fields, self._sums, strict=True))

    def mean(self, field: str) -> float | None:
        """The mean of a field over the items (None when there are none). O(f) for f fields.

        >>> none = Totals(0, ("cost", "tokens"), (0, 0))
        >>> Totals(2, ("cost", "tokens"), (0.75, 3000)).mean("tokens"), none.mean("tokens")
        (1500.0, None)
        """
        total = self[field]  # an unknown field raises UnknownFieldError, with or without items
        if self.count == 0:
            return None
        return total / self.count

    def as_dict(self) -> dict[str, int | float]:
        """``{"count": ..., field: sum, ...}``, for JSON output. O(f) for f fields.

        >>> import json
        >>> json.dumps(Totals(2, ("cost", "tokens"), (0.75, 3000)).as_dict())
        '{"count": 2, "cost": 0.75, "tokens": 3000}'
        """
        return {"count": self.count, **self.sums}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Totals):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        parts = [f"count={self.count}", *(f"{name}={value!r}" for name, value in self.sums.items())]
        return f"Totals({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of items, with the cursor to pass as ``after=`` for the next page.

    The cursor encodes a position, not an offset, so it stays valid when items are added or removed.
    """

    items: list[Item]
    cursor: str | None
    done: bool


class _Bounds:
    """Bounds resolved to cuts."""

    __slots__ = ("lower", "upper")

    def __init__(self, lower: Cut | None, upper: Cut | None) -> None:
        self.lower = lower
        self.upper = upper


_Encoded = tuple[list[bytes], list[list[Any]], list[Any], list[Any]]
"""A batch for insert_many: entries, value columns (one list per field), the keys and the ids."""


_UNBOUNDED = _Bounds(None, None)  # shared: bounds are never changed once resolved


def _entry_of(position: Position | Item) -> bytes:
    return encode_entry(position.key, position.id)


def resolve_bounds(
    ge: Any = None,
    gt: Any = None,
    le: Any = None,
    lt: Any = None,
    prefix: tuple[Any, ...] | None = None,
    eq: Any = None,
) -> _Bounds:
    """Turn the bound keywords into lower and upper cuts. Raises BoundsError on conflicts."""
    if prefix is None and eq is None and gt is None and le is None:  # the common ge= / lt= range
        if ge is None and lt is None:
            return _UNBOUNDED
        kind = type(ge)
        if kind is int or kind is float or kind is str or kind is datetime:
            first: Cut | None = (encode_body(ge), False)
        elif ge is None:
            first = None
        else:
            first = (_entry_of(ge), False) if isinstance(ge, Position | Item) else (encode_body(ge), False)
        kind = type(lt)
        if kind is int or kind is float or kind is str or kind is datetime:
            return _Bounds(first, (encode_body(lt), False))
        if lt is None:
            return _Bounds(first, None)
        return _Bounds(
            first, (_entry_of(lt), False) if isinstance(lt, Position | Item) else (encode_body(lt), False)
        )
    if ge is not None and gt is not None:
        raise BoundsError("give at most one lower bound: ge= or gt=, not both")
    if le is not None and lt is not None:
        raise BoundsError("give at most one upper bound: le= or lt=, not both")
    ranged = ge is not None or gt is not None or le is not None or lt is not None
    if prefix is not None:
        if ranged or eq is not None:
            raise BoundsError("prefix= cannot be combined with ge/gt/le/lt/eq; use one kind of bound")
        if not isinstance(prefix, tuple):
            raise BoundsTypeError(f"prefix= takes a tuple of leading key elements, not {_show(prefix)}")
        start = encode_prefix(prefix)
        return _Bounds((start, False), (start + _AFTER, False))
    if eq is not None:
        if ranged:
            raise BoundsError("eq= cannot be combined with ge/gt/le/lt; use one kind of bound")
        if isinstance(eq, Position | Item):
            raise BoundsError("eq= takes a key; to find one item use get(tx, key, id)")
        body = encode_body(eq)
        return _Bounds((body, False), (body + _AFTER, False))
    lower: Cut | None = None
    upper: Cut | None = None
    if ge is not None:
        lower = (_entry_of(ge), False) if isinstance(ge, Position | Item) else (encode_body(ge), False)
    elif gt is not None:
        lower = (_entry_of(gt), True) if isinstance(gt, Position | Item) else (_after_key(gt), False)
    if lt is not None:
        upper = (_entry_of(lt), False) if isinstance(lt, Position | Item) else (encode_body(lt), False)
    elif le is not None:
        upper = (_entry_of(le), True) if isinstance(le, Position | Item) else (_after_key(le), False)
    return _Bounds(lower, upper)


_NAMES = ("the lower bound (ge=, gt=, eq= or prefix=)", "the upper bound (le=, lt=, eq= or prefix=)")
_KEY_NAMES = ("the key", "the key")
_EDGE_NAMES = ("the first bucket edge (start=, or the first of edges=)", "the last bucket edge")
_KEY_CLASSES = 256  # root records whose keys' class an aggregate remembers (then forgets all at once)
_TUPLES = 0x70  # the class of a tuple without a first element (and of a cut before or after every tuple)
_CLASS_NAMES = {1: "None", 2: "bool", 3: "number", 4: "str", 5: "bytes", 6: "datetime"}
_CONVERSIONS = {
    3: "e.g. a datetime's .timestamp() for epoch-second keys, or int(text)",
    4: "e.g. str(value)",
    6: "e.g. datetime.fromisoformat('2024-01-01').replace(tzinfo=timezone.utc)",
}


def _key_class(data: bytes) -> int:
    """The class of the key an entry, a bound's body or a cut starts with: the high nibble of its type
    code (1 None, 2 bool, 3 number, 4 str, 5 bytes, 6 datetime), and for a tuple ``0x70`` plus the
    class of its first element; ``0x70`` alone for the empty tuple and for cuts before or after every
    tuple (``prefix=()``). Classes ascend as the encodings do. O(1).

    >>> from datetime import UTC, datetime
    >>> [_key_class(encode_key(key)) for key in (None, True, -1.5, 7, "a", b"a", datetime.now(UTC))]
    [1, 2, 3, 3, 4, 5, 6]
    >>> [hex(_key_class(encode_key(key))) for key in ((), ("a", 1), (1, "a"))]
    ['0x70', '0x74', '0x73']
    """
    code = data[0]
    if code < _TUPLES:
        return code >> 4
    second = data[1] if len(data) > 1 else 0
    return _TUPLES if second in (0, 0xFF) else _TUPLES | second >> 4


def _same_class(low: bytes, high: bytes) -> bool:
    """Whether two cuts are of one class (:func:`_key_class`), the type codes compared in place
    unless both cuts are tuples. O(1)."""
    code = low[0] >> 4
    if code != high[0] >> 4:
        return False
    return code < 7 or _key_class(low) == _key_class(high)


def _two_classes(lower: Cut | None, upper: Cut | None) -> bool:
    """Whether the bounds have two cuts of different classes (then a count strictly among the keys
    does not rule out a bound of another class than the keys: :meth:`Aggregate._range`). O(1)."""
    if lower is None or upper is None:
        return False
    low, high = lower[0], upper[0]
    return not (low[0] >> 4 == high[0] >> 4 < 7 or _same_class(low, high))


def _class_name(key_class: int) -> str:
    if key_class < _TUPLES:
        return _CLASS_NAMES.get(key_class, f"type {key_class:#x}")
    if key_class == _TUPLES:
        return "tuple"
    return f"tuple whose first element is a {_class_name(key_class & 0x0F)}"


def _fits(bound: int, keys: int) -> bool:
    """Whether a bound of class ``bound`` can be meant for keys all of class ``keys``: the same class,
    or, both being tuples, a tuple cut without a first element (``ge=()``, ``prefix=()``) or keys that
    are all the empty tuple.

    >>> _fits(3, 3), _fits(4, 3), _fits(0x70, 0x74), _fits(0x76, 0x74), _fits(0x76, 0x70), _fits(3, 0x70)
    (True, False, True, False, True, False)
    """
    return bound == keys or (bound >= _TUPLES and keys >= _TUPLES and _TUPLES in (bound, keys))


_ANY_CUT = b"\xff"  # above every cut: no encoding starts with ff


def _class_range(keys: int | None) -> tuple[bytes, bytes]:
    """``(low, high)``: the cuts of class ``keys`` lie in ``[low, high)`` (None: keys of several
    classes, which any cut fits). Tuple cuts without a first element, which also fit tuple keys, lie
    outside, to be told apart by :func:`_fits`. O(1).

    >>> _class_range(3), _class_range(0x74), _class_range(None)
    ((b'0', b'@'), (b'p@', b'pP'), (b'', b'\\xff'))
    """
    if keys is None:
        return b"", _ANY_CUT
    if keys < _TUPLES:
        return bytes((keys << 4,)), bytes(((keys + 1) << 4,))
    if keys == _TUPLES:
        return b"\x70", b"\x71"
    return bytes((_TUPLES, (keys & 0x0F) << 4)), bytes((_TUPLES, ((keys & 0x0F) + 1) << 4))


def _witnessed_class(tree: Tree) -> int | None:
    """The class of a tree's keys as two witnesses tell it, or None when the tree is empty or they
    differ (keys of several classes). The witnesses lie among the keys in order (see "Bounds of
    another type" above), so they share the keys' class when the keys have one; they may agree on a
    class that not every key has, which the caller rules out on the first and last keys before it
    raises. The witnesses: an internal root node's second and last fences, a leaf root's first and
    last entries, or, with no nodes, the first and last pending entries (read from the record's
    bytes when the pending node is not decoded). A compact node stays compact (``Node.entry_rows``).
    O(1): the root node, which reads have cached, or the pending node."""
    nodes = tree.nodes.root
    if nodes is not None:
        node = tree.access.node(nodes.node_id)
        if not node.leaf:
            keys = node.keys
            if len(keys) < 2:
                return None
            first, last = keys[1], keys[-1]  # keys[0] is the root's own fence, b""
            low = _key_class(first)
            return low if low == _key_class(last) else None
    else:
        edges = tree._edges_of_record()  # without decoding the pending node
        if edges is not None:
            low = _key_class(edges[1])
            return low if low == _key_class(edges[2]) else None
        node = tree.pending  # type: ignore[assignment]  # None when the tree is empty
        if node is None:
            return None
    size = node.size()
    if not size:
        return None
    low = _key_class(node.entry_rows(0, 1)[0][0])
    return low if low == _key_class(node.entry_rows(size - 1, size)[0][0]) else None


def _plain_number(value: object) -> int | float | None:
    """The Python int or float a value of another numeric type stands for, or None (a bool, and
    anything that is no number). What the values of items take besides exact ints and floats: an int
    or float subclass (``IntEnum``, ``numpy.float64``) and a numpy integer or float
    (:func:`~tallytree._keys.foreign_scalar`) are their plain value; a bool, numpy's included, stays
    refused. O(1).

    >>> _plain_number(True) is None, _plain_number("1") is None
    (True, True)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    plain = foreign_scalar(value)
    return plain if type(plain) is int or type(plain) is float else None


def _after_key(key: Any) -> bytes:
    return encode_body(key) + _AFTER


def _encode_cursor(entry: bytes) -> str:
    return base64.urlsafe_b64encode(entry).decode("ascii")


def _decode_cursor(cursor: str) -> bytes:
    """The entry a ``page().cursor`` stands for. O(size of the cursor).

    Raises BoundsError for any str page() does not return: the cursor must be the base64 of exactly
    one entry, a key and an id of an id type (str, int or bytes), written as page() writes them.
    """
    if not isinstance(cursor, str):
        raise BoundsTypeError(
            f"after= takes page.cursor (a str), an Item or a Position, not {type(cursor).__name__}"
        )
    try:
        entry = base64.urlsafe_b64decode(cursor.encode("ascii"))
        key, item_id = decode_entry(entry)
        canonical = encode_entry(key, item_id)  # a float id, say, raises
    except (ValueError, Error) as exc:  # binascii.Error and UnicodeEncodeError are ValueErrors
        raise _not_a_cursor(cursor) from exc
    if canonical != entry or _encode_cursor(entry) != cursor:  # bytes after the id, or other text
        raise _not_a_cursor(cursor)
    return entry


def _not_a_cursor(cursor: str) -> BoundsError:
    return BoundsError(f"after={_show(cursor)} is not a cursor returned by page(); pass page.cursor")


def _foreign_record(name: str, namespace: Any) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"{name}: the root record of namespace {namespace!r} sums another number of value fields than "
        "the aggregate has (another aggregate's record, or damage); run `tallytree check`"
    )


class _Watch:
    """Whether the trees of one aggregate changed in a write transaction, for an iteration over them.

    ``WriteTransaction.set_root`` bumps a tree's version (``tx.versions``) and appends a tree changed
    for the first time, so a check costs O(1) per tree newly changed and per tree looked at, and
    :meth:`any_changed` O(trees changed before the watch began).
    """

    __slots__ = ("_known", "_prefix", "_seen", "_tx")

    def __init__(self, tx: WriteTransaction, prefix: bytes, trees: Iterable[bytes]) -> None:
        self._tx = tx
        self._prefix = prefix  # the aggregate's trees' keys start with it
        versions = tx.versions
        self._known = {tree: versions[tree] for tree in trees}  # the trees changed before
        self._seen = len(versions)

    def changed(self, tree: bytes, last: bytes | None = None) -> bool:
        """Whether ``tree`` or ``last``, or a tree of the aggregate not changed before, has changed."""
        tx = self._tx
        tx.flush_deferred()  # inserts a table queued are changes of their trees
        versions = tx.versions
        fresh = len(versions) - self._seen
        if fresh:
            self._seen += fresh
            if any(key.startswith(self._prefix) for key in islice(reversed(versions), fresh)):
                return True
        known = self._known
        if tree in known and versions[tree] != known[tree]:
            return True
        return last is not None and last in known and versions[last] != known[last]

    def any_changed(self) -> bool:
        """Whether any tree of the aggregate has changed. O(trees changed before the watch began)."""
        versions = self._tx.versions
        return self.changed(b"") or any(versions[tree] != version for tree, version in self._known.items())


@final
class Sentinel:
    """A default that stands for an argument not given, compared by identity and shown by its name:
    ``help(Aggregate.replace)`` shows ``new_key=KEEP``, not ``<object object at 0x...>``.

    >>> Sentinel("KEEP")
    KEEP
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_KEEP = Sentinel("KEEP")
"""replace()'s default for what an item keeps (its key, id, namespace or values)."""
_UNSET = Sentinel("UNSET")
"""get()'s default id: none given (the key is then an Item or a Position); namespaces()'s default
``after``: none given (None is the default namespace)."""


def owned_reason(aggregate: str, table: str) -> str:
    """Why an aggregate a table maintains refuses writes of its own."""
    return (
        f"aggregate {aggregate!r} is maintained by table {table!r}: write through the table "
        "(insert/update/replace/delete), or table.detach() it first"
    )


class Aggregate:
    """A named, sorted multiset of items per namespace, with counts and exact sums.

    Obtain one with :meth:`tallytree.Database.aggregate`. Every method takes the transaction first;
    reads work in ``db.read()`` and ``db.write()`` transactions, writes in ``db.write()`` only.
    """

    def __init__(self, db: Database, name: str, agg_id: int, fields: tuple[str, ...], node_size: int) -> None:
        self._db = db
        self.name = name
        self.fields = fields
        self.node_size = node_size
        self._capacity = pending_capacity(node_size)  # (node_size never changes)
        self._id = agg_id
        self._prefix = agg_id.to_bytes(4, "big")
        self._owner: str | None = None  # the table that maintains it (see _set_owner)
        self._readonly_reason: str | None = None  # why writes are refused (a table maintains it)
        self._dropped: str | None = None  # why every read and write is refused: the aggregate is gone
        self._record_key = DEFINITIONS + name.encode()
        self._record: bytes | None = None  # its stored definition and the backend's epoch when last
        self._epoch = -1  # confirmed (see _confirm)
        self._tree_keys: dict[Any, bytes] = {}  # namespace (exact str / int / None) -> tree key
        # id(root record) -> (the record, the class of its keys or None); the last record with the
        # range of the cuts that fit its keys (see _check_bounds)
        self._key_classes: dict[int, tuple[Root, int | None]] = {}
        self._known: tuple[Root | None, bytes, bytes] = (None, b"", _ANY_CUT)

    def __repr__(self) -> str:
        return f"<Aggregate {self.name!r} values={self.fields!r} node_size={self.node_size}>"

    # ------------------------------------------------------------ plumbing

    def _tree_key(self, namespace: Any) -> bytes:
        kind = type(namespace)
        if kind is not str and kind is not int and namespace is not None:
            return self._prefix + encode_key(namespace, what="namespace")
        # Only exact str, int and None are remembered: they are equal only to values of their own
        # type here, whereas 1, 1.0 and True would share a dict slot but encode differently.
        known = self._tree_keys
        tree_key = known.get(namespace)
        if tree_key is None:
            tree_key = self._prefix + encode_key(namespace, what="namespace")
            if len(known) >= _TREE_KEYS:
                known.clear()
            known[namespace] = tree_key
        return tree_key

    def _check(self, tx: Transaction) -> None:
        try:
            tx.check_database(self._db)
        except AttributeError:  # not a transaction (found here, off the path of every read)
            check_transaction(tx, self._db, self.name)
            raise
        if self._dropped is not None:
            raise self._gone()
        if self._epoch != tx._epoch:
            self._confirm(tx)

    def _confirm(self, tx: Transaction) -> None:
        """Check that this aggregate is still the one stored under its name.

        Another process may have dropped it, and perhaps created a new aggregate of the same name,
        since this object was made: its writes would then go to trees that nothing reads, and its
        reads would answer from them. A check holds until the backend's epoch moves (see
        ``_store.Backend.epoch``): a transaction that finds another process's commits, or a commit of
        this process that changed a definition. Then one META get (about 1 us); the record is
        decoded only when its bytes changed. Raises TransactionError.
        """
        record = tx.meta(self._record_key)
        if record != self._record:
            definition = decode_definition(self.name, record, tx) if record is not None else None
            if definition is None or definition["id"] != self._id:
                again = "" if definition is None else " and created again"
                self._dropped = f"aggregate {self.name!r} was dropped{again} by another process or Database"
                raise self._gone()
            self._set_owner(definition.get("table"))
            self._record = record
        self._epoch = tx._epoch

    def _set_owner(self, table: str | None) -> None:
        """Record the table that maintains this aggregate (None: none), whose writes alone it takes."""
        self._owner = table
        self._readonly_reason = owned_reason(self.name, table) if table is not None else None

    def _current(self) -> bool:
        """Whether this object is still the aggregate stored under its name, in a new snapshot."""
        if self._dropped is None:
            with self._db.read() as tx, contextlib.suppress(TransactionError):
                self._confirm(tx)
        return self._dropped is None

    def _gone(self) -> TransactionError:
        return TransactionError(f"{self._dropped}; open it again with db.aggregate() or table.aggregate()")

    def _tree(self, tx: Transaction, namespace: Any) -> tuple[Tree, bytes]:
        self._check(tx)
        tree_key = self._tree_key(namespace)
        return Tree(tx, len(self.fields), self.node_size, tx.root(tree_key)), tree_key

    def _reader(self, tx: Transaction, namespace: Any) -> Tree:
        """The tree of a namespace, for reads only (it shares the transaction's root record). A read
        transaction's snapshot never changes, so it keeps the trees it read (``tx._readers``) and a
        namespace read again costs one dict lookup; a write transaction's trees change, so each read
        in one loads its tree again. O(1)."""
        self._check(tx)
        tree_key = self._tree_key(namespace)
        if tx.write:
            return Tree.reader(tx, len(self.fields), self.node_size, tx.root(tree_key))
        readers = tx._readers
        tree = readers.get(tree_key)
        if tree is None:
            if len(readers) >= _READERS:
                readers.clear()
            tree = readers[tree_key] = Tree.reader(tx, len(self.fields), self.node_size, tx.root(tree_key))
        return tree

    def _writable(self, tx: Transaction) -> WriteTransaction:
        db = self._db
        if (  # the checks of _check and Transaction.check_database, when all pass: two calls fewer
            type(tx) is WriteTransaction
            and tx._db is db
            and tx._open
            and not db._closed
            and self._dropped is None
            and self._epoch == tx._epoch
            and self._readonly_reason is None
        ):
            return tx
        self._check(tx)
        if not isinstance(tx, WriteTransaction):
            raise TransactionError(
                f"{self.name}: writes need a write transaction; use `with db.write() as tx:`"
            )
        if self._readonly_reason is not None:
            raise TransactionError(self._readonly_reason)
        return tx

    def _save(self, tx: WriteTransaction, tree_key: bytes, tree: Tree) -> None:
        changed, root = tree.take_root()
        if changed:
            tx.set_root(tree_key, root)

    def _duplicate(self, key: Any, id: Any, namespace: Any) -> DuplicateItemError:
        """The error for an insert of an item already there (made only when raised)."""
        return DuplicateItemError(
            f"{self.name}: item (key={key!r}, id={id!r}) already exists in namespace "
            f"{namespace!r}; use upsert() to overwrite or discard() it first"
        )

    def _not_found(self, key: Any, id: Any, namespace: Any, hint: str) -> ItemNotFoundError:
        """The error for a missing item (made only when raised: its message formats reprs)."""
        return ItemNotFoundError(
            f"{self.name}: no item (key={key!r}, id={id!r}) in namespace {namespace!r}{hint}"
        )

    def _values(self, values: Any) -> tuple[int | float, ...]:
        fields = self.fields
        if speedups is not None:  # the common case in one C call: a tuple of plain numbers
            if speedups.plain_values(values, len(fields)) is not None:
                return values  # type: ignore[no-any-return]
        elif type(values) is tuple and len(values) == len(fields):  # the same, checked in Python
            for value in values:
                kind = type(value)
                if kind is float:
                    if value - value != 0.0:  # inf - inf and nan - nan are nan
                        break
                elif kind is not int or not _INT64_MIN <= value <= _INT64_MAX:
                    break
            else:
                return values
        if isinstance(values, Mapping):
            unknown = set(values) - set(fields)
            if unknown:
                raise InvalidValueError(
                    f"{self.name}: unknown value field(s) {sorted(map(str, unknown))}; "
                    f"the fields are {list(fields)}"
                )
            missing = [field for field in fields if field not in values]
            if missing:
                raise InvalidValueError(f"{self.name}: missing value field(s) {missing}")
            values = tuple(values[field] for field in fields)
        elif isinstance(values, tuple | list):
            values = tuple(values)
        else:
            raise InvalidValueError(
                f"{self.name}: values must be a tuple in field order {list(fields)} or a mapping by "
                f"field name, not {type(values).__name__}"
            )
        if len(values) != len(fields):
            raise InvalidValueError(
                f"{self.name}: expected {len(fields)} value(s) {list(fields)}, got {len(values)}"
            )
        plain: list[int | float] | None = None  # the values as Python numbers, once one was converted
        for index, (field, given) in enumerate(zip(fields, values, strict=True)):
            value = given
            kind = type(value)
            if kind is not float and kind is not int:
                number = _plain_number(value)
                if number is None:
                    raise InvalidValueError(
                        f"{self.name}: {field}={_show(value)} is a {kind.__name__}; values are ints or "
                        "floats (bool is not accepted)"
                    )
                if plain is None:
                    plain = list(values)
                value = plain[index] = number
                kind = type(value)
            if kind is float:
                if not math.isfinite(value):
                    raise InvalidValueError(
                        f"{self.name}: {field}={value!r} is not finite; sums need finite numbers"
                    )
            elif not _INT64_MIN <= value <= _INT64_MAX:
                raise InvalidValueError(
                    f"{self.name}: {field}={_show(value)} is outside the range of a value, -2**63 to "
                    "2**64 - 1 (their sums may be any size); store it in a larger unit, or as a float"
                )
        return values if plain is None else tuple(plain)

    def _item(self, entry: bytes, values: tuple[Any, ...]) -> Item:
        key, item_id = decode_entry(entry)
        item: Item = _new_object(Item)  # see _SET_KEY
        _SET_KEY(item, key)
        _SET_ID(item, item_id)
        _SET_VALUES(item, values)
        return item

    def _range(self, tree: Tree, bounds: _Bounds) -> tuple[int, int]:
        """The ranks of the bounds' cuts (``start <= stop``), after :meth:`_check_bounds`. O(log n)."""
        if bounds is _UNBOUNDED:
            return 0, tree.count
        lower, upper = bounds.lower, bounds.upper
        start, stop = tree.rank_range(lower, upper)
        # A bound of another type than keys all of one type lies before or after every key (see
        # "Bounds of another type"): some keys but not all within the bounds rule that out for one
        # cut, or for two of one class, or for two strictly among the keys. Otherwise _check_bounds
        # looks. (A positive count means a root record, which the comparison reads only then.)
        if not 0 < stop - start < (total := tree.original.summary[0]) or (  # type: ignore[union-attr]
            (start == 0 or stop == total) and _two_classes(lower, upper)
        ):
            self._check_bounds(tree, bounds, start, stop)
        return start, max(start, stop)

    def _check_bounds(
        self, tree: Tree, bounds: _Bounds, start: int = -1, stop: int = -1, names: tuple[str, str] = _NAMES
    ) -> None:
        """Raise BoundKeyTypeError for a bound of another type than the keys of ``tree`` (see "Bounds
        of another type" in the module docstring). ``start`` and ``stop`` are the ranks of the cuts
        when the read found them: a cut strictly inside the keys is then not looked at (-1: check
        both). ``names`` name the lower and the upper cut in the message.

        The reads call this only when their ranks or count do not rule a refusal out (see
        :meth:`_range`). The class of the keys that the witnesses give is kept for each committed root
        record (records are shared by the transactions that read the same one, and never changed in
        place; a write transaction's own nodes are, so nothing is kept of its records), in a dict,
        and for the last one as the range of cuts that share it (``_known``), which a read of that
        record tests first. O(1) then, and when the witnesses settle it; O(log n) to refuse a bound,
        or when a namespace's keys are of one class at the witnesses but not at its ends."""
        root, low, high = self._known
        lower, upper = bounds.lower, bounds.upper
        if (
            tree.original is root
            and (lower is None or low <= lower[0] < high)
            and (upper is None or low <= upper[0] < high)
        ):
            return  # every cut of the class of this record's keys
        root = tree.original
        if root is None:
            return
        if isinstance(tree.access, WriteTransaction):  # its own nodes change in place: nothing is kept
            keys = _witnessed_class(tree)
        else:
            known = self._key_classes.get(id(root))
            if known is None or known[0] is not root:
                if len(self._key_classes) >= _KEY_CLASSES:
                    self._key_classes.clear()
                known = self._key_classes[id(root)] = (root, _witnessed_class(tree))  # held: its id stays
            keys = known[1]
            self._known = (root, *_class_range(keys))
        if keys is None:  # keys of several classes: any bound
            return
        count = root.summary[0]
        if lower is not None and not 0 < start < count:
            found = _key_class(lower[0])
            if not _fits(found, keys):
                self._refuse_cut(tree, lower[0], names[0])
        if upper is not None and not 0 < stop < count:
            found = _key_class(upper[0])
            if not _fits(found, keys):
                self._refuse_cut(tree, upper[0], names[1])

    def _refuse_cut(self, tree: Tree, cut: bytes, name: str) -> None:
        """Raise BoundKeyTypeError if the first and last keys are of one class and ``cut`` is of
        another; return otherwise (keys of several classes take any bound). O(log n)."""
        count = tree.count
        if not count:
            return
        first = _key_class(tree.select(0)[0])
        if first != _key_class(tree.select(count - 1)[0]):
            return
        bound = _key_class(cut)
        if _fits(bound, first):
            return
        if first > _TUPLES:
            advice = (
                f"give a tuple whose first element is a {_class_name(first & 0x0F)}, e.g. "
                "ge=(first, value) for a range within one first element, or prefix=(first,)"
            )
        else:
            example = _CONVERSIONS.get(first)
            advice = f"convert the bound to a {_class_name(first)}" + (f" ({example})" if example else "")
        raise BoundKeyTypeError(
            f"{self.name}: {name} is a {_class_name(bound)}, but every key in this namespace is a "
            f"{_class_name(first)}; keys and bounds of different types compare by the order of their "
            "types (None < bool < numbers < str < bytes < datetime < tuple), not by value, so this "
            f"bound would select every key or none; {advice}"
        )

    # ------------------------------------------------------------ reads

    def count(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> int:
        """Number of items within the bounds. O(log n) whatever the size of the range; O(1) unbounded.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores")
        >>> with db.write() as tx:
        ...     scores.insert_many(tx, [(k, f"u{k}") for k in range(10)])
        10
        >>> with db.read() as tx:
        ...     scores.count(tx, ge=3, lt=7), scores.count(tx), scores.count(tx, eq=5)
        (4, 10, 1)
        >>> with db.read() as tx:
        ...     scores.count(tx, ge="3")
        Traceback (most recent call last):
        tallytree.errors.BoundKeyTypeError: scores: ... is a str, but every key in this namespace is a num...

        Raises BoundsError for conflicting bounds, InvalidKeyError / UnsupportedKeyTypeError for
        bounds that are not keys, and BoundKeyTypeError (a BoundsTypeError) for a bound of another
        type than every key of the namespace (see the module docstring); every read that takes bounds
        raises these.
        """
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree = self._reader(tx, namespace)
        if bounds is _UNBOUNDED:
            return tree.count
        lower, upper = bounds.lower, bounds.upper
        start, stop = tree.rank_range(lower, upper)
        if not 0 < stop - start < (total := tree.original.summary[0]) or (  # type: ignore[union-attr]
            (start == 0 or stop == total) and _two_classes(lower, upper)
        ):  # _range inlined: count is the hottest read
            self._check_bounds(tree, bounds, start, stop)
        return stop - start if stop > start else 0

    def totals(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> Totals:
        """The count and exact sums of the items within the bounds. O(log n); O(1) unbounded.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> costs = db.aggregate("costs", values=("cost", "tokens"))
        >>> with db.write() as tx:
        ...     costs.insert(tx, 1, "a", (0.1, 10))
        ...     costs.insert(tx, 2, "b", (0.2, 20))
        >>> with db.read() as tx:
        ...     costs.totals(tx)
        Totals(count=2, cost=0.30000000000000004, tokens=30)
        """
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree = self._reader(tx, namespace)
        lower, upper = bounds.lower, bounds.upper
        values = tree.range_values(lower, upper)
        if bounds is not _UNBOUNDED and (  # as in _range, from the count within the bounds alone
            not 0 < values[0] < tree.original.summary[0]  # type: ignore[union-attr]
            or _two_classes(lower, upper)
        ):
            self._check_bounds(tree, bounds)
        return Totals.from_values(self.fields, values)

    def sum(
        self,
        tx: Transaction,
        field: str,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> int | float:
        """The exact sum of one value field within the bounds. O(log n).

        Raises UnknownFieldError (a KeyError, as ``totals["nope"]`` raises) for a field the aggregate
        does not have; it is also an InvalidValueError, which this raised before.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> ai = db.aggregate("ai", values=("cost", "tokens"))
        >>> with db.write() as tx:
        ...     ai.insert_many(tx, [(day, "call", (0.1, 700)) for day in range(10)])
        10
        >>> with db.read() as tx:
        ...     ai.sum(tx, "cost", ge=5), ai.sum(tx, "tokens")
        (0.5, 7000)
        """
        if field not in self.fields:
            hint = "; count(tx) counts the items" if field == "count" else ""
            raise UnknownFieldError(
                f"{self.name}: no value field {_show(field)}; the fields are {list(self.fields)}{hint}"
            )
        totals = self.totals(tx, namespace=namespace, ge=ge, gt=gt, le=le, lt=lt, prefix=prefix, eq=eq)
        return totals[field]

    def at(
        self,
        tx: Transaction,
        index: int,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> Item:
        """The item at 0-based ``index`` within the bounds; negative indexes count from the end.

        ``index`` is an int, or what stands for one (a numpy integer); a bool or a float raises
        ArgumentTypeError, as every int argument's does (``limit=``, ``buckets(count=)``...). O(log n).
        Raises OutOfRangeError (an IndexError) when there is no such item.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> latency = db.aggregate("latency")
        >>> with db.write() as tx:
        ...     latency.insert_many(tx, [(ms, f"r{ms}") for ms in (12, 40, 7, 95, 33)])
        5
        >>> with db.read() as tx:  # the median and the maximum
        ...     latency.at(tx, 2).key, latency.at(tx, -1).key
        (33, 95)
        """
        if type(index) is not int:  # (a numpy integer: its int)
            index = as_int(index, f"index must be an int, not {type(index).__name__}")
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree = self._reader(tx, namespace)
        start, stop = self._range(tree, bounds)
        size = stop - start
        position = index + size if index < 0 else index
        if not 0 <= position < size:
            raise OutOfRangeError(
                f"{self.name}: index {_show(index)} is out of range for {size} item(s) within the bounds"
            )
        return self._item(*tree.select(start + position))

    def rank(
        self,
        tx: Transaction,
        key: Any,
        id: Any = None,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        reverse: bool = False,
    ) -> int:
        """How many items within the bounds come before ``(key, id)``: its 0-based rank. O(log n).

        Without ``id``, counts the items before every item with this key, so
        ``rank(tx, k) == count(tx, lt=k)``. With ``reverse=True``, counts the items after it instead
        (after every item with the key when no ``id`` is given): the rank in descending order.
        ``key`` may also be an :class:`Item` or a :class:`Position`, as bounds may: its key and id
        (``rank(tx, item) == count(tx, lt=item)``); an ``id`` given with one raises
        InvalidArgumentError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> board = db.aggregate("board")
        >>> with db.write() as tx:
        ...     board.insert_many(tx, [(10, "ann"), (30, "bob"), (20, "cy")])
        3
        >>> with db.read() as tx:
        ...     best = board.max(tx)
        ...     board.rank(tx, 20), board.rank(tx, 20, reverse=True), board.rank(tx, best, reverse=True)
        (1, 1, 0)
        """
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree = self._reader(tx, namespace)
        start, stop = self._range(tree, bounds)
        try:
            if id is None:  # before every item with the key, or after every one in reverse
                cut = (_after_key(key) if reverse is True else encode_body(key), False)
            else:
                cut = (encode_entry(key, id), reverse is True)
        except UnsupportedKeyTypeError:  # an Item or a Position is no key: found here, off the path
            if not isinstance(key, Item | Position):
                raise
            cut = (self._given_entry(key, id is not None, id, "rank"), reverse is True)
        rank = tree.rank(*cut)
        if not 0 < rank < tree.original.summary[0]:  # type: ignore[union-attr]  # as in _range
            self._check_bounds(tree, _Bounds(cut, None), rank, names=_KEY_NAMES)  # misleads as a bound
        # reverse is checked by the identity tests that choose the direction: no work added to a rank
        if reverse is False:
            return min(max(rank, start), stop) - start
        if reverse is True:
            return stop - min(max(rank, start), stop)
        raise flag_error("reverse", reverse)

    def _given_entry(self, position: Item | Position, with_id: bool, id: Any, who: str) -> bytes:
        """The entry of an Item or Position given in place of a key (``rank(tx, item)``); raises
        InvalidArgumentError if an id was given too (``with_id``). O(1)."""
        if with_id:
            raise InvalidArgumentError(
                f"{self.name}: {who}() takes a key and an id, or an Item or a Position alone (it holds "
                f"both), not {type(position).__name__} {position!r} and id={_show(id)}"
            )
        return _entry_of(position)

    def min(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> Item | None:
        """The first item within the bounds, or None. O(log n).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> ages = db.aggregate("ages")
        >>> with db.write() as tx:
        ...     ages.insert_many(tx, [(31, "ann"), (25, "bob"), (47, "cy")])
        3
        >>> with db.read() as tx:
        ...     ages.min(tx).id, ages.min(tx, gt=25).id, ages.min(tx, gt=50)
        ('bob', 'ann', None)
        """
        return self._end(tx, namespace, resolve_bounds(ge, gt, le, lt, prefix, eq), last=False)

    def max(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> Item | None:
        """The last item within the bounds, or None. O(log n).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> ages = db.aggregate("ages")
        >>> with db.write() as tx:
        ...     ages.insert_many(tx, [(31, "ann"), (25, "bob"), (47, "cy")])
        3
        >>> with db.read() as tx:
        ...     ages.max(tx).id, ages.max(tx, lt=47).id
        ('cy', 'ann')
        """
        return self._end(tx, namespace, resolve_bounds(ge, gt, le, lt, prefix, eq), last=True)

    def _end(self, tx: Transaction, namespace: Any, bounds: _Bounds, last: bool) -> Item | None:
        tree = self._reader(tx, namespace)
        start, stop = self._range(tree, bounds)
        if start >= stop:
            return None
        return self._item(*tree.select(stop - 1 if last else start))

    def random(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        rng: _random.Random | int | None = None,
    ) -> Item | None:
        """A uniformly random item within the bounds, or None if there is none. O(log n).

        ``rng`` is a ``random.Random`` or a seed (a numpy integer seeds as its int), for reproducible
        draws.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> users = db.aggregate("users")
        >>> with db.write() as tx:
        ...     users.insert_many(tx, [(n, f"u{n}") for n in range(100)])
        100
        >>> with db.read() as tx:
        ...     first, again = users.random(tx, rng=7), users.random(tx, rng=7)
        ...     inside = users.random(tx, ge=90, rng=1).key >= 90
        >>> first == again, inside
        (True, True)
        """
        if isinstance(rng, _random.Random):
            generator = rng
        elif rng is None or type(rng) in _SEEDS:
            if type(rng) is float and math.isnan(rng):  # Random seeds a float by its hash: a NaN's is its id
                raise InvalidArgumentError(
                    "rng= is a seed for reproducible draws, and a NaN seeds differently each time; "
                    "pass an int, a str or a finite float"
                )
            generator = _random.Random(rng)
        else:  # a numpy integer seeds as its int
            generator = _random.Random(
                as_int(
                    rng,
                    f"rng= takes a random.Random or a seed (an int, float, str or bytes), not {_show(rng)}",
                )
            )
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree = self._reader(tx, namespace)
        start, stop = self._range(tree, bounds)
        if start >= stop:
            return None
        return self._item(*tree.select(start + generator.randrange(stop - start)))

    def get(self, tx: Transaction, key: Any, id: Any = _UNSET, *, namespace: Any = None) -> Item | None:
        """The item ``(key, id)`` in the namespace, or None. O(log n).

        ``key`` may also be an :class:`Item` or a :class:`Position`, without an ``id`` (which raises
        InvalidArgumentError): ``get(tx, item)`` reads that item as the transaction sees it. A plain
        key without an ``id`` raises ArgumentTypeError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> costs = db.aggregate("costs", values=("cost",))
        >>> with db.write() as tx:
        ...     costs.insert(tx, 5, "a", (1.5,), namespace="org:1")
        >>> with db.read() as tx:
        ...     costs.get(tx, 5, "a", namespace="org:1"), costs.get(tx, 5, "a")
        (Item(key=5, id='a', values=(1.5,)), None)
        >>> with db.read() as tx:
        ...     costs.get(tx, tallytree.Position(5, "a"), namespace="org:1")
        Item(key=5, id='a', values=(1.5,))
        """
        try:
            entry = encode_entry(key, id)
        except UnsupportedKeyTypeError:  # an Item or a Position, or no id: found here, off the path
            if isinstance(key, Item | Position):
                entry = self._given_entry(key, id is not _UNSET, id, "get")
            elif id is _UNSET:
                encode_key(key)  # a key that is no key raises its own error first
                raise ArgumentTypeError(
                    f"{self.name}: get() takes a key and an id, get(tx, key, id), or an Item or a "
                    f"Position alone, not the key {_show(key)} alone"
                ) from None
            else:
                raise
        tree = self._reader(tx, namespace)
        values = tree.find(entry)
        return None if values is None else self._item(entry, values)

    def items(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        reverse: bool = False,
    ) -> Iterator[Item]:
        """Iterate lazily over the items within the bounds, in key order (or reversed).

        O(log n) to start and O(1) amortized per item. The iterator reads the transaction's snapshot;
        changing the same namespace while iterating raises TransactionError.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> days = db.aggregate("days")
        >>> with db.write() as tx:
        ...     days.insert_many(tx, [(d, "x") for d in range(10)])
        10
        >>> with db.read() as tx:
        ...     [item.key for item in days.items(tx, ge=3, lt=6, reverse=True)]
        [5, 4, 3]
        """
        check_flag(reverse, "reverse")
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree, tree_key = self._tree(tx, namespace)
        start, stop = self._range(tree, bounds)
        return self._iterate(tx, tree, tree_key, start, stop, reverse)

    def _iterate(
        self, tx: Transaction, tree: Tree, tree_key: bytes, start: int, stop: int, reverse: bool
    ) -> Iterator[Item]:
        version = tx.versions.get(tree_key, 0)
        for entry, values in tree.iterate(start, stop, reverse):
            self._check(tx)  # cached nodes must not let an iterator outlive its transaction (or aggregate)
            if tx.versions.get(tree_key, 0) != version:
                raise TransactionError(
                    f"{self.name}: the namespace changed during iteration; collect the items "
                    "(list(...)) before changing them"
                )
            yield self._item(entry, values)

    def page(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        after: str | Item | Position | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> Page:
        """Up to ``limit`` items within the bounds, after the cursor of the previous page.

        The cursor is a position, so paging stays correct when items are inserted or deleted between
        pages. O(log n + limit).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> days = db.aggregate("days")
        >>> with db.write() as tx:
        ...     days.insert_many(tx, [(d, "x") for d in range(5)])
        5
        >>> with db.read() as tx:
        ...     first = days.page(tx, limit=3)
        ...     second = days.page(tx, limit=3, after=first.cursor)
        >>> [i.key for i in first.items], [i.key for i in second.items], second.done
        ([0, 1, 2], [3, 4], True)
        """
        if type(limit) is not int:  # (a numpy integer: its int)
            limit = as_int(limit, f"limit must be a positive int, not {_show(limit)}", BoundsTypeError)
        if limit < 1:
            raise BoundsError(f"limit must be a positive int, not {_show(limit)}")
        check_flag(reverse, "reverse")
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree, _ = self._tree(tx, namespace)
        start, stop = self._range(tree, bounds)
        if after is not None:
            entry = _entry_of(after) if isinstance(after, Item | Position) else _decode_cursor(after)
            if reverse:
                stop = min(stop, tree.rank(entry, False))
            else:
                start = max(start, tree.rank(entry, True))
        if reverse:
            first, last = max(start, stop - limit), stop
        else:
            first, last = start, min(stop, start + limit)
        items: list[Item] = []
        entries: list[bytes] = []
        for entry, values in tree.iterate(first, last, reverse):
            entries.append(entry)
            items.append(self._item(entry, values))
        done = (first <= start) if reverse else (last >= stop)
        cursor = _encode_cursor(entries[-1]) if entries else None
        return Page(items, cursor, done)

    def namespaces(
        self,
        tx: Transaction,
        *,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
        after: Any = _UNSET,
        limit: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[Any, Totals]]:
        """The non-empty namespaces with their totals, lazily, in key order (or reversed).

        The bounds are those of every read, on the namespace value: ``ge``/``gt``, ``le``/``lt``,
        ``prefix`` (tuple namespaces starting with these elements: ``prefix=("org", 7)`` gives
        ``("org", 7, "user", 3)``) or ``eq`` (namespaces equal in value: ``1`` and ``1.0``); a bound
        is a namespace value, not a Position. ``after=`` is the namespace a previous call yielded
        last: the namespaces strictly after it in the direction of iteration (``None`` is the
        default namespace, so leave ``after=`` out to start at the first). ``limit=`` stops after
        that many. Together they page through any number of namespaces::

            page = list(agg.namespaces(tx, prefix=("org", 7), limit=100))
            more = list(agg.namespaces(tx, prefix=("org", 7), after=page[-1][0], limit=100))

        O(log N + k) to yield k namespaces of N (one LMDB cursor seek, then one step each), each
        total O(1); the in-memory backend of ``open_memory()`` lists the keys within the bounds first.
        In a write transaction, add O(namespaces it changed) to start and to end.

        The iterator reads the transaction's snapshot; as for :meth:`items`, changing the aggregate
        while iterating raises TransactionError (at the next namespace, or at the end for a namespace
        already passed): collect them first, ``list(agg.namespaces(tx))``.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> usage = db.aggregate("usage", values=("tokens",))
        >>> with db.write() as tx:
        ...     usage.insert(tx, 1, "a", (100,), namespace=("org", 2))
        ...     usage.insert(tx, 2, "b", (50,), namespace=("org", 1, "user", 7))
        ...     usage.insert(tx, 3, "c", (25,), namespace=("org", 1, "user", 9))
        >>> with db.read() as tx:
        ...     for namespace, totals in usage.namespaces(tx, prefix=("org", 1)):
        ...         print(namespace, totals)
        ('org', 1, 'user', 7) Totals(count=1, tokens=50)
        ('org', 1, 'user', 9) Totals(count=1, tokens=25)
        >>> with db.read() as tx:
        ...     [space for space, _ in usage.namespaces(tx, after=("org", 2), reverse=True, limit=1)]
        [('org', 1, 'user', 9)]

        Raises BoundsError for conflicting bounds or a ``limit`` below 1, BoundsTypeError for a
        Position or Item as a bound or a ``limit`` that is not an int, InvalidKeyError /
        UnsupportedKeyTypeError for bounds (and an ``after``) that are not keys.
        """
        self._check(tx)
        check_flag(reverse, "reverse")
        if limit is not None:
            if type(limit) is not int:  # (a numpy integer: its int)
                limit = as_int(
                    limit, f"limit must be a positive int or None, not {_show(limit)}", BoundsTypeError
                )
            if limit < 1:
                raise BoundsError(f"limit must be a positive int or None, not {_show(limit)}")
        for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("eq", eq)):
            if isinstance(bound, Position | Item):
                raise BoundsTypeError(
                    f"namespaces() takes namespace values as bounds, not the {type(bound).__name__} "
                    f"{_show(bound)} ({name}=): a position is a place among the items of one namespace"
                )
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree_prefix = self._prefix
        start = tree_prefix if bounds.lower is None else tree_prefix + bounds.lower[0]
        stop = (self._id + 1).to_bytes(4, "big") if bounds.upper is None else tree_prefix + bounds.upper[0]
        if after is not _UNSET:
            tree_key = tree_prefix + encode_key(after, what="namespace")
            if reverse:
                stop = min(stop, tree_key)
            else:
                start = max(start, tree_key + b"\x00")  # the first key above it
        return self._namespaces(tx, start, stop, limit, reverse)

    def _namespaces(
        self, tx: Transaction, start: bytes, stop: bytes, limit: int | None, reverse: bool
    ) -> Iterator[tuple[Any, Totals]]:
        """The namespaces whose tree keys lie in ``[start, stop)``: the ROOTS records scanned from
        LMDB, merged in order with the roots a write transaction changed (which win)."""
        self._check(tx)  # the transaction may have ended since namespaces() was called
        offset = len(self._prefix)
        fields = self.fields
        width = 1 + 2 * len(fields)
        left = -1 if limit is None else limit
        if start >= stop:
            stored: Iterator[tuple[bytes, bytes]] = iter(())
        else:
            stored = tx.kv.scan(ROOTS, start, stop, reverse)
        if not isinstance(tx, WriteTransaction):  # a read transaction's snapshot never changes
            for key, data in stored:
                summary = decode_root(data).summary
                namespace, _ = decode_key(key, offset)
                if len(summary) != width:
                    raise _foreign_record(self.name, namespace)
                yield namespace, Totals.from_summary(fields, summary)
                self._check(tx)  # as _iterate: an iterator does not outlive its transaction (or aggregate)
                left -= 1
                if left == 0:
                    return
            return
        prefix = self._prefix
        pending = {key: root for key, root in tx.changed_roots().items() if key.startswith(prefix)}
        watch = _Watch(tx, prefix, pending)
        changed = sorted((key for key in pending if start <= key < stop), reverse=reverse)
        record = next(stored, None)  # the next stored record, not yet taken
        index = 0  # the next changed root, not yet taken
        last: bytes | None = None  # the tree yielded last
        while True:
            root: Root | None
            if index < len(changed):
                key = changed[index]
                if record is not None and (record[0] > key if reverse else record[0] < key):
                    key, taken = record[0], True
                    root = decode_root(record[1])
                else:  # a changed root, which replaces the stored record of its tree if there is one
                    root = pending[key]
                    index += 1
                    taken = record is not None and record[0] == key
            elif record is not None:
                key, taken = record[0], True
                root = decode_root(record[1])
            else:
                break
            if watch.changed(key, last):
                raise self._changed_during_namespaces()
            if root is not None:  # None: a tree this transaction emptied
                namespace, _ = decode_key(key, offset)
                if len(root.summary) != width:
                    raise _foreign_record(self.name, namespace)
                yield namespace, Totals.from_summary(fields, root.summary)
                self._check(tx)
                last = key
                left -= 1
                if left == 0:
                    break
            if taken:
                record = next(stored, None)
        if watch.any_changed():  # a namespace already passed, emptied one refilled
            raise self._changed_during_namespaces()

    def _changed_during_namespaces(self) -> TransactionError:
        return TransactionError(
            f"{self.name}: the aggregate changed during namespaces(); collect them "
            "(list(agg.namespaces(tx))) before changing it"
        )

    # ------------------------------------------------------------ writes

    def insert(
        self, tx: WriteTransaction, key: Any, id: Any, values: Any = (), *, namespace: Any = None
    ) -> None:
        """Insert one item. O(log n).

        Raises DuplicateItemError (a KeyError) if ``(key, id)`` is already in the namespace, and the
        key/value errors for bad input; in every case nothing changes. numpy integers, floats and bools
        are taken as the Python values they hold, in keys, ids, namespaces and values alike (see
        ``_keys``, "Other types that stand for these"), and read back as those.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events", values=("cost", "tokens"))
        >>> with db.write() as tx:
        ...     events.insert(tx, 1700000000, "evt_1", (0.25, 1200), namespace="user:42")
        ...     events.insert(tx, 1700000000, "evt_2", {"cost": 0.5, "tokens": 80}, namespace="user:42")
        >>> with db.write() as tx:
        ...     events.insert(tx, 1700000000, "evt_1", (0.25, 1200), namespace="user:42")
        Traceback (most recent call last):
        tallytree.errors.DuplicateItemError: events: item (key=1700000000, id='evt_1') already ...
        """
        wtx = self._writable(tx)
        entry = encode_entry(key, id)
        checked = self._values(values)
        tree_key = self._tree_key(namespace)
        current = wtx.root(tree_key)
        if current is not None:  # without loading the tree: a new event onto the pending node, or
            # a scattered one written in one call into the nodes
            root: Root | Literal[False] | None = None
            if current.pending_summary is not None:
                root = appended(wtx, current, self._capacity, entry, checked)
            if root is None:
                root = inserted(wtx, current, self.node_size, entry, checked)
            if root is not None:
                if root is False:
                    raise self._duplicate(key, id, namespace)
                wtx.set_root(tree_key, root)
                return
        tree = Tree(wtx, len(self.fields), self.node_size, current)  # the record already read
        if not tree.insert(entry, checked):
            raise self._duplicate(key, id, namespace)
        wtx.set_root(tree_key, tree.take_new_root())  # (an insert always changes the record)

    def delete(self, tx: WriteTransaction, key: Any, id: Any, *, namespace: Any = None) -> Item:
        """Remove one item and return it. O(log n).

        Raises ItemNotFoundError (a KeyError) if it is absent; use :meth:`discard` to allow that.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores", values=("points",))
        >>> with db.write() as tx:
        ...     scores.insert(tx, 10, "ann", (3,))
        ...     scores.delete(tx, 10, "ann")
        Item(key=10, id='ann', values=(3,))
        """
        wtx = self._writable(tx)
        entry = encode_entry(key, id)
        tree, tree_key = self._tree(wtx, namespace)
        values = tree.delete(entry)
        if values is None:
            raise self._not_found(key, id, namespace, "; use discard() to ignore missing items")
        self._save(wtx, tree_key, tree)
        return self._item(entry, values)

    def discard(self, tx: WriteTransaction, key: Any, id: Any, *, namespace: Any = None) -> bool:
        """Remove one item if present; return whether it was. Writes nothing if absent. O(log n).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores")
        >>> with db.write() as tx:
        ...     scores.insert(tx, 10, "ann")
        ...     scores.discard(tx, 10, "ann"), scores.discard(tx, 10, "ann")
        (True, False)
        """
        wtx = self._writable(tx)
        entry = encode_entry(key, id)
        tree, tree_key = self._tree(wtx, namespace)
        if tree.delete(entry) is None:
            return False
        self._save(wtx, tree_key, tree)
        return True

    def upsert(
        self, tx: WriteTransaction, key: Any, id: Any, values: Any = (), *, namespace: Any = None
    ) -> Literal["inserted", "updated", "unchanged"]:
        """Insert the item, or overwrite its values if it exists. O(log n).

        Returns what happened; when the stored values are already equal (same types too), nothing is
        written at all, so replaying the same upserts is free.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> quota = db.aggregate("quota", values=("used",))
        >>> with db.write() as tx:
        ...     [quota.upsert(tx, "2026-11", "org:1", (n,)) for n in (5, 7, 7)]
        ['inserted', 'updated', 'unchanged']
        """
        wtx = self._writable(tx)
        entry = encode_entry(key, id)
        checked = self._values(values)
        tree, tree_key = self._tree(wtx, namespace)
        old = tree.update(entry, checked)
        if old is None:
            tree.insert(entry, checked)
            self._save(wtx, tree_key, tree)
            return "inserted"
        if same_values(old, checked):
            return "unchanged"
        self._save(wtx, tree_key, tree)
        return "updated"

    def replace(
        self,
        tx: WriteTransaction,
        key: Any,
        id: Any,
        *,
        namespace: Any = None,
        new_key: Any = _KEEP,
        new_id: Any = _KEEP,
        new_values: Any = _KEEP,
        new_namespace: Any = _KEEP,
    ) -> Item:
        """Move an item to a new key, id, namespace and/or values, atomically; return the new item.

        Give at least one of ``new_key``, ``new_id``, ``new_namespace`` and ``new_values``; each one
        not given (shown as ``KEEP``) stays as it is. O(log n). Raises ItemNotFoundError if the item
        is absent and DuplicateItemError if the new position is taken, then nothing changes; and
        InvalidArgumentError when no ``new_*`` argument is given (to read an item, use :meth:`get`).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> loads = db.aggregate("loads", values=("weight",))
        >>> with db.write() as tx:
        ...     loads.insert(tx, ("open", 1), "L1", (900,), namespace="org:1")
        ...     loads.replace(tx, ("open", 1), "L1", namespace="org:1", new_key=("delivered", 1))
        Item(key=('delivered', 1), id='L1', values=(900,))
        >>> with db.read() as tx:
        ...     loads.count(tx, namespace="org:1", prefix=("open",))
        0
        """
        if new_key is _KEEP and new_id is _KEEP and new_values is _KEEP and new_namespace is _KEEP:
            raise InvalidArgumentError(
                f"{self.name}: replace() changes an item: give at least one of new_key=, new_id=, "
                "new_namespace= or new_values= (to read the item, use get(tx, key, id))"
            )
        wtx = self._writable(tx)
        entry = encode_entry(key, id)
        target_key = key if new_key is _KEEP else new_key
        target_id = id if new_id is _KEEP else new_id
        target_namespace = namespace if new_namespace is _KEEP else new_namespace
        target_entry = encode_entry(target_key, target_id)
        target_values = self._values(new_values) if new_values is not _KEEP else None
        tree, tree_key = self._tree(wtx, namespace)
        target_tree_key = self._tree_key(target_namespace)
        same_tree = target_tree_key == tree_key
        if same_tree and target_entry == entry:  # the item stays: only its values may change
            # the update finds the item itself, as the delete below does; absent, it changes nothing
            old = tree.find(entry) if target_values is None else tree.update(entry, target_values)
            if old is None:
                raise self._not_found(key, id, namespace, " to replace")
            self._save(wtx, tree_key, tree)
            return self._item(entry, old if target_values is None else target_values)
        target = tree if same_tree else self._tree(wtx, target_namespace)[0]
        if target.find(target_entry) is not None:
            if tree.find(entry) is None:  # both wrong: the missing item is the one reported
                raise self._not_found(key, id, namespace, " to replace")
            raise DuplicateItemError(
                f"{self.name}: cannot move to (key={target_key!r}, id={target_id!r}) in namespace "
                f"{target_namespace!r}: an item is already there"
            )
        # The delete finds the item itself (no lookup first: a move is two writes of scattered
        # items, and each lookup decodes a leaf); absent, it changes nothing.
        old = tree.delete(entry)
        if old is None:
            raise self._not_found(key, id, namespace, " to replace")
        self._save(wtx, tree_key, tree)
        values = target_values if target_values is not None else old
        if not same_tree:
            target = self._tree(wtx, target_namespace)[0]
        target.insert(target_entry, values)
        self._save(wtx, target_tree_key, target)
        return self._item(target_entry, values)

    def insert_many(
        self,
        tx: WriteTransaction,
        items: Iterable[Item | tuple[Any, ...]],
        *,
        namespace: Any = None,
        on_duplicate: Literal["error", "skip", "update"] = "error",
    ) -> int:
        """Insert many items in one call; return how many were inserted (or updated).

        ``items`` holds :class:`Item` objects or ``(key, id)`` / ``(key, id, values)`` tuples. Input
        is validated and encoded first (per column when the batch is uniform, item by item otherwise,
        which names the first bad item), sorted unless already in order, then merged into the tree
        once per touched node (``Tree.merge_sorted``): each touched leaf is rewritten once, so
        clustered batches cost about one leaf write per ``node_size`` items, and time-ordered ones
        (after the last item) are written as whole new leaves. ``on_duplicate`` says what to do with
        an item already present (or repeated in the batch): ``"error"`` raises DuplicateItemError and
        inserts nothing, ``"skip"`` keeps the stored one, ``"update"`` overwrites its values (upsert;
        an item whose stored values are already equal, types included, is not counted, as upsert()
        says "unchanged"). O(m log m + t log n) for ``m`` items landing in ``t`` leaves. The cyclic
        garbage collector is paused during the call, as during builds (see ``_gc``).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events", values=("cost",))
        >>> with db.write() as tx:
        ...     events.insert_many(tx, [(t, f"e{t}", (0.5,)) for t in range(1000)], namespace="u1")
        ...     events.insert_many(tx, [(0, "e0", (0.5,)), (1000, "e1000", (2.0,))],
        ...                        namespace="u1", on_duplicate="skip")
        1000
        1
        """
        if on_duplicate not in ("error", "skip", "update"):
            raise InvalidArgumentError(
                f"on_duplicate must be 'error', 'skip' or 'update', not {_show(on_duplicate)}"
            )
        wtx = self._writable(tx)
        with gc_paused():
            return self._insert_many(wtx, items, namespace, on_duplicate)

    def _insert_many(
        self,
        wtx: WriteTransaction,
        items: Iterable[Item | tuple[Any, ...]],
        namespace: Any,
        on_duplicate: Literal["error", "skip", "update"],
    ) -> int:
        batch = items if type(items) is list else list(iterator_of(items, f"{self.name}: insert_many", ITEMS))
        encoded = self._encode_batch(batch)
        entries, cols, keys, ids = encoded if encoded is not None else self._encode_items(batch)
        if not entries:
            return 0
        order: list[int] | None = None
        if not all(map(operator.lt, entries, islice(entries, 1, None))):  # not strictly ascending yet
            order = sort_order(entries)  # stable: first given first
            entries = list(map(entries.__getitem__, order))
            cols = [list(map(col.__getitem__, order)) for col in cols]
            equal = map(operator.eq, entries, islice(entries, 1, None))
            repeats = list(compress(range(1, len(entries)), equal))
            if repeats:
                if on_duplicate == "error":
                    second = order[repeats[0]]
                    raise DuplicateItemError(
                        f"{self.name}: item (key={keys[second]!r}, id={ids[second]!r}) appears twice in "
                        "the batch; nothing was inserted"
                    )
                # "skip" keeps the first of equal items, "update" the last
                dropped = set(repeats) if on_duplicate == "skip" else {at - 1 for at in repeats}
                kept = [at for at in range(len(entries)) if at not in dropped]
                entries = list(map(entries.__getitem__, kept))
                cols = [list(map(col.__getitem__, kept)) for col in cols]
                order = list(map(order.__getitem__, kept))
        tree, tree_key = self._tree(wtx, namespace)
        changed, conflict = tree.merge_sorted(entries, cols, on_duplicate)
        if conflict is not None:
            first = order[conflict] if order is not None else conflict
            raise DuplicateItemError(
                f"{self.name}: item (key={keys[first]!r}, id={ids[first]!r}) already exists in "
                f"namespace {namespace!r}; nothing was inserted (on_duplicate='skip' "
                "keeps existing items)"
            )
        self._save(wtx, tree_key, tree)  # even when nothing was new: pending inserts may have moved
        return changed

    def _encode_batch(self, batch: list[Any]) -> _Encoded | None:
        """insert_many's fast path: entries, value columns, keys and ids, encoded and checked per column.

        Taken when every item is a ``(key, id, values)`` tuple (``(key, id)`` without value fields)
        or an :class:`Item`, keys share one type and ids one type, values are tuples and every column
        passes ``valid_column`` (int64s and finite floats, all of which ``_values`` accepts); the
        encoders give the very bytes ``encode_key`` does. Anything else, an invalid item included (or
        an int beyond int64 that ``_values`` accepts), returns None: the item-by-item path then names
        the first bad item exactly as it would have, or takes it. O(m), mostly C-level passes.
        """
        nfields = len(self.fields)
        kinds = set(map(type, batch))
        values: list[Any] | None
        if kinds == {tuple}:
            lengths = set(map(len, batch))
            if lengths == {3}:
                keys, ids, values = (list(map(itemgetter(at), batch)) for at in range(3))
            elif lengths == {2} and not nfields:
                keys, ids, values = list(map(itemgetter(0), batch)), list(map(itemgetter(1), batch)), None
            else:
                return None
        elif kinds == {Item}:
            keys, ids, values = (list(map(attrgetter(name), batch)) for name in ("key", "id", "values"))
        else:
            return None
        cols: list[list[Any]] = []
        if values is not None:
            if set(map(type, values)) != {tuple} or set(map(len, values)) != {nfields}:
                return None
            cols = [list(map(itemgetter(field), values)) for field in range(nfields)]
            if not all(map(valid_column, cols)):
                return None
        try:
            encoded_keys = encode_keys(keys)
            encoded_ids = encode_ids(ids)
        except Error:
            return None
        if encoded_keys is None or encoded_ids is None:
            return None
        # operator's functions, not bytes.__add__ (a slot wrapper: twice the time, 0.8 ms per 5,000)
        return list(map(add, encoded_keys, encoded_ids)), cols, keys, ids

    def _encode_items(self, batch: list[Any]) -> _Encoded:
        """insert_many's item-by-item path: the same result as :meth:`_encode_batch`, or the first error."""
        entries: list[bytes] = []
        rows: list[tuple[int | float, ...]] = []
        keys: list[Any] = []
        ids: list[Any] = []
        for item in batch:
            key, item_id, values = self._unpack_item(item)
            entries.append(encode_entry(key, item_id))
            rows.append(self._values(values))
            keys.append(key)
            ids.append(item_id)
        cols = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in self.fields]
        return entries, cols, keys, ids

    def _unpack_item(self, item: Any) -> tuple[Any, Any, Any]:
        if isinstance(item, Item):
            return item.key, item.id, item.values
        if isinstance(item, tuple) and len(item) in (2, 3):
            return item[0], item[1], item[2] if len(item) == 3 else ()
        raise InvalidValueError(
            f"{self.name}: items are Item objects or (key, id[, values]) tuples, not {_show(item)}"
        )

    def delete_many(
        self,
        tx: WriteTransaction,
        items: Iterable[Item | tuple[Any, ...]],
        *,
        namespace: Any = None,
        missing: Literal["error", "skip"] = "error",
    ) -> int:
        """Remove many items in one call; return how many were removed.

        ``items`` holds :class:`Item` objects or ``(key, id)`` tuples (``(key, id, values)`` too, as
        :meth:`insert_many` takes them: the values are not looked at). ``missing`` says what to do
        with an item that is not in the namespace (or is repeated in the batch): ``"error"`` raises
        ItemNotFoundError naming the first one in input order and removes nothing, ``"skip"``
        passes over it, as :meth:`discard` does.

        The items are looked up in one pass down the tree, then removed in another
        (``Tree.find_sorted``, ``Tree.delete_sorted``): each touched leaf is searched once and loses
        all its items at once, in its stored bytes, a subtree that loses every item is dropped by
        id, and underfull nodes are merged or refilled once, bottom-up. Removing items one by one
        rewrites and rebalances a path per item. O(m log m + t log B + m) for ``m`` items in ``t``
        leaves, writing O(t log_B n) nodes. The cyclic garbage collector is paused during the call
        (see ``_gc``).

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events", values=("cost",))
        >>> with db.write() as tx:
        ...     events.insert_many(tx, [(t, f"e{t}", (0.5,)) for t in range(1000)], namespace="u1")
        ...     events.delete_many(tx, [(t, f"e{t}") for t in range(0, 1000, 2)], namespace="u1")
        ...     events.delete_many(tx, [(1, "e1"), (2, "e2")], namespace="u1", missing="skip")
        1000
        500
        1
        >>> with db.read() as tx:
        ...     events.totals(tx, namespace="u1")
        Totals(count=499, cost=249.5)
        """
        if missing not in ("error", "skip"):
            raise InvalidArgumentError(f"missing must be 'error' or 'skip', not {_show(missing)}")
        wtx = self._writable(tx)
        batch = items if type(items) is list else list(iterator_of(items, f"{self.name}: delete_many", ITEMS))
        entries: list[bytes] = []
        for item in batch:
            key, item_id, _ = self._unpack_item(item)
            entries.append(encode_entry(key, item_id))
        if not entries:
            return 0
        with gc_paused():
            order = sort_order(entries)  # stable: of equal items, the first given comes first
            unique: list[bytes] = []
            absent: list[int] = []  # input positions of items not there (or there once, given twice)
            firsts: list[int] = []
            previous = None
            for at in order:
                entry = entries[at]
                if entry == previous:
                    absent.append(at)
                else:
                    unique.append(entry)
                    firsts.append(at)
                previous = entry
            tree, tree_key = self._tree(wtx, namespace)
            values, edits = tree.find_sorted(unique)
            found = [entry for entry, held in zip(unique, values, strict=True) if held is not None]
            absent += [at for at, held in zip(firsts, values, strict=True) if held is None]
            if absent and missing == "error":
                first = min(absent)
                key, item_id, _ = self._unpack_item(batch[first])
                twice = entries[first] in found  # there, but given again
                hint = " (it is given twice in the batch)" if twice else ""
                raise self._not_found(
                    key,
                    item_id,
                    namespace,
                    f"{hint}; nothing was removed (missing='skip' passes over absent items)",
                )
            if found:
                tree.delete_sorted(found, edits)
                self._save(wtx, tree_key, tree)
        return len(found)

    def delete_range(
        self,
        tx: WriteTransaction,
        *,
        namespace: Any = None,
        ge: Any = None,
        gt: Any = None,
        le: Any = None,
        lt: Any = None,
        prefix: tuple[Any, ...] | None = None,
        eq: Any = None,
    ) -> Totals:
        """Remove every item within the bounds; return the totals of what was removed.

        Subtrees entirely inside the bounds are dropped without reading their items:
        O(log n + nodes removed). To keep a copy, read ``items()`` with the same bounds first.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events", values=("cost",))
        >>> with db.write() as tx:
        ...     events.insert_many(tx, [(day, f"e{day}", (1.0,)) for day in range(400)])
        ...     events.delete_range(tx, lt=35)
        400
        Totals(count=35, cost=35.0)
        >>> with db.read() as tx:
        ...     events.count(tx), events.min(tx).key
        (365, 35)
        """
        wtx = self._writable(tx)
        bounds = resolve_bounds(ge, gt, le, lt, prefix, eq)
        tree, tree_key = self._tree(wtx, namespace)
        start, stop = self._range(tree, bounds)
        if start >= stop:
            return Totals.from_summary(self.fields, tree.zero())
        removed = tree.delete_range(start, stop)
        self._save(wtx, tree_key, tree)
        return Totals.from_summary(self.fields, removed)

    def clear(self, tx: WriteTransaction, *, namespace: Any = None) -> Totals:
        """Remove every item of one namespace; return the totals of what was removed.

        O(nodes removed): leaves are dropped by id without being read.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events")
        >>> with db.write() as tx:
        ...     events.insert_many(tx, [(n, "e") for n in range(50)], namespace="old")
        ...     events.clear(tx, namespace="old")
        50
        Totals(count=50)
        >>> with db.read() as tx:
        ...     events.count(tx, namespace="old"), list(events.namespaces(tx))
        (0, [])
        """
        return self.delete_range(tx, namespace=namespace)

    # ------------------------------------------------------------ buckets

    def buckets(
        self,
        tx: Transaction,
        *,
        namespace: Any = None,
        start: Any = None,
        width: Any = None,
        count: int | None = None,
        edges: Iterable[Any] | None = None,
        prefix: tuple[Any, ...] | None = None,
    ) -> list[Bucket]:
        """The totals of consecutive half-open key ranges, in one call: O((buckets + 1) log n).

        Give ``start``, ``width`` and ``count`` for ``count`` buckets of ``width`` from ``start``, or
        explicit ascending ``edges=[e0, e1, ..., ek]`` for the ``k`` buckets ``[e0, e1) ... [e(k-1),
        ek)``. Each edge bounds like ``ge=``, so the buckets add up exactly to ``totals(ge=e0,
        lt=ek)``. Every bucket is returned, empty ones too (count 0, sums 0, ``mean()`` None), and a
        bucket reads like Totals: ``b.count``, ``b["cost"]`` or ``b.cost``. With ``prefix=(p, ...)``,
        keys are tuples and each edge ``e`` means the key ``(p, ..., e)``: buckets over the last
        element within one prefix (e.g. per day within ``("open",)``).

        The first edge is ``start`` itself, as given (its ``fold`` too; a numpy number is the Python
        number it holds, as in ``width`` and ``edges``, and ``count`` may be a numpy integer). Widths:

        * Numeric keys (epoch seconds, amounts) take a number. An int start with an int width, or
          with a whole float width (``1e9`` on epoch nanoseconds), gives exact int edges; otherwise
          each edge is ``start + i*width`` rounded once to a float, and a fractional width on an int
          start whose edges pass 2**53 (where floats skip ints) is refused: use an int width.
        * Datetime keys take a ``timedelta``, or ``"hour"``, ``"day"``, ``"week"``, ``"month"``,
          ``"quarter"``, ``"year"`` (in any case), or ``(unit, n)`` such as ``("month", 3)``. Whole
          days, weeks and the month units step the local calendar of the start's zone: with a
          ``zoneinfo`` zone a day is 23 or 25 hours long at a DST change, and a start on the 31st
          steps to the last day of shorter months. Any other width steps real time, so every bucket
          is exactly that long (the fall-back day has 25 hourly buckets). A local edge in a
          repeated hour is its first pass, and one in a skipped hour moves forward by the gap
          (02:30 becomes 03:30), as ``datetime`` arithmetic (``fold=0``) does; edges come back as
          ``astimezone`` shows them.

        >>> import tallytree
        >>> from datetime import datetime, timedelta, timezone
        >>> db = tallytree.open_memory()
        >>> calls = db.aggregate("calls", values=("cost",))
        >>> day0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
        >>> with db.write() as tx:
        ...     calls.insert_many(tx, [(day0 + timedelta(hours=7 * i), i, (0.5,)) for i in range(10)])
        10
        >>> with db.read() as tx:
        ...     days = calls.buckets(tx, start=day0, width="day", count=4)
        >>> [(b.start.day, b.count, b.cost) for b in days]
        [(1, 4, 2.0), (2, 3, 1.5), (3, 3, 1.5), (4, 0, 0)]

        Raises BoundsError for a bad width or count, an unknown unit, a width that does not fit the
        start's type (a unit or a timedelta for numbers, a number for datetimes), edges that
        decrease and buckets that run past what a key can be (the year 9999, the largest float);
        BoundsTypeError (an ArgumentTypeError and a BoundsError) for a count, width, ``edges`` or
        ``prefix`` of the wrong type; and InvalidKeyError (a naive datetime, NaN) or
        UnsupportedKeyTypeError for a ``start`` or an edge that is no key, naming ``start=`` or
        ``edges=``; BoundKeyTypeError for edges of another type than every key of the namespace.
        """
        keys = bucket_edges(start, width, count, edges)
        if prefix is not None and not isinstance(prefix, tuple):
            raise BoundsTypeError(f"prefix= takes a tuple of leading key elements, not {_show(prefix)}")
        bodies = [encode_body((*prefix, key) if prefix is not None else key) for key in keys]
        for index in range(1, len(bodies)):
            if bodies[index] < bodies[index - 1]:
                raise BoundsError(
                    f"{self.name}: bucket edges must not decrease: {_show(keys[index - 1])} then "
                    f"{_show(keys[index])}"
                )
        tree = self._reader(tx, namespace)
        if bodies:
            self._check_bounds(tree, _Bounds((bodies[0], False), (bodies[-1], False)), names=_EDGE_NAMES)
        fields = self.fields
        if tree.root is None:
            empty = Totals.from_summary(fields, tree.zero())
            return [Bucket(keys[index], keys[index + 1], empty) for index in range(len(keys) - 1)]
        below: list[list[int]] = []
        for index, body in enumerate(bodies):
            if index and body == bodies[index - 1]:
                below.append(below[-1])
            else:
                below.append(tree.prefix_summary(body, False))
        buckets = []
        for index in range(len(keys) - 1):
            totals = Totals.from_summary(fields, vsub(below[index + 1], below[index]))
            buckets.append(Bucket(keys[index], keys[index + 1], totals))
        return buckets

    # ------------------------------------------------------------ bulk building

    def build(
        self,
        tx: WriteTransaction,
        items: Iterable[Item | tuple[Any, ...]],
        *,
        namespace: Any = None,
        sorted: bool = False,
        replace: bool = True,
        on_duplicate: OnDuplicate = "error",
        fill: float = DEFAULT_FILL,
        memory: int = DEFAULT_MEMORY,
        on_invalid: Callable[[int, Exception], None] | None = None,
    ) -> BuildReport:
        """Build a namespace's tree bottom-up from many items: the fast way to load existing data.

        ``items`` holds :class:`Item` objects or ``(key, id)`` / ``(key, id, values)`` tuples, in any
        order (``sorted=True`` promises (key, id) order: nothing is buffered, and an item out of order
        raises UnsortedInputError naming both). Unsorted input is sorted in memory up to ``memory``
        bytes, beyond that in runs spilled to temporary files and merged. Each node is written once,
        ``fill`` full (0.5 to 1.0), in key order. ``replace=True`` (the default) replaces what the
        namespace held; ``replace=False`` merges with it (one pass over the stored items: O(n + m),
        for small additions to a large namespace :meth:`insert_many` is cheaper). A repeated (key, id)
        raises DuplicateItemError naming both items, or with ``on_duplicate="last"`` the last one
        wins (over a stored item too). An invalid item raises (naming it by its position in
        ``items``) unless ``on_invalid(position, error)`` is given, which is then called and the item
        skipped. Everything happens in ``tx``: readers see the old tree until the commit, and a build
        that raises has changed nothing, as for every write. O(m) node writes, plus O(m log m) to sort.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> scores = db.aggregate("scores", values=("points",))
        >>> with db.write() as tx:
        ...     scores.build(tx, [(k % 7, f"u{k}", (k,)) for k in range(1000)])
        BuildReport(items=1000, namespaces=1, duplicates=0, invalid=0, cleared=0)
        >>> with db.read() as tx:
        ...     scores.count(tx, ge=5), scores.totals(tx).points, tallytree.check(tx)
        (285, 499500, [])

        Raises DuplicateItemError, UnsortedInputError, and the key and value errors of insert().
        """
        wtx = self._writable(tx)
        return _bulk_build(
            self,
            wtx,
            items,
            namespace=namespace,
            sorted=sorted,
            replace=replace,
            on_duplicate=on_duplicate,
            fill=fill,
            memory=memory,
            on_invalid=on_invalid,
            item_type=Item,
        )

    def build_many(
        self,
        tx: WriteTransaction,
        rows: Iterable[tuple[Any, ...]],
        *,
        sorted: bool = False,
        replace: bool = True,
        on_duplicate: OnDuplicate = "error",
        clear_others: bool = False,
        fill: float = DEFAULT_FILL,
        memory: int = DEFAULT_MEMORY,
        on_invalid: Callable[[int, Exception], None] | None = None,
    ) -> BuildReport:
        """Build the trees of many namespaces from one stream of ``(namespace, key, id[, values])`` rows.

        Rows are grouped by namespace (sorted by namespace, key and id, externally if they exceed
        ``memory``; ``sorted=True`` promises that order) and each namespace is built as by
        :meth:`build`, with the same options. Namespaces absent from ``rows`` are left alone, or
        emptied with ``clear_others=True`` (the aggregate then holds exactly ``rows``). All or
        nothing: the new trees replace the old ones only once every namespace is built, so a build
        that raises has changed nothing. O(m) node writes, plus O(m log m) to sort.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> events = db.aggregate("events", values=("cost",))
        >>> rows = [(f"user:{n % 3}", n, f"e{n}", (0.5,)) for n in range(30)]
        >>> with db.write() as tx:
        ...     events.build_many(tx, rows).namespaces
        3
        >>> with db.read() as tx:
        ...     events.totals(tx, namespace="user:1")
        Totals(count=10, cost=5.0)
        """
        wtx = self._writable(tx)
        return _bulk_build_many(
            self,
            wtx,
            rows,
            sorted=sorted,
            replace=replace,
            on_duplicate=on_duplicate,
            clear_others=clear_others,
            fill=fill,
            memory=memory,
            on_invalid=on_invalid,
        )
