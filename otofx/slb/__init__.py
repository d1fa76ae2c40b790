"""SLB: Searching for Low-Bit Weights (Yang et al., NeurIPS 2020) on otofx's graph IR.

    q = otofx.slb.quantize(model, example_inputs, bits=2)      # new model: logits over the grid
                                                               # (form="module": the model's own class)
    sched = otofx.slb.Schedule(q, epochs=E, calibration_loader=train_loader)
    for epoch in range(E):
        ...train q with any optimizer...
        sched.step()                                            # temperature, hard phase, state BN
    frozen = otofx.slb.freeze(q)                                # plain weights, <= 2**b values a layer
    small = otofx.slb.to_torchao(frozen)                        # torchao intx weight tensors
    print(otofx.slb.size_report(frozen).table())

The rewrite itself is the pass ``otofx.passes.slb.SLBPass`` (``slb_parametrize`` on a GraphModule);
``otofx.slb.ste`` is the straight-through baseline at the same bits.

Internals:
    * ``modules``: the parametrisation (:class:`SLBWeight`), the grid, activation fake quantisers;
      ``core``: quantize, Schedule, calibrate_bn, freeze; ``export``: torchao and the size report;
      ``ste``: the baseline. ``modules`` is imported first: the pass imports it.
"""
from otofx.slb.modules import ActFakeQuant, SLBWeight, grid  # noqa: I001  (first: otofx.passes.slb reads it)
from otofx.slb.core import (REFERENCE_T_END, FrozenLayer, Schedule, SLBLayer, calibrate_bn, freeze, quantize,
                             slb_layers, weights)
from otofx.slb.export import LayerSize, SizeReport, size_report, to_torchao

__all__ = ["quantize", "Schedule", "REFERENCE_T_END", "freeze", "to_torchao", "calibrate_bn", "size_report",
           "SizeReport", "LayerSize", "SLBWeight", "ActFakeQuant", "grid", "slb_layers", "SLBLayer", "FrozenLayer", "weights"]
