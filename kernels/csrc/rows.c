/* otofx CPU row kernels (see otofx/kernels/cpu_rows.py): per-row sums of x*x, x*d, d*d and the
   in-place DHSPG/HESSO update, over tensors seen as [N1, N2, C]. Built once with the system C
   compiler: cc -O3 -shared -fPIC -pthread -ffp-contract=off -fno-strict-aliasing rows.c */
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
    double lr, b1, alpha, wd; /* with gptr: d' = d * b1 + alpha * (g + wd * x) (stored by the write-back) */
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

/* the OpenMP runtime torch runs its own threads on (libgomp's GOMP_parallel entry point, which
   LLVM's libomp also provides), set once by the loader; null: a pthread per thread and call */
typedef void (*team_fn)(void (*)(void *), void *, unsigned, unsigned);
static team_fn team = 0;
void otofx_set_team(void *f) { team = (team_fn)f; }
static void team_worker(void *arg) { worker(arg); }

static void run(Job *j, int nthreads) {
    pthread_t th[MAXT];
    int started[MAXT];
    int k;
    j->next = 0;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads > j->n) nthreads = (int)j->n;
    if (nthreads <= 1) {
        worker(j);
        return;
    }
    /* NB: torch's OpenMP threads spin for a while after each of its parallel ops; threads of our own
       would share the cores with them (2 threads ran no faster than 1). Its team runs us instead. */
    if (team) {
        team(team_worker, j, (unsigned)nthreads, 0);
        return;
    }
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
#define GATHER 16384  /* positions per work item of the gather */

/* x86-64 Linux, GCC: an AVX2 copy of each loop besides the baseline one, picked when the library loads */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* one copy of the body per element type */
#define T float
#define V vf32
#define S f32
#include "rows_body.h"
#undef T
#undef V
#undef S

#define T double
#define V vf64
#define S f64
#include "rows_body.h"
#undef T
#undef V
#undef S
/* rows: [3, nrows + 1] zeros in, per-row sums out (row nrows: positions no row owns). With gptr, the
   sums are of the updated momentum buffers (see stats_slab); nothing is written but the outputs.
   flag (may be null): set to 1 when skip (may be null: a float flag, GradScaler's found_inf
   convention) is non-zero or a sum of d*d is not finite (a NaN or inf among the directions, or
   an overflow), else 0: the write-back's skip flag, known before anything is written */
int otofx_rows_stats(int f64, const int64_t *desc, const int64_t *units, int64_t nunits,
                     const int64_t *fold, int64_t nfold, const int64_t *xptr, const int64_t *dptr,
                     const int64_t *gptr, double b1, double alpha, double wd,
                     const int64_t *pos_row, int64_t P, int64_t nrows, void *pos, void *scratch, void *rows,
                     const float *skip, float *flag, int nthreads) {
    Job j;
    int64_t r;
    int bad;
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
    if (flag) {
        bad = skip && *skip != 0;
        for (r = 0; r <= nrows && !bad; r++) {
            /* NB: v - v is 0 for a finite v and NaN for NaN or inf (no -ffast-math) */
            if (f64) { const double v = ((const double *)rows)[2 * (nrows + 1) + r]; bad = !(v - v == 0); }
            else { const float v = ((const float *)rows)[2 * (nrows + 1) + r]; bad = !(v - v == 0); }
        }
        *flag = bad ? 1.0f : 0.0f;
    }
    return 0;
}

/* pv: [2, P] scratch; coef, scale: [nrows]; with gptr, the momentum buffers are updated first (in the
   same pass, as in the stats). skip (may be null): non-zero returns before anything is written */
int otofx_rows_apply(int f64, const int64_t *desc, const int64_t *units, int64_t nunits,
                     const int64_t *xptr, const int64_t *dptr, const int64_t *gptr, double b1, double alpha,
                     double wd, const int64_t *pos_row, int64_t P, int64_t nrows,
                     const void *coef, const void *scale, void *pv, double lr, const double *lrp,
                     const float *skip, int nthreads) {
    Job j;
    if (skip && *skip != 0) return 1;
    if (lrp) lr = *lrp;  /* a learning rate held in a tensor */
    memset(&j, 0, sizeof j);
    j.desc = desc; j.units = units; j.xptr = xptr; j.dptr = dptr; j.gptr = gptr; j.lr = lr;
    j.b1 = b1; j.alpha = alpha; j.wd = wd;
    j.pos_row = pos_row; j.P = P; j.nrows = nrows; j.coef = coef; j.scale = scale; j.pos = pv;
    j.fn = f64 ? gather_f64 : gather_f32;
    j.n = (P + GATHER - 1) / GATHER;
    run(&j, nthreads);
    j.fn = f64 ? apply_unit_f64 : apply_unit_f32;
    j.n = nunits;
    run(&j, nthreads);
    return 0;
}
