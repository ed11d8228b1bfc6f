/* mad-search: the mLSTM block's output gate around its cell, forward and backward, float32.
 *
 * Per token, over the inner channels c (heads of DH channels each):
 *
 *     y_c = (GN(h)_c w_c + s_c x_c) silu(z_c),   GN(h)_c = (h_c - mu) rstd   (mu, rstd of c's head)
 *
 * (blocks/mlstm.py: the multi-head group norm, its weight, the learnable skip of the conv output,
 * and the SiLU of the block's second up-projection), with rstd = 1 / sqrt(var + eps), var the
 * biased variance, as F.layer_norm. In torch this is a layer norm, an addcmul, two products and a
 * SiLU, and about twice as many operations backwards, each a pass over batch x seq x inner
 * floats; here one pass each way, vectorised over a head's channels.
 *
 * Layouts (contiguous, N tokens): h, x, z, y, dy, dh, dx, dz (N, I); w, s, dw, ds (I); stats
 * (N, NH, 2): mu, rstd. A call handles tokens [n0, n1); dw and ds accumulate.
 *
 * Heads of a multiple of 8 channels run on 8-float vectors (vec8.h), the head size a
 * compile-time constant where it is a common one. Other head sizes run plain loops.
 */
#include <math.h>
#include <stdint.h>

#include "fastmath.h"
#include "vec8.h"

static void fwd_any(int64_t n0, int64_t n1, int64_t I, int64_t DH, float eps, const float *h,
                    const float *x, const float *z, const float *w, const float *s, float *y,
                    float *stats)
{
    const int64_t NH = I / DH;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < NH; g++) {
            const int64_t o = n * I + g * DH;
            const float *restrict hg = h + o, *restrict xg = x + o, *restrict zg = z + o;
            const float *restrict wg = w + g * DH, *restrict sg = s + g * DH;
            float *restrict yg = y + o;
            float sum = 0.0f;
            for (int64_t c = 0; c < DH; c++) sum += hg[c];
            const float mu = sum / (float)DH;
            float var = 0.0f;
            for (int64_t c = 0; c < DH; c++) var += (hg[c] - mu) * (hg[c] - mu);
            const float rstd = 1.0f / sqrtf(var / (float)DH + eps);
            for (int64_t c = 0; c < DH; c++)
                yg[c] = ((hg[c] - mu) * rstd * wg[c] + sg[c] * xg[c]) * zg[c] * sigmoid_f(zg[c]);
            stats[(n * NH + g) * 2] = mu;
            stats[(n * NH + g) * 2 + 1] = rstd;
        }
}

static void bwd_any(int64_t n0, int64_t n1, int64_t I, int64_t DH, const float *h,
                    const float *x, const float *z, const float *w, const float *s,
                    const float *stats, const float *dy, float *dh, float *dx, float *dz,
                    float *dw, float *ds)
{
    const int64_t NH = I / DH;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < NH; g++) {
            const int64_t o = n * I + g * DH;
            const float *restrict hg = h + o, *restrict xg = x + o, *restrict zg = z + o;
            const float *restrict wg = w + g * DH, *restrict sg = s + g * DH;
            const float *restrict dyg = dy + o;
            float *restrict dhg = dh + o, *restrict dxg = dx + o, *restrict dzg = dz + o;
            float *restrict dwg = dw + g * DH, *restrict dsg = ds + g * DH;
            const float mu = stats[(n * NH + g) * 2], rstd = stats[(n * NH + g) * 2 + 1];
            int64_t c = 0;
            for (; c + 8 <= DH; c += 8) {  /* gcc leaves this loop scalar: vectors by hand */
                const vf zc = v_load(zg + c), xv = v_load(xg + c), wv = v_load(wg + c);
                const vf sv = v_load(sg + c), dyc = v_load(dyg + c);
                const vf hn = (v_load(hg + c) - mu) * rstd, sig = v_sigmoid(zc);
                const vf pre = hn * wv + sv * xv;
                const vf d_pre = dyc * zc * sig;  /* through silu(z) */
                v_store(dzg + c, dyc * pre * sig * (1.0f + zc * (1.0f - sig)));
                v_store(dwg + c, v_load(dwg + c) + d_pre * hn);
                v_store(dsg + c, v_load(dsg + c) + d_pre * xv);
                v_store(dxg + c, d_pre * sv);
                v_store(dhg + c, d_pre * wv);  /* d GN(h) */
            }
            for (; c < DH; c++) {
                const float hn = (hg[c] - mu) * rstd, sig = sigmoid_f(zg[c]);
                const float pre = hn * wg[c] + sg[c] * xg[c];
                const float d_pre = dyg[c] * zg[c] * sig;
                dzg[c] = dyg[c] * pre * sig * (1.0f + zg[c] * (1.0f - sig));
                dwg[c] += d_pre * hn;
                dsg[c] += d_pre * xg[c];
                dxg[c] = d_pre * sg[c];
                dhg[c] = d_pre * wg[c];
            }
            float m1 = 0.0f, m2 = 0.0f;
            for (int64_t c = 0; c < DH; c++) {
                m1 += dhg[c];
                m2 += dhg[c] * (hg[c] - mu);
            }
            m2 *= rstd;
            m1 /= (float)DH;
            m2 /= (float)DH;
            for (int64_t c = 0; c < DH; c++)  /* the layer norm's backward */
                dhg[c] = rstd * (dhg[c] - m1 - (hg[c] - mu) * rstd * m2);
        }
}

