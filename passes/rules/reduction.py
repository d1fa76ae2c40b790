"""Reductions and normalising maps: sum, mean, var, max, norms, F.normalize, softmax, top-k and sort;
scans along an axis: cumsum, cumprod, logcumsumexp, cummax, cummin, diff.

A sum over an axis is a contraction: its channels must be zero with their rows, and so must a p-norm's
(p > 0, Frobenius) and F.normalize's, to which a zero entry adds nothing. Every other
reduction (mean, var, max, a matrix or negative-order norm) and every map that divides by something
computed over an axis (softmax) counts all of that axis's channels, so the axis is pinned; except the mean of
an RMS norm written out by hand (and a mean over whole heads), the two means of squares of a
magnitude match (Gemma 3n's AltUp: ``h * rms(g) / rms(h)``) and ConvNeXt V2's GRN channel mean of
spatial 2-norms, whose rewrite keeps the old divisor; and the two means (or mean and ``var``/``std``)
of a layer norm written out, whose rewrite also adds the removed channels' ``(0 - u) ** 2`` back into
the variance. A scan mixes the
entries along its axis (each output reads a run of them), so that axis is pinned too; it acts on
every other axis entry by entry.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..channels import AxisLabels, Ctx, false_mask, pinned_axis
from ..nodes import (WEIGHTLESS_READ, grn_of, layer_norm_of, magnitude_matches_of, read_as_stream_or_input,
                     rms_norm_of)
from ..registry import RuleDeclined, functions, methods, modules, rule
from .common import _ax, _ov, _out_shape

aten = torch.ops.aten


def _reduce_axes(dim, ndim):
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(ndim))
    if isinstance(dim, int):
        return [_ax(dim, ndim)]
    return [_ax(d, ndim) for d in dim]


def _reduce_fix(site, input, dim=None, keepdim=False, kind="mean", **_):
    """A mean over an axis that lost (zero) rows keeps its old divisor: its input is scaled by new / old.
    The variance of a layer norm written out (:func:`otofx.passes.nodes.layer_norm_of`) also counts the
    removed entries' ``(0 - u) ** 2``."""
    old, new = site.old(input), site.new(input)
    if kind not in ("mean", "var") or old is None or new is None or old == new:
        return
    axes = _reduce_axes(dim, len(old))
    n_old, n_new = math.prod(old[a] for a in axes), math.prod(new[a] for a in axes)
    if n_old == n_new:
        return
    ln = layer_norm_of(site.node) if len(axes) == 1 else None
    ln = ln if ln is not None and ln.var is site.node else None
    if ln is not None and ln.kind != "centred":
        _variance_fix(site, ln, n_old, n_new)
        return
    if kind != "mean":
        return
    g = site.node.graph
    src = site.node.args[0] if site.node.args else site.node.kwargs["input"]
    with g.inserting_before(site.node):
        scaled = g.call_function(aten.mul.Tensor, (src, n_new / n_old))
    site.set("input", scaled)
    if ln is not None:
        # NB: each removed entry's x - u is -u: u ** 2 over the divisor in force (n_old / scale when a
        # compressed graph is compressed again), added after the mean
        _add_after(site.node, ln.mean, ln.scale * (n_old - n_new) / n_old)


def _add_after(s, u, q: float):
    """Every reader of ``s`` reads ``s + q * u * u`` instead."""
    g = s.graph
    # NB: before the next node, not inserting_after(s), which would put each new node first
    with g.inserting_before(s.next):
        uu = g.call_function(aten.mul.Tensor, (u, u))
        term = g.call_function(aten.mul.Tensor, (uu, q))
        total = g.call_function(aten.add.Tensor, (s, term))
    s.replace_all_uses_with(total, delete_user_cb=lambda n: n is not total)
    return total


