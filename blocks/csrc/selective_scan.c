/* mad-search: Mamba's selective scan on the CPU, forward and backward, float32.
 *
 * Per batch element, inner channel d and state index n (Gu & Dao 2023, Algorithm 2):
 *     a_t = exp(delta_t[d] A[n, d]),   h_t[n, d] = a_t h_{t-1}[n, d] + delta_t[d] u_t[d] B_t[n],
 *     y_t[d] = sum_n C_t[n] h_t[n, d]                         (the D skip is added by the caller)
 * The state (d_state x d_inner floats) stays in cache; nothing of size batch x seq x d_inner x
 * d_state is ever written. The loops run over d innermost, so gcc vectorises them (state and A
 * are laid out (d_state, d_inner); A arrives transposed). The backward recomputes the states of
 * one batch element and their decays a_t into a workspace (2 x seq x d_state x d_inner floats)
 * and runs the adjoint recurrence g_t = dy_t[d] C_t[n] + a_{t+1} g_{t+1} backwards, as the CUDA
 * kernel of the paper does. Layouts, all contiguous: u, delta, y, du, ddelta (batch, seq, E); B, C, dB, dC
 * (batch, seq, N); At, dAt (N, E). Each call handles batch elements [b0, b1); dAt accumulates.
 */
#include <stdint.h>
#include <string.h>

#include "fastmath.h"

void mad_selective_scan_fwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                            const float *u, const float *delta, const float *At,
                            const float *B, const float *C, float *y, float *h)
{
    for (int64_t b = b0; b < b1; b++) {
        memset(h, 0, sizeof(float) * N * E);
        for (int64_t t = 0; t < S; t++) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *dt = delta + r * E, *Bt = B + r * N, *Ct = C + r * N;
            float *yt = y + r * E;
            for (int64_t d = 0; d < E; d++) yt[d] = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                const float *An = At + n * E;
                float *hn = h + n * E;
                const float bn = Bt[n], cn = Ct[n];
                for (int64_t d = 0; d < E; d++) {
                    float hv = exp_f(dt[d] * An[d]) * hn[d] + dt[d] * ut[d] * bn;
                    hn[d] = hv;
                    yt[d] += cn * hv;
                }
            }
        }
    }
}

/* One step t and state index n of the backward, over the channels d (restrict: nothing aliases,
 * so gcc vectorises it without runtime checks). g: a_{t+1} g_{t+1} in, a_t g_t out. */
static inline void adjoint_row(int64_t E, const float *restrict An, const float *restrict hn,
                               const float *restrict pn, const float *restrict an,
                               const float *restrict dyt,
                               const float *restrict dt, const float *restrict ut, float bn,
                               float cn, float *restrict gn, float *restrict dAn,
                               float *restrict sb, float *restrict sd, float *restrict dC,
                               float *restrict dB)
{
    float acc_c = 0.0f, acc_b = 0.0f;
    for (int64_t d = 0; d < E; d++) {
        const float gv = dyt[d] * cn + gn[d];
        const float a = an[d];
        const float dlog_a = gv * a * pn[d];                /* dL/d(delta_t A) */
        acc_c += dyt[d] * hn[d];
        acc_b += gv * dt[d] * ut[d];
        sb[d] += gv * bn;                                   /* dL/d(delta_t u_t) */
        sd[d] += dlog_a * An[d];
        dAn[d] += dlog_a * dt[d];
        gn[d] = a * gv;
    }
    *dC = acc_c;
    *dB = acc_b;
}

/* ws: (2 S + 2) * N * E + 2 E floats: zeros (the state before t = 0), the states h_t of one
 * batch element, the adjoint, two sums over n, the decays a_t of the states (computed once in
 * the recomputation and read back by the adjoint, not recomputed there) */
