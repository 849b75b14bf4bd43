/// How far a compressed cache's decode attention is from the full cache's, accumulated over layers,
/// heads and decode steps.
public struct FidelityReport: Sendable, Hashable, Codable {
    public var relativeErrorSum = 0.0
    public var cosineSum = 0.0
    public var outputs = 0
    /// Σ over (head, step) of the share of full-cache prompt attention that lands on kept positions.
    public var massRecallSum = 0.0
    /// Σ over KV heads of VL-Cache's CacheHitRate (first decode token, top-k with k = kept rows).
    public var hitRateSum = 0.0
    public var hitRateHeads = 0
    public var needleCorrect = 0
    public var needleProbes = 0

    public init() {}

    public mutating func merge(_ other: FidelityReport) {
        relativeErrorSum += other.relativeErrorSum
        cosineSum += other.cosineSum
        outputs += other.outputs
        massRecallSum += other.massRecallSum
        hitRateSum += other.hitRateSum
        hitRateHeads += other.hitRateHeads
        needleCorrect += other.needleCorrect
        needleProbes += other.needleProbes
    }

    /// Mean `‖o − o'‖ / ‖o‖` of decode-attention outputs.
    public var outputError: Double { outputs == 0 ? 0 : relativeErrorSum / Double(outputs) }
    public var outputCosine: Double { outputs == 0 ? 1 : cosineSum / Double(outputs) }
    public var massRecall: Double { outputs == 0 ? 1 : massRecallSum / Double(outputs) }
    public var hitRate: Double { hitRateHeads == 0 ? 1 : hitRateSum / Double(hitRateHeads) }
    /// Share of needle probes answered correctly (nil without probes).
    public var needleAccuracy: Double? { needleProbes == 0 ? nil : Double(needleCorrect) / Double(needleProbes) }
}

/// A planted answer the decode queries look for: at each probe (query head, step) the attention
/// output is decoded to an answer index and compared with `answer`.
public struct NeedleCheck: Sendable {
    public var probes: [(queryHead: Int, step: Int)]
    public var answer: Int
    public var decode: @Sendable (UnsafeBufferPointer<Float>) -> Int

    public init(
        probes: [(queryHead: Int, step: Int)], answer: Int, decode: @escaping @Sendable (UnsafeBufferPointer<Float>) -> Int
    ) {
        self.probes = probes
        self.answer = answer
        self.decode = decode
    }
}

public enum FidelityEvaluator {
    /// Appends every decode step's token to both caches (decoded tokens are never evicted) and compares
    /// the attention output of each query head over the compressed cache with the full one.
    public static func evaluate<S: KVScalar>(
        geometry g: ModelGeometry, promptLength m: Int, full: inout [HeadCache<S>], compressed: inout [HeadCache<S>],
        steps: [DecodeStepInput], needle: NeedleCheck? = nil
    ) -> FidelityReport {
        var report = FidelityReport()
        let d = g.headDim
        let keptPrompt = compressed.map { head in head.positions.lazy.filter { Int($0) < m }.count }
        var isKept = [[Bool]](repeating: [Bool](repeating: false, count: m), count: g.kvHeads)
        for h in 0..<g.kvHeads {
            for p in compressed[h].positions where Int(p) < m { isKept[h][Int(p)] = true }
        }
        let maxRows = m + steps.count
        var fullProbabilities = [Float](repeating: 0, count: maxRows)
        var scratch = [Float](repeating: 0, count: maxRows)
        var fullOut = [Float](repeating: 0, count: d)
        var compressedOut = [Float](repeating: 0, count: d)
        var groupAttention = [Float](repeating: 0, count: m)
        for (t, step) in steps.enumerated() {
            step.keys.withUnsafeBufferPointer { keys in
                step.values.withUnsafeBufferPointer { values in
                    for h in 0..<g.kvHeads {
                        let key = UnsafeBufferPointer(rebasing: keys[(h * d)..<(h * d + d)])
                        let value = UnsafeBufferPointer(rebasing: values[(h * d)..<(h * d + d)])
                        full[h].append(key: key, value: value, position: m + t, tag: .text)
                        compressed[h].append(key: key, value: value, position: m + t, tag: .text)
                    }
                }
            }
            if t == 0 { groupAttention.withUnsafeMutableBufferPointer { $0.update(repeating: 0) } }
            step.queries.withUnsafeBufferPointer { queries in
                for qh in 0..<g.queryHeads {
                    let h = qh / g.groupSize
                    let query = queries.baseAddress! + qh * d
                    fullProbabilities.withUnsafeMutableBufferPointer { p in
                        fullOut.withUnsafeMutableBufferPointer { full[h].attend(query: query, scratch: p.baseAddress!, output: $0.baseAddress!) }
                    }
                    scratch.withUnsafeMutableBufferPointer { p in
                        compressedOut.withUnsafeMutableBufferPointer {
                            compressed[h].attend(query: query, scratch: p.baseAddress!, output: $0.baseAddress!)
                        }
                    }
                    var diff: Float = 0
                    var norm: Float = 0
                    var dotFC: Float = 0
                    var normC: Float = 0
                    for c in 0..<d {
                        let delta = fullOut[c] - compressedOut[c]
                        diff += delta * delta
                        norm += fullOut[c] * fullOut[c]
                        normC += compressedOut[c] * compressedOut[c]
                        dotFC += fullOut[c] * compressedOut[c]
                    }
                    report.relativeErrorSum += Double((diff / max(norm, 1e-30)).squareRoot())
                    report.cosineSum += Double(dotFC / max((norm * normC).squareRoot(), 1e-30))
                    report.outputs += 1
                    var promptMass: Float = 0
                    var keptMass: Float = 0
                    for j in 0..<m {
                        promptMass += fullProbabilities[j]
                        if isKept[h][j] { keptMass += fullProbabilities[j] }
                    }
                    report.massRecallSum += promptMass > 0 ? Double(keptMass / promptMass) : 1
                    if t == 0 {
                        for j in 0..<m { groupAttention[j] += fullProbabilities[j] }
                        if qh % g.groupSize == g.groupSize - 1 {
                            let k = keptPrompt[h]
                            let top = Selection.top(k, of: groupAttention, among: Array(0..<m))
                            let hits = top.lazy.filter { isKept[h][$0] }.count
                            report.hitRateSum += k == 0 ? 0 : Double(hits) / Double(k)
                            report.hitRateHeads += 1
                            groupAttention.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
                        }
                    }
                    if let needle, needle.probes.contains(where: { $0.queryHead == qh && $0.step == t }) {
                        report.needleProbes += 1
                        if compressedOut.withUnsafeBufferPointer(needle.decode) == needle.answer {
                            report.needleCorrect += 1
                        }
                    }
                }
            }
        }
        return report
    }
}
