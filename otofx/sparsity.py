"""Sparsity control for DHSPG: land on ``target_group_sparsity`` within a budget, never above it.

OTOv2's rule (OTO.md section 2) decides *how* a redundant row goes to zero (adaptive group lasso,
half-space projection). On its own it says nothing about *when*: with lmbda 1e-3 and epsilon 0 the
penalty is too weak to zero anything in a few hundred steps, and with a large epsilon every row that
meets the projection condition in one step is zeroed in that step (overshoot). This module adds a
controller around the rule, which keeps the rule and sets its strength and its stopping each step.

The rule (N rows, T = ceil(target * N) rows to zero, Z zero rows now, t the step, t_s the first step
of projection (``start_pruning_steps + warm_up_steps``), P the budget ``pruning_steps``):

1. **Schedule.** Row k (k = 1..T, in the order rows die) is due at D_k = t_s + P * k / T: the
   sparsity is meant to rise linearly to the target over P steps.
2. **Cap (no overshoot).** Only the ``T - Z`` live redundant rows with the smallest ``||x_i||`` are
   penalised and may be projected this step (the DHSPG kernel gets this mask instead of G_r). At
   most T rows can then ever be zero: no step passes the target, and the rows closest to zero go
   first. G_r's extra ``tolerance`` rows stand by; a row that resists is overtaken by them.
3. **Strength (no stall).** The group-lasso step shrinks every penalised row by ``a * lambda`` in
   norm. Let r_(j) be the j-th smallest norm among the penalised rows; the smallest constant lambda
   that zeroes each of them by its due step is ``lam_ff = max_j r_(j) / (a * max(D_{Z+j} - t, 1))``
   (a row already due gives ``r / a``: it goes now). The kernel's base ``lmbda`` becomes
   ``lmbda * s`` with ``s = max(1, lam_ff / lmbda) * m``, never weaker than the user's lmbda; the
   adaptive lambda of OTO.md (``lmbda_amplify``, ``hat_lmbda_coeff``, the upper bound) acts on top
   of it. ``m`` is a feedback factor for what the feed-forward misses (gradients that grow rows):
   ``m <- clip(m * exp(gain * (S_t - Z) / T), 1, max_boost)`` with ``S_t = T * min(1, (t - t_s + 1) / P)``
   the scheduled zero rows and ``gain = 20 / P``: it rises while behind schedule and falls back to
   1 once on it.
4. **Overdue rows.** When the zero rows lag the schedule by more than the tolerance
   (``ceil(S_t) - Z > ceil(tolerance * N)``), or by any row once the budget is spent, the mask is the
   ``ceil(S_t) - Z`` live redundant rows with the smallest norm and epsilon is replaced by 1e30 for the
   step: they are projected (they are near zero by then). NB: the rule's upper bound on lambda
   (``||d|| / |cos(x, d)|`` when ``x.d < 0``) goes to zero with the gradient, so a row the loss has
   abandoned (a dead ReLU unit) can otherwise sit just above zero for ever.
5. **Stop.** At Z = T the mask is empty: penalty and projection stop; zero rows stay zero
   (``fixed_zero_groups``) and training goes on as the base optimizer.

Budget: ``pruning_steps`` (DHSPG's argument). When None, it is taken from a learning-rate scheduler
attached to the optimizer whose horizon is known (a third of the steps left after t_s), else
``max(100, start_pruning_steps // 2)``; the choice is logged.

Diagnostics (logged once each on the ``otofx`` logger, and in ``DHSPG.status()``): the target is
unreachable (fewer redundant rows than T, e.g. ``group_divisible`` or pins), training is behind
schedule by more than the tolerance, or the budget ended below target.

Internals:
    * Per step the controller costs one extra x-only pass of row reductions (``kernels.row_stats``),
      a sort of the rows and a few vector ops; every decision is a device tensor (the mask, the
      0-d lambda scale), so a step makes no host sync. The warnings read the zero count through a
      one-slot non-blocking copy (:class:`_Lagged`) that is polled, not waited for: on CUDA they may
      come a step or two late; they never change a result.
    * Once the target is reached with ``fixed_zero_groups`` (known through the same lagged copy),
      the extra pass is skipped: the mask would be empty anyway, so results do not depend on when
      the copy lands. Not with a device clock (``capturable=True``): a replayed step cannot branch on
      the host, so the decision is made every step (the same mask and results).
    * ``capturable=True``: the step counter is a device tensor the optimizer advances in every step
      (a CUDA graph replay included), the schedule is computed from it on the device with the host
      path's dtypes (the same bits), and ``m`` and the scale are updated in place.
    * On CUDA the per-row work (key, zero count, mask, feed-forward rates) is two Triton kernels
      around the sort (``kernels.triton_rows.controller_rows``) instead of about 25 vector ops, each a
      launch; it decides what the ops decide (tests/test_sparsity.py, on the interpreter).
    * ``m``, the budget and the step of partition are in the optimizer's ``state_dict()``.
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass

import torch

from otofx import kernels

log = logging.getLogger("otofx")

FEEDBACK_GAIN = 20.0  # gain * P: a sustained 10% shortfall multiplies lambda by e^2 over P steps
MAX_BOOST = 1e4  # cap on the feedback factor m
MAX_SCALE = 1e8  # cap on the lambda scale (keeps lmbda * s finite in float32)
MIN_AUTO_BUDGET = 100
FORCE_EPSILON = 1e30  # an epsilon that projects every row of the mask


@dataclass(frozen=True)
class SparsityStatus:
    """Where DHSPG stands against its target (``DHSPG.status()``); sparsities are fractions of rows."""

    step: int
    group_sparsity: float
    target_group_sparsity: float
    tolerance_group_sparsity: float
    scheduled_group_sparsity: float  # where the schedule wants it at this step (0 before pruning)
    zero_rows: int
    n_rows: int
    pruning_start: int | None  # t_s, None before the partition
    pruning_steps: int | None  # the budget P (None before the partition or without control)
    lmbda_scale: float  # the factor on lmbda this step (1.0 without control)
    reachable: bool  # the redundant set holds at least T rows
    behind_schedule: bool  # more than the tolerance below the schedule
    reached: bool  # at least T rows are zero
    # with one target per group: (zero rows, rows to zero, rows) of each group, in the groups' order
    per_group: tuple | None = None

    def __str__(self) -> str:
        state = "reached" if self.reached else ("behind schedule" if self.behind_schedule else "on schedule")
        out = (f"step {self.step}: group sparsity {self.group_sparsity:.3f} of target {self.target_group_sparsity:.3f} "
               f"(scheduled {self.scheduled_group_sparsity:.3f}, {state}; {self.zero_rows}/{self.n_rows} rows zero)")
        if self.per_group is not None:
            out += "; per group (zero/target of rows): " + ", ".join(f"{z}/{t} of {n}" for z, t, n in self.per_group)
        return out


def scheduler_horizon(opt) -> tuple[int | None, str]:
    """The last optimizer step of a learning-rate scheduler attached to ``opt``, if it can be told.

    Schedulers do not register with their optimizer: they are found among the objects referring to
    it. A horizon counted in scheduler steps is converted with the ratio of optimizer steps to
    scheduler steps so far (OneCycleLR counts optimizer steps by definition).
    """
    from torch.optim import lr_scheduler as ls

    for s in gc.get_referrers(opt):
        if not isinstance(s, ls.LRScheduler) or getattr(s, "optimizer", None) is not opt:
            continue
        name = type(s).__name__
        if isinstance(s, ls.OneCycleLR):
            return int(s.total_steps), name
        horizon = None
        if isinstance(s, ls.CosineAnnealingLR):
            horizon = s.T_max
        elif isinstance(s, (ls.LinearLR, ls.ConstantLR, ls.PolynomialLR)):
            horizon = s.total_iters
        elif isinstance(s, ls.MultiStepLR) and s.milestones:
            horizon = max(s.milestones)
        if horizon is None:
            continue
        done = int(getattr(s, "last_epoch", 0))
        if done <= 0 or opt.step_count <= 0:
            continue  # the step ratio is not known yet
        return int(round(horizon * opt.step_count / done)), name
    return None, ""


def auto_budget(opt, start: int) -> tuple[int, str]:
    """``pruning_steps`` when the user gave none, and where it came from (for the log)."""
    horizon, name = scheduler_horizon(opt)
    if horizon is not None and horizon - start >= 3:
        return max(1, (horizon - start) // 3), f"a third of the {horizon - start} steps left by {name}"
    return max(MIN_AUTO_BUDGET, start // 2), (f"max({MIN_AUTO_BUDGET}, start_pruning_steps // 2) (no learning-rate "
                                             "scheduler with a known horizon is attached)")


class _Lagged:
    """The latest value of a device scalar the host can read without waiting (None until one lands)."""

    def __init__(self):
        self.value = None
        self._buf = None
        self._event = None
        self._step = None
        self.step = None  # the step ``value`` belongs to

    def push(self, t: torch.Tensor, step: int) -> None:
        # NB: values are read from host memory with .numpy(), never through .item()/int(tensor), which
        # dispatch aten._local_scalar_dense: the step's sync counter (tests/test_optim.py) stays at 0 on
        # the CPU path too, and on CUDA the read is of the pinned buffer the event says has landed
        if t.device.type != "cuda":
            self.value, self.step = int(t.detach().numpy()), step
            return
        self.poll()
        if self._event is not None:
            return  # one copy in flight at a time
        if self._buf is None:
            self._buf = torch.empty((), dtype=t.dtype, pin_memory=True)
        self._buf.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._step = step

    def poll(self):
        if self._event is not None and self._event.query():
            self.value, self.step = int(self._buf.numpy()), self._step
            self._event = None
        return self.value


def _fused(xx: torch.Tensor, n: int) -> bool:
    """Whether the controller's per-row ops run as Triton kernels (CUDA rows; tests force it on the
    CPU under the interpreter)."""
    return n > 0 and xx.is_cuda and kernels.triton_available()


class SparsityControl:
    """The controller of one DHSPG optimizer (built at its partition; see the module docstring)."""

    def __init__(self, opt, redundant: torch.Tensor, start: int, pruning_steps: int | None):
        lay = opt.layout
        self.layout = lay
        self.n = lay.n_rows
        self.target_rows = opt._target_rows(opt.target_group_sparsity)
        self.tol_rows = max(1, math.ceil(opt.tolerance_group_sparsity * self.n - 1e-9))
        self.start = int(start)
        if pruning_steps is None:
            pruning_steps, why = auto_budget(opt, self.start)
            log.info("DHSPG: no pruning_steps given: %d rows to zero over %d steps from step %d (%s)",
                     self.target_rows, pruning_steps, self.start, why)
        self.budget = int(pruning_steps)
        self.lmbda = float(opt.lmbda)
        self.fixed_zero = bool(opt.fixed_zero_groups)
        dev = lay.device
        self._eps = torch.tensor(float(opt.epsilon), dtype=torch.float64, device=dev)
        self._eps_force = torch.tensor(FORCE_EPSILON, dtype=torch.float64, device=dev)
        self.m = torch.ones((), dtype=torch.float64, device=dev)
        self.scale = torch.ones((), dtype=torch.float64, device=dev)
        self._idx = torch.arange(self.n, device=dev)
        self._j = torch.arange(1, self.n + 1, dtype=torch.float64, device=dev)
        self._count = _Lagged()
        self._warned = set()
        self.n_redundant = int(redundant.sum())
        if self.n_redundant < self.target_rows:
            self._warn("unreachable", "DHSPG: target_group_sparsity %.3f is unreachable: %d rows must be zero but only "
                       "%d can be redundant (group_divisible, or groups that keep at least one row); the run will "
                       "stop at %.3f. Lower the target or group_divisible",
                       opt.target_group_sparsity, self.target_rows, self.n_redundant, self.n_redundant / max(self.n, 1))

    # -- the per-step decision (device only) -------------------------------------------------------
    def scheduled_rows(self, t):
        """The zero rows due by step ``t`` (a float; a float64 device tensor for a device clock ``t``)."""
        if isinstance(t, torch.Tensor):
            return self.target_rows * ((t.to(torch.float64) - self.start + 1) / self.budget).clamp(0.0, 1.0)
        if t < self.start:
            return 0.0
        return self.target_rows * min(1.0, (t - self.start + 1) / self.budget)

    @torch.no_grad()
    def decide(self, t, xs, lr: float, redundant: torch.Tensor, xx: torch.Tensor | None = None,
               step: int | None = None):
        """The mask of rows to penalise (and maybe project) at step t, and the 0-d lambda scale.

        ``t``: the step, an int, or a 0-d device tensor (a capturable optimizer's clock: the schedule is
        then computed on the device, and ``step``, the host's count, only dates the diagnostics).
        ``xs`` are the row tensors before the step (the layout's order), ``redundant`` DHSPG's G_r;
        ``xx``: the rows' ``||x||^2`` when the caller has them (sharded rows: summed over every rank,
        so that every rank decides alike), else they are computed from ``xs``.
        """
        clock = isinstance(t, torch.Tensor)  # the optimizer's device step counter (capturable=True)
        capturing = clock and t.is_cuda and torch.cuda.is_current_stream_capturing()
        host_t = step if clock else t  # the diagnostics' step, on the host (None: no diagnostics)
        diagnose = host_t is not None and not capturing  # NB: no host reads or events inside a CUDA graph
        if diagnose:
            self._check(host_t)
        done = self._count.value
        if not clock and self.fixed_zero and done is not None and done >= self.target_rows:
            return torch.zeros_like(redundant), self.scale, self._eps  # reached: the mask would be empty
        if xx is None:
            xx = kernels.row_stats(self.layout, xs).xx
        sched = self.scheduled_rows(t)
        if _fused(xx, self.n):  # CUDA: the per-row ops below in two Triton launches around the sort
            from otofx.kernels.triton_rows import controller_rows

            mask, eps, peak, z = controller_rows(xx, redundant, t, self.start, self.budget, self.target_rows,
                                                 self.tol_rows, self._eps, self._eps_force)
            if diagnose:
                self._count.push(z, host_t)
        else:
            norm = xx.sqrt()
            zero = xx == 0
            z = zero.sum()
            if diagnose:
                self._count.push(z, host_t)
            live = redundant & ~zero
            cap = (self.target_rows - z).clamp(min=0)
            key = torch.where(live, norm, torch.full_like(norm, math.inf))
            vals, order = kernels.sort_rows(key)
            rank = kernels.rank_rows(order, self._idx)
            # overdue rows: more than the tolerance behind schedule, or any once the budget is spent
            # NB: with the device clock every value below is a device tensor (a CUDA graph replays it with
            # the clock it reads); the dtypes follow the host path's, so both give the same bits
            if clock:
                overdue = (torch.ceil(sched - 1e-9).to(z.dtype) - z).clamp(min=0)
            else:
                overdue = (math.ceil(sched - 1e-9) - z).clamp(min=0)
            force = (overdue > self.tol_rows) | ((overdue > 0) & (t + 1 >= self.start + self.budget))
            mask = live & (rank < torch.where(force, overdue, cap))
            eps = torch.where(force, self._eps_force, self._eps)
            # feed-forward: the smallest lambda that zeroes every penalised row by its due step
            j = self._j.to(vals.dtype)
            due = self.start + self.budget * (z + j) / max(self.target_rows, 1)
            rate = torch.where((j <= cap) & torch.isfinite(vals), vals / (due - t).clamp(min=1.0),
                               torch.zeros_like(vals))
            peak = rate.max() if self.n else rate.sum()
        if isinstance(lr, torch.Tensor):  # a tensor lr (capturable steps): no host comparison
            lam_ff = torch.where(lr > 0, peak / torch.where(lr > 0, lr, torch.ones_like(lr)), torch.zeros_like(peak))
        else:
            lam_ff = peak / lr if lr > 0 else torch.zeros((), dtype=vals.dtype, device=vals.device)
        # feedback: m grows while behind schedule and falls back to 1 once on it
        err = ((sched.to(torch.float32) if clock else sched) - z) / max(self.target_rows, 1)
        # NB: m and the scale are updated in place: a CUDA graph replays reads and writes of these tensors
        self.m.copy_((self.m * torch.exp((FEEDBACK_GAIN / self.budget) * err.to(self.m.dtype))).clamp(1.0, MAX_BOOST))
        base = (lam_ff.to(self.m.dtype) / self.lmbda).clamp(min=1.0) if self.lmbda > 0 else torch.ones_like(self.m)
        self.scale.copy_((base * self.m).clamp(max=MAX_SCALE))
        return mask, self.scale, eps

    # -- diagnostics (host, from the lagged zero count) --------------------------------------------
    def _check(self, t: int) -> None:
        z = self._count.poll()
        if z is None:
            return
        at = self._count.step
        if z >= self.target_rows:
            return
        end = self.start + self.budget
        if at >= end:
            self._warn("budget", "DHSPG: the pruning budget ended at step %d with group sparsity %.3f below the target "
                       "%.3f (%d of %d rows zero); the penalty keeps rising until it is reached. Give a larger "
                       "pruning_steps, a larger lr or lmbda, or a lower target", end, z / self.n,
                       self.target_rows / self.n, z, self.target_rows)
        elif self.scheduled_rows(at) - z > self.tol_rows:
            self._warn("behind", "DHSPG: behind schedule at step %d: group sparsity %.3f, scheduled %.3f, target %.3f "
                       "(by step %d): the group lasso alone is not keeping up, so lambda is raised and the overdue "
                       "rows closest to zero are projected. A larger lmbda or pruning_steps gives a gentler path; "
                       "opt.status() tells where it stands", at, z / self.n, self.scheduled_rows(at) / self.n,
                       self.target_rows / self.n, end)

    def state(self) -> dict:
        return {"m": float(self.m), "budget": self.budget, "start": self.start}

    def load(self, st: dict) -> None:
        self.m.fill_(float(st["m"]))
        self.budget, self.start = int(st["budget"]), int(st["start"])

    def _warn(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)



def status(opt) -> SparsityStatus:
    """``DHSPG.status()``: reads the current zero rows (a host sync) and the controller's state."""
    n = opt.n_rows
    is_zero = opt.row_stats().xx == 0 if n else None
    zero = int(is_zero.sum()) if n else 0
    target_rows = opt._target_rows(opt.target_group_sparsity)
    per_group = None
    if n and getattr(opt, "group_targets", None) is not None:
        s = opt.layout.group_start
        per_group = tuple((int(is_zero[s[g]:s[g + 1]].sum()), t, int(s[g + 1] - s[g]))
                          for g, t in enumerate(opt._group_rows))
    ctl = opt._control
    start = None if opt.redundant is None else opt.start_pruning_steps + opt.warm_up_steps
    sched = ctl.scheduled_rows(opt.step_count) if ctl is not None else 0.0
    n_red = int(opt.redundant.sum()) if opt.redundant is not None else None
    tol_rows = max(1, math.ceil(opt.tolerance_group_sparsity * n - 1e-9))
    return SparsityStatus(
        step=opt.step_count, group_sparsity=zero / n if n else 0.0,
        target_group_sparsity=opt.target_group_sparsity, tolerance_group_sparsity=opt.tolerance_group_sparsity,
        scheduled_group_sparsity=sched / n if n else 0.0, zero_rows=zero, n_rows=n, pruning_start=start,
        pruning_steps=None if ctl is None else ctl.budget,
        lmbda_scale=1.0 if ctl is None else float(ctl.scale),
        reachable=n > 0 and (n_red is None or n_red >= target_rows),
        behind_schedule=zero < target_rows and sched - zero > tol_rows, reached=n > 0 and zero >= target_rows,
        per_group=per_group)
