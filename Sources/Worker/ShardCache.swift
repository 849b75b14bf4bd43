import KVCacheCore
import Workloads

/// The compressed layers of one shard of one sequence, in the worker's storage type: one of the two
/// dictionaries is used. Stored properties rather than enum payloads, so that decode mutates the
/// heads in place (binding an enum payload to mutate it would copy every row).
struct ShardCache: Sendable {
    private(set) var float32: [Int: [HeadCache<Float>]] = [:]
    private(set) var float16: [Int: [HeadCache<Float16>]] = [:]
    let storage: ScalarType

    /// Compresses every layer of `prefills` to its budget, with room for `decodeRows` decoded rows.
    static func compress(
        _ prefills: [Int: LayerPrefill],
        profiles: [Int: AttentionProfile],
        budgets: [Int: LayerBudget],
        layout: PromptLayout,
        policy: CompressionPolicy,
        storage: ScalarType,
        decodeRows: Int
    ) throws(KVCacheError) -> ShardCache {
        var cache = ShardCache(storage: storage)
        switch storage {
        case .float32:
            cache.float32 = try compressLayers(
                prefills,
                profiles: profiles,
                budgets: budgets,
                layout: layout,
                policy: policy,
                decodeRows: decodeRows
            )
        case .float16:
            cache.float16 = try compressLayers(
                prefills,
                profiles: profiles,
                budgets: budgets,
                layout: layout,
                policy: policy,
                decodeRows: decodeRows
            )
        }
        return cache
    }

    /// Every layer of `prefills` compressed to its budget, as `S` (`adoptWholeHeads` as
    /// `LayerCompressor.compress` has it).
    static func compressLayers<S: KVScalar>(
        _ prefills: [Int: LayerPrefill],
        profiles: [Int: AttentionProfile],
        budgets: [Int: LayerBudget],
        layout: PromptLayout,
        policy: CompressionPolicy,
        decodeRows: Int,
        adoptWholeHeads: Bool = true,
        as _: S.Type = S.self
    ) throws(KVCacheError) -> [Int: [HeadCache<S>]] {
        var layers: [Int: [HeadCache<S>]] = [:]
        for (layer, prefill) in prefills {
            guard let budget = budgets[layer] else {
                throw KVCacheError(.invalidShape, "no budget for layer \(layer)")
            }
            layers[layer] = try LayerCompressor.compress(
                prefill,
                layout: layout,
                profile: profiles[layer],
                budget: budget,
                policy: policy,
                decodeRows: decodeRows,
                adoptWholeHeads: adoptWholeHeads,
                as: S.self
            ).heads
        }
        return layers
    }

    /// Puts one layer's heads in (a copy received from another worker).
    mutating func insert(layer: Int, float32 heads: [HeadCache<Float>]) { float32[layer] = heads }
    mutating func insert(layer: Int, float16 heads: [HeadCache<Float16>]) { float16[layer] = heads }

    func holds(layer: Int) -> Bool { float32[layer] != nil || float16[layer] != nil }

    /// Decodes one step on every layer of `inputs`: appends each layer's rows, then attends with
    /// all the layers' heads split across `threads` at once (`LayerDecoder.attend`). Returns each
    /// layer's `queryHeads × headDim` outputs in the order of `inputs`; nil, with nothing appended,
    /// when a layer is not held.
    mutating func decode(
        _ inputs: [(layer: Int, input: DecodeStepInput)],
        geometry: ModelGeometry,
        position: Int,
        threads: ThreadTeam = .single
    ) -> [[Float]]? {
        guard inputs.allSatisfy({ holds(layer: $0.layer) }) else { return nil }
        for (layer, input) in inputs { _ = append(layer: layer, geometry: geometry, input: input, position: position) }
        let queries = inputs.map(\.input.queries)
        switch storage {
        case .float32:
            let heads = inputs.map { float32[$0.layer]! }
            return LayerDecoder.attend(heads, geometry: geometry, queries: queries, threads: threads)
        case .float16:
            let heads = inputs.map { float16[$0.layer]! }
            return LayerDecoder.attend(heads, geometry: geometry, queries: queries, threads: threads)
        }
    }

