/* mad-search: causal softmax attention for small heads on the CPU, forward and backward, float32.
 *
 * Per batch element b, query head h (key/value head g = h / (H / KVH): grouped-query heads) and
 * query position t, with the window's first key j0 = max(0, t - W + 1) (W = 0: no window):
 *
 *     s_j = scale q_t . k_j  (j0 <= j <= t),   lse_t = log sum_j exp(s_j)
 *     p_j = exp(s_j - lse_t),                  y_t = sum_j p_j v_j
 *
 * and the backward (delta_t = dy_t . y_t):
 *
 *     ds_j = p_j (dy_t . v_j - delta_t)
 *     dq_t = scale sum_j ds_j k_j,   dk_j += scale ds_j q_t,   dv_j += p_j dy_t
 *
 * The scores are recomputed in the backward from lse (nothing S x S is stored). At MAD's sizes
 * (heads of 8-16, 48-128 positions) torch's attention kernels spend most of their time in
 * per-call and per-tile overhead; here a row of scores is a loop over keys vectorised along the
 * keys (k and v are transposed once per lane into the workspace), and the products with v and
 * the gradients are loops over the head's D floats.
 *
 * Layouts: a token's heads are side by side, each D contiguous floats: q + (b S + t) ldq + h D,
 * likewise k (ldk), v (ldv) with their head g; y, dy (B, S, H, D) contiguous; dq (B, S, H, D),
 * dk, dv (B, S, KVH, D) contiguous; lse (B, H, S). A call handles lanes [p0, p1) of the B x KVH
 * lanes (one key/value head of one batch element and its H / KVH query heads), so no two
 * calls write the same dk, dv.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define INLINE static inline __attribute__((always_inline))
#define DMAX 64  /* the largest head size (the caller takes torch's path beyond) */
#define L 8      /* keys per block: one vector of scores */
#define R 4      /* query rows per tile: R independent multiply-add chains share each load */

static inline int64_t round_up(int64_t n) { return (n + L - 1) / L * L; }

static inline int64_t first_key(int64_t t, int64_t W) { return W > 0 && t - W + 1 > 0 ? t - W + 1 : 0; }

/* Scores of the tile's rows t0 .. t0 + nr - 1 against the key blocks [jb0, je):
 * s[r SP + j] = qs_r . k_j where row t0 + r sees key j, else -inf; returns each row's largest
 * in m. qs: the rows' queries, already scaled; kT: D x SP (zeros beyond S). */
INLINE void tile_scores(int64_t D, int64_t SP, int64_t jb0, int64_t je, int64_t t0, int nr,
                        int64_t W, const float (*restrict qs)[DMAX], const float *restrict kT,
                        float *restrict s, float *restrict m)
{
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    vf mx[R];
    for (int r = 0; r < R; r++) mx[r] = v_splat(-INFINITY);
    for (int64_t jb = jb0; jb < je; jb += L) {
        vf a[R];
        for (int r = 0; r < R; r++) a[r] = v_zero();
        for (int64_t d = 0; d < D; d++) {
            const vf kd = v_load(kT + d * SP + jb);
            for (int r = 0; r < R; r++) a[r] += qs[r][d] * kd;
        }
        for (int r = 0; r < R; r++) {
            /* the row sees the block's keys lo .. hi */
            const int lo = (int)(first_key(t0 + r, W) - jb), hi = r < nr ? (int)(t0 + r - jb) : -1;
            const vf sr = v_select((lane >= lo) & (lane <= hi), a[r], v_splat(-INFINITY));
            v_store(s + r * SP + jb, sr);
            mx[r] = v_max(sr, mx[r]);
        }
    }
    for (int r = 0; r < R; r++) m[r] = v_hmax(mx[r]);
}

/* xT (D x SP) = the rows [0, S) of x (row stride ld, D floats each), transposed; zeros beyond */
INLINE void transpose(int64_t D, int64_t S, int64_t SP, const float *restrict x, int64_t ld,
                      float *restrict xT)
{
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = S; j < SP; j++) xT[d * SP + j] = 0.0f;
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < D; d++) xT[d * SP + j] = x[j * ld + d];
}

