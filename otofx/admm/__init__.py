"""Micro-structured weight unification and pruning, trained by ADMM (seed 002, Lin et al. 2021).

Each Linear/Conv weight is tiled into small blocks (``otofx.passes.admm``). A block is either
pruned (all zero), unified (one magnitude shared by its weights, each keeping its sign) or free.
Training with the constraint is ADMM (the framework of Zhang et al. 2018; METHODS.md section 4 is
our reconstruction, since the paper has no public code):

* W-step: the base optimizer on ``f(W) + rho/2 ||W - Z + U||^2`` (the wrapper adds
  ``rho (W - Z + U)`` to each blocked weight's gradient before the base step);
* Z-step: ``Z = project(W + U)``, the closed-form greedy projection onto the constraint set;
* U-step: ``U += W - Z``; rho grows geometrically from ``rho`` to ``rho_max`` over the rounds, and
  the scaled dual is rescaled by ``rho_old / rho_new`` when it does (Boyd et al. 2011, section
  3.4.1), so the unscaled dual ``rho U`` carries over. Without that (``rescale_dual=False``, as some
  ADMM-pruning code does) every growth of rho multiplies the dual's pull too and W overshoots the
  constraint set (on digits, bench/admm.py --val: 4x the primal residual at the same rho range).

Usage::

    opt = otofx.admm.ADMM(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          block=(4, 4), prune=0.5, unify=0.25, rounds=10, steps_per_round=len(loader) * 2)
    sched = opt.round_lr()                     # optional: the lr restarts every round (any scheduler works)
    for x, y in loader:                        # an ordinary loop
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    small = otofx.admm.finish(model, opt)      # hard projection + a re-parametrisation that keeps it
    ... retrain `small` (pruned blocks stay 0, one learnable magnitude per unified block) ...
    print(otofx.admm.format_storage(otofx.admm.storage(small)))   # bits per weight, vs float32
    fast, names = otofx.admm.to_bsr(small.cuda().half())   # finished Linears through torch's BSR product

Baselines: :func:`finish` alone on a trained model is the one-shot projection (then retrain);
:class:`BlockHESSO` is OTOv3's HESSO schedule with blocks as its groups.

Internals:
    * Z, U, rho and the round counter live in ``ADMM.admm_state``; ``state_dict()`` holds them
      beside the base optimizer's state, so a run resumes exactly.
    * ``param_groups`` *is* the base optimizer's list: learning-rate schedulers built on the
      wrapper drive the base optimizer.
    * :class:`BlockParam` is a ``torch.nn.utils.parametrize`` parametrisation: the module's weight
      becomes ``W * free + sign * |magnitude|[block]``, so pruned blocks are constant zero and a
      unified block's weights move together and keep their signs, whatever the optimizer does
      (:func:`export` stores those signs and ``|magnitude|``: ``to_dense()`` is the model's weight).
    * ``ADMM.step(closure)`` hands the base optimizer a closure that adds the ADMM term to every
      evaluation (LBFGS); :class:`BlockHESSO` saves its pruning progress in ``state_dict()`` too, and
      both re-share the base's ``param_groups`` after ``load_state_dict`` (torch replaces the list).
    * # NB: HESSO's fused row kernels (``otofx.kernels``) describe rows as whole slices along one
      dim; a block is a tile across two dims, so :class:`BlockHESSO` computes its block statistics
      with torch ops over ``blocks_of`` views instead.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from otofx.errors import InputError, OTOError
from otofx.passes.admm import blocks as B
from otofx.passes.admm.blocks import FREE, PRUNED, UNIFIED, BlockGroup, BlockSet, find_blocks, project
from otofx.passes.modules import attention_reader
from otofx.passes.nodes import copy_module, parameter_holders

log = logging.getLogger("otofx")


def _pairs(params_or_model, block, layers, blocks: BlockSet | None):
    """``(BlockSet, [(group, parameter)])`` for a model or named parameters."""
    if isinstance(params_or_model, nn.Module):
        blockset = blocks or find_blocks(params_or_model, block, layers)
        _refuse_missing(params_or_model, blockset)
        return blockset, B.select_layers(params_or_model.named_parameters(), blockset)
    named = list(params_or_model)
    if not named or not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise InputError("ADMM takes a model or its named_parameters() (name, parameter) pairs")
    if blocks is None:
        blocks = _named_blocks(named, block, layers)
    return blocks, B.select_layers(named, blocks)


def _named_blocks(named: list, block, layers) -> BlockSet:
    """The block groups of named parameters: every one with two or more dims, tiled as stored.

    There are no modules here: ``layers=`` and a ``block=`` dict match a parameter's name or its
    module's name (the name less its last part), and a module type is an error.
    """
    B.check_blocks(block)
    if isinstance(block, dict) and any(isinstance(k, type) for k in block):
        raise InputError("a block= dict keyed by module type needs the model: pass ADMM the model, not its "
                         "named_parameters() (or key the dict by name)")
    pick = B.Layers(layers)
    if pick.types:
        raise InputError(f"layers={layers!r} selects module types, which needs the model: pass ADMM the model, not "
                         "its named_parameters() (or select by parameter or module name)")
    groups = []
    for n, p in named:
        if p.ndim < 2 or p.numel() == 0:
            continue
        mod_name = n.rpartition(".")[0]
        sel = pick(n, None) if pick.pred is not None else pick(mod_name, None, (n,))
        if not sel:
            continue
        b = B.block_for(block, (n, mod_name), None)
        if b is not None:
            groups.append(B._group(n, tuple(p.shape), B.check_block(b, f"block for '{n}'")))
    pick.check_names("parameter (or module of one) with 2 or more dims")
    if not groups:
        raise InputError("no parameter with 2 or more dims to block among the named parameters"
                         + (": check `layers=` and `block=`" if layers is not None or isinstance(block, dict) else ""))
    return BlockSet(tuple(groups))


def _refuse_missing(model: nn.Module, blockset: BlockSet) -> None:
    """An InputError that says why a block group names no parameter of ``model`` (a parametrised weight)."""
    params = dict(model.named_parameters())
    for g in blockset:
        if g.name in params:
            continue
        mod_name, _, attr = g.name.rpartition(".")
        try:
            m = model.get_submodule(mod_name)
        except AttributeError:
            m = None
        if m is not None and parametrize.is_parametrized(m, attr):
            if any(isinstance(p, BlockParam) for p in m.parametrizations[attr]):
                raise InputError(f"'{g.name}' is already parametrised by otofx.admm.finish(): finish() and ADMM take "
                                 "a model that was not finished (otofx.admm.plain(model) folds the blocks into plain "
                                 "weights)")
            kinds = ", ".join(type(p).__name__ for p in m.parametrizations[attr])
            raise InputError(f"'{g.name}' is already parametrised ({kinds}): it is computed, not a parameter; leave it "
                             "out of the blocks (find_blocks skips it) or remove its parametrisation")
        raise InputError(f"block group '{g.name}' names no parameter of the model: find_blocks on the same model")


def _warn_zeroed(blocks, prune: float, unify: float, who: str) -> None:
    """A warning for each layer whose every block ``prune`` prunes (the counts round to whole blocks)."""
    for g in blocks:
        if prune > 0 and B.counts_for(g.n_blocks, prune, unify)[0] == g.n_blocks:
            log.warning("otofx.admm.%s: prune=%g prunes all %d block(s) of '%s' (counts round to whole blocks): the "
                        "layer is zeroed entirely; give it smaller blocks (a block dict) or leave it out (layers=)",
                        who, prune, g.n_blocks, g.name)


def _rho_range(rho, rho_max) -> tuple[float, float]:
    for name, x in (("rho", rho), ("rho_max", rho_max)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
            raise InputError(f"{name}={x!r} must be a finite number > 0 (the ADMM penalty weight)")
    if rho > rho_max:
        raise InputError(f"rho={rho!r} must be <= rho_max={rho_max!r} (rho grows from rho to rho_max over the rounds)")
    return float(rho), float(rho_max)


class ADMM(torch.optim.Optimizer):
    """ADMM training of block-pruned / unified weights around any ``torch.optim`` optimizer.

    ``params_or_model``: the model (its Linear/Conv weights are blocked; ``layers=`` selects) or
    its ``named_parameters()`` (every parameter with two or more dims is blocked, tiled as stored;
    ``layers=`` and a ``block=`` dict match parameter or module names there, not types). ``prune`` and
    ``unify``: fractions of each layer's blocks. ``rounds`` Z/U updates, one every
    ``steps_per_round`` steps; rho goes geometrically from ``rho`` to ``rho_max``, the scaled dual
    rescaled by ``rho_old / rho_new`` each time unless ``rescale_dual=False``. The default range,
    1e-2 -> 10, is the one chosen on a validation split for digits (bench/RESULTS.md section 8): rho
    weighs against the loss, so a loss on another scale than cross-entropy needs its own range.
    """

    def __init__(self, params_or_model, base_optimizer: torch.optim.Optimizer, *, block=(4, 4),
                 prune: float = 0.5, unify: float = 0.0, rho: float = 1e-2, rho_max: float = 10.0,
                 rounds: int = 10, steps_per_round: int | None = None, rescale_dual: bool = True, layers=None,
                 blocks: BlockSet | None = None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise InputError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if steps_per_round is None:
            raise InputError("ADMM needs steps_per_round >= 1 (optimizer steps between Z/U updates, e.g. 2 epochs)")
        self.steps_per_round = B.whole("steps_per_round", steps_per_round)
        self.rounds = B.whole("rounds", rounds)
        self.rho0, self.rho_max = _rho_range(rho, rho_max)
        B.counts_for(1, prune, unify)  # validates the fractions
        self.blocks, self._pairs = _pairs(params_or_model, block, layers, blocks)
        self.base = base_optimizer
        self.prune, self.unify = float(prune), float(unify)
        self.rescale_dual = bool(rescale_dual)
        base_ids = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        outside = [g.name for g, p in self._pairs if id(p) not in base_ids]
        if outside:
            raise InputError(f"blocked parameters {outside[:3]} are not in base_optimizer: build it over the same model")
        super().__init__([p for _, p in self._pairs], {})
        _share_groups(self)
        _warn_zeroed(self.blocks, self.prune, self.unify, "ADMM")
        self.admm_state = {"t": 0, "round": 0, "rho": self.rho0, "z": {}, "u": {}}
        with torch.no_grad():
            for g, p in self._pairs:
                self.admm_state["z"][g.name] = project(p.detach(), g, self.prune, self.unify).z.clone()
                self.admm_state["u"][g.name] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    # -- the three steps ------------------------------------------------------------------------
    @property
    def rho(self) -> float:
        return self.admm_state["rho"]

    @property
    def round(self) -> int:
        return self.admm_state["round"]

    def _rho_at(self, k: int) -> float:
        if self.rounds == 1:
            return self.rho0
        return self.rho0 * (self.rho_max / self.rho0) ** (min(k, self.rounds - 1) / (self.rounds - 1))

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        """``grad += rho (W - Z + U)`` for every blocked weight with a gradient."""
        rho, z, u = self.rho, self.admm_state["z"], self.admm_state["u"]
        for g, p in self._pairs:
            if p.grad is not None:
                p.grad.add_(p.detach() - z[g.name] + u[g.name], alpha=rho)

    @torch.no_grad()
    def penalty(self) -> float:
        """``rho/2 sum ||W - Z + U||^2`` over the blocked weights: the term ADMM adds to the loss."""
        z, u = self.admm_state["z"], self.admm_state["u"]
        return 0.5 * self.rho * sum(float((p.detach() - z[g.name] + u[g.name]).double().square().sum())
                                    for g, p in self._pairs)

    @torch.no_grad()
    def zu_step(self) -> None:
        """``Z = project(W + U)``, ``U += W - Z``, then the next round's rho."""
        z, u = self.admm_state["z"], self.admm_state["u"]
        for g, p in self._pairs:
            w = p.detach()
            z[g.name] = project(w + u[g.name], g, self.prune, self.unify).z
            u[g.name].add_(w - z[g.name])
        self.admm_state["round"] += 1
        old, self.admm_state["rho"] = self.rho, self._rho_at(self.admm_state["round"])
        if self.rescale_dual and self.rho != old:
            for v in u.values():  # the unscaled dual rho * U carries over unchanged
                v.mul_(old / self.rho)
        log.info("ADMM: round %d of %d done; primal residual %.3e, rho now %.3g", self.round, self.rounds,
                 self.primal_residual(), self.rho)

    @torch.no_grad()
    def primal_residual(self) -> float:
        """``||W - Z|| / ||W||`` over all blocked weights (0 once W satisfies the constraint)."""
        num = sum(float((p.detach() - self.admm_state["z"][g.name]).double().square().sum()) for g, p in self._pairs)
        den = sum(float(p.detach().double().square().sum()) for _, p in self._pairs)
        return math.sqrt(num / den) if den else 0.0

    def step(self, closure=None):
        """One base step on the augmented loss; every ``steps_per_round`` steps a Z/U round.

        With a ``closure`` (which zeroes the gradients, computes the loss and calls backward), the
        base optimizer gets a closure that adds the ADMM term's gradient and value to each
        evaluation (LBFGS evaluates several times, and its line search needs both); the returned
        loss is the first evaluation's, without the ADMM term.
        """
        loss = None
        if closure is None:
            self.add_penalty_grad()
            self.base.step()
        else:
            first = []

            def augmented():
                with torch.enable_grad():
                    value = closure()
                self.add_penalty_grad()
                if not first:
                    first.append(value)
                return value if value is None else value + self.penalty()

            self.base.step(augmented)
            loss = first[0] if first else None
        self.admm_state["t"] += 1
        if self.admm_state["t"] % self.steps_per_round == 0 and self.round < self.rounds:
            self.zu_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def round_lr(self) -> torch.optim.lr_scheduler.LambdaLR:
        """A scheduler (step it after every ``step()``) that restarts the lr at each round.

        Within a round the lr follows a half cosine from the base lr down to 0, so every W-step
        ends close to a minimiser of its augmented loss for that round's Z and U, and the late
        rounds, where rho is largest, still get the full lr. This is the periodic schedule of the
        ADMM pruning framework (Zhang et al. 2018): a decay across the whole ADMM phase would
        leave the rounds that close the gap to the constraint set with almost no lr.
        """
        n = self.steps_per_round
        return torch.optim.lr_scheduler.LambdaLR(self, lambda s: 0.5 * (1.0 + math.cos(math.pi * (s % n) / n)))

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        st = self.admm_state
        return {"base": self.base.state_dict(),
                "admm": {"t": st["t"], "round": st["round"], "rho": st["rho"],
                         "z": {k: v.clone() for k, v in st["z"].items()},
                         "u": {k: v.clone() for k, v in st["u"].items()},
                         "blocks": _layout(self),
                         "prune": self.prune, "unify": self.unify}}

    def load_state_dict(self, state_dict) -> None:
        admm = _load_base(self, state_dict, "admm")
        self.prune, self.unify = admm["prune"], admm["unify"]
        params = {g.name: p for g, p in self._pairs}
        self.admm_state = {"t": admm["t"], "round": admm["round"], "rho": admm["rho"],
                           "z": {k: v.to(params[k]).clone() for k, v in admm["z"].items()},
                           "u": {k: v.to(params[k]).clone() for k, v in admm["u"].items()}}


