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

/* one N1 slab: sums of x*x, x*d, d*d (and the h2 partials); with MOM, d is first updated in place
   as an SGD momentum buffer (torch's order: g + wd*x, then d*b1, then + alpha*g) */
static inline __attribute__((always_inline)) void NAME(stats_slab)(
        const T *restrict xr, T *restrict dr, const T *restrict gr, int64_t L,
        T *restrict s0, T *restrict s1, T *restrict s2, const int H2, const int MOM, const int WD,
        T b1, T al, T wd, T out[3]) {
    V axx = {0}, axd = {0}, add = {0};
    T txx = 0, txd = 0, tdd = 0;
    int64_t k;
    for (k = 0; k + 8 <= L; k += 8) {
        if ((k & (LINE - 1)) == 0) {  /* once per cache line and stream */
            PREFETCH(xr + k);
            PREFETCH(dr + k);
            if (MOM) PREFETCH(gr + k);
        }
        V xv = NAME(load)(xr + k), dv;
        if (MOM) {
            V gv = NAME(load)(gr + k);
            if (WD) gv = gv + wd * xv;
            dv = NAME(load)(dr + k) * b1;
            dv = dv + al * gv;
            NAME(store)(dr + k, dv);
        } else {
            dv = NAME(load)(dr + k);
        }
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
            dr[k] = dv;
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
    T *d = (T *)(intptr_t)j->dptr[de[D_T]];
    const T *g = j->gptr ? (const T *)(intptr_t)j->gptr[de[D_T]] : 0;
    const T b1 = (T)j->b1, al = (T)j->alpha, wd = (T)j->wd;
    const int mom = g != 0, wdf = mom && j->wd != 0;
    T *pos = (T *)j->pos, *s0 = 0, *s1 = 0, *s2 = 0, out[3];
    int64_t i1;
    if (h2) {
        s0 = (T *)j->scratch + un[U_S];
        s1 = s0 + L;
        s2 = s1 + L;
        memset(s0, 0, 3 * L * sizeof(T));
    }
    for (i1 = un[U_B]; i1 < un[U_E]; i1++) {
        const T *xr = x + i1 * L, *gr = g ? g + i1 * L : 0;
        T *dr = d + i1 * L;
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

/* x <- x * f + ((-lr) * d) * s, f = s * (1 - lr * c): the reference's expression and order */
CLONES static void NAME(apply_unit)(Job *j, int64_t u) {
    const int64_t *un = j->units + u * U_W, *de = j->desc + un[U_D] * D_W;
    const int64_t n2 = de[D_N2], C = de[D_C], L = n2 * C, P = j->P, h1 = de[D_H1], h2 = de[D_H2];
    T *x = (T *)(intptr_t)j->xptr[de[D_T]];
    const T *d = (const T *)(intptr_t)j->dptr[de[D_T]], *pv = (const T *)j->pos;
    const T lr = (T)j->lr, nlr = (T)(-j->lr), one = 1;
    const T *c2 = pv + de[D_P2], *sc2 = pv + P + de[D_P2];
    T *wide = 0;
    int64_t i1, i2, k, k0, c;
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
        T *restrict xr = x + i1 * L;
        const T *restrict dr = d + i1 * L;
        T c1 = 0, s1 = 1;
        if (h1) {
            c1 = pv[de[D_P1] + i1];
            s1 = pv[P + de[D_P1] + i1];
        }
        if (h2 && (C == 1 || wide)) {
            const T *restrict cw = wide ? wide : c2, *restrict sw = wide ? wide + L : sc2;
            for (k0 = 0; k0 < L; k0 += BLK) {
                const int64_t k1 = k0 + BLK < L ? k0 + BLK : L;
                PREFETCH(xr + k0); PREFETCH(xr + k0 + BLK / 2); PREFETCH(dr + k0); PREFETCH(dr + k0 + BLK / 2);
                if (h1) {
                    for (k = k0; k < k1; k++) {
                        T cc = c1 + cw[k], ss = sw[k] < s1 ? sw[k] : s1, f = ss * (one - lr * cc);
                        xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
                    }
                } else {
                    for (k = k0; k < k1; k++) {
                        T ss = sw[k], f = ss * (one - lr * cw[k]);
                        xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
                    }
                }
            }
        } else if (h2) {  /* no memory for the expansion: per position */
            for (i2 = 0; i2 < n2; i2++) {
                T cc = h1 ? c1 + c2[i2] : c2[i2], ss = h1 ? (sc2[i2] < s1 ? sc2[i2] : s1) : sc2[i2];
                T f = ss * (one - lr * cc);
                for (k = i2 * C; k < (i2 + 1) * C; k++) xr[k] = xr[k] * f + (nlr * dr[k]) * ss;
            }
        } else {
            T f = s1 * (one - lr * c1);
            for (k0 = 0; k0 < L; k0 += BLK) {
                const int64_t k1 = k0 + BLK < L ? k0 + BLK : L;
                PREFETCH(xr + k0); PREFETCH(xr + k0 + BLK / 2); PREFETCH(dr + k0); PREFETCH(dr + k0 + BLK / 2);
                for (k = k0; k < k1; k++) xr[k] = xr[k] * f + (nlr * dr[k]) * s1;
            }
        }
    }
    free(wide);
}

#undef NAME
#undef OTOFX_CAT
#undef OTOFX_CAT_
