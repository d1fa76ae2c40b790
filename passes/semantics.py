"""Operator semantics: one rule per op family, each stating its channel algebra in one line.

A rule receives the channel labels (:class:`~otofx.passes.channels.Lab`) of its tensor arguments
and returns its output's label, merging ids that must be removed together and pinning ids that
cannot be removed. See ``../shared/OTO.md`` section 1 for what a row is and when it is exact.

Internals:
    * A parameter slice that reads channel c is in c's row, so a consumer (conv, linear, matmul
      with a weight) needs nothing from its input: the row's zero weights cancel whatever flows in.
      Only contractions *without* a weight slice (``sum`` over channels, ``matmul`` of two
      activations) need the zero mask; indices where it is false are pinned.
    * Mixing along an axis (softmax, layer norm, mean, max) pins that axis; an unknown op pins
      everything it touches.
    * Reshapes merge axes by repeating ids (a channel becomes a block of features) and split an
      axis by keeping one factor as the row axis and tying the others together, so the kept set
      always stays a grid that the rewritten shape constants can express.
"""
from __future__ import annotations

import math
from fractions import Fraction
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .channels import OWN, PINNED, Ctx, Lab, SymSize, false_mask, labs_in, pinned_axis, true_mask
from .registry import functions, methods, modules, rule, set_arg, arg_slot

aten = torch.ops.aten


@dataclass(frozen=True)
class ParamRef:
    """A module's parameter or buffer by qualified name (module forms bind these)."""

    name: str


def _ov(packet, *names):
    """ATen overloads that exist in this torch build."""
    out = []
    for n in names:
        try:
            out.append(getattr(packet, n))
        except AttributeError:
            pass
    return out


