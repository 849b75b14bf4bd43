public import KVCacheCore
public import Workloads

/// What one process computes for a sequence with KVCacheCore alone: the profile, statistics,
/// allocation, compression and decode that a cluster spreads over its processes. Because every step
/// is deterministic, a cluster's decode outputs must equal these bit for bit, faults or not.
public enum ReferenceDecode {
    /// `outputs[step][layer]`: each decode step's attention outputs (`queryHeads × headDim`).
    public static func outputs(
        _ trace: SequenceTrace,
        policy: CompressionPolicy,
        retention: Double
    ) throws -> [[Int: [Float]]] {
        let g = trace.geometry
        let layout = trace.layout
        let requirements = policy.requirements(layout: layout)
        var prefills: [LayerPrefill] = []
        var profiles: [AttentionProfile] = []
        for layer in 0..<g.layers {
            prefills.append(trace.prefill(layer: layer))
            profiles.append(try AttentionProfile(prefill: prefills[layer], requirements: requirements))
        }
        let statistics = (0..<g.layers).map {
            LayerStatistics(layer: $0, profile: profiles[$0], layout: layout, policy: policy)
        }
        let budgets = try BudgetAllocator.allocate(
            policy: policy,
            retention: retention,
            geometry: g,
            statistics: statistics
        )
        var steps = [[Int: [Float]]](repeating: [:], count: trace.decodeSteps)
        for layer in 0..<g.layers {
            var heads = try LayerCompressor.compress(
                prefills[layer],
                layout: layout,
                profile: profiles[layer],
                budget: budgets[layer],
                policy: policy,
                as: Float.self
            ).heads
            for (t, input) in trace.decode(layer: layer).enumerated() {
                steps[t][layer] = LayerDecoder.step(
                    &heads,
                    geometry: g,
                    input: input,
                    position: layout.promptLength + t
                )
            }
        }
        return steps
    }
}
