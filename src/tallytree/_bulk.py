"""Bulk building: a namespace's tree written bottom-up, once per node, from items in key order.

Design
======
Inserting ``n`` items one at a time visits O(n log n) nodes and rewrites each leaf many times. A bulk
build writes every node exactly once, in key order, leaves first::

    items --> validate + encode --> sort --> duplicates --> leaves --> level 2 --> ... --> root
              (whole batches at      (in memory, or runs   (error naming both rows,
               once: one pass per     spilled to temporary  or keep the last)
               column, not per item)  files, then merged)

    level 2          [ b""  | e4   | e8   ]      fence, child id, count and exact sums per child
                      /        |       \\
    leaves     [e0 e1 e2 e3] [e4 .. e7] [e8 e9 e10]      entries in order, one value column per field

**Packing.** Each level is a stream: children arrive in key order, and a node of ``t`` children (``t =
fill * node_size``, 0.9 by default, the leaf fill factor PostgreSQL's index builds use, which leaves
room for later inserts) is written as soon as at least ``t + node_size`` children are pending. What is
still pending at the end, between ``node_size`` and ``t + node_size`` children, is cut into one to
three nodes of even size, so every node but the root holds ``node_size // 2`` to ``node_size`` entries,
the last ones included (the "rebalance the last two" step of classic bulk loading). A level that ends
with a single node has made the root; the first node of each level has the fence ``b""``, as the
leftmost spine of an insert-built tree has. Nodes get ascending ids as they are written, so the commit
writes them with LMDB's append path. The tree is identical in content to one built by inserts (same
items, same exact sums), and the checker accepts it; only the node boundaries differ.

**Input.** Items are ``(key, id, values)`` tuples or :class:`~tallytree.Item` objects (``(namespace, key,
id, values)`` rows for :func:`build_many`). They are taken in batches: a batch whose keys all have one
type (int, float, str, bytes, UTC datetime), whose ids are all ints, strs or bytes, and whose values
are tuples of ints and finite floats is validated and encoded column by column (a handful of C-level
passes per column), to the very bytes ``encode_key`` gives; anything else takes the item-by-item path,
which is also the one that names a bad item. Int keys and ids below ``2**56`` in magnitude are encoded
as SIMD within a register (:func:`_int_lanes`): one Python int holds a 12-byte lane per value, the
7-bit groups, "more" bits and complements are computed by a few dozen big-int operations for the whole
slice, and ``struct.unpack`` cuts the keys out, so no Python code runs per value. Attaching an
aggregate to a table enters below the encoder (:func:`build_columns`): the extractors give encoded,
validated columns, split per namespace batch by batch, so items already in key order within their
namespace (an event log) are written without any sort.

**Sorting.** ``sorted=True`` streams: input is checked as it goes (an item out of order raises
:class:`~tallytree.errors.UnsortedInputError` naming both items) and nothing is buffered. Otherwise items
are buffered up to ``memory`` bytes (estimated), sorted (a stable sort, so among equal items the last
one given stays last) and, when the input is larger, spilled as sorted runs to temporary files
(msgpack blocks) and merged block by block (:func:`_merge`: one C-level sort per step instead of a
Python step per item); runs that do not overlap (input that was in order anyway) are concatenated.
Rows of many namespaces are sorted by (namespace, key, id), so each namespace is built in turn, one
tree writer at a time.

**Atomicity.** Everything happens inside the caller's write transaction, and nothing is visible to
readers until the commit: an exception, Ctrl-C or ``kill -9`` before it leaves the database as it was,
and the build can simply be run again. Within the transaction too, a build is all or nothing: the
new trees replace the old ones (which ``Tree.delete_range`` frees by node id) only once every
namespace is built, and a build that raises drops the nodes it wrote, so a caller that catches the
error and commits commits nothing of it. Written nodes are kept in the transaction in their encoded
form (:meth:`~tallytree.WriteTransaction.adopt_encoded`), so a build holds about the size of the new
tree on disk, plus the sort buffer for unsorted input.

Cost: O(n) node writes for sorted input plus O(n log n) comparisons to sort; O(height x node_size)
pending state per tree.
"""

from __future__ import annotations

import math
import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from itertools import islice, pairwise, repeat
from operator import add, attrgetter, floordiv, itemgetter, le, lshift, lt, neg, sub
from typing import IO, TYPE_CHECKING, Any, Literal

import msgpack

from ._args import ITEMS, as_int, check_flag, iterator_of
from ._btree import Root
from ._gc import gc_paused
from ._keys import (
    MAX_KEY_BYTES,
    _show,
    decode_key,
    encode_body,
    encode_entry,
    encode_key,
    sort_order,
)
from ._native import speedups
from ._node import Node, encode_node, summarize
from ._tree import Tree
from ._txn import WriteTransaction
from .errors import (
    ArgumentTypeError,
    DuplicateItemError,
    Error,
    InvalidArgumentError,
    InvalidValueError,
    UnsortedInputError,
)

if TYPE_CHECKING:
    from tempfile import TemporaryDirectory

    from ._aggregate import Aggregate

__all__ = [
    "DEFAULT_FILL",
    "DEFAULT_MEMORY",
    "BuildReport",
    "Columns",
    "OnDuplicate",
    "Spool",
    "build",
    "build_columns",
    "build_many",
    "encode_ids",
    "encode_keys",
    "sorted_items",
    "valid_column",
]

DEFAULT_FILL = 0.9
"""Share of ``node_size`` each built node holds (PostgreSQL's leaf fill factor for index builds)."""
DEFAULT_MEMORY = 256 * 2**20
"""Bytes of (estimated) item data an unsorted build sorts in memory before spilling runs to disk."""

OnDuplicate = Literal["error", "last"]

_BATCH = 32_768
_BLOCK = 8_192
_SPOOL = 65_536  # items a Spool holds in memory before it writes them to its file
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_FAST_INT_LIMIT = 1 << 56  # ints the lanes take (eight 7-bit fraction groups at most)
_WIDE_INT_LIMIT = 1 << 63  # ints the loop takes (nine groups at most): 64-bit ids, snowflakes
_ITEM_OVERHEAD = 120  # estimated bytes per buffered item besides its entry: objects and list slots
_VALUE_OVERHEAD = 40

Label = Callable[[int], str]
Progress = Callable[[str, int], None]
OnInvalid = Callable[[int, Exception], None]


def _default_label(position: int) -> str:
    return f"item {position}"


@dataclass(frozen=True, slots=True)
class BuildReport:
    """What a bulk build did.

    ``items`` and ``namespaces`` count what the built namespaces now hold; ``duplicates`` the input
    items dropped by ``on_duplicate="last"`` (and existing items replaced when merging); ``invalid``
    the items passed to ``on_invalid`` and skipped; ``cleared`` the namespaces emptied by
    ``clear_others=True``.
    """

    items: int
    namespaces: int
    duplicates: int = 0
    invalid: int = 0
    cleared: int = 0


# ---------------------------------------------------------------- column encoders
#
# Each returns exactly ``[encode_key(value) for value in values]`` (tests compare them on random
# input), or None when the batch is outside what it handles; the caller then encodes item by item.

