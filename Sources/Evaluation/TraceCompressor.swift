public import KVCacheCore
public import Workloads

/// One policy's whole pipeline over one trace, as a cluster applies it to a sequence: every layer's
/// attention profiled (the rows the policy observes), the budget split over layers from the
/// statistics alone (the coordinator's allocator), then each layer selected and merged.
public enum TraceCompressor {
    public struct Compressed: Sendable {
        /// Per layer, per KV head: the kept rows, in ascending position.
        public var layers: [[HeadCache<Float>]]
        /// Rows merged into kept ones (LOOK-M), over all layers.
        public var mergedRows: Int
        public var profileSeconds: Double
        public var compressSeconds: Double
    }

    public static func compress(
        _ trace: some PromptTrace,
        policy: CompressionPolicy,
        retention: Double,
        threads: Int = 1
    ) throws -> Compressed {
        try policy.validate()
        let g = trace.geometry
        let layout = trace.layout
        let requirements = policy.requirements(layout: layout)
        let clock = ContinuousClock()
        let start = clock.now
        var profiles: [AttentionProfile] = []
        var statistics: [LayerStatistics] = []
        for layer in 0..<g.layers {
            let profile = try AttentionProfile(
                prefill: try trace.prefill(layer: layer),
                requirements: requirements,
                threads: .dispatch(threads)
            )
            profiles.append(profile)
            statistics.append(LayerStatistics(layer: layer, profile: profile, layout: layout, policy: policy))
        }
        let profiled = clock.now
        let budgets = try BudgetAllocator.allocate(
            policy: policy,
            retention: retention,
            geometry: g,
            statistics: statistics
        )
        var layers: [[HeadCache<Float>]] = []
        var merged = 0
        for layer in 0..<g.layers {
            let result = try LayerCompressor.compress(
                try trace.prefill(layer: layer),
                layout: layout,
                profile: profiles[layer],
                budget: budgets[layer],
                policy: policy,
                as: Float.self
            )
            layers.append(result.heads.map { $0.inPositionOrder() })
            merged += result.mergedRows
        }
        return Compressed(
            layers: layers,
            mergedRows: merged,
            profileSeconds: (profiled - start).seconds,
            compressSeconds: (clock.now - profiled).seconds
        )
    }
}

extension TraceCompressor.Compressed {
    /// Writes the kept rows as safetensors: per layer `L` and KV head `H`, `layers.L.heads.H.kept`
    /// (I32 `[rows]`, the kept positions, ascending) and `layers.L.heads.H.keys` and `.values` (F32
    /// `[rows, head_dim]`, merged rows for LOOK-M); `__metadata__` holds `format`
    /// (`tessera.kept.v1`), `geometry` (as in a trace file), `policy` and `retention`.
    public func write(to path: String, geometry: ModelGeometry, policy: String, retention: Double) throws {
        var file = SafeTensors(file: path)
        file.setMetadata("format", "tessera.kept.v1")
        file.setMetadata("geometry", try TraceFile.geometryJSON(geometry))
        file.setMetadata("policy", policy)
        file.setMetadata("retention", "\(retention)")
        for (layer, heads) in layers.enumerated() {
            for (h, head) in heads.enumerated() {
                let name = "layers.\(layer).heads.\(h)"
                file.add("\(name).kept", int32s: head.positions, shape: [head.count])
                file.add("\(name).keys", floats: head.keys, shape: [head.count, head.headDim])
                file.add("\(name).values", floats: head.values, shape: [head.count, head.headDim])
            }
        }
        try file.write(to: path)
    }
}

extension HeadCache {
    /// The same rows sorted by position.
    func inPositionOrder() -> HeadCache {
        let order = positions.indices.sorted { positions[$0] < positions[$1] }
        guard order != Array(positions.indices) else { return self }
        var keys: [S] = []
        var values: [S] = []
        keys.reserveCapacity(self.keys.count)
        values.reserveCapacity(self.values.count)
        for row in order {
            keys.append(contentsOf: self.keys[row * headDim..<(row + 1) * headDim])
            values.append(contentsOf: self.values[row * headDim..<(row + 1) * headDim])
        }
        // Same counts, so the parts agree.
        return HeadCache(
            headDim: headDim,
            keys: keys,
            values: values,
            positions: order.map { positions[$0] },
            tags: order.map { tags[$0] }
        )!
    }
}
