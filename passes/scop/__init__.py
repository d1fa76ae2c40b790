"""SCOP's selection layer as a graph pass (installed as ``otofx.passes.scop``).

``insert_selection(gm, zigset) -> Selection`` returns a *new* GraphModule in which the output of
every producer of every group (the conv / linear / matrix-product call whose weight's output dim the
group owns) goes through a selection node before anything else reads it (so before the
normalisation)::

    out[real] = beta * out[real] + (1 - beta) * out[knockoff]      # out[knockoff] unchanged

where ``real`` and ``knockoff`` are the two halves of the output's batch axis. The network runs on a
doubled batch ``[x; x_knockoff]`` (batch axis 0 at the input). There is one scale ``beta`` per ZIG
row, shared by every producer of that row: rows tied by a residual add get the same scale at each
conv that writes into them, so the rows stay consistent (stricter than the reference code, which
skips residual channels). All betas live in one parameter ``scop_beta`` of the new module (group
after group, rows in order; ``Selection.offsets`` slices it per group).

Internals:
    * The graph module is deep-copied first: the captured graph shares the user's submodules, and
      training the betas in train mode moves BatchNorm statistics, which must not reach the user.
    * A weight's output dim is read per use: 0 for conv / linear weights (and F.linear / F.conv),
      1 for transformers' ``Conv1D`` and transposed convs, and for a matrix product the dim the
      product writes (``x @ W`` on a stored ``[in, out]`` weight: 1; ``x @ W.t()``: 0; see
      :func:`otofx.passes.slb._product`). A group owning another dim of the weight (its input) is
      not scaled there.
    * Each producer output's batch axis is found by running the graph (eval mode, no grad) on two
      inputs ``xa``, ``xb`` and on ``[xa; xb]``: it is the one axis that doubles, and the output's
      halves along it must equal the runs on ``xa`` and ``xb``. # NB: it is not always axis 0: a
      model working sequence-first inside (``transpose(0, 1)``, torch's ``nn.Transformer*`` default)
      has ``[T, B, C]`` outputs, and splitting axis 0 would mix real and knockoff samples. An output
      with no such axis (a flattened ``[T * B, C]``, samples mixed by the op) gets no selection layer
      and a warning (``Selection.refused``); groups left without any layer are ``Selection.uncovered``.
      The outputs' batch axes are found the same way (``Selection.out_axes``).
    * A producer's channel axis is read off the group labels: the output axis (not the batch axis)
      whose channel ids are rows of groups. Positions of that axis that are no row (pinned or
      unowned channels) get a constant scale 1, so they pass unmixed.
    * Each selection node is a ``call_module`` of :class:`SelectionLayer` with two inputs: the
      producer's output and a ``get_attr`` of ``scop_beta``; the layer gathers the per-position
      scale with a precomputed index (``gather``, a buffer) from ``cat([scop_beta, 1])``.
    * # NB: a graph captured with ``torch.export`` may have the example's batch size baked into
      reshapes, and then the doubled batch does not run (an InputError says so).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from torch.utils._pytree import tree_flatten

from otofx.errors import InputError

from ..channels import AxisLabels
from ..nodes import is_hf_conv1d
from ..slb import _product
from ..zigs import ZigSet

log = logging.getLogger("otofx")

BETA_NAME = "scop_beta"


class SelectionLayer(torch.nn.Module):
    """Mixes the real half of a doubled batch with the knockoff half, one scale per channel."""

    def __init__(self, gather: torch.Tensor, axis: int, batch: int = 0):
        super().__init__()
        self.register_buffer("gather", gather, persistent=False)
        self.axis = int(axis)
        self.batch = int(batch)

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        full = torch.cat([beta, beta.new_ones(1)])[self.gather].to(x.dtype)
        shape = [1] * x.dim()
        shape[self.axis] = full.numel()
        b = full.reshape(shape)
        half = x.shape[self.batch] // 2
        real, knock = x.narrow(self.batch, 0, half), x.narrow(self.batch, half, x.shape[self.batch] - half)
        return torch.cat([b * real + (1 - b) * knock, knock], self.batch)

    def extra_repr(self) -> str:
        return f"channels={self.gather.numel()}, axis={self.axis}, batch={self.batch}"


@dataclass(frozen=True)
class Selection:
    """The graph with selection layers: ``gm.scop_beta`` holds every row's beta, group after group."""

    gm: fx.GraphModule
    offsets: tuple  # group z owns scop_beta[offsets[z]:offsets[z + 1]]
    producers: tuple  # (node name, group indices) per selection layer inserted
    refused: tuple = ()  # producer nodes left out: no axis of their output splits the doubled batch in halves
    uncovered: tuple = ()  # groups with no selection layer: their betas never move
    out_axes: tuple = ()  # per flattened output leaf, its batch axis on the doubled batch (None: none found)

    def betas(self) -> tuple:
        """The current betas, one detached tensor per group."""
        beta = getattr(self.gm, BETA_NAME).detach()
        return tuple(beta[a:b].clone() for a, b in zip(self.offsets[:-1], self.offsets[1:]))


