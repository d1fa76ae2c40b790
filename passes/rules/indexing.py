"""Indexing: narrow, slice, getitem (``x[...]``), index, select, roll, gather, take_along_dim, and writes by index
(index_put and ``x[idx] = v``, index_add, index_copy: a mixture of experts' dispatch back into the stream).

A slice keeps its slice of the axis ids (a channel keeps its row at a new offset, and the literal
bounds are recounted in the rewrite; a step > 1 ties each aligned block of ``step`` positions, so that
the kept positions keep their residues and the same step selects them); an integer or tensor index reads single channels and
pins the axis it reads; ``None`` adds an axis that is not a channel.

Internals:
    * A write by index pins the written axis (the tokens; which positions is data) and ties every
      other axis of the written tensor to the value's: the features pass, zero where both are.
    * gather's index must keep the input's size on every axis but the gathered one: an index that is
      an expand of a size-1 axis there (DeBERTa's relative positions, expanded over batch x heads)
      is constant along it, so the rewrite narrows it to the input's new size instead of pinning.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from ..channels import AxisLabels, Ctx, SymSize, false_mask, labs_in, pinned_axis
from ..registry import functions, methods, rule
from .common import _ax, _ov, _out_shape, _passthrough, _scalar_zero

aten = torch.ops.aten


def _narrow_fix(site, input, dim, start, length, **_):
    d = _ax(dim, len(site.old(input)))
    keep = site.keep(input, d)
    if keep.all():
        return
    s = _ax(start, len(keep)) if isinstance(start, int) else start
    if not isinstance(s, int) or not isinstance(length, int):
        return
    site.set("start", int(keep[:s].sum()))
    site.set("length", int(keep[s:s + length].sum()))


@rule("narrow", fix=_narrow_fix, keeps_axes=True)
def narrow(ctx: Ctx, input, dim, start, length, meta=None, **_):
    """narrow(dim, start, length): the output axis is that slice of the input ids; literal start/length are recounted."""
    x = input
    d = _ax(dim, x.ndim)
    if not isinstance(start, int) or not isinstance(length, int):
        ctx.pin(x.ids[d], "narrow with a computed start or length")
        return _passthrough(ctx, x, _out_shape(meta), {i: i for i in range(x.ndim)})
    s = _ax(start, x.shape[d])
    return x.with_axis(d, x.ids[d][s:s + length], x.zero[d][s:s + length],
                       None if x.const is None else x.fixed(d)[s:s + length])


functions("narrow", [torch.narrow] + _ov(aten.narrow, "default"), ("input", "dim", "start", "length"))
methods("narrow", ["narrow"], ("input", "dim", "start", "length"))


def _slice_fix(site, input, dim=0, start=None, end=None, step=1, **_):
    d = _ax(dim, len(site.old(input)))
    keep = site.keep(input, d)
    if keep.all():
        return
    n = len(keep)
    s, e, st = slice(start, end, step).indices(n)
    if st != 1:
        # NB: the rule tied each aligned block of ``step`` positions, so whole blocks go and every kept
        # position keeps its residue mod step: the selected ones are again a progression of ``step``
        new = np.cumsum(keep) - 1
        pos = np.arange(s, e, st)
        kept = pos[keep[pos]]
        if kept.size == 0:
            site.set("start", 0)
            site.set("end", 0)
            return
        at = new[kept]
        if kept.size > 1 and not (np.diff(at) == st).all():
            raise AssertionError(f"strided slice: kept positions {kept.tolist()} are not a progression of {st}")
        site.set("start", int(at[0]))
        site.set("end", int(at[-1]) + 1)
        return
    site.set("start", int(keep[:s].sum()))
    site.set("end", int(keep[:e].sum()) if end is not None and end < n else end)


@rule("slice", fix=_slice_fix, keeps_axes=True)
def slice_(ctx: Ctx, input, dim=0, start=None, end=None, step=1, meta=None, **_):
    """aten.slice(dim, start, end, step): the output axis is that slice of the ids; a step > 1 ties each aligned block of step positions."""
    x = input
    d = _ax(dim, x.ndim)
    if not isinstance(step, int) or step < 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        ctx.pin(x.ids[d], "strided or computed slice")
        return _passthrough(ctx, x, _out_shape(meta), {i: i for i in range(x.ndim)})
    n = x.shape[d]
    s, e, st = slice(start, end, step).indices(n)
    if st > 1 and n > 1:
        # NB: removing whole aligned blocks of ``step`` positions keeps every position's residue, so
        # the rewrite can select the kept ones with the same step (interleaved q/k/v, rotary pairs)
        full = (n // st) * st
        if full:
            blocks = x.ids[d][:full].reshape(-1, st)
            ctx.tie(blocks, np.broadcast_to(blocks[:, :1], blocks.shape))
        if full < n:
            tail = x.ids[d][full:]
            ctx.tie(tail, np.broadcast_to(tail[:1], tail.shape))
    return x.with_axis(d, x.ids[d][s:e:st], x.zero[d][s:e:st], None if x.const is None else x.fixed(d)[s:e:st])


functions("slice", _ov(aten.slice, "Tensor"), defaults=(("dim", 0), ("start", None), ("end", None), ("step", 1)))


def _index_parts(idx, ndim):
    """Expand a getitem index into per-input-axis parts; returns list of (in_axis|None, part)."""
    parts = list(idx) if isinstance(idx, tuple) else [idx]
    n_real = sum(1 for p in parts if p is not None and p is not Ellipsis)
    out, d = [], 0
    for p in parts:
        if p is Ellipsis:
            for _ in range(ndim - n_real):
                out.append((d, slice(None)))
                d += 1
        elif p is None:
            out.append((None, None))
        else:
            out.append((d, p))
            d += 1
    while d < ndim:
        out.append((d, slice(None)))
        d += 1
    return out


def _getitem_fix(site, input, index, **_):
    if not isinstance(site.old(input), tuple):
        return
    ndim = len(site.old(input))
    parts = _index_parts(index, ndim)
    new_parts, changed = [], False
    for axis, p in parts:
        if isinstance(p, slice) and axis is not None and (p.start is not None or p.stop is not None):
            keep = site.keep(input, axis)
            if keep.all():  # nothing removed on this axis: keep the user's bounds (negative ones too)
                new_parts.append(p)
                continue
            n = len(keep)
            s, e, _ = p.indices(n)
            ns = int(keep[:s].sum()) if p.start is not None else None
            ne = int(keep[:e].sum()) if p.stop is not None and e < n else p.stop
            if (ns, ne) != (p.start, p.stop):
                changed = True
            new_parts.append(slice(ns, ne, p.step))
        else:
            new_parts.append(p)
    if changed:
        # keep the user's spelling: rebuild only the parts that were in the original index
        orig = list(index) if isinstance(index, tuple) else [index]
        it = iter(new_parts)
        rebuilt = []
        for p in orig:
            if p is Ellipsis:
                # skip the parts that the ellipsis expanded to
                n_real = sum(1 for q in orig if q is not None and q is not Ellipsis)
                for _ in range(ndim - n_real):
                    next(it)
                rebuilt.append(Ellipsis)
            else:
                rebuilt.append(next(it))
        site.set("index", tuple(rebuilt) if isinstance(index, tuple) else rebuilt[0])


@rule("getitem", fix=_getitem_fix, takes_sizes=True, python_values=True)
def getitem(ctx: Ctx, input, index, meta=None, **_):
    """x[idx]: a unit-step slice of an axis keeps that slice of ids (bounds recounted); None adds a pinned axis; an int or tensor index pins the axis it reads (one tensor among literal slices: the others keep their ids)."""
    x = input
    if not isinstance(x, AxisLabels):  # tuple/list/dict/size: plain indexing of python values
        if isinstance(x, (tuple, list, dict)):
            return x[index]
        if isinstance(x, torch.Size):
            return x[index]
        return None
    if isinstance(index, AxisLabels) or (isinstance(index, tuple) and len(index) == 1 and isinstance(index[0], AxisLabels)):
        return _gather_first(ctx, x, index if isinstance(index, AxisLabels) else index[0], meta)
    parts = _index_parts(index, x.ndim)
    ids, zero, const = [], [], []  # NB: a slice's entries are a part of each channel's slice
    sized = False  # a slice bounded by a size read at run time: what it holds depends on the input's shape
    for axis, p in parts:
        if axis is None:
            ids.append(pinned_axis(1))
            zero.append(false_mask(1))
            const.append(false_mask(1))
        elif isinstance(p, slice) and all(isinstance(v, (int, type(None))) for v in (p.start, p.stop, p.step)):
            if p.step not in (None, 1):
                ctx.pin(x.ids[axis], "strided slice")
                ids.append(pinned_axis(len(range(*p.indices(x.shape[axis])))))
                zero.append(false_mask(len(ids[-1])))
                const.append(zero[-1])
            else:
                s, e, _ = p.indices(x.shape[axis])
                ids.append(x.ids[axis][s:e])
                zero.append(x.zero[axis][s:e])
                const.append(x.fixed(axis)[s:e])
        elif isinstance(p, int):
            if x.shape[axis] > 1:
                ctx.pin(x.ids[axis], "indexes a single channel")
        elif isinstance(p, slice) and all(v is None or (isinstance(v, (int, SymSize)) and not isinstance(v, bool))
                                          for v in (p.start, p.stop, p.step)):
            # a slice bounded by sizes read at run time (timm's Swin crops its padding: x[:, :H, :W, :]):
            # that axis is pinned and the others pass, as they do beside a literal slice
            ctx.pin([v for v in (p.start, p.stop, p.step) if isinstance(v, SymSize)],
                    "a size read off this axis is used as a value")
            ctx.pin(x.ids[axis], "sliced at a bound computed at run time")
            n = _out_shape(meta)[len(ids)]
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
            const.append(zero[-1])
            sized = True
        else:
            lab = _gather_axes(ctx, x, parts, meta)
            if lab is not None:
                return lab
            for lab in labs_in(p):
                ctx.pin(lab, "used as an index")
            ctx.pin(x, "indexed by a tensor or computed value")
            return ctx.pinned_lab(_out_shape(meta))
    # NB: a table cut to the input's length (a position table's pe[:, :T]) is no constant a fill could hold
    lab = AxisLabels(tuple(ids), tuple(zero), tuple(const) if x.const is not None and not sized else None)
    if lab.shape != _out_shape(meta):
        ctx.pin(x, "indexing this value was not understood")
        return ctx.pinned_lab(_out_shape(meta))
    return lab


functions("getitem", [operator.getitem], ("input", "index"))


def _gather_axes(ctx: Ctx, x: AxisLabels, parts: list, meta) -> AxisLabels | None:
    """x[..., idx, ...] with integer index tensors and unit-step literal slices elsewhere (LeViT's and
    EfficientFormer's ``attention_biases[:, attention_bias_idxs]``, CLIP's pooling
    ``x[torch.arange(B), text.argmax(-1)]``): the gathered axes are replaced by the indices' broadcast
    axes (pinned, as the axes they read), in place where the index tensors are adjacent and first
    otherwise (NumPy's rule); the sliced axes keep their ids (a per-head table's heads stay rows, the
    pooled tokens' features stay channels). None when the index is anything else or the result's shape
    says otherwise (a mask)."""
    tensors = [k for k, (_, p) in enumerate(parts) if isinstance(p, AxisLabels)]
    if not tensors:
        return None
    try:
        lead = tuple(torch.broadcast_shapes(*(parts[k][1].shape for k in tensors)))
    except RuntimeError:
        return None
    adjacent = tensors == list(range(tensors[0], tensors[-1] + 1))
    ids, zero = [], []

    def gathered():
        ids.extend(pinned_axis(n) for n in lead)
        zero.extend(false_mask(n) for n in lead)

    if not adjacent:
        gathered()
    for k, (axis, p) in enumerate(parts):
        if isinstance(p, AxisLabels):
            if adjacent and k == tensors[0]:
                gathered()
        elif axis is not None and isinstance(p, slice) and p.step in (None, 1) and \
                all(isinstance(v, (int, type(None))) and not isinstance(v, bool) for v in (p.start, p.stop)):
            s, e, _ = p.indices(x.shape[axis])
            ids.append(x.ids[axis][s:e])
            zero.append(x.zero[axis][s:e])
        else:
            return None
    lab = AxisLabels(tuple(ids), tuple(zero))
    if lab.shape != _out_shape(meta):
        return None
    for k in tensors:
        ctx.pin(x.ids[parts[k][0]], "gathered by an index tensor")
        ctx.pin(parts[k][1], "used as an index")
    return lab


def _gather_first(ctx: Ctx, x: AxisLabels, idx: AxisLabels, meta) -> AxisLabels:
    """x[idx] with one integer tensor: gathers along axis 0 (pinned); the trailing axes pass."""
    shape = _out_shape(meta)
    if shape != idx.shape + x.shape[1:]:
        ctx.pin([x, idx], "indexed by a tensor in a way that was not understood")
        return ctx.pinned_lab(shape)
    ctx.pin(x.ids[0], "gathered by an index tensor")
    ctx.pin(idx, "used as an index")
    lead = ctx.pinned_lab(idx.shape)
    return AxisLabels(lead.ids + x.ids[1:], lead.zero + x.zero[1:])


@rule("index")
def index(ctx: Ctx, input, indices, meta=None, **_):
    """aten.index(x, [idx, ...]): integer index tensors gather along their axes (pinned), the other axes pass; other forms pin."""
    idx = [i for i in indices]
    if len(idx) == 1 and isinstance(idx[0], AxisLabels):
        return _gather_first(ctx, input, idx[0], meta)
    if isinstance(input, AxisLabels) and len(idx) <= input.ndim and all(isinstance(i, AxisLabels) for i in idx):
        # NB: leading index tensors only (CLIP's ``x[arange(B), ids.argmax(-1)]``). A table gathered after a
        # full slice (``table[:, idx]``, ``index(table, [None, idx])``: TinyViT's per-head biases in an export
        # graph) stays pinned: its heads as rows break TinyViT's own class (an inner width held as an int)
        parts = [(d, i) for d, i in enumerate(idx)]
        parts += [(d, slice(None)) for d in range(len(idx), input.ndim)]
        lab = _gather_axes(ctx, input, parts, meta)
        if lab is not None:
            return lab
    ctx.pin([input] + [i for i in idx if isinstance(i, AxisLabels)], "advanced indexing")
    return ctx.pinned_lab(_out_shape(meta))


functions("index", _ov(aten.index, "Tensor"))


def _written_axes(ctx: Ctx, x: AxisLabels, values, lead: int) -> AxisLabels:
    """The label of ``x`` after ``values`` is written (or added) at positions that index tensors pick
    along its first ``lead`` axes: those axes are pinned; each later axis of ``x`` that ``values`` has
    in full (aligned from the right, as broadcasting does) is tied to it, and a channel stays zero
    where both ``x`` and ``values`` are zero; an axis ``values`` is broadcast over keeps ``x``'s ids
    (a live size-1 channel of ``values`` broadcast is pinned)."""
    shape = x.shape
    n = len(shape)
    ids, zero = [], []
    for d in range(n):
        if d < lead:
            ctx.pin(x.ids[d], "written at positions an index tensor picks")
            ids.append(x.ids[d])
            zero.append(false_mask(shape[d]))
            continue
        if not isinstance(values, AxisLabels):  # a number written: zero stays zero when it is 0
            ids.append(x.ids[d])
            zero.append(x.zero[d] if _scalar_zero(values) else false_mask(shape[d]))
            continue
        vd = d - (n - values.ndim)
        if vd >= values.ndim - (n - lead) and values.shape[vd] == shape[d]:
            ctx.tie(x.ids[d], values.ids[vd])
            ids.append(x.ids[d])
            zero.append(x.zero[d] & values.zero[vd])
            continue
        if vd >= 0:
            ctx.pin(values.ids[vd], "broadcast over an axis of another size")
        ids.append(x.ids[d])
        zero.append(false_mask(shape[d]))
    if isinstance(values, AxisLabels):
        for vd in range(max(0, values.ndim - (n - lead))):
            ctx.pin(values.ids[vd], "written at positions an index tensor picks")
    return AxisLabels(tuple(ids), tuple(zero))


def _index_dtypes(ctx: Ctx, k: int) -> list | None:
    """The dtypes of the index tensors in the node's argument ``k`` (off their meta), or None."""
    node = ctx.node
    got = node.args[k] if node is not None and len(node.args) > k else None
    if isinstance(got, fx.Node):
        got = [got]
    if not isinstance(got, (list, tuple)):
        return None
    out = []
    for i in got:
        val = i.meta.get("val", i.meta.get("example_value")) if hasattr(i, "meta") else None
        if not isinstance(val, torch.Tensor):
            return None
        out.append(val.dtype)
    return out


@rule("index_put", keeps_axes=True)
def index_put(ctx: Ctx, input, indices, values, accumulate=False, meta=None, **_):
    """x[idx_0, ..., idx_k] = v, or += with accumulate (MoE's ``y[token_idx] += w * expert(x[token_idx])``: index_put_ in an export graph, operator.setitem in dynamo's): the indexed leading axes are pinned, each later axis is tied to v's (right-aligned) and stays zero where x and v both are; other index forms pin."""
    x = input
    idx = list(indices) if isinstance(indices, (tuple, list)) else [indices]
    while idx and (idx[-1] is Ellipsis or (isinstance(idx[-1], slice) and idx[-1] == slice(None))):
        idx.pop()  # NB: x[idx, ...] = v, x[idx, :] = v (setitem)
    dtypes = _index_dtypes(ctx, 1)
    if isinstance(x, AxisLabels) and idx and all(isinstance(i, AxisLabels) for i in idx) and \
            dtypes is not None and len(dtypes) >= len(idx):
        lead = sum(i.ndim if dt == torch.bool else 1 for i, dt in zip(idx, dtypes))
        if lead <= x.ndim:
            ctx.pin(idx, "used as an index")
            return _written_axes(ctx, x, values, lead)
    ctx.pin([v for v in [x, values, *idx] if isinstance(v, AxisLabels)], "written through an index this rule does "
            "not read (slices, None, or a mix of forms)")
    return ctx.pinned_lab(x.shape) if isinstance(x, AxisLabels) else ctx.pinned_lab(_out_shape(meta))


functions("index_put", [torch.index_put, torch.index_put_] + _ov(aten.index_put, "default")
          + _ov(aten.index_put_, "default"), ("input", "indices", "values", "accumulate"))
methods("index_put", ["index_put", "index_put_"], ("input", "indices", "values", "accumulate"))
# NB: ``y[idx] += v`` in a dynamo graph: getitem, iadd, then operator.setitem(y, idx, v), which returns None
# and writes y (nodes.mutates_input): its label is y's after the write
functions("index_put", [operator.setitem], ("input", "indices", "values"))


@rule("index_add", keeps_axes=True)
def index_add(ctx: Ctx, input, dim, index, source, alpha=1, meta=None, **_):
    """x.index_add(dim, idx, s) (and index_copy): rows of s are added (copied) into x at the positions idx picks along dim (pinned); every other axis is tied to s's and stays zero where x and s both are."""
    x = input
    d = _ax(dim, x.ndim)
    if not isinstance(source, AxisLabels) or source.ndim != x.ndim:
        ctx.pin([v for v in (x, source, index) if isinstance(v, AxisLabels)], "written by an index tensor")
        return ctx.pinned_lab(_out_shape(meta))
    ctx.pin(index, "used as an index")
    ctx.pin(source.ids[d], "written at positions an index tensor picks")
    shape = _out_shape(meta)
    ids, zero = [], []
    for a in range(x.ndim):
        if a == d:
            ctx.pin(x.ids[a], "written at positions an index tensor picks")
            ids.append(x.ids[a])
            zero.append(false_mask(shape[a]))
        elif source.shape[a] == shape[a]:
            ctx.tie(x.ids[a], source.ids[a])
            ids.append(x.ids[a])
            zero.append(x.zero[a] & source.zero[a])
        else:
            ctx.pin([x.ids[a], source.ids[a]], "broadcast over an axis of another size")
            ids.append(x.ids[a])
            zero.append(false_mask(shape[a]))
    return AxisLabels(tuple(ids), tuple(zero))


functions("index_add", [torch.index_add] + _ov(aten.index_add, "default") + _ov(aten.index_add_, "default"),
          ("input", "dim", "index", "source", "alpha"))
methods("index_add", ["index_add", "index_add_"], ("input", "dim", "index", "source", "alpha"))
functions("index_add", [torch.index_copy] + _ov(aten.index_copy, "default") + _ov(aten.index_copy_, "default"),
          ("input", "dim", "index", "source"))
methods("index_add", ["index_copy", "index_copy_"], ("input", "dim", "index", "source"))


@rule("select")
def select(ctx: Ctx, input, dim, index, meta=None, **_):
    """x.select(dim, i): the axis is removed; if it holds channels they are pinned (one is read), the rest pass."""
    x = input
    d = _ax(dim, x.ndim)
    if x.shape[d] > 1:
        ctx.pin(x.ids[d], "indexes a single channel")
    return AxisLabels(x.ids[:d] + x.ids[d + 1:], x.zero[:d] + x.zero[d + 1:])


functions("select", [torch.select] + _ov(aten.select, "int"), ("input", "dim", "index"))
methods("select", ["select"], ("input", "dim", "index"))


@rule("index_select", keeps_axes=True)
def index_select(ctx: Ctx, input, dim, index, meta=None, **_):
    """x.index_select(dim, idx): entries of that axis are read by data (pinned: which ones stay is not known); the other axes keep their ids and zeros."""
    x = input
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "gathered along this axis by an index tensor")
    shape = _out_shape(meta)
    ids = tuple(x.ids[a] if a != d else pinned_axis(shape[a]) for a in range(x.ndim))
    zero = tuple(x.zero[a] if a != d else false_mask(shape[a]) for a in range(x.ndim))
    return AxisLabels(ids, zero)


