#include "KVKernels.h"
#include "InstructionSet.h"

#include <math.h>


// Decode attention streams every cached key and value row once per step, so with one query per KV
// head these kernels are memory-bound. Rows are read strictly in order, one whole row at a time
// (interleaving four rows from four places halved the bandwidth the hardware prefetcher delivers
// here), and each row serves every query head of its GQA group while it is in L1. A group multiplies
// the work per row, which then bounds the kernels instead of memory: for groups, the key pass shares
// its loads and reductions between queries and the value pass takes four consecutive rows per step.
//
// Both paths compute the same sums in the same order, so a cache decodes to the same bits on any CPU.
// A dot product over d elements: 32 lane sums L[c mod 32], each a fused chain over c < 32⌊d/32⌋ in
// order; t[i] = (L[i] + L[8 + i]) + (L[16 + i] + L[24 + i]); s = ((t0 + t1) + (t2 + t3)) +
// ((t4 + t5) + (t6 + t7)); then the remaining elements fused into s in order; times the scale. A
// weighted sum: per output element, one fused chain over the rows in order.

// MARK: - Portable path

/// Row `j` as Float32: the row itself, or its widening into `buffer`.
static inline const float *row_portable(const void *rows, int half, size_t j, size_t d, float *buffer) {
    if (!half) return (const float *)rows + j * d;
    const uint16_t *in = (const uint16_t *)rows + j * d;
    for (size_t c = 0; c < d; c++) buffer[c] = kvk_from_half(in[c]);
    return buffer;
}

static inline float dot_portable(const float *q, const float *k, size_t d) {
    float lane[32] = {0}, t[8];
    size_t body = d / 32 * 32;
    for (size_t c = 0; c < body; c++) lane[c % 32] = fmaf(q[c], k[c], lane[c % 32]);
    for (size_t i = 0; i < 8; i++) t[i] = (lane[i] + lane[8 + i]) + (lane[16 + i] + lane[24 + i]);
    float sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (size_t c = body; c < d; c++) sum = fmaf(q[c], k[c], sum);
    return sum;
}

static void logits_portable(const float *queries, size_t groups, const void *keys, int half, size_t rows, size_t d,
                            float scale, float *scores, size_t scoreStride) {
    float buffer[KVK_MAX_HEAD_DIM];
    for (size_t j = 0; j < rows; j++) {
        const float *k = row_portable(keys, half, j, d, buffer);
        for (size_t g = 0; g < groups; g++) scores[g * scoreStride + j] = dot_portable(queries + g * d, k, d) * scale;
    }
}

static void weighted_portable(const float *p, size_t groups, size_t pStride, const void *values, int half,
                              size_t rows, size_t d, float *out) {
    float buffer[KVK_MAX_HEAD_DIM];
    for (size_t j = 0; j < rows; j++) {
        const float *v = row_portable(values, half, j, d, buffer);
        for (size_t g = 0; g < groups; g++) {
            float w = p[g * pStride + j];
            float *o = out + g * d;
            for (size_t c = 0; c < d; c++) o[c] = fmaf(w, v[c], o[c]);
        }
    }
}

// MARK: - AVX2 + FMA + F16C

#ifdef KVK_X86

/// Eight elements from `p`, Float32 or half precision widened.
KVK_AVX2 static inline __m256 load8(const void *p, int half, size_t c) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + c)))
                : _mm256_loadu_ps((const float *)p + c);
}

KVK_AVX2 static inline float element(const void *p, int half, size_t c) {
    return half ? kvk_from_half(((const uint16_t *)p)[c]) : ((const float *)p)[c];
}

/// The canonical dot product of a Float32 query and a row of either type.
KVK_AVX2 __attribute__((always_inline)) static inline float dot_avx2(const float *q, const void *k, int half, size_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t body = d / 32 * 32;
    for (size_t c = 0; c < body; c += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k, half, c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), load8(k, half, c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 16), load8(k, half, c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 24), load8(k, half, c + 24), a3);
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m256 pairs = _mm256_hadd_ps(t, t);          // t0+t1 t2+t3 … | t4+t5 t6+t7 …
    __m256 quads = _mm256_hadd_ps(pairs, pairs);  // (t0+t1)+(t2+t3) … | (t4+t5)+(t6+t7) …
    float sum = _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
    for (size_t c = body; c < d; c++) sum = fmaf(q[c], element(k, half, c), sum);
    return sum;
}