def _move_before(u: fx.Node, node: fx.Node) -> None:
    """Put ``u`` before ``node`` when the graph computes it later (vit-pytorch's channel LayerNorm takes
    ``var`` first, then ``mean``): its inputs, which ``node``'s input is among, come before ``node`` already."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[u] < order[node]:
        return  # NB: u is computed first already
    if any(order[a] >= order[node] for a in u.all_input_nodes):
        raise RuleDeclined(f"{node.name}: the mean it is centred by is computed later, from values made after it")
    node.prepend(u)


def _variance_fix(site, ln, n_old: int, n_new: int) -> None:
    """``var``/``std`` of a layer norm written out over an axis narrowed from ``n_old`` to ``n_new``: the
    node becomes the old width's variance about the (kept-divisor) mean u, written as a centred layer
    norm's (``mean((x - u) ** 2 * new / old) + u ** 2 * (old - new) / old``, which a compressed graph
    compressed again reads as one), times ``old / (old - correction)``, its root for ``std``."""
    node, g = site.node, site.node.graph
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if ln.correction >= n_old:
        raise RuleDeclined(f"{node.name}: a variance with correction {ln.correction} over {n_old} entries")
    _move_before(ln.mean, node)
    with g.inserting_before(node):
        d = g.call_function(aten.sub.Tensor, (x, ln.mean))
        sq = g.call_function(aten.pow.Tensor_Scalar, (d, 2))
        scaled = g.call_function(aten.mul.Tensor, (sq, n_new / n_old))
        m = g.call_function(aten.mean.dim, (scaled, [ln.dim], True))
    out = _add_after(m, ln.mean, (n_old - n_new) / n_old)
    with g.inserting_before(out.next):
        if ln.correction:
            out = g.call_function(aten.mul.Tensor, (out, n_old / (n_old - ln.correction)))
        if ln.kind == "std":
            out = g.call_function(aten.sqrt.default, (out,))
    node.replace_all_uses_with(out)


@rule("reduce", fix=_reduce_fix)
def reduce(ctx: Ctx, input, dim=None, keepdim=False, kind="mean", meta=None, **_):
    """sum (and a p-norm, p > 0) over an axis is a contraction (its channels must be zero with their rows); mean, var and max over an axis pin it, except a mean of channels zero with their rows in an RMS norm, a magnitude match (h * rms(g) / rms(h)) or a GRN (ConvNeXt V2), or over rows of several positions each (whole heads): it keeps its old divisor in the rewrite; other axes keep their ids."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    axes = _reduce_axes(dim, x.ndim)
    if kind in ("norm", "linalg_norm"):
        # NB: a p-norm with p > 0 (inf too: |x| >= 0) adds nothing for a zero entry: over channels zero
        # with their rows it is a sum; a negative p, -inf or a matrix norm (spectral, nuclear) is not.
        # torch.norm flattens without dim; linalg.norm takes a numeric ord of a 2-D input as a matrix norm
        order = _.get("p", _.get("ord"))
        flat = dim is None and (kind == "norm" or order is None)
        kind = "sum" if _norm_ignores_zeros(order, len(axes), flat) else "norm"
    ln = layer_norm_of(ctx.node) if ctx.node is not None and kind in ("mean", "var") and len(axes) == 1 else None
    for a in axes:
        # NB: a layer norm written out (ConvNeXt's channels-first LayerNorm, Cohere's): its mean u of channels
        # zero with their rows and its variance about u keep the old divisor in the rewrite, the variance
        # with the removed channels' (0 - u) ** 2 added back (_reduce_fix); the own class replaces a module
        # that computes it alone (otofx.rebuild), and keeps the rows of one written into a larger forward
        # NB: a centred variance reads x - u (not zero): it is free once its mean was; var(x) reads x itself
        if ln is not None and ln.dim == a and (
                (ln.mean is ctx.node and x.zero[a].all())
                or (ln.var is ctx.node and (ln.mean.name in ctx.centred if ln.kind == "centred" else x.zero[a].all()))):
            if ln.mean is ctx.node:
                ctx.centred.add(ctx.node.name)
            continue
        if kind == "mean" and x.zero[a].all():
            # NB: the rewrite keeps the old divisor; the model's own forward divides by the new
            # width, which only an RMS norm's refold (passes.resize.rms_folds) makes the same
            # function. So single channels are free in an RMS norm (the residual stream of
            # LLaMA-style models); elsewhere only heads (rows of several positions: OLMo 2's q/k
            # norm over all heads) are, or a channel mean (CBAM) would give up the own class
            # NB: a norm without a weight has nothing to refold: the own class scales the layers
            # around it, which needs its output read by linear layers and sums only
            # NB: a GRN's channel mean (ConvNeXt V2) is free too: its own class is replaced by one
            # that keeps the old divisor (passes.modules.PrunedGlobalResponseNorm); the rebuild
            # refuses a GRN written into another module's forward (otofx.rebuild._check_grns)
            grn = grn_of(ctx.node) if ctx.node is not None else None
            if grn is not None and grn.channel == a:
                continue
            rms = rms_norm_of(ctx.node) if ctx.node is not None else None
            # NB: a magnitude match (h * rms(g) / rms(h), Gemma 3n's AltUp) is free too: the own
            # class scales the layer producing h by sqrt(new / old) (passes.resize.magnitude_folds)
            if rms is None and ctx.node is not None and magnitude_matches_of(ctx.node):
                continue
            if rms is None:
                ctx.pin_unless_blocks(x.ids[a], "mean over this axis")
            elif rms.weight is None and not read_as_stream_or_input(rms.out):
                ctx.pin_unless_blocks(x.ids[a], WEIGHTLESS_READ)
            continue
        if kind == "sum":
            _pin_nonzero(ctx, x, a, "sum over channels that are not zero with their rows")
        else:
            ctx.pin(x.ids[a], f"{kind} over this axis")
    shape = _out_shape(meta[0] if isinstance(meta, (tuple, list)) else meta)
    ids, zero, const = [], [], []  # NB: a slice of another axis is reduced on its own: constant stays constant
    for d in range(x.ndim):
        if d in axes:
            if keepdim:
                ids.append(pinned_axis(1))
                zero.append(false_mask(1))
                const.append(false_mask(1))
        else:
            ids.append(x.ids[d])
            zero.append(x.zero[d])
            const.append(x.fixed(d))
    lab = AxisLabels(tuple(ids), tuple(zero), tuple(const) if x.const is not None else None)
    if lab.shape != shape:
        ctx.pin(x, f"{kind} reduction was not understood")
        lab = ctx.pinned_lab(shape)
    if isinstance(meta, (tuple, list)):
        return tuple(lab for _ in meta)
    return lab


