"""Shape ops: concat, stack, split, unbind, reshape/view, flatten/squeeze, permute, expand, channel and
pixel shuffle.

Reshapes merge axes by repeating ids (a channel becomes a block of features) and split an axis by
keeping one factor as the row axis and tying the others together, so the kept set always stays a
grid that the rewritten shape constants can express. Merged channel axes keep one of them as rows
(the outermost; the innermost where a first analysis found the outermost pinned: hyper-connections'
stream copies times the hidden width). Concat and split move a channel to an offset.

Internals:
    * The split factor kept as rows depends on sizes only (the largest, outermost on ties), so both
      front-ends agree; ``find_head_splits`` (passes/attention.py) may prefer a head factor.
    * ``_reshape_fix``/``_expand_fix``/``_unflatten_fix`` rewrite literal sizes in the graph; a size
      read off another tensor is replaced by the literal new size where it measured other channels.
    * Channels merged with a token or pixel axis and split along other boundaries are tied in blocks
      that depend on that axis's size: pinned where the inner sizes are read off the input, recorded in
      ``Ctx.sized_ties`` where they are literals (the own class is then checked at another size).
"""
from __future__ import annotations

import operator
from fractions import Fraction

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..channels import AxisLabels, Ctx, SymSize, false_mask, pinned_axis
from ..unionfind import PIN
from ..registry import RuleDeclined, functions, methods, modules, rule
from .common import _ax, _bind_input, _ov, _out_shape, _passthrough

aten = torch.ops.aten


def _tie_aligned(ctx: Ctx, labs, skip: int | None):
    """Tie axis d of every lab (except ``skip``); returns the ids/zeros of the first."""
    first = labs[0]
    zero = list(first.zero)
    const = [first.fixed(d) for d in range(first.ndim)]
    a, b = [], []  # NB: one union for all pairs: a densenet cat has dozens of inputs
    for v in labs[1:]:
        for d in range(first.ndim):
            if d != skip and v.shape[d] == first.shape[d]:
                if v.ids[d] is not first.ids[d]:
                    a.append(first.ids[d])
                    b.append(v.ids[d])
                zero[d] = zero[d] & v.zero[d]  # zero only where every input is zero
                const[d] = const[d] & v.fixed(d)
            elif d != skip:
                const[d] = false_mask(first.shape[d])
    if a:
        ctx.tie(np.concatenate(a), np.concatenate(b))
    has = any(v.const is not None for v in labs)
    return AxisLabels(first.ids, tuple(zero), tuple(const) if has else None)


@rule("cat", keeps_axes=True)
def cat(ctx: Ctx, tensors, dim=0, meta=None, **_):
    """concat along dim: the output axis is the inputs' ids end to end (a channel keeps its row at its new offset); other axes are tied."""
    labs = [t for t in tensors if isinstance(t, AxisLabels) and t.ndim > 0 and not (t.ndim == 1 and t.shape[0] == 0)]
    shape = _out_shape(meta)
    d = _ax(dim, len(shape))
    first = _tie_aligned(ctx, labs, d)
    ids = np.concatenate([t.ids[d] for t in labs])
    z = np.concatenate([t.zero[d] for t in labs])
    c = np.concatenate([t.fixed(d) for t in labs]) if first.const is not None else None
    return first.with_axis(d, ids, z, c)


functions("cat", [torch.cat, torch.concat, getattr(torch, "concatenate", None)] + _ov(aten.cat, "default")
          + _ov(aten.concatenate, "default") + _ov(aten.concat, "default"),
          ("tensors", "dim"), (("dim", 0),))


@rule("stack")
def stack(ctx: Ctx, tensors, dim=0, meta=None, **_):
    """stack along a new axis: the new axis is pinned, the others are tied across inputs."""
    labs = [t for t in tensors if isinstance(t, AxisLabels)]
    shape = _out_shape(meta)
    d = _ax(dim, len(shape))
    first = _tie_aligned(ctx, labs, None)
    ids = list(first.ids)
    zero = list(first.zero)
    ids.insert(d, pinned_axis(shape[d]))
    zero.insert(d, false_mask(shape[d]))
    return AxisLabels(tuple(ids), tuple(zero))


functions("stack", [torch.stack] + _ov(aten.stack, "default"), ("tensors", "dim"), (("dim", 0),))


