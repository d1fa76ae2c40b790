"""The fused row step on CPU: a small C kernel, compiled once with the system C compiler, called via ctypes.

The torch reference needs several passes over every weight (products, reductions along two axes,
then ``mul_`` and ``addcmul_``). These two kernels read x and d once for the reductions and once for
the write-back, as the Triton kernels do on CUDA:

* ``otofx_rows_stats`` -- per-position sums of ``x*x``, ``x*d``, ``d*d`` along each row axis of
  every tensor, folded into rows in position order (:func:`reference.dhspg_rows` then computes
  lambda, the coefficients and the projection decisions, as on every backend). With a
  :class:`Momentum` the sums are of the updated SGD momentum buffer ``d' = d*b1 + alpha*(g + wd*x)``
  (torch's order), computed in the pass and not stored; it writes nothing but its outputs, and can
  set a flag when a sum of ``d'*d'`` is not finite (a NaN or inf in a gradient): the step's
  finite-gradient check, with no pass of its own;
* ``otofx_rows_apply`` -- unless the flag is set, looks up every position's row values, then (with a
  :class:`Momentum`) computes ``d'`` again, bit for bit, and stores it, and writes ``x <- x * (S *
  (1 - a*C)) + ((-a) * d) * S`` in place, the same expression, evaluated in the same order, as
  :func:`reference.apply_rows` (results agree to an ulp: torch's own CPU kernels may fuse a
  multiply-add). Reductions 3 passes (x, d, g), write-back 5 (x, d, g read; x, d written): the 8 of
  torch's foreach SGD, with the gradient check included.

Every tensor is seen as ``[N1, N2, C]`` (contiguous), with rows along N1 (``h1``), along N2
(``h2``), both, or neither: that covers one row axis at any dim and two adjacent row axes (a weight's
output and input channels), which is every ZIG otofx builds. :func:`supported` says when a call
does not fit (other dtypes than float32/float64, mixed dtypes, non-contiguous tensors, other axis
patterns); the dispatcher then uses the torch reference.

Internals:
    * Work is split into units of about ``CHUNK`` elements (whole N1 slabs) that depend only on the
      shapes; threads take units from an atomic counter. A unit writes its own outputs (its N1
      positions, its private N2 partial sums), and partials are added in unit order: the result
      does not depend on the thread count or the schedule (DDP ranks stay bit-identical).
    * Accumulation is in the tensors' dtype (float32 or float64), in 16 independent lanes per slab
      (two 8-lane vectors, then added).
    * The C source is ``csrc/rows.c`` (the per-type body ``csrc/rows_body.h``, included once for
      float and once for double), shipped as package data. The library is built with ``$CC``
      (default ``cc``) into ``$OTOFX_CACHE_DIR`` (default ``~/.cache/otofx``, else the temp dir),
      named by the hash of its source and flags;
      ``-ffp-contract=off`` keeps its rounding the same on every compiler and architecture. No
      compiler: :func:`available` is False and the reference runs.
    * A ``skip`` flag (a float32 CPU tensor, GradScaler's found_inf convention) is read by the C side:
      a skipped write-back returns before touching memory. The reductions always run (the sparsity
      controller reads the rows' norms of x on a skipped step too).
    * Threads: ``torch.get_num_threads()`` of them, from torch's own OpenMP team when torch runs on
      OpenMP (the runtime's ``GOMP_parallel``, looked up among the loaded libraries; no second
      runtime is loaded), else pthreads started per call (tens of microseconds).
      # NB: not pthreads beside torch's team: its threads spin-wait for a while after each of
      torch's parallel ops (the step's torch ops start some), and on 2 cores the kernel's second
      thread then shared a core with a spinning one: 2 threads were no faster than 1.
      ctypes releases the GIL during the calls.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

from .layout import RowLayout, uniform
from .reference import DHSPGConfig, Momentum, RowStats, dhspg_rows, momentum_update, plain_update

log = logging.getLogger("otofx")

CHUNK = 1 << 18  # elements per work unit (at least one whole N1 slab); NB: the h2 partials cost 3 * slab per unit

# NB: the C source lives in csrc/ (package data): rows.c includes rows_body.h once per element type
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("rows.c", "rows_body.h")

_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing"]
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    env = os.environ.get("OTOFX_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "otofx"


def _compile(cc: str, d: Path, lib: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{lib.stem}.{os.getpid()}.so"
    out = subprocess.run([cc, *_FLAGS, "-I", str(_CSRC), "-o", str(tmp), str(_CSRC / "rows.c")],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {out.stderr.strip()[:500]}")
    os.replace(tmp, lib)  # atomic: concurrent builders (DDP ranks) never see half a file


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    text = [(_CSRC / name).read_text() for name in _SOURCES]
    key = hashlib.sha256("\0".join([*text, cc, *_FLAGS, platform.machine(), platform.system()]).encode()).hexdigest()[:16]
    err: Exception | None = None
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / "otofx"):
        lib = d / f"rows_{key}.so"
        if not lib.exists():
            try:
                _compile(cc, d, lib)
            except OSError as e:  # an unwritable directory (or no compiler): try the next one
                err = e
                continue
        dll = ctypes.CDLL(str(lib))
        vp, dbl, i64 = ctypes.c_void_p, ctypes.c_double, ctypes.c_int64
        dll.otofx_rows_stats.argtypes = [ctypes.c_int, vp, vp, i64, vp, i64, vp, vp, vp, dbl, dbl, dbl,
                                         vp, i64, i64, vp, vp, vp, vp, vp, ctypes.c_int]
        dll.otofx_rows_apply.argtypes = [ctypes.c_int, vp, vp, i64, vp, vp, vp, dbl, dbl, dbl, vp, i64, i64, vp, vp,
                                         vp, dbl, vp, vp, ctypes.c_int]
        dll.otofx_set_team.argtypes = [vp]
        team = _openmp_team()
        dll.otofx_set_team(team)
        _state["threads"] = "pthreads" if team is None else "openmp"
        return dll
    raise RuntimeError(f"cannot build the CPU row kernel: {err}")


def _openmp_team() -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch's own threads run on, or None.

    The runtime is found among the libraries this process has loaded (``/proc/self/maps``); None
    where torch's parallel backend is not OpenMP, there is no ``/proc`` (macOS) or no loaded runtime
    exports the entry point: the kernel then starts its own pthreads.
    """
    info = torch.__config__.parallel_info()
    if "parallel backend: OpenMP" not in info:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if line.count(" ") >= 5}
    except OSError:
        return None
    # NB: the runtime torch ships (torch/lib, torch.libs) before any other a library may have loaded
    home = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    foreign = lambda p: not (p.startswith(os.path.join(home, "torch")) or "/torch.libs/" in p)  # noqa: E731
    for path in sorted(paths, key=lambda p: (foreign(p), p)):
        name = os.path.basename(path)
        if not name.startswith(("libgomp", "libomp", "libiomp5")) or ".so" not in name:
            continue
        try:  # NB: the library is loaded already: dlopen hands back the same copy, not a second runtime
            fn = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def thread_pool() -> str | None:
    """Whose threads the kernel runs on when torch has more than one: ``"openmp"`` (torch's own
    OpenMP team) or ``"pthreads"`` (threads the kernel starts per call); None without the kernel."""
    return _state.get("threads") if library() is not None else None


