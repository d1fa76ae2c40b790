"""Front-ends: turn a user's model into one ``torch.fx.GraphModule`` IR.

``capture(model, example_inputs) -> Captured``. The primary front-end is ``torch.fx`` symbolic
tracing with a leaf-aware tracer (modules with a registered rule stay single nodes; everything
else is traced through). When tracing fails, ``torch.export`` (non-strict) is tried; both produce a
GraphModule whose parameter names equal the model's, so passes never ask which one ran.

The export front-end captures with a dynamic batch and sequence length (``Dim.AUTO``; see
``_dynamic_dims``), and image sizes where that capture stays cheap (:func:`_spatial_capture`:
within ``SPATIAL_FACTOR`` times the first capture's time, at least ``SPATIAL_MIN_SECONDS``;
otherwise they stay static, logged, and the graph form takes the example's image size only), so
the graph, and the compressed model, run at any size the model does; it also returns a second
example input set of another size along every dynamic dimension (:func:`second_inputs`), which
verification runs too. It captures in training mode and makes dropout, batch norm and attention
dropout read the modules' ``training`` flags, so the graph follows ``train()``/``eval()`` whatever
mode the model was in (:func:`export_captured`).

Internals:
    * The model is never mutated: tracing only reads it, and the GraphModule shares the model's
      submodules (``# NB:`` rewrites must deep-copy before touching them).
    * example inputs normalise to ``(args, kwargs)``; a dict means keyword tensors.
    * ``LeafTracer`` trims fx's per-call bookkeeping that no pass reads (its module scopes and the
      ``nn_module_stack`` meta: each node gets the one name of the module whose forward made it,
      ``passes.nodes.MADE_IN``, which the rebuild reads) and finds parameter attributes by a dict
      lookup: tracing is about half of fx's default cost on a MobileNet.
    * :func:`graph_module` builds the module hierarchy fx's ``GraphModule(root, graph)`` builds,
      with dict operations instead of ``Module.__getattr__``/``__setattr__`` per path step.
    * Export: a batch of 1 is widened to 2 for the capture (export specialises sizes of 1); refusals
      fall back to a dynamic batch only, then static shapes (INFO log). After a failure on a branch
      on tensor values the later attempts go to draft_export directly, and a dynamic sequence that
      the failed export had already fixed is not asked for again (:func:`_export_program`); drafts
      run without torch's per-expression provenance records (:func:`_no_expression_logs`). Image sizes are a second
      capture after the first (batch and sequence) one succeeded, under a SIGALRM deadline
      (:func:`_deadline`; main thread only, else skipped) whose exception is a BaseException so that
      export's own fallbacks do not swallow it; the first capture is kept when the second is late,
      fails, or gives a graph whose guards refuse a doubled image size (swin's window padding).
      # NB: the budget is wall time, so on a loaded machine a model near the budget can come out
      static on one run and dynamic on another; both are exact, the log says which.
    * The analysis runs on the example's concrete sizes (``sym_size`` nodes are ints on meta
      tensors); prune's size fixes keep or scale the size expressions (``batch * heads``) in view
      arguments.
    * torch.export's input guards (the ``_guards_fn`` submodule) are wrapped in :class:`SizeGuards`:
      an input of a size the capture left static raises :class:`otofx.errors.ShapeError` naming the
      input, its size and the size the graph takes, not a bare ``AssertionError: Guard failed``.
    * torch's transformer blocks (``TRACED_FORWARDS``) are traced along their reference path, not
      kept as leaves: their fast-path checks branch on the input, which a Proxy cannot answer.
    * ``outside_inputs``: inputs just outside the size ranges an export capture admits (a branch on
      a size narrows them), kept in ``gm.meta[SIZE_BOUNDS]`` for ``OTO.compress`` to try the own class on.
    * Hugging Face experts layers on their eager forward (a loop over the experts a batch hits) are
      exported on ``batched_mm``, the setting restored after (:func:`_capturable_experts`).
    * Mode flags are ``get_attr`` nodes of ``<module path>.training`` (empty modules created where
      export kept none), set to the user's flags at capture: a frozen submodule stays frozen.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import operator
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from otofx.errors import CaptureError, InputError, ShapeError
from otofx import fxcompat
from otofx.fxcompat import LazyGraphModule as _LazyGraphModule
from otofx.passes.nodes import MADE_IN, get_path
from otofx.passes.registry import FUNCTION_FORMS, MODULE_FORMS
from otofx.passes.functionalize import functionalize_slice_writes
from otofx.verify import fresh_inputs

log = logging.getLogger("otofx")


@dataclass(frozen=True)
class Captured:
    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    frontend: str  # "symbolic_trace" or "export"
    # other example inputs of another shape along every dimension the capture made dynamic
    # (export: see :func:`second_inputs`); verification runs them too. () when none.
    more_inputs: tuple = ()  # tuple of (args, kwargs)


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


def _encoder_layer(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _decoder_layer(m: nn.TransformerDecoderLayer, tgt, memory, tgt_mask=None, memory_mask=None,
                   tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False,
                   memory_is_causal=False):
    x = tgt
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + m._mha_block(m.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        return x + m._ff_block(m.norm3(x))
    x = m.norm1(x + m._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = m.norm2(x + m._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
    return m.norm3(x + m._ff_block(x))


def _encoder(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return m.norm(x) if m.norm is not None else x


def _decoder(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    x = tgt
    for layer in m.layers:
        x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                  memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                  memory_is_causal=memory_is_causal)
    return m.norm(x) if m.norm is not None else x


def _transformer(m: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                 src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                 src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


# NB: torch's transformer blocks branch on their inputs (src.dim(), the fused fast path's checks, the
# nested-tensor conversion), which a Proxy cannot answer: the tracer follows their reference path
# (the one training and export take), built from the same submodules and their private blocks. A
# boolean is_causal stays a Python bool; a tensor mask is passed on as it is (the attention
# canonicalises it).
TRACED_FORWARDS = {nn.TransformerEncoderLayer: _encoder_layer, nn.TransformerDecoderLayer: _decoder_layer,
                   nn.TransformerEncoder: _encoder, nn.TransformerDecoder: _decoder, nn.Transformer: _transformer}


class LeafTracer(fx.Tracer):
    """Keeps modules that have a semantic rule as leaves; traces through everything else."""

    def __init__(self, *args, **kwargs):
        # NB: fx re-traces a GraphModule's code with its graph's tracer class when it is unpickled
        # (torch.save of the graph form): otofx's kept-divisor norms must stay one call there too
        kwargs.setdefault("autowrap_functions", _autowrap_functions())
        super().__init__(*args, **kwargs)

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
        scope = self.__dict__.get("_scope")
        node.meta[MADE_IN] = scope[-1] if scope else ""
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def call_module(self, m: torch.nn.Module, forward, args, kwargs):
        """A leaf becomes one ``call_module`` node; anything else is traced through, each node it
        makes labelled with the module's name (``passes.nodes.MADE_IN``).

        # NB: fx's version also keeps a module scope stack and copies it into every node's
        # ``nn_module_stack`` meta (a third of the tracing time on a MobileNet); one name per node
        # is what the rebuild reads (``passes.resize.literal_moves``)
        """
        qualname = self.path_of_module(m)
        traced = TRACED_FORWARDS.get(type(m))
        if traced is not None and type(m) not in MODULE_FORMS:
            return self._inside(qualname, traced, m, *args, **kwargs)
        if not self.is_leaf_module(m, qualname):
            return self._inside(qualname, forward, *args, **kwargs)
        return self.create_proxy("call_module", qualname, args, kwargs)

    def _inside(self, path: str, fn, *args, **kwargs):
        scope = self.__dict__.setdefault("_scope", [])
        scope.append(path)
        try:
            return fn(*args, **kwargs)
        finally:
            scope.pop()

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
    # torchvision's stochastic_depth reads input.ndim, which a Proxy cannot answer; a kept-divisor
    # norm's reductions have no rule of their own
    return _autowrap_scan(len(FUNCTION_FORMS))


@functools.lru_cache(maxsize=8)
def _autowrap_scan(n_forms: int) -> tuple:
    # NB: keyed on the registry's size, so a rule registered later is seen. otofx's own functions (a
    # compressed graph's norms with a kept divisor) stay one call when a compressed graph is traced again
    return tuple(t for t in list(FUNCTION_FORMS)
                 if callable(t) and (getattr(t, "__module__", None) or "").startswith(("torchvision.ops",
                                                                                     "otofx.passes")))


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
                if not fxcompat.buffer_persistent(src, field):
                    fxcompat.set_buffer_persistent(dst, field, False)
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


def trace(model: torch.nn.Module, concrete_args: dict | None = None) -> fx.GraphModule:
    tracer = LeafTracer(autowrap_functions=_autowrap_functions())
    # NB: fx stores a tensor that is neither a parameter, a buffer nor a tensor attribute (one
    # made in forward from no traced input: maxvit_t has 24) as a new ``_tensor_constantN``
    # attribute *of the traced model*; the GraphModule takes its own reference, and the model
    # gets its attributes back
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        if concrete_args:
            # NB: fx renames a specialised argument's placeholder (``mask_1``); the graph takes it
            # under its own name, as the model does
            for n in graph.nodes:
                if n.op == "placeholder" and n.target.rpartition("_")[0] in concrete_args:
                    n.target = n.target.rpartition("_")[0]
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
    # NB: every config object the model's modules hold, not only the top one: an encoder-decoder
    # (T5) gives its decoder stack a copy of the config, which decides on the cache by itself, and
    # T5Gemma's decoder config says use_cache when the top one does not
    configs = {id(c): c for m in model.modules() for c in (getattr(m, "config", None),)
               if c is not None and getattr(c, "use_cache", False) is True}
    if "use_cache" in kwargs or not configs:
        yield
        return
    log.info("capturing %s with config.use_cache=False (the compressed model returns no KV cache)",
             type(model).__name__)
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _eager_experts_configs(model: torch.nn.Module) -> list:
    """The configs of Hugging Face experts layers (classes made by ``use_experts_implementation``) that
    run their eager forward: ``config._experts_implementation`` ``"eager"`` or unset."""
    out = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(m, "is_concatenated") and hasattr(m, "has_gate") \
                and getattr(cfg, "_experts_implementation", None) in (None, "eager"):
            out[id(cfg)] = cfg
    return list(out.values())


@contextmanager
def _capturable_experts(model: torch.nn.Module):
    """Hugging Face mixture-of-experts layers on their eager forward are captured on ``batched_mm``.

    # NB: the eager forward loops over the experts the batch hits (``for e in expert_hit``, a
    # nonzero's length), which torch.export cannot follow; ``batched_mm`` computes the same sums
    # with shapes that depend on the input's size only. The setting is restored after: the model's
    # own class, compressed, keeps the user's choice.
    """
    configs = _eager_experts_configs(model)
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        configs = []
    if not configs or "batched_mm" not in ALL_EXPERTS_FUNCTIONS:
        yield
        return
    log.info("capturing %s's experts with experts_implementation='batched_mm' (their eager forward loops "
             "over the experts a batch hits, which the capture cannot follow)", type(model).__name__)
    before = [(c, _raw_experts(c)) for c in configs]
    for c in configs:
        _set_raw_experts(c, "batched_mm")
    try:
        yield
    finally:
        for c, v in before:
            _set_raw_experts(c, v)


# NB: transformers' config keeps the setting behind a property whose setter also writes every sub-config;
# capture changes and restores exactly the configs the experts layers read, by the stored value
_UNSET = object()


def _experts_slot(c) -> str:
    return "_experts_implementation_internal" \
        if isinstance(getattr(type(c), "_experts_implementation", None), property) else "_experts_implementation"


def _raw_experts(c):
    return c.__dict__.get(_experts_slot(c), _UNSET)


def _set_raw_experts(c, v) -> None:
    if v is _UNSET:
        c.__dict__.pop(_experts_slot(c), None)
    else:
        c.__dict__[_experts_slot(c)] = v


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


# ---------------------------------------------------------------------------------------------
# torch.export: dynamic shapes and training mode
# ---------------------------------------------------------------------------------------------

_aten = torch.ops.aten
# dropout ops whose third argument is ``train``
_DROPOUTS = {_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default}
# ops that draw random numbers: a training graph still holding one after the mode rewrite (torchvision's
# stochastic depth draws a bernoulli mask in Python) cannot serve eval mode
_RANDOM = ("bernoulli", "rand", "randn", "randint", "randperm", "normal", "uniform", "exponential",
           "multinomial", "native_dropout", "rrelu", "poisson", "geometric", "cauchy", "log_normal")


# module classes (by name: torchvision's StochasticDepth, timm's DropPath) whose training forward
# draws random numbers in Python, outside any dropout op
_STOCHASTIC_MODULES = ("StochasticDepth", "DropPath")


def _stochastic_module(model: torch.nn.Module) -> str | None:
    for m in model.modules():
        if type(m).__name__ in _STOCHASTIC_MODULES:
            return type(m).__name__
    return None


def _is_random(node: fx.Node) -> bool:
    if node.op != "call_function" or not fxcompat.is_op_overload(node.target):
        return False
    base = fxcompat.op_schema(node.target).name.split("::")[-1].rstrip("_")
    return base in _RANDOM or base.startswith(("rand_like", "randn_like", "randint_like"))


@contextmanager
def _mode(model: torch.nn.Module, training: bool):
    """Every module's ``training`` flag set to ``training``; each module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = training
        yield
    finally:
        for m, f in flags:
            m.training = f


