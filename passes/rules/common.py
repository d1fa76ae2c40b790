"""Helpers shared by the rule families: ATen overload lookup, axis arithmetic, pass-through labels.

Internals:
    * ``_passthrough`` is the one place where an axis a rule neither keeps nor handles is pinned
      ("the op mixes this axis"): a rule that forgets an axis loses rows, never exactness.
"""
from __future__ import annotations

from ..channels import AxisLabels, Ctx, false_mask, pinned_axis


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


def _passthrough(ctx: Ctx, x: AxisLabels, shape, keep_axes, handled=()) -> AxisLabels:
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
    return AxisLabels(tuple(ids), tuple(zero))


def _plus_constant(lab: AxisLabels) -> AxisLabels:
    """``lab`` with no entry zero with its row: the op adds a constant (a bias, a norm's -mean/std) to
    every entry of the axes it passes through, so a zero entry there comes out as the constant."""
    return AxisLabels(lab.ids, tuple(false_mask(len(a)) for a in lab.ids))


def _scalar_zero(v) -> bool:
    return isinstance(v, (int, float, bool)) and v == 0


def _bind_input(node, m, args, kwargs):
    """Module binder of a layer whose only tensor argument is its input (activations, pools)."""
    return dict(input=args[0] if args else kwargs.get("input"))
