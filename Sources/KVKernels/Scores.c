#include "KVKernels.h"
#include "InstructionSet.h"

#include <math.h>


enum { PANEL = KVK_PANEL_KEYS, GROUP = 6 };

void kvk_pack_keys(const float *rows, size_t headDim, const intptr_t *indices, size_t count, float *panels) {
    size_t padded = kvk_packed_floats(count, headDim);
    memset(panels + count / PANEL * PANEL * headDim, 0, (padded - count / PANEL * PANEL * headDim) * sizeof(float));
    for (size_t t = 0; t < count; t++) {
        const float *row = rows + (indices ? (size_t)indices[t] : t) * headDim;
        float *out = panels + t / PANEL * PANEL * headDim + t % PANEL;
        for (size_t c = 0; c < headDim; c++) out[c * PANEL] = row[c];
    }
}

/// Panels a group of query rows starting at row `first` needs (all of them when not causal).
static inline size_t panels_needed(size_t first, size_t groupRows, size_t keys, size_t causalEnd) {
    size_t needed = causalEnd ? causalEnd + first + groupRows - 1 : keys;
    if (needed > keys) needed = keys;
    return (needed + PANEL - 1) / PANEL;
}

// MARK: - Portable path: the same fused chain through fmaf, which compilers vectorise where FMA is native.

static void group_portable(const float *q, size_t queryStride, size_t rows, const float *panel, size_t headDim,
                           float scale, float *out, size_t scoreStride) {
    float acc[GROUP][PANEL];
    memset(acc, 0, sizeof acc);
    for (size_t c = 0; c < headDim; c++) {
        const float *k = panel + c * PANEL;
        for (size_t i = 0; i < rows; i++) {
            float qi = q[i * queryStride + c];
            for (size_t t = 0; t < PANEL; t++) acc[i][t] = fmaf(qi, k[t], acc[i][t]);
        }
    }
    for (size_t i = 0; i < rows; i++)
        for (size_t t = 0; t < PANEL; t++) out[i * scoreStride + t] = acc[i][t] * scale;
}

static void scores_portable(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                            size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride) {
    size_t panelCount = (keys + PANEL - 1) / PANEL;
    for (size_t p = 0; p < panelCount; p++) {
        for (size_t i = 0; i < rows; i += GROUP) {
            size_t groupRows = rows - i < GROUP ? rows - i : GROUP;
            if (p >= panels_needed(i, groupRows, keys, causalEnd)) continue;
            group_portable(queries + i * queryStride, queryStride, groupRows, panels + p * PANEL * headDim, headDim,
                           scale, scores + i * scoreStride + p * PANEL, scoreStride);
        }
    }
}

// MARK: - AVX2 + FMA: six query rows × sixteen keys in twelve accumulators.

#ifdef KVK_X86
KVK_AVX2 static inline void
group6_avx2(const float *q, size_t queryStride, const float *panel, size_t headDim, float scale, float *out,
            size_t scoreStride) {
    // Fixed trip counts: the compiler unrolls these loops and keeps all twelve sums in registers.
    __m256 acc[GROUP][2];
    for (int i = 0; i < GROUP; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (size_t c = 0; c < headDim; c++) {
        __m256 k0 = _mm256_loadu_ps(panel + c * PANEL);
        __m256 k1 = _mm256_loadu_ps(panel + c * PANEL + 8);
        for (int i = 0; i < GROUP; i++) {
            __m256 b = _mm256_broadcast_ss(q + i * queryStride + c);
            acc[i][0] = _mm256_fmadd_ps(b, k0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(b, k1, acc[i][1]);
        }
    }
    __m256 s = _mm256_set1_ps(scale);
    for (int i = 0; i < GROUP; i++) {
        _mm256_storeu_ps(out + i * scoreStride, _mm256_mul_ps(acc[i][0], s));
        _mm256_storeu_ps(out + i * scoreStride + 8, _mm256_mul_ps(acc[i][1], s));
    }
}

/// One query row × sixteen keys, for the rows left over after whole groups of six.
KVK_AVX2 static inline void
row_avx2(const float *q, const float *panel, size_t headDim, float scale, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (size_t c = 0; c < headDim; c++) {
        __m256 b = _mm256_broadcast_ss(q + c);
        a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(panel + c * PANEL), a0);
        a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(panel + c * PANEL + 8), a1);
    }
    __m256 s = _mm256_set1_ps(scale);
    _mm256_storeu_ps(out, _mm256_mul_ps(a0, s));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(a1, s));
}

