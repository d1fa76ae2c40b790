"""The straight-through-estimator (STE) baseline at SLB's bits, for ``bench/slb.py``.

``ste_quantize(model, example_inputs, bits, layers=None)`` selects layers exactly as
``otofx.slb.quantize`` does and fake-quantises their weights in the forward pass, with a latent
float weight trained through the rounding by the straight-through estimator:

* Linear layers at ``bits >= 2``, when torchao is installed and the layer is a module call: torchao's
  QAT fake quantiser (``QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int{b},
  granularity="per_channel", is_symmetric=True), step="prepare")``: symmetric per-channel int{b},
  values ``scale * {-2**(b-1) ... 2**(b-1) - 1}``);
* everything else (Conv, one bit, no torchao): our :class:`STEWeight` parametrisation on SLB's grid,
  ``s * linspace(-1, 1, 2**b)[round(...)]`` with ``s`` the per-output-channel ``max |W|``
  (``mean |W|`` at one bit, as in XNOR-Net, so the result is ``s * sign(W)``); gradients pass the
  rounding unchanged and are cut where ``|W| > s`` (BinaryConnect's clipped identity).

Internals:
    * torchao's ``quantize_`` swaps ``nn.Linear`` modules of the (already copied) GraphModule for
      ``FakeQuantizedLinear``; the graph's ``call_module`` nodes call the new modules.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from otofx.slb.modules import _channel_view, channel_dims, grid, round_ste

log = logging.getLogger("otofx")


class STEWeight(nn.Module):
    """Fake quantisation of a latent float weight on SLB's grid, straight-through."""

    def __init__(self, bits: int, out_dim: int = 0, batch: bool = False):
        super().__init__()
        self.bits, self.out_dim = bits, out_dim  # out_dim: the output channels' dim (1 for [in, out])
        self.batch = batch  # fused experts [E, ., .]: one scale per expert and channel
        self.register_buffer("values", grid(bits))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        k = 2 ** self.bits
        keep = channel_dims(self.out_dim, self.batch)
        dims = tuple(d for d in range(w.dim()) if d not in keep)
        a = w.abs()
        # NB: the floor in the weight's dtype (1e-8 is 0 in fp16: an all-zero channel would give 0/0)
        s = (a.mean(dim=dims) if self.bits == 1 else a.amax(dim=dims)).clamp_min(max(1e-8, torch.finfo(w.dtype).tiny))
        sv = _channel_view(s, w.dim(), self.out_dim)
        u = torch.clamp(w / sv, -1.0, 1.0)
        q = round_ste((u + 1) * (k - 1) / 2)
        return sv * (2 * q / (k - 1) - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def ste_quantize(model: nn.Module, example_inputs, bits: int, layers=None, *, use_torchao: bool = True,
                 frontend: str = "auto") -> torch.fx.GraphModule:
    """A new GraphModule with STE fake-quantised weights on the layers ``otofx.slb.quantize`` would pick."""
    from otofx.capture import capture
    from otofx.passes.slb import parametrize_layers, select_layers

    grid(bits)
    gm = capture(model, example_inputs, frontend).gm
    chosen = select_layers(gm, layers)
    ao = set()
    if use_torchao and bits >= 2:
        try:
            from torchao.quantization import quantize_
            from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
        except ImportError:
            log.info("otofx.slb.ste: torchao not installed; our STE on every layer")
        else:
            # NB: only Linear modules the graph calls: an attention module reads its out_proj's weight
            # itself, so torchao's fake-quantising module would never run
            ao = {c.owner for c in chosen if c.kind is nn.Linear and isinstance(gm.get_submodule(c.owner), nn.Linear)
                  and all(n.op == "call_module" and n.target == c.owner for n in c.nodes)}
    ours = {c.owner for c in chosen} - ao
    if ours:
        def make(layer, w):  # NB: on the weight's device and in its dtype
            return STEWeight(bits, layer.out_dim, layer.batch).to(device=w.device, dtype=w.dtype)

        new, _ = parametrize_layers(gm, lambda name, m: name in ours, make)
    else:
        new = copy.deepcopy(gm)
    if ao:
        cfg = QATConfig(weight_config=IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), granularity="per_channel",
                                                             is_symmetric=True), step="prepare")
        quantize_(new, cfg, filter_fn=lambda m, fqn: fqn in ao)
    for m in new.modules():  # NB: not new.train(): a torch.export GraphModule raises on train()/eval()
        m.training = model.training
    log.info("otofx.slb.ste: %d-bit STE on %s (torchao) and %s (ours)", bits, sorted(ao), sorted(ours))
    return new


__all__ = ["STEWeight", "ste_quantize"]
