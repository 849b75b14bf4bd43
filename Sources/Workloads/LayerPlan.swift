import KVCacheCore
import Synchronization

/// How a head's `d` dimensions are split. Keys carry their content (text noise, image field,
/// positional component) in the first `contentDims`; the rest are near-empty "reserved" axes, one
/// each for the sink, the needle and every salient key. A query reaches a salient key through its
/// axis alone, so it can give many keys chosen logits without raising the logits of the bulk:
/// aiming at random isotropic keys instead would add Σ gap²/d of variance to every other logit,
/// too much to control sparsity at small d.
struct HeadSpace {
    let headDim: Int
    let contentDims: Int
    let reservedDims: Int

    init(headDim: Int) {
        self.headDim = headDim
        reservedDims = headDim / 2
        contentDims = headDim - reservedDims
    }

    var sinkAxis: Int { contentDims }
    var needleAxis: Int { contentDims + 1 }
    var firstCodeAxis: Int { contentDims + 2 }
    var codeCapacity: Int { reservedDims - 2 }

    /// Amplitude of a key on its axis: √d, so a query coefficient β on that axis adds exactly β
    /// to the scaled logit q·k/√d.
    var axisAmplitude: Float { Float(headDim).squareRoot() }
}

/// Constants of the synthetic attention that the settings do not expose. All [inferred].
enum Synthesis {
    /// ln 100: an entry is "sparse" (VL-Cache, p = 0.01) when its logit is this far below the row max.
    static let thresholdLogitGap = 4.605_170_185_988_091
    /// Weight of the positional AR(1) component in key content.
    static let keyPositionalWeight = 0.5
    /// Std of key noise on the reserved axes.
    static let reservedNoise: Float = 0.1
    /// Content scale of the sink key and of salient (coded) keys: their identity is their axis.
    static let sinkContentScale: Float = 0.05
    static let codedContentScale = 0.3
    /// Sink values are small, as in trained models where the sink acts as a no-op.
    static let sinkValueScale: Float = 0.25
    /// Text rows before the last visual token: sink plus recency plus a weak random part.
    static let preVisionLogitStd = 1.0
    static let preVisionSinkLogit: Float = 4.0
    /// Visual rows: nearly uniform; a small random part, the sink, and their own patch's
    /// neighbourhood (through the similarity of neighbouring keys).
    static let visualLogitStd = 0.3
    static let visualSinkLogit: Float = 3.0
    static let visualSelfLogit = 1.5
    /// Bulk spread bounds; the headroom keeps the largest bulk logit below the sink so the row
    /// maximum, and with it the 1% threshold, stays where the calibration puts it.
    static let minBulkLogitStd = 0.5
    static let bulkHeadroom = 0.5
    /// Correlation of horizontally adjacent cells of a field blurred by [1 4 6 4 1]/16: 56/70.
    static let fieldNeighbourCorrelation = 0.8
}

/// A key a query can aim at through its own reserved axis.
struct CodedKey: Hashable {
    var position: Int
    var axis: Int
}

/// The per-(sequence, layer) structure: sparsity target and bulk spread, the salient sets of every
/// query head and the decode-only keys of every KV head. Prefill and decode both rebuild it from
/// the same stream, so either can be expanded alone.
struct LayerPlan {
    let layer: Int
    let sparsity: Double
    let bulkLogitStd: Double
    let calibrator: SinkCalibrator
    /// Per query head, its salient keys in ascending position.
    let salient: [[CodedKey]]
    /// Per KV head, keys that decode queries attend to but post-vision rows do not favour.
    let decodeOnly: [[CodedKey]]
    /// Per KV head, every coded key (union of the above).
    let coded: [[CodedKey]]
    /// Per KV head, whether the needle's keys carry the needle direction (a retrieval head reads it).
    let needleCarriers: [Bool]
    /// Per KV head, ascending positions of every key with an axis (coded keys, and the needle's
    /// keys in carriers); a row that does not aim at them sees them as inert.
    let markedPositions: [[Int]]
    /// Per query head.
    let retrieval: [Bool]