def _layout(opt) -> list:
    """``opt``'s block groups as ``(name, shape, block)``, as its state_dict records them."""
    return [(g.name, g.shape, g.block) for g in opt.blocks]


def _load_base(opt, state_dict, key: str) -> dict:
    """The part ``key`` of ``state_dict`` (saved by ``opt``'s class, over the same block groups), after
    the base optimizer's part is loaded into ``opt.base``, whose ``param_groups`` ``opt`` shares again."""
    name = type(opt).__name__
    saved = state_dict.get(key) if isinstance(state_dict, dict) else None
    if saved is None or "base" not in state_dict:
        raise OTOError(f"this state_dict was not saved by otofx.admm.{name}.state_dict()")
    if [tuple(x) for x in saved["blocks"]] != [tuple(x) for x in _layout(opt)]:
        raise OTOError(f"the saved {name} state has other block groups: build {name} over the same model and blocks")
    opt.base.load_state_dict(state_dict["base"])
    _share_groups(opt)  # NB: torch's load_state_dict gave the base a new param_groups list
    return saved


def _share_groups(opt) -> None:
    """The wrapper's ``param_groups`` *is* its base's list, so schedulers on the wrapper drive the base."""
    opt.param_groups = opt.base.param_groups
    opt.defaults = opt.base.defaults


