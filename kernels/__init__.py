"""otofx.kernels: the fused row step of DHSPG and HESSO over a precomputed row layout.

Public API:

* :func:`build_layout` ``(shapes, groups, device) -> RowLayout`` -- once per optimizer;
* :func:`row_stats` ``(layout, xs, ds=None) -> RowStats`` -- per-row ``||x||^2``, ``x.d``, ``||d||^2``;
* :func:`dhspg_step` ``(layout, xs, ds, redundant, cfg, backend=None, momentum=None, skip=None) -> zero-row count``
  -- in place, ``x <- x - a*d`` plus OTO.md's penalty and half-space projection on the redundant
  rows; with a :class:`Momentum`, ``ds`` are SGD momentum buffers, updated first (the C kernel does
  it in its reduction pass, the others with foreach ops);
* :func:`scale_step` ``(layout, xs, ds, lr, scale, backend=None, skip=None)`` -- in place,
  ``x <- (x - a*d) * S`` with S the smallest scale among an element's rows (HESSO).
* the same steps in pieces, for rows whose elements are spread over several processes
  (``otofx.distributed``: the per-row sums of every shard are added up between the pieces):
  :func:`stats` ``(layout, xs, ds, backend=None) -> RowStats`` on the chosen backend,
  :func:`dhspg_rows` ``(stats, redundant, cfg) -> (coef, scale, zero count)`` and
  :func:`apply` ``(layout, xs, ds, lr, coef, scale, backend=None, skip=None)`` (the write-back).
* :func:`rows_step` ``(layout, xs, ds, lr, rule, backend=None, momentum=None, skip=None, check=False) -> flag``
  -- the row step with a decision ``rule(stats) -> (coef, scale)`` made between its reductions and
  its write-back (the optimizers' sparsity controller reads the rows' norms there), and optionally
  the NaN/inf check of the gradients (the C kernel does it in its reduction pass).

Both steps take ``skip``, a float32 0-dim flag on the device (torch's ``found_inf``): non-zero means
"change nothing", decided on the device, so a step never waits for the host. ``lr`` may be a float
or a 0-dim tensor on the device (CUDA-graph capture with a changing learning rate).

``xs`` are the layout's tensors in order (updated in place), ``ds`` their search directions.

Backends: ``"triton"`` (the CUDA path; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"cpu"``
(a C kernel for CPU tensors, built once with the system C compiler) and ``"torch"`` (the reference,
any device). ``backend=None`` reads ``OTOFX_KERNEL`` (``triton``, ``cpu``, ``torch`` or ``auto``, the
default): auto picks Triton for CUDA tensors it supports, the C kernel for CPU tensors it supports
(when a compiler is there), and the torch reference otherwise.

Internals:
    * Backends are entries of :data:`TABLE` (name, device types served by ``auto``, availability,
      per-call support, and the two steps); a new backend is one more entry.
    * The layout is described in :mod:`.layout`, the reference in :mod:`.reference`, the kernels in
      :mod:`.triton_rows` (imported lazily: the CPU path never needs Triton) and :mod:`.cpu_rows`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from otofx.errors import OTOError

from .layout import LayoutError, RowLayout, build_layout
from . import reference
from .reference import DHSPGConfig, Momentum, RowStats, apply_rows, momentum_update, row_stats

log = logging.getLogger("otofx")

# -- the backends, as table entries -------------------------------------------------------------
#
# Each entry says when it can run (``available``: None or why not; ``supported``: None or why this
# call does not fit) and how (``dhspg``/``scale``, which take the same arguments on every backend).
# ``auto`` walks the table in order and takes the first entry that serves the tensors' device type,
# is available and supports the call; a forced backend must be available and support the call.


def _torch_dhspg(layout, xs, ds, redundant, cfg, momentum, skip):
    if momentum is not None:
        momentum_update(xs, ds, momentum, skip)
    stats = row_stats(layout, xs, ds)
    coef, scale, count = reference.dhspg_rows(stats, redundant, cfg)
    apply_rows(layout, xs, ds, cfg.lr, coef, scale, skip)
    return count


def _torch_scale(layout, xs, ds, lr, scale, skip):
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    apply_rows(layout, xs, ds, lr, torch.zeros(layout.n_rows, dtype=acc, device=layout.device), scale.to(acc), skip)


def _torch_stats(layout, xs, ds):
    return row_stats(layout, xs, ds)


def _torch_apply(layout, xs, ds, lr, coef, scale, skip):
    apply_rows(layout, xs, ds, lr, coef, scale, skip)


def _triton_stats(layout, xs, ds):
    from .triton_rows import row_stats as stats

    return stats(layout, xs, ds)


def _triton_apply(layout, xs, ds, lr, coef, scale, skip):
    from .triton_rows import apply_rows as app

    app(layout, xs, ds, lr, coef, scale, skip)


def _cpu_stats(layout, xs, ds):
    from .cpu_rows import row_stats as stats

    return stats(layout, xs, ds)


def _cpu_apply(layout, xs, ds, lr, coef, scale, skip):
    from .cpu_rows import apply_rows as app

    app(layout, xs, ds, lr, coef, scale, skip)


def _triton_available() -> str | None:
    return None if triton_available() else "triton cannot be imported"


def _triton_supported(xs, ds, layout, grads) -> str | None:
    from .triton_rows import supported

    why = supported(xs, ds)
    if why is None and xs[0].device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "CPU tensors need TRITON_INTERPRET=1 (the interpreter)"
    return why


def _triton_dhspg(layout, xs, ds, redundant, cfg, momentum, skip):
    from .triton_rows import dhspg_step as step

    if momentum is not None:
        momentum_update(xs, ds, momentum, skip)
    return step(layout, xs, ds, redundant, cfg, skip)


def _triton_scale(layout, xs, ds, lr, scale, skip):
    from .triton_rows import scale_step as step

    step(layout, xs, ds, lr, scale, skip)


def _cpu_available() -> str | None:
    return None if cpu_available() else "the C kernel cannot be built (no working C compiler, see the log)"


def _cpu_supported(xs, ds, layout, grads) -> str | None:
    from . import cpu_rows

    return "no layout given" if layout is None else cpu_rows.supported(layout, xs, ds, grads)


def _cpu_dhspg(layout, xs, ds, redundant, cfg, momentum, skip):
    from .cpu_rows import dhspg_step as step

    return step(layout, xs, ds, redundant, cfg, momentum, skip)  # the C kernel updates momentum itself


def _cpu_scale(layout, xs, ds, lr, scale, skip):
    from .cpu_rows import scale_step as step

    step(layout, xs, ds, lr, scale, skip)


def _cpu_rows(layout, xs, ds, lr, rule, momentum, skip, check):
    from .cpu_rows import rows_step as step

    return step(layout, xs, ds, lr, rule, momentum, skip, check)


def nonfinite_flag(ts, skip: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 0-dim flag on the tensors' device: 1.0 when some tensor of ``ts`` holds NaN or inf
    (an L2 norm per (device, dtype) group: no sync), or when ``skip`` is non-zero."""
    by_key: dict = {}
    for t in ts:
        by_key.setdefault((t.device, t.dtype), []).append(t)
    dev = next(iter(by_key))[0] if by_key else (skip.device if skip is not None else torch.device("cpu"))
    sums = [torch.stack(torch._foreach_norm(g, dtype=torch.float32 if k[1] in (torch.float16, torch.bfloat16)
                                            else None)).sum().to(dev, torch.float32) for k, g in by_key.items()]
    flag = (torch.isfinite(torch.stack(sums).sum()).logical_not().to(torch.float32) if sums
            else torch.zeros((), dtype=torch.float32, device=dev))
    return flag if skip is None else torch.maximum(flag, skip.reshape(()).to(dev, torch.float32))


