"""SLB's rewrite pass (installed as ``otofx.passes.slb``): Conv/Linear weights -> SLB parametrisations.

``slb_parametrize(gm, bits, layers=...)`` finds every Conv1d/2d/3d and Linear weight of a captured
graph, in either of otofx's graph forms (a ``call_module`` of an ``nn.Conv2d``/``nn.Linear`` after
``symbolic_trace``; a ``conv2d``/``linear``/``convolution`` call reading a ``get_attr`` weight after
``torch.export``), and every parameter a matrix product reads with an activation (``x @ W``
on a weight stored ``[in, out]``: transformers' ``Conv1D``, GPT-2's projections, output channels
on dim 1; ``x @ W.T``: Falcon's Linear; ``W @ x``; ``bmm``/``matmul``/``grouped_mm`` of a 3-D
weight, fused MoE experts, one scale per expert and channel), selects some of them, and returns a *new*
GraphModule (deep copy) in which each selected weight is an :class:`otofx.slb.SLBWeight`
parametrisation (``torch.nn.utils.parametrize``): logits over the grid instead of a float tensor. The graph code is unchanged except for optional
activation quantisers inserted before the selected layers' inputs. :class:`SLBPass` is the same as a
pipeline pass ``State -> State``.

The graph is what decides two things:

* the default selection (``layers=None``): every Conv/Linear weight except the first and the last
  ones in graph order (the binary-network convention SLB's reference runs follow: the input layer
  and the classifier stay float). ``layers="all"`` takes every one;
* which layers get a per-output-channel scale (``scale=None``): those whose output feeds nothing
  but a normalisation op (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) need none, since the
  normalisation absorbs the grid's fixed range; every other selected layer gets one (our addition).

Internals:
    * :func:`find_layers` walks the graph once; a weight read by several ops (or a module called
      twice) is one layer, placed at its first use, "normalised" only if every use is.
    * ``parametrize_layers`` is shared with the straight-through baseline (``otofx.slb.ste``): it
      deep-copies the GraphModule, then registers a parametrisation per selected weight.
    * A parameter several modules hold (``aux.weight = head.weight``, a tied head and embedding) is
      one parametrisation with one original (the logits) in every holder (:func:`register_tied`),
      in both forms, whichever of its names is selected; a second selected name of it is skipped.
    * The parametrisations and activation quantisers are made in the weight's dtype and on its
      device (a bf16 model computes its SLB weights in bf16).
    * ``# NB:`` the pass changes what the graph computes, so a pipeline that verifies (``verify=True``
      or a later ``Verify``) would reject it: run it with ``verify=False``.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from otofx.errors import InputError
from otofx.passes.modules import ATTENTION_MODULES, attention_reader, in_projections
from otofx.passes.nodes import copy_module, get_path, is_hf_conv1d, parameter_holders

log = logging.getLogger("otofx")

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_FUNCTIONS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d, F.linear: nn.Linear,
              torch.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d, torch.conv3d: nn.Conv3d}
_ATEN = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "linear": nn.Linear, "convolution": None}
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_NORM_NAMES = ("batch_norm", "layer_norm", "group_norm", "instance_norm")
_CONV_BY_NDIM = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclass(frozen=True)
class Layer:
    """One Conv/Linear weight of a graph."""

    name: str  # the weight's qualified name, e.g. "features.0.weight"
    owner: str  # qualified name of the module holding it ("" for the root)
    attr: str  # its attribute on that module ("weight")
    kind: type  # nn.Conv1d / nn.Conv2d / nn.Conv3d / nn.Linear (a matrix product's [in, out] weight too)
    nodes: tuple  # the graph nodes that read it (call_module or call_function)
    normalised: bool  # every use feeds a normalisation op only
    out_dim: int = 0  # the weight's output-channel dim: 1 for an [in, out] weight (x @ W)
    batch: bool = False  # fused experts [E, ., .] read by a batched product: dim 0 counts experts
    # every read is a Conv/Linear call, F.linear/F.conv, or x @ W on the stored [in, out] weight (the
    # reads torchao's tensor runs, the last after to_torchao's rewrite); False: x @ W.T, W @ x, bmm
    plain: bool = True

    @property
    def layer(self) -> str:
        """The layer's name (the weight's name without ``.weight``)."""
        return self.owner


# matrix products: name -> (left operand, right operand) positions among the args
_PRODUCT_ARGS = {"addmm": (1, 2), "mm": (0, 1), "matmul": (0, 1), "bmm": (0, 1), "baddbmm": (1, 2),
                 "_grouped_mm": (0, 1), "grouped_mm": (0, 1), "grouped_mm_fallback": (0, 1)}
_PRODUCT_FUNCTIONS = {torch.addmm: "addmm", torch.mm: "mm", torch.matmul: "matmul", operator.matmul: "matmul",
                      torch.bmm: "bmm", torch.baddbmm: "baddbmm"}
_GROUPED = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")
# ops a weight may pass through on its way to a product, values and layout unchanged
_SAME = ("contiguous", "clone", "alias", "detach")
# ops that may swap a weight's last two dims (:func:`_swaps` checks their arguments)
_SWAPS = ("t", "T", "numpy_T", "mT", "adjoint", "transpose", "swapaxes", "swapdims", "permute")


@dataclass(frozen=True)
class Read:
    """How a matrix product reads a weight: the ``get_attr`` node, the other operand's position
    (the input activation), the output channels' dim in the *stored* weight, whether dim 0 counts
    matrices (fused experts), and whether the product reads the stored tensor as it is on the
    right (``x @ W``, the form ``to_torchao`` rewrites as ``linear(x, W.t())``)."""

    weight: fx.Node
    input: int
    out_dim: int
    batch: bool
    plain: bool


def _product_name(node: fx.Node) -> str | None:
    name = _PRODUCT_FUNCTIONS.get(node.target)
    if name is None:
        name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", None)
    return name if name in _PRODUCT_ARGS else None


def _view_op(a: fx.Node) -> tuple:
    """``(name, arguments after the input)`` of a call node; an attribute read (``W.T``) by its name."""
    name = a.target if a.op == "call_method" else _op_name(a)
    rest = list(a.args[1:])
    if name == "getattr" and rest:
        return rest[0], []
    return name, rest


def _swaps(a: fx.Node, nd: int) -> int | None:
    """1 when ``a`` swaps the last two dims of its ``nd``-dim input (``t``, ``.T``, ``.mT``,
    ``transpose(-2, -1)``, a ``permute`` doing only that), 0 when it changes nothing (``contiguous``,
    ``transpose(d, d)``), None for any other op."""
    name, rest = _view_op(a)
    if name in _SAME:
        return 0
    if name in ("t", "T", "numpy_T"):
        return 1 if nd == 2 else None
    if name in ("mT", "adjoint"):
        return 1
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = rest[:2] or [a.kwargs.get("dim0"), a.kwargs.get("dim1")]
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        d = {x % nd for x in dims}
        return 0 if len(d) == 1 else (1 if d == {nd - 2, nd - 1} else None)
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if len(dims) != nd or not all(isinstance(d, int) for d in dims):
            return None
        dims = [x % nd for x in dims]
        if dims == list(range(nd)):
            return 0
        return 1 if dims == list(range(nd - 2)) + [nd - 1, nd - 2] else None
    return None


def _operand(a, parameter: bool):
    """``(get_attr node, swaps, ndim)`` when ``a`` is a parameter (any tensor unless ``parameter``) of
    2 or 3 dims, as stored or with its last two dims swapped, else None."""
    chain = []
    while isinstance(a, fx.Node) and a.op in ("call_function", "call_method") and a.args:
        if _view_op(a)[0] not in _SAME + _SWAPS:
            return None  # NB: not a weight (an activation's chain is not walked back to the input)
        chain.append(a)
        a = a.args[0]
    if not isinstance(a, fx.Node) or a.op != "get_attr":
        return None
    try:
        val = get_path(a.graph.owning_module, a.target)
    except AttributeError:
        return None
    if not isinstance(val, nn.Parameter if parameter else torch.Tensor) or val.dim() not in (2, 3):
        return None
    swaps = 0
    for op in chain:
        s = _swaps(op, val.dim())
        if s is None:
            return None
        swaps += s
    return a, swaps % 2, val.dim()


def _product(node: fx.Node, parameter: bool = True) -> Read | None:
    """How ``node`` reads a weight when it is a matrix product of an activation and a weight:
    ``x @ W`` (``mm``/``matmul``/``addmm``: a 2-D weight stored ``[in, out]``, transformers'
    ``Conv1D``), ``x @ W.T`` (Falcon's Linear), ``W @ x`` (output channels on the weight's rows),
    ``bmm``/``matmul``/``grouped_mm`` of a 3-D weight (fused experts ``[E, in, out]`` or
    ``[E, out, in]``). The weight is a parameter when ``parameter`` (a buffer, such as a fixed
    transform, is not a layer to train); a product of two weights is no layer."""
    if node.op != "call_function":
        return None
    name = _product_name(node)
    if name is None or (node.kwargs and name not in _GROUPED):
        return None
    left, right = _PRODUCT_ARGS[name]
    if len(node.args) <= right:
        return None
    ops = {i: _operand(node.args[i], parameter) for i in (left, right)}
    if ops[left] is not None and ops[right] is not None:
        return None  # W1 @ W2 (or W @ W)
    if name in _GROUPED:
        ops[left] = None  # grouped products take the experts on the right
    for i, hit in ops.items():
        if hit is None:
            continue
        w, swapped, nd = hit
        if nd == 3 and name in ("mm", "addmm") or nd == 2 and name in ("bmm", "baddbmm") + _GROUPED:
            return None
        on_right = i == right
        out = (nd - 1 if on_right else nd - 2) if not swapped else (nd - 2 if on_right else nd - 1)
        plain = on_right and not swapped and nd == 2 and node.args[i] is w
        return Read(w, left if on_right else right, out, nd == 3, plain)
    return None


def input_arg(node: fx.Node) -> int:
    """The position of a conv/linear/product node's input activation among its args."""
    hit = _product(node, parameter=False) if node.op == "call_function" else None
    return hit.input if hit is not None else 0


