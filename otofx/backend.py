"""``torch.compile(model, backend="otofx")``: run the compressed model without calling ``compress()``.

For every graph dynamo captures, the backend lifts the module state (parameters and buffers) into
the graph, finds the zero-invariant groups, removes every row whose parameters are *currently* all
zero, checks the smaller graph against the original on the example inputs, and hands it to an
inner compiler (inductor by default)::

    small = torch.compile(model.eval(), backend="otofx")            # after DHSPG training
    with torch.inference_mode():
        y = small(x)                                                 # the compressed model's speed
    torch.compile(model, backend="otofx", options={"inner": "aot_eager", "report": True})

Options (``options={...}``): ``inner`` (a backend name or a compiler callable; default
``"inductor"``), ``report`` (log the group table at INFO on the ``otofx`` logger), ``verify``
(default True), ``rtol`` (1e-4), ``pin`` (parameter or module names kept whole, e.g.
``("layer4.1.conv2",)``), ``pipeline`` (a :class:`otofx.pipeline.Pipeline` replacing
:func:`pipeline`'s passes), ``on_change`` (``"recompile"`` or ``"dense"``: what a call does once
the weights have changed since compile). ``mode=`` is passed on to inductor.

When is a graph pruned? Only an inference graph: autograd off (``torch.no_grad()`` or
``torch.inference_mode()``) or no state tensor requiring grad, no op in training mode, no state
tensor written by the graph. Any other graph, and a graph with no zero row, goes to the inner
compiler as dynamo gave it (parameters stay inputs, nothing is frozen). :func:`results` tells
which fragments were pruned and why not.

Stale weights. A pruned graph holds *copies* of the sliced weights as constants, so it is right
only for the weights it was built from. The callable returned to dynamo therefore checks, on
every call, that every state tensor is the same object, at the same address, with the same
version counter as at compile time (0.3-1 us per tensor; mobilenet_v2 has 262); when one
differs it rebuilds the pruned graph from the current weights and compiles it again
(``on_change="recompile"``), or switches for good to the dense graph (``on_change="dense"``). In-place updates under
``torch.no_grad()`` (optimizer steps, ``load_state_dict``, ``p.mul_()``) bump the version
counter; # NB: writes through ``p.data[...] = ...`` do not, and are not seen: call
``torch._dynamo.reset()`` after them.

Internals:
    * The dynamo front-end (``otofx.capture_dynamo``) lifts each graph's parameter and buffer
      placeholders into ``get_attr`` nodes named as in the model and puts inlined
      ``nn.MultiheadAttention`` calls back as modules (:func:`attention_modules`, the first pass
      of :func:`pipeline`), so the passes see the graph the other front-ends give.
    * Fragments of a graph break see each other only through graph inputs and outputs, which
      ``find_zigs`` pins (non-parameter placeholders and outputs): a channel that crosses a
      fragment boundary is never removed.
    * The graph handed to the inner compiler has the pruned tensors as attributes and only the
      non-state placeholders as inputs; node meta is cleared (the analysis' meta-device values
      must not reach inductor's passes).
    * dynamo's and inductor's private names (backend registry, mode options, freezing flag) are
      read through ``otofx.fxcompat``.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from otofx import fxcompat
from otofx import pipeline as P
from otofx.capture_dynamo import _KEEP_META, Lifted, lift, restore_attention, state_names
from otofx.errors import InputError, OTOError, VerificationError
from otofx.fxcompat import FakeTensor
from otofx.passes.nodes import impure
from otofx.verify import compare, run_eval

log = logging.getLogger("otofx")

NAME = "otofx"
ON_CHANGE = ("recompile", "dense")


# ---------------------------------------------------------------------------------------------
# Options and results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The backend's options (``torch.compile(..., options={...})``); see the module docstring."""

    inner: object = "inductor"
    report: bool = False
    verify: bool = True
    rtol: float = 1e-4
    pin: tuple = ()
    pipeline: P.Pipeline | None = None
    on_change: str = "recompile"
    mode: str | None = None  # torch.compile's mode=, passed to inductor

    @classmethod
    def parse(cls, options: dict | None, mode: str | None = None) -> "Options":
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__ if f != "mode"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"torch.compile(backend='otofx', options=...): unknown option(s) {unknown}; "
                             f"the otofx backend takes {sorted(known)}")
        opts = cls(**options, mode=mode)
        if not (isinstance(opts.inner, str) or callable(opts.inner)):
            raise InputError(f"options['inner']={opts.inner!r}: give a backend name ('inductor', 'eager', "
                             "'aot_eager', ...) or a compiler callable (gm, example_inputs) -> callable")
        if opts.on_change not in ON_CHANGE:
            raise InputError(f"options['on_change']={opts.on_change!r}: choose one of {ON_CHANGE}")
        if opts.pipeline is not None and not isinstance(opts.pipeline, P.Pipeline):
            raise InputError(f"options['pipeline'] is a {type(opts.pipeline).__name__}; give an "
                             "otofx.pipeline.Pipeline, e.g. otofx.backend.pipeline().insert_after(...)")
        pin = (opts.pin,) if isinstance(opts.pin, str) else tuple(opts.pin)
        return cls(**{**opts.__dict__, "pin": pin})