    /// Appends one decode step's rows to `layer` without attending: a replica's share of a step its
    /// primary attended. False when the layer is not held.
    mutating func append(layer: Int, geometry: ModelGeometry, input: DecodeStepInput, position: Int) -> Bool {
        switch storage {
        case .float32: Self.append(&float32, layer: layer, geometry: geometry, input: input, position: position)
        case .float16: Self.append(&float16, layer: layer, geometry: geometry, input: input, position: position)
        }
    }

    /// Takes back the row the last decode step appended to every head of `layer`.
    mutating func removeLastRow(layer: Int) {
        func drop<S>(_ heads: inout [HeadCache<S>]) { for head in heads.indices { heads[head].removeLastRow() } }
        switch storage {
        case .float32: _ = Self.withHeads(&float32, layer: layer, drop)
        case .float16: _ = Self.withHeads(&float16, layer: layer, drop)
        }
    }

    /// One decode step on `layer` of `layers`, in place (an audit copy's, a layer at a time).
    static func decode<S: KVScalar>(
        _ layers: inout [Int: [HeadCache<S>]],
        layer: Int,
        geometry: ModelGeometry,
        input: DecodeStepInput,
        position: Int,
        threads: ThreadTeam
    ) -> [Float]? {
        withHeads(&layers, layer: layer) {
            LayerDecoder.step(&$0, geometry: geometry, input: input, position: position, threads: threads)
        }
    }

    /// One decode step's rows appended to `layer` of `layers`, in place; false when it is not held.
    static func append<S: KVScalar>(
        _ layers: inout [Int: [HeadCache<S>]],
        layer: Int,
        geometry: ModelGeometry,
        input: DecodeStepInput,
        position: Int
    ) -> Bool {
        withHeads(&layers, layer: layer) { LayerDecoder.append(input, to: &$0, geometry: geometry, position: position) }
            != nil
    }

    /// `body` on the heads of `layer`, taken out of the dictionary so that they are uniquely
    /// referenced while they grow (mutating them in place there would copy every row); nil when the
    /// layer is not held.
    private static func withHeads<S, T>(
        _ layers: inout [Int: [HeadCache<S>]],
        layer: Int,
        _ body: (inout [HeadCache<S>]) -> T
    ) -> T? {
        guard var heads = layers.removeValue(forKey: layer) else { return nil }
        defer { layers[layer] = heads }
        return body(&heads)
    }

    /// The score each held row competes on if the cache is tightened later (`HeadCache.tightened`):
    /// the policy's ranking at prefill (`CompressionPolicy.positionScores`), or, for policies that
    /// observe nothing, recency with the sink first. `[layer][kvHead][row]`.
    func rowScores(
        profiles: [Int: AttentionProfile],
        policy: CompressionPolicy,
        layout: PromptLayout
    ) -> [Int: [[Float]]] {
        let m = layout.promptLength
        func scores<S>(_ layers: [Int: [HeadCache<S>]]) -> [Int: [[Float]]] {
            var result: [Int: [[Float]]] = [:]
            for (layer, heads) in layers {
                let observed = profiles[layer].flatMap { policy.positionScores(profile: $0, layout: layout) }
                result[layer] = heads.enumerated().map { h, head in
                    head.positions.map { position in
                        let p = Int(position)
                        if let observed, p < m { return observed[h * m + p] }
                        return p == 0 ? .infinity : Float(p)
                    }
                }
            }
            return result
        }
        return storage == .float32 ? scores(float32) : scores(float16)
    }

