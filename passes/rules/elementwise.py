"""Elementwise ops: activations and copies (``unary``), PReLU, arithmetic with broadcasting, where,
in-place copies (``x.copy_(src)``).

Every axis keeps its channel ids; broadcasting ties equal-sized axes of the operands. What varies
is whether a zero channel stays zero: ``f(0) = 0`` for relu or a copy (declared per form with
``zero_in``), not for sigmoid or exp; a sum of channels is zero only where every term is, a
product where any factor is.

Internals:
    * Constants (``AxisLabels.const``) pass every deterministic op; dropout (any ``p > 0``), rrelu and
      stochastic depth draw random numbers in training, so only zeros pass them.
    * A division pins the channels of its denominator, unless the denominator is positive by
      construction (``_positive``: clamp_min(x, eps), exp, x + eps of a non-negative x).
    * ``copy_`` writes into its first argument, often a view (``x[1:] += y`` exports as ``slice``,
      ``add_``, ``copy_``): the analysis gives the view's base the written entries' zeros
      (``zigs._write_back``); the rule itself only ties the copy's axes to the source's.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..channels import AxisLabels, Ctx, ParamRef, SymSize, false_mask, pinned_axis
from ..registry import ELEMENTWISE, RuleDeclined, functions, methods, modules, rule
from .common import _bind_input, _ov, _out_shape, _scalar_zero

aten = torch.ops.aten


@rule("unary", keeps_shape=ELEMENTWISE, keeps_axes=True)
def unary(ctx: Ctx, input, zero_in=True, min_val=None, max_val=None, random=False, p=None, meta=None, **kw):
    """y = f(x) elementwise: every axis keeps its ids; zero stays zero when f(0) = 0; a constant stays constant unless f draws random numbers (dropout with p > 0)."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    if random:
        # NB: dropout of a constant is not constant (in training); with p == 0 it is the identity
        rest = kw.get("_rest") or ()
        p = p if p is not None else (rest[0] if rest else 0.5)
        if not (isinstance(p, (int, float)) and p == 0):
            x = AxisLabels(x.ids, x.zero)
    lo = min_val if min_val is not None else kw.get("min")
    hi = max_val if max_val is not None else kw.get("max")
    for b in (lo, hi):
        if isinstance(b, (AxisLabels, SymSize)):
            ctx.pin(b, "a clamp bound is a tensor")
            zero_in = False
            x = AxisLabels(x.ids, x.zero)  # NB: clamped to another activation: not constant
    lo = lo if isinstance(lo, (int, float)) else float("-inf")
    hi = hi if isinstance(hi, (int, float)) else float("inf")
    if not (lo <= 0 <= hi):
        zero_in = False  # hardtanh/clamp move 0 to a bound
    if zero_in:
        return x
    return AxisLabels(x.ids, tuple(false_mask(len(a)) for a in x.ids), x.consts() or x.zero)


# f(0) == 0 (a zero channel stays zero: the form passes zero_in=True)
_ZERO_FNS = ["relu", "relu6", "gelu", "silu", "hardswish", "tanh", "leaky_relu", "elu", "selu",
             "celu", "mish", "softsign", "tanhshrink", "softshrink", "hardshrink", "abs", "neg", "rrelu",
             "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "feature_dropout", "feature_dropout_", "alpha_dropout_", "feature_alpha_dropout_", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "sqrt",
             "square", "sin", "erf", "relu_", "silu_", "hardswish_", "leaky_relu_", "elu_", "selu_",
             "celu_", "tanh_", "neg_", "abs_", "sin_", "dropout_", "gelu_", "mish_", "sign", "zero_",
             "log1p", "expm1", "tan", "atan", "asin", "asinh", "atanh", "sinh", "erfinv", "trunc", "round",
             "floor", "ceil", "frac", "sgn", "nan_to_num", "log1p_", "expm1_", "trunc_", "round_", "floor_",
             "ceil_"]
