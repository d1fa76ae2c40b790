"""otofx.kernels: the Triton kernels (on the interpreter) equal the torch reference; layout checks.

Layouts are drawn by hypothesis: empty groups, single-row groups, rows spanning several tensors and
dims, and elements shared by rows of different groups (two dims of one tensor owned by rows).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otofx import kernels as K
from otofx.errors import OTOError
from otofx.kernels import cpu_rows, reference

from helpers import triton_interpreter_unusable

_no_triton = triton_interpreter_unusable() if os.environ.get("TRITON_INTERPRET") == "1" else None
needs_triton = pytest.mark.skipif(
    not K.triton_available() or _no_triton is not None, reason=_no_triton or "triton cannot be imported")
needs_cpu_kernel = pytest.mark.skipif(not K.cpu_available(), reason="the C kernel cannot be built (no C compiler)")


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


def _step_case(lay, dtype, warm_up, fixed_zero, eps, target, seed):
    """A layout, data with ~30% zero rows, and a config under which every DHSPG branch occurs."""
    shapes, groups = lay
    layout = K.build_layout(shapes, groups)
    xs, ds, red = _data(shapes, layout.n_rows, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    _zero_some_rows(layout, xs, torch.rand(layout.n_rows, generator=g) < 0.3)
    # a large lr and lambda so that projections and the adaptive-lambda branches all occur
    cfg = K.DHSPGConfig(lr=0.3, lmbda=0.5, lmbda_amplify=2.0, hat_lmbda_coeff=10.0, epsilon=eps,
                        target_rows=target, warm_up=warm_up, fixed_zero=fixed_zero)
    return layout, xs, ds, red, cfg, g


@needs_triton
@settings(max_examples=30)
@given(layouts(), st.sampled_from([torch.float64, torch.float32]), st.booleans(), st.booleans(),
       st.sampled_from([0.0, 0.5, 0.95]), st.integers(0, 10), st.integers(0, 2 ** 16))
def test_dhspg_step_triton_equals_reference(lay, dtype, warm_up, fixed_zero, eps, target, seed):
    layout, xs, ds, red, cfg, _ = _step_case(lay, dtype, warm_up, fixed_zero, eps, target, seed)
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


@needs_cpu_kernel
@settings(max_examples=40)
@given(layouts(), st.sampled_from([torch.float64, torch.float32]), st.booleans(), st.booleans(),
       st.sampled_from([0.0, 0.5, 0.95]), st.integers(0, 10), st.integers(0, 2 ** 16))
def test_dhspg_step_cpu_kernel_equals_reference(lay, dtype, warm_up, fixed_zero, eps, target, seed):
    layout, xs, ds, red, cfg, g = _step_case(lay, dtype, warm_up, fixed_zero, eps, target, seed)
    if cpu_rows.supported(layout, xs, ds) is not None:  # e.g. rows on dims 0 and 2: the dispatcher falls back
        assert K.choose_backend(xs, ds, None, layout) == "torch"
        return
    a = [x.clone() for x in xs]
    b = [x.clone() for x in xs]
    sa, sb = K.row_stats(layout, xs, ds), cpu_rows.row_stats(layout, xs, ds)
    for u, v in ((sa.xx, sb.xx), (sa.xd, sb.xd), (sa.dd, sb.dd)):
        _close([u], [v], dtype)
    ca = K.dhspg_step(layout, a, ds, red, cfg, backend="torch")
    cb = K.dhspg_step(layout, b, ds, red, cfg, backend="cpu")
    assert int(ca) == int(cb)
    _close(a, b, dtype)
    for u, v in zip(a, b):
        assert torch.equal(u == 0, v == 0)
    # with the same coefficients the write-back is the reference's expression (to an ulp: torch's CPU
    # kernels may fuse a multiply-add, the C kernel never does)
    coef = torch.rand(layout.n_rows, generator=g, dtype=dtype)
    scale = (torch.rand(layout.n_rows, generator=g) < 0.7).to(dtype)
    a = [x.clone() for x in xs]
    b = [x.clone() for x in xs]
    reference.apply_rows(layout, a, ds, 0.3, coef, scale)
    cpu_rows.apply_rows(layout, b, ds, 0.3, coef, scale)
    _close(a, b, dtype)
    for u, v in zip(a, b):
        assert torch.equal(u == 0, v == 0)


@needs_cpu_kernel
@settings(max_examples=30)
@given(layouts(), st.sampled_from([torch.float64, torch.float32]), st.sampled_from([0.0, 1e-2]),
       st.sampled_from(["nan", "inf", "-inf"]), st.integers(0, 2 ** 16))
def test_rows_step_checks_gradients_and_writes_nothing_on_a_bad_one(lay, dtype, wd, poison, seed):
    """rows_step with a momentum and check=True: the C kernel (check in its reduction pass, buffers
    stored in its write-back) equals the torch backend; one NaN/inf in any element of any gradient
    (also of a tensor no row reaches) leaves every x and buffer bitwise unchanged, flag 1."""
    layout, xs, ds, red, cfg, g = _step_case(lay, dtype, False, True, 0.5, 10, seed)
    grads = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype) for x in xs]
    if cpu_rows.supported(layout, xs, ds, grads) is not None:
        return
    mom = K.Momentum(tuple(grads), 0.9, 1.0, wd)
    seen = []

    def rule(stats):
        seen.append(stats.xx.clone())
        return K.dhspg_rows(stats, red, cfg)[:2]

    runs = {}
    for backend in ("torch", "cpu"):
        a, d = [x.clone() for x in xs], [x.clone() for x in ds]
        flag = K.rows_step(layout, a, d, cfg.lr, rule, backend=backend, momentum=mom, check=True)
        assert float(flag) == 0.0
        runs[backend] = (a, d)
    _close(runs["torch"][0], runs["cpu"][0], dtype)
    _close(runs["torch"][1], runs["cpu"][1], dtype)
    _close([seen[0]], [seen[1]], dtype)
    t = int(torch.randint(len(xs), (1,), generator=g))
    if xs[t].numel() == 0:
        return
    bad = [q.clone() for q in grads]
    bad[t].view(-1)[int(torch.randint(bad[t].numel(), (1,), generator=g))] = float(poison)
    a, d = [x.clone() for x in xs], [x.clone() for x in ds]
    flag = K.rows_step(layout, a, d, cfg.lr, rule, backend="cpu", momentum=K.Momentum(tuple(bad), 0.9, 1.0, wd),
                       check=True)
    assert float(flag) == 1.0
    for u, v in zip(a + d, xs + ds):
        assert torch.equal(u, v)
    _close([seen[-1]], [seen[0]], dtype)  # the rule still saw the rows' norms of x (the sparsity controller)


@needs_cpu_kernel
def test_rows_step_check_covers_the_last_work_unit():
    """A NaN in the last work unit of the last tensor (many units, rows on two axes) skips every tensor."""
    shapes = [(64, 48, 3, 3), (64,), (48, 40)]
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    groups = [(64, [(0, 0, ar(64)), (1, 0, ar(64))]), (48, [(0, 1, ar(48)), (2, 0, ar(48))])]
    layout = K.build_layout(shapes, groups)
    xs, ds, red = _data(shapes, layout.n_rows, torch.float32, 4)
    grads = [x * 0.5 for x in ds]
    grads[0][-1, -1, -1, -1] = float("nan")
    old = cpu_rows.CHUNK
    try:
        cpu_rows.CHUNK = 1000  # many units per tensor
        layout.cache.clear()
        a, d = [x.clone() for x in xs], [x.clone() for x in ds]
        flag = K.rows_step(layout, a, d, 0.1, lambda s: (torch.zeros_like(s.xx), torch.ones_like(s.xx)),
                           backend="cpu", momentum=K.Momentum(tuple(grads), 0.9, 1.0, 0.0), check=True)
    finally:
        cpu_rows.CHUNK = old
        layout.cache.clear()
    assert float(flag) == 1.0
    for u, v in zip(a + d, xs + ds):
        assert torch.equal(u, v)


@needs_cpu_kernel
def test_cpu_kernel_large_tensors_split_into_units():
    """Tensors larger than one work unit (partials over several units, 3x3 kernels, two row axes)."""
    shapes = [(64, 48, 3, 3), (64,), (10, 64 * 48)]
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    groups = [(64, [(0, 0, ar(64)), (1, 0, ar(64))]), (48, [(0, 1, ar(48))]),
              (32, [(2, 1, torch.arange(64 * 48).reshape(32, 96))])]
    layout = K.build_layout(shapes, groups)
    for dtype in (torch.float32, torch.float64):
        xs, ds, red = _data(shapes, layout.n_rows, dtype, 5)
        old = cpu_rows.CHUNK
        try:
            cpu_rows.CHUNK = 1000  # many units per tensor
            layout.cache.clear()
            got = cpu_rows.row_stats(layout, xs, ds)
        finally:
            cpu_rows.CHUNK = old
            layout.cache.clear()
        want = K.row_stats(layout, xs, ds)
        # float32 sums of ~3000 terms in another order: errors scale with the terms, not with x.d
        scale_of = (want.xx * want.dd).sqrt()
        for u, v in ((got.xx, want.xx), (got.xd, want.xd), (got.dd, want.dd)):
            err = (u - v).abs() / (scale_of + 1)
            assert float(err.max()) < (1e-12 if dtype == torch.float64 else 1e-6)
        scale = torch.rand(layout.n_rows, dtype=torch.float64)
        a, b = [x.clone() for x in xs], [x.clone() for x in xs]
        K.scale_step(layout, a, ds, 0.2, scale, backend="torch")
        K.scale_step(layout, b, ds, 0.2, scale, backend="cpu")
        _close(a, b, dtype)


@needs_cpu_kernel
def test_cpu_kernel_runs_on_torchs_openmp_team():
    """Where torch's threads are OpenMP's (Linux wheels), the kernel runs on that team, not on threads
    of its own that would share the cores with torch's spinning ones."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not os.path.exists("/proc/self/maps"):
        pytest.skip("torch does not run on OpenMP here, or there is no /proc")
    assert cpu_rows.thread_pool() == "openmp"


