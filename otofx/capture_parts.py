"""Capture in parts: the largest submodules that can be captured, side by side in one graph.

A model whose own forward no front-end captures (torchvision's RetinaNet, FCOS, Mask and Keypoint
R-CNN: their post-processing sizes its tensors by how many boxes pass a threshold, and torch.export's
``draft_export`` fails inside it) usually spends its parameters in submodules that can be: the
backbone, the feature pyramid, the heads. :func:`parts_captured` runs the model once on the example,
records each submodule's first call, captures the submodules with parameters top-down (a submodule
that fails is replaced by its children), and puts the part graphs side by side in one
``torch.fx.Graph``: the inputs each part was called with are the graph's inputs, and every part's
outputs are the graph's outputs. The analysis runs on that graph as on any other: each part's
outputs are model outputs, so the channels that cross between parts (a backbone's feature maps
into the heads) stay whole, and everything inside a part is analysed as usual.

The graph is not a model of the whole forward (the glue between the parts runs in Python): the
compressed model is the model's own class with its parts re-sized, verified against the model
itself on the example inputs.

Internals:
    * Parts are captured with ``symbolic_trace`` when they are called with tensors by position
      alone and trace (a backbone), else with torch.export (flat placeholders in the order of
      ``tree_flatten((args, kwargs))``, the part's names for its parameters); get_attr and
      call_module targets, ``nn_module_stack`` paths and the tracer's ``MADE_IN`` labels are
      prefixed with the part's path, so every name in the graph is the model's own.
    * ``gm.meta[PARTS]`` holds :class:`Parts`: the parts' paths, the model's example inputs, and
      what the capture of the whole model said.
    * # NB: a submodule called more than once (a head shared by the levels of a pyramid) is
      captured on its first call; the verification of the own class runs every call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from otofx.errors import CaptureError
from otofx.passes.nodes import MADE_IN
from otofx.passes.shapes import spec_leaves
from otofx.verify import eval_mode, fresh_inputs

log = logging.getLogger("otofx")

PARTS = "otofx_parts"  # gm.meta key: a Parts record when the model was captured in parts


@dataclass(frozen=True)
class Parts:
    """What :func:`parts_captured` did: ``paths`` (the submodules captured, in call order),
    ``args``/``kwargs`` (the model's example inputs), ``why`` (the whole model's capture error),
    ``asked`` (``frontend="parts"``; else the fallback of ``frontend="auto"``) and ``frontends`` (what
    captured each part: ``symbolic_trace`` or ``export``)."""

    paths: tuple
    args: tuple
    kwargs: dict
    why: str
    asked: bool = False
    frontends: tuple = ()


@dataclass
class _Call:
    order: int
    args: tuple
    kwargs: dict
    count: int = 1


def _record_calls(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """``id(module) -> _Call`` of every submodule's first call in one eval-mode run of ``model``."""
    calls: dict = {}
    handles = []

    def pre(mod, a, k):
        c = calls.get(id(mod))
        if c is None:
            calls[id(mod)] = _Call(len(calls), a, dict(k))
        else:
            c.count += 1

    for m in model.modules():
        if m is not model:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            a, k = fresh_inputs(args, kwargs)
            model(*a, **k)
    finally:
        for h in handles:
            h.remove()
    return calls


