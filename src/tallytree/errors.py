"""The exceptions tallytree raises.

Every error derives from :class:`Error`, and each also subclasses the closest built-in exception, so
``except KeyError`` keeps working for code that does not know tallytree, and ``except tallytree.Error``
catches everything the library raises on purpose. Messages say what was wrong and what to do about it.

A failed operation leaves the database as it was: writes validate their input before they touch a tree,
and a transaction whose ``with`` block raises is aborted as a whole.
"""

from __future__ import annotations

__all__ = [
    "AggregateNotFoundError",
    "ArgumentTypeError",
    "BoundKeyTypeError",
    "BoundsError",
    "BoundsTypeError",
    "CorruptDatabaseError",
    "DatabaseFormatError",
    "DuplicateItemError",
    "Error",
    "ExtractionError",
    "InvalidArgumentError",
    "InvalidDocumentError",
    "InvalidKeyError",
    "InvalidValueError",
    "ItemNotFoundError",
    "KeyTooLargeError",
    "MapFullError",
    "OutOfRangeError",
    "ReadOnlyError",
    "SchemaMismatchError",
    "StorageError",
    "TableNotFoundError",
    "TransactionError",
    "UnknownFieldError",
    "UnsortedInputError",
    "UnsupportedKeyTypeError",
]


class Error(Exception):
    """Base class of every error tallytree raises on purpose."""


class InvalidKeyError(Error, ValueError):
    """A key, id or namespace has a supported type but an unusable value (NaN, naive datetime)."""


class UnsupportedKeyTypeError(Error, TypeError):
    """A key, id or namespace has a type that has no place in the key order (a list, a set, an object)."""


class KeyTooLargeError(InvalidKeyError):
    """A key, id or namespace encodes to more bytes than the limit allows."""


class InvalidValueError(Error, ValueError):
    """The values of an item do not match the aggregate's fields (wrong count, type, NaN, infinity)."""


class DuplicateItemError(Error, KeyError):
    """A strict insert found an item with the same (key, id) already in the namespace."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ItemNotFoundError(Error, KeyError):
    """A strict delete or replace did not find the item it was asked to change."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AggregateNotFoundError(Error, KeyError):
    """An aggregate was opened by name without ``create=True`` and does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TableNotFoundError(Error, KeyError):
    """A table was opened by name with ``create=False`` and does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownFieldError(InvalidValueError, KeyError):
    """A value field was asked for by a name its aggregate does not have (``totals["nope"]``,
    ``totals.mean("nope")``, ``aggregate.sum(tx, "nope")``). A KeyError, as a missing key of a mapping
    is, and an InvalidValueError, which ``sum`` raised before."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(Error, IndexError):
    """A positional read (``at``) asked for an index outside the items within the bounds."""


class BoundsError(Error, ValueError):
    """The bounds of a read conflict (``ge`` with ``gt``, ``prefix`` with ``eq``, ...) or are malformed."""


class SchemaMismatchError(Error, ValueError):
    """An aggregate was reopened with value fields or options that differ from the stored definition."""


class TransactionError(Error, RuntimeError):
    """A transaction was used wrongly: after it ended, from a read transaction for a write, nested, or
    beyond the read transactions a database can have open at once."""


class ReadOnlyError(TransactionError, PermissionError):
    """A write was attempted on a database opened with ``readonly=True``."""


class MapFullError(Error, OSError):
    """The LMDB map is full and could not grow (``max_map_size`` reached or other transactions open)."""


class StorageError(Error, OSError):
    """The storage failed under a commit (a full disk, an I/O error, a file size limit): nothing of the
    transaction was written, and the database is as it was before it."""


class DatabaseFormatError(Error, ValueError):
    """The path is not a tallytree database, or was written by an incompatible format version."""


class CorruptDatabaseError(DatabaseFormatError):
    """A stored node or record could not be decoded; run ``tallytree check`` to locate the damage."""


class InvalidDocumentError(Error, ValueError):
    """A table document is not a mapping, or holds a value msgpack cannot store (a naive datetime, an
    object, an int beyond 64 bits)."""


class ExtractionError(Error, ValueError):
    """An extractor (key, namespace, a value or where) failed on a document: a missing field, a value of
    the wrong type, or an exception raised by an extractor function. Nothing was written.

    ``aggregate``, ``document_id`` and ``field`` say where; the original exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, aggregate: str, document_id: object, field: str) -> None:
        super().__init__(message)
        self.aggregate = aggregate
        self.document_id = document_id
        self.field = field


class UnsortedInputError(Error, ValueError):
    """A bulk build was told its input is sorted (``sorted=True``) and found an item out of order."""


class InvalidArgumentError(Error, ValueError):
    """An argument other than a key, value or bound is not acceptable: an aggregate, table or field
    name, ``node_size``, ``on_duplicate``, ``fill``, a change kind..."""


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type (an index that is not an int, a change that is not a Change)."""


class BoundsTypeError(ArgumentTypeError, BoundsError):
    """A bound or range option of the wrong type (``page(limit="3")``, ``buckets(count="3")``,
    ``buckets(edges=5)``, ``prefix="ab"``): an ArgumentTypeError, as every argument of the wrong type
    raises, and the BoundsError these raised before. An index (``at(tx, "3")``) or a seed
    (``random(rng=[1])``) is no bound: a plain ArgumentTypeError."""


class BoundKeyTypeError(BoundsTypeError):
    """A bound of another type than the keys it is compared with, in a namespace whose keys are all of
    one type: ``count(tx, ge="2024-01-01")`` over datetime keys, a str bound over int keys, a bare
    datetime over ``(status, ts)`` tuple keys (for tuple keys, the type of the first element counts).
    Keys of different types compare by the order of their types (None < bool < numbers < str < bytes <
    datetime < tuple), not by value, so such a bound would select every key or none, a wrong answer
    without an error. Convert the bound to the keys' type. A namespace whose keys are of several types
    takes bounds of any type, and an empty one answers as always. A BoundsTypeError, so also a
    TypeError and a BoundsError."""
