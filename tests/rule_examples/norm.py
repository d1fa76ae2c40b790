"""Examples for the norm rules (batch_norm, group_norm, layer_norm, rms_norm): passes/rules/norm.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, conv, example, HW, img, N, Net


@example("batch_norm")
def batch_norm_no_affine():
    """BN without affine: the channel is not zero (-mean/std) but the consumer's zero slice absorbs it."""
    m = Net(lambda s, x: s.c2(s.bn(s.c1(x))), c1=conv(3, 8), bn=nn.BatchNorm2d(8, affine=False), c2=conv(8, 4))
    return m, img()


@example("batch_norm")
def batch_norm_functional():
    def fwd(s, x):
        y = F.batch_norm(s.c1(x), s.rm, s.rv, s.w, s.b, False)
        return s.c2(torch.relu(y))

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.ones(8)), b=nn.Parameter(torch.zeros(8)), c2=conv(8, 4))
    m.register_buffer("rm", torch.zeros(8))
    m.register_buffer("rv", torch.ones(8))
    return m, img()


@example("batch_norm")
def batch_norm_1d_linear():
    m = Net(lambda s, x: s.l2(torch.relu(s.bn(s.l1(x)))), l1=nn.Linear(6, 8), bn=nn.BatchNorm1d(8),
            l2=nn.Linear(8, 4))
    return m, torch.randn(4, 6)


@example("batch_norm")
def instance_norm_affine():
    m = Net(lambda s, x: s.c2(torch.relu(s.inorm(s.c1(x)))), c1=conv(3, 8), inorm=nn.InstanceNorm2d(8, affine=True),
            c2=conv(8, 4))
    return m, img()


@example("batch_norm")
def frozen_batch_norm():
    """torchvision's FrozenBatchNorm2d (detection backbones): a leaf with batch norm's algebra, its
    buffers sliced with the channel (traced through, they would be folded into unnamed constants)."""
    from torchvision.ops import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(8)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(8))
        bn.running_var.copy_(torch.rand(8) + 0.5)
    m = Net(lambda s, x: s.c2(torch.relu(s.bn(s.c1(x)))), c1=conv(3, 8), bn=bn, c2=conv(8, 4))
    return m, img()


@example("group_norm")
def group_norm_module():
    m = Net(lambda s, x: s.c2(torch.relu(s.gn(s.c1(x)))), c1=conv(3, 8), gn=nn.GroupNorm(4, 8), c2=conv(8, 4))
    return m, img()


@example("group_norm")
def group_norm_functional():
    def fwd(s, x):
        return s.c2(torch.relu(F.group_norm(s.c1(x), 2, s.w, s.b)))

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.ones(8)), b=nn.Parameter(torch.zeros(8)), c2=conv(8, 4))
    return m, img()


@example("group_norm")
def group_norm_no_affine():
    m = Net(lambda s, x: s.c2(s.gn(s.c1(x))), c1=conv(3, 8), gn=nn.GroupNorm(2, 8, affine=False), c2=conv(8, 4))
    return m, img()


def _through_norm(norm: nn.Module, act=F.gelu):
    """Tokens through l1, ``act``, l2, ``norm`` and l3: l1's features stay rows, l2's reach l3
    through the norm."""
    return Net(lambda s, x: s.l3(s.n(s.l2(act(s.l1(x))))), l1=nn.Linear(6, 8), l2=nn.Linear(8, 8), n=norm,
               l3=nn.Linear(8, 4))


def _residual_stream(norm):
    """A residual stream of width 8 read through norms (a LLaMA or ViT block in small): l1 writes
    it, an MLP adds to it, ``norm(s, h, i)`` normalises it before each reader."""

    def fwd(s, x):
        h = s.l1(x)
        h = h + s.down(torch.relu(s.up(norm(s, h, 0))))
        return s.head(norm(s, h, 1))

    return fwd


def _stream_net(fwd, **norms):
    return Net(fwd, l1=nn.Linear(6, 8), up=nn.Linear(8, 12), down=nn.Linear(12, 8), head=nn.Linear(8, 4), **norms)