# ---------------------------------------------------------------------------------------------
# Finishing: hard projection and a structure-keeping re-parametrisation
# ---------------------------------------------------------------------------------------------


class BlockParam(nn.Module):
    """``W -> W * free + sign * |magnitude|[block]``: pruned blocks 0, unified blocks one magnitude each.

    ``sign`` is +1 or -1 on every unified weight (the projection's, an exact zero's being +1) and 0
    elsewhere. The weight uses ``|magnitude|`` (:meth:`block_magnitude`): an optimizer may drive the
    learnable ``magnitude`` below zero, and each weight still keeps its sign, as the method's unified
    blocks do and the storage format (one sign bit per weight, one magnitude per block) assumes.
    ``magnitude`` trains only if the finished weight did (``requires_grad``).
    """

    otofx_block_param = True  # find_blocks refuses a weight this parametrises (no import cycle)

    def __init__(self, group: BlockGroup, proj: B.Projection, requires_grad: bool = True):
        super().__init__()
        self.group = group
        ones = torch.ones(group.shape, dtype=proj.z.dtype, device=proj.z.device)
        state = B.from_blocks(proj.state[:, None].expand(-1, group.block[0] * group.block[1]).to(proj.z.dtype), group)
        # NB: the block index is built in int64: in the weight's dtype it would round in half
        # precision (bfloat16 holds integers exactly only up to 256).
        index = torch.arange(group.n_blocks, device=proj.z.device, dtype=torch.int64)
        index = B.from_blocks(index[:, None].expand(-1, group.block[0] * group.block[1]), group)
        self.register_buffer("free", (state == FREE).to(proj.z.dtype) * ones)
        # NB: +1 for an exact zero, as project() gives it +u (torch.sign's 0 left it out of its block)
        sign = torch.where(proj.z < 0, -1.0, 1.0).to(proj.z.dtype)
        self.register_buffer("sign", sign * (state == UNIFIED).to(proj.z.dtype))
        self.register_buffer("block_index", index.contiguous())
        self.register_buffer("state", proj.state.clone())
        self.magnitude = nn.Parameter(proj.magnitude.clone(), requires_grad=requires_grad)

    def block_magnitude(self) -> torch.Tensor:
        """``|magnitude|`` per block: what the weight uses.

        # NB: ``torch.where``, not ``abs``: abs has gradient 0 at 0, so a unified block that starts
        at magnitude 0 (a zero-initialised layer) would never train; here it is +1 there.
        """
        m = self.magnitude
        return torch.where(m < 0, -m, m)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.free + self.sign * self.block_magnitude()[self.block_index]


