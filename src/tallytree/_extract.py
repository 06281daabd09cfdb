"""Extractors: how a document becomes an item of an aggregate, and the low-level item writes.

Design
======
A :class:`Definition` says how to derive one aggregate's item from a document::

    document {"org": 7, "status": "open", "created_at": t, "cost": 0.25}  (id "load_1")
        namespace= "org"                     -> 7
        key=       ("status", "created_at")  -> ("open", t)
        values=    ("cost",)                 -> (0.25,)
        where=     {"void": False}           -> matched (a non-matching document has no item)
    item: tree (aggregate id + encode(7)), entry encode(("open", t)) + encode("load_1"), values (0.25,)

Each of ``key``, ``namespace`` and each value is an *extractor*: a field name, a tuple of field names
(a composite key), or a function of the document. The document id is the item id, so a document has at
most one item per aggregate and the pair (old document, new document) determines exactly which item to
remove and which to add: that is what keeps a table's aggregates in sync by construction, and what the
change hooks and ``verify`` reuse.

*Coordinates* ``(tree key, entry, values)`` are computed and validated for every aggregate before any
tree is touched, so an extractor that fails raises :class:`~tallytree.errors.ExtractionError` and
nothing is written. Field-based definitions are described by plain data (stored with the table);
function-based ones by the function's qualified name and a fingerprint of its code (for a
``functools.partial``, the wrapped function's and its arguments; for a callable object, its class's
``__call__`` and its attributes; see :func:`_fingerprint`), the same in every process, used to detect
a different function passed on reopening.

The writes here go below :class:`~tallytree.Aggregate`'s public methods (straight to the trees), because
aggregates owned by a table refuse public writes.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable, Mapping
from functools import partial
from itertools import compress
from operator import add, itemgetter
from types import FunctionType, MethodType
from typing import Any, Literal

import msgpack

from ._aggregate import Aggregate
from ._btree import same_values
from ._bulk import Columns, encode_keys, valid_column
from ._docs import Refused, stand_in
from ._keys import encode_key
from ._tree import Tree
from ._txn import Transaction, WriteTransaction
from .errors import (
    ArgumentTypeError,
    DuplicateItemError,
    Error,
    ExtractionError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    ItemNotFoundError,
    SchemaMismatchError,
    UnsupportedKeyTypeError,
)

__all__ = ["Coord", "Definition", "Extractor", "check_strict", "describe_definition", "move", "move_exactly"]

Extractor = str | tuple[str, ...] | Callable[[Any], Any]
"""A field name, a tuple of field names (a composite key), or a function of the document."""

Where = str | Mapping[str, Any] | Callable[[Any], Any] | None
"""A field name (the document matches when the field is truthy), a mapping of field values that must
all be equal, or a predicate; None matches every document."""

Coord = tuple[bytes, bytes, tuple[Any, ...]]
"""An item's place: (tree key, entry, values)."""

OnMissing = Literal["error", "skip"]

_TREE_KEY_CACHE = 65536


class _Missing(Exception):
    """Internal: a field is absent (or a value is None) and on_missing="skip" applies."""


