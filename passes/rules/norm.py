"""Normalisation layers: batch and instance norm, group norm, layer norm and RMSNorm.

Per-channel statistics (batch, instance, group norm over axis 1) are owned by their channel; a
norm whose divisor counts channels (group norm's groups, a layer norm over several axes) ties or
pins them, since removing a channel would change the divisor. Layer and RMS norms over one last
axis are the exception: a zero channel adds nothing to the sums of values and squares, so channels
that are zero with their rows stay rows and the rewrite keeps the old divisor
(``layer_norm_kept_divisor``, ``rms_norm_kept_divisor``; the module form swaps in
``PrunedLayerNorm``, or refolds an RMS norm's eps and weight). A layer norm also keeps channels
that are a constant other than 0 with their rows (MLP-Mixer's stream after a token MLP's biases):
the rewrite fills their values back into the mean and variance (``fill``, read off a run of the
model by ``passes.prune.constant_fills``). A batch norm by the statistics of the batch over a last
axis of constants (weight standardisation: ``batch_norm(w.reshape(1, out, -1), None, None,
training=True)``, the conv's input channels in blocks of kh*kw) leaves that axis to the rewrite:
``batch_norm_kept_divisor`` keeps the old count and the removed entries' moments per channel (the
module form swaps in ``PrunedStdConv2d`` for timm's weight-standardised convs).

Internals:
    * A norm without affine parameters maps a zero channel to a non-zero one (-mean / sqrt(var)
      for batch norm's running statistics): its output is zero with its row only when affine.
    * A layer norm's removed channel gives ``(0 - mean) / std * w + b``: zero when its weight and
      bias entries are (they are in its row); without a weight it is not, and the axis is pinned.
    * A filled norm (``ctx.fills``: node -> mask of the constant channels) compressed again appends
      the values of the channels removed then to its ``fill`` buffer (``_fill_argument``); its first
      width stays the divisor. An RMS norm's constants are not filled (pinned as before).
    * A batch norm's removed entries are reduced to their mean and variance per channel (``fill``,
      ``[2, C]``, a buffer sliced with the channels: ``_moments_argument``), pooled with those an
      earlier compression removed; none when they were zeros. Only functional calls (``F.batch_norm``,
      ``aten.batch_norm``) without running statistics qualify (``batch_stats``): instance norm's
      statistics are per sample.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..modules import (batch_norm_kept_divisor, group_norm_kept_divisor, grow_fill, layer_norm_kept_divisor,
                       pool_moments, removed_moments)
from ..nodes import WEIGHTLESS_READ, get_path, read_as_stream_or_input, set_path
from ..channels import PINNED, Ctx, ParamRef, SymSize, false_mask, true_mask
from ..registry import CONTIGUOUS_OUT, KEEPS_CONTIGUOUS, functions, modules, rule
from .common import _ov, _out_shape, _passthrough, _plus_constant

aten = torch.ops.aten


def _norm_fix(site, input=None, weight=None, bias=None, running_mean=None, running_var=None, momentum=0.0,
              eps=1e-5, old=None, fill=None, batch_stats=False, **_):
    m = site.module
    if m is not None:
        m.num_features = site.new(input)[1]
        return
    was, now = site.old(input), site.new(input)
    if not batch_stats or was is None or now is None or len(was) < 3 or was[-1] == now[-1]:
        return
    # NB: the last axis lost entries (a weight-standardised conv's input channels): the statistics keep
    # the old count and the removed entries' moments; a kept-divisor call compressed again keeps its first width
    first = old or was[-1]
    extra = _moments_argument(site, input, fill, first, was[-1], now[-1])
    site.replace_call(batch_norm_kept_divisor, (input, None, None, weight, bias, True, momentum, eps),
                      {"old": first, "new": now[-1], **extra})


def _moments_argument(site, input, fill, first: int, was: int, now: int) -> dict:
    """``{"fill": get_attr node}`` of a batch-statistics norm whose last axis goes from ``was`` to
    ``now`` entries (``first`` at its first compression): the removed entries' moments per kept
    channel (the values ``site.fills`` read off a run of the model), pooled with those an earlier
    compression removed (the buffer ``fill`` already names, sliced to the kept channels), as one
    buffer of the new graph; empty when every removed entry was zero."""
    prior = get_path(site.root, fill.target) if isinstance(fill, fx.Node) and fill.op == "get_attr" else None
    values = site.fills.get(site.node.name)
    keep = np.nonzero(site.keep(input, 1))[0]
    moments = None if values is None else removed_moments(values, site.old(input)[1], keep)
    return _fill_buffer(site, fill, pool_moments(prior, first - was, moments, was - now))


def _fill_buffer(site, fill, grown) -> dict:
    """``{"fill": get_attr node}`` holding ``grown`` (a norm's constants of removed entries): in the
    buffer ``fill`` already names (it keeps its name), else in a new buffer of the graph; empty when
    ``grown`` is None (every removed entry was zero)."""
    if grown is None:
        return {}
    if isinstance(fill, fx.Node) and fill.op == "get_attr":
        set_path(site.root, fill.target, grown)
        return {"fill": fill}
    name = f"{site.node.name}_fill"
    while hasattr(site.root, name):
        name += "_"
    site.root.register_buffer(name, grown)
    with site.node.graph.inserting_before(site.node):
        return {"fill": site.node.graph.get_attr(name)}


@rule("batch_norm", fix=_norm_fix, reads_params=True, keeps_shape=KEEPS_CONTIGUOUS, keeps_axes=True)
def batch_norm(ctx: Ctx, input, weight=None, bias=None, running_mean=None, running_var=None, training=False,
               fill=None, batch_stats=False, meta=None, **_):
    """per channel (axis 1): weight, bias and running statistics are owned by the input channel; out is zero with its row when affine; statistics of the batch (training, or no running statistics) average over every other axis, which is pinned, except a last axis whose entries are constants (weight standardisation's batch_norm(w.reshape(1, out, -1)): a conv's input channels, in blocks of kh*kw), whose removal the rewrite makes up for with the old count and the removed entries' moments."""
    x = input
    if training or running_mean is None:
        # NB: BiT's and NF-nets' weight standardisation: batch_norm(weight.reshape(1, out, -1), training=True)
        # averages over the conv's input channels, whose columns are constants read at compression
        # (``ctx.fills``); any other axis (the batch of activations) is pinned
        free = x.ndim - 1 if (batch_stats and running_mean is None and running_var is None and x.ndim >= 3
                              and x.fixed(x.ndim - 1).all()) else None
        for d in range(x.ndim):
            if d != 1 and d != free:
                ctx.pin(x.ids[d], "batch-norm statistics average over this axis")
        if free is not None and ctx.node is not None:
            ctx.fills[ctx.node.name] = true_mask(x.shape[free])
    c = x.ids[1]
    if fill is not None:  # a compressed norm's removed entries' moments: per channel, sliced with it
        ctx.param(fill, {0: PINNED, 1: c})
    w, b = [ctx.param(p, {0: c}) for p in (weight, bias)]
    for p in (running_mean, running_var):
        ctx.param(p, {0: c})
    # NB: zero with its row when the weight and bias entries are: parameters in the row, not the buffers
    # of torchvision's FrozenBatchNorm2d (no training zeroes them; its channel gives b - mean * w / std)
    z = w.zero[0] & (b.zero[0] if b is not None else true_mask(len(c))) if w is not None else false_mask(len(c))
    # NB: a zero entry of any other axis comes out as b - mean * w / std, not zero
    x = _plus_constant(x)
    return x.with_axis(1, c, z)


def _bn_module(node, m, args, kwargs):
    t = node.target
    ref = lambda n: ParamRef(f"{t}.{n}") if getattr(m, n, None) is not None else None  # noqa: E731
    return dict(input=args[0], weight=ref("weight"), bias=ref("bias"),
                running_mean=ref("running_mean"), running_var=ref("running_var"),
                training=m.training or getattr(m, "running_mean", None) is None)


# instance norm follows batch norm's algebra (per-channel affine and statistics): op instance_norm
modules("batch_norm", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                       nn.InstanceNorm3d], _bn_module)
modules("batch_norm", [nn.SyncBatchNorm], _bn_module, op="batch_norm")
# NB: batch_stats: the rewrite may narrow the last axis of a batch-statistics call (instance norm's
# statistics are per sample; a module's forward is its own)
functions("batch_norm", [F.batch_norm, batch_norm_kept_divisor] + _ov(aten.batch_norm, "default"), batch_stats=True)
functions("batch_norm", [F.instance_norm])
functions("batch_norm", _ov(aten._native_batch_norm_legit_no_training, "default"), op="batch_norm")