    /// Cuts each head to its capacity in `budgets` (never grows it); returns the kept rows' scores.
    mutating func tighten(
        to budgets: [Int: LayerBudget],
        scores: [Int: [[Float]]],
        promptLength m: Int
    ) -> [Int: [[Float]]] {
        func cut<S>(_ layers: inout [Int: [HeadCache<S>]]) -> [Int: [[Float]]] {
            var keptScores = scores
            for layer in Array(layers.keys) {
                guard let budget = budgets[layer], let layerScores = scores[layer],
                    var heads = layers.removeValue(forKey: layer)
                else { continue }
                for h in heads.indices where h < budget.heads.count {
                    let cut = heads[h].tightened(
                        promptLength: m,
                        capacity: budget.heads[h].capacity,
                        scores: layerScores[h]
                    )
                    heads[h] = cut.cache
                    keptScores[layer]![h] = cut.scores
                }
                layers[layer] = heads
            }
            return keptScores
        }
        return storage == .float32 ? cut(&float32) : cut(&float16)
    }

    /// Bytes of K/V payload held, in all and by modality.
    var bytes: (total: Int, byModality: ModalityBytes) {
        func sum<S>(_ layers: [Int: [HeadCache<S>]]) -> (Int, ModalityBytes) {
            var total = 0
            var byModality = ModalityBytes()
            for head in layers.values.joined() {
                total += head.payloadBytes
                byModality += head.payloadBytesByModality
            }
            return (total, byModality)
        }
        return storage == .float32 ? sum(float32) : sum(float16)
    }

    /// How the heads of every layer keep the prompt's `promptLength` rows (a walk over the rows'
    /// positions).
    func headRowShares(promptLength: Int) -> HeadRowShares? {
        HeadRowShares(heads: float32.values.joined(), promptLength: promptLength)
            .merged(with: HeadRowShares(heads: float16.values.joined(), promptLength: promptLength))
    }

    /// Bytes of K/V payload held (cheap: no walk over rows).
    var totalBytes: Int {
        float32.values.joined().reduce(0) { $0 + $1.payloadBytes }
            + float16.values.joined().reduce(0) { $0 + $1.payloadBytes }
    }

    /// Digest of every layer's bytes in layer order, for comparing replicas.
    var digest: UInt64 {
        func fold<S>(_ layers: [Int: [HeadCache<S>]]) -> UInt64 {
            layers.keys.sorted().reduce(0xcbf2_9ce4_8422_2325) { hash, layer in
                layers[layer]!.reduce(hash) { ($0 ^ $1.digest) &* 0x0000_0100_0000_01B3 }
            }
        }
        return storage == .float32 ? fold(float32) : fold(float16)
    }
}

/// The full cache of an audited sequence, kept beside the compressed one so that every decode step
/// can be scored against it: never part of the accounted bytes.
struct AuditCopy: Sendable {
    var full: [Int: [HeadCache<Float>]]
    /// The planted answer of a synthetic sequence, if it has one.
    var needle: Needle?

    var bytes: Int { full.values.joined().reduce(0) { $0 + $1.payloadBytes } }

    /// Appends the step to the full cache of `layer` without scoring it (a replica's share).
    mutating func append(layer: Int, geometry: ModelGeometry, input: DecodeStepInput, position: Int) {
        _ = ShardCache.append(&full, layer: layer, geometry: geometry, input: input, position: position)
    }

    /// Decodes the step on the full cache of `layer` and scores `outputs` (the compressed cache's)
    /// against it, with the needle probes of this layer and step.
    mutating func score(
        layer: Int,
        step: Int,
        geometry g: ModelGeometry,
        input: DecodeStepInput,
        position: Int,
        outputs: [Float],
        into report: inout FidelityReport
    ) {
        guard
            let reference = ShardCache.decode(
                &full,
                layer: layer,
                geometry: g,
                input: input,
                position: position,
                threads: .single
            )
        else { return }
        let d = g.headDim
        for qh in 0..<g.queryHeads {
            report.recordOutput(full: reference[(qh * d)..<(qh * d + d)], compressed: outputs[(qh * d)..<(qh * d + d)])
        }
        guard let needle else { return }
        for probe in needle.probes where probe.layer == layer && probe.step == step {
            report.needleProbes += 1
            if needle.decodeAnswer(output: Array(outputs[(probe.queryHead * d)..<(probe.queryHead * d + d)]))
                == needle.answer
            {
                report.needleCorrect += 1
            }
        }
    }
}
