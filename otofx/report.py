"""Human-readable tables for ``OTO.report()`` and the command line (tabulate lives only here)."""
from __future__ import annotations

import math

from tabulate import tabulate

from otofx.capture_parts import PARTS
from otofx.passes.zigs import layer_of


def _params_per_row(oto, zig) -> int:
    total = 0
    params = dict(oto.model.named_parameters())
    for name, dim, index in zig.params:
        shape = params[name].shape
        other = math.prod(s for d, s in enumerate(shape) if d != dim)
        total += index.shape[1] * other
    return total


def _short(names, limit: int = 3) -> str:
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" (+{len(names) - limit})"


def report(oto, max_groups: int | None = None, blocks=None) -> str:
    """The group table, what was pinned and why, and (given a ``BlockSet``) the block groups."""
    rows = []
    params = dict(oto.model.named_parameters())
    for i, z in enumerate(oto.groups):
        if max_groups is not None and i >= max_groups:
            break
        # NB: once per layer (a recurrent layer's weight_ih and weight_hh both own the unit's rows)
        producers = list(dict.fromkeys(layer_of(n) for n, d, _ in z.params if d == 0 and params[n].ndim >= 2))
        rows.append([i, _short(producers or z.layers), z.rows, _params_per_row(oto, z), len(z.params)])
    total_rows = sum(z.rows for z in oto.groups)
    out = [f"{type(oto.model).__name__}: {len(oto.groups)} groups, {total_rows} prunable rows "
           f"(front-end: {oto.frontend})"]
    parts = oto.graph_module.meta.get(PARTS)
    if parts is not None:
        out.append(f"captured in parts: {', '.join(parts.paths)}; each part's outputs (its 'model output' pins) "
                   "keep their widths: Python code the analysis cannot see reads them")
    out.append(tabulate(rows, headers=["group", "producers", "rows", "params/row", "slices"], tablefmt="github"))
    if oto.pinned:
        prow = [[p.node, p.op, p.reason, p.channels] for p in oto.pinned]
        out.append("")
        out.append("pinned (channels that cannot be removed, and why):")
        out.append(tabulate(prow, headers=["node", "op", "reason", "channels"], tablefmt="github"))
    free = getattr(oto, "free_outputs", ())
    if free:
        out.append("")
        out.append("free outputs (returned without their removed channels, which are zero in the model; "
                   "free_outputs=() keeps their widths): " + ", ".join(str(f.key) for f in free))
    if getattr(oto, "unread", ()):
        out.append("")
        out.append("not reached by the example input (no group includes them; they keep their shapes):")
        out.append(tabulate([[u.module or "(root)", u.count, u.numel] for u in oto.unread],
                            headers=["module", "parameters", "numel"], tablefmt="github"))
    if blocks is not None:
        from otofx.admm import report as block_report

        out.append("")
        out.append("block groups (micro-structured: blocks inside weights, see otofx.admm):")
        out.append(block_report(blocks))
    return "\n".join(out)