def dhspg_rows(stats: RowStats, redundant: torch.Tensor, cfg: DHSPGConfig, backend: str | None = None,
               layout: RowLayout | None = None):
    """OTO.md step 3 per row from given sums: ``(coef, scale, zero count)`` (see
    :func:`reference.dhspg_rows`). On CUDA with Triton (``backend`` None, ``"auto"`` or ``"triton"``;
    None reads ``OTOFX_KERNEL``) and the rows' ``layout`` (its cache holds the kernel's device
    constants) one kernel makes every decision; elsewhere the torch reference does."""
    backend = backend or os.environ.get("OTOFX_KERNEL", "auto")
    if layout is not None and backend in ("auto", "triton") and stats.xx.is_cuda and triton_available():
        from .triton_rows import dhspg_rows as rows

        return rows(stats, redundant, cfg, layout)
    return reference.dhspg_rows(stats, redundant, cfg)


def sort_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(key, stable=True)`` of a 1-D vector of non-negative values (inf and NaN allowed):
    ``(values, order)``, ties in index order.

    # NB: on the CPU, for float32, numpy's SIMD sort of 64-bit keys (the value's bits above the index)
    # gives the same order about 10x faster than torch's CPU sort (11K rows: 30 us against 430 us,
    # a cost the sparsity controller pays every step). The bits of non-negative floats order as the
    # floats do (+inf above every finite value, NaN above +inf: torch's order too).
    """
    n = key.numel()
    if key.device.type != "cpu" or key.dtype != torch.float32 or key.dim() != 1 or n >= 2 ** 31:
        return torch.sort(key, stable=True)
    import numpy as np

    bits = key.contiguous().view(torch.int32).numpy().astype(np.int64)
    if n and int(bits.min()) < 0:  # a negative value (or -0.0): not this function's case
        return torch.sort(key, stable=True)
    comp = np.sort((bits << 32) | np.arange(n, dtype=np.int64))
    order = torch.from_numpy(comp & 0xFFFFFFFF)
    # the values are the keys' high halves (a gather through torch's index costs ~6x more)
    values = torch.from_numpy((comp >> 32).astype(np.int32)).view(torch.float32)
    return values, order


def rank_rows(order: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse permutation of ``order`` (``rank[order[i]] = i``: each row's place in the sort);
    ``index``: ``arange(n)`` on order's device, if the caller keeps one.

    # NB: on the CPU numpy's fancy assignment, ~4x cheaper than torch's index_put at 11K rows
    """
    if order.device.type == "cpu" and order.dtype == torch.int64 and order.dim() == 1:
        import numpy as np

        rank = torch.empty_like(order)
        rank.numpy()[order.numpy()] = np.arange(order.numel(), dtype=np.int64)
        return rank
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype) if index is None else index
    return rank


