"""Tests of the order-preserving key encoding (``tallytree._keys``).

Golden vectors were worked out by hand from the format description in the module docstring;
the property tests compare against a deliberately simple reference comparator and a bit-string
reference encoder for numbers, both written here without the module's shortcuts.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
from contextlib import nullcontext
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import IntEnum
from fractions import Fraction
from typing import NamedTuple

import pytest
from conftest import pure_python
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tallytree._keys import (
    MAX_KEY_BYTES,
    _exponent_bytes,
    decode_key,
    encode_body,
    encode_id,
    encode_key,
    encode_prefix,
    validate_key,
)
from tallytree.errors import (
    CorruptDatabaseError,
    InvalidKeyError,
    KeyTooLargeError,
    UnsupportedKeyTypeError,
)

INF = float("inf")


class Point(NamedTuple):
    x: int
    y: int


class Color(IntEnum):
    RED = 1


# --------------------------------------------------------------------------------------------
# Golden vectors: one or more per type code, computed by hand from the spec.
# --------------------------------------------------------------------------------------------

GOLDEN: list[tuple[object, str]] = [
    # 10 None, 20/21 bools
    (None, "10"),
    (False, "20"),
    (True, "21"),
    # 30 -inf, 34 +inf (one-byte bodies; the suffix says float)
    (-INF, "30 01"),
    (INF, "34 01"),
    # 32 zero: int 0, float 0.0, and -0.0 normalized to 0.0
    (0, "32 00"),
    (0.0, "32 01"),
    (-0.0, "32 01"),
    # 33 positive finite: exponent, fraction groups, then the suffix byte
    (1, "33 80 00 00"),  # E=0 -> 80, k=0 -> 00, int
    (1.0, "33 80 00 01"),  # same body, float
    (1.5, "33 80 80 01"),  # fraction "1" -> group 1000000 -> byte 80
    (2, "33 81 01 00 00"),  # E=1 -> 81 01
    (0.5, "33 7f fe 00 01"),  # E=-1 -> 7f, -1+255=fe
    (0.75, "33 7f fe 80 01"),
    (129, "33 81 07 02 00"),  # E=7, fraction 0000001 -> 02
    (255, "33 81 07 fe 00"),  # E=7, fraction 1111111 -> fe
    (257, "33 81 08 01 80 00"),  # E=8, fraction 00000001 -> 0000000+more, 1000000
    (2**14 + 1, "33 81 0e 01 02 00"),  # 14 fraction bits: exactly two full groups
    (2**255, "33 81 ff 00 00"),  # largest one-byte exponent
    (2**256, "33 82 01 00 00 00"),  # smallest two-byte exponent
    (2.0**-255, "33 7f 00 00 01"),  # -255 -> 7f 00
    (2.0**-256, "33 7e fe ff 00 01"),  # -256 -> 7e, -256+65535=feff
    (5e-324, "33 7e fb cd 00 01"),  # 2**-1074: 65535-1074 = fbcd
    (1.7976931348623157e308, "33 82 03 ff ff ff ff ff ff ff ff e0 01"),  # 52 fraction bits set
    (1_700_000_000, "33 81 1e 95 a7 f1 80 00"),  # E=30, fraction 1001010 1010011 1111000 1
    (0.0123, "33 7f f8 93 85 f9 1b ed 95 23 a0 01"),  # E=-7, 52 fraction bits
    # 31 negative finite: the magnitude bytes complemented
    (-1, "31 7f ff 00"),
    (-0.5, "31 80 01 ff 01"),
    (-2.5, "31 7e fe bf 01"),  # magnitude 81 01 40
    (-1_700_000_000, "31 7e e1 6a 58 0e 7f 00"),
    # 40 str: UTF-8, 00 escaped as 00 ff, terminated by 00
    ("", "40 00"),
    ("a", "40 61 00"),
    ("a\x00b", "40 61 00 ff 62 00"),
    ("\xe9", "40 c3 a9 00"),
    ("\U0001f600", "40 f0 9f 98 80 00"),
    # 50 bytes: same escaping
    (b"", "50 00"),
    (b"\x00", "50 00 ff 00"),
    (b"\xff", "50 ff 00"),
    (bytearray(b"ab"), "50 61 62 00"),
    (memoryview(b"ab"), "50 61 62 00"),
    # 60 datetime: microseconds since the epoch + 2**63, 8 bytes big-endian
    (datetime(1970, 1, 1, tzinfo=UTC), "60 80 00 00 00 00 00 00 00"),
    (datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), "60 80 00 00 00 00 0f 42 40"),
    (datetime(1970, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "60 80 00 00 00 00 00 00 00"),
    (datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "60 7f ff ff ff ff ff ff ff"),
    # 70 tuple: element bodies, terminator 00, then the suffix of all numbers
    ((), "70 00"),
    (((),), "70 70 00 00"),
    ((1, "a"), "70 33 80 00 40 61 00 00 00"),
    ((1.0, 1), "70 33 80 00 33 80 00 00 01 00"),
    ((None, (True, 1.0)), "70 10 70 21 33 80 00 00 00 01"),
    (Point(1, 2), "70 33 80 00 33 81 01 00 00 00 00"),
]


@pytest.mark.parametrize(("key", "expected"), GOLDEN, ids=[repr(k)[:40] for k, _ in GOLDEN])
def test_golden_vectors(key: object, expected: str) -> None:
    assert encode_key(key) == bytes.fromhex(expected)


@pytest.mark.parametrize(("key", "expected"), GOLDEN, ids=[repr(k)[:40] for k, _ in GOLDEN])
def test_golden_vectors_decode(key: object, expected: str) -> None:
    data = bytes.fromhex(expected)
    decoded, end = decode_key(data)
    assert end == len(data)
    assert encode_key(decoded) == data


def test_golden_bodies_and_prefixes() -> None:
    assert encode_body(1) == encode_body(1.0) == bytes.fromhex("33 80 00")
    assert encode_body((1.0, "a")) == bytes.fromhex("70 33 80 00 40 61 00 00")
    assert encode_body("a") == encode_key("a")
    assert encode_prefix(()) == bytes.fromhex("70")
    assert encode_prefix((1, "a")) == bytes.fromhex("70 33 80 00 40 61 00")
    assert encode_id("a") == bytes.fromhex("40 61 00")
    assert encode_id(7) == bytes.fromhex("33 81 02 c0 00")
    assert encode_id(b"\x00") == bytes.fromhex("50 00 ff 00")


def test_exponent_boundaries() -> None:
    cases = {
        -65536: "7d fe ff ff",
        -65535: "7e 00 00",
        -256: "7e fe ff",
        -255: "7f 00",
        -1: "7f fe",
        0: "80",
        1: "81 01",
        255: "81 ff",
        256: "82 01 00",
        65535: "82 ff ff",
        65536: "83 01 00 00",
    }
    for exponent, expected in cases.items():
        assert _exponent_bytes(exponent) == bytes.fromhex(expected), exponent


# --------------------------------------------------------------------------------------------
# Reference model: a simple comparator of the order, and a bit-string encoder for numbers.
# --------------------------------------------------------------------------------------------


def _rank(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, (int, float)):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 4
    if isinstance(value, datetime):
        return 5
    assert isinstance(value, tuple)
    return 6


def _sign(number: int) -> int:
    return (number > 0) - (number < 0)


def value_cmp(a: object, b: object) -> int:
    """Compare by value only: Python's own comparisons, int and float exactly, 1 == 1.0."""
    rank_a, rank_b = _rank(a), _rank(b)
    if rank_a != rank_b:
        return _sign(rank_a - rank_b)
    if rank_a == 0:
        return 0
    if rank_a == 6:
        assert isinstance(a, tuple)
        assert isinstance(b, tuple)
        for x, y in zip(a, b, strict=False):
            result = value_cmp(x, y)
            if result:
                return result
        return _sign(len(a) - len(b))
    if rank_a == 4:
        a, b = bytes(a), bytes(b)  # type: ignore[arg-type]
    return (a > b) - (a < b)  # type: ignore[operator]


