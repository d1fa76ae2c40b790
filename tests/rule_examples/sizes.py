"""Examples for the sizes rules (size, ndim, numel, arith, check): passes/rules/sizes.py."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import conv, example, img, Net


@example("size", "expand")
def size_driven_expand():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        g = torch.relu(s.g(y.mean((2, 3), keepdim=True)))
        return s.c2(y + g.expand(y.size(0), y.size(1), y.size(2), y.size(3)))

    m = Net(fwd, c1=conv(3, 8), g=nn.Conv2d(8, 8, 1), c2=conv(8, 4))
    return m, img()


@example("ndim")
def ndim_branch():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        torch._assert(y.dim() == 4, "expected a batch of images")  # torchvision's rank checks
        return s.c2(y)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()
