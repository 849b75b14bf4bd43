/// The small, serialisable summary of one layer that a budget allocator needs. A worker computes it
/// from the layer's prefill; the coordinator gathers every layer's and allocates, so layers that
/// compete for one budget may live in different processes.
public struct LayerStatistics: Sendable, Hashable, Codable {
    public var layer: Int
    public var promptLength: Int
    /// VL-Cache's `1 − γ[l]` over the observed rows (1 when the policy does not measure it).
    public var density: Double
    /// Per KV head modality masses and demands (MadaKV; TGV-KV uses the masses); empty for other
    /// policies.
    public var heads: [HeadModalityStatistics]

    public init(layer: Int, promptLength: Int, density: Double, heads: [HeadModalityStatistics]) {
        self.layer = layer
        self.promptLength = promptLength
        self.density = density
        self.heads = heads
    }

    /// The statistics `policy` needs for `layer`, read off its attention profile.
    public init(layer: Int, profile: AttentionProfile, layout: PromptLayout, policy: CompressionPolicy) {
        self.layer = layer
        promptLength = profile.promptLength
        density = 1
        heads = []
        switch policy {
        case .vlCache:
            density = profile.density
        case .madaKV(let s):
            let m = profile.promptLength
            let window = min(s.proxyWindow, m)
            let scores = profile.kvHeadScores(start: m - window)
            let kvHeads = profile.queryHeads / profile.groupSize
            heads = (0..<kvHeads).map { h in
                HeadModalityStatistics(
                    scores: scores[(h * m)..<(h * m + m - window)],
                    tags: layout.tags,
                    theta: s.theta
                )
            }
        case .tgv:
            // The question's attention mass on each modality, per KV head (TGV-KV's layer weight is
            // the visual mass).
            heads = Self.modalities(profile, start: TGVSettings.textStart(layout: layout), layout: layout, theta: 1)
        case .composite(let s):
            density = profile.density
            let start = s.vlCache.observationStart(layout: layout)
            heads = Self.modalities(profile, start: start, layout: layout, theta: CompositeSettings.madaKV.theta)
        default:
            break
        }
    }
}

extension LayerStatistics {
    /// Every KV head's modality masses and demands under the attention of rows `start..<m`, over
    /// every prompt position.
    static func modalities(
        _ profile: AttentionProfile,
        start: Int,
        layout: PromptLayout,
        theta: Double
    ) -> [HeadModalityStatistics] {
        let m = profile.promptLength
        let scores = profile.kvHeadScores(start: start)
        return (0..<(profile.queryHeads / profile.groupSize)).map { h in
            HeadModalityStatistics(scores: scores[(h * m)..<(h * m + m)], tags: layout.tags, theta: theta)
        }
    }
}

/// MadaKV's view of one KV head: how much proxy attention each modality receives (ψ mass) and how
/// many tokens of each it takes, in descending ψ, to cover `θ` of that mass.
public struct HeadModalityStatistics: Sendable, Hashable, Codable {
    public var visualMass: Double
    public var textMass: Double
    public var visualDemand: Int
    public var textDemand: Int
    /// Demand over both modalities ranked together (the "HCC only" ablation).
    public var jointDemand: Int
    public var visualCount: Int
    public var textCount: Int

    public init(
        visualMass: Double,
        textMass: Double,
        visualDemand: Int,
        textDemand: Int,
        jointDemand: Int,
        visualCount: Int,
        textCount: Int
    ) {
        self.visualMass = visualMass
        self.textMass = textMass
        self.visualDemand = visualDemand
        self.textDemand = textDemand
        self.jointDemand = jointDemand
        self.visualCount = visualCount
        self.textCount = textCount
    }

    /// Statistics over compressible positions `scores.indices` (the window excluded).
    init(scores: ArraySlice<Float>, tags: [ModalityTag], theta: Double) {
        let base = scores.startIndex
        var visual: [Float] = []
        var text: [Float] = []
        for j in scores.indices {
            if tags[j - base].isVisual { visual.append(scores[j]) } else { text.append(scores[j]) }
        }
        func demand(_ values: [Float]) -> (mass: Double, count: Int) {
            let mass = values.reduce(0.0) { $0 + Double($1) }
            guard mass > 0 else { return (0, 0) }
            var covered = 0.0
            var count = 0
            for v in values.sorted(by: >) {
                if covered >= theta * mass { break }
                covered += Double(v)
                count += 1
            }
            return (mass, count)
        }
        let v = demand(visual)
        let t = demand(text)
        self.init(
            visualMass: v.mass,
            textMass: t.mass,
            visualDemand: v.count,
            textDemand: t.count,
            jointDemand: demand(visual + text).count,
            visualCount: visual.count,
            textCount: text.count
        )
    }
}
