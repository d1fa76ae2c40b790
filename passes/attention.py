"""find_head_splits: which factor of a split channel axis is an attention head axis.

A projection's output ``[..., E]`` reshaped to ``[..., H, hd]`` (or ``[..., 3, H, hd]``) is split
into factors, and the reshape rule keeps one factor as the row axis and ties the rest into it.
Which one is a property of what the graph does *later*: when a factor reaches a batch position
of an attention contraction (``matmul``/``bmm``/``scaled_dot_product_attention``), it indexes
heads, and keeping it makes each head one row (q, k, v slices and the output projection's
columns of that head). This pass looks ahead from every split once, before ``find_zigs``.

``find_head_splits(gm) -> {reshape node name: frozenset of output axes to keep}``.

Internals:
    * Each split factor's position is followed through ops that keep or predictably move axes
      (permutes, elementwise ops, slices, cat, getitem with ints/None/slices, split/chunk/unbind,
      reshapes that keep or merge it) until it reaches a contraction; the walk is bounded per
      factor, so the pass stays linear in the graph.
    * A factor that reaches no contraction but meets, through elementwise ops, a position that an
      attention output's head axis reaches (a per-head gate multiplied into the attention output,
      HRM's and Qwen3-Next's ``sigmoid(gate) * attn``) is kept too.
    * The result is only a preference: the union-find rules still decide what is exact. A wrong
      hint costs rows (coarser or pinned groups), never exactness.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .registry import RULES, RuleDeclined, bind, form_of
from .rules.linalg import _einsum_parse
from .rules.shape import _groups_of, _permute_dims

_MAX_STEPS = 64  # nodes visited per factor


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v


def _ndim(n) -> int | None:
    v = _val(n)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _getitem_axis(index, ndim: int, axis: int) -> int | None:
    """Where axis ``axis`` of an ``ndim`` tensor goes under ``x[index]``; None if it is dropped."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
        return None
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    src, dst = 0, 0
    for i in index:
        if i is Ellipsis:
            skip = ndim - n_real
            if src <= axis < src + skip:
                return dst + axis - src
            src += skip
            dst += skip
        elif i is None:
            dst += 1
        elif isinstance(i, int):
            if src == axis:
                return None
            src += 1
        elif isinstance(i, slice):
            if src == axis:
                return dst
            src += 1
            dst += 1
        else:
            return None
    return dst + axis - src if axis >= src else None