def _holds_weights(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders for ``gm(*args, **kwargs)`` (torch.export's flattening)."""
    flat = spec_leaves(gm, args, kwargs)
    return flat if flat is not None else tree_flatten((args, kwargs))[0]


def _traced_part(module: torch.nn.Module, args: tuple, kwargs: dict):
    """``Captured`` of a part by ``symbolic_trace`` (milliseconds, where torch.export takes seconds to
    tens of seconds: a detector's backbone at the transform's 800-pixel images), when it is called with
    tensors by position alone, its graph takes exactly those and calls no opaque function; else None
    (the caller exports it)."""
    from otofx.capture import Captured, _follow_mode_traced, _opaque_calls, trace

    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    try:
        gm = trace(module)
    except Exception as e:  # noqa: BLE001 - torch.export is tried next
        log.debug("otofx: symbolic_trace of part %s failed (%s: %s)", type(module).__name__, type(e).__name__, e)
        return None
    if sum(n.op == "placeholder" for n in gm.graph.nodes) != len(args) or _opaque_calls(gm):
        return None
    _follow_mode_traced(gm, module)
    return Captured(gm, tuple(args), {}, "symbolic_trace")


def _choose(model: torch.nn.Module, calls: dict) -> list:
    """``[(order, path, Captured)]``: the largest submodules with parameters that capture (top-down)."""
    from otofx.capture import export_captured

    parts = []

    def visit(path: str, module: torch.nn.Module) -> None:
        if not _holds_weights(module):
            return
        call = calls.get(id(module))
        if call is None:
            return  # NB: the example never reached it: its parameters are unread, as in a whole capture
        try:
            cap = _traced_part(module, tuple(call.args), dict(call.kwargs)) \
                or export_captured(module, tuple(call.args), dict(call.kwargs))
        except Exception as e:  # noqa: BLE001 - its children may still be captured
            log.info("otofx: part %s (%s) cannot be captured (%s: %s); trying its children", path,
                     type(module).__name__, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            for name, child in module.named_children():
                visit(f"{path}.{name}", child)
            return
        parts.append((call.order, path, cap))

    for name, child in model.named_children():
        visit(name, child)
    return sorted(parts, key=lambda p: p[0])


def _prefixed_stack(stack: dict | None, path: str) -> dict | None:
    if not stack:
        return stack
    out = {}
    for key, value in stack.items():
        fqn, typ = value
        out[f"{path}::{key}"] = (f"{path}.{fqn}" if fqn else path, typ)
    return out


def _stitch(model: torch.nn.Module, parts: list) -> tuple[fx.GraphModule, tuple]:
    """One graph holding every part's graph; returns it and the values of its placeholders."""
    from otofx.capture import DATA_BRANCHES, graph_module

    graph = fx.Graph()
    root = torch.nn.Module()
    values: list = []
    outputs: list = []
    branches: list = []
    for _, path, cap in parts:
        gm = cap.gm
        holder = root
        *up, last = path.split(".")
        for item in up:
            if item not in holder._modules:
                holder._modules[item] = torch.nn.Module()
            holder = holder._modules[item]
        holder._modules[last] = gm
        branches += gm.meta.get(DATA_BRANCHES) or []
        flat = _flat_inputs(gm, cap.args, cap.kwargs)
        env: dict = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(flat):
            raise CaptureError(f"otofx could not stitch part '{path}': its graph takes {len(placeholders)} inputs, "
                               f"its call gave {len(flat)}")
        tag = path.replace(".", "_")
        for ph, value in zip(placeholders, flat):
            new = graph.placeholder(f"{tag}_{ph.name}")
            new.meta = dict(ph.meta)
            env[ph] = new
            values.append(value)
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs += [env[x] for x in tree_flatten(n.args[0])[0] if isinstance(x, fx.Node)]
                continue
            new = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                new.target = f"{path}.{n.target}"
            if "nn_module_stack" in n.meta:
                new.meta["nn_module_stack"] = _prefixed_stack(n.meta["nn_module_stack"], path)
            if MADE_IN in n.meta:  # NB: a traced part's module labels
                new.meta[MADE_IN] = f"{path}.{n.meta[MADE_IN]}" if n.meta[MADE_IN] else path
            env[n] = new
    graph.output(tuple(outputs))
    gm = graph_module(root, graph, type(model).__name__)
    if branches:
        gm.meta[DATA_BRANCHES] = branches
    return gm, tuple(values)


def parts_captured(model: torch.nn.Module, args: tuple, kwargs: dict, why: str, asked: bool = False):
    """``Captured`` of ``model`` in parts (see the module docstring), or a CaptureError naming ``why``
    (the whole model's capture failure) when no submodule with parameters can be captured."""
    from otofx.capture import Captured

    try:
        calls = _record_calls(model, args, kwargs)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{why}\n  In parts: the model does not run on the example inputs in eval mode "
                           f"({type(e).__name__}: {e})") from e
    parts = _choose(model, calls)
    if not parts:
        raise CaptureError(f"{why}\n  In parts: no submodule with parameters could be captured either.")
    gm, values = _stitch(model, parts)
    paths = tuple(p for _, p, _ in parts)
    gm.meta[PARTS] = Parts(paths, tuple(args), dict(kwargs), why, asked, tuple(c.frontend for _, _, c in parts))
    left = [n for n, p in model.named_parameters()
            if not any(n == q or n.startswith(q + ".") for q in paths)]
    (log.info if asked else log.warning)("otofx: %s's forward cannot be captured as a whole; captured in %d parts (%s), whose outputs "
                "keep their widths%s", type(model).__name__, len(paths), ", ".join(paths),
                f"; {len(left)} parameter tensors outside them stay as they are" if left else "")
    return Captured(gm, values, {}, "parts")
