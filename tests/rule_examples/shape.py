"""Examples for the shape rules (cat, stack, unbind, split, reshape, shape_merge, permute, expand,
expand_as, channel_shuffle, pixel_shuffle): passes/rules/shape.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _qkvo, conv, E_, example, H_, HD_, HW, img, N, Net


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


@example("split", frontend="export")
def tensor_split_indices_exported():
    """torch.tensor_split at indices (Mamba 2 splits its input projection so): aten.tensor_split.indices."""

    def fwd(s, x):
        _force_export(x)
        a, b, c = torch.tensor_split(torch.relu(s.c1(x)), [2, 6], dim=1)
        d, e = torch.relu(s.c2(x)).tensor_split(2, dim=1)
        return s.ca(a) + s.cb(b) + s.cc(c) + s.cd(d) + s.ce(e)

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 8), ca=conv(2, 4), cb=conv(4, 4), cc=conv(2, 4), cd=conv(4, 4),
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


@example("reshape", "permute", "size", pinned="mixed with a token or pixel axis")
def reshape_tokens_back_without_a_permute():
    """MAnet's attention: [N, HW, C].reshape(N, C, H, W) (no permute) mixes channels with pixels, in blocks that
    depend on H*W: the channels are pinned, not tied in the example's blocks."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        n, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)  # [N, HW, C]
        return s.c2(y + t.reshape(n, c, h, w))

    m = Net(fwd, c1=conv(3, 8), c2=conv(8, 4))
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


@example("view_as")
def view_as_heads_merged_back():
    """Heads merged back with view_as(the projection's output): both shapes shrink together."""

    def fwd(s, x):
        p = s.q(x)
        q = p.view(x.shape[0], x.shape[1], H_, HD_).transpose(1, 2)
        a = torch.relu(q).transpose(1, 2).contiguous().view_as(p)
        return s.o(a * torch.sigmoid(p))

    m = Net(fwd, q=nn.Linear(6, E_), o=nn.Linear(E_, 3))
    return m, torch.randn(N, 5, 6)


@example("complex_view", frontend="export")
def rotary_as_complex_heads():
    """Llama 4's rotary embedding: q and k's head_dim read as complex pairs, times a complex table, read back."""

    def fwd(s, x):
        q, k, v = (_heads(s, t, x) for t in (s.q(x), s.k(x), s.v(x)))  # [N, H, T, d]
        rot = torch.polar(torch.ones_like(s.ang), s.ang)

        def rope(t):
            c = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
            return torch.view_as_real(c * rot).flatten(3)

        a = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return s.o(_merge(a, x))

    m = Net(fwd, **_qkvo())
    m.register_buffer("ang", torch.arange(5.0)[:, None] * torch.arange(1.0, HD_ // 2 + 1)[None])
    return m, torch.randn(N, 5, 6)


@example("expand", "repeat")
def multi_query_heads_copies():
    """Multi-query attention (GPT-BigCode, Falcon): one key/value head (a size-1 axis) expanded or
    repeated to every query head; each query head is a row of its own, with its copies of k and v."""

    def fwd(s, x):
        q = _heads(s, s.q(x), x)  # [N, H, L, hd]
        k = s.k(x).unsqueeze(1).expand(-1, H_, -1, -1)  # [N, 1, L, hd] -> [N, H, L, hd]
        v = s.v(x).unsqueeze(1).repeat(1, H_, 1, 1)
        return s.o(_merge(F.scaled_dot_product_attention(q, k, v), x))

    return Net(fwd, q=nn.Linear(6, E_), k=nn.Linear(6, HD_), v=nn.Linear(6, HD_), o=nn.Linear(E_, 3)), torch.randn(N, 5, 6)


@example("repeat_interleave")
def repeat_interleave_channels():
    """Each channel repeated r times in place (grouped-query heads expanded): a channel goes with its copies."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.c2(y.repeat_interleave(2, dim=1)) + s.c3(torch.repeat_interleave(y, 3, dim=1))

    m = Net(fwd, c1=conv(3, 4), c2=conv(8, 4), c3=conv(12, 4))
    return m, img()


@example("repeat_interleave", frontend="export")
def repeat_interleave_one_group_to_heads():
    """Mamba 2's B/C: one group (a pinned size-1 axis) repeated to every head; each head drops its copy
    (the repeat count follows), the heads' own channels stay groups."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x)).view(x.shape[0], 4, 2, HW, HW)  # 4 heads of 2
        b = s.c2(x).unsqueeze(1)  # [N, 1, 2, H, W]: one group
        z = (y * b.repeat_interleave(4, dim=1)).flatten(1, 2)
        return s.c3(z)

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 2), c3=conv(8, 4))
    return m, img()


@example("pixel_shuffle")
def pixel_shuffle_upsampler():
    """ESPCN's sub-pixel upsampler: conv to 4 * 4 channels, PixelShuffle(2); a row is a block of 4 of
    the conv's channels (one output channel)."""
    m = Net(lambda s, x: s.c3(s.ps(torch.relu(s.c2(torch.relu(s.c1(x)))))), c1=conv(3, 8), c2=conv(8, 16),
            ps=nn.PixelShuffle(2), c3=conv(4, 3))
    return m, img()


@example("pixel_shuffle")
def pixel_unshuffle_downsampler():
    """PixelUnshuffle(2): one input channel becomes 4 consecutive output channels (one row of 4 of c2's
    input columns)."""
    m = Net(lambda s, x: s.c2(s.pu(torch.relu(s.c1(x)))), c1=conv(3, 6), pu=nn.PixelUnshuffle(2), c2=conv(24, 4))
    return m, torch.randn(N, 3, 6, 6)


@example("pixel_shuffle")
def pixel_shuffle_functional_round_trip():
    """F.pixel_shuffle(3) then F.pixel_unshuffle(3) (keyword factor): blocks of 9 channels, spread and
    gathered back, between two prunable convs; a residual ties the round trip to its input."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))  # [N, 18, 5, 5]
        z = F.pixel_unshuffle(torch.relu(F.pixel_shuffle(y, upscale_factor=3)), downscale_factor=3)
        return s.c2(z + y)

    m = Net(fwd, c1=conv(3, 18), c2=conv(18, 4))
    return m, img()


@example("pixel_shuffle", frontend="export")
def pixel_shuffle_exported():
    """aten.pixel_shuffle / aten.pixel_unshuffle (torch.export), with a batch-norm on the shuffled channels."""

    def fwd(s, x):
        _force_export(x)
        y = s.bn(s.ps(torch.relu(s.c1(x))))  # [N, 2, 10, 10]
        return s.c3(torch.relu(s.c2(s.pu(torch.relu(y)))))

    m = Net(fwd, c1=conv(3, 8), ps=nn.PixelShuffle(2), bn=nn.BatchNorm2d(2), pu=nn.PixelUnshuffle(2),
            c2=conv(8, 6), c3=conv(6, 4))
    return m.eval(), img()
