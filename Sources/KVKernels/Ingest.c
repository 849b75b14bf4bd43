#include "KVKernels.h"
#include "InstructionSet.h"

// Tensors arriving from the wire: little-endian bytes at any alignment (they sit inside a received
// frame), copied into aligned Float32 or half-precision storage with the finiteness check every
// receiver must make fused into the same pass, so ingest reads each byte once. Each element is
// converted exactly on its own, so both paths give the same bits and the same answer.

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ingest kernels read tensors as the host's byte order, which must be little-endian like the wire"
#endif

/// Elements checked between tests of the accumulated non-finite mask: one test per block keeps the
/// loop at memory speed; the rare block that fails is rescanned element by element for the index.
#define BLOCK 64

static inline int float_is_finite(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }
static inline int half_is_finite(uint16_t bits) { return (bits & 0x7c00u) != 0x7c00u; }

static inline uint32_t load32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint16_t load16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

// MARK: - Portable path

static size_t f32_portable(const unsigned char *source, float *destination, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint32_t bits = load32(source + 4 * i);
        if (!float_is_finite(bits)) return i;
        if (destination) destination[i] = kvk_as_float(bits);
    }
    return count;
}

static size_t f16_portable(const unsigned char *source, uint16_t *destination, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint16_t bits = load16(source + 2 * i);
        if (!half_is_finite(bits)) return i;
        destination[i] = bits;
    }
    return count;
}

static size_t widen_portable(const unsigned char *source, float *destination, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint16_t bits = load16(source + 2 * i);
        if (!half_is_finite(bits)) return i;
        destination[i] = kvk_from_half(bits);
    }
    return count;
}

// MARK: - AVX2 path

#ifdef KVK_X86
/// Copies (when `destination` is not NULL) and checks whole blocks; returns where the scalar tail or
/// the first failing block begins.
KVK_AVX2 static size_t f32_blocks_avx2(const unsigned char *source, float *destination, size_t count) {
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    size_t i = 0;
    for (; i + BLOCK <= count; i += BLOCK) {
        __m256i bad = _mm256_setzero_si256();
        for (size_t k = 0; k < BLOCK; k += 8) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(source + 4 * (i + k)));
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), exponent));
            if (destination) _mm256_storeu_si256((__m256i *)(destination + i + k), v);
        }
        if (!_mm256_testz_si256(bad, bad)) return i;
    }
    return i;
}

KVK_AVX2 static size_t f16_blocks_avx2(const unsigned char *source, uint16_t *destination, size_t count) {
    const __m256i exponent = _mm256_set1_epi16(0x7c00);
    size_t i = 0;
    for (; i + BLOCK <= count; i += BLOCK) {
        __m256i bad = _mm256_setzero_si256();
        for (size_t k = 0; k < BLOCK; k += 16) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(source + 2 * (i + k)));
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(v, exponent), exponent));
            _mm256_storeu_si256((__m256i *)(destination + i + k), v);
        }
        if (!_mm256_testz_si256(bad, bad)) return i;
    }
    return i;
}

KVK_AVX2 static size_t widen_blocks_avx2(const unsigned char *source, float *destination, size_t count) {
    const __m128i exponent = _mm_set1_epi16(0x7c00);
    size_t i = 0;
    for (; i + BLOCK <= count; i += BLOCK) {
        __m128i bad = _mm_setzero_si128();
        for (size_t k = 0; k < BLOCK; k += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)(source + 2 * (i + k)));
            bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent));
            _mm256_storeu_ps(destination + i + k, _mm256_cvtph_ps(h));
        }
        if (!_mm_testz_si128(bad, bad)) return i;
    }
    return i;
}
#endif

// MARK: - Entry points

size_t kvk_load_finite_f32(const void *source, float *destination, size_t count) {
    size_t done = 0;
#ifdef KVK_X86
    if (kvk_has_avx2()) done = f32_blocks_avx2(source, destination, count);
#endif
    return done + f32_portable((const unsigned char *)source + 4 * done, destination + done, count - done);
}

size_t kvk_first_nonfinite_f32(const float *values, size_t count) {
    size_t done = 0;
#ifdef KVK_X86
    if (kvk_has_avx2()) done = f32_blocks_avx2((const unsigned char *)values, NULL, count);
#endif
    return done + f32_portable((const unsigned char *)(values + done), NULL, count - done);
}

size_t kvk_load_finite_f16(const void *source, uint16_t *destination, size_t count) {
    size_t done = 0;
#ifdef KVK_X86
    if (kvk_has_avx2()) done = f16_blocks_avx2(source, destination, count);
#endif
    return done + f16_portable((const unsigned char *)source + 2 * done, destination + done, count - done);
}

size_t kvk_widen_finite_f16(const void *source, float *destination, size_t count) {
    size_t done = 0;
#ifdef KVK_X86
    if (kvk_has_avx2()) done = widen_blocks_avx2(source, destination, count);
#endif
    return done + widen_portable((const unsigned char *)source + 2 * done, destination + done, count - done);
}

size_t kvk_load_finite_f32_portable(const void *source, float *destination, size_t count) {
    return f32_portable(source, destination, count);
}

size_t kvk_load_finite_f16_portable(const void *source, uint16_t *destination, size_t count) {
    return f16_portable(source, destination, count);
}

size_t kvk_widen_finite_f16_portable(const void *source, float *destination, size_t count) {
    return widen_portable(source, destination, count);
}