def describe(spec: Any, role: str) -> Any:
    """A plain-data description of an extractor, stored with a table and compared on reattach."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return ["field", spec]
    if isinstance(spec, tuple) and spec and all(isinstance(field, str) for field in spec):
        return ["fields", list(spec)]
    if callable(spec):
        return ["function", _qualname(spec), _fingerprint(spec), _PYTHON]
    raise ArgumentTypeError(
        f"{role}= takes a field name, a non-empty tuple of field names or a function of the document, "
        f"not {spec!r}"
    )


def describe_where(where: Where) -> Any:
    """Like :func:`describe`, for ``where=``."""
    if where is None:
        return None
    if isinstance(where, str):
        return ["field", where]
    if isinstance(where, Mapping):
        if not all(isinstance(field, str) for field in where):
            raise ArgumentTypeError(f"where= as a mapping takes field names as keys, not {where!r}")
        return ["equals", dict(where)]
    if callable(where):
        return ["function", _qualname(where), _fingerprint(where), _PYTHON]
    raise ArgumentTypeError(
        f"where= takes a field name, a mapping of field values or a predicate function, not {where!r}"
    )


def describe_definition(
    name: str,
    key: Extractor,
    namespace: Extractor | None,
    values: Mapping[str, Extractor],
    where: Where,
    on_missing: OnMissing,
) -> dict[str, Any]:
    """The stored form of a definition (tuples as lists), checking every part: ArgumentTypeError for
    an extractor of the wrong kind or a ``where=`` value that cannot be stored, InvalidArgumentError
    for ``on_missing``. Runs before anything is created (see ``ChangeHandler.aggregate``). O(fields).

    >>> describe_definition("a", "ts", None, {"cost": "cost"}, None, "skip")["values"]
    [['cost', ['field', 'cost']]]
    >>> describe_definition("a", "ts", None, {}, None, "sometimes")
    Traceback (most recent call last):
    tallytree.errors.InvalidArgumentError: a: on_missing must be 'error' or 'skip', not 'sometimes'
    """
    if on_missing not in ("error", "skip"):
        raise InvalidArgumentError(f"{name}: on_missing must be 'error' or 'skip', not {on_missing!r}")
    description = {
        "key": describe(key, "key"),
        "namespace": describe(namespace, "namespace"),
        "values": [[field, describe(spec, f"values[{field!r}]")] for field, spec in values.items()],
        "where": describe_where(where),
        "on_missing": on_missing,
    }
    try:  # in its stored form (tuples as lists), so that a reopened definition compares equal
        packed = msgpack.packb(description, datetime=True, default=stand_in)  # numpy values too
        stored: dict[str, Any] = msgpack.unpackb(packed, timestamp=3)
    except (TypeError, ValueError, OverflowError, Refused) as exc:
        raise ArgumentTypeError(
            f"{name}: where= holds a value that cannot be stored ({exc}); compare with None, bools, "
            "numbers, str, bytes, datetimes, or lists and dicts of these"
        ) from exc
    return stored


def same_description(stored: Any, given: Any) -> bool:
    """Whether two descriptions denote the same definition.

    Two functions are the same when their names match, the module and enclosing functions left out
    (a script's ``__main__.shop_of`` is the ``stats.shop_of`` it defines when another program imports
    it, and a lambda may move into another function), and so do their fingerprints. Fingerprints
    are compared only when both were made by the same Python version, as bytecode differs between
    versions. O(size of the descriptions).

    >>> script = ["function", "__main__.shop_of", "ab12", "3.11"]
    >>> imported = ["function", "stats.shop_of", "ab12", "3.11"]
    >>> changed = ["function", "stats.shop_of", "cd34", "3.11"]
    >>> same_description(script, imported), same_description(imported, changed)
    (True, False)
    """
    if isinstance(stored, list) and isinstance(given, list):
        if stored and stored[0] == "function" and given and given[0] == "function":
            if _short_name(stored[1]) != _short_name(given[1]):
                return False
            return bool(stored[3] != given[3] or stored[2] == given[2])
        return len(stored) == len(given) and all(
            same_description(a, b) for a, b in zip(stored, given, strict=True)
        )
    if isinstance(stored, dict) and isinstance(given, dict):
        return stored.keys() == given.keys() and all(same_description(stored[k], given[k]) for k in stored)
    return bool(stored == given and type(stored) is type(given))


def _short_name(name: Any) -> Any:
    """A stored function name without its module and enclosing functions: ``mod.f.<locals>.g`` ->
    ``g``; a partial keeps its form, ``functools.partial(mod.f)`` -> ``partial(f)``."""
    if not isinstance(name, str):
        return name
    if name.endswith(")") and "(" in name:
        outer, inner = name[:-1].split("(", 1)
        return f"{_short_name(outer)}({_short_name(inner)})"
    return name.rsplit(".", 1)[-1]


def has_function(description: Any) -> bool:
    """Whether a description includes a function (which must be passed again after reopening)."""
    if isinstance(description, list):
        if description and description[0] == "function":
            return True
        return any(has_function(part) for part in description)
    if isinstance(description, dict):
        return any(has_function(part) for part in description.values())
    return False


_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _qualname(function: Callable[..., Any]) -> str:
    """A callable's dotted name for descriptions and messages; a partial names what it wraps.

    >>> import functools, operator
    >>> _qualname(operator.add), _qualname(functools.partial(operator.add, 1))
    ('_operator.add', 'functools.partial(_operator.add)')
    """
    if isinstance(function, partial):
        kind = type(function)
        return f"{kind.__module__}.{kind.__qualname__}({_qualname(function.func)})"
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
"""A memory address in a repr (``<function k at 0x7f...>``): different in every process."""

_SIMPLE = (str, int, float, bytes, tuple, frozenset)
"""Values described by their repr (None too); any other value is described by its type's name."""

