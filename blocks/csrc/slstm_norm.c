/* mad-search: the sLSTM block's multi-head group norm after its scan, forward and backward,
 * float32, with the layout change from the scan's time-major rows to the block's tokens.
 *
 *     out[b, s, h DH + j] = (y[s, h, b, j] - mu) rstd w[h, j]
 *
 * mu, rstd the mean and 1 / sqrt(var + eps) of the row y[s, h, b, :] (biased variance, as
 * F.layer_norm). In torch this is a layer norm over rows of DH floats (8 at the default study's
 * width: short rows its kernel handles poorly), a product with the weight and a permuted copy,
 * each a pass over memory, and as many backwards; here one pass each way.
 *
 * Layouts (contiguous): y, dy (S, NH, B, DH); out, dout (B, S, NH DH); w, dw (NH, DH); stats
 * (S, NH, B, 2): mu, rstd. A call handles rows [r0, r1) of y (row r = (s NH + h) B + b); dw
 * accumulates. Rows of a multiple of 8 floats run on 8-float vectors (vec8.h).
 */
#include <math.h>
#include <stdint.h>

#include "vec8.h"

/* where row r's output starts in out */
static inline int64_t out_at(int64_t r, int64_t S, int64_t NH, int64_t B, int64_t DH)
{
    const int64_t b = r % B, h = (r / B) % NH, s = r / (B * NH);
    return ((b * S + s) * NH + h) * DH;
}

void mad_slstm_norm_fwd(int64_t r0, int64_t r1, int64_t S, int64_t NH, int64_t B, int64_t DH,
                        float eps, const float *y, const float *w, float *out, float *stats)
{
    for (int64_t r = r0; r < r1; r++) {
        const float *yr = y + r * DH, *wh = w + ((r / B) % NH) * DH;
        float *o = out + out_at(r, S, NH, B, DH);
        float mu, rstd;
        if (DH % 8 == 0) {
            vf acc = v_zero();
            for (int64_t j = 0; j < DH; j += 8) acc += v_load(yr + j);
            mu = v_sum(acc) / (float)DH;
            vf acc2 = v_zero();
            for (int64_t j = 0; j < DH; j += 8) {
                const vf d = v_load(yr + j) - mu;
                acc2 += d * d;
            }
            rstd = 1.0f / sqrtf(v_sum(acc2) / (float)DH + eps);
            for (int64_t j = 0; j < DH; j += 8)
                v_store(o + j, (v_load(yr + j) - mu) * rstd * v_load(wh + j));
        } else {
            float sum = 0.0f, var = 0.0f;
            for (int64_t j = 0; j < DH; j++) sum += yr[j];
            mu = sum / (float)DH;
            for (int64_t j = 0; j < DH; j++) var += (yr[j] - mu) * (yr[j] - mu);
            rstd = 1.0f / sqrtf(var / (float)DH + eps);
            for (int64_t j = 0; j < DH; j++) o[j] = (yr[j] - mu) * rstd * wh[j];
        }
        stats[2 * r] = mu;
        stats[2 * r + 1] = rstd;
    }
}

void mad_slstm_norm_bwd(int64_t r0, int64_t r1, int64_t S, int64_t NH, int64_t B, int64_t DH,
                        const float *y, const float *w, const float *stats, const float *dout,
                        float *dy, float *dw)
{
    for (int64_t r = r0; r < r1; r++) {
        const int64_t h = (r / B) % NH;
        const float *yr = y + r * DH, *wh = w + h * DH, *d = dout + out_at(r, S, NH, B, DH);
        float *dyr = dy + r * DH, *dwh = dw + h * DH;
        const float mu = stats[2 * r], rstd = stats[2 * r + 1];
        /* g = d w (the gradient of the normalised row); dy = rstd (g - mean g - yn mean(g yn)) */
        if (DH % 8 == 0) {
            vf m1v = v_zero(), m2v = v_zero();
            for (int64_t j = 0; j < DH; j += 8) {
                const vf yn = (v_load(yr + j) - mu) * rstd, dj = v_load(d + j);
                const vf g = dj * v_load(wh + j);
                v_store(dwh + j, v_load(dwh + j) + dj * yn);
                m1v += g;
                m2v += g * yn;
            }
            const float m1 = v_sum(m1v) / (float)DH, m2 = v_sum(m2v) / (float)DH;
            for (int64_t j = 0; j < DH; j += 8) {
                const vf yn = (v_load(yr + j) - mu) * rstd;
                v_store(dyr + j, rstd * (v_load(d + j) * v_load(wh + j) - m1 - yn * m2));
            }
        } else {
            float m1 = 0.0f, m2 = 0.0f;
            for (int64_t j = 0; j < DH; j++) {
                const float yn = (yr[j] - mu) * rstd, g = d[j] * wh[j];
                dwh[j] += d[j] * yn;
                m1 += g;
                m2 += g * yn;
            }
            m1 /= (float)DH;
            m2 /= (float)DH;
            for (int64_t j = 0; j < DH; j++)
                dyr[j] = rstd * (d[j] * wh[j] - m1 - (yr[j] - mu) * rstd * m2);
        }
    }
}