/* ws: D SP + R SP floats, SP = S rounded up to a multiple of L. D a multiple of 8. */
INLINE void forward_lanes(int64_t D, int64_t p0, int64_t p1, int64_t S, int64_t H, int64_t KVH,
                          int64_t W, float scale, const float *q, int64_t ldq, const float *k,
                          int64_t ldk, const float *v, int64_t ldv, float *y, float *lse,
                          float *ws)
{
    const int64_t G = H / KVH, SP = round_up(S), ND = D / 8;
    float *kT = ws, *s = ws + D * SP;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / KVH, g = p % KVH;
        const float *kb = k + b * S * ldk + g * D, *vb = v + b * S * ldv + g * D;
        transpose(D, S, SP, kb, ldk, kT);
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            for (int64_t t0 = 0; t0 < S; t0 += R) {
                const int nr = S - t0 < R ? (int)(S - t0) : R;
                const int64_t tl = t0 + nr - 1, jmin = first_key(t0, W);
                const int64_t jb0 = jmin / L * L, je = round_up(tl + 1);
                float qs[R][DMAX], m[R], l[R];
                for (int r = 0; r < R; r++)
                    for (int64_t d = 0; d < D; d++)
                        qs[r][d] = r < nr ? q[(b * S + t0 + r) * ldq + h * D + d] * scale : 0.0f;
                tile_scores(D, SP, jb0, je, t0, nr, W, qs, kT, s, m);
                for (int r = 0; r < R; r++) {
                    vf lr = v_zero();
                    for (int64_t jb = jb0; jb < je; jb += L) {
                        const vf e = v_exp(v_load(s + r * SP + jb) - m[r]);  /* 0 if unseen */
                        v_store(s + r * SP + jb, e);
                        lr += e;
                    }
                    l[r] = v_sum(lr);
                }
                vf acc[R][DMAX / 8];
                for (int r = 0; r < R; r++)
                    for (int64_t n = 0; n < ND; n++) acc[r][n] = v_zero();
                for (int64_t j = jmin; j <= tl; j++)
                    for (int64_t n = 0; n < ND; n++) {
                        const vf vj = v_load(vb + j * ldv + 8 * n);
                        for (int r = 0; r < R; r++) acc[r][n] += s[r * SP + j] * vj;
                    }
                for (int r = 0; r < nr; r++) {
                    const float inv = 1.0f / l[r];
                    float *yt = y + ((b * S + t0 + r) * H + h) * D;
                    for (int64_t n = 0; n < ND; n++) v_store(yt + 8 * n, acc[r][n] * inv);
                    lse[(b * H + h) * S + t0 + r] = m[r] + logf(l[r]);
                }
            }
        }
    }
}

/* ws: 2 D SP + 2 D S + 2 R SP floats */
INLINE void backward_lanes(int64_t D, int64_t p0, int64_t p1, int64_t S, int64_t H,
                           int64_t KVH, int64_t W, float scale, const float *q, int64_t ldq,
                           const float *k, int64_t ldk, const float *v, int64_t ldv,
                           const float *y, const float *lse, const float *dy, float *dq,
                           float *dk, float *dv, float *ws)
{
    const int64_t G = H / KVH, SP = round_up(S), ND = D / 8;
    float *kT = ws, *vT = kT + D * SP, *dkb = vT + D * SP, *dvb = dkb + D * S;
    float *s = dvb + D * S, *ds = s + R * SP;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / KVH, g = p % KVH;
        const float *kb = k + b * S * ldk + g * D, *vb = v + b * S * ldv + g * D;
        transpose(D, S, SP, kb, ldk, kT);
        transpose(D, S, SP, vb, ldv, vT);
        memset(dkb, 0, sizeof(float) * 2 * D * S);
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            for (int64_t t0 = 0; t0 < S; t0 += R) {
                const int nr = S - t0 < R ? (int)(S - t0) : R;
                const int64_t tl = t0 + nr - 1, jmin = first_key(t0, W);
                const int64_t jb0 = jmin / L * L, je = round_up(tl + 1);
                float qs[R][DMAX], dys[R][DMAX], delta[R], m[R], lt[R];
                vf qv[R][DMAX / 8], dyv[R][DMAX / 8], acc[R][DMAX / 8];
                for (int r = 0; r < R; r++) {
                    const int64_t row = (b * S + t0 + r) * H + h;
                    const float *qt = q + (b * S + t0 + r) * ldq + h * D;
                    vf dl = v_zero();
                    for (int64_t n = 0; n < ND; n++) {
                        qv[r][n] = r < nr ? v_load(qt + 8 * n) : v_zero();
                        dyv[r][n] = r < nr ? v_load(dy + row * D + 8 * n) : v_zero();
                        acc[r][n] = v_zero();
                        if (r < nr) dl += dyv[r][n] * v_load(y + row * D + 8 * n);
                    }
                    for (int64_t d = 0; d < D; d++) {
                        qs[r][d] = qv[r][d / 8][d % 8] * scale;
                        dys[r][d] = dyv[r][d / 8][d % 8];
                    }
                    delta[r] = v_sum(dl);
                    lt[r] = r < nr ? lse[(b * H + h) * S + t0 + r] : 0.0f;
                }
                tile_scores(D, SP, jb0, je, t0, nr, W, qs, kT, s, m);
                for (int64_t jb = jb0; jb < je; jb += L) {
                    vf a[R];
                    for (int r = 0; r < R; r++) a[r] = v_zero();
                    for (int64_t d = 0; d < D; d++) {
                        const vf vd = v_load(vT + d * SP + jb);
                        for (int r = 0; r < R; r++) a[r] += dys[r][d] * vd;
                    }
                    for (int r = 0; r < R; r++) {
                        const vf pr = v_exp(v_load(s + r * SP + jb) - lt[r]);  /* 0 if unseen */
                        v_store(s + r * SP + jb, pr);
                        v_store(ds + r * SP + jb, pr * (a[r] - delta[r]) * scale);
                    }
                }
                for (int64_t j = jmin; j <= tl; j++) {
                    const float *kj = kb + j * ldk;
                    float *dkr = dkb + j * D, *dvr = dvb + j * D;
                    for (int64_t n = 0; n < ND; n++) {
                        const vf kv = v_load(kj + 8 * n);
                        vf dkj = v_zero(), dvj = v_zero();
                        for (int r = 0; r < R; r++) {
                            const float dsj = ds[r * SP + j], pj = s[r * SP + j];
                            acc[r][n] += dsj * kv;
                            dkj += dsj * qv[r][n];
                            dvj += pj * dyv[r][n];
                        }
                        v_store(dkr + 8 * n, v_load(dkr + 8 * n) + dkj);
                        v_store(dvr + 8 * n, v_load(dvr + 8 * n) + dvj);
                    }
                }
                for (int r = 0; r < nr; r++) {
                    float *dqt = dq + ((b * S + t0 + r) * H + h) * D;
                    for (int64_t n = 0; n < ND; n++) v_store(dqt + 8 * n, acc[r][n]);
                }
            }
        }
        for (int64_t t = 0; t < S; t++) {
            memcpy(dk + ((b * S + t) * KVH + g) * D, dkb + t * D, sizeof(float) * D);
            memcpy(dv + ((b * S + t) * KVH + g) * D, dvb + t * D, sizeof(float) * D);
        }
    }
}