functions("index_select", [torch.index_select] + _ov(aten.index_select, "default"), ("input", "dim", "index"))
methods("index_select", ["index_select"], ("input", "dim", "index"))


@rule("roll")
def roll(ctx: Ctx, input, shifts, dims=None, meta=None, **_):
    """roll along dims: rolled axes are pinned (positions move), the others keep their ids."""
    x = input
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        ctx.pin(x, "roll of the flattened tensor")
        return ctx.pinned_lab(x.shape)
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = {_ax(d, x.ndim) for d in dims}
    return _passthrough(ctx, x, x.shape, {d: d for d in range(x.ndim) if d not in rolled})


functions("roll", [torch.roll] + _ov(aten.roll, "default"), ("input", "shifts", "dims"))
methods("roll", ["roll"], ("input", "shifts", "dims"))


_COPIES = ("contiguous", "clone", "to", "_to_copy", "alias", "detach", "type_as")


def _constant_along(node, axis: int, depth: int = 8) -> bool:
    """Whether ``node``'s value is the same at every index of ``axis`` by construction (an expand of a
    size-1 or new axis, through copies)."""
    import torch.fx as fx

    if not isinstance(node, fx.Node) or depth == 0 or node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.split(".")[0]
    src = node.args[0] if node.args else None
    if name in _COPIES:
        return _constant_along(src, axis, depth - 1)
    if name == "expand" and isinstance(src, fx.Node):
        out, inp = node.meta.get("val"), src.meta.get("val")
        if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
            return False
        a = axis - (out.dim() - inp.dim())
        return a < 0 or (inp.shape[a] == 1 and out.shape[axis] != 1) or _constant_along(src, a, depth - 1)
    return False


