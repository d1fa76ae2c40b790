"""SCOP's selection layer as a graph pass (installed as ``otofx.passes.scop``).

``insert_selection(gm, zigset) -> Selection`` returns a *new* GraphModule in which the output of
every producer of every group (the conv / linear call whose weight's dim 0 the group owns) goes
through a selection node before anything else reads it (so before the normalisation)::

    out[:B] = beta * out[:B] + (1 - beta) * out[B:]        # out[B:] (the knockoff half) unchanged

The network then runs on a doubled batch ``[x; x_knockoff]`` (batch axis 0). There is one scale
``beta`` per ZIG row, shared by every producer of that row: rows tied by a residual add get the same
scale at each conv that writes into them, so the rows stay consistent (stricter than the reference
code, which skips residual channels). All betas live in one parameter ``scop_beta`` of the new
module (group after group, rows in order; ``Selection.offsets`` slices it per group).

Internals:
    * The graph module is deep-copied first: the captured graph shares the user's submodules, and
      training the betas in train mode moves BatchNorm statistics, which must not reach the user.
    * A producer's channel axis is read off the group labels: the output axis (not the batch axis)
      whose channel ids are rows of groups. Positions of that axis that are no row (pinned or
      unowned channels) get a constant scale 1, so they pass unmixed.
    * Each selection node is a ``call_module`` of :class:`SelectionLayer` with two inputs: the
      producer's output and a ``get_attr`` of ``scop_beta``; the layer gathers the per-position
      scale with a precomputed index (``gather``, a buffer) from ``cat([scop_beta, 1])``.
    * # NB: the batch is split in halves along axis 0; a graph captured with ``torch.export`` may have
      the example's batch size baked into reshapes, and then the doubled batch does not run.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ..channels import AxisLabels
from ..zigs import ZigSet

log = logging.getLogger("otofx")

BETA_NAME = "scop_beta"


class SelectionLayer(torch.nn.Module):
    """Mixes the real half of a doubled batch with the knockoff half, one scale per channel."""

    def __init__(self, gather: torch.Tensor, axis: int):
        super().__init__()
        self.register_buffer("gather", gather, persistent=False)
        self.axis = int(axis)

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        full = torch.cat([beta, beta.new_ones(1)])[self.gather].to(x.dtype)
        shape = [1] * x.dim()
        shape[self.axis] = full.numel()
        b = full.reshape(shape)
        half = x.shape[0] // 2
        real, knock = x[:half], x[half:]
        return torch.cat([b * real + (1 - b) * knock, knock], 0)

    def extra_repr(self) -> str:
        return f"channels={self.gather.numel()}, axis={self.axis}"


@dataclass(frozen=True)
class Selection:
    """The graph with selection layers: ``gm.scop_beta`` holds every row's beta, group after group."""

    gm: fx.GraphModule
    offsets: tuple  # group z owns scop_beta[offsets[z]:offsets[z + 1]]
    producers: tuple  # (node name, group indices) per selection layer inserted

    def betas(self) -> tuple:
        """The current betas, one detached tensor per group."""
        beta = getattr(self.gm, BETA_NAME).detach()
        return tuple(beta[a:b].clone() for a, b in zip(self.offsets[:-1], self.offsets[1:]))


def producer_params(zigset: ZigSet, params: dict) -> dict:
    """Parameter name -> groups whose rows own that weight's dim 0 (conv / linear weights, ndim >= 2)."""
    out: dict = {}
    for zi, z in enumerate(zigset.zigs):
        for name, dim, _ in z.params:
            p = params.get(name)
            if dim == 0 and p is not None and p.dim() >= 2:
                out.setdefault(name, [])
                if zi not in out[name]:
                    out[name].append(zi)
    return out


def _param_source(node: fx.Node, depth: int = 4):
    """The parameter a value is computed from alone (``w``, ``w.t()``, ``w.to(...)``), else None."""
    if node.op == "get_attr":
        return node.target
    if depth and node.op in ("call_function", "call_method"):
        ins = node.all_input_nodes
        if len(ins) == 1:
            return _param_source(ins[0], depth - 1)
    return None


