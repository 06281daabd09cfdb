"""The optional C kernels, if they were built: ``speedups`` is the ``_speedups`` module, or None.

Design
======
``_speedups`` (C, built by ``setup.py`` when a compiler is present; ``optional=True``, so an install
without one still succeeds) holds faster twins of pure functions: the int, datetime and str key
encoders of ``_bulk`` and ``_keys``, the exact float sum of ``_node`` and the leaf-span sums of
``_btree``. The Python functions stay the reference and the fallback: each C function returns None
for any input it does not handle, and the caller then runs the Python code. Answers are the same
either way (tests compare the two on random inputs, and CI runs the core tests without them).

Set the environment variable ``TALLYTREE_PURE_PYTHON=1`` before importing tallytree to run without
them (to compare, or to rule them out when chasing a bug).

>>> from tallytree._native import speedups
>>> speedups is None or speedups.int_keys([1]) == [bytes.fromhex("33 80 00 00")]
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

__all__ = ["Speedups", "speedups"]


class Speedups(Protocol):
    """What ``_speedups`` provides (each returns None for input it leaves to the Python code)."""

    def int_keys(self, values: Sequence[int], /) -> list[bytes] | None: ...
    def datetime_keys(self, values: Sequence[datetime], /) -> list[bytes] | None: ...
    def text_keys(self, values: Sequence[str], limit: int, /) -> list[bytes] | None: ...
    def bisect(self, node: Any, key: bytes, right: bool, /) -> int: ...
    def float_sum(self, values: Sequence[float], /) -> int | None: ...
    def settle(
        self,
        plus: list[Sequence[int]],
        minus: list[Sequence[int]],
        spans: Sequence[tuple[Any, ...]],
        fields: int,
        /,
    ) -> list[int] | None: ...
    def span_sums(self, spans: Sequence[tuple[Any, ...]], fields: int, /) -> list[tuple[int, int] | None]: ...


_built: Speedups | None
try:
    from . import _speedups

    _built = _speedups
except ImportError:  # not built (no C compiler at install time): the Python code does the work
    _built = None

speedups: Speedups | None = None if os.environ.get("TALLYTREE_PURE_PYTHON", "") not in ("", "0") else _built
