"""SLB on otofx: ``quantize`` (the rewrite), ``Schedule`` (temperature, hard phase, state BN), ``freeze``.

``quantize(model, example_inputs, bits=b)`` captures the model with otofx's front-ends, selects the
layers on the graph (:mod:`otofx.passes.slb`) and parametrises them on a copy of the model (its own
class) or, where that cannot be done, on the graph (:class:`otofx.passes.slb.SLBPass`): a new
trainable model whose selected weights are SLB parametrisations (the user's model is not touched). Train it
with any optimizer, stepping a :class:`Schedule` once per epoch; then :func:`freeze` gives a model
with plain discrete weights, and :func:`otofx.slb.to_torchao` hands them to torchao.

Internals:
    * :func:`slb_layers` finds the parametrised weights by walking the modules (``parametrize``
      keeps them under ``module.parametrizations.<attr>``); nothing else is recorded on the model.
    * The temperature follows the reference's ``TemperatureScheduler``; epochs are counted from 0:
      epoch ``e`` trains at ``T(e) = start_val * t_factor ** (min(e, e1) - e0)`` when ``e > e0`` and
      ``start_val`` before, with ``e0 = floor(t_start * E)`` and ``e1 = floor(t_end * E)``
      (``t_end_val`` replaces ``t_factor`` by ``(t_end_val / start_val) ** (1 / (e1 - e0))``); from
      epoch ``e1`` on the training forward uses the hard (argmax) weights and the logits stop
      training (``requires_grad_(False)``; optimizers skip parameters whose ``grad`` is None, so
      call ``zero_grad(set_to_none=True)``, torch's default).
    * State BN (the reference's ``BNCalibrationCallback``): after every epoch ``e >= e0``, BatchNorm
      running statistics are re-estimated (cumulative average, ``momentum=None`` while it runs)
      with the model in eval mode (argmax weights) and only the BatchNorm modules in training mode.
    * ``# NB:`` a parametrised module cannot be pickled whole (``torch.save(q)``); save
      ``q.state_dict()``, or the frozen model, which holds plain tensors.
"""
from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from otofx.calibrate import reestimate_bn
from otofx.errors import InputError
from otofx.passes.nodes import copy_module
from otofx.slb.export import nonfinite
from otofx.slb.modules import SLBWeight

log = logging.getLogger("otofx")


REFERENCE_T_END = 1.2 ** 40  # golden-stick's temperature at t_end: 1.2 per epoch from 0.2 to 0.6 of 100 epochs


@dataclass(frozen=True)
class SLBLayer:
    """One parametrised weight of a model returned by :func:`quantize`."""

    name: str  # the weight's qualified name ("features.3.weight")
    module: nn.Module  # the module holding it
    attr: str  # "weight"
    slb: SLBWeight  # the parametrisation (bits, grid, temperature, scale)

    @property
    def logits(self) -> nn.Parameter:
        return self.module.parametrizations[self.attr].original


def slb_layers(model: nn.Module) -> list[SLBLayer]:
    """Every SLB-parametrised weight of ``model``; a tied weight (one original in several modules)
    once, under the name it was selected by (``SLBWeight.home``; else its first holder's)."""
    found: dict = {}
    for mname, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            for p in plist:
                if isinstance(p, SLBWeight):
                    found.setdefault(id(plist.original), []).append(
                        SLBLayer(f"{mname}.{attr}" if mname else attr, m, attr, p))
    out = []
    for holders in found.values():
        home = getattr(holders[0].slb, "home", None)
        out.append(next((h for h in holders if h.name == home), holders[0]))
    return out


def _need_slb(model: nn.Module, what: str) -> list[SLBLayer]:
    if not isinstance(model, nn.Module):
        raise InputError(f"{what} takes the model returned by otofx.slb.quantize, got {type(model).__name__}")
    layers = slb_layers(model)
    if not layers:
        raise InputError(f"{what}: {type(model).__name__} has no SLB weights; pass the model returned by "
                         "otofx.slb.quantize(model, example_inputs, bits=...)")
    return layers


_FORMS = ("graph", "module", "auto")


