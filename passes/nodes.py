"""Small facts about graph nodes and modules that several passes need, each defined once.

``mutates_input(node)``: whether a node writes its first argument in place; ``get_path(root,
name)``: a parameter, buffer or submodule by qualified name; ``set_path`` puts one there;
``graph_module(root, graph, name)``: fx's GraphModule with root's buffer persistence kept.

Internals:
    * In-place is read off the spelling: a method or function whose name ends in one ``_``
      (``x.add_``, ``torch.relu_``), the augmented operators (``+=``...), ``operator.setitem``,
      an ``inplace=True`` argument, or a module whose ``inplace`` attribute is True.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

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
        return node.target in _WRITES_FIRST or _inplace_name(getattr(node.target, "__name__", ""))
    if node.op == "call_module":
        if module is None:
            module = node.graph.owning_module.get_submodule(node.target)
        # NB: nn.ReLU(inplace=True) whose result is unused still rewrites its input for later readers
        return getattr(module, "inplace", False) is True
    return False


def get_path(root: torch.nn.Module, name: str):
    """The attribute at dotted ``name`` under ``root`` (a parameter, buffer or submodule)."""
    return functools.reduce(getattr, name.split("."), root)


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


def graph_module(root: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` that keeps which of root's buffers are persistent.

    # NB: fx before torch 2.12 registers every buffer it copies from ``root`` as persistent, so a
    # non-persistent buffer (an export graph's lifted constant) would enter the state_dict
    """
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