def _gather_fix(site, input, dim, index, **_):
    """Narrow an index that is constant along an axis the input lost rows on."""
    old, new = site.old(input), site.new(input)
    lab = site._lab(index)
    if old is None or new is None or lab is None or old == new:
        return
    d = _ax(dim, len(old))
    graph = site.node.graph
    src = site.node.args[0] if site.node.args else site.node.kwargs["input"]
    for a in range(len(old)):
        if a != d and new[a] != old[a] and lab.shape[a] == old[a]:
            # NB: the input's size read at run time, not the literal: the axis may also hold the batch
            with graph.inserting_before(site.node):
                n = graph.call_function(aten.sym_size.int, (src, a))
                index = graph.call_function(aten.narrow.default, (index, a, 0, n))
    site.set("index", index)


@rule("gather", fix=_gather_fix, keeps_axes=True)
def gather(ctx: Ctx, input, dim, index, meta=None, **_):
    """out[.., i, ..] = x[.., i, .., idx[.., i, ..] along dim]: the gathered axis is pinned (its positions are data); every other axis of x passes to out (zero stays zero), tied to the index's axis, or kept free when the index is an expand constant along it."""
    x, idx = input, index
    shape = _out_shape(meta)
    if not isinstance(x, AxisLabels) or not isinstance(idx, AxisLabels) or x.ndim != len(shape):
        ctx.pin([v for v in (x, idx) if isinstance(v, AxisLabels)], "gather not understood")
        return ctx.pinned_lab(shape)
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "gathered along this axis by an index tensor")
    node_idx = ctx.node.args[2] if ctx.node is not None and len(ctx.node.args) > 2 else ctx.node.kwargs.get("index")
    ids, zero = [], []
    for a, n in enumerate(shape):
        live = a != d and x.shape[a] == n
        if live and not (ctx.uf.find(idx.ids[a]) != 0).any() and not _constant_along(node_idx, a):
            ctx.pin(x.ids[a], "the gather index does not follow this axis")
            live = False
        if not live:
            if a != d:
                ctx.pin(x.ids[a], "gathered over part of this axis")
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
            continue
        ctx.tie(x.ids[a], idx.ids[a]) if (ctx.uf.find(idx.ids[a]) != 0).any() else None
        ids.append(x.ids[a])
        zero.append(x.zero[a])
    return AxisLabels(tuple(ids), tuple(zero))