_HASH_ORDERED = (bool, int, float, complex)
"""Types whose hashes, so a frozenset's iteration order, are the same in every process (str and bytes
hashes are salted per process, PYTHONHASHSEED; None's is its address before Python 3.12)."""


def _stable_repr(value: Any) -> str:
    """``repr(value)`` with memory addresses removed and frozensets whose order depends on the
    process's hash salt written sorted, so that it is the same in every process. Equal to
    ``repr(value)`` for every other value, so the fingerprints of plain functions stored before these
    rules keep their value.

    >>> _stable_repr(frozenset({"b", "a"})), _stable_repr((1, "x")), _stable_repr(frozenset({8, 1}))
    ("frozenset({'a', 'b'})", "(1, 'x')", 'frozenset({8, 1})')
    """
    kind = type(value)
    if kind is frozenset and not all(type(each) in _HASH_ORDERED for each in value):
        return "frozenset({" + ", ".join(sorted(_stable_repr(each) for each in value)) + "})"
    if kind is tuple:
        parts = [_stable_repr(each) for each in value]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    return _ADDRESS.sub("", repr(value))


def _value_repr(value: Any) -> str:
    """How a value a callable holds (a closure cell, a partial's argument, an attribute) enters its
    fingerprint: simple values by their stable repr, others by their type's name."""
    if value is None or isinstance(value, _SIMPLE):
        return _stable_repr(value)
    return type(value).__qualname__


def _attributes(instance: Any) -> list[tuple[str, str]]:
    """An instance's attributes, ``__dict__`` and ``__slots__``, sorted, values by :func:`_value_repr`."""
    found = dict(getattr(instance, "__dict__", None) or {})
    missing = object()
    for kind in type(instance).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            name = f"_{kind.__name__.lstrip('_')}{slot}" if slot.startswith("__") else slot  # mangled
            value = getattr(instance, name, missing)
            if value is not missing:
                found.setdefault(name, value)
    return sorted((str(name), _value_repr(value)) for name, value in found.items())


