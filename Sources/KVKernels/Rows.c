#include "KVKernels.h"
#include "InstructionSet.h"



// Element-wise passes over rows: the profile's column sums and sparsity count, and the narrowing of
// Float32 rows to half precision as a Float16 cache stores them. Each result is exact or rounded
// element by element, so the AVX2 and portable paths agree bit for bit without any care for order.

// MARK: - Portable path

/// Round-to-nearest-even, as F16C's `vcvtps2ph` with rounding mode 0 and Swift's `Float16(_:)` do;
/// NaNs stay NaNs (quiet, with the payload's top bits).
static inline uint16_t to_half(float f) {
    uint32_t bits = kvk_as_bits(f);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t exponent = (bits >> 23) & 0xff, mantissa = bits & 0x7fffff;
    if (exponent == 0xff) return sign | 0x7c00 | (mantissa ? (uint16_t)(0x200 | (mantissa >> 13)) : 0);
    int32_t e = (int32_t)exponent - 127 + 15;
    if (e >= 31) return sign | 0x7c00;  // overflow to infinity
    uint32_t value, shift;
    if (e <= 0) {  // subnormal or zero in half precision: keep the implicit bit and shift it down
        if (e < -10) return sign;
        value = mantissa | 0x800000;
        shift = (uint32_t)(14 - e);
    } else {
        value = ((uint32_t)e << 23) | mantissa;  // exponent and mantissa, rounded as one number
        shift = 13;
    }
    uint32_t half = value >> shift, rest = value & ((1u << shift) - 1), midpoint = 1u << (shift - 1);
    if (rest > midpoint || (rest == midpoint && (half & 1))) half += 1;  // a carry may reach infinity
    return sign | (uint16_t)half;
}

static inline __attribute__((always_inline)) void accumulate_body(const float *x, float *out, size_t count) {
    for (size_t i = 0; i < count; i++) out[i] += x[i];
}

static inline __attribute__((always_inline)) size_t count_below_body(const float *p, size_t count, float fraction) {
    float top = 0;
    for (size_t i = 0; i < count; i++) top = p[i] > top ? p[i] : top;
    float cut = fraction * top;
    size_t below = 0;
    for (size_t i = 0; i < count; i++) below += p[i] < cut;
    return below;
}

static void narrow_portable(const float *source, uint16_t *destination, size_t count) {
    for (size_t i = 0; i < count; i++) destination[i] = to_half(source[i]);
}

// MARK: - AVX2 path (the same bodies, vectorised eight lanes wide by the compiler)

#ifdef KVK_X86
KVK_AVX2 static void accumulate_avx2(const float *x, float *out, size_t count) { accumulate_body(x, out, count); }

KVK_AVX2 static size_t count_below_avx2(const float *p, size_t count, float fraction) {
    return count_below_body(p, count, fraction);
}

KVK_AVX2 static void narrow_avx2(const float *source, uint16_t *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm_storeu_si128((__m128i *)(destination + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < count; i++) destination[i] = to_half(source[i]);
}
#endif

// MARK: - Entry points

void kvk_accumulate(const float *x, float *out, size_t count) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return accumulate_avx2(x, out, count);
#endif
    accumulate_body(x, out, count);
}

size_t kvk_count_below(const float *probabilities, size_t count, float fractionOfMax) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return count_below_avx2(probabilities, count, fractionOfMax);
#endif
    return count_below_body(probabilities, count, fractionOfMax);
}

void kvk_narrow_to_half(const float *source, uint16_t *destination, size_t count) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return narrow_avx2(source, destination, count);
#endif
    narrow_portable(source, destination, count);
}

void kvk_narrow_to_half_portable(const float *source, uint16_t *destination, size_t count) {
    narrow_portable(source, destination, count);
}
