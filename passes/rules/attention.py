"""Attention: ``F.scaled_dot_product_attention`` (and its ATen op), ``nn.MultiheadAttention`` and
``F.multi_head_attention_forward`` called with the weights (CLIP's ModifiedResNet attention pool).

Heads are batch axes of the attention contraction: one head's q, k, v slices and its output
projection's columns are one row. Keys are mixed by the softmax and are never a row.

Internals:
    * Which factor of a reshaped projection is the head axis is decided before the rules run
      (``passes/attention.py``, ``find_head_splits``); these rules only tie what reaches them.
    * ``multihead_attention`` keeps its head ids in ``ctx.extra_labels`` for ``_mha_fix``, which
      swaps in a ``PrunedMultiheadAttention`` when heads or widths change; ``multi_head_attention_forward``
      keeps them for ``_mha_function_fix``, which only rewrites ``num_heads`` (its weights are parameters
      the prune pass slices where they live).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..channels import OWN, PINNED, AxisLabels, Ctx, false_mask, pinned_axis, true_mask
from ..registry import functions, modules, rule
from .common import _ov, _out_shape, _passthrough, _plus_constant

aten = torch.ops.aten


def _batch_ties(ctx: Ctx, shape, nb: int, ops, gqa: bool = False):
    """Ids and zero masks of the ``nb`` leading (batch) axes of ``shape`` from right-aligned operands.

    Axes of the full size are tied; a size-1 operand axis broadcasts. With ``gqa`` an operand
    whose axis has ``n / r`` entries is read by ``r`` consecutive output entries each (grouped
    heads), so each of its entries is tied to its ``r`` readers.
    """
    ids, zero = [], []
    for d in range(nb):
        n = shape[d]
        cands = []
        for v, zero_ok in ops:
            vd = d - (nb - (v.ndim - 2))
            if vd < 0:
                continue
            m = v.shape[vd]
            if m == n:
                cands.append((v.ids[vd], v.zero[vd] if zero_ok else false_mask(n)))
            elif gqa and m > 1 and n % m == 0:
                r = n // m
                cands.append((np.repeat(v.ids[vd], r), np.repeat(v.zero[vd], r) if zero_ok else false_mask(n)))
        if not cands:
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
            continue
        for c in cands[1:]:
            ctx.tie(cands[0][0], c[0])
        ids.append(cands[0][0])
        zero.append(np.logical_or.reduce([c[1] for c in cands]))
    return ids, zero


def _attention_fix(site, query, key, value, scale=None, **_):
    old, new = site.old(query), site.new(query)
    if scale is None and old is not None and new is not None and old[-1] != new[-1]:
        site.set("scale", 1.0 / math.sqrt(old[-1]))  # NB: the default scale reads head_dim, which shrank


@rule("attention", fix=_attention_fix)
def attention(ctx: Ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, meta=None, **_):
    """softmax(q k^T + mask) v: q and k contract over head_dim (one channel, zero on one side); batch axes (heads) of q, k, v, mask are one channel; keys are mixed; v's last axis passes to the output."""
    q, k, v = query, key, value
    shape = _out_shape(meta)
    ctx.tie(q.ids[-1], k.ids[-1])
    zk = q.zero[-1] | k.zero[-1]
    if not zk.all():
        ctx.pin(q.ids[-1][~zk], "contraction over a channel that is not zero when its row is")
    ctx.pin([k.ids[-2], v.ids[-2]], "softmax over the keys")
    ops = [(q, False), (k, False), (v, True)]
    mask = attn_mask if isinstance(attn_mask, AxisLabels) else None
    if mask is not None:
        ctx.pin(list(mask.ids[-2:]), "attention mask over queries and keys")
        if mask.ndim > 2:
            ops.append((mask, False))
    nb = len(shape) - 2
    ids, zero = _batch_ties(ctx, shape, nb, ops, gqa=bool(enable_gqa))
    ids += [q.ids[-2], v.ids[-1]]
    zero += [false_mask(shape[-2]), v.zero[-1]]
    return AxisLabels(tuple(ids), tuple(zero))


functions("attention", [F.scaled_dot_product_attention] + _ov(aten.scaled_dot_product_attention, "default"),
          ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))