_ATTENTION_INPUTS = {"in_proj_weight": (0, 1, 2), "q_proj_weight": (0,), "k_proj_weight": (1,), "v_proj_weight": (2,)}
_ATTENTION_ARGS = ("query", "key", "value")


def _act_inputs(gm: fx.GraphModule, layer: Layer, node: fx.Node) -> list:
    """Where the input activations of ``layer`` enter ``node``: ``[(position, keyword)]`` (one of the
    two None); empty when they are computed inside the module (an attention module's out_proj, the
    second product of fused experts)."""
    if layer.batch:
        return [(input_arg(node), None)] if _reshaped_input(node, layer.owner, gathers=True) else []
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ATTENTION_MODULES):
        if node.target != layer.owner:
            return []
        out = []
        for i in _ATTENTION_INPUTS[layer.attr]:
            out.append((i, None) if i < len(node.args) else (None, _ATTENTION_ARGS[i]))
        return out
    return [(input_arg(node), None)]


def _op_kind(node: fx.Node):
    """(kind, weight node, output dim, batch, plain) when ``node`` is a functional conv/linear reading
    a ``get_attr`` weight, or a matrix product reading one (kind ``nn.Linear``; see :func:`_product`)."""
    if node.op != "call_function":
        return None
    hit = _product(node)
    if hit is not None:
        return nn.Linear, hit.weight, hit.out_dim, hit.batch, hit.plain
    kind = _FUNCTIONS.get(node.target)
    if kind is None:
        packet = getattr(node.target, "_overloadpacket", None)
        name = getattr(packet, "__name__", None)
        if name not in _ATEN:
            return None
        kind = _ATEN[name]
        if name == "convolution" and (len(node.args) > 6 and node.args[6]):
            return None  # transposed: output channels are dim 1
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    if kind is None:
        val = w.meta.get("val")
        ndim = val.dim() if isinstance(val, torch.Tensor) else None
        kind = _CONV_BY_NDIM.get(ndim, nn.Conv2d)
    return kind, w, 0, False, True


