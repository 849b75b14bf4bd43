/// A compression method with its settings. Every method of the specification is here with its
/// documented defaults; every choice the papers leave open is a setting.
public enum CompressionPolicy: Sendable, Hashable, Codable {
    /// The reference: keep everything.
    case full
    case streamingLLM(StreamingLLMSettings)
    case h2o(H2OSettings)
    case snapKV(SnapKVSettings)
    case adaKV(AdaKVSettings)
    case pyramidKV(PyramidKVSettings)
    case vlCache(VLCacheSettings)
    case madaKV(MadaKVSettings)
    case lookM(LookMSettings)
    case tgv(TGVSettings)
    case composite(CompositeSettings)

    /// The CLI names, in the order tables list them.
    public static let allNames = [
        "full", "streaming-llm", "h2o", "snapkv", "adakv", "pyramidkv", "vl-cache", "madakv", "look-m", "tgv",
        "composite",
    ]

    /// The policy of that CLI name with its default settings.
    public static func named(_ name: String) throws(KVCacheError) -> CompressionPolicy {
        switch name {
        case "full": return .full
        case "streaming-llm": return .streamingLLM(.init())
        case "h2o": return .h2o(.init())
        case "snapkv": return .snapKV(.init())
        case "adakv": return .adaKV(.init())
        case "pyramidkv": return .pyramidKV(.init())
        case "vl-cache": return .vlCache(.init())
        case "madakv": return .madaKV(.init())
        case "look-m": return .lookM(.init())
        case "tgv": return .tgv(.init())
        case "composite": return .composite(.init())
        default:
            throw KVCacheError(
                .unknownName,
                "unknown policy '\(name)'; allowed: \(allNames.joined(separator: ", "))"
            )
        }
    }

    public var name: String {
        switch self {
        case .full: "full"
        case .streamingLLM: "streaming-llm"
        case .h2o: "h2o"
        case .snapKV: "snapkv"
        case .adaKV: "adakv"
        case .pyramidKV: "pyramidkv"
        case .vlCache: "vl-cache"
        case .madaKV: "madakv"
        case .lookM: "look-m"
        case .tgv: "tgv"
        case .composite: "composite"
        }
    }

    /// The name, with the composite's parts when some are off (`composite[layers+merge]`), so that
    /// tables tell the variants apart.
    public var label: String {
        if case .composite(let s) = self, s != CompositeSettings() { return "composite[\(s.parts)]" }
        return name
    }

    /// Which prefill attention rows the policy observes, for a prompt of this layout.
    public func requirements(layout: PromptLayout) -> ProfileRequirements {
        let m = layout.promptLength
        switch self {
        case .full, .streamingLLM:
            return ProfileRequirements()
        case .h2o, .lookM:
            return ProfileRequirements(suffixStarts: [0])
        case .snapKV(let s):
            return ProfileRequirements(suffixStarts: [max(0, m - s.window)])
        case .adaKV(let s):
            return ProfileRequirements(suffixStarts: [max(0, m - s.snap.window)])
        case .pyramidKV(let s):
            return ProfileRequirements(suffixStarts: [max(0, m - s.snap.window)])
        case .madaKV(let s):
            return ProfileRequirements(suffixStarts: [max(0, m - s.proxyWindow)])
        case .composite(let s):
            return CompressionPolicy.vlCache(s.vlCache).requirements(layout: layout)
        case .vlCache(let s):
            let start = s.observationStart(layout: layout)
            return ProfileRequirements(suffixStarts: [start], sparsityStart: start, sparsityThreshold: s.threshold)
        case .tgv:
            let start = TGVSettings.textStart(layout: layout)
            return ProfileRequirements(suffixStarts: [start], textWeightedStart: start)
        }
    }

    /// How the policy merges evicted rows into kept ones, if it does (LOOK-M, the composite).
    public var merging: (mode: LookMSettings.Merge, filterBelowMean: Bool)? {
        switch self {
        case .lookM(let s) where s.merge != .none: (s.merge, s.filterBelowMeanSimilarity)
        case .composite(let s) where s.merge != .none: (s.merge, LookMSettings().filterBelowMeanSimilarity)
        default: nil
        }
    }

