"""Hand-off of frozen SLB weights to torchao, and the size report.

``to_torchao(frozen)`` replaces every frozen weight of a model from :func:`otofx.slb.freeze` by a
torchao ``IntxUnpackedToInt8Tensor`` (torchao >= 0.18, ``pip install -e ".[quant]"``), Conv and
Linear alike; torchao's tensor implements ``linear`` and ``conv2d`` by dequantising, and is what
``torch.export``/ExecuTorch lower to low-bit kernels. ``size_report(model)`` counts the bits.

SLB's grid ``s * linspace(-1, 1, K)`` (``K = 2**b``) is affine in the grid index ``i``:
``s * (2 i / (K - 1) - 1) = scale * (q - zero_point)`` with ``q = i - K/2`` (in ``int{b}``'s range
``[-K/2, K/2 - 1]``), ``scale = 2 s / (K - 1)`` per output channel and ``zero_point = -1/2``. One
bit fits ``torch.int1`` this way (``q`` in ``{-1, 0}``).

Internals:
    * The tensor is built with ``IntxUnpackedToInt8Tensor(qdata, scale, zero_point, ...)`` from the
      grid indices, not with ``from_hp(..., custom_scale=, custom_zero_point=)``: ``from_hp``
      quantises with ``round(w / scale) + zero_point``, which puts half-integer grid points on the
      wrong integer when the zero point is -1/2 (checked on torchao 0.18.0). The indices come from
      the frozen weights and are checked to reproduce them (dequantisation error aside).
    * "Packed" bytes are ``ceil(n * b / 8)`` per layer plus one float32 scale per output channel;
      torchao's unpacked tensor holds one int8 per weight in memory (and a scale and zero point per
      channel): the report gives both, against float32.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from otofx.errors import InputError, OTOError

log = logging.getLogger("otofx")


def _frozen(model: nn.Module, what: str) -> dict:
    info = getattr(model, "otofx_slb", None)
    if not isinstance(info, dict) or not info:
        raise InputError(f"{what} takes the model returned by otofx.slb.freeze(q) (it records the frozen layers); "
                         f"{type(model).__name__} has none")
    return info


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def grid_indices(w: torch.Tensor, bits: int, scale: torch.Tensor | None) -> torch.Tensor:
    """The grid index of every weight of a frozen layer (``w = s * linspace(-1, 1, 2**b)[i]``)."""
    k = 2 ** bits
    s = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if scale is None else scale.to(w.dtype)
    sv = s.reshape(-1, *([1] * (w.dim() - 1)))
    safe = torch.where(sv == 0, torch.ones_like(sv), sv)
    return torch.round((w / safe + 1) * (k - 1) / 2).clamp(0, k - 1).long()


def to_torchao(frozen: nn.Module) -> nn.Module:
    """A copy of ``frozen`` whose SLB weights are torchao ``IntxUnpackedToInt8Tensor`` parameters."""
    info = _frozen(frozen, "otofx.slb.to_torchao")
    try:
        from torchao.quantization import IntxUnpackedToInt8Tensor
    except ImportError as e:
        raise OTOError('otofx.slb.to_torchao needs torchao (>= 0.18): pip install -e ".[quant]"') from e
    from otofx.slb.modules import grid

    out = copy.deepcopy(frozen)
    for name, layer in info.items():
        module, attr = _owner(out, name)
        w = getattr(module, attr).detach()
        k = 2 ** layer.bits
        idx = grid_indices(w, layer.bits, layer.scale)
        s = torch.ones(w.shape[0], dtype=w.dtype) if layer.scale is None else layer.scale.to(w.dtype)
        shape = (-1, *([1] * (w.dim() - 1)))
        back = grid(layer.bits, w.dtype)[idx] * s.reshape(shape)
        if not torch.allclose(back, w, rtol=0, atol=1e-6 * max(1.0, float(s.abs().max()))):
            raise InputError(f"weight '{name}' is not on its {layer.bits}-bit SLB grid: was it changed after freeze()?")
        t = IntxUnpackedToInt8Tensor(
            qdata=(idx - k // 2).to(torch.int8), scale=(2 * s / (k - 1)).reshape(shape),
            zero_point=torch.full((w.shape[0], *([1] * (w.dim() - 1))), -0.5, dtype=w.dtype),
            target_dtype=getattr(torch, f"int{layer.bits}"), block_size=(1, *w.shape[1:]), dtype=w.dtype,
            activation_quantization=None)
        setattr(module, attr, nn.Parameter(t, requires_grad=False))
    out.otofx_slb = dict(info)  # NB: GraphModule's deepcopy drops plain attributes
    log.info("otofx.slb: %d layers handed to torchao IntxUnpackedToInt8Tensor", len(info))
    return out


@dataclass(frozen=True)
class LayerSize:
    name: str
    numel: int
    bits: int  # 32 for float weights
    distinct: int  # distinct values (per output channel when the layer has a scale: the most of any channel)
    packed_bytes: int  # ceil(numel * bits / 8) + 4 bytes per scale


@dataclass(frozen=True)
class SizeReport:
    """Bits per weight and bytes of a frozen model against float32 (all parameters and buffers)."""

    layers: tuple  # LayerSize per frozen layer
    quantised_weights: int
    other_elements: int  # every other parameter and buffer element, counted as float32
    float32_bytes: int  # the whole model in float32
    packed_bytes: int  # frozen layers packed at b bits (+ scales), the rest float32
    int8_bytes: int  # frozen layers as torchao's unpacked int8 (+ scale and zero point), the rest float32

    @property
    def bits_per_weight(self) -> float:
        """Average bits of the frozen layers' weights (scales included)."""
        bits = sum(8 * ls.packed_bytes for ls in self.layers)
        return bits / max(self.quantised_weights, 1)

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.float32_bytes

    def table(self) -> str:
        from tabulate import tabulate

        rows = [[ls.name, ls.numel, ls.bits, ls.distinct, ls.packed_bytes, 4 * ls.numel] for ls in self.layers]
        rows.append(["model", self.quantised_weights + self.other_elements, "",
                     "", self.packed_bytes, self.float32_bytes])
        text = tabulate(rows, headers=["weight", "elements", "bits", "max distinct", "bytes packed", "bytes float32"],
                        tablefmt="github")
        return (f"{text}\nbits per quantised weight {self.bits_per_weight:.3f}; model {self.packed_bytes:,} bytes packed, "
                f"{self.int8_bytes:,} as torchao int8 (unpacked), {self.float32_bytes:,} in float32 "
                f"(x{self.ratio:.3f} packed, x{self.int8_bytes / self.float32_bytes:.3f} int8)")


