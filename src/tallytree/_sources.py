"""Sources for bulk builds from the shell: JSON Lines, CSV, SQLite, SQL URLs; fields typed into items.

Design
======
Two small pieces, kept apart from the command line so they can be tested (and reused) alone:

* a :class:`Source` yields ``(number, record)``: the record's line number (files) or row number
  (databases), and the record itself, a ``dict`` (JSON Lines, SQL) or a ``list`` in header order (CSV).
  A record that cannot be read (truncated JSON, a CSV line with the wrong number of fields) is yielded
  as a :class:`RowError` instead, so the caller decides whether to stop or skip. Files are read as
  bytes, which gives the progress bar an exact position and a total. :meth:`Source.batches` gives
  them in lists, read without a Python step per record where the format allows (a batch of JSON
  Lines is decoded at once and its lines parsed through ``map`` by json's C scanner);
* a :class:`RowSpec` turns a record into ``(namespace, key, id, values)`` for
  :meth:`~tallytree.Aggregate.build_many`: fields are looked up once (by column index for CSV) and typed
  by one converter each, raising :class:`RowError` with the reason (missing field, wrong type, bad
  date); :meth:`RowSpec.batch_converter` does the same for a batch of CSV or JSON Lines records a
  column at a time, handing back a batch that holds anything unusual, which is then read record by
  record (and so named).

Typing rules. JSON values keep their JSON types (arrays become tuples). CSV cells and command-line
values are text, typed *automatically*: an integer written canonically (``42``, ``-7``, not ``042``,
``+7`` or ``-0``) becomes an int, a decimal number a float, anything else stays text; text that
only Python reads as a number (``1_000``, digits outside ASCII) is never one (see
:func:`_python_only`). Ids and namespaces are
the exception to "JSON keeps its types": one written as text that is a canonical integer becomes an
int from every source (the JSON string ``"42"`` as the CSV cell ``42`` and the SQL text ``'42'``),
other text stays text (a CSV ``4.5`` too), so that the same data exported as CSV, JSON Lines or SQL
gives the same ids and namespaces (``--id-type str``, ``--namespace-type str`` keep text; see
:func:`_typed_namespace`).
``--key-type datetime`` reads ISO 8601 text (without an offset: UTC) or epoch seconds, or milliseconds
for numbers of magnitude 10^11 and above; eight digits that form a date are that date
(``20240131``, ISO 8601's basic form), not seconds of 1970 to 1973; a moment that leaves the years
1 to 9999 once converted to UTC is a malformed record. Summed values must be numbers (numeric text
is accepted). An integer of more digits than Python reads (``sys.get_int_max_str_digits()``, 4300 by
default) is a malformed record, never a crash: as a key, id or namespace it could not fit the key size
limit anyway, as a value it is beyond the int64 range of values.

Compression and shapes refused. A file or standard input that is gzip (by its first bytes) is
decompressed as it is read, the progress counting compressed bytes; damaged or truncated gzip data is a
:class:`SourceError` naming the source, wherever the reader meets it. Another compression (bzip2, xz,
zstd, zip) and a JSON array given as JSON Lines are SourceErrors before any record is read, saying what
to run (``xz -dc``, ``jq -c '.[]'``): read line by line, they would be malformed records, or with
``--on-error skip`` a silently partial load.

Text encoding. Files must be UTF-8. A JSON Lines line or a CSV record holding bytes that are not UTF-8
is a malformed record (stopping the build, or skipped with ``--on-error skip``), named by the line of
the first bad byte; the header of a CSV file is not a record, so bytes there stop the build. CSV text is
decoded with ``surrogateescape``, so the csv module's reader (which reads ahead) never fails mid-file,
and once the decoder has escaped a bad byte, records are checked for escaped bytes (U+DC80 to
U+DCFF, which strict UTF-8 text never holds) before they are used (see :class:`CsvSource`).

A CSV quote that is never closed is a :class:`SourceError`, not a malformed record: the csv module
reads every line after it into that field, up to the end of the file, so skipping "the record" would
drop the rest of the file without a word. The message names the line where the quoted field opens,
found by reading the file again (:func:`_unclosed_quote`; from standard input, the line where its
record begins).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import importlib
import io
import json
import math
import os
import re
import shlex
import sqlite3
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain, islice, repeat
from operator import add, attrgetter, itemgetter, methodcaller
from typing import IO, Any

from ._keys import MAX_KEY_BYTES

__all__ = [
    "KEY_TYPES",
    "NAMESPACE_TYPES",
    "RowError",
    "RowSpec",
    "Source",
    "SourceError",
    "SourceNotFoundError",
    "delimiter_problem",
    "open_source",
    "parse_datetime",
    "parse_value",
]

KEY_TYPES = ("auto", "str", "int", "float", "datetime")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_GZIP_MAGIC = b"\x1f\x8b"
# compressions read by other tools: the magic bytes that begin a file, the name, the command that decompresses
_COMPRESSIONS = (
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2", "bzip2 -dc"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz", "xz -dc"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd", "zstd -dc"),
    (re.compile(rb"PK\x03\x04"), "zip", "unzip -p"),
)
_HEAD = 1 << 12  # bytes sniffed for the format
_JSON_ARRAY = re.compile(rb"\[\s*(?:[{\]]|\Z)")  # what a JSON array of objects (or an empty one) begins with
_MILLISECONDS_FROM = 10**11  # epoch numbers at least this large are milliseconds (10^11 s is year 5138)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)\Z")
# eight digits that read as a date, YYYYMMDD (ISO 8601's basic form), rather than epoch seconds of 1970-73
_BASIC_DATE = re.compile(r"[1-9][0-9]{3}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])\Z")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_ESCAPED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, decoded with surrogateescape
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# csv's default field_size_limit is 128 KiB, so a well-formed file with one long cell (a note, a JSON
# blob in an unused column) would be refused as malformed. The limit is process-global: it is raised
# (never lowered, in case the application raised it further) when a CSV source is opened, to the
# largest value a C long holds on every platform.
_CSV_FIELD_LIMIT = 2**31 - 1
_NOT_UTF8_HINT = "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 (if it is Latin-1)"


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
        return int(text)  # ValueError beyond sys.get_int_max_str_digits() (see _digits_error)
    if _DECIMAL.match(text):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def _python_only(value: object) -> bool:
    """Whether ``value`` is text in a form that ``int()`` and ``float()`` read but data does not hold
    as a number: digits grouped by ``_`` (``1_000``, Python's literal syntax) or digits outside
    ASCII (``\u0663``, Arabic-Indic three). Such text is not a number in a source, as a summed field already
    refused it. O(len(value)).

    >>> [_python_only(text) for text in ("1_000", "\u0663", "12", " -1.5e3 ", 7)]
    [True, True, False, False, False]
    """
    return isinstance(value, str) and (not value.isascii() or "_" in value)


def _integer_digits(text: str) -> int:
    """The number of digits of ``text`` if it is an integer (an optional sign, ASCII digits), else 0."""
    digits = text.strip()
    digits = digits[1:] if digits[:1] in ("-", "+") else digits
    return len(digits) if digits.isascii() and digits.isdigit() else 0


def _digits_error(text: str, limit: str) -> str:
    """Why an integer too long for ``int()`` (``sys.get_int_max_str_digits()``) is refused."""
    return f"an integer of {_integer_digits(text):,} digits, {limit}"


_KEY_LIMIT = f"too large to store (a key, an id or a namespace encodes to at most {MAX_KEY_BYTES} bytes)"
_VALUE_LIMIT = "outside the range of a value, -2**63 to 2**64 - 1"
_JSON_DIGITS = re.compile(r"^Exceeds the limit \(\d+ digits\) for integer string conversion.*?(\d+) digits")


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(element) for element in value)
    return value


def parse_value(text: str) -> Any:
    """A value given on the command line: JSON if it parses as JSON (arrays become tuples), else text.

    ``Infinity`` and ``-Infinity``, which JSON lacks but JavaScript and Python's ``json`` read, are
    the float infinities (a float key may be one: ``--lt Infinity`` bounds the finite floats); the
    text is ``'"Infinity"'``. ``NaN`` stays text: no key is NaN. O(len(text)).

    >>> parse_value("42"), parse_value("user:42"), parse_value('"42"'), parse_value('["eu", 1]')
    (42, 'user:42', '42', ('eu', 1))
    >>> parse_value("-Infinity"), parse_value('"Infinity"'), parse_value("NaN"), parse_value("[1, Infinity]")
    (-inf, 'Infinity', 'NaN', (1, inf))
    """
    try:
        value = json.loads(text, parse_constant=_constant)
    except ValueError:
        return text
    if isinstance(value, dict):
        raise ValueError(f"{text!r} is a JSON object; give a number, text or an array")
    return _tuples(value)


def _constant(name: str) -> float:
    """``json.loads``'s ``parse_constant``: the infinities, and NaN refused (the text is then text)."""
    if name == "NaN":
        raise ValueError("NaN is no key")
    return float(name)


def parse_datetime(value: Any) -> datetime:
    """An aware UTC datetime from ISO 8601 text (no offset: UTC) or epoch seconds / milliseconds.

    Eight digits that form a date, as text or an int, are that date in ISO 8601's basic form
    (``20240131``, ``YYYYMMDD``), not epoch seconds of 1970 to 1973. O(len(value)).

    >>> parse_datetime("2024-06-01T12:00:00+02:00").isoformat()
    '2024-06-01T10:00:00+00:00'
    >>> parse_datetime(1717236000) == parse_datetime(1717236000000) == parse_datetime("1717236000")
    True
    >>> parse_datetime("20240131") == parse_datetime(20240131) == parse_datetime("2024-01-31")
    True

    Raises ValueError with the reason, also for a moment outside the years 1 to 9999 in UTC
    (``0001-01-01T00:00:00+01:00`` is in the year 0 in UTC) and for eight digits that name no day
    (``20240230``).
    """
    if type(value) is int and 10**7 <= value < 10**8 and _BASIC_DATE.match(str(value)):
        value = str(value)
    if type(value) is str:
        text = value.strip()
        if len(text) >= 10 and text[4] == "-" and text[:4].isdigit():  # the common case: ISO 8601
            moment = _from_iso(text)
        elif _BASIC_DATE.match(text):
            try:
                moment = datetime(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                raise ValueError("not a date: YYYYMMDD with no such day") from None
        elif _NUMBER.match(text):
            try:
                number = int(text) if _canonical_int(text) else float(text)
            except ValueError:  # more digits than int() reads: far beyond the year 9999 anyway
                raise ValueError("an epoch time outside the years 1 to 9999") from None
            moment = _from_epoch(number)
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
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ValueError("outside the years 1 to 9999 once converted to UTC") from None
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


class _Gunzip(io.RawIOBase):
    """The decompressed bytes of a gzip stream; damage or truncation is a :class:`SourceError` naming
    the source (wherever the reader meets it: the end of a truncated file comes last)."""

    def __init__(self, name: str, compressed: IO[bytes]) -> None:
        super().__init__()
        self.name = name
        self.file = gzip.GzipFile(fileobj=compressed, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.file.read(len(buffer))
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise SourceError(
                f"{self.name} is gzip-compressed, but its compressed data is truncated or damaged ({exc}), "
                "so it cannot be read to the end; test it with gzip -t, and compress or copy it again"
            ) from exc
        size = len(data)
        buffer[:size] = data
        return size

    def close(self) -> None:
        self.file.close()  # not the stream beneath it: its owner closes that
        super().close()


def _readable(name: str, raw: IO[bytes]) -> tuple[IO[bytes], _Counting, bytes, bool]:
    """``raw`` made ready to read: ``(stream, counter, head, compressed)``. The stream gives the
    data, decompressed when ``raw`` is gzip (found by its magic bytes, whatever the name says); the
    counter counts the bytes read from ``raw`` (for progress against the file's size); ``head`` is
    the data's first bytes, to sniff the format. Raises SourceError for another compression
    (bzip2, xz, zstd, zip), naming the command that decompresses it. O(1)."""
    counting = _Counting(raw)
    stream = io.BufferedReader(counting, buffer_size=1 << 16)
    head = stream.peek(_HEAD)[:_HEAD]
    for magic, compression, command in _COMPRESSIONS:
        if magic.match(head):
            raise SourceError(_compressed_elsewhere(name, compression, command))
    if not head.startswith(_GZIP_MAGIC):
        return stream, counting, head, False
    gunzip = io.BufferedReader(_Gunzip(name, stream), buffer_size=1 << 16)
    return gunzip, counting, gunzip.peek(_HEAD)[:_HEAD], True


def _compressed_elsewhere(name: str, compression: str, command: str) -> str:
    if name == "standard input":
        return (
            f"standard input is {compression}-compressed; tallytree decompresses gzip but not "
            f"{compression}: pipe it through {command} first"
        )
    return (
        f"{name} is {compression}-compressed; tallytree decompresses gzip but not {compression}: "
        f"decompress it first, or pipe it in with --from - ({command} {shlex.quote(name)} | tallytree ... "
        "--from -)"
    )


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
    """A file or standard input, read as bytes: ``stream`` (decompressed if it was gzip), ``counting``
    the bytes read from beneath it, ``owned`` the file to close (None: standard input)."""

    def __init__(
        self,
        name: str,
        stream: IO[bytes],
        counting: _Counting,
        total_bytes: int | None,
        owned: IO[bytes] | None = None,
        compressed: bool = False,
    ) -> None:
        super().__init__(name)
        self.counting = counting
        self.stream = stream
        self.total_bytes = total_bytes
        self.compressed = compressed
        self._owned = owned

    def bytes_read(self) -> int:
        return self.counting.count

    def close(self) -> None:
        self.stream.close()  # and the decompressor beneath it; never standard input itself
        if self._owned is not None:
            self._owned.close()


class JsonLinesSource(_FileSource):
    """One JSON object per line; blank lines are skipped.

    A batch of lines is decoded as UTF-8 at once and each line parsed by the ``json`` module's C
    scanner, called through ``map``: no Python step per line when every line holds one object. A
    batch with anything else (a blank line, invalid JSON, bytes that are not UTF-8, a value that is
    not an object, a byte order mark) is read line by line with ``json.loads``, which names the bad
    line with the reason; the records are the same either way (``json.loads`` is that scanner).
    """

    kind = "jsonl"

    def records(self) -> Iterator[tuple[int, Any]]:
        for batch in self.batches(4096):
            yield from batch

    def batches(self, size: int) -> Iterator[list[tuple[int, Any]]]:
        scan: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # json.loads's scanner, set in __init__
        first = 1
        while lines := list(islice(self.stream, size)):
            yield _json_lines(lines, first, scan)
            first += len(lines)


def _json_lines(lines: list[bytes], first: int, scan: Callable[[str, int], Any]) -> list[tuple[int, Any]]:
    """``(line number, record or RowError)`` of ``lines``, numbered from ``first``, blank lines left
    out. O(total length)."""
    try:
        text = b"".join(lines).decode()
    except UnicodeDecodeError:
        pass
    else:
        if "\r" in text:
            text = text.replace("\r\n", "\n")  # CRLF line ends: the \r is JSON whitespace there
        parts = text.split("\n")  # a line break is one byte, never inside a UTF-8 character
        if len(parts) > len(lines):
            parts.pop()  # the empty text after the last line break
        try:
            scanned = list(map(scan, parts, repeat(0)))
        except (StopIteration, ValueError, RecursionError):  # StopIteration: no value (a blank line)
            scanned = None
        if scanned is not None:
            records = list(map(itemgetter(0), scanned))
            ends = list(map(itemgetter(1), scanned))
            # each line is one object, ending where the line ends (json.loads's "Extra data" otherwise)
            if set(map(type, records)) == {dict} and ends == list(map(len, parts)):
                return list(zip(range(first, first + len(lines)), records, strict=True))
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(lines, first):
        record = _json_line(line, scan)
        if record is not None:
            out.append((number, record))
    return out


def _json_line(line: bytes, scan: Callable[[str, int], Any]) -> Any:
    """The record of one JSON Lines line (a dict), a RowError saying why it is none, or None for a
    blank line. O(len(line))."""
    try:
        text = line.decode()
        record, end = scan(text, 0)
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        pass
    else:
        if type(record) is dict and not text[end:].strip(" \t\r\n"):
            return record
    if not line.strip():
        return None
    try:  # json.loads itself: its error messages, its reading of a byte order mark
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        return RowError(f"not UTF-8 text (byte 0x{byte:02x}); {_NOT_UTF8_HINT}")
    except RecursionError:
        return RowError("JSON nested deeper than Python's recursion limit")
    except ValueError as exc:
        reason = str(exc)
        digits = _JSON_DIGITS.search(reason)
        if digits is not None:  # json reads integers with int(), which refuses this many digits
            size = int(digits.group(1))
            why = f"too large for a key, an id or a namespace, and {_VALUE_LIMIT}"
            return RowError(f"a JSON number of {size:,} digits, {why}")
        if not line.endswith(b"\n") or "Unterminated" in reason or "Expecting" in reason:
            return RowError(f"invalid JSON ({reason}); the line may be truncated")
        return RowError(f"invalid JSON ({reason})")
    if not isinstance(record, dict):
        return RowError(f"expected a JSON object, found {type(record).__name__}")
    return record


class CsvSource(_FileSource):
    """A CSV file with a header row (the field names).

    The text is decoded with ``surrogateescape`` (counting, see :func:`_escape_counted`): a byte
    that is not UTF-8 becomes a lone surrogate in its cell instead of an exception raised wherever
    the decoder, which reads ahead in chunks, happens to be. A record holding such a byte is a
    :class:`RowError` naming the line of its first bad byte, as a JSON Lines line that is not UTF-8
    is. Records are checked for them only once the decoder has met a bad byte (in this process, since
    the source was opened): a clean file costs nothing.
    """

    kind = "csv"

    def __init__(
        self,
        name: str,
        stream: IO[bytes],
        counting: _Counting,
        total_bytes: int | None,
        delimiter: str,
        path: str | None = None,
        owned: IO[bytes] | None = None,
        compressed: bool = False,
    ) -> None:
        super().__init__(name, stream, counting, total_bytes, owned, compressed)
        self.path = path  # the file, to find where an unclosed quote opened (None: standard input)
        self.delimiter = delimiter
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:  # see _CSV_FIELD_LIMIT: raised, never lowered
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        self._escaped = _ESCAPES[0]  # bad bytes decoded so far, by any source: see batches()
        self.text = io.TextIOWrapper(self.stream, encoding="utf-8-sig", errors=_ESCAPE_COUNTED, newline="")
        self.reader = csv.reader(self.text, delimiter=delimiter, strict=True)
        try:
            header = next(self.reader, None)
        except csv.Error as exc:
            raise SourceError(f"{name}: cannot read the CSV header: {exc}") from exc
        if header is None:
            raise SourceError(f"{name} is empty: a CSV source needs a header row naming the fields")
        escaped = _not_utf8(header, self.reader.line_num)
        if escaped is not None:  # not a record to skip: without the header no record can be read
            line, error = escaped
            raise SourceError(f"{name} line {line}: the header row is {error.args[0]}")
        self.fields = [name.strip() for name in header]
        self._last_line = self.reader.line_num  # the last line of the last record read whole

    def _error(self, exc: csv.Error) -> RowError:
        """The RowError of a malformed record; raises SourceError for the end of the file inside a
        quoted field, which no skipping can get past: the reader took every line after the quote
        into that field, so the records there are lost, and skipping "one record" would hide them."""
        if "unexpected end of data" not in str(exc):
            return RowError(f"malformed CSV ({exc}); the line may be truncated")
        first = self._last_line + 1
        opened = None
        if self.path is not None:
            opened = _unclosed_quote(self.path, first, self.delimiter, self.compressed)
        if opened is None:
            where = f"line {first}: the record that begins there has a quoted field that never ends"
        else:
            where = f"line {opened}: a quoted field begins there and never ends"
        raise SourceError(
            f"{self.name} {where}: the file ends inside it, so every line after it was read as part of "
            'that field; close the quote (a quote inside a quoted field is written twice, "")'
        )

    def records(self) -> Iterator[tuple[int, Any]]:
        reader = self.reader
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, self._error(exc)
                self._last_line = reader.line_num
                continue
            self._last_line = reader.line_num
            if not row:
                continue  # a blank line
            yield self._checked(row, reader.line_num)

    def batches(self, size: int) -> Iterator[list[tuple[int, Any]]]:
        """:meth:`records` in lists, read without a Python step per row when the rows are well formed:
        the reader and its line number after each row are zipped in C (``list.extend`` keeps the
        rows read before a malformed one)."""
        reader = self.reader
        width = len(self.fields or ())
        rows = zip(reader, map(attrgetter("line_num"), repeat(reader)), strict=False)
        while True:
            read: list[tuple[list[str], int]] = []
            error: csv.Error | None = None
            try:
                read.extend(islice(rows, size))
            except csv.Error as exc:
                error = exc
            if read:
                self._last_line = read[-1][1]
                cells = list(map(itemgetter(0), read))
                # a bad byte counted since this source opened may be in these rows (or later ones)
                clean = _ESCAPES[0] == self._escaped or _utf8(cells)
                if clean and set(map(len, cells)) == {width}:
                    yield list(zip(map(itemgetter(1), read), cells, strict=True))
                else:
                    yield [self._checked(row, number) for row, number in read if row]
            if error is not None:  # after the records before it, which may be malformed too
                yield [(reader.line_num, self._error(error))]
                self._last_line = reader.line_num
            elif len(read) < size:
                return

    def _checked(self, row: list[str], number: int) -> tuple[int, Any]:
        width = len(self.fields or ())
        escaped = _not_utf8(row, number)
        if escaped is not None:
            return escaped
        if len(row) == width:
            return number, row
        return number, RowError(
            f"expected {width} fields (as in the header), found {len(row)}; the line may be truncated or "
            "have an unquoted delimiter"
        )


def _unclosed_quote(path: str, first: int, delimiter: str, compressed: bool = False) -> int | None:
    """The line on which the quoted field that the end of ``path`` left open begins, reading the
    record that begins on line ``first`` as the csv module does (a quote opens a field only at its
    start; ``""`` inside is a quote); None when the file cannot be read again, or reads otherwise now.
    ``compressed``: the file is gzip, and the lines are those of its decompressed text.
    O(size of the file): only for the error message, after the reader met the end of the file.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as file:
    ...     _ = file.write('k,v\\n1,"a\\nb",2\\n3,x"y,"open ""q"" \\n4,z\\n')
    >>> _unclosed_quote(file.name, 2, ",")
    4
    >>> os.remove(file.name)
    """
    try:
        with _reopen_text(path, compressed) as text:
            quoted, start, opened = False, True, None
            for number, line in enumerate(islice(text, first - 1, None), first):
                index, end = 0, len(line)
                while index < end:
                    if quoted:
                        close = line.find('"', index)
                        if close < 0:
                            break  # the line break is in the field too
                        if line.startswith('"', close + 1):
                            index = close + 2  # a quote written twice
                        else:
                            quoted, start, index = False, False, close + 1
                    elif start and line[index] == '"':
                        quoted, opened, index = True, number, index + 1
                    else:  # an unquoted field, or what follows a closing quote: up to the delimiter
                        found = line.find(delimiter, index)
                        if found < 0:
                            break  # the line break ends the record
                        start, index = True, found + 1
                if not quoted:
                    start = True
    except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
        return None
    return opened if quoted else None


def _reopen_text(path: str, compressed: bool) -> IO[str]:
    """The text of a CSV file (gzip-decompressed if ``compressed``), as a CSV source decodes it."""
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _escape_counted(error: UnicodeError) -> tuple[str | bytes, int]:
    """The ``surrogateescape`` error handler, counting the bad bytes it escapes in ``_ESCAPES`` (one
    count per process: a source compares it with the count when it opened, and checks its records
    for escaped bytes only if it grew; a count that grows for another source costs checks, never a
    miss)."""
    _ESCAPES[0] += 1
    return _SURROGATE_ESCAPE(error)


_ESCAPE_COUNTED = "tallytree.surrogateescape"
_ESCAPES = [0]
_SURROGATE_ESCAPE = codecs.lookup_error("surrogateescape")
codecs.register_error(_ESCAPE_COUNTED, _escape_counted)


def _utf8(rows: list[list[str]]) -> bool:
    """Whether no cell of ``rows`` holds a byte that was not UTF-8 (see :class:`CsvSource`)."""
    joined = "".join(chain.from_iterable(rows))
    return joined.isascii() or _ESCAPED.search(joined) is None  # isascii: O(1) in CPython


def _not_utf8(row: list[str], last_line: int) -> tuple[int, RowError] | None:
    """``(line, RowError)`` for a CSV record holding bytes that are not UTF-8, naming the line of its
    first bad byte; None if it holds none. ``last_line`` is the record's last line: the line breaks
    after that byte are quoted ones inside the record (the reader keeps them in the cells)."""
    joined = ",".join(row)
    found = _ESCAPED.search(joined)
    if found is None:
        return None
    line = last_line - len(_LINE_BREAK.findall(joined, found.start()))
    byte = ord(found.group()) - 0xDC00
    return line, RowError(f"not UTF-8 text (byte 0x{byte:02x}); {_NOT_UTF8_HINT}")


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
    # read-only: a --query that writes fails ("attempt to write a readonly database"). The path is
    # percent-encoded, so that a '?' or '#' in it is not read as the URI's query or fragment.
    connection = None
    try:
        connection = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)
        cursor = connection.execute(query or f"SELECT * FROM {_quote(table or '')}")
    except sqlite3.Error as exc:
        if connection is not None:
            connection.close()
        raise SourceError(f"{path}: {exc}") from exc
    if cursor.description is None:  # a statement that returns no rows (CREATE, PRAGMA x = y, ...)
        connection.close()
        raise SourceError(f"{path}: {_NO_ROWS}")
    columns = [description[0] for description in cursor.description]

    def rows() -> Iterator[Sequence[Any]]:
        try:
            yield from cursor
        except sqlite3.Error as exc:
            raise SourceError(f"{path}: {exc}") from exc

    return SqlSource(path, rows(), columns, connection.close)


_NO_ROWS = "the query returns no rows (it is not a SELECT); give a SELECT to read"


def _url_source(url: str, table: str | None, query: str | None) -> SqlSource:
    if not table and not query:
        raise SourceError("an SQL database source needs --table NAME or --query SQL")
    name = _redact(url)
    if _ambiguous_url(url):  # refused before connecting: SQLAlchemy would cut the password short
        raise SourceError(
            f"{name}: the database URL has a password and more than one '@', so where the password "
            "ends is ambiguous; percent-encode every '@' but the one before the host as %40 (in the "
            "password, the database name or the query), e.g. with python3 -c 'import sys, "
            'urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))\' PASSWORD'
        )
    try:
        sqlalchemy: Any = importlib.import_module("sqlalchemy")  # optional: only for SQL URLs
    except ImportError:
        raise SourceError(
            "reading from an SQL database URL needs SQLAlchemy and the database's driver: "
            "pip install 'tallytree[sql]' (or pip install sqlalchemy and e.g. psycopg)"
        ) from None
    engine = connection = None

    def close() -> None:  # the transaction rolled back: nothing a --query did is committed
        try:
            if connection is not None:
                connection.close()  # which rolls back the transaction it began
        finally:
            if engine is not None:
                engine.dispose()

    try:
        engine = sqlalchemy.create_engine(url)
        connection = engine.connect()
        if engine.dialect.name == "postgresql":  # a read-only transaction, where a write fails
            with contextlib.suppress(NotImplementedError):  # without it: the rollback at close() remains
                connection = connection.execution_options(postgresql_readonly=True)
        connection = connection.execution_options(stream_results=True)
        connection.begin()  # explicit, never committed: close() rolls it back
        text = query or f"SELECT * FROM {_quote(table or '')}"
        result = connection.execute(sqlalchemy.text(text))
        returns_rows = result.returns_rows
        columns = list(result.keys()) if returns_rows else []
    except Exception as exc:  # driver errors have no common base class below Exception
        close()
        # (from None: the chained driver error could quote the URL in a traceback)
        raise SourceError(f"cannot read from {name}: {_scrub(str(exc), url)}") from None
    if not returns_rows:  # DDL or DML: its transaction is rolled back by close()
        close()
        raise SourceError(f"cannot read from {name}: {_NO_ROWS}; what it changed is rolled back")

    def rows() -> Iterator[Sequence[Any]]:
        try:
            yield from result
        except Exception as exc:  # as above: a lost connection, a bad value mid-stream
            raise SourceError(f"cannot read from {name}: {_scrub(str(exc), url)}") from None

    return SqlSource(name, rows(), columns, close)


_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|credential|api_?key|access_?key", re.IGNORECASE)
# ``user:password@`` as SQLAlchemy reads it (``sqlalchemy.engine.url._parse_url``): the user part
# ends at the first ':' (without a '/'), the password at the next '@', whatever it holds before
_USER_PASSWORD = re.compile(r"([^:/]*):([^@]*)@")


def _ambiguous_url(url: str) -> bool:
    """Whether a database URL has a password and another '@' besides the one ending it: then where the
    password ends is a guess (SQLAlchemy ends it at the first '@', a person may have meant the last),
    so it could be shown in part, and the connection would use the wrong password and host."""
    rest = url.partition("//")[2]
    return rest.count("@") > 1 and _USER_PASSWORD.match(rest) is not None


def _url_secrets(url: str) -> list[str]:
    """The secrets a database URL holds, as written and percent-decoded, longest first: the password
    of ``user:password@host`` and the values of query parameters such as ``password=``,
    ``sslpassword=`` or ``token=``."""
    rest = url.partition("//")[2]
    secrets = []
    found = _USER_PASSWORD.match(rest)
    if found is not None:
        secrets.append(found.group(2))
        rest = rest[found.end() :]
    if _ambiguous_url(url):
        secrets.append(url.partition("//")[2].rpartition("@")[0])
    for parameter in re.split(r"[&;]", rest.partition("?")[2].partition("#")[0]):
        name, equals, value = parameter.partition("=")
        if equals and _SECRET_PARAMETER.search(urllib.parse.unquote_plus(name)):
            secrets.append(value)
    unique = {*secrets, *map(urllib.parse.unquote_plus, secrets)} - {""}
    return sorted(unique, key=len, reverse=True)


def _redact(url: str) -> str:
    """The URL without its secrets (see :func:`_url_secrets`), for messages and output.

    >>> _redact("postgresql://me:s3cret@db.example:5432/app?sslmode=require&password=s3cret#x")
    'postgresql://me:***@db.example:5432/app?sslmode=require&password=***#x'

    A URL with more than one '@' besides a password is ambiguous (see :func:`_ambiguous_url`):
    everything up to its last '@' is hidden.

    >>> _redact("postgresql://me:p@ss/w?rd@db.example/app")
    'postgresql://***@db.example/app'
    """
    scheme, slashes, rest = url.partition("//")
    if not slashes:
        return url
    if _ambiguous_url(url):
        user, rest = "***@", rest.rpartition("@")[2]
    elif (found := _USER_PASSWORD.match(rest)) is not None:
        user, rest = f"{found.group(1)}:***@", rest[found.end() :]
    else:
        user = ""
    path, question, query = rest.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        parts = re.split(r"([&;])", query)
        for index, parameter in enumerate(parts):
            name, equals, _ = parameter.partition("=")
            if equals and _SECRET_PARAMETER.search(urllib.parse.unquote_plus(name)):
                parts[index] = f"{name}=***"
        rest = f"{path}?{''.join(parts)}{hash_}{fragment}"
    return f"{scheme}//{user}{rest}"


def _scrub(message: str, url: str) -> str:
    """A driver's message without the URL's secrets (a message may quote the URL, or parts of it)."""
    message = message.replace(url, _redact(url))
    for secret in _url_secrets(url):
        message = message.replace(secret, "***")
    return message


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
    (``.jsonl``/``.ndjson``/``.json``, ``.csv``, ``.tsv``, each optionally followed by ``.gz``) or its
    first bytes (a SQLite header, ``{`` for JSON Lines, else CSV). A file or standard input that is
    gzip-compressed (known by its first bytes) is decompressed as it is read; another compression
    (bzip2, xz, zstd, zip) is a SourceError naming the command that decompresses it, and so is a JSON
    array given as JSON Lines (see :func:`_refuse_json_array`). An SQL source reads ``table`` or runs
    ``query``, never both. Raises SourceNotFoundError for a missing file, SourceError otherwise.
    """
    if table and query:  # the query would run and the table be ignored without a word
        raise SourceError("give --table NAME or --query SQL, not both (a query can read the table)")
    if "://" in spec and not os.path.exists(spec):
        scheme, _, rest = spec.partition("://")
        if scheme.lower() == "sqlite" or scheme.lower().startswith("sqlite+"):
            return _open_file(_sqlite_url_path(spec, rest), "sqlite", table, query, delimiter)
        return _url_source(spec, table, query)
    if spec == "-":
        if stdin is None:
            raise SourceError("no standard input")
        name = "standard input"
        stream, counting, head, compressed = _readable(name, stdin)
        kind = format or _sniff(head, "-")
        if kind == "sqlite":
            raise SourceError("a SQLite database cannot be read from standard input; give its path")
        return _from_stream(name, stream, counting, head, None, kind, delimiter, compressed=compressed)
    return _open_file(spec, format, table, query, delimiter)


def _sqlite_url_path(url: str, rest: str) -> str:
    """The file of an SQLAlchemy SQLite URL (``sqlite:///app.db``, ``sqlite+pysqlite:////abs/app.db``,
    ``sqlite:///file:app.db?mode=ro&uri=true``), read by this module, read-only, as a SQLite path
    is: its query string holds connection options, never part of the path. O(len(url)).

    >>> _sqlite_url_path("", "/app.db?mode=ro"), _sqlite_url_path("", "//abs/app.db")
    ('app.db', '/abs/app.db')
    """
    path = rest.partition("?")[0]
    if not path.startswith("/") or path == "/":
        raise SourceError(
            f"{url}: give the SQLite file, as in sqlite:///relative/app.db or sqlite:////absolute/app.db "
            "(an in-memory database holds nothing to read)"
        )
    path = urllib.parse.unquote(path[1:])
    return path.removeprefix("file:") if "uri=true" in rest.partition("?")[2].lower() else path


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
        readable, counting, head, compressed = _readable(path, stream)
        kind = format or _kind_from_name(path) or _sniff(head, path)
        if kind != "sqlite" and head.startswith(_SQLITE_MAGIC):
            kind = "sqlite"
        if kind == "sqlite":
            stream.close()
            if compressed:
                raise SourceError(
                    f"{path} is gzip-compressed; a SQLite database is read from its file: decompress it "
                    f"first (gunzip -k {shlex.quote(path)}) and give the database"
                )
            if not head.startswith(_SQLITE_MAGIC):
                raise SourceError(f"{path} is not a SQLite database")
            return _sqlite_source(path, table, query)
        if table or query:
            raise SourceError(f"--table and --query apply to SQL sources; {path} is {kind}")
        if kind == "csv" and delimiter is None and path.lower().removesuffix(".gz").endswith(".tsv"):
            delimiter = "\t"
        size = os.path.getsize(path)
        return _from_stream(path, readable, counting, head, size, kind, delimiter, path, stream, compressed)
    except BaseException:
        stream.close()
        raise


def delimiter_problem(delimiter: str) -> str | None:
    """What is wrong with a CSV delimiter, as the end of a sentence, or None when it is usable: one
    character, not a quote or a line break (the csv module would fail, or read other rows). O(1).

    >>> delimiter_problem(";"), delimiter_problem(";;")
    (None, "';;' is not one character; give one, such as ';' or '|'")
    """
    if len(delimiter) != 1:
        return f"{delimiter!r} is not one character; give one, such as ';' or '|'"
    if delimiter in ('"', "\r", "\n"):
        return f"{delimiter!r} is a quote or a line break, which CSV reserves; give another character"
    return None


def _from_stream(
    name: str,
    stream: IO[bytes],
    counting: _Counting,
    head: bytes,
    total: int | None,
    kind: str,
    delimiter: str | None,
    path: str | None = None,
    owned: IO[bytes] | None = None,
    compressed: bool = False,
) -> Source:
    if kind == "jsonl":
        _refuse_json_array(name, head, compressed)
        return JsonLinesSource(name, stream, counting, total, owned, compressed)
    if kind == "csv":
        problem = delimiter_problem(delimiter) if delimiter is not None else None
        if problem is not None:
            raise SourceError(f"the CSV delimiter {problem}")
        separator = "," if delimiter is None else delimiter
        return CsvSource(name, stream, counting, total, separator, path, owned, compressed)
    raise SourceError(f"unknown source format {kind!r}; use jsonl, csv or sqlite")


def _refuse_json_array(name: str, head: bytes, compressed: bool) -> None:
    """Raise SourceError for JSON Lines data that begins with ``[``: a JSON array (``[{...}, {...}]``,
    on one line or pretty-printed), not one object per line. Read line by line it would give
    malformed records, or with ``--on-error skip`` only the objects that happen to sit alone on
    their lines; a JSON array can only be read whole, or streamed by an incremental parser, so the
    message says how to convert it: ``jq -c '.[]'`` prints one object per line. O(1).

    >>> _refuse_json_array("e.json", b'{"k": 1}', False)
    >>> try:
    ...     _refuse_json_array("e.json", b' [{"k": 1}]', False)
    ... except SourceError as error:
    ...     print(str(error).partition("; ")[2])
    convert it: jq -c '.[]' e.json > e.jsonl
    """
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return
    why = f"{name} holds a JSON array, not JSON Lines (one JSON object per line)"
    if name == "standard input":
        raise SourceError(f"{why}; pipe it through jq -c '.[]' first, which prints one object per line")
    stem = name[:-3] if name.lower().endswith(".gz") else name
    for suffix in (".jsonl", ".ndjson", ".json"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    target = stem + ".jsonl"
    if target == name:
        target = stem + ".lines.jsonl"
    read = f"gzip -dc {shlex.quote(name)} | jq -c '.[]'" if compressed else f"jq -c '.[]' {shlex.quote(name)}"
    raise SourceError(f"{why}; convert it: {read} > {shlex.quote(target)}")


def _kind_from_name(path: str) -> str | None:
    """The format a file name says, a ``.gz`` after it allowed (``events.jsonl.gz``); None if none."""
    lower = path.lower().removesuffix(".gz")
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
    if stripped.startswith(b"{") or _JSON_ARRAY.match(stripped):  # an array: refused as JSON Lines
        return "jsonl"
    return "csv"


# ---------------------------------------------------------------- records to rows


@dataclass
class RowSpec:
    """How a record becomes ``(namespace, key, id, values)``.

    ``key`` names one field or several (a tuple key); ``key_types`` maps a key field to one of
    :data:`KEY_TYPES` (``"*"`` for all); ``id`` names the id field (None: the record number);
    ``namespace`` the namespace field (None: the default namespace), typed by ``namespace_type``
    (see :func:`_typed_namespace`); ``sums`` maps each value field
    of the aggregate to the record field holding it; ``where`` the required text of some fields.
    """

    key: list[str]
    key_types: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    id_type: str = "auto"
    namespace: str | None = None
    namespace_type: str = "auto"
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
            _cached(_typed_namespace(self.namespace, self.namespace_type, texts))
            if self.namespace is not None
            else None
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
        """A function ``(records, first ordinal) -> rows`` converting a batch of CSV or JSON Lines
        records a column at a time, or None when this spec or source has no such path (SQL,
        ``where``, a nested JSON field such as ``user.id``).

        Gives exactly what :meth:`converter` gives for each record, or None for a batch that needs
        it record by record (an empty or malformed cell, a missing field, a value outside the common
        shapes), which then names the record. Each column is taken by one ``map`` and typed by one
        more: CSV text checked a column at a time (ISO datetimes, ints and decimal numbers), JSON
        values kept as they are when the column's types need no conversion (ints and finite floats
        to sum, int or text ids), not by a Python call per record and field.
        """
        if self.where or source.kind not in ("csv", "jsonl"):
            return None
        texts = source.kind == "csv"
        names = [*self.key, *([self.id] if self.id is not None else []), *self.sums.values()]
        if self.namespace is not None:
            names.append(self.namespace)
        getter: Callable[[str], Callable[[Any], Any]]
        if texts:
            fields = source.fields
            if fields is None or any(fields.count(name) != 1 for name in names):
                return None  # missing or repeated: the record-by-record converter raises the SourceError
            getter = lambda name: itemgetter(fields.index(name))  # noqa: E731  # one line, used below
        elif any("." in name for name in names):
            return None  # perhaps a nested field: the record-by-record lookup follows the path
        else:
            getter = itemgetter  # a missing field raises KeyError: the batch goes record by record
        key_types = [self.key_types.get(name, self.key_types.get("*", "auto")) for name in self.key]
        column = _column if texts else _json_column
        key_parts = [column(name, kind) for name, kind in zip(self.key, key_types, strict=True)]
        id_part = None
        if self.id is not None:
            id_part = _id_column(self.id, self.id_type) if texts else _json_id_column(self.id, self.id_type)
        value_parts = [_numbers if texts else _json_numbers(name) for name in self.sums.values()]
        namespace_part = None
        if self.namespace is not None:
            namespace_part = _typed_namespace(self.namespace, self.namespace_type, texts)
        typed: dict[str, Any] = {}  # namespaces repeat: each text is typed once
        key_getters = [getter(name) for name in self.key]
        id_getter = getter(self.id) if self.id is not None else None
        value_getters = [getter(name) for name in self.sums.values()]
        namespace_getter = getter(self.namespace) if self.namespace is not None else None

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
                values = [
                    part(list(map(get, records)))
                    for part, get in zip(value_parts, value_getters, strict=True)
                ]
                if any(column is None for column in values):
                    return None
                namespaces: Any = repeat(None)
                if namespace_getter is not None and namespace_part is not None:
                    raw = list(map(namespace_getter, records))
                    if texts or set(map(type, raw)) == {str}:
                        for text in dict.fromkeys(raw).keys() - typed.keys():
                            if len(typed) >= 100_000:
                                typed.clear()
                            typed[text] = namespace_part(text)
                        namespaces = map(typed.__getitem__, raw)
                    else:  # JSON numbers or arrays: 1 == 1.0 == True would share one entry of typed
                        namespaces = list(map(namespace_part, raw))
            except (RowError, ValueError, OverflowError, KeyError, TypeError):
                return None  # KeyError: a JSON record lacks the field; TypeError: a value of no column shape
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
            return _as_utc(texts, moments)
        return list(map(parse_datetime, moments))

    return datetimes


def _as_utc(texts: list[str], moments: list[datetime]) -> list[datetime]:
    """``moments``, naive datetimes read from ISO ``texts``, in UTC: the texts read again with
    ``+00:00`` after them, ten times as fast as ``moment.replace(tzinfo=UTC)`` (which takes its
    argument by keyword: 1.8 us a call on CPython 3.11, against 0.2 us to parse). Only when every text
    has a time, which an offset can follow (after a date alone, 3.11 drops it), and every moment
    read again is in ``UTC``; else by ``replace``. O(n).

    >>> from datetime import datetime
    >>> texts = ["2024-01-02T03:04:05.25", "2024-01-02 03"]
    >>> _as_utc(texts, list(map(datetime.fromisoformat, texts)))[1].isoformat()
    '2024-01-02T03:00:00+00:00'
    """
    if min(map(len, texts)) > 10:
        try:
            aware = list(map(datetime.fromisoformat, map(add, texts, repeat("+00:00"))))
        except ValueError:
            aware = []
        if aware and set(map(attrgetter("tzinfo"), aware)) == {UTC}:
            return aware
    return list(map(methodcaller("replace", tzinfo=UTC), moments))


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


def _json_column(name: str, kind: str) -> Callable[[list[Any]], list[Any] | None]:
    """A converter of a column of JSON key values: what :func:`_typed` gives for each (texts read
    as JSON, not CSV, values), a column at a time where the types allow; None: record by record."""
    one = _typed(name, kind, False)
    if kind == "datetime":
        iso = _column(name, "datetime")  # the ISO text of a column of text

        def datetimes(values: list[Any]) -> list[Any] | None:
            if set(map(type, values)) == {str}:
                return iso(values)
            return list(map(one, values))  # epoch numbers

        return datetimes
    if kind == "auto":

        def auto(values: list[Any]) -> list[Any] | None:
            if set(map(type, values)).isdisjoint((dict, list)):
                return values  # JSON keys keep their types
            return list(map(one, values))  # arrays become tuples (objects raise)

        return auto
    return lambda values: list(map(one, values))


def _json_id_column(name: str, kind: str) -> Callable[[list[Any]], list[Any]]:
    """A converter of a column of JSON ids (see :func:`_typed_id`): ints kept, text as CSV text is."""
    one = _typed_id(name, kind, False)
    texts = _id_column(name, kind)

    def ids(values: list[Any]) -> list[Any]:
        kinds = set(map(type, values))
        if kinds == {int} and kind != "str":
            return values
        if kinds == {str}:
            return texts(values)  # JSON text ids follow the rule of CSV cells
        return list(map(one, values))

    return ids


def _json_numbers(name: str) -> Callable[[list[Any]], list[Any] | None]:
    """A converter of a column of JSON summed values (see :func:`_number`): ints and finite floats
    kept as they are, anything else (numeric text, an error to name) value by value."""
    one = _number(name)

    def numbers(values: list[Any]) -> list[Any] | None:
        kinds = set(map(type, values))
        if kinds <= {int, float} and (float not in kinds or math.isfinite(sum(values))):
            return values
        return list(map(one, values))

    return numbers


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
    """Whether ``text`` is an integer written canonically (``42``, ``-7``, ``0``; not ``042``, ``+1``,
    ``-0``): the text ``str(int(text))`` gives back, so that no two texts become the same int.

    >>> [_canonical_int(text) for text in ("42", "-7", "0", "042", "+1", "-0", "-", "")]
    [True, True, True, False, False, False, False, False]
    """
    digits = text[1:] if text[:1] == "-" else text
    return digits.isascii() and digits.isdigit() and (digits[0] != "0" or text == "0")


def _typed(name: str, kind: str, texts: bool) -> Callable[[Any], Any]:
    """A converter of one key or namespace value to the given key type.

    Every converter raises RowError for a value it cannot type (never ValueError: an integer text
    of more digits than ``int()`` reads included).
    """
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
                if (kind == "int" and isinstance(value, float)) or _python_only(value):
                    raise ValueError
                number = target(value.strip() if isinstance(value, str) else value)
            except (ValueError, OverflowError):
                if isinstance(value, str) and _integer_digits(value):  # beyond int()'s digit limit
                    raise RowError(
                        f"field {name!r} is {_show(value)}, {_digits_error(value, _KEY_LIMIT)}"
                    ) from None
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
            try:
                return _auto(value)
            except ValueError:  # a canonical integer beyond int()'s digit limit
                raise RowError(
                    f"field {name!r} is {_show(value)}, {_digits_error(value, _KEY_LIMIT)}"
                ) from None

        return auto_text

    def auto_json(value: Any) -> Any:
        if isinstance(value, dict):
            raise RowError(f"field {name!r} is a JSON object; keys are numbers, text, datetimes or arrays")
        if isinstance(value, list):
            return _tuples(value)
        return value

    return auto_json


NAMESPACE_TYPES = ("auto", "str", "int")


def _typed_namespace(name: str, kind: str, texts: bool) -> Callable[[Any], Any]:
    """A converter of one namespace value: the rule of ids, so that the same data exported as CSV,
    JSON Lines or SQL gives the same namespaces. ``auto``: text that is a canonical integer (``42``,
    not ``042``) is that int, from every source (the CSV cell ``42``, the JSON string ``"42"``, the
    SQL text ``'42'``), other text stays text (``4.5``, ``org:1``), and a JSON or SQL value that is
    not text keeps its type (a JSON array is a tuple); ``str``: text, an integer written as text
    (JSON ``42`` gives ``"42"``); ``int``: an integer. Raises RowError for a value it cannot type
    (an empty CSV cell included). O(len(value)).

    >>> [_typed_namespace("org", "auto", False)(value) for value in ("42", 42, "042", "4.5", 4.5, None)]
    [42, 42, '042', '4.5', 4.5, None]
    >>> _typed_namespace("org", "auto", True)("42"), _typed_namespace("org", "str", False)(42)
    (42, '42')
    """
    if kind in ("str", "int"):
        return _typed(name, kind, texts)
    if kind != "auto":
        raise SourceError(f"unknown namespace type {kind!r}; use {', '.join(NAMESPACE_TYPES)}")
    other = _typed(name, "auto", False)  # JSON and SQL values: their own type, arrays as tuples

    def auto(value: Any) -> Any:
        if type(value) is not str:
            return other(value)
        if texts and value == "":
            raise RowError(f"field {name!r} is empty")
        if not _canonical_int(value):
            return value
        try:
            return int(value)
        except ValueError:  # a canonical integer beyond int()'s digit limit
            raise RowError(f"field {name!r} is {_show(value)}, {_digits_error(value, _KEY_LIMIT)}") from None

    return auto


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
                    if _python_only(value):
                        raise ValueError
                    return int(value)
                except ValueError:
                    if _integer_digits(value):  # beyond int()'s digit limit
                        why = _digits_error(value, _KEY_LIMIT)
                        raise RowError(f"field {name!r} (the id) is {_show(value)}, {why}") from None
                    raise RowError(f"field {name!r} (the id) is {_show(value)}, not an int") from None
            return value
        if type(value) is int:
            return str(value) if kind == "str" else value
        if isinstance(value, bytes | bytearray | memoryview):  # an SQL BLOB (psycopg2 gives memoryview)
            if kind == "auto":
                return bytes(value)
            if kind == "str":
                try:
                    return bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise RowError(
                        f"field {name!r} (the id) is {_show(bytes(value))}, bytes that are not UTF-8 text; "
                        "drop --id-type str to keep bytes ids"
                    ) from None
            raise RowError(
                f"field {name!r} (the id) is {_show(bytes(value))}, bytes, not an int; drop --id-type int "
                "to keep bytes ids"
            )
        raise RowError(
            f"field {name!r} (the id) is {_show(value)}; ids are text, integers or bytes (SQL BLOBs)"
        )

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
                try:
                    return int(text)
                except ValueError:  # beyond int()'s digit limit, so far beyond int64
                    raise RowError(
                        f"field {name!r} is {_show(value)}, {_digits_error(text, _VALUE_LIMIT)}"
                    ) from None
            if _NUMBER.match(text):
                result = float(text)
                if math.isfinite(result):
                    return result
        if value == "" or value is None:
            raise RowError(f"field {name!r} is empty; summed fields need a number")
        raise RowError(f"field {name!r} is {_show(value)}, not a number")

    return number
