"""Spatial ops: pooling, resampling (interpolation, grid sampling), padding and sliding windows. Batch
and channel axes pass pooling and resampling; spatial axes are not channels. Padding keeps every
axis's entries in order and adds constants at its ends, on whatever axis it pads. ``F.unfold``
(im2col) turns each channel into the block of its kernel positions and ``F.fold`` sums each block
back into its channel; ``Tensor.unfold`` cuts windows out of one axis.

Internals:
    * ``nsp`` (1, 2 or 3, declared per form) is how many trailing axes are spatial; ``pool``
      also covers the (values, indices) pair of the ``*_with_indices`` forms.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..channels import AxisLabels, Ctx, false_mask, pinned_axis, true_mask
from ..registry import RuleDeclined, functions, methods, modules, rule
from .common import _bind_input, _ov, _out_shape, _passthrough

aten = torch.ops.aten


@rule("pool")
def pool(ctx: Ctx, input, nsp=2, meta=None, **_):
    """per channel over the trailing spatial axes (pooling, resampling): leading axes keep their ids, spatial axes are pinned."""
    x = input
    outs = meta if isinstance(meta, (tuple, list)) else (meta,)
    labs = []
    for o in outs:
        shape = _out_shape(o)
        keep = {d: d for d in range(len(shape) - nsp)}
        labs.append(_passthrough(ctx, x, shape, keep))
    return tuple(labs) if isinstance(meta, (tuple, list)) else labs[0]


for _n in (1, 2, 3):
    _pools = [f"max_pool{_n}d", f"avg_pool{_n}d", f"adaptive_max_pool{_n}d", f"adaptive_avg_pool{_n}d",
              f"lp_pool{_n}d", f"max_pool{_n}d_with_indices", f"adaptive_max_pool{_n}d_with_indices",
              f"fractional_max_pool{_n}d"]
    _t = [getattr(F, p, None) for p in _pools] + [getattr(torch, p, None) for p in _pools]
    _t += [o for p in _pools if hasattr(aten, p) for o in _ov(getattr(aten, p), "default")]
    functions("pool", _t, ("input",), nsp=_n)
    modules("pool", [getattr(nn, c, None) for c in (f"MaxPool{_n}d", f"AvgPool{_n}d", f"AdaptiveMaxPool{_n}d",
                                                      f"AdaptiveAvgPool{_n}d", f"LPPool{_n}d", f"FractionalMaxPool{_n}d")],
            _bind_input, nsp=_n)


@rule("resample")
def resample(ctx: Ctx, input, meta=None, **_):
    """interpolation over every axis after the channel axis: batch and channel keep their ids, spatial axes are pinned."""
    return _passthrough(ctx, input, _out_shape(meta), {0: 0, 1: 1})


functions("resample", [F.interpolate, getattr(F, "upsample", None), getattr(F, "upsample_nearest", None),
                       getattr(F, "upsample_bilinear", None)]
          + [o for p in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
                         "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d",
                         "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
                         # F.interpolate(antialias=True) under torch.export (timm's resample_abs_pos_embed)
                         "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "_upsample_lanczos2d_aa")
             if hasattr(aten, p) for o in _ov(getattr(aten, p), "default", "vec")], ("input",))
modules("resample", [nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], _bind_input)


@rule("grid_sample")
def grid_sample(ctx: Ctx, input, grid, meta=None, **_):
    """out[n, c] = input[n, c] sampled at the points grid[n] (nearest, bilinear or bicubic, any padding mode): the channel axis keeps its ids and zeros; the grid's values are coordinates (every axis pinned, the batch axis it shares with the input too); the sampled spatial axes are pinned."""
    x = input
    if not isinstance(x, AxisLabels) or x.ndim < 3:
        raise RuleDeclined("grid sample of an input without (N, C, spatial) axes")
    if isinstance(grid, AxisLabels):
        # NB: input n is sampled at grid n: removing a batch entry would need the grid's too
        if grid.shape[0] == x.shape[0]:
            ctx.tie(grid.ids[0], x.ids[0])
        ctx.pin(grid, "grid sample reads these values as sampling coordinates")
    return _passthrough(ctx, x, _out_shape(meta), {0: 0, 1: 1})


functions("grid_sample", [F.grid_sample], ("input", "grid"))
functions("grid_sample", [getattr(torch, n, None) for n in ("grid_sampler", "grid_sampler_2d", "grid_sampler_3d")]
          + [o for p in ("grid_sampler", "grid_sampler_2d", "grid_sampler_3d", "cudnn_grid_sampler",
                         "_grid_sampler_2d_cpu_fallback") if hasattr(aten, p) for o in _ov(getattr(aten, p), "default")],
          ("input", "grid"))


