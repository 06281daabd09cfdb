"""Sources for bulk builds from the shell: JSON Lines, CSV, SQLite, SQL URLs; fields typed into items.

Design
======
Two small pieces, kept apart from the command line so they can be tested (and reused) alone:

* a :class:`Source` yields ``(number, record)``: the record's line number (files) or row number
  (databases), and the record itself, a ``dict`` (JSON Lines, SQL) or a ``list`` in header order (CSV).
  A record that cannot be read (truncated JSON, a CSV line with the wrong number of fields) is yielded
  as a :class:`RowError` instead, so the caller decides whether to stop or skip. Files are read as
  bytes, which gives the progress bar an exact position and a total;
* a :class:`RowSpec` turns a record into ``(namespace, key, id, values)`` for
  :meth:`~tallytree.Aggregate.build_many`: fields are looked up once (by column index for CSV) and typed
  by one converter each, raising :class:`RowError` with the reason (missing field, wrong type, bad
  date).

Typing rules. JSON values keep their JSON types (arrays become tuples). CSV cells and command-line
values are text, typed *automatically*: an integer written canonically (``42``, not ``042``) becomes an
int, a decimal number a float, anything else stays text. ``--key-type datetime`` reads ISO 8601 text
(without an offset: UTC) or epoch seconds, or milliseconds for numbers of magnitude 10^11 and above.
Summed values must be numbers (numeric text is accepted).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice, repeat
from operator import attrgetter, itemgetter, methodcaller
from typing import IO, Any

__all__ = [
    "KEY_TYPES",
    "RowError",
    "RowSpec",
    "Source",
    "SourceError",
    "SourceNotFoundError",
    "open_source",
    "parse_datetime",
    "parse_value",
]

KEY_TYPES = ("auto", "str", "int", "float", "datetime")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MILLISECONDS_FROM = 10**11  # epoch numbers at least this large are milliseconds (10^11 s is year 5138)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)\Z")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")


Row = tuple[Any, Any, Any, tuple[Any, ...]]
"""``(namespace, key, id, values)``, as :meth:`~tallytree.Aggregate.build_many` takes them."""


class SourceError(Exception):
    """A source cannot be opened or read (not a row problem: the whole source)."""


class SourceNotFoundError(SourceError):
    """The source file does not exist."""


class RowError(Exception):
    """One record is malformed: ``where`` says which ("line 7"), the message says why."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where

    def __str__(self) -> str:
        message = str(self.args[0]) if self.args else ""
        return f"{self.where}: {message}" if self.where else message


# ---------------------------------------------------------------- value parsing


def _text(value: Any) -> str:
    """A record value as text, for --where comparisons."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _auto(text: str) -> Any:
    """Type a text cell: canonical integer -> int, decimal number -> float, else the text.

    >>> _auto("42"), _auto("042"), _auto("4.50"), _auto("1e3"), _auto("eu-west"), _auto("nan")
    (42, '042', 4.5, 1000.0, 'eu-west', 'nan')
    """
    if _canonical_int(text):
        return int(text)
    if _DECIMAL.match(text):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(element) for element in value)
    return value


def parse_value(text: str) -> Any:
    """A value given on the command line: JSON if it parses as JSON (arrays become tuples), else text.

    >>> parse_value("42"), parse_value("user:42"), parse_value('"42"'), parse_value('["eu", 1]')
    (42, 'user:42', '42', ('eu', 1))
    """
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict):
        raise ValueError(f"{text!r} is a JSON object; give a number, text or an array")
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return _tuples(value)


def parse_datetime(value: Any) -> datetime:
    """An aware UTC datetime from ISO 8601 text (no offset: UTC) or epoch seconds / milliseconds.

    >>> parse_datetime("2024-06-01T12:00:00+02:00").isoformat()
    '2024-06-01T10:00:00+00:00'
    >>> parse_datetime(1717236000) == parse_datetime(1717236000000) == parse_datetime("1717236000")
    True

    Raises ValueError with the reason.
    """
    if type(value) is str:
        text = value.strip()
        if len(text) >= 10 and text[4] == "-" and text[:4].isdigit():  # the common case: ISO 8601
            moment = _from_iso(text)
        elif _NUMBER.match(text):
            moment = _from_epoch(int(text) if _canonical_int(text) else float(text))
        else:
            moment = _from_iso(text)
    elif isinstance(value, datetime):
        moment = value
    elif isinstance(value, bool) or value is None or not isinstance(value, int | float):
        raise ValueError("not a datetime (ISO 8601 or epoch seconds/milliseconds)")
    else:
        moment = _from_epoch(value)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    if moment.tzinfo is not UTC:
        return moment.astimezone(UTC)
    return moment


def _from_iso(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not a datetime (ISO 8601 or epoch seconds/milliseconds)") from None


def _from_epoch(number: float) -> datetime:
    if not math.isfinite(number):
        raise ValueError("not a finite epoch time")
    try:
        if abs(number) >= _MILLISECONDS_FROM:
            return _EPOCH + timedelta(milliseconds=number)
        return _EPOCH + timedelta(seconds=number)
    except OverflowError:
        raise ValueError("an epoch time outside the years 1 to 9999") from None


# ---------------------------------------------------------------- sources


class _Counting(io.RawIOBase):
    """A binary stream that counts the bytes read through it (for progress)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self.count += size
        return size


