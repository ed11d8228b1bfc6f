/* mad-search: the short causal depthwise convolution (mLSTM, sLSTM, Mamba, gated short conv),
 * forward and backward, float32, optionally followed by SiLU.
 *
 *     z[b, t, c] = bias[c] + sum_k w[k, c] x[b, t - K + 1 + k, c]     (zeros before t = 0)
 *     y = z (act 0)  or  y = SiLU(z) = z sigmoid(z) (act 1)
 *
 * x, y, dx, dy (B, S, C) contiguous; w, dw (K, C) (nn.Conv1d's (C, 1, K) transposed); bias, db
 * (C). A handful of multiply-adds per element; torch's convolutions (oneDNN's depthwise kernel
 * included) spend most of their time elsewhere, their backward above all, and a separate SiLU
 * is one more pass over memory each way.
 *
 * Eight channels at a time (vec8.h) along the whole sequence of one batch element: the K
 * weights, the bias and, in the backward, the K weight gradients and the bias gradient stay in
 * registers, and the rows read are the last K (in L1). With SiLU the forward also writes
 * s = sigmoid(z) (`sig`, the layout of y; NULL: not kept), and the backward recomputes z (K
 * multiply-adds) for SiLU's derivative, SiLU'(z) = s (1 + z (1 - s)), keeping dz of the eight
 * channels in `ws` ((S + K) x 8 floats) before the convolution's adjoint. The sequence goes in
 * tiles of rows whose slice of x (and dy, sigmoid) stays in L1 while the channel blocks cross
 * it: at wide inner sizes (256 channels) a whole sequence per channel block does not.
 * Channels past the last multiple of eight take the same steps one float at a time.
 * Each call handles batch elements [b0, b1); dw and db accumulate into the caller's buffers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define KMAX 16 /* kernels up to this length keep their weights in registers */


/* rows per tile of the sequence: a tile's rows of x, dy and sigmoid stay in L1 (about 16 KB
 * each) while the eight-channel blocks go across them */
static inline int64_t tile_rows(int64_t C) { return C >= 512 ? 8 : 4096 / (C > 8 ? C : 8); }

static inline float sigmoid_s(float z) { return 1.0f / (1.0f + expf(-z)); }

/* z of channels [c0, c0 + 8) at step t of one sequence (row stride C) */
V8_INLINE vf conv_at(const float *xb, int64_t C, int64_t K, int64_t t, int64_t c0,
                     const vf *wv, vf bv)
{
    vf acc = bv;
    for (int64_t k = t - K + 1 < 0 ? K - 1 - t : 0; k < K; k++)
        acc += wv[k] * v_load(xb + (t - K + 1 + k) * C + c0);
    return acc;
}

static float conv_at_s(const float *xb, int64_t C, int64_t K, int64_t t, int64_t c,
                       const float *w, float bias)
{
    float acc = bias;
    for (int64_t k = t - K + 1 < 0 ? K - 1 - t : 0; k < K; k++)
        acc += w[k * C + c] * xb[(t - K + 1 + k) * C + c];
    return acc;
}

V8_INLINE void fwd_seq(const float *xb, float *yb, float *sb, int64_t S, int64_t C, int64_t K,
                       int64_t act, const float *w, const float *bias)
{
    const int64_t C8 = K <= KMAX ? C - C % 8 : 0;
    const int64_t TT = tile_rows(C);
    for (int64_t t0 = 0; t0 < S; t0 += TT)
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
        vf wv[KMAX];
        for (int64_t k = 0; k < K; k++) wv[k] = v_load(w + k * C + c0);
        const vf bv = bias ? v_load(bias + c0) : v_zero();
        for (int64_t t = t0; t < (t0 + TT < S ? t0 + TT : S); t++) {
            const vf z = conv_at(xb, C, K, t, c0, wv, bv);
            if (act) {
                const vf sg = v_sigmoid(z);
                v_store(yb + t * C + c0, z * sg);
                if (sb) v_store(sb + t * C + c0, sg);
            } else {
                v_store(yb + t * C + c0, z);
            }
        }
    }
    for (int64_t c = C8; c < C; c++)
        for (int64_t t = 0; t < S; t++) {
            const float z = conv_at_s(xb, C, K, t, c, w, bias ? bias[c] : 0.0f);
            const float sg = act ? sigmoid_s(z) : 1.0f;
            yb[t * C + c] = z * sg;
            if (act && sb) sb[t * C + c] = sg;
        }
}