def number_types(value: object) -> list[int]:
    """The types of the numbers in ``value``, depth first: 0 for int, 1 for float."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [0]
    if isinstance(value, float):
        return [1]
    if isinstance(value, tuple):
        return [kind for item in value for kind in number_types(item)]
    return []


def reference_cmp(a: object, b: object) -> int:
    result = value_cmp(a, b)
    if result:
        return result
    types_a, types_b = number_types(a), number_types(b)
    return (types_a > types_b) - (types_a < types_b)


def bytes_cmp(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


def reference_number_body(value: int | float) -> bytes:
    """Spec transcribed literally: E and the fraction as a string of bits."""
    if value == 0:
        return b"\x32"
    if isinstance(value, float) and math.isinf(value):
        return b"\x30" if value < 0 else b"\x34"
    numerator, denominator = Fraction(value).as_integer_ratio()
    magnitude = abs(numerator)
    assert denominator & (denominator - 1) == 0  # a power of two
    exponent = (magnitude.bit_length() - 1) - (denominator.bit_length() - 1)
    length = 0
    while abs(exponent) >= 256**length:
        length += 1
    if exponent >= 0:
        head = bytes([0x80 + length]) + exponent.to_bytes(length, "big")
    else:
        head = bytes([0x80 - length]) + (exponent + 256**length - 1).to_bytes(length, "big")
    bits = bin(magnitude)[3:].rstrip("0")  # the bits after the leading one, trailing zeros cut
    if not bits:
        fraction = b"\x00"
    else:
        groups = [bits[i : i + 7].ljust(7, "0") for i in range(0, len(bits), 7)]
        fraction = bytes(
            (int(group, 2) << 1) | (1 if i < len(groups) - 1 else 0) for i, group in enumerate(groups)
        )
    if value > 0:
        return b"\x33" + head + fraction
    return b"\x31" + bytes(byte ^ 0xFF for byte in head + fraction)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(timezone)
zones = st.one_of(st.just(UTC), offsets)
datetimes = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=zones)
small_numbers = st.sampled_from(
    [0, 0.0, -0.0, 1, 1.0, -1, -1.0, 0.5, -0.5, 1.5, 2, 2.0, 2**53, 2.0**53, 2**53 + 1, INF, -INF]
)
ints = st.one_of(
    st.integers(-300, 300),
    st.integers(-(2**70), 2**70),
    st.integers(-(10**150), 10**150),
    st.builds(lambda mantissa, shift: mantissa << shift, st.integers(-99, 99), st.integers(0, 5000)),
)
floats = st.one_of(
    st.floats(allow_nan=False),  # includes inf, -0.0 and subnormals
    st.integers(-(2**80), 2**80).map(float),  # integral floats, equal in value to ints
    st.floats(min_value=-1e-300, max_value=1e-300, allow_nan=False),
)
numbers = st.one_of(small_numbers, ints, floats)
texts = st.one_of(st.text(max_size=6), st.text(alphabet="\x00ab\xe9\U0001f600", max_size=4))
binaries = st.one_of(st.binary(max_size=6), st.lists(st.sampled_from(b"\x00\x01\xff")).map(bytes)).flatmap(
    lambda data: st.sampled_from([data, bytearray(data), memoryview(data)])
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts, binaries, datetimes)
raw_keys = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4).flatmap(
        lambda items: st.sampled_from([tuple(items), Point(*items[:2]) if len(items) >= 2 else ()])
    ),
    max_leaves=8,
)


def fits(key: object) -> bool:
    try:
        encode_key(key)
    except KeyTooLargeError:
        return False
    return True


keys = raw_keys.filter(fits)
tuple_keys = st.lists(keys, max_size=4).map(tuple).filter(fits)


@st.composite
def variant(draw: st.DrawFn, key: object) -> object:
    """A key equal to ``key`` in value, with number types and time zones possibly changed."""
    if isinstance(key, bool):
        return key
    if isinstance(key, int):
        as_float = float(key) if abs(key) < 2**1000 else None
        if as_float is not None and as_float == key:
            return draw(st.sampled_from([key, as_float]))
        return key
    if isinstance(key, float):
        if math.isfinite(key) and key.is_integer():
            return draw(st.sampled_from([key, int(key)]))
        return key
    if isinstance(key, datetime):
        return key.astimezone(draw(zones))
    if isinstance(key, tuple):
        return tuple(draw(variant(item)) for item in key)
    if isinstance(key, memoryview):
        return bytes(key)
    return key


@st.composite
def key_pairs(draw: st.DrawFn) -> tuple[object, object]:
    first = draw(keys)
    second = draw(st.one_of(keys, variant(first)))
    return first, second


def canonical(value: object) -> object:
    """What decoding should give back: plain types, UTC datetimes, -0.0 as 0.0."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return 0.0 if value == 0 else float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, tuple):
        return tuple(canonical(item) for item in value)
    return str(value)


