"""Front-ends: turn a user's model into one ``torch.fx.GraphModule`` IR.

``capture(model, example_inputs) -> Captured``. The primary front-end is ``torch.fx`` symbolic
tracing with a leaf-aware tracer (modules with a registered rule stay single nodes; everything
else is traced through). When tracing fails, ``torch.export`` (non-strict) is tried; both produce a
GraphModule whose parameter names equal the model's, so passes never ask which one ran.

Internals:
    * The model is never mutated: tracing only reads it, and the GraphModule shares the model's
      submodules (``# NB:`` rewrites must deep-copy before touching them).
    * example inputs normalise to ``(args, kwargs)``; a dict means keyword tensors.
    * ``LeafTracer`` trims fx's per-call bookkeeping that no pass reads (module scopes and the
      ``nn_module_stack`` meta) and finds parameter attributes by a dict lookup: tracing is
      about half of fx's default cost on a MobileNet.
    * :func:`graph_module` builds the module hierarchy fx's ``GraphModule(root, graph)`` builds,
      with dict operations instead of ``Module.__getattr__``/``__setattr__`` per path step.
"""
from __future__ import annotations

import functools
import logging
import operator
from contextlib import contextmanager
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

    def create_arg(self, a):
        # NB: the commonest arguments (a traced value, a plain number) skip fx's checks for
        # parameters, modules and tensor constants; the result is the one fx would give
        t = type(a)
        if t is fx.Proxy:
            return a.node
        if t is int or t is float or t is bool or t is str or a is None:
            return a
        if t is tuple:  # a plain tuple (a NamedTuple's type is its own class)
            return tuple([self.create_arg(e) for e in a])
        if t is list:
            return [self.create_arg(e) for e in a]
        if t is dict and all(type(k) is str for k in a):  # keyword arguments (fx's keys may not be Nodes)
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """fx's ``create_node``, with the arguments attached after the node is made.

        # NB: torch 2.14's ``Graph.create_node`` walks every argument with pytree looking for raw
        # SymInts (a quarter of the tracing time on a MobileNet); symbolic tracing never makes
        # them. Setting ``node.args``/``node.kwargs`` does the same use-def bookkeeping.
        """
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def call_module(self, m: torch.nn.Module, forward, args, kwargs):
        """A leaf becomes one ``call_module`` node; anything else is traced through.

        # NB: fx's version also keeps a module scope stack and copies it into every node's
        # ``nn_module_stack`` meta (a third of the tracing time on a MobileNet); no pass reads it
        """
        qualname = self.path_of_module(m)
        if not self.is_leaf_module(m, qualname):
            return forward(*args, **kwargs)
        return self.create_proxy("call_module", qualname, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's ``Tracer.getattr`` with the parameter and buffer names looked up in a dict.

        # NB: fx scans ``root.named_parameters()`` on every read of a parameter attribute outside
        # a leaf (a layer scale, a class token), which is quadratic in the model; the answer is
        # the same: the first name of the tensor, parameters before buffers.
        """
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        names = self.__dict__.get("_attr_names")
        if names is None or names[0] is not self.root:
            params = {}
            for n, p in self.root.named_parameters():
                params.setdefault(id(p), n)
            bufs = {}
            if self.proxy_buffer_attributes:
                for n, b in self.root.named_buffers():
                    bufs.setdefault(id(b), n)
            names = self._attr_names = (self.root, params, bufs)
        name = names[1].get(id(attr_val)) if isinstance(attr_val, torch.nn.Parameter) else None
        if name is None:
            name = names[2].get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def _autowrap_functions() -> tuple:
    # torchvision's stochastic_depth reads input.ndim, which a Proxy cannot answer
    return _autowrap_scan(len(FUNCTION_FORMS))


@functools.lru_cache(maxsize=8)
def _autowrap_scan(n_forms: int) -> tuple:
    # NB: keyed on the registry's size, so a rule registered later is seen
    return tuple(t for t in list(FUNCTION_FORMS)
                 if callable(t) and (getattr(t, "__module__", None) or "").startswith("torchvision.ops"))


def graph_module(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``GraphModule(root, graph)``, with fx's module hierarchy built by dict operations.

    The result is the one fx builds: fresh ``nn.Module``s on the paths to the targets, the
    targets themselves shared with ``root``, a plain tensor target as a buffer (persistent unless
    it is a non-persistent buffer of its module), anything else as an attribute.

    # NB: fx's ``_copy_attr`` goes through ``Module.__getattr__``/``__setattr__`` for every
    # path step of every target (about 4 ms of a MobileNet's capture). It is lazy: the Python
    # code is generated on the first call, not now (analysis never runs the traced graph).
    """
    targets = [n.target for n in graph.nodes if n.op in ("get_attr", "call_module")]
    gm = _LazyGraphModule(root, fx.Graph(), class_name)
    tops = {t.partition(".")[0] for t in targets}
    if any(k in gm.__dict__ or hasattr(type(gm), k) for k in tops):  # a name GraphModule uses itself
        return _LazyGraphModule(root, graph, class_name)
    for target in targets:
        *prefix, field = target.split(".")
        src, dst = root, gm
        for item in prefix:
            f = src._modules.get(item) if item in src._modules else getattr(src, item)
            t = dst._modules.get(item)
            if t is f:  # a parent already installed: the rest of the path comes with it
                break
            if t is None:
                t = dst._modules[item] = torch.nn.Module()
            src, dst = f, t
        else:
            for table in (src._modules, src._parameters, src._buffers):
                if field in table:
                    orig = table[field]
                    break
            else:
                orig = getattr(src, field)
            if isinstance(orig, torch.nn.Parameter):
                dst._parameters[field] = orig
            elif isinstance(orig, torch.Tensor):
                dst._buffers[field] = orig
                if field in src._non_persistent_buffers_set:
                    dst._non_persistent_buffers_set.add(field)
            elif isinstance(orig, torch.nn.Module):
                dst._modules[field] = orig
            else:
                setattr(dst, field, orig)
    gm.graph = graph
    if graph._tracer_cls is not None and "<locals>" not in graph._tracer_cls.__qualname__:
        gm._tracer_cls = graph._tracer_cls
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras
    return gm


def trace(model: torch.nn.Module) -> fx.GraphModule:
    tracer = LeafTracer(autowrap_functions=_autowrap_functions())
    # NB: fx stores a tensor that is neither a parameter, a buffer nor a tensor attribute (one
    # made in forward from no traced input: maxvit_t has 24) as a new ``_tensor_constantN``
    # attribute *of the traced model*; the GraphModule takes its own reference, and the model
    # gets its attributes back
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model)
        return graph_module(tracer.root, graph, type(model).__name__)
    finally:
        for k in set(model.__dict__) - before:
            if k.startswith(("_tensor_constant", "_torchbind_obj")):
                delattr(model, k)