def size_report(frozen: nn.Module) -> SizeReport:
    """The :class:`SizeReport` of a model from :func:`otofx.slb.freeze`."""
    info = _frozen(frozen, "otofx.slb.size_report")
    layers, qnames = [], set()
    for name, layer in info.items():
        module, attr = _owner(frozen, name)
        w = getattr(module, attr).detach()
        if type(w) is not torch.Tensor and hasattr(w, "dequantize"):  # after to_torchao
            w = w.dequantize()
        rows = w.reshape(w.shape[0], -1)
        distinct = max(int(torch.unique(r).numel()) for r in rows) if layer.scale is not None else int(torch.unique(w).numel())
        scales = 4 * w.shape[0] if layer.scale is not None else 0
        layers.append(LayerSize(name, w.numel(), layer.bits, distinct, math.ceil(w.numel() * layer.bits / 8) + scales))
        qnames.add(name)
    seen, other = set(), 0
    for name, t in list(frozen.named_parameters()) + list(frozen.named_buffers()):
        if name in qnames or id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel()
    nq = sum(ls.numel for ls in layers)
    fp32 = 4 * (nq + other)
    int8 = sum(ls.numel + 8 * _channels(frozen, ls.name) for ls in layers)  # int8 + f32 scale and zero point
    return SizeReport(tuple(layers), nq, other, fp32, sum(ls.packed_bytes for ls in layers) + 4 * other, int8 + 4 * other)


def _channels(model: nn.Module, name: str) -> int:
    module, attr = _owner(model, name)
    return getattr(module, attr).shape[0]


__all__ = ["to_torchao", "size_report", "SizeReport", "LayerSize", "grid_indices"]