# finite but non-zero at 0 (zero_in=False: the output is not zero with its row)
_NONZERO_FNS = ["sigmoid", "hardsigmoid", "softplus", "exp", "cos", "logsigmoid", "sigmoid_", "hardsigmoid_",
                "exp_", "cos_", "erfc", "cosh", "exp2", "acos", "log_sigmoid"]
# copies whose dtype or strides may differ from the input's (shape propagation runs them)
_NEW_LAYOUT = {"to", "float", "half", "double", "bfloat16", "type", "_to_copy", "contiguous", "clone"}


# draw random numbers (in training): a constant does not stay constant, unless the probability p is 0
# (aten's ``feature_dropout`` is what ``F.dropout2d``/``dropout3d`` export to)
_RANDOM = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "dropout_",
           "feature_dropout", "feature_dropout_", "alpha_dropout_", "feature_alpha_dropout_"}
# NB: rrelu's slope is random in training whatever its bounds: read as dropout with p = 1
_RANDOM_ALWAYS = {"rrelu": {"p": 1.0}}


def _random_kw(n: str) -> dict:
    if n in _RANDOM_ALWAYS:
        return {"random": True, **_RANDOM_ALWAYS[n]}
    return {"random": True} if n in _RANDOM else {}


def _register_unary(names, zero_in):
    for n in names:
        aten_ops = _ov(getattr(aten, n, None), "default")
        targets = [t for t in [getattr(F, n, None), getattr(torch, n, None)] + aten_ops if callable(t)]
        functions("unary", targets, ("input",), zero_in=zero_in, changes_dtype_or_strides=n in _NEW_LAYOUT,
                  **_random_kw(n))
        methods("unary", [n], ("input",), zero_in=zero_in, changes_dtype_or_strides=n in _NEW_LAYOUT,
                **_random_kw(n))


_register_unary(_ZERO_FNS, True)
_register_unary(_NONZERO_FNS, False)
functions("unary", _ov(aten.alias, "default") + _ov(aten.lift_fresh_copy, "default"), ("input",), zero_in=True)
functions("unary", _ov(aten.native_dropout, "default"), ("input",), zero_in=True, random=True)
# x.type_as(other): a copy in other's dtype (other's values are not read)
functions("unary", _ov(aten.type_as, "default"), ("input", "other"), zero_in=True, changes_dtype_or_strides=True)
methods("unary", ["type_as"], ("input", "other"), zero_in=True, changes_dtype_or_strides=True)
functions("unary", _ov(aten._to_copy, "default") + _ov(aten.to, "dtype", "dtype_layout", "device"), ("input",),
          zero_in=True, changes_dtype_or_strides=True)
modules("unary", [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU,
                  nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
                  nn.Identity], _bind_input, zero_in=True)
modules("unary", [nn.RReLU], _bind_input, zero_in=True, random=True, p=1.0)


def _bind_dropout(node, m, args, kwargs):
    return dict(input=args[0] if args else kwargs.get("input"), p=m.p)


modules("unary", [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout],
        _bind_dropout, zero_in=True, random=True)
functions("unary", [torch.clamp, torch.clip] + _ov(aten.clamp, "default") + _ov(aten.clip, "default"),
          ("input", "min_val", "max_val"), rename={"min": "min_val", "max": "max_val"})
methods("unary", ["clamp", "clip", "clamp_", "clip_"], ("input", "min_val", "max_val"))
functions("unary", [torch.clamp_min] + _ov(aten.clamp_min, "default"), ("input", "min_val"), (("max_val", float("inf")),),
          rename={"min": "min_val"})
methods("unary", ["clamp_min", "clamp_min_"], ("input", "min_val"), (("max_val", float("inf")),))
functions("unary", [torch.clamp_max] + _ov(aten.clamp_max, "default"), ("input", "max_val"), (("min_val", float("-inf")),),
          rename={"max": "max_val"})
methods("unary", ["clamp_max", "clamp_max_"], ("input", "max_val"), (("min_val", float("-inf")),))
modules("unary", [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid], _bind_input, zero_in=False)
# hardtanh: f(0) = 0 unless its bounds exclude 0, which the rule checks
modules("unary", [nn.Hardtanh], lambda node, m, args, kwargs: dict(input=args[0], min_val=m.min_val,
                                                                    max_val=m.max_val))
