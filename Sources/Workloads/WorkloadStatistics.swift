import KVCacheCore

/// What a trace's attention actually looks like, measured with full (uncompressed) attention:
/// per-layer VL-Cache sparsity, modality shares, and full-cache needle accuracy. For
/// `tessera eval --describe` and for checking the generator against its targets.
public struct WorkloadStatistics: Sendable, CustomStringConvertible {
    public struct Layer: Sendable, Hashable {
        public let layer: Int
        public let targetSparsity: Double
        /// VL-Cache γ: over post-vision rows, the fraction of causal entries below 1% of the row
        /// maximum, pooled per query head, then averaged over query heads.
        public let sparsity: Double
        /// The same measure over decode queries (prompt plus already decoded keys).
        public let decodeSparsity: Double
        /// Attention mass of post-vision rows on visual keys, as a share of all mass except the
        /// sink's (every head parks mass on position 0 whatever its preference); mean over heads.
        public let imageShare: Double
        public let decodeImageShare: Double
        /// `imageShare` of every query head: the heads' modality preferences as observed.
        public let headImageShares: [Double]

        /// Standard deviation of `headImageShares`.
        public var preferenceSpread: Double {
            guard !headImageShares.isEmpty else { return 0 }
            let mean = headImageShares.reduce(0, +) / Double(headImageShares.count)
            let variance = headImageShares.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(headImageShares.count)
            return variance.squareRoot()
        }
    }

    public let preset: WorkloadPreset
    public let modelName: String
    public let promptLength: Int
    public let visualCount: Int
    public let postVisionStart: Int
    public let decodeSteps: Int
    public let layers: [Layer]
    /// Fraction of needle probes whose full-cache head output decodes to the planted answer.
    public let needleAccuracy: Double?
    public let needleProbeCount: Int

    /// Measures every layer. Post-vision rows are subsampled evenly to at most `maxPostVisionRows`
    /// per head (the last row always included), which bounds the cost for long documents.
    public static func measure(_ trace: SequenceTrace, maxPostVisionRows: Int = 128) -> WorkloadStatistics {
        let geometry = trace.geometry
        let m = trace.promptLength
        let v = trace.layout.postVisionStart
        let tags = trace.layout.tags
        let rows = sampledRows(from: v, to: m, limit: maxPostVisionRows)
        let probesByLayer = Dictionary(grouping: trace.needle?.probes ?? [], by: \.layer)
        var layers: [Layer] = []
        var probesRight = 0
        var probesTotal = 0
        for layer in 0..<geometry.layers {
            let (prefill, decode) = trace.layerTrace(layer)
            var counter = AttentionCounter(tags: tags)
            var headShares: [Double] = []
            var sparsitySum = 0.0
            var decodeCounter = AttentionCounter(tags: tags)
            var decodeSparsitySum = 0.0
            var decodeShareSum = 0.0

            let cache = FullCache(prefill: prefill, decode: decode)
            let probes = Set((probesByLayer[layer] ?? []).map { [$0.queryHead, $0.step] })
            var scratch = [Float](repeating: 0, count: m + decode.count)
            var output = [Float](repeating: 0, count: geometry.headDim)
            for head in 0..<geometry.queryHeads {
                let kv = head / geometry.groupSize
                counter.reset()
                prefill.queries.withUnsafeBufferPointer { queries in
                    for q in rows {
                        let query = queries.baseAddress! + prefill.queryOffset(head: head, row: q)
                        cache.attend(
                            kvHead: kv,
                            query: query,
                            rows: q + 1,
                            scratch: &scratch,
                            output: &output,
                            computeOutput: false
                        )
                        counter.add(probabilities: scratch, count: q + 1)
                    }
                }
                sparsitySum += counter.sparsity
                headShares.append(counter.imageShare)

                decodeCounter.reset()
                for (step, input) in decode.enumerated() {
                    let visible = m + step + 1
                    let isProbe = probes.contains([head, step])
                    input.queries.withUnsafeBufferPointer { queries in
                        let query = queries.baseAddress! + head * geometry.headDim
                        cache.attend(
                            kvHead: kv,
                            query: query,
                            rows: visible,
                            scratch: &scratch,
                            output: &output,
                            computeOutput: isProbe
                        )
                    }
                    decodeCounter.add(probabilities: scratch, count: visible)
                    if isProbe, let needle = trace.needle {
                        probesTotal += 1
                        if needle.decodeAnswer(output: output) == needle.answer { probesRight += 1 }
                    }
                }
                decodeSparsitySum += decodeCounter.sparsity
                decodeShareSum += decodeCounter.imageShare
            }
            let heads = Double(geometry.queryHeads)
            layers.append(
                Layer(
                    layer: layer,
                    targetSparsity: trace.targetSparsity[layer],
                    sparsity: sparsitySum / heads,
                    decodeSparsity: decode.isEmpty ? .nan : decodeSparsitySum / heads,
                    imageShare: headShares.reduce(0, +) / heads,
                    decodeImageShare: decode.isEmpty ? .nan : decodeShareSum / heads,
                    headImageShares: headShares
                )
            )
        }
        return WorkloadStatistics(
            preset: trace.preset,
            modelName: geometry.name,
            promptLength: m,
            visualCount: trace.layout.visualCount,
            postVisionStart: v,
            decodeSteps: trace.decodeSteps,
            layers: layers,
            needleAccuracy: probesTotal == 0 ? nil : Double(probesRight) / Double(probesTotal),
            needleProbeCount: probesTotal
        )
    }

    static func sampledRows(from start: Int, to end: Int, limit: Int) -> [Int] {
        let count = end - start
        guard count > 0 else { return [] }
        guard count > limit, limit >= 1 else { return Array(start..<end) }
        // Evenly spaced, ending at the last row.
        return (0..<limit).map { end - 1 - ($0 * (count - 1)) / max(limit - 1, 1) }.reversed()
    }

