/// A layer's key and value rows in Float32, with LOOK-M's merging applied in place to the kept ones.
struct MergedRows {
    let prefill: LayerPrefill
    /// Rows that merging changed, by head and position; untouched rows are read from the prefill.
    private var changedKeys: [[Int: [Float]]]
    private var changedValues: [[Int: [Float]]]

    init(prefill: LayerPrefill) {
        self.prefill = prefill
        changedKeys = Array(repeating: [:], count: prefill.geometry.kvHeads)
        changedValues = changedKeys
    }

    func withRow(head: Int, position: Int, _ body: (UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>) -> Void) {
        let d = prefill.geometry.headDim
        let offset = prefill.kvOffset(head: head, position: position)
        func row(_ changed: [Float]?, _ original: [Float], _ next: (UnsafeBufferPointer<Float>) -> Void) {
            if let changed {
                changed.withUnsafeBufferPointer(next)
            } else {
                original.withUnsafeBufferPointer { next(UnsafeBufferPointer(rebasing: $0[offset..<(offset + d)])) }
            }
        }
        row(changedKeys[head][position], prefill.keys) { key in
            row(changedValues[head][position], prefill.values) { value in body(key, value) }
        }
    }

    /// LOOK-M Eq. 9–12: every evicted row joins the kept row whose key is most cosine-similar, and each
    /// kept row becomes the mean of itself and its (mode-transformed) joiners. Returns rows merged.
    mutating func merge(kept: [[Int]], mode: LookMSettings.Merge, filterBelowMean: Bool) -> Int {
        let g = prefill.geometry
        let m = prefill.promptLength
        let d = g.headDim
        struct Match {
            var evicted: Int
            var pivot: Int
            var similarity: Float
        }
        var matches: [[Match]] = []
        prefill.keys.withUnsafeBufferPointer { keys in
            let keys = keys.baseAddress!
            for h in 0..<g.kvHeads {
                var inverseNorm = [Float](repeating: 0, count: m)
                for j in 0..<m {
                    let row = keys + prefill.kvOffset(head: h, position: j)
                    inverseNorm[j] = 1 / max(Kernels.dot(row, row, count: d).squareRoot(), 1e-12)
                }
                var isKept = [Bool](repeating: false, count: m)
                for c in kept[h] { isKept[c] = true }
                var headMatches: [Match] = []
                for e in 0..<m where !isKept[e] {
                    let row = keys + prefill.kvOffset(head: h, position: e)
                    var best = Match(evicted: e, pivot: -1, similarity: -.infinity)
                    for c in kept[h] {
                        let similarity = Kernels.dot(row, keys + prefill.kvOffset(head: h, position: c), count: d)
                            * inverseNorm[e] * inverseNorm[c]
                        if similarity > best.similarity {
                            best = Match(evicted: e, pivot: c, similarity: similarity)
                        }
                    }
                    if best.pivot >= 0 { headMatches.append(best) }
                }
                matches.append(headMatches)
            }
        }
        if filterBelowMean, mode != .pivotal {
            // The official code drops evicted tokens whose head-averaged best similarity is below the
            // layer's mean; they are evicted without merging.
            var sum = [Float](repeating: 0, count: m)
            var count = [Int](repeating: 0, count: m)
            var total: Float = 0
            var pairs = 0
            for match in matches.joined() {
                sum[match.evicted] += match.similarity
                count[match.evicted] += 1
                total += match.similarity
                pairs += 1
            }
            let mean = total / Float(max(1, pairs))
            matches = matches.map { $0.filter { sum[$0.evicted] / Float(count[$0.evicted]) >= mean } }
        }
        prefill.keys.withUnsafeBufferPointer { keys in
            prefill.values.withUnsafeBufferPointer { values in
                for h in 0..<g.kvHeads {
                    // Per pivot: running sums of key and value rows, seeded with the pivot itself.
                    var sums: [Int: (key: [Float], value: [Float], joined: Int)] = [:]
                    for match in matches[h] {
                        let x = match.pivot
                        let keyX = keys.baseAddress! + prefill.kvOffset(head: h, position: x)
                        let valueX = values.baseAddress! + prefill.kvOffset(head: h, position: x)
                        let keyY = keys.baseAddress! + prefill.kvOffset(head: h, position: match.evicted)
                        let valueY = values.baseAddress! + prefill.kvOffset(head: h, position: match.evicted)
                        if sums[x] == nil {
                            sums[x] = (Array(UnsafeBufferPointer(start: keyX, count: d)),
                                       Array(UnsafeBufferPointer(start: valueX, count: d)), 0)
                        }
                        sums[x]!.joined += 1
                        for c in 0..<d {
                            switch mode {
                            case .averaged, .none:
                                sums[x]!.key[c] += keyY[c]
                                sums[x]!.value[c] += valueY[c]
                            case .pivotal:
                                sums[x]!.key[c] += (keyY[c] + keyX[c]) / 2
                                sums[x]!.value[c] += (valueY[c] + valueX[c]) / 2
                            case .weighted:
                                sums[x]!.key[c] += match.similarity * keyY[c]
                                sums[x]!.value[c] += match.similarity * valueY[c]
                            }
                        }
                    }
                    for (x, sum) in sums {
                        let scale = 1 / Float(sum.joined + 1)
                        changedKeys[h][x] = sum.key.map { $0 * scale }
                        changedValues[h][x] = sum.value.map { $0 * scale }
                    }
                }
            }
        }
        return matches.reduce(0) { $0 + $1.count }
    }
}