@contextmanager
def _no_kv_cache(model: torch.nn.Module, kwargs: dict):
    """Hugging Face models return a KV cache object by default; capture the cache-free forward.

    # NB: the cache holds every layer's keys and values, so as a model output it would pin every
    # head; and a pruned model's cache has other shapes. ``config.use_cache`` is restored after.
    """
    config = getattr(model, "config", None)
    if "use_cache" in kwargs or not getattr(config, "use_cache", False):
        yield
        return
    log.info("capturing %s with config.use_cache=False (the compressed model returns no KV cache)",
             type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _inline_grad_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline ``wrap_with_set_grad_enabled`` regions (a ``torch.no_grad()`` block in forward).

    # NB: the region's ops join the main graph with grad mode left as the caller has it. The
    # values are the same; only a training run of the compressed model could differ, by also
    # differentiating through the region (in practice parameter-free code such as rotary tables).
    """
    hops = [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)]
    for node in hops:
        sub = getattr(gm, node.args[1].target)
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env = dict(zip(inputs, node.args[2:]))
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    result = fx.node.map_arg(n.args[0], lambda a: env[a])
                    break
                if n.op == "get_attr":
                    name = f"{node.args[1].target}_{n.target}".replace(".", "_")
                    gm.register_buffer(name, getattr(sub, n.target), persistent=False)
                    env[n] = gm.graph.get_attr(name)
                    env[n].meta = dict(n.meta)
                    continue
                env[n] = gm.graph.node_copy(n, lambda a: env[a])
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and isinstance(result, (tuple, list)):
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        sub_name = node.args[1]
        gm.graph.erase_node(node)
        if not sub_name.users:
            gm.graph.erase_node(sub_name)
            delattr(gm, sub_name.target)
    if hops:
        gm.graph.lint()
        gm.recompile()
    return gm


def export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    with _no_kv_cache(model, kwargs):
        ep = torch.export.export(model, args, kwargs, strict=False)
    gm = _inline_grad_regions(ep.module())
    # NB: export keeps values nothing reads (nn.MultiheadAttention's head-averaged weights when
    # the caller drops them); an unused mean over heads must not pin the heads. The graph is
    # functional aten, so fx's purity check is sound here (asserts and guards are kept).
    if gm.graph.eliminate_dead_code():
        gm.recompile()
    return gm


def _opaque_calls(gm: fx.GraphModule) -> set:
    """Names of plain Python functions (fx.wrap'ed, not torch's) called in ``gm`` without a rule."""
    out = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in FUNCTION_FORMS:
            continue
        mod = getattr(n.target, "__module__", None) or ""
        if mod.split(".")[0] not in ("torch", "_operator", "operator", "builtins", "math"):
            out.add(getattr(n.target, "__name__", str(n.target)))
    return out


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
        gm = trace(model)
        opaque = _opaque_calls(gm)
        if opaque and frontend == "auto":
            # NB: fx.wrap'ed Python functions (torchvision's shifted_window_attention) are single opaque
            # nodes to symbolic_trace, which would pin everything they touch; export sees inside them
            try:
                log.info("symbolic_trace left %s opaque; trying torch.export", ", ".join(sorted(opaque)))
                return Captured(export(model, args, kwargs), args, kwargs, "export")
            except Exception as e:  # noqa: BLE001
                log.info("torch.export failed (%s: %s); keeping the traced graph", type(e).__name__, _first_line(e))
        return Captured(gm, args, kwargs, "symbolic_trace")
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
