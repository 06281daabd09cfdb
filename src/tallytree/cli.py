"""The ``tallytree`` command line: ``main(argv) -> int``, no module-level state.

Commands (``tallytree COMMAND --help`` for each)::

    build DB AGGREGATE --from SOURCE --key F[,F...]   bulk-build an aggregate from JSON Lines, CSV,
                                                      SQLite or an SQL URL (one atomic transaction)
    query DB AGGREGATE OP                             count, totals, rank, at, min, max, buckets, items
    check DB [AGGREGATE]                              run the invariant checker
    verify DB AGGREGATE --from SOURCE ...             compare with the source; --repair fixes the drift
    stats DB                                          per aggregate: namespaces, items, depth, nodes, bytes;
                                                      the file's pages (in use, free, held by readers)
    backup DB DEST                                    a consistent copy of a live database (compacted)
    namespaces DB AGGREGATE                           namespaces with their totals, paged
    drop DB (AGGREGATE | --table TABLE) --yes         delete an aggregate, or a table with its aggregates
    demo [DIR]                                        generated events, the scenario queries, timed

Every command takes ``--json`` (one JSON document on stdout, errors too). Exit codes, for scripts:

    0  ok                          3  check failed, verify found drift (not repaired), or a damaged
    1  error (one line on stderr)     database met by any command (build and verify included)
    2  bad usage                   4  not found: database, aggregate, table, namespace or source file
                                 130  interrupted by Ctrl-C (nothing was written)
                                 143  build, verify or backup ended by SIGTERM (nothing was written)

SIGTERM (``kill``, ``timeout``, ``docker stop``) during ``build``, ``verify`` or ``backup`` takes the
path of Ctrl-C: the transaction is aborted, a new aggregate the build defined is dropped again, the
sort runs (or the backup's partial files) are removed, and the command exits with 143 (128 + 15, what
a shell reports for a process SIGTERM ended). Other commands write nothing that needs undoing and
keep the default handling, but for ``drop --yes``, whose one library call holds its transaction and
its commit: it completes. Once the commit has begun, Ctrl-C and SIGTERM are only noted: the commit
completes and is reported (exit 0, with a note on stderr), so that 130 and 143 always mean that
nothing was written (see :class:`_Signals`).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

from . import __version__, _bulk, _db
from ._aggregate import Aggregate, Item, Totals, _decode_cursor
from ._btree import same_values
from ._buckets import UNITS
from ._check import check
from ._demo import run_demo
from ._gc import gc_paused
from ._keys import decode_key
from ._sources import (
    KEY_TYPES,
    NAMESPACE_TYPES,
    RowError,
    RowSpec,
    SourceError,
    SourceNotFoundError,
    delimiter_problem,
    open_source,
    parse_datetime,
    parse_value,
)
from ._store import NODES, ROOTS
from ._table import Table
from ._tree import Tree
from ._txn import Transaction, WriteTransaction, decode_root, node_key
from .errors import (
    AggregateNotFoundError,
    BoundKeyTypeError,
    BoundsError,
    CorruptDatabaseError,
    Error,
    SchemaMismatchError,
    TableNotFoundError,
)

__all__ = ["console_main", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended

T = TypeVar("T")


class _Failure(Exception):
    """End the command with this one-line message and exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _NotFound(_Failure):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NOT_FOUND)


