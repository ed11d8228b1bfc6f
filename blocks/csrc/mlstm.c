/* mad-search: the mLSTM cell in its recurrent form on the CPU, forward and backward, float32.
 *
 * Per lane (head x batch element), with k scaled by 1/sqrt(DQK) and m_0 = 0, C_0 = n_0 = 0
 * (xLSTM, Beck et al. 2024; blocks/mlstm.py's mlstm_recurrent, step for step):
 *     a_t = logsigmoid(f~_t) + m_{t-1};  m_t = max(a_t, i~_t)   (i~ on a tie)
 *     f_t = exp(a_t - m_t);  i_t = exp(i~_t - m_t)
 *     C_t = f_t C_{t-1} + i_t k_t v_t^T;  n_t = f_t n_{t-1} + i_t k_t
 *     h_t = (C_t^T q_t) inv_t,  inv_t = 1 / (max(|q_t . n_t|, exp(-m_t)) + eps)
 * where inv is evaluated as s / (max(|qn| s, exp(-max(m, 0))) + eps s), s = exp(min(m, 0)), so
 * that no exponential overflows. Per step the cost is DQK x DV, against the parallel form's
 * S x (DQK + DV), and nothing S x S is formed.
 *
 * Eight lanes run side by side, one per float of an 8-float vector: every quantity is an array
 * [8] and every operation a loop over the 8 lanes, which gcc turns into one vector operation (no
 * reductions across a vector anywhere, gates and normaliser included). The backward is the exact
 * derivative of these steps, the stabiliser included (m enters the output only through eps and
 * rounding, but its gradient is kept so that the result equals autograd through
 * mlstm_recurrent): it recomputes a lane group's states C_t, n_t into the workspace and runs the
 * adjoint recurrence backwards.
 *
 * Layouts (contiguous, lane groups outermost, the 8 lanes innermost): q, k, dq, dk
 * (G, S, DQK, 8); v, h, hnum, dh, dv (G, S, DV, 8); i~, f~, m, qn, di, df (G, S, 8). Each call
 * handles lane groups [g0, g1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fastmath.h"

#define L 8
#define FOR_L for (int64_t l = 0; l < L; l++)

/* the gates of one step: a = logsigmoid(f~) + m_prev, m = max(a, i~), fg, ig */
static inline void gates(const float *restrict i_pre, const float *restrict f_pre,
                         const float *restrict m_prev, float *restrict a, float *restrict m,
                         float *restrict fg, float *restrict ig)
{
    FOR_L {
        const float at = logsigmoid_f(f_pre[l]) + m_prev[l];
        const float mt = at > i_pre[l] ? at : i_pre[l];
        a[l] = at;
        m[l] = mt;
        fg[l] = exp_f(at - mt);
        ig[l] = exp_f(i_pre[l] - mt);
    }
}

/* inv = s / (max(|qn| s, E) + eps s), and (where wanted) d inv / d qn, d inv / d m */
static inline void inverse_normaliser(const float *restrict qn, const float *restrict m,
                                      float eps, float *restrict inv, float *restrict d_qn,
                                      float *restrict d_m)
{
    FOR_L {
        const float s = exp_f(m[l] < 0.0f ? m[l] : 0.0f);
        const float E = exp_f(m[l] > 0.0f ? -m[l] : 0.0f);
        const float aq = fabsf(qn[l]) * s;
        const int q_branch = aq >= E;
        const float den = (q_branch ? aq : E) + eps * s;
        const float iv = s / den;
        const float sign = qn[l] > 0.0f ? 1.0f : (qn[l] < 0.0f ? -1.0f : 0.0f);
        inv[l] = iv;
        d_qn[l] = q_branch ? -iv * iv * sign : 0.0f;
        d_m[l] = q_branch ? 0.0f : iv * E / den;
    }
}

/* one step of the state: C = fg C_prev + ig ks v^T, n = fg n_prev + ig ks (ks = k / sqrt(DQK)) */
static void step_state(int64_t DQK, int64_t DV, float scale, const float *restrict fg,
                              const float *restrict ig, const float *restrict k,
                              const float *restrict v, const float *restrict C_prev,
                              float *restrict C, const float *restrict n_prev,
                              float *restrict n)
{
    for (int64_t r = 0; r < DQK; r++) {
        float kr[L];
        FOR_L kr[l] = ig[l] * k[r * L + l] * scale;
        for (int64_t c = 0; c < DV; c++) {
            const int64_t o = (r * DV + c) * L;
            FOR_L C[o + l] = fg[l] * C_prev[o + l] + kr[l] * v[c * L + l];
        }
        FOR_L n[r * L + l] = fg[l] * n_prev[r * L + l] + kr[l];
    }
}

/* dL/dC_t = dC (from later steps) + q dhn^T; its products with the state and the inputs; then
 * dC becomes what C_{t-1} receives (fg dL/dC_t) */