def library():
    """The loaded kernel library, or None when it cannot be built (the reason is logged once)."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as e:  # noqa: BLE001 - any failure means "use the torch reference"
                log.info("otofx.kernels: the CPU kernel is unavailable (%s); using the torch reference", e)
                _state["lib"] = None
        return _state["lib"]


def available() -> bool:
    return library() is not None


def supported(layout: RowLayout, xs, ds, grads=()) -> str | None:
    """None when the CPU kernels can run this call (``grads``: a :class:`Momentum`'s), else the reason."""
    if not xs:
        return "no tensors"
    dt = xs[0].dtype
    if dt not in (torch.float32, torch.float64):
        return f"dtype {dt}"
    for ts in (xs, ds, grads):
        # NB: one cheap check (this runs every step); the reason only when it fails
        if not ts or (ts[0].is_cpu and ts[0].dtype == dt and uniform(ts)):
            continue
        for t in ts:
            if t.dtype != dt:
                return "row tensors of different dtypes"
            if not t.is_cpu:
                return "tensors not on the CPU"
            if not t.is_contiguous():
                return "a non-contiguous row tensor"
    if _plan(layout) is None:
        return "a tensor whose row axes are not one axis or two adjacent ones"
    return None


def _plan(layout: RowLayout):
    """The descriptor and unit tables of ``layout`` (cached on it), or None if some tensor does not fit."""
    if "cpu_plan" in layout.cache:
        return layout.cache["cpu_plan"]
    desc, units, fold, scratch, plain = [], [], [], 0, []
    plan = None
    for t, ids in enumerate(layout.tensor_axes):
        v = layout.views[t]
        offs = [layout.pos_offsets[a] for a in ids]
        if not ids:  # no row reaches it: the plain step, in torch
            plain.append(t)
            continue
        if len(ids) == 1 and v[0] == 1:
            n1, n2, c, h1, h2, p1, p2 = v[1], 1, v[2], 1, 0, offs[0], 0
        elif len(ids) == 1:
            n1, n2, c, h1, h2, p1, p2 = v[0], v[1], v[2], 0, 1, 0, offs[0]
        elif len(ids) == 2 and v[0] == 1 and v[2] == 1:
            n1, n2, c, h1, h2, p1, p2 = v[1], v[3], v[4], 1, 1, offs[0], offs[1]
        else:
            break
        slab = n2 * c
        if n1 * slab == 0:
            continue
        di = len(desc)
        desc.append([t, n1, n2, c, h1, h2, p1, p2])
        step = max(1, CHUNK // slab)
        first = len(units)
        for b in range(0, n1, step):
            units.append([di, b, min(b + step, n1), scratch])
            if h2:
                scratch += 3 * slab
        if h2:
            fold.append([di, first, len(units) - first])
    else:
        as_t = lambda rows, w: torch.tensor(rows, dtype=torch.int64).reshape(-1, w).contiguous()  # noqa: E731
        plan = dict(desc=as_t(desc, 8), units=as_t(units, 4), fold=as_t(fold, 3), scratch=scratch,
                    P=int(layout.pos_row_flat.numel()), plain=tuple(plain))
    layout.cache["cpu_plan"] = plan
    return plan


def _ptrs(layout: RowLayout, key: str, ts) -> torch.Tensor:
    """The data pointers of ``ts`` as an int64 tensor, cached on the layout while they do not change."""
    ptrs = tuple(map(torch.Tensor.data_ptr, ts))
    hit = layout.cache.get(("cpu_ptrs", key))
    if hit is None or hit[0] != ptrs:
        hit = (ptrs, torch.tensor(ptrs, dtype=torch.int64))
        layout.cache[("cpu_ptrs", key)] = hit
    return hit[1]


def _flag_ptr(skip):
    """The address of a float32 flag the C side reads (None: no flag)."""
    if skip is None:
        return None, None
    f = skip if skip.dtype == torch.float32 and skip.is_contiguous() else skip.to(torch.float32).contiguous()
    return f, f.data_ptr()


def _buffer(layout: RowLayout, key: str, dtype, n: int) -> torch.Tensor:
    """A zero-initialised buffer of at least ``n`` elements, cached on the layout."""
    k = (key, dtype)
    buf = layout.cache.get(k)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1), dtype=dtype)
        layout.cache[k] = buf
    return buf


