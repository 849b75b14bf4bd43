import KVCacheCore

@testable import Workloads

/// Settings that keep `.tiny` traces small enough for debug builds: a few hundred tokens at most.
func smallSettings(textScale: Double = 0.5, decodeSteps: Int = 32) -> TraceSettings {
    var settings = TraceSettings.defaults
    settings.textScale = textScale
    settings.decodeSteps = decodeSteps
    return settings
}

/// Softmax attention rows of one query head over one layer's prompt keys.
struct PrefillAttention {
    let prefill: LayerPrefill
    let head: Int

    /// Probabilities of prompt row `row` over positions `0...row`.
    func row(_ row: Int) -> [Float] {
        let d = prefill.geometry.headDim
        let kv = head / prefill.geometry.groupSize
        var scores = [Float](repeating: 0, count: row + 1)
        prefill.queries.withUnsafeBufferPointer { queries in
            prefill.keys[kv].withUnsafeBufferPointer { keys in
                scores.withUnsafeMutableBufferPointer { scores in
                    Kernels.logits(
                        query: queries.baseAddress! + prefill.queryOffset(head: head, row: row),
                        keys: keys.baseAddress!,
                        rows: row + 1,
                        headDim: d,
                        into: scores.baseAddress!
                    )
                    Kernels.softmax(scores.baseAddress!, count: row + 1)
                }
            }
        }
        return scores
    }

    /// `Σ_{q∈rows} A[q, j]` for every prompt position j.
    func columnSums(rows: Range<Int>) -> [Double] {
        var sums = [Double](repeating: 0, count: prefill.promptLength)
        for q in rows {
            for (j, p) in row(q).enumerated() { sums[j] += Double(p) }
        }
        return sums
    }
}

/// One query head's view of a layer with every decoded row appended: prompt keys and values, then
/// decode step t's key and value at position m + t.
struct FullCacheHead {
    let keys: [Float]
    let values: [Float]
    let headDim: Int

    init(prefill: LayerPrefill, decode: [DecodeStepInput], kvHead: Int) {
        let d = prefill.geometry.headDim
        var keys = prefill.keys[kvHead]
        var values = prefill.values[kvHead]
        for step in decode {
            keys += step.keys[kvHead * d..<(kvHead + 1) * d]
            values += step.values[kvHead * d..<(kvHead + 1) * d]
        }
        self.keys = keys
        self.values = values
        headDim = d
    }

    /// Attention of `query` over the first `rows` rows: probabilities and the head output.
    func attend(query: ArraySlice<Float>, rows: Int, skipping skipped: Set<Int> = []) -> (p: [Float], output: [Float]) {
        let d = headDim
        var scores = [Float](repeating: 0, count: rows)
        var output = [Float](repeating: 0, count: d)
        let query = Array(query)
        query.withUnsafeBufferPointer { q in
            keys.withUnsafeBufferPointer { k in
                scores.withUnsafeMutableBufferPointer { s in
                    Kernels.logits(
                        query: q.baseAddress!,
                        keys: k.baseAddress!,
                        rows: rows,
                        headDim: d,
                        into: s.baseAddress!
                    )
                    // A dropped row gets no attention at all, as if evicted from the cache.
                    for j in skipped where j < rows { s[j] = -.infinity }
                    Kernels.softmax(s.baseAddress!, count: rows)
                }
            }
        }
        scores.withUnsafeBufferPointer { p in
            values.withUnsafeBufferPointer { v in
                output.withUnsafeMutableBufferPointer { out in
                    Kernels.weightedSum(
                        probabilities: p.baseAddress!,
                        values: v.baseAddress!,
                        rows: rows,
                        headDim: d,
                        into: out.baseAddress!
                    )
                }
            }
        }
        return (scores, output)
    }
}

/// The indices of the `k` largest values, ties to the lower index.
func topK(_ values: [Double], _ k: Int) -> Set<Int> {
    Set(values.indices.sorted { values[$0] != values[$1] ? values[$0] > values[$1] : $0 < $1 }.prefix(k))
}

func cosine(_ a: ArraySlice<Float>, _ b: ArraySlice<Float>) -> Double {
    var ab = 0.0
    var aa = 0.0
    var bb = 0.0
    for (x, y) in zip(a, b) {
        ab += Double(x * y)
        aa += Double(x * x)
        bb += Double(y * y)
    }
    return ab / max((aa * bb).squareRoot(), 1e-12)
}

func mean(_ xs: [Double]) -> Double { xs.isEmpty ? .nan : xs.reduce(0, +) / Double(xs.count) }