class Source:
    """Records of one input, with where each came from. Iterate :meth:`records` once."""

    kind = "?"
    unit = "line"

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: list[str] | None = None
        self.total_bytes: int | None = None

    def records(self) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[list[tuple[int, Any]]]:
        """:meth:`records` in lists of up to ``size`` (use one or the other, once)."""
        records = self.records()
        while batch := list(islice(records, size)):
            yield batch

    def bytes_read(self) -> int:
        """Bytes consumed so far (0 when unknown)."""
        return 0

    def close(self) -> None:
        """Release files and connections."""

    def where(self, number: int) -> str:
        return f"{self.unit} {number}"


class _FileSource(Source):
    def __init__(self, name: str, stream: IO[bytes], total_bytes: int | None) -> None:
        super().__init__(name)
        self.counting = _Counting(stream)
        self.stream = io.BufferedReader(self.counting, buffer_size=1 << 16)
        self.total_bytes = total_bytes
        self._owned = stream

    def bytes_read(self) -> int:
        return self.counting.count

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


class JsonLinesSource(_FileSource):
    """One JSON object per line; blank lines are skipped."""

    kind = "jsonl"

    def records(self) -> Iterator[tuple[int, Any]]:
        loads = json.loads
        for number, line in enumerate(self.stream, 1):
            if not line.strip():
                continue
            try:
                record = loads(line)
            except UnicodeDecodeError as exc:
                yield number, RowError(f"not UTF-8 text ({exc.reason})")
                continue
            except ValueError as exc:
                reason = str(exc)
                if not line.endswith(b"\n") or "Unterminated" in reason or "Expecting" in reason:
                    reason = f"invalid JSON ({reason}); the line may be truncated"
                else:
                    reason = f"invalid JSON ({reason})"
                yield number, RowError(reason)
                continue
            if not isinstance(record, dict):
                yield number, RowError(f"expected a JSON object, found {type(record).__name__}")
                continue
            yield number, record


