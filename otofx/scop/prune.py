"""Remove the lowest-scoring rows of a trained model: ``prune_lowest(oto, scores, ratio=...)``.

Any per-row scores work (SCOP's, :mod:`otofx.scop.scores`' baselines, your own): per group the
``floor(ratio * rows)`` lowest rows go (a uniform rate, as the SCOP paper prunes), or, with
``per_group=False``, the ``floor(ratio * total rows)`` lowest over all groups (raw scores compared
across groups). The rows become a plan (:func:`otofx.passes.prune.plan_rows`) and
``oto.compress(plan=plan, verify=False)`` removes them.

The rows are not zero, so the result is not equal to the trained model. It is checked instead for
what it is: it runs on the example inputs with outputs of the full model's structure and shapes,
and (``verify=True``) it equals the full model *with those rows' parameters set to zero* on the
example inputs (OTO.md's exactness, on a zeroed copy). Then, with a ``loader``, BatchNorm statistics
are re-estimated on ``bn_batches`` batches (the removed channels changed what the later layers see).

Internals:
    * ``plan_rows`` may give one row back to an axis that would lose every channel (a global ratio
      can empty a group); the zeroed reference uses the plan's rows, so it matches what was removed.
    * BN re-estimation resets every BatchNorm's statistics and runs train-mode forwards under
      ``no_grad`` with a cumulative average (``momentum=None``); each layer's momentum and every
      module's training flag are restored afterwards.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Iterable

import torch
from torch.utils._pytree import tree_flatten

from otofx.capture import _no_kv_cache
from otofx.errors import InputError, VerificationError
from otofx.passes.prune import plan_rows
from otofx.verify import compare, narrow_outputs, run_eval

from otofx.calibrate import reestimate_bn

log = logging.getLogger("otofx")


def choose_rows(oto, scores, ratio: float, per_group: bool = True) -> tuple:
    """The row indices to remove per group (the lowest scores; ties broken by row order)."""
    scores = _check_scores(oto, scores)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
        raise InputError(f"prune_lowest: ratio={ratio!r} must be a number in [0, 1) (the fraction of rows to remove)")
    if per_group:
        return tuple(torch.argsort(s, stable=True)[: math.floor(ratio * len(s))].sort().values for s in scores)
    flat = torch.cat(scores)
    group = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    row = torch.cat([torch.arange(len(s)) for s in scores])
    low = torch.argsort(flat, stable=True)[: math.floor(ratio * len(flat))]
    return tuple(row[low][group[low] == i].sort().values for i in range(len(scores)))


def _check_scores(oto, scores) -> list:
    if scores is None or isinstance(scores, (torch.Tensor, str, bytes, dict)) or not isinstance(scores, Iterable):
        raise InputError(f"prune_lowest: scores={type(scores).__name__} must be a list or tuple of one score tensor "
                         "per group, in oto.groups order (oto.scop(loader), otofx.scop.scores.l1(oto), ...)")
    scores = list(scores)
    if len(scores) != len(oto.groups):
        raise InputError(f"prune_lowest: {len(scores)} score tensors for {len(oto.groups)} groups; give one per group "
                         "in oto.groups order")
    out = []
    for i, (s, z) in enumerate(zip(scores, oto.groups)):
        try:
            s = torch.as_tensor(s).detach().reshape(-1).to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"prune_lowest: scores[{i}] ({type(s).__name__}) is not a tensor of numbers: {e}") from None
        if len(s) != z.rows:
            raise InputError(f"prune_lowest: scores[{i}] has {len(s)} values; group {i} has {z.rows} rows")
        if not bool(torch.isfinite(s).all()):
            raise InputError(f"prune_lowest: scores[{i}] has non-finite values")
        out.append(s)
    return out


def zeroed_copy(oto, plan) -> torch.nn.Module:
    """A copy of the captured graph with the plan's rows set to zero (the pruned model's reference)."""
    ref = copy.deepcopy(oto._sync())
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for z, rows in zip(oto.groups, plan.removed):
            if len(rows):
                for name, dim, index in z.params:
                    params[name].movedim(dim, 0)[index[rows].reshape(-1)] = 0
    return ref


def check_structure(oto, small: torch.nn.Module) -> None:
    """``small`` runs on the example inputs and gives outputs of the full model's structure and shapes."""
    full = run_eval(oto._sync(), oto._args, oto._kwargs)
    try:
        # NB: the graph was captured without a KV cache (Hugging Face); so is the model's own class here
        with _no_kv_cache(small, oto._kwargs):
            got = run_eval(small, oto._args, oto._kwargs)
    except Exception as e:  # noqa: BLE001
        raise VerificationError(f"the pruned model does not run on the example inputs: {type(e).__name__}: {e}") from e
    # NB: a free output (OTO(free_outputs=...)) is narrower by design: its kept channels are compared
    full = narrow_outputs(full, got, oto.output_keep(small))
    fa, sa = tree_flatten(full)
    fb, sb = tree_flatten(got)
    if sa != sb:
        raise VerificationError(f"the pruned model's outputs have another structure ({sb}) than the full model's ({sa})")
    for i, (a, b) in enumerate(zip(fa, fb)):
        if isinstance(a, torch.Tensor) and (not isinstance(b, torch.Tensor) or a.shape != b.shape):
            raise VerificationError(f"the pruned model's output {i} has shape "
                                    f"{getattr(b, 'shape', type(b).__name__)}, the full model's {tuple(a.shape)}")


def prune_lowest(oto, scores, *, ratio: float = 0.5, per_group: bool = True, loader=None, bn_batches: int = 10,
                 verify: bool = True, rtol: float = 1e-4) -> torch.nn.Module:
    """A new model without each group's lowest-scoring rows (see the module docstring): the model's own
    class where ``oto.compress()`` gives it, else the GraphModule."""
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, numbers.Integral) or bn_batches < 0:
        raise InputError(f"prune_lowest: bn_batches={bn_batches!r} must be an int >= 0 (0: no BatchNorm re-estimation)")
    rows = choose_rows(oto, scores, ratio, per_group)
    plan = plan_rows(oto.zigset, rows)
    small = oto.compress(plan=plan, verify=False)
    check_structure(oto, small)
    if verify:
        with _no_kv_cache(small, oto._kwargs):
            err = compare(zeroed_copy(oto, plan), small, oto._args, oto._kwargs, rtol,
                          "the pruned model (against the full model with those rows zeroed)",
                          keep=oto.output_keep(small))
        log.info("scop: pruned model equals the zeroed full model to %.2g (relative)", err)
    log.info("scop: removed %d of %d rows (%s)", plan.count, sum(z.rows for z in oto.groups),
             "per group" if per_group else "globally")
    if loader is not None and bn_batches > 0:
        reestimate_bn(small, loader, bn_batches)
    return small


__all__ = ["prune_lowest", "choose_rows", "reestimate_bn", "check_structure", "zeroed_copy"]