def _fingerprint(function: Callable[..., Any]) -> str:
    """A hash of what a callable computes with, the same in every process (so that a definition
    passed again after reopening is recognized), different when the code or its settings differ.

    - a function: its code, constants, names, defaults (keyword-only ones too) and simple closure
      values (databases store this value: it must not change, except where it used to differ
      between processes, a repr with an address or a frozenset of strings);
    - a bound method: its function's fingerprint and the type of the object it is bound to (the
      class itself for a classmethod);
    - a ``functools.partial``: the fingerprint of the function it wraps, and its arguments;
    - a callable object: its class, the fingerprint of the class's ``__call__`` and the instance's
      attributes (``__dict__`` and ``__slots__``);
    - anything else (a builtin, a class, ``operator.itemgetter``...): its repr.

    Values held (closure cells, partial arguments, attributes) count by their repr when they are
    None, str, int, float, bytes, tuples or frozensets, otherwise by their type's name; memory
    addresses are left out of every repr. O(size of the code).

    >>> import functools, operator
    >>> _fingerprint(functools.partial(operator.add, 1)) == _fingerprint(functools.partial(operator.add, 1))
    True
    >>> _fingerprint(functools.partial(operator.add, 1)) == _fingerprint(functools.partial(operator.add, 2))
    False
    """
    digest = hashlib.sha256()
    if isinstance(function, MethodType):
        bound = function.__self__
        owner = bound if isinstance(bound, type) else type(bound)
        parts: tuple[Any, ...] = ("method", _fingerprint(function.__func__), _type_name(owner))
        digest.update(repr(parts).encode())
        return digest.hexdigest()[:16]
    if isinstance(function, partial):
        keywords = tuple(sorted((str(name), _value_repr(value)) for name, value in function.keywords.items()))
        arguments = tuple(_value_repr(argument) for argument in function.args)
        parts = ("partial", _type_name(type(function)), _fingerprint(function.func), arguments, keywords)
        digest.update(repr(parts).encode())
        return digest.hexdigest()[:16]
    code = getattr(function, "__code__", None)
    if code is None:
        call = type(function).__call__
        if isinstance(call, FunctionType) and not isinstance(function, type):  # a callable object
            kind = type(function)
            parts = ("object", _type_name(kind), _fingerprint(call), tuple(_attributes(function)))
            digest.update(repr(parts).encode())
        else:  # a builtin, a class, an itemgetter: its repr, which names it
            digest.update(_ADDRESS.sub("", repr(function)).encode())
        return digest.hexdigest()[:16]

    def feed(code: Any) -> None:
        digest.update(code.co_code)
        digest.update(repr(code.co_names).encode())
        for constant in code.co_consts:
            if hasattr(constant, "co_code"):
                feed(constant)
            else:
                digest.update(_stable_repr(constant).encode())

    feed(code)
    digest.update(_stable_repr(getattr(function, "__defaults__", None)).encode())
    if keyword_defaults := getattr(function, "__kwdefaults__", None):  # added after fingerprints were
        # stored: only functions that have keyword-only defaults hash them, so no stored value changes
        digest.update(repr(sorted((str(k), _value_repr(v)) for k, v in keyword_defaults.items())).encode())
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        digest.update(_value_repr(value).encode())
    return digest.hexdigest()[:16]


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _getter(spec: Any) -> Callable[[Any], Any]:
    if isinstance(spec, str):
        return itemgetter(spec)
    if isinstance(spec, tuple):
        if len(spec) == 1:
            field = spec[0]
            return lambda doc: (doc[field],)
        return itemgetter(*spec)
    return spec  # type: ignore[no-any-return]  # checked callable by describe()


def _where_predicate(where: Where) -> Callable[[Any], Any] | None:
    if where is None:
        return None
    if isinstance(where, str):
        field = where
        return lambda doc: doc.get(field)
    if isinstance(where, Mapping):
        wanted = [(field, value, type(value) is bool) for field, value in where.items()]
        missing = object()

        def matches(doc: Any) -> bool:
            for field, value, boolean in wanted:
                have = doc.get(field, missing)
                # equal, and a bool only to a bool, as keys and values tell them apart: False is not 0
                if have != value or (type(have) is bool) is not boolean:
                    return False
            return True

        return matches
    return where


def _to_tuple(value: Any) -> Any:
    """Lists (what msgpack gives back for tuples) as tuples, recursively, so they can be keys."""
    if isinstance(value, list | tuple):
        return tuple(_to_tuple(each) for each in value)
    return value


def _spec_repr(spec: Any) -> str:
    """A field spec as written (``'org'``, ``('day', 'hour')``); a function by its name."""
    if callable(spec):
        return getattr(spec, "__qualname__", None) or repr(spec)
    return repr(spec)


