"""The module form of ``compress()``: a smaller copy of the user's own model (its class, its forward).

``rebuild(model, plan) -> nn.Module``: a copy of ``model`` (the model itself untouched) whose
parameters and buffers are sliced to the rows the plan keeps, whose module attributes are re-synced
with the new shapes (:mod:`otofx.passes.resize`), and whose Hugging Face config (a copy) describes
the new widths. ``OTO.compress`` verifies it against the zeroed dense model and falls back to the
GraphModule form when the user's ``forward`` cannot run at the new widths (a width written into
the code, an attribute no rule knows).

Internals:
    * The plan's keep masks come from ``zigset.owners`` (every parameter/buffer axis and its channel
      ids), as in ``passes.prune``: index i of an axis stays unless its class is removed. Owners are
      named by the user's dotted names (both front-ends keep them).
    * # NB: no deep copy of the weights: ``copy.deepcopy`` runs with a memo mapping every parameter
      and buffer to a meta-device placeholder, and each placeholder is then replaced by the sliced
      (or cloned) tensor, so memory stays within dense + compressed + one tensor. A tensor
      reachable under several names (tied embeddings) has one placeholder, hence one new tensor:
      ties survive.
    * A weight-normed layer (``passes.weightnorm``) keeps its weight norm: ``v`` and ``g`` are sliced,
      ``g`` refit where ``v`` lost input columns, and the layer is re-synced from its computed weight.
    * Modules are re-synced children first, so a parent (an attention block) sees its children's
      final shapes; a rule may return a replacement module (``nn.MultiheadAttention``).
    * An RMS norm over an axis that lost entries (``passes.resize.rms_folds``, read off the graph)
      gets eps times old/new and its weight times sqrt(old/new): its own forward, dividing by the
      new width, then computes what the graph's old divisor computes.
    * Head counts and widths come from the changed axes near each module; the residual stream's
      axes (the groups holding the token embedding's columns) are kept apart, and an axis whose
      groups have single-channel rows only is a width, never a head count: a hidden size or a low
      rank that equals some head count must not move it. Attributes that hold the stream's width
      (``passes.resize.STREAM_WIDTHS``) follow the embedding's new width, in the modules that hold
      a tensor of the stream.
    * Held sizes: an int attribute (or a tuple or list of ints) that gave the module's own forward
      a literal size or position (a split's sizes, a slice's bound, a view's shape, an RMS norm's
      ``normalized_shape``: torchtune's RMSNorm calls F.rms_norm with its own) takes the value
      the graph form's rewrite gives that literal (:func:`_follow_literals`, from
      ``passes.resize.literal_moves``): FasterNet's ``dim_conv3``/``dim_untouched``, InceptionNeXt's
      ``split_indexes``, MambaOut's ``split_indices``, Res2Net's ``width`` (an int split size whose
      pieces now differ becomes their list), ReXNet's ``in_channels``. Only an attribute no rule
      re-synced, and only to the one new value of that literal in that module's forward; a guess
      all the same (the attribute may also scale something): ``OTO.compress`` verifies the copy
      and tries it without them when it fails. Width attributes a module's forward checks rather
      than writes (``Upsample2D.channels``: ``passes.resize.IN_WIDTHS``/``OUT_WIDTHS``) follow the
      width of what the module reads or makes (:func:`_follow_io_widths`), with the literals.
    * Records: a dataclass or namespace a module holds and reads sizes from in its forward
      (litgpt's one ``Config`` that every block reads ``self.config.n_head`` off). Its size-named
      fields whose value is a literal the graph form recounts in the module's forward take the value
      under which the module's class, built again from the record on the meta device, has the copy's
      shapes (:func:`_follow_records`: a head count of 4 that equals a rotary half-width of 4 is
      told apart that way); a record other modules share is copied for the module first, so each
      attention block holds its own head counts (``otofx.save`` stores them per module).
    * einops' ``Rearrange``/``Reduce`` layers hold their axis lengths in a dict: a length the graph form
      recounts in the layer's forward (a head count) follows it (:func:`_follow_einops`).
    * A wrapper child with no tensors of its own (a conv-norm ``Conv``) counts with the leaves it
      wraps when a module's head counts and widths are read off its children (:func:`_scope`).
    * The config: integer fields (and entries of per-layer lists of ints, and the fields of
      nested configs such as ``text_config``) whose old value some changed width or head count had
      are tried one at a time, each kept if building the class from the config (on the meta
      device) gets more tensor shapes and config-given module attributes right (a config without
      ``head_dim``, or with None, is also tried with it written down). When the config then builds
      exactly the new shapes, config-given module attributes no rule re-synced follow it, if every
      such move is one of the plan's width changes (:func:`_follow_config`).
    * Floats the config gives (a norm's eps, Gemma's embedding scale) then follow it, so that
      ``save_pretrained`` + ``from_pretrained`` build the same function: the config's float fields
      move to the new values, and each module attribute still off takes the config's value while a
      weight absorbs the difference (:func:`_follow_floats`, :func:`_float_fold`), all or nothing;
      when the config cannot take the hidden norms' refolded eps (Qwen 3.5's linear-attention norms
      share it), the eps stay the config's and the residual stream is scaled (:func:`_stream_fold`).
      When some float stays off all the same (Zamba 2's gated Mamba norm has its own eps), the config
      goes back to the old widths: ``from_pretrained`` then refuses the checkpoint's shapes rather
      than load a model that computes something else.
      # NB: the folds read the class's forward off the graph; ``OTO.compress`` verifies the copy and
      rebuilds without them (``follow_floats=False``) when they were wrong.
    * A GRN (ConvNeXt V2) over narrowed channels must be a module the resize replaced by
      ``PrunedGlobalResponseNorm`` (it keeps the old divisor): one written into another module's
      forward is refused (:func:`_check_grns`), and ``OTO.compress`` keeps those zero rows instead.
    * A LayerNorm over a narrowed axis is replaced by ``PrunedLayerNorm`` (it keeps the old
      divisor, and gets ``fill``, the constants its removed channels held: :func:`_fill_layer_norms`),
      which no config builds: the widths it lost are not written into the config, and the module's
      class counts as a mismatch, so ``from_pretrained`` refuses the checkpoint's shapes rather than
      build ``nn.LayerNorm`` at the new width.
    * A module whose own forward computes a layer norm alone over a narrowed axis (written out:
      ConvNeXt's and SAM's channels-first ``LayerNorm``, Cohere's; ``F.layer_norm`` of its tensors:
      OLMo's; an ``nn.LayerNorm`` without weights) is replaced by ``PrunedOwnLayerNorm``
      (:func:`_swap_own_layer_norms`; its axis, weight and bias are found by running a copy with random
      weights: ``passes.resize.own_norm_replacement``; it takes ``fill`` as ``PrunedLayerNorm`` does). A
      written-out norm that no module computes alone is refused; its widths stay out of the config, as
      ``PrunedLayerNorm``'s. A fill that differs from position to position (a position table in the
      removed channels) is right at the example's size only: ``OTO.compress`` checks the copy at another
      size the model takes and keeps those widths where it fails (``OTO._check_positions``).
    * A weight-standardised conv (timm's ``StdConv2d`` family) whose input channels go becomes
      ``PrunedStdConv2d`` (the resize), which keeps the old fan-in, and gets ``fill``, the moments of
      the removed columns (:func:`_fill_weight_standardisations`); a conv standardising its weight in
      its own forward is refused (``OTO.compress`` keeps those zero rows instead).
    * What the config still cannot express goes to ``config.otofx_widths`` (module name ->
      {attribute: new value}); with it absent, the config describes the model in full.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import re

import numpy as np
import torch
import torch.nn as nn

from otofx.errors import OTOError
from otofx.passes.modules import (PrunedGlobalResponseNorm, PrunedGroupNorm, PrunedLayerNorm, PrunedMultiheadAttention,
                                  PrunedOwnLayerNorm, PrunedRNN, PrunedStdConv2d, grow_fill, pool_moments, removed_moments)
from otofx.passes.prune import Plan, constant_fills, take
from otofx.passes.nodes import call_arguments, made_in, set_path, submodule, viewed_shapes
from otofx.passes.weightnorm import computed_shapes, own_classes, refit_gains, stale_weights
from otofx.passes.resize import (IN_WIDTHS, OUT_WIDTHS, STREAM_WIDTHS, Change, ResizeError, Scope, unique_new,
                                 apply_rms_fold, literal_moves, module_io_widths, resize,
                                 resync_counts,
                                 constant_scale_sources, grn_sites, norm_sites, rms_folds, rms_input_producer,
                                 batch_stats_sites, standardised_module,
                                 stream_scale_sources, scale_parameter, tied_head_norms, weightless_sites,
                                 weightless_stream_fold, resize_weightless_norms, magnitude_folds, own_norm_sites,
                                 own_norm_replacement, module_input_shapes, record_holders, record_ints,
                                 set_attr_or_field)

log = logging.getLogger("otofx")

RECURRENT = (nn.RNNBase, nn.RNNCellBase, PrunedRNN)


class RebuildError(OTOError):
    """The user's module tree cannot be re-sized to the plan (a tensor only the captured graph has,
    part of an attention head, a forward that does not run at the new widths)."""


def keep_indices(plan: Plan) -> dict:
    """``{tensor name: {dim: kept indices (np.ndarray)}}`` for every tensor axis that loses entries."""
    uf, out = plan.zigset.uf, {}
    for o in plan.zigset.owners:
        keep = ~plan.removed_roots[uf.find(o.ids)]
        if not keep.all():
            out.setdefault(o.name, {})[o.dim] = np.nonzero(keep)[0]
    return out


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def saved_originals(model: nn.Module) -> dict:
    """``{original's path: active copy's path}`` for each wrapper that keeps a module's original beside the
    copy its forward calls (peft's ``ModulesToSaveWrapper``: ``original_module`` and
    ``modules_to_save[active adapter]``; ``disable_adapter()`` and ``unload()`` go back to the original)."""
    out = {}
    for name, m in model.named_modules():
        orig, copies = getattr(m, "original_module", None), getattr(m, "modules_to_save", None)
        if not isinstance(orig, nn.Module) or not isinstance(copies, nn.ModuleDict):
            continue
        active = getattr(m, "active_adapter", None)
        if isinstance(active, (list, tuple)) and len(active) == 1:
            active = active[0]
        if isinstance(active, str) and active in copies:
            p = f"{name}." if name else ""
            out[f"{p}original_module"] = f"{p}modules_to_save.{active}"
    return out


def mirrored_originals(model: nn.Module, sliced: dict) -> dict:
    """``{original's weight name: copy's weight name}`` for the saved originals (:func:`saved_originals`)
    that are sliced as their copy is: a linear or conv layer whose copy loses input channels only
    (``sliced``: tensor name -> the dims it may lose).

    # NB: the original reads what the copy reads, and the base model's rows are zero where those
    # channels go, so the original's inputs are removable with the copy's, exactly, under
    # ``disable_adapter()`` too; an original losing output rows would not be: they are not zero"""
    out = {}
    for orig, copy_ in saved_originals(model).items():
        o, c = model.get_submodule(orig), model.get_submodule(copy_)
        w = f"{copy_}.weight"
        if not (isinstance(c, _LAYERS) and type(o) is type(c) and o.weight.shape == c.weight.shape) or w not in sliced:
            continue
        if f"{copy_}.bias" in sliced or 0 in sliced[w]:
            continue
        out[f"{orig}.weight"] = w
    return out


