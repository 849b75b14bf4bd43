import Testing

@testable import KVCacheCore

/// Properties that must hold for every policy over many seeds.
@Suite struct InvariantTests {
    static let policies = CompressionPolicy.allNames

    /// Kept rows equal the head's capacity (AdaKV: the layer's total, split its own way), positions
    /// ascend, and every row carries its prompt modality.
    @Test(arguments: policies)
    func keptRowsMatchBudgetsAndAscend(name: String) throws {
        let policy = try CompressionPolicy.named(name)
        let g = geometry(layers: 3, queryHeads: 4, kvHeads: 2, headDim: 16)
        for seed in UInt64(1)...6 {
            let m = 60 + Int(seed) * 7
            let l = layout(m: m, textBefore: 5, visual: m / 2)
            for retention in [0.1, 0.3, 0.7] {
                let run = try compressAll(g, m: m, layout: l, policy: policy, retention: retention, seed: seed)
                for (layer, heads) in run.heads.enumerated() {
                    let capacities = run.budgets[layer].heads.map { min(m, $0.capacity) }
                    if policy.name == "adakv" {
                        #expect(
                            heads.map(\.count).reduce(0, +) == capacities.reduce(0, +),
                            "seed \(seed) adakv α \(retention) layer \(layer): the layer's total"
                        )
                    }
                    for (h, head) in heads.enumerated() {
                        let positions = head.positions.map(Int.init)
                        #expect(
                            positions == positions.sorted() && Set(positions).count == positions.count,
                            "seed \(seed) \(policy.name) layer \(layer) head \(h): positions not ascending"
                        )
                        if policy.name != "adakv" {
                            #expect(
                                head.count == capacities[h],
                                "seed \(seed) \(policy.name) α \(retention) layer \(layer) head \(h)"
                            )
                        }
                        #expect(positions.allSatisfy { head.tags[positions.firstIndex(of: $0)!] == l.tags[$0] })
                    }
                }
            }
        }
    }

    /// Uniform-budget methods keep round(α·m) per head; MadaKV and VL-Cache (largest remainder) keep
    /// the exact total across layers.
    @Test func totalsMatchTheRetention() throws {
        let g = geometry(layers: 4, queryHeads: 4, kvHeads: 2, headDim: 16)
        let m = 200
        let l = layout(m: m, textBefore: 10, visual: 120)
        for seed in UInt64(1)...4 {
            for name in ["streaming-llm", "h2o", "snapkv", "look-m"] {
                let run = try compressAll(g, m: m, layout: l, policy: try .named(name), retention: 0.2, seed: seed)
                #expect(run.heads.joined().allSatisfy { $0.count == 40 }, "seed \(seed) \(name)")
            }
            let mada = try compressAll(g, m: m, layout: l, policy: .madaKV(.init()), retention: 0.2, seed: seed)
            #expect(mada.heads.joined().reduce(0) { $0 + $1.count } == 40 * 4 * 2, "seed \(seed) madakv")
            var exact = VLCacheSettings()
            exact.apportionment = .largestRemainder
            let vl = try compressAll(g, m: m, layout: l, policy: .vlCache(exact), retention: 0.2, seed: seed)
            #expect(vl.heads.joined().reduce(0) { $0 + $1.count } == 40 * 4 * 2, "seed \(seed) vl-cache")
        }
    }

    /// The full cache reproduces itself exactly, and a larger budget is not worse on average.
    @Test(arguments: policies)
    func fidelityImprovesWithBudget(name: String) throws {
        let policy = try CompressionPolicy.named(name)
        let g = geometry(layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16)
        var errors: [Double: Double] = [:]
        for seed in UInt64(1)...5 {
            let m = 80
            let l = layout(m: m, textBefore: 6, visual: 50)
            for retention in [0.1, 0.5] {
                let run = try compressAll(g, m: m, layout: l, policy: policy, retention: retention, seed: seed)
                var rng = SeededGenerator(seed: seed &* 31)
                for layer in 0..<g.layers {
                    let full = try LayerCompressor.compress(
                        run.prefills[layer],
                        layout: l,
                        profile: nil,
                        budget: LayerBudget(layer: layer, heads: Array(repeating: HeadBudget(capacity: m), count: 2)),
                        policy: .full,
                        as: Float.self
                    ).heads
                    var compressed = run.heads[layer]
                    let steps = try (0..<4).map { _ in
                        try DecodeStepInput(
                            geometry: g,
                            keys: rng.floats(2 * 16),
                            values: rng.floats(2 * 16),
                            queries: rng.floats(4 * 16, scale: 3)
                        )
                    }
                    let reference = DecodeReference(geometry: g, promptLength: m, full: full, steps: steps)
                    let report = FidelityEvaluator.evaluate(
                        geometry: g,
                        reference: reference,
                        compressed: &compressed,
                        steps: steps
                    )
                    errors[retention, default: 0] += report.outputError
                    if case .full = policy {
                        #expect(report.outputError == 0, "seed \(seed)")
                        #expect(report.hitRate == 1 && report.massRecall > 0.9999, "seed \(seed)")
                    }
                }
            }
        }
        #expect(errors[0.5]! <= errors[0.1]!, "\(policy.name): error at 50% \(errors[0.5]!) > at 10% \(errors[0.1]!)")
    }

    @Test func compressionIsDeterministic() throws {
        let g = geometry()
        let l = layout(m: 90, textBefore: 4, visual: 60)
        for name in CompressionPolicy.allNames {
            let a = try compressAll(g, m: 90, layout: l, policy: try .named(name), retention: 0.2, seed: 42)
            let b = try compressAll(g, m: 90, layout: l, policy: try .named(name), retention: 0.2, seed: 42)
            #expect(a.heads.joined().map(\.digest) == b.heads.joined().map(\.digest), "\(name)")
        }
    }

    /// A Float32 head kept whole takes the prefill's arrays, and its decoded rows go into the room
    /// they were made with: the prompt's rows are never copied. Other heads get arrays of their own.
    @Test func aHeadKeptWholeAdoptsThePrefillArraysAndAppendsInPlace() throws {
        let g = geometry()
        let (m, spare, d) = (24, 3, g.headDim)
        var rng = SeededGenerator(seed: 31)
        func heads() -> [[Float]] {
            (0..<g.kvHeads).map { _ in
                let rows = rng.floats(m * d)
                return LayerPrefill.headArray(rows: m, spareRows: spare, headDim: d) {
                    $0.update(from: rows, count: m * d)
                }
            }
        }
        func address(_ array: [Float]) -> UnsafePointer<Float>? { array.withUnsafeBufferPointer(\.baseAddress) }
        var prefill: LayerPrefill? = try LayerPrefill(
            geometry: g,
            promptLength: m,
            keys: heads(),
            values: heads(),
            queries: [],
            queryRows: 0,
            checkedFinite: false
        )
        let prompt = prefill!.keys[0].map { $0 }  // a copy: a reference would make the append copy
        let keyAddresses = prefill!.keys.map(address)
        let valueAddresses = prefill!.values.map(address)
        // Head 0 keeps every row, head 1 all but the first.
        let budget = LayerBudget(layer: 0, heads: [HeadBudget(capacity: m), HeadBudget(capacity: m - 1)])
        func compress(adopting: Bool) throws -> LayerCompressor.Result<Float> {
            try LayerCompressor.compress(
                prefill!,
                layout: layout(m: m, textBefore: 4, visual: 16),
                profile: nil,
                budget: budget,
                policy: .streamingLLM(StreamingLLMSettings()),
                decodeRows: spare,
                adoptWholeHeads: adopting,
                as: Float.self
            )
        }
        let copied = try compress(adopting: false)
        #expect(address(copied.heads[0].keys) != keyAddresses[0])
        #expect(copied.heads[0].keys == prefill!.keys[0])
        var result = try compress(adopting: true)
        prefill = nil
        #expect(address(result.heads[0].keys) == keyAddresses[0])
        #expect(address(result.heads[0].values) == valueAddresses[0])
        #expect(address(result.heads[1].keys) != keyAddresses[1])
        let row = [Float](repeating: 0.25, count: d)
        for t in 0..<spare { result.heads[0].append(key: row, value: row, position: m + t, tag: .text) }
        #expect(address(result.heads[0].keys) == keyAddresses[0], "a decoded row copied the head")
        #expect(address(result.heads[0].values) == valueAddresses[0], "a decoded row copied the head")
        #expect(Array(result.heads[0].keys.prefix(m * d)) == prompt)
        #expect(result.heads[0].positions == (0..<Int32(m + spare)).map { $0 })
        #expect(result.heads[1].count == m - 1)
    }

    @Test func byteAccountingIsExact() {
        var f32 = HeadCache<Float>(headDim: 128)
        var f16 = HeadCache<Float16>(headDim: 128)
        let row = [Float](repeating: 0.5, count: 128)
        for p in 0..<10 {
            f32.append(key: row, value: row, position: p, tag: .text)
            f16.append(key: row, value: row, position: p, tag: ModalityTag(.image(2)))
        }
        #expect(f32.payloadBytes == 10 * 128 * 2 * 4)
        #expect(f16.payloadBytes == 10 * 128 * 2 * 2)
        #expect(f32.metadataBytes == 10 * 8)
        #expect(f16.tags[3].modality == .image(2))
        #expect(
            f32.keys.count * MemoryLayout<Float>.size + f32.values.count * MemoryLayout<Float>.size
                == f32.payloadBytes
        )
    }

    @Test func bytesAreAccountedPerModality() {
        let tags = [ModalityTag.text, ModalityTag(.image(0)), ModalityTag(.image(3)), ModalityTag(.videoFrame(1))]
        #expect(ModalityBytes(tags, rowBytes: 10) == ModalityBytes(text: 10, image: 20, video: 10))
        var head = HeadCache<Float16>(headDim: 8)
        for tag in tags {
            head.append(
                key: [Float](repeating: 1, count: 8),
                value: [Float](repeating: 1, count: 8),
                position: 0,
                tag: tag
            )
        }
        #expect(head.payloadBytesByModality == ModalityBytes(text: 32, image: 64, video: 32))
        #expect(head.payloadBytesByModality.total == head.payloadBytes)
    }

    @Test func modalityTagsRoundTrip() {
        for modality in [Modality.text, .image(0), .image(77), .videoFrame(31)] {
            #expect(ModalityTag(modality).modality == modality)
            #expect(ModalityTag(modality).isVisual == modality.isVisual)
        }
        #expect(throws: KVCacheError.self) {
            try PromptLayout(spans: [
                ModalitySpan(.text, start: 0, count: 3), ModalitySpan(.image(0), start: 4, count: 2),
            ])
        }
    }
}