class _Usage(_Failure):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a build or a verify, raised in the main thread: a KeyboardInterrupt, so that it
    unwinds exactly as Ctrl-C does (the transaction aborted, the sort runs removed, a new aggregate
    dropped again), then ends the command with exit code 143."""


class _Signals:
    """What :func:`_interruptible` yields: the command calls :meth:`commit_begins` as the last step
    before its write transaction commits, and from then on Ctrl-C and SIGTERM no longer interrupt.

    An interruption is reported as "nothing was written" (exit 130 or 143), which is only true
    before the commit: the commit itself (LMDB's, and the Python around it) cannot be undone once
    begun, and a signal's Python handler runs between bytecodes, so one that arrives during the C
    call of the commit would run right after it, with everything written. So once the commit
    begins, a signal is only recorded (``received``): the commit completes, the command reports
    what it did as usual (exit 0) and adds a note saying when the signal came. Whatever is reported
    is then true: 130 or 143 means nothing was written, 0 that the build or the repair is in place.
    """

    def __init__(self) -> None:
        self.committing = False
        self.received: str | None = None  # the signal (SIGINT, SIGTERM) that came during the commit

    def commit_begins(self) -> None:
        """From here on, record the signals instead of raising: the commit is about to run."""
        self.committing = True

    def note(self, what: str) -> None:
        """Tell stderr that a signal came during the commit, which completed: ``what`` is in place."""
        if self.received is not None:
            print(
                f"tallytree: note: {self.received} arrived during the commit, which cannot be interrupted; "
                f"it completed: {what}",
                file=sys.stderr,
            )


@contextmanager
def _interruptible() -> Iterator[_Signals]:
    """Turn SIGTERM (the default of ``kill``, ``timeout``, ``docker stop``) into :class:`_Terminated`
    while the block runs, instead of the default of ending the process on the spot, which would skip
    the cleanup, and Ctrl-C into KeyboardInterrupt as usual; but from :meth:`_Signals.commit_begins`
    on, either is only recorded (see :class:`_Signals`). A second SIGTERM during the cleanup is
    ignored. The previous handlers are restored afterwards; a SIGINT handler other than Python's
    default (one an application installed, or SIG_IGN) is left alone. Only the main thread can
    handle signals: elsewhere (``main`` called from a thread) nothing changes."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    raised = False

    def terminate(signum: int, frame: Any) -> None:
        nonlocal raised
        if signals.committing:
            signals.received = signals.received or "SIGTERM"
        elif not raised:
            raised = True
            raise _Terminated

    def interrupt(signum: int, frame: Any) -> None:
        if signals.committing:
            signals.received = signals.received or "SIGINT"
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    own_int = previous_int is signal.default_int_handler
    try:
        if own_int:
            signal.signal(signal.SIGINT, interrupt)
        yield signals
    finally:
        if own_int:
            signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and the hint to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{self.prog}: {message} (see {self.prog} --help)")


_EPILOG = """exit codes: 0 ok, 1 error, 2 bad usage, 3 check failed, drift found or a damaged database,
4 not found, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); after 130 or 143 nothing was written
values on the command line are JSON if they parse as JSON (42, "42", ["eu", 1]), else text"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tallytree",
        description="Exact counts, sums and ranks in O(log n), persisted in LMDB.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tallytree {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=description,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
        return sub

    build = command(
        "build",
        "bulk-build an aggregate from a file or a database",
        "Build AGGREGATE in DB from SOURCE, bottom-up, in one atomic transaction: readers see the old\n"
        "contents until the commit, and an interrupted build leaves the database as it was (run it\n"
        "again). The aggregate then holds exactly the source's items (--append merges instead).",
    )
    build.add_argument("database", metavar="DB", help="database directory (created if missing)")
    build.add_argument("aggregate", metavar="AGGREGATE", help="aggregate name (created if missing)")
    _source_arguments(build)
    build.add_argument(
        "--append", action="store_true", help="merge into the stored items instead of replacing"
    )
    build.add_argument(
        "--allow-empty",
        action="store_true",
        help="let a source that gives no items empty an aggregate that holds some (else: exit 1)",
    )
    _on_duplicate_argument(build)
    build.add_argument(
        "--sorted", action="store_true", help="promise the source is in (namespace, key, id) order"
    )
    build.add_argument(
        "--node-size",
        type=int,
        help=f"entries per node, for a new aggregate (default {_db.DEFAULT_NODE_SIZE})",
    )
    build.add_argument("--fill", type=float, default=_bulk.DEFAULT_FILL, help="node fill factor, 0.5 to 1.0")
    build.add_argument("--memory", default="256M", help="sort buffer before spilling to disk (default 256M)")
    build.add_argument("--temp-dir", help="directory for sort runs (default: the system's)")
    build.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    build.set_defaults(handler=_build)

    query = command(
        "query",
        "count, totals, rank, at, min, max, buckets or items",
        "Read AGGREGATE: OP is count | totals | rank KEY | at INDEX | min | max | buckets | items.\n"
        "Bounds are key values; for datetime keys, ISO 8601 text or epoch seconds work.",
    )
    query.add_argument("database", metavar="DB", help="database directory")
    query.add_argument("aggregate", metavar="AGGREGATE")
    query.add_argument(
        "op",
        metavar="OP",
        choices=("count", "totals", "rank", "at", "min", "max", "buckets", "items"),
        help="count, totals, rank, at, min, max, buckets or items",
    )
    query.add_argument("arg", metavar="ARG", nargs="?", help="the KEY of rank, the INDEX of at")
    query.add_argument("--namespace", metavar="N", help="the namespace (default: the default one)")
    query.add_argument(
        "--missing-ok", action="store_true", help="an empty namespace is not an error (exit 0)"
    )
    for bound in ("ge", "gt", "le", "lt", "eq"):
        query.add_argument(f"--{bound}", metavar="VALUE", help=f"bound: key {_BOUND_HELP[bound]} VALUE")
    query.add_argument(
        "--prefix", metavar="VALUE", help="tuple keys starting with VALUE (an element or an array)"
    )
    query.add_argument(
        "--key-type", choices=KEY_TYPES, help="how to read key values (default: like the keys)"
    )
    query.add_argument("--id", metavar="ID", help="rank: the id of the item (default: before every id)")
    query.add_argument("--reverse", action="store_true", help="rank from the end; items in descending order")
    query.add_argument("--limit", type=int, default=100, help="items: page size (default 100)")
    query.add_argument("--after", metavar="CURSOR", help="items: the cursor printed by the previous page")
    query.add_argument("--start", metavar="VALUE", help="buckets: the first edge")
    query.add_argument(
        "--width",
        metavar="W",
        help="buckets: 15m, 6h, 1d, 1w, hour, day, week, month, quarter, year, 3months, or a number",
    )
    query.add_argument("--count", type=int, help="buckets: how many buckets")
    query.set_defaults(handler=_query)

    checker = command(
        "check",
        "run the invariant checker",
        "Walk every tree and, without AGGREGATE, every table's documents (each decodes; each table holds "
        "the number its stored count says), and print every problem with where it is.",
    )
    checker.add_argument("database", metavar="DB", help="database directory")
    checker.add_argument("aggregate", metavar="AGGREGATE", nargs="?", help="only this aggregate")
    checker.add_argument("--namespace", metavar="N", help="only this namespace (with AGGREGATE)")
    checker.set_defaults(handler=_check)

    verify = command(
        "verify",
        "compare an aggregate with its source",
        "Compare AGGREGATE with SOURCE (read with build's source options and --on-duplicate): items\n"
        "missing from the aggregate, extra items, and items whose values differ. --repair applies the\n"
        "difference.",
    )
    verify.add_argument("database", metavar="DB", help="database directory")
    verify.add_argument("aggregate", metavar="AGGREGATE")
    _source_arguments(verify)
    _on_duplicate_argument(verify)
    verify.add_argument("--repair", action="store_true", help="insert, update and delete to match the source")
    verify.add_argument(
        "--force",
        action="store_true",
        help="--repair even when the stored keys and the source's differ in type (rewriting every key)",
    )
    verify.add_argument(
        "--allow-empty",
        action="store_true",
        help="let --repair from a source that gives no items empty the aggregate (else: exit 1)",
    )
    verify.add_argument(
        "--examples", type=int, default=5, help="examples shown per kind of drift (default 5)"
    )
    verify.add_argument("--memory", default="256M", help="sort buffer before spilling to disk")
    verify.add_argument("--temp-dir", help="directory for sort runs")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(handler=_verify)

    stats = command(
        "stats",
        "per aggregate: namespaces, items, depth, nodes, fill, bytes; the file's pages and readers",
        "Walk every tree and measure it; measure the file: its pages in use and free (reusable now, or\n"
        "held back by read transactions on older snapshots) and the read transactions open.",
    )
    stats.add_argument("database", metavar="DB", help="database directory")
    stats.add_argument("aggregate", metavar="AGGREGATE", nargs="?", help="only this aggregate")
    stats.set_defaults(handler=_stats)

    spaces = command(
        "namespaces",
        "list namespaces with their totals",
        "Namespaces in key order (or --reverse), paged, within the bounds on the namespace value.",
    )
    spaces.add_argument("database", metavar="DB", help="database directory")
    spaces.add_argument("aggregate", metavar="AGGREGATE")
    for bound in ("ge", "gt", "le", "lt", "eq"):
        spaces.add_argument(f"--{bound}", metavar="N", help=f"bound: namespace {_BOUND_HELP[bound]} N")
    spaces.add_argument(
        "--prefix", metavar="VALUE", help="tuple namespaces starting with VALUE (an element or an array)"
    )
    spaces.add_argument("--reverse", action="store_true", help="in descending order")
    spaces.add_argument("--limit", type=int, default=100, help="page size (default 100)")
    spaces.add_argument("--after", metavar="N", help="start after this namespace (the last one printed)")
    spaces.set_defaults(handler=_namespaces)

    drop = command(
        "drop",
        "delete an aggregate, or a table with its documents and aggregates",
        "Delete AGGREGATE with all its namespaces and items, or (--table) TABLE with its documents and\n"
        "every aggregate it maintains, in one transaction. It cannot be undone, so without --yes\n"
        "nothing is deleted: the command says what would be and exits with 2. An aggregate a table\n"
        "maintains is dropped with its table (or detached from it in Python first).",
    )
    drop.usage = "%(prog)s [-h] DB (AGGREGATE | --table TABLE) [--yes] [--json]"
    drop.add_argument("database", metavar="DB", help="database directory (never created)")
    target = drop.add_mutually_exclusive_group(required=True)
    target.add_argument("aggregate", metavar="AGGREGATE", nargs="?", help="the aggregate to delete")
    target.add_argument(
        "--table", metavar="TABLE", help="delete this table, its documents and its aggregates instead"
    )
    drop.add_argument("--yes", action="store_true", help="really delete (without it: say what, exit 2)")
    drop.set_defaults(handler=_drop)

    copy = command(
        "backup",
        "copy a live database, consistently, to a new directory (compacted)",
        "Copy DB, as of its last commit, into DEST (a new or empty directory; never written over),\n"
        "while other processes go on reading and writing it. The copy holds only the pages in use\n"
        "(--no-compact: every page, as the file has them) and opens as a database of its own. Never\n"
        "copy a database in use with cp or rsync: such a copy is torn. An interrupted backup leaves\n"
        "no database in DEST.",
    )
    copy.add_argument("database", metavar="DB", help="database directory (opened read-only)")
    copy.add_argument("destination", metavar="DEST", help="a new or empty directory (created if missing)")
    copy.add_argument(
        "--no-compact", action="store_true", help="copy every page, free ones too (as large as the file)"
    )
    copy.set_defaults(handler=_backup)

    demo = command(
        "demo",
        "load generated events and answer the scenario queries, timed against scans",
        "Generate users and events (created and start times, cost, tokens), bulk-build the aggregates\n"
        "and answer the dashboard questions, each timed next to a scan computing the same answer.",
    )
    demo.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        help="where to create the database, kept (default: a temporary directory, removed at the end)",
    )
    demo.add_argument("--users", type=int, default=200, help="number of users (default 200)")
    demo.add_argument("--events", type=int, default=200_000, help="number of events (default 200000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.set_defaults(handler=_demo)
    return parser


_BOUND_HELP = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "eq": "=="}


def _on_duplicate_argument(parser: argparse.ArgumentParser) -> None:
    """``--on-duplicate``, the same for build and verify: a source verifies as a build of it would load."""
    parser.add_argument(
        "--on-duplicate",
        choices=("error", "last"),
        default="error",
        help="a repeated (key, id): fail naming both rows (default), or keep the last",
    )


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        required=True,
        help="a JSON Lines or CSV file (or .gz), - for stdin, a SQLite file, an SQL URL (needs SQLAlchemy)",
    )
    parser.add_argument(
        "--key", required=True, metavar="F[,F...]", help="the key field(s); several make a tuple"
    )
    parser.add_argument("--id", metavar="F", help="the id field (default: the record number, from 1)")
    parser.add_argument("--namespace", metavar="F", help="the namespace field (default: one namespace)")
    parser.add_argument(
        "--sum",
        action="append",
        default=[],
        metavar="F",
        help="a summed field (repeat, or F,F; NAME=F renames); default: the aggregate's fields",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="F=VALUE",
        help="only records whose F is VALUE (repeat)",
    )
    parser.add_argument(
        "--key-type",
        action="append",
        default=[],
        metavar="TYPE|F=TYPE",
        help=f"how to read key fields: {', '.join(KEY_TYPES)} (datetime: ISO 8601 or epoch s/ms)",
    )
    parser.add_argument("--id-type", choices=("auto", "str", "int"), default="auto", help="how to read ids")
    parser.add_argument(
        "--namespace-type",
        choices=NAMESPACE_TYPES,
        default="auto",
        help="how to read namespaces (auto: as ids, text that is an integer is an int)",
    )
    parser.add_argument(
        "--format", choices=("jsonl", "csv", "sqlite"), help="the source format (default: guessed)"
    )
    parser.add_argument(
        "--delimiter",
        type=_delimiter,
        help="CSV delimiter, one character (default , or a tab for .tsv; '\\t' is a tab)",
    )
    # one or the other: with both, one of them would be ignored
    sql = parser.add_mutually_exclusive_group()
    sql.add_argument("--table", help="SQL sources: the table to read")
    sql.add_argument("--query", help="SQL sources: the query to run (instead of --table)")
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a malformed record: fail with its line number (default), or skip it and count it",
    )


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    wants_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version exit 0
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except _Failure as exc:
        return _fail(str(exc), exc.code, wants_json)
    except (AggregateNotFoundError, TableNotFoundError, SourceNotFoundError) as exc:
        return _fail(str(exc), EXIT_NOT_FOUND, wants_json)
    except CorruptDatabaseError as exc:  # damage met by any command, at open included: as check finds it
        return _fail(str(exc), EXIT_CHECK_FAILED, wants_json)
    except (Error, SourceError, RowError) as exc:
        return _fail(str(exc), EXIT_ERROR, wants_json)
    except _Terminated:
        return _fail("terminated (SIGTERM); nothing was written", EXIT_TERMINATED, wants_json)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", EXIT_INTERRUPTED, wants_json)
    except BrokenPipeError:  # the reader of our output went away (| head): not an error
        _silence_stdout()
        return EXIT_OK
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}", EXIT_ERROR, wants_json)


def console_main() -> None:
    """Entry point of the ``tallytree`` console script and of ``python -m tallytree``."""
    sys.exit(main())


def _fail(message: str, code: int, wants_json: bool) -> int:
    line = " ".join(message.split())
    print(f"tallytree: error: {line}", file=sys.stderr)
    if wants_json:
        _print_json({"error": line, "exit_code": code})
    return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _print_json(document: Any) -> None:
    """Print ``document`` as JSON: strict JSON (``allow_nan=False``), infinite floats (float keys
    may be) written as ``{"float": "Infinity"}`` (see :func:`_finite`)."""
    print(json.dumps(_finite(document), indent=2, ensure_ascii=False, default=_jsonable, allow_nan=False))


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _finite(value: Any) -> Any:
    """``value`` with each float that JSON cannot hold replaced by ``{"float": "Infinity"}``,
    ``{"float": "-Infinity"}`` or ``{"float": "NaN"}``: an object, as bytes are ``{"base64": ...}``,
    so that no text key ``"Infinity"`` reads the same; the spellings are JavaScript's and Python's
    (``float("-Infinity")``). Totals and tuples are converted on the way. O(size of value).

    >>> _finite({"key": float("inf"), "rows": [(1.5, -float("inf"))]})
    {'key': {'float': 'Infinity'}, 'rows': [[1.5, {'float': '-Infinity'}]]}
    """
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else {"float": _NON_FINITE.get(value, "NaN")}
    if kind is dict:
        return {name: _finite(element) for name, element in value.items()}
    if kind is list or kind is tuple:
        return [_finite(element) for element in value]
    if kind is Totals:
        return _finite(value.as_dict())
    return value


def _jsonable(value: Any) -> Any:
    """JSON for keys, ids and namespaces: datetimes as ISO 8601, tuples as arrays, bytes as base64."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Totals):
        return _finite(value.as_dict())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _show(value: Any) -> str:
    """Keys, ids and namespaces in text output: JSON-like, readable, parseable back as a value."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return value if _reads_back(value) else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def _reads_back(text: str) -> bool:
    """Whether ``text`` given on the command line would be read as this very text."""
    try:
        return bool(text) and text.strip() == text and parse_value(text) == text
    except ValueError:
        return False


def _number(value: int | float) -> str:
    return f"{value:,}" if isinstance(value, int) else repr(value)


# ---------------------------------------------------------------- shared helpers


def _open_existing(path: str, *, write: bool = False) -> _db.Database:
    """Open an existing database, read-only unless ``write``; not found (4) when there is none at
    ``path``. Never creates anything."""
    directory = Path(path)
    if not (directory / "data.mdb").exists():
        if not directory.exists():
            raise _NotFound(f"no tallytree database at {path}")
        if directory.is_dir():
            # (a lock.mdb alone is what a creation killed before LMDB made data.mdb leaves: no data)
            others = sorted(entry.name for entry in directory.iterdir() if entry.name != "lock.mdb")
            if not others:
                raise _NotFound(f"no tallytree database at {path}")
            listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise _Failure(
                f"{path} is a non-empty directory without a database in it (it holds {listed}): give "
                "the directory of a tallytree database (the one that holds its data.mdb)"
            )
    return _db.open(directory, readonly=not write, create=False)


def _aggregate(db: _db.Database, name: str) -> Aggregate:
    try:
        return db.aggregate(name, create=False)
    except AggregateNotFoundError:
        raise _missing(db, "aggregate", name, db.aggregates()) from None


def _table(db: _db.Database, name: str) -> Table:
    try:
        return db.table(name, create=False)
    except TableNotFoundError:
        raise _missing(db, "table", name, db.tables()) from None


def _missing(db: _db.Database, kind: str, name: str, known: list[str]) -> _NotFound:
    return _NotFound(f"no {kind} {name!r} in {db.path} (it has: {', '.join(known) or 'none'})")


def _parse_size(text: str) -> int:
    """``--memory``: bytes from ``512M``, ``2G``, ``1.5GiB``, ``65536``; bad usage (exit 2), before
    anything is opened, for anything else (``nan``, ``inf``, ``1e400``) and for less than one byte."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    upper = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = upper[-1:] if upper[-1:] in units else ""
    try:
        number = float(upper[: len(upper) - len(unit)] if unit else upper)
    except ValueError:
        number = math.nan
    if not math.isfinite(number * units[unit]):  # nan, inf, 1e400, 1e308G
        raise _Usage(f"--memory {text!r} is not a size such as 512M or 2G")
    size = int(number * units[unit])
    if size < 1:
        raise _Usage(f"--memory {text!r} must be at least one byte (a size such as 512M or 2G)")
    return size


def _delimiter(text: str) -> str:
    """``--delimiter`` (an argparse type, so bad usage comes before anything is opened): one
    character; ``\\t`` typed as two characters (``--delimiter '\\t'`` in a shell) is a tab."""
    if text == "\\t":  # what people type for a tab; a CSV delimiter is never a backslash and a t
        return "\t"
    problem = delimiter_problem(text)
    if problem is not None:
        tab = " (a tab: '\\t' or $'\\t')" if len(text) != 1 else ""
        raise argparse.ArgumentTypeError(problem + tab)
    return text


def _database_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    data = path / "data.mdb"  # LMDB's file is sparse (sized to the map): count the blocks in use
    return data.stat().st_blocks * 512 if data.exists() else 0


class _Progress:
    """A one-line progress display on stderr (only on a terminal): count, rate and ETA."""

    def __init__(self, enabled: bool, stream: IO[str]) -> None:
        self.enabled = enabled
        self.stream = stream
        self.started = time.perf_counter()
        self.shown = 0.0
        self.width = 0

    def show(
        self, phase: str, done: int, unit: str, fraction: float | None = None, force: bool = False
    ) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.shown < 0.2:
            return
        self.shown = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{phase}", f"{done:,} {unit}", f"{rate:,.0f} {unit}/s"]
        if fraction is not None and 0 < fraction <= 1:
            bar = int(fraction * 20)
            parts.insert(1, f"[{'#' * bar}{'.' * (20 - bar)}] {fraction:4.0%}")
            remaining = elapsed * (1 - fraction) / fraction
            parts.append(f"ETA {int(remaining) // 60}:{int(remaining) % 60:02d}")
        line = "  ".join(parts)
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class _LineMap:
    """Maps item positions to source record numbers, storing only where the offset between them changes."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.offsets: list[int] = []
        self.last: int | None = None  # the current offset

    def add(self, position: int, number: int) -> None:
        offset = number - position
        if offset != self.last:
            self.starts.append(position)
            self.offsets.append(offset)
            self.last = offset

    def number(self, position: int) -> int:
        index = bisect_right(self.starts, position) - 1
        return position + self.offsets[index] if index >= 0 else position


class _Reader:
    """Reads a source into rows for a build (or a verify), counting, timing and handling bad records."""

    SAMPLES = 5

    def __init__(self, args: argparse.Namespace, fields: Sequence[str] | None, progress: _Progress) -> None:
        self.args = args
        self.progress = progress
        self.source = open_source(
            args.source,
            format=args.format,
            table=args.table,
            query=args.query,
            delimiter=args.delimiter,
            stdin=sys.stdin.buffer,
        )
        try:
            self.spec = _row_spec(args, fields)
            self.convert = self.spec.converter(self.source)
        except BaseException:
            self.source.close()
            raise
        self.lines = _LineMap()
        self.records = 0
        self.items = 0
        self.skipped = 0
        self.samples: list[dict[str, Any]] = []
        self.parse_seconds = 0.0

    @property
    def sums(self) -> dict[str, str]:
        return self.spec.sums

    def close(self) -> None:
        self.source.close()

    def label(self, position: int) -> str:
        return self.source.where(self.lines.number(position))

    def bad(self, number: int, error: Exception) -> None:
        where = self.source.where(number)
        reason = error.args[0] if isinstance(error, RowError) and error.args else str(error)
        if self.args.on_error == "fail":
            raise _Failure(f"{self.source.name} {where}: {reason}")
        self.skipped += 1
        if len(self.samples) < self.SAMPLES:
            self.samples.append({"where": where, "error": str(reason)})

    def invalid(self, position: int, error: Exception) -> None:
        """The library's on_invalid: an item whose key or values the aggregate refuses."""
        self.bad(self.lines.number(position), error)

    def rows(self) -> Iterator[Any]:
        """The rows, read in timed batches (so parsing time is measured apart from building).

        A batch of CSV or JSON Lines records is converted a column at a time when it can be
        (:meth:`RowSpec.batch_converter`); a batch with a malformed record goes record by record,
        which names it (or skips it with ``--on-error skip``).
        """
        source = self.source
        batches = source.batches(4096)
        total = source.total_bytes
        batch_convert = self.spec.batch_converter(source)
        while True:
            started = time.perf_counter()
            pending = next(batches, None)
            if pending is None:
                self.parse_seconds += time.perf_counter() - started
                return
            batch = None
            if batch_convert is not None and pending:
                numbers = list(map(itemgetter(0), pending))
                raw = list(map(itemgetter(1), pending))
                if RowError not in set(map(type, raw)):
                    batch = batch_convert(raw, self.records + 1)
                    if batch is not None:
                        self._number_lines(numbers)
                        self.records += len(pending)
                        self.items += len(batch)
            if batch is None:
                batch = self._convert(pending)
            self.parse_seconds += time.perf_counter() - started
            fraction = source.bytes_read() / total if total else None
            self.progress.show(f"reading {source.name}", self.records, "records", fraction)
            yield from batch

    def _number_lines(self, numbers: list[int]) -> None:
        """Record the source record numbers of the next ``len(numbers)`` items."""
        lines, items = self.lines, self.items
        if numbers[-1] - numbers[0] == len(numbers) - 1:  # one record per line: one offset
            if numbers[0] - items != lines.last:
                lines.add(items, numbers[0])
            return
        for position, number in enumerate(numbers, items):
            if number - position != lines.last:
                lines.add(position, number)

    def _convert(self, pending: list[tuple[int, Any]]) -> list[Any]:
        """Rows of records converted one at a time, malformed ones reported or skipped."""
        convert = self.convert
        lines = self.lines
        count = self.records
        items = self.items
        batch: list[Any] = []
        append = batch.append
        for number, record in pending:
            count += 1
            if type(record) is RowError:
                self.bad(number, record)
                continue
            try:
                row = convert(number, count, record)
            except RowError as exc:
                self.bad(number, exc)
                continue
            if row is None:
                continue
            if number - items != lines.last:  # a record skipped, filtered or spanning lines
                lines.add(items, number)
            items += 1
            append(row)
        self.records, self.items = count, items
        return batch

    def skipped_report(self) -> dict[str, Any]:
        return {"count": self.skipped, "examples": self.samples}


def _split_fields(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _row_spec(args: argparse.Namespace, fields: Sequence[str] | None) -> RowSpec:
    key = _split_fields([args.key])
    if not key:
        raise _Usage("--key needs at least one field name")
    sums: dict[str, str] = {}
    for item in _split_fields(args.sum):
        name, _, column = item.partition("=")
        name = name.strip()
        if name in sums:  # a dict would keep one silently; the aggregate's field names are distinct
            raise _Usage(
                f"--sum {item!r}: the field {name!r} is named twice; give each summed field once "
                "(NAME=COLUMN names a field apart from its column)"
            )
        sums[name] = (column or name).strip()
    if not sums and fields:
        sums = {name: name for name in fields}
    where: dict[str, str] = {}
    for item in args.where:
        name, equals, wanted = item.partition("=")
        if not equals or not name:
            raise _Usage(f"--where {item!r} is not FIELD=VALUE")
        where[name.strip()] = wanted
    key_types: dict[str, str] = {}
    for item in args.key_type:
        name, equals, kind = item.rpartition("=")
        if not equals:
            name, kind = "*", item
        if kind not in KEY_TYPES:
            raise _Usage(f"--key-type {item!r}: the type is one of {', '.join(KEY_TYPES)}")
        if name != "*" and name not in key:
            raise _Usage(f"--key-type {item!r}: {name!r} is not a --key field")
        key_types[name] = kind
    return RowSpec(
        key=key,
        key_types=key_types,
        id=args.id,
        id_type=args.id_type,
        namespace=args.namespace,
        namespace_type=args.namespace_type,
        sums=sums,
        where=where,
    )


# ---------------------------------------------------------------- build


def _build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    memory = _parse_size(args.memory)
    if not 0.5 <= args.fill <= 1.0:
        raise _Usage(f"--fill {args.fill} must be from 0.5 to 1.0")
    with _interruptible() as signals:  # until the commit and the close; what follows only reports
        progress = _Progress(sys.stderr.isatty() and not args.quiet, sys.stderr)
        reader = _Reader(args, None, progress)
        try:
            with _db.open(args.database) as db:
                existing = args.aggregate in db.aggregates()
                try:  # from the definition of a new aggregate on, so that a SIGTERM cannot slip in
                    fields = db.aggregate(args.aggregate).fields if existing else ()
                    if not reader.sums and fields:
                        reader.spec.sums.update({name: name for name in fields})
                        reader.convert = reader.spec.converter(reader.source)
                    for name in reader.sums if not existing else ():
                        if (reserved := _reserved_sum(name)) is not None:
                            raise _Failure(reserved)
                    try:
                        aggregate = db.aggregate(
                            args.aggregate, values=tuple(reader.sums), node_size=args.node_size
                        )
                    except SchemaMismatchError as exc:  # fixed at creation: the way out is to drop it
                        again = shlex.join(["tallytree", "drop", args.database, args.aggregate, "--yes"])
                        raise _Failure(
                            f"{exc}; to build it anew with these settings, drop it: {again}"
                        ) from exc
                    except ValueError as exc:
                        raise _Failure(str(exc)) from exc
                    report, commit_seconds = _without_gc(
                        _run_build, args, db, aggregate, reader, memory, progress, signals
                    )
                except BaseException:
                    if not existing and args.aggregate in db.aggregates():
                        db.drop_aggregate(args.aggregate)  # it was created for this build
                    db._discard_if_unused()  # a build into a new path leaves no empty database
                    raise
                size = _database_bytes(db.path)
        finally:
            progress.close()
            reader.close()
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "aggregate": args.aggregate,
        "source": reader.source.name,
        "records": reader.records,
        "items": report.items,
        "namespaces": report.namespaces,
        "seconds": round(seconds, 3),
        "items_per_second": round(report.items / seconds) if seconds > 0 else 0,
        "parse_seconds": round(reader.parse_seconds, 3),
        "build_seconds": round(seconds - reader.parse_seconds - commit_seconds, 3),
        "commit_seconds": round(commit_seconds, 3),
        "database_bytes": size,
        "duplicates_dropped": report.duplicates,
        "namespaces_cleared": report.cleared,
        "skipped": reader.skipped_report(),
        "signal_during_commit": signals.received,
    }
    if args.json:
        _print_json(summary)
    elif not args.quiet:
        print(
            f"built {args.aggregate}: {report.items:,} items in {report.namespaces:,} namespace(s) from "
            f"{reader.source.name} in {seconds:.2f} s ({summary['items_per_second']:,} items/s); "
            f"database {size / 2**20:,.1f} MiB"
        )
        print(
            f"  time: parsing {reader.parse_seconds:.2f} s, building {summary['build_seconds']:.2f} s, "
            f"commit {commit_seconds:.2f} s"
        )
        if report.duplicates:
            print(f"  {report.duplicates:,} duplicate item(s) replaced by a later one (--on-duplicate last)")
        if report.cleared:
            print(f"  {report.cleared:,} namespace(s) absent from the source emptied")
        if reader.skipped:
            print(f"  skipped {reader.skipped:,} malformed record(s), e.g.:")
            for sample in reader.samples:
                print(f"    {sample['where']}: {sample['error']}")
    signals.note(f"the build is in place ({report.items:,} items)")
    return EXIT_OK


def _without_gc(function: Callable[..., T], *args: Any) -> T:
    """Call ``function`` with the cyclic garbage collector paused (see ``_gc``)."""
    with gc_paused():
        return function(*args)


def _run_build(
    args: argparse.Namespace,
    db: _db.Database,
    aggregate: Aggregate,
    reader: _Reader,
    memory: int,
    progress: _Progress,
    signals: _Signals,
) -> tuple[_bulk.BuildReport, float]:
    def on_progress(phase: str, done: int) -> None:
        if phase == "write" and not args.sorted:
            total = reader.items
            progress.show("writing nodes", done, "items", done / total if total else None)

    with db.write() as tx:
        # The library's own check, in the transaction that writes: an aggregate a table maintains
        # refuses writes that bypass the table (the table's hooks would no longer match it), and
        # _bulk.build_many, unlike Aggregate.build_many, does not check. Nothing is read before it.
        wtx = aggregate._writable(tx)
        try:
            report = _bulk.build_many(
                aggregate,
                wtx,
                reader.rows(),
                sorted=args.sorted,
                replace=not args.append,
                on_duplicate=args.on_duplicate,
                clear_others=not args.append,
                fill=args.fill,
                memory=memory,
                on_invalid=reader.invalid if args.on_error == "skip" else None,
                label=reader.label,
                progress=on_progress,
                temp_dir=args.temp_dir,
            )
        except CorruptDatabaseError:  # the database's damage, not the source's: exit 3 (see main)
            raise
        except Error as exc:  # a duplicate, disorder, a bad key: named with the source
            raise _Failure(f"{reader.source.name}: {exc}") from exc
        refusal = _empty_build(args, reader, report)
        if refusal is not None:
            tx.abort()  # nothing is written; the block's end does nothing more
        else:
            progress.show("committing", report.items, "items", force=True)
            committing = time.perf_counter()
            signals.commit_begins()  # the last step before the commit (see _Signals)
    if refusal is not None:
        raise _Failure(refusal(db, aggregate))
    return report, time.perf_counter() - committing


def _empty_build(
    args: argparse.Namespace, reader: _Reader, report: _bulk.BuildReport
) -> Callable[[_db.Database, Aggregate], str] | None:
    """Why a build that gave no item must not commit, as a function making the message once the
    transaction is aborted; None when it may.

    A source that gives no item (a CSV file with only its header, an empty table, a ``--where``
    that matches nothing) would, replacing, empty an aggregate that holds items: refused unless
    ``--allow-empty``. A source whose every item-giving record was malformed (skipped with
    ``--on-error skip``) is refused in every mode, the aggregate new or not: the options, or the
    source, are wrong.
    """
    if report.items or (args.append and not reader.skipped):
        return None
    name = reader.source.name
    if reader.skipped:
        first = reader.samples[0]
        skipped = (
            f"{name}: no record gave an item: {reader.skipped:,} malformed record(s) skipped (the first: "
            f"{first['where']}: {first['error']}); nothing was written. Fix the source or the options "
            "that read it (--key-type, --id-type, --sum)"
        )
        return lambda db, aggregate: skipped
    if args.allow_empty or not report.cleared:  # nothing stored to lose (report.cleared: namespaces)
        return None
    if reader.records:
        why = f"--where matched none of its {reader.records:,} record(s)"
    else:
        why = f"it holds no {reader.source.unit}s" if reader.source.kind != "csv" else "it holds no records"

    def message(db: _db.Database, aggregate: Aggregate) -> str:
        with db.read() as tx:
            held = _aggregate_contents(tx, aggregate)
        return (
            f"{name} gave no items ({why}), and a build replaces the aggregate's contents: it would empty "
            f"aggregate {args.aggregate!r} ({held['items']:,} items in {held['namespaces']:,} namespace(s)); "
            "nothing was written. Pass --allow-empty to empty it, or check the source"
        )

    return message


# ---------------------------------------------------------------- query


_WIDTHS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class _Keys:
    """Reads key values from the command line: like the stored keys (datetime keys from ISO text or
    epoch numbers), or as ``--key-type`` says."""

    def __init__(self, kind: str | None, sample: Any) -> None:
        self.kind = kind
        self.sample = sample

    def read(self, option: str, text: str) -> Any:
        try:
            value = parse_value(text)
            return self._shape(value, text, self.sample)
        except ValueError as exc:
            raise _Failure(f"{option} {text!r}: {exc}") from None

    def _shape(self, value: Any, text: str, sample: Any) -> Any:
        kind = self.kind
        if kind is not None and kind != "auto" and not isinstance(value, tuple):
            if kind == "datetime":
                return _datetime_bound(value)
            if kind == "str":
                return text
            if kind == "int":
                if type(value) is not int:
                    raise ValueError("not an int")
                return value
            if kind == "float":
                if type(value) not in (int, float):
                    raise ValueError("not a number")
                return float(value)
        if (
            isinstance(sample, datetime)
            and isinstance(value, str | int | float)
            and not isinstance(value, bool)
        ):
            return _datetime_bound(value)
        if isinstance(sample, tuple) and isinstance(value, tuple):
            return tuple(
                self._shape(element, str(element), sample[index] if index < len(sample) else None)
                for index, element in enumerate(value)
            )
        return value

    def prefix(self, text: str) -> tuple[Any, ...]:
        try:
            value = parse_value(text)
            elements = value if isinstance(value, tuple) else (value,)
            if isinstance(self.sample, tuple):
                return tuple(self._shape(elements, text, self.sample))
            return elements
        except ValueError as exc:
            raise _Failure(f"--prefix {text!r}: {exc}") from None


_YEAR_OR_MONTH = re.compile(r"\s*([0-9]{4})(0[1-9]|1[0-2])?\s*\Z")


def _datetime_bound(value: Any) -> datetime:
    """A datetime bound from a value given on the command line (``parse_datetime``), refusing four
    digits, or six that form a year and a month (``2025``, ``202502``): people type them for a year or
    a month, which epoch seconds would silently turn into the first minutes of 1970, so that ``--lt
    2025`` counted nothing. The error says what to type for either meaning. O(len(value)).

    >>> _datetime_bound(20250101).isoformat(), _datetime_bound(2025.0).isoformat()
    ('2025-01-01T00:00:00+00:00', '1970-01-01T00:33:45+00:00')
    >>> _datetime_bound(2025)
    Traceback (most recent call last):
    ValueError: 2025 would read as epoch seconds (1970-01-01T00:33:45+00:00), not as the year 2025: ...
    """
    match = _YEAR_OR_MONTH.match(str(value)) if type(value) in (int, str) else None
    if match is None:
        return parse_datetime(value)
    year, month = match.group(1), match.group(2)
    digits = year + (month or "")
    meant = f"the month {year}-{month}" if month else f"the year {year}"
    start = f"{year}-{month or '01'}-01"
    raise ValueError(
        f"{digits} would read as epoch seconds ({parse_datetime(int(digits)).isoformat()}), not as {meant}: "
        f"for {meant} give {start} (or {start.replace('-', '')}), for that epoch time {digits}.0"
    )


def _namespace_value(text: str | None, option: str = "--namespace") -> Any:
    if text is None:
        return None
    try:
        return parse_value(text)
    except ValueError as exc:
        raise _Usage(f"{option} {text!r}: {exc}") from None


_OWN_KEYS = {"namespace": "namespaces", "start": "query buckets", "end": "query buckets"}
"""Keys that JSON output puts beside an aggregate's sums, in one object with them (``count`` too,
which the library reserves): a value field of one of these names would overwrite the key, or be
overwritten. ``build`` refuses them for a new aggregate; the output refuses an aggregate that the
library defined with one (see :func:`_own_keys_free`). Elsewhere sums are nested under ``values``."""


def _reserved_sum(name: str) -> str | None:
    """Why ``name`` cannot be a summed field of an aggregate ``build`` defines, or None. O(1)."""
    if name not in _OWN_KEYS:
        return None
    return (
        f"the value field name {name!r} is reserved: `tallytree {_OWN_KEYS[name]} --json` prints its own "
        f"{name!r} key beside the sums; pick another name (--sum NAME={shlex.quote(name)} names the field "
        "apart from its column)"
    )


def _own_keys_free(aggregate: Aggregate, keys: Sequence[str]) -> None:
    """Refuse JSON output that would merge a value field into one of ``keys`` (an aggregate the
    library defined with such a field; ``build`` refuses them): exit 1, before anything is read."""
    for name in keys:
        if name in aggregate.fields:
            raise _Failure(
                f"aggregate {aggregate.name!r} has a value field named {name!r}, the name of a key that "
                f"`tallytree {_OWN_KEYS[name]} --json` prints beside the sums, so one would overwrite the "
                "other; read it without --json, or from Python"
            )


def _item_document(item: Item, fields: tuple[str, ...]) -> dict[str, Any]:
    return {"key": item.key, "id": item.id, "values": dict(zip(fields, item.values, strict=True))}


def _item_line(item: Item, fields: tuple[str, ...]) -> str:
    values = " ".join(f"{name}={_number(value)}" for name, value in zip(fields, item.values, strict=True))
    return f"{_show(item.key)}  {_show(item.id)}" + (f"  {values}" if values else "")


def _totals_line(totals: Totals) -> str:
    return " ".join(f"{name}={_number(value)}" for name, value in totals.as_dict().items())


def _query(args: argparse.Namespace) -> int:
    op = args.op
    if op in ("rank", "at") and args.arg is None:
        raise _Usage(f"query {op} needs {'a KEY' if op == 'rank' else 'an INDEX'} after it")
    if op not in ("rank", "at") and args.arg is not None:
        raise _Usage(f"query {op} takes no argument (got {args.arg!r}); bounds are options: --ge, --lt, ...")
    with _open_existing(args.database) as db:
        aggregate = _aggregate(db, args.aggregate)
        fields = aggregate.fields
        namespace = _namespace_value(args.namespace)
        with db.read() as tx:
            if (
                args.namespace is not None
                and not args.missing_ok
                and aggregate.count(tx, namespace=namespace) == 0
            ):
                raise _NotFound(
                    f"no namespace {_show(namespace)} in aggregate {args.aggregate!r} (it holds no items; "
                    "--missing-ok reads it as empty)"
                )
            sample = aggregate.min(tx, namespace=namespace)
            keys = _Keys(args.key_type, sample.key if sample is not None else None)
            bounds: dict[str, Any] = {"namespace": namespace}
            for name in ("ge", "gt", "le", "lt", "eq"):
                text = getattr(args, name)
                if text is not None:
                    bounds[name] = keys.read(f"--{name}", text)
            if args.prefix is not None:
                bounds["prefix"] = keys.prefix(args.prefix)
            try:
                document, lines = _answer(args, aggregate, tx, keys, bounds, fields)
            except BoundKeyTypeError as exc:
                raise _Failure(_bound_type_message(args, keys, sample.key if sample else None, exc)) from None
            if args.namespace is None and sample is None and next(aggregate.namespaces(tx), None) is not None:
                hint = f"list them with: tallytree namespaces DB {args.aggregate}"
                print(
                    f"tallytree: note: the default namespace of {args.aggregate!r} is empty; its items are "
                    f"in namespaces (give --namespace; {hint})",
                    file=sys.stderr,
                )
    if args.json:
        _print_json(document)
    else:
        for line in lines:
            print(line)
    return EXIT_OK


def _answer(
    args: argparse.Namespace,
    aggregate: Aggregate,
    tx: Transaction,
    keys: _Keys,
    bounds: dict[str, Any],
    fields: tuple[str, ...],
) -> tuple[Any, list[str]]:
    op = args.op
    if op == "count":
        count = aggregate.count(tx, **bounds)
        return {"count": count}, [str(count)]
    if op == "totals":
        totals = aggregate.totals(tx, **bounds)
        return totals.as_dict(), [_totals_line(totals)]
    if op == "rank":
        key = keys.read("KEY", args.arg)
        item_id = parse_value(args.id) if args.id is not None else None
        rank = aggregate.rank(tx, key, item_id, reverse=args.reverse, **bounds)
        return {"rank": rank}, [str(rank)]
    if op == "at":
        try:
            index = int(args.arg)
        except ValueError:
            raise _Usage(
                f"query at takes an integer INDEX (negative from the end), not {args.arg!r}"
            ) from None
        item = aggregate.at(tx, index, **bounds)
        return _item_document(item, fields), [_item_line(item, fields)]
    if op in ("min", "max"):
        found = aggregate.min(tx, **bounds) if op == "min" else aggregate.max(tx, **bounds)
        if found is None:
            return None, ["(no items)"]
        return _item_document(found, fields), [_item_line(found, fields)]
    if op == "buckets":
        return _buckets(args, aggregate, tx, keys, bounds, fields)
    if args.limit < 1:
        raise _Usage("--limit must be at least 1")
    if args.after is not None:
        try:
            _decode_cursor(args.after)
        except BoundsError:
            raise _Failure(
                f"--after {args.after!r} is not a cursor: give the one the previous page printed (its "
                "last line, '# more: --after CURSOR', or its \"cursor\" with --json)"
            ) from None
    page = aggregate.page(tx, after=args.after, limit=args.limit, reverse=args.reverse, **bounds)
    lines = [_item_line(item, fields) for item in page.items]
    if not page.done:
        lines.append(f"# more: --after {page.cursor}")
    document = {
        "items": [_item_document(item, fields) for item in page.items],
        "cursor": page.cursor,
        "done": page.done,
    }
    return document, lines


def _kind(value: Any) -> str:
    """What a key is, in the command line's words: the class a bound must share with the keys."""
    if isinstance(value, tuple):
        return f"an array whose first element is {_kind(value[0])}" if value else "an empty array"
    if value is None or isinstance(value, bool):
        return "null" if value is None else "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "text", bytes: "bytes", datetime: "a datetime"}.get(type(value), type(value).__name__)


def _fits_second(keys: _Keys, value: Any, sample: tuple[Any, ...]) -> bool:
    """Whether ``value`` reads as the second element of keys like ``sample`` (a datetime typed bare
    over ``(status, ts)`` keys), rather than as their first."""
    if len(sample) < 2 or _kind(sample[1]) == _kind(sample[0]):
        return False
    try:
        return _kind(keys._shape(value, str(value), sample[1])) == _kind(sample[1])
    except ValueError:
        return False


def _bound_type_message(args: argparse.Namespace, keys: _Keys, sample: Any, exc: BoundKeyTypeError) -> str:
    """The library's BoundKeyTypeError (a bound of another type than every key), said for the command
    line: which option, what it read as, and how to type it (a JSON array for tuple keys, JSON quotes
    for text that reads as a number), rather than Python's ``ge=(first, value)``."""
    given = [(f"--{name}", getattr(args, name)) for name in ("ge", "gt", "le", "lt", "eq", "prefix")]
    if args.op == "rank":
        given.append(("KEY", args.arg))
    if args.op == "buckets":
        given.append(("--start", args.start))
    where = "the default namespace"
    if args.namespace is not None:
        where = f"namespace {_show(_namespace_value(args.namespace))}"
    for option, text in given:
        if text is None:
            continue
        value = keys.prefix(text) if option == "--prefix" else keys.read(option, text)
        if _kind(value) == _kind(sample):
            continue
        shown = "" if option == "KEY" else f"{option} "  # (the KEY of rank is typed bare)
        if option == "--prefix" and not isinstance(sample, tuple):
            hint = (
                "--prefix selects array keys by their first elements; bound these with --ge, --gt, --le, "
                "--lt or --eq"
            )
        elif option == "--prefix" and sample:
            head = json.dumps([sample[0]], default=_jsonable, ensure_ascii=False)
            hint = f"give the first elements as the keys have them, e.g. --prefix {shlex.quote(head)}"
        elif isinstance(sample, tuple) and sample:
            if (
                not isinstance(value, tuple)
                and _kind(value) == _kind(sample[0])
                and not _fits_second(keys, value, sample)
            ):
                first, rest = value, list(sample[1:])  # the first element alone: show the whole shape
            else:
                first, rest = sample[0], list(value[1:]) if isinstance(value, tuple) else [value]
            head = json.dumps([first], default=_jsonable, ensure_ascii=False)
            array = json.dumps([first, *rest], default=_jsonable, ensure_ascii=False)
            hint = (
                f"give an array, e.g. {shown}{shlex.quote(array)}, or --prefix {shlex.quote(head)} for "
                f"every key whose first element is {_show(first)}"
            )
        elif isinstance(sample, str):
            quoted = shlex.quote(json.dumps(text, ensure_ascii=False))
            hint = f"values that read as JSON are JSON, so quote the text: {shown}{quoted}"
        else:
            hint = f"give {_kind(sample)}"
        if keys.kind not in (None, "auto"):
            hint += f" (--key-type {keys.kind} read it so: leave it out to read bounds like the keys)"
        return (
            f"{args.aggregate}: {option} {text!r} reads as {_kind(value)}, but every key in {where} is "
            f"{_kind(sample)}; values of different types "
            "compare by their type (null < booleans < numbers < text < bytes < datetimes < arrays), not "
            f"by value, so it would select every key or none: {hint}"
        )
    return str(exc)


def _buckets(
    args: argparse.Namespace,
    aggregate: Aggregate,
    tx: Transaction,
    keys: _Keys,
    bounds: dict[str, Any],
    fields: tuple[str, ...],
) -> tuple[Any, list[str]]:
    if args.start is None or args.width is None or args.count is None:
        raise _Usage("query buckets needs --start VALUE --width W --count N")
    extra = sorted(name for name in ("ge", "gt", "le", "lt", "eq") if name in bounds)
    if extra:
        raise _Usage(f"query buckets takes --start/--width/--count (and --prefix), not --{extra[0]}")
    if args.json:
        _own_keys_free(aggregate, ["start", "end"])
    start = keys.read("--start", args.start)
    width = _width(args.width, start)
    buckets = aggregate.buckets(
        tx,
        namespace=bounds["namespace"],
        start=start,
        width=width,
        count=args.count,
        prefix=bounds.get("prefix"),
    )
    document = [{"start": bucket.start, "end": bucket.end, **bucket.totals.as_dict()} for bucket in buckets]
    lines = [f"{_show(bucket.start)}  {_totals_line(bucket.totals)}" for bucket in buckets]
    return document, lines


def _width(text: str, start: Any) -> Any:
    lower = text.strip().lower()
    for unit in UNITS:  # the library's named widths (hour, day, week, month, ...), in any case
        if lower.rstrip("s") in (unit, f"1{unit}"):
            return unit
        if lower.endswith((unit, unit + "s")) and lower[: lower.index(unit)].isdigit():
            return (unit, int(lower[: lower.index(unit)]))
    if isinstance(start, datetime):
        number, unit = lower[:-1], lower[-1:]
        if unit in _WIDTHS and number.replace(".", "", 1).isdigit():
            return timedelta(seconds=float(number) * _WIDTHS[unit])
        raise _Usage(
            f"--width {text!r}: for datetime keys use e.g. 1d, 6h, 15m, 30s, 1w, day, week, month, "
            "quarter, year or 3months"
        )
    value = parse_value(text)
    if type(value) not in (int, float):
        raise _Usage(f"--width {text!r}: for numeric keys give a number")
    return value


# ---------------------------------------------------------------- check, stats, namespaces


def _check(args: argparse.Namespace) -> int:
    if args.namespace is not None and args.aggregate is None:
        raise _Usage("check --namespace needs an AGGREGATE")
    with _open_existing(args.database) as db:
        aggregate = _aggregate(db, args.aggregate) if args.aggregate else None
        with db.read() as tx:
            if args.namespace is not None:
                problems = check(tx, aggregate, namespace=_namespace_value(args.namespace))
            else:
                problems = check(tx, aggregate)
    if args.json:
        _print_json({"ok": not problems, "problems": [str(problem) for problem in problems]})
    else:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)" if problems else "ok: no problems found")
    return EXIT_CHECK_FAILED if problems else EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    with _open_existing(args.database) as db:
        names = [args.aggregate] if args.aggregate else db.aggregates()
        aggregates = [_aggregate(db, name) for name in names]
        with db.read() as tx:
            documents = [_aggregate_stats(tx, aggregate) for aggregate in aggregates]
        size = _database_bytes(db.path)
        storage = db.storage_info()
    if args.json:
        _print_json({"database_bytes": size, "storage": storage, "aggregates": documents})
        return EXIT_OK
    print(f"database {args.database}: {size / 2**20:,.1f} MiB on disk")
    if storage is not None:
        for line in _storage_lines(storage):
            print(f"  {line}")
    if not documents:
        print("  no aggregates")
    for document in documents:
        print(
            f"  {document['name']} (values: {', '.join(document['values']) or 'none'}; node size "
            f"{document['node_size']}): {document['items']:,} items in {document['namespaces']:,} "
            f"namespace(s), depth {document['depth']}, {document['leaves']:,} leaves + "
            f"{document['internal_nodes']:,} internal nodes, fill {document['fill']:.0%}, "
            f"{document['bytes'] / 2**20:,.2f} MiB of nodes"
            + (f"; {document['pending_items']:,} pending inserts" if document["pending_items"] else "")
        )
    return EXIT_OK


