/* mad-search: gated linear units, y = act(gate) * up, forward and backward, float32.
 *
 * gu (N, 2 H) holds each token's [gate | up] (the output of one up-projection); y, dy (N, H);
 * dgu (N, 2 H). act 0: SiLU (SwiGLU), act 1: GELU with the exact erf (the sLSTM block's FFN,
 * F.gelu's default). One pass each way over 8-float vectors; in torch the same is a chunk, the
 * activation, a product and, backwards, the activation's derivative, two products and the
 * concatenation of the two halves' gradients. H a multiple of 8. A call handles tokens [n0, n1).
 *
 * erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, so GELU's relative error stays
 * near float32 rounding), with the exponential of vec8.h.
 */
#include <stdint.h>

#include "vec8.h"

/* erf(x) for |x| by A&S 7.1.26, sign restored */
static inline vf v_erf(vf x)
{
    const vf ax = v_abs(x);
    const vf t = 1.0f / (1.0f + 0.3275911f * ax);
    const vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                    + t * (-1.453152027f + t * 1.061405429f))));
    const vf e = 1.0f - poly * v_exp(-ax * ax);
    return v_select(x < 0.0f, -e, e);
}

/* act(a) and act'(a) */
static inline vf activation(int act, vf a, vf *deriv)
{
    if (act == 0) {
        const vf s = v_sigmoid(a);
        *deriv = s * (1.0f + a * (1.0f - s));
        return a * s;
    }
    const vf cdf = 0.5f * (1.0f + v_erf(a * 0.70710678118654752f));
    *deriv = cdf + a * 0.39894228040143268f * v_exp(-0.5f * a * a);
    return a * cdf;
}

void mad_glu_fwd(int64_t n0, int64_t n1, int64_t H, int64_t act, const float *gu, float *y)
{
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < H; c += 8) {
            vf deriv;
            const vf g = activation((int)act, v_load(gu + n * 2 * H + c), &deriv);
            v_store(y + n * H + c, g * v_load(gu + n * 2 * H + H + c));
        }
}

void mad_glu_bwd(int64_t n0, int64_t n1, int64_t H, int64_t act, const float *gu,
                 const float *dy, float *dgu)
{
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < H; c += 8) {
            vf deriv;
            const vf g = activation((int)act, v_load(gu + n * 2 * H + c), &deriv);
            const vf d = v_load(dy + n * H + c), up = v_load(gu + n * 2 * H + H + c);
            v_store(dgu + n * 2 * H + c, d * up * deriv);
            v_store(dgu + n * 2 * H + H + c, d * g);
        }
}
