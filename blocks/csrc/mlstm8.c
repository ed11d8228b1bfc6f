/* mad-search: the mLSTM cell in its recurrent form, eight lanes at a time, forward and backward,
 * float32. The same steps as mlstm.c (see there and blocks/mlstm.py's mlstm_recurrent):
 *
 *     a_t = logsigmoid(f~_t) + m_{t-1};  m_t = max(a_t, i~_t)   (i~ on a tie)
 *     f_t = exp(a_t - m_t);  i_t = exp(i~_t - m_t)
 *     C_t = f_t C_{t-1} + i_t k_t v_t^T;  n_t = f_t n_{t-1} + i_t k_t   (k scaled by 1/sqrt(DQK))
 *     h_t = (C_t^T q_t) inv_t,  inv_t = 1 / (max(|q_t . n_t|, exp(-m_t)) + eps)
 *
 * but with eight lanes (batch element x head) side by side, one per float of an 8-float vector
 * (vec8.h): every operation of a step, the gates' exponentials and the stabiliser included, is
 * one vector operation for eight lanes, and the backward's reductions over the state's rows or
 * columns are plain multiply-adds instead of horizontal sums. That suits small heads (16 x 16
 * states: 8 KB for eight lanes), where mlstm.c's vectors along a state row are short; mlstm.c
 * stays the kernel for large ones.
 *
 * Inputs are read in place through strides: x[b, h, t, r] at x + b sb + h sh + t st + r, with
 * the three strides per tensor in `st` (q, k, v, i~, f~, then the outputs' and gradients'). The
 * forward saves, per group of eight lanes, C^T q, m and q . n per step (`saved`) and the states C,
 * n entering every segment of T steps (`ckpt`); the backward recomputes one segment's states from
 * its checkpoint at a time (T + 1 states in cache) and runs the adjoint recurrence through it. The
 * backward is the exact derivative of the steps above, the stabiliser's gradient included.
 *
 * A call handles lane groups [g0, g1): lanes 8 g ... 8 g + 7 (p = b NH + h); lanes past P are
 * computed on a copy of the group's first lane and never written.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define INLINE static inline __attribute__((always_inline))
#define DMAX 64  /* the largest head size (the caller takes mlstm.c beyond) */

/* dst[(t D + r) 8 + l] = x[b, h, t, r] of lane p0 + l (strides s: b, h, t); lanes past P read
 * lane p0's values (computed on, never written back). Eight floats of each lane's row at a time,
 * turned lanes-innermost by an in-register transpose; the rows' last D % 8 floats one by one. */
static void gather(int64_t P, int64_t NH, int64_t S, int64_t D, int64_t p0, const float *x,
                   const int64_t *s, float *restrict dst)
{
    const float *lane[8];
    for (int l = 0; l < 8; l++) {
        const int64_t p = p0 + l < P ? p0 + l : p0;
        lane[l] = x + (p / NH) * s[0] + (p % NH) * s[1];
    }
    const int64_t D8 = D - D % 8;
    for (int64_t t = 0; t < S; t++) {
        const int64_t at = t * s[2];
        for (int64_t r = 0; r < D8; r += 8) {
            vf rows[8];
            for (int l = 0; l < 8; l++) rows[l] = v_load(lane[l] + at + r);
            v_transpose8(rows);
            for (int j = 0; j < 8; j++) v_store(dst + (t * D + r + j) * 8, rows[j]);
        }
        for (int64_t r = D8; r < D; r++) {
            float *restrict d = dst + (t * D + r) * 8;
            for (int l = 0; l < 8; l++) d[l] = lane[l][at + r];
        }
    }
}

/* the inverse of gather, for the lanes below P (a whole group by transposes, as gather) */
static void scatter(int64_t P, int64_t NH, int64_t S, int64_t D, int64_t p0,
                    const float *restrict src, float *x, const int64_t *s)
{
    const int lanes = P - p0 < 8 ? (int)(P - p0) : 8;
    float *lane[8];
    for (int l = 0; l < lanes; l++) {
        const int64_t p = p0 + l;
        lane[l] = x + (p / NH) * s[0] + (p % NH) * s[1];
    }
    const int64_t D8 = lanes == 8 ? D - D % 8 : 0;
    for (int64_t t = 0; t < S; t++) {
        const int64_t at = t * s[2];
        for (int64_t r = 0; r < D8; r += 8) {
            vf cols[8];
            for (int j = 0; j < 8; j++) cols[j] = v_load(src + (t * D + r + j) * 8);
            v_transpose8(cols);
            for (int l = 0; l < 8; l++) v_store(lane[l] + at + r, cols[l]);
        }
        for (int64_t r = D8; r < D; r++)
            for (int l = 0; l < lanes; l++) lane[l][at + r] = src[(t * D + r) * 8 + l];
    }
}

