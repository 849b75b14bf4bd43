/// How unevenly a compressed cache spreads its budget over layers and KV heads: the smallest and the
/// largest share of the prompt's rows that any one head keeps. A uniform policy keeps the same share
/// everywhere (min = max = its retention); VL-Cache moves rows between layers, AdaKV between the heads
/// of a layer, MadaKV both.
///
/// Only prompt rows count (positions before `promptLength`), so the figure does not drift as decode
/// appends rows.
public struct HeadRowShares: Sendable, Hashable, Codable {
    /// Shares in [0, 1].
    public var min: Double
    public var max: Double

    public init(min: Double, max: Double) {
        self.min = min
        self.max = max
    }

    /// Over `heads` of a prompt of `promptLength` positions; nil without heads or prompt.
    public init?<S: KVScalar>(heads: some Sequence<HeadCache<S>>, promptLength: Int) {
        guard promptLength > 0 else { return nil }
        var fewest = Int.max
        var most = Int.min
        for head in heads {
            let kept = head.positions.withUnsafeBufferPointer { positions in
                var prompt = 0
                for position in positions where Int(position) < promptLength { prompt += 1 }
                return prompt
            }
            fewest = Swift.min(fewest, kept)
            most = Swift.max(most, kept)
        }
        guard fewest <= most else { return nil }
        self.init(min: Double(fewest) / Double(promptLength), max: Double(most) / Double(promptLength))
    }

    /// The spread over both: the smaller minimum and the larger maximum.
    public func merged(with other: HeadRowShares) -> HeadRowShares {
        HeadRowShares(min: Swift.min(min, other.min), max: Swift.max(max, other.max))
    }
}

extension Optional where Wrapped == HeadRowShares {
    /// `self` merged with `other`, or whichever of them exists.
    public func merged(with other: HeadRowShares?) -> HeadRowShares? {
        guard let self else { return other }
        guard let other else { return self }
        return self.merged(with: other)
    }
}
