import KVCacheCore
public import Workloads

/// Time each policy takes to compress one layer: its own attention profile, then selection and merging.
public enum CompressTiming {
    public struct Row: Sendable {
        public var policy: String
        public var profileMillis: Double
        public var compressMillis: Double
    }

    public static func measure(trace: SequenceTrace, layer: Int, retention: Double) throws -> [Row] {
        let prefill = trace.prefill(layer: layer)
        let m = trace.layout.promptLength
        return try CompressionPolicy.allNames.map { name in
            let policy = try CompressionPolicy.named(name)
            let clock = ContinuousClock()
            let start = clock.now
            let profile = try AttentionProfile(
                prefill: prefill,
                requirements: policy.requirements(layout: trace.layout)
            )
            let profiled = clock.now
            let statistics = LayerStatistics(layer: layer, profile: profile, layout: trace.layout, policy: policy)
            // One layer alone: every layer is given its statistics, so the allocators see a flat model.
            let budget = try BudgetAllocator.allocate(
                policy: policy,
                retention: retention,
                geometry: trace.geometry,
                statistics: (0..<trace.geometry.layers).map {
                    LayerStatistics(layer: $0, promptLength: m, density: statistics.density, heads: statistics.heads)
                }
            )[layer]
            _ = try LayerCompressor.compress(
                prefill,
                layout: trace.layout,
                profile: profile,
                budget: budget,
                policy: policy,
                as: Float.self
            )
            let done = clock.now
            return Row(
                policy: name,
                profileMillis: (profiled - start).seconds * 1000,
                compressMillis: (done - profiled).seconds * 1000
            )
        }
    }
}
