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
    * An in-place op (``add_``, ``copy_``) on a view (a slice, a select, a transpose, a cast that may
      return its input) writes the view's base too: ``_write_back`` gives the base the written
      entries' zeros, AND-ed with its own (sound whether the op shares the memory or not).
    * A reshape merging several channel axes keeps one as rows (the outermost); when that one ends
      pinned, the analysis runs again keeping the innermost there (``Ctx.merge_inner``, at most
      ``_MERGE_RUNS`` runs), and the run whose groups hold the most parameters is returned.
    * The model's outputs are pinned, except a *free* output's channels that are zero with their
      row (``free_outputs``: keys of the output, :func:`output_leaves`): the compressed model returns
      it without them (``ZigSet.free_outputs`` keeps its labels; ``passes.prune.output_keeps`` says
      which positions stay). Output keys are read off the graph's pytree output spec (torch.export,
      whose output node holds the flattened leaves) or off the output node's own structure (fx).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map_only

from .attention import find_head_splits
from .rules.linalg import bind_library_ops
from .channels import AxisLabels, Ctx, ParamRef, Pin, SymSize, WeightNormRef, false_mask, labs_in, leaves
from .nodes import mutates_input, view_base
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
class FreeOutput:
    """A model output that may come back narrower (``free_outputs``): the ``index``-th tensor of the
    flattened outputs (``tree_flatten``), under top-level ``key`` (a ModelOutput or dict key, a tuple
    index); ``label``: its channel labels (a position whose row is removed is zero, and dropped)."""

    index: int
    key: object
    label: AxisLabels = field(repr=False)


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
    free_outputs: tuple = field(default=(), repr=False)  # FreeOutput of every output that may narrow
    # (reshape node name, channel ids) of every tie made in blocks read at the example's sizes
    # (Ctx.sized_ties): the model's own class is checked at another size where they are removed
    sized_ties: tuple = field(default=(), repr=False)


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


def zero_invariant_groups(gm: fx.GraphModule, pin: tuple = (), free_outputs: tuple = ()) -> ZigSet:
    """Group analysis over a graph whose nodes carry ``meta['val']`` (see propagate_shapes).

    ``pin``: module or parameter names whose channels must not be removed. ``free_outputs``: keys of
    the model's output (:func:`output_leaves`) that may come back narrower: their channels that are
    zero with their row are not pinned (every other output's are).

    A reshape that merges several channel axes keeps the outermost one's rows and pins the others;
    where that axis ended pinned all the same, the analysis runs again keeping the innermost one
    there (``Ctx.merge_inner``), and the run whose groups hold more parameters is the answer.
    """
    bind_library_ops()
    runs, inner = [], frozenset()
    for _ in range(_MERGE_RUNS):
        zs, ctx = _analyse(gm, pin, inner, tuple(free_outputs))
        runs.append((zs, ctx))
        # NB: each run only flips merges whose kept axis is pinned in the end: the flip gives up
        # nothing that run kept, and what it frees may change other merges' outcome (hence a loop)
        flips = {name for name, ids in ctx.merges if (ctx.uf.find(ids) == PIN).all()} - inner
        if not flips:
            break
        log.debug("otofx: %d reshape(s) merged channel axes whose outer one ended pinned (%s): analysing again "
                  "with the inner one kept", len(flips), ", ".join(sorted(flips)[:4]))
        inner = inner | flips
    if len(runs) == 1:  # the common case: no merge to flip, nothing to compare
        return runs[0][0]
    # the first of the best: a later run wins only by freeing more
    return max(runs, key=lambda r: _removable(*r))[0]


_MERGE_RUNS = 3  # analyses at most: the first, and runs that flip merges (zero_invariant_groups)


