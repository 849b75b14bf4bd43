import KVCacheCore
import Testing
import Workloads

/// The needle is readable from a full cache and not once its rows are gone.
@Suite struct NeedleTests {
    struct Outcome {
        var right = 0
        var rightWithoutNeedle = 0
        var total = 0
    }

    /// Decodes every probe of a trace from the full cache (prompt plus decoded rows), and again with
    /// the needle's rows masked out.
    static func probe(_ trace: SequenceTrace) throws -> Outcome {
        let needle = try #require(trace.needle)
        let geometry = trace.geometry
        let d = geometry.headDim
        let m = trace.promptLength
        var outcome = Outcome()
        for (layer, probes) in Dictionary(grouping: needle.probes, by: \.layer) {
            let (prefill, decode) = trace.layerTrace(layer)
            for probe in probes {
                let cache = FullCacheHead(
                    prefill: prefill,
                    decode: decode,
                    kvHead: probe.queryHead / geometry.groupSize
                )
                let query = decode[probe.step].queries[probe.queryHead * d..<(probe.queryHead + 1) * d]
                let rows = m + probe.step + 1
                let full = cache.attend(query: query, rows: rows)
                let dropped = cache.attend(query: query, rows: rows, skipping: Set(needle.positions))
                outcome.total += 1
                if needle.decodeAnswer(output: full.output) == needle.answer { outcome.right += 1 }
                if needle.decodeAnswer(output: dropped.output) == needle.answer { outcome.rightWithoutNeedle += 1 }
            }
        }
        return outcome
    }

    /// Pooled over presets (a few retrieval heads per tiny model make single traces lumpy):
    /// at least 95% of probes decode the planted answer from the full cache, and without the
    /// needle's rows the answer is near chance.
    @Test func fullCacheReadsTheNeedle() throws {
        let seed: UInt64 = 41
        var pooled = Outcome()
        for preset in [WorkloadPreset.imageQA, .multiImage, .video, .document] {
            let settings = smallSettings(textScale: preset == .document ? 0.15 : 0.5)
            let generator = TraceGenerator(preset: preset, geometry: .tiny, settings: settings, seed: seed)
            var total = Outcome()
            for index in 0..<2 {
                let outcome = try Self.probe(generator.sequence(index))
                total.right += outcome.right
                total.rightWithoutNeedle += outcome.rightWithoutNeedle
                total.total += outcome.total
            }
            try #require(total.total > 0, "seed \(seed) \(preset.rawValue): no probes")
            let accuracy = Double(total.right) / Double(total.total)
            #expect(
                accuracy >= 0.85,
                "seed \(seed) \(preset.rawValue): full-cache accuracy \(accuracy) over \(total.total)"
            )
            pooled.right += total.right
            pooled.rightWithoutNeedle += total.rightWithoutNeedle
            pooled.total += total.total
        }
        let accuracy = Double(pooled.right) / Double(pooled.total)
        let blind = Double(pooled.rightWithoutNeedle) / Double(pooled.total)
        #expect(accuracy >= 0.95, "seed \(seed): full-cache accuracy \(accuracy) over \(pooled.total) probes")
        #expect(blind < 0.35, "seed \(seed): accuracy without the needle \(blind)")
    }

    @Test func probesCoverEveryRetrievalHeadEveryFourthStep() throws {
        let seed: UInt64 = 43
        let generator = TraceGenerator(preset: .imageQA, geometry: .tiny, settings: smallSettings(), seed: seed)
        let trace = generator.sequence(0)
        let needle = try #require(trace.needle)
        let geometry = trace.geometry
        var retrievalHeads = 0
        for layer in 0..<geometry.layers {
            for head in 0..<geometry.queryHeads where trace.isRetrievalHead(layer: layer, queryHead: head) {
                retrievalHeads += 1
                #expect(layer >= geometry.layers / 2, "seed \(seed): retrieval head in the lower half")
                let steps = needle.probes.filter { $0.layer == layer && $0.queryHead == head }.map(\.step)
                #expect(steps == [3, 7, 11, 15, 19, 23, 27, 31], "seed \(seed): layer \(layer) head \(head)")
            }
        }
        #expect(retrievalHeads >= 1)
        #expect(needle.probes.count == retrievalHeads * 8)
        // Codes are unit vectors and decode to themselves.
        for answer in 0..<needle.answerCount {
            let code = Array(needle.code(answer))
            #expect(abs(code.reduce(0) { $0 + $1 * $1 } - 1) < 1e-4)
            #expect(needle.decodeAnswer(output: code) == answer)
        }
    }

    @Test func retrievalHeadsAreAboutAQuarterOfTheUpperHalf() {
        let geometry = ModelGeometry.llava15_7b
        var total = 0
        var retrieval = 0
        for seed in UInt64(1)...4 {
            let generator = TraceGenerator(preset: .imageQA, geometry: geometry, seed: seed)
            for layer in 0..<geometry.layers {
                for head in 0..<geometry.queryHeads {
                    let isRetrieval = generator.isRetrievalHead(layer: layer, queryHead: head)
                    if layer < geometry.layers / 2 {
                        #expect(!isRetrieval)
                    } else {
                        total += 1
                        if isRetrieval { retrieval += 1 }
                    }
                }
            }
        }
        let share = Double(retrieval) / Double(total)
        #expect(abs(share - 0.25) < 0.05, "retrieval share of upper-half heads \(share)")
    }
}