@needs_cpu_kernel
@pytest.mark.parametrize("pool", ["default", "pthreads"])
def test_cpu_kernel_does_not_depend_on_the_thread_count(pool):
    """Work units depend on the shapes alone and partials are added in unit order (DDP ranks agree),
    on torch's OpenMP team and on the kernel's own pthreads alike."""
    shapes = [(40, 30, 3, 3), (30, 500)]
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    groups = [(40, [(0, 0, ar(40))]), (30, [(0, 1, ar(30)), (1, 0, ar(30))]), (500, [(1, 1, ar(500))])]
    layout = K.build_layout(shapes, groups)
    xs, ds, red = _data(shapes, layout.n_rows, torch.float32, 9)
    cfg = K.DHSPGConfig(0.1, 0.2, 2.0, 10.0, 0.5, 100, False, True)
    old, outs = torch.get_num_threads(), []
    if pool == "pthreads":
        cpu_rows.library().otofx_set_team(None)
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            a, d = [x.clone() for x in xs], [x.clone() for x in ds]
            K.dhspg_step(layout, a, d, red, cfg, backend="cpu", momentum=K.Momentum(tuple(ds), 0.9, 1.0, 1e-2))
            outs.append(a + d)
    finally:
        torch.set_num_threads(old)
        if pool == "pthreads":
            cpu_rows.library().otofx_set_team(cpu_rows._openmp_team())
    for u, v in zip(*outs):
        assert torch.equal(u, v)