@example("layer_norm")
def layer_norm_tokens():
    """LN over features that are zero with their rows: each feature is a row (its weight and bias
    entries with it); the rewrite keeps the old divisor of the mean and variance."""
    return _through_norm(nn.LayerNorm(8)), torch.randn(N, 5, 6)


@example("layer_norm")
def layer_norm_residual_stream():
    """A pre-norm residual stream read through LayerNorms (a ViT block in small) and a functional
    LN without a bias: the stream's width is one group."""

    def norm(s, h, i):
        return s.n0(h) if i == 0 else F.layer_norm(h, (8,), s.w, None, 1e-6)

    m = _stream_net(_residual_stream(norm), n0=nn.LayerNorm(8), w=nn.Parameter(torch.ones(8)))
    return m, torch.randn(N, 5, 6)


@example("layer_norm", frontend="export")
def layer_norm_residual_stream_aten():
    """The same through torch.export (``aten.layer_norm``)."""

    def norm(s, h, i):
        _force_export(h)
        return (s.n0, s.n1)[i](h)

    m = _stream_net(_residual_stream(norm), n0=nn.LayerNorm(8), n1=nn.LayerNorm(8, bias=False))
    return m, torch.randn(N, 5, 6)


@example("layer_norm", "permute")
def layer_norm_channels_last():
    """ConvNeXt-style LN over channels (permute, LN, permute back): the channels are rows."""

    def fwd(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        y = s.ln(y).permute(0, 3, 1, 2)
        return s.c3(torch.relu(s.c2(y)))

    m = Net(fwd, c1=conv(3, 8), ln=nn.LayerNorm(8), c2=conv(8, 6), c3=conv(6, 4))
    return m, img()


@example("layer_norm")
def layer_norm_without_affine():
    """LN without a weight maps a removed zero feature to -mean / std, not zero: l3, which reads it, has
    that feature's column in the row, so the features are rows all the same."""
    return _through_norm(nn.LayerNorm(8, elementwise_affine=False)), torch.randn(N, 5, 6)


@example("layer_norm", expect_pin="not zero with their rows")
def layer_norm_without_affine_summed():
    """... but a sum over the features after it reads the -mean / std of a removed feature: pinned."""
    return Net(lambda s, x: s.l3(s.n(s.l2(F.gelu(s.l1(x)))).sum(-1, keepdim=True)), l1=nn.Linear(6, 8),
               l2=nn.Linear(8, 8), n=nn.LayerNorm(8, elementwise_affine=False), l3=nn.Linear(1, 4)), torch.randn(N, 5, 6)


@example("layer_norm", expect_pin="layer_norm")
def layer_norm_two_axes():
    """LN over (tokens, features) averages over both axes: both are pinned."""
    return _through_norm(nn.LayerNorm((5, 8))), torch.randn(N, 5, 6)


@example("layer_norm")
def layer_norm_of_nonzero_features():
    """A feature that is not zero with its row but a constant (1.0 added after the producer) stays a
    row: the compressed norm fills the constant back into its mean and variance."""
    m = Net(lambda s, x: s.l3(s.ln(s.l2(F.gelu(s.l1(x))) + 1.0)), l1=nn.Linear(6, 8), l2=nn.Linear(8, 8),
            ln=nn.LayerNorm(8), l3=nn.Linear(8, 4))
    return m, torch.randn(N, 5, 6)


@example("layer_norm", expect_pin="layer_norm normalises over this axis")
def layer_norm_of_input_dependent_features():
    """A feature that is neither zero nor constant with its row (each token's sum of the input added
    to every feature) pins the axis."""
    m = Net(lambda s, x: s.l3(s.ln(s.l2(F.gelu(s.l1(x))) + x.sum(-1, keepdim=True))), l1=nn.Linear(6, 8),
            l2=nn.Linear(8, 8), ln=nn.LayerNorm(8), l3=nn.Linear(8, 4))
    return m, torch.randn(N, 5, 6)


@example("layer_norm")
def layer_norm_spatial_functional():
    """F.layer_norm over (H, W) does not mix channels: they stay prunable."""
    m = Net(lambda s, x: s.c2(F.layer_norm(s.c1(x), (HW, HW))), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("rms_norm")
def rms_norm_residual_stream():
    """nn.RMSNorm over a residual stream of zero-invariant channels: each is a row (its weight entry
    with it); the rewrite keeps the old divisor, the model's own class refolds eps and the weight."""
    m = _stream_net(_residual_stream(lambda s, h, i: (s.n0, s.n1)[i](h)), n0=nn.RMSNorm(8),
                    n1=nn.RMSNorm(8, eps=1e-2))
    return m, torch.randn(N, 5, 6)


@example("rms_norm", frontend="export")
def rms_norm_residual_stream_aten():
    """The same through torch.export (``aten.rms_norm``; an eps of None is the dtype's epsilon)."""
    def norm(s, h, i):
        _force_export(h)
        return (s.n0, s.n1)[i](h)

    m = _stream_net(_residual_stream(norm), n0=nn.RMSNorm(8), n1=nn.RMSNorm(8, eps=1e-2))
    return m, torch.randn(N, 5, 6)


@example("rms_norm")
def rms_norm_functional_width_from_weight():
    """F.rms_norm with its width read off the weight (``w.shape``): that size measures the axis."""
    m = _stream_net(_residual_stream(lambda s, h, i: F.rms_norm(h, s.w[i].shape, s.w[i], s.eps)),
                 w=nn.ParameterList([nn.Parameter(torch.ones(8)), nn.Parameter(torch.ones(8))]), eps=1e-3)
    return m, torch.randn(N, 5, 6)


@example("rms_norm", pinned="rms_norm normalises over this axis")
def rms_norm_of_nonzero_channels():
    """relu(x) + 1 is not zero when its row is: removing it would change the norm's sum -> pinned."""
    m = Net(lambda s, x: s.l3(s.n(torch.relu(s.l2(x)) + 1)), l2=nn.Linear(6, 8), n=nn.RMSNorm(8), l3=nn.Linear(8, 4))
    return m, torch.randn(N, 5, 6)


@example("rms_norm", expect_pin="rms_norm normalises over this axis")
def rms_norm_two_axes():
    """RMSNorm over (tokens, features) mixes both axes: pinned; the layer before it keeps its rows."""
    return _through_norm(nn.RMSNorm((5, 8)), torch.relu), torch.randn(N, 5, 6)


@example("batch_norm")
def weight_standardized_conv():
    """BiT's weight standardisation: batch_norm(w.reshape(1, out, -1), training=True) averages each
    output channel's weight over its input entries (c1's outputs, in blocks of kh*kw): their columns
    are constants, so c1's outputs are rows too, the rewrite keeping the old count and the removed
    columns' moments (batch_norm_kept_divisor); c2's outputs are rows."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        w = F.batch_norm(s.c2.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        z = torch.relu(F.conv2d(y, w.reshape_as(s.c2.weight), s.c2.bias, padding=1))
        return s.c3(z)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 8), c3=conv(8, 4)), img()


@example("batch_norm", expect_pin="the computed weight's slice reading this channel is not zero with its row")
def weight_standardized_conv_input_not_zero():
    """A standardised weight's column is not zero with its row ((0 - mean) / std): the channel it reads
    must be zero itself; behind a batch norm without affine parameters (-mean / std) it is not, and is
    pinned; c2's outputs stay rows."""

    def fwd(s, x):
        y = s.bn(s.c1(x))
        w = F.batch_norm(s.c2.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return s.c3(torch.relu(F.conv2d(y, w.reshape_as(s.c2.weight), s.c2.bias, padding=1)))

    return Net(fwd, c1=conv(3, 8), bn=nn.BatchNorm2d(8, affine=False), c2=conv(8, 8), c3=conv(8, 4)), img()
