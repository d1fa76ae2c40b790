"""A plain fine-tuning loop for a pruned model: ``finetune(model, loader, epochs, lr)``.

SGD with Nesterov momentum and weight decay (SCOP's fine-tuning recipe: nesterov 0.9, wd 1e-4,
cosine decay of lr to 0 over the run), cross-entropy by default; ``model`` is trained in place and
its training flag restored. Returns the mean loss of every epoch; progress goes to the ``otofx`` log.

Internals:
    * The cosine schedule is per optimizer step, over ``epochs * len(loader)`` steps when the loader
      has a length (else per epoch).
"""
from __future__ import annotations

import logging
import math
import numbers
import time

import torch
import torch.nn.functional as F

from otofx.errors import InputError

from .select import _split_batch

log = logging.getLogger("otofx")


def finetune(model: torch.nn.Module, loader, epochs: int = 10, lr: float = 0.05, *, momentum: float = 0.9,
             weight_decay: float = 1e-4, nesterov: bool = True, loss_fn=None) -> list:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise InputError(f"finetune: epochs={epochs!r} must be an int >= 1")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"finetune: lr={lr!r} must be a finite number > 0")
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    try:
        per_epoch = len(loader)
    except TypeError:
        per_epoch = None
    total = epochs * per_epoch if per_epoch else epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    flag = model.training
    history = []
    try:
        model.train()
        for epoch in range(epochs):
            t0, acc, seen = time.perf_counter(), 0.0, 0
            for batch in loader:
                x, y = _split_batch(batch)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_epoch:
                    sched.step()
                acc += float(loss.detach()) * x.shape[0]
                seen += x.shape[0]
            if not per_epoch:
                sched.step()
            history.append(acc / max(seen, 1))
            log.info("finetune epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, epochs, history[-1], time.perf_counter() - t0)
    finally:
        model.train(flag)
    return history


__all__ = ["finetune"]