void mad_attention_fwd(int64_t p0, int64_t p1, int64_t S, int64_t H, int64_t KVH, int64_t D,
                       int64_t W, float scale, const float *q, int64_t ldq, const float *k,
                       int64_t ldk, const float *v, int64_t ldv, float *y, float *lse, float *ws)
{
#define FWD(DD) forward_lanes(DD, p0, p1, S, H, KVH, W, scale, q, ldq, k, ldk, v, ldv, y, lse, ws)
    V8_BY_HEAD_SIZE(FWD, D)
#undef FWD
}

void mad_attention_bwd(int64_t p0, int64_t p1, int64_t S, int64_t H, int64_t KVH, int64_t D,
                       int64_t W, float scale, const float *q, int64_t ldq, const float *k,
                       int64_t ldk, const float *v, int64_t ldv, const float *y,
                       const float *lse, const float *dy, float *dq, float *dk, float *dv,
                       float *ws)
{
#define BWD(DD)                                                                                \
    backward_lanes(DD, p0, p1, S, H, KVH, W, scale, q, ldq, k, ldk, v, ldv, y, lse, dy, dq,    \
                   dk, dv, ws)
    V8_BY_HEAD_SIZE(BWD, D)
#undef BWD
}

/* Rotary position encoding (Su et al. 2021) of a token's heads, halves rotated as pairs:
 *     y[:half] = x[:half] cos - x[half:] sin,  y[half:] = x[:half] sin + x[half:] cos
 * at the token's position t; backwards the rotation by -t. x: tokens ld apart (b S + t), each
 * NHD heads of D floats; y, dy, dx (B S, NHD, D) contiguous; cos, sin (S, D / 2). A call
 * handles tokens [n0, n1). */
void mad_rope(int64_t n0, int64_t n1, int64_t S, int64_t NHD, int64_t D, int64_t backward,
              const float *cos_t, const float *sin_t, const float *x, int64_t ld, float *y)
{
    const int64_t half = D / 2;
    const float sign = backward ? -1.0f : 1.0f;
    for (int64_t n = n0; n < n1; n++) {
        const float *restrict c = cos_t + (n % S) * half, *restrict s = sin_t + (n % S) * half;
        for (int64_t h = 0; h < NHD; h++) {
            const float *restrict xa = x + n * ld + h * D, *restrict xb = xa + half;
            float *restrict ya = y + (n * NHD + h) * D, *restrict yb = ya + half;
            for (int64_t i = 0; i < half; i++) {
                const float si = sign * s[i];
                ya[i] = xa[i] * c[i] - xb[i] * si;
                yb[i] = xa[i] * si + xb[i] * c[i];
            }
        }
    }
}
