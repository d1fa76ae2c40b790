"""Small models that put each operator rule between prunable producers and consumers.

``EXAMPLES[rule_name]`` is a list of zero-argument factories returning ``(model, example_input)``:
tiny channels (4-8), tiny spatial sizes (5x5), every spelling of the op we know of (module,
functional, tensor method, operator, ATen through ``torch.export``).

A factory may carry attributes read by ``test_rules.py``:

* ``pinned``: the example is expected to have *no* group; the value is a substring of the reason of
  a pin that must be reported in ``oto.pinned`` (e.g. softmax over the channel axis).
* ``expect_pin``: the example has groups, and a pin whose reason contains this substring must also
  be reported (e.g. layer norm over channels, beside a prunable hidden layer).
* ``frontend``: the front-end ``otofx.OTO`` must pick ("symbolic_trace" unless stated).

Models are built under a fixed seed; ``conftest.randomize`` is applied by the tests.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

EXAMPLES: dict[str, list[Callable[[], tuple[nn.Module, Tensor]]]] = {}

N, CIN, HW = 2, 3, 5


class Net(nn.Module):
    """A module whose forward is ``fwd(self, x)``; keyword arguments become submodules/parameters."""

    def __init__(self, fwd, **members):
        super().__init__()
        self._fwd = fwd
        for k, v in members.items():
            setattr(self, k, v)

    def forward(self, x):
        return self._fwd(self, x)


def _force_export(x: Tensor) -> None:
    """A shape test that ``torch.fx.symbolic_trace`` cannot take but ``torch.export`` can."""
    if x.shape[-1] < 0:
        raise ValueError("negative size")


def example(*rules: str, pinned: str | None = None, expect_pin: str | None = None, frontend: str = "symbolic_trace"):
    """Register the decorated factory under every rule in ``rules``."""

    def deco(fn):
        fn.pinned = pinned
        fn.expect_pin = expect_pin
        fn.frontend = frontend
        for r in rules:
            EXAMPLES.setdefault(r, []).append(fn)
        return fn

    return deco


def img(c: int = CIN, hw: int = HW) -> Tensor:
    return torch.randn(N, c, hw, hw)


def conv(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


# =============================================================================================
# conv
# =============================================================================================


@example("conv", "batch_norm", "unary")
def conv_bn_relu_conv():
    m = Net(lambda s, x: s.c2(s.act(s.bn(s.c1(x)))), c1=conv(3, 8), bn=nn.BatchNorm2d(8), act=nn.ReLU(), c2=conv(8, 4))
    return m, img()


@example("conv")
def conv_functional():
    def fwd(s, x):
        y = F.conv2d(x, s.w, s.b, 1, 1)
        return s.c2(F.relu(y))

    m = Net(fwd, w=nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), b=nn.Parameter(torch.randn(8)), c2=conv(8, 4))
    return m, img()


@example("conv")
def conv_functional_consumer():
    def fwd(s, x):
        return F.conv2d(torch.relu(s.c1(x)), s.w, None, padding=1)

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.randn(4, 8, 3, 3) * 0.3))
    return m, img()


@example("conv")
def conv_grouped():
    """groups=2: a row is a whole conv group (4 in and 4 out channels)."""
    m = Net(lambda s, x: s.c3(torch.relu(s.c2(torch.relu(s.c1(x))))), c1=conv(3, 8), c2=conv(8, 8, groups=2),
            c3=conv(8, 4))
    return m, img()


@example("conv")
def conv_grouped_functional():
    """F.conv2d(groups=2): the rewrite must update the groups argument."""

    def fwd(s, x):
        y = F.conv2d(torch.relu(s.c1(x)), s.w, s.b, padding=1, groups=2)
        return s.c3(torch.relu(y))

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.randn(8, 4, 3, 3) * 0.3), b=nn.Parameter(torch.randn(8)),
            c3=conv(8, 4))
    return m, img()


@example("conv", "batch_norm")
def conv_depthwise():
    m = Net(lambda s, x: s.pw(torch.relu(s.bn2(s.dw(torch.relu(s.bn1(s.c1(x))))))),
            c1=conv(3, 8), bn1=nn.BatchNorm2d(8), dw=conv(8, 8, groups=8), bn2=nn.BatchNorm2d(8), pw=conv(8, 4, 1))
    return m, img()


@example("conv")
def conv_depthwise_multiplier():
    """groups=C with 2 outputs per group: one row is an input channel and its two outputs."""
    m = Net(lambda s, x: s.pw(torch.relu(s.dw(torch.relu(s.c1(x))))), c1=conv(3, 4), dw=conv(4, 8, groups=4),
            pw=conv(8, 4, 1))
    return m, img()


@example("conv", "batch_norm")
def conv_transpose():
    m = Net(lambda s, x: s.c2(torch.relu(s.bn(s.up(torch.relu(s.c1(x)))))),
            c1=conv(3, 8), up=nn.ConvTranspose2d(8, 6, 2, stride=2), bn=nn.BatchNorm2d(6), c2=conv(6, 4))
    return m, img()


@example("conv")
def conv_transpose_grouped():
    m = Net(lambda s, x: s.c2(torch.relu(s.up(torch.relu(s.c1(x))))),
            c1=conv(3, 8), up=nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), c2=conv(6, 4))
    return m, img()


@example("conv")
def conv_transpose_functional():
    def fwd(s, x):
        y = F.conv_transpose2d(torch.relu(s.c1(x)), s.w, s.b, stride=2)
        return s.c2(torch.relu(y))

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.randn(8, 6, 2, 2) * 0.3), b=nn.Parameter(torch.randn(6)),
            c2=conv(6, 4))
    return m, img()


@example("conv")
def conv_transpose_functional_grouped():
    def fwd(s, x):
        y = F.conv_transpose2d(torch.relu(s.c1(x)), s.w, None, 2, 0, 0, 2)
        return s.c2(torch.relu(y))

    m = Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.randn(8, 3, 2, 2) * 0.3), c2=conv(6, 4))
    return m, img()


@example("conv")
def conv1d_and_conv3d():
    def fwd(s, x):
        y = torch.relu(s.a(x))  # [N, 8, L]
        z = torch.relu(s.b(y.unsqueeze(-1).unsqueeze(-1)))  # [N, 6, L, 1, 1]
        return s.c(z.squeeze(-1).squeeze(-1))

    m = Net(fwd, a=nn.Conv1d(3, 8, 3, padding=1), b=nn.Conv3d(8, 6, 1), c=nn.Conv1d(6, 4, 1))
    return m, torch.randn(N, 3, 7)


@example("conv", "linear", frontend="export")
def conv_linear_export():
    """ATen forms (aten.conv2d, aten.linear, aten.view) through torch.export."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c2(torch.relu(s.c1(x))))
        return s.fc(y.mean((2, 3)))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 6, groups=2), fc=nn.Linear(6, 4))
    return m.eval(), img()