def _batch_widened(args: tuple, kwargs: dict):
    """The example inputs with a batch of 1 repeated to 2, or None when the batch is not 1.

    # NB: torch.export specialises a dimension whose example size is 1 (its 0/1 specialisation):
    # a model captured on one sample would run on one sample only. Every tensor of rank >= 2
    # must have batch 1 (one batch dimension shared by all inputs).
    """
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() >= 2]
    if not leaves or any(t.shape[0] != 1 for t in leaves):
        return None
    def widen(t):
        return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else t
    return tree_map(widen, args), tree_map(widen, kwargs)


def _is_image(t) -> bool:
    """A float input of rank >= 4 ([batch, channels, *spatial]): its dims 2.. are image sizes."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4


def _dynamic_dims(t: torch.Tensor, dims: str) -> tuple:
    """The dimensions of input ``t`` asked to be dynamic: the batch (dim 0); with ``dims == "all"``
    also the sequence: every dimension of an integer or bool tensor (token ids, masks, positions)
    and dim 1 of a rank-3 float tensor (embeddings given as [batch, length, width]); with ``dims ==
    "spatial"`` also the image sizes (dims 2.. of a float tensor of rank >= 4).

    # NB: image sizes are asked for in a separate, time-limited capture (:func:`_spatial_capture`):
    # torch.export reasons symbolically about every padding and window partition, and swin_t at
    # 64x64 took 448 s to export with dynamic height and width (10 s static).
    """
    if dims not in ("all", "spatial") or t.dim() < 2:
        return (0,)
    if not t.is_floating_point() and not t.is_complex():
        return tuple(range(t.dim()))
    if dims == "spatial" and t.dim() >= 4:
        return (0, *range(2, t.dim()))
    return (0, 1) if t.dim() == 3 else (0,)


def _dynamic_shapes(model, args, kwargs, dims: str):
    """``dynamic_shapes`` for torch.export: ``Dim.AUTO`` on the dimensions of :func:`_dynamic_dims`
    of every input tensor; export keeps static what the model pins (a width, a configured length)."""
    spec = torch.export.ShapesCollection()
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            spec[t] = {d: torch.export.Dim.AUTO for d in _dynamic_dims(t, dims)}
    return spec.dynamic_shapes(model, args, kwargs)


def _export_program(model, args, kwargs):
    """torch.export (non-strict) with dynamic sizes where export accepts them, static otherwise.

    Attempts, first success wins: the example with a batch of 1 widened to 2, batch and sequence
    dynamic; the example, batch and sequence dynamic; the example, batch dynamic; static. Returns
    ``(program, (args, kwargs) it was captured on, dims)`` with dims "all", "batch" or None.

    Once an attempt fails on a branch on tensor values (:func:`_data_dependent`), the plain export of
    the later attempts would fail on that branch again: they go to :func:`_draft` directly (the plain
    export only when the draft gives nothing). An attempt whose dynamic dimensions beyond the batch
    the failed export had already fixed (a Python loop over the sequence: :func:`_fixed_dims`) is
    skipped: its draft could not make them dynamic either. An attempt asking for the same dynamic
    dimensions as one that failed is skipped too.
    """
    widened = _batch_widened(args, kwargs)
    attempts = ([(widened, "all")] if widened is not None else []) + [((args, kwargs), "all"),
                                                                       ((args, kwargs), "batch"),
                                                                       ((args, kwargs), None)]
    on_data = False  # an earlier attempt failed on a branch on tensor values
    seq_fixed = False  # ... and had fixed every sequence size it was asked to keep dynamic
    drafts_raised: list = []  # exceptions of the drafts that raised
    tried = set()  # (inputs, dynamic dims per input) of the failed attempts
    i = -1
    while i + 1 < len(attempts):
        i += 1
        (a, k), dims = attempts[i]
        last = i == len(attempts) - 1
        key = (widened is not None and a is widened[0], _dims_key(a, k, dims))
        if dims == "all" and seq_fixed:
            continue
        if key in tried and not last:
            log.debug("torch.export with %s dynamic: the same dimensions as a failed attempt; skipped", dims)
            continue
        tried.add(key)
        shapes = _dynamic_shapes(model, a, k, dims) if dims else None
        ep, err = None, None
        if on_data:
            # NB: the plain export fails on the branch again (seconds to minutes on a large model)
            ep = _draft(model, a, k, shapes, drafts_raised)
        if ep is None:
            fixed: set = set()
            try:
                with _quiet_torch(), _fixed_dims(fixed):
                    ep = torch.export.export(model, a, k, dynamic_shapes=shapes, strict=False)
                _fix_packed_guards(ep, model)
            except Exception as e:  # noqa: BLE001
                err = e
                if _data_dependent(e):
                    first = not on_data
                    on_data = True
                    if first and dims == "all" and fixed:
                        # NB: its draft would fix them too (minutes on Qwen4-Exp, whose indexer loops over
                        # every query); the same inputs with a dynamic batch are next
                        log.info("torch.export with batch and sequence dynamic failed on a branch on tensor "
                                 "values (%s) and had fixed the sequence sizes before (%s); trying a dynamic "
                                 "batch", _first_line(e), ", ".join(sorted(fixed)))
                        seq_fixed = True
                        attempts.insert(i + 1, ((a, k), "batch"))
                        continue
                    if first:
                        ep = _draft(model, a, k, shapes, drafts_raised)
            if ep is None:
                if dims is None:
                    raise err
                if on_data and any(_about_data_only(e) for e in drafts_raised):
                    # NB: the export failed on a branch on data and its draft raised on data-dependent
                    # sizes alone (torchvision's detectors: PendingUnbackedSymbolNotFound in the
                    # post-processing): fewer dynamic input sizes fail both the same way again (a minute
                    # on a detector)
                    log.info("torch.export and its draft failed on data-dependent sizes, not on the dynamic input "
                             "sizes; no attempt with fewer dynamic dimensions")
                    raise err
                log.info("torch.export with %s dynamic failed (%s: %s); trying fewer dynamic dimensions",
                         "batch and sequence" if dims == "all" else "the batch dimension", type(err).__name__,
                         _first_line(err))
                continue
        if widened is not None and a is widened[0]:
            checked = ep.module()
            if not _pass_guards(checked, (args, kwargs)):
                # NB: the program of a batch of 2 may guard sizes the example's batch of 1 fails (RAFT splits
                # cat([image1, image2]) in halves: the guard reads the two batches' sum)
                log.info("torch.export of the batch widened to 2: its size guards refuse the example's batch of 1; "
                         "exporting the example itself")
                continue
            ep.otofx_module = checked  # NB: _finish takes it (building it again costs 4-8% of an export)
        if dims != "all":
            log.info("%s captured with %s", type(model).__name__,
                     "a dynamic batch only" if dims == "batch" else "static shapes")
        return ep, (a, k), dims


def _dims_key(args, kwargs, dims) -> tuple:
    """The dimensions an attempt asks to be dynamic, per input tensor (see :func:`_dynamic_dims`)."""
    if not dims:
        return ()
    return tuple(_dynamic_dims(t, dims) if isinstance(t, torch.Tensor) and t.dim() >= 1 else None
                 for t in tree_flatten((args, kwargs))[0])


_SIZE_SOURCE = re.compile(r"\.size\(\)\[(\d+)\]$")


@contextmanager
def _fixed_dims(out: set):
    """Collect in ``out`` the input dimensions other than the batch (dim 0) that an export asked to be
    dynamic and fixed to their example size before it ended (a guard such as ``for i in
    range(seq_len)``): ``"input_ids.size()[1]"``. Filled only if every such dimension was fixed.

    # NB: reads the export's ``ShapeEnv`` (recorded when it is made); a specialisation is a
    # replacement of the dimension's symbol by an integer. Guards only accumulate along the code
    # path, so a later capture along the same path (draft_export) fixes them too.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    envs = []
    init = ShapeEnv.__init__

    @functools.wraps(init)
    def record(self, *a, **k):
        init(self, *a, **k)
        envs.append(self)

    ShapeEnv.__init__ = record
    try:
        yield
    finally:
        ShapeEnv.__init__ = init
        try:
            names, fixed = set(), set()
            for env in envs:
                for sym, sources in getattr(env, "var_to_sources", {}).items():
                    for src in sources:
                        name = src.name() if callable(getattr(src, "name", None)) else str(getattr(src, "name", src))
                        hit = _SIZE_SOURCE.search(name)
                        if hit and int(hit.group(1)) >= 1:
                            names.add(name)
                            if getattr(env.replacements.get(sym), "is_Integer", False):
                                fixed.add(name)
            if names and fixed == names:
                out.update(fixed)
        except Exception:  # noqa: BLE001 - torch internals changed: learn nothing
            log.debug("could not read the failed export's fixed dimensions", exc_info=True)


