"""The operator-semantics registry: rules, their properties, and how each op form binds to them.

A *rule* states the channel algebra of a family of ops (``conv``, ``unary``, ``reshape``...) and
is registered once, under its name, with the properties every pass reads (does it read parameter
arguments, keep its input's shape, keep its axes in order...). Every concrete spelling of an op --
an ``nn.Module`` class, a torch function, a tensor method name, an ATen overload -- is a *form*
bound to one rule: ``Form.op`` says what the op is (``relu``, ``instance_norm``), ``Form.rule``
which algebra it follows (``unary``, ``batch_norm``). The rules live in ``passes/rules/``, one
file per family; ``register_rule`` (``otofx.register_rule``) binds a user's layer or function.

Internals:
    * ``analyze(ctx, **kw, meta=...)`` returns the output value's labels (``meta`` is the node's
      shape-propagated value); the docstring's first line is the rule's channel algebra, shown by
      ``otofx rules``, and a rule without one is refused. A rule raises ``RuleDeclined`` for a
      call outside its algebra: the values it touches are pinned. Any other exception is a bug:
      it re-raises in strict mode (``OTOFX_STRICT_RULES=1``, which the tests set) and is logged at
      WARNING otherwise, and the call is pinned as if declined.
    * ``fix(site, **kw)`` (optional) runs in the rewrite after parameters were sliced; it updates
      module attributes and literal arguments from the old/new shapes in ``site``.
    * Binding: an ATen overload's positional argument names come from its schema
      (``op._schema.arguments``, ``self`` read as ``input``, other renames per registration); a
      Python function's from ``spec`` or, when none is given, its signature; keyword-only names
      are read from ``node.kwargs``. Module forms have a binder ``(node, module, args, kwargs)``.
    * A target bound twice raises: a second spelling must be a deliberate ``unregister`` first.
    * A layer whose weight weight norm computes (``passes/weightnorm.py``) is found through its
      base class's form; other parametrised layers have none.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from otofx.fxcompat import is_op_overload, op_schema


class RuleDeclined(Exception):
    """Raised by a rule for a call outside its algebra (the call's values are then pinned)."""


def strict_rules() -> bool:
    """Whether a rule that raises anything but ``RuleDeclined`` stops the analysis (the tests set it)."""
    return os.environ.get("OTOFX_STRICT_RULES", "") not in ("", "0")


# values of Rule.keeps_shape: how the output's layout follows the input's (shape propagation
# skips running such ops on meta and builds the output itself)
ELEMENTWISE = "elementwise"  # a dense input's strides are kept (activations, per-channel affine maps)
KEEPS_CONTIGUOUS = "keeps_contiguous"  # a contiguous input's layout is kept; others are run (batch/group norm)
CONTIGUOUS_OUT = "contiguous_out"  # the output is always contiguous (layer norm)


@dataclass(frozen=True)
class Rule:
    """One channel algebra and the properties the passes read.

    ``reads_params``: parameter arguments reach ``analyze`` as references for ``ctx.param``
    (lazily labelled: no union for an axis the parameter owns). ``takes_sizes``: sizes read off
    a tensor (``SymSize``) among the arguments are shapes the rule keeps consistent; for other
    rules they pin the axes they measure. ``python_values``: runs even when no argument is a
    tensor (arithmetic, indexing of tuples). ``keeps_shape``: the output has its first input's
    shape and dtype, with the layout named by one of ``ELEMENTWISE``, ``KEEPS_CONTIGUOUS``,
    ``CONTIGUOUS_OUT``. ``keeps_axes``: the output keeps the rank and order of its first tensor
    input's axes (sizes may change: a slice, a concat).
    """

    name: str
    analyze: Callable
    fix: Callable | None = None
    reads_params: bool = False
    takes_sizes: bool = False
    python_values: bool = False
    keeps_shape: str | None = None
    keeps_axes: bool = False

    @property
    def doc(self) -> str:
        return _first_line(self.analyze)


@dataclass(frozen=True)
class Form:
    """One concrete spelling of an op: what it is, which rule, and how a node binds to its arguments."""

    rule: str  # the channel algebra it follows
    op: str  # what the op is: a canonical op name (``relu``, ``instance_norm``, ``conv2d``)
    spec: tuple = ()  # positional parameter names for functional and method forms
    defaults: tuple = ()  # (name, value) pairs
    extra: tuple = ()  # (name, value) pairs always passed to the rule
    module_binder: Callable | None = None  # (node, module, args, kwargs) -> dict
    rename: tuple = ()  # (schema name, rule name) pairs for keyword arguments (ATen forms)
    changes_dtype_or_strides: bool = False  # output dtype or strides may differ from the input's (to, clone)


RULES: dict[str, Rule] = {}
MODULE_FORMS: dict[type, Form] = {}
FUNCTION_FORMS: dict[Any, Form] = {}
METHOD_FORMS: dict[str, Form] = {}

_LAYOUTS = (None, ELEMENTWISE, KEEPS_CONTIGUOUS, CONTIGUOUS_OUT)


def _first_line(fn) -> str:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def rule(name: str, fix: Callable | None = None, **properties):
    """Decorator registering ``analyze`` as rule ``name`` (see :class:`Rule` for ``properties``)."""

    def deco(fn):
        add_rule(Rule(name, fn, fix, **properties))
        return fn

    return deco


def add_rule(r: Rule) -> Rule:
    if r.name in RULES:
        raise ValueError(f"rule {r.name!r} registered twice")
    if not r.doc:
        raise ValueError(f"rule {r.name!r}: the first line of its docstring must state its channel algebra")
    if r.keeps_shape not in _LAYOUTS:
        raise ValueError(f"rule {r.name!r}: keeps_shape must be one of {_LAYOUTS}, got {r.keeps_shape!r}")
    RULES[r.name] = r
    return r


# -- canonical op names --------------------------------------------------------------------------

# python operator and method spellings -> ATen's name of the op
_OP_ALIASES = {"truediv": "div", "true_divide": "div", "concat": "cat", "concatenate": "cat", "clip": "clamp",
               "swapaxes": "transpose", "swapdims": "transpose", "moveaxis": "movedim", "ndimension": "dim",
               "floordiv": "floor_divide", "mod": "remainder"}
_DUNDER_INPLACE = re.compile(r"^__i(add|sub|mul|truediv|matmul)__$")
_DUNDER_REFLECTED = re.compile(r"^__r(add|mul|truediv)__$")


def op_name(spelling: str) -> str:
    """The canonical op name of a function or method name: ``__iadd__``, ``add_``, ``iadd`` -> ``add``."""
    n = spelling
    m = _DUNDER_INPLACE.match(n) or _DUNDER_REFLECTED.match(n)
    if m:
        n = m.group(1)
    elif n.startswith("__") and n.endswith("__"):
        n = n[2:-2]
    elif n in ("iadd", "isub", "imul", "itruediv", "imatmul"):
        n = n[1:]
    if n.endswith("_") and not n.startswith("_") and len(n) > 1:
        n = n[:-1]  # the in-place variant is the same op
    return _OP_ALIASES.get(n, n)


def _target_op(t) -> str:
    if is_op_overload(t):
        return op_name(t.overloadpacket.__name__)
    return op_name(getattr(t, "__name__", None) or str(t))


def module_op(cls: type) -> str:
    """A module class's op name: the functional op it computes (``LeakyReLU`` -> ``leaky_relu``,
    ``BatchNorm2d`` -> ``batch_norm``, ``Conv2d`` -> ``conv2d``)."""
    import torch.nn.functional as F

    name = cls.__name__
    if hasattr(F, name.lower()):
        return name.lower()
    words = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name.replace("ReLU", "Relu"))  # RMSNorm -> RMS_Norm
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", words).lower()  # LeakyRelu -> leaky_relu
    base = re.sub(r"\d+d$", "", snake)
    return base if base != snake and hasattr(F, base) else snake


