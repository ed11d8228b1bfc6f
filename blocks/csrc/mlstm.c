/* mad-search: the mLSTM cell in its recurrent form on the CPU, forward and backward, float32.
 *
 * Per lane (head x batch element), with k scaled by 1/sqrt(DQK) and m_0 = 0, C_0 = n_0 = 0
 * (xLSTM, Beck et al. 2024; blocks/mlstm.py's mlstm_recurrent, step for step):
 *     a_t = logsigmoid(f~_t) + m_{t-1};  m_t = max(a_t, i~_t)   (i~ on a tie)
 *     f_t = exp(a_t - m_t);  i_t = exp(i~_t - m_t)
 *     C_t = f_t C_{t-1} + i_t k_t v_t^T;  n_t = f_t n_{t-1} + i_t k_t
 *     h_t = (C_t^T q_t) inv_t,  inv_t = 1 / (max(|q_t . n_t|, exp(-m_t)) + eps)
 * where inv is evaluated as s / (max(|qn| s, exp(-max(m, 0))) + eps s), s = exp(min(m, 0)), so
 * that no exponential overflows. Per step the cost is DQK x DV (the state stays in cache),
 * against the parallel form's S x (DQK + DV), and nothing S x S is formed. One lane at a time,
 * vectorised along the state's rows (an earlier version ran eight lanes side by side, one per
 * vector float: no faster at small heads, and slower from heads of 64, whose eight states no
 * longer fit in cache).
 *
 * The backward is the exact derivative of these steps, the stabiliser included (m enters the
 * output only through eps and rounding, but its gradient is kept, so the result equals autograd
 * through mlstm_recurrent): it recomputes one lane's states C_t, n_t into the workspace and runs
 * the adjoint recurrence backwards.
 *
 * Layouts: lane p is batch element p / NH, head p % NH. q, k, dq, dk are (B, NH, S, DQK) with
 * the last axis contiguous and element strides sq = {batch, head, step}; v, h, dh, dv likewise
 * (B, NH, S, DV) with strides sv: the block's (B, S, NH, D) memory is read and written in place,
 * no copies into a lane-major layout and back. hnum (P, S, DV) and i~, f~, m, qn, di, df (P, S)
 * are contiguous. Each call handles lanes [p0, p1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

/* element offsets of lane p's step t in the q-family and the v-family tensors */
#define QK_AT(p, t) ((p) / NH * sq[0] + (p) % NH * sq[1] + (t) * sq[2])
#define V_AT(p, t) ((p) / NH * sv[0] + (p) % NH * sv[1] + (t) * sv[2])

/* a = logsigmoid(f~) + m_prev; m = max(a, i~) (i~ on a tie); fg = exp(a - m); ig = exp(i~ - m) */
static inline float gates(float i_pre, float f_pre, float m_prev, float *m, float *ig,
                          float *fg)
{
    const float lf = f_pre < 0.0f ? f_pre - log1pf(expf(f_pre)) : -log1pf(expf(-f_pre));
    const float a = lf + m_prev;
    const float mt = a > i_pre ? a : i_pre;
    *m = mt;
    *fg = expf(a - mt);
    *ig = expf(i_pre - mt);
    return a;
}

/* inv = s / (max(|qn| s, E) + eps s), s = exp(min(m, 0)), E = exp(-max(m, 0)); and its
 * derivatives by qn and by m */
static inline float inverse_normaliser(float qn, float m, float eps, float *d_qn, float *d_m)
{
    const float s = expf(m < 0.0f ? m : 0.0f), E = expf(-(m > 0.0f ? m : 0.0f));
    const float aq = fabsf(qn) * s;
    const int q_branch = aq >= E;
    const float den = (q_branch ? aq : E) + eps * s;
    const float inv = s / den;
    const float sign = qn > 0.0f ? 1.0f : (qn < 0.0f ? -1.0f : 0.0f);
    *d_qn = q_branch ? -inv * inv * sign : 0.0f;
    *d_m = q_branch ? 0.0f : inv * E / den;
    return inv;
}

