"""The operator-semantics registry: canonical op names, rules, and how each op form binds to them.

A rule is registered once per op family under a canonical name (``conv``, ``linear``, ``add``...).
Every form of the op -- an ``nn.Module`` class, a torch function, a tensor method name, an ATen
overload -- is bound to that name with a small *binder* that turns the fx node into the rule's
keyword arguments, so rules never ask which front-end produced the graph.

Internals:
    * ``analyze(ctx, **kw)`` returns the output value's label; the docstring's first line is the
      rule's channel algebra and is shown in ``otofx rules``.
    * ``fix(site, **kw)`` (optional) runs in the rewrite after parameters were sliced; it updates
      module attributes and literal arguments from the old/new shapes in ``site``.
    * Binders for functional forms are generated from the op's positional parameter names
      (``spec``); keyword-only names are read from ``node.kwargs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx


@dataclass(frozen=True)
class Rule:
    name: str
    analyze: Callable
    fix: Callable | None = None

    @property
    def doc(self) -> str:
        return (self.analyze.__doc__ or "").strip().splitlines()[0] if self.analyze.__doc__ else ""


@dataclass(frozen=True)
class Form:
    """One concrete spelling of an op: which rule, and how to bind a node to its arguments."""

    rule: str
    spec: tuple = ()  # positional parameter names for functional forms
    defaults: tuple = ()  # (name, value) pairs
    extra: tuple = ()  # (name, value) pairs always passed to the rule
    module_binder: Callable | None = None  # (node, module, args, kwargs) -> dict


RULES: dict[str, Rule] = {}
MODULE_FORMS: dict[type, Form] = {}
FUNCTION_FORMS: dict[Any, Form] = {}
METHOD_FORMS: dict[str, Form] = {}


def rule(name: str, fix: Callable | None = None):
    def deco(fn):
        if name in RULES:
            raise ValueError(f"rule {name!r} registered twice")
        RULES[name] = Rule(name, fn, fix)
        return fn

    return deco


def functions(rule_name: str, targets, spec, defaults=(), **extra) -> None:
    form = Form(rule_name, tuple(spec), tuple(defaults), tuple(extra.items()))
    for t in targets:
        if t is not None:
            FUNCTION_FORMS[t] = form


def methods(rule_name: str, names, spec, defaults=(), **extra) -> None:
    form = Form(rule_name, tuple(spec), tuple(defaults), tuple(extra.items()))
    for n in names:
        METHOD_FORMS[n] = form


def modules(rule_name: str, types, binder: Callable, **extra) -> None:
    form = Form(rule_name, extra=tuple(extra.items()), module_binder=binder)
    for t in types:
        if t is not None:
            MODULE_FORMS[t] = form


def _submodule(root, target: str):
    # ``root`` is a module or a ready {qualified name: module} dict (fast path for whole-graph walks)
    return root[target] if isinstance(root, dict) else root.get_submodule(target)


def form_of(node: fx.Node, root) -> Form | None:
    if node.op == "call_module":
        return MODULE_FORMS.get(type(_submodule(root, node.target)))
    if node.op == "call_function":
        try:
            return FUNCTION_FORMS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_FORMS.get(node.target)
    return None


def canonical_name(node: fx.Node, root) -> str:
    """The rule name of ``node``, or a readable name of its target when no rule knows it."""
    form = form_of(node, root)
    if form is not None:
        return form.rule
    if node.op == "call_module":
        return type(_submodule(root, node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


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
        for k, v in kwargs.items():
            out[k] = v
    out.update(form.extra)
    return out


def arg_slot(form: Form, node: fx.Node, name: str):
    """Where argument ``name`` of a functional/method node sits: ('args', i) or ('kwargs', name)."""
    if name in node.kwargs:
        return ("kwargs", name)
    spec = form.spec
    if name in spec:
        i = spec.index(name)
        if i < len(node.args):
            return ("args", i)
    return ("kwargs", name)


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
