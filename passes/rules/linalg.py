"""Linear algebra: conv, linear, embedding (layers that own a channel axis), matmul, addmm, einsum.

A parameter slice that reads channel c is in c's row, so a layer with a weight needs nothing from
its input: the row's zero weights cancel whatever flows in. Contractions of two activations
(``matmul``, ``einsum``) need the zero mask instead; where it is false the channel is pinned.

Internals:
    * ``groups > 1`` convs tie each conv group's input channels into one row, so the groups stay
      equal-sized after pruning (``_conv_fix`` recomputes ``groups``); a depthwise conv's output
      channel is its input channel.
    * A bias is a constant added along every axis the layer passes through (a Linear over the
      tokens of [B, C, T]: channel c comes out as the bias): ``_plus_constant`` clears their zero
      masks, so a sum over them keeps those channels; their ``const`` masks stay (a layer norm fills
      the constant in). ``addmm``/``baddbmm`` get the same from ``binary``'s broadcasting.
    * A pointwise conv (kernel 1, stride 1, no padding) passes its spatial axes as a linear layer
      passes its leading ones: lucidrains' Mixer mixes tokens with ``Conv1d(T, T', 1)`` on ``[B, T, C]``,
      so the stream's C is the conv's length axis.
    * A weight-normed weight (``WeightNormRef``: a parametrised layer's binder, or ATen's
      ``_weight_norm`` read as a conv or linear weight) has input slices of ``v``, which training
      does not zero, and a weight computed in the graph (weight standardisation) may have input
      slices that are not zero with their row: ``_input_must_be_zero`` pins the input channels that
      are not zero with their row.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..channels import OWN, PINNED, AxisLabels, Ctx, ParamRef, WeightNormRef, false_mask, pinned_axis, true_mask
from ..registry import RuleDeclined, form_of, functions, methods, modules, rule
from ..weightnorm import RULES_WITH_WEIGHT_NORM, norm_dim
from .common import _ov, _out_shape, _passthrough, _plus_constant
from .elementwise import binary

aten = torch.ops.aten


def _conv_fix(site, input, weight, groups=1, transposed=False, **_):
    old_c, new_c = site.old(input)[1], site.new(input)[1]
    g = groups if groups is not None else 1
    new_g = g if g == 1 else g * new_c // old_c
    new_out = site.out_new[1]
    m = site.module
    if m is not None:
        # NB: a module called at two sites (coat's shared depthwise convs) is fixed twice, and its
        # ``groups`` then already reads the new count: the sliced weight's per-group width decides
        per = m.weight.shape[1] if getattr(m, "weight", None) is not None else 0
        if g != 1 and per:
            new_g = (new_out if transposed else new_c) // per
        m.in_channels, m.out_channels, m.groups = new_c, new_out, new_g
    elif new_g != g:
        site.set("groups", new_g)


def _pointwise(kernel, stride, padding, transposed) -> bool:
    """Whether a conv reads each position alone: kernel 1, stride 1 and no padding along every axis."""
    ones = lambda v: v is None or all(int(e) == 1 for e in (v if isinstance(v, (tuple, list)) else (v,)))  # noqa: E731
    nopad = padding is None or padding in ("valid", "same") or all(
        int(e) == 0 for e in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return not transposed and all(k == 1 for k in kernel) and ones(stride) and nopad


@rule("conv", fix=_conv_fix, reads_params=True)
def conv(ctx: Ctx, input, weight, bias=None, groups=1, transposed=False, stride=None, padding=None, meta=None, **_):
    """out channel o = sum over its conv group's input channels: weight dim 0 (dim 1 if transposed) owns out, the other dim reads in; groups > 1 ties each conv group's in and out channels into one row; a pointwise conv (kernel 1, stride 1, no padding) passes its spatial axes position by position (a Conv1d over the tokens of MLP-Mixer's [B, T, C])."""
    x = input
    g = int(groups or 1)
    nsp = len(ctx.shape_of(weight)) - 2
    cax = x.ndim - nsp - 1
    in_ids = x.ids[cax]
    kernel = {d: PINNED for d in range(2, 2 + nsp)}
    shape = _out_shape(meta)
    o_ax, i_ax = (1, 0) if transposed else (0, 1)
    if g == 1:
        w = ctx.param(weight, {i_ax: in_ids, o_ax: OWN, **kernel}, out=o_ax)
        out_ids = w.ids[o_ax]
        _input_must_be_zero(ctx, weight, w, i_ax, x, cax)
    else:
        in_g = in_ids.reshape(g, len(in_ids) // g)
        if in_g.shape[1] > 1:
            ctx.tie(in_g, in_g[:, :1])
        if transposed:
            # NB: a conv group's outputs read only its inputs, which are in the group's row
            w = ctx.param(weight, {0: in_ids, 1: PINNED, **kernel}, out=1)
            _input_must_be_zero(ctx, weight, w, 0, x, cax)
            out_ids = ctx.fresh(shape[cax])
        elif in_g.shape[1] == 1 and ctx.shape_of(weight)[0] == g:
            # depthwise, one output per input channel: the weight's out axis is the input's
            # channels (the same class the tie below would make, without a union)
            out_ids = ctx.param(weight, {0: in_ids, 1: PINNED, **kernel}, out=0).ids[0]
        else:
            out_ids = ctx.param(weight, {0: OWN, 1: PINNED, **kernel}, out=0).ids[0]
        if out_ids is not in_ids:
            ctx.tie(out_ids.reshape(g, -1), in_g[:, :1])
    ctx.param(bias, {0: out_ids})
    keep = {d: d for d in range(cax)}
    if _pointwise(ctx.shape_of(weight)[2:], stride, padding, transposed):
        keep.update({d: d for d in range(cax + 1, x.ndim)})
    lab = _passthrough(ctx, x, shape, keep, handled=(cax,))
    # a slice of a passed axis is W times the input's slice plus b: constant where the input's is
    const = [x.fixed(d) if d in keep and lab.ids[d] is x.ids[d] else lab.zero[d] for d in range(len(shape))]
    if bias is not None:  # NB: out[n, o] = conv(x[n])[o] + b[o]: a zero batch entry n comes out as b
        lab = _plus_constant(lab)
    lab = AxisLabels(lab.ids, lab.zero, tuple(const))
    return lab.with_axis(cax, out_ids, true_mask(len(out_ids)), true_mask(len(out_ids)))


def _input_must_be_zero(ctx: Ctx, weight, w: AxisLabels, axis: int, x: AxisLabels, cax: int) -> None:
    """A weight-normed weight's slices along ``axis`` (the input's channels) are v's, which are not
    zeroed with their row, and a weight computed in the graph may have slices that are not zero with
    theirs (weight standardisation's ``(w - mean) / std``): the layer cancels a channel only if the
    channel is zero itself."""
    computed = isinstance(weight, AxisLabels) and not ctx.is_tensor_lab(weight)
    if not isinstance(weight, WeightNormRef) and not computed:
        return
    bad = ~(w.zero[axis] | x.zero[cax])
    if bad.any():
        what = ("weight norm's v is not zeroed with the row of the input channel it reads" if not computed else
                "the computed weight's slice reading this channel is not zero with its row")
        ctx.pin(x.ids[cax][bad], f"{what}, and this channel is not zero when its row is")


def _conv_module(node, m, args, kwargs):
    t = node.target
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return dict(
        input=args[0] if args else kwargs["input"],
        weight=ParamRef(f"{t}.weight"),
        bias=ParamRef(f"{t}.bias") if m.bias is not None else None,
        groups=m.groups,
        transposed=transposed,
        stride=m.stride,
        padding=m.padding,  # NB: another padding_mode pads by the same amounts
    )


modules("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d], _conv_module)
_CONV_SPEC = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
functions("conv", [F.conv1d, F.conv2d, F.conv3d] + _ov(aten.conv1d, "default") + _ov(aten.conv2d, "default")
          + _ov(aten.conv3d, "default"), _CONV_SPEC, (("groups", 1),), transposed=False)
_CONVT_SPEC = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
functions("conv", [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]
          + _ov(aten.conv_transpose1d, "default") + _ov(aten.conv_transpose2d, "input")
          + _ov(aten.conv_transpose3d, "input"), _CONVT_SPEC, (("groups", 1),), transposed=True)
functions("conv", _ov(aten.convolution, "default"))


def _weight_argument_of(node, user, mods) -> bool:
    """Whether ``user`` is a conv or linear layer reading ``node`` as its weight, and nothing else of it."""
    form = form_of(user, mods)
    if form is None or form.rule not in RULES_WITH_WEIGHT_NORM or form.module_binder is not None:
        return False
    at = [i for i, a in enumerate(user.args) if a is node] + [k for k, a in user.kwargs.items() if a is node]
    return at == [form.spec.index("weight") if "weight" in form.spec else "weight"]


@rule("weight_norm", reads_params=True)
def weight_norm(ctx: Ctx, v, g, dim=0, meta=None, **_):
    """W = g * v / ||v||, the norm over every axis of v but dim (all for dim -1): the weight of the conv or linear layer reading it, g owning dim; v is sliced with the rows but never zeroed along dim (see Ctx.weight_norm_lab); read by anything else it is pinned."""
    if not isinstance(v, ParamRef) or not isinstance(g, ParamRef):
        raise RuleDeclined("weight norm of tensors that are not parameters of the model")
    users = list(ctx.node.users) if ctx.node is not None else []
    if not users or not all(_weight_argument_of(ctx.node, u, ctx.modules) for u in users):
        raise RuleDeclined("its weight is read by something other than a conv or linear layer's weight argument")
    return WeightNormRef(g.name, v.name, norm_dim(dim, len(ctx.shape_of(v))), "torch._weight_norm")


functions("weight_norm", [torch._weight_norm] + _ov(aten._weight_norm, "default"), ("v", "g", "dim"))


def _linear_fix(site, **_):
    m = site.module
    if m is not None:
        m.out_features, m.in_features = m.weight.shape


@rule("linear", fix=_linear_fix, reads_params=True)
def linear(ctx: Ctx, input, weight, bias=None, meta=None, **_):
    """y[..., o] = sum_i W[o, i] x[..., i] + b[o]: weight dim 1 reads the last axis, dim 0 and bias own the new last axis; the other axes pass, zero with their rows only without a bias."""
    x = input
    w = ctx.param(weight, {0: OWN, 1: x.ids[-1]}, out=0)
    _input_must_be_zero(ctx, weight, w, 1, x, x.ndim - 1)
    ctx.param(bias, {0: w.ids[0]})
    shape = _out_shape(meta)
    lab = _passthrough(ctx, x, shape, {d: d for d in range(x.ndim - 1)}, handled=(x.ndim - 1,))
    # a slice along a passed axis is W times the input's slice plus b: constant where the input's is
    const = [x.fixed(d) if d < x.ndim - 1 and lab.ids[d] is x.ids[d] else lab.zero[d] for d in range(len(shape))]
    if bias is not None:
        # NB: a Linear over a non-channel axis (MLP-Mixer's token mixing: [B, C, T] -> Linear(T, T))
        # maps a zero channel c to y[b, c, :] = W 0 + b = b: its zeros do not pass (a sum over C must
        # then keep the channel; a layer norm over C fills the constant in: rules.norm)
        lab = _plus_constant(lab)
    lab = AxisLabels(lab.ids, lab.zero, tuple(const))
    out = len(shape) - 1
    return lab.with_axis(out, w.ids[0], true_mask(len(w.ids[0])), true_mask(len(w.ids[0])))


def _linear_module(node, m, args, kwargs):
    t = node.target
    return dict(input=args[0] if args else kwargs["input"], weight=ParamRef(f"{t}.weight"),
                bias=ParamRef(f"{t}.bias") if m.bias is not None else None)


modules("linear", [nn.Linear], _linear_module)
functions("linear", [F.linear] + _ov(aten.linear, "default"), ("input", "weight", "bias"))


@rule("matmul")
def matmul(ctx: Ctx, input, other, meta=None, **_):
    """c[..., m, n] = sum_k a[..., m, k] b[..., k, n]: k indices of a and b are one channel and must be zero on one side; m comes from a, n from b, batch axes broadcast."""
    a, b = input, other
    shape = _out_shape(meta)
    if not isinstance(a, AxisLabels) or not isinstance(b, AxisLabels) or a.ndim < 2 or b.ndim < 2:
        for v in (a, b):
            if isinstance(v, AxisLabels):
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
    return AxisLabels(tuple(ids), tuple(zero))


functions("matmul", [torch.matmul, operator.matmul, torch.bmm, torch.mm] + _ov(aten.matmul, "default")
          + _ov(aten.bmm, "default") + _ov(aten.mm, "default"), ("input", "other"), rename={"mat2": "other"})
methods("matmul", ["matmul", "bmm", "mm", "__matmul__"], ("input", "other"))


@rule("baddbmm")
def baddbmm(ctx: Ctx, input, batch1, batch2, beta=1, alpha=1, meta=None, **_):
    """beta * input + alpha * batch1 @ batch2 (BLOOM's ALiBi scores): the matmul's algebra, then the add's broadcasting."""
    prod = matmul(ctx, batch1, batch2, meta=meta)
    if isinstance(input, AxisLabels) and not (isinstance(beta, (int, float)) and beta == 0):
        return binary(ctx, input, prod, kind="add", meta=meta)
    return prod


functions("baddbmm", [torch.baddbmm] + _ov(aten.baddbmm, "default"), ("input", "batch1", "batch2"))
methods("baddbmm", ["baddbmm"], ("input", "batch1", "batch2"))


@rule("grouped_mm")
def grouped_mm(ctx: Ctx, input, other, offs=None, bias=None, meta=None, **_):
    """out[s, n] = sum_k x[s, k] w[g(s), k, n] with the group g(s) chosen by offs (fused experts): k of x and w's dim 1 are one channel (zero on one side); w's dim 2 owns n in every group alike (a fused [E, K, N] tensor keeps its groups equal-width, so channel n is one row across the groups); the group axis and the rows of x (cut into groups by offs) are pinned."""
    x, w = input, other
    shape = _out_shape(meta)
    if not isinstance(x, AxisLabels) or not isinstance(w, AxisLabels) or x.ndim != 2 or w.ndim != 3:
        ctx.pin([v for v in (x, w) if isinstance(v, AxisLabels)], "grouped mm other than [S, K] x [G, K, N]")
        return ctx.pinned_lab(shape)
    ctx.pin(w.ids[0], "the group (expert) of each row is chosen by data: removing one changes the routing")
    ctx.pin(offs, "used as group offsets")
    # NB: offs cut the rows into groups by position: removing a row would move the rows after it
    ctx.pin(x.ids[0], "grouped mm assigns rows to groups by their position (offs)")
    ctx.tie(x.ids[1], w.ids[1])
    zk = x.zero[1] | w.zero[1]
    if not zk.all():
        ctx.pin(x.ids[1][~zk], "contraction over a channel that is not zero when its row is")
    out = AxisLabels((x.ids[0], w.ids[2]), (x.zero[0], w.zero[2]))
    if isinstance(bias, AxisLabels):  # [G, N] or [N]: n is the bias' last axis
        ctx.tie(bias.ids[-1], w.ids[2])
        if bias.ndim == 2:
            ctx.pin(bias.ids[0], "the group (expert) of each row is chosen by data")
        # NB: the bias is added to every row s: a zero row of x comes out as the bias
        out = AxisLabels(out.ids, (false_mask(len(out.ids[0])), out.zero[1] & bias.zero[-1]))
    return out


functions("grouped_mm", [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]
          + _ov(getattr(aten, "_grouped_mm", None), "default"), ("input", "other"),
          rename={"mat2": "other", "mat_b": "other", "mat_a": "input"})

_LIBRARY_OPS = (("transformers", "grouped_mm_fallback", "grouped_mm", {"weight": "other"}),)


def bind_library_ops() -> None:
    """Bind ops that third-party libraries register when they are imported (after otofx is):
    Hugging Face's ``transformers::grouped_mm_fallback`` (fused experts, [S, K] x [E, K, N])."""
    from ..registry import FUNCTION_FORMS

    for ns, name, rule_name, rename in _LIBRARY_OPS:
        packet = getattr(getattr(torch.ops, ns, None), name, None) if hasattr(torch.ops, ns) else None
        try:
            ov = packet.default if packet is not None else None
        except AttributeError:
            ov = None
        if ov is not None and ov not in FUNCTION_FORMS:
            functions(rule_name, [ov], rename=rename)


@rule("addmm")
def addmm(ctx: Ctx, input, mat1, mat2, beta=1, alpha=1, meta=None, **_):
    """input + mat1 @ mat2 (HF Conv1D: a weight [in, out]): the matmul's algebra, then the add's broadcasting over its last axis."""
    prod = matmul(ctx, mat1, mat2, meta=meta)
    if isinstance(input, AxisLabels):
        return binary(ctx, input, prod, kind="add", meta=meta)
    return prod


functions("addmm", [torch.addmm] + _ov(aten.addmm, "default"), ("input", "mat1", "mat2"))
methods("addmm", ["addmm"], ("input", "mat1", "mat2"))


def _embedding_fix(site, **_):
    m = site.module
    if m is not None:
        m.embedding_dim = m.weight.shape[1]


@rule("embedding", fix=_embedding_fix, reads_params=True)
def embedding(ctx: Ctx, input, weight, meta=None, **_):
    """y[..., j] = W[idx, j]: weight dim 1 owns the new last axis, dim 0 (the vocabulary) is pinned; the index axes pass, never zero with their rows."""
    weight = ctx.param(weight, {0: PINNED, 1: OWN})
    shape = _out_shape(meta)
    # NB: a zero index reads the table's row 0, not zeros
    lab = _plus_constant(_passthrough(ctx, input, shape, {d: d for d in range(input.ndim)}))
    return lab.with_axis(len(shape) - 1, weight.ids[1], true_mask(len(weight.ids[1])))


modules("embedding", [nn.Embedding],
        lambda node, m, args, kwargs: dict(input=args[0], weight=ParamRef(f"{node.target}.weight")))
# NB: ATen's embedding takes (weight, indices), F.embedding (input, weight): both come from the op
functions("embedding", [F.embedding] + _ov(aten.embedding, "default"), rename={"indices": "input"})


def _einsum_parse(equation: str, n_ops: int):
    eq = equation.replace(" ", "")
    if "." in eq:
        raise RuleDeclined("einsum with an ellipsis")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if not _:
        counts = {c: lhs.count(c) for c in set(lhs.replace(",", ""))}
        rhs = "".join(sorted(c for c, k in counts.items() if k == 1))
    if len(ins) != n_ops:
        raise RuleDeclined("einsum equation and operand count differ")
    return ins, rhs


@rule("einsum")
def einsum(ctx: Ctx, equation, operands=(), meta=None, **_):
    """einsum: a letter is one channel wherever it appears; letters kept in the output pass, summed letters contract (zero on one side, else pinned)."""
    ops = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (tuple, list)) else list(operands)
    ins, rhs = _einsum_parse(equation, len(ops))
    first: dict = {}
    zeros: dict = {}
    size: dict = {}
    for spec, v in zip(ins, ops):
        if not isinstance(v, AxisLabels) or len(spec) != v.ndim:
            raise RuleDeclined("einsum operand is not a tensor of the equation's rank")
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
    shape = _out_shape(meta)
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
    return AxisLabels(tuple(ids), tuple(zero))


functions("einsum", [torch.einsum] + _ov(aten.einsum, "default"), ("equation", "*operands"),
          rename={"tensors": "*operands"})
