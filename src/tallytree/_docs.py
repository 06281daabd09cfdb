"""What a table document may hold, and the values of other types that stand for those.

Design
======
A document is stored as msgpack (``_table.encode_doc``), which packs by itself: None, bool, int (from
``-2**63`` to ``2**64 - 1``, int subclasses as their int), float (``numpy.float64`` too, a float
subclass), str, bytes, a timezone-aware ``datetime`` (as its instant, read back in UTC, to the
microsecond), lists and tuples (read back as lists) and dicts of these. A document that holds any
other value, at any depth, is packed again with msgpack's ``default=`` hook, :func:`stand_in`, which
returns the stored value that each such value stands for, or raises :class:`Refused`. A plain
document is packed once, without the hook (passing it always made a plain ``Table.insert`` run 1.3%
more instructions, callgrind); a document with numpy values is packed twice (its encoding costs about
twice that of the hook alone, ~3x a plain document's).

Values that stand for stored ones (recognized by duck typing; numpy and pandas are never imported):

* a numpy bool, integer or float (float16, float32; a 0-d array too): the Python bool, int or float
  it holds (``.item()``, as for keys: :func:`~tallytree._keys.foreign_scalar`);
* a ``datetime`` subclass (a pandas ``Timestamp``): its instant, as a plain datetime in UTC, which
  is what reads back, equal to it. Refused as a key would be: naive (no instant), ``NaT``, or a
  Timestamp with nanoseconds (a document holds microseconds, like keys: it would read back as
  another instant). The messages are the keys' (``_keys``), with the same hints.

Refused, with a hint that says what to convert to: a numpy ``datetime64`` (the keys' message), numpy
arrays and pandas Series (``.tolist()``), other numpy scalars (``float(value)``...), sets (``sorted(value)``),
dates, timedeltas, Decimals, pandas' ``NA`` (``None``), and any other object.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from ._keys import _not_a_key, _show, _subclass_datetime_body, foreign_scalar
from .errors import InvalidDocumentError, InvalidKeyError

__all__ = ["STORED_TYPES", "Refused", "path_to", "stand_in"]

STORED_TYPES = (
    "None, bool, int (64-bit), float, str, bytes, timezone-aware datetime, lists and dicts of these"
)
"""What a document holds, as the messages name it."""


class Refused(InvalidDocumentError):
    """A value that no stored value stands for (``value``), raised from msgpack's hook; the encoder
    names where in the document it is (:func:`path_to`)."""

    def __init__(self, value: object, message: str) -> None:
        super().__init__(message)
        self.value = value


def stand_in(value: object) -> Any:
    """The stored value that ``value``, of a type msgpack does not pack, stands for: msgpack's
    ``default=`` hook for documents (see the module docstring). O(1).

    >>> from datetime import datetime, timezone, timedelta
    >>> class Stamp(datetime): pass
    >>> stand_in(Stamp(2024, 5, 1, 2, tzinfo=timezone(timedelta(hours=2))))
    datetime.datetime(2024, 5, 1, 0, 0, tzinfo=datetime.timezone.utc)
    >>> stand_in({1, 2})
    Traceback (most recent call last):
    tallytree._docs.Refused: value {1, 2} is a set, which a document cannot hold; store a list, ...

    Raises :class:`Refused` (an InvalidDocumentError) for a value that stands for none.
    """
    if isinstance(value, datetime):  # a subclass (pandas' Timestamp, NaT), or a naive datetime
        try:
            _subclass_datetime_body(value, "value")  # refuses as for a key: naive, NaT, nanoseconds
        except InvalidKeyError as exc:
            raise Refused(value, str(exc)) from None
        offset = value.utcoffset()
        assert offset is not None  # (a naive one was refused)
        plain = datetime(
            value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond, UTC
        )
        return plain - offset
    plain_scalar = foreign_scalar(value)
    if plain_scalar is not None:
        return plain_scalar
    raise Refused(value, _refusal(value))


def _refusal(value: object) -> str:
    """The message for a value that no stored value stands for, with what to convert it to. O(1)."""
    shown = "value " + " ".join(_show(value).split())  # (a Series shows on several lines)
    error = _not_a_key(value, "value")
    if isinstance(error, InvalidKeyError):  # a numpy datetime64: what keys say of it
        return str(error)
    module = type(value).__module__.partition(".")[0]
    name = type(value).__qualname__
    if module == "numpy" and getattr(value, "ndim", 0) != 0:
        hint = "convert an array to a list, value.tolist()"
    elif module == "numpy":
        hint = "convert it to a value of these, e.g. float(value), int(value) or str(value)"
    elif module == "pandas" and hasattr(value, "tolist"):
        hint = "convert it to a list, value.tolist()"
    elif module == "pandas" and value.__class__.__name__ == "NAType":
        hint = "store a missing value as None"
    elif isinstance(value, (set, frozenset)):
        return f"{shown} is a {name}, which a document cannot hold; store a list, e.g. sorted(value)"
    elif isinstance(value, timedelta):
        hint = "store a number, e.g. value.total_seconds() (or an int count of the smallest unit)"
    elif isinstance(value, date):
        hint = "store an aware datetime, e.g. datetime.combine(value, time(), tzinfo=timezone.utc)"
    elif name in {"Decimal", "Fraction"}:
        hint = "store a number, an int (in the smallest unit, e.g. cents) or float(value), or str(value)"
    else:
        hint = "convert it to one of these"
    return f"{shown} has type {name}, which a document cannot hold ({STORED_TYPES}); {hint}"


def path_to(doc: Any, target: object) -> str | None:
    """Where ``target`` (the very object) is in ``doc``, as subscripts (``['items'][2]['price']``),
    or None if it is not there (a dict key, say). For error messages only: O(size of the document).

    >>> path_to({"a": [1, {"b": (2, 3)}]}, 3)
    "['a'][1]['b'][1]"
    """
    pending: list[tuple[Any, str]] = [(doc, "")]
    while pending:
        here, path = pending.pop()
        if isinstance(here, dict):
            children: Any = here.items()
        elif isinstance(here, (list, tuple)):
            children = enumerate(here)
        else:
            continue
        for key, child in children:
            where = f"{path}[{_show(key)}]"
            if child is target:
                return where
            pending.append((child, where))
    return None
