/* otofx CPU row kernels: the per-element-type body, included once per type by rows.c.
   Before including: T (the element type), V (its 8-lane vector type) and S (the name suffix).
   NAME(f) gives f_S. */
#define OTOFX_CAT_(a, b) a##_##b
#define OTOFX_CAT(a, b) OTOFX_CAT_(a, b)
#define NAME(f) OTOFX_CAT(f, S)
static inline __attribute__((always_inline)) V NAME(load)(const T *p) { V v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void NAME(store)(T *p, V v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) T NAME(lanes)(V v) {
    T s = 0;
    int l;
    for (l = 0; l < 8; l++) s += v[l];
    return s;
}

/* the direction of 8 elements: d, or with MOM the updated buffer (stats_slab's expression) */
static inline __attribute__((always_inline)) V NAME(dir8)(V xv, const T *dr, const T *gr, const int MOM,
                                                          const int WD, T b1, T al, T wd) {
    if (!MOM) return NAME(load)(dr);
    V gv = NAME(load)(gr), dv;
    if (WD) gv = gv + wd * xv;
    dv = NAME(load)(dr) * b1;
    return dv + al * gv;
}

/* one N1 slab: sums of x*x, x*d, d*d (and the h2 partials); with MOM, the sums are of the updated
   SGD momentum buffer d' = d*b1 + alpha*(g + wd*x) (torch's order), computed here and not stored:
   the write-back computes d' again, bit for bit, and stores it (nothing is written before the
   step's finite check is known) */
static inline __attribute__((always_inline)) void NAME(stats_slab)(
        const T *restrict xr, const T *restrict dr, const T *restrict gr, int64_t L,
        T *restrict s0, T *restrict s1, T *restrict s2, const int H2, const int MOM, const int WD,
        T b1, T al, T wd, T out[3]) {
    V axx = {0}, axd = {0}, add = {0}, bxx = {0}, bxd = {0}, bdd = {0};
    T txx = 0, txd = 0, tdd = 0;
    int64_t k;
    for (k = 0; k + 16 <= L; k += 16) {  /* one cache line per stream and step: two independent halves */
        PREFETCH(xr + k);
        PREFETCH(dr + k);
        if (MOM) PREFETCH(gr + k);
        V x0 = NAME(load)(xr + k), x1 = NAME(load)(xr + k + 8);
        V d0 = NAME(dir8)(x0, dr + k, MOM ? gr + k : 0, MOM, WD, b1, al, wd);
        V d1 = NAME(dir8)(x1, dr + k + 8, MOM ? gr + k + 8 : 0, MOM, WD, b1, al, wd);
        V a0 = x0 * x0, p0 = x0 * d0, c0 = d0 * d0, a1 = x1 * x1, p1 = x1 * d1, c1 = d1 * d1;
        if (H2) {
            NAME(store)(s0 + k, NAME(load)(s0 + k) + a0);
            NAME(store)(s1 + k, NAME(load)(s1 + k) + p0);
            NAME(store)(s2 + k, NAME(load)(s2 + k) + c0);
            NAME(store)(s0 + k + 8, NAME(load)(s0 + k + 8) + a1);
            NAME(store)(s1 + k + 8, NAME(load)(s1 + k + 8) + p1);
            NAME(store)(s2 + k + 8, NAME(load)(s2 + k + 8) + c1);
        }
        axx += a0; axd += p0; add += c0;
        bxx += a1; bxd += p1; bdd += c1;
    }
    axx += bxx; axd += bxd; add += bdd;
    for (; k + 8 <= L; k += 8) {
        V xv = NAME(load)(xr + k);
        V dv = NAME(dir8)(xv, dr + k, MOM ? gr + k : 0, MOM, WD, b1, al, wd);
        V a = xv * xv, b = xv * dv, c = dv * dv;
        if (H2) {
            NAME(store)(s0 + k, NAME(load)(s0 + k) + a);
            NAME(store)(s1 + k, NAME(load)(s1 + k) + b);
            NAME(store)(s2 + k, NAME(load)(s2 + k) + c);
        }
        axx += a; axd += b; add += c;
    }
    for (; k < L; k++) {
        T xv = xr[k], dv;
        if (MOM) {
            T gv = gr[k];
            if (WD) gv = gv + wd * xv;
            dv = dr[k] * b1;
            dv = dv + al * gv;
        } else {
            dv = dr[k];
        }
        T a = xv * xv, b = xv * dv, c = dv * dv;
        if (H2) { s0[k] += a; s1[k] += b; s2[k] += c; }
        txx += a; txd += b; tdd += c;
    }
    out[0] = NAME(lanes)(axx) + txx;
    out[1] = NAME(lanes)(axd) + txd;
    out[2] = NAME(lanes)(add) + tdd;
}

CLONES static void NAME(stats_unit)(Job *j, int64_t u) {
    const int64_t *un = j->units + u * U_W, *de = j->desc + un[U_D] * D_W;
    const int64_t L = de[D_N2] * de[D_C], P = j->P, h1 = de[D_H1], h2 = de[D_H2];
    const T *x = (const T *)(intptr_t)j->xptr[de[D_T]];
    const T *d = (const T *)(intptr_t)j->dptr[de[D_T]];
    const T *g = j->gptr ? (const T *)(intptr_t)j->gptr[de[D_T]] : 0;
    const T b1 = (T)j->b1, al = (T)j->alpha, wd = (T)j->wd;
    const int mom = g != 0, wdf = mom && j->wd != 0; /* NB: the write-back's condition, the same */
    T *pos = (T *)j->pos, *s0 = 0, *s1 = 0, *s2 = 0, out[3];
    int64_t i1;
    if (h2) {
        s0 = (T *)j->scratch + un[U_S];
        s1 = s0 + L;
        s2 = s1 + L;
        memset(s0, 0, 3 * L * sizeof(T));
    }
    for (i1 = un[U_B]; i1 < un[U_E]; i1++) {
        const T *xr = x + i1 * L, *dr = d + i1 * L, *gr = g ? g + i1 * L : 0;
        if (h2) {
            if (wdf) NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 1, 1, 1, b1, al, wd, out);
            else if (mom) NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 1, 1, 0, b1, al, wd, out);
            else NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 1, 0, 0, b1, al, wd, out);
        } else {
            if (wdf) NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 0, 1, 1, b1, al, wd, out);
            else if (mom) NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 0, 1, 0, b1, al, wd, out);
            else NAME(stats_slab)(xr, dr, gr, L, s0, s1, s2, 0, 0, 0, b1, al, wd, out);
        }
        if (h1) {
            pos[de[D_P1] + i1] = out[0];
            pos[P + de[D_P1] + i1] = out[1];
            pos[2 * P + de[D_P1] + i1] = out[2];
        }
    }
}

