/* mad-search: 8-float vectors by GCC/Clang's vector extensions, for kernels whose inner loops
 * the auto-vectoriser handles badly (several accumulators, masks, small 2-D tiles). Portable C
 * (x86: one AVX register; elsewhere the compiler splits it), no intrinsics. */
#ifndef MAD_VEC8_H
#define MAD_VEC8_H

#include <stdint.h>

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef float vf_unaligned __attribute__((vector_size(32), aligned(4)));

#define V8_INLINE static inline __attribute__((always_inline))

/* Calls call(D) with D a compile-time constant where it is a common head size (8, 16, 24, 32,
 * 48, 64), so that always-inline loops over it unroll into whole vectors; else with D_ itself. */
#define V8_BY_HEAD_SIZE(call, D_)                                                              \
    switch (D_) {                                                                              \
    case 8: call(8); break;                                                                    \
    case 16: call(16); break;                                                                  \
    case 24: call(24); break;                                                                  \
    case 32: call(32); break;                                                                  \
    case 48: call(48); break;                                                                  \
    case 64: call(64); break;                                                                  \
    default: call(D_); break;                                                                  \
    }

V8_INLINE vf v_load(const float *p) { return *(const vf_unaligned *)p; }
V8_INLINE void v_store(float *p, vf x) { *(vf_unaligned *)p = x; }
V8_INLINE vf v_splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
V8_INLINE vf v_zero(void) { return v_splat(0.0f); }

/* m ? a : b per lane, m a comparison's result (all ones or zeros) */
V8_INLINE vf v_select(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

/* a > b ? a : b per lane (b where either is NaN) */
V8_INLINE vf v_max(vf a, vf b) { return v_select(a > b, a, b); }

V8_INLINE float v_sum(vf x)
{
    float s = 0.0f;
    for (int l = 0; l < 8; l++) s += x[l];
    return s;
}

V8_INLINE float v_hmax(vf x)
{
    float m = x[0];
    for (int l = 1; l < 8; l++) m = x[l] > m ? x[l] : m;
    return m;
}

/* An empty asm that the compiler must assume changes v: keeps (t + M) - M from being folded
 * to t under -fassociative-math. Where it is not defined, v_exp rounds by conversions. */
#if defined(__x86_64__) || defined(__i386__)
#define V8_OPAQUE(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define V8_OPAQUE(v) __asm__("" : "+w"(v))
#endif

/* exp per lane: fastmath.h's exp_f (same polynomial, same range handling: 0 below -126 log 2,
 * saturating above 88, NaN kept) on 8 lanes at once. k = round(x log2 e) by adding 1.5 2^23
 * (k lands in the float's low bits; ties to even, where exp_f rounds them up: the same value
 * to rounding), which is 5 instructions shorter than converting to integers and back. */
V8_INLINE vf v_exp(vf x)
{
    const vf lo = v_splat(-126.0f), hi = v_splat(88.0f);
    vf xc = v_select(x < lo, lo, x);
    xc = v_select(xc > hi, hi, xc);
    const vf t = xc * 1.4426950408889634f;
#ifdef V8_OPAQUE
    vf y = t + 12582912.0f;
    V8_OPAQUE(y);
    vi ki = (vi)y - 0x4B400000;                   /* y's bits are those of 1.5 2^23, plus k */
    const vf kf = __builtin_convertvector(ki, vf);
#else
    const vf y = t + 0.5f;
    vi ki = __builtin_convertvector(y, vi);       /* truncates towards zero ... */
    vf kf = __builtin_convertvector(ki, vf);
    const vi above = kf > y;                      /* ... so step down where that rounded up */
    ki += above;                                  /* true is -1 */
    kf += __builtin_convertvector(above, vf);
#endif
    const vf f = t - kf, f2 = f * f;
    const vf p = (1.0f + 6.931472028550421e-1f * f) + f2 * (2.402264791363012e-1f
                 + 5.550332471162809e-2f * f) + (f2 * f2) * ((9.618437357674640e-3f
                 + 1.339887440266574e-3f * f) + f2 * 1.535336188319500e-4f);
    const vi small = ki < -126;
    ki = (small & -127) | (~small & ki);          /* 2^-127's pattern is 0.0 */
    const vf r = p * (vf)((ki + 127) << 23);
    return v_select(x != x, x, r);
}

V8_INLINE vf v_abs(vf x) { return (vf)((vi)x & 0x7fffffff); }

/* log(1 + e) for e in [0, 1]: fastmath.h's log1p_unit_f on 8 lanes */
V8_INLINE vf v_log1p_unit(vf e)
{
    const vf z = e / (2.0f + e), w = z * z, w2 = w * w, w4 = w2 * w2;
    const vf p = ((1.0f + w * (1.0f / 3)) + w2 * (1.0f / 5 + w * (1.0f / 7)))
                 + w4 * ((1.0f / 9 + w * (1.0f / 11)) + w2 * (1.0f / 13 + w * (1.0f / 15)));
    return 2.0f * z * p;
}

/* log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)) */
V8_INLINE vf v_logsigmoid(vf x)
{
    return v_select(x < 0.0f, x, v_zero()) - v_log1p_unit(v_exp(-v_abs(x)));
}

/* sigmoid(x) = 1 / (1 + e) or e / (1 + e), e = exp(-|x|) */
V8_INLINE vf v_sigmoid(vf x)
{
    const vf e = v_exp(-v_abs(x));
    return v_select(x >= 0.0f, v_splat(1.0f), e) / (1.0f + e);
}

/* Two-input shuffle: lane j of the result is lane i_j of a:b (0-7 from a, 8-15 from b). */
#if defined(__clang__)
#define V8_SHUFFLE2(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
    __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define V8_SHUFFLE2(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
    __builtin_shuffle(a, b, (vi){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* In-register 8 x 8 transpose: r[j][l] becomes r[l][j]. Three rounds of two-input shuffles
 * (pairs, then quads, then halves; the unpack / shuffle / permute2f128 pattern on AVX), 24
 * instructions for what would otherwise be 64 scalar loads and stores. */
V8_INLINE void v_transpose8(vf r[8])
{
    vf t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = V8_SHUFFLE2(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = V8_SHUFFLE2(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int j = 0; j < 8; j += 4) {
        u[j] = V8_SHUFFLE2(t[j], t[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 1] = V8_SHUFFLE2(t[j], t[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[j + 2] = V8_SHUFFLE2(t[j + 1], t[j + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 3] = V8_SHUFFLE2(t[j + 1], t[j + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = V8_SHUFFLE2(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[j + 4] = V8_SHUFFLE2(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

#endif
