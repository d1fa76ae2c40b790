"""The rewrite: ``prune_graph(gm, plan) -> GraphModule`` without the removed rows (run by the
``prune`` pass of ``otofx.pipeline``).

``zero_row_plan(zigset, module)`` finds the rows whose every listed slice is exactly zero;
``prune`` deep-copies the graph module without its tensors, gives it every parameter and buffer
sliced along the axes whose channels were removed (or a copy of it when none were), lets each op's rule fix module attributes and literal arguments (conv
groups, view sizes, split sizes), and recompiles.

Placement (:func:`follow_placement`, the last step of ``prune``): the pruned graph moves like a
module. A front-end that runs the model's Python (torch.export, dynamo) bakes the capture's
device and dtype into the graph wherever the code read them (``device=x.device``,
``x.to(input_dtype)``), and export adds ``_assert_tensor_metadata`` checks of both. The rule:

    * every ``_assert_tensor_metadata`` node is dropped (it asserts the capture's dtype/device);
    * every ``torch.device`` argument equal to the device of the graph's weights (or ``meta``) is
      replaced by ``getattr(W, "device")``, one helper node at the top of the graph reading a
      weight W (the first floating parameter, else any tensor attribute; a graph with none is
      left as it is): factory ops (``arange``, ``zeros``, ``full``, ``scalar_tensor`` ...),
      ``to(device=...)``, ``_to_copy``;
    * a ``torch.dtype`` argument equal to the dtype of W (the capture's default dtype) is
      replaced by ``getattr(W, "dtype")`` unless the source line of the op (the node's
      ``stack_trace``, narrowed to the expression dynamo's ``^^^`` marks) spells that dtype
      literally (``torch.float32``, ``torch.float``, ``.float()``, ``bfloat16``, ``.half()`` ...).
      So RMSNorm's ``x.to(torch.float32)`` upcast stays float32 and its ``x.to(input_dtype)``
      follows the weights. A node with no stack trace (symbolic_trace graphs, where a dtype in the
      graph was written in the code) keeps its dtype;
    * tensors the graph reads that are plain attributes (export's lifted constants,
      ``lifted_tensor_0``) come out of prune's copy as non-persistent buffers, so ``.to()`` moves
      (and, if floating, casts) them like every other buffer.

# NB: a restated dtype on a line that also spells it for another operand (``a.to(x.dtype) *
b.float()`` in export's whole-line traces) is taken as literal (the graph keeps float32 there);
scalars computed from a dtype at capture (``torch.finfo(torch.float32).min``) stay the numbers the
capture evaluated; a device the code names literally and that equals the weights' follows them.

Internals:
    * Keep masks come from the labels of ``find_zigs``: index i of an axis is kept unless its
      class is removed. Every value's new shape is therefore known before the rewrite runs.
    * # NB: a GraphModule shares submodules with the module it was traced from; the deep copy is
      taken first, so the user's model is never touched.
    * Memory: the deep copy maps every parameter and buffer to a meta placeholder (``deepcopy``'s
      memo), and each is then replaced by its slice or copy, one tensor at a time, so ``prune``
      holds the dense weights (the user's), the compressed ones and one temporary slice, never a
      second dense copy. Unchanged tensors are copied too (no aliasing of the user's model).
    * Tied tensors (one Parameter under several names) are sliced once and re-assigned under
      every name, so they stay tied.
    * Weight-normed weights whose ``v`` lost non-zero entries (an input column) get ``g`` rescaled by
      the norm ``v`` keeps (``passes.weightnorm.refit_gains``).
    * Index tensors (kept positions) are moved to each weight's device before slicing: a model on
      CUDA is sliced on CUDA; analysis and plans stay on the CPU (meta shapes, numpy masks).
    * A layer norm reading removed channels that hold constants (``ZigSet.fills``), or a batch norm
      averaging over them (weight standardisation), needs their values: :func:`constant_fills` runs a
      copy of the graph (not of the weights) with a tap before each such norm on the example inputs,
      once, before the fixes (``Site.fills``). A plan removing rows that are not zero is run with
      them zeroed (a copy of the tensors they touch): the constants are the zeroed model's. ``read``
      keeps what a run read, so that ``OTO.compress`` runs it once for every copy its own-class
      search makes.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from otofx import fxcompat
from otofx.fxcompat import graph_module_like

from .channels import AxisLabels, labs_in
from .modules import refresh_rnn_weights
from .nodes import get_path, set_path
from .registry import RULES, arg_slot, bind, form_of, op_of, set_arg
from .weightnorm import own_classes, refit_gains, stale_weights
from .zigs import ZigSet


@dataclass(frozen=True)
class Plan:
    """Which rows to remove: ``removed[z]`` are the removed row indices of zig z (``ZIG.rows`` is
    the count of its rows), ``removed_roots`` the same as a mask over union-find roots."""

    zigset: ZigSet
    removed: tuple  # tuple[torch.LongTensor]: per zig, the indices of its removed rows
    removed_roots: np.ndarray  # root id -> removed

    @property
    def count(self) -> int:
        return int(sum(len(r) for r in self.removed))


def output_keeps(plan: Plan) -> dict:
    """``{flat output index: {axis: kept positions (LongTensor)}}`` of every free output
    (``ZigSet.free_outputs``) that the plan narrows: the compressed model returns those positions
    of the dense (zeroed) model's output, the others being zero there."""
    uf, out = plan.zigset.uf, {}
    for f in plan.zigset.free_outputs:
        for d, ids in enumerate(f.label.ids):
            keep = ~plan.removed_roots[uf.find(ids)]
            if not keep.all():
                out.setdefault(f.index, {})[d] = torch.from_numpy(np.nonzero(keep)[0])
    return out