/* the h2 partials of a tensor's units, added in unit order (reads each partial once, in order) */
static void NAME(fold)(Job *j, int64_t f) {
    const int64_t *fo = j->fold + f * 3, *de = j->desc + fo[0] * D_W;
    const int64_t n2 = de[D_N2], C = de[D_C], L = n2 * C, P = j->P;
    T *pos = (T *)j->pos;
    int64_t i2, u, c;
    int s;
    for (s = 0; s < 3; s++) {
        T *restrict out = pos + s * P + de[D_P2];
        for (i2 = 0; i2 < n2; i2++) out[i2] = 0;
        for (u = fo[1]; u < fo[1] + fo[2]; u++) {
            const T *restrict p = (const T *)j->scratch + j->units[u * U_W + U_S] + s * L;
            if (C == 1) {
                for (i2 = 0; i2 < n2; i2++) out[i2] += p[i2];
            } else {
                for (i2 = 0; i2 < n2; i2++) {
                    T acc = out[i2];
                    for (c = 0; c < C; c++) acc += p[i2 * C + c];
                    out[i2] = acc;
                }
            }
        }
    }
}

/* positions into rows, for one of the three sums (in position order) */
static void NAME(rows_fold)(Job *j, int64_t s) {
    const T *restrict pos = (const T *)j->pos + s * j->P;
    T *restrict rows = (T *)j->rows + s * (j->nrows + 1);
    int64_t p;
    for (p = 0; p < j->P; p++) rows[j->pos_row[p]] += pos[p];
}

/* the coefficient and scale of every position's row (0 and 1 where no row owns it) */
static void NAME(gather)(Job *j, int64_t chunk) {
    const T *coef = (const T *)j->coef, *scale = (const T *)j->scale;
    T *pv = (T *)j->pos;
    const int64_t P = j->P, b = chunk * GATHER, e = b + GATHER < P ? b + GATHER : P;
    int64_t p;
    for (p = b; p < e; p++) {
        const int64_t r = j->pos_row[p];
        pv[p] = r == j->nrows ? 0 : coef[r];
        pv[P + p] = r == j->nrows ? 1 : scale[r];
    }
}

/* the write-back of elements [k0, k1) of one slab: x <- x * f + ((-lr) * d) * s, f = s * (1 - lr * c)
   (the reference's expression and order). MODE 0: c and s are constants (cc, ss); 1: per element
   from cw/sw, combined with the slab's own row (c1 + cw, min(s1, sw)); 2: per element from cw/sw.
   With MOM, d is first updated as in stats_slab (the same expression: the same bits) and stored */
static inline __attribute__((always_inline)) void NAME(apply_span)(
        T *restrict xr, T *restrict dr, const T *restrict gr, int64_t k0, int64_t k1,
        const T *restrict cw, const T *restrict sw, T cc, T ss, const int MODE, const int MOM, const int WD,
        T lr, T nlr, T b1, T al, T wd) {
    const T one = 1, f0 = ss * (one - lr * cc);
    int64_t k;
    for (k = k0; k < k1; k++) {
        T dv = dr[k];
        if (MOM) {
            T gv = gr[k];
            if (WD) gv = gv + wd * xr[k];
            dv = dv * b1;
            dv = dv + al * gv;
            dr[k] = dv;
        }
        if (MODE == 0) {
            xr[k] = xr[k] * f0 + (nlr * dv) * ss;
        } else if (MODE == 1) {
            T c = cc + cw[k], s = sw[k] < ss ? sw[k] : ss, f = s * (one - lr * c);
            xr[k] = xr[k] * f + (nlr * dv) * s;
        } else {
            T s = sw[k], f = s * (one - lr * cw[k]);
            xr[k] = xr[k] * f + (nlr * dv) * s;
        }
    }
}

