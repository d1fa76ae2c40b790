"""Examples for the attention rules (attention, multihead_attention): passes/rules/attention.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _mha, _qkvo, example, HD_, N, Net


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