    /// Checks settings against their allowed ranges.
    public func validate() throws(KVCacheError) {
        func require(_ ok: Bool, _ message: String) throws(KVCacheError) {
            if !ok { throw KVCacheError(.invalidSetting, "\(name): \(message)") }
        }
        switch self {
        case .full: break
        case .streamingLLM(let s): try require(s.sinks >= 0, "sinks must be ≥ 0, got \(s.sinks)")
        case .h2o(let s):
            try require((0...1).contains(s.recentShare), "recentShare must be in [0, 1], got \(s.recentShare)")
        case .snapKV(let s): try s.validate(require)
        case .adaKV(let s): try s.validate(require)
        case .pyramidKV(let s):
            try s.snap.validate(require)
            try require(s.beta >= 1, "beta must be ≥ 1, got \(s.beta)")
        case .vlCache(let s):
            try require(s.threshold > 0 && s.threshold < 1, "threshold must be in (0, 1), got \(s.threshold)")
            try require(
                s.minFraction > 0 && s.minFraction <= s.maxFraction && s.maxFraction <= 1,
                "clip bounds must satisfy 0 < min ≤ max ≤ 1, got [\(s.minFraction), \(s.maxFraction)]"
            )
            try require((0...1).contains(s.recentShare), "recentShare must be in [0, 1], got \(s.recentShare)")
            try s.observation.validate(require)
        case .madaKV(let s):
            try require(s.proxyWindow >= 1, "proxyWindow must be ≥ 1, got \(s.proxyWindow)")
            try require(s.theta > 0 && s.theta <= 1, "theta must be in (0, 1], got \(s.theta)")
            try require((0...1).contains(s.minRatio), "minRatio must be in [0, 1], got \(s.minRatio)")
        case .lookM(let s):
            try require((0...1).contains(s.recentShare), "recentShare must be in [0, 1], got \(s.recentShare)")
            try require(s.sinks >= 0, "sinks must be ≥ 0, got \(s.sinks)")
        case .tgv(let s): try s.validate(require)
        case .composite(let s): try s.observation.validate(require)
        }
    }
}

/// StreamingLLM: the first `sinks` positions plus the most recent ones.
public struct StreamingLLMSettings: Sendable, Hashable, Codable {
    public var sinks = 4
    public init() {}
}

/// H2O applied once at the end of prefill: heavy hitters by accumulated attention plus a recent window.
public struct H2OSettings: Sendable, Hashable, Codable {
    /// Share of the budget given to the recent window (the usual 10% + 10% split is 0.5).
    public var recentShare = 0.5
    /// Divide each column sum by the number of queries that see it (ZipCache, kvpress ObservedAttention).
    public var normalizeByQueryCount = false
    public init() {}
}

public enum Pooling: String, Sendable, Hashable, Codable {
    case average, max, none
}

/// SnapKV: votes of the last `window` queries, pooled, top-k plus the window.
public struct SnapKVSettings: Sendable, Hashable, Codable {
    public var window = 32
    public var kernel = 5
    public var pooling = Pooling.average
    public init() {}

    func validate(_ require: (Bool, String) throws(KVCacheError) -> Void) throws(KVCacheError) {
        try require(window >= 1, "window must be ≥ 1, got \(window)")
        try require(kernel >= 1 && kernel % 2 == 1, "kernel must be odd and ≥ 1, got \(kernel)")
    }
}

/// PyramidKV: SnapKV scoring with a linearly decreasing per-layer budget.
public struct PyramidKVSettings: Sendable, Hashable, Codable {
    public var snap = SnapKVSettings()
    public var beta = 20.0
    public init() {}
}

/// VL-Cache: sparsity-aware layer budgets and accumulated post-vision attention.
public struct VLCacheSettings: Sendable, Hashable, Codable {
    public enum Observation: Sendable, Hashable, Codable {
        /// The rows after the last visual token (the method).
        case postVision
        /// The last n prompt rows (the paper's speed study used 50).
        case lastRows(Int)
        /// The rows after the last visual token, at most the last n: the question where long text
        /// (a document's) follows the images.
        case postVisionAtMost(Int)

        func validate(_ require: (Bool, String) throws(KVCacheError) -> Void) throws(KVCacheError) {
            switch self {
            case .postVision: break
            case .lastRows(let n): try require(n >= 1, "lastRows must be ≥ 1, got \(n)")
            case .postVisionAtMost(let n): try require(n >= 1, "postVision:<n> needs n ≥ 1, got \(n)")
            }
        }
    }

    public enum Apportionment: String, Sendable, Hashable, Codable {
        /// Clip each layer's fraction, do not renormalise: the realised total may drift (the paper).
        case clipped
        /// Water-fill within the clip bounds and apportion the exact total by largest remainder.
        case largestRemainder
    }

    /// Relative threshold `p` of the sparsity filter.
    public var threshold: Float = 0.01
    public var minFraction = 0.01
    public var maxFraction = 1.0
    /// Share of each layer's budget protected as a recent window.
    public var recentShare = 0.1
    public var observation = Observation.postVision
    public var apportionment = Apportionment.clipped
    public init() {}

