"""The public entry point: ``otofx.OTO(model, example_inputs)``.

A thin layer over :mod:`otofx.pipeline`: construction runs ``pipeline.analysis()`` (Capture ->
propagate_shapes -> find_zigs), ``compress()`` runs plan_zero_rows, then either
:func:`otofx.rebuild.rebuild` (the module form: a re-sized copy of the user's model, its own class)
or prune (the graph form, then any extra passes, e.g. ``pipeline.eliminate_dead_code``), and
``verify()``.

Internals:
    * Analysis needs shapes only: a model built under ``torch.device("meta")`` (a 70B LLaMA config)
      is analysed without any weight memory; ``compress``, ``verify``, ``plan`` and ``row_norms``
      raise an InputError saying how to materialise it. # NB: torch.export's graph holds the
      model's tensor objects; ``to_empty`` replaces them, so ``_sync`` re-points the graph at the
      model's new (real) tensors.
    * The user's model is never mutated: analysis runs on meta tensors, and verification runs the
      captured graph (which shares the user's submodules) under ``no_grad`` in eval mode, with each
      module's training flag restored afterwards.
    * ``compress`` reads the *current* parameter values, so it can be called after any number of
      training steps.
    * ``form="auto"`` tries the module form first; when its forward fails or differs on the example
      inputs, a copy keeping the zero rows of the groups blamed for it (``_module_keeping_rows``),
      if it removes at least ``OWN_CLASS_SHARE`` of what the graph removes; else the graph form
      (logged at WARNING). A blamed module's copies (same class, path pattern and tensor shapes: the
      blocks of a stack) keep the same groups in the same step, the guess let go again in one try
      when the copy verifies without it (``_let_go``); where a blamed module's weights read widths
      equal in the model (an attention reading its head width off its stream), one more copy keeps
      only enough of the kept groups' zero rows to keep them equal (``_tied_rows``); the layer
      norms' constant fills are read once per ``compress()``.
      The module form is compared with the captured graph with the KV cache off (as captured);
      the returned model keeps the user's ``use_cache``.
    * A free output (``free_outputs``) comes back without the removed channels: verification
      indexes the reference's at the kept positions under the plan each compressed model was made
      with (``self._plans``, weak keys; ``passes.prune.output_keeps``), and compress() logs them.
    * ``self.state`` is the analysis State (graph, groups, per-pass records); compress starts from
      it with the current weights, so one analysis serves any number of compressions.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import weakref

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from otofx import pipeline
from otofx.capture import (DATA_BRANCHES, SIZE_BOUNDS, STATIC_IMAGE_SIZES, _first_line, _no_kv_cache, normalize_inputs,
                           said_branches)
from otofx.capture_parts import PARTS
from otofx.errors import CaptureError, InputError, OTOError, VerificationError
from otofx.passes.nodes import ModuleTensors, get_path, layer_norm_params, module_tensors, set_path, unread_parameters
from otofx.passes.modules import PrunedLayerNorm, PrunedOwnLayerNorm
from otofx.passes.prune import (Plan, output_keeps, plan_rows, positional_fill_groups, row_norms, sized_tie_groups,
                                zero_row_plan,
                                zero_rows)
from otofx.passes.resize import inline_grn_groups, inline_layer_norm_groups, inline_standardisation_groups
from otofx.passes.shapes import ShapePropError
from otofx.passes.zigs import ZIG, ZigSet
from otofx.verify import (collected_replays, compare, compare_all, eval_mode, first_wrong_module, input_sets,
                          narrow_outputs, outputs_close, run_eval, say_replays)
from otofx.rebuild import RebuildError, copy_training_flags, rebuild

log = logging.getLogger("otofx")


class _SizedTieError(RebuildError):
    """The own class differs at another input size where a reshape tied channels in blocks read at the
    example's size (:meth:`OTO._check_sized_ties`); the search keeps those widths."""

_FORMS = ("auto", "module", "graph")
# NB: each try of the own-class search (a step, or a kept group let go again) rebuilds and runs the
# model: a bound on the cost for a model whose own forward cannot take any new width (it returns the
# graph form after)
_KEEP_SEARCH_TRIES = 16
# compress(form="auto") returns the own class with the rows its search kept when it removes at least
# this share of the parameters the graph form removes; below it, the graph (the widths layer norms
# normalise are kept whatever they cost, as before the search: a language model keeps generate())
OWN_CLASS_SHARE = 0.5
_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _without_bug_tail(text: str) -> str:
    """``text`` without verification's "a bug in otofx" tail: a failed own-class check is the model's
    code at the new widths, and the graph form is verified on its own."""
    return text.split(" If the pass is otofx's")[0]


def _why(error: Exception) -> str:
    return _without_bug_tail(_first_line(error))


def _count(plan: Plan, groups) -> int:
    return sum(len(plan.removed[i]) for i in groups)


def _pattern(path: str) -> str:
    """``path`` with each index of a ModuleList or Sequential written ``*``
    (``stages.1.blocks.3.attn`` -> ``stages.*.blocks.*.attn``)."""
    return ".".join("*" if part.isdigit() else part for part in path.split(".")) if path else path


def _copies(model: torch.nn.Module, path: str) -> list:
    """``path`` and the other modules of ``model`` of its class at a path of the same pattern
    (:func:`_pattern`) whose tensors have the same names and shapes: the same block in each place
    of a stack; just ``[path]`` when it has none.

    # NB: the same class at another width is another case (a stage's attention with another head
    # count or reduction: Twins' stages, DaViT's), whose code may take its new widths"""
    if _pattern(path) == path:
        return [path]
    mods = dict(model.named_modules())
    own = _copy_key(path, mods[path])
    return [path] + [n for n, m in mods.items() if n != path and _copy_key(n, m) == own]


def _copy_key(path: str, module: torch.nn.Module) -> tuple:
    """What the copies of a module (:func:`_copies`) have in common: path pattern, class, and the
    names and shapes of its tensors."""
    return (_pattern(path), type(module),
            tuple((n, tuple(t.shape)) for n, t in (*module.named_parameters(), *module.named_buffers())))


def _kinds(zigs: tuple, groups: set) -> list:
    """``groups`` split by what each is in its block: groups whose parameters have the same names but
    for the indices of the blocks (:func:`_pattern`) are one kind (a block's MLP width in each copy
    of the block); in the order of their first group."""
    kinds: dict = {}
    for i in sorted(groups):
        key = frozenset((_pattern(name), dim) for name, dim, _ in zigs[i].params)
        kinds.setdefault(key, set()).add(i)
    return list(kinds.values())


def _owner(zig: ZIG) -> str:
    """The innermost module holding every parameter of ``zig`` (``""``: the model)."""
    paths = [name.rpartition(".")[0].split(".") for name, _, _ in zig.params]
    common = paths[0] if paths else []
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(c for c in common if c)


def _groups_to_keep(zigs: tuple, removing: list, keep: set, blame, copies=()) -> tuple:
    """The groups to keep next when the own class goes wrong at ``blame`` (:class:`otofx.verify.Blame`):
    the first of these that adds a group not in ``keep``: the groups with most of their parameter
    slices inside the call the failing code read last (``blame.after``: the projection whose heads a
    split cuts), inside the failing module (a head or MLP width of that block), every group with a
    slice inside it (the residual stream it reads), then the same for its parent, up to (not
    including) the top module.

    Returns ``(add, wide, level)``: ``add`` the groups of that level (``keep``'s among them), ``wide``
    those and the groups of the same level in ``copies`` (the other modules of the blamed module's
    class and path pattern, :func:`_copies`: the call, the module or the parent at the same place in
    each), and the level's place in that order (0: the call read last, 1: the module, 2: its
    groups, ...); nothing (and None) when every level is in ``keep``."""
    names = {i: [name for name, _, _ in zigs[i].params] for i in removing}

    def share(scope: str) -> dict:
        return {i: sum(n == scope or n.startswith(scope + ".") for n in ns) / max(len(ns), 1) for i, ns in names.items()}

    def level(kind: str, scope: str) -> set:
        if kind == "local":
            return {i for i, f in share(scope).items() if f >= 0.5}
        return {i for i, f in share(scope).items() if f > 0}

    def moved(scope: str, copy: str) -> str:
        """``scope`` (the blamed module, a call inside it, or a parent of it) at ``copy``'s place"""
        if scope == blame.module or scope.startswith(blame.module + "."):
            return copy + scope[len(blame.module):]
        return ".".join(copy.split(".")[:scope.count(".") + 1])

    levels = [(0, "local", blame.after)] if blame.after else []
    scope, at = blame.module, 1
    while scope:
        levels += [(at, "local", scope), (at + 1, "touching", scope)]
        scope, at = scope.rpartition(".")[0], at + 2
    for at, kind, scope in levels:
        add = level(kind, scope)
        if add - keep:
            wide = set(add)
            for copy in copies:
                wide |= level(kind, moved(scope, copy))
            return add, wide, at
    return set(), set(), None