@rule("pad", keeps_axes=True)
def pad(ctx: Ctx, input, pad=(), mode="constant", value=None, meta=None, **_):
    """F.pad: a constant pad adds pinned entries at an axis's ends, the others keep their ids and zeros; reflect/replicate/circular pads (copies of edge entries), crops and widths computed at run time pin the axis."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    widths = list(pad) if isinstance(pad, (tuple, list)) else []
    if len(widths) % 2 or len(widths) > 2 * x.ndim:
        raise RuleDeclined("pad widths are not a list in pairs")
    shape = _out_shape(meta)
    ids, zero = list(x.ids), list(x.zero)
    for k in range(len(widths) // 2):
        d, lo, hi = x.ndim - 1 - k, widths[2 * k], widths[2 * k + 1]
        if lo == hi == 0:
            continue
        if not (isinstance(lo, int) and isinstance(hi, int)):  # a width computed at run time (a sequence to whole chunks)
            ctx.pin(x.ids[d], "padded by a width computed at run time")
            ids[d], zero[d] = pinned_axis(shape[d]), false_mask(shape[d])
            continue
        if mode != "constant" or lo < 0 or hi < 0:
            ctx.pin(x.ids[d], f"{mode} padding copies or crops entries along this axis")
            ids[d], zero[d] = pinned_axis(shape[d]), false_mask(shape[d])
            continue
        ids[d] = np.concatenate([pinned_axis(lo), x.ids[d], pinned_axis(hi)])
        zero[d] = np.concatenate([false_mask(lo), x.zero[d], false_mask(hi)])
    return AxisLabels(tuple(ids), tuple(zero))


functions("pad", [F.pad] + _ov(aten.pad, "default"), ("input", "pad", "mode", "value"))
functions("pad", _ov(aten.constant_pad_nd, "default"), ("input", "pad", "value"))


def _batched(x: AxisLabels, spatial_in: int):
    """``(batch ids, batch zero)`` of an (N, C, *spatial) input, or empties for an unbatched (C, *spatial) one."""
    if x.ndim == spatial_in + 2:
        return [x.ids[0]], [x.zero[0]], 1
    if x.ndim == spatial_in + 1:
        return [], [], 0
    raise RuleDeclined(f"an input of {x.ndim} axes")


@rule("im2col")
def im2col(ctx: Ctx, input, meta=None, **_):
    """F.unfold / nn.Unfold: (N, C, H, W) -> (N, C * kh * kw, L): channel c becomes the block of its kh * kw kernel positions (c-major), zero with it (padding adds zeros); the batch axis keeps its ids; the window axis L is pinned."""
    x = input
    if not isinstance(x, AxisLabels):
        raise RuleDeclined("unfold of a non-tensor")
    ids, zero, c = _batched(x, 2)
    shape = _out_shape(meta)
    k, rem = divmod(shape[c], len(x.ids[c]))
    if rem:
        raise RuleDeclined("unfolded channels are not whole blocks of the input's")
    ids += [np.repeat(x.ids[c], k), pinned_axis(shape[c + 1])]
    zero += [np.repeat(x.zero[c], k), false_mask(shape[c + 1])]
    return AxisLabels(tuple(ids), tuple(zero))


functions("im2col", [F.unfold] + _ov(aten.im2col, "default"), ("input",))
modules("im2col", [nn.Unfold], _bind_input)


@rule("col2im")
def col2im(ctx: Ctx, input, output_size=None, meta=None, **_):
    """F.fold / nn.Fold: (N, C * kh * kw, L) -> (N, C, H, W) sums each channel's block of kh * kw positions over the windows: a block's entries are one row (tied), the channel is zero when its whole block is; the batch axis keeps its ids; spatial axes are pinned."""
    x = input
    if not isinstance(x, AxisLabels):
        raise RuleDeclined("fold of a non-tensor")
    shape = _out_shape(meta)
    ids, zero, c = _batched(x, 1)
    channels = shape[c]
    k, rem = divmod(len(x.ids[c]), channels)
    if rem:
        raise RuleDeclined("folded channels are not whole blocks of the input's")
    ctx.pin(x.ids[c + 1], "fold sums over the windows of this axis")
    blocks = x.ids[c].reshape(channels, k)
    if k > 1:
        ctx.tie(blocks, blocks[:, :1])
    ids += [blocks[:, 0]] + [pinned_axis(n) for n in shape[c + 1:]]
    zero += [x.zero[c].reshape(channels, k).all(1)] + [false_mask(n) for n in shape[c + 1:]]
    return AxisLabels(tuple(ids), tuple(zero))


functions("col2im", [F.fold] + _ov(aten.col2im, "default"), ("input", "output_size"))
modules("col2im", [nn.Fold], _bind_input)


@rule("windows")
def windows(ctx: Ctx, input, dimension, size, step, meta=None, **_):
    """x.unfold(d, size, step): axis d becomes the windows' starts and a new last axis their offsets (both pinned: a window mixes positions of d); the other axes keep their ids and zeros."""
    x = input
    if not isinstance(x, AxisLabels):
        raise RuleDeclined("windows of a non-tensor")
    d = int(dimension) % max(1, x.ndim)
    shape = _out_shape(meta)
    ctx.pin(x.ids[d], "cut into sliding windows along this axis")
    ids = list(x.ids) + [pinned_axis(shape[-1])]
    zero = list(x.zero) + [false_mask(shape[-1])]
    ids[d], zero[d] = pinned_axis(shape[d]), false_mask(shape[d])
    return AxisLabels(tuple(ids), tuple(zero))


methods("windows", ["unfold"], ("input", "dimension", "size", "step"))
functions("windows", _ov(aten.unfold, "default"), ("input", "dimension", "size", "step"))