try:  # torchvision's FrozenBatchNorm2d (detection backbones): batch norm in eval mode, its tensors buffers
    from torchvision.ops import FrozenBatchNorm2d

    def _frozen_bn_module(node, m, args, kwargs):
        # NB: traced through, its buffers' arithmetic would be folded into unnamed constants
        return {**_bn_module(node, m, args, kwargs), "training": False}

    modules("batch_norm", [FrozenBatchNorm2d], _frozen_bn_module, op="batch_norm")
except ImportError:  # pragma: no cover - torchvision is optional
    pass


def _group_norm_fix(site, input, num_groups, weight=None, bias=None, eps=1e-5, old=None, **_):
    old_c, new_c = site.old(input)[1], site.new(input)[1]
    if old_c == new_c:
        return
    m = site.module
    if int(num_groups) == 1:
        # NB: single channels went (zero ones): the graph keeps the old divisor; a compressed graph's
        # norm (already a kept-divisor call) compressed again keeps its first width
        first = old
        tensors, src = {"weight": weight, "bias": bias}, input
        if m is not None:
            m.num_channels = new_c
            g = site.node.graph
            with g.inserting_before(site.node):
                tensors = {k: g.get_attr(f"{site.node.target}.{k}") if getattr(m, k, None) is not None else None
                           for k in ("weight", "bias")}
            eps = m.eps
            src = site.node.args[0] if site.node.args else site.node.kwargs["input"]
        site.replace_call(group_norm_kept_divisor, (src, 1, tensors["weight"], tensors["bias"], eps),
                          {"old": first or old_c, "new": new_c})
        return
    new_g = num_groups * new_c // old_c
    if m is not None:
        m.num_channels, m.num_groups = new_c, new_g
    elif new_g != num_groups:
        site.set("num_groups", new_g)