class CsvSource(_FileSource):
    """A CSV file with a header row (the field names)."""

    kind = "csv"

    def __init__(self, name: str, stream: IO[bytes], total_bytes: int | None, delimiter: str) -> None:
        super().__init__(name, stream, total_bytes)
        self.text = io.TextIOWrapper(self.stream, encoding="utf-8-sig", newline="")
        self.reader = csv.reader(self.text, delimiter=delimiter, strict=True)
        try:
            header = next(self.reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{name}: cannot read the CSV header: {exc}") from exc
        if header is None:
            raise SourceError(f"{name} is empty: a CSV source needs a header row naming the fields")
        self.fields = [name.strip() for name in header]

    def records(self) -> Iterator[tuple[int, Any]]:
        reader = self.reader
        width = len(self.fields or ())
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise SourceError(
                    f"{self.name} line {reader.line_num + 1}: not UTF-8 text ({exc.reason})"
                ) from exc
            except csv.Error as exc:
                yield reader.line_num, RowError(f"malformed CSV ({exc}); the line may be truncated")
                continue
            if len(row) != width:
                if not row:
                    continue  # a blank line
                yield (
                    reader.line_num,
                    RowError(
                        f"expected {width} fields (as in the header), found {len(row)}; the line may be "
                        "truncated or have an unquoted delimiter"
                    ),
                )
                continue
            yield reader.line_num, row

    def batches(self, size: int) -> Iterator[list[tuple[int, Any]]]:
        """:meth:`records` in lists, read without a Python step per row when the rows are well formed:
        the reader and its line number after each row are zipped in C (``list.extend`` keeps the
        rows read before a malformed one)."""
        reader = self.reader
        width = len(self.fields or ())
        rows = zip(reader, map(attrgetter("line_num"), repeat(reader)), strict=False)
        while True:
            read: list[tuple[list[str], int]] = []
            error: Exception | None = None
            try:
                read.extend(islice(rows, size))
            except UnicodeDecodeError as exc:
                error = SourceError(f"{self.name} line {reader.line_num + 1}: not UTF-8 text ({exc.reason})")
                error.__cause__ = exc
            except csv.Error as exc:
                error = RowError(f"malformed CSV ({exc}); the line may be truncated")
            if read:
                if set(map(len, map(itemgetter(0), read))) == {width}:
                    yield list(zip(map(itemgetter(1), read), map(itemgetter(0), read), strict=True))
                else:
                    yield [self._checked(row, number) for row, number in read if row]
            if isinstance(error, SourceError):
                raise error
            if error is not None:
                yield [(reader.line_num, error)]
            elif len(read) < size:
                return

    def _checked(self, row: list[str], number: int) -> tuple[int, Any]:
        width = len(self.fields or ())
        if len(row) == width:
            return number, row
        return number, RowError(
            f"expected {width} fields (as in the header), found {len(row)}; the line may be truncated or "
            "have an unquoted delimiter"
        )


class SqlSource(Source):
    """Rows of a table or a query, from a SQLite file or (through SQLAlchemy) an SQL database URL."""

    kind = "sql"
    unit = "row"

    def __init__(self, name: str, rows: Iterator[Sequence[Any]], columns: list[str], closer: Any) -> None:
        super().__init__(name)
        self.fields = columns
        self._rows = rows
        self._closer = closer

    def records(self) -> Iterator[tuple[int, Any]]:
        fields = self.fields or []
        for number, row in enumerate(self._rows, 1):
            yield number, dict(zip(fields, row, strict=True))

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _sqlite_source(path: str, table: str | None, query: str | None) -> SqlSource:
    if not table and not query:
        raise SourceError(f"{path} is a SQLite database: say what to read with --table NAME or --query SQL")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        cursor = connection.execute(query or f"SELECT * FROM {_quote(table or '')}")
    except sqlite3.Error as exc:
        raise SourceError(f"{path}: {exc}") from exc
    columns = [description[0] for description in cursor.description or ()]

    def rows() -> Iterator[Sequence[Any]]:
        try:
            yield from cursor
        except sqlite3.Error as exc:
            raise SourceError(f"{path}: {exc}") from exc

    return SqlSource(path, rows(), columns, connection.close)


def _url_source(url: str, table: str | None, query: str | None) -> SqlSource:
    if not table and not query:
        raise SourceError("an SQL database source needs --table NAME or --query SQL")
    try:
        sqlalchemy: Any = importlib.import_module("sqlalchemy")  # optional: only for SQL URLs
    except ImportError:
        raise SourceError(
            "reading from an SQL database URL needs SQLAlchemy and the database's driver: "
            "pip install 'tallytree[sql]' (or pip install sqlalchemy and e.g. psycopg)"
        ) from None
    try:
        engine = sqlalchemy.create_engine(url)
        connection = engine.connect()
        text = query or f"SELECT * FROM {_quote(table or '')}"
        result = connection.execution_options(stream_results=True).execute(sqlalchemy.text(text))
    except Exception as exc:  # driver errors have no common base class below Exception
        raise SourceError(f"cannot read from {_redact(url)}: {exc}") from exc
    columns = list(result.keys())

    def close() -> None:
        connection.close()
        engine.dispose()

    return SqlSource(_redact(url), iter(result), columns, close)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def open_source(
    spec: str,
    *,
    format: str | None = None,
    table: str | None = None,
    query: str | None = None,
    delimiter: str | None = None,
    stdin: IO[bytes] | None = None,
) -> Source:
    """Open ``spec``: a file path, ``-`` for standard input, or an SQL database URL.

    The format is ``format`` (jsonl, csv, sqlite) if given, else guessed from the file name
    (``.jsonl``/``.ndjson``/``.json``, ``.csv``, ``.tsv``) or its first bytes (a SQLite header, ``{``
    for JSON Lines, else CSV). An SQL source reads ``table`` or runs ``query``, never both. Raises
    SourceNotFoundError for a missing file, SourceError otherwise.
    """
    if table and query:  # the query would run and the table be ignored without a word
        raise SourceError("give --table NAME or --query SQL, not both (a query can read the table)")
    if "://" in spec and not os.path.exists(spec):
        if spec.startswith("sqlite:///"):
            return _open_file(spec[len("sqlite:///") :], "sqlite", table, query, delimiter)
        return _url_source(spec, table, query)
    if spec == "-":
        if stdin is None:
            raise SourceError("no standard input")
        buffered = io.BufferedReader(_Counting(stdin), buffer_size=1 << 16)
        kind = format or _sniff(buffered.peek(1 << 12), "-")
        if kind == "sqlite":
            raise SourceError("a SQLite database cannot be read from standard input; give its path")
        return _from_stream("standard input", buffered, None, kind, delimiter)
    return _open_file(spec, format, table, query, delimiter)


def _open_file(
    path: str, format: str | None, table: str | None, query: str | None, delimiter: str | None
) -> Source:
    if not os.path.exists(path):
        raise SourceNotFoundError(f"source {path} not found")
    if os.path.isdir(path):
        raise SourceError(f"source {path} is a directory; give a JSON Lines, CSV or SQLite file")
    try:
        stream = open(path, "rb")  # noqa: SIM115  # closed by Source.close()
    except OSError as exc:
        raise SourceError(f"cannot open source {path}: {exc.strerror}") from exc
    try:
        head = stream.read(1 << 12)
        stream.seek(0)
        kind = format or _kind_from_name(path) or _sniff(head, path)
        if kind != "sqlite" and head.startswith(_SQLITE_MAGIC):
            kind = "sqlite"
        if kind == "sqlite":
            stream.close()
            if not head.startswith(_SQLITE_MAGIC):
                raise SourceError(f"{path} is not a SQLite database")
            return _sqlite_source(path, table, query)
        if table or query:
            raise SourceError(f"--table and --query apply to SQL sources; {path} is {kind}")
        if kind == "csv" and delimiter is None and path.lower().endswith(".tsv"):
            delimiter = "\t"
        return _from_stream(path, stream, os.path.getsize(path), kind, delimiter)
    except BaseException:
        stream.close()
        raise


def _from_stream(name: str, stream: IO[bytes], total: int | None, kind: str, delimiter: str | None) -> Source:
    if kind == "jsonl":
        return JsonLinesSource(name, stream, total)
    if kind == "csv":
        return CsvSource(name, stream, total, delimiter or ",")
    raise SourceError(f"unknown source format {kind!r}; use jsonl, csv or sqlite")


def _kind_from_name(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".sqlite", ".sqlite3", ".db")):
        return "sqlite"
    return None