void mad_selective_scan_bwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                            const float *u, const float *delta, const float *At,
                            const float *B, const float *C, const float *dy,
                            float *du, float *ddelta, float *dAt, float *dB, float *dC,
                            float *ws)
{
    const int64_t NE = N * E;
    float *H = ws + NE, *g = H + S * NE, *sb = g + NE, *sd = sb + E, *Aexp = sd + E;
    memset(ws, 0, sizeof(float) * NE);
    for (int64_t b = b0; b < b1; b++) {
        /* 1. the states h_t, t = 0 .. S-1 */
        for (int64_t t = 0; t < S; t++) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *dt = delta + r * E, *Bt = B + r * N;
            float *Ht = H + t * NE, *At_exp = Aexp + t * NE;
            const float *Hp = Ht - NE;                      /* zeros before t = 0 */
            for (int64_t n = 0; n < N; n++) {
                const float *An = At + n * E, *pn = Hp + n * E;
                const float bn = Bt[n];
                float *hn = Ht + n * E, *an = At_exp + n * E;
                for (int64_t d = 0; d < E; d++) {
                    const float a = exp_f(dt[d] * An[d]);
                    an[d] = a;
                    hn[d] = a * pn[d] + dt[d] * ut[d] * bn;
                }
            }
        }
        /* 2. the adjoint, backwards; g holds a_{t+1} g_{t+1} on entry to step t */
        memset(g, 0, sizeof(float) * NE);
        for (int64_t t = S - 1; t >= 0; t--) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *dt = delta + r * E, *Bt = B + r * N, *Ct = C + r * N;
            const float *dyt = dy + r * E, *Ht = H + t * NE;
            const float *Hp = Ht - NE;
            float *dBt = dB + r * N, *dCt = dC + r * N;
            for (int64_t d = 0; d < E; d++) { sb[d] = 0.0f; sd[d] = 0.0f; }
            for (int64_t n = 0; n < N; n++)
                adjoint_row(E, At + n * E, Ht + n * E, Hp + n * E, Aexp + t * NE + n * E, dyt,
                            dt, ut, Bt[n], Ct[n],
                            g + n * E, dAt + n * E, sb, sd, dCt + n, dBt + n);
            float *dut = du + r * E, *ddt = ddelta + r * E;
            for (int64_t d = 0; d < E; d++) {
                dut[d] = sb[d] * dt[d];
                ddt[d] = sd[d] + sb[d] * ut[d];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The whole of Mamba's gated scan in one pass each way, eight channels at a time (E % 8 == 0):
 *     delta_t = softplus(draw_t),  h_t, y_t as above,
 *     ypre_t  = y_t + D u_t,       out_t = ypre_t SiLU(z_t)
 * so softplus, the D skip and the SiLU gate are never separate tensors. One block of eight
 * channels runs the whole sequence with its N state vectors in L1; the backward keeps that
 * block's states h_t and decays a_t (2 x S x N x 8 floats, in L2 at the MAD sizes) and sums
 * dB_t[n], dC_t[n] over the blocks as vectors, their lanes added once per batch element.
 * B and C are rows of x_proj's output and z rows of in_proj's: they are read with their row
 * strides (bc_stride, z_stride floats), not copied. ypre (batch, seq, E) is written by the
 * forward for the backward. dAt (N, E) and dD (E) accumulate.
 * ------------------------------------------------------------------------------------------ */
#include "vec8.h"

V8_INLINE vf v_softplus(vf x)
{
    return v_select(x > 0.0f, x, v_zero()) + v_log1p_unit(v_exp(-v_abs(x)));
}

/* ws: N x 8 floats (the states of one block) */
void mad_mamba_scan_fwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                        int64_t bc_stride, int64_t z_stride,
                        const float *u, const float *draw, const float *At, const float *B,
                        const float *C, const float *D, const float *z, float *ypre, float *out,
                        float *ws)
{
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t j = 0; j < E; j += 8) {
            for (int64_t n = 0; n < N; n++) v_store(ws + 8 * n, v_zero());
            const vf Dj = v_load(D + j);
            for (int64_t t = 0; t < S; t++) {
                const int64_t r = b * S + t;
                const vf delta = v_softplus(v_load(draw + r * E + j));
                const vf ut = v_load(u + r * E + j);
                const vf du = delta * ut;
                const float *Bt = B + r * bc_stride, *Ct = C + r * bc_stride;
                vf y = v_zero();
                for (int64_t n = 0; n < N; n++) {
                    const vf a = v_exp(delta * v_load(At + n * E + j));
                    const vf h = a * v_load(ws + 8 * n) + du * Bt[n];
                    v_store(ws + 8 * n, h);
                    y += h * Ct[n];
                }
                y += Dj * ut;
                v_store(ypre + r * E + j, y);
                const vf zt = v_load(z + r * z_stride + j);
                v_store(out + r * E + j, y * zt * v_sigmoid(zt));
            }
        }
    }
}

/* ws: (4 S + 2) x N x 8 + 8 floats: the states and decays of one block, dB and dC summed over
 * the blocks as vectors, the adjoint and dA of one block, dD of one block */
