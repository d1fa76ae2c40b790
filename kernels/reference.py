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


def acc_dtype(xs) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _axis_sums(v, dims, square: bool):
    """Per row axis j: the sum of v (of v**2 with ``square``) over every other dim, as float vectors.

    # NB: written to read v as few times as possible: the non-row dims are reduced first, by a fused
    # reduction (vector_norm for squares: no temporary), then the small partial per axis.
    """
    other = [i for i in range(v.dim()) if i not in dims]

    def red(u, over):
        if not over:
            return u.square() if square else u
        return torch.linalg.vector_norm(u, 2, dim=over).square() if square else u.sum(over)

    if other:
        part = red(v, other)  # row dims only, in increasing order (dims are sorted)
        return [part.sum([i for i in range(len(dims)) if i != j]) if len(dims) > 1 else part for j in range(len(dims))]
    return [red(v, [i for i in range(v.dim()) if i != dj]) for dj in dims]


def row_stats(layout: RowLayout, xs, ds=None) -> RowStats:
    """Per-row reductions; with ``ds`` None only ``xx`` is computed (``xd``, ``dd`` are zeros)."""
    acc = acc_dtype(xs)
    n = layout.n_rows
    width = 1 if ds is None else 3
    out = torch.zeros((n, width), dtype=acc, device=layout.device)
    rows, items = [], []
    for t, ids in enumerate(layout.tensor_axes):
        if not ids:
            continue
        x = xs[t].to(acc)
        dims = [layout.axes[a].dim for a in ids]
        sums = [_axis_sums(x, dims, True)]
        if ds is not None:
            d = ds[t].to(acc)
            sums += [_axis_sums(x * d, dims, False), _axis_sums(d, dims, True)]
        for j, a in enumerate(ids):
            ax = layout.axes[a]
            items.append(torch.stack([q[j] for q in sums], -1)[ax.pos])
            rows.append(ax.row)
    if rows:
        out.index_add_(0, torch.cat(rows), torch.cat(items))
    if ds is None:
        z = torch.zeros(n, dtype=acc, device=layout.device)
        return RowStats(out[:, 0], z, z)
    return RowStats(out[:, 0], out[:, 1], out[:, 2])


def dhspg_rows(stats: RowStats, redundant: torch.Tensor, cfg: DHSPGConfig):
    """OTO.md step 3 per row: ``(coef, scale, zero_count)``; coef = lambda/||x||, scale 0 = zeroed."""
    xx, xd, dd = stats.xx, stats.xd, stats.dd
    norm = xx.sqrt()
    zero = xx == 0
    zero_count = zero.sum()
    active = zero_count < cfg.target_rows
    safe = torch.where(zero, torch.ones_like(norm), norm)
    in_r = redundant & ~zero & active
    lam = torch.full_like(xx, cfg.lmbda)
    if not cfg.warm_up:
        neg = xd < 0
        lb = -xd / safe
        ub = -dd * norm / torch.where(neg, xd, -torch.ones_like(xd))
        ad = (cfg.lmbda_amplify * lb).clamp(cfg.lmbda, cfg.lmbda * cfg.hat_lmbda_coeff)
        ad = torch.where(ad >= ub, (lb + ub) / 2, ad)
        lam = torch.where(neg, ad, lam)
    coef = torch.where(in_r, lam / safe, torch.zeros_like(xx))
    if cfg.warm_up:
        proj = torch.zeros_like(zero)
    else:
        proj = in_r & ((xx - cfg.lr * xd) - (cfg.lr * lam) * norm < cfg.epsilon * xx)
    drop = proj | (zero & cfg.fixed_zero)
    scale = torch.where(drop, torch.zeros_like(xx), torch.ones_like(xx))
    return coef, scale, zero_count


def apply_rows(layout: RowLayout, xs, ds, lr: float, coef: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: ``x <- x * (S * (1 - lr*C)) + (-lr * d) * S`` per element (C: sum, S: min over its rows)."""
    acc = coef.dtype
    c = torch.cat([coef, coef.new_zeros(1)])  # sentinel row: no coefficient, scale 1
    s = torch.cat([scale, scale.new_ones(1)])
    for t, ids in enumerate(layout.tensor_axes):
        x, d = xs[t], ds[t]
        if not ids:  # a tensor no row reaches: the plain step
            x.add_(d, alpha=-lr)
            continue
        nd = x.dim()
        cb = sb = None
        for a in ids:
            ax = layout.axes[a]
            shape = [1] * nd
            shape[ax.dim] = -1
            ca, sa = c[ax.pos_row].view(shape), s[ax.pos_row].view(shape)
            cb = ca if cb is None else cb + ca
            sb = sa if sb is None else torch.minimum(sb, sa)
        f = sb * (1 - lr * cb)
        if x.dtype == acc:
            x.mul_(f).addcmul_(d, sb, value=-lr)
        else:
            xf = x.to(acc)
            xf.mul_(f).addcmul_(d.to(acc), sb, value=-lr)
            x.copy_(xf)
