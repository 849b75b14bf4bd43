#include "KVKernels.h"
#include "InstructionSet.h"


// The synthetic traces' bulk source of standard normals: sixteen interleaved xoshiro256** generators
// and a Box–Muller transform whose log, square root and sine/cosine are fixed polynomials (after
// Cephes), written lane by lane so that the compiler vectorises the sixteen lanes. Every operation
// is rounded on its own (no contraction) and the bit tricks are exact, so a trace is the same on
// every CPU and path.
#pragma clang fp contract(off)

static inline uint64_t rotate_left(uint64_t x, unsigned k) { return (x << k) | (x >> (64 - k)); }

/// One xoshiro256** step of lane `l`. The multiplications by 5 and 9 are shift-adds (AVX2 has no
/// 64-bit vector multiply).
static inline __attribute__((always_inline)) uint64_t next_word(kvk_normal_state *g, int l) {
    uint64_t s0 = g->s0[l], s1 = g->s1[l], s2 = g->s2[l], s3 = g->s3[l];
    uint64_t times5 = (s1 << 2) + s1, rotated = rotate_left(times5, 7), result = (rotated << 3) + rotated;
    uint64_t t = s1 << 17;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    g->s0[l] = s0;
    g->s1[l] = s1;
    g->s2[l] = s2;
    g->s3[l] = rotate_left(s3, 45);
    return result;
}

/// A uniform float in [0, 1) from the top 23 bits of `bits`.
static inline float unit_interval(uint32_t bits) { return kvk_as_float((bits >> 9) | 0x3F800000u) - 1; }

static inline __attribute__((always_inline)) float lane_sqrt(float x) {
    float v = x + 1e-30f;  // keeps 0 away from the division; no effect on normal inputs
    float y = kvk_as_float((kvk_as_bits(v) >> 1) + 0x1FBD1DF5u);
    y = 0.5f * (y + v / y);
    y = 0.5f * (y + v / y);
    y = 0.5f * (y + v / y);
    return y;
}

static inline __attribute__((always_inline)) float lane_log(float x) {
    uint32_t bits = kvk_as_bits(x) + (0x3F800000u - 0x3F3504F3u);
    float exponent = (kvk_as_float((bits >> 23) | 0x4B000000u) - 8388608.0f) - 127;
    float m = kvk_as_float((bits & 0x007FFFFFu) + 0x3F3504F3u) - 1;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += exponent * -2.12194440e-4f;
    y -= 0.5f * z;
    return m + y + exponent * 0.693359375f;
}

static inline __attribute__((always_inline)) void lane_sin_cos_two_pi(float u, float *sine, float *cosine) {
    static const float MAGIC = 12582912.0f, HALF_PI = 0x1.921fb4p+0f;  // 1.5·2²³; π rounded down, halved
    float t = u * 4;
    float shifted = t + MAGIC;  // rounds t to the nearest integer, left in the low mantissa bits
    uint32_t quadrant = kvk_as_bits(shifted) & 3;
    float a = (t - (shifted - MAGIC)) * HALF_PI;
    float z = a * a;
    float s = -1.9515295891e-4f;
    s = s * z + 8.3321608736e-3f;
    s = s * z - 1.6666654611e-1f;
    s = s * z * a + a;
    float c = 2.443315711809948e-5f;
    c = c * z - 1.388731625493765e-3f;
    c = c * z + 4.166664568298827e-2f;
    c = c * z * z - 0.5f * z + 1;
    // Odd quadrants swap sine and cosine; quadrants 2, 3 negate the sine; 1, 2 the cosine.
    uint32_t swap = 0u - (quadrant & 1), sBits = kvk_as_bits(s), cBits = kvk_as_bits(c);
    *sine = kvk_as_float(((sBits & ~swap) | (cBits & swap)) ^ ((quadrant & 2) << 30));
    *cosine = kvk_as_float(((cBits & ~swap) | (sBits & swap)) ^ (((quadrant + 1) & 2) << 30));
}