def _pin_nonzero(ctx: Ctx, x: AxisLabels, axis: int, reason: str) -> None:
    """Pin the channels of ``x`` on ``axis`` that are not zero with their rows (a sum over the axis: the
    others add nothing to it)."""
    bad = ~x.zero[axis]
    if bad.any():
        ctx.pin(x.ids[axis][bad], reason)


def _norm_ignores_zeros(order, n_axes: int, flattened: bool) -> bool:
    """Whether the norm of order ``order`` over ``n_axes`` axes is unchanged by dropping zero entries:
    a vector p-norm with p > 0 (``None``: 2), or the Frobenius norm of a matrix (``None``, "fro")."""
    if order is None or order == "fro":
        return True
    if isinstance(order, bool) or not isinstance(order, (int, float)):
        return False  # NB: "nuc" and anything unknown
    return (n_axes == 1 or flattened) and order > 0


for _kind, _fns in [("sum", ["sum", "nansum"]), ("mean", ["mean", "nanmean"]), ("var", ["var", "std"]),
                    ("max", ["amax", "amin", "max", "min", "logsumexp", "prod"]), ("norm", ["norm"])]:
    for _f in _fns:
        # NB: torch.norm and Tensor.norm take p before dim
        _spec = ("input", "p", "dim", "keepdim") if _f == "norm" else ("input", "dim", "keepdim")
        functions("reduce", [getattr(torch, _f, None)] + (_ov(getattr(aten, _f), "dim", "dim_IntList", "correction", "default")
                                                          if hasattr(aten, _f) else []),
                  _spec, kind=_kind)
        methods("reduce", [_f], _spec, kind=_kind)


@rule("normalize", keeps_axes=True)
def normalize(ctx: Ctx, input, p=2.0, dim=1, eps=1e-12, meta=None, **_):
    """x / max(||x||_p over dim, eps): for p > 0 channels zero with their rows are free on dim (the norm adds nothing for them), the others pinned; other axes keep their ids and zeros (0 / eps = 0)."""
    x = input
    d = _ax(dim, x.ndim)
    if _norm_ignores_zeros(p, 1, False):
        _pin_nonzero(ctx, x, d, "normalised over channels that are not zero with their rows")
    else:
        ctx.pin(x.ids[d], "normalised over this axis")
    return x


functions("normalize", [F.normalize], ("input", "p", "dim", "eps"))
functions("reduce", [torch.linalg.vector_norm] + _ov(aten.linalg_vector_norm, "default"),
          ("input", "ord", "dim", "keepdim"), kind="norm")
functions("reduce", [torch.linalg.norm] + _ov(aten.linalg_norm, "default"), ("input", "ord", "dim", "keepdim"),
          kind="linalg_norm")


@rule("softmax", keeps_axes=True)
def softmax(ctx: Ctx, input, dim=None, meta=None, **_):
    """softmax over an axis: that axis is pinned (every channel is in the divisor); other axes keep their ids, not zero."""
    x = input
    if dim is None:  # torch's legacy implicit dim (F._get_softmax_dim)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "softmax over this axis")
    return AxisLabels(x.ids, tuple(false_mask(len(a)) for a in x.ids))