# --- branches on tensor values ----------------------------------------------------------------------
# NB: torch.export cannot capture a Python branch on a tensor's value (``if mask.any():`` in
# Longformer, LED, FSMT). torch.export.draft_export takes the branch the example takes and reports
# each decision; the graph then holds a DataBranchGuard per decision, which raises when an input
# would take another branch, so the graph never computes a branch it does not hold.


@contextlib.contextmanager
def _quiet_torch():
    """torch's export loggers at ERROR, and what torch.export prints to stderr kept (a failed export
    prints its partial graph; draft_export logs a banner per issue); otofx says what happened once, in
    its own words (the ``otofx`` logger at INFO has each attempt's error)."""
    import io

    # NB: torch._export.non_strict_utils warns of each dimension asked dynamic at size 1 (otofx widens or
    # fixes such sizes itself, and says which sizes it captured dynamic)
    quiet = [logging.getLogger(n) for n in ("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes",
                                            "torch._export.non_strict_utils")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _data_dependent(e: BaseException) -> bool:
    while e is not None:
        if "data-dependent" in str(e) or "DataDependent" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def _no_expression_logs():
    """draft_export without its ``expression_created`` records (one per symbolic size operation).

    # NB: draft_export turns on torch's structured trace, and every SymNode operation then logs its
    # expression with the user's and torch's stacks and its printed sympy form: half of a draft's time
    # on Qwen4-Exp (36k records; a tiny model took minutes). The records only explain a failure's
    # provenance in draft_export's report; the failures themselves (``propagate_real_tensors_provenance``,
    # ``guard_added``...) are separate records, and otofx reads the failures' ``expr`` and ``result``.
    """
    from torch.fx.experimental import sym_node

    logged = getattr(sym_node, "dtrace_structured", None)
    if logged is None:
        yield
        return

    @functools.wraps(logged)
    def dtrace(name, *a, **k):
        if name != "expression_created":
            logged(name, *a, **k)

    sym_node.dtrace_structured = dtrace
    try:
        yield
    finally:
        sym_node.dtrace_structured = logged


def _fix_packed_guards(ep, model) -> None:
    """Name ``model.forward``'s ``*args``/``**kwargs`` inputs in ``ep``'s guards as the graph's inputs are
    named, by position and keyword.

    # NB: torch.export writes a guard on a ``**kwargs`` input as ``L['kwargs']['pixel_values']`` while the
    # graph's inputs are flattened by keyword (``['pixel_values']``): the guard function it builds keeps
    # ``L`` and raises NameError on every call (peft's ``PeftModel.forward(*args, **kwargs)``)"""
    code = getattr(ep, "_guards_code", None)
    if not code:
        return
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    packed = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not packed:
        return
    fixed = []
    for g in code:
        for name in packed:
            g = g.replace(f"L['{name}'][", "L[")
        fixed.append(g)
    ep._guards_code = fixed


def _draft(model, args, kwargs, shapes, raised: list | None = None):
    """``torch.export.draft_export`` when its only issues are branches on data (else None); ``raised``,
    when given, gets the exception of a draft that raised."""
    draft = getattr(torch.export, "draft_export", None)
    if draft is None:
        return None
    try:
        with _quiet_torch(), warnings.catch_warnings(), _no_expression_logs():
            warnings.simplefilter("ignore")
            ep = draft(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001
        log.info("torch.export.draft_export failed too (%s: %s)", type(e).__name__, _first_line(e))
        if raised is not None:
            raised.append(e)
        return None
    failures = list(getattr(getattr(ep, "_report", None), "failures", ()))
    branches = [f for f in failures if getattr(f.failure_type, "name", "") == "DATA_DEPENDENT_ERROR"]
    if len(branches) != len(failures) or not branches or not all("expr" in f.data for f in branches):
        log.info("torch.export.draft_export reports other issues than branches on data: %s",
                 ", ".join(sorted({str(f.failure_type) for f in failures})) or "none")
        return None
    ep.otofx_branches = [(str(f.data["expr"]), str(f.data.get("result"))) for f in branches]
    by_symbol, by_expr, sizes = _scalars(ep.graph)
    asserted = _asserted(ep.graph)
    for cond, _ in ep.otofx_branches:
        # NB: with dynamic sizes, draft_export may fix a size it branched on (the report still names
        # its symbol): such a capture cannot check the branch; fewer dynamic sizes are tried next
        if _how_checked(cond, by_symbol, by_expr, sizes, asserted) is None:
            log.info("torch.export.draft_export: the branch %s cannot be checked on this graph", cond)
            return None
    _fix_packed_guards(ep, model)
    return ep


_UNBACKED = re.compile(r"\bu\d+\b")
_BACKED = re.compile(r"\bs\d+\b")


def _about_data_only(e: BaseException) -> bool:
    """Whether an export error (with its causes) names data-dependent sizes (``u0``) and no input size
    (``s0``): fewer dynamic input sizes would not change it."""
    names = []
    while e is not None and len(names) < 8:
        names.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(names)
    return bool(_UNBACKED.search(text)) and not _BACKED.search(text)


def _branch_asserts(graph: fx.Graph) -> list:
    """The graph's own runtime assertions on unbacked values (``u0``): draft_export asserts the values it
    decided a branch with (``u0 >= 1``, ``u0 <= 1`` for a True condition)."""
    return [n for n in graph.nodes if n.op == "call_function" and "_assert_scalar" in str(n.target)
            and len(n.args) > 1 and _UNBACKED.search(str(n.args[1]))]


def _asserted(graph: fx.Graph) -> set:
    """The unbacked symbols :func:`_branch_asserts` constrain."""
    return {u for n in _branch_asserts(graph) for u in _UNBACKED.findall(str(n.args[1]))}


def _how_checked(cond: str, by_symbol: dict, by_expr: dict, sizes: dict, asserted: set) -> str | None:
    """"graph" when the graph holds the values ``cond`` reads (a guard can be inserted), "asserted"
    when draft_export's own assertions constrain them, else None."""
    names = _symbols_of(cond)
    if cond in by_expr or (names and all(x in by_symbol or x in sizes for x in names)):
        return "graph"
    unbacked = [x for x in names if x.startswith("u")]
    return "asserted" if unbacked and all(x in asserted for x in unbacked) else None


def _symbols_of(cond: str) -> tuple:
    return tuple(sorted(set(re.findall(r"\b[usf]\d+\b", cond))))


def _scalars(graph: fx.Graph):
    """``(symbol -> node, expression text -> node, symbol -> (placeholder, dim))`` of a captured graph."""
    import sympy

    by_symbol, by_expr, sizes = {}, {}, {}
    for n in graph.nodes:
        v = n.meta.get("val")
        expr = getattr(getattr(v, "node", None), "expr", None)
        if isinstance(expr, sympy.Symbol):
            by_symbol.setdefault(str(expr), n)
        if isinstance(expr, sympy.Basic):
            by_expr.setdefault(str(expr), n)  # a scalar that is the condition itself (item() of a bool)
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):  # an input's size: read with sym_size where a guard needs it
                e = getattr(getattr(size, "node", None), "expr", None)
                if isinstance(e, sympy.Symbol):
                    sizes.setdefault(str(e), (n, d))
    return by_symbol, by_expr, sizes


DATA_BRANCHES = "otofx_data_branches"  # gm.meta key: the (condition, value) pairs the graph assumes
SIZE_BOUNDS = "otofx_size_bounds"  # gm.meta key: inputs just outside the sizes the graph admits (outside_inputs)


@fxcompat.mark_impure
class DataBranchGuard(torch.nn.Module):
    """Raises :class:`otofx.errors.ShapeError` when the values a branch of the model depends on give
    another outcome than on the example the graph was captured with (the graph holds that branch only)."""

    def __init__(self, expr: str, names: tuple, expected: str, label: str | None = None):
        super().__init__()
        self.expr, self.names, self.expected = expr, tuple(names), expected
        self.label = label or expr  # the condition as torch.export states it

    def _parsed(self):
        got = self.__dict__.get("_fn")
        if got is None:
            import sympy
            import torch.utils._sympy.functions as F

            symbols = [sympy.Symbol(n, integer=True) for n in self.names]
            scope = {n: getattr(F, n) for n in dir(F) if not n.startswith("_")}
            scope.update(dict(zip(self.names, symbols)))
            got = self.__dict__["_fn"] = (sympy.sympify(self.expr, locals=scope), symbols)
        return got

    def forward(self, *values):
        expr, symbols = self._parsed()
        v = expr.subs({s: (int(x) if not isinstance(x, float) else x) for s, x in zip(symbols, values)})
        got = str(bool(v)) if self.expected in ("True", "False") else str(v)
        if got != self.expected:
            raise ShapeError(f"this input takes another branch of the model than the example it was captured with "
                             f"({self.label} is {got}, was {self.expected}); {_BRANCH_HELP}")

    def extra_repr(self) -> str:
        return f"{self.label} == {self.expected}"


_BRANCH_HELP = ("the graph holds the example's branch only, as the analysis did: capture with an example that "
                "takes the branch you need")


@torch.fx.node.has_side_effect
def branch_assert(ok, message: str) -> None:
    """draft_export's runtime assertion on a value a branch was decided by, raising an otofx error."""
    if not ok:
        raise ShapeError(f"this input takes another branch of the model than the example it was captured with "
                         f"({message}); {_BRANCH_HELP}")


def _guard_branches(gm: fx.GraphModule, branches: list) -> None:
    """Insert a :class:`DataBranchGuard` for each ``(condition, value)`` after the scalars it reads."""
    by_symbol, by_expr, sizes = _scalars(gm.graph)
    asserted = _asserted(gm.graph)
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for i, (cond, value) in enumerate(branches):
        how = _how_checked(cond, by_symbol, by_expr, sizes, asserted)
        if how is None:
            raise CaptureError(f"the capture assumes {cond} == {value} but the graph holds no value it can check "
                               "that on")
        if how == "asserted":
            continue  # draft_export's own runtime assertions check it (made otofx errors below)
        if cond in by_expr:
            names, nodes, expr = ("c",), [by_expr[cond]], "c"
        else:
            names = _symbols_of(cond)
            for x in names:
                if x not in by_symbol:  # an input's size
                    with gm.graph.inserting_after(last_input):
                        by_symbol[x] = gm.graph.call_function(torch.ops.aten.sym_size.int, sizes[x])
            nodes, expr = [by_symbol[x] for x in names], cond
        order = {n: j for j, n in enumerate(gm.graph.nodes)}
        name = f"_otofx_branch_{i}"
        gm.add_submodule(name, DataBranchGuard(expr, names, value, label=cond))
        with gm.graph.inserting_after(max(nodes, key=order.__getitem__)):
            gm.graph.call_module(name, tuple(nodes))
    for n in _branch_asserts(gm.graph):  # draft_export's own assertions on the branch values: otofx's error
        n.target = branch_assert
    gm.meta[DATA_BRANCHES] = list(branches)
    gm.recompile()


# The capture with dynamic image sizes may take this many times the first capture's time (at least
# SPATIAL_MIN_SECONDS); past that it is abandoned and the image sizes stay static (logged). 0 turns it off.
SPATIAL_FACTOR = 1.0
SPATIAL_MIN_SECONDS = 5.0


class _ExportTimeout(BaseException):
    """Raised by the SIGALRM handler of :func:`_deadline` (a BaseException: export's own ``except
    Exception`` fallbacks must not swallow it)."""


@contextmanager
def _deadline(seconds: float):
    """Raise :class:`_ExportTimeout` in this thread after ``seconds`` (then every second until left).

    Yields False, and sets no timer, where a deadline cannot be set: not the main thread, no
    SIGALRM (Windows), or a timer the caller already runs.
    """
    import signal
    import threading

    if (not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield False
        return

    def _raise(signum, frame):
        raise _ExportTimeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _static_image_dims(ep, inputs) -> bool:
    """Whether an image input (see :func:`_is_image`) of ``ep`` has a static size beyond its channels."""
    flat = [t for t in tree_flatten(inputs)[0]]
    dims = _example_dims(ep)
    if len(dims) != len(flat):
        return False
    return any(_is_image(t) and d is not None and any(isinstance(e, int) for e in d[2:]) for t, d in zip(flat, dims))


STATIC_IMAGE_SIZES = "otofx_static_image_sizes"  # gm.meta key: the image sizes a graph is fixed to


def static_image_sizes(inputs) -> list:
    """The sizes beyond batch and channels of the image inputs of ``inputs`` (what a graph with
    static image dims accepts)."""
    return [tuple(t.shape[2:]) for t in tree_flatten(inputs)[0] if _is_image(t)]


def _spatial_capture(model, inputs, training: bool, budget: float, args, kwargs):
    """A capture with dynamic image sizes too (``dims="spatial"``), or ``(None, why not)``.

    Runs under a deadline of ``budget`` seconds; the graph must then run, in eval mode, at a second
    size of every dynamic dimension (:func:`second_inputs`: image sizes doubled), or it is not used
    (export's guards can admit only a few sizes: swin's window padding).
    """
    name = type(model).__name__
    if any(isinstance(t, torch.Tensor) and t.device.type == "meta"
           for t in [*tree_flatten(inputs)[0], *model.parameters()]):
        return None, "the weights are on the meta device (the graph cannot be run to check the sizes)"
    a, k = inputs
    # NB: the timeout is caught outside the deadline's context too: the alarm can fire between the
    # end of the export and the timer's reset
    try:
        with _deadline(budget) as armed:
            if not armed:
                return None, ("no deadline can be set here (not the main thread, or no SIGALRM), so the cost "
                              "is unbounded")
            with _mode(model, training), _quiet_torch():
                ep = torch.export.export(model, a, k, dynamic_shapes=_dynamic_shapes(model, a, k, "spatial"),
                                         strict=False)
                _fix_packed_guards(ep, model)
    except _ExportTimeout:
        return None, f"torch.export with dynamic image sizes took more than {budget:.1f} s"
    except Exception as e:  # noqa: BLE001
        return None, f"torch.export with dynamic image sizes failed ({type(e).__name__}: {_first_line(e)})"
    if _static_image_dims(ep, inputs):
        return None, "torch.export keeps the image sizes static (the model fixes them)"
    gm = _finish(ep, model, training)
    if not _pass_guards(gm, (args, kwargs)):
        # NB: captured on the example widened to a batch of 2, the guards may refuse the batch of 1
        # (YOLO12's area attention: ``4 * B * (h * w // 4) != h * w`` holds for B = 2 only): once more
        # from the example itself
        if inputs[0] is not args:
            return _spatial_capture(model, (args, kwargs), training, budget, args, kwargs)
        return None, "its graph refuses the example's own sizes"
    more = second_inputs(ep, args, kwargs, gm)
    if more is None:
        return None, "no second image size can be formed"
    try:
        with torch.no_grad(), _mode(gm, False):
            a, k = fresh_inputs(*more)
            gm(*a, **k)
    except Exception as e:  # noqa: BLE001
        shapes = [tuple(t.shape) for t in tree_flatten(more)[0] if _is_image(t)]
        return None, f"its graph refuses the image size {shapes} ({type(e).__name__}: {_first_line(e)})"
    if training:
        why = _training_capture_problem(gm, model, args, kwargs)
        if why:
            return None, f"the training-mode capture with dynamic image sizes {why}"
    log.debug("%s: captured with dynamic image sizes", name)
    return (ep, gm), ""


def _flag_node(gm: fx.GraphModule, model: torch.nn.Module, path: str, cache: dict, before: fx.Node) -> fx.Node:
    """A ``get_attr`` of ``<path>.training`` in ``gm``: the flag of the module that ran the op.

    The module at ``path`` is created in ``gm`` when missing (an empty ``nn.Module``; export keeps
    modules with tensors only), with the user's module's flag at capture time.
    """
    if path not in cache:
        owner = gm
        for item in path.split(".") if path else ():
            nxt = owner._modules.get(item)
            if nxt is None:
                nxt = owner._modules[item] = torch.nn.Module()
            owner = nxt
        try:
            owner.training = model.get_submodule(path).training if path else model.training
        except AttributeError:  # a path export recorded that is not a submodule
            owner.training = model.training
        first = next(n for n in gm.graph.nodes if n.op != "placeholder") if gm.graph.nodes else None
        # NB: fx warns on a get_attr of an attribute that is no parameter, buffer or module; a bool
        # flag is read as any other attribute by the generated code
        with gm.graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            node = gm.graph.get_attr(f"{path}.training" if path else "training")
        cache[path] = node
    return cache[path]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0] or ""


def _follow_mode(gm: fx.GraphModule, model: torch.nn.Module, captured_training: bool) -> list:
    """Make the mode-dependent ops of a captured graph read their module's ``training`` flag.

    ``captured_training``: the mode the graph was captured in; its literal flags are replaced.
    Dropout (``train``), batch norm with running statistics (``training``; its
    ``num_batches_tracked`` step adds the flag) and, from a training capture, the attention
    dropout of ``scaled_dot_product_attention`` (``dropout_p * training``). Returns the nodes
    rewritten.

    # NB: a literal ``F.dropout(x, training=True)`` (Monte-Carlo dropout) in a training capture,
    # or ``training=False`` in an eval capture, follows the mode too: the graph cannot tell it
    # from ``training=self.training``. A BatchNorm with ``momentum=None`` (a cumulative average)
    # keeps the factor of the capture-time step.
    """
    cache: dict = {}
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in _DROPOUTS and len(node.args) >= 3 and node.args[2] is captured_training:
            node.update_arg(2, _flag_node(gm, model, _module_path(node), cache, node))
        elif t is _aten.batch_norm.default and len(node.args) >= 6 and node.args[5] is captured_training \
                and node.args[3] is not None:
            node.update_arg(5, _flag_node(gm, model, _module_path(node), cache, node))
        elif t is _aten.add_.Tensor and captured_training and node.args[1] == 1 and \
                isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" and \
                node.args[0].target.endswith("num_batches_tracked"):
            path = node.args[0].target.rpartition(".")[0]
            node.update_arg(1, _flag_node(gm, model, path, cache, node))
        elif t is _aten.scaled_dot_product_attention.default and captured_training:
            # NB: (query, key, value, attn_mask, dropout_p, ...): dropout_p is the fifth argument
            i = 4 if len(node.args) > 4 else None
            p = node.args[4] if i is not None else node.kwargs.get("dropout_p", 0.0)
            if not isinstance(p, (int, float)) or not p:
                continue
            flag = _flag_node(gm, model, _module_path(node), cache, node)
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(operator.mul, (flag, float(p)))
            if i is not None:
                node.update_arg(i, scaled)
            else:
                node.update_kwarg("dropout_p", scaled)
        else:
            continue
        done.append(node)
    return done


# torch.nn.functional's mode-dependent calls in a symbolic trace: name -> position of ``training``
_TRACED_MODE_ARGS = {F.batch_norm: 5, F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2,
                     F.alpha_dropout: 2, F.feature_alpha_dropout: 2}


def _follow_mode_traced(gm: fx.GraphModule, model: torch.nn.Module) -> list:
    """:func:`_follow_mode` for a symbolic trace: ``F.batch_norm``/``F.dropout`` calls whose ``training``
    became a literal in the trace (a module's own forward traced through, as timm's ``BatchNormAct2d``
    and its ``F.dropout(x, p, self.training)`` heads) read their module's flag instead.

    # NB: without it the graph form ran batch norm with running statistics (and no dropout) in train
    # mode too. Only a literal equal to the module's flag at capture time is replaced: a different one
    # was written so on purpose. A batch norm without running statistics is left as it is.
    """
    cache: dict = {}
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _TRACED_MODE_ARGS:
            continue
        i = _TRACED_MODE_ARGS[node.target]
        in_args = len(node.args) > i
        flag = node.args[i] if in_args else node.kwargs.get("training")
        if not isinstance(flag, bool):
            continue
        if node.target is F.batch_norm and (node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")) is None:
            continue
        path = _module_path(node)
        try:
            owner = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if flag is not owner.training:
            continue
        new = _flag_node(gm, model, path, cache, node)
        if in_args:
            node.update_arg(i, new)
        else:
            node.update_kwarg("training", new)
        done.append(node)
    if done:
        gm.recompile()
    return done


def _example_dims(ep) -> list:
    """For every flattened example input of ``ep``: its size expressions (sympy) per dimension, or None."""
    out = []
    for n in ep.graph.nodes:
        if n.op != "placeholder" or n.name not in ep.graph_signature.user_inputs:
            continue
        v = n.meta.get("val")
        out.append(tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in v.shape)
                   if isinstance(v, torch.Tensor) else None)
    return out


def _flat_examples(ep, args: tuple, kwargs: dict) -> tuple:
    """``(flat inputs, their spec, size expressions per input, indices of the tensors)`` in export's
    input order, or Nones when the examples do not match ``ep``'s inputs."""
    in_spec = ep.call_spec.in_spec
    try:  # export orders keyword inputs as the signature does
        kwargs = {k: kwargs[k] for k in in_spec.child(1).context}
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    flat, spec = tree_flatten((tuple(args), kwargs))
    dims = _example_dims(ep)
    tensors = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)]
    if len(dims) != len(flat) or any(dims[i] is None or len(dims[i]) != flat[i].dim() for i in tensors):
        return None, None, None, None
    return flat, spec, dims, tensors


