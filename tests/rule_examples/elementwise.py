"""Examples for the elementwise rules (unary, prelu, binary, where): passes/rules/elementwise.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _qkvo, conv, example, img, N, Net


@example("unary")
def unary_forms():
    """f(0) = 0 in module, functional, torch and method spellings."""

    def fwd(s, x):
        y = s.act(s.c1(x))
        y = F.silu(y).tanh()
        y = torch.nn.functional.hardswish(s.drop(y)).contiguous()
        return s.c2(F.leaky_relu(y, 0.1).clone())

    m = Net(fwd, c1=conv(3, 8), act=nn.GELU(), drop=nn.Dropout(0.5), c2=conv(8, 4))
    return m, img()


@example("unary", frontend="export")
def unary_channel_dropouts_exported():
    """nn.Dropout2d/Dropout3d export to aten.feature_dropout, AlphaDropout to aten.alpha_dropout: zero stays zero."""

    def fwd(s, x):
        _force_export(x)
        y = s.d2(s.c1(x))
        y = s.a(s.c2(y))
        return s.c3(s.fa(y))

    m = Net(fwd, c1=conv(3, 8), d2=nn.Dropout2d(0.3), c2=conv(8, 6), a=nn.AlphaDropout(0.2), c3=conv(6, 4),
            fa=nn.FeatureAlphaDropout(0.1))
    return m, img()


@example("unary")
def unary_nonzero_absorbed():
    """sigmoid(0) = 0.5 is not zero, but only a conv with a zero slice reads it."""
    m = Net(lambda s, x: s.c2(torch.sigmoid(s.c1(x)).exp()), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("unary", "reduce")
def unary_zero_then_channel_sum():
    """relu keeps zero channels zero, so a sum over channels (no weight) is still exact."""
    m = Net(lambda s, x: s.c2(torch.relu(s.c1(x)).sum(1, keepdim=True)) + s.c3(x), c1=conv(3, 8), c2=conv(1, 4),
            c3=conv(3, 4))
    return m, img()


@example("unary", "reduce", pinned="sum over channels")
def unary_nonzero_then_channel_sum():
    """sigmoid channels summed without a weight: removing one changes the sum -> pinned."""
    m = Net(lambda s, x: torch.sigmoid(s.c1(x)).sum(1), c1=conv(3, 8))
    return m, img()


@example("prelu")
def prelu_module():
    m = Net(lambda s, x: s.c2(s.act(s.c1(x))), c1=conv(3, 8), act=nn.PReLU(8), c2=conv(8, 4))
    return m, img()


@example("prelu")
def prelu_functional_and_shared():
    def fwd(s, x):
        return s.c2(s.shared(F.prelu(s.c1(x), s.a)))

    m = Net(fwd, c1=conv(3, 8), a=nn.Parameter(torch.full((8,), 0.2)), shared=nn.PReLU(), c2=conv(8, 4))
    return m, img()


class BasicBlock(nn.Module):
    """ResNet basic block with a projection shortcut."""

    def __init__(self, cin=3, c=8):
        super().__init__()
        self.conv1 = conv(cin, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = conv(c, c)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(cin, c, 1)
        self.bnd = nn.BatchNorm2d(c)
        self.head = conv(c, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = y + self.bnd(self.down(x))
        return self.head(torch.relu(y))


@example("binary", "conv", "batch_norm")
def residual_block():
    return BasicBlock(), img()


@example("binary")
def binary_forms():
    """torch.add, method add, in-place +=, sub, mul by a scalar, div by a scalar."""

    def fwd(s, x):
        a, b, c = s.a(x), s.b(x), s.c(x)
        y = torch.add(a, b)
        y = y.add(c, alpha=0.5)
        y += s.d(x)
        y = (y - s.e(x)) * 0.5
        y = y.mul(2.0) / 3.0
        return s.head(torch.relu(y))

    m = Net(fwd, a=conv(3, 8), b=conv(3, 8), c=conv(3, 8), d=conv(3, 8), e=conv(3, 8), head=conv(8, 4))
    return m, img()


@example("binary")
def layer_scale():
    """ConvNeXt layer scale x * gamma[C, 1, 1]: gamma is owned by the channel."""
    m = Net(lambda s, x: s.c2(torch.relu(s.c1(x) * s.gamma)), c1=conv(3, 8),
            gamma=nn.Parameter(torch.full((8, 1, 1), 1e-1)), c2=conv(8, 4))
    return m, img()


@example("binary")
def bias_add_and_sub_param():
    m = Net(lambda s, x: s.c2(torch.relu(s.c1(x) + s.bias2 - s.shift)), c1=conv(3, 8, bias=False),
            bias2=nn.Parameter(torch.zeros(8, 1, 1)), shift=nn.Parameter(torch.zeros(1, 8, 1, 1)), c2=conv(8, 4))
    return m, img()


@example("binary", pinned="divides by this channel")
def div_by_channel():
    """y / z ties y's and z's channels and pins z's (z may be 0, and 1/0 is not 0): nothing is prunable."""

    def fwd(s, x):
        return s.c3(torch.relu(s.c1(x)) / (s.c2(x) + 1.0))

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 8), c3=conv(8, 4))
    return m, img()