# =============================================================================================
# linear
# =============================================================================================


@example("linear")
def mlp():
    m = Net(lambda s, x: s.l2(F.gelu(s.l1(x))), l1=nn.Linear(6, 8), l2=nn.Linear(8, 4))
    return m, torch.randn(N, 6)


@example("linear")
def mlp_tokens_functional():
    def fwd(s, x):
        return F.linear(torch.relu(F.linear(x, s.w1, s.b1)), s.w2)

    m = Net(fwd, w1=nn.Parameter(torch.randn(8, 6) * 0.3), b1=nn.Parameter(torch.randn(8)),
            w2=nn.Parameter(torch.randn(4, 8) * 0.3))
    return m, torch.randn(N, 5, 6)


# =============================================================================================
# matmul
# =============================================================================================


def _attention(op):
    def fwd(s, x):  # x: [N, L, 6]
        q, k, v = s.q(x), s.k(x), s.v(x)
        a = torch.softmax(op(q, k.transpose(1, 2)), dim=-1)  # [N, L, L]
        return s.o(op(a, v))

    m = Net(fwd, q=nn.Linear(6, 8), k=nn.Linear(6, 8), v=nn.Linear(6, 4), o=nn.Linear(4, 3))
    return m, torch.randn(N, 5, 6)


@example("matmul", "softmax", "permute")
def attention_matmul():
    return _attention(torch.matmul)


@example("matmul")
def attention_operator():
    return _attention(lambda a, b: a @ b)


@example("matmul")
def attention_bmm():
    return _attention(torch.bmm)


@example("matmul")
def attention_method():
    return _attention(lambda a, b: a.matmul(b))


