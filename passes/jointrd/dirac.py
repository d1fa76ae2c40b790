"""Dirac reparametrisation of square convolutions and linear layers, and its exact fold.

``apply_dirac(gm) -> tuple[str, ...]`` parametrises, in place, every weight of a convolution or
linear layer whose input and output widths are equal as ``W = alpha * delta + beta * V`` per output
channel (DiracNets; JointRD's ``DiracConv2d``), with ``delta`` the identity kernel (``conv(x, delta)
== x``; the identity matrix for a linear layer), ``alpha`` initialised to 1, ``beta`` to 0.1 and
``V`` the layer's current weight. ``fold_dirac(module)`` bakes every such weight back into a plain
parameter, in place; the folded layer computes what the parametrised one did (the same expression,
evaluated once).

Eligible layers: ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules called in the graph, and functional
convolutions / linear calls (``F.conv2d``, ATen ``convolution``/``conv2d``/``linear`` in a
``torch.export`` graph) whose weight is read by ``get_attr``; convolutions need ``groups == 1``, odd
kernel sizes (so the delta is centred), and not transposed. A weight that already has a
parametrisation, or is read by more than one layer, is left alone.

Internals:
    * ``torch.nn.utils.parametrize`` does the bookkeeping: the raw weight moves to
      ``<module>.parametrizations.weight.original`` and ``alpha``/``beta``/``delta`` live in the
      :class:`Dirac` module, so optimizers and state_dicts see them as ordinary parameters.
    * The fold is ``remove_parametrizations(..., leave_parametrized=True)``, which evaluates the
      parametrisation once and restores the module's original class.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger("otofx")

ALPHA_INIT = 1.0
BETA_INIT = 0.1

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {torch.nn.functional.conv1d: 6, torch.nn.functional.conv2d: 6, torch.nn.functional.conv3d: 6,
                   torch.conv1d: 6, torch.conv2d: 6, torch.conv3d: 6,
                   torch.ops.aten.conv1d.default: 6, torch.ops.aten.conv2d.default: 6,
                   torch.ops.aten.conv3d.default: 6, torch.ops.aten.convolution.default: 8}
_LINEAR_FUNCTIONS = {torch.nn.functional.linear, torch.ops.aten.linear.default}


class Dirac(nn.Module):
    """``W = alpha * delta + beta * V`` per output channel (a ``parametrize`` parametrisation)."""

    def __init__(self, weight: torch.Tensor, alpha: float = ALPHA_INIT, beta: float = BETA_INIT):
        super().__init__()
        out = weight.shape[0]
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.alpha = nn.Parameter(torch.full((out,), float(alpha), **kw))
        self.beta = nn.Parameter(torch.full((out,), float(beta), **kw))
        delta = torch.zeros(weight.shape, **kw)
        if weight.dim() == 2:
            delta.copy_(torch.eye(out, **kw))
        else:
            nn.init.dirac_(delta)
        self.register_buffer("delta", delta)
        self._view = (-1,) + (1,) * (weight.dim() - 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.alpha.view(self._view) * self.delta + self.beta.view(self._view) * v


def _square(weight: torch.Tensor, conv: bool, groups: int = 1) -> bool:
    if weight.dim() < 2 or weight.shape[0] != weight.shape[1] * groups or groups != 1:
        return False
    if conv:
        return weight.dim() >= 3 and all(k % 2 == 1 for k in weight.shape[2:])
    return weight.dim() == 2


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    prefix, _, field = target.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), field


def dirac_sites(gm: fx.GraphModule) -> list[tuple[str, nn.Module, str]]:
    """(weight name, owning module, attribute) for every eligible weight of ``gm``."""
    sites, users = {}, {}
    for n in gm.graph.nodes:
        site = None
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, _CONV_MODULES) and not parametrize.is_parametrized(m, "weight") \
                    and _square(m.weight, True, m.groups):
                site = (f"{n.target}.weight", m, "weight")
            elif isinstance(m, nn.Linear) and not parametrize.is_parametrized(m, "weight") \
                    and _square(m.weight, False):
                site = (f"{n.target}.weight", m, "weight")
            elif isinstance(m, (*_CONV_MODULES, nn.Linear)):
                users[f"{n.target}.weight"] = users.get(f"{n.target}.weight", 0) + 1
        elif n.op == "call_function" and (n.target in _CONV_FUNCTIONS or n.target in _LINEAR_FUNCTIONS):
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                owner, field = _owner(gm, w.target)
                t = getattr(owner, field)
                conv = n.target in _CONV_FUNCTIONS
                groups = 1
                if conv:
                    slot = _CONV_FUNCTIONS[n.target]
                    groups = n.args[slot] if len(n.args) > slot else n.kwargs.get("groups", 1)
                    if n.target is torch.ops.aten.convolution.default and n.args[6]:  # transposed
                        groups = -1
                if isinstance(t, nn.Parameter) and not parametrize.is_parametrized(owner, field) \
                        and isinstance(groups, int) and _square(t, conv, groups):
                    site = (w.target, owner, field)
        if site is not None:
            users[site[0]] = users.get(site[0], 0) + 1
            sites.setdefault(site[0], site)
    # NB: a weight read by two layers (tied) would be reparametrised once for both; leave it plain
    return [s for name, s in sites.items() if users[name] == 1]


def apply_dirac(gm: fx.GraphModule, alpha: float = ALPHA_INIT, beta: float = BETA_INIT) -> tuple[str, ...]:
    """Parametrise every eligible weight of ``gm`` in place; returns their names."""
    names = []
    for name, owner, field in dirac_sites(gm):
        parametrize.register_parametrization(owner, field, Dirac(getattr(owner, field), alpha, beta))
        names.append(name)
    log.info("otofx.jointrd: Dirac-parametrised %d weights", len(names))
    return tuple(names)


def _own_class(m: nn.Module) -> None:
    """Give ``m`` a parametrised class of its own before a removal edits the class.

    # NB: ``parametrize`` keeps the parametrised weight as a property of a class made for the module
    # at registration; a deep copy shares that class, and ``remove_parametrizations`` deletes the
    # property from it, which would break the original (folding a copy must leave the student working)
    """
    cls = m.__class__
    m.__class__ = type(cls.__name__, cls.__bases__,
                       {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})


def fold_dirac(module: nn.Module) -> int:
    """Bake every Dirac-parametrised weight of ``module`` into a plain parameter, in place; returns how many."""
    count = 0
    for m in list(module.modules()):
        if not parametrize.is_parametrized(m):
            continue
        for field, plist in list(m.parametrizations.items()):
            if any(isinstance(p, Dirac) for p in plist):
                _own_class(m)
                parametrize.remove_parametrizations(m, field, leave_parametrized=True)
                count += 1
    return count
