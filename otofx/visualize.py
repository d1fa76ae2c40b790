"""A picture of the groups: ``oto.visualize(path)`` and ``otofx analyze ... --svg FILE``.

Draws the captured graph with every zero-invariant group in its own colour, pinned nodes outlined
in red with the reason, and (when the model has weights) each group's zero and kept rows, as only-
train-once's ``visualize()`` does. Graphviz's ``dot`` does the layout, through the ``graphviz``
package (``pip install 'otofx[viz]'`` and the Graphviz programs, e.g. ``apt-get install graphviz``);
without them :func:`visualize` raises :class:`VisualizeError` saying so. ``path`` ending in
``.svg`` writes the SVG, ``.html`` a page holding it, ``.dot`` the DOT source (no Graphviz needed).

Readability on large models (resnet50, a 12-layer BERT): nodes are laid out in nested boxes by
module (``layer1`` > ``layer1.0``, ``encoder.layer.3`` > ``...attention``; ``depth`` levels), and
``compact=True`` (the default) draws only the nodes that matter to the groups: inputs and outputs,
nodes that own parameters, nodes that merge several values (add, cat, matmul), and pinned nodes; a
chain of other ops (relu, dropout, view...) becomes an edge.

Internals:
    * A node's groups are those of the channel classes on any axis of its output (its analysis
      label; union-find roots mapped to groups). A node in two groups is striped in both colours.
    * Module paths: ``call_module`` targets; export graphs' ``nn_module_stack``; a function node
      takes its first input's module path (its parent module when that input is a module call).
    * Colours are spread over the hue circle by the golden ratio, so neighbouring group numbers
      differ clearly; the legend lists every group (index, producers, rows, zero rows).
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from otofx.errors import OTOError
from otofx.passes.zigs import layer_of

log = logging.getLogger("otofx")

_PINNED_COLOR = "#d62728"


class VisualizeError(OTOError):
    """The picture of the groups cannot be drawn (no Graphviz, or an unknown file type)."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str
    module: str  # dotted module path ("" at the top)
    groups: tuple  # group indices
    pin: str | None  # the pin reason, or None
    shape: tuple | None


def _color(g: int) -> str:
    h = (g * 0.6180339887) % 1.0
    return f"{h:.3f} 0.45 0.97"


def _groups_of(zigset, label) -> tuple:
    axes = getattr(label, "ids", None)
    if axes is None:
        return ()
    found = set()
    for ids in axes:
        if len(ids) == 0:
            continue
        z = zigset.zig_of_root[zigset.uf.find(np.unique(ids))]
        found.update(int(v) for v in np.unique(z) if v >= 0)
    return tuple(sorted(found))


