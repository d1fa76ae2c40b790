"""Examples for the reduction rules (reduce, normalize, softmax): passes/rules/reduction.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _qkvo, conv, example, H_, HW, img, N, Net


@example("reduce")
def mean_sum_amax_spatial():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        z = y.mean((2, 3)) + torch.sum(y, dim=(-1, -2)) + y.amax(dim=(2, 3)) + y.std(dim=(2, 3))
        return s.fc(z)

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 3))
    return m, img()


@example("reduce")
def max_over_spatial_tuple():
    def fwd(s, x):
        y = torch.relu(s.c1(x)).flatten(2)  # [N, 8, 25]
        v, _ = y.max(dim=2)
        return s.fc(v)

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 3))
    return m, img()


@example("reduce", pinned="mean over this axis")
def mean_over_channels():
    """mean over channels: the divisor counts every channel -> pinned."""
    m = Net(lambda s, x: s.c2(torch.relu(s.c1(x)).mean(1, keepdim=True)), c1=conv(3, 8), c2=conv(1, 4))
    return m, img()


def _grn_net(channels_last=True, export=False, divisor=True):
    """conv -> fc1 -> ConvNeXt V2's GRN written into the forward -> fc2: NHWC as the official code and Hugging
    Face write it (``gamma * (x * Nx) + beta + x``), NCHW as timm's (``x + addcmul(beta, gamma, x * Nx)``);
    ``divisor=False`` adds the channel mean instead of dividing by it (no GRN)."""

    def fwd(s, x):
        y = s.c1(x)
        if export:
            _force_export(y)
        if channels_last:
            y = F.gelu(s.fc1(y.permute(0, 2, 3, 1)))
            g = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
            n = g / (g.mean(dim=-1, keepdim=True) + 1e-6) if divisor else g + g.mean(dim=-1, keepdim=True)
            y = s.gamma * (y * n) + s.beta + y
            return s.fc2(y).permute(0, 3, 1, 2)
        y = F.gelu(s.fc1(y))
        g = y.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return s.fc2(y + torch.addcmul(s.beta.view(1, -1, 1, 1), s.gamma.view(1, -1, 1, 1), y * n))

    shape = (1, 1, 1, 16) if channels_last else (16,)
    fc = (lambda i, o: nn.Linear(i, o)) if channels_last else (lambda i, o: conv(i, o, 1))
    return Net(fwd, c1=conv(3, 8), fc1=fc(8, 16), fc2=fc(16, 4), gamma=nn.Parameter(torch.zeros(shape)),
               beta=nn.Parameter(torch.zeros(shape)))


@example("reduce")
def grn_channels_last():
    """ConvNeXt V2's GRN: the channel mean of spatial 2-norms divides them; a zero channel adds nothing
    to it, so each channel is a row (gamma and beta in it) and the rewrite keeps the old divisor (the
    own class keeps this GRN's width: its forward, not a GRN class, would divide by the new one)."""
    return _grn_net(), img()


@example("reduce", frontend="export")
def grn_channels_first_aten():
    return _grn_net(channels_last=False, export=True), img()


@example("reduce", expect_pin="mean over this axis")
def channel_mean_of_norms_added():
    """The channel mean of spatial 2-norms added, not dividing them: no GRN, pinned."""
    return _grn_net(divisor=False), img()


def _rms_written_out(one_plus=False, export=False, power=False):
    """LLaMA's RMSNorm as transformers writes it (Gemma's reads its weight as ``1 + w``; Gemma 4's
    divides by ``(...) ** -0.5``, not rsqrt), over a residual stream of width 8."""

    def norm(s, h, w):
        if export:
            _force_export(h)
        v = h.float().pow(2).mean(-1, keepdim=True)
        y = (h * (torch.pow(v + s.eps, -0.5) if power else torch.rsqrt(v + s.eps))).to(h.dtype)
        return y * (1.0 + w) if one_plus else w * y

    def fwd(s, x):
        h = s.l1(x)
        h = h + s.down(torch.relu(s.up(norm(s, h, s.w0))))
        return s.head(norm(s, h, s.w1))

    return Net(fwd, l1=nn.Linear(6, 8), up=nn.Linear(8, 12), down=nn.Linear(12, 8), head=nn.Linear(8, 4),
               w0=nn.Parameter(torch.ones(8)), w1=nn.Parameter(torch.ones(8)), eps=1e-2)


@example("reduce")
def rms_norm_written_out():
    """The mean of an RMS norm: each channel of the stream is a row; the rewrite keeps the old
    divisor, the own class refolds eps and the weight."""
    return _rms_written_out(), torch.randn(N, 5, 6)


@example("reduce", frontend="export")
def rms_norm_written_out_one_plus_aten():
    return _rms_written_out(one_plus=True, export=True), torch.randn(N, 5, 6)


@example("reduce", "arith")
def rms_norm_written_out_power():
    return _rms_written_out(power=True), torch.randn(N, 5, 6)


@example("reduce", "arith", frontend="export")
def rms_norm_written_out_power_aten():
    return _rms_written_out(power=True, export=True), torch.randn(N, 5, 6)


@example("reduce")
def mean_of_square_without_weight():
    """x * rsqrt(mean(x ** 2) + eps) with no weight keeps a zero channel zero: each channel is a row
    (the graph keeps the old divisor; the own class scales the layers around the norm)."""

    def fwd(s, x):
        h = s.l1(x)
        return s.head(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2) + s.l2(torch.relu(h)))

    return Net(fwd, l1=nn.Linear(6, 8), l2=nn.Linear(8, 8), head=nn.Linear(8, 4)), torch.randn(N, 5, 6)