def _sniff(head: bytes, name: str) -> str:
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"{"):
        return "jsonl"
    return "csv"


# ---------------------------------------------------------------- records to rows


@dataclass
class RowSpec:
    """How a record becomes ``(namespace, key, id, values)``.

    ``key`` names one field or several (a tuple key); ``key_types`` maps a key field to one of
    :data:`KEY_TYPES` (``"*"`` for all); ``id`` names the id field (None: the record number);
    ``namespace`` the namespace field (None: the default namespace); ``sums`` maps each value field
    of the aggregate to the record field holding it; ``where`` the required text of some fields.
    """

    key: list[str]
    key_types: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    id_type: str = "auto"
    namespace: str | None = None
    sums: dict[str, str] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def converter(self, source: Source) -> Callable[[int, int, Any], Row | None]:
        """A function ``(record number, ordinal, record) -> row`` (None when --where excludes it).

        All the fields a row needs are fetched at once (one ``itemgetter`` call for CSV), then each
        is typed by its own converter. Raises SourceError when the source has no such field (CSV
        headers, SQL columns); the function raises RowError for a malformed record.
        """
        texts = source.kind == "csv"
        key_types = [self.key_types.get(name, self.key_types.get("*", "auto")) for name in self.key]
        key_parts = [_typed(name, kind, texts) for name, kind in zip(self.key, key_types, strict=True)]
        id_part = _typed_id(self.id, self.id_type, texts) if self.id is not None else None
        namespace_part = (
            _cached(_typed(self.namespace, "auto", texts)) if self.namespace is not None else None
        )
        value_parts = [_number(name) for name in self.sums.values()]
        names = [
            *([self.namespace] if self.namespace is not None else []),
            *self.key,
            *([self.id] if self.id is not None else []),
            *self.sums.values(),
        ]
        fetch = _fetcher(names, source)
        filters = [
            (_fetcher([name], source, missing=_MISSING), wanted) for name, wanted in self.where.items()
        ]
        first_key = 1 if namespace_part is not None else 0
        first_value = first_key + len(key_parts) + (1 if id_part is not None else 0)
        single_key = key_parts[0] if len(key_parts) == 1 else None

        def convert(number: int, ordinal: int, record: Any) -> Row | None:
            for get, wanted in filters:
                value = get(record)[0]
                if value is _MISSING or _text(value) != wanted:
                    return None
            cells = fetch(record)
            namespace = namespace_part(cells[0]) if namespace_part is not None else None
            if single_key is not None:
                key = single_key(cells[first_key])
            else:
                key = tuple([part(cells[first_key + index]) for index, part in enumerate(key_parts)])
            item_id = id_part(cells[first_value - 1]) if id_part is not None else ordinal
            values = tuple([part(cells[first_value + index]) for index, part in enumerate(value_parts)])
            return namespace, key, item_id, values

        return convert

    def batch_converter(self, source: Source) -> Callable[[list[Any], int], list[Row] | None] | None:
        """A function ``(records, first ordinal) -> rows`` converting a batch of CSV records a column
        at a time, or None when this spec or source has no such path (not CSV, ``where``).

        Gives exactly what :meth:`converter` gives for each record, or None for a batch that needs
        it record by record (an empty or malformed cell, a value outside the common shapes), which
        then names the record. Each column is converted by one ``map`` (ISO datetimes, ints and
        decimal numbers checked a column at a time), not by a Python call per record and field.
        """
        if source.kind != "csv" or self.where or source.fields is None:
            return None
        fields = source.fields
        key_types = [self.key_types.get(name, self.key_types.get("*", "auto")) for name in self.key]
        key_parts = [_column(name, kind) for name, kind in zip(self.key, key_types, strict=True)]
        id_part = _id_column(self.id, self.id_type) if self.id is not None else None
        namespace_part = _typed(self.namespace, "auto", True) if self.namespace is not None else None
        typed: dict[str, Any] = {}  # namespaces repeat: each text is typed once
        names = [*self.key, *([self.id] if self.id is not None else []), *self.sums.values()]
        if self.namespace is not None:
            names.append(self.namespace)
        for name in names:
            if fields.count(name) != 1:
                return None  # missing or repeated: the record-by-record converter raises the SourceError
        key_getters = [itemgetter(fields.index(name)) for name in self.key]
        id_getter = itemgetter(fields.index(self.id)) if self.id is not None else None
        value_getters = [itemgetter(fields.index(name)) for name in self.sums.values()]
        namespace_getter = itemgetter(fields.index(self.namespace)) if self.namespace is not None else None

        def convert(records: list[Any], ordinal: int) -> list[Row] | None:
            try:
                keys = [
                    part(list(map(get, records))) for part, get in zip(key_parts, key_getters, strict=True)
                ]
                if any(column is None for column in keys):
                    return None
                key_column: Any = keys[0] if len(keys) == 1 else zip(*keys, strict=True)
                if id_getter is not None and id_part is not None:
                    ids: Any = id_part(list(map(id_getter, records)))
                else:
                    ids = range(ordinal, ordinal + len(records))
                values = [_numbers(list(map(get, records))) for get in value_getters]
                if any(column is None for column in values):
                    return None
                namespaces: Any = repeat(None)
                if namespace_getter is not None and namespace_part is not None:
                    texts = list(map(namespace_getter, records))
                    for text in dict.fromkeys(texts).keys() - typed.keys():
                        if len(typed) >= 100_000:
                            typed.clear()
                        typed[text] = namespace_part(text)
                    namespaces = map(typed.__getitem__, texts)
            except (RowError, ValueError, OverflowError):
                return None
            rows = zip(*values, strict=True) if values else repeat(())
            return list(zip(namespaces, key_column, ids, rows, strict=False))  # may repeat()

        return convert


