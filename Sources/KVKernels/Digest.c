#include "KVKernels.h"
#include <string.h>

// Replicas of a shard compare digests of every byte they hold, so a digest runs over hundreds of
// megabytes when a shard is copied. Four independent lanes each take one 64-bit word per step
// (xor, multiply by an odd constant, rotate: each a bijection, so a change in any one word always
// changes its lane), which keeps the multiplier busy every cycle instead of waiting on one chain.
// Plain C with fixed-width integers: the same bits on every CPU and compiler.

#define PRIME 0x9e3779b97f4a7c15ull

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

uint64_t kvk_digest(uint64_t seed, const void *bytes, size_t count) {
    const unsigned char *p = bytes;
    uint64_t a = seed, b = seed ^ 0x243f6a8885a308d3ull, c = seed ^ 0x13198a2e03707344ull,
             d = seed ^ 0xa4093822299f31d0ull;
    size_t i = 0;
    for (; i + 32 <= count; i += 32) {
        a = step(a, load64(p + i));
        b = step(b, load64(p + i + 8));
        c = step(c, load64(p + i + 16));
        d = step(d, load64(p + i + 24));
    }
    for (; i + 8 <= count; i += 8) a = step(a, load64(p + i));
    uint64_t tail = 0;
    if (i < count) memcpy(&tail, p + i, count - i);
    a = step(a, tail);
    uint64_t hash = avalanche(a) ^ rotl(avalanche(b), 16) ^ rotl(avalanche(c), 32) ^ rotl(avalanche(d), 48);
    return avalanche(hash ^ (uint64_t)count);
}
