"""Module-form rewrite: re-sync module attributes with the shapes of their sliced tensors.

``otofx.rebuild`` slices the parameters and buffers of a copy of the user's model; this pass then
makes every module's attributes agree with its new tensors, so the user's own ``forward`` runs on
the smaller model. ``resize(module, change)`` looks the module's type up in a small registry
(``Linear.in_features``, ``Conv2d.groups``, ``BatchNorm2d.num_features`` ...) and may return a
replacement module (``nn.MultiheadAttention`` cannot hold a pruned head count:
``PrunedMultiheadAttention`` takes its place; an ``nn.LayerNorm`` over a narrowed width becomes
``PrunedLayerNorm``, which keeps the old divisor, ConvNeXt V2's GRN ``PrunedGlobalResponseNorm``, and
timm's weight-standardised convs over pruned input channels ``PrunedStdConv2d``;
torchvision's Swin (image and video) and MaxViT attention
modules become ``PrunedWindowAttention`` (``PrunedWindowAttention3d``) and ``PrunedRelativeAttention``, their heads read from the per-head bias
table or logit scale the analysis sliced; an ``nn.LSTM``/``GRU``/``RNN`` whose layers and directions keep
different numbers of units becomes ``PrunedRNN``). ``resync_counts(module, scope)`` then updates the
width and head-count attributes that attention and MLP blocks keep for their ``forward``
(``num_heads``, ``split_size``, ``all_head_size``, ``inner_dim`` ...), from the widths that
changed under the module and the head blocks the analysis found.

``literal_moves(gm, plan)`` reads, per module, how the graph form's rewrite recounts the literal
sizes its own forward wrote into the graph (split sizes, slice bounds, view shapes, an RMS norm's
``normalized_shape``), for the rebuild's held sizes (``otofx.rebuild._follow_literals``). Records
(:func:`is_record`: a dataclass or namespace a module reads sizes from, litgpt's ``self.config``)
have their int fields read (:func:`record_ints`) and set per module (:func:`set_attr_or_field`, which
copies a record other modules share) by ``otofx.rebuild._follow_records``.

Internals:
    * A rule reads the new tensors on the module and the :class:`Change` (old shapes, kept
      indices per dim of each of its own tensors); it never guesses from class names alone.
    * Head counts come from the analysis: an axis of ``n`` entries whose rows own blocks of ``b``
      entries holds ``n / b`` heads (``b`` is a block size of a row of the same group near the
      module: GQA's query axis holds ``n / head_dim`` query heads and ``n / (g * head_dim)``
      key/value heads). An attribute is set only when its name is one of the known width or
      head-count names, its value is the old value of such a count, and every candidate agrees on
      the new value; anything else is left alone (the caller verifies the result).
    * :func:`rms_folds` reads RMS norms over a narrowed axis off the captured graph (``mean`` of a
      square, ``+ eps``, ``rsqrt``, times a weight of the model, or a linear layer's weight on either
      side of the normalising product) and :func:`apply_rms_fold` makes the module's own forward,
      which divides by the new width, compute the old one: eps times old/new (on the module that
      computed the mean, where it holds the eps), the weight times sqrt(old/new).
    * Scale folds read, off the graph, which parameters scale a value the module form must keep
      when one of its floats changes: the linear layer alone feeding an RMS norm
      (:func:`rms_input_producer`: eps times c**2 is cancelled by an input times c), the final norm
      alone feeding a tied head (:func:`tied_head_norms`), the layer whose output a literal float
      multiplies (:func:`constant_scale_sources`), the layers writing a residual stream that only
      RMS norms read (:func:`stream_scale_sources`: embedding, output projections, stacked experts,
      sums and routing products on the way), the layer producing a magnitude match's ``h``
      (:func:`magnitude_folds`); :func:`scale_parameter` applies one.
    * ``literal_moves`` runs the graph rules' own ``fix`` (split, slice, narrow, getitem, reshape,
      unflatten, expand) on a recording view of each node (prune's ``Site`` whose edits are kept as
      ``(old, new)``): the graph is not changed, and the new values are the graph form's. The module
      of a node is export's ``nn_module_stack`` or the symbolic tracer's ``MADE_IN``.
    * :func:`own_norm_sites` reads the layer norms a module's own forward computes (written out, or
      ``F.layer_norm``) off the graph; :func:`own_norm_replacement` runs a copy of the module with random
      weights against ``PrunedOwnLayerNorm`` for each axis of its width and each weight/bias naming, in
      eval and training mode: the module is replaced only when one candidate computes what it computes.
    * Rules are keyed by type and found along the MRO (a subclass of ``nn.Linear`` is a Linear);
      classes of optional libraries (Hugging Face's ``Conv1D``) are keyed by qualified name, so
      nothing is imported here.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from otofx.errors import OTOError

from .channels import AxisLabels
from .modules import (CHANNELS_FIRST_LAYER_NORMS, DATA_FORMAT_LAYER_NORMS, GLOBAL_RESPONSE_NORMS, PLAIN_GROUP_NORMS,
                      PLAIN_LAYER_NORMS, PrunedGlobalResponseNorm, PrunedGroupNorm, PrunedLayerNorm, PrunedLayerNorm2d,
                      PrunedMultiheadAttention, PrunedOwnLayerNorm, PrunedRelativeAttention, PrunedRNN, PrunedStdConv2d,
                      PrunedWindowAttention, PrunedWindowAttention3d, STD_CONVS, resize_stock_cell, resize_stock_rnn,
                      rnn_slot_suffix, rnn_slots)
from .nodes import (_CASTS, _RESHAPES, HF_CONV1D, _before_casts, _op, _squared, call_arguments, grn_of,
                    layer_norm_of, linear_after, magnitude_match_at, made_in, rms_norm_of, submodule)
from .registry import RULES, bind, form_of, op_of, rule_of


class ResizeError(OTOError):
    """A module's new tensors cannot be expressed by its class (e.g. part of an attention head)."""


@dataclass(frozen=True)
class Change:
    """What slicing did to one module's own tensors (names local to the module)."""

    old: dict  # tensor name -> old shape (tuple)
    keep: dict = field(default_factory=dict)  # tensor name -> {dim: np.ndarray of kept indices}
    views: frozenset = frozenset()  # the constant shapes the captured graph views its own tensors to


RESIZERS: dict = {}  # module type -> rule
_BY_NAME: dict = {}  # "module.QualName" -> rule (optional libraries)


def resizer(*types):
    """Register ``fn(module, change) -> replacement or None`` for module types (or qualified class names)."""

    def deco(fn: Callable) -> Callable:
        for t in types:
            (_BY_NAME if isinstance(t, str) else RESIZERS)[t] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        fn = RESIZERS.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return None


def resize(module: nn.Module, change: Change):
    """Re-sync ``module``'s attributes with its tensors; returns a replacement module or None."""
    fn = rule_for(module)
    if fn is None:
        _fused_experts(module)
        _broadcast_shapes(module, change)
    return fn(module, change) if fn is not None else None


def _broadcast_shapes(m: nn.Module, change: Change) -> None:
    """A module of no known type whose 1-D tensors all went from ``old`` to ``new`` entries: a tuple
    attribute that is a broadcast shape of them (``old`` once, every other entry 1: timm's layer
    scale ``self.scale.view(self.shape)`` with ``shape = (dim, 1, 1)``) takes ``new``.

    # NB: only a tuple the captured graph views one of the module's tensors to (``change.views``): a
    # tuple that holds the old width for another reason (a roll's shifts, a pool's kernel) stays
    """
    sizes = {(change.old[k][0], t.shape[0]) for k, t in list(m._parameters.items()) + list(m._buffers.items())
             if isinstance(t, torch.Tensor) and k in change.old and len(change.old[k]) == 1 and t.dim() == 1}
    if len(sizes) != 1:
        return
    ((old, new),) = sizes
    if old == new or old == 1:
        return
    for k, v in list(m.__dict__.items()):
        if type(v) is tuple and all(type(e) is int for e in v) and v.count(old) == 1 \
                and all(e in (1, old) for e in v) and v in change.views:
            setattr(m, k, tuple(new if e == old else e for e in v))


def _fused_experts(m: nn.Module) -> None:
    """Hugging Face fused experts (``[E, 2I, H]`` / ``[E, H, I]`` parameters) run torch's grouped mm,
    which needs every stride a multiple of 16 bytes; at a pruned width that is not, the model's
    experts implementation becomes ``batched_mm`` (the same function: each token's expert weights
    are gathered and multiplied in a batch).

    # NB: the setting lives on the config, which every experts layer of the (copied) model shares
    """
    cfg = getattr(m, "config", None)
    if getattr(cfg, "_experts_implementation", None) != "grouped_mm":
        return
    for p in m.parameters(recurse=False):
        if p.dim() == 3 and any(n * p.element_size() % 16 for n in p.shape[1:]):
            cfg._experts_implementation = "batched_mm"
            return


# ---------------------------------------------------------------------------------------------
# Rules by module type
# ---------------------------------------------------------------------------------------------


@resizer(nn.Linear)
def linear(m: nn.Linear, change: Change):
    """Linear: out_features and in_features from the weight's shape."""
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.Bilinear)
def bilinear(m: nn.Bilinear, change: Change):
    """Bilinear: out, in1 and in2 features from the weight's shape."""
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


@resizer(HF_CONV1D)
def hf_conv1d(m: nn.Module, change: Change):
    """Hugging Face Conv1D (a transposed linear, weight [nx, nf]): nx and nf from the weight."""
    m.nx, m.nf = m.weight.shape


def _conv_groups_left(m: nn.Module, change: Change, what: str) -> int:
    """The weight's dim-0 channels left, after setting ``m.groups`` to the whole conv groups they hold."""
    left, old = m.weight.shape[0], change.old["weight"][0]
    if m.groups > 1:
        if left * m.groups % old:
            raise ResizeError(f"conv groups of {m.groups} do not divide the {left} {what} channels left")
        m.groups = left * m.groups // old
    return left


@resizer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(m: nn.modules.conv._ConvNd, change: Change):
    """ConvNd: out_channels from the weight; groups > 1 lose whole conv groups (the analysis ties a group's channels into one row), depthwise included."""
    m.out_channels = _conv_groups_left(m, change, "output")
    m.in_channels = m.weight.shape[1] * m.groups


@resizer(*STD_CONVS, PrunedStdConv2d)
def std_conv(m: nn.Conv2d, change: Change):
    """timm's weight-standardised convs (BiT's StdConv2d, NF-nets' ScaledStdConv2d, their *Same
    forms): resized as Conv2d; once each output channel's weight lost input entries, replaced by
    PrunedStdConv2d (its standardisation still counts the old fan-in, the removed entries by their
    moments, which the rebuild fills in); a subclass with its own forward cannot keep it."""
    conv(m, change)
    old = change.old["weight"]
    fan_in = int(np.prod(old[1:]))
    if isinstance(m, PrunedStdConv2d) or m.weight[0].numel() == fan_in:
        return None  # NB: compressed again, the first fan-in stays the divisor
    if _forward_owner(m) not in STD_CONVS:
        raise ResizeError(f"{type(m).__name__}'s own forward standardises its weight over its {m.weight[0].numel()} "
                          f"input entries left, not the old {fan_in}")
    return PrunedStdConv2d(m, fan_in)


@resizer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(m: nn.modules.conv._ConvTransposeNd, change: Change):
    """ConvTransposeNd (weight [in, out / groups, ...]): in_channels from the weight, groups from the input channels left."""
    m.in_channels = _conv_groups_left(m, change, "input")
    m.out_channels = m.weight.shape[1] * m.groups


