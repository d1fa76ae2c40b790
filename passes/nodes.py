"""Small facts about graph nodes and modules that several passes need, each defined once.

``mutates_input(node)``: whether a node writes its first argument in place (``impure(node)``:
that, or fx's impure: a node dead-code elimination keeps); ``get_path(root,
name)``: a parameter, buffer or submodule by qualified name (the one tensor lookup: every pass
and front-end uses it); ``set_path`` puts one there. ``call_arguments(node, root)``: a call's
arguments by the names of its op's rule, the same for every front-end's spelling of the op
(module call, torch function, ATen overload); ``constant(root, value)`` resolves one of them that
is known without running the graph (a parameter, a buffer, a flag, a literal). ``is_hf_conv1d``:
Hugging Face's ``Conv1D``, a Linear that stores its weight transposed. ``parameter_holders(root)``:
every module and attribute each parameter is registered under (tied weights have several).
``copy_module(model)``: ``copy.deepcopy`` that also copies tensors a forward left in module
attributes with their autograd history (a recurrent state), which deepcopy refuses.
``view_base(node)``: the node whose memory a node's value may share (a view, an in-place op's result,
a cast that may return its input), where an in-place write also lands.
``rms_norm_of(mean)``: the RMS norm a ``mean`` node belongs to, as written out by hand
(``w * h * rsqrt(mean(h ** 2) + eps)``: LLaMA's and most of today's LLMs'; ``** -0.5``: Gemma 4's;
``linear(h, W) * rsqrt(...)``: HY v4's, W its weight), or None; ``linear_after(out)``: the linear
layer alone reading a norm without a weight (DeepSeek V4's); ``magnitude_matches_of(mean)``: the
magnitude matches ``h * rms(g) / rms(h)`` a mean of squares belongs to (Gemma 3n's AltUp); ``grn_of(mean)``: the Global Response Normalization (ConvNeXt V2's GRN: a spatial 2-norm
divided by its mean over the channels) a ``mean`` node belongs to, or None. ``layer_norm_of(n)``:
the layer norm written out (``u = mean(x)``, ``s = mean((x - u) ** 2)`` or ``var(x)``) whose mean or
variance node ``n`` is, or None. ``unread_parameters(gm,
model)``: the modules whose parameters a captured graph never reads.

Internals:
    * In-place is read off the spelling: a method or function whose name ends in one ``_``
      (``x.add_``, ``torch.relu_``), the augmented operators (``+=``...), ``operator.setitem``,
      an ``inplace=True`` argument, or a module whose ``inplace`` attribute is True. An ATen
      overload (``aten.add_.Tensor``) is read off its schema: its first argument is written.
    * ``grn_of`` reads the channel mean's input past casts and the floats it is multiplied by (the
      rewrite's kept divisor), a 2-norm over other axes, kept (``torch.norm``/``Tensor.norm`` with
      p 2 or "fro", ``linalg.vector_norm``), then ``+ eps`` and the division of that same norm. The
      sums after ``x * Nx`` (in any order, or timm's ``addcmul``) only name gamma, beta and their module.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx

# node meta: the name of the module whose own forward made the node (the symbolic tracer's; torch.export
# and dynamo record ``nn_module_stack``): read by :func:`made_in`
MADE_IN = "otofx_module"


def made_in(node: fx.Node) -> str | None:
    """The dotted name of the module whose own forward made ``node`` (``""``: the top module's), from
    export's ``nn_module_stack`` (its innermost entry) or the symbolic tracer's ``MADE_IN``; None
    when the node does not say (a node a pass added)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if not isinstance(path, str):
            return None
        # NB: dynamo names the top module L['self']
        return "" if path in ("L['self']", "L__self__") else path.removeprefix("L['self'].").removeprefix("L__self__.")
    return node.meta.get(MADE_IN)


# x += y and friends: the python operators that write their left operand
INPLACE_ARITHMETIC = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})
_WRITES_FIRST = INPLACE_ARITHMETIC | {operator.setitem}


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__")


def mutates_input(node: fx.Node, module: torch.nn.Module | None = None) -> bool:
    """Whether ``node`` writes its first argument in place (``x.add_(1)``, ``torch.relu_(x)``,
    ``x[i] = v``, ``inplace=True``, ``nn.ReLU(inplace=True)``).

    ``module`` is the called module of a ``call_module`` node; when not given it is looked up in
    the graph's owning module.
    """
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return _inplace_name(node.target)
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if isinstance(schema, torch._C.FunctionSchema):  # an ATen overload (``aten.add_.Tensor``) says so itself
            first = schema.arguments[0].alias_info if schema.arguments else None
            return bool(first is not None and first.is_write)
        return node.target in _WRITES_FIRST or _inplace_name(getattr(node.target, "__name__", ""))
    if node.op == "call_module":
        if module is None:
            module = node.graph.owning_module.get_submodule(node.target)
        # NB: nn.ReLU(inplace=True) whose result is unused still rewrites its input for later readers
        return getattr(module, "inplace", False) is True
    return False


# the spellings (methods, functions) of ops whose result may share its input's memory: views, and
# casts and copies that return the input itself when nothing changes (``x.to(x.dtype)``)
_MAY_ALIAS = frozenset({
    "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "mT", "movedim", "moveaxis", "swapaxes", "swapdims", "narrow", "select", "expand",
    "expand_as", "contiguous", "to", "type", "type_as", "float", "half", "double", "bfloat16", "detach", "alias",
    "as_strided", "diagonal", "unfold", "real", "imag", "view_as_real", "view_as_complex", "chunk", "split",
    "unbind", "tensor_split", "split_with_sizes", "getitem", "__getitem__",
})
# ATen ops that may return their input itself though their schema does not say so (CompositeImplicit casts)
_ATEN_MAY_ALIAS = frozenset({"aten::type_as"})
# the casts among them: the input itself only when dtype, device (and layout) stay
_CAST_ALIASES = frozenset({"to", "type", "type_as", "float", "half", "double", "bfloat16", "contiguous"})