def _ax(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _out_shape(meta) -> tuple:
    return tuple(map(int, meta.shape))


def _pass(ctx: Ctx, x: Lab, shape, keep_axes, handled=()) -> Lab:
    """Label of ``shape`` whose axes in ``keep_axes`` (out axis -> in axis) come from x; rest pinned.

    # NB: an input axis that is neither passed through nor ``handled`` by the rule is mixed by the
    # op (a conv's spatial axes, say); its channels are pinned, or they would silently vanish.
    """
    ids, zero = [], []
    passed = set()
    for d, n in enumerate(shape):
        src = keep_axes.get(d)
        if src is not None and x.shape[src] == n:
            ids.append(x.ids[src])
            zero.append(x.zero[src])
            passed.add(src)
        else:
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
    for d in range(x.ndim):
        if d not in passed and d not in handled:
            ctx.pin(x.ids[d], "the op mixes this axis")
    return Lab(tuple(ids), tuple(zero))


# ---------------------------------------------------------------------------------------------
# Producers and consumers
# ---------------------------------------------------------------------------------------------


def _conv_fix(site, input, weight, groups=1, transposed=False, **_):
    old_c, new_c = site.old(input)[1], site.new(input)[1]
    g = groups if groups is not None else 1
    new_g = g if g == 1 else g * new_c // old_c
    new_out = site.out_new[1]
    m = site.module
    if m is not None:
        m.in_channels, m.out_channels, m.groups = new_c, new_out, new_g
    elif new_g != g:
        site.set("groups", new_g)


@rule("conv", fix=_conv_fix)
def conv(ctx: Ctx, input, weight, bias=None, groups=1, transposed=False, out=None, **_):
    """out channel o = sum over its conv group's input channels: weight dim 0 (dim 1 if transposed) owns out, the other dim reads in; groups > 1 ties each conv group's in and out channels into one row."""
    x = input
    g = int(groups or 1)
    nsp = len(ctx.shape_of(weight)) - 2
    cax = x.ndim - nsp - 1
    in_ids = x.ids[cax]
    kernel = {d: PINNED for d in range(2, 2 + nsp)}
    shape = _out_shape(out)
    if g == 1:
        w = ctx.param(weight, {(0 if transposed else 1): in_ids, (1 if transposed else 0): OWN, **kernel})
        out_ids = w.ids[1 if transposed else 0]
    else:
        in_g = in_ids.reshape(g, len(in_ids) // g)
        if in_g.shape[1] > 1:
            ctx.tie(in_g, in_g[:, :1])
        if transposed:
            ctx.param(weight, {0: in_ids, 1: PINNED, **kernel})
            out_ids = ctx.fresh(shape[cax])
        elif in_g.shape[1] == 1 and ctx.shape_of(weight)[0] == g:
            # depthwise, one output per input channel: the weight's out axis is the input's
            # channels (the same class the tie below would make, without a union)
            out_ids = ctx.param(weight, {0: in_ids, 1: PINNED, **kernel}).ids[0]
        else:
            out_ids = ctx.param(weight, {0: OWN, 1: PINNED, **kernel}).ids[0]
        if out_ids is not in_ids:
            ctx.tie(out_ids.reshape(g, -1), in_g[:, :1])
    ctx.param(bias, {0: out_ids})
    keep = {d: d for d in range(cax)}
    lab = _pass(ctx, x, shape, keep, handled=(cax,))
    return lab.with_axis(cax, out_ids, true_mask(len(out_ids)))


def _conv_module(node, m, args, kwargs):
    t = node.target
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return dict(
        input=args[0] if args else kwargs["input"],
        weight=ParamRef(f"{t}.weight"),
        bias=ParamRef(f"{t}.bias") if m.bias is not None else None,
        groups=m.groups,
        transposed=transposed,
    )


modules("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d], _conv_module)
_CONV_SPEC = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
functions("conv", [F.conv1d, F.conv2d, F.conv3d] + _ov(aten.conv1d, "default") + _ov(aten.conv2d, "default")
          + _ov(aten.conv3d, "default"), _CONV_SPEC, (("groups", 1),), transposed=False)
_CONVT_SPEC = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
functions("conv", [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]
          + _ov(aten.conv_transpose1d, "default") + _ov(aten.conv_transpose2d, "input")
          + _ov(aten.conv_transpose3d, "input"), _CONVT_SPEC, (("groups", 1),), transposed=True)
functions("conv", _ov(aten.convolution, "default"),
          ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"))


def _linear_fix(site, **_):
    m = site.module
    if m is not None:
        m.out_features, m.in_features = m.weight.shape


@rule("linear", fix=_linear_fix)
def linear(ctx: Ctx, input, weight, bias=None, out=None, **_):
    """y[..., o] = sum_i W[o, i] x[..., i] + b[o]: weight dim 1 reads the last axis, dim 0 and bias own the new last axis."""
    x = input
    w = ctx.param(weight, {0: OWN, 1: x.ids[-1]})
    ctx.param(bias, {0: w.ids[0]})
    shape = _out_shape(out)
    lab = _pass(ctx, x, shape, {d: d for d in range(x.ndim - 1)}, handled=(x.ndim - 1,))
    return lab.with_axis(len(shape) - 1, w.ids[0], true_mask(len(w.ids[0])))


def _linear_module(node, m, args, kwargs):
    t = node.target
    return dict(input=args[0] if args else kwargs["input"], weight=ParamRef(f"{t}.weight"),
                bias=ParamRef(f"{t}.bias") if m.bias is not None else None)


modules("linear", [nn.Linear], _linear_module)
functions("linear", [F.linear] + _ov(aten.linear, "default"), ("input", "weight", "bias"))


@rule("matmul")
def matmul(ctx: Ctx, input, other, out=None, **_):
    """c[..., m, n] = sum_k a[..., m, k] b[..., k, n]: k indices of a and b are one channel and must be zero on one side; m comes from a, n from b, batch axes broadcast."""
    a, b = input, other
    shape = _out_shape(out)
    if not isinstance(a, Lab) or not isinstance(b, Lab) or a.ndim < 2 or b.ndim < 2:
        for v in (a, b):
            if isinstance(v, Lab):
                ctx.pin(v, "matmul with a 1-D operand")
        return ctx.pinned_lab(shape)
    ka, kb = a.ids[-1], b.ids[-2]
    ctx.tie(ka, kb)
    zk = a.zero[-1] | b.zero[-2]
    if not zk.all():
        ctx.pin(ka[~zk], "contraction over a channel that is not zero when its row is")
    ids, zero = [], []
    nb = len(shape) - 2
    for d in range(nb):
        cands = []
        for v in (a, b):
            vd = d - (nb - (v.ndim - 2))
            if vd >= 0 and v.shape[vd] == shape[d]:
                cands.append((v.ids[vd], v.zero[vd]))
        if cands:
            for c in cands[1:]:
                ctx.tie(cands[0][0], c[0])
            ids.append(cands[0][0])
            zero.append(np.logical_or.reduce([c[1] for c in cands]))
        else:
            ids.append(pinned_axis(shape[d]))
            zero.append(false_mask(shape[d]))
    ids += [a.ids[-2], b.ids[-1]]
    zero += [a.zero[-2], b.zero[-1]]
    return Lab(tuple(ids), tuple(zero))


functions("matmul", [torch.matmul, operator.matmul, torch.bmm, torch.mm] + _ov(aten.matmul, "default")
          + _ov(aten.bmm, "default") + _ov(aten.mm, "default"), ("input", "other"))
methods("matmul", ["matmul", "bmm", "mm", "__matmul__"], ("input", "other"))


@rule("addmm")
def addmm(ctx: Ctx, input, mat1, mat2, beta=1, alpha=1, out=None, **_):
    """input + mat1 @ mat2 (HF Conv1D: a weight [in, out]): the matmul's algebra, then the add's broadcasting over its last axis."""
    prod = matmul(ctx, mat1, mat2, out=out)
    if isinstance(input, Lab):
        return binary(ctx, input, prod, kind="add", out=out)
    return prod


functions("addmm", [torch.addmm] + _ov(aten.addmm, "default"), ("input", "mat1", "mat2"))
methods("addmm", ["addmm"], ("input", "mat1", "mat2"))


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
              enable_gqa=False, out=None, **_):
    """softmax(q k^T + mask) v: q and k contract over head_dim (one channel, zero on one side); batch axes (heads) of q, k, v, mask are one channel; keys are mixed; v's last axis passes to the output."""
    q, k, v = query, key, value
    shape = _out_shape(out)
    ctx.tie(q.ids[-1], k.ids[-1])
    zk = q.zero[-1] | k.zero[-1]
    if not zk.all():
        ctx.pin(q.ids[-1][~zk], "contraction over a channel that is not zero when its row is")
    ctx.pin([k.ids[-2], v.ids[-2]], "softmax over the keys")
    ops = [(q, False), (k, False), (v, True)]
    mask = attn_mask if isinstance(attn_mask, Lab) else None
    if mask is not None:
        ctx.pin(list(mask.ids[-2:]), "attention mask over queries and keys")
        if mask.ndim > 2:
            ops.append((mask, False))
    nb = len(shape) - 2
    ids, zero = _batch_ties(ctx, shape, nb, ops, gqa=bool(enable_gqa))
    ids += [q.ids[-2], v.ids[-1]]
    zero += [false_mask(shape[-2]), v.zero[-1]]
    return Lab(tuple(ids), tuple(zero))


functions("attention", [F.scaled_dot_product_attention] + _ov(aten.scaled_dot_product_attention, "default"),
          ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))


def _mha_fix(site, query, **_):
    """Put a PrunedMultiheadAttention in place when any width of the attention changed."""
    from .modules import PrunedMultiheadAttention

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
    new = PrunedMultiheadAttention(m, int(keep.sum()), m.head_dim, torch.from_numpy(np.nonzero(keep)[0]), m.num_heads)
    parent, _, attr = site.node.target.rpartition(".")
    setattr(site.root.get_submodule(parent) if parent else site.root, attr, new)


@rule("multihead_attention", fix=_mha_fix)
def multihead_attention(ctx: Ctx, query, key, value, module=None, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False, out=None, **_):
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
    ctx.pin([key.ids[seq_axis], value.ids[seq_axis]], "attention mixes the keys")
    ctx.pin([v for v in (key_padding_mask, attn_mask) if isinstance(v, Lab)], "attention mask")
    if attn_mask is not None and isinstance(attn_mask, Lab) and attn_mask.ndim == 3:
        ctx.pin(heads, "a per-head attention mask is given as an input")
    o_shape = _out_shape(out[0])
    lab = _pass(ctx, query, o_shape, {d: d for d in range(query.ndim - 1)}, handled=(query.ndim - 1,))
    lab = lab.with_axis(len(o_shape) - 1, w_out.ids[0], true_mask(len(w_out.ids[0])))
    ctx.extra_labels[ctx.node.name + ".heads"] = heads
    weights = None
    if out[1] is not None:
        wshape = _out_shape(out[1])
        weights = ctx.pinned_lab(wshape)
        used = any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and u.users
                   for u in ctx.node.users)
        if used and average_attn_weights:
            ctx.pin(heads, "attention weights averaged over heads are used")
        elif not average_attn_weights:
            ids = list(weights.ids)
            ids[-3] = heads
            weights = Lab(tuple(ids), weights.zero)
    return (lab, weights)


def _mha_module(node, m, args, kwargs):
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    out = dict(zip(names, args))
    out.update(kwargs)
    out["module"] = m
    return out


def _mha_classes() -> list:
    from .modules import PrunedMultiheadAttention

    return [nn.MultiheadAttention, PrunedMultiheadAttention]


# NB: the compressed model's PrunedMultiheadAttention goes through the same rule, so analysing a
# compressed model finds the same (whole-head) rows as the original, whatever the front-end
modules("multihead_attention", _mha_classes(), _mha_module)


def _embedding_fix(site, **_):
    m = site.module
    if m is not None:
        m.embedding_dim = m.weight.shape[1]


@rule("embedding", fix=_embedding_fix)
def embedding(ctx: Ctx, input, weight, out=None, **_):
    """y[..., j] = W[idx, j]: weight dim 1 owns the new last axis, dim 0 (the vocabulary) is pinned."""
    weight = ctx.param(weight, {0: PINNED, 1: OWN})
    shape = _out_shape(out)
    lab = _pass(ctx, input, shape, {d: d for d in range(input.ndim)})
    return lab.with_axis(len(shape) - 1, weight.ids[1], true_mask(len(weight.ids[1])))


modules("embedding", [nn.Embedding],
        lambda node, m, args, kwargs: dict(input=args[0], weight=ParamRef(f"{node.target}.weight")))
functions("embedding", [F.embedding], ("input", "weight"))
functions("embedding", _ov(aten.embedding, "default"), ("weight", "input"))


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def _norm_fix(site, input=None, **_):
    m = site.module
    if m is not None:
        m.num_features = site.new(input)[1]


@rule("batch_norm", fix=_norm_fix)
def batch_norm(ctx: Ctx, input, weight=None, bias=None, running_mean=None, running_var=None, out=None, **_):
    """per channel (axis 1): weight, bias and running statistics are owned by the input channel; out is zero with its row when affine."""
    x = input
    c = x.ids[1]
    for p in (weight, bias, running_mean, running_var):
        ctx.param(p, {0: c})
    z = true_mask(len(c)) if weight is not None else false_mask(len(c))
    return x.with_axis(1, c, z)


def _bn_module(node, m, args, kwargs):
    t = node.target
    ref = lambda n: ParamRef(f"{t}.{n}") if getattr(m, n, None) is not None else None  # noqa: E731
    return dict(input=args[0], weight=ref("weight"), bias=ref("bias"),
                running_mean=ref("running_mean"), running_var=ref("running_var"))


modules("batch_norm", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                       nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d], _bn_module)
functions("batch_norm", [F.batch_norm], ("input", "running_mean", "running_var", "weight", "bias"))
functions("batch_norm", [F.instance_norm], ("input", "running_mean", "running_var", "weight", "bias"))
functions("batch_norm", _ov(aten.batch_norm, "default"),
          ("input", "weight", "bias", "running_mean", "running_var"))
functions("batch_norm", _ov(aten._native_batch_norm_legit_no_training, "default"),
          ("input", "weight", "bias", "running_mean", "running_var"))


def _group_norm_fix(site, input, num_groups, **_):
    old_c, new_c = site.old(input)[1], site.new(input)[1]
    new_g = num_groups * new_c // old_c
    m = site.module
    if m is not None:
        m.num_channels, m.num_groups = new_c, new_g
    elif new_g != num_groups:
        site.set("num_groups", new_g)


@rule("group_norm", fix=_group_norm_fix)
def group_norm(ctx: Ctx, input, num_groups, weight=None, bias=None, out=None, **_):
    """channels of one norm group are normalised together, so each group of C/G channels is one row; affine parameters are owned per channel."""
    x = input
    c = x.ids[1]
    grouped = c.reshape(int(num_groups), -1)
    ctx.tie(grouped, grouped[:, :1])
    ctx.param(weight, {0: c})
    ctx.param(bias, {0: c})
    z = true_mask(len(c)) if weight is not None else x.zero[1]
    return x.with_axis(1, c, z)


modules("group_norm", [nn.GroupNorm], lambda node, m, args, kwargs: dict(
    input=args[0], num_groups=m.num_groups,
    weight=ParamRef(f"{node.target}.weight") if m.weight is not None else None,
    bias=ParamRef(f"{node.target}.bias") if m.bias is not None else None))
functions("group_norm", [F.group_norm] + _ov(aten.group_norm, "default"), ("input", "num_groups", "weight", "bias"))


