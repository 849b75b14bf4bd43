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
#else
static inline int kvk_has_avx2(void) { return 0; }
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

#endif
