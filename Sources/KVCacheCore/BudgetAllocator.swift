/// Splits a sequence's budget (a retention ratio α of its prompt rows) over layers and heads. It
/// sees only `LayerStatistics`, never tensors, so a coordinator can run it for layers held by other
/// processes.
public enum BudgetAllocator {
    public static func allocate(
        policy: CompressionPolicy,
        retention: Double,
        geometry: ModelGeometry,
        statistics: [LayerStatistics]
    ) throws(KVCacheError) -> [LayerBudget] {
        guard retention > 0, retention <= 1, retention.isFinite else {
            throw KVCacheError(.invalidBudget, "budget must be in (0, 1], got \(retention)")
        }
        guard statistics.count == geometry.layers,
            statistics.enumerated().allSatisfy({ $0.offset == $0.element.layer })
        else {
            throw KVCacheError(
                .invalidShape,
                "need statistics for layers 0..<\(geometry.layers) in order, got \(statistics.map(\.layer))"
            )
        }
        let m = statistics[0].promptLength
        guard m >= 1, statistics.allSatisfy({ $0.promptLength == m }) else {
            throw KVCacheError(.invalidShape, "every layer's statistics must report the same prompt length")
        }
        let kvHeads = geometry.kvHeads
        let uniform = uniformCapacity(m: m, retention: retention)
        func layers(_ capacities: [Int]) -> [LayerBudget] {
            capacities.enumerated().map { l, c in
                LayerBudget(layer: l, heads: Array(repeating: HeadBudget(capacity: c), count: kvHeads))
            }
        }
        switch policy {
        case .full:
            return layers(Array(repeating: m, count: geometry.layers))
        case .streamingLLM, .h2o, .snapKV, .adaKV, .lookM:
            return layers(Array(repeating: uniform, count: geometry.layers))
        case .pyramidKV(let s):
            return layers(pyramid(m: m, layers: geometry.layers, retention: retention, settings: s))
        case .vlCache(let s):
            return layers(sparsityAware(m: m, retention: retention, statistics: statistics, settings: s))
        case .madaKV(let s):
            guard statistics.allSatisfy({ $0.heads.count == kvHeads }) else {
                throw KVCacheError(.invalidShape, "MadaKV needs modality statistics for all \(kvHeads) KV heads")
            }
            return madaKV(m: m, kvHeads: kvHeads, retention: retention, statistics: statistics, settings: s)
        case .tgv(let s):
            guard statistics.allSatisfy({ $0.heads.count == kvHeads }) else {
                throw KVCacheError(.invalidShape, "TGV-KV needs modality statistics for all \(kvHeads) KV heads")
            }
            return layers(textVision(m: m, retention: retention, statistics: statistics, settings: s))
        case .composite(let s):
            guard !s.headSplit || statistics.allSatisfy({ $0.heads.count == kvHeads }) else {
                throw KVCacheError(.invalidShape, "the composite needs modality statistics for all \(kvHeads) KV heads")
            }
            return composite(m: m, kvHeads: kvHeads, retention: retention, statistics: statistics, settings: s)
        }
    }

    /// Rows per head when every layer and head keeps the same share: `α·m`, at least 1.
    static func uniformCapacity(m: Int, retention: Double) -> Int {
        min(m, max(1, Int((retention * Double(m)).rounded())))
    }

    /// PyramidKV's linear schedule: per-layer capacities (window included) averaging `α·m`.
    static func pyramid(m: Int, layers: Int, retention: Double, settings s: PyramidKVSettings) -> [Int] {
        let w = min(s.snap.window, m)
        let capacity = retention * Double(m)
        let free = capacity - Double(w)
        // Budgets no larger than the window leave nothing to schedule: SnapKV's uniform budget.
        guard free > 0, layers > 1 else {
            return Array(repeating: min(m, max(1, Int(capacity.rounded()))), count: layers)
        }
        var low = free / s.beta
        var high = 2 * free - low
        if high >= Double(m - w) {
            high = Double(m - w)
            low = 2 * free - high
        }
        let step = (high - low) / Double(layers - 1)
        return (0..<layers).map { l in
            w + min(m - w, max(0, Int((high - Double(l) * step).rounded())))
        }
    }

    /// VL-Cache: denser layers get more, `β[l] = clip(d[l]/Σd · α·L, lo, hi)`.
    static func sparsityAware(
        m: Int,
        retention: Double,
        statistics: [LayerStatistics],
        settings s: VLCacheSettings
    ) -> [Int] {
        let densities = statistics.map { max($0.density, 1e-9) }
        let total = densities.reduce(0, +)
        let layers = Double(statistics.count)
        switch s.apportionment {
        case .clipped:
            return densities.map { d in
                let fraction = min(s.maxFraction, max(s.minFraction, d / total * retention * layers))
                return min(m, max(1, Int((fraction * Double(m)).rounded())))
            }
        case .largestRemainder:
            let lower = Int((s.minFraction * Double(m)).rounded(.up))
            let upper = Int((s.maxFraction * Double(m)).rounded(.down))
            return apportion(
                total: Int((retention * Double(m) * layers).rounded()),
                weights: densities,
                lower: Array(repeating: max(1, min(lower, upper)), count: densities.count),
                upper: Array(repeating: max(1, upper), count: densities.count)
            )
        }
    }