@rule("layer_norm")
def layer_norm(ctx: Ctx, input, normalized_shape, weight=None, bias=None, out=None, **_):
    """normalises over the trailing len(normalized_shape) axes: those axes are pinned (the divisor counts every channel)."""
    x = input
    k = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
    for d in range(x.ndim - k, x.ndim):
        ctx.pin(x.ids[d], "layer_norm normalises over this axis")
    for p in (weight, bias):
        if p is not None:
            ctx.param(p, {d: PINNED for d in range(len(ctx.shape_of(p)))})
    shape = _out_shape(out)
    return _pass(ctx, x, shape, {d: d for d in range(x.ndim - k)}, handled=tuple(range(x.ndim - k, x.ndim)))


def _ln_module(node, m, args, kwargs):
    t = node.target
    return dict(input=args[0], normalized_shape=tuple(m.normalized_shape),
                weight=ParamRef(f"{t}.weight") if getattr(m, "weight", None) is not None else None,
                bias=ParamRef(f"{t}.bias") if getattr(m, "bias", None) is not None else None)


modules("layer_norm", [nn.LayerNorm, getattr(nn, "RMSNorm", None)], _ln_module)
functions("layer_norm", [F.layer_norm] + _ov(aten.layer_norm, "default"), ("input", "normalized_shape", "weight", "bias"))
functions("layer_norm", [getattr(F, "rms_norm", None)] + _ov(getattr(aten, "rms_norm", aten.layer_norm), "default"),
          ("input", "normalized_shape", "weight"))


# ---------------------------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------------------------


@rule("unary")
def unary(ctx: Ctx, input, zero_in=True, min_val=None, max_val=None, out=None, **kw):
    """y = f(x) elementwise: every axis keeps its ids; zero stays zero when f(0) = 0."""
    x = input
    if not isinstance(x, Lab):
        return x
    lo = min_val if min_val is not None else kw.get("min")
    hi = max_val if max_val is not None else kw.get("max")
    for b in (lo, hi):
        if isinstance(b, (Lab, SymSize)):
            ctx.pin(b, "a clamp bound is a tensor")
            zero_in = False
    lo = lo if isinstance(lo, (int, float)) else float("-inf")
    hi = hi if isinstance(hi, (int, float)) else float("inf")
    if not (lo <= 0 <= hi):
        zero_in = False  # hardtanh/clamp move 0 to a bound
    if zero_in:
        return x
    return Lab(x.ids, tuple(false_mask(len(a)) for a in x.ids))


# f(0) == 0
_ZERO_FNS = ["relu", "relu6", "gelu", "silu", "hardswish", "hardtanh", "tanh", "leaky_relu", "elu", "selu",
             "celu", "mish", "softsign", "tanhshrink", "softshrink", "hardshrink", "abs", "neg", "rrelu",
             "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "sqrt",
             "square", "sin", "erf", "relu_", "silu_", "hardswish_", "hardtanh_", "leaky_relu_", "elu_", "selu_",
             "celu_", "tanh_", "neg_", "abs_", "sin_", "dropout_", "gelu_", "mish_", "sign", "zero_"]
# finite but non-zero at 0
_NONZERO_FNS = ["sigmoid", "hardsigmoid", "softplus", "exp", "cos", "logsigmoid", "sigmoid_", "hardsigmoid_",
                "exp_", "cos_", "erfc"]


def _unary_module(node, m, args, kwargs):
    return dict(input=args[0] if args else kwargs.get("input"))


def _register_unary(names, zero_in):
    for n in names:
        targets = [getattr(F, n, None), getattr(torch, n, None)]
        for t in _ov(getattr(aten, n, None), "default") if hasattr(aten, n) else []:
            targets.append(t)
        functions("unary", [t for t in targets if t is not None], ("input",), zero_in=zero_in)
        methods("unary", [n], ("input",), zero_in=zero_in)


_register_unary(_ZERO_FNS, True)
_register_unary(_NONZERO_FNS, False)
functions("unary", _ov(aten.dropout, "default") + _ov(aten._to_copy, "default") + _ov(aten.alias, "default")
          + _ov(aten.clone, "default") + _ov(aten.contiguous, "default") + _ov(aten.detach, "default")
          + _ov(aten.lift_fresh_copy, "default") + _ov(aten.gelu, "default") + _ov(aten.leaky_relu, "default")
          + _ov(aten.hardtanh, "default") + _ov(aten.to, "dtype", "dtype_layout", "device")
          + _ov(aten.native_dropout, "default"), ("input",), zero_in=True)
modules("unary", [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.LeakyReLU, nn.ELU,
                  nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.RReLU,
                  nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                  nn.Identity], _unary_module, zero_in=True)
functions("unary", [torch.clamp, torch.clip] + _ov(aten.clamp, "default") + _ov(aten.clip, "default"),
          ("input", "min_val", "max_val"))
methods("unary", ["clamp", "clip", "clamp_", "clip_"], ("input", "min_val", "max_val"))
functions("unary", [torch.clamp_min] + _ov(aten.clamp_min, "default"), ("input", "min_val"), (("max_val", float("inf")),))
methods("unary", ["clamp_min", "clamp_min_"], ("input", "min_val"), (("max_val", float("inf")),))
functions("unary", [torch.clamp_max] + _ov(aten.clamp_max, "default"), ("input", "max_val"), (("min_val", float("-inf")),))
methods("unary", ["clamp_max", "clamp_max_"], ("input", "max_val"), (("min_val", float("-inf")),))
modules("unary", [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid], _unary_module, zero_in=False)
modules("unary", [nn.Hardtanh], lambda node, m, args, kwargs: dict(input=args[0], min_val=m.min_val,
                                                                    max_val=m.max_val))
functions("unary", [F.hardtanh, F.hardtanh_] + _ov(aten.hardtanh, "default"), ("input", "min_val", "max_val"),
          (("min_val", -1.0), ("max_val", 1.0)))
methods("unary", ["hardtanh", "hardtanh_"], ("input", "min_val", "max_val"), (("min_val", -1.0), ("max_val", 1.0)))

try:  # torchvision's stochastic depth: a per-sample mask times the input
    from torchvision.ops import StochasticDepth, stochastic_depth

    modules("unary", [StochasticDepth], _unary_module, zero_in=True)
    functions("unary", [stochastic_depth], ("input", "p", "mode", "training"), zero_in=True)
except ImportError:  # pragma: no cover - torchvision is optional
    StochasticDepth = stochastic_depth = None


def _prelu_fix(site, **_):
    m = site.module
    if m is not None:
        m.num_parameters = m.weight.numel()


@rule("prelu", fix=_prelu_fix)
def prelu(ctx: Ctx, input, weight, out=None, **_):
    """y = max(0, x) + a[c] min(0, x): a per-channel slope is owned by channel axis 1; zero stays zero."""
    x = input
    ctx.param(weight, {0: x.ids[1 if x.ndim > 1 else 0]})
    return x


modules("prelu", [nn.PReLU], lambda node, m, args, kwargs: dict(input=args[0], weight=ParamRef(f"{node.target}.weight")))
functions("prelu", [F.prelu] + _ov(aten.prelu, "default"), ("input", "weight"))


def _scalar_zero(v) -> bool:
    return isinstance(v, (int, float, bool)) and v == 0


_SHAPE_ONLY = {"expand", "expand_as", "reshape", "shape_merge", "permute", "unary_copy"}


def _positive(node, depth: int = 8) -> bool:
    """Whether ``node`` is > 0 everywhere by construction (clamp_min(x, eps), exp, x + eps after x >= 0).

    A division by such a value cannot blow up when a row is zero, so the denominator is not pinned.
    """
    if not isinstance(node, fx.Node) or depth == 0 or node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.split(".")[0]
    args = node.args
    if name in ("expand", "expand_as", "view", "reshape", "unsqueeze", "permute", "transpose", "contiguous",
                "clone", "to", "_to_copy", "float", "alias", "detach"):
        return _positive(args[0], depth - 1) if args else False
    if name in ("exp", "softplus", "sigmoid"):
        return True
    if name in ("clamp_min", "clamp", "clamp_"):
        lo = args[1] if len(args) > 1 else node.kwargs.get("min")
        return isinstance(lo, (int, float)) and lo > 0
    if name in ("add", "__add__", "add_") and len(args) > 1:
        a, b = args[0], args[1]
        if isinstance(b, (int, float)) and b > 0:
            return _nonnegative(a, depth - 1)
    if name in ("sqrt", "rsqrt"):
        return _positive(args[0], depth - 1)
    return False


