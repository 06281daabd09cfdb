"""tallytree: exact counts, sums, ranks and pages over large, changing collections in O(log n).

Layers, each importing only the ones below it::

    __init__      the public API (this file)
    _db           Database: open(), transactions, aggregate definitions
    _hooks        Change, ChangeHandler, verify / repair against an external source
    _table        Table: documents with attached aggregates kept in sync
    _extract      extractors: how a document becomes an item; item moves below the public API
    _aggregate    Aggregate: bounds, reads, writes, buckets; Item, Position, Totals, Page
    _buckets      bucket edges (time widths, calendar months) and Bucket
    _bulk         bottom-up bulk building from (un)sorted items, external sort
    _check        the invariant checker
    _txn          read / write transactions, the copy-on-write overlay
    _btree        the order-statistic B+ tree of counts and exact sums (no storage code)
    _node         node layout, exact summaries, byte format
    _docs         what a document holds: numpy and pandas values stored as the Python ones
    _keys         order-preserving key encoding
    _store        the three-table storage interface, node cache, in-memory backend
    _lmdb         the LMDB backend
    _lmdbfile     backups and the space of an LMDB file (its free list, read from the file)
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
from ._buckets import Bucket
from ._bulk import BuildReport
from ._check import Problem, check
from ._db import DEFAULT_NODE_SIZE, Database, open, open_memory
from ._extract import Definition
from ._hooks import Change, ChangeHandler, Drift, DriftExample, repair, verify
from ._keys import MAX_KEY_BYTES
from ._table import Table
from ._txn import ReadTransaction, Transaction, WriteTransaction
from .errors import (
    AggregateNotFoundError,
    ArgumentTypeError,
    BoundKeyTypeError,
    BoundsError,
    BoundsTypeError,
    CorruptDatabaseError,
    DatabaseFormatError,
    DuplicateItemError,
    Error,
    ExtractionError,
    InvalidArgumentError,
    InvalidDocumentError,
    InvalidKeyError,
    InvalidValueError,
    ItemNotFoundError,
    KeyTooLargeError,
    MapFullError,
    OutOfRangeError,
    ReadOnlyError,
    SchemaMismatchError,
    StorageError,
    TableNotFoundError,
    TransactionError,
    UnknownFieldError,
    UnsortedInputError,
    UnsupportedKeyTypeError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NODE_SIZE",
    "MAX_KEY_BYTES",
    "Aggregate",
    "AggregateNotFoundError",
    "ArgumentTypeError",
    "BoundKeyTypeError",
    "BoundsError",
    "BoundsTypeError",
    "Bucket",
    "BuildReport",
    "Change",
    "ChangeHandler",
    "CorruptDatabaseError",
    "Database",
    "DatabaseFormatError",
    "Definition",
    "Drift",
    "DriftExample",
    "DuplicateItemError",
    "Error",
    "ExtractionError",
    "InvalidArgumentError",
    "InvalidDocumentError",
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
    "StorageError",
    "Table",
    "TableNotFoundError",
    "Totals",
    "Transaction",
    "TransactionError",
    "UnknownFieldError",
    "UnsortedInputError",
    "UnsupportedKeyTypeError",
    "WriteTransaction",
    "__version__",
    "check",
    "open",
    "open_memory",
    "repair",
    "verify",
]