def _tied_rows(model: torch.nn.Module, plan: Plan, keep: set, blamed: list, keepable: set) -> tuple | None:
    """The plan's rows with, instead of the groups ``keep`` whole, just enough of the zero rows of
    the groups feeding the blamed modules kept that their weights' input widths which are equal in
    the model are equal again: an attention whose own code reads its inner width off its input
    (``reshape(B, N, C)`` with ``C = x.shape[-1]``: EVA's; ``C // num_heads`` as the head width:
    CoaT's factorised attention) takes its stream and its heads removed only at one width. None
    when no such width can be reached, or when the plan's widths are already equal there.

    Each blamed module and its copies (:func:`_copies`: the blocks of a stack, which share the
    stream) are visited until no width changes: a width below the widest of its class of equal
    widths gets rows back (whole rows of its groups: a head is ``k`` channels, so a class may rise
    to the next width its heads reach, and the other members follow).

    # NB: only zero rows are kept (``keepable``): exact whatever the count; the copy is checked as
    every try of the search is"""
    mods = dict(model.named_modules())
    paths = list(dict.fromkeys(c for b in blamed if b for c in _copies(model, b)))
    at: dict = {}  # (param name, dim) -> [(group, channels a row holds there)]
    for i, z in enumerate(plan.zigset.zigs):
        for name, dim, index in z.params:
            if dim == 1:
                at.setdefault(name, []).append((i, index.shape[1]))
    classes = []  # per module: {full width: [param name]}
    for path in paths:
        widths: dict = {}
        for n, prm in mods[path].named_parameters():
            name = f"{path}.{n}"
            if prm.dim() >= 2 and name in at:
                widths.setdefault(prm.shape[1], []).append(name)
        classes += [(full, names) for full, names in widths.items() if len(names) > 1]
    if not classes:
        return None
    involved = {i for _, names in classes for name in names for i, _ in at[name]}
    cnt = {i: len(plan.removed[i]) for i in involved}

    def width(full: int, name: str) -> int:
        return full - sum(cnt[i] * k for i, k in at[name])

    for _ in range(8 * len(classes) + 8):
        changed = False
        for full, names in classes:
            target = max(width(full, n) for n in names)
            for name in names:
                need = target - width(full, name)
                # NB: the widest rows first, then the narrowest rounds up (a head past the target:
                # the class follows it on the next round)
                for i, k in sorted(at[name], key=lambda ik: -ik[1]):
                    if need <= 0:
                        break
                    if not cnt[i]:
                        continue
                    if i not in keepable:
                        return None
                    n = min(cnt[i], -(-need // k) if k == min(kk for _, kk in at[name]) else need // k)
                    cnt[i] -= n
                    need -= n * k
                    changed |= n > 0
                if need > 0:
                    return None
        if not changed:
            break
    else:
        return None
    if all(cnt[i] == len(plan.removed[i]) for i in involved):
        return None
    return tuple(r[:cnt[i]] if i in involved else r[:0] if i in keep else r for i, r in enumerate(plan.removed))


@dataclasses.dataclass
class _Step:
    """One step of the own-class search: the groups kept at the blamed module (``add``), those kept in
    all (``groups``: with the same level in its copies), what the blamed module has in common with
    its copies (``kind``: :func:`_copy_key`) and the level (:func:`_groups_to_keep`)."""

    add: set
    groups: set
    kind: tuple
    level: int


def _removed_parameters(gm: torch.nn.Module, plan: Plan, skip=()) -> int:
    """How many parameters of ``gm`` the plan's rows hold (less the groups ``skip``): each tensor
    counted once, a weight losing rows and columns counted by what is left of it."""
    cut: dict = {}
    for i, (z, rows) in enumerate(zip(plan.zigset.zigs, plan.removed)):
        if i in skip or not len(rows):
            continue
        for name, dim, index in z.params:
            cut.setdefault(name, {}).setdefault(dim, set()).update(index[rows].flatten().tolist())
    total = 0
    for name, dims in cut.items():
        try:
            p = get_path(gm, name)
        except AttributeError:
            continue
        if not isinstance(p, torch.nn.Parameter):  # NB: a buffer (a position table) is not a parameter
            continue
        shape = p.shape
        kept = 1
        for d, n in enumerate(shape):
            kept *= n - len(dims.get(d, ()))
        total += math.prod(shape) - kept
    return total


def _check_params(model: torch.nn.Module, held: ModuleTensors | None = None) -> None:
    """Floating-point parameters only; any device, the meta device included (analysis needs shapes only).
    No weight recomputed by a spectral-norm hook (``torch.nn.utils.spectral_norm``, deprecated): the
    graph would read a tensor that is no parameter, and the copy could not be made (the deprecated
    ``torch.nn.utils.weight_norm`` hook is followed: ``passes.weightnorm``)."""
    held = held or module_tensors(model)
    for name, p in held.params:
        if p.dtype not in _FLOAT_TYPES:
            raise InputError(f"parameter '{name}' has dtype {p.dtype}; otofx supports floating-point parameters only")
    for name, m in held.modules.items():
        if not m._forward_pre_hooks:
            continue
        hooks = [h for h in m._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm"
                 and type(h).__module__.startswith("torch.nn.utils")]
        if hooks:
            raise InputError(
                f"module '{name or type(model).__name__}' uses torch.nn.utils.spectral_norm (a hook recomputes its "
                f"'{hooks[0].name}' before each call, so it is no parameter otofx can slice): fold it with "
                f"torch.nn.utils.remove_spectral_norm(module) first; torch.nn.utils.parametrizations.spectral_norm "
                f"is kept whole (pinned, and the report names it)")


def _meta_tensor(model: torch.nn.Module, held: ModuleTensors | None = None) -> str | None:
    """The name of the first parameter or buffer of ``model`` on the meta device, or None."""
    held = held or module_tensors(model)
    for name, t in held.params + held.buffers:
        if t.device.type == "meta":
            return name
    return None


def _need_weights(model: torch.nn.Module, what: str, inputs=()) -> None:
    """Raise a clear InputError when ``what`` (compress, verify, plan ...) meets meta tensors."""
    name = _meta_tensor(model)
    if name is not None:
        raise InputError(
            f"{what} needs real weights, but '{name}' of {type(model).__name__} is on the meta device (the "
            "model was analysed without weights, which is all OTO(model, x) needs). Materialise it first: "
            "model.to_empty(device='cpu') and then load or initialise the weights (model.load_state_dict(sd, "
            "assign=True), or build it with transformers' from_pretrained), then call this again.")
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor) and t.device.type == "meta"]
    if leaves:
        raise InputError(f"{what} runs the model on the example inputs, but they are on the meta device: give "
                         "OTO real example inputs, or call compress(verify=False)")


def _retarget_meta(gm: fx.GraphModule, device: torch.device) -> None:
    """Replace the meta device that tracing baked into ``gm``'s nodes (``arange(..., device=meta)``,
    export's tensor-metadata asserts) with ``device``, where the materialised weights live."""
    def swap(a):
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    changed = False
    for n in gm.graph.nodes:
        args, kwargs = fx.node.map_aggregate(n.args, swap), fx.node.map_aggregate(n.kwargs, swap)
        if kwargs.get("device") == "meta":
            kwargs = {**kwargs, "device": device}
        if args != n.args or kwargs != n.kwargs:
            n.args, n.kwargs, changed = tuple(args), dict(kwargs), True
    if changed:
        gm.recompile()


def _runs(model: torch.nn.Module, example_inputs) -> bool:
    """Whether ``model`` runs on ``example_inputs`` in eval mode."""
    args, kwargs = normalize_inputs(example_inputs)
    try:
        run_eval(model, args, kwargs)
    except Exception:  # noqa: BLE001
        return False
    return True


def _exported_instead(model: torch.nn.Module, inputs, pin, free, error: Exception):
    """The analysis of ``model``'s torch.export capture, when its symbolic_trace graph (what the "auto"
    front-end takes first) did not run the example (``error``); None when the graph was not symbolic_trace's
    or the export's analysis fails too (the caller captures in parts then).

    # NB: a proxy answers Python's questions its own way: ``if cond["shift"] is not None`` holds for the
    # proxy of a dict whose entry is None (diffusers' PixArt: ``added_cond_kwargs={"resolution": None}``),
    # and the trace takes a branch the example does not; export runs the model's code on the example
    """
    from otofx.capture import trace

    try:
        trace(model)
    except Exception:  # noqa: BLE001 - the failing graph was not symbolic_trace's
        return None
    try:
        state = pipeline.analysis("export").run(model, inputs, pin=tuple(pin), free_outputs=free)
    except Exception as e:  # noqa: BLE001
        log.info("otofx: the symbolic_trace graph of %s does not run the example (%s), nor does torch.export's "
                 "analysis (%s: %s)", type(model).__name__, _first_line(error), type(e).__name__, _first_line(e))
        return None
    log.info("otofx: the symbolic_trace graph of %s does not run the example (%s); captured by torch.export",
             type(model).__name__, _first_line(error))
    return state