def second_inputs(ep, args: tuple, kwargs: dict, gm: fx.GraphModule | None = None):
    """Example inputs of another shape along every dimension ``ep`` made dynamic, or None.

    Every free symbol of the input sizes takes its value in ``args``/``kwargs`` plus one (minus
    one when that leaves export's range), an image size (:func:`_is_image`) twice its value (strides
    and windows keep dividing it); each size expression is evaluated with those values. With ``gm``,
    the inputs must pass its guards, or the next step of ``_STEPS`` (2, 3, 4...) is tried instead.
    Inputs are the examples tiled (indices wrap) to the new sizes, so token ids and masks stay
    valid and floats stay non-trivial. Returns ``(args, kwargs)``.
    """
    flat, spec, dims, tensors = _flat_examples(ep, args, kwargs)
    if flat is None:
        return None
    symbols, image = {}, set()
    for i, d in enumerate(dims):
        if d is None:
            continue
        for k, e in enumerate(d):
            if not isinstance(e, int) and len(e.free_symbols) == 1 and e.is_Symbol:
                symbols.setdefault(e, flat[i].shape[k])
                if k >= 2 and _is_image(flat[i]):
                    image.add(e)
    if not symbols:
        return None
    for step in _STEPS:
        got = _inputs_at(ep, symbols, image, step, flat, dims, tensors, spec)
        if got is not None and _pass_guards(gm, got):
            return got
    return None