@example("matmul")
def matmul_weight():
    """x @ W with a registered weight: W's rows read the last axis, its columns own the output."""

    def fwd(s, x):
        return s.o(torch.relu(torch.relu(s.l1(x)) @ s.w))

    m = Net(fwd, l1=nn.Linear(6, 8), w=nn.Parameter(torch.randn(8, 5) * 0.3), o=nn.Linear(5, 3))
    return m, torch.randn(N, 4, 6)


# =============================================================================================
# embedding
# =============================================================================================


@example("embedding")
def embedding_module():
    m = Net(lambda s, i: s.l2(torch.relu(s.l1(s.emb(i)))), emb=nn.Embedding(10, 8), l1=nn.Linear(8, 6),
            l2=nn.Linear(6, 3))
    return m, torch.randint(0, 10, (N, 5))


@example("embedding")
def embedding_functional():
    m = Net(lambda s, i: s.l(F.embedding(i, s.table)), table=nn.Parameter(torch.randn(10, 8)), l=nn.Linear(8, 3))
    return m, torch.randint(0, 10, (N, 5))


# =============================================================================================
# batch_norm (module forms above)
# =============================================================================================


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


# =============================================================================================
# group_norm
# =============================================================================================


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


# =============================================================================================
# layer_norm
# =============================================================================================


@example("layer_norm", expect_pin="layer_norm")
def layer_norm_tokens():
    """LN over the features pins them; the hidden layer before it stays prunable."""
    m = Net(lambda s, x: s.l3(s.ln(s.l2(F.gelu(s.l1(x))))), l1=nn.Linear(6, 8), l2=nn.Linear(8, 8),
            ln=nn.LayerNorm(8), l3=nn.Linear(8, 4))
    return m, torch.randn(N, 5, 6)


@example("layer_norm", "permute", expect_pin="layer_norm")
def layer_norm_channels_last():
    """ConvNeXt-style LN over channels (permute, LN, permute back): the channels are pinned."""

    def fwd(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        y = s.ln(y).permute(0, 3, 1, 2)
        return s.c3(torch.relu(s.c2(y)))

    m = Net(fwd, c1=conv(3, 8), ln=nn.LayerNorm(8), c2=conv(8, 6), c3=conv(6, 4))
    return m, img()


@example("layer_norm")
def layer_norm_spatial_functional():
    """F.layer_norm over (H, W) does not mix channels: they stay prunable."""
    m = Net(lambda s, x: s.c2(F.layer_norm(s.c1(x), (HW, HW))), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("layer_norm", expect_pin="layer_norm")
def rms_norm():
    m = Net(lambda s, x: s.l3(s.n(s.l2(torch.relu(s.l1(x))))), l1=nn.Linear(6, 8), l2=nn.Linear(8, 8),
            n=nn.RMSNorm(8), l3=nn.Linear(8, 4))
    return m, torch.randn(N, 5, 6)


# =============================================================================================
# unary
# =============================================================================================


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


# =============================================================================================
# prelu
# =============================================================================================


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


# =============================================================================================
# binary
# =============================================================================================


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


# =============================================================================================
# pool
# =============================================================================================


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


# =============================================================================================
# resample
# =============================================================================================


@example("resample")
def interpolate_forms():
    def fwd(s, x):
        y = F.interpolate(torch.relu(s.c1(x)), scale_factor=2, mode="nearest")
        y = s.up(y)
        y = F.interpolate(y, size=(7, 7), mode="bilinear", align_corners=False)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), up=nn.Upsample(scale_factor=2, mode="bilinear"), c2=conv(8, 4))
    return m, img()


# =============================================================================================
# cat / stack / split / narrow / slice / getitem
# =============================================================================================


@example("cat")
def cat_two_branches():
    def fwd(s, x):
        return s.c3(torch.relu(torch.cat([s.a(x), s.b(x)], dim=1)))

    m = Net(fwd, a=conv(3, 4), b=conv(3, 6), c3=conv(10, 4))
    return m, img()


@example("cat")
def cat_with_input_and_concat_spelling():
    """The input's channels are pinned at their offset; the conv's channels stay prunable."""

    def fwd(s, x):
        y = torch.concat((x, torch.relu(s.a(x))), 1)
        return s.c(torch.cat([y, s.b(x)], -3))

    m = Net(fwd, a=conv(3, 6), b=conv(3, 4), c=conv(13, 4))
    return m, img()