def _column(name: str, kind: str) -> Callable[[list[str]], list[Any] | None]:
    """A converter of a column of key texts (see :func:`_typed`); None: convert record by record."""
    one = _typed(name, kind, True)
    if kind != "datetime":
        return lambda texts: list(map(one, texts))

    def datetimes(texts: list[str]) -> list[Any] | None:
        texts = list(map(str.strip, texts))
        # the shape parse_datetime reads as ISO 8601 (anything else may be epoch seconds)
        if min(map(len, texts)) < 10 or set(map(itemgetter(4), texts)) != {"-"}:
            return None
        if not all(map(str.isdigit, map(itemgetter(slice(0, 4)), texts))):
            return None
        moments = list(map(datetime.fromisoformat, texts))
        zones = set(map(attrgetter("tzinfo"), moments))
        if zones == {UTC}:
            return moments
        if zones == {None}:
            return list(map(methodcaller("replace", tzinfo=UTC), moments))
        return list(map(parse_datetime, moments))

    return datetimes


def _id_column(name: str, kind: str) -> Callable[[list[str]], list[Any]]:
    """A converter of a column of id texts (see :func:`_typed_id`)."""
    one = _typed_id(name, kind, True)

    def ids(texts: list[str]) -> list[Any]:
        if kind == "int" or not texts or not min(map(len, texts)):
            return list(map(one, texts))  # (an empty id raises RowError there)
        if kind == "str" or not any(map(str.isdigit, map(str.lstrip, texts, repeat("-")))):
            return texts  # no text is an integer (``_canonical_int`` needs digits after a "-")
        return list(map(one, texts))

    return ids