@rule("unbind")
def unbind(ctx: Ctx, input, dim=0, meta=None, **_):
    """unbind along dim: every piece has the other axes' ids; the removed axis is pinned (its entries become separate tensors)."""
    x = input
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "unbind separates this axis into tensors")
    ids = x.ids[:d] + x.ids[d + 1:]
    zero = x.zero[:d] + x.zero[d + 1:]
    return tuple(AxisLabels(ids, zero) for _ in meta)


functions("unbind", [torch.unbind] + _ov(aten.unbind, "int"), ("input", "dim"), (("dim", 0),))
methods("unbind", ["unbind"], ("input", "dim"), (("dim", 0),))


def _split_fix(site, tensor=None, dim=0, kind="split", **kw):
    old_in = site.old(tensor)
    d = _ax(dim, len(old_in))
    keep = site.keep(tensor, d)
    sizes, start = [], 0
    for o in site.out_old_list:
        n = o[d]
        sizes.append(int(keep[start:start + n].sum()))
        start += n
    old_sizes = [o[d] for o in site.out_old_list]
    # NB: sizes computed from a size that loses rows (``C // 2`` of a pruned stream ``C``) shrink at run
    # time; pieces that keep their sizes (whole heads removed) then take them as literals
    if sizes == old_sizes and not _moving_sizes(site, kw.get("split_size_or_sections")):
        return
    site.replace_call(torch.split, (tensor, sizes), {"dim": d})


def _moving_sizes(site, arg) -> bool:
    """Whether ``arg`` (sizes given to an op) holds a number computed from sizes that lose rows."""
    labels = site.plan.zigset.labels
    return any(_loses_rows(site, labels.get(v.name)) for v in (arg if isinstance(arg, (list, tuple)) else (arg,))
               if isinstance(v, fx.Node))


def _loses_rows(site, lab) -> bool:
    """Whether ``lab`` is a size read (or computed) off axes of which the plan removes rows."""
    return isinstance(lab, SymSize) and any(not site._keep_ids(a).all() for a in lab.ids)


@rule("split", fix=_split_fix, takes_sizes=True)
def split(ctx: Ctx, tensor, dim=0, meta=None, **_):
    """split/chunk along dim: each piece takes its slice of the axis ids."""
    x = tensor
    d = _ax(dim, x.ndim)
    res, start = [], 0
    for o in meta:
        n = int(o.shape[d])
        res.append(x.with_axis(d, x.ids[d][start:start + n], x.zero[d][start:start + n],
                               None if x.const is None else x.fixed(d)[start:start + n]))
        start += n
    return tuple(res)


functions("split", [torch.split, torch.chunk, getattr(torch, "tensor_split", None)]
          + _ov(aten.split, "Tensor") + _ov(aten.split_with_sizes, "default") + _ov(aten.chunk, "default")
          + _ov(aten.tensor_split, "indices", "sections") + _ov(aten.unsafe_split, "Tensor")
          + _ov(aten.unsafe_split_with_sizes, "default"),
          ("tensor", "split_size_or_sections", "dim"), (("dim", 0),), rename={"self": "tensor"})
methods("split", ["split", "chunk", "split_with_sizes", "tensor_split"], ("tensor", "split_size_or_sections", "dim"),
        (("dim", 0),))


