"""Time buckets: the edges of consecutive half-open key ranges, and the per-bucket result.

Design
======
``Aggregate.buckets`` answers "calls, cost and tokens per day for the last 30 days" in one call. The
``k`` buckets ``[e0, e1), [e1, e2), ... [e(k-1), ek)`` are given by their ``k + 1`` edges: explicitly, or
as ``start`` plus ``count`` steps of ``width``. Each edge is resolved like ``ge=edge`` (a cut before every
key equal in value to the edge), the summary *below* each cut is computed once (one descent each,
``Tree.prefix_summary``), and each bucket is the difference of its two neighbours:
O((k + 1) log n) for the whole series, and the buckets add up exactly to ``totals(ge=e0, lt=ek)``.

Widths: a number for numeric keys, a ``timedelta`` for datetime keys (added in the start's time zone,
so with a ``zoneinfo`` zone a day is a local calendar day, 23 or 25 hours at DST changes), or a
calendar unit ``"month"``, ``"quarter"`` or ``"year"`` (optionally ``(unit, n)``, e.g. ``("month", 3)``).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._args import iterator_of
from ._keys import _show
from .errors import BoundsError, BoundsTypeError

if TYPE_CHECKING:
    from ._aggregate import Totals

__all__ = ["MAX_BUCKETS", "Bucket", "bucket_edges"]

MAX_BUCKETS = 1_000_000
_MONTHS = {"month": 1, "quarter": 3, "year": 12}


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of :meth:`Aggregate.buckets`: the keys in ``[start, end)`` and their totals."""

    start: Any
    end: Any
    totals: Totals

    @property
    def count(self) -> int:
        """The number of items in the bucket."""
        return self.totals.count

    def mean(self, field: str) -> float | None:
        """The mean of a value field over the bucket's items (None for an empty bucket)."""
        return self.totals.mean(field)

    def __getitem__(self, name: str) -> int | float:
        """``bucket["cost"]``: a sum (or ``"count"``), as for :class:`Totals`."""
        return self.totals[name]


def _add_months(start: datetime, months: int) -> datetime:
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def bucket_edges(start: Any, width: Any, count: Any, edges: Iterable[Any] | None) -> list[Any]:
    """The ``k + 1`` edges of ``k`` buckets, from ``edges=`` or from ``start``/``width``/``count``."""
    if edges is not None:
        if start is not None or width is not None or count is not None:
            raise BoundsError("give either edges= or start=, width= and count=, not both")
        if isinstance(edges, str | bytes):  # iterable, but as characters: surely not what was meant
            raise BoundsTypeError(f"edges= takes a sequence of keys, e.g. [0, 10, 20], not {_show(edges)}")
        result = list(iterator_of(edges, "buckets(edges=)", "keys, e.g. [0, 10, 20]"))
        if len(result) < 2:
            raise BoundsError(f"edges= needs at least two edges (one bucket), got {len(result)}")
        if len(result) > MAX_BUCKETS + 1:
            raise BoundsError(f"at most {MAX_BUCKETS} buckets per call")
        return result
    if start is None or width is None or count is None:
        raise BoundsError("buckets() needs start=, width= and count= (or edges=[...])")
    if type(count) is not int:
        raise BoundsTypeError(f"count must be an int from 1 to {MAX_BUCKETS}, not {_show(count)}")
    if not 1 <= count <= MAX_BUCKETS:
        raise BoundsError(f"count must be an int from 1 to {MAX_BUCKETS}, not {count!r}")
    unit = width
    step = 1
    if isinstance(width, tuple) and len(width) == 2 and isinstance(width[1], int):
        unit, step = width
    if isinstance(unit, str):
        if unit not in _MONTHS or step < 1:
            raise BoundsError(
                f"width={width!r}: a calendar width is 'month', 'quarter' or 'year', or (unit, n) with n >= 1"
            )
        if not isinstance(start, datetime):
            raise BoundsError(f"width={width!r} needs a datetime start, not {start!r}")
        months = _MONTHS[unit] * step
        return [_add_months(start, months * index) for index in range(count + 1)]
    if isinstance(width, timedelta):
        if not isinstance(start, datetime):
            raise BoundsError(f"a timedelta width needs a datetime start, not {start!r}")
        if width <= timedelta(0):
            raise BoundsError(f"width must be positive, not {width!r}")
        return [start + width * index for index in range(count + 1)]
    if isinstance(width, int | float) and not isinstance(width, bool):
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise BoundsError(f"a numeric width needs a numeric start, not {start!r}")
        if not width > 0:
            raise BoundsError(f"width must be positive, not {width!r}")
        return [start + width * index for index in range(count + 1)]
    error = BoundsError if isinstance(width, tuple) else BoundsTypeError  # a tuple of the wrong shape
    raise error(
        f"width={_show(width)}: use a number (numeric keys), a timedelta (datetime keys) or 'month'/"
        "'quarter'/'year' (or (unit, n))"
    )