def _mha_fix(site, query, **_):
    """Put a PrunedMultiheadAttention in place when any width of the attention changed."""
    from ..modules import PrunedMultiheadAttention

    m = site.module
    if m is None:
        return
    head_ids = site.plan.zigset.labels.get(site.node.name + ".heads")
    keep = site._keep_ids(head_ids) if head_ids is not None else np.ones(m.num_heads, dtype=bool)
    if isinstance(m, PrunedMultiheadAttention):
        # its weights are already sliced (and it reads any width): only the head count and the
        # original indices of the heads left change
        if not keep.all():
            m.num_heads = int(keep.sum())
            m.kept_heads = m.kept_heads[torch.from_numpy(np.nonzero(keep)[0])]
        return
    w = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight
    widths_same = (w.shape[1] == m.embed_dim and m.out_proj.weight.shape[0] == m.embed_dim and keep.all())
    if widths_same:
        return
    new = PrunedMultiheadAttention(m, int(keep.sum()), m.head_dim, torch.from_numpy(np.nonzero(keep)[0]).to(w.device),
                                   m.num_heads)
    parent, _, attr = site.node.target.rpartition(".")
    setattr(site.root.get_submodule(parent) if parent else site.root, attr, new)


@rule("multihead_attention", fix=_mha_fix)
def multihead_attention(ctx: Ctx, query, key, value, module=None, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False, meta=None, **_):
    """nn.MultiheadAttention: head h is one channel (its q, k, v rows of in_proj and its out_proj columns); the inputs' features are read by in_proj's columns, the output's by out_proj's rows; keys are mixed."""
    m, name = module, ctx.node.target
    H, hd = m.num_heads, m.head_dim
    heads = ctx.fresh(H)
    per_head = np.repeat(heads, hd)
    packed = m._qkv_same_embed_dim if isinstance(m, nn.MultiheadAttention) else m.packed  # or a pruned one
    if packed:
        ctx.tie(query.ids[-1], key.ids[-1])
        ctx.tie(query.ids[-1], value.ids[-1])
        ctx.tensor_lab(f"{name}.in_proj_weight", {0: np.concatenate([per_head] * 3), 1: query.ids[-1]})
    else:
        for part, x in (("q", query), ("k", key), ("v", value)):
            ctx.tensor_lab(f"{name}.{part}_proj_weight", {0: per_head, 1: x.ids[-1]})
    if m.in_proj_bias is not None:
        ctx.tensor_lab(f"{name}.in_proj_bias", {0: np.concatenate([per_head] * 3)})
    for b in ("bias_k", "bias_v"):
        if getattr(m, b) is not None:
            ctx.tensor_lab(f"{name}.{b}", {0: PINNED, 1: PINNED, 2: per_head})
    w_out = ctx.tensor_lab(f"{name}.out_proj.weight", {0: OWN, 1: per_head})
    if m.out_proj.bias is not None:
        ctx.tensor_lab(f"{name}.out_proj.bias", {0: w_out.ids[0]})
    batched = query.ndim == 3
    seq_axis = (1 if m.batch_first else 0) if batched else 0
    lab = _keys_masks_and_output(ctx, query, key, value, seq_axis, key_padding_mask, attn_mask, heads, w_out.ids[0],
                                 _out_shape(meta[0]))
    weights = None
    if meta[1] is not None:
        wshape = _out_shape(meta[1])
        weights = ctx.pinned_lab(wshape)
        used = _weights_used(ctx.node)
        if used and average_attn_weights:
            ctx.pin(heads, "attention weights averaged over heads are used")
        elif not average_attn_weights:
            ids = list(weights.ids)
            ids[-3] = heads
            weights = AxisLabels(tuple(ids), weights.zero)
    return (lab, weights)


def _keys_masks_and_output(ctx: Ctx, query, key, value, seq_axis: int, key_padding_mask, attn_mask, heads,
                           out_ids, o_shape) -> AxisLabels:
    """What multi-head attention does beside its projections (the module's and the function's): the keys
    are mixed, the masks pinned (a per-head one pins the heads); the output keeps the query's leading axes
    and has the output projection's rows (``out_ids``) as its channels. Keeps the head ids for the fix."""
    ctx.pin([key.ids[seq_axis], value.ids[seq_axis]], "attention mixes the keys")
    ctx.pin([v for v in (key_padding_mask, attn_mask) if isinstance(v, AxisLabels)], "attention mask")
    if isinstance(attn_mask, AxisLabels) and attn_mask.ndim == 3:
        ctx.pin(heads, "a per-head attention mask is given as an input")
    ctx.extra_labels[ctx.node.name + ".heads"] = heads
    lab = _passthrough(ctx, query, o_shape, {d: d for d in range(query.ndim - 1)}, handled=(query.ndim - 1,))
    # NB: a zero query token still attends: softmax(b_q k^T) v + b_out is not zero
    lab = _plus_constant(lab)
    return lab.with_axis(len(o_shape) - 1, out_ids, true_mask(len(out_ids)))


def _weights_used(node) -> bool:
    """Whether the attention weights (output 1 of the node) are read."""
    return any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and u.users
               for u in node.users)


def _mha_module(node, m, args, kwargs):
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    out = dict(zip(names, args))
    out.update(kwargs)
    out["module"] = m
    return out


