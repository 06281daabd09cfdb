"""Checks of arguments shared by the public entry points: typed errors instead of raw ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from ._keys import _show
from .errors import ArgumentTypeError

__all__ = ["ITEMS", "check_flag", "flag_error", "iterator_of"]

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