def _nonnegative(node, depth: int) -> bool:
    if _positive(node, depth):
        return True
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = name.split(".")[0]
    if name in ("abs", "relu", "square", "linalg_vector_norm", "norm", "sqrt"):
        return True
    if name in ("pow", "__pow__") and len(node.args) > 1 and node.args[1] == 2:
        return True
    if name in ("mean", "sum", "amax"):
        return _nonnegative(node.args[0], depth - 1)
    return False


@rule("binary")
def binary(ctx: Ctx, input, other, kind="add", out=None, **_):
    """z = x (op) y with broadcasting: axes of equal size are the same channels (tied); zero when both are zero (add, sub) or either is (mul)."""
    operands = [input, other]
    if kind == "div" and isinstance(other, Lab) and not _positive(ctx.node.args[1] if ctx.node is not None
                                                                  and len(ctx.node.args) > 1 else None):
        ctx.pin(other, "divides by this channel")
    if not any(isinstance(v, Lab) for v in operands):  # python arithmetic (sizes, lists)
        sym = tuple(a for v in operands if isinstance(v, SymSize) for a in v.ids)
        return SymSize(out, sym) if sym else out
    shape = _out_shape(out)
    n = len(shape)
    labs = [v for v in operands if isinstance(v, Lab)]
    ctx.pin([v for v in operands if isinstance(v, SymSize)], "a size read off this axis is used as a value")
    ids, zero = [], []
    for d in range(n):
        full, part = [], []
        for v in labs:
            vd = d - (n - v.ndim)
            if vd < 0 or v.shape[vd] != shape[d]:
                part.append(v)
            else:
                full.append((v.ids[vd], v.zero[vd]))
        if not full:
            ids.append(pinned_axis(shape[d]))
            zero.append(false_mask(shape[d]))
            continue
        for c in full[1:]:
            ctx.tie(full[0][0], c[0])
        zs = [c[1] for c in full]
        scalars = [v for v in operands if not isinstance(v, Lab)]
        if kind in ("mul",):
            z = zs[0] if len(zs) == 1 else np.logical_or.reduce(zs)
            if any(_scalar_zero(s) for s in scalars):
                z = np.ones(shape[d], dtype=bool)
        elif kind == "div":  # zero where the numerator is (a pinned denominator is never zero with a row)
            nd = d - (n - input.ndim) if isinstance(input, Lab) else -1
            z = input.zero[nd] if nd >= 0 and input.shape[nd] == shape[d] else false_mask(shape[d])
        elif part or not all(_scalar_zero(s) for s in scalars):
            z = false_mask(shape[d])
        else:
            z = zs[0] if len(zs) == 1 else np.logical_and.reduce(zs)
        ids.append(full[0][0])
        zero.append(z)
    return Lab(tuple(ids), tuple(zero))


for _kind, _names, _ops in [
    ("add", ["add", "add_", "__add__", "__radd__", "__iadd__"], [operator.add, operator.iadd, torch.add]),
    ("sub", ["sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub"], [operator.sub, operator.isub, torch.sub, torch.rsub]),
    ("mul", ["mul", "mul_", "__mul__", "__rmul__", "__imul__"], [operator.mul, operator.imul, torch.mul]),
    ("div", ["div", "div_", "__truediv__", "__itruediv__", "true_divide"], [operator.truediv, operator.itruediv, torch.div, torch.true_divide]),
]:
    _aten = [o for n in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub")
             if n.rstrip("_") in (_kind, "rsub" if _kind == "sub" else _kind) for o in _ov(getattr(aten, n), "Tensor", "Scalar")]
    functions("binary", _ops + _aten, ("input", "other"), kind=_kind)
    methods("binary", _names, ("input", "other"), kind=_kind)


@rule("where")
def where(ctx: Ctx, condition, input, other, out=None, **_):
    """where(c, x, y): elementwise choice with broadcasting; axes of full size are one channel across c, x, y; zero where x and y both are."""
    shape = _out_shape(out)
    n = len(shape)
    vals = [v for v in (input, other)]
    ids, zero = [], []
    for d in range(n):
        full = []
        for v in (condition, input, other):
            if isinstance(v, Lab):
                vd = d - (n - v.ndim)
                if vd >= 0 and v.shape[vd] == shape[d]:
                    full.append((v, vd))
        if not full:
            ids.append(pinned_axis(shape[d]))
            zero.append(false_mask(shape[d]))
            continue
        for v, vd in full[1:]:
            ctx.tie(full[0][0].ids[full[0][1]], v.ids[vd])
        z = np.ones(shape[d], dtype=bool)
        for v in vals:
            vd = d - (n - v.ndim) if isinstance(v, Lab) else -1
            if isinstance(v, Lab) and vd >= 0 and v.shape[vd] == shape[d]:
                z = z & v.zero[vd]
            elif not _scalar_zero(v):
                z = false_mask(shape[d])
        ids.append(full[0][0].ids[full[0][1]])
        zero.append(z)
    return Lab(tuple(ids), tuple(zero))


functions("where", [torch.where] + _ov(aten.where, "self", "ScalarOther", "ScalarSelf", "Scalar"),
          ("condition", "input", "other"))


@rule("check")
def check(ctx: Ctx, input=None, out=None, **_):
    """runtime assertions on a tensor's metadata (dtype, device, shape): no value, no channel effect."""
    return None


functions("check", _ov(aten._assert_tensor_metadata, "default"), ("input",))


# ---------------------------------------------------------------------------------------------
# Spatial ops: channels and batch pass, spatial axes are not channels
# ---------------------------------------------------------------------------------------------


@rule("pool")
def pool(ctx: Ctx, input, nsp=2, out=None, **_):
    """per channel over the trailing spatial axes (pooling, resampling): leading axes keep their ids, spatial axes are pinned."""
    x = input
    outs = out if isinstance(out, (tuple, list)) else (out,)
    labs = []
    for o in outs:
        shape = _out_shape(o)
        keep = {d: d for d in range(len(shape) - nsp)}
        labs.append(_pass(ctx, x, shape, keep))
    return tuple(labs) if isinstance(out, (tuple, list)) else labs[0]


for _n in (1, 2, 3):
    _pools = [f"max_pool{_n}d", f"avg_pool{_n}d", f"adaptive_max_pool{_n}d", f"adaptive_avg_pool{_n}d",
              f"lp_pool{_n}d", f"max_pool{_n}d_with_indices", f"adaptive_max_pool{_n}d_with_indices",
              f"fractional_max_pool{_n}d"]
    _t = [getattr(F, p, None) for p in _pools] + [getattr(torch, p, None) for p in _pools]
    _t += [o for p in _pools if hasattr(aten, p) for o in _ov(getattr(aten, p), "default")]
    functions("pool", _t, ("input",), nsp=_n)
    modules("pool", [getattr(nn, c, None) for c in (f"MaxPool{_n}d", f"AvgPool{_n}d", f"AdaptiveMaxPool{_n}d",
                                                      f"AdaptiveAvgPool{_n}d", f"LPPool{_n}d", f"FractionalMaxPool{_n}d")],
            _unary_module, nsp=_n)


@rule("resample")
def resample(ctx: Ctx, input, out=None, **_):
    """interpolation over every axis after the channel axis: batch and channel keep their ids, spatial axes are pinned."""
    return _pass(ctx, input, _out_shape(out), {0: 0, 1: 1})


