"""The otofx pipeline: composable passes over a GraphModule, run with timing and checks.

A pass is any callable ``State -> State``. It declares what it reads and writes (its *contract*:
``reads``/``writes``, tuples of :class:`Key`), and the runner checks the contract: a pass whose
input nobody produced raises a ``PipelineError`` naming the pass that produces it, before any pass
runs. The passes every method shares, with their contracts::

    Capture(frontend)    model -> GraphModule          reads MODEL;            writes GRAPH
    propagate_shapes     meta shapes on every node     reads GRAPH             (node.meta["val"])
    eliminate_dead_code  cleanup                       reads GRAPH;            writes GRAPH
    Verify(rtol)         outputs equal the reference   reads GRAPH, REFERENCE  (raises VerificationError)

OTO's passes (``find_zigs``, ``report_pins``, ``plan_zero_rows``, ``prune``), its keys (``PIN``, ``FREE``,
``ZIGSET``, ``PLAN``, ``REPORT``) and standard pipelines (``analysis``, ``compression``,
``default``) live in :mod:`otofx.oto_passes` and are re-exported here under the same names.

``Pipeline(passes, verify=False).run(model_or_gm, example_inputs)`` runs them in order and returns
the final :class:`State`; ``state.records`` holds one :class:`PassRecord` (name, seconds, graph
size, relative error) per pass, and :func:`format_records` turns them into a table. A user pass is
just another callable in the list (``@contract(reads=..., writes=...)`` declares its contract);
:class:`GraphPass` adapts a ``GraphModule -> GraphModule`` function
(``torch.fx.experimental.optimization.fuse`` folds BN into conv) or a ``torch.fx.passes.infra``
pass that returns a ``PassResult``. ``otofx.backend.pipeline()`` is the list the ``torch.compile``
backend runs. Verification helpers live in :mod:`otofx.verify` (re-exported here).

Analysis results live in a typed store, not in ``State`` fields: ``state.get(ZIGSET)``,
``state.put(PLAN, plan)``. A :class:`Key` carries the result's name, type and producing pass, so a
method (SCOP, SLB, JointRD, ADMM ...) declares its own keys and passes without editing ``State``.
``State`` itself holds only what every method shares: the graph, the example inputs, the model,
the front-end's name, the verification reference, the records.

Internals:
    * ``State`` is a frozen dataclass; passes return ``state.replace(...)`` or ``state.put(...)``.
      A pass may also return a bare ``GraphModule`` or a ``PassResult``; the runner turns either
      into ``state.replace(gm=...)``. Anything else is a ``PipelineError`` naming the pass.
    * Contracts: before the run, the runner walks the passes with the keys the initial state has
      and each contracted pass's ``writes``; a pass reading a key that is neither there nor written
      by an earlier pass raises at once (nothing has run). A pass without a contract may read or
      write anything, so the walk stops checking after it; each pass's ``reads`` is checked again
      just before it runs. After a contracted pass, every store key it changed must be in its
      ``writes``, and every key in its ``writes`` must be present.
    * Keys are compared by identity and registered by name (a second key of the same name
      raises). ``State.replace(pin=...)`` puts a key's result by its name; the read-only
      ``zigset``/``plan``/``pin``/``report`` properties read OTO's keys, kept for code written
      before the store.
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
    * A free output (``free_outputs``) of a pruned graph is compared on the positions the state's
      plan keeps (:func:`output_keep`).
    * Verification runs every input set of :func:`otofx.verify.input_sets`: the example inputs
      and ``state.more_inputs`` (the export front-end's second shape: batch + 1 and length + 1
      along the dimensions it made dynamic, the example tiled to those sizes).
    * ``torch.fx.passes.infra.pass_manager.PassManager`` runs ``GraphModule -> PassResult``
      passes only; otofx's analysis passes produce data (groups, plans), so this runner carries a
      State instead, and accepts PassManager-style passes through ``GraphPass``.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Generic, Iterable, TypeVar

import torch
import torch.fx as fx

from otofx.capture import capture as _capture
from otofx.capture import normalize_inputs
from otofx.errors import OTOError
from otofx.fxcompat import copy_graph, graph_module_like
from otofx.passes.nodes import impure
from otofx.passes.shapes import annotate_shapes
from otofx.verify import (compare, compare_all, compute_dtype, contraction_depth, eval_mode, fitted_rtol, input_sets,
                          outputs_close, run_eval, tf32_in_use, unit_roundoff)

log = logging.getLogger("otofx")

T = TypeVar("T")


class PipelineError(OTOError):
    """A pass is missing its input (e.g. prune before plan_zero_rows), broke its contract, returned
    something that is not a State, or left an invalid graph."""


# ---------------------------------------------------------------------------------------------
# Typed keys and the State
# ---------------------------------------------------------------------------------------------

_KEYS: dict = {}  # name -> Key
_MISSING = object()


@dataclass(frozen=True, eq=False)
class Key(Generic[T]):
    """A named, typed slot of the State: one analysis result, or one of the State's own fields.

    ``type``: what ``state.put`` accepts (a type or a tuple of types). ``producer``: the pass that
    writes it (named in the error when a pass needs it first). ``default``: what ``state.get``
    gives when nothing was written (a key with a default is never missing). Keys compare by
    identity; their names are unique (a second key of the same name raises ``ValueError``).
    """

    name: str
    type: type | tuple
    producer: str
    doc: str = ""
    default: object = _MISSING
    field: bool = False  # a State field (gm, model, reference), not a store entry

    def __post_init__(self):
        if self.name in _KEYS:
            raise ValueError(f"a key named {self.name!r} exists already ({_KEYS[self.name]!r}); pick another name")
        _KEYS[self.name] = self

    def __repr__(self) -> str:
        t = self.type.__name__ if isinstance(self.type, type) else "|".join(x.__name__ for x in self.type)
        return f"Key({self.name!r}: {t}, from {self.producer!r})"


# what every method shares: State fields, readable as keys in contracts
GRAPH = Key("gm", fx.GraphModule, "capture", "the current graph", field=True)
MODEL = Key("model", torch.nn.Module, "Pipeline.run(model, example_inputs)", "what Capture reads", field=True)
REFERENCE = Key("reference", fx.GraphModule, "Pipeline.run (it sets the reference)",
                "the graph outputs are verified against", field=True)


@dataclass(frozen=True, eq=False)
class State:
    """Everything a pass reads or writes. Build it with ``State(gm=..., args=...)`` or let
    ``Pipeline.run`` build it; change it with ``state.replace(...)`` (fields) or
    ``state.put(key, value)`` (analysis results); read results with ``state.get(key)``."""

    gm: fx.GraphModule | None = None  # the current graph
    args: tuple = ()  # example inputs (positional)
    kwargs: dict = field(default_factory=dict)  # example inputs (keyword)
    model: torch.nn.Module | None = None  # what Capture reads
    frontend: str | None = None  # which front-end produced gm ("symbolic_trace", "export", "dynamo", ...)
    reference: fx.GraphModule | None = None  # the graph outputs are verified against
    records: tuple = ()  # PassRecord per pass run
    more_inputs: tuple = ()  # more (args, kwargs) verification runs: the capture's second shape
    results: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # Key -> value

    # -- the store ------------------------------------------------------------------------------
    def has(self, key: Key) -> bool:
        """Whether ``key`` has a value (written, a non-None field, or a default)."""
        if key.field:
            return getattr(self, key.name) is not None
        return key in self.results or key.default is not _MISSING

    def get(self, key: Key[T], default=_MISSING) -> T:
        """``key``'s value; ``default`` (else the key's own default, else ``None``) when there is none."""
        if key.field:
            v = getattr(self, key.name)
            return v if v is not None or default is _MISSING else default
        if key in self.results:
            return self.results[key]
        if default is not _MISSING:
            return default
        return None if key.default is _MISSING else key.default

    def put(self, key: Key[T], value: T) -> "State":
        """A new State with ``value`` under ``key`` (checked against ``key.type``)."""
        if not isinstance(value, key.type):
            raise PipelineError(f"state.put({key.name!r}, ...): got a {type(value).__name__}, the key holds "
                                f"{key!r}")
        if key.field:
            return dataclasses.replace(self, **{key.name: value})
        return dataclasses.replace(self, results=MappingProxyType({**self.results, key: value}))

    def replace(self, **changes) -> "State":
        """A new State with fields changed; a registered key's name (``pin=``, ``zigset=`` ...) puts
        that result."""
        fields = {k: v for k, v in changes.items() if k in _FIELDS}
        state = dataclasses.replace(self, **fields) if fields else self
        for name in changes.keys() - fields.keys():
            key = _KEYS.get(name)
            if key is None:
                raise PipelineError(f"state.replace({name}=...): State has no field {name!r} and no key of that "
                                    f"name is registered; fields: {sorted(_FIELDS)}")
            state = state.put(key, changes[name])
        return state

    # -- OTO's results by name (read-only; kept for code written before the store) ----------------
    # NB: looked up by name: the core does not import a method (otofx.oto_passes declares these keys)
    @property
    def zigset(self):
        return self.get(_KEYS["zigset"])

    @property
    def plan(self):
        return self.get(_KEYS["plan"])

    @property
    def pin(self) -> tuple:
        return self.get(_KEYS["pin"])

    @property
    def report(self) -> str | None:
        return self.get(_KEYS["report"])


_FIELDS = frozenset(f.name for f in dataclasses.fields(State))


@dataclass(frozen=True)
class PassRecord:
    """What the runner measured for one pass."""

    name: str
    seconds: float  # the pass alone
    check_seconds: float  # lint and (optional) verification after it
    nodes: int  # graph size after the pass (0 before capture)
    changed: bool  # the pass produced another graph (object or code)
    error: float | None = None  # relative error against the reference, when verified


# ---------------------------------------------------------------------------------------------
# Contracts
# ---------------------------------------------------------------------------------------------


def contract(*, reads: tuple = (), writes: tuple = (), analysis: bool = False) -> Callable:
    """Declare a pass's contract: the keys it ``reads`` and ``writes``; ``analysis=True``: it only
    reads the graph (the runner checks it left the same one)."""
    for k in tuple(reads) + tuple(writes):
        if not isinstance(k, Key):
            raise PipelineError(f"contract: {k!r} is not a Key (otofx.pipeline.Key)")

    def deco(p):
        p.reads, p.writes = tuple(reads), tuple(writes)
        if analysis:
            p.analysis = True
        return p

    return deco


def _name(p) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _is_analysis(p) -> bool:
    """A pass that only reads the graph (``analysis = True`` on the pass or its function)."""
    return getattr(p, "analysis", False) is True


def _has_contract(p) -> bool:
    return hasattr(p, "reads") and hasattr(p, "writes")


def _missing(pass_name: str, key: Key, later: str | None = None) -> PipelineError:
    where = (f" ('{later}' runs after it in this pipeline: move it before)" if later
             else "" if key.producer.startswith("Pipeline.run") else " (no pass of this pipeline produces it)")
    return PipelineError(f"pass '{pass_name}' needs state.{key.name}: run '{key.producer}' before it{where}")


# ---------------------------------------------------------------------------------------------
# Built-in passes
# ---------------------------------------------------------------------------------------------


class Capture:
    """``state.model`` -> ``state.gm`` with the otofx front-ends (``frontend``: auto, symbolic_trace,
    export, dynamo). Each gives the same IR (``otofx.capture``, ``otofx.capture_dynamo``)."""

    name = "capture"
    front_end = True  # its graph comes from fx's tracer, torch.export or dynamo: linted only when verifying
    reads = (MODEL,)
    writes = (GRAPH,)

    def __init__(self, frontend: str = "auto"):
        self.frontend = frontend

    def __call__(self, state: State) -> State:
        model = state.model
        inputs = dict(state.kwargs) if state.kwargs and not state.args else tuple(state.args)
        if self.frontend == "dynamo":
            from otofx.capture_dynamo import capture as capture_dynamo

            cap = capture_dynamo(model, inputs)
        else:
            cap = _capture(model, inputs, self.frontend)
        return state.replace(gm=cap.gm, args=cap.args, kwargs=cap.kwargs, frontend=cap.frontend,
                             more_inputs=cap.more_inputs)


@contract(reads=(GRAPH,), analysis=True)
def propagate_shapes(state: State) -> State:
    """Annotate every node of ``state.gm`` with ``meta['val']`` from the example inputs (meta tensors)."""
    annotate_shapes(state.gm, tuple(state.args), dict(state.kwargs))
    return state


@contract(reads=(GRAPH,), writes=(GRAPH,))
def eliminate_dead_code(state: State) -> State:
    """Drop nodes whose values are never used (a new GraphModule sharing ``state.gm``'s modules)."""
    gm = state.gm
    # NB: the new GraphModule shares submodules and tensors with the old one (no copy of weights);
    # attributes no longer used stay on the shared modules, harmlessly. It is built before the
    # elimination because fx's purity check of a call_module needs the graph's owning module.
    new = working_copy(gm)
    if not new.graph.eliminate_dead_code(is_impure_node=impure):
        return state
    new.recompile()
    return state.replace(gm=new)


class Verify:
    """Raise ``VerificationError`` unless ``state.gm`` reproduces ``state.reference`` on the example inputs."""

    name = "verify"
    reads = (GRAPH, REFERENCE)
    writes = ()

    def __init__(self, rtol: float = 1e-4):
        self.rtol = rtol

    def __call__(self, state: State) -> State:
        compare_all(state.reference, state.gm, input_sets(state), self.rtol, "the graph", output_keep(state))
        return state


def output_keep(state: State) -> dict | None:
    """The kept positions of the free outputs under the state's plan (``passes.prune.output_keeps``:
    a pruned graph returns them narrower), or None when there is no plan or no free output."""
    key = _KEYS.get("plan")
    plan = state.get(key) if key is not None else None
    if plan is None or not plan.zigset.free_outputs:
        return None
    from otofx.passes.prune import output_keeps

    return output_keeps(plan)


class GraphPass:
    """Adapt ``fn(gm) -> GraphModule | PassResult | None`` (None: ``gm`` was edited in place).

    ``fn`` gets a new GraphModule over a copy of ``state.gm``'s graph (submodules and tensors
    shared), so a pass that edits the graph in place leaves the previous state's graph, which may
    be the verification reference, as it was. # NB: a pass that writes into shared weights in
    place (rather than replacing them) changes the reference too; such a pass must copy first.
    """

    reads = (GRAPH,)
    writes = (GRAPH,)

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or _name(fn)

    def __call__(self, state: State) -> State:
        work = working_copy(state.gm)
        out = self.fn(work)
        if out is None:
            work.recompile()
            return state.replace(gm=work)
        return state.replace(gm=_as_gm(out, self.name))


def working_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its submodules and tensors: a pass
    edits it (nodes, new top-level attributes) and leaves ``gm``, maybe the verification reference,
    as it was. # NB: a shared submodule or tensor must be replaced, not changed in place."""
    return graph_module_like(gm, copy_graph(gm.graph), type(gm).__name__)


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
            state = State(gm=gm, args=args, kwargs=kwargs, model=start).replace(**fields)
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

    def check(self, state: State) -> None:
        """Raise ``PipelineError`` if a pass reads a key that neither ``state`` has nor an earlier
        pass writes (after a pass without a contract, which may write anything, nothing is known)."""
        have = {k for k in _KEYS.values() if state.has(k)}
        for i, p in enumerate(self.passes):
            if not _has_contract(p):
                return
            if GRAPH in have:
                have.add(REFERENCE)  # the runner sets it from the first graph
            for key in p.reads:
                if key not in have:
                    later = next((_name(q) for q in self.passes[i + 1:] if key in getattr(q, "writes", ())), None)
                    raise _missing(_name(p), key, later)
            have.update(p.writes)

    def _run(self, state: State, ref_out) -> State:
        self.check(state)
        for p in self.passes:
            name = _name(p)
            contracted = _has_contract(p)
            for key in getattr(p, "reads", ()):
                if not state.has(key):
                    raise _missing(name, key)
            before = _fingerprint(state.gm, self.verify)
            t0 = time.perf_counter()
            out = p(state)
            seconds = time.perf_counter() - t0
            if not isinstance(out, State):
                out = state.replace(gm=_as_gm(out, name))
            if contracted:
                _check_writes(p, name, state, out)
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
                                      f"the graph after pass '{name}'", output_keep(state), state.reference)
            rec = PassRecord(name, seconds, time.perf_counter() - t1,
                             len(state.gm.graph.nodes) if state.gm is not None else 0, changed, err)
            log.debug("otofx pass %s: %.3f s, %d nodes%s", name, seconds, rec.nodes,
                      f", error {err:.2g}" if err is not None else "")
            state = state.replace(records=state.records + (rec,))
        return state