def _tiled_like(example, shaped):
    """``example``'s tensors tiled to the shapes of ``shaped`` (same structure), as ``(args, kwargs)``."""
    from otofx.capture import tile_to

    flat, spec = tree_flatten(example)
    like = tree_flatten(shaped)[0]
    out = [tile_to(t, tuple(m.shape)) if isinstance(t, torch.Tensor) and isinstance(m, torch.Tensor) else m
           for t, m in zip(flat, like)]
    a, k = tree_unflatten(out, spec)
    return tuple(a), dict(k)


def _resized_inputs(args: tuple, kwargs: dict) -> list:
    """``[(what, (args, kwargs))]``: the example inputs at another size a model may take, for checking
    an own class whose layer norms hold constants that differ from position to position: every image
    (a float tensor of rank >= 4) at twice its height and width (its last two sizes: a clip's frames and
    channels come before them, in either order); without one, every sequence (an integer or bool tensor of
    rank 2, a float tensor of rank 3) at twice its length and batch (its first two sizes: sequence-first
    layouts, ``[L, B]``, as well as ``[B, L]``). Tensors are tiled."""
    from otofx.capture import tile_to

    flat, spec = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    images = any(t.is_floating_point() and t.dim() >= 4 for t in tensors)

    def grown(t):
        if not isinstance(t, torch.Tensor):
            return t
        if images:
            return tile_to(t, (*t.shape[:-2], 2 * t.shape[-2], 2 * t.shape[-1])) \
                if t.is_floating_point() and t.dim() >= 4 else t
        if (t.dim() == 2 and not t.is_floating_point()) or (t.dim() == 3 and t.is_floating_point()):
            return tile_to(t, (2 * t.shape[0], 2 * t.shape[1], *t.shape[2:]))
        return t

    out = [grown(t) for t in flat]
    if all(o is t for o, t in zip(out, flat)):
        return []
    a, k = tree_unflatten(out, spec)
    what = "twice the example's image size" if images else "twice the example's sequence length and batch"
    return [(what, (tuple(a), dict(k)))]


def _positional_fills(model: torch.nn.Module) -> list:
    """Names of ``model``'s pruned layer norms whose filled constants differ along an axis before the
    last (from position to position)."""
    return [name for name, m in model.named_modules() if isinstance(m, (PrunedLayerNorm, PrunedOwnLayerNorm))
            and m.fill is not None and any(d > 1 for d in m.fill.shape[:-1])]