/* one slab in blocks of BLK elements (prefetching each stream ahead) */
static inline __attribute__((always_inline)) void NAME(apply_slab)(
        T *restrict xr, T *restrict dr, const T *restrict gr, int64_t L,
        const T *restrict cw, const T *restrict sw, T cc, T ss, const int MODE, const int MOM, const int WD,
        T lr, T nlr, T b1, T al, T wd) {
    int64_t k0;
    for (k0 = 0; k0 < L; k0 += BLK) {
        const int64_t k1 = k0 + BLK < L ? k0 + BLK : L;
        PREFETCH(xr + k0); PREFETCH(xr + k0 + BLK / 2); PREFETCH(dr + k0); PREFETCH(dr + k0 + BLK / 2);
        if (MOM) { PREFETCH(gr + k0); PREFETCH(gr + k0 + BLK / 2); }
        NAME(apply_span)(xr, dr, gr, k0, k1, cw, sw, cc, ss, MODE, MOM, WD, lr, nlr, b1, al, wd);
    }
}

/* the three momentum cases of one call, each compiled with constant flags */
#define OTOFX_APPLY(FN, ...)                                                        \
    do {                                                                            \
        if (wdf) FN(__VA_ARGS__, 1, 1, lr, nlr, b1, al, wd);                        \
        else if (mom) FN(__VA_ARGS__, 1, 0, lr, nlr, b1, al, wd);                   \
        else FN(__VA_ARGS__, 0, 0, lr, nlr, b1, al, wd);                            \
    } while (0)

CLONES static void NAME(apply_unit)(Job *j, int64_t u) {
    const int64_t *un = j->units + u * U_W, *de = j->desc + un[U_D] * D_W;
    const int64_t n2 = de[D_N2], C = de[D_C], L = n2 * C, P = j->P, h1 = de[D_H1], h2 = de[D_H2];
    T *x = (T *)(intptr_t)j->xptr[de[D_T]];
    T *d = (T *)(intptr_t)j->dptr[de[D_T]];
    const T *g = j->gptr ? (const T *)(intptr_t)j->gptr[de[D_T]] : 0, *pv = (const T *)j->pos;
    const T lr = (T)j->lr, nlr = (T)(-j->lr), b1 = (T)j->b1, al = (T)j->alpha, wd = (T)j->wd;
    const int mom = g != 0, wdf = mom && j->wd != 0; /* NB: stats_unit's condition, the same */
    const T *c2 = pv + de[D_P2], *sc2 = pv + P + de[D_P2];
    T *wide = 0;
    int64_t i1, i2, c;
    if (h2 && C > 1) {  /* the N2 values repeated over their C elements: one contiguous loop per slab */
        wide = (T *)malloc(2 * L * sizeof(T));
        if (wide) {
            for (i2 = 0; i2 < n2; i2++)
                for (c = 0; c < C; c++) {
                    wide[i2 * C + c] = c2[i2];
                    wide[L + i2 * C + c] = sc2[i2];
                }
        }
    }
    for (i1 = un[U_B]; i1 < un[U_E]; i1++) {
        T *restrict xr = x + i1 * L, *restrict dr = d + i1 * L;
        const T *restrict gr = g ? g + i1 * L : 0;
        T c1 = 0, s1 = 1;
        if (h1) {
            c1 = pv[de[D_P1] + i1];
            s1 = pv[P + de[D_P1] + i1];
        }
        if (h2 && (C == 1 || wide)) {
            const T *restrict cw = wide ? wide : c2, *restrict sw = wide ? wide + L : sc2;
            if (h1) OTOFX_APPLY(NAME(apply_slab), xr, dr, gr, L, cw, sw, c1, s1, 1);
            else OTOFX_APPLY(NAME(apply_slab), xr, dr, gr, L, cw, sw, c1, s1, 2);
        } else if (h2) {  /* no memory for the expansion: per position */
            for (i2 = 0; i2 < n2; i2++) {
                T cc = h1 ? c1 + c2[i2] : c2[i2], ss = h1 ? (sc2[i2] < s1 ? sc2[i2] : s1) : sc2[i2];
                OTOFX_APPLY(NAME(apply_span), xr, dr, gr, i2 * C, (i2 + 1) * C, 0, 0, cc, ss, 0);
            }
        } else {
            OTOFX_APPLY(NAME(apply_slab), xr, dr, gr, L, 0, 0, c1, s1, 0);
        }
    }
    free(wide);
}
#undef OTOFX_APPLY

#undef NAME
#undef OTOFX_CAT
#undef OTOFX_CAT_