def quantize(model: nn.Module, example_inputs, bits: int = 1, layers=None, *, scale: bool | None = None,
             warm_start: float | None = None, act_bits: int | None = None, act_quant: str = "minmax",
             frontend: str = "auto", form: str = "auto") -> nn.Module:
    """A new trainable model with SLB weights (``bits`` per weight) on the selected layers.

    ``form``: ``"module"`` gives a copy of the model itself, its own class (a language model keeps
    ``generate()``), with the parametrisations on its modules and the activation quantisers run by
    forward pre-hooks; ``"graph"`` the captured ``torch.fx.GraphModule``; ``"auto"`` (the default)
    the module when every selected weight is a parameter of a submodule (and, with ``act_bits``,
    every layer's input is its module's input), else the graph (the reason is logged). ``"module"``
    raises that reason. Both forms compute the same function.

    ``layers``: None (default) takes every Conv/Linear but the first and the last in graph order
    (the input layer and the classifier stay float, as in SLB's reference runs); ``"all"``; or a
    name, glob pattern, ``nn.Module`` type, callable ``(name, module) -> bool``, or a list of them.
    ``scale``: None gives a learned per-output-channel scale to layers whose output feeds no
    normalisation (our addition: SLB relies on the BatchNorm after each layer); True/False forces it.
    ``warm_start``: tau0 > 0 initialises the logits from the float weights,
    ``A_j = -(W/s - v_j)**2 / tau0`` (our addition; SLB starts from random logits, the default).
    ``act_bits``: optional activation fake quantisation of each selected layer's input
    (``act_quant``: "minmax" EMA or "pact"), off by default.

    Works on any model otofx can capture, ``oto.compress()``'s GraphModule included, in float32,
    bfloat16 or float16 (the logits, grid, scales and activation quantisers take each weight's dtype
    and device). A weight several modules hold (``aux.weight = head.weight``) is one SLB weight. The
    result is in the model's training mode; eval mode uses the argmax (discrete) weights. Every
    argument is checked before the capture (:class:`otofx.errors.InputError` names it).
    """
    from otofx import pipeline
    from otofx.passes import slb as P

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(form, str) or form not in _FORMS:
        raise InputError(f"form={form!r}: choose one of {_FORMS}")
    # every argument checked before the capture (the slow part)
    make = P.weight_factory(bits, scale, warm_start)  # bits, scale, warm_start
    act = P.act_factory(act_bits, act_quant)
    P.check_layers(layers)
    options = dict(scale=scale, warm_start=warm_start, act_bits=act_bits, act_quant=act_quant)
    if form == "graph":
        state = pipeline.Pipeline([pipeline.Capture(frontend), P.SLBPass(bits, layers, **options)]).run(
            model, example_inputs)
        q = state.gm
    else:
        gm = pipeline.Pipeline([pipeline.Capture(frontend)]).run(model, example_inputs).gm
        picked = P.select_layers(gm, layers)
        why = P.module_form_blocker(model, gm, picked, act is not None)
        if why is None:
            q = P.parametrize_model(model, picked, make, act)
            log.info("otofx.slb: %d-bit SLB weights on %d layers of %s (its own class)", bits, len(picked),
                     type(model).__name__)
        elif form == "module":
            raise InputError(f"otofx.slb.quantize(form='module'): {why}; use form='graph'")
        else:
            log.info("otofx.slb.quantize: the graph form (%s)", why)
            q = P.slb_parametrize(gm, bits, picked, **options)
    for m in q.modules():  # NB: not q.train(): a torch.export GraphModule raises on train()/eval()
        m.training = model.training
    return q


@contextmanager
def weights(model: nn.Module, mode: str):
    """Force every SLB weight of ``model`` to ``mode`` ("soft", "hard") whatever the module's mode.

    ``with otofx.slb.weights(q, "soft"): evaluate(q, ...)`` measures the continuous state.
    """
    if mode not in ("soft", "hard"):
        raise InputError(f"mode={mode!r}: choose 'soft' (softmax(A*T)@v) or 'hard' (v[argmax A])")
    layers = _need_slb(model, "otofx.slb.weights")
    saved = [(layer.slb, layer.slb.force) for layer in layers]
    try:
        for slb, _ in saved:
            slb.force = mode
        yield model
    finally:
        for slb, force in saved:
            slb.force = force


