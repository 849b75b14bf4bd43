// Compute-bound kernels in C, so that each can carry its own instruction set
// (`__attribute__((target(...)))`) and be chosen at run time: the package then builds for any CPU
// without unsafe compiler flags, and still runs AVX2/FMA code where the CPU has it.
#ifndef KVKERNELS_H
#define KVKERNELS_H

#include <stddef.h>
#include <stdint.h>

/// Keys per packed panel: one panel holds `headDim` groups of this many floats, so that a score
/// tile reads the keys it needs contiguously.
#define KVK_PANEL_KEYS 16

/// Floats a packed copy of `count` keys of `headDim` elements needs (the last panel is zero-padded).
static inline size_t kvk_packed_floats(size_t count, size_t headDim) {
    return (count + KVK_PANEL_KEYS - 1) / KVK_PANEL_KEYS * KVK_PANEL_KEYS * headDim;
}

/// Packs key rows into panels: row `indices[t]` (or row `t` when `indices` is NULL) of `rows`
/// (row-major, `headDim` floats each) becomes key `t`; element `c` of key `t` lands at
/// `panels[(t / 16) * 16 * headDim + c * 16 + t % 16]`.
void kvk_pack_keys(const float *rows, size_t headDim, const intptr_t *indices, size_t count, float *panels);

/// `scores[i * scoreStride + j] = scale * (query_i · key_j)` for `rows` query rows (row `i` at
/// `queries + i * queryStride`) against the first `keys` packed keys, `j` rounded up to whole panels.
///
/// With `causalEnd` non-zero, query row `i` needs only keys `0 ..< causalEnd + i`: panels past the
/// last key any row of a six-row group needs are skipped (their scores are left unwritten).
/// Each score is one fused multiply-add chain over `c = 0 ..< headDim` in order, so results depend
/// neither on tiling nor on threads nor on the path (AVX2 or portable).
void kvk_scores(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride);

/// The largest head size the decode kernels take (as `ModelGeometry` allows).
#define KVK_MAX_HEAD_DIM 1024

/// Decode logits of a GQA group: `scores[g * scoreStride + j] = scale * (query_g · key_j)` for
/// `groups` queries (back to back, `headDim` floats each) against `rows` key rows, Float32 or, with
/// `keysAreHalf`, IEEE half precision. Each key row is read once for the whole group.
void kvk_decode_logits(const float *queries, size_t groups, const void *keys, int keysAreHalf, size_t rows,
                       size_t headDim, float scale, float *scores, size_t scoreStride);

/// `out[g * headDim + c] = Σ_j probabilities[g * probabilityStride + j] * value_j[c]` for a GQA group:
/// each value row is read once for the whole group.
void kvk_decode_weighted_sum(const float *probabilities, size_t groups, size_t probabilityStride, const void *values,
                             int valuesAreHalf, size_t rows, size_t headDim, float *out);

/// A 64-bit digest of `count` bytes continuing from `seed` (the digest of what came before), for
/// comparing replicas: order-sensitive, the same bits on every CPU, at about memory bandwidth.
uint64_t kvk_digest(uint64_t seed, const void *bytes, size_t count);

/// Turns `count` logits into probabilities in place; returns the largest logit. e^x is Cephes'
/// single-precision polynomial (`kvk_exp`), each operation rounded on its own, in a fixed order.
float kvk_softmax(float *scores, size_t count);

/// e^x as the softmax computes it: relative error below 2e-7 for x in [-87, 88], 0 below -87.
float kvk_exp(float x);

/// `out[i] += x[i]` for `count` elements.
void kvk_accumulate(const float *x, float *out, size_t count);

/// How many of `count` probabilities fall below `fractionOfMax` times the largest of them (and 0).
size_t kvk_count_below(const float *probabilities, size_t count, float fractionOfMax);

/// IEEE half precision of `count` floats, rounded to nearest even (F16C where the CPU has it).
void kvk_narrow_to_half(const float *source, uint16_t *destination, size_t count);

