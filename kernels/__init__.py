"""otofx.kernels: the fused row step of DHSPG and HESSO over a precomputed row layout.

Public API:

* :func:`build_layout` ``(shapes, groups, device) -> RowLayout`` -- once per optimizer;
* :func:`row_stats` ``(layout, xs, ds=None) -> RowStats`` -- per-row ``||x||^2``, ``x.d``, ``||d||^2``;
* :func:`dhspg_step` ``(layout, xs, ds, redundant, cfg, backend=None, momentum=None) -> zero-row count``
  -- in place, ``x <- x - a*d`` plus OTO.md's penalty and half-space projection on the redundant
  rows; with a :class:`Momentum`, ``ds`` are SGD momentum buffers, updated first (the C kernel does
  it in its reduction pass, the others with foreach ops);
* :func:`scale_step` ``(layout, xs, ds, lr, scale, backend=None)`` -- in place, ``x <- (x - a*d) * S``
  with S the smallest scale among an element's rows (HESSO).

``xs`` are the layout's tensors in order (updated in place), ``ds`` their search directions.

Backends: ``"triton"`` (the CUDA path; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"cpu"``
(a C kernel for CPU tensors, built once with the system C compiler) and ``"torch"`` (the reference,
any device). ``backend=None`` reads ``OTOFX_KERNEL`` (``triton``, ``cpu``, ``torch`` or ``auto``, the
default): auto picks Triton for CUDA tensors it supports, the C kernel for CPU tensors it supports
(when a compiler is there), and the torch reference otherwise.

Internals:
    * The layout is described in :mod:`.layout`, the reference in :mod:`.reference`, the kernels in
      :mod:`.triton_rows` (imported lazily: the CPU path never needs Triton) and :mod:`.cpu_rows`.
"""
from __future__ import annotations

import logging
import os

import torch

from otofx.errors import OTOError

from .layout import LayoutError, RowLayout, build_layout
from .reference import DHSPGConfig, Momentum, RowStats, apply_rows, dhspg_rows, momentum_update, row_stats

log = logging.getLogger("otofx")

BACKENDS = ("auto", "triton", "cpu", "torch")


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
    if backend == "torch" or not xs:
        return "torch"
    if backend == "cpu":
        from . import cpu_rows

        why = "no layout given" if layout is None else cpu_rows.supported(layout, xs, ds, grads)
        if why is not None:
            raise OTOError(f"backend 'cpu' cannot run this step ({why}): use backend 'torch'")
        if not cpu_rows.available():
            raise OTOError("backend 'cpu' requested but the C kernel cannot be built (no working C compiler, "
                           "see the log): use 'torch'")
        return "cpu"
    if backend == "triton":
        if not triton_available():
            raise OTOError("backend 'triton' requested but triton cannot be imported: install triton or use 'torch'")
        from .triton_rows import supported

        why = supported(xs, ds)
        if why is not None:
            raise OTOError(f"backend 'triton' cannot run this step ({why}): use backend 'torch'")
        if xs[0].device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise OTOError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the interpreter); use 'torch'")
        return "triton"
    if xs[0].device.type == "cuda" and triton_available():
        from .triton_rows import supported

        why = supported(xs, ds)
        if why is None:
            return "triton"
        log.debug("otofx.kernels: torch reference used (%s)", why)
    if xs[0].device.type == "cpu" and layout is not None:
        from . import cpu_rows

        why = cpu_rows.supported(layout, xs, ds, grads)
        if why is None and cpu_rows.available():
            return "cpu"
        log.debug("otofx.kernels: torch reference used (%s)", why or "no C compiler")
    return "torch"


def dhspg_step(layout: RowLayout, xs, ds, redundant: torch.Tensor, cfg: DHSPGConfig,
               backend: str | None = None, momentum: Momentum | None = None) -> torch.Tensor:
    """The fused DHSPG row step, in place; returns the number of zero rows before it (a tensor)."""
    chosen = choose_backend(xs, ds, backend, layout, () if momentum is None else momentum.grads)
    if chosen == "cpu":
        from .cpu_rows import dhspg_step as step

        return step(layout, xs, ds, redundant, cfg, momentum)
    if momentum is not None:
        momentum_update(xs, ds, momentum)
    if chosen == "triton":
        from .triton_rows import dhspg_step as step

        return step(layout, xs, ds, redundant, cfg)
    stats = row_stats(layout, xs, ds)
    coef, scale, count = dhspg_rows(stats, redundant, cfg)
    apply_rows(layout, xs, ds, cfg.lr, coef, scale)
    return count


def scale_step(layout: RowLayout, xs, ds, lr: float, scale: torch.Tensor, backend: str | None = None) -> None:
    """``x <- (x - lr*d) * S`` in place, S the smallest ``scale`` among each element's rows."""
    chosen = choose_backend(xs, ds, backend, layout)
    if chosen == "triton":
        from .triton_rows import scale_step as step

        step(layout, xs, ds, lr, scale)
        return
    if chosen == "cpu":
        from .cpu_rows import scale_step as step

        step(layout, xs, ds, lr, scale)
        return
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    apply_rows(layout, xs, ds, lr, torch.zeros(layout.n_rows, dtype=acc, device=layout.device), scale.to(acc))


__all__ = ["RowLayout", "RowStats", "DHSPGConfig", "Momentum", "LayoutError", "build_layout", "row_stats", "dhspg_step",
           "scale_step", "choose_backend", "triton_available", "cpu_available", "BACKENDS"]