    /// First observed row; a prompt that ends in a visual token observes its last row.
    public func observationStart(layout: PromptLayout) -> Int {
        let m = layout.promptLength
        switch observation {
        case .postVision: return min(layout.postVisionStart, m - 1)
        case .lastRows(let n): return max(0, m - n)
        case .postVisionAtMost(let n): return min(max(layout.postVisionStart, m - n), m - 1)
        }
    }
}

/// MadaKV: per-head modality preference (MPA) and hierarchical compression compensation (HCC).
public struct MadaKVSettings: Sendable, Hashable, Codable {
    public enum Components: String, Sendable, Hashable, Codable {
        case both
        /// A fixed per-head budget split by modality mass (the "MPA only" ablation).
        case mpaOnly
        /// A joint demand with no modality split (the "HCC only" ablation).
        case hccOnly
    }

    public enum Compensation: String, Sendable, Hashable, Codable {
        /// Every layer keeps its demand scaled by (budget left) / (demand left), so layers that need
        /// more mass coverage get more rows and the total stays at the budget.
        case proportional
        /// The specification's reference reading: a layer keeps its raw demand and later layers absorb
        /// the overspend down to their floor (starves late layers when early layers are dense).
        case keepDemand
    }

    /// The proxy (observation) window, also kept uncompressed.
    public var proxyWindow = 32
    /// The attention-mass fraction a head's demand must cover.
    public var theta = 0.9
    /// Floor of a head's kept count as a fraction of the prompt (besides the window).
    public var minRatio = 0.01
    public var components = Components.both
    public var compensation = Compensation.proportional
    public init() {}
}

/// LOOK-M: text-prior eviction, then merging of evicted rows into their most similar kept row.
public struct LookMSettings: Sendable, Hashable, Codable {
    public enum TextPrior: String, Sendable, Hashable, Codable {
        /// Eq. 5: add the largest score to every text score, so text outranks images within the budget.
        case addMax
        /// The official code: keep every text token; images fill the heavy budget only if text is short.
        case keepAllText
        /// No prior (the plain merge variants); positions 0..<sinks are forced in.
        case none
    }

    public enum Merge: String, Sendable, Hashable, Codable {
        /// Eq. 9–10: each kept row becomes the mean of itself and its joiners.
        case averaged
        /// Eq. 11 (the official script's default): joiners count as their mean with the kept row.
        case pivotal
        /// Eq. 12: joiners weighted by their similarity.
        case weighted
        /// Not in LOOK-M: `pivotal` for the values only, the kept keys left as they are (as kvpress's
        /// `MergingPress` keeps them): moving a kept key changes which rows every query scores high.
        case values
        case none
    }

    /// Share of the budget given to the recent window (official script: 10% heavy + 10% recent).
    public var recentShare = 0.5
    public var textPrior = TextPrior.addMax
    public var merge = Merge.pivotal
    /// Sinks forced into the kept set when `textPrior` is `.none`.
    public var sinks = 4
    /// Averaged and weighted merging first drop evicted rows whose head-averaged best similarity is
    /// below the layer mean (the official code does).
    public var filterBelowMeanSimilarity = true
    public init() {}
}

/// The prefill attention rows a policy needs: column sums over rows `start..<m` for each start,
/// VL-Cache's sparsity over rows `sparsityStart..<m`, and TGV-KV's text-weighted column sums over
/// rows `textWeightedStart..<m` (which must also be a suffix start).
public struct ProfileRequirements: Sendable, Hashable {
    public var suffixStarts: Set<Int>
    public var sparsityStart: Int?
    public var sparsityThreshold: Float
    public var textWeightedStart: Int?

    public init(
        suffixStarts: Set<Int> = [],
        sparsityStart: Int? = nil,
        sparsityThreshold: Float = 0.01,
        textWeightedStart: Int? = nil
    ) {
        self.suffixStarts = suffixStarts
        self.sparsityStart = sparsityStart
        self.sparsityThreshold = sparsityThreshold
        self.textWeightedStart = textWeightedStart
    }

    /// The rows several policies need together (sparsity settings must agree, and so must the
    /// text-weighted start; the first wins).
    public func union(_ other: ProfileRequirements) -> ProfileRequirements {
        var result = self
        result.suffixStarts.formUnion(other.suffixStarts)
        if result.sparsityStart == nil {
            result.sparsityStart = other.sparsityStart
            result.sparsityThreshold = other.sparsityThreshold
        }
        result.textWeightedStart = result.textWeightedStart ?? other.textWeightedStart
        return result
    }

    /// The earliest prompt row whose query must be present.
    public var firstRow: Int? {
        let starts = suffixStarts.union(sparsityStart.map { [$0] } ?? [])
        return starts.min()
    }
}
