import KVKernels

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
    /// TGV-KV's text-weighted attention (empty unless required): `[h * m + j]` = Σ_{q ≥ t} w[q] ·
    /// A[h][q, j] over the rows from `t = textWeightedStart`, where w[q] = Σ_{r ≥ q} A[h][r, q] / (m − q)
    /// is the mean attention row q receives from the rows of that suffix.
    public let textWeightedSums: [Float]

    /// Query rows scored together: each packed key panel is read once per tile (from L1 for all of
    /// the tile's row groups), and the tile's scores stay in L2.
    static let tileRows = 24

    /// Computes the profile: one causal attention row per observed row and query head, as tiles of
    /// query rows against packed key panels (`kvk_scores`). KV heads are split across the workers of
    /// `threads` in a fixed pattern; every head is computed the same way on any thread, so the result
    /// does not depend on the team.
    public init(
        prefill: LayerPrefill,
        requirements: ProfileRequirements,
        threads: ThreadTeam = .single
    ) throws(KVCacheError) {
        let g = prefill.geometry
        let m = prefill.promptLength
        promptLength = m
        queryHeads = g.queryHeads
        groupSize = g.groupSize
        let starts = requirements.suffixStarts
        if let bad = starts.first(where: { !(0...m).contains($0) }) {
            throw KVCacheError(.invalidShape, "observation start \(bad) is outside 0...\(m)")
        }
        if let start = requirements.textWeightedStart, !starts.contains(start) {
            throw KVCacheError(.invalidShape, "text-weighted rows from \(start) need the column sums from \(start) too")
        }
        let firstRow = requirements.firstRow ?? m
        guard firstRow >= prefill.firstQueryRow else {
            throw KVCacheError(
                .invalidShape,
                "the policy observes prompt rows from \(firstRow), but queries start at row "
                    + "\(prefill.firstQueryRow); send at least the last \(m - firstRow) query rows"
            )
        }
        let pass = ProfilePass(
            prefill: prefill,
            firstRow: firstRow,
            snapshots: starts.sorted(by: >),
            sparsityStart: requirements.sparsityStart ?? m,
            threshold: requirements.sparsityThreshold,
            weightedStart: requirements.textWeightedStart ?? m
        )
        var sums = [Float](repeating: 0, count: pass.snapshots.count * g.queryHeads * m)
        var sparsity = [Double](repeating: 0, count: g.queryHeads)
        var weighted = [Float](repeating: 0, count: requirements.textWeightedStart == nil ? 0 : g.queryHeads * m)
        sums.withUnsafeMutableBufferPointer { sums in
            sparsity.withUnsafeMutableBufferPointer { sparsity in
                weighted.withUnsafeMutableBufferPointer { weighted in
                    let output = ProfilePass.Output(
                        sums: Kernels.SharedOutput(sums.baseAddress!),
                        sparsity: Kernels.SharedOutput(sparsity.baseAddress!),
                        weighted: weighted.baseAddress.map { Kernels.SharedOutput($0) }
                    )
                    // A policy that observes no rows (the full cache) costs no pass at all.
                    guard firstRow < m else { return }
                    threads.forEachWorker(limit: g.kvHeads) { pass.run(worker: $0, of: $1, into: output) }
                }
            }
        }
        textWeightedSums = weighted
        var columnSums = [Int: [Float]]()
        let perStart = g.queryHeads * m
        for (i, start) in pass.snapshots.enumerated() {
            columnSums[start] = Array(sums[(i * perStart)..<((i + 1) * perStart)])
        }
        self.columnSums = columnSums
        headSparsity = sparsity
    }

    /// Per KV head scores for `start`: the mean over each GQA group of its query heads' column sums.
    public func kvHeadScores(start: Int) -> [Float] {
        guard let sums = columnSums[start] else {
            preconditionFailure("profile has no column sums for rows \(start)..<\(promptLength)")
        }
        return groupMeans(sums)
    }

    /// Per KV head text-weighted scores: the mean over each GQA group of `textWeightedSums`.
    public func kvHeadTextWeightedScores() -> [Float] {
        precondition(!textWeightedSums.isEmpty, "profile has no text-weighted sums")
        return groupMeans(textWeightedSums)
    }

    /// `[kv * m + j]`: the mean of `sums[h * m + j]` over the query heads h of KV head kv.
    private func groupMeans(_ sums: [Float]) -> [Float] {
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

    /// Multiply-adds of the score products behind a profile that observes rows `firstRow..<m` of
    /// every query head (what `bench-kernels` turns into GFLOP/s).
    public static func flops(geometry: ModelGeometry, promptLength m: Int, firstRow: Int) -> Double {
        2 * Double(entries(promptLength: m, start: firstRow)) * Double(geometry.headDim * geometry.queryHeads)
    }

    /// VL-Cache's layer density `1 − mean_h γ[h]`.
    public var density: Double { 1 - headSparsity.reduce(0, +) / Double(max(1, headSparsity.count)) }
}

