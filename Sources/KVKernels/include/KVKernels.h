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
/// Each score is one fused multiply-add chain over `c = 0 ..< headDim` in order, so results do not
/// depend on tiling or threads; they may differ in the last bits between the AVX2 and portable paths.
void kvk_scores(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride);

/// Floating-point operations a register-only FMA loop performs in `iterations` (see `kvk_fma_loop`).
double kvk_fma_loop_flops(size_t iterations);

/// A loop of independent fused multiply-adds on registers only, at the width `kvk_scores` uses:
/// the machine's compute peak per core. Returns a value that depends on every operation.
float kvk_fma_loop(size_t iterations);

/// The instruction set the kernels run with on this CPU: "avx2+fma" or "portable".
const char *kvk_path(void);

#endif