functions("resample", [F.interpolate, getattr(F, "upsample", None), getattr(F, "upsample_nearest", None),
                       getattr(F, "upsample_bilinear", None)]
          + [o for p in ("upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest1d", "upsample_linear1d",
                         "upsample_nearest3d", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_nearest_exact2d")
             if hasattr(aten, p) for o in _ov(getattr(aten, p), "default", "vec")], ("input",))
modules("resample", [nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], _unary_module)


# ---------------------------------------------------------------------------------------------
# Structure: concat, split, index
# ---------------------------------------------------------------------------------------------


def _tie_aligned(ctx: Ctx, labs, skip: int | None):
    """Tie axis d of every lab (except ``skip``); returns the ids/zeros of the first."""
    first = labs[0]
    zero = list(first.zero)
    a, b = [], []  # NB: one union for all pairs: a densenet cat has dozens of inputs
    for v in labs[1:]:
        for d in range(first.ndim):
            if d != skip and v.shape[d] == first.shape[d]:
                if v.ids[d] is not first.ids[d]:
                    a.append(first.ids[d])
                    b.append(v.ids[d])
                zero[d] = zero[d] & v.zero[d]  # zero only where every input is zero
    if a:
        ctx.tie(np.concatenate(a), np.concatenate(b))
    return Lab(first.ids, tuple(zero))


@rule("cat")
def cat(ctx: Ctx, tensors, dim=0, out=None, **_):
    """concat along dim: the output axis is the inputs' ids end to end (a channel keeps its row at its new offset); other axes are tied."""
    labs = [t for t in tensors if isinstance(t, Lab) and t.ndim > 0 and not (t.ndim == 1 and t.shape[0] == 0)]
    shape = _out_shape(out)
    d = _ax(dim, len(shape))
    first = _tie_aligned(ctx, labs, d)
    ids = np.concatenate([t.ids[d] for t in labs])
    z = np.concatenate([t.zero[d] for t in labs])
    return first.with_axis(d, ids, z)


functions("cat", [torch.cat, torch.concat, getattr(torch, "concatenate", None)] + _ov(aten.cat, "default"),
          ("tensors", "dim"), (("dim", 0),))


@rule("stack")
def stack(ctx: Ctx, tensors, dim=0, out=None, **_):
    """stack along a new axis: the new axis is pinned, the others are tied across inputs."""
    labs = [t for t in tensors if isinstance(t, Lab)]
    shape = _out_shape(out)
    d = _ax(dim, len(shape))
    first = _tie_aligned(ctx, labs, None)
    ids = list(first.ids)
    zero = list(first.zero)
    ids.insert(d, pinned_axis(shape[d]))
    zero.insert(d, false_mask(shape[d]))
    return Lab(tuple(ids), tuple(zero))


functions("stack", [torch.stack] + _ov(aten.stack, "default"), ("tensors", "dim"), (("dim", 0),))


@rule("unbind")
def unbind(ctx: Ctx, input, dim=0, out=None, **_):
    """unbind along dim: every piece has the other axes' ids; the removed axis is pinned (its entries become separate tensors)."""
    x = input
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "unbind separates this axis into tensors")
    ids = x.ids[:d] + x.ids[d + 1:]
    zero = x.zero[:d] + x.zero[d + 1:]
    return tuple(Lab(ids, zero) for _ in out)


functions("unbind", [torch.unbind] + _ov(aten.unbind, "int"), ("input", "dim"), (("dim", 0),))
methods("unbind", ["unbind"], ("input", "dim"), (("dim", 0),))


def _split_fix(site, tensor=None, dim=0, kind="split", **kw):
    old_in = site.old(tensor)
    d = _ax(dim, len(old_in))
    keep = site.keep(tensor, d)
    sizes, start = [], 0
    for o in site.out_old_list:
        n = o[d]
        sizes.append(int(keep[start:start + n].sum()))
        start += n
    old_sizes = [o[d] for o in site.out_old_list]
    if sizes == old_sizes:
        return
    site.replace_call(torch.split, (tensor, sizes), {"dim": d})


@rule("split", fix=_split_fix)
def split(ctx: Ctx, tensor, dim=0, out=None, **_):
    """split/chunk along dim: each piece takes its slice of the axis ids."""
    x = tensor
    d = _ax(dim, x.ndim)
    res, start = [], 0
    for o in out:
        n = int(o.shape[d])
        res.append(x.with_axis(d, x.ids[d][start:start + n], x.zero[d][start:start + n]))
        start += n
    return tuple(res)


functions("split", [torch.split, torch.chunk, getattr(torch, "tensor_split", None)]
          + _ov(aten.split, "Tensor") + _ov(aten.split_with_sizes, "default") + _ov(aten.chunk, "default"),
          ("tensor", "split_size_or_sections", "dim"), (("dim", 0),))
methods("split", ["split", "chunk", "split_with_sizes", "tensor_split"], ("tensor", "split_size_or_sections", "dim"),
        (("dim", 0),))


def _narrow_fix(site, input, dim, start, length, **_):
    d = _ax(dim, len(site.old(input)))
    keep = site.keep(input, d)
    if keep.all():
        return
    s = _ax(start, len(keep)) if isinstance(start, int) else start
    if not isinstance(s, int) or not isinstance(length, int):
        return
    site.set("start", int(keep[:s].sum()))
    site.set("length", int(keep[s:s + length].sum()))


@rule("narrow", fix=_narrow_fix)
def narrow(ctx: Ctx, input, dim, start, length, out=None, **_):
    """narrow(dim, start, length): the output axis is that slice of the input ids; literal start/length are recounted."""
    x = input
    d = _ax(dim, x.ndim)
    if not isinstance(start, int) or not isinstance(length, int):
        ctx.pin(x.ids[d], "narrow with a computed start or length")
        return _pass(ctx, x, _out_shape(out), {i: i for i in range(x.ndim)})
    s = _ax(start, x.shape[d])
    return x.with_axis(d, x.ids[d][s:s + length], x.zero[d][s:s + length])


functions("narrow", [torch.narrow] + _ov(aten.narrow, "default"), ("input", "dim", "start", "length"))
methods("narrow", ["narrow"], ("input", "dim", "start", "length"))


def _slice_fix(site, input, dim=0, start=None, end=None, step=1, **_):
    d = _ax(dim, len(site.old(input)))
    keep = site.keep(input, d)
    if keep.all():
        return
    n = len(keep)
    s, e, _st = slice(start, end, step).indices(n)
    site.set("start", int(keep[:s].sum()))
    site.set("end", int(keep[:e].sum()) if end is not None and end < n else end)


@rule("slice", fix=_slice_fix)
def slice_(ctx: Ctx, input, dim=0, start=None, end=None, step=1, out=None, **_):
    """aten.slice(dim, start, end, step 1): the output axis is that slice of the ids."""
    x = input
    d = _ax(dim, x.ndim)
    if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        ctx.pin(x.ids[d], "strided or computed slice")
        return _pass(ctx, x, _out_shape(out), {i: i for i in range(x.ndim)})
    s, e, _ = slice(start, end).indices(x.shape[d])
    return x.with_axis(d, x.ids[d][s:e], x.zero[d][s:e])


functions("slice", _ov(aten.slice, "Tensor"), ("input", "dim", "start", "end", "step"),
          (("dim", 0), ("start", None), ("end", None), ("step", 1)))


def _index_parts(idx, ndim):
    """Expand a getitem index into per-input-axis parts; returns list of (in_axis|None, part)."""
    parts = list(idx) if isinstance(idx, tuple) else [idx]
    n_real = sum(1 for p in parts if p is not None and p is not Ellipsis)
    out, d = [], 0
    for p in parts:
        if p is Ellipsis:
            for _ in range(ndim - n_real):
                out.append((d, slice(None)))
                d += 1
        elif p is None:
            out.append((None, None))
        else:
            out.append((d, p))
            d += 1
    while d < ndim:
        out.append((d, slice(None)))
        d += 1
    return out


def _getitem_fix(site, input, index, **_):
    if not isinstance(site.old(input), tuple):
        return
    ndim = len(site.old(input))
    parts = _index_parts(index, ndim)
    new_parts, changed = [], False
    for axis, p in parts:
        if isinstance(p, slice) and axis is not None and (p.start is not None or p.stop is not None):
            keep = site.keep(input, axis)
            if keep.all():  # nothing removed on this axis: keep the user's bounds (negative ones too)
                new_parts.append(p)
                continue
            n = len(keep)
            s, e, _ = p.indices(n)
            ns = int(keep[:s].sum()) if p.start is not None else None
            ne = int(keep[:e].sum()) if p.stop is not None and e < n else p.stop
            if (ns, ne) != (p.start, p.stop):
                changed = True
            new_parts.append(slice(ns, ne, p.step))
        else:
            new_parts.append(p)
    if changed:
        # keep the user's spelling: rebuild only the parts that were in the original index
        orig = list(index) if isinstance(index, tuple) else [index]
        it = iter(new_parts)
        rebuilt = []
        for p in orig:
            if p is Ellipsis:
                # skip the parts that the ellipsis expanded to
                n_real = sum(1 for q in orig if q is not None and q is not Ellipsis)
                for _ in range(ndim - n_real):
                    next(it)
                rebuilt.append(Ellipsis)
            else:
                rebuilt.append(next(it))
        site.set("index", tuple(rebuilt) if isinstance(index, tuple) else rebuilt[0])


