"""Triton kernels of the fused row step (the CUDA path); :mod:`kernels.reference` is their oracle.

* ``_dhspg_rows_kernel`` (one program per row): walks the row's segments over every tensor it
  spans, reduces ``||x||^2``, ``x.d``, ``||d||^2``, computes lambda, the coefficient and the
  projection decision, writes three per-row values and counts zero rows.
* ``_rule_kernel`` (one program per block of rows): the same decisions from given per-row sums
  (the sparsity controller reads the sums first, then the rule runs; sharded rows' summed sums).
* ``_stats_kernel``: the reductions alone (sharded rows: each process's partial sums, added up
  across processes before :func:`reference.dhspg_rows` decides and :func:`apply_rows` writes back).
* ``_apply_kernel`` (one program per block of ``APPLY_BLOCK`` elements of one tensor): looks up
  each element's rows through the per-axis position tables, gates the penalty on the zero-row count,
  and writes ``x * (S * (1 - a*C)) + (-a * d) * S`` back in place.

# NB: two launches, not one. Shared elements (conv2.weight[o, i] is in conv2's row o and conv1's
# row i) need the coefficients of *all* their rows, and the group-sparsity gate needs the count
# over all rows: both exist only after every row's reduction is done, and Triton has no grid-wide
# barrier. A single launch would race on shared elements or need atomics on floats, which are
# not deterministic (DDP ranks would drift apart).

Internals:
    * Tensors are reached through int64 tables of data pointers (one launch covers every tensor);
      the element type is a compile-time constant, so all row tensors must share one dtype, and
      they (and their directions) must be contiguous: :func:`supported` says whether a call fits.
    * Reductions and the update run in float32 (float64 for float64 tensors).
    * Nothing is copied from the host in a steady step: pointer tables, the hyper-parameters (unless
      they change), the redundant mask and the row-value buffer are cached on the layout, ``lr`` may be
      a device tensor, and a ``skip`` flag (found_inf) masks every store of the write-back. The step
      can be captured in a CUDA graph.
    * The zero-row count is an int32 ``atomic_add``: integer addition is order independent, so the
      result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from otofx.errors import OTOError

from .layout import APPLY_BLOCK, MAX_AXES, RowLayout, uniform
from .reference import DHSPGConfig

ROW_BLOCK = 256

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _row_sums(xtab, dtab, seg_ptr, segs, r, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``(||x||^2, x.d, ||d||^2)`` of row r over its segments (tensor, base, outer, outer stride, inner)."""
    s0 = tl.load(seg_ptr + r)
    s1 = tl.load(seg_ptr + r + 1)
    axx = tl.zeros([BLOCK], dtype=ACC)
    axd = tl.zeros([BLOCK], dtype=ACC)
    add = tl.zeros([BLOCK], dtype=ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for s in range(s0, s1):
        t = tl.load(segs + s * 5)
        base = tl.load(segs + s * 5 + 1)
        outer = tl.load(segs + s * 5 + 2)
        ostride = tl.load(segs + s * 5 + 3)
        inner = tl.load(segs + s * 5 + 4)
        xp = tl.load(xtab + t).to(tl.pointer_type(DT))
        dp = tl.load(dtab + t).to(tl.pointer_type(DT))
        n = outer * inner
        for i0 in range(0, n, BLOCK):
            i = i0 + lanes
            m = i < n
            off = base + (i // inner) * ostride + i % inner
            x = tl.load(xp + off, mask=m, other=0.0).to(ACC)
            d = tl.load(dp + off, mask=m, other=0.0).to(ACC)
            axx += x * x
            axd += x * d
            add += d * d
    return tl.sum(axx, 0), tl.sum(axd, 0), tl.sum(add, 0)


@triton.jit
def _lambda(xd, dd, norm, safe, lmbda, amplify, hat, WARM_UP: tl.constexpr):
    """OTO.md's adaptive lambda of each row (``lmbda`` during the warm-up), the reference's order."""
    lam = lmbda + tl.zeros_like(norm)
    if not WARM_UP:
        neg = xd < 0.0
        lb = -xd / safe
        ub = -dd * norm / tl.where(neg, xd, -1.0)
        ad = tl.minimum(tl.maximum(amplify * lb, lmbda), lmbda * hat)
        ad = tl.where(ad >= ub, (lb + ub) / 2, ad)
        lam = tl.where(neg, ad, lam)
    return lam


@triton.jit
def _dhspg_rows_kernel(xtab, dtab, seg_ptr, segs, redundant, out, count, hp,
                       WARM_UP: tl.constexpr, FIXED_ZERO: tl.constexpr,
                       DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lr = tl.load(hp)
    lmbda = tl.load(hp + 1)
    amplify = tl.load(hp + 2)
    hat = tl.load(hp + 3)
    eps = tl.load(hp + 4)
    xx, xd, dd = _row_sums(xtab, dtab, seg_ptr, segs, r, DT, ACC, BLOCK)
    norm = tl.sqrt(xx)
    zero = xx == 0.0
    safe = tl.where(zero, 1.0, norm)
    in_r = (tl.load(redundant + r) != 0) & (xx != 0.0)
    lam = _lambda(xd, dd, norm, safe, lmbda, amplify, hat, WARM_UP)
    coef = tl.where(in_r, lam / safe, 0.0)
    s_gated = 1.0 + tl.zeros_like(xx)
    if not WARM_UP:
        proj = in_r & ((xx - lr * xd) - (lr * lam) * norm < eps * xx)
        s_gated = tl.where(proj, 0.0, 1.0)
    s_always = 1.0 + tl.zeros_like(xx)
    if FIXED_ZERO:
        s_always = tl.where(zero, 0.0, 1.0)
    tl.store(out + r * 3, coef)
    tl.store(out + r * 3 + 1, s_gated)
    tl.store(out + r * 3 + 2, s_always)
    tl.atomic_add(count, zero.to(tl.int32))


@triton.jit
def _rule_kernel(stats, n, red, count, target, hp, lscale, eps_t, out,
                 HAS_SCALE: tl.constexpr, HAS_EPS: tl.constexpr, WARM_UP: tl.constexpr, FIXED_ZERO: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    """OTO.md step 3 from given per-row sums (``stats``: [3, n]), as :func:`reference.dhspg_rows`:
    ``out[0, r]`` the coefficient, ``out[1, r]`` the scale (0: the row is zeroed). ``count``: the zero
    rows (gates penalty and projection on ``target``); ``lscale``/``eps_t``: the sparsity controller's
    lambda factor and epsilon (0-d tensors, read when HAS_*)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < n
    xx = tl.load(stats + r, mask=m, other=0.0).to(ACC)
    xd = tl.load(stats + n + r, mask=m, other=0.0).to(ACC)
    dd = tl.load(stats + 2 * n + r, mask=m, other=0.0).to(ACC)
    lr = tl.load(hp)
    lmbda = tl.load(hp + 1)
    amplify = tl.load(hp + 2)
    hat = tl.load(hp + 3)
    eps = tl.load(hp + 4)
    if HAS_SCALE:
        lmbda = lmbda * tl.load(lscale).to(ACC)
    if HAS_EPS:
        eps = tl.load(eps_t).to(ACC)
    active = tl.load(count) < target
    norm = tl.sqrt(xx)
    zero = xx == 0.0
    safe = tl.where(zero, 1.0, norm)
    in_r = (tl.load(red + r, mask=m, other=0) != 0) & (xx != 0.0) & active
    lam = _lambda(xd, dd, norm, safe, lmbda, amplify, hat, WARM_UP)
    coef = tl.where(in_r, lam / safe, 0.0)
    drop = zero & FIXED_ZERO
    if not WARM_UP:
        drop = drop | (in_r & ((xx - lr * xd) - (lr * lam) * norm < eps * xx))
    tl.store(out + r, coef, mask=m)
    tl.store(out + n + r, tl.where(drop, 0.0, 1.0), mask=m)


RULE_BLOCK = 1024


@triton.jit
def _sqrt_ieee(x, F32: tl.constexpr):
    """``sqrt`` correctly rounded, as torch's (Triton's fp32 ``sqrt`` is the fast approximation)."""
    if F32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _div_ieee(a, b, F32: tl.constexpr):
    """``a / b`` correctly rounded, as torch's (Triton's fp32 ``/`` is the fast approximation)."""
    if F32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit(do_not_specialize=["n"])
def _key_kernel(xx, red, key, count, n, F32: tl.constexpr, BLOCK: tl.constexpr):
    """The sparsity controller's sort key: ``sqrt(xx)`` (IEEE) on live rows (redundant, non-zero),
    +inf on the others; ``count`` += the zero rows (int32 atomics: order independent)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < n
    x = tl.load(xx + r, mask=m, other=1.0)
    live = (tl.load(red + r, mask=m, other=0) != 0) & (x != 0.0)
    tl.store(key + r, tl.where(live, _sqrt_ieee(x, F32), float("inf")), mask=m)
    tl.atomic_add(count, tl.sum(((x == 0.0) & m).to(tl.int32), 0))


@triton.jit(do_not_specialize=["t_host", "n", "start", "budget", "target", "tol"])
def _decide_kernel(order, vals, xx, red, count, mask, peak, eps_out, clock, t_host, eps_val, eps_force, n,
                   start, budget, target, tol, CLOCK: tl.constexpr, ACC: tl.constexpr, F32: tl.constexpr,
                   BLOCK: tl.constexpr):
    """The controller's decisions over the rows in sorted order (position i holds row ``order[i]``):
    the mask (live rows among the first ``limit``), the feed-forward rate of every position (its max
    into ``peak``: float atomics, but max is order independent) and the step's epsilon. Every
    scalar follows :meth:`otofx.sparsity.SparsityControl.decide`'s torch ops and dtypes (float64
    schedule, int counts, ``ACC`` rates; IEEE division)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    z = tl.load(count).to(tl.int64)
    if CLOCK:
        t = tl.load(clock).to(tl.float64)
    else:
        t = t_host.to(tl.float64)
    frac = tl.minimum(tl.maximum((t - start + 1) / budget.to(tl.float64), 0.0), 1.0)
    sched = target.to(tl.float64) * frac
    overdue = tl.maximum(tl.ceil(sched - 1e-9).to(tl.int64) - z, 0)
    force = (overdue > tol) | ((overdue > 0) & (t + 1 >= (start + budget).to(tl.float64)))
    cap = tl.maximum(target - z, 0)
    limit = tl.where(force, overdue, cap)
    rows = tl.load(order + i, mask=m, other=0)
    live = (tl.load(red + rows, mask=m, other=0) != 0) & (tl.load(xx + rows, mask=m, other=0.0) != 0.0)
    tl.store(mask + rows, (live & (i < limit)).to(tl.int8), mask=m)
    j = (i + 1).to(ACC)
    due = start.to(ACC) + _div_ieee(budget.to(ACC) * (z.to(ACC) + j), tl.maximum(target, 1).to(ACC) + tl.zeros_like(j), F32)
    den = tl.maximum(due - t.to(ACC), 1.0)
    v = tl.load(vals + i, mask=m, other=0.0)
    ok = (j <= cap.to(ACC)) & (v == v) & (tl.abs(v) != float("inf")) & m
    rate = tl.where(ok, _div_ieee(v, den, F32), 0.0)
    tl.atomic_max(peak, tl.max(rate, 0))
    if tl.program_id(0) == 0:
        tl.store(eps_out, tl.where(force, tl.load(eps_force), tl.load(eps_val)))


@triton.jit
def _stats_kernel(xtab, dtab, seg_ptr, segs, out, n_rows, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The reductions of ``_dhspg_rows_kernel`` alone: ``out[0|1|2, r]`` = this process's ``||x||^2``,
    ``x.d``, ``||d||^2`` of row r (the decisions follow once every shard's sums are added)."""
    r = tl.program_id(0)
    xx, xd, dd = _row_sums(xtab, dtab, seg_ptr, segs, r, DT, ACC, BLOCK)
    tl.store(out + r, xx)
    tl.store(out + n_rows + r, xd)
    tl.store(out + 2 * n_rows + r, dd)


@triton.jit
def _apply_kernel(xtab, dtab, blocks, numels, axis_table, pos_row, rowvals, count, target, hp, skip,
                  DT: tl.constexpr, ACC: tl.constexpr, MAXD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    lr = tl.load(hp)
    skipped = tl.load(skip) != 0.0  # a skipped step (found_inf) loads and stores nothing
    t = tl.load(blocks + b * 2)
    start = tl.load(blocks + b * 2 + 1)
    numel = tl.where(skipped, 0, tl.load(numels + t))
    xp = tl.load(xtab + t).to(tl.pointer_type(DT))
    dp = tl.load(dtab + t).to(tl.pointer_type(DT))
    off = start + tl.arange(0, BLOCK).to(tl.int64)
    m = off < numel
    x = tl.load(xp + off, mask=m, other=0.0).to(ACC)
    d = tl.load(dp + off, mask=m, other=0.0).to(ACC)
    active = tl.load(count) < target
    c = tl.zeros([BLOCK], dtype=ACC)
    sg = 1.0 + tl.zeros([BLOCK], dtype=ACC)
    sa = 1.0 + tl.zeros([BLOCK], dtype=ACC)
    for j in tl.static_range(MAXD):
        inner = tl.load(axis_table + (t * MAXD + j) * 3)
        size = tl.load(axis_table + (t * MAXD + j) * 3 + 1)
        poff = tl.load(axis_table + (t * MAXD + j) * 3 + 2)
        if size > 0:
            pos = (off // inner) % size
            row = tl.load(pos_row + poff + pos, mask=m, other=0)
            c += tl.load(rowvals + row * 3, mask=m, other=0.0)
            sg = tl.minimum(sg, tl.load(rowvals + row * 3 + 1, mask=m, other=1.0))
            sa = tl.minimum(sa, tl.load(rowvals + row * 3 + 2, mask=m, other=1.0))
    c = tl.where(active, c, 0.0)
    s = tl.where(active, tl.minimum(sa, sg), sa)
    f = s * (1 - lr * c)
    y = x * f + ((-lr) * d) * s
    tl.store(xp + off, y.to(DT), mask=m)


def supported(xs, ds) -> str | None:
    """None when the Triton kernels can run on these tensors, else the reason they cannot."""
    if not xs:
        return "no tensors"
    dt = xs[0].dtype
    if dt not in _TL:
        return f"dtype {dt}"
    if uniform([*xs, *ds]):
        return None
    for x, d in zip(xs, ds):
        if x.dtype != dt or d.dtype != dt:
            return "row tensors of different dtypes"
        if x.device != xs[0].device or d.device != x.device:
            return "row tensors on different devices"
        if not (x.is_contiguous() and d.is_contiguous()):
            return "a non-contiguous row tensor"
    return None


def _acc(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _cached(layout: RowLayout, key, make):
    """``layout.cache[key]``, made once. # NB: what is cached here never changes between steps, so a
    step captured in a CUDA graph replays with the same tables (and no host-to-device copy is made)."""
    hit = layout.cache.get(key)
    if hit is None:
        hit = layout.cache[key] = make()
    return hit


_DATA_PTR = torch.Tensor.data_ptr


def _tables(layout: RowLayout, xs, ds):
    """Device tables of the data pointers (rebuilt only when a pointer changes)."""
    dev = xs[0].device
    px, pd = tuple(map(_DATA_PTR, xs)), tuple(map(_DATA_PTR, ds))
    hit = layout.cache.get("triton_ptrs")
    if hit is None or hit[0] != (px, pd):
        hit = ((px, pd), torch.tensor(px, dtype=torch.int64).to(dev), torch.tensor(pd, dtype=torch.int64).to(dev))
        layout.cache["triton_ptrs"] = hit
    return hit[1], hit[2]


def _rowvals(layout: RowLayout, acc):
    """Per-row (coef, gated scale, scale) with a sentinel row N = (0, 1, 1) for unowned positions
    (a buffer reused by every step: the kernels rewrite rows 0..N-1)."""
    def make():
        v = torch.empty((layout.n_rows + 1, 3), dtype=acc, device=layout.device)
        v[layout.n_rows] = torch.tensor([0.0, 1.0, 1.0], dtype=acc)
        return v
    return _cached(layout, ("triton_rowvals", acc), make)


def _hp(layout, acc, lr, *values):
    """``[lr, *values]`` on the device, from one tensor per (dtype, length) cached on ``layout``,
    rewritten in place when a value changes (a scheduler's new float lr each step costs a small copy,
    not a new tensor kept for good); a tensor lr is read on the device.

    # NB: scalars go through a tensor: Triton passes Python floats as float32, float64 steps need them exact
    # NB: in place, so a CUDA graph that captured a step replays with the values of the latest eager
    # call; the write is stream-ordered after every kernel already queued that reads the old values
    """
    if isinstance(lr, torch.Tensor):
        return torch.cat([lr.reshape(1).to(layout.device, acc), _slot(layout, acc, values)])
    return _slot(layout, acc, (lr, *values))


def _slot(layout: RowLayout, acc, values: tuple) -> torch.Tensor:
    """The cached device tensor of dtype ``acc`` holding ``values`` (see :func:`_hp`), one per length."""
    key = ("triton_hp", acc, len(values))
    hit = layout.cache.get(key)
    if hit is None:
        hit = layout.cache[key] = [values, torch.tensor(values, dtype=acc).to(layout.device)]
    elif hit[0] != values:
        if hit[1].is_cuda and torch.cuda.is_current_stream_capturing():
            raise OTOError(f"a hyper-parameter changed to {values} while a CUDA graph is being captured: "
                           "change it before the warm-up steps, or pass lr as a device tensor")
        hit[1].copy_(torch.tensor(values, dtype=acc), non_blocking=True)
        hit[0] = values
    return hit[1]


def _skip(layout, skip):
    if skip is not None:
        return skip
    return _cached(layout, "triton_noskip", lambda: torch.zeros((), dtype=torch.float32, device=layout.device))


def _apply(layout, xt, dt, dtype, rowvals, count, target: int, hp, skip):
    nb = layout.blocks.shape[0]
    if nb:
        _apply_kernel[(nb,)](xt, dt, layout.blocks, layout.numels, layout.axis_table, layout.pos_row_flat,
                             rowvals, count, target, hp, _skip(layout, skip), DT=_TL[dtype], ACC=_TL[_acc(dtype)],
                             MAXD=MAX_AXES, BLOCK=APPLY_BLOCK)


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A row mask as the kernels read it: contiguous, a bool mask viewed as bytes (no copy)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _redundant8(layout: RowLayout, redundant: torch.Tensor) -> torch.Tensor:
    """The redundant mask as int8, converted again only when the mask changed."""
    key = (redundant.data_ptr(), redundant._version)
    hit = layout.cache.get("triton_red8")
    if hit is None or hit[0] != key:
        hit = (key, redundant.to(torch.int8))
        layout.cache["triton_red8"] = hit
    return hit[1]


def dhspg_step(layout: RowLayout, xs, ds, redundant: torch.Tensor, cfg: DHSPGConfig, skip=None) -> torch.Tensor:
    """The fused DHSPG row step in two launches; returns the zero-row count before the step.

    ``skip``: a float32 0-dim flag on the device; non-zero: the write-back stores nothing.
    """
    dtype = xs[0].dtype
    acc = _acc(dtype)
    xt, dt = _tables(layout, xs, ds)
    rowvals = _rowvals(layout, acc)
    count = torch.zeros(1, dtype=torch.int32, device=layout.device)
    hp = _hp(layout, acc, cfg.lr, cfg.lmbda, cfg.lmbda_amplify, cfg.hat_lmbda_coeff, cfg.epsilon)
    if cfg.lmbda_scale is not None or cfg.epsilon_t is not None:
        hp = hp.clone()  # NB: _hp's tensor is cached (shared by later steps): never changed in place
    if cfg.lmbda_scale is not None:  # otofx.sparsity's control: device values, no host sync
        hp[1:2].mul_(cfg.lmbda_scale.to(acc))
    if cfg.epsilon_t is not None:
        hp[4:5].copy_(cfg.epsilon_t)
    if layout.n_rows:
        _dhspg_rows_kernel[(layout.n_rows,)](
            xt, dt, layout.seg_ptr, layout.segs, _redundant8(layout, redundant), rowvals, count, hp,
            WARM_UP=bool(cfg.warm_up), FIXED_ZERO=bool(cfg.fixed_zero), DT=_TL[dtype], ACC=_TL[acc], BLOCK=ROW_BLOCK)
    _apply(layout, xt, dt, dtype, rowvals, count, int(cfg.target_rows), hp, skip)
    return count[0]


def dhspg_rows(stats, redundant: torch.Tensor, cfg: DHSPGConfig, layout: RowLayout):
    """:func:`reference.dhspg_rows` in one launch (after the zero count): ``(coef, scale, zero count)``
    from per-row sums on the device. The ~40 vector ops of the reference are ~40 launches, which an
    eager CUDA step pays in host time, and a CUDA graph in kernel gaps. The hyper-parameters' device
    tensor is cached on ``layout`` (the rows' layout), as for the other kernels."""
    xx, xd, dd = stats.xx, stats.xd, stats.dd
    n, acc, dev = xx.numel(), xx.dtype, xx.device
    step = xx.element_size() * n
    if (xx.is_contiguous() and xd.dtype == dd.dtype == acc and xd.data_ptr() == xx.data_ptr() + step
            and dd.data_ptr() == xx.data_ptr() + 2 * step):
        sums = xx  # the rows of one [3, n] buffer (row_stats'): read in place, no stack
    else:
        sums = torch.stack([xx, xd, dd]).to(acc)
    count = (xx == 0).sum()
    out = torch.empty((2, n), dtype=acc, device=dev)
    hp = _hp(layout, acc, cfg.lr, cfg.lmbda, cfg.lmbda_amplify, cfg.hat_lmbda_coeff, cfg.epsilon)
    red = _bytes(redundant)
    if n:
        _rule_kernel[(triton.cdiv(n, RULE_BLOCK),)](
            sums, n, red, count, int(cfg.target_rows), hp,
            cfg.lmbda_scale if cfg.lmbda_scale is not None else hp, cfg.epsilon_t if cfg.epsilon_t is not None else hp,
            out, HAS_SCALE=cfg.lmbda_scale is not None, HAS_EPS=cfg.epsilon_t is not None,
            WARM_UP=bool(cfg.warm_up), FIXED_ZERO=bool(cfg.fixed_zero), ACC=_TL[acc], BLOCK=RULE_BLOCK)
    return out[0], out[1], count


CONTROL_BLOCK = 1024


def controller_rows(xx: torch.Tensor, redundant: torch.Tensor, t, start: int, budget: int, target: int, tol: int,
                    eps: torch.Tensor, eps_force: torch.Tensor):
    """The per-row part of the sparsity controller's step in two launches around the sort (about 25
    vector ops, each a launch, on the torch path): ``(mask, eps, peak, zero count)``.

    ``t``: the step (an int) or the device clock (a 0-d float64 tensor); ``eps``/``eps_force``: 0-d
    float64 tensors. ``peak`` is the largest feed-forward rate (a 0-d tensor of ``xx``'s dtype)."""
    from . import sort_rows

    n, dev = xx.numel(), xx.device
    xx = xx.contiguous()
    red = _bytes(redundant)
    count = torch.zeros((), dtype=torch.int32, device=dev)
    key = torch.empty_like(xx)
    grid = (triton.cdiv(n, CONTROL_BLOCK),)
    f32 = xx.dtype != torch.float64
    _key_kernel[grid](xx, red, key, count, n, F32=f32, BLOCK=CONTROL_BLOCK)
    vals, order = sort_rows(key)
    mask = torch.empty(n, dtype=torch.bool, device=dev)
    peak = torch.zeros((), dtype=xx.dtype, device=dev)
    eps_out = torch.empty((), dtype=torch.float64, device=dev)
    clock = isinstance(t, torch.Tensor)
    _decide_kernel[grid](order, vals, xx, red, count, mask.view(torch.int8), peak, eps_out, t if clock else eps,
                         0 if clock else int(t), eps, eps_force, n, int(start), int(budget), int(target), int(tol),
                         CLOCK=clock, ACC=_TL[xx.dtype], F32=f32, BLOCK=CONTROL_BLOCK)
    return mask, eps_out, peak, count


def scale_step(layout: RowLayout, xs, ds, lr, scale: torch.Tensor, skip=None) -> None:
    """``x <- (x - lr*d) * S`` (S: the minimum row scale of each element) in one launch (HESSO)."""
    apply_rows(layout, xs, ds, lr, None, scale, skip)


def row_stats(layout: RowLayout, xs, ds):
    """Per-row ``||x||^2``, ``x.d``, ``||d||^2`` over these tensors (one launch, one program per row)."""
    from .reference import RowStats

    dtype = xs[0].dtype
    acc = _acc(dtype)
    n = layout.n_rows
    out = torch.zeros((3, n), dtype=acc, device=layout.device)
    if n:
        xt, dt = _tables(layout, xs, ds)
        _stats_kernel[(n,)](xt, dt, layout.seg_ptr, layout.segs, out, n, DT=_TL[dtype], ACC=_TL[acc], BLOCK=ROW_BLOCK)
    return RowStats(out[0], out[1], out[2])


def apply_rows(layout: RowLayout, xs, ds, lr, coef, scale: torch.Tensor, skip=None) -> None:
    """The write-back ``x <- x * (S * (1 - lr*C)) + (-lr * d) * S`` of given per-row ``coef`` (None:
    zeros) and ``scale``, in one launch."""
    dtype = xs[0].dtype
    acc = _acc(dtype)
    xt, dt = _tables(layout, xs, ds)
    rowvals = _rowvals(layout, acc)
    if coef is None:
        rowvals[: layout.n_rows, 0] = 0
    else:
        rowvals[: layout.n_rows, 0] = coef.to(acc)
    rowvals[: layout.n_rows, 1] = 1
    rowvals[: layout.n_rows, 2] = scale.to(acc)
    count = torch.zeros(1, dtype=torch.int32, device=layout.device)
    _apply(layout, xt, dt, dtype, rowvals, count, 1, _hp(layout, acc, lr), skip)
