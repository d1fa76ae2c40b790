"""passes/unionfind.py: the vectorised union-find under the channel analysis."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from otofx.passes.unionfind import PIN, UnionFind


def classes(uf: UnionFind, ids) -> set:
    """The partition of ``ids`` as a set of frozensets."""
    ids = np.asarray(ids, dtype=np.int64)
    roots = uf.find(ids)
    out: dict = {}
    for i, r in zip(ids.tolist(), roots.tolist()):
        out.setdefault(r, set()).add(i)
    return {frozenset(v) for v in out.values()}


class NaiveUF:
    """Reference: one id at a time, no tricks."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def partition(self, ids) -> set:
        out: dict = {}
        for i in ids:
            out.setdefault(self.find(i), set()).add(i)
        return {frozenset(v) for v in out.values()}


# ---------------------------------------------------------------------------------------------
# new / find
# ---------------------------------------------------------------------------------------------


def test_new_hands_out_consecutive_fresh_ids_after_pin():
    uf = UnionFind(capacity=4)
    a = uf.new(3)
    assert a.dtype == np.int64 and a.tolist() == [1, 2, 3]  # id 0 is PIN
    b = uf.new(0)
    assert b.size == 0 and uf.size == 4
    c = uf.new(5)  # grows past the capacity
    assert c.tolist() == [4, 5, 6, 7, 8] and uf.size == 9 and len(uf.parent) >= 9
    assert uf.find(np.arange(9)).tolist() == list(range(9)), "fresh ids are singletons"


def test_growth_keeps_existing_links():
    uf = UnionFind(capacity=2)
    a = uf.new(1)
    b = uf.new(1)
    uf.union(a, b)
    uf.new(100)
    assert uf.find(b)[0] == a[0]


def test_find_any_shape_and_path_compression():
    uf = UnionFind()
    ids = uf.new(6)
    # a chain 6 -> 5 -> ... -> 1
    for i in range(len(ids) - 1, 0, -1):
        uf.union(ids[i], ids[i - 1])
    grid = ids.reshape(2, 3)
    r = uf.find(grid)
    assert r.shape == (2, 3) and (r == ids[0]).all()
    assert (uf.parent[ids] == ids[0]).all(), "find compresses the paths it walked"
    assert uf.find(np.zeros(0, dtype=np.int64)).shape == (0,)
    assert uf.find([int(ids[3])]).tolist() == [ids[0]]


# ---------------------------------------------------------------------------------------------
# union
# ---------------------------------------------------------------------------------------------


def test_union_arrays_pairwise():
    uf = UnionFind()
    a, b = uf.new(4), uf.new(4)
    uf.union(a, b)
    assert classes(uf, np.concatenate([a, b])) == {frozenset((int(x), int(y))) for x, y in zip(a, b)}
    assert (uf.find(b) == a).all(), "the smaller id is the root"


def test_union_with_collisions_in_one_call():
    """Many pairs land on one root in the same round: all must end in one class."""
    uf = UnionFind()
    ids = uf.new(10)
    hub = ids[0]
    # every id linked to the hub, and also to its neighbour, in one call; some pairs repeat
    a = np.concatenate([ids[1:], ids[1:], ids[:-1]])
    b = np.concatenate([np.full(9, hub), np.full(9, hub), ids[1:]])
    uf.union(a, b)
    assert classes(uf, ids) == {frozenset(ids.tolist())}


def test_union_collisions_between_existing_classes():
    uf = UnionFind()
    ids = uf.new(8)
    uf.union(ids[[1, 3, 5, 7]], ids[[0, 2, 4, 6]])  # {0,1} {2,3} {4,5} {6,7}
    # link both members of different classes in one call, crossing and repeating
    uf.union(ids[[1, 0, 3, 5, 7, 6]], ids[[2, 3, 4, 6, 0, 1]])
    assert classes(uf, ids) == {frozenset(ids.tolist())}


def test_union_scalar_broadcasts():
    uf = UnionFind()
    ids = uf.new(5)
    uf.union(ids, ids[2])
    assert classes(uf, ids) == {frozenset(ids.tolist())}
    assert uf.find(ids[2])[()] == ids[0]


def test_union_2d_grid_ties_rows():
    """The conv rule's pattern: tie every column of a [g, k] grid to its first column."""
    uf = UnionFind()
    grid = uf.new(12).reshape(3, 4)
    uf.union(grid, grid[:, :1])
    assert classes(uf, grid.reshape(-1)) == {frozenset(r.tolist()) for r in grid}


