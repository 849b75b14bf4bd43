import KVCacheCore
import Testing

@testable import Workloads

/// The papers' observations, measured on generated traces with full attention.
@Suite struct AttentionStructureTests {
    /// Measured VL-Cache sparsity of post-vision rows lands within ±0.08 of the target on average:
    /// per layer over a mix of presets, and per trace over layers.
    @Test func measuredSparsityTracksTheTarget() {
        let seed: UInt64 = 11
        let layers = ModelGeometry.tiny.layers
        var measured = [[Double]](repeating: [], count: layers)
        var targets = [[Double]](repeating: [], count: layers)
        // Image-qa prompts are the shortest, so they get more sequences.
        for (preset, sequences) in [(WorkloadPreset.imageQA, 3), (.multiImage, 1), (.video, 1), (.document, 2)] {
            let settings = smallSettings(textScale: preset == .document ? 0.15 : 0.5, decodeSteps: 0)
            let generator = TraceGenerator(preset: preset, geometry: .tiny, settings: settings, seed: seed)
            for index in 0..<sequences {
                let stats = WorkloadStatistics.measure(generator.sequence(index), maxPostVisionRows: 64)
                var traceError = 0.0
                for layer in stats.layers {
                    measured[layer.layer].append(layer.sparsity)
                    targets[layer.layer].append(layer.targetSparsity)
                    traceError += abs(layer.sparsity - layer.targetSparsity)
                }
                traceError /= Double(layers)
                #expect(traceError < 0.08, "seed \(seed) \(preset.rawValue) #\(index): mean |γ − target| \(traceError)")
            }
        }
        for layer in 0..<layers {
            let error = mean(measured[layer]) - mean(targets[layer])
            #expect(
                abs(error) < 0.08,
                "seed \(seed) layer \(layer): measured \(mean(measured[layer])) target \(mean(targets[layer]))"
            )
        }
    }

    /// VL-Cache: the first two layers are dense, the rest sparse, and sparsity is not monotonic in
    /// depth (unlike PyramidKV's schedule).
    @Test(arguments: [UInt64(1), 2, 3])
    func firstLayersAreDenseAndSparsityIsNotMonotonic(seed: UInt64) {
        let geometry = ModelGeometry.tiny
        let generator = TraceGenerator(
            preset: .imageQA,
            geometry: geometry,
            settings: smallSettings(decodeSteps: 0),
            seed: seed
        )
        let stats = WorkloadStatistics.measure(generator.sequence(0))
        let sparsity = stats.layers.map(\.sparsity)
        let later = sparsity[2...].sorted()
        let median = later[later.count / 2]
        #expect(sparsity[0] < median && sparsity[1] < median, "seed \(seed): sparsity \(sparsity)")
        let steps = zip(sparsity, sparsity.dropFirst()).map { $1 - $0 }
        #expect(steps.contains { $0 > 0 } && steps.contains { $0 < 0 }, "seed \(seed): monotonic \(sparsity)")

        // The model curve itself, for a deep model: dense start, sparse range, rises and falls.
        let deep = TraceGenerator(preset: .imageQA, geometry: .llava15_7b, seed: seed).modelSparsity
        #expect(deep[0] <= 0.5 && deep[1] <= 0.5 && deep[2...].allSatisfy { (0.7...0.99).contains($0) })
        let deepSteps = zip(deep[2...], deep[3...]).map { $1 - $0 }
        #expect(deepSteps.contains { $0 > 0 } && deepSteps.contains { $0 < 0 }, "seed \(seed): \(deep)")
    }

    /// VL-Cache's CacheHitRate observation: the top-k keys of post-vision rows' accumulated
    /// attention overlap the first decode step's top-k more than the top-k of all rows' column sums
    /// (H2O), at k = 10% of the prompt.
    @Test func postVisionAttentionPredictsDecodeBetterThanAllRows() {
        let seed: UInt64 = 21
        var postVisionHits: [Double] = []
        var allRowHits: [Double] = []
        // Image-qa keeps the all-rows attention affordable in debug builds.
        for preset in [WorkloadPreset.imageQA] {
            let generator = TraceGenerator(
                preset: preset,
                geometry: .tiny,
                settings: smallSettings(decodeSteps: 1),
                seed: seed
            )
            for index in 0..<4 {
                let trace = generator.sequence(index)
                let m = trace.promptLength
                let v = trace.layout.postVisionStart
                let k = max(1, m / 10)
                for layer in 0..<trace.geometry.layers {
                    let (prefill, decode) = trace.layerTrace(layer)
                    for head in 0..<trace.geometry.queryHeads {
                        let kv = head / trace.geometry.groupSize
                        let attention = PrefillAttention(prefill: prefill, head: head)
                        let cache = FullCacheHead(prefill: prefill, decode: decode, kvHead: kv)
                        let d = trace.geometry.headDim
                        let firstStep = cache.attend(query: decode[0].queries[head * d..<(head + 1) * d], rows: m + 1)
                        let truth = topK(firstStep.p.prefix(m).map(Double.init), k)
                        let postVision = topK(attention.columnSums(rows: v..<m), k)
                        let allRows = topK(attention.columnSums(rows: 0..<m), k)
                        postVisionHits.append(Double(truth.intersection(postVision).count) / Double(k))
                        allRowHits.append(Double(truth.intersection(allRows).count) / Double(k))
                    }
                }
            }
        }
        let post = mean(postVisionHits)
        let all = mean(allRowHits)
        #expect(post > all + 0.1, "seed \(seed): post-vision hit rate \(post), all-row hit rate \(all)")
    }

    /// MadaKV: heads prefer a modality. Among sparse layers some heads put most of their
    /// post-vision attention on image keys and others on text, following the drawn preference.
    @Test func imageAndTextPreferringHeadsBothExist() {
        let seed: UInt64 = 5
        var shares: [Double] = []
        var preferences: [Double] = []
        for index in 0..<3 {
            let trace = TraceGenerator(
                preset: .imageQA,
                geometry: .tiny,
                settings: smallSettings(decodeSteps: 0),
                seed: seed
            )
            .sequence(index)
            let stats = WorkloadStatistics.measure(trace)
            for layer in stats.layers where layer.layer >= 2 {
                for (head, share) in layer.headImageShares.enumerated() {
                    shares.append(share)
                    preferences.append(trace.headPreference(layer: layer.layer, queryHead: head))
                }
            }
        }
        #expect(shares.contains { $0 > 0.75 }, "seed \(seed): no image-preferring head in \(shares)")
        #expect(shares.contains { $0 < 0.3 }, "seed \(seed): no text-preferring head in \(shares)")
        // The measured share follows the drawn preference (loosely: bulk attention, mostly on the
        // image here, and GQA groups sharing most of their salient keys blur it).
        let mp = mean(preferences)
        let ms = mean(shares)
        let covariance = zip(preferences, shares).reduce(0) { $0 + ($1.0 - mp) * ($1.1 - ms) }
        let sp = preferences.reduce(0) { $0 + ($1 - mp) * ($1 - mp) }.squareRoot()
        let ss = shares.reduce(0) { $0 + ($1 - ms) * ($1 - ms) }.squareRoot()
        let correlation = covariance / (sp * ss)
        #expect(correlation > 0.3, "seed \(seed): preference/share correlation \(correlation)")
    }

    /// Neighbouring image patches have similar keys and values; distant patches of the same image
    /// (three or more cells apart) much less so.
    @Test(arguments: [WorkloadPreset.imageQA, .video])
    func neighbouringPatchesAreMoreSimilarThanDistantOnes(preset: WorkloadPreset) {
        let seed: UInt64 = 17
        let trace = TraceGenerator(preset: preset, geometry: .tiny, settings: smallSettings(decodeSteps: 0), seed: seed)
            .sequence(0)
        let prefill = trace.prefill(layer: 3)
        let d = trace.geometry.headDim
        for (tensor, name) in [(prefill.keys, "keys"), (prefill.values, "values")] {
            var neighbours: [Double] = []
            var distant: [Double] = []
            for kv in 0..<trace.geometry.kvHeads {
                func row(_ j: Int) -> ArraySlice<Float> {
                    tensor[kv][(j * d)..<(j * d + d)]
                }
                for span in trace.layout.spans where span.modality.isVisual {
                    let width = PromptPlanner.grid(tokens: span.count).width
                    for i in 0..<span.count {
                        for j in i + 1..<span.count {
                            let dx = abs(i % width - j % width)
                            let dy = abs(i / width - j / width)
                            let similarity = cosine(row(span.start + i), row(span.start + j))
                            if dx + dy == 1 { neighbours.append(similarity) }
                            if max(dx, dy) >= 3 { distant.append(similarity) }
                        }
                    }
                }
            }
            let near = mean(neighbours)
            let far = mean(distant)
            #expect(
                near > 0.45 && near > far + 0.25,
                "seed \(seed) \(preset.rawValue) \(name): neighbour cosine \(near), distant pairs \(far)"
            )
        }
    }

    /// Visual query rows spread their attention; post-vision rows concentrate it.
    @Test func visualRowsAreFlatterThanPostVisionRows() {
        let seed: UInt64 = 23
        let trace = TraceGenerator(
            preset: .imageQA,
            geometry: .tiny,
            settings: smallSettings(decodeSteps: 0),
            seed: seed
        )
        .sequence(0)
        let v = trace.layout.postVisionStart
        let visualRows = trace.layout.spans.first { $0.modality.isVisual }!
        var visualMax: [Double] = []
        var postVisionMax: [Double] = []
        for layer in 2..<trace.geometry.layers {
            let prefill = trace.prefill(layer: layer)
            for head in 0..<trace.geometry.queryHeads {
                let attention = PrefillAttention(prefill: prefill, head: head)
                // The largest non-sink weight, scaled by the row length so rows of any length compare.
                func peak(_ q: Int) -> Double { Double(attention.row(q)[1...].max()!) * Double(q + 1) }
                visualMax.append(mean((visualRows.end - 8..<visualRows.end).map(peak)))
                postVisionMax.append(mean((v..<trace.promptLength).map(peak)))
            }
        }
        #expect(
            mean(postVisionMax) > 2 * mean(visualMax),
            "seed \(seed): post-vision peak \(mean(postVisionMax)), visual peak \(mean(visualMax))"
        )
    }
}