    /// MadaKV: per-head modality demand, with each layer's over- or under-spend compensated by the
    /// layers after it (HCC), and the budget split by modality per head (MPA).
    static func madaKV(
        m: Int,
        kvHeads: Int,
        retention: Double,
        statistics: [LayerStatistics],
        settings s: MadaKVSettings
    ) -> [LayerBudget] {
        let layers = statistics.count
        let w = min(s.proxyWindow, m)
        let floor = min(m, max(w, Int((s.minRatio * Double(m)).rounded(.up))))
        let perHead = min(m, max(floor, Int((retention * Double(m)).rounded())))
        var remaining = Int((retention * Double(m) * Double(layers * kvHeads)).rounded())
        let wants: [[Int]] = statistics.map { stats in
            stats.heads.map { h in
                switch s.components {
                case .both: w + min(h.visualDemand, h.visualCount) + min(h.textDemand, h.textCount)
                case .hccOnly: w + h.jointDemand
                case .mpaOnly: perHead
                }
            }.map { min(m, max(floor, $0)) }
        }
        // Proportional compensation in one step: water-filling every head's demand to the whole
        // budget is what the layer-by-layer update converges to when each layer's over- or underspend
        // is spread over the layers after it, and clipping at a floor or at m is handled exactly.
        let proportional =
            s.compensation == .proportional && s.components != .mpaOnly
            ? apportion(
                total: remaining,
                weights: wants.joined().map(Double.init),
                lower: Array(repeating: floor, count: layers * kvHeads),
                upper: Array(repeating: m, count: layers * kvHeads)
            )
            : []
        var result: [LayerBudget] = []
        for (l, stats) in statistics.enumerated() {
            let want = wants[l]
            let kept: [Int]
            if s.components == .mpaOnly {
                kept = want
            } else if s.compensation == .proportional {
                kept = Array(proportional[(l * kvHeads)..<((l + 1) * kvHeads)])
            } else if l == layers - 1 {
                // The last layer takes whatever remains.
                kept = apportion(
                    total: max(remaining, kvHeads * floor),
                    weights: want.map(Double.init),
                    lower: Array(repeating: floor, count: kvHeads),
                    upper: Array(repeating: m, count: kvHeads)
                )
            } else {
                // Keep the demand, but leave every later layer at least its floor.
                let cap = max(kvHeads * floor, remaining - (layers - l - 1) * kvHeads * floor)
                kept = apportion(
                    total: min(cap, want.reduce(0, +)),
                    weights: want.map(Double.init),
                    lower: Array(repeating: floor, count: kvHeads),
                    upper: want
                )
            }
            remaining -= kept.reduce(0, +)
            let heads = zip(kept, stats.heads).map { capacity, h in
                let free = capacity - w
                let split: ModalitySplit
                switch s.components {
                // MPA: the head's rows follow its modality preference, the share of proxy attention mass.
                case .both, .mpaOnly: split = modalitySplit(free, h.visualMass, h.textMass, h)
                case .hccOnly: split = ModalitySplit(visual: -1, text: -1)
                }
                return HeadBudget(capacity: capacity, split: s.components == .hccOnly ? nil : split)
            }
            result.append(LayerBudget(layer: l, heads: heads))
        }
        return result
    }

    /// Splits `count` rows in proportion to the two weights, rounding remainder to the larger share,
    /// and moves any excess over a modality's token count to the other modality.
    static func modalitySplit(
        _ count: Int,
        _ visualWeight: Double,
        _ textWeight: Double,
        _ h: HeadModalityStatistics
    ) -> ModalitySplit {
        let sum = visualWeight + textWeight
        let exact =
            sum > 0
            ? Double(count) * visualWeight / sum
            : Double(count) * Double(h.visualCount) / Double(max(1, h.visualCount + h.textCount))
        var visual = Int(exact.rounded(.down))
        var text = Int((Double(count) - exact).rounded(.down))
        if visual + text < count {
            if visualWeight >= textWeight { visual += 1 } else { text += 1 }
        }
        if visual > h.visualCount {
            text += visual - h.visualCount
            visual = h.visualCount
        }
        if text > h.textCount {
            visual = min(h.visualCount, visual + text - h.textCount)
            text = h.textCount
        }
        return ModalitySplit(visual: visual, text: text)
    }

    /// Integers within `[lower, upper]`, as close to proportional to `weights` as possible, summing to
    /// `total` when the bounds allow: water-filling for the proportion, largest remainder for the
    /// rounding (ties to the lower index).
    public static func apportion(total: Int, weights: [Double], lower: [Int], upper: [Int]) -> [Int] {
        let n = weights.count
        let minTotal = lower.reduce(0, +)
        let maxTotal = upper.reduce(0, +)
        if total <= minTotal { return lower }
        if total >= maxTotal { return upper }
        func shares(_ lambda: Double) -> [Double] {
            (0..<n).map { min(Double(upper[$0]), max(Double(lower[$0]), lambda * weights[$0])) }
        }
        var lo = 0.0
        var hi = 1.0
        while shares(hi).reduce(0, +) < Double(total), hi < 1e18 { hi *= 2 }
        for _ in 0..<100 {
            let mid = (lo + hi) / 2
            if shares(mid).reduce(0, +) < Double(total) { lo = mid } else { hi = mid }
        }
        let exact = shares(hi)
        var result = exact.map { Int($0.rounded(.down)) }
        var left = total - result.reduce(0, +)
        let order = (0..<n).sorted { a, b in
            let fa = exact[a] - Double(result[a])
            let fb = exact[b] - Double(result[b])
            return fa != fb ? fa > fb : a < b
        }
        var index = 0
        while left > 0, index < 2 * n {
            let i = order[index % n]
            if result[i] < upper[i] {
                result[i] += 1
                left -= 1
            }
            index += 1
        }
        return result
    }
}
