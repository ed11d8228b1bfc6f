/* mad-search: the sLSTM cell's scan over time on the CPU, forward and backward, float32.
 *
 * Per head h, batch element and unit j, with raw = W x_t + b + R_h y_{t-1} split into
 * i~, f~, z~, o~ (xLSTM, Beck et al. 2024, stabilised exponential gating):
 *     lf = m_{t-1} + logsigmoid(f~);  m_t = max(i~, lf)  (m_0 = i~)
 *     i' = exp(i~ - m_t);  f' = exp(lf - m_t)            (i' = 1, f' = 0 at t = 0)
 *     c_t = f' c_{t-1} + i' tanh(z~);  n_t = f' n_{t-1} + i';  y_t = sigmoid(o~) c_t / n_t
 * The backward treats m as a constant (c and n both carry exp(-m_t), so y does not depend on
 * it), as blocks/slstm.py's torch scan does, and recomputes the gates from the saved raw values.
 *
 * Layouts (all contiguous; P = NH * B "lanes", lane p = h * B + batch element, G = 4 gates):
 *   wx, raw, draw (S, P, G, DH); R (NH, DH_in, G, DH_out), RT (NH, G, DH_out, DH_in) its
 *   transpose; bias (G, NH, DH);
 *   m (S, P, DH); c, n, y (S + 1, P, DH) with the zero state at index 0; dy (S, P, DH).
 * Each call handles lanes [p0, p1); lanes are independent.
 */
#include <stdint.h>
#include <string.h>

#include "fastmath.h"

#define G 4

/* out[gj] += sum_k v[k] R[k][gj] over gj < G * DH (R: (DH, G * DH) for one head) */
static inline void add_vec_mat(int64_t DH, const float *restrict v, const float *restrict R,
                               float *restrict out)
{
    const int64_t W = G * DH;
    for (int64_t k = 0; k < DH; k++) {
        const float vk = v[k];
        const float *restrict Rk = R + k * W;
        for (int64_t gj = 0; gj < W; gj++) out[gj] += vk * Rk[gj];
    }
}

/* M[k][gj] += u[k] v[gj] (M: (DH, W)) */
static inline void add_outer(int64_t DH, int64_t W, const float *restrict u,
                             const float *restrict v, float *restrict M)
{
    for (int64_t k = 0; k < DH; k++) {
        const float uk = u[k];
        float *restrict Mk = M + k * W;
        for (int64_t gj = 0; gj < W; gj++) Mk[gj] += uk * v[gj];
    }
}

/* one step of one lane: states from (m, c, n)_{t-1} and the raw gates r = (i~, f~, z~, o~) */
/* out[k] += sum_gj v[gj] RT[gj][k] over k < DH (RT: (G * DH, DH), R transposed, one head) */
static inline void add_vec_mat_t(int64_t DH, const float *restrict v, const float *restrict RT,
                                 float *restrict out)
{
    for (int64_t gj = 0; gj < G * DH; gj++) {
        const float vg = v[gj];
        const float *restrict RTg = RT + gj * DH;
        for (int64_t k = 0; k < DH; k++) out[k] += vg * RTg[k];
    }
}

static inline void cell_forward(int64_t DH, const float *restrict r,
                                const float *restrict m_prev, const float *restrict c_prev,
                                const float *restrict n_prev, float *restrict m,
                                float *restrict c, float *restrict n, float *restrict y)
{
    const float *ri = r, *rf = r + DH, *rz = r + 2 * DH, *ro = r + 3 * DH;
    for (int64_t j = 0; j < DH; j++) {
        const float lf = m_prev[j] + logsigmoid_f(rf[j]);
        const float mt = ri[j] > lf ? ri[j] : lf;  /* not fmaxf: it does not vectorise */
        const float ip = exp_f(ri[j] - mt), fp = exp_f(lf - mt);
        const float ct = fp * c_prev[j] + ip * tanh_f(rz[j]);
        const float nt = fp * n_prev[j] + ip;
        m[j] = mt;
        c[j] = ct;
        n[j] = nt;
        y[j] = sigmoid_f(ro[j]) * ct / nt;
    }
}

/* the first step: no history, so m = i~, i' = 1, c = tanh(z~), n = 1 */
static inline void cell_forward_first(int64_t DH, const float *restrict r, float *restrict m,
                                      float *restrict c, float *restrict n, float *restrict y)
{
    const float *ri = r, *rz = r + 2 * DH, *ro = r + 3 * DH;
    for (int64_t j = 0; j < DH; j++) {
        const float ct = tanh_f(rz[j]);
        m[j] = ri[j];
        c[j] = ct;
        n[j] = 1.0f;
        y[j] = sigmoid_f(ro[j]) * ct;
    }
}

/* one step of one lane backwards: d raw_t from dy_t and the carried (dc, dn) (updated in place);
 * f_out gets f'_t for the step before. At t = 0 (first): i' = 1, f' = 0. */
