"""DHSPG (OTOv2) and HESSO (OTOv3): optimizers that drive ZIG rows to exactly zero while training.

``DHSPG(model.named_parameters(), oto.groups, **hp)`` (or ``oto.dhspg(**hp)``) is a
``torch.optim.Optimizer``. Each step takes the base optimizer's direction d (SGD with momentum, Adam
or AdamW) for every parameter; from ``start_pruning_steps`` on it partitions the rows once into a
redundant set G_r and a kept set G_k, and applies to G_r the adaptive group-lasso penalty and the
half-space projection of OTO.md section 2 until the group sparsity reaches its target. ``HESSO``
replaces penalty and projection by OTO.md section 3's progressive scaling of the lowest-scoring rows.
``group_sparsity`` is the fraction of rows whose every element is exactly zero.

Shared elements (the Jacobi rule). A weight element can lie in two rows along different dims
(conv2.weight[o, i] is in conv2's row o and in conv1's row i). Then:
    * every per-row reduction (||x||^2, x.d, ||d||^2) is taken from x and d before the step;
    * each row's lambda and projection decision use only its own reductions; its half-space test is
      analytic: x_hat_i . x_i = ||x||^2 - a x.d - a lambda_i ||x|| with the penalty applied;
    * an element becomes x - a d - a * sum_{rows r containing it} lambda_r x / ||x_r||, and is set
      to zero if any row containing it is projected or is a fixed zero row (HESSO: it is multiplied
      by the smallest scale among its rows).
The result does not depend on the order of rows or groups, and every backend computes the same.

Non-finite gradients, GradScaler, CUDA graphs. A steady step (any step but the first, DHSPG's
partition and HESSO's selection steps) makes no device-to-host synchronisation:
    * ``check_finite=True`` (the default): a step whose gradients hold NaN or inf changes nothing
      (parameters, moment buffers, the step count), decided on the device by a float32 flag (torch's
      ``found_inf`` convention) that every kernel honours; ``skipped_steps`` counts such steps.
      ``check_finite="raise"`` raises :class:`NonFiniteGradError` instead, reading the check on the
      host every step; ``False`` checks nothing.
    * ``_step_supports_amp_scaling``: ``GradScaler.step(opt)`` sets ``opt.grad_scale``/``opt.found_inf``
      and calls ``step()`` (as for torch's fused optimizers); the gradients are unscaled here and
      ``found_inf`` is the skip flag.
    * ``capturable=True`` allows capturing a steady step in a CUDA graph (DHSPG after its warm-up,
      sparsity controller included: its schedule then reads a device copy of the step counter, which
      the replay advances; HESSO outside its pruning window, whose per-step scale the host sets); a
      step that cannot be replayed is refused with an :class:`OptimizerError` while capturing.
    * The first, partition and selection steps read the check on the host (a one-time decision from
      NaN gradients would be permanent): such a step with NaN/inf is skipped and retried on the next
      call.

Sharded parameters (FSDP2's ``fully_shard``, tensor parallelism: DTensors). The row layout is built
over each rank's local shards from the placements (:mod:`otofx.distributed`); a step reduces the
local shards to per-row sums, adds them up across ranks in one all-reduce of ``3 * n_rows`` numbers,
decides (partition, lambda, projection, the sparsity controller; HESSO's selection) from the whole
rows' sums, identically on every rank, and writes back to the local shards. The optimizer state stays
DTensors (``torch.distributed.checkpoint``; see :func:`otofx.distributed.optimizer_state_dict`).
Such a step synchronises (the all-reduce); the finite-gradient flag is reduced too.

Internals:
    * Parameters in no row (all of them before the pruning starts) take torch's fused SGD, Adam or
      AdamW kernels (``torch._fused_sgd_``/``_fused_adam_``/``_fused_adamw_``, with ``found_inf``): one
      launch per (param group, device, dtype). The row tensors' direction d comes from the same
      kernels (SGD momentum: ``lr=0``; Adam: a zeroed buffer stepped with ``lr=-1`` gives
      ``m_hat / (sqrt(v_hat) + eps)``), and the row step goes through ``otofx.kernels`` (Triton on
      CUDA, a C kernel on CPU, the torch reference where neither fits), whose layout is built once.
    * DHSPG with SGD momentum, after the partition: the row tensors' momentum update is handed to the
      fused row step (``kernels.Momentum``); on CPU the C kernel's reduction pass computes the updated
      buffers without storing them and its write-back pass stores them (the other backends run
      torch's fused SGD kernel first). There the kernel also makes the finite-gradient check of the
      row tensors (a non-finite sum of the updated buffers' squares), known before anything is
      written; the other gradients are checked apart. The first step, which creates the buffers, and
      any step where the row tensors' settings differ, take the unfused path.
    * With the sparsity controller (or the C kernel's check) a DHSPG row step goes reductions ->
      decision -> write-back (``kernels.rows_step``): the controller reads the rows' norms from the
      step's own reductions (no pass of its own); otherwise it is the backend's whole
      ``kernels.dhspg_step``.
    * Two clocks: ``_t`` counts the calls that went through (the schedule: start, warm-up, HESSO
      periods, known on the host), ``steps_taken`` the steps not skipped (a device tensor; Adam's bias
      correction reads it). ``step_count`` reads the latter (a sync).
    * The step counters, the partition (``redundant``, HESSO's ``pruned``/``current``) and the
      moment buffers are in ``state_dict()``; a resumed optimizer continues bit-identically.
    * # NB: the learning rate is read from ``param_groups`` at every step (schedulers work), but all
      parameters holding rows must share one lr: a row's step uses a single a.
    * # NB: a row is "zero" when its float32 (float64) sum of squares is 0: a row whose entries are
      all below ~1e-23 in magnitude counts as zero and, with fixed_zero_groups, is set to exactly 0.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from otofx import kernels
from otofx.distributed import is_dtensor, local
from otofx.errors import OTOError

log = logging.getLogger("otofx")

VARIANTS = ("sgd", "adam", "adamw")
_CHECK_MODES = {True: "skip", "skip": "skip", False: "off", "raise": "raise"}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ADAM_EPS = 1e-8

# OTO.md section 2's defaults per variant
_BASE_DEFAULTS = {
    "sgd": dict(first_momentum=0.0, second_momentum=0.0, dampening=0.0, weight_decay=0.0),
    "adam": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=0.0),
    "adamw": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=1e-2),
}
_LAMBDA_DEFAULTS = {
    "sgd": dict(lmbda=1e-3, lmbda_amplify=2.0, hat_lmbda_coeff=10.0),
    "adam": dict(lmbda=1e-2, lmbda_amplify=20.0, hat_lmbda_coeff=1e3),
    "adamw": dict(lmbda=1e-2, lmbda_amplify=20.0, hat_lmbda_coeff=1e3),
}


class OptimizerError(OTOError):
    """An optimizer was built or used with arguments that cannot work."""


class NonFiniteGradError(OptimizerError):
    """A gradient holds NaN or inf; the step was not taken."""


@dataclass(frozen=True)
class Partition:
    """DHSPG's partition of the rows: ``redundant[g]`` are the G_r row indices of group g."""

    redundant: tuple
    kept: tuple

    @property
    def n_redundant(self) -> int:
        return int(sum(len(r) for r in self.redundant))


