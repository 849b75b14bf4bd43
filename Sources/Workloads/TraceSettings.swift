/// The structure knobs of the synthetic traces. Defaults follow the papers' observations
/// (ALGORITHMS.md §1–§3); every value the papers do not pin down is an [inferred] choice exposed here.
///
/// Decoding from JSON accepts any subset of the keys; missing ones keep their defaults.
public struct TraceSettings: Sendable, Hashable, Codable {
    // MARK: Prompt shape

    /// Multiplies every text-span length (at least one token per span); images keep the model's size.
    public var textScale: Double = 1
    /// Decode steps per sequence.
    public var decodeSteps: Int = 32
    /// Images of a multi-image prompt.
    public var imagesPerRequest: ClosedRange<Int> = 4...8
    /// Pooled frames of a video prompt.
    public var framesPerVideo: ClosedRange<Int> = 16...32
    /// Tokens of a document prompt's long text, before `textScale`.
    public var documentTextTokens: ClosedRange<Int> = 1024...2048

    // MARK: Layer sparsity (VL-Cache: first two layers dense, the rest 70–99%, not monotonic)

    /// Leading layers drawn from `denseSparsity`.
    public var denseLayerCount: Int = 2
    public var denseSparsity: ClosedRange<Double> = 0.30...0.50
    public var sparseSparsity: ClosedRange<Double> = 0.70...0.99
    /// Upper bound on the spread of the non-salient logits; sparser layers use up to this much.
    public var maxBulkLogitStd: Double = 2.0

    // MARK: Salient keys of post-vision and decode queries

    /// Salient keys per query head as a fraction of the prompt (bounded by the head dimension).
    public var salientFraction: Double = 0.03
    /// The share of a row's above-threshold entries that are salient keys (the rest is the bulk).
    public var salientShareOfDense: Double = 0.3
    /// Salient logits sit this far below the sink logit.
    public var salientGap: ClosedRange<Double> = 1.0...3.5
    /// Probability that a decode target comes from the prefill salient set rather than elsewhere.
    public var decodeAgreement: Double = 0.75
    /// Fraction of a query head's salient set shared by all heads of its KV group.
    public var gqaSharing: Double = 0.75
    /// Head modality preference π ~ Beta(α, α); α < 1 makes heads prefer one modality.
    public var headPreferenceConcentration: Double = 0.5

    // MARK: Recency and redundancy

    /// AR(1) coefficient of the positional component of keys and queries.
    public var recencyCorrelation: Double = 0.98
    /// Extra logit a text query gives its own position, decaying with distance.
    public var recencyLogitBoost: Double = 1.5
    /// Expected cosine similarity of horizontally adjacent image keys.
    public var imageNeighbourSimilarity: Double = 0.65
    /// Correlation of a video frame's field with the previous frame's.
    public var frameCorrelation: Double = 0.6

    // MARK: Needle

    /// Fraction of query heads in the upper half of the layers that retrieve the needle.
    public var retrievalHeadFraction: Double = 0.25
    /// Retrieval heads probe the needle at every this-many-th decode step.
    public var needleProbeInterval: Int = 4
    /// Probability of a text needle in presets whose needle is otherwise an image patch block.
    public var textNeedleProbability: Double = 0.3
    /// Size of the needle's answer codebook.
    public var needleAnswerCount: Int = 16
    /// Needle logits sit this far below the sink logit (the upper end of `salientGap`, not beyond).
    public var needleGap: ClosedRange<Double> = 1.0...2.0
    /// Needle values carry the answer code at this multiple of a typical value norm.
    public var needleValueGain: Double = 4

    public init() {}

    public static var defaults: TraceSettings { TraceSettings() }

