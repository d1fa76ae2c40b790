"""Examples for the linalg rules (conv, linear, embedding, matmul, addmm, einsum): passes/rules/linalg.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (
    _force_export, _heads, _merge, _mha, _qkvo, conv, E_, example,
    H_, HD_, HW, img, N, Net,
)


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


def _wn(module, dim=0):
    from torch.nn.utils.parametrizations import weight_norm

    return weight_norm(module, dim=dim)


@example("conv", "unary")
def conv_weight_norm():
    """torch.nn.utils.parametrizations.weight_norm on both convs: g (original0) owns the rows, v is
    sliced with them; the consumer's v columns stay non-zero and g is refit on removal."""
    m = Net(lambda s, x: s.c2(F.leaky_relu(s.c1(x), 0.1)), c1=_wn(conv(3, 8)), c2=_wn(conv(8, 4)))
    return m, img()


@example("conv")
def conv_transpose_weight_norm():
    """ConvTranspose2d under weight_norm's default dim 0 (its input axis): g sits on the input
    channels, v is the zeroable slice of each output channel."""
    m = Net(lambda s, x: s.c2(torch.relu(s.t(torch.relu(s.c1(x))))), c1=_wn(conv(3, 8)),
            t=_wn(nn.ConvTranspose2d(8, 6, 2, stride=2)), c2=_wn(conv(6, 4)))
    return m, img()


@example("linear")
def mlp_weight_norm():
    """Linear layers under weight_norm, dim 0, dim 1 and the whole-tensor norm (dim=None)."""
    m = Net(lambda s, x: s.l3(F.gelu(s.l2(F.gelu(s.l1(x))))), l1=_wn(nn.Linear(6, 8)),
            l2=_wn(nn.Linear(8, 8), dim=1), l3=_wn(nn.Linear(8, 4), dim=None))
    return m, torch.randn(N, 5, 6)


@example("weight_norm", "conv")
def weight_norm_functional():
    """torch._weight_norm(v, g, 0) feeding F.conv2d (the op the parametrisation calls)."""
    def fwd(s, x):
        return s.c2(torch.relu(F.conv2d(torch.relu(s.c1(x)), torch._weight_norm(s.v, s.g, 0), s.b, padding=1)))

    v = torch.randn(6, 8, 3, 3) * 0.3
    m = Net(fwd, c1=conv(3, 8), v=nn.Parameter(v), g=nn.Parameter(torch.rand(6, 1, 1, 1) + 0.5),
            b=nn.Parameter(torch.randn(6)), c2=conv(6, 4))
    return m, img()


@example("weight_norm", "conv", frontend="export")
def weight_norm_export():
    """The parametrised layers through torch.export: aten._weight_norm on the two parameters."""
    def fwd(s, x):
        _force_export(x)
        return s.c2(torch.relu(s.t(torch.relu(s.c1(x)))))

    m = Net(fwd, c1=_wn(conv(3, 8)), t=_wn(nn.ConvTranspose2d(8, 6, 2, stride=2)), c2=_wn(conv(6, 4), dim=None))
    return m, img()


@example("weight_norm", "linear", expect_pin="read by something other than a conv or linear")
def weight_norm_read_by_matmul():
    """A weight-normed weight used in a matmul: pinned (v's rows are not zeroable there); the MLP around it prunes."""
    def fwd(s, x):
        return torch.relu(s.l2(torch.relu(s.l1(x)))) @ torch._weight_norm(s.v, s.g, 0).t()

    m = Net(fwd, l1=nn.Linear(6, 8), l2=nn.Linear(8, 8), v=nn.Parameter(torch.randn(4, 8) * 0.3),
            g=nn.Parameter(torch.rand(4, 1) + 0.5))
    return m, torch.randn(N, 6)


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


@example("embedding")
def embedding_module():
    m = Net(lambda s, i: s.l2(torch.relu(s.l1(s.emb(i)))), emb=nn.Embedding(10, 8), l1=nn.Linear(8, 6),
            l2=nn.Linear(6, 3))
    return m, torch.randint(0, 10, (N, 5))


@example("embedding")
def embedding_functional():
    m = Net(lambda s, i: s.l(F.embedding(i, s.table)), table=nn.Parameter(torch.randn(10, 8)), l=nn.Linear(8, 3))
    return m, torch.randint(0, 10, (N, 5))


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


@example("addmm")
def addmm_conv1d():
    """Hugging Face's Conv1D: bias + x @ W with W [in, out]."""

    def fwd(s, x):
        y = torch.addmm(s.b1, x.view(-1, 6), s.w1).view(N, 5, 8)
        return torch.addmm(s.b2, torch.relu(y).view(-1, 8), s.w2)

    m = Net(fwd, w1=nn.Parameter(torch.randn(6, 8)), b1=nn.Parameter(torch.randn(8)),
            w2=nn.Parameter(torch.randn(8, 3)), b2=nn.Parameter(torch.randn(3)))
    return m, torch.randn(N, 5, 6)