class Definition:
    """How the documents of a table (or of an external source) map to the items of one aggregate."""

    __slots__ = (
        "_column_getters",
        "_fields_named",
        "_key",
        "_namespace",
        "_namespace_bytes",
        "_none_namespace",
        "_none_namespace_key",
        "_skip",
        "_tree_keys",
        "_value_getter",
        "_value_specs",
        "_where",
        "aggregate",
        "description",
        "key_spec",
        "name",
        "namespace_spec",
        "on_missing",
        "where_spec",
    )

    def __init__(
        self,
        aggregate: Aggregate,
        *,
        key: Extractor,
        namespace: Extractor | None,
        values: Mapping[str, Extractor],
        where: Where,
        on_missing: OnMissing,
    ) -> None:
        self.description = describe_definition(aggregate.name, key, namespace, values, where, on_missing)
        self.aggregate = aggregate
        self.name = aggregate.name
        self.key_spec = key
        self.namespace_spec = namespace
        self.where_spec = where
        self.on_missing = on_missing
        self._value_specs = dict(values)
        if tuple(values) != aggregate.fields:
            raise SchemaMismatchError(
                f"{self.name}: value fields {list(values)} != the aggregate's {list(aggregate.fields)}"
            )
        self._key = _getter(key)
        self._namespace = _getter(namespace) if namespace is not None else None
        getters = [_getter(spec) for spec in values.values()]
        plain = [spec for spec in values.values() if isinstance(spec, str)]
        if len(plain) == len(getters) and len(plain) > 1:
            self._value_getter: Callable[[Any], Any] = itemgetter(*plain)  # returns a tuple
        elif len(getters) == 1:
            only = getters[0]
            self._value_getter = lambda doc: (only(doc),)
        elif not getters:
            self._value_getter = lambda doc: ()
        else:
            self._value_getter = lambda doc: tuple([getter(doc) for getter in getters])
        # a mapping compares with the stored form of documents (lists for tuples, UTC datetimes)
        self._where = _where_predicate(self.description["where"][1] if isinstance(where, Mapping) else where)
        self._skip = on_missing == "skip"
        self._tree_keys: dict[Any, bytes] = {}
        self._none_namespace_key = aggregate._tree_key(None)
        self._none_namespace = encode_key(None, what="namespace")
        self._namespace_bytes: dict[Any, bytes] = {}
        self._column_getters = getters
        self._fields_named = tuple(values)

    def __repr__(self) -> str:
        """The extractors as given: field names, tuples of them, or functions by name.

        >>> import tallytree
        >>> db = tallytree.open_memory()
        >>> runs = db.table("runs")
        >>> _ = runs.aggregate("tokens_by_day", namespace="org", key=("day", "model"), values=("tokens",))
        >>> runs.definition("tokens_by_day")
        <Definition 'tokens_by_day' key=('day', 'model') namespace='org' values={'tokens': 'tokens'}>
        """
        parts = [
            f"key={_spec_repr(self.key_spec)}",
            f"namespace={_spec_repr(self.namespace_spec)}",
            "values={"
            + ", ".join(f"{field!r}: {_spec_repr(spec)}" for field, spec in self._value_specs.items())
            + "}",
        ]
        if self.where_spec is not None:
            parts.append(f"where={_spec_repr(self.where_spec)}")
        if self.on_missing != "error":
            parts.append(f"on_missing={self.on_missing!r}")
        return f"<Definition {self.name!r} {' '.join(parts)}>"

    @property
    def fields(self) -> tuple[str, ...]:
        """The aggregate's value fields."""
        return self._fields_named

    def tree_key(self, namespace: Any) -> bytes:
        """The tree key of a namespace (cached for str and int namespaces)."""
        if namespace is None:
            return self._none_namespace_key
        kind = type(namespace)
        if kind is str or kind is int:
            cached = self._tree_keys.get(namespace)
            if cached is not None:
                return cached
            tree_key = self.aggregate._tree_key(namespace)
            if len(self._tree_keys) >= _TREE_KEY_CACHE:
                self._tree_keys.clear()
            self._tree_keys[namespace] = tree_key
            return tree_key
        return self.aggregate._tree_key(namespace)

    def coordinates(self, doc: Any, doc_id: Any, id_bytes: bytes) -> Coord | None:
        """The item of ``doc`` (tree key, entry, values), or None when it has none (``where`` is false,
        or a field is missing with ``on_missing="skip"``). Raises ExtractionError."""
        try:
            where = self._where
            if where is not None and not where(doc):
                return None
            key = self._key(doc)
            namespace = self._namespace(doc) if self._namespace is not None else None
            values = self._value_getter(doc)
        except Exception:
            return self._slow(doc, doc_id, id_bytes)
        try:
            entry = encode_key(key) + id_bytes
            tree_key = self.tree_key(namespace)
            checked = self.aggregate._values(values)
        except Exception:
            return self._slow(doc, doc_id, id_bytes)
        return tree_key, entry, checked

    def columns(self, docs: list[Any], ids: list[bytes]) -> Columns | None:
        """The items of many documents at once, as ``(encoded namespaces, entries, value columns)``,
        or None when the batch needs :meth:`coordinates` document by document (a missing field, a
        value or key of a type the column encoders do not take, a failing extractor: that path names
        the document, or skips it with ``on_missing="skip"``).

        Each extractor runs once per document through ``map``, and keys, namespaces and values are
        encoded and checked a column at a time (the column encoders of ``_bulk``). Same items as
        :meth:`coordinates`. O(len(docs)).
        """
        try:
            if self._where is not None:
                matched = list(map(self._where, docs))
                if not all(matched):
                    docs = list(compress(docs, matched))
                    ids = list(compress(ids, matched))
            if not docs:
                return [], [], [[] for _ in self._fields_named]
            keys = encode_keys(list(map(self._key, docs)))
            if keys is None:
                return None
            namespaces = self._namespace_column(docs)
            if namespaces is None:
                return None
            cols = [list(map(getter, docs)) for getter in self._column_getters]
        except Exception:  # a missing field, a failing extractor, an invalid key: document by document
            return None
        if not all(map(valid_column, cols)):
            return None
        return namespaces, list(map(add, keys, ids)), cols

    def _namespace_column(self, docs: list[Any]) -> list[bytes] | None:
        if self._namespace is None:
            return [self._none_namespace] * len(docs)
        namespaces = list(map(self._namespace, docs))
        if not set(map(type, namespaces)) <= {str, int}:  # 1 == 1.0 == True would share a cache slot
            return None
        cache = self._namespace_bytes
        for namespace in dict.fromkeys(namespaces):
            if namespace not in cache:
                if len(cache) >= _TREE_KEY_CACHE:
                    cache.clear()
                cache[namespace] = encode_key(namespace, what="namespace")
        return list(map(cache.__getitem__, namespaces))

    def _slow(self, doc: Any, doc_id: Any, id_bytes: bytes) -> Coord | None:
        """Extraction again, one step at a time, to name what failed (or to skip the document)."""
        try:
            if self._where is not None:
                matched = self._step(doc, doc_id, "where", self._where, self.where_spec)
                if not matched:
                    return None
            key = _to_tuple(self._step(doc, doc_id, "key", self._key, self.key_spec))
            namespace = None
            if self._namespace is not None:
                namespace = _to_tuple(
                    self._step(doc, doc_id, "namespace", self._namespace, self.namespace_spec)
                )
            values = []
            for field, spec in self._value_specs.items():
                value = self._step(doc, doc_id, f"values[{field!r}]", _getter(spec), spec)
                if value is None:
                    self._missing(doc_id, f"values[{field!r}]", spec, "is None")
                values.append(value)
            entry = self._encode(doc_id, "key", self.key_spec, key) + id_bytes
            tree_key = self._encode_namespace(doc_id, namespace)
            try:
                checked = self.aggregate._values(tuple(values))
            except InvalidValueError as exc:
                raise self._error(doc_id, "values", self._value_specs, str(exc)) from exc
        except _Missing:
            return None
        return tree_key, entry, checked

    def _step(self, doc: Any, doc_id: Any, role: str, getter: Callable[[Any], Any], spec: Any) -> Any:
        try:
            return getter(doc)
        except KeyError as exc:
            field = exc.args[0] if exc.args else spec
            self._missing(doc_id, role, spec, f"has no field {field!r}")
        except Exception as exc:
            if not isinstance(doc, Mapping) and not callable(spec):
                raise self._error(doc_id, role, spec, f"is not a mapping but a {type(doc).__name__}") from exc
            raise self._error(doc_id, role, spec, f"raised {type(exc).__name__}: {exc}") from exc

    def _missing(self, doc_id: Any, role: str, spec: Any, what: str) -> None:
        if self._skip:
            raise _Missing
        raise self._error(doc_id, role, spec, f"{what} (pass on_missing='skip' to leave such documents out)")

    def _encode(self, doc_id: Any, role: str, spec: Any, key: Any) -> bytes:
        try:
            return encode_key(key)
        except (InvalidKeyError, UnsupportedKeyTypeError) as exc:
            raise self._error(doc_id, role, spec, f"gave an unusable key: {exc}") from exc

    def _encode_namespace(self, doc_id: Any, namespace: Any) -> bytes:
        try:
            return self.tree_key(namespace)
        except (InvalidKeyError, UnsupportedKeyTypeError) as exc:
            what = f"gave an unusable key: {exc}"
            raise self._error(doc_id, "namespace", self.namespace_spec, what) from exc

    def _error(self, doc_id: Any, role: str, spec: Any, what: str) -> ExtractionError:
        if isinstance(spec, str):
            source = f"field {spec!r}"
        elif isinstance(spec, tuple):
            source = f"fields {spec!r}"
        elif isinstance(spec, Mapping):
            source = f"fields {list(spec)!r}"
        else:
            source = f"function {_qualname(spec)}"
        field = spec if isinstance(spec, str) else role
        return ExtractionError(
            f"{self.name}: document {doc_id!r}: {role} ({source}) {what}; nothing was written",
            aggregate=self.name,
            document_id=doc_id,
            field=str(field),
        )