def _pieces_rows(entry_stats, entry_apply):
    """A backend's rows step from its stats and apply pieces (the momentum update and the check first)."""
    def rows(layout, xs, ds, lr, rule, momentum, skip, check):
        flag = skip
        if check:
            flag = nonfinite_flag(momentum.grads if momentum is not None else ds, skip)
        if momentum is not None:
            momentum_update(xs, ds, momentum, flag)
        coef, scale = rule(entry_stats(layout, xs, ds))
        entry_apply(layout, xs, ds, lr, coef, scale, flag)
        return flag
    return rows


@dataclass(frozen=True)
class Backend:
    """One way to run the row steps."""

    name: str
    devices: tuple  # the device types ``auto`` picks it for
    available: Callable[[], "str | None"]
    supported: Callable[..., "str | None"]  # (xs, ds, layout, grads)
    dhspg: Callable  # (layout, xs, ds, redundant, cfg, momentum, skip) -> zero-row count before the step
    scale: Callable  # (layout, xs, ds, lr, scale, skip)
    stats: Callable = None  # (layout, xs, ds) -> RowStats over these tensors only
    apply: Callable = None  # (layout, xs, ds, lr, coef, scale, skip): the write-back of given row values
    # (layout, xs, ds, lr, rule, momentum, skip, check) -> flag: see rows_step (None: from stats and apply)
    rows: Callable = None


TABLE: tuple = (
    Backend("triton", ("cuda",), _triton_available, _triton_supported, _triton_dhspg, _triton_scale,
            _triton_stats, _triton_apply),
    Backend("cpu", ("cpu",), _cpu_available, _cpu_supported, _cpu_dhspg, _cpu_scale, _cpu_stats, _cpu_apply,
            _cpu_rows),
    Backend("torch", ("*",), lambda: None, lambda xs, ds, layout, grads: None, _torch_dhspg, _torch_scale,
            _torch_stats, _torch_apply),
)
_BY_NAME = {b.name: b for b in TABLE}
BACKENDS = ("auto", *_BY_NAME)


def triton_available() -> bool:
    try:
        from . import triton_rows  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no Triton"
        log.debug("otofx.kernels: triton unavailable: %s", e)
        return False
    return True


def cpu_available() -> bool:
    from . import cpu_rows

    return cpu_rows.available()


