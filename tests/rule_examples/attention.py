"""Examples for the attention rules (attention, multihead_attention): passes/rules/attention.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _mha, _qkvo, conv, example, HD_, HW, img, N, Net


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


@example("multihead_attention", expect_pin="averaged over heads")
def mha_averaged_weights_used():
    return _mha(need_weights=True, use_weights=True)


@example("multihead_attention")
def mha_per_head_weights_used():
    return _mha(need_weights=True, average=False, use_weights=True)


class _AttentionPool(nn.Module):
    """CLIP's ModifiedResNet AttentionPool2d: the mean token and the pixels attend through
    F.multi_head_attention_forward with separate (or packed) projections and the output projection."""

    def __init__(self, c: int = 8, heads: int = 2, out: int = 5, packed: bool = False):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(HW * HW + 1, c) / c ** 0.5)
        self.q, self.k, self.v, self.c = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, out)
        self.heads, self.packed = heads, packed

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.pos[:, None, :]
        w = dict(use_separate_proj_weight=True, q_proj_weight=self.q.weight, k_proj_weight=self.k.weight,
                 v_proj_weight=self.v.weight, in_proj_weight=None)
        if self.packed:
            w = dict(in_proj_weight=torch.cat([self.q.weight, self.k.weight, self.v.weight]))
        y, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            in_proj_bias=torch.cat([self.q.bias, self.k.bias, self.v.bias]), bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c.weight, out_proj_bias=self.c.bias,
            training=self.training, need_weights=False, **w)
        return y[0]


@example("multi_head_attention_forward", "cat")
def attention_pool_function():
    """The pooled stream's channels go in blocks of a head's width, with their head (E is split into heads)."""
    m = Net(lambda s, x: s.pool(torch.relu(s.c1(x))), c1=conv(3, 8), pool=_AttentionPool())
    return m, img()


@example("multi_head_attention_forward")
def attention_pool_function_packed():
    m = Net(lambda s, x: s.pool(torch.relu(s.c1(x))), c1=conv(3, 8), pool=_AttentionPool(packed=True))
    return m, img()