/* C = fg C_prev + ig ks v^T; hnum += C^T q where q is given */
static void step_state(int64_t DQK, int64_t DV, float fg, float ig, const float *restrict ks,
                       const float *restrict v, const float *restrict C_prev,
                       float *restrict C, const float *restrict q, float *restrict hnum)
{
    for (int64_t r = 0; r < DQK; r++) {
        const float kr = ig * ks[r];
        const float *restrict Cp = C_prev + r * DV;
        float *restrict Cr = C + r * DV;
        for (int64_t c = 0; c < DV; c++) Cr[c] = fg * Cp[c] + kr * v[c];
        if (q) {
            const float qr = q[r];
            for (int64_t c = 0; c < DV; c++) hnum[c] += qr * Cr[c];
        }
    }
}

/* step_state on 8-float vectors, for DV a multiple of 8 and DQK of 4: four rows at a time, so
 * that hnum's chunk is loaded and stored once per four rows */
static void step_state_v8(int64_t DQK, int64_t DV, float fg, float ig, const float *restrict ks,
                          const float *restrict v, const float *restrict C_prev,
                          float *restrict C, const float *restrict q, float *restrict hnum)
{
    const vf vfg = v_splat(fg);
    for (int64_t r = 0; r < DQK; r += 4) {
        for (int64_t c = 0; c < DV; c += 8) {
            const vf vv = v_load(v + c);
            vf h_c = q ? v_load(hnum + c) : v_zero();
            for (int j = 0; j < 4; j++) {
                const int64_t o = (r + j) * DV + c;
                const vf Cr = vfg * v_load(C_prev + o) + v_splat(ig * ks[r + j]) * vv;
                v_store(C + o, Cr);
                if (q) h_c += v_splat(q[r + j]) * Cr;
            }
            if (q) v_store(hnum + c, h_c);
        }
    }
}

/* ws: 2 DQK x DV + 2 DQK floats */
void mad_mlstm_fwd(int64_t p0, int64_t p1, int64_t S, int64_t DQK, int64_t DV, int64_t NH,
                   const int64_t *sq, const int64_t *sv, float eps, const float *q,
                   const float *k, const float *v, const float *i_pre, const float *f_pre,
                   float *h, float *hnum, float *m_out, float *qn_out, float *ws)
{
    const int vectors = DV % 8 == 0 && DQK % 4 == 0;
    const float scale = 1.0f / sqrtf((float)DQK);
    for (int64_t p = p0; p < p1; p++) {
        float *C = ws, *C_prev = ws + DQK * DV, *ks = C_prev + DQK * DV, *n = ks + DQK;
        memset(ws, 0, sizeof(float) * (2 * DQK * DV + 2 * DQK));
        float m = 0.0f;
        for (int64_t t = 0; t < S; t++) {
            const int64_t row = p * S + t;
            const float *qt = q + QK_AT(p, t), *kt = k + QK_AT(p, t);
            float mt, ig, fg;
            gates(i_pre[row], f_pre[row], m, &mt, &ig, &fg);
            for (int64_t r = 0; r < DQK; r++) ks[r] = kt[r] * scale;
            float *tmp = C; C = C_prev; C_prev = tmp;
            float *hn = hnum + row * DV;
            memset(hn, 0, sizeof(float) * DV);
            (vectors ? step_state_v8 : step_state)(DQK, DV, fg, ig, ks, v + V_AT(p, t), C_prev, C,
                                                   qt, hn);
            float qn = 0.0f;
            for (int64_t r = 0; r < DQK; r++) {
                n[r] = fg * n[r] + ig * ks[r];
                qn += qt[r] * n[r];
            }
            m = mt;
            float unused1, unused2;
            const float inv = inverse_normaliser(qn, m, eps, &unused1, &unused2);
            float *ht = h + V_AT(p, t);
            for (int64_t c = 0; c < DV; c++) ht[c] = hn[c] * inv;
            m_out[row] = m;
            qn_out[row] = qn;
        }
    }
}

/* one reverse step over the state: g = dC + q dhn^T (dL/dC_t); dq += C_t dhn; dCv += g v;
 * d_fg += <g, C_{t-1}>; dv += g^T ks; dC = fg g */
