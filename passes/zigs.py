"""find_zigs: the zero-invariant groups of a shape-annotated GraphModule.

``zero_invariant_groups(gm) -> ZigSet`` (run by the ``find_zigs`` pass of ``otofx.pipeline``)
walks the graph once in topological order, asks each node's rule for its output label, and turns
the surviving union-find classes into rows and groups.

Internals:
    * Cost is linear in the graph: each node does O(size of its labels) numpy work; grouping
      classes into ZIGs hashes every class's (owner, count) signature in one vectorised pass.
    * A class is a row only if it touches an activation axis and owns at least one parameter
      slice; classes that met ``PIN`` are not rows. Rows with the same signature (same parameters,
      same number of indices in each) form one ZIG.
    * The labels of every node are kept in ``ZigSet.labels`` for the rewrite.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_map_only

from .attention import find_head_splits
from .rules.linalg import bind_library_ops
from .channels import AxisLabels, Ctx, ParamRef, Pin, SymSize, WeightNormRef, labs_in, leaves
from .nodes import mutates_input
from .registry import MODULE_FORMS, RULES, RuleDeclined, bind, canonical_name, form_of, strict_rules
from .unionfind import PIN, UnionFind, unique
from .weightnorm import unknown_reason

log = logging.getLogger("otofx")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its module, or the parametrised module for a tensor a
    parametrisation computes from (``conv.parametrizations.weight.original0`` -> ``conv``)."""
    mod = name.rpartition(".")[0]
    if mod == "parametrizations" or mod.startswith("parametrizations."):
        return ""
    return mod.split(".parametrizations.")[0]


@dataclass(frozen=True)
class ZIG:
    """A zero-invariant group: ``rows`` channels; ``params`` entries ``(name, dim, index[rows, k])``."""

    rows: int
    params: tuple

    def frozen(self, model) -> tuple:
        """The names among ``params`` that training must not write in ``model``: parameters with
        ``requires_grad=False`` (and any name that is no parameter of ``model``)."""
        # NB: looked up by path, not through a dict of every parameter: OTO.dhspg() asks every group
        out = []
        for name, _, _ in self.params:
            try:
                frozen = not model.get_parameter(name).requires_grad
            except AttributeError:
                frozen = True
            if frozen:
                out.append(name)
        return tuple(out)

    @property
    def layers(self) -> tuple:
        seen = []
        for name, _, _ in self.params:
            mod = layer_of(name) or name
            if mod not in seen:
                seen.append(mod)
        return tuple(seen)


@dataclass(frozen=True)
class ZigSet:
    """Result of find_zigs: the groups, what was pinned, and the labels the rewrite needs."""

    zigs: tuple
    pinned: tuple
    labels: dict = field(repr=False)  # node name -> abstract value (AxisLabels, tuple, SymSize, python value)
    owners: tuple = field(repr=False)  # every Owner, parameters and buffers
    uf: UnionFind = field(repr=False)
    zig_of_root: np.ndarray = field(repr=False)  # root id -> zig index, -1 if none
    row_of_root: np.ndarray = field(repr=False)  # root id -> row index inside its zig
    weight_norms: tuple = field(default=(), repr=False)  # WeightNormRef of every weight-normed weight read
    # layer norm node name -> last-axis mask of the channels that are a constant other than 0 when
    # their row is zero (the rewrite fills them back in: ``passes.prune.constant_fills``)
    fills: dict = field(default_factory=dict, repr=False)


def _unknown(ctx: Ctx, node: fx.Node, args, kwargs, out, reason: str):
    before = len(ctx.pins)
    ctx.pin((args, kwargs), reason)
    if len(ctx.pins) == before and node.op == "call_module" and _holds_parameters(ctx.root, node.target):
        # NB: its inputs were pinned already (an LSTM before it), but the module's own widths are kept
        # all the same: the report names it
        ctx.pins.append(Pin(node.name, ctx.op, reason, 0))
    return _pinned_like(ctx, out)