/// Wire tensors into storage: `count` little-endian elements at `source` (any alignment) copied to
/// `destination` as Float32, as half precision, or widened from half precision exactly, with the
/// finiteness check fused into the copy. Each returns the index of the first element that is NaN or
/// infinite (the destination's contents are then unspecified), or `count` when all are finite.
size_t kvk_load_finite_f32(const void *source, float *destination, size_t count);
size_t kvk_load_finite_f16(const void *source, uint16_t *destination, size_t count);
size_t kvk_widen_finite_f16(const void *source, float *destination, size_t count);

/// The index of the first element of `values` that is NaN or infinite, or `count`.
size_t kvk_first_nonfinite_f32(const float *values, size_t count);

/// Lanes of the normal generator.
#define KVK_NORMAL_LANES 16

/// Sixteen interleaved xoshiro256** generators (lane `l`'s state is `s0[l] ... s3[l]`).
typedef struct {
    uint64_t s0[KVK_NORMAL_LANES], s1[KVK_NORMAL_LANES], s2[KVK_NORMAL_LANES], s3[KVK_NORMAL_LANES];
} kvk_normal_state;

/// `blocks × 32` standard normals (Box–Muller on both halves of each lane's next word): block `b`
/// writes `r·cos` of lanes 0–15 then `r·sin` of lanes 0–15 at `out + 32b`.
void kvk_normal_blocks(kvk_normal_state *state, float *out, size_t blocks);

/// Steps every generator `blocks` times without transforming: what skipping `32 × blocks` normals costs.
void kvk_normal_skip(kvk_normal_state *state, size_t blocks);

/// The generator's fixed-polynomial functions for one lane (relative error about 1e-7): the square
/// root of a non-negative float below 2¹²⁶, the natural log of a positive normal float, and
/// (sin 2πu, cos 2πu) for u in [0, 1).
float kvk_lane_sqrt(float x);
float kvk_lane_log(float x);
void kvk_lane_sin_cos_two_pi(float u, float *sine, float *cosine);

/// The portable paths of the kernels above, whatever the CPU: tests check that both paths give the
/// same bits.
void kvk_scores_portable(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                         size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride);
void kvk_decode_logits_portable(const float *queries, size_t groups, const void *keys, int keysAreHalf, size_t rows,
                                size_t headDim, float scale, float *scores, size_t scoreStride);
void kvk_decode_weighted_sum_portable(const float *probabilities, size_t groups, size_t probabilityStride,
                                      const void *values, int valuesAreHalf, size_t rows, size_t headDim, float *out);
float kvk_softmax_portable(float *scores, size_t count);
void kvk_narrow_to_half_portable(const float *source, uint16_t *destination, size_t count);
void kvk_normal_blocks_portable(kvk_normal_state *state, float *out, size_t blocks);
/// The generator's AVX2 path (the portable one without AVX2), which `kvk_normal_blocks` passes over
/// on a CPU with AVX-512: so tests there check it too.
void kvk_normal_blocks_avx2(kvk_normal_state *state, float *out, size_t blocks);
size_t kvk_load_finite_f32_portable(const void *source, float *destination, size_t count);
size_t kvk_load_finite_f16_portable(const void *source, uint16_t *destination, size_t count);
size_t kvk_widen_finite_f16_portable(const void *source, float *destination, size_t count);
uint64_t kvk_digest_portable(uint64_t seed, const void *bytes, size_t count);

/// Floating-point operations a register-only FMA loop performs in `iterations` (see `kvk_fma_loop`).
double kvk_fma_loop_flops(size_t iterations);

/// A loop of independent fused multiply-adds on registers only, at the width `kvk_scores` uses:
/// the machine's compute peak per core. Returns a value that depends on every operation.
float kvk_fma_loop(size_t iterations);

/// The instruction set the kernels run with on this CPU: "avx2+fma" or "portable".
const char *kvk_path(void);

#endif
