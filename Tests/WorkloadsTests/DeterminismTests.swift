import KVCacheCore
import KVKernels
import Testing

@testable import Workloads

/// Every (sequence, layer) is a pure function of the generator's inputs, whatever else was expanded
/// before, so cluster workers can expand their own layers from a seed.
@Suite struct DeterminismTests {
    @Test(arguments: [WorkloadPreset.imageQA, .video, .mixed])
    func sameSeedGivesIdenticalFloats(preset: WorkloadPreset) {
        let seed: UInt64 = 0xDEC0DE
        let settings = smallSettings(decodeSteps: 6)
        let a = TraceGenerator(preset: preset, geometry: .tiny, settings: settings, seed: seed)
        let b = TraceGenerator(preset: preset, geometry: .tiny, settings: settings, seed: seed)
        for index in [0, 3] {
            let ta = a.sequence(index)
            let tb = b.sequence(index)
            #expect(ta.layout == tb.layout && ta.seed == tb.seed && ta.targetSparsity == tb.targetSparsity)
            #expect(ta.needle == tb.needle, "seed \(seed) #\(index): needles differ")
            for layer in [0, 4] {
                let pa = ta.prefill(layer: layer)
                let pb = tb.prefill(layer: layer)
                #expect(
                    pa.keys == pb.keys && pa.values == pb.values && pa.queries == pb.queries,
                    "seed \(seed) #\(index) layer \(layer): prefill differs"
                )
                let da = ta.decode(layer: layer)
                let db = tb.decode(layer: layer)
                #expect(da.count == db.count)
                #expect(
                    zip(da, db).allSatisfy { $0.keys == $1.keys && $0.values == $1.values && $0.queries == $1.queries },
                    "seed \(seed) #\(index) layer \(layer): decode differs"
                )
            }
        }
    }

    /// The floats themselves are pinned: making synthesis faster must not change a trace, since
    /// evaluation figures, needle accuracy and every recorded load test were measured on these bits.
    @Test func synthesisedFloatsArePinned() {
        let settings = smallSettings(decodeSteps: 5)
        let generator = TraceGenerator(preset: .mixed, geometry: .tiny, settings: settings, seed: 4242)
        var digest: UInt64 = 0
        func mix(_ floats: [Float]) { digest = floats.withUnsafeBytes { kvk_digest(digest, $0.baseAddress, $0.count) } }
        var presets: Set<WorkloadPreset> = []
        for index in 0..<6 {
            let trace = generator.sequence(index)
            presets.insert(trace.preset)
            for layer in [0, 3] {
                let (prefill, decode) = trace.layerTrace(layer, firstQueryRow: trace.promptLength / 3)
                let keys = LayerPrefill.contiguous(prefill.keys)
                for tensor in [keys, LayerPrefill.contiguous(prefill.values), prefill.queries] { mix(tensor) }
                for step in decode { for tensor in [step.keys, step.values, step.queries] { mix(tensor) } }
            }
        }
        #expect(presets.count >= 3, "the sequences should cover several presets, got \(presets)")
        #expect(digest == 0x7856_8eb2_fe03_9c07, "synthesised floats changed: digest \(String(digest, radix: 16))")
    }

    @Test func aLayerRegeneratedAloneEqualsTheSameLayerFromAFullPass() {
        let seed: UInt64 = 31337
        let settings = smallSettings(decodeSteps: 8)
        let full = TraceGenerator(preset: .imageQA, geometry: .tiny, settings: settings, seed: seed)
        // A full pass: sequences 0...1, every layer in order, prefill and decode together.
        var seen: [(LayerPrefill, [DecodeStepInput])] = []
        for index in 0...1 {
            let trace = full.sequence(index)
            for layer in 0..<ModelGeometry.tiny.layers {
                let expanded = trace.layerTrace(layer)
                if index == 1 && layer == 4 { seen.append(expanded) }
            }
        }
        // A fresh generator (as on another worker) expanding only sequence 1, layer 4, decode first.
        let alone = TraceGenerator(preset: .imageQA, geometry: .tiny, settings: settings, seed: seed).sequence(1)
        let decode = alone.decode(layer: 4)
        let prefill = alone.prefill(layer: 4)
        let (fullPrefill, fullDecode) = seen[0]
        #expect(prefill.keys == fullPrefill.keys, "seed \(seed): keys differ")
        #expect(prefill.values == fullPrefill.values, "seed \(seed): values differ")
        #expect(prefill.queries == fullPrefill.queries, "seed \(seed): queries differ")
        #expect(
            decode.map(\.keys) == fullDecode.map(\.keys) && decode.map(\.queries) == fullDecode.map(\.queries)
                && decode.map(\.values) == fullDecode.map(\.values),
            "seed \(seed): decode differs"
        )
    }

    /// A worker synthesises only the query rows its policy observes: those rows, the keys and the
    /// values must be the same bits as in a full prefill, wherever the first row falls (before the
    /// image, inside it, at and after the post-vision start, inside a 32-normal block or on its edge).
    @Test(arguments: [WorkloadPreset.imageQA, .multiImage, .mixed])
    func queryRowsFromASuffixEqualTheFullPrefill(preset: WorkloadPreset) {
        let seed: UInt64 = 77
        let trace = TraceGenerator(preset: preset, geometry: .tiny, settings: smallSettings(decodeSteps: 2), seed: seed)
            .sequence(2)
        let m = trace.layout.promptLength
        let v = trace.layout.postVisionStart
        let full = trace.prefill(layer: 3)
        let d = ModelGeometry.tiny.headDim
        for first in Set([0, 1, 5, v - 1, v, v + 3, m / 2, m - 1, m].filter { (0...m).contains($0) }) {
            let partial = trace.layerTrace(3, firstQueryRow: first).prefill
            #expect(partial.keys == full.keys && partial.values == full.values, "seed \(seed) first \(first)")
            #expect(partial.firstQueryRow == first)
            for head in 0..<ModelGeometry.tiny.queryHeads {
                for row in first..<m {
                    let got = partial.queries[
                        partial.queryOffset(head: head, row: row)..<(partial.queryOffset(head: head, row: row) + d)
                    ]
                    let want = full.queries[
                        full.queryOffset(head: head, row: row)..<(full.queryOffset(head: head, row: row) + d)
                    ]
                    #expect(got.elementsEqual(want), "seed \(seed) \(preset) first \(first) head \(head) row \(row)")
                }
            }
        }
    }

    @Test func differentSeedsAndIndicesGiveDifferentTraces() {
        let settings = smallSettings()
        let a = TraceGenerator(preset: .imageQA, geometry: .tiny, settings: settings, seed: 1)
        let b = TraceGenerator(preset: .imageQA, geometry: .tiny, settings: settings, seed: 2)
        #expect(a.sequence(0).prefill(layer: 1).keys != b.sequence(0).prefill(layer: 1).keys)
        #expect(a.sequence(0).seed != a.sequence(1).seed)
        let trace = a.sequence(0)
        #expect(trace.prefill(layer: 1).keys != trace.prefill(layer: 2).keys, "layers must not share streams")
    }

    @Test func shapesMatchTheGeometry() {
        let geometry = ModelGeometry.tiny
        let trace = TraceGenerator(
            preset: .video,
            geometry: geometry,
            settings: smallSettings(decodeSteps: 5),
            seed: 12
        )
        .sequence(0)
        let prefill = trace.prefill(layer: 0)
        let m = trace.promptLength
        #expect(prefill.promptLength == m && prefill.queryRows == m && prefill.firstQueryRow == 0)
        #expect(prefill.keys.count == geometry.kvHeads && prefill.values.count == geometry.kvHeads)
        #expect((prefill.keys + prefill.values).allSatisfy { $0.count == m * geometry.headDim })
        // Room for the decode steps, which a head kept whole appends in place.
        #expect((prefill.keys + prefill.values).allSatisfy { $0.capacity >= (m + 5) * geometry.headDim })
        #expect(prefill.queries.count == geometry.queryHeads * m * geometry.headDim)
        let decode = trace.decode(layer: 0)
        #expect(decode.count == 5)
        #expect(decode.allSatisfy { $0.queries.count == geometry.queryHeads * geometry.headDim })
    }

    /// The bulk normal source: moments of a standard normal, and the same bits for the same seed.
    @Test func normalStreamIsStandardNormal() {
        let seed: UInt64 = 2024
        var stream = NormalStream(seed: seed)
        let samples = stream.normals(200_000)
        let m1 = mean(samples.map(Double.init))
        let m2 = mean(samples.map { Double($0 * $0) })
        let m4 = mean(samples.map { Double($0 * $0 * $0 * $0) })
        #expect(abs(m1) < 0.01, "seed \(seed): mean \(m1)")
        #expect(abs(m2 - 1) < 0.02, "seed \(seed): variance \(m2)")
        #expect(abs(m4 - 3) < 0.1, "seed \(seed): fourth moment \(m4)")
        let tail = Double(samples.filter { abs($0) > 3 }.count) / Double(samples.count)
        #expect(abs(tail - 0.0027) < 0.0008, "seed \(seed): P(|Z| > 3) = \(tail)")
        var again = NormalStream(seed: seed)
        #expect(again.normals(1000) == Array(samples.prefix(1000)))
    }

    @Test func deterministicMathMatchesKnownValues() {
        #expect(abs(DeterministicMath.exp(1) - 2.718_281_828_459_045) < 1e-14)
        #expect(abs(DeterministicMath.log(10) - 2.302_585_092_994_046) < 1e-14)
        #expect(abs(DeterministicMath.sinCosTwoPi(0.125).sin - 0.5.squareRoot()) < 1e-14)
        #expect(abs(DeterministicMath.cosTwoPi(1.0 / 3) + 0.5) < 1e-14)
        #expect(abs(DeterministicMath.normalUpperTail(1.959_963_985) - 0.025) < 1e-6)
        #expect(abs(DeterministicMath.normalQuantile(0.975) - 1.959_963_985) < 1e-6)
        #expect(abs(NormalTailTable.upperTail(-0.5) - DeterministicMath.normalUpperTail(-0.5)) < 1e-6)
        for u in (0..<16).map({ (Float($0) + 0.5) / 16 }) {
            var sine: Float = 0
            var cosine: Float = 0
            kvk_lane_sin_cos_two_pi(u, &sine, &cosine)
            let angle = DeterministicMath.sinCosTwoPi(Double(u))
            #expect(abs(Double(sine) - angle.sin) < 1e-6 && abs(Double(cosine) - angle.cos) < 1e-6)
            #expect(abs(Double(kvk_lane_log(u)) - DeterministicMath.log(Double(u))) < 1e-6)
            let root = kvk_lane_sqrt(u)
            #expect(abs(Double(root * root) - Double(u)) < 1e-6)
        }
    }
}