# -- forms ----------------------------------------------------------------------------------------


def _bind_key(table: dict, key, form: Form, what: str) -> None:
    if key in table:
        raise ValueError(f"{what} is already bound to rule {table[key].rule!r} (op {table[key].op!r}); "
                         "unregister it first to bind it again")
    table[key] = form


def _schema_spec(op, rename: dict) -> tuple:
    """Positional names of an ATen overload from its schema; a name renamed to ``*x`` takes the rest."""
    spec = []
    for a in op_schema(op).arguments:
        if a.kwarg_only:
            break
        n = rename.get(a.name, a.name)
        spec.append(n)
        if n.startswith("*"):
            break
    return tuple(spec)


def _signature_spec(fn) -> tuple:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn!r} has no readable signature: give its positional argument names (spec)") from e
    out = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            out.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
    return tuple(out)


def _unique(items) -> list:
    seen, out = set(), []
    for t in items:
        if t is not None and id(t) not in seen:  # F.relu_ is torch.relu_: one spelling, listed twice
            seen.add(id(t))
            out.append(t)
    return out


def functions(rule_name: str, targets, spec=None, defaults=(), rename=None, op: str | None = None,
              changes_dtype_or_strides: bool = False, **extra) -> None:
    """Bind functions and ATen overloads to ``rule_name``.

    ATen overloads take their positional names from their schema (``self`` -> ``input``, then
    ``rename``); other functions take ``spec``, or their signature when ``spec`` is None.
    """
    names = {"self": "input", **(rename or {})}
    kw_rename = tuple((k, v) for k, v in names.items() if not v.startswith("*"))
    for t in _unique(targets):
        aten = is_op_overload(t)
        s = _schema_spec(t, names) if aten else (tuple(spec) if spec is not None else _signature_spec(t))
        form = Form(rule_name, op or _target_op(t), s, tuple(defaults), tuple(extra.items()),
                    rename=kw_rename if aten else (), changes_dtype_or_strides=changes_dtype_or_strides)
        _bind_key(FUNCTION_FORMS, t, form, f"function {t!r}")