def test_cpu_kernel_without_compiler_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OTOFX_CACHE_DIR", str(tmp_path))
    saved = dict(cpu_rows._state)
    cpu_rows._state.clear()
    try:
        assert not K.cpu_available()
        layout = K.build_layout([(2,)], [(2, [(0, 0, torch.arange(2)[:, None])])])
        xs = [torch.ones(2)]
        assert K.choose_backend(xs, xs, None, layout) == "torch"
        with pytest.raises(OTOError, match="cannot be built"):
            K.choose_backend(xs, xs, "cpu", layout)
    finally:
        cpu_rows._state.clear()
        cpu_rows._state.update(saved)


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
    layout = K.build_layout([(2,)], [(2, [(0, 0, torch.arange(2)[:, None])])])
    assert K.choose_backend(xs, xs, "torch", layout) == "torch"
    assert K.choose_backend(xs, xs, None) == "torch"  # auto on CPU without a layout
    assert K.choose_backend(xs, xs, None, layout) == ("cpu" if K.cpu_available() else "torch")
    half = [torch.zeros(2, dtype=torch.float16)]
    assert K.choose_backend(half, half, None, layout) == "torch"  # the C kernel takes float32/float64
    with pytest.raises(OTOError, match="backend 'cpu' cannot run"):
        K.choose_backend(half, half, "cpu", layout)
    monkeypatch.setenv("OTOFX_KERNEL", "torch")
    assert K.choose_backend(xs, xs, None, layout) == "torch"
    monkeypatch.setenv("OTOFX_KERNEL", "nonsense")
    with pytest.raises(OTOError, match="unknown kernel backend"):
        K.choose_backend(xs, xs, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1e-30, 3.0e38, float("inf"), float("nan"), 2.0 ** -149]), max_size=300),
       st.sampled_from([torch.float32, torch.float64]))