class OTO:
    """Capture ``model`` and find its zero-invariant groups; ``compress()`` removes zero rows.

    ``pin``: names of parameters or modules whose channels stay whole, or module types
    (``torch.nn.LayerNorm``) standing for every module of that type.

    ``free_outputs``: keys of the model's output (a ModelOutput's or a dict's keys, a tuple's
    indices) that the compressed model may return narrower: their channels that are zero with their
    row go (the dense zeroed model returns zeros there), the others stay. ``"auto"`` (the default):
    a Hugging Face encoder-decoder's ``encoder_last_hidden_state`` (its hidden width is then
    removable); ``()`` keeps every output's width. Logits and every other output keep theirs."""

    def __init__(self, model: torch.nn.Module, example_inputs, *, pin=(), frontend: str = "auto",
                 free_outputs="auto"):
        held = module_tensors(model)
        _check_params(model, held)
        self._on_meta = _meta_tensor(model, held) is not None  # analysed without weights
        # NB: on a meta model, trace with meta inputs (a conv refuses meta weights with CPU inputs)
        # and keep the user's inputs for verification once the model is materialised
        inputs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t,
                          example_inputs) if self._on_meta else example_inputs
        free = free_outputs if isinstance(free_outputs, str) else tuple(free_outputs)
        try:
            self.state: pipeline.State = pipeline.analysis(frontend).run(model, inputs, pin=tuple(pin),
                                                                         free_outputs=free)
        except ShapePropError as e:
            # NB: a graph captured along the example's branch may not run that branch again (draft_export
            # decided a count of boxes past a threshold on its own run: Faster R-CNN's 511 proposals, 512
            # in the graph's); the parts around such code are analysed instead, when the model runs
            if frontend != "auto" or self._on_meta or not _runs(model, inputs):
                raise
            state = _exported_instead(model, inputs, pin, free, e)
            if state is None:
                state = pipeline.analysis("parts").run(model, inputs, pin=tuple(pin), free_outputs=free)
                if not state.get(pipeline.ZIGSET).zigs:
                    raise
                log.warning("otofx: the analysis of %s's captured graph failed (%s); captured in parts instead (%s), "
                            "whose outputs keep their widths", type(model).__name__, _first_line(e),
                            ", ".join(state.gm.meta[PARTS].paths))
            self.state = state
        parts = self.state.gm.meta.get(PARTS)
        if parts is not None and not parts.asked and not self.state.get(pipeline.ZIGSET).zigs:
            # NB: parts whose every channel crosses to another part (conv, NumPy, conv) teach nothing:
            # the whole model's capture error says what to change
            raise CaptureError(f"{parts.why}\n  In parts ({', '.join(parts.paths)}): no group either, every "
                               "channel crosses between parts.")
        if self._on_meta:
            args, kwargs = normalize_inputs(example_inputs)
            # NB: the second-shape inputs were tiled from the meta copies; tile the user's own
            more = tuple(_tiled_like((args, kwargs), m) for m in self.state.more_inputs)
            self.state = self.state.replace(args=args, kwargs=kwargs, more_inputs=more)
        self.model = model
        self.frontend = self.state.frontend
        self._args, self._kwargs = self.state.args, self.state.kwargs
        self.graph_module: fx.GraphModule = self.state.gm
        self.zigset: ZigSet = self.state.get(pipeline.ZIGSET)
        # NB: parameters the example input never reached (a vision tower under a text-only input):
        # no rule saw them, so the groups do not include them and compress() leaves them as they are
        self.unread = unread_parameters(self.graph_module, model, also_read=self._mirrored(model))
        self._optimizers = []  # weak references to the DHSPG optimizers made by self.dhspg()
        # compressed model -> the plan it was made with (its free outputs' kept channels)
        self._plans = weakref.WeakKeyDictionary()

    def _mirrored(self, model: torch.nn.Module) -> set:
        """Parameters of saved originals (peft's ``modules_to_save``) that compress() slices as their copy
        (``otofx.rebuild.mirrored_originals``): not unread, though the forward never calls them."""
        from otofx.rebuild import mirrored_originals

        dims: dict = {}
        for z in self.zigset.zigs:
            for name, dim, _ in z.params:
                dims.setdefault(name, set()).add(dim)
        out = set()
        for weight in mirrored_originals(model, dims):
            prefix = weight.rsplit(".", 1)[0]
            out.update(f"{prefix}.{k}" for k, _ in model.get_submodule(prefix).named_parameters())
        return out

    # -- analysis results -----------------------------------------------------------------------
    @property
    def groups(self) -> tuple[ZIG, ...]:
        return self.zigset.zigs

    @property
    def pinned(self):
        return self.zigset.pinned

    @property
    def free_outputs(self) -> tuple:
        """The outputs the compressed model may return narrower (``passes.zigs.FreeOutput``: key, index)."""
        return self.zigset.free_outputs

    def report(self, blocks=None) -> str:
        """Groups and pins as tables; ``blocks`` (an ``otofx.admm.find_blocks`` result) adds the block groups."""
        from otofx.report import report

        return report(self, blocks=blocks)

    def visualize(self, path, **kw):
        """Draw the captured graph with every group in its own colour, pinned nodes marked with the
        reason and each group's zero rows (:func:`otofx.visualize.visualize`: .svg, .html or .dot)."""
        from otofx.visualize import visualize

        return visualize(self, path, **kw)

    def row_norms(self) -> list:
        _need_weights(self.model, "OTO.row_norms()")
        return row_norms(self.zigset, self.model)

    # -- compression ----------------------------------------------------------------------------
    def _sync(self) -> fx.GraphModule:
        """The captured graph with the model's current values (export copies tensors)."""
        gm = self.graph_module
        if self.frontend != "symbolic_trace":
            with torch.no_grad():
                src = dict(self.model.named_parameters())
                src.update(dict(self.model.named_buffers()))
                for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
                    if name in src and src[name] is not t:
                        if t.device.type == "meta" and src[name].device.type != "meta":
                            set_path(gm, name, src[name])  # analysed on meta, materialised since
                        else:
                            t.copy_(src[name])
        if self._on_meta and _meta_tensor(self.model) is None:
            _retarget_meta(gm, next((t.device for t in self.model.parameters()), torch.device("cpu")))
            self._on_meta = False
        return gm

    def plan(self) -> Plan:
        _need_weights(self.model, "OTO.plan()")
        return zero_row_plan(self.zigset, self.model)

    def compress(self, verify: bool = True, plan: Plan | None = None, passes=(), form: str = "auto"):
        """A smaller model without the rows whose parameters are all zero (or ``plan``'s rows).

        ``form``: ``"module"`` gives an instance of the model's own class (a re-sized copy: its
        ``forward``, ``generate`` and KV cache included), ``"graph"`` the compressed
        ``torch.fx.GraphModule``, and ``"auto"`` (the default) the module when it passes
        verification, else the graph (the reason is logged on the ``otofx`` logger). A module whose
        forward cannot take some widths keeps those groups' zero rows (a warning names where);
        ``"auto"`` takes it when it removes at least ``OWN_CLASS_SHARE`` of what the graph removes.
        ``passes``: extra pipeline passes run on the compressed graph before verification (e.g.
        ``pipeline.GraphPass(torch.fx.experimental.optimization.fuse)`` to fold BN into conv); they
        imply the graph form. ``verify=False`` skips the value check (``"auto"`` still runs the
        module form once on the example inputs to choose).

        A free output (``OTO(..., free_outputs=...)``, by default a Hugging Face encoder-decoder's
        ``encoder_last_hidden_state``) comes back without its removed channels (logged at INFO).
        """
        with collected_replays() as replays:
            small = self._compress(verify, plan, passes, form)
        say_replays(replays)
        self._say_free(small)
        return small

    def _compress(self, verify: bool, plan: Plan | None, passes, form: str):
        """:meth:`compress` itself."""
        from otofx import distributed

        if distributed.is_sharded(self.model):  # FSDP2 / tensor parallel: gather full tensors (every rank calls)
            return distributed.compress_sharded(self, verify=verify, plan=plan, passes=passes, form=form)
        if form not in _FORMS:
            raise InputError(f"compress(form={form!r}): choose one of {_FORMS}")
        if passes and form == "module":
            raise InputError("compress(passes=...) runs graph passes, which give the graph form: "
                             "drop form='module' or the passes")
        _check_params(self.model)
        _need_weights(self.model, "OTO.compress()", (self._args, self._kwargs) if verify else ())
        self._warn_below_target()
        self._warn_unread()
        parts = self.graph_module.meta.get(PARTS)
        if parts is not None:
            if form == "graph" or passes:
                raise InputError(
                    f"compress({'passes=...' if passes else 'form=' + repr(form)}): {type(self.model).__name__} was "
                    f"captured in parts ({', '.join(parts.paths)}); its graph holds the parts side by side, not the "
                    "forward that joins them, so there is no graph form: form='module' (or the default 'auto') "
                    "gives the model's own class with the parts re-sized")
            form = "module"
        branches = self.graph_module.meta.get(DATA_BRANCHES)
        if branches:
            # NB: the analysis saw the example's branch only: the graph raises on another, the model's
            # own class would run it unchecked (a layer of another branch may read pruned channels)
            said = said_branches(branches)
            refused = self._graph_refuses() if form == "auto" and verify else None
            if refused is not None:
                # NB: the weights changed which branch the example takes (a count of boxes is now 0):
                # the graph refuses its own example, the model's own class runs the branch it takes now
                log.warning("otofx: compress() returns the model's own class: %s branches on tensor values (%s), "
                            "and at the current weights the example takes another branch than the graph holds "
                            "(%s). Its other branches were not analysed", type(self.model).__name__, said, refused)
                form = "module"
            elif form == "auto":
                log.warning("otofx: compress() returns the graph: %s branches on tensor values (%s), the analysis "
                            "saw the example's branch, and the graph raises on an input that takes another. "
                            "form='module' gives the model's own class, exact on inputs that take the same branch.",
                            type(self.model).__name__, said)
                form = "graph"
            elif form == "module":
                log.warning("otofx: %s branches on tensor values (%s): its compressed class is exact on inputs that "
                            "take the example's branch; other branches were not analysed", type(self.model).__name__,
                            said)
        if form != "graph" and not passes:
            check, rtol = verify or form == "auto", 1e-4 if verify else float("inf")
            # NB: the layer norms' constant fills are read off one run of the graph, for every copy
            # the search makes
            failed, fills, moved = [], {}, []
            try:
                try:
                    small = self._compress_module(check, plan, rtol=rtol, failed=failed, fills=fills, moved=moved)
                except (RebuildError, VerificationError) as first_error:
                    if not moved:
                        raise
                    # NB: the held sizes that followed the graph's literals are a guess: a copy that
                    # verifies without them is the one to keep (the search keeps them otherwise)
                    log.info("otofx: %s's copy with %d held size(s) following the graph (%s) fails; trying without "
                             "them", type(self.model).__name__, len(moved),
                             ", ".join(f"{m or type(self.model).__name__}.{a}" for m, a in moved[:3]))
                    try:
                        small = self._compress_module(check, plan, rtol=rtol, fills=fills, follow_literals=False)
                    except (RebuildError, VerificationError):
                        raise first_error from None
                bad = self._other_size_branch(small, rtol) if check else None
                if bad is None:
                    return small
                if form == "module":
                    log.warning("otofx: the compressed %s is exact on the sizes the capture admits; %s",
                                type(self.model).__name__, bad)
                    return small
                raise VerificationError(f"{bad}. The graph refuses sizes the capture did not admit "
                                        f"(ShapeError); form='module' gives the model's own class anyway")
            except (RebuildError, VerificationError) as e:
                short: list = []
                small = self._module_keeping_rows(e, check, plan, rtol, OWN_CLASS_SHARE if form == "auto" else 0.0,
                                                  failed[-1] if failed else None, fills, short)
                if small is not None:
                    return small
                if form == "module":
                    if not isinstance(e, VerificationError):
                        raise
                    # NB: asked for the own class: the mismatch is the model's code at the new widths,
                    # not a wrong pass (the graph form is verified on its own)
                    detail = _without_bug_tail(str(e))
                    raise VerificationError(
                        f"compress(form='module'): {type(self.model).__name__}'s own forward at the new widths does "
                        f"not compute what the model computes ({detail}). Its code keeps something the rewrite "
                        "cannot follow (a width held as a plain int, a norm dividing by its new width, a head tied "
                        "to a table that would need two scales); form='graph' (or 'auto') returns the exact graph, "
                        "or pin those widths with otofx.OTO(model, x, pin=(...))") from e
                if isinstance(e, VerificationError):
                    # NB: the module form runs the model's own forward at the new widths; a mismatch
                    # there is the model's code (a width read from its config, a divisor fixed at the
                    # old size, as OLMo 2's q/k norms), not a wrong pass: the graph form is exact
                    detail = _without_bug_tail(str(e))
                    why = (f"its own forward at the new widths does not compute what the model computes "
                           f"({detail}); the graph form is verified separately")
                else:
                    why = str(e)
                if short:  # NB: the own class the search found, or the one it gave up on, removes too little
                    why += (f"; its own class keeping the zero rows of the widths it cannot take removes "
                            f"{short[-1]:.2f} of the parameters the graph form removes, below OWN_CLASS_SHARE "
                            f"({OWN_CLASS_SHARE}): form='module' returns it")
                sizes = self.graph_module.meta.get(STATIC_IMAGE_SIZES)
                if sizes:  # NB: the export capture could not make the image sizes dynamic cheaply
                    why += (f"; this graph accepts image size {', '.join('x'.join(map(str, t)) for t in sizes)} "
                            "only (any batch)")
                log.warning("otofx: compress() returns a torch.fx GraphModule, not a %s: %s",
                            type(self.model).__name__, why)
        return self._compress_graph(verify, plan, passes)

    def _say_free(self, small) -> None:
        """Log which free outputs ``small`` returns narrower: N of their M channels, and how to keep them."""
        if not self.zigset.free_outputs:
            return
        plan = self._plan_of(small)
        if plan is None:
            return
        keep = output_keeps(plan)
        for f in self.zigset.free_outputs:
            for d, idx in keep.get(f.index, {}).items():
                log.info("otofx: the compressed %s returns output %r with %d of its %d channels (axis %d): the "
                         "removed ones are zero in the model. otofx.OTO(model, x, free_outputs=()) keeps its width",
                         type(self.model).__name__, f.key, len(idx), f.label.shape[d], d)

    def _plan_of(self, small) -> Plan | None:
        """The plan ``small`` was made with (:meth:`_remember`), or None."""
        try:
            return self._plans.get(small)
        except TypeError:
            return None

    def _remember(self, small, plan: Plan) -> None:
        """Keep ``plan`` as the one ``small`` was made with (for its free outputs' kept channels)."""
        try:
            self._plans[small] = plan
        except TypeError:  # NB: a class with __eq__ and no __hash__: verify() falls back on the zero rows
            pass

    def output_keep(self, small) -> dict | None:
        """The kept positions of the free outputs in ``small`` (``passes.prune.output_keeps``: flat output
        index -> axis -> positions), under the plan it was made with, else the plan of the model's current
        zero rows; None without free outputs. ``otofx.verify.narrow_outputs(full, got, keep)`` gives the
        full model's outputs at those positions, to compare with ``small``'s."""
        if not self.zigset.free_outputs:
            return None
        plan = self._plan_of(small)
        return output_keeps(plan if plan is not None else zero_row_plan(self.zigset, self._sync()))

    def _warn_below_target(self) -> None:
        """A warning when a DHSPG optimizer made by ``self.dhspg()`` is below its target (issue: a
        run that stalled used to give the dense model back without a word)."""
        for ref in self._optimizers:
            opt = ref()
            if opt is None or not opt.n_rows:
                continue
            st = opt.status()
            if not st.reached:
                log.warning("otofx: compress() at group sparsity %.3f, below the DHSPG target %.3f (%d of %d rows "
                            "zero%s): the model is less compressed than asked. See DHSPG.status() and the README's "
                            "'Sparsity you can dial'", st.group_sparsity, st.target_group_sparsity, st.zero_rows,
                            st.n_rows, "; it is the dense model" if st.zero_rows == 0 else "")

    def _warn_unread(self) -> None:
        """A warning naming the modules whose parameters the example input never reached."""
        if not self.unread:
            return
        said = ", ".join(f"{u.module or type(self.model).__name__} ({u.numel:,} parameters)" for u in self.unread[:4])
        more = f" and {len(self.unread) - 4} more" if len(self.unread) > 4 else ""
        log.warning("otofx: the example input never reached %s%s: the analysis did not see them, they keep their "
                    "shapes, and the compressed model is exact on inputs that leave them unused. An input that "
                    "uses them (images for a vision tower) may fail there; to compress with them, pass example "
                    "inputs that reach them (OTO.unread lists them)", said, more)

    def _compress_graph(self, verify: bool, plan: Plan | None, passes) -> fx.GraphModule:
        gm = self._sync()
        steps = [] if plan is not None else [pipeline.plan_zero_rows]  # a given plan replaces the search
        # NB: no dead-code elimination by default: a layer whose output is unused keeps its
        # parameters, so the compressed state_dict has the same keys as the model's
        steps += [pipeline.prune, *passes]
        start = self.state.replace(gm=gm, reference=gm, records=())
        state = pipeline.Pipeline(steps).run(start if plan is None else start.put(pipeline.PLAN, plan))
        small = state.gm
        self._remember(small, state.get(pipeline.PLAN))
        copy_training_flags(small, self.model)
        if verify:
            try:
                self.verify(small)
            except OTOError:
                raise
            except Exception as e:  # noqa: BLE001 - a rewrite otofx got wrong: say so, in otofx's terms
                refused = self._graph_refuses()
                if refused is not None:
                    raise VerificationError(
                        f"the captured graph itself refuses the example inputs at the model's current weights "
                        f"({refused}): it asserts on a data-dependent size (how many boxes NMS keeps, how many "
                        "entries are non-zero) that held for the weights it was captured with. The model's own "
                        "class (form='module') has no such assertion; or capture again (otofx.OTO) with the "
                        "current weights") from e
                raise VerificationError(
                    f"the compressed graph does not run on the example inputs: {type(e).__name__}: {_first_line(e)}. "
                    "This is a bug in otofx: please report it with the model. `oto.compress(verify=False)` skips "
                    "this check; the model's own class (form='module') may still work") from e
        return small

    def _model_sets(self) -> list:
        """``(args, kwargs, name)`` the model itself runs for verification: the graph's input sets, or
        the model's example inputs when it was captured in parts (the graph's inputs are the parts')."""
        parts = self.graph_module.meta.get(PARTS)
        if parts is not None:
            return [(parts.args, parts.kwargs, "the example inputs")]
        return input_sets(self.state)

    def _graph_refuses(self) -> str | None:
        """Why the captured graph, with the model's current weights, raises on the example inputs (else None)."""
        try:
            run_eval(self._sync(), self._args, self._kwargs)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {_first_line(e)}"
        return None

    def _module_keeping_rows(self, error: Exception, check: bool, plan: Plan | None, rtol: float,
                             floor: float = 0.0, first: torch.nn.Module | None = None,
                             fills: dict | None = None, short: list | None = None) -> torch.nn.Module | None:
        """The model's own class with the zero rows of the groups its forward cannot take at the new
        widths kept, when the copy without them failed (``error``); None when no such copy verifies,
        or when the search's copy removes less than ``floor`` of the parameters the plan removes.

        First the widths of GRNs and weight standardisations written into a forward (ConvNeXt V2's
        official class, a user's standardised conv: the rebuild refuses them), then with them the
        widths LayerNorms and GroupNorm(1, C)s normalise (a norm subclass or a functional norm
        dividing by its new width). Then a search, from the GRNs'
        widths: the copy is run beside the model, the module where it first goes wrong is blamed
        (:func:`otofx.verify.first_wrong_module`: where it raised, or the first module whose outputs
        differ), and the groups it holds are kept (:func:`_groups_to_keep`), with the same groups
        of its copies (:func:`_copies`: the other blocks of a stack, where the same code at the same
        widths goes wrong the same way), until the copy verifies or nothing is left to keep; then
        the groups kept on a guess go again where the copy verifies without them (:meth:`_let_go`),
        and, where the blamed modules read widths that are equal in the model (an attention whose
        code takes its inner width off its input), one more copy keeps only part of the kept
        groups' zero rows, enough to keep those widths equal (:func:`_tied_rows`; also tried before
        the search gives up below half the floor). When the blame leaves nothing to keep, or its
        guesses fall below half the floor, the groups to keep are found once by elimination instead
        (:meth:`_eliminate`: halving the groups kept until the fewest that verify are left), for a
        fault no module call shows (a width the forward reads off a tensor between calls).
        At most ``_KEEP_SEARCH_TRIES`` copies in all (compress()'s own, ``first``, not counted).
        ``first``: the copy without any row kept, when
        it was made and failed; ``fills``: the layer norms' constants read for it; ``short``: gets the
        share of the graph form's removal of each copy found (or tried) below ``floor``. The graph
        form removes every zero row."""
        gm = self._sync()
        plan = plan if plan is not None else zero_row_plan(self.zigset, gm)
        zigs = plan.zigset.zigs
        removing = [i for i, r in enumerate(plan.removed) if len(r)]
        if not removing:
            return None
        # NB: keeping a row is exact only where the model has it zero; a plan of rows that are not
        # (SCOP's prune_lowest) must remove them, which the graph form does
        zero = zero_rows(plan.zigset, gm)
        keepable = {i for i in removing if torch.isin(plan.removed[i], zero[i]).all()}
        full = _removed_parameters(gm, plan)

        def below(keep: set, bound: float, when: str = "", quiet: bool = False) -> bool:
            share = _removed_parameters(gm, plan, keep) / max(full, 1)
            if share < bound and not quiet:
                if short is not None:
                    short.append(share)
                log.info("otofx: %s's own class keeping group(s) %s removes %.2f of the parameters the graph form "
                         "removes (below %.2f%s)", type(self.model).__name__, sorted(keep), share, bound, when)
            return share < bound

        # NB: a GRN written into a forward divides by its new width, and the rebuild refuses it (a
        # zero gamma would pass verification): its widths are kept in every try
        # NB: so is a weight standardisation written into a forward (a user's conv): it divides by its new fan-in
        # NB: and a layer norm written into a larger forward (a block's): it divides by its new width
        grns = (inline_grn_groups(gm, self.model, plan.zigset)
                | inline_standardisation_groups(gm, self.model, plan.zigset)
                | inline_layer_norm_groups(gm, self.model, plan.zigset)) & set(removing)
        # NB: and the widths whose removed channels hold a position table the norms read (DiT's stream), when
        # the model takes inputs of other sizes: a fill holds the example's positions only
        positions = set().union(*positional_fill_groups(gm, plan.zigset, fills).values()) & set(removing) \
            if fills else set()
        if positions and not self._sizes_taken():  # NB: the model runs at a larger size only here
            positions = set()
        # NB: and the widths a reshape ties in blocks read at the example's size, when that is why the copy failed
        sized = set().union(*sized_tie_groups(plan.zigset).values()) & set(removing) \
            if isinstance(error, _SizedTieError) else set()
        # NB: both hold only at the example's size, and the model takes inputs of other sizes
        sizes = [where for groups, where in (
            (positions, "the width(s) whose removed channels hold a position table that layer norms read"),
            (sized, "the width(s) a reshape ties in blocks read at the example's size")) if groups]
        held = positions | sized
        grns |= held
        normed = layer_norm_params(gm)
        norms = {i for i in removing if any(name in normed for name, _, _ in zigs[i].params)}
        what = "the width(s) GRNs, weight standardisations and layer norms written into a forward normalise"
        if held:
            where = f"{', and '.join(sizes)} (the model takes inputs of other sizes)"
            what = f"{where}, and of {what}" if grns - held else where
        tries = ([(what, grns)] if grns else []) + (
            [("the width(s) LayerNorms (GroupNorm(1)s, GRNs) normalise", norms | grns)] if norms else [])
        for what, groups in tries:
            # NB: the norms' widths are kept whatever they cost (a language model keeps generate());
            # only a copy that removes nothing is no answer to form="auto"
            if floor and groups >= set(removing):
                continue
            if not groups <= keepable:
                log.info("otofx: the plan removes rows that are not zero in %s (group %d), which the own class "
                         "cannot keep: %s", type(self.model).__name__, min(groups - keepable), _first_line(error))
                return None
            small = self._try_keeping(plan, groups, check, rtol, fills)
            if isinstance(small, torch.nn.Module):
                log.warning("otofx: compress() keeps the %d zero row(s) of %s in the %s it "
                            "returns: removed, %s; form='graph' removes them",
                            _count(plan, groups), what, type(self.model).__name__, _why(error))
                return small
        if not grns <= keepable:
            return None
        keep, blamed, steps = set(grns), [], []  # NB: steps: [_Step], one per blame
        tries = 0

        def attempt(groups: set, rows: Plan = plan):
            nonlocal tries
            tries += 1
            return self._try_keeping(rows, groups, check, rtol, fills)

        def tie(keep: set, removed_n: int):
            """``(copy, groups partly kept, parameters removed, rows kept)`` for the copy keeping just
            enough of ``keep``'s zero rows that the blamed modules' tied widths are equal
            (:func:`_tied_rows`), when it verifies and removes more than ``removed_n``; else None."""
            # NB: a module reading one width off another (an attention's inner width off its
            # stream's) takes both removed at one width: part of the kept groups' zero rows go
            rows = _tied_rows(self.model, plan, keep, blamed, keepable) if keep else None
            if rows is None or tries > _KEEP_SEARCH_TRIES:
                return None
            tied = plan_rows(plan.zigset, rows)
            more = _removed_parameters(gm, tied)
            if more <= removed_n:
                return None
            fewer = attempt(set(), tied)
            if not isinstance(fewer, torch.nn.Module):
                return None
            part = {i for i in keep if len(tied.removed[i]) < len(plan.removed[i])}
            log.info("otofx: %s's own class takes its tied widths equal: keeping part of the zero rows of group(s) "
                     "%s, the rest of them removed", type(self.model).__name__, sorted(part))
            return fewer, part, more, sum(len(a) - len(b) for a, b in zip(plan.removed, tied.removed))

        def found(small, keep: set, removed_n: int, kept_rows: int):
            log.warning("otofx: compress() keeps the %d zero row(s) of %d group(s) in the %s it returns, removing "
                        "%d of the %d parameters the graph form removes: its forward cannot take them removed (at "
                        "%s; removed: %s)%s; form='graph' removes them", kept_rows, len(keep),
                        type(self.model).__name__, removed_n, full,
                        ", ".join(dict.fromkeys(b or type(self.model).__name__ for b in blamed)), _why(error),
                        f"; with them, the {_count(plan, positions & keep)} zero row(s) of group(s) "
                        f"{sorted(positions & keep)} whose removed channels hold a position table that layer norms "
                        "read (the model takes inputs of other sizes, where those constants differ)"
                        if positions & keep else "")
            log.info("otofx: the own-class search of %s made %d copies", type(self.model).__name__, tries)
            return small

        eliminated, ready = False, None  # NB: ready: the copy the elimination verified for keep

        def eliminate() -> bool:
            """Once: ``keep`` (and ``ready``, its verified copy) from the norms' groups and the fewest
            others that a copy must keep (:meth:`_eliminate`), the blame's guesses dropped."""
            # NB: the fault is where no module call shows it (a width the forward reads off a tensor
            # between calls: RAFT divides its correlation by the square root of the feature maps'
            # width, in a method, not a call), or the blame's guesses went the wrong way
            nonlocal eliminated, keep, ready
            if eliminated:
                return False
            eliminated = True
            got = self._eliminate(grns, sorted((set(removing) & keepable) - grns), attempt, lambda: tries)
            if got is None:
                return False
            keep, ready = got
            steps.clear()
            blamed[:] = [_owner(zigs[i]) for i in sorted(keep - grns)]
            log.info("otofx: %s's own class verifies keeping the zero rows of group(s) %s (found by elimination)",
                     type(self.model).__name__, sorted(keep - grns))
            return True

        while tries < _KEEP_SEARCH_TRIES or ready is not None:
            if ready is not None:
                small, ready = ready, None
            elif first is not None and not keep and not steps:
                small = (first,)  # NB: compress()'s own copy (not counted: the search's tries are its own)
            else:
                small = attempt(keep)
            if isinstance(small, torch.nn.Module):
                if keep == grns:  # NB: it failed on something else (an input size outside the capture's)
                    return None
                keep, small = self._let_go(plan, keep, small, steps, attempt, lambda: tries,
                                           lambda k: below(k, floor, quiet=True) if floor else False)
                kept_rows, removed_n = _count(plan, keep), _removed_parameters(gm, plan, keep)
                got = tie(keep, removed_n)
                if got is not None:
                    small, keep, removed_n, kept_rows = got
                # NB: a copy that removes nothing is no answer
                if removed_n < floor * max(full, 1) or (got is None and keep >= set(removing)):
                    if short is not None and removed_n < floor * max(full, 1):
                        short.append(removed_n / max(full, 1))
                    log.info("otofx: %s's own class keeping the zero rows of group(s) %s%s removes %.2f of the "
                             "parameters the graph form removes (below %.2f)", type(self.model).__name__,
                             sorted(keep), " in part" if got is not None else "", removed_n / max(full, 1), floor)
                    return None
                return found(small, keep, removed_n, kept_rows)
            if small is None:  # NB: the copy could not be made: nothing to localise
                return None
            where = None
            for a, k, _ in self._model_sets():
                with _no_kv_cache(self.model, k), _no_kv_cache(small[0], k):
                    where = first_wrong_module(self.model, small[0], a, k)
                if where is not None:
                    break
            copies = _copies(self.model, where.module)[1:] if where is not None else []
            add, wide, level = _groups_to_keep(zigs, removing, keep, where, copies) if where is not None \
                else (set(), set(), None)
            if not add - keep:
                log.info("otofx: no group left to keep in %s's own class (blamed: %s): %s", type(self.model).__name__,
                         where, _first_line(error))
                if not eliminate():
                    return None
                continue
            if not add - keep <= keepable:
                log.info("otofx: %s's own class would need rows kept that are not zero (group %d, at %s)",
                         type(self.model).__name__, min(add - keep - keepable), where.module)
                return None
            # NB: a module (or one of its copies) blamed again at a deeper level: what its earlier steps
            # kept was not (all) the fault; their guesses in the copies go (the blamed module's own
            # groups stay, for _let_go to try), and the new level is kept in every copy
            pattern = _pattern(where.module)
            kind = _copy_key(where.module, self.model.get_submodule(where.module))
            for step in steps:
                if step.kind == kind and step.level < level:
                    step.groups = step.add
            keep = set(grns).union(*(step.groups for step in steps))
            add, wide = add - keep, wide - keep
            # NB: the same code at the same widths goes wrong the same way in each copy of the blamed
            # module (the blocks of a stack): their groups of the same kind are kept in one step; only
            # where that alone would fall below half the floor (while the blamed module's would not),
            # or keep rows that are not zero, the blamed module's alone
            if wide != add and (not wide <= keepable or (floor and below(keep | wide, floor / 2, quiet=True)
                                                         and not below(keep | add, floor / 2, quiet=True))):
                wide = add
            log.info("otofx: %s's own class goes wrong at %s: keeping the zero rows of group(s) %s%s",
                     type(self.model).__name__, where.module or "its top module", sorted(add),
                     f" and of {sorted(wide - add)} in its {len(copies)} copies ({pattern})" if wide != add else "")
            keep |= wide
            steps.append(_Step(add, wide, kind, level))
            blamed.append(where.module)
            # NB: a cost bound, not a proof: letting the guessed groups go again rarely brings a copy
            # that removes less than half the floor back above it, so form="auto" stops there
            if floor and below(keep, floor / 2, " on the way"):
                # NB: the groups kept so far may be tied widths (a stream and the heads reading it)
                # of which part can go: one try before giving up
                got = tie(keep, _removed_parameters(gm, plan, keep))
                if got is None or got[2] < floor * max(full, 1):
                    if got is not None and short is not None:
                        short.append(got[2] / max(full, 1))
                    if eliminate():
                        continue
                    return None
                return found(*got)
        return None

    @staticmethod
    def _eliminate(keep: set, candidates: list, attempt, used) -> tuple | None:
        """``(groups, copy)``: ``keep`` with the fewest ``candidates`` whose zero rows a copy must keep
        to verify, and that copy; None when none is found within the tries (``used()``: those made).

        The shortest prefix of the candidates that verifies is found by halving (keeping more never
        breaks a copy that verified: the kept rows are zero); its last group is needed, and the search
        goes on among the groups before it, with that one kept. One needed group costs about
        ``log2(len(candidates)) + 1`` copies."""
        need, hi, ok = set(keep), len(candidates), None  # NB: ok: the copy verified for need | candidates[:hi]
        # NB: all candidates kept is the model itself at the kept widths: taken as verifying, not tried
        while hi > 0:
            lo, top, top_copy = 0, hi, ok
            while lo < top:
                if used() >= _KEEP_SEARCH_TRIES:
                    return None
                mid = (lo + top) // 2
                got = attempt(need | set(candidates[:mid]))
                if isinstance(got, torch.nn.Module):
                    top, top_copy = mid, got
                else:
                    lo = mid + 1
            if top == 0:
                return need, top_copy
            need.add(candidates[top - 1])  # NB: need | candidates[:top - 1] is the set that verified
            hi, ok = top - 1, top_copy
        if ok is None:
            if used() >= _KEEP_SEARCH_TRIES:
                return None
            got = attempt(need)
            ok = got if isinstance(got, torch.nn.Module) else None
        return (need, ok) if ok is not None else None

    def _let_go(self, plan: Plan, keep: set, small, steps: list, attempt, used, short) -> tuple:
        """``(keep, small)`` with the groups kept on a guess let go again where the copy still verifies
        without them, in the order they came, while the tries last (``used()``: the tries made;
        ``_KEEP_SEARCH_TRIES`` in all, and the one that lets all the guesses go):

        * what the steps kept in the copies of the blamed modules (the same fault in each was a
          guess: a stage whose head width the code cannot take where the others can), all in one
          try, then (when that fails) each step's;
        * a step may have kept more than it needed (the groups of a block whose norm, not whose
          widths, went wrong; a block's MLP width kept before its stream was blamed): each kind of
          group a step kept (the same group in each copy of a repeated block, :func:`_kinds`) goes in
          one try, if the step kept several kinds or blamed a module (or a copy of one) blamed
          before; a lone kind kept at a module's first blame was what that copy lacked;
        * when the copy then removes less than the floor (``short(keep)``), the groups of those
          that could not go as one, one at a time.

        # NB: keeping a group is not always harmless: a head width kept while the head count goes
        (DaViT's channel attention reshapes by both) breaks a module that took both removed, so the
        guesses in the copies go together first"""
        zigs = plan.zigset.zigs
        patterns = [step.kind for step in steps]
        guesses = [step.groups - step.add for step in steps if step.groups != step.add]
        tries = [set().union(*guesses)] + (guesses if len(guesses) > 1 else []) if guesses else []
        for j, step in enumerate(steps):
            kinds = _kinds(zigs, step.groups)
            if len(kinds) > 1 or patterns[j] in patterns[:j]:
                tries += kinds
        # NB: the try that lets all the guesses go is not counted (a step kept in the copies saved a
        # step per copy at least)
        bound = _KEEP_SEARCH_TRIES + (1 if guesses else 0)
        finer, tried = [], []
        for groups in tries:
            groups = groups & keep
            if groups in tried:
                continue
            tried.append(groups)
            if used() >= bound or len(keep) <= 1:
                break
            if not groups:
                continue
            fewer = attempt(keep - groups)
            if isinstance(fewer, torch.nn.Module):
                keep, small = keep - groups, fewer
            elif len(groups) > 1:
                finer.append(groups)
        if finer and short(keep):
            for i in dict.fromkeys(i for groups in finer for i in sorted(groups)):
                if used() >= bound or len(keep) <= 1:
                    break
                if i not in keep:
                    continue
                fewer = attempt(keep - {i})
                if isinstance(fewer, torch.nn.Module):
                    keep, small = keep - {i}, fewer
        return keep, small

    def _try_keeping(self, plan: Plan, keep: set, check: bool, rtol: float, fills: dict | None = None):
        """The own class without ``plan``'s rows except those of the groups ``keep``: the module when
        it verifies, else ``(copy,)`` (the copy that failed, for the search), or None when no copy
        could be made."""
        kept = plan_rows(plan.zigset, [r[:0] if i in keep else r for i, r in enumerate(plan.removed)])
        failed: list = []
        try:
            return self._compress_module(check, kept, rtol, failed=failed, fills=fills)
        except (RebuildError, VerificationError):
            return (failed[-1],) if failed else None

    def _compress_module(self, check: bool, plan: Plan | None, rtol: float, failed: list | None = None,
                         fills: dict | None = None, follow_literals: bool = True,
                         moved: list | None = None) -> torch.nn.Module:
        """The re-sized copy of the user's model (``otofx.rebuild``), checked on the example inputs;
        a copy that fails the check is appended to ``failed`` (for ``_module_keeping_rows``).
        ``fills``: the layer norms' constants read once per ``compress()``; ``follow_literals`` and
        ``moved``: ``rebuild``'s."""
        gm = self._sync()
        if plan is None:
            plan = zero_row_plan(self.zigset, gm)
        log.info("otofx: removing %d rows from a copy of %s", plan.count, type(self.model).__name__)
        folds: list = []
        try:
            small = rebuild(self.model, plan, gm, folds=folds, inputs=(self._args, self._kwargs), fills=fills,
                            follow_literals=follow_literals, moved=moved)
        except RebuildError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a model attribute that cannot be copied
            raise RebuildError(f"a re-sized copy could not be made: {type(e).__name__}: {_first_line(e)}") from e
        self._remember(small, plan)
        if check:
            try:
                self.verify(small, rtol=rtol)
            except Exception as e:  # noqa: BLE001 - the user's forward at the new widths
                # NB: the weight folds that let floats follow the config (rebuild._follow_floats)
                # assume the class's forward; a copy without them is the one to keep when they fail
                plain = None
                if folds:
                    plain = rebuild(self.model, plan, gm, follow_floats=False, inputs=(self._args, self._kwargs),
                                    fills=fills, follow_literals=follow_literals)
                    self._remember(plain, plan)
                    try:
                        self.verify(plain, rtol=rtol)
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        plain = None
                if plain is None:
                    if failed is not None:
                        failed.append(small)
                    if isinstance(e, VerificationError):
                        raise
                    raise RebuildError(f"its forward fails at the new widths: {type(e).__name__}: "
                                       f"{_first_line(e)}") from e
                log.info("otofx: %s: kept without the config's floats (%d weight folds: %s)",
                         type(self.model).__name__, len(folds), _first_line(e))
                small = plain
            try:
                self._check_positions(small, rtol)
                self._check_sized_ties(small, plan, rtol)
            except RebuildError:
                if failed is not None:
                    failed.append(small)
                raise
        return small

    def _sizes_taken(self) -> list:
        """``[(what, args, kwargs)]`` of :func:`_resized_inputs` that the model itself runs (once per OTO:
        what sizes a model takes does not change with its weights); none for a model on the meta device."""
        got = self.__dict__.get("_sizes_taken_cache")
        if got is None:
            got = []
            if not self._on_meta:
                for what, (a, k) in _resized_inputs(self._args, self._kwargs):
                    try:
                        with _no_kv_cache(self.model, k):
                            run_eval(self.model, a, k)
                    except Exception:  # noqa: BLE001 - the model refuses that size: nothing to check
                        continue
                    got.append((what, a, k))
            self._sizes_taken_cache = got
        return got

    def _off_at_other_size(self, small: torch.nn.Module, rtol: float) -> tuple | None:
        """``(what, why)``: the first other input size the model takes (:meth:`_sizes_taken`) where ``small``
        fails or differs from the model, and how; None when it matches at every one."""
        off = self._first_difference(small, self._sizes_taken(), rtol)
        if off is None:
            return None
        what, e, err = off
        return what, (f"fails: {type(e).__name__}: {_first_line(e)}" if e is not None
                      else f"differs from the model by {err:.2g}")

    def _check_positions(self, small: torch.nn.Module, rtol: float) -> None:
        """Raise RebuildError when ``small`` holds layer-norm constants read at the example's positions
        (:func:`_positional_fills`: a position table added into removed channels, DiT's) and differs from
        the model (or fails) at another size the model takes (:meth:`_sizes_taken`)."""
        held = _positional_fills(small)
        off = self._off_at_other_size(small, rtol) if held else None
        if off is not None:
            raise RebuildError(
                f"layer norm(s) {', '.join(held[:3])} hold the constants their removed channels had at the "
                f"example's positions (a position table added into them); at {off[0]}, which the model takes, "
                f"its own class {off[1]}")

    def _check_sized_ties(self, small: torch.nn.Module, plan: Plan, rtol: float) -> None:
        """Raise :class:`_SizedTieError` when ``plan`` removes rows a reshape tied in blocks read at the
        example's sizes (:func:`sized_tie_groups`: channels merged with a token or pixel axis, split along
        other boundaries, MAnet's attention) and ``small`` differs from the model (or fails) at another
        size the model takes (:meth:`_sizes_taken`)."""
        removing = {i for i, r in enumerate(plan.removed) if len(r)}
        hit = sorted(n for n, g in sized_tie_groups(plan.zigset).items() if g & removing)
        off = self._off_at_other_size(small, rtol) if hit else None
        if off is not None:
            raise _SizedTieError(
                f"reshape(s) {', '.join(hit[:3])} merge channels with a token or pixel axis and split them in "
                f"blocks read at the example's size; at {off[0]}, which the model takes, its own class {off[1]}")

    def _first_difference(self, small: torch.nn.Module, sets, rtol: float) -> tuple | None:
        """``(what, error, None)`` for the first ``(what, args, kwargs)`` of ``sets`` where ``small`` raises
        (``error``), ``(what, None, relative difference)`` where it differs from the model (its zeroed rows
        included); None when it matches on every set the model itself runs (a set it refuses is skipped)."""
        for what, a, k in sets:
            try:
                with _no_kv_cache(self.model, k):
                    ref = run_eval(self.model, a, k)
            except Exception:  # noqa: BLE001 - the model refuses that size itself: nothing to check
                continue
            try:
                with _no_kv_cache(small, k):
                    got = run_eval(small, a, k)
                ok, err = outputs_close(narrow_outputs(ref, got, self.output_keep(small)), got, rtol)
            except Exception as e:  # noqa: BLE001 - the compressed class's forward at that size
                return what, e, None
            if not ok:
                return what, None, err
        return None

    def _other_size_branch(self, small: torch.nn.Module, rtol: float) -> str | None:
        """What the model's own class gets wrong at an input size just outside the ranges the export
        capture admits (``capture.outside_inputs``: its code takes a branch there that the analysis
        never saw), checked against the model itself (its zeroed rows included); None when nothing
        (or when the model itself refuses those sizes)."""
        sets = []
        for what, inputs in self.graph_module.meta.get(SIZE_BOUNDS) or ():
            if self._on_meta:
                inputs = _tiled_like((self._args, self._kwargs), inputs)
            sets.append((what, *inputs))
        off = self._first_difference(small, sets, rtol)
        if off is None:
            return None
        what, e, err = off
        if e is not None:
            return (f"at {what} (the model's code branches on it), its own class fails: "
                    f"{type(e).__name__}: {_first_line(e)}")
        return (f"at {what} (the model's code branches on it), its own class differs from the "
                f"model by {err:.2g}: the analysis saw the example's branch only")

    def verify(self, small: torch.nn.Module, rtol: float = 1e-4) -> float:
        """Check ``small`` (either form) against the full model on the example inputs and, for an
        export capture, a second shape (``self.state.more_inputs``); returns the worst relative error.
        A free output is compared on the channels ``small`` keeps (the others are zero in the model)."""
        _need_weights(self.model, "OTO.verify()", (self._args, self._kwargs))
        try:
            parts = self.graph_module.meta.get(PARTS)
            if parts is not None and not isinstance(small, fx.GraphModule):
                # NB: the graph holds the parts, not the forward between them: the model itself is the reference
                worst = 0.0
                for a, k, name in self._model_sets():
                    worst = max(worst, compare(self.model, small, a, k, rtol, "the compressed model", name))
                return worst
            sets = input_sets(self.state)
            keep = self.output_keep(small)
            if isinstance(small, fx.GraphModule):
                return compare_all(self._sync(), small, sets, rtol, "the compressed model", keep)
            gm, worst = self._sync(), 0.0
            for a, k, name in sets:
                try:
                    ref = run_eval(gm, a, k)
                except Exception as e:  # noqa: BLE001
                    # NB: the graph's assertions on data-dependent sizes (boxes NMS kept: u0 >= 2) held for the
                    # weights it was captured with; the model itself has none
                    log.info("otofx: the captured graph refuses %s at the current weights (%s: %s); the "
                             "compressed model is checked against the model itself", name, type(e).__name__,
                             _first_line(e))
                    with _no_kv_cache(self.model, k):
                        ref = run_eval(self.model, a, k)
                    gm = self.model
                # NB: the graph was captured without a KV cache (Hugging Face); so is the comparison
                with _no_kv_cache(small, k):
                    worst = max(worst, compare(ref, small, a, k, rtol, "the compressed model", name, keep, gm))
            return worst
        except VerificationError as e:
            raise VerificationError(f"{e} `oto.compress(verify=False)` skips this check.") from None

    # -- training -------------------------------------------------------------------------------
    def dhspg(self, **kw):
        """A :class:`otofx.optim.DHSPG` over ``self.model``'s parameters with the rows of ``self.groups``.

        Keyword arguments are DHSPG's hyper-parameters (OTO.md section 2), e.g. ``lr``, ``variant``,
        ``target_group_sparsity``, ``start_pruning_steps``, ``pruning_steps``. ``compress()`` warns
        when the optimizer is below its target.
        """
        from otofx.optim import DHSPG

        groups, kw = self._trainable_groups("dhspg", kw)
        opt = DHSPG(self.model.named_parameters(), groups, model=self.model, **kw)
        self._optimizers = [r for r in self._optimizers if r() is not None] + [weakref.ref(opt)]
        return opt

    def hesso(self, **kw):
        """A :class:`otofx.optim.HESSO` over ``self.model``'s parameters (``pruning_steps`` is required)."""
        from otofx.optim import HESSO

        groups, kw = self._trainable_groups("hesso", kw)
        return HESSO(self.model.named_parameters(), groups, model=self.model, **kw)

    def _trainable_groups(self, what: str, kw: dict) -> tuple:
        """``self.groups`` less those holding a frozen parameter (the row step would write it), with a
        warning naming them; a per-group ``target_group_sparsity`` sequence follows."""
        frozen = [z.frozen(self.model) for z in self.groups]
        if not any(frozen):
            return self.groups, kw
        keep = [i for i, f in enumerate(frozen) if not f]
        names = sorted({n for f in frozen for n in f})
        log.warning("otofx: %s() leaves out %d of %d group(s) holding frozen parameters, which it must not write "
                    "(%s%s); their rows stay. Unfreeze them (requires_grad_(True)) to prune those groups",
                    what, len(self.groups) - len(keep), len(self.groups), ", ".join(names[:4]),
                    f" and {len(names) - 4} more" if len(names) > 4 else "")
        target = kw.get("target_group_sparsity")
        if isinstance(target, (list, tuple)) and len(target) == len(self.groups):
            kw = {**kw, "target_group_sparsity": type(target)(target[i] for i in keep)}
        return tuple(self.groups[i] for i in keep), kw

    # -- SCOP: pruning a trained model ------------------------------------------------------------
    def scop(self, loader, *, knockoff="gaussian", epochs: int = 10, lr: float = 0.004, **kw) -> tuple:
        """SCOP's per-row scores (one tensor per group, ``self.groups`` order; higher = keep).

        Trains one selection scale per row on a copy of the captured graph with knockoff inputs
        (``knockoff``: "gaussian", "permute" or a callable); the model is untouched. Other keywords:
        :func:`otofx.scop.train_betas` (``optimizer``, ``momentum``, ``adam_betas``, ``init``, ``loss_fn``,
        ``max_steps``, ``seed``, ``knockoff_kwargs``).
        """
        from otofx.scop import train_betas

        unknown = sorted(set(kw) - set(inspect.signature(train_betas).parameters) - {"oto", "loader"})
        if unknown:
            raise InputError(f"OTO.scop(): unknown keyword(s) {', '.join(unknown)}; it takes those of "
                             "otofx.scop.train_betas")
        return train_betas(self, loader, knockoff=knockoff, epochs=epochs, lr=lr, **kw).scores

    def prune_lowest(self, scores, *, ratio: float = 0.5, per_group: bool = True, loader=None, bn_batches: int = 10,
                     **kw) -> torch.nn.Module:
        """A new model without the lowest-scoring rows (:func:`otofx.scop.prune_lowest`): the own class where it can."""
        from otofx.scop import prune_lowest

        return prune_lowest(self, scores, ratio=ratio, per_group=per_group, loader=loader, bn_batches=bn_batches, **kw)


__all__ = ["OTO", "OTOError", "outputs_close", "eval_mode"]