@example("cat", "pool", "shape_merge", "linear")
def cat_pool_flatten_linear():
    """GoogLeNet tail: concat -> pool -> flatten -> linear."""

    def fwd(s, x):
        y = torch.cat([torch.relu(s.a(x)), torch.relu(s.b(x))], 1)
        return s.fc(s.pool(y).flatten(1))

    m = Net(fwd, a=conv(3, 4), b=conv(3, 6), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(10, 3))
    return m, img()


@example("stack")
def stack_then_sum():
    def fwd(s, x):
        y = torch.stack([torch.relu(s.a(x)), torch.relu(s.b(x))], dim=0).sum(0)
        return s.c(y)

    m = Net(fwd, a=conv(3, 8), b=conv(3, 8), c=conv(8, 4))
    return m, img()


@example("stack", "shape_merge")
def stack_then_flatten():
    """stack on a new axis 2, merge (C, 2) into 2C channels: channel c owns consumer columns 2c, 2c+1."""

    def fwd(s, x):
        y = torch.stack([torch.relu(s.a(x)), torch.relu(s.b(x))], dim=2)  # [N, 8, 2, H, W]
        return s.c(y.flatten(1, 2))

    m = Net(fwd, a=conv(3, 8), b=conv(3, 8), c=conv(16, 4))
    return m, img()


@example("split")
def chunk_method():
    def fwd(s, x):
        a, b = torch.relu(s.c1(x)).chunk(2, dim=1)
        return s.ca(a) + s.cb(b)

    m = Net(fwd, c1=conv(3, 8), ca=conv(4, 4), cb=conv(4, 4))
    return m, img()


@example("split")
def split_function_sizes():
    def fwd(s, x):
        a, b, c = torch.split(torch.relu(s.c1(x)), [2, 4, 2], dim=1)
        return s.ca(a) + s.cb(b) + s.cc(c)

    m = Net(fwd, c1=conv(3, 8), ca=conv(2, 4), cb=conv(4, 4), cc=conv(2, 4))
    return m, img()


@example("split")
def split_method_and_torch_chunk():
    def fwd(s, x):
        parts = torch.relu(s.c1(x)).split(3, 1)  # 3, 3, 2
        a, b = torch.chunk(torch.relu(s.c2(x)), 2, 1)
        return s.ca(parts[0]) + s.cb(parts[1]) + s.cc(parts[2]) + s.cd(a) + s.ce(b)

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 8), ca=conv(3, 4), cb=conv(3, 4), cc=conv(2, 4), cd=conv(4, 4),
            ce=conv(4, 4))
    return m, img()


@example("split", "cat", "channel_shuffle")
def shufflenet_unit():
    """ShuffleNetV2: split in two, transform one half, concat, channel shuffle."""

    def fwd(s, x):
        y = torch.relu(s.stem(x))
        a, b = y.chunk(2, dim=1)
        b = torch.relu(s.pw2(s.dw(torch.relu(s.pw1(b)))))
        y = F.channel_shuffle(torch.cat([a, b], 1), 2)
        return s.head(y)

    m = Net(fwd, stem=conv(3, 8), pw1=conv(4, 6, 1), dw=conv(6, 6, groups=6), pw2=conv(6, 4, 1), head=conv(8, 4))
    return m, img()


@example("narrow")
def narrow_forms():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.ca(y.narrow(1, 0, 3)) + s.cb(torch.narrow(y, 1, 3, 5))

    m = Net(fwd, c1=conv(3, 8), ca=conv(3, 4), cb=conv(5, 4))
    return m, img()