def row_norms(zigset: ZigSet, module: torch.nn.Module) -> list:
    """Squared L2 norm of every row of every zig (float64 tensors)."""
    out = []
    with torch.no_grad():
        for z in zigset.zigs:
            acc = torch.zeros(z.rows, dtype=torch.float64)
            for name, dim, index in z.params:
                p = get_path(module, name).detach()
                sl = p.movedim(dim, 0).index_select(0, index.reshape(-1).to(p.device)).to(torch.float64)
                acc += sl.reshape(z.rows, -1).pow(2).sum(1).cpu()
            out.append(acc)
    return out


def zero_rows(zigset: ZigSet, module: torch.nn.Module) -> tuple:
    """Per group, the indices of the rows whose every parameter slice in ``module`` is exactly zero.

    The rows whose :func:`row_norms` are 0 (a NaN counts as non-zero), from one "any non-zero"
    flag per position along each (tensor, dim) that a group reads: no float64 copy of the weights,
    and only one tensor's ``p != 0`` mask alive at a time.
    """
    alive_at: dict = {}  # (tensor, dim) -> bool per position along dim, shared by the groups that read it
    out = []
    with torch.no_grad():
        for z in zigset.zigs:
            alive = torch.zeros(z.rows, dtype=torch.bool)
            for name, dim, index in z.params:
                key = (name, dim)
                if key not in alive_at:
                    p = get_path(module, name).detach()
                    flat = (p != 0).movedim(dim, 0).reshape(p.shape[dim], -1) if p.numel() else None
                    alive_at[key] = flat.any(1).cpu() if flat is not None else torch.zeros(p.shape[dim], dtype=torch.bool)
                    del flat
                hit = alive_at[key].index_select(0, index.reshape(-1))
                alive |= hit.reshape(z.rows, -1).any(1)
            out.append(torch.nonzero(~alive).reshape(-1))
    return tuple(out)


def zero_row_plan(zigset: ZigSet, module: torch.nn.Module) -> Plan:
    """A plan removing every row whose listed parameter slices are all exactly zero."""
    return plan_rows(zigset, zero_rows(zigset, module))


def plan_rows(zigset: ZigSet, rows) -> Plan:
    removed = np.zeros(len(zigset.zig_of_root), dtype=bool)
    roots = np.nonzero(zigset.zig_of_root >= 0)[0]
    z = zigset.zig_of_root[roots]
    r = zigset.row_of_root[roots]
    sel = np.zeros(len(roots), dtype=bool)
    for zi, rr in enumerate(rows):
        if len(rr):
            mask = z == zi
            sel[mask] = np.isin(r[mask], np.asarray(rr))
    removed[roots[sel]] = True
    _keep_one_per_axis(zigset, removed)
    rows = tuple(torch.from_numpy(np.sort(r[(z == zi) & removed[roots]])) for zi in range(len(zigset.zigs)))
    return Plan(zigset, rows, removed)


