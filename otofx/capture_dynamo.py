"""The dynamo front-end: a graph dynamo captured, normalised to the IR every pass reads.

``torch.compile`` hands a backend each graph it captures with the module state (parameters and
buffers) as placeholders and ``nn.MultiheadAttention`` inlined into
``F.multi_head_attention_forward``. :func:`lift` turns the state into ``get_attr`` nodes on a new
root named as in the model (``layer1.0.conv1.weight``), and :func:`restore_attention` puts the
attention module back, so the graph is the one the symbolic_trace and export front-ends
(``otofx.capture``) give, and no pass asks which front-end ran. :func:`capture` runs dynamo on a
model once and returns that graph as an ``otofx.capture.Captured`` (``frontend="dynamo"``;
``Capture("dynamo")`` in a pipeline); ``otofx.backend`` (``torch.compile(backend="otofx")``)
lifts every fragment it is given.

Internals:
    * Dynamo passes parameters and buffers as placeholders (``inline_inbuilt_nn_modules``); the
      example tensors *are* the module's tensors. A placeholder is state when its example is an
      ``nn.Parameter`` or its dynamo source is a module buffer (``..._buffers['running_mean']``).
      The root holds the original tensor under its model name (read off the source). Under
      ``torch._inductor.config.freezing`` dynamo already emits ``get_attr`` nodes (named like
      ``L__self___conv1_weight``); they are kept.
    * Attention: calls :func:`restore_attention` cannot map exactly (separate q/k/v weights, static
      keys, training mode) are left as they are, and the analysis pins them.
    * dynamo's private names (the placeholder's source, fake tensors) are read through
      ``otofx.fxcompat``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from otofx.capture import Captured, _no_kv_cache, normalize_inputs
from otofx.errors import CaptureError, InputError
from otofx.verify import fresh_inputs
from otofx.fxcompat import FakeTensor, copy_graph, grapharg_source, keep_codegen
from otofx.passes.nodes import get_path

# ---------------------------------------------------------------------------------------------
# Lifting dynamo's state placeholders into the graph
# ---------------------------------------------------------------------------------------------

_SOURCE_PART = re.compile(r"\._(modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")
_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def _is_state(node: fx.Node, example) -> bool:
    if not isinstance(example, torch.Tensor):
        return False
    return isinstance(example, torch.nn.Parameter) or "._buffers[" in grapharg_source(node)


def _model_name(node: fx.Node) -> str | None:
    """``layer1.0.conv1.weight`` from dynamo's ``L['self']._modules['layer1']...._parameters['weight']``."""
    parts = _SOURCE_PART.findall(grapharg_source(node))
    if not parts or parts[-1][0] == "modules":
        return None
    return ".".join(p for _, p in parts)


def _register_at(root: torch.nn.Module, path: str, value) -> bool:
    """Register ``value`` at dotted ``path`` under ``root`` (creating container modules); False on a clash."""
    *mods, attr = path.split(".")
    obj = root
    for part in mods:
        if not part.isidentifier() and not part.isdigit():
            return False
        nxt = obj._modules.get(part)
        if nxt is None:
            if hasattr(obj, part):
                return False
            nxt = torch.nn.Module()
            obj.add_module(part, nxt)
        obj = nxt
    if not (attr.isidentifier() or attr.isdigit()) or hasattr(obj, attr):
        return False
    if isinstance(value, torch.nn.Parameter):
        obj.register_parameter(attr, value)
    elif isinstance(value, torch.Tensor):
        obj.register_buffer(attr, value)
    elif isinstance(value, torch.nn.Module):
        obj.add_module(attr, value)
    else:
        setattr(obj, attr, value)
    return True


@dataclass(frozen=True)
class Lifted:
    """A dynamo graph with its state as ``get_attr``: see :func:`lift`."""

    gm: fx.GraphModule  # state as get_attr on a root that holds the original tensors
    inputs: tuple  # positions, in dynamo's argument list, of the remaining placeholders
    watched: tuple  # (position or None, tensor): the state the pruned graph depends on


