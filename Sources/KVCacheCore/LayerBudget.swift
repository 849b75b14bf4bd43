/// How many prompt rows one KV head keeps, window and sinks included; MadaKV also fixes how many of
/// the compressible rows come from each modality.
public struct HeadBudget: Sendable, Hashable, Codable {
    public var capacity: Int
    public var split: ModalitySplit?

    public init(capacity: Int, split: ModalitySplit? = nil) {
        self.capacity = capacity
        self.split = split
    }
}

/// Visual and text counts of the rows a head keeps outside its protected window.
public struct ModalitySplit: Sendable, Hashable, Codable {
    public var visual: Int
    public var text: Int

    public init(visual: Int, text: Int) {
        self.visual = visual
        self.text = text
    }
}

/// The budget of one layer: one entry per KV head.
public struct LayerBudget: Sendable, Hashable, Codable {
    public var layer: Int
    public var heads: [HeadBudget]

    public init(layer: Int, heads: [HeadBudget]) {
        self.layer = layer
        self.heads = heads
    }

    public var total: Int { heads.reduce(0) { $0 + $1.capacity } }
}