    /// Checks every knob against its allowed range.
    public func validate() throws(WorkloadError) {
        func require(_ ok: Bool, _ message: @autoclosure () -> String) throws(WorkloadError) {
            if !ok { throw WorkloadError(.invalidSetting, message()) }
        }
        func unit(_ range: ClosedRange<Double>) -> Bool { range.lowerBound >= 0 && range.upperBound < 1 }
        func within(_ range: ClosedRange<Int>, _ allowed: ClosedRange<Int>) -> Bool {
            allowed.contains(range.lowerBound) && allowed.contains(range.upperBound)
        }
        try require(textScale > 0 && textScale <= 16, "textScale must be in (0, 16], got \(textScale)")
        try require((0...4096).contains(decodeSteps), "decodeSteps must be in 0...4096, got \(decodeSteps)")
        try require(
            within(imagesPerRequest, 1...64),
            "imagesPerRequest must lie within 1...64, got \(imagesPerRequest)"
        )
        try require(within(framesPerVideo, 1...256), "framesPerVideo must lie within 1...256, got \(framesPerVideo)")
        try require(
            within(documentTextTokens, 1...32768),
            "documentTextTokens must lie within 1...32768, got \(documentTextTokens)"
        )
        try require(denseLayerCount >= 0, "denseLayerCount must be non-negative, got \(denseLayerCount)")
        try require(unit(denseSparsity), "denseSparsity must lie in [0, 1), got \(denseSparsity)")
        try require(unit(sparseSparsity), "sparseSparsity must lie in [0, 1), got \(sparseSparsity)")
        try require(
            (0.5...4).contains(maxBulkLogitStd),
            "maxBulkLogitStd must be in 0.5...4, got \(maxBulkLogitStd)"
        )
        try require(
            salientFraction > 0 && salientFraction <= 0.5,
            "salientFraction must be in (0, 0.5], got \(salientFraction)"
        )
        try require(
            salientShareOfDense > 0 && salientShareOfDense <= 1,
            "salientShareOfDense must be in (0, 1], got \(salientShareOfDense)"
        )
        try require(
            salientGap.lowerBound >= 0 && salientGap.upperBound < 4.6,
            "salientGap must lie in [0, 4.6) (below the 1% threshold), got \(salientGap)"
        )
        try require((0...1).contains(decodeAgreement), "decodeAgreement must be in 0...1, got \(decodeAgreement)")
        try require((0...1).contains(gqaSharing), "gqaSharing must be in 0...1, got \(gqaSharing)")
        try require(
            headPreferenceConcentration > 0 && headPreferenceConcentration <= 2,
            "headPreferenceConcentration must be in (0, 2], got \(headPreferenceConcentration)"
        )
        try require(
            (0...0.999).contains(recencyCorrelation),
            "recencyCorrelation must be in 0...0.999, got \(recencyCorrelation)"
        )
        try require(
            (0...3).contains(recencyLogitBoost),
            "recencyLogitBoost must be in 0...3, got \(recencyLogitBoost)"
        )
        try require(
            (0.3...0.95).contains(imageNeighbourSimilarity),
            "imageNeighbourSimilarity must be in 0.3...0.95, got \(imageNeighbourSimilarity)"
        )
        try require(
            (0...0.99).contains(frameCorrelation),
            "frameCorrelation must be in 0...0.99, got \(frameCorrelation)"
        )
        try require(
            (0...1).contains(retrievalHeadFraction),
            "retrievalHeadFraction must be in 0...1, got \(retrievalHeadFraction)"
        )
        try require(needleProbeInterval >= 1, "needleProbeInterval must be at least 1, got \(needleProbeInterval)")
        try require(
            (0...1).contains(textNeedleProbability),
            "textNeedleProbability must be in 0...1, got \(textNeedleProbability)"
        )
        try require(
            (2...256).contains(needleAnswerCount),
            "needleAnswerCount must be in 2...256, got \(needleAnswerCount)"
        )
        try require(
            needleGap.lowerBound >= 0 && needleGap.upperBound < 4.6,
            "needleGap must lie in [0, 4.6), got \(needleGap)"
        )
        try require((0.5...16).contains(needleValueGain), "needleValueGain must be in 0.5...16, got \(needleValueGain)")
    }

    private enum CodingKeys: String, CodingKey {
        case textScale, decodeSteps, imagesPerRequest, framesPerVideo, documentTextTokens
        case denseLayerCount, denseSparsity, sparseSparsity, maxBulkLogitStd
        case salientFraction, salientShareOfDense, salientGap, decodeAgreement, gqaSharing
        case headPreferenceConcentration, recencyCorrelation, recencyLogitBoost, imageNeighbourSimilarity
        case frameCorrelation, retrievalHeadFraction, needleProbeInterval, textNeedleProbability
        case needleAnswerCount, needleGap, needleValueGain
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        var s = TraceSettings()
        func read<T: Decodable>(_ key: CodingKeys, into value: inout T) throws {
            if let decoded = try c.decodeIfPresent(T.self, forKey: key) { value = decoded }
        }
        try read(.textScale, into: &s.textScale)
        try read(.decodeSteps, into: &s.decodeSteps)
        try read(.imagesPerRequest, into: &s.imagesPerRequest)
        try read(.framesPerVideo, into: &s.framesPerVideo)
        try read(.documentTextTokens, into: &s.documentTextTokens)
        try read(.denseLayerCount, into: &s.denseLayerCount)
        try read(.denseSparsity, into: &s.denseSparsity)
        try read(.sparseSparsity, into: &s.sparseSparsity)
        try read(.maxBulkLogitStd, into: &s.maxBulkLogitStd)
        try read(.salientFraction, into: &s.salientFraction)
        try read(.salientShareOfDense, into: &s.salientShareOfDense)
        try read(.salientGap, into: &s.salientGap)
        try read(.decodeAgreement, into: &s.decodeAgreement)
        try read(.gqaSharing, into: &s.gqaSharing)
        try read(.headPreferenceConcentration, into: &s.headPreferenceConcentration)
        try read(.recencyCorrelation, into: &s.recencyCorrelation)
        try read(.recencyLogitBoost, into: &s.recencyLogitBoost)
        try read(.imageNeighbourSimilarity, into: &s.imageNeighbourSimilarity)
        try read(.frameCorrelation, into: &s.frameCorrelation)
        try read(.retrievalHeadFraction, into: &s.retrievalHeadFraction)
        try read(.needleProbeInterval, into: &s.needleProbeInterval)
        try read(.textNeedleProbability, into: &s.textNeedleProbability)
        try read(.needleAnswerCount, into: &s.needleAnswerCount)
        try read(.needleGap, into: &s.needleGap)
        try read(.needleValueGain, into: &s.needleValueGain)
        self = s
    }
}