def methods(rule_name: str, names, spec, defaults=(), op: str | None = None,
            changes_dtype_or_strides: bool = False, **extra) -> None:
    for n in names:
        form = Form(rule_name, op or op_name(n), tuple(spec), tuple(defaults), tuple(extra.items()),
                    changes_dtype_or_strides=changes_dtype_or_strides)
        _bind_key(METHOD_FORMS, n, form, f"tensor method {n!r}")


def modules(rule_name: str, types, binder: Callable, op: str | None = None, **extra) -> None:
    for t in _unique(types):
        form = Form(rule_name, op or module_op(t), extra=tuple(extra.items()), module_binder=binder)
        _bind_key(MODULE_FORMS, t, form, f"module class {t.__qualname__}")


def unregister(target) -> Form:
    """Remove ``target``'s form (a module class, a function or ATen overload, or a method name).

    A rule no form uses any more stays registered (its name is taken); ``RULES.pop`` removes it.
    """
    form = form_for(target)
    for table in (MODULE_FORMS, METHOD_FORMS, FUNCTION_FORMS):
        try:
            if table.get(target) is form:
                del table[target]
        except TypeError:  # unhashable
            continue
    return form


def register_rule(target, rule: str | Callable, *, bind: Callable | None = None, args=None, op: str | None = None,
                  name: str | None = None, fix: Callable | None = None, **properties) -> Form:
    """Teach otofx an op: bind ``target`` to a rule, so its channels are analysed instead of pinned.

    ``target``: an ``nn.Module`` subclass (its instances become graph leaves), a function or ATen
    overload, or a tensor method name. ``rule``: the name of a registered rule (``otofx rules``
    lists them) or a new rule function ``analyze(ctx, ..., meta=None, **_)`` whose docstring's
    first line states its channel algebra; a new rule is registered under ``name`` (default: the
    function's name) with ``fix`` and the :class:`Rule` ``properties``. ``bind(module, *args,
    **kwargs) -> dict`` gives a module's rule arguments; the module's own parameters and buffers
    may be returned as they are. ``args`` names a function's positional arguments when its
    signature cannot be read (a method's default to ``("input",)``); ``op`` says what it is
    (default: from the target's name). Binding a target twice raises ``ValueError``.
    """
    if callable(rule) and not isinstance(rule, str):
        rule_name = name or rule.__name__
        add_rule(Rule(rule_name, rule, fix, **properties))
    else:
        if fix is not None or properties or name is not None:
            raise ValueError(f"register_rule({target!r}, {rule!r}): fix, name and rule properties belong to a new "
                             "rule function, not to an existing rule")
        if rule not in RULES:
            raise ValueError(f"register_rule({target!r}, {rule!r}): no rule of that name; `otofx rules` lists them")
        rule_name = rule
    try:
        if isinstance(target, type) and issubclass(target, torch.nn.Module):
            modules(rule_name, [target], _user_binder(bind), op=op)
        elif isinstance(target, str):
            methods(rule_name, [target], tuple(args) if args is not None else ("input",), op=op)
        elif callable(target):
            functions(rule_name, [target], args, op=op)
        else:
            raise ValueError(f"register_rule: {target!r} is not a module class, a function or a method name")
    except Exception:
        if rule_name != rule:  # nothing half-done: the new rule goes too
            RULES.pop(rule_name, None)
        raise
    return form_for(target)


