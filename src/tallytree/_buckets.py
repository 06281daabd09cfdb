"""Time buckets: the edges of consecutive half-open key ranges, and the per-bucket result.

Design
======
``Aggregate.buckets`` answers "calls, cost and tokens per day for the last 30 days" in one call. The
``k`` buckets ``[e0, e1), [e1, e2), ... [e(k-1), ek)`` are given by their ``k + 1`` edges: explicitly, or
as ``start`` plus ``count`` steps of ``width``. Each edge is resolved like ``ge=edge`` (a cut before every
key equal in value to the edge), the summary *below* each cut is computed once (one descent each,
``Tree.prefix_summary``), and each bucket is the difference of its two neighbours:
O((k + 1) log n) for the whole series, and the buckets add up exactly to ``totals(ge=e0, lt=ek)``.
Empty buckets are returned too (count 0, sums 0, mean None), so the series has no gaps.

Edge 0 is always ``start`` itself (the same object: its type, its ``fold``), but for a numpy number,
which is the Python int or float it holds, as are a numpy ``width`` and numpy numbers in ``edges=``
(a key reads back plain, so should its bucket). ``count`` (and ``n`` in ``(unit, n)``) is an int or
a numpy integer, never a bool. Edge ``i`` is:

* **Numbers** (``width`` an int or a float, for int or float keys such as epoch seconds): ``start +
  i*width`` computed exactly. Int start and int width: ints. Int start and a whole float width
  (``1e9``): ints too, stepping by ``int(width)``, so epoch nanoseconds beyond 2**53 stay exact. Any
  other mix: the exact value rounded once to the nearest float; with an int start and a fractional
  width this is refused (``BoundsError``) once an edge is beyond 2**53 in magnitude, where floats no
  longer hold every int and rounded edges would move int keys between buckets.
* **Elapsed time** (``width`` a ``timedelta`` that is not a whole number of days, or ``"hour"``):
  ``start`` plus ``i*width`` of real time, computed in UTC and shown in the start's ``tzinfo``
  (``(start in UTC + i*width).astimezone(start.tzinfo)``). Every bucket is exactly ``width`` long,
  also across DST changes: the fall-back day has 25 hourly buckets, the spring-forward day 23.
* **Calendar time** (a whole number of days: ``timedelta(days=n)``, ``"day"``, ``"week"``, or
  ``"month"``, ``"quarter"``, ``"year"``): the start's wall-clock time on the date ``i`` steps later
  in the start's zone, so with a ``zoneinfo`` zone a day is a local calendar day (23 or 25 hours
  long at DST changes) and a month starts at the same local time each month. A month step keeps the
  day of the month, clamped to the month's last day (a start on the 31st steps to 30 April, 28 or 29
  February). The fold rule, that of ``datetime`` arithmetic (``fold=0``): a wall-clock time that
  occurs twice (a repeated hour) is its first pass, and one that does not occur (a skipped hour) is
  moved forward by the gap (02:30 on a spring-forward day in Berlin becomes 03:30 CEST). The edge is
  returned normalized, as ``astimezone`` would show it.

Datetime keys need datetime widths and numeric keys numeric ones: a calendar or time width with a
numeric start is refused, as is a number with a datetime start. Unit names (``"hour"``, ``"day"``,
``"week"``, ``"month"``, ``"quarter"``, ``"year"``, or ``(unit, n)``) are case-insensitive, like the
CLI's ``--width``.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ._args import as_int, int_of, iterator_of
from ._keys import _show, encode_body, foreign_scalar
from .errors import ArgumentTypeError, BoundsError, BoundsTypeError, InvalidKeyError, UnsupportedKeyTypeError

if TYPE_CHECKING:
    from ._aggregate import Totals

__all__ = ["MAX_BUCKETS", "UNITS", "Bucket", "bucket_edges"]

MAX_BUCKETS = 1_000_000
_MONTHS = {"month": 1, "quarter": 3, "year": 12}
_TIMES = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}
UNITS = ("hour", "day", "week", "month", "quarter", "year")
"""The named widths, each also as ``(unit, n)``; names are case-insensitive."""
_UNIT_LIST = ", ".join(repr(unit) for unit in UNITS)
_LAST_YEAR = f"the year {MAXYEAR}, the last a datetime can have"
_FLOAT_INTS = 2**53
"""Floats hold every int up to this magnitude, and not every int above it."""
_DAY = timedelta(days=1)
_OWN = frozenset(("start", "end", "totals", "count", "mean"))


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of :meth:`Aggregate.buckets`: the keys in ``[start, end)`` and their totals.

    A value field's sum reads as ``bucket["cost"]`` or ``bucket.cost`` (as for :class:`Totals`;
    the attribute form for fields not named like Bucket's own ``start``, ``end``, ``totals``,
    ``count`` and ``mean``). O(1) each.

    >>> from tallytree._aggregate import Totals
    >>> bucket = Bucket(0, 10, Totals(2, ("cost",), (1.5,)))
    >>> bucket.count, bucket.cost, bucket["cost"], bucket.mean("cost")
    (2, 1.5, 1.5, 0.75)
    """

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

    def __getattr__(self, name: str) -> int | float:
        """``bucket.cost``: the sum of a value field. Raises AttributeError for any other name."""
        if name.startswith("_") or name in _OWN:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        totals = self.totals
        if name in totals.fields:
            return totals[name]
        raise AttributeError(
            f"Bucket has no attribute or value field {_show(name)}; the fields are "
            f"{', '.join(totals.fields) or 'none'} (and start, end, totals, count, mean)"
        )