def test_union_self_and_empty_are_noops():
    uf = UnionFind()
    ids = uf.new(3)
    before = uf.parent.copy()
    uf.union(ids, ids)
    uf.union(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert np.array_equal(uf.parent, before)


def test_union_all():
    uf = UnionFind()
    ids = uf.new(6)
    uf.union_all(ids[[4, 1, 5]])
    uf.union_all(ids[[2]])  # one id: nothing to do
    uf.union_all(np.zeros(0, dtype=np.int64))
    assert classes(uf, ids) == {frozenset(ids[[1, 4, 5]].tolist()), frozenset([int(ids[0])]),
                                frozenset([int(ids[2])]), frozenset([int(ids[3])])}
    uf.union_all(ids.reshape(2, 3))  # any shape
    assert classes(uf, ids) == {frozenset(ids.tolist())}


# ---------------------------------------------------------------------------------------------
# pin
# ---------------------------------------------------------------------------------------------


def test_pin_and_pinned():
    uf = UnionFind()
    ids = uf.new(6)
    uf.union(ids[1], ids[2])
    uf.pin(ids[[2, 4]])
    assert uf.pinned(ids).tolist() == [False, True, True, False, True, False]
    assert (uf.find(ids[[1, 2, 4]]) == PIN).all()
    uf.pin(np.zeros(0, dtype=np.int64))  # no-op
    assert uf.pinned(ids).sum() == 3


def test_pin_stays_root_whatever_the_order():
    uf = UnionFind()
    ids = uf.new(6)
    uf.pin(ids[5])
    # merge a big class into the pinned one, then more classes, from both sides
    uf.union(ids[[0, 1, 2]], ids[[1, 2, 5]])
    uf.union(ids[4], ids[3])
    uf.union(ids[3], ids[0])
    assert uf.find(PIN)[()] == PIN and uf.parent[PIN] == PIN
    assert uf.pinned(ids).all()


def test_union_with_pin_directly():
    uf = UnionFind()
    ids = uf.new(4)
    uf.union(PIN, ids[3])
    uf.union(ids[[0, 3]], ids[[1, 2]])
    assert uf.pinned(ids).tolist() == [False, False, True, True]  # pairs (0, 1) and (3, 2)
    assert uf.parent[PIN] == PIN


# ---------------------------------------------------------------------------------------------
# property: equal to a naive union-find
# ---------------------------------------------------------------------------------------------


@st.composite
def programs(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    ops = draw(st.lists(
        st.one_of(
            st.tuples(st.just("union"), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                                                 min_size=0, max_size=30)),
            st.tuples(st.just("union_all"), st.lists(st.integers(0, n - 1), max_size=8)),
            st.tuples(st.just("pin"), st.lists(st.integers(0, n - 1), max_size=3)),
        ),
        max_size=12))
    return n, ops


@settings(derandomize=True, max_examples=200, deadline=None)
@given(programs())
def test_matches_naive_union_find(program):
    n, ops = program
    uf = UnionFind(capacity=1)
    ids = uf.new(n)  # ids 1..n; 0 is PIN in both structures
    ref = NaiveUF(n + 1)
    for kind, arg in ops:
        if kind == "union":
            a = np.array([p[0] for p in arg], dtype=np.int64)
            b = np.array([p[1] for p in arg], dtype=np.int64)
            uf.union(ids[a], ids[b])  # all pairs in one vectorised call
            for x, y in arg:
                ref.union(x + 1, y + 1)
        elif kind == "union_all":
            uf.union_all(ids[np.array(arg, dtype=np.int64)])
            for x in arg[1:]:
                ref.union(x + 1, arg[0] + 1)
        else:
            uf.pin(ids[np.array(arg, dtype=np.int64)])
            for x in arg:
                ref.union(x + 1, 0)
    everything = list(range(n + 1))
    assert classes(uf, everything) == ref.partition(everything)
    # every root is the smallest id of its class; PIN is its own root
    roots = uf.find(np.arange(n + 1))
    for c in ref.partition(everything):
        assert {int(roots[i]) for i in c} == {min(c)}
    assert uf.parent[PIN] == PIN
    assert uf.pinned(ids).tolist() == [ref.find(i + 1) == 0 for i in range(n)]