    public var description: String {
        func fixed(_ x: Double, _ digits: Int = 3) -> String {
            guard x.isFinite else { return "-" }
            var scale = 1.0
            for _ in 0..<digits { scale *= 10 }
            let scaled = Int((abs(x) * scale).rounded())
            let whole = scaled / Int(scale)
            var fraction = String(scaled % Int(scale))
            while fraction.count < digits { fraction = "0" + fraction }
            return (x < 0 && scaled != 0 ? "-" : "") + "\(whole).\(fraction)"
        }
        func pad(_ s: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - s.count)) + s }
        var lines: [String] = []
        lines.append(
            "workload \(preset.rawValue) on \(modelName): prompt \(promptLength) tokens (\(visualCount) visual, "
                + "post-vision from \(postVisionStart)), \(decodeSteps) decode steps"
        )
        let header = ["layer", "target γ", "γ", "decode γ", "image", "dec image", "head min", "head max", "spread"]
        let widths = [5, 9, 7, 9, 7, 10, 9, 9, 7]
        lines.append(zip(header, widths).map { pad($0, $1) }.joined(separator: " "))
        for layer in layers {
            let cells = [
                String(layer.layer), fixed(layer.targetSparsity), fixed(layer.sparsity), fixed(layer.decodeSparsity),
                fixed(layer.imageShare), fixed(layer.decodeImageShare), fixed(layer.headImageShares.min() ?? .nan),
                fixed(layer.headImageShares.max() ?? .nan), fixed(layer.preferenceSpread),
            ]
            lines.append(zip(cells, widths).map { pad($0, $1) }.joined(separator: " "))
        }
        if let needleAccuracy {
            lines.append("needle: full-cache accuracy \(fixed(needleAccuracy)) over \(needleProbeCount) probes")
        } else {
            lines.append("needle: no probes")
        }
        return lines.joined(separator: "\n")
    }
}

/// Prompt keys and values plus every decoded row, contiguous per KV head, so a query at decode
/// step t attends over the first m + t + 1 rows.
struct FullCache {
    let headDim: Int
    let capacity: Int
    var keys: [Float]
    var values: [Float]

    init(prefill: LayerPrefill, decode: [DecodeStepInput]) {
        let geometry = prefill.geometry
        let d = geometry.headDim
        let m = prefill.promptLength
        headDim = d
        capacity = m + decode.count
        var keys = [Float](repeating: 0, count: geometry.kvHeads * capacity * d)
        var values = keys
        for kv in 0..<geometry.kvHeads {
            let target = kv * capacity * d
            keys.replaceSubrange(target..<target + m * d, with: prefill.keys[kv])
            values.replaceSubrange(target..<target + m * d, with: prefill.values[kv])
            for (t, step) in decode.enumerated() {
                let row = target + (m + t) * d
                keys.replaceSubrange(row..<row + d, with: step.keys[kv * d..<(kv + 1) * d])
                values.replaceSubrange(row..<row + d, with: step.values[kv * d..<(kv + 1) * d])
            }
        }
        self.keys = keys
        self.values = values
    }

    /// Softmax attention of `query` over the first `rows` rows of `kvHead`; probabilities are left
    /// in `scratch`, the head output in `output` when `computeOutput`.
    func attend(
        kvHead: Int,
        query: UnsafePointer<Float>,
        rows: Int,
        scratch: inout [Float],
        output: inout [Float],
        computeOutput: Bool
    ) {
        let base = kvHead * capacity * headDim
        keys.withUnsafeBufferPointer { keys in
            scratch.withUnsafeMutableBufferPointer { scratch in
                Kernels.logits(
                    query: query,
                    keys: keys.baseAddress! + base,
                    rows: rows,
                    headDim: headDim,
                    into: scratch.baseAddress!
                )
                Kernels.softmax(scratch.baseAddress!, count: rows)
                if computeOutput {
                    values.withUnsafeBufferPointer { values in
                        output.withUnsafeMutableBufferPointer { out in
                            Kernels.weightedSum(
                                probabilities: scratch.baseAddress!,
                                values: values.baseAddress! + base,
                                rows: rows,
                                headDim: headDim,
                                into: out.baseAddress!
                            )
                        }
                    }
                }
            }
        }
    }
}

/// Accumulates VL-Cache sparsity and the visual share of attention over rows of one head.
struct AttentionCounter {
    let tags: [ModalityTag]
    private(set) var belowThreshold = 0
    private(set) var entries = 0
    private(set) var visualMass = 0.0
    private(set) var nonSinkMass = 0.0

    init(tags: [ModalityTag]) { self.tags = tags }

    mutating func reset() {
        belowThreshold = 0
        entries = 0
        visualMass = 0
        nonSinkMass = 0
    }

    /// One attention row over positions `0..<count` (positions beyond the prompt are decoded text).
    mutating func add(probabilities p: [Float], count: Int) {
        var largest: Float = 0
        for j in 0..<count { largest = max(largest, p[j]) }
        let threshold = 0.01 * largest
        var below = 0
        var visual = 0.0
        var total = 0.0
        let promptCount = min(count, tags.count)
        for j in 0..<count {
            if p[j] < threshold { below += 1 }
            if j > 0 {
                total += Double(p[j])
                if j < promptCount && tags[j].isVisual { visual += Double(p[j]) }
            }
        }
        belowThreshold += below
        entries += count
        visualMass += visual
        nonSinkMass += total
    }

    var sparsity: Double { entries == 0 ? .nan : Double(belowThreshold) / Double(entries) }
    var imageShare: Double { nonSinkMass > 0 ? visualMass / nonSinkMass : .nan }
}