def _storage_lines(storage: dict[str, Any]) -> list[str]:
    """The file's pages and readers (``Database.storage_info``), for people.

    >>> for line in _storage_lines({"page_bytes": 4096, "pages": 100, "pages_used": 40,
    ...     "pages_free": 60, "pages_reusable": 10, "pages_held_by_readers": 45, "compacted_bytes": 159744,
    ...     "readers": 1, "oldest_reader_lag": 200, "oldest_reader_pid": 7, "dead_readers": 1}):
    ...     print(*line.split("; "), sep="\\n  ")
    pages of 4 KiB: 100 (0.4 MiB): 40 in use, 60 free (10 reusable now, 45 held by readers)
      a compacting backup would take 0.2 MiB
    readers: 1 read transaction open
      the oldest reads the snapshot of 200 commits ago (pid 7) and holds 45 free pages (0.2 MiB) from reuse
      1 of them belongs to a process that no longer runs (its slot is freed at the next write)
    """
    page = storage["page_bytes"]

    def mib(pages: int) -> str:
        return f"{pages * page / 2**20:,.1f} MiB"

    free = f"{storage['pages_free']:,} free"
    if storage["pages_reusable"] is not None:
        held = storage["pages_held_by_readers"]
        free += f" ({storage['pages_reusable']:,} reusable now, {held:,} held by readers)"
    lines = [
        f"pages of {page // 1024} KiB: {storage['pages']:,} ({mib(storage['pages'])}): "
        f"{storage['pages_used']:,} in use, {free}; a compacting backup would take "
        f"{storage['compacted_bytes'] / 2**20:,.1f} MiB"
    ]
    readers = storage["readers"]
    if not readers:
        lines.append("readers: no read transaction open")
        return lines
    lag = storage["oldest_reader_lag"]
    snapshot = f"the snapshot of {lag:,} commit{'s' if lag != 1 else ''} ago" if lag else "the last commit"
    line = (
        f"readers: {readers:,} read transaction{'s' if readers > 1 else ''} open; the oldest reads "
        f"{snapshot} (pid {storage['oldest_reader_pid']})"
    )
    held = storage["pages_held_by_readers"]
    if held:
        line += f" and holds {held:,} free pages ({mib(held)}) from reuse"
    if storage["dead_readers"]:
        line += (
            f"; {storage['dead_readers']:,} of them belong{'s' if storage['dead_readers'] == 1 else ''} to "
            "a process that no longer runs (its slot is freed at the next write)"
        )
    lines.append(line)
    return lines


