/// The three methods on the three axes they act on, in one policy, each part switchable so that a
/// user can measure what each contributes (`tessera eval --ablate composite`):
/// - **how much per layer** (`layerBudgets`): VL-Cache's sparsity-aware layer budgets (denser layers
///   keep more), apportioned exactly, with a floor of half the average share instead of the paper's
///   1% (with which the sparsest layers starved and the budgets lost to uniform ones on the generated
///   traces: README, "The composite"); off, every layer keeps the same share;
/// - **how to split a layer over its heads and modalities** (`headSplit`): MadaKV's per-head demand
///   (how many rows cover θ = 0.9 of the head's attention mass), with the layer's rows apportioned
///   over its heads by demand and each head's rows split by its modality masses; off, every head
///   keeps the layer's even share, ranked across modalities together;
/// - **what happens to what is evicted** (`merge`): LOOK-M's merging of each evicted row into its
///   most similar kept row, by default of the values only (`values`: LOOK-M's pivotal formula with
///   the kept keys left as they are; moving them changes which rows every query scores high, and
///   merging keys raised output error on every preset here); `pivotal` is LOOK-M's own, `none`
///   drops what is evicted.
///
/// Every part observes the same rows (`observation`): by default VL-Cache's post-vision rows, at
/// most the last 32 (`postVision:32`), which is the question whether it follows the images directly
/// or a long document text (where all post-vision rows dilute the question's attention as H2O's
/// column sums do). Their attention ranks the rows and gives the heads' modality statistics, and 10%
/// of each head's rows is kept as a recent window (VL-Cache's recent share). The window scales with
/// the budget, so at 5% the method still chooses most of what it keeps (MadaKV's fixed 32-row proxy
/// window does not). With `headSplit` and `merge` off this is VL-Cache with the settings of
/// `layerBudgetSettings`; the other settings are the two papers' defaults (`VLCacheSettings()`,
/// `MadaKVSettings()`'s θ and floor ratio).
public struct CompositeSettings: Sendable, Hashable, Codable {
    public var layerBudgets = true
    public var headSplit = true
    public var merge = LookMSettings.Merge.values
    /// The rows whose attention ranks the prompt and gives the heads' statistics.
    public var observation = VLCacheSettings.Observation.postVisionAtMost(32)
    public init() {}

    /// The VL-Cache part: this observation, with VL-Cache's sparsity threshold and the rest of its
    /// defaults (the layer budgets adjust them: `layerBudgetSettings`).
    var vlCache: VLCacheSettings {
        var settings = VLCacheSettings()
        settings.observation = observation
        return settings
    }
    /// The MadaKV part: its coverage θ and its floor ratio.
    static let madaKV = MadaKVSettings()
    /// Each head's recent window, VL-Cache's share of its capacity.
    static let recentShare = VLCacheSettings().recentShare

    /// VL-Cache's layer budgets with a floor of half the average share, apportioned exactly.
    func layerBudgetSettings(_ retention: Double) -> VLCacheSettings {
        var settings = vlCache
        settings.apportionment = .largestRemainder
        settings.minFraction = retention / 2
        return settings
    }

    /// A short label of the parts switched on, e.g. `layers+heads+merge`, or `none`, and of an
    /// observation other than the default (`heads+merge, last 32 rows`).
    public var parts: String {
        let on = [layerBudgets ? "layers" : nil, headSplit ? "heads" : nil, merge != .none ? "merge" : nil]
        let label = on.compactMap(\.self).joined(separator: "+").nilIfEmpty ?? "none"
        guard observation != CompositeSettings().observation else { return label }
        switch observation {
        case .postVision: return label + ", post-vision rows"
        case .postVisionAtMost(let n): return label + ", post-vision rows up to \(n)"
        case .lastRows(let n): return label + ", last \(n) rows"
        }
    }
}

extension String {
    fileprivate var nilIfEmpty: String? { isEmpty ? nil : self }
}

extension BudgetAllocator {
    /// The composite's budgets: each layer's rows (VL-Cache's per-head capacity × heads, or the
    /// uniform share), then split over its heads by MadaKV's demands, each head's chosen rows by
    /// modality.
    static func composite(
        m: Int,
        kvHeads: Int,
        retention: Double,
        statistics: [LayerStatistics],
        settings s: CompositeSettings
    ) -> [LayerBudget] {
        let perHead =
            s.layerBudgets
            ? sparsityAware(
                m: m,
                retention: retention,
                statistics: statistics,
                settings: s.layerBudgetSettings(retention)
            )
            : Array(repeating: uniformCapacity(m: m, retention: retention), count: statistics.count)
        let floor = min(m, max(1, Int((CompositeSettings.madaKV.minRatio * Double(m)).rounded(.up))))
        return zip(statistics, perHead).map { stats, capacity in
            guard s.headSplit else {
                return LayerBudget(
                    layer: stats.layer,
                    heads: Array(repeating: HeadBudget(capacity: capacity), count: kvHeads)
                )
            }
            let capacities = apportion(
                total: capacity * kvHeads,
                weights: stats.heads.map { Double(min(m, max(floor, $0.visualDemand + $0.textDemand))) },
                lower: Array(repeating: min(floor, capacity), count: kvHeads),
                upper: Array(repeating: m, count: kvHeads)
            )
            let heads = zip(capacities, stats.heads).map { k, h in
                let free = k - LayerCompressor.recentRows(capacity: k, share: CompositeSettings.recentShare)
                return HeadBudget(capacity: k, split: modalitySplit(free, h.visualMass, h.textMass, h))
            }
            return LayerBudget(layer: stats.layer, heads: heads)
        }
    }
}

extension LayerCompressor {
    /// The composite's kept positions of one head (ascending): the recent rows, then the rest by the
    /// question's attention, per modality when the head's budget is split. A modality with fewer
    /// candidates than its share leaves the rest to the best of the other, so the head keeps its
    /// whole capacity (the recent rows, usually text, are not candidates).
    static func composite(
        capacity k: Int,
        split: ModalitySplit?,
        m: Int,
        tags: [ModalityTag],
        scores: ArraySlice<Float>
    ) -> [Int] {
        let recent = recentRows(capacity: k, share: CompositeSettings.recentShare)
        let candidates = Array(0..<(m - recent))
        let ranked = Array(scores)
        var chosen: [Int]
        if let split {
            chosen =
                Selection.top(split.visual, of: ranked, among: candidates.filter { tags[$0].isVisual })
                + Selection.top(split.text, of: ranked, among: candidates.filter { !tags[$0].isVisual })
            var isChosen = [Bool](repeating: false, count: m)
            for j in chosen { isChosen[j] = true }
            chosen += Selection.top(k - recent - chosen.count, of: ranked, among: candidates.filter { !isChosen[$0] })
        } else {
            chosen = Selection.top(k - recent, of: ranked, among: candidates)
        }
        return chosen.sorted() + Array((m - recent)..<m)
    }
}
