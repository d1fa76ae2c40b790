"""The otofx pipeline: composable passes over a GraphModule, run with timing and checks.

A pass is any callable ``State -> State``. The built-in ones cover what ``otofx.OTO`` and the
``torch.compile`` backend do::

    Capture(frontend)    model -> GraphModule          (state.model, state.args -> state.gm)
    propagate_shapes     meta shapes on every node     (node.meta["val"])
    find_zigs            zero-invariant groups         (-> state.zigset; honours state.pin)
    report_pins          group and pin table, logged   (-> state.report)
    plan_zero_rows       rows whose slices are all 0   (-> state.plan; reads state.gm's tensors)
    prune                the rewrite                   (-> state.gm, a new, smaller GraphModule)
    eliminate_dead_code  cleanup                       (-> state.gm, a new GraphModule if changed)
    Verify(rtol)         outputs equal the reference   (raises VerificationError)

``Pipeline(passes, verify=False).run(model_or_gm, example_inputs)`` runs them in order and returns
the final :class:`State`; ``state.records`` holds one :class:`PassRecord` (name, seconds, graph
size, relative error) per pass, and :func:`format_records` turns them into a table. A user pass is
just another callable in the list; :class:`GraphPass` adapts a ``GraphModule -> GraphModule``
function (``torch.fx.experimental.optimization.fuse`` folds BN into conv) or a
``torch.fx.passes.infra`` pass that returns a ``PassResult``. ``otofx.backend.pipeline()`` is the
list the ``torch.compile`` backend runs.

Internals:
    * ``State`` is a frozen dataclass; passes return ``state.replace(...)``. A pass may also
      return a bare ``GraphModule`` or a ``PassResult``; the runner turns either into
      ``state.replace(gm=...)``. Anything else is a ``PipelineError`` naming the pass.
    * After every pass the runner checks ``state.gm``: a pass marked ``analysis = True`` (the
      built-in ones that only read the graph) must leave the same GraphModule with the same node
      count, a cheap identity check; the front-end's graph (``Capture``) is linted when verifying
      (fx's tracer and export build graphs through fx's own API); every other pass, a user's
      included, gets ``graph.lint()``. With ``verify=True`` the runner also runs
      the new graph on the example inputs (eval mode, ``no_grad``) and compares it with the
      *reference*: the first GraphModule the run saw (the input graph, or the captured one),
      whose outputs are computed once, as soon as it is known. Only passes whose graph changed
      (another GraphModule object, or other generated code) are run; a pass that edits weights
      in place without touching the graph is not detected: put ``Verify()`` after it.
    * Verification runs every input set of :func:`input_sets`: the example inputs and
      ``state.more_inputs`` (the export front-end's second shape: batch + 1 and length + 1 along
      the dimensions it made dynamic, the example tiled to those sizes).
    * Verification holds float32 to ``rtol`` (1e-4); a float16/bfloat16 model gets
      ``2 * unit roundoff * sqrt(contraction depth)`` (:func:`outputs_close` says why), and so does
      a float32 model on CUDA while TF32 is allowed (cuDNN's default for convolutions), with
      float16's unit roundoff: TF32 keeps 10 mantissa bits (:func:`tf32_in_use`).
    * ``plan_zero_rows`` finds zero rows with ``passes.prune.zero_rows`` (``p != 0`` masks
      gathered per row, no float64 copy of the weights).
    * ``zigset`` and ``plan`` describe the graph they were computed on (``state.reference`` in
      the usual order), not the pruned one; ``prune`` leaves them in the state for reporting.
    * ``torch.fx.passes.infra.pass_manager.PassManager`` runs ``GraphModule -> PassResult``
      passes only; otofx's analysis passes produce data (groups, plans), so this runner carries a
      State instead, and accepts PassManager-style passes through ``GraphPass``.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import operator
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from otofx.capture import capture as _capture
from otofx.capture import normalize_inputs
from otofx.errors import OTOError, VerificationError
from otofx.passes.nodes import graph_module, mutates_input
from otofx.passes.prune import plan_rows as _plan_rows
from otofx.passes.prune import zero_rows
from otofx.passes.prune import prune as _prune
from otofx.passes.shapes import propagate_shapes as _propagate_shapes
from otofx.passes.zigs import find_zigs as _find_zigs

log = logging.getLogger("otofx")


class PipelineError(OTOError):
    """A pass is missing its input (e.g. prune before plan_zero_rows), returned something that is not
    a State, or left an invalid graph."""


# ---------------------------------------------------------------------------------------------
# Verification helpers (shared with otofx.api)
# ---------------------------------------------------------------------------------------------


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


# NB: contractions (the ops whose reductions change length when rows go) by their op name: fx
# functions and methods, leaf modules, and torch.export's aten overloads ("aten::addmm")
_CONTRACTION = re.compile(r"_*(linear|bilinear|conv\w*|convolution\w*|r?matmul|mm|bmm|addmm|addbmm|baddbmm"
                          r"|einsum|tensordot|\w*scaled_dot_product\w*|\w*attention\w*)_*")
_CONTRACTION_MODULES = (torch.nn.Linear, torch.nn.Bilinear, torch.nn.modules.conv._ConvNd)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype``: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def _contractions_in(module: torch.nn.Module) -> int:
    """How many contractions a leaf module runs in sequence (upper bound: all of them)."""
    if isinstance(module, _CONTRACTION_MODULES):
        return 1
    if isinstance(module, torch.nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return 4  # input projection, q.k, weights.v, output projection
    return sum(1 for m in module.modules() if isinstance(m, _CONTRACTION_MODULES))


def contraction_depth(module: torch.nn.Module) -> int:
    """The most contractions (matmul, linear, conv, attention ...) on one path from input to output.

    From the graph of a GraphModule (longest path, nodes are in topological order); for another
    module, the count of its Linear/Conv layers (an upper bound). At least 1.
    """
    if not isinstance(module, fx.GraphModule):
        return max(1, _contractions_in(module))
    depth: dict = {}
    deepest = 0
    for n in module.graph.nodes:
        d = max((depth[a] for a in n.all_input_nodes), default=0)
        if n.op == "call_module":
            d += _contractions_in(module.get_submodule(n.target))
        elif n.op in ("call_function", "call_method"):
            t = n.target
            name = t if isinstance(t, str) else (t._schema.name.split("::")[-1] if hasattr(t, "_schema")
                                                  else getattr(t, "__name__", ""))
            d += 1 if _CONTRACTION.fullmatch(name) else 0
        depth[n] = d
        deepest = max(deepest, d)
    return max(1, deepest)


def compute_dtype(*modules) -> torch.dtype | None:
    """The least precise floating dtype among the parameters and buffers of ``modules`` (None if none)."""
    worst = None
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and (worst is None or unit_roundoff(t.dtype) > unit_roundoff(worst)):
                worst = t.dtype
    return worst


def fitted_rtol(rtol: float, dtype: torch.dtype | None, depth: int = 1) -> float:
    """The tolerance for outputs computed in ``dtype`` through ``depth`` contractions in sequence.

    ``rtol`` itself for float32 and float64 (and non-floating outputs); for a dtype less precise
    than float32 (float16, bfloat16) ``max(rtol, 2 * u * sqrt(depth))``, ``u`` its unit roundoff.
    See :func:`outputs_close` for why.
    """
    if dtype is None or not dtype.is_floating_point or unit_roundoff(dtype) <= unit_roundoff(torch.float32):
        return rtol
    return max(rtol, 2.0 * unit_roundoff(dtype) * math.sqrt(max(1, depth)))


def outputs_close(a, b, rtol: float = 1e-4, *, dtype: torch.dtype | None = None, depth: int = 1) -> tuple[bool, float]:
    """OTO.md's exactness: max|a - b| <= tol * max(1, max|a|) over every tensor leaf.

    ``tol`` is ``rtol`` (1e-4) for float32/float64 leaves: exact up to float32 reduction order.
    Half precision cannot meet that: a compressed model sums the same non-zero terms as the full
    one, but its contractions are shorter, so the kernels block and order the sums differently and
    an output rounded to bfloat16 (unit roundoff u = 2^-8) or float16 (2^-11) lands one ulp apart now
    and then; later layers carry those flips on. So for a leaf in half precision, or every leaf
    when ``dtype`` (the dtype the model computes in, see :func:`compute_dtype`) is half precision,
    ``tol = max(rtol, 2 * u * sqrt(depth))`` (:func:`fitted_rtol`), ``depth`` the number of
    contractions on the longest path (:func:`contraction_depth`):

    * one rounding of a contraction's output is off by at most u relative, and the differences of
      successive contractions on a path add like a random walk (independent signs): sqrt(depth) u
      is its standard deviation, 2x covers the max over the output elements. Measured on LLaMA
      (1.1B, 22 layers, depth 111: error 0.02 = 0.49 u sqrt(depth); 4 layers: 0.33) and resnet18
      (0.23), float16 0.12-0.40: the bound is 4x above the worst.
    * It still catches wrong rewrites: removing a non-zero row or slicing the wrong indices moves
      the outputs by far more than rounding does (removing the wrong half of each group's rows:
      0.3-1.4 on the same models, against tolerances of 0.02-0.08); an error below the rounding
      noise of the dtype cannot be told from it by any check in that dtype.
    * Checking in float32 instead would need a float32 copy of the weights (2x a bfloat16 model,
      against the memory bound of compress) and graphs captured with their dtype baked in
      (``x.to(torch.bfloat16)`` in an exported graph) would round to half precision anyway.
    """
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    if len(fa) != len(fb):
        return False, float("inf")
    worst, ok = 0.0, True
    for x, y in zip(fa, fb):
        if not isinstance(x, torch.Tensor):
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return False, float("inf")
        if not x.is_floating_point():
            ok &= bool(torch.equal(x, y))
            continue
        tol = fitted_rtol(rtol, dtype if dtype is not None else x.dtype, depth)
        if dtype is not None:
            tol = max(tol, fitted_rtol(rtol, x.dtype, depth))
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, x.double().abs().max().item() if x.numel() else 0.0)
        worst = max(worst, diff / scale)
        ok &= diff <= tol * scale
    return ok, worst


def tf32_in_use(outputs) -> bool:
    """Whether float32 contractions that gave ``outputs`` may have run in TF32: a CUDA tensor among
    them and TF32 allowed for cuDNN convolutions (torch's default) or cuBLAS matrix products."""
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_flatten(outputs)[0]):
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def run_eval(module: torch.nn.Module, args: tuple, kwargs: dict | None = None):
    """``module(*args, **kwargs)`` in eval mode under ``no_grad`` (training flags restored)."""
    with torch.no_grad(), eval_mode(module):
        return module(*args, **(kwargs or {}))