def _check_writes(p, name: str, before: State, after: State) -> None:
    """A contracted pass wrote exactly what it declares: every key it changed is in ``writes``, and
    every store key in ``writes`` is there."""
    writes = set(p.writes)
    for key, value in after.results.items():
        if key not in writes and before.results.get(key, _MISSING) is not value:
            raise PipelineError(f"pass '{name}' wrote state.{key.name} but its contract does not declare it "
                                f"(writes={tuple(k.name for k in p.writes)})")
    for key in writes:
        if not after.has(key):
            raise PipelineError(f"pass '{name}' declares it writes state.{key.name} but did not")


def format_records(records: Iterable[PassRecord]) -> str:
    """A table of per-pass timings (the reporting edge: tabulate is imported here only)."""
    from tabulate import tabulate

    rows = [[r.name, f"{r.seconds * 1e3:.1f}", f"{r.check_seconds * 1e3:.1f}", r.nodes, "yes" if r.changed else "",
             "" if r.error is None else f"{r.error:.2g}"] for r in records]
    return tabulate(rows, headers=["pass", "ms", "check ms", "nodes", "changed", "rel. error"], tablefmt="github")


# OTO's keys, passes and standard pipelines (their home: otofx.oto_passes), under their names here too
# NB: imported last: otofx.oto_passes builds on the names above
from otofx.oto_passes import (FREE, PIN, PLAN, REPORT, ZIGSET, analysis, compression, default, find_zigs,  # noqa: E402
                              plan_zero_rows, prune, report_pins, zero_rows)

__all__ = ["State", "Key", "contract", "GRAPH", "MODEL", "REFERENCE", "PIN", "FREE", "ZIGSET", "PLAN", "REPORT",
           "PassRecord", "Pipeline", "PipelineError", "Capture", "propagate_shapes", "find_zigs", "report_pins",
           "plan_zero_rows", "output_keep",
           "zero_rows", "prune", "eliminate_dead_code", "Verify", "GraphPass", "working_copy", "copy_graph", "format_records",
           "analysis", "compression", "default",
           # verification, re-exported from otofx.verify (its home) for code written before it
           "eval_mode", "outputs_close", "compare", "run_eval", "tf32_in_use", "fitted_rtol", "contraction_depth",
           "compute_dtype", "unit_roundoff", "compare_all", "input_sets"]