@rule("group_norm", fix=_group_norm_fix, reads_params=True, keeps_shape=KEEPS_CONTIGUOUS, keeps_axes=True)
def group_norm(ctx: Ctx, input, num_groups, weight=None, bias=None, meta=None, **_):
    """channels of one norm group are normalised together, so each group of C/G channels is one row; with one group (GroupNorm(1, C), MetaFormer's) whose channels are zero with their rows and an affine weight, each channel is a row and the rewrite keeps the old divisor; affine parameters are owned per channel."""
    x = input
    c = x.ids[1]
    # NB: without a weight a removed channel's output is -mean / std, not zero: its group stays one row
    if int(num_groups) != 1 or weight is None or not x.zero[1].all():
        grouped = c.reshape(int(num_groups), -1)
        ctx.tie(grouped, grouped[:, :1])
    ctx.param(weight, {0: c})
    ctx.param(bias, {0: c})
    z = true_mask(len(c)) if weight is not None else x.zero[1]
    if bias is not None:  # NB: a zero entry of any other axis comes out as the bias
        x = _plus_constant(x)
    return x.with_axis(1, c, z)


modules("group_norm", [nn.GroupNorm], lambda node, m, args, kwargs: dict(
    input=args[0], num_groups=m.num_groups,
    weight=ParamRef(f"{node.target}.weight") if m.weight is not None else None,
    bias=ParamRef(f"{node.target}.bias") if m.bias is not None else None))