def _first(m: nn.Module, *names):
    for n in names:
        t = getattr(m, n, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


@resizer(nn.modules.batchnorm._NormBase)
def norm_base(m: nn.Module, change: Change):
    """BatchNorm / InstanceNorm: num_features from the affine weight or the running statistics."""
    t = _first(m, "weight", "running_mean", "bias", "running_var")
    if t is not None:
        m.num_features = t.shape[0]


@resizer(nn.RMSNorm, PrunedLayerNorm, PrunedLayerNorm2d)
def normalized_shape(m: nn.Module, change: Change):
    """RMSNorm (its eps and weight refolded from the graph), PrunedLayerNorm (its divisor kept):
    normalized_shape from the elementwise weight (or bias)."""
    t = _first(m, "weight", "bias")
    if t is not None:
        m.normalized_shape = tuple(t.shape)


def _forward_owner(m: nn.Module) -> str:
    """The qualified name of the class whose ``forward`` ``m`` runs (timm's ``LayerNorm2dNoBias`` runs
    ``LayerNorm2d``'s)."""
    cls = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    return f"{cls.__module__}.{cls.__qualname__}"


def _layer_norm_layout(m: nn.LayerNorm, shape: tuple) -> str | None:
    """How ``m`` (an ``nn.LayerNorm`` subclass with its own forward) normalises, found by running a copy at
    width ``shape`` with random weights, in eval and training mode: ``"channels_last"`` where it computes
    ``F.layer_norm`` of its input with its own tensors (diffusers' ``FP32LayerNorm``: the same in float32,
    cast back), ``"channels_first"`` where it computes it over the channels of an NCHW input, permuted
    around it (segmentation_models_pytorch's ``LayerNorm2d``), None otherwise. PrunedLayerNorm (or
    PrunedLayerNorm2d) computes the same at the old divisor (half inputs normalised in float32, as it does)."""
    import copy

    g = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(m)
        probe = (probe.to_empty(device="cpu") if any(t.is_meta for t in probe.parameters()) else probe.cpu()).float()
        probe.normalized_shape = shape
        with torch.no_grad():
            for p in probe.parameters(recurse=False):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    except Exception:  # noqa: BLE001 - a module that cannot be copied: nothing is known of it
        return None
    last = torch.randn(3, 5, *shape, generator=g) * 2 + 0.5
    first = torch.randn(3, shape[-1], 5, 4, generator=g) * 2 + 0.5 if len(shape) == 1 else None

    def norm(x):
        return F.layer_norm(x, shape, probe.weight, probe.bias, probe.eps)

    forms = {"channels_last": (last, norm)}
    if first is not None:
        forms["channels_first"] = (first, lambda x: norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    for layout, (x, want_of) in forms.items():
        try:
            with torch.no_grad():
                for training in (False, True):
                    probe.train(training)
                    got, want = probe(x), want_of(x)
                    if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
                            not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                        break
                else:
                    return layout
        except Exception:  # noqa: BLE001 - a forward that does more, or takes other inputs
            continue
    return None


@resizer(nn.LayerNorm, *CHANNELS_FIRST_LAYER_NORMS)
def layer_norm(m: nn.LayerNorm, change: Change):
    """nn.LayerNorm over a narrowed last axis: replaced by PrunedLayerNorm (its mean and variance
    still divide by the old width, as the removed zero entries counted); ConvNeXt's channels-first
    LayerNorm2d (Hugging Face's ConvNeXt norms with ``data_format="channels_first"``) by
    PrunedLayerNorm2d; another subclass with its own forward is probed (:func:`_layer_norm_layout`) and
    swapped for either where it computes one of the two, and cannot keep the divisor otherwise."""
    t = _first(m, "weight", "bias")
    if t is None or tuple(t.shape) == tuple(m.normalized_shape):
        return None
    if len(m.normalized_shape) != 1 or t.dim() != 1:
        raise ResizeError(f"a LayerNorm over {tuple(m.normalized_shape)} lost entries of more than its last axis")
    named = _forward_owner(m)
    data_format = getattr(m, "data_format", None) if named in DATA_FORMAT_LAYER_NORMS else None
    own_forward = type(m).forward is not nn.LayerNorm.forward and named not in CHANNELS_FIRST_LAYER_NORMS + \
        PLAIN_LAYER_NORMS
    if own_forward and data_format not in ("channels_last", "channels_first"):
        data_format = _layer_norm_layout(m, tuple(t.shape))
        if data_format is None:
            raise ResizeError(f"{type(m).__name__}'s own forward divides by its width, {t.shape[0]} now, not by "
                              f"the old {m.normalized_shape[-1]}")
    full = m.normalized_shape[-1]
    m.normalized_shape = tuple(t.shape)
    first = named in CHANNELS_FIRST_LAYER_NORMS or data_format == "channels_first"
    return (PrunedLayerNorm2d if first else PrunedLayerNorm)(m, full)


@resizer(nn.GroupNorm, *PLAIN_GROUP_NORMS)
def group_norm(m: nn.GroupNorm, change: Change):
    """GroupNorm: num_channels from the affine weight; whole norm groups go (the analysis ties a group
    into one row), or, with one group, single channels: replaced by PrunedGroupNorm (its mean and
    variance still divide by the old channel count, as the removed zero channels counted)."""
    t = _first(m, "weight", "bias")
    if t is None:
        return
    old = change.old["weight" if m.weight is not None else "bias"][0]
    c = t.shape[0]
    if m.num_groups == 1 and not isinstance(m, PrunedGroupNorm):
        if c == old:
            return None
        if type(m).forward is not nn.GroupNorm.forward and _forward_owner(m) not in PLAIN_GROUP_NORMS:
            raise ResizeError(f"{type(m).__name__}'s own forward divides by its {c} channels, not by the old {old}")
        m.num_channels = c
        return PrunedGroupNorm(m, old)
    if isinstance(m, PrunedGroupNorm):  # NB: compressed again: the first width stays the divisor
        m.num_channels = c
        return None
    if c * m.num_groups % old:
        raise ResizeError(f"GroupNorm's {m.num_groups} groups do not divide the {c} channels left")
    m.num_groups, m.num_channels = c * m.num_groups // old, c


@resizer(*GLOBAL_RESPONSE_NORMS, PrunedGlobalResponseNorm)
def global_response_norm(m: nn.Module, change: Change):
    """ConvNeXt V2's GRN (timm's, Hugging Face's) over channels that lost entries: replaced by
    PrunedGlobalResponseNorm (its channel mean still divides by the old count, as the removed zero
    channels counted); a subclass with its own forward cannot keep the divisor."""
    if isinstance(m, PrunedGlobalResponseNorm):  # NB: compressed again: the first width stays the divisor
        w = m.weight
        m.num_channels = int(w.shape[1] if w.dim() == 4 and not m.channels_last else w.shape[-1])
        return None
    named = _forward_owner(m)
    if named not in GLOBAL_RESPONSE_NORMS:
        raise ResizeError(f"{type(m).__name__}'s own forward divides by its new channel count, not the old one")
    channels_last, eps = GLOBAL_RESPONSE_NORMS[named](m)
    w, old = m.weight, change.old["weight"]
    dim = 1 if w.dim() == 4 and not channels_last else -1
    if w.shape[dim] == old[dim]:
        return None
    return PrunedGlobalResponseNorm(m, old[dim], channels_last=channels_last, eps=eps)


@resizer(nn.Embedding, nn.EmbeddingBag)
def embedding(m: nn.Module, change: Change):
    """Embedding / EmbeddingBag: num_embeddings and embedding_dim from the weight."""
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizer(nn.PReLU)
def prelu(m: nn.PReLU, change: Change):
    """PReLU: num_parameters from the slope vector."""
    m.num_parameters = m.weight.numel()


def _kept_heads(change: Change, name: str, width: int, heads: int) -> np.ndarray:
    """Original indices of the heads left along the first ``width`` rows of ``name``'s dim 0."""
    hd = width // heads
    keep = change.keep.get(name, {}).get(0)
    if keep is None:
        return np.arange(heads)
    q = keep[keep < width]
    kept = np.unique(q // hd)
    if len(q) != len(kept) * hd:
        raise ResizeError(f"'{name}' keeps part of an attention head; heads are removed whole")
    return kept


@resizer(nn.MultiheadAttention)
def multihead_attention(m: nn.MultiheadAttention, change: Change):
    """nn.MultiheadAttention: replaced by PrunedMultiheadAttention (same parameters, any head count and widths) when a width changed."""
    name = "in_proj_weight" if m._qkv_same_embed_dim else "q_proj_weight"
    w = getattr(m, name)
    kept = _kept_heads(change, name, m.embed_dim, m.num_heads)
    if w.shape[1] == m.embed_dim and m.out_proj.weight.shape[0] == m.embed_dim and len(kept) == m.num_heads:
        return None
    return PrunedMultiheadAttention(m, len(kept), m.head_dim, torch.from_numpy(kept).to(w.device), m.num_heads)


@resizer(PrunedMultiheadAttention)
def pruned_multihead_attention(m: PrunedMultiheadAttention, change: Change):
    """PrunedMultiheadAttention (a compressed model compressed again): num_heads and the original indices of the heads left."""
    name = "in_proj_weight" if m.packed else "q_proj_weight"
    kept = _kept_heads(change, name, m.num_heads * m.head_dim, m.num_heads)
    if len(kept) != m.num_heads:
        m.num_heads = len(kept)
        m.kept_heads = m.kept_heads[torch.from_numpy(kept)]


def _window_heads(m: nn.Module, change: Change) -> tuple:
    """(per-head tensor name, its head axis, original indices of the heads left) of a window attention
    module: V2's ``logit_scale`` ``[heads, 1, 1]`` or V1's ``relative_position_bias_table`` ``[table, heads]``."""
    name, dim = ("logit_scale", 0) if isinstance(getattr(m, "logit_scale", None), torch.Tensor) \
        else ("relative_position_bias_table", 1)
    keep = change.keep.get(name, {}).get(dim)
    return name, dim, np.arange(change.old[name][dim]) if keep is None else keep


@resizer("torchvision.models.swin_transformer.ShiftedWindowAttention",
         "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
         "torchvision.models.video.swin_transformer.ShiftedWindowAttention3d")
def shifted_window_attention(m: nn.Module, change: Change):
    """torchvision's Swin window attention (V1, V2): replaced by PrunedWindowAttention when heads go.

    # NB: the stock function reads the head width as ``C // num_heads`` of its input width ``C`` and
    # writes ``C`` features back from the heads, neither of which holds once heads are removed; the
    # head width is the original one (the input width, a LayerNorm's, is never pruned)
    """
    name, _, kept = _window_heads(m, change)
    before = m.num_heads
    width, in_features = m.qkv.weight.shape
    if len(kept) == before and width == 3 * in_features:
        return None
    head_dim = in_features // before
    if in_features % before or width != 3 * len(kept) * head_dim or m.proj.weight.shape[1] != len(kept) * head_dim:
        raise ResizeError(f"its q/k/v ({width} rows) and projection ({m.proj.weight.shape[1]} inputs) are not "
                          f"{len(kept)} whole heads of width {head_dim} (the heads left in '{name}')")
    cls = PrunedWindowAttention3d if len(m.window_size) == 3 else PrunedWindowAttention
    return cls(m, len(kept), head_dim, torch.from_numpy(kept).to(m.qkv.weight.device), before)


def _heads_left(m: nn.Module, kept: np.ndarray, count: str, qkv: nn.Linear, where: str) -> None:
    """An otofx attention module compressed again: its head count ``count`` and the original indices of
    the heads left (``kept``: positions among its current heads, from the tensor named in ``where``)."""
    if len(kept) != getattr(m, count):
        if qkv.weight.shape[0] != 3 * len(kept) * m.head_dim:
            raise ResizeError(f"its q/k/v ({qkv.weight.shape[0]} rows) are not {len(kept)} whole heads of width "
                              f"{m.head_dim} (the heads left in {where})")
        setattr(m, count, len(kept))
        m.kept_heads = m.kept_heads[torch.from_numpy(kept).to(m.kept_heads.device)]


@resizer(PrunedWindowAttention, PrunedWindowAttention3d)
def pruned_window_attention(m: PrunedWindowAttention, change: Change):
    """PrunedWindowAttention (a compressed Swin compressed again): num_heads and the original indices of the heads left."""
    name, _, kept = _window_heads(m, change)
    _heads_left(m, kept, "num_heads", m.qkv, f"'{name}'")


def _table_heads(change: Change, heads: int) -> np.ndarray:
    """Original indices of the heads left in a ``[table, heads]`` relative position bias table."""
    keep = change.keep.get("relative_position_bias_table", {}).get(1)
    return np.arange(heads) if keep is None else keep


@resizer("torchvision.models.maxvit.RelativePositionalMultiHeadAttention")
def relative_positional_attention(m: nn.Module, change: Change):
    """torchvision MaxViT's attention: replaced by PrunedRelativeAttention when heads go (the stock
    forward writes its output back at the input width)."""
    before = change.old["relative_position_bias_table"][1]
    kept = _table_heads(change, before)
    width = m.to_qkv.weight.shape[0]
    if len(kept) == before and width == 3 * before * m.head_dim:
        return None
    if width != 3 * len(kept) * m.head_dim or m.merge.weight.shape[1] != len(kept) * m.head_dim:
        raise ResizeError(f"its q/k/v ({width} rows) and merge ({m.merge.weight.shape[1]} inputs) are not "
                          f"{len(kept)} whole heads of width {m.head_dim} (the heads left in its bias table)")
    return PrunedRelativeAttention(m, len(kept), m.head_dim, torch.from_numpy(kept).to(m.to_qkv.weight.device), before)


@resizer(PrunedRelativeAttention)
def pruned_relative_attention(m: PrunedRelativeAttention, change: Change):
    """PrunedRelativeAttention (a compressed MaxViT compressed again): n_heads and the original indices of the heads left."""
    _heads_left(m, _table_heads(change, m.n_heads), "n_heads", m.to_qkv, "its bias table")


@resizer(nn.RNNBase)
def recurrent(m: nn.RNNBase, change: Change):
    """LSTM / GRU / RNN: hidden_size and input_size from the weights when every layer and direction keeps
    as many units, else replaced by PrunedRNN (per layer and direction sizes, same call and results)."""
    units = []
    for k, rev in rnn_slots(m.num_layers, m.bidirectional):
        # NB: a projected LSTM's weight_hh reads the projection: its hidden units are weight_hr's columns
        keep = change.keep.get(f"{'weight_hr' if m.proj_size else 'weight_hh'}_{rnn_slot_suffix(k, rev)}", {}).get(1)
        units.append(np.arange(m.hidden_size) if keep is None else keep)
    return resize_stock_rnn(m, units)


@resizer(nn.RNNCellBase)
def recurrent_cell(m: nn.RNNCellBase, change: Change):
    """LSTMCell / GRUCell / RNNCell: input_size and hidden_size from the sliced weights."""
    resize_stock_cell(m)


@resizer(PrunedRNN)
def pruned_rnn(m: PrunedRNN, change: Change):
    """PrunedRNN (a compressed model compressed again): sizes from its sliced tensors and unit indices."""
    m.resync()


# ---------------------------------------------------------------------------------------------
# Width and head-count attributes of blocks (attention, MLP)
# ---------------------------------------------------------------------------------------------

# attributes that hold a count of heads (query or key/value; a state-space mixer's B/C groups of heads)
HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_head", "n_heads",
               "n_kv_heads", "n_kv_head", "num_head", "heads", "n_groups")
# attributes that hold a width computed from heads or an inner (MLP) width
WIDTHS = ("all_head_size", "split_size", "inner_dim", "attn_dim", "embed_dim", "intermediate_size", "intermediate_dim", "inner_size",
          "ffn_dim", "kv_dim", "q_dim", "hidden_dim_attn", "proj_size", "head_size_total",
          # timm's EfficientFormer, LeViT and TinyViT attention (heads times key or value width)
          "key_attn_dim", "val_attn_dim", "dh", "nh_kd",
          # state-space mixers (Mamba, Mamba 2 and their hybrids)
          "conv_dim", "d_inner", "time_step_rank", "dt_rank", "group_size",
          # multi-head latent attention's low ranks (each behind an RMS norm: DeepSeek V2/V3, Kimi)
          "q_lora_rank", "kv_lora_rank",
          # per-layer input embeddings' width (Gemma 3n, Gemma 4: the text model reshapes by it)
          "hidden_size_per_layer_input")
# attributes that hold the residual stream's width, config.hidden_size (Mixtral's router and Granite
# MoE's output reshape by it): re-synced from the token embedding's new width by otofx.rebuild, in
# the modules that hold a tensor of the stream, since a head width is often the same number; a norm
# over groups of the stream's width (Qwen4-Exp's hyper-connection norms over hc_count copies of the
# stream: group_size = hidden_size) reshapes by it too
STREAM_WIDTHS = ("hidden_size", "hidden_dim", "input_size", "embed_dim", "d_model", "n_embd", "dim_norm", "group_size")


@dataclass
class Scope:
    """What changed among a module's own tensors and those of its direct children."""

    widths: set = field(default_factory=set)  # {(old width, new width)} of every changed axis
    counts: set = field(default_factory=set)  # {(old count, new count)}: changed axes over row block sizes
    stream: set = field(default_factory=set)  # {(old width, new width)} of the residual stream's axes
    heads: set = field(default_factory=set)  # {(old width, new width)} of axes that lost whole heads

    def add_axis(self, old: int, new: int, blocks) -> None:
        self.widths.add((old, new))
        self.heads.add((old, new))
        for b in set(blocks) | {1}:
            if b > 0 and old % b == 0 and new % b == 0:
                self.counts.add((old // b, new // b))


def unique_new(pairs: set, value: int):
    new = {n for o, n in pairs if o == value}
    return new.pop() if len(new) == 1 else None


def resync_counts(module: nn.Module, scope: Scope, stream_widths: bool = False) -> dict:
    """Set the known width and head-count attributes of ``module`` whose old value one changed axis
    determines; with ``stream_widths`` (a model whose residual stream no token embedding names:
    torchvision's ViT reshapes its patches by ``hidden_dim``), the stream's width names too.

    Returns ``{attribute: (old, new)}`` of what was changed.
    """
    done = {}
    widths = WIDTHS + tuple(a for a in STREAM_WIDTHS if a not in WIDTHS) if stream_widths else WIDTHS
    for names, pairs in ((HEAD_COUNTS, scope.counts), (widths, scope.widths)):
        for attr in names:
            v = module.__dict__.get(attr)
            if type(v) is not int:
                continue
            new = unique_new(pairs, v)
            if new is None and names is widths:
                # NB: a model with no token embedding keeps no stream apart: a stream that shrank from
                # the width the heads had (timm's ViT: attn_dim 192 -> 128, its dim 192 -> 96) leaves
                # the head width to the axes that lost whole heads
                new = unique_new(scope.heads, v) if attr in WIDTHS else None
            if new is not None and new != v:
                setattr(module, attr, new)
                done[attr] = (v, new)
    _resync_groups(module, done)
    return done


def _resync_groups(module: nn.Module, done: dict) -> None:
    """``num_key_value_groups`` (query heads per key/value head, read by Hugging Face's ``repeat_kv``)
    follows the two counts it was computed from, when one of them changed here: multi-query
    attention keeps its one key/value head and loses query heads."""
    g = module.__dict__.get("num_key_value_groups")
    if type(g) is not int:
        return
    q = next((a for a in ("num_heads", "num_attention_heads") if type(module.__dict__.get(a)) is int), None)
    kv = next((a for a in ("num_key_value_heads", "num_kv_heads") if type(module.__dict__.get(a)) is int), None)
    if q is None or kv is None or not ({q, kv} & set(done)):
        return
    old_q, new_q = done.get(q, (module.__dict__[q],) * 2)
    old_kv, new_kv = done.get(kv, (module.__dict__[kv],) * 2)
    if old_kv and new_kv and g * old_kv == old_q and new_q % new_kv == 0:
        module.num_key_value_groups = new_q // new_kv
        done["num_key_value_groups"] = (g, new_q // new_kv)


# ---------------------------------------------------------------------------------------------
# Records: settings objects a module reads sizes from in its forward (litgpt's self.config.n_head)
# ---------------------------------------------------------------------------------------------


def is_record(v) -> bool:
    """Whether ``v`` is a plain settings object a module may read sizes from in its forward (litgpt's
    ``self.config.n_head``, a model-args dataclass, a namespace): a dataclass instance or a namespace;
    not a Hugging Face config (it has ``to_dict``; ``otofx.rebuild`` fits those as a whole)."""
    if isinstance(v, (types.SimpleNamespace, argparse.Namespace)):
        return True
    return dataclasses.is_dataclass(v) and not isinstance(v, type) and not hasattr(v, "to_dict")


def record_fields(rec) -> list:
    """``(field, value)`` of a record: its instance attributes (litgpt's ``rope_n_elem``, set in
    ``__post_init__``, is no dataclass field), or a slotted dataclass's fields."""
    if hasattr(rec, "__dict__"):
        return list(vars(rec).items())
    return [(f.name, getattr(rec, f.name)) for f in dataclasses.fields(rec)]


def record_ints(m: nn.Module) -> dict:
    """``{"attribute.field": value}`` of the int fields (and tuples or lists of ints, as lists) of the
    records ``m`` holds (:func:`is_record`)."""
    out = {}
    for a, rec in m.__dict__.items():
        if not is_record(rec):
            continue
        for f, v in record_fields(rec):
            if type(v) is int:
                out[f"{a}.{f}"] = v
            elif type(v) in (tuple, list) and v and all(type(e) is int for e in v):
                out[f"{a}.{f}"] = list(v)
    return out


def set_attr_or_field(m: nn.Module, key: str, value, shared: Counter | None = None) -> None:
    """Set ``m``'s attribute ``key``, or a field of a record it holds (``"config.n_head"``). A record
    other modules hold too (``shared``: ``id(record)`` -> holders; litgpt's one Config for every
    block) is copied first, so that only ``m`` sees the new value.

    # NB: a shallow copy: the record's other fields (lists, dicts) stay shared, and only ints are set"""
    a, _, f = key.partition(".")
    if not f:
        setattr(m, a, value)
        return
    rec = m.__dict__[a]
    if shared is None or shared[id(rec)] != 1:
        if shared is not None:
            shared[id(rec)] -= 1
        rec = copy.copy(rec)
        m.__dict__[a] = rec
        if shared is not None:
            shared[id(rec)] = 1
    if dataclasses.is_dataclass(rec) and getattr(type(rec), "__dataclass_params__").frozen:
        object.__setattr__(rec, f, value)
    else:
        setattr(rec, f, value)


def record_holders(modules) -> Counter:
    """``id(record)`` -> how many of ``modules`` hold it (see :func:`set_attr_or_field`)."""
    return Counter(id(v) for m in modules for v in m.__dict__.values() if is_record(v))


# ---------------------------------------------------------------------------------------------
# Literal sizes in a module's own forward (split sizes, slice bounds, view shapes)
# ---------------------------------------------------------------------------------------------

# the rules whose rewrite of the graph recounts literal sizes and positions
LITERAL_RULES = ("split", "slice", "narrow", "getitem", "reshape", "shape_merge", "expand", "rms_norm")


def _literal_pairs(old, new, out: set) -> None:
    """Add to ``out`` each ``(old, new)`` literal of a rewritten argument: ints, whole tuples of ints
    (a split's sizes), an int split size whose pieces now differ (-> the tuple of their sizes), and
    the ints inside tuples, lists and slices; those the rewrite left as they were too (``(8, 8)``:
    a number that stays in one place and moves in another is no size to follow)."""
    if type(old) is int and type(new) is int:
        out.add((old, new))
    elif type(old) is int and isinstance(new, (list, tuple)) and new and all(type(v) is int for v in new):
        out.add((old, tuple(new)))  # NB: torch.split(x, 14) whose pieces lost different counts
    elif isinstance(old, slice) and isinstance(new, slice):
        for a in ("start", "stop", "step"):
            _literal_pairs(getattr(old, a), getattr(new, a), out)
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        if old and all(type(v) is int for v in (*old, *new)):
            out.add((tuple(old), tuple(new)))
        for a, b in zip(old, new):
            _literal_pairs(a, b, out)


# the arguments of LITERAL_RULES that hold no size or position along an axis
_NOT_SIZES = frozenset({"dim", "step", "tensor", "input", "self", "_rest"})


def _axis(d: int, n: int) -> int:
    return d + n if d < 0 else d


def literal_moves(gm: fx.GraphModule, plan) -> dict:
    """``{module name: {old literal: {new literals}}}``: how the graph form's rewrite
    (``passes.prune``, the rules of ``LITERAL_RULES``) recounts the literal sizes and positions of the
    nodes each module's own forward made (``passes.nodes.made_in``): ``torch.split(x, [10, 30], 1)``
    whose pieces keep 4 and 16 channels gives ``10 -> 4``, ``30 -> 16`` and ``(10, 30) -> (4, 16)``
    (a literal the rewrite keeps where it rewrites others maps to itself).
    The rules run on a recording view of each node (:class:`_Recorder`): the graph is not changed."""
    from .prune import Site  # NB: prune's rewrite view; prune does not import this module

    class _Recorder(Site):
        """A rule's view of one node whose rewrites are recorded as ``(old value, new value)``."""

        def __init__(self, node, form, kw):
            super().__init__(plan, node, None, form)
            self.kw, self.moved = kw, {}  # NB: not ``new``: Site.new(value) is the new shape

        def set(self, name, value):
            self.moved[name] = value

        def set_varargs(self, name, values):  # NB: as Site.set_varargs: the shape as the node spells it
            self.moved[name] = tuple(values) if f"*{name}" in self.form.spec else (
                values[0] if len(values) == 1 else tuple(values))

        def replace_call(self, target, args, kwargs):  # NB: the split's fix: torch.split(x, sizes, dim=d)
            if "normalized_shape" in self.kw:  # NB: an RMS norm's fix: the kept-divisor call over the new width
                self.moved["normalized_shape"] = type(self.kw["normalized_shape"])(args[1]) \
                    if isinstance(self.kw["normalized_shape"], (list, tuple)) else args[1][0]
                return
            name = next((k for k in ("split_size_or_sections", "split_sizes", "split_size") if k in self.kw), None)
            old = self.kw.get(name)
            pieces = [o[_axis(kwargs["dim"], len(o))] for o in self.out_old_list]
            # NB: the old sizes, not a count of chunks or the positions tensor_split cuts at
            if (isinstance(old, (list, tuple)) and list(old) == pieces) or (
                    type(old) is int and pieces and all(p == old for p in pieces[:-1]) and pieces[-1] <= old):
                self.moved[name] = args[1]
            else:
                self.moved[name] = None  # NB: not sizes: nothing to read off it

    out: dict = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        path = made_in(node)
        form = form_of(node, gm) if path is not None else None
        if form is None or form.rule not in LITERAL_RULES or RULES[form.rule].fix is None:
            continue
        kw = bind(form, node, node.args, node.kwargs)
        site = _Recorder(node, form, kw)
        if site.out_old is None and not site.out_old_list:
            continue
        try:
            RULES[form.rule].fix(site, **kw)
        except Exception:  # noqa: BLE001 - a rewrite the graph form refuses too: nothing to follow
            continue
        pairs: set = set()
        # NB: every size the node holds, moved or not (an axis is no size: left out)
        for name, old in kw.items():
            if name not in _NOT_SIZES:
                _literal_pairs(old, site.moved.get(name, old), pairs)
        for old, new in pairs:
            out.setdefault(path, {}).setdefault(old, set()).add(new)
    return out


# ---------------------------------------------------------------------------------------------
# RMS norms over an axis that lost channels
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RmsFold:
    """An RMS norm of module ``module`` over an axis that went from ``old`` to ``new`` entries (the
    removed ones zero): its own forward divides by ``new``; with ``eps`` (an attribute) times
    ``old / new`` and its weight scaled by ``sqrt(old / new)`` (``one_plus``: the weight is read as
    ``1 + w``) it computes what it computed at ``old``."""

    module: str
    eps_attr: str
    eps: float
    weight: str
    one_plus: bool
    old: int
    new: int
    eps_module: str | None = None  # the module holding eps, when not ``module`` (HY v4's input_norm)
    mean: str | None = None  # the graph node of a written-out norm's mean
    weightless: bool = False  # a norm without a weight, folded into the linear layer alone reading it


def rms_folds(gm, plan, model: nn.Module) -> list:
    """The :class:`RmsFold` of every RMS norm of ``gm`` over one axis with entries removed by
    ``plan``, whose module holds its ``eps`` as a float attribute: written out
    (``w * h * rsqrt(mean(h ** 2) + eps)``, :func:`rms_norm_of`) or torch's own (``nn.RMSNorm``,
    ``F.rms_norm``; an ``eps`` of None is the weight dtype's machine epsilon, as torch reads it). A
    norm read any other way has no fold (its module form then fails verification)."""
    labels, uf = plan.zigset.labels, plan.zigset.uf
    out, seen = [], set()
    for n in gm.graph.nodes:
        hit = _rms_site(n, gm)
        if hit is None:
            continue
        h, dim, path, eps, weight, one_plus = hit
        lab = labels.get(getattr(h, "name", None))
        if not isinstance(lab, AxisLabels) or (path, weight) in seen:
            continue
        ids = lab.ids[dim % len(lab.ids)]
        new = int((~plan.removed_roots[uf.find(ids)]).sum())
        if new == len(ids) or new == 0:
            continue
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        p = mod._parameters.get(weight)
        if p is not None and p.dim() == 2 and not _folds_alone(gm, model, f"{path}.{weight}" if path else weight):
            continue  # NB: a linear layer's weight tied elsewhere (an LM head's table) cannot take the scale
        # NB: a norm over groups of the axis (Qwen4-Exp's over each of hc_count copies of the stream)
        # has its weight over all of them, after the groups are flattened back: the one scale serves all;
        # a linear layer's weight applied before the normalising product (HY v4) reads the axis on its last
        if p is None or p.dim() not in (1, 2) or p.shape[-1] % len(ids):
            continue
        eps_module = None
        if isinstance(mod, nn.RMSNorm) and eps is _MODULE_EPS:
            eps_attr, eps = "eps", mod.eps if mod.eps is not None else torch.finfo(p.dtype).eps
        else:
            # the module that computed the mean holds eps (the norm's own), else the weight's, else
            # one module under the weight's (a capture that does not record where a node was made)
            eps_attr, eps_module = _eps_holder(model, _module_path(n) if n.op != "call_module" else None, path, eps)
            if eps_attr is None:
                continue
        seen.add((path, weight))
        rms = rms_norm_of(n)
        out.append(RmsFold(path, eps_attr, float(eps), weight, one_plus, len(ids), new, eps_module,
                           n.name if _op(n) == "mean" else None, rms is not None and rms.weight is None))
    # NB: norms of one module may share its eps (one per module, read by each): it is set once, so
    # they fold only when their axes shrank alike
    ratio = {}
    for f in out:
        ratio.setdefault((f.eps_module or f.module, f.eps_attr), set()).add(f.old * 1.0 / f.new)
    return [f for f in out if len(ratio[(f.eps_module or f.module, f.eps_attr)]) == 1]


_MODULE_EPS = object()  # the eps of an nn.RMSNorm module call: its attribute


def _eps_holder(model: nn.Module, where: str | None, path: str, eps: float) -> tuple:
    """``(attribute, module path or None for ``path``)`` of the float ``eps`` an RMS norm adds: on the
    module ``where`` that computed its mean, else on the weight's module ``path``, else on the one
    module under ``path`` that holds it; ``(None, None)`` when none, or several, do."""
    def floats(m):
        return [k for k, v in m.__dict__.items() if type(v) is float and v == eps]

    for m in dict.fromkeys(p for p in (where, path) if p is not None):
        try:
            attrs = floats(model.get_submodule(m))
        except AttributeError:
            continue
        if len(attrs) == 1:
            return attrs[0], (m if m != path else None)
    try:
        under = [(f"{path}.{k}" if path else k, a) for k, sub in model.get_submodule(path).named_modules()
                 if k for a in floats(sub)]
    except AttributeError:
        return None, None
    return under[0][::-1] if len(under) == 1 else (None, None)


def _folds_alone(gm, model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is registered under that one name and read once in ``gm`` (a
    linear layer's weight a norm's refold may scale)."""
    names = [k for k, q in model.named_parameters(remove_duplicate=False) if q is _attr(model, name)]
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    return len(names) == 1 and len(reads) == 1 and len(_readers(reads[0])) == 1


@dataclass(frozen=True)
class GrnSite:
    """A Global Response Normalization of ``gm`` (:func:`otofx.passes.nodes.grn_of`) whose channels
    went from ``old`` to ``new``: ``module`` holds its gamma and beta (None when its output is not
    ``x + beta + gamma * x * Nx`` of one module's two tensors), ``channels_last`` is its layout
    (None when it is no 4-D NHWC or NCHW one), ``eps`` the float added to the mean (0.0 without one)."""

    node: str
    module: str | None
    channels_last: bool | None
    eps: float
    old: int
    new: int


def _labelled_grns(gm, labels: dict):
    """``(node, Grn, labels of its norm)`` for every GRN of ``gm`` (:func:`otofx.passes.nodes.grn_of`)
    whose norm the analysis labelled."""
    for n in gm.graph.nodes:
        g = grn_of(n) if n.op in ("call_function", "call_method") else None
        lab = labels.get(g.norm.name) if g is not None else None
        if isinstance(lab, AxisLabels):
            yield n, g, lab


def grn_sites(gm, plan) -> list:
    """The :class:`GrnSite` of every GRN of ``gm`` over channels ``plan`` removes some of: the model's
    own forward must divide by the old count there, which ``PrunedGlobalResponseNorm`` does."""
    uf = plan.zigset.uf
    out = []
    for n, g, lab in _labelled_grns(gm, plan.zigset.labels):
        ids = lab.ids[g.channel]
        new = int((~plan.removed_roots[uf.find(ids)]).sum())
        if new == len(ids):
            continue
        layout = {(3, (1, 2)): True, (1, (2, 3)): False}.get((g.channel, g.spatial)) if lab.ndim == 4 else None
        path = g.weight.target.rpartition(".")[0] if g.weight is not None else None
        out.append(GrnSite(n.name, path, layout, 0.0 if g.eps is None else g.eps, len(ids), new))
    return out


def inline_grn_groups(gm, model: nn.Module, zigset) -> set:
    """Indices of the groups of ``zigset`` whose channels a GRN of ``gm`` normalises that no module of
    ``model`` computes as a class ``PrunedGlobalResponseNorm`` replaces (a GRN written into a block's
    forward, the official ConvNeXt V2's own class): the widths whose zero rows the own class must keep."""
    out = set()
    for _, g, lab in _labelled_grns(gm, zigset.labels):
        m = submodule(model, g.weight.target.rpartition(".")[0]) if g.weight is not None else None
        if m is not None and (isinstance(m, PrunedGlobalResponseNorm) or _forward_owner(m) in GLOBAL_RESPONSE_NORMS):
            continue
        zigs = zigset.zig_of_root[zigset.uf.find(lab.ids[g.channel])]
        out |= {int(i) for i in np.unique(zigs) if i >= 0}
    return out


# ---------------------------------------------------------------------------------------------
# Layer norms in a module's own forward (written out, or F.layer_norm of its tensors)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnNormSite:
    """A layer norm of ``gm`` that a module's own forward computes (``module``, its dotted name; None
    when the graph does not say), over an axis narrowed from ``old`` to ``new`` entries: ``written``
    (:func:`otofx.passes.nodes.layer_norm_of`) or ``F.layer_norm`` called on the module's tensors;
    ``eps``: the float the graph adds to its variance (None when not found)."""

    node: str
    module: str | None
    written: bool
    eps: float | None
    old: int
    new: int
    ids: np.ndarray = field(repr=False, compare=False, default=None)  # the normalised axis' channel ids


def _eps_of(ln) -> float | None:
    """The float a written layer norm adds to its variance before the root (``s + eps``), else None."""
    todo = [ln.var]
    while todo:
        n = todo.pop()
        for r in n.users:
            if r.op not in ("call_function", "call_method"):
                continue
            if _op(r) in _CASTS or (_op(r) == "mul" and any(type(a) in (int, float) for a in r.args)):
                todo.append(r)  # NB: casts, and the rewrite's own terms (a compressed graph's)
            elif _op(r) == "add" and len(r.args) == 2:
                eps = [a for a in r.args if type(a) in (int, float)]
                if eps:
                    return float(eps[0])
                todo.append(r)  # the rewrite's u ** 2 term
    return None


def own_norm_sites(gm, zigset, plan=None):
    """Every layer norm of ``gm`` computed in a module's own forward (not an ``nn.LayerNorm`` call) whose
    axis ``plan`` narrows (every one with ``plan`` None: ``old == new`` then), as :class:`OwnNormSite`."""
    labels, uf = zigset.labels, zigset.uf
    for n in gm.graph.nodes:
        # NB: an nn.LayerNorm call is the resizers' (PrunedLayerNorm), unless it has no weight or bias to
        # read its width off
        plain = n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), nn.LayerNorm) \
            and m.weight is None and m.bias is None and type(m).forward is nn.LayerNorm.forward
        if n.op not in ("call_function", "call_method") and not plain:
            continue
        ln = layer_norm_of(n) if not plain and _op(n) == "mean" else None
        if ln is not None and ln.mean is n:
            lab, axis, eps = labels.get(ln.input.name), ln.dim, _eps_of(ln)
        elif op_of(n, gm) == "layer_norm":
            args = call_arguments(n, gm) or {}
            src = args.get("input")
            lab, axis = labels.get(src.name) if isinstance(src, fx.Node) else None, -1
            eps = m.eps if plain else args.get("eps", 1e-5)
            shape = args.get("normalized_shape")
            shape = (shape,) if isinstance(shape, int) else shape
            if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1:
                continue
        else:
            continue
        if not isinstance(lab, AxisLabels):
            continue
        ids = lab.ids[axis]
        new = int((~plan.removed_roots[uf.find(ids)]).sum()) if plan is not None else len(ids)
        if plan is not None and new == len(ids):
            continue
        path = n.target if plain else made_in(n)
        yield OwnNormSite(n.name, path, ln is not None, None if eps is None else float(eps), len(ids), new, ids)


# attributes of a module of the user's (or a library's) class that hold the width of its input, or of its
# output, as its own forward may check it (diffusers' ``Upsample2D``: ``assert x.shape[1] == self.channels``)
IN_WIDTHS = ("channels", "in_channels", "in_features", "in_dim", "input_dim", "in_chans")
OUT_WIDTHS = ("out_channels", "out_features", "out_dim", "output_dim")


def _containers(path: str | None) -> list:
    """The dotted names of the modules a node made in ``path`` is inside (``path`` and its parents; not
    the top module, which holds everything)."""
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _node_home(n: fx.Node) -> str | None:
    return n.target if n.op == "call_module" else made_in(n)


def module_io_widths(gm, zigset, plan) -> tuple:
    """``(inputs, outputs)``, each ``{module path: {(old, new)}}``: the sizes (before and after ``plan``) of
    the channel axes (those holding a group's rows) of the tensors each module reads from outside it, and
    of those read outside it that it made. One pass over the graph; the top module is left out."""
    labels, uf = zigset.labels, zigset.uf
    ins: dict = {}
    outs: dict = {}

    def widths(node: fx.Node) -> set:
        lab = labels.get(node.name)
        if not isinstance(lab, AxisLabels):
            return set()
        out = set()
        for ids in lab.ids:
            if not len(ids):
                continue
            roots = uf.find(ids)
            if (zigset.zig_of_root[roots] >= 0).any():
                out.add((len(ids), int((~plan.removed_roots[roots]).sum())))
        return out

    homes = {n: set(_containers(_node_home(n))) for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    for n in gm.graph.nodes:
        here = homes.get(n, set())
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                continue
            there = homes.get(a, set())
            into, out_of = here - there, there - here  # NB: modules n is inside and a is not, and back
            if not into and not out_of:
                continue
            w = widths(a)
            for path in into:
                ins.setdefault(path, set()).update(w)
            for path in out_of:
                outs.setdefault(path, set()).update(w)
    return ins, outs


def module_input_shapes(gm) -> dict:
    """``{module path: shape}``: for each module whose forward made nodes of ``gm`` (or that a leaf call
    runs: an ``nn.LayerNorm`` without weights), the shape of the tensor those nodes read from outside it,
    the same at every call; None where there are several (a module that is no norm alone, or a shared one
    called on other shapes). One pass over the graph."""
    outside: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
            outside.setdefault(n.target, []).append(n.args[0])  # NB: a leaf module's call
        elif n.op in ("call_function", "call_method"):
            path = made_in(n)
            if path is None:
                continue
            seen = outside.setdefault(path, [])
            seen += [a for a in n.all_input_nodes if a.op != "get_attr" and made_in(a) != path and a not in seen]
    out = {}
    for path, nodes in outside.items():
        vals = [a.meta.get("val") for a in nodes]
        if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
            out[path] = None
            continue
        # NB: a dynamic size: any size works for a norm over another axis
        shapes = {tuple(int(d) if isinstance(d, int) else 3 for d in v.shape) for v in vals}
        # NB: a module called at several places reads one tensor at each (a shared norm); two inputs at one
        # call (a module that is no norm alone) differ in their call, which the probe's one input refuses anyway
        out[path] = shapes.pop() if len(shapes) == 1 else None
    return out


def own_norm_replacement(module: nn.Module, shape: tuple, width: int, eps: float | None) -> dict | None:
    """The :class:`PrunedOwnLayerNorm` arguments (``dim``, ``weight``, ``bias``, ``eps``) of a module that
    computes a layer norm over one axis of an input of ``shape`` (``width`` entries) and nothing else,
    found by running a copy of it with random weights against each candidate, in eval and training
    mode; None when none matches (the module does more, or takes other inputs)."""
    import copy

    affine = isinstance(module, nn.LayerNorm) and (module.weight is not None or module.bias is not None)
    if isinstance(module, PrunedOwnLayerNorm) or affine or eps is None or list(module.children()):
        return None
    mine = dict(module.named_parameters(recurse=False))
    if list(module.buffers(recurse=False)) or any(p.numel() != width for p in mine.values()) or len(mine) > 2:
        return None
    # NB: on the CPU in float32, whatever the model's device and dtype; a module whose weights are not
    # materialised (the meta device) is replaced by its structure all the same: its weights are random here
    g = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(module).to_empty(device="cpu").float()
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            x = torch.randn(shape, generator=g) * 2 + 0.5
    except Exception:  # noqa: BLE001 - a module that cannot be copied is not probed
        return None
    dims = sorted({d if d != len(shape) - 1 else -1 for d in range(len(shape)) if shape[d] == width}, reverse=True)
    names = list(mine)
    pairs = [(w, b) for w in [None, *names] for b in [None, *names] if w is None or w != b]
    pairs.sort(key=lambda wb: -sum(v is not None for v in wb))  # NB: every tensor the module holds, first
    for dim in dims:
        for w, b in pairs:
            if {w, b} - {None} != set(names):
                continue
            cand = PrunedOwnLayerNorm(probe, dim=dim, width=width, full_width=width, eps=eps, weight=w, bias=b)
            ok = True
            for training in (False, True):
                probe.train(training)
                try:
                    with torch.no_grad():
                        got, want = cand(x), probe(x)
                except Exception:  # noqa: BLE001 - a forward that takes other inputs is not a norm alone
                    return None
                if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor) or got.shape != want.shape \
                        or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
                    ok = False
                    break
            if ok:
                return {"dim": dim, "weight": w, "bias": b, "eps": eps}
    return None


def inline_layer_norm_groups(gm, model: nn.Module, zigset) -> set:
    """Indices of the groups of ``zigset`` whose channels a layer norm written out in ``gm`` normalises
    where no module of ``model`` computes it alone (:func:`own_norm_replacement`): one written into a
    block's forward divides by the new width in the own class, whose zero rows must stay."""
    out, shapes = set(), None
    for site in own_norm_sites(gm, zigset):
        if not site.written:
            continue
        m = submodule(model, site.module)
        if isinstance(m, PrunedOwnLayerNorm):
            continue
        if m is not None and shapes is None:
            shapes = module_input_shapes(gm)
        shape = shapes.get(site.module) if m is not None else None
        if shape is not None and own_norm_replacement(m, shape, site.old, site.eps) is not None:
            continue
        zigs = zigset.zig_of_root[zigset.uf.find(site.ids)]
        out |= {int(i) for i in np.unique(zigs) if i >= 0}
    return out


def standardised_module(gm, node: fx.Node) -> str | None:
    """The module whose ``weight`` a batch-statistics norm node of ``gm`` standardises (its input is
    that weight, reshaped: timm's ``StdConv2d``), or None."""
    src = node.args[0] if node.args else node.kwargs.get("input")
    while isinstance(src, fx.Node) and src.op in ("call_method", "call_function") and \
            op_of(src, gm) in ("reshape", "view", "flatten") and src.args:
        src = src.args[0]
    if not isinstance(src, fx.Node) or src.op != "get_attr":
        return None
    path, _, attr = str(src.target).rpartition(".")
    return path if attr == "weight" and path else None


def batch_stats_sites(gm, zigset):
    """``(node, input labels)`` of every batch-statistics norm of ``gm`` whose last axis the analysis
    left to the rewrite (``zigset.fills`` of the ``batch_norm`` rule: weight standardisation)."""
    for n in gm.graph.nodes:
        if n.name in zigset.fills and n.op in ("call_function", "call_method"):
            r = rule_of(n, gm)
            src = n.args[0] if n.args else n.kwargs.get("input")
            lab = zigset.labels.get(src.name) if isinstance(src, fx.Node) else None
            if r is not None and r.name == "batch_norm" and isinstance(lab, AxisLabels):
                yield n, lab


def inline_standardisation_groups(gm, model: nn.Module, zigset) -> set:
    """Indices of the groups of ``zigset`` whose channels a batch-statistics norm of ``gm`` averages
    over (weight standardisation: a conv's input channels) where no module of ``model`` computes it
    as a class ``PrunedStdConv2d`` replaces (a user's conv standardising its weight in its own
    forward, a functional batch norm): the widths whose zero rows the own class must keep."""
    out = set()
    for n, lab in batch_stats_sites(gm, zigset):
        m = submodule(model, standardised_module(gm, n))
        if m is not None and (isinstance(m, PrunedStdConv2d) or _forward_owner(m) in STD_CONVS):
            continue
        zigs = zigset.zig_of_root[zigset.uf.find(lab.ids[-1])]
        out |= {int(i) for i in np.unique(zigs) if i >= 0}
    return out


# ---------------------------------------------------------------------------------------------
# Scale folds: a module takes the float its config gives, its weights absorb the difference
# ---------------------------------------------------------------------------------------------

_SHAPE_READS = ("size", "_assert_tensor_metadata", "sym_numel", "dim")
_PASS_BACK = _CASTS + _RESHAPES + ("transpose", "permute", "unsqueeze", "squeeze", "expand")


def _readers(n: fx.Node) -> list:
    """The nodes that read ``n``'s values (shape queries, export's dtype asserts and ``y.type_as(n)``
    are not readers)."""
    return [u for u in n.users if u.op == "output" or (_op(u) not in _SHAPE_READS
                                                       and not (_op(u) == "type_as" and u.args[0] is not n))]


def _back_to_source(n, also=()):
    """From ``n`` back past casts, reshapes and transposes (and ``also``), each read by nothing else
    than the next: the first other node, or None when a node on the way has another reader."""
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _op(n) in _PASS_BACK + also \
            and n.args and isinstance(n.args[0], fx.Node):
        if len(_readers(n.args[0])) != 1:
            return None
        n = n.args[0]
    return n if isinstance(n, fx.Node) else None


def _linear_params(n: fx.Node, gm) -> tuple | None:
    """``(input, weight name, bias name or None)`` when ``n`` is a linear layer reading parameters of the model."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Linear) and n.args:
            return n.args[0], f"{n.target}.weight", f"{n.target}.bias" if m.bias is not None else None
        return None
    if n.op != "call_function" or _op(n) != "linear":
        return None
    args = call_arguments(n, gm) or {}
    # NB: past value-preserving casts (DeepSeek V4's hyper-connections read ``self.fn.float()``): a
    # scale of the parameter is a scale of its cast
    w, b = _before_casts(args.get("weight")), _before_casts(args.get("bias"))
    if not isinstance(w, fx.Node) or w.op != "get_attr" or (b is not None and (not isinstance(b, fx.Node)
                                                                             or b.op != "get_attr")):
        return None
    return args.get("input"), w.target, b.target if b is not None else None


def _module_path(n: fx.Node) -> str | None:
    """The dotted name of the innermost module whose forward made ``n`` (``nn_module_stack``), or None."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    return fqn if isinstance(fqn, str) else None


def _plain_rms_input(mean: fx.Node):
    """``h`` when ``mean`` is ``mean(h ** 2, dim, keepdim=True)`` read only by ``+ eps`` (a float): an
    RMS norm, with or without a weight; else None."""
    if mean.op not in ("call_function", "call_method") or _op(mean) != "mean" or not mean.args:
        return None
    h = _squared(_before_casts(mean.args[0]))
    users = _readers(mean)
    if h is None or len(users) != 1 or _op(users[0]) != "add" or not any(type(a) is float for a in users[0].args):
        return None
    return h


# ops whose output is c times its first input's when that input is scaled by c
_HOMOGENEOUS = _PASS_BACK + ("neg", "slice", "select", "narrow", "view_as_complex", "view_as_real", "repeat",
                             "repeat_interleave", "getitem")


def _depends_on(n, nodes: set) -> bool:
    """Whether value ``n`` is computed from any of ``nodes``."""
    if not isinstance(n, fx.Node):
        return False
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m in nodes:
            return True
        if m in seen or m.op in ("placeholder", "get_attr"):
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False


def _merge(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None or any(a[k] != b[k] for k in a.keys() & b.keys()):
        return None
    return {**a, **b}


def _scaled_by(n, gm, inside: set) -> dict | None:
    """``{linear node: output rows (start, stop) of the old model, or None for all}``: scaling those
    layers' outputs by c scales ``n`` by c, through reshapes, casts, slices, rotary embeddings (sums of
    products with values computed from elsewhere) and the split of a fused projection (DeepSeek's
    ``kv_a_proj_with_mqa`` into the latent and the rotary key). The nodes on the way join ``inside``."""
    if not isinstance(n, fx.Node):
        return None
    if _linear_params(n, gm) is not None:
        inside.add(n)
        return {n: None}
    if n.op not in ("call_function", "call_method"):
        return None
    op = _op(n)
    src = n.args[0] if n.args else None
    if op == "getitem" and isinstance(src, fx.Node) and src.op in ("call_function", "call_method") \
            and _op(src) in ("split", "split_with_sizes") and _linear_params(src.args[0], gm) is not None:
        sizes, dim = src.args[1] if len(src.args) > 1 else None, src.args[2] if len(src.args) > 2 else \
            src.kwargs.get("dim", 0)
        if dim != -1 or not isinstance(n.args[1], int) or not isinstance(sizes, (int, list, tuple)):
            return None
        lin = src.args[0]
        if isinstance(sizes, int):
            start, stop = n.args[1] * sizes, (n.args[1] + 1) * sizes
        else:
            start, stop = sum(sizes[: n.args[1]]), sum(sizes[: n.args[1] + 1])
        inside.update((n, src, lin))
        return {lin: (start, stop)}
    if op in _HOMOGENEOUS:
        got = _scaled_by(src, gm, inside)
        if got is not None:
            inside.add(n)
        return got
    if op == "cat" and isinstance(src, (list, tuple)) and src:
        got = {}
        for part in src:
            got = _merge(got, _scaled_by(part, gm, inside))
        if got:
            inside.add(n)
        return got or None
    tensors = [a for a in n.args[:2] if isinstance(a, fx.Node)]
    if op in ("add", "sub") and len(n.args) == 2 and len(tensors) == 2:
        got = _merge(_scaled_by(tensors[0], gm, inside), _scaled_by(tensors[1], gm, inside))
        if got:
            inside.add(n)
        return got
    if op in ("mul", "div") and len(n.args) == 2:
        for i, side in enumerate(n.args):
            if op == "div" and i == 1:
                break
            other = n.args[1 - i]
            if not isinstance(side, fx.Node) or (isinstance(other, fx.Node) and other in inside):
                continue
            trial = set()
            got = _scaled_by(side, gm, trial)
            if got and not _depends_on(other, trial):
                inside.update(trial)
                inside.add(n)
                return got
    return None


def rms_input_producer(gm, path: str, sites: dict | None = None) -> tuple | None:
    """``((parameter name, rows), ...)``: the weights and biases of the linear layers whose outputs
    (their rows ``(start, stop)`` of the old model, or all when None) feed the RMS norm of module
    ``path`` and nothing else, through reshapes, rotary embeddings and splits (Qwen 3's ``q_proj``
    before ``q_norm``, HunYuan's query norm after RoPE, DeepSeek's latent norm after the fused
    ``kv_a_proj_with_mqa``), or None. Scaling them by c scales the norm's input by c, which its eps
    times c**2 cancels: ``x / sqrt(mean(x**2) + eps) == c x / sqrt(mean((c x)**2) + c**2 eps)``.
    ``sites``: :func:`norm_sites` of ``gm``, when asked for many modules."""
    found: dict = {}
    for n, h, written, _, _ in (sites if sites is not None else norm_sites(gm)).get(path, ()):
        # NB: a norm module called on several inputs (Llama 4's qk_norm on q and on k): each call's
        # input must scale, since its one eps serves them all
        found = _merge(found, _norm_input_sources(n, h, written, gm))
        if not found:
            return None
    out = []
    for lin, rows in (found or {}).items():
        _, w, b = _linear_params(lin, gm)
        out += [(t, rows) for t in (w, b) if t is not None]
    return tuple(out) or None


def magnitude_folds(gm, plan) -> dict:
    """``{parameter name: factor}`` that makes the module form compute each magnitude match
    (``y = h * rms(g) / rms(h)``, :class:`otofx.passes.nodes.MagnitudeMatch`) over a narrowed axis as
    the graph does: with c = sqrt(new / old), the layers producing ``h`` (a linear layer, read by
    nothing but the match) scaled by c make ``rms(h)`` what it was (its eps or clamp included) and
    ``rms(g)``, read at the new width, is ``1/c`` times what it was: ``c h * rms(g) / c / rms(h)``
    is ``y``. A match whose ``h`` and ``g`` lost different shares of their entries, or whose ``h``
    has no such producer, gets nothing (the module form then fails verification)."""
    labels, uf = plan.zigset.labels, plan.zigset.uf
    out: dict = {}

    def width(n, dim):
        lab = labels.get(getattr(n, "name", None))
        if not isinstance(lab, AxisLabels):
            return None
        ids = lab.ids[dim % len(lab.ids)]
        return len(ids), int((~plan.removed_roots[uf.find(ids)]).sum())

    seen = set()
    for n in gm.graph.nodes:
        hit = magnitude_match_at(n) if n.op in ("call_function", "call_method") else None
        if hit is None or hit.mean in seen:
            continue
        seen.add(hit.mean)
        wh, wg = width(hit.h, hit.dim), width(hit.g, hit.dim)
        if wh is None or wg is None or wh[0] == wh[1] and wg[0] == wg[1]:
            continue
        if wh[1] * wg[0] != wg[1] * wh[0] or not wh[1]:
            continue  # NB: different shares: no one scale serves both roots
        inside: set = set()
        got = _scaled_by(hit.h, gm, inside)
        if not got:
            continue
        # h and its casts are read by the match alone: its square and its product
        casts, todo = set(), [hit.h]
        while todo:
            v = todo.pop()
            casts.add(v)
            todo += [u for u in _readers(v) if u.op in ("call_function", "call_method") and _op(u) in _CASTS
                     and u.args[0] is v]
        square = {u for v in casts for u in _readers(v) if _squared(u) is v}
        allowed = inside | casts | square | _product_nodes(hit.out)
        if any(r not in allowed for v in inside | casts for r in _readers(v)):
            continue  # NB: a value on the way read by something else
        c = (wh[1] / wh[0]) ** 0.5
        for lin, rows in got.items():
            if rows is not None:
                continue  # NB: part of a fused projection: not followed here
            _, w, b = _linear_params(lin, gm)
            for t in (w, b):
                if t is not None:
                    out[t] = out.get(t, 1.0) * c
    return out


def _product_nodes(n) -> set:
    """The product and quotient nodes of a magnitude match's output ``n`` (past casts)."""
    out, todo = set(), [n]
    while todo:
        m = _before_casts(todo.pop())
        if isinstance(m, fx.Node) and m.op in ("call_function", "call_method") and _op(m) in ("mul", "div"):
            out.add(m)
            todo += [a for a in m.args if isinstance(a, fx.Node)]
    return out


def norm_sites(gm) -> dict:
    """``{module path: [(node, input, written out, weight name or None, one_plus)]}``: every RMS norm
    call of ``gm`` (with a weight, or written out without one: Gemma 4's v_norm, found by the module
    that made it)."""
    out: dict = {}
    for n in gm.graph.nodes:
        hit = _rms_site(n, gm)
        if hit is not None:
            weight = f"{hit[2]}.{hit[4]}" if hit[2] else hit[4]
            call = (n, hit[0], rms_norm_of(n) is not None, weight, hit[5])
            out.setdefault(hit[2], []).append(call)
            # NB: a norm whose eps another module holds (HY v4's input_norm beside the hyper-connection's
            # weight) is found under that module too, where the config's eps is read
            where = _module_path(n) if n.op != "call_module" else None
            if where is not None and where != hit[2] and where.startswith(f"{hit[2]}." if hit[2] else ""):
                out.setdefault(where, []).append(call)
            continue
        h, path = _plain_rms_input(n), _module_path(n)
        if h is not None and path is not None:
            out.setdefault(path, []).append((n, h, True, None, False))
    return out


def _norm_input_sources(n, h, written: bool, gm) -> dict | None:
    """:func:`_scaled_by` of the input ``h`` of the norm at ``n``, when nothing else reads a value on the way."""
    if not isinstance(h, fx.Node):
        return None
    norm = [u for u in _readers(h) if _op(u) in ("pow", "mul", "square")] if written else [n]
    if len(norm) != len(_readers(h)):
        return None  # NB: the input read by something beside the norm
    inside: set = set()
    got = _scaled_by(h, gm, inside)
    if not got:
        return None
    allowed = inside | set(norm)
    for m in inside:
        if m in got and got[m] is not None:
            continue  # a fused projection: its split's other pieces read other rows
        if m.op in ("call_function", "call_method") and _op(m) in ("split", "split_with_sizes"):
            continue
        if any(u not in allowed for u in _readers(m)):
            return None  # NB: a value on the way read by something else (q before RoPE returned)
    return got


def tied_head_norms(gm, names: set, sites: dict | None = None) -> list | None:
    """``[(norm weight name, one_plus)]``: the RMS norm whose output alone feeds each linear layer
    that reads one of ``names`` (the tied LM head reading the token embedding, past casts and the
    slice of positions to keep); scaling that weight by c scales the head's logits by c. None when a
    reader of the tied weight is neither an embedding lookup nor such a head. ``sites``:
    :func:`norm_sites` of ``gm``."""
    weights = {w: one_plus for calls in (sites if sites is not None else norm_sites(gm)).values()
               for _, _, _, w, one_plus in calls if w is not None}
    out = []
    for n in gm.graph.nodes:
        lin = _linear_params(n, gm)
        if lin is None or lin[1] not in names:
            continue
        if lin[2] is not None:
            return None  # NB: a head with a bias: its bias does not scale with the norm
        src = _back_to_source(lin[0], ("slice", "select", "getitem"))
        if src is None or len(_readers(src)) != 1:
            return None
        weight = None
        if src.op == "call_module" or _op(src) == "rms_norm":
            hit = _rms_site(src, gm)
            weight = f"{hit[2]}.{hit[4]}" if hit is not None else None
        elif _op(src) == "mul":
            for a in src.args[:2]:
                a = _before_casts(a)
                if isinstance(a, fx.Node) and _op(a) == "add":  # 1 + w
                    a = next((_before_casts(b) for b in a.args if isinstance(b, fx.Node)), None)
                if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in weights:
                    weight = a.target
        if weight is None:
            return None
        out.append((weight, weights[weight]))
    return out


def constant_scale_sources(gm, value: float, owner: str) -> list | None:
    """The parameters whose scaling by c scales, by c, every product of the graph with the literal
    ``value`` (a float attribute the forward multiplies by: Gemma 4's
    ``per_layer_model_projection(x) * per_layer_model_projection_scale``), among the products whose
    other factor comes from a parameter of module ``owner``: that factor is a linear layer's output
    (its weight and bias), a product with a parameter, or the parameter itself, read by nothing
    else. None when there is no such product, or when one has no such source."""
    prefix = f"{owner}." if owner else ""
    out, found = [], False
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or _op(n) != "mul" or len(n.args) != 2:
            continue
        lits = [a for a in n.args if type(a) is float and a == value]
        nodes = [a for a in n.args if isinstance(a, fx.Node)]
        if len(lits) != 1 or len(nodes) != 1:
            continue
        src = _back_to_source(nodes[0])
        if src is None or len(_readers(src)) != 1:
            continue
        lin = _linear_params(src, gm)
        if lin is not None:
            names = [t for t in lin[1:] if t is not None]
        elif src.op == "get_attr":  # the parameter itself (Dory's s_gate * s_gate_scale)
            names = [src.target]
        elif _op(src) == "mul" and len(src.args) == 2:
            ps = [a for a in map(_before_casts, src.args) if isinstance(a, fx.Node) and a.op == "get_attr"]
            names = [ps[0].target] if len(ps) == 1 and len(_readers(ps[0])) == 1 else []
        else:
            names = []
        if not names or not all(t.startswith(prefix) for t in names):
            continue
        found = True
        out += [t for t in names if t not in out]
    return out if found else None


# ops that give c times their output when their first input is scaled by c (besides _HOMOGENEOUS)
_STREAM_PASS = _HOMOGENEOUS + ("dropout", "sum", "index", "index_select", "expand_as", "view_as", "roll")
# ops whose every floating operand is scaled by c gives c times the output (an MoE's combine of experts)
_STREAM_ZEROS = ("zeros", "zeros_like", "new_zeros", "empty_like")
_STREAM_SCATTER = {"index_add": (0, 3), "index_add_": (0, 3), "scatter_add": (0, 3), "scatter_add_": (0, 3),
                   "index_put": (0, 2), "index_put_": (0, 2)}
# what a parameter passes through before a matrix product reads it (an expert's slice of a stacked weight)
_PARAM_VIEWS = _CASTS + ("getitem", "select", "slice", "index", "transpose", "t", "permute", "narrow")


def _param_behind(n) -> str | None:
    """The parameter ``n`` is (or a slice, transpose or cast of, along its first argument), else None."""
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _op(n) in _PARAM_VIEWS \
            and n.args:
        n = n.args[0]
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _stream_source(n: fx.Node, gm):
    """``(parameter names, the other operands)`` when ``n`` writes a value that scaling those
    parameters by c scales by c: a linear layer (its weight and bias), an embedding lookup (its table),
    a matrix product or linear map with one parameter operand (a fused expert's stacked weight, whole);
    else None."""
    lin = _linear_params(n, gm)
    if lin is not None:
        return [t for t in lin[1:] if t is not None], []
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Embedding):
            return [f"{n.target}.weight"], []
        return None
    if n.op not in ("call_function", "call_method"):
        return None
    op = _op(n)
    if op == "embedding":
        w = call_arguments(n, gm).get("weight")
        return ([w.target], []) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    if op in ("linear", "matmul", "mm", "bmm", "einsum", "_grouped_mm", "grouped_mm", "grouped_mm_fallback"):
        operands = [a for a in (n.args[1:] if op == "einsum" else n.args) if isinstance(a, fx.Node)]
        params = [_param_behind(a) for a in operands]
        if op == "linear" and len(operands) == 3 and params[1] and params[2]:
            return params[1:], [operands[0]]  # NB: weight and bias both scale
        if sum(p is not None for p in params) == 1:
            i = next(i for i, p in enumerate(params) if p is not None)
            return [params[i]], [a for j, a in enumerate(operands) if j != i]
    return None


def stream_scale_sources(gm, paths, sites: dict | None = None) -> tuple | None:
    """``(parameters, heads)``: scaling ``parameters`` by c scales, by c, the input of every RMS norm
    call of modules ``paths`` (the norms of a residual stream; :func:`norm_sites` ``sites``), and
    scaling the norm weights ``heads`` (``(name, one_plus)``) by 1/c then changes nothing else the
    graph computes. The parameters are the layers that write the stream (the token embedding, the
    output projections of attention and MLP blocks, stacked expert weights), when the stream is a sum
    of their outputs (times factors computed elsewhere: routing weights, gates, constants) and
    nothing reads it but those norms; ``heads`` feed an LM head tied to the embedding
    (:func:`tied_head_norms`). None when no such set is found. Each norm then sees c times its
    input: with its eps times c**2 it computes what it did (:func:`rms_input_producer` for one
    layer's output)."""
    sites = sites if sites is not None else norm_sites(gm)
    ends, todo = set(), []
    for path in paths:
        calls = sites.get(path)
        if not calls:
            return None
        for n, h, written, _, _ in calls:
            if not isinstance(h, fx.Node):
                return None
            # NB: the norm's input may also be the next residual sum's (checked with the stream's readers)
            if written:
                squares = {u for u in _readers(h) if _op(u) in ("pow", "square") or (_op(u) == "mul" and u.args[0] is u.args[1])}
                ends.update(squares)
                rms = rms_norm_of(n)
                if rms is not None and rms.linear is not None:
                    ends.add(rms.linear)  # NB: its weight is the norm's (refolded): it reads the stream as the norm
                ends.update(u for u in _readers(h) if _op(u) == "mul" and u not in squares
                            and any(_depends_on(a, squares) for a in u.args if a is not h))
            else:
                ends.add(n)
            todo.append(h)
    inside: set = set()
    found = _stream_values(todo, gm, inside)
    if found is None:
        return None
    sources, writers, others = found
    # NB: a factor multiplying the stream must not be computed from it but through the norms (an
    # MoE's routing weights read the normed stream): else it would scale too
    clean: set = set()
    for o in others:
        if _reaches(o, inside | writers, ends, clean):
            return None
    for v in inside:
        if any(u not in inside and u not in ends for u in _readers(v)):
            return None  # NB: the stream read raw (a model output, a layer without a norm)
    # NB: a source parameter read anywhere but by the writers would scale there too, but for a tied
    # LM head, which the norm feeding it scales back
    heads: dict = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in sources and not _reads_only(n, writers):
            found = tied_head_norms(gm, {n.target}, sites)
            if not found:
                return None
            heads.update(found)
        if n.op == "call_module" and n not in writers and any(s.startswith(f"{n.target}.") for s in sources):
            return None
    return sorted(sources), sorted(heads.items())


def _stream_values(todo: list, gm, inside: set, passes: dict | None = None, raw: bool = False):
    """Walk back from the values ``todo`` that must scale by c: ``(source parameter names, writer
    nodes, factors that must not scale)``, or None when a value on the way is neither a writer, a
    sum of scaled values, a product with a factor, nor an op that passes a scale on. ``passes``:
    ``{output: input}`` of norms that give c times their output when their input is scaled by c;
    ``raw``: a parameter read as it is (HRM's initial state added to the stream) is a writer too."""
    sources, writers, others = set(), set(), []
    while todo:
        v = todo.pop()
        if v in inside or v in writers:
            continue
        if not isinstance(v, fx.Node):
            return None
        if passes and v in passes:
            inside.add(v)
            todo.append(passes[v])
            continue
        if raw and v.op == "get_attr" and isinstance(_attr(gm, v.target), nn.Parameter):
            writers.add(v)
            sources.add(v.target)
            continue
        src = _stream_source(v, gm)
        if src is not None:
            writers.add(v)
            sources.update(src[0])
            others += src[1]
            continue
        if v.op not in ("call_function", "call_method"):
            return None
        op, args = _op(v), v.args
        inside.add(v)
        if op in _STREAM_ZEROS:
            continue
        if op in _STREAM_SCATTER:
            scaled = [args[i] for i in _STREAM_SCATTER[op] if i < len(args)]
            if len(scaled) != 2 or not all(isinstance(a, fx.Node) for a in scaled):
                return None
            todo += scaled
            others += [a for i, a in enumerate(args) if isinstance(a, fx.Node) and i not in _STREAM_SCATTER[op]]
            continue
        if op in _STREAM_PASS and args and isinstance(args[0], fx.Node):
            todo.append(args[0])
            if op not in ("type_as", "expand_as", "view_as"):  # NB: these read the other's dtype or shape only
                others += [a for a in list(args[1:]) + list(v.kwargs.values()) if isinstance(a, fx.Node)]
            continue
        if op == "cat" and isinstance(args[0], (list, tuple)):
            todo += list(args[0])
            continue
        nodes = [a for a in args[:2] if isinstance(a, fx.Node)]
        if op in ("add", "sub") and len(nodes) == 2 and "alpha" not in v.kwargs:
            todo += nodes
            continue
        # NB: a matrix product of the stream with a factor (DeepSeek V4's hyper-connections mix their
        # streams by comb^T @ streams, comb computed through the norms) is linear in the stream as a product is
        if op in ("mul", "div", "matmul", "bmm") and len(args) == 2 and nodes:
            side = _scaled_side(v, gm, inside, writers, passes)
            if side is None:
                return None
            todo.append(args[side])
            if isinstance(args[1 - side], fx.Node):
                others.append(args[1 - side])
            continue
        return None
    return sources, writers, others


def _attr(root: nn.Module, target: str):
    """The attribute a ``get_attr`` target names, or None."""
    path, _, name = target.rpartition(".")
    try:
        return getattr(root.get_submodule(path), name, None)
    except AttributeError:
        return None


def _scaled_side(v, gm, inside: set, writers: set, passes: dict | None = None) -> int | None:
    """Which operand of the product ``v`` carries the stream: the one already known to (``passes``:
    the outputs of norms that pass c on, not yet walked), else the one (the first for a quotient)
    whose own walk back finds writers (the other is a gate, a routing weight, a constant)."""
    args = v.args
    sides = [i for i in (0, 1) if isinstance(args[i], fx.Node) and (_op(v) != "div" or i == 0)]
    for i in sides:
        # NB: modded-nanoGPT's ``lambdas[1] * x0`` with x0 = norm(embed(idx)): x0 is a norm's output
        if args[i] in inside or args[i] in writers or (passes and args[i] in passes):
            return i
    for i in sides:
        trial_inside = set(inside)
        got = _stream_values([args[i]], gm, trial_inside, passes)
        if got is not None and got[1]:
            return i
    return None


def _reaches(n, nodes: set, stops: set, clean: set) -> bool:
    """Whether value ``n`` is computed from any of ``nodes`` other than through ``stops``; ``clean``
    caches the nodes found not to."""
    stack = [n] if isinstance(n, fx.Node) else []
    seen = set()
    while stack:
        m = stack.pop()
        if m in nodes:
            return True
        if m in seen or m in clean or m in stops or m.op in ("placeholder", "get_attr"):
            continue
        seen.add(m)
        op = _op(m) if m.op in ("call_function", "call_method") else None
        if op in _SHAPE_READS:
            continue  # NB: a shape does not scale
        # NB: y.type_as(x) reads x's dtype only
        stack.extend(m.all_input_nodes if op != "type_as" else [a for a in m.args[:1] if isinstance(a, fx.Node)])
    clean |= seen
    return False


def _reads_only(n: fx.Node, writers: set) -> bool:
    """Whether every reader of parameter node ``n``, past slices, transposes and casts, is one of ``writers``."""
    stack = list(n.users)
    while stack:
        u = stack.pop()
        if u in writers:
            continue
        if u.op in ("call_function", "call_method") and _op(u) in _PARAM_VIEWS:
            stack.extend(u.users)
            continue
        return False
    return True


# ---------------------------------------------------------------------------------------------
# RMS norms without a weight over an axis that lost entries
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightlessSite:
    """An RMS norm without a weight (written out, ``F.rms_norm`` or ``nn.RMSNorm`` without one)
    over an axis that went from ``old`` to ``new`` entries: ``input`` is what it squares, ``out``
    its normalised value, ``ends`` its nodes that read ``input``."""

    input: fx.Node
    out: fx.Node
    ends: tuple
    old: int
    new: int


def weightless_sites(gm, plan, folded=frozenset()) -> list:
    """The :class:`WeightlessSite` of every RMS norm without a weight in ``gm`` over one axis that
    ``plan`` narrows, but those whose mean is in ``folded`` (refolded into the linear layer that
    reads them: :func:`rms_folds`)."""
    labels, uf = plan.zigset.labels, plan.zigset.uf
    out = []
    for n in gm.graph.nodes:
        site = None
        rms = rms_norm_of(n)
        if rms is not None and rms.weight is None and n.name not in folded:
            square = _before_casts(n.args[0])
            site = (rms.input, rms.dim, rms.out, (square, rms.out))
        elif n.op == "call_module" and n.args:
            m = gm.get_submodule(n.target)
            if isinstance(m, nn.RMSNorm) and m.weight is None and len(m.normalized_shape) == 1:
                site = (n.args[0], -1, n, (n,))
        elif n.op == "call_function" and op_of(n, gm) == "rms_norm":
            args = call_arguments(n, gm) or {}
            shape = args.get("normalized_shape")
            if args.get("weight") is None and isinstance(shape, (list, tuple)) and len(shape) == 1:
                site = (args.get("input"), -1, n, (n,))
        if site is None or not isinstance(site[0], fx.Node):
            continue
        lab = labels.get(site[0].name)
        if not isinstance(lab, AxisLabels):
            continue
        ids = lab.ids[site[1] % len(lab.ids)]
        new = int((~plan.removed_roots[uf.find(ids)]).sum())
        if 0 < new < len(ids):
            out.append(WeightlessSite(site[0], site[2], site[3], len(ids), new))
    return out


def resize_weightless_norms(new_model: nn.Module, sites: list) -> None:
    """``nn.RMSNorm`` modules without a weight hold no tensor for the rebuild to slice: their
    ``normalized_shape`` takes the narrowed width the graph gives them (``sites``: :func:`weightless_sites`)."""
    for site in sites:
        if site.out.op == "call_module":
            m = new_model.get_submodule(site.out.target)
            if isinstance(m, nn.RMSNorm) and tuple(m.normalized_shape) == (site.old,):
                m.normalized_shape = (site.new,)


def _linear_consumers(u: fx.Node, v: fx.Node, gm) -> list | None:
    """``[(linear node, weight name)]``: the linear layers reading value ``v`` through its reader
    ``u`` (past casts and slices of positions, each read by nothing else), or None when ``u`` leads
    anywhere else."""
    out, todo = [], [(u, v)]
    while todo:
        u, v = todo.pop()
        if u.op in ("call_function", "call_method") and _op(u) in _CASTS + ("slice", "select", "getitem") \
                and u.args and u.args[0] is v:
            todo += [(w, u) for w in _readers(u)]
            continue
        lin = _linear_params(u, gm)
        if lin is None or lin[0] is not v:
            return None
        out.append((u, lin[1]))
    return out


def weightless_stream_fold(gm, sites: list, model: nn.Module) -> dict | None:
    """``{parameter name: factor}`` that makes the module form's RMS norms without a weight over a
    narrowed axis (``sites``: :func:`weightless_sites`; their own forward divides by the new width) compute
    what they did, with their eps unchanged; ``{}`` when there are none; None when no such scaling
    is found (the module form then fails verification and the graph form is returned).

    With c = sqrt(new / old), a norm whose input is scaled by c gives c times its old output:
    ``c x / sqrt(mean_new((c x)**2) + eps) == c x / sqrt(mean_old(x**2) + eps)``. So the layers that
    write the norms' inputs (a residual stream's embedding and output projections, or the norm's
    own producer) are scaled by c (:func:`_stream_values`; a norm whose output feeds another's
    input, post-norm or a norm after the embedding, passes c on), and every linear layer reading a
    scaled value from outside (q/k/v and MLP inputs, the LM head) takes 1/c on its weight. Fails
    when a scaled value is read by anything else (a norm with a weight, a model output), when a
    factor multiplying it is computed from it, or when a scaled parameter is read elsewhere or
    tied to another name."""
    if not sites:
        return {}
    ratios = {s.new / s.old for s in sites}
    if len(ratios) != 1:
        return None  # NB: two streams of different widths: one scale per value would not serve both
    c = ratios.pop() ** 0.5
    ends = {e for s in sites for e in s.ends}
    passes = {s.out: s.input for s in sites}
    inside: set = set()
    sources, writers, others = set(), set(), []
    consumers: dict = {}  # linear node -> weight name
    todo, checked = [s.input for s in sites], set()
    while todo:
        found = _stream_values(todo, gm, inside, passes, raw=True)
        if found is None:
            return None
        sources |= found[0]
        writers |= found[1]
        others += found[2]
        todo = []
        for v in (inside | set(passes) | writers) - checked:
            checked.add(v)
            for u in _readers(v):
                if u in inside or u in ends or u in todo:
                    continue
                if u.op in ("call_function", "call_method") and (_op(u) in ("add", "sub", "mul", "cat", "sum", "matmul", "bmm")
                                                                 or (_op(u) == "div" and u.args[0] is v)):
                    todo.append(u)  # NB: the stream goes on past its last norm (a sum the head reads)
                    continue
                lins = _linear_consumers(u, v, gm)
                if lins is None:
                    return None  # NB: the scaled value read raw (a model output, a norm with a weight)
                consumers.update(lins)
    # NB: a layer called at several places scales once: every call must play the same part (a
    # linear both reading and writing the stream, x + W x, keeps W and scales its bias)
    read = set(consumers.values())
    for name in read & sources:
        if any((u in writers) != (u in consumers) for u in writers | set(consumers)
               if consumers.get(u) == name or name in (_stream_source(u, gm) or ((), ()))[0]):
            return None
    factors = {name: c for name in sources}
    for name in read:
        factors[name] = factors.get(name, 1.0) / c
    consumers = set(consumers)
    clean: set = set()
    for o in others:
        if _reaches(o, inside | writers, ends | consumers, clean):
            return None
    # NB: a parameter scaled here must be read by its writer or consumer alone, under one name
    layers = writers | consumers
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in factors and n not in writers and not _reads_only(n, layers):
            return None
        if n.op == "call_module" and n not in layers and any(k.startswith(f"{n.target}.") for k in factors):
            return None
    from .weightnorm import gain_of

    names = Counter(id(q) for _, q in model.named_parameters(remove_duplicate=False))
    scaled = {}
    for name, f in factors.items():
        name = gain_of(model, name) or name  # NB: a weight-normed layer's weight scales with its g
        try:
            p = model.get_parameter(name)
        except AttributeError:
            return None
        if names[id(p)] != 1:
            return None
        scaled[name] = f
    return {k: f for k, f in scaled.items() if f != 1.0}


def scale_parameter(model: nn.Module, name: str, factor: float, one_plus: bool = False, rows=None) -> None:
    """Multiply parameter ``name`` of ``model`` by ``factor`` in place (``one_plus``: the value read
    is ``1 + w``, so ``1 + w`` is scaled; ``rows``: only rows ``start:stop`` of its first axis), in
    double precision."""
    p = model.get_parameter(name)
    with torch.no_grad():
        t = p if rows is None else p.narrow(0, rows[0], rows[1] - rows[0])
        t.copy_((1 + t.double()) * factor - 1 if one_plus else t.double() * factor)


def _rms_site(n, gm):
    """``(input, dim, module path, eps, weight attribute, one_plus)`` of the RMS norm ``n`` computes
    or ends (a written-out norm's mean; an ``rms_norm`` op over the last axis with a weight), else None."""
    rms = rms_norm_of(n)
    if rms is not None and rms.weight is None:
        # NB: a norm without a weight read by one linear layer alone refolds into that layer's weight
        # (rms_folds, when it finds the eps); any other has nothing to refold: weightless_stream_fold
        # scales around it
        lin = linear_after(rms.out)
        if lin is None:
            return None
        path, _, attr = _before_casts(lin.args[1]).target.rpartition(".")
        return rms.input, rms.dim, path, rms.eps, attr, False
    if rms is not None:
        path, _, attr = rms.weight.target.rpartition(".")
        return rms.input, rms.dim, path, rms.eps, attr, rms.one_plus
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.RMSNorm) and len(m.normalized_shape) == 1 and m.weight is not None and n.args:
            return n.args[0], -1, n.target, _MODULE_EPS, "weight", False
        return None
    if n.op != "call_function" or op_of(n, gm) != "rms_norm":
        return None
    args = call_arguments(n, gm)
    w, shape = args.get("weight"), args.get("normalized_shape")
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    eps = args.get("eps")
    path, _, attr = w.target.rpartition(".")
    return args["input"], -1, path, _MODULE_EPS if eps is None else eps, attr, False


def apply_rms_fold(module: nn.Module, fold: RmsFold, eps_module: nn.Module | None = None) -> dict:
    """Set ``fold``'s eps (on ``eps_module``, the module ``fold.eps_module`` names, when given) and
    scale its (already sliced) weight in place; returns {attribute: new value}."""
    scale = (fold.old / fold.new) ** 0.5
    eps = fold.eps * fold.old / fold.new
    setattr(eps_module if eps_module is not None else module, fold.eps_attr, eps)
    w = getattr(module, fold.weight)
    with torch.no_grad():
        if fold.one_plus:
            w.copy_((1 + w.double()) * scale - 1)
        else:
            w.copy_(w.double() * scale)
    return {fold.eps_attr: eps}


__all__ = ["Change", "Scope", "ResizeError", "RESIZERS", "resizer", "rule_for", "resize", "resync_counts",
           "HEAD_COUNTS", "WIDTHS", "STREAM_WIDTHS", "RmsFold", "rms_folds", "GrnSite", "grn_sites",
           "inline_grn_groups", "apply_rms_fold", "rms_input_producer",
           "norm_sites", "tied_head_norms", "stream_scale_sources", "constant_scale_sources", "scale_parameter",
           "WeightlessSite", "weightless_sites", "weightless_stream_fold", "resize_weightless_norms",
           "magnitude_folds", "OwnNormSite", "own_norm_sites", "module_input_shapes", "own_norm_replacement",
           "inline_layer_norm_groups", "is_record", "record_fields", "record_ints", "set_attr_or_field",
           "record_holders"]