_NUMBER_CHARS = frozenset("0123456789.-eE ")


def _numbers(texts: list[str]) -> list[int | float] | None:
    """What :func:`_number` gives for each text (ints for integers, else finite floats), or None."""
    joined = "".join(texts)
    if not _NUMBER_CHARS.issuperset(joined):  # "+", "_", "nan", non-ASCII digits: record by record
        return None
    integral = list(map(str.isdigit, map(str.lstrip, map(str.strip, texts), repeat("-"))))
    if all(integral):
        return list(map(int, texts))
    floats = list(map(float, texts))
    if not math.isfinite(sum(floats)):
        return None
    if not any(integral):
        return floats
    return [
        int(text) if whole else number for text, whole, number in zip(texts, integral, floats, strict=True)
    ]


_MISSING: Any = object()


def _fetcher(names: list[str], source: Source, missing: Any = None) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving the values of ``names`` in a record, as a tuple.

    Raises SourceError when the source declares its fields (a CSV header, SQL columns) and one is
    absent or repeated. The function raises RowError for a field a JSON record lacks, or gives
    ``missing``.
    """
    fields = source.fields
    if fields is not None:
        for name in names:
            if name not in fields:
                raise SourceError(
                    f"{source.name} has no column {name!r}; its columns are {', '.join(fields)}"
                )
            if fields.count(name) > 1:
                raise SourceError(_repeated_column(source, name))
    if source.kind == "csv":
        assert fields is not None
        indexes = [fields.index(name) for name in names]
        if len(indexes) == 1:
            index = indexes[0]
            return lambda record: (record[index],)
        return itemgetter(*indexes) if indexes else (lambda record: ())
    getters = [_getter(name, missing) for name in names]
    return lambda record: tuple([get(record) for get in getters])


def _repeated_column(source: Source, name: str) -> str:
    """Why a column that several columns share cannot be read: a CSV record would give the first
    one, an SQL record (a dict) the last, so either reading would be a silent guess."""
    fields = source.fields or []
    positions = [str(index) for index, field in enumerate(fields, 1) if field == name]
    if source.kind == "csv":
        fix = "rename them in the header row so that each name is one column"
    else:
        fix = "name them apart in --query (SELECT ... AS ...)"
    return (
        f"{source.name} has {len(positions)} columns named {name!r} (columns {', '.join(positions)}), "
        f"so which one to read is ambiguous; {fix}"
    )


def _getter(name: str, missing: Any) -> Callable[[dict[str, Any]], Any]:
    path = name.split(".") if "." in name else None

    def value(record: dict[str, Any]) -> Any:
        try:
            return record[name]
        except KeyError:
            pass
        if path is not None:  # a nested field: "user.id"
            found: Any = record
            for part in path:
                if not isinstance(found, dict) or part not in found:
                    break
                found = found[part]
            else:
                return found
        if missing is not None:
            return missing
        raise RowError(f"field {name!r} is missing")

    return value


def _cached(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` remembering its results for text (namespaces repeat: org ids, user ids)."""
    cache: dict[str, Any] = {}

    def cached(value: Any) -> Any:
        if type(value) is not str:
            return convert(value)
        found = cache.get(value, _MISSING)
        if found is _MISSING:
            found = convert(value)
            if len(cache) < 100_000:
                cache[value] = found
        return found

    return cached


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:50] + "..." + text[-6:]