static void adjoint_state(int64_t DQK, int64_t DV, float scale, const float *restrict qt,
                          const float *restrict kt, const float *restrict vt,
                          const float *restrict Ct, const float *restrict Cp,
                          const float *restrict dhn, const float *restrict fg,
                          float *restrict dC, float *restrict dqt, float *restrict dCv,
                          float *restrict dvt, float *restrict d_fg)
{
    float acc_f[L] = {0};
    for (int64_t r = 0; r < DQK; r++) {
        float qr[L], ks[L], acc_q[L] = {0}, acc_v[L] = {0};
        FOR_L {
            qr[l] = qt[r * L + l];
            ks[l] = kt[r * L + l] * scale;
        }
        for (int64_t c = 0; c < DV; c++) {
            const int64_t o = (r * DV + c) * L;
            FOR_L {
                const float gv = dC[o + l] + qr[l] * dhn[c * L + l];
                acc_q[l] += Ct[o + l] * dhn[c * L + l];
                acc_v[l] += gv * vt[c * L + l];
                acc_f[l] += gv * Cp[o + l];
                dvt[c * L + l] += gv * ks[l];
                dC[o + l] = fg[l] * gv;
            }
        }
        FOR_L {
            dqt[r * L + l] += acc_q[l];
            dCv[r * L + l] += acc_v[l];
        }
    }
    FOR_L d_fg[l] += acc_f[l];
}

/* C^T q and q . n of one step */
static inline void readout(int64_t DQK, int64_t DV, const float *restrict qt,
                           const float *restrict C, const float *restrict n,
                           float *restrict hn, float *restrict qn)
{
    for (int64_t c = 0; c < DV * L; c++) hn[c] = 0.0f;
    for (int64_t r = 0; r < DQK; r++) {
        float qr[L];
        FOR_L qr[l] = qt[r * L + l];
        for (int64_t c = 0; c < DV; c++) {
            const int64_t o = (r * DV + c) * L;
            FOR_L hn[c * L + l] += qr[l] * C[o + l];
        }
        FOR_L qn[l] += qr[l] * n[r * L + l];
    }
}

/* ws: 2 (DQK x DV + DQK) x 8 floats (two states, ping-pong) */
void mad_mlstm_fwd(int64_t g0, int64_t g1, int64_t S, int64_t DQK, int64_t DV, float eps,
                   const float *q, const float *k, const float *v, const float *i_pre,
                   const float *f_pre, float *h, float *hnum, float *m_out, float *qn_out,
                   float *ws)
{
    const float scale = 1.0f / sqrtf((float)DQK);
    const int64_t QV = DQK * DV * L, QL = DQK * L, VL = DV * L;
    for (int64_t g = g0; g < g1; g++) {
        float *C = ws, *C_prev = ws + QV, *n = C_prev + QV, *n_prev = n + QL;
        memset(ws, 0, sizeof(float) * 2 * (QV + QL));
        float m[L] = {0};
        for (int64_t t = 0; t < S; t++) {
            const int64_t row = g * S + t;
            const float *qt = q + row * QL;
            float a[L], mt[L], fg[L], ig[L], qn[L] = {0}, inv[L], unused1[L], unused2[L];
            gates(i_pre + row * L, f_pre + row * L, m, a, mt, fg, ig);
            float *tmp = C; C = C_prev; C_prev = tmp;      /* C_prev: the state so far */
            tmp = n; n = n_prev; n_prev = tmp;
            step_state(DQK, DV, scale, fg, ig, k + row * QL, v + row * VL, C_prev, C, n_prev, n);
            float *hn = hnum + row * VL;
            readout(DQK, DV, qt, C, n, hn, qn);
            inverse_normaliser(qn, mt, eps, inv, unused1, unused2);
            float *ht = h + row * VL;
            for (int64_t c = 0; c < DV; c++) FOR_L ht[c * L + l] = hn[c * L + l] * inv[l];
            FOR_L {
                m[l] = mt[l];
                m_out[row * L + l] = mt[l];
                qn_out[row * L + l] = qn[l];
            }
        }
    }
}

/* ws: (S + 2) x DQK x DV x 8 (zeros, the states C_t, the adjoint dC) + (S + 1) x DQK x 8 (zeros,
 * the states n_t) + (3 DQK + DV) x 8 floats */