functions("unary", [F.hardtanh, F.hardtanh_] + _ov(aten.hardtanh, "default"), ("input", "min_val", "max_val"),
          (("min_val", -1.0), ("max_val", 1.0)))
functions("unary", _ov(aten.hardtanh_, "default"), zero_in=True)
methods("unary", ["hardtanh", "hardtanh_"], ("input", "min_val", "max_val"), (("min_val", -1.0), ("max_val", 1.0)))

try:  # torchvision's stochastic depth: a per-sample mask times the input
    from torchvision.ops import StochasticDepth, stochastic_depth

    modules("unary", [StochasticDepth], _bind_dropout, zero_in=True, random=True)
    functions("unary", [stochastic_depth], ("input", "p", "mode", "training"), zero_in=True, random=True)
except ImportError:  # pragma: no cover - torchvision is optional
    StochasticDepth = stochastic_depth = None


def _prelu_fix(site, **_):
    m = site.module
    if m is not None:
        m.num_parameters = m.weight.numel()


@rule("prelu", fix=_prelu_fix, reads_params=True, keeps_shape=ELEMENTWISE, keeps_axes=True)
def prelu(ctx: Ctx, input, weight, meta=None, **_):
    """y = max(0, x) + a[c] min(0, x): a per-channel slope is owned by channel axis 1; zero stays zero."""
    x = input
    ctx.param(weight, {0: x.ids[1 if x.ndim > 1 else 0]})
    return x


modules("prelu", [nn.PReLU], lambda node, m, args, kwargs: dict(input=args[0], weight=ParamRef(f"{node.target}.weight")))
functions("prelu", [F.prelu] + _ov(aten.prelu, "default"), ("input", "weight"))


