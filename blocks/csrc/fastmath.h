/* mad-search: float32 transcendentals as plain arithmetic, so that gcc vectorises the loops
 * that call them (libm's expf, tanhf, log1pf are scalar calls). Shared by the native kernels. */
#ifndef MAD_FASTMATH_H
#define MAD_FASTMATH_H

#include <math.h>
#include <stdint.h>

/* exp(x) from float arithmetic gcc can vectorise: 2^k 2^f, f in [-1/2, 1/2] (Cephes exp2f
 * polynomial); relative error ~2e-7 near 0, growing as |x| 6e-8 with the rounding of
 * x log2(e) (as in libm). Exactly 0 below -87.3 (libm: denormals down to -103); saturates at
 * 2^127 above 88 (the kernels only take exp of arguments <= 0). NaN stays NaN. */
static inline __attribute__((always_inline)) float exp_f(float x)
{
    const float log2e = 1.4426950408889634f;
    float xc = x < -126.0f ? -126.0f : (x > 88.0f ? 88.0f : x);
    float t = xc * log2e;
    float k = floorf(t + 0.5f);   /* not the (t + 1.5 2^23) - 1.5 2^23 trick: -fassociative-math
                                     would fold it away */
    float f = t - k;
    float f2 = f * f;
    float p = (1.0f + 6.931472028550421e-1f * f) + f2 * (2.402264791363012e-1f
              + 5.550332471162809e-2f * f) + (f2 * f2) * ((9.618437357674640e-3f
              + 1.339887440266574e-3f * f) + f2 * 1.535336188319500e-4f);
    int32_t ki = (int32_t)k;
    ki = ki < -126 ? -127 : ki;                 /* 2^-127 pattern is 0.0 */
    union { int32_t i; float f; } scale;
    scale.i = (ki + 127) << 23;
    float r = p * scale.f;
    return x != x ? x : r;
}

/* log(1 + e) for e in [0, 1]: 2 atanh(z), z = e / (2 + e) <= 1/3, the series to z^15;
 * relative error ~1e-7. */
static inline __attribute__((always_inline)) float log1p_unit_f(float e)
{
    float z = e / (2.0f + e), w = z * z, w2 = w * w, w4 = w2 * w2;
    float p = ((1.0f + w * (1.0f / 3)) + w2 * (1.0f / 5 + w * (1.0f / 7)))
              + w4 * ((1.0f / 9 + w * (1.0f / 11)) + w2 * (1.0f / 13 + w * (1.0f / 15)));
    return 2.0f * z * p;
}

/* sigmoid(x) = 1 / (1 + e) or e / (1 + e), e = exp(-|x|): no overflow, no cancellation. */
static inline __attribute__((always_inline)) float sigmoid_f(float x)
{
    float e = exp_f(-fabsf(x));
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), finite for every finite x. */
static inline __attribute__((always_inline)) float logsigmoid_f(float x)
{
    return (x < 0.0f ? x : 0.0f) - log1p_unit_f(exp_f(-fabsf(x)));  /* fminf: no vectorising */
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); absolute error ~1e-7. */
static inline __attribute__((always_inline)) float tanh_f(float x)
{
    float e = exp_f(-2.0f * fabsf(x));
    return copysignf((1.0f - e) / (1.0f + e), x);
}

/* Denormal floats (below 2^-126) flushed to zero, inputs and results, for the duration of a
 * kernel call on the calling thread (mad_flush_denormals() ... mad_restore_fp(saved)). On x86
 * every operation that meets or makes a denormal takes a microcode assist of ~100 cycles: a
 * scan whose decays exp(delta A) reach 1e-38 (Mamba with a large step delta) spent half of its
 * backward there. The values lost are below 1.2e-38 in magnitude. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned int mad_fp_state;
static inline mad_fp_state mad_flush_denormals(void)
{
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u);                    /* FTZ (bit 15) and DAZ (bit 6) */
    return saved;
}
static inline void mad_restore_fp(mad_fp_state saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__)
typedef uint64_t mad_fp_state;
static inline mad_fp_state mad_flush_denormals(void)
{
    uint64_t saved;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved | (1ull << 24)));   /* FZ */
    return saved;
}
static inline void mad_restore_fp(mad_fp_state saved)
{
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved));
}
#else
typedef int mad_fp_state;
static inline mad_fp_state mad_flush_denormals(void) { return 0; }
static inline void mad_restore_fp(mad_fp_state saved) { (void)saved; }
#endif

#endif