# ---------------------------------------------------------------- item writes below the public API


def _tree(tx: Transaction, aggregate: Aggregate, tree_key: bytes) -> Tree:
    aggregate._check(tx)  # a dropped aggregate (a handler may still hold it) raises TransactionError
    return Tree(tx, len(aggregate.fields), aggregate.node_size, tx.root(tree_key))


def _save(tx: WriteTransaction, tree_key: bytes, tree: Tree) -> None:
    changed, root = tree.take_root()
    if changed:
        tx.set_root(tree_key, root)


def move(tx: WriteTransaction, aggregate: Aggregate, old: Coord | None, new: Coord | None) -> bool:
    """Make the aggregate hold ``new`` instead of ``old`` (either may be None); return whether anything
    changed. Tolerant: an absent old item or a present new one is not an error, so the result is the
    same whatever the aggregate held. O(log n) per tree touched."""
    if old is not None and new is not None and old[0] == new[0]:
        tree_key = old[0]
        if old[1] == new[1] and same_values(old[2], new[2]):
            return False
        tree = _tree(tx, aggregate, tree_key)
        if old[1] == new[1]:
            if tree.update(new[1], new[2]) is None:
                tree.insert(new[1], new[2])
        else:
            tree.delete(old[1])
            if not tree.insert(new[1], new[2]):
                tree.update(new[1], new[2])
        _save(tx, tree_key, tree)
        return True
    changed = False
    if old is not None:
        tree = _tree(tx, aggregate, old[0])
        if tree.delete(old[1]) is not None:
            _save(tx, old[0], tree)
            changed = True
    if new is not None:
        tree = _tree(tx, aggregate, new[0])
        if not tree.insert(new[1], new[2]):
            tree.update(new[1], new[2])
        _save(tx, new[0], tree)
        changed = True
    return changed


