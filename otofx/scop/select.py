"""SCOP's knockoff stage: train one scale per row, score rows by |gamma| (2 beta - 1).

``train_betas(oto, loader, ...)`` copies the captured graph, inserts the selection layers
(:func:`otofx.passes.scop.insert_selection`), freezes every weight, and trains only the betas as the
reference code does: each loader batch ``x`` becomes ``[x; knockoff(x)]``, the model runs in train
mode (BatchNorm normalises the doubled batch), the loss is cross-entropy on the real half's outputs,
and the betas start at 0.5 and are clamped to [0, 1] after every step. The result holds the betas,
the norm scales and the scores; higher means keep.

The optimizer (``optimizer=``):

* ``"sgd"`` (default): SGD with momentum 0.9 and a cosine decay of ``lr`` to 0 over the run, as
  MindSpore golden-stick's port trains the betas (``nn.Momentum``, cosine). A beta then moves in
  proportion to its gradient, so after the stage ``2 beta - 1`` ranks rows by how much the real
  feature beats the knockoff over the run.
* ``"adam"``: the official code's Adam with betas (0.5, 0.9) at a constant ``lr``.

Both default to lr 0.004, the official code's value. The port's effective rate is lower still: its
optimizer divides the gradients by its loss scale 1024, and nothing multiplies the loss, so its
peak step is 0.1 / 1024 per unit gradient.

The loader is read several times (the Gaussian fit, the batch-axis probe on its first batch, every
epoch): it must be a list of batches or a DataLoader, not a one-shot iterator, and a run in which
no beta step happens is an InputError. Groups that no selection layer reaches (their only producer
has no batch axis to split, or is inside a module such as ``nn.MultiheadAttention``) keep ``init``
as beta; a warning names them and ``ScopResult.unscored`` lists them.

Internals:
    * The user's model is never touched: the graph is deep-copied (BatchNorm statistics drift on the
      mixed batches in train mode, as in the reference, but only in the copy).
    * gamma of a row is the mean |weight| of the normalisation layers (BatchNorm, GroupNorm,
      LayerNorm, InstanceNorm with affine weights) among the row's parameter slices; 1 when the row has
      none. A residual row with several BatchNorms takes the mean of their |gamma|.
    * # NB: Adam normalises each beta's step, so a beta moves at about lr per step whenever the sign
      of its gradient is consistent, however small the gradient: beta ranks channels by whether the
      real feature beats the knockoff, not by how much. On a small, well-trained model nearly every
      channel helps, so within a few hundred steps nearly every beta reaches 1 and the score reduces
      to |gamma| (digits: 191 of 192 betas above 0.5). With SGD the betas stay apart as long as none
      hits a bound; ``ScopResult.saturated`` counts those that did, and a warning says when more than
      half did (lower ``lr`` or fewer epochs).
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

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
    saturated: int = 0  # betas at 0 or 1 after the stage (their rows' scores are +-|gamma| alone)
    unscored: tuple = ()  # groups no selection layer reaches: betas at init, scores not a knockoff test


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


def _check_args(epochs, lr, init, max_steps) -> None:
    def real(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise InputError(f"scop: epochs={epochs!r} must be an int >= 1")
    if not real(lr) or lr <= 0:
        raise InputError(f"scop: lr={lr!r} must be a finite number > 0")
    if not real(init) or not 0.0 <= init <= 1.0:
        raise InputError(f"scop: init={init!r} must be a number in [0, 1] (the betas' start)")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                  or max_steps < 1):
        raise InputError(f"scop: max_steps={max_steps!r} must be None (every batch of every epoch) or an int >= 1")


def check_loader(loader, who: str) -> None:
    """An InputError unless ``loader`` can be iterated more than once."""
    # NB: SCOP reads the loader several times (the Gaussian knockoffs' fit, the batch-axis probe, every
    # epoch); a one-shot iterator would be used up by the first read and leave the betas untrained
    if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
        what = "a one-shot iterator" if isinstance(loader, Iterator) else "not iterable"
        raise InputError(f"{who}: loader={type(loader).__name__} is {what}; SCOP reads the loader more than once "
                         "(knockoff fit, every epoch): pass a list of (inputs, targets) batches or a DataLoader, not a "
                         "generator or iter(DataLoader)")


def _probe_pair(x: torch.Tensor, sampler) -> tuple:
    """Two batches of different samples to find the batch axes on: ``x`` and ``x`` rolled by one sample
    (a knockoff of ``x`` for a batch of one)."""
    if x.shape[0] >= 2:
        return x, x.roll(1, 0)
    # NB: its own generator: the training draws stay those of ``seed``
    return x, sampler(x, generator=torch.Generator().manual_seed(12345)).to(x.device, x.dtype)


def _real_half(out, axes: tuple, n: int):
    """Every tensor of the outputs cut to the real half along its batch axis."""
    leaves, spec = tree_flatten(out)
    cut = []
    for i, t in enumerate(leaves):
        axis = axes[i] if i < len(axes) else None
        if axis is None and isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 2 * n and not axes:
            axis = 0  # no probe: the leading axis
        if isinstance(t, torch.Tensor) and axis is not None and t.dim() > axis and t.shape[axis] == 2 * n:
            t = t.narrow(axis, 0, n)
        cut.append(t)
    return tree_unflatten(cut, spec)


def train_betas(oto, loader, *, knockoff="gaussian", epochs: int = 10, lr: float = 0.004, optimizer: str = "sgd",
                momentum: float = 0.9, adam_betas=(0.5, 0.9), init: float = 0.5, loss_fn=None,
                max_steps: int | None = None, seed: int = 0, knockoff_kwargs: dict | None = None,
                train_mode: bool = True) -> ScopResult:
    """SCOP's knockoff stage over ``oto``'s groups (see the module docstring); the model is not modified.

    ``knockoff``: ``"gaussian"`` (:class:`~otofx.scop.knockoffs.GaussianKnockoffs` fitted on
    ``loader``; ``knockoff_kwargs`` go to its ``fit``, e.g. ``group="feature"``), ``"permute"`` (the
    batch in a random order) or a callable ``x -> x_knockoff`` of the same shape. ``optimizer``:
    ``"sgd"`` (``momentum``, cosine decay of ``lr``) or ``"adam"`` (``adam_betas``, constant ``lr``).
    ``loss_fn(outputs, targets)`` defaults to cross-entropy. ``max_steps`` caps the number of
    optimizer steps (short runs). ``train_mode=False`` runs the copy in eval mode (BatchNorm with the
    trained running statistics) instead of the reference's train mode.
    """
    _check_args(epochs, lr, init, max_steps)
    if optimizer not in ("sgd", "adam"):
        raise InputError(f"scop: optimizer={optimizer!r}: use 'sgd' (golden-stick's momentum SGD, cosine) or 'adam' "
                         "(the official code's)")
    if not oto.groups:
        raise InputError("scop: the model has no prunable groups (see oto.report())")
    check_loader(loader, "scop")
    knockoff_kwargs = K.check_kwargs(knockoff, knockoff_kwargs)
    loss_fn = loss_fn or F.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    sampler = K.make(knockoff, loader, **knockoff_kwargs)
    # NB: a shuffling DataLoader draws its order on iter() from its own generator, or from torch's
    # global one: the probe's batch must not move the streams the epochs' orders come from
    own = getattr(loader, "generator", None)
    states = (torch.random.get_rng_state(), own.get_state() if isinstance(own, torch.Generator) else None)
    first = next(iter(loader), None)
    torch.random.set_rng_state(states[0])
    if states[1] is not None:
        own.set_state(states[1])
    if first is None:
        raise InputError("scop: the loader gave no batch; the knockoff stage trains the betas on (inputs, targets) "
                         "batches")
    x0 = _split_batch(first)[0]
    sel = insert_selection(oto._sync(), oto.zigset, init=init, example=_probe_pair(x0, sampler))
    if not sel.producers:
        refused = f" ({len(sel.refused)} refused for want of a batch axis: {', '.join(sel.refused[:5])})" \
            if sel.refused else ""
        raise InputError("scop: no group has a conv, linear or matrix-product producer in the captured graph that a "
                         f"selection layer can follow{refused}; SCOP scores channels that a layer's weight creates")
    if sel.uncovered:
        names = "; ".join(f"group {i} ({', '.join(oto.groups[i].layers[:3])})" for i in sel.uncovered[:8])
        log.warning("scop: %d of %d groups have no producer a selection layer follows: %s. Their betas stay at "
                    "init=%g, so their scores are |gamma| (2 init - 1), not a knockoff test: ScopResult.unscored "
                    "lists them; score them another way (e.g. otofx.scop.scores.l1) before prune_lowest",
                    len(sel.uncovered), len(oto.groups), names, init)
    gm = sel.gm
    beta = getattr(gm, "scop_beta")
    for p in gm.parameters():
        p.requires_grad_(p is beta)
    for m in gm.modules():
        m.training = bool(train_mode)  # NB: not gm.train(): a torch.export GraphModule raises on train()/eval()
    if optimizer == "adam":
        opt = torch.optim.Adam([beta], lr=lr, betas=tuple(adam_betas))
    else:
        opt = torch.optim.SGD([beta], lr=lr, momentum=momentum)
    try:
        total = epochs * len(loader)
    except TypeError:  # a loader without a length: the cosine runs over the epochs
        total = None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    losses, step = [], 0
    for epoch in range(epochs):
        if optimizer == "sgd" and total is None:
            _set_lr(opt, lr, epoch, epochs)
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                break
            x, y = _split_batch(batch)
            xk = sampler(x, generator=gen).to(x.device, x.dtype)
            if xk.shape != x.shape:
                raise InputError(f"scop: the knockoff of a batch of shape {tuple(x.shape)} has shape {tuple(xk.shape)}; "
                                 "knockoff= must give a tensor of the input's shape")
            try:
                out = gm(torch.cat([x, xk], 0))
            except Exception as e:  # noqa: BLE001 - name what went wrong, in otofx's terms
                raise InputError(f"scop: the captured graph (front-end {oto.frontend}) does not run on a doubled batch "
                                 f"of shape {tuple(torch.cat([x, xk]).shape)}: {type(e).__name__}: {e}. SCOP runs the "
                                 "real and knockoff halves as one batch; capture with a batch-independent front-end "
                                 "(frontend='symbolic_trace')") from e
            n = x.shape[0]
            # NB: every output of the doubled batch (a language model's logits in a tuple or a dict) is
            # cut to the real half, along its own batch axis (a sequence-first [T, 2B, C] output on axis 1)
            loss = loss_fn(_real_half(out, sel.out_axes, n), y)
            if optimizer == "sgd" and total is not None:
                _set_lr(opt, lr, step, total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                beta.clamp_(0.0, 1.0)
            step += 1
            loss_sum += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
        if seen == 0:
            break
        losses.append(loss_sum / seen)
        b = beta.detach()
        log.info("scop epoch %d/%d: loss %.4f, beta mean %.3f, > 0.5: %d, at 0 or 1: %d of %d rows (%.1f s)",
                 epoch + 1, epochs, losses[-1], float(b.mean()), int((b > 0.5).sum()),
                 int(((b <= 0) | (b >= 1)).sum()), b.numel(), time.perf_counter() - t0)
    if step == 0:
        # NB: without a step every beta is still init and every score is |gamma| (2 init - 1): 0 at the
        # default init, and prune_lowest would then remove each group's first rows
        raise InputError("scop: no beta step ran: the loader gave no batch to the knockoff stage. Pass a list of "
                         "(inputs, targets) batches or a DataLoader")
    betas = sel.betas()
    b = torch.cat(betas) if betas else torch.zeros(0)
    saturated = int(((b <= 0) | (b >= 1)).sum())
    if saturated > b.numel() / 2:
        log.warning("scop: %d of %d betas ended at 0 or 1; their scores are +-|gamma| alone. Use a lower lr or fewer "
                    "epochs (optimizer=%r, lr=%g, %d steps)", saturated, b.numel(), optimizer, lr, step)
    gammas = row_gammas(oto)
    scores = tuple((g * (2 * b.double() - 1)).float() for g, b in zip(gammas, betas))
    return ScopResult(scores, tuple(b.float() for b in betas), tuple(g.float() for g in gammas), tuple(losses),
                      saturated, tuple(sel.uncovered))


def _set_lr(opt, lr: float, t: int, total: int) -> None:
    """Cosine decay from ``lr`` at ``t = 0`` to 0 at ``t = total``."""
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))


__all__ = ["ScopResult", "train_betas", "row_gammas"]