V8_INLINE void fwd_vec(int64_t n0, int64_t n1, int64_t I, int64_t DH, float eps, const float *h,
                       const float *x, const float *z, const float *w, const float *s, float *y,
                       float *stats)
{
    const int64_t NH = I / DH;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < NH; g++) {
            const int64_t o = n * I + g * DH;
            vf acc = v_zero();
            for (int64_t c = 0; c < DH; c += 8) acc += v_load(h + o + c);
            const float mu = v_sum(acc) / (float)DH;
            vf acc2 = v_zero();
            for (int64_t c = 0; c < DH; c += 8) {
                const vf d = v_load(h + o + c) - mu;
                acc2 += d * d;
            }
            const float rstd = 1.0f / sqrtf(v_sum(acc2) / (float)DH + eps);
            for (int64_t c = 0; c < DH; c += 8) {
                const vf zc = v_load(z + o + c);
                const vf pre = (v_load(h + o + c) - mu) * rstd * v_load(w + g * DH + c)
                               + v_load(s + g * DH + c) * v_load(x + o + c);
                v_store(y + o + c, pre * zc * v_sigmoid(zc));
            }
            stats[(n * NH + g) * 2] = mu;
            stats[(n * NH + g) * 2 + 1] = rstd;
        }
}

#define HMAX8 8 /* the vector path's largest head: 64 channels */

V8_INLINE void bwd_vec(int64_t n0, int64_t n1, int64_t I, int64_t DH, const float *h,
                       const float *x, const float *z, const float *w, const float *s,
                       const float *stats, const float *dy, float *dh, float *dx, float *dz,
                       float *dw, float *ds)
{
    const int64_t NH = I / DH;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < NH; g++) {
            const int64_t o = n * I + g * DH;
            const float mu = stats[(n * NH + g) * 2], rstd = stats[(n * NH + g) * 2 + 1];
            vf m1v = v_zero(), m2v = v_zero();
            for (int64_t c = 0; c < DH; c += 8) {
                const int64_t at = o + c, wc = g * DH + c;
                const vf zc = v_load(z + at), xv = v_load(x + at), dyc = v_load(dy + at);
                const vf wv = v_load(w + wc), sv = v_load(s + wc);
                const vf hc = v_load(h + at) - mu, hn = hc * rstd, sig = v_sigmoid(zc);
                const vf pre = hn * wv + sv * xv;
                const vf d_pre = dyc * zc * sig; /* through silu(z) */
                v_store(dz + at, dyc * pre * sig * (1.0f + zc * (1.0f - sig)));
                v_store(dw + wc, v_load(dw + wc) + d_pre * hn);
                v_store(ds + wc, v_load(ds + wc) + d_pre * xv);
                v_store(dx + at, d_pre * sv);
                const vf dhn = d_pre * wv; /* d GN(h) */
                v_store(dh + at, dhn);
                m1v += dhn;
                m2v += dhn * hc;
            }
            const float m1 = v_sum(m1v) / (float)DH, m2 = v_sum(m2v) * rstd / (float)DH;
            for (int64_t c = 0; c < DH; c += 8) { /* the layer norm's backward */
                const int64_t at = o + c;
                v_store(dh + at, rstd * (v_load(dh + at) - m1 - (v_load(h + at) - mu) * rstd * m2));
            }
        }
}

void mad_mlstm_out_fwd(int64_t n0, int64_t n1, int64_t I, int64_t DH, float eps,
                       const float *h, const float *x, const float *z, const float *w,
                       const float *s, float *y, float *stats)
{
#define FWD(D) fwd_vec(n0, n1, I, D, eps, h, x, z, w, s, y, stats)
    if (DH % 8 == 0 && DH <= 8 * HMAX8) {
        V8_BY_HEAD_SIZE(FWD, DH)
    } else {
        fwd_any(n0, n1, I, DH, eps, h, x, z, w, s, y, stats);
    }
#undef FWD
}

void mad_mlstm_out_bwd(int64_t n0, int64_t n1, int64_t I, int64_t DH, const float *h,
                       const float *x, const float *z, const float *w, const float *s,
                       const float *stats, const float *dy, float *dh, float *dx, float *dz,
                       float *dw, float *ds)
{
#define BWD(D) bwd_vec(n0, n1, I, D, h, x, z, w, s, stats, dy, dh, dx, dz, dw, ds)
    if (DH % 8 == 0 && DH <= 8 * HMAX8) {
        V8_BY_HEAD_SIZE(BWD, DH)
    } else {
        bwd_any(n0, n1, I, DH, h, x, z, w, s, stats, dy, dh, dx, dz, dw, ds);
    }
#undef BWD
}
