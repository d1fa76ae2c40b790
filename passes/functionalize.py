"""Writes into a fresh buffer, read back as one value: the buffer becomes a ``cat`` of what was written.

``kv.new_empty(*shape[:-1], a + b)`` followed by ``buf[..., :a].copy_(x)`` and ``buf[..., a:].copy_(y)``
(DeepSeek V2/V3's multi-head latent attention builds its keys so) computes ``cat([x, y], -1)``.
The analysis reads values along the graph's edges, and the readers of ``buf`` have no edge from
``x`` or ``y``: the writes are invisible to it, and every channel they carry would be pinned.
:func:`functionalize_slice_writes` rewrites the pattern into the ``cat`` it computes, which the
operator rules know, so the heads of ``x`` and ``y`` reach the attention that reads them.

The rewrite applies when all of this holds (otherwise the graph is left as it is):
    * the buffer is made by ``new_empty``/``empty``/``new_zeros``/``zeros`` (nothing is read from it
      before the writes);
    * every write is ``copy_(slice(buf, d, start, end), src)`` with step 1 on one axis ``d`` of
      static size, the copy's result unused, ``src`` of the slice's exact shape and dtype;
    * the slices tile the axis (each index written once), and every write comes before the first
      other use of the buffer in graph order.

Internals:
    * Shapes and dtypes are read from the export's ``meta["val"]`` (fake tensors); a node without
      one is not rewritten. Symbolic sizes compare as expressions (``s0 == s0``).
    * The ``cat`` is inserted after the last write, so every ``src`` is defined before it, and the
      buffer's other readers (all after the writes) read the ``cat`` instead.
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.fx as fx

log = logging.getLogger(__name__)
aten = torch.ops.aten

_FRESH = {aten.new_empty.default, aten.new_zeros.default, aten.empty.memory_format, aten.zeros.default}
_SLICE = aten.slice.Tensor
_COPY = aten.copy_.default


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _same_shape(a, b) -> bool:
    if len(a) != len(b):
        return False
    try:
        return all(bool(x == y) for x, y in zip(a, b))
    except Exception:  # noqa: BLE001 - a symbolic comparison that cannot be decided: not the same
        return False


def _writes(buf: fx.Node, order: dict):
    """``(d, [(start, end, src, slice node, copy node)])`` for ``buf``, writes in axis order, or None."""
    val = _val(buf)
    if not isinstance(val, torch.Tensor):
        return None
    writes, others, axis = [], [], None
    for user in buf.users:
        if user.op == "call_function" and user.target is _SLICE and user.args[0] is buf:
            args = list(user.args) + [None] * (5 - len(user.args))
            d, start, end, step = (args[1] if len(user.args) > 1 else 0), args[2], args[3], args[4] or 1
            d = user.kwargs.get("dim", d)
            copies = list(user.users)
            if (len(copies) != 1 or copies[0].target is not _COPY or copies[0].args[0] is not user
                    or copies[0].users or step != 1):
                others.append(user)
                continue
            if not isinstance(d, int) or not all(isinstance(v, (int, type(None))) for v in (start, end)):
                return None
            d = d % val.dim()
            if axis is None:
                axis = d
            if d != axis:
                return None
            n = val.shape[d]
            if not isinstance(n, int):
                try:
                    n = int(n)
                except Exception:  # noqa: BLE001 - a dynamic axis: its tiling cannot be checked
                    return None
            s, e, _ = slice(start, min(end, sys.maxsize) if end is not None else None).indices(n)
            src = copies[0].args[1]
            sv, cv = _val(src), _val(user)
            if not (isinstance(sv, torch.Tensor) and isinstance(cv, torch.Tensor)
                    and sv.dtype == cv.dtype and _same_shape(sv.shape, cv.shape)):
                return None
            writes.append((s, e, src, user, copies[0]))
        else:
            others.append(user)
    if not writes:
        return None
    writes.sort(key=lambda w: w[0])
    pos = 0
    for s, e, *_ in writes:
        if s != pos or e <= s:
            return None
        pos = e
    if pos != val.shape[axis]:
        return None
    last = max(order[w[4]] for w in writes)
    if any(order[u] < last for u in others):
        return None
    return axis, writes


def functionalize_slice_writes(gm: fx.GraphModule) -> int:
    """Rewrite every fresh buffer filled by slice writes into the ``cat`` it computes (module
    docstring); returns how many were rewritten. ``gm`` is changed in place and recompiled."""
    graph = gm.graph
    bufs = [n for n in graph.nodes if n.op == "call_function" and n.target in _FRESH]
    if not bufs:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    done = 0
    for buf in bufs:
        found = _writes(buf, order)
        if found is None:
            continue
        axis, writes = found
        last_copy = max((w[4] for w in writes), key=order.__getitem__)
        with graph.inserting_after(last_copy):
            cat = graph.call_function(aten.cat.default, ([w[2] for w in writes], axis))
        cat.meta = dict(buf.meta)
        written = {w[3] for w in writes}
        buf.replace_all_uses_with(cat, delete_user_cb=lambda u: u not in written)
        for _, _, _, sl, cp in writes:
            graph.erase_node(cp)
            graph.erase_node(sl)
        graph.erase_node(buf)
        done += 1
        log.debug("%s: %d slice writes along axis %d are now %s", buf.name, len(writes), axis, cat.name)
    if done:
        graph.lint()
        gm.recompile()
    return done
