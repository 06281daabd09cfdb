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
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import MAXYEAR, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._args import iterator_of
from ._keys import _show
from .errors import ArgumentTypeError, BoundsError, BoundsTypeError

if TYPE_CHECKING:
    from ._aggregate import Totals

__all__ = ["MAX_BUCKETS", "Bucket", "bucket_edges"]

MAX_BUCKETS = 1_000_000
_MONTHS = {"month": 1, "quarter": 3, "year": 12}
_LAST_YEAR = f"the year {MAXYEAR}, the last a datetime can have"


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


def _too_far(start: Any, width: Any, count: int, limit: str) -> BoundsError:
    """The error for buckets whose last edge is beyond ``limit`` (what a key of start's type can hold)."""
    return BoundsError(
        f"buckets(start={_show(start)}, width={_show(width)}, count={count}) run past {limit}; use "
        "fewer or narrower buckets, or an earlier start"
    )


def bucket_edges(start: Any, width: Any, count: Any, edges: Iterable[Any] | None) -> list[Any]:
    """The ``k + 1`` edges of ``k`` buckets, from ``edges=`` or from ``start``/``width``/``count``.

    Raises BoundsError for a width or count out of range and for edges beyond what a key of the
    start's type can be (past the year 9999, or past the largest float), and BoundsTypeError for an
    argument of the wrong type. O(k).
    """
    if edges is not None:
        if start is not None or width is not None or count is not None:
            raise BoundsError("give either edges= or start=, width= and count=, not both")
        if isinstance(edges, str | bytes):  # iterable, but as characters: surely not what was meant
            raise BoundsTypeError(f"edges= takes a sequence of keys, e.g. [0, 10, 20], not {_show(edges)}")
        try:
            iterator = iterator_of(edges, "buckets(edges=)", "keys, e.g. [0, 10, 20]")
        except ArgumentTypeError as exc:  # a read option of the wrong type: a BoundsError too
            raise BoundsTypeError(str(exc)) from None
        result = list(iterator)
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
        raise BoundsError(f"count must be an int from 1 to {MAX_BUCKETS}, not {_show(count)}")
    unit = width
    step = 1
    if isinstance(width, tuple) and len(width) == 2 and type(width[1]) is int:  # a bool is no step
        unit, step = width
    if isinstance(unit, str):
        if unit not in _MONTHS or step < 1:
            raise BoundsError(
                f"width={_show(width)}: a calendar width is 'month', 'quarter' or 'year', or (unit, n) "
                "with n an int >= 1"
            )
        if not isinstance(start, datetime):
            raise BoundsError(f"width={_show(width)} needs a datetime start, not {_show(start)}")
        months = _MONTHS[unit] * step
        if start.year + (start.month - 1 + months * count) // 12 > MAXYEAR:
            raise _too_far(start, width, count, _LAST_YEAR)
        return [_add_months(start, months * index) for index in range(count + 1)]
    if isinstance(width, timedelta):
        if not isinstance(start, datetime):
            raise BoundsError(f"a timedelta width needs a datetime start, not {_show(start)}")
        if width <= timedelta(0):
            raise BoundsError(f"width must be positive, not {width!r}")
        try:
            return [start + width * index for index in range(count + 1)]
        except OverflowError:
            raise _too_far(start, width, count, _LAST_YEAR) from None
    if isinstance(width, int | float) and not isinstance(width, bool):
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise BoundsError(f"a numeric width needs a numeric start, not {_show(start)}")
        if not 0 < width < math.inf:  # nan and inf too: inf would make the edge 0 * inf, a nan
            raise BoundsError(f"width must be a finite positive number, not {_show(width)}")
        try:
            result = [start + width * index for index in range(count + 1)]
        except OverflowError:  # an int too large for a float, added to a float
            raise _too_far(start, width, count, "the largest float") from None
        if isinstance(result[-1], float) and math.isinf(result[-1]) and not math.isinf(start):
            raise _too_far(start, width, count, "the largest float")
        return result
    if isinstance(width, tuple) and len(width) == 2 and isinstance(width[0], str) and width[0] in _MONTHS:
        raise BoundsError(f"width={_show(width)}: n in (unit, n) is an int >= 1, not {_show(width[1])}")
    error = BoundsError if isinstance(width, tuple) else BoundsTypeError  # a tuple of the wrong shape
    raise error(
        f"width={_show(width)}: use a number (numeric keys), a timedelta (datetime keys) or 'month'/"
        "'quarter'/'year' (or (unit, n))"
    )