void mad_mlstm_bwd(int64_t g0, int64_t g1, int64_t S, int64_t DQK, int64_t DV, float eps,
                   const float *q, const float *k, const float *v, const float *i_pre,
                   const float *f_pre, const float *hnum, const float *m_all, const float *qn_all,
                   const float *dh, float *dq, float *dk, float *dv, float *di, float *df,
                   float *ws)
{
    const float scale = 1.0f / sqrtf((float)DQK);
    const int64_t QV = DQK * DV * L, QL = DQK * L, VL = DV * L;
    float *Cs = ws + QV;                 /* Cs + t QV = C_t; Cs - QV = zeros */
    float *dC = Cs + S * QV;
    float *Ns = dC + QV + QL;            /* Ns + t QL = n_t; Ns - QL = zeros */
    float *dn = Ns + S * QL, *dCv = dn + QL, *dqt = dCv + QL, *dvt = dqt + QL;
    memset(ws, 0, sizeof(float) * QV);
    memset(Ns - QL, 0, sizeof(float) * QL);
    for (int64_t g = g0; g < g1; g++) {
        /* 1. the states, forwards */
        float m[L] = {0};
        for (int64_t t = 0; t < S; t++) {
            const int64_t row = g * S + t;
            float a[L], mt[L], fg[L], ig[L];
            gates(i_pre + row * L, f_pre + row * L, m, a, mt, fg, ig);
            step_state(DQK, DV, scale, fg, ig, k + row * QL, v + row * VL, Cs + (t - 1) * QV,
                       Cs + t * QV, Ns + (t - 1) * QL, Ns + t * QL);
            FOR_L m[l] = mt[l];
        }
        /* 2. the adjoint, backwards; dC, dn, dm_next: what the steps after t send to step t */
        memset(dC, 0, sizeof(float) * QV);
        memset(dn, 0, sizeof(float) * QL);
        float dm_next[L] = {0};
        for (int64_t t = S - 1; t >= 0; t--) {
            const int64_t row = g * S + t;
            const float *qt = q + row * QL, *kt = k + row * QL, *vt = v + row * VL;
            const float *hn = hnum + row * VL, *dht = dh + row * VL;
            const float *Ct = Cs + t * QV, *Cp = Cs + (t - 1) * QV;
            const float *nt = Ns + t * QL, *np = Ns + (t - 1) * QL;
            float m_prev[L], a[L], mt[L], fg[L], ig[L], inv[L], d_qn_d[L], d_m_d[L];
            FOR_L m_prev[l] = t > 0 ? m_all[(row - 1) * L + l] : 0.0f;
            gates(i_pre + row * L, f_pre + row * L, m_prev, a, mt, fg, ig);
            inverse_normaliser(qn_all + row * L, mt, eps, inv, d_qn_d, d_m_d);
            float d_inv[L] = {0}, d_qn[L], dm[L], d_fg[L] = {0}, d_ig[L] = {0};
            for (int64_t c = 0; c < DV; c++) FOR_L d_inv[l] += dht[c * L + l] * hn[c * L + l];
            FOR_L {
                d_qn[l] = d_inv[l] * d_qn_d[l];
                dm[l] = dm_next[l] + d_inv[l] * d_m_d[l];
            }
            /* dq = C_t dhnum + n_t d_qn; dn += q d_qn */
            for (int64_t r = 0; r < DQK; r++) FOR_L {
                const int64_t o = r * L + l;
                dn[o] += qt[o] * d_qn[l];
                dqt[o] = nt[o] * d_qn[l];
                dCv[o] = dn[o];
            }
            float dhn[DV * L];  /* dh inv: the gradient of C_t^T q */
            for (int64_t c = 0; c < DV; c++) FOR_L {
                dhn[c * L + l] = dht[c * L + l] * inv[l];
                dvt[c * L + l] = 0.0f;
            }
            adjoint_state(DQK, DV, scale, qt, kt, vt, Ct, Cp, dhn, fg, dC, dqt, dCv, dvt, d_fg);
            for (int64_t r = 0; r < DQK; r++) FOR_L {
                const int64_t o = r * L + l;
                const float ks = kt[o] * scale;
                d_fg[l] += dn[o] * np[o];
                d_ig[l] += dCv[o] * ks;                        /* dCv = dC v + dn */
                dk[row * QL + o] = ig[l] * dCv[o] * scale;
                dq[row * QL + o] = dqt[o];
                dn[o] *= fg[l];
            }
            for (int64_t c = 0; c < DV; c++) FOR_L dv[row * VL + c * L + l] = ig[l] * dvt[c * L + l];
            /* through f = exp(a - m), i = exp(i~ - m), m = max(a, i~), a = lf + m_{t-1} */
            FOR_L {
                float d_a = d_fg[l] * fg[l], d_i = d_ig[l] * ig[l];
                const float dmt = dm[l] - d_a - d_i;
                const int took_a = a[l] > i_pre[row * L + l];
                d_a += took_a ? dmt : 0.0f;
                d_i += took_a ? 0.0f : dmt;
                di[row * L + l] = d_i;
                df[row * L + l] = d_a * sigmoid_f(-f_pre[row * L + l]);
                dm_next[l] = d_a;
            }
        }
    }
}