functions("gather", [torch.gather] + _ov(aten.gather, "default"), ("input", "dim", "index"))
methods("gather", ["gather"], ("input", "dim", "index"))


@rule("take_along_dim", keeps_axes=True)
def take_along_dim(ctx: Ctx, input, indices, dim=None, meta=None, **_):
    """x.take_along_dim(idx, dim) (CLIP's end-of-text pooling, idx of size 1 off dim): the gathered axis is pinned (its positions are data); an axis the index broadcasts over (size 1) passes with its ids and zeros; one the index spans is pinned."""
    x, idx = input, indices
    shape = _out_shape(meta)
    if dim is None or not isinstance(x, AxisLabels) or not isinstance(idx, AxisLabels) or \
            x.ndim != len(shape) or idx.ndim != x.ndim:
        ctx.pin([v for v in (x, idx) if isinstance(v, AxisLabels)], "take_along_dim over the flattened tensor")
        return ctx.pinned_lab(shape)
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "gathered along this axis by an index tensor")
    ctx.pin(idx, "used as an index")
    ids, zero = [], []
    for a, n in enumerate(shape):
        if a != d and idx.shape[a] == 1 and x.shape[a] == n:
            ids.append(x.ids[a])
            zero.append(x.zero[a])
            continue
        if a != d:
            ctx.pin(x.ids[a], "the index spans this axis")
        ids.append(pinned_axis(n))
        zero.append(false_mask(n))
    return AxisLabels(tuple(ids), tuple(zero))


functions("take_along_dim", [torch.take_along_dim] + _ov(aten.take_along_dim, "default"), ("input", "indices", "dim"))
methods("take_along_dim", ["take_along_dim"], ("input", "indices", "dim"))
