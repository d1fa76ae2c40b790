"""The fused row step on CPU: a small C kernel, compiled once with the system C compiler, called via ctypes.

The torch reference needs several passes over every weight (products, reductions along two axes,
then ``mul_`` and ``addcmul_``). These two kernels read x and d once for the reductions and once for
the write-back, as the Triton kernels do on CUDA:

* ``otofx_rows_stats`` -- per-position sums of ``x*x``, ``x*d``, ``d*d`` along each row axis of
  every tensor, folded into rows in position order (:func:`reference.dhspg_rows` then computes
  lambda, the coefficients and the projection decisions, as on every backend). With a
  :class:`Momentum` it first updates d, the SGD momentum buffer, in the same pass
  (``d <- d*b1 + alpha*(g + wd*x)``, torch's order), saving a read and a write of every buffer;
* ``otofx_rows_apply`` -- looks up every position's row values, then ``x <- x * (S * (1 - a*C)) +
  ((-a) * d) * S`` in place, the same
  expression, evaluated in the same order, as :func:`reference.apply_rows` (results agree to an ulp:
  torch's own CPU kernels may fuse a multiply-add).

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
    * Accumulation is in the tensors' dtype (float32 or float64), in 8 independent lanes per slab.
    * The library is built with ``$CC`` (default ``cc``) into ``$OTOFX_CACHE_DIR`` (default
      ``~/.cache/otofx``, else the temp dir), named by the hash of its source and flags;
      ``-ffp-contract=off`` keeps its rounding the same on every compiler and architecture. No
      compiler: :func:`available` is False and the reference runs.
    * # NB: ctypes releases the GIL during the calls; the C side starts ``torch.get_num_threads()``
      pthreads per call (tens of microseconds), so no OpenMP runtime is mixed with torch's.
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

from .layout import RowLayout
from .reference import DHSPGConfig, Momentum, RowStats, dhspg_rows

log = logging.getLogger("otofx")

CHUNK = 1 << 16  # elements per work unit (at least one whole N1 slab)

_HEAD = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#define MAXT 64
/* desc: per tensor 8 int64: tensor, n1, n2, c, h1, h2, pos1, pos2
   unit: per unit 4 int64: desc, i1 begin, i1 end, scratch offset (h2 partials: 3 * n2 * c values)
   fold: per h2 desc 3 int64: desc, first unit, number of units */
enum { D_T, D_N1, D_N2, D_C, D_H1, D_H2, D_P1, D_P2, D_W };
enum { U_D, U_B, U_E, U_S, U_W };

typedef struct Job {
    void (*fn)(struct Job *, int64_t);
    int64_t n, next;
    const int64_t *desc, *units, *fold, *xptr, *dptr, *gptr;
    void *pos;     /* stats: [3, P] per-position sums; apply: [2, P] (coef, scale) */
    void *scratch; /* stats: the h2 partials of every unit */
    int64_t P, nrows;
    const int64_t *pos_row; /* [P]: the row of every position (nrows: none) */
    void *rows;             /* stats: [3, nrows + 1] per-row sums */
    const void *coef, *scale; /* apply: [nrows] */
    double lr, b1, alpha, wd; /* stats with gptr: d <- d * b1 + alpha * (g + wd * x) first */
} Job;

static void *worker(void *arg) {
    Job *j = (Job *)arg;
    for (;;) {
        int64_t u = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (u >= j->n) break;
        j->fn(j, u);
    }
    return 0;
}

static void run(Job *j, int nthreads) {
    pthread_t th[MAXT];
    int started[MAXT];
    int k;
    j->next = 0;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads > j->n) nthreads = (int)j->n;
    for (k = 1; k < nthreads; k++) started[k] = pthread_create(&th[k], 0, worker, j) == 0;
    worker(j);
    for (k = 1; k < nthreads; k++)
        if (started[k]) pthread_join(th[k], 0);
}

typedef float vf32 __attribute__((vector_size(32)));  /* 8 lanes */
typedef double vf64 __attribute__((vector_size(64)));

/* the streams run ahead of the hardware prefetcher on large tensors (4 KiB of floats ahead) */
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + 4096)
#define BLK 32  /* elements per prefetch step of the write-back (two cache lines of floats) */
#define LINE 16 /* a multiple of 8 elements spanning at least a 64-byte line */
#define GATHER 16384  /* positions per work item of the gather */

/* x86-64 Linux, GCC: an AVX2 copy of each loop besides the baseline one, picked when the library loads */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
"""