def view_base(node: fx.Node) -> fx.Node | None:
    """The node whose memory ``node``'s value may share (``node`` a view of it, or it itself: an
    in-place op's result, a cast that changed nothing), or None: a write into ``node``'s value may
    write that node's value too."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name.split(".")[0] in _CAST_ALIASES:
        # NB: a cast returns its input itself only when nothing changes: another dtype or device (or a
        # strided input made contiguous) is a copy, which a write into the result does not reach
        out, src = node.meta.get("val"), node.args[0].meta.get("val")
        if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and (
                out.dtype != src.dtype or out.device != src.device
                or (name.startswith("contiguous") and not src.is_contiguous())):
            return None
    if node.op == "call_method":
        return node.args[0] if t in _MAY_ALIAS or _inplace_name(t) else None
    schema = getattr(t, "_schema", None)
    if isinstance(schema, torch._C.FunctionSchema):
        aliases = any(r.alias_info is not None for r in schema.returns) or schema.name in _ATEN_MAY_ALIAS
        return node.args[0] if aliases else None
    if t is operator.getitem:
        # NB: an index tensor reads a copy (``x[idx]``); slices, ints, None and ellipsis read a view,
        # and an entry of a split's tuple is a view of the split tensor
        idx = node.args[1] if len(node.args) > 1 else None
        parts = idx if isinstance(idx, (tuple, list)) else (idx,)
        if any(isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor) for p in parts):
            return None
        return node.args[0]
    name = getattr(t, "__name__", "")
    return node.args[0] if name in _MAY_ALIAS or t in _WRITES_FIRST or _inplace_name(name) else None


def impure(node: fx.Node) -> bool:
    """fx's notion of impure (``node.is_impure()``: placeholders, outputs, side effects) or
    :func:`mutates_input`: a node dead-code elimination must keep, and whose first argument it writes."""
    return node.is_impure() or mutates_input(node)


# Hugging Face's Conv1D (GPT-2's projections): a Linear whose weight is stored [in, out]
HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def is_hf_conv1d(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (or a subclass), matched by qualified name
    along the MRO so that transformers is never imported here."""
    return any(f"{c.__module__}.{c.__qualname__}" == HF_CONV1D for c in type(module).__mro__)


def parameter_holders(root: torch.nn.Module) -> dict:
    """``{id(parameter): [(module, attribute), ...]}``: every place a parameter is registered (a tied
    weight, a language model's head and its embedding, has several)."""
    out: dict = {}
    for m in root.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, attr))
    return out


@dataclass(frozen=True)
class Unread:
    """Parameters of a model the captured graph never reads: ``module`` (the outermost module all of
    whose parameters are unread, "" for the root), their ``count`` and ``numel``."""

    module: str
    count: int
    numel: int


