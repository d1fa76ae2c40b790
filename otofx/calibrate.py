"""BatchNorm statistics re-estimated on data: one helper for every method that changes weights.

SCOP re-estimates them after removing rows with non-zero weights; SLB's state BN does it with the
discrete (argmax) weights after each epoch. Both run the model with only its BatchNorm modules in
training mode (dropout and every other module in eval mode), reset the running statistics, and take
their cumulative average over the batches (``momentum=None``).

Internals:
    * Loader batches are ``x``, ``(x, y, ...)`` (the first element is the input) or a dict of
      keyword inputs (:func:`batch_inputs`).
    * # NB: modes are set through the ``training`` attribute, not ``.train()``/``.eval()``: a
      ``torch.export`` GraphModule raises on ``eval()``. Modes and momenta are restored.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn

from otofx.errors import InputError
from otofx.verify import fresh_inputs

log = logging.getLogger("otofx")


def batch_inputs(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a loader batch: ``x``, the first element of ``(x, y, ...)``, or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise InputError(f"a loader batch must be a tensor, (inputs, targets, ...) or a dict of inputs; "
                     f"got {type(batch).__name__}")


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable, batches: int | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``loader`` (the first
    ``batches`` batches, or all); returns the number of batches used (0 without BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        log.info("otofx: %s has no BatchNorm layer with running statistics; nothing to re-estimate", type(model).__name__)
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    used = 0
    try:
        for m, _ in flags:
            m.training = False
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.training = True
        for batch in loader:
            if batches is not None and used >= batches:
                break
            args, kwargs = fresh_inputs(*batch_inputs(batch))
            model(*args, **kwargs)
            used += 1
    finally:
        for m, f in flags:
            m.training = f
        for m, mom in momenta:
            m.momentum = mom
    if used == 0:
        raise InputError("the loader yielded no batch: BatchNorm statistics cannot be re-estimated")
    log.info("otofx: BatchNorm statistics of %d layers re-estimated on %d batches", len(bns), used)
    return used


__all__ = ["reestimate_bn", "batch_inputs"]