void mad_causal_conv_fwd(int64_t b0, int64_t b1, int64_t S, int64_t C, int64_t K, int64_t act,
                         const float *x, const float *w, const float *bias, float *y, float *sig)
{
    for (int64_t b = b0; b < b1; b++) {
        const int64_t at = b * S * C;
        float *sb = sig ? sig + at : NULL;
        /* the blocks' kernel lengths (4: mLSTM, sLSTM, Mamba; 3: short_conv's default) get
         * their loops unrolled and their weights and weight gradients kept in registers */
        if (K == 4)
            fwd_seq(x + at, y + at, sb, S, C, 4, act, w, bias);
        else if (K == 3)
            fwd_seq(x + at, y + at, sb, S, C, 3, act, w, bias);
        else
            fwd_seq(x + at, y + at, sb, S, C, K, act, w, bias);
    }
}

V8_INLINE void bwd_seq(const float *xb, const float *sb, const float *dyb, float *dxb, int64_t S,
                       int64_t C, int64_t K, int64_t act, const float *w, const float *bias,
                       float *dw, float *db, float *ws)
{
    const int64_t C8 = K <= KMAX ? C - C % 8 : 0, TT = tile_rows(C);
    {
        for (int64_t t0 = 0; t0 < S; t0 += TT)
        for (int64_t c0 = 0; c0 < C8; c0 += 8) {
            const int64_t t1 = t0 + TT < S ? t0 + TT : S, e = t1 + K - 1 < S ? t1 + K - 1 : S;
            vf wv[KMAX], dwv[KMAX], dbv = v_zero();
            for (int64_t k = 0; k < K; k++) {
                wv[k] = v_load(w + k * C + c0);
                dwv[k] = v_zero();
            }
            const vf bv = bias ? v_load(bias + c0) : v_zero();
            /* dz of the tile's rows and the K - 1 after them (ws row u - t0), then the adjoint
             * of the convolution for the tile's rows */
            if (act)
                for (int64_t t = t0; t < e; t++) {
                    const vf z = conv_at(xb, C, K, t, c0, wv, bv), sg = v_load(sb + t * C + c0);
                    v_store(ws + (t - t0) * 8,
                            v_load(dyb + t * C + c0) * (sg * (1.0f + z * (1.0f - sg))));
                }
#define DZ(u) (act ? v_load(ws + ((u) - t0) * 8) : v_load(dyb + (u) * C + c0))
            for (int64_t t = t0; t < t1; t++) {
                /* y[t + K - 1 - k] read x[t] with w[k]; y[t] read x[t - K + 1 + k] with w[k] */
                const vf dzt = DZ(t);
                vf dxt = v_zero();
                for (int64_t k = 0; k < K; k++) {
                    const int64_t u = t + K - 1 - k, s = t - K + 1 + k;
                    if (u < S) dxt += wv[k] * DZ(u);
                    if (s >= 0) dwv[k] += dzt * v_load(xb + s * C + c0);
                }
                dbv += dzt;
                v_store(dxb + t * C + c0, dxt);
            }
#undef DZ
            for (int64_t k = 0; k < K; k++)
                v_store(dw + k * C + c0, v_load(dw + k * C + c0) + dwv[k]);
            if (db) v_store(db + c0, v_load(db + c0) + dbv);
        }
        for (int64_t c = C8; c < C; c++) {
            const float bc = bias ? bias[c] : 0.0f;
            for (int64_t t = 0; t < S; t++) {
                float d = dyb[t * C + c];
                if (act) {
                    const float z = conv_at_s(xb, C, K, t, c, w, bc), sg = sb[t * C + c];
                    d *= sg * (1.0f + z * (1.0f - sg));
                }
                ws[t] = d;
            }
            for (int64_t t = 0; t < S; t++) {
                float dxt = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    const int64_t u = t + K - 1 - k, s = t - K + 1 + k;
                    if (u < S) dxt += w[k * C + c] * ws[u];
                    if (s >= 0) dw[k * C + c] += ws[t] * xb[s * C + c];
                }
                if (db) db[c] += ws[t];
                dxb[t * C + c] = dxt;
            }
        }
    }
}

