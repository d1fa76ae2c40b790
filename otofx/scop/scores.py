"""Per-row scores for :func:`otofx.scop.prune_lowest` (one tensor per group, higher = keep).

* :func:`scop` -- SCOP's knockoff score ``|gamma| (2 beta - 1)`` (:func:`otofx.scop.select.train_betas`).
* :func:`l1` -- the L1 norm of the row's producer filters (Li et al. 2017): every slice of a conv /
  linear weight whose dim 0 the row owns; rows with no such slice use all their slices.
* :func:`bn_gamma` -- the mean |gamma| of the row's normalisation layers (network slimming); 1 for
  rows without one (ties then fall to row order).
* :func:`random` -- uniform noise from a seeded generator.

Internals:
    * Scores read the model's current parameters (``oto.model``), in float64, and are returned as
      float32 CPU tensors of length ``zig.rows``.
"""
from __future__ import annotations

import torch

from .select import row_gammas, train_betas


def l1(oto) -> tuple:
    params = dict(oto.model.named_parameters())
    out = []
    with torch.no_grad():
        for z in oto.groups:
            producer = [(n, d, i) for n, d, i in z.params if d == 0 and params[n].dim() >= 2]
            acc = torch.zeros(z.rows, dtype=torch.float64)
            for name, dim, index in producer or z.params:
                sl = params[name].detach().movedim(dim, 0)[index.reshape(-1)].double()
                acc += sl.reshape(z.rows, -1).abs().sum(1)
            out.append(acc.float())
    return tuple(out)


def bn_gamma(oto) -> tuple:
    return tuple(g.float() for g in row_gammas(oto))


def random(oto, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(z.rows, generator=gen) for z in oto.groups)


def scop(oto, loader, **kw) -> tuple:
    """SCOP's scores (keyword arguments: :func:`otofx.scop.select.train_betas`)."""
    return train_betas(oto, loader, **kw).scores


__all__ = ["l1", "bn_gamma", "random", "scop"]