def choose_backend(xs, ds, backend: str | None = None, layout: RowLayout | None = None, grads=()) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"`` for this call (see the module docstring).

    ``layout`` is needed to consider the C kernel (it supports most, not all, row patterns);
    ``grads`` are a :class:`Momentum`'s, which it reads too.
    """
    backend = backend or os.environ.get("OTOFX_KERNEL", "auto")
    if backend not in BACKENDS:
        raise OTOError(f"unknown kernel backend {backend!r}: use one of {BACKENDS} (argument or OTOFX_KERNEL)")
    if not xs:
        return "torch"
    if backend != "auto":
        entry = _BY_NAME[backend]
        why = entry.available()
        if why is not None:
            raise OTOError(f"backend {backend!r} requested but {why}: use 'torch'")
        why = entry.supported(xs, ds, layout, grads)
        if why is not None:
            raise OTOError(f"backend {backend!r} cannot run this step ({why}): use backend 'torch'")
        return backend
    device = xs[0].device.type
    for entry in TABLE:
        if device not in entry.devices and "*" not in entry.devices:
            continue
        why = entry.available() or entry.supported(xs, ds, layout, grads)
        if why is None:
            return entry.name
        log.debug("otofx.kernels: %s not used (%s)", entry.name, why)
    return "torch"


def dhspg_step(layout: RowLayout, xs, ds, redundant: torch.Tensor, cfg: DHSPGConfig,
               backend: str | None = None, momentum: Momentum | None = None,
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """The fused DHSPG row step, in place; returns the number of zero rows before it (a tensor).

    ``skip``: None, or a float32 0-dim flag on the layout's device (GradScaler's ``found_inf``
    convention); when it is non-zero the step changes nothing (x, and the momentum buffers), which
    every backend decides on the device.
    """
    chosen = choose_backend(xs, ds, backend, layout, () if momentum is None else momentum.grads)
    return _BY_NAME[chosen].dhspg(layout, xs, ds, redundant, cfg, momentum, skip)


def scale_step(layout: RowLayout, xs, ds, lr, scale: torch.Tensor, backend: str | None = None,
               skip: torch.Tensor | None = None) -> None:
    """``x <- (x - lr*d) * S`` in place, S the smallest ``scale`` among each element's rows (``skip``:
    as in :func:`dhspg_step`)."""
    _BY_NAME[choose_backend(xs, ds, backend, layout)].scale(layout, xs, ds, lr, scale, skip)


def rows_step(layout: RowLayout, xs, ds, lr, rule: Callable, backend: str | None = None,
              momentum: Momentum | None = None, skip: torch.Tensor | None = None, check: bool = False):
    """The row step with the caller's decision between the reductions and the write-back, in place.

    ``rule(stats) -> (coef, scale)`` gets the per-row sums of x and of the directions (with a
    :class:`Momentum`, of the updated buffers) before the step and returns the row values that
    :func:`apply` writes back. With ``check``, a NaN or inf in the gradients (``momentum.grads``;
    without momentum, ``ds``) makes the step change nothing, as a non-zero ``skip`` does. Returns the
    step's flag (``skip`` combined with the check; None when neither applies), decided on the device.

    # NB: ``rule`` runs whether or not the step is skipped (the sums of x are right either way; those
    # of the directions may hold NaN then). The C kernel checks in its reduction pass and stores the
    # momentum buffers in its write-back pass, so a skipped step writes nothing and the gradients are
    # read once for the check; the other backends check and update the buffers first.
    """
    grads = () if momentum is None else momentum.grads
    entry = _BY_NAME[choose_backend(xs, ds, backend, layout, grads)]
    rows = entry.rows or _pieces_rows(entry.stats, entry.apply)
    return rows(layout, xs, ds, lr, rule, momentum, skip, check)


def stats(layout: RowLayout, xs, ds, backend: str | None = None) -> RowStats:
    """Per-row ``||x||^2``, ``x.d``, ``||d||^2`` over ``xs``/``ds`` on the chosen backend (the first
    piece of a step whose rows span several processes: these are one shard's partial sums)."""
    return _BY_NAME[choose_backend(xs, ds, backend, layout)].stats(layout, xs, ds)


def apply(layout: RowLayout, xs, ds, lr, coef: torch.Tensor, scale: torch.Tensor, backend: str | None = None,
          skip: torch.Tensor | None = None) -> None:
    """In place, ``x <- x * (S * (1 - lr*C)) + (-lr * d) * S`` (C: the sum of ``coef``, S: the minimum of
    ``scale`` over an element's rows), on the chosen backend (``skip``: as in :func:`dhspg_step`)."""
    _BY_NAME[choose_backend(xs, ds, backend, layout)].apply(layout, xs, ds, lr, coef, scale, skip)


__all__ = ["RowLayout", "RowStats", "DHSPGConfig", "Momentum", "LayoutError", "build_layout", "row_stats", "dhspg_step",
           "scale_step", "stats", "apply", "rows_step", "nonfinite_flag", "sort_rows", "rank_rows", "dhspg_rows", "choose_backend", "triton_available", "cpu_available", "BACKENDS", "Backend", "TABLE"]