# one copy per element type: {T} the type, {S} the suffix, {V} its 8-lane vector type
_BODY = r"""
static inline __attribute__((always_inline)) {V} load_{S}(const {T} *p) { {V} v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void store_{S}({T} *p, {V} v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) {T} lanes_{S}({V} v) {
    {T} s = 0;
    int l;
    for (l = 0; l < 8; l++) s += v[l];
    return s;
}

/* one N1 slab: sums of x*x, x*d, d*d (and the h2 partials); with MOM, d is first updated in place
   as an SGD momentum buffer (torch's order: g + wd*x, then d*b1, then + alpha*g) */
static inline __attribute__((always_inline)) void stats_slab_{S}(
        const {T} *restrict xr, {T} *restrict dr, const {T} *restrict gr, int64_t L,
        {T} *restrict s0, {T} *restrict s1, {T} *restrict s2, const int H2, const int MOM, const int WD,
        {T} b1, {T} al, {T} wd, {T} out[3]) {
    {V} axx = {0}, axd = {0}, add = {0};
    {T} txx = 0, txd = 0, tdd = 0;
    int64_t k;
    for (k = 0; k + 8 <= L; k += 8) {
        if ((k & (LINE - 1)) == 0) {  /* once per cache line and stream */
            PREFETCH(xr + k);
            PREFETCH(dr + k);
            if (MOM) PREFETCH(gr + k);
        }
        {V} xv = load_{S}(xr + k), dv;
        if (MOM) {
            {V} gv = load_{S}(gr + k);
            if (WD) gv = gv + wd * xv;
            dv = load_{S}(dr + k) * b1;
            dv = dv + al * gv;
            store_{S}(dr + k, dv);
        } else {
            dv = load_{S}(dr + k);
        }
        {V} a = xv * xv, b = xv * dv, c = dv * dv;
        if (H2) {
            store_{S}(s0 + k, load_{S}(s0 + k) + a);
            store_{S}(s1 + k, load_{S}(s1 + k) + b);
            store_{S}(s2 + k, load_{S}(s2 + k) + c);
        }
        axx += a; axd += b; add += c;
    }
    for (; k < L; k++) {
        {T} xv = xr[k], dv;
        if (MOM) {
            {T} gv = gr[k];
            if (WD) gv = gv + wd * xv;
            dv = dr[k] * b1;
            dv = dv + al * gv;
            dr[k] = dv;
        } else {
            dv = dr[k];
        }
        {T} a = xv * xv, b = xv * dv, c = dv * dv;
        if (H2) { s0[k] += a; s1[k] += b; s2[k] += c; }
        txx += a; txd += b; tdd += c;
    }
    out[0] = lanes_{S}(axx) + txx;
    out[1] = lanes_{S}(axd) + txd;
    out[2] = lanes_{S}(add) + tdd;
}

CLONES static void stats_unit_{S}(Job *j, int64_t u) {
    const int64_t *un = j->units + u * U_W, *de = j->desc + un[U_D] * D_W;
    const int64_t L = de[D_N2] * de[D_C], P = j->P, h1 = de[D_H1], h2 = de[D_H2];
    const {T} *x = (const {T} *)(intptr_t)j->xptr[de[D_T]];
    {T} *d = ({T} *)(intptr_t)j->dptr[de[D_T]];
    const {T} *g = j->gptr ? (const {T} *)(intptr_t)j->gptr[de[D_T]] : 0;
    const {T} b1 = ({T})j->b1, al = ({T})j->alpha, wd = ({T})j->wd;
    const int mom = g != 0, wdf = mom && j->wd != 0;
    {T} *pos = ({T} *)j->pos, *s0 = 0, *s1 = 0, *s2 = 0, out[3];
    int64_t i1;
    if (h2) {
        s0 = ({T} *)j->scratch + un[U_S];
        s1 = s0 + L;
        s2 = s1 + L;
        memset(s0, 0, 3 * L * sizeof({T}));
    }
    for (i1 = un[U_B]; i1 < un[U_E]; i1++) {
        const {T} *xr = x + i1 * L, *gr = g ? g + i1 * L : 0;
        {T} *dr = d + i1 * L;
        if (h2) {
            if (wdf) stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 1, 1, 1, b1, al, wd, out);
            else if (mom) stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 1, 1, 0, b1, al, wd, out);
            else stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 1, 0, 0, b1, al, wd, out);
        } else {
            if (wdf) stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 0, 1, 1, b1, al, wd, out);
            else if (mom) stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 0, 1, 0, b1, al, wd, out);
            else stats_slab_{S}(xr, dr, gr, L, s0, s1, s2, 0, 0, 0, b1, al, wd, out);
        }
        if (h1) {
            pos[de[D_P1] + i1] = out[0];
            pos[P + de[D_P1] + i1] = out[1];
            pos[2 * P + de[D_P1] + i1] = out[2];
        }
    }
}

/* the h2 partials of a tensor's units, added in unit order (reads each partial once, in order) */
static void fold_{S}(Job *j, int64_t f) {
    const int64_t *fo = j->fold + f * 3, *de = j->desc + fo[0] * D_W;
    const int64_t n2 = de[D_N2], C = de[D_C], L = n2 * C, P = j->P;
    {T} *pos = ({T} *)j->pos;
    int64_t i2, u, c;
    int s;
    for (s = 0; s < 3; s++) {
        {T} *restrict out = pos + s * P + de[D_P2];
        for (i2 = 0; i2 < n2; i2++) out[i2] = 0;
        for (u = fo[1]; u < fo[1] + fo[2]; u++) {
            const {T} *restrict p = (const {T} *)j->scratch + j->units[u * U_W + U_S] + s * L;
            if (C == 1) {
                for (i2 = 0; i2 < n2; i2++) out[i2] += p[i2];
            } else {
                for (i2 = 0; i2 < n2; i2++) {
                    {T} acc = out[i2];
                    for (c = 0; c < C; c++) acc += p[i2 * C + c];
                    out[i2] = acc;
                }
            }
        }
    }
}

/* positions into rows, for one of the three sums (in position order) */
static void rows_fold_{S}(Job *j, int64_t s) {
    const {T} *restrict pos = (const {T} *)j->pos + s * j->P;
    {T} *restrict rows = ({T} *)j->rows + s * (j->nrows + 1);
    int64_t p;
    for (p = 0; p < j->P; p++) rows[j->pos_row[p]] += pos[p];
}

/* the coefficient and scale of every position's row (0 and 1 where no row owns it) */
static void gather_{S}(Job *j, int64_t chunk) {
    const {T} *coef = (const {T} *)j->coef, *scale = (const {T} *)j->scale;
    {T} *pv = ({T} *)j->pos;
    const int64_t P = j->P, b = chunk * GATHER, e = b + GATHER < P ? b + GATHER : P;
    int64_t p;
    for (p = b; p < e; p++) {
        const int64_t r = j->pos_row[p];
        pv[p] = r == j->nrows ? 0 : coef[r];
        pv[P + p] = r == j->nrows ? 1 : scale[r];
    }
}

/* x <- x * f + ((-lr) * d) * s, f = s * (1 - lr * c): the reference's expression and order */
CLONES static void apply_unit_{S}(Job *j, int64_t u) {
    const int64_t *un = j->units + u * U_W, *de = j->desc + un[U_D] * D_W;
    const int64_t n2 = de[D_N2], C = de[D_C], L = n2 * C, P = j->P, h1 = de[D_H1], h2 = de[D_H2];
    {T} *x = ({T} *)(intptr_t)j->xptr[de[D_T]];
    const {T} *d = (const {T} *)(intptr_t)j->dptr[de[D_T]], *pv = (const {T} *)j->pos;
    const {T} lr = ({T})j->lr, nlr = ({T})(-j->lr), one = 1;
    const {T} *c2 = pv + de[D_P2], *sc2 = pv + P + de[D_P2];
    {T} *wide = 0;
    int64_t i1, i2, k, k0, c;
    if (h2 && C > 1) {  /* the N2 values repeated over their C elements: one contiguous loop per slab */
        wide = ({T} *)malloc(2 * L * sizeof({T}));
        if (wide) {
            for (i2 = 0; i2 < n2; i2++)
                for (c = 0; c < C; c++) {
                    wide[i2 * C + c] = c2[i2];
                    wide[L + i2 * C + c] = sc2[i2];
                }
        }
    }
    for (i1 = un[U_B]; i1 < un[U_E]; i1++) {
        {T} *restrict xr = x + i1 * L;
        const {T} *restrict dr = d + i1 * L;
        {T} c1 = 0, s1 = 1;
        if (h1) {
            c1 = pv[de[D_P1] + i1];
            s1 = pv[P + de[D_P1] + i1];
        }
        if (h2 && (C == 1 || wide)) {
            const {T} *restrict cw = wide ? wide : c2, *restrict sw = wide ? wide + L : sc2;
            for (k0 = 0; k0 < L; k0 += BLK) {
                const int64_t k1 = k0 + BLK < L ? k0 + BLK : L;
                PREFETCH(xr + k0); PREFETCH(xr + k0 + BLK / 2); PREFETCH(dr + k0); PREFETCH(dr + k0 + BLK / 2);
                if (h1) {
                    for (k = k0; k < k1; k++) {
                        {T} cc = c1 + cw[k], ss = sw[k] < s1 ? sw[k] : s1, f = ss * (one - lr * cc);
                        xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
                    }
                } else {
                    for (k = k0; k < k1; k++) {
                        {T} ss = sw[k], f = ss * (one - lr * cw[k]);
                        xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
                    }
                }
            }
        } else if (h2) {  /* no memory for the expansion: per position */
            for (i2 = 0; i2 < n2; i2++) {
                {T} cc = h1 ? c1 + c2[i2] : c2[i2], ss = h1 ? (sc2[i2] < s1 ? sc2[i2] : s1) : sc2[i2];
                {T} f = ss * (one - lr * cc);
                for (k = i2 * C; k < (i2 + 1) * C; k++) xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
            }
        } else {
            {T} f = s1 * (one - lr * c1);
            for (k0 = 0; k0 < L; k0 += BLK) {
                const int64_t k1 = k0 + BLK < L ? k0 + BLK : L;
                PREFETCH(xr + k0); PREFETCH(xr + k0 + BLK / 2); PREFETCH(dr + k0); PREFETCH(dr + k0 + BLK / 2);
                for (k = k0; k < k1; k++) xr[k] = xr[k] * f + (nlr * dr[k]) * s1;
            }
        }
    }
    free(wide);
}
"""

