"""Examples for the spatial rules (pool, resample, grid_sample, pad): passes/rules/spatial.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, conv, example, HW, img, N, Net


@example("pool")
def pool_forms():
    def fwd(s, x):
        y = s.mp(torch.relu(s.c1(x)))
        y = F.avg_pool2d(y, 3, stride=1, padding=1)
        y, _ = F.max_pool2d(y, 2, return_indices=True)
        return s.c2(F.adaptive_max_pool2d(y, 2))

    m = Net(fwd, c1=conv(3, 8), mp=nn.MaxPool2d(3, 1, 1), c2=conv(8, 4))
    return m, torch.randn(N, 3, 6, 6)


@example("pool", "shape_merge", "linear")
def global_pool_flatten_linear():
    m = Net(lambda s, x: s.fc(torch.flatten(s.pool(torch.relu(s.c1(x))), 1)), c1=conv(3, 8),
            pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(8, 4))
    return m, img()


@example("pool")
def pool1d():
    m = Net(lambda s, x: s.c2(F.max_pool1d(torch.relu(s.c1(x)), 2)), c1=nn.Conv1d(3, 8, 3), c2=nn.Conv1d(8, 4, 1))
    return m, torch.randn(N, 3, 9)


@example("resample")
def interpolate_forms():
    def fwd(s, x):
        y = F.interpolate(torch.relu(s.c1(x)), scale_factor=2, mode="nearest")
        y = s.up(y)
        y = F.interpolate(y, size=(7, 7), mode="bilinear", align_corners=False)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), up=nn.Upsample(scale_factor=2, mode="bilinear"), c2=conv(8, 4))
    return m, img()


@example("pad")
def pad_channels_and_space():
    """A constant pad on the channel axis (new channels, pinned) and on the spatial axes; the padded
    channels' neighbours stay groups."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        z = F.pad(y, (1, 1, 0, 2, 2, 1))  # W +2, H +2, C +3
        return s.c2(z)[..., :y.shape[2], :y.shape[3]] + s.c3(F.pad(y, (1, 1, 1, 1), mode="reflect"))[..., 1:-1, 1:-1]

    m = Net(fwd, c1=conv(3, 8), c2=conv(11, 4), c3=conv(8, 4))
    return m, img()


