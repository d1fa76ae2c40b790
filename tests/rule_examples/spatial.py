"""Examples for the spatial rules (pool, resample): passes/rules/spatial.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, conv, example, img, N, Net


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