/* sig: the forward's (act 1; unused otherwise); ws: (S + K) * 8 floats */
void mad_causal_conv_bwd(int64_t b0, int64_t b1, int64_t S, int64_t C, int64_t K, int64_t act,
                         const float *x, const float *sig, const float *w, const float *bias,
                         const float *dy, float *dx, float *dw, float *db, float *ws)
{
    for (int64_t b = b0; b < b1; b++) {
        const int64_t at = b * S * C;
        const float *sb = act ? sig + at : NULL;
        if (K == 4)
            bwd_seq(x + at, sb, dy + at, dx + at, S, C, 4, act, w, bias, dw, db, ws);
        else if (K == 3)
            bwd_seq(x + at, sb, dy + at, dx + at, S, C, 3, act, w, bias, dw, db, ws);
        else
            bwd_seq(x + at, sb, dy + at, dx + at, S, C, K, act, w, bias, dw, db, ws);
    }
}

/* ---- Hyena's short filter: tiled input, channel-major output -------------------------------
 *
 *     z[b, c, t] = bias[c] + sum_k w[k, c] x[b, t - K + 1 + k, c mod Cin]     c < C = G Cin
 *
 * x (B, S, Cin) contiguous (the in-projection's output, repeated G times along the channels
 * without being copied: mad-lab's tied projection groups), y and dy (B, C, S) contiguous (the
 * layout the long convolution's FFT reads and writes along), dx (B, S, Cin); w, dw (K, C); bias,
 * db (C). Cin must be a multiple of eight (a block of eight output channels reads eight
 * consecutive input channels). No activation. Each eight-channel block goes along the whole
 * sequence in steps of eight positions: eight vectors of channels, one per position, turned
 * into eight vectors of positions by an in-register transpose, so y and dy are read and
 * written in rows. dx accumulates over the G groups that read the same input channels.
 */

/* z of the block's 8 channels at positions t0 ... t0 + 7 (all < S), as 8 rows of positions */
V8_INLINE void conv_tile_t(const float *xb, int64_t Cin, int64_t K, int64_t t0, int64_t ci0,
                           const vf *wv, vf bv, vf r[8])
{
    for (int64_t j = 0; j < 8; j++) r[j] = conv_at(xb, Cin, K, t0 + j, ci0, wv, bv);
    v_transpose8(r);
}

V8_INLINE void fwd_t_seq(const float *xb, float *yb, int64_t S, int64_t Cin, int64_t G,
                         int64_t K, const float *w, const float *bias)
{
    const int64_t C = G * Cin, S8 = S - S % 8;
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
        const int64_t ci0 = c0 % Cin;
        vf wv[KMAX], r[8];
        for (int64_t k = 0; k < K; k++) wv[k] = v_load(w + k * C + c0);
        const vf bv = bias ? v_load(bias + c0) : v_zero();
        for (int64_t t0 = 0; t0 < S8; t0 += 8) {
            conv_tile_t(xb, Cin, K, t0, ci0, wv, bv, r);
            for (int64_t j = 0; j < 8; j++) v_store(yb + (c0 + j) * S + t0, r[j]);
        }
        for (int64_t t = S8; t < S; t++) {
            float z[8];
            v_store(z, conv_at(xb, Cin, K, t, ci0, wv, bv));
            for (int64_t j = 0; j < 8; j++) yb[(c0 + j) * S + t] = z[j];
        }
    }
}