@example("slice", "narrow", "batch_norm", frontend="export")
def slice_export():
    """torch.export turns x[:, a:b] into aten.slice.Tensor (and narrow into aten.narrow)."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.bn(s.c1(x)))
        return s.ca(y[:, :3]) + s.cb(y[:, 3:-1]) + s.cc(y.narrow(1, 7, 1)) + s.cd(y[:, 2:6])

    m = Net(fwd, c1=conv(3, 8), bn=nn.BatchNorm2d(8), ca=conv(3, 4), cb=conv(4, 4), cc=conv(1, 4), cd=conv(4, 4))
    return m.eval(), img()


@example("getitem")
def getitem_slices():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.ca(y[:, :3]) + s.cb(y[:, 3:-2]) + s.cc(y[:, -2:]) + s.cd(y[..., 2:6, :, :])

    m = Net(fwd, c1=conv(3, 8), ca=conv(3, 4), cb=conv(3, 4), cc=conv(2, 4), cd=conv(4, 4))
    return m, img()


@example("getitem", "split")
def getitem_on_split_tuple():
    def fwd(s, x):
        parts = torch.relu(s.c1(x)).split([5, 3], dim=1)
        return s.ca(parts[0]) + s.cb(parts[-1])

    m = Net(fwd, c1=conv(3, 8), ca=conv(5, 4), cb=conv(3, 4))
    return m, img()


# =============================================================================================
# reshape / shape_merge / permute / expand / channel_shuffle
# =============================================================================================


def _head(view):
    def fwd(s, x):
        y = torch.relu(s.c1(x))  # [N, 4, 5, 5]
        return s.fc(view(y))

    m = Net(fwd, c1=conv(3, 4), fc=nn.Linear(4 * HW * HW, 3))
    return m, img()


@example("reshape")
def view_literal():
    return _head(lambda y: y.view(-1, 4 * HW * HW))


@example("reshape", "size")
def view_size_driven():
    return _head(lambda y: y.view(y.size(0), -1))


@example("reshape")
def torch_reshape():
    return _head(lambda y: torch.reshape(y, (N, -1)))


@example("reshape", "size")
def reshape_shape_attr():
    return _head(lambda y: y.reshape(y.shape[0], 4 * HW * HW))


@example("reshape", "size", "binary")
def reshape_size_tuple():
    """n, c, h, w = y.size(); c * h * w is python arithmetic on sizes (the binary rule's size path)."""

    def view(y):
        n, c, h, w = y.size()
        return y.view(n, c * h * w)

    return _head(view)


@example("reshape", "numel", "arith", "size")
def view_numel():
    return _head(lambda y: y.view(y.size(0), y.numel() // y.size(0)))


@example("reshape")
def reshape_to_conv1d():
    """[N, C, H, W] -> [N, C, H*W]: the channel axis passes through, a Conv1d reads it."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.c2(y.reshape(N, 8, HW * HW))

    m = Net(fwd, c1=conv(3, 8), c2=nn.Conv1d(8, 4, 1))
    return m, img()


@example("reshape", "permute", "size", "arith")
def manual_channel_shuffle():
    """view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w): channel j of every group is one row."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("reshape", "permute")
def head_split_literal():
    """[N, L, 8] -> [N, L, 2, 4] heads: literal sizes are rewritten."""

    def fwd(s, x):
        y = s.l1(x).view(N, 5, 2, 4).permute(0, 2, 1, 3)  # [N, 2, L, 4]
        y = torch.relu(y).permute(0, 2, 1, 3).reshape(N, 5, 8)
        return s.l2(y)

    m = Net(fwd, l1=nn.Linear(6, 8), l2=nn.Linear(8, 3))
    return m, torch.randn(N, 5, 6)


@example("shape_merge")
def flatten_forms():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.fc1(s.flat(y)) + s.fc2(y.flatten(1)) + s.fc3(torch.flatten(y, start_dim=1))

    m = Net(fwd, c1=conv(3, 4), flat=nn.Flatten(), fc1=nn.Linear(100, 3), fc2=nn.Linear(100, 3), fc3=nn.Linear(100, 3))
    return m, img()


@example("shape_merge", "pool")
def squeeze_unsqueeze():
    def fwd(s, x):
        y = s.pool(torch.relu(s.c1(x))).squeeze(-1).squeeze(-1)  # [N, 8]
        y = torch.relu(s.l1(y)).unsqueeze(-1)  # [N, 6, 1]
        return s.c2(torch.unsqueeze(y, -1))

    m = Net(fwd, c1=conv(3, 8), pool=nn.AdaptiveAvgPool2d(1), l1=nn.Linear(8, 6), c2=conv(6, 4, 1))
    return m, img()


@example("shape_merge")
def unflatten_forms():
    """flatten (C, H, W) and unflatten it back: the method, torch.unflatten and nn.Unflatten (sizes rewritten)."""

    def fwd(s, x):
        y = torch.relu(s.c1(x)).flatten(1).unflatten(1, (8, HW, HW))
        y = torch.unflatten(torch.relu(s.c2(y)).flatten(2), 2, (HW, HW))
        return s.c3(s.unflat(torch.relu(y).flatten(1)))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 6), unflat=nn.Unflatten(1, (6, HW, HW)), c3=conv(6, 4))
    return m, img()


