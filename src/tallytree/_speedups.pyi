from collections.abc import Sequence
from datetime import datetime
from typing import Any

def int_keys(values: Sequence[int], /) -> list[bytes] | None: ...
def datetime_keys(values: Sequence[datetime], /) -> list[bytes] | None: ...
def text_keys(values: Sequence[str], limit: int, /) -> list[bytes] | None: ...
def settle(
    plus: list[Sequence[int]],
    minus: list[Sequence[int]],
    spans: Sequence[tuple[Any, ...]],
    fields: int,
    /,
) -> list[int] | None: ...
def bisect(node: Any, key: bytes, right: bool, /) -> int: ...
def float_sum(values: Sequence[float], /) -> int | None: ...
def pack_node(head: int, parts: tuple[Sequence[Any], ...], /) -> bytes | None: ...
def pack_internal(parts: tuple[Sequence[Any], ...], nfields: int, /) -> bytes | None: ...
def freeze_node(node: Any, /) -> None: ...
def range_totals(
    node: Any,
    summary: Sequence[int],
    low: bytes | None,
    low_after: bool,
    high: bytes | None,
    high_after: bool,
    fetch: Any,
    nodes: dict[int, Any] | None,
    fields: int,
    /,
) -> tuple[list[int], int] | None: ...
def pack_root(
    node_id: int, height: int, summary: list[int], pending: int, pending_summary: list[int] | None, /
) -> bytes | None: ...
def thaw(node: Any, /) -> tuple[list[Any], list[Any], list[Any], list[Any]]: ...
def rank(
    node: Any, key: bytes, after: bool, fetch: Any, nodes: dict[int, Any] | None, /
) -> tuple[int, int]: ...
def rank_range(
    node: Any,
    low: bytes,
    low_after: bool,
    high: bytes,
    high_after: bool,
    fetch: Any,
    nodes: dict[int, Any] | None,
    /,
) -> tuple[int, int, int]: ...
