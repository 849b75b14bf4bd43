@testable import KVCacheCore

/// A small seeded generator for test tensors (SplitMix64).
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func floats(_ count: Int, scale: Float = 1) -> [Float] {
        (0..<count).map { _ in Float.random(in: -scale...scale, using: &self) }
    }
}

func geometry(layers: Int = 3, queryHeads: Int = 4, kvHeads: Int = 2, headDim: Int = 16) -> ModelGeometry {
    try! ModelGeometry(
        name: "test",
        layers: layers,
        queryHeads: queryHeads,
        kvHeads: kvHeads,
        headDim: headDim,
        tokensPerImage: 16
    )
}

/// A random layer whose queries are scaled up so attention is peaked, and a layout of text, one image
/// of `visual` tokens, then text.
func randomPrefill(_ g: ModelGeometry, m: Int, seed: UInt64) -> LayerPrefill {
    var rng = SeededGenerator(seed: seed)
    let kv = g.kvHeads * m * g.headDim
    return try! LayerPrefill(
        geometry: g,
        promptLength: m,
        keys: rng.floats(kv),
        values: rng.floats(kv),
        queries: rng.floats(g.queryHeads * m * g.headDim, scale: 3),
        queryRows: m
    )
}

func layout(m: Int, textBefore: Int, visual: Int) -> PromptLayout {
    try! PromptLayout(spans: [
        ModalitySpan(.text, start: 0, count: textBefore),
        ModalitySpan(.image(0), start: textBefore, count: visual),
        ModalitySpan(.text, start: textBefore + visual, count: m - textBefore - visual),
    ])
}

/// Profiles, allocates and compresses every layer of random prefills, as a worker and coordinator do.
func compressAll(
    _ g: ModelGeometry,
    m: Int,
    layout: PromptLayout,
    policy: CompressionPolicy,
    retention: Double,
    seed: UInt64
) throws -> (prefills: [LayerPrefill], budgets: [LayerBudget], heads: [[HeadCache<Float>]]) {
    let prefills = (0..<g.layers).map { randomPrefill(g, m: m, seed: seed &+ UInt64($0)) }
    let profiles = try prefills.map {
        try AttentionProfile(prefill: $0, requirements: policy.requirements(layout: layout))
    }
    let statistics = profiles.enumerated().map {
        LayerStatistics(layer: $0.offset, profile: $0.element, layout: layout, policy: policy)
    }
    let budgets = try BudgetAllocator.allocate(
        policy: policy,
        retention: retention,
        geometry: g,
        statistics: statistics
    )
    let heads = try (0..<g.layers).map { l in
        try LayerCompressor.compress(
            prefills[l],
            layout: layout,
            profile: profiles[l],
            budget: budgets[l],
            policy: policy,
            as: Float.self
        ).heads
    }
    return (prefills, budgets, heads)
}
