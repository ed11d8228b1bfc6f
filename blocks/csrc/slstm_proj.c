/* mad-search: the sLSTM block's four headwise input projections, forward and backward, float32.
 *
 *     wx[t, h, b, g, j] = sum_k W_g[h, j, k] u_g[b, t, h DH + k],
 *     u_g = x_c for g in (i, f),  x for g in (z, o)
 *
 * written straight into the scan's time-major layout (S, NH, B, 4, DH). In torch this is two
 * batched products of tiny (DH x 2 DH) matrices over permuted copies of x_c and x, and a
 * concatenation; their backward is a dozen more small products and copies. Here each token and
 * head is 4 DH x DH multiply-adds on 8-float vectors (vec8.h) over the output units (the weights
 * transposed once per call) or, backwards, the input units.
 *
 * Layouts (contiguous): xc, x, dxc, dx (B, S, NH DH); W, dW (4, NH, DH_out, DH_in) (the gates'
 * W_i, W_f, W_z, W_o stacked); WT (4, NH, DH_in, DH_out) its transpose; wx, dwx (S, NH, B, 4,
 * DH). DH a multiple of 8, at most 64. A call handles batch elements [b0, b1); dW accumulates.
 */
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define INLINE static inline __attribute__((always_inline))
#define DMAX 64

/* DH a multiple of 8: vectors of 8 output units (forward) or input units (backward) */
INLINE void forward(int64_t b0, int64_t b1, int64_t B, int64_t S, int64_t NH, int64_t DH,
                    const float *xc, const float *x, const float *WT, float *wx)
{
    const int64_t D = NH * DH, ND = DH / 8;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < S; t++)
            for (int64_t h = 0; h < NH; h++)
                for (int64_t g = 0; g < 4; g++) {
                    const float *u = (g < 2 ? xc : x) + (b * S + t) * D + h * DH;
                    const float *Wg = WT + (g * NH + h) * DH * DH;
                    float *out = wx + (((t * NH + h) * B + b) * 4 + g) * DH;
                    vf acc[DMAX / 8];
                    for (int64_t n = 0; n < ND; n++) acc[n] = v_zero();
                    for (int64_t k = 0; k < DH; k++)
                        for (int64_t n = 0; n < ND; n++)
                            acc[n] += v_load(Wg + k * DH + 8 * n) * u[k];
                    for (int64_t n = 0; n < ND; n++) v_store(out + 8 * n, acc[n]);
                }
}

INLINE void backward(int64_t b0, int64_t b1, int64_t B, int64_t S, int64_t NH, int64_t DH,
                     const float *xc, const float *x, const float *W, const float *dwx,
                     float *dxc, float *dx, float *dW)
{
    const int64_t D = NH * DH, ND = DH / 8;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < S; t++)
            for (int64_t h = 0; h < NH; h++) {
                vf acc[2][DMAX / 8];  /* d x_c, d x of this token and head */
                for (int64_t n = 0; n < ND; n++) acc[0][n] = acc[1][n] = v_zero();
                for (int64_t g = 0; g < 4; g++) {
                    const float *u = (g < 2 ? xc : x) + (b * S + t) * D + h * DH;
                    const float *Wg = W + (g * NH + h) * DH * DH;
                    const float *d = dwx + (((t * NH + h) * B + b) * 4 + g) * DH;
                    float *dWg = dW + (g * NH + h) * DH * DH;
                    vf uv[DMAX / 8];
                    for (int64_t n = 0; n < ND; n++) uv[n] = v_load(u + 8 * n);
                    for (int64_t j = 0; j < DH; j++) {
                        const float dj = d[j];
                        for (int64_t n = 0; n < ND; n++) {
                            acc[g >= 2][n] += dj * v_load(Wg + j * DH + 8 * n);
                            v_store(dWg + j * DH + 8 * n, v_load(dWg + j * DH + 8 * n) + dj * uv[n]);
                        }
                    }
                }
                for (int64_t n = 0; n < ND; n++) {
                    v_store(dxc + (b * S + t) * D + h * DH + 8 * n, acc[0][n]);
                    v_store(dx + (b * S + t) * D + h * DH + 8 * n, acc[1][n]);
                }
            }
}

void mad_slstm_proj_fwd(int64_t b0, int64_t b1, int64_t B, int64_t S, int64_t NH, int64_t DH,
                        const float *xc, const float *x, const float *WT, float *wx)
{
#define FWD(DD) forward(b0, b1, B, S, NH, DD, xc, x, WT, wx)
    V8_BY_HEAD_SIZE(FWD, DH)
#undef FWD
}

void mad_slstm_proj_bwd(int64_t b0, int64_t b1, int64_t B, int64_t S, int64_t NH, int64_t DH,
                        const float *xc, const float *x, const float *W, const float *dwx,
                        float *dxc, float *dx, float *dW)
{
#define BWD(DD) backward(b0, b1, B, S, NH, DD, xc, x, W, dwx, dxc, dx, dW)
    V8_BY_HEAD_SIZE(BWD, DH)
#undef BWD
}
