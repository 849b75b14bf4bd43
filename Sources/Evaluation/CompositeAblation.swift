public import KVCacheCore

/// `tessera eval --ablate composite`: the composite with each of its three parts on and off (eight
/// variants over the same traces), and what each part contributes.
public enum CompositeAblation {
    /// The parts, as the settings switch them.
    public enum Part: String, Sendable, CaseIterable {
        case layers, heads, merge

        func isOn(_ s: CompositeSettings) -> Bool {
            switch self {
            case .layers: s.layerBudgets
            case .heads: s.headSplit
            case .merge: s.merge != .none
            }
        }
    }

    /// Every combination of the parts, all parts on first; merging, when on, and every other setting as
    /// in `base`, or as the composite's defaults where `base` merges nothing.
    public static func variants(of base: CompositeSettings = CompositeSettings()) -> [CompressionPolicy] {
        [true, false].flatMap { layers in
            [true, false].flatMap { heads in
                [true, false].map { merge in
                    var s = base
                    s.layerBudgets = layers
                    s.headSplit = heads
                    s.merge = merge ? (base.merge == .none ? CompositeSettings().merge : base.merge) : .none
                    return CompressionPolicy.composite(s)
                }
            }
        }
    }

    /// What switching one part on does at one budget, averaged over the four settings of the others.
    public struct Contribution: Sendable, Hashable {
        public var part: Part
        public var budget: Double
        /// Mean output error with the part off minus with it on: positive when the part helps.
        public var errorReduction: Double
        /// The same difference relative to the mean error with the part off.
        public var relativeErrorReduction: Double
        /// Mean needle accuracy with the part on minus off (nil without needle probes).
        public var needleGain: Double?
    }

    /// The contributions of each part at each budget, from the results of `variants`.
    public static func contributions(_ results: [EvaluationResult], of variants: [CompressionPolicy]) -> [Contribution]
    {
        let settings = Dictionary(
            variants.compactMap { policy -> (String, CompositeSettings)? in
                guard case .composite(let s) = policy else { return nil }
                return (policy.label, s)
            },
            uniquingKeysWith: { first, _ in first }
        )
        let budgets = Array(Set(results.map(\.budget))).sorted()
        return budgets.flatMap { budget in
            Part.allCases.compactMap { part -> Contribution? in
                let rows = results.filter { $0.budget == budget && settings[$0.policy] != nil }
                let on = rows.filter { part.isOn(settings[$0.policy]!) }
                let off = rows.filter { !part.isOn(settings[$0.policy]!) }
                guard !on.isEmpty, !off.isEmpty else { return nil }
                func mean(_ values: [Double]) -> Double { values.reduce(0, +) / Double(values.count) }
                let errorOn = mean(on.map(\.outputError))
                let errorOff = mean(off.map(\.outputError))
                let needlesOn = on.compactMap(\.needleAccuracy)
                let needlesOff = off.compactMap(\.needleAccuracy)
                return Contribution(
                    part: part,
                    budget: budget,
                    errorReduction: errorOff - errorOn,
                    relativeErrorReduction: errorOff > 0 ? (errorOff - errorOn) / errorOff : 0,
                    needleGain: needlesOn.isEmpty || needlesOff.isEmpty ? nil : mean(needlesOn) - mean(needlesOff)
                )
            }
        }
    }
}