def _aggregate_stats(tx: Transaction, aggregate: Aggregate) -> dict[str, Any]:
    """Walk the trees of an aggregate: internal nodes are decoded, leaves only measured."""
    namespaces = items = pending = depth = leaves = internal = entries = size = 0
    prefix = aggregate._prefix
    stop = (int.from_bytes(prefix, "big") + 1).to_bytes(4, "big")
    for _, value in tx.kv.scan(ROOTS, prefix, stop):
        root = decode_root(value)
        namespaces += 1
        items += root.summary[0]
        depth = max(depth, root.height)
        if root.pending_summary is not None:  # inserts not merged into leaves yet
            pending += root.pending_summary[0]
            if root.packed_pending is not None:  # held by the record (format 3)
                size += len(root.packed_pending)
            else:  # stored by itself (format 2)
                data = tx.kv.get(NODES, node_key(root.pending))
                size += len(data) if data is not None else 0
        level = [(root.node_id, root.height)] if root.node_id else []
        while level:
            following: list[tuple[int, int]] = []
            for node_id, height in level:
                if height == 1:
                    data = tx.kv.get(NODES, node_key(node_id))
                    size += len(data) if data is not None else 0
                    leaves += 1
                    continue
                node = tx.node(node_id)
                data = tx.kv.get(NODES, node_key(node_id))
                size += len(data) if data is not None else 0
                internal += 1
                entries += len(node.kids)
                following.extend((kid, height - 1) for kid in node.kids)
            level = following
    nodes = leaves + internal
    entries += items - pending  # leaf entries
    return {
        "name": aggregate.name,
        "values": list(aggregate.fields),
        "node_size": aggregate.node_size,
        "namespaces": namespaces,
        "items": items,
        "pending_items": pending,
        "depth": depth,
        "leaves": leaves,
        "internal_nodes": internal,
        "fill": entries / (nodes * aggregate.node_size) if nodes else 0.0,
        "bytes": size,
        "bytes_per_item": round(size / items, 1) if items else 0.0,
    }