/* a = logsigmoid(f~) + m_prev; m = max(a, i~) (i~ on a tie); fg = exp(a - m); ig = exp(i~ - m) */
INLINE vf gates(vf ip, vf fp, vf m_prev, vf *m, vf *ig, vf *fg)
{
    const vf a = v_logsigmoid(fp) + m_prev;
    const vf mt = v_select(a > ip, a, ip);
    *m = mt;
    *fg = v_exp(a - mt);
    *ig = v_exp(ip - mt);
    return a;
}

/* inv = s / (max(|qn| s, E) + eps s), s = exp(min(m, 0)), E = exp(-max(m, 0)); and its
 * derivatives by qn and by m */
INLINE vf inverse_normaliser(vf qn, vf m, float eps, vf *d_qn, vf *d_m)
{
    const vf zero = v_zero();
    const vf s = v_exp(v_select(m < zero, m, zero)), E = v_exp(-v_select(m > zero, m, zero));
    const vf aq = v_abs(qn) * s;
    const vi q_branch = aq >= E;
    const vf den = v_select(q_branch, aq, E) + eps * s;
    const vf inv = s / den;
    const vf sign = v_select(qn > zero, v_splat(1.0f), v_select(qn < zero, v_splat(-1.0f), zero));
    *d_qn = v_select(q_branch, -inv * inv * sign, zero);
    *d_m = v_select(q_branch, zero, inv * E / den);
    return inv;
}

/* Sizes in floats, per group of eight lanes: saved S (DV + 2) 8; ckpt ceil(S / T) (QV + DQK) 8.
 * Workspace per call: forward S (2 DQK + 2 DV + 2) 8 + (QV + DQK) 8. */
INLINE void fwd_groups(int64_t g0, int64_t g1, int64_t P, int64_t NH, int64_t S, int64_t DQK,
                       int64_t DV, int64_t T, float eps, const int64_t *st, const float *q,
                       const float *k, const float *v, const float *ip, const float *fp,
                       float *h, float *saved, float *ckpt, float *ws)
{
    const int64_t QV = DQK * DV, nseg = (S + T - 1) / T;
    const float scale = 1.0f / sqrtf((float)DQK);
    float *qT = ws, *kT = qT + S * DQK * 8, *vT = kT + S * DQK * 8, *hT = vT + S * DV * 8;
    float *ipT = hT + S * DV * 8, *fpT = ipT + S * 8, *C = fpT + S * 8, *n = C + QV * 8;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t p0 = 8 * g;
        float *sv = saved + g * S * (DV + 2) * 8, *sm = sv + S * DV * 8, *sqn = sm + S * 8;
        float *ck = ckpt + g * nseg * (QV + DQK) * 8;
        gather(P, NH, S, DQK, p0, q, st + 0, qT);
        gather(P, NH, S, DQK, p0, k, st + 3, kT);
        gather(P, NH, S, DV, p0, v, st + 6, vT);
        gather(P, NH, S, 1, p0, ip, st + 9, ipT);
        gather(P, NH, S, 1, p0, fp, st + 12, fpT);
        memset(C, 0, sizeof(float) * (QV + DQK) * 8);
        vf m = v_zero();
        for (int64_t t = 0; t < S; t++) {
            if (t % T == 0)  /* the states entering this segment */
                memcpy(ck + (t / T) * (QV + DQK) * 8, C, sizeof(float) * (QV + DQK) * 8);
            vf mt, ig, fg;
            gates(v_load(ipT + t * 8), v_load(fpT + t * 8), m, &mt, &ig, &fg);
            const float *qt = qT + t * DQK * 8, *kt = kT + t * DQK * 8, *vt = vT + t * DV * 8;
            vf hn[DMAX], vv[DMAX], qn = v_zero();
            for (int64_t c = 0; c < DV; c++) {
                hn[c] = v_zero();
                vv[c] = v_load(vt + c * 8);
            }
            for (int64_t r = 0; r < DQK; r++) {
                const vf kr = ig * scale * v_load(kt + r * 8), qr = v_load(qt + r * 8);
                float *Cr = C + r * DV * 8;
                for (int64_t c = 0; c < DV; c++) {
                    const vf cv = fg * v_load(Cr + c * 8) + kr * vv[c];
                    v_store(Cr + c * 8, cv);
                    hn[c] += qr * cv;
                }
                const vf nr = fg * v_load(n + r * 8) + kr;
                v_store(n + r * 8, nr);
                qn += qr * nr;
            }
            m = mt;
            vf unused1, unused2;
            const vf inv = inverse_normaliser(qn, m, eps, &unused1, &unused2);
            for (int64_t c = 0; c < DV; c++) {
                v_store(hT + (t * DV + c) * 8, hn[c] * inv);
                v_store(sv + (t * DV + c) * 8, hn[c]);
            }
            v_store(sm + t * 8, m);
            v_store(sqn + t * 8, qn);
        }
        scatter(P, NH, S, DV, p0, hT, h, st + 15);
    }
}