def form_for(target) -> Form:
    """The form ``target`` (a module class, a function or ATen overload, or a method name) is bound to."""
    for table in (MODULE_FORMS, METHOD_FORMS, FUNCTION_FORMS):
        try:
            if target in table:
                return table[target]
        except TypeError:  # unhashable
            continue
    raise KeyError(f"{target!r} is not bound to any rule")


def _user_binder(bind: Callable | None) -> Callable:
    """A module binder from a user's ``bind(module, *args, **kwargs)``: tensors the module owns
    become references to them, by qualified name."""
    from .channels import ParamRef

    def binder(node, m, args, kwargs):
        out = bind(m, *args, **kwargs) if bind is not None else {"input": args[0] if args else kwargs.get("input")}
        owned = {id(t): n for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        return {k: ParamRef(f"{node.target}.{owned[id(v)]}") if isinstance(v, torch.Tensor) and id(v) in owned else v
                for k, v in out.items()}

    return binder


# -- nodes ----------------------------------------------------------------------------------------


def _submodule(root, target: str):
    # ``root`` is a module or a ready {qualified name: module} dict (fast path for whole-graph walks)
    return root[target] if isinstance(root, dict) else root.get_submodule(target)


def form_of(node: fx.Node, root) -> Form | None:
    if node.op == "call_module":
        m = _submodule(root, node.target)
        form = MODULE_FORMS.get(type(m))
        if (form is None and "parametrizations" in m._modules) or m._forward_pre_hooks:
            # a weight-normed layer (a per-instance parametrised class, or the deprecated hook)
            from .weightnorm import module_form

            return module_form(m, form, MODULE_FORMS)
        return form
    if node.op == "call_function":
        try:
            return FUNCTION_FORMS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_FORMS.get(node.target)
    return None


def rule_of(node: fx.Node, root) -> Rule | None:
    form = form_of(node, root)
    return RULES[form.rule] if form is not None else None


def _readable(node: fx.Node, root) -> str:
    if node.op == "call_module":
        return type(_submodule(root, node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def canonical_name(node: fx.Node, root) -> str:
    """The rule name of ``node``, or a readable name of its target when no rule knows it."""
    form = form_of(node, root)
    return form.rule if form is not None else _readable(node, root)


def op_of(node: fx.Node, root) -> str:
    """What ``node`` computes: its form's canonical op name, or a readable name of its target."""
    form = form_of(node, root)
    return form.op if form is not None else _readable(node, root)


def bind(form: Form, node: fx.Node, args: tuple, kwargs: dict, module=None) -> dict:
    """Keyword arguments for ``form``'s rule; ``args``/``kwargs`` are the node's evaluated values."""
    if form.module_binder is not None:
        out = form.module_binder(node, module, args, kwargs)
    else:
        out = dict(form.defaults)
        spec = form.spec
        if spec and spec[-1].startswith("*"):  # varargs: the rest of the positionals
            fixed = spec[:-1]
            for k, v in zip(fixed, args):
                out[k] = v
            out[spec[-1][1:]] = tuple(args[len(fixed):])
        else:
            for k, v in zip(spec, args):
                out[k] = v
            if len(args) > len(spec):  # arguments no rule reads (inplace flags, slopes, p...)
                out["_rest"] = tuple(args[len(spec):])
        names = dict(form.rename)
        for k, v in kwargs.items():
            out[names.get(k, k)] = v
    out.update(form.extra)
    return out


def arg_slot(form: Form, node: fx.Node, name: str):
    """Where argument ``name`` of a functional/method node sits: ('args', i) or ('kwargs', name)."""
    key = next((s for s, r in form.rename if r == name), name)  # the name the node spells it with
    if key in node.kwargs:
        return ("kwargs", key)
    spec = form.spec
    if name in spec:
        i = spec.index(name)
        if i < len(node.args):
            return ("args", i)
    return ("kwargs", key)


def set_arg(node: fx.Node, slot, value) -> None:
    kind, key = slot
    if kind == "args":
        a = list(node.args)
        a[key] = value
        node.args = tuple(a)
    else:
        kw = dict(node.kwargs)
        kw[key] = value
        node.kwargs = kw
