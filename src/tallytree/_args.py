"""Checks of arguments shared by the public entry points: typed errors instead of raw ones.

Integer arguments (an index, ``limit=``, ``count=``, ``node_size=``, ``map_size=``, ``memory=``...)
take an int or anything that stands for one through ``__index__`` (numpy's integers, an
``IntEnum``), never a bool (an int subclass, but ``limit=True`` is a mistake) or a float, even a
whole one. Each entry point tests ``type(value) is int`` itself, so the common case costs one
identity test, and calls :func:`as_int` only for any other type: it gives the plain int or raises
the error the caller names, with the caller's message (:func:`int_of` gives None instead).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ._keys import _show
from .errors import ArgumentTypeError

__all__ = ["ITEMS", "as_int", "check_flag", "flag_error", "int_of", "iterator_of"]

T = TypeVar("T")

ITEMS = "items or (key, id[, values]) tuples"
"""What insert_many and the builds take, as their messages name it."""


def flag_error(name: str, value: object) -> ArgumentTypeError:
    """The error for a flag that is not a bool: it names the argument and what it got. O(1).

    >>> raise flag_error("reverse", "yes")
    Traceback (most recent call last):
    tallytree.errors.ArgumentTypeError: reverse= takes True or False, not 'yes'
    """
    return ArgumentTypeError(f"{name}= takes True or False, not {_show(value)}")


def check_flag(value: object, name: str) -> None:
    """Raise ArgumentTypeError unless ``value`` is True or False (``reverse=``, ``sorted=``...).

    Two identity tests, once per call (never per item): ``1``, ``"yes"`` and ``None`` are refused, as a
    flag that is not a bool is a mistake (``sorted="no"`` is true). O(1).

    >>> check_flag(True, "sorted")
    >>> check_flag(1, "sorted")
    Traceback (most recent call last):
    tallytree.errors.ArgumentTypeError: sorted= takes True or False, not 1
    """
    if value is not True and value is not False:
        raise flag_error(name, value)


def int_of(value: object) -> int | None:
    """The plain int that a value of another type than int stands for as an integer argument, or None.

    ``operator.index(value)`` for a value whose type defines ``__index__`` (a numpy integer, an
    ``IntEnum``); None for a bool (numpy's has no ``__index__``) and for every other type, floats
    included. For the slow path of an integer argument (callers test ``type(value) is int`` first, see
    the module docstring). O(1).

    >>> import enum
    >>> int_of(enum.IntEnum("Size", "SMALL")(1)), int_of(True), int_of(3.0)
    (1, None, None)
    """
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]  # its type defines __index__
    except TypeError:  # an __index__ that refuses its value
        return None


def as_int(value: object, message: str, error: type[Exception] = ArgumentTypeError) -> int:
    """:func:`int_of` ``value``, or raise ``error(message)`` (the caller's, naming the argument). O(1).

    >>> as_int(True, "limit must be a positive int, not True")
    Traceback (most recent call last):
    tallytree.errors.ArgumentTypeError: limit must be a positive int, not True
    """
    result = int_of(value)
    if result is None:
        raise error(message)
    return result


def iterator_of(values: Iterable[T], who: str, what: str) -> Iterator[T]:
    """``iter(values)``, or ArgumentTypeError naming the caller (``who``) and what it takes. O(1).

    >>> list(iterator_of((1, 2), "f", "numbers"))
    [1, 2]
    >>> iterator_of(5, "f", "numbers")
    Traceback (most recent call last):
    tallytree.errors.ArgumentTypeError: f takes an iterable of numbers, not 5
    """
    try:
        return iter(values)
    except TypeError:
        raise ArgumentTypeError(f"{who} takes an iterable of {what}, not {_show(values)}") from None