def compare(reference, candidate: torch.nn.Module, args: tuple, kwargs: dict | None, rtol: float, what: str,
            inputs: str = "the example inputs") -> float:
    """Relative error of ``candidate`` against ``reference`` (outputs or a module); raises on a mismatch.

    ``rtol`` holds for float32 models; a model computing in float16/bfloat16 gets the dtype's
    tolerance for its contraction depth (:func:`outputs_close`, :func:`fitted_rtol`). ``inputs``
    names ``args``/``kwargs`` in the error (the example inputs or a second shape).
    """
    ref = run_eval(reference, args, kwargs) if isinstance(reference, torch.nn.Module) else reference
    got = run_eval(candidate, args, kwargs)
    dtype = compute_dtype(reference, candidate)
    name = str(dtype)
    if dtype == torch.float32 and tf32_in_use(got):
        # NB: TF32 rounds the inputs of float32 convolutions and matrix products to a 10-bit
        # mantissa, float16's: the float32 model computes with float16's unit roundoff there
        dtype, name = torch.float16, "float32 with TF32 on CUDA"
    graph = reference if isinstance(reference, fx.GraphModule) else candidate
    depth = contraction_depth(graph) if dtype is not None and fitted_rtol(rtol, dtype) != rtol else 1
    ok, err = outputs_close(ref, got, rtol, dtype=dtype, depth=depth)
    if not ok:
        tol = fitted_rtol(rtol, dtype, depth)
        why = "" if tol == rtol else f" ({name}: 2 * unit roundoff * sqrt({depth} contractions deep))"
        raise VerificationError(
            f"{what} differs from the reference graph on {inputs} (relative error {err:.3g} > {tol:.3g}"
            f"{why}). If the pass is otofx's, this is a bug in otofx: please report it with the model.")
    return err


