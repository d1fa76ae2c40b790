"""The public entry point: ``otofx.OTO(model, example_inputs)``.

A thin layer over the passes: capture -> propagate_shapes -> find_zigs at construction, and
plan_zero_rows -> prune -> verify on ``compress()``.

Internals:
    * The user's model is never mutated: analysis runs on meta tensors, and verification runs the
      captured graph (which shares the user's submodules) under ``no_grad`` in eval mode, with each
      module's training flag restored afterwards.
    * ``compress`` reads the *current* parameter values, so it can be called after any number of
      training steps.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from otofx.capture import capture
from otofx.errors import InputError, OTOError, VerificationError
from otofx.passes.prune import Plan, plan_zero_rows, prune, row_norms
from otofx.passes.shapes import propagate_shapes
from otofx.passes.zigs import ZIG, ZigSet, find_zigs

log = logging.getLogger("otofx")

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False  # NB: not module.eval(): a torch.export GraphModule raises on eval()
        yield module
    finally:
        for m, f in flags:
            m.training = f


def _check_params(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise InputError(f"parameter '{name}' is on the meta device: otofx needs real weights to compress; "
                             "materialise the model (e.g. model.to_empty(device='cpu') and initialise) first")
        if p.dtype not in _FLOAT_TYPES:
            raise InputError(f"parameter '{name}' has dtype {p.dtype}; otofx supports floating-point parameters only")


def outputs_close(a, b, rtol: float = 1e-4) -> tuple[bool, float]:
    """OTO.md's exactness: max|a - b| <= rtol * max(1, max|a|) over every tensor leaf."""
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    if len(fa) != len(fb):
        return False, float("inf")
    worst, ok = 0.0, True
    for x, y in zip(fa, fb):
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape:
            return False, float("inf")
        if not x.is_floating_point():
            ok &= bool(torch.equal(x, y))
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, x.double().abs().max().item() if x.numel() else 0.0)
        worst = max(worst, diff / scale)
        ok &= diff <= rtol * scale
    return ok, worst


class OTO:
    """Capture ``model`` and find its zero-invariant groups; ``compress()`` removes zero rows."""

    def __init__(self, model: torch.nn.Module, example_inputs, *, pin=(), frontend: str = "auto"):
        _check_params(model)
        cap = capture(model, example_inputs, frontend)
        self.model = model
        self.frontend = cap.frontend
        self._args, self._kwargs = cap.args, cap.kwargs
        self.graph_module: fx.GraphModule = cap.gm
        propagate_shapes(cap.gm, cap.args, cap.kwargs)
        self.zigset: ZigSet = find_zigs(cap.gm, pin=tuple(pin))
        log.info("otofx: %d groups, %d rows, %d pins", len(self.groups), sum(z.rows for z in self.groups),
                 len(self.pinned))

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

    def compress(self, verify: bool = True, plan: Plan | None = None) -> fx.GraphModule:
        """A new GraphModule without the rows whose parameters are all zero (or ``plan``'s rows)."""
        _check_params(self.model)
        gm = self._sync()
        plan = plan if plan is not None else self.plan()
        small = prune(gm, plan)
        small.train(self.model.training)
        if verify:
            self.verify(small)
        return small

    def verify(self, small: torch.nn.Module, rtol: float = 1e-4) -> float:
        """Check ``small`` against the full model on the example inputs; returns the relative error."""
        gm = self._sync()
        with torch.no_grad(), eval_mode(gm), eval_mode(small):
            ref = gm(*self._args, **self._kwargs)
            got = small(*self._args, **self._kwargs)
        ok, err = outputs_close(ref, got, rtol)
        if not ok:
            raise VerificationError(
                f"the compressed model differs from the full one on the example inputs (relative error {err:.3g}). "
                "This is a bug in otofx: please report it with the model. `oto.compress(verify=False)` skips this check."
            )
        return err

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


__all__ = ["OTO", "OTOError", "outputs_close", "eval_mode"]