@example("softmax", pinned="softmax over this axis")
def softmax_over_channels():
    m = Net(lambda s, x: s.c2(torch.softmax(s.c1(x), dim=1)), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("softmax")
def softmax_over_spatial():
    """softmax over the flattened spatial axis does not touch channels."""

    def fwd(s, x):
        y = s.c1(x)
        a = s.sm(y.flatten(2)).unflatten(2, (HW, HW))
        return s.c2(y * a)

    m = Net(fwd, c1=conv(3, 8), sm=nn.Softmax(dim=-1), c2=conv(8, 4))
    return m, img()


@example("softmax")
def log_softmax_method_spatial():
    m = Net(lambda s, x: s.c2(s.c1(x).log_softmax(-1)), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("normalize", "binary")
def cosine_attention_heads():
    """Swin v2's cosine attention: q and k normalised over head_dim, a per-head logit scale (clamped, exp)."""

    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        a = (a * torch.clamp(s.scale, max=4.0).exp()).softmax(-1)
        return s.o(_merge(a @ v, x))

    return Net(fwd, scale=nn.Parameter(torch.rand(H_, 1, 1)), **_qkvo()), torch.randn(N, 5, 6)


@example("normalize")
def normalized_hidden_read_by_a_linear():
    """An embedding head (sentence-transformers' Normalize, CLIP's projections): fc1's width normalised by its
    2-norm, then read by fc2: a zero channel adds nothing to the norm, so each is a row of fc1."""
    m = Net(lambda s, x: s.fc2(F.normalize(torch.relu(s.fc1(x)), dim=-1)), fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 3))
    return m, torch.randn(N, 6)


@example("normalize", pinned="normalised over this axis")
def normalized_by_a_negative_order():
    """F.normalize with p = -1: a zero entry's |0| ** -1 is infinite, so every channel counts: pinned."""
    m = Net(lambda s, x: s.fc2(F.normalize(s.fc1(x) + 2, p=-1.0, dim=-1)), fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 3))
    return m, torch.randn(N, 6)


@example("reduce")
def vector_norms_of_a_hidden_width():
    """p-norms of fc1's width (p = 2, 1, inf; torch.norm, Tensor.norm, linalg.vector_norm, linalg.norm) scale
    fc2's output: zero channels add nothing to any of them, so each is a row of fc1."""

    def fwd(s, x):
        y = torch.relu(s.fc1(x))
        n = (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + y.norm(p=1, dim=-1, keepdim=True)
             + torch.linalg.norm(y, ord=float("inf"), dim=-1, keepdim=True) + torch.norm(y, dim=-1, keepdim=True))
        return s.fc2(y) * n

    return Net(fwd, fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 3)), torch.randn(N, 6)


@example("reduce", frontend="export")
def vector_norms_of_a_hidden_width_aten():
    def fwd(s, x):
        y = torch.relu(s.fc1(x))
        _force_export(y)
        n = torch.linalg.vector_norm(y, ord=3, dim=-1, keepdim=True) + torch.linalg.norm(y, dim=-1, keepdim=True)
        return s.fc2(y) * n

    return Net(fwd, fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 3)), torch.randn(N, 6)


@example("reduce", pinned="norm over this axis")
def matrix_norm_over_two_axes():
    """linalg.norm with a numeric ord over two axes is a matrix norm (ord=-2: the smallest singular value of
    each sample's positions x width): not a sum over entries, so the width is pinned."""

    def fwd(s, x):
        y = s.fc1(x)  # [N, 5, 8]
        return s.fc2(y) * torch.linalg.norm(y, ord=-2, dim=(1, 2)).view(-1, 1, 1)

    return Net(fwd, fc1=nn.Linear(6, 8), fc2=nn.Linear(8, 3)), torch.randn(N, 5, 6)


@example("select_k")
def topk_and_sort_over_spatial():
    """top-k and sort over the flattened spatial axis (a router's top-k over experts): channels keep their rows."""

    def fwd(s, x):
        y = torch.relu(s.c1(x)).flatten(2)  # [N, 8, 25]
        v, _ = y.topk(5, dim=-1)
        w = torch.sort(y, dim=2, descending=True)[0][..., :5]
        return s.fc((v + w).sum(-1))

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 3))
    return m, img()


@example("select_k", pinned="top-k or sort along this axis")
def topk_over_channels():
    m = Net(lambda s, x: s.fc(torch.topk(torch.relu(s.c1(x)).mean((2, 3)), 3, dim=1)[0]), c1=conv(3, 8),
            fc=nn.Linear(3, 3))
    return m, img()


@example("scan")
def cumsum_and_diff_over_spatial():
    """Scans along a spatial axis (an SSM's cumulative decay, positions from a mask) leave the channels free."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        z = torch.cumsum(y, dim=3) + y.cumprod(2) * 0.1 + torch.diff(y, dim=-1, prepend=y[..., :1])
        v, _ = torch.cummax(y, dim=2)
        return s.c2(z + v - torch.logcumsumexp(y, 3))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("scan", frontend="export")
def diff_and_cumsum_exported():
    """The ATen forms (torch.export) of the same scans."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x))
        return s.c2(torch.diff(y, n=2, dim=2, append=y[:, :, -2:]) + y.cumsum(-1))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("scan", pinned="a scan (cumsum, diff, ...) mixes the entries along this axis")
def cumsum_over_channels():
    m = Net(lambda s, x: s.c2(torch.cumsum(s.c1(x), dim=1)), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()