_TAIL = r"""
/* rows: [3, nrows + 1] zeros in, per-row sums out (row nrows: positions no row owns) */
int otofx_rows_stats(int f64, const int64_t *desc, const int64_t *units, int64_t nunits,
                     const int64_t *fold, int64_t nfold, const int64_t *xptr, const int64_t *dptr,
                     const int64_t *gptr, double b1, double alpha, double wd,
                     const int64_t *pos_row, int64_t P, int64_t nrows, void *pos, void *scratch, void *rows,
                     int nthreads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.desc = desc; j.units = units; j.fold = fold; j.xptr = xptr; j.dptr = dptr; j.gptr = gptr;
    j.b1 = b1; j.alpha = alpha; j.wd = wd;
    j.pos_row = pos_row; j.P = P; j.nrows = nrows; j.pos = pos; j.scratch = scratch; j.rows = rows;
    j.fn = f64 ? stats_unit_f64 : stats_unit_f32;
    j.n = nunits;
    run(&j, nthreads);
    j.fn = f64 ? fold_f64 : fold_f32;  /* then the h2 partials, added in unit order */
    j.n = nfold;
    run(&j, nthreads);
    j.fn = f64 ? rows_fold_f64 : rows_fold_f32;
    j.n = 3;
    run(&j, nthreads);
    return 0;
}

/* pv: [2, P] scratch; coef, scale: [nrows] */
int otofx_rows_apply(int f64, const int64_t *desc, const int64_t *units, int64_t nunits,
                     const int64_t *xptr, const int64_t *dptr, const int64_t *pos_row, int64_t P, int64_t nrows,
                     const void *coef, const void *scale, void *pv, double lr, int nthreads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.desc = desc; j.units = units; j.xptr = xptr; j.dptr = dptr; j.lr = lr;
    j.pos_row = pos_row; j.P = P; j.nrows = nrows; j.coef = coef; j.scale = scale; j.pos = pv;
    j.fn = f64 ? gather_f64 : gather_f32;
    j.n = (P + GATHER - 1) / GATHER;
    run(&j, nthreads);
    j.fn = f64 ? apply_unit_f64 : apply_unit_f32;
    j.n = nunits;
    run(&j, nthreads);
    return 0;
}
"""