static inline void cell_backward(int64_t DH, int first, const float *restrict r,
                                 const float *restrict m_prev, const float *restrict mt,
                                 const float *restrict cp, const float *restrict np,
                                 const float *restrict nt, const float *restrict yt,
                                 const float *restrict dy, float *restrict dc,
                                 float *restrict dn, float *restrict dr, float *restrict f_out)
{
    const float *ri = r, *rf = r + DH, *rz = r + 2 * DH, *ro = r + 3 * DH;
    const float on = first ? 0.0f : 1.0f;  /* blends the first step's gates in without a branch */
    for (int64_t j = 0; j < DH; j++) {
        const float lf = m_prev[j] + logsigmoid_f(rf[j]);
        const float ip = on * exp_f(ri[j] - mt[j]) + (1.0f - on);
        const float fp = on * exp_f(lf - mt[j]);
        const float tz = tanh_f(rz[j]), so = sigmoid_f(ro[j]);
        const float inv_n = 1.0f / nt[j];
        const float dcj = dc[j] + dy[j] * so * inv_n;
        const float dnj = dn[j] - dy[j] * yt[j] * inv_n;
        dr[j] = (dcj * tz + dnj) * ip;
        dr[DH + j] = (dcj * cp[j] + dnj * np[j]) * fp * sigmoid_f(-rf[j]);
        dr[2 * DH + j] = dcj * ip * (1.0f - tz * tz);
        dr[3 * DH + j] = dy[j] * yt[j] * sigmoid_f(-ro[j]);
        dc[j] = dcj;
        dn[j] = dnj;
        f_out[j] = fp;
    }
}

void mad_slstm_fwd(int64_t p0, int64_t p1, int64_t S, int64_t P, int64_t B, int64_t DH,
                   int64_t NH, const float *wx, const float *R, const float *bias, float *raw,
                   float *m, float *c, float *n, float *y)
{
    const int64_t W = G * DH;
    /* time outside, lanes inside: a step's lanes are independent, so the CPU overlaps them (one
     * lane at a time is one long chain of dependent latencies) */
    for (int64_t t = 0; t < S; t++) {
        for (int64_t p = p0; p < p1; p++) {
            const int64_t h = p / B;
            const float *Rh = R + h * DH * W;
            const int64_t row = t * P + p;
            const float *w = wx + row * W;
            float *r = raw + row * W;
            for (int64_t g = 0; g < G; g++)
                for (int64_t j = 0; j < DH; j++)
                    r[g * DH + j] = w[g * DH + j] + bias[(g * NH + h) * DH + j];
            if (t > 0) add_vec_mat(DH, y + row * DH, Rh, r);   /* y index t is y_{t-1} */
            const int64_t prev = row * DH, next = (row + P) * DH;
            if (t == 0)
                cell_forward_first(DH, r, m + row * DH, c + next, n + next, y + next);
            else
                cell_forward(DH, r, m + (row - P) * DH, c + prev, n + prev, m + row * DH,
                             c + next, n + next, y + next);
        }
    }
}

/* ws: 4 DH floats per lane of the call: dy, dc, dn and f' of the step after */
/* dR (NH, DH_in, G DH_out) and db (NH, G DH) accumulate the recurrent weights' and the bias's
 * gradients, sum over steps and batch of y_{t-1}^T d raw_t and of d raw_t (NULL: not needed) */
void mad_slstm_bwd(int64_t p0, int64_t p1, int64_t S, int64_t P, int64_t B, int64_t DH,
                   const float *RT, const float *raw, const float *m, const float *c,
                   const float *n, const float *y, const float *dy_out, float *draw, float *ws,
                   float *dR, float *db)
{
    const int64_t W = G * DH;
    memset(ws, 0, sizeof(float) * (p1 - p0) * 4 * DH);
    for (int64_t t = S - 1; t >= 0; t--) {
        for (int64_t p = p0; p < p1; p++) {
            const int64_t h = p / B;
            const float *RTh = RT + h * W * DH;
            float *dy = ws + (p - p0) * 4 * DH, *dc = dy + DH, *dn = dy + 2 * DH;
            float *f_next = dy + 3 * DH;
            const int64_t row = t * P + p;
            const float *r = raw + row * W, *dyo = dy_out + row * DH;
            float *dr = draw + row * W;
            /* dy_t = output gradient + R_h d raw_{t+1}; (dc, dn) carried through f'_{t+1} */
            if (t == S - 1) {
                for (int64_t j = 0; j < DH; j++) dy[j] = dyo[j];
            } else {
                const float *dr_next = draw + (row + P) * W;
                for (int64_t j = 0; j < DH; j++) dy[j] = dyo[j];
                add_vec_mat_t(DH, dr_next, RTh, dy);
                for (int64_t j = 0; j < DH; j++) {
                    dc[j] *= f_next[j];
                    dn[j] *= f_next[j];
                }
            }
            const float *mt = m + row * DH, *mp = t > 0 ? m + (row - P) * DH : mt;
            cell_backward(DH, t == 0, r, mp, mt, c + row * DH, n + row * DH,
                          n + (row + P) * DH, y + (row + P) * DH, dy, dc, dn, dr, f_next);
            if (dR) add_outer(DH, W, y + row * DH, dr, dR + h * DH * W);  /* y_{t-1} */
            if (db) {
                float *restrict dbh = db + h * W;
                for (int64_t gj = 0; gj < W; gj++) dbh[gj] += dr[gj];
            }
        }
    }
}