def input_sets(state: "State") -> list:
    """``(args, kwargs, name)`` of every input set verification runs: the example inputs, then
    ``state.more_inputs`` (the export front-end's second shape: see ``otofx.capture.second_inputs``)."""
    out = [(tuple(state.args), dict(state.kwargs), "the example inputs")]
    for a, k in state.more_inputs:
        out.append((tuple(a), dict(k), f"second-shape inputs ({_shapes(a, k)})"))
    return out


def _shapes(args, kwargs) -> str:
    leaves = tree_flatten((args, kwargs))[0]
    return ", ".join("x".join(map(str, t.shape)) for t in leaves if isinstance(t, torch.Tensor))


def compare_all(reference, candidate: torch.nn.Module, sets: list, rtol: float, what: str) -> float:
    """:func:`compare` on every ``(args, kwargs, name)`` of ``sets`` (``reference``: a module, or
    one output per set); the worst relative error."""
    worst = 0.0
    for i, (a, k, name) in enumerate(sets):
        ref = reference[i] if isinstance(reference, list) else reference
        worst = max(worst, compare(ref, candidate, a, k, rtol, what, name))
    return worst


# ---------------------------------------------------------------------------------------------
# State and records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassRecord:
    """What the runner measured for one pass."""

    name: str
    seconds: float  # the pass alone
    check_seconds: float  # lint and (optional) verification after it
    nodes: int  # graph size after the pass (0 before capture)
    changed: bool  # the pass produced another graph (object or code)
    error: float | None = None  # relative error against the reference, when verified