@rule("getitem", fix=_getitem_fix)
def getitem(ctx: Ctx, input, index, out=None, **_):
    """x[idx]: a unit-step slice of an axis keeps that slice of ids (bounds recounted); None adds a pinned axis; an int or tensor index pins the axis it reads."""
    x = input
    if not isinstance(x, Lab):  # tuple/list/size: plain indexing of python values
        if isinstance(x, (tuple, list)):
            return x[index]
        if isinstance(x, torch.Size):
            return x[index]
        return None
    if isinstance(index, Lab) or (isinstance(index, tuple) and len(index) == 1 and isinstance(index[0], Lab)):
        return _gather_first(ctx, x, index if isinstance(index, Lab) else index[0], out)
    parts = _index_parts(index, x.ndim)
    ids, zero = [], []
    for axis, p in parts:
        if axis is None:
            ids.append(pinned_axis(1))
            zero.append(false_mask(1))
        elif isinstance(p, slice) and all(isinstance(v, (int, type(None))) for v in (p.start, p.stop, p.step)):
            if p.step not in (None, 1):
                ctx.pin(x.ids[axis], "strided slice")
                ids.append(pinned_axis(len(range(*p.indices(x.shape[axis])))))
                zero.append(false_mask(len(ids[-1])))
            else:
                s, e, _ = p.indices(x.shape[axis])
                ids.append(x.ids[axis][s:e])
                zero.append(x.zero[axis][s:e])
        elif isinstance(p, int):
            if x.shape[axis] > 1:
                ctx.pin(x.ids[axis], "indexes a single channel")
        else:
            for lab in labs_in(p):
                ctx.pin(lab, "used as an index")
            ctx.pin(x, "indexed by a tensor or computed value")
            return ctx.pinned_lab(_out_shape(out))
    lab = Lab(tuple(ids), tuple(zero))
    if lab.shape != _out_shape(out):
        ctx.pin(x, "indexing this value was not understood")
        return ctx.pinned_lab(_out_shape(out))
    return lab


functions("getitem", [operator.getitem], ("input", "index"))


def _gather_first(ctx: Ctx, x: Lab, idx: Lab, out) -> Lab:
    """x[idx] with one integer tensor: gathers along axis 0 (pinned); the trailing axes pass."""
    shape = _out_shape(out)
    if shape != idx.shape + x.shape[1:]:
        ctx.pin([x, idx], "indexed by a tensor in a way that was not understood")
        return ctx.pinned_lab(shape)
    ctx.pin(x.ids[0], "gathered by an index tensor")
    ctx.pin(idx, "used as an index")
    lead = ctx.pinned_lab(idx.shape)
    return Lab(lead.ids + x.ids[1:], lead.zero + x.zero[1:])


@rule("index")
def index(ctx: Ctx, input, indices, out=None, **_):
    """aten.index(x, [idx]): one integer index tensor gathers along axis 0 (pinned), trailing axes pass; other forms pin."""
    idx = [i for i in indices]
    if len(idx) == 1 and isinstance(idx[0], Lab):
        return _gather_first(ctx, input, idx[0], out)
    ctx.pin([input] + [i for i in idx if isinstance(i, Lab)], "advanced indexing")
    return ctx.pinned_lab(_out_shape(out))


functions("index", _ov(aten.index, "Tensor"), ("input", "indices"))


@rule("select")
def select(ctx: Ctx, input, dim, index, out=None, **_):
    """x.select(dim, i): the axis is removed; if it holds channels they are pinned (one is read), the rest pass."""
    x = input
    d = _ax(dim, x.ndim)
    if x.shape[d] > 1:
        ctx.pin(x.ids[d], "indexes a single channel")
    return Lab(x.ids[:d] + x.ids[d + 1:], x.zero[:d] + x.zero[d + 1:])


functions("select", [torch.select] + _ov(aten.select, "int"), ("input", "dim", "index"))
methods("select", ["select"], ("input", "dim", "index"))


@rule("roll")
def roll(ctx: Ctx, input, shifts, dims=None, out=None, **_):
    """roll along dims: rolled axes are pinned (positions move), the others keep their ids."""
    x = input
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        ctx.pin(x, "roll of the flattened tensor")
        return ctx.pinned_lab(x.shape)
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = {_ax(d, x.ndim) for d in dims}
    return _pass(ctx, x, x.shape, {d: d for d in range(x.ndim) if d not in rolled})


functions("roll", [torch.roll] + _ov(aten.roll, "default"), ("input", "shifts", "dims"))
methods("roll", ["roll"], ("input", "shifts", "dims"))


def _einsum_parse(equation: str, n_ops: int):
    eq = equation.replace(" ", "")
    if "." in eq:
        raise ValueError("einsum with ellipsis")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if not _:
        counts = {c: lhs.count(c) for c in set(lhs.replace(",", ""))}
        rhs = "".join(sorted(c for c, k in counts.items() if k == 1))
    if len(ins) != n_ops:
        raise ValueError("einsum operand count")
    return ins, rhs


@rule("einsum")
def einsum(ctx: Ctx, equation, operands=(), out=None, **_):
    """einsum: a letter is one channel wherever it appears; letters kept in the output pass, summed letters contract (zero on one side, else pinned)."""
    ops = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (tuple, list)) else list(operands)
    ins, rhs = _einsum_parse(equation, len(ops))
    first: dict = {}
    zeros: dict = {}
    size: dict = {}
    for spec, v in zip(ins, ops):
        if not isinstance(v, Lab) or len(spec) != v.ndim:
            raise ValueError("einsum operand is not a tensor of the spec's rank")
        for c, ids in zip(spec, v.ids):
            size[c] = max(size.get(c, 1), len(ids))
    for spec, v in zip(ins, ops):
        for c, ids, z in zip(spec, v.ids, v.zero):
            if len(ids) == 1 and size[c] > 1:
                continue  # broadcast axis (a letter of size 1 everywhere is a real axis: one head left)
            if c in first:
                ctx.tie(first[c], ids)
                zeros[c].append(z)
            else:
                first[c], zeros[c] = ids, [z]
    shape = _out_shape(out)
    for c in first:
        if c in rhs:
            continue
        if len(zeros[c]) < 2:
            ctx.pin(first[c], "einsum sums over this axis")
            continue
        zc = np.logical_or.reduce(zeros[c])
        if not zc.all():
            ctx.pin(first[c][~zc], "contraction over a channel that is not zero when its row is")
    ids, zero = [], []
    for c, n in zip(rhs, shape):
        if c in first and len(first[c]) == n:
            ids.append(first[c])
            # a kept letter is zero where any product factor is (multiplication)
            zero.append(np.logical_or.reduce(zeros[c]))
        else:
            ids.append(pinned_axis(n))
            zero.append(false_mask(n))
    return Lab(tuple(ids), tuple(zero))


functions("einsum", [torch.einsum] + _ov(aten.einsum, "default"), ("equation", "*operands"))


# ---------------------------------------------------------------------------------------------
# Shape: reshape, permute, flatten, squeeze, expand, channel shuffle
# ---------------------------------------------------------------------------------------------