def outside_inputs(ep, args: tuple, kwargs: dict) -> list:
    """``[(what, (args, kwargs))]``: for every input size whose range ``ep`` narrowed (a branch on it:
    ``if x.shape[-1] > 32`` gives 33..inf), the examples tiled to the size just outside the range,
    every other size as in the example. The graph refuses them (its guards); the model's own class
    runs its other branch there, which the analysis never saw (``OTO.compress`` checks it against
    the model). A range of 2..inf is export's default; an upper bound more than 4 times the example's
    size (a position table's length) is not tried."""
    flat, spec, dims, tensors = _flat_examples(ep, args, kwargs)
    if flat is None:
        return []
    symbols = {}
    for i, d in enumerate(dims):
        for k, e in enumerate(d or ()):
            if not isinstance(e, int) and e.is_Symbol:
                symbols.setdefault(e, flat[i].shape[k])
    # NB: torch's int_oo says is_finite; a bound is a number when it is an int or a sympy Integer
    finite = lambda b: isinstance(b, int) or getattr(b, "is_Integer", False)  # noqa: E731
    out = []
    for s, v in symbols.items():
        r = ep.range_constraints.get(s)
        if r is None:
            continue
        lo, hi = r.lower, r.upper
        tries = [int(lo) - 1] if finite(lo) and int(lo) > 2 else []
        if finite(hi) and int(hi) + 1 <= 4 * max(int(v), 1):
            tries.append(int(hi) + 1)
        for value in tries:
            got = _tiled_at({**symbols, s: value}, flat, dims, tensors, spec)
            if got is not None:
                out.append((f"a size of {value} where the capture admits {lo}..{hi}", got))
    return out