def producer_params(zigset: ZigSet, params: dict) -> dict:
    """Parameter name -> ``[(dim, group), ...]``: the groups owning a dim of a weight (ndim >= 2).

    Which dim is a producer's output is decided per read (:func:`_out_dim`): 0 for conv / linear
    weights, the stored ``[in, out]`` weight's last dim for ``x @ W`` and transformers' ``Conv1D``.
    """
    out: dict = {}
    for zi, z in enumerate(zigset.zigs):
        for name, dim, _ in z.params:
            p = params.get(name)
            if p is not None and p.dim() >= 2 and (dim, zi) not in out.get(name, ()):
                out.setdefault(name, []).append((dim, zi))
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


def _module_out_dim(mod: torch.nn.Module) -> int:
    """The output-channel dim of a module's ``weight``: 1 for transformers' ``Conv1D`` ([in, out]) and
    a transposed conv ([in, out / groups, k...]), else 0."""
    if is_hf_conv1d(mod) or isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
        return 1
    return 0


def _producer_nodes(gm: fx.GraphModule, weights: dict) -> list:
    """(node, weight name, output dim of the weight) for every node that computes on an activation
    with a weight of ``weights``."""
    mods = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = mods.get(node.target)
            name = f"{node.target}.weight"
            if mod is not None and name in weights and getattr(mod, "weight", None) is not None:
                found.append((node, name, _module_out_dim(mod)))
        elif node.op in ("call_function", "call_method"):
            # a matrix product reading a weight: x @ W ([in, out]: addmm of transformers' Conv1D), x @ W.t(), W @ x
            read = _product(node) if node.op == "call_function" else None
            if read is not None and read.weight.target in weights:
                found.append((node, read.weight.target, read.out_dim))
                continue
            sources = [_param_source(a) for a in node.all_input_nodes]
            # NB: a node computed from parameters alone (``w.t()``) is no producer: its axis 0 is no batch
            if all(s is not None for s in sources):
                continue
            hit = [s for s in sources if s in weights]
            if hit:
                found.append((node, hit[0], 0))  # F.linear / F.conv: the weight's dim 0 is the output
    return found


def _channel_axis(lab: AxisLabels, zigset: ZigSet, groups, batch: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The output axis (not the batch axis) holding the rows of ``groups``, with each position's (group, row)."""
    best = None
    for axis in range(len(lab.ids)):
        if axis == batch:
            continue
        roots = zigset.uf.find(lab.ids[axis])
        z = zigset.zig_of_root[roots]
        hit = int(np.isin(z, groups).sum())
        if hit and (best is None or hit > best[0]):
            best = (hit, axis, z, zigset.row_of_root[roots])
    return None if best is None else best[1:]


class _Record(fx.Interpreter):
    """Runs the graph and keeps the outputs of the nodes named in ``names``."""

    def __init__(self, gm: fx.GraphModule, names: set):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.seen[n.name] = out.detach()
        return out


def _halves_match(ab: torch.Tensor, a: torch.Tensor, b: torch.Tensor, axis: int) -> bool:
    h = a.shape[axis]
    tol = 1e-3 if ab.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 3e-2
    for half, ref in ((ab.narrow(axis, 0, h), a), (ab.narrow(axis, h, h), b)):
        if not (ref.is_floating_point() or ref.is_complex()):
            if not torch.equal(half, ref):
                return False
            continue
        scale = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0, 1e-12)
        err = float((half - ref).abs().max()) if ref.numel() else 0.0
        if not err <= tol * scale:  # NB: also False for NaN
            return False
    return True


def batch_axis(ab, a, b) -> int | None:
    """The axis along which ``ab`` (a value on the batch ``[xa; xb]``) splits into ``a`` and ``b``
    (the same value on ``xa`` and on ``xb``), else None."""
    if not all(isinstance(t, torch.Tensor) for t in (ab, a, b)) or a.shape != b.shape or ab.dim() != a.dim():
        return None
    cands = [k for k in range(a.dim()) if a.shape[k] > 0 and ab.shape[k] == 2 * a.shape[k]
             and all(ab.shape[j] == a.shape[j] for j in range(a.dim()) if j != k)]
    if len(cands) != 1 or not _halves_match(ab, a, b, cands[0]):
        return None
    return cands[0]