@example("pad", frontend="export")
def pad_exported():
    """The ATen forms of F.pad: aten.pad, constant_pad_nd (an SSM pads its sequence to whole chunks)."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x))
        z = torch.constant_pad_nd(y, (0, 0, 0, 3), 0.0)  # H + 3
        return s.c2(F.pad(y, (2, 0), value=0.5))[..., 2:] + s.c2(z)[:, :, :y.shape[2]]

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("pad", pinned="replicate padding copies or crops entries along this axis")
def replicate_pad_over_channels():
    def fwd(s, x):
        y = s.c1(x).flatten(2).transpose(1, 2)  # [N, HW, C]: channels last
        return s.fc(F.pad(y, (1, 1), mode="replicate"))

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(10, 4))
    return m, img()


def _resampled(nd: int, modes, export: bool = True):
    """c1 -> F.interpolate in each (mode, keyword arguments) of ``modes`` -> c2, in ``nd`` spatial dims."""
    layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]

    def fwd(s, x):
        if export:
            _force_export(x)
        y = torch.relu(s.c1(x))
        for mode, kw in modes:
            y = F.interpolate(y, mode=mode, **kw)
        return s.c2(y)

    m = Net(fwd, c1=layer(3, 8, 3, padding=1), c2=layer(8, 4, 3, padding=1))
    return m, torch.randn(N, 3, *([4] * nd))


@example("resample", frontend="export")
def interpolate_exported_2d():
    """Every 2-D ATen resample torch.export emits: upsample_nearest2d, _upsample_nearest_exact2d,
    upsample_bilinear2d, upsample_bicubic2d and the antialiased _upsample_bilinear2d_aa /
    _upsample_bicubic2d_aa (timm's resample_abs_pos_embed)."""
    return _resampled(2, [("nearest", dict(scale_factor=2)), ("nearest-exact", dict(size=(7, 9))),
                          ("bilinear", dict(scale_factor=1.5)), ("bicubic", dict(size=(10, 10))),
                          ("bilinear", dict(scale_factor=0.5, antialias=True)),
                          ("bicubic", dict(size=(3, 4), antialias=True))])


@example("resample", frontend="export")
def interpolate_exported_1d():
    """upsample_nearest1d, _upsample_nearest_exact1d, upsample_linear1d."""
    return _resampled(1, [("nearest", dict(scale_factor=2)), ("nearest-exact", dict(size=11)),
                          ("linear", dict(size=6, align_corners=True))])


@example("resample", frontend="export")
def interpolate_exported_3d():
    """upsample_nearest3d, _upsample_nearest_exact3d, upsample_trilinear3d."""
    return _resampled(3, [("nearest", dict(scale_factor=2)), ("nearest-exact", dict(size=(3, 5, 6))),
                          ("trilinear", dict(size=(4, 4, 5)))])


@example("resample")
def interpolate_antialias_traced():
    """F.interpolate(antialias=True) under symbolic_trace (one call_function F.interpolate)."""
    return _resampled(2, [("bilinear", dict(scale_factor=0.5, antialias=True)),
                          ("bicubic", dict(size=(3, 4), antialias=True))], export=False)


def _sampled(export: bool, flow: bool = False, nd: int = 2):
    """c1 -> F.grid_sample at a fixed grid (a buffer) or at a flow field predicted by a conv -> c2."""
    layer = {2: nn.Conv2d, 3: nn.Conv3d}[nd]

    def fwd(s, x):
        if export:
            _force_export(x)
        y = torch.relu(s.c1(x))
        g = s.grid
        if flow:  # a conv's 2 output channels, moved last, are the sampling coordinates
            g = torch.tanh(s.flow(y)).movedim(1, -1)
        z = F.grid_sample(y, g, mode="bilinear", padding_mode="border" if flow else "zeros", align_corners=False)
        return s.c2(z)

    members = dict(c1=layer(3, 8, 3, padding=1), c2=layer(8, 4, 3, padding=1))
    if flow:
        members["flow"] = layer(8, nd, 3, padding=1)
    m = Net(fwd, **members)
    shape = (N, *([HW] * nd), nd) if flow else (N, *([3] * nd), nd)
    m.register_buffer("grid", torch.rand(shape) * 2.2 - 1.1)  # some points outside [-1, 1]
    return m, torch.randn(N, 3, *([HW] * nd))


@example("grid_sample", expect_pin="grid sample reads these values as sampling coordinates")
def grid_sample_fixed_grid():
    """F.grid_sample at a fixed grid (a buffer): the sampled channels stay rows, the grid is pinned."""
    return _sampled(export=False)


@example("grid_sample", expect_pin="grid sample reads these values as sampling coordinates")
def grid_sample_flow_field():
    """The grid is a flow conv's 2 output channels (a spatial transformer): those are pinned, the
    sampled features (c1's rows, read by the flow conv too) stay rows."""
    return _sampled(export=False, flow=True)


@example("grid_sample", frontend="export", expect_pin="grid sample reads these values as sampling coordinates")
def grid_sample_exported():
    """aten.grid_sampler (torch.export) at a fixed 2-D grid."""
    return _sampled(export=True)


@example("grid_sample", frontend="export", expect_pin="grid sample reads these values as sampling coordinates")
def grid_sample_exported_3d():
    """aten.grid_sampler at a 3-D flow field (a Conv3d's 3 output channels, moved last)."""
    return _sampled(export=True, flow=True, nd=3)


@example("im2col", "linear")
def unfold_patches_linear():
    """F.unfold / nn.Unfold (T2T-ViT's soft split, VOLO): each channel becomes the block of its kernel
    positions; the linear reading the patches loses a channel's k*k columns with it."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        p = s.unfold(y) + F.unfold(y, 3, padding=1)  # (N, 8 * 9, L)
        return s.fc(p.transpose(1, 2))

    m = Net(fwd, c1=conv(3, 8), unfold=nn.Unfold(3, padding=1), fc=nn.Linear(8 * 9, 4))
    return m, img()


@example("im2col", "col2im")
def unfold_fold_round_trip():
    """F.fold sums each channel's block back into it (VOLO's outlook attention)."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        cols = F.unfold(y, 2, stride=2) * 2.0
        return s.c2(F.fold(cols, (HW, HW), 2, stride=2))

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


@example("col2im", "linear")
def fold_of_a_linear_output():
    """A fold of features a linear made: the block of a channel's positions is one row."""

    def fwd(s, x):
        cols = s.fc(x.flatten(2).transpose(1, 2)).transpose(1, 2)  # (N, 4 * 4, L=HW*HW)
        return s.c2(F.fold(cols, (HW * 2, HW * 2), 2, stride=2))

    return Net(fwd, fc=nn.Linear(3, 16), c2=conv(4, 4)), img()


@example("windows")
def tensor_unfold_windows():
    """x.unfold over a spatial axis (HaloNet's blocks): channels pass, the windowed axis is pinned."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        w = y.unfold(2, 2, 2).unfold(3, 2, 2)  # (N, 8, H/2, W/2, 2, 2)
        return s.c2(w.mean((-1, -2)))

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()
