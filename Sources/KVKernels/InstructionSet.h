// How every kernel picks its path: one instruction-set level, AVX2 with FMA and F16C (every x86-64
// CPU since Haswell has all three), checked at run time; the portable path everywhere else. Both
// paths give the same bits, so the check decides speed only.
#ifndef KVKERNELS_INSTRUCTION_SET_H
#define KVKERNELS_INSTRUCTION_SET_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVK_X86 1
#define KVK_AVX2 __attribute__((target("avx2,fma,f16c")))

static inline int kvk_has_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// AVX-512 Foundation on top, for the one kernel it measurably speeds up (the normal generator).
#define KVK_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

static inline int kvk_has_avx512(void) { return kvk_has_avx2() && __builtin_cpu_supports("avx512f"); }
#else
static inline int kvk_has_avx2(void) { return 0; }
static inline int kvk_has_avx512(void) { return 0; }
#endif

static inline float kvk_as_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t kvk_as_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/// IEEE half precision widened to Float32 exactly (NaN payloads kept).
static inline float kvk_from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        uint32_t shift = 0;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
    }
    return kvk_as_float(bits);
}

#endif
