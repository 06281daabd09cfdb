"""The tree algorithm: an order-statistic B+ tree of counts and exact sums, over an abstract node store.

Design
======
This module knows nothing of LMDB or of keys: it orders opaque *entries* (bytes, see ``_keys``) and sums
value columns, reading and writing nodes only through the small :class:`NodeAccess` interface
(``node``, ``mutable``, ``new_id``, ``adopt``, ``free``). The same code runs over the in-memory store
used by the tests and over LMDB, as SQLite's b-tree runs over its pager.

Every parent keeps each child's count and sums (see ``_node``), so:

* ``rank`` / ``prefix_summary`` descend once, adding the cumulative count (and sums) of the children left
  of the path: one node per level, O(log n) whatever the size of the range.
* A bounded count or sum is ``prefix(upper) - prefix(lower)``: two descents.
* ``select`` descends by cumulative counts.
* ``insert`` / ``delete`` / ``update`` change one leaf and add a delta to the summary of each node on the
  path, then split, merge or borrow on the way back up.
* ``delete_range`` drops whole subtrees that fall inside the range (reading none of their leaves), trims
  the two boundary paths, then repairs underfull nodes along them: O(log n + nodes removed).

Writes are copy-on-write: ``mutable(node)`` hands back a copy under a fresh id the first time a committed
node is changed in a transaction (later changes in the same transaction edit that copy in place), and the
parent's pointer is rewritten. Committed nodes are never modified, which is what makes the node cache and
concurrent readers safe.

Costs, with ``B`` the node size: reads O(log_B n) node visits plus O(B) per visit on a node first seen
(cumulative arrays are computed once and cached on committed nodes); writes O(B log_B n).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from operator import add, sub
from typing import Any, Protocol

from ._node import Chunk, Node, delta_of, summarize

__all__ = ["NodeAccess", "Root", "Tree", "same_values", "vadd", "vsub"]


class NodeAccess(Protocol):
    """What the tree needs from storage, inside one transaction."""

    def node(self, node_id: int) -> Node:
        """Return the node with this id (a dirty one if this transaction changed it)."""
        ...

    def mutable(self, node: Node) -> Node:
        """Return a node that may be changed in place: the node itself if dirty, else a fresh copy."""
        ...

    def new_id(self) -> int:
        """A fresh node id, never used before."""
        ...

    def adopt(self, node: Node) -> Node:
        """Register a new dirty node (built with an id from :meth:`new_id`) and return it."""
        ...

    def free(self, node_id: int) -> None:
        """Forget a node: drop it if dirty, delete it at commit if committed."""
        ...


@dataclass
class Root:
    """Where a tree starts: the root node id, the height (1 = the root is a leaf), and its totals."""

    node_id: int
    height: int
    summary: list[int]


def vadd(left: list[int], right: list[int]) -> list[int]:
    """Element-wise sum of two summaries (of equal length)."""
    return list(map(add, left, right))


def vsub(left: list[int], right: list[int]) -> list[int]:
    """Element-wise difference of two summaries (of equal length)."""
    return list(map(sub, left, right))


Path = list[tuple[Node, int]]


class Tree:
    """Operations on one tree (one aggregate namespace) inside one transaction.

    The tree works on a copy of the root record it is given; after writes, the caller persists
    ``root`` when :attr:`changed` says it differs.
    """

    __slots__ = ("access", "max_size", "min_size", "nfields", "original", "root")

    def __init__(self, access: NodeAccess, nfields: int, node_size: int, root: Root | None) -> None:
        self.access = access
        self.nfields = nfields
        self.max_size = node_size
        self.min_size = node_size // 2
        self.original = root
        self.root = Root(root.node_id, root.height, list(root.summary)) if root is not None else None

    @property
    def changed(self) -> bool:
        """Whether the root record differs from the one the tree started from."""
        return self.root != self.original

    # ----------------------------------------------------------------- reads

    @property
    def count(self) -> int:
        """Number of items in the tree. O(1)."""
        return self.root.summary[0] if self.root is not None else 0

    def zero(self) -> list[int]:
        """The summary of no items."""
        return [0] * (1 + 2 * self.nfields)

    def rank(self, bound: bytes, after: bool) -> int:
        """Number of entries ``< bound`` (``<= bound`` when ``after``). O(log n)."""
        if self.root is None:
            return 0
        access = self.access
        node = access.node(self.root.node_id)
        total = 0
        while not node.leaf:
            index = bisect_right(node.keys, bound) - 1
            total += node.counts()[index]
            node = access.node(node.kids[index])
        keys = node.keys
        return total + (bisect_right(keys, bound) if after else bisect_left(keys, bound))

    def prefix_summary(self, bound: bytes, after: bool) -> list[int]:
        """Summary of the entries ``< bound`` (``<= bound`` when ``after``). O(log n)."""
        totals = self.zero()
        if self.root is None:
            return totals
        access = self.access
        node = access.node(self.root.node_id)
        while not node.leaf:
            index = bisect_right(node.keys, bound) - 1
            totals = vadd(totals, node.prefixes(index))
            node = access.node(node.kids[index])
        keys = node.keys
        index = bisect_right(keys, bound) if after else bisect_left(keys, bound)
        return vadd(totals, node.prefixes(index))

    def summary_at(self, index: int) -> list[int]:
        """Summary of the first ``index`` entries (0 <= index <= count). O(log n)."""
        totals = self.zero()
        if self.root is None or index <= 0:
            return totals
        if index >= self.count:
            return list(self.root.summary)
        access = self.access
        node = access.node(self.root.node_id)
        while not node.leaf:
            counts = node.counts()
            child = bisect_right(counts, index) - 1
            totals = vadd(totals, node.prefixes(child))
            index -= counts[child]
            node = access.node(node.kids[child])
        return vadd(totals, node.prefixes(index))

    def select(self, index: int) -> tuple[bytes, tuple[Any, ...]]:
        """The entry at ``index`` (0 <= index < count) and its values. O(log n)."""
        assert self.root is not None and 0 <= index < self.count
        access = self.access
        node = access.node(self.root.node_id)
        while not node.leaf:
            counts = node.counts()
            child = bisect_right(counts, index) - 1
            index -= counts[child]
            node = access.node(node.kids[child])
        return node.keys[index], tuple(col[index] for col in node.cols)

    def find(self, entry: bytes) -> tuple[Any, ...] | None:
        """The values of ``entry``, or None if absent. O(log n)."""
        if self.root is None:
            return None
        _, leaf = self._path(entry)
        index = bisect_left(leaf.keys, entry)
        if index < len(leaf.keys) and leaf.keys[index] == entry:
            return tuple(col[index] for col in leaf.cols)
        return None

    def iterate(
        self, start: int, stop: int, reverse: bool = False
    ) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
        """Yield entries with index in ``[start, stop)``, lazily; O(log n) to start, O(1) amortized each."""
        remaining = stop - start
        if self.root is None or remaining <= 0:
            return
        access = self.access
        stack: Path = []
        node = access.node(self.root.node_id)
        index = stop - 1 if reverse else start
        while not node.leaf:
            counts = node.counts()
            child = bisect_right(counts, index) - 1
            index -= counts[child]
            stack.append((node, child))
            node = access.node(node.kids[child])
        step = -1 if reverse else 1
        while True:
            keys, cols = node.keys, node.cols
            while 0 <= index < len(keys):
                yield keys[index], tuple(col[index] for col in cols)
                remaining -= 1
                if remaining == 0:
                    return
                index += step
            while stack:  # climb to the next subtree, then descend to its first (last) leaf
                parent, child = stack.pop()
                child += step
                if 0 <= child < len(parent.kids):
                    stack.append((parent, child))
                    node = access.node(parent.kids[child])
                    while not node.leaf:
                        child = len(node.kids) - 1 if reverse else 0
                        stack.append((node, child))
                        node = access.node(node.kids[child])
                    index = len(node.keys) - 1 if reverse else 0
                    break
            else:
                return

    # ----------------------------------------------------------------- writes

    def insert(self, entry: bytes, values: tuple[Any, ...], delta: list[int] | None = None) -> bool:
        """Insert ``entry`` with ``values``; return False (changing nothing) if it exists. O(log n)."""
        if delta is None:
            delta = delta_of(values)
        if self.root is None:
            access = self.access
            cols = [[value] for value in values]
            leaf = access.adopt(Node(access.new_id(), True, [entry], cols, dirty=True))
            self.root = Root(leaf.id, 1, list(delta))
            return True
        path, leaf = self._path(entry)
        index = bisect_left(leaf.keys, entry)
        if index < len(leaf.keys) and leaf.keys[index] == entry:
            return False
        path, leaf = self._make_mutable(path, leaf)
        leaf.keys.insert(index, entry)
        for col, value in zip(leaf.cols, values, strict=True):
            col.insert(index, value)
        self._add_along(path, delta)
        if len(leaf.keys) > self.max_size:
            self._split_up(path, leaf)
        return True

    def insert_sorted_run(self, entries: list[bytes], values: list[tuple[Any, ...]]) -> int:
        """Insert many new entries given in ascending order; return how many were inserted.

        Entries already present are skipped. Consecutive entries that land in the same leaf are merged
        into it with one path update and one (multi-way) split, which is what makes time-ordered batches
        fast. O(m log n) worst case, O(m + (m / B) log n) when the run is clustered.
        """
        inserted = 0
        position = 0
        total = len(entries)
        while position < total:
            entry = entries[position]
            if self.root is None:
                self.insert(entry, values[position])
                inserted += 1
                position += 1
                continue
            path, leaf = self._path(entry)
            upper = self._upper_fence(path)
            stop = total if upper is None else bisect_left(entries, upper, position + 1, total)
            keys = leaf.keys
            appending = not keys or entries[position] > keys[-1]
            if appending:
                fresh = list(range(position, stop))
            else:
                fresh = [at for at in range(position, stop) if not _contains(keys, entries[at])]
            if not fresh:  # nothing new for this leaf: leave it untouched
                position = stop
                continue
            path, leaf = self._make_mutable(path, leaf)
            keys, cols = leaf.keys, leaf.cols
            rows = [values[at] for at in fresh]
            if appending:
                keys.extend(entries[position:stop])
                for field, col in enumerate(cols):
                    col.extend([row[field] for row in rows])
            else:
                for at in fresh:
                    index = bisect_left(keys, entries[at])
                    keys.insert(index, entries[at])
                    for col, value in zip(cols, values[at], strict=True):
                        col.insert(index, value)
            columns = [[row[field] for row in rows] for field in range(self.nfields)]
            self._add_along(path, summarize(len(rows), columns))
            inserted += len(rows)
            if len(keys) > self.max_size:
                self._split_up(path, leaf)
            position = stop
        return inserted

    def delete(self, entry: bytes) -> tuple[Any, ...] | None:
        """Remove ``entry``; return its values, or None (changing nothing) if absent. O(log n)."""
        if self.root is None:
            return None
        path, leaf = self._path(entry)
        index = bisect_left(leaf.keys, entry)
        if index >= len(leaf.keys) or leaf.keys[index] != entry:
            return None
        path, leaf = self._make_mutable(path, leaf)
        del leaf.keys[index]
        values = tuple(col.pop(index) for col in leaf.cols)
        self._add_along(path, _negate(delta_of(values)))
        self._rebalance_up(path, leaf)
        return values

    def update(self, entry: bytes, values: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Overwrite the values of an existing entry; return the old values (None if absent).

        Writes nothing when the values are unchanged (same type and value). O(log n).
        """
        if self.root is None:
            return None
        path, leaf = self._path(entry)
        index = bisect_left(leaf.keys, entry)
        if index >= len(leaf.keys) or leaf.keys[index] != entry:
            return None
        old = tuple(col[index] for col in leaf.cols)
        if same_values(old, values):
            return old
        path, leaf = self._make_mutable(path, leaf)
        for col, value in zip(leaf.cols, values, strict=True):
            col[index] = value
        self._add_along(path, vsub(delta_of(values), delta_of(old)))
        return old

    def delete_range(self, start: int, stop: int) -> list[int]:
        """Remove the entries with index in ``[start, stop)``; return their summary.

        Whole subtrees inside the range are dropped by id without reading their leaves.
        O(log n + nodes removed).
        """
        start, stop = max(start, 0), min(stop, self.count)
        if self.root is None or start >= stop:
            return self.zero()
        root = self.root
        if start == 0 and stop == root.summary[0]:
            removed = list(root.summary)
            self._free_subtree(root.node_id, root.height)
            self.root = None
            return removed
        node = self.access.mutable(self.access.node(root.node_id))
        root.node_id = node.id
        removed = self._remove_range(node, start, stop)
        root.summary = vsub(root.summary, removed)
        self._repair_after_range(start)
        return removed

    # ----------------------------------------------------------------- internals

    def _path(self, entry: bytes) -> tuple[Path, Node]:
        assert self.root is not None
        access = self.access
        path: Path = []
        node = access.node(self.root.node_id)
        while not node.leaf:
            index = bisect_right(node.keys, entry) - 1
            path.append((node, index))
            node = access.node(node.kids[index])
        return path, node

    @staticmethod
    def _upper_fence(path: Path) -> bytes | None:
        """The smallest fence above the leaf at the end of ``path`` (None: no upper limit)."""
        for node, index in reversed(path):
            if index + 1 < len(node.keys):
                return node.keys[index + 1]
        return None

    def _make_mutable(self, path: Path, leaf: Node) -> tuple[Path, Node]:
        assert self.root is not None
        access = self.access
        result: Path = []
        parent: Node | None = None
        parent_index = 0
        for node, index in [*path, (leaf, -1)]:
            changed = access.mutable(node)
            if parent is None:
                self.root.node_id = changed.id
            else:
                parent.kids[parent_index] = changed.id
            if index >= 0:
                result.append((changed, index))
            parent, parent_index = changed, index
        assert parent is not None
        return result, parent

    def _add_along(self, path: Path, delta: list[int]) -> None:
        assert self.root is not None
        for node, index in path:
            node.add(index, delta)
        self.root.summary = vadd(self.root.summary, delta)

    def _split_up(self, path: Path, node: Node) -> None:
        """Split an overfull node into as many pieces as needed, then its parent, up to the root."""
        assert self.root is not None
        access = self.access
        while len(node.keys) > self.max_size:
            size = len(node.keys)
            pieces = -(-size // self._fill_target())
            cuts = [size * piece // pieces for piece in range(pieces + 1)]
            chunks = [node.detach(begin) for begin in reversed(cuts[1:-1])]
            chunks.reverse()
            leaf = node.leaf
            siblings = [access.adopt(Node.from_chunk(access.new_id(), leaf, chunk)) for chunk in chunks]
            summaries = [sibling.summary() for sibling in siblings]
            if path:
                parent, index = path.pop()
                moved = self.zero()
                for summary in summaries:
                    moved = vadd(moved, summary)
                parent.add(index, _negate(moved))
                for offset, (sibling, summary) in enumerate(zip(siblings, summaries, strict=True), start=1):
                    parent.insert_child(index + offset, sibling.keys[0], sibling.id, summary)
                node = parent
            else:
                left = list(self.root.summary)
                for summary in summaries:
                    left = vsub(left, summary)
                keys = [b"", *(sibling.keys[0] for sibling in siblings)]
                kids = [node.id, *(sibling.id for sibling in siblings)]
                node = access.adopt(Node.internal_from(access.new_id(), keys, kids, [left, *summaries]))
                self.root.node_id = node.id
                self.root.height += 1

    def _fill_target(self) -> int:
        """How full to make the pieces of a split: about 80% of the node size.

        Leaves room for later inserts after a batch (a split into full pieces would make the next
        insert into each of them split again), while every piece keeps at least ``min_size``
        entries: with pieces of at most ``target`` entries, the smallest holds at least
        ``(2 * target + 1) / 3``, so ``target >= 1.5 * min_size`` is enough.
        """
        return min(self.max_size, max(self.max_size * 4 // 5, (3 * self.min_size) // 2 + 1))

    def _rebalance_up(self, path: Path, node: Node) -> None:
        while path and len(node.keys) < self.min_size:
            parent, index = path.pop()
            self._fix_child(parent, index)
            node = parent
        self._shrink_root()

    def _shrink_root(self) -> None:
        access = self.access
        while self.root is not None:
            node = access.node(self.root.node_id)
            if node.leaf:
                if not node.keys:
                    access.free(node.id)
                    self.root = None
                return
            if len(node.kids) != 1:
                return
            access.free(node.id)
            self.root.node_id = node.kids[0]
            self.root.height -= 1

    def _fix_child(self, parent: Node, index: int) -> bool:
        """Merge the underfull child ``index`` with a sibling, or borrow from it. Return True if done."""
        if len(parent.kids) < 2:
            return False
        access = self.access
        left_index, right_index = (index - 1, index) if index > 0 else (index, index + 1)
        left = access.mutable(access.node(parent.kids[left_index]))
        parent.kids[left_index] = left.id
        right = access.node(parent.kids[right_index])
        total = len(left.keys) + len(right.keys)
        if total <= self.max_size:  # merge right into left; right itself is only read
            left.attach(len(left.keys), Chunk(right.keys, right.kids, right.cols, right.shifts))
            parent.add(left_index, parent.child(right_index))
            parent.remove_child(right_index)
            access.free(right.id)
            return True
        right = access.mutable(right)
        parent.kids[right_index] = right.id
        target = total // 2
        if len(left.keys) < target:  # move the first entries of right to the end of left
            count = target - len(left.keys)
            moved = right.summary(0, count)
            left.attach(len(left.keys), right.detach(0, count))
            parent.add(left_index, moved)
            parent.add(right_index, _negate(moved))
        else:  # move the last entries of left to the front of right
            cut = target
            moved = left.summary(cut)
            right.attach(0, left.detach(cut))
            parent.add(left_index, _negate(moved))
            parent.add(right_index, moved)
        parent.keys[right_index] = right.keys[0]
        return True

    def _free_subtree(self, node_id: int, height: int) -> None:
        if height > 1:
            node = self.access.node(node_id)
            for kid in node.kids:
                self._free_subtree(kid, height - 1)
        self.access.free(node_id)

    def _remove_range(self, node: Node, start: int, stop: int, height: int | None = None) -> list[int]:
        """Remove entries ``[start, stop)`` below a mutable ``node``; return their summary."""
        assert self.root is not None
        if height is None:
            height = self.root.height
        if node.leaf:
            removed = node.summary(start, stop)
            node.detach(start, stop)
            return removed
        removed = self.zero()
        counts = node.counts()
        first = bisect_right(counts, start) - 1
        drop: list[int] = []
        for child in range(first, len(node.kids)):
            begin, end = counts[child], counts[child + 1]
            if begin >= stop:
                break
            low, high = max(start, begin) - begin, min(stop, end) - begin
            if low == 0 and high == end - begin:
                removed = vadd(removed, node.child(child))
                self._free_subtree(node.kids[child], height - 1)
                drop.append(child)
                continue
            kid = self.access.mutable(self.access.node(node.kids[child]))
            node.kids[child] = kid.id
            part = self._remove_range(kid, low, high, height - 1)
            node.add(child, _negate(part))
            removed = vadd(removed, part)
            if not kid.keys:
                self.access.free(kid.id)
                drop.append(child)
        fence = node.keys[0]
        for child in reversed(drop):
            node.remove_child(child)
        if node.keys and drop and drop[0] == 0:
            self._set_fence(node, fence, height)
        return removed

    def _set_fence(self, node: Node, fence: bytes, height: int) -> None:
        """Give a mutable node (of subtree height ``height``) and its leftmost spine a new fence.

        After its first child was dropped, a node keeps its own lower fence, and the child now first
        must start at that fence too, so every descent that reaches it finds a child to follow.
        """
        access = self.access
        while True:
            node.keys[0] = fence
            if height <= 2:  # the children are leaves, which store no fence
                return
            kid = access.mutable(access.node(node.kids[0]))
            node.kids[0] = kid.id
            node, height = kid, height - 1

    def _repair_after_range(self, start: int) -> None:
        """Fix underfull nodes along the paths to entries ``start - 1`` and ``start``."""
        changed = True
        while changed:
            changed = False
            self._shrink_root()
            for target in (start - 1, start):
                if self.root is not None and 0 <= target < self.count:
                    changed |= self._fix_path(target)

    def _fix_path(self, index: int) -> bool:
        assert self.root is not None
        access = self.access
        changed = False
        node = access.mutable(access.node(self.root.node_id))
        self.root.node_id = node.id
        while not node.leaf:
            while True:
                counts = node.counts()
                child = bisect_right(counts, index) - 1
                child = min(child, len(node.kids) - 1)
                kid = access.node(node.kids[child])
                if len(kid.keys) >= self.min_size or not self._fix_child(node, child):
                    break
                changed = True
            counts = node.counts()
            child = min(bisect_right(counts, index) - 1, len(node.kids) - 1)
            index -= counts[child]
            kid = access.mutable(access.node(node.kids[child]))
            node.kids[child] = kid.id
            node = kid
        return changed


def _contains(keys: list[bytes], entry: bytes) -> bool:
    index = bisect_left(keys, entry)
    return index < len(keys) and keys[index] == entry


def _negate(summary: list[int]) -> list[int]:
    return [-value for value in summary]


def same_values(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether two value tuples are equal in value and in type (1 and 1.0 differ)."""
    return all(type(a) is type(b) and a == b for a, b in zip(old, new, strict=True))
