/// TGV-KV, text-grounded KV eviction for VLMs: "TGV-KV: Text-Grounded KV Eviction for
/// Vision-Language Models", ICML 2026 (arXiv 2606.03075); the authors' code, `kv_caches/tgv_kv.py`
/// (Danielement321/TGV-KV).
///
/// The text after the last visual token (the question) decides what of the images is worth keeping:
/// - **Text-Vision Budgeting**: a layer's budget is proportional to the attention its text rows pay
///   to visual positions (the code's `text_image_attn_sums`), so layers where the question reads the
///   image keep more.
/// - **Text-Weighted Ranking**: a visual position's score is the text rows' attention to it, each
///   row weighted by how much the text rows after it attend to that row (its mean received
///   attention): words the question leans on count more than filler.
/// - **Text-Prioritised Retention**: every text position ranks above every visual one (the code adds
///   100 to text scores), and `sinks` first positions and the last `recent` are always kept.
///
/// Choices where the paper or its code leaves room (tested in `PolicyTests`):
/// - Scores are per KV head (each GQA group's query heads averaged), as every other policy here; the
///   code averages all heads and keeps the same positions in every head.
/// - Text positions rank among themselves by the post-vision rows' attention; the code sums every
///   prompt row's attention, a full O(m²) profile that only matters when text alone exceeds a budget.
/// - Layer budgets are apportioned exactly (largest remainder, each layer within
///   `sinks + recent ... m`); the code scales unclipped and lets a layer past `m` keep everything.
/// - A prompt that ends in a visual token observes its last row, as VL-Cache does.
public struct TGVSettings: Sendable, Hashable, Codable {
    /// First positions always kept (the code's `start_size`).
    public var sinks = 4
    /// Last positions always kept (the code's `protect_size`).
    public var recent = 1
    public init() {}

    func validate(_ require: (Bool, String) throws(KVCacheError) -> Void) throws(KVCacheError) {
        try require(sinks >= 0, "sinks must be ≥ 0, got \(sinks)")
        try require(recent >= 1, "recent must be ≥ 1, got \(recent)")
    }

    /// The first text row of the question: after the last visual token, or the last row.
    public static func textStart(layout: PromptLayout) -> Int {
        min(layout.postVisionStart, layout.promptLength - 1)
    }
}

extension BudgetAllocator {
    /// TGV-KV's layer capacities: the sequence's rows apportioned by each layer's text-to-visual
    /// attention mass (uniform when no layer's text attends to a visual position).
    static func textVision(m: Int, retention: Double, statistics: [LayerStatistics], settings s: TGVSettings) -> [Int] {
        let masses = statistics.map { layer in layer.heads.reduce(0.0) { $0 + $1.visualMass } }
        let uniform = uniformCapacity(m: m, retention: retention)
        guard masses.reduce(0, +) > 0 else { return Array(repeating: uniform, count: statistics.count) }
        let floor = min(m, max(1, s.sinks + s.recent))
        return apportion(
            total: Int((retention * Double(m) * Double(statistics.count)).rounded()),
            weights: masses,
            lower: Array(repeating: floor, count: masses.count),
            upper: Array(repeating: m, count: masses.count)
        )
    }
}

extension CompressionPolicy {
    /// Per KV head, the score each prompt position ranks by when a compressed cache is cut further
    /// (`HeadCache.tightened`): the attention of the rows the policy observes, and for TGV-KV its own
    /// order (text above every image by the question's attention, images by text-weighted attention).
    /// `[kvHead * m + position]`; nil for a policy that observes no rows.
    public func positionScores(profile: AttentionProfile, layout: PromptLayout) -> [Float]? {
        guard case .tgv = self else { return profile.columnSums.keys.min().map { profile.kvHeadScores(start: $0) } }
        let m = profile.promptLength
        var scores = profile.kvHeadTextWeightedScores()
        let question = profile.kvHeadScores(start: TGVSettings.textStart(layout: layout))
        // A text score stays above every weighted one: those are at most the question's row count.
        for i in scores.indices where !layout.tags[i % m].isVisual { scores[i] = question[i] + Float(m) }
        return scores
    }
}

extension LayerCompressor {
    /// TGV-KV's kept positions of one head (ascending): the sinks and the last rows, then text by
    /// the question's attention, then visual positions by text-weighted attention.
    static func textGrounded(
        _ s: TGVSettings,
        capacity k: Int,
        m: Int,
        tags: [ModalityTag],
        textScores: ArraySlice<Float>,
        visualScores: ArraySlice<Float>
    ) -> [Int] {
        let sinks = min(s.sinks, k, m)
        let recent = min(s.recent, k - sinks, m - sinks)
        let middle = sinks..<(m - recent)
        let text = middle.filter { !tags[$0].isVisual }
        let visual = middle.filter { tags[$0].isVisual }
        let free = k - sinks - recent
        let keptText = Selection.top(free, of: Array(textScores), among: text)
        let keptVisual = Selection.top(free - keptText.count, of: Array(visualScores), among: visual)
        return Array(0..<sinks) + (keptText + keptVisual).sorted() + Array((m - recent)..<m)
    }
}