@example("binary")
def div_by_positive_channel():
    """y / (sigmoid(z) + 1): the denominator is > 0 by construction, so the tied channels stay prunable."""

    def fwd(s, x):
        return s.c3(torch.relu(s.c1(x)) / (torch.sigmoid(s.c2(x)) + 1.0))

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 8), c3=conv(8, 4))
    return m, img()


@example("binary")
def div_by_spatial_map():
    """y / z with z a [N, 1, H, W] map broadcast over channels: y's channels stay prunable."""

    def fwd(s, x):
        return s.c3(torch.relu(s.c1(x)) / (torch.sigmoid(s.c2(x)) + 1.0))

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 1), c3=conv(8, 4))
    return m, img()


class SqueezeExcite(nn.Module):
    def __init__(self, c=8, r=4):
        super().__init__()
        self.c1 = conv(3, c)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)
        self.c2 = conv(c, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        g = F.adaptive_avg_pool2d(y, 1)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(g))))
        return self.c2(y * g)


@example("binary", "pool", "unary")
def squeeze_excitation():
    return SqueezeExcite(), img()


@example("binary", "reduce", "unary", frontend="export")
def cosine_attention_heads_export():
    """The same through torch.export: normalize decomposes into a norm, clamp_min(eps) and a division."""

    def fwd(s, x):
        _force_export(x)
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return s.o(_merge(a.softmax(-1) @ v, x))

    return Net(fwd, **_qkvo()), torch.randn(N, 5, 6)


@example("unary")
def clamp_bounds():
    """clamp(min=0.5) moves 0 to 0.5 (not zero-preserving); clamp(max=...) and clamp(-1, 1) keep 0."""

    def fwd(s, x):
        y = s.c1(x)
        return s.c2(torch.clamp(y, min=0.5) + y.clamp(max=2.0) + y.clamp(-1.0, 1.0) + torch.clamp_min(y, 0.1))

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


def _rms_heads(s, t):
    """Per-head RMSNorm over head_dim (Qwen3 / Gemma 3 q_norm, k_norm): rsqrt of a positive mean."""
    t32 = t.to(torch.float32)
    t32 = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (t32 * (1.0 + s.qn)).type_as(t)


@example("singular", "unary", "reduce")
def per_head_rms_norm_keeps_heads():
    """q/k normalised per head over head_dim: the mean pins head_dim only, so whole heads stay rows
    (rsqrt of mean(x^2) + eps is positive by construction; type_as is a copy)."""

    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        q, k = _rms_heads(s, q), _rms_heads(s, k)
        return s.o(_merge(F.scaled_dot_product_attention(q, k, v), x))

    m = Net(fwd, qn=nn.Parameter(torch.zeros(4)), **_qkvo())
    return m, torch.randn(N, 5, 6)


@example("singular", "binary", "reduce", frontend="export")
def per_head_rms_norm_of_a_self_product_keeps_heads():
    """litgpt's RMSNorm squares by ``x * x`` (the same tensor twice, non-negative): rsqrt(mean(x * x) + eps)
    per head is positive by construction, so whole heads stay rows."""

    def fwd(s, x):
        _force_export(x)
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        q = q * torch.rsqrt(torch.mean(q * q, dim=-1, keepdim=True) + 1e-6) * s.qn
        k = k * torch.rsqrt(torch.mean(k * k, dim=-1, keepdim=True) + 1e-6) * s.qn
        return s.o(_merge(F.scaled_dot_product_attention(q, k, v), x))

    m = Net(fwd, qn=nn.Parameter(torch.ones(4)), **_qkvo())
    return m, torch.randn(N, 5, 6)


@example("singular", pinned="singular at x = 0")
def reciprocal_of_a_channel_pins_it():
    """1 / x of a channel that may be zero: removing it is not exact (1 / 0), so it is pinned."""
    m = Net(lambda s, x: torch.reciprocal(s.c1(x)).sum(1), c1=conv(3, 8))
    return m, img()


