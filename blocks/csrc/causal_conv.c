/* mad-search: the short causal depthwise convolution (mLSTM, sLSTM, Mamba, gated short conv),
 * forward and backward, float32.
 *
 *     y[b, t, c] = bias[c] + sum_k w[k, c] x[b, t - K + 1 + k, c]     (zeros before t = 0)
 *
 * x, y, dx, dy (B, S, C) contiguous; w, dw (K, C) (nn.Conv1d's (C, 1, K) transposed); bias, db
 * (C). A handful of multiply-adds per element, vectorised over the channels; torch's
 * convolutions (oneDNN's depthwise kernel included) spend most of their time elsewhere, their
 * backward above all. Each call handles batch elements [b0, b1); dw and db accumulate.
 */
#include <stdint.h>
#include <string.h>

void mad_causal_conv_fwd(int64_t b0, int64_t b1, int64_t S, int64_t C, int64_t K,
                         const float *x, const float *w, const float *bias, float *y)
{
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < S; t++) {
            float *restrict yt = y + (b * S + t) * C;
            if (bias) memcpy(yt, bias, sizeof(float) * C);
            else memset(yt, 0, sizeof(float) * C);
            for (int64_t k = 0; k < K; k++) {
                const int64_t s = t - K + 1 + k;
                if (s < 0) continue;
                const float *restrict xs = x + (b * S + s) * C, *restrict wk = w + k * C;
                for (int64_t c = 0; c < C; c++) yt[c] += wk[c] * xs[c];
            }
        }
}

void mad_causal_conv_bwd(int64_t b0, int64_t b1, int64_t S, int64_t C, int64_t K,
                         const float *x, const float *w, const float *dy, float *dx, float *dw,
                         float *db)
{
    for (int64_t b = b0; b < b1; b++)
        for (int64_t t = 0; t < S; t++) {
            const float *restrict dyt = dy + (b * S + t) * C;
            float *restrict dxt = dx + (b * S + t) * C;
            memset(dxt, 0, sizeof(float) * C);
            for (int64_t k = 0; k < K; k++) {
                /* y[t + K - 1 - k] read x[t] with w[k]; y[t] read x[t - K + 1 + k] with w[k] */
                const int64_t u = t + K - 1 - k, s = t - K + 1 + k;
                const float *restrict wk = w + k * C;
                if (u < S) {
                    const float *restrict dyu = dy + (b * S + u) * C;
                    for (int64_t c = 0; c < C; c++) dxt[c] += wk[c] * dyu[c];
                }
                if (s >= 0) {
                    const float *restrict xs = x + (b * S + s) * C;
                    float *restrict dwk = dw + k * C;
                    for (int64_t c = 0; c < C; c++) dwk[c] += dyt[c] * xs[c];
                }
            }
            if (db)
                for (int64_t c = 0; c < C; c++) db[c] += dyt[c];
        }
}