def _like(p, t: torch.Tensor):
    """A DTensor placed as ``p`` whose local shard is ``t`` (no copy, no communication)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _resolve_base(variant: str, given: dict) -> dict:
    if variant not in VARIANTS:
        raise OptimizerError(f"variant={variant!r} is not supported: use one of {VARIANTS}")
    out = dict(_BASE_DEFAULTS[variant])
    out.update({k: v for k, v in given.items() if v is not None})
    return out


class _RowOptimizer(torch.optim.Optimizer):
    """The base step, the row layout, checks and state shared by DHSPG and HESSO."""

    _kind = "rows"

    # GradScaler hands its scale and found_inf to step() (as to torch's fused optimizers) instead of
    # reading found_inf on the host and not calling step()
    _step_supports_amp_scaling = True

    def __init__(self, params, groups, *, variant, lr, base: dict, model=None, backend=None,
                 check_finite=True, capturable: bool = False):
        if lr is None or (not isinstance(lr, torch.Tensor) and lr < 0):
            raise OptimizerError(f"lr={lr!r}: the learning rate must be a number >= 0 (or a 0-dim tensor)")
        mode = _CHECK_MODES.get(check_finite) if isinstance(check_finite, (bool, str)) else None
        if mode is None:
            raise OptimizerError(f"check_finite={check_finite!r}: use True (skip such steps on the device), "
                                 "'raise' (raise NonFiniteGradError; reads the check on the host every step) or False")
        if capturable and mode == "raise":
            raise OptimizerError("capturable=True cannot be combined with check_finite='raise' (which reads the "
                                 "check on the host): use check_finite=True and read opt.skipped_steps")
        base = _resolve_base(variant, base)
        for k in ("first_momentum", "second_momentum"):
            if not 0.0 <= base[k] < 1.0:
                raise OptimizerError(f"{k}={base[k]!r} is out of range [0, 1)")
        if not 0.0 <= base["dampening"] <= 1.0:
            raise OptimizerError(f"dampening={base['dampening']!r} is out of range [0, 1]")
        if base["weight_decay"] < 0:
            raise OptimizerError(f"weight_decay={base['weight_decay']!r} must be >= 0")
        if backend is not None and backend not in kernels.BACKENDS:
            raise OptimizerError(f"backend={backend!r}: use one of {kernels.BACKENDS}")
        self.variant = variant
        self.backend = backend
        self.check_finite = check_finite
        self._check_mode = mode
        self.capturable = bool(capturable)
        super().__init__(params, dict(lr=lr, **base))
        self._t = 0  # step() calls that went through (the schedule's clock)
        self._host_skipped = 0
        self._dirs = {}  # Adam row directions, transient buffers
        self._frozen = False  # True inside _no_init_step (torch.distributed.checkpoint's dummy step)
        self._placeholder = False  # True while the state is _placeholder_state's zeros (a load template)
        self._pending_extra = None  # the otofx state handed over by otofx.distributed.load_optimizer_state_dict
        # DTensor parameters (FSDP2, tensor parallelism): every step works on the local shards
        self._sharded = any(is_dtensor(p) for g in self.param_groups for p in g["params"])
        self._shards = None  # otofx.distributed.Shards when rows span shards
        self._flag_group = None  # (process group,) of the skip flag's max all-reduce, set at its first use
        for g in self.param_groups:
            for p in g["params"]:
                if p.dtype not in _DTYPES:
                    raise OptimizerError(f"parameter {self._name(p)!r} has dtype {p.dtype}; {type(self).__name__} "
                                         f"supports {', '.join(str(d) for d in _DTYPES)}: cast the model first")
        self._build_layout(groups, model)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self._home = self.layout.device if self._row_params else (first.device if first is not None
                                                                   else torch.device("cpu"))
        self._taken = torch.zeros((), dtype=torch.float32, device=self._home)  # steps taken, on the device
        # capturable: the schedule's clock (self._t) on the device too, which a CUDA graph replay advances
        self._clock = torch.zeros((), dtype=torch.float64, device=self._home) if self.capturable else None

    # -- setup ----------------------------------------------------------------------------------
    def _name(self, p) -> str:
        for g in self.param_groups:
            names = g.get("param_names")
            for q, n in zip(g["params"], names or ()):
                if q is p:
                    return n
        return f"<unnamed parameter of shape {tuple(p.shape)}>"

    def _build_layout(self, groups, model) -> None:
        by_name, group_of = {}, {}
        for gi, g in enumerate(self.param_groups):
            for i, p in enumerate(g["params"]):
                group_of[id(p)] = gi
                if g.get("param_names"):
                    by_name[g["param_names"][i]] = p
        tensors, index, entries_of = [], {}, []
        groups = tuple(groups)
        for zi, zig in enumerate(groups):
            rows, params = (zig.rows, zig.params) if hasattr(zig, "params") else zig
            entries = []
            for name, dim, idx in params:
                p = by_name.get(name)
                if p is None and model is not None:
                    try:
                        q = model.get_parameter(name)
                    except AttributeError:
                        q = None
                    p = next((x for g in self.param_groups for x in g["params"] if x is q), None) if q is not None else None
                if p is None:
                    hint = ("pass model.named_parameters() (names are needed to place rows)" if not by_name else
                            "pass every parameter of the model to the optimizer, or pin that layer in otofx.OTO(pin=...)")
                    raise OptimizerError(f"group {zi} names parameter {name!r}, which this optimizer does not hold: {hint}")
                if not p.requires_grad:
                    raise OptimizerError(
                        f"group {zi} holds parameter {name!r}, which is frozen (requires_grad=False): the row step "
                        f"would write it. Leave the group out (otofx.OTO.dhspg() and .hesso() do: "
                        f"[z for z in oto.groups if not z.frozen(model)]) or unfreeze the parameter")
                if id(p) not in index:
                    index[id(p)] = len(tensors)
                    tensors.append(p)
                entries.append((index[id(p)], dim, idx))
            entries_of.append((rows, entries))
        devices = {p.device for p in tensors}
        if len(devices) > 1:
            raise OptimizerError(f"row parameters are on several devices {sorted(map(str, devices))}: move the model to one")
        self._row_params = tensors
        self._row_index = index
        self._row_lr_groups = sorted({group_of[id(p)] for p in tensors})
        dev = tensors[0].device if tensors else torch.device("cpu")
        self._group_sizes = tuple(int(r) for r, _ in entries_of)
        self._shapes = tuple(torch.Size(p.shape) for p in tensors)  # the whole tensors' shapes
        if any(is_dtensor(p) for p in tensors):
            from otofx.distributed import Shards

            names = [self._name(p) for p in tensors]
            self._shards = Shards(tensors, names)
            self.layout, self._stats_layout = self._shards.layouts(entries_of, dev)
            return
        self.layout = kernels.build_layout([p.shape for p in tensors], entries_of, device=dev)
        self._stats_layout = self.layout

    # -- properties -----------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def step_count(self) -> int:
        """Steps taken (skipped ones not counted). # NB: reads a device counter (a sync)."""
        return int(self._taken.item())

    @property
    def steps_taken(self) -> torch.Tensor:
        """The device counter of steps taken (a 0-dim float32 tensor, read without a sync)."""
        return self._taken

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a gradient with NaN or inf (or GradScaler's found_inf). # NB: a sync."""
        return self._host_skipped + self._t - self.step_count

    @torch.no_grad()
    def row_stats(self) -> kernels.RowStats:
        """Per-row ``||x||^2`` of the current parameters (``xd``, ``dd`` zero). # NB: with sharded
        parameters, an all-reduce: call it on every rank."""
        if self._shards is not None:
            xs = [local(p.detach()) for p in self._row_params]
            return self._shards.reduce_stats(kernels.row_stats(self._stats_layout, xs))
        return kernels.row_stats(self.layout, [p.detach() for p in self._row_params])

    def _event_stats(self, xs, ds) -> kernels.RowStats:
        """The per-row sums of x and d over whole rows (one all-reduce when rows span shards): for the
        one-time decisions (partition, selection), and for every DHSPG step on sharded rows."""
        if self._shards is not None:
            return self._shards.reduce_stats(kernels.stats(self._stats_layout, xs, ds, self.backend))
        return kernels.row_stats(self.layout, xs, ds)

    def _lt(self, ts) -> list:
        """The local shards of ``ts`` (DTensors under FSDP2/TP), or ``ts`` itself."""
        return [local(t) for t in ts] if self._sharded else ts

    def _placeholder_state(self) -> None:
        """On an optimizer that has not stepped: zero moment buffers for every parameter, the entries a
        saved state_dict holds, so that a template for ``torch.distributed.checkpoint.load`` has them.
        Dropped again at the first step if nothing was loaded over them (torch's first-step rules)."""
        if self.state or self._t:
            return
        for g in self.param_groups:
            for p in g["params"]:
                if self.variant != "sgd":
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif g["first_momentum"]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._placeholder = bool(self.state)

    @contextlib.contextmanager
    def _no_init_step(self):
        """``step()`` does nothing inside (torch.distributed.checkpoint's state_dict helpers call step()
        with zero gradients and lr 0 to create state; DHSPG's clock and decisions must not move)."""
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False

    @property
    def group_sparsity(self) -> float:
        """Fraction of rows whose every element is exactly zero (0.0 when there are no rows)."""
        if not self.n_rows:
            return 0.0
        return float((self.row_stats().xx == 0).sum().item()) / self.n_rows

    def _target_rows(self, target: float) -> int:
        return math.ceil(target * self.n_rows - 1e-9)

    # -- the finite-gradient check ----------------------------------------------------------------
    def _skip_flag(self, grads, found_inf):
        """A float32 0-dim flag on the home device, 1.0 when this step must change nothing (a gradient
        holds NaN or inf, or GradScaler's ``found_inf``), or None when no check applies. No sync."""
        if found_inf is not None:  # GradScaler checked every gradient of this optimizer
            return found_inf.reshape(()).to(self._home, torch.float32)
        if self._check_mode == "off" or not grads:
            return None
        # NB: the L2 norm is the fast foreach reduction; NaN and inf propagate through it. Half-precision
        # norms are taken in float32, so only gradients with elements beyond ~1e19 count as non-finite
        # without holding NaN or inf.
        return kernels.nonfinite_flag(grads).to(self._home)

    def _raise_non_finite(self, params, found_inf) -> None:
        for p in params:
            if not bool(torch.isfinite(local(p.grad)).all()):
                raise NonFiniteGradError(
                    f"the gradient of parameter {self._name(p)!r} holds NaN or inf; no parameter or state was "
                    "changed. Lower the learning rate, clip gradients, or use torch.amp.GradScaler (which skips such "
                    "steps), or check_finite=True (the default), which skips them on the device")
        raise NonFiniteGradError("GradScaler found inf or NaN in the scaled gradients; no parameter or state was "
                                 "changed (check_finite='raise' raises on every skipped step)")

    # -- the base step ----------------------------------------------------------------------------
    def _buckets(self, params):
        """``params`` (with gradients) per (param group, device, dtype), in a fixed order."""
        out = defaultdict(list)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in params:
                    out[(gi, p.device, p.dtype)].append(p)
        return out

    def _unscale(self, params, grad_scale) -> None:
        """Divide the gradients by GradScaler's scale (it hands the scale to optimizers that, like
        torch's fused ones, take it over); on the device."""
        by_dev = defaultdict(list)
        for p in params:
            by_dev[p.grad.device].append(local(p.grad))
        inv = grad_scale.double().reciprocal().float()
        for dev, gs in by_dev.items():
            torch._foreach_mul_(gs, inv.to(dev))

    def _steps_for(self, dev):
        return self._taken if dev == self._home else self._taken.to(dev)

    def _adam_steps(self, ps, dev, skip) -> list:
        """Each parameter's own step count, advanced by this step and on ``dev`` (as torch's Adam: a
        parameter without a gradient in a step does not count it, so its bias correction starts with
        its first gradient); the skip flag is added on the device."""
        steps = []
        for p in ps:
            st = self.state[p]
            step = st.get("step")
            if step is None:
                step = st["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            elif step.device != dev or step.dtype != torch.float32:  # NB: torch's load_state_dict keeps it on the CPU
                step = st["step"] = step.to(device=dev, dtype=torch.float32)
            steps.append(step)
        if steps and skip is None:
            torch._foreach_add_(steps, 1.0)
        elif steps:  # NB: a list, not a 0-d tensor, which the scalar overload would read on the host
            inc = 1.0 - skip.to(device=dev, dtype=torch.float32)
            torch._foreach_add_(steps, [inc] * len(steps))
        return steps

    def _base_update(self, params, lr, skip) -> None:
        """``x <- x - lr * d`` with the base optimizer's direction, in torch's fused SGD/Adam/AdamW kernels
        (one launch per param group, device and dtype; the moment buffers are torch's). ``skip`` is passed
        as their ``found_inf``: a skipped step changes nothing, decided on the device."""
        for (gi, dev, _), ps in self._buckets({id(p) for p in params}).items():
            group = self.param_groups[gi]
            wd, b1, b2 = group["weight_decay"], group["first_momentum"], group["second_momentum"]
            plr = group["lr"] if lr is None else lr
            grads = self._lt([p.grad for p in ps])
            fi = None if skip is None else skip.to(dev)
            if self.variant == "sgd":
                if not b1:
                    torch._fused_sgd_(self._lt(ps), grads, [], weight_decay=wd, momentum=0.0, lr=plr, dampening=0.0,
                                      nesterov=False, maximize=False, is_first_step=False, found_inf=fi)
                    continue
                fresh = {id(p) for p in ps if "momentum_buffer" not in self.state[p]}
                for p in ps:
                    if id(p) in fresh:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for first in (True, False):
                    sel = [p for p in ps if (id(p) in fresh) == first] if fresh else ([] if first else ps)
                    if sel:
                        torch._fused_sgd_(self._lt(sel), self._lt([p.grad for p in sel]),
                                          self._lt([self.state[p]["momentum_buffer"] for p in sel]),
                                          weight_decay=wd, momentum=b1, lr=plr, dampening=group["dampening"],
                                          nesterov=False, maximize=False, is_first_step=first, found_inf=fi)
                continue
            ms, vs = self._moments(ps)
            op = torch._fused_adamw_ if self.variant == "adamw" else torch._fused_adam_
            op(self._lt(ps), grads, ms, vs, [], self._adam_steps(ps, dev, fi), lr=plr, beta1=b1, beta2=b2,
               weight_decay=wd, eps=_ADAM_EPS, amsgrad=False, maximize=False, found_inf=fi)

    def _moments(self, ps):
        ms, vs = [], []
        for p in ps:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
        return self._lt(ms), self._lt(vs)

    def _row_directions(self, skip, fuse: bool):
        """The row tensors and their directions d; with ``fuse`` (SGD momentum, buffers there) the
        momentum update is returned as a :class:`kernels.Momentum` for the row step to make (on the CPU
        kernel in its reduction pass), else it is made here. Row tensors without gradient get d = 0."""
        # NB: the parameters themselves, not .detach() views: the step runs under no_grad, and a detach
        # per tensor and step is a dispatched op (host time that a CUDA step waits for)
        xs = self._lt([p.detach() for p in self._row_params]) if self._sharded else list(self._row_params)
        ds = [None] * len(xs)
        with_grad = {id(p) for p in self._row_params if p.grad is not None}
        momentum = None
        if fuse:
            b1, alpha, wd = self._row_momentum()
            momentum = kernels.Momentum(tuple(p.grad for p in self._row_params), b1, alpha, wd)
            ds = [self.state[p]["momentum_buffer"] for p in self._row_params]
            return xs, ds, momentum
        for (gi, dev, _), ps in self._buckets(with_grad).items():
            group = self.param_groups[gi]
            wd, b1, b2 = group["weight_decay"], group["first_momentum"], group["second_momentum"]
            grads = [p.grad for p in ps]
            fi = None if skip is None else skip.to(dev)
            if self._sharded:  # the states stay DTensors (checkpoints); the arithmetic runs on the shards
                grads = self._lt(grads)
            lps = self._lt(ps)
            if self.variant == "sgd":
                if wd:
                    grads = torch._foreach_add(grads, lps, alpha=wd)
                if not b1:
                    dirs = grads
                else:
                    old = [(p, g) for p, g in zip(ps, grads) if "momentum_buffer" in self.state[p]]
                    for p, g in zip(ps, grads):
                        if "momentum_buffer" not in self.state[p]:  # torch's rule: the first buffer is the gradient
                            g = g.detach()
                            buf = (g.clone() if fi is None else torch.where(fi == 0, g, torch.zeros_like(g)))
                            if self._sharded and is_dtensor(p):  # a DTensor like p (sharded checkpoints)
                                buf = _like(p, buf)
                            self.state[p]["momentum_buffer"] = buf
                    if old:
                        kernels.momentum_update(self._lt([p for p, _ in old]),
                                                self._lt([self.state[p]["momentum_buffer"] for p, _ in old]),
                                                kernels.Momentum(tuple(g for _, g in old), b1, 1 - group["dampening"], 0.0),
                                                fi)
                    dirs = self._lt([self.state[p]["momentum_buffer"] for p in ps])
            else:
                if self.variant == "adam" and wd:
                    grads = torch._foreach_add(grads, lps, alpha=wd)
                ms, vs = self._moments(ps)
                dirs = [self._dirs.get(id(p)) for p in ps]
                for i, p in enumerate(ps):
                    if dirs[i] is None:
                        dirs[i] = self._dirs[id(p)] = torch.zeros_like(lps[i], memory_format=torch.contiguous_format)
                torch._foreach_zero_(dirs)
                # the Adam direction m_hat / (sqrt(v_hat) + eps): torch's fused Adam stepping a zero buffer with lr=-1
                torch._fused_adam_(dirs, grads, ms, vs, [], self._adam_steps(ps, dev, fi), lr=-1.0, beta1=b1,
                                   beta2=b2, weight_decay=0.0, eps=_ADAM_EPS, amsgrad=False, maximize=False,
                                   found_inf=fi)
                if self.variant == "adamw" and wd:
                    # NB: on a skipped step d is wd*x, never used: the row step changes nothing then
                    torch._foreach_add_(dirs, lps, alpha=wd)
            for p, d in zip(ps, dirs):
                ds[self._row_index[id(p)]] = d
        ds = [d if d is not None else torch.zeros_like(x) for x, d in zip(xs, ds)]
        return xs, ds, momentum

    def _row_lr(self):
        lrs = [self.param_groups[g]["lr"] for g in self._row_lr_groups]
        if not lrs:
            return 0.0
        if any(isinstance(v, torch.Tensor) for v in lrs):
            if any(v is not lrs[0] for v in lrs):
                raise OptimizerError("the parameters holding rows have different learning-rate tensors: a row's step "
                                     "needs one; give them one param group (or the same lr tensor)")
            return lrs[0]
        if len(set(lrs)) > 1:
            raise OptimizerError(f"the parameters holding rows have different learning rates {sorted(set(lrs))}: "
                                 "a row's step needs one; give them one param group (or equal lrs)")
        return lrs[0]

    # -- the step ---------------------------------------------------------------------------------
    def _event(self) -> bool:
        """True on a step that creates state or makes a one-time decision from x and d (the first step,
        DHSPG's partition, a HESSO selection): such a step checks the gradients on the host."""
        return self._t == 0

    def _capture_guard(self, capturing: bool, event: bool) -> None:
        if not capturing:
            return
        if not self.capturable:
            raise OptimizerError(f"{type(self).__name__}.step() is being captured in a CUDA graph but capturable=False: "
                                 "build the optimizer with capturable=True")
        if event or self._check_mode == "raise":
            raise OptimizerError("this step cannot be captured in a CUDA graph: it is the first step, a partition or "
                                 "selection step, or check_finite='raise' reads the check on the host; run such "
                                 "steps eagerly and capture a later one")
        why = self._uncapturable()
        if why:
            raise OptimizerError(f"this step cannot be captured in a CUDA graph: {why}")

    def _uncapturable(self) -> str | None:
        return None

    @torch.no_grad()
    def step(self, closure=None):
        """One step. With GradScaler, ``scaler.step(opt)`` hands its scale and ``found_inf`` over (as to
        torch's fused optimizers): the gradients are unscaled here and a step with inf/NaN changes nothing,
        decided on the device."""
        loss = None
        if self._frozen:  # inside _no_init_step: torch.distributed.checkpoint's state-creating call
            return loss
        if self._placeholder:  # a load template that nothing was loaded into
            self.state.clear()
            self._placeholder = False
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError(f"parameter {self._name(p)!r} has a sparse gradient; {type(self).__name__} "
                                         "needs dense ones")
                params.append(p)
        capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
        event = self._event()
        self._capture_guard(capturing, event)
        if grad_scale is not None:
            self._unscale(params, grad_scale)
        active = self._rows_active()
        fuse = active and self._fuse_momentum()
        fused = self._row_directions(None, True) if fuse else None  # needs no flag: the row step updates
        # the row step checks the row tensors' gradients itself where that costs no pass of its own
        rows_check = fused is not None and not event and self._check_mode == "skip" and self._checks_rows(*fused)
        checked = [p for p in params if id(p) not in self._row_index] if rows_check else params
        skip = self._skip_flag(self._lt([p.grad for p in checked]), found_inf)
        if skip is not None and self._sharded:  # one rank's shard may hold the NaN: every rank skips
            skip = self._reduce_flag(skip)
        if skip is not None and (event or self._check_mode == "raise"):
            if bool(skip):  # NB: a host sync, on event steps and in check_finite="raise" mode only
                if self._check_mode == "raise":
                    self._raise_non_finite(params, found_inf)
                self._host_skipped += 1
                log.warning("%s: step %d skipped (a gradient holds NaN or inf)", type(self).__name__, self._t)
                return loss
            skip = None  # known finite
        if not rows_check:
            self._taken.add_(1.0 if skip is None else 1.0 - skip)
        lr = self._row_lr()
        if active:
            xs, ds, momentum = fused if fused is not None else self._row_directions(skip, False)
            skip = self._rows_step(xs, ds, lr, momentum, skip, rows_check)
            rest = [p for p in params if id(p) not in self._row_index]
        else:
            rest = params
        if rows_check:  # the flag now covers every gradient
            self._taken.add_(1.0 if skip is None else 1.0 - skip)
        self._base_update(rest, None, skip)
        self._t += 1
        if self._clock is not None:
            self._clock.add_(1.0)
        return loss

    def _rows_active(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reduce_flag(self, flag: torch.Tensor) -> torch.Tensor:
        from otofx.distributed import reduce_flag, tensors_group

        if self._flag_group is None:  # over the ranks of every DTensor parameter's mesh, found once
            self._flag_group = (tensors_group([p for g in self.param_groups for p in g["params"]]),)
        return reduce_flag(flag, self._flag_group[0])

    def _fuse_momentum(self) -> bool:
        """Whether this step's row step takes the row tensors' SGD momentum update over (DHSPG: one pass
        fewer over the weights on CPU); HESSO's row step does not."""
        return False

    def _checks_rows(self, xs, ds, momentum) -> bool:
        """Whether this (steady, momentum-fused) step's row step checks the row tensors' gradients for
        NaN/inf itself: on the C kernel, whose reduction pass reads every gradient anyway (the separate
        check would be a pass of its own)."""
        if self._sharded:
            return False
        return kernels.choose_backend(xs, ds, self.backend, self.layout, momentum.grads) == "cpu"

    def _momentum_fusable(self) -> bool:
        if self._shards is not None:  # the sums are taken apart from the momentum update (then reduced)
            return False
        if self._row_momentum() is None:
            return False
        return all(p.grad is not None and "momentum_buffer" in self.state[p] for p in self._row_params)

    def _row_momentum(self):
        """The row tensors' shared SGD momentum settings ``(b1, 1 - dampening, weight_decay)``, if they
        can be fused at all, else None."""
        if self.variant != "sgd" or not self._row_params:
            return None
        hp = {(self.param_groups[g]["first_momentum"], self.param_groups[g]["dampening"],
               self.param_groups[g]["weight_decay"]) for g in self._row_lr_groups}
        if len(hp) != 1:
            return None
        b1, damp, wd = hp.pop()
        if not b1:
            return None
        return b1, 1 - damp, wd

    def _rows_step(self, xs, ds, lr, momentum, skip, check: bool):  # pragma: no cover - abstract
        """The row step; returns the step's skip flag (``skip``, combined with the row gradients' check
        when ``check``: then every gradient is covered)."""
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def _signature(self) -> dict:
        return {"n_rows": self.n_rows, "group_sizes": self._group_sizes,
                "shapes": tuple(tuple(s) for s in self._shapes)}

    def state_dict(self):
        sd = super().state_dict()
        # NB: CUDA-graph replays advance the device clock, not the host's count: the clock is the step
        step = self._t if self._clock is None else max(self._t, int(self._clock.item()))
        sd["otofx"] = {"kind": self._kind, "variant": self.variant, "step": step, "taken": float(self._taken),
                       "host_skipped": self._host_skipped, "layout": self._signature(), **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        extra = state_dict.get("otofx", self._pending_extra)
        if extra is None or extra.get("kind") != self._kind:
            raise OptimizerError(f"this state_dict was not saved by a {type(self).__name__}: load one from "
                                 f"{type(self).__name__}.state_dict()")
        if extra["layout"] != self._signature():
            raise OptimizerError("the saved state belongs to a different row layout (other model or groups): build the "
                                 "optimizer from the same model and otofx.OTO groups before loading")
        if extra["variant"] != self.variant:
            raise OptimizerError(f"the saved state is for variant {extra['variant']!r}, this optimizer is {self.variant!r}")
        sd = {k: v for k, v in state_dict.items() if k != "otofx"}
        super().load_state_dict(sd)
        self._placeholder = False
        self._t = int(extra["step"])
        if self._clock is not None:
            self._clock.fill_(float(self._t))
        self._taken = torch.tensor(float(extra.get("taken", self._t)), dtype=torch.float32, device=self._home)
        for st in self.state.values():
            if "exp_avg" in st and "step" not in st:  # NB: saved before per-parameter counts: the shared one
                st["step"] = self._taken.clone()
        self._host_skipped = int(extra.get("host_skipped", 0))
        self._load_extra_state(extra)

    def _mask(self, t):
        return None if t is None else t.to(self.layout.device, torch.bool).clone()


def _per_group_targets(target, groups) -> tuple | None:
    """``target_group_sparsity`` as one fraction per group (a sequence, or a function of the group),
    each checked to lie in [0, 1); None for a single fraction."""
    if isinstance(target, (int, float)) and not isinstance(target, bool) and 0.0 <= target < 1.0:
        return None
    if callable(target):
        try:
            target = [target(z) for z in groups]
        except Exception as e:  # noqa: BLE001 - the user's function
            raise OptimizerError(f"target_group_sparsity: the function failed on a group: "
                                 f"{type(e).__name__}: {e}") from e
    elif isinstance(target, torch.Tensor):
        target = target.tolist()
    try:
        out = tuple(float(t) for t in target)
    except (TypeError, ValueError):
        out = None
    if out is None or not out:
        raise OptimizerError(f"target_group_sparsity={target!r} must be in [0, 1), or one such fraction per group "
                             "(a sequence, or a function of the group)")
    bad = [(i, t) for i, t in enumerate(out) if not 0.0 <= t < 1.0]
    if bad:
        i, t = bad[0]
        raise OptimizerError(f"target_group_sparsity for group {i} is {t!r}: each fraction must be in [0, 1)")
    return out


def _group_ranks(order: torch.Tensor, layout) -> tuple:
    """``(by_group, rank)``: the rows of ``order`` regrouped group after group (``order`` kept inside
    each group), and each one's position within its group."""
    g_of = layout.row_group
    by_group = order[torch.argsort(g_of[order], stable=True)]
    starts = torch.tensor(layout.group_start[:-1], device=order.device)
    return by_group, torch.arange(len(order), device=order.device) - starts[g_of[by_group]]


def _check_group_count(per_group: tuple, sizes: tuple) -> None:
    if len(per_group) != len(sizes):
        raise OptimizerError(f"target_group_sparsity has {len(per_group)} fractions for {len(sizes)} groups: "
                             "give one per group, in the groups' order")


class DHSPG(_RowOptimizer):
    """Dual Half-Space Projected Gradient (OTOv2), OTO.md section 2.

    ``params``: ``model.named_parameters()`` (or param-group dicts of named parameters); ``groups``:
    ``oto.groups`` (ZIGs, or ``(rows, params)`` tuples of the same contract). Hyper-parameters left
    None take OTO.md's defaults for ``variant``. ``backend``: kernel backend (see otofx.kernels).

    ``control`` (default True): :mod:`otofx.sparsity` sets the rule's strength and stopping so that
    the group sparsity rises to ``target_group_sparsity`` over ``pruning_steps`` steps (None: picked
    and logged) and never passes it; ``status()`` says where it stands. ``control=False`` is OTO.md's
    rule alone.

    ``target_group_sparsity``: one fraction for all rows (the redundant rows are then the best-scored
    ones over every group), or one per group (a sequence in ``groups``' order, or a function of the
    group: ``lambda z: 0.25 if ... else 0.5``), for a model whose widths should shrink unevenly (an
    LLM's hidden width less than its heads and MLP widths). Per group, each group's redundant rows
    are its own best-scored ``ceil(target * rows)`` (``group_divisible`` as above, and
    ``tolerance_group_sparsity`` unused; a group keeps at least one row): every group lands on its
    own target, and ``self.target_group_sparsity`` is the overall fraction they make.
    """

    _kind = "dhspg"

    def __init__(self, params, groups=(), *, lr: float = 0.1, variant: str = "sgd",
                 first_momentum=None, second_momentum=None, dampening=None, weight_decay=None,
                 lmbda=None, lmbda_amplify=None, hat_lmbda_coeff=None, epsilon: float = 0.0,
                 target_group_sparsity: float = 0.5, tolerance_group_sparsity: float = 0.05,
                 start_pruning_steps: int = 0, warm_up_steps: int = 0, group_divisible: int = 1,
                 fixed_zero_groups: bool = True, pruning_steps: int | None = None, control: bool = True,
                 model=None, backend=None, check_finite=True, capturable: bool = False):
        if variant not in VARIANTS:
            raise OptimizerError(f"variant={variant!r} is not supported: use one of {VARIANTS}")
        groups = tuple(groups)  # NB: read twice (a per-group target function, then the layout)
        lam = dict(_LAMBDA_DEFAULTS[variant])
        lam.update({k: v for k, v in dict(lmbda=lmbda, lmbda_amplify=lmbda_amplify,
                                          hat_lmbda_coeff=hat_lmbda_coeff).items() if v is not None})
        if lam["lmbda"] < 0 or lam["lmbda_amplify"] < 0 or lam["hat_lmbda_coeff"] < 1:
            raise OptimizerError(f"lmbda, lmbda_amplify must be >= 0 and hat_lmbda_coeff >= 1 (got {lam})")
        per_group = _per_group_targets(target_group_sparsity, groups)
        if tolerance_group_sparsity < 0:
            raise OptimizerError(f"tolerance_group_sparsity={tolerance_group_sparsity!r} must be >= 0")
        if int(group_divisible) != group_divisible or group_divisible < 1:
            raise OptimizerError(f"group_divisible={group_divisible!r} must be an integer >= 1")
        if start_pruning_steps < 0 or warm_up_steps < 0:
            raise OptimizerError("start_pruning_steps and warm_up_steps must be >= 0")
        if pruning_steps is not None and (int(pruning_steps) != pruning_steps or pruning_steps < 1):
            raise OptimizerError(f"pruning_steps={pruning_steps!r} must be an integer >= 1 (the steps over which the "
                                 "sparsity rises to its target), or None to pick one")
        if not 0.0 <= epsilon < 1.0:
            # NB: epsilon >= 1 would project every redundant row at once, a negative one never
            raise OptimizerError(f"epsilon={epsilon!r} must be in [0, 1): it is the share of a row a step may "
                                 "shrink before the row is projected to zero")
        self.lmbda, self.lmbda_amplify, self.hat_lmbda_coeff = lam["lmbda"], lam["lmbda_amplify"], lam["hat_lmbda_coeff"]
        self.epsilon = float(epsilon)
        self.target_group_sparsity = float(target_group_sparsity) if per_group is None else 0.0
        self.group_targets = per_group  # one fraction per group, or None (one for all rows)
        self.tolerance_group_sparsity = float(tolerance_group_sparsity)
        self.start_pruning_steps = int(start_pruning_steps)
        self.warm_up_steps = int(warm_up_steps)
        self.group_divisible = int(group_divisible)
        self.fixed_zero_groups = bool(fixed_zero_groups)
        self.pruning_steps = None if pruning_steps is None else int(pruning_steps)
        self.control = bool(control)
        self._redundant = None
        self._control = None  # otofx.sparsity.SparsityControl, built at the partition
        super().__init__(params, groups, variant=variant, lr=lr, model=model, backend=backend, check_finite=check_finite,
                         capturable=capturable,
                         base=dict(first_momentum=first_momentum, second_momentum=second_momentum,
                                   dampening=dampening, weight_decay=weight_decay))
        if per_group is not None:
            _check_group_count(per_group, self._group_sizes)
            # NB: the rows each group must zero (kept rounded up to a multiple of group_divisible, at
            # least one multiple, as the partition rounds), then the overall fraction every other use reads
            gd = self.group_divisible
            self._group_rows = [n - min(n, max(gd, -(-(n - math.ceil(t * n - 1e-9)) // gd) * gd))
                                for t, n in zip(per_group, self._group_sizes)]
            self.target_group_sparsity = sum(self._group_rows) / max(self.n_rows, 1)

    @property
    def redundant(self):
        """The G_r mask over all rows (group after group), or None before the partition."""
        return self._redundant

    @property
    def partition(self) -> Partition | None:
        if self._redundant is None:
            return None
        red, kept = [], []
        s = self.layout.group_start
        for g in range(self.layout.n_groups):
            m = self._redundant[s[g]:s[g + 1]].cpu()
            red.append(torch.nonzero(m).reshape(-1))
            kept.append(torch.nonzero(~m).reshape(-1))
        return Partition(tuple(red), tuple(kept))

    def _partition(self, st: kernels.RowStats) -> torch.Tensor:
        """OTO.md step 1: the redundant set from scores of x and d, rounded per group; rows that the rounding
        gives back go to groups with room (ours)."""
        lay = self.layout
        n = lay.n_rows
        norm, dnorm = st.xx.sqrt(), st.dd.sqrt()
        den = norm * dnorm
        cos = torch.where(den > 0, st.xd / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        inv = 1.0 / (norm / lay.row_len.to(norm.dtype) + 1e-6)
        nz = lambda v: v / torch.where(v.norm() > 0, v.norm(), 1.0)  # noqa: E731
        score = 0.5 * nz(cos) + 0.5 * nz(inv)
        order = torch.argsort(score, descending=True, stable=True)
        g_of = lay.row_group
        ng = torch.bincount(g_of, minlength=lay.n_groups)
        if self.group_targets is None:  # the top K over every row, then counted per group
            k = math.floor(n * min(self.target_group_sparsity + self.tolerance_group_sparsity, 0.999))
            chosen = torch.zeros(n, dtype=torch.bool, device=score.device)
            chosen[order[:k]] = True
            rg = torch.bincount(g_of, weights=chosen.to(torch.float64), minlength=lay.n_groups).round().long()
        else:  # each group's own count
            k = sum(self._group_rows)
            rg = torch.tensor(self._group_rows, dtype=torch.long, device=score.device)
        gd = self.group_divisible
        kept = torch.clamp(torch.maximum((ng - rg + gd - 1) // gd * gd, torch.full_like(ng, gd)), max=ng)
        quota = ng - kept
        by_group, rank = _group_ranks(order, lay)  # group order, score descending inside
        redundant = torch.zeros(n, dtype=torch.bool, device=score.device)
        redundant[by_group] = rank < quota[g_of[by_group]]
        # NB: ours, beyond OTO.md: the rounding per group (kept rounded up to a multiple of group_divisible, at
        # least one multiple) gives rows of the top K back; without handing them on, a model with many small
        # groups could never reach its target. They go to groups with room, in whole multiples of
        # group_divisible, best mean score first (so inside a group the rows still go in score order).
        short = k - int(quota.sum())  # the partition is an event step: one host read is allowed here
        if short >= gd and self.group_targets is None:
            g_row = g_of[by_group]
            extra = rank - quota[g_row]  # position among a group's rows that are not yet redundant
            room = (kept - gd).clamp(min=0) // gd * gd  # rows a group can still give, keeping one multiple
            ok = (extra >= 0) & (extra < room[g_row])
            rows, unit = by_group[ok], g_row[ok] * (n + 1) + extra[ok] // gd
            units, inv = torch.unique(unit, return_inverse=True)
            mean = torch.zeros(len(units), dtype=score.dtype, device=score.device).index_add_(0, inv, score[rows]) / gd
            pick = torch.zeros(len(units), dtype=torch.bool, device=score.device)
            pick[torch.argsort(mean, descending=True, stable=True)[: short // gd]] = True
            redundant[rows[pick[inv]]] = True
        if log.isEnabledFor(logging.INFO):
            log.info("DHSPG: partition at step %d: %d of %d rows redundant", self._t, int(redundant.sum()), n)
        return redundant

    def _rows_active(self) -> bool:
        return self._t >= self.start_pruning_steps and self.n_rows > 0

    def _event(self) -> bool:
        return self._t == 0 or (self._rows_active() and self._redundant is None)

    def _uncapturable(self) -> str | None:
        if self._t < self.start_pruning_steps + self.warm_up_steps:
            return "it is before the end of start_pruning_steps + warm_up_steps (a replay would not move on)"
        return None

    def _fuse_momentum(self) -> bool:
        # after the partition (which reads the updated directions)
        return self._redundant is not None and self._momentum_fusable()

    def _rows_step(self, xs, ds, lr, momentum, skip, check: bool = False):
        t = self._t
        # sharded rows: this shard's sums, then ONE all-reduce of [xx; xd; dd] over the ranks; every
        # decision below is made from the whole rows' sums, alike on every rank
        st = self._event_stats(xs, ds) if self._shards is not None else None
        if self._redundant is None:  # an event step: the gradients are known to be finite
            self._redundant = self._partition(st if st is not None else self._event_stats(xs, ds))
            if self.control:  # built here, on the event step: its set-up reads the partition on the host
                self._controller()
        warm = t < self.start_pruning_steps + self.warm_up_steps
        controlled = self.control and not warm

        def rule(st):
            # -- sparsity control (otofx/sparsity.py): which rows to act on, and lambda's scale ------
            mask, scale, eps = self._redundant, None, None
            if controlled:  # NB: the rows' norms before the step, from the row step's own reductions
                # NB: capturable: the schedule reads the device clock, which a CUDA graph replay advances
                clock = self._clock if self._clock is not None else t
                mask, scale, eps = self._controller().decide(clock, xs, lr, self._redundant, xx=st.xx, step=t)
            # ---------------------------------------------------------------------------------------
            cfg = kernels.DHSPGConfig(lr=lr, lmbda=self.lmbda, lmbda_amplify=self.lmbda_amplify,
                                      hat_lmbda_coeff=self.hat_lmbda_coeff, epsilon=self.epsilon,
                                      target_rows=self._target_rows(self.target_group_sparsity),
                                      warm_up=warm, fixed_zero=self.fixed_zero_groups, lmbda_scale=scale,
                                      epsilon_t=eps)
            return cfg, mask

        if st is not None:
            cfg, mask = rule(st)
            coef, keep, _ = kernels.dhspg_rows(st, mask, cfg, self.backend, self.layout)
            kernels.apply(self.layout, xs, ds, lr, coef, keep, backend=self.backend, skip=skip)
            return skip
        if not controlled and not check:  # nothing to decide in between: the backend's whole step
            cfg, mask = rule(None)
            kernels.dhspg_step(self.layout, xs, ds, mask, cfg, backend=self.backend, momentum=momentum, skip=skip)
            return skip

        def coefficients(st):
            cfg, mask = rule(st)
            return kernels.dhspg_rows(st, mask, cfg, self.backend, self.layout)[:2]

        return kernels.rows_step(self.layout, xs, ds, lr, coefficients, backend=self.backend, momentum=momentum,
                                 skip=skip, check=check)

    def _controller(self, budget=None):
        if self._control is None:
            from otofx.sparsity import SparsityControl

            self._control = SparsityControl(self, self._redundant, self.start_pruning_steps + self.warm_up_steps,
                                            self.pruning_steps if budget is None else budget)
        return self._control

    def status(self):
        """An :class:`otofx.sparsity.SparsityStatus`: group sparsity against the target and the schedule
        (reads device values: call it between steps, not inside a captured region)."""
        from otofx.sparsity import status

        return status(self)

    def _extra_state(self) -> dict:
        return {"redundant": None if self._redundant is None else self._redundant.cpu().clone(),
                "control": None if self._control is None else self._control.state()}

    def _load_extra_state(self, extra: dict) -> None:
        self._redundant = self._mask(extra.get("redundant"))
        self._control = None
        if extra.get("control") is not None:
            self._controller(extra["control"]["budget"]).load(extra["control"])


class HESSO(_RowOptimizer):
    """Hybrid Efficient Structured Sparse Optimizer (OTOv3), OTO.md section 3.

    Every ``D = pruning_steps // pruning_periods`` steps from ``start_pruning_step`` on, the
    lowest-scoring rows not yet pruned (``floor(N * target)`` rows over all periods, split evenly) are
    picked and scaled by ``(D-t-1)/(D-t)`` after the base step at step t of the period: exactly zero at
    its end. Pruned rows stay zero. ``target_group_sparsity`` may be one fraction per group (a
    sequence, or a function of the group, as for :class:`DHSPG`): each group then loses its own
    lowest-scoring ``floor(rows * target)`` rows, split evenly over the periods.
    """

    _kind = "hesso"

    def __init__(self, params, groups=(), *, lr: float = 0.1, variant: str = "sgd",
                 first_momentum=None, second_momentum=None, dampening=None, weight_decay=None,
                 target_group_sparsity: float = 0.5, start_pruning_step: int = 0, pruning_steps: int | None = None,
                 pruning_periods: int = 1, model=None, backend=None, check_finite=True, capturable: bool = False):
        if pruning_steps is None:
            raise OptimizerError("HESSO needs pruning_steps (steps over which rows are driven to zero), e.g. 10% of training")
        if int(pruning_periods) < 1 or int(pruning_steps) < int(pruning_periods):
            raise OptimizerError(f"pruning_steps={pruning_steps!r} must be >= pruning_periods={pruning_periods!r} >= 1")
        groups = tuple(groups)  # NB: read twice (a per-group target function, then the layout)
        per_group = _per_group_targets(target_group_sparsity, groups)
        if start_pruning_step < 0:
            raise OptimizerError("start_pruning_step must be >= 0")
        self.target_group_sparsity = float(target_group_sparsity) if per_group is None else 0.0
        self.group_targets = per_group
        self.start_pruning_step = int(start_pruning_step)
        self.pruning_steps = int(pruning_steps)
        self.pruning_periods = int(pruning_periods)
        self.period_length = self.pruning_steps // self.pruning_periods
        self._pruned = None
        self._current = None
        self._merged = False
        super().__init__(params, groups, variant=variant, lr=lr, model=model, backend=backend, check_finite=check_finite,
                         capturable=capturable,
                         base=dict(first_momentum=first_momentum, second_momentum=second_momentum,
                                   dampening=dampening, weight_decay=weight_decay))
        if per_group is not None:
            _check_group_count(per_group, self._group_sizes)
            self._group_rows = [math.floor(n * t) for t, n in zip(per_group, self._group_sizes)]
            self.target_group_sparsity = sum(self._group_rows) / max(self.n_rows, 1)

    @property
    def pruned(self):
        """Mask of the rows committed to zero (earlier periods and the current one), or None before start."""
        if self._pruned is None:
            return None
        return self._pruned | self._current

    def _scores(self, st: kernels.RowStats) -> torch.Tensor:
        norm, dnorm = st.xx.sqrt(), st.dd.sqrt()
        den = norm * dnorm
        cos = torch.where(den > 0, st.xd / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        feats = [norm, norm / self.layout.row_len.to(norm.dtype), cos + 1, st.xd.abs(), 0.5 * st.xd.square()]
        score = torch.zeros_like(norm)
        for f in feats:
            nrm = f.norm()
            score = score + f / torch.where(nrm > 0, nrm, 1.0)  # f is all zero where nrm is
        return score

    def _select(self, st: kernels.RowStats, period: int) -> None:
        P = self.pruning_periods
        share = lambda total: total * (period + 1) // P - total * period // P  # noqa: E731 - this period's part
        self._pruned |= self._current
        score = self._scores(st).masked_fill(self._pruned, float("inf"))
        order = torch.argsort(score, stable=True)
        self._current = torch.zeros_like(self._pruned)
        if self.group_targets is None:
            count = share(math.floor(self.n_rows * self.target_group_sparsity))
            self._current[order[:count]] = True
        else:  # each group's lowest-scoring rows, its own count
            g_of = self.layout.row_group
            by_group, rank = _group_ranks(order, self.layout)  # group order, score ascending inside
            quota = torch.tensor([share(t) for t in self._group_rows], dtype=torch.long, device=order.device)
            self._current[by_group[rank < quota[g_of[by_group]]]] = True
            count = int(quota.sum())
        log.info("HESSO: period %d at step %d: %d rows picked", period, self._t, count)

    def _rows_active(self) -> bool:
        return self._t >= self.start_pruning_step and self.n_rows > 0

    def _in_window(self) -> bool:
        rel = self._t - self.start_pruning_step
        return 0 <= rel < self.pruning_periods * self.period_length

    def _event(self) -> bool:
        rel = self._t - self.start_pruning_step
        return self._t == 0 or (self._in_window() and self.n_rows > 0 and rel % self.period_length == 0)

    def _uncapturable(self) -> str | None:
        if self._in_window():
            return "it is inside the pruning window, whose per-step scale the host sets (capture after it)"
        return None

    def _rows_step(self, xs, ds, lr, momentum, skip, check: bool = False):
        rel = self._t - self.start_pruning_step
        dev = self.layout.device
        if self._pruned is None:
            self._pruned = torch.zeros(self.n_rows, dtype=torch.bool, device=dev)
            self._current = torch.zeros_like(self._pruned)
        d_len = self.period_length
        acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        if rel < self.pruning_periods * d_len:
            period, k = divmod(rel, d_len)
            if k == 0:  # an event step: the gradients are known to be finite
                self._select(self._event_stats(xs, ds), period)
            f = (d_len - k - 1) / (d_len - k)
            scale = torch.where(self._current, torch.full((self.n_rows,), f, dtype=acc, device=dev),
                                torch.ones(self.n_rows, dtype=acc, device=dev))
        else:
            if not self._merged:  # once after the window: the last period's rows join the pruned ones
                self._pruned |= self._current
                self._current.zero_()
                self._merged = True
            scale = self._ones(acc)
        scale = scale.masked_fill(self._pruned, 0.0)
        kernels.scale_step(self.layout, xs, ds, lr, scale, backend=self.backend, skip=skip)
        return skip

    def _ones(self, acc):
        key = ("hesso_ones", acc)
        if key not in self.layout.cache:
            self.layout.cache[key] = torch.ones(self.n_rows, dtype=acc, device=self.layout.device)
        return self.layout.cache[key]

    def _extra_state(self) -> dict:
        return {"pruned": None if self._pruned is None else self._pruned.cpu().clone(),
                "current": None if self._current is None else self._current.cpu().clone()}

    def _load_extra_state(self, extra: dict) -> None:
        self._pruned = self._mask(extra.get("pruned"))
        self._current = self._mask(extra.get("current"))


__all__ = ["DHSPG", "HESSO", "Partition", "OptimizerError", "NonFiniteGradError", "VARIANTS"]
