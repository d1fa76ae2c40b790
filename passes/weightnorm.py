"""Weight norm: layers whose weight is ``W = g * v / ||v||`` (HiFi-GAN, EnCodec/DAC, wav2vec2's positional conv).

``torch.nn.utils.parametrizations.weight_norm`` (``g`` = ``parametrizations.weight.original0``, ``v`` =
``original1``) and the deprecated ``torch.nn.utils.weight_norm`` (a forward pre-hook recomputing
``weight`` from ``weight_g`` and ``weight_v``) on a conv or linear layer: the layer keeps its rule,
its weight argument becomes a :class:`~otofx.passes.channels.WeightNormRef`, and
``Ctx.weight_norm_lab`` labels ``g`` and ``v`` (``g`` is zeroable along ``dim``; ``v`` never along
``dim``, where ``v_i = 0`` is 0/0). The norm runs over every axis of ``v`` but ``dim`` (all of them
for ``dim=None``, stored as -1 by torch); any ``dim`` is handled. Captured by torch.export, the same
weight is the ATen call ``_weight_norm(v, g, dim)``, whose rule (``weight_norm``, in
``rules/linalg.py``) hands the conv or linear reading it the same reference.

Removing a non-zero slice of ``v`` outside ``dim`` (an input column whose channel is zero: OTO
zeroes the producer's row, never v's column) changes ``||v||``: :func:`refit_gains` then sets
``g' = g * ||v'|| / ||v||`` per norm slice, in both forms of the rewrite, so ``W`` keeps its kept
entries exactly. Other parametrisations (spectral norm, orthogonal, a user's own) and weight norm
on other layers stay unknown: :func:`unknown_reason` names them in the report.

Internals:
    * A parametrised module's class is made per instance by ``torch.nn.utils.parametrize``
      (``ParametrizedConv1d``): :func:`module_form` derives its form from the base class's, with a
      binder that swaps the weight's ``ParamRef`` for the reference; a form per class, cached weakly.
    * A deep copy of a parametrised module shares its class with the original: the compressed
      model's copies get classes of their own (:func:`own_classes`).
    * The deprecated form keeps a stale ``weight`` tensor as a plain attribute of the module until
      its next forward: :func:`refit_gains` recomputes it after slicing, so ``fix`` hooks and
      resizers read the new shape.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .channels import ParamRef, WeightNormRef
from .nodes import get_path
from .registry import Form

# rules whose layers check their input where v's slices are not zeroable (see Ctx.weight_norm_lab)
RULES_WITH_WEIGHT_NORM = ("conv", "linear")
PARAMETRIZATIONS = "torch.nn.utils.parametrizations.weight_norm"
HOOKS = "torch.nn.utils.weight_norm"

_FORMS: "weakref.WeakKeyDictionary[type, Form | None]" = weakref.WeakKeyDictionary()
_HOOK_FORMS: dict = {}  # id(base form) -> derived form


def norm_dim(dim, ndim: int) -> int | None:
    """torch's weight-norm ``dim`` as an axis of v, or None for the norm over the whole tensor (-1)."""
    if dim is None or dim == -1:
        return None
    return int(dim) % ndim


def _is_weight_norm(p: nn.Module) -> bool:
    return type(p).__name__ == "_WeightNorm" and type(p).__module__ == "torch.nn.utils.parametrizations"


def _hooks(m: nn.Module) -> list:
    """The deprecated weight-norm (and spectral-norm) hooks of ``m``."""
    return [h for h in m._forward_pre_hooks.values() if type(h).__name__ in ("WeightNorm", "SpectralNorm")
            and type(h).__module__.startswith("torch.nn.utils")]


