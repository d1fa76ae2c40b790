"""The public entry point: ``otofx.OTO(model, example_inputs)``.

A thin layer over :mod:`otofx.pipeline`: construction runs ``pipeline.analysis()`` (Capture ->
propagate_shapes -> find_zigs), ``compress()`` runs plan_zero_rows -> prune
(then any extra passes, e.g. ``pipeline.eliminate_dead_code``) and ``verify()``.

Internals:
    * The user's model is never mutated: analysis runs on meta tensors, and verification runs the
      captured graph (which shares the user's submodules) under ``no_grad`` in eval mode, with each
      module's training flag restored afterwards.
    * ``compress`` reads the *current* parameter values, so it can be called after any number of
      training steps.
    * ``self.state`` is the analysis State (graph, groups, per-pass records); compress starts from
      it with the current weights, so one analysis serves any number of compressions.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from otofx import pipeline
from otofx.errors import InputError, OTOError, VerificationError
from otofx.passes.prune import Plan, plan_zero_rows, row_norms
from otofx.passes.zigs import ZIG, ZigSet
from otofx.pipeline import compare, eval_mode, outputs_close

log = logging.getLogger("otofx")

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_params(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise InputError(f"parameter '{name}' is on the meta device: otofx needs real weights to compress; "
                             "materialise the model (e.g. model.to_empty(device='cpu') and initialise) first")
        if p.dtype not in _FLOAT_TYPES:
            raise InputError(f"parameter '{name}' has dtype {p.dtype}; otofx supports floating-point parameters only")


class OTO:
    """Capture ``model`` and find its zero-invariant groups; ``compress()`` removes zero rows."""

    def __init__(self, model: torch.nn.Module, example_inputs, *, pin=(), frontend: str = "auto"):
        _check_params(model)
        self.state: pipeline.State = pipeline.analysis(frontend).run(model, example_inputs, pin=tuple(pin))
        self.model = model
        self.frontend = self.state.frontend
        self._args, self._kwargs = self.state.args, self.state.kwargs
        self.graph_module: fx.GraphModule = self.state.gm
        self.zigset: ZigSet = self.state.zigset

    # -- analysis results -----------------------------------------------------------------------
    @property
    def groups(self) -> tuple[ZIG, ...]:
        return self.zigset.zigs

    @property
    def pinned(self):
        return self.zigset.pinned

    def report(self) -> str:
        from otofx.report import report

        return report(self)

    def row_norms(self) -> list:
        return row_norms(self.zigset, self.model)

    # -- compression ----------------------------------------------------------------------------
    def _sync(self) -> fx.GraphModule:
        """The captured graph with the model's current values (export copies tensors)."""
        gm = self.graph_module
        if self.frontend != "symbolic_trace":
            with torch.no_grad():
                src = dict(self.model.named_parameters())
                src.update(dict(self.model.named_buffers()))
                for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
                    if name in src and src[name] is not t:
                        t.copy_(src[name])
        return gm

    def plan(self) -> Plan:
        return plan_zero_rows(self.zigset, self.model)

    def compress(self, verify: bool = True, plan: Plan | None = None, passes=()) -> fx.GraphModule:
        """A new GraphModule without the rows whose parameters are all zero (or ``plan``'s rows).

        ``passes``: extra pipeline passes run on the compressed graph before verification (e.g.
        ``pipeline.GraphPass(torch.fx.experimental.optimization.fuse)`` to fold BN into conv).
        """
        _check_params(self.model)
        gm = self._sync()
        steps = [] if plan is not None else [pipeline.plan_zero_rows]  # a given plan replaces the search
        # NB: no dead-code elimination by default: a layer whose output is unused keeps its
        # parameters, so the compressed state_dict has the same keys as the model's
        steps += [pipeline.prune, *passes]
        state = pipeline.Pipeline(steps).run(self.state.replace(gm=gm, reference=gm, plan=plan, records=()))
        small = state.gm
        small.train(self.model.training)
        if verify:
            self.verify(small)
        return small

    def verify(self, small: torch.nn.Module, rtol: float = 1e-4) -> float:
        """Check ``small`` against the full model on the example inputs; returns the relative error."""
        try:
            return compare(self._sync(), small, self._args, self._kwargs, rtol, "the compressed model")
        except VerificationError as e:
            raise VerificationError(f"{e} `oto.compress(verify=False)` skips this check.") from None

    # -- training -------------------------------------------------------------------------------
    def dhspg(self, **kw):
        """A :class:`otofx.optim.DHSPG` over ``self.model``'s parameters with the rows of ``self.groups``.

        Keyword arguments are DHSPG's hyper-parameters (OTO.md section 2), e.g. ``lr``, ``variant``,
        ``target_group_sparsity``, ``start_pruning_steps``.
        """
        from otofx.optim import DHSPG

        return DHSPG(self.model.named_parameters(), self.groups, model=self.model, **kw)

    def hesso(self, **kw):
        """A :class:`otofx.optim.HESSO` over ``self.model``'s parameters (``pruning_steps`` is required)."""
        from otofx.optim import HESSO

        return HESSO(self.model.named_parameters(), self.groups, model=self.model, **kw)

    # -- SCOP: pruning a trained model ------------------------------------------------------------
    def scop(self, loader, *, knockoff="gaussian", epochs: int = 10, lr: float = 0.004, **kw) -> tuple:
        """SCOP's per-row scores (one tensor per group, ``self.groups`` order; higher = keep).

        Trains one selection scale per row on a copy of the captured graph with knockoff inputs
        (``knockoff``: "gaussian", "permute" or a callable); the model is untouched. Other keywords:
        :func:`otofx.scop.train_betas` (``adam_betas``, ``init``, ``loss_fn``, ``max_steps``, ``seed``,
        ``knockoff_kwargs``).
        """
        from otofx.scop import train_betas

        return train_betas(self, loader, knockoff=knockoff, epochs=epochs, lr=lr, **kw).scores

    def prune_lowest(self, scores, *, ratio: float = 0.5, per_group: bool = True, loader=None, bn_batches: int = 10,
                     **kw) -> fx.GraphModule:
        """A new GraphModule without the lowest-scoring rows (:func:`otofx.scop.prune_lowest`)."""
        from otofx.scop import prune_lowest

        return prune_lowest(self, scores, ratio=ratio, per_group=per_group, loader=loader, bn_batches=bn_batches, **kw)


__all__ = ["OTO", "OTOError", "outputs_close", "eval_mode"]