functions("group_norm", [F.group_norm, group_norm_kept_divisor] + _ov(aten.group_norm, "default"))


def _narrowed_norm_fix(kept, names: tuple):
    """The fix of a norm over a last axis that lost entries: the call becomes ``kept`` (a
    ``*_kept_divisor`` function: the old width's divisor) with ``names`` (its affine tensors)."""

    def fix(site, input, normalized_shape, weight=None, bias=None, eps=None, old=None, fill=None, **_):
        # NB: a compressed graph's norm (already a kept-divisor call) compressed again keeps its first width
        first = old
        old, new = site.old(input), site.new(input)
        if old is None or new is None or old[-1] == new[-1]:
            return
        extra = _fill_argument(site, fill, old[-1] - new[-1]) if "fill" in names else {}
        affine = tuple(k for k in names if k != "fill")
        shape = [new[-1]]
        tensors = {"weight": weight, "bias": bias}
        src = input
        if site.module is not None:
            m = site.module
            m.normalized_shape = tuple(shape)
            g = site.node.graph
            with g.inserting_before(site.node):
                tensors = {k: g.get_attr(f"{site.node.target}.{k}") if getattr(m, k, None) is not None else None
                           for k in affine}
            eps = m.eps
            src = site.node.args[0] if site.node.args else site.node.kwargs["input"]
        site.replace_call(kept, (src, shape, *(tensors[k] for k in affine), eps),
                          {"old": first or old[-1], "new": new[-1], **extra})

    return fix


def _fill_argument(site, fill, count: int) -> dict:
    """``{"fill": get_attr node}`` of a layer norm losing ``count`` entries: the constants they held
    (``site.fills``, read off a run of the model) after those an earlier compression removed (the
    buffer ``fill`` already names), as one buffer of the new graph; empty when all were zeros."""
    prior = get_path(site.root, fill.target) if isinstance(fill, fx.Node) and fill.op == "get_attr" else None
    return _fill_buffer(site, fill, grow_fill(prior, site.fills.get(site.node.name), count))


def _pin_normalised(ctx: Ctx, x, k: int, weight, bias, meta):
    for d in range(x.ndim - k, x.ndim):
        ctx.pin(x.ids[d], f"{ctx.op} normalises over this axis")
    for p in (weight, bias):
        if p is not None:
            ctx.param(p, {d: PINNED for d in range(len(ctx.shape_of(p)))})
    shape = _out_shape(meta)
    lab = _passthrough(ctx, x, shape, {d: d for d in range(x.ndim - k)}, handled=tuple(range(x.ndim - k, x.ndim)))
    return _plus_constant(lab) if bias is not None else lab


def _last_axis_rows(ctx: Ctx, x, normalized_shape, weight, bias, meta, centred: bool, fills: bool = False):
    """A norm over one last axis whose channels are zero with their rows: each channel is a row (its
    weight and bias entries with it), the rewrite keeping the old divisor; with ``fills``, channels
    that are a constant other than 0 are rows too, the rewrite filling their values back in
    (``ctx.fills``); otherwise (several axes, a size read off the axis as a value) the normalised axes
    are pinned. ``centred`` (a layer norm): without a weight, a removed channel's output is
    ``-mean / std``, not zero, which its readers must cancel (their labels say whether they do)."""
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
    syms = [v for v in shape if isinstance(v, SymSize)]
    ids = x.ids[-1]
    known = x.fixed(-1) if fills else x.zero[-1]
    # NB: a width read off the shapes (symbolic_trace's ``weight.shape``) must measure this axis
    if (len(shape) != 1 or not known.all()
            or any(len(v.ids) != 1 or len(v.ids[0]) != len(ids) for v in syms)):
        ctx.pin(syms, "a size read off this axis is used as a value")
        return _pin_normalised(ctx, x, len(shape), weight, bias, meta)
    if fills and not x.zero[-1].all() and ctx.node is not None:
        ctx.fills[ctx.node.name] = ~x.zero[-1]
    if not centred and weight is None and ctx.node is not None and not read_as_stream_or_input(ctx.node):
        # NB: as a written-out norm's (rules.reduction): with no weight to refold, the own class
        # scales the layers around the norm, which needs its output read by linear layers and sums
        ctx.pin_unless_blocks(ids, WEIGHTLESS_READ)
    for v in syms:
        ctx.tie(v.ids[0], ids)
    for p in (weight, bias):
        if p is not None:
            ctx.param(p, {0: ids})
    z = true_mask(len(ids)) if weight is not None else false_mask(len(ids)) if centred else x.zero[-1]
    if bias is not None:  # NB: a zero token (every entry of the normalised axis 0) comes out as the bias
        x = _plus_constant(x)
    return x.with_axis(x.ndim - 1, ids, z)