@dataclass(frozen=True, eq=False)
class State:
    """Everything a pass reads or writes. Build it with ``State(gm=..., args=...)`` or let
    ``Pipeline.run`` build it; change it with ``state.replace(...)``."""

    gm: fx.GraphModule | None = None  # the current graph
    args: tuple = ()  # example inputs (positional)
    kwargs: dict = field(default_factory=dict)  # example inputs (keyword)
    model: torch.nn.Module | None = None  # what Capture reads
    frontend: str | None = None  # which front-end produced gm ("symbolic_trace", "export", "dynamo", ...)
    pin: tuple = ()  # module or parameter names find_zigs keeps whole
    zigset: object | None = None  # ZigSet of the analysed graph
    plan: object | None = None  # Plan of rows to remove
    reference: fx.GraphModule | None = None  # the graph outputs are verified against
    report: str | None = None  # report_pins' table
    records: tuple = ()  # PassRecord per pass run
    more_inputs: tuple = ()  # more (args, kwargs) verification runs: the capture's second shape

    def replace(self, **changes) -> "State":
        return dataclasses.replace(self, **changes)


def _name(p) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _is_analysis(p) -> bool:
    """A pass that only reads the graph (``analysis = True`` on the pass or its function)."""
    return getattr(p, "analysis", False) is True


def _reads_graph(fn: Callable) -> Callable:
    """Mark ``fn`` ``analysis = True``: it reads the graph only (the runner checks it is unchanged)."""
    fn.analysis = True
    return fn


def _need(state: State, attr: str, pass_name: str, producer: str):
    v = getattr(state, attr)
    if v is None:
        raise PipelineError(f"pass '{pass_name}' needs state.{attr}: run '{producer}' before it")
    return v


# ---------------------------------------------------------------------------------------------
# Built-in passes
# ---------------------------------------------------------------------------------------------


class Capture:
    """``state.model`` -> ``state.gm`` with the otofx front-ends (``frontend``: auto, symbolic_trace, export)."""

    name = "capture"
    front_end = True  # its graph comes from fx's tracer or torch.export: linted only when verifying

    def __init__(self, frontend: str = "auto"):
        self.frontend = frontend

    def __call__(self, state: State) -> State:
        model = _need(state, "model", self.name, "Pipeline.run(model, example_inputs)")
        inputs = dict(state.kwargs) if state.kwargs and not state.args else tuple(state.args)
        cap = _capture(model, inputs, self.frontend)
        return state.replace(gm=cap.gm, args=cap.args, kwargs=cap.kwargs, frontend=cap.frontend,
                             more_inputs=cap.more_inputs)