/// One layer's profile pass, head by head: for each query head, tiles of rows from the last one
/// backwards; per row a softmax, its addition to the running column sums (copied out whenever the
/// rows of a requested suffix are complete) and the sparsity count.
private struct ProfilePass {
    let prefill: LayerPrefill
    let firstRow: Int
    /// Suffix starts, largest first: the running sums are complete for `start` once every row ≥ start
    /// has been added.
    let snapshots: [Int]
    let sparsityStart: Int
    let threshold: Float
    /// First row of TGV-KV's text-weighted sums (`m`: none); always a snapshot, so the running sums
    /// cover every row from it.
    let weightedStart: Int

    /// Where every head writes its results (disjoint ranges per head).
    struct Output {
        let sums: Kernels.SharedOutput<Float>
        let sparsity: Kernels.SharedOutput<Double>
        let weighted: Kernels.SharedOutput<Float>?
    }

    /// Runs KV heads `worker, worker + workers, …` with buffers of its own.
    func run(worker: Int, of workers: Int, into output: Output) {
        // Nothing observed (the full cache, StreamingLLM): every sum and sparsity stays 0.
        guard firstRow < prefill.promptLength else { return }
        let g = prefill.geometry
        let m = prefill.promptLength
        let d = g.headDim
        let stride = kvk_packed_floats(m, 1)
        let packed = UnsafeMutablePointer<Float>.allocate(capacity: kvk_packed_floats(m, d))
        let tile = UnsafeMutablePointer<Float>.allocate(capacity: AttentionProfile.tileRows * stride)
        let running = UnsafeMutablePointer<Float>.allocate(capacity: m)
        defer {
            packed.deallocate()
            tile.deallocate()
            running.deallocate()
        }
        prefill.queries.withUnsafeBufferPointer { queries in
            for kv in Swift.stride(from: worker, to: g.kvHeads, by: workers) {
                prefill.keys[kv].withUnsafeBufferPointer { kvk_pack_keys($0.baseAddress!, d, nil, m, packed) }
                for h in (kv * g.groupSize)..<((kv + 1) * g.groupSize) {
                    head(
                        h,
                        queries: queries.baseAddress!,
                        packed: packed,
                        tile: tile,
                        stride: stride,
                        running: running,
                        into: output
                    )
                }
            }
        }
    }

    private func head(
        _ h: Int,
        queries: UnsafePointer<Float>,
        packed: UnsafePointer<Float>,
        tile: UnsafeMutablePointer<Float>,
        stride: Int,
        running: UnsafeMutablePointer<Float>,
        into output: Output
    ) {
        let m = prefill.promptLength
        let d = prefill.geometry.headDim
        let scale = 1 / Float(d).squareRoot()
        running.update(repeating: 0, count: m)
        var zeroed = 0
        var entries = 0
        var nextSnapshot = 0
        func snapshot(above row: Int) {
            while nextSnapshot < snapshots.count, snapshots[nextSnapshot] > row {
                let out = output.sums.pointer + (nextSnapshot * prefill.geometry.queryHeads + h) * m
                out.update(from: running, count: m)
                nextSnapshot += 1
            }
        }
        var tileEnd = m
        while tileEnd > firstRow {
            let tileStart = max(firstRow, tileEnd - AttentionProfile.tileRows)
            // Row `tileStart + i` attends to keys 0...tileStart + i.
            kvk_scores(
                queries + prefill.queryOffset(head: h, row: tileStart),
                d,
                tileEnd - tileStart,
                packed,
                tileEnd,
                d,
                scale,
                tileStart + 1,
                tile,
                stride
            )
            for row in Swift.stride(from: tileEnd - 1, through: tileStart, by: -1) {
                snapshot(above: row)
                let p = tile + (row - tileStart) * stride
                let count = row + 1
                Kernels.softmax(p, count: count)
                if nextSnapshot < snapshots.count {
                    Kernels.accumulate(p, into: running, count: count)
                }
                if row >= weightedStart, let weighted = output.weighted {
                    // Rows are taken last to first, so `running[row]` now holds all the attention
                    // row `row` receives from the rows from `weightedStart`.
                    let weight = running[row] / Float(m - row)
                    let out = weighted.pointer + h * m
                    for j in 0..<count { out[j] += weight * p[j] }
                }
                if row >= sparsityStart {
                    zeroed += Kernels.countBelow(p, count: count, fractionOfMax: threshold)
                    entries += count
                }
            }
            tileEnd = tileStart
        }
        snapshot(above: firstRow - 1)
        if sparsityStart < m {
            output.sparsity.pointer[h] = entries == 0 ? 0 : Double(zeroed) / Double(entries)
        }
    }
}
extension Kernels {
    /// `out[i] += x[i]` for `count` elements (`kvk_accumulate`).
    @inline(__always)
    public static func accumulate(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, count: Int) {
        kvk_accumulate(x, out, count)
    }

    /// How many of `count` probabilities fall below `fraction × max` (`kvk_count_below`).
    @inline(__always)
    public static func countBelow(_ p: UnsafePointer<Float>, count: Int, fractionOfMax fraction: Float) -> Int {
        kvk_count_below(p, count, fraction)
    }
}
