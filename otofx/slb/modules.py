"""SLB's building blocks: the weight parametrisation, the value grid, activation fake quantisers.

:class:`SLBWeight` is a ``torch.nn.utils.parametrize`` parametrisation: registered on a Conv or
Linear weight (``unsafe=True``, since it changes the stored tensor's shape), its ``original`` is the
tensor of logits ``A`` of shape ``[*weight.shape, 2**bits]`` and reading ``module.weight`` gives

* in training mode: the soft weights ``softmax(A * T, -1) @ v`` (convex combinations of the grid
  values ``v``; ``T`` is SLB's inverse temperature), whose gradient reaches ``A`` exactly (no
  straight-through estimator);
* in eval mode, or in training once :attr:`SLBWeight.hard` is set (SLB's last phase): the grid value
  of each weight's largest logit, ``v[argmax A]``.

The grid is SLB's (Yang et al., NeurIPS 2020): ``{-1, +1}`` for one bit, ``linspace(-1, 1, 2**b)``
for ``b >= 2``. SLB itself has no scale (the BatchNorm after each layer absorbs it).

Our additions, not in the paper:

* ``scale=True``: a learned per-output-channel scale ``s`` (a parameter of the parametrisation),
  ``weight = s[o] * v[...]`` along ``out_dim`` (0, or 1 for a weight stored ``[in, out]``; for the
  fused experts of an MoE layer, ``batch=True``, a weight ``[E, ., .]`` with its output channels on
  dim 1 or 2 and one scale per expert and channel, ``s[e, o]``);
  ``otofx.slb.quantize`` switches it on for layers whose output feeds no normalisation layer, where
  no BatchNorm would absorb the grid's fixed range.
* ``warm_start=tau0``: logits initialised from the float weight ``W`` as
  ``A_j = -(W / s - v_j)**2 / tau0`` with ``s`` the per-output-channel max ``|W|`` (so the first
  argmax is the nearest grid value); the default is SLB's random start (He-normal, fan_out).

:class:`ActFakeQuant` is an optional activation quantiser (PACT's learned clip, or min/max EMA),
8 bits by default, with straight-through rounding, as in the reference runs.

Internals:
    * ``right_inverse`` maps a float weight to logits; parametrize calls it on registration and on
      ``module.weight = tensor``. It also sets ``scale`` from the weight (when warm starting).
    * ``temperature`` and ``hard`` are buffers, so ``state_dict`` carries the schedule's state.
    * ``# NB:`` the argmax of equal logits picks the lowest grid index (torch's ``argmax``), in
      training-hard and eval mode alike, so :func:`otofx.slb.freeze` reproduces eval mode exactly.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from otofx.errors import InputError

MAX_BITS = 8


def grid(bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SLB's value set: ``[-1, 1]`` for one bit, ``linspace(-1, 1, 2**bits)`` above."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise InputError(f"bits={bits!r}: SLB takes an integer number of weight bits from 1 to {MAX_BITS}")
    return torch.linspace(-1.0, 1.0, 2 ** bits, dtype=dtype)


def check_warm_start(warm_start) -> None:
    """Raise :class:`InputError` unless ``warm_start`` is None or a positive finite number (tau0)."""
    if warm_start is None:
        return
    if isinstance(warm_start, bool) or not isinstance(warm_start, numbers.Real) or not 0 < warm_start < math.inf:
        raise InputError(f"warm_start={warm_start!r}: give a positive tau0 (e.g. 0.1) or None for SLB's random start")


def _channel_view(t: torch.Tensor, ndim: int, dim: int = 0) -> torch.Tensor:
    """``t`` ([O], or [E, O] for fused experts) shaped to broadcast along dim ``dim`` (and dim 0, the
    experts) of an ``ndim``-d weight."""
    shape = [1] * ndim
    if t.dim() == 2:
        shape[0] = t.shape[0]
        shape[dim] = t.shape[1]
    else:
        shape[dim] = -1
    return t.reshape(shape)


def channel_dims(out_dim: int, batch: bool) -> tuple:
    """The dims a per-channel statistic keeps: the output channels, and the experts for ``batch``."""
    return (0, out_dim) if batch else (out_dim,)


def check_channels(shape: tuple, out_dim: int, batch: bool) -> None:
    if batch:
        if len(shape) != 3 or out_dim not in (1, 2):
            raise InputError(f"batch=True (fused experts) takes a weight [E, out, in] or [E, in, out] (out_dim 1 or 2), "
                             f"got shape {tuple(shape)} with out_dim={out_dim!r}")
    elif out_dim not in (0, 1) or out_dim >= len(shape):
        raise InputError(f"out_dim={out_dim!r}: the output channels of a weight of shape {tuple(shape)} are dim 0, "
                         "or dim 1 for a 2-D weight stored [in, out]")


class SLBWeight(nn.Module):
    """Parametrisation of one weight by logits over SLB's grid (see the module docstring)."""

    def __init__(self, shape, bits: int, *, scale: bool = False, warm_start: float | None = None, out_dim: int = 0,
                 batch: bool = False, plain: bool = True):
        super().__init__()
        self.bits = bits
        self.shape = tuple(shape)
        check_channels(self.shape, out_dim, batch)
        self.out_dim = out_dim  # output channels: dim 0 ([out, in, ...]), or 1 ([in, out]: x @ W)
        self.batch = batch  # fused experts [E, ., .]: dim 0 counts experts, each with its own scales
        self.plain = plain  # read as a Conv/Linear reads it (False: x @ W.T, W @ x, bmm; see to_torchao)
        self.register_buffer("values", grid(bits))
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("hard", torch.tensor(False))
        check_warm_start(warm_start)
        self.warm_start = warm_start
        channels = tuple(self.shape[d] for d in channel_dims(out_dim, batch))
        self.scale = nn.Parameter(torch.ones(channels)) if scale else None
        self.force: str | None = None  # "soft" / "hard" overrides the mode (otofx.slb.weights)
        self.home: str | None = None  # the weight's name when several modules hold it (a tied weight)

    @property
    def levels(self) -> int:
        return self.values.numel()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        soft = self.force == "soft" if self.force is not None else self.training and not bool(self.hard)
        # NB: the weight has the logits' dtype (the model's); ``otofx.slb.quantize`` makes the grid and
        # scale in it too, so the casts are no-ops there (they cover a hand-registered SLBWeight)
        values = self.values.to(logits.dtype)
        if soft:
            w = torch.softmax(logits * self.temperature.to(logits.dtype), dim=-1) @ values
        else:
            w = values[logits.argmax(dim=-1)]
        return self._scaled(w)

    def _scaled(self, w: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return w
        return w * _channel_view(self.scale.to(w.dtype), w.dim(), self.out_dim)

    def discrete(self, logits: torch.Tensor) -> torch.Tensor:
        """The eval-mode weight ``v[argmax A]`` (times the scale), whatever the mode."""
        return self._scaled(self.values.to(logits.dtype)[logits.argmax(dim=-1)])

    def indices(self, logits: torch.Tensor) -> torch.Tensor:
        """The grid index of every weight in eval mode (``argmax`` over the last dim)."""
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Logits for ``weight``: SLB's random start, or the warm start from ``weight``'s values."""
        if tuple(weight.shape) != self.shape:
            raise InputError(f"SLB weight of shape {tuple(weight.shape)} assigned where {self.shape} was registered")
        v = self.values.to(weight.dtype)
        if self.warm_start is None:
            fan_out = self.shape[self.out_dim] * (1 if self.batch else math.prod(self.shape[2:]))
            return torch.randn(*self.shape, v.numel(), dtype=weight.dtype, device=weight.device) * math.sqrt(2.0 / fan_out)
        keep = channel_dims(self.out_dim, self.batch)
        dims = tuple(d for d in range(weight.dim()) if d not in keep)
        s = (weight.abs().amax(dim=dims) if dims else weight.abs()).clamp_min(torch.finfo(weight.dtype).tiny)
        if self.scale is not None:
            self.scale.copy_(s)
        return -((weight / _channel_view(s, weight.dim(), self.out_dim)).unsqueeze(-1) - v) ** 2 / self.warm_start

    def extra_repr(self) -> str:
        extra = f", out_dim={self.out_dim}" if self.out_dim else ""
        extra += ", experts" if self.batch else ""
        return f"bits={self.bits}, levels={self.levels}, scale={self.scale is not None}{extra}"


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


class ActFakeQuant(nn.Module):
    """Uniform fake quantisation of an activation to ``bits`` (optional; off by default).

    ``mode="minmax"``: asymmetric, range from an exponential moving average of the batch min/max
    (updated in training mode only). ``mode="pact"``: PACT, ``clamp(x, 0, alpha)`` with a learned
    clip ``alpha`` (for inputs after a ReLU). Rounding is straight-through in both.
    """

    def __init__(self, bits: int = 8, mode: str = "minmax", momentum: float = 0.1, alpha: float = 6.0):
        super().__init__()
        if mode not in ("minmax", "pact"):
            raise InputError(f"act_quant={mode!r}: choose 'minmax' or 'pact'")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
            raise InputError(f"act_bits={bits!r}: give an integer from 2 to 16")
        self.bits, self.mode, self.momentum = bits, mode, momentum
        if mode == "pact":
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2 ** self.bits - 1
        if self.mode == "pact":
            # PACT: y = clamp(x, 0, alpha) as 0.5 * (|x| - |x - alpha| + alpha); d/dalpha flows
            y = 0.5 * (x.abs() - (x - self.alpha).abs() + self.alpha)
            step = self.alpha / n
            return round_ste(y / step) * step
        lo, hi = self.lo, self.hi
        if self.training or not bool(self.seen):
            with torch.no_grad():
                # NB: in the quantiser's dtype (lerp_ takes one dtype; an fp32 quantiser on a bf16 input)
                lo, hi = x.min().clamp_max(0).to(self.lo.dtype), x.max().clamp_min(0).to(self.hi.dtype)
                if self.training:
                    if bool(self.seen):
                        self.lo.lerp_(lo, self.momentum)
                        self.hi.lerp_(hi, self.momentum)
                    else:
                        self.lo.copy_(lo)
                        self.hi.copy_(hi)
                        self.seen.fill_(True)
                    lo, hi = self.lo, self.hi
                # NB: in eval mode before any training batch, the batch's own range (nothing stored)
        # NB: 1e-8 is 0 in fp16: the floor is at least the dtype's smallest normal number
        step = ((hi - lo) / n).clamp_min(max(1e-8, torch.finfo(hi.dtype).tiny))
        zero = torch.round(-lo / step)
        q = torch.clamp(round_ste(x / step) + zero, 0, n)
        return (q - zero) * step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


__all__ = ["SLBWeight", "ActFakeQuant", "grid", "round_ste", "MAX_BITS", "check_warm_start"]