# NB: a size can be tied to others by a relation export records as a guard, not as a range (DeepSeek
# V4 compresses the sequence in blocks of 4: 16 * L == 64 * (L // 4)); the first of these steps whose
# inputs pass the graph's guards is taken
_STEPS = (1, 2, 3, 4, 8, 16)


def _inputs_at(ep, symbols: dict, image: set, step: int, flat: list, dims: list, tensors: list, spec):
    new = {}
    for s, v in symbols.items():
        r = ep.range_constraints.get(s)
        up = r.upper if r is not None else None
        d = v if s in image else step
        new[s] = v + d if up is None or bool(v + d <= up) else max(v - d, 1)
    return _tiled_at(new, flat, dims, tensors, spec)


def _tiled_at(new: dict, flat: list, dims: list, tensors: list, spec):
    """The flat example inputs tiled to the sizes their size expressions take at symbol values ``new``."""
    out = list(flat)
    for i in tensors:
        sizes = []
        for e in dims[i]:
            if isinstance(e, int):
                sizes.append(e)
                continue
            try:
                sizes.append(int(e.subs(new)))
            except (TypeError, ValueError):
                return None
        out[i] = tile_to(flat[i], sizes)
    a, k = tree_unflatten(out, spec)
    return tuple(a), dict(k)


def _second_shape_unless_data_sized(gm: fx.GraphModule, more, model: torch.nn.Module):
    """``more`` (second-shape inputs), or None when ``gm`` asserts on a data-dependent size (``u0 >= 2``:
    a count of boxes NMS kept, of nonzero entries). Whether another input passes such an assertion
    depends on the weights, which training and zeroed rows change: the graph may refuse the second
    shape later though it runs now, so verification runs on the example inputs only."""
    asserts = _branch_asserts(gm.graph)
    if more is None or not asserts:
        return more
    log.info("%s: its graph asserts on data-dependent sizes (%s): verification runs on the example inputs only, "
             "not on a second shape", type(model).__name__, _first_line(str(asserts[0].args[1])))
    return None


def _pass_guards(gm: fx.GraphModule | None, inputs) -> bool:
    """Whether ``inputs`` (args, kwargs) pass ``gm``'s input guards (True without a graph or guards)."""
    guards, call = fxcompat.export_guards(gm) if gm is not None else (None, None)
    if guards is None or call is None:
        return True
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = tree_flatten(inputs)[0]
    if len(flat) != len(placeholders):
        return True
    env = dict(zip(placeholders, flat))
    try:
        guards(*[env.get(a, a) for a in call.args])
    except (AssertionError, ShapeError):
        return False
    return True


def tile_to(t: torch.Tensor, sizes) -> torch.Tensor:
    """``t`` tiled (indices wrap) to ``sizes``, dim by dim: the second-shape inputs' rule."""
    for k, n in enumerate(sizes):
        if n != t.shape[k]:
            t = t.index_select(k, torch.arange(n, device=t.device) % t.shape[k])
    return t


