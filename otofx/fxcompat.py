"""Every use of torch.fx / dynamo / inductor internals that otofx needs, in one place.

A torch upgrade that moves a private name breaks this module and ``tests/test_fxcompat.py``, not
the passes. ``SUPPORTED_TORCH`` names the torch releases these shims are tested with (CI runs the
newest and the oldest: see ``.ci/run``); the test fails on any other, so that a new release is
looked at here first.

    graph_module_like(root, graph, name)  fx.GraphModule keeping root's buffer persistence
    copy_graph(graph)                a copy of a graph with its tracer class and codegen (export's pytree I/O)
    keep_codegen(dst, src)           dst generates its code the way src does
    LazyGraphModule                  fx's GraphModule that generates its code on first call
    is_op_overload(target)           an ATen overload (``aten.conv2d.default``)
    op_schema(op)                    an ATen overload's schema (argument names, ``aten::conv2d``)
    grapharg_source(node)            dynamo's source of a placeholder (``L['self']._modules[...]``)
    FakeTensor                       dynamo's fake example inputs
    register_backend(fn, name)       dynamo's backend registry, once per name
    lookup_backend(name)             a registered dynamo backend by name
    inductor_mode_options(mode)      inductor's config patches for ``torch.compile(mode=...)``
    inductor_freezing()              inductor's ``freezing`` flag (None when inductor is not loaded)

Internals:
    * # NB: fx before torch 2.12 registers every buffer ``GraphModule(root, graph)`` copies from
      ``root`` as persistent, so a non-persistent buffer (an export graph's lifted constant) would
      enter the state_dict; :func:`graph_module_like` restores the flags on any version.
    * ``Graph._codegen`` holds torch.export's pytree flattening of inputs and outputs, which
      ``Graph.graph_copy`` does not carry over; ``Graph._tracer_cls`` is what fx re-traces with.
"""
from __future__ import annotations

import sys

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._lazy_graph_module import _LazyGraphModule as LazyGraphModule

# the torch releases (major.minor) these shims are tested with: CI's newest (2.14.1) and oldest (2.11.0)
SUPPORTED_TORCH = ("2.11", "2.12", "2.13", "2.14")


def torch_release(version: str | None = None) -> str:
    """``major.minor`` of ``version`` (default: the running torch), e.g. ``"2.14"``."""
    v = (version or torch.__version__).split("+")[0]
    return ".".join(v.split(".")[:2])


def graph_module_like(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` that keeps which of root's buffers are persistent."""
    gm = fx.GraphModule(root, graph, class_name)
    for name, mod in root.named_modules():
        if not mod._non_persistent_buffers_set:
            continue
        try:
            dst = gm.get_submodule(name)
        except AttributeError:
            continue
        dst._non_persistent_buffers_set.update(b for b in mod._non_persistent_buffers_set if b in dst._buffers)
    return gm


def keep_codegen(dst: fx.Graph, src: fx.Graph) -> None:
    """Make ``dst`` generate its code as ``src`` does (torch.export's pytree flattening of inputs and outputs)."""
    dst._codegen = src._codegen


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (node meta copied shallowly: meta tensors and fake values are shared)."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    keep_codegen(new, graph)
    return new


def is_op_overload(target) -> bool:
    """Whether ``target`` is an ATen overload (``torch.ops.aten.conv2d.default``)."""
    return isinstance(target, torch._ops.OpOverload)


def op_schema(op) -> torch.FunctionSchema:
    """The schema of ATen overload ``op``: ``.name`` (``aten::conv2d``), ``.arguments`` (names, kwarg-only flags)."""
    return op._schema


def buffer_persistent(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s buffer ``name`` enters its state_dict (``register_buffer(persistent=)``)."""
    return name not in module._non_persistent_buffers_set


def set_buffer_persistent(module: torch.nn.Module, name: str, persistent: bool) -> None:
    """Mark ``module``'s buffer ``name`` persistent or not, as ``register_buffer(persistent=)`` would."""
    if persistent:
        module._non_persistent_buffers_set.discard(name)
    else:
        module._non_persistent_buffers_set.add(name)


EXPORT_GUARDS = "_guards_fn"  # torch.export's input-guard submodule of ``ExportedProgram.module()`` (2.9+)


def export_guards(gm: fx.GraphModule):
    """``(module, call_node)`` of an exported module's input guards, or ``(None, None)`` without them."""
    call = next(iter(gm.graph.find_nodes(op="call_module", target=EXPORT_GUARDS)), None)
    return getattr(gm, EXPORT_GUARDS, None), call


def set_export_guards(gm: fx.GraphModule, guards: torch.nn.Module) -> None:
    """Replace the input guards of an exported module by ``guards`` (called with the same arguments)."""
    setattr(gm, EXPORT_GUARDS, guards)


def mark_impure(cls: type) -> type:
    """Make fx's dead-code elimination keep every ``call_module`` of ``cls`` (``Node.is_impure`` reads the
    module's ``_is_impure``), as it keeps torch.export's own guard module."""
    cls._is_impure = True
    return cls


def grapharg_source(node: fx.Node) -> str:
    """Dynamo's source of a placeholder as text (``L['self']._modules['fc']._parameters['weight']``), or ``""``.

    # NB: dynamo drops ``node.meta["grapharg"]`` after the backend returns: read it at compile time
    """
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return ""
    name = getattr(src, "name", "")
    return name() if callable(name) else str(name)


def register_backend(fn, name: str) -> bool:
    """Register ``fn`` as dynamo backend ``name`` unless that name is taken (True when registered).

    # NB: dynamo may have loaded the ``torch_dynamo_backends`` entry point first, and registers the
    # name itself after importing the module; a second registration would be a duplicate
    """
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS or name in registry._BACKENDS:
        return False
    registry.register_backend(fn, name=name)
    return True


def lookup_backend(name: str):
    """The dynamo backend registered as ``name`` (``"inductor"``, ``"aot_eager"`` ...)."""
    from torch._dynamo.backends.registry import lookup_backend as lookup

    return lookup(name)


def inductor_mode_options(mode: str) -> dict:
    """inductor's config patches for ``torch.compile(mode=mode)``."""
    from torch._inductor import list_mode_options

    return list_mode_options(mode)


def inductor_freezing() -> bool | None:
    """inductor's ``freezing`` flag now (None when inductor was never imported: nothing to read)."""
    cfg = sys.modules.get("torch._inductor.config")
    return None if cfg is None else bool(cfg.freezing)


def inductor_config():
    """``torch._inductor.config`` (for ``.patch(...)``)."""
    import torch._inductor.config as cfg

    return cfg


__all__ = ["SUPPORTED_TORCH", "torch_release", "graph_module_like", "keep_codegen", "copy_graph", "LazyGraphModule",
           "is_op_overload", "op_schema", "grapharg_source", "FakeTensor", "register_backend", "lookup_backend",
           "inductor_mode_options", "inductor_freezing", "inductor_config"]