def _is_norm(user: fx.Node, src: fx.Node, gm: fx.GraphModule) -> bool:
    if not user.args or user.args[0] is not src:
        return False
    if user.op == "call_module":
        return isinstance(gm.get_submodule(user.target), _NORM_MODULES)
    if user.op in ("call_function", "call_method"):
        name = getattr(user.target, "__name__", None) or str(user.target)
        return any(k in name for k in _NORM_NAMES)
    return False


def _module_weights(gm: fx.GraphModule, node: fx.Node) -> list:
    """``[(owner, attr, kind)]``: the layer weights a ``call_module`` node computes with: a Conv/Linear
    module's weight; an attention module's input projections and its ``out_proj``'s weight (which it
    reads itself)."""
    mod = gm.get_submodule(node.target)
    if isinstance(mod, ATTENTION_MODULES):
        out = [(node.target, attr, nn.Linear) for attr, _ in in_projections(mod)]
        proj = getattr(mod, "out_proj", None)
        if isinstance(getattr(proj, "weight", None), torch.Tensor):
            out.append((f"{node.target}.out_proj", "weight", nn.Linear))
        return out
    if type(mod) in _CONV_MODULES and isinstance(mod.weight, torch.Tensor):
        return [(node.target, "weight", type(mod))]
    return []


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every Conv1d/2d/3d and Linear weight of ``gm`` (attention modules' projections included), in
    graph order of first use."""
    found: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses = [(owner, attr, kind, 0, False, True) for owner, attr, kind in _module_weights(gm, node)]
        else:
            hit = _op_kind(node)
            if hit is None:
                continue
            kind, w, out_dim, batch, plain = hit
            owner, _, attr = w.target.rpartition(".")
            uses = [(owner, attr, kind, out_dim, batch, plain)]
        for owner, attr, kind, out_dim, batch, plain in uses:
            name = f"{owner}.{attr}" if owner else attr
            entry = found.setdefault(name, {"owner": owner, "attr": attr, "kind": kind, "nodes": [], "norm": True,
                                            "out_dim": out_dim, "batch": batch, "plain": True})
            if entry["out_dim"] != out_dim or entry["batch"] != batch:
                # NB: one weight read as [out, in] by one op and as [in, out] by another has no single
                # output-channel axis for the scale; it stays float (unquantisable() names it)
                entry["clash"] = True
            entry["nodes"].append(node)
            entry["plain"] &= plain
            entry["norm"] &= bool(node.users) and all(_is_norm(u, node, gm) for u in node.users)
    return [Layer(n, e["owner"], e["attr"], e["kind"], tuple(e["nodes"]), e["norm"], e["out_dim"], e["batch"],
                  e["plain"]) for n, e in found.items() if not e.get("clash")]


def _matches(spec, layer: Layer, gm: fx.GraphModule) -> bool:
    if isinstance(spec, str):
        return spec in (layer.name, layer.owner) or fnmatch.fnmatchcase(layer.owner, spec) \
            or fnmatch.fnmatchcase(layer.name, spec)
    if isinstance(spec, type):
        # the kind, the module holding the weight, the module the graph calls (an attention module for
        # its out_proj), or the captured model's module (torch.export's nn_module_stack)
        return issubclass(layer.kind, spec) or isinstance(gm.get_submodule(layer.owner), spec) \
            or any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), spec) for n in layer.nodes) \
            or f"{spec.__module__}.{spec.__qualname__}" in _source_types(layer)
    if callable(spec):
        return bool(spec(layer.owner, gm.get_submodule(layer.owner)))
    raise InputError(f"layers entry {spec!r}: give a layer name or glob pattern, an nn.Module type "
                     "(nn.Conv2d, nn.Linear), or a callable (name, module) -> bool")


def _source_types(layer: Layer) -> set:
    """Qualified class names of the module that owned ``layer`` in the captured model (torch.export
    records them in ``nn_module_stack``; its GraphModule holds plain modules in their place)."""
    out = set()
    for node in layer.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path == layer.owner:
                out.add(cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
    return out


_PRODUCTS = ("addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "linear", "conv1d", "conv2d", "conv3d",
             "convolution", "_grouped_mm", "grouped_mm", "grouped_mm_fallback", "batched_mm")
# ops through which a weight reaches a product unchanged in value (a transposed expert weight)
_WEIGHT_VIEWS = ("transpose", "t", "permute", "view", "reshape", "expand", "unsqueeze", "contiguous", "to", "_to_copy",
                 "numpy_T")


def _op_name(node: fx.Node) -> str:
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or _PRODUCT_FUNCTIONS.get(node.target) or getattr(node.target, "__name__", "")


def _weight_behind(a: fx.Node) -> fx.Node | None:
    """The ``get_attr`` that ``a`` is, or views of (``W.transpose(-2, -1)``), or None."""
    while a.op == "call_function" and _op_name(a) in _WEIGHT_VIEWS and a.args and isinstance(a.args[0], fx.Node):
        a = a.args[0]
    return a if a.op == "get_attr" else None


def unquantisable(gm: fx.GraphModule, found: list[Layer]) -> list[str]:
    """Weights (``get_attr`` tensors of 2+ dims, or views of them) that feed a product SLB does not
    take, so that they stay float: ``einsum`` operands, a weight cast or reshaped before its product,
    a product of two weights, a weight read with output channels on different dims by different
    ops; and the weights of leaf modules it does not take (``ConvTranspose``)."""
    known = {c.name for c in found}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":  # a leaf with a weight SLB does not take (ConvTranspose: [in, out, k...])
            mod = gm.get_submodule(node.target)
            w = getattr(mod, "weight", None)
            name = f"{node.target}.weight"
            if (isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point() and name not in known
                    and name not in out and not isinstance(mod, (nn.Embedding, nn.EmbeddingBag))):
                out.append(name)
            continue
        if node.op != "call_function" or _op_name(node) not in _PRODUCTS:
            continue
        for a in node.all_input_nodes:
            a = _weight_behind(a)
            if a is None or a.target in known or a.target in out:
                continue
            w = get_path(gm, a.target)
            # NB: a buffer (a fixed transform) is no weight to train: not named
            if isinstance(w, nn.Parameter) and w.dim() >= 2 and w.is_floating_point():
                out.append(a.target)
    return out


_LAYERS_HELP = ("None (every Conv/Linear but the first and the last), 'all', a layer name or glob pattern, an "
                "nn.Module type, a callable (name, module) -> bool, or a list of them")


def check_layers(layers) -> None:
    """Raise :class:`InputError` unless ``layers`` is a selection :func:`select_layers` takes (the
    entries' types only: names are checked against the graph there)."""
    if layers is None or isinstance(layers, (str, type)) or callable(layers):
        return
    if not isinstance(layers, (list, tuple, set, frozenset)):
        raise InputError(f"layers={layers!r} ({type(layers).__name__}): give {_LAYERS_HELP}")
    for spec in layers:
        if not (isinstance(spec, (str, type, Layer)) or callable(spec)):
            raise InputError(f"layers entry {spec!r} ({type(spec).__name__}): give a layer name or glob pattern, "
                             "an nn.Module type (nn.Conv2d, nn.Linear), or a callable (name, module) -> bool")


def select_layers(gm: fx.GraphModule, layers=None) -> list[Layer]:
    """The layers ``layers`` picks (see the module docstring for ``None`` and ``"all"``); a list of
    :class:`Layer` (a selection made before) is taken as it is."""
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, Layer) for x in layers):
        return list(layers)
    check_layers(layers)
    cands = find_layers(gm)
    skipped = unquantisable(gm, cands)
    if skipped:
        # NB: said, not silent: these weights stay float whatever ``layers`` asks for
        log.warning("otofx.slb: %d weight(s) feed a product SLB does not take (neither a Conv/Linear call, an "
                    "attention module, nor a matrix product of the weight or its transpose: e.g. einsum, a weight "
                    "cast or reshaped first, ConvTranspose); SLB does not quantise them and they stay float: %s",
                    len(skipped),
                    ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    if not cands:
        raise InputError(f"{type(gm).__name__} has no Conv1d/2d/3d or Linear weight to quantise")
    if layers is None:
        if len(cands) < 3:
            raise InputError(f"layers=None quantises every Conv/Linear but the first and the last, and this model has "
                             f"only {len(cands)} ({', '.join(c.layer for c in cands)}): pass layers='all' or names")
        return cands[1:-1]
    if isinstance(layers, str) and layers == "all":
        return cands
    specs = [layers] if isinstance(layers, (str, type)) or callable(layers) else list(layers)
    if not specs:
        raise InputError("layers=[] selects no layer: give None (the default selection), 'all', or layer names, "
                         "patterns, nn.Module types or callables")
    chosen = [c for c in cands if any(_matches(s, c, gm) for s in specs)]
    for s in specs:
        if isinstance(s, str) and not any(_matches(s, c, gm) for c in cands):
            raise InputError(f"layers: no Conv/Linear layer is named or matches {s!r}; the model's are "
                             f"{', '.join(c.layer for c in cands)}")
    if not chosen:
        raise InputError(f"layers={layers!r} selects no Conv/Linear layer; the model's are "
                         f"{', '.join(c.layer for c in cands)}")
    return chosen


def parametrize_layers(gm: fx.GraphModule, layers, make: Callable[[Layer, torch.Tensor], nn.Module],
                       act: Callable[[], nn.Module] | None = None) -> tuple[fx.GraphModule, list[Layer]]:
    """A deep copy of ``gm`` with ``make(layer, weight)`` registered on every selected weight.

    ``act``: a factory of activation quantisers, inserted before each selected layer's input.
    """
    chosen = {c.name for c in select_layers(gm, layers)}
    new = copy.deepcopy(gm)
    picked = [_off_the_root(new, c) if not c.owner else c for c in find_layers(new) if c.name in chosen]
    _untie_the_root(new, picked)
    holders, done = parameter_holders(new), set()
    for layer in picked:
        owner = new.get_submodule(layer.owner)
        if (id(owner), layer.attr) in done:
            continue  # a tied weight: parametrised with the layer it is tied to (one original)
        done |= _parametrise(holders, owner, layer, make)
    if act is not None:
        inside = []
        for layer in picked:
            like = new.get_submodule(layer.owner).parametrizations[layer.attr].original
            base = "slb_act_" + layer.name.rpartition(".")[0].replace(".", "_")
            if layer.attr != "weight":
                base += "_" + layer.attr
            made: dict = {}  # one quantiser per distinct input node (self-attention's x, x, x: one)
            for node in layer.nodes:
                slots = _act_inputs(new, layer, node)
                if not slots:
                    inside.append(layer.name)
                for i, kw in slots:
                    src = node.args[i] if kw is None else node.kwargs.get(kw)
                    if not isinstance(src, fx.Node):
                        continue
                    if src not in made:
                        name = base if not made else f"{base}_{len(made)}"
                        new.add_submodule(name, act(like))
                        with new.graph.inserting_before(node):
                            made[src] = new.graph.call_module(name, (src,))
                    if kw is None:
                        node.update_arg(i, made[src])
                    else:
                        node.update_kwarg(kw, made[src])
        _warn_inside(inside)
        new.graph.lint()
        new.recompile()
    return new, picked


def _off_the_root(gm: fx.GraphModule, layer: Layer) -> Layer:
    """Move a weight the root module holds into a holder submodule ``slb_<attr>`` (as ``.weight``).

    # NB: a parametrisation on the GraphModule itself would live in its class, which
    # ``copy.deepcopy`` of a GraphModule does not carry (``freeze`` copies the model)
    """
    holder = f"slb_{layer.attr}"
    while hasattr(gm, holder):
        holder += "_"
    w = getattr(gm, layer.attr)
    delattr(gm, layer.attr)
    box = nn.Module()
    if isinstance(w, nn.Parameter):
        box.weight = w
    else:
        box.register_buffer("weight", w)
    gm.add_submodule(holder, box)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == layer.attr:
            node.target = f"{holder}.weight"
    gm.recompile()
    log.info("otofx.slb: the root's weight '%s' is now '%s.weight' (a parametrised weight lives in a submodule)",
             layer.attr, holder)
    return dataclasses.replace(layer, name=f"{holder}.weight", owner=holder, attr="weight")


def _untie_the_root(gm: fx.GraphModule, picked: list) -> None:
    """Point the graph's reads of a root attribute that is a picked weight under another name (a
    parameter tied between the root and a submodule) at the picked name, and drop the root's alias.

    # NB: the root cannot hold a parametrisation (see :func:`_off_the_root`); read through the
    # submodule, the tie is the one parametrised weight
    """
    names = {id(getattr(gm.get_submodule(c.owner), c.attr)): c.name for c in picked}
    changed = False
    for attr, p in list(gm._parameters.items()):
        if p is None or id(p) not in names:
            continue
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == attr:
                node.target = names[id(p)]
        del gm._parameters[attr]
        changed = True
        log.info("otofx.slb: the root's '%s' is '%s' (tied); the graph reads it there", attr, names[id(p)])
    if changed:
        gm.recompile()


def _parametrise(holders: dict, owner: nn.Module, layer: "Layer", make) -> set:
    """``layer``'s weight (a plain floating-point parameter of ``owner``) as the SLB weight ``make``
    builds, in every module holding it (:func:`register_tied`); returns those holders."""
    if parametrize.is_parametrized(owner, layer.attr):
        raise InputError(f"weight '{layer.name}' already has a parametrisation: remove it "
                         "(torch.nn.utils.parametrize.remove_parametrizations) before SLB")
    weight = getattr(owner, layer.attr)
    if not weight.is_floating_point():
        raise InputError(f"weight '{layer.name}' has dtype {weight.dtype}; SLB needs a floating-point weight")
    return register_tied(holders, owner, layer.attr, weight, make(layer, weight.detach()), layer.name)


def register_tied(holders: dict, owner: nn.Module, attr: str, weight: torch.Tensor, pm: nn.Module,
                  home: str) -> set:
    """Register the parametrisation ``pm`` on ``owner.attr`` and on every other module holding the same
    parameter (``holders``: :func:`otofx.passes.nodes.parameter_holders`), all with one original (the
    logits): a tied weight stays one tensor, which every holder reads quantised. Returns the holders
    as ``{(id(module), attr)}``."""
    pm.home = home  # the name it was selected by (slb_layers lists a tied weight under it)
    value = weight.detach().clone()
    first, done = None, set()
    # the selected holder first (its original is the one every other holder takes)
    for m, a in sorted(holders.get(id(weight), [(owner, attr)]), key=lambda h: h != (owner, attr)):
        if first is not None:
            # NB: registering set_() the shared Parameter to the logits in place (torch keeps the
            # original's identity): the next holder registers on the float values, then takes the
            # same original, so the tie stays (GPT-2's head and embedding, aux.weight = head.weight)
            m._parameters[a] = nn.Parameter(value.clone(), requires_grad=weight.requires_grad)
        parametrize.register_parametrization(m, a, pm, unsafe=True)
        if first is None:
            first = m.parametrizations[a].original
        else:
            m.parametrizations[a].original = first
        done.add((id(m), a))
    return done


def slb_parametrize(gm: fx.GraphModule, bits: int, layers=None, *, scale: bool | None = None,
                    warm_start: float | None = None, act_bits: int | None = None,
                    act_quant: str = "minmax") -> fx.GraphModule:
    """A new GraphModule whose selected Conv/Linear weights are SLB parametrisations (``gm`` untouched).

    ``scale``: None gives a per-output-channel scale to the layers with no normalisation after them,
    True/False to all/none. ``warm_start``: tau0 of the warm start from the float weights (None: SLB's
    random start). ``act_bits``: fake-quantise each selected layer's input (``act_quant`` "minmax"
    or "pact"); off by default.
    """
    from otofx.slb.modules import grid

    grid(bits)  # validates bits
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"slb_parametrize takes a torch.fx.GraphModule, got {type(gm).__name__}: "
                         "use otofx.slb.quantize(model, example_inputs) for a model")

    new, picked = parametrize_layers(gm, layers, weight_factory(bits, scale, warm_start),
                                     act_factory(act_bits, act_quant))
    log.info("otofx.slb: %d-bit SLB weights on %d layers (%s)", bits, len(picked), ", ".join(p.layer for p in picked))
    return new