@dataclass(frozen=True)
class FragmentResult:
    """What the backend did with one captured graph (a fragment, when the model has graph breaks)."""

    fragment: int  # running number, in compile order
    pruned: bool  # a smaller graph went to the inner compiler
    reason: str  # why not, or what was removed
    groups: int = 0
    rows_removed: int = 0
    params_before: int = 0  # elements of the graph's parameters
    params_after: int = 0
    seconds: float = 0.0  # otofx's passes (the inner compiler not included)
    error: float | None = None  # relative error of the verification
    lifted: int = 0  # parameter/buffer placeholders turned into get_attr
    attrs: int = 0  # tensors the graph already read through get_attr (freezing)
    records: tuple = field(default=(), repr=False)  # PassRecord per pass


_RESULTS: collections.deque = collections.deque(maxlen=256)
_COUNTER = itertools.count()


def results() -> tuple:
    """The :class:`FragmentResult` of the most recent compilations (at most 256), oldest first."""
    return tuple(_RESULTS)


def clear_results() -> None:
    _RESULTS.clear()


# ---------------------------------------------------------------------------------------------
# Passes of the backend pipeline
# ---------------------------------------------------------------------------------------------


@P.contract(reads=(P.GRAPH,), writes=(P.GRAPH,))
def attention_modules(state: P.State) -> P.State:
    """``F.multi_head_attention_forward`` over get_attr weights -> a call of ``nn.MultiheadAttention``
    (the dynamo front-end's normalisation: ``otofx.capture_dynamo.restore_attention``)."""
    gm = restore_attention(state.gm)
    return state if gm is state.gm else state.replace(gm=gm)


def pipeline(*, report: bool = False) -> P.Pipeline:
    """The backend's passes over a lifted graph: attention_modules, propagate_shapes, find_zigs,
    [report_pins,] plan_zero_rows, prune, eliminate_dead_code. (The backend verifies the result
    itself, whatever the pipeline.)

    Pass a modified copy as ``options={"pipeline": ...}``, e.g. ``pipeline().insert_after(
    "eliminate_dead_code", otofx.pipeline.GraphPass(torch.fx.experimental.optimization.fuse))``.
    """
    passes = [attention_modules, P.propagate_shapes, P.find_zigs] + ([P.report_pins] if report else [])
    passes += [P.plan_zero_rows, P.prune, P.eliminate_dead_code]
    return P.Pipeline(passes)


# ---------------------------------------------------------------------------------------------
# When not to prune
# ---------------------------------------------------------------------------------------------

_SIGNATURES: dict = {}