static float adjoint_state(int64_t DQK, int64_t DV, float fg, const float *restrict qt,
                           const float *restrict ks, const float *restrict vt,
                           const float *restrict Ct, const float *restrict Cp,
                           const float *restrict dhn, float *restrict dC, float *restrict dqt,
                           float *restrict dCv, float *restrict dvt)
{
    float d_fg = 0.0f;
    for (int64_t r = 0; r < DQK; r++) {
        const float qr = qt[r], ksr = ks[r];
        const float *restrict Ctr = Ct + r * DV, *restrict Cpr = Cp + r * DV;
        float *restrict dCr = dC + r * DV;
        float acc_q = 0.0f, acc_v = 0.0f, acc_f = 0.0f;
        for (int64_t c = 0; c < DV; c++) {
            const float g = dCr[c] + qr * dhn[c];
            acc_q += Ctr[c] * dhn[c];
            acc_v += g * vt[c];
            acc_f += g * Cpr[c];
            dvt[c] += g * ksr;
            dCr[c] = fg * g;
        }
        dqt[r] += acc_q;
        dCv[r] += acc_v;
        d_fg += acc_f;
    }
    return d_fg;
}

/* adjoint_state on 8-float vectors, for DV a multiple of 8 and DQK of 4: four rows at a time,
 * so that dv's accumulator is loaded and stored once per four rows, and the eight row sums of
 * the four rows (their parts of dq and of dC v) come out of one in-register transpose instead of
 * eight horizontal sums. <g, C_{t-1}> is one sum over the whole state: two vector accumulators. */
static float adjoint_state_v8(int64_t DQK, int64_t DV, float fg, const float *restrict qt,
                              const float *restrict ks, const float *restrict vt,
                              const float *restrict Ct, const float *restrict Cp,
                              const float *restrict dhn, float *restrict dC,
                              float *restrict dqt, float *restrict dCv, float *restrict dvt)
{
    const vf vfg = v_splat(fg);
    vf acc_f0 = v_zero(), acc_f1 = v_zero();
    for (int64_t r = 0; r < DQK; r += 4) {
        vf acc[8];
        for (int j = 0; j < 8; j++) acc[j] = v_zero();  /* 0-3: C_t dhn, 4-7: g v, per row */
        for (int64_t c = 0; c < DV; c += 8) {
            const vf dh = v_load(dhn + c), vv = v_load(vt + c);
            vf dv_c = v_load(dvt + c);
            for (int j = 0; j < 4; j++) {
                const int64_t o = (r + j) * DV + c;
                const vf g = v_load(dC + o) + v_splat(qt[r + j]) * dh;
                acc[j] += v_load(Ct + o) * dh;
                acc[4 + j] += g * vv;
                if (j < 2) acc_f0 += g * v_load(Cp + o);
                else acc_f1 += g * v_load(Cp + o);
                dv_c += g * v_splat(ks[r + j]);
                v_store(dC + o, vfg * g);
            }
            v_store(dvt + c, dv_c);
        }
        v_transpose8(acc);  /* acc[l][j] = lane l of row sum j: summing the acc[l] sums them all */
        const vf sums = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                        ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (int j = 0; j < 4; j++) {
            dqt[r + j] += sums[j];
            dCv[r + j] += sums[4 + j];
        }
    }
    return v_sum(acc_f0 + acc_f1);
}

/* ws: (S + 2) DQK x DV (zeros, the states C_t, the adjoint dC) + (S + 1) DQK (zeros, the
 * states n_t) + 5 DQK + 2 DV floats */