@example("matmul", "reshape", frontend="export")
def mha_seq_first_export():
    """need_weights=True: export spells the attention as bmm, softmax, bmm (its unused mean is dropped)."""
    return _mha(batch_first=False, need_weights=True, force_export=True)


class FusedExperts(nn.Module):
    """Mixture of experts with fused [E, 2I, H] / [E, H, I] parameters and grouped mm (Hugging Face
    transformers 5's layout): top-2 routing by data, each expert's width I one kind of row."""

    def __init__(self, h=8, i=8, e=3):
        super().__init__()
        self.inp = nn.Linear(6, h)
        self.router = nn.Linear(h, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) / h ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(e, h, i) / i ** 0.5)
        self.out = nn.Linear(h, 3)
        self.e = e

    def forward(self, x):
        h = self.inp(x).reshape(-1, self.inp.out_features)  # [T, H]
        w, top = self.router(h).softmax(-1).topk(2, dim=-1)  # [T, 2]
        ids, perm = torch.sort(top.reshape(-1))
        hs = h[perm // 2]
        offs = torch.cumsum(torch.histc(ids.float(), bins=self.e, min=0, max=self.e - 1), 0).to(torch.int32)
        gate, up = F.grouped_mm(hs, self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        y = y * w.reshape(-1)[perm].unsqueeze(-1)
        out = torch.zeros_like(h).index_add(0, perm // 2, y)
        return self.out(out.reshape(x.shape[0], x.shape[1], -1))


@example("grouped_mm")
def fused_experts_grouped_mm():
    """Channel i of every expert's [2I] and [I] slices is one row (the fused layout keeps experts
    equal-width); experts themselves are chosen by data and stay (a zero expert still takes a slot)."""
    return FusedExperts(), torch.randn(N, 5, 6)


@example("baddbmm", frontend="export")
def baddbmm_alibi_scores_keep_heads():
    """BLOOM's scores: baddbmm(alibi [N * H, 1, L], q, k^T) with heads merged into the batch axis."""

    def fwd(s, x):
        n, l = x.shape[0], x.shape[1]
        q, k, v = (_heads(s, p(x), x).reshape(n * H_, l, -1) for p in (s.q, s.k, s.v))
        alibi = s.slopes.view(1, H_, 1, 1).expand(n, H_, 1, l).reshape(n * H_, 1, l) * s.pos
        a = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.5).softmax(-1)
        return s.o(_merge(torch.bmm(a, v).view(n, H_, l, -1), x))

    m = Net(fwd, **_qkvo())
    m.register_buffer("slopes", torch.tensor([0.5, 0.25]))
    m.register_buffer("pos", torch.arange(5.0))
    return m, torch.randn(N, 5, 6)


def _token_mixer(mix, norm=None, tok=None):
    """MLP-Mixer's token mixing: ``mix`` (a layer ``tok`` along the token axis of [N, C, T]) between a
    channel producer and a norm over C; the head's hidden layer keeps a group either way."""

    def fwd(s, x):  # x: [N, T, 6]
        h = s.a(x)  # [N, T, 8]: a's rows
        h = mix(s, h)  # [N, T, 8], tokens mixed; with a bias a zero channel comes out as the bias
        if norm is not None:
            h = s.norm(h)
        return s.o(torch.relu(s.b(h)))

    members = dict(a=nn.Linear(6, 8), tok=tok if tok is not None else nn.Linear(5, 5), b=nn.Linear(8, 6),
                   o=nn.Linear(6, 3))
    if norm is not None:
        members["norm"] = norm
    return Net(fwd, **members), torch.randn(N, 5, 6)


@example("linear", "rms_norm", expect_pin="rms_norm normalises over this axis")
def token_mixing_linear_bias_rms_norm():
    """Linear(T, T) with a bias on the transposed tensor: channel c comes out as tok.bias, not zero, so
    the RMS norm over C keeps every channel (its kept-divisor rewrite would be inexact)."""
    return _token_mixer(lambda s, h: s.tok(h.transpose(1, 2)).transpose(1, 2), nn.RMSNorm(8))


@example("linear", "layer_norm")
def token_mixing_linear_bias_layer_norm():
    """The same before a LayerNorm: channel c is the constant tok.bias when its row is zero, and the
    compressed norm fills that constant back into its mean and variance, so a's channels stay rows."""
    return _token_mixer(lambda s, h: s.tok(h.transpose(1, 2)).transpose(1, 2), nn.LayerNorm(8))


@example("linear", "rms_norm", expect_pin="rms_norm normalises over this axis")
def token_mixing_linear_bias_functional():
    """F.linear over the last axis of [N, C, T] with a bias (the Mixer's own layout, no transpose)."""
    return _token_mixer(lambda s, h: F.linear(h.transpose(1, 2), s.tok.weight, s.tok.bias).transpose(1, 2),
                        nn.RMSNorm(8))


@example("linear", "rms_norm")
def token_mixing_linear_no_bias_rms_norm():
    """Without a bias a zero channel stays zero through the token mixing: the RMS norm keeps a's rows."""
    return _token_mixer(lambda s, h: F.linear(h.transpose(1, 2), s.tok.weight).transpose(1, 2), nn.RMSNorm(8),
                        nn.Linear(5, 5, bias=False))


@example("linear")
def token_mixing_linear_bias_rows_stay():
    """With a bias but no norm after it, a's channels stay rows: the bias reaches b only through b's
    zeroed columns."""
    return _token_mixer(lambda s, h: s.tok(h.transpose(1, 2)).transpose(1, 2))


@example("linear", "rms_norm", frontend="export", expect_pin="rms_norm normalises over this axis")
def token_mixing_linear_bias_export():
    """aten.linear with a bias along the token axis (torch.export)."""

    def mix(s, h):
        _force_export(h)
        return s.tok(h.transpose(1, 2)).transpose(1, 2)

    return _token_mixer(mix, nn.RMSNorm(8))


@example("addmm", "rms_norm", expect_pin="rms_norm normalises over this axis")
def addmm_token_mixing_bias():
    """HF Conv1D's addmm along the token axis: bias [T] broadcast over the channel rows."""

    def mix(s, h):
        t = torch.addmm(s.tok.bias, h.transpose(1, 2).reshape(-1, 5), s.tok.weight.t())
        return t.view(N, 8, 5).transpose(1, 2)

    return _token_mixer(mix, nn.RMSNorm(8))


@example("baddbmm", "rms_norm", expect_pin="rms_norm normalises over this axis")
def baddbmm_token_mixing_bias():
    def mix(s, h):
        return torch.baddbmm(s.tok.bias, h.transpose(1, 2), s.tok.weight.t().expand(N, 5, 5)).transpose(1, 2)

    return _token_mixer(mix, nn.RMSNorm(8))


@example("conv", "rms_norm", expect_pin="rms_norm normalises over this axis")
def conv_bias_over_channel_batch_axis():
    """A Conv1d whose batch axis is a's channels ([8, N, T]): its bias makes a zero channel the bias."""

    def mix(s, h):
        return s.tok(h.permute(2, 0, 1)).permute(1, 2, 0)  # [8, N, T] -> conv over N -> [N, T, 8]

    return _token_mixer(mix, nn.RMSNorm(8), nn.Conv1d(N, N, 3, padding=1))


@example("embedding", "rms_norm", expect_pin="rms_norm normalises over this axis")
def embedding_of_channel_indices():
    """Indices computed from a's channels (a quantiser's codes): a zero channel reads the table's row 0,
    not zeros, so the RMS norm over those channels keeps them all."""

    def fwd(s, x):
        codes = (torch.relu(s.a(x)) * 3).to(torch.long).clamp(0, 9)  # [N, T, 8]
        e = s.emb(codes).sum(-1)  # [N, T, 8]
        return s.o(torch.relu(s.b(s.norm(e))))

    m = Net(fwd, a=nn.Linear(6, 8), emb=nn.Embedding(10, 4), norm=nn.RMSNorm(8), b=nn.Linear(8, 6), o=nn.Linear(6, 3))
    return m, torch.randn(N, 5, 6)


@example("grouped_mm", expect_pin="grouped mm assigns rows to groups by their position")
def grouped_mm_rows_are_channels():
    """x's rows are a's output channels ([16, K] after a transpose), cut into two groups by fixed offs:
    removing a row would move the rows after it to another group's weight, so they are pinned (the
    input layer's rows stay)."""

    def fwd(s, x):  # x: [8, 6]
        h = s.a(torch.relu(s.inp(x))).t()  # [16, 8]: rows are a's channels
        y = F.grouped_mm(h, s.w, offs=s.offs)  # [16, 8]
        return s.o(torch.relu(y).t())  # o reads the rows

    m = Net(fwd, inp=nn.Linear(6, 6), a=nn.Linear(6, 16), w=nn.Parameter(torch.randn(2, 8, 8) / 8 ** 0.5),
            o=nn.Linear(16, 3))
    m.register_buffer("offs", torch.tensor([8, 16], dtype=torch.int32))
    return m, torch.randn(8, 6)