def export_captured(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    """torch.export front-end: dynamic sizes, a graph that follows the training flags, dead code out.

    The model is captured in training mode (every flag set, then restored) so that dropout and
    batch statistics are in the graph; :func:`_follow_mode` makes them read the flags. If random
    ops remain that no flag controls, or the graph in eval mode differs from the model in eval
    mode (a Python branch on ``self.training`` that changes more than dropout), the capture is
    redone in eval mode, where only dropout and batch norm can be made to follow the flags
    (directly, for a model with a module known to draw such numbers: see ``_STOCHASTIC_MODULES``).
    """
    t0 = time.perf_counter()
    with _no_kv_cache(model, kwargs), _capturable_experts(model), warnings.catch_warnings():
        # NB: export notes that nn.LSTM/GRU/RNN re-assign their ``_flat_weights`` list in forward;
        # they are the layers' own parameters, restored after, and the graph reads them by name
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[")
        # NB: torchvision's fake NMS (a data-dependent count of boxes) calls a torch API it deprecates
        warnings.filterwarnings("ignore", message=r"`create_unbacked_symint` is deprecated")
        stochastic = _stochastic_module(model)
        training = True
        if stochastic:
            why = f"would hold {stochastic}'s random draws"
        else:
            try:
                with _mode(model, True):
                    ep, used, dims = _export_program(model, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a training-only branch export cannot follow
                why = f"failed ({type(e).__name__}: {_first_line(e)})"
            else:
                try:
                    gm = _finish(ep, model, True)
                except CaptureError as e:  # a branch on data the graph cannot check
                    why = f"cannot be checked ({_first_line(e)})"
                else:
                    why = _training_capture_problem(gm, model, args, kwargs)
        if why:
            log.info("%s: the training-mode capture %s; capturing in eval mode (its training mode keeps "
                     "dropout and batch statistics only)", type(model).__name__, why)
            training = False
            with _mode(model, False):
                ep, used, dims = _export_program(model, args, kwargs)
            gm = _finish(ep, model, False)
        if dims == "all" and SPATIAL_FACTOR > 0 and _static_image_dims(ep, used):
            budget = max(SPATIAL_MIN_SECONDS, SPATIAL_FACTOR * (time.perf_counter() - t0))
            got, why = _spatial_capture(model, used, training, budget, args, kwargs)
            if got is not None:
                ep, gm = got
            else:
                sizes = static_image_sizes(used)
                gm.meta[STATIC_IMAGE_SIZES] = sizes
                log.info("%s: image sizes stay static: %s. The graph form (compress(form='graph'), or form='auto' "
                         "when the model's own class cannot be re-sized) accepts image size %s only; the model's "
                         "own class accepts any size the model does", type(model).__name__, why,
                         ", ".join("x".join(map(str, s)) for s in sizes))
    more = _second_shape_unless_data_sized(gm, second_inputs(ep, args, kwargs, gm), model)
    outside = outside_inputs(ep, args, kwargs)
    if outside:
        gm.meta[SIZE_BOUNDS] = outside
    dyn = [f"input {i} dims {', '.join(str(k) for k, e in enumerate(d) if not isinstance(e, int))}"
           for i, d in enumerate(_example_dims(ep)) if d is not None and not all(isinstance(e, int) for e in d)]
    log.info("%s exported with %s", type(model).__name__, f"dynamic {'; '.join(dyn)}" if dyn else "static shapes")
    return Captured(gm, args, kwargs, "export", (more,) if more is not None else ())


@fxcompat.mark_impure  # NB: fx's dead-code elimination keeps a call_module only if its module says so
class SizeGuards(torch.nn.Module):
    """torch.export's input guards (the graph's ``_guards_fn``), raising :class:`otofx.errors.ShapeError`
    instead of torch's bare ``AssertionError: Guard failed ...`` when an input has a size the capture
    left static: the error names the input, its size and the size the graph takes."""

    def __init__(self, guards: torch.nn.Module, inputs: tuple):
        super().__init__()
        self.guards = guards
        self.inputs = inputs  # per guarded input: (name, dims: int where static, None where dynamic) or None

    def forward(self, *args):
        try:
            return self.guards(*args)
        except AssertionError as e:
            if not str(e).startswith("Guard failed"):
                raise
            raise ShapeError(self._message(args, str(e).removeprefix("Guard failed: "))) from None

    def _message(self, args, guard: str) -> str:
        def fmt(dims):
            return "(" + ", ".join("any" if d is None else str(d) for d in dims) + ")"

        what = None
        for a, spec in zip(args, self.inputs):
            if spec is None or not isinstance(a, torch.Tensor):
                continue
            name, dims = spec
            if a.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, a.shape)):
                what = (f"input '{name}' has size {tuple(a.shape)}, but this graph takes '{name}' of size "
                        f"{fmt(dims)} only ('any': a dimension the capture made dynamic)")
                break
        if what is None:
            sizes = ", ".join(f"'{s[0]}' {tuple(a.shape)}" for a, s in zip(args, self.inputs)
                              if s is not None and isinstance(a, torch.Tensor))
            what = f"the inputs ({sizes}) fail the size condition the capture recorded"
        return (f"{what} (torch.export's guard: {guard}). The graph form keeps the sizes its capture left "
                "static. For a model that takes every size the original does, use the model's own class: "
                "oto.compress() or oto.compress(form='module'); or let the capture make image sizes dynamic "
                "(otofx.capture.SPATIAL_FACTOR and SPATIAL_MIN_SECONDS set its time budget) and compress again.")


def _readable_guards(gm: fx.GraphModule, ep) -> None:
    """Wrap ``gm._guards_fn`` (torch.export's input guards) in :class:`SizeGuards`."""
    guards, call = fxcompat.export_guards(gm)
    if guards is None or call is None or isinstance(guards, SizeGuards):
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims = _example_dims(ep)
    by_node = {n: (n.name, tuple(d if isinstance(d, int) else None for d in e)) if e is not None else None
               for n, e in zip(placeholders, dims)} if len(dims) == len(placeholders) else {}
    fxcompat.set_export_guards(gm, SizeGuards(guards, tuple(by_node.get(a) for a in call.args)))


def said_branches(branches, width: int = 120) -> str:
    """``"cond is value; ..."`` for a log line: the first four, each cut to about ``width`` characters (a
    detector's may sum a hundred terms, one per class), and how many more."""
    def short(c: str) -> str:
        return c if len(c) <= width else f"{c[:width * 2 // 3]} ... {c[-(width // 3):]}"
    said = "; ".join(f"{short(c)} is {v}" for c, v in branches[:4])
    return said + (f"; and {len(branches) - 4} more" if len(branches) > 4 else "")


def _finish(ep, model, captured_training: bool) -> fx.GraphModule:
    built = getattr(ep, "otofx_module", None)
    ep.otofx_module = None  # NB: the module is the graph _finish edits: a second call builds its own
    gm = _inline_grad_regions(built if built is not None else ep.module())
    branches = getattr(ep, "otofx_branches", None)
    if branches:
        _guard_branches(gm, branches)
        log.warning("%s branches on tensor values (%s); the graph follows the example's branch and raises on an "
                    "input that takes another. The analysis sees that branch only.", type(model).__name__,
                    said_branches(branches))
    functionalize_slice_writes(gm)
    _readable_guards(gm, ep)
    _follow_mode(gm, model, captured_training)
    # NB: export keeps values nothing reads (nn.MultiheadAttention's head-averaged weights when
    # the caller drops them); an unused mean over heads must not pin the heads. The graph is
    # functional aten, so fx's purity check is sound here (asserts and guards are kept).
    keep = _dead_weight_reads(gm)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n in keep or n.is_impure())
    gm.recompile()
    return gm


def _dead_weight_reads(gm: fx.GraphModule) -> set:
    """The dead nodes of ``gm`` that read a parameter no live node reads, and the dead nodes they read.

    # NB: a module whose result the forward drops (BertModel's pooler under sentence-transformers,
    # which keeps the token states only) still runs in the model's own class: dropping its nodes
    # would leave its parameters unread, at their old widths, and the re-sized model would fail
    # there. Kept, the analysis sizes them with what they read (their results have no reader)."""
    probe = fx.Graph(owning_module=gm)
    probe.output(probe.graph_copy(gm.graph, {}))  # NB: graph_copy leaves the output node out
    probe.eliminate_dead_code()
    live_names = {n.name for n in probe.nodes}
    live = {n for n in gm.graph.nodes if n.name in live_names}
    dead = [n for n in gm.graph.nodes if n not in live]
    if not dead:
        return set()
    params = {n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(get_path(gm, n.target), nn.Parameter)}
    read_live = {p for p in params if any(u in live for u in p.users)}
    keep: set = set()
    todo = [n for n in dead if n.op != "get_attr" and any(a in params and a not in read_live for a in n.all_input_nodes)]
    while todo:
        n = todo.pop()
        if n in keep or n in live:
            continue
        keep.add(n)
        todo.extend(n.all_input_nodes)
    if keep:
        log.debug("keeping %d dead node(s) that read parameters nothing else reads", len(keep))
    return keep