def _removable(zs: ZigSet, ctx: Ctx) -> int:
    """How many parameter entries the groups of ``zs`` hold (what compression can remove)."""
    total = 0
    for z in zs.zigs:
        for name, dim, idx in z.params:
            shape = ctx.shape_of(ParamRef(name))
            total += idx.numel() * (math.prod(shape) // max(int(shape[dim]), 1))
    return total


def _analyse(gm: fx.GraphModule, pin: tuple, merge_inner: frozenset, free_outputs: tuple = ()) -> tuple:
    """One analysis walk: ``(ZigSet, Ctx)``."""
    ctx = Ctx(gm, merge_inner=merge_inner)
    free: tuple = ()
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
            free = _pin_outputs(ctx, gm, node, load, free_outputs)
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
                _write_back(env, src, env[node], node)
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
    zs = _group(ctx, labels, acts)
    return (dataclasses.replace(zs, free_outputs=free) if free else zs), ctx


def output_leaves(gm: fx.GraphModule, node: fx.Node | None = None) -> list:
    """``(key, leaf, index)`` of every leaf of the graph's output: ``key`` the top-level key of the
    model's output it sits under (a ModelOutput or dict key, a named-tuple field or a tuple index;
    None for a single tensor), ``leaf`` the output node's argument (a Node, or a constant), and
    ``index`` the position of its first value in the flattened output (``tree_flatten``).

    # NB: torch.export's output node holds the flattened leaves; the structure (a ModelOutput's
    # keys) is the graph's pytree output spec. fx's output node holds the structure itself.
    """
    node = node if node is not None else next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    if spec is not None:
        flat = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
        pairs = list(zip(_spec_keys(spec), flat))
    else:
        pairs = [(k, leaf) for k, v in _top_items(node.args[0]) for leaf in tree_flatten(v)[0]]
    out, index = [], 0
    for key, leaf in pairs:
        out.append((key, leaf, index))
        if isinstance(leaf, fx.Node) and "val" not in leaf.meta:
            index += 1
        else:
            index += len(tree_flatten(leaf.meta["val"] if isinstance(leaf, fx.Node) else leaf)[0])
    return out


def _spec_keys(spec) -> list:
    """The top-level key of every leaf of a pytree spec (see :func:`output_leaves`)."""
    if spec.is_leaf():
        return [None]
    ctx = spec.context
    if isinstance(ctx, (list, tuple)) and len(ctx) == spec.num_children:
        names = list(ctx)  # a dict's or a ModelOutput's keys
    elif hasattr(spec.type, "_fields"):
        names = list(spec.type._fields)
    else:
        names = list(range(spec.num_children))
    return [k for k, c in zip(names, spec.children()) for _ in range(c.num_leaves)]


def _top_items(out) -> list:
    """``(key, value)`` of the top level of an fx output structure (see :func:`output_leaves`)."""
    if isinstance(out, dict):
        return list(out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return list(zip(out._fields, out))
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    return [(None, out)]


def _pin_outputs(ctx: Ctx, gm: fx.GraphModule, node: fx.Node, load, free_outputs: tuple) -> tuple:
    """Pin the model's outputs but the channels of the ``free_outputs`` keys that are zero with their
    row (those may be dropped); the :class:`FreeOutput` of each free output."""
    kept, free = [], []
    for key, leaf, index in output_leaves(gm, node):
        val = _resolve(ctx, load(leaf))
        if key is None or key not in free_outputs or not isinstance(val, AxisLabels):
            kept.append(val)
            continue
        # NB: only a position that is zero whenever its row is zero can be dropped: the dense
        # model (its rows zeroed) returns zeros there; any other keeps its row whole
        ctx.pin([ids[~zero] for ids, zero in zip(val.ids, val.zero)],
                "model output (free_outputs: channels that are not zero with their row)")
        free.append(FreeOutput(index, key, val))
    ctx.pin(kept, "model output")
    return tuple(free)


def _write_back(env: dict, node: fx.Node, lab: AxisLabels, writer: fx.Node) -> None:
    """``node``'s value was written in place (by ``writer``) and is now ``lab``: the values it may
    share memory with (the bases it is a view of: ``x[1:] += y`` writes ``x``) get the written
    entries' zeros.

    Every base a view was read from keeps its ids (the view's are a part of them, so the write's ties
    reach the base already) and takes, on each axis, the entries zero (constant) both before and in
    what was written: the mask of the positions the view selects (a slice or narrow, an axis moved
    by a permute) is AND-ed with the written one, every other axis's with the written one as a
    whole. A view that does not map positions so (a reshape, a strided or computed slice) leaves
    nothing of the base zero, and its own bases neither.

    Every other view of those values taken before the write (``t = x.mT`` read after ``x[1:] += y``)
    shares the written memory too: nothing of it is zero any more (:func:`_forget_zeros`).

    # NB: a may-alias (a cast that returns its input unchanged, ``type_as``) is taken as sharing: the
    # AND is right whether it shares or copies
    """
    weak, chain = False, [node]
    for _ in range(64):
        base = view_base(node)
        if base is None:
            break
        old = env.get(base)
        if isinstance(old, AxisLabels):
            new = None if weak else _written(old, node, lab)
            if new is None:
                weak, new = True, _no_zeros(old)
            env[base] = lab = new
        else:  # a split's tuple (its entries are views of its input) or a python value: nothing to map
            weak = True
        node = base
        chain.append(node)
    _forget_zeros(env, chain, writer)


def _forget_zeros(env: dict, chain: list, writer: fx.Node) -> None:
    """The views already labelled (in ``env``) of the values in ``chain`` (a written view and the bases
    it was read from), but ``chain`` itself and ``writer`` (the in-place op), and their views in turn:
    no channel of theirs is zero or constant any more.

    # NB: the analysis follows the graph's edges, not its storages: a view read before the write and
    # used after it would keep zeros the write undid (sound here by forgetting them all)
    """
    done = set(chain) | {writer}
    todo = [u for c in chain for u in c.users if u not in done and view_base(u) is c]
    while todo:
        u = todo.pop()
        if u in done or u not in env:
            continue
        done.add(u)
        v = env[u]
        env[u] = type(v)(map(_no_zeros, v)) if isinstance(v, (tuple, list)) else _no_zeros(v)
        todo += [w for w in u.users if w not in done and view_base(w) is u]


def _no_zeros(v):
    """``v`` (a label) with the same ids and no channel zero or constant; anything else as it is."""
    return AxisLabels(v.ids, tuple(false_mask(n) for n in v.shape)) if isinstance(v, AxisLabels) else v


def _written(old: AxisLabels, view: fx.Node, lab: AxisLabels) -> AxisLabels | None:
    """``old`` (a view's base) after the view's entries became ``lab``, or None when the view's
    positions are not mapped here (see ``_write_back``)."""
    from .rules.common import _ax

    name = view.target if isinstance(view.target, str) else getattr(view.target, "__name__", "")
    name = name.split(".")[0]
    args = view.args
    ndim = old.ndim
    zero = [z.copy() for z in old.zero]
    const = [old.fixed(d).copy() for d in range(ndim)]
    axes = None  # base axis -> (view axis, positions along the base axis or None for all of it)
    if name in ("slice", "narrow") and len(args) >= 2 and isinstance(args[1], int):
        d = _ax(args[1], ndim)
        if name == "slice":
            start, end = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
            step = args[4] if len(args) > 4 else 1
        else:
            start = args[2] if len(args) > 2 else None
            end = start + args[3] if isinstance(start, int) and len(args) > 3 and isinstance(args[3], int) else "?"
            step = 1
        if not all(isinstance(v, (int, type(None))) and not isinstance(v, bool) for v in (start, end, step)):
            return None
        pos = np.arange(*slice(start, end, step).indices(old.shape[d]))
        axes = {a: (a, pos if a == d else None) for a in range(ndim)}
    elif name == "select" and len(args) >= 3 and isinstance(args[1], int) and isinstance(args[2], int):
        d = _ax(args[1], ndim)
        i = _ax(args[2], old.shape[d])
        zero[d][i] = const[d][i] = False  # NB: the written slice has no axis d: nothing says it is zero
        axes = {a: (a - (a > d), None) for a in range(ndim) if a != d}
    elif name in ("permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "moveaxis"):
        from .rules.shape import _permute_dims

        kind = {"transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "t": "t",
                "movedim": "movedim", "moveaxis": "movedim"}.get(name, "permute")
        try:
            perm = _permute_dims(kind, ndim, tuple(args[1:]))
        except (TypeError, IndexError):
            return None
        axes = {p: (j, None) for j, p in enumerate(perm)}
    elif name in ("getitem", "__getitem__") and len(args) >= 2:
        from .rules.indexing import _index_parts

        axes, v = {}, 0
        for a, p in _index_parts(args[1], ndim):
            if a is None:  # a new axis of the view
                v += 1
            elif isinstance(p, slice) and all(isinstance(e, (int, type(None))) and not isinstance(e, bool)
                                              for e in (p.start, p.stop, p.step)):
                axes[a] = (v, np.arange(*p.indices(old.shape[a])))
                v += 1
            elif isinstance(p, int) and not isinstance(p, bool):
                zero[a][_ax(p, old.shape[a])] = const[a][_ax(p, old.shape[a])] = False
            else:
                return None
    elif old.shape == lab.shape and name != "as_strided":
        # the same positions: a cast, an in-place op's result, an alias, a view to the same shape
        axes = {a: (a, None) for a in range(ndim)}
    if axes is None or lab.ndim != len({v for v, _ in axes.values()}):
        return None
    for a, (v, pos) in axes.items():
        if lab.shape[v] != (len(pos) if pos is not None else old.shape[a]):
            return None
        if pos is None:
            zero[a] &= lab.zero[v]
            const[a] &= lab.fixed(v)
        else:
            zero[a][pos] &= lab.zero[v]
            const[a][pos] &= lab.fixed(v)
    return AxisLabels(old.ids, tuple(zero), tuple(const) if old.const is not None or lab.const is not None else None)


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
                   tuple(ctx.weight_norms), dict(ctx.fills), sized_ties=tuple(ctx.sized_ties))
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
                  tuple(ctx.weight_norms), dict(ctx.fills), sized_ties=tuple(ctx.sized_ties))


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
