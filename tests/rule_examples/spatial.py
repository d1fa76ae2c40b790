"""Examples for the spatial rules (pool, resample): passes/rules/spatial.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import conv, example, img, N, Net


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