@example("permute", "linear")
def channels_last_linear():
    """permute to channels-last, nn.Linear over channels, permute back."""

    def fwd(s, x):
        y = torch.relu(s.c1(x)).permute(0, 2, 3, 1)
        y = torch.relu(s.fc(y)).permute(0, 3, 1, 2)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 6), c2=conv(6, 4))
    return m, img()


@example("permute")
def transpose_movedim():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        y = y.transpose(1, 3)  # [N, W, H, C]
        y = s.fc(y).movedim(-1, 1)  # [N, 6, W, H]
        return s.c2(torch.transpose(y, 2, 3))

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 6), c2=conv(6, 4))
    return m, img()


@example("expand")
def expand_gate():
    """a [N, C, 1, 1] gate expanded with -1 and with a literal channel count (rewritten)."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        g = torch.relu(s.g(F.adaptive_avg_pool2d(y, 1)))
        y = y * g.expand(-1, -1, HW, HW) + y * g.expand(N, 8, HW, HW)
        return s.c2(y)

    m = Net(fwd, c1=conv(3, 8), g=nn.Conv2d(8, 8, 1), c2=conv(8, 4))
    return m, img()


@example("expand_as")
def expand_as_gate():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        g = torch.sigmoid(s.g(y.mean((2, 3), keepdim=True)))
        return s.c2(y * g.expand_as(y))

    m = Net(fwd, c1=conv(3, 8), g=nn.Conv2d(8, 8, 1), c2=conv(8, 4))
    return m, img()


@example("channel_shuffle")
def channel_shuffle_module():
    m = Net(lambda s, x: s.c2(s.shuffle(torch.relu(s.c1(x)))), c1=conv(3, 8), shuffle=nn.ChannelShuffle(2),
            c2=conv(8, 4))
    return m, img()


@example("channel_shuffle")
def channel_shuffle_grouped():
    """shuffle -> grouped conv: rows {j, j+4} of the shuffle pair up inside each conv group (2 rows)."""

    def fwd(s, x):
        y = torch.channel_shuffle(torch.relu(s.c1(x)), 2)
        return s.c2(torch.relu(s.g2(y)))

    m = Net(fwd, c1=conv(3, 8), g2=conv(8, 8, 1, groups=2), c2=conv(8, 4))
    return m, img()


# =============================================================================================
# reduce / softmax
# =============================================================================================


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


# =============================================================================================
# size / numel / arith (sizes driving shapes)
# =============================================================================================


@example("size", "expand")
def size_driven_expand():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        g = torch.relu(s.g(y.mean((2, 3), keepdim=True)))
        return s.c2(y + g.expand(y.size(0), y.size(1), y.size(2), y.size(3)))

    m = Net(fwd, c1=conv(3, 8), g=nn.Conv2d(8, 8, 1), c2=conv(8, 4))
    return m, img()


# =============================================================================================
# attention: heads, sdpa, nn.MultiheadAttention, einsum, addmm
# =============================================================================================

H_, HD_ = 2, 4  # heads, head width
E_ = H_ * HD_


def _heads(s, t, x):
    """[N, L, E] -> [N, H, L, hd]"""
    return t.view(x.shape[0], x.shape[1], H_, HD_).transpose(1, 2)


def _merge(o, x):
    return o.transpose(1, 2).reshape(x.shape[0], x.shape[1], E_)


def _qkvo():
    return dict(q=nn.Linear(6, E_), k=nn.Linear(6, E_), v=nn.Linear(6, E_), o=nn.Linear(E_, 3))


@example("attention", "reshape", "permute")
def sdpa_heads():
    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        return s.o(_merge(F.scaled_dot_product_attention(q, k, v), x))

    return Net(fwd, **_qkvo()), torch.randn(N, 5, 6)


@example("attention", frontend="export")
def sdpa_heads_export():
    def fwd(s, x):
        _force_export(x)
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        return s.o(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True), x))

    return Net(fwd, **_qkvo()), torch.randn(N, 5, 6)


@example("attention")
def sdpa_grouped_query_heads():
    """4 query heads read 2 key/value heads (enable_gqa): each kv head and its 2 query heads are one row."""

    def fwd(s, x):
        q = s.q(x).view(N, 5, 4, HD_).transpose(1, 2)
        k, v = (p(x).view(N, 5, 2, HD_).transpose(1, 2) for p in (s.k, s.v))
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return s.o(o.transpose(1, 2).reshape(N, 5, 4 * HD_))

    m = Net(fwd, q=nn.Linear(6, 4 * HD_), k=nn.Linear(6, 2 * HD_), v=nn.Linear(6, 2 * HD_), o=nn.Linear(4 * HD_, 3))
    return m, torch.randn(N, 5, 6)


@example("matmul", "softmax")
def eager_heads_matmul():
    """Attention written out: q k^T / sqrt(hd), softmax, @ v, per head."""

    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        a = torch.softmax(q @ k.transpose(-1, -2) * HD_ ** -0.5, dim=-1)
        return s.o(_merge(a @ v, x))

    return Net(fwd, **_qkvo()), torch.randn(N, 5, 6)


@example("einsum", "split")
def einsum_heads():
    """Packed qkv, chunked, heads split and contracted with einsum (torchvision MaxViT's spelling)."""

    def fwd(s, x):
        c = torch.chunk(s.qkv(x), 3, dim=-1)
        q, k, v = (c[i].reshape(N, 5, H_, HD_).permute(0, 2, 1, 3) for i in range(3))
        a = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        return s.o(o.permute(0, 2, 1, 3).reshape(N, 5, E_))

    return Net(fwd, qkv=nn.Linear(6, 3 * E_), o=nn.Linear(E_, 3)), torch.randn(N, 5, 6)


@example("einsum")
def einsum_channel_mix():
    """einsum with a weight: 'bci,co->boi' is a 1x1 conv; the output channels are the weight's."""

    def fwd(s, x):
        y = torch.relu(s.c1(x)).flatten(2)
        z = torch.einsum("bci,co->boi", y, s.w)
        return s.c2(z.unflatten(2, (HW, HW)))

    return Net(fwd, c1=conv(3, 8), w=nn.Parameter(torch.randn(8, 6)), c2=conv(6, 4)), img()


@example("unbind", "select", "getitem")
def packed_qkv_unbind_select():
    """[N, L, 3, H, hd] permuted to [3, N, H, L, hd], then q = t[0] / t.select(0, 1) / unbind."""

    def fwd(s, x):
        t = s.qkv(x).reshape(N, 5, 3, H_, HD_).permute(2, 0, 3, 1, 4)
        q, k = t[0], t.select(0, 1)
        v = t.unbind(0)[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return s.o((a @ v).transpose(1, 2).reshape(N, 5, E_))

    return Net(fwd, qkv=nn.Linear(6, 3 * E_), o=nn.Linear(E_, 3)), torch.randn(N, 5, 6)


@example("index", "where", "check", frontend="export")
def relative_bias_table_export():
    """A per-head bias table gathered by a position index (Swin), masked with where: column h joins head h."""

    def fwd(s, x):
        _force_export(x)
        x = x.to(torch.float32)  # export checks the dtype with _assert_tensor_metadata
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        bias = s.table[s.pos].permute(2, 0, 1)  # [H, L, L]
        bias = torch.where(s.allowed, bias, -1e4)
        a = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return s.o(_merge(a @ v, x))

    m = Net(fwd, table=nn.Parameter(torch.randn(9, H_)), **_qkvo())
    m.register_buffer("pos", (torch.arange(5)[:, None] - torch.arange(5)[None, :] + 4))
    m.register_buffer("allowed", torch.rand(5, 5) > 0.2)
    return m, torch.randn(N, 5, 6)


@example("getitem")
def gather_rows_symbolic():
    """table[idx] with a buffer index under symbolic_trace: the table's columns pass as channels."""

    def fwd(s, x):
        y = s.l1(x)  # [N, 5, 8]
        return s.l2(y + s.table[s.idx])

    m = Net(fwd, l1=nn.Linear(6, 8), table=nn.Parameter(torch.randn(7, 8)), l2=nn.Linear(8, 3))
    m.register_buffer("idx", torch.tensor([0, 3, 3, 6, 1]))
    return m, torch.randn(N, 5, 6)


@example("roll")
def roll_spatial():
    m = Net(lambda s, x: s.c2(torch.roll(torch.relu(s.c1(x)), shifts=(1, -2), dims=(2, 3))), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


@example("addmm")
def addmm_conv1d():
    """Hugging Face's Conv1D: bias + x @ W with W [in, out]."""

    def fwd(s, x):
        y = torch.addmm(s.b1, x.view(-1, 6), s.w1).view(N, 5, 8)
        return torch.addmm(s.b2, torch.relu(y).view(-1, 8), s.w2)

    m = Net(fwd, w1=nn.Parameter(torch.randn(6, 8)), b1=nn.Parameter(torch.randn(8)),
            w2=nn.Parameter(torch.randn(8, 3)), b2=nn.Parameter(torch.randn(3)))
    return m, torch.randn(N, 5, 6)


@example("ndim")
def ndim_branch():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        torch._assert(y.dim() == 4, "expected a batch of images")  # torchvision's rank checks
        return s.c2(y)

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


def _mha(batch_first=True, need_weights=False, average=True, kdim=None, bias_kv=False, mask=False, use_weights=False,
         force_export=False):
    def fwd(s, x):
        if force_export:
            _force_export(x)
        h = s.inp(x)  # [N, L, E] (or [L, N, E])
        kv = s.kv(x) if kdim else h
        o, w = s.mha(h, kv, kv, need_weights=need_weights, average_attn_weights=average,
                     key_padding_mask=s.pad if mask else None)
        y = s.out(o)
        if use_weights:
            # per-head weights are summed over heads through a per-head gate (zero with its head's row)
            y = y + s.wl(w.transpose(-1, -2) if average else (w * s.g).sum(1))[..., :1].sum(-1, keepdim=True)
        return y

    x = torch.randn(N, 5, 6) if batch_first else torch.randn(5, N, 6)
    members = dict(inp=nn.Linear(6, E_), mha=nn.MultiheadAttention(E_, H_, batch_first=batch_first, kdim=kdim,
                                                                   vdim=kdim, add_bias_kv=bias_kv),
                   out=nn.Linear(E_, 3))
    if kdim:
        members["kv"] = nn.Linear(6, kdim)
    if use_weights:
        members["wl"] = nn.Linear(5, 5)
        if not average:
            members["g"] = nn.Parameter(torch.rand(H_, 1, 1) + 0.5)
    m = Net(fwd, **members)
    m.register_buffer("pad", torch.tensor([[False, False, False, False, True]] * N))
    return m, x


@example("multihead_attention")
def mha_batch_first():
    return _mha()


@example("multihead_attention")
def mha_seq_first_need_weights_unused():
    return _mha(batch_first=False, need_weights=True)


@example("multihead_attention")
def mha_kdim_bias_kv_padding_mask():
    return _mha(kdim=5, bias_kv=True, mask=True)


@example("attention", "reshape", frontend="export")
def mha_batch_first_export():
    """torch.export decomposes nn.MultiheadAttention: heads merged with the batch axis, then split out."""
    return _mha(force_export=True)


@example("matmul", "reshape", frontend="export")
def mha_seq_first_export():
    """need_weights=True: export spells the attention as bmm, softmax, bmm (its unused mean is dropped)."""
    return _mha(batch_first=False, need_weights=True, force_export=True)


@example("multihead_attention", expect_pin="averaged over heads")
def mha_averaged_weights_used():
    return _mha(need_weights=True, use_weights=True)


@example("multihead_attention")
def mha_per_head_weights_used():
    return _mha(need_weights=True, average=False, use_weights=True)


@example("normalize", "binary")
def cosine_attention_heads():
    """Swin v2's cosine attention: q and k normalised over head_dim, a per-head logit scale (clamped, exp)."""

    def fwd(s, x):
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        a = (a * torch.clamp(s.scale, max=4.0).exp()).softmax(-1)
        return s.o(_merge(a @ v, x))

    return Net(fwd, scale=nn.Parameter(torch.rand(H_, 1, 1)), **_qkvo()), torch.randn(N, 5, 6)


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
