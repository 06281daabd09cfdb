"""Checks of arguments shared by the public entry points: typed errors instead of raw ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from ._keys import _show
from .errors import ArgumentTypeError

__all__ = ["ITEMS", "iterator_of"]

T = TypeVar("T")

ITEMS = "items or (key, id[, values]) tuples"
"""What insert_many and the builds take, as their messages name it."""


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
