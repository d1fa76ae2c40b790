"""otofx.kernels: the Triton kernels (on the interpreter) equal the torch reference; layout checks.

Layouts are drawn by hypothesis: empty groups, single-row groups, rows spanning several tensors and
dims, and elements shared by rows of different groups (two dims of one tensor owned by rows).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otofx import kernels as K
from otofx.errors import OTOError

needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton cannot be imported")


@st.composite
def layouts(draw):
    """(shapes, groups) with disjoint (tensor, dim, position) ownership."""
    n_t = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))) for _ in range(n_t)]
    n_g = draw(st.integers(1, 3))
    rows = [draw(st.integers(0, 3)) for _ in range(n_g)]
    entries = [[] for _ in range(n_g)]
    for t, shape in enumerate(shapes):
        for dim, size in enumerate(shape):
            g = draw(st.integers(-1, n_g - 1))  # -1: no row owns this axis
            if g < 0 or rows[g] == 0 or rows[g] > size:
                continue
            k = draw(st.integers(1, size // rows[g]))
            perm = draw(st.permutations(range(size)))
            entries[g].append((t, dim, torch.tensor(perm[: rows[g] * k]).reshape(rows[g], k)))
    groups = [(r if e else 0, e if e else []) for r, e in zip(rows, entries)]
    return shapes, groups


def _data(shapes, n_rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    ds = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    red = torch.rand(n_rows, generator=g) < 0.6
    return xs, ds, red


def _zero_some_rows(layout, xs, which):
    """Zero the elements of the chosen rows (through the axes), so fixed-zero rows exist."""
    for ax in layout.axes:
        hit = which[ax.row]
        if bool(hit.any()):
            xs[ax.tensor].index_fill_(ax.dim, ax.pos[hit], 0)


def _close(a, b, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


@needs_triton
@settings(max_examples=30)
@given(layouts(), st.sampled_from([torch.float64, torch.float32]), st.booleans(), st.booleans(),
       st.sampled_from([0.0, 0.5, 0.95]), st.integers(0, 10), st.integers(0, 2 ** 16))
def test_dhspg_step_triton_equals_reference(lay, dtype, warm_up, fixed_zero, eps, target, seed):
    shapes, groups = lay
    layout = K.build_layout(shapes, groups)
    xs, ds, red = _data(shapes, layout.n_rows, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    _zero_some_rows(layout, xs, torch.rand(layout.n_rows, generator=g) < 0.3)
    # a large lr and lambda so that projections and the adaptive-lambda branches all occur
    cfg = K.DHSPGConfig(lr=0.3, lmbda=0.5, lmbda_amplify=2.0, hat_lmbda_coeff=10.0, epsilon=eps,
                        target_rows=target, warm_up=warm_up, fixed_zero=fixed_zero)
    a = [x.clone() for x in xs]
    b = [x.clone() for x in xs]
    ca = K.dhspg_step(layout, a, ds, red, cfg, backend="torch")
    cb = K.dhspg_step(layout, b, ds, red, cfg, backend="triton")
    assert int(ca) == int(cb)
    _close(a, b, dtype)
    # the zero pattern (projections) must agree exactly, not just to a tolerance
    for u, v in zip(a, b):
        assert torch.equal(u == 0, v == 0)


@needs_triton
@settings(max_examples=20)
@given(layouts(), st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2 ** 16))
def test_scale_step_triton_equals_reference(lay, dtype, seed):
    shapes, groups = lay
    layout = K.build_layout(shapes, groups)
    xs, ds, _ = _data(shapes, layout.n_rows, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(layout.n_rows, generator=g, dtype=torch.float64)
    scale[torch.rand(layout.n_rows, generator=g) < 0.3] = 0
    scale[torch.rand(layout.n_rows, generator=g) < 0.3] = 1
    a = [x.clone() for x in xs]
    b = [x.clone() for x in xs]
    K.scale_step(layout, a, ds, 0.2, scale, backend="torch")
    K.scale_step(layout, b, ds, 0.2, scale, backend="triton")
    _close(a, b, dtype)


@settings(max_examples=30)
@given(layouts(), st.integers(0, 2 ** 16))
def test_row_stats_equal_per_row_sums(lay, seed):
    """Reductions equal sums over each row's slices gathered one by one (rows span tensors and dims)."""
    shapes, groups = lay
    layout = K.build_layout(shapes, groups)
    xs, ds, _ = _data(shapes, layout.n_rows, torch.float64, seed)
    got = K.row_stats(layout, xs, ds)
    r0 = 0
    for rows, entries in groups:
        for i in range(rows):
            x = torch.cat([xs[t].movedim(dim, 0)[idx[i]].reshape(-1) for t, dim, idx in entries])
            d = torch.cat([ds[t].movedim(dim, 0)[idx[i]].reshape(-1) for t, dim, idx in entries])
            torch.testing.assert_close(got.xx[r0 + i], x.dot(x))
            torch.testing.assert_close(got.xd[r0 + i], x.dot(d))
            torch.testing.assert_close(got.dd[r0 + i], d.dot(d))
            assert layout.row_len[r0 + i] == x.numel()
        r0 += rows
    assert r0 == layout.n_rows


@needs_triton
def test_triton_float16_matches_reference():
    shapes = [(6, 5), (6,)]
    groups = [(6, [(0, 0, torch.arange(6)[:, None]), (1, 0, torch.arange(6)[:, None])]),
              (5, [(0, 1, torch.arange(5)[:, None])])]
    layout = K.build_layout(shapes, groups)
    xs, ds, red = _data(shapes, layout.n_rows, torch.float16, 3)
    cfg = K.DHSPGConfig(0.1, 0.2, 2.0, 10.0, 0.0, 5, False, True)
    a, b = [x.clone() for x in xs], [x.clone() for x in xs]
    K.dhspg_step(layout, a, ds, red, cfg, backend="torch")
    K.dhspg_step(layout, b, ds, red, cfg, backend="triton")
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-3)


def test_layout_rejects_overlapping_rows():
    with pytest.raises(K.LayoutError, match="owned by two rows"):
        K.build_layout([(4, 2)], [(2, [(0, 0, torch.tensor([[0], [1]]))]), (1, [(0, 0, torch.tensor([[1]]))])])
    with pytest.raises(K.LayoutError, match="out of range"):
        K.build_layout([(4, 2)], [(1, [(0, 1, torch.tensor([[2]]))])])


def test_backend_override(monkeypatch):
    xs = [torch.zeros(2)]
    assert K.choose_backend(xs, xs, "torch") == "torch"
    assert K.choose_backend(xs, xs, None) == "torch"  # auto on CPU
    monkeypatch.setenv("OTOFX_KERNEL", "nonsense")
    with pytest.raises(OTOError, match="unknown kernel backend"):
        K.choose_backend(xs, xs, None)