def state_names(gm: fx.GraphModule, example_inputs) -> tuple:
    """Per placeholder: its model name (``""`` when dynamo's source gives none) if it is a
    parameter or buffer, else None.

    # NB: read once, at compile time: dynamo drops ``node.meta["grapharg"]`` after the backend
    # returns, and a rebuild at call time must classify the placeholders the same way.
    """
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        raise InputError(f"the graph has {len(phs)} placeholders but dynamo gave {len(example_inputs)} "
                         "example inputs; please report this with the model")
    return tuple((_model_name(n) or "") if _is_state(n, e) else None for n, e in zip(phs, example_inputs))


def lift(gm: fx.GraphModule, example_inputs, names: tuple | None = None) -> Lifted:
    """Turn dynamo's parameter and buffer placeholders into ``get_attr`` nodes on a new root module.

    The root holds the *original* tensors (no copy) under their model names, plus every attribute
    and submodule the graph already reads. ``names`` is :func:`state_names`'s answer (computed
    here when not given). ``gm`` is not modified.
    """
    if names is None:
        names = state_names(gm, example_inputs)
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict = {}
    watched, inputs = [], []
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        raise InputError(f"the graph has {len(phs)} placeholders but got {len(example_inputs)} inputs; "
                         "please report this with the model")
    where = {n: i for i, n in enumerate(phs)}
    used: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and names[where[node]] is not None:
            i = where[node]
            t, name = example_inputs[i], names[i]
            if not name or name in used or not _register_at(root, name, t):
                name = f"_state_{len(watched)}"
                _register_at(root, name, t)
            used.add(name)
            watched.append((i, t))
            new = graph.get_attr(name)
        elif node.op in ("get_attr", "call_module"):
            if node.target not in used:
                value = get_path(gm, node.target)
                if not _register_at(root, node.target, value):
                    raise InputError(f"node '{node.name}': cannot place '{node.target}' in the lifted graph; "
                                     "please report this with the model")
                used.add(node.target)
                if isinstance(value, torch.Tensor):
                    watched.append((None, value))
                elif isinstance(value, torch.nn.Module):
                    watched.extend((None, t) for t in list(value.parameters()) + list(value.buffers()))
            new = graph.node_copy(node, lambda a: env[a])
        elif node.op == "placeholder":
            inputs.append(where[node])
            new = graph.node_copy(node, lambda a: env[a])
        elif _size_literal(node):
            # NB: a shape built from symbolic sizes, ``torch.Size([s0, s1, 128])`` (dynamic shapes), is
            # inlined into its readers as the tuple it is: the reshape rules read and rewrite literal
            # shapes in their own arguments, not inside another node
            env[node] = tuple(fx.node.map_arg(node.args[0], lambda a: env[a]))
            continue
        else:
            new = graph.node_copy(node, lambda a: env[a])
        new.meta = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
        env[node] = new
    keep_codegen(graph, gm.graph)
    lifted = fx.GraphModule(root, graph, "OTOFragment")
    return Lifted(lifted, tuple(inputs), tuple(watched))


def _size_literal(node: fx.Node) -> bool:
    """``torch.Size(list)`` read only as an argument of other calls (never returned, never the
    object of a method call), so that the plain tuple can stand in for it."""
    if node.op != "call_function" or node.target is not torch.Size or node.kwargs or len(node.args) != 1 \
            or not isinstance(node.args[0], (list, tuple)):
        return False
    return all(u.op == "call_function" or (u.op == "call_method" and u.args[0] is not node) for u in node.users)


# ---------------------------------------------------------------------------------------------
# Passes of the backend pipeline
# ---------------------------------------------------------------------------------------------