def _groups_of(in_shape, out_shape, glue=()):
    """Pair runs of input axes with runs of output axes of equal product (size-1 axes alone).

    A size-1 output axis in ``glue`` joins the run after it instead (a head axis down to one head).
    """
    groups, i, j = [], 0, 0
    ni, no = len(in_shape), len(out_shape)
    while i < ni or j < no:
        if i < ni and in_shape[i] == 1 and (j >= no or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < no and out_shape[j] == 1 and (i >= ni or in_shape[i] != 1) and not (j in glue and i < ni):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= ni or j >= no:
            raise RuleDeclined("the reshape's sizes do not match")
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            else:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _varies_alone(g_ids: np.ndarray, k: int) -> bool:
    """Whether ``g_ids`` is constant along every axis but ``k`` and takes several values along ``k``."""
    moved = np.moveaxis(g_ids, k, 0).reshape(g_ids.shape[k], -1)
    return bool((moved == moved[:, :1]).all()) and len(np.unique(moved[:, 0])) > 1


def _reads_other_axis(ctx: Ctx, v) -> bool:
    """Whether a reshape's size argument ``v`` is read off an axis that holds no channels (a batch, token or
    pixel count: it takes another value at another input size)."""
    return isinstance(v, SymSize) and bool(v.ids) and all((ctx.uf.find(a) == 0).all() for a in v.ids)


def _reshape_lab(ctx: Ctx, x: AxisLabels, out_shape, args=None) -> AxisLabels:
    """Label after a reshape from x.shape to out_shape (``args``: the size arguments, one per output axis,
    where the op has them)."""
    in_shape = x.shape
    ids = [None] * len(out_shape)
    zero = [None] * len(out_shape)
    xc = x.consts()
    const = [None] * len(out_shape)  # NB: a slice of a merged block is part of its channel's slice
    # a factor that later indexes attention heads is kept as the row axis (see passes/attention.py)
    pref = ctx.row_axes.get(ctx.node.name, ()) if ctx.node is not None else ()
    for gi, gj in _groups_of(in_shape, tuple(out_shape), glue=pref):
        if not gj:
            continue
        if len(gi) == 1 and len(gj) == 1:
            ids[gj[0]], zero[gj[0]] = x.ids[gi[0]], x.zero[gi[0]]
            const[gj[0]] = xc[gi[0]] if xc is not None else None
            continue
        sizes = [in_shape[i] for i in gi]
        # merge: one id per merged index, the row of the one real channel axis inside
        live = [i for i in gi if (ctx.uf.find(x.ids[i]) != 0).any()]
        grid_ids = np.zeros(sizes, dtype=np.int64)
        grid_z = np.zeros(sizes, dtype=bool)
        grid_c = grid_z
        if live:
            # NB: several live axes merged (MQA: query heads times the shared value's own channels):
            # each merged index belongs to one of them, whose row keeps it; the others are pinned
            # (tying them would make one row of every head). The outermost keeps its blocks, unless a
            # first analysis found it pinned in the end (hyper-connections' streams times the hidden
            # width: the streams are mixed by data later): then the innermost (zero_invariant_groups)
            name = ctx.node.name if ctx.node is not None else None
            kept = live[-1] if name in ctx.merge_inner else live[0]
            for i in live:
                if i != kept:
                    ctx.pin(x.ids[i], "merged inside the blocks of an outer axis" if i > kept
                            else "merged around the channels of an inner axis")
            if len(live) > 1 and name is not None:
                ctx.merges.append((name, x.ids[kept]))
            k = gi.index(kept)
            shp = [1] * len(gi)
            shp[k] = sizes[k]
            grid_ids = np.broadcast_to(x.ids[kept].reshape(shp), sizes)
            grid_z = np.broadcast_to(x.zero[kept].reshape(shp), sizes)
            grid_c = np.broadcast_to(xc[kept].reshape(shp), sizes) if xc is not None else grid_z
        flat_ids, flat_z = grid_ids.reshape(-1), grid_z.reshape(-1)
        if len(gj) == 1:
            ids[gj[0]], zero[gj[0]] = np.ascontiguousarray(flat_ids), np.ascontiguousarray(flat_z)
            const[gj[0]] = np.ascontiguousarray(grid_c.reshape(-1))
            continue
        # split: keep one factor as the row axis, tie the rest so the kept set stays a grid
        fsizes = [out_shape[j] for j in gj]
        cand = [k for k, j in enumerate(gj) if out_shape[j] > 1]
        # NB: the choice must not depend on the front-end (export bakes every size into a literal),
        # so it uses sizes only: the largest factor, the outermost on ties. Channel shuffle's
        # (groups, C/groups) keeps C/groups; an unflatten (C, H, W) keeps C when C is the largest.
        # NB: a head factor is kept even at size 1, so a model pruned to one head keeps its rows
        g_ids = flat_ids.reshape(fsizes)
        g_z = flat_z.reshape(fsizes)
        # a factor along which the ids already vary alone (the others repeat them: heads merged with
        # the batch, as nn.MultiheadAttention's decomposition does) is kept without any tie
        choice = [k for k, j in enumerate(gj) if j in pref] or cand
        choice = [k for k in choice if live and _varies_alone(g_ids, k)] or choice
        r = max(choice, key=lambda k: (fsizes[k], -k))
        moved = np.moveaxis(g_ids, r, 0).reshape(fsizes[r], -1)
        across = live and not _varies_alone(g_ids, r) and any(i not in live and in_shape[i] > 1 for i in gi)
        if across and args is not None and any(_reads_other_axis(ctx, args[j]) for j in gj[1:]):
            # NB: channels merged with an axis that holds no channels (tokens, pixels) and split into
            # axes whose inner sizes are read off such an axis (MAnet's ``(B, HW, C).reshape(B, C, H, W)``):
            # which channels share an output row depends on those sizes, so ties made at the example's
            # size are wrong at another one; the channels are pinned instead. (Heads split out of a
            # width merged with the batch, ``(N, E) -> (N * heads, head_dim)``, keep their ties: only the
            # outermost size follows the batch.)
            for i in live:
                ctx.pin(x.ids[i], "mixed with a token or pixel axis by a reshape (which channels share "
                                  "an output channel depends on its size)")
            for j in gj:
                ids[j], zero[j] = pinned_axis(out_shape[j]), false_mask(out_shape[j])
            continue
        if across and ctx.node is not None:
            # NB: sizes given as literals (a static capture, a model's own numbers) do not say whether
            # the blocks follow the input: the own class is checked at another size (OTO._check_sized_ties)
            ctx.sized_ties.append((ctx.node.name, x.ids[kept]))
        if live:
            ctx.tie(moved, moved[:, :1])
        for k, j in enumerate(gj):
            if k == r:
                ids[j] = np.ascontiguousarray(moved[:, 0])
                zero[j] = np.ascontiguousarray(np.moveaxis(g_z, r, 0).reshape(fsizes[r], -1).all(axis=1))
                g_c = grid_c.reshape(fsizes)
                const[j] = np.ascontiguousarray(np.moveaxis(g_c, r, 0).reshape(fsizes[r], -1).all(axis=1))
            else:
                ids[j] = pinned_axis(out_shape[j])
                zero[j] = false_mask(out_shape[j])
    for j, n in enumerate(out_shape):
        if ids[j] is None:
            ids[j], zero[j] = pinned_axis(n), false_mask(n)
        if const[j] is None:
            const[j] = zero[j]
    return AxisLabels(tuple(ids), tuple(zero), tuple(const) if xc is not None else None)


def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(shape[0])
    return tuple(shape)


def _sym_new(site, v):
    """The pruned value of a size read in the graph (a SymSize label that is an axis's size), or None."""
    lab = site.plan.zigset.labels.get(v.name) if isinstance(v, fx.Node) else None
    if not isinstance(lab, SymSize) or lab.value is None or len(lab.ids) != 1:
        return None
    # NB: an expression of a size (batch * windows in a dynamic-shape export) measures the axis
    # but is not its size
    if lab.value != len(lab.ids[0]):
        return None
    return int(site._keep_ids(lab.ids[0]).sum())


def _size_arg(site, v, old: int, new: int):
    """The argument that gives an output axis of ``old`` entries ``new`` entries after pruning.

    A literal becomes ``new``; a size read off another axis stays when it reads ``new`` and becomes
    the literal otherwise; an expression of sizes that keep all their rows times a literal (a
    dynamic ``batch * heads``) is scaled by the kept fraction, a ``v * a // b`` computed in the
    graph (exact: the axis is a block of whole rows repeated for every value of the dynamic
    factor); any other expression stays.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v if v == -1 else new
    if not isinstance(v, fx.Node):
        return v
    s = _sym_new(site, v)
    if s is not None:
        return v if s == new else new
    lab = site.plan.zigset.labels.get(v.name)
    if not isinstance(lab, SymSize):
        return v
    loses = _loses_rows(site, lab)
    if old == new:
        # NB: an expression of sizes that lose rows changes at run time though this axis keeps its
        # size (twins' ``q.reshape(B, N, heads, C // heads)``, C read off the pruned stream, q pinned)
        return new if loses else v
    if loses:
        return v  # an expression of sizes that lose rows too follows them at run time (C // groups)
    f = Fraction(new, old)
    graph = site.node.graph
    with graph.inserting_before(site.node):
        if f.numerator != 1:
            v = graph.call_function(operator.mul, (v, f.numerator))
        if f.denominator != 1:
            v = graph.call_function(operator.floordiv, (v, f.denominator))
    return v


def _reshape_fix(site, input, shape=(), **_):
    new = site.out_new
    raw = _shape_args(shape)
    if len(raw) != len(new):
        return
    # NB: a size read off another tensor (``x.shape[-1]``) may measure channels other than the ones
    # this axis now holds (attention heads merged back into a width, or an unpruned output shaped by
    # a pruned input's size): it becomes the literal new size, even where this output kept its shape
    vals = [_size_arg(site, v, o, n) for v, o, n in zip(raw, site.out_old, new)]
    packed = len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size))
    # NB: a one-entry list (``reshape(x, [-1])``) stays a list where the op takes one list argument
    packed = packed or "*shape" not in site.form.spec
    site.set_varargs("shape", [tuple(vals)] if packed else vals)


@rule("reshape", fix=_reshape_fix, takes_sizes=True)
def reshape(ctx: Ctx, input, shape=(), meta=None, **_):
    """view/reshape: merged axes repeat the one channel's ids over the block; a split keeps one factor (the largest) as the row axis and ties the rest."""
    out = _out_shape(meta)
    args = _shape_args(shape) if isinstance(shape, (tuple, list)) else None
    return _reshape_lab(ctx, input, out, args if args is not None and len(args) == len(out) else None)


functions("reshape", [torch.reshape] + _ov(aten.view, "default") + _ov(aten.reshape, "default")
          + _ov(aten._unsafe_view, "default"), ("input", "shape"), rename={"size": "shape"})
methods("reshape", ["view", "reshape"], ("input", "*shape"))


def _unflatten_fix(site, input, dim=None, sizes=None, **_):
    if sizes is None:  # flatten/squeeze/unsqueeze: torch derives the sizes
        return
    old = site.out_old
    new = site.out_new
    if old == new:
        return
    d = _ax(dim, len(site.old(input)))
    vals = [new[d + k] if isinstance(v, int) and v != -1 else v for k, v in enumerate(sizes)]
    m = site.module
    if m is not None:
        m.unflattened_size = tuple(vals)
    else:
        site.set("sizes", tuple(vals))


@rule("shape_merge", fix=_unflatten_fix, takes_sizes=True)
def shape_merge(ctx: Ctx, input, meta=None, **_):
    """flatten/unflatten/squeeze/unsqueeze: the same reshape algebra, with the sizes derived by torch."""
    return _reshape_lab(ctx, input, _out_shape(meta))


functions("shape_merge", [torch.flatten, torch.squeeze, torch.unsqueeze] + _ov(aten.flatten, "using_ints")
          + _ov(aten.squeeze, "dim", "dims", "default") + _ov(aten.unsqueeze, "default"), ("input", "*rest"))
functions("shape_merge", [torch.unflatten] + _ov(aten.unflatten, "int"), ("input", "dim", "sizes"))
methods("shape_merge", ["flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"], ("input", "*rest"))
methods("shape_merge", ["unflatten"], ("input", "dim", "sizes"))
modules("shape_merge", [nn.Flatten], _bind_input)
modules("shape_merge", [nn.Unflatten], lambda node, m, args, kwargs: dict(
    input=args[0], dim=m.dim, sizes=tuple(m.unflattened_size)))


def _permute_dims(kind, x_ndim, dims):
    if kind == "transpose":
        a, b = (_ax(d, x_ndim) for d in dims[:2])
        perm = list(range(x_ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if kind == "t":  # t, numpy_T (x.T): every axis reversed
        return list(range(x_ndim))[::-1]
    if kind == "mT":  # mT, adjoint (x.mT): the last two axes swapped
        return list(range(x_ndim - 2)) + [x_ndim - 1, x_ndim - 2]
    if kind == "movedim":
        src, dst = dims[0], dims[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [_ax(s, x_ndim) for s in src]
        dst = [_ax(d, x_ndim) for d in dst]
        perm = [None] * x_ndim
        for s, d in zip(src, dst):
            perm[d] = s
        rest = iter(a for a in range(x_ndim) if a not in src)
        return [p if p is not None else next(rest) for p in perm]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [_ax(d, x_ndim) for d in dims]


@rule("permute")
def permute(ctx: Ctx, input, dims=(), kind="permute", meta=None, **_):
    """permute/transpose/movedim: axis ids move with their axes."""
    x = input
    perm = _permute_dims(kind, x.ndim, tuple(dims))
    c = x.consts()
    return AxisLabels(tuple(x.ids[p] for p in perm), tuple(x.zero[p] for p in perm),
                      None if c is None else tuple(c[p] for p in perm))


functions("permute", [torch.permute] + _ov(aten.permute, "default"), ("input", "*dims"), rename={"dims": "*dims"},
          kind="permute")
methods("permute", ["permute"], ("input", "*dims"), kind="permute")
functions("permute", [torch.transpose, torch.swapaxes, torch.swapdims] + _ov(aten.transpose, "int"),
          ("input", "*dims"), rename={"dim0": "*dims"}, kind="transpose")
methods("permute", ["transpose", "swapaxes", "swapdims", "transpose_"], ("input", "*dims"), kind="transpose")
functions("permute", [torch.t] + _ov(aten.t, "default"), ("input", "*dims"), kind="t")
methods("permute", ["t"], ("input", "*dims"), kind="t")
functions("permute", _ov(aten.numpy_T, "default"), ("input", "*dims"), kind="t")
functions("permute", [torch.adjoint] + _ov(aten.mT, "default") + _ov(aten.adjoint, "default"), ("input", "*dims"),
          kind="mT")
functions("permute", [torch.movedim, torch.moveaxis] + _ov(aten.movedim, "int"), ("input", "*dims"),
          rename={"source": "*dims"}, kind="movedim")
methods("permute", ["movedim", "moveaxis"], ("input", "*dims"), kind="movedim")


def _expand_fix(site, input, sizes=(), **_):
    new, old = site.out_new, site.out_old
    raw = _shape_args(sizes)
    if new == old or len(raw) != len(new):
        return
    vals = [_size_arg(site, v, o, n) if not isinstance(v, fx.Node) or o != n else v
            for v, o, n in zip(raw, old, new)]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    packed = packed or "*sizes" not in site.form.spec
    site.set_varargs("sizes", [tuple(vals)] if packed else vals)


def _copies(ctx: Ctx, src: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels of ``n`` copies of a single channel that is pinned (it is never removed): each copy is
    a channel of its own (fresh ids, not zero), so a consumer may drop copies one by one (MQA's one
    key/value head expanded to every query head). None when the channel may still be removed."""
    if n <= 1 or not (ctx.uf.find(src) == PIN).all():
        return None
    return ctx.fresh(n), false_mask(n)


@rule("expand", fix=_expand_fix, takes_sizes=True, keeps_axes=True)
def expand(ctx: Ctx, input, sizes=(), meta=None, **_):
    """expand: axes of equal size keep their ids; a size-1 axis of a pinned channel broadcast to n holds n channels of its own (copies); other broadcast (new or size-1) axes are pinned."""
    x = input
    shape = _out_shape(meta)
    off = len(shape) - x.ndim
    lab = _passthrough(ctx, x, shape, {d + off: d for d in range(x.ndim)})
    for d in range(x.ndim):
        # NB: a copy dropped changes nothing else; the source stays (pinned), so copies never outlive it
        c = _copies(ctx, x.ids[d], shape[d + off]) if x.shape[d] == 1 else None
        if c is not None:
            lab = lab.with_axis(d + off, *c)
    return lab


methods("expand", ["expand"], ("input", "*sizes"))
functions("expand", _ov(aten.expand, "default"), rename={"size": "sizes"})


@rule("view_as")
def view_as(ctx: Ctx, input, other, meta=None, **_):
    """x.view_as(y) / reshape_as: the reshape algebra to y's shape, each output axis tied to y's axis (both keep the same sizes)."""
    if isinstance(other, AxisLabels) and ctx.node is not None and ctx.node.name not in ctx.row_axes:
        # a split keeps as rows the axes that are rows of ``other`` (Beam's gate viewed as the heads)
        live = frozenset(d for d, a in enumerate(other.ids) if (ctx.uf.find(a) != 0).any())
        if live:
            ctx.row_axes[ctx.node.name] = live
    lab = _reshape_lab(ctx, input, _out_shape(meta))
    if isinstance(other, AxisLabels) and other.shape == lab.shape:
        for a, b in zip(lab.ids, other.ids):
            ctx.tie(a, b)
    return lab


functions("view_as", _ov(aten.view_as, "default") + _ov(aten.reshape_as, "default"), rename={"other": "other"})
methods("view_as", ["view_as", "reshape_as"], ("input", "other"))


def _repeat_fix(site, input, repeats=(), **_):
    new, old = site.out_new, site.out_old
    raw = _shape_args(repeats)
    if new == old or len(raw) != len(new):
        return
    inp = site.old(input)
    off = len(new) - len(inp)
    # NB: only the copies of a single channel change count; a tiled axis loses whole rows from every
    # tile, so its repeat count (a size read at run time, say) stays
    vals = [n if o != n and d >= off and inp[d - off] == 1 else r for d, (r, o, n) in enumerate(zip(raw, old, new))]
    packed = len(repeats) == 1 and isinstance(repeats[0], (tuple, list, torch.Size))
    packed = packed or "*repeats" not in site.form.spec
    site.set_varargs("repeats", [tuple(vals)] if packed else vals)


@rule("repeat", fix=_repeat_fix)
def repeat(ctx: Ctx, input, repeats=(), meta=None, **_):
    """x.repeat(r...): an axis repeated r times holds its ids r times over (tiled blocks of whole rows); a pinned size-1 axis repeated holds n channels of its own (copies); new leading axes and other repeated size-1 axes are pinned."""
    x = input
    shape = _out_shape(meta)
    off = len(shape) - x.ndim
    ids, zero = [], []
    for d, n in enumerate(shape):
        src = d - off
        if src < 0:
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
            continue
        m = x.shape[src]
        c = _copies(ctx, x.ids[src], n) if m == 1 else None
        if c is not None:
            ids.append(c[0])
            zero.append(c[1])
            continue
        if m == 1 and n != 1:
            ctx.pin(x.ids[src], "a single channel repeated over the axis")
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
            continue
        if n % m:
            raise RuleDeclined("repeated axis is not a whole number of copies")
        ids.append(x.ids[src] if n == m else np.tile(x.ids[src], n // m))
        zero.append(x.zero[src] if n == m else np.tile(x.zero[src], n // m))
    return AxisLabels(tuple(ids), tuple(zero))


functions("repeat", _ov(aten.repeat, "default"), rename={"repeats": "repeats"})
methods("repeat", ["repeat"], ("input", "*repeats"))


def _repeat_interleave_fix(site, input, repeats=1, dim=None, output_size=None, **_):
    new, old = site.out_new, site.out_old
    if new == old:
        return
    d = _ax(dim, len(old))
    if new[d] == old[d]:
        return  # NB: another axis lost entries; the repeated one (a batch: UNet3D's frames) keeps its size expression
    if site.old(input)[d] == 1:  # copies of one channel: as many as are left
        site.set("repeats", new[d])
    if output_size is not None:
        site.set("output_size", new[d])


@rule("repeat_interleave", fix=_repeat_interleave_fix, keeps_axes=True)
def repeat_interleave(ctx: Ctx, input, repeats=1, dim=None, output_size=None, meta=None, **_):
    """x.repeat_interleave(r, dim): each channel of the axis becomes r adjacent copies with its id (removed with it); a size-1 axis is pinned and gives n channels of its own (copies); no dim (flattened) or tensor repeats pin."""
    x = input
    if dim is None or not isinstance(repeats, int):
        raise RuleDeclined("repeat_interleave without dim, or with per-entry (tensor) repeats")
    d = _ax(dim, x.ndim)
    n = _out_shape(meta)[d]
    if x.shape[d] == 1 and n > 1:
        # NB: as expand does: the one channel stays (pinned) and each copy is a channel of its own, so
        # a consumer drops copies one by one (Mamba 2's one group of B/C read by every head)
        ctx.pin(x.ids[d], "a single channel repeated over the axis")
        return x.with_axis(d, *_copies(ctx, x.ids[d], n))
    if n != x.shape[d] * repeats:
        raise RuleDeclined("repeat_interleave's output size is not r times the axis")
    return x.with_axis(d, np.repeat(x.ids[d], repeats), np.repeat(x.zero[d], repeats))


functions("repeat_interleave", [torch.repeat_interleave] + _ov(aten.repeat_interleave, "self_int"),
          ("input", "repeats", "dim", "output_size"))
methods("repeat_interleave", ["repeat_interleave"], ("input", "repeats", "dim", "output_size"))


@rule("expand_as", keeps_axes=True)
def expand_as(ctx: Ctx, input, other, meta=None, **_):
    """x.expand_as(y): an axis x has in full is tied to y's; a broadcast axis takes y's ids (its size follows y)."""
    x, y = input, other
    off = y.ndim - x.ndim
    ids, zero = list(y.ids), [false_mask(n) for n in y.shape]
    for d in range(x.ndim):
        if x.shape[d] == y.shape[d + off]:
            ctx.tie(x.ids[d], y.ids[d + off])
            ids[d + off], zero[d + off] = x.ids[d], x.zero[d]
    return AxisLabels(tuple(ids), tuple(zero))


methods("expand_as", ["expand_as"], ("input", "other"))
functions("expand_as", _ov(aten.expand_as, "default"))


@rule("channel_shuffle")
def channel_shuffle(ctx: Ctx, input, groups, meta=None, **_):
    """shuffle of g groups of C/g channels: channel j of every group is one row (the groups stay equal)."""
    x = input
    c = x.ids[1].reshape(int(groups), -1)
    ctx.tie(c, c[:1])
    perm = np.arange(len(x.ids[1])).reshape(int(groups), -1).T.reshape(-1)
    return x.with_axis(1, x.ids[1][perm], x.zero[1][perm])


functions("channel_shuffle", [getattr(F, "channel_shuffle", None), getattr(torch, "channel_shuffle", None),
                              getattr(torch, "native_channel_shuffle", None)]
          + _ov(aten.channel_shuffle, "default") + _ov(getattr(aten, "native_channel_shuffle", None), "default"),
          ("input", "groups"))
modules("channel_shuffle", [nn.ChannelShuffle], lambda node, m, args, kwargs: dict(input=args[0], groups=m.groups))


@rule("pixel_shuffle")
def pixel_shuffle(ctx: Ctx, input, upscale_factor=None, downscale_factor=None, meta=None, **_):
    """pixel_shuffle(r): out channel c is in channels c*r*r .. c*r*r + r*r - 1 (the block is one row, zero when all of it is); pixel_unshuffle(r): in channel c becomes out channels c*r*r .. c*r*r + r*r - 1 (one row); leading axes pass, H and W mix with the block (pinned)."""
    x = input
    shape = _out_shape(meta)
    r = upscale_factor if upscale_factor is not None else downscale_factor
    if not isinstance(r, int) or x.ndim < 3:
        raise RuleDeclined("pixel shuffle factor is not a literal int, or the input has no (C, H, W) axes")
    cax = x.ndim - 3
    lab = _passthrough(ctx, x, shape, {d: d for d in range(cax)}, handled=(cax,))
    c, z = x.ids[cax], x.zero[cax]
    if upscale_factor is not None:
        # NB: every out pixel of channel c reads one of its block's r*r channels: removing fewer than
        # the whole block would change the channel count by a non-multiple of r*r and shift the rest
        blocks = c.reshape(-1, r * r)
        ctx.tie(blocks, blocks[:, :1])
        ids, zero = blocks[:, 0], z.reshape(-1, r * r).all(axis=1)
    else:
        ids, zero = np.repeat(c, r * r), np.repeat(z, r * r)
    return lab.with_axis(cax, ids, zero)


functions("pixel_shuffle", [F.pixel_shuffle] + _ov(aten.pixel_shuffle, "default"), ("input", "upscale_factor"))
functions("pixel_shuffle", [F.pixel_unshuffle] + _ov(aten.pixel_unshuffle, "default"), ("input", "downscale_factor"))
modules("pixel_shuffle", [nn.PixelShuffle],
        lambda node, m, args, kwargs: dict(input=args[0] if args else kwargs["input"], upscale_factor=m.upscale_factor))
modules("pixel_shuffle", [nn.PixelUnshuffle],
        lambda node, m, args, kwargs: dict(input=args[0] if args else kwargs["input"], downscale_factor=m.downscale_factor))


@rule("complex_view")
def complex_view(ctx: Ctx, input, kind="as_complex", meta=None, **_):
    """view_as_complex reads the last axis (a pair of real and imaginary parts: pinned) as one complex value, other axes keep their ids and zeros (0 + 0j is zero); view_as_real adds that pair axis (pinned) back."""
    x = input
    shape = _out_shape(meta)
    if kind == "as_complex":
        return _passthrough(ctx, x, shape, {d: d for d in range(x.ndim - 1)})
    return AxisLabels(x.ids + (pinned_axis(shape[-1]),), x.zero + (false_mask(shape[-1]),))


functions("complex_view", [torch.view_as_complex] + _ov(aten.view_as_complex, "default"), ("input",),
          kind="as_complex")
functions("complex_view", [torch.view_as_real] + _ov(aten.view_as_real, "default"), ("input",), kind="as_real")