def _module_paths(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        path = None
        if n.op == "call_module":
            path = str(n.target)
        else:
            stack = n.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                path = path if isinstance(path, str) else ""
                path = path.removeprefix("L['self'].").removeprefix("L__self__.")
            else:
                for a in n.all_input_nodes:
                    if a.name in out and a.op != "placeholder":
                        p = out[a.name]
                        path = p.rpartition(".")[0] if a.op == "call_module" else p
                        break
        out[n.name] = path or ""
    return out


def node_infos(oto) -> list[NodeInfo]:
    """Every node of the captured graph with its groups, module and pin reason."""
    gm, zs = oto.graph_module, oto.zigset
    pins = {}
    for p in oto.pinned:
        pins.setdefault(p.node, []).append(p.reason)
    paths = _module_paths(gm)
    out = []
    for n in gm.graph.nodes:
        label = zs.labels.get(n.name)
        shape = getattr(label, "shape", None)
        out.append(NodeInfo(n.name, n.op, paths[n.name], _groups_of(zs, label),
                            "; ".join(dict.fromkeys(pins[n.name])) if n.name in pins else None, shape))
    return out


def _param_nodes(gm: fx.GraphModule, oto) -> set:
    """Names of nodes that own parameters (module calls with parameters, or ops reading a parameter)."""
    names = {n for n, _ in oto.model.named_parameters()}
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            try:
                if any(True for _ in gm.get_submodule(n.target).parameters(recurse=False)):
                    out.add(n.name)
            except AttributeError:
                pass
        elif n.op == "call_function" and any(_is_weight(gm, a) or (a.op == "placeholder" and a.name in names)
                                             for a in n.all_input_nodes):
            out.add(n.name)
    return out


def _is_weight(gm: fx.GraphModule, a: fx.Node) -> bool:
    if a.op != "get_attr":
        return False
    obj = gm
    for part in str(a.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.Tensor) and obj.ndim >= 1


def _kept(oto) -> list | None:
    """Zero rows per group from the model's current weights (None on the meta device)."""
    try:
        return [int((r == 0).sum()) for r in oto.row_norms()]
    except OTOError:
        return None


def _collapse(nodes, drawn, infos) -> dict:
    """node name -> block node name, for the drawn nodes of every block that repeats an earlier sibling
    (and block node name -> the sibling it repeats).

    A block is a module whose last path component is a number (``layer1.2``, ``encoder.layer.7``); it
    repeats its sibling when the ops of its drawn nodes, in order, are the same.
    """
    blocks: dict = {}
    for n in nodes:
        if n.name not in drawn:
            continue
        parts = infos[n.name].module.split(".")
        for k in range(len(parts), 0, -1):
            if parts[k - 1].isdigit():
                blocks.setdefault(".".join(parts[:k]), []).append(n)
                break
    first: dict = {}
    out, twins = {}, {}
    for path, members in blocks.items():
        parent = path.rpartition(".")[0]
        sig = tuple((n.op, str(n.target).removeprefix(path + ".") if n.op == "call_module" else str(n.target))
                    for n in members)
        key = (parent, sig)
        if key not in first:
            first[key] = path
            continue
        twins[f"block:{path}"] = first[key]
        for n in members:
            out[n.name] = f"block:{path}"
    return out, twins


def to_dot(oto, *, compact: bool = True, depth: int = 3, rows: bool = True, collapse: bool = True,
           title: str | None = None) -> str:
    """The DOT source of the picture (see the module docstring)."""
    gm = oto.graph_module
    infos = {i.name: i for i in node_infos(oto)}
    nodes = list(gm.graph.nodes)
    zero = _kept(oto) if rows else None
    params = _param_nodes(gm, oto)
    # the nodes to draw
    def keep(n: fx.Node) -> bool:
        if n.op in ("get_attr",):
            return False
        if n.op == "placeholder":
            return bool(n.users) and infos[n.name].shape is not None and n.name not in params and \
                not n.name.startswith(("p_", "b_", "c_"))
        if n.op == "output" or not compact:
            return True
        tensor_inputs = [a for a in n.all_input_nodes if a.op != "get_attr" and infos[a.name].shape is not None]
        return n.name in params or infos[n.name].pin is not None or len(tensor_inputs) >= 2
    drawn = {n.name for n in nodes if keep(n) and (n.op != "call_function" or infos[n.name].shape is not None
                                                  or infos[n.name].pin is not None)}
    # repeated blocks (encoder.layer.3 like encoder.layer.0, layer1.2 like layer1.1): one node each
    merged, twins = _collapse(nodes, drawn, infos) if collapse else ({}, {})
    # edges, contracting the nodes not drawn
    src_of = {}
    edges = set()
    for n in nodes:
        srcs = set()
        for a in n.all_input_nodes:
            srcs |= {merged.get(a.name, a.name)} if a.name in drawn else src_of.get(a.name, set())
        if n.name in drawn:
            me = merged.get(n.name, n.name)
            edges |= {(s, me) for s in srcs if s != me}
        else:
            src_of[n.name] = srcs
    groups = oto.groups
    lines = ["digraph otofx {", '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.15, ranksep=0.25];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, fillcolor="#eeeeee", '
             'height=0.25];', '  edge [arrowsize=0.5, color="#777777"];']
    if title:
        lines.append(f'  label="{_esc(title)}"; labelloc=t;')

    def block_line(name: str) -> str:
        members = [infos[m] for m in blocks[name]]
        path = name.removeprefix("block:")
        gs = sorted({g for i in members for g in i.groups})
        pins = sorted({i.pin for i in members if i.pin})
        twin = twins[name]
        text = [f"{path}", f"(as {twin}: {len(members)} nodes)"]
        if gs:
            text.append(", ".join(f"g{k}" + (f" {groups[k].rows - zero[k]}/{groups[k].rows}" if zero else "")
                                  for k in gs[:4]) + (f" +{len(gs) - 4}" if len(gs) > 4 else ""))
        attrs = ['color="#333333"', 'penwidth=2']
        if gs:
            cols = [_hex(k) for k in gs[:4]]
            attrs.append('style="striped"' if len(cols) > 1 else 'style="filled"')
            attrs.append('fillcolor="' + ":".join(cols) + '"')
        if pins:
            text.append("pinned: " + "; ".join(pins))
            attrs += [f'color="{_PINNED_COLOR}"', "penwidth=2"]
        attrs.append(f'tooltip="{_esc(path + " groups=" + str(gs))}"')
        label = "\\n".join(_esc(t) for t in text)
        return f'"{_esc(name)}" [label="{label}", {", ".join(attrs)}];'

    def node_line(name: str) -> str:
        if name.startswith("block:"):
            return block_line(name)
        i = infos[name]
        text = [name]
        if i.groups:
            g = i.groups
            desc = ", ".join(f"g{k}" + (f" {groups[k].rows - zero[k]}/{groups[k].rows} kept" if zero else "")
                             for k in g[:3])
            text.append(desc + (f" +{len(g) - 3}" if len(g) > 3 else ""))
        attrs = []
        if i.groups:
            cols = [_hex(k) for k in i.groups[:4]]
            if len(cols) == 1:
                attrs.append(f'fillcolor="{cols[0]}"')
            else:
                attrs.append('style="striped"')
                attrs.append('fillcolor="' + ":".join(cols) + '"')
        if i.pin:
            text.append(f"pinned: {i.pin}")
            attrs += [f'color="{_PINNED_COLOR}"', "penwidth=2"]
        tip = f"{name} ({i.op}) module={i.module or '-'} shape={i.shape} groups={list(i.groups)}"
        if i.pin:
            tip += f" pinned: {i.pin}"
        attrs.append(f'tooltip="{_esc(tip)}"')
        label = "\\n".join(_esc(t) for t in text)
        return f'"{_esc(name)}" [label="{label}", {", ".join(attrs)}];'

    # nested clusters by module path
    tree: dict = {}
    blocks: dict = {}
    for n in nodes:
        if n.name in merged:
            blocks.setdefault(merged[n.name], []).append(n.name)
    for n in nodes:
        if n.name not in drawn or (n.name in merged and blocks[merged[n.name]][0] != n.name):
            continue
        parts = infos[n.name].module.split(".") if infos[n.name].module else []
        if n.name in merged:
            parts = merged[n.name].removeprefix("block:").split(".")[:-1]
            node = tree
            for p in parts[:depth]:
                node = node.setdefault(p, {})
            node.setdefault("", []).append(merged[n.name])
            continue
        if n.op == "call_module":
            parts = parts[:-1]  # the module itself is the node
        node = tree
        for p in parts[:depth]:
            node = node.setdefault(p, {})
        node.setdefault("", []).append(n.name)

    counter = [0]

    def emit(sub: dict, prefix: str, indent: str) -> None:
        for name in sub.get("", []):
            lines.append(indent + node_line(name))
        for key, child in sub.items():
            if key == "":
                continue
            counter[0] += 1
            path = f"{prefix}.{key}" if prefix else key
            lines.append(f'{indent}subgraph "cluster_{counter[0]}" {{ label="{_esc(path)}"; style="rounded"; '
                         'color="#bbbbbb"; fontsize=10;')
            emit(child, path, indent + "  ")
            lines.append(indent + "}")

    emit(tree, "", "  ")
    for s, d in sorted(edges):
        lines.append(f'  "{_esc(s)}" -> "{_esc(d)}";')
    # the legend: every group
    params_of = dict(oto.model.named_parameters()) if not _on_meta(oto) else {}
    rows_html = ['<TR><TD><B>group</B></TD><TD><B>producers</B></TD><TD><B>rows</B></TD>'
                 + ('<TD><B>zero</B></TD>' if zero else '') + '</TR>']
    for k, z in enumerate(groups):
        prods = [layer_of(n) for n, d, _ in z.params if d == 0 and n in params_of and params_of[n].ndim >= 2]
        prods = prods or list(z.layers)
        prod = ", ".join(prods[:2]) + (f" (+{len(prods) - 2})" if len(prods) > 2 else "")
        rows_html.append(f'<TR><TD BGCOLOR="{_hex(k)}">g{k}</TD><TD ALIGN="LEFT">{html.escape(prod)}</TD>'
                         f'<TD>{z.rows}</TD>' + (f'<TD>{zero[k]}</TD>' if zero else '') + '</TR>')
    total = sum(z.rows for z in groups)
    head = f"{len(groups)} groups, {total} rows" + (f", {sum(zero)} zero" if zero else "")
    lines.append('  subgraph "cluster_legend" { label="' + _esc(head) + '"; style="rounded"; color="#999999";')
    lines.append('    legend [shape=plaintext, style="", label=<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" '
                 'CELLPADDING="3">' + "".join(rows_html) + "</TABLE>>];")
    if oto.pinned:
        pins = "".join(f'<TR><TD ALIGN="LEFT">{html.escape(p.node)}</TD><TD ALIGN="LEFT">{html.escape(p.reason)}</TD></TR>'
                       for p in oto.pinned)
        lines.append('    legend_pins [shape=plaintext, style="", label=<<TABLE BORDER="0" CELLBORDER="1" '
                     f'CELLSPACING="0" CELLPADDING="3" COLOR="{_PINNED_COLOR}"><TR><TD><B>pinned</B></TD>'
                     f'<TD><B>reason</B></TD></TR>{pins}</TABLE>>];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def _on_meta(oto) -> bool:
    return any(p.device.type == "meta" for p in oto.model.parameters())


def _hex(g: int) -> str:
    import colorsys

    h, s, v = (float(x) for x in _color(g).split())
    r, gg, b = colorsys.hsv_to_rgb(h, s, v)
    return "#%02x%02x%02x" % (round(r * 255), round(gg * 255), round(b * 255))


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_svg(dot: str) -> str:
    """SVG text of a DOT source, laid out by Graphviz's dot (via the ``graphviz`` package)."""
    try:
        import graphviz
    except ImportError:
        raise VisualizeError("drawing the groups needs the graphviz package and the Graphviz programs: "
                             "pip install 'otofx[viz]' and install Graphviz (apt-get install graphviz, brew install "
                             "graphviz); or write a .dot file, which needs neither") from None
    try:
        return graphviz.Source(dot).pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise VisualizeError("the Graphviz program 'dot' is not on PATH: install Graphviz (apt-get install "
                             "graphviz, brew install graphviz), or write a .dot file instead") from None


def visualize(oto, path, *, compact: bool = True, depth: int = 3, rows: bool = True, collapse: bool = True,
              title: str | None = None) -> Path:
    """Write the picture of ``oto``'s groups to ``path`` (.svg, .html or .dot); returns the path."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".svg", ".html", ".htm", ".dot", ".gv"):
        raise VisualizeError(f"visualize({str(path)!r}): the file must end in .svg, .html or .dot")
    title = title if title is not None else f"{type(oto.model).__name__}: zero-invariant groups"
    dot = to_dot(oto, compact=compact, depth=depth, rows=rows, collapse=collapse, title=title)
    if kind in (".dot", ".gv"):
        text = dot
    else:
        svg = render_svg(dot)
        text = svg if kind == ".svg" else (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body>\n{svg[svg.find('<svg'):]}\n</body></html>\n")
    path.write_text(text, encoding="utf-8")
    log.info("otofx: wrote the picture of %d groups to %s", len(oto.groups), path)
    return path


__all__ = ["visualize", "to_dot", "render_svg", "node_infos", "NodeInfo", "VisualizeError"]
