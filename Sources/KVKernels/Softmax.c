#include "KVKernels.h"
#include "InstructionSet.h"

#include <stdint.h>


// The softmax of attention rows, as sixteen-lane blocks with a scalar tail. Every multiply and add
// is rounded on its own (no fused multiply-add: contraction is off), in the same order on both
// paths, so both give the same bits (and the same bits as the Swift SIMD16 code this replaced).
#pragma clang fp contract(off)

enum { LANES = 16 };

static const float EXP_HIGH = 88.3f, EXP_LOW = -87.0f, MAGIC = 12582912.0f;  // 1.5·2^23

/// e^x by Cephes' single-precision range reduction and polynomial (relative error below 2e-7 for x
/// in [-87, 88]); inputs below -87 give 0 so that masked scores vanish.
static inline float exp_portable(float x) {
    int tiny = x < EXP_LOW;
    x = x > EXP_HIGH ? EXP_HIGH : x;
    x = tiny ? EXP_LOW : x;
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits: the same value as a float
    // and as bits.
    float shifted = x * 1.44269504f + MAGIC;
    float n = shifted - MAGIC;
    x = x - n * 0.693359375f;
    x = x - n * -2.1219444e-4f;
    float y = 1.98756915e-4f;
    y = y * x + 1.39819995e-3f;
    y = y * x + 8.3334519e-3f;
    y = y * x + 4.16657959e-2f;
    y = y * x + 1.66666655e-1f;
    y = y * x + 5.00000012e-1f;
    y = y * (x * x) + x + 1;
    int32_t integral = (int32_t)(kvk_as_bits(shifted) - 0x4B400000u);
    float scale = kvk_as_float((uint32_t)(integral + 127) << 23);
    return tiny ? 0 : y * scale;
}

/// The sum of sixteen lanes in order, as the reference's ordered reduction adds them.
static inline float ordered_sum(const float *lanes) {
    float sum = -0.0f;
    for (int i = 0; i < LANES; i++) sum += lanes[i];
    return sum;
}

static float softmax_portable(float *s, size_t count) {
    size_t body = count / LANES * LANES;
    float maxLogit = -__builtin_inff();
    for (size_t i = 0; i < count; i++) maxLogit = s[i] > maxLogit ? s[i] : maxLogit;
    float lanes[LANES] = {0}, tail = 0;
    for (size_t i = 0; i < body; i += LANES)
        for (int l = 0; l < LANES; l++) {
            s[i + l] = exp_portable(s[i + l] - maxLogit);
            lanes[l] += s[i + l];
        }
    for (size_t i = body; i < count; i++) {
        s[i] = exp_portable(s[i] - maxLogit);
        tail += s[i];
    }
    float inverse = 1 / (tail + ordered_sum(lanes));
    for (size_t i = 0; i < count; i++) s[i] *= inverse;
    return maxLogit;
}

#ifdef KVK_X86

KVK_AVX2 static inline __m256 exp_avx2(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LOW), _CMP_LT_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(EXP_HIGH));
    x = _mm256_blendv_ps(x, _mm256_set1_ps(EXP_LOW), tiny);
    __m256 shifted = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _mm256_set1_ps(MAGIC));
    __m256 n = _mm256_sub_ps(shifted, _mm256_set1_ps(MAGIC));
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.1219444e-4f)));
    __m256 y = _mm256_set1_ps(1.98756915e-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.39819995e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(8.3334519e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(4.16657959e-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.66666655e-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(5.00000012e-1f));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(x, x)), x), _mm256_set1_ps(1));
    __m256i integral = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(integral, _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, scale));
}

KVK_AVX2 static float softmax_avx2(float *s, size_t count) {
    size_t body = count / LANES * LANES;
    __m256 top0 = _mm256_set1_ps(-__builtin_inff()), top1 = top0;
    for (size_t i = 0; i < body; i += LANES) {
        top0 = _mm256_max_ps(top0, _mm256_loadu_ps(s + i));
        top1 = _mm256_max_ps(top1, _mm256_loadu_ps(s + i + 8));
    }
    float lanes[LANES];
    _mm256_storeu_ps(lanes, top0);
    _mm256_storeu_ps(lanes + 8, top1);
    float maxLogit = -__builtin_inff();
    for (int l = 0; l < LANES; l++) maxLogit = lanes[l] > maxLogit ? lanes[l] : maxLogit;
    for (size_t i = body; i < count; i++) maxLogit = s[i] > maxLogit ? s[i] : maxLogit;
    __m256 m = _mm256_set1_ps(maxLogit), sum0 = _mm256_setzero_ps(), sum1 = sum0;
    for (size_t i = 0; i < body; i += LANES) {
        __m256 e0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        __m256 e1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i + 8), m));
        _mm256_storeu_ps(s + i, e0);
        _mm256_storeu_ps(s + i + 8, e1);
        sum0 = _mm256_add_ps(sum0, e0);
        sum1 = _mm256_add_ps(sum1, e1);
    }
    float tail = 0;
    for (size_t i = body; i < count; i++) {
        s[i] = exp_portable(s[i] - maxLogit);
        tail += s[i];
    }
    _mm256_storeu_ps(lanes, sum0);
    _mm256_storeu_ps(lanes + 8, sum1);
    __m256 inverse = _mm256_set1_ps(1 / (tail + ordered_sum(lanes)));
    for (size_t i = 0; i < body; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inverse));
    float scalarInverse = _mm256_cvtss_f32(inverse);
    for (size_t i = body; i < count; i++) s[i] *= scalarInverse;
    return maxLogit;
}
#endif

float kvk_softmax(float *scores, size_t count) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return softmax_avx2(scores, count);
#endif
    return softmax_portable(scores, count);
}

float kvk_softmax_portable(float *scores, size_t count) { return softmax_portable(scores, count); }

float kvk_exp(float x) { return exp_portable(x); }