@example("masked_fill", "softmax")
def masked_fill_scores_keep_heads():
    """Attention scores masked with masked_fill (DeBERTa, BERT-style masks): the mask broadcasts over heads."""

    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        a = (q @ k.transpose(-2, -1)).masked_fill(s.mask, -1e4).softmax(-1)
        return s.o(_merge(a @ v, x))

    m = Net(fwd, **_qkvo())
    m.register_buffer("mask", torch.rand(1, 1, 5, 5) > 0.7)
    return m, torch.randn(N, 5, 6)


@example("like")
def zeros_and_ones_like_channels():
    """zeros_like / ones_like / full_like take x's channels (a zero state, Recurrent Gemma's; a mask of ones)."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        h = torch.zeros_like(y) + y * torch.ones_like(y) + torch.full_like(y, 0.0)
        return s.c2(h)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()



@example("new_factory")
def new_tensors_of_an_activation():
    """x.new_ones / new_zeros / new_full(size) take only x's dtype and device: x's channels stay rows (a mask
    of ones made from the hidden states, an accumulator of zeros)."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        mask = y.new_ones(y.shape[0], 1, 1, 1) + y.new_zeros(1) + y.new_full((1, 1, 1, 1), 0.5)
        return s.c2(y * mask)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


@example("binary")
def comparisons_make_masks():
    """A mask compared from activations (x > t, x != 0) gates them: tied to their channels, zero with them
    where 0 (op) t is False (0 > 0.1, 0 != 0, 0 <= -0.2); Python's operators and torch's alike (a leaky
    activation written with where)."""

    def fwd(s, x):
        y = s.c1(x)
        return s.c2(y * (y > 0.1) + torch.ne(y, 0).float() * 0.5 - y.le(-0.2).to(y.dtype) + torch.where(y >= 0, y, 0.1 * y))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("binary", frontend="export")
def comparison_of_two_tensors_exported():
    """The ATen forms (aten.lt.Tensor, aten.gt.Scalar): comparing two tensors ties their channels, and
    lt(0, 0) is False, so the mask is zero where both rows are."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x))
        return s.c2(y * torch.lt(y, s.c3(x)) + torch.gt(y, 0.3).float())

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4), c3=conv(3, 8))
    return m, img()


@example("addcmul")
def addcmul_affine_and_gated_response():
    """timm's ``Affine`` (``torch.addcmul(beta, alpha, x)``: ResMLP) and a gated response
    (``y.addcmul(g, y * n)``, ConvNeXt V2's GRN): a per-channel shift plus a product, the channels tied
    through both factors and the shift."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        y = torch.addcmul(s.beta, s.alpha, y)
        y = y.addcmul(s.gamma, y * y.mean((2, 3), keepdim=True), value=0.5)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4), alpha=nn.Parameter(torch.randn(1, 8, 1, 1)),
            beta=nn.Parameter(torch.randn(1, 8, 1, 1)), gamma=nn.Parameter(torch.randn(1, 8, 1, 1)))
    return m, img()


@example("addcmul", frontend="export")
def addcmul_exported():
    """The ATen form (aten.addcmul.default)."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x))
        return s.c2(torch.addcmul(s.beta, y, s.c3(x)))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4), c3=conv(3, 8), beta=nn.Parameter(torch.randn(1, 8, 1, 1)))
    return m, img()


@example("copy", "slice", frontend="export")
def slice_update_in_place_export():
    """``h[:, 1:] += g`` (Gemma 3n's AltUp: ``corrected[1:] += first``) exports as ``slice``, ``add_`` and
    ``copy_`` of the sum back into the slice: the copy's axes are tied to the source's, the write
    reaches the sliced tensor, and the channels stay rows."""

    def fwd(s, x):
        _force_export(x)
        h = s.a(x)
        h[:, 1:] += s.b(x)[:, 1:]
        return s.o(h)

    return Net(fwd, a=nn.Linear(6, 8), b=nn.Linear(6, 8), o=nn.Linear(8, 3)), torch.randn(N, 5, 6)


@example("copy")
def copy_into_a_fresh_buffer():
    """``buf.copy_(y)`` on a tensor of y's shape: the buffer's channels become y's (tied), zero where y's are."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        buf = torch.zeros_like(y)
        buf.copy_(y)
        return s.c2(buf)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


@example("copy")
def copy_broadcast_over_positions():
    """``buf.copy_(m)`` with m of size 1 on the spatial axes (a channel mean per image): m is written
    over every position; the channels keep their rows, the broadcast axes take no zeros."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        buf = torch.zeros_like(y)
        buf.copy_(y.mean((2, 3), keepdim=True))
        return s.c2(buf + y)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()