def _keep_one_per_axis(zigset: ZigSet, removed: np.ndarray) -> None:
    """Give back one (zero) row to every axis that would lose all its channels.

    # NB: torch has no zero-channel conv, and an emptied concat branch or split piece would change
    # the graph's structure; one zero row keeps every layer in place and is exact by definition.
    """
    uf = zigset.uf
    axes = [o.ids for o in zigset.owners]
    axes += [a for lab in labs_in(list(zigset.labels.values())) for a in lab.ids]
    for ids in axes:
        if len(ids) and removed[uf.find(ids[:1])[0]]:
            r = uf.find(ids)
            if removed[r].all():
                removed[r[0]] = False


class Site:
    """What a rule's ``fix`` sees of one node during the rewrite."""

    def __init__(self, plan: Plan, node: fx.Node, module, form):
        self.plan, self.node, self.module, self.form = plan, node, module, form
        self.root: fx.GraphModule | None = None  # the new graph module (prune_graph sets it)
        self.fills: dict = {}  # constant_fills' values, by node name
        labels = plan.zigset.labels
        out = labels.get(node.name)
        self.out_old = self.old_of(out)
        self.out_new = self.new_of(out)
        self.out_old_list = [self.old_of(o) for o in out] if isinstance(out, (tuple, list)) else []

    # shapes -----------------------------------------------------------------------------------
    def _lab(self, v):
        return self.plan.zigset.labels.get(v.name) if isinstance(v, fx.Node) else None

    @staticmethod
    def old_of(lab):
        return lab.shape if isinstance(lab, AxisLabels) else None

    def new_of(self, lab):
        if not isinstance(lab, AxisLabels):
            return None
        return tuple(int(self._keep_ids(a).sum()) for a in lab.ids)

    def _keep_ids(self, ids):
        return ~self.plan.removed_roots[self.plan.zigset.uf.find(ids)]

    def old(self, v):
        return self.old_of(self._lab(v))

    def new(self, v):
        return self.new_of(self._lab(v))

    def keep(self, v, axis: int) -> np.ndarray:
        return self._keep_ids(self._lab(v).ids[axis])

    # edits ------------------------------------------------------------------------------------
    def set(self, name: str, value) -> None:
        set_arg(self.node, arg_slot(self.form, self.node, name), value)

    def set_varargs(self, name: str, values) -> None:
        """Replace a ``*name`` varargs tail (method forms) or the ``name`` argument."""
        spec = self.form.spec
        if f"*{name}" in spec:
            i = spec.index(f"*{name}")
            self.node.args = tuple(self.node.args[:i]) + tuple(values)
        else:
            self.set(name, values[0] if len(values) == 1 else tuple(values))

    def replace_call(self, target, args, kwargs) -> None:
        self.node.op = "call_function"
        self.node.target = target
        self.node.args = tuple(args)
        self.node.kwargs = dict(kwargs)


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A meta stand-in of ``t`` (same class, shape and dtype; no storage)."""
    meta = torch.empty_like(t, device="meta")
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(meta, requires_grad=t.requires_grad)
    return meta


def _copy_without_tensors(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A deep copy of ``gm`` whose parameters and buffers are meta placeholders.

    Returns the copy and ``{id(placeholder): original tensor}``. Tied tensors (one object under
    several names) get one placeholder, so they stay tied.
    """
    memo: dict = stale_weights(gm)
    originals: dict = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if id(t) not in memo:
            ph = _placeholder(t)
            memo[id(t)] = ph
            originals[id(ph)] = t
    return own_classes(copy.deepcopy(gm, memo)), originals


