/* mad-search: the block-diagonal ("headwise") linear map of the mLSTM's q, k, v projections,
 * forward and backward, float32.
 *
 *     y[t, g * bs + o] = sum_i W[g, o, i] x[t, g * bs + i]
 *
 * x, y, dx, dy (T, D = nb * bs) rows; W, dW (nb, bs, bs). The blocks are tiny (4 x 4 in xLSTM),
 * so this is a few multiply-adds per element; a grouped convolution (what torch offers) spends
 * far longer in its general kernels, its backward above all. Each call handles rows [t0, t1);
 * dW accumulates into the caller's buffer.
 *
 * Block size 4 with D a multiple of 8 (the xLSTM case) runs on 8-float vectors, two blocks per
 * vector: with the weights laid out per output column, "expanded" (E_i[c] = W[g(c), o(c), i]),
 *     y[c] = sum_i E_i[c] x[g(c) * 4 + i],
 * and x[g(c) * 4 + i] is x's vector with element i of each block copied over its block (one
 * shuffle). The backward does the same with dy for dx, and keeps dW expanded over the rows.
 * Other sizes run plain loops. With `accumulate` the backward adds to dx instead of writing it
 * (q and k are maps of the same input: one pass each, no separate sum).
 */
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#if defined(__clang__)
#define SPREAD(v, i) __builtin_shufflevector(v, v, i, i, i, i, i + 4, i + 4, i + 4, i + 4)
#else
#define SPREAD(v, i) __builtin_shuffle(v, (vi){i, i, i, i, i + 4, i + 4, i + 4, i + 4})
#endif

/* E (4, D): E[i][g * 4 + o] = W[g][o][i] (transposed = 0) or W[g][i][o] (transposed = 1) */
static void expand4(int64_t nb, const float *W, int transposed, float *E)
{
    const int64_t D = nb * 4;
    for (int64_t g = 0; g < nb; g++)
        for (int64_t i = 0; i < 4; i++)
            for (int64_t o = 0; o < 4; o++)
                E[i * D + g * 4 + o] = transposed ? W[(g * 4 + i) * 4 + o] : W[(g * 4 + o) * 4 + i];
}

/* out[c] (+)= sum_i E[i][c] in[g(c) * 4 + i] for one row */
static inline void mix4_row(int64_t D, const float *E, const float *in, float *out, int add)
{
    for (int64_t c = 0; c < D; c += 8) {
        const vf v = v_load(in + c);
        vf acc = add ? v_load(out + c) : v_zero();
        acc += v_load(E + c) * SPREAD(v, 0);
        acc += v_load(E + D + c) * SPREAD(v, 1);
        acc += v_load(E + 2 * D + c) * SPREAD(v, 2);
        acc += v_load(E + 3 * D + c) * SPREAD(v, 3);
        v_store(out + c, acc);
    }
}

/* ws: 4 D floats */
void mad_headwise_fwd(int64_t t0, int64_t t1, int64_t nb, int64_t bs, const float *x,
                      const float *W, float *y, float *ws)
{
    const int64_t D = nb * bs;
    if (bs == 4 && D % 8 == 0) {
        expand4(nb, W, 0, ws);
        for (int64_t t = t0; t < t1; t++) mix4_row(D, ws, x + t * D, y + t * D, 0);
        return;
    }
    for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < nb; g++) {
            const float *xg = x + t * D + g * bs, *Wg = W + g * bs * bs;
            float *yg = y + t * D + g * bs;
            for (int64_t o = 0; o < bs; o++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < bs; i++) acc += Wg[o * bs + i] * xg[i];
                yg[o] = acc;
            }
        }
}

/* ws: 8 D floats */
void mad_headwise_bwd(int64_t t0, int64_t t1, int64_t nb, int64_t bs, int64_t accumulate,
                      const float *x, const float *W, const float *dy, float *dx, float *dW,
                      float *ws)
{
    const int64_t D = nb * bs;
    if (bs == 4 && D % 8 == 0) {
        float *E = ws, *A = ws + 4 * D;  /* A[o][g * 4 + i] accumulates dW[g][o][i] */
        expand4(nb, W, 1, E);            /* dx[g*4+i] = sum_o W[g][o][i] dy[g*4+o] */
        memset(A, 0, sizeof(float) * 4 * D);
        for (int64_t t = t0; t < t1; t++) {
            const float *xt = x + t * D, *dyt = dy + t * D;
            mix4_row(D, E, dyt, dx + t * D, (int)accumulate);
            for (int64_t c = 0; c < D; c += 8) {
                const vf xv = v_load(xt + c), d = v_load(dyt + c);
                v_store(A + c, v_load(A + c) + SPREAD(d, 0) * xv);
                v_store(A + D + c, v_load(A + D + c) + SPREAD(d, 1) * xv);
                v_store(A + 2 * D + c, v_load(A + 2 * D + c) + SPREAD(d, 2) * xv);
                v_store(A + 3 * D + c, v_load(A + 3 * D + c) + SPREAD(d, 3) * xv);
            }
        }
        for (int64_t g = 0; g < nb; g++)
            for (int64_t o = 0; o < 4; o++)
                for (int64_t i = 0; i < 4; i++) dW[(g * 4 + o) * 4 + i] += A[o * D + g * 4 + i];
        return;
    }
    for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < nb; g++) {
            const float *xg = x + t * D + g * bs, *dyg = dy + t * D + g * bs;
            const float *Wg = W + g * bs * bs;
            float *dxg = dx + t * D + g * bs, *dWg = dW + g * bs * bs;
            if (!accumulate)
                for (int64_t i = 0; i < bs; i++) dxg[i] = 0.0f;
            for (int64_t o = 0; o < bs; o++)
                for (int64_t i = 0; i < bs; i++) {
                    dxg[i] += Wg[o * bs + i] * dyg[o];
                    dWg[o * bs + i] += dyg[o] * xg[i];
                }
        }
}