def _groups_of(in_shape, out_shape, glue=()):
    """Pair runs of input axes with runs of output axes of equal product (size-1 axes alone).

    A size-1 output axis in ``glue`` joins the run after it instead (a head axis down to one head).
    """
    groups, i, j = [], 0, 0
    ni, no = len(in_shape), len(out_shape)
    while i < ni or j < no:
        if i < ni and in_shape[i] == 1 and (j >= no or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < no and out_shape[j] == 1 and (i >= ni or in_shape[i] != 1) and not (j in glue and i < ni):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= ni or j >= no:
            raise ValueError("shapes do not match")
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            else:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _varies_alone(g_ids: np.ndarray, k: int) -> bool:
    """Whether ``g_ids`` is constant along every axis but ``k`` and takes several values along ``k``."""
    moved = np.moveaxis(g_ids, k, 0).reshape(g_ids.shape[k], -1)
    return bool((moved == moved[:, :1]).all()) and len(np.unique(moved[:, 0])) > 1


def _reshape_lab(ctx: Ctx, x: Lab, out_shape) -> Lab:
    """Label after a reshape from x.shape to out_shape."""
    in_shape = x.shape
    ids = [None] * len(out_shape)
    zero = [None] * len(out_shape)
    # a factor that later indexes attention heads is kept as the row axis (see passes/attention.py)
    pref = ctx.row_axes.get(ctx.node.name, ()) if ctx.node is not None else ()
    for gi, gj in _groups_of(in_shape, tuple(out_shape), glue=pref):
        if not gj:
            continue
        if len(gi) == 1 and len(gj) == 1:
            ids[gj[0]], zero[gj[0]] = x.ids[gi[0]], x.zero[gi[0]]
            continue
        sizes = [in_shape[i] for i in gi]
        # merge: one id per merged index, the row of the one real channel axis inside
        live = [i for i in gi if (ctx.uf.find(x.ids[i]) != 0).any()]
        grid_ids = np.zeros(sizes, dtype=np.int64)
        grid_z = np.zeros(sizes, dtype=bool)
        if live:
            for i in live[1:]:
                ctx.tie(x.ids[live[0]][:1], x.ids[i])
                ctx.tie(x.ids[live[0]], x.ids[i][:1])
            k = gi.index(live[0])
            shp = [1] * len(gi)
            shp[k] = sizes[k]
            grid_ids = np.broadcast_to(x.ids[live[0]].reshape(shp), sizes)
            grid_z = np.broadcast_to(x.zero[live[0]].reshape(shp), sizes)
        flat_ids, flat_z = grid_ids.reshape(-1), grid_z.reshape(-1)
        if len(gj) == 1:
            ids[gj[0]], zero[gj[0]] = np.ascontiguousarray(flat_ids), np.ascontiguousarray(flat_z)
            continue
        # split: keep one factor as the row axis, tie the rest so the kept set stays a grid
        fsizes = [out_shape[j] for j in gj]
        cand = [k for k, j in enumerate(gj) if out_shape[j] > 1]
        # NB: the choice must not depend on the front-end (export bakes every size into a literal),
        # so it uses sizes only: the largest factor, the outermost on ties. Channel shuffle's
        # (groups, C/groups) keeps C/groups; an unflatten (C, H, W) keeps C when C is the largest.
        # NB: a head factor is kept even at size 1, so a model pruned to one head keeps its rows
        g_ids = flat_ids.reshape(fsizes)
        g_z = flat_z.reshape(fsizes)
        # a factor along which the ids already vary alone (the others repeat them: heads merged with
        # the batch, as nn.MultiheadAttention's decomposition does) is kept without any tie
        choice = [k for k, j in enumerate(gj) if j in pref] or cand
        choice = [k for k in choice if live and _varies_alone(g_ids, k)] or choice
        r = max(choice, key=lambda k: (fsizes[k], -k))
        moved = np.moveaxis(g_ids, r, 0).reshape(fsizes[r], -1)
        if live:
            ctx.tie(moved, moved[:, :1])
        for k, j in enumerate(gj):
            if k == r:
                ids[j] = np.ascontiguousarray(moved[:, 0])
                zero[j] = np.ascontiguousarray(np.moveaxis(g_z, r, 0).reshape(fsizes[r], -1).all(axis=1))
            else:
                ids[j] = pinned_axis(out_shape[j])
                zero[j] = false_mask(out_shape[j])
    for j, n in enumerate(out_shape):
        if ids[j] is None:
            ids[j], zero[j] = pinned_axis(n), false_mask(n)
    return Lab(tuple(ids), tuple(zero))


def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(shape[0])
    return tuple(shape)


def _sym_new(site, v):
    """The pruned value of a size read in the graph (a SymSize label that is an axis's size), or None."""
    lab = site.plan.zigset.labels.get(v.name) if isinstance(v, fx.Node) else None
    if not isinstance(lab, SymSize) or lab.value is None or len(lab.ids) != 1:
        return None
    # NB: an expression of a size (batch * windows in a dynamic-shape export) measures the axis
    # but is not its size
    if lab.value != len(lab.ids[0]):
        return None
    return int(site._keep_ids(lab.ids[0]).sum())


def _size_arg(site, v, old: int, new: int):
    """The argument that gives an output axis of ``old`` entries ``new`` entries after pruning.

    A literal becomes ``new``; a size read off another axis stays when it reads ``new`` and becomes
    the literal otherwise; an expression of sizes that keep all their rows times a literal (a
    dynamic ``batch * heads``) is scaled by the kept fraction, a ``v * a // b`` computed in the
    graph (exact: the axis is a block of whole rows repeated for every value of the dynamic
    factor); any other expression stays.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v if v == -1 else new
    if not isinstance(v, fx.Node):
        return v
    s = _sym_new(site, v)
    if s is not None:
        return v if s == new else new
    lab = site.plan.zigset.labels.get(v.name)
    if old == new or not isinstance(lab, SymSize) or any(not site._keep_ids(a).all() for a in lab.ids):
        return v  # an expression of sizes that lose rows too follows them at run time (C // groups)
    f = Fraction(new, old)
    graph = site.node.graph
    with graph.inserting_before(site.node):
        if f.numerator != 1:
            v = graph.call_function(operator.mul, (v, f.numerator))
        if f.denominator != 1:
            v = graph.call_function(operator.floordiv, (v, f.denominator))
    return v


def _reshape_fix(site, input, shape=(), **_):
    new = site.out_new
    raw = _shape_args(shape)
    if len(raw) != len(new):
        return
    # NB: a size read off another tensor (``x.shape[-1]``) may measure channels other than the ones
    # this axis now holds (attention heads merged back into a width, or an unpruned output shaped by
    # a pruned input's size): it becomes the literal new size, even where this output kept its shape
    vals = [_size_arg(site, v, o, n) for v, o, n in zip(raw, site.out_old, new)]
    packed = len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size))
    site.set_varargs("shape", [tuple(vals)] if packed else vals)


@rule("reshape", fix=_reshape_fix)
def reshape(ctx: Ctx, input, shape=(), out=None, **_):
    """view/reshape: merged axes repeat the one channel's ids over the block; a split keeps one factor (the largest) as the row axis and ties the rest."""
    return _reshape_lab(ctx, input, _out_shape(out))


functions("reshape", [torch.reshape] + _ov(aten.view, "default") + _ov(aten.reshape, "default")
          + _ov(aten._unsafe_view, "default"), ("input", "shape"))
methods("reshape", ["view", "reshape"], ("input", "*shape"))


def _unflatten_fix(site, input, dim=None, sizes=None, **_):
    if sizes is None:  # flatten/squeeze/unsqueeze: torch derives the sizes
        return
    old = site.out_old
    new = site.out_new
    if old == new:
        return
    d = _ax(dim, len(site.old(input)))
    vals = [new[d + k] if isinstance(v, int) and v != -1 else v for k, v in enumerate(sizes)]
    m = site.module
    if m is not None:
        m.unflattened_size = tuple(vals)
    else:
        site.set("sizes", tuple(vals))


@rule("shape_merge", fix=_unflatten_fix)
def shape_merge(ctx: Ctx, input, out=None, **_):
    """flatten/unflatten/squeeze/unsqueeze: the same reshape algebra, with the sizes derived by torch."""
    return _reshape_lab(ctx, input, _out_shape(out))


functions("shape_merge", [torch.flatten, torch.squeeze, torch.unsqueeze] + _ov(aten.flatten, "using_ints")
          + _ov(aten.squeeze, "dim", "dims", "default") + _ov(aten.unsqueeze, "default"), ("input", "*rest"))
functions("shape_merge", [torch.unflatten] + _ov(aten.unflatten, "int"), ("input", "dim", "sizes"))
methods("shape_merge", ["flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"], ("input", "*rest"))
methods("shape_merge", ["unflatten"], ("input", "dim", "sizes"))
modules("shape_merge", [nn.Flatten], _unary_module)
modules("shape_merge", [nn.Unflatten], lambda node, m, args, kwargs: dict(
    input=args[0], dim=m.dim, sizes=tuple(m.unflattened_size)))


def _permute_dims(kind, x_ndim, dims):
    if kind == "transpose":
        a, b = (_ax(d, x_ndim) for d in dims[:2])
        perm = list(range(x_ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if kind == "t":
        return list(range(x_ndim))[::-1]
    if kind == "movedim":
        src, dst = dims[0], dims[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [_ax(s, x_ndim) for s in src]
        dst = [_ax(d, x_ndim) for d in dst]
        perm = [None] * x_ndim
        for s, d in zip(src, dst):
            perm[d] = s
        rest = iter(a for a in range(x_ndim) if a not in src)
        return [p if p is not None else next(rest) for p in perm]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [_ax(d, x_ndim) for d in dims]


@rule("permute")
def permute(ctx: Ctx, input, dims=(), kind="permute", out=None, **_):
    """permute/transpose/movedim: axis ids move with their axes."""
    x = input
    perm = _permute_dims(kind, x.ndim, tuple(dims))
    return Lab(tuple(x.ids[p] for p in perm), tuple(x.zero[p] for p in perm))


functions("permute", [torch.permute] + _ov(aten.permute, "default"), ("input", "*dims"), kind="permute")
methods("permute", ["permute"], ("input", "*dims"), kind="permute")
functions("permute", [torch.transpose, torch.swapaxes, torch.swapdims] + _ov(aten.transpose, "int"),
          ("input", "*dims"), kind="transpose")
methods("permute", ["transpose", "swapaxes", "swapdims", "transpose_"], ("input", "*dims"), kind="transpose")
functions("permute", [torch.t] + _ov(aten.t, "default"), ("input", "*dims"), kind="t")
methods("permute", ["t"], ("input", "*dims"), kind="t")
functions("permute", [torch.movedim, torch.moveaxis] + _ov(aten.movedim, "int"), ("input", "*dims"), kind="movedim")
methods("permute", ["movedim", "moveaxis"], ("input", "*dims"), kind="movedim")


def _expand_fix(site, input, sizes=(), **_):
    new, old = site.out_new, site.out_old
    raw = _shape_args(sizes)
    if new == old or len(raw) != len(new):
        return
    vals = [_size_arg(site, v, o, n) if not isinstance(v, fx.Node) or o != n else v
            for v, o, n in zip(raw, old, new)]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    site.set_varargs("sizes", [tuple(vals)] if packed else vals)


@rule("expand", fix=_expand_fix)
def expand(ctx: Ctx, input, sizes=(), out=None, **_):
    """expand: axes of equal size keep their ids, broadcast (new or size-1) axes are pinned."""
    x = input
    shape = _out_shape(out)
    off = len(shape) - x.ndim
    return _pass(ctx, x, shape, {d + off: d for d in range(x.ndim)})


methods("expand", ["expand"], ("input", "*sizes"))
functions("expand", _ov(aten.expand, "default"), ("input", "sizes"))


@rule("expand_as")
def expand_as(ctx: Ctx, input, other, out=None, **_):
    """x.expand_as(y): an axis x has in full is tied to y's; a broadcast axis takes y's ids (its size follows y)."""
    x, y = input, other
    off = y.ndim - x.ndim
    ids, zero = list(y.ids), [false_mask(n) for n in y.shape]
    for d in range(x.ndim):
        if x.shape[d] == y.shape[d + off]:
            ctx.tie(x.ids[d], y.ids[d + off])
            ids[d + off], zero[d + off] = x.ids[d], x.zero[d]
    return Lab(tuple(ids), tuple(zero))


methods("expand_as", ["expand_as"], ("input", "other"))
functions("expand_as", _ov(aten.expand_as, "default"), ("input", "other"))


@rule("channel_shuffle")
def channel_shuffle(ctx: Ctx, input, groups, out=None, **_):
    """shuffle of g groups of C/g channels: channel j of every group is one row (the groups stay equal)."""
    x = input
    c = x.ids[1].reshape(int(groups), -1)
    ctx.tie(c, c[:1])
    perm = np.arange(len(x.ids[1])).reshape(int(groups), -1).T.reshape(-1)
    return x.with_axis(1, x.ids[1][perm], x.zero[1][perm])


functions("channel_shuffle", [getattr(F, "channel_shuffle", None), getattr(torch, "channel_shuffle", None),
                              getattr(torch, "native_channel_shuffle", None)]
          + _ov(aten.channel_shuffle, "default") + _ov(getattr(aten, "native_channel_shuffle", aten.channel_shuffle), "default"),
          ("input", "groups"))
modules("channel_shuffle", [nn.ChannelShuffle], lambda node, m, args, kwargs: dict(input=args[0], groups=m.groups))


# ---------------------------------------------------------------------------------------------
# Reductions and normalising maps
# ---------------------------------------------------------------------------------------------


def _reduce_axes(dim, ndim):
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(ndim))
    if isinstance(dim, int):
        return [_ax(dim, ndim)]
    return [_ax(d, ndim) for d in dim]


@rule("reduce")
def reduce(ctx: Ctx, input, dim=None, keepdim=False, kind="mean", out=None, **_):
    """sum over an axis is a contraction (its channels must be zero with their rows); mean, var and max over an axis pin it; other axes keep their ids."""
    x = input
    if not isinstance(x, Lab):
        return x
    axes = _reduce_axes(dim, x.ndim)
    for a in axes:
        if kind == "sum":
            bad = ~x.zero[a]
            if bad.any():
                ctx.pin(x.ids[a][bad], "sum over channels that are not zero with their rows")
        else:
            ctx.pin(x.ids[a], f"{kind} over this axis")
    shape = _out_shape(out[0] if isinstance(out, (tuple, list)) else out)
    ids, zero = [], []
    for d in range(x.ndim):
        if d in axes:
            if keepdim:
                ids.append(pinned_axis(1))
                zero.append(false_mask(1))
        else:
            ids.append(x.ids[d])
            zero.append(x.zero[d])
    lab = Lab(tuple(ids), tuple(zero))
    if lab.shape != shape:
        ctx.pin(x, f"{kind} reduction was not understood")
        lab = ctx.pinned_lab(shape)
    if isinstance(out, (tuple, list)):
        return tuple(lab for _ in out)
    return lab


for _kind, _fns in [("sum", ["sum", "nansum"]), ("mean", ["mean", "nanmean"]), ("var", ["var", "std"]),
                    ("max", ["amax", "amin", "max", "min", "logsumexp", "norm", "prod"])]:
    for _f in _fns:
        functions("reduce", [getattr(torch, _f, None)] + (_ov(getattr(aten, _f), "dim", "dim_IntList", "correction", "default")
                                                          if hasattr(aten, _f) else []),
                  ("input", "dim", "keepdim"), kind=_kind)
        methods("reduce", [_f], ("input", "dim", "keepdim"), kind=_kind)


@rule("normalize")
def normalize(ctx: Ctx, input, p=2.0, dim=1, eps=1e-12, out=None, **_):
    """x / max(||x||_p over dim, eps): that axis is mixed (pinned); other axes keep their ids and zeros (0 / eps = 0)."""
    x = input
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "normalised over this axis")
    return x


functions("normalize", [F.normalize], ("input", "p", "dim", "eps"))
functions("reduce", [torch.linalg.vector_norm] + _ov(aten.linalg_vector_norm, "default"),
          ("input", "ord", "dim", "keepdim"), kind="max")


@rule("softmax")
def softmax(ctx: Ctx, input, dim=None, out=None, **_):
    """softmax over an axis: that axis is pinned (every channel is in the divisor); other axes keep their ids, not zero."""
    x = input
    if dim is None:  # torch's legacy implicit dim (F._get_softmax_dim)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    d = _ax(dim, x.ndim)
    ctx.pin(x.ids[d], "softmax over this axis")
    return Lab(x.ids, tuple(false_mask(len(a)) for a in x.ids))


functions("softmax", [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax]
          + _ov(aten.softmax, "int") + _ov(aten._softmax, "default") + _ov(aten.log_softmax, "int")
          + _ov(aten._log_softmax, "default"), ("input", "dim"))
methods("softmax", ["softmax", "log_softmax"], ("input", "dim"))
modules("softmax", [nn.Softmax, nn.LogSoftmax], lambda node, m, args, kwargs: dict(input=args[0], dim=m.dim))


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@rule("size")
def size(ctx: Ctx, input, dim=None, out=None, **_):
    """x.size()/x.shape: the numbers remember which axes they measure, so that an unknown use pins them."""
    x = input
    if dim is None:
        return tuple(SymSize(n, (x.ids[d],)) for d, n in enumerate(x.shape))
    d = _ax(dim, x.ndim)
    return SymSize(x.shape[d], (x.ids[d],))


methods("size", ["size"], ("input", "dim"))
functions("size", _ov(aten.sym_size, "int"), ("input", "dim"))


@rule("ndim")
def ndim(ctx: Ctx, input, out=None, **_):
    """x.dim(): the rank, which pruning never changes."""
    return out


methods("ndim", ["dim", "ndimension"], ("input",))
functions("ndim", _ov(aten.dim, "default"), ("input",))


@rule("numel")
def numel(ctx: Ctx, input, out=None, **_):
    """x.numel(): a number that measures every axis."""
    return SymSize(math.prod(input.shape), tuple(input.ids))


methods("numel", ["numel"], ("input",))
functions("numel", [torch.numel], ("input",))


@rule("arith")
def arith(ctx: Ctx, input=None, other=None, kind="", out=None, **_):
    """python arithmetic on sizes: the result measures what its operands measured."""
    if isinstance(input, Lab) or isinstance(other, Lab):  # -x, x ** 2, x // 2 on tensors
        ctx.pin([v for v in (input, other) if isinstance(v, SymSize)], "a size read off this axis is used as a value")
        if isinstance(input, Lab) and not isinstance(other, Lab):
            keeps_zero = kind in ("neg", "floordiv", "mod") or (
                kind == "pow" and isinstance(other, (int, float)) and other > 0)
            return input if keeps_zero else Lab(input.ids, tuple(false_mask(len(a)) for a in input.ids))
        ctx.pin([v for v in (input, other) if isinstance(v, Lab)], f"tensor {kind} by a tensor")
        return ctx.pinned_lab(_out_shape(out))
    ids = tuple(a for v in (input, other) if isinstance(v, SymSize) for a in v.ids)
    return SymSize(None, ids)


for _kind in ("floordiv", "mod", "neg", "pow"):
    functions("arith", [getattr(operator, _kind)], ("input", "other"), kind=_kind)
functions("arith", [torch.pow] + _ov(aten.pow, "Tensor_Scalar"), ("input", "other"), kind="pow")
methods("arith", ["pow"], ("input", "other"), kind="pow")