def _holds_parameters(root: torch.nn.Module, target: str) -> bool:
    try:
        return next(root.get_submodule(target).parameters(), None) is not None
    except AttributeError:
        return False


def _pinned_like(ctx: Ctx, out):
    """``out`` with every tensor in it replaced by pinned labels of its shape (containers kept: a
    dict or named-tuple input's entries are read by ``getitem``/``getattr`` like any other value)."""
    return tree_map_only(torch.Tensor, lambda t: ctx.pinned_lab(t.shape), out)


def _resolve(ctx: Ctx, v):
    if isinstance(v, ParamRef):
        return ctx.tensor_lab(v.name)
    if isinstance(v, WeightNormRef):  # a weight-normed weight read by an op that owns no axis of it
        return ctx.weight_norm_lab(v, {}, None)
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # a named tuple takes its fields as arguments
        return type(v)(*(_resolve(ctx, x) for x in v))
    if isinstance(v, (list, tuple)):
        return type(v)(_resolve(ctx, x) for x in v)
    if isinstance(v, dict):
        return {k: _resolve(ctx, x) for k, x in v.items()}
    return v


def _getattr_value(ctx: Ctx, node: fx.Node, obj, attr: str, out):
    if isinstance(obj, AxisLabels):
        if attr == "shape":
            return RULES["size"].analyze(ctx, input=obj)
        if attr in ("ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"):
            return out
        if attr == "T":
            return RULES["permute"].analyze(ctx, input=obj, kind="t", meta=out)
        return _unknown(ctx, node, (obj,), {}, out, f"tensor attribute '{attr}' has no rule")
    if isinstance(obj, tuple) and attr in getattr(obj, "_fields", ()):  # a named tuple's field
        return getattr(obj, attr)
    # NB: a tensor read off an object the analysis does not follow is pinned, never a bare meta tensor
    return _pinned_like(ctx, out)


