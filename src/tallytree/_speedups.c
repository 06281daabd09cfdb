/* tallytree._speedups: optional C kernels for the hottest pure functions.

Design
======
Forty-three functions and one type, each a faster twin of Python code that stays the reference and
the fallback
(``_native`` loads this module; without a C compiler, or with TALLYTREE_PURE_PYTHON=1, tallytree runs
the Python code and gives the same answers):

* ``int_keys(values)``: ``[encode_key(v) for v in values]`` for exact ints in the int64 range
  (``_keys`` documents the format);
* ``datetime_keys(values)``: the same for exact ``datetime`` objects whose tzinfo is ``datetime.UTC``;
* ``one_key(value, body, limit)``: ``encode_key(value)`` (``encode_body`` when ``body``) of one value
  those two take, or a str, or a flat tuple of those, None and bools (a bound, a prefix, a single
  insert);
* ``item_entry(key, id, limit)``: an item's entry, ``encode_key(key) + encode_id(id)``, for a key
  ``one_key`` takes and an int64 or str id (``_keys.encode_entry``: every write of one item);
* ``plain_values(values, count)``: whether an item's values need no conversion (an exact tuple of
  finite floats and ints of the int64 or uint64 range: ``Aggregate._values``' fast path);
* ``put_ops(txn, dbs, ops, start)``: py-lmdb's ``put`` (or ``delete``) for each op of a commit
  (``_lmdb._apply_ops``' loop), called by position as that loop calls them;
* ``text_keys(values, limit)``: the same for exact ``str`` of at most ``limit`` UTF-8 bytes with no NUL
  (which would need escaping);
* ``sort_order(items)``: ``sorted(range(len(items)), key=items.__getitem__)`` for a list of bytes (a
  batch's entries, sorted before a merge): one C sort on each item's first 8 bytes as a number;
* ``decode_entry(entry, limit)``: ``_keys.decode_entry`` (an entry's key and id) when both are a None,
  bool, int64, float, str, bytes, datetime or a tuple of those; None for anything else, left to the
  Python decoder;
* ``bisect(node, key, right)``: ``bisect_right`` (or ``bisect_left``) of ``key`` in ``node.keys``. A
  committed node gets a *search image* on its second search, cached in ``node._blob``: one bytes
  object with the first 8 bytes of each key as a number, the keys back to back behind their offsets,
  and what a descent reads of the node (an internal node's cumulative counts, child ids and
  cumulative sums, a leaf's values as raw doubles or int64s). A search bisects the numbers (one
  contiguous array) and reads a key only on a tie; a descent reads a few contiguous lines of a cold
  node, instead of a tuple and a separate object per probe, count, id, sum and value (most nodes of a
  large tree are out of the CPU caches: each such object is a cache miss). A leaf's first search
  reads its keys directly (an image reads all of them, and most leaves of a large tree are searched
  once in a while); an internal node gets its image on its first search (few of them, on every
  path); a dirty node is always searched in its list, and has no image. A leaf read from the
  database mostly has its image from the start (``leaf_image`` below);
* ``NodeTable``: the store of the shared node cache (``_store.NodeCache``; ``_store.NodeDict`` is its
  Python twin): nodes by id in an open-addressing table whose slots also hold each node's image, so
  that a descent takes a cold child in about one cache line, where a dict costs its index, its entry,
  the stored key (an int object the lookup compares) and then the node object. A descent borrows
  the nodes it takes from it (the table is pinned meanwhile) and starts loading each child's image
  as soon as the table names it: a descent touches no node object (``select`` loads the one it
  returns). Eviction is a second-chance clock, so a tree's internal nodes stay while its leaves
  stream through a cache smaller than the tree;
* ``rank``, ``rank_range``, ``select`` and ``find``: the descents of ``_btree.NodeTree`` (a rank; two
  ranks sharing their path, then descending level by level in phases, see prefetch_child; the leaf
  and position of an entry by its index; the values of an entry by its bytes) in one call each, children taken from the shared node cache (a
  NodeTable, or a dict) when the caller allows it (read transactions) and through the transaction's
  ``node`` otherwise; they return how many cache hits they made, for the statistics. ``select`` (asked
  for the item) and ``find`` read the entry and its values from the leaf's image when it has one,
  rather than from the leaf's tuples, whose items are cold objects in a large tree;
* ``range_totals``: a range sum (``_btree.NodeTree.range_summary``) in one call: the same descents,
  with every row and leaf span added as it goes into fixed-point accumulators, read from the images
  (node-local int128 sums, raw leaf columns) or, for nodes without one, from their attributes; None
  for a sum beyond its accumulators (left to the Python code). Given an extra summary (a tree's
  pending entries) it adds it too, and asked for values (``NodeTree.range_values``) it returns each
  sum as ``_node.sum_value`` would, rounded once from the accumulator (round half to even);
* ``float_sum(values)``: the exact sum of finite floats as an int in units of ``2**-1074``
  (``_node.scaled``), accumulated in fixed point with no rounding at all;
* ``delta_of(values)``: the summary of one item, ``_node.delta_of`` (each value in those units, and
  which values are floats), the change every write of one item adds along its path;
* ``settle(plus, minus, spans, fields)``: the end of the Python code's range sum
  (``_btree.Tree._settle``, when ``range_totals`` leaves a read to it): its summary rows added and
  subtracted, and its leaf spans
  ``(leaf, start, stop, positive, ...)`` summed exactly, read in place from ``leaf.cols``; None when a
  span holds a value for the Python code (an int beyond int64);
* ``pack_node(head, parts)``: msgpack's bytes for ``[head, *parts]``, each part a list or tuple of
  exact bytes, ints (int64 or uint64 range) and floats: the node layouts of ``_node.encode_node``,
  byte for byte what ``msgpack.packb(..., use_bin_type=True)`` writes, without building its objects;
* ``pack_internal(parts, nfields)``: an internal node's bytes, plain, or wide when a sum exceeds
  msgpack's ints (its sum columns split into 63-bit limbs), as ``_node.encode_node`` writes them;
* ``repack_internal(node, origin, packed, nfields)``: the same bytes for an internal node copied from a
  committed one (``origin``, whose stored bytes are ``packed``) and changed in a few numbers, as a
  write of one item changes each node on its path: the stored bytes copied, the changed numbers
  encoded again; None for any other change, and the caller packs in full;
* ``bump_internal(node, packed, index, kid, delta, nfields, patch=None, tuples=False)``: what one write does to a
  committed internal node of its path, without a dirty copy (``_node.Node.bumped``): its bytes
  repacked from ``packed``, and the node as a patch of the node it was made from (see "Patched
  nodes"), or, past PATCH_MAX patched children, its child ids and changed columns as new tuples;
* ``patched_parts(base, patch, nfields)``: a patched node's child ids and columns as tuples, and
  ``make_patched(node, plain, nfields)``, which makes them the first time something reads them and
  makes the node a plain one;
* ``join_limbs(limbs)``: the inverse for one decoded sum column, ``_node._join_limbs``;
* ``pack_root(node_id, height, summary, pending, pending_summary)``: a root record's bytes, as
  ``_txn.encode_root`` writes them (big sums as [mantissa, shift], the mantissa as bytes beyond
  int64; the pending node's bytes as a bin, or a format 2 pending node's id);
* ``unpack_root(data)``: a root record's fields, for ``_txn.decode_root`` to check (the summaries'
  [mantissa, shift] pairs joined, refused beyond 8,192 bits), or None for what it does not read;
* ``valid_node(leaf, keys, kids, cols, shifts)``: ``_node._consistent``'s checks of a decoded node (its
  arrays' lengths, the kinds of their items, an internal node's counts, ids and shifts in range);
* ``thaw(node)``, ``freeze_node(node)`` and ``untrack(node)``: ``Node.copy``'s new lists and
  ``Node.freeze``'s tuples, untracked by the cyclic garbage collector as they are made, and a
  committed node itself untracked, frozen or decoded (a node's containers hold only bytes, ints
  and floats, so they can join no reference cycle); a list the node alone holds gives its items
  to the tuple without a touch;
* ``leaf_image(data)`` and ``leaf_lists(image)``: a stored leaf decoded into its search image alone,
  built from its bytes (byte for byte the image of the leaf decoded whole), when every value column
  is all floats or all int64s; and that leaf's keys and columns made from the image, on first use
  (``_node.Node.compact``). One object per decoded leaf instead of ~150;
* ``merge_children(keys, kids, entries, lo, hi, cols, limit, target, stored)``: the plan of
  ``_btree.NodeTree.merge_sorted`` for a node whose children are leaves (the batch's slice split
  among them) with each touched leaf's slice merged into the leaf's stored bytes, which are parsed in
  place and never decoded into Python objects: the merged leaf's bytes (those ``encode_node`` writes
  for it), or its even pieces with their exact summaries when it overflows, or the index of an entry
  already stored. A leaf that does not overflow is spliced: every key's place is noted, each value
  column is walked by its tags only, and the runs between the new elements are copied whole (1.7
  us for a leaf of 110 entries and one new entry, 4.0 us when every element was noted and copied
  one by one);
* ``leaf_edit(data, entry, values, nfields)``: one entry removed from a stored leaf, or given new
  values, spliced in the same way (the other elements copied as stored), with the entry's old
  values: a delete or an update of a scattered item (``_btree.NodeTree._edit_stored``);
* ``stored_path``, ``bump_path`` (with ``packed_layout``) and ``insert_stored``: a write's path from
  stored bytes (``_btree.NodeTree._stored_path``), each internal node of it bumped as
  ``Node.bumped`` does (``_write_stored``), and a scattered insert's whole write in one call, in a
  transaction that has changed no node yet (``_insert_stored``, ``_tree.inserted``);
* ``append_pending(packed, entry, values, capacity)`` and ``pending_edges(packed)``: a new event
  appended to a pending node's stored bytes, and the node's count and first and last entries read
  from them (``_tree.appended``, ``_tree.inserted``, ``Tree._pending_find``); ``leaf_rows`` reads a
  slice of a compact leaf's entries from its image;
* ``add_spans(node, rows, prefixes)``: the merged leaves of a batch (``merge_children``'s rows) added
  to their dirty parent's summary columns from the batch's prefix sums
  (``_btree.NodeTree._apply_merged``), or False, changing nothing, when a column must be rescaled.

The encoders and the sums return None, without raising, as soon as a value is outside what they
handle (another type, a subclass, a bool, a big int, another time zone, NaN or an infinity): the
caller then takes the Python path, which accepts or rejects the value with its usual typed error. So
this module never decides what is valid; it only computes faster what the Python code would.
``bisect``, the descents, ``range_totals`` and ``settle`` work on tallytree's own nodes and raise
TypeError (or IndexError) for anything malformed. No kernel runs Python code while it holds a pointer
into a sequence.

Damaged bytes. The kernels that parse stored bytes (``leaf_image``, ``merge_children``, the repack)
check every length against the bytes left before they read or allocate, and return None for
anything they do not recognize, so the Python decoder reports the damage; a Hypothesis test damages
one byte of stored nodes and compares the kernels with the Python decoder, also under
AddressSanitizer. Every descent stops after ``MAX_LEVELS`` levels with tallytree's
CorruptDatabaseError: damaged child ids that lead back up would otherwise loop for ever, holding the
GIL. And every descent checks the shape of each node it opens (see check_fields), raising the same
error: its number of value fields against the tree's (a node of another aggregate), a leaf's entry
count against its parent's (a leaf of another place, or emptied; all but ``find``, which reads no
counts), and two descents that part at a node against each other's depth. ``range_totals`` and ``settle`` know the tree's number of fields;
``rank``, ``rank_range``, ``select`` and ``find`` take it as an optional last argument, and without
it compare every node with the first (so a whole foreign tree under a root id needs the number).

Exact sums
----------
A finite double is ``m * 2**s`` units of ``2**-1074`` with ``m < 2**53`` and ``0 <= s <= 2045``. The
accumulator holds 32-bit digits (weight ``2**(32 i)``) in signed 64-bit slots: adding ``m << s``
adds at most three 32-bit parts to three slots, and a slot absorbs 2**31 such parts before it could
overflow, so carries are propagated only at the end (or every 2**30 values), when the digits are
turned into one Python int. An int in the int64 range is ``|v| * 2**1074`` units, added the same way.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------ keys */

#define TYPE_NEGATIVE 0x31
#define TYPE_ZERO 0x32
#define TYPE_POSITIVE 0x33
#define TYPE_DATETIME 0x60
#define SUFFIX_INT 0x00

/* The body of a positive magnitude after the type code (exponent, fraction groups), complemented
   when negative, then the int suffix. Returns the number of bytes written (at most 13). */
static Py_ssize_t
encode_magnitude(uint64_t magnitude, int negative, unsigned char *out)
{
    unsigned char *p = out;
    int exponent = 63 - __builtin_clzll(magnitude);
    *p++ = negative ? TYPE_NEGATIVE : TYPE_POSITIVE;
    unsigned char *body = p;
    if (exponent == 0) {
        *p++ = 0x80;
    }
    else {
        *p++ = 0x81;
        *p++ = (unsigned char)exponent;
    }
    uint64_t fraction = exponent ? magnitude & ((UINT64_C(1) << exponent) - 1) : 0;
    if (fraction == 0) {
        *p++ = 0x00;
    }
    else {
        /* the fraction's ``exponent`` bits, left-aligned in 63 bits, cut into 7-bit groups */
        int bits = exponent - __builtin_ctzll(fraction); /* significant bits, trailing zeros stripped */
        uint64_t aligned = fraction << (63 - exponent); /* bit 62 is the first fraction bit */
        int groups = (bits + 6) / 7;
        for (int group = 0; group < groups; group++) {
            unsigned int value = (unsigned int)((aligned >> (56 - 7 * group)) & 0x7F);
            *p++ = (unsigned char)((value << 1) | (group + 1 < groups ? 1 : 0));
        }
    }
    if (negative) {
        for (unsigned char *q = body; q < p; q++) {
            *q ^= 0xFF;
        }
    }
    *p++ = SUFFIX_INT;
    return p - out;
}

/* An exact int (not a bool or another subclass) in the int64 range: 1 with *value set, 0 for anything
   else (left to the Python code), -1 on an error. */
static int
exact_int64(PyObject *item, long long *value)
{
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
    int overflow = 0;
    *value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow) {
        return 0;
    }
    return *value == -1 && PyErr_Occurred() ? -1 : 1;
}

/* A size argument (fields, a length limit): 0 with *value set, or -1 with TypeError or ValueError. */
static int
size_argument(PyObject *argument, const char *what, Py_ssize_t *value)
{
    *value = PyLong_AsSsize_t(argument);
    if (*value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*value < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0", what);
        return -1;
    }
    return 0;
}

/* How one value becomes its key: 0 with *key set, 1 when the Python code must decide, -1 on an error. */
typedef int (*KeyEncoder)(PyObject *item, Py_ssize_t limit, PyObject **key);

/* [encode(value) for value in values], or None as soon as one value is left to the Python code. */
static PyObject *
map_keys(PyObject *values, KeyEncoder encode, Py_ssize_t limit)
{
    PyObject *seq = PySequence_Fast(values, "the key encoders need a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq); /* the encoders run no Python code */
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *key = NULL;
        int status = encode(items[index], limit, &key);
        if (status != 0) {
            Py_DECREF(seq);
            Py_DECREF(out);
            if (status < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(out, index, key);
    }
    Py_DECREF(seq);
    return out;
}

static int
int_key(PyObject *item, Py_ssize_t Py_UNUSED(limit), PyObject **key)
{
    long long value;
    int found = exact_int64(item, &value);
    if (found <= 0) {
        return found < 0 ? -1 : 1;
    }
    unsigned char buffer[16];
    Py_ssize_t size;
    if (value == 0) {
        buffer[0] = TYPE_ZERO;
        buffer[1] = SUFFIX_INT;
        size = 2;
    }
    else if (value > 0) {
        size = encode_magnitude((uint64_t)value, 0, buffer);
    }
    else {
        size = encode_magnitude(UINT64_C(0) - (uint64_t)value, 1, buffer);
    }
    *key = PyBytes_FromStringAndSize((const char *)buffer, size);
    return *key == NULL ? -1 : 0;
}

static PyObject *
int_keys(PyObject *Py_UNUSED(module), PyObject *values)
{
    return map_keys(values, int_key, 0);
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t
days_from_civil(int64_t year, unsigned month, unsigned day)
{
    year -= month <= 2;
    int64_t era = (year >= 0 ? year : year - 399) / 400;
    unsigned year_of_era = (unsigned)(year - era * 400);
    unsigned day_of_year = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1;
    unsigned day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    return era * 146097 + (int64_t)day_of_era - 719468;
}

static int
datetime_key(PyObject *item, Py_ssize_t Py_UNUSED(limit), PyObject **key)
{
    if (!PyDateTime_CheckExact(item) || !_PyDateTime_HAS_TZINFO(item)
        || ((PyDateTime_DateTime *)item)->tzinfo != PyDateTime_TimeZone_UTC) {
        return 1;
    }
    int64_t days = days_from_civil(PyDateTime_GET_YEAR(item), PyDateTime_GET_MONTH(item),
                                   PyDateTime_GET_DAY(item));
    int64_t seconds = ((days * 24 + PyDateTime_DATE_GET_HOUR(item)) * 60 + PyDateTime_DATE_GET_MINUTE(item)) * 60
                      + PyDateTime_DATE_GET_SECOND(item);
    uint64_t biased = (uint64_t)(seconds * 1000000 + PyDateTime_DATE_GET_MICROSECOND(item)) ^ (UINT64_C(1) << 63);
    unsigned char buffer[9];
    buffer[0] = TYPE_DATETIME;
    for (int byte = 0; byte < 8; byte++) {
        buffer[1 + byte] = (unsigned char)(biased >> (56 - 8 * byte));
    }
    *key = PyBytes_FromStringAndSize((const char *)buffer, 9);
    return *key == NULL ? -1 : 0;
}

static PyObject *
datetime_keys(PyObject *Py_UNUSED(module), PyObject *values)
{
    return map_keys(values, datetime_key, 0);
}

#define TYPE_TEXT 0x40

/* One str key: 40, the UTF-8 bytes, 00. 1 (for the Python code) for another type, a NUL to escape,
   a surrogate, or more than ``limit`` bytes. */
static int
text_key(PyObject *item, Py_ssize_t limit, PyObject **key)
{
    if (!PyUnicode_CheckExact(item)) {
        return 1;
    }
    PyObject *encoded = NULL;
    const char *data;
    Py_ssize_t size;
    if (PyUnicode_IS_ASCII(item)) { /* the str's own bytes are its UTF-8 */
        data = (const char *)PyUnicode_DATA(item);
        size = PyUnicode_GET_LENGTH(item);
    }
    else { /* a new bytes object, not the UTF-8 copy that PyUnicode_AsUTF8 would keep in the str */
        encoded = PyUnicode_AsUTF8String(item);
        if (encoded == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                return -1;
            }
            PyErr_Clear();
            return 1;
        }
        data = PyBytes_AS_STRING(encoded);
        size = PyBytes_GET_SIZE(encoded);
    }
    if (size > limit || memchr(data, 0, (size_t)size) != NULL) {
        Py_XDECREF(encoded);
        return 1;
    }
    *key = PyBytes_FromStringAndSize(NULL, size + 2);
    if (*key == NULL) {
        Py_XDECREF(encoded);
        return -1;
    }
    char *out = PyBytes_AS_STRING(*key);
    out[0] = TYPE_TEXT;
    memcpy(out + 1, data, (size_t)size);
    out[size + 1] = 0x00;
    Py_XDECREF(encoded);
    return 0;
}

/* The body of one tuple element, appended at out[*size] (at most ``room`` bytes in all), and its suffix
   byte (an int's) at suffix[*numbers]: an exact int64, str (without NUL, encodable), UTC datetime, None
   or bool. 1 (for the Python code) for anything else or when it does not fit, -1 on an error. */
static int
element_body(PyObject *item, unsigned char *out, Py_ssize_t room, Py_ssize_t *size, unsigned char *suffix,
             Py_ssize_t *numbers)
{
    unsigned char buffer[16];
    const unsigned char *data = buffer;
    Py_ssize_t length;
    PyObject *made = NULL;
    if (item == Py_None || item == Py_False || item == Py_True) {
        buffer[0] = item == Py_None ? 0x10 : item == Py_False ? 0x20 : 0x21;
        length = 1;
    }
    else if (PyLong_CheckExact(item) || PyUnicode_CheckExact(item) || PyDateTime_CheckExact(item)) {
        int status = PyLong_CheckExact(item)      ? int_key(item, 0, &made)
                     : PyUnicode_CheckExact(item) ? text_key(item, room, &made)
                                                  : datetime_key(item, 0, &made);
        if (status != 0) {
            return status;
        }
        data = (const unsigned char *)PyBytes_AS_STRING(made);
        length = PyBytes_GET_SIZE(made);
        if (PyLong_CheckExact(item)) { /* the int's suffix byte goes to the end of the key */
            length -= 1;
            suffix[(*numbers)++] = SUFFIX_INT;
        }
    }
    else {
        return 1;
    }
    if (*size + length > room) {
        Py_XDECREF(made);
        return 1;
    }
    memcpy(out + *size, data, (size_t)length);
    *size += length;
    Py_XDECREF(made);
    return 0;
}

#define TYPE_TUPLE 0x70

/* A flat exact tuple's key (70, the element bodies, 00, then one suffix byte per number), or only its
   body: 0 with *key set, 1 for the Python code (an element it does not handle, more than ``limit``
   bytes in the whole key), -1 on an error. */
static int
tuple_key(PyObject *item, Py_ssize_t limit, int body, PyObject **key)
{
    Py_ssize_t count = PyTuple_GET_SIZE(item);
    if (limit > 1024 || count > limit) {
        return 1;
    }
    unsigned char out[1024 + 2];
    unsigned char suffix[1024];
    Py_ssize_t size = 1, numbers = 0;
    out[0] = TYPE_TUPLE;
    for (Py_ssize_t index = 0; index < count; index++) {
        int status = element_body(PyTuple_GET_ITEM(item, index), out, limit, &size, suffix, &numbers);
        if (status != 0) {
            return status;
        }
    }
    out[size++] = 0x00;
    if (size + numbers > limit) {
        return 1;
    }
    if (!body) {
        memcpy(out + size, suffix, (size_t)numbers);
        size += numbers;
    }
    *key = PyBytes_FromStringAndSize((const char *)out, size);
    return *key == NULL ? -1 : 0;
}

/* One value's key by the C encoders, encode_key(value) (encode_body(value) when ``body``), for one
   exact int64, UTC datetime, str, or flat tuple of those, None and bools, of at most ``limit`` bytes
   (the whole key): a new reference; a new reference to None for any other value (left to the Python
   code, which encodes it or raises); NULL on an error. */
static PyObject *
key_of(PyObject *value, int body, Py_ssize_t limit)
{
    PyObject *key = NULL;
    int status;
    if (PyLong_CheckExact(value)) {
        status = int_key(value, 0, &key);
    }
    else if (PyTuple_CheckExact(value)) {
        status = tuple_key(value, limit, body, &key);
    }
    else if (PyUnicode_CheckExact(value)) {
        status = text_key(value, limit - 2, &key); /* 40 and the terminator */
    }
    else {
        status = datetime_key(value, 0, &key);
    }
    if (status != 0) {
        if (status < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (body && PyLong_CheckExact(value)) { /* an int's body is its key without the suffix byte */
        PyObject *cut = PyBytes_FromStringAndSize(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key) - 1);
        Py_DECREF(key);
        return cut;
    }
    return key;
}

/* ``one_key(value, body, limit)``: key_of(value, body, limit), what int_keys((value,))[0] gives
   without the tuple and the list (a bound or a prefix encodes one key). */
static PyObject *
one_key(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "one_key(value, body: bool, limit: int)");
        return NULL;
    }
    int body = PyObject_IsTrue(args[1]);
    if (body < 0) {
        return NULL;
    }
    Py_ssize_t limit;
    if (size_argument(args[2], "one_key(): limit", &limit) < 0) {
        return NULL;
    }
    return key_of(args[0], body, limit);
}

/* ``item_entry(key, id, limit)``: an item's entry, encode_key(key) + encode_id(id), the first thing
   every write of one item computes: the key as key_of takes it, the id an exact int64 or str, each of
   at most ``limit`` bytes; None when either is left to the Python code (which encodes it or raises). */
static PyObject *
item_entry(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "item_entry(key, id, limit: int)");
        return NULL;
    }
    Py_ssize_t limit;
    if (size_argument(args[2], "item_entry(): limit", &limit) < 0) {
        return NULL;
    }
    PyObject *id = args[1];
    if (!PyLong_CheckExact(id) && !PyUnicode_CheckExact(id)) { /* bytes, and what is no id */
        Py_RETURN_NONE;
    }
    PyObject *key = key_of(args[0], 0, limit);
    if (key == NULL || key == Py_None) {
        return key;
    }
    PyObject *tail = key_of(id, 0, limit);
    if (tail == NULL || tail == Py_None) {
        Py_DECREF(key);
        return tail;
    }
    Py_ssize_t head = PyBytes_GET_SIZE(key);
    PyObject *entry = PyBytes_FromStringAndSize(NULL, head + PyBytes_GET_SIZE(tail));
    if (entry != NULL) {
        memcpy(PyBytes_AS_STRING(entry), PyBytes_AS_STRING(key), (size_t)head);
        memcpy(PyBytes_AS_STRING(entry) + head, PyBytes_AS_STRING(tail), (size_t)PyBytes_GET_SIZE(tail));
    }
    Py_DECREF(key);
    Py_DECREF(tail);
    return entry;
}

/* ``plain_values(values, count)``: ``values`` itself when it is an exact tuple of ``count`` values,
   each an exact float that is finite or an exact int from -2**63 to 2**64 - 1 (the values an item may
   hold as they are: Aggregate._values' fast path); None for anything else, which the Python code
   converts or rejects. */
static PyObject *
plain_values(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plain_values(values, count: int)");
        return NULL;
    }
    Py_ssize_t count;
    if (size_argument(args[1], "plain_values(): count", &count) < 0) {
        return NULL;
    }
    PyObject *values = args[0];
    if (!PyTuple_CheckExact(values) || PyTuple_GET_SIZE(values) != count) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *value = PyTuple_GET_ITEM(values, index);
        if (PyFloat_CheckExact(value)) {
            if (!isfinite(PyFloat_AS_DOUBLE(value))) {
                Py_RETURN_NONE;
            }
        }
        else if (PyLong_CheckExact(value)) {
            int overflow;
            (void)PyLong_AsLongLongAndOverflow(value, &overflow); /* never fails on an exact int */
            if (overflow < 0) {
                Py_RETURN_NONE;
            }
            if (overflow > 0) {
                (void)PyLong_AsUnsignedLongLong(value);
                if (PyErr_Occurred()) { /* beyond 2**64 - 1 */
                    PyErr_Clear();
                    Py_RETURN_NONE;
                }
            }
        }
        else {
            Py_RETURN_NONE;
        }
    }
    return Py_NewRef(values);
}

static PyObject *
text_keys(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "text_keys(values, limit) takes two arguments");
        return NULL;
    }
    Py_ssize_t limit;
    if (size_argument(args[1], "text_keys(): limit", &limit) < 0) {
        return NULL;
    }
    return map_keys(args[0], text_key, limit);
}

/* ------------------------------------------------------------------ decoding entries */

/* decode_entry(entry, limit) -> (key, id) or None: ``_keys.decode_entry`` for the common keys and
   ids, each a None, bool, number (an int of the int64 range, a float), str, bytes, datetime, or a
   tuple of those, of at most ``limit`` encoded bytes (``_keys`` documents the format). Anything else
   (a nested tuple, a bigger int, an encoding that is not canonical, one beyond the limit) gives None,
   and the caller decodes the entry in Python, which decodes it or raises CorruptDatabaseError. So this
   kernel only ever returns what the Python code would. */

enum { CODE_NONE = 0x10, CODE_FALSE = 0x20, CODE_TRUE = 0x21, CODE_NEG_INF = 0x30, CODE_NEG = 0x31,
       CODE_ZERO = 0x32, CODE_POS = 0x33, CODE_POS_INF = 0x34, CODE_STR = 0x40, CODE_BYTES = 0x50,
       CODE_DATETIME = 0x60, CODE_TUPLE = 0x70 };

#define MICROS_PER_DAY INT64_C(86400000000)

/* The proleptic Gregorian date ``days`` after 1970-01-01 (H. Hinnant's civil_from_days). */
static void
civil_from_days(int64_t days, int *year, int *month, int *day)
{
    days += 719468;
    int64_t era = (days >= 0 ? days : days - 146096) / 146097; /* 400-year eras from 0000-03-01 */
    int64_t of_era = days - era * 146097;
    int64_t year_of_era = (of_era - of_era / 1460 + of_era / 36524 - of_era / 146096) / 365;
    int64_t of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    int64_t shifted = (5 * of_year + 2) / 153; /* months from March */
    *day = (int)(of_year - (153 * shifted + 2) / 5 + 1);
    *month = (int)(shifted < 10 ? shifted + 3 : shifted - 9);
    *year = (int)(year_of_era + era * 400 + (*month <= 2));
}

/* A datetime body at data[*at] (8 bytes: microseconds since 1970 UTC + 2**63) as an aware datetime in
   UTC, as ``_keys`` decodes it; NULL with no error set when it is outside datetime's range. */
static PyObject *
decode_datetime(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at)
{
    if (*at + 8 > length) {
        return NULL;
    }
    uint64_t biased = 0;
    for (int byte = 0; byte < 8; byte++) {
        biased = (biased << 8) | data[*at + byte];
    }
    *at += 8;
    int64_t micros = (int64_t)(biased ^ (UINT64_C(1) << 63));
    int64_t lowest = days_from_civil(1, 1, 1) * MICROS_PER_DAY;
    int64_t highest = (days_from_civil(9999, 12, 31) + 1) * MICROS_PER_DAY - 1;
    if (micros < lowest || micros > highest) {
        return NULL;
    }
    int64_t days = micros / MICROS_PER_DAY, rest = micros % MICROS_PER_DAY;
    if (rest < 0) { /* floor division */
        days -= 1;
        rest += MICROS_PER_DAY;
    }
    int year, month, day;
    civil_from_days(days, &year, &month, &day);
    int64_t seconds = rest / 1000000;
    return PyDateTimeAPI->DateTime_FromDateAndTime(year, month, day, (int)(seconds / 3600),
                                                   (int)(seconds / 60 % 60), (int)(seconds % 60),
                                                   (int)(rest % 1000000), PyDateTime_TimeZone_UTC,
                                                   PyDateTimeAPI->DateTimeType);
}

/* The magnitude of a finite number at data[at]: ``*mantissa * 2***exponent`` (mantissa odd, or 1),
   ``*at`` moved past it. 1, or 0 when it is not canonical or needs more than 63 bits of mantissa. */
static int
decode_magnitude(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, int flip, uint64_t *mantissa,
                 int64_t *exponent)
{
    Py_ssize_t pos = *at;
    if (pos >= length) {
        return 0;
    }
    unsigned head = data[pos++] ^ (unsigned)flip;
    int size = head >= 0x80 ? (int)head - 0x80 : 0x80 - (int)head;
    if (size > 3 || pos + size > length) {
        return 0;
    }
    int64_t raw = 0;
    for (int byte = 0; byte < size; byte++) {
        raw = (raw << 8) | (data[pos + byte] ^ (unsigned)flip);
    }
    pos += size;
    if (head >= 0x80) {
        if (size && raw >> (8 * size - 8) == 0) { /* not minimal */
            return 0;
        }
        *exponent = raw;
    }
    else {
        int64_t span = (int64_t)1 << (8 * size);
        if (raw > span - 1 - (span >> 8)) {
            return 0;
        }
        *exponent = raw - span + 1;
    }
    uint64_t fraction = 0;
    int groups = 0;
    unsigned byte;
    do {
        if (pos >= length || groups == 9) { /* 9 groups: 63 bits, all a mantissa here may have */
            return 0;
        }
        byte = data[pos++] ^ (unsigned)flip;
        fraction = (fraction << 7) | (byte >> 1);
        groups++;
    } while (byte & 1);
    *at = pos;
    if (fraction == 0) {
        *mantissa = 1;
        return groups == 1;
    }
    if (byte == 0) {
        return 0;
    }
    int trailing = __builtin_ctzll(fraction), bits = 7 * groups - trailing;
    if (bits > 62) {
        return 0;
    }
    *mantissa = (UINT64_C(1) << bits) | (fraction >> trailing);
    *exponent -= bits;
    return 1;
}

/* A text body (str or bytes) at data[*at], unescaped into a new object; NULL with no error set when
   it is not canonical, NULL with an error on a failure. */
static PyObject *
decode_text(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, int text)
{
    Py_ssize_t pos = *at, escapes = 0, end = -1;
    while (pos < length) {
        if (data[pos] == 0) {
            if (pos + 1 < length && data[pos + 1] == 0xFF) {
                escapes++;
                pos += 2;
                continue;
            }
            end = pos;
            break;
        }
        pos++;
    }
    if (end < 0) {
        return NULL;
    }
    Py_ssize_t size = end - *at - escapes;
    char local[256];
    char *buffer = size <= (Py_ssize_t)sizeof(local) ? local : PyMem_Malloc((size_t)size);
    if (buffer == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t out = 0;
    for (Py_ssize_t index = *at; index < end; index++) {
        buffer[out++] = (char)data[index];
        index += data[index] == 0; /* skip the ff of an escaped 00 */
    }
    PyObject *value = text ? PyUnicode_DecodeUTF8(buffer, size, NULL) : PyBytes_FromStringAndSize(buffer, size);
    if (buffer != local) {
        PyMem_Free(buffer);
    }
    if (value == NULL && text && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear(); /* not UTF-8: the Python code reports the corruption */
    }
    *at = end + 1;
    return value;
}

/* A number's body, decoded: +-mantissa * 2**exponent for a finite one (code CODE_NEG or CODE_POS),
   else zero or an infinity. Its suffix byte, after the whole key's body, says int or float. */
typedef struct {
    unsigned code;
    uint64_t mantissa;
    int64_t exponent;
} Number;

#define MAX_NUMBERS 128 /* numbers in one key: each takes two of its at most MAX_KEY_BYTES bytes */

/* The number as its suffix byte ``kind`` types it (00 int, 01 float); NULL with no error set when it
   is not one this kernel makes (an int beyond int64, a fraction typed int, a float no double holds). */
static PyObject *
number_value(const Number *number, unsigned kind)
{
    unsigned code = number->code;
    int finite = code == CODE_NEG || code == CODE_POS, negative = code < CODE_ZERO;
    int64_t exponent = number->exponent;
    int bits = finite ? 64 - __builtin_clzll(number->mantissa) : 0;
    if (kind == 0) {
        if (code == CODE_ZERO) {
            return PyLong_FromLong(0);
        }
        if (!finite || exponent < 0 || bits + exponent > 63) {
            return NULL;
        }
        int64_t magnitude = (int64_t)(number->mantissa << exponent);
        return PyLong_FromLongLong(negative ? -magnitude : magnitude);
    }
    if (kind != 1) {
        return NULL;
    }
    if (!finite) {
        return PyFloat_FromDouble(code == CODE_ZERO ? 0.0 : code == CODE_POS_INF ? INFINITY : -INFINITY);
    }
    if (bits > 53 || exponent < -1074 || bits + exponent > 1024) {
        return NULL;
    }
    double magnitude = ldexp((double)number->mantissa, (int)exponent); /* exact: checked just above */
    return PyFloat_FromDouble(negative ? -magnitude : magnitude);
}

/* One element body at data[*at] that is not a tuple: its value, or, for a number (typed by a suffix
   read later), None with ``*number`` filled and ``*is_number`` set. NULL when it is not one this kernel
   decodes (no error set) or on a failure (an error set). */
static PyObject *
decode_element(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Number *number, int *is_number)
{
    *is_number = 0;
    if (*at >= length) {
        return NULL;
    }
    unsigned code = data[(*at)++];
    if (code == CODE_STR || code == CODE_BYTES) {
        return decode_text(data, length, at, code == CODE_STR);
    }
    if (code == CODE_DATETIME) {
        return decode_datetime(data, length, at);
    }
    if (code == CODE_NONE || code == CODE_FALSE || code == CODE_TRUE) {
        return Py_NewRef(code == CODE_NONE ? Py_None : code == CODE_TRUE ? Py_True : Py_False);
    }
    if (code < CODE_NEG_INF || code > CODE_POS_INF) {
        return NULL;
    }
    number->code = code;
    number->mantissa = 1;
    number->exponent = 0;
    if ((code == CODE_NEG || code == CODE_POS) &&
        !decode_magnitude(data, length, at, code == CODE_NEG ? 0xFF : 0, &number->mantissa, &number->exponent)) {
        return NULL;
    }
    *is_number = 1;
    return Py_NewRef(Py_None);
}

/* A tuple body at data[*at] (after its code) whose elements are not tuples, then the suffix bytes of
   its numbers; NULL as for decode_element. */
static PyObject *
decode_flat_tuple(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at)
{
    Number numbers[MAX_NUMBERS];
    Py_ssize_t places[MAX_NUMBERS];
    int count = 0;
    PyObject *items = PyList_New(0);
    if (items == NULL) {
        return NULL;
    }
    while (*at < length && data[*at] != 0) {
        int is_number;
        PyObject *item = data[*at] == CODE_TUPLE || count == MAX_NUMBERS
                             ? NULL /* nested tuples: the Python decoder's */
                             : decode_element(data, length, at, &numbers[count], &is_number);
        if (item == NULL) {
            goto fail;
        }
        if (is_number) {
            places[count++] = PyList_GET_SIZE(items);
        }
        int failed = PyList_Append(items, item) < 0;
        Py_DECREF(item);
        if (failed) {
            goto fail;
        }
    }
    if (*at >= length || *at + 1 + count > length) {
        goto fail;
    }
    *at += 1; /* the tuple's terminator */
    for (int index = 0; index < count; index++) {
        PyObject *value = number_value(&numbers[index], data[(*at)++]);
        if (value == NULL) {
            goto fail;
        }
        PyList_SetItem(items, places[index], value); /* steals value; cannot fail here */
    }
    PyObject *tuple = PyList_AsTuple(items);
    Py_DECREF(items);
    return tuple;
fail:
    Py_DECREF(items);
    return NULL;
}

/* One lone key (or id) at data[*at], its suffix included; NULL with no error set when it is not one
   this kernel decodes, NULL with an error on a failure. */
static PyObject *
decode_lone(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t limit)
{
    Py_ssize_t start = *at, pos = start;
    PyObject *value;
    if (pos < length && data[pos] == CODE_TUPLE) {
        pos++;
        value = decode_flat_tuple(data, length, &pos);
    }
    else {
        Number number;
        int is_number;
        value = decode_element(data, length, &pos, &number, &is_number);
        if (value != NULL && is_number) {
            Py_SETREF(value, pos < length ? number_value(&number, data[pos++]) : NULL);
        }
    }
    if (value != NULL && pos - start > limit) {
        Py_CLEAR(value);
    }
    *at = pos;
    return value;
}

static PyObject *
decode_entry(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t limit;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "decode_entry(entry: bytes, limit)");
        return NULL;
    }
    if (size_argument(args[1], "decode_entry(): limit", &limit) < 0) {
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[0]), at = 0;
    PyObject *key = decode_lone(data, length, &at, limit);
    PyObject *id = key == NULL ? NULL : decode_lone(data, length, &at, limit);
    if (id == NULL) {
        Py_XDECREF(key);
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(NN)", key, id);
}

/* ------------------------------------------------------------------ searching a node's keys */

/* Compare bytes a (length an) with b (length bn) as Python compares bytes. */
static int
compare_bytes(const char *a, Py_ssize_t an, const char *b, Py_ssize_t bn)
{
    int order = memcmp(a, b, (size_t)(an < bn ? an : bn));
    return order ? order : (an > bn) - (an < bn);
}

/* One item of sort_order: its first 8 bytes as a big-endian number (zero-padded), its bytes, and
   its index. */
typedef struct {
    uint64_t prefix;
    const char *data;
    Py_ssize_t size;
    Py_ssize_t index;
} Sortable;

/* Whether item a sorts after item b (only their bytes: the merge below keeps equal items in order). */
static inline int
sorts_after(const Sortable *a, const Sortable *b)
{
    if (a->prefix != b->prefix) {
        return a->prefix > b->prefix;
    }
    return compare_bytes(a->data, a->size, b->data, b->size) > 0;
}

/* A stable bottom-up merge sort of ``count`` items, ``spare`` as long: the sorted items end in
   ``items`` or ``spare``, which is returned. */
static Sortable *
merge_sort(Sortable *items, Sortable *spare, Py_ssize_t count)
{
    for (Py_ssize_t width = 1; width < count; width *= 2) {
        for (Py_ssize_t start = 0; start < count; start += 2 * width) {
            Py_ssize_t middle = Py_MIN(start + width, count), stop = Py_MIN(start + 2 * width, count);
            Py_ssize_t left = start, right = middle, out = start;
            while (left < middle && right < stop) {
                spare[out++] = sorts_after(&items[left], &items[right]) ? items[right++] : items[left++];
            }
            while (left < middle) {
                spare[out++] = items[left++];
            }
            while (right < stop) {
                spare[out++] = items[right++];
            }
        }
        Sortable *swap = items;
        items = spare;
        spare = swap;
    }
    return items;
}

/* sort_order(items) -> list[int] | None: ``sorted(range(len(items)), key=items.__getitem__)`` for a
   list of exact bytes (None for anything else): the order a batch is sorted in before it is merged
   (``_keys.sort_order``). Each item's first 8 bytes are compared as one number, and the rest read
   only on a tie, in one C sort with no Python call per comparison. */
static PyObject *
sort_order(PyObject *Py_UNUSED(module), PyObject *items)
{
    if (!PyList_CheckExact(items)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t count = PyList_GET_SIZE(items);
    Sortable *sortables = PyMem_Malloc(2 * sizeof(Sortable) * (size_t)count + 1);
    if (sortables == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(items, index);
        if (!PyBytes_CheckExact(item)) {
            PyMem_Free(sortables);
            Py_RETURN_NONE;
        }
        Sortable *sortable = &sortables[index];
        sortable->data = PyBytes_AS_STRING(item);
        sortable->size = PyBytes_GET_SIZE(item);
        sortable->index = index;
        sortable->prefix = 0;
        for (Py_ssize_t at = 0; at < 8; at++) {
            unsigned char byte = at < sortable->size ? (unsigned char)sortable->data[at] : 0;
            sortable->prefix = sortable->prefix << 8 | byte;
        }
    }
    /* No Python code runs while the items' bytes are read: the list and its items stay as they are. */
    const Sortable *sorted = merge_sort(sortables, sortables + count, count);
    PyObject *order = PyList_New(count);
    for (Py_ssize_t at = 0; order != NULL && at < count; at++) {
        PyObject *index = PyLong_FromSsize_t(sorted[at].index);
        if (index == NULL) {
            Py_CLEAR(order);
            break;
        }
        PyList_SET_ITEM(order, at, index);
    }
    PyMem_Free(sortables);
    return order;
}

/* bisect_right / bisect_left of key in a list or tuple of bytes; -1 with TypeError otherwise. */
static Py_ssize_t
bisect_sequence(PyObject *keys, const char *key, Py_ssize_t size, int right)
{
    PyObject *fast = PySequence_Fast(keys, "a node's keys must be a sequence of bytes");
    if (fast == NULL) {
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t low = 0, high = PySequence_Fast_GET_SIZE(fast);
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        PyObject *probe = items[middle];
        if (!PyBytes_Check(probe)) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "a node's keys must be bytes");
            return -1;
        }
        int order = compare_bytes(PyBytes_AS_STRING(probe), PyBytes_GET_SIZE(probe), key, size);
        if (right ? order <= 0 : order < 0) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    Py_DECREF(fast);
    return low;
}

/* The first 8 bytes of a key as a big-endian number, zero-padded: prefix(a) < prefix(b) implies
   a < b, and equal prefixes leave the order to the whole keys. */
static uint64_t
key_prefix(const char *key, Py_ssize_t size)
{
    uint64_t prefix = 0;
    for (int index = 0; index < 8; index++) {
        prefix = (prefix << 8) | (index < size ? (unsigned char)key[index] : 0);
    }
    return prefix;
}

static PyObject *blob_name, *keys_name, *dirty_name, *leaf_name, *kids_name, *counts_cache_name, *counts_name,
    *rows_cache_name, *rows_name, *cols_name, *shifts_name, *id_name, *base_name, *patch_name, *class_name, *hits_name,
    *put_name, *delete_name, *empty_bytes;

static int
intern_names(void)
{
    blob_name = PyUnicode_InternFromString("_blob");
    keys_name = PyUnicode_InternFromString("keys");
    dirty_name = PyUnicode_InternFromString("dirty");
    leaf_name = PyUnicode_InternFromString("leaf");
    kids_name = PyUnicode_InternFromString("kids");
    counts_cache_name = PyUnicode_InternFromString("_counts");
    counts_name = PyUnicode_InternFromString("counts");
    rows_cache_name = PyUnicode_InternFromString("_rows");
    rows_name = PyUnicode_InternFromString("rows");
    cols_name = PyUnicode_InternFromString("cols");
    shifts_name = PyUnicode_InternFromString("shifts");
    id_name = PyUnicode_InternFromString("id");
    base_name = PyUnicode_InternFromString("_base");
    patch_name = PyUnicode_InternFromString("_patch");
    class_name = PyUnicode_InternFromString("__class__");
    hits_name = PyUnicode_InternFromString("hits");
    put_name = PyUnicode_InternFromString("put");
    delete_name = PyUnicode_InternFromString("delete");
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    return blob_name && keys_name && dirty_name && leaf_name && kids_name && counts_cache_name && counts_name &&
                   rows_cache_name && rows_name && cols_name && shifts_name && id_name && base_name && patch_name &&
                   class_name && hits_name && put_name && delete_name && empty_bytes
               ? 0
               : -1;
}

/* ``put_ops(txn, dbs, ops, start)``: the loop of ``_lmdb._apply_ops`` in one call. For each
   ``(table, key, value)`` of ``ops[start:]`` in order, py-lmdb's ``txn.put(key, value, True, True,
   False, dbs[table])`` (dupdata, overwrite, append, by position as _lmdb passes them), or
   ``txn.delete(key, b"", dbs[table])`` for a value of None. What py-lmdb raises propagates, the ops
   before it done (the caller ends the transaction, as it does when its own loop raises). Returns
   None. */
static PyObject *
put_ops(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "put_ops(txn, dbs: list, ops: list, start: int)");
        return NULL;
    }
    Py_ssize_t start;
    if (size_argument(args[3], "put_ops(): start", &start) < 0) {
        return NULL;
    }
    PyObject *txn = args[0], *dbs = args[1], *ops = args[2];
    for (Py_ssize_t index = start; index < PyList_GET_SIZE(ops); index++) {
        PyObject *op = PyList_GET_ITEM(ops, index);
        if (!PyTuple_CheckExact(op) || PyTuple_GET_SIZE(op) != 3) {
            PyErr_SetString(PyExc_TypeError, "put_ops(): each op is a (table, key, value) tuple");
            return NULL;
        }
        Py_INCREF(op); /* (the calls below run no Python code, but py-lmdb is not ours to promise it) */
        Py_ssize_t table = PyLong_AsSsize_t(PyTuple_GET_ITEM(op, 0));
        PyObject *db = NULL, *done = NULL;
        if (!(table == -1 && PyErr_Occurred())) {
            if (table < 0 || table >= PyList_GET_SIZE(dbs)) {
                PyErr_Format(PyExc_IndexError, "put_ops(): no table %zd", table);
            }
            else {
                db = PyList_GET_ITEM(dbs, table);
            }
        }
        if (db != NULL) {
            PyObject *value = PyTuple_GET_ITEM(op, 2);
            if (value == Py_None) {
                PyObject *call[4] = {txn, PyTuple_GET_ITEM(op, 1), empty_bytes, db};
                done = PyObject_VectorcallMethod(delete_name, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            }
            else {
                PyObject *call[7] = {txn, PyTuple_GET_ITEM(op, 1), value, Py_True, Py_True, Py_False, db};
                done = PyObject_VectorcallMethod(put_name, call, 7 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            }
        }
        Py_DECREF(op);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_NONE;
}

/* 1 for a leaf, 0 for an internal node, -1 with an error set (through the attribute). */
static int
node_is_leaf(PyObject *node)
{
    PyObject *leaf = PyObject_GetAttr(node, leaf_name);
    if (leaf == NULL) {
        return -1;
    }
    int answer = PyObject_IsTrue(leaf);
    Py_DECREF(leaf);
    return answer;
}

/* The search image of a committed node (its "blob"), one bytes object:

       uint32 n | uint16 kind | uint16 fields | n uint64 key prefixes
       | internal nodes: n + 1 int64 cumulative child counts | n uint64 child ids
       | n + 1 uint32 offsets | (8-byte aligned) the values section | the n keys back to back

   A search bisects the prefixes (n * 8 contiguous bytes: a probe of a cold node costs one cache line,
   and the last probes share it) and reads a key itself only when its prefix ties with the probe's. A
   descent then reads the count before the child it takes and the child's id from the same object:
   a cold internal node costs the lines of its image, where its attributes (the kind, a tuple of
   counts and its int objects, a tuple of ids and theirs) cost a cache miss each. The keys of a node
   are a few KiB at most (MAX_KEY_BYTES each), so 32-bit offsets suffice. An internal node whose
   counts or ids do not fit in 64 bits (none in practice) gets an image of kind IMAGE_KEYS: searched
   through it, counted and followed through its attributes.

   The values section holds what a range sum reads (``range_totals``), for ``fields`` value fields:

   * internal node: ``fields`` int32 shifts, then n + 1 rows, row i being the node-local sums of the
     children before i (``Node.rows()[i]`` without its count, each sum ``>> shift``): ``fields``
     int128 sums (low then high 64 bits), then ``fields`` int64 float counts. Present when every
     cumulative sum fits in 127 bits and every shift is at most MAX_SHIFT (the other columns of the
     node are unshifted): always, but for ints beyond 2**60 or so.
   * leaf: ``fields`` type bytes, then one column of n raw values per field: VALUES_FLOAT (every
     value a float: doubles), VALUES_INT (every value an int of the int64 range: int64s) or
     VALUES_NONE (a mixed or wider column, read from ``cols``; its n * 8 bytes unused).

   ``fields`` is NO_VALUES when the node has no values section. A range sum of a cold node then reads
   a few contiguous lines, where ``Node.rows()`` holds a tuple of Python ints of ~1,100 bits per row
   and a leaf's ``cols`` a float object per value. */

enum { IMAGE_LEAF = 1, IMAGE_INTERNAL = 2, IMAGE_KEYS = 3 };
enum { VALUES_NONE = 0, VALUES_FLOAT = 1, VALUES_INT = 2 };
#define NO_VALUES 0xFFFF
#define MAX_SHIFT 2048 /* a shifted int128 row must stay well inside the sum accumulator */

typedef struct {
    PyObject *blob; /* owned; NULL when the node has no image (a dirty node, or searched only once) */
    Py_ssize_t count, length, fields; /* fields: -1 without a values section */
    int kind;
    const char *data, *prefixes, *counts, *kids, *offsets, *values;
} Image;

static Py_ssize_t
align8(Py_ssize_t size)
{
    return (size + 7) & ~(Py_ssize_t)7;
}

/* The size of an image's values section. */
static Py_ssize_t
values_size(Py_ssize_t count, int kind, Py_ssize_t fields)
{
    if (fields < 0) {
        return 0;
    }
    if (kind == IMAGE_LEAF) {
        return align8(fields) + 8 * fields * count;
    }
    return align8(4 * fields) + (count + 1) * 24 * fields;
}

/* Where the keys of an image start: the size of its other sections. */
static Py_ssize_t
image_header(Py_ssize_t count, int kind, Py_ssize_t fields)
{
    Py_ssize_t fixed = 8 + count * 8 + (kind == IMAGE_INTERNAL ? (2 * count + 1) * 8 : 0);
    return align8(fixed + (count + 1) * (Py_ssize_t)sizeof(uint32_t)) + values_size(count, kind, fields);
}

/* Point the sections of ``image`` (its data set, at least image_header bytes) into its data. */
static void
image_layout(Py_ssize_t count, int kind, Py_ssize_t fields, Image *image)
{
    Py_ssize_t at = 8;
    image->prefixes = image->data + at;
    at += count * 8;
    if (kind == IMAGE_INTERNAL) {
        image->counts = image->data + at;
        at += (count + 1) * 8;
        image->kids = image->data + at;
        at += count * 8;
    }
    else {
        image->counts = image->kids = NULL;
    }
    image->offsets = image->data + at;
    at = align8(at + (count + 1) * (Py_ssize_t)sizeof(uint32_t));
    image->fields = fields;
    image->values = fields < 0 ? NULL : image->data + at;
}

/* No image yet: every field defined (the checks read the kind first). */
static void
image_clear(Image *image)
{
    memset(image, 0, sizeof(*image));
    image->fields = -1;
}

/* Fill ``image`` from a blob (a reference this consumes); 0, or -1 with TypeError if it is not one. */
static int
image_parse(PyObject *blob, Image *image)
{
    image->blob = blob;
    image->data = PyBytes_AS_STRING(blob);
    image->length = PyBytes_GET_SIZE(blob);
    uint32_t count = 0;
    uint16_t kind = 0, fields = 0;
    if (image->length >= 8) {
        memcpy(&count, image->data, sizeof(count));
        memcpy(&kind, image->data + 4, sizeof(kind));
        memcpy(&fields, image->data + 6, sizeof(fields));
    }
    image->count = (Py_ssize_t)count;
    image->kind = (int)kind;
    /* Only the header is read here: a cold image's offsets lie a few cache lines away, and a search
       reads them only on a tie, checking each against the image's length. */
    Py_ssize_t with = fields == NO_VALUES ? -1 : fields;
    int valid = image->length >= 8 && kind >= IMAGE_LEAF && kind <= IMAGE_KEYS &&
                image->count <= image->length / 12 && (with < 0 || kind != IMAGE_KEYS) &&
                image_header(image->count, kind, with) <= image->length;
    if (!valid) {
        Py_CLEAR(image->blob);
        PyErr_SetString(PyExc_TypeError, "node._blob must be None, False or a search image");
        return -1;
    }
    image_layout(image->count, kind, with, image);
    return 0;
}

static void
image_release(Image *image)
{
    Py_CLEAR(image->blob);
}

/* Two's complement little-endian bytes of an int; -1 with OverflowError if it needs more. */
static int
long_bytes(PyObject *item, unsigned char *bytes, size_t length, int is_signed)
{
#if PY_VERSION_HEX >= 0x030D0000
    return _PyLong_AsByteArray((PyLongObject *)item, bytes, length, 1, is_signed, 1);
#else
    return _PyLong_AsByteArray((PyLongObject *)item, bytes, length, 1, is_signed);
#endif
}

/* An exact int that fits in 127 bits: 1 with *value set, 0 for anything else, -1 on an error. */
static int
exact_int128(PyObject *item, __int128 *value)
{
    long long small;
    int found = exact_int64(item, &small);
    if (found != 0) {
        *value = small;
        return found;
    }
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
    unsigned char bytes[16];
    if (long_bytes(item, bytes, sizeof(bytes), 1) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    unsigned __int128 raw = 0;
    for (int byte = 15; byte >= 0; byte--) {
        raw = (raw << 8) | bytes[byte];
    }
    memcpy(value, &raw, sizeof(raw));
    return 1;
}

/* A running sum of a column of ints into ``out`` (``stride`` bytes apart, ``width`` 8 or 16 bytes
   each, n + 1 values from 0). 1 if a value or a sum does not fit (or is not an exact int), 0, or -1
   with an error set. */
static int
cumulate(PyObject *column, Py_ssize_t count, int width, char *out, Py_ssize_t stride)
{
    PyObject *fast = PySequence_Fast(column, "a node's columns must be sequences");
    if (fast == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(fast) != count) {
        Py_DECREF(fast);
        return 1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    __int128 total = 0;
    int status = 0;
    for (Py_ssize_t index = 0; index <= count && status == 0; index++) {
        if (width == 8) {
            int64_t narrow = (int64_t)total;
            memcpy(out + index * stride, &narrow, sizeof(narrow));
        }
        else {
            memcpy(out + index * stride, &total, sizeof(total));
        }
        if (index == count) {
            break;
        }
        __int128 value;
        int found = exact_int128(items[index], &value);
        if (found <= 0) {
            status = found < 0 ? -1 : 1;
        }
        else if (__builtin_add_overflow(total, value, &total) ||
                 (width == 8 && (total > INT64_MAX || total < INT64_MIN))) {
            status = 1;
        }
    }
    Py_DECREF(fast);
    return status;
}

/* The values section of an internal node into ``out`` (values_size bytes): 1 if it has none, 0, or
   -1 with an error set. */
static int
internal_values(PyObject *cols, PyObject *shifts, Py_ssize_t count, Py_ssize_t fields, char *out)
{
    Py_ssize_t row = 24 * fields;
    char *rows = out + align8(4 * fields);
    for (Py_ssize_t field = 0; field < fields; field++) {
        long long shift;
        int found = exact_int64(PySequence_Fast_GET_ITEM(shifts, 1 + field), &shift);
        if (found <= 0 || shift < 0 || shift > MAX_SHIFT) {
            return found < 0 ? -1 : 1;
        }
        long long unshifted;
        found = exact_int64(PySequence_Fast_GET_ITEM(shifts, 1 + fields + field), &unshifted);
        if (found <= 0 || unshifted != 0) { /* float counts are never shifted */
            return found < 0 ? -1 : 1;
        }
        int32_t narrow = (int32_t)shift;
        memcpy(out + 4 * field, &narrow, sizeof(narrow));
        int status = cumulate(PySequence_Fast_GET_ITEM(cols, 1 + field), count, 16, rows + 16 * field, row);
        status = status ? status
                        : cumulate(PySequence_Fast_GET_ITEM(cols, 1 + fields + field), count, 8,
                                   rows + 16 * fields + 8 * field, row);
        if (status) {
            return status;
        }
    }
    return 0;
}

/* The values section of a leaf into ``out`` (values_size bytes): 0, or -1 with an error set. */
static int
leaf_values(PyObject *cols, Py_ssize_t count, Py_ssize_t fields, char *out)
{
    char *columns = out + align8(fields);
    for (Py_ssize_t field = 0; field < fields; field++) {
        PyObject *fast =
            PySequence_Fast(PySequence_Fast_GET_ITEM(cols, field), "a leaf's columns must be sequences");
        if (fast == NULL) {
            return -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(fast);
        char type = PySequence_Fast_GET_SIZE(fast) == count ? VALUES_FLOAT : VALUES_NONE;
        char *column = columns + 8 * field * count;
        for (Py_ssize_t index = 0; index < count && type == VALUES_FLOAT; index++) {
            if (!PyFloat_CheckExact(items[index])) {
                type = VALUES_INT;
                break;
            }
            double value = PyFloat_AS_DOUBLE(items[index]);
            memcpy(column + 8 * index, &value, sizeof(value));
        }
        for (Py_ssize_t index = 0; index < count && type == VALUES_INT; index++) {
            long long value;
            int found = exact_int64(items[index], &value);
            if (found < 0) {
                Py_DECREF(fast);
                return -1;
            }
            if (found == 0) {
                type = VALUES_NONE;
                break;
            }
            memcpy(column + 8 * index, &value, sizeof(value));
        }
        Py_DECREF(fast);
        out[field] = type;
    }
    return 0;
}

/* The values section of a node into ``*out`` (PyMem_Malloc'ed, values_size bytes) and its number of
   fields into ``*fields``; *out stays NULL (fields -1) when the node has none. 0, or -1 with an error. */
static int
node_values(PyObject *node, int kind, Py_ssize_t count, Py_ssize_t *fields, char **out)
{
    *out = NULL;
    *fields = -1;
    if (kind == IMAGE_KEYS) {
        return 0;
    }
    PyObject *cols = PyObject_GetAttr(node, cols_name);
    PyObject *cols_fast = cols == NULL ? NULL : PySequence_Fast(cols, "a node's cols must be a sequence");
    Py_XDECREF(cols);
    PyObject *shifts = NULL, *shifts_fast = NULL;
    if (cols_fast != NULL && kind == IMAGE_INTERNAL) {
        shifts = PyObject_GetAttr(node, shifts_name);
        shifts_fast = shifts == NULL ? NULL : PySequence_Fast(shifts, "a node's shifts must be a sequence");
        Py_XDECREF(shifts);
        if (shifts_fast == NULL) {
            Py_CLEAR(cols_fast);
        }
    }
    if (cols_fast == NULL) {
        return -1;
    }
    Py_ssize_t width = PySequence_Fast_GET_SIZE(cols_fast);
    Py_ssize_t wanted = kind == IMAGE_LEAF ? width : (width - 1) / 2;
    int status = 1;
    if (wanted < NO_VALUES &&
        (kind == IMAGE_LEAF || (width % 2 == 1 && PySequence_Fast_GET_SIZE(shifts_fast) == width))) {
        Py_ssize_t size = values_size(count, kind, wanted);
        *out = PyMem_Calloc((size_t)(size ? size : 1), 1);
        if (*out == NULL) {
            PyErr_NoMemory();
            status = -1;
        }
        else {
            status = kind == IMAGE_LEAF ? leaf_values(cols_fast, count, wanted, *out)
                                        : internal_values(cols_fast, shifts_fast, count, wanted, *out);
        }
    }
    Py_DECREF(cols_fast);
    Py_XDECREF(shifts_fast);
    if (status) {
        PyMem_Free(*out);
        *out = NULL;
        return status < 0 ? -1 : 0;
    }
    *fields = wanted;
    return 0;
}

/* A derived array of a node, ``node.counts()`` or ``node.rows()``: the one a committed node caches in
   ``cached``, else computed by the ``method`` (a new reference, or NULL with an error set). */
static PyObject *
derived(PyObject *node, PyObject *cached, PyObject *method)
{
    PyObject *value = PyObject_GetAttr(node, cached);
    if (value == Py_None) {
        Py_DECREF(value);
        value = PyObject_CallMethodNoArgs(node, method);
    }
    return value;
}

/* The 64-bit numbers of a sequence of ints into ``out`` (signed or not); 1 if one does not fit (no
   error set), -1 with an error set if the sequence is not one of ints. */
static int
fill_words(PyObject *values, Py_ssize_t expected, int is_signed, char *out)
{
    PyObject *fast = PySequence_Fast(values, "a node's counts and ids must be sequences of ints");
    if (fast == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(fast) != expected) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_TypeError, "a node's counts and ids do not match its keys");
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t index = 0; index < expected; index++) {
        if (!PyLong_Check(items[index])) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "a node's counts and ids must be ints");
            return -1;
        }
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(items[index], &overflow);
        if (overflow || (!is_signed && value < 0)) {
            Py_DECREF(fast);
            return 1;
        }
        if (value == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        memcpy(out + index * 8, &value, sizeof(value));
    }
    Py_DECREF(fast);
    return 0;
}

/* A new image of ``count`` keys of ``total`` bytes, of ``kind`` with ``fields`` value fields (-1:
   none): its header written and the rest of it up to the keys zeroed (an image's bytes depend on its
   node alone, the alignment padding included), its sections laid out in *image. The caller fills the
   sections, and the keys with image_put_key. NULL with an error set. */
static PyObject *
image_new(Py_ssize_t count, int kind, Py_ssize_t fields, Py_ssize_t total, Image *image)
{
    Py_ssize_t header = image_header(count, kind, fields);
    if (count > UINT32_MAX / 16 || total > (Py_ssize_t)UINT32_MAX - header) {
        PyErr_SetString(PyExc_OverflowError, "a node's keys are too large to index");
        return NULL;
    }
    PyObject *blob = PyBytes_FromStringAndSize(NULL, header + total);
    if (blob == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(blob);
    memset(out, 0, (size_t)header);
    image_clear(image);
    image->data = out;
    image->length = header + total;
    image->count = count;
    image->kind = kind;
    image_layout(count, kind, fields, image);
    uint32_t head_count = (uint32_t)count, first = (uint32_t)header;
    uint16_t head_kind = (uint16_t)kind, head_fields = fields < 0 ? NO_VALUES : (uint16_t)fields;
    memcpy(out, &head_count, sizeof(head_count));
    memcpy(out + 4, &head_kind, sizeof(head_kind));
    memcpy(out + 6, &head_fields, sizeof(head_fields));
    memcpy((char *)image->offsets, &first, sizeof(first));
    return blob;
}

/* Write key ``index`` of a new image (the keys go in order): its prefix, its bytes and its end. */
static void
image_put_key(const Image *image, Py_ssize_t index, const char *key, Py_ssize_t size)
{
    char *offsets = (char *)image->offsets;
    uint32_t start;
    memcpy(&start, offsets + index * (Py_ssize_t)sizeof(uint32_t), sizeof(start));
    uint64_t prefix = key_prefix(key, size);
    memcpy((char *)image->prefixes + index * 8, &prefix, sizeof(prefix));
    memcpy((char *)image->data + start, key, (size_t)size);
    uint32_t stop = start + (uint32_t)size;
    memcpy(offsets + (index + 1) * (Py_ssize_t)sizeof(uint32_t), &stop, sizeof(stop));
}

/* The image of a committed node (a new reference), or NULL with an error set. */
static PyObject *
build_image(PyObject *node)
{
    int leaf = node_is_leaf(node);
    PyObject *keys = leaf < 0 ? NULL : PyObject_GetAttr(node, keys_name);
    PyObject *fast = keys == NULL ? NULL : PySequence_Fast(keys, "a node's keys must be a sequence of bytes");
    Py_XDECREF(keys);
    if (fast == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t total = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        if (!PyBytes_Check(items[index])) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "a node's keys must be bytes");
            return NULL;
        }
        total += PyBytes_GET_SIZE(items[index]);
    }
    PyObject *counts = NULL, *kids = NULL;
    if (!leaf) {
        counts = derived(node, counts_cache_name, counts_name);
        kids = counts == NULL ? NULL : PyObject_GetAttr(node, kids_name);
        if (kids == NULL) {
            Py_XDECREF(counts);
            Py_DECREF(fast);
            return NULL;
        }
    }
    PyObject *blob = NULL;
    char *values = NULL;
    for (int kind = leaf ? IMAGE_LEAF : IMAGE_INTERNAL; blob == NULL; kind = IMAGE_KEYS) {
        Py_ssize_t fields;
        PyMem_Free(values);
        if (node_values(node, kind, count, &fields, &values) < 0) {
            values = NULL;
            break;
        }
        Image image;
        blob = image_new(count, kind, fields, total, &image);
        if (blob == NULL) {
            break;
        }
        if (kind == IMAGE_INTERNAL) {
            int filled = fill_words(counts, count + 1, 1, (char *)image.counts);
            filled = filled ? filled : fill_words(kids, count, 0, (char *)image.kids);
            if (filled) {
                Py_CLEAR(blob);
                if (filled < 0) {
                    break;
                }
                continue; /* a count or an id beyond 64 bits: an image of the keys alone */
            }
        }
        if (values != NULL) {
            memcpy((char *)image.values, values, (size_t)values_size(count, kind, fields));
        }
        for (Py_ssize_t index = 0; index < count; index++) {
            image_put_key(&image, index, PyBytes_AS_STRING(items[index]), PyBytes_GET_SIZE(items[index]));
        }
    }
    PyMem_Free(values);
    Py_XDECREF(counts);
    Py_XDECREF(kids);
    Py_DECREF(fast);
    return blob;
}

/* The image of ``node`` into ``image``: image->blob is NULL when the node has none, a dirty node
   (whose keys may still change) or a leaf searched for the first time, which this marks (``_blob``
   False): most leaves of a large tree are searched once in a while, and a search of the keys reads
   ~log2(n) of them where building an image reads them all. The second search builds it. An
   internal node gets its image on its first search: there are few of them, every descent passes
   through one per level, and without an image a range sum would build all its cumulative rows in
   Python (``Node.rows``, ~10 us for 58 children with two float fields) to read two of them, which
   is what every read pays after a write replaced the nodes of a path. 0, or -1 with an error set. */
static int
node_image(PyObject *node, Image *image)
{
    image_clear(image);
    PyObject *blob = PyObject_GetAttr(node, blob_name);
    if (blob == NULL) {
        return -1;
    }
    if (PyBytes_Check(blob)) {
        return image_parse(blob, image);
    }
    if (blob != Py_None && blob != Py_False) {
        Py_DECREF(blob);
        PyErr_SetString(PyExc_TypeError, "node._blob must be None, False or a search image");
        return -1;
    }
    int first_search = blob == Py_None;
    Py_DECREF(blob);
    PyObject *dirty = PyObject_GetAttr(node, dirty_name);
    int changing = dirty == NULL ? -1 : PyObject_IsTrue(dirty);
    Py_XDECREF(dirty);
    if (changing) {
        return changing < 0 ? -1 : 0;
    }
    if (first_search) {
        PyObject *leaf = PyObject_GetAttr(node, leaf_name);
        int is_leaf = leaf == NULL ? -1 : PyObject_IsTrue(leaf);
        Py_XDECREF(leaf);
        if (is_leaf) { /* an internal node is built at once: see above */
            return is_leaf < 0 ? -1 : PyObject_SetAttr(node, blob_name, Py_False);
        }
    }
    blob = build_image(node);
    if (blob == NULL || PyObject_SetAttr(node, blob_name, blob) < 0) {
        Py_XDECREF(blob);
        return -1;
    }
    return image_parse(blob, image);
}

/* node_image, given the node's image when the caller has it already (``hint``, borrowed: an image
   from ``node._blob``, which a node sets once and keeps), or NULL. */
static int
node_image_hinted(PyObject *node, PyObject *hint, Image *image)
{
    if (hint == NULL) {
        return node_image(node, image);
    }
    image_clear(image);
    return image_parse(Py_NewRef(hint), image);
}

/* 1 for a leaf, 0 for an internal node, -1 with an error set. */
static int
image_is_leaf(PyObject *node, const Image *image)
{
    return image->blob != NULL ? image->kind == IMAGE_LEAF : node_is_leaf(node);
}

/* The number of a leaf image's value cell (a VALUES_FLOAT or VALUES_INT column's), a new reference. */
static PyObject *
cell_value(const char *cell, char type)
{
    if (type == VALUES_FLOAT) {
        double number;
        memcpy(&number, cell, sizeof(number));
        return PyFloat_FromDouble(number);
    }
    int64_t number;
    memcpy(&number, cell, sizeof(number));
    return PyLong_FromLongLong((long long)number);
}

/* Key ``position`` of an image (0 <= position < count): its bytes, with its size in *size, or NULL
   with TypeError when the offsets point outside the image. */
static const char *
image_key(const Image *image, Py_ssize_t position, Py_ssize_t *size)
{
    uint32_t start, stop;
    memcpy(&start, image->offsets + position * (Py_ssize_t)sizeof(uint32_t), sizeof(start));
    memcpy(&stop, image->offsets + (position + 1) * (Py_ssize_t)sizeof(uint32_t), sizeof(stop));
    if (start > stop || (Py_ssize_t)stop > image->length) {
        PyErr_SetString(PyExc_TypeError, "node._blob is not a search image");
        return NULL;
    }
    *size = (Py_ssize_t)(stop - start);
    return image->data + start;
}

/* bisect_right (bisect_left unless right) of key in the node's keys, through its image when it has
   one; -1 with an error set. */
static Py_ssize_t
image_search(PyObject *node, const Image *image, const char *key, Py_ssize_t size, int right)
{
    if (image->blob == NULL) {
        PyObject *keys = PyObject_GetAttr(node, keys_name);
        if (keys == NULL) {
            return -1;
        }
        Py_ssize_t found = bisect_sequence(keys, key, size, right);
        Py_DECREF(keys);
        return found;
    }
    uint64_t prefix = key_prefix(key, size);
    Py_ssize_t low = 0, high = image->count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        uint64_t probe;
        memcpy(&probe, image->prefixes + middle * 8, sizeof(probe));
        int order;
        if (probe != prefix) {
            order = probe < prefix ? -1 : 1;
        }
        else {
            Py_ssize_t probe_size;
            const char *probed = image_key(image, middle, &probe_size);
            if (probed == NULL) {
                return -1;
            }
            order = compare_bytes(probed, probe_size, key, size);
        }
        if (right ? order <= 0 : order < 0) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    return low;
}

/* bisect_right (bisect_left unless right) of key in node.keys; -1 with an error set. */
static Py_ssize_t
search_node(PyObject *node, const char *key, Py_ssize_t size, int right)
{
    Image image;
    if (node_image(node, &image) < 0) {
        return -1;
    }
    Py_ssize_t found = image_search(node, &image, key, size, right);
    image_release(&image);
    return found;
}

static PyObject *
node_bisect(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "bisect(node, key: bytes, right: bool)");
        return NULL;
    }
    int right = PyObject_IsTrue(args[2]);
    if (right < 0) {
        return NULL;
    }
    Py_ssize_t found = search_node(args[0], PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), right);
    return found < 0 ? NULL : PyLong_FromSsize_t(found);
}

/* ------------------------------------------------------------------ the node table */

/* NodeTable: the shared cache of committed nodes (``_store.NodeCache``), by node id, with the search
   image of each node next to it once it has one. A descent of a large tree meets most nodes cold,
   out of the CPU caches; through a dict, taking a child costs a miss for the dict's index, one for
   its entry and one for the stored key, an int object the lookup compares with the id read from the
   parent's image (a new int object each time), then one for the node object, whose ``_blob`` leads
   to the image. Here a child is one probe of an open-addressing table of plain slots (id, node,
   image), usually one cache line, and no int object is made: the image's first line comes next.

   Linear probing on the id times a Fibonacci constant (ids are consecutive); deletion shifts the
   following slots back, so there are no tombstones; the table doubles when half full. Eviction is
   a second-chance clock: each put is numbered, and (id, number) pairs wait in a ring in that order;
   a pair whose slot has gone, or holds a later put of the id, is skipped, and a full ring is rebuilt
   with the live pairs alone. A lookup that finds a node marks its slot (the top bit of its number),
   and the oldest pair's node is evicted only if unmarked since it was last at the head of the ring;
   a marked one is unmarked and queued again. Plain first-in first-out (the dict's order, and this
   table's before) evicted a tree's internal nodes as often as its leaves: with 10^7 items, 210,000
   leaves went through a cache of 32,768 nodes, and every 16,000 counts or so each of the ~4,500
   internal nodes was decoded again (45 us each, with their wide sums), about 6 us per count.

   The table holds strong references to its nodes and their images. It is not tracked by the cyclic
   garbage collector: a node refers to bytes, ints, floats and tuples of those, never to a table, so
   no cycle can pass through one. Every change completes before a reference is released.

   A descent borrows the nodes it takes from the table: taking a reference would write to each node
   object, a cache miss per level on a large tree, for nothing the descent needs (it reads the
   image). While a descent runs, the table is *pinned* (``pins``): a node it drops then (an eviction
   by a fetch, or another thread's put, discard or clear while the descent waits for the GIL) goes
   to the ``buried`` list with its image instead of being released, and the last descent to end
   releases them. */

typedef struct {
    uint64_t id; /* 0: empty (node ids start at 1) */
    uint64_t put; /* the number of the put that stored it, and REFERENCED once found since queued */
    PyObject *node;
    PyObject *blob; /* node._blob once it is an image (set once, never changed after), or NULL */
} Slot;

typedef struct {
    uint64_t id, put;
} Queued;

#define REFERENCED (UINT64_C(1) << 63) /* in Slot.put: found by a lookup (puts never get near 2**63) */

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t mask;    /* slots - 1 (a power of two), or 0 before the first put */
    Py_ssize_t used, capacity;
    uint64_t puts;  /* puts so far */
    Queued *ring;   /* puts in order, from ring[head] on, ``queued`` of them */
    size_t ring_size, head, queued;
    Py_ssize_t pins;       /* descents running on borrowed nodes */
    PyObject **buried;     /* references dropped while pinned, released when the last pin goes */
    Py_ssize_t nburied, buried_size;
} NodeTable;

static PyTypeObject NodeTableType;

static size_t
slot_of(const NodeTable *table, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 20) & table->mask;
}

/* The slot holding ``id``, or NULL. */
static Slot *
table_find(const NodeTable *table, uint64_t id)
{
    if (table->slots == NULL || id == 0) {
        return NULL;
    }
    for (size_t at = slot_of(table, id);; at = (at + 1) & table->mask) {
        Slot *slot = &table->slots[at];
        if (slot->id == id) {
            return slot;
        }
        if (slot->id == 0) {
            return NULL;
        }
    }
}

/* Empty ``slot`` (which the caller has taken the references of) and shift the run after it back. */
static void
table_unlink(NodeTable *table, Slot *slot)
{
    size_t hole = (size_t)(slot - table->slots), at = hole;
    for (;;) {
        at = (at + 1) & table->mask;
        Slot *next = &table->slots[at];
        if (next->id == 0) {
            break;
        }
        size_t home = slot_of(table, next->id);
        /* next may move to the hole if its home is not in (hole, at] (cyclically) */
        if ((at > hole) ? (home <= hole || home > at) : (home <= hole && home > at)) {
            table->slots[hole] = *next;
            hole = at;
        }
    }
    table->slots[hole] = (Slot){0, 0, NULL, NULL};
    table->used--;
}

/* Remove ``id`` if present: 1 with the node and blob handed to the caller, else 0. */
static int
table_take(NodeTable *table, uint64_t id, PyObject **node, PyObject **blob)
{
    Slot *slot = table_find(table, id);
    if (slot == NULL) {
        return 0;
    }
    *node = slot->node;
    *blob = slot->blob;
    table_unlink(table, slot);
    return 1;
}

static int
table_resize(NodeTable *table, size_t size)
{
    Slot *old = table->slots;
    size_t old_size = old == NULL ? 0 : table->mask + 1;
    Slot *slots = PyMem_Calloc(size, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    table->slots = slots;
    table->mask = size - 1;
    for (size_t index = 0; index < old_size; index++) {
        if (old[index].id != 0) {
            size_t at = slot_of(table, old[index].id);
            while (slots[at].id != 0) {
                at = (at + 1) & table->mask;
            }
            slots[at] = old[index];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Mark a slot found by a lookup (its line is loaded already: written only when not marked yet). */
static inline void
slot_mark(Slot *slot)
{
    if (!(slot->put & REFERENCED)) {
        slot->put |= REFERENCED;
    }
}

/* Whether a queued put still stands: its id is in the table, stored by that put. */
static int
is_live(const NodeTable *table, Queued queued)
{
    const Slot *slot = table_find(table, queued.id);
    return slot != NULL && (slot->put & ~REFERENCED) == queued.put;
}

/* Queue a put. A full ring is first rebuilt with its live puts alone, in order, at twice the size
   when more than half of it is live. 0, or -1 with MemoryError. */
static int
ring_push(NodeTable *table, Queued queued)
{
    if (table->queued == table->ring_size) {
        size_t live = 0;
        for (size_t index = 0; index < table->queued; index++) {
            live += is_live(table, table->ring[(table->head + index) % table->ring_size]);
        }
        size_t size = table->ring_size < 64 ? 64 : table->ring_size;
        if (live * 2 > size) {
            size *= 2;
        }
        Queued *ring = PyMem_Malloc(size * sizeof(Queued));
        if (ring == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        size_t kept = 0;
        for (size_t index = 0; index < table->queued; index++) {
            Queued old = table->ring[(table->head + index) % table->ring_size];
            if (is_live(table, old)) {
                ring[kept++] = old;
            }
        }
        PyMem_Free(table->ring);
        table->ring = ring;
        table->ring_size = size;
        table->head = 0;
        table->queued = kept;
    }
    table->ring[(table->head + table->queued) % table->ring_size] = queued;
    table->queued++;
    return 0;
}

/* A node id from an object: 1 with *id set for an exact int from 1 to 2**64 - 1, else 0. */
static int
table_id(PyObject *value, uint64_t *id)
{
    if (!PyLong_CheckExact(value)) {
        return 0;
    }
    unsigned long long number = PyLong_AsUnsignedLongLong(value);
    if (number == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or beyond 64 bits: never an id */
        return 0;
    }
    *id = (uint64_t)number;
    return number != 0;
}

static PyObject *
table_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t capacity;
    static char *names[] = {"capacity", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:NodeTable", names, &capacity)) {
        return NULL;
    }
    NodeTable *table = (NodeTable *)type->tp_alloc(type, 0);
    if (table != NULL) {
        table->capacity = capacity;
    }
    return (PyObject *)table;
}

/* Release a reference the table dropped, or keep it until the last pin goes (see above). Should
   ``buried`` fail to grow (no memory), the reference is kept for good: a leak, not a freed node
   under a descent. */
static void
table_release(NodeTable *table, PyObject *reference)
{
    if (reference == NULL) {
        return;
    }
    if (table->pins == 0) {
        Py_DECREF(reference);
        return;
    }
    if (table->nburied == table->buried_size) {
        Py_ssize_t size = table->buried_size < 16 ? 16 : 2 * table->buried_size;
        PyObject **grown = PyMem_Realloc(table->buried, (size_t)size * sizeof(PyObject *));
        if (grown == NULL) {
            return;
        }
        table->buried = grown;
        table->buried_size = size;
    }
    table->buried[table->nburied++] = reference;
}

static void
table_pin(NodeTable *table)
{
    table->pins++;
}

/* End a descent: the last one releases what the table dropped meanwhile. */
static void
table_unpin(NodeTable *table)
{
    if (--table->pins > 0 || table->nburied == 0) {
        return;
    }
    PyObject **buried = table->buried;
    Py_ssize_t count = table->nburied;
    table->buried = NULL;
    table->nburied = table->buried_size = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        Py_DECREF(buried[index]);
    }
    PyMem_Free(buried);
}

/* Forget every node: the slots are detached first, then their references released. */
static void
table_drop_all(NodeTable *table)
{
    Slot *slots = table->slots;
    size_t size = slots == NULL ? 0 : table->mask + 1;
    table->slots = NULL;
    table->mask = 0;
    table->used = 0;
    table->head = table->queued = 0;
    for (size_t index = 0; index < size; index++) {
        if (slots[index].id != 0) {
            table_release(table, slots[index].node);
            table_release(table, slots[index].blob);
        }
    }
    PyMem_Free(slots);
}

static void
table_dealloc(NodeTable *table)
{
    table_drop_all(table); /* never pinned here: a descent holds a reference to the table */
    PyMem_Free(table->ring);
    PyMem_Free(table->buried);
    Py_TYPE(table)->tp_free((PyObject *)table);
}

static Py_ssize_t
table_length(NodeTable *table)
{
    return table->used;
}

static PyObject *
table_get(NodeTable *table, PyObject *key)
{
    uint64_t id;
    Slot *slot = table_id(key, &id) ? table_find(table, id) : NULL;
    if (slot == NULL) {
        Py_RETURN_NONE;
    }
    slot_mark(slot);
    return Py_NewRef(slot->node);
}

static PyObject *
table_discard(NodeTable *table, PyObject *key)
{
    uint64_t id;
    PyObject *node, *blob;
    if (table_id(key, &id) && table_take(table, id, &node, &blob)) {
        table_release(table, node);
        table_release(table, blob);
    }
    Py_RETURN_NONE;
}

static PyObject *
table_clear(NodeTable *table, PyObject *Py_UNUSED(ignored))
{
    table_drop_all(table);
    Py_RETURN_NONE;
}

/* put(node): remember a committed node under node.id, first evicting one if the table is full. */
static PyObject *
table_put(NodeTable *table, PyObject *node)
{
    PyObject *key = PyObject_GetAttr(node, id_name);
    if (key == NULL) {
        return NULL;
    }
    uint64_t id;
    int valid = table_id(key, &id);
    Py_DECREF(key);
    if (!valid) {
        PyErr_SetString(PyExc_ValueError, "a node's id must be an int from 1 to 2**64 - 1");
        return NULL;
    }
    if (table->capacity <= 0) {
        Py_RETURN_NONE;
    }
    Slot *slot = table_find(table, id);
    if (slot != NULL) { /* the same node decoded twice (two threads): keep the newer, in place */
        PyObject *old = slot->node, *blob = slot->blob;
        slot->node = Py_NewRef(node);
        slot->blob = NULL;
        table_release(table, old);
        table_release(table, blob);
        Py_RETURN_NONE;
    }
    while (table->used >= table->capacity && table->queued) { /* room first: the new node is no candidate */
        Queued oldest = table->ring[table->head];
        table->head = (table->head + 1) % table->ring_size;
        table->queued--;
        Slot *queued = table_find(table, oldest.id);
        if (queued == NULL || (queued->put & ~REFERENCED) != oldest.put) {
            continue; /* gone, or put again since */
        }
        if (queued->put & REFERENCED) { /* a second chance; at most one round, as each pass unmarks */
            queued->put &= ~REFERENCED;
            if (ring_push(table, oldest) < 0) {
                return NULL;
            }
            continue;
        }
        PyObject *evicted, *blob;
        if (table_take(table, oldest.id, &evicted, &blob)) {
            table_release(table, evicted);
            table_release(table, blob);
        }
    }
    if ((size_t)(table->used + 1) * 2 > (table->slots == NULL ? 0 : table->mask + 1)) {
        if (table_resize(table, table->slots == NULL ? 64 : (table->mask + 1) * 2) < 0) {
            return NULL;
        }
    }
    Queued queued = {id, ++table->puts};
    if (ring_push(table, queued) < 0) {
        return NULL;
    }
    size_t at = slot_of(table, id);
    while (table->slots[at].id != 0) {
        at = (at + 1) & table->mask;
    }
    table->slots[at] = (Slot){id, queued.put, Py_NewRef(node), NULL};
    table->used++;
    Py_RETURN_NONE;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)table_get, METH_O, "get(node_id) -> the cached node, or None."},
    {"put", (PyCFunction)table_put, METH_O,
     "put(node): remember a committed node under node.id, evicting the oldest beyond capacity."},
    {"discard", (PyCFunction)table_discard, METH_O, "discard(node_id): forget a node if cached."},
    {"clear", (PyCFunction)table_clear, METH_NOARGS, "clear(): forget every node."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef table_members[] = {
    {"capacity", T_PYSSIZET, offsetof(NodeTable, capacity), READONLY, "the most nodes kept"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods table_as_sequence = {.sq_length = (lenfunc)table_length};

static PyTypeObject NodeTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tallytree._speedups.NodeTable",
    .tp_basicsize = sizeof(NodeTable),
    .tp_dealloc = (destructor)table_dealloc,
    .tp_as_sequence = &table_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NodeTable(capacity): committed nodes by id, with their search images, first in first "
              "out beyond capacity (the store of _store.NodeCache).",
    .tp_methods = table_methods,
    .tp_members = table_members,
    .tp_new = table_new,
};

/* The node ``id`` from the table (borrowed: the caller has pinned the table), with its image
   (borrowed too) in *blob when it has one; NULL (no error) when the table does not hold it. */
static PyObject *
table_child(NodeTable *table, uint64_t id, PyObject **blob)
{
    Slot *slot = table_find(table, id);
    if (slot == NULL) {
        return NULL;
    }
    slot_mark(slot);
    PyObject *node = slot->node;
    if (slot->blob == NULL) { /* learn the image once the node has one (its second search) */
        *blob = NULL;
        PyObject *found = PyObject_GetAttr(node, blob_name);
        if (found == NULL) {
            PyErr_Clear(); /* node_image raises it */
        }
        else if (PyBytes_CheckExact(found) && (slot = table_find(table, id)) != NULL && slot->node == node) {
            slot->blob = Py_NewRef(found);
            *blob = found;
        }
        Py_XDECREF(found);
        return node;
    }
    *blob = slot->blob;
    return node;
}

/* ------------------------------------------------------------------ descents */

/* Ranks (rank, rank_range of _btree.NodeTree) descend one node per level: search the node, add the
   cumulative count of the children left of the path, fetch the child. Here the whole descent is one
   call: a child is looked up in ``nodes`` (the shared cache of committed nodes, for a read
   transaction; None in a write transaction, whose dirty nodes must come first), else fetched through
   ``fetch(node_id)`` (the transaction's ``node``). The lookups found in ``nodes`` are counted in
   ``*hits`` for the cache statistics. */

typedef struct {
    PyObject *nodes;  /* a dict, or NULL */
    NodeTable *table; /* or a NodeTable (pinned while the descent runs), or NULL */
    PyObject *fetch;
    Py_ssize_t hits;
    /* the nodes taken from ``nodes`` or ``fetch`` (references): in ``local``, then on the heap */
    PyObject **kept, *local[16];
    Py_ssize_t nkept, kept_size;
} Fetcher;

/* Keep ``node`` (a reference this consumes) until the descent ends: the node, borrowed, or NULL
   with an error set (and NULL given: NULL). A descent holds no reference of its own to the nodes it
   passes through (see NodeTable): those of the table stay alive while it is pinned, these here. */
static PyObject *
fetcher_keep(Fetcher *fetcher, PyObject *node)
{
    if (node == NULL) {
        return NULL;
    }
    if (fetcher->nkept == fetcher->kept_size) {
        Py_ssize_t size = 2 * fetcher->kept_size;
        PyObject **grown = PyMem_Malloc((size_t)size * sizeof(PyObject *));
        if (grown == NULL) {
            Py_DECREF(node);
            PyErr_NoMemory();
            return NULL;
        }
        memcpy(grown, fetcher->kept, (size_t)fetcher->nkept * sizeof(PyObject *));
        if (fetcher->kept != fetcher->local) {
            PyMem_Free(fetcher->kept);
        }
        fetcher->kept = grown;
        fetcher->kept_size = size;
    }
    fetcher->kept[fetcher->nkept++] = node;
    return node;
}

/* The number of keys of a node; -1 with an error set. */
static Py_ssize_t
node_size(PyObject *node, const Image *image)
{
    if (image->blob != NULL) {
        return image->count;
    }
    PyObject *keys = PyObject_GetAttr(node, keys_name);
    Py_ssize_t count = keys == NULL ? -1 : PyObject_Length(keys);
    Py_XDECREF(keys);
    return count;
}

/* Start loading the first lines of a cold child's image: its header and the key prefixes a search
   bisects (a node of 64 keys: 520 bytes after the object's header). A bisection waits for each of
   its probes in turn, a miss each on a node out of the CPU caches; loaded up front, the lines come in
   together, and while they come the caller goes on (the other descent of a range, the release of the
   parent). A prefetch never faults: lines past a small image's end cost a load, nothing more. */
#define PREFETCH_LINES 9
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch(address)
#else
#define PREFETCH(address) ((void)(address)) /* a hint only: other compilers go without */
#endif
static void
prefetch_image(PyObject *blob)
{
    if (blob != NULL) {
        const char *start = (const char *)blob;
        for (int line = 0; line < PREFETCH_LINES; line++) {
            PREFETCH(start + 64 * line);
        }
    }
}

/* Start loading the lines of [start, stop), at most ``most`` of them. */
static void
prefetch_range(const char *start, const char *stop, int most)
{
    for (const char *line = start; line < stop && most > 0; line += 64, most--) {
        PREFETCH(line);
    }
    if (stop > start && most > 0) {
        PREFETCH(stop - 1); /* the last line, when the range does not start on a line's boundary */
    }
}

/* Start loading the key prefixes of an open image that prefetch_image's first lines did not cover
   (a node of more than ~64 keys), which a search bisects: a walk opens every walk's image before
   searching any, so that these lines of both come in together. */
static void
prefetch_prefixes(const Image *image)
{
    if (image->blob != NULL) { /* the prefixes' bytes that lie past the first lines, if any */
        Py_ssize_t covered = 64 * PREFETCH_LINES - (image->prefixes - (const char *)image->blob);
        if (8 * image->count > covered) {
            prefetch_range(image->prefixes + covered, image->prefixes + 8 * image->count, 32);
        }
    }
}

/* A descent of two cuts (a range below the node where they part) waits, at each level of each cut,
   for a chain of cache misses on a tree out of the CPU caches: the line of the child's id and count
   (and summary rows, for a range sum) in the node's image, then the node table's slot of that id,
   then the child's image. Done one cut after the other, the chains add up; split into phases across
   both cuts (every search, then every child id, then every lookup), the two cuts' misses of each
   phase come in together. These two start the loads of the first two phases. */

/* Start loading what the step down to child ``index`` of an internal node reads from its image: the
   child's id, the cumulative counts around it and, with ``fields`` > 0 (a range sum of that many
   value fields), the shifts and the summary rows around it. */
static void
prefetch_child(const Image *image, Py_ssize_t index, Py_ssize_t fields)
{
    if (image->blob == NULL || image->kind != IMAGE_INTERNAL || index < 0 || index >= image->count) {
        return;
    }
    PREFETCH(image->kids + 8 * index);
    prefetch_range(image->counts + 8 * index, image->counts + 8 * index + 16, 2);
    if (fields > 0 && image->fields == fields) {
        const char *rows = image->values + align8(4 * fields) + index * 24 * fields;
        PREFETCH(image->values);
        prefetch_range(rows, rows + 48 * fields, 8);
    }
}

/* Start loading the node table's slot of child ``index`` of an internal node, reading the child's id
   from its image (prefetch_child has started loading it): the lookup of child_of then finds it under
   way. A hint only: the slot a probe starts at, which holds the id but after a collision. */
static void
prefetch_slot(const Image *image, Py_ssize_t index, const Fetcher *fetcher)
{
    const NodeTable *table = fetcher->table;
    if (table == NULL || table->slots == NULL || image->blob == NULL || image->kind != IMAGE_INTERNAL ||
        index < 0 || index >= image->count) {
        return;
    }
    uint64_t id;
    memcpy(&id, image->kids + 8 * index, sizeof(id));
    PREFETCH(&table->slots[slot_of(table, id)]);
}

/* -1 with tallytree's CorruptDatabaseError set to ``message`` (a str this consumes; NULL: an error is
   set already), or ImportError if that cannot be found. */
static int
corrupt_with(PyObject *message)
{
    if (message == NULL) {
        return -1;
    }
    PyObject *errors = PyImport_ImportModule("tallytree.errors");
    PyObject *type = errors == NULL ? NULL : PyObject_GetAttrString(errors, "CorruptDatabaseError");
    Py_XDECREF(errors);
    if (type != NULL) {
        PyErr_SetObject(type, message);
        Py_DECREF(type);
    }
    Py_DECREF(message);
    return -1;
}

/* -1 with tallytree's CorruptDatabaseError set to ``message``. */
static int
corrupt(const char *message)
{
    return corrupt_with(PyUnicode_FromString(message));
}

/* The id of a node, for a message: a new reference (None when it has none). */
static PyObject *
id_of(PyObject *node)
{
    PyObject *found = PyObject_GetAttr(node, id_name);
    if (found == NULL) {
        PyErr_Clear();
        found = Py_NewRef(Py_None);
    }
    return found;
}

/* A descent past MAX_LEVELS follows damaged child ids that lead back up: without a bound it would
   loop for ever. -1 with CorruptDatabaseError set. */
#define MAX_LEVELS 64 /* more levels than any tree has (_btree.MAX_LEVELS) */
static int
too_deep(void)
{
    return corrupt("a descent went deeper than any tree goes: damaged child ids form a cycle; "
                   "run `tallytree check` to locate the damage");
}

/* The shape checks of the descents. Every node of a tree holds the same number of value fields: a
   leaf one column per field, an internal node its counts, then a sum and a float count per field. A
   node of another number is a node of another aggregate (a damaged child id, or a node record that a
   foreign writer swapped): read as this tree's, its counts, rows and values would answer wrong, or
   fail untyped. So each descent compares every node it opens with the tree's number, read from the
   node's image header (one comparison; its attributes only when it has no image or no values
   section, never a compact leaf's lists): the number the caller gives (``range_totals`` and
   ``settle`` take it; ``rank``, ``rank_range``, ``select`` and ``find`` take it as an optional last
   argument), or else the first node's, so that a foreign node below it is refused. And a leaf holds
   as many entries as its parent (or the root record, when ``range_totals`` starts at it) counts for
   it: a leaf of another place, or one emptied by damage, is refused where a descent would count or
   sum it by the parent's figures. Both raise CorruptDatabaseError naming the node. */
/* Neither is -1, an image's number when it has no values section (so never equal to one). */
#define FIELDS_UNKNOWN (-3) /* not given: the first node's number stands for the tree's */
#define FIELDS_ODD (-2)     /* an internal node of an even number of columns: no number of fields */

typedef struct {
    Py_ssize_t count; /* the tree's number of value fields, or FIELDS_UNKNOWN until the first node */
    int given;        /* whether the caller gave it */
} Fields;

/* The fields argument of a descent (``args[at]`` when there are more than ``at`` arguments) into
   *fields: 0, or -1 with TypeError or ValueError. */
static int
fields_argument(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t at, const char *what, Fields *fields)
{
    fields->count = FIELDS_UNKNOWN;
    fields->given = nargs > at;
    return fields->given ? size_argument(args[at], what, &fields->count) : 0;
}

/* The number of value fields of a node (see above) into *found: 0, or -1 with an error set. */
static int
node_fields(PyObject *node, const Image *image, int leaf, Py_ssize_t *found)
{
    if (image->blob != NULL && image->fields >= 0) {
        *found = image->fields;
        return 0;
    }
    PyObject *cols = PyObject_GetAttr(node, cols_name);
    Py_ssize_t width = cols == NULL ? -1 : PyObject_Length(cols);
    Py_XDECREF(cols);
    if (width < 0) {
        return -1;
    }
    *found = leaf ? width : width % 2 == 1 ? (width - 1) / 2 : FIELDS_ODD;
    return 0;
}

/* -1 with CorruptDatabaseError set for a node that holds ``found`` value fields where its tree holds
   ``fields->count``. */
static int
foreign_node(PyObject *node, Py_ssize_t found, const Fields *fields)
{
    PyObject *id = id_of(node);
    PyObject *message;
    if (found == FIELDS_ODD) {
        message = PyUnicode_FromFormat(
            "node %S is an internal node of an even number of columns, which no aggregate's node "
            "holds; run `tallytree check` to locate the damage",
            id);
    }
    else {
        message = PyUnicode_FromFormat(
            "node %S holds %zd value field(s) where %s %zd: a node of another aggregate (a damaged "
            "child id, or node record); run `tallytree check` to locate the damage",
            id, found, fields->given ? "its aggregate has" : "the first node of the descent holds", fields->count);
    }
    Py_DECREF(id);
    return corrupt_with(message);
}

#if defined(__GNUC__) || defined(__clang__)
#define COLD __attribute__((cold, noinline)) /* off the descents' straight path */
#else
#define COLD
#endif

/* check_fields beyond its first test (a node without an image or values section, the first node,
   or a mismatch). */
static COLD int
check_fields_further(PyObject *node, const Image *image, int leaf, Fields *fields)
{
    Py_ssize_t found;
    if (node_fields(node, image, leaf, &found) < 0) {
        return -1;
    }
    if (found == fields->count) {
        return 0;
    }
    if (fields->count == FIELDS_UNKNOWN && found >= 0) {
        fields->count = found;
        return 0;
    }
    return foreign_node(node, found, fields);
}

/* Whether a node a descent opened (``leaf`` its kind) holds the tree's number of value fields,
   learnt from it when not known yet: 0, or -1 with CorruptDatabaseError (or an error of its
   attributes) set. One comparison for a node whose image has a values section. */
static inline int
check_fields(PyObject *node, const Image *image, int leaf, Fields *fields)
{
    if (image->blob != NULL) {
        if (image->fields == fields->count) {
            return 0;
        }
        if (fields->count == FIELDS_UNKNOWN && image->fields >= 0) { /* the first node's, not given */
            fields->count = image->fields;
            return 0;
        }
    }
    return check_fields_further(node, image, leaf, fields);
}

/* check_count beyond its first test (a leaf without an image, or a mismatch). */
static COLD int
check_count_further(PyObject *node, const Image *image, Py_ssize_t expected)
{
    Py_ssize_t size = node_size(node, image);
    if (size < 0 || size == expected) {
        return size < 0 ? -1 : 0;
    }
    PyObject *id = id_of(node);
    PyObject *message = PyUnicode_FromFormat(
        "node %S holds %zd entries where its parent counts %zd: a leaf of another place, or damaged; "
        "run `tallytree check` to locate the damage",
        id, size, expected);
    Py_DECREF(id);
    return corrupt_with(message);
}

/* Whether a leaf holds ``expected`` entries, what its parent (or the root record) counts for it; -1
   (no count known: the descent began at the leaf) passes. 0, or -1 with CorruptDatabaseError (or an
   error of its attributes) set. One comparison for a leaf with an image. */
static inline int
check_count(PyObject *node, const Image *image, Py_ssize_t expected)
{
    if (expected < 0 || (image->blob != NULL && image->count == expected)) {
        return 0;
    }
    return check_count_further(node, image, expected);
}

/* Two descents that part at one node reach their leaves at one depth: -1 with CorruptDatabaseError
   set (a child id that leads to another level of the tree, or into another tree). */
static int
uneven_depths(void)
{
    return corrupt("two descents from one node reached leaves at different depths: a damaged child id "
                   "leads to another level or tree; run `tallytree check` to locate the damage");
}

/* One level of a descent: ``node``'s image opened into *image (see node_image_hinted) and whether the
   node is a leaf, 1 or 0, its number of value fields checked (check_fields); -1 with an error set
   (the image released), CorruptDatabaseError when ``levels`` (this one's depth, from 1) is past
   MAX_LEVELS or the node is of another aggregate. */
static int
open_level(PyObject *node, PyObject *hint, Image *image, int levels, Fields *fields)
{
    image->blob = NULL;
    int leaf = levels > MAX_LEVELS ? too_deep()
               : node_image_hinted(node, hint, image) < 0 ? -1
                                                           : image_is_leaf(node, image);
    if (leaf >= 0 && check_fields(node, image, leaf, fields) < 0) {
        leaf = -1;
    }
    if (leaf < 0) {
        image_release(image);
    }
    return leaf;
}

/* The child ``index`` of an internal node (borrowed: see fetcher_keep), or NULL with an error set;
   with its image in *hint (borrowed, see node_image_hinted) when the node table knows it, else NULL. */
static PyObject *
child_of(PyObject *node, const Image *image, Py_ssize_t index, Fetcher *fetcher, PyObject **hint)
{
    PyObject *kid;
    *hint = NULL;
    if (image->kind == IMAGE_INTERNAL && image->blob != NULL) {
        if (index < 0 || index >= image->count) {
            PyErr_SetString(PyExc_IndexError, "child index out of range");
            return NULL;
        }
        uint64_t id;
        memcpy(&id, image->kids + index * 8, sizeof(id));
        if (fetcher->table != NULL) { /* no int object at all for a node the table holds */
            PyObject *child = table_child(fetcher->table, id, hint);
            if (child != NULL) {
                prefetch_image(*hint);
                fetcher->hits++;
                return child;
            }
        }
        kid = PyLong_FromUnsignedLongLong(id);
    }
    else {
        PyObject *kids = PyObject_GetAttr(node, kids_name);
        if (kids == NULL) {
            return NULL;
        }
        kid = PySequence_GetItem(kids, index);
        Py_DECREF(kids);
    }
    if (kid == NULL) {
        return NULL;
    }
    uint64_t id;
    if (fetcher->table != NULL && table_id(kid, &id)) {
        PyObject *child = table_child(fetcher->table, id, hint);
        if (child != NULL) {
            fetcher->hits++;
            Py_DECREF(kid);
            return child;
        }
    }
    if (fetcher->nodes != NULL) {
        PyObject *child = PyDict_GetItemWithError(fetcher->nodes, kid);
        if (child != NULL) {
            fetcher->hits++;
            Py_DECREF(kid);
            return fetcher_keep(fetcher, Py_NewRef(child));
        }
        if (PyErr_Occurred()) {
            Py_DECREF(kid);
            return NULL;
        }
    }
    PyObject *child = PyObject_CallOneArg(fetcher->fetch, kid);
    Py_DECREF(kid);
    return fetcher_keep(fetcher, child);
}

/* The items in the children before ``index`` of an internal node (node.counts()[index]). */
static int
count_before(PyObject *node, const Image *image, Py_ssize_t index, Py_ssize_t *count)
{
    if (image->kind == IMAGE_INTERNAL && image->blob != NULL) {
        if (index < 0 || index > image->count) {
            PyErr_SetString(PyExc_IndexError, "child index out of range");
            return -1;
        }
        int64_t before;
        memcpy(&before, image->counts + index * 8, sizeof(before));
        *count = (Py_ssize_t)before;
        return 0;
    }
    PyObject *counts = derived(node, counts_cache_name, counts_name);
    if (counts == NULL) {
        return -1;
    }
    PyObject *item = PySequence_GetItem(counts, index);
    Py_DECREF(counts);
    if (item == NULL) {
        return -1;
    }
    *count = PyLong_AsSsize_t(item);
    Py_DECREF(item);
    return *count == -1 && PyErr_Occurred() ? -1 : 0;
}

/* The items in the children before ``index`` of an internal node and in child ``index`` itself
   (``node.counts()[index]``, and ``[index + 1]`` less that): 0, or -1 with an error set. */
static inline int
counts_at(PyObject *node, const Image *image, Py_ssize_t index, Py_ssize_t *before, Py_ssize_t *within)
{
    if (image->kind == IMAGE_INTERNAL && image->blob != NULL && index >= 0 && index < image->count) {
        int64_t pair[2]; /* counts[index] and counts[index + 1]: one line, mostly */
        memcpy(pair, image->counts + index * 8, sizeof(pair));
        *before = (Py_ssize_t)pair[0];
        *within = (Py_ssize_t)(pair[1] - pair[0]);
        return 0;
    }
    Py_ssize_t after;
    if (count_before(node, image, index, before) < 0 || count_before(node, image, index + 1, &after) < 0) {
        return -1;
    }
    *within = after - *before;
    return 0;
}

/* The index of the child of an internal node whose subtree holds the cut at ``key``. */
static Py_ssize_t
child_index(PyObject *node, const Image *image, const char *key, Py_ssize_t size)
{
    Py_ssize_t found = image_search(node, image, key, size, 1);
    return found < 0 ? -1 : found > 0 ? found - 1 : 0; /* keys[0] is the node's fence: <= any key below */
}

/* ``count`` descents (one rank, or the two cuts of a range below the node where they part):
   ``ranks[side]`` grows by the number of entries < cuts[side] (<= when afters[side]) below
   nodes[side] (borrowed), whose parent counts ``within[side]`` entries in it (-1: no parent, the
   descent starts at the tree's root). Two step down level by level in turn, each level in phases
   across both (see prefetch_child): open both images, search both nodes, read both child ids, then
   step down both; the cache misses of each phase then come in together, where one descent after
   the other waits for each miss in turn. Each node's number of value fields and each leaf's count
   are checked (see check_fields), and two descents must reach their leaves at the same level. 0, or
   -1 with an error set. */
static int
descend(int count, PyObject *nodes[], PyObject *hints[], const char *cuts[], const Py_ssize_t sizes[],
        const int afters[], Py_ssize_t ranks[], Py_ssize_t within[], Fields *fields, Fetcher *fetcher)
{
    Image images[2] = {{.blob = NULL}, {.blob = NULL}};
    int done[2] = {count < 1, count < 2}, leaves[2] = {0, 0}, failed = 0, levels = 0;
    Py_ssize_t found[2] = {0, 0};
    while (!failed && !(done[0] && done[1])) {
        if (++levels > MAX_LEVELS) {
            failed = too_deep();
            break;
        }
        for (int side = 0; side < count && !failed; side++) {
            failed = !done[side] && node_image_hinted(nodes[side], hints[side], &images[side]) < 0;
            prefetch_prefixes(&images[side]);
        }
        for (int side = 0; side < count && !failed; side++) { /* the searches */
            if (done[side]) {
                continue;
            }
            PyObject *node = nodes[side];
            Image *image = &images[side];
            int leaf = leaves[side] = image_is_leaf(node, image);
            if (leaf < 0 || check_fields(node, image, leaf, fields) < 0) {
                failed = 1;
            }
            else if (leaf) {
                found[side] = check_count(node, image, within[side]) < 0
                                  ? -1
                                  : image_search(node, image, cuts[side], sizes[side], afters[side]);
                failed = found[side] < 0;
            }
            else {
                found[side] = child_index(node, image, cuts[side], sizes[side]);
                failed = found[side] < 0;
                prefetch_child(image, found[side], 0);
            }
        }
        for (int side = 0; side < count && !failed; side++) {
            if (!done[side] && !leaves[side]) {
                prefetch_slot(&images[side], found[side], fetcher);
            }
        }
        for (int side = 0; side < count && !failed; side++) { /* the steps down */
            if (done[side]) {
                continue;
            }
            PyObject *node = nodes[side];
            Image *image = &images[side];
            if (leaves[side]) {
                ranks[side] += found[side];
                done[side] = 1;
            }
            else {
                Py_ssize_t index = found[side], before;
                failed = counts_at(node, image, index, &before, &within[side]) < 0;
                PyObject *child = failed ? NULL : child_of(node, image, index, fetcher, &hints[side]);
                if (child == NULL) {
                    failed = 1;
                }
                else {
                    ranks[side] += before;
                    nodes[side] = child;
                }
            }
            image_release(image);
        }
        if (!failed && count == 2 && done[0] != done[1]) {
            failed = uneven_depths();
        }
    }
    for (int side = 0; side < count; side++) {
        image_release(&images[side]);
    }
    return failed ? -1 : 0;
}

static int
fetcher_from(PyObject *fetch, PyObject *nodes, Fetcher *fetcher)
{
    int table = Py_IS_TYPE(nodes, &NodeTableType);
    if (!PyCallable_Check(fetch) || (nodes != Py_None && !table && !PyDict_CheckExact(nodes))) {
        PyErr_SetString(PyExc_TypeError, "fetch must be callable and nodes a NodeTable, a dict or None");
        return -1;
    }
    fetcher->fetch = fetch;
    fetcher->nodes = nodes == Py_None || table ? NULL : nodes;
    fetcher->table = table ? (NodeTable *)nodes : NULL;
    fetcher->hits = 0;
    fetcher->kept = fetcher->local;
    fetcher->nkept = 0;
    fetcher->kept_size = (Py_ssize_t)(sizeof(fetcher->local) / sizeof(fetcher->local[0]));
    if (fetcher->table != NULL) {
        table_pin(fetcher->table);
    }
    return 0;
}

/* End a descent begun by fetcher_from: unpin the table, release the nodes kept. */
static void
fetcher_end(Fetcher *fetcher)
{
    if (fetcher->table != NULL) {
        table_unpin(fetcher->table);
    }
    for (Py_ssize_t index = 0; index < fetcher->nkept; index++) {
        Py_DECREF(fetcher->kept[index]);
    }
    if (fetcher->kept != fetcher->local) {
        PyMem_Free(fetcher->kept);
    }
    fetcher->kept = fetcher->local;
    fetcher->nkept = 0;
}

/* The child of an internal node whose subtree holds entry ``*index`` of the node's subtree (the last
   child whose cumulative count is <= it), ``*index`` made relative to that child: through the image's
   counts, or ``node.counts()``, with the entries the node counts in that child in *within. The
   child's position, or -1 with an error set. */
static Py_ssize_t
child_by_count(PyObject *node, const Image *image, Py_ssize_t *index, Py_ssize_t *within)
{
    PyObject *counts = NULL;
    Py_ssize_t size;
    if (image->kind == IMAGE_INTERNAL && image->blob != NULL) {
        size = image->count + 1;
    }
    else {
        counts = derived(node, counts_cache_name, counts_name);
        size = counts == NULL ? -1 : PyObject_Length(counts);
        if (size < 0) {
            Py_XDECREF(counts);
            return -1;
        }
    }
    Py_ssize_t low = 0, high = size, before = 0, after = 0; /* bisect_right(counts, index) */
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2, value;
        if (counts == NULL) {
            int64_t stored;
            memcpy(&stored, image->counts + middle * 8, sizeof(stored));
            value = (Py_ssize_t)stored;
        }
        else {
            PyObject *item = PySequence_GetItem(counts, middle);
            value = item == NULL ? -1 : PyLong_AsSsize_t(item);
            Py_XDECREF(item);
            if (value == -1 && PyErr_Occurred()) {
                Py_DECREF(counts);
                return -1;
            }
        }
        if (value <= *index) {
            low = middle + 1;
            before = value;
        }
        else {
            high = middle;
            after = value; /* counts[low] once the search ends */
        }
    }
    Py_XDECREF(counts);
    if (low < 1 || low >= size) { /* the parent (or the root record) counts more than the node holds */
        return corrupt("a node holds fewer entries than its parent counts; run `tallytree check` to "
                       "locate the damage");
    }
    *index -= before;
    *within = after - before;
    return low - 1;
}

/* The entry at ``position`` of a leaf and its values, read from the leaf's image: ``(entry, values)``
   (new objects), or NULL with no error set when the image does not hold them (no image, no values
   section, or a column of mixed kinds: the caller reads the node's lists instead), or NULL with an
   error set. The values equal the node's own (a float column holds exact floats as doubles, an int
   column exact ints of the int64 range as int64s), and so does the entry. Reading the image costs a
   few contiguous lines where the node's objects cost a chain of misses: its keys tuple, then the
   key; its columns, then each column, then each value. */
static PyObject *
image_entry(const Image *image, Py_ssize_t position)
{
    if (image->blob == NULL || image->kind != IMAGE_LEAF || image->fields < 0 || position < 0 ||
        position >= image->count) {
        return NULL;
    }
    Py_ssize_t fields = image->fields, count = image->count;
    const char *columns = image->values + align8(fields);
    for (Py_ssize_t field = 0; field < fields; field++) {
        if (image->values[field] != VALUES_FLOAT && image->values[field] != VALUES_INT) {
            return NULL;
        }
    }
    Py_ssize_t size;
    const char *key = image_key(image, position, &size);
    if (key == NULL) {
        return NULL;
    }
    PyObject *values = PyTuple_New(fields);
    for (Py_ssize_t field = 0; values != NULL && field < fields; field++) {
        PyObject *value = cell_value(columns + 8 * (field * count + position), image->values[field]);
        if (value == NULL) {
            Py_CLEAR(values);
            break;
        }
        PyTuple_SET_ITEM(values, field, value);
    }
    if (values == NULL) {
        return NULL;
    }
    PyObject *entry = PyBytes_FromStringAndSize(key, size);
    return entry == NULL ? (Py_DECREF(values), NULL) : Py_BuildValue("(NN)", entry, values);
}

/* select(node, index, fetch, nodes[, item[, fields]]) -> (leaf, position, hits): the leaf that holds
   entry ``index`` of the subtree of ``node`` and its position there (_btree.NodeTree.select's
   descent). With ``item`` true, ((entry, values), None, hits) instead when the leaf's image holds them
   (see image_entry). ``fields``: the tree's number of value fields (see check_fields). */
static PyObject *
tree_select(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Fetcher fetcher;
    Fields fields;
    if (nargs < 4 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError, "select(node, index, fetch, nodes[, item[, fields]])");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[1]), within = -1;
    int item = nargs >= 5 ? PyObject_IsTrue(args[4]) : 0;
    if ((index == -1 && PyErr_Occurred()) || item < 0 ||
        fields_argument(args, nargs, 5, "select(): fields", &fields) < 0 ||
        fetcher_from(args[2], args[3], &fetcher) < 0) {
        return NULL;
    }
    PyObject *node = args[0], *hint = NULL, *result = NULL;
    for (int levels = 1; node != NULL; levels++) {
        Image image;
        int leaf = open_level(node, hint, &image, levels, &fields);
        if (leaf > 0 && check_count(node, &image, within) < 0) {
            image_release(&image);
            break;
        }
        if (leaf > 0 && item) {
            PyObject *found = image_entry(&image, index);
            if (found != NULL || PyErr_Occurred()) {
                image_release(&image);
                result = found == NULL ? NULL : Py_BuildValue("(NOn)", found, Py_None, fetcher.hits);
                break;
            }
        }
        if (leaf != 0) {
            image_release(&image);
            result = leaf < 0 ? NULL : Py_BuildValue("(Onn)", node, index, fetcher.hits);
            break;
        }
        Py_ssize_t child = child_by_count(node, &image, &index, &within);
        node = child < 0 ? NULL : child_of(node, &image, child, &fetcher, &hint);
        image_release(&image);
        if (node != NULL) { /* the leaf is returned, and read: its object's lines come in meanwhile */
            PREFETCH((const char *)node);
            PREFETCH((const char *)node + 64);
        }
    }
    fetcher_end(&fetcher);
    return result;
}

/* Whether entry ``position`` of a leaf is ``key``: 1, 0, or -1 with an error set. */
static int
leaf_holds(PyObject *node, const Image *image, Py_ssize_t position, const char *key, Py_ssize_t size)
{
    if (image->blob != NULL) {
        if (position >= image->count) {
            return 0;
        }
        Py_ssize_t stored_size;
        const char *stored = image_key(image, position, &stored_size);
        return stored == NULL ? -1 : compare_bytes(stored, stored_size, key, size) == 0;
    }
    PyObject *keys = PyObject_GetAttr(node, keys_name);
    Py_ssize_t count = keys == NULL ? -1 : PyObject_Length(keys);
    PyObject *found = count < 0 || position >= count ? NULL : PySequence_GetItem(keys, position);
    Py_XDECREF(keys);
    if (found == NULL) {
        return count < 0 || position < count ? -1 : 0;
    }
    int same = PyBytes_Check(found) && PyBytes_GET_SIZE(found) == size &&
               memcmp(PyBytes_AS_STRING(found), key, (size_t)size) == 0;
    Py_DECREF(found);
    return same;
}

/* find(node, entry, fetch, nodes[, fields]) -> (found, position, hits): the leaf below ``node`` that
   would hold ``entry`` searched for it (_btree.NodeTree.find's descent). ``(None, None, hits)`` when it
   is absent; ``(values, None, hits)`` when the leaf's image holds its values (see image_entry); else
   ``(leaf, position, hits)``, the caller reading the values from the leaf's columns. ``fields``: the
   tree's number of value fields (see check_fields; this descent reads no counts, and checks none). */
static PyObject *
tree_find(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Fetcher fetcher;
    Fields fields;
    if ((nargs != 4 && nargs != 5) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "find(node, entry: bytes, fetch, nodes[, fields])");
        return NULL;
    }
    if (fields_argument(args, nargs, 4, "find(): fields", &fields) < 0 ||
        fetcher_from(args[2], args[3], &fetcher) < 0) {
        return NULL;
    }
    const char *key = PyBytes_AS_STRING(args[1]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[1]);
    PyObject *node = args[0], *hint = NULL, *result = NULL;
    for (int levels = 1; node != NULL; levels++) {
        Image image;
        int leaf = open_level(node, hint, &image, levels, &fields);
        if (leaf < 0) {
            image_release(&image);
            break;
        }
        if (leaf) {
            Py_ssize_t position = image_search(node, &image, key, size, 0);
            int holds = position < 0 ? -1 : leaf_holds(node, &image, position, key, size);
            PyObject *entry = holds > 0 ? image_entry(&image, position) : NULL;
            image_release(&image);
            if (holds < 0 || PyErr_Occurred()) {
                Py_XDECREF(entry);
                break;
            }
            if (holds == 0) {
                result = Py_BuildValue("(OOn)", Py_None, Py_None, fetcher.hits);
            }
            else if (entry != NULL) { /* (entry, values): the values are what the caller wants */
                result = Py_BuildValue("(OOn)", PyTuple_GET_ITEM(entry, 1), Py_None, fetcher.hits);
                Py_DECREF(entry);
            }
            else {
                result = Py_BuildValue("(Onn)", node, position, fetcher.hits);
            }
            break;
        }
        Py_ssize_t index = child_index(node, &image, key, size);
        node = index < 0 ? NULL : child_of(node, &image, index, &fetcher, &hint);
        image_release(&image);
    }
    fetcher_end(&fetcher);
    return result;
}

/* rank(node, key, after, fetch, nodes[, fields]) -> (rank, hits); ``fields``: the tree's number of
   value fields (see check_fields). */
static PyObject *
tree_rank(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Fetcher fetcher;
    Fields fields;
    if ((nargs != 5 && nargs != 6) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "rank(node, key: bytes, after: bool, fetch, nodes[, fields])");
        return NULL;
    }
    int after = PyObject_IsTrue(args[2]);
    if (after < 0 || fields_argument(args, nargs, 5, "rank(): fields", &fields) < 0 ||
        fetcher_from(args[3], args[4], &fetcher) < 0) {
        return NULL;
    }
    PyObject *nodes[1] = {args[0]}, *hints[1] = {NULL};
    const char *cuts[1] = {PyBytes_AS_STRING(args[1])};
    Py_ssize_t sizes[1] = {PyBytes_GET_SIZE(args[1])}, ranks[1] = {0}, within[1] = {-1};
    int afters[1] = {after};
    int failed = descend(1, nodes, hints, cuts, sizes, afters, ranks, within, &fields, &fetcher) < 0;
    fetcher_end(&fetcher);
    return failed ? NULL : Py_BuildValue("nn", ranks[0], fetcher.hits);
}

/* rank_range(node, low, low_after, high, high_after, fetch, nodes[, fields]) -> (start, stop, hits):
   the two descents share the path down to the node where the cuts part. ``fields``: the tree's number
   of value fields (see check_fields). */
static PyObject *
tree_rank_range(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Fetcher fetcher;
    Fields fields;
    if ((nargs != 7 && nargs != 8) || !PyBytes_Check(args[1]) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "rank_range(node, low: bytes, low_after, high: bytes, high_after, fetch, nodes[, fields])");
        return NULL;
    }
    int low_after = PyObject_IsTrue(args[2]), high_after = PyObject_IsTrue(args[4]);
    if (low_after < 0 || high_after < 0 || fields_argument(args, nargs, 7, "rank_range(): fields", &fields) < 0 ||
        fetcher_from(args[5], args[6], &fetcher) < 0) {
        return NULL;
    }
    const char *low = PyBytes_AS_STRING(args[1]), *high = PyBytes_AS_STRING(args[3]);
    Py_ssize_t low_size = PyBytes_GET_SIZE(args[1]), high_size = PyBytes_GET_SIZE(args[3]);
    PyObject *node = args[0], *hint = NULL, *result = NULL;
    Py_ssize_t base = 0, within = -1;
    for (int levels = 1; node != NULL; levels++) {
        Image image;
        int leaf = open_level(node, hint, &image, levels, &fields);
        if (leaf < 0) {
            image_release(&image);
            break;
        }
        if (leaf) {
            Py_ssize_t start = check_count(node, &image, within) < 0
                                   ? -1
                                   : image_search(node, &image, low, low_size, low_after);
            Py_ssize_t stop = start < 0 ? -1 : image_search(node, &image, high, high_size, high_after);
            image_release(&image);
            result = stop < 0 ? NULL : Py_BuildValue("nnn", base + start, base + stop, fetcher.hits);
            break;
        }
        Py_ssize_t index = child_index(node, &image, low, low_size);
        Py_ssize_t other = index < 0 ? -1 : child_index(node, &image, high, high_size);
        Py_ssize_t before, at_other, within_other;
        if (index != other && other >= 0) { /* the two descents' first lookups, in phases */
            prefetch_child(&image, index, 0);
            prefetch_child(&image, other, 0);
            prefetch_slot(&image, index, &fetcher);
            prefetch_slot(&image, other, &fetcher);
        }
        if (other < 0 || counts_at(node, &image, index, &before, &within) < 0 ||
            (index != other && counts_at(node, &image, other, &at_other, &within_other) < 0)) {
            image_release(&image);
            break;
        }
        if (index != other) {
            PyObject *hints[2] = {NULL, NULL};
            PyObject *low_child = child_of(node, &image, index, &fetcher, &hints[0]);
            PyObject *high_child = low_child == NULL ? NULL : child_of(node, &image, other, &fetcher, &hints[1]);
            image_release(&image);
            if (high_child == NULL) {
                break;
            }
            PyObject *pair[2] = {low_child, high_child};
            const char *cuts[2] = {low, high};
            Py_ssize_t cut_sizes[2] = {low_size, high_size}, ranks[2] = {0, 0}, counted[2] = {within, within_other};
            int afters[2] = {low_after, high_after};
            if (descend(2, pair, hints, cuts, cut_sizes, afters, ranks, counted, &fields, &fetcher) == 0) {
                result = Py_BuildValue("nnn", base + before + ranks[0], base + at_other + ranks[1], fetcher.hits);
            }
            break;
        }
        base += before;
        node = child_of(node, &image, index, &fetcher, &hint);
        image_release(&image);
    }
    fetcher_end(&fetcher);
    return result;
}

/* ------------------------------------------------------------------ exact sums */

#define SLOTS 70            /* 32-bit digits: 2098 bits of doubles, room for carries and the sign */
#define FLUSH_EVERY (1 << 30) /* values added between two carry propagations (a slot holds 2**31) */
#define INT_SHIFT 1074      /* an int v is v * 2**1074 units */

typedef struct {
    int64_t slots[SLOTS];
    Py_ssize_t since; /* values added since the last carry propagation */
} Accumulator;

static void
propagate(Accumulator *acc)
{
    for (int index = 0; index < SLOTS - 1; index++) {
        int64_t carry = acc->slots[index] >> 32; /* arithmetic: floor division by 2**32 */
        acc->slots[index] -= carry * ((int64_t)1 << 32);
        acc->slots[index + 1] += carry;
    }
    acc->since = 0;
}

/* Add (or subtract) magnitude * 2**shift units: magnitude < 2**64, shift <= 2045 (slot + 2 < SLOTS). */
static void
accumulate(Accumulator *acc, uint64_t magnitude, unsigned shift, int negative)
{
    int slot = (int)(shift / 32);
    unsigned __int128 wide = (unsigned __int128)magnitude << (shift % 32);
    int64_t parts[3] = {/* at most 64 + 31 bits */
        (int64_t)(uint32_t)wide,
        (int64_t)(uint32_t)(wide >> 32),
        (int64_t)(uint32_t)(wide >> 64),
    };
    for (int part = 0; part < 3; part++) {
        acc->slots[slot + part] += negative ? -parts[part] : parts[part];
    }
    if (++acc->since == FLUSH_EVERY) {
        propagate(acc);
    }
}

/* Add a finite double; 0 if it is NaN or an infinity (left to the Python code). */
static int
accumulate_double(Accumulator *acc, double value, int negate)
{
    uint64_t raw;
    memcpy(&raw, &value, sizeof(raw));
    unsigned biased = (unsigned)((raw >> 52) & 0x7FF);
    if (biased == 0x7FF) {
        return 0;
    }
    uint64_t mantissa = raw & ((UINT64_C(1) << 52) - 1);
    unsigned shift = 0;
    if (biased) {
        mantissa |= UINT64_C(1) << 52;
        shift = biased - 1;
    }
    if (mantissa) { /* else 0.0 or -0.0 */
        accumulate(acc, mantissa, shift, (int)(raw >> 63) != negate);
    }
    return 1;
}

/* Add an exact int in the int64 range, or a finite float; counts the floats in *floats (negated
   when ``negate``). 0 for anything else (left to the Python code), -1 on an error. */
static int
accumulate_value(Accumulator *acc, PyObject *item, int negate, Py_ssize_t *floats)
{
    if (PyFloat_CheckExact(item)) {
        *floats += negate ? -1 : 1;
        return accumulate_double(acc, PyFloat_AS_DOUBLE(item), negate);
    }
    long long value;
    int found = exact_int64(item, &value);
    if (found <= 0) {
        return found;
    }
    if (value) {
        uint64_t magnitude = value > 0 ? (uint64_t)value : UINT64_C(0) - (uint64_t)value;
        accumulate(acc, magnitude, INT_SHIFT, (value < 0) != negate);
    }
    return 1;
}

/* The accumulated sum as a Python int. */
static PyObject *
accumulated(Accumulator *acc)
{
    propagate(acc);
    /* Digits 0..SLOTS-2 are now in [0, 2**32); the last slot is the sign, 0 or -1 (the sum is below
       2**2161 in magnitude). Write the digits little-endian up to the last one that is not a sign
       extension, and one more for the sign. */
    uint32_t fill = acc->slots[SLOTS - 1] < 0 ? UINT32_MAX : 0;
    int used = 1;
    for (int index = SLOTS - 2; index >= 0; index--) {
        if ((uint32_t)acc->slots[index] != fill) {
            used = index + 2;
            break;
        }
    }
    unsigned char bytes[SLOTS * 4];
    for (int index = 0; index < used; index++) {
        uint32_t digit = index < SLOTS - 1 ? (uint32_t)acc->slots[index] : fill;
        bytes[4 * index] = (unsigned char)digit;
        bytes[4 * index + 1] = (unsigned char)(digit >> 8);
        bytes[4 * index + 2] = (unsigned char)(digit >> 16);
        bytes[4 * index + 3] = (unsigned char)(digit >> 24);
    }
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromNativeBytes(bytes, (size_t)used * 4, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    return _PyLong_FromByteArray(bytes, (size_t)used * 4, 1, 1);
#endif
}

static PyObject *
float_sum(PyObject *Py_UNUSED(module), PyObject *values)
{
    PyObject *seq = PySequence_Fast(values, "float_sum() needs a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Accumulator acc;
    memset(&acc, 0, sizeof(acc));
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item = items[index];
        if (!PyFloat_CheckExact(item) || !accumulate_double(&acc, PyFloat_AS_DOUBLE(item), 0)) {
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
    }
    Py_DECREF(seq);
    return accumulated(&acc);
}

/* One value in units of 2**-1074, as _node.scaled gives it: an exact int shifted left by 1074, a
   finite double as its exact multiple of the smallest subnormal. NULL with no error set when the value
   is neither (a bool, an infinity, NaN, any other type). */
static PyObject *
scaled_value(PyObject *item)
{
    PyObject *mantissa;
    long shift;
    if (PyLong_CheckExact(item)) {
        mantissa = Py_NewRef(item);
        shift = INT_SHIFT;
    }
    else if (PyFloat_CheckExact(item) && isfinite(PyFloat_AS_DOUBLE(item))) {
        int exponent;
        double fraction = frexp(PyFloat_AS_DOUBLE(item), &exponent); /* value = fraction * 2**exponent */
        long long whole = (long long)ldexp(fraction, 53);             /* exact: |whole| < 2**53 */
        shift = (long)exponent - 53 + INT_SHIFT;
        if (shift < 0) { /* a subnormal: whole is a multiple of 2**-shift (its low bits are zero) */
            unsigned long long magnitude = whole < 0 ? 0ULL - (unsigned long long)whole : (unsigned long long)whole;
            magnitude >>= -shift;
            whole = whole < 0 ? -(long long)magnitude : (long long)magnitude;
            shift = 0;
        }
        mantissa = PyLong_FromLongLong(whole);
    }
    else {
        return NULL;
    }
    if (mantissa == NULL) {
        return NULL;
    }
    PyObject *count = PyLong_FromLong(shift);
    PyObject *value = count == NULL ? NULL : PyNumber_Lshift(mantissa, count);
    Py_XDECREF(count);
    Py_DECREF(mantissa);
    return value;
}

/* delta_of(values) -> list | None: the summary of one item, [1, each value in units of 2**-1074,
   1 for each float value else 0] (see _node.delta_of); None when a value is not an exact int or a
   finite float. */
static PyObject *
delta_of(PyObject *Py_UNUSED(module), PyObject *values)
{
    PyObject *seq = PySequence_Fast(values, "delta_of() needs a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *delta = PyList_New(1 + 2 * count);
    if (delta == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    PyList_SET_ITEM(delta, 0, PyLong_FromLong(1));
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *value = scaled_value(items[index]);
        if (value == NULL) {
            Py_DECREF(seq);
            Py_DECREF(delta);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(delta, 1 + index, value);
        PyList_SET_ITEM(delta, 1 + count + index, PyLong_FromLong(PyFloat_CheckExact(items[index])));
    }
    Py_DECREF(seq);
    return delta;
}

/* A span: a tuple (leaf, start, stop, positive, ...) whose leaf has ``cols``, a tuple or list of
   columns, each a tuple or list; start and stop are ints and positive a bool (further items are
   ignored: ``_btree`` passes its own span tuples). Sets *columns to a new reference. Nothing here
   runs Python code but the attribute lookup, which comes first. 0, or -1 with an exception. */
static int
parse_span(PyObject *span, PyObject **columns, Py_ssize_t *start, Py_ssize_t *stop, int *positive)
{
    if (!PyTuple_Check(span) || PyTuple_GET_SIZE(span) < 4 || !PyLong_CheckExact(PyTuple_GET_ITEM(span, 1))
        || !PyLong_CheckExact(PyTuple_GET_ITEM(span, 2)) || !PyBool_Check(PyTuple_GET_ITEM(span, 3))) {
        PyErr_SetString(PyExc_TypeError, "a span is a tuple (leaf, start: int, stop: int, positive: bool, ...)");
        return -1;
    }
    PyObject *held = PyObject_GetAttr(PyTuple_GET_ITEM(span, 0), cols_name);
    if (held == NULL) {
        return -1;
    }
    if (!(PyTuple_Check(held) || PyList_Check(held))) {
        Py_DECREF(held);
        PyErr_SetString(PyExc_TypeError, "a span's leaf.cols must be a tuple or list of columns");
        return -1;
    }
    *start = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
    *stop = *start == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 2));
    if (*stop == -1 && PyErr_Occurred()) {
        Py_DECREF(held);
        return -1;
    }
    *positive = PyTuple_GET_ITEM(span, 3) == Py_True;
    *columns = held;
    return 0;
}

/* One field of settle's spans: (sum, floats), None when a value is left to Python, NULL on an error.
   ``spans`` is a tuple. */
static PyObject *
span_field(PyObject *spans, Py_ssize_t field)
{
    Accumulator acc;
    memset(&acc, 0, sizeof(acc));
    Py_ssize_t floats = 0;
    Py_ssize_t count = PyTuple_GET_SIZE(spans);
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *columns, *column = NULL;
        Py_ssize_t start, stop;
        int positive;
        if (parse_span(PyTuple_GET_ITEM(spans, index), &columns, &start, &stop, &positive) < 0) {
            return NULL;
        }
        const char *problem = NULL;
        if (field >= PySequence_Fast_GET_SIZE(columns)) {
            problem = "a span's leaf has fewer columns than fields";
        }
        else {
            column = PySequence_Fast_GET_ITEM(columns, field);
            if (!(PyTuple_Check(column) || PyList_Check(column))) {
                problem = "a column must be a tuple or list";
            }
            else if (start < 0 || stop > PySequence_Fast_GET_SIZE(column) || start > stop) {
                Py_DECREF(columns);
                PyErr_SetString(PyExc_IndexError, "a span lies outside its column");
                return NULL;
            }
        }
        if (problem != NULL) {
            Py_DECREF(columns);
            PyErr_SetString(PyExc_TypeError, problem);
            return NULL;
        }
        PyObject **items = PySequence_Fast_ITEMS(column); /* no Python code runs in this loop */
        for (Py_ssize_t at = start; at < stop; at++) {
            int status = accumulate_value(&acc, items[at], !positive, &floats);
            if (status <= 0) {
                Py_DECREF(columns);
                if (status < 0) {
                    return NULL;
                }
                Py_RETURN_NONE;
            }
        }
        Py_DECREF(columns);
    }
    PyObject *total = accumulated(&acc);
    if (total == NULL) {
        return NULL;
    }
    return Py_BuildValue("(Nn)", total, floats);
}

/* out[index] += value (or -= value), for a list of Python ints. */
static int
add_into(PyObject *out, Py_ssize_t index, PyObject *value, int subtract)
{
    PyObject *old = PyList_GET_ITEM(out, index);
    PyObject *sum = subtract ? PyNumber_Subtract(old, value) : PyNumber_Add(old, value);
    if (sum == NULL) {
        return -1;
    }
    PyList_SET_ITEM(out, index, sum);
    Py_DECREF(old);
    return 0;
}

/* Add (or subtract) every row of a list of summary rows into out. */
static int
add_rows(PyObject *out, PyObject *rows, Py_ssize_t width, int subtract)
{
    for (Py_ssize_t index = 0; index < PyList_GET_SIZE(rows); index++) {
        PyObject *row = PySequence_Fast(PyList_GET_ITEM(rows, index), "settle(): a row must be a sequence");
        if (row == NULL) {
            return -1;
        }
        if (PySequence_Fast_GET_SIZE(row) != width) {
            Py_DECREF(row);
            PyErr_SetString(PyExc_ValueError, "settle(): a row's width differs from 1 + 2 * fields");
            return -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(row);
        for (Py_ssize_t column = 0; column < width; column++) {
            if (!PyLong_CheckExact(items[column])) { /* ints only: their arithmetic runs no Python code */
                Py_DECREF(row);
                PyErr_SetString(PyExc_TypeError, "settle(): rows hold ints");
                return -1;
            }
            if (add_into(out, column, items[column], subtract) < 0) {
                Py_DECREF(row);
                return -1;
            }
        }
        Py_DECREF(row);
    }
    return 0;
}

static PyObject *
settle(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "settle(plus: list, minus: list, spans, fields: int)");
        return NULL;
    }
    Py_ssize_t fields;
    if (size_argument(args[3], "settle(): fields", &fields) < 0) {
        return NULL;
    }
    Py_ssize_t width = 1 + 2 * fields;
    PyObject *spans = PySequence_Tuple(args[2]); /* a copy no Python code can change meanwhile */
    if (spans == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(width);
    if (out == NULL) {
        Py_DECREF(spans);
        return NULL;
    }
    for (Py_ssize_t column = 0; column < width; column++) {
        PyList_SET_ITEM(out, column, PyLong_FromLong(0)); /* a cached small int: cannot fail */
    }
    if (add_rows(out, args[0], width, 0) < 0 || add_rows(out, args[1], width, 1) < 0) {
        goto failed;
    }
    long long entries = 0;
    for (Py_ssize_t index = 0; index < PyTuple_GET_SIZE(spans); index++) {
        PyObject *columns;
        Py_ssize_t start, stop;
        int positive;
        if (parse_span(PyTuple_GET_ITEM(spans, index), &columns, &start, &stop, &positive) < 0) {
            goto failed;
        }
        Py_ssize_t width = PySequence_Fast_GET_SIZE(columns); /* a tuple or a list (parse_span) */
        Py_DECREF(columns);
        if (width != fields) { /* a leaf of another aggregate (see check_fields) */
            Fields expected = {fields, 1};
            foreign_node(PyTuple_GET_ITEM(PyTuple_GET_ITEM(spans, index), 0), width, &expected);
            goto failed;
        }
        entries += positive ? stop - start : start - stop;
    }
    PyObject *count = PyLong_FromLongLong(entries);
    if (count == NULL) {
        goto failed;
    }
    int status = add_into(out, 0, count, 0);
    Py_DECREF(count);
    if (status < 0) {
        goto failed;
    }
    for (Py_ssize_t field = 0; field < fields; field++) {
        PyObject *found = span_field(spans, field);
        if (found == NULL) {
            goto failed;
        }
        if (found == Py_None) { /* a value for the Python code: it settles the whole read */
            Py_DECREF(found);
            Py_DECREF(spans);
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        status = add_into(out, 1 + field, PyTuple_GET_ITEM(found, 0), 0);
        if (status == 0) {
            status = add_into(out, 1 + fields + field, PyTuple_GET_ITEM(found, 1), 0);
        }
        Py_DECREF(found);
        if (status < 0) {
            goto failed;
        }
    }
    Py_DECREF(spans);
    return out;
failed:
    Py_DECREF(spans);
    Py_DECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------ range sums through images */

/* range_totals answers a range sum (``_btree.NodeTree.range_summary``) in one call: the same descent
   as the Python code, with every summary row and leaf span added straight into fixed-point
   accumulators (one per field) instead of being collected as Python rows for ``settle``. A node with
   an image is read there: its rows as node-local int128 sums and int64 float counts, its leaf values
   as doubles or int64s. A node without one (dirty, or searched once) is read through its attributes
   (``rows()`` and ``cols``). Anything the accumulators do not take (a sum beyond ~2**2112 units, a
   leaf value of a kind no aggregate stores) makes the kernel answer None: the Python code then
   answers the whole read. */

typedef struct {
    Py_ssize_t fields;
    long long count;
    long long *floats;  /* per field */
    Accumulator *sums;  /* per field */
} Total;

static int
total_start(Total *total, Py_ssize_t fields)
{
    total->fields = fields;
    total->count = 0;
    total->floats = PyMem_Calloc((size_t)fields + 1, sizeof(long long)); /* + 1: never a 0-byte block */
    total->sums = PyMem_Calloc((size_t)fields + 1, sizeof(Accumulator));
    if (total->floats == NULL || total->sums == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
total_end(Total *total)
{
    PyMem_Free(total->floats);
    PyMem_Free(total->sums);
}

/* The summary ``[count, S..., F...]`` (true scale), a new list. */
static PyObject *
total_summary(Total *total)
{
    Py_ssize_t fields = total->fields;
    PyObject *out = PyList_New(1 + 2 * fields);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t column = 0; column < 1 + 2 * fields; column++) {
        PyObject *value = column == 0        ? PyLong_FromLongLong(total->count)
                          : column <= fields ? accumulated(&total->sums[column - 1])
                                             : PyLong_FromLongLong(total->floats[column - 1 - fields]);
        if (value == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, column, value);
    }
    return out;
}

/* An accumulated sum as the value ``_node.sum_value`` gives: with no float in it, the exact int
   (the sum is a whole number of 2**1074 units: a floor shift); else the double nearest to it, ties to
   even (one rounding of the exact sum; beyond the largest double, an infinity). */
static PyObject *
accumulated_value(Accumulator *acc, long long floats)
{
    propagate(acc);
    int negative = acc->slots[SLOTS - 1] < 0;
    uint32_t digits[SLOTS];
    for (int index = 0; index < SLOTS - 1; index++) {
        digits[index] = (uint32_t)acc->slots[index];
    }
    digits[SLOTS - 1] = negative ? UINT32_MAX : 0;
    if (floats == 0) { /* the digits from bit 1074 = 33 * 32 + 18 up, two's complement */
        uint32_t shifted[SLOTS];
        int count = SLOTS - 33, used = 1;
        for (int index = 0; index < count; index++) {
            uint32_t low = digits[33 + index], high = 33 + index + 1 < SLOTS ? digits[34 + index] : digits[SLOTS - 1];
            shifted[index] = (low >> 18) | (high << 14);
        }
        for (int index = count - 1; index >= 0; index--) { /* up to the last digit that is not a sign */
            if (shifted[index] != digits[SLOTS - 1]) {
                used = index + 2 < count ? index + 2 : count;
                break;
            }
        }
        unsigned char bytes[SLOTS * 4];
        for (int index = 0; index < used; index++) {
            for (int byte = 0; byte < 4; byte++) {
                bytes[4 * index + byte] = (unsigned char)(shifted[index] >> (8 * byte));
            }
        }
        return _PyLong_FromByteArray(bytes, (size_t)used * 4, 1, 1);
    }
    if (negative) { /* the magnitude: two's complement negation */
        uint64_t carry = 1;
        for (int index = 0; index < SLOTS; index++) {
            uint64_t digit = (uint64_t)(uint32_t)~digits[index] + carry;
            digits[index] = (uint32_t)digit;
            carry = digit >> 32;
        }
    }
    int top = SLOTS - 1;
    while (top >= 0 && digits[top] == 0) {
        top--;
    }
    double value;
    if (top < 0) {
        value = 0.0;
    }
    else {
        int bits = 32 * top + (32 - __builtin_clz(digits[top]));
        if (bits <= 53) { /* exact: at most 53 bits, any scale is representable */
            uint64_t small = (uint64_t)digits[0] | (top >= 1 ? (uint64_t)digits[1] << 32 : 0);
            value = ldexp((double)small, -INT_SHIFT);
        }
        else { /* the top 64 bits, left-aligned, and whether any bit below them is set */
            uint64_t high;
            int sticky = 0;
            if (bits <= 64) {
                high = ((uint64_t)digits[0] | (uint64_t)digits[1] << 32) << (64 - bits);
            }
            else {
                int start = bits - 64, at = start / 32, offset = start % 32;
                unsigned __int128 window = 0;
                for (int index = 2; index >= 0; index--) {
                    window = (window << 32) | (at + index < SLOTS ? digits[at + index] : 0);
                }
                high = (uint64_t)(window >> offset);
                sticky = offset && (digits[at] & ((UINT32_C(1) << offset) - 1)) != 0;
                for (int index = 0; index < at && !sticky; index++) {
                    sticky = digits[index] != 0;
                }
            }
            uint64_t mantissa = high >> 11, rest = high & 0x7FF;
            if (rest > 0x400 || (rest == 0x400 && (sticky || (mantissa & 1)))) {
                mantissa++; /* 2**53 after a carry is still exact as a double */
            }
            value = ldexp((double)mantissa, bits - 53 - INT_SHIFT);
        }
    }
    return PyFloat_FromDouble(negative ? -value : value);
}

/* ``[count, value of each field]``, each sum as ``_node.sum_value`` gives it, a new list. */
static PyObject *
total_values(Total *total)
{
    Py_ssize_t fields = total->fields;
    PyObject *out = PyList_New(1 + fields);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t column = 0; column <= fields; column++) {
        PyObject *value = column == 0 ? PyLong_FromLongLong(total->count)
                                      : accumulated_value(&total->sums[column - 1], total->floats[column - 1]);
        if (value == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, column, value);
    }
    return out;
}

/* Add (or subtract) an int128 in units of 2**shift (shift <= MAX_SHIFT). */
static void
accumulate_wide(Accumulator *acc, __int128 value, unsigned shift, int negate)
{
    int negative = value < 0;
    unsigned __int128 magnitude = (unsigned __int128)value;
    if (negative) {
        magnitude = (unsigned __int128)0 - magnitude;
    }
    if ((uint64_t)magnitude) {
        accumulate(acc, (uint64_t)magnitude, shift, negative != negate);
    }
    if ((uint64_t)(magnitude >> 64)) {
        accumulate(acc, (uint64_t)(magnitude >> 64), shift + 64, negative != negate);
    }
}

/* Add (or subtract) a Python int in units (a true-scale sum of a Python row): 0, 1 when it is too
   large for the accumulator (left to Python), -1 with an error set. */
static int
accumulate_long(Accumulator *acc, PyObject *item, int negate)
{
    if (!PyLong_CheckExact(item)) {
        PyErr_SetString(PyExc_TypeError, "a summary row holds ints");
        return -1;
    }
    size_t bits = _PyLong_NumBits(item);
    if (bits == (size_t)-1) {
        return -1;
    }
    if (bits > MAX_SHIFT + 64) {
        return 1;
    }
    int negative = _PyLong_Sign(item) < 0;
    PyObject *magnitude = negative ? PyNumber_Negative(item) : Py_NewRef(item);
    if (magnitude == NULL) {
        return -1;
    }
    unsigned char bytes[(MAX_SHIFT + 64) / 8 + 8];
    size_t length = (bits + 63) / 64 * 8;
    int failed = long_bytes(magnitude, bytes, length, 0);
    Py_DECREF(magnitude);
    if (failed) {
        return -1;
    }
    for (size_t word = 0; word < length / 8; word++) {
        uint64_t part = 0;
        for (int byte = 7; byte >= 0; byte--) {
            part = (part << 8) | bytes[8 * word + (size_t)byte];
        }
        if (part) {
            accumulate(acc, part, (unsigned)(64 * word), negative != negate);
        }
    }
    return 0;
}

/* A summary row of a range sum: the rows before a child of an internal node, from its image
   (``image``, the blob, owned) or from its ``rows()`` (``python``, owned); zero when both are NULL. */
typedef struct {
    PyObject *image, *python;
    const char *sums, *shifts;
    long long count;
} Row;

static void
row_release(Row *row)
{
    Py_CLEAR(row->image);
    Py_CLEAR(row->python);
}

/* Replace ``*before`` and ``*after`` by the rows around child ``index`` of an internal node. */
static int
rows_around(PyObject *node, const Image *image, Py_ssize_t index, Py_ssize_t fields, Row *before, Row *after)
{
    row_release(before);
    row_release(after);
    if (image->blob != NULL && image->kind == IMAGE_INTERNAL && image->fields == fields) {
        if (index < 0 || index >= image->count) {
            PyErr_SetString(PyExc_IndexError, "child index out of range");
            return -1;
        }
        Row *rows[2] = {before, after};
        for (int side = 0; side < 2; side++) {
            int64_t count;
            memcpy(&count, image->counts + (index + side) * 8, sizeof(count));
            rows[side]->image = Py_NewRef(image->blob);
            rows[side]->shifts = image->values;
            rows[side]->sums = image->values + align8(4 * fields) + (index + side) * 24 * fields;
            rows[side]->count = count;
        }
        return 0;
    }
    PyObject *rows = derived(node, rows_cache_name, rows_name);
    if (rows == NULL) {
        return -1;
    }
    before->python = PySequence_GetItem(rows, index);
    after->python = before->python == NULL ? NULL : PySequence_GetItem(rows, index + 1);
    Py_DECREF(rows);
    return after->python == NULL ? -1 : 0;
}

/* The count of a summary row (0 for none) into *count, -1 there when it has no int64 count (add_row
   then says what is wrong with it): 0, or -1 with an error set. */
static int
row_count(const Row *row, Py_ssize_t *count)
{
    *count = 0;
    if (row->image != NULL) {
        *count = (Py_ssize_t)row->count;
        return 0;
    }
    if (row->python == NULL) {
        return 0;
    }
    PyObject *item = PySequence_GetItem(row->python, 0);
    if (item == NULL) {
        PyErr_Clear();
        *count = -1;
        return 0;
    }
    long long value;
    int found = exact_int64(item, &value);
    Py_DECREF(item);
    *count = found > 0 ? (Py_ssize_t)value : -1;
    return found < 0 ? -1 : 0;
}

/* Whether a leaf holds what its parent (or the root record) counts in it, the count of ``after``
   less that of ``before`` (see check_count; unknown counts pass): 0, or -1 with an error set. */
static int
check_rows_count(PyObject *node, const Image *image, const Row *before, const Row *after)
{
    Py_ssize_t low, high;
    if (row_count(before, &low) < 0 || row_count(after, &high) < 0) {
        return -1;
    }
    return low < 0 || high < 0 ? 0 : check_count(node, image, high - low);
}

/* Add (sign 1) or subtract (-1) a row: 0, 1 when a value is left to Python, -1 with an error set. */
static int
add_row(Total *total, const Row *row, int sign)
{
    Py_ssize_t fields = total->fields;
    if (row->image != NULL) {
        total->count += sign * row->count;
        for (Py_ssize_t field = 0; field < fields; field++) {
            int32_t shift;
            __int128 sum;
            int64_t floats;
            memcpy(&shift, row->shifts + 4 * field, sizeof(shift));
            memcpy(&sum, row->sums + 16 * field, sizeof(sum));
            memcpy(&floats, row->sums + 16 * fields + 8 * field, sizeof(floats));
            accumulate_wide(&total->sums[field], sum, (unsigned)shift, sign < 0);
            total->floats[field] += sign * floats;
        }
        return 0;
    }
    if (row->python == NULL) {
        return 0;
    }
    PyObject *fast = PySequence_Fast(row->python, "a summary row must be a sequence");
    if (fast == NULL) {
        return -1;
    }
    int status = 0;
    if (PySequence_Fast_GET_SIZE(fast) != 1 + 2 * fields) {
        PyErr_SetString(PyExc_ValueError, "a summary row's width differs from 1 + 2 * fields");
        status = -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t column = 0; column < 1 + 2 * fields && status == 0; column++) {
        if (column >= 1 && column <= fields) {
            status = accumulate_long(&total->sums[column - 1], items[column], sign < 0);
            continue;
        }
        long long value;
        int found = exact_int64(items[column], &value);
        status = found < 0 ? -1 : found == 0 ? 1 : 0;
        if (found > 0) {
            *(column == 0 ? &total->count : &total->floats[column - 1 - fields]) += sign * value;
        }
    }
    Py_DECREF(fast);
    return status;
}

/* Add (or subtract) the doubles [start, stop) of an image column at once when they allow it: at most
   128 finite values whose exponents lie within 66 of each other, so that their mantissas, aligned on
   the smallest exponent, add up exactly in an int128 (each below 2**119, the sum below 2**126), which
   goes into the accumulator in one step instead of one per value. 0 (nothing added) otherwise. */
static int
add_doubles(Accumulator *acc, const char *column, Py_ssize_t start, Py_ssize_t stop, int negate)
{
    if (stop - start > 128) {
        return 0;
    }
    unsigned low = 4096, high = 0;
    for (Py_ssize_t index = start; index < stop; index++) {
        uint64_t raw;
        memcpy(&raw, column + 8 * index, sizeof(raw));
        unsigned biased = (unsigned)((raw >> 52) & 0x7FF);
        if (biased == 0x7FF) {
            return 0;
        }
        if (raw << 1) { /* not a zero: its shift (as in accumulate_double) counts */
            unsigned shift = biased ? biased - 1 : 0;
            low = shift < low ? shift : low;
            high = shift > high ? shift : high;
        }
    }
    if (low == 4096) { /* zeros only */
        return 1;
    }
    if (high - low > 66) {
        return 0;
    }
    __int128 sum = 0;
    for (Py_ssize_t index = start; index < stop; index++) {
        uint64_t raw;
        memcpy(&raw, column + 8 * index, sizeof(raw));
        unsigned biased = (unsigned)((raw >> 52) & 0x7FF);
        uint64_t mantissa = raw & ((UINT64_C(1) << 52) - 1);
        if (biased) {
            mantissa |= UINT64_C(1) << 52;
        }
        if (mantissa) {
            __int128 part = (__int128)mantissa << ((biased ? biased - 1 : 0) - low);
            sum += raw >> 63 ? -part : part;
        }
    }
    accumulate_wide(acc, sum, low, negate);
    return 1;
}

/* Add (positive) or subtract the entries [start, stop) of a leaf, from its image's columns where it
   has them, else from ``cols``: 0, 1 when a value is left to Python, -1 with an error set. */
static int
add_span(Total *total, PyObject *leaf, const Image *image, Py_ssize_t start, Py_ssize_t stop, int positive)
{
    Py_ssize_t fields = total->fields, length = stop - start;
    total->count += positive ? length : -length;
    int imaged = image->blob != NULL && image->kind == IMAGE_LEAF && image->fields == fields;
    if (imaged && (start < 0 || stop > image->count)) {
        PyErr_SetString(PyExc_IndexError, "a span lies outside its leaf");
        return -1;
    }
    PyObject *columns = NULL;
    int status = 0;
    for (Py_ssize_t field = 0; field < fields && status == 0; field++) {
        Accumulator *acc = &total->sums[field];
        char type = imaged ? image->values[field] : VALUES_NONE;
        const char *column = imaged ? image->values + align8(fields) + 8 * field * image->count : NULL;
        if (type == VALUES_FLOAT) {
            if (!add_doubles(acc, column, start, stop, !positive)) {
                for (Py_ssize_t index = start; index < stop && status == 0; index++) {
                    double value;
                    memcpy(&value, column + 8 * index, sizeof(value));
                    status = accumulate_double(acc, value, !positive) ? 0 : 1;
                }
            }
            total->floats[field] += positive ? length : -length;
            continue;
        }
        if (type == VALUES_INT) { /* int64s: their exact sum fits an int128, added once */
            __int128 sum = 0;
            for (Py_ssize_t index = start; index < stop; index++) {
                int64_t value;
                memcpy(&value, column + 8 * index, sizeof(value));
                sum += value; /* below 2**127 for any span shorter than 2**64 */
            }
            accumulate_wide(acc, sum, INT_SHIFT, !positive);
            continue;
        }
        if (columns == NULL) {
            PyObject *cols = PyObject_GetAttr(leaf, cols_name);
            columns = cols == NULL ? NULL : PySequence_Fast(cols, "a leaf's cols must be a sequence");
            Py_XDECREF(cols);
            if (columns == NULL) {
                return -1;
            }
            if (PySequence_Fast_GET_SIZE(columns) != fields) {
                PyErr_SetString(PyExc_TypeError, "a leaf's cols do not match the fields");
                status = -1;
                break;
            }
        }
        PyObject *values =
            PySequence_Fast(PySequence_Fast_GET_ITEM(columns, field), "a column must be a sequence");
        if (values == NULL) {
            status = -1;
            break;
        }
        if (start < 0 || stop > PySequence_Fast_GET_SIZE(values) || start > stop) {
            PyErr_SetString(PyExc_IndexError, "a span lies outside its column");
            status = -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(values); /* no Python code runs in this loop */
        Py_ssize_t floats = 0;
        for (Py_ssize_t index = start; index < stop && status == 0; index++) {
            int found = accumulate_value(acc, items[index], !positive, &floats);
            status = found < 0 ? -1 : found == 0 ? 1 : 0;
        }
        total->floats[field] += floats;
        Py_DECREF(values);
    }
    Py_XDECREF(columns);
    return status;
}

/* The descent to one cut of a range sum, below the node where the cuts part (or from the root for a
   one-sided range): ``sign`` 1 for the upper cut (what lies before it is added), -1 for the lower one
   (subtracted). Each level adds the rows before the child taken; the leaf adds ``before`` and its
   entries before the cut, or ``after`` minus its entries from the cut, whichever span is shorter. */
typedef struct {
    PyObject *node; /* borrowed (see fetcher_keep) */
    PyObject *hint; /* the node's image if known, borrowed (see node_image_hinted), or NULL */
    PyObject *next; /* from walk_search's child lookup: the child to step down to, borrowed */
    Row before, after;
    const char *key;
    Py_ssize_t size;
    Py_ssize_t index, count; /* from walk_search: the cut's place in the node, and a leaf's size */
    int key_after, sign, done, levels, leaf;
    Image image;
} Walk;

static void
walk_start(Walk *walk, PyObject *node, const char *key, Py_ssize_t size, int key_after, int sign)
{
    memset(walk, 0, sizeof(*walk));
    walk->node = node;
    walk->key = key;
    walk->size = size;
    walk->key_after = key_after;
    walk->sign = sign;
}

static void
walk_release(Walk *walk)
{
    image_release(&walk->image);
    walk->node = NULL;
    row_release(&walk->before);
    row_release(&walk->after);
}

/* The first phase of one level of a walk (its node's image open): whether the node is a leaf, and
   the cut's place in it (a leaf: the entries before the cut; an internal node: the child holding it);
   then start loading what walk_step reads next (see prefetch_child): an internal node's child id,
   counts and rows around that child, a leaf's values on the shorter side of the cut. 0, or -1 with an
   error set. */
static int
walk_search(Walk *walk, Total *total)
{
    PyObject *node = walk->node;
    Image *image = &walk->image;
    Fields fields = {total->fields, 1};
    int leaf = walk->leaf = image_is_leaf(node, image);
    if (leaf < 0 || check_fields(node, image, leaf, &fields) < 0) {
        return -1;
    }
    if (!leaf) {
        if (++walk->levels > MAX_LEVELS) {
            return too_deep();
        }
        walk->index = child_index(node, image, walk->key, walk->size);
        prefetch_child(image, walk->index, total->fields);
        return walk->index < 0 ? -1 : 0;
    }
    if (check_rows_count(node, image, &walk->before, &walk->after) < 0) {
        return -1;
    }
    Py_ssize_t index = walk->index = image_search(node, image, walk->key, walk->size, walk->key_after);
    Py_ssize_t count = walk->count = index < 0 ? -1 : node_size(node, image);
    if (count < 0) {
        return -1;
    }
    if (image->blob != NULL && image->kind == IMAGE_LEAF && image->fields == total->fields) {
        int head = 2 * index <= count;
        PREFETCH(image->values); /* the columns' types */
        for (Py_ssize_t field = 0; field < total->fields; field++) {
            const char *column = image->values + align8(total->fields) + 8 * field * count;
            prefetch_range(column + 8 * (head ? 0 : index), column + 8 * (head ? index : count), 8);
        }
    }
    return 0;
}

/* The child an internal node's walk steps down to (walk_search found it) into ``walk->next``, its
   image in ``walk->hint`` when the node table knows it (and its first lines loading: see
   child_of). 0, or -1 with an error set. */
static int
walk_lookup(Walk *walk, Fetcher *fetcher)
{
    walk->next = child_of(walk->node, &walk->image, walk->index, fetcher, &walk->hint);
    return walk->next == NULL ? -1 : 0;
}

/* The rest of one level of a walk, after walk_search (and walk_lookup, for an internal node): a
   leaf's part added, or the rows before an internal node's child added and the step down to it. 0, 1
   when a value is left to Python, -1 on an error. */
static int
walk_step(Walk *walk, Total *total)
{
    PyObject *node = walk->node;
    Py_ssize_t index = walk->index;
    if (walk->leaf) {
        walk->done = 1;
        Py_ssize_t count = walk->count;
        int head = 2 * index <= count, status;
        if (head) {
            status = add_row(total, &walk->before, walk->sign);
            return status || !index ? status : add_span(total, node, &walk->image, 0, index, walk->sign > 0);
        }
        status = add_row(total, &walk->after, walk->sign);
        if (status || index == count) {
            return status;
        }
        return add_span(total, node, &walk->image, index, count, walk->sign < 0);
    }
    int status = add_row(total, &walk->before, walk->sign);
    if (status) {
        return status;
    }
    if (rows_around(node, &walk->image, index, total->fields, &walk->before, &walk->after) < 0) {
        return -1;
    }
    walk->node = walk->next;
    return 0;
}

/* Run ``count`` walks (one, or the two cuts of a range below the node where they part) level by level
   in turn, each level in phases across the walks (see prefetch_child): open every walk's image,
   search each, read each child id, look each child up, then step each down; the cache misses of each
   phase then come in together, where one walk after the other waits for each miss in turn. Two walks
   must reach their leaves at the same level. Releases the walks. 0, 1 when a value is left to
   Python, -1 with an error set. */
static int
walk_all(Walk *walks, int count, Total *total, Fetcher *fetcher)
{
    int status = 0, running = count;
    while (status == 0 && running) {
        for (int at = 0; at < count && status == 0; at++) {
            Walk *walk = &walks[at];
            status = !walk->done && node_image_hinted(walk->node, walk->hint, &walk->image) < 0 ? -1 : 0;
            prefetch_prefixes(&walk->image);
        }
        for (int at = 0; at < count && status == 0; at++) {
            status = walks[at].done ? 0 : walk_search(&walks[at], total);
        }
        for (int at = 0; at < count && status == 0; at++) {
            if (!walks[at].done && !walks[at].leaf) {
                prefetch_slot(&walks[at].image, walks[at].index, fetcher);
            }
        }
        for (int at = 0; at < count && status == 0; at++) {
            status = walks[at].done || walks[at].leaf ? 0 : walk_lookup(&walks[at], fetcher);
        }
        running = 0;
        for (int at = 0; at < count && status == 0; at++) {
            if (!walks[at].done) {
                status = walk_step(&walks[at], total);
                image_release(&walks[at].image);
                running += !walks[at].done;
            }
        }
        if (status == 0 && count == 2 && walks[0].done != walks[1].done) {
            status = uneven_depths();
        }
    }
    for (int at = 0; at < count; at++) {
        walk_release(&walks[at]);
    }
    return status;
}

/* The shared path of a two-sided range sum, from ``node`` (borrowed): down to the node where the
   cuts part, then both walks in phases (walk_all); or, when both cuts end in one leaf, its part on
   its shorter side (the span between them, or the whole leaf as its parent knows it minus both
   ends). 0, 1 when a value is left to Python, -1 with an error set. */
static int
between(PyObject *node, Row *before, Row *after, const char *low, Py_ssize_t low_size, int low_after,
        const char *high, Py_ssize_t high_size, int high_after, Total *total, Fetcher *fetcher)
{
    Image image = {.blob = NULL};
    PyObject *hint = NULL;
    Fields fields = {total->fields, 1};
    int status = -1;
    for (int levels = 1;; levels++) {
        int leaf = open_level(node, hint, &image, levels, &fields);
        if (leaf < 0) {
            goto finish;
        }
        if (leaf) {
            break;
        }
        Py_ssize_t index = child_index(node, &image, low, low_size);
        Py_ssize_t other = index < 0 ? -1 : child_index(node, &image, high, high_size);
        if (other < 0) {
            goto finish;
        }
        if (index > other) { /* inverted cuts: nothing between them */
            status = 0;
            goto finish;
        }
        prefetch_child(&image, index, total->fields);
        if (index != other) {
            Walk walks[2];
            PyObject *high_hint, *low_hint = NULL;
            prefetch_child(&image, other, total->fields); /* the two walks' first lookups, in phases */
            prefetch_slot(&image, index, fetcher);
            prefetch_slot(&image, other, fetcher);
            PyObject *high_kid = child_of(node, &image, other, fetcher, &high_hint);
            PyObject *low_kid = high_kid == NULL ? NULL : child_of(node, &image, index, fetcher, &low_hint);
            if (low_kid == NULL) {
                goto finish;
            }
            walk_start(&walks[0], high_kid, high, high_size, high_after, 1);
            walk_start(&walks[1], low_kid, low, low_size, low_after, -1);
            walks[0].hint = high_hint;
            walks[1].hint = low_hint;
            if (rows_around(node, &image, other, total->fields, &walks[0].before, &walks[0].after) < 0 ||
                rows_around(node, &image, index, total->fields, &walks[1].before, &walks[1].after) < 0) {
                walk_release(&walks[0]);
                walk_release(&walks[1]);
                goto finish;
            }
            status = walk_all(walks, 2, total, fetcher);
            goto finish;
        }
        if (rows_around(node, &image, index, total->fields, before, after) < 0) {
            goto finish;
        }
        PyObject *child = child_of(node, &image, index, fetcher, &hint);
        if (child == NULL) {
            goto finish;
        }
        image_release(&image);
        node = child;
    }
    if (check_rows_count(node, &image, before, after) < 0) {
        goto finish;
    }
    Py_ssize_t start = image_search(node, &image, low, low_size, low_after);
    Py_ssize_t stop = start < 0 ? -1 : image_search(node, &image, high, high_size, high_after);
    Py_ssize_t size = stop < 0 ? -1 : node_size(node, &image);
    if (size < 0) {
        goto finish;
    }
    if (start >= stop) {
        status = 0;
    }
    else if (2 * (stop - start) <= size) {
        status = add_span(total, node, &image, start, stop, 1);
    }
    else {
        status = add_row(total, after, 1);
        status = status ? status : add_row(total, before, -1);
        status = status || !start ? status : add_span(total, node, &image, 0, start, 0);
        status = status || stop == size ? status : add_span(total, node, &image, stop, size, 0);
    }
finish:
    image_release(&image);
    return status;
}

/* The summary of the entries of the tree under ``node`` (borrowed; ``summary`` its summary) between
   two cuts (either may be NULL for a one-sided range, not both), added to ``total``. 0, 1 when a value
   is left to Python, -1 with an error set. */
static int
range_into(PyObject *node, PyObject *summary, PyObject *low, int low_after, PyObject *high, int high_after,
           Total *total, Fetcher *fetcher)
{
    Row before = {NULL}, after = {.python = Py_NewRef(summary)};
    int status;
    if (low == NULL || high == NULL) { /* one cut: its walk from the root */
        int upper = low == NULL;
        PyObject *cut = upper ? high : low;
        Walk walk;
        walk_start(&walk, node, PyBytes_AS_STRING(cut), PyBytes_GET_SIZE(cut), upper ? high_after : low_after,
                   upper ? 1 : -1);
        walk.after = after;
        after.python = NULL;
        status = upper ? 0 : add_row(total, &walk.after, 1); /* everything, minus what lies before the cut */
        if (status) {
            walk_release(&walk);
        }
        else {
            status = walk_all(&walk, 1, total, fetcher);
        }
    }
    else {
        status = between(node, &before, &after, PyBytes_AS_STRING(low), PyBytes_GET_SIZE(low), low_after,
                         PyBytes_AS_STRING(high), PyBytes_GET_SIZE(high), high_after, total, fetcher);
    }
    row_release(&before);
    row_release(&after);
    return status;
}

/* range_totals(node, summary, low, low_after, high, high_after, fetch, nodes, fields[, extra, values
   [, pending, pending_summary]]) -> (summary, hits) or None: the summary [count, S..., F...] of the
   entries between the cuts (either may be None for a one-sided range, not both), plus the summary
   ``extra`` when given (not None), plus the part between the cuts of the leaf ``pending`` (a tree's
   pending node, its summary ``pending_summary``) when given (not None); ``node`` None: a tree of no
   nodes. With ``values`` true, [count, value of each field] instead (``_node.sum_value`` of each sum:
   one rounding of the exact sum, and no big int made). None when a value is left to the Python code. */
static PyObject *
range_totals(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Fetcher fetcher;
    Py_ssize_t fields;
    int cuts_ok = (nargs == 9 || nargs == 11 || nargs == 13) && (args[2] == Py_None || PyBytes_Check(args[2])) &&
                  (args[4] == Py_None || PyBytes_Check(args[4])) && (args[2] != Py_None || args[4] != Py_None);
    if (!cuts_ok) {
        PyErr_SetString(PyExc_TypeError,
                        "range_totals(node, summary, low: bytes | None, low_after, high: bytes | None, "
                        "high_after, fetch, nodes, fields[, extra, values[, pending, pending_summary]]), "
                        "with at least one cut");
        return NULL;
    }
    int low_after = PyObject_IsTrue(args[3]), high_after = PyObject_IsTrue(args[5]);
    int values = nargs >= 11 ? PyObject_IsTrue(args[10]) : 0;
    if (low_after < 0 || high_after < 0 || values < 0 ||
        size_argument(args[8], "range_totals(): fields", &fields) < 0) {
        return NULL;
    }
    PyObject *low = args[2] == Py_None ? NULL : args[2], *high = args[4] == Py_None ? NULL : args[4];
    PyObject *pending = nargs == 13 && args[11] != Py_None ? args[11] : NULL;
    Total total;
    /* fetcher_from pins the node table: the last step that can fail before fetcher_end is certain */
    if (total_start(&total, fields) < 0 || fetcher_from(args[6], args[7], &fetcher) < 0) {
        total_end(&total);
        return NULL;
    }
    int status = 0;
    if (args[0] != Py_None) {
        status = range_into(args[0], args[1], low, low_after, high, high_after, &total, &fetcher);
    }
    if (status == 0 && pending != NULL) {
        status = range_into(pending, args[12], low, low_after, high, high_after, &total, &fetcher);
    }
    if (status == 0 && nargs >= 11 && args[9] != Py_None) {
        Row extra = {.python = args[9]};
        status = add_row(&total, &extra, 1);
    }
    fetcher_end(&fetcher);
    PyObject *result = NULL;
    if (status == 0) {
        PyObject *summary = values ? total_values(&total) : total_summary(&total);
        result = summary == NULL ? NULL : Py_BuildValue("(Nn)", summary, fetcher.hits);
    }
    else if (status > 0) {
        result = Py_NewRef(Py_None);
    }
    total_end(&total);
    return result;
}

/* ------------------------------------------------------------------ node encoding */

/* What msgpack-python's packb (use_bin_type=True) writes for ``[head, *parts]``, where each part is a
   list or tuple of bytes, exact ints (int64 or uint64 range) and exact floats: the node layouts of
   ``_node.encode_node``. The output is byte for byte msgpack's: the smallest int form, float64,
   bin8/16/32, fixarray/array16/array32. Anything else (another type, a larger int) gives None, and
   the Python code packs the node itself. Two passes: sizes and types first, then the bytes. */

static Py_ssize_t
array_header_size(Py_ssize_t count)
{
    return count <= 15 ? 1 : count <= 0xFFFF ? 3 : 5;
}

static char *
put_array_header(char *out, Py_ssize_t count)
{
    if (count <= 15) {
        *out++ = (char)(0x90 | count);
    }
    else if (count <= 0xFFFF) {
        *out++ = (char)0xdc;
        *out++ = (char)(count >> 8);
        *out++ = (char)count;
    }
    else {
        *out++ = (char)0xdd;
        for (int shift = 24; shift >= 0; shift -= 8) {
            *out++ = (char)(count >> shift);
        }
    }
    return out;
}

static char *
put_be(char *out, unsigned long long value, int bytes)
{
    for (int shift = 8 * (bytes - 1); shift >= 0; shift -= 8) {
        *out++ = (char)(value >> shift);
    }
    return out;
}

/* msgpack's bin8/16/32 header of a byte string of ``length`` bytes: its size, and writing it. */
static Py_ssize_t
bin_header_size(Py_ssize_t length)
{
    return length <= 0xFF ? 2 : length <= 0xFFFF ? 3 : 5;
}

static char *
put_bin_header(char *out, Py_ssize_t length)
{
    if (length <= 0xFF) {
        *out++ = (char)0xc4;
        *out++ = (char)length;
        return out;
    }
    if (length <= 0xFFFF) {
        *out++ = (char)0xc5;
        return put_be(out, (unsigned long long)length, 2);
    }
    *out++ = (char)0xc6;
    return put_be(out, (unsigned long long)length, 4);
}

/* An exact int of at most 60 bits, read from the object without a call: 1 with *value set, else 0
   (then PyLong_AsLongLongAndOverflow decides). A node's counts, ids, float counts, shifts and most
   of its limbs are such ints; packing a node converts ~300 of them. */
static inline int
small_int(PyObject *item, long long *value)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)item)) {
        *value = (long long)PyUnstable_Long_CompactValue((PyLongObject *)item);
        return 1;
    }
    return 0;
#else
    Py_ssize_t size = Py_SIZE(item);
    const digit *digits = ((PyLongObject *)item)->ob_digit;
    if (size < -2 || size > 2) {
        return 0;
    }
    long long magnitude = size == 0 ? 0 : (long long)digits[0];
    if (size == 2 || size == -2) {
        magnitude |= (long long)digits[1] << PyLong_SHIFT;
    }
    *value = size < 0 ? -magnitude : magnitude;
    return 1;
#endif
}

/* The packed size of a signed 64-bit int, in msgpack's smallest form. */
static Py_ssize_t
int_size(long long value)
{
    if (value >= 0) {
        return value < 0x80 ? 1 : value <= 0xFF ? 2 : value <= 0xFFFF ? 3 : value <= 0xFFFFFFFFLL ? 5 : 9;
    }
    return value >= -32 ? 1 : value >= -128 ? 2 : value >= -32768 ? 3 : value >= -2147483648LL ? 5 : 9;
}

/* Write a signed 64-bit int in msgpack's smallest form. */
static char *
put_int(char *out, long long value)
{
    if (value >= 0) {
        if (value < 0x80) {
            *out++ = (char)value;
        }
        else if (value <= 0xFF) {
            *out++ = (char)0xcc;
            *out++ = (char)value;
        }
        else if (value <= 0xFFFF) {
            *out++ = (char)0xcd;
            out = put_be(out, (unsigned long long)value, 2);
        }
        else if (value <= 0xFFFFFFFFLL) {
            *out++ = (char)0xce;
            out = put_be(out, (unsigned long long)value, 4);
        }
        else {
            *out++ = (char)0xcf;
            out = put_be(out, (unsigned long long)value, 8);
        }
        return out;
    }
    if (value >= -32) {
        *out++ = (char)(signed char)value;
    }
    else if (value >= -128) {
        *out++ = (char)0xd0;
        *out++ = (char)value;
    }
    else if (value >= -32768) {
        *out++ = (char)0xd1;
        out = put_be(out, (unsigned long long)value, 2);
    }
    else if (value >= -2147483648LL) {
        *out++ = (char)0xd2;
        out = put_be(out, (unsigned long long)value, 4);
    }
    else {
        *out++ = (char)0xd3;
        out = put_be(out, (unsigned long long)value, 8);
    }
    return out;
}

/* The packed size of one scalar, or 0 for a value left to the Python code, or -1 with an error set.
   ``*signed_value`` / ``*unsigned_value`` receive an int's value. */
static Py_ssize_t
scalar_size(PyObject *item, long long *signed_value, unsigned long long *unsigned_value, int *is_unsigned)
{
    if (PyBytes_CheckExact(item)) {
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (size > (Py_ssize_t)0xFFFFFFFF) {
            return 0;
        }
        return size + bin_header_size(size);
    }
    if (PyFloat_CheckExact(item)) {
        return 9;
    }
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
    *is_unsigned = 0;
    if (small_int(item, signed_value)) {
        return int_size(*signed_value);
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0) {
        unsigned long long big = PyLong_AsUnsignedLongLong(item);
        if (big == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear(); /* beyond uint64: msgpack refuses it, and so does the Python code's path */
            return 0;
        }
        *unsigned_value = big;
        *is_unsigned = 1;
        return 9;
    }
    if (overflow < 0) {
        return 0;
    }
    *signed_value = value;
    return int_size(value);
}

static char *
put_scalar(char *out, PyObject *item)
{
    if (PyBytes_CheckExact(item)) {
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        out = put_bin_header(out, size);
        memcpy(out, PyBytes_AS_STRING(item), (size_t)size);
        return out + size;
    }
    if (PyFloat_CheckExact(item)) {
        double value = PyFloat_AS_DOUBLE(item);
        unsigned long long bits;
        memcpy(&bits, &value, sizeof(bits));
        *out++ = (char)0xcb;
        return put_be(out, bits, 8);
    }
    long long value = 0;
    unsigned long long big = 0;
    int is_unsigned = 0;
    scalar_size(item, &value, &big, &is_unsigned); /* checked by the first pass: cannot fail now */
    if (is_unsigned) {
        *out++ = (char)0xcf;
        return put_be(out, big, 8);
    }
    return put_int(out, value);
}

/* The packed size of a list or tuple of scalars (its array header included), 0 when an item is left
   to the Python code, -1 with an error set. */
static Py_ssize_t
part_size(PyObject *part)
{
    Py_ssize_t size = PySequence_Fast_GET_SIZE(part);
    PyObject **items = PySequence_Fast_ITEMS(part);
    Py_ssize_t total = array_header_size(size);
    for (Py_ssize_t at = 0; at < size; at++) {
        long long value;
        unsigned long long big;
        int is_unsigned;
        Py_ssize_t length = scalar_size(items[at], &value, &big, &is_unsigned);
        if (length <= 0) {
            return length;
        }
        total += length;
    }
    return total;
}

/* Write a list or tuple of scalars measured by part_size. */
static char *
put_part(char *out, PyObject *part)
{
    Py_ssize_t size = PySequence_Fast_GET_SIZE(part);
    PyObject **items = PySequence_Fast_ITEMS(part);
    out = put_array_header(out, size);
    for (Py_ssize_t at = 0; at < size; at++) {
        out = put_scalar(out, items[at]);
    }
    return out;
}

static PyObject *
pack_node(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_CheckExact(args[0]) || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pack_node(head: int, parts: tuple of sequences)");
        return NULL;
    }
    long head = PyLong_AsLong(args[0]);
    if (head == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (head < 0 || head > 127) {
        PyErr_SetString(PyExc_ValueError, "pack_node: head must be from 0 to 127");
        return NULL;
    }
    PyObject *parts = args[1];
    Py_ssize_t count = PyTuple_GET_SIZE(parts);
    /* Hold each part. Nothing between the passes can change a list: every item is an exact bytes,
       int or float, whose conversions run no Python code. */
    PyObject *held = PyTuple_New(count);
    if (held == NULL) {
        return NULL;
    }
    Py_ssize_t total = array_header_size(count + 1) + 1;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *part = PyTuple_GET_ITEM(parts, index);
        if (!PyList_CheckExact(part) && !PyTuple_CheckExact(part)) {
            Py_DECREF(held);
            Py_RETURN_NONE;
        }
        Py_INCREF(part);
        PyTuple_SET_ITEM(held, index, part);
        Py_ssize_t length = part_size(part);
        if (length <= 0) {
            Py_DECREF(held);
            if (length < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        total += length;
    }
    PyObject *packed = PyBytes_FromStringAndSize(NULL, total);
    if (packed == NULL) {
        Py_DECREF(held);
        return NULL;
    }
    char *out = put_array_header(PyBytes_AS_STRING(packed), count + 1);
    *out++ = (char)head;
    for (Py_ssize_t index = 0; index < count; index++) {
        out = put_part(out, PyTuple_GET_ITEM(held, index));
    }
    Py_DECREF(held);
    assert(out == PyBytes_AS_STRING(packed) + total);
    return packed;
}


/* ------------------------------------------------------------------ merging into a stored leaf */

/* A merge: the stored bytes of a leaf (``_node`` layout
   ``[1, [entry, ...], [value, ...] per field]``) with entries ``lo:hi`` of a sorted batch (and their
   values, ``cols[f][lo:hi]``) merged in, written without decoding the leaf into Python objects: its
   keys and values are copied as they are stored, and only the new ones are packed (as pack_node packs
   them, so the bytes are those ``encode_node`` writes for the merged leaf). A write of a batch of
   scattered entries touches one leaf per entry or so, mostly out of the node cache; decoding each one,
   copying it and packing it again cost more than the rest of the write.

   Returns the bytes; or, when the merged leaf holds more than ``limit`` entries, the even pieces of at
   most ``target`` entries ``NodeTree._cut`` would cut it into, as a list: the first piece's bytes (it
   keeps the leaf's place), then ``(fence, bytes, summary)`` for each other piece (its first entry,
   and its summary ``[count, S..., F...]`` summed exactly as ``_node.summarize`` sums, stored values
   read in place); or, when a new entry is already in the leaf, the index (into ``entries``) of the
   first such one; or None when the merge is left to the Python code: another layout or field count,
   a value pack_node leaves to Python (or, in a split, NaN or an infinity), or bytes it cannot parse
   (the Python decoder then says what is wrong). */

typedef struct {
    Py_ssize_t at;      /* offset of the element (its tag) */
    Py_ssize_t size;    /* the whole element's size */
    Py_ssize_t payload; /* offset of a bin's bytes */
} Element;

/* The size of a stored number by its tag (fixints, ints of 1 to 8 bytes, doubles), 0 for other tags. */
static unsigned char number_sizes[256];

static void
init_number_sizes(void)
{
    for (int tag = 0; tag < 256; tag++) {
        number_sizes[tag] = tag <= 0x7f || tag >= 0xe0                 ? 1
                            : tag == 0xcc || tag == 0xd0               ? 2
                            : tag == 0xcd || tag == 0xd1               ? 3
                            : tag == 0xce || tag == 0xd2               ? 5
                            : tag == 0xcf || tag == 0xd3 || tag == 0xcb ? 9
                                                                       : 0;
    }
}

/* Read a msgpack array header at data[*at]: 1 with *count set, 0 if there is none. */
static int
read_array_header(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t *count)
{
    Py_ssize_t here = *at;
    if (here >= length) {
        return 0;
    }
    unsigned char tag = data[here];
    if ((tag & 0xF0) == 0x90) {
        *count = tag & 0x0F;
        *at = here + 1;
        return 1;
    }
    if (tag == 0xdc && here + 3 <= length) {
        *count = (Py_ssize_t)data[here + 1] << 8 | data[here + 2];
        *at = here + 3;
        return 1;
    }
    if (tag == 0xdd && here + 5 <= length) {
        *count = (Py_ssize_t)data[here + 1] << 24 | (Py_ssize_t)data[here + 2] << 16 |
                 (Py_ssize_t)data[here + 3] << 8 | data[here + 4];
        *at = here + 5;
        return 1;
    }
    return 0;
}

/* Read one element at data[*at] into *element: a bin when ``bin`` (a key), else a number (a value).
   Returns 0 for anything else or a truncated element. */
static int
read_element(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, int bin, Element *element)
{
    Py_ssize_t here = *at, size, header = 0;
    if (here >= length) {
        return 0;
    }
    unsigned char tag = data[here];
    if (bin) {
        if (tag == 0xc4 && here + 2 <= length) {
            header = 2;
            size = data[here + 1];
        }
        else if (tag == 0xc5 && here + 3 <= length) {
            header = 3;
            size = (Py_ssize_t)data[here + 1] << 8 | data[here + 2];
        }
        else if (tag == 0xc6 && here + 5 <= length) {
            header = 5;
            size = (Py_ssize_t)data[here + 1] << 24 | (Py_ssize_t)data[here + 2] << 16 |
                   (Py_ssize_t)data[here + 3] << 8 | data[here + 4];
        }
        else {
            return 0;
        }
        size += header;
    }
    else if (tag <= 0x7f || tag >= 0xe0) {
        size = 1;
    }
    else if (tag == 0xcc || tag == 0xd0) {
        size = 2;
    }
    else if (tag == 0xcd || tag == 0xd1) {
        size = 3;
    }
    else if (tag == 0xce || tag == 0xd2) {
        size = 5;
    }
    else if (tag == 0xcf || tag == 0xd3 || tag == 0xcb) {
        size = 9;
    }
    else {
        return 0;
    }
    if (size > length - here) {
        return 0;
    }
    element->at = here;
    element->size = size;
    element->payload = here + header;
    *at = here + size;
    return 1;
}

/* A merge in progress: the stored leaf's elements and the merge order (old entry i as i, new entry j
   of the batch as -1 - j). */
typedef struct {
    const unsigned char *data;
    const Element *elements; /* count keys, then count values per field */
    Py_ssize_t count, fields;
    const Py_ssize_t *order;
    PyObject *entries, *cols;
} Merge;

/* The packed size of the element of merged position ``index`` in ``part`` (0: keys, f + 1: field f). */
static Py_ssize_t
merged_size(const Merge *merge, Py_ssize_t part, Py_ssize_t index)
{
    Py_ssize_t source = merge->order[index];
    if (source >= 0) {
        return merge->elements[merge->count * part + source].size;
    }
    PyObject *incoming = part ? PyList_GET_ITEM(merge->cols, part - 1) : merge->entries;
    long long value;
    unsigned long long big;
    int is_unsigned;
    return scalar_size(PyList_GET_ITEM(incoming, -1 - source), &value, &big, &is_unsigned); /* measured before */
}

/* The bytes of the leaf holding merged positions ``from:to``. */
static PyObject *
merged_piece(const Merge *merge, Py_ssize_t from, Py_ssize_t to)
{
    Py_ssize_t fields = merge->fields, size = array_header_size(2 + fields) + 1 + (1 + fields) * array_header_size(to - from);
    for (Py_ssize_t part = 0; part <= fields; part++) {
        for (Py_ssize_t index = from; index < to; index++) {
            size += merged_size(merge, part, index);
        }
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL) {
        return NULL;
    }
    char *write = put_array_header(PyBytes_AS_STRING(result), 2 + fields);
    *write++ = 1;
    for (Py_ssize_t part = 0; part <= fields; part++) {
        write = put_array_header(write, to - from);
        const Element *column = merge->elements + merge->count * part;
        PyObject *incoming = part ? PyList_GET_ITEM(merge->cols, part - 1) : merge->entries;
        for (Py_ssize_t index = from; index < to; index++) {
            Py_ssize_t source = merge->order[index];
            if (source >= 0) {
                memcpy(write, merge->data + column[source].at, (size_t)column[source].size);
                write += column[source].size;
            }
            else {
                write = put_scalar(write, PyList_GET_ITEM(incoming, -1 - source));
            }
        }
    }
    assert(write == PyBytes_AS_STRING(result) + size);
    return result;
}

#define EXPONENT_BITS UINT64_C(0x7FF0000000000000) /* all set: a double that is an infinity or a NaN */

/* A stored number (a msgpack int or float element, as read_element reads one): VALUES_FLOAT with its
   double's bits in *word, VALUES_INT with its int64's, or VALUES_NONE for an int beyond int64 (its
   magnitude in *word). */
static int
stored_number(const unsigned char *data, const Element *element, uint64_t *word)
{
    const unsigned char *at = data + element->at;
    unsigned char tag = at[0];
    uint64_t bits = 0;
    for (Py_ssize_t index = 1; index < element->size; index++) {
        bits = bits << 8 | at[index];
    }
    int64_t value;
    if (tag == 0xcb) {
        *word = bits;
        return VALUES_FLOAT;
    }
    if (tag <= 0x7f) {
        value = tag;
    }
    else if (tag >= 0xe0) {
        value = (int8_t)tag;
    }
    else if (tag >= 0xcc && tag <= 0xcf) {
        *word = bits;
        if (bits >> 63) {
            return VALUES_NONE;
        }
        value = (int64_t)bits;
    }
    else { /* 0xd0..0xd3: sign-extend from the element's width */
        int width = (int)(element->size - 1) * 8;
        value = width == 64 ? (int64_t)bits : (int64_t)(bits << (64 - width)) >> (64 - width);
    }
    *word = (uint64_t)value;
    return VALUES_INT;
}

/* Add a stored number to an accumulator, counting floats; 0 for a stored NaN or infinity (never
   written: only a damaged leaf holds one), else 1. */
static int
accumulate_stored(Accumulator *acc, const unsigned char *data, const Element *element, Py_ssize_t *floats)
{
    uint64_t word;
    int type = stored_number(data, element, &word);
    if (type == VALUES_FLOAT) {
        double value;
        memcpy(&value, &word, sizeof(value));
        *floats += 1;
        return accumulate_double(acc, value, 0);
    }
    if (type == VALUES_NONE) {
        accumulate(acc, word, INT_SHIFT, 0); /* beyond int64: a magnitude */
        return 1;
    }
    int64_t value = (int64_t)word;
    if (value) {
        uint64_t magnitude = value > 0 ? (uint64_t)value : UINT64_C(0) - (uint64_t)value;
        accumulate(acc, magnitude, INT_SHIFT, value < 0);
    }
    return 1;
}

/* The summary ``[count, S..., F...]`` (``_node.summarize``) of merged positions ``from:to``; None
   for a value the accumulators do not take (NaN or an infinity, which no caller passes and no intact
   leaf holds). */
static PyObject *
piece_summary(const Merge *merge, Py_ssize_t from, Py_ssize_t to)
{
    Py_ssize_t fields = merge->fields;
    PyObject *summary = PyList_New(1 + 2 * fields);
    if (summary == NULL) {
        return NULL;
    }
    PyObject *count = PyLong_FromSsize_t(to - from);
    if (count == NULL) {
        Py_DECREF(summary);
        return NULL;
    }
    PyList_SET_ITEM(summary, 0, count);
    Accumulator acc;
    for (Py_ssize_t field = 0; field < fields; field++) {
        memset(&acc, 0, sizeof(acc));
        Py_ssize_t floats = 0;
        const Element *column = merge->elements + merge->count * (1 + field);
        PyObject *incoming = PyList_GET_ITEM(merge->cols, field);
        for (Py_ssize_t index = from; index < to; index++) {
            Py_ssize_t source = merge->order[index];
            if (source >= 0) {
                if (!accumulate_stored(&acc, merge->data, &column[source], &floats)) {
                    Py_DECREF(summary);
                    Py_RETURN_NONE;
                }
                continue;
            }
            PyObject *item = PyList_GET_ITEM(incoming, -1 - source);
            int found = accumulate_value(&acc, item, 0, &floats);
            if (found == 0 && PyLong_CheckExact(item)) { /* beyond int64: uint64, as pack_node took it */
                unsigned long long big = PyLong_AsUnsignedLongLong(item);
                if (big == (unsigned long long)-1 && PyErr_Occurred()) {
                    found = -1;
                }
                else {
                    accumulate(&acc, big, INT_SHIFT, 0);
                    found = 1;
                }
            }
            if (found <= 0) {
                Py_DECREF(summary);
                return found < 0 ? NULL : Py_NewRef(Py_None);
            }
        }
        PyObject *total = accumulated(&acc);
        PyObject *number = total == NULL ? NULL : PyLong_FromSsize_t(floats);
        if (number == NULL) {
            Py_XDECREF(total);
            Py_DECREF(summary);
            return NULL;
        }
        PyList_SET_ITEM(summary, 1 + field, total);
        PyList_SET_ITEM(summary, 1 + fields + field, number);
    }
    return summary;
}

/* 1 when ``item`` is a number pack_node packs (a float, or an int of at most 64 bits), 0 for anything
   else (the Python code packs or refuses it), -1 with an error set. */
static int
packable_number(PyObject *item)
{
    if (PyBytes_Check(item)) {
        return 0; /* not a number: the Python code refuses it */
    }
    long long value;
    unsigned long long big;
    int is_unsigned;
    Py_ssize_t size = scalar_size(item, &value, &big, &is_unsigned);
    return size < 0 ? -1 : size > 0;
}

/* The head of a stored leaf with ``fields`` value fields (``[1, [entry, ...], ...]``): 1 with *size
   set to its entry count and *at moved to its first key, 0 when the bytes are not such a leaf or
   claim more entries than the bytes left could hold (damage: nothing is to be allocated for them). */
static int
leaf_header(const unsigned char *data, Py_ssize_t length, Py_ssize_t fields, Py_ssize_t *at, Py_ssize_t *size)
{
    Py_ssize_t parts;
    if (!read_array_header(data, length, at, &parts) || parts != 2 + fields || *at >= length || data[*at] != 1) {
        return 0;
    }
    (*at)++;
    return read_array_header(data, length, at, size) && *size <= (length - *at) / (1 + fields);
}

/* The elements of a stored leaf with ``fields`` value fields (``[1, [entry, ...], [value, ...] per
   field]``): 1 with *count set and *elements a PyMem_Malloc'ed array of count keys, then count
   values per field; 0 when the bytes are not such a leaf or do not parse (nothing is allocated:
   the Python decoder then says what is wrong), or hold an infinity or a NaN; -1 with MemoryError. */
static int
leaf_elements(const unsigned char *data, Py_ssize_t length, Py_ssize_t fields, Element **elements,
              Py_ssize_t *count)
{
    Py_ssize_t at = 0, size;
    if (!leaf_header(data, length, fields, &at, &size)) {
        return 0;
    }
    Element *found = PyMem_Malloc(sizeof(Element) * (size_t)(size * (1 + fields)) + 1);
    if (found == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t index = 0; index < size; index++) {
        if (!read_element(data, length, &at, 1, &found[index])) {
            goto damaged;
        }
    }
    for (Py_ssize_t field = 0; field < fields; field++) {
        Py_ssize_t values;
        if (!read_array_header(data, length, &at, &values) || values != size) {
            goto damaged;
        }
        Element *column = found + size * (1 + field);
        for (Py_ssize_t index = 0; index < size; index++) {
            if (!read_element(data, length, &at, 0, &column[index])) {
                goto damaged;
            }
            uint64_t bits;
            if (data[column[index].at] == 0xcb && stored_number(data, &column[index], &bits) == VALUES_FLOAT &&
                (bits & EXPONENT_BITS) == EXPONENT_BITS) {
                goto damaged; /* an infinity or a NaN: damage, which the decode reports */
            }
        }
    }
    if (at != length) {
        goto damaged;
    }
    *elements = found;
    *count = size;
    return 1;
damaged:
    PyMem_Free(found);
    return 0;
}

/* Splicing a stored leaf. A write of a few entries into a leaf of ~100 needs the place of each key
   (to find where the entries go) but, in each value column, only the places where something is
   inserted or dropped: the runs between them are copied as they are. leaf_keys notes every key's
   place; column_marks walks a column by its tags (a table lookup per number), noting only the places
   asked for. A merge of one entry costs a third of what building every element (leaf_elements) and
   copying them one by one costs. */

/* The keys of a stored leaf with ``fields`` value fields (``[1, [entry, ...], [value, ...] per
   field]``): 1 with *count set, *offsets a PyMem_Malloc'ed array of the count + 1 places of the key
   elements (the last: where the keys end) and *at where the first value column begins; 0 when the
   bytes are not such a leaf or do not parse (nothing is allocated); -1 with MemoryError. */
static int
leaf_keys(const unsigned char *data, Py_ssize_t length, Py_ssize_t fields, Py_ssize_t **offsets, Py_ssize_t *count,
          Py_ssize_t *at)
{
    Py_ssize_t here = 0, size;
    if (!leaf_header(data, length, fields, &here, &size)) {
        return 0;
    }
    Py_ssize_t *found = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(size + 1));
    if (found == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t index = 0;
    while (index < size) {
        Element element;
        Py_ssize_t start = here;
        found[index++] = here;
        if (!read_element(data, length, &here, 1, &element)) {
            PyMem_Free(found);
            return 0;
        }
        /* keys of one length follow one another (see skip_bins): their places are known in advance */
        Py_ssize_t step = element.size, header = element.payload - element.at;
        while (index < size && here + step <= length && data[here] == data[start] &&
               (header == 2 ? data[here + 1] == data[start + 1] : memcmp(data + here, data + start, (size_t)header) == 0)) {
            found[index++] = here;
            here += step;
        }
    }
    found[size] = here;
    *offsets = found;
    *count = size;
    *at = here;
    return 1;
}

/* Key ``index`` of a leaf whose key places leaf_keys noted: its bytes and their size. */
static inline const char *
leaf_key(const unsigned char *data, const Py_ssize_t *offsets, Py_ssize_t index, Py_ssize_t *size)
{
    unsigned char tag = data[offsets[index]];
    Py_ssize_t header = tag == 0xc4 ? 2 : tag == 0xc5 ? 3 : 5; /* read_element read a bin there */
    *size = offsets[index + 1] - offsets[index] - header;
    return (const char *)data + offsets[index] + header;
}

/* bisect_left of ``key`` among keys low:count of a leaf whose key places leaf_keys noted. */
static Py_ssize_t
leaf_bisect(const unsigned char *data, const Py_ssize_t *offsets, Py_ssize_t low, Py_ssize_t count, const char *key,
            Py_ssize_t size)
{
    Py_ssize_t high = count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2, stored;
        const char *bytes = leaf_key(data, offsets, middle, &stored);
        if (compare_bytes(bytes, stored, key, size) < 0) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    return low;
}

/* Walk the value column at data[*at], an array of ``count`` stored numbers: 1 with *begin set to the
   place of its first element, places[m] to the place of element marks[m] (``marks`` ascending, a mark
   of ``count`` meaning the column's end) and *at moved past it; 0 for bytes of another layout or a
   stored infinity or NaN (never written: damage, which the Python decoder then reports). */
static int
column_marks(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count,
             const Py_ssize_t *marks, Py_ssize_t nmarks, Py_ssize_t *begin, Py_ssize_t *places)
{
    Py_ssize_t here = *at, stored, mark = 0;
    if (!read_array_header(data, length, &here, &stored) || stored != count) {
        return 0;
    }
    *begin = here;
    for (Py_ssize_t index = 0; index < count; index++) {
        while (mark < nmarks && marks[mark] == index) {
            places[mark++] = here;
        }
        if (here >= length) {
            return 0;
        }
        unsigned char tag = data[here];
        Py_ssize_t size = number_sizes[tag];
        if (size == 0 || size > length - here) {
            return 0;
        }
        if (tag == 0xcb && (data[here + 1] & 0x7F) == 0x7F && (data[here + 2] & 0xF0) == 0xF0) {
            return 0; /* every exponent bit set: an infinity or a NaN */
        }
        here += size;
    }
    while (mark < nmarks) {
        places[mark++] = here;
    }
    *at = here;
    return 1;
}

/* Where each part of a leaf lies (part 0 its keys, part 1 + f field f's values): begins[part] and
   ends[part], and places[part * nmarks + m] where element marks[m] of the part begins, from the key
   places leaf_keys noted (``offsets``, ``count``, ``at``). 1, or 0 when the value columns do not
   parse or the bytes do not end with the last one (see column_marks). */
static int
leaf_parts(const unsigned char *data, Py_ssize_t length, const Py_ssize_t *offsets, Py_ssize_t count, Py_ssize_t at,
           Py_ssize_t parts, const Py_ssize_t *marks, Py_ssize_t nmarks, Py_ssize_t *places, Py_ssize_t *begins,
           Py_ssize_t *ends)
{
    begins[0] = offsets[0];
    ends[0] = offsets[count];
    for (Py_ssize_t part = 1; part < parts; part++) {
        if (!column_marks(data, length, &at, count, marks, nmarks, &begins[part], places + part * nmarks)) {
            return 0;
        }
        ends[part] = at;
    }
    return at == length;
}

/* The new element ``index`` of ``part`` in a splice: the entry (part 0) or its value of field part - 1. */
static inline PyObject *
spliced_item(PyObject *entries, PyObject *cols, Py_ssize_t part, Py_ssize_t index)
{
    return PyList_GET_ITEM(part ? PyList_GET_ITEM(cols, part - 1) : entries, index);
}

/* merge_into for entries that fit the leaf (no split): the leaf's bytes with ``entries[lo:hi]`` (and
   their values) spliced in, each part's stored elements copied in runs. ``offsets``, ``count`` and
   ``at`` are leaf_keys'. The bytes merged_piece writes for the same merge (the tests compare them);
   the index of an entry already in the leaf; None for bytes that do not parse; NULL with an error. */
static PyObject *
merge_spliced(const unsigned char *data, Py_ssize_t length, const Py_ssize_t *offsets, Py_ssize_t count, Py_ssize_t at,
              PyObject *entries, Py_ssize_t lo, Py_ssize_t hi, PyObject *cols)
{
    Py_ssize_t fields = PyList_GET_SIZE(cols), added = hi - lo, parts = 1 + fields;
    /* marks[j]: the stored key new entry lo + j goes before; places[part * added + j]: its byte place */
    Py_ssize_t *marks = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(added * (1 + parts) + 2 * parts) + 1);
    if (marks == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t *places = marks + added, *begins = places + added * parts, *ends = begins + parts;
    PyObject *result = NULL;
    Py_ssize_t low = 0, duplicate = -1;
    for (Py_ssize_t index = lo; index < hi; index++) {
        PyObject *entry = PyList_GET_ITEM(entries, index);
        const char *key = PyBytes_AS_STRING(entry);
        Py_ssize_t size = PyBytes_GET_SIZE(entry), stored;
        low = leaf_bisect(data, offsets, low, count, key, size);
        if (low < count) {
            const char *bytes = leaf_key(data, offsets, low, &stored);
            if (compare_bytes(bytes, stored, key, size) == 0) {
                duplicate = index;
                break;
            }
        }
        marks[index - lo] = low;
        places[index - lo] = offsets[low];
    }
    /* The columns are walked even for a duplicate: a leaf whose columns do not parse is damage, which
       the Python decoder must report, not a duplicate found in its keys. */
    if (!leaf_parts(data, length, offsets, count, at, parts, marks, duplicate < 0 ? added : 0, places, begins,
                    ends)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (duplicate >= 0) {
        result = PyLong_FromSsize_t(duplicate);
        goto done;
    }
    Py_ssize_t total = array_header_size(2 + fields) + 1 + parts * array_header_size(count + added);
    for (Py_ssize_t part = 0; part < parts; part++) {
        total += ends[part] - begins[part];
        for (Py_ssize_t index = lo; index < hi; index++) {
            long long value;
            unsigned long long big;
            int is_unsigned;
            total += scalar_size(spliced_item(entries, cols, part, index), &value, &big, &is_unsigned);
        }
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        goto done;
    }
    char *write = put_array_header(PyBytes_AS_STRING(result), 2 + fields);
    *write++ = 1;
    for (Py_ssize_t part = 0; part < parts; part++) {
        write = put_array_header(write, count + added);
        Py_ssize_t copied = begins[part];
        for (Py_ssize_t index = lo; index < hi; index++) {
            Py_ssize_t place = places[part * added + index - lo];
            memcpy(write, data + copied, (size_t)(place - copied));
            write += place - copied;
            copied = place;
            write = put_scalar(write, spliced_item(entries, cols, part, index));
        }
        memcpy(write, data + copied, (size_t)(ends[part] - copied));
        write += ends[part] - copied;
    }
    assert(write == PyBytes_AS_STRING(result) + total);
done:
    PyMem_Free(marks);
    return result;
}

/* The merge (the arguments' types checked by the caller): a new reference to the bytes, the index of
   a duplicate or None; NULL with an error set. */
static PyObject *
merge_into(PyObject *stored, PyObject *entries, Py_ssize_t lo, Py_ssize_t hi, PyObject *cols, Py_ssize_t limit,
           Py_ssize_t target)
{
    Py_ssize_t fields = PyList_GET_SIZE(cols);
    if (lo > hi || hi > PyList_GET_SIZE(entries)) {
        PyErr_SetString(PyExc_IndexError, "merge_children: lo:hi is not a slice of entries");
        return NULL;
    }
    for (Py_ssize_t field = 0; field < fields; field++) {
        PyObject *column = PyList_GET_ITEM(cols, field);
        if (!PyList_CheckExact(column) || PyList_GET_SIZE(column) < hi) {
            PyErr_SetString(PyExc_TypeError, "merge_children: cols must be lists as long as entries");
            return NULL;
        }
    }
    /* The new entries and values, measured (what pack_node accepts, or the Python code packs them). */
    for (Py_ssize_t index = lo; index < hi; index++) {
        PyObject *entry = PyList_GET_ITEM(entries, index);
        if (!PyBytes_CheckExact(entry)) {
            Py_RETURN_NONE;
        }
        for (Py_ssize_t field = 0; field < fields; field++) {
            int packable = packable_number(PyList_GET_ITEM(PyList_GET_ITEM(cols, field), index));
            if (packable <= 0) {
                return packable < 0 ? NULL : Py_NewRef(Py_None);
            }
        }
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(stored);
    Py_ssize_t length = PyBytes_GET_SIZE(stored), count, at, *offsets;
    int parsed = leaf_keys(data, length, fields, &offsets, &count, &at);
    if (parsed <= 0) {
        return parsed < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (count + (hi - lo) <= limit) { /* no split: spliced */
        PyObject *spliced = merge_spliced(data, length, offsets, count, at, entries, lo, hi, cols);
        PyMem_Free(offsets);
        return spliced;
    }
    PyMem_Free(offsets);
    Element *elements; /* a split: every element noted, the pieces written element by element */
    parsed = leaf_elements(data, length, fields, &elements, &count);
    if (parsed <= 0) {
        return parsed < 0 ? NULL : Py_NewRef(Py_None);
    }
    Py_ssize_t total = count + (hi - lo);
    Py_ssize_t *order = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)total + 1);
    if (order == NULL) {
        PyMem_Free(elements);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    /* The merge order: old entry i as i, new entry j as -1 - j. */
    Py_ssize_t old = 0, out = 0;
    for (Py_ssize_t index = lo; index < hi; index++) {
        PyObject *entry = PyList_GET_ITEM(entries, index);
        const char *key = PyBytes_AS_STRING(entry);
        Py_ssize_t size = PyBytes_GET_SIZE(entry);
        while (old < count) {
            const Element *stored = &elements[old];
            int cmp = compare_bytes((const char *)data + stored->payload, stored->size - (stored->payload - stored->at),
                                    key, size);
            if (cmp > 0) {
                break;
            }
            if (cmp == 0) {
                result = PyLong_FromSsize_t(index);
                goto done;
            }
            order[out++] = old++;
        }
        order[out++] = -1 - index;
    }
    while (old < count) {
        order[out++] = old++;
    }
    Merge merge = {data, elements, count, fields, order, entries, cols};
    /* Split into even pieces of at most ``target`` entries, as NodeTree._cut cuts a leaf. */
    if (target < 1) {
        goto fallback;
    }
    Py_ssize_t pieces = (total + target - 1) / target;
    result = PyList_New(pieces);
    if (result == NULL) {
        goto done;
    }
    for (Py_ssize_t piece = 0; piece < pieces; piece++) {
        Py_ssize_t from = total * piece / pieces, to = total * (piece + 1) / pieces;
        PyObject *bytes = merged_piece(&merge, from, to);
        if (bytes == NULL || piece == 0) {
            if (bytes == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(result, 0, bytes);
            continue;
        }
        PyObject *summary = piece_summary(&merge, from, to);
        if (summary == Py_None) { /* a value the accumulators do not take */
            Py_DECREF(summary);
            Py_DECREF(bytes);
            Py_CLEAR(result);
            goto fallback;
        }
        PyObject *fence = NULL;
        if (summary != NULL) {
            Py_ssize_t source = order[from];
            if (source >= 0) {
                const Element *key = &elements[source];
                fence = PyBytes_FromStringAndSize((const char *)data + key->payload, key->size - (key->payload - key->at));
            }
            else {
                fence = Py_NewRef(PyList_GET_ITEM(entries, -1 - source));
            }
        }
        PyObject *row = fence == NULL ? NULL : PyTuple_Pack(3, fence, bytes, summary);
        Py_XDECREF(fence);
        Py_DECREF(bytes);
        Py_XDECREF(summary);
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, piece, row);
    }
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(elements);
    PyMem_Free(order);
    return result;
}

/* Whether ``source`` is a transaction's source of stored bytes (``_txn.WriteTransaction.stored_source``):
   a tuple ``(skip, encoded, get)`` of a dict of the node ids that have no usable stored bytes (the
   nodes the transaction changed), a dict of node ids to bytes (nodes given in stored form), and
   ``get(key)``, which reads a node's bytes by its 8-byte key (None when absent). */
/* The slot of a node id, its NODES key: the id's low _txn.SLOT_BITS bits (the rest is its version). */
#define NODE_SLOT_BITS 36 /* _txn.SLOT_BITS */
#define NODE_SLOT_MASK ((1ULL << NODE_SLOT_BITS) - 1)

static int
stored_source(PyObject *source)
{
    return PyTuple_CheckExact(source) && PyTuple_GET_SIZE(source) == 3 && PyDict_CheckExact(PyTuple_GET_ITEM(source, 0)) &&
           PyDict_CheckExact(PyTuple_GET_ITEM(source, 1)) && PyCallable_Check(PyTuple_GET_ITEM(source, 2));
}

/* The stored bytes of node ``kid`` (a new reference: bytes, or None), from ``stored``: a callable
   given the id, or a source (above), read as ``WriteTransaction.stored`` reads it, without a Python
   frame per leaf (0.9 us of the 2.6 a leaf of a batch took in this kernel). NULL with an error set. */
static PyObject *
fetch_stored(PyObject *stored, PyObject *kid)
{
    if (!PyTuple_CheckExact(stored)) {
        return PyObject_CallOneArg(stored, kid);
    }
    int skipped = PyDict_Contains(PyTuple_GET_ITEM(stored, 0), kid);
    if (skipped) {
        return skipped < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *data = PyDict_GetItemWithError(PyTuple_GET_ITEM(stored, 1), kid);
    if (data != NULL || PyErr_Occurred()) {
        return data == NULL ? NULL : Py_NewRef(data);
    }
    unsigned long long id = PyLong_AsUnsignedLongLong(kid);
    if (id == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    char key[8];
    put_be(key, id & NODE_SLOT_MASK, 8); /* _txn.node_key: the id's slot */
    PyObject *bytes = PyBytes_FromStringAndSize(key, 8);
    if (bytes == NULL) {
        return NULL;
    }
    data = PyObject_CallOneArg(PyTuple_GET_ITEM(stored, 2), bytes);
    Py_DECREF(bytes);
    return data;
}

/* ``leaf_image(data)`` and ``leaf_lists(image)``: a stored leaf decoded into its search image alone,
  built from its bytes (byte for byte the image of the leaf decoded whole), when every value column
  is all floats or all int64s; and that leaf's keys and columns made from the image, on first use
  (``_node.Node.compact``). One object per decoded leaf instead of ~150;
* ``merge_children(keys, kids, entries, lo, hi, cols, limit, target, stored)``: for an internal node
   whose children are leaves (its ``keys`` and ``kids``), the entries ``lo:hi`` of a sorted batch split
   among its children by their fences (``keys[i] <= child i's entries < keys[i + 1]``), as the Python
   plan splits them, and each touched child's slice merged into the child's stored bytes (above).
   ``stored(node_id)`` gives those bytes, or None for a child the Python code must take (one the
   transaction changed); ``stored`` may be a transaction's source of stored bytes instead (above). Returns a list of ``(child, lo, hi, node_id, merged)`` per touched child, in
   order, ``merged`` being what the merge gave (bytes, pieces, a duplicate's index or None) or None. One
   call per parent instead of a Python loop per leaf: the batch is split first, then, with no pointer
   into a sequence held, each child's bytes are fetched and merged. */
static PyObject *
merge_children(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9 || !PyList_CheckExact(args[2]) || !PyLong_CheckExact(args[3]) || !PyLong_CheckExact(args[4]) ||
        !PyList_CheckExact(args[5]) || !PyLong_CheckExact(args[6]) || !PyLong_CheckExact(args[7]) ||
        !(PyCallable_Check(args[8]) || stored_source(args[8]))) {
        PyErr_SetString(PyExc_TypeError, "merge_children(keys, kids, entries: list, lo: int, hi: int, cols: list, "
                                         "limit: int, target: int, stored: callable | (dict, dict, callable))");
        return NULL;
    }
    PyObject *entries = args[2], *cols = args[5], *stored = args[8];
    Py_ssize_t lo, hi, limit, target;
    if (size_argument(args[3], "merge_children(): lo", &lo) < 0 ||
        size_argument(args[4], "merge_children(): hi", &hi) < 0 ||
        size_argument(args[6], "merge_children(): limit", &limit) < 0 ||
        size_argument(args[7], "merge_children(): target", &target) < 0) {
        return NULL;
    }
    if (lo > hi || hi > PyList_GET_SIZE(entries)) {
        PyErr_SetString(PyExc_IndexError, "merge_children: lo:hi is not a slice of entries");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(args[0], "merge_children: keys must be a sequence of bytes");
    if (keys == NULL) {
        return NULL;
    }
    PyObject *kids = PySequence_Fast(args[1], "merge_children: kids must be a sequence of ints");
    if (kids == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(keys);
    PyObject *result = NULL;
    Py_ssize_t *slices = PyMem_Malloc(sizeof(Py_ssize_t) * 3 * (size_t)(hi - lo) + 1), touched = 0;
    if (slices == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(kids) != size || size == 0) {
        PyErr_SetString(PyExc_TypeError, "merge_children: keys and kids must be as long, and not empty");
        goto done;
    }
    /* Split the slice: no Python code runs while the sequences' items are read. */
    PyObject **fences = PySequence_Fast_ITEMS(keys), **items = PySequence_Fast_ITEMS(entries);
    for (Py_ssize_t index = 0; index < size; index++) {
        if (!PyBytes_Check(fences[index])) {
            PyErr_SetString(PyExc_TypeError, "merge_children: keys must be bytes");
            goto done;
        }
    }
    for (Py_ssize_t index = lo; index < hi; index++) {
        if (!PyBytes_Check(items[index])) {
            PyErr_SetString(PyExc_TypeError, "merge_children: entries must be bytes");
            goto done;
        }
    }
    Py_ssize_t child = 0, at = lo;
    while (at < hi) {
        const char *entry = PyBytes_AS_STRING(items[at]);
        Py_ssize_t entry_size = PyBytes_GET_SIZE(items[at]);
        Py_ssize_t low = child, high = size; /* bisect_right(keys, entry, child) - 1 */
        while (low < high) {
            Py_ssize_t middle = low + (high - low) / 2;
            if (compare_bytes(PyBytes_AS_STRING(fences[middle]), PyBytes_GET_SIZE(fences[middle]), entry,
                              entry_size) <= 0) {
                low = middle + 1;
            }
            else {
                high = middle;
            }
        }
        child = low > 0 ? low - 1 : 0;
        Py_ssize_t stop = hi;
        if (child + 1 < size) { /* bisect_left(entries, keys[child + 1], at + 1, hi) */
            const char *fence = PyBytes_AS_STRING(fences[child + 1]);
            Py_ssize_t fence_size = PyBytes_GET_SIZE(fences[child + 1]);
            low = at + 1;
            high = hi;
            while (low < high) {
                Py_ssize_t middle = low + (high - low) / 2;
                if (compare_bytes(PyBytes_AS_STRING(items[middle]), PyBytes_GET_SIZE(items[middle]), fence,
                                  fence_size) < 0) {
                    low = middle + 1;
                }
                else {
                    high = middle;
                }
            }
            stop = low;
        }
        slices[3 * touched] = child;
        slices[3 * touched + 1] = at;
        slices[3 * touched + 2] = stop;
        touched++;
        at = stop;
    }
    /* Fetch and merge each touched child (fetching runs Python code: items are read again after it). */
    result = PyList_New(0);
    if (result == NULL) {
        goto done;
    }
    for (Py_ssize_t slice = 0; slice < touched; slice++) {
        Py_ssize_t index = slices[3 * slice], start = slices[3 * slice + 1], stop = slices[3 * slice + 2];
        PyObject *kid = PySequence_GetItem(args[1], index);
        if (kid == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyObject *data = fetch_stored(stored, kid);
        PyObject *merged = NULL;
        if (data == Py_None) {
            merged = data;
        }
        else if (data != NULL && PyBytes_CheckExact(data)) {
            merged = merge_into(data, entries, start, stop, cols, limit, target);
            Py_DECREF(data);
        }
        else if (data != NULL) {
            Py_DECREF(data);
            PyErr_SetString(PyExc_TypeError, "merge_children: stored() must return bytes or None");
        }
        PyObject *row = merged == NULL ? NULL : Py_BuildValue("(nnnNN)", index, start, stop, kid, merged);
        if (row == NULL) {
            if (merged == NULL) {
                Py_DECREF(kid);
            }
            Py_CLEAR(result);
            goto done;
        }
        int failed = PyList_Append(result, row);
        Py_DECREF(row);
        if (failed < 0) {
            Py_CLEAR(result);
            goto done;
        }
    }
done:
    PyMem_Free(slices);
    Py_DECREF(keys);
    Py_DECREF(kids);
    return result;
}

/* ------------------------------------------------------------------ editing a stored leaf */

/* A stored number (a value element of a leaf) as the object the decode makes of it. */
static PyObject *
stored_object(const unsigned char *data, const Element *element)
{
    uint64_t word;
    int type = stored_number(data, element, &word);
    if (type == VALUES_FLOAT) {
        double value;
        memcpy(&value, &word, sizeof(value));
        return PyFloat_FromDouble(value);
    }
    if (type == VALUES_NONE) {
        return PyLong_FromUnsignedLongLong(word);
    }
    return PyLong_FromLongLong((long long)(int64_t)word);
}

/* leaf_edit(data, entry, values, nfields) -> (bytes, old values, count) | None | False: one entry of a
   stored leaf removed (``values`` None) or given new values (a tuple of ``nfields`` numbers), in the
   leaf's stored bytes, as ``merge_children`` adds one (``_btree.NodeTree._edit_stored``): the other
   keys and values are copied as they are stored and only new values are packed, so the bytes are
   those ``encode_node`` writes for the changed leaf. Returns the new bytes, the entry's old values
   (as the decode makes them) and the leaf's new entry count; None when the entry is not in the leaf;
   False, making nothing, for an edit left to the Python code: another layout or field count, a value
   pack_node leaves to Python, bytes it cannot parse (the Python decoder then says what is wrong). A
   delete or an update of a scattered item rewrites its leaf without decoding it. O(B). */
static PyObject *
leaf_edit(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) ||
        (args[2] != Py_None && !PyTuple_CheckExact(args[2])) || !PyLong_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "leaf_edit(data: bytes, entry: bytes, values: tuple | None, nfields: int)");
        return NULL;
    }
    Py_ssize_t fields;
    if (size_argument(args[3], "leaf_edit: nfields", &fields) < 0) {
        return NULL;
    }
    PyObject *values = args[2];
    int removing = values == Py_None;
    if (!removing) {
        if (PyTuple_GET_SIZE(values) != fields) {
            PyErr_SetString(PyExc_ValueError, "leaf_edit: values must hold nfields numbers");
            return NULL;
        }
        for (Py_ssize_t field = 0; field < fields; field++) {
            int packable = packable_number(PyTuple_GET_ITEM(values, field));
            if (packable <= 0) {
                return packable < 0 ? NULL : Py_NewRef(Py_False);
            }
        }
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[0]), count, at, *offsets;
    int parsed = leaf_keys(data, length, fields, &offsets, &count, &at);
    if (parsed <= 0) {
        return parsed < 0 ? NULL : Py_NewRef(Py_False);
    }
    const char *key = PyBytes_AS_STRING(args[1]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[1]), stored;
    Py_ssize_t low = leaf_bisect(data, offsets, 0, count, key, size);
    int present = low < count;
    if (present) {
        const char *found = leaf_key(data, offsets, low, &stored);
        present = compare_bytes(found, stored, key, size) == 0;
    }
    PyObject *result = NULL, *old = NULL, *bytes = NULL;
    Py_ssize_t parts = 1 + fields, marks[2] = {low, present ? low + 1 : low};
    Py_ssize_t *places = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(4 * parts)); /* per part: where the
        entry's element begins and ends, where the part's elements begin, and where they end */
    if (places == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t *begins = places + 2 * parts, *ends = begins + parts;
    places[0] = offsets[marks[0]];
    places[1] = offsets[marks[1]];
    if (!leaf_parts(data, length, offsets, count, at, parts, marks, 2, places, begins, ends)) {
        result = Py_NewRef(Py_False); /* read whole, an absent entry's leaf too */
        goto done;
    }
    if (!present) {
        result = Py_NewRef(Py_None); /* not in this leaf */
        goto done;
    }
    old = PyTuple_New(fields);
    if (old == NULL) {
        goto done;
    }
    for (Py_ssize_t field = 0; field < fields; field++) {
        const Py_ssize_t *mine = places + 2 * (1 + field);
        Element element = {.at = mine[0], .size = mine[1] - mine[0], .payload = mine[0]};
        PyObject *value = stored_object(data, &element);
        if (value == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(old, field, value);
    }
    /* The new bytes: each part's elements before the entry's and after it copied as they are (each
       part's elements lie one after another), the entry's own dropped, or its values packed anew. */
    Py_ssize_t after = removing ? count - 1 : count;
    Py_ssize_t total = array_header_size(2 + fields) + 1 + parts * array_header_size(after);
    for (Py_ssize_t part = 0; part < parts; part++) {
        total += ends[part] - begins[part] - (places[2 * part + 1] - places[2 * part]);
        if (part && !removing) {
            long long value;
            unsigned long long big;
            int is_unsigned;
            total += scalar_size(PyTuple_GET_ITEM(values, part - 1), &value, &big, &is_unsigned);
        }
    }
    if (!removing) { /* the entry's key stays */
        total += places[1] - places[0];
    }
    bytes = PyBytes_FromStringAndSize(NULL, total);
    if (bytes == NULL) {
        goto done;
    }
    char *write = put_array_header(PyBytes_AS_STRING(bytes), 2 + fields);
    *write++ = 1;
    for (Py_ssize_t part = 0; part < parts; part++) {
        write = put_array_header(write, after);
        Py_ssize_t cut = places[2 * part], rest = places[2 * part + 1];
        memcpy(write, data + begins[part], (size_t)(cut - begins[part]));
        write += cut - begins[part];
        if (!removing) {
            if (part) {
                write = put_scalar(write, PyTuple_GET_ITEM(values, part - 1));
            }
            else {
                memcpy(write, data + cut, (size_t)(rest - cut));
                write += rest - cut;
            }
        }
        memcpy(write, data + rest, (size_t)(ends[part] - rest));
        write += ends[part] - rest;
    }
    assert(write == PyBytes_AS_STRING(bytes) + total);
    result = Py_BuildValue("(OOn)", bytes, old, after);
done:
    Py_XDECREF(bytes);
    Py_XDECREF(old);
    PyMem_Free(places);
    PyMem_Free(offsets);
    return result;
}

/* ------------------------------------------------------------------ appending to a pending node */

/* append_pending(packed, entry, values, capacity): the stored bytes of a pending node (``_node``
   layout ``[4, [entry, ...], [value, ...] per field]``) with ``entry`` and its values appended, when
   ``entry`` sorts after every stored entry and the node then holds fewer than ``capacity`` entries.
   The stored keys and values are copied as they are and only the new ones packed, as pack_node packs
   them, so the bytes are those ``encode_node`` writes for the appended node. A new event per
   committed transaction costs this one call instead of a copy of the node's lists, the appends, the
   node's packing and its freezing at commit (see ``_tree.appended``).

   Returns None when the append is not for this kernel: an entry not after the last one, a full node,
   a value pack_node leaves to Python, another layout or field count, or bytes it cannot parse (the
   Python code then decodes the node, which says what is wrong). */
#define APPEND_FIELDS 64 /* value fields this kernel appends to; more are left to Python */

static PyObject *
append_pending(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) ||
        !PyTuple_CheckExact(args[2]) || !PyLong_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "append_pending(packed: bytes, entry: bytes, values: tuple, capacity: int)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[0]);
    PyObject *entry = args[1], *values = args[2];
    Py_ssize_t fields = PyTuple_GET_SIZE(values);
    Py_ssize_t capacity = PyLong_AsSsize_t(args[3]);
    if (capacity == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t at = 0, parts, count, column;
    if (fields > APPEND_FIELDS || PyBytes_GET_SIZE(args[1]) > 0xFFFF ||
        !read_array_header(data, length, &at, &parts) || parts != fields + 2 || at >= length ||
        data[at] != 4) {
        Py_RETURN_NONE;
    }
    Py_ssize_t kind_end = ++at; /* the outer header and the kind are copied as they are */
    if (!read_array_header(data, length, &at, &count) || count < 1 || count + 1 >= capacity) {
        Py_RETURN_NONE;
    }
    Py_ssize_t keys_start = at;
    Element last = {0, 0, 0};
    for (Py_ssize_t index = 0; index < count; index++) {
        if (!read_element(data, length, &at, 1, &last)) {
            Py_RETURN_NONE;
        }
    }
    if (compare_bytes((const char *)data + last.payload, last.size - (last.payload - last.at),
                      PyBytes_AS_STRING(entry), PyBytes_GET_SIZE(entry)) >= 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t keys_end = at;
    Py_ssize_t starts[APPEND_FIELDS], ends[APPEND_FIELDS];
    Py_ssize_t added = bin_header_size(PyBytes_GET_SIZE(entry)) + PyBytes_GET_SIZE(entry);
    for (Py_ssize_t field = 0; field < fields; field++) {
        if (!read_array_header(data, length, &at, &column) || column != count) {
            Py_RETURN_NONE;
        }
        starts[field] = at;
        Element element;
        for (Py_ssize_t index = 0; index < count; index++) {
            if (!read_element(data, length, &at, 0, &element)) {
                Py_RETURN_NONE;
            }
        }
        ends[field] = at;
        long long value;
        unsigned long long big;
        int is_unsigned;
        Py_ssize_t size = scalar_size(PyTuple_GET_ITEM(values, field), &value, &big, &is_unsigned);
        if (size <= 0 || PyBytes_CheckExact(PyTuple_GET_ITEM(values, field))) {
            if (size < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        added += size;
    }
    if (at != length) {
        Py_RETURN_NONE;
    }
    Py_ssize_t grow = array_header_size(count + 1) - array_header_size(count);
    Py_ssize_t total = length + added + (1 + fields) * grow;
    PyObject *packed = PyBytes_FromStringAndSize(NULL, total);
    if (packed == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(packed);
    memcpy(out, data, (size_t)kind_end);
    out = put_array_header(out + kind_end, count + 1);
    memcpy(out, data + keys_start, (size_t)(keys_end - keys_start));
    out = put_scalar(out + (keys_end - keys_start), entry);
    for (Py_ssize_t field = 0; field < fields; field++) {
        out = put_array_header(out, count + 1);
        memcpy(out, data + starts[field], (size_t)(ends[field] - starts[field]));
        out = put_scalar(out + (ends[field] - starts[field]), PyTuple_GET_ITEM(values, field));
    }
    assert(out == PyBytes_AS_STRING(packed) + total);
    return packed;
}

/* pending_edges(packed) -> (count, first, last) | None: the entry count and the first and last
   entries of a pending node's stored bytes, read in place (no image, no lists). A read whose bounds fall outside them takes none
   or all of the pending entries without decoding the node (see _tree.Tree.pending). None when the
   bytes are not a pending node with at least one entry (the decoder then says what is wrong). */
static PyObject *
pending_edges(PyObject *Py_UNUSED(module), PyObject *packed)
{
    if (!PyBytes_CheckExact(packed)) {
        PyErr_SetString(PyExc_TypeError, "pending_edges(packed: bytes)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(packed);
    Py_ssize_t length = PyBytes_GET_SIZE(packed);
    Py_ssize_t at = 0, parts, count;
    if (!read_array_header(data, length, &at, &parts) || parts < 2 || at >= length || data[at] != 4) {
        Py_RETURN_NONE;
    }
    at++;
    if (!read_array_header(data, length, &at, &count) || count < 1) {
        Py_RETURN_NONE;
    }
    Element first, last;
    if (!read_element(data, length, &at, 1, &first)) {
        Py_RETURN_NONE;
    }
    last = first;
    for (Py_ssize_t index = 1; index < count; index++) {
        if (!read_element(data, length, &at, 1, &last)) {
            Py_RETURN_NONE;
        }
    }
    return Py_BuildValue("(ny#y#)", count, (const char *)data + first.payload,
                         first.size - (first.payload - first.at), (const char *)data + last.payload,
                         last.size - (last.payload - last.at));
}

/* ------------------------------------------------------------------ internal nodes, wide sums */

/* Internal nodes keep exact sums, scaled by 2**1074 with their shared trailing zeros factored out;
   a float sum column often needs 65-90 bits, beyond msgpack's ints. Such a node is stored "wide"
   (see _node.encode_node): each sum column split into the fewest 63-bit limbs that leave its top limb
   in int64, most significant first: value = top * 2**(63k) + sum(limb_i * 2**(63i)). */

#define LIMB_BITS 63
#define LIMB_MASK ((1ULL << LIMB_BITS) - 1)

/* How many limbs below the top one a value needs (0 when it fits int64), or -1 with an error set;
   ``*plain`` is cleared when the value is beyond msgpack's ints (-2**63 to 2**64 - 1). */
static Py_ssize_t
extra_limbs(PyObject *item, int *plain)
{
    long long small;
    if (small_int(item, &small)) {
        return 0;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!overflow) {
        return 0;
    }
    if (overflow > 0) { /* the commonest big sum: positive, its bits counted once */
        int64_t bits = (int64_t)_PyLong_NumBits(item);
        if (bits < 0) {
            return -1;
        }
        *plain = *plain && bits <= 64;
        return (Py_ssize_t)((bits - 1) / LIMB_BITS);
    }
    *plain = 0;
    /* v >= 0 fits k extra limbs when bit_length(v) <= 63(k + 1); v < 0 when bit_length(~v) does. */
    PyObject *magnitude = overflow > 0 ? Py_NewRef(item) : PyNumber_Invert(item);
    if (magnitude == NULL) {
        return -1;
    }
    int64_t bits = (int64_t)_PyLong_NumBits(magnitude);
    Py_DECREF(magnitude);
    if (bits < 0) {
        return -1;
    }
    return (Py_ssize_t)((bits - 1) / LIMB_BITS);
}

/* The extra limbs the widest int of a sum column needs (extra_limbs of each; *plain cleared when one
   is beyond msgpack's ints): >= 0; -2 when an item is not an exact int (left to the Python code); -1
   with an error set. */
static Py_ssize_t
column_extra(PyObject *const *items, Py_ssize_t count, int *plain)
{
    Py_ssize_t most = 0;
    for (Py_ssize_t at = 0; at < count; at++) {
        if (!PyLong_CheckExact(items[at])) {
            return -2;
        }
        Py_ssize_t extra = extra_limbs(items[at], plain);
        if (extra < 0) {
            return -1;
        }
        most = extra > most ? extra : most;
    }
    return most;
}

/* Split an int into 1 + extra limbs, most significant first (the top one signed). 0, or -1 with an
   error set. */
static int
split_limbs(PyObject *item, Py_ssize_t extra, long long *limbs)
{
    int overflow = 0;
    long long value;
    if (!small_int(item, &value)) {
        value = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (value == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    if (!overflow) { /* the low limb holds its bits, every higher one its sign */
        long long sign = value < 0 ? -1 : 0;
        for (Py_ssize_t index = 0; index < extra; index++) {
            limbs[extra - index] = index == 0 ? (long long)((unsigned long long)value & LIMB_MASK)
                                              : (long long)((unsigned long long)sign & LIMB_MASK);
        }
        limbs[0] = extra ? sign : value;
        return 0;
    }
    size_t length = 8 * (size_t)extra + 16; /* two's complement, with room for the last 9-byte read */
    unsigned char local[128];
    unsigned char *bytes = length <= sizeof(local) ? local : PyMem_Malloc(length);
    if (bytes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    int failed = _PyLong_AsByteArray((PyLongObject *)item, bytes, length, 1, 1, 1);
#else
    int failed = _PyLong_AsByteArray((PyLongObject *)item, bytes, length, 1, 1);
#endif
    if (!failed) {
        for (Py_ssize_t index = 0; index <= extra; index++) {
            size_t bit = (size_t)index * LIMB_BITS, at = bit / 8;
            int shift = (int)(bit % 8);
            unsigned long long word = 0;
            for (int byte = 0; byte < 8; byte++) {
                word |= (unsigned long long)bytes[at + (size_t)byte] << (8 * byte);
            }
            if (shift) {
                word = (word >> shift) | ((unsigned long long)bytes[at + 8] << (64 - shift));
            }
            limbs[extra - index] = index < extra ? (long long)(word & LIMB_MASK) : (long long)word;
        }
    }
    if (bytes != local) {
        PyMem_Free(bytes);
    }
    return failed ? -1 : 0;
}

/* join_limbs(limbs) -> tuple[int, ...] | None: _node._join_limbs, the inverse of the split above:
   ``limbs`` holds a column's limbs, most significant first (the top one a signed int64, the others
   in [0, 2**63)); each value is assembled as a two's complement number of 64-bit words, then made
   an int in one call. None for anything else (left to the Python code): a limb that is not an
   exact int in its range, columns of unequal lengths, more than 64 limbs. */
static PyObject *
join_limbs(PyObject *Py_UNUSED(module), PyObject *limbs)
{
    if (!PyTuple_CheckExact(limbs) && !PyList_CheckExact(limbs)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t depth = PySequence_Fast_GET_SIZE(limbs);
    if (depth < 1 || depth > 64) {
        Py_RETURN_NONE;
    }
    PyObject **columns = PySequence_Fast_ITEMS(limbs);
    Py_ssize_t size = -1;
    for (Py_ssize_t level = 0; level < depth; level++) {
        PyObject *column = columns[level];
        if (!PyTuple_CheckExact(column) && !PyList_CheckExact(column)) {
            Py_RETURN_NONE;
        }
        Py_ssize_t length = PySequence_Fast_GET_SIZE(column);
        if (size >= 0 && length != size) {
            Py_RETURN_NONE;
        }
        size = length;
    }
    PyObject *out = PyTuple_New(size);
    if (out == NULL) {
        return NULL;
    }
    Py_ssize_t top_bit = LIMB_BITS * (depth - 1); /* where the top limb starts */
    Py_ssize_t nwords = (top_bit + 64 + 63) / 64;
    uint64_t words[64];
    unsigned char bytes[8 * 64];
    for (Py_ssize_t index = 0; index < size; index++) {
        memset(words, 0, sizeof(uint64_t) * (size_t)nwords);
        long long top;
        int found = exact_int64(PySequence_Fast_ITEMS(columns[0])[index], &top);
        for (Py_ssize_t level = 1; found > 0 && level < depth; level++) {
            long long limb;
            found = exact_int64(PySequence_Fast_ITEMS(columns[level])[index], &limb);
            if (found > 0 && (limb < 0)) { /* a lower limb holds 63 bits: [0, 2**63) */
                found = 0;
            }
            if (found > 0) {
                Py_ssize_t bit = LIMB_BITS * (depth - 1 - level), word = bit / 64;
                int shift = (int)(bit % 64);
                words[word] |= (uint64_t)limb << shift;
                if (shift) {
                    words[word + 1] |= (uint64_t)limb >> (64 - shift);
                }
            }
        }
        if (found <= 0) {
            Py_DECREF(out);
            if (found < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        Py_ssize_t word = top_bit / 64;
        int shift = (int)(top_bit % 64);
        words[word] |= (uint64_t)top << shift;
        Py_ssize_t next = word + 1;
        if (shift && next < nwords) {
            words[next++] |= (uint64_t)(top >> (64 - shift)); /* arithmetic: the sign comes along */
        }
        for (; next < nwords; next++) {
            words[next] = top < 0 ? ~UINT64_C(0) : 0;
        }
        for (Py_ssize_t at = 0; at < nwords; at++) {
            for (int byte = 0; byte < 8; byte++) {
                bytes[8 * at + byte] = (unsigned char)(words[at] >> (8 * byte));
            }
        }
        PyObject *value = _PyLong_FromByteArray(bytes, (size_t)(8 * nwords), 1, 1);
        if (value == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, index, value);
    }
    return out;
}

static PyObject *pack_node(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

static PyObject *
pack_internal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || !PyLong_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pack_internal(parts: tuple of sequences, nfields: int)");
        return NULL;
    }
    PyObject *parts = args[0];
    Py_ssize_t count = PyTuple_GET_SIZE(parts);
    Py_ssize_t nfields = PyLong_AsSsize_t(args[1]);
    if (nfields == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t first = 4, stop = 4 + nfields; /* parts: keys, kids, shifts, counts, sums..., floats... */
    if (nfields < 0 || stop > count || count < 4) {
        PyErr_SetString(PyExc_ValueError, "pack_internal: parts must be keys, kids, shifts and the columns");
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *part = PyTuple_GET_ITEM(parts, index);
        if (!PyList_CheckExact(part) && !PyTuple_CheckExact(part)) {
            Py_RETURN_NONE;
        }
    }
    /* How many limbs each sum column needs; a node whose sums all fit int64 is packed plainly. */
    Py_ssize_t size = PySequence_Fast_GET_SIZE(PyTuple_GET_ITEM(parts, 0));
    Py_ssize_t extras[256];
    if (nfields > 256) {
        Py_RETURN_NONE;
    }
    int plain = 1;
    for (Py_ssize_t column = first; column < stop; column++) {
        PyObject *part = PyTuple_GET_ITEM(parts, column);
        if (PySequence_Fast_GET_SIZE(part) != size) {
            Py_RETURN_NONE;
        }
        Py_ssize_t most = column_extra(PySequence_Fast_ITEMS(part), size, &plain);
        if (most < 0) {
            return most == -1 ? NULL : Py_NewRef(Py_None);
        }
        extras[column - first] = most;
    }
    int wide = !plain; /* a sum in [2**63, 2**64) still fits msgpack's uint64: plain if every one does */
    if (!wide) {
        PyObject *arguments[2] = {NULL, parts};
        arguments[0] = PyLong_FromLong(2);
        if (arguments[0] == NULL) {
            return NULL;
        }
        PyObject *packed = pack_node(module, arguments, 2);
        Py_DECREF(arguments[0]);
        return packed;
    }
    /* The wide form: [3, keys, kids, shifts, [limbs per column], each column's limbs in turn]. */
    Py_ssize_t columns = count - 3, flat = columns - nfields, limbs_total = 0;
    for (Py_ssize_t column = first; column < stop; column++) {
        flat += extras[column - first] + 1;
        limbs_total += (extras[column - first] + 1) * size;
    }
    long long *limbs = PyMem_Malloc((size_t)limbs_total * sizeof(long long));
    long long *split = PyMem_Malloc(sizeof(long long) * (size_t)(64 + 1));
    if (limbs == NULL || split == NULL) {
        PyMem_Free(limbs);
        PyMem_Free(split);
        return PyErr_NoMemory();
    }
    Py_ssize_t total = array_header_size(5 + flat) + 1 + array_header_size(columns), at_limb = 0;
    for (Py_ssize_t column = first; column < stop; column++) {
        Py_ssize_t extra = extras[column - first];
        PyObject **items = PySequence_Fast_ITEMS(PyTuple_GET_ITEM(parts, column));
        if (extra > 64) { /* a sum of more than 4,000 bits: left to the Python code */
            PyMem_Free(limbs);
            PyMem_Free(split);
            Py_RETURN_NONE;
        }
        for (Py_ssize_t at = 0; at < size; at++) {
            if (split_limbs(items[at], extra, split) < 0) {
                PyMem_Free(limbs);
                PyMem_Free(split);
                return NULL;
            }
            for (Py_ssize_t limb = 0; limb <= extra; limb++) {
                limbs[at_limb + limb * size + at] = split[limb];
            }
        }
        at_limb += (extra + 1) * size;
        total += (extra + 1) * array_header_size(size) + int_size(extra + 1);
    }
    PyMem_Free(split);
    for (Py_ssize_t index = 0; index < limbs_total; index++) {
        total += int_size(limbs[index]);
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        if (index >= first && index < stop) {
            continue;
        }
        Py_ssize_t length = part_size(PyTuple_GET_ITEM(parts, index));
        if (length <= 0) {
            PyMem_Free(limbs);
            if (length < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        total += length + (index >= 3 ? int_size(1) : 0);
    }
    PyObject *packed = PyBytes_FromStringAndSize(NULL, total);
    if (packed == NULL) {
        PyMem_Free(limbs);
        return NULL;
    }
    char *out = put_array_header(PyBytes_AS_STRING(packed), 5 + flat);
    *out++ = (char)3;
    for (Py_ssize_t index = 0; index < 3; index++) {
        out = put_part(out, PyTuple_GET_ITEM(parts, index));
    }
    out = put_array_header(out, columns);
    for (Py_ssize_t column = 3; column < count; column++) {
        out = put_int(out, column >= first && column < stop ? extras[column - first] + 1 : 1);
    }
    at_limb = 0;
    for (Py_ssize_t column = 3; column < count; column++) {
        if (column >= first && column < stop) {
            for (Py_ssize_t limb = 0; limb <= extras[column - first]; limb++) {
                out = put_array_header(out, size);
                for (Py_ssize_t at = 0; at < size; at++) {
                    out = put_int(out, limbs[at_limb++]);
                }
            }
            continue;
        }
        out = put_part(out, PyTuple_GET_ITEM(parts, column));
    }
    PyMem_Free(limbs);
    assert(out == PyBytes_AS_STRING(packed) + total);
    return packed;
}

/* ------------------------------------------------------------------ repacking a changed internal node */

/* A write of one item (an insert, a delete, a change of values) rewrites the internal nodes on its
   path, and each of them differs from the committed node it was copied from in one child: its id,
   and the count and sums the write added. repack_internal writes such a node's bytes from the bytes
   of that committed node: the numbers that changed are encoded again, everything else is copied as
   it is. A node of 48 children whose sums are wide took 5 us to pack, element by element (about 340
   of them, each converted and sized); a repack walks the stored bytes and encodes a handful.

   The result is byte for byte what pack_internal writes for the node (the form, plain or wide, and
   each sum column's number of limbs are worked out as pack_internal works them out, from every value
   of the node), or None when the node differs otherwise (a key, a shift, more than REPACK_CHANGES
   numbers), when the form or a limb count changed, or when the stored bytes are not of the layout
   this expects: the caller then packs the node in full. */

#define REPACK_CHANGES 16

typedef struct {
    Py_ssize_t part;  /* 0: the kids; 1 + c: column c */
    Py_ssize_t index; /* the child */
    PyObject *item;   /* its new value (borrowed from the node's list) */
} Change;

/* run_masks[size][word]: the bytes of ``size`` words (8 * size bytes, eight numbers of ``size`` bytes)
   where a number's tag lies, 0xff each (made as bytes, so whatever the machine's byte order). */
static uint64_t run_masks[6][5];

static void
init_run_masks(void)
{
    for (int size = 2; size <= 5; size++) {
        unsigned char bytes[40] = {0};
        for (int place = 0; place < 8 * size; place += size) {
            bytes[place] = 0xff;
        }
        memcpy(run_masks[size], bytes, (size_t)(8 * size));
    }
}

/* The tag bits that differ from ``pattern`` (a tag in every byte) among eight numbers of ``words``
   bytes each at ``place``: 0 when all eight have the tag. */
static inline uint64_t
run_off(const unsigned char *place, uint64_t pattern, const uint64_t *masks, int words)
{
    uint64_t off = 0;
    for (int word = 0; word < words; word++) {
        uint64_t value;
        memcpy(&value, place + 8 * word, 8);
        off |= (value ^ pattern) & masks[word];
    }
    return off;
}

/* Skip ``count`` stored numbers from data[*at]: 1, or 0 for another tag or bytes that end first.

   Each number's place depends on the size of the one before, so a plain walk waits for two loads
   per number (its tag, then the tag's size). The numbers of a column mostly share one tag, though:
   within a run of that tag the next place is known before the tag there is read, and the loads
   overlap. Eight places of a run of 2, 3 or 5-byte numbers are checked at once (their tags masked
   out of 2, 3 or 5 words), then four at a time, one branch for them all. Fixints (counts, small
   ids, zeros) each have a tag of their own, so they are checked eight bytes at a time instead: a
   word with no high bit set is eight of them. Every array of a node is walked so, whole, on each
   repack (a 115-child node: ~900 numbers and keys). */
static int
skip_numbers(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count)
{
    Py_ssize_t here = *at, left = count;
    while (left > 0) {
        if (here >= length || !number_sizes[data[here]]) {
            return 0;
        }
        unsigned char tag = data[here];
        Py_ssize_t size = number_sizes[tag];
        here += size;
        left--;
        if (size == 1) {
            uint64_t word;
            while (left >= 8 && length - here >= 8) {
                memcpy(&word, data + here, 8);
                if (word & UINT64_C(0x8080808080808080)) {
                    break;
                }
                here += 8;
                left -= 8;
            }
            continue;
        }
        if (size <= 5) { /* 2, 3 or 5 bytes: eight places checked at once, in 2, 3 or 5 words */
            uint64_t pattern = UINT64_C(0x0101010101010101) * tag;
            const uint64_t *masks = run_masks[size];
            while (left >= 8 && length - here >= 8 * size) {
                uint64_t off = size == 2   ? run_off(data + here, pattern, masks, 2)
                               : size == 3 ? run_off(data + here, pattern, masks, 3)
                                           : run_off(data + here, pattern, masks, 5);
                if (off) {
                    break;
                }
                here += 8 * size;
                left -= 8;
            }
        }
        while (left >= 4 && length - here > 3 * size && data[here] == tag && data[here + size] == tag &&
               data[here + 2 * size] == tag && data[here + 3 * size] == tag) {
            here += 4 * size;
            left -= 4;
        }
        while (left > 0 && here < length && data[here] == tag) {
            here += size;
            left--;
        }
    }
    if (here > length) {
        return 0;
    }
    *at = here;
    return 1;
}

/* Skip ``count`` stored byte strings (bin 8 or 16, as a node's keys are) from data[*at], runs of one
   length at a time (see skip_numbers; the header compared in place, not by a call to memcmp): 1, or
   0 for another tag or bytes that end first. */
static int
skip_bins(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count)
{
    Py_ssize_t here = *at, index = 0;
    while (index < count) {
        Element element;
        Py_ssize_t start = here;
        if (!read_element(data, length, &here, 1, &element)) {
            return 0;
        }
        index++;
        Py_ssize_t size = element.size, header = element.payload - element.at;
        if (header > 3) {
            continue;
        }
        unsigned char tag = data[start], first = data[start + 1], second = header == 3 ? data[start + 2] : 0;
        if (header == 2) { /* bin 8, the keys' usual header: four places checked per step */
            while (count - index >= 4 && length - here > 3 * size + 1 && data[here] == tag &&
                   data[here + 1] == first && data[here + size] == tag && data[here + size + 1] == first &&
                   data[here + 2 * size] == tag && data[here + 2 * size + 1] == first &&
                   data[here + 3 * size] == tag && data[here + 3 * size + 1] == first) {
                here += 4 * size;
                index += 4;
            }
        }
        while (index < count && length - here >= header && data[here] == tag && data[here + 1] == first &&
               (header == 2 || data[here + 2] == second)) {
            here += size;
            index++;
        }
    }
    if (here > length) {
        return 0;
    }
    *at = here;
    return 1;
}

/* One stored number of a repacked node written anew: data[start:stop] replaced by ``size`` bytes. The
   edits of a node are noted as its stored bytes are walked, in their order there; then the new bytes
   are made at their exact size, the runs between the edits copied whole (a bytes object made larger
   and cut down after cost a realloc, and the piece it freed made the next large malloc consolidate
   glibc's free chunks: 5% of a bump). */
typedef struct {
    Py_ssize_t start, stop;
    Py_ssize_t size;
    char bytes[9];
} Edit;

/* Write ``data`` (``length`` bytes) into ``out`` with ``edits`` made (ascending, not overlapping): the
   runs between them copied whole. */
static void
write_edits(char *out, const unsigned char *data, Py_ssize_t length, const Edit *edits, Py_ssize_t nedits)
{
    Py_ssize_t copied = 0; /* data[:copied] is written */
    for (const Edit *each = edits; each < edits + nedits; each++) {
        memcpy(out, data + copied, (size_t)(each->start - copied));
        out += each->start - copied;
        memcpy(out, each->bytes, (size_t)each->size);
        out += each->size;
        copied = each->stop;
    }
    memcpy(out, data + copied, (size_t)(length - copied));
}

/* The changes the node makes to one array (``part``), with the stored bytes of that array at
   data[*at] (``count`` elements, numbers only): an edit for each changed element, noted at *edits
   (limb ``limb`` of each new value of a wide sum column split into 1 + ``extra`` limbs, or the value
   itself when ``limb`` is -1). 1 with *at and *edits moved on; 0 for bytes of another layout or a
   value pack_internal would leave to Python; -1 with an error set. */
static int
patch_array(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count, Edit **edits,
            const Change *changes, Py_ssize_t nchanges, Py_ssize_t limb, Py_ssize_t extra)
{
    Py_ssize_t stored, done = 0;
    if (!read_array_header(data, length, at, &stored) || stored != count) {
        return 0;
    }
    for (Py_ssize_t next = 0; next < nchanges; next++) {
        Py_ssize_t index = changes[next].index;
        if (!skip_numbers(data, length, at, index - done)) {
            return 0;
        }
        Py_ssize_t start = *at;
        if (!skip_numbers(data, length, at, 1)) {
            return 0;
        }
        done = index + 1;
        Edit *edit = (*edits)++;
        edit->start = start;
        edit->stop = *at;
        char *out = edit->bytes;
        PyObject *item = changes[next].item;
        if (limb >= 0) {
            long long limbs[65];
            if (split_limbs(item, extra, limbs) < 0) {
                return -1;
            }
            out = put_int(out, limbs[limb]);
        }
        else {
            long long value = 0;
            unsigned long long big = 0;
            int is_unsigned = 0;
            Py_ssize_t size = scalar_size(item, &value, &big, &is_unsigned);
            if (size <= 0) {
                return (int)size;
            }
            if (is_unsigned) {
                *out++ = (char)0xcf;
                out = put_be(out, big, 8);
            }
            else {
                out = put_int(out, value);
            }
        }
        edit->size = out - edit->bytes;
    }
    return skip_numbers(data, length, at, count - done);
}

/* Skip ``count`` stored elements (bins when ``bin``, else numbers) of the array at data[*at]: 1, or
   0 for bytes of another layout. */
static int
skip_array(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count, int bin)
{
    Py_ssize_t stored;
    if (!read_array_header(data, length, at, &stored) || stored != count) {
        return 0;
    }
    return (bin ? skip_bins : skip_numbers)(data, length, at, count);
}

/* The items of a node's part: a list or tuple of ``count`` items, or NULL. */
static PyObject **
part_items(PyObject *part, Py_ssize_t count)
{
    if ((!PyList_CheckExact(part) && !PyTuple_CheckExact(part)) || PySequence_Fast_GET_SIZE(part) != count) {
        return NULL;
    }
    return PySequence_Fast_ITEMS(part);
}

/* Whether two items of a node are the same number (or the same bytes, for keys): 1, 0, or -1. */
static int
same_item(PyObject *mine, PyObject *theirs, int bin)
{
    if (mine == theirs) {
        return 1;
    }
    if (bin) {
        return PyBytes_CheckExact(mine) && PyBytes_CheckExact(theirs) &&
               PyBytes_GET_SIZE(mine) == PyBytes_GET_SIZE(theirs) &&
               memcmp(PyBytes_AS_STRING(mine), PyBytes_AS_STRING(theirs), (size_t)PyBytes_GET_SIZE(mine)) == 0;
    }
    if (!PyLong_CheckExact(mine) || !PyLong_CheckExact(theirs)) {
        return 0;
    }
    return PyObject_RichCompareBool(mine, theirs, Py_EQ); /* exact ints: no Python code runs */
}

/* The bytes of an internal node (the items of each of its columns, ``cols``, ``count`` children) from ``packed``, the stored
   bytes of the committed node it was made from, which differs from it in ``changes`` alone (sorted by
   part, then child; changes[firsts[part]:firsts[part + 1]] are those of part 0, the kids, and 1 + c,
   column c): bytes, None, or NULL with an error set, as repack_internal.

   ``trusted`` says that ``packed`` is that node's own bytes, as bump_internal is given them: when they
   are plain, every unchanged sum fits msgpack's ints, so the node stays plain if each changed sum does,
   and the sum columns need not be scanned (every sum checked for its limbs, ~230 ints for a node of
   115 children and two fields). A wide node's limbs are always worked out from every sum, and
   checked against the stored counts, as the full pack would. */
static PyObject *
repack_changes(PyObject **const *cols, Py_ssize_t count, PyObject *packed, Py_ssize_t nfields, const Change *changes,
               Py_ssize_t nchanges, const Py_ssize_t *firsts, int trusted)
{
    if (nchanges == 0) {
        return Py_NewRef(packed);
    }
    Py_ssize_t columns = 1 + 2 * nfields;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(packed);
    Py_ssize_t length = PyBytes_GET_SIZE(packed), at = 0, top;
    /* The form and each sum column's limbs, as pack_internal works them out. */
    Py_ssize_t extras[256];
    int plain = 1, known = 0;
    if (trusted && read_array_header(data, length, &at, &top) && at < length && data[at] == 2) {
        for (Py_ssize_t index = firsts[2]; index < firsts[2 + nfields]; index++) {
            if (!PyLong_CheckExact(changes[index].item)) {
                Py_RETURN_NONE; /* as column_extra leaves it */
            }
            if (extra_limbs(changes[index].item, &plain) < 0) {
                return NULL;
            }
        }
        known = plain; /* else wide now: every sum's limbs are needed */
        if (known) {
            memset(extras, 0, sizeof(Py_ssize_t) * (size_t)nfields); /* no limbs when plain */
        }
    }
    if (!known && cols == NULL) { /* (bump_internal gives no columns when it found the node stays plain) */
        Py_RETURN_NONE;
    }
    for (Py_ssize_t field = 0; field < nfields && !known; field++) {
        Py_ssize_t most = column_extra(cols[1 + field], count, &plain);
        if (most == -1) {
            return NULL;
        }
        if (most < 0 || most > 64) {
            Py_RETURN_NONE;
        }
        extras[field] = most;
    }
    at = 0;
    if (!read_array_header(data, length, &at, &top) || at >= length || data[at] != (plain ? 2 : 3)) {
        Py_RETURN_NONE;
    }
    at++;
    Py_ssize_t nedits = 0; /* one per change, and per limb of a wide sum */
    for (Py_ssize_t index = 0; index < nchanges; index++) {
        Py_ssize_t field = changes[index].part - 2; /* a sum column's field, when 0 <= field < nfields */
        nedits += !plain && field >= 0 && field < nfields ? extras[field] + 1 : 1;
    }
    Edit local[32], *edits = nedits <= 32 ? local : PyMem_Malloc(sizeof(Edit) * (size_t)nedits), *edit = edits;
    if (edits == NULL) {
        return PyErr_NoMemory();
    }
    int status = skip_array(data, length, &at, count, 1);
    status = status > 0 ? patch_array(data, length, &at, count, &edit, changes, firsts[1], -1, 0) : status;
    status = status > 0 ? skip_array(data, length, &at, columns, 0) : status;
    if (status > 0 && !plain) { /* the limbs of each column: as many as the node needs now */
        Py_ssize_t stored;
        status = read_array_header(data, length, &at, &stored) && stored == columns;
        for (Py_ssize_t column = 0; column < columns && status > 0; column++) {
            Element element;
            Py_ssize_t limbs = column >= 1 && column <= nfields ? extras[column - 1] + 1 : 1;
            status = read_element(data, length, &at, 0, &element) && element.size == 1 && data[element.at] == limbs;
        }
    }
    for (Py_ssize_t column = 0; column < columns && status > 0; column++) {
        const Change *mine_changes = changes + firsts[1 + column];
        Py_ssize_t ncolumn = firsts[2 + column] - firsts[1 + column];
        if (plain || column < 1 || column > nfields) {
            status = patch_array(data, length, &at, count, &edit, mine_changes, ncolumn, -1, 0);
            continue;
        }
        for (Py_ssize_t limb = 0; limb <= extras[column - 1] && status > 0; limb++) {
            status = patch_array(data, length, &at, count, &edit, mine_changes, ncolumn, limb, extras[column - 1]);
        }
    }
    if (status > 0 && at != length) {
        status = 0;
    }
    PyObject *result = NULL;
    if (status > 0) {
        Py_ssize_t total = length;
        for (const Edit *each = edits; each < edit; each++) {
            total += each->size - (each->stop - each->start);
        }
        result = PyBytes_FromStringAndSize(NULL, total);
    }
    if (result != NULL) {
        write_edits(PyBytes_AS_STRING(result), data, length, edits, edit - edits);
    }
    if (edits != local) {
        PyMem_Free(edits);
    }
    if (status == 0) {
        Py_RETURN_NONE;
    }
    return result; /* NULL when status < 0 or the bytes could not be made */
}

/* The body of repack_internal, with the parts of both nodes in hand (keys, kids, shifts, cols). */
static PyObject *
repack_parts(PyObject *mine[4], PyObject *theirs[4], PyObject *packed, Py_ssize_t nfields)
{
    Py_ssize_t count = PyList_CheckExact(mine[0]) || PyTuple_CheckExact(mine[0]) ? PySequence_Fast_GET_SIZE(mine[0]) : -1;
    Py_ssize_t columns = 1 + 2 * nfields;
    PyObject **shifts = part_items(mine[2], columns), **their_shifts = part_items(theirs[2], columns);
    PyObject **cols = part_items(mine[3], columns), **their_cols = part_items(theirs[3], columns);
    if (count < 0 || nfields > 256 || shifts == NULL || their_shifts == NULL || cols == NULL || their_cols == NULL) {
        Py_RETURN_NONE;
    }
    Change changes[REPACK_CHANGES];
    Py_ssize_t nchanges = 0, firsts[2 + 2 * 256 + 1]; /* changes[firsts[part]:firsts[part + 1]] */
    for (Py_ssize_t part = -2; part <= columns + 1; part++) { /* keys (-2) and shifts (-1) must be the same */
        if (part >= 0) {
            firsts[part] = nchanges;
        }
        if (part == columns + 1) {
            break;
        }
        PyObject *items_of = part == -2 ? mine[0] : part == -1 ? mine[2] : part == 0 ? mine[1] : cols[part - 1];
        PyObject *their_of = part == -2 ? theirs[0] : part == -1 ? theirs[2] : part == 0 ? theirs[1] : their_cols[part - 1];
        Py_ssize_t size = part == -1 ? columns : count;
        PyObject **items = part_items(items_of, size), **their = part_items(their_of, size);
        if (items == NULL || their == NULL) {
            Py_RETURN_NONE;
        }
        for (Py_ssize_t index = 0; index < size; index++) {
            int same = same_item(items[index], their[index], part == -2);
            if (same < 0) {
                return NULL;
            }
            if (same) {
                continue;
            }
            if (part < 0 || nchanges == REPACK_CHANGES) {
                Py_RETURN_NONE;
            }
            changes[nchanges++] = (Change){.part = part, .index = index, .item = items[index]};
        }
    }
    PyObject **col_items[1 + 2 * 256];
    for (Py_ssize_t column = 0; column < columns; column++) {
        col_items[column] = part_items(cols[column], count); /* checked above */
    }
    return repack_changes(col_items, count, packed, nfields, changes, nchanges, firsts, 0);
}

/* repack_internal(node, origin, packed, nfields) -> bytes | None: the bytes of internal node ``node``
   from ``packed``, the stored bytes of the committed node ``origin`` it was copied from (see above). */
static PyObject *
repack_internal(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[2]) || !PyLong_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "repack_internal(node, origin, packed: bytes, nfields: int)");
        return NULL;
    }
    Py_ssize_t nfields;
    if (size_argument(args[3], "repack_internal: nfields", &nfields) < 0) {
        return NULL;
    }
    PyObject *names[4] = {keys_name, kids_name, shifts_name, cols_name};
    PyObject *mine[4] = {NULL, NULL, NULL, NULL}, *theirs[4] = {NULL, NULL, NULL, NULL}, *result = NULL;
    int index = 0;
    for (; index < 4; index++) {
        mine[index] = PyObject_GetAttr(args[0], names[index]);
        theirs[index] = mine[index] == NULL ? NULL : PyObject_GetAttr(args[1], names[index]);
        if (theirs[index] == NULL) {
            break;
        }
    }
    if (index == 4) {
        result = repack_parts(mine, theirs, args[2], nfields);
    }
    for (index = 0; index < 4; index++) {
        Py_XDECREF(mine[index]);
        Py_XDECREF(theirs[index]);
    }
    return result;
}

/* A copy of tuple (or list) ``items`` (``count`` long): a new reference, or NULL with an error set.

   A column often holds one object many times over: the counts of a leaf's parent (each child a full
   leaf, the same small int) or a column of zeros. Increments of one count, one after the other,
   wait for each other (each reads what the last wrote), so a run of one object gets its references
   at once (a bump of a 115-child node whose counts are all one small int: 2.4 -> 2.1 us). */
static PyObject *
tuple_copy(PyObject *items, Py_ssize_t count)
{
    PyObject *copy = PyTuple_New(count);
    if (copy == NULL) {
        return NULL;
    }
    PyObject **from = PySequence_Fast_ITEMS(items), **to = ((PyTupleObject *)copy)->ob_item;
#ifdef Py_GIL_DISABLED /* counts split between threads: each reference taken as usual */
    for (Py_ssize_t at = 0; at < count; at++) {
        to[at] = Py_NewRef(from[at]);
    }
#else
    PyObject *last = NULL;
    Py_ssize_t run = 0;
    for (Py_ssize_t at = 0; at < count; at++) {
        PyObject *here = from[at];
        to[at] = here;
        if (here == last) {
            run++;
            continue;
        }
        if (run) {
            Py_SET_REFCNT(last, Py_REFCNT(last) + run);
        }
        last = here;
        run = 1;
    }
    if (run) {
        Py_SET_REFCNT(last, Py_REFCNT(last) + run);
    }
#endif
    return copy;
}

/* ``value >> by`` when no set bit is shifted out (both exact ints): 1 with *out set (a new
   reference), 0 when a set bit would be lost, -1 with an error set; *out is NULL unless 1.

   A float sum's amount is an int of ~1,100 bits (scaled by 2**1074) and its column's shift about as
   large: shifting it back to check that no bit was lost made two more such ints and a comparison.
   Where the int's digits can be read (CPython before 3.12, as small_int reads them), the digits below
   the shift are or-ed together instead. */
static int
exact_rshift(PyObject *value, PyObject *by, PyObject **out)
{
#if PY_VERSION_HEX < 0x030C0000
    long long small;
    if (small_int(by, &small) && small > 0) {
        /* Sign and magnitude: no set bit below ``by`` in the magnitude, none in the two's complement. */
        Py_ssize_t ndigits = Py_ABS(Py_SIZE(value)), whole = (Py_ssize_t)(small / PyLong_SHIFT);
        const digit *digits = ((PyLongObject *)value)->ob_digit;
        digit lost = 0;
        for (Py_ssize_t at = 0; at < whole && at < ndigits; at++) {
            lost |= digits[at];
        }
        if (whole < ndigits) {
            lost |= digits[whole] & (((digit)1 << (small % PyLong_SHIFT)) - 1);
        }
        *out = lost ? NULL : PyNumber_Rshift(value, by);
        return lost ? 0 : *out == NULL ? -1 : 1;
    }
#endif
    PyObject *shifted = PyNumber_Rshift(value, by);
    PyObject *back = shifted == NULL ? NULL : PyNumber_Lshift(shifted, by);
    int exact = back == NULL ? -1 : PyObject_RichCompareBool(back, value, Py_EQ);
    Py_XDECREF(back);
    if (exact <= 0) {
        Py_XDECREF(shifted);
        shifted = NULL;
    }
    *out = shifted;
    return exact;
}

/* add_spans(node, rows, prefixes) -> bool: a batch's merged leaves added to their parent's summary
   columns (``_btree.NodeTree._apply_merged``). ``node`` is a dirty internal node (its ``cols`` lists,
   its ``shifts``); each row ``(child, lo, hi, ...)`` of ``rows`` says that child ``child`` got the
   batch's entries ``lo:hi``; ``prefixes`` holds, for each summary column after the counts, the
   batch's ``(shift, sums)``: ``sums[i]`` is the sum of the column's first i entries (scaled by
   ``2**shift``, see ``_btree._Run``). Child ``child``'s count grows by ``hi - lo`` and its column c
   by ``sums[hi] - sums[lo]`` at true scale, as ``Node.add_columns(children, run.deltas(...))`` adds
   them. Returns False, changing nothing, when an amount is not a multiple of its column's shift (the
   Python code rescales the column) or the node is not of this shape; True once every amount is
   added. A Python loop per leaf and column (1.9 us per entry of a scattered batch) becomes one call
   per parent. */
static PyObject *
add_spans(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "add_spans(node, rows: list, prefixes: list)");
        return NULL;
    }
    PyObject *rows = args[1], *prefixes = args[2], *cols = NULL, *shifts = NULL, **amounts = NULL, *result = NULL;
    Py_ssize_t nrows = PyList_GET_SIZE(rows), columns = 1 + PyList_GET_SIZE(prefixes), made = 0;
    cols = PyObject_GetAttr(args[0], cols_name);
    shifts = cols == NULL ? NULL : PyObject_GetAttr(args[0], shifts_name);
    if (shifts == NULL) {
        goto done;
    }
    if (!PyList_CheckExact(cols) || PyList_GET_SIZE(cols) != columns || part_items(shifts, columns) == NULL) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    amounts = PyMem_Calloc((size_t)(nrows * columns) + 1, sizeof(PyObject *));
    if (amounts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* First every amount, at its column's scale: nothing is changed unless all of them fit. */
    for (Py_ssize_t row = 0; row < nrows; row++) {
        PyObject *item = PyList_GET_ITEM(rows, row);
        Py_ssize_t child, lo, hi;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) < 3 ||
            size_argument(PyTuple_GET_ITEM(item, 0), "add_spans: child", &child) < 0 ||
            size_argument(PyTuple_GET_ITEM(item, 1), "add_spans: lo", &lo) < 0 ||
            size_argument(PyTuple_GET_ITEM(item, 2), "add_spans: hi", &hi) < 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "add_spans: rows must be (child, lo, hi, ...) tuples");
            }
            goto done;
        }
        if (lo > hi) {
            PyErr_SetString(PyExc_ValueError, "add_spans: a row's lo is after its hi");
            goto done;
        }
        for (Py_ssize_t column = 0; column < columns; column++) {
            PyObject *col = PyList_GET_ITEM(cols, column);
            if (!PyList_CheckExact(col) || child >= PyList_GET_SIZE(col) ||
                !PyLong_CheckExact(PyList_GET_ITEM(col, child))) {
                result = Py_NewRef(Py_False);
                goto done;
            }
            PyObject *amount;
            if (column == 0) {
                amount = PyLong_FromSsize_t(hi - lo);
            }
            else {
                PyObject *prefix = PyList_GET_ITEM(prefixes, column - 1), *sums;
                Py_ssize_t scale, shift;
                if (!PyTuple_CheckExact(prefix) || PyTuple_GET_SIZE(prefix) != 2 ||
                    !PyList_CheckExact(sums = PyTuple_GET_ITEM(prefix, 1)) || PyList_GET_SIZE(sums) <= hi) {
                    PyErr_SetString(PyExc_TypeError, "add_spans: prefixes must be (shift, sums) covering the rows");
                    goto done;
                }
                if (size_argument(PyTuple_GET_ITEM(prefix, 0), "add_spans: a prefix's shift", &scale) < 0 ||
                    size_argument(PySequence_Fast_ITEMS(shifts)[column], "add_spans: a column's shift", &shift) < 0) {
                    goto done;
                }
                PyObject *high = PyList_GET_ITEM(sums, hi), *low = PyList_GET_ITEM(sums, lo);
                if (!PyLong_CheckExact(high) || !PyLong_CheckExact(low)) { /* no Python code runs here */
                    PyErr_SetString(PyExc_TypeError, "add_spans: prefix sums must be ints");
                    goto done;
                }
                PyObject *sum = PyNumber_Subtract(high, low);
                if (sum == NULL || scale == shift) {
                    amount = sum;
                }
                else {
                    PyObject *by = PyLong_FromSsize_t(scale > shift ? scale - shift : shift - scale);
                    amount = NULL;
                    if (by != NULL && scale > shift) {
                        amount = PyNumber_Lshift(sum, by);
                    }
                    else if (by != NULL && exact_rshift(sum, by, &amount) == 0) {
                        result = Py_NewRef(Py_False);
                    }
                    Py_XDECREF(by);
                    Py_DECREF(sum);
                }
            }
            if (amount == NULL) {
                goto done;
            }
            amounts[made++] = amount;
        }
    }
    /* Then each one added. */
    for (Py_ssize_t row = 0; row < nrows; row++) {
        Py_ssize_t child = PyLong_AsSsize_t(PyTuple_GET_ITEM(PyList_GET_ITEM(rows, row), 0));
        for (Py_ssize_t column = 0; column < columns; column++) {
            PyObject *col = PyList_GET_ITEM(cols, column), *amount = amounts[row * columns + column];
            if (PyObject_Not(amount)) { /* an exact int: never fails */
                continue;
            }
            PyObject *sum = PyNumber_Add(PyList_GET_ITEM(col, child), amount);
            if (sum == NULL) {
                goto done; /* MemoryError, half added: the transaction is aborted with it */
            }
            PyList_SetItem(col, child, sum);
        }
    }
    result = Py_NewRef(Py_True);
done:
    for (Py_ssize_t at = 0; at < made; at++) {
        Py_DECREF(amounts[at]);
    }
    PyMem_Free(amounts);
    Py_XDECREF(cols);
    Py_XDECREF(shifts);
    return result;
}

/* Patched nodes. A committed internal node that a write rebuilt (``_node.Node.bumped``) may be held as
   its stored bytes, the node it was made from (its *base*, a node with tuples) and a *patch*: a dict
   of child index -> ``(kid, column values ...)``, each value at its column's scale, for the children
   whose id or summary differ from the base's. Its keys and shifts are the base's own objects. One
   insert changes one child per internal node of its path, so the node's next version has the same
   base and one more patched child: no tuple of the node's children is copied (nor freed when the old
   version leaves the node cache), which was two thirds of a bump (callgrind: ~16,000 of ~26,000
   instructions for a node of 115 children, made and freed). Up to PATCH_MAX patched children; the
   next bump past them, or the first read of ``kids`` or ``cols`` (``make_patched``), makes the
   tuples; a node that reads used is bumped into tuples at once (``_node.Node.bumped``). */

#define PATCH_MAX 16

/* A patch's entries, read out of its dict once (borrowed): the child's index and its tuple. */
typedef struct {
    Py_ssize_t index;
    PyObject *entry;
} PatchEntry;

/* Read ``patch`` into ``entries`` (room for ``limit``): its number of entries, or -1 when it is not a
   patch of a node of ``count`` children and ``columns`` summary columns with at most ``limit``
   entries: a dict of int index in range -> a tuple of 1 + ``columns`` items. */
static Py_ssize_t
patch_entries(PyObject *patch, Py_ssize_t count, Py_ssize_t columns, Py_ssize_t limit, PatchEntry *entries)
{
    if (!PyDict_CheckExact(patch) || PyDict_GET_SIZE(patch) > limit) {
        return -1;
    }
    Py_ssize_t pos = 0, n = 0;
    PyObject *key, *entry;
    while (PyDict_Next(patch, &pos, &key, &entry)) {
        long long index;
        if (!PyLong_CheckExact(key) || !small_int(key, &index) || index < 0 || index >= count ||
            !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 1 + columns) {
            return -1;
        }
        entries[n++] = (PatchEntry){.index = (Py_ssize_t)index, .entry = entry};
    }
    return n;
}

/* Part ``at`` of a patched node (0: the kids, 1 + c: column c): the base's ``part`` (a tuple or list of
   ``count`` items) with each patched child's item in place, a new tuple, or the base's own object when
   the patch changes none of its items. A new reference, or NULL with an error set. */
static PyObject *
patched_part(PyObject *part, Py_ssize_t count, const PatchEntry *entries, Py_ssize_t n, Py_ssize_t at)
{
    PyObject **items = PySequence_Fast_ITEMS(part);
    Py_ssize_t each = 0;
    while (each < n && PyTuple_GET_ITEM(entries[each].entry, at) == items[entries[each].index]) {
        each++;
    }
    if (each == n) {
        return Py_NewRef(part);
    }
    PyObject *copy = tuple_copy(part, count);
    if (copy == NULL) {
        return NULL;
    }
    PyObject **to = ((PyTupleObject *)copy)->ob_item;
    for (each = 0; each < n; each++) {
        Py_SETREF(to[entries[each].index], Py_NewRef(PyTuple_GET_ITEM(entries[each].entry, at)));
    }
    return copy;
}

/* The kids and columns of a base with a patch's ``entries`` in place, as tuples: (kids, cols), or NULL
   with an error set. */
static PyObject *
patched_tuples(PyObject *kids, PyObject **cols, Py_ssize_t count, Py_ssize_t columns, const PatchEntry *entries,
               Py_ssize_t n)
{
    PyObject *new_kids = patched_part(kids, count, entries, n, 0);
    PyObject *new_cols = new_kids == NULL ? NULL : PyTuple_New(columns);
    if (new_cols == NULL) {
        Py_XDECREF(new_kids);
        return NULL;
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        PyObject *col = patched_part(cols[column], count, entries, n, 1 + column);
        if (col == NULL) {
            Py_DECREF(new_kids);
            Py_DECREF(new_cols);
            return NULL;
        }
        PyTuple_SET_ITEM(new_cols, column, col);
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(new_kids);
        Py_DECREF(new_cols);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, new_kids);
    PyTuple_SET_ITEM(out, 1, new_cols);
    return out;
}

/* A node's base parts, read once: keys, kids, shifts, cols (new references) and their items. */
typedef struct {
    PyObject *parts[4];
    Py_ssize_t count;
    PyObject **shifts, **cols;
} BaseParts;

/* Fill *base from ``node``: 1, 0 when it is not an internal node of ``columns`` columns whose parts are
   tuples or lists, -1 with an error set. The parts are released by base_release in every case. */
static int
base_read(PyObject *node, Py_ssize_t columns, BaseParts *base)
{
    PyObject *names[4] = {keys_name, kids_name, shifts_name, cols_name};
    memset(base, 0, sizeof(*base));
    for (int part = 0; part < 4; part++) {
        base->parts[part] = PyObject_GetAttr(node, names[part]);
        if (base->parts[part] == NULL) {
            return -1;
        }
    }
    PyObject *kids = base->parts[1];
    base->count = PyList_CheckExact(kids) || PyTuple_CheckExact(kids) ? PySequence_Fast_GET_SIZE(kids) : -1;
    base->shifts = part_items(base->parts[2], columns);
    base->cols = part_items(base->parts[3], columns);
    if (base->count < 0 || base->shifts == NULL || base->cols == NULL) {
        return 0;
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        if (part_items(base->cols[column], base->count) == NULL || !PyLong_CheckExact(base->shifts[column])) {
            return 0;
        }
    }
    return 1;
}

static void
base_release(BaseParts *base)
{
    for (int part = 0; part < 4; part++) {
        Py_XDECREF(base->parts[part]);
    }
}

/* The kids and columns of ``base`` with ``patch`` in place, as tuples (see "Patched nodes"): (kids, cols),
   None when they are not of this shape, or NULL with an error set. */
static PyObject *
patch_applied(PyObject *base_node, PyObject *patch, Py_ssize_t nfields)
{
    if (nfields > 256) {
        Py_RETURN_NONE;
    }
    Py_ssize_t columns = 1 + 2 * nfields, n = -1;
    PatchEntry entries[PATCH_MAX];
    BaseParts base;
    int status = base_read(base_node, columns, &base);
    if (status > 0) {
        n = patch_entries(patch, base.count, columns, PATCH_MAX, entries);
    }
    PyObject *result = status < 0 ? NULL
                       : n < 0    ? Py_NewRef(Py_None)
                                  : patched_tuples(base.parts[1], base.cols, base.count, columns, entries, n);
    base_release(&base);
    return result;
}

/* patched_parts(base, patch, nfields) -> (kids, cols) | None: a patched node's kids and columns as
   tuples (see "Patched nodes"). */
static PyObject *
patched_parts(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t nfields;
    if (nargs != 3 || !PyLong_CheckExact(args[2]) || size_argument(args[2], "patched_parts: nfields", &nfields) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "patched_parts(base, patch: dict, nfields: int)");
        }
        return NULL;
    }
    return patch_applied(args[0], args[1], nfields);
}

/* make_patched(node, plain, nfields) -> (kids, cols) | None: a patched node (``_node._PatchedNode``) made
   plain, the first time something reads its kids or cols: its tuples made from its base and patch, its
   class set to ``plain`` (``_node.Node``, of the same layout), the tuples set in its slots and the
   base and patch dropped, all without running Python code (so no other thread sees it half made);
   None when its base and patch are not of this shape. A node made already (its base dropped) gives
   its tuples. */
static PyObject *
make_patched(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t nfields;
    if (nargs != 3 || !PyType_Check(args[1]) || !PyLong_CheckExact(args[2]) ||
        size_argument(args[2], "make_patched: nfields", &nfields) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "make_patched(node, plain: type, nfields: int)");
        }
        return NULL;
    }
    PyObject *node = args[0], *result = NULL;
    PyObject *base = PyObject_GetAttr(node, base_name);
    PyObject *patch = base == NULL ? NULL : PyObject_GetAttr(node, patch_name);
    if (patch == NULL) {
        Py_XDECREF(base);
        return NULL;
    }
    if (base == Py_None || patch == Py_None) { /* made already: its class is plain */
        PyObject *kids = PyObject_GetAttr(node, kids_name);
        PyObject *cols = kids == NULL ? NULL : PyObject_GetAttr(node, cols_name);
        result = cols == NULL ? NULL : PyTuple_Pack(2, kids, cols);
        Py_XDECREF(kids);
        Py_XDECREF(cols);
    }
    else {
        result = patch_applied(base, patch, nfields);
        if (result != NULL && result != Py_None &&
            (PyObject_SetAttr(node, class_name, args[1]) < 0 ||
             PyObject_SetAttr(node, kids_name, PyTuple_GET_ITEM(result, 0)) < 0 ||
             PyObject_SetAttr(node, cols_name, PyTuple_GET_ITEM(result, 1)) < 0 ||
             PyObject_SetAttr(node, base_name, Py_None) < 0 || PyObject_SetAttr(node, patch_name, Py_None) < 0)) {
            Py_CLEAR(result);
        }
    }
    Py_DECREF(base);
    Py_DECREF(patch);
    return result;
}

/* Layouts. A bump (bump_path) repacks an internal node's bytes with one child changed: the child's
   id and the numbers the write added, in their columns. repack_changes finds them by walking the
   bytes from the start (every key, every number of every column: ~800 items for a node of 115
   children and two fields, two thirds of a bump's instructions). A node bump_path makes keeps the
   *layout* of its bytes: for the child ids and each column, the place of every 16th number and the
   end, made by one walk when a node has none (it was decoded, or packed in full) and carried on from
   bump to bump (each edit moves the places after it by its change of size). A repack then walks at
   most 15 numbers per change. Plain nodes only (a wide node's sums are cut into limbs, each change
   one edit per limb): a bump of a wide node, or one that makes a plain node wide, walks as before.

   A layout is the tuple (bytes it describes, offsets): the bytes object itself, compared by identity
   before use, so that a layout never describes other bytes; offsets a bytes object of LayoutHead and
   its int32 places: for each part p (0 the kids, 1 + c column c) nchunks places (of numbers 0, 16,
   32, ...) and its end. */

#define LAYOUT_STEP 16

typedef struct {
    int32_t count, columns, nchunks, length;
} LayoutHead;

/* The places of part ``part`` (nchunks + 1 of them) in a layout's offsets. */
static inline int32_t *
layout_part(LayoutHead *head, Py_ssize_t part)
{
    return (int32_t *)(void *)(head + 1) + part * (head->nchunks + 1);
}

/* Record the places of one stored array of ``count`` numbers at data[*at] (its header first) into
   ``places`` (every LAYOUT_STEP-th number, then the end): 1, or 0 for bytes of another layout. */
static int
layout_walk(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count, int32_t *places)
{
    Py_ssize_t stored;
    if (!read_array_header(data, length, at, &stored) || stored != count) {
        return 0;
    }
    for (Py_ssize_t done = 0; done < count; done += LAYOUT_STEP) {
        *places++ = (int32_t)*at;
        if (!skip_numbers(data, length, at, count - done < LAYOUT_STEP ? count - done : LAYOUT_STEP)) {
            return 0;
        }
    }
    *places = (int32_t)*at;
    return 1;
}

/* The offsets of the layout of ``packed``, a plain internal node of ``count`` children and ``columns``
   columns, walked whole (every number checked, as repack_changes walks them): a bytes object, None
   when the bytes are not of that layout (wide, or another shape), NULL with an error set. */
static PyObject *
layout_of(PyObject *packed, Py_ssize_t count, Py_ssize_t columns)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(packed);
    Py_ssize_t length = PyBytes_GET_SIZE(packed), at = 0, top, nchunks = (count + LAYOUT_STEP - 1) / LAYOUT_STEP;
    if (count < 1 || length > INT32_MAX || !read_array_header(data, length, &at, &top) || at >= length ||
        data[at] != 2) {
        Py_RETURN_NONE;
    }
    at++;
    PyObject *offsets = PyBytes_FromStringAndSize(
        NULL, (Py_ssize_t)sizeof(LayoutHead) + (1 + columns) * (nchunks + 1) * (Py_ssize_t)sizeof(int32_t));
    if (offsets == NULL) {
        return NULL;
    }
    LayoutHead *head = (LayoutHead *)(void *)PyBytes_AS_STRING(offsets);
    *head = (LayoutHead){.count = (int32_t)count, .columns = (int32_t)columns, .nchunks = (int32_t)nchunks,
                         .length = (int32_t)length};
    int ok = skip_array(data, length, &at, count, 1) && layout_walk(data, length, &at, count, layout_part(head, 0)) &&
             skip_array(data, length, &at, columns, 0);
    for (Py_ssize_t column = 0; column < columns && ok; column++) {
        ok = layout_walk(data, length, &at, count, layout_part(head, 1 + column));
    }
    if (!ok || at != length) {
        Py_DECREF(offsets);
        Py_RETURN_NONE;
    }
    return offsets;
}

/* The offsets of ``layout`` (see "Layouts") when it describes ``packed`` for a node of ``count``
   children and ``columns`` columns, else NULL. */
static PyObject *
layout_for(PyObject *layout, PyObject *packed, Py_ssize_t count, Py_ssize_t columns)
{
    if (layout == NULL || !PyTuple_CheckExact(layout) || PyTuple_GET_SIZE(layout) != 2 ||
        PyTuple_GET_ITEM(layout, 0) != packed || !PyBytes_CheckExact(PyTuple_GET_ITEM(layout, 1))) {
        return NULL;
    }
    PyObject *offsets = PyTuple_GET_ITEM(layout, 1);
    const LayoutHead *head = (const LayoutHead *)(const void *)PyBytes_AS_STRING(offsets);
    Py_ssize_t nchunks = (count + LAYOUT_STEP - 1) / LAYOUT_STEP;
    if (PyBytes_GET_SIZE(offsets) != (Py_ssize_t)sizeof(LayoutHead) + (1 + columns) * (nchunks + 1) * 4 ||
        head->count != count || head->columns != columns || head->length != PyBytes_GET_SIZE(packed)) {
        return NULL;
    }
    return offsets;
}

/* repack_changes for a plain node that stays plain, through the layout of ``packed`` (``offsets``,
   see "Layouts"): the new bytes, with the new layout in *new_layout ((bytes, offsets)); None when
   the node does not stay plain (a changed sum beyond msgpack's ints: repack_changes works the limbs
   out), NULL with an error set. ``changes`` as repack_changes takes them, at most one per part. */
static PyObject *
repack_laid(PyObject *packed, PyObject *offsets, const Change *changes, Py_ssize_t nchanges, PyObject **new_layout)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(packed);
    Py_ssize_t length = PyBytes_GET_SIZE(packed);
    LayoutHead *head = (LayoutHead *)(void *)PyBytes_AS_STRING(offsets);
    Edit edits[REPACK_CHANGES];
    Py_ssize_t total = length;
    if (nchanges > REPACK_CHANGES) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t index = 0; index < nchanges; index++) {
        const Change *change = &changes[index];
        if (change->part < 0 || change->part > head->columns || change->index < 0 || change->index >= head->count ||
            (index > 0 && change->part <= changes[index - 1].part)) {
            Py_RETURN_NONE; /* (bump_internal makes one change per part, in order) */
        }
        long long value = 0;
        unsigned long long big = 0;
        int is_unsigned = 0;
        Py_ssize_t size = PyLong_CheckExact(change->item) ? scalar_size(change->item, &value, &big, &is_unsigned) : 0;
        if (size < 0) {
            return NULL;
        }
        if (size == 0) { /* beyond msgpack's ints: wide now */
            Py_RETURN_NONE;
        }
        Py_ssize_t at = layout_part(head, change->part)[change->index / LAYOUT_STEP];
        Edit *edit = &edits[index];
        if (!skip_numbers(data, length, &at, change->index % LAYOUT_STEP)) {
            Py_RETURN_NONE;
        }
        edit->start = at;
        if (!skip_numbers(data, length, &at, 1)) {
            Py_RETURN_NONE;
        }
        edit->stop = at;
        char *out = edit->bytes;
        if (is_unsigned) {
            *out++ = (char)0xcf;
            out = put_be(out, big, 8);
        }
        else {
            out = put_int(out, value);
        }
        edit->size = out - edit->bytes;
        total += edit->size - (edit->stop - edit->start);
    }
    if (total > INT32_MAX) {
        Py_RETURN_NONE;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    PyObject *new_offsets = result == NULL ? NULL : PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(offsets));
    if (new_offsets == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    write_edits(PyBytes_AS_STRING(result), data, length, edits, nchanges);
    /* The new places: each old one moved by the edits that start before it (places and edits both
       ascend through the bytes). */
    LayoutHead *new_head = (LayoutHead *)(void *)PyBytes_AS_STRING(new_offsets);
    *new_head = *head;
    new_head->length = (int32_t)total;
    const int32_t *places = (const int32_t *)(const void *)(head + 1);
    int32_t *new_places = (int32_t *)(void *)(new_head + 1);
    Py_ssize_t nplaces = (head->columns + 1) * (head->nchunks + 1), next = 0, moved = 0;
    for (Py_ssize_t index = 0; index < nplaces; index++) {
        while (next < nchanges && edits[next].start < places[index]) {
            moved += edits[next].size - (edits[next].stop - edits[next].start);
            next++;
        }
        new_places[index] = (int32_t)(places[index] + moved);
    }
    *new_layout = PyTuple_Pack(2, result, new_offsets);
    Py_DECREF(new_offsets);
    if (*new_layout == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* bump_internal(node, packed, index, kid, delta, nfields, patch=None, tuples=False) -> (patch, packed) |
   (kids, cols, packed) | None: what one insert does to an internal node of its path (``_node.Node.bumped``),
   without a dirty copy. ``node`` is a committed internal node (its keys, kids, shifts and each column a
   tuple or list) and ``patch`` None, or ``node`` is the base of a patched node and ``patch`` its patch
   (see "Patched nodes"); ``packed`` is the stored bytes of the node bumped (the patched one), or None;
   ``delta`` the summary to add to child ``index`` (true scale), ``kid`` the child's new id.

   Returns the new node as its patch and its bytes (repacked from ``packed`` as repack_internal does)
   while it has at most PATCH_MAX patched children, unless ``tuples``; else as tuples of child ids and columns (the
   unchanged columns the base's own objects) and its bytes: repacked, else packed in full as
   pack_internal does, else None (the Python code packs it). Returns None, making nothing, when a
   column's shift does not divide its amount (the column must be rescaled: a dirty copy's ``add`` does
   that) or the node is not of this shape. */
static PyObject *bump_node(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *layout,
                           PyObject **new_layout);

static PyObject *
bump_internal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return bump_node(module, args, nargs, NULL, NULL);
}

/* bump_internal, and with ``new_layout`` given, the repack made through ``layout`` (the bumped node's,
   or NULL) when the node is plain and stays plain, the new node's layout in *new_layout (see
   "Layouts"; left NULL otherwise). */
static PyObject *
bump_node(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *layout, PyObject **new_layout)
{
    PyObject *patch = nargs >= 7 ? args[6] : Py_None;
    int tuples = nargs == 8 ? PyObject_IsTrue(args[7]) : 0;
    if (nargs < 6 || nargs > 8 || (args[1] != Py_None && !PyBytes_CheckExact(args[1])) ||
        !PyLong_CheckExact(args[2]) || !PyLong_CheckExact(args[3]) || !PyList_CheckExact(args[4]) ||
        !PyLong_CheckExact(args[5]) || (patch != Py_None && !PyDict_CheckExact(patch)) ||
        (nargs == 8 && !PyBool_Check(args[7]))) {
        PyErr_SetString(PyExc_TypeError, "bump_internal(node, packed: bytes | None, index: int, kid: int, "
                                         "delta: list, nfields: int, patch: dict | None = None, tuples: bool = False)");
        return NULL;
    }
    Py_ssize_t index, nfields;
    if (size_argument(args[2], "bump_internal: index", &index) < 0 ||
        size_argument(args[5], "bump_internal: nfields", &nfields) < 0) {
        return NULL;
    }
    Py_ssize_t columns = 1 + 2 * nfields;
    PyObject *delta = args[4];
    if (nfields > 256 || PyList_GET_SIZE(delta) != columns) {
        Py_RETURN_NONE;
    }
    PyObject *amounts[1 + 2 * 256], *values[1 + 2 * 256], *result = NULL, *entry = NULL, *new_patch = NULL;
    PyObject ***virtual = NULL;
    memset(amounts, 0, sizeof(PyObject *) * (size_t)columns);
    memset(values, 0, sizeof(PyObject *) * (size_t)columns);
    BaseParts base;
    int status = base_read(args[0], columns, &base);
    if (status <= 0) {
        result = status < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t count = base.count;
    if (count <= index || (patch != Py_None && PyDict_GET_SIZE(patch) > PATCH_MAX)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* The child's id and summary before the bump: the patch's, else the base's. */
    PyObject *old = patch == Py_None ? NULL : PyDict_GetItemWithError(patch, args[2]); /* borrowed */
    if (old == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (old != NULL && (!PyTuple_CheckExact(old) || PyTuple_GET_SIZE(old) != 1 + columns)) {
        result = Py_NewRef(Py_None); /* (the other entries are checked as the sums are overlaid) */
        goto done;
    }
    PyObject *old_kid = old != NULL ? PyTuple_GET_ITEM(old, 0) : PySequence_Fast_ITEMS(base.parts[1])[index];
    /* Each column's amount at its scale, checked before anything is made. */
    for (Py_ssize_t column = 0; column < columns; column++) {
        PyObject *amount = PyList_GET_ITEM(delta, column);
        if (!PyLong_CheckExact(amount)) {
            PyErr_SetString(PyExc_TypeError, "bump_internal: delta must hold ints");
            goto done;
        }
        if (PyObject_Not(amount)) { /* an exact int: never fails */
            continue;
        }
        if (PyObject_Not(base.shifts[column])) { /* counts, float counts, and sums with nothing factored out */
            amounts[column] = Py_NewRef(amount);
            continue;
        }
        PyObject *scaled;
        int exact = exact_rshift(amount, base.shifts[column], &scaled);
        if (exact <= 0) {
            if (exact == 0) {
                result = Py_NewRef(Py_None);
            }
            goto done;
        }
        amounts[column] = scaled;
    }
    /* The child's new entry: (kid, each column's value). */
    entry = PyTuple_New(1 + columns);
    if (entry == NULL) {
        goto done;
    }
    PyTuple_SET_ITEM(entry, 0, Py_NewRef(args[3]));
    for (Py_ssize_t column = 0; column < columns; column++) {
        PyObject *before = old != NULL ? PyTuple_GET_ITEM(old, 1 + column)
                                       : PySequence_Fast_ITEMS(base.cols[column])[index];
        PyObject *value = amounts[column] == NULL ? Py_NewRef(before) : PyNumber_Add(before, amounts[column]);
        if (value == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(entry, 1 + column, value);
        values[column] = value; /* borrowed from entry */
    }
    new_patch = patch == Py_None ? PyDict_New() : PyDict_Copy(patch);
    if (new_patch == NULL || PyDict_SetItem(new_patch, args[2], entry) < 0) {
        goto done;
    }
    /* The changes are known: the kid at ``index`` (unless the same id) and each column given an
       amount, there; the keys and shifts are the node's own. repack_internal would find them by
       comparing every number of both nodes (~800 for a node of 115 children). More changes than
       repack_internal takes (a node of many fields) are packed in full, as it leaves them. */
    Change changes[REPACK_CHANGES];
    Py_ssize_t nchanges = 0, firsts[2 + 2 * 256 + 1];
    int same = same_item(args[3], old_kid, 0);
    if (same < 0) {
        goto done;
    }
    firsts[0] = 0;
    if (!same) {
        changes[nchanges++] = (Change){.part = 0, .index = index, .item = args[3]};
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        firsts[1 + column] = nchanges;
        if (amounts[column] != NULL && nchanges++ < REPACK_CHANGES) {
            changes[nchanges - 1] = (Change){.part = 1 + column, .index = index, .item = values[column]};
        }
    }
    firsts[1 + columns] = nchanges;
    PyObject *packed = Py_None;
    if (args[1] != Py_None && nchanges <= REPACK_CHANGES && part_items(base.parts[0], count) != NULL) {
        /* Each sum column's items as the new node holds them (borrowed), for a wide node's limbs: not
           needed when the node is plain and stays plain (repack_changes then reads no sum but the
           changed ones), the common case; the patch's entries checked on the way (one pass over it). */
        int plain = 1, needed = 1;
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[1]);
        Py_ssize_t length = PyBytes_GET_SIZE(args[1]), form = 0, top;
        if (read_array_header(data, length, &form, &top) && form < length && data[form] == 2) {
            needed = 0;
            for (Py_ssize_t field = 0; field < nfields && !needed; field++) {
                if (amounts[1 + field] != NULL &&
                    (!PyLong_CheckExact(values[1 + field]) || extra_limbs(values[1 + field], &plain) < 0 || !plain)) {
                    if (PyErr_Occurred()) {
                        goto done;
                    }
                    needed = 1;
                }
            }
        }
        PyObject **items = NULL, *key, *each;
        if (needed) {
            virtual = PyMem_Malloc(sizeof(PyObject **) * (size_t)columns + sizeof(PyObject *) * (size_t)(nfields * count));
            if (virtual == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            items = (PyObject **)(virtual + columns);
            for (Py_ssize_t column = 0; column < columns; column++) {
                int sum = column >= 1 && column <= nfields;
                virtual[column] = sum ? items + (column - 1) * count : NULL;
                if (sum) {
                    memcpy(virtual[column], PySequence_Fast_ITEMS(base.cols[column]), sizeof(PyObject *) * (size_t)count);
                }
            }
        }
        for (Py_ssize_t pos = 0; PyDict_Next(new_patch, &pos, &key, &each);) {
            long long at;
            if (!PyLong_CheckExact(key) || !small_int(key, &at) || at < 0 || at >= count ||
                !PyTuple_CheckExact(each) || PyTuple_GET_SIZE(each) != 1 + columns) {
                result = Py_NewRef(Py_None);
                goto done;
            }
            for (Py_ssize_t field = 0; field < nfields && virtual != NULL; field++) {
                virtual[1 + field][at] = PyTuple_GET_ITEM(each, 2 + field);
            }
        }
        packed = NULL;
        if (new_layout != NULL && !needed) { /* plain, and stays plain: through the bytes' layout */
            PyObject *offsets = layout_for(layout, args[1], count, columns), *walked = NULL;
            if (offsets == NULL) { /* none yet: one walk makes it */
                walked = layout_of(args[1], count, columns);
                if (walked == NULL) {
                    goto done;
                }
                offsets = walked == Py_None ? NULL : walked;
            }
            packed = offsets == NULL ? Py_NewRef(Py_None) : repack_laid(args[1], offsets, changes, nchanges, new_layout);
            Py_XDECREF(walked);
            if (packed == Py_None) {
                Py_CLEAR(packed);
            }
            else if (packed == NULL) {
                goto done;
            }
        }
        if (packed == NULL) {
            packed = repack_changes(virtual, count, args[1], nfields, changes, nchanges, firsts, 1);
        }
        if (packed == NULL) {
            goto done;
        }
        if (packed != Py_None && PyDict_GET_SIZE(new_patch) <= PATCH_MAX && !tuples) {
            PyObject_GC_UnTrack(entry); /* ints only, and the dict holds such tuples only: no cycle */
            PyObject_GC_UnTrack(new_patch);
            result = PyTuple_Pack(2, new_patch, packed);
            Py_DECREF(packed);
            goto done;
        }
    }
    else {
        Py_INCREF(packed);
    }
    /* Too many patched children, or bytes to pack in full: the node as tuples. */
    PatchEntry entries[PATCH_MAX + 1];
    Py_ssize_t nentries = patch_entries(new_patch, count, columns, PATCH_MAX + 1, entries);
    if (nentries < 0) {
        Py_DECREF(packed);
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *parts = patched_tuples(base.parts[1], base.cols, count, columns, entries, nentries);
    if (parts == NULL) {
        Py_DECREF(packed);
        goto done;
    }
    if (packed == Py_None) {
        Py_DECREF(packed);
        PyObject *whole = PyTuple_New(3 + columns), *new_cols = PyTuple_GET_ITEM(parts, 1);
        if (whole == NULL) {
            Py_DECREF(parts);
            goto done;
        }
        PyTuple_SET_ITEM(whole, 0, Py_NewRef(base.parts[0]));
        PyTuple_SET_ITEM(whole, 1, Py_NewRef(PyTuple_GET_ITEM(parts, 0)));
        PyTuple_SET_ITEM(whole, 2, Py_NewRef(base.parts[2]));
        for (Py_ssize_t column = 0; column < columns; column++) {
            PyTuple_SET_ITEM(whole, 3 + column, Py_NewRef(PyTuple_GET_ITEM(new_cols, column)));
        }
        PyObject *call[2] = {whole, args[5]};
        packed = pack_internal(module, call, 2);
        Py_DECREF(whole);
        if (packed == NULL) {
            Py_DECREF(parts);
            goto done;
        }
    }
    result = PyTuple_Pack(3, PyTuple_GET_ITEM(parts, 0), PyTuple_GET_ITEM(parts, 1), packed);
    Py_DECREF(parts);
    Py_DECREF(packed);
done:
    base_release(&base);
    for (Py_ssize_t column = 0; column < columns; column++) {
        Py_XDECREF(amounts[column]);
    }
    Py_XDECREF(entry);
    Py_XDECREF(new_patch);
    PyMem_Free(virtual);
    return result;
}

/* The layout of ``_node.Node``, for bump_path to make nodes without running Python code: each slot's
   offset in the object, read once from the class's member descriptors and checked (a slot of objects,
   writable), with the plain class and its patched subclass (``_node._PatchedNode``, of the same layout).
   The classes are held until other ones are given. */
enum {
    SLOT_ID, SLOT_LEAF, SLOT_KEYS, SLOT_COLS, SLOT_KIDS, SLOT_SHIFTS, SLOT_DIRTY, SLOT_PENDING, SLOT_BLOB,
    SLOT_COUNTS, SLOT_TABLE, SLOT_ROWS, SLOT_READS, SLOT_HOT, SLOT_PACKED, SLOT_ORIGIN, SLOT_BASE, SLOT_PATCH,
    SLOT_LAYOUT, NODE_SLOTS
};
static const char *const node_slot_names[NODE_SLOTS] = {
    "id", "leaf", "keys", "cols", "kids", "shifts", "dirty", "pending", "_blob",
    "_counts", "_table", "_rows", "_reads", "_hot", "_packed", "_origin", "_base", "_patch", "_layout",
};
static struct {
    PyObject *plain, *patched;
    Py_ssize_t offsets[NODE_SLOTS];
} node_layout;

/* Read the layout of ``plain`` and ``patched`` into node_layout (unless it holds theirs already): 0, or -1
   with a TypeError set when they are not of the shape bump_path makes. */
static int
node_layout_of(PyObject *plain, PyObject *patched)
{
    if (plain == node_layout.plain && patched == node_layout.patched) {
        return 0;
    }
    PyTypeObject *type = (PyTypeObject *)plain, *sub = (PyTypeObject *)patched;
    if (!PyType_Check(plain) || !PyType_Check(patched) || !PyType_IsSubtype(sub, type) ||
        type->tp_basicsize != sub->tp_basicsize || type->tp_itemsize != 0 || sub->tp_itemsize != 0 ||
        type->tp_dictoffset != 0 || sub->tp_dictoffset != 0 || !(type->tp_flags & Py_TPFLAGS_HEAPTYPE) ||
        type->tp_dict == NULL) {
        PyErr_SetString(PyExc_TypeError, "bump_path: plain and patched must be a slotted node class and its "
                                         "subclass of the same layout");
        return -1;
    }
    Py_ssize_t offsets[NODE_SLOTS];
    for (int slot = 0; slot < NODE_SLOTS; slot++) {
        PyObject *descr = PyDict_GetItemString(type->tp_dict, node_slot_names[slot]); /* borrowed */
        PyMemberDef *member = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
                                  ? ((PyMemberDescrObject *)descr)->d_member
                                  : NULL;
        if (member == NULL || member->type != T_OBJECT_EX || (member->flags & READONLY) || member->offset <= 0 ||
            member->offset + (Py_ssize_t)sizeof(PyObject *) > type->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "bump_path: the node class has no slot %s", node_slot_names[slot]);
            return -1;
        }
        offsets[slot] = member->offset;
    }
    Py_XSETREF(node_layout.plain, Py_NewRef(plain));
    Py_XSETREF(node_layout.patched, Py_NewRef(patched));
    memcpy(node_layout.offsets, offsets, sizeof(offsets));
    return 0;
}

/* The object in slot ``slot`` of ``node`` (borrowed; NULL when it is not set). */
static inline PyObject *
node_slot(PyObject *node, int slot)
{
    return *(PyObject **)((char *)node + node_layout.offsets[slot]);
}

/* A new committed internal node of class ``type`` (untracked, as ``Node.bumped`` leaves its nodes: it
   refers to no node that refers to it), its slots set as ``Node.__init__`` and ``_PatchedNode.__init__``
   set them: ``kids`` and ``cols`` (NULL for a patched node, made when read), ``base`` and ``patch``
   (NULL for a plain one: never set), ``packed``. Steals nothing. NULL with an error set. */
static PyObject *
new_internal_node(PyObject *type, PyObject *node_id, PyObject *keys, PyObject *shifts, PyObject *kids,
                  PyObject *cols, PyObject *base, PyObject *patch, PyObject *packed, PyObject *layout)
{
    PyObject *node = PyType_GenericAlloc((PyTypeObject *)type, 0);
    if (node == NULL) {
        return NULL;
    }
    if (PyObject_GC_IsTracked(node)) {
        PyObject_GC_UnTrack(node);
    }
    PyObject *zero = PyLong_FromLong(0); /* a cached small int: never fails */
    PyObject *values[NODE_SLOTS] = {
        [SLOT_ID] = node_id, [SLOT_LEAF] = Py_False, [SLOT_KEYS] = keys, [SLOT_COLS] = cols, [SLOT_KIDS] = kids,
        [SLOT_SHIFTS] = shifts, [SLOT_DIRTY] = Py_False, [SLOT_PENDING] = Py_False, [SLOT_BLOB] = Py_None,
        [SLOT_COUNTS] = Py_None, [SLOT_TABLE] = Py_None, [SLOT_ROWS] = Py_None, [SLOT_READS] = zero,
        [SLOT_HOT] = Py_None, [SLOT_PACKED] = packed, [SLOT_ORIGIN] = Py_None, [SLOT_BASE] = base,
        [SLOT_PATCH] = patch, [SLOT_LAYOUT] = layout != NULL ? layout : Py_None,
    };
    for (int slot = 0; slot < NODE_SLOTS; slot++) {
        *(PyObject **)((char *)node + node_layout.offsets[slot]) = Py_XNewRef(values[slot]);
    }
    Py_DECREF(zero);
    return node;
}

/* packed_layout(packed, count, columns) -> bytes | None: the offsets of the layout of a plain internal
   node's bytes (see "Layouts"), walked whole; None for bytes not of that layout. */
static PyObject *
packed_layout(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t count, columns;
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        size_argument(args[1], "packed_layout: count", &count) < 0 ||
        size_argument(args[2], "packed_layout: columns", &columns) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "packed_layout(packed: bytes, count: int, columns: int)");
        }
        return NULL;
    }
    return layout_of(args[0], count, columns);
}

/* One level of bump_path: internal node ``node`` of a write's path with its child at ``index`` (an int)
   given the new id ``child`` and its summary grown by ``delta``, as a new node of id ``node_id``: what
   bump_internal makes of it (a patch of its base, or tuples if it reads used; see ``Node.bumped``) made
   into a node here. A new reference; NULL with no error set for a level left to the Python code (a node of
   another class or shape, a column to rescale, bytes to pack in full); NULL with an error set on failure.
   node_layout holds the classes (node_layout_of). */
static PyObject *
bump_level(PyObject *module, PyObject *node, PyObject *index, PyObject *child, PyObject *delta, PyObject *node_id)
{
    PyTypeObject *type = Py_TYPE(node);
    if ((PyObject *)type != node_layout.plain && (PyObject *)type != node_layout.patched) {
        return NULL;
    }
    PyObject *keys = node_slot(node, SLOT_KEYS), *shifts = node_slot(node, SLOT_SHIFTS);
    PyObject *packed = node_slot(node, SLOT_PACKED), *base = node, *patch = Py_None;
    if (keys == NULL || shifts == NULL || packed == NULL || !(PyTuple_CheckExact(shifts) || PyList_CheckExact(shifts)) ||
        Py_SIZE(shifts) < 1) {
        return NULL;
    }
    if ((PyObject *)type == node_layout.patched) { /* (_node._patch_of) */
        PyObject *its_base = node_slot(node, SLOT_BASE), *its_patch = node_slot(node, SLOT_PATCH);
        if (its_base != NULL && its_base != Py_None && its_patch != NULL && its_patch != Py_None) {
            base = its_base;
            patch = its_patch;
        }
    }
    /* a node that reads used is bumped into tuples (see Node.bumped) */
    int read = 0;
    if (patch == Py_None) {
        int slots[3] = {SLOT_COUNTS, SLOT_ROWS, SLOT_TABLE};
        for (int each = 0; each < 3; each++) {
            PyObject *derived = node_slot(node, slots[each]);
            read = read || (derived != NULL && derived != Py_None);
        }
    }
    PyObject *nfields = PyLong_FromSsize_t((Py_SIZE(shifts) - 1) / 2);
    if (nfields == NULL) {
        return NULL;
    }
    PyObject *call[8] = {base, packed, index, child, delta, nfields, patch, read ? Py_True : Py_False};
    PyObject *layout = NULL; /* the new bytes' layout, when the repack went through one */
    PyObject *bumped = bump_node(module, call, 8, node_slot(node, SLOT_LAYOUT), &layout);
    Py_DECREF(nfields);
    if (bumped == NULL) {
        Py_XDECREF(layout);
        return NULL;
    }
    PyObject *new_node = NULL;
    PyObject *new_packed = bumped == Py_None ? NULL : PyTuple_GET_ITEM(bumped, PyTuple_GET_SIZE(bumped) - 1);
    if (layout != NULL && (new_packed == NULL || PyTuple_GET_ITEM(layout, 0) != new_packed)) {
        Py_CLEAR(layout); /* (never: the layout is made with the bytes) */
    }
    if (bumped != Py_None && PyTuple_GET_SIZE(bumped) == 2) {
        new_node = new_internal_node(node_layout.patched, node_id, keys, shifts, NULL, NULL, base,
                                     PyTuple_GET_ITEM(bumped, 0), new_packed, layout);
    }
    else if (bumped != Py_None && new_packed != Py_None) {
        new_node = new_internal_node(node_layout.plain, node_id, keys, shifts, PyTuple_GET_ITEM(bumped, 0),
                                     PyTuple_GET_ITEM(bumped, 1), NULL, NULL, new_packed, layout);
    }
    /* else a column to rescale, or bytes to pack in full: the Python code's (NULL, no error) */
    Py_XDECREF(layout);
    Py_DECREF(bumped);
    return new_node;
}

/* bump_path(path, ids, child, delta, plain, patched) -> list: ``Node.bumped`` for each internal node of a
   write's path, from the bottom up, in one call (``_btree.NodeTree._write_stored``): ``path`` the nodes
   and child indexes from the root down (a list of (node, index)), ``ids`` the new id of each (renewed),
   ``child`` the new id of the leaf below the last, ``delta`` the summary added along the path (true
   scale), ``plain`` and ``patched`` the classes ``_node.Node`` and ``_node._PatchedNode``. Each level is
   made by bump_level. Returns the new nodes from the bottom up, stopping at the first level it leaves to
   the Python code: the caller bumps that level and those above it. */
static PyObject *
bump_path(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        !PyList_CheckExact(args[3]) || PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError, "bump_path(path: list[tuple[node, int]], ids: list[int] (one per node), "
                                         "child: int, delta: list, plain: type, patched: type)");
        return NULL;
    }
    if (node_layout_of(args[4], args[5]) < 0) {
        return NULL;
    }
    PyObject *path = args[0], *ids = args[1], *made = PyList_New(0);
    if (made == NULL) {
        return NULL;
    }
    PyObject *child = args[2]; /* borrowed: from the arguments, then from the node made below */
    for (Py_ssize_t level = PyList_GET_SIZE(path) - 1; level >= 0; level--) {
        PyObject *step = PyList_GET_ITEM(path, level), *node_id = PyList_GET_ITEM(ids, level);
        if (!PyTuple_CheckExact(step) || PyTuple_GET_SIZE(step) != 2 || !PyLong_CheckExact(node_id) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(step, 1))) {
            Py_DECREF(made);
            PyErr_SetString(PyExc_TypeError, "bump_path: path holds (node, index) pairs and ids ints");
            return NULL;
        }
        PyObject *new_node = bump_level(module, PyTuple_GET_ITEM(step, 0), PyTuple_GET_ITEM(step, 1), child,
                                        args[3], node_id);
        if (new_node == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(made);
                return NULL;
            }
            break;
        }
        if (PyList_Append(made, new_node) < 0) {
            Py_DECREF(new_node);
            Py_DECREF(made);
            return NULL;
        }
        Py_DECREF(new_node); /* held by the list */
        child = node_id;
    }
    return made;
}

/* The id of child ``index`` of internal node ``node`` (of ``count`` children), as ``Node.kid`` reads it:
   a patched node's patch, else its base's kids, else its own (borrowed). NULL with no error set when
   the node is not of that shape, NULL with an error set on failure. */
static PyObject *
node_kid(PyObject *node, PyObject *position, Py_ssize_t index, Py_ssize_t count)
{
    PyObject *kids = node_slot(node, SLOT_KIDS);
    if ((PyObject *)Py_TYPE(node) == node_layout.patched) {
        PyObject *base = node_slot(node, SLOT_BASE), *patch = node_slot(node, SLOT_PATCH);
        if (base != NULL && base != Py_None && patch != NULL && PyDict_CheckExact(patch)) {
            PyObject *changed = PyDict_GetItemWithError(patch, position);
            if (changed != NULL) {
                return PyTuple_CheckExact(changed) && PyTuple_GET_SIZE(changed) >= 1 ? PyTuple_GET_ITEM(changed, 0)
                                                                                      : NULL;
            }
            if (PyErr_Occurred()) {
                return NULL;
            }
            kids = Py_IS_TYPE(base, (PyTypeObject *)node_layout.plain) ? node_slot(base, SLOT_KIDS) : NULL;
        }
    }
    if (kids == NULL || !(PyTuple_CheckExact(kids) || PyList_CheckExact(kids)) ||
        PySequence_Fast_GET_SIZE(kids) != count) {
        return NULL;
    }
    return PySequence_Fast_ITEMS(kids)[index];
}

/* A write's path from stored bytes (stored_path, insert_stored): the internal nodes from the root down to
   the parent of the entry's leaf, each with the index of the child taken, and the leaf's id. */
typedef struct {
    Py_ssize_t levels;               /* internal nodes on the path (held) */
    PyObject *nodes[MAX_LEVELS];
    Py_ssize_t indexes[MAX_LEVELS];
    PyObject *leaf;                  /* the leaf's id (held), or NULL */
    Py_ssize_t hits;                 /* nodes taken from the node cache's store */
    int last;                        /* whether the path is the tree's right edge */
} StoredPath;

static void
stored_path_clear(StoredPath *path)
{
    for (Py_ssize_t level = 0; level < path->levels; level++) {
        Py_CLEAR(path->nodes[level]);
    }
    path->levels = 0;
    Py_CLEAR(path->leaf);
}

/* Node ``node_id`` (a new reference): from ``table`` or ``nodes`` (the node cache's store, as
   stored_path takes it; counted in ``*hits``), else from ``fetch(node_id)``. NULL with an error set. */
static PyObject *
path_node(PyObject *node_id, NodeTable *table, PyObject *nodes, PyObject *fetch, Py_ssize_t *hits)
{
    uint64_t id;
    if (table != NULL && table_id(node_id, &id)) {
        Slot *slot = table_find(table, id);
        if (slot != NULL) {
            slot_mark(slot);
            ++*hits;
            return Py_NewRef(slot->node);
        }
    }
    else if (nodes != NULL) {
        PyObject *node = PyDict_GetItemWithError(nodes, node_id);
        if (node != NULL) {
            ++*hits;
            return Py_NewRef(node);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_INCREF(node_id); /* (fetch runs Python code, which may drop the node that holds it) */
    PyObject *node = PyObject_CallOneArg(fetch, node_id);
    Py_DECREF(node_id);
    return node;
}

/* The descent of stored_path from ``root`` (a node; node_layout holds the classes) to the parent of the
   leaf of ``entry``, into ``path`` (empty before): 1 when found, 0 with ``path`` empty when the Python
   code must take it (see stored_path), -1 with an error set (``path`` empty). */
static int
descend_stored(PyObject *root, const char *entry, Py_ssize_t size, Py_ssize_t height, PyObject *fetch,
               PyObject *store, StoredPath *path)
{
    NodeTable *table = store != NULL && Py_IS_TYPE(store, &NodeTableType) ? (NodeTable *)store : NULL;
    PyObject *nodes = store != NULL && PyDict_CheckExact(store) ? store : NULL;
    PyObject *node = Py_NewRef(root); /* held until it goes to path->nodes */
    path->last = 1;
    for (Py_ssize_t level = 0; level < height - 1; level++) {
        PyObject *type = (PyObject *)Py_TYPE(node);
        if (type != node_layout.plain && type != node_layout.patched) {
            goto leave;
        }
        PyObject *keys = node_slot(node, SLOT_KEYS), *packed = node_slot(node, SLOT_PACKED);
        PyObject *node_id = node_slot(node, SLOT_ID);
        if (node_slot(node, SLOT_DIRTY) != Py_False || node_slot(node, SLOT_LEAF) != Py_False || packed == NULL ||
            !PyBytes_CheckExact(packed) || keys == NULL || !(PyTuple_CheckExact(keys) || PyList_CheckExact(keys)) ||
            node_id == NULL || !PyLong_CheckExact(node_id)) {
            goto leave;
        }
        Py_ssize_t count = PySequence_Fast_GET_SIZE(keys), index = bisect_sequence(keys, entry, size, 1) - 1;
        if (index < 0) { /* a key not bytes, or the entry before the node's fence: damage, for Python */
            PyErr_Clear();
            goto leave;
        }
        path->last = path->last && index == count - 1;
        path->nodes[level] = node; /* (the path holds it now) */
        path->indexes[level] = index;
        path->levels = level + 1;
        PyObject *position = PyLong_FromSsize_t(index);
        if (position == NULL) {
            goto fail;
        }
        PyObject *kid = node_kid(node, position, index, count);
        Py_DECREF(position);
        if (kid == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            stored_path_clear(path);
            return 0;
        }
        if (level == height - 2) {
            path->leaf = Py_NewRef(kid);
            return 1;
        }
        node = path_node(kid, table, nodes, fetch, &path->hits);
        if (node == NULL) {
            goto fail;
        }
    }
    stored_path_clear(path); /* (never: a height below 2 is refused by the callers) */
    return 0;
leave:
    Py_DECREF(node);
    stored_path_clear(path);
    return 0;
fail:
    stored_path_clear(path);
    return -1;
}

/* The height of a tree as stored_path and insert_stored take it: 1 with ``*height`` set, 0 for a tree the
   Python code takes (one level, or more than any tree has), -1 with an error set. */
static int
path_height(PyObject *argument, const char *what, Py_ssize_t *height)
{
    if (size_argument(argument, what, height) < 0) {
        return -1;
    }
    return *height >= 2 && *height <= MAX_LEVELS;
}

/* stored_path(root, entry, height, fetch, nodes, plain, patched) -> (path, last, hits, ids) | None: the
   descent of a write from stored bytes (``_btree.NodeTree._stored_path``) in one call: the internal
   nodes from ``root`` down to the parent of ``entry``'s leaf, each with the index of the child taken
   (``path``, a list of (node, index)), whether that is the tree's right edge (``last``), the number of
   nodes taken from ``nodes`` (``hits``, for the cache's statistics), and the ids of the path's nodes
   followed by the leaf's (``ids``). A child is taken from ``nodes`` (the node cache's store, a
   NodeTable or a dict, when the transaction has changed no node; see ``WriteTransaction.shared``),
   else through ``fetch(node_id)`` (the transaction's ``node``). None when the Python code must take
   it: a tree of one level, a node this transaction changed (dirty), a leaf above the bottom, a node
   without stored bytes, or of another class or shape. */
static PyObject *
stored_path(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyBytes_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) || !PyCallable_Check(args[3]) ||
        (args[4] != Py_None && !Py_IS_TYPE(args[4], &NodeTableType) && !PyDict_CheckExact(args[4]))) {
        PyErr_SetString(PyExc_TypeError, "stored_path(root, entry: bytes, height: int, fetch, nodes: NodeTable | "
                                         "dict | None, plain: type, patched: type)");
        return NULL;
    }
    if (node_layout_of(args[5], args[6]) < 0) {
        return NULL;
    }
    Py_ssize_t height;
    int usable = path_height(args[2], "stored_path: height", &height);
    if (usable <= 0) {
        return usable < 0 ? NULL : Py_NewRef(Py_None);
    }
    StoredPath found = {0};
    int descended = descend_stored(args[0], PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), height, args[3],
                                   args[4], &found);
    if (descended <= 0) {
        return descended < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *path = PyList_New(found.levels), *ids = PyList_New(found.levels + 1), *result = NULL;
    if (path == NULL || ids == NULL) {
        goto done;
    }
    for (Py_ssize_t level = 0; level < found.levels; level++) {
        PyObject *node = found.nodes[level];
        PyObject *step = Py_BuildValue("(On)", node, found.indexes[level]);
        if (step == NULL) {
            goto done;
        }
        PyList_SET_ITEM(path, level, step);
        PyList_SET_ITEM(ids, level, Py_NewRef(node_slot(node, SLOT_ID)));
    }
    PyList_SET_ITEM(ids, found.levels, Py_NewRef(found.leaf));
    result = Py_BuildValue("(ONnO)", path, PyBool_FromLong(found.last), found.hits, ids);
done:
    Py_XDECREF(path);
    Py_XDECREF(ids);
    stored_path_clear(&found);
    return result;
}

/* The id of the next version of node ``id``, as ``_txn.renewed`` makes it: the same slot, the version
   after this one's (after the last of ``versions`` comes 0). */
static uint64_t
renewed_id(uint64_t id, uint64_t versions)
{
    return (((id >> NODE_SLOT_BITS) + 1) % versions) << NODE_SLOT_BITS | (id & NODE_SLOT_MASK);
}

/* What ``_txn.WriteTransaction.write_kit`` gives insert_stored: the transaction's pieces, by position. */
enum { KIT_FETCH, KIT_NODES, KIT_SOURCE, KIT_DIRTY, KIT_ENCODED, KIT_PREPARED, KIT_OVERWRITES, KIT_FREED, KIT_CACHE,
       KIT_PLAIN, KIT_PATCHED, KIT_VERSIONS, KIT_SIZE };

/* Whether ``kit`` is a write_kit of a transaction that has changed no node yet: 1, 0, or -1 with a
   TypeError set for one of another shape. */
static int
kit_fresh(PyObject *kit)
{
    PyObject **items = PyTuple_CheckExact(kit) && PyTuple_GET_SIZE(kit) == KIT_SIZE ? &PyTuple_GET_ITEM(kit, 0) : NULL;
    if (items == NULL || !PyCallable_Check(items[KIT_FETCH]) ||
        !(items[KIT_NODES] == Py_None || Py_IS_TYPE(items[KIT_NODES], &NodeTableType) ||
          PyDict_CheckExact(items[KIT_NODES])) ||
        !stored_source(items[KIT_SOURCE]) || !PyDict_CheckExact(items[KIT_DIRTY]) ||
        !PyDict_CheckExact(items[KIT_ENCODED]) || !PyDict_CheckExact(items[KIT_PREPARED]) ||
        !PyDict_CheckExact(items[KIT_OVERWRITES]) || !PyList_CheckExact(items[KIT_FREED]) ||
        !PyLong_CheckExact(items[KIT_VERSIONS])) {
        PyErr_SetString(PyExc_TypeError, "insert_stored: kit must be a transaction's write_kit()");
        return -1;
    }
    if (node_layout_of(items[KIT_PLAIN], items[KIT_PATCHED]) < 0) {
        return -1;
    }
    return PyDict_GET_SIZE(items[KIT_DIRTY]) == 0 && PyDict_GET_SIZE(items[KIT_ENCODED]) == 0 &&
           PyDict_GET_SIZE(items[KIT_OVERWRITES]) == 0 && PyList_GET_SIZE(items[KIT_FREED]) == 0;
}

/* The new versions of a path's nodes and of its leaf (``ids``, ``count`` of them, root first) as
   ``WriteTransaction.renew_all`` makes them in a transaction that has changed no node: each new id into
   ``renewed`` (new references), ``count`` slots into ``slots`` (new references); ``versions`` is
   ``_txn.VERSIONS``. 1; 0, making nothing, for ids that are not node ids or that repeat a slot (the
   Python code raises what it must), or a count of versions out of range; -1 with an error set. */
static int
renew_ids(PyObject *const *ids, Py_ssize_t count, PyObject *versions, PyObject **renewed, PyObject **slots)
{
    unsigned long long wrap = PyLong_AsUnsignedLongLong(versions);
    if (wrap == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (wrap == 0 || wrap > 1ULL << (63 - NODE_SLOT_BITS)) {
        return 0;
    }
    uint64_t values[MAX_LEVELS + 1];
    for (Py_ssize_t at = 0; at < count; at++) {
        unsigned long long id = PyLong_AsUnsignedLongLong(ids[at]);
        if (id == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (id >> 63) {
            return 0;
        }
        values[at] = id;
        for (Py_ssize_t before = 0; before < at; before++) {
            if ((values[before] & NODE_SLOT_MASK) == (id & NODE_SLOT_MASK)) {
                return 0;
            }
        }
    }
    for (Py_ssize_t at = 0; at < count; at++) {
        renewed[at] = PyLong_FromUnsignedLongLong(renewed_id(values[at], wrap));
        slots[at] = PyLong_FromUnsignedLongLong(values[at] & NODE_SLOT_MASK);
        if (renewed[at] == NULL || slots[at] == NULL) {
            for (Py_ssize_t made = 0; made <= at; made++) {
                Py_CLEAR(renewed[made]);
                Py_CLEAR(slots[made]);
            }
            return -1;
        }
    }
    return 1;
}

/* Add ``hits`` to the node cache's ``hits`` count (``Transaction.count_hits``). 0, or -1 with an error. */
static int
count_cache_hits(PyObject *cache, Py_ssize_t hits)
{
    if (hits == 0) {
        return 0;
    }
    PyObject *before = PyObject_GetAttr(cache, hits_name);
    if (before == NULL) {
        return -1;
    }
    PyObject *by = PyLong_FromSsize_t(hits), *after = by == NULL ? NULL : PyNumber_Add(before, by);
    Py_DECREF(before);
    Py_XDECREF(by);
    int failed = after == NULL ? -1 : PyObject_SetAttr(cache, hits_name, after);
    Py_XDECREF(after);
    return failed;
}

/* insert_stored(root_id, entry, height, inside, values, limit, delta, kit) -> int | False | None |
   NotImplemented: a scattered insert written from stored bytes (``_btree.NodeTree._insert_stored``) in
   one call, for a transaction that has changed no node yet (its first write, the commonest case: one
   write per transaction): the descent of stored_path from node ``root_id``; the leaf merged with
   ``entry`` and its ``values`` (a tuple or list) in its stored bytes, as merge_children merges one entry
   (``limit`` the node size); a new version of each node of the path and of the leaf (``renew_all``);
   each internal node bumped by ``delta`` (bump_level); and all of them handed to the transaction as
   ``adopt_path`` hands them. ``kit`` is the transaction's ``write_kit()``. No Python code runs but the
   transaction's ``node`` for a node the cache does not hold, and LMDB's get for the leaf's bytes.

   Returns the id of the root's new version; False, changing nothing, when the entry is there already;
   None, changing nothing, for an insert the decoded path takes (the right edge with ``inside``, where
   the pending node may take the entry; a leaf that would split or that the merge leaves to Python; a
   node without stored bytes, or of another class or shape); NotImplemented, changing nothing, for one
   the Python code of the stored path takes (a transaction that changed nodes already, a level that
   bump_level leaves to Python, ids that repeat a slot). */
static PyObject *
insert_stored(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyLong_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        !PyBool_Check(args[3]) || !(PyTuple_CheckExact(args[4]) || PyList_CheckExact(args[4])) ||
        !PyLong_CheckExact(args[5]) || !PyList_CheckExact(args[6])) {
        PyErr_SetString(PyExc_TypeError, "insert_stored(root_id: int, entry: bytes, height: int, inside: bool, "
                                         "values: tuple | list, limit: int, delta: list, kit: tuple)");
        return NULL;
    }
    int fresh = kit_fresh(args[7]);
    if (fresh <= 0) {
        return fresh < 0 ? NULL : Py_NewRef(Py_NotImplemented);
    }
    PyObject **kit = &PyTuple_GET_ITEM(args[7], 0);
    Py_ssize_t height, limit;
    int usable = path_height(args[2], "insert_stored: height", &height);
    if (usable <= 0 || size_argument(args[5], "insert_stored: limit", &limit) < 0) {
        return usable < 0 || PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    NodeTable *table = Py_IS_TYPE(kit[KIT_NODES], &NodeTableType) ? (NodeTable *)kit[KIT_NODES] : NULL;
    PyObject *nodes = PyDict_CheckExact(kit[KIT_NODES]) ? kit[KIT_NODES] : NULL;
    StoredPath path = {0};
    PyObject *root = path_node(args[0], table, nodes, kit[KIT_FETCH], &path.hits);
    if (root == NULL) {
        return NULL;
    }
    int descended = descend_stored(root, PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), height,
                                   kit[KIT_FETCH], kit[KIT_NODES], &path);
    Py_DECREF(root);
    if (descended <= 0) {
        return descended < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *result = NULL, *entries = NULL, *cols = NULL, *merged = NULL;
    PyObject *ids[MAX_LEVELS + 1], *renewed[MAX_LEVELS + 1] = {NULL}, *slots[MAX_LEVELS + 1] = {NULL};
    PyObject *made[MAX_LEVELS] = {NULL};
    Py_ssize_t count = path.levels + 1; /* the path's nodes and the leaf */
    if (PyObject_IsTrue(args[3]) && path.last) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* the leaf merged with the entry, in its stored bytes */
    PyObject *data = fetch_stored(kit[KIT_SOURCE], path.leaf);
    if (data == NULL || data == Py_None) { /* (a leaf without stored bytes: the decoded path's) */
        result = data;
        goto done;
    }
    if (!PyBytes_CheckExact(data)) {
        Py_DECREF(data);
        PyErr_SetString(PyExc_TypeError, "insert_stored: the source's get must return bytes or None");
        goto done;
    }
    Py_ssize_t fields = PySequence_Fast_GET_SIZE(args[4]);
    entries = PyList_New(1);
    cols = PyList_New(fields);
    if (entries == NULL || cols == NULL) {
        Py_DECREF(data);
        goto done;
    }
    PyList_SET_ITEM(entries, 0, Py_NewRef(args[1]));
    for (Py_ssize_t field = 0; field < fields; field++) {
        PyObject *column = PyList_New(1);
        if (column == NULL) {
            Py_DECREF(data);
            goto done;
        }
        PyList_SET_ITEM(column, 0, Py_NewRef(PySequence_Fast_ITEMS(args[4])[field]));
        PyList_SET_ITEM(cols, field, column);
    }
    merged = merge_into(data, entries, 0, 1, cols, limit, limit);
    Py_DECREF(data);
    if (merged == NULL) {
        goto done;
    }
    if (!PyBytes_CheckExact(merged)) { /* the entry's index (there already), or a leaf that splits */
        result = Py_NewRef(PyLong_CheckExact(merged) ? Py_False : Py_None);
        goto done;
    }
    /* new versions of the path's nodes and of the leaf; each internal node bumped, from the bottom up */
    for (Py_ssize_t level = 0; level < path.levels; level++) {
        ids[level] = node_slot(path.nodes[level], SLOT_ID);
    }
    ids[path.levels] = path.leaf;
    int renewal = renew_ids(ids, count, kit[KIT_VERSIONS], renewed, slots);
    if (renewal <= 0) {
        result = renewal < 0 ? NULL : Py_NewRef(Py_NotImplemented);
        goto done;
    }
    for (Py_ssize_t level = path.levels - 1; level >= 0; level--) {
        PyObject *index = PyLong_FromSsize_t(path.indexes[level]);
        if (index == NULL) {
            goto done;
        }
        made[level] = bump_level(module, path.nodes[level], index, renewed[level + 1], args[6], renewed[level]);
        Py_DECREF(index);
        if (made[level] == NULL) {
            result = PyErr_Occurred() ? NULL : Py_NewRef(Py_NotImplemented);
            goto done;
        }
    }
    /* handed to the transaction (renew_all, then adopt_path) */
    for (Py_ssize_t at = 0; at < count; at++) {
        if (PyDict_SetItem(kit[KIT_OVERWRITES], slots[at], ids[at]) < 0) {
            goto done;
        }
    }
    if (PyDict_SetItem(kit[KIT_ENCODED], renewed[path.levels], merged) < 0) {
        goto done;
    }
    for (Py_ssize_t level = path.levels - 1; level >= 0; level--) {
        if (PyDict_SetItem(kit[KIT_PREPARED], renewed[level], made[level]) < 0 ||
            PyDict_SetItem(kit[KIT_ENCODED], renewed[level], node_slot(made[level], SLOT_PACKED)) < 0) {
            goto done;
        }
    }
    if (count_cache_hits(kit[KIT_CACHE], path.hits) < 0) {
        goto done;
    }
    result = Py_NewRef(renewed[0]);
done:
    for (Py_ssize_t at = 0; at < count; at++) {
        Py_XDECREF(renewed[at]);
        Py_XDECREF(slots[at]);
        if (at < path.levels) {
            Py_XDECREF(made[at]);
        }
    }
    Py_XDECREF(entries);
    Py_XDECREF(cols);
    Py_XDECREF(merged);
    stored_path_clear(&path);
    return result;
}

/* ------------------------------------------------------------------ root records */

/* The packed form of one summary value (_node.pack_summary): the int itself in the int64 range,
   else [mantissa, shift] with the trailing zero bits factored out (a scaled sum has ~1,074 of
   them), the mantissa as msgpack bin (big-endian two's complement, (bit_length + 8) // 8 bytes)
   when it is still beyond int64: exact float sums of many magnitudes usually are. */
typedef struct {
    long long mantissa;
    long long shift; /* -1: the int itself */
    Py_ssize_t length; /* > 0: the mantissa is the `length` bytes of `bytes` */
    unsigned char bytes[1024];
} SummaryValue;

/* Fill *packed with the packed form of `item` and return its packed size; 0 when the value is left
   to the Python code (not an exact int, or a mantissa beyond 8,184 bits), -1 with an error set. */
static Py_ssize_t
summary_value(PyObject *item, SummaryValue *packed)
{
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    packed->length = 0;
    if (!overflow) {
        packed->mantissa = value;
        packed->shift = -1;
        return int_size(value);
    }
    size_t bits = _PyLong_NumBits(item);
    if (bits == (size_t)-1) {
        return -1;
    }
    if (bits / 8 + 2 > sizeof(packed->bytes)) {
        return 0;
    }
    size_t length, zeros = 0; /* two's complement keeps a value's trailing zero bits */
    int failed;
#if PY_VERSION_HEX < 0x030C0000
    /* The digits read in place, as exact_rshift reads them: a scaled sum's ~1,100 bits were converted
       to bytes to find its trailing zeros (2,100 instructions, twice per commit of a root record). */
    {
        const digit *digits = ((PyLongObject *)item)->ob_digit;
        Py_ssize_t ndigits = Py_ABS(Py_SIZE(item)), at = 0;
        while (at < ndigits && digits[at] == 0) {
            at++;
        }
        zeros = (size_t)at * PyLong_SHIFT + (size_t)__builtin_ctz(digits[at]); /* not 0: it overflowed */
    }
#else
    length = bits / 8 + 2;
#if PY_VERSION_HEX >= 0x030D0000
    failed = _PyLong_AsByteArray((PyLongObject *)item, packed->bytes, length, 1, 1, 1);
#else
    failed = _PyLong_AsByteArray((PyLongObject *)item, packed->bytes, length, 1, 1);
#endif
    if (failed) {
        return -1;
    }
    for (size_t at = 0; at < length; at++) {
        if (packed->bytes[at]) {
            zeros = 8 * at + (size_t)__builtin_ctz(packed->bytes[at]);
            break;
        }
    }
#endif
    PyObject *count = PyLong_FromSize_t(zeros);
    PyObject *shifted = count == NULL ? NULL : PyNumber_Rshift(item, count);
    Py_XDECREF(count);
    if (shifted == NULL) {
        return -1;
    }
    value = PyLong_AsLongLongAndOverflow(shifted, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        Py_DECREF(shifted);
        return -1;
    }
    packed->shift = (long long)zeros;
    Py_ssize_t size = 1 + int_size((long long)zeros);
    if (!overflow) {
        Py_DECREF(shifted);
        packed->mantissa = value;
        return size + int_size(value);
    }
    /* int.to_bytes((bit_length + 8) // 8, "big", signed=True), as _node._pack_int writes it */
    length = (_PyLong_NumBits(shifted) + 8) / 8;
#if PY_VERSION_HEX >= 0x030D0000
    failed = _PyLong_AsByteArray((PyLongObject *)shifted, packed->bytes, length, 0, 1, 1);
#else
    failed = _PyLong_AsByteArray((PyLongObject *)shifted, packed->bytes, length, 0, 1);
#endif
    Py_DECREF(shifted);
    if (failed) {
        return -1;
    }
    packed->length = (Py_ssize_t)length;
    return size + bin_header_size(packed->length) + packed->length;
}

/* Measure a summary (a list), each value's packed form kept in values[0:len(summary)]: its packed
   size; 0 if left to Python (not a list, or a value summary_value leaves), -1 with an error set. */
static Py_ssize_t
measure_summary(PyObject *summary, SummaryValue *values)
{
    Py_ssize_t count = PyList_GET_SIZE(summary), total = array_header_size(count);
    for (Py_ssize_t index = 0; index < count; index++) {
        Py_ssize_t size = summary_value(PyList_GET_ITEM(summary, index), &values[index]);
        if (size <= 0) {
            return size;
        }
        total += size;
    }
    return total;
}

/* Write the `count` values measure_summary kept, as an array; returns the end of what it wrote. */
static char *
write_summary(char *out, const SummaryValue *values, Py_ssize_t count)
{
    out = put_array_header(out, count);
    for (Py_ssize_t index = 0; index < count; index++) {
        const SummaryValue *packed = &values[index];
        if (packed->shift < 0) {
            out = put_int(out, packed->mantissa);
            continue;
        }
        out = put_array_header(out, 2);
        if (packed->length > 0) {
            out = put_bin_header(out, packed->length);
            memcpy(out, packed->bytes, (size_t)packed->length);
            out += packed->length;
        }
        else {
            out = put_int(out, packed->mantissa);
        }
        out = put_int(out, packed->shift);
    }
    return out;
}

/* pack_root(node_id, height, summary, pending, pending_summary) -> bytes | None: a root record as
   _txn.encode_root writes it, [node_id, height, summary] plus [pending, pending_summary] when
   pending is not 0, the summaries packed as _node.pack_summary packs them. ``pending`` is the
   pending node's bytes (written as a bin), or the id of a pending node stored by itself (format 2). */
static PyObject *
pack_root(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pack_root(node_id, height, summary, pending, pending_summary)");
        return NULL;
    }
    PyObject *held = PyBytes_CheckExact(args[3]) ? args[3] : NULL;
    Py_ssize_t held_size = held != NULL ? PyBytes_GET_SIZE(held) : 0;
    long long ids[3] = {0, 0, 0};
    for (int index = 0; index < 3; index++) {
        if (index == 2 && held != NULL) {
            break;
        }
        PyObject *item = args[index == 2 ? 3 : index];
        int overflow;
        ids[index] = PyLong_CheckExact(item) ? PyLong_AsLongLongAndOverflow(item, &overflow) : (overflow = 1, 0);
        if (ids[index] == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (overflow) {
            Py_RETURN_NONE;
        }
    }
    int pending = held != NULL ? held_size > 0 : ids[2] != 0;
    if (!PyList_CheckExact(args[2]) || (pending && !PyList_CheckExact(args[4]))) {
        Py_RETURN_NONE;
    }
    /* each value measured once, its packed form kept for the write (the big sums' conversions
       are most of the work) */
    Py_ssize_t counts[2] = {PyList_GET_SIZE(args[2]), pending ? PyList_GET_SIZE(args[4]) : 0};
    SummaryValue *values = PyMem_Malloc((size_t)(counts[0] + counts[1] + 1) * sizeof(SummaryValue));
    if (values == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t first = measure_summary(args[2], values);
    Py_ssize_t second = pending && first > 0 ? measure_summary(args[4], values + counts[0]) : 1;
    if (first <= 0 || second <= 0) {
        PyMem_Free(values);
        if (first < 0 || second < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_ssize_t reference = held != NULL ? bin_header_size(held_size) + held_size : int_size(ids[2]);
    Py_ssize_t total = 1 + int_size(ids[0]) + int_size(ids[1]) + first + (pending ? reference + second : 0);
    PyObject *packed = PyBytes_FromStringAndSize(NULL, total);
    if (packed == NULL) {
        PyMem_Free(values);
        return NULL;
    }
    char *out = put_array_header(PyBytes_AS_STRING(packed), pending ? 5 : 3);
    out = put_int(out, ids[0]);
    out = put_int(out, ids[1]);
    out = write_summary(out, values, counts[0]);
    if (pending) {
        if (held != NULL) {
            out = put_bin_header(out, held_size);
            memcpy(out, PyBytes_AS_STRING(held), (size_t)held_size);
            out += held_size;
        }
        else {
            out = put_int(out, ids[2]);
        }
        out = write_summary(out, values + counts[0], counts[1]);
    }
    PyMem_Free(values);
    assert(out == PyBytes_AS_STRING(packed) + total);
    return packed;
}

/* An int element (not a float) at data[*at] in the int64 range: 1 with *value set, else 0. */
static int
read_int64(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, int64_t *value)
{
    Element element;
    uint64_t word;
    if (!read_element(data, length, at, 0, &element) || stored_number(data, &element, &word) != VALUES_INT) {
        return 0;
    }
    *value = (int64_t)word;
    return 1;
}

#define SUMMARY_BITS 8192 /* _node._SUMMARY_BITS: more bits than any summary value has */

/* One packed summary value at data[*at]: an int, or (not ``first``, the count) a [mantissa, shift]
   pair whose mantissa is an int or a bin, joined into *item within SUMMARY_BITS bits. 1 with a new
   reference in *item, 0 for anything else, -1 with an error set. */
static int
read_summary_value(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, int first, PyObject **item)
{
    int64_t value, shift;
    Py_ssize_t pair;
    Element element;
    if (read_int64(data, length, at, &value)) {
        if (first && value < 0) {
            return 0;
        }
        *item = PyLong_FromLongLong(value);
        return *item == NULL ? -1 : 1;
    }
    if (first || !read_array_header(data, length, at, &pair) || pair != 2) {
        return 0;
    }
    PyObject *mantissa;
    if (read_int64(data, length, at, &value)) {
        mantissa = PyLong_FromLongLong(value);
    }
    else if (read_element(data, length, at, 1, &element)) {
        Py_ssize_t size = element.size - (element.payload - element.at);
        if (size > SUMMARY_BITS / 8) {
            return 0;
        }
        mantissa = _PyLong_FromByteArray(data + element.payload, (size_t)size, 0, 1);
    }
    else {
        return 0;
    }
    if (mantissa == NULL) {
        return -1;
    }
    int64_t bits = (int64_t)_PyLong_NumBits(mantissa);
    if (!read_int64(data, length, at, &shift) || shift < 0 || shift > SUMMARY_BITS || bits < 0 ||
        bits > SUMMARY_BITS - shift) { /* no bits + shift: a damaged shift near 2**63 overflows it */
        Py_DECREF(mantissa);
        return 0;
    }
    PyObject *amount = PyLong_FromLongLong(shift);
    *item = amount == NULL ? NULL : PyNumber_Lshift(mantissa, amount);
    Py_XDECREF(amount);
    Py_DECREF(mantissa);
    return *item == NULL ? -1 : 1;
}

/* A packed summary at data[*at] (see _node.pack_summary) as a new list of ints, its first item (the
   count) a plain int in [0, 2**63); NULL with no error set for anything else, NULL with an error set
   on failure. */
static PyObject *
read_summary(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at)
{
    Py_ssize_t count;
    if (!read_array_header(data, length, at, &count) || count < 1 || count > length) {
        return NULL;
    }
    PyObject *summary = PyList_New(count);
    if (summary == NULL) {
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item;
        if (read_summary_value(data, length, at, index == 0, &item) <= 0) {
            Py_DECREF(summary); /* the items not set are NULL, which a list's dealloc skips */
            return NULL;
        }
        PyList_SET_ITEM(summary, index, item);
    }
    return summary;
}

/* unpack_root(data) -> (node_id, height, summary, pending, pending_summary) | None: a root record's
   fields as _txn.decode_root reads them: ``pending`` the pending node's bytes, a format 2 pending
   node's id, or None (and ``pending_summary`` None) when nothing is pending. None for anything
   else, which the Python decoder then reads or refuses. */
static PyObject *
unpack_root(PyObject *Py_UNUSED(module), PyObject *data)
{
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "unpack_root(data): data must be bytes");
        return NULL;
    }
    const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t length = PyBytes_GET_SIZE(data), at = 0, count;
    int64_t node_id, height, id = 0;
    if (!read_array_header(bytes, length, &at, &count) || (count != 3 && count != 5) ||
        !read_int64(bytes, length, &at, &node_id) || !read_int64(bytes, length, &at, &height)) {
        Py_RETURN_NONE;
    }
    PyObject *summary = read_summary(bytes, length, &at);
    if (summary == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *pending = NULL, *pending_summary = NULL;
    if (count == 5) {
        Element element;
        Py_ssize_t here = at;
        if (read_element(bytes, length, &at, 1, &element)) {
            Py_ssize_t size = element.size - (element.payload - element.at);
            pending = PyBytes_FromStringAndSize((const char *)bytes + element.payload, size);
        }
        else if ((at = here, read_int64(bytes, length, &at, &id))) {
            pending = PyLong_FromLongLong(id);
        }
        else {
            Py_DECREF(summary);
            Py_RETURN_NONE;
        }
        pending_summary = pending == NULL ? NULL : read_summary(bytes, length, &at);
        if (pending_summary == NULL) {
            Py_DECREF(summary);
            Py_XDECREF(pending);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
    }
    if (at != length) { /* bytes after the record: let the Python decoder say so */
        Py_DECREF(summary);
        Py_XDECREF(pending);
        Py_XDECREF(pending_summary);
        Py_RETURN_NONE;
    }
    if (pending == NULL) {
        pending = Py_NewRef(Py_None);
        pending_summary = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(LLNNN)", (long long)node_id, (long long)height, summary, pending, pending_summary);
}

/* ------------------------------------------------------------------ freezing a node */

/* The items of a decoded node's array (a tuple, or a list of joined limbs) as a C array, or NULL when
   it is neither or not ``size`` long. Borrowed. */
static PyObject **
node_array(PyObject *array, Py_ssize_t size)
{
    if (PyTuple_CheckExact(array) && PyTuple_GET_SIZE(array) == size) {
        return &PyTuple_GET_ITEM(array, 0);
    }
    if (PyList_CheckExact(array) && PyList_GET_SIZE(array) == size) {
        static PyObject *no_items[1]; /* an empty list may have no item array at all */
        return size ? &PyList_GET_ITEM(array, 0) : no_items;
    }
    return NULL;
}

/* Whether every item of an array is an exact int in [low, high] (no range when low > high). */
static int
ints_within(PyObject **items, Py_ssize_t size, long long low, long long high)
{
    for (Py_ssize_t index = 0; index < size; index++) {
        if (!PyLong_CheckExact(items[index])) {
            return 0;
        }
        if (low <= high) {
            int overflow;
            long long value = PyLong_AsLongLongAndOverflow(items[index], &overflow);
            if (overflow || value < low || value > high) {
                return 0;
            }
        }
    }
    return 1;
}

/* valid_node(leaf, keys, kids, cols, shifts) -> bool: _node._consistent's checks of a decoded node's
   parts (the reference, and the fallback): arrays of one length; keys bytes; a leaf's values ints or
   finite floats; an internal node's at least one child, child ids and counts from 1 and float counts from
   0 (all int64), its sums ints, its shifts in [0, 2048] and 0 for the counts. */
static PyObject *
valid_node(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "valid_node(leaf, keys, kids, cols, shifts)");
        return NULL;
    }
    int leaf = PyObject_IsTrue(args[0]);
    if (leaf < 0) {
        return NULL;
    }
    PyObject *keys = args[1], *cols = args[3];
    if (!(PyTuple_CheckExact(keys) || PyList_CheckExact(keys)) || !(PyTuple_CheckExact(cols) || PyList_CheckExact(cols))) {
        Py_RETURN_FALSE;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(keys), columns = PySequence_Fast_GET_SIZE(cols);
    PyObject **items = node_array(keys, size), **holders = node_array(cols, columns);
    if (items == NULL || holders == NULL) {
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t index = 0; index < size; index++) {
        if (!PyBytes_CheckExact(items[index])) {
            Py_RETURN_FALSE;
        }
    }
    if (leaf) {
        for (Py_ssize_t column = 0; column < columns; column++) {
            PyObject **values = node_array(holders[column], size);
            if (values == NULL) {
                Py_RETURN_FALSE;
            }
            for (Py_ssize_t index = 0; index < size; index++) {
                PyObject *value = values[index];
                if (PyFloat_CheckExact(value) ? !isfinite(PyFloat_AS_DOUBLE(value)) : !PyLong_CheckExact(value)) {
                    Py_RETURN_FALSE;
                }
            }
        }
        Py_RETURN_TRUE;
    }
    Py_ssize_t fields = (columns - 1) / 2;
    PyObject **kids = node_array(args[2], size), **shifts = node_array(args[4], columns);
    if (size < 1 || columns < 1 || kids == NULL || shifts == NULL || !ints_within(kids, size, 1, INT64_MAX)) {
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        int counts = column == 0 || column > fields;
        PyObject **values = node_array(holders[column], size);
        if (values == NULL || !ints_within(values, size, column == 0 ? 1 : 0, counts ? INT64_MAX : -1) ||
            !ints_within(&shifts[column], 1, 0, counts ? 0 : 2048)) {
            Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

/* Untrack a tuple for the cyclic garbage collector if it holds only exact bytes, ints, floats and
   untracked tuples: such a tuple can be part of no reference cycle. The collector does the same on
   its first look at the tuple (_PyTuple_MaybeUntrack); doing it at once spares that look, which
   after a batch of thousands of node rewrites costs tens of milliseconds. */
static void
untrack_if_atomic(PyObject *tuple)
{
    Py_ssize_t count = PyTuple_GET_SIZE(tuple);
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, index);
        if (!(PyBytes_CheckExact(item) || PyLong_CheckExact(item) || PyFloat_CheckExact(item)
              || (PyTuple_CheckExact(item) && !PyObject_GC_IsTracked(item)))) {
            return;
        }
    }
    if (PyObject_GC_IsTracked(tuple)) {
        PyObject_GC_UnTrack(tuple);
    }
}

/* ``value`` (a new reference this consumes) as a tuple, untracked when it can be; a new reference.

   A list that only its holder refers to (``owners`` references: the node's attribute, or the
   column holder, and the caller's) gives its items to the tuple: their pointers move, and no item
   is touched, where a copy adds a reference to each item and the list's end takes it back (a node of
   48 children has ~340 items, most of them out of the CPU caches after a descent). A list that
   untracked_list made holds only bytes, ints, floats and such lists, and nothing ever adds another
   kind to a node's lists (see untracked_list): its tuple is untracked without a look at the items. */
static PyObject *
frozen(PyObject *value, Py_ssize_t owners)
{
    if (PyList_CheckExact(value) && Py_REFCNT(value) == owners) {
        Py_ssize_t count = PyList_GET_SIZE(value);
        PyObject *tuple = PyTuple_New(count);
        if (tuple == NULL) {
            Py_DECREF(value);
            return NULL;
        }
        PyListObject *list = (PyListObject *)value;
        if (count) {
            memcpy(&PyTuple_GET_ITEM(tuple, 0), list->ob_item, (size_t)count * sizeof(PyObject *));
        }
        Py_SET_SIZE(list, 0); /* the items are the tuple's now: the list frees its array alone */
        int atomic = !PyObject_GC_IsTracked(value);
        Py_DECREF(value);
        if (atomic) {
            PyObject_GC_UnTrack(tuple);
        }
        else {
            untrack_if_atomic(tuple);
        }
        return tuple;
    }
    PyObject *tuple = PySequence_Tuple(value);
    Py_DECREF(value);
    if (tuple != NULL) {
        untrack_if_atomic(tuple);
    }
    return tuple;
}

/* The attribute ``name`` of ``node`` as a tuple (see frozen); a new reference. With ``nested``, a
   column holder: each column is made a tuple first. */
static PyObject *
frozen_attribute(PyObject *node, PyObject *name, int nested)
{
    PyObject *value = PyObject_GetAttr(node, name);
    if (value == NULL) {
        return NULL;
    }
    if (nested && PyList_CheckExact(value) && Py_REFCNT(value) == 2) { /* the columns, in place */
        for (Py_ssize_t index = 0; index < PyList_GET_SIZE(value); index++) {
            PyObject *column = PyList_GET_ITEM(value, index);
            PyObject *inner = frozen(Py_NewRef(column), 2); /* the holder's reference and this one */
            if (inner == NULL) {
                Py_DECREF(value);
                return NULL;
            }
            PyList_SET_ITEM(value, index, inner); /* no Python code runs, and no one else sees it */
            Py_DECREF(column);
        }
        return frozen(value, 2);
    }
    if (nested) {
        PyObject *tuple = PySequence_Tuple(value);
        Py_DECREF(value);
        if (tuple == NULL) {
            return NULL;
        }
        for (Py_ssize_t index = 0; index < PyTuple_GET_SIZE(tuple); index++) {
            PyObject *inner = frozen(Py_NewRef(PyTuple_GET_ITEM(tuple, index)), 0);
            if (inner == NULL) {
                Py_DECREF(tuple);
                return NULL;
            }
            PyObject *old = PyTuple_GET_ITEM(tuple, index);
            PyTuple_SET_ITEM(tuple, index, inner); /* the tuple is new: no one else sees it yet */
            Py_DECREF(old);
        }
        untrack_if_atomic(tuple);
        return tuple;
    }
    return frozen(value, 2);
}

/* A list copy of a sequence, untracked when its items allow it (as untrack_if_atomic); a new
   reference. A node's lists hold bytes, ints and floats (a column holder, such lists) and nothing
   ever adds another kind: they can join no reference cycle, so the collector need not look at them. */
static PyObject *
untracked_list(PyObject *items, int nested)
{
    PyObject *list = PySequence_List(items);
    if (list == NULL) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(list);
    if (!nested && PyTuple_CheckExact(items) && !PyObject_GC_IsTracked(items)) {
        PyObject_GC_UnTrack(list); /* an untracked tuple's items are atomic already: no look at them */
        return list;
    }
    int atomic = 1;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(list, index);
        if (nested) {
            PyObject *inner = untracked_list(item, 0);
            if (inner == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, index, inner); /* the list is new: no one else sees it yet */
            Py_DECREF(item);
            item = inner;
        }
        if (!(PyBytes_CheckExact(item) || PyLong_CheckExact(item) || PyFloat_CheckExact(item)
              || (PyList_CheckExact(item) && !PyObject_GC_IsTracked(item)))) {
            atomic = 0;
        }
    }
    if (atomic && PyObject_GC_IsTracked(list)) {
        PyObject_GC_UnTrack(list);
    }
    return list;
}

/* thaw(node) -> (keys, kids, cols, shifts): new lists for a dirty copy of a node (Node.copy),
   untracked by the cyclic garbage collector. */
/* A new untracked container of ``count`` items: a list when ``lists``, else a tuple. */
static PyObject *
new_sequence(Py_ssize_t count, int lists)
{
    PyObject *sequence = lists ? PyList_New(count) : PyTuple_New(count);
    if (sequence != NULL && PyObject_GC_IsTracked(sequence)) {
        PyObject_GC_UnTrack(sequence); /* filled with bytes, numbers and such containers only */
    }
    return sequence;
}

static void
sequence_set(PyObject *sequence, Py_ssize_t index, PyObject *item)
{
    if (PyList_CheckExact(sequence)) {
        PyList_SET_ITEM(sequence, index, item);
    }
    else {
        PyTuple_SET_ITEM(sequence, index, item);
    }
}

/* Whether an image holds its leaf whole: a leaf's, with every column VALUES_FLOAT or VALUES_INT. */
static int
image_is_whole(const Image *image)
{
    int whole = image->kind == IMAGE_LEAF && image->fields >= 0;
    for (Py_ssize_t field = 0; whole && field < image->fields; field++) {
        whole = image->values[field] == VALUES_FLOAT || image->values[field] == VALUES_INT;
    }
    return whole;
}

/* Key ``index`` of an image, as a new bytes object; NULL with an error set. */
static PyObject *
image_key_bytes(const Image *image, Py_ssize_t index)
{
    Py_ssize_t size;
    const char *key = image_key(image, index, &size);
    return key == NULL ? NULL : PyBytes_FromStringAndSize(key, size);
}

/* The keys and value columns of a leaf whose image (``blob``) holds it whole (every column
   VALUES_FLOAT or VALUES_INT), as ``(keys, cols)``: tuples as decode_node makes them, or lists as
   thaw makes them when ``lists``, untracked by the garbage collector either way. None for any other
   image; NULL with an error set. */
static PyObject *
image_parts(PyObject *blob, int lists)
{
    Image image;
    if (image_parse(Py_NewRef(blob), &image) < 0) {
        return NULL;
    }
    Py_ssize_t count = image.count, fields = image.fields;
    if (!image_is_whole(&image)) {
        image_release(&image);
        Py_RETURN_NONE;
    }
    PyObject *keys = new_sequence(count, lists), *cols = new_sequence(fields, lists), *result = NULL;
    for (Py_ssize_t index = 0; keys != NULL && cols != NULL && index < count; index++) {
        PyObject *item = image_key_bytes(&image, index);
        if (item == NULL) {
            goto done;
        }
        sequence_set(keys, index, item);
    }
    const char *columns = image.values + align8(fields);
    for (Py_ssize_t field = 0; keys != NULL && cols != NULL && field < fields; field++) {
        PyObject *column = new_sequence(count, lists);
        if (column == NULL) {
            goto done;
        }
        sequence_set(cols, field, column);
        for (Py_ssize_t index = 0; index < count; index++) {
            PyObject *item = cell_value(columns + 8 * (field * count + index), image.values[field]);
            if (item == NULL) {
                goto done;
            }
            sequence_set(column, index, item);
        }
    }
    if (keys != NULL && cols != NULL) {
        result = PyTuple_Pack(2, keys, cols);
    }
done:
    Py_XDECREF(keys);
    Py_XDECREF(cols);
    image_release(&image);
    return result;
}

/* thaw of a compact leaf (its keys never made: see _node.Node.compact): new lists straight from its
   image, which stays the committed node's only form; NULL with an error set, or None (not compact). */
static PyObject *
thaw_compact(PyObject *node)
{
    PyObject *keys = PyObject_GenericGetAttr(node, keys_name); /* the slot itself: no __getattr__ */
    if (keys != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        Py_XDECREF(keys);
        return keys == NULL ? NULL : Py_NewRef(Py_None);
    }
    PyErr_Clear();
    PyObject *blob = PyObject_GetAttr(node, blob_name);
    PyObject *parts = blob == NULL ? NULL : PyBytes_CheckExact(blob) ? image_parts(blob, 1) : Py_NewRef(Py_None);
    Py_XDECREF(blob);
    if (parts == NULL || parts == Py_None) {
        if (parts == Py_None) { /* no lists to be had from it: let the attribute say what is wrong */
            Py_DECREF(parts);
            keys = PyObject_GetAttr(node, keys_name);
            Py_XDECREF(keys);
            return keys == NULL ? NULL : Py_NewRef(Py_None);
        }
        return NULL;
    }
    PyObject *cols = PyTuple_GET_ITEM(parts, 1), *kids = new_sequence(0, 1);
    PyObject *shifts = new_sequence(PyList_GET_SIZE(cols), 1);
    PyObject *out = NULL;
    if (kids != NULL && shifts != NULL) {
        for (Py_ssize_t field = 0; field < PyList_GET_SIZE(cols); field++) {
            PyList_SET_ITEM(shifts, field, PyLong_FromLong(0)); /* a small int: cannot fail */
        }
        out = PyTuple_Pack(4, PyTuple_GET_ITEM(parts, 0), kids, cols, shifts);
    }
    Py_XDECREF(kids);
    Py_XDECREF(shifts);
    Py_DECREF(parts);
    return out;
}

static PyObject *
thaw(PyObject *Py_UNUSED(module), PyObject *node)
{
    PyObject *compact = thaw_compact(node);
    if (compact != Py_None) {
        return compact;
    }
    Py_DECREF(compact);
    PyObject *names[4] = {keys_name, kids_name, cols_name, shifts_name};
    PyObject *out = PyTuple_New(4);
    if (out == NULL) {
        return NULL;
    }
    for (int index = 0; index < 4; index++) {
        PyObject *value = PyObject_GetAttr(node, names[index]);
        PyObject *list = value == NULL ? NULL : untracked_list(value, index == 2);
        Py_XDECREF(value);
        if (list == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, index, list);
    }
    return out;
}

/* freeze_node(node): _node.Node.freeze, its lists made untracked tuples. */
static PyObject *untrack(PyObject *module, PyObject *node);

static PyObject *
freeze_node(PyObject *Py_UNUSED(module), PyObject *node)
{
    PyObject *names[4] = {keys_name, kids_name, shifts_name, cols_name};
    PyObject *frozen[4] = {NULL, NULL, NULL, NULL};
    for (int index = 0; index < 4; index++) {
        frozen[index] = frozen_attribute(node, names[index], index == 3);
        if (frozen[index] == NULL) {
            for (int done = 0; done < index; done++) {
                Py_DECREF(frozen[done]);
            }
            return NULL;
        }
    }
    int failed = PyObject_SetAttr(node, dirty_name, Py_False) < 0;
    for (int index = 0; index < 4; index++) {
        failed = failed || PyObject_SetAttr(node, names[index], frozen[index]) < 0;
        Py_DECREF(frozen[index]);
    }
    if (failed) {
        return NULL;
    }
    return untrack(NULL, node);
}

/* untrack(node) -> node: a committed node, untracked by the cyclic garbage collector. A committed
   node holds bytes, ints, floats and tuples of those (its dirty copy refers to it, never the other
   way), so it can be part of no cycle; tracked, the ~32,000 nodes of a full cache were walked by
   every full collection, 15-20% of a read that decodes a leaf (with 10^7 items). */
static PyObject *
untrack(PyObject *Py_UNUSED(module), PyObject *node)
{
    if (PyObject_IS_GC(node) && PyObject_GC_IsTracked(node)) {
        PyObject_GC_UnTrack(node);
    }
    return Py_NewRef(node);
}

/* ------------------------------------------------------------------ module */

/* ------------------------------------------------------------------ compact leaves */

/* The columns of a stored leaf from data[*at] (``fields`` arrays of ``count`` numbers) into a leaf
   image's values section ``out``: each one's type, then its numbers. 0 when a column is not of one
   type (mixed, or an int beyond int64) or the bytes do not parse. */
static int
stored_columns(const unsigned char *data, Py_ssize_t length, Py_ssize_t *at, Py_ssize_t count,
               Py_ssize_t fields, char *out)
{
    uint64_t *column = (uint64_t *)(void *)(out + align8(fields));
    for (Py_ssize_t field = 0; field < fields; field++, column += count) {
        Py_ssize_t size, here;
        if (!read_array_header(data, length, at, &size) || size != count) {
            return 0;
        }
        here = *at;
        if (here < length && data[here] == 0xcb) { /* a column of doubles: the common case, unrolled */
            if (length - here < 9 * count) {
                return 0;
            }
            for (Py_ssize_t index = 0; index < count; index++, here += 9) {
                uint64_t bits;
                if (data[here] != 0xcb) {
                    return 0;
                }
                memcpy(&bits, data + here + 1, sizeof(bits));
                column[index] = __builtin_bswap64(bits);
                if ((column[index] & EXPONENT_BITS) == EXPONENT_BITS) {
                    return 0; /* an infinity or a NaN: never stored (damage, which the decode reports) */
                }
            }
            *at = here;
            out[field] = VALUES_FLOAT;
            continue;
        }
        for (Py_ssize_t index = 0; index < count; index++) {
            Element element;
            if (!read_element(data, length, at, 0, &element) || stored_number(data, &element, &column[index]) != VALUES_INT) {
                return 0;
            }
        }
        out[field] = VALUES_INT;
    }
    return 1;
}

/* leaf_image(data, kind=1) -> (image, fields) | None: the search image of a stored leaf (``_node``
   layout ``[1, [entry, ...], [value, ...] per field]``; with kind 4, a pending node, laid out as a
   leaf) built from its bytes, byte for byte the image
   build_image builds from the decoded leaf, when every value column is all floats or all int64s (the
   image then holds the leaf whole: see leaf_lists); None for anything else (another kind, a mixed or
   wider column, no entries, bytes that do not parse), which the caller decodes in full.

   A leaf read from the database is decoded into this alone (``_node.Node.compact``): one object
   where the decoded tuples hold ~150 (a key and a number object per value), so a leaf that a descent
   reads and the cache later drops costs one allocation and one free, and a leaf cached takes a third
   of the memory. One pass: the image is allocated with room for keys as long as the rest of the
   bytes, and shrunk to its size at the end. */
static PyObject *
leaf_image(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    long kind = 1;
    if (nargs < 1 || nargs > 2 || !PyBytes_Check(args[0]) || (nargs == 2 && !PyLong_CheckExact(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "leaf_image(data: bytes, kind: int = 1)");
        return NULL;
    }
    if (nargs == 2 && ((kind = PyLong_AsLong(args[1])) != 1 && kind != 4)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "leaf_image: kind must be 1 (a leaf) or 4 (a pending node)");
        }
        return NULL;
    }
    PyObject *stored = args[0];
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(stored);
    Py_ssize_t length = PyBytes_GET_SIZE(stored), at = 0, parts, count;
    if (!read_array_header(data, length, &at, &parts) || parts < 2 || parts - 2 >= NO_VALUES || at >= length ||
        data[at++] != kind || !read_array_header(data, length, &at, &count) || count < 1 || count > length) {
        Py_RETURN_NONE;
    }
    Py_ssize_t fields = parts - 2;
    Image image;
    PyObject *blob = image_new(count, IMAGE_LEAF, fields, length - at, &image);
    if (blob == NULL) {
        return NULL;
    }
    Element element;
    for (Py_ssize_t index = 0; index < count; index++) {
        if (!read_element(data, length, &at, 1, &element)) {
            Py_DECREF(blob);
            Py_RETURN_NONE;
        }
        image_put_key(&image, index, (const char *)data + element.payload,
                      element.size - (element.payload - element.at));
    }
    if (!stored_columns(data, length, &at, count, fields, (char *)image.values) || at != length) {
        Py_DECREF(blob);
        Py_RETURN_NONE;
    }
    uint32_t end;
    memcpy(&end, image.offsets + count * (Py_ssize_t)sizeof(uint32_t), sizeof(end));
    if (_PyBytes_Resize(&blob, (Py_ssize_t)end) < 0) {
        return NULL;
    }
    return Py_BuildValue("(Nn)", blob, fields);
}

/* leaf_rows(image, start, stop) -> (keys, rows) | None: entries ``start:stop`` (clipped to the leaf) of
   a leaf whose image holds it whole, as a tuple of keys and a tuple of value rows (one tuple of
   values per entry, as an item holds them), made for those entries alone; None for any other image
   (see image_parts). What an iteration over part of a leaf (a page) reads, where leaf_lists makes
   every entry's key and value and the caller then gathers each row. */
static PyObject *
leaf_rows(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t start, stop;
    if (nargs != 3 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "leaf_rows(image: bytes, start: int, stop: int)");
        return NULL;
    }
    if (size_argument(args[1], "leaf_rows(): start", &start) < 0 ||
        size_argument(args[2], "leaf_rows(): stop", &stop) < 0) {
        return NULL;
    }
    Image image;
    if (image_parse(Py_NewRef(args[0]), &image) < 0) {
        return NULL;
    }
    Py_ssize_t count = image.count, fields = image.fields;
    if (!image_is_whole(&image)) {
        image_release(&image);
        Py_RETURN_NONE;
    }
    stop = stop < count ? stop : count;
    start = start < stop ? start : stop;
    PyObject *keys = new_sequence(stop - start, 0), *rows = new_sequence(stop - start, 0), *result = NULL;
    const char *columns = image.values + align8(fields);
    for (Py_ssize_t index = start; keys != NULL && rows != NULL && index < stop; index++) {
        PyObject *item = image_key_bytes(&image, index);
        if (item == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(keys, index - start, item);
        PyObject *row = new_sequence(fields, 0);
        if (row == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(rows, index - start, row);
        for (Py_ssize_t field = 0; field < fields; field++) {
            PyObject *value = cell_value(columns + 8 * (field * count + index), image.values[field]);
            if (value == NULL) {
                goto done;
            }
            PyTuple_SET_ITEM(row, field, value);
        }
    }
    if (keys != NULL && rows != NULL) {
        result = PyTuple_Pack(2, keys, rows);
    }
done:
    Py_XDECREF(keys);
    Py_XDECREF(rows);
    image_release(&image);
    return result;
}

/* leaf_lists(image) -> (keys, cols) | None: the keys and value columns of a leaf whose image holds
   it whole, as tuples, as decode_node makes them; None for any other image (see image_parts). */
static PyObject *
leaf_lists(PyObject *Py_UNUSED(module), PyObject *blob)
{
    if (!PyBytes_CheckExact(blob)) {
        PyErr_SetString(PyExc_TypeError, "leaf_lists(image: bytes)");
        return NULL;
    }
    return image_parts(blob, 0);
}

static PyMethodDef methods[] = {
    {"item_entry", (PyCFunction)(void (*)(void))item_entry, METH_FASTCALL,
     "item_entry(key, id, limit) -> bytes | None: encode_key(key) + encode_id(id) when the C encoders "
     "take both (see one_key; the id an exact int64 or str), each of at most limit bytes; else None."},
    {"plain_values", (PyCFunction)(void (*)(void))plain_values, METH_FASTCALL,
     "plain_values(values, count) -> tuple | None: values when it is an exact tuple of count exact "
     "finite floats and exact ints from -2**63 to 2**64 - 1; else None."},
    {"put_ops", (PyCFunction)(void (*)(void))put_ops, METH_FASTCALL,
     "put_ops(txn, dbs, ops, start) -> None: txn.put(key, value, True, True, False, dbs[table]) (or "
     "txn.delete(key, b'', dbs[table]) for a value of None) for each (table, key, value) of ops[start:]."},
    {"int_keys", int_keys, METH_O,
     "int_keys(values) -> list[bytes] | None: encode_key of each exact int in the int64 range."},
    {"datetime_keys", datetime_keys, METH_O,
     "datetime_keys(values) -> list[bytes] | None: encode_key of each exact datetime in datetime.UTC."},
    {"join_limbs", join_limbs, METH_O,
     "join_limbs(limbs) -> tuple[int, ...] | None: _node._join_limbs (a wide column's limbs joined)."},
    {"one_key", (PyCFunction)(void (*)(void))one_key, METH_FASTCALL,
     "one_key(value, body, limit) -> bytes | None: encode_key (or encode_body) of one exact int64, UTC "
     "datetime, str, or flat tuple of those, None and bools."},
    {"text_keys", (PyCFunction)(void (*)(void))text_keys, METH_FASTCALL,
     "text_keys(values, limit) -> list[bytes] | None: encode_key of each exact str of at most limit "
     "UTF-8 bytes and no NUL."},
    {"settle", (PyCFunction)(void (*)(void))settle, METH_FASTCALL,
     "settle(plus, minus, spans, fields) -> list[int] | None: the summary sum(plus) - sum(minus) "
     "plus the signed leaf spans, exactly."},
    {"bisect", (PyCFunction)(void (*)(void))node_bisect, METH_FASTCALL,
     "bisect(node, key, right) -> int: bisect_right (or bisect_left) of key in node.keys, through a "
     "search blob cached on committed nodes."},
    {"rank", (PyCFunction)(void (*)(void))tree_rank, METH_FASTCALL,
     "rank(node, key, after, fetch, nodes) -> (rank, hits): entries < key (<= key when after) below "
     "node, in one descent."},
    {"rank_range", (PyCFunction)(void (*)(void))tree_rank_range, METH_FASTCALL,
     "rank_range(node, low, low_after, high, high_after, fetch, nodes) -> (start, stop, hits)."},
    {"find", (PyCFunction)(void (*)(void))tree_find, METH_FASTCALL,
     "find(node, entry, fetch, nodes) -> (values | leaf | None, position | None, hits)."},
    {"select", (PyCFunction)(void (*)(void))tree_select, METH_FASTCALL,
     "select(node, index, fetch, nodes[, item]) -> (leaf, position, hits)."},
    {"range_totals", (PyCFunction)(void (*)(void))range_totals, METH_FASTCALL,
     "range_totals(node, summary, low, low_after, high, high_after, fetch, nodes, fields[, extra, values[, "
     "pending, pending_summary]]) -> "
     "(summary, hits) or None: a range sum in one call"},
    {"decode_entry", (PyCFunction)(void (*)(void))decode_entry, METH_FASTCALL,
     "decode_entry(entry, limit) -> (key, id) or None: an entry of common keys and ids, decoded"},
    {"pack_root", (PyCFunction)(void (*)(void))pack_root, METH_FASTCALL,
     "pack_root(node_id, height, summary, pending, pending_summary) -> bytes | None: a root record "
     "(see _txn.encode_root)."},
    {"unpack_root", unpack_root, METH_O,
     "unpack_root(data) -> (node_id, height, summary, pending, pending_summary) | None: a root record's "
     "fields (see _txn.decode_root)."},
    {"thaw", thaw, METH_O,
     "thaw(node) -> (keys, kids, cols, shifts): new lists for a dirty copy, untracked by the garbage "
     "collector."},
    {"freeze_node", freeze_node, METH_O,
     "freeze_node(node) -> node: make a dirty node's lists tuples, and it and them untracked by the "
     "garbage collector."},
    {"valid_node", (PyCFunction)(void (*)(void))valid_node, METH_FASTCALL,
     "valid_node(leaf, keys, kids, cols, shifts) -> bool: a decoded node's parts hold what they must."},
    {"untrack", untrack, METH_O,
     "untrack(node) -> node: a committed node, untracked by the cyclic garbage collector."},
    {"pack_node", (PyCFunction)(void (*)(void))pack_node, METH_FASTCALL,
     "pack_node(head, parts): msgpack's bytes for [head, *parts], or None (see _node.encode_node)."},
    {"pack_internal", (PyCFunction)(void (*)(void))pack_internal, METH_FASTCALL,
     "pack_internal(parts, nfields) -> bytes | None: an internal node's bytes, plain or wide (see "
     "_node.encode_node)."},
    {"add_spans", (PyCFunction)(void (*)(void))add_spans, METH_FASTCALL,
     "add_spans(node, rows, prefixes) -> bool: a batch's merged leaves (rows (child, lo, hi, ...)) added to "
     "their dirty parent's summary columns from the batch's prefix sums; False, changing nothing, when a "
     "column must be rescaled first."},
    {"bump_internal", (PyCFunction)(void (*)(void))bump_internal, METH_FASTCALL,
     "bump_internal(node, packed, index, kid, delta, nfields, patch=None, tuples=False) -> (patch, packed) | (kids, cols, "
     "packed) | None: a committed internal node with one child's id replaced and its summary grown, as "
     "a patch of its base or as tuples, and its bytes (see _node.Node.bumped)"},
    {"bump_path", (PyCFunction)(void (*)(void))bump_path, METH_FASTCALL,
     "bump_path(path, ids, child, delta, plain, patched) -> list: Node.bumped for each internal node of a "
     "write's path, from the bottom up, as far as the kernels take it (see _btree.NodeTree._write_stored)"},
    {"stored_path", (PyCFunction)(void (*)(void))stored_path, METH_FASTCALL,
     "stored_path(root, entry, height, fetch, nodes, plain, patched) -> (path, last, hits, ids) | None: the "
     "descent of a write from stored bytes in one call (see _btree.NodeTree._stored_path)"},
    {"insert_stored", (PyCFunction)(void (*)(void))insert_stored, METH_FASTCALL,
     "insert_stored(root_id, entry, height, inside, values, limit, delta, kit) -> int | False | None | "
     "NotImplemented: a scattered insert written from stored bytes in one call, in a transaction that has "
     "changed no node yet (see _btree.NodeTree._insert_stored)"},
    {"packed_layout", (PyCFunction)(void (*)(void))packed_layout, METH_FASTCALL,
     "packed_layout(packed, count, columns) -> bytes | None: the places of every 16th number of a plain "
     "internal node's child ids and columns, and their ends (see bump_path)"},
    {"make_patched", (PyCFunction)(void (*)(void))make_patched, METH_FASTCALL,
     "make_patched(node, plain, nfields) -> (kids, cols) | None: a patched node made plain (its tuples made "
     "and set, its class set to ``plain``) the first time something reads them (see _node.Node.bumped)"},
    {"patched_parts", (PyCFunction)(void (*)(void))patched_parts, METH_FASTCALL,
     "patched_parts(base, patch, nfields) -> (kids, cols) | None: a patched node's child ids and columns "
     "as tuples (see _node.Node.bumped)"},
    {"repack_internal", (PyCFunction)(void (*)(void))repack_internal, METH_FASTCALL,
     "repack_internal(node, origin, packed, nfields) -> bytes | None: pack_internal's bytes for an "
     "internal node copied from ``origin`` (whose stored bytes are ``packed``) and changed in a few "
     "numbers."},
    {"merge_children", (PyCFunction)(void (*)(void))merge_children, METH_FASTCALL,
     "merge_children(keys, kids, entries, lo, hi, cols, limit, target, stored) -> list of (child, lo, hi, node_id, "
     "merged): a slice of a sorted batch merged into the stored bytes of the leaves it touches."},
    {"leaf_edit", (PyCFunction)(void (*)(void))leaf_edit, METH_FASTCALL,
     "leaf_edit(data, entry, values, nfields) -> (bytes, old values, count) | None | False: one entry of a "
     "stored leaf removed (values None) or given new values, in its stored bytes."},
    {"append_pending", (PyCFunction)(void (*)(void))append_pending, METH_FASTCALL,
     "append_pending(packed, entry, values, capacity) -> bytes | None: a pending node's stored bytes "
     "with an entry appended after its last one (see _tree.appended)."},
    {"pending_edges", pending_edges, METH_O,
     "pending_edges(packed) -> (count, first, last) | None: a pending node's entry count and first "
     "and last entries, read from its stored bytes."},
    {"leaf_image", (PyCFunction)(void (*)(void))leaf_image, METH_FASTCALL,
     "leaf_image(data, kind=1) -> (image, fields) | None: a stored leaf's (or pending node's) search "
     "image, built from its bytes, when the image holds it whole."},
    {"leaf_rows", (PyCFunction)(void (*)(void))leaf_rows, METH_FASTCALL,
     "leaf_rows(image, start, stop) -> (keys, rows) | None: entries start:stop of a leaf whose image "
     "holds it whole, keys and value tuples."},
    {"leaf_lists", leaf_lists, METH_O,
     "leaf_lists(image) -> (keys, cols) | None: a compact leaf's keys and columns, from its image."},
    {"delta_of", delta_of, METH_O,
     "delta_of(values) -> list | None: the summary of one item with these values (see _node.delta_of)."},
    {"sort_order", sort_order, METH_O,
     "sort_order(items) -> list[int] | None: the indexes of a list of bytes in ascending order, equal "
     "items in their order (a stable argsort)."},
    {"float_sum", float_sum, METH_O,
     "float_sum(values) -> int | None: the exact sum of finite floats, in units of 2**-1074."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "tallytree._speedups",
    "Optional C kernels: faster twins of tallytree's key encoders and exact float sums.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_number_sizes();
    init_run_masks();
    if (intern_names() < 0) {
        return NULL;
    }
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) {
        return NULL;
    }
    if (PyType_Ready(&NodeTableType) < 0) {
        return NULL;
    }
    PyObject *created = PyModule_Create(&module);
    if (created != NULL && (PyModule_AddObjectRef(created, "NodeTable", (PyObject *)&NodeTableType) < 0 ||
                            PyModule_AddIntConstant(created, "SLOT_BITS", NODE_SLOT_BITS) < 0)) {
        Py_CLEAR(created);
    }
    return created;
}