@_reads_graph
def propagate_shapes(state: State) -> State:
    """Annotate every node of ``state.gm`` with ``meta['val']`` from the example inputs (meta tensors)."""
    _propagate_shapes(_need(state, "gm", "propagate_shapes", "capture"), tuple(state.args), dict(state.kwargs))
    return state


@_reads_graph
def find_zigs(state: State) -> State:
    """The zero-invariant groups of ``state.gm`` (needs propagate_shapes); ``state.pin`` stays whole."""
    gm = _need(state, "gm", "find_zigs", "capture")
    if not any("val" in n.meta for n in gm.graph.nodes if n.op != "output"):
        raise PipelineError("pass 'find_zigs' needs shapes on the graph: run 'propagate_shapes' before it")
    zs = _find_zigs(gm, pin=tuple(state.pin))
    log.info("otofx: %d groups, %d rows, %d pins", len(zs.zigs), sum(z.rows for z in zs.zigs), len(zs.pinned))
    return state.replace(zigset=zs)


class _ReportView:
    """What ``otofx.report.report`` reads of an OTO object, built from a State."""

    def __init__(self, state: State, model: torch.nn.Module):
        self.model = model
        self.groups = state.zigset.zigs
        self.pinned = state.zigset.pinned
        self.frontend = state.frontend or "graph"


@_reads_graph
def report_pins(state: State) -> State:
    """The group and pin table of ``state.zigset``: logged at INFO on the ``otofx`` logger, kept in
    ``state.report``."""
    from otofx.report import report

    _need(state, "zigset", "report_pins", "find_zigs")
    text = report(_ReportView(state, _need(state, "gm", "report_pins", "capture")))
    log.info("%s", text)
    return state.replace(report=text)


@_reads_graph
def plan_zero_rows(state: State) -> State:
    """A plan removing every row whose parameter slices in ``state.gm`` are all exactly zero."""
    zs = _need(state, "zigset", "plan_zero_rows", "find_zigs")
    return state.replace(plan=_plan_rows(zs, zero_rows(zs, _need(state, "gm", "plan_zero_rows", "capture"))))


def prune(state: State) -> State:
    """The rewrite: a new GraphModule without ``state.plan``'s rows (``state.gm`` is not modified)."""
    plan = _need(state, "plan", "prune", "plan_zero_rows")
    gm = _need(state, "gm", "prune", "capture")
    log.info("otofx: removing %d rows", plan.count)
    return state.replace(gm=_prune(gm, plan))


def _impure(node: fx.Node) -> bool:
    """fx's notion of impure, plus in-place tensor ops (``x.add_(1)``, ``relu(inplace=True)``)."""
    return node.is_impure() or mutates_input(node)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (node meta copied shallowly: meta tensors and fake values are shared)."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    # NB: a torch.export graph flattens its inputs and outputs through a pytree codegen, which
    # graph_copy does not carry over
    new._codegen = graph._codegen
    return new


def eliminate_dead_code(state: State) -> State:
    """Drop nodes whose values are never used (a new GraphModule sharing ``state.gm``'s modules)."""
    gm = _need(state, "gm", "eliminate_dead_code", "capture")
    # NB: the new GraphModule shares submodules and tensors with the old one (no copy of weights);
    # attributes no longer used stay on the shared modules, harmlessly. It is built before the
    # elimination because fx's purity check of a call_module needs the graph's owning module.
    new = graph_module(gm, copy_graph(gm.graph), type(gm).__name__)
    if not new.graph.eliminate_dead_code(is_impure_node=_impure):
        return state
    new.recompile()
    return state.replace(gm=new)


class Verify:
    """Raise ``VerificationError`` unless ``state.gm`` reproduces ``state.reference`` on the example inputs."""

    name = "verify"

    def __init__(self, rtol: float = 1e-4):
        self.rtol = rtol

    def __call__(self, state: State) -> State:
        ref = _need(state, "reference", self.name, "Pipeline.run (it sets the reference)")
        compare_all(ref, _need(state, "gm", self.name, "capture"), input_sets(state), self.rtol, "the graph")
        return state