def _check_key(value: Any, where: str) -> None:
    """Raise what encoding ``value`` as a key raises, prefixed with ``where`` (``buckets(start=)``)."""
    try:
        encode_body(value)
    except (InvalidKeyError, UnsupportedKeyTypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _too_far(start: Any, width: Any, count: int, limit: str) -> BoundsError:
    """The error for buckets whose last edge is beyond ``limit`` (what a key of start's type can hold)."""
    return BoundsError(
        f"buckets(start={_show(start)}, width={_show(width)}, count={count}) run past {limit}; use "
        "fewer or narrower buckets, or an earlier start"
    )


def _limit(edge: Any) -> str:
    if isinstance(edge, datetime):
        return _LAST_YEAR
    if isinstance(edge, float):
        return "the largest float"
    return "the largest int a key can hold (below 2**(2**24))"


def _local(naive: datetime, zone: Any) -> datetime:
    """``naive`` as a wall-clock time in ``zone``, read with fold=0 and normalized (see Design)."""
    local = naive.replace(tzinfo=zone)
    if zone is None or isinstance(zone, timezone):  # a fixed offset: every wall time occurs once
        return local
    return local.astimezone(UTC).astimezone(zone)


def _add_months(start: datetime, months: int) -> datetime:
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return _local(start.replace(year=year, month=month, day=day, tzinfo=None, fold=0), start.tzinfo)


def _time_edges(start: datetime, width: timedelta, count: int) -> list[datetime]:
    """Edges ``width`` apart: calendar steps for whole days, elapsed time otherwise (see Design)."""
    zone = start.tzinfo
    if zone is None or isinstance(zone, timezone):  # a fixed offset: wall clock and real time agree
        return [start] + [start + width * index for index in range(1, count + 1)]
    if not width % _DAY:
        naive = start.replace(tzinfo=None, fold=0)
        return [start] + [_local(naive + width * index, zone) for index in range(1, count + 1)]
    instant = start.astimezone(UTC)
    return [start] + [(instant + width * index).astimezone(zone) for index in range(1, count + 1)]


def _number_edges(start: int | float, width: int | float, count: int) -> list[int | float]:
    """Edges ``start + i*width`` computed exactly (see Design); ``start`` is finite."""
    if isinstance(start, int) and (isinstance(width, int) or width.is_integer()):
        step = int(width)
        edges: list[int | float] = [start]
        edges.extend(start + step * index for index in range(1, count + 1))
        return edges
    step_num, step_den = width.as_integer_ratio()  # denominators are powers of 2
    start_num, start_den = start.as_integer_ratio()
    den = max(step_den, start_den)
    base = start_num * (den // start_den)
    step = step_num * (den // step_den)
    if isinstance(start, int) and max(abs(base), abs(base + step * count)) > _FLOAT_INTS * den:
        raise BoundsError(
            f"buckets(start={_show(start)}, width={_show(width)}, count={count}): the edges reach "
            f"beyond 2**53, where a float edge cannot hold every int key between them and would move "
            "keys between buckets; use an int width (e.g. in nanoseconds) or a whole float width"
        )
    return [start] + [(base + step * index) / den for index in range(1, count + 1)]


def bucket_edges(start: Any, width: Any, count: Any, edges: Iterable[Any] | None) -> list[Any]:
    """The ``k + 1`` edges of ``k`` buckets, from ``edges=`` or from ``start``/``width``/``count``.

    Edge 0 is ``start`` itself; the others follow the rules in this module's docstring (numbers
    exact, sub-day times in elapsed time, whole days and months on the local calendar). O(k).

    >>> from datetime import UTC, datetime
    >>> [edge.day for edge in bucket_edges(datetime(2024, 1, 31, tzinfo=UTC), "Month", 3, None)]
    [31, 29, 31, 30]
    >>> bucket_edges(1_700_000_000_000_000_001, 1e9, 1, None)  # exact ints: epoch nanoseconds
    [1700000000000000001, 1700000001000000001]

    Raises BoundsError for a width or count out of range, an unknown unit, a width that does not
    fit the start's type, and edges beyond what a key of the start's type can be (past the year
    9999, or past the largest float); BoundsTypeError for an argument of the wrong type;
    InvalidKeyError (a naive datetime, NaN) and UnsupportedKeyTypeError for a ``start`` or an edge
    that is no key, naming ``start=`` or ``edges=``.
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
        result = [_plain(edge) for edge in iterator]  # (a numpy number: its Python value)
        if len(result) < 2:
            raise BoundsError(f"edges= needs at least two edges (one bucket), got {len(result)}")
        if len(result) > MAX_BUCKETS + 1:
            raise BoundsError(f"at most {MAX_BUCKETS} buckets per call")
        for index, edge in enumerate(result):
            _check_key(edge, f"buckets(edges=), edge {index}")
        return result
    if start is None or width is None or count is None:
        raise BoundsError("buckets() needs start=, width= and count= (or edges=[...])")
    if type(count) is not int:  # (a numpy integer: its int)
        count = as_int(
            count, f"count must be an int from 1 to {MAX_BUCKETS}, not {_show(count)}", BoundsTypeError
        )
    if not 1 <= count <= MAX_BUCKETS:
        raise BoundsError(f"count must be an int from 1 to {MAX_BUCKETS}, not {_show(count)}")
    start, width = _plain(start), _plain(width)
    if isinstance(start, datetime | int | float) and not isinstance(start, bool):  # (others: BoundsError)
        _check_key(start, "buckets(start=)")  # naive, NaN, or too large
    result = _edges(start, width, count)
    try:
        encode_body(result[-1])  # the edges ascend: the last one is the furthest from the start
    except InvalidKeyError:
        raise _too_far(start, width, count, _limit(result[-1])) from None
    return result


def _plain(value: Any) -> Any:
    """A numpy number's Python int or float (:func:`~tallytree._keys.foreign_scalar`), so that a
    numpy start or width steps as the number it holds and the edges come back plain; any other value
    as it is (a numpy bool too: no number). O(1).

    >>> _plain("day")
    'day'
    """
    plain = foreign_scalar(value)
    return plain if plain is not None and type(plain) is not bool else value


def _edges(start: Any, width: Any, count: int) -> list[Any]:
    unit = width
    step = 1
    if isinstance(width, tuple) and len(width) == 2:
        given = width[1] if type(width[1]) is int else int_of(width[1])  # a bool is no step
        if given is not None:
            unit, step = width[0], given
    if isinstance(unit, str):
        name = unit.lower()
        if name not in UNITS or step < 1:
            raise BoundsError(
                f"width={_show(width)}: a named width is one of {_UNIT_LIST} (in any case), or "
                "(unit, n) with n an int >= 1; or give a timedelta"
            )
        if not isinstance(start, datetime):
            raise BoundsError(
                f"width={_show(width)} needs a datetime start, not {_show(start)}; for numeric keys "
                "(e.g. epoch seconds) give a numeric width"
            )
        if name in _TIMES:
            try:
                return _time_edges(start, _TIMES[name] * step, count)
            except OverflowError:
                raise _too_far(start, width, count, _LAST_YEAR) from None
        months = _MONTHS[name] * step
        if start.year + (start.month - 1 + months * count) // 12 > MAXYEAR:
            raise _too_far(start, width, count, _LAST_YEAR)
        try:
            return [start] + [_add_months(start, months * index) for index in range(1, count + 1)]
        except OverflowError:  # the last local time is beyond the year 9999 in UTC
            raise _too_far(start, width, count, _LAST_YEAR) from None
    if isinstance(width, timedelta):
        if not isinstance(start, datetime):
            raise BoundsError(
                f"a timedelta width needs a datetime start, not {_show(start)}; for numeric keys "
                "(e.g. epoch seconds) give a numeric width"
            )
        if width <= timedelta(0):
            raise BoundsError(f"width must be positive, not {width!r}")
        try:
            return _time_edges(start, width, count)
        except OverflowError:
            raise _too_far(start, width, count, _LAST_YEAR) from None
    if isinstance(width, int | float) and not isinstance(width, bool):
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise BoundsError(
                f"a numeric width needs a numeric start, not {_show(start)}; for datetime keys give "
                f"a timedelta or one of {_UNIT_LIST}"
            )
        if not 0 < width < math.inf:  # nan and inf too: inf would make the edge 0 * inf, a nan
            raise BoundsError(f"width must be a finite positive number, not {_show(width)}")
        if isinstance(start, float) and math.isinf(start):
            return [start] * (count + 1)
        try:
            return _number_edges(start, width, count)
        except OverflowError:  # beyond the largest float
            raise _too_far(start, width, count, "the largest float") from None
    if (
        isinstance(width, tuple)
        and len(width) == 2
        and isinstance(width[0], str)
        and width[0].lower() in UNITS
    ):
        raise BoundsError(f"width={_show(width)}: n in (unit, n) is an int >= 1, not {_show(width[1])}")
    error = BoundsError if isinstance(width, tuple) else BoundsTypeError  # a tuple of the wrong shape
    raise error(
        f"width={_show(width)}: use a number (numeric keys), a timedelta (datetime keys) or one of "
        f"{_UNIT_LIST} (or (unit, n))"
    )