/// Lane `l`'s two normals from one word: r·cos to `cosine` and r·sin to `sine`, from its low half
/// (u1, the radius) and high half (u2, the angle).
static inline __attribute__((always_inline)) void box_muller(uint32_t low, uint32_t high, float *cosine, float *sine) {
    float u1 = 1 - unit_interval(low);  // in (0, 1], so the log is finite
    float u2 = unit_interval(high);
    float radius = lane_sqrt(-2 * lane_log(u1)), s, c;
    lane_sin_cos_two_pi(u2, &s, &c);
    *cosine = radius * c;
    *sine = radius * s;
}

/// `n` consecutive blocks (`n` is 1 or 2, a constant): block `b`'s 32 normals are out[l] = r·cos and
/// out[16 + l] = r·sin of lane l's word. The words and the floats are two loops so that each
/// vectorises at its own width; two blocks in one loop give the vector units two independent
/// chains of polynomial steps (a lane's words still come in order).
static inline __attribute__((always_inline)) void run_blocks(kvk_normal_state *g, float *out, const int n) {
    uint32_t low[2 * KVK_NORMAL_LANES], high[2 * KVK_NORMAL_LANES];
    for (int k = 0; k < n; k++) {
        for (int l = 0; l < KVK_NORMAL_LANES; l++) {
            uint64_t word = next_word(g, l);
            low[k * KVK_NORMAL_LANES + l] = (uint32_t)word;
            high[k * KVK_NORMAL_LANES + l] = (uint32_t)(word >> 32);
        }
    }
#pragma clang loop vectorize_width(16)
    for (int l = 0; l < KVK_NORMAL_LANES; l++) {
        box_muller(low[l], high[l], &out[l], &out[KVK_NORMAL_LANES + l]);
        if (n == 2) {
            int m = KVK_NORMAL_LANES + l;
            box_muller(low[m], high[m], &out[2 * KVK_NORMAL_LANES + l], &out[3 * KVK_NORMAL_LANES + l]);
        }
    }
}

static inline __attribute__((always_inline)) void blocks_body(kvk_normal_state *g, float *out, size_t blocks) {
    size_t b = 0;
    for (; b + 2 <= blocks; b += 2, out += 4 * KVK_NORMAL_LANES) run_blocks(g, out, 2);
    if (b < blocks) run_blocks(g, out, 1);
}

static inline __attribute__((always_inline)) void skip_body(kvk_normal_state *g, size_t blocks) {
    for (size_t b = 0; b < blocks; b++)
        for (int l = 0; l < KVK_NORMAL_LANES; l++) (void)next_word(g, l);
}

#ifdef KVK_X86
// AVX-512 where the CPU has it: its 64-bit shifts and rotates, sixteen float lanes per register and
// 32 registers run the same operations in half the instructions (twice the normals per second,
// measured on a Zen 4 EPYC), and the bits stay the same.
KVK_AVX512 static void blocks_avx512(kvk_normal_state *g, float *out, size_t blocks) { blocks_body(g, out, blocks); }
KVK_AVX2 static void blocks_avx2(kvk_normal_state *g, float *out, size_t blocks) { blocks_body(g, out, blocks); }
KVK_AVX2 static void skip_avx2(kvk_normal_state *g, size_t blocks) { skip_body(g, blocks); }
#endif

void kvk_normal_blocks(kvk_normal_state *state, float *out, size_t blocks) {
#ifdef KVK_X86
    if (kvk_has_avx512()) return blocks_avx512(state, out, blocks);
#endif
    kvk_normal_blocks_avx2(state, out, blocks);
}

void kvk_normal_blocks_avx2(kvk_normal_state *state, float *out, size_t blocks) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return blocks_avx2(state, out, blocks);
#endif
    blocks_body(state, out, blocks);
}

void kvk_normal_skip(kvk_normal_state *state, size_t blocks) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return skip_avx2(state, blocks);
#endif
    skip_body(state, blocks);
}

void kvk_normal_blocks_portable(kvk_normal_state *state, float *out, size_t blocks) { blocks_body(state, out, blocks); }

float kvk_lane_sqrt(float x) { return lane_sqrt(x); }
float kvk_lane_log(float x) { return lane_log(x); }
void kvk_lane_sin_cos_two_pi(float u, float *sine, float *cosine) { lane_sin_cos_two_pi(u, sine, cosine); }