def _args(layout: RowLayout, xs, ds, momentum: Momentum | None) -> tuple:
    """The tensors' pointer tables (int64 tensors, held by the caller for the call) and the momentum
    scalars of one call; one step's two calls share them."""
    xp, dp = _ptrs(layout, "x", xs), _ptrs(layout, "d", ds)
    if momentum is None:
        return xp, dp, None, 0.0, 0.0, 0.0
    return xp, dp, _ptrs(layout, "g", momentum.grads), float(momentum.b1), float(momentum.alpha), float(momentum.wd)


def _stats(layout: RowLayout, xs, ds, momentum: Momentum | None, skip, flag, args=None) -> RowStats:
    plan = _plan(layout)
    dtype = xs[0].dtype
    n, P = layout.n_rows, plan["P"]
    # NB: positions of empty tensors are never written: the cached buffer keeps their zeros
    pos = _buffer(layout, "cpu_pos", dtype, 3 * P)
    scratch = _buffer(layout, "cpu_scratch", dtype, plan["scratch"])
    out = torch.zeros((3, n + 1), dtype=dtype)
    xp, dp, gp, b1, alpha, wd = args or _args(layout, xs, ds, momentum)
    held, fp = _flag_ptr(skip)
    library().otofx_rows_stats(int(dtype == torch.float64), plan["desc"].data_ptr(), plan["units"].data_ptr(),
                               plan["units"].shape[0], plan["fold"].data_ptr(), plan["fold"].shape[0],
                               xp.data_ptr(), dp.data_ptr(), None if gp is None else gp.data_ptr(), b1, alpha,
                               wd, layout.pos_row_flat.data_ptr(),
                               P if layout.axes else 0, n, pos.data_ptr(), scratch.data_ptr(), out.data_ptr(),
                               fp, None if flag is None else flag.data_ptr(), torch.get_num_threads())
    return RowStats(out[0, :n], out[1, :n], out[2, :n])