_SRC = (_HEAD + "".join(_BODY.replace("{T}", t).replace("{S}", sfx).replace("{V}", "v" + sfx)
                        for t, sfx in (("float", "f32"), ("double", "f64"))) + _TAIL)

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
    src = d / f"{lib.stem}.{os.getpid()}.c"
    tmp = d / f"{lib.stem}.{os.getpid()}.so"
    src.write_text(_SRC)
    try:
        out = subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=120)
    finally:
        src.unlink(missing_ok=True)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {out.stderr.strip()[:500]}")
    os.replace(tmp, lib)  # atomic: concurrent builders (DDP ranks) never see half a file


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_SRC, cc, *_FLAGS, platform.machine(), platform.system()]).encode()).hexdigest()[:16]
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
                                         vp, i64, i64, vp, vp, vp, ctypes.c_int]
        dll.otofx_rows_apply.argtypes = [ctypes.c_int, vp, vp, i64, vp, vp, vp, i64, i64, vp, vp, vp, dbl, ctypes.c_int]
        return dll
    raise RuntimeError(f"cannot build the CPU row kernel: {err}")


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
        # NB: one cheap pass over attributes (this runs every step); the reason only when it fails
        if all(t.dtype == dt and t.is_cpu and t.is_contiguous() for t in ts):
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