def _finish_args(opt, blocks, prune, unify):
    if opt is not None:
        blocks = blocks or opt.blocks
        prune = opt.prune if prune is None else prune
        unify = opt.unify if unify is None else unify
    if prune is None:
        raise InputError("finish needs prune= (and unify=), or the ADMM optimizer that trained the model")
    return blocks, prune, 0.0 if unify is None else unify


def finish(model: nn.Module, opt: ADMM | BlockHESSO | None = None, *, block=(4, 4), prune: float | None = None,
           unify: float | None = None, layers=None, blocks: BlockSet | None = None) -> nn.Module:
    """A copy of ``model`` with every blocked weight hard-projected and re-parametrised by :class:`BlockParam`.

    The blocks, ``prune`` and ``unify`` come from ``opt`` when given. ``model`` is not modified.
    Training the copy keeps the structure: pruned blocks stay zero, unified blocks keep one
    magnitude (learnable, and non-negative as the weight uses it) and their signs, free weights
    train as usual; a frozen weight (``requires_grad=False``) stays frozen. ``plain()`` removes the
    parametrisations. A layer whose every block ``prune`` prunes is zeroed, and the log warns.
    """
    blocks, prune, unify = _finish_args(opt, blocks, prune, unify)
    B.counts_for(1, prune, unify)  # validates the fractions before any work
    blocks = blocks or find_blocks(model, block, layers)
    _refuse_missing(model, blocks)
    _warn_zeroed(blocks, prune, unify, "finish")
    new = copy_module(model)
    params = dict(new.named_parameters())
    holders = parameter_holders(new)
    for g in blocks:
        for module, attr in holders[id(params[g.name])]:
            if parametrize.is_parametrized(module, attr):
                raise InputError(f"'{g.name}' is already parametrised: finish() a model that was not finished")
        with torch.no_grad():
            proj = project(params[g.name].detach(), g, prune, unify)
            params[g.name].copy_(proj.z)
        # NB: a tied weight gets the same parametrisation object in every module that holds it: one
        # original, one magnitude per block, and every user computes the same constrained weight
        pm = BlockParam(g, proj, requires_grad=params[g.name].requires_grad)
        for module, attr in holders[id(params[g.name])]:
            parametrize.register_parametrization(module, attr, pm)
    return new