def test_sort_rows_is_torchs_stable_sort(values, dtype):
    """The controller's sort (numpy's SIMD sort of value-and-index keys on CPU float32) orders as
    ``torch.sort(stable=True)``: ties in index order, inf above every finite value, NaN last."""
    key = torch.tensor(values, dtype=dtype)
    vals, order = K.sort_rows(key)
    want_vals, want_order = torch.sort(key, stable=True)
    assert torch.equal(order, want_order)
    assert torch.equal(vals.nan_to_num(), want_vals.nan_to_num()) and torch.equal(vals.isnan(), want_vals.isnan())
    want_rank = torch.empty_like(want_order)
    want_rank[want_order] = torch.arange(len(values))
    assert torch.equal(K.rank_rows(order), want_rank)
    assert torch.equal(K.rank_rows(order, torch.arange(len(values))), want_rank)


@needs_triton
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3000), st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.booleans(),
       st.integers(0, 3000), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2 ** 16))
def test_triton_rule_equals_reference(n, dtype, warm_up, fixed_zero, target, scaled, eps_t, lr_t, seed):
    """The Triton rule kernel (the decisions of a CUDA step between its reductions and its write-back)
    against the reference's vector ops: the same zero count and projections, coefficients to rounding."""
    from otofx.kernels import triton_rows

    g = torch.Generator().manual_seed(seed)
    xx = torch.rand(n, generator=g, dtype=dtype) * 4
    xx[torch.rand(n, generator=g) < 0.2] = 0.0
    xd = torch.randn(n, generator=g, dtype=dtype) * xx.sqrt()
    dd = torch.rand(n, generator=g, dtype=dtype) * 3
    stats = K.RowStats(*torch.stack([xx, xd, dd]).unbind(0))
    red = torch.rand(n, generator=g) < 0.6
    cfg = K.DHSPGConfig(lr=torch.tensor(0.3, dtype=torch.float64) if lr_t else 0.3, lmbda=0.5, lmbda_amplify=2.0,
                        hat_lmbda_coeff=10.0, epsilon=0.5, target_rows=target, warm_up=warm_up, fixed_zero=fixed_zero,
                        lmbda_scale=torch.tensor(1.7, dtype=torch.float64) if scaled else None,
                        epsilon_t=torch.tensor(0.9, dtype=torch.float64) if eps_t else None)
    want = reference.dhspg_rows(stats, red, cfg)
    layout = K.build_layout([(max(n, 1), 3)], [(n, [(0, 0, torch.arange(n)[:, None])])] if n else [])
    got = triton_rows.dhspg_rows(stats, red, cfg, layout)
    assert int(got[2]) == int(want[2])
    assert torch.equal(got[1], want[1])  # which rows are projected: exactly
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    torch.testing.assert_close(got[0], want[0], **tol)
    # from separate (non-adjacent) vectors too
    other = triton_rows.dhspg_rows(K.RowStats(xx.clone(), xd.clone(), dd.clone()), red, cfg, layout)
    assert all(torch.equal(a, b) for a, b in zip(other, got))