def move_exactly(
    tx: WriteTransaction, aggregate: Aggregate, old: Coord | None, new: Coord | None, why: str
) -> Coord | None:
    """:func:`move` for an aggregate that must hold ``old`` and not ``new``'s place (a table's): else
    it has drifted from its source, and ItemNotFoundError or DuplicateItemError is raised, saying
    ``why`` (which document, which table) and how to repair, with the aggregate as it was. Returns
    ``old`` with the values the aggregate held (what undoes the move: ``move(tx, aggregate, new,
    held)``). O(log n) per tree touched."""
    if old is None:
        held = None
    elif new is not None and old[:2] == new[:2]:
        if same_values(old[2], new[2]):
            return old
        tree = _tree(tx, aggregate, old[0])
        values = tree.update(new[1], new[2])
        if values is None:  # absent: nothing was written
            raise _drifted(ItemNotFoundError, aggregate, why, "does not hold")
        _save(tx, old[0], tree)
        return (old[0], old[1], values)
    else:
        tree = _tree(tx, aggregate, old[0])
        values = tree.delete(old[1])
        if values is None:  # absent: nothing was written
            raise _drifted(ItemNotFoundError, aggregate, why, "does not hold")
        held = (old[0], old[1], values)
        if new is None or new[0] != old[0]:
            _save(tx, old[0], tree)
    if new is not None:
        if held is None or new[0] != held[0]:  # else the old item's tree, held for one save
            tree = _tree(tx, aggregate, new[0])
        if not tree.insert(new[1], new[2]):  # taken: nothing was inserted; put the old item back
            if held is not None:
                if held[0] == new[0]:
                    tree.insert(held[1], held[2])
                    _save(tx, new[0], tree)
                else:
                    move(tx, aggregate, None, held)
            raise _drifted(DuplicateItemError, aggregate, why, "already holds")
        _save(tx, new[0], tree)
    return held