void mad_mlstm_bwd(int64_t p0, int64_t p1, int64_t S, int64_t DQK, int64_t DV, int64_t NH,
                   const int64_t *sq, const int64_t *sv, float eps, const float *q,
                   const float *k, const float *v, const float *i_pre, const float *f_pre,
                   const float *hnum, const float *m_all, const float *qn_all, const float *dh,
                   float *dq, float *dk, float *dv, float *di, float *df, float *ws)
{
    const int64_t QV = DQK * DV;
    const int vectors = DV % 8 == 0 && DQK % 4 == 0;
    const float scale = 1.0f / sqrtf((float)DQK);
    float *Cs = ws + QV, *dC = Cs + S * QV, *Ns = dC + QV + DQK;
    float *dn = Ns + S * DQK, *ks = dn + DQK, *dCv = ks + DQK, *dqt = dCv + DQK;
    float *dvt = dqt + DQK, *dhn = dvt + DV;
    memset(ws, 0, sizeof(float) * QV);
    memset(Ns - DQK, 0, sizeof(float) * DQK);
    for (int64_t p = p0; p < p1; p++) {
        float m = 0.0f;
        for (int64_t t = 0; t < S; t++) {            /* the states, forwards */
            const int64_t row = p * S + t;
            const float *kt = k + QK_AT(p, t);
            float mt, ig, fg;
            gates(i_pre[row], f_pre[row], m, &mt, &ig, &fg);
            for (int64_t r = 0; r < DQK; r++) ks[r] = kt[r] * scale;
            (vectors ? step_state_v8 : step_state)(DQK, DV, fg, ig, ks, v + V_AT(p, t),
                                                   Cs + (t - 1) * QV, Cs + t * QV, NULL, NULL);
            const float *np = Ns + (t - 1) * DQK;
            float *nt = Ns + t * DQK;
            for (int64_t r = 0; r < DQK; r++) nt[r] = fg * np[r] + ig * ks[r];
            m = mt;
        }
        memset(dC, 0, sizeof(float) * QV);            /* the adjoint, backwards */
        memset(dn, 0, sizeof(float) * DQK);
        float dm_next = 0.0f;
        for (int64_t t = S - 1; t >= 0; t--) {
            const int64_t row = p * S + t;
            const int64_t oq = QK_AT(p, t), ov = V_AT(p, t);
            const float *qt = q + oq, *kt = k + oq, *vt = v + ov;
            const float *hn = hnum + row * DV, *dht = dh + ov;
            const float *nt = Ns + t * DQK, *np = Ns + (t - 1) * DQK;
            const float m_prev = t > 0 ? m_all[row - 1] : 0.0f;
            float mt, ig, fg, d_qn_d, d_m_d;
            const float a = gates(i_pre[row], f_pre[row], m_prev, &mt, &ig, &fg);
            const float inv = inverse_normaliser(qn_all[row], mt, eps, &d_qn_d, &d_m_d);
            float d_inv = 0.0f;
            for (int64_t c = 0; c < DV; c++) {
                d_inv += dht[c] * hn[c];
                dhn[c] = dht[c] * inv;
                dvt[c] = 0.0f;
            }
            const float d_qn = d_inv * d_qn_d;
            float dm = dm_next + d_inv * d_m_d;
            for (int64_t r = 0; r < DQK; r++) {
                dn[r] += qt[r] * d_qn;
                dqt[r] = nt[r] * d_qn;
                dCv[r] = dn[r];
                ks[r] = kt[r] * scale;
            }
            float d_fg = (vectors ? adjoint_state_v8 : adjoint_state)(
                DQK, DV, fg, qt, ks, vt, Cs + t * QV, Cs + (t - 1) * QV, dhn, dC, dqt, dCv, dvt);
            float d_ig = 0.0f;
            for (int64_t r = 0; r < DQK; r++) {
                d_fg += dn[r] * np[r];
                d_ig += dCv[r] * ks[r];
                dk[oq + r] = ig * dCv[r] * scale;
                dq[oq + r] = dqt[r];
                dn[r] *= fg;
            }
            for (int64_t c = 0; c < DV; c++) dv[ov + c] = ig * dvt[c];
            float d_a = d_fg * fg, d_i = d_ig * ig;
            dm -= d_a + d_i;
            if (a > i_pre[row]) d_a += dm;
            else d_i += dm;
            di[row] = d_i;
            df[row] = d_a / (1.0f + expf(f_pre[row]));   /* d logsigmoid = sigmoid(-f~) */
            dm_next = d_a;
        }
    }
}
