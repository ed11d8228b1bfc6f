/* mad-search: the mLSTM block's gate pre-activations, forward and backward, float32.
 *
 *     g[n, j] = b[j] + sum_c W[j, c] x_n[c],   x_n = [q_n, k_n, v_n]   (3 I channels, j < J)
 *
 * (blocks/mlstm.py: the input and forget gates of every head, J = 2 NH, from the token's q, k
 * and v). As a batched product over a concatenation this is a copy of q, k, v and a matrix
 * product with eight output columns, whose backward (by batch element, then summed) costs more
 * than the rest of the gates' work; here each token is 24 vector multiply-adds per gate. q, k, v
 * are read in place (rows of I floats, ld apart).
 *
 * Layouts: q, k, v, dq, dk, dv (N, I) rows ld apart (dq, dk, dv: I apart); W, dW (J, 3 I); b, db
 * (J); g, dg (N, J). I a multiple of 8, J at most JMAX. A call handles tokens [n0, n1); dW and
 * db accumulate.
 */
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define JMAX 32

void mad_mlstm_gates_fwd(int64_t n0, int64_t n1, int64_t I, int64_t J, int64_t ld,
                         const float *q, const float *k, const float *v, const float *W,
                         const float *b, float *g)
{
    const float *parts[3] = {q, k, v};
    for (int64_t n = n0; n < n1; n++) {
        vf acc[JMAX];
        for (int64_t j = 0; j < J; j++) acc[j] = v_zero();
        for (int part = 0; part < 3; part++) {
            const float *x = parts[part] + n * ld, *Wp = W + part * I;
            for (int64_t c = 0; c < I; c += 8) {
                const vf xv = v_load(x + c);
                for (int64_t j = 0; j < J; j++) acc[j] += v_load(Wp + j * 3 * I + c) * xv;
            }
        }
        for (int64_t j = 0; j < J; j++) g[n * J + j] = b[j] + v_sum(acc[j]);
    }
}

void mad_mlstm_gates_bwd(int64_t n0, int64_t n1, int64_t I, int64_t J, int64_t ld,
                         const float *q, const float *k, const float *v, const float *W,
                         const float *dg, float *dq, float *dk, float *dv, float *dW, float *db)
{
    const float *parts[3] = {q, k, v};
    float *dparts[3] = {dq, dk, dv};
    for (int64_t n = n0; n < n1; n++) {
        float d[JMAX];
        for (int64_t j = 0; j < J; j++) {
            d[j] = dg[n * J + j];
            db[j] += d[j];
        }
        for (int part = 0; part < 3; part++) {
            const float *x = parts[part] + n * ld, *Wp = W + part * I;
            float *dx = dparts[part] + n * I, *dWp = dW + part * I;
            for (int64_t c = 0; c < I; c += 8) {
                const vf xv = v_load(x + c);
                vf acc = v_zero();
                for (int64_t j = 0; j < J; j++) {
                    acc += d[j] * v_load(Wp + j * 3 * I + c);
                    v_store(dWp + j * 3 * I + c, v_load(dWp + j * 3 * I + c) + d[j] * xv);
                }
                v_store(dx + c, acc);
            }
        }
    }
}