def zero_invariant_groups(gm: fx.GraphModule, pin: tuple = ()) -> ZigSet:
    """Group analysis over a graph whose nodes carry ``meta['val']`` (see propagate_shapes).

    ``pin``: module or parameter names whose channels must not be removed.
    """
    bind_library_ops()
    ctx = Ctx(gm)
    mods = ctx.modules
    ctx.row_axes = find_head_splits(gm, mods)
    env: dict = {}
    load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
    for node in gm.graph.nodes:
        ctx.node = node
        out = node.meta.get("val")
        if node.op == "placeholder":
            env[node] = _pinned_like(ctx, out)
            continue
        if node.op == "get_attr":
            ctx.op = "get_attr"
            env[node] = ParamRef(node.target) if isinstance(out, torch.Tensor) else out
            continue
        if node.op == "output":
            ctx.op = "output"
            ctx.pin(_resolve(ctx, load(node.args)), "model output")
            continue
        args, kwargs = load(node.args), load(node.kwargs)
        form = form_of(node, mods)
        ctx.op = form.rule if form is not None else canonical_name(node, mods)
        if node.op == "call_function" and node.target is getattr:
            env[node] = _getattr_value(ctx, node, _resolve(ctx, args[0]), args[1], out)
            continue
        if form is None:
            reason = f"no rule for '{ctx.op}'"
            if node.op == "call_module":  # a parametrised layer: which parametrisation
                reason = unknown_reason(mods[node.target], MODULE_FORMS) or reason
            env[node] = _unknown(ctx, node, _resolve(ctx, args), _resolve(ctx, kwargs), out, reason)
            continue
        module = mods[node.target] if node.op == "call_module" else None
        rule = RULES[form.rule]
        try:
            kw = bind(form, node, args, kwargs, module)
            if not rule.reads_params:
                kw = _resolve(ctx, kw)
            elif isinstance(kw.get("input"), ParamRef):  # a layer applied to a parameter or buffer (a table)
                kw["input"] = ctx.tensor_lab(kw["input"].name)
            flat = leaves(kw)
            if not rule.takes_sizes:
                syms = [v for v in flat if isinstance(v, SymSize)]
                if syms:
                    ctx.pin(syms, "a size read off this axis is used as a value")
            if not rule.python_values and not any(isinstance(v, (AxisLabels, ParamRef)) for v in flat):
                env[node] = _pinned_like(ctx, out)
                continue
            # NB: torch's ``out=`` argument (F.normalize has one) is a tensor to write, not a value to label
            kw.pop("out", None)
            env[node] = rule.analyze(ctx, **kw, meta=out)
            src = node.args[0] if node.args else None
            if (mutates_input(node, module) and isinstance(src, fx.Node) and isinstance(env[node], AxisLabels)
                    and isinstance(env.get(src), AxisLabels) and env[src].shape == env[node].shape):
                env[src] = env[node]  # later reads of the mutated tensor see its new label
        except RuleDeclined as e:  # the call is outside the rule's algebra: its values are pinned
            env[node] = _unknown(ctx, node, _resolve(ctx, args), _resolve(ctx, kwargs), out,
                                 f"rule '{form.rule}' declines this call: {e}")
        except Exception as e:
            # NB: anything else is a bug in the rule; pinning keeps the result exact but costs rows
            if strict_rules():
                raise
            log.warning("otofx: rule '%s' failed on node '%s' (%s); its channels are pinned. Please report this.",
                        form.rule, node.format_node(), f"{type(e).__name__}: {e}")
            env[node] = _unknown(ctx, node, _resolve(ctx, args), _resolve(ctx, kwargs), out,
                                 f"rule '{form.rule}' cannot handle this call ({type(e).__name__}: {e})")
    for name in pin:
        ctx.node, ctx.op = None, "user"
        hit = [o.ids for o in ctx.owners if o.name == name or o.name.startswith(name + ".")]
        if not hit:
            from otofx.errors import InputError

            raise InputError(f"pin=[{name!r}]: no parameter or module of that name in the model")
        ctx.pins.append(Pin(name, "user", "pinned by the user", 0))
        ctx.uf.pin(np.concatenate(hit))
    ctx.finish_deferred()
    labels = {n.name: _tensor_label(ctx, env.get(n)) for n in gm.graph.nodes}
    labels.update(ctx.extra_labels)
    # NB: get_attr values are parameters, not activations: an unused parameter must not become a row
    acts = [env.get(n) for n in gm.graph.nodes if n.op != "get_attr"]
    # ids a rule keeps for the rewrite (an attention module's heads) are activation axes inside the op
    acts += [AxisLabels((a,), (np.zeros(len(a), dtype=bool),)) for a in ctx.extra_labels.values()]
    return _group(ctx, labels, acts)


def _tensor_label(ctx: Ctx, v):
    """A get_attr node's label: its tensor's AxisLabels once a rule read it (the rewrite sizes it), else the ref."""
    if isinstance(v, ParamRef):
        return ctx.tensor_labs.get(ctx.alias.get(v.name, v.name), v)
    return v