def _synthetic_example(gm: fx.GraphModule, device) -> tuple:
    """Two random inputs of the first placeholder's recorded shape and dtype (ids in {0, 1})."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = None if first is None else first.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        raise InputError("scop: insert_selection needs example=(xa, xb) (two input batches of one shape): the graph's "
                         "first input has no recorded tensor shape to make one from")
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        if val.dtype.is_floating_point or val.dtype.is_complex:
            t = torch.randn(tuple(val.shape), generator=gen).to(val.dtype)
        elif val.dtype == torch.bool:
            t = torch.rand(tuple(val.shape), generator=gen) > 0.5
        else:
            t = torch.randint(0, 2, tuple(val.shape), generator=gen).to(val.dtype)
        out.append(t.to(device))
    return tuple(out)


def _probe(gm: fx.GraphModule, names: set, example) -> tuple[dict, tuple]:
    """Each named node's batch axis, and each output leaf's, from runs on ``xa``, ``xb`` and ``[xa; xb]``."""
    xa, xb = example
    if not isinstance(xa, torch.Tensor) or not isinstance(xb, torch.Tensor) or xa.shape != xb.shape or xa.dim() == 0:
        raise InputError("scop: example must be two input tensors of one shape (xa, xb), batch axis 0")
    flags = [(m, m.training) for m in gm.modules()]
    runs = []
    try:
        # NB: eval mode: train-mode BatchNorm normalises over the batch, so the halves of [xa; xb]
        # would not equal the runs on xa and xb alone
        for m, _ in flags:
            m.training = False
        with torch.no_grad():
            for x in (xa, xb, torch.cat([xa, xb], 0)):
                rec = _Record(gm, names)
                out = rec.run(x)
                runs.append((rec.seen, tree_flatten(out)[0]))
    except Exception as e:  # noqa: BLE001 - name what went wrong, in otofx's terms
        raise InputError(f"scop: the captured graph does not run on a doubled batch of shape "
                         f"{(2 * xa.shape[0],) + tuple(xa.shape[1:])}: {type(e).__name__}: {e}. SCOP runs the real "
                         "and knockoff halves as one batch; capture with a batch-independent front-end "
                         "(frontend='symbolic_trace')") from e
    finally:
        for m, t in flags:
            m.training = t
    (sa, oa), (sb, ob), (sab, oab) = runs
    axes = {n: batch_axis(sab.get(n), sa.get(n), sb.get(n)) for n in names}
    outs = tuple(batch_axis(t, u, v) if len(oa) == len(ob) == len(oab) else None for t, u, v in zip(oab, oa, ob))
    return axes, outs


def insert_selection(gm: fx.GraphModule, zigset: ZigSet, init: float = 0.5, example=None) -> Selection:
    """A deep copy of ``gm`` with a selection layer after every producer of every group of ``zigset``.

    ``gm`` must be the graph ``zigset`` was computed on (``oto.graph_module``); it is not modified.
    The betas start at ``init``. ``example=(xa, xb)``: two input batches of one shape (batch axis 0)
    to find each producer output's batch axis on (default: random inputs of the captured example's
    shape and dtype).
    """
    new = copy.deepcopy(gm)
    params = dict(new.named_parameters(remove_duplicate=False))
    weights = producer_params(zigset, params)
    offsets = np.concatenate([[0], np.cumsum([z.rows for z in zigset.zigs])]).astype(np.int64)
    total = int(offsets[-1])
    dtype = next(iter(params.values())).dtype if params else torch.float32
    device = next(iter(params.values())).device if params else torch.device("cpu")
    candidates = []
    for node, wname, out_dim in _producer_nodes(new, weights):
        groups = [zi for d, zi in weights[wname] if d == out_dim]
        lab = zigset.labels.get(node.name)
        if not groups:
            continue
        if not isinstance(lab, AxisLabels) or len(lab.ids) < 2:
            log.debug("scop: producer %s has no channel label; left unscaled", node.name)
            continue
        candidates.append((node, groups, lab))
    axes, out_axes = _probe(new, {n.name for n, _, _ in candidates},
                            example if example is not None else _synthetic_example(new, device))
    new.register_parameter(BETA_NAME, torch.nn.Parameter(torch.full((total,), float(init), dtype=dtype, device=device)))
    beta_node = None
    producers, refused = [], []
    for k, (node, groups, lab) in enumerate(candidates):
        batch = axes[node.name]
        if batch is None:
            # NB: splitting any other axis in halves mixes real and knockoff samples (a sequence-first
            # [T, B, C] output split on T, or a flattened [T * B, C]); that producer gets no selection layer
            refused.append(node.name)
            log.warning("scop: the output of '%s' (shape %s) has no batch axis that splits [x; knockoff] into its "
                        "real and knockoff halves; it gets no selection layer", node.name,
                        tuple(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else "?")
            continue
        found = _channel_axis(lab, zigset, groups, batch)
        if found is None:
            continue
        axis, z, r = found
        gather = np.full(len(z), total, dtype=np.int64)  # index `total` is the constant 1
        ok = z >= 0
        gather[ok] = offsets[z[ok]] + r[ok]
        layer_name = f"scop_select_{k}"
        new.add_submodule(layer_name, SelectionLayer(torch.from_numpy(gather).to(device), axis, batch))
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
    covered = {g for _, gs in producers for g in gs}
    log.info("scop: %d selection layers over %d groups (%d betas)", len(producers), len(zigset.zigs), total)
    return Selection(new, tuple(int(o) for o in offsets), tuple(producers), tuple(refused),
                     tuple(i for i in range(len(zigset.zigs)) if i not in covered), out_axes)


__all__ = ["insert_selection", "Selection", "SelectionLayer", "producer_params", "batch_axis", "BETA_NAME"]