/// One row of the weighted sum's chain: `out[c] = fma(w, v[c], out[c])`.
KVK_AVX2 __attribute__((always_inline)) static inline void accumulate_avx2(float *out, float w, const void *v, int half, size_t d) {
    size_t body = d / 8 * 8;
    __m256 x = _mm256_set1_ps(w);
    for (size_t c = 0; c < body; c += 8)
        _mm256_storeu_ps(out + c, _mm256_fmadd_ps(x, load8(v, half, c), _mm256_loadu_ps(out + c)));
    for (size_t c = body; c < d; c++) out[c] = fmaf(w, element(v, half, c), out[c]);
}

/// Row `j` for a whole GQA group: half-precision rows are widened once when several queries share
/// them; a single query widens as it reads (F16C is cheaper than a round trip through a buffer).
KVK_AVX2 static inline const void *group_row(const void *rows, int *half, size_t j, size_t groups, size_t d,
                                             float *buffer) {
    if (!*half) return (const float *)rows + j * d;
    const uint16_t *row = (const uint16_t *)rows + j * d;
    if (groups == 1) return row;
    size_t c = 0;
    for (; c + 8 <= d; c += 8) _mm256_storeu_ps(buffer + c, load8(row, 1, c));
    for (; c < d; c++) buffer[c] = kvk_from_half(row[c]);
    *half = 0;
    return buffer;
}

/// The canonical dot product's lane vector `t = (a0 + a1) + (a2 + a3)` for two queries at once, each
/// load of the row `k` (widened as it is loaded when half) serving both (d a multiple of 32).
KVK_AVX2 __attribute__((always_inline)) static inline void lanes2_avx2(const float *q0, const float *q1,
                                                                      const void *k, int half, size_t d,
                                                                      __m256 *t0, __m256 *t1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (size_t c = 0; c < d; c += 32) {
        __m256 k0 = load8(k, half, c), k1 = load8(k, half, c + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), k0, a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c), k0, b0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c + 8), k1, a1);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c + 8), k1, b1);
        __m256 k2 = load8(k, half, c + 16), k3 = load8(k, half, c + 24);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c + 16), k2, a2);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c + 16), k2, b2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c + 24), k3, a3);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c + 24), k3, b3);
    }
    *t0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    *t1 = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
}

/// Four queries' dot products from their lane vectors, in the canonical order
/// `((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7))` each: one reduction for the four.
KVK_AVX2 __attribute__((always_inline)) static inline __m128 sums4_avx2(__m256 t0, __m256 t1, __m256 t2, __m256 t3) {
    __m256 quads = _mm256_hadd_ps(_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
    return _mm_add_ps(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1));
}

KVK_AVX2 static void logits_avx2(const float *queries, size_t groups, const void *keys, int half, size_t rows,
                                 size_t d, float scale, float *scores, size_t scoreStride) {
    float buffer[KVK_MAX_HEAD_DIM];
    if (groups % 4 == 0 && d % 32 == 0) {
        // A GQA group: each load of the row serves two queries, and four dot products share one
        // reduction, which otherwise costs about as much as the products.
        const __m128 scales = _mm_set1_ps(scale);
        for (size_t j = 0; j < rows; j++) {
            const void *k = half ? (const void *)((const uint16_t *)keys + j * d) : (const float *)keys + j * d;
            for (size_t g = 0; g < groups; g += 4) {
                const float *q = queries + g * d;
                __m256 t0, t1, t2, t3;
                // `half` as a constant in each branch, so the inlined loops test it once, not per load.
                if (half) {
                    lanes2_avx2(q, q + d, k, 1, d, &t0, &t1);
                    lanes2_avx2(q + 2 * d, q + 3 * d, k, 1, d, &t2, &t3);
                } else {
                    lanes2_avx2(q, q + d, k, 0, d, &t0, &t1);
                    lanes2_avx2(q + 2 * d, q + 3 * d, k, 0, d, &t2, &t3);
                }
                float s[4];
                _mm_storeu_ps(s, _mm_mul_ps(sums4_avx2(t0, t1, t2, t3), scales));
                for (int i = 0; i < 4; i++) scores[(g + i) * scoreStride + j] = s[i];
            }
        }
        return;
    }
    for (size_t j = 0; j < rows; j++) {
        int rowHalf = half;
        const void *k = group_row(keys, &rowHalf, j, groups, d, buffer);
        // Constant `half` arguments, so each inlined loop is specialised to one storage type.
        for (size_t g = 0; g < groups; g++)
            scores[g * scoreStride + j] =
                (rowHalf ? dot_avx2(queries + g * d, k, 1, d) : dot_avx2(queries + g * d, k, 0, d)) * scale;
    }
}