def weight_norms(m: nn.Module, prefix: str) -> dict | None:
    """``{attribute: WeightNormRef}`` of ``m`` (qualified under ``prefix``), or None when one of its
    tensors is computed some other way (another parametrisation, a chain, a spectral-norm hook)."""
    dot = f"{prefix}." if prefix else ""
    out = {}
    if parametrize.is_parametrized(m):
        for attr, plist in m.parametrizations.items():
            if len(plist) != 1 or not _is_weight_norm(plist[0]):
                return None
            ndim = plist.original1.dim()
            at = f"{dot}parametrizations.{attr}"
            out[attr] = WeightNormRef(f"{at}.original0", f"{at}.original1", norm_dim(plist[0].dim, ndim), PARAMETRIZATIONS)
    for h in _hooks(m):
        if type(h).__name__ != "WeightNorm":
            return None
        v = getattr(m, f"{h.name}_v")
        out[h.name] = WeightNormRef(f"{dot}{h.name}_g", f"{dot}{h.name}_v", norm_dim(h.dim, v.dim()), HOOKS)
    return out


def _binder(base, m_type_name: str):
    def binder(node, m, args, kwargs):
        out = base(node, m, args, kwargs)
        refs = weight_norms(m, node.target) or {}
        swap = {ParamRef(f"{node.target}.{attr}"): ref for attr, ref in refs.items()}
        return {k: swap.get(v, v) if isinstance(v, ParamRef) else v for k, v in out.items()}

    binder.__qualname__ = f"weight_norm_binder[{m_type_name}]"
    return binder


def _derived(base: Form, name: str) -> Form:
    return Form(base.rule, base.op, base.spec, base.defaults, base.extra, _binder(base.module_binder, name),
                base.rename, base.changes_dtype_or_strides)


def module_form(m: nn.Module, form: Form | None, module_forms: dict) -> Form | None:
    """The form of a module carrying weight norm (``form``: the one its class has, None for a
    parametrised class), or ``form`` itself when it carries none; None when otofx does not know it."""
    cls = type(m)
    if parametrize.is_parametrized(m):
        if cls in _FORMS:
            return _FORMS[cls]
        base = next((module_forms[c] for c in cls.__mro__[1:] if c in module_forms), None)
        ok = base is not None and base.rule in RULES_WITH_WEIGHT_NORM and weight_norms(m, "") is not None
        _FORMS[cls] = _derived(base, cls.__name__) if ok else None
        return _FORMS[cls]
    if form is None or not _hooks(m):
        return form
    if form.rule not in RULES_WITH_WEIGHT_NORM or weight_norms(m, "") is None:
        return None
    key = id(form)
    if key not in _HOOK_FORMS:
        _HOOK_FORMS[key] = (form, _derived(form, cls.__name__))  # NB: the base form kept alive with its id
    return _HOOK_FORMS[key][1]


def unknown_reason(m: nn.Module, module_forms: dict) -> str | None:
    """Why a module whose tensors a parametrisation or hook computes has no rule, or None if it has none."""
    kinds = []
    if parametrize.is_parametrized(m):
        for attr, plist in m.parametrizations.items():
            kinds.append(f"'{attr}' by {' then '.join(type(p).__name__ for p in plist)}")
    for h in _hooks(m):
        api = type(h).__name__.lower().replace("norm", "_norm")
        kinds.append(f"'{h.name}' by {type(h).__name__} (the hook of torch.nn.utils.{api})")
    if not kinds:
        return None
    mro = type(m).__mro__[1:] if parametrize.is_parametrized(m) else type(m).__mro__
    base = next((c.__name__ for c in mro if c in module_forms), None)
    if weight_norms(m, "") is not None and base is not None:
        return (f"weight norm on {base}: otofx follows it in conv and linear layers only ({', '.join(kinds)})")
    return (f"{', '.join(kinds)}: a parametrisation otofx has no rule for (it knows "
            f"{PARAMETRIZATIONS} and {HOOKS} on conv and linear layers)")


