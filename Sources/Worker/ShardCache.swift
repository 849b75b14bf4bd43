import KVCacheCore

/// The compressed layers of one shard of one sequence, in the worker's storage type.
enum ShardCache: Sendable {
    case float32([Int: [HeadCache<Float>]])
    case float16([Int: [HeadCache<Float16>]])

    /// Compresses every layer of `prefills` to its budget.
    static func compress(
        _ prefills: [Int: LayerPrefill], profiles: [Int: AttentionProfile], budgets: [Int: LayerBudget],
        layout: PromptLayout, policy: CompressionPolicy, storage: ScalarType
    ) throws(KVCacheError) -> ShardCache {
        func run<S: KVScalar>(_: S.Type) throws(KVCacheError) -> [Int: [HeadCache<S>]] {
            var layers: [Int: [HeadCache<S>]] = [:]
            for (layer, prefill) in prefills {
                guard let budget = budgets[layer] else {
                    throw KVCacheError(.invalidShape, "no budget for layer \(layer)")
                }
                layers[layer] = try LayerCompressor.compress(
                    prefill, layout: layout, profile: profiles[layer], budget: budget, policy: policy, as: S.self
                ).heads
            }
            return layers
        }
        switch storage {
        case .float32: return .float32(try run(Float.self))
        case .float16: return .float16(try run(Float16.self))
        }
    }

    /// Decodes one step on `layer`, returning `queryHeads × headDim` outputs.
    mutating func decode(layer: Int, geometry: ModelGeometry, input: DecodeStepInput, position: Int) -> [Float]? {
        switch self {
        case .float32(var layers):
            guard var heads = layers.removeValue(forKey: layer) else { return nil }
            self = .float32([:])
            let outputs = LayerDecoder.step(&heads, geometry: geometry, input: input, position: position)
            layers[layer] = heads
            self = .float32(layers)
            return outputs
        case .float16(var layers):
            guard var heads = layers.removeValue(forKey: layer) else { return nil }
            self = .float16([:])
            let outputs = LayerDecoder.step(&heads, geometry: geometry, input: input, position: position)
            layers[layer] = heads
            self = .float16(layers)
            return outputs
        }
    }

    /// Bytes of K/V payload held, in all and by modality.
    var bytes: (total: Int, byModality: [String: Int]) {
        func sum<S>(_ layers: [Int: [HeadCache<S>]]) -> (Int, [String: Int]) {
            var total = 0
            var byModality: [String: Int] = [:]
            for head in layers.values.joined() {
                total += head.payloadBytes
                byModality.merge(head.payloadBytesByModality, uniquingKeysWith: +)
            }
            return (total, byModality)
        }
        switch self {
        case .float32(let layers): return sum(layers)
        case .float16(let layers): return sum(layers)
        }
    }

    /// Digest of every layer's bytes in layer order, for comparing replicas.
    var digest: UInt64 {
        func fold<S>(_ layers: [Int: [HeadCache<S>]]) -> UInt64 {
            layers.keys.sorted().reduce(0xcbf2_9ce4_8422_2325) { hash, layer in
                layers[layer]!.reduce(hash) { ($0 ^ $1.digest) &* 0x0000_0100_0000_01B3 }
            }
        }
        switch self {
        case .float32(let layers): return fold(layers)
        case .float16(let layers): return fold(layers)
        }
    }
}