@needs_triton
def test_triton_step_with_a_lambda_scale_leaves_the_next_step_alone():
    """A controlled step's lambda factor and epsilon apply to that step only (the hyper-parameters'
    device tensor is cached across steps), as on the reference."""
    shapes = [(6, 5), (4, 6)]
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    layout = K.build_layout(shapes, [(6, [(0, 0, ar(6)), (1, 1, ar(6))])])
    xs, ds, red = _data(shapes, layout.n_rows, torch.float32, 3)
    plain = K.DHSPGConfig(0.1, 0.2, 2.0, 10.0, 0.5, 100, False, True)
    scaled = K.DHSPGConfig(0.1, 0.2, 2.0, 10.0, 0.5, 100, False, True, lmbda_scale=torch.tensor(3.0, dtype=torch.float64),
                           epsilon_t=torch.tensor(0.1, dtype=torch.float64))
    a, b = [x.clone() for x in xs], [x.clone() for x in xs]
    for cfg in (scaled, plain, plain):
        K.dhspg_step(layout, a, ds, red, cfg, backend="torch")
        K.dhspg_step(layout, b, ds, red, cfg, backend="triton")
    _close(a, b, torch.float32)


@needs_triton
def test_triton_hyper_parameters_follow_a_changing_lr_without_growing_the_cache():
    """A scheduler's new float lr every step: each step uses its own lr (as the reference does), and the
    layout keeps one device tensor of hyper-parameters per (dtype, length), not one per lr."""
    shapes = [(6, 5), (4, 6)]
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    layout = K.build_layout(shapes, [(6, [(0, 0, ar(6)), (1, 1, ar(6))])])
    xs, ds, red = _data(shapes, layout.n_rows, torch.float32, 4)
    scale = torch.ones(layout.n_rows, dtype=torch.float64)
    a, b = [x.clone() for x in xs], [x.clone() for x in xs]
    for i in range(12):
        lr = 0.1 / (1 + i)
        cfg = K.DHSPGConfig(lr, 0.2, 2.0, 10.0, 0.5, 100, False, True)
        K.dhspg_step(layout, a, ds, red, cfg, backend="torch")
        K.dhspg_step(layout, b, ds, red, cfg, backend="triton")
        K.scale_step(layout, a, ds, lr, scale, backend="torch")
        K.scale_step(layout, b, ds, lr, scale, backend="triton")
        K.scale_step(layout, a, ds, torch.tensor(lr / 2), scale, backend="torch")
        K.scale_step(layout, b, ds, torch.tensor(lr / 2), scale, backend="triton")
        _close(a, b, torch.float32)
    hp = [k for k in layout.cache if isinstance(k, tuple) and str(k[0]).startswith("triton_hp")]
    assert len(hp) <= 3, hp