/// Four consecutive rows of the chain at once for one query of a group: the same roundings in the
/// same order as four calls of `accumulate_avx2`, with a quarter of the loads and stores of `out`.
KVK_AVX2 __attribute__((always_inline)) static inline void accumulate4_avx2(float *out, const float *w,
                                                                           const float *const *v, size_t d) {
    size_t body = d / 8 * 8;
    __m256 x0 = _mm256_set1_ps(w[0]), x1 = _mm256_set1_ps(w[1]), x2 = _mm256_set1_ps(w[2]), x3 = _mm256_set1_ps(w[3]);
    for (size_t c = 0; c < body; c += 8) {
        __m256 o = _mm256_fmadd_ps(x0, _mm256_loadu_ps(v[0] + c), _mm256_loadu_ps(out + c));
        o = _mm256_fmadd_ps(x1, _mm256_loadu_ps(v[1] + c), o);
        o = _mm256_fmadd_ps(x2, _mm256_loadu_ps(v[2] + c), o);
        _mm256_storeu_ps(out + c, _mm256_fmadd_ps(x3, _mm256_loadu_ps(v[3] + c), o));
    }
    for (size_t c = body; c < d; c++)
        out[c] = fmaf(w[3], v[3][c], fmaf(w[2], v[2][c], fmaf(w[1], v[1][c], fmaf(w[0], v[0][c], out[c]))));
}

KVK_AVX2 static void weighted_avx2(const float *p, size_t groups, size_t pStride, const void *values, int half,
                                   size_t rows, size_t d, float *out) {
    float buffer[KVK_MAX_HEAD_DIM];
    size_t j = 0;
    if (groups > 1) {
        // A group updates groups × d outputs per row: row by row, their loads and stores through L1
        // cost more than the row's FMAs, so the rows go four at a time (Float16 widened once each).
        float widened[4][KVK_MAX_HEAD_DIM];
        for (; j + 4 <= rows; j += 4) {
            const float *v[4];
            for (int r = 0; r < 4; r++) {
                int rowHalf = half;
                v[r] = group_row(values, &rowHalf, j + r, groups, d, widened[r]);
            }
            for (size_t g = 0; g < groups; g++) accumulate4_avx2(out + g * d, p + g * pStride + j, v, d);
        }
    }
    for (; j < rows; j++) {
        int rowHalf = half;
        const void *v = group_row(values, &rowHalf, j, groups, d, buffer);
        for (size_t g = 0; g < groups; g++) {
            if (rowHalf)
                accumulate_avx2(out + g * d, p[g * pStride + j], v, 1, d);
            else
                accumulate_avx2(out + g * d, p[g * pStride + j], v, 0, d);
        }
    }
}

#endif

void kvk_decode_logits(const float *queries, size_t groups, const void *keys, int keysAreHalf, size_t rows,
                       size_t headDim, float scale, float *scores, size_t scoreStride) {
#ifdef KVK_X86
    if (kvk_has_avx2()) {
        logits_avx2(queries, groups, keys, keysAreHalf, rows, headDim, scale, scores, scoreStride);
        return;
    }
#endif
    logits_portable(queries, groups, keys, keysAreHalf, rows, headDim, scale, scores, scoreStride);
}

void kvk_decode_logits_portable(const float *queries, size_t groups, const void *keys, int keysAreHalf, size_t rows,
                                size_t headDim, float scale, float *scores, size_t scoreStride) {
    logits_portable(queries, groups, keys, keysAreHalf, rows, headDim, scale, scores, scoreStride);
}

void kvk_decode_weighted_sum_portable(const float *probabilities, size_t groups, size_t probabilityStride,
                                      const void *values, int valuesAreHalf, size_t rows, size_t headDim, float *out) {
    memset(out, 0, groups * headDim * sizeof(float));
    weighted_portable(probabilities, groups, probabilityStride, values, valuesAreHalf, rows, headDim, out);
}

void kvk_decode_weighted_sum(const float *probabilities, size_t groups, size_t probabilityStride, const void *values,
                             int valuesAreHalf, size_t rows, size_t headDim, float *out) {
    memset(out, 0, groups * headDim * sizeof(float));
#ifdef KVK_X86
    if (kvk_has_avx2()) {
        weighted_avx2(probabilities, groups, probabilityStride, values, valuesAreHalf, rows, headDim, out);
        return;
    }
#endif
    weighted_portable(probabilities, groups, probabilityStride, values, valuesAreHalf, rows, headDim, out);
}
