"""Vectorised union-find over integer ids.

Channel analysis creates one id per channel index and merges whole arrays of them at once
(``a[i] ~ b[i]`` for every ``i``), so the structure works on numpy arrays instead of single ids.

Internals:
    ``parent`` is a growable int64 array; id 0 is the reserved ``PIN`` class. Linking always makes
    the smaller root the parent, so ``PIN`` stays the root of its class and ``find(x) == PIN``
    tells that x is pinned. ``union`` links all pairs at once; pairs that collide on one root in
    the same round are linked in the next round, so a call ends after a few rounds at most.
"""
from __future__ import annotations

import numpy as np

PIN = 0


def unique(a, return_inverse: bool = False, return_counts: bool = False):
    """Sorted unique values of a 1-D int array, by sorting.

    # NB: numpy >= 2.3's ``np.unique`` takes a hash-table path that is 5-10x slower than a sort on
    # the id arrays seen here; this keeps analysis time linear and small.
    """
    a = np.asarray(a).ravel()
    order = np.argsort(a, kind="stable") if return_inverse else None
    s = a[order] if order is not None else np.sort(a)
    head = np.empty(len(s), dtype=bool)
    head[:1] = True
    np.not_equal(s[1:], s[:-1], out=head[1:])
    out = [s[head]]
    if return_inverse:
        inv = np.empty(len(a), dtype=np.int64)
        inv[order] = np.cumsum(head) - 1
        out.append(inv)
    if return_counts:
        starts = np.nonzero(head)[0]
        out.append(np.diff(np.append(starts, len(s))))
    return out[0] if len(out) == 1 else tuple(out)


class UnionFind:
    def __init__(self, capacity: int = 1024):
        self.parent = np.arange(max(capacity, 1), dtype=np.int64)
        self.size = 1  # id 0 is PIN

    def new(self, n: int) -> np.ndarray:
        """Fresh singleton ids ``[size, size + n)``."""
        start = self.size
        end = start + n
        if end > len(self.parent):
            cap = max(end, 2 * len(self.parent))
            grown = np.arange(cap, dtype=np.int64)
            grown[: len(self.parent)] = self.parent
            self.parent = grown
        self.size = end
        return np.arange(start, end, dtype=np.int64)

    def find(self, ids) -> np.ndarray:
        """Roots of ``ids`` (any shape), compressing the paths it walked."""
        ids = np.asarray(ids, dtype=np.int64)
        parent = self.parent
        r = parent[ids]
        p = parent[r]
        # NB: count_nonzero, not .all(): half the cost on the short arrays analysis passes here
        if not np.count_nonzero(p != r):  # the common case (paths already compressed): no write-back
            return r
        while True:
            r = p
            p = parent[r]
            if not np.count_nonzero(p != r):
                break
        parent[ids] = r
        return r

    def union(self, a, b) -> None:
        """Merge ``a[i]`` with ``b[i]`` for every i (a scalar side broadcasts)."""
        if a is b:
            return
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        a = a.ravel()
        b = b.ravel()
        while a.size:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not np.count_nonzero(diff):
                return
            lo = np.minimum(ra[diff], rb[diff])
            hi = np.maximum(ra[diff], rb[diff])
            self.parent[hi] = lo
            a, b = lo, hi

    def union_all(self, ids) -> None:
        """Merge every id in ``ids`` into one class."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size > 1:
            self.union(ids[1:], ids[0])

    def pin(self, ids) -> None:
        """Merge ``ids`` into the PIN class."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size:
            self.union(ids, PIN)

    def pinned(self, ids) -> np.ndarray:
        return self.find(ids) == PIN