def _axis_groups(plan: Plan) -> dict:
    """``{(tensor name, dim): {(group index, entries per row)}}`` over every group."""
    out: dict = {}
    for g, z in enumerate(plan.zigset.zigs):
        for name, dim, index in z.params:
            out.setdefault((name, dim), set()).add((g, int(index.shape[1]) if index.dim() > 1 else 1))
    return out


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` (a Hugging Face model's token embedding), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _stream_axes(plan: Plan, model: nn.Module) -> set:
    """``{(tensor name, dim)}`` of the groups that hold the columns of the model's token embedding
    (:func:`_input_embedding`): the residual stream, whose width is ``config.hidden_size`` and no
    head count or inner width."""
    emb = _input_embedding(model)
    tables = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if m is emb and emb is not None}
    out = set()
    for z in plan.zigset.zigs:
        if any(name in tables and dim == 1 for name, dim, _ in z.params):
            out |= {(name, dim) for name, dim, _ in z.params}
    return out


def _tensors(model: nn.Module, plain: dict | None = None) -> dict:
    """Every parameter, buffer and plain tensor attribute of ``model``'s modules, by dotted name: the
    analysis slices a plain attribute the graph reads with the rows it meets (vit-pytorch's SimpleViT
    adds its sin-cos table, kept as ``self.pos_embedding``, to the stream). With ``plain``, only the plain
    attributes named there.

    # NB: the copy takes only the plain attributes it slices; the others are deep-copied as they were
    # (one may also sit in a list or a cache the copy must keep whole)"""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    for path, m in model.named_modules(remove_duplicate=False):
        for k, v in vars(m).items():
            name = f"{path}.{k}" if path else k
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and (plain is None or name in plain):
                named.setdefault(name, v)
    return named


def _sliced(t: torch.Tensor, cuts: dict | None) -> torch.Tensor:
    with torch.no_grad():
        data = t.detach()
        if cuts:
            data = take(data, [(dim, torch.from_numpy(keep)) for dim, keep in cuts.items()])
        else:
            data = data.clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def _copy_with_slices(model: nn.Module, cuts: dict) -> nn.Module:
    named = _tensors(model, plain=cuts)
    by_id: dict = {}
    for name, t in named.items():
        entry = by_id.setdefault(id(t), [t, None])
        if name in cuts:
            if entry[1] is not None and _cut_key(entry[1]) != _cut_key(cuts[name]):
                raise RebuildError(f"tensor '{name}' is tied to another name that the plan slices differently")
            entry[1] = cuts[name]
    memo, real = stale_weights(model), {}
    for key, (t, c) in by_id.items():
        ph = torch.empty(t.shape, dtype=t.dtype, device="meta")
        ph = nn.Parameter(ph, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else ph
        memo[key] = ph
        real[id(ph)] = (t, c)
    new = own_classes(copy.deepcopy(model, memo))
    made: dict = {}

    def fill(ph):
        k = id(ph)
        if k not in made:
            t, c = real[k]
            made[k] = _sliced(t, c)
        return made[k]

    for m in new.modules():
        for table in (m._parameters, m._buffers):
            for k, v in table.items():
                if v is not None and id(v) in real:
                    table[k] = fill(v)
        for k, v in list(m.__dict__.items()):  # a tensor also kept as a plain attribute
            if isinstance(v, torch.Tensor) and id(v) in real:
                m.__dict__[k] = fill(v)
    return new


def _cut_key(c: dict) -> tuple:
    return tuple((d, k.tobytes()) for d, k in sorted(c.items()))


def rebuild(model: nn.Module, plan: Plan, gm: torch.fx.GraphModule | None = None,
            follow_floats: bool = True, folds: list | None = None, inputs=None, fills: dict | None = None,
            follow_literals: bool = True, moved: list | None = None) -> nn.Module:
    """A copy of ``model`` with the plan's rows removed and its modules (and config) re-sized; with
    ``gm`` (the captured graph the plan is of), RMS norms over a narrowed axis are refolded,
    (``follow_literals``) int attributes that gave the forward a literal size the graph form
    recounts take its new value (:func:`_follow_literals`; ``moved``, when given, gets ``(module,
    attribute)`` of each), and (``follow_floats``) float attributes the config gives are made to
    follow it where a weight fold allows (:func:`_follow_floats`); ``folds``, when given, gets
    ``(module, attribute)`` of each such fold. ``inputs`` (``(args, kwargs)``, the example inputs)
    let a layer norm whose removed channels held constants get their values
    (``passes.prune.constant_fills``; ``fills``, a dict kept across calls on the same weights, keeps
    what its run read)."""
    cuts = keep_indices(plan)
    for orig, copy_ in mirrored_originals(model, cuts).items():
        cuts[orig] = cuts[copy_]
    named = _tensors(model)
    for name in cuts:
        if name not in named:
            raise RebuildError(f"the plan slices '{name}', which the captured graph has but "
                               f"{type(model).__name__} has no parameter or buffer of that name")
    new = _copy_with_slices(model, cuts)
    refit_gains(plan, model, new)
    old_shapes = {n: tuple(t.shape) for n, t in named.items()}
    stream = frozenset(_stream_axes(plan, model))
    groups = _axis_groups(plan)
    views = viewed_shapes(gm) if gm is not None else {}
    changed = _resize_modules(new, cuts, old_shapes, stream, groups, views)
    if gm is not None:
        _swap_own_layer_norms(new, model, gm, plan)
        moves = literal_moves(gm, plan) if follow_literals else {}
        done = _follow_records(new, model, moves, changed) if follow_literals else []
        done += _follow_literals(new, model, moves, changed) if follow_literals else []
        done += _follow_einops(new, model, moves, changed) if follow_literals else []
        done += _follow_io_widths(new, model, gm, plan, changed) if follow_literals else []
        if moved is not None:
            moved += done
    fills = constant_fills(gm, plan, inputs, fills) if gm is not None else {}
    _fill_layer_norms(new, plan, gm, fills)
    _fill_weight_standardisations(new, plan, gm, fills)
    if gm is not None:
        # NB: a norm's own forward divides by the new width; the graph form keeps the old divisor
        # (the mean's fix): eps and the weight absorb the ratio (OLMo 2's q/k norms, Mamba 2's
        # gated norm over every head)
        folds_rms = rms_folds(gm, plan, model)
        # NB: a norm without a weight that one linear layer alone reads refolds into that layer, unless
        # the stream scaling below serves every such norm as it is (NanoChat's): one regime, not both
        weightless = weightless_sites(gm, plan)
        scaled = weightless_stream_fold(gm, weightless, model)
        folded = frozenset(f.mean for f in folds_rms if f.weightless)
        if scaled is not None:
            folds_rms = [f for f in folds_rms if not f.weightless]
        elif folded:
            weightless = weightless_sites(gm, plan, folded)
            scaled = weightless_stream_fold(gm, weightless, model)
        for fold in folds_rms:
            holder = new.get_submodule(fold.eps_module) if fold.eps_module else None
            changed.setdefault(fold.eps_module or fold.module, {}).update(
                apply_rms_fold(new.get_submodule(fold.module), fold, holder))
            log.debug("otofx: %s: RMS norm over %d of %d entries refolded", fold.module, fold.new, fold.old)
        # NB: a norm without a weight has no float or weight to refold: the layers around it scale
        for name, factor in (scaled or {}).items():
            scale_parameter(new, name, factor)
            log.debug("otofx: %s scaled by %g around RMS norms without a weight", name, factor)
        resize_weightless_norms(new, weightless)
        # NB: a magnitude match (h * rms(g) / rms(h): Gemma 3n's AltUp) reads both roots at the new
        # width: the layer producing h scales so that rms(h) and its clamp see what they did
        for name, factor in magnitude_folds(gm, plan).items():
            scale_parameter(new, name, factor)
            log.debug("otofx: %s scaled by %g for a magnitude match", name, factor)
        _check_grns(new, gm, plan)
    _resync_stream_width(new, model, stream)  # NB: before the config fit, which compares these attributes
    _update_config(new, model, changed, cuts, old_shapes, stream, groups, gm if follow_floats else None, folds)
    # NB: a replacement module (PrunedMultiheadAttention, PrunedLayerNorm) is built in training mode
    copy_training_flags(new, model)
    # NB: modules that keep what they compute from their tensors re-derive it in their own _apply, as
    # .to() needs: timm's EfficientFormer and LeViT drop their cached attention biases (per device),
    # a stock LSTM re-points the weight list its forward reads (the slices were written past it). An
    # identity _apply makes the copy do both.
    new._apply(lambda t: t)
    return new


def _swap_own_layer_norms(new: nn.Module, model: nn.Module, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Replace each module of ``new`` whose own forward computes a layer norm alone over an axis the plan
    narrows (written out: ConvNeXt's and SAM's channels-first ``LayerNorm``, Cohere's; or ``F.layer_norm``
    of its tensors) by ``PrunedOwnLayerNorm``, which keeps the old divisor. A written-out norm no module
    computes alone (one written into a block's forward) is refused: it would divide by the new width
    (``OTO.compress`` keeps those rows: ``passes.resize.inline_layer_norm_groups``). A functional norm in
    a larger forward is left to the verification, as before."""
    done: dict = {}
    shapes = None  # NB: read off the graph once, at the first site that needs them
    for site in own_norm_sites(gm, plan.zigset, plan):
        m = submodule(new, site.module)
        if isinstance(m, PrunedOwnLayerNorm):  # NB: compressed again, or called twice: the first width divides
            if done.get(site.module, site.new) != site.new:
                raise RebuildError(f"module '{site.module}' normalises {done[site.module]} and {site.new} entries")
            done[site.module] = m.width = site.new
            continue
        if m is not None and shapes is None:
            shapes = module_input_shapes(gm)
        shape = shapes.get(site.module) if m is not None else None
        how = own_norm_replacement(model.get_submodule(site.module), shape, site.old, site.eps) \
            if shape is not None else None
        if how is None:
            if site.written:
                where = f"module '{site.module}' ({type(m).__name__})" if m is not None else f"node '{site.node}'"
                raise RebuildError(f"{where} computes a layer norm in its own forward, which would divide by the "
                                   f"{site.new} entries left, not the old {site.old}")
            continue
        set_path(new, site.module, PrunedOwnLayerNorm(m, width=site.new, full_width=site.old, **how))
        done[site.module] = site.new
        log.debug("otofx: %s: layer norm of its own forward over %d of %d entries replaced by PrunedOwnLayerNorm",
                  site.module, site.new, site.old)


def _check_grns(new: nn.Module, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Every GRN of ``gm`` over channels the plan narrows (``passes.resize.grn_sites``) must be a
    module the resize replaced by ``PrunedGlobalResponseNorm`` (timm's, Hugging Face's): a GRN written
    into another forward (the official ConvNeXt V2's own class, a user's block) divides by the new
    channel count. Each replacement takes the eps the graph adds (Hugging Face's is a literal).

    # NB: structural, not left to the verification: a GRN whose gamma is zero (its initial value)
    # computes x + beta whatever its divisor, and would pass it
    """
    eps: dict = {}
    for site in grn_sites(gm, plan):
        m = submodule(new, site.module)
        where = f"module '{site.module}' ({type(m).__name__})" if m is not None else f"node '{site.node}'"
        if not isinstance(m, PrunedGlobalResponseNorm):
            raise RebuildError(f"{where} computes a Global Response Normalization in its own forward, which would "
                               f"divide its channel mean by the {site.new} channels left, not the old {site.old}")
        if m.channels_last is not site.channels_last or m.num_channels != site.new \
                or eps.setdefault(site.module, site.eps) != site.eps:
            raise RebuildError(f"{where}: the GRN the graph computes (channels_last={site.channels_last}, "
                               f"{site.new} channels, eps {site.eps}) is not the one its class computes")
        m.eps = site.eps


def _norm_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The module a layer norm node of ``gm`` is: its call_module target, or the module holding the
    weight it reads (a traced ``PrunedLayerNorm``, an export capture's ``aten.layer_norm``)."""
    if node.op == "call_module":
        return node.target
    w = (call_arguments(node, gm) or {}).get("weight")
    name = w.target if isinstance(w, torch.fx.Node) and w.op == "get_attr" else getattr(w, "name", None)
    return name.rpartition(".")[0] if isinstance(name, str) and "." in name else None


def _fill_layer_norms(new: nn.Module, plan: Plan, gm: torch.fx.GraphModule | None, fills: dict) -> None:
    """Give each ``PrunedLayerNorm`` of ``new`` the constants its removed entries held (MLP-Mixer's
    residual stream: ``passes.prune.constant_fills``, ``fills``), after those an earlier compression
    filled in (zeros for the entries that were zero)."""
    values = {}
    if gm is not None:
        nodes = {n.name: n for n in gm.graph.nodes}
        standardised = {n.name for n, _ in batch_stats_sites(gm, plan.zigset)}
        for name, v in fills.items():
            if name in standardised:
                continue
            path = _norm_module(gm, nodes[name])
            if path is None and isinstance(submodule(new, made_in(nodes[name]) or ""), PrunedOwnLayerNorm):
                # NB: an nn.LayerNorm without weights (DiT's, over a stream holding its position table): no
                # weight names it; the module whose forward made the node does, and took its place
                path = made_in(nodes[name])
            if path is None:
                raise RebuildError(f"the layer norm at node '{name}' reads removed channels that hold constants, "
                                   "and no module of the model computes it to take them")
            if path in values and not torch.equal(values[path], v):
                # NB: one module called at two places, each reading other constants: one buffer cannot hold both
                raise RebuildError(f"the layer norm '{path}' is called at two places whose removed channels hold "
                                   "different constants")
            values[path] = v
    for path, m in new.named_modules():
        if not isinstance(m, (PrunedLayerNorm, PrunedOwnLayerNorm)):
            continue
        have = 0 if m.fill is None else m.fill.shape[-1]
        count = m.full_width - int(m.normalized_shape[-1]) - have
        v = values.pop(path, None)
        if v is not None and isinstance(m, PrunedOwnLayerNorm) and m.dim not in (-1, v.dim() - 1):
            # NB: the constants are read along the graph norm's last axis
            raise RebuildError(f"the layer norm '{path}' normalises axis {m.dim} of its input, whose removed "
                               "channels hold constants read along its last axis")
        if count > 0:
            m.fill = grow_fill(m.fill, v, count)
    if values:
        # NB: a functional norm in the model's forward, or a LayerNorm subclass with its own forward
        raise RebuildError(f"the layer norm(s) {', '.join(sorted(values))} read removed channels that hold "
                           "constants, and the model's own class has no PrunedLayerNorm there to fill them in")


def _fill_weight_standardisations(new: nn.Module, plan: Plan, gm: torch.fx.GraphModule | None, fills: dict) -> None:
    """Give each ``PrunedStdConv2d`` of ``new`` the moments of the weight entries its standardisation
    lost (``fills``: what they held, read by ``passes.prune.constant_fills``), pooled with those of an
    earlier compression. Every weight standardisation of ``gm`` whose input channels the plan removes
    must be one: a conv standardising its weight in its own forward would divide by its new fan-in
    (``OTO.compress`` keeps those rows: ``passes.resize.inline_standardisation_groups``)."""
    if gm is None:
        return
    seen = set()
    for node, lab in batch_stats_sites(gm, plan.zigset):
        if node.name not in fills:
            continue  # NB: its last axis keeps every entry
        path = standardised_module(gm, node)
        m = new.get_submodule(path) if path is not None else None
        if not isinstance(m, PrunedStdConv2d):
            if m is None:
                raise RebuildError(f"the batch norm at node '{node.name}' averages over an axis the plan narrows in "
                                   "the model's own forward, which would divide by the new count, not the old one")
            raise RebuildError(f"module '{path}' ({type(m).__name__}) standardises its weight over input channels the "
                               "plan removes in its own forward, which would divide by the new fan-in, not the old one")
        if path in seen:  # NB: one module called at two places: its moments are filled in once
            continue
        seen.add(path)
        uf, removed = plan.zigset.uf, plan.removed_roots
        keep = np.nonzero(~removed[uf.find(lab.ids[1])])[0]
        was, now = lab.shape[-1], int((~removed[uf.find(lab.ids[-1])]).sum())
        moments = removed_moments(fills[node.name], lab.shape[1], keep)
        m.fill = pool_moments(m.fill, m.full_fan_in - was, moments, was - now)


def copy_training_flags(small: nn.Module, model: nn.Module) -> None:
    """Each module of ``small`` takes the training flag of ``model``'s module of the same name (the
    model's own flag where there is none): a submodule the user froze in eval mode stays frozen."""
    mods = dict(model.named_modules())
    for name, m in small.named_modules():
        src = mods.get(name)
        m.training = src.training if src is not None else model.training


def _input_width(model: nn.Module) -> int | None:
    """The width of ``model``'s token embedding (:func:`_input_embedding`), or None."""
    w = getattr(_input_embedding(model), "weight", None)
    return int(w.shape[1]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def _resync_stream_width(new: nn.Module, model: nn.Module, stream: frozenset) -> None:
    """Modules that keep the residual stream's width as an attribute (``STREAM_WIDTHS``: Mixtral's
    router, Granite's MoE output view) follow the token embedding's new width, where they or their
    children hold a tensor of the stream (``stream``: a vision tower of the same width keeps its own)."""
    old, now = _input_width(model), _input_width(new)
    if old is None or now is None or old == now:
        return
    on_stream = set()
    for name, _ in stream:
        parts = name.split(".")[:-1]
        on_stream |= {".".join(parts[:k]) for k in (len(parts), len(parts) - 1) if k >= 0}
    for mname, m in new.named_modules():
        if mname not in on_stream:
            continue
        for attr in STREAM_WIDTHS:
            if m.__dict__.get(attr) == old and type(m.__dict__[attr]) is int:
                setattr(m, attr, now)
                log.debug("otofx: %s.%s = %d (was %d)", mname or type(new).__name__, attr, now, old)


def _resize_modules(new: nn.Module, cuts: dict, old_shapes: dict, stream: frozenset, groups: dict,
                    views: dict | None = None) -> dict:
    """Re-sync every module touched by ``cuts``, children first; returns {module: {attr: new}}.
    ``views``: the constant shapes the captured graph views each tensor to (``nodes.viewed_shapes``)."""
    # NB: a model without a token embedding (torchvision's ViT) has no stream kept apart, and its
    # stream's width names (``hidden_dim``) are widths like any other
    plain = _input_embedding(new) is None
    per_module: dict = {}
    for name, c in cuts.items():
        mod, _, attr = name.rpartition(".")
        per_module.setdefault(mod, {})[attr] = c
    modules = list(new.named_modules())
    computed = {}  # module -> {attribute: old shape} of the tensors its parametrisations or hooks compute
    for mname, m in modules:
        shapes = computed_shapes(m, mname, old_shapes)
        if shapes and (not mname or any(n.startswith(f"{mname}.") for n in cuts)):
            computed[mname] = shapes
            per_module.setdefault(mname, {})
    replaced: dict = {}
    changed: dict = {}
    for mname, m in reversed(modules):
        own = per_module.get(mname)
        if own or mname in computed:
            old = {a: old_shapes[f"{mname}.{a}" if mname else a] for a, _ in
                   list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
            old.update(computed.get(mname, {}))
            before = _int_attrs(m)
            try:
                seen = frozenset(v for a in old for v in (views or {}).get(f"{mname}.{a}" if mname else a, ()))
                repl = resize(m, Change(old, own, seen))
            except ResizeError as e:
                raise RebuildError(f"module '{mname}' ({type(m).__name__}): {e}") from None
            if repl is not None:
                replaced[mname] = repl
                changed[mname] = {"class": type(repl).__name__}
                changed[mname].update({k: v for k, v in _int_attrs(repl).items() if before.get(k) != v})
            diff = {k: v for k, v in _int_attrs(m).items() if before.get(k) != v}
            if diff:
                changed.setdefault(mname, {}).update(diff)
        # NB: a recurrent layer's resizer set its sizes from its own tensors; its hidden_size and
        # input_size are also names resync_counts moves by any changed width that had the same value
        if isinstance(m, RECURRENT):
            continue
        scope = _scope(mname, m, cuts, old_shapes, stream, groups)
        if scope.widths:
            done = resync_counts(m, scope, stream_widths=plain)
            if done:
                log.debug("otofx: %s: %s", mname or type(m).__name__, done)
                changed.setdefault(mname, {}).update({k: v[1] for k, v in done.items()})
    for mname, repl in replaced.items():
        set_path(new, mname, repl)
    # NB: torch's encoder chooses its nested-tensor path (padding masks in eval) once, when built; a
    # pruned attention takes no nested tensor
    for m in new.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and \
                any(isinstance(a, PrunedMultiheadAttention) for a in m.modules()):
            m.use_nested_tensor = False
    return changed


def _float_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in m.__dict__.items() if type(v) is float}


def _int_attrs(m: nn.Module, lists: bool = False) -> dict:
    """``m``'s int attributes and tuples of ints (as lists); with ``lists``, lists of ints too."""
    out = {}
    for k, v in m.__dict__.items():
        if type(v) is int:
            out[k] = v
        elif (type(v) is tuple or (lists and type(v) is list)) and v and all(type(e) is int for e in v):
            out[k] = list(v)
    return out


def _move_attrs(news: dict, follow: list, changed: dict, why: str) -> None:
    """Set each ``(module, attribute, old value, new value)`` of ``follow`` on ``news`` (module name ->
    module of the copy) and record it in ``changed``. An attribute ``"config.n_head"`` is a field of a
    record the module holds (``passes.resize.is_record``): a record other modules hold too is copied
    for this one first."""
    shared = record_holders(news.values()) if any("." in k for _, k, _, _ in follow) else None
    for name, k, v, f in follow:
        set_attr_or_field(news[name], k, f, shared)
        changed.setdefault(name, {})[k] = f
        log.debug("otofx: %s.%s = %s (was %s), %s", name or "the model", k, f, v, why)


def _follow_literals(new: nn.Module, model: nn.Module, moves: dict, changed: dict) -> list:
    """Int attributes (and tuples or lists of ints) of ``new``'s modules that gave their own forward a
    literal size or position the graph form recounts (``moves``: :func:`otofx.passes.resize.literal_moves`)
    take its new value: FasterNet's split sizes ``dim_conv3``/``dim_untouched``, InceptionNeXt's
    ``split_indexes``, Res2Net's ``width`` (an int split size whose pieces now differ becomes their
    list), ReXNet's ``in_channels`` (the slice of the output that the shortcut adds into).

    As :func:`_follow_config`: only an attribute still at the model's value (no rule re-synced it), and
    only a move one of the plan's changes made: each must be the one new value of that literal in the
    module's forward; and all or nothing per module: one attribute whose number the rewrite recounts
    differently in two places (or keeps in one) leaves every attribute of that module as it was.
    The attributes of the module's direct children that are not torch.nn's count as its own (a forward
    reading ``self.update_block.hidden_state_size``: RAFT); an attribute two forwards move to different
    values stays.
    # NB: a guess all the same (an attribute that also scales something, or equals a literal by
    # coincidence): ``OTO.compress`` verifies the copy on the example inputs, rebuilds without the moves
    # when it fails, and the own-class search keeps the groups of a module whose copy goes wrong (no
    # literal moves where nothing is removed)

    Returns ``(module, attribute)`` of each move.
    """
    olds, news, found = dict(model.named_modules()), dict(new.named_modules()), {}
    for path, literals in moves.items():
        m, old = news.get(path), olds.get(path)
        if m is None or old is None or type(m) is not type(old):
            continue
        here: list = []
        for name in [path] + [c for c in _attribute_children(path, m, old) if c in news and c in olds]:
            # NB: a child registered under several names (CoaT's shared position encoding) has its first
            # name only in named_modules(): it is followed there, not here
            got = _literal_attrs(news[name], olds[name], literals, sizes_only=name != path)
            if got is None:
                here = []
                break
            here += [(name, k, held, f) for k, held, f in got]
        for name, k, held, f in here:
            found.setdefault((name, k), []).append((held, f))
    # NB: an attribute two forwards recount differently takes neither value
    follow = [(name, k, got[0][0], got[0][1]) for (name, k), got in found.items()
              if all(f == got[0][1] for _, f in got)]
    _move_attrs(news, follow, changed, "as the graph form recounts the literal it gave")
    return [(name, k) for name, k, _, _ in follow]


def _follow_einops(new: nn.Module, model: nn.Module, moves: dict, changed: dict) -> list:
    """einops' ``Rearrange``/``Reduce`` layers (``Rearrange('b n (h d) -> b h n d', h=heads)``: vit-pytorch,
    lucidrains' models) hold their axis lengths in a dict (``axes_lengths``, mirrored as the tuple
    ``_axes_lengths`` their forward reads): a length that is a literal the graph form recounts in the
    layer's forward, to one new value, takes it (a head count); one that moves two ways stays.
    Returns ``(module, "axes_lengths.axis")`` of each move."""
    olds, out = dict(model.named_modules()), []
    for path, m in new.named_modules():
        if _qualname(m) not in _EINOPS_LAYERS or path not in moves or type(olds.get(path)) is not type(m):
            continue
        lengths = dict(getattr(m, "axes_lengths", {}) or {})
        literals, moved = moves[path], {}
        for axis, v in lengths.items():
            found = literals.get(v, set()) - {v} if type(v) is int else set()
            if found and len(literals[v]) == 1 and type(next(iter(found))) is int:
                moved[axis] = next(iter(found))
        if not moved:
            continue
        m.axes_lengths = {**lengths, **moved}
        m._axes_lengths = tuple(m.axes_lengths.items())
        for axis, f in moved.items():
            changed.setdefault(path, {})[f"axes_lengths.{axis}"] = f
            log.debug("otofx: %s.axes_lengths[%r] = %d (was %d), as the graph form recounts it", path, axis, f,
                      lengths[axis])
            out.append((path, f"axes_lengths.{axis}"))
    return out


_EINOPS_LAYERS = ("einops.layers.torch.Rearrange", "einops.layers.torch.Reduce")


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _follow_records(new: nn.Module, model: nn.Module, moves: dict, changed: dict) -> list:
    """Fields of the records a module holds (``passes.resize.is_record``: litgpt's one ``Config`` that
    every block reads its head counts from, ``self.config.n_head``) follow the module's new widths: a
    field named as a size or count whose value is a literal the graph form recounts in the module's
    forward (``moves``) takes, among its old value, those recounts and the new widths of the module's
    tensor axes that had its value, the one under which the module's class, built again from the
    record (on the meta device, its other constructor arguments from the module's attributes), has the
    copy's tensor shapes (:func:`_fit_record`). The record is copied for the module first when other
    modules share it (``set_attr_or_field``), so each attention block holds its own head counts.

    # NB: a search, not a reading: a head count of 4 that equals a rotary half-width of 4 (the view
    # moves one 4, the slice keeps the other) is told apart by what the class builds from each choice.
    # A module whose class cannot be rebuilt that way follows the literals that moved one way only.
    Returns ``(module, "attribute.field")`` of each move."""
    olds, news = dict(model.named_modules()), dict(new.named_modules())
    follow = []
    for path, literals in moves.items():
        m, old = news.get(path), olds.get(path)
        if m is None or old is None or type(m) is not type(old):
            continue
        now_ints = record_ints(m)
        held = {k: v for k, v in record_ints(old).items() if _RECORD_SIZE.search(k.partition(".")[2])
                and now_ints.get(k) == v}
        options = {}
        for k, v in held.items():
            key = tuple(v) if isinstance(v, list) else v
            found = literals.get(key, set()) - {key}
            if found and type(v) is int:
                options[k] = [v] + sorted(f for f in found if type(f) is int)
        if not options:
            continue
        # NB: the widths the module's tensors changed from and to give the fields no literal names (a
        # stream width the forward reads off its input)
        was, now = _shapes_of(old), _shapes_of(m)
        pairs = {(a, b) for n in now if n in was and len(was[n]) == len(now[n]) for a, b in zip(was[n], now[n])
                 if a != b}
        for k, v in held.items():
            extra = sorted({b for a, b in pairs if a == v} - set(options.get(k, [v])))
            if extra and type(v) is int:
                options[k] = options.get(k, [v]) + extra
        got = _fit_record(m, old, options)
        if got is None:
            # NB: no build to tell choices apart: the literals that moved one way only, all or none
            moved = {k: literals.get(held[k], set()) for k in options}
            moved = {k: f for k, f in moved.items() if f - {held[k]}}
            plain = {k: next(iter(f)) for k, f in moved.items() if len(f) == 1}
            got = plain if len(plain) == len(moved) else {}
        follow += [(path, k, held[k], f) for k, f in got.items() if f != held[k]]
    _move_attrs(news, follow, changed, "as the module's class builds its new shapes from it")
    return [(name, k) for name, k, _, _ in follow]


def _shapes_of(m: nn.Module) -> dict:
    return {n: tuple(t.shape) for n, t in list(m.named_parameters()) + list(m.named_buffers())}


def _build_like(m: nn.Module, records: dict):
    """``type(m)`` built again on the meta device, its constructor's arguments named as ``m``'s records
    taking ``records`` (attribute -> record) and the others ``m``'s attributes of those names (or their
    defaults); None when the constructor takes something ``m`` does not hold, or fails."""
    try:
        params = list(inspect.signature(type(m).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    args, kwargs = [], {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in records:
            v = records[p.name]
        elif p.name in m.__dict__ and not isinstance(m.__dict__[p.name], (nn.Module, torch.Tensor)):
            v = m.__dict__[p.name]
        elif p.default is not p.empty:
            continue
        else:
            return None
        if p.kind == p.POSITIONAL_ONLY:
            args.append(v)
        else:
            kwargs[p.name] = v
    return _build(type(m), *args, **kwargs)


def _dims_off(shapes: dict, want: dict) -> int | None:
    """How many tensor dimensions differ between ``shapes`` and ``want`` (None: not the same tensors)."""
    if set(shapes) != set(want):
        return None
    return sum(len(a) + len(b) if len(a) != len(b) else sum(x != y for x, y in zip(a, b))
               for a, b in ((shapes[n], want[n]) for n in want))


def _fit_record(m: nn.Module, old: nn.Module, options: dict) -> dict | None:
    """``{"attribute.field": value}`` under which ``type(m)`` built from ``m``'s records has ``m``'s
    tensor shapes, found greedily among ``options`` (field -> candidate values, the held value first):
    each round takes the one change that leaves the fewest tensor dimensions off, until none are.
    None when the class, built from the old records, does not have ``old``'s shapes (the constructor
    is not what made the module), or no choice builds the new shapes."""
    recs = {a: v for a, v in m.__dict__.items() if any(k.partition(".")[0] == a for k in options)}
    base = _build_like(old, {a: old.__dict__[a] for a in recs})
    if base is None or _dims_off(_shapes_of(base), _shapes_of(old)) != 0:
        return None
    want = _shapes_of(m)
    choice = {k: opts[0] for k, opts in options.items()}

    def off(ch: dict) -> int | None:
        trial = {a: copy.copy(r) for a, r in recs.items()}
        for k, v in ch.items():
            a, _, f = k.partition(".")
            object.__setattr__(trial[a], f, v)
        built = _build_like(m, trial)
        return None if built is None else _dims_off(_shapes_of(built), want)

    now = off(choice)
    for _ in range(len(options)):
        if now == 0:
            break
        best = None
        for k, opts in options.items():
            for v in opts:
                if v == choice[k]:
                    continue
                got = off({**choice, k: v})
                if got is not None and (now is None or got < now) and (best is None or got < best[0]):
                    best = (got, k, v)
        if best is None:
            break
        now, choice[best[1]] = best[0], best[2]
    return choice if now == 0 else None


def _follow_io_widths(new: nn.Module, model: nn.Module, gm: torch.fx.GraphModule, plan: Plan, changed: dict) -> list:
    """Int attributes named as a module's input or output width (``IN_WIDTHS``, ``OUT_WIDTHS``) of the
    modules of the user's or a library's class (not torch.nn's, whose resizers own theirs) take the new
    width of the channel axis of the tensors the module reads (or makes) that had their value, when
    one new width is found (``passes.resize.module_io_widths``): diffusers' ``Upsample2D`` asserts
    ``hidden_states.shape[1] == self.channels``, and its conv's input and output widths, both 64, do
    not say which is ``channels``.

    # NB: a guess, as :func:`_follow_literals`'s (which see): the copy is verified, and made again
    # without these moves when it fails
    Returns ``(module, attribute)`` of each move."""
    ins, outs = module_io_widths(gm, plan.zigset, plan)
    olds, follow = dict(model.named_modules()), []
    for path, m in new.named_modules():
        old = olds.get(path)
        if not path or old is None or type(m) is not type(old) or type(m).__module__.startswith("torch."):
            continue
        for names, pairs in ((IN_WIDTHS, ins.get(path)), (OUT_WIDTHS, outs.get(path))):
            for attr in names if pairs else ():
                v = m.__dict__.get(attr)
                if type(v) is not int or old.__dict__.get(attr) != v:
                    continue  # NB: not a width, or re-synced already
                f = unique_new(pairs, v)
                if f is not None and f != v:
                    follow.append((path, attr, v, f))
    _move_attrs(dict(new.named_modules()), follow, changed, "as the width of what the module reads or makes")
    return [(name, k) for name, k, _, _ in follow]


def _attribute_children(path: str, m: nn.Module, old: nn.Module) -> list:
    """Names of the direct children of ``m`` (at ``path``) whose int attributes its forward may read as
    sizes (RAFT's ``self.update_block.hidden_state_size``): the children of the user's or a library's
    classes, not torch.nn's, whose attributes the resize rules own."""
    prefix = f"{path}." if path else ""
    out = []
    for c, child in m.named_children():
        was = getattr(old, c, None)
        if type(child) is type(was) and not type(child).__module__.startswith("torch."):
            out.append(prefix + c)
    return out


_SIZE_NAME = re.compile(r"size|dim|width|channel|feature|hidden|head|split|inner", re.IGNORECASE)
# a record's fields followed as sizes (litgpt's Config: n_head, n_query_groups, n_embd, head_size)
_RECORD_SIZE = re.compile(_SIZE_NAME.pattern + r"|group|embd|expert", re.IGNORECASE)


def _literal_attrs(m: nn.Module, old: nn.Module, literals: dict, sizes_only: bool = False) -> list | None:
    """``(attribute, held, new)`` of each int attribute of ``m`` still at ``old``'s value whose literal
    moved to one new value; None when one moved to several. ``sizes_only``
    (a child's attributes, which its parent's forward may or may not read): only attributes named as
    sizes (``hidden_state_size``, ``out_dim``...), not a ``layer_idx`` equal to a literal by chance."""
    now, here = _int_attrs(m, lists=True), []
    for k, v in _int_attrs(old, lists=True).items():
        if sizes_only and not _SIZE_NAME.search(k):
            continue
        if now.get(k) != v:
            continue  # NB: re-synced already (a rule, resync_counts)
        key = tuple(v) if isinstance(v, list) else v
        found = literals.get(key, set())
        if not found - {key}:
            continue  # NB: no literal of its value moved
        if len(found) != 1:
            # NB: a number the rewrite moves one way in one place and another way (or not at
            # all) in another: no size to follow, and the module's other moves would leave its
            # sizes at odds with each other (MiniCPM3's q split by two head widths of 8, one of
            # which lost entries, viewed by their sum): none of them
            return None
        f = next(iter(found))
        held = m.__dict__[k]
        if type(held) is int and isinstance(f, tuple):
            f = f[0] if len(set(f)) == 1 else list(f)  # NB: torch.split takes an int or a list
        elif isinstance(held, (tuple, list)):
            f = type(held)(f) if isinstance(f, tuple) and len(f) == len(held) else None
        if f is not None:
            here.append((k, held, f))
    return here


def _scope(mname: str, m: nn.Module, cuts: dict, old_shapes: dict, stream: frozenset, groups: dict) -> Scope:
    """Changed axes among ``m``'s own tensors and its direct children's, with their row blocks
    (``groups``: :func:`_axis_groups`). The residual stream's axes (``stream``) are kept apart, and
    an axis counts heads only when a group on it has rows of several entries in this scope (whole
    heads); otherwise it is a width only: a low rank that equals a head count (DSA's indexer heads)
    must not move it."""
    prefix = f"{mname}." if mname else ""

    def held(sub: nn.Module) -> list:
        return [a for a, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))]

    names = [prefix + a for a in held(m)]
    for child, sub in m.named_children():
        names += [f"{prefix}{child}.{a}" for a in held(sub)]
        if not held(sub):
            # NB: a wrapper without tensors of its own (Ultralytics' and timm's conv-norm-act ``Conv``: its
            # ``conv`` and ``bn``) counts with the leaves it wraps: YOLO11's attention reads its heads off
            # ``qkv.conv``
            names += [f"{prefix}{child}.{g}.{a}" for g, leaf in sub.named_children() if not list(leaf.children())
                      for a in held(leaf)]
    scope = Scope()
    near, multi = set(), set()
    for n in names:
        for dim in range(len(old_shapes.get(n, ()))):
            for g, b in groups.get((n, dim), ()):
                near.add(b)
                if b > 1:
                    multi.add(g)
    for n in names:
        for dim, keep in cuts.get(n, {}).items():
            if (n, dim) in stream:
                scope.stream.add((old_shapes[n][dim], len(keep)))
            elif not {g for g, _ in groups.get((n, dim), ())} & multi:
                scope.widths.add((old_shapes[n][dim], len(keep)))
            else:
                scope.add_axis(old_shapes[n][dim], len(keep), near)
    return scope


# ---------------------------------------------------------------------------------------------
# Hugging Face configs
# ---------------------------------------------------------------------------------------------


def _shapes(model: nn.Module) -> dict:
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


@dataclasses.dataclass(frozen=True)
class _Want:
    """What a config must build: the tensors' shapes and the int attributes its modules take from it."""

    shapes: dict
    attrs: dict  # module name -> {attribute: value}
    given: dict  # module name -> {attribute: the value the model's own config gave it}
    floats: dict = dataclasses.field(default_factory=dict)  # module -> {attribute: (config-given old, new)}
    classes: dict = dataclasses.field(default_factory=dict)  # module -> the class that replaced the config's


def _want(new: nn.Module, model: nn.Module) -> _Want:
    """``new``'s shapes and the int attributes that ``model``'s own config gives ``model`` (an
    attribute a config build does not reproduce, set later, is not the config's to match)."""
    try:
        with torch.device("meta"):
            base = dict(type(model)(copy.deepcopy(model.config)).named_modules())
    except Exception:  # noqa: BLE001 - a model its config does not rebuild: shapes only
        base = {}
    news = dict(new.named_modules())
    attrs, olds, floats, classes = {}, {}, {}, {}
    for name, m in model.named_modules():
        b = base.get(name)
        if b is None or type(b) is not type(m) or name not in news:
            continue
        if type(news[name]) is not type(m):
            classes[name] = type(news[name])
        fgiven, fnow = _float_attrs(b), _float_attrs(news[name])
        fsame = {k: (v, fnow[k]) for k, v in _float_attrs(m).items() if fgiven.get(k) == v and k in fnow}
        if fsame:
            floats[name] = fsame
        given = _int_attrs(b)
        now = _int_attrs(news[name])
        same = {k: v for k, v in _int_attrs(m).items() if given.get(k) == v and k in now}
        if same:
            attrs[name] = {k: now[k] for k in same}
            if type(news[name]) is type(m):  # NB: a replaced module (PrunedMultiheadAttention) follows no config
                olds[name] = same
    return _Want(_shapes(new), attrs, olds, floats, classes)


def _build(cls, *args, **kwargs) -> nn.Module | None:
    """``cls(*args, **kwargs)`` (a config) on the meta device, or None when they do not build it."""
    try:
        with torch.device("meta"):
            return cls(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any error of the user's class
        return None


def _mismatch(cls, config, want: _Want, built: nn.Module | None = None) -> int:
    """How many tensors of ``cls(config)`` (built on the meta device, unless ``built`` is it) differ
    from ``want``'s shapes, plus how many of its modules' config-given int attributes differ from
    ``want``'s (Phi-3's head_dim: 4 heads of 4 and 2 heads of 8 build the same shapes)."""
    built = built if built is not None else _build(cls, config)
    if built is None:  # a config that does not build counts as no match
        return len(want.shapes) + 1
    got = _shapes(built)
    bad = sum(got.get(k) != v for k, v in want.shapes.items()) + sum(k not in want.shapes for k in got)
    return bad + sum(1 for _ in _attrs_off(built, want))


def _attrs_off(built: nn.Module, want: _Want):
    """Each config-given int attribute of ``built``'s modules that differs from ``want``'s, as ``(module,
    attribute, wanted, built's)``, then each module of a class otofx replaced, as ``(module, None, class,
    built's class)``."""
    mods = dict(built.named_modules())
    for name, attrs in want.attrs.items():
        have = _int_attrs(mods[name]) if name in mods else {}
        yield from ((name, k, v, have.get(k)) for k, v in attrs.items() if have.get(k) != v)
    # NB: a module otofx replaced (PrunedLayerNorm keeps its old divisor) is one no config builds
    yield from ((name, None, cls, type(mods.get(name))) for name, cls in want.classes.items()
                if type(mods.get(name)) is not cls)


def _fit(cls, config, pairs: set, want: _Want) -> int:
    """Set ``config``'s int fields (and the entries of its per-layer lists of ints), one at a time,
    to the new value of a changed width or count they held, keeping each change that lowers
    :func:`_mismatch`; returns the mismatch left."""
    best = _mismatch(cls, config, want)
    if not best:
        return best
    # NB: head widths last: pruning removes whole heads, and a head width tried early can fit more
    # shapes on its own (GPT-OSS: head_dim 4 for 4 heads builds 2 heads of 8's q_proj) and leave
    # the fit where no single move improves it
    fields = sorted(_config_fields(config), key=lambda f: f[2].endswith("head_dim"))
    for where, owner, key, value in fields:
        # NB: ints are written, never read back: a per-layer config (Gemma 4) refuses a global read
        current = value if type(value) is int else list(value)
        for i in [None] if type(value) is int else range(len(value)):
            old = current if i is None else current[i]
            for cand in sorted({n for o, n in pairs if o == old}):
                trial = cand if i is None else [cand if j == i else v for j, v in enumerate(current)]
                try:
                    setattr(owner, key, trial)
                except Exception:  # noqa: BLE001 - a validating setter (a backbone's out_indices [1, 2, 3, 2])
                    setattr(owner, key, current)
                    continue
                score = _mismatch(cls, config, want)
                if score < best and not _valid(config):
                    score = best  # NB: a strict config (Mamba 2: heads * head_dim == expand * hidden) refuses it on load
                if score < best:
                    best, current = score, trial
                    log.debug("otofx: config.%s%s%s = %d (was %d)", where, key, "" if i is None else f"[{i}]", cand, old)
                    break
                setattr(owner, key, current)
            if not best:
                return best
    return best


def _config_fields(config, where: str = "", kind: type = int):
    """``(path, owner, key, value)`` of every int field (or list of ints: Gemma 3n's per-layer
    ``intermediate_size``) of ``config`` and of the configs nested in it (a multi-modal model's
    ``text_config``); of every float field with ``kind=float``."""
    for key, value in config.to_dict().items():
        if key.startswith("_"):
            continue
        if type(value) is kind or (kind is int and isinstance(value, list) and value
                                   and all(type(v) is int for v in value)):
            try:
                now = getattr(config, key)
            except Exception:  # noqa: BLE001 - a per-layer config (Gemma 4) refuses a global read
                now = value
            if (list(now) if isinstance(now, tuple) else now) != value:
                continue  # NB: serialised otherwise than held (Dory writes twice its num_hidden_layers)
            yield where, config, key, value
        elif isinstance(value, dict) and hasattr(getattr(config, key, None), "to_dict"):
            yield from _config_fields(getattr(config, key), f"{where}{key}.", kind)


def _floats_off(built: nn.Module | None, want: _Want) -> list:
    """``[(module, attribute, new model's value, built's value or None)]``: the config-given float
    attributes (``want.floats``) that ``built`` (a model built from a config) gives otherwise."""
    mods = dict(built.named_modules()) if built is not None else {}
    out = []
    for name, attrs in want.floats.items():
        for k, (_, have) in attrs.items():
            got = _float_attrs(mods[name]).get(k) if name in mods else None
            if got != have:
                out.append((name, k, have, got))
    return out


def _fit_float_fields(cls, config, want: _Want) -> list:
    """Set ``config``'s float fields, one at a time, from an old value to the new value of an
    attribute that held it, keeping each change that gets more of ``want.floats`` right (LLaMA's
    ``rms_norm_eps`` times old/new when every norm it gives lost the same share of the hidden
    width); returns the ``(owner, key, old value)`` changed, to undo."""
    moves = {(o, n) for a in want.floats.values() for o, n in a.values() if o != n}
    best = len(_floats_off(_build(cls, config), want))
    done = []
    for where, owner, key, value in list(_config_fields(config, kind=float)):
        if not best:
            break
        for cand in sorted({n for o, n in moves if o == value}):
            try:
                setattr(owner, key, cand)
            except Exception:  # noqa: BLE001 - a validating setter refuses it
                setattr(owner, key, value)
                continue
            score = len(_floats_off(_build(cls, config), want))
            if score < best and _valid(config):
                best = score
                done.append((owner, key, value))
                log.debug("otofx: config.%s%s = %g (was %g)", where, key, cand, value)
                break
            setattr(owner, key, value)
    return done


def _float_fold(new: nn.Module, gm, name: str, attr: str, have: float, want: float, cuts: dict,
                sites: dict | None = None):
    """A function that lets module ``name``'s float ``attr`` take the config's value ``want``
    instead of ``have``, its weights absorbing the difference, or None when no fold is known:

    * an RMS norm's eps whose input a linear layer alone produces (Qwen 3's q/k norms when the
      config's eps follows the hidden norms' refolded one): that layer scaled by sqrt(want/have);
    * an embedding's output scale held as an attribute and a 0-d buffer (Gemma's ``hidden_size **
      0.5``): the table scaled by have/want; a tied LM head is then scaled back through the weight
      of the RMS norm that alone feeds it (:func:`otofx.passes.resize.tied_head_norms`);
    * a float the forward multiplies a layer's output by (Gemma 4's ``per_layer_model_projection_scale
      = hidden_size ** -0.5``): that layer's parameters scaled by have/want
      (:func:`otofx.passes.resize.constant_scale_sources`)."""
    m = new.get_submodule(name)
    if gm is None or not have or not want:
        return None
    if isinstance(m, nn.Embedding):
        bufs = [b for b, t in m._buffers.items() if isinstance(t, torch.Tensor) and t.dim() == 0
                and t.is_floating_point() and abs(float(t) - have) <= 1e-6 * abs(have)]
        if len(bufs) != 1 or m.weight is None:
            return None
        tied = {n for n, p in new.named_parameters(remove_duplicate=False) if p is m.weight}
        heads = tied_head_norms(gm, tied, sites) if len(tied) > 1 else []
        if heads is None or (len(tied) > 1 and not heads):
            return None

        def fold():
            scale_parameter(new, f"{name}.weight" if name else "weight", have / want)
            for w, one_plus in heads:
                scale_parameter(new, w, want / have, one_plus)
            setattr(m, attr, want)
            with torch.no_grad():
                m._buffers[bufs[0]].fill_(want)
        return fold
    params = rms_input_producer(gm, name, sites)
    if params and want / have > 0:
        def fold():
            for p, rows in params:
                keep = cuts.get(p, {}).get(0)
                if rows is not None and keep is not None:  # NB: the graph's rows are the old model's
                    rows = (int((keep < rows[0]).sum()), int((keep < rows[1]).sum()))
                scale_parameter(new, p, (want / have) ** 0.5, rows=rows)
            setattr(m, attr, want)
        return fold
    params = constant_scale_sources(gm, have, name)
    if params:
        def fold():
            for p in params:
                scale_parameter(new, p, have / want)
            setattr(m, attr, want)
        return fold
    return None


def _stream_fold(new: nn.Module, gm, items: list, sites: dict):
    """A function that lets the RMS norms of a residual stream (``items``: ``(module, attribute, have,
    want)``, each an eps) take the config's eps, or None: the layers writing the stream are scaled by
    c = sqrt(want / have) (:func:`otofx.passes.resize.stream_scale_sources`), which the norms' eps times
    c**2 cancels (Qwen 3.5's linear-attention norms share ``rms_norm_eps`` with the hidden norms but not
    their width, so the config cannot follow the hidden norms' refolded eps); a tied LM head is scaled
    back through the norm that alone feeds it."""
    ratios: dict = {}
    for name, k, have, want in items:
        ratios.setdefault(round(want / have, 9), []).append((name, k, want))
    plan, taken = [], set()
    for ratio, norms in ratios.items():
        found = stream_scale_sources(gm, sorted({n for n, _, _ in norms}), sites)
        if not found:
            return None
        sources, heads = found[0], dict(found[1])
        params = {}
        for name in sources:
            p = new.get_parameter(name)
            if id(p) in taken:
                return None  # NB: two streams share a layer
            taken.add(id(p))
            params.setdefault(id(p), name)
            tied = {n for n, q in new.named_parameters(remove_duplicate=False) if q is p}
            if len(tied) > 1:  # NB: tied under another name the graph reads apart
                more = tied_head_norms(gm, tied, sites)
                if not more:
                    return None
                heads.update(more)
        plan.append((ratio ** 0.5, sorted(params.values()), sorted(heads.items()), norms))

    def fold():
        for c, names, heads, norms in plan:
            for name in names:
                scale_parameter(new, name, c)
            for w, one_plus in heads:
                scale_parameter(new, w, 1 / c, one_plus)
            for name, k, want in norms:
                setattr(new.get_submodule(name), k, want)
    return fold


def _float_plan(new: nn.Module, config, want: _Want, gm, cuts: dict, sites: dict) -> list | None:
    """``[(module, attribute, have, want, fold)]`` for every config-given float attribute that
    ``cls(config)`` gives otherwise, or None when one has no fold. RMS norm eps no single fold reaches
    are folded together when they are a residual stream's (:func:`_stream_fold`)."""
    todo, stream = [], []
    for name, k, have, got in _floats_off(_build(type(new), config), want):
        f = _float_fold(new, gm, name, k, have, got, cuts, sites) if type(got) is float else None
        if f is None and type(got) is float and name in sites and have > 0 and got > 0:
            stream.append((name, k, have, got))
            continue
        if f is None:
            log.debug("otofx: %s.%s = %r, but the config gives %r: no fold", name, k, have, got)
            return None
        todo.append((name, k, have, got, f))
    if stream:
        f = _stream_fold(new, gm, stream, sites) if gm is not None else None
        if f is None:
            log.debug("otofx: %d norm eps off the config's (%s.%s = %r) and no residual stream to scale",
                      len(stream), *stream[0][:3])
            return None
        todo.append(("the residual stream", f"{len(stream)} norm eps", stream[0][2], stream[0][3], f))
    return todo


def _follow_floats(new: nn.Module, config, want: _Want, gm, cuts: dict, folds: list | None = None) -> dict:
    """Make every config-given float attribute of ``new`` what ``cls(config)`` gives it, so that
    ``save_pretrained`` + ``from_pretrained`` build the same function: first the config's float
    fields (:func:`_fit_float_fields`), then, for each attribute still off, a fold of the model's
    weights (:func:`_float_plan`). When that fails, the config's fields as they were, the weights
    folding to them (the residual stream scaled rather than ``rms_norm_eps`` moved). All or nothing:
    else the config's fields are restored and the model is left as it is. Returns the attributes
    still off, ``{module: {attribute: value}}`` (empty when all match); ``folds`` gets ``(module,
    attribute)`` of each fold applied."""
    if not want.floats:
        return {}
    cls = type(new)
    sites = norm_sites(gm) if gm is not None else {}
    done = _fit_float_fields(cls, config, want)
    todo = _float_plan(new, config, want, gm, cuts, sites)
    if todo is None and done:
        for owner, key, value in reversed(done):
            setattr(owner, key, value)
        done = []
        todo = _float_plan(new, config, want, gm, cuts, sites)
    if todo is None:  # NB: the config's fields are as they were (restored above, or never moved)
        off: dict = {}
        for n, a, h, _ in _floats_off(_build(cls, config), want):
            off.setdefault(n, {})[a] = h
        return off
    for name, k, have, got, f in todo:
        f()
        if folds is not None:
            folds.append((name, k))
        log.debug("otofx: %s.%s = %g (was %g), as the config gives it; weights rescaled", name, k, got, have)
    return {}


def _follow_config(new: nn.Module, config, want: _Want, changed: dict, pairs: set) -> int:
    """When ``config`` builds exactly ``new``'s tensor shapes and only module int attributes differ,
    each by a change of width or count the plan made (``pairs``): the attributes the old config gave
    the model (``want.given``) that no rule re-synced (Gemma 4's ``hidden_size_per_layer_input`` on
    the text model, which reshapes by it) take the value the new config gives them, as
    ``cls(config)`` (and so ``from_pretrained`` of the saved model) would have it. All or nothing.
    Returns the mismatch left."""
    built = _build(type(new), config)
    if built is None or _shapes(built) != want.shapes:
        return _mismatch(type(new), config, want, built)
    mods, news, follow = dict(built.named_modules()), dict(new.named_modules()), []
    for name, given in want.given.items():
        b = mods.get(name)
        if b is None or type(b) is not type(news[name]):
            continue
        fresh = _int_attrs(b)
        for k, v in given.items():
            # NB: only what is untouched since (still the old config's value) and the new config moves
            if want.attrs[name][k] == v and k in fresh and fresh[k] != v:
                follow.append((name, k, v, fresh[k]))
    # NB: a move no changed axis explains is a config that fits the shapes by coincidence (2 heads
    # of 8 read as 4 heads of 4 at the new hidden size): then nothing follows
    if not follow or any(type(v) is not int or (v, f) not in pairs for _, _, v, f in follow):
        return _mismatch(type(new), config, want, built)
    attrs = {n: dict(a) for n, a in want.attrs.items()}
    _move_attrs(news, follow, changed, "as the new config builds it")
    for name, k, _, f in follow:
        attrs[name][k] = f
    return _mismatch(type(new), config, dataclasses.replace(want, attrs=attrs), built)


def _derived_head_dim(model: nn.Module) -> int | None:
    """``hidden_size // num_attention_heads`` of a config that has no ``head_dim`` (or None: Mixtral), else None."""
    c = getattr(model, "config", None)
    d = c.to_dict() if c is not None and hasattr(c, "to_dict") else {}
    h, n = d.get("hidden_size"), d.get("num_attention_heads")
    if d.get("head_dim") is not None or isinstance(getattr(type(c), "head_dim", None), property):
        return None  # NB: Falcon's config derives head_dim in a read-only property
    if type(h) is not int or type(n) is not int or n <= 0 or h % n:
        return None
    return h // n


def _valid(config) -> bool:
    """Whether ``config`` passes its class's checks (strict configs run them when built, not on setattr)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 - any validator's error
        return False
    return True


def _assign(config, fitted) -> None:
    """Give ``config`` the fields of ``fitted`` (a fitted copy of it) in place, nested configs too.

    # NB: modules keep their own references to nested configs (T5Gemma's encoder reads
    ``config.encoder.hidden_size`` in its forward); replacing the nested objects would leave those
    modules reading the old widths while ``save_pretrained`` writes the new ones."""
    for key, value in fitted.__dict__.items():
        here = config.__dict__.get(key)
        if here is not value and hasattr(here, "to_dict") and type(here) is type(value):
            _assign(here, value)
        else:
            config.__dict__[key] = value


def _update_config(new: nn.Module, model: nn.Module, changed: dict, cuts: dict, old_shapes: dict,
                   stream: frozenset, groups: dict, gm=None, folds: list | None = None) -> None:
    """Make the copied config describe the new widths (see the module docstring)."""
    config = getattr(new, "config", None)
    if config is None or not hasattr(config, "to_dict") or config is getattr(model, "config", None):
        return
    if not changed:
        return
    pairs = set()
    for mname, m in new.named_modules():
        s = _scope(mname, m, cuts, old_shapes, stream, groups)
        pairs |= s.widths | s.counts | s.stream
    # NB: a layer or group norm that keeps its old divisor is built by no config: the widths it lost
    # stay unwritten, so from_pretrained refuses the checkpoint's shapes rather than load
    # nn.LayerNorm / nn.GroupNorm, which would divide by the new width (PoolFormer's GroupNorm(1, C))
    pairs -= {(m.full_width, m.normalized_shape[-1]) for m in new.modules()
              if isinstance(m, (PrunedLayerNorm, PrunedOwnLayerNorm))}
    pairs -= {(m.full_channels, m.num_channels) for m in new.modules() if isinstance(m, PrunedGroupNorm)}
    want = _want(new, model)
    derived = _derived_head_dim(model)
    before = copy.deepcopy(config)
    best = None
    if derived is not None:
        # NB: a config without head_dim whose model reads getattr(config, "head_dim", hidden_size //
        # num_attention_heads) (Phi-3, Granite MoE) changes its head width with the head count or the
        # hidden size, and 4 heads of 4 build the shapes of 2 heads of 8: try it written down first
        trial = copy.deepcopy(config)
        trial.head_dim = derived
        best = _fit(type(new), trial, pairs, want)
        if best == 0:
            _assign(config, trial)
    if best != 0:
        plain = copy.deepcopy(config)
        score = _fit(type(new), plain, pairs, want)
        if best is None or score < best:
            best = score
            _assign(config, plain)
        else:
            _assign(config, trial)
    if best:
        best = _follow_config(new, config, want, changed, pairs)
    off = {} if best else _follow_floats(new, config, want, gm, cuts, folds)
    if best or off:
        # NB: per-layer widths (and floats no fold reaches) the config's fields cannot express (a
        # saver writes them beside it)
        every = {k: dict(v) for k, v in changed.items()}
        for name, attrs in off.items():
            every.setdefault(name, {}).update(attrs)
        config.otofx_widths = dict(sorted(every.items()))
    if not (best or off):
        return
    built = _build(type(new), config) if best else None
    if off or (built is not None and _shapes(built) == want.shapes):
        # NB: a config that builds the new shapes but not the model (a float no fold reaches; 4 heads
        # of 4 where the model has 2 of 8 and the class ignores head_dim) would let from_pretrained
        # load a different model without a word: it goes back to the old widths, whose shapes the
        # checkpoint's tensors do not have, so from_pretrained refuses them
        every = config.otofx_widths
        for key in set(config.__dict__) - set(before.__dict__):  # a head_dim written down
            del config.__dict__[key]
        _assign(config, before)
        config.otofx_widths = every
        if off:
            name, attrs = next(iter(off.items()))
            key, value = next(iter(attrs.items()))
            what = f"{sum(map(len, off.values()))} float attribute(s) ({name}.{key} = {value!r})"
        else:
            what = f"its modules' attributes ({_attr_off(built, want)})"
        log.warning("otofx: %s's config can give the new shapes but not %s: it keeps the old widths, so "
                    "from_pretrained refuses its save_pretrained folder rather than load a different model; save "
                    "it with otofx.save (config.otofx_widths lists the widths)", type(new).__name__, what)


def _attr_off(built: nn.Module, want: _Want) -> str:
    """The first of :func:`_attrs_off`, in words."""
    name, k, v, have = next(_attrs_off(built, want), (None, None, None, None))
    if name is None:
        return "a module attribute"
    return f"{name} is a {v.__name__}" if k is None else f"{name}.{k} = {v}, the config gives {have}"


__all__ = ["rebuild", "keep_indices", "copy_training_flags", "RebuildError"]