def _fill_tensors(new: fx.GraphModule, originals: dict, plan: Plan) -> None:
    """Replace every placeholder of ``new`` with its original, sliced along the plan's removed rows
    or cloned whole (one tensor at a time: the only temporary is one slice of one tensor)."""
    uf = plan.zigset.uf
    cuts: dict[str, list] = {}
    for o in plan.zigset.owners:
        keep = ~plan.removed_roots[uf.find(o.ids)]
        if not keep.all():
            cuts.setdefault(o.name, []).append((o.dim, torch.from_numpy(np.nonzero(keep)[0])))
    aliases: dict[int, list] = {}
    for name, t in list(new.named_parameters(remove_duplicate=False)) + list(new.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    with torch.no_grad():
        for key, names in aliases.items():
            old = originals.get(key)
            if old is None:
                # NB: GraphModule's deepcopy registers a plain tensor attribute that the graph reads
                # (export's lifted constants) as a buffer: already a copy; it moves with .to() as a
                # buffer, and stays out of the state_dict as it was. One the analysis slices with a
                # row (vit-pytorch's SimpleViT adds its sin-cos table, a plain attribute, to the
                # stream) is sliced here
                steps = next((cuts[n] for n in names if n in cuts), ())
                data = take(get_path(new, names[0]).detach(), steps) if steps else None
                for alias in names:
                    if data is not None:
                        set_path(new, alias, data)
                    mod_name, _, attr = alias.rpartition(".")
                    fxcompat.set_buffer_persistent(new.get_submodule(mod_name) if mod_name else new, attr, False)
                continue
            data = old.detach()
            steps = next((cuts[n] for n in names if n in cuts), ())
            if steps:
                data = take(data, steps)  # a new tensor: no clone needed
            else:
                # NB: unchanged tensors are copied, not shared: the compressed model is a new
                # object (OTO.md section 4), and training it further in place must not change the
                # user's model (nor the other way round)
                data = data.clone()
            repl = torch.nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else data
            for alias in names:
                set_path(new, alias, repl)
            del data, repl


def take(t: torch.Tensor, steps) -> torch.Tensor:
    """A new tensor of the entries of ``t`` that ``steps`` (``[(dim, kept indices)]``) keep. Cuts on
    adjacent dims are one gather, with no intermediate of the partly cut tensor (an embedding cut
    in both its rows and its columns)."""
    steps = sorted((d % t.dim(), i.to(t.device)) for d, i in steps)
    dims = [d for d, _ in steps]
    if len(steps) > 1 and dims == list(range(dims[0], dims[0] + len(dims))):
        n = len(steps)
        idx = tuple(i.reshape([-1] + [1] * (n - 1 - k)) for k, (_, i) in enumerate(steps))
        return t[(slice(None),) * dims[0] + idx]
    for d, i in steps:
        t = t.index_select(d, i)
    return t


def _norm_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def constant_fills(gm: fx.GraphModule, plan: Plan, inputs=None, read: dict | None = None) -> dict:
    """``{norm node name: values}``: for each norm of ``gm`` that reads channels the plan removes
    while they hold constants other than 0 (``ZigSet.fills``: MLP-Mixer's token MLP writes its biases
    into a zero channel of the residual stream; a weight-standardised conv's input columns), the values
    its input holds at every entry of the last axis the plan removes (``[..., r]``,
    :func:`~otofx.passes.modules.constant_fill`).

    The analysis proved those entries the same for every input; they are read off one run of ``gm``
    with the plan's rows zeroed (:func:`_rows_zeroed`) on ``inputs`` (``(args, kwargs)``: the example
    inputs). ``read``: a dict that keeps what a run read (``{node name: (entries, values)}``) for later
    calls on the same weights and inputs: a plan removing a subset of those entries (the own-class
    search's tries, which keep some groups' rows) takes its values from there, without a run."""
    from otofx.errors import OTOError
    from otofx.verify import run_eval

    from .modules import constant_fill

    zs = plan.zigset
    if not zs.fills:
        return {}
    want = {}
    for node in gm.graph.nodes:
        mask = zs.fills.get(node.name)
        src = _norm_input(node) if mask is not None else None
        lab = zs.labels.get(src.name) if isinstance(src, fx.Node) else None
        if not isinstance(lab, AxisLabels):
            continue
        removed = plan.removed_roots[zs.uf.find(lab.ids[-1])]
        if (removed & mask).any():
            want[node.name] = torch.from_numpy(np.nonzero(removed)[0])
    if not want:
        return {}
    if read is not None and all(k in read and np.isin(v.numpy(), read[k][0].numpy()).all() for k, v in want.items()):
        # NB: entries are sorted (np.nonzero), so each wanted one is found by bisection
        return {k: constant_fill(read[k][1].index_select(-1, torch.searchsorted(read[k][0], v).to(read[k][1].device)))
                for k, v in want.items()}
    if inputs is None:
        raise OTOError(f"norm(s) {', '.join(sorted(want))} read channels the plan removes that hold constants "
                       "other than 0: the rewrite reads them off a run of the model and needs its example inputs")
    # NB: a copy of the graph (not of the weights) with a tap before each norm, reading its input there
    graph = fxcompat.copy_graph(gm.graph)
    got: dict = {}
    # NB: the copy keeps the node names (a fresh namespace), so the taps find the analysed norms
    for node in list(graph.nodes):
        if node.name in want:
            def tap(x, key=node.name):
                got[key] = x.detach().index_select(-1, want[key].to(x.device))

            with graph.inserting_before(node):
                graph.call_function(tap, (_norm_input(node),))
    args, kwargs = inputs
    run_eval(graph_module_like(_rows_zeroed(gm, plan), graph, "ConstantFills"), tuple(args), dict(kwargs or {}))
    if set(got) != set(want):
        raise OTOError(f"the run of the model did not reach norm(s) {', '.join(sorted(set(want) - set(got)))}")
    if read is not None:
        read.update({k: (want[k], v) for k, v in got.items()})
    return {k: constant_fill(v) for k, v in got.items()}


def sized_tie_groups(zigset) -> dict:
    """``{reshape node name: group indices}``: the groups of the channels a reshape tied in blocks read at
    the example's sizes (``ZigSet.sized_ties``: channels merged with a token or pixel axis, split along
    other boundaries); at another input size those blocks may differ."""
    out: dict = {}
    for name, ids in zigset.sized_ties:
        zigs = zigset.zig_of_root[zigset.uf.find(ids)] if len(ids) else np.zeros(0, dtype=np.int64)
        got = {int(i) for i in np.unique(zigs) if i >= 0}
        if got:
            out.setdefault(name, set()).update(got)
    return out


def positional_fill_groups(gm: fx.GraphModule, zigset, read: dict) -> dict:
    """``{norm node name: group indices}``: the groups of the removed entries whose constants
    (``read``: :func:`constant_fills`'s ``{node name: (entries, values)}``) differ along an axis
    before the last (from token to token: DiT's position table in removed channels of its stream).

    # NB: such a fill holds the example's positions: an input of another size (which the model may
    # take) reads other constants there, so a module keeping it is exact at the example's size only
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict = {}
    for name, (entries, values) in read.items():
        node = nodes.get(name)
        # NB: a weight standardisation's fills (its conv's removed input columns) differ per output channel
        if node is None or op_of(node, gm) != "layer_norm":
            continue
        src = _norm_input(node)
        lab = zigset.labels.get(src.name) if isinstance(src, fx.Node) else None
        if not isinstance(lab, AxisLabels) or values.dim() < 2:
            continue
        # NB: constants are the same for every sample: along the batch too, so all leading axes are positions
        lead = values.reshape(-1, values.shape[-1])
        varies = (lead != lead[:1]).any(0).cpu().numpy()
        ids = lab.ids[-1][entries.numpy()[varies]]
        zigs = zigset.zig_of_root[zigset.uf.find(ids)] if len(ids) else np.zeros(0, dtype=np.int64)
        got = {int(i) for i in np.unique(zigs) if i >= 0}
        if got:
            out[name] = got
    return out


def _rows_zeroed(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """``gm`` when every row the plan removes is zero in it; else a copy (sharing the tensors no such
    row touches) with those rows set to zero: the model the compressed one must equal, whose constants
    the fills are (SCOP's ``prune_lowest`` removes rows that are not zero; a weight-standardised conv's
    removed input columns then count as the zeros they are in that model)."""
    zs = plan.zigset
    zero = zero_rows(zs, gm)
    live = [i for i, r in enumerate(plan.removed) if len(r) and not bool(torch.isin(r, zero[i]).all())]
    if not live:
        return gm
    memo = stale_weights(gm)
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        memo.setdefault(id(t), t)
    for name in {name for i in live for name, _, _ in zs.zigs[i].params}:
        t = get_path(gm, name)
        c = t.detach().clone()
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
    ref = copy.deepcopy(gm, memo)
    with torch.no_grad():
        for i in live:
            for name, dim, index in zs.zigs[i].params:
                t = get_path(ref, name)
                t.movedim(dim, 0)[index[plan.removed[i]].reshape(-1).to(t.device)] = 0
    return ref


def prune_graph(gm: fx.GraphModule, plan: Plan, inputs=None) -> fx.GraphModule:
    """A new GraphModule with the plan's rows removed (``gm`` is not modified); ``inputs``
    (``(args, kwargs)``) are needed where a layer norm reads removed channels that hold constants
    (:func:`constant_fills`)."""
    fills = constant_fills(gm, plan, inputs)
    new, originals = _copy_without_tensors(gm)
    _fill_tensors(new, originals, plan)
    del originals
    refresh_rnn_weights(new)
    refit_gains(plan, gm, new)  # NB: before the fixes, which read a weight-normed layer's new weight
    mods = dict(new.named_modules())
    for node in list(new.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        form = form_of(node, mods)
        if form is None:
            continue
        fix = RULES[form.rule].fix
        if fix is None:
            continue
        module = mods[node.target] if node.op == "call_module" else None
        site = Site(plan, node, module, form)
        site.root = new
        site.fills = fills
        if site.out_old is None and not site.out_old_list:
            continue
        kw = bind(form, node, node.args, node.kwargs, module)
        fix(site, **kw)
    follow_placement(new)
    new.graph.lint()
    # a plain GraphModule (code generated now), whatever kind of module the front-end gave
    return graph_module_like(new, new.graph, type(gm).__name__.replace("GraphModuleImpl", "GraphModule"))


# ---------------------------------------------------------------------------------------------
# Placement: the pruned graph follows .to(device) and .to(dtype) (module docstring: "Placement")
# ---------------------------------------------------------------------------------------------

_aten = torch.ops.aten
# how code spells each dtype literally (the source line of a cast or factory op)
_LITERAL = {
    torch.float32: re.compile(r"float32|torch\.float\b|\.float\(\)"),
    torch.float64: re.compile(r"float64|torch\.double\b|\.double\(\)"),
    torch.float16: re.compile(r"(?<!b)float16|torch\.half\b|\.half\(\)"),
    torch.bfloat16: re.compile(r"bfloat16"),
}


def _source_line(node: fx.Node) -> str | None:
    """The innermost source of ``node``: its ``stack_trace``'s last code line, narrowed to the
    expression its ``^^^^`` marker line (dynamo's traces) points at; None when there is none."""
    lines = (node.meta.get("stack_trace") or "").splitlines()
    files = [i for i, ln in enumerate(lines) if ln.lstrip().startswith('File "')]
    if not files or files[-1] + 1 >= len(lines):
        return None
    code = lines[files[-1] + 1]
    marks = lines[files[-1] + 2] if files[-1] + 2 < len(lines) else ""
    if marks.strip() and set(marks.strip()) <= set("^~"):
        start = len(marks) - len(marks.lstrip())
        span = code[start:len(marks.rstrip())]
        if span.strip():
            return span.strip()
    return code.strip() or None


def _literal_dtype(node: fx.Node, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` in ``node``'s arguments was written in the code (True when unknown)."""
    line = _source_line(node)
    if line is None:
        return True
    pattern = _LITERAL.get(dtype)
    return pattern is None or bool(pattern.search(line))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def follow_placement(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm`` in place so that it follows ``.to(device)``/``.to(dtype)`` (see "Placement"
    in the module docstring); returns whether anything changed (the caller recompiles)."""
    graph = gm.graph
    changed = False
    tensors = {}
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)
            changed = True
        elif n.op == "get_attr":
            try:
                t = get_path(gm, n.target)
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor):
                tensors[n] = t
    if not tensors:
        return changed
    floats = [n for n, t in tensors.items() if t.is_floating_point()]
    params = [n for n in floats if isinstance(tensors[n], torch.nn.Parameter)]
    ref = (params or floats or list(tensors))[0]
    device, dtype = tensors[ref].device, tensors[ref].dtype if floats else None
    helpers: dict = {}
    first = next(n for n in graph.nodes if n.op != "placeholder")

    def helper(what: str) -> fx.Node:
        # NB: read at the top of the graph (a get_attr of symbolic_trace sits at its first use)
        if what not in helpers:
            with graph.inserting_before(first):
                if "weight" not in helpers:
                    helpers["weight"] = graph.get_attr(ref.target)
                helpers[what] = graph.call_function(getattr, (helpers["weight"], what))
        return helpers[what]

    for n in list(graph.nodes):
        if n.op not in ("call_function", "call_method") or n in helpers.values():
            continue

        def swap(a, n=n):
            if isinstance(a, torch.device) and (a.type == "meta" or _same_device(a, device)):
                return helper("device")
            if isinstance(a, torch.dtype) and a == dtype and not _literal_dtype(n, a):
                return helper("dtype")
            return a

        args, kwargs = fx.node.map_aggregate(n.args, swap), fx.node.map_aggregate(n.kwargs, swap)
        if args != n.args or kwargs != n.kwargs:
            n.args, n.kwargs = tuple(args), dict(kwargs)
            changed = True
    return changed