def _mha_classes() -> list:
    from ..modules import PrunedMultiheadAttention

    return [nn.MultiheadAttention, PrunedMultiheadAttention]


# NB: the compressed model's PrunedMultiheadAttention goes through the same rule, so analysing a
# compressed model finds the same (whole-head) rows as the original, whatever the front-end
modules("multihead_attention", _mha_classes(), _mha_module, op="multihead_attention")


def _mha_function_fix(site, query, num_heads=None, embed_dim_to_check=None, **_):
    """The function's head count (and its embedding width, where the graph gives it as a number) follow the
    heads and channels removed."""
    head_ids = site.plan.zigset.labels.get(site.node.name + ".heads")
    if head_ids is None or not isinstance(num_heads, int):
        return
    keep = site._keep_ids(head_ids)
    if not keep.all():
        site.set("num_heads", int(keep.sum()))
    new = site.new(query)
    if isinstance(embed_dim_to_check, int) and new is not None and new[-1] != embed_dim_to_check:
        site.set("embed_dim_to_check", int(new[-1]))


@rule("multi_head_attention_forward", fix=_mha_function_fix, takes_sizes=True)
def multi_head_attention_forward(ctx: Ctx, query, key, value, embed_dim_to_check=None, num_heads=None,
                                 in_proj_weight=None, in_proj_bias=None, bias_k=None, bias_v=None,
                                 add_zero_attn=False, dropout_p=0.0, out_proj_weight=None, out_proj_bias=None,
                                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                 is_causal=False, meta=None, **_):
    """F.multi_head_attention_forward (CLIP's attention pool): head h is one channel, and so is the h-th block of the query's width (the function splits that width into heads: both shrink together); keys are mixed."""
    q, k, v = query, key, value
    out_shape = _out_shape(meta[0])
    weights = ctx.pinned_lab(_out_shape(meta[1])) if meta[1] is not None else None
    labs = [a for a in (q, k, v, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, q_proj_weight,
                        k_proj_weight, v_proj_weight, bias_k, bias_v, static_k, static_v, key_padding_mask, attn_mask)
            if isinstance(a, AxisLabels)]
    E = q.shape[-1] if isinstance(q, AxisLabels) else 0
    sep = bool(use_separate_proj_weight)
    ws = (q_proj_weight, k_proj_weight, v_proj_weight) if sep else (in_proj_weight,)
    plain = (isinstance(num_heads, int) and num_heads > 0 and E % num_heads == 0 and not add_zero_attn
             and all(isinstance(w, AxisLabels) and w.ndim == 2 for w in ws)
             and isinstance(out_proj_weight, AxisLabels) and out_proj_weight.ndim == 2
             and all(a is None for a in (bias_k, bias_v, static_k, static_v))
             and all(isinstance(a, AxisLabels) and a.ndim == 3 for a in (q, k, v)))
    if not plain:
        # NB: a bias_k/bias_v row, zero-attention padding or static keys are columns of no head; batched
        # 3-D inputs and plain weights only
        ctx.pin(labs, "multi_head_attention_forward in a form otofx does not follow (bias_k/bias_v, "
                      "add_zero_attn, static keys or unbatched inputs)")
        return (ctx.pinned_lab(out_shape), weights)
    hd = E // num_heads
    heads = ctx.fresh(num_heads)
    per_head = np.repeat(heads, hd)
    # NB: the function splits the query's width E into num_heads heads of E // num_heads: the projections'
    # inner width is E too, so the query's channel block of head h goes (or stays) with head h
    ctx.tie(q.ids[-1], per_head)
    if sep:
        for w, x in zip(ws, (q, k, v)):
            ctx.tie(w.ids[0], per_head)
            ctx.tie(w.ids[1], x.ids[-1])
    else:
        ctx.tie(in_proj_weight.ids[0], np.concatenate([per_head] * 3))
        for x in (q, k, v):
            ctx.tie(in_proj_weight.ids[1], x.ids[-1])
    if isinstance(in_proj_bias, AxisLabels):
        ctx.tie(in_proj_bias.ids[0], np.concatenate([per_head] * 3))
    ctx.tie(out_proj_weight.ids[1], per_head)
    if isinstance(out_proj_bias, AxisLabels):
        ctx.tie(out_proj_bias.ids[0], out_proj_weight.ids[0])
    lab = _keys_masks_and_output(ctx, q, k, v, 0, key_padding_mask, attn_mask, heads, out_proj_weight.ids[0],
                                 out_shape)
    if weights is not None and need_weights and _weights_used(ctx.node):
        ctx.pin(heads, "attention weights are used")
    return (lab, weights)


functions("multi_head_attention_forward", [F.multi_head_attention_forward])