// Panels outer, row groups inner: a panel (16 keys, 8 KiB at headDim 128) stays in L1 while every
// row group of the tile reads it.
KVK_AVX2 static void
scores_avx2(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys, size_t headDim,
            float scale, size_t causalEnd, float *scores, size_t scoreStride) {
    size_t panelCount = (keys + PANEL - 1) / PANEL;
    for (size_t p = 0; p < panelCount; p++) {
        const float *panel = panels + p * PANEL * headDim;
        for (size_t i = 0; i < rows; i += GROUP) {
            size_t groupRows = rows - i < GROUP ? rows - i : GROUP;
            if (p >= panels_needed(i, groupRows, keys, causalEnd)) continue;
            float *out = scores + i * scoreStride + p * PANEL;
            const float *q = queries + i * queryStride;
            if (groupRows == GROUP) {
                group6_avx2(q, queryStride, panel, headDim, scale, out, scoreStride);
            } else {
                for (size_t r = 0; r < groupRows; r++)
                    row_avx2(q + r * queryStride, panel, headDim, scale, out + r * scoreStride);
            }
        }
    }
}

KVK_AVX2 static float fma_loop_avx2(size_t iterations) {
    __m256 a[10];
    for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps((float)i * 1e-3f);
    const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
    for (size_t n = 0; n < iterations; n++) {
        // Ten independent chains cover the FMA latency on two pipes.
        for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]),
                         "+x"(a[7]), "+x"(a[8]), "+x"(a[9]));
    }
    __m256 s = a[0];
    for (int i = 1; i < 10; i++) s = _mm256_add_ps(s, a[i]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    return lanes[0] + lanes[7];
}

#endif

static float fma_loop_portable(size_t iterations) {
    float a[10][8];
    for (int i = 0; i < 10; i++)
        for (int t = 0; t < 8; t++) a[i][t] = (float)i * 1e-3f;
    for (size_t n = 0; n < iterations; n++)
        for (int i = 0; i < 10; i++)
            for (int t = 0; t < 8; t++) a[i][t] = fmaf(a[i][t], 0.999999f, 1e-7f);
    return a[0][0] + a[9][7];
}

void kvk_scores(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride) {
#ifdef KVK_X86
    if (kvk_has_avx2()) {
        scores_avx2(queries, queryStride, rows, panels, keys, headDim, scale, causalEnd, scores, scoreStride);
        return;
    }
#endif
    scores_portable(queries, queryStride, rows, panels, keys, headDim, scale, causalEnd, scores, scoreStride);
}

void kvk_scores_portable(const float *queries, size_t queryStride, size_t rows, const float *panels, size_t keys,
                         size_t headDim, float scale, size_t causalEnd, float *scores, size_t scoreStride) {
    scores_portable(queries, queryStride, rows, panels, keys, headDim, scale, causalEnd, scores, scoreStride);
}

double kvk_fma_loop_flops(size_t iterations) { return (double)iterations * 10 * 8 * 2; }

float kvk_fma_loop(size_t iterations) {
#ifdef KVK_X86
    if (kvk_has_avx2()) return fma_loop_avx2(iterations);
#endif
    return fma_loop_portable(iterations);
}

const char *kvk_path(void) { return kvk_has_avx2() ? "avx2+fma" : "portable"; }
