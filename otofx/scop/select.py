"""SCOP's knockoff stage: train one scale per row, score rows by |gamma| (2 beta - 1).

``train_betas(oto, loader, ...)`` copies the captured graph, inserts the selection layers
(:func:`otofx.passes.scop.insert_selection`), freezes every weight, and trains only the betas as the
reference code does: each loader batch ``x`` becomes ``[x; knockoff(x)]``, the model runs in train
mode, the loss is cross-entropy on the real half's outputs, Adam (lr 0.004, betas (0.5, 0.9)), and
the betas are clamped to [0, 1] after every step. The result holds the betas, the norm scales and
the scores; higher means keep.

Internals:
    * The user's model is never touched: the graph is deep-copied (BatchNorm statistics drift on the
      mixed batches in train mode, as in the reference, but only in the copy).
    * gamma of a row is the mean |weight| of the normalisation layers (BatchNorm, GroupNorm,
      LayerNorm, InstanceNorm with affine weights) among the row's parameter slices; 1 when the row has
      none. A residual row with several BatchNorms takes the mean of their |gamma|.
    * # NB: Adam normalises each beta's step, so a beta moves at about lr per step whenever the sign
      of its gradient is consistent, however small the gradient: beta ranks channels by whether the
      real feature beats the knockoff, not by how much.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from otofx.errors import InputError
from otofx.passes.scop import insert_selection

from . import knockoffs as K

log = logging.getLogger("otofx")

_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


@dataclass(frozen=True)
class ScopResult:
    """What the knockoff stage learnt: per group (``oto.groups`` order) one tensor of ``rows`` values."""

    scores: tuple  # |gamma| * (2 beta - 1), higher = keep
    betas: tuple
    gammas: tuple
    losses: tuple  # mean loss per epoch


def _module_of(model: torch.nn.Module, name: str):
    mod_name = name.rpartition(".")[0]
    try:
        return model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None


def row_gammas(oto) -> tuple:
    """Per group, the mean |affine weight| of the row's normalisation layers (1 where there is none)."""
    params = dict(oto.model.named_parameters())
    out = []
    with torch.no_grad():
        for z in oto.groups:
            acc = torch.zeros(z.rows, dtype=torch.float64)
            count = 0
            for name, dim, index in z.params:
                p = params.get(name)
                if p is None or p.dim() != 1 or not name.endswith("weight"):
                    continue
                if not isinstance(_module_of(oto.model, name), _NORMS):
                    continue
                acc += p.detach().double()[index.reshape(-1)].abs().reshape(z.rows, -1).mean(1)
                count += 1
            out.append(acc / count if count else torch.ones(z.rows, dtype=torch.float64))
    return tuple(out)


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return K.batch_inputs(batch), batch[1]
    raise InputError("SCOP: the loader must give (inputs, targets) batches: the knockoff stage trains on the "
                     "targets' cross-entropy")


def train_betas(oto, loader, *, knockoff="gaussian", epochs: int = 10, lr: float = 0.004, adam_betas=(0.5, 0.9),
                init: float = 0.5, loss_fn=None, max_steps: int | None = None, seed: int = 0,
                knockoff_kwargs: dict | None = None, train_mode: bool = True) -> ScopResult:
    """SCOP's knockoff stage over ``oto``'s groups (see the module docstring); the model is not modified.

    ``knockoff``: ``"gaussian"`` (:class:`~otofx.scop.knockoffs.GaussianKnockoffs` fitted on
    ``loader``), ``"permute"`` (the batch in a random order) or a callable ``x -> x_knockoff`` of the
    same shape. ``loss_fn(outputs, targets)`` defaults to cross-entropy. ``max_steps`` caps the number
    of optimizer steps (short runs). ``train_mode=False`` runs the copy in eval mode (BatchNorm with
    the trained running statistics) instead of the reference's train mode.
    """
    if epochs < 1 or lr <= 0 or not 0.0 <= init <= 1.0:
        raise InputError(f"scop: epochs={epochs!r} must be >= 1, lr={lr!r} > 0 and init={init!r} in [0, 1]")
    if not oto.groups:
        raise InputError("scop: the model has no prunable groups (see oto.report())")
    loss_fn = loss_fn or F.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    sampler = K.make(knockoff, loader, **(knockoff_kwargs or {}))
    sel = insert_selection(oto._sync(), oto.zigset, init=init)
    if not sel.producers:
        raise InputError("scop: no group has a conv or linear producer in the captured graph, so there is no place "
                         "for a selection layer; SCOP scores channels that a layer's weight rows create")
    gm = sel.gm
    beta = getattr(gm, "scop_beta")
    for p in gm.parameters():
        p.requires_grad_(p is beta)
    for m in gm.modules():
        m.training = bool(train_mode)  # NB: not gm.train(): a torch.export GraphModule raises on train()/eval()
    opt = torch.optim.Adam([beta], lr=lr, betas=tuple(adam_betas))
    losses, step = [], 0
    for epoch in range(epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                break
            x, y = _split_batch(batch)
            xk = sampler(x, generator=gen).to(x.device, x.dtype)
            try:
                out = gm(torch.cat([x, xk], 0))
            except Exception as e:  # noqa: BLE001 - name what went wrong, in otofx's terms
                raise InputError(f"scop: the captured graph (front-end {oto.frontend}) does not run on a doubled batch "
                                 f"of shape {tuple(torch.cat([x, xk]).shape)}: {type(e).__name__}: {e}. SCOP runs the "
                                 "real and knockoff halves as one batch; capture with a batch-independent front-end "
                                 "(frontend='symbolic_trace')") from e
            loss = loss_fn(out[: x.shape[0]], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                beta.clamp_(0.0, 1.0)
            step += 1
            total += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
        if seen == 0:
            break
        losses.append(total / seen)
        b = beta.detach()
        log.info("scop epoch %d/%d: loss %.4f, beta mean %.3f, > 0.5: %d of %d rows (%.1f s)", epoch + 1, epochs,
                 losses[-1], float(b.mean()), int((b > 0.5).sum()), b.numel(), time.perf_counter() - t0)
    betas = sel.betas()
    gammas = row_gammas(oto)
    scores = tuple((g * (2 * b.double() - 1)).float() for g, b in zip(gammas, betas))
    return ScopResult(scores, tuple(b.float() for b in betas), tuple(g.float() for g in gammas), tuple(losses))


__all__ = ["ScopResult", "train_betas", "row_gammas"]