_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
# F.multi_head_attention_forward's tensor arguments -> the nn.MultiheadAttention attribute holding them
_MHA_TENSORS = {"in_proj_weight": "in_proj_weight", "in_proj_bias": "in_proj_bias", "bias_k": "bias_k",
                "bias_v": "bias_v", "out_proj_weight": "out_proj.weight", "out_proj_bias": "out_proj.bias"}


def _mha_call(node: fx.Node) -> dict | None:
    if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
        return None
    kw = dict(zip(_MHA_ARGS, node.args))
    kw.update(node.kwargs)
    return kw


def restore_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """``F.multi_head_attention_forward`` over get_attr weights -> a call of ``nn.MultiheadAttention``.

    The module holds the same tensors (nothing is copied), so the analysis sees the op it has a
    rule for. When the weights sit in one container module of :func:`lift`'s (``...self_attention
    .in_proj_weight``), the module replaces that container and every name stays; otherwise
    (freezing's flat attribute names) it is added as ``attention_<i>`` and the old attributes go.
    Calls it cannot map exactly (separate q/k/v weights, static keys, training mode) are left as
    they are, and the analysis pins them.
    """
    if not any(_mha_call(n) is not None for n in gm.graph.nodes):
        return gm
    graph = copy_graph(gm.graph)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    changed = False
    for node in [n for n in graph.nodes if _mha_call(n) is not None]:
        kw = _mha_call(node)
        tensors = _mha_tensors(kw)
        if tensors is None or any(isinstance(kw.get(k), fx.Node) for k in ("embed_dim_to_check", "num_heads",
                                                                            "add_zero_attn")):
            continue
        prefix = _mha_container(new, tensors)
        module = _build_mha(new, tensors, kw)
        in_place = prefix is not None  # the same names now resolve into the module
        if in_place:
            parent, _, attr = prefix.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, attr, module)
        else:
            prefix = next(f"attention_{i}" for i in itertools.count() if not hasattr(new, f"attention_{i}"))
            new.add_module(prefix, module)
        with graph.inserting_before(node):
            call = graph.call_module(prefix, (kw["query"], kw["key"], kw["value"]), {
                "key_padding_mask": kw.get("key_padding_mask"), "need_weights": kw.get("need_weights", True),
                "attn_mask": kw.get("attn_mask"), "average_attn_weights": kw.get("average_attn_weights", True),
                "is_causal": kw.get("is_causal", False)})
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for n in tensors.values():
            if not n.users:
                graph.erase_node(n)
                if not in_place and not any(m.op == "get_attr" and m.target == n.target for m in graph.nodes):
                    owner, _, attr = n.target.rpartition(".")
                    delattr(new.get_submodule(owner) if owner else new, attr)
        changed = True
    if not changed:
        return gm
    new.recompile()
    return new


def _mha_tensors(kw: dict) -> dict | None:
    """The call's tensor arguments (get_attr nodes) by module attribute, or None if it cannot be mapped."""
    if kw.get("training", True) or kw.get("use_separate_proj_weight", False) or kw.get("static_k") is not None \
            or kw.get("static_v") is not None:
        return None
    out = {}
    for arg, attr in _MHA_TENSORS.items():
        v = kw.get(arg)
        if v is None:
            continue
        if not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return None
        out[attr] = v
    return out if {"in_proj_weight", "out_proj.weight"} <= set(out) else None


def _mha_container(gm: fx.GraphModule, tensors: dict) -> str | None:
    """The path of a plain container module holding exactly these tensors under MHA's names, or None."""
    prefix = tensors["in_proj_weight"].target.rpartition(".")[0]
    if not prefix or any(n.target != f"{prefix}.{attr}" for attr, n in tensors.items()):
        return None
    owner = gm.get_submodule(prefix)
    if type(owner) is not torch.nn.Module:  # only containers (lift's) are replaced, never a user module
        return None
    names = {n for n, _ in owner.named_parameters()} | {n for n, _ in owner.named_buffers()}
    return prefix if names == set(tensors) else None