def plain(model: nn.Module) -> nn.Module:
    """A copy of a finished model with its parametrisations folded into plain weights.

    # NB: a deep copy shares the parametrised modules' generated classes with the original, and
    # ``parametrize.remove_parametrizations`` deletes the property from that class: it would break
    # the original. The copy's modules are switched back to their own class by hand instead.
    """
    new = copy_module(model)
    made: dict = {}  # id(original) -> its plain Parameter: tied weights stay tied
    for _, m in list(new.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        with torch.no_grad():
            values = {attr: (id(plist.original), getattr(m, attr).detach().clone(), plist.original.requires_grad)
                      for attr, plist in m.parametrizations.items()}
        base = type(m).__bases__[0]
        del m._modules["parametrizations"]
        m.__class__ = base
        for attr, (key, value, grad) in values.items():
            if key not in made:
                made[key] = nn.Parameter(value, requires_grad=grad)
            m._parameters[attr] = made[key]
    return new


def _finished(model: nn.Module):
    out = []
    for mod_name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                for pm in plist:
                    if isinstance(pm, BlockParam):
                        out.append((f"{mod_name}.{attr}" if mod_name else attr, getattr(m, attr), pm))
    return out


# ---------------------------------------------------------------------------------------------
# Storage format
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockStorage:
    """One finished weight in the micro-structured format.

    ``state`` (2 bits a block: free / pruned / unified), the free blocks' float32 values (real
    elements only, block order), one sign bit per element of every unified block (packed, 1 =
    positive) and one float32 magnitude (>= 0) per unified block. Pruned blocks store nothing.
    :meth:`to_dense` gives back exactly the weight the finished model computes with.
    """

    group: BlockGroup
    state: np.ndarray  # [n_blocks] uint8
    free_values: np.ndarray  # float32, the real elements of the free blocks
    sign_bits: np.ndarray  # uint8, packed
    magnitudes: np.ndarray  # float32 [n_unified]

    def bits(self) -> int:
        counts = self.group.counts.numpy()
        free = int(counts[self.state == FREE].sum())
        unified_elems = int(counts[self.state == UNIFIED].sum())
        return 32 * free + unified_elems + 32 * int((self.state == UNIFIED).sum()) + 2 * self.group.n_blocks

    def pruning_only_bits(self) -> int:
        """Plain block pruning of the same blocks: every unpruned block stored in float32, 1 bit a block."""
        counts = self.group.counts.numpy()
        return 32 * int(counts[self.state != PRUNED].sum()) + self.group.n_blocks

    def to_dense(self) -> torch.Tensor:
        """The weight these bits describe (float32)."""
        g = self.group
        m = g.block[0] * g.block[1]
        mask = B.blocks_of(torch.ones(g.shape), g) > 0  # real cells of each block
        out = torch.zeros(g.n_blocks, m)
        st = torch.from_numpy(self.state.astype(np.int64))
        free = (st == FREE)[:, None] & mask
        out[free] = torch.from_numpy(self.free_values)
        uni = (st == UNIFIED)[:, None] & mask
        n_u = int(uni.sum())
        signs = np.unpackbits(self.sign_bits)[:n_u].astype(np.float32) * 2 - 1
        if n_u:
            mag = torch.from_numpy(self.magnitudes)[(torch.cumsum((st == UNIFIED).long(), 0) - 1).clamp_min(0)]
            out[uni] = torch.from_numpy(signs) * mag[:, None].expand(-1, m)[uni]
        return B.from_blocks(out, g)

    def bsr(self) -> torch.Tensor:
        """The weight as a torch sparse BSR matrix ``[rows, cols]`` (pruned blocks absent).

        Needs the blocks to divide the matrix (torch's BSR has no edge blocks). The matrix is the one
        the blocks tile: a conv's ``[out, in/groups * k...]``, a transposed conv's too.
        """
        g = self.group
        if g.batch > 1:
            raise InputError(f"'{g.name}' holds {g.batch} matrices (fused experts); a BSR matrix is 2-D: "
                             "use to_dense(), or the bits and block states")
        if g.rows % g.block[0] or g.cols % g.block[1]:
            raise InputError(f"'{g.name}': blocks {g.block} do not divide [{g.rows}, {g.cols}]; BSR needs whole blocks")
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
            return B.matrices_of(self.to_dense(), g)[0].to_sparse_bsr(g.block)


def export(model: nn.Module) -> dict:
    """``{weight name: BlockStorage}`` for every finished weight of ``model``.

    Unified blocks store the parametrisation's signs and ``|magnitude|``, the values the weight is
    computed from, so ``to_dense()`` equals the model's weight whatever retraining did.
    """
    out, seen = {}, set()
    for name, w, pm in _finished(model):
        if id(pm) in seen:  # a tied weight, stored once
            continue
        seen.add(id(pm))
        g = pm.group
        with torch.no_grad():
            b = B.blocks_of(w.detach().float().cpu(), g)
            mask = B.blocks_of(torch.ones(g.shape), g) > 0
            st = pm.state.cpu()
            free = b[(st == FREE)[:, None] & mask]
            uni = (st == UNIFIED)[:, None] & mask
            signs = (B.blocks_of(pm.sign.detach().float().cpu(), g)[uni] > 0).numpy().astype(np.uint8)
            mags = pm.block_magnitude().detach().float().cpu()[st == UNIFIED]
        out[name] = BlockStorage(g, st.numpy().astype(np.uint8), free.numpy(), np.packbits(signs), mags.numpy())
    if not out:
        raise InputError("export found no finished weight: call otofx.admm.finish(model, ...) first")
    return out


class BSRLinear(nn.Module):
    """A Linear whose weight is a torch sparse BSR matrix: ``y = (W_bsr @ x^T)^T + b``.

    The weight lives in the ``weight_bsr`` buffer (pruned blocks absent; unified blocks are stored
    as ordinary blocks of ``±u``). It computes in the weight's dtype on the weight's device: build
    it after moving the finished model (:func:`to_bsr`). torch runs ``W_bsr @ dense`` with MKL on
    the CPU (float32) and with cuSPARSE or its Triton kernels on CUDA (half precision needs blocks
    of 16 or more there).
    """

    def __init__(self, weight_bsr: torch.Tensor, bias: torch.Tensor | None, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = weight_bsr.shape[1], weight_bsr.shape[0]
        self.register_buffer("weight_bsr", weight_bsr)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.name, self._warned = name, False

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for a parent module that reads ``.weight`` instead of calling this one
        (torchvision's Swin attention passes ``self.qkv.weight`` to a function): correct, but no
        block-sparse product there; said once in the log."""
        if not self._warned:
            self._warned = True
            log.warning("to_bsr: '%s.weight' is read as a dense tensor (by the module that holds it, or by code "
                        "that reads the weight instead of calling the layer): it computes densely there", self.name)
        return self.weight_bsr.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # NB: contiguous, as a Linear's output is: a caller may view it (view_as_complex in Llama 4's
        # rotary needs the last dim's stride to be 1)
        y = (self.weight_bsr @ flat.t()).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        w = self.weight_bsr
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocksize={tuple(w.values().shape[-2:])}, blocks kept={w.values().shape[0]}")


def to_bsr(model: nn.Module) -> tuple[nn.Module, list]:
    """A copy of a finished model whose finished Linear layers compute through torch's BSR kernels.

    Returns ``(model, converted names)``. Each finished ``nn.Linear`` whose blocks divide its weight
    becomes a :class:`BSRLinear` holding the weight (from :func:`plain`, so in the model's dtype and
    on its device) as a BSR matrix with the block's shape; the outputs equal the finished model's
    up to summation order. Other layers (convolutions, attention projections, Linears with ragged
    edge blocks, which torch's BSR cannot hold, and on the CPU non-square blocks or half precision,
    which MKL cannot multiply) stay dense, and are named in the log with the reason (half precision
    on the CPU as a warning). ``model`` is not modified.
    """
    import warnings

    finished = {name for name, _, _ in _finished(model)}
    if not finished:
        raise InputError("to_bsr found no finished weight: call otofx.admm.finish(model, ...) first")
    groups = {name: pm.group for name, _, pm in _finished(model)}
    new = plain(model)
    converted, kept = [], {}
    for name in sorted(finished):
        mod_name, _, attr = name.rpartition(".")
        m = new.get_submodule(mod_name)
        g = groups[name]
        w = getattr(m, attr)
        # NB: an attention module reads its out_proj's weight itself (it never calls the Linear)
        # NB: MKL (torch's CPU BSR product) takes square blocks only, in float32 or float64
        why, level = None, logging.INFO
        if type(m) is not nn.Linear or attr != "weight" or attention_reader(new, mod_name) is not None:
            why = "not a Linear called as a module (fused experts, convolutions, attention projections)"
        elif g.rows % g.block[0] or g.cols % g.block[1]:
            why = "blocks that do not divide the weight"
        elif w.device.type == "cpu" and g.block[0] != g.block[1]:
            why = "non-square blocks on the CPU"
        elif w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
            why, level = (f"{w.dtype} on the CPU, where torch's BSR product (MKL) takes float32 and float64 only: "
                          "move the model to CUDA or to float32 before to_bsr"), logging.WARNING
        if why is not None:
            kept.setdefault((level, why), []).append(name)
            continue
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
            w = w.detach().to_sparse_bsr(g.block)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(new.get_submodule(parent_name) if parent_name else new, child, BSRLinear(w, m.bias, mod_name))
        converted.append(name)
    for (level, why), names in kept.items():
        log.log(level, "to_bsr: kept dense (%s): %s", why, ", ".join(names))
    return new, converted


@dataclass(frozen=True)
class StorageRow:
    layer: str
    blocks: int
    pruned: int
    unified: int
    weights: int
    bits: int
    pruning_only_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    @property
    def vs_float32(self) -> float:
        return 32 * self.weights / self.bits

    @property
    def vs_pruning(self) -> float:
        return self.pruning_only_bits / self.bits


def storage(model_or_export) -> list:
    """One :class:`StorageRow` per finished weight, and a ``"total"`` row."""
    ex = model_or_export if isinstance(model_or_export, dict) else export(model_or_export)
    rows = []
    for name, s in ex.items():
        rows.append(StorageRow(name, s.group.n_blocks, int((s.state == PRUNED).sum()), int((s.state == UNIFIED).sum()),
                               s.group.numel, s.bits(), s.pruning_only_bits()))
    rows.append(StorageRow("total", *(sum(getattr(r, f) for r in rows) for f in
                                      ("blocks", "pruned", "unified", "weights", "bits", "pruning_only_bits"))))
    return rows


def format_storage(rows) -> str:
    from tabulate import tabulate

    return tabulate([[r.layer, r.blocks, r.pruned, r.unified, r.weights, f"{r.bits_per_weight:.2f}",
                      f"{r.vs_float32:.2f}x", f"{r.vs_pruning:.2f}x"] for r in rows],
                    headers=["layer", "blocks", "pruned", "unified", "weights", "bits/weight", "vs float32",
                             "vs pruning only"], tablefmt="github")


# ---------------------------------------------------------------------------------------------
# Baseline: HESSO's schedule with blocks as groups
# ---------------------------------------------------------------------------------------------


class BlockHESSO(torch.optim.Optimizer):
    """OTOv3's HESSO (OTO.md section 3) over block groups, around a base optimizer.

    Every ``D = pruning_steps // pruning_periods`` steps from ``start_pruning_step`` on, each layer's
    lowest-scoring blocks not yet pruned (``round(prune * n)`` over all periods, split evenly) are
    picked and scaled by ``(D-k-1)/(D-k)`` after the base step at step k of the period: exactly zero
    at its end. Score: HESSO's equal-weight sum of L2-normalised ``||x||``, ``||x||/len``,
    ``cos(x, d) + 1``, ``|x.d|`` and ``(x.d)^2 / 2`` per block, with d the gradient (the base
    optimizer's direction is internal to it). Counts are per layer, as ADMM's are.
    """

    def __init__(self, params_or_model, base_optimizer: torch.optim.Optimizer, *, block=(4, 4), prune: float = 0.5,
                 pruning_steps: int, pruning_periods: int = 1, start_pruning_step: int = 0, layers=None,
                 blocks: BlockSet | None = None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise InputError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        periods = B.whole("pruning_periods", pruning_periods)
        steps = B.whole("pruning_steps", pruning_steps)
        if steps < periods:
            raise InputError(f"pruning_steps={pruning_steps!r} must be >= pruning_periods={pruning_periods!r} >= 1")
        B.counts_for(1, prune, 0.0)
        self.blocks, self._pairs = _pairs(params_or_model, block, layers, blocks)
        self.base, self.prune, self.unify = base_optimizer, float(prune), 0.0
        self.start, self.periods = B.whole("start_pruning_step", start_pruning_step, 0), periods
        self.period_length = steps // self.periods
        super().__init__([p for _, p in self._pairs], {})
        _share_groups(self)
        _warn_zeroed(self.blocks, self.prune, 0.0, "BlockHESSO")
        self._t = 0
        self._pruned = {g.name: torch.zeros(g.n_blocks, dtype=torch.bool, device=p.device) for g, p in self._pairs}
        self._current = {k: torch.zeros_like(v) for k, v in self._pruned.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """The base optimizer's state and the pruning progress (step, pruned and pruning blocks)."""
        return {"base": self.base.state_dict(),
                "hesso": {"t": self._t, "prune": self.prune, "start": self.start, "periods": self.periods,
                          "period_length": self.period_length,
                          "pruned": {k: v.clone() for k, v in self._pruned.items()},
                          "current": {k: v.clone() for k, v in self._current.items()},
                          "blocks": _layout(self)}}

    def load_state_dict(self, state_dict) -> None:
        hesso = _load_base(self, state_dict, "hesso")
        self._t, self.prune = int(hesso["t"]), float(hesso["prune"])
        self.start, self.periods, self.period_length = hesso["start"], hesso["periods"], hesso["period_length"]
        dev = {g.name: p.device for g, p in self._pairs}
        self._pruned = {k: v.to(dev[k]).clone() for k, v in hesso["pruned"].items()}
        self._current = {k: v.to(dev[k]).clone() for k, v in hesso["current"].items()}

    @staticmethod
    def _scores(x: torch.Tensor, d: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        norm, dnorm, xd = x.norm(dim=1), d.norm(dim=1), (x * d).sum(1)
        den = norm * dnorm
        cos = torch.where(den > 0, xd / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        score = torch.zeros_like(norm)
        for f in (norm, norm / counts.to(norm), cos + 1, xd.abs(), 0.5 * xd.square()):
            n = f.norm()
            score = score + torch.where(n > 0, f / torch.where(n > 0, n, torch.ones_like(n)), f)
        return score

    def _select(self, period: int) -> None:
        for g, p in self._pairs:
            total = B.counts_for(g.n_blocks, self.prune, 0.0)[0]
            count = total * (period + 1) // self.periods - total * period // self.periods
            pruned = self._pruned[g.name] | self._current[g.name]
            self._pruned[g.name] = pruned
            x = B.blocks_of(p.detach(), g)
            d = B.blocks_of(p.grad.detach(), g) if p.grad is not None else torch.zeros_like(x)
            score = self._scores(x.double(), d.double(), g.counts.to(x.device)).masked_fill(pruned, float("inf"))
            cur = torch.zeros_like(pruned)
            cur[torch.argsort(score, stable=True)[:count]] = True
            self._current[g.name] = cur

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rel = self._t - self.start
        if rel >= 0 and rel < self.periods * self.period_length and rel % self.period_length == 0:
            self._select(rel // self.period_length)
        if closure is None:
            self.base.step()
        else:
            # NB: the closure ran above (the block scores need its gradients): the base's first
            # evaluation reuses it, later ones (LBFGS) call the closure again
            calls = []

            def again():
                calls.append(1)
                if len(calls) == 1:
                    return loss
                with torch.enable_grad():
                    return closure()

            self.base.step(again)
        if rel >= 0:
            k = rel % self.period_length if rel < self.periods * self.period_length else None
            for g, p in self._pairs:
                if k is None:
                    self._pruned[g.name] |= self._current[g.name]
                    self._current[g.name].zero_()
                f = 0.0 if k is None else (self.period_length - k - 1) / (self.period_length - k)
                scale = torch.ones(g.n_blocks, dtype=p.dtype, device=p.device)
                scale = scale.masked_fill(self._current[g.name], f).masked_fill(self._pruned[g.name], 0.0)
                b = B.blocks_of(p.detach(), g) * scale[:, None]
                p.copy_(B.from_blocks(b, g))
        self._t += 1
        return loss

    def block_sparsity(self) -> float:
        """Fraction of blocks whose every weight is exactly zero."""
        zero = total = 0
        for g, p in self._pairs:
            zero += int((B.blocks_of(p.detach(), g) == 0).all(1).sum())
            total += g.n_blocks
        return zero / max(total, 1)


def report(blocks: BlockSet) -> str:
    """The block groups as a table (layer, weight shape, matrix, block, grid, blocks)."""
    from tabulate import tabulate

    rows = [[g.name, "x".join(map(str, g.shape)), (f"{g.batch} x " if g.batch > 1 else "") + f"{g.rows}x{g.cols}",
             f"{g.block[0]}x{g.block[1]}",
             f"{g.grid[0]}x{g.grid[1]}", g.n_blocks] for g in blocks]
    head = f"{len(blocks)} block groups, {blocks.n_blocks} blocks"
    return head + "\n" + tabulate(rows, headers=["weight", "shape", "matrix", "block", "grid", "blocks"],
                                  tablefmt="github")


__all__ = ["ADMM", "BlockHESSO", "BlockParam", "BlockStorage", "BSRLinear", "to_bsr", "StorageRow", "BlockGroup", "BlockSet", "find_blocks",
           "project", "finish", "plain", "export", "storage", "format_storage", "report"]