functions("softmax", [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax]
          + _ov(aten.softmax, "int") + _ov(aten._softmax, "default") + _ov(aten.log_softmax, "int")
          + _ov(aten._log_softmax, "default"), ("input", "dim"))
methods("softmax", ["softmax", "log_softmax"], ("input", "dim"))
modules("softmax", [nn.Softmax, nn.LogSoftmax], lambda node, m, args, kwargs: dict(input=args[0], dim=m.dim))


@rule("select_k")
def select_k(ctx: Ctx, input, dim=-1, meta=None, **_):
    """topk / sort / argsort along an axis: that axis is pinned (which entries are picked, and their order, depends on all of its channels); other axes keep their ids (values of a zero slice are zero; indices are not)."""
    x = input
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "top-k or sort along this axis")
    outs = meta if isinstance(meta, (tuple, list)) else (meta,)
    labs = []
    for k, m in enumerate(outs):
        shape = _out_shape(m)
        ids = tuple(x.ids[a] if a != d else pinned_axis(shape[a]) for a in range(x.ndim))
        zero = tuple(x.zero[a] if a != d and k == 0 and m.is_floating_point() else false_mask(shape[a])
                     for a in range(x.ndim))
        labs.append(AxisLabels(ids, zero))
    return tuple(labs) if isinstance(meta, (tuple, list)) else labs[0]


functions("select_k", [torch.topk] + _ov(aten.topk, "default"), ("input", "k", "dim"))
methods("select_k", ["topk"], ("input", "k", "dim"))
functions("select_k", [torch.sort, torch.argsort] + _ov(aten.sort, "default", "stable") + _ov(aten.argsort, "default", "stable"),
          ("input", "dim"))
methods("select_k", ["sort", "argsort"], ("input", "dim"))


@rule("scan", keeps_axes=True)
def scan(ctx: Ctx, input, dim=-1, prepend=None, append=None, zero_in=True, meta=None, **_):
    """cumsum/cumprod/logcumsumexp/cummax/cummin/diff along dim: that axis is pinned (each output reads a run of its entries); other axes keep their ids (diff's prepend/append tied to them), zero where f(0) = 0."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    d = _ax(dim, x.ndim)
    why = "a scan (cumsum, diff, ...) mixes the entries along this axis"
    ctx.pin(x.ids[d], why)
    zero = list(x.zero)
    for extra in (prepend, append):
        if isinstance(extra, AxisLabels):
            if extra.ndim != x.ndim:
                raise RuleDeclined("diff's prepend/append must have the input's rank")
            ctx.pin(extra.ids[d], why)
            for a in range(x.ndim):
                if a != d:
                    ctx.tie(x.ids[a], extra.ids[a])
                    zero[a] = zero[a] & extra.zero[a]
        elif extra is not None:
            zero_in = False  # a scalar or a constant tensor: its entries are not zero with the channels
    outs = meta if isinstance(meta, (tuple, list)) else (meta,)
    labs = []
    for k, m in enumerate(outs):
        shape = _out_shape(m)
        ids = tuple(x.ids[a] if a != d else pinned_axis(shape[a]) for a in range(x.ndim))
        keep = zero_in and k == 0  # cummax/cummin's second output holds indices
        z = tuple(zero[a] if a != d and keep else false_mask(shape[a]) for a in range(x.ndim))
        labs.append(AxisLabels(ids, z))
    return tuple(labs) if isinstance(meta, (tuple, list)) else labs[0]


functions("scan", [torch.cumsum, torch.cumprod, torch.cummax, torch.cummin]
          + _ov(aten.cumsum, "default") + _ov(aten.cumprod, "default") + _ov(aten.cummax, "default")
          + _ov(aten.cummin, "default"), ("input", "dim"))
methods("scan", ["cumsum", "cumprod", "cummax", "cummin"], ("input", "dim"))
functions("scan", [torch.logcumsumexp] + _ov(aten.logcumsumexp, "default"), ("input", "dim"), zero_in=False)
methods("scan", ["logcumsumexp"], ("input", "dim"), zero_in=False)
functions("scan", [torch.diff] + _ov(aten.diff, "default"), ("input", "n", "dim", "prepend", "append"),
          (("dim", -1),))
methods("scan", ["diff"], ("input", "n", "dim", "prepend", "append"), (("dim", -1),))
