/// What a layer's prefill attention tells the policies: column sums of the causal softmax over row
/// suffixes `start..<m` (per query head), and VL-Cache's per-head sparsity. One backward pass over
/// the rows yields every requested suffix, so policies that observe different rows share the work.
public struct AttentionProfile: Sendable {
    public let promptLength: Int
    public let queryHeads: Int
    public let groupSize: Int
    /// `columnSums[start]![h * m + j]` = Σ_{q ∈ start..<m, q ≥ j} A[h][q, j].
    public let columnSums: [Int: [Float]]
    /// γ[h]: the fraction of causal entries in the sparsity rows below `threshold × row max`.
    public let headSparsity: [Double]

    /// Computes the profile; the cost is one causal attention row per observed row and query head.
    public init(prefill: LayerPrefill, requirements: ProfileRequirements) throws(KVCacheError) {
        let g = prefill.geometry
        let m = prefill.promptLength
        let d = g.headDim
        promptLength = m
        queryHeads = g.queryHeads
        groupSize = g.groupSize
        let starts = requirements.suffixStarts
        if let bad = starts.first(where: { !(0...m).contains($0) }) {
            throw KVCacheError(.invalidShape, "observation start \(bad) is outside 0...\(m)")
        }
        let firstRow = requirements.firstRow ?? m
        guard firstRow >= prefill.firstQueryRow else {
            throw KVCacheError(
                .invalidShape,
                "the policy observes prompt rows from \(firstRow), but queries start at row "
                    + "\(prefill.firstQueryRow); send at least the last \(m - firstRow) query rows")
        }
        let sparsityStart = requirements.sparsityStart ?? m
        let threshold = requirements.sparsityThreshold
        var sums = [Int: [Float]]()
        for start in starts { sums[start] = [Float](repeating: 0, count: g.queryHeads * m) }
        var sparsity = [Double](repeating: 0, count: g.queryHeads)
        var running = [Float](repeating: 0, count: m)
        var probabilities = [Float](repeating: 0, count: m)
        let snapshots = starts.sorted(by: >)

        prefill.keys.withUnsafeBufferPointer { keys in
            prefill.queries.withUnsafeBufferPointer { queries in
                for h in 0..<g.queryHeads {
                    let keyBase = keys.baseAddress! + prefill.kvOffset(head: h / g.groupSize, position: 0)
                    running.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
                    var zeroed = 0
                    var entries = 0
                    var nextSnapshot = 0
                    // Sums over start..<m are complete once every row ≥ start has been added.
                    func snapshot(above row: Int) {
                        while nextSnapshot < snapshots.count, snapshots[nextSnapshot] > row {
                            let start = snapshots[nextSnapshot]
                            running.withUnsafeBufferPointer { r in
                                sums[start]!.withUnsafeMutableBufferPointer { out in
                                    (out.baseAddress! + h * m).update(from: r.baseAddress!, count: m)
                                }
                            }
                            nextSnapshot += 1
                        }
                    }
                    for row in stride(from: m - 1, through: firstRow, by: -1) {
                        snapshot(above: row)
                        let count = row + 1
                        probabilities.withUnsafeMutableBufferPointer { p in
                            let p = p.baseAddress!
                            Kernels.logits(
                                query: queries.baseAddress! + prefill.queryOffset(head: h, row: row), keys: keyBase,
                                rows: count, headDim: d, into: p)
                            Kernels.softmax(p, count: count)
                            if nextSnapshot < snapshots.count {
                                running.withUnsafeMutableBufferPointer { r in
                                    Kernels.accumulate(p, into: r.baseAddress!, count: count)
                                }
                            }
                            if row >= sparsityStart {
                                zeroed += Kernels.countBelow(p, count: count, fractionOfMax: threshold)
                                entries += count
                            }
                        }
                    }
                    snapshot(above: firstRow - 1)
                    if sparsityStart < m {
                        sparsity[h] = entries == 0 ? 0 : Double(zeroed) / Double(entries)
                    }
                }
            }
        }
        columnSums = sums
        headSparsity = sparsity
    }

    /// Per KV head scores for `start`: the mean over each GQA group of its query heads' column sums.
    public func kvHeadScores(start: Int) -> [Float] {
        guard let sums = columnSums[start] else {
            preconditionFailure("profile has no column sums for rows \(start)..<\(promptLength)")
        }
        let m = promptLength
        let kvHeads = queryHeads / groupSize
        var result = [Float](repeating: 0, count: kvHeads * m)
        let scale = 1 / Float(groupSize)
        result.withUnsafeMutableBufferPointer { out in
            sums.withUnsafeBufferPointer { s in
                for h in 0..<queryHeads {
                    Kernels.accumulate(s.baseAddress! + h * m, into: out.baseAddress! + (h / groupSize) * m, count: m)
                }
                for i in 0..<out.count { out[i] *= scale }
            }
        }
        return result
    }

    /// Causal attention entries computed per query head to observe rows `start..<m`: a cost model
    /// for attributing one shared pass to the policies that needed less of it.
    public static func entries(promptLength m: Int, start: Int) -> Int { (m * (m + 1) - start * (start + 1)) / 2 }

    /// VL-Cache's layer density `1 − mean_h γ[h]`.
    public var density: Double { 1 - headSparsity.reduce(0, +) / Double(max(1, headSparsity.count)) }
}

extension Kernels {
    /// `out[i] += x[i]` for `count` elements.
    @inline(__always)
    public static func accumulate(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, count: Int) {
        var i = 0
        while i + 16 <= count {
            let sum = load16(out + i) + load16(x + i)
            UnsafeMutableRawPointer(out + i).storeBytes(of: sum, as: SIMD16<Float>.self)
            i += 16
        }
        while i < count {
            out[i] += x[i]
            i += 1
        }
    }

    /// How many of `count` probabilities fall below `fraction × max`.
    @inline(__always)
    public static func countBelow(_ p: UnsafePointer<Float>, count: Int, fractionOfMax fraction: Float) -> Int {
        var maxV = SIMD16<Float>(repeating: 0)
        var i = 0
        while i + 16 <= count {
            maxV = pointwiseMax(maxV, load16(p + i))
            i += 16
        }
        var maxP = maxV.max()
        while i < count {
            maxP = Swift.max(maxP, p[i])
            i += 1
        }
        let cut = fraction * maxP
        var below = SIMD16<Int32>()
        i = 0
        while i + 16 <= count {
            below &+= SIMD16<Int32>().replacing(with: 1, where: load16(p + i) .< cut)
            i += 16
        }
        var total = Int(below.wrappedSum())
        while i < count {
            if p[i] < cut { total += 1 }
            i += 1
        }
        return total
    }
}