@rule("singular", keeps_shape=ELEMENTWISE, keeps_axes=True)
def singular(ctx: Ctx, input, meta=None, **_):
    """y = f(x) with f singular at 0 (rsqrt, reciprocal, log): channels are pinned unless x > 0 by construction (then kept, not zero with their rows)."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    if not _positive(ctx.node.args[0] if ctx.node is not None and ctx.node.args else None):
        ctx.pin(x, "f(x) is singular at x = 0 (rsqrt, reciprocal, log) and x is not positive by construction")
    return AxisLabels(x.ids, tuple(false_mask(len(a)) for a in x.ids))


for _n in ("rsqrt", "reciprocal", "log", "log2", "log10"):
    functions("singular", [getattr(torch, _n)] + _ov(getattr(aten, _n), "default"), ("input",))
    methods("singular", [_n, _n + "_"], ("input",))


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
    if name == "pow" and args and isinstance(args[0], (int, float)) and args[0] > 0:  # 2 ** x (MPT's ALiBi slopes)
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
    if name in ("abs", "relu", "square", "linalg_vector_norm", "linalg_norm", "norm", "sqrt"):
        return True
    if name in ("pow", "__pow__") and len(node.args) > 1 and node.args[1] == 2:
        return True
    if name in ("mul", "__mul__") and len(node.args) > 1 and node.args[0] is node.args[1]:
        return True  # x * x (litgpt's RMSNorm)
    if name in ("mean", "sum", "amax"):
        return _nonnegative(node.args[0], depth - 1)
    return False


@rule("binary", takes_sizes=True, python_values=True, keeps_axes=True)
def binary(ctx: Ctx, input, other, kind="add", cmp=None, meta=None, **_):
    """z = x (op) y with broadcasting (arithmetic, comparisons): axes of equal size are the same channels (tied); zero when both are zero (add, sub) or either is (mul); constant when every operand's slice is (an operand broadcast over the axis must be a parameter or a number)."""
    operands = [input, other]
    if kind == "div" and isinstance(other, AxisLabels) and not _positive(ctx.node.args[1] if ctx.node is not None
                                                                  and len(ctx.node.args) > 1 else None):
        ctx.pin(other, "divides by this channel")
    if not any(isinstance(v, AxisLabels) for v in operands):  # python arithmetic (sizes, lists)
        sym = tuple(a for v in operands if isinstance(v, SymSize) for a in v.ids)
        return SymSize(meta, sym) if sym else meta
    shape = _out_shape(meta)
    n = len(shape)
    labs = [v for v in operands if isinstance(v, AxisLabels)]
    ctx.pin([v for v in operands if isinstance(v, SymSize)], "a size read off this axis is used as a value")
    sized = any(isinstance(v, SymSize) for v in operands)
    ids, zero, const = [], [], []
    for d in range(n):
        full, part = [], []
        for v in labs:
            vd = d - (n - v.ndim)
            if vd < 0 or v.shape[vd] != shape[d]:
                part.append(v)
            else:
                full.append((v.ids[vd], v.zero[vd], v.fixed(vd), v))
        if shape[d] == 1 and len(full) > 1 and any(c[0].any() for c in full):
            # NB: a size-1 axis that is no channel (a keepdim reduction's: an RMS norm's
            # rsqrt(mean(x ** 2)) times x) against a channel left alone broadcasts; it is not tied
            keep = [c[0].any() for c in full]
            part += [v for v in labs if d - (n - v.ndim) >= 0 and v.shape[d - (n - v.ndim)] == 1
                     and not v.ids[d - (n - v.ndim)].any()]
            full = [c for c, k in zip(full, keep) if k]
        for v in part:  # NB: one channel broadcast over the axis (a [.., 1] gate times [.., n]) cannot go
            vd = d - (n - v.ndim)
            if vd >= 0:
                ctx.pin(v.ids[vd], "broadcast over an axis of another size")
        if not full:
            ids.append(pinned_axis(shape[d]))
            zero.append(false_mask(shape[d]))
            const.append(false_mask(shape[d]))
            continue
        for c in full[1:]:
            ctx.tie(full[0][0], c[0])
        # NB: an operand that is not sliced along d (broadcast, or without the axis) enters every slice
        # whole: constant only as a parameter or buffer (a number is; a size read off a tensor is not:
        # a fill read at the example's sizes would be wrong at others)
        sliced = [c[3] for c in full]
        if not sized and all(ctx.is_tensor_lab(v) for v in labs if not any(v is u for u in sliced)):
            cd = np.logical_and.reduce([c[2] for c in full])
        else:
            cd = false_mask(shape[d])
        zs = [c[1] for c in full]
        scalars = [v for v in operands if not isinstance(v, AxisLabels)]
        if kind in ("mul",):
            z = zs[0] if len(zs) == 1 else np.logical_or.reduce(zs)
            if any(_scalar_zero(s) for s in scalars):
                z = np.ones(shape[d], dtype=bool)
        elif kind == "div":  # zero where the numerator is (a pinned denominator is never zero with a row)
            nd = d - (n - input.ndim) if isinstance(input, AxisLabels) else -1
            z = input.zero[nd] if nd >= 0 and input.shape[nd] == shape[d] else false_mask(shape[d])
        elif kind == "compare":  # zero with its rows where the comparison of zeros is False
            z = _compare_zero(cmp, input, other, zs, part)
            z = false_mask(shape[d]) if z is None else z
        elif kind == "pow" or part or not all(_scalar_zero(s) for s in scalars):  # NB: 0 ** 0 == 1
            z = false_mask(shape[d])
        else:
            z = zs[0] if len(zs) == 1 else np.logical_and.reduce(zs)
        ids.append(full[0][0])
        zero.append(z)
        const.append(cd | z)
    return AxisLabels(tuple(ids), tuple(zero), tuple(const))