def _act_ids(values: list) -> np.ndarray:
    # NB: labels share id arrays (elementwise ops pass them on, pinned axes are one cached array
    # per length): each array is taken once
    seen: set = set()
    arrays = [a for lab in labs_in(values) for a in lab.ids if id(a) not in seen and not seen.add(id(a))]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _group(ctx: Ctx, labels: dict, acts: list) -> ZigSet:
    uf = ctx.uf
    n = uf.size
    act = np.zeros(n, dtype=bool)
    act[uf.find(_act_ids(acts))] = True
    act[PIN] = False
    params = [o for o in ctx.owners if o.is_param]
    # NB: int32 owners, zigs and rows (a 70B LLaMA's hidden width alone is 6M kept
    # positions; int64 arrays of them set the analysis's peak memory)
    zig_of_root = np.full(n, -1, dtype=np.int32)
    row_of_root = np.full(n, -1, dtype=np.int32)
    empty = ZigSet((), tuple(ctx.pins), labels, tuple(ctx.owners), uf, zig_of_root, row_of_root,
                   tuple(ctx.weight_norms), dict(ctx.fills))
    if not params:
        return empty
    lens = np.array([len(o.ids) for o in params], dtype=np.int64)
    roots = uf.find(np.concatenate([o.ids for o in params]))
    keep = act[roots]
    roots = roots[keep]
    owner = np.repeat(np.arange(len(params), dtype=np.int32), lens)[keep]
    pos = np.concatenate([np.arange(k, dtype=np.int64) for k in lens.tolist()])[keep]  # index tensors: int64
    del keep
    # a class's signature: the (owner, count) pairs it holds, hashed as the sum of one random odd
    # salt per owner over its positions (count x salt, wrapping); equal signatures = one zig
    salts = np.random.default_rng(0x07F0).integers(1, 2**62, size=len(params), dtype=np.uint64) | np.uint64(1)
    sig = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(sig, roots, salts[owner])
    classes = np.nonzero(sig)[0]
    if classes.size == 0:
        return empty
    uniq, inv = unique(sig[classes], return_inverse=True)
    # order zigs by their first class (producer order), rows by class id inside a zig
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, classes)
    rank = np.empty(len(uniq), dtype=np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    zid = rank[inv]
    zig_of_root[classes] = zid
    counts = np.bincount(zid, minlength=len(uniq))
    srt = np.lexsort((classes, zid))
    zstart = np.concatenate([[0], np.cumsum(counts)[:-1]])
    row_of_root[classes[srt]] = np.arange(len(classes)) - np.repeat(zstart, counts)
    # every (zig, owner) segment, rows in order, positions in order inside a row
    z, row = zig_of_root[roots], row_of_root[roots]
    segments, order = _segments(z, owner, row, int(counts.max()) + 1, len(params))
    if order is not None:
        pos = pos[order]
    entries: list[list] = [[] for _ in range(len(uniq))]
    rows_of = counts.tolist()
    # NB: the index tensors are views of one array (disjoint slices), made without a copy each
    for zi, oi, sl in segments:
        o = params[oi]
        entries[zi].append((o.name, o.dim, torch.from_numpy(pos[sl].reshape(rows_of[zi], -1))))
    zigs = tuple(ZIG(int(counts[i]), tuple(entries[i])) for i in range(len(uniq)))
    return ZigSet(zigs, tuple(ctx.pins), labels, tuple(ctx.owners), uf, zig_of_root, row_of_root,
                  tuple(ctx.weight_norms), dict(ctx.fills))


def _segments(z: np.ndarray, owner: np.ndarray, row: np.ndarray, nrows: int, nowners: int,
              fast: bool = True) -> tuple[list, np.ndarray | None]:
    """The (zig, owner) segments of the positions, zig by zig: ``([(zig, owner, slice)], order)``.

    Positions come in (owner, pos) order. Segments follow a stable sort on (zig, owner, row):
    owners in order inside a zig, rows ascending inside a segment, pos ascending inside a row.
    The slices index the positions permuted by ``order`` (None: not permuted).
    """
    step = (np.diff(z) != 0) | (np.diff(row) < 0)
    new_owner = np.diff(owner) != 0
    if fast and not (step & ~new_owner).any():
        # each owner's run lies in one zig with its rows ascending (the usual case): the sort only
        # moves whole runs, so order one key per run instead of every position
        heads = np.concatenate([[0], np.nonzero(new_owner)[0] + 1])
        ends = np.append(heads[1:], len(z))
        runs = np.argsort(z[heads], kind="stable")
        return list(zip(z[heads][runs].tolist(), owner[heads][runs].tolist(),
                        [slice(a, b) for a, b in zip(heads[runs].tolist(), ends[runs].tolist())])), None
    order = np.argsort((z * nowners + owner) * nrows + row, kind="stable")
    z, owner = z[order], owner[order]
    cut = (np.nonzero((np.diff(z) != 0) | (np.diff(owner) != 0))[0] + 1).tolist()
    heads = [0] + cut
    return list(zip(z[heads].tolist(), owner[heads].tolist(),
                    [slice(a, b) for a, b in zip(heads, cut + [len(z)])])), order