def _namespaces(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise _Usage("--limit must be at least 1")
    options: dict[str, Any] = {}
    for name in ("ge", "gt", "le", "lt", "eq", "after"):
        text = getattr(args, name)
        if text is not None:
            options[name] = _namespace_value(text, f"--{name}")
    if args.prefix is not None:
        value = _namespace_value(args.prefix, "--prefix")
        options["prefix"] = value if isinstance(value, tuple) else (value,)
    with _open_existing(args.database) as db:
        aggregate = _aggregate(db, args.aggregate)
        if args.json:
            _own_keys_free(aggregate, ["namespace"])
        with db.read() as tx:  # one more than a page says whether there is more: O(log N + limit)
            page = list(aggregate.namespaces(tx, limit=args.limit + 1, reverse=args.reverse, **options))
    more = len(page) > args.limit
    del page[args.limit :]
    following = page[-1][0] if more else None
    if args.json:
        spaces = [{"namespace": namespace, **totals.as_dict()} for namespace, totals in page]
        _print_json({"namespaces": spaces, "next": following, "done": not more})
        return EXIT_OK
    for namespace, totals in page:
        print(f"{_show(namespace)}  {_totals_line(totals)}")
    if more:
        print(f"# more: --after {_quote_arg(_show(following))}")
    return EXIT_OK


def _quote_arg(text: str) -> str:
    return text if text.replace(":", "").replace("_", "").replace("-", "").isalnum() else repr(text)


# ---------------------------------------------------------------- backup


def _backup(args: argparse.Namespace) -> int:
    """Copy a database into a new or empty directory (``Database.backup``), opened read-only.

    Ctrl-C and SIGTERM interrupt it: the backup removes what it wrote (exit 130 or 143)."""
    compact = not args.no_compact
    with _open_existing(args.database) as db:
        source = (Path(args.database) / "data.mdb").stat().st_size
        with _interruptible():
            db.backup(args.destination, compact=compact)
    copied = (Path(args.destination) / "data.mdb").stat().st_size
    document = {
        "database": args.database,
        "destination": args.destination,
        "compact": compact,
        "database_bytes": source,
        "backup_bytes": copied,
    }
    if args.json:
        _print_json(document)
    else:
        print(
            f"backed up {args.database} ({source / 2**20:,.1f} MiB) to {args.destination}: "
            f"{copied / 2**20:,.1f} MiB{', compacted' if compact else ''}"
        )
    return EXIT_OK


# ---------------------------------------------------------------- drop


def _drop(args: argparse.Namespace) -> int:
    """Delete an aggregate or a table, after saying what it holds; only with --yes (else exit 2).

    Every refusal (not found, maintained by a table, no --yes) comes before anything is written,
    and without --yes the database is opened read-only. The counts reported are those read just
    before the drop, which is one transaction of the library's.
    """
    with _open_existing(args.database, write=args.yes) as db:
        if args.table is not None:
            document = _table_contents(db, _table(db, args.table))
            target = f"table {args.table!r}"
            aggregates = document["aggregates"]
            held = f"{document['documents']:,} document(s) and {len(aggregates)} attached aggregate(s)"
            if aggregates:
                held += " (" + ", ".join(f"{one['name']}: {one['items']:,} items" for one in aggregates) + ")"
        else:
            aggregate = _droppable(db, args.aggregate)
            with db.read() as tx:
                document = {
                    "dropped": "aggregate",
                    "name": args.aggregate,
                    **_aggregate_contents(tx, aggregate),
                }
            target = f"aggregate {args.aggregate!r}"
            held = f"{document['items']:,} items in {document['namespaces']:,} namespace(s)"
        if not args.yes:
            raise _Usage(
                f"drop would delete {target} of {args.database}: {held}. Nothing was deleted; it cannot "
                "be undone, so pass --yes to delete it"
            )
        # one library call, its transaction and its commit: a Ctrl-C handled once it returned
        # would report "nothing was written" after the drop, so the signals wait for it
        with _interruptible() as signals:
            signals.commit_begins()
            if args.table is not None:
                db.drop_table(args.table)
            else:
                db.drop_aggregate(args.aggregate)
    if args.json:
        _print_json(document)
    else:
        print(f"dropped {target} from {args.database}: {held}")
    signals.note("the drop is done")
    return EXIT_OK


def _droppable(db: _db.Database, name: str) -> Aggregate:
    """The aggregate ``name``, refused (exit 1) when a table maintains it: it goes with the table."""
    if name not in db.aggregates() and name in db.tables():
        raise _NotFound(
            f"no aggregate {name!r} in {db.path}, but a table of that name: to delete the table, its "
            f"documents and its aggregates, use --table {shlex.quote(name)}"
        )
    aggregate = _aggregate(db, name)
    owner = aggregate._owner
    if owner is not None:
        raise _Failure(
            f"aggregate {name!r} is maintained by table {owner!r} and cannot be dropped on its own (the "
            f"table would no longer match it): drop the table with --table {shlex.quote(owner)}, or in "
            f"Python drop it with db.table({owner!r}).drop_aggregate({name!r}) (the documents stay) or "
            "detach it first"
        )
    return aggregate


def _aggregate_contents(tx: Transaction, aggregate: Aggregate) -> dict[str, int]:
    namespaces = items = 0
    for _, totals in aggregate.namespaces(tx):
        namespaces += 1
        items += totals.count
    return {"items": items, "namespaces": namespaces}


def _table_contents(db: _db.Database, table: Table) -> dict[str, Any]:
    names = table.aggregates()
    with db.read() as tx:
        defined = {aggregate.name: aggregate for aggregate in db.aggregates_in(tx)}
        aggregates = [
            {"name": name, **_aggregate_contents(tx, defined[name])} for name in names if name in defined
        ]
        documents = table.count(tx)
    return {"dropped": "table", "name": table.name, "documents": documents, "aggregates": aggregates}


# ---------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    memory = _parse_size(args.memory)
    if args.examples < 0:
        raise _Usage("--examples must be 0 or more")
    directory = Path(args.database)
    if args.repair:
        if not (directory / "data.mdb").exists():
            raise _NotFound(f"no tallytree database at {args.database}")
        db = _db.open(directory)
    else:
        db = _open_existing(args.database)
    progress = _Progress(sys.stderr.isatty() and not args.quiet, sys.stderr)
    with _interruptible() as signals, db:
        aggregate = _aggregate(db, args.aggregate)
        reader = _Reader(args, aggregate.fields, progress)
        # the repairs found, held in O(1) memory (beyond a block, in a temporary file) until applied
        repairs = _bulk.Spool(temp_dir=args.temp_dir) if args.repair else None
        try:
            if tuple(reader.sums) != aggregate.fields:
                raise _Failure(
                    f"aggregate {args.aggregate!r} sums {list(aggregate.fields)}, but --sum names "
                    f"{list(reader.sums)}"
                )
            transaction = db.write() if args.repair else db.read()
            with transaction as tx:
                drift = _Drift(aggregate, args.examples, repairs)
                source = _bulk.sorted_items(
                    aggregate,
                    reader.rows(),
                    on_duplicate=args.on_duplicate,
                    memory=memory,
                    on_invalid=reader.invalid if args.on_error == "skip" else None,
                    label=reader.label,
                    temp_dir=args.temp_dir,
                )
                try:
                    drift.compare(source, _stored_items(tx, aggregate))
                except CorruptDatabaseError:  # the stored items', not the source's: exit 3 (see main)
                    raise
                except Error as exc:
                    raise _Failure(f"{reader.source.name}: {exc}") from exc
                finally:  # now, not when collected (an exception keeps it alive): it removes its sort runs
                    if isinstance(source, Generator):
                        source.close()
                repaired = 0
                mismatch = _key_mismatch(args, drift) if drift.total else None
                if isinstance(tx, WriteTransaction):
                    if drift.total:
                        _refuse_empty_repair(args, reader, drift)
                        if mismatch is not None and not args.force:
                            raise _Failure(
                                f"{mismatch['message']}; --repair would rewrite every key, so nothing was "
                                f"written: verify again with {mismatch['hint']}, or pass --force to "
                                "rewrite the keys"
                            )
                        repaired = drift.repair(tx)
                    signals.commit_begins()  # the last step before the commit (see _Signals)
        finally:
            progress.close()
            reader.close()
            if repairs is not None:
                repairs.close()
    document = {
        "aggregate": args.aggregate,
        "source": reader.source.name,
        "source_items": drift.source_items,
        "stored_items": drift.stored_items,
        "missing": {"count": drift.counts["missing"], "examples": drift.examples["missing"]},
        "extra": {"count": drift.counts["extra"], "examples": drift.examples["extra"]},
        "different": {"count": drift.counts["different"], "examples": drift.examples["different"]},
        "drift": drift.total,
        "repaired": repaired,
        "key_types": mismatch,
        "skipped": reader.skipped_report(),
        "signal_during_commit": signals.received,
    }
    if args.json:
        _print_json(document)
    else:
        print(
            f"verify {args.aggregate} against {reader.source.name}: {drift.source_items:,} source items, "
            f"{drift.stored_items:,} stored"
        )
        meaning = {
            "missing": "in the source, not in the aggregate",
            "extra": "in the aggregate, not in the source",
            "different": "values differ",
        }
        for kind, text in meaning.items():
            print(f"  {kind}: {drift.counts[kind]:,} ({text})")
            for example in drift.examples[kind]:
                print(f"    {_example_line(example)}")
        if reader.skipped:
            print(f"  skipped {reader.skipped:,} malformed record(s) of the source")
        if not drift.total:
            print("ok: the aggregate matches the source")
        elif repaired:
            print(f"repaired: {repaired:,} item(s) written or removed; the aggregate now matches the source")
        elif mismatch is not None:
            print(
                f"drift: {drift.total:,} item(s); {mismatch['message']}: verify again with {mismatch['hint']}"
            )
        else:
            print(f"drift: {drift.total:,} item(s); run again with --repair to fix it")
    if repaired:
        signals.note("the repair is in place")
    return EXIT_CHECK_FAILED if drift.total and not repaired else EXIT_OK


def _key_class(value: Any) -> Any:
    """The type class of a key for comparing two sets of keys: numbers (int and float, which
    compare with each other) are one class; a tuple's class is its elements' classes. O(len)."""
    if isinstance(value, tuple):
        return tuple(_key_class(element) for element in value)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes):
        return "bytes"
    return "null" if value is None else type(value).__name__