def _keeps(plan, names: set) -> dict:
    """``{tensor name: {dim: bool keep mask}}`` for the axes of ``names`` that lose entries."""
    uf, out = plan.zigset.uf, {}
    for o in plan.zigset.owners:
        if o.name in names:
            keep = ~plan.removed_roots[uf.find(o.ids)]
            if not keep.all():
                out.setdefault(o.name, {})[o.dim] = torch.from_numpy(np.nonzero(keep)[0])
    return out


def refit_gains(plan, old: nn.Module, new: nn.Module) -> None:
    """Rescale ``g`` of every weight-normed weight of ``new`` (``old`` sliced by ``plan``) whose ``v``
    lost entries outside ``dim``: ``g' = g * ||v'|| / ||v||`` per norm slice, so ``W``'s kept entries are
    unchanged; then recompute the weight that a deprecated weight-norm hook keeps on its module."""
    from .prune import take

    refs = getattr(plan.zigset, "weight_norms", ())
    keeps = _keeps(plan, {r.v for r in refs})
    with torch.no_grad():
        for ref in refs:
            cuts = keeps.get(ref.v, {})
            if not any(d != ref.dim for d in cuts):
                continue  # NB: whole norm slices removed (or nothing): the kept norms are the old ones
            dim = -1 if ref.dim is None else ref.dim
            along = [(ref.dim, cuts[ref.dim])] if ref.dim in cuts else []
            v_old, g_old = get_path(old, ref.v).detach(), get_path(old, ref.g).detach()
            before = torch.norm_except_dim(take(v_old, along).double(), 2, dim)
            after = torch.norm_except_dim(get_path(new, ref.v).detach().double(), 2, dim)
            # NB: a zero norm slice is 0/0 in the dense model already: its gain is left as it is
            ratio = torch.where(before > 0, after / before.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
            g = take(g_old, along) if along else g_old
            get_path(new, ref.g).copy_((g.double() * ratio.to(g.device)).to(g.dtype))
        for m in new.modules():
            for h in _hooks(m):
                if type(h).__name__ == "WeightNorm":
                    setattr(m, h.name, h.compute_weight(m))


def gain_of(model: nn.Module, name: str) -> str | None:
    """The qualified name of ``g`` when ``name`` is a weight-normed tensor of ``model`` (``W = g * v /
    ||v||``: scaling ``g`` by f scales ``W`` by f, whatever ``dim``), else None."""
    path, _, attr = name.rpartition(".")
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    if not (parametrize.is_parametrized(m) or _hooks(m)):
        return None
    ref = (weight_norms(m, path) or {}).get(attr)
    return ref.g if ref is not None else None


def computed_shapes(m: nn.Module, name: str, shapes: dict) -> dict:
    """``{attribute: old shape}`` of the weight-normed tensors of module ``name`` (``shapes``: the old
    model's tensor shapes by qualified name), for resizers that compare a weight's old and new shapes."""
    refs = weight_norms(m, name) if parametrize.is_parametrized(m) or _hooks(m) else None
    return {attr: shapes[ref.v] for attr, ref in (refs or {}).items() if ref.v in shapes}


def own_classes(root: nn.Module) -> nn.Module:
    """Give every parametrised module of ``root`` (a deep copy) a class of its own, in place; returns
    ``root``. ``torch.nn.utils.parametrize`` makes one class per module and ``copy.deepcopy`` keeps
    it, so removing the copy's weight norm (``remove_parametrizations`` deletes the class's property,
    as a vocoder does before inference) would break the user's model too."""
    for m in root.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, body)
    return root


def stale_weights(root: nn.Module) -> dict:
    """``{id(t): t.detach()}`` of the weights that deprecated weight-norm hooks keep on their modules,
    for a deep copy's memo: such a weight is the output of the last forward (not a graph leaf, which
    ``copy.deepcopy`` refuses); :func:`refit_gains` recomputes it in the copy."""
    out = {}
    for m in root.modules():
        for h in _hooks(m):
            t = m.__dict__.get(h.name)
            if type(h).__name__ == "WeightNorm" and isinstance(t, torch.Tensor):
                out[id(t)] = t.detach()
    return out