def _compare_zero(cmp, input, other, zs, part):
    """The zero mask of a comparison's output on one axis, or None (not zero): where the operands'
    zeros compare False (x > 0.1 is False at 0; x == 0 is True)."""
    fn = getattr(operator, cmp or "", None)
    if fn is None or part:
        return None
    a = 0 if isinstance(input, AxisLabels) else input
    b = 0 if isinstance(other, AxisLabels) else other
    if not all(isinstance(v, (int, float, bool)) for v in (a, b)) or fn(a, b):
        return None
    return zs[0] if len(zs) == 1 else np.logical_and.reduce(zs)


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
functions("binary", [torch.multiply] + _ov(aten.multiply, "Tensor", "Scalar"), ("input", "other"), kind="mul")
# comparisons (a mask from activations): elementwise, a bool zero with its rows where 0 (op) c is False
for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    # NB: operator.gt is also Python's comparison of sizes: without a tensor the rule gives the sizes
    # it measured back (binary's python_values), so an assertion on them pins what it measures
    functions("binary", [getattr(torch, _n), getattr(operator, _n)] + _ov(getattr(aten, _n), "Tensor", "Scalar"),
              ("input", "other"), kind="compare", cmp=_n)
    methods("binary", [_n], ("input", "other"), kind="compare", cmp=_n)
# elementwise max / min of two tensors: zero where both are zero
functions("binary", [torch.maximum, torch.minimum, torch.fmax, torch.fmin]
          + _ov(aten.maximum, "default") + _ov(aten.minimum, "default") + _ov(aten.max, "other")
          + _ov(aten.min, "other") + _ov(aten.fmax, "default") + _ov(aten.fmin, "default"), ("input", "other"),
          kind="max")
methods("binary", ["maximum", "minimum", "fmax", "fmin"], ("input", "other"), kind="max")
# a tensor power of a tensor or of a scalar (ALiBi slopes base ** arange): elementwise, never zero with its rows
functions("binary", _ov(aten.pow, "Tensor_Tensor", "Scalar"), ("input", "other"), rename={"exponent": "other"},
          kind="pow")


@rule("addcmul", keeps_axes=True)
def addcmul(ctx: Ctx, input, tensor1, tensor2, value=1, meta=None, **_):
    """input + value * tensor1 * tensor2, broadcast: binary's mul of the two tensors, then its add (zero where input is and either factor is)."""
    shape = torch.broadcast_shapes(*(tuple(t.shape) for t in (tensor1, tensor2) if isinstance(t, (AxisLabels, torch.Tensor))))
    prod = binary(ctx, tensor1, tensor2, kind="mul", meta=torch.empty(shape, device="meta"))
    return binary(ctx, input, prod, kind="add", meta=meta)


functions("addcmul", [torch.addcmul] + _ov(aten.addcmul, "default"), ("input", "tensor1", "tensor2", "value"),
          (("value", 1),))
methods("addcmul", ["addcmul", "addcmul_"], ("input", "tensor1", "tensor2", "value"), (("value", 1),))


@rule("where", keeps_axes=True)
def where(ctx: Ctx, condition, input=None, other=None, meta=None, **_):
    """where(c, x, y): elementwise choice with broadcasting; axes of full size are one channel across c, x, y; zero where x and y both are."""
    if input is None and other is None:
        # NB: torch.where(c) alone is nonzero(c, as_tuple=True) (an MoE's tokens per expert): positions
        raise RuleDeclined("where(condition) alone gives the positions where it holds, not values")
    shape = _out_shape(meta)
    n = len(shape)
    vals = [v for v in (input, other)]
    ids, zero = [], []
    for d in range(n):
        full = []
        for v in (condition, input, other):
            if isinstance(v, AxisLabels):
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
            vd = d - (n - v.ndim) if isinstance(v, AxisLabels) else -1
            if isinstance(v, AxisLabels) and vd >= 0 and v.shape[vd] == shape[d]:
                z = z & v.zero[vd]
            elif not _scalar_zero(v):
                z = false_mask(shape[d])
        ids.append(full[0][0].ids[full[0][1]])
        zero.append(z)
    return AxisLabels(tuple(ids), tuple(zero))


functions("where", [torch.where] + _ov(aten.where, "self", "ScalarOther", "ScalarSelf", "Scalar"),
          ("condition", "input", "other"))


