"""Examples for the sizes rules (size, ndim, numel, arith, check, arange): passes/rules/sizes.py."""
from __future__ import annotations

import torch
import torch.nn as nn

import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _qkvo, conv, example, H_, img, Net


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


def _alibi(s, x, scale_by_pow):
    """Attention with per-head ALiBi slopes computed in the graph from arange(1, H + 1) (BLOOM, MPT)."""
    _force_export(x)
    q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))  # [N, H, L, hd]
    h = torch.arange(1, H_ + 1, dtype=torch.float32)
    slopes = 1.0 / torch.pow(2, h * 4.0) if scale_by_pow else torch.pow(torch.tensor(0.5), h)
    pos = torch.arange(x.shape[1], dtype=torch.float32)
    bias = slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]  # [H, L, L]
    return s.o(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), x))


@example("arange", "binary", frontend="export")
def alibi_slopes_per_head():
    """The slopes are sliced with the kept heads (the graph keeps arange and selects the kept entries)."""
    return Net(lambda s, x: _alibi(s, x, False), **_qkvo()), torch.randn(2, 5, 6)


@example("arange", "singular", frontend="export")
def alibi_slopes_reciprocal_of_power():
    return Net(lambda s, x: _alibi(s, x, True), **_qkvo()), torch.randn(2, 5, 6)


@example("arith", pinned="x ** p with p < 0 is singular at x = 0")
def negative_power_of_channels():
    """x ** -1 of a channel that may be zero is infinite there (as rsqrt): pinned (tanh(y) + 2 is
    positive, but not by a construction the rule knows)."""
    return Net(lambda s, x: s.c2((torch.tanh(s.c1(x)) + 2.0) ** -1.0), c1=conv(3, 8), c2=conv(8, 4)), img()


@example("arith")
def negative_power_of_a_positive_value():
    """(x ** 2 + 1) ** -0.5 is finite wherever x is zero: the channels stay free."""
    return Net(lambda s, x: s.c2(torch.pow(torch.relu(s.c1(x)) ** 2 + 1.0, -0.5) * s.c1(x)),
               c1=conv(3, 8), c2=conv(8, 4)), img()


@example("arange", pinned="a size read off this axis is used as a value")
def arange_of_a_channel_count():
    """arange(C) of a size read off a channel axis: that axis would give other values once smaller."""
    def fwd(s, x):
        y = s.c1(x)
        return s.c2(y * torch.arange(y.shape[1], device=y.device, dtype=y.dtype).view(1, -1, 1, 1))

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()
