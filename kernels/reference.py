"""The torch reference of the fused row step: the CPU path and the test oracle of the Triton kernels.

Three pieces, each a few vectorised torch ops per tensor (a loop over tensors, none over rows):

* :func:`row_stats` -- per-row ``||x||^2``, ``x.d``, ``||d||^2`` (segment reductions: each tensor is
  reduced to its row axes, then ``index_add`` folds positions into rows);
* :func:`dhspg_rows` -- OTO.md section 2 step 3 on those reductions: lambda, the group-lasso
  coefficient ``lambda / ||x||`` and the half-space projection decision, gated by the group sparsity;
* :func:`apply_rows` -- the write-back ``x <- S * (x * (1 - a*C)) - a * S * d`` with ``C`` the sum of
  the coefficients and ``S`` the minimum of the scales of an element's rows (broadcasts of small
  per-position vectors).

Internals:
    * Reductions accumulate in float32 (float64 when a tensor is float64); float16/bfloat16 tensors
      are updated in float32 and written back once.
    * A step under a device-side ``skip`` flag (a non-finite gradient, GradScaler's found_inf) writes
      ``torch.where(keep, new, x)``: slower, but no host synchronisation and NaN never leaks.
    * Shared elements follow the Jacobi rule (see ``otofx.optim``): every per-row quantity comes from
      x and d before the step, so the result does not depend on any order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import RowLayout


@dataclass(frozen=True)
class RowStats:
    """Per-row reductions of x and d before the step."""

    xx: torch.Tensor
    xd: torch.Tensor
    dd: torch.Tensor


@dataclass(frozen=True)
class DHSPGConfig:
    """The scalars of one DHSPG row step (OTO.md section 2)."""

    lr: float
    lmbda: float
    lmbda_amplify: float
    hat_lmbda_coeff: float
    epsilon: float
    target_rows: int  # penalty and projection act while fewer rows than this are zero
    warm_up: bool  # penalty with lambda = lmbda, no projection
    fixed_zero: bool  # zero rows stay zero
    # otofx.sparsity's control, as 0-d device tensors (no host sync): a factor on lmbda, and an
    # epsilon that replaces ``epsilon`` (None: not used)
    lmbda_scale: "torch.Tensor | None" = None
    epsilon_t: "torch.Tensor | None" = None


@dataclass(frozen=True)
class Momentum:
    """The row tensors' SGD momentum update, left to the fused step: ``ds`` are the momentum buffers
    and are updated in place first, ``d <- d * b1 + alpha * (g + wd * x)`` (torch.optim.SGD's order),
    then the step uses them as the directions. ``grads`` are in the layout's tensor order."""

    grads: tuple
    b1: float
    alpha: float  # 1 - dampening
    wd: float


def momentum_update(xs, ds, m: Momentum, skip: torch.Tensor | None = None) -> None:
    """:class:`Momentum`'s update in torch's fused SGD kernel (the torch and Triton backends do it first).

    ``skip``: a float32 0-dim flag on the tensors' device; when it is non-zero nothing changes (read
    on the device: no synchronisation). One ``_fused_sgd_`` call per (device, dtype), ``lr=0``: the
    parameters are only read (for the weight decay).
    """
    by_key: dict = {}
    for x, d, g in zip(xs, ds, m.grads):
        by_key.setdefault((x.device, x.dtype), []).append((x, d, g))
    for items in by_key.values():
        torch._fused_sgd_([x for x, _, _ in items], [g for _, _, g in items], [d for _, d, _ in items],
                          weight_decay=float(m.wd), momentum=float(m.b1), lr=0.0, dampening=1.0 - float(m.alpha),
                          nesterov=False, maximize=False, is_first_step=False, grad_scale=None, found_inf=skip)


def acc_dtype(xs) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _workspace(layout: RowLayout, key: str, like: torch.Tensor, shape) -> torch.Tensor:
    """A reusable contiguous buffer of ``shape`` (at most the largest row tensor), cached on the layout.

    # NB: a fresh temporary the size of a weight costs page faults on every step (large allocations
    # are mmap'ed and returned on free); the reference reuses a few buffers instead.
    """
    n = 1
    for s in shape:
        n *= s
    k = (key, like.dtype, like.device)
    buf = layout.cache.get(k)
    if buf is None or buf.numel() < n:
        most = max((sh.numel() for sh, ids in zip(layout.shapes, layout.tensor_axes) if ids), default=0)
        buf = torch.empty(max(n, most), dtype=like.dtype, device=like.device)
        layout.cache[k] = buf
    return buf[:n].view(shape)


def _as(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t if t.dtype == acc else t.to(acc)


def _sums(w: torch.Tensor, v: tuple) -> list:
    """For a contiguous ``w`` of canonical view ``v``: per row axis, the sum over every other dim.

    # NB: only reductions torch runs at memory speed on CPU: over a contiguous inner run (``sum(1)``)
    # or over the outermost dim (``sum(0)``); a reduction over a short inner dim (a 3x3 kernel) is
    # done after the outer one, on the smaller partial.
    """
    nj = (len(v) - 1) // 2
    if nj == 1:
        a, n, c = v
        if a == 1:
            return [w.view(n, c).sum(1)]
        if c == 1:
            return [w.view(a, n).sum(0)]
        return [w.view(a, n, c).sum((0, 2))]
    if nj == 2 and v[0] == 1 and v[2] == 1:
        _, n1, _, n2, c = v
        m = w.view(n1, n2 * c)
        cols = m.sum(0)
        return [m.sum(1), cols.view(n2, c).sum(1) if c > 1 else cols]
    q = w.view(v).sum(tuple(range(0, len(v), 2)))  # the row dims only: [S1, ..., SJ]
    return [q.sum([i for i in range(nj) if i != j]) for j in range(nj)]


def _product_sums(layout: RowLayout, a: torch.Tensor, b: torch.Tensor, v: tuple) -> list:
    w = _workspace(layout, "prod", a, a.shape)
    torch.mul(a, b, out=w)
    return _sums(w, v)


def row_stats(layout: RowLayout, xs, ds=None) -> RowStats:
    """Per-row reductions; with ``ds`` None only ``xx`` is computed (``xd``, ``dd`` are zeros).

    Each tensor is reduced to per-position sums along each of its row axes (one vector per axis, in
    ``pos_row_flat`` order); one ``index_add_`` then folds positions into rows.
    """
    acc = acc_dtype(xs)
    n = layout.n_rows
    width = 1 if ds is None else 3
    parts = []
    for t, ids in enumerate(layout.tensor_axes):
        if not ids:
            continue
        v = layout.views[t]
        x = _as(xs[t], acc)
        d = None if ds is None else _as(ds[t], acc)
        if len(ids) == 1 and v[0] == 1 and x.is_contiguous() and (d is None or d.is_contiguous()):
            # rows along the leading dim: norms of contiguous slabs, no product needed for the squares
            xm = x.view(v[1], v[2])
            cols = [torch.linalg.vector_norm(xm, dim=1).square()]
            if d is not None:
                dm = d.view(v[1], v[2])
                cols += [_product_sums(layout, xm, dm, (1, v[1], v[2]))[0], torch.linalg.vector_norm(dm, dim=1).square()]
            parts.append(torch.stack(cols))
            continue
        sums = [_product_sums(layout, x, x, v)]
        if d is not None:
            sums += [_product_sums(layout, x, d, v), _product_sums(layout, d, d, v)]
        parts += [torch.stack([q[j] for q in sums]) for j in range(len(ids))]
    out = torch.zeros((width, n + 1), dtype=acc, device=layout.device)
    if parts:
        out.index_add_(1, layout.pos_row_flat, torch.cat(parts, 1))
    if ds is None:
        z = torch.zeros(n, dtype=acc, device=layout.device)
        return RowStats(out[0, :n], z, z)
    return RowStats(out[0, :n], out[1, :n], out[2, :n])


def dhspg_rows(stats: RowStats, redundant: torch.Tensor, cfg: DHSPGConfig):
    """OTO.md step 3 per row: ``(coef, scale, zero_count)``; coef = lambda/||x||, scale 0 = zeroed."""
    xx, xd, dd = stats.xx, stats.xd, stats.dd
    norm = xx.sqrt()
    zero = xx == 0
    zero_count = zero.sum()
    active = zero_count < cfg.target_rows
    safe = torch.where(zero, torch.ones_like(norm), norm)
    in_r = redundant & ~zero & active
    lmbda = cfg.lmbda if cfg.lmbda_scale is None else cfg.lmbda * cfg.lmbda_scale.to(xx.dtype)
    lam = torch.full_like(xx, cfg.lmbda) if cfg.lmbda_scale is None else lmbda.expand_as(xx)
    if not cfg.warm_up:
        neg = xd < 0
        lb = -xd / safe
        ub = -dd * norm / torch.where(neg, xd, -torch.ones_like(xd))
        ad = (cfg.lmbda_amplify * lb).clamp(lmbda, lmbda * cfg.hat_lmbda_coeff)
        ad = torch.where(ad >= ub, (lb + ub) / 2, ad)
        lam = torch.where(neg, ad, lam)
    coef = torch.where(in_r, lam / safe, torch.zeros_like(xx))
    if cfg.warm_up:
        proj = torch.zeros_like(zero)
    else:
        eps = cfg.epsilon if cfg.epsilon_t is None else cfg.epsilon_t.to(xx.dtype)
        proj = in_r & ((xx - cfg.lr * xd) - (cfg.lr * lam) * norm < eps * xx)
    drop = proj | (zero & cfg.fixed_zero)
    scale = torch.where(drop, torch.zeros_like(xx), torch.ones_like(xx))
    return coef, scale, zero_count


def position_values(layout: RowLayout, coef: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[2, P]``: the coefficient and scale of the row of every position in ``pos_row_flat`` order
    (0 and 1 where no row owns the position)."""
    n = layout.n_rows
    cs = torch.empty((2, n + 1), dtype=coef.dtype, device=layout.device)
    cs[0, :n] = coef
    cs[1, :n] = scale
    cs[0, n] = 0
    cs[1, n] = 1
    return cs[:, layout.pos_row_flat]


def _write(x: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    """``x <- new`` where ``keep`` (a 0-dim bool on x's device), else unchanged: no synchronisation."""
    if keep is None:
        x.copy_(new)
    elif new.dtype == x.dtype:
        torch.where(keep, new, x, out=x)
    else:
        x.copy_(torch.where(keep, new, x.to(new.dtype)))


def apply_rows(layout: RowLayout, xs, ds, lr, coef: torch.Tensor, scale: torch.Tensor,
               skip: torch.Tensor | None = None) -> None:
    """In place: ``x <- x * (S * (1 - lr*C)) + (-lr * d) * S`` per element (C: sum, S: min over its rows).

    ``lr``: a float or a 0-dim tensor on the layout's device. ``skip``: None, or a 0-dim flag on the
    device; when it is non-zero no tensor changes (decided on the device, d may hold NaN then).
    """
    acc = coef.dtype
    keep = None if skip is None else skip == 0
    tensor_lr = isinstance(lr, torch.Tensor)
    pv = position_values(layout, coef, scale)
    plain_x, plain_d = [], []
    for t, ids in enumerate(layout.tensor_axes):
        x, d = xs[t], ds[t]
        if not ids:  # a tensor no row reaches: the plain step
            plain_x.append(x)
            plain_d.append(d)
            continue
        xa, da = _as(x, acc), _as(d, acc)
        v = layout.views[t]
        canon = xa.is_contiguous() and da.is_contiguous()
        nd = len(v) if canon else x.dim()
        vecs = []
        for j, a in enumerate(ids):
            off, size = layout.pos_offsets[a], layout.shapes[t][layout.axes[a].dim]
            shape = [1] * nd
            shape[2 * j + 1 if canon else layout.axes[a].dim] = size
            vecs.append((pv[0, off:off + size].view(shape), pv[1, off:off + size].view(shape)))
        if len(ids) == 2 and canon and v[0] == 1 and v[2] == 1:
            # the common shared-element case (a weight's output and input channels): both factors are
            # [S1, S2] matrices, built in reused buffers (as large as the weight for a 1x1 conv)
            (c1, s1), (c2, s2) = vecs
            fshape = [1, v[1], 1, v[3], 1]
            f = _workspace(layout, "f", xa, fshape)
            sb = _workspace(layout, "s", xa, fshape)
            torch.add(c1, c2, out=f)
            f.mul_(-lr).add_(1)
            torch.minimum(s1, s2, out=sb)
            f.mul_(sb)
        else:
            cb, sb = vecs[0]
            for c, s in vecs[1:]:
                cb = cb + c
                sb = torch.minimum(sb, s)
            f = sb * (1 - lr * cb)
        xv, dv = (xa.view(v), da.view(v)) if canon else (xa, da)
        if keep is None and not tensor_lr:
            xv.mul_(f).addcmul_(dv, sb, value=-lr)
            if xa is not x:
                x.copy_(xa)
        else:
            # NB: into a reused buffer (a fresh weight-sized temporary costs page faults every step)
            new = _workspace(layout, "new", xv, xv.shape)
            torch.mul(xv, f, out=new)
            if tensor_lr:
                new.add_((dv * (-lr)) * sb)
            else:
                new.addcmul_(dv, sb, value=-lr)
            _write(x, new.view(x.shape), keep)
    if plain_x:
        plain_update(plain_x, plain_d, lr, keep)


def plain_update(xs, ds, lr, keep: torch.Tensor | None = None) -> None:
    """``x <- x - lr * d`` (one foreach call), or per tensor under a device-side ``keep`` flag."""
    if keep is None and not isinstance(lr, torch.Tensor):
        torch._foreach_add_(list(xs), list(ds), alpha=-lr)
        return
    for x, d in zip(xs, ds):
        _write(x, x - lr * d, keep)