def identical(a: object, b: object) -> bool:
    """Equal, same types throughout, floats bit for bit, datetimes with the same tzinfo."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)  # type: ignore[arg-type]
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, datetime):
        assert isinstance(b, datetime)
        return a == b and a.tzinfo is b.tzinfo
    return a == b


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=500)
@given(key_pairs())
@example(((1, "b"), (1.0, "a")))
@example(((1, "a"), (1.0, "a")))
@example((1, True))
@example((-0.0, 0))
@example((2**53 + 1, 2.0**53))
@example((datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))))
@example((("a",), ("a\x00",)))
@example((("a", 1), ("a\x00",)))
@example(((), (None,)))
def test_order_matches_reference(pair: tuple[object, object]) -> None:
    a, b = pair
    assert bytes_cmp(encode_key(a), encode_key(b)) == reference_cmp(a, b)


def test_order_of_a_hand_sorted_list() -> None:
    utc = UTC
    expected: list[object] = [
        None,
        False,
        True,
        -INF,
        -(10**400),
        -1e300,
        -2,
        -2.0,
        -1.5,
        -1,
        -1.0,
        -5e-324,
        0,
        0.0,
        5e-324,
        0.0123,
        0.5,
        1,
        1.0,
        1.5,
        2,
        2.0,
        1_700_000_000,
        1.7e9,
        2**53,
        2.0**53,
        2**53 + 1,
        10**400,
        INF,
        "",
        "\x00",
        "a",
        "a\x00",
        "ab",
        "b",
        "\xe9",
        "\U0001f600",
        b"",
        b"\x00",
        b"\x00\x00",
        b"\x01",
        b"a",
        b"\xff",
        datetime(1, 1, 1, tzinfo=utc),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=utc),
        datetime(1970, 1, 1, tzinfo=utc),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=utc),
        (),
        (None,),
        (1, "a"),
        (1.0, "a"),
        (1, "b"),
        (1.0, "b"),
        (1, "b", None),
        (1.5,),
        ("a",),
        ("a", 1),
        ("a\x00",),
        ((),),
        (((),),),
    ]
    assert sorted(expected, key=encode_key) == expected
    for lower, upper in itertools.pairwise(expected):
        assert reference_cmp(lower, upper) < 0, (lower, upper)


@settings(max_examples=400)
@given(keys)
def test_round_trip(key: object) -> None:
    data = encode_key(key)
    decoded, end = decode_key(data)
    assert end == len(data)
    assert identical(decoded, canonical(key))
    # Decoding in the middle of a buffer, followed by another encoding.
    decoded, end = decode_key(b"\x10\x21" + data + encode_key("tail"), 2)
    assert end == 2 + len(data)
    assert identical(decoded, canonical(key))


@pytest.mark.parametrize("kernels", ["built", "python"])
@settings(max_examples=300)
@given(number=st.one_of(ints, floats, small_numbers).filter(fits))
def test_numbers_match_the_reference_encoder(kernels: str, number: int | float) -> None:
    with pure_python() if kernels == "python" else nullcontext():
        assert encode_body(number) == reference_number_body(number)
        assert encode_key(number) == encode_body(number) + (b"\x01" if type(number) is float else b"\x00")


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(0))]),
    )
)
def test_datetimes_encode_alike_with_and_without_the_c_kernels(moment: datetime) -> None:
    built = encode_key(moment), encode_body(moment)
    with pure_python():
        python = encode_key(moment), encode_body(moment)
    micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert built == python == (b"\x60" + (micros + 2**63).to_bytes(8, "big"),) * 2


@settings(max_examples=300)
@given(st.floats(allow_nan=False))
def test_floats_round_trip_bit_for_bit(number: float) -> None:
    decoded, _ = decode_key(encode_key(number))
    assert type(decoded) is float
    expected = 0.0 if number == 0 else number
    assert struct.pack(">d", decoded) == struct.pack(">d", expected)


@settings(max_examples=250)
@given(keys, keys)
def test_prefix_free_up_to_the_escaped_nul(a: object, b: object) -> None:
    """An encoding is a proper prefix of another only when the longer one goes on with ff.

    That happens only through the str/bytes escape (``"" -> 40 00``, ``"\x00" -> 40 00 ff 00``),
    and ff never follows a complete encoding, so concatenations still compare like pairs.
    """
    for first, second in (
        (encode_key(a), encode_key(b)),
        (encode_body(a), encode_body(b)),
    ):
        for shorter, longer in ((first, second), (second, first)):
            if shorter != longer and longer.startswith(shorter):
                assert longer[len(shorter)] == 0xFF


def test_prefix_through_the_escape_does_not_break_concatenation() -> None:
    # The one way an encoding prefixes another: an escaped 00 right after the terminator.
    assert encode_key("") == bytes.fromhex("40 00")
    assert encode_key("\x00") == bytes.fromhex("40 00 ff 00")
    assert encode_key(b"a") == bytes.fromhex("50 61 00")
    assert encode_key(b"a\x00\xff") == bytes.fromhex("50 61 00 ff ff 00")
    for after in [None, "", "\x00", 1, 1.0, -INF, b"\xff", (), ("z",)]:
        assert encode_key("") + encode_key(after) < encode_key("\x00")
        assert encode_key(b"a") + encode_key(after) < encode_key(b"a\x00\xff")
    # So a range scan [x, x + ff) is the membership test, not startswith:
    body = encode_body("")
    assert encode_key("\x00").startswith(body)
    assert not body <= encode_key("\x00") < body + b"\xff"


@settings(max_examples=250)
@given(key_pairs(), key_pairs())
def test_concatenation_compares_like_pairs(
    first: tuple[object, object], second: tuple[object, object]
) -> None:
    (a, b), (x, y) = first, second
    expected = reference_cmp(a, b) or reference_cmp(x, y)
    assert bytes_cmp(encode_key(a) + encode_key(x), encode_key(b) + encode_key(y)) == expected


def test_body_semantics_examples() -> None:
    assert encode_body(1) == encode_body(1.0)
    assert encode_key(1) < encode_key(1.0) < encode_key(1.5)
    assert encode_body((1, 2.0)) == encode_body((1.0, 2))
    assert encode_key((1, 2.0)) < encode_key((1.0, 2))  # tie-break in depth-first order


@settings(max_examples=300)
@given(st.data())
def test_body_range_holds_exactly_the_value_equal_keys(data: st.DataObject) -> None:
    key = data.draw(keys)
    same_value = data.draw(variant(key))
    other = data.draw(st.one_of(keys, variant(key)))
    body = encode_body(key)
    assert encode_key(key).startswith(body)
    assert encode_body(same_value) == body
    assert body <= encode_key(same_value) < body + b"\xff"
    inside = body <= encode_key(other) < body + b"\xff"
    assert inside == (value_cmp(other, key) == 0)
    assert (encode_body(other) == body) == (value_cmp(other, key) == 0)


@st.composite
def cut_last_text(draw: st.DrawFn, items: tuple[object, ...]) -> tuple[object, ...]:
    """``items`` with its last element, if a str or bytes, cut short: near-miss prefixes."""
    if not items or not isinstance(items[-1], (str, bytes, bytearray, memoryview)):
        return items
    last = items[-1]
    if isinstance(last, (bytearray, memoryview)):
        last = bytes(last)
    return (*items[:-1], last[: draw(st.integers(0, len(last)))])


@settings(max_examples=300)
@given(st.data())
def test_prefix_matches_leading_elements_by_value(data: st.DataObject) -> None:
    key = data.draw(tuple_keys)
    leading = key[: data.draw(st.integers(0, len(key)))]
    prefix = data.draw(st.one_of(variant(leading), tuple_keys, cut_last_text(leading)))
    assert isinstance(prefix, tuple)
    assume(fits(prefix))
    check_prefix(key, prefix)


def check_prefix(key: tuple[object, ...], prefix: tuple[object, ...]) -> None:
    encoded = encode_prefix(prefix)
    expected = len(key) >= len(prefix) and value_cmp(key[: len(prefix)], prefix) == 0
    for data in (encode_key(key), encode_body(key)):
        # Matching keys start with the prefix, and they are exactly the ones in [p, p + ff).
        assert (encoded <= data < encoded + b"\xff") == expected
        if expected:
            assert data.startswith(encoded)
        else:  # only the str/bytes escape can make a non-matching key start with the prefix
            assert not data.startswith(encoded) or data[len(encoded)] == 0xFF
    assert encode_body(prefix) == encoded + b"\x00"


@pytest.mark.parametrize(
    ("key", "prefix"),
    [
        (("\x00",), ("",)),
        (("",), ("",)),
        (("a\x00", 1), ("a",)),
        ((b"\x00\xff", 1), (b"\x00",)),
        ((("",),), ((),)),
        ((1.0, "x"), (1,)),
        ((1,), (1, 2)),
        ((), ()),
    ],
)
def test_prefix_edge_cases(key: tuple[object, ...], prefix: tuple[object, ...]) -> None:
    check_prefix(key, prefix)


@settings(max_examples=300)
@given(
    st.one_of(
        st.integers(-(2**40), 2**40),
        st.sampled_from([-65537, -65536, -65535, -257, -256, -255, -1, 0, 1, 255, 256, 65535, 65536]),
    ),
    st.integers(-(2**40), 2**40),
)
def test_exponent_mapping_is_increasing_and_prefix_free(a: int, b: int) -> None:
    encoded_a, encoded_b = _exponent_bytes(a), _exponent_bytes(b)
    assert bytes_cmp(encoded_a, encoded_b) == _sign(a - b)
    if a != b:
        assert not encoded_a.startswith(encoded_b)
        assert not encoded_b.startswith(encoded_a)


def test_exponent_mapping_exhaustive_near_zero() -> None:
    encoded = [_exponent_bytes(exponent) for exponent in range(-70_000, 70_000)]
    for lower, upper in itertools.pairwise(encoded):
        # In a sorted list, a prefix would show up between neighbours.
        assert lower < upper
        assert not upper.startswith(lower)


def test_types_and_subclasses() -> None:
    assert encode_key(True) != encode_key(1)
    assert encode_key(True) < encode_key(-INF)
    assert encode_key(Color.RED) == encode_key(1)
    assert decode_key(encode_key(Color.RED))[0].__class__ is int
    assert encode_key(Point(1, 2)) == encode_key((1, 2))
    assert decode_key(encode_key(Point(1, 2))) == ((1, 2), 11)
    assert type(decode_key(encode_key(Point(1, 2)))[0]) is tuple
    assert decode_key(encode_key(bytearray(b"x")))[0] == b"x"
    assert type(decode_key(encode_key(memoryview(b"x")))[0]) is bytes
    paris = datetime(2024, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    decoded = decode_key(encode_key(paris))[0]
    assert decoded == paris
    assert isinstance(decoded, datetime)
    assert decoded.tzinfo is UTC
    assert decoded.hour == 10


def test_zoneinfo_fold_is_respected() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone data")
    first = datetime(2024, 10, 27, 2, 30, tzinfo=paris, fold=0)  # 00:30 UTC
    second = datetime(2024, 10, 27, 2, 30, tzinfo=paris, fold=1)  # 01:30 UTC
    assert encode_key(first) < encode_key(second)
    assert encode_key(second) == encode_key(datetime(2024, 10, 27, 1, 30, tzinfo=UTC))


def test_size_limit_boundaries() -> None:
    assert len(encode_key("x" * (MAX_KEY_BYTES - 2))) == MAX_KEY_BYTES
    assert len(encode_key(b"x" * (MAX_KEY_BYTES - 2))) == MAX_KEY_BYTES
    with pytest.raises(KeyTooLargeError, match=f"256 bytes and the limit is {MAX_KEY_BYTES}"):
        encode_key("x" * (MAX_KEY_BYTES - 1))
    with pytest.raises(KeyTooLargeError):
        encode_body("x" * (MAX_KEY_BYTES - 1))
    # A tuple of n numbers: 1 + 3n + 1 body bytes and n suffix bytes.
    assert len(encode_key((1,) * 63)) == 254
    with pytest.raises(KeyTooLargeError):
        encode_key((1,) * 64)
    with pytest.raises(KeyTooLargeError):  # body alone fits; with the suffix it does not
        encode_body((1,) * 64)
    huge_but_short = 1 << 100_000  # many trailing zero bits: a 7-byte key
    assert decode_key(encode_key(huge_but_short)) == (huge_but_short, 7)


@pytest.mark.parametrize(
    "key",
    [
        "x" * 300,
        b"x" * 300,
        bytearray(300),
        10**800,
        -(10**800),
        (1 << (1 << 24)),
        (None,) * 300,
        ("x" * 200, "y" * 200),
    ],
    ids=["str", "bytes", "bytearray", "int", "negative int", "int exponent", "wide tuple", "pair"],
)
def test_too_large(key: object) -> None:
    with pytest.raises(KeyTooLargeError, match="limit"):
        encode_key(key)
    with pytest.raises(KeyTooLargeError):
        encode_body(key)
    with pytest.raises(KeyTooLargeError):
        validate_key(key)


def test_too_large_nesting_fails_fast() -> None:
    deep: tuple[object, ...] = ()
    for _ in range(200):
        deep = (deep,)
    with pytest.raises(KeyTooLargeError) as raised:
        encode_key(deep)
    # the size it names is a true lower bound, over the limit (not 2 bytes per level above it only)
    assert f"at least {2 * 128} bytes and the limit is {MAX_KEY_BYTES}" in str(raised.value)
    wide: tuple[object, ...] = ()
    for _ in range(12):
        wide = (wide,) * 200  # 200**12 leaves if it were expanded
    with pytest.raises(KeyTooLargeError):
        encode_key(wide)


def test_too_large_messages_name_what() -> None:
    with pytest.raises(KeyTooLargeError, match=r"^id is too large.*shorter id"):
        encode_id("x" * 300)
    with pytest.raises(KeyTooLargeError, match=r"^namespace is too large"):
        encode_key(("x" * 300,), what="namespace")


NAN = float("nan")


@pytest.mark.parametrize(
    "key",
    [NAN, -NAN, (1, NAN), ((NAN,),), ("a", (1.5, NAN))],
    ids=["nan", "-nan", "in tuple", "nested", "deeper"],
)
def test_nan_is_invalid(key: object) -> None:
    with pytest.raises(InvalidKeyError, match="NaN") as info:
        encode_key(key)
    assert not isinstance(info.value, KeyTooLargeError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidKeyError):
        encode_body(key)


def test_naive_datetime_is_invalid() -> None:
    with pytest.raises(InvalidKeyError, match=r"tzinfo=timezone\.utc"):
        encode_key(datetime(2024, 1, 1))
    with pytest.raises(InvalidKeyError, match=r"naive.*inside the key"):
        encode_key((1, datetime(2024, 1, 1)))


def test_datetime_whose_tzinfo_gives_no_offset_is_naive() -> None:
    class NoOffset(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta | None:
            return None

    with pytest.raises(InvalidKeyError, match="naive"):
        encode_key(datetime(2024, 1, 1, tzinfo=NoOffset()))


def test_datetime_outside_utc_range_is_invalid() -> None:
    with pytest.raises(InvalidKeyError, match="outside"):
        encode_key(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))))
    with pytest.raises(InvalidKeyError, match="outside"):
        encode_key(datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))))


def test_lone_surrogate_is_invalid() -> None:
    with pytest.raises(InvalidKeyError, match="surrogate"):
        encode_key("a\ud800b")
    with pytest.raises(InvalidKeyError, match="surrogate"):
        encode_key(("ok", "\udfff"))
    with pytest.raises(InvalidKeyError, match="surrogate"):
        encode_id("\ud800")


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ([1, 2], "tuple"),
        ({"a": 1}, "items"),
        ({1}, "sorted"),
        (frozenset(), "sorted"),
        (Decimal("1.5"), "an int .in the smallest unit, e.g. cents. or a float"),
        (Fraction(1, 3), "an int .in the smallest unit, e.g. cents. or a float"),
        (date(2024, 1, 1), "datetime.combine"),
        (time(12), "None, bool, int, float, str, bytes"),
        (complex(1, 2), "None, bool, int, float, str, bytes"),
        (object(), "None, bool, int, float, str, bytes"),
        ((1, [2]), "tuple"),
    ],
    ids=[
        "list",
        "dict",
        "set",
        "frozenset",
        "Decimal",
        "Fraction",
        "date",
        "time",
        "complex",
        "object",
        "list in tuple",
    ],
)
def test_unsupported_types(key: object, hint: str) -> None:
    with pytest.raises(UnsupportedKeyTypeError, match=hint) as info:
        encode_key(key)
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnsupportedKeyTypeError):
        encode_body(key)
    with pytest.raises(UnsupportedKeyTypeError):
        validate_key(key)


@pytest.mark.parametrize(
    "key",
    [
        date(2024, 1, 1),
        Decimal("1.5"),
        Fraction(1, 3),
        time(12),
        complex(1, 2),
        object(),
        (1, date(2024, 1, 1)),
    ],
    ids=["date", "Decimal", "Fraction", "time", "complex", "object", "date in tuple"],
)
def test_no_hint_advises_a_conversion_that_sorts_apart_from_the_bounds(key: object) -> None:
    """A date key's error advised ``d.isoformat()``, and a Decimal's a str: a str is a valid key, but
    it sorts after every number and before every datetime, so a bound of the natural type (a datetime,
    a number) then selected every such key or none, without an error."""
    with pytest.raises(UnsupportedKeyTypeError) as info:
        encode_key(key)
    message = str(info.value)
    assert "isoformat" not in message and "str(" not in message and " or str" not in message, message
    assert (
        "; convert every key and bound the same way: a bound of another type than the keys selects by "
        "the order of the types (numbers < str < bytes < datetime < tuple) without an error" in message
    ), message
    if isinstance(key, date) or key == (1, date(2024, 1, 1)):
        assert "datetime.combine(d, time(), tzinfo=timezone.utc)" in message


def test_an_item_or_a_position_given_as_a_key_is_told_to_pass_its_key() -> None:
    """``insert(tx, item, ...)`` advised to convert the Item "to one of these types"."""
    from tallytree import Item, Position

    for position in (Item(1, "a"), Position(1, "a")):
        with pytest.raises(UnsupportedKeyTypeError, match=r"an Item or a Position is no key: pass its \.key"):
            encode_key(position)


@pytest.mark.parametrize("id_", [True, False, 1.5, 1.0, None, (1,), datetime(2024, 1, 1, tzinfo=UTC), [1]])
def test_encode_id_rejects_other_types(id_: object) -> None:
    with pytest.raises(UnsupportedKeyTypeError, match="ids must be str, int or bytes"):
        encode_id(id_)


def test_encode_id_accepts_str_int_bytes() -> None:
    for id_ in ["a", 0, -(10**30), b"\x00", bytearray(b"x"), Color.RED]:
        assert encode_id(id_) == encode_key(id_)


def test_encode_prefix_rejects_non_tuples() -> None:
    for prefix in [[1], 1, "a", None]:
        with pytest.raises(UnsupportedKeyTypeError, match="tuple"):
            encode_prefix(prefix)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        encode_prefix((NAN,))
    with pytest.raises(KeyTooLargeError):
        encode_prefix(("x" * 300,))


def test_validate_key() -> None:
    assert validate_key((1, "a", None)) is None
    with pytest.raises(InvalidKeyError):
        validate_key(NAN)


# --------------------------------------------------------------------------------------------
# Decoding damaged data
# --------------------------------------------------------------------------------------------

GARBAGE = {
    "empty": "",
    "unknown type code": "99",
    "ff type code": "ff",
    "unterminated str": "40 61 62",
    "invalid utf-8": "40 ff 00",
    "unterminated bytes": "50 00 ff",
    "truncated exponent": "33 81",
    "truncated fraction": "33 80 81",
    "missing suffix": "33 80 00",
    "bad suffix byte": "33 80 00 02",
    "non-minimal exponent": "33 81 00 00 00",
    "non-minimal negative exponent": "33 7e ff 00 00 01",
    "exponent too long": "33 84 01 00 00 00 00 00",
    "zero fraction with a continuation": "33 80 01 00 00",
    "trailing zero group": "33 80 81 00 01",  # 1.5 written with a needless 00 group
    "inf as int": "34 00",
    "0.5 as int": "33 7f fe 00 00",
    "2**60+1 as float": "33 81 3c 01 01 01 01 01 01 01 01 10 01",
    "2**1024 as float": "33 82 04 00 00 01",
    "truncated datetime": "60 80 00",
    "datetime out of range": "60 ff ff ff ff ff ff ff ff",
    "unterminated tuple": "70 10",
    "truncated tuple suffix": "70 33 80 00 00",
    "deep tuple": "70" * 300,
    "longer than the limit": "50" + "61" * 300 + "00",
}


@pytest.mark.parametrize("data", list(GARBAGE.values()), ids=list(GARBAGE))
def test_decode_rejects_garbage(data: str) -> None:
    with pytest.raises(CorruptDatabaseError, match="tallytree check"):
        decode_key(bytes.fromhex(data))


def test_decode_checks_the_garbage_cases_are_near_valid() -> None:
    # The "2**60+1 as float" case really is 2**60+1's body: only the suffix byte is wrong.
    assert encode_key(2**60 + 1) == bytes.fromhex("33 81 3c 01 01 01 01 01 01 01 01 10 00")
    assert encode_key(2**1024) == bytes.fromhex("33 82 04 00 00 00")


def test_decode_offset_past_the_end() -> None:
    with pytest.raises(CorruptDatabaseError):
        decode_key(encode_key(1), 4)


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=24), keys.map(encode_key)), st.data())
def test_decode_accepts_only_canonical_encodings(data: bytes, choices: st.DataObject) -> None:
    """Whatever decodes must re-encode to the very same bytes; everything else is corruption."""
    mutated = bytearray(data)
    for _ in range(choices.draw(st.integers(0, 2))):
        if mutated:
            index = choices.draw(st.integers(0, len(mutated) - 1))
            mutated[index] = choices.draw(st.integers(0, 255))
    mutated = (
        mutated[: choices.draw(st.integers(0, len(mutated)))] if choices.draw(st.booleans()) else mutated
    )
    try:
        key, end = decode_key(bytes(mutated))
    except CorruptDatabaseError:
        return
    assert encode_key(key) == bytes(mutated[:end])


def test_sort_by_encoding_equals_sort_by_reference() -> None:
    pool: list[object] = [entry for entry, _ in GOLDEN if not isinstance(entry, memoryview)]
    by_reference = sorted(pool, key=functools.cmp_to_key(reference_cmp))
    by_encoding = sorted(pool, key=encode_key)
    assert [encode_key(k) for k in by_reference] == [encode_key(k) for k in by_encoding]


class _NumpyLike:
    """What tallytree reads of a numpy scalar (its type's module, ``ndim``, ``dtype.kind`` and
    ``item()``), so that the duck typing is tested where numpy is not installed."""

    __module__ = "numpy"

    def __init__(self, item: object, kind: str, ndim: int = 0) -> None:
        self._item = item
        self.dtype = type("dtype", (), {"kind": kind})()
        self.ndim = ndim

    def item(self) -> object:
        return self._item


@pytest.mark.parametrize("kernels", ["built", "python"])
def test_a_numpy_scalar_encodes_as_the_python_value_it_holds(kernels: str) -> None:
    """A numpy integer, float or bool (known by its type's module and dtype kind) is its ``item()``,
    with that type's rules; a datetime64 is naive (InvalidKeyError); other kinds and arrays that
    are not 0-d are unsupported."""
    with pure_python() if kernels == "python" else nullcontext():
        for fake, plain in (
            (_NumpyLike(5, "i"), 5),
            (_NumpyLike(2**64 - 1, "u"), 2**64 - 1),
            (_NumpyLike(0.5, "f"), 0.5),
            (_NumpyLike(True, "b"), True),
        ):
            assert encode_key(fake) == encode_key(plain)
            assert encode_body(fake) == encode_body(plain)
            assert encode_key((fake, "a")) == encode_key((plain, "a"))
        assert encode_id(_NumpyLike(7, "i")) == encode_id(7)
        for not_an_id in (_NumpyLike(True, "b"), _NumpyLike(0.5, "f")):
            with pytest.raises(UnsupportedKeyTypeError, match="ids must be str, int or bytes"):
                encode_id(not_an_id)
        with pytest.raises(InvalidKeyError, match="NaN"):
            encode_key(_NumpyLike(math.nan, "f"))
        with pytest.raises(InvalidKeyError, match="numpy datetime64, which holds no timezone"):
            encode_key(_NumpyLike(date(2024, 5, 1), "M"))
        for unsupported in (
            _NumpyLike(5, "i", ndim=1),  # an array of one element: no scalar
            _NumpyLike(5, "m"),  # a timedelta64
            _NumpyLike(1j, "c"),
            _NumpyLike(Decimal("1.5"), "f"),  # a longdouble's item() is no float
        ):
            with pytest.raises(UnsupportedKeyTypeError, match="has unsupported type"):
                encode_key(unsupported)


def test_numpy_is_not_imported_to_encode_its_scalars() -> None:
    """numpy is no dependency: recognizing its scalars imports nothing (here, with a stand-in)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from tallytree._keys import encode_key\n"
        "class Int:\n"
        "    __module__ = 'numpy'\n"
        "    ndim = 0\n"
        "    dtype = type('dtype', (), {'kind': 'i'})()\n"
        "    def item(self): return 5\n"
        "assert encode_key(Int()) == encode_key(5)\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