@rule("layer_norm", fix=_narrowed_norm_fix(layer_norm_kept_divisor, ("weight", "bias", "fill")), reads_params=True,
      takes_sizes=True, keeps_shape=CONTIGUOUS_OUT, keeps_axes=True)
def layer_norm(ctx: Ctx, input, normalized_shape, weight=None, bias=None, eps=1e-5, fill=None, meta=None, **_):
    """over one last axis whose channels are zero with their rows: each channel is a row (its weight and bias entries with it) and the rewrite keeps the old divisor of the mean and variance; a channel that is a constant other than 0 (MLP-Mixer's token MLP writes its biases into a zero channel) is a row too, its values filled back into the mean and variance; without a weight a removed channel's output is -mean / std, not zero (its readers must cancel it); any other normalised axis is pinned (the divisor counts every channel)."""
    if fill is not None:  # a compressed norm's constant channels (a buffer: no channel of its own)
        ctx.param(fill, {d: PINNED for d in range(len(ctx.shape_of(fill)))})
    return _last_axis_rows(ctx, input, normalized_shape, weight, bias, meta, centred=True, fills=True)


def _ln_module(node, m, args, kwargs):
    t = node.target
    return dict(input=args[0], normalized_shape=tuple(m.normalized_shape),
                weight=ParamRef(f"{t}.weight") if getattr(m, "weight", None) is not None else None,
                bias=ParamRef(f"{t}.bias") if getattr(m, "bias", None) is not None else None)


modules("layer_norm", [nn.LayerNorm], _ln_module)
functions("layer_norm", [F.layer_norm, layer_norm_kept_divisor] + _ov(aten.layer_norm, "default"))


def rms_norm_kept_divisor(input, normalized_shape, weight=None, eps=None, old: int = 1, new: int = 1):
    """``F.rms_norm`` over a last axis narrowed from ``old`` to ``new`` entries whose removed entries
    were zero: the values the norm gave at ``old`` (the compressed graph's form of an RMS norm)."""
    # NB: rms(c * x) over new entries with c**2 = new / old is rms(x) over old ones, whatever eps is
    # (None: the dtype's epsilon), so scaling in and out keeps torch's own kernel
    c = math.sqrt(new / old)
    return F.rms_norm(input * c, normalized_shape, weight, eps) / c


_rms_norm_fix = _narrowed_norm_fix(rms_norm_kept_divisor, ("weight",))


@rule("rms_norm", fix=_rms_norm_fix, reads_params=True, takes_sizes=True, keeps_shape=CONTIGUOUS_OUT,
      keeps_axes=True)
def rms_norm(ctx: Ctx, input, normalized_shape, weight=None, eps=None, meta=None, **_):
    """over one last axis whose channels are zero with their rows: each channel is a row (its weight entry with it) and the rewrite keeps the old divisor; any other normalised axis is pinned, as layer_norm's."""
    return _last_axis_rows(ctx, input, normalized_shape, weight, None, meta, centred=False)


modules("rms_norm", [getattr(nn, "RMSNorm", None)], _ln_module)
functions("rms_norm", [getattr(F, "rms_norm", None), rms_norm_kept_divisor] + _ov(getattr(aten, "rms_norm", None), "default"))