def row_stats(layout: RowLayout, xs, ds, momentum: Momentum | None = None) -> RowStats:
    """Per-row ``||x||^2``, ``x.d``, ``||d||^2`` (the caller checked :func:`supported`); nothing is written.

    With ``momentum``, the sums are of the updated buffers ``d * b1 + alpha * (g + wd * x)``, which
    ``ds`` still hold the old values of: :func:`apply_rows` with the same ``momentum`` stores them.
    """
    return _stats(layout, xs, ds, momentum, None, None)


def apply_rows(layout: RowLayout, xs, ds, lr, coef: torch.Tensor, scale: torch.Tensor, skip=None,
               momentum: Momentum | None = None, args=None) -> None:
    """In place, as :func:`reference.apply_rows` (the caller checked :func:`supported`); ``lr`` a float
    or a 0-dim CPU tensor, ``skip`` a float32 flag (non-zero: nothing is written). With ``momentum``
    the buffers ``ds`` are first updated (as :func:`row_stats` with it computed them), in the same pass."""
    plan = _plan(layout)
    dtype = xs[0].dtype
    coef, scale = coef.to(dtype).contiguous(), scale.to(dtype).contiguous()
    P = plan["P"]
    pv = _buffer(layout, "cpu_pv", dtype, 2 * P)
    xp, dp, gp, b1, alpha, wd = args or _args(layout, xs, ds, momentum)
    held, fp = _flag_ptr(skip)
    lrt = lr.to(torch.float64).contiguous() if isinstance(lr, torch.Tensor) else None
    library().otofx_rows_apply(int(dtype == torch.float64), plan["desc"].data_ptr(), plan["units"].data_ptr(),
                               plan["units"].shape[0], xp.data_ptr(), dp.data_ptr(),
                               None if gp is None else gp.data_ptr(), b1, alpha, wd,
                               layout.pos_row_flat.data_ptr(), P if layout.axes else 0, layout.n_rows,
                               coef.data_ptr(), scale.data_ptr(), pv.data_ptr(),
                               0.0 if lrt is not None else float(lr), None if lrt is None else lrt.data_ptr(), fp,
                               torch.get_num_threads())
    # NB: the kernel writes through raw pointers, which torch does not see: the version counters say
    # it (the compile backend rebuilds a pruned graph when a watched tensor's version moved)
    increment_version([t for t in (*xs, *ds) if t is not None])
    pl = plan["plain"]
    if pl:  # tensors no row reaches are not in the kernel's tables: torch's foreach ops, under the same flag
        pxs, pds = [xs[t] for t in pl], [ds[t] for t in pl]
        if momentum is not None:
            momentum_update(pxs, pds, Momentum(tuple(momentum.grads[t] for t in pl), b1, alpha, wd), skip)
        plain_update(pxs, pds, lr, None if skip is None else skip == 0)


def rows_step(layout: RowLayout, xs, ds, lr, rule, momentum: Momentum | None = None, skip=None,
              check: bool = False):
    """See :func:`otofx.kernels.rows_step`: the reductions (with the momentum update computed, not
    stored), ``rule``, then one write-back pass, which stores the buffers and x unless the flag is set.

    With ``check``, the flag is set by the reduction pass itself when a sum of the directions' squares
    is not finite (a NaN or inf in a gradient), so no separate pass over the gradients is needed.
    """
    flag = None
    if check or skip is not None:
        flag = torch.zeros((), dtype=torch.float32)
    args = _args(layout, xs, ds, momentum)
    st = _stats(layout, xs, ds, momentum, skip, flag if check else None, args)
    if flag is not None and not check:
        flag.copy_(skip.reshape(()))
    pl = _plan(layout)["plain"]
    if check and pl:  # the few tensors outside the kernel's tables: checked in torch
        from otofx.kernels import nonfinite_flag

        flag = nonfinite_flag([momentum.grads[t] if momentum is not None else ds[t] for t in pl], flag)
    coef, scale = rule(st)
    apply_rows(layout, xs, ds, lr, coef, scale, flag, momentum, args)
    return flag


def dhspg_step(layout: RowLayout, xs, ds, redundant: torch.Tensor, cfg: DHSPGConfig,
               momentum: Momentum | None = None, skip=None) -> torch.Tensor:
    """The fused DHSPG row step; returns the number of zero rows before it (a tensor)."""
    coef, scale, count = dhspg_rows(row_stats(layout, xs, ds, momentum), redundant, cfg)
    apply_rows(layout, xs, ds, cfg.lr, coef, scale, skip, momentum)
    return count


def scale_step(layout: RowLayout, xs, ds, lr, scale: torch.Tensor, skip=None) -> None:
    """``x <- (x - lr*d) * S`` in place (HESSO)."""
    apply_rows(layout, xs, ds, lr, torch.zeros(layout.n_rows, dtype=xs[0].dtype), scale, skip)