def _build_mha(gm: fx.GraphModule, tensors: dict, kw: dict) -> torch.nn.MultiheadAttention:
    t = {attr: get_path(gm, n.target) for attr, n in tensors.items()}
    w = t["in_proj_weight"]
    # NB: under dynamic=True dynamo passes a float as a graph input (dropout_p is then a node); the call
    # is in eval mode (_mha_tensors), where the module never reads its dropout
    p = kw.get("dropout_p", 0.0)
    m = torch.nn.MultiheadAttention(int(kw["embed_dim_to_check"]), int(kw["num_heads"]),
                                    dropout=0.0 if isinstance(p, fx.Node) else float(p), bias="in_proj_bias" in t,
                                    add_bias_kv="bias_k" in t, add_zero_attn=bool(kw.get("add_zero_attn", False)),
                                    batch_first=False, device="meta", dtype=w.dtype)
    for attr in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        if attr in t:
            setattr(m, attr, t[attr])
    m.out_proj.weight = t["out_proj.weight"]
    m.out_proj.bias = t.get("out_proj.bias")
    m.train(False)
    return m


def capture(model: torch.nn.Module, example_inputs) -> Captured:
    """Run ``model`` once under dynamo (whole graph, static shapes) and return its graph, lifted
    and with attention modules restored, as a :class:`otofx.capture.Captured`.

    The model is not modified; the graph's ``get_attr`` nodes read the model's own tensors.
    """
    args, kwargs = normalize_inputs(example_inputs)
    got: list = []

    def grab(gm: fx.GraphModule, example: list):
        # NB: state names are read here: dynamo drops the placeholders' sources after we return
        got.append((gm, list(example), state_names(gm, example)))
        return gm.forward

    try:
        # NB: without a KV cache, as the other front-ends capture (a cache in the outputs pins every head)
        with _no_kv_cache(model, kwargs):
            a, k = fresh_inputs(args, kwargs)
            out = torch.compile(model, backend=grab, fullgraph=True, dynamic=False)(*a, **k)
    except Exception as e:  # noqa: BLE001 - dynamo raises many kinds; the message says what
        first = str(e).splitlines()[0] if str(e) else ""
        raise CaptureError(f"dynamo could not capture {type(model).__name__} as one graph: "
                           f"{type(e).__name__}: {first}") from e
    gm, example, names = got[-1]
    if any(isinstance(e, FakeTensor) for e in example):
        raise CaptureError("dynamo gave fake example inputs; the dynamo front-end needs real ones")
    lifted = lift(gm, example, names)
    _model_outputs(lifted.gm, out)
    inputs = tuple(example[i] for i in lifted.inputs)
    return Captured(restore_attention(lifted.gm), inputs, {}, "dynamo")


def _model_outputs(gm: fx.GraphModule, out) -> None:
    """Make ``gm`` return what the model returns (a tensor, a tuple, a dict ...) rather than dynamo's
    flat tuple, when the model's outputs are plain containers of exactly the graph's outputs.

    # NB: dynamo rebuilds the model's output structure in its own bytecode, outside the graph; a
    # class it rebuilds there (a Hugging Face ModelOutput) cannot be a graph output: left flat
    """
    leaves, spec = tree_flatten(out)
    node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = node.args[0]
    if not isinstance(flat, (tuple, list)) or len(flat) != len(leaves) or not _plain(out):
        return
    node.args = (tree_unflatten(list(flat), spec),)
    gm.recompile()


def _plain(out) -> bool:
    """Tensors in tuples, lists and dicts only (what an fx output node can hold)."""
    if isinstance(out, torch.Tensor):
        return True
    if type(out) in (tuple, list):
        return all(_plain(o) for o in out)
    if type(out) is dict:
        return all(_plain(o) for o in out.values())
    return False


__all__ = ["capture", "lift", "Lifted", "state_names", "restore_attention"]
