"""Modules the rewrite puts in place of stock ones that cannot express a pruned shape.

``nn.MultiheadAttention`` ties its q/k/v width to its input width (``embed_dim``) and its head
width to ``embed_dim / num_heads``; after heads are removed neither holds. ``PrunedMultiheadAttention``
computes exactly what ``nn.MultiheadAttention`` computes, with any number of heads of width
``head_dim``, input width ``in_features`` and output width ``out_features``. Parameters keep the
stock names (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``,
``bias_k``, ``bias_v``), so the state_dict reads like the original's.

``nn.LayerNorm`` divides its mean and variance by its width; over a residual stream that lost
channels (zero in the dense model, so they added nothing to either sum) the compressed norm must
still divide by the old width. ``PrunedLayerNorm`` (an ``nn.LayerNorm``, state_dict unchanged) does,
through :func:`layer_norm_kept_divisor`; ``PrunedLayerNorm2d`` is its channels-first form
(torchvision's and timm's ConvNeXt ``LayerNorm2d``). Where the removed channels held constants other
than 0 (MLP-Mixer's stream), its ``fill`` buffer holds them and the mean and variance count them.
``PrunedOwnLayerNorm`` takes the place of a user's own layer norm module (written out, or
``F.layer_norm`` of its tensors) over any one axis, its weight and bias under their own names.

timm's weight-standardised convs (BiT's ``StdConv2d``, NF-nets' ``ScaledStdConv2d``, their ``*Same``
forms) normalise each output channel's weight over its input entries; once input channels are pruned,
``PrunedStdConv2d`` keeps the old fan-in and the removed entries' moments in those statistics
(:func:`batch_norm_kept_divisor`, the graph form's function).

ConvNeXt V2's Global Response Normalization divides each channel's spatial 2-norm by their mean over
the channels; ``PrunedGlobalResponseNorm`` (timm's ``GlobalResponseNorm`` and Hugging Face's
``ConvNextV2GRN``, either layout) keeps the old channel count as that mean's divisor.

torchvision's Swin window attention reads its head width as ``C // num_heads`` of its input width
``C`` and writes ``C`` features back from the heads; MaxViT's attention writes its heads' output at
its input width too. ``PrunedWindowAttention`` (Swin V1 and V2, :func:`window_attention`) and
``PrunedRelativeAttention`` (MaxViT) compute the same functions with an explicit head count and head
width, under the stock parameter names.

``nn.LSTM``/``nn.GRU``/``nn.RNN`` have one ``hidden_size`` for every layer and direction; once their
units are pruned apart, ``PrunedRNN`` computes the same function with a hidden size per layer and
direction, under the stock parameter names, one single-layer ``torch._VF`` kernel call per layer and
direction (cuDNN's on a GPU).

Internals:
    * ``PrunedRNN``: the reverse direction runs its kernel on the time-flipped sequence and flips its
      output back; dropout between layers is ``F.dropout`` on each layer's output but the last, as the
      stock layer applies it (its random draws differ from the fused kernel's). Each slot's units keep
      their original indices (``units_l{k}[_reverse]``), and the state is written at the indices
      ``state_index`` lists (``searchsorted``), zeros elsewhere, so ``h_n``/``c_n`` keep their layout.
      # NB: a stock layer reads its weights through ``_flat_weights``, a list that writes into
      ``_parameters`` bypass: :func:`refresh_rnn_weights` re-points it (the rewrite and load call it;
      the rebuild's identity ``_apply`` does the same through ``RNNBase._apply``).
    * ``kept_heads`` (a buffer) holds the original index of every remaining head: a per-head
      ``attn_mask`` of shape ``[batch * num_heads_before, L, S]`` is sliced with it.
    * Scores are scaled by ``1 / sqrt(head_dim)``, the original head width (unchanged by head pruning).
    * The fast path. Self-attention (``query is key is value``, packed weights) is one
      ``F.linear`` to ``3 * num_heads * head_dim`` features, viewed as ``[3, B, H, L, head_dim]``
      (no copy, either layout), ``scaled_dot_product_attention`` (flash/efficient kernels on a
      GPU, flash on the CPU; they write ``[B, L, H, head_dim]``, so the batch-first output
      ``transpose(1, 2).reshape`` is a view) and the out projection. ``key is value`` projects
      twice, otherwise (or with separate kdim/vdim weights) three times; ``batch_first=False``
      costs one copy of the attention output (as in the stock module).
    * ``torch._native_multi_head_attention`` (the stock module's fused inference path) cannot
      run a pruned module: it requires ``qkv_weight`` of ``3 * embed_dim`` rows and an
      ``embed_dim`` equal to the input width.
    * ``need_weights=True`` computes the weights explicitly (softmax of the scaled scores, then
      dropout), as the stock module does; the ``is_causal`` hint follows the stock module (the
      mask goes and the kernel masks, unless weights or a key padding mask are asked for).
    * ``init_kwargs()`` / ``PrunedMultiheadAttention.empty(**kwargs)`` describe and rebuild one without a
      source module (uninitialised tensors of the right shapes): ``otofx.load`` uses them (so do the
      window and relative attention modules).
    * Window attention: eager Python on the input's own sizes, so any batch and image size runs
      (padding to whole windows, the shift dropped along an axis one window covers, the shifted
      windows' region mask built from the padded size). Swin V2's key bias is left out (the stock
      function zeroes it on a copy), its logit scale is clamped at log(100) before ``exp``, and its
      bias is ``16 * sigmoid`` of the position MLP's per-head output. # NB: the region mask adds
      -100 (not -inf), as the stock function does: exactness needs the same finite value.
    * ``kept_heads`` records the original index of each head left (a compressed model compressed
      again keeps indexing the first model's heads).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm_kept_divisor(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, old: int = 1,
                            new: int = 1, fill=None):
    """``F.layer_norm`` over a last axis narrowed from ``old`` to ``new`` entries whose removed entries
    were zero: the mean and variance of all ``old`` entries (a compressed layer norm's function).
    ``fill``: the values the ``old - new`` removed entries held instead (constants the same for every
    input, broadcast against the input's other axes: ``[..., old - new]``), None for zeros."""
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    if fill is None:
        # NB: with r = new / old, the old mean is r * m and the old mean square r * (v + m**2), so the
        # old variance is r * v + r * (1 - r) * m**2: two non-negative terms, no cancellation. Half
        # inputs are normalised in float32, as torch's kernel does.
        r = new / old
        y = (x - mean * r) * torch.rsqrt(var * r + mean.square() * (r * (1.0 - r)) + eps)
    else:
        if fill.shape[-1] != old - new:
            raise ValueError(f"layer_norm_kept_divisor: fill holds {fill.shape[-1]} entries, {old - new} were removed")
        if torch.broadcast_shapes(x.shape[:-1], fill.shape[:-1]) != x.shape[:-1]:
            # NB: the constants were read at the example's sizes; one that varies along an axis (MLP-Mixer's
            # tokens, fixed by its token MLP) fits inputs of that size only
            raise ValueError(f"layer_norm_kept_divisor: the filled constants were read at sizes {tuple(fill.shape[:-1])}, "
                             f"which do not broadcast to this input's {tuple(x.shape[:-1])}")
        # NB: the two parts' mean and variance pooled (Chan et al.): every term is non-negative, so
        # nothing cancels, whatever the filled constants are
        f_var, f_mean = torch.var_mean(fill.to(x.dtype), dim=-1, keepdim=True, correction=0)
        a, b = new / old, (old - new) / old
        m = mean * a + f_mean * b
        v = (var + (mean - m).square()) * a + (f_var + (f_mean - m).square()) * b
        y = (x - m) * torch.rsqrt(v + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


# NB: symbolic tracing keeps a call to it as one node (the layer_norm rule's), not its reductions,
# so a compressed model compressed again sees a layer norm
torch.fx.wrap("layer_norm_kept_divisor")


def _channel_affine(y: torch.Tensor, weight, bias, shape) -> torch.Tensor:
    """``y * weight + bias`` with both (either may be None) per channel, viewed as ``shape``."""
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def group_norm_kept_divisor(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, old: int = 1,
                            new: int = 1):
    """``F.group_norm`` with one group over channels narrowed from ``old`` to ``new`` whose removed
    channels were zero: the mean and variance of all ``old`` channels (a compressed MetaFormer's
    ``GroupNorm(1, C)``)."""
    if num_groups != 1:
        raise ValueError(f"group_norm_kept_divisor normalises one group, got num_groups={num_groups}")
    # NB: the old mean and variance from the new ones as in layer_norm_kept_divisor: every position of a
    # removed channel was zero, so r = new / old of the entries remain
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    dims = tuple(range(1, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    r = new / old
    y = (x - mean * r) * torch.rsqrt(var * r + mean.square() * (r * (1.0 - r)) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return _channel_affine(y, weight, bias, shape).to(input.dtype)


torch.fx.wrap("group_norm_kept_divisor")


def batch_norm_kept_divisor(input, running_mean=None, running_var=None, weight=None, bias=None, training: bool = True,
                            momentum: float = 0.0, eps: float = 1e-5, old: int = 1, new: int = 1, fill=None):
    """``F.batch_norm`` with the statistics of the batch (no running statistics) over an input whose
    last axis was narrowed from ``old`` to ``new`` entries: per channel (axis 1), the mean and
    variance of all ``old`` entries (a compressed weight standardisation,
    ``batch_norm(w.reshape(1, out, -1), None, None, training=True)`` over a conv's pruned input
    channels). ``fill``: the removed entries' mean and variance per channel (``[2, C]``,
    :func:`removed_moments`), None where they were zeros."""
    if running_mean is not None or running_var is not None or not training:
        raise ValueError("batch_norm_kept_divisor normalises by the statistics of the batch: no running statistics")
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    dims = (0,) + tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a, b = new / old, (old - new) / old
    if fill is None:
        # NB: as layer_norm_kept_divisor's: the old mean is a * m, the old variance a * v + a * b * m**2
        y = (x - mean * a) * torch.rsqrt(var * a + mean.square() * (a * b) + eps)
    else:
        if fill.shape != (2, x.shape[1]):
            raise ValueError(f"batch_norm_kept_divisor: fill is {tuple(fill.shape)}, not the [2, {x.shape[1]}] "
                             "moments of the removed entries per channel")
        f = fill.to(x.dtype)
        f_mean, f_var = f[0].reshape(shape), f[1].reshape(shape)
        # NB: the two parts' mean and variance pooled (Chan et al.): every term is non-negative
        m = mean * a + f_mean * b
        v = (var + (mean - m).square()) * a + (f_var + (f_mean - m).square()) * b
        y = (x - m) * torch.rsqrt(v + eps)
    return _channel_affine(y, weight, bias, shape).to(input.dtype)


torch.fx.wrap("batch_norm_kept_divisor")


def removed_moments(values: torch.Tensor, channels: int, keep=None) -> torch.Tensor | None:
    """``[2, C]``: per channel (axis 1 of ``values``, what the removed entries of a batch-statistics
    norm's input held, read by ``passes.prune.constant_fills``), their mean and (population) variance
    (computed in float64), for the channels ``keep`` (indices; None: all ``channels``); None when every
    value is zero.

    # NB: ``constant_fill`` cut the axes the values do not vary along, which leaves their moments as
    they are: axis 1 cut to one channel is expanded back to ``channels``
    """
    if not bool(values.ne(0).any()):
        return None
    if values.shape[1] != channels:
        values = values.expand(values.shape[0], channels, *values.shape[2:])
    v = values.detach().double().movedim(1, 0).reshape(channels, -1)
    var, mean = torch.var_mean(v, dim=1, correction=0)
    out = torch.stack([mean, var]).to(values.dtype)
    return out if keep is None else out.index_select(1, torch.as_tensor(keep, dtype=torch.long, device=out.device))


def pool_moments(first: torch.Tensor | None, n_first: int, then: torch.Tensor | None,
                 n_then: int) -> torch.Tensor | None:
    """The ``[2, C]`` moments of two sets of removed entries (``n_first`` and ``n_then`` per channel;
    None: zeros) pooled, or None when both are zeros."""
    if first is None and then is None:
        return None
    ref = first if first is not None else then
    a = torch.zeros_like(ref, dtype=torch.float64) if first is None else first.double()
    b = torch.zeros_like(ref, dtype=torch.float64) if then is None else then.to(ref.device).double()
    wa, wb = n_first / (n_first + n_then), n_then / (n_first + n_then)
    m = a[0] * wa + b[0] * wb
    v = (a[1] + (a[0] - m).square()) * wa + (b[1] + (b[0] - m).square()) * wb
    return torch.stack([m, v]).to(ref.dtype)


class PrunedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with one group over ``num_channels`` channels that were ``full_channels``
    before pruning: the removed channels were zero, and the mean and variance still divide by them."""

    def __init__(self, src: nn.GroupNorm, full_channels: int):
        nn.Module.__init__(self)
        self.num_groups, self.num_channels = 1, int(src.num_channels)
        self.eps, self.affine, self.full_channels = src.eps, src.affine, int(full_channels)
        self.weight, self.bias = src.weight, src.bias
        self.train(src.training)

    @classmethod
    def empty(cls, *, channels: int, full_channels: int, eps: float, affine: bool, device=None, dtype=None):
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        return cls(nn.GroupNorm(1, channels, eps=eps, affine=affine, device=device, dtype=dtype), full_channels)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        return {"channels": self.num_channels, "full_channels": self.full_channels, "eps": float(self.eps),
                "affine": bool(self.affine)}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm_kept_divisor(input, 1, self.weight, self.bias, self.eps, old=self.full_channels,
                                       new=self.num_channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_channels={self.full_channels}"


# subclasses of nn.GroupNorm whose forward is F.group_norm of the same tensors (timm's, with its optional
# fused kernel): PrunedGroupNorm takes their place as it takes nn.GroupNorm's
PLAIN_GROUP_NORMS = ("timm.layers.norm.GroupNorm1", "timm.layers.norm.GroupNorm")


class PrunedGlobalResponseNorm(nn.Module):
    """ConvNeXt V2's Global Response Normalization over ``num_channels`` channels that were
    ``full_channels`` before pruning: ``x + beta + gamma * x * Nx`` with ``Nx = Gx / (sum of Gx over
    the channels / full_channels + eps)``, ``Gx`` the 2-norm of each channel over the spatial axes.
    The removed channels were zero: their ``Gx`` added nothing to the sum, and still counts in the divisor.

    ``channels_last``: NHWC input (timm's default, Hugging Face's), else NCHW; ``weight`` (gamma) and
    ``bias`` (beta) keep the source's names and shapes (``[C]`` or ``[1, 1, 1, C]``)."""

    def __init__(self, src: nn.Module, full_channels: int, *, channels_last: bool, eps: float):
        super().__init__()
        self.weight, self.bias = src.weight, src.bias
        w = src.weight
        self.num_channels = int(w.shape[1] if w.dim() == 4 and not channels_last else w.shape[-1])
        self.full_channels = int(full_channels)
        self.channels_last, self.eps = bool(channels_last), float(eps)
        self.train(src.training)

    @classmethod
    def empty(cls, *, channels: int, full_channels: int, channels_last: bool, eps: float, param_dims: int = 1,
              device=None, dtype=None):
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        shape = (channels,) if param_dims == 1 else (1, 1, 1, channels) if channels_last else (1, channels, 1, 1)
        src = nn.Module()
        src.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        src.bias = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        return cls(src, full_channels, channels_last=channels_last, eps=eps)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        return {"channels": self.num_channels, "full_channels": self.full_channels,
                "channels_last": self.channels_last, "eps": self.eps, "param_dims": int(self.weight.dim())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, channel, shape = ((1, 2), -1, (1, 1, 1, -1)) if self.channels_last else ((2, 3), 1, (1, -1, 1, 1))
        x_g = torch.linalg.vector_norm(x, ord=2, dim=spatial, keepdim=True)
        # NB: written as the rewrite keeps a mean's old divisor (mean of Gx * new / old), which the
        # analysis of a compressed model reads as a GRN again (passes.nodes.grn_of)
        x_n = x_g / ((x_g * (self.num_channels / self.full_channels)).mean(dim=channel, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * x_n)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, full_channels={self.full_channels}, eps={self.eps}, "
                f"channels_last={self.channels_last}")


# classes whose forward is ConvNeXt V2's GRN (``x + beta + gamma * x * Nx``), by qualified name: the
# function reading ``(channels_last, eps)`` off an instance. PrunedGlobalResponseNorm takes their place
GLOBAL_RESPONSE_NORMS = {
    "timm.layers.grn.GlobalResponseNorm": lambda m: (m.channel_dim in (-1, 3), m.eps),
    # NB: Hugging Face's writes its eps (1e-6) into the forward; the rebuild reads the graph's
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN": lambda m: (True, 1e-6),
}


def constant_fill(values: torch.Tensor) -> torch.Tensor:
    """``values`` (``[..., r]``: what r removed entries of a norm's input held) with every leading axis
    along which they do not vary cut to size 1 (the batch, a constant that is the same for every
    token), so the fill broadcasts against inputs of other sizes there."""
    out = values.detach()
    for d in range(out.dim() - 1):
        if out.shape[d] > 1 and bool((out == out.narrow(d, 0, 1)).all()):
            out = out.narrow(d, 0, 1)
    return out.contiguous()


def grow_fill(fill: torch.Tensor | None, values: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A norm's ``fill`` (None: nothing filled yet, or zeros only) followed by ``count`` more removed
    entries holding ``values`` (``[..., count]``; None: zeros); None when nothing but zeros was ever
    removed (the plain kept divisor)."""
    if values is None:
        if fill is None:
            return None
        values = torch.zeros((1,) * (fill.dim() - 1) + (count,), dtype=fill.dtype, device=fill.device)
    elif values.shape[-1] != count:
        raise ValueError(f"{values.shape[-1]} fill values for {count} removed entries")
    if fill is None:
        return constant_fill(values)
    lead = torch.broadcast_shapes(fill.shape[:-1], values.shape[:-1])
    parts = [t.expand(*lead, t.shape[-1]) for t in (fill.to(values), values)]
    return constant_fill(torch.cat(parts, -1))


class PrunedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over ``normalized_shape`` entries that were ``full_width`` before pruning: the
    removed entries were zero, and the mean and variance still divide by ``full_width``. ``fill`` (a
    buffer, or None): the values the removed entries held where they were constants other than 0
    (``[..., full_width - width]``, broadcast against the input: MLP-Mixer's residual stream)."""

    def __init__(self, src: nn.LayerNorm, full_width: int, fill: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.normalized_shape = tuple(src.normalized_shape)
        self.eps, self.elementwise_affine, self.full_width = src.eps, src.elementwise_affine, int(full_width)
        self.weight, self.bias = src.weight, src.bias
        self.register_buffer("fill", fill)
        self.train(src.training)

    @classmethod
    def empty(cls, *, width: int, full_width: int, eps: float, bias: bool, fill_shape=None, device=None, dtype=None):
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        fill = torch.empty(tuple(fill_shape), device=device, dtype=dtype) if fill_shape is not None else None
        return cls(nn.LayerNorm(width, eps=eps, bias=bias, device=device, dtype=dtype), full_width, fill)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        out = {"width": int(self.normalized_shape[-1]), "full_width": self.full_width, "eps": float(self.eps),
               "bias": self.bias is not None}
        if self.fill is not None:
            out["fill_shape"] = list(self.fill.shape)
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm_kept_divisor(input, self.normalized_shape, self.weight, self.bias, self.eps,
                                       old=self.full_width, new=self.normalized_shape[-1], fill=self.fill)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_width={self.full_width}"


class PrunedLayerNorm2d(PrunedLayerNorm):
    """A channels-first ``LayerNorm2d`` (torchvision's and timm's ConvNeXt: permute to channels-last,
    ``F.layer_norm``, permute back) over channels that were ``full_width`` before pruning."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PrunedOwnLayerNorm(nn.Module):
    """A layer norm module of the user's own class (its forward: a layer norm written out, or
    ``F.layer_norm`` of its tensors) over axis ``dim`` of its input, whose ``width`` entries were
    ``full_width`` before pruning: the removed entries were zero, and the mean and variance still divide
    by ``full_width``. The weight and bias keep the names and shapes they had in the source module
    (``weight``/``bias`` or ``gamma``/``beta``, ``[C]`` or ``[C, 1, 1]``), so the state dict keeps its keys.
    ``fill`` (a buffer, or None), as :class:`PrunedLayerNorm`'s: the constants other than 0 the removed
    entries held (``[..., full_width - width]``, against the input with axis ``dim`` moved last: an
    ``nn.LayerNorm`` without weights over DiT's stream, whose removed channels hold its position table)."""

    def __init__(self, src: nn.Module | None, *, dim: int, width: int, full_width: int, eps: float,
                 weight: str | None = None, bias: str | None = None, fill: torch.Tensor | None = None):
        super().__init__()
        self.dim, self.width, self.full_width, self.eps = int(dim), int(width), int(full_width), float(eps)
        self.weight_name, self.bias_name = weight, bias
        for name in (weight, bias):
            if name is not None:
                self.register_parameter(name, getattr(src, name))
        self.register_buffer("fill", fill)
        if src is not None:
            self.train(src.training)

    @property
    def normalized_shape(self) -> tuple:
        return (self.width,)

    @classmethod
    def empty(cls, *, dim: int, width: int, full_width: int, eps: float, weight=None, bias=None,
              shapes=None, fill_shape=None, device=None, dtype=None):
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        src = nn.Module()
        for name, shape in zip((weight, bias), shapes or ((width,), (width,))):
            if name is not None:
                setattr(src, name, nn.Parameter(torch.empty(tuple(shape), device=device, dtype=dtype)))
        fill = torch.empty(tuple(fill_shape), device=device, dtype=dtype) if fill_shape is not None else None
        return cls(src, dim=dim, width=width, full_width=full_width, eps=eps, weight=weight, bias=bias, fill=fill)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        shapes = [list(getattr(self, n).shape) if n is not None else None for n in (self.weight_name, self.bias_name)]
        out = {"dim": self.dim, "width": self.width, "full_width": self.full_width, "eps": self.eps,
               "weight": self.weight_name, "bias": self.bias_name, "shapes": shapes}
        if self.fill is not None:
            out["fill_shape"] = list(self.fill.shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, self.weight_name).reshape(-1) if self.weight_name is not None else None
        b = getattr(self, self.bias_name).reshape(-1) if self.bias_name is not None else None
        y = layer_norm_kept_divisor(x.movedim(self.dim, -1), (self.width,), w, b, self.eps,
                                    old=self.full_width, new=self.width, fill=self.fill)
        return y.movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"{self.width}, full_width={self.full_width}, dim={self.dim}, eps={self.eps}"


# NB: these classes normalise the channel axis of NCHW input by permuting around F.layer_norm; their
# pruned form is PrunedLayerNorm2d
CHANNELS_FIRST_LAYER_NORMS = ("torchvision.models.convnext.LayerNorm2d", "timm.layers.norm.LayerNorm2d")
# subclasses of nn.LayerNorm whose forward is F.layer_norm of the same tensors (timm's, with its
# optional fused kernel): PrunedLayerNorm takes their place as it takes nn.LayerNorm's
PLAIN_LAYER_NORMS = ("timm.layers.norm.LayerNorm",)
# Hugging Face's ConvNeXt layer norms: nn.LayerNorm's forward when ``data_format`` is "channels_last", permuted
# around it over the channels of NCHW input when "channels_first" (PrunedLayerNorm2d's)
DATA_FORMAT_LAYER_NORMS = ("transformers.models.convnext.modeling_convnext.ConvNextLayerNorm",
                           "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm",
                           "transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayerNorm")


def _pad_same(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """TensorFlow's SAME padding of ``x`` for a conv (timm's ``pad_same``): each spatial axis padded
    so that it gives ceil(size / stride) outputs, the odd pixel at the end."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        p = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads = [p // 2, p - p // 2] + pads
    return F.pad(x, pads)


_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class PrunedStdConv2d(nn.Conv2d):
    """timm's weight-standardised convs (``StdConv2d``, ``StdConv2dSame``: BiT; ``ScaledStdConv2d``,
    ``ScaledStdConv2dSame``: NF-nets) whose input channels were pruned: each output channel's weight
    is normalised by the mean and variance of its ``full_fan_in`` entries of before (in / groups *
    kh * kw), the removed ones counted by their moments (``fill``: ``[2, out_channels]``, their mean
    and variance per output channel; None where they were zeros, as zeroed rows leave them).

    ``gain`` (a parameter, or None) times ``scale`` (the float the source computed from its first
    fan-in) scales each output channel, as ScaledStdConv2d's; ``same_pad`` pads TensorFlow's SAME
    way first, as the ``*Same`` classes' dynamic padding. Parameter names are the source's."""

    def __init__(self, src: nn.Conv2d, full_fan_in: int, fill: torch.Tensor | None = None):
        nn.Module.__init__(self)
        for k in _CONV_ATTRS:
            setattr(self, k, getattr(src, k))
        self.weight = src.weight
        self.register_parameter("bias", src.bias)  # NB: None is kept as nn.Conv2d keeps it, a parameter slot
        if isinstance(getattr(src, "gain", None), torch.Tensor):
            self.gain, self.scale = src.gain, float(src.scale)
        else:
            self.register_parameter("gain", None)
            self.scale = 1.0
        self.eps, self.same_pad = float(src.eps), bool(getattr(src, "same_pad", False))
        self.full_fan_in = int(full_fan_in)
        self.register_buffer("fill", fill)
        self.train(src.training)

    @classmethod
    def empty(cls, *, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
              bias: bool, eps: float, scale: float | None, same_pad: bool, full_fan_in: int, fill: bool = False,
              device=None, dtype=None):
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        dd = {"device": device, "dtype": dtype}
        src = nn.Conv2d(in_channels, out_channels, tuple(kernel_size), tuple(stride), tuple(padding)
                        if isinstance(padding, (list, tuple)) else padding, tuple(dilation), groups, bias, **dd)
        src.eps, src.same_pad = eps, same_pad
        if scale is not None:
            src.gain, src.scale = nn.Parameter(torch.empty(out_channels, 1, 1, 1, **dd)), scale
        return cls(src, full_fan_in, torch.empty(2, out_channels, **dd) if fill else None)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding) if isinstance(self.padding, (tuple, list)) else self.padding,
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "eps": self.eps, "scale": self.scale if self.gain is not None else None, "same_pad": self.same_pad,
                "full_fan_in": self.full_fan_in, "fill": self.fill is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        gain = (self.gain * self.scale).view(-1) if self.gain is not None else None
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        weight = batch_norm_kept_divisor(self.weight.reshape(1, self.out_channels, -1), None, None, gain, None, True,
                                         0.0, self.eps, old=self.full_fan_in, new=fan_in, fill=self.fill)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, full_fan_in={self.full_fan_in}"


# timm's weight-standardised convs, by qualified name (their forward: batch norm of the weight over its
# input axis, then F.conv2d); PrunedStdConv2d takes their place once their input channels are pruned
STD_CONVS = ("timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.StdConv2dSame",
             "timm.layers.std_conv.ScaledStdConv2d", "timm.layers.std_conv.ScaledStdConv2dSame")


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads`` heads of width ``head_dim`` (any count)."""

    def __init__(self, src: nn.MultiheadAttention, num_heads: int, head_dim: int, kept_heads: torch.Tensor,
                 heads_before: int):
        super().__init__()
        self.num_heads, self.head_dim, self.heads_before = num_heads, head_dim, heads_before
        self.batch_first, self.dropout, self.add_zero_attn = src.batch_first, src.dropout, src.add_zero_attn
        self.packed = src._qkv_same_embed_dim
        if self.packed:
            self.in_proj_weight = src.in_proj_weight
        else:
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = (
                src.q_proj_weight, src.k_proj_weight, src.v_proj_weight)
        self.in_proj_bias = src.in_proj_bias
        out = src.out_proj
        self.out_proj = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None)
        self.out_proj.weight = out.weight
        if out.bias is not None:
            self.out_proj.bias = out.bias
        self.bias_k, self.bias_v = src.bias_k, src.bias_v
        self.register_buffer("kept_heads", kept_heads.clone(), persistent=True)

    @classmethod
    def empty(cls, *, num_heads: int, head_dim: int, heads_before: int, in_features: int, kdim: int, vdim: int,
              out_features: int, packed: bool, in_proj_bias: bool, out_proj_bias: bool, bias_kv: bool,
              add_zero_attn: bool = False, dropout: float = 0.0, batch_first: bool = False, device=None,
              dtype=None) -> "PrunedMultiheadAttention":
        """A module of these widths with uninitialised tensors (``kept_heads`` included), ready for a state_dict."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        kw = {"device": device, "dtype": dtype}
        width = num_heads * head_dim
        self.num_heads, self.head_dim, self.heads_before = num_heads, head_dim, heads_before
        self.batch_first, self.dropout, self.add_zero_attn = batch_first, dropout, add_zero_attn
        self.packed = packed
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, in_features, **kw))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(width, in_features, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(width, kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(width, vdim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width, **kw)) if in_proj_bias else None
        self.out_proj = nn.Linear(width, out_features, bias=out_proj_bias, **kw)
        if bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, width, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, width, **kw))
        else:
            self.bias_k = self.bias_v = None
        self.register_buffer("kept_heads", torch.empty(num_heads, dtype=torch.long, device=device), persistent=True)
        return self

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """False: torch's encoder and decoder layers read this to choose their fused fast path,
        which needs the full head count; they then call this module's forward."""
        return False

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure (simple values only)."""
        if self.packed:
            in_features = kdim = vdim = self.in_proj_weight.shape[1]
        else:
            in_features, kdim, vdim = (w.shape[1] for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "heads_before": self.heads_before,
                "in_features": int(in_features), "kdim": int(kdim), "vdim": int(vdim),
                "out_features": int(self.out_proj.weight.shape[0]), "packed": bool(self.packed),
                "in_proj_bias": self.in_proj_bias is not None, "out_proj_bias": self.out_proj.bias is not None,
                "bias_kv": self.bias_k is not None, "add_zero_attn": bool(self.add_zero_attn),
                "dropout": float(self.dropout), "batch_first": bool(self.batch_first)}

    def _heads(self, t, parts: int, seq_first: bool):
        """A projection output ``[B, L, parts * width]`` (``[L, B, ...]`` when ``seq_first``) as a
        ``[parts, B, H, L, head_dim]`` view (no copy)."""
        a, b = t.shape[0], t.shape[1]
        t = t.view(a, b, parts, self.num_heads, self.head_dim)
        return t.permute(2, 1, 3, 0, 4) if seq_first else t.permute(2, 0, 3, 1, 4)

    def _project(self, query, key, value, seq_first: bool):
        """q, k, v as ``[B, H, L|S, head_dim]`` views of as few projection outputs as the inputs allow."""
        w = self.num_heads * self.head_dim
        bias = self.in_proj_bias
        if self.packed:
            weight = self.in_proj_weight
            if query is key and key is value:  # self-attention: one packed projection
                return self._heads(F.linear(query, weight, bias), 3, seq_first).unbind(0)
            if key is value:
                q = F.linear(query, weight[:w], bias[:w] if bias is not None else None)
                kv = F.linear(key, weight[w:], bias[w:] if bias is not None else None)
                k, v = self._heads(kv, 2, seq_first).unbind(0)
                return self._heads(q, 1, seq_first)[0], k, v
            weights = weight[:w], weight[w:2 * w], weight[2 * w:]
        else:
            weights = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        biases = (None,) * 3 if bias is None else (bias[:w], bias[w:2 * w], bias[2 * w:])
        return tuple(self._heads(F.linear(x, wt, b), 1, seq_first)[0]
                     for x, wt, b in zip((query, key, value), weights, biases))

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of one, batch first
            same_k, same_v = key is query, value is key  # keep the identities the projection reads
            query = query.unsqueeze(0)
            key = query if same_k else key.unsqueeze(0)
            value = key if same_v else value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_first = batched and not self.batch_first
        B, L = (query.shape[1], query.shape[0]) if seq_first else (query.shape[0], query.shape[1])
        H, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, seq_first)  # [B, H, L|S, hd]
        extra = 0  # key positions appended (bias_k/bias_v, add_zero_attn)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, hd).expand(B, H, 1, hd)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, hd).expand(B, H, 1, hd)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
            extra += 1
        S = k.shape[2]
        causal = False
        if is_causal and key_padding_mask is None and not need_weights:
            # as the stock module: the hint replaces the mask and goes to the kernel
            attn_mask, causal = None, True
        elif is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S - extra, dtype=torch.bool, device=query.device).triu(1)
        mask = self._merge_masks(attn_mask, key_padding_mask, B, L, S, extra, query.dtype)
        p = self.dropout if self.training else 0.0
        # NB: the scale is the original head width's (head_dim does not change with head pruning)
        scale = 1.0 / math.sqrt(hd)
        weights = None
        if H == 0:  # every head removed: the out projection reads nothing
            out = q
        elif not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale)
        else:
            scores = (q * scale) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        # [B, H, L, hd] -> [B, L, H * hd] (a view when the kernel wrote [B, L, H, hd]) or [L, B, H * hd]
        out = out.permute(2, 0, 1, 3).reshape(L, B, H * hd) if seq_first else out.transpose(1, 2).reshape(B, L, H * hd)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), weights

    def _merge_masks(self, attn_mask, key_padding_mask, B, L, S, extra, dtype):
        """One additive mask broadcastable to ``[B, H, L, S]`` (None when there is none)."""
        def additive(m):
            if m is None:
                return None
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = additive(attn_mask)
        if mask is not None:
            if extra:  # appended keys are never masked
                mask = F.pad(mask, (0, extra))
            if mask.dim() == 2:
                mask = mask.view(1, 1, L, S)
            else:  # per (batch, head): keep the remaining heads' masks
                mask = mask.view(B, self.heads_before, L, S).index_select(1, self.kept_heads)
        kpm = additive(key_padding_mask)
        if kpm is not None:
            if extra:
                kpm = F.pad(kpm, (0, extra))
            kpm = kpm.view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"


# ---------------------------------------------------------------------------------------------
# Shifted window attention (torchvision's Swin V1 and V2 blocks) with any head count
# ---------------------------------------------------------------------------------------------


def _window_regions(size: int, window: int, shift: int, device) -> torch.Tensor:
    """Region label of each position along one padded, rolled image axis of ``size``: 0 before the last
    window, 1 in the last window before the ``shift`` positions that the roll wrapped around, 2 in
    those. Positions of a window with different labels (in either axis) must not attend to each other."""
    idx = torch.arange(size, device=device)
    return (idx >= size - window).long() + (idx >= size - shift).long()


def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias, proj_weight: torch.Tensor, proj_bias,
                     position_bias: torch.Tensor, window_size, shift_size, num_heads: int, head_dim: int,
                     logit_scale=None, attention_dropout: float = 0.0, dropout: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """Swin's (shifted) window attention on ``x`` ``[B, H, W, C]`` with ``num_heads`` heads of width
    ``head_dim`` (neither read from ``C``); returns ``[B, H, W, proj_weight.shape[0]]``.

    The image is padded at the bottom/right to whole windows; the shift is dropped along an axis that
    one window covers; with a shift, the image is rolled back by it, and positions of different
    regions of a wrapped-around window get -100 added to their scores. ``logit_scale`` (``[heads, 1, 1]``)
    selects Swin V2's cosine attention (its key bias is not used); otherwise scores are scaled by
    ``head_dim ** -0.5``. ``position_bias`` is ``[1, heads, window area, window area]``.
    """
    B, H, W, _ = x.shape
    wh, ww = window_size
    pad_b, pad_r = (-H) % wh, (-W) % ww
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    sh = shift_size[0] if wh < Hp else 0
    sw = shift_size[1] if ww < Wp else 0
    shifted = sh + sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw = Hp // wh, Wp // ww
    area = wh * ww

    def windows(t):  # [B, Hp, Wp, ...] -> [B * nh * nw, area, ...]
        rest = t.shape[3:]
        return t.reshape(t.shape[0], nh, wh, nw, ww, *rest).transpose(2, 3).reshape(t.shape[0] * nh * nw, area, *rest)

    x = windows(x)
    n = num_heads * head_dim
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        qkv_bias = torch.cat([qkv_bias[:n], torch.zeros_like(qkv_bias[n:2 * n]), qkv_bias[2 * n:]])
    q, k, v = F.linear(x, qkv_weight, qkv_bias).view(x.shape[0], area, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    scores = scores + position_bias
    if shifted:
        rows = _window_regions(Hp, wh, sh, x.device)
        cols = _window_regions(Wp, ww, sw, x.device)
        label = windows((rows[:, None] * 3 + cols[None, :])[None, :, :, None])[..., 0]  # [nh * nw, area]
        mask = (label[:, None, :] != label[:, :, None]).to(scores.dtype) * -100.0  # [nW, area, area]
        scores = (scores.view(B, nh * nw, num_heads, area, area) + mask[None, :, None]).view(-1, num_heads, area, area)
    attn = F.dropout(scores.softmax(dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(x.shape[0], area, n)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    c = out.shape[-1]
    out = out.view(B, nh, nw, wh, ww, c).transpose(2, 3).reshape(B, Hp, Wp, c)
    if shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


class PrunedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (``cosine=False``) or ``ShiftedWindowAttentionV2``
    (``cosine=True``) with ``num_heads`` heads of width ``head_dim`` (any count).

    Parameters and buffers keep the stock names: ``qkv``, ``proj``, ``relative_position_index``, and
    ``relative_position_bias_table`` (``[table, heads]``), or V2's ``logit_scale`` (``[heads, 1, 1]``),
    ``cpb_mlp`` (its last layer has one output per head) and ``relative_coords_table``.
    """

    FLAT_INDEX = True  # relative_position_index: [area * area] (the video Swin's: [volume, volume])

    def __init__(self, src: nn.Module, num_heads: int, head_dim: int, kept_heads: torch.Tensor, heads_before: int):
        super().__init__()
        self.num_heads, self.head_dim, self.heads_before = num_heads, head_dim, heads_before
        self.window_size, self.shift_size = list(src.window_size), list(src.shift_size)
        self.attention_dropout, self.dropout = float(src.attention_dropout), float(src.dropout)
        self.cosine = isinstance(getattr(src, "logit_scale", None), torch.Tensor)
        self.training = src.training
        self.qkv, self.proj = src.qkv, src.proj
        if self.cosine:
            self.logit_scale = src.logit_scale
            self.cpb_mlp = src.cpb_mlp
            self.register_buffer("relative_coords_table", src.relative_coords_table)
        else:
            self.relative_position_bias_table = src.relative_position_bias_table
        self.register_buffer("relative_position_index", src.relative_position_index)
        self.register_buffer("kept_heads", kept_heads.clone(), persistent=True)

    @classmethod
    def empty(cls, *, num_heads: int, head_dim: int, heads_before: int, in_features: int, out_features: int,
              window_size, shift_size, cosine: bool, qkv_bias: bool, proj_bias: bool, cpb_hidden: int = 0,
              attention_dropout: float = 0.0, dropout: float = 0.0, device=None, dtype=None) -> "PrunedWindowAttention":
        """A module of these widths with uninitialised tensors, ready for a state_dict."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        kw = {"device": device, "dtype": dtype}
        n = num_heads * head_dim
        self.num_heads, self.head_dim, self.heads_before = num_heads, head_dim, heads_before
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout, self.cosine = attention_dropout, dropout, cosine
        self.qkv = nn.Linear(in_features, 3 * n, bias=qkv_bias, **kw)
        self.proj = nn.Linear(n, out_features, bias=proj_bias, **kw)
        table = math.prod(2 * w - 1 for w in window_size)
        if cosine:
            self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1, **kw))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden, **kw), nn.ReLU(inplace=True),
                                         nn.Linear(cpb_hidden, num_heads, bias=False, **kw))
            self.register_buffer("relative_coords_table",
                                 torch.empty(1, 2 * window_size[0] - 1, 2 * window_size[1] - 1, 2, **kw))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.empty(table, num_heads, **kw))
        area = math.prod(window_size)
        index = (area * area,) if cls.FLAT_INDEX else (area, area)
        self.register_buffer("relative_position_index", torch.empty(index, dtype=torch.long, device=device))
        self.register_buffer("kept_heads", torch.empty(num_heads, dtype=torch.long, device=device), persistent=True)
        return self

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure (simple values only)."""
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "heads_before": self.heads_before,
                "in_features": int(self.qkv.weight.shape[1]), "out_features": int(self.proj.weight.shape[0]),
                "window_size": [int(s) for s in self.window_size], "shift_size": [int(s) for s in self.shift_size],
                "cosine": bool(self.cosine), "qkv_bias": self.qkv.bias is not None,
                "proj_bias": self.proj.bias is not None,
                "cpb_hidden": int(self.cpb_mlp[0].weight.shape[0]) if self.cosine else 0,
                "attention_dropout": float(self.attention_dropout), "dropout": float(self.dropout)}

    def position_bias(self) -> torch.Tensor:
        """``[1, heads, area, area]``: the table's (V1) or the position MLP's (V2, ``16 * sigmoid``) entry
        of every query/key offset in a window."""
        area = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads) if self.cosine \
            else self.relative_position_bias_table
        bias = table[self.relative_position_index].view(area, area, self.num_heads).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                self.position_bias(), self.window_size, self.shift_size, self.num_heads,
                                self.head_dim, logit_scale=self.logit_scale if self.cosine else None,
                                attention_dropout=self.attention_dropout, dropout=self.dropout,
                                training=self.training)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, cosine={self.cosine}")


def window_attention_3d(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias, proj_weight: torch.Tensor, proj_bias,
                        table: torch.Tensor, index: torch.Tensor, window_size, shift_size, num_heads: int,
                        head_dim: int, attention_dropout: float = 0.0, dropout: float = 0.0,
                        training: bool = False) -> torch.Tensor:
    """Video Swin's (shifted) window attention on ``x`` ``[B, T, H, W, C]`` with ``num_heads`` heads of
    width ``head_dim`` (neither read from ``C``); returns ``[B, T, H, W, proj_weight.shape[0]]``.

    Along an axis of at most one window, the window shrinks to the axis and does not shift; the
    volume is padded at the end of each axis to whole windows and rolled back by the shift; positions
    of different regions of a wrapped-around window get -100 added to their scores. The position bias
    of a window of volume ``v`` is ``table[index[:v, :v]]`` per head (``table`` ``[entries, heads]``),
    also for a shrunk window, as torchvision's video Swin reads it.
    """
    B, T, H, W, _ = x.shape
    size = (T, H, W)
    win = [s if s <= w else w for s, w in zip(size, window_size)]
    shift = [0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size)]
    pads = [(-s) % w for s, w in zip(size, win)]
    x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    padded = [s + p for s, p in zip(size, pads)]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    n = [p // w for p, w in zip(padded, win)]
    vol = win[0] * win[1] * win[2]

    def windows(t):  # [B, T', H', W', ...] -> [B * windows, vol, ...]
        rest = t.shape[4:]
        t = t.reshape(t.shape[0], n[0], win[0], n[1], win[1], n[2], win[2], *rest)
        t = t.permute(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(rest)))
        return t.reshape(t.shape[0] * n[0] * n[1] * n[2], vol, *rest)

    x = windows(x)
    width = num_heads * head_dim
    q, k, v = F.linear(x, qkv_weight, qkv_bias).view(x.shape[0], vol, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    scores = scores + table[index[:vol, :vol].flatten()].view(vol, vol, num_heads).permute(2, 0, 1).unsqueeze(0)
    if shifted:
        t, h, w = (_window_regions(p, wi, sh, x.device) for p, wi, sh in zip(padded, win, shift))
        label = windows((t[:, None, None] * 9 + h[None, :, None] * 3 + w[None, None, :])[None, ..., None])[..., 0]
        mask = (label[:, None, :] != label[:, :, None]).to(scores.dtype) * -100.0  # [windows, vol, vol]
        scores = (scores.view(B, -1, num_heads, vol, vol) + mask[None, :, None]).view(-1, num_heads, vol, vol)
    attn = F.dropout(scores.softmax(dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(x.shape[0], vol, width)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    c = out.shape[-1]
    out = out.view(B, n[0], n[1], n[2], win[0], win[1], win[2], c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    out = out.reshape(B, padded[0], padded[1], padded[2], c)
    if shifted:
        out = torch.roll(out, shifts=tuple(shift), dims=(1, 2, 3))
    return out[:, :T, :H, :W, :].contiguous()


class PrunedWindowAttention3d(PrunedWindowAttention):
    """torchvision video Swin's ``ShiftedWindowAttention3d`` with ``num_heads`` heads of width ``head_dim``
    (any count): :class:`PrunedWindowAttention`'s tensors (V1's, ``cosine=False``) over a 3-D window,
    ``relative_position_index`` ``[volume, volume]``, and :func:`window_attention_3d` as its function."""

    FLAT_INDEX = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention_3d(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                   self.relative_position_bias_table, self.relative_position_index,
                                   self.window_size, self.shift_size, self.num_heads, self.head_dim,
                                   attention_dropout=self.attention_dropout, dropout=self.dropout,
                                   training=self.training)


# ---------------------------------------------------------------------------------------------
# MaxViT's relative-position attention (torchvision) with any head count
# ---------------------------------------------------------------------------------------------


class PrunedRelativeAttention(nn.Module):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` with ``n_heads`` heads of width
    ``head_dim`` (any count): the stock module writes its attention output back at its input width,
    which holds only while every head is there.

    Input ``[B, G, P, D]`` (G windows or grid cells of P positions); the packed projection ``to_qkv``
    holds q, k and v one after the other, each ``n_heads * head_dim`` wide; keys are scaled by
    ``scale_factor`` (the stock ``D ** -0.5`` of the original width), the per-head bias table is
    gathered by ``relative_position_index``, and ``merge`` reads the heads' outputs. Parameter names
    are the stock ones.
    """

    def __init__(self, src: nn.Module, n_heads: int, head_dim: int, kept_heads: torch.Tensor, heads_before: int):
        super().__init__()
        self.n_heads, self.head_dim, self.heads_before = n_heads, head_dim, heads_before
        self.size, self.max_seq_len, self.scale_factor = int(src.size), int(src.max_seq_len), float(src.scale_factor)
        self.training = src.training
        self.to_qkv, self.merge = src.to_qkv, src.merge
        self.relative_position_bias_table = src.relative_position_bias_table
        self.register_buffer("relative_position_index", src.relative_position_index)
        self.register_buffer("kept_heads", kept_heads.clone(), persistent=True)

    @classmethod
    def empty(cls, *, n_heads: int, head_dim: int, heads_before: int, in_features: int, out_features: int, size: int,
              max_seq_len: int, scale_factor: float, device=None, dtype=None) -> "PrunedRelativeAttention":
        """A module of these widths with uninitialised tensors, ready for a state_dict."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        kw = {"device": device, "dtype": dtype}
        n = n_heads * head_dim
        self.n_heads, self.head_dim, self.heads_before = n_heads, head_dim, heads_before
        self.size, self.max_seq_len, self.scale_factor = size, max_seq_len, scale_factor
        self.to_qkv = nn.Linear(in_features, 3 * n, **kw)
        self.merge = nn.Linear(n, out_features, **kw)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * size - 1) ** 2, n_heads, **kw))
        self.register_buffer("relative_position_index", torch.empty(size * size, size * size, dtype=torch.long,
                                                                    device=device))
        self.register_buffer("kept_heads", torch.empty(n_heads, dtype=torch.long, device=device), persistent=True)
        return self

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure (simple values only)."""
        return {"n_heads": self.n_heads, "head_dim": self.head_dim, "heads_before": self.heads_before,
                "in_features": int(self.to_qkv.weight.shape[1]), "out_features": int(self.merge.weight.shape[0]),
                "size": self.size, "max_seq_len": self.max_seq_len, "scale_factor": self.scale_factor}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, G, P, _ = x.shape
        H, DH = self.n_heads, self.head_dim
        q, k, v = self.to_qkv(x).view(B, G, P, 3, H, DH).permute(3, 0, 1, 4, 2, 5)  # each [B, G, H, P, DH]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.max_seq_len, self.max_seq_len, H).permute(2, 0, 1).unsqueeze(0)
        attn = (q @ (k * self.scale_factor).transpose(-2, -1) + bias).softmax(dim=-1)
        return self.merge((attn @ v).permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, max_seq_len={self.max_seq_len}"


# ---------------------------------------------------------------------------------------------
# Attention modules that hold their projections' weights themselves
# ---------------------------------------------------------------------------------------------

# the stock module and its pruned form read ``in_proj_weight`` (or ``q/k/v_proj_weight``) and their
# ``out_proj``'s weight inside their own forward: the Linear ``out_proj`` is never called
ATTENTION_MODULES = (nn.MultiheadAttention, PrunedMultiheadAttention)
IN_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def attention_reader(root: nn.Module, path: str) -> nn.Module | None:
    """The attention module that reads the weights of the module at ``path`` itself (that module, or
    the one whose ``out_proj`` it is), or None."""
    mod = root.get_submodule(path) if path else root
    if isinstance(mod, ATTENTION_MODULES):
        return mod
    parent, _, child = path.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    return holder if child == "out_proj" and isinstance(holder, ATTENTION_MODULES) else None


def in_projections(m: nn.Module) -> list:
    """``[(attribute, tensor)]``: the input projection weights an attention module holds (packed
    ``in_proj_weight``, or the three separate ones)."""
    return [(a, getattr(m, a)) for a in IN_PROJECTIONS if isinstance(getattr(m, a, None), torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# Recurrent layers whose layers and directions keep different numbers of hidden units
# ---------------------------------------------------------------------------------------------

RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_slot_suffix(layer: int, reverse: bool) -> str:
    """``l{layer}`` or ``l{layer}_reverse``: the suffix of one layer and direction's tensors (stock names)."""
    return f"l{layer}{'_reverse' if reverse else ''}"


def rnn_slots(num_layers: int, bidirectional: bool) -> list:
    """``[(layer, reverse)]`` in the order of ``h_n``'s first axis (layer-major, forward first)."""
    return [(k, bool(d)) for k in range(num_layers) for d in range(2 if bidirectional else 1)]


def refresh_rnn_weights(root: nn.Module) -> None:
    """Point every stock recurrent layer's ``_flat_weights`` (what its forward reads) at its current
    parameters.

    # NB: nn.RNNBase keeps its weights in a list beside ``_parameters``; a tensor written into
    # ``_parameters`` directly (the rewrite's slicing, deepcopy with a memo, ``otofx.load``) leaves that
    # list pointing at the old (user's, or meta) tensors
    """
    for m in root.modules():
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()


class PrunedRNN(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` whose layers and directions have their own hidden sizes.

    Same call and results as the stock module: ``forward(input, hx=None)`` returns ``(output, (h_n, c_n))``
    (LSTM) or ``(output, h_n)``, batch-first or not, batched or not. Layer ``k``, direction ``d`` has
    ``hidden_sizes[slot]`` units (slot ``k * dirs + d``) whose original indices are the buffer
    ``units_l{k}[_reverse]``; ``output``'s features are each direction's units of the last layer, side
    by side. The state (``h0``/``c0`` read, ``h_n``/``c_n`` written) has ``state_size`` entries whose
    original indices are the buffer ``state_index``: a slot's units sit at their own indices there
    (positions never written are zero, as the pruned units were).
    """

    def __init__(self, mode: str, input_size: int, hidden_sizes, num_layers: int, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, state_size: int = 0,
                 device=None, dtype=None):
        super().__init__()
        if mode not in RNN_GATES:
            raise ValueError(f"mode must be one of {sorted(RNN_GATES)}, got {mode!r}")
        slots = rnn_slots(num_layers, bidirectional)
        if len(hidden_sizes) != len(slots):
            raise ValueError(f"{len(slots)} layers x directions need as many hidden sizes, got {list(hidden_sizes)}")
        self.mode, self.input_size, self.num_layers = mode, int(input_size), int(num_layers)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.state_size = bool(bidirectional), int(state_size)
        kw = {"device": device, "dtype": dtype}
        gates = RNN_GATES[mode]
        dirs = 2 if bidirectional else 1
        for s, (k, rev) in enumerate(slots):
            h = self.hidden_sizes[s]
            width = self.input_size if k == 0 else sum(self.hidden_sizes[k * dirs - dirs:k * dirs])
            sfx = rnn_slot_suffix(k, rev)
            setattr(self, f"weight_ih_{sfx}", nn.Parameter(torch.empty(gates * h, width, **kw)))
            setattr(self, f"weight_hh_{sfx}", nn.Parameter(torch.empty(gates * h, h, **kw)))
            if bias:
                setattr(self, f"bias_ih_{sfx}", nn.Parameter(torch.empty(gates * h, **kw)))
                setattr(self, f"bias_hh_{sfx}", nn.Parameter(torch.empty(gates * h, **kw)))
            self.register_buffer(f"units_{sfx}", torch.empty(h, dtype=torch.long, device=device))
        self.register_buffer("state_index", torch.empty(self.state_size, dtype=torch.long, device=device))

    @classmethod
    def from_module(cls, src: nn.RNNBase, units: list) -> "PrunedRNN":
        """``src`` (its tensors already narrowed to the units kept) as a PrunedRNN; ``units[slot]`` are
        the original indices of each slot's units. Its tensors are taken, not copied."""
        self = cls.empty(mode=src.mode, input_size=int(src.weight_ih_l0.shape[1]),
                         hidden_sizes=[len(u) for u in units], num_layers=src.num_layers, bias=src.bias,
                         batch_first=src.batch_first, dropout=src.dropout, bidirectional=src.bidirectional,
                         state_size=src.hidden_size, device="meta")
        for name in src._flat_weights_names:
            self._parameters[name] = src._parameters[name]
        dev = src.weight_ih_l0.device
        for (k, rev), u in zip(rnn_slots(src.num_layers, src.bidirectional), units):
            self._buffers[f"units_{rnn_slot_suffix(k, rev)}"] = torch.as_tensor(u, dtype=torch.long, device=dev)
        self._buffers["state_index"] = torch.arange(src.hidden_size, device=dev)
        self.train(src.training)
        return self

    @classmethod
    def empty(cls, *, mode: str, input_size: int, hidden_sizes, num_layers: int, bias: bool, batch_first: bool,
              dropout: float, bidirectional: bool, state_size: int, device=None, dtype=None) -> "PrunedRNN":
        """Uninitialised, of the given structure (``otofx.load`` fills the tensors)."""
        return cls(mode, input_size, hidden_sizes, num_layers, bias, batch_first, dropout, bidirectional, state_size,
                   device=device, dtype=dtype)

    def init_kwargs(self) -> dict:
        """The arguments of :meth:`empty` that rebuild this module's structure."""
        return {"mode": self.mode, "input_size": self.input_size, "hidden_sizes": list(self.hidden_sizes),
                "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first,
                "dropout": self.dropout, "bidirectional": self.bidirectional, "state_size": self.state_size}

    def resync(self) -> None:
        """Sizes from the tensors (after the rewrite sliced them)."""
        self.input_size = int(self.weight_ih_l0.shape[1])
        self.hidden_sizes = [int(getattr(self, f"units_{rnn_slot_suffix(k, rev)}").shape[0])
                             for k, rev in rnn_slots(self.num_layers, self.bidirectional)]
        self.state_size = int(self.state_index.shape[0])

    def flatten_parameters(self) -> None:
        """Nothing to do: the stock layer's call (model code calls it before each forward) packs one
        cuDNN buffer, and each layer and direction here runs its own kernel on its own tensors."""

    def _weights(self, sfx: str) -> list:
        names = [f"weight_ih_{sfx}", f"weight_hh_{sfx}"] + ([f"bias_ih_{sfx}", f"bias_hh_{sfx}"] if self.bias else [])
        return [self._parameters[n] for n in names]

    def _run(self, x: torch.Tensor, state, weights: list):
        """One layer and direction, time-major ``x``: (output, final state tuple)."""
        if self.mode == "LSTM":
            out, h, c = torch._VF.lstm(x, state, weights, self.bias, 1, 0.0, self.training, False, False)
            return out, (h, c)
        fn = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[self.mode]
        out, h = fn(x, state[0], weights, self.bias, 1, 0.0, self.training, False, False)
        return out, (h,)

    def forward(self, input: torch.Tensor, hx=None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("PrunedRNN takes a padded tensor, not a PackedSequence (a packed input was never "
                            "analysed: the stock layer is kept for it)")
        batched = input.dim() == 3
        x = (input.transpose(0, 1) if self.batch_first else input) if batched else input.unsqueeze(1)
        states = None
        if hx is not None:
            states = tuple(hx) if self.mode == "LSTM" else (hx,)
            states = tuple(s if batched else s.unsqueeze(1) for s in states)
        B = x.shape[1]
        dirs = 2 if self.bidirectional else 1
        finals = []
        for k in range(self.num_layers):
            outs = []
            for d in range(dirs):
                s = k * dirs + d
                sfx = rnn_slot_suffix(k, bool(d))
                pos = torch.searchsorted(self.state_index, self._buffers[f"units_{sfx}"])
                if states is None:
                    zero = x.new_zeros(1, B, self.hidden_sizes[s])
                    state = (zero, zero) if self.mode == "LSTM" else (zero,)
                else:
                    state = tuple(t[s:s + 1].index_select(2, pos) for t in states)
                seq = x.flip(0) if d else x
                out, fin = self._run(seq, list(state) if self.mode == "LSTM" else state, self._weights(sfx))
                outs.append(out.flip(0) if d else out)
                finals.append((pos, fin))
            x = torch.cat(outs, 2) if dirs == 2 else outs[0]
            if self.dropout and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        n_state = 2 if self.mode == "LSTM" else 1
        full = []
        for i in range(n_state):
            rows = [x.new_zeros(B, self.state_size).index_copy(1, pos, fin[i][0]) for pos, fin in finals]
            full.append(torch.stack(rows) if batched else torch.stack(rows).squeeze(1))
        out = (x.transpose(0, 1) if self.batch_first else x) if batched else x.squeeze(1)
        return out, (tuple(full) if self.mode == "LSTM" else full[0])

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, hidden_sizes={self.hidden_sizes}, num_layers={self.num_layers}, "
                f"state_size={self.state_size}, bias={self.bias}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}")


def resize_stock_cell(m: nn.RNNCellBase) -> None:
    """A stock LSTMCell / GRUCell / RNNCell whose weights were sliced: input_size and hidden_size read off them."""
    m.input_size, m.hidden_size = int(m.weight_ih.shape[1]), int(m.weight_hh.shape[1])


def resize_stock_rnn(m: nn.RNNBase, units: list):
    """A stock recurrent layer whose tensors were narrowed to ``units[slot]`` (original indices kept per
    layer and direction): re-synced in place when every slot keeps as many units (returns None), else
    a :class:`PrunedRNN` holding its tensors."""
    m._init_flat_weights()
    sizes = {len(u) for u in units}
    if len(sizes) > 1:
        if m.proj_size:
            raise ValueError("a projected LSTM keeps one hidden size for every layer and direction")
        return PrunedRNN.from_module(m, units)
    m.hidden_size, m.input_size = sizes.pop(), int(m.weight_ih_l0.shape[1])
    if m.proj_size:
        m.proj_size = int(m.weight_hr_l0.shape[0])
    return None