def unread_parameters(gm: fx.GraphModule, model: torch.nn.Module, also_read=()) -> tuple:
    """The :class:`Unread` modules of ``model``: parameters that no ``get_attr`` of ``gm`` names and
    no called module of ``gm`` holds (a tensor tied under several names is read when one is), nor
    ``also_read`` names."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"} | set(also_read)
    for target in {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}:
        read.update(f"{target}.{k}" for k, _ in module_tensors(gm.get_submodule(target)).params)
    named = dict(module_tensors(model).params)
    seen = {id(t) for k, t in named.items() if k in read}
    unread = {k for k, t in named.items() if id(t) not in seen}
    if not unread:
        return ()
    total: dict = {}
    missing: dict = {}
    for k in named:
        parts = k.split(".")[:-1]
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            total[prefix] = total.get(prefix, 0) + 1
            missing[prefix] = missing.get(prefix, 0) + (k in unread)
    owners: dict = {}
    for k in unread:  # the outermost module whose parameters are all unread (else the parameter itself)
        parts = k.split(".")[:-1]
        top = next((p for p in (".".join(parts[:d]) for d in range(len(parts) + 1)) if missing[p] == total[p]), k)
        owners.setdefault(top, set()).add(k)
    out = []
    for mod, names in sorted(owners.items()):
        ts = {id(named[n]): named[n] for n in names}
        out.append(Unread(mod, len(ts), sum(t.numel() for t in ts.values())))
    return tuple(out)


class ModuleTensors(NamedTuple):
    """One walk over a module tree (:func:`module_tensors`)."""

    modules: dict  # qualified name -> module, every path to a shared module
    params: list  # (qualified name, Parameter), in named_parameters' order, duplicates kept
    buffers: list  # (qualified name, tensor), in named_buffers' order, duplicates kept


def module_tensors(root: torch.nn.Module) -> ModuleTensors:
    """Every module, parameter and buffer of ``root`` by qualified name, as ``named_modules``,
    ``named_parameters`` and ``named_buffers`` with ``remove_duplicate=False`` list them.

    # NB: one explicit walk in their pre-order; torch's three walk the tree each through nested
    # generators, which costs tens of microseconds per module (a 10,000-layer model: a second)
    """
    modules, params, buffers = {}, [], []
    stack = [("", root)]
    while stack:
        prefix, m = stack.pop()
        modules[prefix] = m
        dot = prefix + "." if prefix else ""
        params += [(dot + k, t) for k, t in m._parameters.items() if t is not None]
        buffers += [(dot + k, t) for k, t in m._buffers.items() if t is not None]
        stack += [(dot + k, c) for k, c in reversed(m._modules.items()) if c is not None]
    return ModuleTensors(modules, params, buffers)


def get_path(root: torch.nn.Module, name: str):
    """The attribute at dotted ``name`` under ``root`` (a parameter, buffer or submodule)."""
    return functools.reduce(getattr, name.split("."), root)


def submodule(root: torch.nn.Module, path: str | None) -> torch.nn.Module | None:
    """The submodule at dotted ``path`` under ``root`` (``""``: root itself), or None when ``path`` is None
    or names no module."""
    if path is None:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def set_path(root: torch.nn.Module, name: str, tensor) -> None:
    """Put ``tensor`` at dotted ``name`` under ``root``: in the parameter or buffer slot it names, else as a plain attribute."""
    mod_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(mod_name) if mod_name else root
    if attr in owner._parameters:
        owner._parameters[attr] = tensor
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        setattr(owner, attr, tensor)


def call_arguments(node: fx.Node, root: torch.nn.Module) -> dict | None:
    """``node``'s arguments by the names its op's rule reads (``input``, ``weight``, ``running_mean``,
    ``eps`` ...), or None when no rule knows the op.

    The same names whichever front-end made the graph: ``nn.BatchNorm2d``'s module call
    (symbolic_trace), ``F.batch_norm`` (dynamo) and ``aten.batch_norm`` (export) all give ``input``,
    ``weight``, ``bias``, ``running_mean``, ``running_var``. Values are the node's own arguments
    (nodes and literals; a module form gives its module's tensors as ``ParamRef``): pass them to
    :func:`constant`. # NB: a module form binds what its rule reads only; its other settings
    (``eps``) are attributes of ``root.get_submodule(node.target)``.
    """
    from .registry import bind, form_of

    form = form_of(node, root)
    if form is None:
        return None
    module = root.get_submodule(node.target) if node.op == "call_module" else None
    return bind(form, node, node.args, node.kwargs, module)


def constant(root: torch.nn.Module, value):
    """What an argument of :func:`call_arguments` holds when that is known without running the
    graph: the attribute a ``get_attr`` node or a ``ParamRef`` names (a parameter, buffer or flag),
    a literal itself; None for any other node (a value computed by the graph)."""
    from .channels import ParamRef

    if isinstance(value, ParamRef):
        return get_path(root, value.name)
    if isinstance(value, fx.Node):
        return get_path(root, value.target) if value.op == "get_attr" else None
    return value


def copy_module(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)``, with the non-leaf tensors held in module attributes (a state a
    training forward stored, as RecurrentGemma's recurrent layers do) copied detached: torch's
    deepcopy refuses tensors with autograd history."""
    import copy

    memo: dict = {}

    def note(v):
        if isinstance(v, torch.Tensor) and not v.is_leaf and id(v) not in memo:
            memo[id(v)] = v.detach().clone()
        elif isinstance(v, (list, tuple)):
            for e in v:
                note(e)
        elif isinstance(v, dict):
            for e in v.values():
                note(e)

    for m in model.modules():
        for v in vars(m).values():
            note(v)
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# RMS norms written out by hand
# ---------------------------------------------------------------------------------------------

_CASTS = ("to", "_to_copy", "float", "type_as", "type", "contiguous", "clone", "alias")
_RESHAPES = ("view", "reshape", "_unsafe_view", "flatten")


@dataclass(frozen=True)
class RmsNorm:
    """``w * h * rsqrt(mean(h ** 2, dim, keepdim=True) + eps)`` in a graph: ``weight`` is the
    ``get_attr`` node of ``w`` (read as ``1 + w`` when ``one_plus``), or None for a norm without one
    (NanoChat's, HRM's); ``out`` is the node of ``h * rsqrt(...)``, before any weight."""

    mean: fx.Node
    input: fx.Node
    dim: int
    eps: float
    weight: fx.Node | None
    one_plus: bool
    out: fx.Node | None = None
    # the linear layer whose weight is ``weight``, applied to h before the normalising product:
    # ``linear(h, W) * rsqrt(...)`` is ``linear(h * rsqrt(...), W)`` (HY v4's hyper-connections mix
    # their streams so); None for a weight that multiplies the normalised value
    linear: fx.Node | None = None


def _op(n) -> str:
    """What ``n`` computes, by the registry's canonical name (``__rmul__`` and ``aten.mul`` are ``mul``)."""
    from .registry import op_of

    return op_of(n, n.graph.owning_module) if n.op in ("call_function", "call_method") else n.op


def _before_casts(n):
    """``n``'s input while ``n`` is a value-preserving cast."""
    while isinstance(n, fx.Node) and _op(n) in _CASTS and n.args:
        n = n.args[0]
    return n


def _unscaled(n):
    """``(m, f)``: ``n`` past casts and multiplications by a float (the rewrite's kept divisors), and the
    product of those floats."""
    f = 1.0
    n = _before_casts(n)
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _op(n) == "mul" \
            and len(n.args) == 2 and sum(isinstance(a, (int, float)) for a in n.args) == 1:
        f *= float(next(a for a in n.args if isinstance(a, (int, float))))
        n = _before_casts(next(a for a in n.args if isinstance(a, fx.Node)))
    return n, f


def _squared(n):
    """``h`` when ``n`` is ``h ** 2``, ``h * h`` or ``square(h)``, else None."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name, args = _op(n), n.args
    if name == "pow" and len(args) == 2 and args[1] == 2:
        return args[0]
    if name == "mul" and len(args) == 2 and args[0] is args[1]:
        return args[0]
    if name == "square" and args:
        return args[0]
    return None


def _next(n, also=()):
    """``(user, via)``: the one op reading ``n`` past value-preserving casts (and ``also``), and the
    node it reads; (None, None) when ``n`` (or a cast of it) has several readers. torch.export's
    dtype assertions are not readers."""
    while True:
        users = [u for u in n.users if _op(u) != "_assert_tensor_metadata"]
        if len(users) != 1 or users[0].op not in ("call_function", "call_method"):
            return None, None
        if _op(users[0]) not in _CASTS + also:
            return users[0], n
        n = users[0]


def _inverse_sqrt(n) -> bool:
    """Whether ``n`` is ``rsqrt(x)`` or ``x ** -0.5`` (Gemma 4's norms avoid rsqrt)."""
    name = _op(n)
    if name == "rsqrt":
        return True
    exponent = n.args[1] if len(n.args) > 1 else n.kwargs.get("exponent")
    return name == "pow" and isinstance(exponent, (int, float)) and exponent == -0.5


def _other(n, known):
    """The argument of the binary op ``n`` that is not ``known``."""
    a = [x for x in n.args[:2] if x is not known]
    return a[0] if len(a) == 1 else None


def _norm_weight(nrm):
    """``(weight get_attr, one_plus)`` when the normalised ``nrm`` is multiplied by a weight ``w``
    (or ``1 + w``) read from the model, past casts and reshapes; else None."""
    u, via = _next(nrm, _RESHAPES)
    if u is None or _op(u) != "mul" or not isinstance(_other(u, via), fx.Node):
        return None
    w = _before_casts(_other(u, via))
    if w.op == "get_attr":
        return w, False
    consts = [a for a in w.args if not isinstance(a, fx.Node)] if _op(w) == "add" and len(w.args) == 2 else []
    nodes = [_before_casts(a) for a in w.args if isinstance(a, fx.Node)]
    if consts in ([1], [1.0]) and len(nodes) == 1 and nodes[0].op == "get_attr":
        return nodes[0], True
    return None


def rms_norm_of(mean: fx.Node) -> RmsNorm | None:
    """The RMS norm whose ``mean`` node this is (the mean of a square over one axis, kept, plus a
    float eps, rsqrt or ``** -0.5``, times the squared value, then maybe times a 1-D weight of the
    model), or None."""
    if mean.op not in ("call_function", "call_method") or _op(mean) != "mean" or len(mean.args) < 2:
        return None
    sq = _before_casts(mean.args[0])
    if not isinstance(sq, fx.Node):
        return None
    if _op(sq) == "mul" and len(sq.args) == 2 and isinstance(sq.args[1], float):
        sq = _before_casts(sq.args[0])  # the compressed graph's old divisor (a scaled mean of squares)
    h = _squared(sq)
    dim = mean.args[1]
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if h is None or not isinstance(dim, int) or not keep:
        return None
    add, via = _next(mean)  # + eps, then rsqrt, then times the normalised input
    eps = _other(add, via) if add is not None and _op(add) == "add" else None
    r = _next(add)[0] if isinstance(eps, float) else None
    nrm = _next(r)[0] if r is not None and _inverse_sqrt(r) else None
    if nrm is None or _op(nrm) != "mul":
        return None
    other = _before_casts(_other(nrm, _next(r)[1]))
    if other is not _before_casts(h):
        w = _bias_free_linear_weight(other, h)
        return RmsNorm(mean, h, dim, eps, w, False, nrm, linear=other) if w is not None else None
    hit = _norm_weight(nrm)
    if hit is None:
        return RmsNorm(mean, h, dim, eps, None, False, nrm)
    return RmsNorm(mean, h, dim, eps, hit[0], hit[1], nrm)


@dataclass(frozen=True)
class MagnitudeMatch:
    """``y = h * rms(g) / rms(h)`` written out: ``h`` rescaled to the root mean square of ``g``
    over the same axis (Gemma 3n's AltUp gives each stream it projects from the first the first's
    magnitude). ``mean``: ``mean(h ** 2)``; ``target``: ``mean(g ** 2)``; ``rms(h)`` may hold an eps
    (a clamp or a sum: ``sqrt(clamp(mean, eps))``), ``rms(g)`` none; ``out``: the node of y."""

    mean: fx.Node
    target: fx.Node
    h: fx.Node
    g: fx.Node
    dim: int
    out: fx.Node


def _mean_of_square(mean: fx.Node):
    """``(h, dim)`` when ``mean`` is ``mean(h ** 2, dim, keepdim=True)`` over one axis, else None."""
    if mean.op not in ("call_function", "call_method") or _op(mean) != "mean" or not mean.args:
        return None
    sq = _before_casts(mean.args[0])
    if isinstance(sq, fx.Node) and _op(sq) == "mul" and len(sq.args) == 2 and isinstance(sq.args[1], float):
        sq = _before_casts(sq.args[0])  # the compressed graph's old divisor
    h = _squared(sq)
    dim = _arg(mean, 1, "dim")
    keep = _arg(mean, 2, "keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if h is None or not isinstance(dim, int) or not keep:
        return None
    return _before_casts(h), dim


def _root(mean: fx.Node):
    """``(r, with_eps)`` when ``mean`` is read by one root (past casts): ``sqrt(mean)``, ``mean ** 0.5``,
    or the root of ``clamp(mean, min=eps)`` / ``mean + eps`` (``with_eps``); else None."""
    u, _ = _next(mean)
    eps = False
    if u is not None and _op(u) in ("clamp", "clamp_min", "add"):
        lo = u.args[1] if len(u.args) > 1 else u.kwargs.get("min")
        if not isinstance(lo, float) or lo <= 0 or (_op(u) == "clamp" and (u.args[2:] or u.kwargs.get("max"))):
            return None
        eps, u = True, _next(u)[0]
    if u is None:
        return None
    exponent = u.args[1] if len(u.args) > 1 else u.kwargs.get("exponent")
    if _op(u) == "sqrt" or (_op(u) == "pow" and isinstance(exponent, (int, float)) and exponent == 0.5):
        return u, eps
    return None


def _product(n, depth: int = 2):
    """``(numerator factors, denominator factors)`` of ``n`` through products and quotients (past casts)."""
    n = _before_casts(n)
    if depth and isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and len(n.args) == 2 \
            and _op(n) in ("mul", "div") and all(isinstance(a, fx.Node) for a in n.args):
        a_num, a_den = _product(n.args[0], depth - 1)
        b_num, b_den = _product(n.args[1], depth - 1)
        return (a_num + b_num, a_den + b_den) if _op(n) == "mul" else (a_num + b_den, a_den + b_num)
    return [n], []


def magnitude_match_at(n: fx.Node) -> MagnitudeMatch | None:
    """The :class:`MagnitudeMatch` whose output is ``n`` (a product or quotient), or None."""
    if n.op not in ("call_function", "call_method") or _op(n) not in ("mul", "div"):
        return None
    num, den = _product(n)
    if len(num) != 2 or len(den) != 1:
        return None
    means = {}
    for r in num + den:
        if not isinstance(r, fx.Node) or _op(r) not in ("sqrt", "pow"):
            continue
        m = r.args[0]
        while isinstance(m, fx.Node) and _op(m) in _CASTS + ("clamp", "clamp_min", "add") and m.args:
            m = m.args[0]
        if isinstance(m, fx.Node) and _mean_of_square(m) is not None and (_root(m) or (None,))[0] is r:
            means[r] = m
    r_h = den[0]
    if r_h not in means:
        return None
    r_g = next((r for r in num if r in means), None)
    h = next((x for x in num if x is not r_g), None)
    if r_g is None or h is None or _root(means[r_g])[1]:
        return None
    (hh, dim), (g, gdim) = _mean_of_square(means[r_h]), _mean_of_square(means[r_g])
    if hh is not h or dim != gdim or g is h:
        return None
    return MagnitudeMatch(means[r_h], means[r_g], h, g, dim, n)


def magnitude_matches_of(mean: fx.Node) -> list | None:
    """The :class:`MagnitudeMatch` es that read ``mean`` (as ``rms(h)`` or as ``rms(g)``), when every read
    of its root is one (an ``rms(g)`` may serve several); else None."""
    if _mean_of_square(mean) is None:
        return None
    root = _root(mean)
    if root is None:
        return None
    out = []
    todo = [u for u in root[0].users if _op(u) != "_assert_tensor_metadata"]
    while todo:
        u = todo.pop()
        if u.op not in ("call_function", "call_method"):
            return None
        if _op(u) in _CASTS:
            todo += list(u.users)
            continue
        # the match ends at this product or at the one after it
        hit = magnitude_match_at(u)
        if hit is None:
            nxt = [w for w in u.users if _op(w) != "_assert_tensor_metadata"]
            hit = magnitude_match_at(nxt[0]) if len(nxt) == 1 else None
        if hit is None or mean not in (hit.mean, hit.target):
            return None
        out.append(hit)
    return out or None


def _bias_free_linear_weight(n, h):
    """The ``get_attr`` node of ``W`` when ``n`` is ``linear(h, W)`` without a bias (past casts), else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or _op(n) != "linear" or len(n.args) < 2:
        return None
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    w = _before_casts(n.args[1])
    if bias is not None or _before_casts(n.args[0]) is not _before_casts(h) or not isinstance(w, fx.Node) \
            or w.op != "get_attr":
        return None
    return w


def linear_after(out: fx.Node) -> fx.Node | None:
    """The linear layer without a bias that alone reads ``out`` (past casts): ``linear(out, W)``
    after an RMS norm without a weight is the norm with ``W`` as its weight (DeepSeek V4's
    hyper-connections mix their normed streams so); else None."""
    u, via = _next(out)
    return u if u is not None and _bias_free_linear_weight(u, via) is not None else None


# the pin reason of an RMS norm without a weight whose output is read otherwise
WEIGHTLESS_READ = ("RMS norm without a weight whose output is read by other than linear layers and sums "
                   "(the own class could not scale around it)")


def _one_number(a, v: fx.Node) -> bool:
    """Whether operand ``a`` (of a product with ``v``) is one number: a Python scalar or a one-element
    tensor not computed from ``v`` (a learnable scalar: modded-nanoGPT's ``lambdas[1] * x0``)."""
    if isinstance(a, (int, float)):
        return True
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return a is not v and isinstance(val, torch.Tensor) and val.numel() == 1


def read_as_stream_or_input(out: fx.Node) -> bool:
    """Whether value ``out`` (an RMS norm's without a weight) is read, past casts and slices of
    positions, only by linear layers as their input, by sums (a residual stream) and products with
    one number, and by the next RMS norm: the reads a module-form rebuild can scale around
    (``passes.resize.weightless_stream_fold``). The norm written out, ``F.rms_norm`` or ``nn.RMSNorm``."""
    import torch.nn as nn

    todo = [out]
    while todo:
        v = todo.pop()
        for u in v.users:
            name = _op(u) if u.op in ("call_function", "call_method") else None
            if name in _CASTS + ("slice", "select", "getitem") and u.args and u.args[0] is v:
                todo.append(u)
            elif name in ("add", "sub") or (name == "type_as" and u.args[0] is not v) \
                    or (name == "mul" and len(u.args) == 2 and any(a is v for a in u.args)
                        and all(a is v or _one_number(a, v) for a in u.args) and u.args[0] is not u.args[1]) \
                    or name in ("size", "_assert_tensor_metadata"):
                continue
            elif name in ("linear", "rms_norm") and u.args and u.args[0] is v:
                continue  # NB: rms_norm: the next norm (post-norm, a norm after the embedding's)
            elif (_squared(u) is v and any(_op(w) == "mean" for w in u.users)) or (name == "mul" and any(
                    isinstance(a, fx.Node) and a.op != "placeholder" and _inverse_sqrt(a) for a in u.args)):
                continue  # NB: the next RMS norm's square and normalising product (post-norm, a norm after another)
            elif u.op == "call_module" and u.args and u.args[0] is v and \
                    isinstance(u.graph.owning_module.get_submodule(u.target), (nn.Linear, nn.RMSNorm)):
                continue
            else:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Global Response Normalization (ConvNeXt V2) written out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grn:
    """ConvNeXt V2's Global Response Normalization in a graph: ``Gx = ||x||_2`` over the ``spatial``
    axes (kept), ``Nx = Gx / (mean(Gx over the channel axis, kept) + eps)``, usually followed by
    ``gamma * (x * Nx) + beta + x`` (timm's ``x + addcmul(beta, gamma, x * Nx)``).

    ``mean``: the channel mean's node; ``norm``: Gx's; ``input``: x (before casts); ``channel`` and
    ``spatial``: the axes, non-negative; ``eps``: the float added to the mean (None without one);
    ``nx``: the node of Nx. ``weight`` and ``bias`` are the ``get_attr`` nodes of gamma and beta and
    ``out`` the node of the whole output, when the output is that affine residual form (else None)."""

    mean: fx.Node
    norm: fx.Node
    input: fx.Node
    channel: int
    spatial: tuple
    eps: float | None
    nx: fx.Node
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    out: fx.Node | None = None


def _arg(n: fx.Node, i: int, name: str, default=None):
    """Argument ``name`` of ``n``, at position ``i`` or by keyword."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _ndim(n: fx.Node) -> int | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _axes(dim, ndim: int) -> tuple | None:
    """``dim`` (an int or a sequence of them) as sorted non-negative axes of an ``ndim``-axis tensor."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    if not dims or not all(type(d) is int and -ndim <= d < ndim for d in dims):
        return None
    return tuple(sorted({d % ndim for d in dims}))


def _spatial_2_norm(n):
    """``(x, axes)`` when ``n`` is the 2-norm of ``x`` over ``axes``, kept (``torch.norm``,
    ``Tensor.norm``, ``torch.linalg.vector_norm``, their ATen op), else None."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name = _op(n)
    if name not in ("norm", "linalg_vector_norm"):
        return None
    x = _arg(n, 0, "input", n.kwargs.get("self"))
    p = _arg(n, 1, "p", "fro") if name == "norm" else _arg(n, 1, "ord", 2)
    ndim = _ndim(x)
    axes = _axes(_arg(n, 2, "dim"), ndim) if ndim is not None else None
    # NB: torch.norm's default "fro" is the 2-norm over one or two axes
    if axes is None or not _arg(n, 3, "keepdim", False) or not (
            (type(p) in (int, float) and p == 2) or (p == "fro" and len(axes) <= 2)):
        return None
    return x, axes


def _param(n):
    """The ``get_attr`` node ``n`` reads, past casts and reshapes, else None."""
    while isinstance(n, fx.Node) and _op(n) in _CASTS + _RESHAPES and n.args:
        n = n.args[0]
    return n if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _terms(n, via, x) -> list:
    """The other operand of the sum ``n`` (read through ``via``); a sum of two nodes other than ``x``
    (``x + beta`` added at once) opened into both."""
    other = _other(n, via)
    if isinstance(other, fx.Node) and _before_casts(other) is not x and _op(other) == "add" \
            and len(other.args) == 2 and not other.kwargs and all(isinstance(a, fx.Node) for a in other.args):
        return list(other.args)
    return [other]


def _summed(start: fx.Node, want: int, x):
    """``(terms, last)``: the ``want`` other operands of the sums that ``start`` goes through alone,
    and the last sum; None when they are not exactly ``want``."""
    out, terms = start, []
    while len(terms) < want:
        s, via = _next(out)
        if s is None or _op(s) != "add" or len(s.args) != 2 or s.kwargs:
            return None
        terms += _terms(s, via, x)
        out = s
    return (terms, out) if len(terms) == want else None


def _grn_affine(nx: fx.Node, x: fx.Node):
    """``(gamma, beta, out)`` when ``Nx`` (``nx``) ends in ``gamma * (x * Nx) + beta + x`` (the sums in
    any order) or timm's ``x + addcmul(beta, gamma, x * Nx)``, gamma and beta read from one module;
    else None."""
    xn, via = _next(nx)
    if xn is None or _op(xn) != "mul" or len(xn.args) != 2 or _before_casts(_other(xn, via)) is not x:
        return None
    u, via = _next(xn)
    if u is not None and _op(u) == "addcmul" and len(u.args) >= 3 and _arg(u, 3, "value", 1) == 1 \
            and via in u.args[1:3] and u.args[1] is not u.args[2]:
        gamma, beta = _param(u.args[1] if u.args[2] is via else u.args[2]), _param(u.args[0])
        hit = _summed(u, 1, x)
        if hit is None or _before_casts(hit[0][0]) is not x:
            return None
    elif u is not None and _op(u) == "mul" and len(u.args) == 2:
        gamma = _param(_other(u, via))
        hit = _summed(u, 2, x)
        if hit is None:
            return None
        rest = [t for t in hit[0] if _before_casts(t) is not x]
        if len(rest) != 1:
            return None
        beta = _param(rest[0])
    else:
        return None
    if gamma is None or beta is None or gamma is beta \
            or gamma.target.rpartition(".")[0] != beta.target.rpartition(".")[0]:
        return None
    return gamma, beta, hit[1]


def grn_of(mean: fx.Node) -> Grn | None:
    """The Global Response Normalization whose channel ``mean`` node this is (the mean, kept, of a
    spatial 2-norm ``Gx`` over one axis the norm keeps, maybe plus a float eps, dividing ``Gx``), or
    None. A compressed graph's mean of ``Gx`` times a float (the old divisor kept) is one too."""
    if mean.op not in ("call_function", "call_method") or _op(mean) != "mean":
        return None
    # NB: the rewrite keeps the old divisor as mean(Gx * new / old), once per compression
    src, _ = _unscaled(_arg(mean, 0, "input", mean.kwargs.get("self")))
    hit = _spatial_2_norm(src)
    if hit is None or not _arg(mean, 2, "keepdim", False):
        return None
    x, spatial = hit
    ndim = _ndim(x)
    ch = _axes(_arg(mean, 1, "dim"), ndim) if ndim is not None else None
    if ch is None or len(ch) != 1 or ch[0] in spatial:
        return None
    add, via = _next(mean)
    eps = _other(add, via) if add is not None and _op(add) == "add" and len(add.args) == 2 else None
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        div, via = _next(add)
    else:
        eps, div = None, add
    if div is None or _op(div) != "div" or len(div.args) != 2 or div.args[1] is not via \
            or _before_casts(div.args[0]) is not src:
        return None
    x = _before_casts(x)
    affine = _grn_affine(div, x)
    gamma, beta, out = affine if affine is not None else (None, None, None)
    return Grn(mean, src, x, ch[0], spatial, None if eps is None else float(eps), div, gamma, beta, out)


# ---------------------------------------------------------------------------------------------
# Layer norms written out by hand
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CentredNorm:
    """A layer norm written out in a graph: ``u = mean(x, dim, keepdim=True)`` and ``s``, the variance of
    ``x`` about it over the same axis: ``mean((x - u) ** 2, dim, keepdim=True)`` (``kind`` "centred"),
    or ``var``/``std`` of ``x`` there, kept (``kind`` "var"/"std", with their ``correction``).
    ConvNeXt's and SAM's channels-first ``LayerNorm``, Cohere's, Restormer's. What is made of ``x - u``
    and ``s`` after (``/ sqrt(s + eps)``, ``* rsqrt``, an affine) is elementwise.

    ``mean``: u's node; ``var``: s's; ``input``: x (before casts); ``dim``: the axis, non-negative;
    ``subs``: the ``x - u`` nodes; ``scale``: the float a centred ``s``'s squares are already multiplied
    by (a compressed graph's old divisor), 1.0 in a model's own graph."""

    mean: fx.Node
    var: fx.Node
    input: fx.Node
    dim: int
    kind: str
    correction: int = 0
    subs: tuple = ()
    scale: float = 1.0


def _one_axis(n: fx.Node, x) -> int | None:
    """The one axis of ``x`` the reduction ``n`` runs over, kept, non-negative; else None."""
    ndim = _ndim(x)
    axes = _axes(_arg(n, 1, "dim"), ndim) if ndim is not None else None
    return axes[0] if axes is not None and len(axes) == 1 else None


def _var_correction(n: fx.Node) -> tuple | None:
    """``(correction, keepdim)`` of a ``var``/``std`` node, however it is spelled (``unbiased=``,
    ``correction=``, ATen's ``dim`` and ``correction`` overloads), or None when it cannot be read."""
    target = n.target
    if isinstance(target, torch._ops.OpOverload):
        if target._overloadname == "dim":  # (self, dim, unbiased, keepdim)
            return int(bool(_arg(n, 2, "unbiased", True))), bool(_arg(n, 3, "keepdim", False))
        if target._overloadname == "correction":  # (self, dim, *, correction, keepdim)
            c = n.kwargs.get("correction")
            return (1 if c is None else c), bool(n.kwargs.get("keepdim", False))
        return None
    if len(n.args) > 2:  # NB: Tensor.var(dim, unbiased, keepdim) positionally: rare, and ambiguous
        return None
    if "correction" in n.kwargs:
        c = n.kwargs["correction"]
        c = 1 if c is None else c
    else:
        c = int(bool(n.kwargs.get("unbiased", True)))
    return c, bool(n.kwargs.get("keepdim", False))


def _centred_mean(u: fx.Node):
    """``(x, dim)`` when ``u`` is ``mean(x, dim, keepdim=True)`` over one axis (past casts and the
    rewrite's float scaling), else None."""
    if u.op not in ("call_function", "call_method") or _op(u) != "mean" or not _arg(u, 2, "keepdim", False):
        return None
    x, _ = _unscaled(_arg(u, 0, "input", u.kwargs.get("self")))
    if not isinstance(x, fx.Node):
        return None
    dim = _one_axis(u, x)
    return (x, dim) if dim is not None else None


def _cast_readers(n: fx.Node):
    """``(reader, via)``: the calls reading ``n`` or a cast of it (``via``: the node they read), past casts."""
    todo = [n]
    while todo:
        m = todo.pop()
        for r in m.users:
            if r.op not in ("call_function", "call_method"):
                continue
            if _op(r) in _CASTS and r.args and r.args[0] is m:
                todo.append(r)
            else:
                yield r, m


def _subs_of(u: fx.Node, x: fx.Node) -> list:
    """The ``x - u`` nodes reading ``u`` (past casts), ``x`` past casts too."""
    return [r for r, via in _cast_readers(u) if _op(r) == "sub" and len(r.args) == 2 and r.args[1] is via
            and _before_casts(r.args[0]) is x and not r.kwargs]


def layer_norm_of(n: fx.Node) -> CentredNorm | None:
    """The layer norm written out (:class:`CentredNorm`) whose mean ``u`` or variance ``s`` node ``n`` is,
    or None."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name = _op(n)
    if name == "mean":
        hit = _centred_mean(n)
        if hit is not None:  # n as u: its variance is a mean of squares of x - u, or var(x)
            for s in _variances(n, *hit):
                return s
        sq, scale = _unscaled(_arg(n, 0, "input", n.kwargs.get("self")))
        d = _before_casts(_squared(sq)) if isinstance(sq, fx.Node) else None
        if isinstance(d, fx.Node) and _op(d) == "sub" and len(d.args) == 2 and isinstance(d.args[1], fx.Node):
            u = _before_casts(d.args[1])
            hit = _centred_mean(u) if isinstance(u, fx.Node) else None
            if hit is not None:
                return next((s for s in _variances(u, *hit) if s.var is n), None)
        return None
    if name in ("var", "std"):
        x = _before_casts(_arg(n, 0, "input", n.kwargs.get("self")))
        # NB: the mean may read x past a cast (Cohere's float32) or the rewrite's float scaling
        for u in (_scaled_readers(x) if isinstance(x, fx.Node) else ()):
            hit = _centred_mean(u) if u is not n and _op(u) == "mean" else None
            if hit is not None and hit[0] is x:
                s = next((s for s in _variances(u, *hit) if s.var is n), None)
                if s is not None:
                    return s
    return None


def _variances(u: fx.Node, x: fx.Node, dim: int):
    """Every :class:`CentredNorm` of the mean ``u`` of ``x`` over ``dim``: the means of squares of its
    ``x - u`` nodes over that axis, and the kept ``var``/``std`` of ``x`` there; none without an ``x - u``
    (a mean alone is no layer norm)."""
    subs = tuple(_subs_of(u, x))
    if not subs:
        return
    for d in subs:
        for r, via in _cast_readers(d):
            if _squared(r) is not via:
                continue
            for m in _scaled_readers(r):
                if _op(m) == "mean" and _arg(m, 2, "keepdim", False) and _one_axis(m, x) == dim:
                    yield CentredNorm(u, m, x, dim, "centred", 0, subs, _unscaled(m.args[0])[1])
    seen = {x} | {c for c in x.users if c.op in ("call_function", "call_method") and _op(c) in _CASTS}
    for src in seen:
        for r in src.users:
            if r.op in ("call_function", "call_method") and _op(r) in ("var", "std") and r is not u \
                    and _before_casts(_arg(r, 0, "input", r.kwargs.get("self"))) is x:
                spec = _var_correction(r)
                if spec is not None and spec[1] and _one_axis(r, x) == dim:
                    yield CentredNorm(u, r, x, dim, _op(r), int(spec[0]), subs)


def _scaled_readers(n: fx.Node) -> list:
    """The readers of ``n`` past casts and multiplications by a float."""
    out, todo = [], [n]
    while todo:
        m = todo.pop()
        for r in m.users:
            if r.op in ("call_function", "call_method") and (
                    (_op(r) in _CASTS and r.args and r.args[0] is m)
                    or (_op(r) == "mul" and len(r.args) == 2 and sum(type(a) in (int, float) for a in r.args) == 1)):
                todo.append(r)
            else:
                out.append(r)
    return out


_VIEWS = ("view", "reshape", "_unsafe_view")


def viewed_shapes(gm: fx.GraphModule) -> dict:
    """``{tensor name: {shape}}``: the constant shapes ``gm`` views or reshapes each of its parameters
    and buffers to (through casts), whichever front-end made the graph (``t.view(shape)``,
    ``torch.reshape``, ``aten.view``)."""
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or _op(n) not in _VIEWS or not n.args:
            continue
        src = _before_casts(n.args[0])
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            continue
        rest = n.args[1:] or (n.kwargs.get("shape"),)
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if shape and all(type(e) is int for e in shape):
            out.setdefault(src.target, set()).add(tuple(shape))
    return out


def layer_norm_params(gm: fx.GraphModule) -> set:
    """Names of the parameters the layer norms and one-group group norms of ``gm`` read as their weight
    or bias (through casts), whichever front-end made the graph (``nn.LayerNorm`` / ``nn.GroupNorm``
    calls, ``F.layer_norm`` / ``F.group_norm``, their aten ops): the norms whose divisor counts
    channels that may be removed."""
    from .channels import ParamRef
    from .registry import op_of

    out = set()
    for n in gm.graph.nodes:
        op = op_of(n, gm) if n.op in ("call_module", "call_function") else None
        if op not in ("layer_norm", "group_norm"):
            continue
        args = call_arguments(n, gm) or {}
        if op == "group_norm" and not (isinstance(args.get("num_groups"), int) and args["num_groups"] == 1):
            continue  # NB: several groups lose whole groups, and keep their divisor
        for v in (args.get("weight"), args.get("bias")):
            v = _before_casts(v)
            if isinstance(v, ParamRef):  # a module form's tensor
                out.add(v.name)
            elif isinstance(v, fx.Node) and v.op == "get_attr":
                out.add(v.target)
    return out
