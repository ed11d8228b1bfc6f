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
 * Every entry point flushes denormals to zero while it runs (fastmath.h: decays of 1e-38 made
 * the backward spend half its time in the CPU's denormal assists) and restores the mode after.
 */
#include <stdint.h>
#include <string.h>

#include "fastmath.h"

/* One step t and state index n of the forward, over the channels d: the state row h[n, :]
 * advanced by its decay and input, and its share of y_t added (restrict: gcc vectorises it). */
static inline void state_row(int64_t E, const float *restrict An, const float *restrict dt,
                             const float *restrict dlu, float bn, float cn, float *restrict hn,
                             float *restrict yt)
{
    for (int64_t d = 0; d < E; d++) {
        const float hv = exp_f(dt[d] * An[d]) * hn[d] + dlu[d] * bn;
        hn[d] = hv;
        yt[d] += cn * hv;
    }
}

void mad_selective_scan_fwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                            const float *u, const float *delta, const float *At,
                            const float *B, const float *C, float *y, float *h)
{
    const mad_fp_state fp = mad_flush_denormals();
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
    mad_restore_fp(fp);
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
    const mad_fp_state fp = mad_flush_denormals();
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
    mad_restore_fp(fp);
}

/* ---------------------------------------------------------------------------------------------
 * The whole of Mamba's gated scan in one pass each way (E % 8 == 0):
 *     delta_t = softplus(draw_t),  h_t, y_t as above,
 *     ypre_t  = y_t + D u_t,       out_t = ypre_t SiLU(z_t)
 * so softplus, the D skip and the SiLU gate are never separate tensors: each step's rows of
 * delta (and, backwards, of SiLU(z)'s derivative and dL/d ypre) are made in row buffers on
 * 8-float vectors around the same (n, d) loops as above. B and C are rows of x_proj's output
 * and z rows of in_proj's: they are read with their row strides (bc_stride, z_stride floats),
 * not copied. The forward writes only out; the backward recomputes delta, the sigmoids and
 * ypre with the states. dAt (N, E) and dD (E) accumulate.
 * ------------------------------------------------------------------------------------------ */
#include "vec8.h"

/* The backward's recomputation of one state row (as state_row, from the previous state pn),
 * keeping the decays a_t and the states for the adjoint (restrict: gcc vectorises it). */
static inline void recompute_row(int64_t E, const float *restrict An, const float *restrict dl,
                                 const float *restrict ut, float bn, float cn,
                                 const float *restrict pn, float *restrict an,
                                 float *restrict hn, float *restrict yt)
{
    for (int64_t d = 0; d < E; d++) {
        const float a = exp_f(dl[d] * An[d]);
        const float hv = a * pn[d] + dl[d] * ut[d] * bn;
        an[d] = a;
        hn[d] = hv;
        yt[d] += cn * hv;
    }
}

/* softplus(x) = max(x, 0) + log(1 + e) and its derivative sigmoid(x), from one e = exp(-|x|) */
V8_INLINE void v_softplus_sigmoid(vf x, vf *sp, vf *sig)
{
    const vf e = v_exp(-v_abs(x));
    *sp = v_select(x > 0.0f, x, v_zero()) + v_log1p_unit(e);
    *sig = v_select(x >= 0.0f, v_splat(1.0f), e) / (1.0f + e);
}

/* ws: (N + 3) x E floats: the state, and rows of delta, delta u and y. Only out is written:
 * memory traffic, not arithmetic, is what a pass over (batch, seq, E) costs here, so the
 * backward recomputes delta, the sigmoids and ypre rather than reading them back. */
void mad_mamba_scan_fwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                        int64_t bc_stride, int64_t z_stride,
                        const float *u, const float *draw, const float *At, const float *B,
                        const float *C, const float *D, const float *z, float *out, float *ws)
{
    const mad_fp_state fp = mad_flush_denormals();
    float *h = ws, *dl = h + N * E, *dlu = dl + E, *y = dlu + E;
    for (int64_t b = b0; b < b1; b++) {
        memset(h, 0, sizeof(float) * N * E);
        for (int64_t t = 0; t < S; t++) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *Bt = B + r * bc_stride, *Ct = C + r * bc_stride;
            for (int64_t j = 0; j < E; j += 8) {
                const vf x = v_load(draw + r * E + j), e = v_exp(-v_abs(x));
                const vf dv = v_select(x > 0.0f, x, v_zero()) + v_log1p_unit(e);
                v_store(dl + j, dv);
                v_store(dlu + j, dv * v_load(ut + j));
                v_store(y + j, v_zero());
            }
            for (int64_t n = 0; n < N; n++)
                state_row(E, At + n * E, dl, dlu, Bt[n], Ct[n], h + n * E, y);
            const float *zt = z + r * z_stride;
            for (int64_t j = 0; j < E; j += 8) {
                const vf v = v_load(y + j) + v_load(D + j) * v_load(ut + j);
                const vf zv = v_load(zt + j);
                v_store(out + r * E + j, v * zv * v_sigmoid(zv));
            }
        }
    }
    mad_restore_fp(fp);
}