def _class_name(classes: Any) -> str:
    if isinstance(classes, tuple):
        return "(" + ", ".join(_class_name(element) for element in classes) + ")"
    return str(classes)


_KEY_TYPE_OF = {"number": None, "datetime": "datetime", "text": "str"}


def _key_type_hint(stored: Any, source: Any, sample: Any, key: list[str]) -> str | None:
    """The --key-type option that reads the source's keys as the stored ones (``sample``, a stored
    key, tells int from float), or None when no option does (a different shape, bytes, ...)."""
    if isinstance(stored, tuple):
        if not isinstance(source, tuple) or len(source) != len(stored) or len(key) != len(stored):
            return None
        options = []
        for index, (one, other) in enumerate(zip(stored, source, strict=True)):
            if one != other:
                hint = _key_type_hint(one, other, sample[index], [key[index]])
                if hint is None:
                    return None
                options.append(hint.replace("--key-type ", f"--key-type {key[index]}=", 1))
        return " ".join(options) or None
    if isinstance(source, tuple) or stored not in _KEY_TYPE_OF:
        return None
    kind = _KEY_TYPE_OF[stored] or ("int" if type(sample) is int else "float")
    return f"--key-type {kind}"


def _key_mismatch(args: argparse.Namespace, drift: _Drift) -> dict[str, Any] | None:
    """Whether the stored keys and the source's are of different types, as when a build read the
    key with ``--key-type datetime`` and the verify without it: then every item is missing and
    extra, and --repair would rewrite every key. Compares the type classes of the first and the last
    key of each side (in key order, which groups keys by type, so the two span the types present).
    None when they agree; else ``{"stored": [...], "source": [...], "message": ..., "hint": ...}``."""
    stored, source = drift.stored_ends, drift.source_ends
    if not stored or not source:
        return None
    stored_classes = list(dict.fromkeys(_key_class(key) for key in stored))
    source_classes = list(dict.fromkeys(_key_class(key) for key in source))
    if set(stored_classes) == set(source_classes):
        return None
    hint = None
    if len(stored_classes) == 1 and len(source_classes) == 1:
        hint = _key_type_hint(stored_classes[0], source_classes[0], stored[0], _split_fields([args.key]))
    stored_names = " and ".join(map(_class_name, stored_classes))
    source_names = " and ".join(map(_class_name, source_classes))
    return {
        "stored": [_class_name(one) for one in stored_classes],
        "source": [_class_name(one) for one in source_classes],
        "message": (
            f"the stored keys are of type {stored_names} and the source's of type {source_names}: the "
            "source is probably read with another --key-type than the build that stored them"
        ),
        "hint": hint or "the --key and --key-type options of the build",
    }