def _next_positions(node: fx.Node, user: fx.Node, axis: int, mods, merges: bool = True) -> tuple[list, bool]:
    """(node, axis) pairs ``axis`` of ``node`` reaches in ``user``, and whether it hit a batch axis."""
    form = form_of(user, mods)
    rule = form.rule if form is not None else None
    nd = _ndim(node)
    if rule == "einsum":
        eq, ops = user.args[0], list(user.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
            ops = list(ops[0])
        try:
            ins, rhs = _einsum_parse(eq, len(ops))
        except RuleDeclined:
            return [], False
        letters = [spec[axis] for spec, o in zip(ins, ops) if o is node and axis < len(spec)]
        # a letter every operand and the output carry is a batch axis (heads)
        return [], any(all(c in spec for spec in ins) and c in rhs for c in letters)
    if rule == "select":
        kw = bind(form, user, user.args, user.kwargs)
        d = kw["dim"] + nd if kw["dim"] < 0 else kw["dim"]
        return ([(user, axis - (axis > d))] if axis != d else []), False
    if rule in ("attention", "matmul"):
        kw = bind(form, user, user.args, user.kwargs)
        operands = [kw.get(k) for k in ("query", "key", "value", "input", "other")]
        if nd is not None and any(o is node for o in operands) and axis < nd - 2:
            return [], True
        return [], False
    out = _val(user)
    if rule == "getitem":
        index = user.args[1]
        if isinstance(_val(node), torch.Tensor):
            a = _getitem_axis(index, nd, axis)
            return ([(user, a)] if a is not None else []), False
        return ([(user, axis)] if isinstance(index, int) else []), False  # a piece of a split
    if rule == "split":
        return [(user, axis)], False
    if rule == "unbind":
        kw = bind(form, user, user.args, user.kwargs)
        d = kw.get("dim", 0)
        d = d + nd if d < 0 else d
        return ([(user, axis - (axis > d))] if axis != d else []), False
    if rule == "permute":
        kw = bind(form, user, user.args, user.kwargs)
        perm = _permute_dims(kw.get("kind", "permute"), nd, tuple(kw.get("dims", ())))
        return [(user, perm.index(axis))], False
    if not isinstance(out, torch.Tensor) or nd is None:
        return [], False
    if rule in ("reshape", "shape_merge"):
        ins, outs = tuple(_val(node).shape), tuple(out.shape)
        try:
            groups = _groups_of(ins, outs)
        except (RuleDeclined, IndexError):
            return [], False
        for gi, gj in groups:
            if axis in gi and len(gj) == 1 and (merges or len(gi) == 1):  # kept or merged: follow it
                return [(user, gj[0])], False
        return [], False
    if rule == "complex_view":  # view_as_complex / view_as_real: every axis but the (real, imaginary) pair stays
        return ([(user, axis)] if axis < min(nd, out.dim()) - (1 if out.dim() < nd else 0) else []), False
    if rule == "repeat":  # tiles an axis in place (leading axes may be added): heads repeated over the batch
        return [(user, axis + out.dim() - nd)], False
    if rule is not None and RULES[rule].keeps_axes:
        if out.dim() >= nd:
            return [(user, axis + out.dim() - nd)], False
    return [], False


def _walk(node: fx.Node, axis: int, mods, stop=frozenset(), merges: bool = True) -> tuple[set, bool]:
    """Positions ``(node, axis)`` reaches (bounded), and whether it hit a batch axis or a position in ``stop``."""
    todo, seen = [(node, axis)], set()
    while todo and len(seen) < _MAX_STEPS:
        n, a = todo.pop()
        if (n, a) in seen:
            continue
        seen.add((n, a))
        if (n, a) in stop:
            return seen, True
        for u in n.users:
            nxt, hit = _next_positions(n, u, a, mods, merges)
            if hit:
                return seen, True
            todo.extend(nxt)
    return seen, False


def _reaches_batch(node: fx.Node, axis: int, mods, heads_at=frozenset()) -> bool:
    return _walk(node, axis, mods, heads_at)[1]


def _head_positions(gm: fx.GraphModule, mods) -> frozenset:
    """Positions the batch (head) axes of every attention output reach: a split factor that meets one
    there (a per-head output gate multiplied into the attention output) indexes heads too."""
    out = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        form = form_of(node, mods)
        nd = _ndim(node)
        if form is None or form.rule not in ("attention", "matmul") or nd is None or nd < 4:
            continue
        for a in range(1, nd - 2):  # NB: axis 0 is the batch of samples, not heads
            seen, _ = _walk(node, a, mods, merges=False)  # NB: a merged axis holds head_dim too
            out |= seen
    return frozenset(out)


def find_head_splits(gm: fx.GraphModule, mods: dict | None = None) -> dict:
    """Reshape nodes that split an axis into heads: {node name: frozenset(output axes to keep as rows)}."""
    mods = mods if mods is not None else dict(gm.named_modules())
    hints: dict = {}
    heads_at = None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        form = form_of(node, mods)
        if form is None or form.rule not in ("reshape", "shape_merge"):
            continue
        src = node.args[0] if node.args else None
        iv, ov = _val(src), _val(node)
        if not isinstance(iv, torch.Tensor) or not isinstance(ov, torch.Tensor):
            continue
        try:
            groups = _groups_of(tuple(iv.shape), tuple(ov.shape))
        except (RuleDeclined, IndexError):
            continue
        keep = set()
        for k, (gi, gj) in enumerate(groups):
            if len(gi) != 1 or len(gj) < 1:
                continue
            # size-1 axes split off just before this run (one head left) are candidates too
            lead = []
            for gi2, gj2 in reversed(groups[:k]):
                if gi2 or len(gj2) != 1 or ov.shape[gj2[0]] != 1:
                    break
                lead.insert(0, gj2[0])
            factors = lead + list(gj)
            if len(factors) < 2 or iv.shape[gi[0]] == 1 and not lead:
                continue
            keep.update(j for j in factors if _reaches_batch(node, j, mods))
            if not keep:  # computed once, for the first split that no contraction explains
                heads_at = _head_positions(gm, mods) if heads_at is None else heads_at
                keep.update(j for j in factors if _reaches_batch(node, j, mods, heads_at))
        if keep:
            hints[node.name] = frozenset(keep)
    return hints
