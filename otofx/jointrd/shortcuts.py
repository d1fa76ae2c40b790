"""``remove_shortcuts``: a ResNet's plain twin, as an otofx pipeline, and the fold for deployment.

``remove_shortcuts(model, example_inputs, keep_projections=True, dirac=False)`` runs
``Capture -> copy_modules -> propagate_shapes -> RemoveShortcuts(keep_projections) [-> DiracPass]``
on :class:`otofx.pipeline.Pipeline` and returns the new GraphModule: every identity residual add
replaced by its branch (projection adds too with ``keep_projections=False``), the weights copies of
the model's (the model is never touched). ``fold_dirac(student)`` returns a copy with every Dirac
weight baked into a plain parameter; ``plain(student)`` is that copy for deployment, without the
JointRD bookkeeping.

Internals:
    * The record of what was removed (:class:`otofx.passes.jointrd.ShortcutRecord`) and the example
      inputs ride on the student as ``gm.meta["jointrd"]`` / ``gm.meta["jointrd_inputs"]``, so
      :class:`otofx.jointrd.JointRD` can match stage boundaries named in the teacher's graph.
    * ``# NB:`` ``copy_modules`` deep-copies the captured GraphModule before any rewrite: capture
      shares the user's submodules.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx

from otofx import pipeline as P
from otofx.errors import InputError
from otofx.passes.jointrd import apply_dirac, find_residual_adds, remove_residual_adds
from otofx.passes.jointrd import fold_dirac as _fold_in_place


def copy_modules(state: P.State) -> P.State:
    """A deep copy of ``state.gm`` (modules, weights, graph): later passes may rewrite it freely."""
    return state.replace(gm=copy.deepcopy(state.gm))


copy_modules.name = "copy_modules"


class RemoveShortcuts:
    """Pipeline pass: replace residual adds by their branches (in place on ``state.gm``)."""

    name = "remove_shortcuts"

    def __init__(self, keep_projections: bool = True):
        self.keep_projections = keep_projections

    def __call__(self, state: P.State) -> P.State:
        gm = state.gm
        gm.meta["jointrd"] = remove_residual_adds(gm, self.keep_projections)
        gm.meta["jointrd_inputs"] = (tuple(state.args), dict(state.kwargs))
        return state


class DiracPass:
    """Pipeline pass: Dirac-parametrise the square convolutions / linear layers of ``state.gm``."""

    name = "dirac"

    def __init__(self, alpha: float = 1.0, beta: float = 0.1):
        self.alpha, self.beta = alpha, beta

    def __call__(self, state: P.State) -> P.State:
        gm = state.gm
        names = apply_dirac(gm, self.alpha, self.beta)
        rec = gm.meta.get("jointrd")
        if rec is not None:
            gm.meta["jointrd"] = dataclasses.replace(rec, dirac=names)
        return state


def pipeline(keep_projections: bool = True, dirac: bool = False, frontend: str = "auto") -> P.Pipeline:
    passes = [P.Capture(frontend), copy_modules, P.propagate_shapes, RemoveShortcuts(keep_projections)]
    if dirac:
        passes.append(DiracPass())
    return P.Pipeline(passes)


def remove_shortcuts(model: torch.nn.Module, example_inputs, keep_projections: bool = True, dirac: bool = False,
                     frontend: str = "auto") -> fx.GraphModule:
    """A new GraphModule: ``model`` without its identity residual adds (see the module doc)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = pipeline(keep_projections, dirac, frontend).run(model, example_inputs)
    gm = state.gm
    gm.train(model.training)
    return gm


def residual_adds(model: torch.nn.Module, example_inputs, frontend: str = "auto") -> tuple:
    """The residual adds of ``model`` (``otofx.passes.jointrd.ResidualAdd``: add, branch, skip, kind)."""
    state = P.Pipeline([P.Capture(frontend), P.propagate_shapes]).run(model, example_inputs)
    return find_residual_adds(state.gm)


def fold_dirac(student: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``student`` with every Dirac-parametrised weight folded into a plain parameter."""
    out = copy.deepcopy(student)
    _fold_in_place(out)
    return out


def plain(student: fx.GraphModule) -> fx.GraphModule:
    """The deployable student: a copy with Dirac folded and the JointRD bookkeeping dropped."""
    out = fold_dirac(student)
    if isinstance(out, fx.GraphModule):
        out.meta.pop("jointrd", None)
        out.meta.pop("jointrd_inputs", None)
    return out
