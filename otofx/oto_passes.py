"""OTO's passes on the pipeline: its results (typed keys) and the passes that produce them.

    find_zigs        zero-invariant groups         reads GRAPH, PIN, FREE; writes ZIGSET
    report_pins      group and pin table, logged   reads GRAPH, ZIGSET;    writes REPORT
    plan_zero_rows   rows whose slices are all 0   reads GRAPH, ZIGSET;    writes PLAN
    prune            the rewrite                   reads GRAPH, PLAN;      writes GRAPH (a new, smaller one)

``analysis()``, ``compression()`` and ``default()`` are OTO's standard pipelines. This module is
the pattern for a method's passes: its keys (``PIN``, ``FREE``, ``ZIGSET``, ``PLAN``, ``REPORT``) and passes
sit together, on the shared ``State``, contracts and runner of :mod:`otofx.pipeline` (which
re-exports these names: ``otofx.pipeline.find_zigs`` is this module's pass).

Internals:
    * ``FREE`` (``free_outputs``, default ``"auto"``: a Hugging Face model's
      ``encoder_last_hidden_state``, :func:`free_output_names`) names the outputs that may come
      back narrower; ``prune``'s graph and ``Verify`` compare them on their kept channels.
    * ``plan_zero_rows`` finds zero rows with ``passes.prune.zero_rows`` (``p != 0`` masks
      gathered per row, no float64 copy of the weights).
    * ``ZIGSET`` and ``PLAN`` describe the graph they were computed on (``state.reference`` in
      the usual order), not the pruned one; ``prune`` leaves them in the state for reporting.
    * The algorithms have their own names (``passes.zigs.zero_invariant_groups``,
      ``passes.prune.zero_row_plan``/``prune_graph``): each pass has one name.
"""
from __future__ import annotations

import logging

import torch

from otofx.errors import InputError
from otofx.passes.prune import Plan, plan_rows, prune_graph, zero_rows
from otofx.passes.zigs import ZigSet, output_leaves, zero_invariant_groups
from otofx.pipeline import (GRAPH, Capture, Key, Pipeline, PipelineError, State, Verify, contract,
                            eliminate_dead_code, propagate_shapes)

log = logging.getLogger("otofx")

PIN = Key("pin", tuple, "Pipeline.run(..., pin=...)", "module or parameter names find_zigs keeps whole", default=())
FREE = Key("free_outputs", (str, tuple), "Pipeline.run(..., free_outputs=...)",
           "output keys whose zero channels find_zigs leaves free (the compressed graph returns them narrower)",
           default="auto")
ZIGSET = Key("zigset", ZigSet, "find_zigs", "the zero-invariant groups of the analysed graph")
PLAN = Key("plan", Plan, "plan_zero_rows", "the rows to remove")
REPORT = Key("report", str, "report_pins", "report_pins' table")


def pin_names(pin, model: torch.nn.Module) -> tuple:
    """``pin`` as names: a module type in it (``torch.nn.LayerNorm``) stands for every module of
    ``model`` of that type (subclasses included)."""
    out = []
    for p in pin:
        if isinstance(p, type):
            hits = [n for n, m in model.named_modules() if isinstance(m, p) and n]
            if not hits:
                raise InputError(f"pin=[{p.__name__}]: {type(model).__name__} has no module of that type")
            out += hits
        else:
            out.append(p)
    return tuple(out)


# the outputs ``free_outputs="auto"`` frees: a Hugging Face encoder-decoder's encoder states (the
# decoder reads them inside the model; the logits and every other output keep their widths)
AUTO_FREE_OUTPUTS = ("encoder_last_hidden_state",)
# ... and a sentence-transformers model's token states (what its pooling reads; the sentence
# embedding keeps its width)
AUTO_FREE_SENTENCE = ("token_embeddings",)


def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _is_sentence_transformer(model) -> bool:
    return any(c.__module__.startswith("sentence_transformers.") for c in type(model).__mro__)


def free_output_names(free, model: torch.nn.Module | None, gm: torch.fx.GraphModule) -> tuple:
    """``free_outputs`` as keys of ``gm``'s output: ``"auto"`` is :data:`AUTO_FREE_OUTPUTS` for a Hugging
    Face model, :data:`AUTO_FREE_SENTENCE` for a sentence-transformers one (none for any other); a name
    or index the output lacks is an InputError."""
    if isinstance(free, str) and free == "auto":
        if model is not None and _is_sentence_transformer(model):
            return AUTO_FREE_SENTENCE
        return AUTO_FREE_OUTPUTS if model is not None and _is_transformers_model(model) else ()
    free = (free,) if isinstance(free, (str, int)) else tuple(free)
    keys = [k for k, _, _ in output_leaves(gm)]
    missing = [k for k in free if k not in keys]
    if missing:
        have = ", ".join(repr(k) for k in dict.fromkeys(keys) if k is not None) or "none (one tensor)"
        raise InputError(f"free_outputs={list(free)!r}: the model's output has no {missing[0]!r} (its keys: {have})")
    return free