def _producer_nodes(gm: fx.GraphModule, weights: dict) -> list:
    """(node, weight name) for every node that computes on an activation with a producer weight."""
    mods = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = mods.get(node.target)
            name = f"{node.target}.weight"
            if mod is not None and name in weights and getattr(mod, "weight", None) is not None:
                found.append((node, name))
        elif node.op in ("call_function", "call_method"):
            sources = [_param_source(a) for a in node.all_input_nodes]
            # NB: a node computed from parameters alone (``w.t()``) is no producer: its axis 0 is no batch
            if all(s is not None for s in sources):
                continue
            hit = [s for s in sources if s in weights]
            if hit:
                found.append((node, hit[0]))
    return found


def _channel_axis(lab: AxisLabels, zigset: ZigSet, groups) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The output axis holding the rows of ``groups``, with each position's (group, row)."""
    best = None
    for axis in range(1, len(lab.ids)):
        roots = zigset.uf.find(lab.ids[axis])
        z = zigset.zig_of_root[roots]
        hit = int(np.isin(z, groups).sum())
        if hit and (best is None or hit > best[0]):
            best = (hit, axis, z, zigset.row_of_root[roots])
    return None if best is None else best[1:]


def insert_selection(gm: fx.GraphModule, zigset: ZigSet, init: float = 0.5) -> Selection:
    """A deep copy of ``gm`` with a selection layer after every producer of every group of ``zigset``.

    ``gm`` must be the graph ``zigset`` was computed on (``oto.graph_module``); it is not modified.
    The betas start at ``init``.
    """
    new = copy.deepcopy(gm)
    params = dict(new.named_parameters(remove_duplicate=False))
    weights = producer_params(zigset, params)
    offsets = np.concatenate([[0], np.cumsum([z.rows for z in zigset.zigs])]).astype(np.int64)
    total = int(offsets[-1])
    dtype = next(iter(params.values())).dtype if params else torch.float32
    device = next(iter(params.values())).device if params else torch.device("cpu")
    new.register_parameter(BETA_NAME, torch.nn.Parameter(torch.full((total,), float(init), dtype=dtype, device=device)))
    beta_node = None
    producers = []
    for k, (node, wname) in enumerate(_producer_nodes(new, weights)):
        lab = zigset.labels.get(node.name)
        if not isinstance(lab, AxisLabels) or len(lab.ids) < 2:
            log.debug("scop: producer %s has no channel label; left unscaled", node.name)
            continue
        found = _channel_axis(lab, zigset, weights[wname])
        if found is None:
            continue
        axis, z, r = found
        gather = np.full(len(z), total, dtype=np.int64)  # index `total` is the constant 1
        ok = z >= 0
        gather[ok] = offsets[z[ok]] + r[ok]
        layer_name = f"scop_select_{k}"
        new.add_submodule(layer_name, SelectionLayer(torch.from_numpy(gather).to(device), axis))
        if beta_node is None:
            first = next(n for n in new.graph.nodes if n.op != "placeholder")
            with new.graph.inserting_before(first):
                beta_node = new.graph.get_attr(BETA_NAME)
        users = list(node.users)
        with new.graph.inserting_after(node):
            sel = new.graph.call_module(layer_name, (node, beta_node))
        for u in users:
            u.replace_input_with(node, sel)
        producers.append((node.name, tuple(sorted(set(int(v) for v in z[ok])))))
    new.graph.lint()
    new.recompile()
    log.info("scop: %d selection layers over %d groups (%d betas)", len(producers), len(zigset.zigs), total)
    return Selection(new, tuple(int(o) for o in offsets), tuple(producers))


__all__ = ["insert_selection", "Selection", "SelectionLayer", "producer_params", "BETA_NAME"]