/* ws: (2 S + 2) x N x E + (3 S + 3) x E floats: zeros (the state before t = 0), the states h_t
 * of one batch element, their decays a_t, the adjoint; rows of delta, sigmoid(draw) and y for
 * every t (made by the recomputation, read by the adjoint); rows of dL/d ypre and two sums */
void mad_mamba_scan_bwd(int64_t b0, int64_t b1, int64_t S, int64_t E, int64_t N,
                        int64_t bc_stride, int64_t z_stride,
                        const float *u, const float *draw, const float *At, const float *B,
                        const float *C, const float *D, const float *z, const float *dout,
                        float *du, float *ddraw, float *dAt, float *dB, float *dC, float *dD,
                        float *dz, float *ws)
{
    const mad_fp_state fp = mad_flush_denormals();
    const int64_t NE = N * E;
    float *H = ws + NE, *Aexp = H + S * NE, *g = Aexp + S * NE, *DL = g + NE, *SX = DL + S * E,
          *Y = SX + S * E, *dy = Y + S * E, *sb = dy + E, *sd = sb + E;
    memset(ws, 0, sizeof(float) * NE);
    for (int64_t b = b0; b < b1; b++) {
        /* 1. the states h_t, their decays a_t, and the rows delta_t, sigmoid(draw_t), y_t */
        for (int64_t t = 0; t < S; t++) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *Bt = B + r * bc_stride, *Ct = C + r * bc_stride;
            float *dl = DL + t * E, *yt = Y + t * E;
            for (int64_t j = 0; j < E; j += 8) {
                vf dv, sig;
                v_softplus_sigmoid(v_load(draw + r * E + j), &dv, &sig);
                v_store(dl + j, dv);
                v_store(SX + t * E + j, sig);
                v_store(yt + j, v_zero());
            }
            float *Ht = H + t * NE, *At_exp = Aexp + t * NE;
            const float *Hp = Ht - NE;                      /* zeros before t = 0 */
            for (int64_t n = 0; n < N; n++) {
                const float *An = At + n * E, *pn = Hp + n * E;
                const float bn = Bt[n], cn = Ct[n];
                recompute_row(E, An, dl, ut, bn, cn, pn, At_exp + n * E, Ht + n * E, yt);
            }
        }
        /* 2. the adjoint, backwards; g holds a_{t+1} g_{t+1} on entry to step t */
        memset(g, 0, sizeof(float) * NE);
        for (int64_t t = S - 1; t >= 0; t--) {
            const int64_t r = b * S + t;
            const float *ut = u + r * E, *dl = DL + t * E;
            const float *Bt = B + r * bc_stride, *Ct = C + r * bc_stride;
            const float *Ht = H + t * NE, *Hp = Ht - NE, *zt = z + r * z_stride;
            float *dBt = dB + r * N, *dCt = dC + r * N;
            for (int64_t j = 0; j < E; j += 8) {
                const vf zv = v_load(zt + j), s = v_sigmoid(zv), uv = v_load(ut + j);
                const vf go = v_load(dout + r * E + j), gy = go * zv * s;
                const vf yp = v_load(Y + t * E + j) + v_load(D + j) * uv;
                v_store(dy + j, gy);
                v_store(dz + r * E + j, go * yp * s * (1.0f + zv * (1.0f - s)));
                v_store(dD + j, v_load(dD + j) + gy * uv);
                v_store(sb + j, v_zero());
                v_store(sd + j, v_zero());
            }
            for (int64_t n = 0; n < N; n++)
                adjoint_row(E, At + n * E, Ht + n * E, Hp + n * E, Aexp + t * NE + n * E, dy,
                            dl, ut, Bt[n], Ct[n], g + n * E, dAt + n * E, sb, sd, dCt + n,
                            dBt + n);
            float *dut = du + r * E, *ddt = ddraw + r * E;
            for (int64_t j = 0; j < E; j += 8) {
                const vf sbv = v_load(sb + j);
                v_store(dut + j, sbv * v_load(dl + j) + v_load(dy + j) * v_load(D + j));
                v_store(ddt + j, (v_load(sd + j) + sbv * v_load(ut + j)) * v_load(SX + t * E + j));
            }
        }
    }
    mad_restore_fp(fp);
}