    init(trace: SequenceTrace, layer: Int, space: HeadSpace) {
        let geometry = trace.geometry
        let settings = trace.settings
        let layout = trace.layout
        let m = layout.promptLength
        self.layer = layer
        sparsity = trace.targetSparsity[layer]

        let retrieval = (0..<geometry.queryHeads).map { trace.model.isRetrieval(layer: layer, queryHead: $0) }
        self.retrieval = retrieval
        let needleCarriers = (0..<geometry.kvHeads).map { kv in
            trace.needle != nil && (0..<geometry.groupSize).contains { retrieval[kv * geometry.groupSize + $0] }
        }
        self.needleCarriers = needleCarriers

        // Choose the bulk spread s so that the largest of ~m bulk logits (plus the recency boost)
        // stays below the sink: s·(z_{1-1/m} − z_γ) ≤ ln100 − R − headroom.
        let recency = settings.recencyLogitBoost
        let zMax = DeterministicMath.normalQuantile(1 - 1 / Double(max(m, 4)))
        let zSparsity = DeterministicMath.normalQuantile(min(max(sparsity, 1e-6), 1 - 1e-6))
        let room = Synthesis.thresholdLogitGap - recency - Synthesis.bulkHeadroom
        var spread = zMax > zSparsity ? room / (zMax - zSparsity) : settings.maxBulkLogitStd
        spread = min(settings.maxBulkLogitStd, max(Synthesis.minBulkLogitStd, spread))
        // The query's positional component alone contributes this much spread.
        let floor =
            QueryScales.positionalWeight(space: space, recency: recency)
            * (Double(space.contentDims) / Double(space.headDim)).squareRoot()
        spread = max(spread, floor)
        bulkLogitStd = spread
        calibrator = SinkCalibrator(
            density: 1 - sparsity,
            bulkStd: spread,
            codedStd: Synthesis.codedContentScale * spread,
            recencyBoost: recency,
            recencyCorrelation: settings.recencyCorrelation
        )

        // Salient sets.
        var rng = StructureRNG(seed: StreamKind.layerPlan.seed(trace.seed, layer))
        var excluded = [Bool](repeating: false, count: m)
        excluded[0] = true
        for p in trace.needle?.positions ?? [] { excluded[p] = true }
        var visual: [Int] = []
        var text: [Int] = []
        for j in 0..<m where !excluded[j] {
            if layout.tags[j].isVisual { visual.append(j) } else { text.append(j) }
        }
        let groupSize = geometry.groupSize
        let sizes = Self.salientSizes(
            desired: max(1, Int((settings.salientFraction * Double(m)).rounded())),
            groupSize: groupSize,
            sharing: settings.gqaSharing,
            agreement: settings.decodeAgreement,
            capacity: min(space.codeCapacity, visual.count + text.count)
        )

        var salient = [[CodedKey]](repeating: [], count: geometry.queryHeads)
        var decodeOnly = [[CodedKey]](repeating: [], count: geometry.kvHeads)
        var coded = [[CodedKey]](repeating: [], count: geometry.kvHeads)
        var used = [Bool](repeating: false, count: m)
        for kv in 0..<geometry.kvHeads {
            var keys: [CodedKey] = []
            func draw(_ preferVisual: Double) -> CodedKey? {
                let visualFirst = rng.bernoulli(preferVisual)
                for pool in visualFirst ? [visual, text] : [text, visual] where !pool.isEmpty {
                    if let position = Self.pickUnused(pool, used: &used, rng: &rng) {
                        let key = CodedKey(position: position, axis: space.firstCodeAxis + keys.count)
                        keys.append(key)
                        return key
                    }
                }
                return nil
            }
            let groupPreference = trace.model.groupPreference[layer * geometry.kvHeads + kv]
            let core = (0..<sizes.shared).compactMap { _ in draw(groupPreference) }
            for member in 0..<groupSize {
                let head = kv * groupSize + member
                let preference = trace.model.headPreference[layer * geometry.queryHeads + head]
                let own = (0..<sizes.own).compactMap { _ in draw(preference) }
                salient[head] = (core + own).sorted { $0.position < $1.position }
            }
            decodeOnly[kv] = (0..<sizes.decodeOnly).compactMap { _ in draw(groupPreference) }
            coded[kv] = keys
            for key in keys { used[key.position] = false }
        }
        self.salient = salient
        self.decodeOnly = decodeOnly
        self.coded = coded
        let needlePositions = trace.needle?.positions ?? []
        markedPositions = (0..<geometry.kvHeads).map { kv in
            (coded[kv].map(\.position) + (needleCarriers[kv] ? needlePositions : [])).sorted()
        }
    }