def _ptrs(ts) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)


def _buffer(layout: RowLayout, key: str, dtype, n: int) -> torch.Tensor:
    """A zero-initialised buffer of at least ``n`` elements, cached on the layout."""
    k = (key, dtype)
    buf = layout.cache.get(k)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1), dtype=dtype)
        layout.cache[k] = buf
    return buf


def row_stats(layout: RowLayout, xs, ds, momentum: Momentum | None = None) -> RowStats:
    """Per-row ``||x||^2``, ``x.d``, ``||d||^2`` (the caller checked :func:`supported`).

    With ``momentum``, ``ds`` (the buffers) are first updated in place, in the same pass.
    """
    plan = _plan(layout)
    dtype = xs[0].dtype
    n, P = layout.n_rows, plan["P"]
    # NB: positions of empty tensors are never written: the cached buffer keeps their zeros
    pos = _buffer(layout, "cpu_pos", dtype, 3 * P)
    scratch = _buffer(layout, "cpu_scratch", dtype, plan["scratch"])
    out = torch.zeros((3, n + 1), dtype=dtype)
    xp, dp = _ptrs(xs), _ptrs(ds)
    gp, b1, alpha, wd = None, 0.0, 0.0, 0.0
    if momentum is not None:
        gp, b1, alpha, wd = _ptrs(momentum.grads), momentum.b1, momentum.alpha, momentum.wd
    library().otofx_rows_stats(int(dtype == torch.float64), plan["desc"].data_ptr(), plan["units"].data_ptr(),
                               plan["units"].shape[0], plan["fold"].data_ptr(), plan["fold"].shape[0],
                               xp.data_ptr(), dp.data_ptr(), None if gp is None else gp.data_ptr(),
                               float(b1), float(alpha), float(wd), layout.pos_row_flat.data_ptr(),
                               P if layout.axes else 0, n, pos.data_ptr(), scratch.data_ptr(), out.data_ptr(),
                               torch.get_num_threads())
    if momentum is not None and plan["plain"]:  # tensors no row reaches are not in the kernel's tables
        from .reference import momentum_update

        pl = plan["plain"]
        momentum_update([xs[t] for t in pl], [ds[t] for t in pl],
                        Momentum(tuple(momentum.grads[t] for t in pl), b1, alpha, wd))
    return RowStats(out[0, :n], out[1, :n], out[2, :n])


def apply_rows(layout: RowLayout, xs, ds, lr: float, coef: torch.Tensor, scale: torch.Tensor) -> None:
    """In place, as :func:`reference.apply_rows` (the caller checked :func:`supported`)."""
    plan = _plan(layout)
    dtype = xs[0].dtype
    coef, scale = coef.to(dtype).contiguous(), scale.to(dtype).contiguous()
    P = plan["P"]
    pv = _buffer(layout, "cpu_pv", dtype, 2 * P)
    xp, dp = _ptrs(xs), _ptrs(ds)
    library().otofx_rows_apply(int(dtype == torch.float64), plan["desc"].data_ptr(), plan["units"].data_ptr(),
                               plan["units"].shape[0], xp.data_ptr(), dp.data_ptr(), layout.pos_row_flat.data_ptr(),
                               P if layout.axes else 0, layout.n_rows, coef.data_ptr(), scale.data_ptr(),
                               pv.data_ptr(), float(lr), torch.get_num_threads())
    if plan["plain"]:
        torch._foreach_add_([xs[t] for t in plan["plain"]], [ds[t] for t in plan["plain"]], alpha=-lr)


def dhspg_step(layout: RowLayout, xs, ds, redundant: torch.Tensor, cfg: DHSPGConfig,
               momentum: Momentum | None = None) -> torch.Tensor:
    """The fused DHSPG row step; returns the number of zero rows before it (a tensor)."""
    coef, scale, count = dhspg_rows(row_stats(layout, xs, ds, momentum), redundant, cfg)
    apply_rows(layout, xs, ds, cfg.lr, coef, scale)
    return count


def scale_step(layout: RowLayout, xs, ds, lr: float, scale: torch.Tensor) -> None:
    """``x <- (x - lr*d) * S`` in place (HESSO)."""
    apply_rows(layout, xs, ds, lr, torch.zeros(layout.n_rows, dtype=xs[0].dtype), scale)
