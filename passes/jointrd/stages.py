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
      needs reads the inputs only through ``name``) and raises :class:`StageError` naming the
      node that does not.
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


def tail(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A GraphModule (sharing ``gm``'s modules) computing ``gm``'s output from node ``name``'s value."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if name not in nodes:
        raise StageError(f"stage boundary '{name}' is not a node of {type(gm).__name__}'s graph")
    cut = nodes[name]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    need, stack = set(), [out_node]
    while stack:  # everything the output needs, stopping at the cut
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        if n is cut:
            continue
        if n.op == "placeholder":
            raise StageError(
                f"stage boundary '{name}' does not cut {type(gm).__name__}'s graph: its output reads the "
                f"input '{n.name}' by a path that avoids it; choose a node every path passes through "
                "(a block output)")
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env = {cut: graph.placeholder("feature")}
    for n in gm.graph.nodes:
        if n not in need or n is cut:
            continue
        if n.op == "output":
            graph.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
    return graph_module(gm, graph, type(gm).__name__ + "Tail")


__all__ = ["StageError", "stream_output", "find_boundaries", "equal_boundaries", "tap", "tail", "ResidualAdd"]