    /// Shared, per-head and decode-only counts: as close to `desired` salient keys per head as the
    /// reserved axes of one KV head allow.
    private static func salientSizes(
        desired: Int,
        groupSize: Int,
        sharing: Double,
        agreement: Double,
        capacity: Int
    ) -> (shared: Int, own: Int, decodeOnly: Int) {
        var size = desired
        while size >= 1 {
            let shared = groupSize == 1 ? size : Int((sharing * Double(size)).rounded())
            let own = size - shared
            // Decode-only keys in the proportion (1 − a) : a to the salient ones, at most as many.
            let extra =
                agreement >= 1
                ? 0 : max(1, Int((Double(size) * min(1, (1 - agreement) / max(agreement, 1e-9))).rounded()))
            if shared + groupSize * own + extra <= capacity { return (shared, own, extra) }
            size -= 1
        }
        return (0, 0, 0)
    }

    private static func pickUnused(_ pool: [Int], used: inout [Bool], rng: inout StructureRNG) -> Int? {
        for _ in 0..<16 {
            let candidate = pool[rng.int(below: pool.count)]
            if !used[candidate] {
                used[candidate] = true
                return candidate
            }
        }
        let start = rng.int(below: pool.count)
        for offset in 0..<pool.count {
            let candidate = pool[(start + offset) % pool.count]
            if !used[candidate] {
                used[candidate] = true
                return candidate
            }
        }
        return nil
    }
}

/// Scales that turn logit-space targets into query coefficients.
enum QueryScales {
    /// Coefficient of the positional AR vector in a text query, so that the query's own position
    /// gets `recency` extra logit: ρ_q·c·d_c/√d = R.
    static func positionalWeight(space: HeadSpace, recency: Double) -> Double {
        recency * Double(space.headDim).squareRoot()
            / (Synthesis.keyPositionalWeight * Double(space.contentDims))
    }

    /// Coefficient of the random part of a text query so that bulk logits have std `spread`
    /// together with the positional part: (α² + ρ_q²)·d_c/d = s².
    static func randomWeight(space: HeadSpace, spread: Double, positionalWeight: Double) -> Double {
        let ratio = Double(space.headDim) / Double(space.contentDims)
        return max(0, spread * spread * ratio - positionalWeight * positionalWeight).squareRoot()
    }
}

/// Picks the sink logit M of a post-vision or decode row so that the expected fraction of causal
/// entries within ln 100 of the row maximum equals the layer's density 1 − γ.
///
/// A row's logits: the sink at M; each targeted key at M − gap (plus noise of std `codedStd`); the
/// bulk ~ N(R·ρ^Δ, s²) with Δ the distance to the query. The bulk's expected count above the
/// threshold t = M − ln100 is Σ_Δ P(Z > (t − R·ρ^Δ)/s); a table over t of its prefix sums in Δ
/// makes each row's solve a short bisection.
struct SinkCalibrator {
    let density: Double
    let bulkStd: Double
    let codedStd: Double
    private let lowT: Double
    private let highT: Double
    private static let gridCount = 256
    /// Number of distances with a recency boost worth counting.
    private let recencyLength: Int
    /// `prefix[c * gridCount + i]`: Σ_{Δ<c} P(Z > (t_i − R·ρ^Δ)/s).
    private let prefix: [Double]

    init(density: Double, bulkStd: Double, codedStd: Double, recencyBoost: Double, recencyCorrelation: Double) {
        self.density = density
        self.bulkStd = bulkStd
        self.codedStd = codedStd
        lowT = -6 * bulkStd
        highT = recencyBoost + 6 * bulkStd
        prefix = Self.prefixTable(bulkStd: bulkStd, recencyBoost: recencyBoost, recencyCorrelation: recencyCorrelation)
        recencyLength = prefix.count / Self.gridCount - 1
    }

    private struct TableKey: Hashable {
        var bulkStd: Double
        var recencyBoost: Double
        var recencyCorrelation: Double
    }

    /// Recent tables: building one is ~80,000 tail evaluations, and the same prompt's layers are
    /// synthesised again for every copy of a shard and every policy a load test compares. A few
    /// dozen tables of at most ~2 MB each; cleared when full.
    private static let tables = Mutex<[TableKey: [Double]]>([:])
    private static let maxTables = 32

