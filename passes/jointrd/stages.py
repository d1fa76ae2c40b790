"""Stage boundaries of a residual network, and the graph cuts JointRD runs on.

* ``find_boundaries(gm, adds)``: the nodes after which the residual stream changes shape (a
  ResNet's stage ends: the input of each stage's first block, from the second stage on). A stream
  that never changes shape (a residual MLP) is cut into ``fallback`` equal runs of blocks.
* ``stream_output(gm, adds)``: the last block's output (the last residual add, followed through
  the single-input, same-shape ops after it: ``add -> relu``), the "final features" of the paper.
* ``tap(gm, names)``: a GraphModule sharing ``gm``'s modules that returns ``(output, *values)``.
* ``tail(gm, name)``: a GraphModule sharing ``gm``'s modules that computes ``gm``'s output from
  the value of node ``name`` (the teacher's remaining stages, fed a student's feature).

Internals:
    * Both builders copy nodes with ``Graph.node_copy`` and build the module with
      ``otofx.capture.graph_module``, so no weight is copied: training through a tap trains ``gm``.
    * ``tail`` checks that ``name`` separates the graph's inputs from its output (every node it
      needs reads the values of the inputs that feed ``name`` only through ``name``) and raises
      :class:`StageError` naming the node that does not. Other inputs (timm's ``attn_mask=None``,
      ``is_causal=False``) and size reads of the fed ones (torch.export's ``sym_size(x, 0)`` in a
      Swin) become the tail's keyword inputs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from otofx.capture import graph_module
from otofx.errors import InputError

from .residual import ResidualAdd


class StageError(InputError):
    """A stage boundary that does not exist in a graph, or does not cut it."""


def _shape(n: fx.Node):
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def stream_output(gm: fx.GraphModule, adds: tuple) -> str:
    """The last residual block's output node: its add, through the same-shape single-input ops after it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    n = nodes[adds[-1].add]
    shape = _shape(n)
    while len(n.users) == 1:
        u = next(iter(n.users))
        tensor_inputs = [a for a in u.all_input_nodes if a.op != "get_attr"]
        if u.op in ("output", "placeholder") or tensor_inputs != [n] or _shape(u) != shape:
            break
        n = u
    return n.name


def find_boundaries(gm: fx.GraphModule, adds: tuple, fallback: int = 4) -> tuple:
    """Node names after which the residual stream of ``gm`` changes shape (see the module doc)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for prev, cur in zip(adds, adds[1:]):
        if _shape(nodes[prev.add])[1:] != _shape(nodes[cur.add])[1:]:
            out.append(cur.source)
    if out or len(adds) < 2:
        return tuple(out)
    k = min(fallback, len(adds))
    # NB: equal runs of blocks; block i's input is block i-1's output
    return tuple(adds[(j * len(adds)) // k].source for j in range(1, k))


def equal_boundaries(adds: tuple, stages: int) -> tuple:
    """Cut the residual blocks into ``stages`` equal runs (block inputs of runs 2..stages)."""
    k = max(1, min(stages, len(adds)))
    return tuple(adds[(j * len(adds)) // k].source for j in range(1, k))


def tap(gm: fx.GraphModule, names) -> fx.GraphModule:
    """A GraphModule (sharing ``gm``'s modules) returning ``(gm's output, value of each name)``."""
    graph = fx.Graph()
    env: dict = {}
    missing = set(names) - {n.name for n in gm.graph.nodes}
    if missing:
        raise StageError(f"node(s) {sorted(missing)} are not in {type(gm).__name__}'s graph")
    out = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out = fx.node.map_arg(n.args[0], lambda a: env[a])
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    graph.output((out, tuple(by_name[k] for k in names)))
    return graph_module(gm, graph, type(gm).__name__ + "Tap")


# ops that read a tensor's sizes or properties, not its values
_META_FUNCTIONS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default,
                   torch.ops.aten.sym_stride.int, torch.ops.aten.dim.default}
_META_METHODS = ("size", "dim", "numel", "stride")
_META_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda")


def _reads_metadata(n: fx.Node) -> bool:
    """``n`` reads only the size or properties of its first argument (``x.shape``, ``sym_size(x, 0)``)."""
    if n.op == "call_function":
        if n.target in _META_FUNCTIONS:
            return True
        return n.target is getattr and len(n.args) == 2 and n.args[1] in _META_ATTRS
    return n.op == "call_method" and n.target in _META_METHODS


def _is_data(n: fx.Node) -> bool:
    """A placeholder that carries a tensor (by its recorded value; by having no default without one)."""
    if "val" in n.meta:
        return isinstance(n.meta["val"], torch.Tensor)
    return not n.args  # no default: assume a tensor


def _ancestors_of(node: fx.Node) -> set:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def tail(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A GraphModule (sharing ``gm``'s modules) computing ``gm``'s output from node ``name``'s value.

    Its first input is that value; the graph inputs the tail also reads follow as keyword inputs of
    the same names and defaults (``tail.meta["tail_inputs"]``): inputs that do not feed ``name``
    (masks, flags, ``None`` defaults), and the sizes of those that do (``x.shape``, ``sym_size``).
    Reading the *values* of an input that feeds ``name`` by a path avoiding it is a
    :class:`StageError`: the cut does not separate the stages.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    if name not in nodes:
        raise StageError(f"stage boundary '{name}' is not a node of {type(gm).__name__}'s graph")
    cut = nodes[name]
    before = _ancestors_of(cut)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    need, stack = set(), [(out_node, False)]
    while stack:  # everything the output needs, stopping at the cut
        n, sizes_only = stack.pop()
        if n.op == "placeholder" and n is not cut and not sizes_only and n in before and _is_data(n):
            raise StageError(
                f"stage boundary '{name}' does not cut {type(gm).__name__}'s graph: the stages after it read the "
                f"input '{n.name}' by a path that avoids it, so the teacher's tail cannot be fed the student's "
                "value there. Pass boundaries= node names every path passes through (block outputs), "
                "or hybrid=False (mode='released') to train without hybrid paths")
        if n in need:
            continue
        need.add(n)
        if n is cut or n.op == "placeholder":
            continue
        # NB: a size read of an input is carried whole: the tail is given that input, reads its sizes
        # only (the batch size of x in a Swin's later stages); anything else reached from it is a data read
        first = n.args[0] if _reads_metadata(n) and n.args else None
        stack.extend((a, a is first) for a in n.all_input_nodes)
    graph = fx.Graph()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in need and n is not cut]
    taken = {n.target for n in inputs}
    feature = "feature"
    while feature in taken:
        feature += "_"
    env = {cut: graph.placeholder(feature)}
    # NB: inputs without a default first (a Python signature needs them there); callers pass them by name
    for n in sorted(inputs, key=lambda n: bool(n.args)):
        env[n] = graph.node_copy(n, lambda a: env[a])
    for n in gm.graph.nodes:
        if n not in need or n is cut or n.op == "placeholder":
            continue
        if n.op == "output":
            graph.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
    out = graph_module(gm, graph, type(gm).__name__ + "Tail")
    out.meta["tail_inputs"] = tuple(n.target for n in inputs)
    return out


__all__ = ["StageError", "stream_output", "find_boundaries", "equal_boundaries", "tap", "tail", "ResidualAdd"]