def _refuse_empty_repair(args: argparse.Namespace, reader: _Reader, drift: _Drift) -> None:
    """``--repair`` from a source that gave no item would delete every stored item: refused (exit 1,
    nothing written) when every item-giving record was malformed, and unless ``--allow-empty`` when
    the source is empty, as ``build`` refuses to replace with nothing."""
    if drift.source_items or not drift.stored_items:
        return
    name = reader.source.name
    if reader.skipped:
        first = reader.samples[0]
        raise _Failure(
            f"{name}: no record gave an item: {reader.skipped:,} malformed record(s) skipped (the first: "
            f"{first['where']}: {first['error']}); --repair would delete all {drift.stored_items:,} stored "
            "items, so nothing was written. Fix the source or the options that read it"
        )
    if not args.allow_empty:
        raise _Failure(
            f"{name} gave no items, so --repair would delete all {drift.stored_items:,} items of aggregate "
            f"{args.aggregate!r}; nothing was written. Pass --allow-empty to empty it, or check the source"
        )


def _example_line(example: dict[str, Any]) -> str:
    where = f"namespace {_show(example['namespace'])} " if example["namespace"] is not None else ""
    text = f"{where}key {_show(example['key'])} id {_show(example['id'])}"
    if "stored" in example:
        text += f": stored {example['stored']}, source {example['source']}"
    return text


