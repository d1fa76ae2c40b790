"""Front-ends: turn a user's model into one ``torch.fx.GraphModule`` IR.

``capture(model, example_inputs) -> Captured``. The primary front-end is ``torch.fx`` symbolic
tracing with a leaf-aware tracer (modules with a registered rule stay single nodes; everything
else is traced through). When tracing fails, ``torch.export`` (non-strict) is tried; both produce a
GraphModule whose parameter names equal the model's, so passes never ask which one ran.

Internals:
    * The model is never mutated: tracing only reads it, and the GraphModule shares the model's
      submodules (``# NB:`` rewrites must deep-copy before touching them).
    * example inputs normalise to ``(args, kwargs)``; a dict means keyword tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from otofx.errors import CaptureError, InputError
from otofx.passes.registry import FUNCTION_FORMS, MODULE_FORMS

log = logging.getLogger("otofx")


@dataclass(frozen=True)
class Captured:
    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    frontend: str  # "symbolic_trace" or "export"


def normalize_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, got "
        f"{type(example_inputs).__name__}"
    )


class LeafTracer(fx.Tracer):
    """Keeps modules that have a semantic rule as leaves; traces through everything else."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if type(m) in MODULE_FORMS:
            return True
        return super().is_leaf_module(m, qualname)


def _autowrap_functions() -> tuple:
    # torchvision's stochastic_depth reads input.ndim, which a Proxy cannot answer
    out = []
    for t in FUNCTION_FORMS:
        if getattr(t, "__module__", "") .startswith("torchvision.ops") and callable(t):
            out.append(t)
    return tuple(out)


def trace(model: torch.nn.Module) -> fx.GraphModule:
    tracer = LeafTracer(autowrap_functions=_autowrap_functions())
    graph = tracer.trace(model)
    # NB: a lazy GraphModule generates its Python code on first call, not now: analysis never runs
    # the traced graph, and codegen is about a third of the capture time
    return _LazyGraphModule(tracer.root, graph, type(model).__name__)


def export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    return gm


FRONTENDS = ("auto", "symbolic_trace", "export")


def capture(model: torch.nn.Module, example_inputs, frontend: str = "auto") -> Captured:
    """Capture ``model``: symbolic_trace first, torch.export if that fails (``frontend`` forces one)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise InputError(f"frontend={frontend!r}: choose one of {FRONTENDS}")
    args, kwargs = normalize_inputs(example_inputs)
    if frontend == "export":
        try:
            return Captured(export(model, args, kwargs), args, kwargs, "export")
        except Exception as e:  # noqa: BLE001
            raise CaptureError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {_first_line(e)}") from e
    try:
        return Captured(trace(model), args, kwargs, "symbolic_trace")
    except Exception as e:  # noqa: BLE001
        trace_err = e
        if frontend == "symbolic_trace":
            raise CaptureError(f"torch.fx.symbolic_trace failed on {type(model).__name__}: "
                               f"{type(e).__name__}: {_first_line(e)}") from e
        log.info("symbolic_trace failed (%s: %s); trying torch.export", type(e).__name__, e)
    try:
        return Captured(export(model, args, kwargs), args, kwargs, "export")
    except Exception as e:  # noqa: BLE001
        export_err = e
    raise CaptureError(
        f"otofx could not capture {type(model).__name__}.\n"
        f"  torch.fx.symbolic_trace failed: {type(trace_err).__name__}: {_first_line(trace_err)}\n"
        f"  torch.export (non-strict) failed: {type(export_err).__name__}: {_first_line(export_err)}\n"
        "Python control flow that depends on tensor values cannot be captured: move it out of forward, "
        "make it depend on shapes or module attributes only, or wrap the offending submodule so that "
        "it is called as a leaf (it will then be pinned)."
    ) from export_err


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