@contract(reads=(GRAPH, PIN, FREE), writes=(ZIGSET,), analysis=True)
def find_zigs(state: State) -> State:
    """The zero-invariant groups of ``state.gm`` (needs propagate_shapes); the ``PIN`` names stay
    whole, and every output but the ``FREE`` ones' zero channels keeps its width."""
    gm = state.gm
    if not any("val" in n.meta for n in gm.graph.nodes if n.op != "output"):
        raise PipelineError("pass 'find_zigs' needs shapes on the graph: run 'propagate_shapes' before it")
    model = state.model if state.model is not None else gm
    zs = zero_invariant_groups(gm, pin=pin_names(state.get(PIN), model),
                               free_outputs=free_output_names(state.get(FREE), state.model, gm))
    if zs.free_outputs:
        log.info("otofx: output(s) %s may come back narrower (free_outputs; free_outputs=() keeps their widths)",
                 ", ".join(str(f.key) for f in zs.free_outputs))
    log.info("otofx: %d groups, %d rows, %d pins", len(zs.zigs), sum(z.rows for z in zs.zigs), len(zs.pinned))
    return state.put(ZIGSET, zs)


class _ReportView:
    """What ``otofx.report.report`` reads of an OTO object, built from a State."""

    def __init__(self, state: State, model: torch.nn.Module):
        zs = state.get(ZIGSET)
        self.model = model
        self.groups = zs.zigs
        self.pinned = zs.pinned
        self.free_outputs = zs.free_outputs
        self.frontend = state.frontend or "graph"
        self.graph_module = state.gm


@contract(reads=(GRAPH, ZIGSET), writes=(REPORT,), analysis=True)
def report_pins(state: State) -> State:
    """The group and pin table of ``ZIGSET``: logged at INFO on the ``otofx`` logger, kept as ``REPORT``."""
    from otofx.report import report

    text = report(_ReportView(state, state.gm))
    log.info("%s", text)
    return state.put(REPORT, text)


@contract(reads=(GRAPH, ZIGSET), writes=(PLAN,), analysis=True)
def plan_zero_rows(state: State) -> State:
    """A plan removing every row whose parameter slices in ``state.gm`` are all exactly zero."""
    zs = state.get(ZIGSET)
    return state.put(PLAN, plan_rows(zs, zero_rows(zs, state.gm)))


@contract(reads=(GRAPH, PLAN), writes=(GRAPH,))
def prune(state: State) -> State:
    """The rewrite: a new GraphModule without ``PLAN``'s rows (``state.gm`` is not modified)."""
    plan = state.get(PLAN)
    log.info("otofx: removing %d rows", plan.count)
    # NB: the example inputs: a layer norm reading removed channels that hold constants gets their values
    return state.replace(gm=prune_graph(state.gm, plan, (state.args, state.kwargs)))


# ---------------------------------------------------------------------------------------------
# Standard pipelines
# ---------------------------------------------------------------------------------------------


def analysis(frontend: str = "auto") -> Pipeline:
    """capture -> propagate_shapes -> find_zigs (what ``otofx.OTO(model, x)`` runs)."""
    return Pipeline([Capture(frontend), propagate_shapes, find_zigs])


def compression(verify: bool = True, rtol: float = 1e-4) -> Pipeline:
    """plan_zero_rows -> prune -> eliminate_dead_code [-> Verify] over an analysed State."""
    passes = [plan_zero_rows, prune, eliminate_dead_code]
    return Pipeline(passes + ([Verify(rtol)] if verify else []))


def default(frontend: str = "auto", verify: bool = True) -> Pipeline:
    """The whole pipeline, model to verified compressed GraphModule."""
    return Pipeline([Capture(frontend), propagate_shapes, find_zigs, report_pins, plan_zero_rows, prune,
                     eliminate_dead_code] + ([Verify()] if verify else []))


__all__ = ["PIN", "FREE", "ZIGSET", "PLAN", "REPORT", "find_zigs", "report_pins", "plan_zero_rows", "prune",
           "zero_rows", "analysis", "compression", "default"]