void mad_causal_conv_t_fwd(int64_t b0, int64_t b1, int64_t S, int64_t Cin, int64_t G, int64_t K,
                           const float *x, const float *w, const float *bias, float *y)
{
    const int64_t C = G * Cin;
    for (int64_t b = b0; b < b1; b++) {
        if (K == 3)
            fwd_t_seq(x + b * S * Cin, y + b * C * S, S, Cin, G, 3, w, bias);
        else if (K == 4)
            fwd_t_seq(x + b * S * Cin, y + b * C * S, S, Cin, G, 4, w, bias);
        else
            fwd_t_seq(x + b * S * Cin, y + b * C * S, S, Cin, G, K, w, bias);
    }
}

/* ws: (S + K) * 8 floats, the block's dz as rows of eight channels */
V8_INLINE void bwd_t_seq(const float *xb, const float *dyb, float *dxb, int64_t S, int64_t Cin,
                         int64_t G, int64_t K, const float *w, float *dw, float *db, float *ws)
{
    const int64_t C = G * Cin, S8 = S - S % 8;
    memset(dxb, 0, (size_t)(S * Cin) * sizeof(float));
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
        const int64_t ci0 = c0 % Cin;
        vf wv[KMAX], dwv[KMAX], dbv = v_zero(), r[8];
        for (int64_t k = 0; k < K; k++) {
            wv[k] = v_load(w + k * C + c0);
            dwv[k] = v_zero();
        }
        /* dz rows (position-major, eight channels each) from dy's channel rows */
        for (int64_t t0 = 0; t0 < S8; t0 += 8) {
            for (int64_t j = 0; j < 8; j++) r[j] = v_load(dyb + (c0 + j) * S + t0);
            v_transpose8(r);
            for (int64_t j = 0; j < 8; j++) v_store(ws + (t0 + j) * 8, r[j]);
        }
        for (int64_t t = S8; t < S; t++)
            for (int64_t j = 0; j < 8; j++) ws[t * 8 + j] = dyb[(c0 + j) * S + t];
        for (int64_t t = 0; t < S; t++) {
            const vf dzt = v_load(ws + t * 8);
            vf dxt = v_zero();
            for (int64_t k = 0; k < K; k++) {
                const int64_t u = t + K - 1 - k, s = t - K + 1 + k;
                if (u < S) dxt += wv[k] * v_load(ws + u * 8);
                if (s >= 0) dwv[k] += dzt * v_load(xb + s * Cin + ci0);
            }
            dbv += dzt;
            v_store(dxb + t * Cin + ci0, v_load(dxb + t * Cin + ci0) + dxt);
        }
        for (int64_t k = 0; k < K; k++)
            v_store(dw + k * C + c0, v_load(dw + k * C + c0) + dwv[k]);
        if (db) v_store(db + c0, v_load(db + c0) + dbv);
    }
}

void mad_causal_conv_t_bwd(int64_t b0, int64_t b1, int64_t S, int64_t Cin, int64_t G, int64_t K,
                           const float *x, const float *w, const float *dy, float *dx, float *dw,
                           float *db, float *ws)
{
    const int64_t C = G * Cin;
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * S * Cin, *dyb = dy + b * C * S;
        float *dxb = dx + b * S * Cin;
        if (K == 3)
            bwd_t_seq(xb, dyb, dxb, S, Cin, G, 3, w, dw, db, ws);
        else if (K == 4)
            bwd_t_seq(xb, dyb, dxb, S, Cin, G, 4, w, dw, db, ws);
        else
            bwd_t_seq(xb, dyb, dxb, S, Cin, G, K, w, dw, db, ws);
    }
}