class GraphPass:
    """Adapt ``fn(gm) -> GraphModule | PassResult | None`` (None: ``gm`` was edited in place).

    ``fn`` gets a new GraphModule over a copy of ``state.gm``'s graph (submodules and tensors
    shared), so a pass that edits the graph in place leaves the previous state's graph, which may
    be the verification reference, as it was. # NB: a pass that writes into shared weights in
    place (rather than replacing them) changes the reference too; such a pass must copy first.
    """

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or _name(fn)

    def __call__(self, state: State) -> State:
        gm = _need(state, "gm", self.name, "capture")
        work = graph_module(gm, copy_graph(gm.graph), type(gm).__name__)
        out = self.fn(work)
        if out is None:
            work.recompile()
            return state.replace(gm=work)
        return state.replace(gm=_as_gm(out, self.name))


def _as_gm(out, name: str) -> fx.GraphModule:
    gm = getattr(out, "graph_module", out)  # a torch.fx.passes.infra PassResult
    if not isinstance(gm, fx.GraphModule):
        raise PipelineError(f"pass '{name}' returned {type(out).__name__}: a pass returns the State "
                            "(state.replace(...)), a GraphModule, or a PassResult")
    return gm


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def _fingerprint(gm: fx.GraphModule | None, deep: bool):
    """Identity of ``gm``'s graph; ``deep`` also hashes its generated code (in-place graph edits).

    # NB: generating the code costs ~20% of a whole analysis on mobilenet_v3_large, so only runs
    # that verify (and need to know whether a pass changed the graph in place) pay for it
    """
    if gm is None:
        return None
    if not deep:
        return id(gm), id(gm.graph), len(gm.graph.nodes)
    code = gm.graph.python_code("self").src
    return id(gm), hashlib.sha1(code.encode()).hexdigest()


@contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector for a run (refcounting still frees everything else).

    # NB: tracing and analysis allocate many small objects, which trigger collections of the
    # whole heap (torch, the user's model). Measured (process time, median of 10 A/B runs of
    # otofx.OTO, machine loaded by another process): 4% less on mobilenet_v3_large, no change on
    # densenet121, whose young collection when the collector comes back costs what was saved.
    # The run's own cycles (fx nodes and their users) are collected then.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Pipeline:
    """Runs passes in order, with per-pass timing, a graph lint after each, and optional verification.

    ``verify=True`` compares every changed graph with the reference (the first GraphModule of the
    run) on the example inputs, to ``rtol`` (OTO.md's exactness).
    """

    def __init__(self, passes: Iterable[Callable], *, verify: bool = False, rtol: float = 1e-4):
        self.passes = list(passes)
        self.verify = verify
        self.rtol = rtol
        for p in self.passes:
            if not callable(p):
                raise PipelineError(f"pipeline entry {p!r} is not callable: a pass is a function State -> State")

    # -- composition ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [_name(p) for p in self.passes]

    def _index(self, anchor) -> int:
        for i, p in enumerate(self.passes):
            if p is anchor or _name(p) == anchor:
                return i
        raise PipelineError(f"no pass {anchor!r} in the pipeline; it has {self.names}")

    def insert_before(self, anchor, new_pass: Callable) -> "Pipeline":
        """A new Pipeline with ``new_pass`` before ``anchor`` (a pass or its name)."""
        i = self._index(anchor)
        return Pipeline(self.passes[:i] + [new_pass] + self.passes[i:], verify=self.verify, rtol=self.rtol)

    def insert_after(self, anchor, new_pass: Callable) -> "Pipeline":
        """A new Pipeline with ``new_pass`` after ``anchor`` (a pass or its name)."""
        i = self._index(anchor) + 1
        return Pipeline(self.passes[:i] + [new_pass] + self.passes[i:], verify=self.verify, rtol=self.rtol)

    def __add__(self, more: Iterable[Callable]) -> "Pipeline":
        return Pipeline(self.passes + list(more), verify=self.verify, rtol=self.rtol)

    # -- running --------------------------------------------------------------------------------
    def run(self, start, example_inputs=None, **fields) -> State:
        """Run every pass. ``start``: a State, a GraphModule, or a model (for ``Capture``).

        ``example_inputs`` (a tensor, a tuple, or a dict of keyword tensors) and ``fields``
        (``pin=``, ``frontend=`` ...) fill the initial State.
        """
        if isinstance(start, State):
            state = start.replace(**fields) if fields else start
        else:
            if not isinstance(start, torch.nn.Module):
                raise PipelineError(f"Pipeline.run takes a State, a GraphModule or a torch.nn.Module, "
                                    f"got {type(start).__name__}")
            args, kwargs = normalize_inputs(example_inputs if example_inputs is not None else ())
            gm = start if isinstance(start, fx.GraphModule) else None
            state = State(gm=gm, args=args, kwargs=kwargs, model=start, **fields)
        if example_inputs is not None and isinstance(start, State):
            args, kwargs = normalize_inputs(example_inputs)
            state = state.replace(args=args, kwargs=kwargs)
        ref_out = None
        if state.gm is not None and state.reference is None:
            state = state.replace(reference=state.gm)
        if self.verify and state.reference is not None:
            # NB: computed before any pass runs: a pass that edits the reference graph in place
            # must not be able to make its own check pass
            ref_out = [run_eval(state.reference, a, k) for a, k, _ in input_sets(state)]
        with _gc_paused():
            return self._run(state, ref_out)

    def _run(self, state: State, ref_out) -> State:
        for p in self.passes:
            name = _name(p)
            before = _fingerprint(state.gm, self.verify)
            t0 = time.perf_counter()
            out = p(state)
            seconds = time.perf_counter() - t0
            if not isinstance(out, State):
                out = state.replace(gm=_as_gm(out, name))
            state = out
            t1 = time.perf_counter()
            after = _fingerprint(state.gm, self.verify)
            changed = after != before
            err = None
            if state.gm is not None:
                if _is_analysis(p):
                    if changed:
                        raise PipelineError(f"pass '{name}' is marked analysis = True but changed the graph "
                                            "(another GraphModule or another node count); drop the mark")
                elif self.verify or not getattr(p, "front_end", False):
                    try:
                        state.gm.graph.lint()
                    except Exception as e:  # noqa: BLE001 - any lint failure is the pass's fault
                        raise PipelineError(f"pass '{name}' left an invalid graph: {type(e).__name__}: {e}") from e
                if state.reference is None:  # the first graph of the run (Capture's)
                    state = state.replace(reference=state.gm)
                    if self.verify:
                        ref_out = [run_eval(state.reference, a, k) for a, k, _ in input_sets(state)]
                elif self.verify and changed:
                    err = compare_all(ref_out, state.gm, input_sets(state), self.rtol,
                                      f"the graph after pass '{name}'")
            rec = PassRecord(name, seconds, time.perf_counter() - t1,
                             len(state.gm.graph.nodes) if state.gm is not None else 0, changed, err)
            log.debug("otofx pass %s: %.3f s, %d nodes%s", name, seconds, rec.nodes,
                      f", error {err:.2g}" if err is not None else "")
            state = state.replace(records=state.records + (rec,))
        return state


def format_records(records: Iterable[PassRecord]) -> str:
    """A table of per-pass timings (the reporting edge: tabulate is imported here only)."""
    from tabulate import tabulate

    rows = [[r.name, f"{r.seconds * 1e3:.1f}", f"{r.check_seconds * 1e3:.1f}", r.nodes, "yes" if r.changed else "",
             "" if r.error is None else f"{r.error:.2g}"] for r in records]
    return tabulate(rows, headers=["pass", "ms", "check ms", "nodes", "changed", "rel. error"], tablefmt="github")


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


__all__ = ["State", "PassRecord", "Pipeline", "PipelineError", "Capture", "propagate_shapes", "find_zigs",
           "report_pins", "plan_zero_rows", "zero_rows", "prune", "eliminate_dead_code", "Verify", "GraphPass", "copy_graph",
           "format_records", "analysis", "compression", "default", "eval_mode", "outputs_close", "compare",
           "run_eval", "tf32_in_use", "fitted_rtol", "contraction_depth", "compute_dtype", "unit_roundoff", "compare_all", "input_sets"]