def _training_capture_problem(gm: fx.GraphModule, model, args, kwargs) -> str | None:
    random = sorted({fxcompat.op_schema(n.target).name.split("::")[-1] for n in gm.graph.nodes if _is_random(n)})
    if random:
        return f"draws random numbers outside dropout ({', '.join(random)})"
    tensors = [*tree_flatten((args, kwargs))[0], *model.parameters(), *model.buffers()]
    if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors):
        # NB: nothing can be computed on the meta device (analysis without weights); the graph
        # follows the modules' flags, and compress() verifies it once the weights are real
        log.debug("%s: on the meta device, the eval-mode comparison of the capture is skipped", type(model).__name__)
        return None
    with torch.no_grad(), _mode(model, False), _mode(gm, False):
        a, k = fresh_inputs(args, kwargs)
        ref = model(*a, **k)
        a, k = fresh_inputs(args, kwargs)
        got = gm(*a, **k)
    fr, fg = tree_flatten(ref)[0], tree_flatten(got)[0]
    if len(fr) != len(fg):
        return "returns other outputs than the eval-mode model"
    for a, b in zip(fr, fg):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return "returns other outputs than the eval-mode model"
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape:
                return "returns other shapes than the eval-mode model"
            if a.is_floating_point():
                scale = max(1.0, a.double().abs().max().item() if a.numel() else 0.0)
                if a.numel() and (a.double() - b.double()).abs().max().item() > 1e-4 * scale:
                    return "differs from the eval-mode model in eval mode"
            elif not torch.equal(a, b):
                return "differs from the eval-mode model in eval mode"
    return None


def export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The GraphModule of :func:`export_captured`."""
    return export_captured(model, args, kwargs).gm


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


FRONTENDS = ("auto", "symbolic_trace", "export", "parts")


def capture(model: torch.nn.Module, example_inputs, frontend: str = "auto") -> Captured:
    """Capture ``model``: symbolic_trace first, torch.export if that fails (``frontend`` forces one)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise InputError(f"frontend={frontend!r}: choose one of {FRONTENDS}")
    args, kwargs = normalize_inputs(example_inputs)
    if frontend == "parts":
        from otofx.capture_parts import parts_captured

        return parts_captured(model, args, kwargs, f"otofx captures {type(model).__name__} in parts (frontend='parts').",
                              asked=True)
    if frontend == "export":
        try:
            return export_captured(model, args, kwargs)
        except Exception as e:  # noqa: BLE001
            hint = _missing_masks_hint(model, kwargs, e)
            raise CaptureError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {_first_line(e)}"
                               + (f"\n{hint}" if hint else "")) from e
    try:
        gm = trace(model)
        nones = _none_arguments(model, args, kwargs)
        if nones:
            # NB: a proxy is never None, so ``if mask is not None:`` traced the branch the example does not
            # take; the graph is traced again with those arguments fixed at None (it raises on another value)
            try:
                gm = trace(model, nones)
            except Exception as e:  # noqa: BLE001 - the first graph stands
                log.info("symbolic_trace with %s fixed at None failed (%s: %s)", ", ".join(nones), type(e).__name__,
                         _first_line(e))
        opaque = _opaque_calls(gm)
        if opaque and frontend == "auto":
            # NB: fx.wrap'ed Python functions (torchvision's shifted_window_attention) are single opaque
            # nodes to symbolic_trace, which would pin everything they touch; export sees inside them
            try:
                log.info("symbolic_trace left %s opaque; trying torch.export", ", ".join(sorted(opaque)))
                return export_captured(model, args, kwargs)
            except Exception as e:  # noqa: BLE001
                log.info("torch.export failed (%s: %s); keeping the traced graph", type(e).__name__, _first_line(e))
        _follow_mode_traced(gm, model)
        return Captured(gm, args, kwargs, "symbolic_trace")
    except Exception as e:  # noqa: BLE001
        trace_err = e
        if frontend == "symbolic_trace":
            raise CaptureError(f"torch.fx.symbolic_trace failed on {type(model).__name__}: "
                               f"{type(e).__name__}: {_first_line(e)}") from e
        log.info("symbolic_trace failed (%s: %s); trying torch.export", type(e).__name__, e)
    try:
        return export_captured(model, args, kwargs)
    except Exception as e:  # noqa: BLE001
        export_err = e
    hint = _missing_masks_hint(model, kwargs, export_err) or _packed_sequence_hint(export_err, trace_err)
    why = (f"otofx could not capture {type(model).__name__}.\n"
           f"  torch.fx.symbolic_trace failed: {type(trace_err).__name__}: {_first_line(trace_err)}\n"
           f"  torch.export (non-strict) failed: {type(export_err).__name__}: {_first_line(export_err)}"
           f"{_raised_at(export_err)}\n"
           + (hint or "Python control flow that depends on tensor values cannot be captured: move it out of "
              "forward, make it depend on shapes or module attributes only, or wrap the offending submodule "
              "so that it is called as a leaf (it will then be pinned)."))
    if hint is None:
        # NB: the submodules that hold the weights (a detector's backbone and heads) are often
        # capturable where the forward around them is not
        from otofx.capture_parts import parts_captured

        try:
            return parts_captured(model, args, kwargs, why)
        except CaptureError as e:
            raise e from export_err
    raise CaptureError(why) from export_err


def _none_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of ``model.forward`` the example gives as None or leaves at a None default."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {}
    out = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if (bound[name] if name in bound else p.default) is None:
            out[name] = None
    return out


def _missing_masks_hint(model: torch.nn.Module, kwargs: dict, err: Exception) -> str | None:
    """What to pass when the export failed on a None value and ``forward`` has mask arguments the
    example left out (transformers builds its default attention mask only outside of torch.export,
    so e.g. SwitchTransformers and LongT5 then index None), or None."""
    if not isinstance(err, (TypeError, AttributeError)) or "NoneType" not in str(err):
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    missing = [n for n, p in params.items() if n.endswith("mask") and p.default is None and n not in kwargs]
    if not missing:
        return None
    return (f"The export ran {type(model).__name__}.forward with {', '.join(missing)} left None and failed on a "
            "None value: pass them in the example inputs (e.g. attention_mask=torch.ones_like(input_ids); "
            "transformers builds its default mask only outside of torch.export).")


def _packed_sequence_hint(*errors: BaseException) -> str | None:
    """What to do when a capture failed inside ``torch.nn.utils.rnn`` (``pack_padded_sequence`` reads
    its sizes off the lengths' values, which neither front-end can trace), or None."""
    for e in errors:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("torch/nn/utils/rnn.py"):
                return ("The capture failed in torch.nn.utils.rnn: pack_padded_sequence takes its sizes from the "
                        "lengths' values, which neither symbolic_trace nor torch.export can follow. Packing changes "
                        "no width: give forward a switch that skips it (the recurrent layer then runs on the padded "
                        "batch), analyse with packing off, and set it back on the compressed model, its own class, "
                        "which packs as before and is exact on packed input (tests/test_recurrent.py).")
            tb = tb.tb_next
    return None


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


# torch's data-dependent guard errors end with the user's line that raised them
_RAISED_AT = re.compile(r"The following call raised this error:\s*\n\s*"
                        r"File \"([^\"]+)\", line (\d+), in (\S+)\n\s*(.*)")


def _raised_at(e: BaseException) -> str:
    """``" at file:line in function: `code`"`` where torch says a data-dependent guard was raised
    (``e`` or its causes), else ``""``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        hit = _RAISED_AT.search(str(e))
        if hit:
            path, line, fn, code = hit.groups()
            return f" at {path}:{line} in {fn}: `{code.strip()}`"
        e = e.__cause__ or e.__context__
    return ""