def _bound(node: fx.Node) -> dict:
    """``node``'s arguments by parameter name, for Python-level functions (``F.batch_norm``...)."""
    t = node.target
    if t not in _SIGNATURES:
        try:
            _SIGNATURES[t] = inspect.signature(t)
        except (TypeError, ValueError):
            _SIGNATURES[t] = None
    sig = _SIGNATURES[t]
    if sig is None:
        return dict(node.kwargs)
    try:
        bound = sig.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except TypeError:
        return dict(node.kwargs)


def _writes(node: fx.Node) -> list:
    """The nodes ``node`` writes in place (its first argument for in-place ops)."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return []
    return [node.args[0]] if impure(node) and isinstance(node.args[0], fx.Node) else []


def why_dense(lifted: Lifted) -> str | None:
    """Why this graph must not be pruned (a training graph, state written in place...), or None."""
    if not lifted.watched:
        return "no parameters or buffers in this graph"
    meta = next((t for _, t in lifted.watched if t.device.type == "meta"), None)
    if meta is not None:
        return "the parameters are on the meta device (no values to find zero rows in)"
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in lifted.watched):
        return ("autograd is on and parameters require grad (a training graph); call the compiled model "
                "under torch.inference_mode() or torch.no_grad() (or model.requires_grad_(False)) to prune")
    nodes = lifted.gm.graph.nodes
    for node in nodes:
        if node.op == "call_function" and _bound(node).get("training") is True:
            return (f"node '{node.name}' ({getattr(node.target, '__name__', node.target)}) runs in training "
                    "mode; call model.eval() to prune")
    state_nodes = {n for n in nodes if n.op == "get_attr"}
    for node in nodes:
        if any(w in state_nodes for w in _writes(node)):
            return f"node '{node.name}' writes the parameter or buffer '{node.args[0].target}' in place"
    return None


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def _inner_compiler(opts: Options) -> Callable:
    inner = opts.inner
    if callable(inner):
        return inner
    if inner == NAME:
        raise InputError("options['inner']='otofx' would prune twice; name another backend")
    fn = fxcompat.lookup_backend(inner)
    if inner == "inductor" and opts.mode not in (None, "default"):
        patches = fxcompat.inductor_mode_options(opts.mode)
        return lambda gm, ex: fn(gm, ex, config_patches=patches)
    return fn


def _numel(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


class Compiled:
    """The callable dynamo gets: the pruned graph, guarded against weight changes (or the dense one)."""

    def __init__(self, fragment: "_Fragment"):
        self._fragment = fragment
        self._fn: Callable | None = None
        self._take = None  # itemgetter of the non-state inputs; None: pass every argument
        self._watch_pos: tuple = ()  # positions of placeholder state
        self._watch_args: tuple = ()  # the tensors at those positions at compile time
        self._watch_all: tuple = ()  # every watched tensor (placeholder and get_attr state)
        self._stamp: tuple = ()
        self.rebuilds = 0

    @staticmethod
    def _stamp_of(tensors) -> tuple:
        return tuple(map(operator.attrgetter("_version"), tensors)) + tuple(map(torch.Tensor.data_ptr, tensors))

    def _set_dense(self, fn: Callable) -> None:
        # NB: a backend's callable takes dynamo's arguments unboxed (*args), whatever _boxed_call says
        self._fn, self._take, self._watch_all = fn, None, ()

    def _set_pruned(self, fn: Callable, lifted: Lifted) -> None:
        self._fn = fn
        idx = lifted.inputs
        self._take = (lambda args: ()) if not idx else (
            (lambda args, i=idx[0]: (args[i],)) if len(idx) == 1 else operator.itemgetter(*idx))
        pos = tuple(p for p, _ in lifted.watched if p is not None)
        self._watch_pos = pos
        self._watch_args = tuple(t for p, t in lifted.watched if p is not None)
        self._watch_all = tuple(t for _, t in lifted.watched)
        self._stamp = self._stamp_of(self._watch_all)

    def fresh(self, args) -> bool:
        """Whether the state in ``args`` (and the graph's attributes) is what the pruned graph was built from."""
        if not self._watch_all:
            return True
        current = tuple(args[i] for i in self._watch_pos)
        if not all(map(operator.is_, current, self._watch_args)):
            return False
        return self._stamp_of(self._watch_all) == self._stamp

    def __call__(self, *args):
        if self._take is None:
            return self._fn(*args)
        if not self.fresh(args):
            self._fragment.on_change(self, list(args))
            if self._take is None:
                return self._fn(*args)
        return self._fn(*self._take(args))


class _Fragment:
    """One captured graph: lifts, prunes, compiles, and rebuilds on a weight change."""

    def __init__(self, gm: fx.GraphModule, opts: Options):
        self.gm, self.opts = gm, opts
        self.number = next(_COUNTER)
        self.inner = _inner_compiler(opts)
        self.names: tuple | None = None  # state_names, read at the first build
        self._freezing = fxcompat.inductor_freezing()

    def compile(self, example_inputs: list) -> Compiled:
        out = Compiled(self)
        self._build(out, example_inputs)
        return out

    def _dense(self, out: Compiled, example_inputs: list, result: FragmentResult) -> None:
        _record(result)
        out._set_dense(self._inner(self.gm, example_inputs))

    def _inner(self, gm: fx.GraphModule, example_inputs: list):
        if self._freezing is None:
            return self.inner(gm, example_inputs)
        # NB: a rebuild runs at call time, outside the torch._inductor.config.patch() of the compile
        with fxcompat.inductor_config().patch(freezing=self._freezing):
            return self.inner(gm, example_inputs)

    def _build(self, out: Compiled, example_inputs: list) -> None:
        t0 = time.perf_counter()
        if any(isinstance(e, FakeTensor) for e in example_inputs):  # no values to read zero rows from
            self._dense(out, example_inputs, FragmentResult(self.number, False, "the example inputs are fake tensors"))
            return
        symbolic = example_inputs
        example_inputs = _concrete(example_inputs)
        if example_inputs is None:
            self._dense(out, symbolic, FragmentResult(self.number, False, "a symbolic size has no example value"))
            return
        if self.names is None:
            self.names = state_names(self.gm, example_inputs)
        lifted = lift(self.gm, example_inputs, self.names)
        reason = why_dense(lifted)
        if reason is not None:
            self._dense(out, symbolic, FragmentResult(self.number, False, reason))
            return
        args = tuple(example_inputs[i] for i in lifted.inputs)
        passes = self.opts.pipeline or pipeline(report=self.opts.report)
        try:
            with torch.no_grad():
                state = passes.run(lifted.gm, args, pin=_present(lifted.gm, self.opts.pin), frontend="dynamo")
        except (VerificationError, InputError):
            raise
        except OTOError as e:  # an analysis that cannot handle this graph: run it unpruned
            log.warning("otofx: fragment %d: not pruned: %s: %s", self.number, type(e).__name__, e)
            self._dense(out, symbolic, FragmentResult(self.number, False, f"{type(e).__name__}: {e}"))
            return
        small = state.gm
        zigset, plan = state.get(P.ZIGSET), state.get(P.PLAN)
        groups = len(zigset.zigs) if zigset is not None else 0
        removed = plan.count if plan is not None else 0
        before = _numel(lifted.gm)
        lifted_n = sum(p is not None for p, _ in lifted.watched)
        attrs_n = len(lifted.watched) - lifted_n
        nothing = plan is not None and removed == 0 and self.opts.pipeline is None
        if nothing or small is lifted.gm or (_same_code(small, lifted.gm) and _numel(small) == before):
            why = "no row is all zero" if plan is not None else "the pipeline left the graph as it was"
            self._dense(out, symbolic, FragmentResult(self.number, False, why, groups, 0, before, before,
                                                            time.perf_counter() - t0, None, lifted_n, attrs_n,
                                                            state.records))
            return
        err = None
        if self.opts.verify:
            # NB: against dynamo's own graph and arguments, so that lift is checked too
            ref = run_eval(self.gm, tuple(example_inputs))
            err = compare(ref, small, args, None, self.opts.rtol, f"otofx fragment {self.number}")
        result = FragmentResult(self.number, True, f"removed {removed} rows of {groups} groups", groups, removed,
                                before, _numel(small), time.perf_counter() - t0, err, lifted_n, attrs_n,
                                state.records)
        _record(result)
        # NB: the inner compiler gets dynamo's own values (SymInts included), so a dynamic graph stays dynamic
        out._set_pruned(self._inner(_for_inner(small), [symbolic[i] for i in lifted.inputs]), lifted)

    def on_change(self, out: Compiled, args: list) -> None:
        out.rebuilds += 1
        if self.opts.on_change == "dense":
            log.info("otofx: fragment %d: weights changed since compile; using the dense graph from now on",
                     self.number)
            self._dense(out, args, FragmentResult(self.number, False, "weights changed (on_change='dense')"))
            return
        log.info("otofx: fragment %d: weights changed since compile; pruning and compiling again (rebuild %d)",
                 self.number, out.rebuilds)
        self._build(out, args)


def _concrete(example_inputs) -> list | None:
    """dynamo's example inputs with each symbolic size (a graph compiled with dynamic shapes takes
    the batch and spatial sizes as SymInt arguments) replaced by the value it stands for, or None
    when one has no such value.

    # NB: analysis runs the graph on these values (shapes on meta, a real run where an op needs
    # values); a SymInt there makes views with symbolic sizes that neither run can take
    """
    out = []
    for e in example_inputs:
        if isinstance(e, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            hint = getattr(e.node, "hint", None)
            if hint is None:
                return None
            e = hint
        out.append(e)
    return out


def _present(gm: fx.GraphModule, pin: tuple) -> tuple:
    """The pins that name something in this fragment (a graph break puts the others elsewhere)."""
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    return tuple(p for p in pin if any(n == p or n.startswith(p + ".") for n in names))


def _same_code(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    return a.graph.python_code("self").src == b.graph.python_code("self").src


def _for_inner(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as the inner compiler gets it: analysis meta dropped, code regenerated."""
    for n in gm.graph.nodes:
        n.meta = {k: n.meta[k] for k in _KEEP_META if k in n.meta}
    gm.recompile()
    return gm


def _record(result: FragmentResult) -> None:
    _RESULTS.append(result)
    if result.pruned:
        log.info("otofx: fragment %d: %s; parameters %d -> %d (%.2fx), verified to %s, %.2f s", result.fragment,
                 result.reason, result.params_before, result.params_after,
                 result.params_before / max(1, result.params_after),
                 "-" if result.error is None else f"{result.error:.1e}", result.seconds)
    else:
        log.info("otofx: fragment %d: not pruned: %s", result.fragment, result.reason)


def otofx_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None,
                  **unknown):
    """The ``torch.compile`` backend (``backend="otofx"``); ``options`` as in the module docstring."""
    if unknown:
        raise InputError(f"the otofx backend got unexpected argument(s) {sorted(unknown)}; "
                         "pass its settings as torch.compile(..., options={...})")
    opts = Options.parse(options, mode)
    return _Fragment(gm, opts).compile(list(example_inputs))


def register() -> None:
    """Register ``"otofx"`` with dynamo's backend registry (``import otofx`` calls this).

    # NB: when dynamo found the ``torch_dynamo_backends`` entry point first, it loads this module
    # itself and registers the name after the import; registering here too would be a duplicate.
    """
    fxcompat.register_backend(otofx_backend, NAME)


__all__ = ["otofx_backend", "register", "Options", "FragmentResult", "Compiled", "Lifted", "lift", "state_names",
           "pipeline", "attention_modules", "why_dense", "results", "clear_results"]