_GROUPS = tuple(((1 << (8 * groups)) - 256) // 255 for groups in range(10))  # "more" bits of g bytes
_ONES = tuple((1 << (8 * groups)) - 1 for groups in range(10))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DATETIME_BIAS = 1 << 63


@cache
def _heads() -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Type code and exponent bytes of positive and negative numbers, by binary exponent."""
    positive = {exponent: encode_body(2.0**exponent)[:-1] for exponent in range(-1022, 1024)}
    negative = {exponent: encode_body(-(2.0**exponent))[:-1] for exponent in range(-1022, 1024)}
    return positive, negative


def _spread(fraction: int) -> tuple[int, int]:
    """Continuation-coded 7-bit groups of a 56-bit left-aligned fraction, and their byte count."""
    if not fraction:
        return 0, 1
    # spread the 56 bits into eight 7-bit groups, one per byte, the first group highest
    bits = (fraction & 0xFFFFFFF) | ((fraction >> 28) << 32)
    bits = (bits & 0x00003FFF00003FFF) | ((bits & 0x0FFFC0000FFFC000) << 2)
    bits = (bits & 0x007F007F007F007F) | ((bits & 0x3F803F803F803F80) << 1)
    dropped = ((bits & -bits).bit_length() - 1) >> 3  # trailing all-zero groups are not written
    return ((bits << 1) >> (8 * dropped)) | _GROUPS[8 - dropped], 8 - dropped


def _int_keys(values: Sequence[int]) -> list[bytes]:
    if speedups is not None and (keys := speedups.int_keys(values)) is not None:
        return keys  # the C twin of what follows, for ints in the int64 range (see _native)
    out: list[bytes] = []
    for start in range(0, len(values), _LANES):
        part = values[start : start + _LANES]
        low, high = min(part), max(part)
        if not (low > -_FAST_INT_LIMIT and high < _FAST_INT_LIMIT):
            wide = low > -_WIDE_INT_LIMIT and high < _WIDE_INT_LIMIT
            out += _int_keys_loop(part) if wide else map(encode_key, part)
        elif low >= 2:
            out += _int_lanes(part, low, high)
        elif high <= -2:
            out += _int_lanes(part, -high, -low)
        else:  # a slice with -1, 0 or 1, or with both signs
            out += _int_keys_loop(part)
    return out


# Int keys as SIMD within a register, the register being one Python int of 96 bits per value: each
# value gets a *lane* of 12 bytes, ``[head: 33 81 EE][fraction: 8 bytes][terminator: 00]``, and every
# step below is one C-level operation on the whole int (a few ns per value), not a Python step per
# value. The fraction area holds the 56-bit left-aligned fraction, whose 7-bit groups are spread one
# per byte, given their "more" bits, and complemented for negatives; the keys are then cut from the
# lanes by one ``struct.unpack`` whose layout skips each lane's unused bytes.

_LANES = 8_192  # values per lane int: 96 KiB, small enough to stay in the CPU caches
_LANE = 12
_LANE_SHIFTS = tuple(57 - size for size in range(58))  # puts the leading one of a value at bit 56
# The struct layout cutting a key of ``size`` fraction bytes from its lane, ``f"{size + 4:>2}s{8 - size}x"``
# (spaces are allowed in struct layouts), written a character column at a time by bytes.translate.
_LAYOUT_TENS = bytes.maketrans(bytes(range(9)), b"".join(f"{size + 4:>2}"[:1].encode() for size in range(9)))
_LAYOUT_UNITS = bytes.maketrans(bytes(range(9)), b"".join(f"{size + 4:>2}"[1:].encode() for size in range(9)))
_LAYOUT_SKIPS = bytes.maketrans(bytes(range(9)), b"".join(str(8 - size).encode() for size in range(9)))


@lru_cache(maxsize=4)
def _lane_masks(count: int) -> tuple[int, ...]:
    """Masks repeated in each of ``count`` lanes (built once per batch size)."""

    def lanes(pattern: int) -> int:
        return int.from_bytes(pattern.to_bytes(_LANE) * count)

    def fraction(pattern: int) -> int:
        return lanes(pattern << 8)

    return (
        fraction(0x0FFFFFFF),
        fraction(0x00FFFFFFF0000000),
        fraction(0x00003FFF00003FFF),
        fraction(0x0FFFC0000FFFC000),
        fraction(0x007F007F007F007F),
        fraction(0x3F803F803F803F80),
        fraction(0x7F7F7F7F7F7F7F7F),
        fraction(0x8080808080808080),
        lanes(1 << 95),  # a guard bit that stops the borrow of a lane with a zero fraction
        lanes(1),
        lanes(0xFF << 8),
        lanes(1 << 8),
        fraction(0x80 << 56),
        lanes(1 << 72),
    )


@lru_cache(maxsize=4)
def _lane_formats(count: int) -> tuple[str, str]:
    return ">" + "3xQx" * count, ">" + "2xB9x" * count


def _int_lanes(values: Sequence[int], low: int, high: int) -> list[bytes]:
    """``encode_key`` of ints all ``>= 2`` or all ``<= -2``, below ``2**56`` in magnitude; ``low`` and
    ``high`` are the smallest and largest magnitude."""
    count = len(values)
    a1, b1, a2, b2, a3, b3, k7f, k80, guard, ones, low_byte, low_bit, top, head_unit = _lane_masks(count)
    plain, exponents = _lane_formats(count)
    negative = values[0] < 0
    magnitudes = list(map(neg, values)) if negative else values
    low, high = low.bit_length(), high.bit_length()
    if low == high:  # one exponent: one shift, one head for every lane
        lanes = int.from_bytes(struct.pack(plain, *magnitudes)) << (57 - low)
        heads = head_unit * ((0x317F00 - low) if negative else (0x3380FF + low))
    else:
        sizes = list(map(int.bit_length, magnitudes))
        shifted = map(lshift, magnitudes, map(_LANE_SHIFTS.__getitem__, sizes))
        lanes = int.from_bytes(struct.pack(plain, *shifted))
        sizes_lanes = int.from_bytes(struct.pack(exponents, *sizes))
        heads = head_unit * 0x317F00 - sizes_lanes if negative else head_unit * 0x3380FF + sizes_lanes
    # heads: 33 81 (E) for positives, 31 7e (ff - E) for negatives, with E = bit_length - 1 >= 1
    bits = (lanes & a1) | ((lanes & b1) << 4)  # the leading one (bit 56) is dropped here
    bits = (bits & a2) | ((bits & b2) << 2)
    spread = ((bits & a3) << 1) | ((bits & b3) << 2)  # 7-bit groups, one per byte, shifted left by one
    nonzero = (((spread >> 1) + k7f) & k80) | guard  # 0x80 in each byte whose group is not zero
    lowest = nonzero ^ (nonzero - ones)  # every bit up to the lowest nonzero byte's flag
    more = (lowest & k80) ^ k80  # 0x80 in each byte with a nonzero byte after it
    spread |= more >> 7
    if negative:
        kept = (more | (more >> 8) | top) & k80
        spread ^= (kept >> 7) * 0xFF
    sizes_lanes = ((((more >> 7) * 0x0101010101010101) >> 56) & low_byte) + low_bit
    fraction_sizes = sizes_lanes.to_bytes(_LANE * count)[_LANE - 2 :: _LANE]  # one byte per lane
    cut = bytearray(b"s" * (5 * count))
    cut[0::5] = fraction_sizes.translate(_LAYOUT_TENS)
    cut[1::5] = fraction_sizes.translate(_LAYOUT_UNITS)
    cut[3::5] = fraction_sizes.translate(_LAYOUT_SKIPS)
    cut[4::5] = b"x" * count
    return list(struct.unpack(">" + cut.decode(), (spread | heads).to_bytes(_LANE * count)))


def _int_keys_loop(values: Sequence[int]) -> list[bytes]:
    """One int at a time (ints with ``|v| < 2**63``): for slices that :func:`_int_lanes` does not take."""
    positive, negative = _heads()
    groups, ones = _GROUPS, _ONES
    zero = encode_key(0)
    out: list[bytes] = []
    append = out.append
    for value in values:  # _spread inlined: this loop is the hot path of int keys and ids
        if value > 0:
            heads, magnitude = positive, value
        elif value < 0:
            heads, magnitude = negative, -value
        else:
            append(zero)
            continue
        exponent = magnitude.bit_length() - 1
        if exponent <= 56:  # up to eight groups: the fraction, left-aligned on 56 bits
            fraction, low, width = (magnitude << (56 - exponent)) & 0xFFFFFFFFFFFFFF, 0, 8
        else:  # nine: the first eight from the top 56 of 63 bits, the ninth from the last 7
            wide = (magnitude ^ (1 << exponent)) << (63 - exponent)
            fraction, low, width = wide >> 7, wide & 0x7F, 9
        if fraction or low:
            bits = (fraction & 0xFFFFFFF) | ((fraction >> 28) << 32)
            bits = (bits & 0x00003FFF00003FFF) | ((bits & 0x0FFFC0000FFFC000) << 2)
            bits = (bits & 0x007F007F007F007F) | ((bits & 0x3F803F803F803F80) << 1)
            if width == 9:
                bits = (bits << 8) | low
            dropped = ((bits & -bits).bit_length() - 1) >> 3
            size = width - dropped
            spread = ((bits << 1) >> (8 * dropped)) | groups[size]
        else:
            size, spread = 1, 0
        if heads is negative:
            spread ^= ones[size]
        append(heads[exponent] + spread.to_bytes(size) + b"\x00")
    return out


def _float_keys(values: Sequence[float]) -> list[bytes]:
    positive, negative = _heads()
    count = len(values)
    raws = struct.unpack(f">{count}Q", struct.pack(f">{count}d", *values))
    out: list[bytes] = []
    append = out.append
    for value, raw in zip(values, raws, strict=True):
        biased = (raw >> 52) & 0x7FF
        if biased in (0, 0x7FF):  # zero, subnormal, infinity or NaN: the general encoder
            append(encode_key(value))
            continue
        spread, size = _spread((raw & 0xFFFFFFFFFFFFF) << 4)
        if raw >> 63:
            append(negative[biased - 1023] + (spread ^ _ONES[size]).to_bytes(size) + b"\x01")
        else:
            append(positive[biased - 1023] + spread.to_bytes(size) + b"\x01")
    return out


def _text_keys(values: Sequence[str]) -> list[bytes] | None:
    if speedups is not None and (keys := speedups.text_keys(values, MAX_KEY_BYTES - 2)) is not None:
        return keys  # the C twin of what follows (see _native)
    if "\x00" in "".join(values):
        return None
    try:
        data = list(map(str.encode, values))
    except UnicodeEncodeError:
        return None
    if max(map(len, data)) > MAX_KEY_BYTES - 2:
        return None
    return list(map(b"\x40%b\x00".__mod__, data))


def _bytes_keys(values: Sequence[bytes]) -> list[bytes] | None:
    if b"\x00" in b"".join(values) or max(map(len, values)) > MAX_KEY_BYTES - 2:
        return None
    return list(map(b"\x50%b\x00".__mod__, values))


def _datetime_keys(values: Sequence[datetime]) -> list[bytes] | None:
    if speedups is not None and (keys := speedups.datetime_keys(values)) is not None:
        return keys  # the C twin of what follows, for datetimes in datetime.UTC (see _native)
    if set(map(attrgetter("tzinfo"), values)) != {UTC}:
        return None  # naive or another zone: the item-by-item path converts or rejects them
    micros = map(floordiv, map(sub, values, repeat(_EPOCH)), repeat(_MICROSECOND))
    # 9-byte lanes [60][micros as int64]: flipping the sign bit adds the 2**63 bias to every lane
    pack, head, cut = _datetime_lanes(len(values))
    lanes = int.from_bytes(pack(*micros)) ^ head
    return list(cut(lanes.to_bytes(9 * len(values))))


@lru_cache(maxsize=4)
def _datetime_lanes(count: int) -> tuple[Callable[..., bytes], int, Callable[[bytes], tuple[bytes, ...]]]:
    head = int.from_bytes(b"\x60\x80" + bytes(7)) * int.from_bytes((b"\x00" * 8 + b"\x01") * count)
    return struct.Struct(">" + "xq" * count).pack, head, struct.Struct(">" + "9s" * count).unpack


def encode_keys(values: Sequence[Any]) -> list[bytes] | None:
    """``[encode_key(v) for v in values]`` for a batch of one common key type, fast; else None.

    Raises what ``encode_key`` raises for an invalid key (the caller then finds which one).

    >>> encode_keys([3, 1]) == [encode_key(3), encode_key(1)]
    True
    >>> encode_keys([1, "a"]) is None  # mixed types: encode item by item
    True
    """
    if not values:
        return []
    kinds = set(map(type, values))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is int:
        return _int_keys(values)
    if kind is str:
        return _text_keys(values)
    if kind is datetime:
        return _datetime_keys(values)
    if kind is float:
        return _float_keys(values)
    if kind is tuple:
        return list(map(encode_key, values))
    if kind is bytes:
        return _bytes_keys(values)
    return None


def encode_ids(values: Sequence[Any]) -> list[bytes] | None:
    """``[encode_id(v) for v in values]`` for a batch of all-int, all-str or all-bytes ids; else None."""
    if values and type(values[0]) not in (int, str, bytes):
        return None
    return encode_keys(values)  # ids encode like keys; encode_keys checks that all share one type


def valid_column(column: list[Any]) -> bool:
    """Whether every value is an int in the int64 range or a finite float (conservative, fast)."""
    kinds = set(map(type, column))
    if not kinds <= {int, float}:
        return False
    if float in kinds and not math.isfinite(sum(column)):
        return False  # an inf or NaN (or a sum that overflows: then the slow path decides)
    return int not in kinds or (min(column) >= _INT64_MIN and max(column) <= _INT64_MAX)


# ---------------------------------------------------------------- encoded chunks


class _Chunk:
    """Validated, encoded items: parallel lists (namespaces only for multi-namespace builds)."""

    __slots__ = ("cols", "entries", "namespaces", "positions")

    def __init__(
        self,
        namespaces: list[bytes] | None,
        entries: list[bytes],
        positions: Sequence[int],
        cols: list[list[Any]],
    ) -> None:
        self.namespaces = namespaces
        self.entries = entries
        self.positions = positions
        self.cols = cols

    def __len__(self) -> int:
        return len(self.entries)

    def size(self, nfields: int) -> int:
        """Estimated bytes held by the chunk's objects."""
        return sum(map(len, self.entries)) + len(self.entries) * (_ITEM_OVERHEAD + _VALUE_OVERHEAD * nfields)

    def slice(self, start: int, stop: int) -> _Chunk:
        """The items ``start:stop``."""
        namespaces = self.namespaces
        return _Chunk(
            namespaces[start:stop] if namespaces is not None else None,
            self.entries[start:stop],
            self.positions[start:stop],
            [col[start:stop] for col in self.cols],
        )

    def take(self, order: Sequence[int]) -> _Chunk:
        """The chunk's items in the order of these indexes."""
        namespaces = self.namespaces
        return _Chunk(
            list(map(namespaces.__getitem__, order)) if namespaces is not None else None,
            list(map(self.entries.__getitem__, order)),
            list(map(self.positions.__getitem__, order)),
            [list(map(col.__getitem__, order)) for col in self.cols],
        )


class _Encoder:
    """Turns batches of user items into chunks, fast per column, or item by item when needed."""

    def __init__(
        self,
        aggregate: Aggregate,
        namespaced: bool,
        on_invalid: OnInvalid | None,
        label: Label,
        item_type: type | None,
    ) -> None:
        self.aggregate = aggregate
        self.item_type = item_type
        self.nfields = len(aggregate.fields)
        self.namespaced = namespaced
        self.on_invalid = on_invalid
        self.label = label
        self.invalid = 0
        self._namespaces: dict[tuple[type, Any], bytes] = {}

    def encode(self, batch: list[Any], start: int) -> _Chunk:
        chunk = self._fast(batch, start)
        return chunk if chunk is not None else self._slow(batch, start)

    def _fast(self, batch: list[Any], start: int) -> _Chunk | None:
        # Columns are taken with itemgetter maps, not zip(*batch): a transposition allocates an
        # iterator per row, which costs more than everything else here.
        kinds = set(map(type, batch))
        nfields = self.nfields
        full = 4 if self.namespaced else 3
        if kinds == {tuple}:
            lengths = set(map(len, batch))
            if len(lengths) != 1:
                return None
            width = lengths.pop()
            columns = [list(map(itemgetter(index), batch)) for index in range(width)]
        elif kinds == {self.item_type} and not self.namespaced:
            width = full
            columns = [list(map(attrgetter(name), batch)) for name in ("key", "id", "values")]
        else:
            return None
        if width == full:
            values = columns.pop()
            if not set(map(type, values)) <= {tuple, list} or set(map(len, values)) != {nfields}:
                return None
            cols = [list(map(itemgetter(field), values)) for field in range(nfields)]
            if not all(map(valid_column, cols)):
                return None
        elif width == full - 1 and nfields == 0:
            cols = []
        else:
            return None
        try:
            namespaces = self._encode_namespaces(columns[0]) if self.namespaced else None
            keys = encode_keys(columns[-2])
            ids = encode_ids(columns[-1])
        except Error:  # an invalid key somewhere: the item-by-item path names it
            return None
        if keys is None or ids is None:
            return None
        entries = list(map(add, keys, ids))
        return _Chunk(namespaces, entries, range(start, start + len(batch)), cols)

    def _encode_namespaces(self, namespaces: Sequence[Any]) -> list[bytes]:
        cache = self._namespaces
        if set(map(type, namespaces)) == {str}:
            for namespace in dict.fromkeys(namespaces):
                if (str, namespace) not in cache:
                    cache[str, namespace] = encode_key(namespace, what="namespace")
            return list(map(cache.__getitem__, zip(repeat(str), namespaces)))
        return [self._namespace(namespace) for namespace in namespaces]

    def _namespace(self, namespace: Any) -> bytes:
        kind = type(namespace)
        if kind is tuple or kind is float:  # (1,) == (1.0,) and 0.0 == -0.0 collide as dict keys
            return encode_key(namespace, what="namespace")
        try:
            found = self._namespaces.get((kind, namespace))
        except TypeError:  # unhashable (a dict, a list): no key type either, as encode_key says
            return encode_key(namespace, what="namespace")
        if found is None:
            found = self._namespaces[kind, namespace] = encode_key(namespace, what="namespace")
        return found

    def _slow(self, batch: list[Any], start: int) -> _Chunk:
        aggregate = self.aggregate
        namespaces: list[bytes] | None = [] if self.namespaced else None
        entries: list[bytes] = []
        positions: list[int] = []
        cols: list[list[Any]] = [[] for _ in range(self.nfields)]
        for position, row in enumerate(batch, start):
            try:
                if self.namespaced:
                    if not isinstance(row, tuple) or len(row) not in (3, 4):
                        raise InvalidValueError(
                            f"{aggregate.name}: build_many takes (namespace, key, id[, values]) tuples, "
                            f"not {row!r}"
                        )
                    namespace = self._namespace(row[0])
                    key, item_id, values = row[1], row[2], row[3] if len(row) == 4 else ()
                else:
                    key, item_id, values = aggregate._unpack_item(row)
                entry = encode_entry(key, item_id)
                checked = aggregate._values(values)
            except Error as exc:
                if self.on_invalid is None:
                    raise _with_label(exc, self.label(position)) from exc
                self.on_invalid(position, exc)
                self.invalid += 1
                continue
            if namespaces is not None:
                namespaces.append(namespace)
            entries.append(entry)
            positions.append(position)
            for col, value in zip(cols, checked, strict=True):
                col.append(value)
        return _Chunk(namespaces, entries, positions, cols)


def _with_label(exc: Error, label: str) -> Error:
    """The same kind of error, its message prefixed with where the item came from."""
    try:
        return type(exc)(f"{label}: {exc}")
    except TypeError:  # an error class with a richer constructor: keep it as it is
        return exc


def _batches(items: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    iterator = iter(items)
    start = 0
    while batch := list(islice(iterator, size)):
        yield start, batch
        start += len(batch)


# ---------------------------------------------------------------- sorting


def _sort_key(chunk: _Chunk) -> list[bytes]:
    if chunk.namespaces is None:
        return chunk.entries
    return list(map(add, chunk.namespaces, chunk.entries))


def _ascending(keys: list[bytes]) -> bool:
    return all(map(lt, keys, islice(keys, 1, None)))


def _sort_chunk(chunk: _Chunk) -> _Chunk:
    """The chunk sorted by (namespace, entry); stable, so equal items keep their input order."""
    keys = _sort_key(chunk)
    if all(map(le, keys, islice(keys, 1, None))):
        return chunk
    return chunk.take(sort_order(keys))


def _concat(chunks: list[_Chunk], nfields: int) -> _Chunk:
    if len(chunks) == 1:
        return chunks[0]
    namespaced = chunks[0].namespaces is not None
    namespaces: list[bytes] | None = [] if namespaced else None
    entries: list[bytes] = []
    positions: list[int] = []
    cols: list[list[Any]] = [[] for _ in range(nfields)]
    for chunk in chunks:
        if namespaces is not None and chunk.namespaces is not None:
            namespaces.extend(chunk.namespaces)
        entries.extend(chunk.entries)
        positions.extend(chunk.positions)
        for col, more in zip(cols, chunk.cols, strict=True):
            col.extend(more)
    return _Chunk(namespaces, entries, positions, cols)


class _Run:
    """A sorted run spilled to a temporary file as msgpack blocks, each with the first key of the
    block after it (None for the last block), so that a merge sees whether equal items go on there."""

    def __init__(self, directory: str, number: int, chunk: _Chunk) -> None:
        self.path = os.path.join(directory, f"run-{number:06d}.msgpack")
        keys = _sort_key(chunk)
        self.first, self.last = keys[0], keys[-1]
        with open(self.path, "wb") as file:
            for begin in range(0, len(chunk), _BLOCK):
                end = begin + _BLOCK
                block = [
                    keys[end] if end < len(keys) else None,
                    chunk.namespaces[begin:end] if chunk.namespaces is not None else None,
                    chunk.entries[begin:end],
                    list(chunk.positions[begin:end]),
                    *(col[begin:end] for col in chunk.cols),
                ]
                file.write(msgpack.packb(block, use_bin_type=True))

    def blocks(self) -> Iterator[tuple[_Chunk, bytes | None]]:
        """Each block, with the first key of the next one (None after the last)."""
        with open(self.path, "rb") as file:
            for block in _unpacker(file):
                yield _Chunk(block[1], block[2], block[3], block[4:]), block[0]

    def chunks(self) -> Iterator[_Chunk]:
        return (chunk for chunk, _ in self.blocks())


def _merge(runs: list[_Run], nfields: int) -> Iterator[_Chunk]:
    """Merge sorted runs block by block, so that the per-item work is done by C code.

    Each run has a current block. The smallest of the blocks' last keys, ``limit``, bounds what can be
    emitted: every item ``<= limit`` of every run is in its current block, once a run whose next
    block starts with ``limit`` (equal items across its block boundary) has that block appended to
    its current one. Those slices are concatenated in run order (input order: each run holds later
    input than the one before) and sorted stably (timsort merges the sorted slices in about linear
    time), so equal items come out in input order, as :func:`heapq.merge` would, and ``"last"``
    keeps the last of them. At least one block is used up per step.
    """
    sources = [run.blocks() for run in runs]
    blocks: list[_Chunk | None] = []
    following: list[bytes | None] = []  # the first key of each run's next block
    for source in sources:
        block, after = next(source, (None, None))
        blocks.append(block)
        following.append(after)
    keys: list[list[bytes]] = [_sort_key(block) if block is not None else [] for block in blocks]
    offsets = [0] * len(runs)
    while True:
        live = [index for index, block in enumerate(blocks) if block is not None]
        if not live:
            return
        limit = min(keys[index][-1] for index in live)
        straddling = [index for index in live if following[index] == limit]
        if straddling:  # rare: items equal to limit go on in a run's next block; take it in first
            for index in straddling:
                block = blocks[index]
                assert block is not None
                more, following[index] = next(sources[index])
                blocks[index] = block = _concat([block.slice(offsets[index], len(block)), more], nfields)
                keys[index] = _sort_key(block)
                offsets[index] = 0
            continue
        pieces: list[_Chunk] = []
        for index in live:
            block = blocks[index]
            assert block is not None
            start = offsets[index]
            stop = bisect_right(keys[index], limit, start)
            if stop > start:
                pieces.append(block.slice(start, stop))
            if stop == len(block):
                block, following[index] = next(sources[index], (None, None))
                blocks[index] = block
                keys[index] = _sort_key(block) if block is not None else []
                offsets[index] = 0
            else:
                offsets[index] = stop
        yield _sort_chunk(_concat(pieces, nfields))


def _unpacker(file: IO[bytes]) -> Iterator[list[Any]]:
    return iter(msgpack.Unpacker(file, raw=False, use_list=True, max_buffer_size=1 << 31))


class Spool:
    """Tuples appended one by one and read back in the same order, once, in O(``limit``) memory: up
    to ``limit`` (65,536 by default) are held in memory; each time that many are, they are written
    to an anonymous temporary file as one msgpack block (in ``temp_dir``, or the system's temporary
    directory; on POSIX the file has no name, so even ``kill -9`` leaves nothing behind). What
    ``tallytree verify --repair`` collects its repairs in while it compares a source with the stored
    items.

    An item holds None, bools, ints (``-2**63`` to ``2**64 - 1``), floats, str, bytes and tuples of
    them, and comes back equal, tuples as tuples. ``append`` is O(1) amortized; reading is O(n).

    >>> spool = Spool(limit=2)
    >>> for number in range(5):
    ...     spool.append((b"ns", number, (0.5, None)))
    >>> len(spool), spool.spilled, list(spool)[3:]
    (5, 4, [(b'ns', 3, (0.5, None)), (b'ns', 4, (0.5, None))])
    >>> spool.close()
    """

    def __init__(self, *, limit: int | None = None, temp_dir: str | None = None) -> None:
        if limit is None:
            limit = _SPOOL
        if type(limit) is not int or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive int, not {limit!r}")
        self.limit = limit
        self.temp_dir = temp_dir
        self.held: list[tuple[Any, ...]] = []
        self.spilled = 0  # items written to the file
        self.file: IO[bytes] | None = None

    def __len__(self) -> int:
        return self.spilled + len(self.held)

    def append(self, item: tuple[Any, ...]) -> None:
        held = self.held
        held.append(item)
        if len(held) >= self.limit:
            if self.file is None:
                import tempfile  # noqa: PLC0415  # 2.5 ms at import; only a spool that spills needs it

                # closed by close(); an anonymous file on POSIX, removed by the system at any exit
                self.file = tempfile.TemporaryFile(prefix="tallytree-spool-", dir=self.temp_dir)  # noqa: SIM115
            self.file.write(msgpack.packb(held, use_bin_type=True))
            self.spilled += len(held)
            self.held = []

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            blocks = msgpack.Unpacker(self.file, raw=False, use_list=False, max_buffer_size=1 << 31)
            for block in blocks:
                yield from block
        yield from self.held

    def close(self) -> None:
        """Forget the items and remove the file."""
        self.held = []
        if self.file is not None:
            self.file.close()
            self.file = None


class _Sorter:
    """Sorts chunks by (namespace, entry): in memory up to a budget, else in runs merged from disk."""

    def __init__(
        self, nfields: int, namespaced: bool, memory: int, temp_dir: str | None, progress: Progress | None
    ) -> None:
        self.nfields = nfields
        self.namespaced = namespaced
        self.memory = memory
        self.temp_dir = temp_dir
        self.progress = progress
        self.buffer: list[_Chunk] = []
        self.buffered = 0
        self.runs: list[_Run] = []
        self.directory: TemporaryDirectory[str] | None = None

    def add(self, chunk: _Chunk) -> None:
        if not len(chunk):
            return
        self.buffer.append(chunk)
        self.buffered += chunk.size(self.nfields)
        if self.buffered > self.memory:
            self._spill()

    def _sorted_buffer(self) -> _Chunk:
        chunk = _sort_chunk(_concat(self.buffer, self.nfields))
        self.buffer, self.buffered = [], 0
        return chunk

    def _spill(self) -> None:
        chunk = self._sorted_buffer()
        if self.directory is None:
            import tempfile  # noqa: PLC0415  # 2.5 ms at import (shutil, bz2, lzma); only spills need it

            self.directory = tempfile.TemporaryDirectory(prefix="tallytree-sort-", dir=self.temp_dir)
        self.runs.append(_Run(self.directory.name, len(self.runs), chunk))
        if self.progress is not None:
            self.progress("spill", len(self.runs))

    def chunks(self) -> Iterator[_Chunk]:
        """The sorted stream, as chunks in order."""
        if not self.runs:
            if self.buffer:
                yield self._sorted_buffer()
            return
        if self.buffer:
            self._spill()
        runs = sorted(self.runs, key=attrgetter("first"))
        if all(map(lt, [run.last for run in runs], [run.first for run in runs[1:]])):
            for run in runs:  # the runs do not overlap (the input was in order): concatenate them
                yield from run.chunks()
            return
        yield from _merge(self.runs, self.nfields)

    def close(self) -> None:
        """Remove the temporary files."""
        self.buffer = []
        if self.directory is not None:
            self.directory.cleanup()
            self.directory = None


# ---------------------------------------------------------------- writing trees


def _cuts(size: int, target: int, min_size: int, max_size: int, alone: bool) -> list[int]:
    """Boundaries cutting ``size`` children into even nodes of about ``target``, none below ``min_size``.

    ``alone``: these are all the level's children, so one node (the root) may take them all.
    """
    if alone and size <= max_size:
        return [0, size]
    pieces = -(-size // target)
    while pieces > 1 and size // pieces < min_size:
        pieces -= 1
    return [size * piece // pieces for piece in range(pieces + 1)]


class _Level:
    __slots__ = ("emitted", "fences", "kids", "summaries")

    def __init__(self) -> None:
        self.fences: list[bytes] = []
        self.kids: list[int] = []
        self.summaries: list[list[int]] = []
        self.emitted = 0


class _TreeWriter:
    """Writes one tree bottom-up from entries given in strictly ascending order."""

    def __init__(
        self, tx: WriteTransaction, nfields: int, node_size: int, fill: float, written: list[int]
    ) -> None:
        self.tx = tx
        self.written = written  # the ids of the nodes written, to drop them if the build fails
        self.nfields = nfields
        self.max_size = node_size
        self.min_size = node_size // 2
        self.target = max(self.min_size, 2, min(node_size, round(node_size * fill)))
        self.keys: list[bytes] = []
        self.cols: list[list[Any]] = [[] for _ in range(nfields)]
        self.levels: list[_Level] = []
        self.leaves = 0
        self.count = 0

    def add(self, entries: list[bytes], cols: list[list[Any]]) -> None:
        if not entries:
            return
        keys = self.keys
        keys.extend(entries)
        pending = self.cols
        for col, more in zip(pending, cols, strict=True):
            col.extend(more)
        self.count += len(entries)
        target = self.target
        offset = 0
        last = len(keys) - target - self.max_size  # write leaves while this many remain pending
        while offset <= last:
            end = offset + target
            self._leaf(keys[offset:end], [col[offset:end] for col in pending])
            offset = end
        if offset:
            self.keys = keys[offset:]
            self.cols = [col[offset:] for col in pending]

    def pop_last(self) -> None:
        """Forget the last entry added (it is always still pending)."""
        self.keys.pop()
        for col in self.cols:
            col.pop()
        self.count -= 1

    def _leaf(self, keys: list[bytes], cols: list[list[Any]]) -> None:
        tx = self.tx
        node_id = tx.new_id()
        self.written.append(node_id)
        tx.adopt_encoded(node_id, encode_node(Node(node_id, True, keys, cols)))
        fence = keys[0] if self.leaves else b""
        self.leaves += 1
        self._push(0, fence, node_id, summarize(len(keys), cols))

    def _push(self, height: int, fence: bytes, node_id: int, summary: list[int]) -> None:
        if height == len(self.levels):
            self.levels.append(_Level())
        level = self.levels[height]
        level.fences.append(fence)
        level.kids.append(node_id)
        level.summaries.append(summary)
        target = self.target
        if len(level.kids) >= target + self.max_size:
            self._internal(height, 0, target)
            del level.fences[:target], level.kids[:target], level.summaries[:target]

    def _internal(self, height: int, start: int, stop: int) -> None:
        level = self.levels[height]
        tx = self.tx
        node_id = tx.new_id()
        self.written.append(node_id)
        summaries = level.summaries[start:stop]
        node = Node.internal_from(node_id, level.fences[start:stop], level.kids[start:stop], summaries)
        tx.adopt_encoded(node_id, encode_node(node))
        level.emitted += 1
        summary = [sum(column) for column in zip(*summaries, strict=True)]
        self._push(height + 1, level.fences[start], node_id, summary)

    def finish(self) -> Root | None:
        """Write what is pending, level by level; return the root record (None: no items)."""
        keys, cols = self.keys, self.cols
        if keys:
            cuts = _cuts(len(keys), self.target, self.min_size, self.max_size, alone=not self.leaves)
            for begin, end in pairwise(cuts):
                self._leaf(keys[begin:end], [col[begin:end] for col in cols])
            self.keys, self.cols = [], [[] for _ in range(self.nfields)]
        if not self.levels:
            return None
        height = 0
        while True:
            level = self.levels[height]
            if not level.emitted and len(level.kids) == 1:
                return Root(level.kids[0], height + 1, level.summaries[0])
            cuts = _cuts(len(level.kids), self.target, self.min_size, self.max_size, alone=not level.emitted)
            for begin, end in pairwise(cuts):
                self._internal(height, begin, end)
            level.fences, level.kids, level.summaries = [], [], []
            height += 1


class _MergeWriter:
    """A tree writer fed with new entries, merging in the existing items of a tree (replace=False)."""

    def __init__(
        self, inner: _TreeWriter, old: Tree, on_duplicate: OnDuplicate, conflict: Callable[[bytes], None]
    ) -> None:
        self.inner = inner
        self.old = old.iterate(0, old.count)
        self.head = next(self.old, None)
        self.on_duplicate = on_duplicate
        self.conflict = conflict
        self.replaced = 0

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, entries: list[bytes], cols: list[list[Any]]) -> None:
        out: list[bytes] = []
        out_cols: list[list[Any]] = [[] for _ in cols]
        rows = zip(*cols, strict=True) if cols else repeat(())
        head = self.head
        for entry, values in zip(entries, rows, strict=False):  # rows may be repeat(())
            while head is not None and head[0] < entry:
                self._append(out, out_cols, *head)
                head = next(self.old, None)
            if head is not None and head[0] == entry:
                if self.on_duplicate == "error":
                    self.head = head
                    self.conflict(entry)
                self.replaced += 1
                head = next(self.old, None)
            self._append(out, out_cols, entry, values)
        self.head = head
        self.inner.add(out, out_cols)

    @staticmethod
    def _append(out: list[bytes], cols: list[list[Any]], entry: bytes, values: tuple[Any, ...]) -> None:
        out.append(entry)
        for col, value in zip(cols, values, strict=True):
            col.append(value)

    def pop_last(self) -> None:
        self.inner.pop_last()  # the last entry given was a new one: older ones above it are not out yet

    def finish(self) -> Root | None:
        out: list[bytes] = []
        out_cols: list[list[Any]] = [[] for _ in range(self.inner.nfields)]
        head = self.head
        while head is not None:
            self._append(out, out_cols, *head)
            head = next(self.old, None)
        self.inner.add(out, out_cols)
        return self.inner.finish()


# ---------------------------------------------------------------- the build


def _describe(entry: bytes) -> str:
    key, offset = decode_key(entry)
    item_id, _ = decode_key(entry, offset)
    return f"(key={key!r}, id={item_id!r})"


def _in_namespace(namespace: bytes | None) -> str:
    decoded = decode_key(namespace)[0] if namespace else None
    return "" if decoded is None else f" in namespace {decoded!r}"


def _duplicate(
    aggregate: Aggregate, namespace: bytes | None, entry: bytes, first: str, second: str
) -> DuplicateItemError:
    """A (key, id) repeated in the input, at ``first`` and ``second``: what builds and verify raise."""
    return DuplicateItemError(
        f"{aggregate.name}: item {_describe(entry)} appears twice in the input, {first} and "
        f"{second}{_in_namespace(namespace)}; nothing was written (on_duplicate='last' keeps the last one)"
    )


class _Build:
    """Feeds sorted chunks to one tree writer per namespace, checking order and duplicates."""

    def __init__(
        self,
        aggregate: Aggregate,
        tx: WriteTransaction,
        *,
        replace: bool,
        on_duplicate: OnDuplicate,
        fill: float,
        label: Label,
        progress: Progress | None,
    ) -> None:
        self.aggregate = aggregate
        self.tx = tx
        self.replace = replace
        self.on_duplicate = on_duplicate
        self.fill = fill
        self.label = label
        self.progress = progress
        self.namespace: bytes | None = None
        self.writer: _TreeWriter | _MergeWriter | None = None
        self.old: Root | None = None
        self.last: tuple[bytes, int] | None = None  # last entry given to the writer, and its position
        self.last_namespace_position = -1
        self.built: set[bytes] = set()
        self.swaps: list[tuple[bytes, Root | None, Root | None]] = []  # (tree, old root, new root)
        self.node_ids: list[int] = []  # every node written, to drop them if the build fails
        self.items = 0
        self.namespaces = 0
        self.duplicates = 0
        self.written = 0

    # -- messages

    def _describe(self, entry: bytes) -> str:
        return _describe(entry)

    def _where(self) -> str:
        return _in_namespace(self.namespace)

    def _duplicate(self, entry: bytes, first: int, second: int) -> DuplicateItemError:
        return _duplicate(self.aggregate, self.namespace, entry, self.label(first), self.label(second))

    def _conflict(self, entry: bytes) -> None:
        raise DuplicateItemError(
            f"{self.aggregate.name}: item {self._describe(entry)} is already stored{self._where()}; "
            "nothing was written (replace=True rebuilds the namespace, on_duplicate='last' overwrites "
            "the stored item)"
        )

    def _unsorted(self, entry: bytes, position: int, previous: bytes, before: int) -> UnsortedInputError:
        return UnsortedInputError(
            f"{self.aggregate.name}: the input is not sorted: {self.label(position)} "
            f"{self._describe(entry)} comes after {self.label(before)} {self._describe(previous)}"
            f"{self._where()}; build without the promise of sorted input (sorted=False) to have it sorted"
        )

    # -- namespaces

    def _start(self, namespace: bytes) -> None:
        aggregate, tx = self.aggregate, self.tx
        self.namespace = namespace
        tree_key = aggregate._prefix + namespace
        self.old = tx.root(tree_key)
        writer = _TreeWriter(tx, len(aggregate.fields), aggregate.node_size, self.fill, self.node_ids)
        if self.old is not None and not self.replace:
            old = Tree(tx, len(aggregate.fields), aggregate.node_size, self.old)
            self.writer = _MergeWriter(writer, old, self.on_duplicate, self._conflict)
        else:
            self.writer = writer
        self.last = None

    def _end(self) -> None:
        """Finish the namespace's tree; its old tree is freed and the new root set by :meth:`finish`."""
        writer, namespace = self.writer, self.namespace
        if writer is None or namespace is None:
            return
        root = writer.finish()
        if isinstance(writer, _MergeWriter):
            self.duplicates += writer.replaced
        tree_key = self.aggregate._prefix + namespace
        self.swaps.append((tree_key, self.old, root))
        self.built.add(tree_key)
        if root is not None:
            self.items += root.summary[0]
            self.namespaces += 1
        self.writer = None

    def discard(self) -> None:
        """Drop every node written so far: the build failed, and the transaction is as it was."""
        for node_id in self.node_ids:
            self.tx.free(node_id)
        self.node_ids.clear()

    # -- feeding

    def feed(self, chunk: _Chunk, verify: bool, namespace: bytes | None = None) -> None:
        """Take a chunk in (namespace, entry) order (checked when ``verify``)."""
        count = len(chunk)
        if not count:
            return
        namespaces = chunk.namespaces
        if namespaces is None:
            assert namespace is not None
            self._segment(namespace, chunk, 0, count, verify)
        else:
            if verify and not all(map(le, namespaces, islice(namespaces, 1, None))):
                index = next(i for i in range(count - 1) if namespaces[i] > namespaces[i + 1])
                raise self._unsorted_namespace(
                    namespaces[index + 1],
                    chunk.positions[index + 1],
                    namespaces[index],
                    chunk.positions[index],
                )
            start = 0
            while start < count:
                current = namespaces[start]
                stop = bisect_right(namespaces, current, start)
                self._segment(current, chunk, start, stop, verify)
                start = stop
        self.written += count
        if self.progress is not None:
            self.progress("write", self.written)

    def _unsorted_namespace(
        self, namespace: bytes, position: int, previous: bytes, before: int
    ) -> UnsortedInputError:
        return UnsortedInputError(
            f"{self.aggregate.name}: the input is not grouped by namespace in order: "
            f"{self.label(position)} has namespace {decode_key(namespace)[0]!r}, which sorts before "
            f"namespace {decode_key(previous)[0]!r} of {self.label(before)}; build without the promise "
            "of sorted input (sorted=False) to have it sorted"
        )

    def _segment(self, namespace: bytes, chunk: _Chunk, start: int, stop: int, verify: bool) -> None:
        if namespace != self.namespace:
            if verify and self.namespace is not None and namespace < self.namespace:
                raise self._unsorted_namespace(
                    namespace, chunk.positions[start], self.namespace, self.last_namespace_position
                )
            self._end()
            self._start(namespace)
        whole = start == 0 and stop == len(chunk)
        entries = chunk.entries if whole else chunk.entries[start:stop]
        positions = chunk.positions if whole else chunk.positions[start:stop]
        cols = chunk.cols if whole else [col[start:stop] for col in chunk.cols]
        last = self.last
        if not _ascending(entries) or (last is not None and not last[0] < entries[0]):
            entries, positions, cols = self._clean(entries, positions, cols)
        writer = self.writer
        assert writer is not None
        if entries:
            writer.add(entries, cols)
            self.last = (entries[-1], positions[-1])
        self.last_namespace_position = chunk.positions[stop - 1]

    def _clean(
        self, entries: list[bytes], positions: Sequence[int], cols: list[list[Any]]
    ) -> tuple[list[bytes], list[int], list[list[Any]]]:
        """The entries with duplicates resolved; raises for duplicates (on_duplicate='error') or disorder."""
        out: list[bytes] = []
        out_positions: list[int] = []
        out_cols: list[list[Any]] = [[] for _ in cols]
        previous = self.last
        rows = zip(*cols, strict=True) if cols else repeat(())
        for entry, position, values in zip(entries, positions, rows, strict=False):  # rows: maybe repeat(())
            if previous is not None:
                if entry == previous[0]:
                    if self.on_duplicate == "error":
                        raise self._duplicate(entry, previous[1], position)
                    self.duplicates += 1
                    if out:  # keep the last: drop the earlier one
                        out.pop()
                        out_positions.pop()
                        for col in out_cols:
                            col.pop()
                    else:
                        assert self.writer is not None
                        self.writer.pop_last()
                elif entry < previous[0]:
                    raise self._unsorted(entry, position, previous[0], previous[1])
            out.append(entry)
            out_positions.append(position)
            for col, value in zip(out_cols, values, strict=True):
                col.append(value)
            previous = (entry, position)
        return out, out_positions, out_cols

    def finish(self, clear_others: bool) -> int:
        """End the last namespace, then swap every built tree in (freeing the old ones); with
        ``clear_others``, also empty every namespace not built. Returns how many were emptied.

        Nothing changes a root before this point, so a build that fails earlier leaves the
        transaction as it was once :meth:`discard` has dropped the nodes it wrote.
        """
        self._end()
        aggregate, tx = self.aggregate, self.tx
        for tree_key, old, new in self.swaps:
            if old is not None:
                _free(tx, aggregate, old)
            if new is not None or old is not None:
                tx.set_root(tree_key, new)
        self.node_ids.clear()
        if not clear_others:
            return 0
        cleared = 0
        for namespace, _ in list(aggregate.namespaces(tx)):
            tree_key = aggregate._tree_key(namespace)
            if tree_key in self.built:
                continue
            root = tx.root(tree_key)
            if root is not None:
                _free(tx, aggregate, root)
                tx.set_root(tree_key, None)
                cleared += 1
        return cleared


def _free(tx: WriteTransaction, aggregate: Aggregate, root: Root) -> None:
    """Free every node of a tree (dropped by id: its leaves are not read)."""
    Tree(tx, len(aggregate.fields), aggregate.node_size, root).delete_range(0, root.summary[0])


def _check_flags(presorted: bool, replace: bool, clear_others: bool, on_invalid: OnInvalid | None) -> None:
    """The flags of a build are bools, and ``on_invalid`` a function: checked once, before any item."""
    check_flag(presorted, "sorted")
    check_flag(replace, "replace")
    check_flag(clear_others, "clear_others")
    if on_invalid is not None and not callable(on_invalid):
        raise ArgumentTypeError(
            f"on_invalid= takes a function of (position, error), or None, not {_show(on_invalid)}"
        )


def _check_options(on_duplicate: str, fill: float, memory: int) -> int:
    """Check the build options; return ``memory`` as a plain int (a numpy integer is its int)."""
    if on_duplicate not in ("error", "last"):
        raise InvalidArgumentError(f"on_duplicate must be 'error' or 'last', not {on_duplicate!r}")
    if not isinstance(fill, int | float) or not 0.5 <= fill <= 1.0:
        raise InvalidArgumentError(f"fill must be a number from 0.5 to 1.0, not {fill!r}")
    message = f"memory must be a positive int (bytes), not {memory!r}"
    if type(memory) is not int:
        memory = as_int(memory, message, InvalidArgumentError)
    if memory < 1:
        raise InvalidArgumentError(message)
    return memory


def _run(
    aggregate: Aggregate,
    tx: WriteTransaction,
    rows: Iterable[Any],
    *,
    namespace: bytes | None,
    presorted: bool,
    replace: bool,
    on_duplicate: OnDuplicate,
    fill: float,
    memory: int,
    clear_others: bool,
    on_invalid: OnInvalid | None,
    label: Label,
    progress: Progress | None,
    temp_dir: str | None,
    item_type: type | None,
) -> BuildReport:
    memory = _check_options(on_duplicate, fill, memory)
    _check_flags(presorted, replace, clear_others, on_invalid)
    rows = iterator_of(rows, f"{aggregate.name}: build", ITEMS)
    encoder = _Encoder(aggregate, namespace is None, on_invalid, label, item_type)
    build = _Build(
        aggregate, tx, replace=replace, on_duplicate=on_duplicate, fill=fill, label=label, progress=progress
    )
    try:
        with gc_paused():
            _feed(build, encoder, rows, namespace, presorted, memory, temp_dir, progress)
            if namespace is not None and build.namespace is None and replace:
                build._start(namespace)  # no items at all: the namespace is replaced by an empty one
            cleared = build.finish(clear_others)
    except BaseException:
        build.discard()  # a caller that catches the error and commits must not commit half a build
        raise
    return BuildReport(build.items, build.namespaces, build.duplicates, encoder.invalid, cleared)


def _feed(
    build: _Build,
    encoder: _Encoder,
    rows: Iterable[Any],
    namespace: bytes | None,
    presorted: bool,
    memory: int,
    temp_dir: str | None,
    progress: Progress | None,
) -> None:
    read = 0
    if presorted:
        for start, batch in _batches(rows, _BATCH):
            read += len(batch)
            if progress is not None:
                progress("read", read)
            build.feed(encoder.encode(batch, start), True, namespace)
        return
    sorter = _Sorter(encoder.nfields, namespace is None, memory, temp_dir, progress)
    try:
        for start, batch in _batches(rows, _BATCH):
            sorter.add(encoder.encode(batch, start))
            read += len(batch)
            if progress is not None:
                progress("read", read)
        for chunk in sorter.chunks():
            build.feed(chunk, False, namespace)
    finally:
        sorter.close()


def build(
    aggregate: Aggregate,
    tx: WriteTransaction,
    items: Iterable[Any],
    *,
    namespace: Any = None,
    sorted: bool = False,
    replace: bool = True,
    on_duplicate: OnDuplicate = "error",
    fill: float = DEFAULT_FILL,
    memory: int = DEFAULT_MEMORY,
    on_invalid: OnInvalid | None = None,
    label: Label = _default_label,
    progress: Progress | None = None,
    temp_dir: str | None = None,
    item_type: type | None = None,
) -> BuildReport:
    """Build one namespace's tree from items; see :meth:`tallytree.Aggregate.build`."""
    encoded = encode_key(namespace, what="namespace")
    return _run(
        aggregate,
        tx,
        items,
        namespace=encoded,
        presorted=sorted,
        replace=replace,
        on_duplicate=on_duplicate,
        fill=fill,
        memory=memory,
        clear_others=False,
        on_invalid=on_invalid,
        label=label,
        progress=progress,
        temp_dir=temp_dir,
        item_type=item_type,
    )


def build_many(
    aggregate: Aggregate,
    tx: WriteTransaction,
    rows: Iterable[Any],
    *,
    sorted: bool = False,
    replace: bool = True,
    on_duplicate: OnDuplicate = "error",
    clear_others: bool = False,
    fill: float = DEFAULT_FILL,
    memory: int = DEFAULT_MEMORY,
    on_invalid: OnInvalid | None = None,
    label: Label = _default_label,
    progress: Progress | None = None,
    temp_dir: str | None = None,
) -> BuildReport:
    """Build the trees of every namespace in ``rows``; see :meth:`tallytree.Aggregate.build_many`."""
    return _run(
        aggregate,
        tx,
        rows,
        namespace=None,
        presorted=sorted,
        replace=replace,
        on_duplicate=on_duplicate,
        fill=fill,
        memory=memory,
        clear_others=clear_others,
        on_invalid=on_invalid,
        label=label,
        progress=progress,
        temp_dir=temp_dir,
        item_type=None,
    )


Columns = tuple[list[bytes], list[bytes], list[list[Any]]]
"""Items already encoded and validated: (encoded namespaces, entries, one list per value field)."""


def build_columns(aggregate: Aggregate, tx: WriteTransaction, batches: Iterable[Columns]) -> BuildReport:
    """Build the trees of every namespace from batches of encoded, validated columns, in any order.

    What attaching an aggregate to a table runs: the extractors have already encoded and checked each
    item, so the batches go straight to the tree writers (no per-item validation). Every namespace
    given is replaced; the items must be unique per namespace (a table's are: an entry ends with the
    document id).

    Each batch is split by namespace (a sort of the batch alone, which stays in the CPU caches) and
    the pieces are kept per namespace; a namespace whose pieces are already in entry order (documents
    whose key grows with their id, such as an event log) is then written without any sort. A global
    sort would move every item across memory, which costs more than everything else here. Beyond
    :data:`DEFAULT_MEMORY` the pieces go to the external sort instead. O(n) for ordered namespaces,
    O(n log n) otherwise.
    """
    nfields = len(aggregate.fields)
    build = _Build(
        aggregate,
        tx,
        replace=True,
        on_duplicate="error",
        fill=DEFAULT_FILL,
        label=_default_label,
        progress=None,
    )
    try:
        with gc_paused():
            _feed_columns(build, batches, nfields)
            build.finish(clear_others=False)
    except BaseException:
        build.discard()
        raise
    return BuildReport(build.items, build.namespaces, build.duplicates)


def _feed_columns(build: _Build, batches: Iterable[Columns], nfields: int) -> None:
    pieces: dict[bytes, list[_Chunk]] = {}
    held = 0
    sorter: _Sorter | None = None
    start = 0
    try:
        for namespaces, entries, cols in batches:
            chunk = _Chunk(namespaces, entries, range(start, start + len(entries)), cols)
            start += len(entries)
            if sorter is not None:
                sorter.add(chunk)
                continue
            held += chunk.size(nfields)
            for namespace, piece in _split_namespaces(chunk):
                pieces.setdefault(namespace, []).append(piece)
            if held > DEFAULT_MEMORY:  # too large to hold: sort externally from here on
                sorter = _Sorter(nfields, True, DEFAULT_MEMORY, None, None)
                for namespace, held_pieces in pieces.items():
                    for piece in held_pieces:
                        sorter.add(
                            _Chunk([namespace] * len(piece), piece.entries, piece.positions, piece.cols)
                        )
                pieces.clear()
        if sorter is not None:
            for chunk in sorter.chunks():
                build.feed(chunk, False)
        for namespace in sorted(pieces):
            chunk = _concat(pieces.pop(namespace), nfields)
            if not _ascending(chunk.entries):
                chunk = chunk.take(sort_order(chunk.entries))
            build.feed(chunk, False, namespace)
    finally:
        if sorter is not None:
            sorter.close()


def _split_namespaces(chunk: _Chunk) -> Iterator[tuple[bytes, _Chunk]]:
    """The chunk's items per namespace (without their namespaces), in input order within each."""
    namespaces = chunk.namespaces
    assert namespaces is not None
    if not namespaces:
        return
    if namespaces.count(namespaces[0]) == len(namespaces):
        yield namespaces[0], _Chunk(None, chunk.entries, chunk.positions, chunk.cols)
        return
    chunk = chunk.take(sort_order(namespaces))  # stable
    namespaces = chunk.namespaces
    assert namespaces is not None
    begin = 0
    while begin < len(namespaces):
        namespace = namespaces[begin]
        end = bisect_right(namespaces, namespace, begin)
        piece = chunk.slice(begin, end)
        piece.namespaces = None
        yield namespace, piece
        begin = end


def sorted_items(
    aggregate: Aggregate,
    rows: Iterable[Any],
    *,
    on_duplicate: OnDuplicate = "error",
    memory: int = DEFAULT_MEMORY,
    on_invalid: OnInvalid | None = None,
    label: Label = _default_label,
    temp_dir: str | None = None,
) -> Iterator[tuple[bytes, bytes, tuple[Any, ...]]]:
    """``(encoded namespace, entry, values)`` of ``(namespace, key, id, values)`` rows, in tree order.

    Validated and sorted as :func:`build_many` does (externally beyond ``memory``), and a repeated
    (namespace, key, id) treated as it does: DuplicateItemError naming both rows (``label``), or with
    ``on_duplicate="last"`` the last one is kept. Used to compare an aggregate with its source, one
    pass over each, so that a source verifies as what a build of it would hold.
    """
    memory = _check_options(on_duplicate, DEFAULT_FILL, memory)
    encoder = _Encoder(aggregate, True, on_invalid, label, None)
    sorter = _Sorter(len(aggregate.fields), True, memory, temp_dir, None)
    keep_last = on_duplicate == "last"
    try:
        for start, batch in _batches(rows, _BATCH):
            sorter.add(encoder.encode(batch, start))
        pending: tuple[bytes, bytes, tuple[Any, ...]] | None = None
        pending_position = 0
        for chunk in sorter.chunks():
            namespaces = chunk.namespaces
            assert namespaces is not None
            values = zip(*chunk.cols, strict=True) if chunk.cols else repeat(())
            items = zip(namespaces, chunk.entries, values, strict=False)  # values may be repeat(())
            for item, position in zip(items, chunk.positions, strict=True):
                if pending is not None:
                    if pending[0] != item[0] or pending[1] != item[1]:
                        yield pending
                    elif not keep_last:  # the sort is stable: the pending item came first
                        raise _duplicate(
                            aggregate, item[0], item[1], label(pending_position), label(position)
                        )
                pending, pending_position = item, position
        if pending is not None:
            yield pending
    finally:
        sorter.close()
