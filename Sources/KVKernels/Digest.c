#include "KVKernels.h"
#include "InstructionSet.h"

// Replicas of a shard compare digests of every byte they hold, so a digest runs over hundreds of
// megabytes on both sides of a shard copy, and must keep up with memory. Eight 64-bit lanes take one
// 64-byte stripe per step: lane i adds word i ^ 1 and the product of the two halves of word i
// xor a key (a 32×32→64 multiply, which AVX2 does four lanes at a time); every 16 stripes each lane
// is scrambled (xorshift, xor a key, times an odd constant). Adding a word is a bijection, so a
// change in any one word always changes the lane it is added to. The lanes then go through a chain
// that is a bijection in each input, with the tail and the length. Both paths compute the same
// integer sums, so a digest has the same bits on every CPU.

#define PRIME 0x9e3779b97f4a7c15ull
#define PRIME32 0x9e3779b1u
#define SCRAMBLE_EVERY 16

/// Hexadecimal digits of π: eight keys with no structure.
static const uint64_t KEYS[8] = {
    0x243f6a8885a308d3ull, 0x13198a2e03707344ull, 0xa4093822299f31d0ull, 0x082efa98ec4e6c89ull,
    0x452821e638d01377ull, 0xbe5466cf34e90c6cull, 0xc0ac29b7c97c50ddull, 0x3f84d5b5b5470917ull,
};

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint64_t step(uint64_t lane, uint64_t word) { return rotl((lane ^ word) * PRIME, 29); }

/// MurmurHash3's finaliser: every output bit depends on every input bit.
static inline uint64_t avalanche(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static inline uint64_t scramble(uint64_t lane, uint64_t key) { return (lane ^ (lane >> 47) ^ key) * PRIME32; }

static void stripes_portable(uint64_t acc[8], const unsigned char *p, size_t stripes) {
    for (size_t s = 0; s < stripes; s++, p += 64) {
        for (int i = 0; i < 8; i++) {
            uint64_t word = load64(p + 8 * i), keyed = word ^ KEYS[i];
            acc[i ^ 1] += word;
            acc[i] += (keyed & 0xffffffffu) * (keyed >> 32);
        }
        if (s % SCRAMBLE_EVERY == SCRAMBLE_EVERY - 1)
            for (int i = 0; i < 8; i++) acc[i] = scramble(acc[i], KEYS[i]);
    }
}

#ifdef KVK_X86
KVK_AVX2 static inline __m256i stripe_half(__m256i acc, __m256i word, __m256i key) {
    __m256i keyed = _mm256_xor_si256(word, key);
    __m256i product = _mm256_mul_epu32(keyed, _mm256_srli_epi64(keyed, 32));
    // Words 1, 0, 3, 2: each lane adds its neighbour's word.
    __m256i swapped = _mm256_shuffle_epi32(word, _MM_SHUFFLE(1, 0, 3, 2));
    return _mm256_add_epi64(acc, _mm256_add_epi64(product, swapped));
}

KVK_AVX2 static inline __m256i scramble_half(__m256i acc, __m256i key) {
    __m256i mixed = _mm256_xor_si256(_mm256_xor_si256(acc, _mm256_srli_epi64(acc, 47)), key);
    __m256i prime = _mm256_set1_epi32((int)PRIME32);
    __m256i low = _mm256_mul_epu32(mixed, prime);
    __m256i high = _mm256_mul_epu32(_mm256_srli_epi64(mixed, 32), prime);
    return _mm256_add_epi64(low, _mm256_slli_epi64(high, 32));
}

KVK_AVX2 static void stripes_avx2(uint64_t acc[8], const unsigned char *p, size_t stripes) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc), a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    const __m256i k0 = _mm256_loadu_si256((const __m256i *)KEYS), k1 = _mm256_loadu_si256((const __m256i *)(KEYS + 4));
    for (size_t s = 0; s < stripes; s++, p += 64) {
        a0 = stripe_half(a0, _mm256_loadu_si256((const __m256i *)p), k0);
        a1 = stripe_half(a1, _mm256_loadu_si256((const __m256i *)(p + 32)), k1);
        if (s % SCRAMBLE_EVERY == SCRAMBLE_EVERY - 1) {
            a0 = scramble_half(a0, k0);
            a1 = scramble_half(a1, k1);
        }
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}
#endif

static uint64_t digest(uint64_t seed, const unsigned char *p, size_t count, int portable) {
    uint64_t acc[8];
    for (int i = 0; i < 8; i++) acc[i] = seed ^ KEYS[i];
    size_t stripes = count / 64;
#ifdef KVK_X86
    if (!portable && kvk_has_avx2()) stripes_avx2(acc, p, stripes);
    else stripes_portable(acc, p, stripes);
#else
    (void)portable;
    stripes_portable(acc, p, stripes);
#endif
    uint64_t hash = seed;
    for (int i = 0; i < 8; i++) hash = step(hash, avalanche(acc[i]));
    size_t i = 64 * stripes;
    for (; i + 8 <= count; i += 8) hash = step(hash, load64(p + i));
    uint64_t tail = 0;
    if (i < count) memcpy(&tail, p + i, count - i);
    hash = step(hash, tail);
    return avalanche(hash ^ (uint64_t)count);
}

uint64_t kvk_digest(uint64_t seed, const void *bytes, size_t count) { return digest(seed, bytes, count, 0); }

uint64_t kvk_digest_portable(uint64_t seed, const void *bytes, size_t count) { return digest(seed, bytes, count, 1); }