void mad_mamba_scan_bwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                        int64_t bc_stride, int64_t z_stride,
                        const float *u, const float *draw, const float *At, const float *B,
                        const float *C, const float *D, const float *z, const float *ypre,
                        const float *dout, float *du, float *ddraw, float *dAt, float *dB,
                        float *dC, float *dD, float *dz, float *ws)
{
    const int64_t SN8 = S * N * 8;
    float *H = ws, *Ax = H + SN8, *dBv = Ax + SN8, *dCv = dBv + SN8, *g = dCv + SN8,
          *dA = g + 8 * N;
    for (int64_t b = b0; b < b1; b++) {
        memset(dBv, 0, sizeof(float) * 2 * SN8);
        for (int64_t j = 0; j < E; j += 8) {
            /* 1. the block's states h_t and decays a_t */
            for (int64_t t = 0; t < S; t++) {
                const int64_t r = b * S + t;
                const vf delta = v_softplus(v_load(draw + r * E + j));
                const vf dlu = delta * v_load(u + r * E + j);
                const float *Bt = B + r * bc_stride;
                float *Ht = H + t * N * 8, *At_ = Ax + t * N * 8;
                for (int64_t n = 0; n < N; n++) {
                    const vf a = v_exp(delta * v_load(At + n * E + j));
                    const vf hp = t ? v_load(Ht - N * 8 + 8 * n) : v_zero();
                    v_store(At_ + 8 * n, a);
                    v_store(Ht + 8 * n, a * hp + dlu * Bt[n]);
                }
            }
            /* 2. the adjoint, backwards; g holds a_{t+1} g_{t+1} on entry to step t */
            for (int64_t n = 0; n < N; n++) {
                v_store(g + 8 * n, v_zero());
                v_store(dA + 8 * n, v_zero());
            }
            const vf Dj = v_load(D + j);
            vf dDj = v_zero();
            for (int64_t t = S - 1; t >= 0; t--) {
                const int64_t r = b * S + t;
                const vf x = v_load(draw + r * E + j);
                const vf sx = v_sigmoid(x);
                const vf delta = v_softplus(x);
                const vf ut = v_load(u + r * E + j), dlu = delta * ut;
                const vf zt = v_load(z + r * z_stride + j), sz = v_sigmoid(zt);
                const vf dot = v_load(dout + r * E + j);
                const vf dy = dot * zt * sz;                     /* dL/d ypre_t */
                const vf yp = v_load(ypre + r * E + j);
                v_store(dz + r * E + j, dot * yp * sz * (1.0f + zt * (1.0f - sz)));
                dDj += dy * ut;
                const float *Bt = B + r * bc_stride, *Ct = C + r * bc_stride;
                const float *Ht = H + t * N * 8, *At_ = Ax + t * N * 8;
                float *dBt = dBv + t * N * 8, *dCt = dCv + t * N * 8;
                vf sb = v_zero(), sd = v_zero();
                for (int64_t n = 0; n < N; n++) {
                    const vf gv = dy * Ct[n] + v_load(g + 8 * n);
                    const vf a = v_load(At_ + 8 * n);
                    const vf hp = t ? v_load(Ht - N * 8 + 8 * n) : v_zero();
                    const vf dlog_a = gv * a * hp;               /* dL/d(delta_t A) */
                    v_store(dCt + 8 * n, v_load(dCt + 8 * n) + dy * v_load(Ht + 8 * n));
                    v_store(dBt + 8 * n, v_load(dBt + 8 * n) + gv * dlu);
                    sb += gv * Bt[n];
                    const vf An = v_load(At + n * E + j);
                    sd += dlog_a * An;
                    v_store(dA + 8 * n, v_load(dA + 8 * n) + dlog_a * delta);
                    v_store(g + 8 * n, a * gv);
                }
                v_store(du + r * E + j, sb * delta + dy * Dj);
                v_store(ddraw + r * E + j, (sd + sb * ut) * sx);
            }
            for (int64_t n = 0; n < N; n++)
                v_store(dAt + n * E + j, v_load(dAt + n * E + j) + v_load(dA + 8 * n));
            v_store(dD + j, v_load(dD + j) + dDj);
        }
        for (int64_t t = 0; t < S; t++)
            for (int64_t n = 0; n < N; n++) {
                const int64_t r = b * S + t;
                dB[r * N + n] = v_sum(v_load(dBv + (t * N + n) * 8));
                dC[r * N + n] = v_sum(v_load(dCv + (t * N + n) * 8));
            }
    }
}