@rule("masked_fill", keeps_axes=True)
def masked_fill(ctx: Ctx, input, mask, value, meta=None, **_):
    """x.masked_fill(mask, v) = where(mask, v, x): where's algebra (broadcast axes tied; zero where x is and v == 0)."""
    return where(ctx, mask, value, input, meta=meta)


functions("masked_fill", [torch.masked_fill] + _ov(aten.masked_fill, "Scalar", "Tensor")
          + _ov(aten.masked_fill_, "Scalar", "Tensor"), ("input", "mask", "value"))
methods("masked_fill", ["masked_fill", "masked_fill_"], ("input", "mask", "value"))


@rule("copy", keeps_axes=True)
def copy(ctx: Ctx, input, src, meta=None, **_):
    """x.copy_(src): x's entries become src's (broadcast to x's shape): each axis src has in full is tied to x's and takes src's zeros and constants; an axis src is broadcast over keeps x's ids, not zero with them (a live size-1 channel of src broadcast is pinned)."""
    x = input
    shape = _out_shape(meta)
    if not isinstance(src, AxisLabels):  # a number written everywhere: constant, zero when it is 0
        z = _scalar_zero(src)
        return AxisLabels(x.ids, tuple((np.ones if z else np.zeros)(n, dtype=bool) for n in shape))
    n = len(shape)
    ids, zero, const = [], [], []
    for d in range(n):
        sd = d - (n - src.ndim)
        if sd >= 0 and src.shape[sd] == shape[d]:
            ctx.tie(x.ids[d], src.ids[sd])
            ids.append(x.ids[d])
            zero.append(src.zero[sd])
            const.append(src.fixed(sd))
            continue
        if sd >= 0:  # NB: one channel of src written over the whole axis cannot go
            ctx.pin(src.ids[sd], "broadcast over an axis of another size")
        ids.append(x.ids[d])
        zero.append(false_mask(shape[d]))
        const.append(false_mask(shape[d]))
    return AxisLabels(tuple(ids), tuple(zero), tuple(const) if src.const is not None else None)


functions("copy", _ov(aten.copy_, "default") + _ov(aten.copy, "default"), ("input", "src"))
methods("copy", ["copy_"], ("input", "src"))


@rule("like", keeps_shape=ELEMENTWISE, keeps_axes=True)
def like(ctx: Ctx, input, zero_in=False, fill_value=None, meta=None, **_):
    """zeros_like / ones_like / full_like / empty_like(x): a new tensor of x's shape, whose axes are x's (they shrink with x); zero for zeros_like (and full_like of 0), else not zero."""
    x = input
    if not isinstance(x, AxisLabels):
        return x
    if isinstance(fill_value, (AxisLabels, SymSize)):
        ctx.pin(fill_value, "a size read off this axis is used as a value")
    zero_in = zero_in or _scalar_zero(fill_value)
    return AxisLabels(x.ids, tuple((np.ones if zero_in else np.zeros)(len(a), dtype=bool) for a in x.ids))


@rule("new_factory")
def new_factory(ctx: Ctx, input, meta=None, **_):
    """x.new_zeros / new_ones / new_full / new_empty(size): a new tensor of the given size that takes only x's dtype and device: no channel of x reaches it (its axes are not channels; a size read off x is a value, pinned as everywhere)."""
    return ctx.pinned_lab(_out_shape(meta))


functions("like", [torch.zeros_like] + _ov(aten.zeros_like, "default"), ("input",), zero_in=True)
functions("like", [torch.ones_like, torch.empty_like] + _ov(aten.ones_like, "default") + _ov(aten.empty_like, "default"),
          ("input",))
functions("like", [torch.full_like] + _ov(aten.full_like, "default"), ("input", "fill_value"))
methods("new_factory", ["new_zeros", "new_ones", "new_full", "new_empty"], ("input",))
functions("new_factory", _ov(aten.new_zeros, "default") + _ov(aten.new_ones, "default") + _ov(aten.new_full, "default")
          + _ov(aten.new_empty, "default"), ("input",))