# -- the module form: the user's model, its own class ----------------------------------------------

def _quantise_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the module form: fake-quantise the inputs ``module._slb_act_slots`` names
    (positions, or the keywords of an attention module's query/key/value), one quantiser each; an
    input that is the same tensor as an earlier one (self-attention's x, x, x) reuses its result."""
    args, done = list(args), {}
    for pos, kw, qname in module._slb_act_slots:
        if pos < len(args):
            x = args[pos]
        elif kw in kwargs:
            x = kwargs[kw]
        else:
            continue
        if not isinstance(x, torch.Tensor):
            continue
        y = done.get(id(x))
        if y is None:
            y = done[id(x)] = getattr(module, qname)(x)
        if pos < len(args):
            args[pos] = y
        else:
            kwargs[kw] = y
    return tuple(args), kwargs


def module_form_blocker(model: nn.Module, gm: fx.GraphModule, picked: list, act: bool) -> str | None:
    """Why the selected layers cannot be parametrised on (a copy of) ``model`` itself, or None: each
    weight must be a parameter of ``model`` under the graph's name, held by a submodule; with
    activation quantisers, each layer's input must be its module's input (a Conv/Linear call, an
    attention module's query/key/value, transformers' Conv1D, or the one input of a module that only
    reshapes it before the product, as an MoE router; the last is read off torch.export's module
    stack, which the symbolic tracer does not record)."""
    for layer in picked:
        if not layer.owner:
            return f"'{layer.name}' is held by the model itself, not by a submodule"
        try:
            owner = model.get_submodule(layer.owner)
        except AttributeError:
            return f"the graph's '{layer.owner}' is not a submodule of {type(model).__name__}"
        w = owner._parameters.get(layer.attr)
        if not isinstance(w, nn.Parameter) or tuple(w.shape) != tuple(get_path(gm, layer.name).shape):
            return f"'{layer.name}' is not a parameter of {type(model).__name__}'s module '{layer.owner}'"
        if act and not _act_at_module(gm, layer, owner):
            return f"the input of '{layer.name}' is not its module's input (activation quantisers need the graph)"
    return None


def _act_at_module(gm: fx.GraphModule, layer: Layer, owner: nn.Module) -> bool:
    """Whether every op that reads ``layer``'s weight runs inside its module's own forward, on that
    forward's input (a Conv/Linear, transformers' Conv1D, an attention module; or a module whose
    forward takes one input and only reshapes it before the product, as an MoE router does): a
    pre-hook on the module then quantises what the graph form's quantiser would (elementwise with
    one range for the tensor, so before a view or a zero padding alike). A weight its parent reads
    (torchvision's Swin ``F.linear(x, self.qkv.weight)``) is not: the module's forward never runs."""
    reader = attention_reader(gm, layer.owner)
    if reader is not None and reader is not gm.get_submodule(layer.owner):
        return True  # an attention module's out_proj: no input of its own (warned)
    if not all(_runs_in(node, layer.owner) for node in layer.nodes):
        return False
    if isinstance(owner, ATTENTION_MODULES) or is_hf_conv1d(owner) or type(owner) in _CONV_MODULES or layer.batch:
        return True  # fused experts: their input (a hook) or none, as the graph form (_act_inputs)
    if _forward_input(owner) is None:
        return False
    return all(_reshaped_input(node, layer.owner) for node in layer.nodes)


# ops that move a tensor's elements without changing any (a per-tensor quantiser commutes with them)
_RESHAPES = ("view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "contiguous", "clone", "alias")


def _reshaped_input(node: fx.Node, path: str, gathers: bool = False) -> bool:
    """Whether the input activation of ``node`` is the value that enters module ``path``, reshaped by
    ops of that module's forward only (a cast to the dtype it has already counts as a reshape).

    ``gathers``: row gathers count too (``index``: fused experts read each token once per expert it
    is routed to; with top-k routing every token is read, so one range over the gathered rows is the
    range of the module's input, and quantising before or after the gather is the same)."""
    if node.op != "call_function":
        return False
    x = node.args[input_arg(node)] if len(node.args) > input_arg(node) else node.kwargs.get("input")
    moves = _RESHAPES + (("index", "index_select") if gathers else ())
    while isinstance(x, fx.Node) and x.op in ("call_function", "call_method") and _runs_in(x, path):
        name = x.target if x.op == "call_method" else _op_name(x)
        src = x.args[0] if x.args else None
        same = isinstance(src, fx.Node) and isinstance(src.meta.get("val"), torch.Tensor) \
            and isinstance(x.meta.get("val"), torch.Tensor) and src.meta["val"].dtype == x.meta["val"].dtype
        if not isinstance(src, fx.Node) or not (name in moves or (name in ("to", "_to_copy") and same)):
            return False
        x = src
    return isinstance(x, fx.Node)


def _first_input(owner: nn.Module) -> str:
    """The name of the first parameter of ``owner.forward`` ("input" when it cannot be read)."""
    import inspect

    try:
        return next(iter(inspect.signature(owner.forward).parameters))
    except (TypeError, ValueError, StopIteration):
        return "input"


def _forward_input(owner: nn.Module) -> str | None:
    """The name of the one input of ``owner.forward`` (besides arguments with defaults), or None."""
    import inspect

    try:
        params = list(inspect.signature(owner.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    need = [p for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return need[0].name if len(need) == 1 and params[0] is need[0] else None


def _runs_in(node: fx.Node, path: str) -> bool:
    """Whether ``node`` is a call of the module ``path``, or an op of its own forward (the innermost
    module of its ``nn_module_stack``)."""
    if node.op == "call_module":
        return node.target == path
    stack = node.meta.get("nn_module_stack") or {}
    return bool(stack) and list(stack.values())[-1][0] == path


def parametrize_model(model: nn.Module, picked: list, make: Callable[[Layer, torch.Tensor], nn.Module],
                      act: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A deep copy of ``model`` (its own class) with ``make(layer, weight)`` registered on each picked
    weight (a weight several modules hold, a tied head and embedding, gets one parametrisation and
    one original in all of them) and, with ``act``, quantisers of the layers' inputs run by a forward
    pre-hook on their modules."""
    new = copy_module(model)
    holders = parameter_holders(new)
    done, inside = set(), []
    for layer in picked:
        owner = new.get_submodule(layer.owner)
        if (id(owner), layer.attr) not in done:  # else tied to a layer parametrised before (one original)
            done |= _parametrise(holders, owner, layer, make)
        if act is None:
            continue
        like = owner.parametrizations[layer.attr].original
        if isinstance(owner, ATTENTION_MODULES):
            slots = [(i, _ATTENTION_ARGS[i]) for i in _ATTENTION_INPUTS[layer.attr]]
        elif attention_reader(new, layer.owner) is not None:  # an attention module's out_proj
            inside.append(layer.name)
            continue
        elif layer.batch:  # fused experts: the tokens entering the experts, or a product inside them
            if not all(_reshaped_input(node, layer.owner, gathers=True) for node in layer.nodes):
                inside.append(layer.name)
                continue
            slots = [(0, _first_input(owner))]
        else:
            slots = [(0, _forward_input(owner) or "input")]
        if not hasattr(owner, "_slb_act_slots"):
            owner._slb_act_slots = []
            owner.register_forward_pre_hook(_quantise_inputs, with_kwargs=True)
        for pos, kw in slots:
            qname = f"slb_act_{kw}" if isinstance(owner, ATTENTION_MODULES) else "slb_act"
            if not hasattr(owner, qname):
                owner.add_module(qname, act(like))
                owner._slb_act_slots.append((pos, kw, qname))
    _warn_inside(inside)
    return new


def _warn_inside(names: list) -> None:
    if names:
        log.warning("otofx.slb: act_bits: the input of %s is computed inside an attention or experts module and "
                    "is not fake-quantised (the weights are)", ", ".join(sorted(set(names))))


def act_factory(act_bits: int | None, act_quant: str) -> Callable[[], nn.Module] | None:
    """A maker of activation quantisers (:class:`otofx.slb.ActFakeQuant`), or None without
    ``act_bits``; the arguments are checked here, before any copy is made."""
    from otofx.slb.modules import ActFakeQuant

    if not isinstance(act_quant, str) or act_quant not in ("minmax", "pact"):
        raise InputError(f"act_quant={act_quant!r}: choose 'minmax' or 'pact' (used with act_bits)")
    if act_bits is None:
        return None
    ActFakeQuant(act_bits, act_quant)  # validates

    def act(like: torch.Tensor | None = None) -> nn.Module:
        q = ActFakeQuant(act_bits, act_quant)
        # NB: on the layer's device and in its dtype (``like``: its weight), as its SLB weight is
        return q if like is None else q.to(device=like.device, dtype=like.dtype)

    return act


def weight_factory(bits: int, scale: bool | None, warm_start: float | None) -> Callable:
    """``make(layer, weight)``: the :class:`otofx.slb.SLBWeight` of one layer (its scale by the
    normalisation rule of the module docstring, unless ``scale`` says)."""
    from otofx.slb.modules import SLBWeight, check_warm_start, grid

    grid(bits)  # validates bits
    if scale is not None and not isinstance(scale, bool):
        raise InputError(f"scale={scale!r}: give None (a learned scale where no normalisation follows the layer), "
                         "True (every layer) or False (none)")
    check_warm_start(warm_start)

    def make(layer: Layer, w: torch.Tensor) -> nn.Module:
        s = (not layer.normalised) if scale is None else bool(scale)
        # NB: the grid, temperature and scale in the weight's dtype and on its device (a bf16/fp16
        # model computes its SLB weights in its own dtype; the logits follow the weight too)
        return SLBWeight(w.shape, bits, scale=s, warm_start=warm_start, out_dim=layer.out_dim,
                         batch=layer.batch, plain=layer.plain).to(device=w.device, dtype=w.dtype)

    return make


class SLBPass:
    """``slb_parametrize`` as a pipeline pass ``State -> State`` (run the pipeline with ``verify=False``)."""

    name = "slb_parametrize"

    def __init__(self, bits: int, layers=None, **options):
        self.bits, self.layers, self.options = bits, layers, options

    def __call__(self, state):
        if state.gm is None:
            from otofx.pipeline import PipelineError

            raise PipelineError("pass 'slb_parametrize' needs state.gm: run 'capture' before it")
        return state.replace(gm=slb_parametrize(state.gm, self.bits, self.layers, **self.options))


__all__ = ["Layer", "find_layers", "input_arg", "module_form_blocker", "parametrize_model", "weight_factory",
           "act_factory", "unquantisable", "select_layers", "check_layers", "register_tied", "parametrize_layers",
           "slb_parametrize", "SLBPass"]