def _drifted(error: type[Error], aggregate: Aggregate, why: str, holds: str) -> Error:
    return error(
        f"{why}: aggregate {aggregate.name!r} {holds} the item its definition gives for the document "
        "before this write, so it has drifted from the table (a key, namespace or where function that "
        "reads something besides the document, or a write that bypassed the table); nothing was "
        f"written. Rebuild it: table.aggregate({aggregate.name!r}, ..., rebuild=True), or "
        "tallytree.repair(tx, aggregate, table)"
    )


def check_strict(
    tx: Transaction, aggregate: Aggregate, old: Coord | None, new: Coord | None, doc_id: Any
) -> None:
    """Raise unless the aggregate holds ``old`` (when given), its values included, and ``new``'s place
    is free (when it is a different place): what a strict change handler requires before writing
    anything. A change whose old document is not the one the aggregate holds (a stale or repeated
    delivery of an update that changed values only) is refused like one whose item is missing."""
    if old is not None:
        held = _tree(tx, aggregate, old[0]).find(old[1])
        if held is None:
            raise ItemNotFoundError(
                f"{aggregate.name}: the item of document {doc_id!r} is not in the aggregate; use "
                "apply(..., idempotent=True) for replays, or repair() to fix drift"
            )
        if not same_values(held, old[2]):
            raise ItemNotFoundError(
                f"{aggregate.name}: the item of document {doc_id!r} holds values {held!r}, not the "
                f"{old[2]!r} of the change's old document: the change is stale or delivered twice; "
                "use apply(..., idempotent=True) for replays, or repair() to fix drift"
            )
    if (
        new is not None
        and (old is None or old[:2] != new[:2])
        and _tree(tx, aggregate, new[0]).find(new[1]) is not None
    ):
        raise DuplicateItemError(
            f"{aggregate.name}: the item of document {doc_id!r} is already in the aggregate; use "
            "apply(..., idempotent=True) for replays and backfills"
        )


def spec_from(description: Any) -> Any:
    """Inverse of :func:`describe` for field-based descriptions (a function description gives None)."""
    if description is None:
        return None
    kind = description[0]
    if kind == "field":
        return description[1]
    if kind == "fields":
        return tuple(description[1])
    if kind == "equals":
        return dict(description[1])
    return None


def definition_from(aggregate: Aggregate, description: Mapping[str, Any]) -> Definition:
    """Rebuild a field-based definition from its stored description."""
    values = {field: spec_from(spec) for field, spec in description["values"]}
    return Definition(
        aggregate,
        key=spec_from(description["key"]),
        namespace=spec_from(description["namespace"]),
        values=values,
        where=spec_from(description["where"]),
        on_missing=description["on_missing"],
    )