def _canonical_int(text: str) -> bool:
    """Whether ``text`` is an integer written canonically (``42``, ``-7``, ``0``; not ``042``, ``+1``)."""
    digits = text[1:] if text[:1] == "-" else text
    return digits.isascii() and digits.isdigit() and (digits[0] != "0" or digits == "0") and digits != "-0"


def _typed(name: str, kind: str, texts: bool) -> Callable[[Any], Any]:
    """A converter of one key or namespace value to the given key type."""
    if kind == "datetime":

        def as_datetime(value: Any) -> Any:
            if texts and value == "":
                raise RowError(f"field {name!r} is empty")
            try:
                return parse_datetime(value)
            except ValueError as exc:
                raise RowError(f"field {name!r} is {_show(value)}: {exc}") from None

        return as_datetime
    if kind == "str":

        def as_str(value: Any) -> Any:
            if value is None or isinstance(value, dict | list):
                raise RowError(f"field {name!r} is {_show(value)}, not text")
            return _text(value)

        return as_str
    if kind in ("int", "float"):
        target = int if kind == "int" else float
        wanted = "an int" if kind == "int" else "a number"

        def as_number(value: Any) -> Any:
            if isinstance(value, bool) or value is None or isinstance(value, dict | list):
                raise RowError(f"field {name!r} is {_show(value)}, not {wanted}")
            try:
                if kind == "int" and isinstance(value, float):
                    raise ValueError
                number = target(value.strip() if isinstance(value, str) else value)
            except (ValueError, OverflowError):
                raise RowError(f"field {name!r} is {_show(value)}, not {wanted}") from None
            if isinstance(number, float) and not math.isfinite(number):
                raise RowError(f"field {name!r} is {_show(value)}, not a finite number")
            return number

        return as_number
    if kind != "auto":
        raise SourceError(f"unknown key type {kind!r}; use one of {', '.join(KEY_TYPES)}")
    if texts:

        def auto_text(value: Any) -> Any:
            if value == "":
                raise RowError(f"field {name!r} is empty")
            return _auto(value)

        return auto_text

    def auto_json(value: Any) -> Any:
        if isinstance(value, dict):
            raise RowError(f"field {name!r} is a JSON object; keys are numbers, text, datetimes or arrays")
        if isinstance(value, list):
            return _tuples(value)
        return value

    return auto_json


def _typed_id(name: str, kind: str, texts: bool) -> Callable[[Any], Any]:
    if kind not in ("auto", "str", "int"):
        raise SourceError(f"unknown id type {kind!r}; use auto, str or int")

    def typed(value: Any) -> Any:
        if texts or isinstance(value, str):
            if value == "":
                raise RowError(f"field {name!r} (the id) is empty")
            if kind == "str":
                return value
            if kind == "int" or _canonical_int(value):
                try:
                    return int(value)
                except ValueError:
                    raise RowError(f"field {name!r} (the id) is {_show(value)}, not an int") from None
            return value
        if type(value) is int:
            return str(value) if kind == "str" else value
        raise RowError(f"field {name!r} (the id) is {_show(value)}; ids are text or integers")

    return typed


def _number(name: str) -> Callable[[Any], Any]:
    def number(value: Any) -> Any:
        kind = type(value)
        if kind is float:
            if math.isfinite(value):
                return value
        elif kind is int:
            return value
        elif kind is str:
            text = value.strip()
            digits = text[1:] if text[:1] == "-" else text
            if digits.isascii() and digits.isdigit():
                return int(text)
            if _NUMBER.match(text):
                result = float(text)
                if math.isfinite(result):
                    return result
        if value == "" or value is None:
            raise RowError(f"field {name!r} is empty; summed fields need a number")
        raise RowError(f"field {name!r} is {_show(value)}, not a number")

    return number
