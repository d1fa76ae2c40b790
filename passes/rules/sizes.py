"""Sizes and metadata: ``x.size()``/``x.shape``, ``x.dim()``, ``x.numel()``, Python arithmetic on sizes,
runtime metadata checks, and ``arange`` over constant bounds.

A number read off a tensor's shape remembers which axes it measures (``SymSize``): a rule that
takes sizes (``Rule.takes_sizes``: reshape, expand...) keeps it consistent, and any other use of
the number pins those axes, since pruning would change the value.
"""
from __future__ import annotations

import math
import operator

import numpy as np

import torch

import torch.fx as fx

from ..channels import AxisLabels, Ctx, SymSize, false_mask, pinned_axis
from ..registry import functions, methods, rule
from .common import _ax, _ov, _out_shape
from .elementwise import _positive

aten = torch.ops.aten


@rule("size", takes_sizes=True)
def size(ctx: Ctx, input, dim=None, meta=None, **_):
    """x.size()/x.shape: the numbers remember which axes they measure, so that an unknown use pins them."""
    x = input
    if dim is None:
        return tuple(SymSize(n, (x.ids[d],)) for d, n in enumerate(x.shape))
    d = _ax(dim, x.ndim)
    return SymSize(x.shape[d], (x.ids[d],))


methods("size", ["size"], ("input", "dim"))
functions("size", _ov(aten.sym_size, "int"))


@rule("ndim")
def ndim(ctx: Ctx, input, meta=None, **_):
    """x.dim(): the rank, which pruning never changes."""
    return meta


methods("ndim", ["dim", "ndimension"], ("input",))
functions("ndim", _ov(aten.dim, "default"))


@rule("numel", takes_sizes=True)
def numel(ctx: Ctx, input, meta=None, **_):
    """x.numel(): a number that measures every axis."""
    return SymSize(math.prod(input.shape), tuple(input.ids))


methods("numel", ["numel"], ("input",))
functions("numel", [torch.numel], ("input",))


@rule("arith", takes_sizes=True, python_values=True)
def arith(ctx: Ctx, input=None, other=None, kind="", meta=None, **_):
    """python arithmetic on sizes: the result measures what its operands measured."""
    if isinstance(input, AxisLabels) or isinstance(other, AxisLabels):  # -x, x ** 2, x // 2 on tensors
        ctx.pin([v for v in (input, other) if isinstance(v, SymSize)], "a size read off this axis is used as a value")
        if isinstance(input, AxisLabels) and not isinstance(other, AxisLabels):
            keeps_zero = kind in ("neg", "floordiv", "mod") or (
                kind == "pow" and isinstance(other, (int, float)) and other > 0)
            if kind == "pow" and isinstance(other, (int, float)) and other < 0 and not _positive(
                    ctx.node.args[0] if ctx.node is not None and ctx.node.args else None):
                # NB: x ** -0.5 is rsqrt: infinite on a zero channel, as the singular rule says
                ctx.pin(input, "x ** p with p < 0 is singular at x = 0 and x is not positive by construction")
            if isinstance(other, SymSize):  # NB: x // T with T read off a shape: no constant at other sizes
                input = AxisLabels(input.ids, input.zero)
            return input if keeps_zero else AxisLabels(input.ids, tuple(false_mask(len(a)) for a in input.ids))
        ctx.pin([v for v in (input, other) if isinstance(v, AxisLabels)], f"tensor {kind} by a tensor")
        return ctx.pinned_lab(_out_shape(meta))
    ids = tuple(a for v in (input, other) if isinstance(v, SymSize) for a in v.ids)
    return SymSize(None, ids)


for _kind in ("floordiv", "mod", "neg", "pow"):
    functions("arith", [getattr(operator, _kind)], ("input", "other"), kind=_kind)
functions("arith", [torch.pow] + _ov(aten.pow, "Tensor_Scalar"), ("input", "other"), rename={"exponent": "other"},
          kind="pow")
methods("arith", ["pow"], ("input", "other"), kind="pow")

@rule("check")
def check(ctx: Ctx, input=None, meta=None, **_):
    """runtime assertions on a tensor's metadata (dtype, device, shape): no value, no channel effect."""
    return None


functions("check", _ov(aten._assert_tensor_metadata, "default"), rename={"a": "input"})


def _arange_fix(site, **_):
    """An arange that lost entries (per-head ALiBi slopes computed from ``arange(1, H + 1)``) keeps
    the kept ones: the node becomes ``index_select`` of the full arange at the kept positions."""
    old, new = site.out_old, site.out_new
    if old is None or new == old:
        return
    node = site.node
    kept = [int(i) for i in np.flatnonzero(site.keep(node, 0))]
    graph = node.graph
    with graph.inserting_before(node):
        full = graph.call_function(node.target, node.args, dict(node.kwargs))
        dev = graph.call_function(getattr, (full, "device"))
        idx = graph.call_function(torch.tensor, (kept,), {"dtype": torch.long, "device": dev})
    node.target, node.args, node.kwargs = aten.index_select.default, (full, 0, idx), {}


@rule("arange", fix=_arange_fix, takes_sizes=True, python_values=True)
def arange(ctx: Ctx, meta=None, **kw):
    """arange over constant bounds: each entry is a channel of its own (a per-head constant such as an ALiBi slope is removed with its head), not zero; bounds read off an axis pin it and the output."""
    n = int(meta.shape[0])
    syms = [v for v in kw.values() if isinstance(v, SymSize)]
    if syms or any(isinstance(v, (AxisLabels, fx.Node)) for v in kw.values()):
        # NB: arange(L) of a size would give other values once the axis loses rows, not the kept ones
        ctx.pin(syms, "a size read off this axis is used as a value")
        return AxisLabels((pinned_axis(n),), (false_mask(n),))
    return AxisLabels((ctx.fresh(n),), (false_mask(n),))


functions("arange", [torch.arange] + _ov(aten.arange, "default", "start", "start_step"), ("start", "end", "step"))
