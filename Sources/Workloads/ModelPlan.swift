import KVCacheCore

/// Properties of the simulated model rather than of one prompt: the layer sparsity curve, each
/// head's modality preference and which heads retrieve. Drawn once per generator seed.
struct ModelPlan: Sendable, Hashable {
    let layers: Int
    let queryHeads: Int
    let kvHeads: Int
    /// Target sparsity per layer before the small per-sequence jitter.
    let sparsityCurve: [Double]
    /// π per (layer, KV head): the probability that a shared salient key is visual.
    let groupPreference: [Double]
    /// π per (layer, query head).
    let headPreference: [Double]
    /// Whether (layer, query head) retrieves the needle.
    let retrieval: [Bool]

    init(geometry: ModelGeometry, settings: TraceSettings, seed: UInt64) {
        layers = geometry.layers
        queryHeads = geometry.queryHeads
        kvHeads = geometry.kvHeads
        sparsityCurve = Self.sparsityCurve(layers: layers, settings: settings, seed: seed)

        var preferenceRNG = StructureRNG(seed: StreamKind.headPreference.seed(seed))
        var group = [Double](repeating: 0, count: layers * kvHeads)
        var head = [Double](repeating: 0, count: layers * queryHeads)
        let groupSize = geometry.groupSize
        for layer in 0..<layers {
            for kv in 0..<kvHeads {
                let pi = preferenceRNG.symmetricBeta(settings.headPreferenceConcentration)
                group[layer * kvHeads + kv] = pi
                for member in 0..<groupSize {
                    // Heads of one group read the same keys, so their preferences stay close.
                    let jittered = groupSize == 1 ? pi : min(1, max(0, pi + 0.15 * preferenceRNG.normal()))
                    head[layer * queryHeads + kv * groupSize + member] = jittered
                }
            }
        }
        groupPreference = group
        headPreference = head

        var retrievalRNG = StructureRNG(seed: StreamKind.retrievalHeads.seed(seed))
        var retrieval = [Bool](repeating: false, count: layers * queryHeads)
        let upper = layers / 2
        for layer in upper..<layers {
            for h in 0..<queryHeads where retrievalRNG.bernoulli(settings.retrievalHeadFraction) {
                retrieval[layer * queryHeads + h] = true
            }
        }
        if settings.retrievalHeadFraction > 0, !retrieval.contains(true) {
            let layer = upper + retrievalRNG.int(below: layers - upper)
            retrieval[layer * queryHeads + retrievalRNG.int(below: queryHeads)] = true
        }
        self.retrieval = retrieval
    }

    func isRetrieval(layer: Int, queryHead: Int) -> Bool { retrieval[layer * queryHeads + queryHead] }

    /// Dense leading layers, then a smooth random curve over the sparse range with per-layer
    /// jitter, redrawn until it rises and falls somewhere (VL-Cache: non-monotonic, unlike
    /// PyramidKV's schedule).
    private static func sparsityCurve(layers: Int, settings: TraceSettings, seed: UInt64) -> [Double] {
        var rng = StructureRNG(seed: StreamKind.sparsityCurve.seed(seed))
        let dense = min(settings.denseLayerCount, layers)
        var curve = (0..<dense).map { _ in rng.uniform(in: settings.denseSparsity) }
        let sparse = layers - dense
        guard sparse > 0 else { return curve }
        let low = settings.sparseSparsity.lowerBound
        let high = settings.sparseSparsity.upperBound
        var shape = [Double](repeating: 0.5, count: sparse)
        for _ in 0..<64 {
            let amplitudes = (1...3).map { rng.normal() / Double($0) }
            let phases = (1...3).map { _ in rng.uniform() }
            for i in 0..<sparse {
                let x = sparse == 1 ? 0 : Double(i) / Double(sparse - 1)
                var value = 0.0
                for k in 0..<3 {
                    value += amplitudes[k] * DeterministicMath.cosTwoPi(0.5 * Double(k + 1) * x + phases[k])
                }
                shape[i] = value
            }
            let lowest = shape.min()!
            let span = shape.max()! - lowest
            for i in 0..<sparse {
                let normalized = span > 1e-9 ? (shape[i] - lowest) / span : 0.5
                shape[i] = min(1, max(0, normalized + 0.08 * rng.normal()))
            }
            if isAcceptable(shape) { break }
        }
        curve += shape.map { low + (high - low) * $0 }
        return curve
    }

    /// Two or more sparse layers must not all be in ascending order; three or more must both rise
    /// and fall.
    private static func isAcceptable(_ shape: [Double]) -> Bool {
        guard shape.count >= 2 else { return true }
        let steps = zip(shape, shape.dropFirst())
        let falls = steps.contains { $1 < $0 }
        let rises = steps.contains { $1 > $0 }
        return shape.count == 2 ? falls : (falls && rises)
    }
}