def _stored_items(tx: Transaction, aggregate: Aggregate) -> Iterator[tuple[bytes, bytes, tuple[Any, ...]]]:
    """``(encoded namespace, entry, values)`` of every stored item, in tree order."""
    prefix = aggregate._prefix
    stop = (int.from_bytes(prefix, "big") + 1).to_bytes(4, "big")
    roots = list(tx.kv.scan(ROOTS, prefix, stop))
    for tree_key, value in roots:
        root = decode_root(value)
        tree = Tree(tx, len(aggregate.fields), aggregate.node_size, root)
        namespace = tree_key[len(prefix) :]
        for entry, values in tree.iterate(0, tree.count):
            yield namespace, entry, values


def _ends(
    items: Iterator[tuple[bytes, bytes, tuple[Any, ...]]], ends: list[Any]
) -> Iterator[tuple[bytes, bytes, tuple[Any, ...]]]:
    """``items``, unchanged; once they are exhausted, ``ends`` holds the keys of the first and the
    last one (decoded; one key for one item, none for none)."""
    first = last = None
    for item in items:
        if first is None:
            first = item
        last = item
        yield item
    for one in (first, last) if first is not last else (first,):
        if one is not None:
            ends.append(decode_key(one[1])[0])


_REPAIR_BATCH = 32_768  # items given to insert_many at once by verify --repair


class _Drift:
    """Merge-compares two sorted streams of items, one pass over each; keeps counts, the first
    ``examples`` items of each kind of drift and, for ``--repair``, the writes to make, in
    ``repairs`` (a :class:`~tallytree._bulk.Spool`, which holds a block in memory and writes the
    rest to a temporary file). Nothing else is kept per item: without ``--repair`` a verify holds the
    source's sort buffer, the examples, and the nodes of the stored trees it is reading, whatever the
    drift. O(n + m)."""

    def __init__(self, aggregate: Aggregate, examples: int, repairs: _bulk.Spool | None = None) -> None:
        self.aggregate = aggregate
        self.limit = examples
        self.counts = {"missing": 0, "extra": 0, "different": 0}
        self.examples: dict[str, list[dict[str, Any]]] = {"missing": [], "extra": [], "different": []}
        self.source_items = 0
        self.stored_items = 0
        self.source_ends: list[Any] = []  # the first and the last key of each side (see _key_mismatch)
        self.stored_ends: list[Any] = []
        self.repairs = repairs  # (namespace, entry, values) to upsert, (namespace, entry, None) to delete

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def compare(
        self,
        source: Iterator[tuple[bytes, bytes, tuple[Any, ...]]],
        stored: Iterator[tuple[bytes, bytes, tuple[Any, ...]]],
    ) -> None:
        source = _ends(source, self.source_ends)
        stored = _ends(stored, self.stored_ends)
        repair = self.repairs.append if self.repairs is not None else None
        wanted = next(source, None)
        have = next(stored, None)
        while wanted is not None or have is not None:
            if have is None or (wanted is not None and (wanted[0], wanted[1]) < (have[0], have[1])):
                assert wanted is not None
                self.source_items += 1
                self._note("missing", wanted, None)
                if repair is not None:
                    repair(wanted)
                wanted = next(source, None)
            elif wanted is None or (have[0], have[1]) < (wanted[0], wanted[1]):
                self.stored_items += 1
                self._note("extra", have, None)
                if repair is not None:
                    repair((have[0], have[1], None))
                have = next(stored, None)
            else:
                self.source_items += 1
                self.stored_items += 1
                if not same_values(have[2], wanted[2]):
                    self._note("different", wanted, have[2])
                    if repair is not None:
                        repair(wanted)
                wanted = next(source, None)
                have = next(stored, None)

    def _note(
        self, kind: str, item: tuple[bytes, bytes, tuple[Any, ...]], stored: tuple[Any, ...] | None
    ) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) >= self.limit:
            return
        namespace = decode_key(item[0])[0]
        key, offset = decode_key(item[1])
        item_id = decode_key(item[1], offset)[0]
        fields = self.aggregate.fields
        example: dict[str, Any] = {"namespace": namespace, "key": key, "id": item_id}
        if kind == "different":
            assert stored is not None
            example["stored"] = dict(zip(fields, stored, strict=True))
            example["source"] = dict(zip(fields, item[2], strict=True))
        elif fields:
            example["values"] = dict(zip(fields, item[2], strict=True))
        self.examples[kind].append(example)

    def repair(self, tx: WriteTransaction) -> int:
        """Make the writes found by :meth:`compare`, namespace by namespace in key order: the extra
        items removed and the missing and different ones upserted, in batches (``delete_many``,
        ``insert_many``). Returns the number of items written or removed. O(d log n) for d items
        of drift, in O(batch) memory."""
        assert self.repairs is not None
        changed = 0
        for encoded, writes in groupby(self.repairs, itemgetter(0)):
            namespace = decode_key(encoded)[0]
            upserts: list[tuple[Any, Any, tuple[Any, ...]]] = []
            extras: list[tuple[Any, Any]] = []
            for _, entry, values in writes:
                key, offset = decode_key(entry)
                item_id = decode_key(entry, offset)[0]
                batch: list[Any] = extras if values is None else upserts
                batch.append((key, item_id) if values is None else (key, item_id, values))
                if len(batch) >= _REPAIR_BATCH:
                    changed += self._write(tx, namespace, extras, upserts)
                    extras, upserts = [], []
            changed += self._write(tx, namespace, extras, upserts)
        return changed

    def _write(
        self,
        tx: WriteTransaction,
        namespace: Any,
        extras: list[tuple[Any, Any]],
        upserts: list[tuple[Any, Any, tuple[Any, ...]]],
    ) -> int:
        """One batch of :meth:`repair`: the extras removed, then the upserts. Returns how many."""
        aggregate = self.aggregate
        changed = aggregate.delete_many(tx, extras, namespace=namespace, missing="skip") if extras else 0
        if upserts:
            changed += aggregate.insert_many(tx, upserts, namespace=namespace, on_duplicate="update")
        return changed


# ---------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    if args.users < 1 or args.events < 1:
        raise _Usage("--users and --events must be at least 1")
    if args.directory:
        report = run_demo(
            Path(args.directory), users=args.users, events=args.events, seed=args.seed, quiet=args.json
        )
    else:  # a database of its own, removed at the end (DIR keeps one)
        with tempfile.TemporaryDirectory(prefix="tallytree-demo-") as scratch:
            directory = Path(scratch) / "demo.tt"
            report = run_demo(
                directory, users=args.users, events=args.events, seed=args.seed, quiet=args.json
            )
    if args.json:
        _print_json(report)
    return EXIT_OK if report["check_ok"] else EXIT_CHECK_FAILED
