"""tallytree: exact counts, sums, ranks and pages over large, changing collections in O(log n).

Layers, each importing only the ones below it::

    __init__      the public API (this file)
    _db           Database: open(), transactions, aggregate definitions
    _aggregate    Aggregate: bounds, reads, writes; Item, Position, Totals, Page
    _check        the invariant checker
    _txn          read / write transactions, the copy-on-write overlay
    _btree        the order-statistic B+ tree of counts and exact sums (no storage code)
    _node         node layout, exact summaries, byte format
    _keys         order-preserving key encoding
    _store        the three-table storage interface, node cache, in-memory backend
    _lmdb         the LMDB backend
    errors        the exception hierarchy

>>> import tallytree
>>> db = tallytree.open_memory()
>>> events = db.aggregate("events", values=("cost",))
>>> with db.write() as tx:
...     events.insert(tx, 10, "e1", (0.5,), namespace="user:1")
...     events.insert(tx, 20, "e2", (0.25,), namespace="user:1")
>>> with db.read() as tx:
...     events.totals(tx, namespace="user:1", ge=15)
Totals(count=1, cost=0.25)
"""

from ._aggregate import Aggregate, Item, Page, Position, Totals
from ._check import Problem, check
from ._db import DEFAULT_NODE_SIZE, Database, open, open_memory
from ._keys import MAX_KEY_BYTES
from ._txn import ReadTransaction, Transaction, WriteTransaction
from .errors import (
    AggregateNotFoundError,
    BoundsError,
    CorruptDatabaseError,
    DatabaseFormatError,
    DuplicateItemError,
    Error,
    InvalidKeyError,
    InvalidValueError,
    ItemNotFoundError,
    KeyTooLargeError,
    MapFullError,
    OutOfRangeError,
    ReadOnlyError,
    SchemaMismatchError,
    TransactionError,
    UnsupportedKeyTypeError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NODE_SIZE",
    "MAX_KEY_BYTES",
    "Aggregate",
    "AggregateNotFoundError",
    "BoundsError",
    "CorruptDatabaseError",
    "Database",
    "DatabaseFormatError",
    "DuplicateItemError",
    "Error",
    "InvalidKeyError",
    "InvalidValueError",
    "Item",
    "ItemNotFoundError",
    "KeyTooLargeError",
    "MapFullError",
    "OutOfRangeError",
    "Page",
    "Position",
    "Problem",
    "ReadOnlyError",
    "ReadTransaction",
    "SchemaMismatchError",
    "Totals",
    "Transaction",
    "TransactionError",
    "UnsupportedKeyTypeError",
    "WriteTransaction",
    "__version__",
    "check",
    "open",
    "open_memory",
]