    private static func prefixTable(bulkStd: Double, recencyBoost: Double, recencyCorrelation: Double) -> [Double] {
        let key = TableKey(bulkStd: bulkStd, recencyBoost: recencyBoost, recencyCorrelation: recencyCorrelation)
        if let known = tables.withLock({ $0[key] }) { return known }
        var means: [Double] = []
        var mean = recencyBoost
        while mean > 0.003 * bulkStd && means.count < 1024 {
            means.append(mean)
            mean *= recencyCorrelation
        }
        let grid = gridCount
        let lowT = -6 * bulkStd
        let step = (recencyBoost + 6 * bulkStd - lowT) / Double(grid - 1)
        var table = [Double](repeating: 0, count: (means.count + 1) * grid)
        for i in 0..<grid {
            let t = lowT + Double(i) * step
            var running = 0.0
            for (c, mu) in means.enumerated() {
                table[c * grid + i] = running
                running += NormalTailTable.upperTail((t - mu) / bulkStd)
            }
            table[means.count * grid + i] = running
        }
        tables.withLock { tables in
            if tables.count >= maxTables { tables.removeAll(keepingCapacity: true) }
            tables[key] = table
        }
        return table
    }

    /// Probability that a key aimed at `gap` below the sink lands above the threshold.
    func denseProbability(gap: Double) -> Double {
        NormalTailTable.upperTail((gap - Synthesis.thresholdLogitGap) / max(codedStd, 1e-6))
    }

    /// The sink logit for a row with `causalCount` visible keys of which `targetCount` are aimed
    /// at (`expectedDenseTargets` of them expected above the threshold) and `inertCount` are coded
    /// keys the row does not aim at, whose scaled-down content keeps their logits near zero.
    func sinkLogit(causalCount n: Int, targetCount: Int, inertCount: Int, expectedDenseTargets: Double) -> Double {
        let bulk = n - 1 - targetCount - inertCount
        let wanted = density * Double(n) - 1 - expectedDenseTargets
        let t: Double
        if bulk + inertCount <= 0 || wanted <= 0 {
            t = highT
        } else if wanted >= Double(bulk + inertCount) {
            t = lowT
        } else {
            // 40 steps of bisection, for every row of every query head, so they are taken two at a
            // time: the second step's midpoint on either side is known before the first comparison,
            // so the three evaluations run side by side instead of one after another. The midpoints
            // and comparisons are the one-step bisection's, and so are the bits.
            t = NormalTailTable.values.withUnsafeBufferPointer { tail in
                prefix.withUnsafeBufferPointer { prefix in
                    let codedScale = max(codedStd, 1e-6)
                    @inline(__always) func above(_ t: Double) -> Double {
                        bulkAbove(t, count: max(bulk, 0), prefix: prefix, tail: tail)
                            + Double(inertCount) * NormalTailTable.upperTail(t / codedScale, in: tail)
                    }
                    var low = lowT
                    var high = highT
                    for _ in 0..<20 {
                        let middle = 0.5 * (low + high)
                        let lower = 0.5 * (low + middle)
                        let upper = 0.5 * (middle + high)
                        let (atMiddle, atLower, atUpper) = (above(middle), above(lower), above(upper))
                        if atMiddle > wanted {
                            low = middle
                            if atUpper > wanted { low = upper } else { high = upper }
                        } else {
                            high = middle
                            if atLower > wanted { low = lower } else { high = lower }
                        }
                    }
                    return 0.5 * (low + high)
                }
            }
        }
        return t + Synthesis.thresholdLogitGap
    }

    /// Expected number of `count` bulk keys (at distances 0, 1, …) above threshold `t`.
    @inline(__always)
    private func bulkAbove(
        _ t: Double,
        count: Int,
        prefix: UnsafeBufferPointer<Double>,
        tail: UnsafeBufferPointer<Double>
    ) -> Double {
        let boosted = min(count, recencyLength)
        let position = (t - lowT) / (highT - lowT) * Double(Self.gridCount - 1)
        let index = min(max(Int(position), 0), Self.gridCount - 2)
        let fraction = position - Double(index)
        let row = boosted * Self.gridCount + index
        let near = prefix[row] + fraction * (prefix[row + 1] - prefix[row])
        let far = Double(count - boosted) * NormalTailTable.upperTail(t / bulkStd, in: tail)
        return near + far
    }
}