void mad_mlstm8_fwd(int64_t g0, int64_t g1, int64_t P, int64_t NH, int64_t S, int64_t DQK,
                    int64_t DV, int64_t T, float eps, const int64_t *st, const float *q,
                    const float *k, const float *v, const float *ip, const float *fp, float *h,
                    float *saved, float *ckpt, float *ws)
{
#define FWD(D) fwd_groups(g0, g1, P, NH, S, D, D, T, eps, st, q, k, v, ip, fp, h, saved, ckpt, ws)
    if (DQK == DV) {
        V8_BY_HEAD_SIZE(FWD, DQK)
    } else {
        fwd_groups(g0, g1, P, NH, S, DQK, DV, T, eps, st, q, k, v, ip, fp, h, saved, ckpt, ws);
    }
#undef FWD
}

/* Workspace per call: S (4 DQK + 3 DV + 4) 8 + (T + 2) (QV + DQK) 8 floats. Strides st: q, k,
 * v, i~, f~, dh, dq, dk, dv, di, df. */
INLINE void bwd_groups(int64_t g0, int64_t g1, int64_t P, int64_t NH, int64_t S, int64_t DQK,
                       int64_t DV, int64_t T, float eps, const int64_t *st, const float *q,
                       const float *k, const float *v, const float *ip, const float *fp,
                       const float *dh, const float *saved, const float *ckpt, float *dq,
                       float *dk, float *dv, float *di, float *df, float *ws)
{
    const int64_t QV = DQK * DV, nseg = (S + T - 1) / T;
    const float scale = 1.0f / sqrtf((float)DQK);
    float *qT = ws, *kT = qT + S * DQK * 8, *vT = kT + S * DQK * 8, *dhT = vT + S * DV * 8;
    float *ipT = dhT + S * DV * 8, *fpT = ipT + S * 8;
    float *dqT = fpT + S * 8, *dkT = dqT + S * DQK * 8, *dvT = dkT + S * DQK * 8;
    float *diT = dvT + S * DV * 8, *dfT = diT + S * 8;
    float *Cs = dfT + S * 8, *Ns = Cs + (T + 1) * QV * 8;  /* slot 0: the entering state */
    float *dC = Ns + (T + 1) * DQK * 8, *dn = dC + QV * 8;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t p0 = 8 * g;
        const float *shn = saved + g * S * (DV + 2) * 8, *sm = shn + S * DV * 8;
        const float *sqn = sm + S * 8;
        const float *ck = ckpt + g * nseg * (QV + DQK) * 8;
        gather(P, NH, S, DQK, p0, q, st + 0, qT);
        gather(P, NH, S, DQK, p0, k, st + 3, kT);
        gather(P, NH, S, DV, p0, v, st + 6, vT);
        gather(P, NH, S, 1, p0, ip, st + 9, ipT);
        gather(P, NH, S, 1, p0, fp, st + 12, fpT);
        gather(P, NH, S, DV, p0, dh, st + 15, dhT);
        memset(dC, 0, sizeof(float) * (QV + DQK) * 8);
        vf dm_next = v_zero();
        for (int64_t seg = nseg - 1; seg >= 0; seg--) {
            const int64_t t0 = seg * T, t1 = t0 + T < S ? t0 + T : S;
            memcpy(Cs, ck + seg * (QV + DQK) * 8, sizeof(float) * QV * 8);
            memcpy(Ns, ck + seg * (QV + DQK) * 8 + QV * 8, sizeof(float) * DQK * 8);
            for (int64_t t = t0; t < t1; t++) {  /* the segment's states, forwards */
                vf mt, ig, fg;
                gates(v_load(ipT + t * 8), v_load(fpT + t * 8),
                      t > 0 ? v_load(sm + (t - 1) * 8) : v_zero(), &mt, &ig, &fg);
                const float *kt = kT + t * DQK * 8, *vt = vT + t * DV * 8;
                const float *Cp = Cs + (t - t0) * QV * 8, *np = Ns + (t - t0) * DQK * 8;
                float *Cn = Cs + (t - t0 + 1) * QV * 8, *nn = Ns + (t - t0 + 1) * DQK * 8;
                for (int64_t r = 0; r < DQK; r++) {
                    const vf kr = ig * scale * v_load(kt + r * 8);
                    for (int64_t c = 0; c < DV; c++)
                        v_store(Cn + (r * DV + c) * 8,
                                fg * v_load(Cp + (r * DV + c) * 8) + kr * v_load(vt + c * 8));
                    v_store(nn + r * 8, fg * v_load(np + r * 8) + kr);
                }
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {  /* the adjoint, backwards */
                const vf ipt = v_load(ipT + t * 8), fpt = v_load(fpT + t * 8);
                vf mt, ig, fg, d_qn_d, d_m_d;
                const vf a = gates(ipt, fpt, t > 0 ? v_load(sm + (t - 1) * 8) : v_zero(), &mt,
                                   &ig, &fg);
                const vf inv = inverse_normaliser(v_load(sqn + t * 8), mt, eps, &d_qn_d, &d_m_d);
                const float *qt = qT + t * DQK * 8, *kt = kT + t * DQK * 8;
                const float *vt = vT + t * DV * 8, *dht = dhT + t * DV * 8;
                const float *hn = shn + t * DV * 8;
                vf dhn[DMAX], vv[DMAX], dva[DMAX], d_inv = v_zero();
                for (int64_t c = 0; c < DV; c++) {
                    const vf dhc = v_load(dht + c * 8);
                    d_inv += dhc * v_load(hn + c * 8);
                    dhn[c] = dhc * inv;
                    vv[c] = v_load(vt + c * 8);
                    dva[c] = v_zero();
                }
                const vf d_qn = d_inv * d_qn_d;
                vf dm = dm_next + d_inv * d_m_d, d_fg = v_zero(), d_ig = v_zero();
                const float *Ct = Cs + (t - t0 + 1) * QV * 8, *Cp = Cs + (t - t0) * QV * 8;
                const float *nt = Ns + (t - t0 + 1) * DQK * 8, *np = Ns + (t - t0) * DQK * 8;
                for (int64_t r = 0; r < DQK; r++) {
                    const vf qr = v_load(qt + r * 8), ksr = scale * v_load(kt + r * 8);
                    const vf dnr = v_load(dn + r * 8) + qr * d_qn;
                    vf acc_q = v_load(nt + r * 8) * d_qn, acc_v = dnr, acc_f = v_zero();
                    float *dCr = dC + r * DV * 8;
                    const float *Ctr = Ct + r * DV * 8, *Cpr = Cp + r * DV * 8;
                    for (int64_t c = 0; c < DV; c++) {
                        const vf gr = v_load(dCr + c * 8) + qr * dhn[c];  /* dL/dC_t */
                        acc_q += v_load(Ctr + c * 8) * dhn[c];
                        acc_v += gr * vv[c];
                        acc_f += gr * v_load(Cpr + c * 8);
                        dva[c] += gr * ksr;
                        v_store(dCr + c * 8, fg * gr);
                    }
                    d_fg += acc_f + dnr * v_load(np + r * 8);
                    d_ig += acc_v * ksr;
                    v_store(dkT + (t * DQK + r) * 8, ig * acc_v * scale);
                    v_store(dqT + (t * DQK + r) * 8, acc_q);
                    v_store(dn + r * 8, dnr * fg);
                }
                for (int64_t c = 0; c < DV; c++) v_store(dvT + (t * DV + c) * 8, ig * dva[c]);
                vf d_a = d_fg * fg, d_i = d_ig * ig;
                dm -= d_a + d_i;
                const vi a_won = a > ipt;
                d_a += v_select(a_won, dm, v_zero());
                d_i += v_select(a_won, v_zero(), dm);
                v_store(diT + t * 8, d_i);
                v_store(dfT + t * 8, d_a * v_sigmoid(-fpt));  /* d logsigmoid = sigmoid(-f~) */
                dm_next = d_a;
            }
        }
        scatter(P, NH, S, DQK, p0, dqT, dq, st + 18);
        scatter(P, NH, S, DQK, p0, dkT, dk, st + 21);
        scatter(P, NH, S, DV, p0, dvT, dv, st + 24);
        scatter(P, NH, S, 1, p0, diT, di, st + 27);
        scatter(P, NH, S, 1, p0, dfT, df, st + 30);
    }
}

void mad_mlstm8_bwd(int64_t g0, int64_t g1, int64_t P, int64_t NH, int64_t S, int64_t DQK,
                    int64_t DV, int64_t T, float eps, const int64_t *st, const float *q,
                    const float *k, const float *v, const float *ip, const float *fp,
                    const float *dh, const float *saved, const float *ckpt, float *dq,
                    float *dk, float *dv, float *di, float *df, float *ws)
{
#define BWD(D) bwd_groups(g0, g1, P, NH, S, D, D, T, eps, st, q, k, v, ip, fp, dh, saved, ckpt, \
                          dq, dk, dv, di, df, ws)
    if (DQK == DV) {
        V8_BY_HEAD_SIZE(BWD, DQK)
    } else {
        bwd_groups(g0, g1, P, NH, S, DQK, DV, T, eps, st, q, k, v, ip, fp, dh, saved, ckpt, dq,
                   dk, dv, di, df, ws);
    }
#undef BWD
}
