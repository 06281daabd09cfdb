"""The optional C kernels, if they were built: ``speedups`` is the ``_speedups`` module, or None.

Design
======
``_speedups`` (C, built by ``setup.py`` when a compiler is present; ``optional=True``, so an install
without one still succeeds) holds faster twins of pure functions: the int, datetime and str key
encoders of ``_bulk`` and ``_keys``, the exact float sum and the node packers of ``_node``, and the
key search, descents and leaf-span sums of ``_btree``. The Python functions stay the reference and
the fallback: each C function returns None for any input it does not handle, and the caller then
runs the Python code. Answers are the same
either way (tests compare the two on random inputs, and CI runs the core tests without them).

Set the environment variable ``TALLYTREE_PURE_PYTHON=1`` before importing tallytree to run without
them (to compare, or to rule them out when chasing a bug).

>>> from tallytree._native import speedups
>>> speedups is None or speedups.int_keys([1]) == [bytes.fromhex("33 80 00 00")]
True
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Protocol

__all__ = ["NodeStore", "Speedups", "kernels", "speedups"]


class NodeStore(Protocol):
    """Where ``_store.NodeCache`` keeps its nodes: ``_speedups.NodeTable`` or ``_store.NodeDict``."""

    @property
    def capacity(self) -> int: ...
    def __len__(self) -> int: ...
    def get(self, node_id: int, /) -> Any: ...
    def put(self, node: Any, /) -> None: ...
    def discard(self, node_id: int, /) -> None: ...
    def clear(self) -> None: ...


StoredSource = tuple[dict[int, Any], dict[int, bytes], Callable[[bytes], "bytes | None"]]
"""Where a write transaction's stored node bytes come from, for ``merge_children`` to read them
without a Python call per node: the ids to skip (nodes the transaction changed), nodes given in
stored form by id, and ``get(key)`` of the NODES table (see ``WriteTransaction.stored_source``)."""

WriteKit = tuple[
    Callable[[int], Any],
    object,
    StoredSource,
    dict[int, Any],
    dict[int, bytes],
    dict[int, Any],
    dict[int, int],
    list[int],
    Any,
    type,
    type,
    int,
]
"""A write transaction's pieces, for ``insert_stored`` to write a path without a Python call (see
``WriteTransaction.write_kit``): ``node``, the shared cache's store, the :data:`StoredSource`, the
dirty, encoded, prepared and overwritten nodes, the freed ones, the node cache (its ``hits``), and
the node classes ``Node`` and ``_PatchedNode``, and ``_txn.VERSIONS``."""


class Speedups(Protocol):
    """What ``_speedups`` provides (each returns None for input it leaves to the Python code)."""

    def NodeTable(self, capacity: int, /) -> NodeStore: ...  # the extension's type

    SLOT_BITS: int  # _txn.SLOT_BITS, which the kernels' node ids assume

    def int_keys(self, values: Sequence[int], /) -> list[bytes] | None: ...
    def datetime_keys(self, values: Sequence[datetime], /) -> list[bytes] | None: ...
    def one_key(self, value: object, body: bool, limit: int, /) -> bytes | None: ...
    def item_entry(self, key: object, id: object, limit: int, /) -> bytes | None: ...
    def plain_values(self, values: object, count: int, /) -> tuple[int | float, ...] | None: ...
    def put_ops(self, txn: Any, dbs: list[Any], ops: list[Any], start: int, /) -> None: ...
    def join_limbs(self, limbs: Sequence[Sequence[int]], /) -> tuple[int, ...] | None: ...
    def text_keys(self, values: Sequence[str], limit: int, /) -> list[bytes] | None: ...
    def find(
        self, node: Any, entry: bytes, fetch: Any, nodes: object, fields: int = ..., /
    ) -> tuple[Any, int | None, int]: ...
    def select(
        self, node: Any, index: int, fetch: Any, nodes: object, item: bool = False, fields: int = ..., /
    ) -> tuple[Any, int | None, int]: ...
    def bisect(self, node: Any, key: bytes, right: bool, /) -> int: ...
    def decode_entry(self, entry: bytes, limit: int, /) -> tuple[Any, Any] | None: ...
    def delta_of(self, values: Sequence[int | float], /) -> list[int] | None: ...
    def append_pending(
        self, packed: bytes, entry: bytes, values: tuple[int | float, ...], capacity: int, /
    ) -> bytes | None: ...
    def pending_edges(self, packed: bytes, /) -> tuple[int, bytes, bytes] | None: ...
    def float_sum(self, values: Sequence[float], /) -> int | None: ...
    def merge_children(
        self,
        keys: Sequence[bytes],
        kids: Sequence[int],
        entries: list[bytes],
        lo: int,
        hi: int,
        cols: list[list[Any]],
        limit: int,
        target: int,
        stored: Callable[[int], bytes | None] | StoredSource,
        /,
    ) -> list[tuple[int, int, int, int, Any]]: ...
    def pack_node(self, head: int, parts: tuple[Sequence[Any], ...], /) -> bytes | None: ...
    def pack_internal(self, parts: tuple[Sequence[Any], ...], nfields: int, /) -> bytes | None: ...
    def add_spans(self, node: Any, rows: list[Any], prefixes: list[tuple[int, list[int]]], /) -> bool: ...
    def bump_internal(
        self,
        node: Any,
        packed: bytes | None,
        index: int,
        kid: int,
        delta: list[int],
        nfields: int,
        patch: dict[int, tuple[int, ...]] | None = None,
        tuples: bool = False,
        /,
    ) -> tuple[Any, ...] | None: ...
    def patched_parts(
        self, base: Any, patch: dict[int, tuple[int, ...]], nfields: int, /
    ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None: ...
    def bump_path(
        self,
        path: list[tuple[Any, int]],
        ids: list[int],
        child: int,
        delta: list[int],
        plain: type,
        patched: type,
        /,
    ) -> list[Any]: ...
    def stored_path(
        self, root: Any, entry: bytes, height: int, fetch: Any, nodes: object, plain: type, patched: type, /
    ) -> tuple[list[tuple[Any, int]], bool, int, list[int]] | None: ...
    def insert_stored(
        self,
        root_id: int,
        entry: bytes,
        height: int,
        inside: bool,
        values: tuple[Any, ...],
        limit: int,
        delta: list[int],
        kit: WriteKit,
        /,
    ) -> Any: ...
    def packed_layout(self, packed: bytes, count: int, columns: int, /) -> bytes | None: ...
    def make_patched(
        self, node: Any, plain: type, nfields: int, /
    ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None: ...
    def sort_order(self, items: list[bytes], /) -> list[int] | None: ...
    def leaf_edit(
        self, data: bytes, entry: bytes, values: tuple[int | float, ...] | None, nfields: int, /
    ) -> tuple[bytes, tuple[int | float, ...], int] | bool | None: ...
    def repack_internal(self, node: Any, origin: Any, packed: bytes, nfields: int, /) -> bytes | None: ...
    def freeze_node(self, node: Any, /) -> Any: ...
    def untrack(self, node: Any, /) -> Any: ...
    def valid_node(self, leaf: bool, keys: Any, kids: Any, cols: Any, shifts: Any, /) -> bool: ...
    def leaf_image(self, data: bytes, kind: int = 1, /) -> tuple[bytes, int] | None: ...
    def leaf_lists(self, image: bytes, /) -> tuple[tuple[bytes, ...], tuple[tuple[Any, ...], ...]] | None: ...
    def leaf_rows(
        self, image: bytes, start: int, stop: int, /
    ) -> tuple[tuple[bytes, ...], tuple[tuple[Any, ...], ...]] | None: ...
    def range_totals(
        self,
        node: Any,
        summary: Sequence[int] | None,
        low: bytes | None,
        low_after: bool,
        high: bytes | None,
        high_after: bool,
        fetch: Any,
        nodes: object,
        fields: int,
        extra: Sequence[int] | None = None,
        values: bool = False,
        pending: Any = None,
        pending_summary: Sequence[int] | None = None,
        /,
    ) -> tuple[list[Any], int] | None: ...
    def pack_root(
        self,
        node_id: int,
        height: int,
        summary: list[int],
        pending: int | bytes,
        pending_summary: list[int] | None,
        /,
    ) -> bytes | None: ...
    def unpack_root(
        self, data: bytes, /
    ) -> tuple[int, int, list[int], int | bytes | None, list[int] | None] | None: ...
    def thaw(self, node: Any, /) -> tuple[list[Any], list[Any], list[Any], list[Any]]: ...
    def rank(
        self, node: Any, key: bytes, after: bool, fetch: Any, nodes: object, fields: int = ..., /
    ) -> tuple[int, int]: ...
    def rank_range(
        self,
        node: Any,
        low: bytes,
        low_after: bool,
        high: bytes,
        high_after: bool,
        fetch: Any,
        nodes: object,
        fields: int = ...,
        /,
    ) -> tuple[int, int, int]: ...
    def settle(
        self,
        plus: list[Sequence[int]],
        minus: list[Sequence[int]],
        spans: Sequence[tuple[Any, ...]],
        fields: int,
        /,
    ) -> list[int] | None: ...


_built: Speedups | None
try:
    from . import _speedups

    _built = _speedups
except ImportError:  # not built (no C compiler at install time): the Python code does the work
    _built = None

speedups: Speedups | None = None if os.environ.get("TALLYTREE_PURE_PYTHON", "") not in ("", "0") else _built


# the modules that bind ``speedups`` at import
_USERS = ("_aggregate", "_btree", "_bulk", "_keys", "_lmdb", "_node", "_tree", "_txn")


@contextmanager
def kernels(built: bool) -> Iterator[None]:
    """Run the block with the C kernels (if they were built) or, ``built=False``, with the Python code.

    For tests and benchmarks that compare the two in one process. Not thread-safe: it rebinds
    ``speedups`` in the modules that use it, and restores them afterwards. O(1).

    >>> from tallytree import _keys
    >>> with kernels(False):
    ...     _keys.speedups is None
    True
    """
    modules = [importlib.import_module(f"tallytree.{name}") for name in _USERS]
    saved = [getattr(module, "speedups") for module in modules]  # noqa: B009 (modules typed loosely)
    for module in modules:
        setattr(module, "speedups", _built if built else None)  # noqa: B010
    try:
        yield
    finally:
        for module, kept in zip(modules, saved, strict=True):
            setattr(module, "speedups", kept)  # noqa: B010
