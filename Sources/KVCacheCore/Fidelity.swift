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

    /// Adds one attention output (`headDim` floats) of the compressed cache against the full cache's.
    public mutating func recordOutput(full: ArraySlice<Float>, compressed: ArraySlice<Float>) {
        var diff: Float = 0
        var norm: Float = 0
        var dotFC: Float = 0
        var normC: Float = 0
        for (f, c) in zip(full, compressed) {
            let delta = f - c
            diff += delta * delta
            norm += f * f
            normC += c * c
            dotFC += f * c
        }
        relativeErrorSum += Double((diff / max(norm, 1e-30)).squareRoot())
        cosineSum += Double(dotFC / max((norm * normC).squareRoot(), 1e-30))
        outputs += 1
    }

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
        probes: [(queryHead: Int, step: Int)],
        answer: Int,
        decode: @escaping @Sendable (UnsafeBufferPointer<Float>) -> Int
    ) {
        self.probes = probes
        self.answer = answer
        self.decode = decode
    }
}

/// The full cache's side of a comparison for one layer: every decode step's attention output and
/// prompt attention per query head. Computed once, compared against any number of compressed caches.
public struct DecodeReference: Sendable {
    public let promptLength: Int
    public let steps: Int
    /// `outputs[(t * Hq + qh) * d + c]`.
    public let outputs: [Float]
    /// `promptAttention[(t * Hq + qh) * m + j]`: the probability of prompt position `j`.
    public let promptAttention: [Float]

    /// Replays `steps` over `full`, which holds every prompt row (decoded rows are appended to a copy).
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public init<S: KVScalar>(
        geometry g: ModelGeometry,
        promptLength m: Int,
        full: [HeadCache<S>],
        steps: [DecodeStepInput]
    ) {
        let d = g.headDim
        var cache = full
        var outputs = [Float](repeating: 0, count: steps.count * g.queryHeads * d)
        var attention = [Float](repeating: 0, count: steps.count * g.queryHeads * m)
        var scratch = [Float](repeating: 0, count: g.groupSize * (m + steps.count))
        for (t, step) in steps.enumerated() {
            LayerDecoder.append(step, to: &cache, geometry: g, position: m + t)
            step.queries.withUnsafeBufferPointer { queries in
                scratch.withUnsafeMutableBufferPointer { p in
                    for kv in 0..<g.kvHeads {
                        let first = t * g.queryHeads + kv * g.groupSize
                        outputs.withUnsafeMutableBufferPointer { out in
                            cache[kv].attend(
                                queries: queries.baseAddress! + kv * g.groupSize * d,
                                groups: g.groupSize,
                                scratch: p.baseAddress!,
                                output: out.baseAddress! + first * d
                            )
                        }
                        attention.withUnsafeMutableBufferPointer { a in
                            for member in 0..<g.groupSize {
                                (a.baseAddress! + (first + member) * m).update(
                                    from: p.baseAddress! + member * cache[kv].count,
                                    count: m
                                )
                            }
                        }
                    }
                }
            }
        }
        promptLength = m
        self.steps = steps.count
        self.outputs = outputs
        promptAttention = attention
    }
}

public enum FidelityEvaluator {
    /// Appends every decode step's token to the compressed cache (decoded tokens are never evicted)
    /// and compares the attention output of each query head with the full cache's.
    @_specialize(where S == Float)
    @_specialize(where S == Float16)
    public static func evaluate<S: KVScalar>(
        geometry g: ModelGeometry,
        reference: DecodeReference,
        compressed: inout [HeadCache<S>],
        steps: [DecodeStepInput],
        needle: NeedleCheck? = nil
    ) -> FidelityReport {
        precondition(steps.count == reference.steps, "the reference replays a different number of steps")
        var report = FidelityReport()
        let d = g.headDim
        let m = reference.promptLength
        let keptPrompt = compressed.map { head in head.positions.lazy.filter { Int($0) < m }.count }
        var isKept = [[Bool]](repeating: [Bool](repeating: false, count: m), count: g.kvHeads)
        for h in 0..<g.kvHeads {
            for p in compressed[h].positions where Int(p) < m { isKept[h][Int(p)] = true }
        }
        var groupAttention = [Float](repeating: 0, count: m)
        for (t, step) in steps.enumerated() {
            let outputs = LayerDecoder.step(&compressed, geometry: g, input: step, position: m + t)
            for qh in 0..<g.queryHeads {
                let h = qh / g.groupSize
                let row = t * g.queryHeads + qh
                let output = outputs[(qh * d)..<(qh * d + d)]
                report.recordOutput(full: reference.outputs[(row * d)..<(row * d + d)], compressed: output)
                var promptMass: Float = 0
                var keptMass: Float = 0
                for j in 0..<m {
                    let p = reference.promptAttention[row * m + j]
                    promptMass += p
                    if isKept[h][j] { keptMass += p }
                }
                report.massRecallSum += promptMass > 0 ? Double(keptMass / promptMass) : 1
                if t == 0 {
                    for j in 0..<m { groupAttention[j] += reference.promptAttention[row * m + j] }
                    if qh % g.groupSize == g.groupSize - 1 {
                        // VL-Cache's CacheHitRate: overlap of the kept set with the top-k of the
                        // first decode token's (group-mean) attention, k = kept prompt rows.
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
                    if Array(output).withUnsafeBufferPointer(needle.decode) == needle.answer {
                        report.needleCorrect += 1
                    }
                }
            }
        }
        return report
    }
}