def calibrate_bn(model: nn.Module, loader: Iterable, batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics with the discrete (argmax) weights.

    Runs ``model`` in eval mode (argmax SLB weights, no dropout) with only its BatchNorm modules in
    training mode over ``loader`` (batches of ``x`` or ``(x, y)``; the first ``batches`` only, if
    given); the statistics are a cumulative average over the batches. Modes and momenta are
    restored. Returns the number of batches used. Works on any model (SLB weights or not); the
    work is :func:`otofx.calibrate.reestimate_bn`'s.
    """
    _check_batches(batches, "batches")
    return reestimate_bn(model, loader, batches)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_batches(batches, arg: str) -> None:
    if batches is not None and (not _is_int(batches) or batches < 1):
        raise InputError(f"{arg}={batches!r}: give a positive number of batches, or None for the whole loader")


class Schedule:
    """SLB's per-epoch schedule for a model from :func:`quantize`; call ``step()`` after each epoch.

    Temperature: epoch ``e`` (from 0) trains at ``start_val * t_factor ** (min(e, e1) - e0)`` for
    ``e > e0`` (``start_val`` before), ``e0 = floor(t_start * epochs)``, ``e1 = floor(t_end *
    epochs)``. From epoch ``e1`` the training forward uses the hard one-hot weights and the logits
    are frozen (BatchNorm and other float parameters still train). ``t_end_val``, if given, sets
    the temperature reached at ``e1`` instead of ``t_factor`` (the factor becomes ``(t_end_val /
    start_val) ** (1 / (e1 - e0))``): the reference's per-epoch 1.2 assumes its 100 epochs
    (``1.2 ** 40``, about 1470, at ``e1``); over a short budget the same factor leaves the softmax
    near uniform when the hard phase starts (at 20 epochs it reaches 4.3), so the switch to the
    argmax is abrupt. ``t_end_val=REFERENCE_T_END`` keeps the reference's end point at any budget
    (our addition: the reference fixes the factor, not the end point). State BN: with a
    ``calibration_loader``, after every epoch ``e >= e0`` the BatchNorm statistics are re-estimated
    with the argmax weights (:func:`calibrate_bn`, ``calibration_batches`` batches or all).

    A short run keeps one soft epoch: when ``floor(t_end * epochs)`` is 0 (``epochs=1`` at the
    default ``t_end``), ``e1`` is 1 (warned), so the logits train in epoch 0. The schedule counts
    ``step()`` calls: for a fine-tune of a single epoch, call ``step()`` every few batches and give
    ``epochs`` as the number of those calls.
    """

    def __init__(self, q: nn.Module, epochs: int, calibration_loader: Iterable | None = None, *,
                 t_start: float = 0.2, t_end: float = 0.6, t_factor: float = 1.2, start_val: float = 1.0,
                 calibration_batches: int | None = None, t_end_val: float | None = None):
        self.layers = _need_slb(q, "otofx.slb.Schedule")
        if not _is_int(epochs) or epochs < 1:
            raise InputError(f"epochs={epochs!r}: give the number of training epochs (a positive integer; the "
                             "number of step() calls the run makes)")
        for arg, v in (("t_start", t_start), ("t_end", t_end), ("t_factor", t_factor), ("start_val", start_val)) + (
                (("t_end_val", t_end_val),) if t_end_val is not None else ()):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise InputError(f"{arg}={v!r}: give a finite number")
        if not 0.0 <= t_start <= t_end <= 1.0 or t_end == 0:
            raise InputError(f"t_start={t_start}, t_end={t_end}: need 0 <= t_start <= t_end <= 1 and t_end > 0 "
                             "(fractions of epochs; the hard phase starts at t_end, and t_end=0 would freeze the "
                             "logits before they train)")
        if not (t_factor > 0 and start_val > 0):
            raise InputError(f"t_factor={t_factor}, start_val={start_val}: both must be positive")
        if t_end_val is not None and not t_end_val > 0:
            raise InputError(f"t_end_val={t_end_val!r}: give the positive temperature to reach at t_end, or None")
        _check_batches(calibration_batches, "calibration_batches")
        self.q, self.epochs, self.loader = q, epochs, calibration_loader
        self.t_start, self.t_end, self.t_factor, self.start_val = t_start, t_end, t_factor, start_val
        self.calibration_batches = calibration_batches
        self.e0, self.e1 = math.floor(t_start * epochs), math.floor(t_end * epochs)
        if self.e1 == 0:
            # NB: floor(t_end * epochs) is 0 for a short run (epochs < 1 / t_end: one epoch at the default
            # 0.6), which would start in the hard phase with the logits frozen before the first step: the
            # soft phase gets the first epoch (e1 = 1), and the hard phase starts at the second, if any
            self.e1 = 1
            log.warning("otofx.slb.Schedule: epochs=%d with t_end=%s leaves no soft epoch (floor(t_end * epochs) = "
                        "0); the logits train in epoch 0 and the hard phase starts at epoch 1%s; for a short "
                        "fine-tune, step() every few batches with epochs counting those steps", epochs, t_end,
                        " (after the run: eval and freeze use the argmax weights)" if epochs == 1 else "")
        if t_end_val is not None and self.e1 > self.e0:
            self.t_factor = (t_end_val / start_val) ** (1.0 / (self.e1 - self.e0))
        self.epoch = 0
        self._apply()

    def temperature(self, epoch: int) -> float:
        if epoch <= self.e0:
            return self.start_val
        return self.start_val * self.t_factor ** (min(epoch, self.e1) - self.e0)

    def hard(self, epoch: int) -> bool:
        return epoch >= self.e1

    def _apply(self) -> None:
        t, hard = self.temperature(self.epoch), self.hard(self.epoch)
        for layer in self.layers:
            layer.slb.temperature.fill_(t)
            layer.slb.hard.fill_(hard)
            if hard:
                layer.logits.requires_grad_(False)
                layer.logits.grad = None

    def step(self) -> None:
        """End of epoch ``self.epoch``: state BN calibration if due, then the next epoch's settings."""
        if self.loader is not None and self.epoch >= self.e0:
            calibrate_bn(self.q, self.loader, self.calibration_batches)
        self.epoch += 1
        self._apply()
        log.debug("otofx.slb: epoch %d: temperature %.4g, hard %s", self.epoch, self.temperature(self.epoch),
                  self.hard(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._apply()


@dataclass(frozen=True)
class FrozenLayer:
    """What :func:`freeze` recorded about one discrete weight (read by ``to_torchao`` and ``size_report``)."""

    name: str  # the weight's qualified name
    bits: int
    scale: torch.Tensor | None  # per-output-channel scale ([O]; [E, O] for fused experts) or None (grid values as they are)
    out_dim: int = 0  # the output channels' dim (1: a weight stored [in, out], read as x @ W)
    batch: bool = False  # fused experts [E, ., .]: dim 0 counts experts
    plain: bool = True  # read only as torchao's tensor runs it (see otofx.passes.slb.Layer.plain)


@torch.no_grad()
def freeze(q: nn.Module, loader: Iterable | None = None, batches: int | None = None) -> nn.Module:
    """A copy of ``q`` whose SLB weights are plain discrete tensors (``q`` is not modified).

    Every frozen weight holds at most ``2**bits`` distinct values per layer (per output channel
    when the layer has a scale): ``v[argmax A]`` (times the scale). With ``loader`` the copy's
    BatchNorm statistics are first re-estimated with these weights (:func:`calibrate_bn`). The
    result computes exactly what ``q`` computes in eval mode (after the same calibration). Its
    ``otofx_slb`` attribute lists the frozen layers (:class:`FrozenLayer`). Logits or scales holding
    NaN or inf (a diverged run) are named in a warning; :func:`otofx.slb.to_torchao` refuses them.
    """
    layers = _need_slb(q, "otofx.slb.freeze")
    _check_batches(batches, "batches")
    f = copy_module(q)
    if loader is not None:
        calibrate_bn(f, loader, batches)
    frozen, by_module, made, bad = {}, {}, {}, []
    for layer in slb_layers(f):  # NB: a tied weight (one original in several modules) stays one tensor
        slb = layer.slb
        parts = nonfinite({"logits": layer.logits, "scale": slb.scale})
        if parts:
            bad.append(f"'{layer.name}' ({parts})")
        made[id(layer.logits)] = nn.Parameter(slb.discrete(layer.logits).detach(), requires_grad=False)
        scale = None if slb.scale is None else slb.scale.detach().clone()
        frozen[layer.name] = FrozenLayer(layer.name, slb.bits, scale, slb.out_dim, slb.batch,
                                        getattr(slb, "plain", True))
    for m in f.modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            if any(isinstance(p, SLBWeight) for p in plist):
                by_module.setdefault(id(m), (m, []))[1].append((attr, made[id(plist.original)]))
    for module, weights in by_module.values():  # an attention module may hold three (q, k, v)
        _strip(module, [attr for attr, _ in weights])
        for attr, w in weights:
            setattr(module, attr, w)
    f.otofx_slb = frozen
    if bad:
        # NB: warned, not raised: the frozen model still computes what q computes in eval mode (NaN
        # included), to be inspected; to_torchao refuses it
        log.warning("otofx.slb.freeze: non-finite (NaN or inf) values in %s: the training diverged, and these "
                    "weights are meaningless (otofx.slb.to_torchao refuses them); train again with a lower learning "
                    "rate (or clipped gradients)", ", ".join(bad))
    log.info("otofx.slb: froze %d layers", len(layers))
    return f


def _strip(module: nn.Module, attrs: list) -> None:
    """Drop ``module``'s parametrisations of ``attrs`` (the module must have no other one).

    # NB: not ``parametrize.remove_parametrizations``: a deep copy of a parametrised module shares
    # its generated class with the original, and removal deletes the property from that class,
    # which would break the original model (``q``) too. Restoring the base class touches neither.
    """
    others = [k for k in module.parametrizations if k not in attrs]
    if others:
        raise InputError(f"{type(module).__name__} has parametrisations of {others} besides SLB's on {attrs}: "
                         "remove them (torch.nn.utils.parametrize.remove_parametrizations) before freeze")
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]


__all__ = ["quantize", "Schedule", "REFERENCE_T_END", "calibrate_bn", "freeze", "slb_layers", "SLBLayer", "FrozenLayer",
           "weights"]
